//! `tern image export NAME` without `--out`: the image goes to standard output when it is piped,
//! and to `NAME.elf` in the current directory when it is a terminal (run here under `script`,
//! which gives the command a pseudo-terminal).

mod common;

use std::process::{Command, Stdio};

use common::{scratch, tern};

fn guest() -> &'static [u8] {
    tern_guest_image::builtin("testguest").expect("the embedded test guest")
}

/// Panics with a clear message unless util-linux `script` is installed (it provides the terminal).
fn require_script() {
    let ok = Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "this test needs util-linux `script` to give tern a terminal (apt-get install bsdutils)"
    );
}

#[test]
fn a_piped_export_without_out_writes_the_image_to_stdout() {
    let dir = scratch();
    let out = Command::new(tern())
        .args(["image", "export", "testguest"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .output()
        .expect("run tern");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == guest(),
        "stdout holds exactly the embedded ELF"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "no file is written when stdout is piped"
    );
}

#[test]
fn an_export_on_a_terminal_without_out_writes_name_elf_here() {
    require_script();
    let dir = scratch();
    let cmd = format!("{} image export testguest", tern());
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run script");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    let written = std::fs::read(dir.path().join("testguest.elf"))
        .unwrap_or_else(|e| panic!("testguest.elf not written ({e}); terminal showed: {shown}"));
    assert!(
        written == guest(),
        "testguest.elf holds exactly the embedded ELF"
    );
    assert!(shown.contains("testguest.elf"), "it says where: {shown}");
    assert!(
        !shown.contains("\u{7f}ELF"),
        "no binary on the terminal: {shown}"
    );
}

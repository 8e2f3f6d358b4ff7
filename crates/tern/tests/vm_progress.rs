//! Long operations show progress on a terminal and nothing when piped: `tern vm snapshot` run
//! under `script` (a pseudo-terminal) draws its spinner; piped, its stderr stays empty.
//! Needs root and /dev/kvm, and util-linux `script`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{RunningVm, field, require_kvm, scratch, tern, tern_cmd};

#[test]
fn a_snapshot_draws_a_spinner_on_a_terminal_and_nothing_when_piped() {
    require_kvm();
    assert!(
        Command::new("script")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "this test needs util-linux `script` to give tern a terminal (apt-get install bsdutils)"
    );
    let dir = scratch();
    let rt = dir.path().join("rt");
    let rts = rt.to_str().unwrap();
    let mut vm = RunningVm::start_tern(
        dir.path(),
        "vm",
        &[
            "vm",
            "run",
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "128",
            "--cmdline",
            "tern.hb_ms=50",
            "--name",
            "spun",
            "--runtime-dir",
            rts,
            "--snapshot-dir",
            dir.path().to_str().unwrap(),
        ],
    );
    vm.wait_line(Duration::from_secs(30), |l| {
        l.starts_with("HB ") && field(l, "seq").is_some_and(|s| s >= 2)
    });

    let piped = dir.path().join("piped.snap");
    let (rc, out, err) = tern_cmd(&[
        "vm",
        "snapshot",
        "--name",
        "spun",
        "--runtime-dir",
        rts,
        "--out",
        piped.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(out, "ok\n");
    assert_eq!(err, "", "nothing but the result when piped");

    let shown = dir.path().join("shown.snap");
    let cmd = format!(
        "{} vm snapshot --name spun --runtime-dir {rts} --out {}",
        tern(),
        shown.display()
    );
    let term = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("run script");
    let screen = String::from_utf8_lossy(&term.stdout);
    assert!(term.status.success(), "{screen}");
    assert!(
        screen.contains(&format!("writing a snapshot to {}", shown.display())),
        "the terminal shows the spinner: {screen:?}"
    );
    assert!(shown.exists() && piped.exists());

    assert_eq!(
        tern_cmd(&["vm", "stop", "--name", "spun", "--runtime-dir", rts]).0,
        0
    );
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), 0);
}

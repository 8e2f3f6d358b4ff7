//! `tern net up|down` as a user meets them: a clash names the real flag and command, and `down` is
//! idempotent. Builds real network namespaces, so it needs root (fails loudly otherwise); names
//! carry the pid so parallel runs never clash.

use std::process::{Command, Output};

use tern_test_support::require_root_for;

const TERN: &str = env!("CARGO_BIN_EXE_tern");

fn tern(args: &[&str]) -> Output {
    Command::new(TERN).args(args).output().expect("run tern")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn namespaces() -> String {
    text(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
}

/// Removes the topology even when an assertion fails half-way.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = tern(&["net", "down", "--name", &self.0]);
    }
}

/// Regression: the clash message named the internal `replace_stale` and a bare `tern net down`.
#[test]
fn up_on_an_existing_name_names_the_flag_and_the_command() {
    require_root_for("net_cli tests build network namespaces");
    let name = format!("tnc{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    let out = tern(&["net", "up", "--name", &name, "--hosts", "1", "--no-client"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again = tern(&["net", "up", "--name", &name, "--hosts", "1", "--no-client"]);
    let err = text(&again.stderr);
    assert!(!again.status.success(), "a second up must refuse");
    assert!(
        err.contains(&format!("tern net down --name {name}"))
            && err.contains(&format!("tern net up --name {name} --replace")),
        "{err}"
    );
    assert!(!err.contains("replace_stale"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    // What the message says works.
    let replaced = tern(&[
        "net",
        "up",
        "--name",
        &name,
        "--hosts",
        "1",
        "--no-client",
        "--replace",
    ]);
    assert!(replaced.status.success(), "{}", text(&replaced.stderr));
}

/// Regression: `tern net down` of a topology that is not there was an error.
#[test]
fn down_is_idempotent_and_removes_partial_leftovers() {
    require_root_for("net_cli tests build network namespaces");
    let name = format!("tnd{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    let out = tern(&["net", "down", "--name", &name]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("no topology named {name}: nothing to remove")
    );
    // A partial leftover (a host namespace without its switch) is still removed.
    let ns = format!("{name}-h0");
    let add = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap();
    assert!(add.success());
    let out = tern(&["net", "down", "--name", &name]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("removed topology {name} ({ns})")
    );
    assert!(
        !namespaces()
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&ns))
    );
    // A name that only shares a prefix is not ours.
    let other = format!("{name}-h0x");
    assert!(
        Command::new("ip")
            .args(["netns", "add", &other])
            .status()
            .unwrap()
            .success()
    );
    let out = tern(&["net", "down", "--name", &name]);
    assert!(out.status.success());
    assert!(namespaces().contains(&other), "{other} must stay");
    assert!(
        Command::new("ip")
            .args(["netns", "delete", &other])
            .status()
            .unwrap()
            .success()
    );
}

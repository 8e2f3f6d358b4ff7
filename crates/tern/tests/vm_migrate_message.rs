//! What people read around a live migration: `tern vm migrate --name` prints the report as plain
//! text (no JSON quoting, no progress drawing when piped) and says where the VM runs now, and the
//! source VMM's last line names the target. Needs root and /dev/kvm.

mod common;

use std::time::Duration;

use common::{RunningVm, field, free_port, require_kvm, scratch, tern_cmd, wait_for_text};

#[test]
fn the_source_names_the_target_and_the_report_is_plain_text() {
    require_kvm();
    let dir = scratch();
    let rt = dir.path().join("rt");
    let rts = rt.to_str().unwrap();
    let port = free_port();
    let to = format!("127.0.0.1:{port}");
    // Neither VMM is given --api-sock: both serve RUNTIME_DIR/api/NAME.sock.
    let mut dst = RunningVm::start_tern(
        dir.path(),
        "dst",
        &[
            "vm",
            "receive",
            "--listen",
            &to,
            "--name",
            "moved",
            "--runtime-dir",
            rts,
        ],
    );
    wait_for_text(
        &dir.path().join("dst.stderr"),
        "waiting for a migration",
        Duration::from_secs(10),
    );
    let mut src = RunningVm::start_tern(
        dir.path(),
        "src",
        &[
            "vm",
            "run",
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "64",
            "--cmdline",
            "tern.hb_ms=50",
            "--name",
            "origin",
            "--runtime-dir",
            rts,
        ],
    );
    src.wait_line(Duration::from_secs(30), |l| {
        l.starts_with("HB ") && field(l, "seq").is_some_and(|s| s >= 3)
    });

    // Nobody listens there: the failure is told in words, and the VM stays here.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let (rc, _, err) = tern_cmd(&[
        "vm",
        "migrate",
        "--name",
        "origin",
        "--runtime-dir",
        rts,
        "--to",
        &nowhere,
    ]);
    assert_eq!(rc, 1, "{err}");
    assert!(
        err.contains(&format!("migration to {nowhere} failed in ")),
        "{err}"
    );
    assert!(err.contains("the VM keeps running here"), "{err}");
    assert!(!err.contains('"'), "no JSON quoting: {err}");

    let (rc, out, err) = tern_cmd(&[
        "vm",
        "migrate",
        "--name",
        "origin",
        "--runtime-dir",
        rts,
        "--to",
        &to,
    ]);
    assert_eq!(rc, 0, "migrate --name: {err}");
    assert_eq!(out, "", "the text report goes to stderr");
    let report = err
        .lines()
        .find(|l| l.starts_with("migration to "))
        .unwrap_or_else(|| panic!("no report line: {err}"));
    assert!(
        report.starts_with(&format!("migration to {to} completed in ")),
        "{report}"
    );
    assert!(
        !report.contains('"'),
        "no JSON quoting in the report: {report}"
    );
    for part in ["downtime ", " sent", "zero pages skipped", "throttle max"] {
        assert!(report.contains(part), "{report} lacks {part}");
    }
    assert!(
        err.contains(&format!("runs on {to} now")),
        "migrate says where the VM runs: {err}"
    );
    assert!(
        !err.contains('\r') && !err.contains('\u{1b}'),
        "no progress drawing when stderr is not a terminal: {err:?}"
    );

    assert_eq!(src.wait_exit(Duration::from_secs(15)), 0);
    let last = src.stderr().lines().last().unwrap_or_default().to_string();
    assert_eq!(
        last,
        format!("tern: VM migrated to {to}; it runs there now and has stopped here"),
        "the source VMM's last line names the target; stderr:\n{}",
        src.stderr()
    );
    dst.wait_line(Duration::from_secs(10), |l| l.starts_with("HB "));

    let (rc, out, err) = tern_cmd(&["vm", "list", "--json", "--runtime-dir", rts]);
    assert_eq!(rc, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "only the target is left: {rows:?}");
    assert_eq!(rows[0]["name"], "moved");
    assert_eq!(rows[0]["state"], "running");
    assert_eq!(
        rows[0]["api_sock"],
        rt.join("api/moved.sock").to_str().unwrap()
    );

    let (rc, _, err) = tern_cmd(&["vm", "stop", "--name", "moved", "--runtime-dir", rts]);
    assert_eq!(rc, 0, "stop the target by name: {err}");
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), 0);
}

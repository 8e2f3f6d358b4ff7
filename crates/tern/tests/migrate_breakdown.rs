//! The pause of a real migration (KVM test guest, loopback) broken into its steps: the report's
//! `downtime_steps` come in the documented order, add up to the reported downtime (± 1 ms), the
//! target's steps fit in the time between the commit and the answer, and the human output shows
//! the breakdown on one line.

mod common;

use common::{MigrationPair, tern_cmd};

/// The steps of a completed migration as (name, µs, bytes).
fn steps(report: &serde_json::Value) -> Vec<(String, u64, u64)> {
    report["downtime_steps"]
        .as_array()
        .unwrap_or_else(|| panic!("the report has no downtime_steps: {report}"))
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap().to_string(),
                s["us"].as_u64().unwrap(),
                s["bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_writing_guests_pause_is_accounted_for_step_by_step() {
    let mut p = MigrationPair::start(
        300,
        1,
        "tern.hb_ms=50 tern.dirty_mib=256 tern.dirty_rate=20000",
        &[],
    );
    let (rc, report, err) = p.migrate(&["--verify-memory", "--streams", "2"]);
    assert_eq!(rc, 0, "migrate failed: {err}\nreport: {report}");
    assert_eq!(report["outcome"], "completed", "{report}");
    let steps = steps(&report);
    let names: Vec<&str> = steps.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "dirty_log",
            "final_pages",
            "save_state",
            "release_storage",
            "state_sent",
            "target_data",
            "target_verify",
            "target_restore",
            "target_resume",
            "ack"
        ],
        "{report}"
    );
    let sum_us: u64 = steps.iter().map(|s| s.1).sum();
    let downtime_ms = report["downtime_ms"].as_u64().unwrap();
    assert!(
        (sum_us as f64 / 1000.0 - downtime_ms as f64).abs() <= 1.0,
        "steps add up to {sum_us} µs, the downtime is {downtime_ms} ms: {report}"
    );
    let by = |name: &str| steps.iter().find(|s| s.0 == name).unwrap();
    // The final round ends every data stream (and carries what the guest dirtied since the
    // last round, often nothing once the rounds that shrink the pause ran); the state step
    // carries the State and Verify frames.
    assert!(by("final_pages").2 > 0, "{report}");
    assert!(by("state_sent").2 > 4096, "{report}");
    // The target's clock measured real work: verifying 300 MiB and restoring take time.
    assert!(by("target_verify").1 > 0, "{report}");
    assert!(by("target_restore").1 > 0, "{report}");
    // Pages and state go only where the source sends them.
    for s in &steps {
        if !["final_pages", "state_sent"].contains(&s.0.as_str()) {
            assert_eq!(s.2, 0, "{} wrote no bytes: {report}", s.0);
        }
    }
    p.assert_moved();
}

#[test]
fn the_human_report_shows_the_breakdown_on_one_line() {
    let mut p = MigrationPair::start(64, 1, "tern.hb_ms=50", &[]);
    let to = format!("{}:{}", p.to_host, p.port);
    let (rc, out, err) = tern_cmd(&[
        "vm",
        "migrate",
        "--api-sock",
        p.src_sock.to_str().unwrap(),
        "--to",
        &to,
    ]);
    assert_eq!(rc, 0, "migrate failed: {err}");
    assert!(out.is_empty(), "nothing on stdout without --json: {out}");
    let line = err
        .lines()
        .find(|l| l.trim_start().starts_with("pause "))
        .unwrap_or_else(|| panic!("no breakdown line in: {err}"));
    for part in [
        "ms: source dirty log ",
        ", final pages ",
        ", state sent ",
        "| target data ",
        ", restore ",
        ", resume ",
        "| ack ",
    ] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }
    p.assert_moved();
}

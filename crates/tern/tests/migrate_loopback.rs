//! Live migration of real KVM guests between two `tern` processes on loopback: idle, moderate
//! (20,000 pages/s over 256 MiB) and maximum-rate dirtying, and a 2-vCPU guest, each with
//! `--verify-memory`. The guest's own memory self-check must stay quiet on the target.

mod common;

use common::MigrationPair;

fn completed(report: &serde_json::Value, rc: i32, err: &str) {
    assert_eq!(rc, 0, "migrate failed: {err}\nreport: {report}");
    assert_eq!(report["outcome"], "completed", "report: {report}");
    for k in [
        "total_ms",
        "downtime_ms",
        "rounds",
        "bytes_sent",
        "pages_zero_skipped",
        "throttle_max_pct",
        "converged",
    ] {
        assert!(!report[k].is_null(), "report lacks {k}: {report}");
    }
}

#[test]
fn idle_guest_migrates_and_its_heartbeats_continue() {
    let mut p = MigrationPair::start(64, 1, "tern.hb_ms=50", &[]);
    let (rc, report, err) = p.migrate(&["--verify-memory"]);
    completed(&report, rc, &err);
    assert!(
        report["pages_zero_skipped"].as_u64().unwrap() > 10_000,
        "an idle 64 MiB guest is mostly zero pages: {report}"
    );
    p.assert_moved();
}

#[test]
fn moderately_dirtying_guest_migrates_with_its_memory_intact() {
    let mut p = MigrationPair::start(
        300,
        1,
        "tern.hb_ms=50 tern.dirty_mib=256 tern.dirty_rate=20000",
        &[],
    );
    let (rc, report, err) = p.migrate(&["--verify-memory", "--streams", "2"]);
    completed(&report, rc, &err);
    assert!(report["rounds"].as_u64().unwrap() >= 2, "{report}");
    p.assert_moved();
}

#[test]
fn maximum_rate_writer_converges_through_throttling() {
    let mut p = MigrationPair::start(
        300,
        1,
        "tern.hb_ms=50 tern.dirty_mib=256 tern.dirty_rate=0",
        &[],
    );
    let (rc, report, err) = p.migrate(&["--verify-memory", "--timeout", "60"]);
    completed(&report, rc, &err);
    assert_eq!(report["converged"], true, "{report}");
    p.assert_moved();
}

#[test]
fn two_vcpu_guest_migrates_and_both_vcpus_continue() {
    let mut p = MigrationPair::start(
        128,
        2,
        "tern.hb_ms=50 tern.dirty_mib=64 tern.dirty_rate=20000",
        &[],
    );
    let (rc, report, err) = p.migrate(&["--verify-memory"]);
    completed(&report, rc, &err);
    p.assert_moved();
    assert!(
        p.dst
            .seen
            .iter()
            .any(|l| l.starts_with("HB ") && l.contains("cpu=1")),
        "vCPU 1 must keep beating on the target: {:?}",
        p.dst.seen
    );
}

//! Live-migration options on real KVM guests over loopback: `--on-timeout force` pushes a
//! maximum-rate writer over at a tiny timeout (completed, not converged, memory verified), and
//! `--streams 4` carries a busy guest over four parallel TCP streams.

mod common;

use common::MigrationPair;

#[test]
fn tiny_timeout_with_force_switches_a_max_rate_writer_over_intact() {
    let mut p = MigrationPair::start(
        300,
        1,
        "tern.hb_ms=50 tern.dirty_mib=256 tern.dirty_rate=0",
        &[],
    );
    // The full copy of 256 MiB alone takes longer than 50 ms, so the first decision after it
    // is past the timeout with the whole hot set dirty: far above the budget.
    let (rc, report, err) = p.migrate(&[
        "--verify-memory",
        "--timeout",
        "0.05",
        "--on-timeout",
        "force",
    ]);
    assert_eq!(rc, 0, "forced migrate failed: {err}\nreport: {report}");
    assert_eq!(report["outcome"], "completed", "{report}");
    assert_eq!(
        report["converged"], false,
        "a forced switch-over is not a convergence: {report}"
    );
    assert!(
        report["bytes_sent"].as_u64().unwrap() > 256 << 20,
        "the forced pause carries the dirty hot set: {report}"
    );
    p.assert_moved();
}

#[test]
fn tiny_timeout_without_force_aborts_and_the_source_keeps_running() {
    let mut p = MigrationPair::start(
        300,
        1,
        "tern.hb_ms=50 tern.dirty_mib=256 tern.dirty_rate=0",
        &[],
    );
    let (rc, report, err) = p.migrate(&["--timeout", "0.05"]);
    assert_ne!(rc, 0, "a timed-out migration must fail: {report}");
    assert_ne!(report["outcome"], "completed", "{report}\n{err}");
    p.assert_source_kept();
}

#[test]
fn four_streams_carry_a_busy_guest_with_its_memory_intact() {
    let mut p = MigrationPair::start(
        300,
        1,
        "tern.hb_ms=50 tern.dirty_mib=256 tern.dirty_rate=20000",
        &[],
    );
    let (rc, report, err) = p.migrate(&["--verify-memory", "--streams", "4"]);
    eprintln!("report: {report}");
    assert_eq!(rc, 0, "migrate failed: {err}\nreport: {report}");
    assert_eq!(report["outcome"], "completed", "{report}");
    assert!(
        report["bytes_sent"].as_u64().unwrap() > 16 << 20,
        "the pages written so far must have gone over the four streams: {report}"
    );
    assert!(report["rounds"].as_u64().unwrap() >= 2, "{report}");
    p.assert_moved();
}

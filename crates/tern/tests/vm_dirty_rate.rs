//! `tern vm dirty-rate` (the VMM's `dirty_rate` request): a sample of how fast the guest dirties
//! its memory, checked against the test guest's paced writer, refused while a migration owns dirty
//! logging, and working again after it. Needs root and /dev/kvm.

mod common;

use std::time::Duration;

use common::{MigrationPair, RunningVm, require_kvm, scratch, tern, tern_cmd};

/// `tern vm dirty-rate --api-sock SOCK --window-ms MS --json` → (exit code, JSON, stderr).
fn dirty_rate(sock: &std::path::Path, window_ms: u64) -> (i32, serde_json::Value, String) {
    let (rc, out, err) = tern_cmd(&[
        "vm",
        "dirty-rate",
        "--api-sock",
        sock.to_str().unwrap(),
        "--window-ms",
        &window_ms.to_string(),
        "--json",
    ]);
    (
        rc,
        serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Null),
        err,
    )
}

fn start(dir: &std::path::Path, cmdline: &str) -> (RunningVm, std::path::PathBuf) {
    require_kvm();
    let (mut vm, sock) =
        RunningVm::start_testguest(dir, &format!("dr{}", std::process::id()), 128, cmdline);
    vm.wait_line(Duration::from_secs(30), |l| l.starts_with("HB "));
    (vm, sock)
}

#[test]
fn the_sampled_rate_matches_the_guests_writer() {
    let dir = scratch();
    let (vm, sock) = start(
        dir.path(),
        "tern.hb_ms=500 tern.dirty_mib=32 tern.dirty_rate=5000",
    );
    let (rc, r, err) = dirty_rate(&sock, 500);
    assert_eq!(rc, 0, "{err}");
    let rate = r["pages_per_s"].as_u64().unwrap();
    assert!(
        (3500..=7000).contains(&rate),
        "the writer dirties 5000 pages/s; sampled {r}"
    );
    let window = r["window_ms"].as_u64().unwrap();
    assert!((500..700).contains(&window), "{r}");
    let pages = r["pages"].as_u64().unwrap();
    let from_pages = pages * 1000 / window.max(1);
    assert!(
        rate.abs_diff(from_pages) <= rate / 50 + 1,
        "the rate is the pages over the window: {r}"
    );
    // Logging is off again: a second sample starts from nothing and agrees.
    let (rc, r2, err) = dirty_rate(&sock, 200);
    assert_eq!(rc, 0, "{err}");
    let rate2 = r2["pages_per_s"].as_u64().unwrap();
    assert!((3500..=7000).contains(&rate2), "{r2}");
    vm.assert_no_panic();
}

#[test]
fn an_idle_guest_dirties_little_and_bad_windows_are_refused() {
    let dir = scratch();
    let (mut vm, sock) = start(dir.path(), "tern.hb_ms=200");
    let (rc, r, err) = dirty_rate(&sock, 300);
    assert_eq!(rc, 0, "{err}");
    assert!(r["pages_per_s"].as_u64().unwrap() < 500, "{r}");
    for bad in [0, 100_000] {
        let (rc, _, err) = dirty_rate(&sock, bad);
        assert_eq!(rc, 1, "window {bad}: {err}");
        assert!(err.contains("10 to 10000 ms"), "window {bad}: {err}");
    }
    vm.wait_line(Duration::from_secs(5), |l| l.starts_with("HB "));
    vm.assert_no_panic();
}

#[test]
fn a_sample_is_refused_while_a_migration_runs_and_works_after_it() {
    let mut p = MigrationPair::start(
        128,
        1,
        "tern.hb_ms=50 tern.dirty_mib=64 tern.dirty_rate=20000",
        &[],
    );
    let m = std::process::Command::new(tern())
        .args(["vm", "migrate", "--api-sock"])
        .arg(&p.src_sock)
        .args(["--to", &format!("127.0.0.1:{}", p.port), "--json"])
        .args(["--max-bandwidth-mibps", "16"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tern vm migrate");
    // Round 0 alone takes seconds at 16 MiB/s; ask until the migration is seen.
    let mut refused = None;
    for _ in 0..50 {
        let (rc, _, err) = dirty_rate(&p.src_sock, 50);
        if rc != 0 {
            refused = Some(err);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = refused.expect("a sample during the migration is refused");
    assert!(err.contains("migration"), "{err}");
    let (rc, _, err) = tern_cmd(&[
        "vm",
        "migrate",
        "--api-sock",
        p.src_sock.to_str().unwrap(),
        "--cancel",
    ]);
    assert_eq!(rc, 0, "cancel: {err}");
    let out = m.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(report["outcome"], "cancelled", "{report}");
    let (rc, r, err) = dirty_rate(&p.src_sock, 300);
    assert_eq!(rc, 0, "after the migration: {err}");
    let rate = r["pages_per_s"].as_u64().unwrap();
    assert!(
        (14_000..=28_000).contains(&rate),
        "the writer dirties 20000 pages/s: {r}"
    );
    p.assert_source_kept();
}

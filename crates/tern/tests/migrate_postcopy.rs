//! Post-copy live migration (`tern vm migrate --post-copy-after N`) of real KVM guests on
//! loopback: the test guest writing at its maximum rate moves with its memory verified page by
//! page and keeps running on the target; a link lost after the switch loses the VM as
//! documented (docs/migration.md, "Post-copy"): the target stops the guest, the source stays
//! paused, the outcome is `failed_post_copy` (exit 4), and no running copy is claimed.
//!
//! Needs root (userfaultfd without `UFFD_USER_MODE_ONLY`) and KVM; fails loudly without.

mod common;
#[path = "common/faultproxy.rs"]
mod faultproxy;

use std::time::Duration;

use common::{MigrationPair, field, tern_cmd};
use faultproxy::{Disposition, FaultProxy};

/// 64 MiB written at the guest's maximum rate: every round re-dirties all of it.
const MAX_RATE: &str = "tern.hb_ms=50 tern.dirty_mib=64 tern.dirty_rate=0";

fn require_root() {
    // SAFETY-free check: the effective user id through `id -u`.
    let out = std::process::Command::new("id")
        .arg("-u")
        .output()
        .expect("run id -u");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "post-copy tests need root: the target opens a userfaultfd that KVM's faults reach"
    );
}

fn status(sock: &std::path::Path) -> String {
    let (rc, out, err) = tern_cmd(&["vm", "status", "--api-sock", sock.to_str().unwrap()]);
    assert_eq!(rc, 0, "status: {err}");
    out
}

#[test]
fn maximum_rate_writer_moves_by_post_copy_with_its_memory_verified() {
    require_root();
    let mut p = MigrationPair::start(128, 1, MAX_RATE, &[]);
    // A 5 ms pause budget: pre-copy must not converge before the switch. (With the pages sent
    // in place a round 0 of this guest runs at ~1 GB/s, and the 50 ms default then let pre-copy
    // switch over after round 0 with the writer's dirty ~40 MB.)
    let (rc, report, err) = p.migrate(&[
        "--post-copy-after",
        "2",
        "--verify-memory",
        "--downtime-ms",
        "5",
    ]);
    assert_eq!(rc, 0, "post-copy migration failed: {err}\nreport: {report}");
    assert_eq!(report["outcome"], "completed", "{report}");
    let pc = &report["post_copy"];
    assert!(
        pc.is_object(),
        "the report must carry post-copy figures: {report}"
    );
    let n = |k: &str| {
        pc[k]
            .as_u64()
            .unwrap_or_else(|| panic!("post_copy.{k} missing: {report}"))
    };
    // The writer re-dirties its 64 MiB as fast as it can: at the switch, far more than a
    // megabyte of it is owed (how much depends on how long the last round took).
    assert!(n("pages_owed") > 256, "{report}");
    assert!(
        n("pages_demanded") + n("pages_pushed") >= n("pages_owed"),
        "every owed page was sent one way or the other: {report}"
    );
    assert!(
        n("demand_faults") > 0 && n("pages_demanded") > 0,
        "a maximum-rate writer faults on owed pages at once: {report}"
    );
    assert!(n("max_fault_latency_us") > 0, "{report}");
    assert_eq!(
        report["rounds"].as_u64(),
        Some(3),
        "two pre-copy rounds, then the switch: {report}"
    );
    assert_eq!(
        report["throttle_max_pct"].as_f64(),
        Some(0.0),
        "the guest is not throttled before a post-copy switch: {report}"
    );
    eprintln!("post-copy report: {report}");
    // Heartbeats continue the source's sequence on the target, the guest's own memory check
    // stays quiet, the runtime entry moved, and the target stops cleanly.
    p.assert_moved();
}

#[test]
fn post_copy_over_mutual_tls_joins_its_push_stream_with_the_sources_certificate() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let ca = common::pki(tmp.path(), &[("node-a", "host"), ("node-b", "host")]);
    let (src_tls, dst_tls) = (ca.join("node-a"), ca.join("node-b"));
    let mut p = MigrationPair::start(128, 1, MAX_RATE, &["--tls-dir", dst_tls.to_str().unwrap()]);
    let (rc, report, err) = p.migrate(&[
        "--post-copy-after",
        "1",
        "--verify-memory",
        "--tls-dir",
        src_tls.to_str().unwrap(),
        "--tls-name",
        "node-b",
    ]);
    assert_eq!(
        rc, 0,
        "post-copy over TLS failed: {err}
report: {report}"
    );
    assert_eq!(report["outcome"], "completed", "{report}");
    let pushed = report["post_copy"]["pages_pushed"].as_u64().unwrap_or(0);
    assert!(pushed > 0, "the push stream carried pages: {report}");
    assert!(
        !p.dst.stderr().contains("dropped a connection"),
        "{}",
        p.dst.stderr()
    );
    p.assert_moved();
}

/// Starts a slow post-copy (1 round, 16 MiB/s push) and waits until the guest runs on the
/// target: its first heartbeat there.
fn switched_slowly() -> (MigrationPair, std::process::Child) {
    require_root();
    let mut p = MigrationPair::start(128, 1, MAX_RATE, &[]);
    let m = p.spawn_migrate(
        p.port,
        &["--post-copy-after", "1", "--max-bandwidth-mibps", "16"],
    );
    let first = p
        .dst
        .wait_line(Duration::from_secs(30), |l| l.starts_with("HB "));
    assert!(field(&first, "seq").is_some(), "{first}");
    (p, m)
}

#[test]
fn killing_the_target_during_post_copy_loses_the_vm_and_the_source_stays_paused() {
    let (mut p, m) = switched_slowly();
    p.dst.child.kill().expect("kill the target");
    let (rc, report, err) = common::migrate_output(m);
    assert_eq!(rc, 4, "post-copy lost: exit 4\n{err}\n{report}");
    assert_eq!(report["outcome"], "failed_post_copy", "{report}");
    assert!(report["post_copy"].is_object(), "{report}");
    assert!(err.contains("the VM is lost"), "{err}");
    // The source never resumes: paused, and its console stays silent.
    let s = status(&p.src_sock);
    assert!(s.contains("\"paused\""), "the source must stay paused: {s}");
    // And it refuses to run again: resuming it would run a stale copy.
    let (rc, _, err) = tern_cmd(&["vm", "resume", "--api-sock", p.src_sock.to_str().unwrap()]);
    assert_ne!(
        rc, 0,
        "resuming a source after a failed post-copy must be refused"
    );
    assert!(err.contains("stale"), "{err}");
    assert!(status(&p.src_sock).contains("\"paused\""));
    p.src.collect_for(Duration::from_millis(200));
    let before = p.src.last_hb();
    p.src.collect_for(Duration::from_millis(1500));
    assert_eq!(
        p.src.last_hb(),
        before,
        "the source guest must not run again after a failed post-copy"
    );
    assert!(
        !p.runtime.join("dst.json").exists(),
        "the killed target claims no running VM"
    );
    let _ = tern_cmd(&["vm", "stop", "--api-sock", p.src_sock.to_str().unwrap()]);
    p.src.wait_exit(Duration::from_secs(10));
}

#[test]
fn losing_the_source_during_post_copy_stops_the_guest_on_the_target() {
    let (mut p, m) = switched_slowly();
    p.src.child.kill().expect("kill the source VMM");
    let rc = p.dst.wait_exit(Duration::from_secs(40));
    assert_ne!(rc, 0, "the target must fail: {}", p.dst.stderr());
    let err = p.dst.stderr();
    eprintln!("target's stderr:\n{err}");
    assert!(
        err.contains("ost-copy"),
        "the target must say post-copy failed: {err}"
    );
    assert!(
        !p.runtime.join("dst.json").exists(),
        "a target that lost post-copy claims no running VM"
    );
    // The migrate client lost its VMM: it fails too, claiming nothing.
    let (rc, report, err) = common::migrate_output(m);
    assert_ne!(rc, 0, "{err} {report}");
    assert_ne!(report["outcome"], "completed", "{report}");
}

#[test]
fn a_dead_link_during_post_copy_loses_the_vm_on_both_sides() {
    require_root();
    let mut p = MigrationPair::start(128, 1, MAX_RATE, &[]);
    // Every stream goes silent (no data, no reset) when the target asks for its first page.
    let proxy = FaultProxy::start_at_frame(p.port, false, 16, || Disposition::BlackHole);
    let (rc, report, err) = p.migrate_to(proxy.port, &["--post-copy-after", "1"]);
    assert!(
        proxy.fired(),
        "the target never asked for a page: {report}\n{err}"
    );
    assert_eq!(
        rc, 4,
        "a dead link after the switch: exit 4\n{err}\n{report}"
    );
    assert_eq!(report["outcome"], "failed_post_copy", "{report}");
    assert!(
        status(&p.src_sock).contains("\"paused\""),
        "the source stays paused"
    );
    // The target gives up on its own (a timeout: nothing says the link died) and stops the
    // guest.
    let rc = p.dst.wait_exit(Duration::from_secs(60));
    assert_ne!(rc, 0, "the target must fail: {}", p.dst.stderr());
    let dst_err = p.dst.stderr();
    // Its push stream may not have joined yet, or it waits for pages: either way the link.
    assert!(dst_err.contains("post-copy link lost"), "{dst_err}");
    assert!(
        !p.runtime.join("dst.json").exists(),
        "no running VM claimed"
    );
    drop(proxy);
    let _ = tern_cmd(&["vm", "stop", "--api-sock", p.src_sock.to_str().unwrap()]);
    p.src.wait_exit(Duration::from_secs(10));
}

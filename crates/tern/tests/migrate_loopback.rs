//! Live migration of real KVM guests between two `tern` processes on loopback: idle, moderate
//! (20,000 pages/s over 256 MiB) and maximum-rate dirtying, and a 2-vCPU guest, each with
//! `--verify-memory`. The guest's own memory self-check must stay quiet on the target. Guest RAM
//! on transparent huge pages (`--huge-pages`) at both ends, or at the source only.

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

/// By default the pages go from the source's guest memory to the target's without a copy on
/// either side (protocol 5's `PageData` frames, each data page under its own checksum); the
/// memory digest at the pause proves every page arrived as the guest left it, pages it rewrote
/// while their frame was in flight included, and the report has the target's count of pages
/// that failed their checksum and came again.
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
    assert!(
        report["pages_resent_after_checksum_mismatch"].is_u64(),
        "a protocol 5 target counts them: {report}"
    );
    p.assert_moved();
}

/// `--copy-pages`: every page copied into a `Pages` frame under the frame's checksum; the
/// same guest arrives intact.
#[test]
fn moderately_dirtying_guest_migrates_with_copied_pages_and_its_memory_intact() {
    let mut p = MigrationPair::start(
        300,
        1,
        "tern.hb_ms=50 tern.dirty_mib=256 tern.dirty_rate=20000",
        &[],
    );
    let (rc, report, err) = p.migrate(&["--verify-memory", "--copy-pages"]);
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

/// The `AnonHugePages` (KiB) of process `pid`'s guest RAM: its one mapping of `mib` MiB that is
/// eligible for huge pages, or of any eligibility when `eligible` is false.
fn guest_ram_huge_kib(pid: u32, mib: u64, eligible: bool) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/smaps: {e}"));
    let want = format!("{}", mib * 1024);
    let mut found = Vec::new();
    let (mut size, mut huge) = (None, 0u64);
    for line in smaps.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("Size:") => size = w.next().map(str::to_string),
            Some("AnonHugePages:") => huge = w.next().unwrap().parse().unwrap(),
            Some("THPeligible:") => {
                let thp = w.next() == Some("1");
                if size.as_deref() == Some(want.as_str()) && thp == eligible {
                    found.push(huge);
                }
            }
            _ => {}
        }
    }
    assert_eq!(
        found.len(),
        1,
        "pid {pid}: one {mib} MiB guest RAM mapping with THPeligible {} expected, found {found:?}",
        u8::from(eligible)
    );
    found[0]
}

/// The huge-page backing a 256 MiB written buffer must at least have with huge pages on, KiB.
const HUGE_KIB_AT_LEAST: u64 = 64 << 10;

/// Huge pages by default at the source (the host's THP mode is madvise or always) and by
/// `--huge-pages on` at the target: both back the guest's written 256 MiB with huge pages, and
/// the memory arrives intact. A target given `--huge-pages off` keeps to 4 KiB pages: the
/// setting is each host's, it does not travel with the VM.
#[test]
fn guest_ram_on_huge_pages_migrates_intact_and_the_target_keeps_its_own_setting() {
    let thp = tern_vmm::config::HostLimits::probe().thp;
    assert!(
        thp.allows_huge_pages(),
        "this test needs transparent huge pages in madvise or always mode (the host's is {thp})"
    );
    // `dirty_fill=data`: the whole buffer holds data from the start, so every page of it travels.
    let cmdline = "tern.hb_ms=50 tern.dirty_mib=256 tern.dirty_rate=20000 tern.dirty_fill=data";
    for (target, target_huge) in [("on", true), ("off", false)] {
        let mut p = MigrationPair::start(300, 1, cmdline, &["--huge-pages", target]);
        // The kernel gives huge pages when it can (a fragmented or busy host gives fewer: 196
        // of 256 MiB was seen under a full test run), so the bound is a quarter of the buffer:
        // far from the none that `off` must give.
        let src = guest_ram_huge_kib(p.src.child.id(), 300, true);
        assert!(
            src >= HUGE_KIB_AT_LEAST,
            "the source's written 256 MiB should sit on huge pages: {src} KiB"
        );
        let (rc, report, err) = p.migrate(&["--verify-memory", "--streams", "2"]);
        completed(&report, rc, &err);
        // Read while the VM runs there (assert_moved stops it).
        let dst = guest_ram_huge_kib(p.dst.child.id(), 300, target_huge);
        if target_huge {
            assert!(
                dst >= HUGE_KIB_AT_LEAST,
                "target --huge-pages on: the received 256 MiB should sit on huge pages: {dst} KiB"
            );
        } else {
            assert_eq!(dst, 0, "target --huge-pages off: no huge page");
        }
        p.assert_moved();
    }
}

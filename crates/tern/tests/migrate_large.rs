//! Live migration of a 4 GiB KVM test guest on loopback: RAM on both sides of the 32-bit MMIO hole
//! (3 GiB below it, 1 GiB from 4 GiB up), the guest writing a 1 GiB working set in its memory above
//! 4 GiB at 20,000 pages/s, filled with data from the start (the `large` workload of `cargo xtask
//! bench migrate`). The migration
//! completes with `--verify-memory` (a checksum of every page of both regions compared on the
//! target), the heartbeats continue on the target, and the guest's own memory check stays quiet.
//!
//! Needs root and KVM; fails loudly without (common::require_kvm).

mod common;

use common::{MigrationPair, field};

/// 1 GiB of data rewritten at 20,000 pages/s, heartbeat every 50 ms.
const LARGE: &str = "tern.hb_ms=50 tern.dirty_mib=1024 tern.dirty_rate=20000 tern.dirty_fill=data";

#[test]
fn four_gib_guest_with_a_1_gib_working_set_migrates_with_its_memory_verified() {
    let mut p = MigrationPair::start(4096, 1, LARGE, &[]);
    // The guest saw the whole 4 GiB and put its buffer above the hole: the writes the migration
    // must track land in the second memory region.
    let up = p
        .src
        .seen
        .iter()
        .find(|l| l.starts_with("TERN-GUEST up"))
        .cloned()
        .expect("the source printed its up line");
    assert_eq!(field(&up, "mem_mib"), Some(4096), "{up}");
    assert_eq!(field(&up, "dirty_base_mib"), Some(4096), "{up}");

    let (rc, report, err) = p.migrate(&["--verify-memory", "--streams", "2"]);
    assert_eq!(rc, 0, "migrate failed: {err}\nreport: {report}");
    assert_eq!(report["outcome"], "completed", "{report}");
    let n = |k: &str| {
        report[k]
            .as_u64()
            .unwrap_or_else(|| panic!("report lacks {k}: {report}"))
    };
    // The working set went over the wire at least once; the 3 GiB never written were skipped as
    // zero pages.
    assert!(n("bytes_sent") >= 1 << 30, "{report}");
    assert!(
        n("pages_zero_skipped") >= (2u64 << 30) / 4096,
        "the untouched memory is zero pages: {report}"
    );
    assert!(
        n("rounds") >= 2,
        "the writer dirtied pages during round 1: {report}"
    );
    p.assert_moved();
}

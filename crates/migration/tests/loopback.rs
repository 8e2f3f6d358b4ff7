//! Migrations over real TCP on loopback between in-memory VMs: workloads, memory equality,
//! and fault injection. Every test ends by checking that exactly one copy of the VM runs.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{MemVm, Proxy, VmState};
use tern_migration::StreamName;
use tern_migration::machine::receiver::ChecksumStage;
use tern_migration::report::RoundDecision;
use tern_migration::wire::{DecodeError, ReadFrameError};
use tern_migration::{
    CancelToken, ConvergenceConfig, MigrateError, MigrateOptions, MigrationFailure,
    MigrationReport, OnTimeout, Outcome, PAGE_SIZE, Progress, ReceiveError, ReceiveOptions,
    ReceiveReport, error_chain, receive,
};

const MIB: u64 = 1 << 20;

type TargetResult = (MemVm, Result<ReceiveReport, ReceiveError>);

fn spawn_target(mut tgt: MemVm) -> (SocketAddr, JoinHandle<TargetResult>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = thread::spawn(move || {
        let opts = ReceiveOptions {
            accept_timeout: Some(Duration::from_secs(20)),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
        };
        let r = receive(&listener, &mut tgt, &opts, &CancelToken::new());
        (tgt, r)
    });
    (addr, h)
}

fn opts(streams: u16, verify: bool) -> MigrateOptions {
    MigrateOptions {
        streams,
        verify_memory: verify,
        convergence: ConvergenceConfig {
            timeout: Duration::from_secs(30),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn migrate(
    src: &mut MemVm,
    to: SocketAddr,
    o: &MigrateOptions,
    cancel: &CancelToken,
) -> (Result<MigrationReport, MigrationFailure>, Vec<Progress>) {
    let mut seen = Vec::new();
    let r = tern_migration::migrate(src, to, o, cancel, &mut |p| seen.push(p.clone()));
    (r, seen)
}

/// The migration completed: the target runs (and keeps running its workload from where the
/// source stopped), the source stays paused, and the target's memory at resume equals the
/// source's at the pause.
fn assert_moved(src: &MemVm, tgt: &MemVm, report: &MigrationReport) {
    assert_eq!(report.outcome, Outcome::Completed);
    assert_eq!(src.state(), VmState::Paused, "source must stay paused");
    assert_eq!(tgt.state(), VmState::Running, "target must run");
    let at_pause = src.snapshot.as_ref().expect("source paused");
    let at_resume = tgt.snapshot.as_ref().expect("target resumed");
    if at_pause != at_resume {
        let diff = at_pause
            .chunks(PAGE_SIZE as usize)
            .zip(at_resume.chunks(PAGE_SIZE as usize))
            .filter(|(a, b)| a != b)
            .count();
        panic!("target memory differs from the source's at the pause in {diff} pages");
    }
    assert_eq!(
        tgt.restored_seq(),
        Some(src.seq()),
        "state carried the heartbeat sequence"
    );
    assert!(
        tgt.wait_writes(20, Duration::from_secs(5)),
        "the workload must go on on the target"
    );
    assert!(
        tgt.seq() > src.seq(),
        "sequence continues past the source's"
    );
    assert_eq!(src.resumed_count, 0);
    assert_eq!(
        src.calls,
        ["pause", "save_state", "release"],
        "the storage is handed over once, at switch-over, and never taken back"
    );
    assert!(src.storage_away);
}

/// The migration failed: the source runs (resumed if it was paused), unthrottled, and the
/// target discarded what it had.
fn assert_stayed(src: &MemVm, tgt: &MemVm, failure: &MigrationFailure) {
    assert!(failure.report.outcome.source_runs(), "{:?}", failure.report);
    assert_eq!(
        src.state(),
        VmState::Running,
        "source must run: {}",
        failure.error
    );
    assert_eq!(src.throttle(), 0.0, "throttle removed");
    assert!(!src.storage_away, "storage taken back: {:?}", src.calls);
    if src.calls.contains(&"pause") {
        // Paused: the storage comes back (whether or not it was released) right before the
        // one resume.
        let n = src.calls.len();
        assert_eq!(src.calls[n - 2..], ["acquire", "resume"], "{:?}", src.calls);
        assert!(!src.calls[..n - 2].contains(&"acquire"), "{:?}", src.calls);
    } else {
        assert!(src.calls.is_empty(), "never paused: {:?}", src.calls);
    }
    assert!(
        src.wait_writes(20, Duration::from_secs(5)),
        "the source workload must go on"
    );
    assert_eq!(
        tgt.state(),
        VmState::Discarded,
        "target must discard: {}",
        failure.error
    );
    assert!(
        tgt.memory().iter().all(|&b| b == 0),
        "discarded memory cleared"
    );
}

/// A writer guest whose source offers its memory and whose target reads into its own: on plain
/// TCP at protocol 5 (the default) the pages go as `PageData` frames, written from the source's
/// memory when the socket takes them (a page the guest rewrites meanwhile goes out as it is
/// then, does not match the checksum taken at its check, and the dirty log sends it again) and
/// read straight into the target's; the memory verification and the byte-for-byte comparison
/// at the pause prove they arrived intact, and the report has the target's count of pages
/// sent again after a mismatch.
#[test]
fn pages_move_in_place_on_plain_tcp_and_arrive_intact_under_a_writer() {
    let counts = std::sync::Arc::new(common::InPlaceCounts::default());
    let mut src = MemVm::source(64 * MIB, 20_000).with_in_place(counts.clone());
    let (addr, h) = spawn_target(MemVm::target(64 * MIB, 1, 5000).with_in_place(counts.clone()));
    let o = opts(2, true);
    assert!(o.pages_in_place, "in place is the default");
    let (r, _) = migrate(&mut src, addr, &o, &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let report = r.unwrap_or_else(|f| panic!("{}: {:?}", error_chain(&f.error), f.report));
    rr.unwrap();
    assert_moved(&src, &tgt, &report);
    let written = counts
        .frames_written
        .load(std::sync::atomic::Ordering::SeqCst);
    let read = counts.frames_read.load(std::sync::atomic::Ordering::SeqCst);
    assert!(written > 0, "no page frame was written from guest memory");
    // Every frame with data is written from guest memory; a frame of zero pages only goes out
    // as one buffer (nothing to write in place) and is read in place all the same, so the
    // target reads at least as many in place as the source writes.
    assert!(read > 0, "no page frame was read into guest memory");
    assert!(
        read >= written,
        "every frame written in place is read in place: {read} read, {written} written"
    );
    assert!(
        report.rounds >= 2,
        "the writer makes more than one round: {report:?}"
    );
    let mismatched = counts.mismatched.load(std::sync::atomic::Ordering::SeqCst);
    let resent = report
        .pages_resent_after_checksum_mismatch
        .expect("a protocol 5 target counts them");
    assert!(
        u64::from(resent) >= mismatched,
        "the target counts every mismatch read in place: {resent} < {mismatched}"
    );
}

/// The torn page, deterministically: a guest without a workload rewrites one data page right
/// after the source took its checksum and before the frame carrying it was written
/// (`MemVm::tear_after_check`, in the test VM's `GuestPages::check`). The target finds that
/// the page does not match, holds it suspect, and the dirty log sends it again in a later
/// round; the migration completes with the page counted as sent again, and the target's memory
/// (the torn page's new bytes included) equals the source's at the pause. Both ways the target
/// may read a `PageData` frame: straight into guest memory, and into a buffer.
#[test]
fn a_page_torn_between_its_checksum_and_the_write_is_sent_again_and_arrives_intact() {
    for target_in_place in [true, false] {
        let counts = std::sync::Arc::new(common::InPlaceCounts::default());
        let mut src = MemVm::quiet_source(16 * MIB).with_in_place(counts.clone());
        // Page 160 holds data (one page in four does) and lies in region 0.
        let torn = 160 * PAGE_SIZE;
        src.tear_after_check = Some(torn);
        let before = src.memory()[torn as usize..(torn + PAGE_SIZE) as usize].to_vec();
        let tgt = MemVm::target(16 * MIB, 1, 5000);
        let tgt = if target_in_place {
            tgt.with_in_place(counts.clone())
        } else {
            tgt
        };
        let (addr, h) = spawn_target(tgt);
        let (r, _) = migrate(&mut src, addr, &opts(2, true), &CancelToken::new());
        let (tgt, rr) = h.join().unwrap();
        let report = r.unwrap_or_else(|f| panic!("{}: {:?}", error_chain(&f.error), f.report));
        rr.unwrap();
        let seq = std::sync::atomic::Ordering::SeqCst;
        assert_eq!(counts.torn.load(seq), 1, "the guest tore the page once");
        assert_moved(&src, &tgt, &report);
        let at_pause = src.snapshot.as_ref().expect("source paused");
        assert_ne!(
            at_pause[torn as usize..(torn + PAGE_SIZE) as usize],
            before[..],
            "the torn page's new bytes are what arrived"
        );
        assert_eq!(
            report.pages_resent_after_checksum_mismatch,
            Some(1),
            "the torn page, and only it, failed its checksum and came again \
             (target reads in place: {target_in_place})"
        );
        assert_eq!(
            counts.mismatched.load(seq),
            u64::from(target_in_place),
            "read in place, the mismatch is found in guest memory"
        );
    }
}

/// A source that can send in place but offers only protocol 4 (as against a target of the
/// build before page checksums): the pages go as `Pages` frames, copied, never protocol 4's
/// `PageData` frames without page checksums, and the migration completes intact.
#[test]
fn a_source_limited_to_protocol_4_sends_copied_page_frames() {
    let mut o = opts(2, true);
    o.protocol_versions = (1, 4);
    assert!(o.pages_in_place);
    copied_page_frames_only(o);
}

/// With `pages_in_place` off (`--copy-pages`) every page goes in a copied, checksummed `Pages`
/// frame, though both VMs offer their memory and both ends speak protocol 5.
#[test]
fn pages_are_copied_under_their_checksum_when_asked() {
    let o = MigrateOptions {
        pages_in_place: false,
        ..opts(2, true)
    };
    copied_page_frames_only(o);
}

/// Migrates a writer between VMs that offer their memory in place with `o`, and checks that no
/// page frame went in place.
fn copied_page_frames_only(o: MigrateOptions) {
    let counts = std::sync::Arc::new(common::InPlaceCounts::default());
    let mut src = MemVm::source(32 * MIB, 5000).with_in_place(counts.clone());
    let (addr, h) = spawn_target(MemVm::target(32 * MIB, 1, 5000).with_in_place(counts.clone()));
    let (r, _) = migrate(&mut src, addr, &o, &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let report = r.unwrap_or_else(|f| panic!("{}: {:?}", error_chain(&f.error), f.report));
    let rr = rr.unwrap();
    assert_moved(&src, &tgt, &report);
    assert_eq!(
        counts
            .frames_written
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(
        counts.frames_read.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(
        counts
            .frames_placed
            .load(std::sync::atomic::Ordering::SeqCst),
        rr.frames,
        "every Pages frame placed from its buffer"
    );
}

#[test]
fn idle_guest_migrates_skipping_zero_pages_and_verifies_memory() {
    let mut src = MemVm::source(32 * MIB, 1);
    let (addr, h) = spawn_target(MemVm::target(32 * MIB, 1, 5000));
    let (r, progress) = migrate(&mut src, addr, &opts(2, true), &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let report = r.unwrap();
    rr.unwrap();
    assert_moved(&src, &tgt, &report);
    assert!(report.converged);
    let pages = 32 * MIB / PAGE_SIZE;
    assert!(
        report.pages_zero_skipped >= pages * 3 / 4 - 16,
        "zero pages skipped: {}",
        report.pages_zero_skipped
    );
    assert!(
        report.bytes_sent < 32 * MIB / 3,
        "sent {}",
        report.bytes_sent
    );
    assert!(report.rounds >= 2, "round 0 plus stop-and-copy");
    assert_eq!(report.throttle_max_pct, 0.0);
    assert!(report.downtime_ms <= report.total_ms);
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["outcome"], "completed");
    assert!(!progress.is_empty(), "progress reported");
    assert!(
        progress
            .windows(2)
            .all(|w| w[0].bytes_sent <= w[1].bytes_sent)
    );
    assert!(progress.iter().any(|p| p.bandwidth_bytes_per_sec > 0.0));
}

#[test]
fn moderate_dirty_rate_migrates_over_four_streams() {
    // 20,000 pages/s over 256 MiB.
    let mut src = MemVm::source(64 * MIB, 20_000);
    assert!(src.wait_writes(1000, Duration::from_secs(5)));
    let (addr, h) = spawn_target(MemVm::target(64 * MIB, 1, 20_000));
    let (r, _) = migrate(&mut src, addr, &opts(4, true), &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let report = r.unwrap();
    let rr = rr.unwrap();
    assert_moved(&src, &tgt, &report);
    assert!(report.converged);
    assert!(rr.pages_written > 0);
}

#[test]
fn max_rate_guest_converges_through_throttling() {
    let mut src = MemVm::source(64 * MIB, 0);
    assert!(src.wait_writes(100_000, Duration::from_secs(10)));
    let (addr, h) = spawn_target(MemVm::target(64 * MIB, 1, 5000));
    let (r, progress) = migrate(&mut src, addr, &opts(2, true), &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let report = r.unwrap();
    rr.unwrap();
    assert_moved(&src, &tgt, &report);
    assert!(report.converged, "{report:?}");
    assert!(report.throttle_max_pct > 0.0, "{report:?}");
    assert!(progress.iter().any(|p| p.throttle_pct > 0.0));
    assert!(progress.iter().any(|p| p.dirty_bytes_per_sec > 0.0));
}

#[test]
fn a_throttled_guest_runs_free_for_the_lead_before_its_pause() {
    // 64 MiB (16 MiB with data) over a 64 MiB/s cap, the guest writing 20,000 random pages/s
    // (~78 MiB/s, faster than the link): the full copy (~250 ms) leaves ~16 MiB dirty, more
    // than the 120 ms budget carries (~7 MiB; half the writer's pace would still leave ~9), so
    // the guest is throttled; once the remainder fits, the throttle is lifted and the sender
    // waits out the lead (40 ms here, longer than the ~30 ms round that sends the ~2 MiB
    // left) before its sync, so the pause comes with the guest running free, and what it
    // dirtied meanwhile still fits.
    let mut src = MemVm::source(64 * MIB, 20_000);
    assert!(src.wait_writes(2_000, Duration::from_secs(10)));
    let (addr, h) = spawn_target(MemVm::target(64 * MIB, 1, 5000));
    let mut o = opts(2, false);
    o.convergence.max_bandwidth = Some(64 * MIB);
    o.convergence.downtime_budget = Duration::from_millis(120);
    o.convergence.throttle_release_lead = Duration::from_millis(40);
    // throttle whenever a round does not fit, even the full copy (whatever the writer's pace
    // on a loaded machine makes of saturation)
    o.convergence.throttle_from_round = 0;
    let lead = o.convergence.throttle_release_lead;
    let (r, _) = migrate(&mut src, addr, &o, &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let report = r.unwrap();
    rr.unwrap();
    assert_moved(&src, &tgt, &report);
    assert!(report.converged, "{report:?}");
    assert!(report.throttle_max_pct > 0.0, "{report:?}");
    let rounds = report.rounds_detail.clone().expect("rounds");
    let release = rounds
        .iter()
        .position(|r| r.decision == RoundDecision::Release)
        .unwrap_or_else(|| panic!("no release: {rounds:?}"));
    // the round it decided ran unthrottled and lasted at least the lead; the throttle stayed
    // off to the pause
    let after = &rounds[release + 1..];
    assert!(after.iter().all(|r| r.throttle_pct == 0.0), "{rounds:?}");
    assert!(
        after[0].us >= lead.as_micros() as u64,
        "{} us against a {lead:?} lead: {rounds:?}",
        after[0].us
    );
    assert!(rounds[release].throttle_pct > 0.0, "{rounds:?}");
    assert_eq!(
        after.last().map(|r| r.decision),
        Some(RoundDecision::StopAndCopy),
        "{rounds:?}"
    );
    // what the guest dirtied running free still fitted the budget at the cap
    let final_bytes = after.last().unwrap().bytes;
    assert!(final_bytes <= 64 * MIB * 120 / 1000, "{rounds:?}");
}

#[test]
fn single_stream_and_bandwidth_cap_are_honoured() {
    // 16 MiB, a quarter non-zero (4 MiB), capped at 8 MiB/s with a 1 MiB burst: at least
    // 3 MiB must wait for tokens, so the migration cannot take less than 375 ms.
    let mut src = MemVm::source(16 * MIB, 1);
    let (addr, h) = spawn_target(MemVm::target(16 * MIB, 1, 5000));
    let mut o = opts(1, false);
    o.convergence.max_bandwidth = Some(8 * MIB);
    let t = Instant::now();
    let (r, _) = migrate(&mut src, addr, &o, &CancelToken::new());
    let elapsed = t.elapsed();
    let (tgt, rr) = h.join().unwrap();
    let report = r.unwrap();
    rr.unwrap();
    assert_moved(&src, &tgt, &report);
    assert!(elapsed >= Duration::from_millis(375), "{elapsed:?}");
}

#[test]
fn target_killed_mid_round_leaves_the_source_running() {
    let mut src = MemVm::source(32 * MIB, 20_000);
    let listener_target = MemVm::target(32 * MIB, 1, 5000);
    // Route through a proxy so the "death" also breaks the source's connections abruptly.
    let (taddr, h, proxy) = {
        let mut tgt = listener_target;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let taddr = listener.local_addr().unwrap();
        let proxy = Proxy::start(taddr);
        tgt.die_after_pages = Some((500, Box::new(proxy.cutter())));
        let h = thread::spawn(move || {
            let r = receive(
                &listener,
                &mut tgt,
                &ReceiveOptions::default(),
                &CancelToken::new(),
            );
            (tgt, r)
        });
        (taddr, h, proxy)
    };
    let _ = taddr;
    let (r, _) = migrate(&mut src, proxy.addr, &opts(2, false), &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let failure = r.unwrap_err();
    assert!(rr.is_err());
    assert_eq!(failure.report.outcome, Outcome::Failed);
    assert_eq!(src.resumed_count, 0, "never paused, nothing to resume");
    assert_stayed(&src, &tgt, &failure);
}

#[test]
fn connection_dropped_mid_round_leaves_the_source_running() {
    let mut src = MemVm::source(32 * MIB, 20_000);
    let (taddr, h) = spawn_target(MemVm::target(32 * MIB, 1, 5000));
    let proxy = Proxy::start(taddr);
    proxy.cut_after(1, 1 << 20); // 1 MiB into data stream 0
    let (r, _) = migrate(&mut src, proxy.addr, &opts(2, false), &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let failure = r.unwrap_err();
    assert!(rr.is_err());
    assert!(
        matches!(
            *failure.error,
            MigrateError::Connection(_) | MigrateError::Read(_) | MigrateError::Target(_)
        ),
        "{:?}",
        failure.error
    );
    assert_eq!(failure.report.downtime_ms, 0, "never paused");
    assert_stayed(&src, &tgt, &failure);
}

#[test]
fn connection_cut_during_stop_and_copy_resumes_the_source() {
    let mut src = MemVm::source(32 * MIB, 20_000);
    let (taddr, h) = spawn_target(MemVm::target(32 * MIB, 1, 5000));
    let proxy = Proxy::start(taddr);
    src.on_pause = Some(Box::new(proxy.cutter()));
    let (r, _) = migrate(&mut src, proxy.addr, &opts(2, true), &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let failure = r.unwrap_err();
    assert!(rr.is_err());
    assert_eq!(failure.report.outcome, Outcome::Failed, "{}", failure.error);
    assert_eq!(src.resumed_count, 1, "paused once, resumed once");
    assert_stayed(&src, &tgt, &failure);
}

#[test]
fn corrupt_frame_is_caught_and_the_source_keeps_running() {
    let mut src = MemVm::source(32 * MIB, 20_000);
    let (taddr, h) = spawn_target(MemVm::target(32 * MIB, 1, 5000));
    let proxy = Proxy::start(taddr);
    proxy.corrupt(1, 300_000); // inside a page frame on data stream 0
    let (r, _) = migrate(&mut src, proxy.addr, &opts(2, false), &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let failure = r.unwrap_err();
    match rr.unwrap_err() {
        ReceiveError::Stream {
            stream: StreamName::Data(0),
            source: ReadFrameError::Decode(DecodeError::Checksum { .. }),
        } => {}
        other => panic!("expected a checksum error on data stream 0, got {other:?}"),
    }
    assert!(
        matches!(*failure.error, MigrateError::Target(ref m) if m.contains("checksum")),
        "{:?}",
        failure.error
    );
    assert_stayed(&src, &tgt, &failure);
}

/// In place, a byte flipped in a page's data on the way is outside the frame head's checksum
/// but not the page's own: the target holds the page suspect, no later copy comes (the writer
/// writes 20 of the 8192 pages a second, at random: the damaged one is almost never among them
/// before the pause), and the commit fails naming the page; the source runs on.
#[test]
fn a_page_corrupted_in_place_fails_the_commit_on_its_checksum() {
    let counts = std::sync::Arc::new(common::InPlaceCounts::default());
    let mut src = MemVm::source(32 * MIB, 20).with_in_place(counts.clone());
    let (taddr, h) = spawn_target(MemVm::target(32 * MIB, 1, 5000).with_in_place(counts.clone()));
    let proxy = Proxy::start(taddr);
    proxy.corrupt(1, 300_000); // inside the data of the first page frame on data stream 0
    let (r, _) = migrate(&mut src, proxy.addr, &opts(2, false), &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let failure = r.unwrap_err();
    match rr.unwrap_err() {
        ReceiveError::PageChecksum(f) => {
            assert_eq!(f.pages, 1, "{f}");
            assert_eq!(f.stage, ChecksumStage::Commit, "{f}");
        }
        other => panic!("expected a page checksum failure, got {other:?}"),
    }
    assert!(counts.frames_read.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert!(
        matches!(*failure.error, MigrateError::Target(ref m)
            if m.contains("1 page(s) did not match their checksum and were not sent again before the commit")),
        "{:?}",
        failure.error
    );
    assert_stayed(&src, &tgt, &failure);
}

#[test]
fn version_mismatch_is_refused_before_any_page() {
    let mut src = MemVm::source(8 * MIB, 1000);
    let (addr, h) = spawn_target(MemVm::target(8 * MIB, 1, 5000));
    let mut o = opts(2, false);
    o.protocol_versions = (7, 9);
    let (r, _) = migrate(&mut src, addr, &o, &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let failure = r.unwrap_err();
    assert_eq!(failure.report.outcome, Outcome::Refused);
    assert_eq!(failure.report.rounds, 0);
    assert_eq!(
        failure.error.to_string(),
        "Target refused the migration: Protocol version mismatch: source speaks 7..=9, target 1..=5"
    );
    assert!(matches!(rr, Err(ReceiveError::Refused(_))));
    assert_stayed(&src, &tgt, &failure);
}

#[test]
fn config_mismatch_is_refused_with_the_reason() {
    let mut src = MemVm::source(8 * MIB, 1000);
    let (addr, h) = spawn_target(MemVm::target(8 * MIB, 2, 5000));
    let (r, _) = migrate(&mut src, addr, &opts(2, false), &CancelToken::new());
    let (tgt, _) = h.join().unwrap();
    let failure = r.unwrap_err();
    assert_eq!(failure.report.outcome, Outcome::Refused);
    assert_eq!(
        failure.error.to_string(),
        "Target refused the migration: vCPU count differs: source 1, target 2"
    );
    assert_stayed(&src, &tgt, &failure);

    let mut src = MemVm::source(8 * MIB, 1000);
    let (addr, h) = spawn_target(MemVm::target(16 * MIB, 1, 5000));
    let (r, _) = migrate(&mut src, addr, &opts(1, false), &CancelToken::new());
    let (tgt, _) = h.join().unwrap();
    let failure = r.unwrap_err();
    assert!(
        failure
            .error
            .to_string()
            .contains("Memory layout differs at region 0"),
        "{}",
        failure.error
    );
    assert_stayed(&src, &tgt, &failure);
}

#[test]
fn cancel_during_pre_copy_keeps_the_source_running() {
    let mut src = MemVm::source(32 * MIB, 20_000);
    let cancel = CancelToken::new();
    let mut tgt = MemVm::target(32 * MIB, 1, 5000);
    let c = cancel.clone();
    tgt.on_pages = Some((200, Box::new(move || c.cancel())));
    let (addr, h) = spawn_target(tgt);
    let (r, _) = migrate(&mut src, addr, &opts(2, false), &cancel);
    let (tgt, rr) = h.join().unwrap();
    let failure = r.unwrap_err();
    assert_eq!(failure.report.outcome, Outcome::Cancelled);
    assert!(
        matches!(rr, Err(ReceiveError::Aborted(ref m)) if m == "Migration cancelled"),
        "{rr:?}"
    );
    assert_eq!(src.resumed_count, 0);
    assert_stayed(&src, &tgt, &failure);
}

#[test]
fn cancel_during_stop_and_copy_resumes_the_source() {
    let mut src = MemVm::source(16 * MIB, 20_000);
    let cancel = CancelToken::new();
    let c = cancel.clone();
    src.on_pause = Some(Box::new(move || c.cancel()));
    let (addr, h) = spawn_target(MemVm::target(16 * MIB, 1, 5000));
    let (r, _) = migrate(&mut src, addr, &opts(2, true), &cancel);
    let (tgt, rr) = h.join().unwrap();
    let failure = r.unwrap_err();
    assert_eq!(failure.report.outcome, Outcome::Cancelled);
    assert!(matches!(rr, Err(ReceiveError::Aborted(_))), "{rr:?}");
    assert_eq!(src.resumed_count, 1);
    assert_stayed(&src, &tgt, &failure);
}

fn unconvergeable(on_timeout: OnTimeout) -> MigrateOptions {
    let mut o = opts(2, true);
    // A zero budget can never be met (the restore estimate alone exceeds it).
    o.convergence.downtime_budget = Duration::ZERO;
    o.convergence.timeout = Duration::from_millis(1500);
    o.convergence.on_timeout = on_timeout;
    o
}

#[test]
fn timeout_with_abort_keeps_the_source_running_unthrottled() {
    let mut src = MemVm::source(16 * MIB, 0);
    let (addr, h) = spawn_target(MemVm::target(16 * MIB, 1, 5000));
    let (r, _) = migrate(
        &mut src,
        addr,
        &unconvergeable(OnTimeout::Abort),
        &CancelToken::new(),
    );
    let (tgt, rr) = h.join().unwrap();
    let failure = r.unwrap_err();
    assert_eq!(failure.report.outcome, Outcome::TimedOut);
    assert!(!failure.report.converged);
    assert!(
        failure.report.throttle_max_pct > 0.0,
        "throttled before giving up"
    );
    assert!(matches!(rr, Err(ReceiveError::Aborted(_))), "{rr:?}");
    assert_stayed(&src, &tgt, &failure);
}

#[test]
fn timeout_with_force_switches_over_anyway() {
    let mut src = MemVm::source(16 * MIB, 0);
    let (addr, h) = spawn_target(MemVm::target(16 * MIB, 1, 5000));
    let (r, _) = migrate(
        &mut src,
        addr,
        &unconvergeable(OnTimeout::Force),
        &CancelToken::new(),
    );
    let (tgt, rr) = h.join().unwrap();
    let report = r.unwrap();
    rr.unwrap();
    assert!(!report.converged, "forced, not converged");
    assert_moved(&src, &tgt, &report);
}

#[test]
fn verify_mismatch_aborts_and_the_source_resumes() {
    let mut src = MemVm::source(16 * MIB, 1000);
    let mut tgt = MemVm::target(16 * MIB, 1, 5000);
    tgt.corrupt_after_pages = Some(100);
    let (addr, h) = spawn_target(tgt);
    let (r, _) = migrate(&mut src, addr, &opts(2, true), &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let failure = r.unwrap_err();
    assert!(
        matches!(rr, Err(ReceiveError::VerifyMismatch { .. })),
        "{rr:?}"
    );
    assert!(
        failure
            .error
            .to_string()
            .contains("Memory verification failed"),
        "{}",
        failure.error
    );
    assert_eq!(src.resumed_count, 1);
    assert_stayed(&src, &tgt, &failure);
}

#[test]
fn storage_is_handed_over_before_the_target_gets_the_state() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
    let mut src = MemVm::source(8 * MIB, 1000);
    let released = Arc::new(AtomicBool::new(false));
    let r2 = released.clone();
    src.on_release = Some(Box::new(move || r2.store(true, Ordering::SeqCst)));
    // 0: never restored, 1: restored before the release, 2: after it.
    let seen = Arc::new(AtomicU8::new(0));
    let s2 = seen.clone();
    let mut tgt = MemVm::target(8 * MIB, 1, 5000);
    tgt.on_restore = Some(Box::new(move || {
        let v = if released.load(Ordering::SeqCst) {
            2
        } else {
            1
        };
        s2.store(v, Ordering::SeqCst);
    }));
    let (addr, h) = spawn_target(tgt);
    let (r, _) = migrate(&mut src, addr, &opts(2, false), &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let report = r.unwrap();
    rr.unwrap();
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "state restored after the release"
    );
    assert_moved(&src, &tgt, &report);
}

#[test]
fn failed_storage_release_fails_the_migration_and_the_source_takes_it_back() {
    let mut src = MemVm::source(8 * MIB, 1000);
    src.fail_release = Some("lease coordinator unreachable");
    let (addr, h) = spawn_target(MemVm::target(8 * MIB, 1, 5000));
    let (r, _) = migrate(&mut src, addr, &opts(2, false), &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let failure = r.unwrap_err();
    assert!(
        matches!(*failure.error, MigrateError::Source("release_storage", _)),
        "{:?}",
        failure.error
    );
    assert!(
        error_chain(&failure.error).contains("lease coordinator unreachable"),
        "{}",
        error_chain(&failure.error)
    );
    assert!(matches!(rr, Err(ReceiveError::Aborted(_))), "{rr:?}");
    assert_eq!(tgt.restored_seq(), None, "the state never went out");
    assert_eq!(failure.report.outcome, Outcome::Failed);
    assert_eq!(
        src.calls,
        ["pause", "save_state", "release", "acquire", "resume"]
    );
    assert_stayed(&src, &tgt, &failure);
}

#[test]
fn storage_that_cannot_be_taken_back_leaves_the_source_paused() {
    let mut src = MemVm::source(16 * MIB, 20_000);
    src.fail_acquire = Some("lease held elsewhere");
    let cancel = CancelToken::new();
    let c = cancel.clone();
    src.on_pause = Some(Box::new(move || c.cancel()));
    let (addr, h) = spawn_target(MemVm::target(16 * MIB, 1, 5000));
    let (r, _) = migrate(&mut src, addr, &opts(2, false), &cancel);
    let (tgt, rr) = h.join().unwrap();
    let failure = r.unwrap_err();
    assert!(matches!(rr, Err(ReceiveError::Aborted(_))), "{rr:?}");
    assert_eq!(tgt.state(), VmState::Discarded);
    assert!(
        matches!(*failure.error, MigrateError::Source("acquire_storage", _)),
        "{:?}",
        failure.error
    );
    assert!(
        error_chain(&failure.error).contains("lease held elsewhere"),
        "{}",
        error_chain(&failure.error)
    );
    assert_eq!(
        src.calls,
        ["pause", "acquire"],
        "no resume without the storage"
    );
    assert_eq!(src.state(), VmState::Paused);
    assert_eq!(src.resumed_count, 0);
}

#[test]
fn target_drops_a_stream_of_garbage_and_keeps_waiting_for_the_source() {
    // A connection that does not open with a hello (garbage, a port scan) is dropped; it must
    // not end the receive, which then takes the real source's migration.
    use std::io::Write;
    let (addr, h) = spawn_target(MemVm::target(8 * MIB, 1, 5000));
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut x = 0x1234_5678_9abc_def0u64;
    let garbage: Vec<u8> = (0..10_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let _ = s.write_all(&garbage);
    drop(s);
    let mut src = MemVm::source(8 * MIB, 1000);
    let (r, _) = migrate(&mut src, addr, &opts(2, true), &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    let report = r.unwrap();
    assert_eq!(rr.unwrap().rejected_connections, 1);
    assert_moved(&src, &tgt, &report);
}

#[test]
fn connection_lost_after_commit_leaves_the_source_paused_in_doubt() {
    // The target gets commit, then the link dies before "running" reaches the source. The
    // target runs; the source must not resume on its own (that would make two copies).
    let mut src = MemVm::source(8 * MIB, 1000);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = Proxy::start(listener.local_addr().unwrap());
    let mut tgt = MemVm::target(8 * MIB, 1, 5000);
    tgt.on_restore = Some(Box::new(proxy.cutter()));
    let h = thread::spawn(move || {
        let r = receive(
            &listener,
            &mut tgt,
            &ReceiveOptions::default(),
            &CancelToken::new(),
        );
        (tgt, r)
    });
    let mut o = opts(2, true);
    o.ack_timeout = Duration::from_secs(5);
    let (r, _) = migrate(&mut src, proxy.addr, &o, &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    rr.unwrap();
    let failure = r.unwrap_err();
    assert_eq!(failure.report.outcome, Outcome::InDoubt);
    assert!(
        matches!(*failure.error, MigrateError::InDoubt(_)),
        "{:?}",
        failure.error
    );
    assert_eq!(src.state(), VmState::Paused, "source stays paused");
    assert_eq!(src.resumed_count, 0);
    assert_eq!(
        src.calls,
        ["pause", "save_state", "release"],
        "in doubt the storage is not taken back"
    );
    assert!(tgt.is_running());
    assert!(tgt.wait_writes(20, Duration::from_secs(5)));
    assert_eq!(
        tgt.snapshot.as_ref(),
        src.snapshot.as_ref(),
        "memory moved intact"
    );
}

#[test]
fn cancel_on_the_target_fails_the_migration_and_the_source_keeps_running() {
    let mut src = MemVm::source(32 * MIB, 20_000);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let target_cancel = CancelToken::new();
    let mut tgt = MemVm::target(32 * MIB, 1, 5000);
    let c = target_cancel.clone();
    tgt.on_pages = Some((100, Box::new(move || c.cancel())));
    let h = thread::spawn(move || {
        let r = receive(
            &listener,
            &mut tgt,
            &ReceiveOptions::default(),
            &target_cancel,
        );
        (tgt, r)
    });
    let (r, _) = migrate(&mut src, addr, &opts(2, false), &CancelToken::new());
    let (tgt, rr) = h.join().unwrap();
    assert!(matches!(rr, Err(ReceiveError::Cancelled)), "{rr:?}");
    let failure = r.unwrap_err();
    assert!(
        matches!(*failure.error, MigrateError::Target(ref m) if m.contains("cancelled on the target")),
        "{:?}",
        failure.error
    );
    assert_stayed(&src, &tgt, &failure);
}

#[test]
fn cancel_during_the_handshake_returns_at_once() {
    // A "target" that accepts and never answers: only cancel can end the wait early.
    let mute = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = mute.local_addr().unwrap();
    let holder = thread::spawn(move || mute.accept().map(|(s, _)| s));
    let mut src = MemVm::source(8 * MIB, 1000);
    let cancel = CancelToken::new();
    let c = cancel.clone();
    let canceller = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        c.cancel();
    });
    let mut o = opts(2, false);
    o.connect_timeout = Duration::from_secs(60);
    let t = Instant::now();
    let (r, _) = migrate(&mut src, addr, &o, &cancel);
    let failure = r.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "cancel ended the wait"
    );
    assert_eq!(failure.report.outcome, Outcome::Cancelled);
    assert_eq!(failure.report.rounds, 0);
    assert!(src.is_running() && src.wait_writes(20, Duration::from_secs(5)));
    canceller.join().unwrap();
    drop(holder.join().unwrap());
}

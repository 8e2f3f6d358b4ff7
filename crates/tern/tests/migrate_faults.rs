//! Fault injection on live migrations of real KVM guests: the target killed mid-round, the
//! connection cut during stop-and-copy, a corrupt frame (and a corrupt page sent in place,
//! caught by its own checksum), a protocol version mismatch, a VM
//! configuration mismatch, a cancel. Each time the source guest must keep running (its
//! heartbeats go on), the target must exit non-zero, and no second copy may run.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{MigrationPair, tern_cmd};

/// A slow migration: 64 MiB of non-zero pages at 16 MiB/s take about 4 s in round 0.
const BUSY: &str = "tern.hb_ms=50 tern.dirty_mib=64 tern.dirty_rate=20000";
const SLOW: &[&str] = &["--max-bandwidth-mibps", "16"];

/// A TCP proxy to `target`: `corrupt_after` flips one byte of a connection's source→target
/// bytes once that many have passed; `cut` closes every connection.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
}

fn proxy(target: u16, corrupt_after: Option<usize>) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let cut = Arc::new(AtomicBool::new(false));
    let cut2 = cut.clone();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(a) = c else { return };
            let Ok(b) = TcpStream::connect(("127.0.0.1", target)) else {
                return;
            };
            let pump = |mut from: TcpStream,
                        mut to: TcpStream,
                        corrupt: Option<usize>,
                        cut: Arc<AtomicBool>| {
                thread::spawn(move || {
                    from.set_read_timeout(Some(Duration::from_millis(5)))
                        .unwrap();
                    let mut buf = vec![0u8; 64 << 10];
                    let mut passed = 0usize;
                    let mut corrupted = false;
                    loop {
                        if cut.load(Ordering::Relaxed) {
                            let _ = from.shutdown(Shutdown::Both);
                            let _ = to.shutdown(Shutdown::Both);
                            return;
                        }
                        let n = match from.read(&mut buf) {
                            Ok(0) => {
                                let _ = to.shutdown(Shutdown::Write);
                                return;
                            }
                            Ok(n) => n,
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) =>
                            {
                                continue;
                            }
                            Err(_) => return,
                        };
                        if let Some(at) = corrupt
                            && !corrupted
                            && passed + n > at
                        {
                            let i = at.saturating_sub(passed).min(n - 1);
                            buf[i] ^= 0x5a;
                            corrupted = true;
                        }
                        passed += n;
                        if to.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            };
            pump(
                a.try_clone().unwrap(),
                b.try_clone().unwrap(),
                corrupt_after,
                cut2.clone(),
            );
            pump(b, a, None, cut2.clone());
        }
    });
    Proxy { port, cut }
}

#[test]
fn killing_the_target_mid_round_leaves_the_source_running() {
    let mut p = MigrationPair::start(128, 1, BUSY, &[]);
    let m = p.spawn_migrate(p.port, SLOW);
    thread::sleep(Duration::from_millis(1200));
    p.dst.child.kill().expect("kill the target");
    let (rc, report, err) = common::migrate_output(m);
    assert_eq!(rc, 1, "migrate must fail: {err} {report}");
    assert_eq!(report["outcome"], "failed", "{report}");
    p.assert_source_kept();
}

#[test]
fn cutting_the_connection_during_stop_and_copy_resumes_the_source() {
    // --verify-memory makes the pause long enough (the digest of all memory) to cut inside it.
    let mut p = MigrationPair::start(
        256,
        1,
        "tern.hb_ms=50 tern.dirty_mib=32 tern.dirty_rate=2000",
        &[],
    );
    let px = proxy(p.port, None);
    let m = p.spawn_migrate(px.port, &["--verify-memory"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, out, _) = tern_cmd(&["vm", "status", "--api-sock", p.src_sock.to_str().unwrap()]);
        if out.contains("\"paused\"") {
            px.cut.store(true, Ordering::Relaxed);
            break;
        }
        assert!(Instant::now() < deadline, "the source never paused");
        thread::sleep(Duration::from_millis(1));
    }
    let (rc, report, err) = common::migrate_output(m);
    assert_eq!(rc, 1, "migrate must fail: {err} {report}");
    assert_eq!(report["outcome"], "failed", "{report}");
    p.assert_source_kept();
}

/// With `--copy-pages` every byte of a page frame is under its checksum (`Pages` frames,
/// copied), at the newest protocol as at the older ones.
#[test]
fn a_corrupt_frame_aborts_and_the_source_keeps_running() {
    let mut p = MigrationPair::start(128, 1, BUSY, &[]);
    let px = proxy(p.port, Some(3 << 20));
    let (rc, report, err) = p.migrate_to(px.port, &["--copy-pages"]);
    assert_eq!(rc, 1, "migrate must fail: {err} {report}");
    assert_eq!(report["outcome"], "failed", "{report}");
    assert!(
        err.contains("checksum") || err.contains("crc") || err.contains("corrupt"),
        "the failure names the damaged frame: {err}"
    );
    p.assert_source_kept();
}

/// By default (protocol 5, plain TCP) the pages go from and into guest memory in place
/// (`PageData` frames): their data is outside the frame head's checksum but each data page
/// carries its own (docs/migration.md). A byte flipped in a page's data on the way makes the
/// target hold the page suspect; the guest's 64 MiB hold data from the start and are written
/// at 1 page/s, so no later copy replaces it, and the commit fails on that page's checksum,
/// without --verify-memory. 3 MiB into each data stream is inside the sixth frame's data (a
/// full frame is 1,558 bytes of head and 512 KiB of data), so the flip hits page data, not a
/// head; the source runs on.
#[test]
fn a_corrupt_page_sent_in_place_fails_on_its_page_checksum() {
    let still = "tern.hb_ms=50 tern.dirty_mib=64 tern.dirty_rate=1 tern.dirty_fill=data";
    let mut p = MigrationPair::start(128, 1, still, &[]);
    let px = proxy(p.port, Some(3 << 20));
    let (rc, report, err) = p.migrate_to(px.port, &[]);
    assert_eq!(rc, 1, "migrate must fail: {err} {report}");
    assert_eq!(report["outcome"], "failed", "{report}");
    assert!(
        err.contains("page(s) did not match their checksum and were not sent again before the commit, the first at guest address 0x"),
        "the failure names the pages that failed their own checksum: {err}"
    );
    p.assert_source_kept();
}

#[test]
fn a_protocol_version_mismatch_is_refused_with_a_reason() {
    let mut p = MigrationPair::start(64, 1, "tern.hb_ms=50", &[]);
    let (rc, report, err) = p.migrate(&["--x-protocol-version", "999"]);
    assert_eq!(rc, 1, "{err}");
    assert_eq!(report["outcome"], "refused", "{report}");
    assert!(
        err.contains("version"),
        "the reason names the versions: {err}"
    );
    p.assert_source_kept();
}

#[test]
fn a_config_mismatch_is_refused_before_any_page() {
    let mut p = MigrationPair::start(64, 1, "tern.hb_ms=50", &["--vcpus", "2"]);
    let (rc, report, err) = p.migrate(&[]);
    assert_eq!(rc, 1, "{err}");
    assert_eq!(report["outcome"], "refused", "{report}");
    assert!(err.contains("vCPU"), "the reason names the vCPUs: {err}");
    assert!(
        report["bytes_sent"].as_u64().unwrap() < 64 << 10,
        "no page may be sent before the check: {report}"
    );
    p.assert_source_kept();
}

#[test]
fn cancel_stops_the_migration_and_the_source_keeps_running() {
    let mut p = MigrationPair::start(128, 1, BUSY, &[]);
    let m = p.spawn_migrate(p.port, SLOW);
    thread::sleep(Duration::from_millis(1200));
    let (rc, _, err) = tern_cmd(&[
        "vm",
        "migrate",
        "--api-sock",
        p.src_sock.to_str().unwrap(),
        "--cancel",
    ]);
    assert_eq!(rc, 0, "cancel: {err}");
    let (rc, report, err) = common::migrate_output(m);
    assert_eq!(rc, 1, "{err}");
    assert_eq!(report["outcome"], "cancelled", "{report}");
    p.assert_source_kept();
}

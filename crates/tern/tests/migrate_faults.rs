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
use tern_migration::wire::{FrameKind, HEADER_LEN, PAGE_DATA_ENTRY, parse_header};

/// A slow migration: 64 MiB of non-zero pages at 16 MiB/s take about 4 s in round 0.
const BUSY: &str = "tern.hb_ms=50 tern.dirty_mib=64 tern.dirty_rate=20000";
const SLOW: &[&str] = &["--max-bandwidth-mibps", "16"];

/// A TCP proxy to `target`: `corrupt` flips one byte of each connection's source→target bytes;
/// `cut` closes every connection.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
}

/// Which byte of each connection's source→target bytes the proxy flips.
#[derive(Clone, Copy)]
enum Corrupt {
    /// The byte at this offset, wherever it lies.
    At(usize),
    /// The first byte at or after this offset that is page data of a `PageData` frame (the
    /// 4096 bytes of a page sent in place, outside the frame head's checksum): never a frame
    /// head, whatever the frames around the offset look like.
    PageDataFrom(usize),
}

/// Follows the frames of one source→target connection to tell where page data lies: a frame
/// is a 16-byte header (`len` at bytes 8..12), then `len` payload bytes; a `PageData` payload
/// is round (4), count (2), count 12-byte entries, then the data pages.
#[derive(Default)]
struct FrameCursor {
    /// Header bytes and, in a `PageData` frame, the round and count: what tells its layout.
    head: Vec<u8>,
    /// Bytes of the current frame seen so far.
    at: usize,
    /// The whole frame's length, once its header is in.
    len: Option<usize>,
    /// Whether the current frame is a `PageData` frame.
    page_data: bool,
    /// Where its page data starts in the frame, once its count is in.
    data_from: Option<usize>,
    /// Not a frame stream after all: nothing is page data.
    lost: bool,
}

impl FrameCursor {
    /// The ranges of `bytes`, the connection's next bytes, that are page data.
    fn page_data(&mut self, bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() && !self.lost {
            let head_want = match (self.len, self.page_data, self.data_from) {
                (None, ..) => HEADER_LEN,
                (Some(_), true, None) => HEADER_LEN + 6,
                _ => 0,
            };
            if head_want > 0 {
                let take = (head_want - self.head.len()).min(bytes.len() - i);
                self.head.extend_from_slice(&bytes[i..i + take]);
                i += take;
                self.at += take;
                if self.head.len() == HEADER_LEN && self.len.is_none() {
                    let h: [u8; HEADER_LEN] = self.head[..].try_into().unwrap();
                    let Ok(header) = parse_header(&h) else {
                        self.lost = true;
                        break;
                    };
                    self.len = Some(HEADER_LEN + header.len);
                    // A `PageData` frame holds round, count and an entry at least (the
                    // target refuses a shorter one).
                    self.page_data =
                        header.kind == FrameKind::PageData && header.len >= 6 + PAGE_DATA_ENTRY;
                } else if self.head.len() == HEADER_LEN + 6 {
                    let count = u16::from_le_bytes([self.head[20], self.head[21]]);
                    self.data_from = Some(HEADER_LEN + 6 + PAGE_DATA_ENTRY * usize::from(count));
                }
            } else {
                let len = self.len.unwrap();
                let take = (len - self.at).min(bytes.len() - i);
                if let Some(from) = self.data_from {
                    let (start, end) = (self.at.max(from), self.at + take);
                    if start < end {
                        out.push(i + (start - self.at)..i + (end - self.at));
                    }
                }
                i += take;
                self.at += take;
            }
            if self.len == Some(self.at) {
                *self = FrameCursor::default();
            }
        }
        out
    }
}

fn proxy(target: u16, corrupt: Option<Corrupt>) -> Proxy {
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
                        corrupt: Option<Corrupt>,
                        cut: Arc<AtomicBool>| {
                thread::spawn(move || {
                    from.set_read_timeout(Some(Duration::from_millis(5)))
                        .unwrap();
                    let mut buf = vec![0u8; 64 << 10];
                    let mut passed = 0usize;
                    let mut corrupted = false;
                    let mut frames = FrameCursor::default();
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
                        let flip = match corrupt {
                            _ if corrupted => None,
                            None => None,
                            Some(Corrupt::At(at)) => {
                                (passed + n > at).then(|| at.saturating_sub(passed).min(n - 1))
                            }
                            Some(Corrupt::PageDataFrom(from)) => frames
                                .page_data(&buf[..n])
                                .into_iter()
                                .map(|r| r.start.max(from.saturating_sub(passed))..r.end)
                                .find(|r| !r.is_empty())
                                .map(|r| r.start),
                        };
                        if let Some(i) = flip {
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
                corrupt,
                cut2.clone(),
            );
            pump(b, a, None, cut2.clone());
        }
    });
    Proxy { port, cut }
}

/// The proxy's frame cursor (no VM): over a stream of frames of every shape cut into uneven
/// chunks, what it calls page data is exactly the data pages of the `PageData` frames.
#[test]
fn the_proxy_finds_exactly_the_page_data_of_page_data_frames() {
    use tern_migration::wire::{Frame, PageBatch};
    let mut stream = Vec::new();
    let mut want = Vec::new();
    let mut page_data = |stream: &mut Vec<u8>, data: &[u64], zero: &[u64]| {
        let mut b = PageBatch::new(0);
        for &gpa in data {
            b.push_data(gpa, &[gpa as u8 | 1; 4096]);
        }
        for &gpa in zero {
            b.push_zero(gpa);
        }
        let start = stream.len() + HEADER_LEN + 6 + PAGE_DATA_ENTRY * (data.len() + zero.len());
        stream.extend_from_slice(&b.to_page_data_bytes());
        want.push(start..stream.len());
    };
    stream.extend_from_slice(
        &Frame::Join {
            session: 7,
            stream: 0,
        }
        .encode(),
    );
    page_data(&mut stream, &[0x1000, 0x2000, 0x5000], &[0x3000]);
    let mut copied = PageBatch::new(0);
    copied.push_data(0x9000, &[9; 4096]);
    stream.extend_from_slice(&Frame::Pages(copied).encode());
    page_data(&mut stream, &[], &[0x4000]);
    page_data(&mut stream, &[0x7000], &[]);
    stream.extend_from_slice(&Frame::RoundEnd { round: 0 }.encode());
    page_data(
        &mut stream,
        &(0..128).map(|p| p << 12).collect::<Vec<_>>(),
        &[],
    );
    stream.extend_from_slice(
        &Frame::DataEnd {
            frames: 5,
            pages: 135,
        }
        .encode(),
    );
    want.retain(|r| !r.is_empty());
    for chunk in [1, 5, 16, 22, 4095, 4096, 65536] {
        let mut cursor = FrameCursor::default();
        let mut got: Vec<std::ops::Range<usize>> = Vec::new();
        // Uneven chunks: `chunk` bytes, then one more, and so on.
        let (mut at, mut k) = (0, 0);
        while at < stream.len() {
            let n = (chunk + k % 2).min(stream.len() - at);
            k += 1;
            for r in cursor.page_data(&stream[at..at + n]) {
                let r = at + r.start..at + r.end;
                match got.last_mut() {
                    // A frame's data cut by the chunks: one range again.
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => got.push(r),
                }
            }
            at += n;
        }
        assert!(!cursor.lost, "chunks of {chunk}");
        assert_eq!(got, want, "chunks of {chunk}");
    }
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
    let px = proxy(p.port, Some(Corrupt::At(3 << 20)));
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
/// without --verify-memory; the source runs on. The proxy follows each stream's frames and
/// flips the first byte of page data at or after 3 MiB into it (about the sixth frame: a full
/// frame is 1,558 bytes of head and 512 KiB of data): a byte at a fixed offset could land in
/// a frame head (~0.3 % of the bytes), which fails the head's checksum instead.
#[test]
fn a_corrupt_page_sent_in_place_fails_on_its_page_checksum() {
    let still = "tern.hb_ms=50 tern.dirty_mib=64 tern.dirty_rate=1 tern.dirty_fill=data";
    let mut p = MigrationPair::start(128, 1, still, &[]);
    let px = proxy(p.port, Some(Corrupt::PageDataFrom(3 << 20)));
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

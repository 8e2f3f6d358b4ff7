//! Post-copy's I/O: the source serving owed pages after the switch (demand on the control
//! stream first, background push on a stream of its own), and the target running the guest
//! with pages missing (a fault thread asking for them, a push reader and the demand stream
//! placing them). Every decision is [`crate::machine::postcopy`]'s; the send and receive
//! shells call in here at the switch.
//!
//! ```text
//!  source (paused for good)                               target (guest running)
//!  ctl  PostCopy{owed runs}, Commit ───────────────────▶  verify present pages, drop owed ones,
//!                                                          userfaultfd armed, restore, resume
//!  ctl  ◀── Running
//!  push Join{session, streams} ────────────────────────▶  (a new connection, same checks)
//!  push Pages{owed, in order} … ───────────────────────▶  place (UFFDIO_COPY), check digest
//!  ctl  ◀── PageRequest{window}        (a vCPU faulted on an owed page)
//!  ctl  Pages{owed pages of the window} ───────────────▶  place, the vCPU goes on
//!  ctl  ◀── PostCopyDone{pages, faults, longest wait}   every owed page placed
//!  outcome completed; any failure after the switch: failed_post_copy (target stops the guest,
//!  the source never resumes)
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver as ChanRx, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::{MemoryLayout, PAGE_SIZE};
use crate::machine::pages::PageSet;
use crate::machine::policy::TokenBucket;
use crate::machine::postcopy::{
    Arrival, FaultAnswer, PUSH_BATCH_PAGES, SourcePages, TargetPages, owed_ranges,
};
use crate::report::PostCopyFigures;
use crate::tcp::transport::{Conn, ConnWriter};
use crate::vm::{MigrationSource, MissingMemory, VmError};
use crate::wire::{
    Frame, MAX_PAGES_PER_FRAME, MemoryDigest, POST_COPY_ROUND, PageBatch, ReadFrameError,
    read_frame,
};

const PAGE: usize = PAGE_SIZE as usize;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why the post-copy phase failed (on either side): the VM is lost.
#[derive(Debug, thiserror::Error)]
pub enum PostCopyError {
    /// A stream broke, or nothing came for too long.
    #[error("post-copy link lost: {0}")]
    Link(String),
    /// The other side gave up (its reason).
    #[error("the other side failed during post-copy: {0}")]
    Peer(String),
    /// A frame the post-copy protocol does not allow.
    #[error("post-copy protocol error: {0}")]
    Protocol(String),
    /// An owed page did not match the source's digest.
    #[error("post-copy memory verification failed: page {0} differs")]
    Verify(u64),
    /// The VM side failed.
    #[error("post-copy VM error: {0}")]
    Vm(String),
}

// ───────────────────────────── source ─────────────────────────────

/// Reads the owed pages `pages` (indexes) into page frames of at most 128 pages.
fn page_frames<S: MigrationSource + ?Sized>(
    source: &mut S,
    layout: &MemoryLayout,
    pages: &[u64],
) -> Result<Vec<Vec<u8>>, VmError> {
    let mut frames = Vec::new();
    let mut batch = PageBatch::new(POST_COPY_ROUND);
    let mut buf = vec![0u8; PAGE];
    for &p in pages {
        let gpa = layout.page_addr(p).ok_or("owed page outside the layout")?;
        source.read_pages(gpa, &mut buf)?;
        if buf.iter().all(|&b| b == 0) {
            batch.push_zero(gpa);
        } else {
            batch.push_data(gpa, &buf);
        }
        if batch.len() >= MAX_PAGES_PER_FRAME {
            frames.push(
                std::mem::replace(&mut batch, PageBatch::new(POST_COPY_ROUND)).into_frame_bytes(),
            );
        }
    }
    if !batch.is_empty() {
        frames.push(batch.into_frame_bytes());
    }
    Ok(frames)
}

/// What the source needs to serve the post-copy phase.
pub(crate) struct SourceLink<'a> {
    /// The control stream's writer: the demand stream from the switch on.
    pub control: &'a mut ConnWriter,
    /// Frames from the target on the control stream.
    pub control_rx: &'a ChanRx<Result<Frame, ReadFrameError>>,
    /// The push stream, connected and joined.
    pub push: Conn,
    /// Background push cap, bytes/s (`--max-bandwidth`); demand is never held back.
    pub max_bandwidth: Option<u64>,
    /// How long the target may stay silent once everything was sent.
    pub answer_timeout: Duration,
    /// Bytes written, for the report.
    pub bytes_sent: &'a mut u64,
}

/// Serves the owed pages until the target reports every one placed: requests first (on the
/// control stream, at once), the rest pushed in order on the push stream in the background.
/// The source VM stays paused throughout and is never resumed from here.
pub(crate) fn serve_source<S: MigrationSource + ?Sized>(
    source: &mut S,
    layout: &MemoryLayout,
    owed: PageSet,
    link: SourceLink<'_>,
) -> Result<PostCopyFigures, (PostCopyError, PostCopyFigures)> {
    let start = Instant::now();
    let mut pages = SourcePages::new(owed);
    let figures = |p: &SourcePages, start: Instant| {
        let (demanded, pushed, faults, max_us) = p.figures();
        PostCopyFigures {
            pages_owed: p.owed(),
            pages_demanded: demanded,
            pages_pushed: pushed,
            demand_faults: faults,
            post_copy_ms: start.elapsed().as_millis() as u64,
            max_fault_latency_us: max_us,
        }
    };
    // The push writer: a small queue, so demand never waits behind much of it here.
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(2);
    let error: Arc<Mutex<Option<std::io::Error>>> = Arc::new(Mutex::new(None));
    let err2 = error.clone();
    let mut push = link.push;
    let writer = thread::Builder::new()
        .name("migrate-pc-push".into())
        .spawn(move || {
            crate::thread_start::run();
            for bytes in rx {
                if let Err(e) = push.write_all(&bytes) {
                    *lock(&err2) = Some(e);
                    return;
                }
            }
            let _ = push.flush();
        })
        .map_err(|e| (PostCopyError::Link(e.to_string()), figures(&pages, start)))?;
    let result = serve_loop(
        source,
        layout,
        &mut pages,
        link.control,
        link.control_rx,
        &tx,
        &error,
        link.max_bandwidth,
        link.answer_timeout,
        link.bytes_sent,
        start,
    );
    drop(tx);
    let _ = writer.join();
    match result {
        Ok(()) => Ok(figures(&pages, start)),
        Err(e) => Err((e, figures(&pages, start))),
    }
}

#[allow(clippy::too_many_arguments)]
fn serve_loop<S: MigrationSource + ?Sized>(
    source: &mut S,
    layout: &MemoryLayout,
    pages: &mut SourcePages,
    control: &mut ConnWriter,
    control_rx: &ChanRx<Result<Frame, ReadFrameError>>,
    push_tx: &SyncSender<Vec<u8>>,
    push_error: &Mutex<Option<std::io::Error>>,
    max_bandwidth: Option<u64>,
    answer_timeout: Duration,
    bytes_sent: &mut u64,
    start: Instant,
) -> Result<(), PostCopyError> {
    let vm_error = |e: VmError| PostCopyError::Vm(format!("reading an owed page: {e}"));
    let mut bucket =
        max_bandwidth.map(|r| TokenBucket::new(r, (r / 20).max(1 << 20), Duration::ZERO));
    let mut pending: Vec<Vec<u8>> = Vec::new();
    // The push waits (for the cap, or a full queue) until then; a request ends the wait at once.
    let mut not_before = Instant::now();
    let mut silent_since = Instant::now();
    loop {
        // Demand first: every request that is there, served at once.
        let busy = !pending.is_empty() || !pages.all_sent();
        let wait = if busy {
            not_before
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(1))
        } else {
            Duration::from_millis(20)
        };
        let frame = match control_rx.recv_timeout(wait) {
            Ok(Ok(f)) => Some(f),
            Ok(Err(e)) => return Err(PostCopyError::Link(crate::error_chain(&e))),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                return Err(PostCopyError::Link("control stream reader stopped".into()));
            }
        };
        match frame {
            Some(Frame::PageRequest { first, pages: n }) => {
                silent_since = Instant::now();
                let want = pages
                    .request(first, n)
                    .map_err(|e| PostCopyError::Protocol(e.to_string()))?;
                for bytes in page_frames(source, layout, &want).map_err(vm_error)? {
                    control
                        .write_all(&bytes)
                        .map_err(|e| PostCopyError::Link(format!("demand stream: {e}")))?;
                    *bytes_sent += bytes.len() as u64;
                }
                continue;
            }
            Some(Frame::PostCopyDone {
                pages: n,
                demand_faults,
                max_fault_us,
            }) => {
                pages
                    .done(n, demand_faults, max_fault_us)
                    .map_err(|e| PostCopyError::Protocol(e.to_string()))?;
                return Ok(());
            }
            Some(Frame::Failed { reason } | Frame::Abort { reason }) => {
                return Err(PostCopyError::Peer(reason));
            }
            Some(other) => {
                return Err(PostCopyError::Protocol(format!(
                    "{:?} from the target during post-copy",
                    other.kind()
                )));
            }
            None => {}
        }
        if let Some(e) = lock(push_error).take() {
            return Err(PostCopyError::Link(format!("push stream: {e}")));
        }
        // Background push, within the bandwidth cap.
        if pending.is_empty() && !pages.all_sent() {
            let next = pages.next_push(PUSH_BATCH_PAGES);
            pending = page_frames(source, layout, &next).map_err(vm_error)?;
            pending.reverse();
        }
        if let Some(bytes) = pending.pop() {
            if Instant::now() < not_before {
                pending.push(bytes);
                continue;
            }
            let len = bytes.len() as u64;
            match push_tx.try_send(bytes) {
                Ok(()) => {
                    *bytes_sent += len;
                    if let Some(b) = &mut bucket {
                        not_before = Instant::now() + b.take(len, start.elapsed());
                    }
                }
                Err(TrySendError::Full(bytes)) => {
                    pending.push(bytes);
                    not_before = Instant::now() + Duration::from_micros(200);
                }
                Err(TrySendError::Disconnected(_)) => {
                    let e = lock(push_error).take();
                    return Err(PostCopyError::Link(format!(
                        "push stream: {}",
                        e.map_or("writer stopped".into(), |e| e.to_string())
                    )));
                }
            }
        } else if silent_since.elapsed() >= answer_timeout {
            return Err(PostCopyError::Link(format!(
                "every owed page was sent and the target said nothing for {answer_timeout:?}"
            )));
        }
    }
}

// ───────────────────────────── target ─────────────────────────────

/// The target's post-copy state shared by its threads.
struct Shared {
    pages: TargetPages,
    /// Faulting pages whose request is out, and when the fault was read.
    waiting: HashMap<u64, Instant>,
    /// When a page frame last arrived, on either stream.
    last_frame: Instant,
}

/// Places the pages of one post-copy frame; checks each against the digest when there is one.
fn place_batch(
    memory: &dyn MissingMemory,
    shared: &Mutex<Shared>,
    layout: &MemoryLayout,
    digest: Option<&MemoryDigest>,
    batch: &PageBatch,
) -> Result<(), PostCopyError> {
    static ZERO: [u8; PAGE] = [0; PAGE];
    if batch.round() != POST_COPY_ROUND {
        return Err(PostCopyError::Protocol(format!(
            "a page frame of round {} during post-copy",
            batch.round()
        )));
    }
    // The source is paused: a page whose data does not match its checksum was damaged on the
    // way, and no later copy comes to replace it before the guest reads it.
    if let Some(&gpa) = batch.mismatched().first() {
        return Err(PostCopyError::Protocol(format!(
            "{} page(s) of a post-copy frame did not match their checksum, the first at guest \
             address {gpa:#x}",
            batch.mismatched().len()
        )));
    }
    lock(shared).last_frame = Instant::now();
    for (gpa, data) in batch.iter() {
        let page = layout
            .page_index(gpa)
            .ok_or_else(|| PostCopyError::Protocol(format!("page {gpa:#x} outside the layout")))?;
        let arrival = lock(shared)
            .pages
            .arrived(page)
            .map_err(|e| PostCopyError::Protocol(e.to_string()))?;
        if arrival == Arrival::Duplicate {
            continue;
        }
        if let Some(d) = digest {
            let crc = crc32c::crc32c(data.unwrap_or(&ZERO));
            if d.crcs.get(page as usize) != Some(&crc) {
                return Err(PostCopyError::Verify(page));
            }
        }
        let placed = match data {
            Some(d) => memory.place(gpa, d),
            None => memory.place_zero(gpa),
        };
        placed.map_err(|e| PostCopyError::Vm(format!("placing page {gpa:#x}: {e}")))?;
        let mut s = lock(shared);
        if let Some(t) = s.waiting.remove(&page) {
            let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
            s.pages.fault_served(us);
        }
    }
    Ok(())
}

/// The target's side of post-copy, once the guest runs with pages missing.
pub(crate) struct TargetLink<'a> {
    /// The control stream's writer (requests, then `PostCopyDone`).
    pub control: ConnWriter,
    /// The next frame on the control stream (the demand stream): `None` on a timeout.
    pub next_control: &'a mut dyn FnMut(Duration) -> Option<Result<Frame, String>>,
    /// Accepts the source's push stream (its join checked by the caller).
    pub accept_push: &'a mut dyn FnMut() -> Result<Conn, String>,
    /// With nothing from the source for this long, the link counts as lost.
    pub idle_timeout: Duration,
}

/// The target's figures of a completed post-copy: (pages placed, demand faults, longest
/// wait µs).
pub(crate) type TargetFigures = (u64, u64, u64);

/// Runs the post-copy phase on the target: a fault thread asks for missing pages, the push
/// stream and the demand answers place them, until every owed page is there; then
/// `PostCopyDone`. On any failure the caller stops the guest (machine::postcopy::ending).
pub(crate) fn run_target(
    memory: Arc<dyn MissingMemory>,
    layout: &MemoryLayout,
    owed: TargetPages,
    digest: Option<MemoryDigest>,
    link: TargetLink<'_>,
) -> Result<TargetFigures, PostCopyError> {
    let shared = Arc::new(Mutex::new(Shared {
        pages: owed,
        waiting: HashMap::new(),
        last_frame: Instant::now(),
    }));
    let control = Arc::new(Mutex::new(link.control));
    let stop = Arc::new(AtomicBool::new(false));
    let (err_tx, err_rx) = mpsc::channel::<PostCopyError>();
    let digest = digest.map(Arc::new);

    // The fault thread: reads userfaultfd events, asks for windows of owed pages, zero-fills
    // pages that were never owed.
    let fault_thread = {
        let (memory, shared, control, stop, err_tx, layout) = (
            memory.clone(),
            shared.clone(),
            control.clone(),
            stop.clone(),
            err_tx.clone(),
            layout.clone(),
        );
        thread::Builder::new()
            .name("migrate-pc-fault".into())
            .spawn(move || {
                crate::thread_start::run();
                let fail = |e: PostCopyError| {
                    let _ = err_tx.send(e);
                };
                while !stop.load(Ordering::SeqCst) {
                    let gpa = match memory.next_fault(Duration::from_millis(20)) {
                        Ok(Some(gpa)) => gpa,
                        Ok(None) => continue,
                        Err(e) => return fail(PostCopyError::Vm(format!("reading a fault: {e}"))),
                    };
                    let Some(page) = layout.page_index(gpa) else {
                        return fail(PostCopyError::Vm(format!("fault at {gpa:#x} outside RAM")));
                    };
                    let answer = {
                        let mut s = lock(&shared);
                        let a = s.pages.fault(page);
                        if matches!(a, FaultAnswer::Request { .. }) {
                            s.waiting.insert(page, Instant::now());
                        }
                        a
                    };
                    match answer {
                        FaultAnswer::Request { first, pages } => {
                            let req = Frame::PageRequest { first, pages }.encode();
                            if let Err(e) = lock(&control).write_all(&req) {
                                return fail(PostCopyError::Link(format!("demand stream: {e}")));
                            }
                        }
                        FaultAnswer::Zero => {
                            if let Err(e) = memory.place_zero(gpa) {
                                return fail(PostCopyError::Vm(format!("zero page {gpa:#x}: {e}")));
                            }
                        }
                        // A request is out, or the page is being placed: its placement wakes
                        // the access.
                        FaultAnswer::Wait | FaultAnswer::Present => {}
                    }
                }
            })
            .map_err(|e| PostCopyError::Vm(e.to_string()))?
    };

    let result = (|| {
        // The push stream: a new connection from the source, its pages placed by its reader.
        let push = (link.accept_push)().map_err(PostCopyError::Link)?;
        let push_thread = {
            let (memory, shared, digest, err_tx, layout, stop) = (
                memory.clone(),
                shared.clone(),
                digest.clone(),
                err_tx.clone(),
                layout.clone(),
                stop.clone(),
            );
            let mut push = push;
            thread::Builder::new()
                .name("migrate-pc-rx".into())
                .spawn(move || {
                    crate::thread_start::run();
                    while !stop.load(Ordering::SeqCst) {
                        match read_frame(&mut push, Some(&layout)) {
                            Ok(Frame::Pages(b)) => {
                                if let Err(e) =
                                    place_batch(&*memory, &shared, &layout, digest.as_deref(), &b)
                                {
                                    let _ = err_tx.send(e);
                                    return;
                                }
                            }
                            Ok(other) => {
                                let _ = err_tx.send(PostCopyError::Protocol(format!(
                                    "{:?} on the push stream",
                                    other.kind()
                                )));
                                return;
                            }
                            Err(ReadFrameError::Closed) => return,
                            Err(e) => {
                                if !stop.load(Ordering::SeqCst) {
                                    let _ = err_tx.send(PostCopyError::Link(format!(
                                        "push stream: {}",
                                        crate::error_chain(&e)
                                    )));
                                }
                                return;
                            }
                        }
                    }
                })
                .map_err(|e| PostCopyError::Vm(e.to_string()))?
        };
        loop {
            if let Ok(e) = err_rx.try_recv() {
                return Err(e);
            }
            if lock(&shared).pages.complete() {
                break;
            }
            match (link.next_control)(Duration::from_millis(5)) {
                Some(Ok(Frame::Pages(b))) => {
                    place_batch(&*memory, &shared, layout, digest.as_deref(), &b)?;
                }
                Some(Ok(Frame::Abort { reason } | Frame::Failed { reason })) => {
                    return Err(PostCopyError::Peer(reason));
                }
                Some(Ok(other)) => {
                    return Err(PostCopyError::Protocol(format!(
                        "{:?} on the demand stream",
                        other.kind()
                    )));
                }
                Some(Err(e)) => return Err(PostCopyError::Link(e)),
                None => {
                    // Pages still missing and nothing on either stream (a dead link shows
                    // neither data nor a reset): the guest cannot go on.
                    if lock(&shared).last_frame.elapsed() >= link.idle_timeout {
                        return Err(PostCopyError::Link(format!(
                            "nothing from the source for {:?}",
                            link.idle_timeout
                        )));
                    }
                }
            }
        }
        let (placed, faults, max_us) = lock(&shared).pages.done_figures();
        let done = Frame::PostCopyDone {
            pages: placed,
            demand_faults: faults,
            max_fault_us: max_us,
        };
        lock(&control)
            .write_all(&done.encode())
            .map_err(|e| PostCopyError::Link(format!("sending PostCopyDone: {e}")))?;
        let _ = push_thread.join();
        Ok((placed, faults, max_us))
    })();
    stop.store(true, Ordering::SeqCst);
    if let Err(e) = &result {
        // Best effort: tell the source why, so it reports the right reason.
        let _ = lock(&control).write_all(
            &Frame::Failed {
                reason: e.to_string(),
            }
            .encode(),
        );
        let _ = lock(&control).shutdown();
    }
    let _ = fault_thread.join();
    result
}

/// Checks a post-copy verify digest (one crc per page) against the pages present on the
/// target before it resumes: every page but the owed ones.
pub(crate) fn verify_present(
    layout: &MemoryLayout,
    digest: &MemoryDigest,
    owed: &TargetPages,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), VmError>,
) -> Result<(), PostCopyError> {
    if digest.chunk_bytes != PAGE_SIZE {
        return Err(PostCopyError::Protocol(format!(
            "a post-copy digest must have one checksum per page, not per {} bytes",
            digest.chunk_bytes
        )));
    }
    let mut buf = vec![0u8; PAGE];
    for p in 0..layout.total_pages() {
        if owed.is_missing(p) {
            continue;
        }
        let gpa = layout.page_addr(p).unwrap_or(0);
        read(gpa, &mut buf).map_err(|e| PostCopyError::Vm(e.to_string()))?;
        if digest.crcs.get(p as usize) != Some(&crc32c::crc32c(&buf)) {
            return Err(PostCopyError::Verify(p));
        }
    }
    Ok(())
}

/// Arms the target's memory for post-copy: the owed ranges dropped, every absent page faulting.
pub(crate) fn arm<T: crate::vm::MigrationTarget + ?Sized>(
    target: &mut T,
    layout: &MemoryLayout,
    owed_runs: &[(u64, u32)],
) -> Result<Arc<dyn MissingMemory>, VmError> {
    let owed = crate::machine::postcopy::owed_from_runs(layout.total_pages(), owed_runs);
    target.post_copy_memory(&owed_ranges(layout, &owed))
}

/// Reads the source's join on the push stream (a plain or TLS connection already accepted).
pub(crate) fn push_join_ok(first: &Frame, session: u64, stream: u16) -> bool {
    matches!(first, Frame::Join { session: s, stream: i } if *s == session && *i == stream)
}

/// Connects and joins the source's push stream.
pub(crate) fn join_push(mut conn: Conn, session: u64, stream: u16) -> std::io::Result<Conn> {
    conn.write_all(&Frame::Join { session, stream }.encode())?;
    Ok(conn)
}

/// Sets a socket's write timeout (a push that makes no progress fails).
pub(crate) fn write_timeout(s: &TcpStream, t: Duration) {
    let _ = s.set_write_timeout(Some(t));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Region;

    /// Guest memory that records the pages placed in it.
    #[derive(Default)]
    struct Placed(Mutex<Vec<u64>>);

    impl MissingMemory for Placed {
        fn next_fault(&self, _: Duration) -> Result<Option<u64>, VmError> {
            Ok(None)
        }
        fn place(&self, gpa: u64, _: &[u8]) -> Result<bool, VmError> {
            lock(&self.0).push(gpa);
            Ok(true)
        }
        fn place_zero(&self, gpa: u64) -> Result<bool, VmError> {
            lock(&self.0).push(gpa);
            Ok(true)
        }
    }

    /// Four owed pages, the post-copy frame of pages 1 and 2 as `PageData` bytes.
    fn setup() -> (MemoryLayout, Mutex<Shared>, Vec<u8>) {
        let layout = MemoryLayout::new(vec![Region {
            guest_addr: 0,
            size: 4 * PAGE_SIZE,
        }])
        .unwrap();
        let shared = Mutex::new(Shared {
            pages: TargetPages::new(4, &[(0, 4)]),
            waiting: HashMap::new(),
            last_frame: Instant::now(),
        });
        let mut batch = PageBatch::new(POST_COPY_ROUND);
        batch.push_data(PAGE_SIZE, &[0x5a; PAGE_SIZE as usize]);
        batch.push_data(2 * PAGE_SIZE, &[0xa5; PAGE_SIZE as usize]);
        (layout, shared, batch.to_page_data_bytes())
    }

    fn decoded(bytes: &[u8], layout: &MemoryLayout) -> PageBatch {
        match crate::wire::decode(bytes, Some(layout)).unwrap().0 {
            Frame::Pages(b) => b,
            other => panic!("not a page frame: {other:?}"),
        }
    }

    #[test]
    fn a_post_copy_page_that_fails_its_checksum_is_never_placed() {
        let (layout, shared, mut bytes) = setup();
        // damage the second page's data (the data follows the head)
        let last = bytes.len() - 1;
        bytes[last] ^= 0x10;
        let batch = decoded(&bytes, &layout);
        assert_eq!(batch.mismatched(), &[2 * PAGE_SIZE]);
        let memory = Placed::default();
        let err = place_batch(&memory, &shared, &layout, None, &batch).unwrap_err();
        assert!(
            matches!(&err, PostCopyError::Protocol(m) if m.contains("did not match their checksum") && m.contains("0x2000")),
            "{err}"
        );
        assert!(
            lock(&memory.0).is_empty(),
            "a page of the damaged frame was placed"
        );
    }

    #[test]
    fn a_post_copy_page_data_frame_that_matches_is_placed() {
        let (layout, shared, bytes) = setup();
        let batch = decoded(&bytes, &layout);
        let memory = Placed::default();
        place_batch(&memory, &shared, &layout, None, &batch).unwrap();
        assert_eq!(*lock(&memory.0), vec![PAGE_SIZE, 2 * PAGE_SIZE]);
    }
}

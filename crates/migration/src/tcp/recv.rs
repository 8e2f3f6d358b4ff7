//! The target's I/O shell: accept the control and data streams, decode frames on one thread
//! per stream, hand every frame to the [`Receiver`] machine and carry out its step (apply
//! pages, acknowledge a round, verify, restore, resume, answer); discard on any failure.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::MemoryLayout;
pub use crate::machine::receiver::StreamName;
use crate::machine::receiver::{
    CommitRefused, CommitWork, Failure, PageChecksumFailure, ProtocolViolation, Receiver,
    SOURCE_REASON_GRACE, Step,
};
use crate::tcp::common::{CancelToken, error_chain};
use crate::tcp::transport::{AcceptFailure, Acceptor, Conn, ConnWriter, ListenGuard, Rejected};
use crate::vm::{MigrationTarget, PagePlacer, Prefault, VmError};
use crate::wire::{
    DecodeError, Frame, FrameKind, MemoryDigest, ReadFrameError, TargetTimings, read_frame,
    read_frame_after_header, read_header, read_page_data, read_page_data_head,
};
// ── post-copy (tcp::postcopy, machine::postcopy) ──
use crate::machine::postcopy::TargetPages;
use crate::tcp::postcopy::{self as pc, PostCopyError, TargetLink};
use crate::wire::POST_COPY_PROTOCOL_VERSION;

/// Options of an incoming migration.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// How long to wait for the source to connect at all. `None`: forever (until cancelled).
    pub accept_timeout: Option<Duration>,
    /// Time allowed for the hello and for every data stream to join. Default 10 s.
    pub handshake_timeout: Duration,
    /// With no frame on any stream for this long, the migration fails. Default 30 s.
    pub idle_timeout: Duration,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            accept_timeout: None,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Figures of an incoming migration that completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveReport {
    /// Data pages written.
    pub pages_written: u64,
    /// Pages zeroed because they became zero on the source.
    pub pages_zeroed: u64,
    /// Page frames received.
    pub frames: u64,
    /// Hello → running sent, ms.
    pub total_ms: u64,
    /// Commit received → running sent (verify, restore, resume), ms.
    pub commit_ms: u64,
    /// Connections the listener dropped (failed handshake, foreign certificate, garbage, a port
    /// scan) while it waited for the source's streams.
    pub rejected_connections: u32,
}

/// Why an incoming migration did not complete. In every case the target discarded the VM.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// No source connected in time, or accepting failed.
    #[error("No migration source connected")]
    Accept(#[source] std::io::Error),
    /// Too many connections failed the listener's checks; the last one's reason.
    #[error("Gave up after dropping {count} connections that were not the source (last: {last})")]
    TooManyRejected {
        /// Connections dropped.
        count: u32,
        /// Why the last one was.
        last: String,
    },
    /// A stream failed or closed early.
    #[error("Stream {stream} failed")]
    Stream {
        /// `None` for the control stream, else the data stream's index.
        stream: StreamName,
        /// Cause.
        #[source]
        source: ReadFrameError,
    },
    /// The refusal sent to the source.
    #[error("Refused the migration: {0}")]
    Refused(String),
    /// The source broke the protocol (or the frame sequence was damaged).
    #[error(transparent)]
    Protocol(#[from] ProtocolViolation),
    /// Pages sent in place did not match their own checksums and no good copy replaced them.
    #[error("Page checksum failure")]
    PageChecksum(#[source] PageChecksumFailure),
    /// The source aborted.
    #[error("Source aborted the migration: {0}")]
    Aborted(String),
    /// The memory digest did not match what was loaded.
    #[error("Memory verification failed: chunk {chunk} differs")]
    VerifyMismatch {
        /// First differing chunk.
        chunk: usize,
    },
    /// The VM side failed.
    #[error("Target VM error during {0}")]
    Target(&'static str, #[source] VmError),
    /// Nothing arrived for too long.
    #[error("No frame from the source for {0:?}")]
    Idle(Duration),
    /// Cancelled on the target.
    #[error("Migration cancelled on the target")]
    Cancelled,
    /// Writing to the source failed.
    #[error("Writing to the source failed")]
    Write(#[source] std::io::Error),
    /// Post-copy failed (after the switch: the guest was stopped, the VM is lost).
    #[error("Post-copy failed after the switch: the guest was stopped, the VM is lost")]
    PostCopy(#[source] PostCopyError),
}

enum Event {
    /// A frame, when its reader had it whole, and whether the reader placed its pages in
    /// guest memory already ([`Placement`]).
    Frame(StreamName, Frame, Instant, bool),
    /// A `PageData` frame whose reader read its data straight into guest memory
    /// ([`PagePlacer::read_into`]): what the receiving thread's accounts need of it.
    Placed(StreamName, PlacedPages),
    Error(StreamName, ReadFrameError),
}

/// A page frame read into guest memory in place: its pages, by kind, every page's address
/// and the data pages that did not match their checksum.
struct PlacedPages {
    data: u64,
    zero: u64,
    gpas: Vec<u64>,
    mismatched: Vec<u64>,
}

/// A data stream's socket as its reader reads it: the plain TCP socket itself, which a
/// `PageData` frame's data can be read from straight into guest memory, or a TLS stream.
trait DataSocket: Read + Send + 'static {
    /// The TCP socket, when the stream is plain TCP.
    fn plain(&self) -> Option<&TcpStream>;
}

impl DataSocket for TcpStream {
    fn plain(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl DataSocket for Conn {
    fn plain(&self) -> Option<&TcpStream> {
        None
    }
}

impl DataSocket for crate::tcp::transport::ConnReader {
    fn plain(&self) -> Option<&TcpStream> {
        None
    }
}

/// What a reader did with the frame whose header it read.
enum Read1 {
    /// Read whole: hand it on (a page frame's data pages prefaulted).
    Frame(Frame),
    /// A `PageData` frame's data was read into guest memory in place.
    Placed(PlacedPages),
}

/// Reads the frame whose header `h` is, on a data stream: a `PageData` frame on plain TCP whose
/// round the gate admits goes straight into guest memory (its head checked first, its runs
/// prefaulted, each data page's checksum compared once it is there), any other frame into a
/// buffer from `buf` as [`read_frame_after_header`] reads it. The one place the readers
/// prefault: a page frame's data runs, before its data is read in place or once it was read
/// whole. A `PageData` frame is refused unless `page_data` (the negotiated version defines it:
/// [`Receiver::accepts_page_data`]).
#[allow(clippy::too_many_arguments)]
fn read_data_frame<S: DataSocket>(
    socket: &mut S,
    h: &[u8; crate::wire::HEADER_LEN],
    header: crate::wire::Header,
    layout: Option<&MemoryLayout>,
    page_data: bool,
    prefault: Option<&Prefault>,
    in_place: Option<&dyn PagePlacer>,
    buf: impl FnOnce() -> Vec<u8>,
) -> Result<Read1, ReadFrameError> {
    if header.kind == FrameKind::PageData && !page_data {
        return Err(ReadFrameError::Decode(DecodeError::NotNegotiated(
            FrameKind::PageData,
        )));
    }
    let prefault_runs = |runs: Vec<(u64, u64)>| {
        if let Some(prefault) = prefault {
            for (gpa, len) in runs {
                prefault(gpa, len);
            }
        }
    };
    let Some(layout) = layout.filter(|_| header.kind == FrameKind::PageData) else {
        let f = read_frame_after_header(socket, h, header, layout, buf())?;
        if let Frame::Pages(batch) = &f {
            prefault_runs(batch.data_runs());
        }
        return Ok(Read1::Frame(f));
    };
    let head = read_page_data_head(socket, h, header, layout)?;
    prefault_runs(head.data_runs());
    match (in_place, socket.plain()) {
        (Some(placer), Some(tcp)) => {
            let mismatched = placer
                .read_into(
                    std::os::fd::AsFd::as_fd(tcp),
                    &head.data_gpas(),
                    head.data_crcs(),
                    &head.zero_gpas(),
                )
                .map_err(ReadFrameError::Io)?;
            let data = head.data_pages() as u64;
            Ok(Read1::Placed(PlacedPages {
                data,
                zero: head.len() as u64 - data,
                gpas: head.gpas(),
                mismatched,
            }))
        }
        _ => read_page_data(socket, &head, buf()).map(|b| Read1::Frame(Frame::Pages(b))),
    }
}

struct Incoming<'a, T: MigrationTarget + ?Sized> {
    target: &'a mut T,
    opts: &'a ReceiveOptions,
    cancel: &'a CancelToken,
    machine: Receiver,
    control: Option<ConnWriter>,
    sockets: Vec<TcpStream>,
    start: Instant,
    report: ReceiveReport,
}

impl ReceiveError {
    /// How the machine should read this error.
    fn failure(&self) -> Failure {
        match self {
            ReceiveError::Aborted(_) => Failure::SourceGone,
            ReceiveError::Refused(_) => Failure::Refused,
            ReceiveError::Accept(_)
            | ReceiveError::TooManyRejected { .. }
            | ReceiveError::Stream { .. }
            | ReceiveError::Protocol(_)
            | ReceiveError::PageChecksum(_)
            | ReceiveError::VerifyMismatch { .. }
            | ReceiveError::Target(..)
            | ReceiveError::Idle(_)
            | ReceiveError::Cancelled
            | ReceiveError::Write(_)
            | ReceiveError::PostCopy(_) => Failure::Other,
        }
    }
}

/// Receives one migration on `listener` into `target`, over plain TCP.
///
/// Returns once the VM runs on the target and "running" was sent; on any error the target
/// was discarded and the source told (when still reachable).
pub fn receive<T: MigrationTarget + ?Sized>(
    listener: &TcpListener,
    target: &mut T,
    opts: &ReceiveOptions,
    cancel: &CancelToken,
) -> Result<ReceiveReport, ReceiveError> {
    receive_guarded(listener, target, opts, &ListenGuard::default(), cancel)
}

/// [`receive`], with `guard` deciding how connections are authenticated (mutual TLS or plain)
/// and how many foreign ones are dropped before giving up (see [`crate::tcp::transport`]).
pub fn receive_guarded<T: MigrationTarget + ?Sized>(
    listener: &TcpListener,
    target: &mut T,
    opts: &ReceiveOptions,
    guard: &ListenGuard,
    cancel: &CancelToken,
) -> Result<ReceiveReport, ReceiveError> {
    let mut run = Incoming {
        target,
        opts,
        cancel,
        machine: Receiver::new(),
        control: None,
        sockets: Vec::new(),
        start: Instant::now(),
        report: ReceiveReport {
            pages_written: 0,
            pages_zeroed: 0,
            frames: 0,
            total_ms: 0,
            commit_ms: 0,
            rejected_connections: 0,
        },
    };
    let result = run.execute(listener, guard);
    if let Err(e) = &result {
        let cleanup = run.machine.failed(e.failure());
        if cleanup.discard {
            run.target.discard();
        }
        if cleanup.tell_source
            && let Some(c) = run.control.as_mut()
        {
            let reason = error_chain(e);
            let _ = c.write_all(&Frame::Failed { reason }.encode());
        }
    }
    for s in &run.sockets {
        let _ = s.shutdown(Shutdown::Both);
    }
    if let Some(c) = &run.control {
        let _ = c.shutdown();
    }
    result.map(|()| run.report)
}

fn accept_failure(f: AcceptFailure) -> ReceiveError {
    match f {
        AcceptFailure::Io(e) => ReceiveError::Accept(e),
        AcceptFailure::TooManyRejected(count, last) => {
            ReceiveError::TooManyRejected { count, last }
        }
        AcceptFailure::Cancelled => ReceiveError::Cancelled,
    }
}

/// The rounds whose pages the data streams' readers may place in guest memory themselves:
/// the receiving thread opens the gate to round `k + 1` once every stream ended round `k`
/// (before it acknowledges `k`), so a reader never writes a page while an older copy of it may
/// still be on its way on another stream ([`Receiver::page_fence`] is the same rule, checked
/// on every frame). A stream's round is its position: the round ends it passed. A frame
/// outside the gate goes to the receiving thread unplaced: its machine refuses it if the other
/// streams still have not ended the round before, and otherwise (their round ends were handled
/// in between) accepts it and the receiving thread writes it, before any later round's pages
/// can be placed.
#[derive(Clone, Default)]
struct RoundGate(Arc<AtomicU32>);

impl RoundGate {
    /// Every stream ended (and the target acknowledged) the rounds below `acknowledged`.
    fn open_to(&self, acknowledged: u32) {
        // Release: a reader that sees the new value also sees every page the other readers
        // placed before they sent the round's ends (which the receiving thread read).
        self.0.fetch_max(acknowledged, Ordering::Release);
    }

    /// Whether a reader whose stream ended `stream_round` rounds may place a page frame.
    fn admits(&self, stream_round: u32) -> bool {
        stream_round <= self.0.load(Ordering::Acquire)
    }
}

/// What a data stream's reader needs to place the pages of the frames it reads itself.
#[derive(Clone)]
struct Placement {
    placer: Arc<dyn PagePlacer>,
    gate: RoundGate,
}

#[allow(clippy::too_many_arguments)]
fn spawn_reader(
    mut socket: impl DataSocket,
    name: StreamName,
    layout: Option<MemoryLayout>,
    page_data: bool,
    prefault: Option<Prefault>,
    placement: Option<Placement>,
    spare: Option<Spare>,
    tx: SyncSender<Event>,
) {
    let _ = thread::Builder::new()
        .name(format!("migrate-rx-{name}"))
        .spawn(move || {
            crate::thread_start::run();
            // The pre-copy round this stream is in, as its own round ends tell.
            let mut stream_round = 0u32;
            loop {
                // A buffer only for a frame read whole: a frame read in place needs none.
                let buf = || spare.as_ref().and_then(Spare::take).unwrap_or_default();
                let read = read_header(&mut socket).and_then(|(h, header)| {
                    // Straight into guest memory only where the round gate admits the frame.
                    let in_place = placement
                        .as_ref()
                        .filter(|p| p.placer.reads_in_place() && p.gate.admits(stream_round))
                        .map(|p| &*p.placer);
                    read_data_frame(
                        &mut socket,
                        &h,
                        header,
                        layout.as_ref(),
                        page_data,
                        prefault.as_ref(),
                        in_place,
                        buf,
                    )
                });
                let read = match read {
                    Ok(Read1::Placed(pages)) => {
                        if tx.send(Event::Placed(name, pages)).is_err() {
                            return;
                        }
                        continue;
                    }
                    Ok(Read1::Frame(f)) => Ok(f),
                    Err(e) => Err(e),
                };
                match read {
                    Ok(f) => {
                        let placed = match (&placement, &f) {
                            (Some(p), Frame::Pages(batch)) if p.gate.admits(stream_round) => {
                                // On an error the receiving thread writes the pages itself
                                // and reports what fails there.
                                p.placer.place(batch).is_ok()
                            }
                            (_, Frame::RoundEnd { round }) if *round == stream_round => {
                                stream_round += 1;
                                false
                            }
                            _ => false,
                        };
                        let end = matches!(f, Frame::DataEnd { .. });
                        if tx
                            .send(Event::Frame(name, f, Instant::now(), placed))
                            .is_err()
                        {
                            return;
                        }
                        if end {
                            // Nothing may follow on a data stream: any byte is an error.
                            match read_frame(&mut socket, layout.as_ref()) {
                                Err(ReadFrameError::Closed) => return,
                                Ok(f) => {
                                    let _ = tx.send(Event::Frame(name, f, Instant::now(), false));
                                    return;
                                }
                                Err(e) => {
                                    let _ = tx.send(Event::Error(name, e));
                                    return;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Event::Error(name, e));
                        return;
                    }
                }
            }
        });
}

/// Page frames' buffers handed back by the receiving thread once their pages are written, for
/// the data streams' readers to read the next frames into (no allocation per frame, nor the
/// page faults of fresh memory). Holds at most [`Spare::KEEP`].
#[derive(Clone, Default)]
struct Spare(Arc<Mutex<Vec<Vec<u8>>>>);

impl Spare {
    /// Enough for the frames in flight between the readers and the writer most of the time
    /// (the channel holds up to 64 at a time, 512 KiB each when full).
    const KEEP: usize = 16;

    fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().ok()?.pop()
    }

    fn give(&self, buf: Vec<u8>) {
        if let Ok(mut v) = self.0.lock()
            && v.len() < Self::KEEP
        {
            v.push(buf);
        }
    }
}

/// What the commit of a post-copy migration hands to [`Incoming::post_copy`].
struct PostCopyStart {
    owed: Vec<(u64, u32)>,
    state: (u32, Vec<u8>),
    digest: Option<MemoryDigest>,
    commit_at: Instant,
    timings: TargetTimings,
}

impl<T: MigrationTarget + ?Sized> Incoming<'_, T> {
    /// Post-copy's commit: checks the pages present, restores, arms the missing pages, resumes
    /// and answers `Running`; then serves faults until every owed page is placed
    /// (`tcp::postcopy::run_target`). A failure once the guest runs stops it: the VM is lost.
    fn post_copy(
        &mut self,
        start: PostCopyStart,
        layout: MemoryLayout,
        listener: &TcpListener,
        guard: &ListenGuard,
        source_id: Option<tern_pki::Identity>,
        rx: mpsc::Receiver<Event>,
    ) -> Result<(), ReceiveError> {
        let PostCopyStart {
            owed,
            state: (version, bytes),
            digest,
            commit_at,
            mut timings,
        } = start;
        let since = |t: Instant| u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
        let pages = TargetPages::new(layout.total_pages(), &owed);
        // Before the guest runs a failure discards, as in pre-copy (the source resumes).
        if let Some(d) = &digest {
            let checked = pc::verify_present(&layout, d, &pages, |gpa, buf| {
                self.target.read_pages(gpa, buf)
            });
            if let Err(e) = checked {
                let _ = self.machine.committed(false);
                return Err(ReceiveError::PostCopy(e));
            }
            timings.verify_us = since(commit_at) - timings.data_us;
        }
        let r = self.target.restore_state(version, &bytes);
        self.target_step("restore_state", r)?;
        let r = pc::arm(self.target, &layout, &owed);
        let memory = self.target_step("post_copy_memory", r)?;
        timings.restore_us = since(commit_at) - timings.data_us - timings.verify_us;
        let r = self.target.resume();
        self.target_step("resume", r)?;
        timings.resume_us =
            since(commit_at) - timings.data_us - timings.verify_us - timings.restore_us;
        self.machine.committed(true)?;
        self.report.commit_ms = commit_at.elapsed().as_millis() as u64;
        // From here the guest runs with pages missing: any failure loses it.
        let running = self.machine.running_frame(timings);
        let result = match self.send_control(&running) {
            Err(ReceiveError::Write(e)) => {
                Err(PostCopyError::Link(format!("sending running: {e}")))
            }
            Err(e) => Err(PostCopyError::Link(e.to_string())),
            Ok(()) => {
                let session = self.machine.session();
                let push_stream = self.machine.stream_count() as u16;
                let control = self.control.take().expect("control connected");
                let deadline = Instant::now() + self.opts.handshake_timeout;
                let mut acceptor = Acceptor::new(listener, guard, self.opts.handshake_timeout)
                    .map_err(|e| PostCopyError::Link(e.to_string()));
                let mut accept_push = || -> Result<_, String> {
                    let acceptor = acceptor.as_mut().map_err(|e| e.to_string())?;
                    loop {
                        let a = acceptor
                            .next(Some(deadline), &|| false)
                            .map_err(|e| format!("the push stream did not join: {e:?}"))?;
                        if a.identity == source_id
                            && pc::push_join_ok(&a.first, session, push_stream)
                        {
                            return Ok(a.conn);
                        }
                        acceptor
                            .reject(Rejected {
                                peer: Some(a.peer),
                                reason: "not the source's post-copy push stream".into(),
                            })
                            .map_err(|e| format!("{e:?}"))?;
                    }
                };
                let mut next_control = |t: Duration| match rx.recv_timeout(t) {
                    Ok(Event::Frame(StreamName::Control, f, ..)) => Some(Ok(f)),
                    Ok(Event::Frame(name, f, ..)) => {
                        Some(Err(format!("{:?} on {name} after its end", f.kind())))
                    }
                    Ok(Event::Placed(name, _)) => {
                        Some(Err(format!("a page frame on {name} after its end")))
                    }
                    Ok(Event::Error(name, e)) => Some(Err(format!("{name}: {}", error_chain(&e)))),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => Some(Err("every stream closed".into())),
                };
                pc::run_target(
                    memory,
                    &layout,
                    pages,
                    digest,
                    TargetLink {
                        control,
                        next_control: &mut next_control,
                        accept_push: &mut accept_push,
                        idle_timeout: self.opts.idle_timeout,
                    },
                )
            }
        };
        match result {
            Ok(_) => {
                self.report.total_ms = self.start.elapsed().as_millis() as u64;
                Ok(())
            }
            Err(e) => {
                self.target.stop_post_copy_guest();
                Err(ReceiveError::PostCopy(e))
            }
        }
    }

    /// The result of a target step after the commit (restore, arming the memory, resume): on
    /// failure the commit is recorded as failed first, so the source keeps its copy.
    fn target_step<R>(
        &mut self,
        step: &'static str,
        r: Result<R, VmError>,
    ) -> Result<R, ReceiveError> {
        r.map_err(|e| {
            let _ = self.machine.committed(false);
            ReceiveError::Target(step, e)
        })
    }

    fn send_control(&mut self, f: &Frame) -> Result<(), ReceiveError> {
        let c = self.control.as_mut().expect("control connected");
        c.write_all(&f.encode()).map_err(ReceiveError::Write)
    }

    fn execute(&mut self, listener: &TcpListener, guard: &ListenGuard) -> Result<(), ReceiveError> {
        let deadline = self.opts.accept_timeout.map(|t| Instant::now() + t);
        let mut acceptor = Acceptor::new(listener, guard, self.opts.handshake_timeout)
            .map_err(ReceiveError::Accept)?;
        let cancel = self.cancel.clone();
        let cancelled = move || cancel.is_cancelled();
        // The control stream: the first connection that passes the guard and opens with a hello.
        let (control, source_id, first) = loop {
            let a = acceptor
                .next(deadline, &cancelled)
                .map_err(accept_failure)?;
            if matches!(a.first, Frame::Hello(_)) {
                break (a.conn, a.identity, a.first);
            }
            acceptor
                .reject(Rejected {
                    peer: Some(a.peer),
                    reason: "a data stream's join before any hello".into(),
                })
                .map_err(accept_failure)?;
        };
        self.start = Instant::now();
        let (control, writer) = control.split().map_err(ReceiveError::Write)?;
        self.control = Some(writer);
        let version = match self.machine.control_opened(first)? {
            Ok(_) => {
                let described = self.machine.described().cloned().expect("hello accepted");
                let prepared = self.target.prepare(&described);
                self.machine.prepared(prepared)?
            }
            Err(refusal) => Err(refusal),
        };
        let negotiated = version.as_ref().map_or(0, |v| *v);
        match version {
            Ok(version) => self.send_control(&Frame::Welcome { version })?,
            Err(refusal) => {
                let reason = refusal.to_string();
                let _ = self.send_control(&Frame::Refuse {
                    reason: reason.clone(),
                });
                return Err(ReceiveError::Refused(reason));
            }
        }
        let layout = self.machine.layout().cloned();
        // Only with a layout: the readers check each page's address against it first.
        let prefault = layout.as_ref().and_then(|_| self.target.prefault());
        let gate = RoundGate::default();
        let placement = layout
            .as_ref()
            .and_then(|_| self.target.placer())
            .map(|placer| Placement {
                placer,
                gate: gate.clone(),
            });
        let spare = Spare::default();
        let (tx, rx) = mpsc::sync_channel::<Event>(64);
        let page_data = self.machine.accepts_page_data();
        spawn_reader(
            control,
            StreamName::Control,
            layout.clone(),
            page_data,
            None,
            None,
            None,
            tx.clone(),
        );

        // Data streams: each must open with a join carrying the session token of the hello and,
        // with TLS, come from the control stream's certificate; anything else is dropped.
        let join_deadline = Instant::now() + self.opts.handshake_timeout;
        while !self.machine.all_joined() {
            let a = acceptor
                .next(Some(join_deadline), &cancelled)
                .map_err(accept_failure)?;
            let why_not = match &a.first {
                _ if a.identity != source_id => Some(format!(
                    "a data stream from {}, not from the control stream's {}",
                    a.identity
                        .as_ref()
                        .map_or("plain TCP".into(), |i| i.to_string()),
                    source_id
                        .as_ref()
                        .map_or("plain TCP".into(), |i| i.to_string()),
                )),
                Frame::Join { session, .. } if *session != self.machine.session() => {
                    Some("a join with a foreign session token".into())
                }
                Frame::Join { .. } => None,
                _ => Some("a second hello".into()),
            };
            if let Some(reason) = why_not {
                acceptor
                    .reject(Rejected {
                        peer: Some(a.peer),
                        reason,
                    })
                    .map_err(accept_failure)?;
                continue;
            }
            let stream = self.machine.data_opened(a.first)?;
            self.sockets
                .push(a.conn.shutdown_handle().map_err(ReceiveError::Write)?);
            let name = StreamName::Data(stream);
            match a.conn {
                // The socket itself, not the enum around it: std reads a socket into the frame's
                // buffer without zeroing the buffer first (a memset of every page received).
                Conn::Plain(s) => spawn_reader(
                    s,
                    name,
                    layout.clone(),
                    page_data,
                    prefault.clone(),
                    placement.clone(),
                    Some(spare.clone()),
                    tx.clone(),
                ),
                tls => spawn_reader(
                    tls,
                    name,
                    layout.clone(),
                    page_data,
                    prefault.clone(),
                    placement.clone(),
                    Some(spare.clone()),
                    tx.clone(),
                ),
            }
        }
        self.report.rejected_connections = acceptor.rejected();
        drop(acceptor);
        drop(tx);

        let mut commit_at: Option<Instant> = None;
        let mut idle_since = Instant::now();
        let mut post_copy_owed: Option<Vec<(u64, u32)>> = None;
        while !self.machine.ready_to_commit() {
            if self.cancel.is_cancelled() && self.machine.cancellable() {
                return Err(ReceiveError::Cancelled);
            }
            let ev = match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => {
                    if idle_since.elapsed() >= self.opts.idle_timeout {
                        return Err(ReceiveError::Idle(self.opts.idle_timeout));
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ReceiveError::Aborted("all streams closed".into()));
                }
            };
            idle_since = Instant::now();
            let (stream, frame, read_at, placed) = match ev {
                Event::Frame(stream, frame, read_at, placed) => (stream, frame, read_at, placed),
                Event::Placed(stream, pages) => {
                    // Its reader wrote the pages already, in the round the machine admits.
                    self.machine
                        .placed_pages(stream, &pages.gpas, &pages.mismatched)?;
                    self.report.frames += 1;
                    self.report.pages_written += pages.data;
                    self.report.pages_zeroed += pages.zero;
                    continue;
                }
                Event::Error(stream, source) => {
                    // A source that gives up sends Abort on the control stream and then
                    // closes everything: give its reason a moment to arrive.
                    let grace = Instant::now() + SOURCE_REASON_GRACE;
                    while let Some(left) = grace.checked_duration_since(Instant::now()) {
                        match rx.recv_timeout(left) {
                            Ok(Event::Frame(StreamName::Control, Frame::Abort { reason }, ..)) => {
                                return Err(ReceiveError::Aborted(reason));
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    return Err(ReceiveError::Stream { stream, source });
                }
            };
            // Post-copy hook: the owed pages, on the control stream, once, before Commit.
            if let Frame::PostCopy { owed } = frame {
                if stream != StreamName::Control
                    || negotiated < POST_COPY_PROTOCOL_VERSION
                    || post_copy_owed.is_some()
                {
                    return Err(ReceiveError::PostCopy(PostCopyError::Protocol(format!(
                        "a PostCopy frame on {stream} at protocol {negotiated}, or a second one"
                    ))));
                }
                post_copy_owed = Some(owed);
                continue;
            }
            let is_commit = matches!(frame, Frame::Commit);
            match self.machine.frame(stream, frame)? {
                Step::Apply(batch) if placed => {
                    // Its reader wrote the pages already, in the round the machine admits.
                    self.report.frames += 1;
                    let data = batch.iter().filter(|(_, d)| d.is_some()).count() as u64;
                    self.report.pages_written += data;
                    self.report.pages_zeroed += batch.len() as u64 - data;
                    spare.give(batch.into_buf());
                }
                Step::Apply(batch) => {
                    self.report.frames += 1;
                    for (gpa, data) in batch.iter() {
                        match data {
                            Some(d) => {
                                self.target
                                    .write_page(gpa, d)
                                    .map_err(|e| ReceiveError::Target("write_page", e))?;
                                self.report.pages_written += 1;
                            }
                            None => {
                                self.target
                                    .zero_page(gpa)
                                    .map_err(|e| ReceiveError::Target("zero_page", e))?;
                                self.report.pages_zeroed += 1;
                            }
                        }
                    }
                    spare.give(batch.into_buf());
                }
                Step::AckRound(round) => {
                    // Every reader placed its pages of `round` before it passed the round's
                    // end on: the next round's may now be placed on arrival.
                    gate.open_to(self.machine.acknowledged_rounds());
                    self.send_control(&Frame::RoundAck { round })?
                }
                Step::Wait => {}
                Step::Aborted(reason) => return Err(ReceiveError::Aborted(reason)),
                Step::ChecksumFailed(f) => return Err(ReceiveError::PageChecksum(f)),
            }
            if is_commit {
                commit_at = Some(read_at);
            }
        }

        // Commit: every stream ended; check, restore, resume.
        let commit_at = commit_at.unwrap_or_else(Instant::now);
        let since = |t: Instant| u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut timings = TargetTimings {
            data_us: since(commit_at),
            ..Default::default()
        };
        let CommitWork {
            state: (version, bytes),
            digest,
        } = self
            .machine
            .commit(post_copy_owed.as_deref())
            .map_err(|e| match e {
                CommitRefused::Violation(v) => ReceiveError::Protocol(v),
                CommitRefused::Checksum(f) => ReceiveError::PageChecksum(f),
            })?;
        if let Some(owed) = post_copy_owed.take() {
            let layout = layout.expect("layout agreed");
            let resumed = PostCopyStart {
                owed,
                state: (version, bytes),
                digest,
                commit_at,
                timings,
            };
            return self.post_copy(resumed, layout, listener, guard, source_id, rx);
        }
        if let Some(want) = digest {
            let layout = layout.expect("layout agreed");
            let got = MemoryDigest::of_memory(&layout, want.chunk_bytes, |gpa, buf| {
                self.target.read_pages(gpa, buf)
            })
            .map_err(|e| ReceiveError::Target("read_pages", e))?;
            if let Some(chunk) = want.first_difference(&got) {
                let _ = self.machine.committed(false);
                return Err(ReceiveError::VerifyMismatch { chunk });
            }
            timings.verify_us = since(commit_at) - timings.data_us;
        }
        let r = self.target.restore_state(version, &bytes);
        self.target_step("restore_state", r)?;
        timings.restore_us = since(commit_at) - timings.data_us - timings.verify_us;
        let r = self.target.resume();
        self.target_step("resume", r)?;
        timings.resume_us =
            since(commit_at) - timings.data_us - timings.verify_us - timings.restore_us;
        self.machine.committed(true)?;
        self.report.commit_ms = commit_at.elapsed().as_millis() as u64;
        self.report.total_ms = self.start.elapsed().as_millis() as u64;
        // The VM runs here now; if this write fails the source stays paused (in doubt), which
        // keeps exactly one copy running.
        let running = self.machine.running_frame(timings);
        let _ = self.send_control(&running);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CpuidDigest, PAGE_SIZE, Region, VmConfigDescription};
    use crate::machine::receiver::Violation;
    use crate::wire::{Hello, PAGE_DATA_PROTOCOL_VERSION, PROTOCOL_VERSION, PageBatch};

    /// Two stripes: pages 0..128 travel on data stream 0, 128..256 on data stream 1.
    const PAGES: usize = 256;
    /// The first page of data stream 1's stripe.
    const S1: u64 = 128;

    /// Guest memory shared by a fake target and its placer; the placer logs each frame's first
    /// page and the first byte it wrote there.
    #[derive(Default)]
    struct Memory {
        bytes: Mutex<Vec<u8>>,
        placed: Mutex<Vec<(u64, u8)>>,
    }

    impl Memory {
        fn write(&self, gpa: u64, data: Option<&[u8]>) {
            let mut m = self.bytes.lock().unwrap();
            let at = gpa as usize;
            let page = &mut m[at..at + PAGE_SIZE as usize];
            match data {
                Some(d) => page.copy_from_slice(d),
                None => page.fill(0),
            }
        }
        fn first_byte(&self, page: u64) -> u8 {
            self.bytes.lock().unwrap()[(page * PAGE_SIZE) as usize]
        }
    }

    struct Placer(Arc<Memory>);

    impl PagePlacer for Placer {
        fn place(&self, batch: &PageBatch) -> Result<(), VmError> {
            for (gpa, data) in batch.iter() {
                self.0.write(gpa, data);
            }
            let (gpa, data) = batch.iter().next().expect("a frame with pages");
            let first = data.map_or(0, |d| d[0]);
            self.0.placed.lock().unwrap().push((gpa, first));
            Ok(())
        }
    }

    struct Target {
        mem: Arc<Memory>,
        written: u64,
        resumed: bool,
        discarded: bool,
    }

    impl MigrationTarget for Target {
        fn prepare(&mut self, _: &VmConfigDescription) -> Result<(), String> {
            Ok(())
        }
        fn write_page(&mut self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
            self.written += 1;
            self.mem.write(gpa, Some(data));
            Ok(())
        }
        fn zero_page(&mut self, gpa: u64) -> Result<(), VmError> {
            self.written += 1;
            self.mem.write(gpa, None);
            Ok(())
        }
        fn read_pages(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
            let m = self.mem.bytes.lock().unwrap();
            buf.copy_from_slice(&m[gpa as usize..gpa as usize + buf.len()]);
            Ok(())
        }
        fn restore_state(&mut self, _: u32, _: &[u8]) -> Result<(), VmError> {
            Ok(())
        }
        fn resume(&mut self) -> Result<(), VmError> {
            self.resumed = true;
            Ok(())
        }
        fn discard(&mut self) {
            self.discarded = true;
        }
        fn placer(&mut self) -> Option<Arc<dyn PagePlacer>> {
            Some(Arc::new(Placer(self.mem.clone())))
        }
    }

    fn pages(round: u32, page: u64, fill: u8) -> Vec<u8> {
        let mut b = PageBatch::new(round);
        b.push_data(page * PAGE_SIZE, &[fill; PAGE_SIZE as usize]);
        Frame::Pages(b).encode()
    }

    /// A hand-driven source: control stream (hello answered by welcome) and two data streams.
    struct Source {
        control: TcpStream,
        data: [TcpStream; 2],
    }

    impl Source {
        fn connect(addr: std::net::SocketAddr) -> Source {
            Self::connect_at(addr, PROTOCOL_VERSION)
        }

        fn connect_at(addr: std::net::SocketAddr, max_version: u16) -> Source {
            let mut control = TcpStream::connect(addr).unwrap();
            let hello = Hello {
                min_version: 1,
                max_version,
                session: 7,
                streams: 2,
                config: VmConfigDescription {
                    layout: MemoryLayout::new(vec![Region {
                        guest_addr: 0,
                        size: PAGES as u64 * PAGE_SIZE,
                    }])
                    .unwrap(),
                    vcpus: 1,
                    cpuid: CpuidDigest(1),
                    devices: vec![],
                },
            };
            control.write_all(&Frame::Hello(hello).encode()).unwrap();
            let welcome = read_frame(&mut control, None).unwrap();
            assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
            let data = [0u16, 1].map(|stream| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(&Frame::Join { session: 7, stream }.encode())
                    .unwrap();
                s
            });
            Source { control, data }
        }

        fn send(&mut self, stream: usize, frame: &[u8]) {
            self.data[stream].write_all(frame).unwrap();
        }
    }

    type Received = thread::JoinHandle<(Target, Result<ReceiveReport, ReceiveError>)>;

    fn receive_in_thread(mem: &Arc<Memory>) -> (std::net::SocketAddr, Received) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut target = Target {
            mem: mem.clone(),
            written: 0,
            resumed: false,
            discarded: false,
        };
        let h = thread::spawn(move || {
            let opts = ReceiveOptions {
                accept_timeout: Some(Duration::from_secs(20)),
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(10),
            };
            let r = receive(&listener, &mut target, &opts, &CancelToken::new());
            (target, r)
        });
        (addr, h)
    }

    fn memory() -> Arc<Memory> {
        Arc::new(Memory {
            bytes: Mutex::new(vec![0; PAGES * PAGE_SIZE as usize]),
            placed: Mutex::default(),
        })
    }

    #[test]
    fn the_readers_place_every_page_and_a_later_round_s_copy_wins() {
        let mem = memory();
        let (addr, h) = receive_in_thread(&mem);
        let mut src = Source::connect(addr);
        src.send(0, &pages(0, 0, 0xa0));
        src.send(1, &pages(0, S1, 0xb0));
        end_round_0(&mut src);
        // Page 0 again, in the round after, and a zero page, as after a pause.
        src.send(0, &pages(1, 0, 0xa1));
        let mut zero = PageBatch::new(1);
        zero.push_zero(S1 * PAGE_SIZE);
        src.send(1, &Frame::Pages(zero).encode());
        src.send(
            0,
            &Frame::DataEnd {
                frames: 2,
                pages: 2,
            }
            .encode(),
        );
        src.send(
            1,
            &Frame::DataEnd {
                frames: 2,
                pages: 2,
            }
            .encode(),
        );
        let state = Frame::State {
            version: 1,
            bytes: vec![],
        };
        src.control.write_all(&state.encode()).unwrap();
        src.control.write_all(&Frame::Commit.encode()).unwrap();
        let running = read_frame(&mut src.control, None).unwrap();
        assert!(matches!(running, Frame::Running { .. }), "{running:?}");
        let (target, r) = h.join().unwrap();
        let report = r.unwrap();
        assert!(target.resumed && !target.discarded);
        assert_eq!(
            target.written, 0,
            "the receiving thread wrote no page itself"
        );
        assert_eq!((report.pages_written, report.pages_zeroed), (3, 1));
        assert_eq!((mem.first_byte(0), mem.first_byte(S1)), (0xa1, 0));
        let mut placed = mem.placed.lock().unwrap().clone();
        placed.sort();
        assert_eq!(
            placed,
            [
                (0, 0xa0),
                (0, 0xa1),
                (S1 * PAGE_SIZE, 0),
                (S1 * PAGE_SIZE, 0xb0)
            ]
        );
    }

    #[test]
    fn a_page_frame_before_every_stream_ended_the_round_before_is_never_placed() {
        let mem = memory();
        let (addr, h) = receive_in_thread(&mem);
        let mut src = Source::connect(addr);
        src.send(0, &pages(0, 0, 0xa0));
        src.send(0, &Frame::RoundEnd { round: 0 }.encode());
        // Stream 1 has not ended round 0: this frame must not reach guest memory.
        src.send(0, &pages(1, 0, 0xa1));
        let (target, r) = h.join().unwrap();
        let e = r.unwrap_err();
        assert_eq!(
            e.to_string(),
            "Protocol violation in phase Receiving: pages of round 1 on stream 0 before stream 1 \
             ended round 0"
        );
        assert!(target.discarded && !target.resumed);
        assert_eq!(target.written, 0);
        assert_eq!(mem.first_byte(0), 0xa0, "the early copy was not written");
        assert_eq!(*mem.placed.lock().unwrap(), [(0, 0xa0)]);
    }

    /// A `PageData` frame of round `round` with page `page` filled with `fill`; with
    /// `damaged`, one data byte flipped after the checksum was taken.
    fn page_data(round: u32, page: u64, fill: u8, damaged: bool) -> Vec<u8> {
        let mut b = PageBatch::new(round);
        b.push_data(page * PAGE_SIZE, &[fill; PAGE_SIZE as usize]);
        let mut bytes = b.to_page_data_bytes();
        if damaged {
            let last = bytes.len() - 1;
            bytes[last] ^= 0x10;
        }
        bytes
    }

    /// Ends round 0 on both data streams and reads the target's acknowledgement of it.
    fn end_round_0(src: &mut Source) {
        for i in 0..2 {
            src.send(i, &Frame::RoundEnd { round: 0 }.encode());
        }
        let ack = read_frame(&mut src.control, None).unwrap();
        assert!(matches!(ack, Frame::RoundAck { round: 0 }), "{ack:?}");
    }

    fn end_all(src: &mut Source, frames: [u64; 2], pages: [u64; 2]) {
        for i in 0..2 {
            let end = Frame::DataEnd {
                frames: frames[i],
                pages: pages[i],
            };
            src.send(i, &end.encode());
        }
        let state = Frame::State {
            version: 1,
            bytes: vec![],
        };
        src.control.write_all(&state.encode()).unwrap();
        src.control.write_all(&Frame::Commit.encode()).unwrap();
    }

    #[test]
    fn a_page_data_frame_below_the_version_that_defines_it_is_refused() {
        let mem = memory();
        let (addr, h) = receive_in_thread(&mem);
        let mut src = Source::connect_at(addr, PAGE_DATA_PROTOCOL_VERSION - 1);
        src.send(0, &page_data(0, 0, 0xa0, false));
        let (target, r) = h.join().unwrap();
        match r.unwrap_err() {
            ReceiveError::Stream {
                stream: StreamName::Data(0),
                source: ReadFrameError::Decode(DecodeError::NotNegotiated(FrameKind::PageData)),
            } => {}
            other => panic!("expected PageData refused at protocol 4, got {other:?}"),
        }
        assert!(target.discarded && !target.resumed);
        assert_eq!(mem.first_byte(0), 0, "nothing was written");
    }

    #[test]
    fn a_page_that_failed_its_checksum_live_is_fine_once_a_good_copy_came() {
        let mem = memory();
        let (addr, h) = receive_in_thread(&mem);
        let mut src = Source::connect(addr);
        src.send(0, &page_data(0, 0, 0xa0, true));
        end_round_0(&mut src);
        // The page again after the pause, intact.
        src.send(0, &page_data(1, 0, 0xa1, false));
        end_all(&mut src, [2, 0], [2, 0]);
        let running = read_frame(&mut src.control, None).unwrap();
        let Frame::Running { timings: Some(t) } = running else {
            panic!("expected running with timings, got {running:?}");
        };
        assert_eq!(t.pages_resent_after_checksum_mismatch, Some(1));
        let (target, r) = h.join().unwrap();
        r.unwrap();
        assert!(target.resumed);
        assert_eq!(mem.first_byte(0), 0xa1);
    }

    #[test]
    fn a_page_that_fails_its_checksum_after_the_last_round_end_fails_the_migration() {
        let mem = memory();
        let (addr, h) = receive_in_thread(&mem);
        let mut src = Source::connect(addr);
        src.send(0, &page_data(0, 2, 0xa0, false));
        end_round_0(&mut src);
        src.send(0, &page_data(1, 2, 0xa1, true));
        // Stream 0's end alone fails it: nothing after its last round end can replace the page.
        src.send(
            0,
            &Frame::DataEnd {
                frames: 2,
                pages: 2,
            }
            .encode(),
        );
        let failed = read_frame(&mut src.control, None).unwrap();
        let Frame::Failed { reason } = failed else {
            panic!("expected failed, got {failed:?}");
        };
        assert!(
            reason.contains("1 page(s) did not match their checksum in the pages sent while the source was paused, the first at guest address 0x2000"),
            "{reason}"
        );
        let (target, r) = h.join().unwrap();
        assert!(matches!(r, Err(ReceiveError::PageChecksum(_))), "{r:?}");
        assert!(target.discarded && !target.resumed);
    }

    /// A page on a data stream other than its stripe's (here page 1, whose stripe is stream
    /// 0's, on stream 1, next to its own copy on stream 0) fails the migration with a typed
    /// violation before anything is committed: the target discards and tells the source.
    #[test]
    fn a_page_on_another_stream_than_its_stripe_s_fails_the_migration() {
        for as_page_data in [false, true] {
            let mem = memory();
            let (addr, h) = receive_in_thread(&mem);
            let mut src = Source::connect(addr);
            let frame = |round, page, fill| {
                if as_page_data {
                    page_data(round, page, fill, false)
                } else {
                    pages(round, page, fill)
                }
            };
            src.send(0, &frame(0, 1, 0xa0));
            src.send(1, &frame(0, 1, 0xb0));
            let failed = read_frame(&mut src.control, None).unwrap();
            let Frame::Failed { reason } = failed else {
                panic!("expected failed, got {failed:?}");
            };
            assert!(
                reason.contains(
                    "page at guest address 0x1000 arrived on data stream 1, but its stripe \
                     travels on data stream 0"
                ),
                "{reason}"
            );
            let (target, r) = h.join().unwrap();
            match r {
                Err(ReceiveError::Protocol(ProtocolViolation {
                    what:
                        Violation::OffStripe {
                            gpa: PAGE_SIZE,
                            stream: 1,
                            stripe_stream: 0,
                        },
                    ..
                })) => {}
                other => panic!("expected the off-stripe page refused, got {other:?}"),
            }
            assert!(target.discarded && !target.resumed);
        }
    }

    #[test]
    fn the_round_gate_admits_a_stream_s_pages_once_the_rounds_before_were_acknowledged() {
        let gate = RoundGate::default();
        let reader = gate.clone();
        assert!(reader.admits(0), "round 0 needs no acknowledgement");
        // A stream that ended round 0 while another has not: its round-1 pages wait.
        assert!(!reader.admits(1));
        gate.open_to(1);
        assert!(reader.admits(1));
        assert!(reader.admits(0));
        assert!(!reader.admits(2));
        // Never closes again (the receiving thread only opens it further).
        gate.open_to(0);
        assert!(reader.admits(1));
    }
}

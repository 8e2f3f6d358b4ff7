//! The source's I/O shell: TCP control and data streams, page reading, zero-page skipping,
//! the bandwidth cap, progress, cancel, and the clean-up that keeps the source running on any
//! failure before commit.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver as ChanRx, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::config::{MemoryLayout, PAGE_SIZE};
use crate::policy::{ConvergenceConfig, Decision, TokenBucket};
use crate::report::{MigrationReport, Outcome, Progress, ProgressPhase};
use crate::sender::{FailureAction, Sender, SenderPhase};
use crate::vm::{MigrationSource, VmError};
use crate::wire::{
    Frame, Hello, MAX_PAGES_PER_FRAME, MAX_STREAMS, MIN_PROTOCOL_VERSION, MemoryDigest,
    PROTOCOL_VERSION, PageBatch, ReadFrameError, read_frame,
};

const PAGE: usize = PAGE_SIZE as usize;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];
/// Consecutive pages that travel on the same data stream. A page always takes the same stream,
/// so TCP's ordering keeps a later copy of a page behind an earlier one.
pub const STRIPE_PAGES: u64 = MAX_PAGES_PER_FRAME as u64;
/// Chunk size of the memory verification digest.
pub const VERIFY_CHUNK_BYTES: u64 = 1 << 20;

/// A cancel switch shared between the operator (another thread, a signal handler) and the
/// migration. Cancelling after commit was sent has no effect.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A fresh, not cancelled token.
    pub fn new() -> Self {
        Self::default()
    }
    /// Requests cancellation.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Options of an outgoing migration.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Number of parallel data streams (1..=64). Default 2.
    pub streams: u16,
    /// Convergence policy: downtime budget, timeout and its action, bandwidth cap.
    pub convergence: ConvergenceConfig,
    /// Send a digest of all memory at the pause; the target compares before resuming.
    pub verify_memory: bool,
    /// Time allowed to connect and to get the handshake answer. Default 10 s.
    pub connect_timeout: Duration,
    /// Time allowed for the target's answer to commit. Default 30 s.
    pub ack_timeout: Duration,
    /// A write that makes no progress for this long fails the migration. Default 10 s.
    pub io_timeout: Duration,
    /// Protocol versions offered (oldest, newest). Default: all this build speaks.
    pub protocol_versions: (u16, u16),
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            streams: 2,
            convergence: ConvergenceConfig::default(),
            verify_memory: false,
            connect_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(10),
            protocol_versions: (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
        }
    }
}

/// Why an outgoing migration did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Options out of range.
    #[error("Invalid migration options: {0}")]
    Options(String),
    /// Could not connect.
    #[error("Cannot connect to the target {addr}")]
    Connect {
        /// Address tried.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed while sending.
    #[error("Connection to the target failed")]
    Connection(#[source] std::io::Error),
    /// Reading the target's answer failed.
    #[error("Reading from the target failed")]
    Read(#[source] ReadFrameError),
    /// The target refused the handshake.
    #[error("Target refused the migration: {0}")]
    Refused(String),
    /// The target sent something the protocol does not allow now.
    #[error("Protocol error: {0}")]
    Protocol(String),
    /// The target failed (or aborted) and discarded the VM.
    #[error("Target failed: {0}")]
    Target(String),
    /// The source VM reported an error.
    #[error("Source VM error during {0}")]
    Source(&'static str, #[source] VmError),
    /// Cancelled by the operator.
    #[error("Migration cancelled")]
    Cancelled,
    /// The timeout passed without convergence (`on_timeout` abort).
    #[error("Migration did not converge within the timeout")]
    TimedOut,
    /// Commit was sent but the target's answer never came; the source stays paused.
    #[error("No answer to commit: the target may be running, the source stays paused")]
    InDoubt(#[source] Option<ReadFrameError>),
}

/// A migration that did not complete: the error and the report (outcome, figures).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct MigrationFailure {
    /// What went wrong.
    #[source]
    pub error: MigrateError,
    /// Figures up to the failure; `outcome` tells whether the source runs.
    pub report: MigrationReport,
}

enum WriterMsg {
    Frame(Vec<u8>),
    Flush(SyncSender<()>),
}

struct DataStream {
    tx: Option<SyncSender<WriterMsg>>,
    handle: Option<JoinHandle<()>>,
    socket: TcpStream,
    error: Arc<Mutex<Option<std::io::Error>>>,
    batch: PageBatch,
    frames: u64,
    pages: u64,
}

struct Run<'a, S: MigrationSource + ?Sized> {
    source: &'a mut S,
    opts: &'a MigrateOptions,
    cancel: &'a CancelToken,
    progress: &'a mut dyn FnMut(&Progress),
    start: Instant,
    machine: Sender,
    layout: MemoryLayout,
    control: Option<TcpStream>,
    control_rx: Option<ChanRx<Result<Frame, ReadFrameError>>>,
    data: Vec<DataStream>,
    bucket: Option<TokenBucket>,
    sent_nonzero: Vec<u64>,
    bytes_sent: u64,
    zero_skipped: u64,
    dirty_log_on: bool,
    paused_at: Option<Instant>,
    last_progress: Instant,
    round_remaining: u64,
    target_answered: bool,
    /// Time spent on runs of pages that were all zero and skipped: taken out of the round's
    /// time for the bandwidth estimate, since the final round carries dirty (data) pages.
    zero_scan: Duration,
}

/// Migrates `source` to the target listening at `to`.
///
/// On success the VM runs on the target and `source` is left paused (the caller tears it
/// down). On failure before commit the source runs again (resumed if it was paused) and the
/// target has been told to discard; the returned report says what happened.
pub fn migrate<S: MigrationSource + ?Sized>(
    source: &mut S,
    to: impl ToSocketAddrs,
    opts: &MigrateOptions,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrationFailure> {
    let start = Instant::now();
    let layout = source.describe().layout;
    let words = layout.total_pages().div_ceil(64) as usize;
    let mut run = Run {
        machine: Sender::new(opts.convergence.clone()),
        bucket: opts
            .convergence
            .max_bandwidth
            .map(|r| TokenBucket::new(r, (r / 20).max(1 << 20), Duration::ZERO)),
        source,
        opts,
        cancel,
        progress,
        start,
        layout,
        control: None,
        control_rx: None,
        data: Vec::new(),
        sent_nonzero: vec![0; words],
        bytes_sent: 0,
        zero_skipped: 0,
        dirty_log_on: false,
        paused_at: None,
        last_progress: start,
        round_remaining: 0,
        target_answered: false,
        zero_scan: Duration::ZERO,
    };
    let result = run.execute(to);
    run.finish(result)
}

impl<S: MigrationSource + ?Sized> Run<'_, S> {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn execute(&mut self, to: impl ToSocketAddrs) -> Result<Duration, MigrateError> {
        let o = self.opts;
        if o.streams == 0 || o.streams > MAX_STREAMS {
            return Err(MigrateError::Options(format!(
                "streams must be 1..={MAX_STREAMS}, got {}",
                o.streams
            )));
        }
        if o.convergence.max_bandwidth == Some(0) {
            return Err(MigrateError::Options(
                "bandwidth cap must be above 0".into(),
            ));
        }
        let addrs: Vec<SocketAddr> = to
            .to_socket_addrs()
            .map_err(|source| MigrateError::Connect {
                addr: "?".into(),
                source,
            })?
            .collect();
        let addr = *addrs.first().ok_or_else(|| MigrateError::Connect {
            addr: "?".into(),
            source: std::io::Error::other("address resolves to nothing"),
        })?;
        self.handshake(addr)?;
        self.machine
            .accepted(self.now())
            .map_err(|e| MigrateError::Protocol(e.to_string()))?;
        self.source
            .start_dirty_log()
            .map_err(|e| MigrateError::Source("start_dirty_log", e))?;
        self.dirty_log_on = true;

        // Round 0: every page.
        let mut pages = vec![u64::MAX; self.layout.total_pages().div_ceil(64) as usize];
        if let Some(last) = pages.last_mut() {
            let tail = self.layout.total_pages() % 64;
            if tail != 0 {
                *last = (1u64 << tail) - 1;
            }
        }
        let mut count = self.layout.total_pages();
        // Pages the VMM knows to be zero (never backed by host memory) are skipped unread; a
        // write after this point is in the dirty log, so it goes in a later round.
        for r in 0..self.layout.regions().len() {
            let Some(bits) = self.source.known_zero(r) else {
                continue;
            };
            let first = self.layout.region_first_page(r);
            let n = self.layout.regions()[r].pages();
            for (wi, &word) in bits.iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let b = u64::from(word.trailing_zeros());
                    word &= word - 1;
                    let i = wi as u64 * 64 + b;
                    if i >= n {
                        break;
                    }
                    let p = first + i;
                    let (w, bit) = ((p / 64) as usize, 1u64 << (p % 64));
                    if pages[w] & bit != 0 {
                        pages[w] &= !bit;
                        count -= 1;
                        self.zero_skipped += 1;
                    }
                }
            }
        }
        loop {
            let (t0, scan0) = (Instant::now(), self.zero_scan);
            let before = self.bytes_sent;
            self.round_remaining = count * PAGE_SIZE;
            self.send_pages(&pages)?;
            // Round barrier: the target acknowledges once it applied every page of the round,
            // so the time measured is end to end and no backlog is left for the pause.
            let round = self.machine.round();
            for i in 0..self.data.len() {
                self.flush_batch(i)?;
                self.push_frame(i, Frame::RoundEnd { round }.encode())?;
            }
            self.flush_all()?;
            self.wait_round_ack(round)?;
            let busy = t0.elapsed().saturating_sub(self.zero_scan - scan0);
            self.machine
                .sent(self.bytes_sent - before, busy)
                .map_err(|e| MigrateError::Protocol(e.to_string()))?;
            (pages, count) = self.fetch_dirty()?;
            let decision = self
                .machine
                .synced(self.now(), count * PAGE_SIZE)
                .map_err(|e| MigrateError::Protocol(e.to_string()))?;
            self.report_progress(ProgressPhase::PreCopy, true);
            match decision {
                Decision::Continue => {}
                Decision::Throttle(p) => self
                    .source
                    .set_throttle(p)
                    .map_err(|e| MigrateError::Source("set_throttle", e))?,
                Decision::SwitchOver { .. } => break,
                Decision::Abort => return Err(MigrateError::TimedOut),
            }
        }

        // Stop-and-copy.
        self.check_cancel_and_target()?;
        self.source
            .pause()
            .map_err(|e| MigrateError::Source("pause", e))?;
        self.paused_at = Some(Instant::now());
        self.machine
            .paused(self.now())
            .map_err(|e| MigrateError::Protocol(e.to_string()))?;
        // The last sync's dirty set was not sent yet: add what was dirtied since.
        let (last, _) = self.fetch_dirty()?;
        let mut count = 0;
        for (p, l) in pages.iter_mut().zip(&last) {
            *p |= l;
            count += u64::from(p.count_ones());
        }
        let (t0, scan0) = (Instant::now(), self.zero_scan);
        let before = self.bytes_sent;
        self.round_remaining = count * PAGE_SIZE;
        self.send_pages(&pages)?;
        for i in 0..self.data.len() {
            self.flush_batch(i)?;
            let (frames, pages) = (self.data[i].frames, self.data[i].pages);
            self.push_frame(i, Frame::DataEnd { frames, pages }.encode())?;
        }
        self.flush_all()?;
        let busy = t0.elapsed().saturating_sub(self.zero_scan - scan0);
        let _ = self.machine.sent(self.bytes_sent - before, busy);
        let (version, bytes) = self
            .source
            .save_state()
            .map_err(|e| MigrateError::Source("save_state", e))?;
        self.check_cancel_and_target()?;
        self.write_control(&Frame::State { version, bytes })?;
        if self.opts.verify_memory {
            let layout = self.layout.clone();
            let digest = memory_digest(&layout, VERIFY_CHUNK_BYTES, |gpa, buf| {
                self.source.read_pages(gpa, buf)
            })
            .map_err(|e| MigrateError::Source("read_pages", e))?;
            self.write_control(&Frame::Verify(digest))?;
        }
        self.report_progress(ProgressPhase::StopAndCopy, true);
        // The last chance to cancel: after this frame the target may run the VM.
        self.check_cancel_and_target()?;
        self.write_control(&Frame::Commit)?;
        self.machine
            .commit_sent()
            .map_err(|e| MigrateError::Protocol(e.to_string()))?;
        self.report_progress(ProgressPhase::Commit, true);

        let rx = self.control_rx.as_ref().expect("control reader runs");
        match rx.recv_timeout(self.opts.ack_timeout) {
            Ok(Ok(Frame::Running)) => self
                .machine
                .running_acked(self.now())
                .map_err(|e| MigrateError::Protocol(e.to_string())),
            Ok(Ok(Frame::Failed { reason })) | Ok(Ok(Frame::Abort { reason })) => {
                self.target_answered = true;
                Err(MigrateError::Target(reason))
            }
            Ok(Ok(other)) => {
                // A frame that makes no sense here: the target did not commit.
                self.target_answered = true;
                Err(MigrateError::Protocol(format!(
                    "unexpected {:?} frame instead of running",
                    other.kind()
                )))
            }
            Ok(Err(e)) => Err(MigrateError::InDoubt(Some(e))),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                Err(MigrateError::InDoubt(None))
            }
        }
    }

    fn handshake(&mut self, addr: SocketAddr) -> Result<(), MigrateError> {
        let connect = |addr: &SocketAddr| -> Result<TcpStream, MigrateError> {
            let s =
                TcpStream::connect_timeout(addr, self.opts.connect_timeout).map_err(|source| {
                    MigrateError::Connect {
                        addr: addr.to_string(),
                        source,
                    }
                })?;
            let _ = s.set_nodelay(true);
            let _ = s.set_write_timeout(Some(self.opts.io_timeout));
            Ok(s)
        };
        let mut control = connect(&addr)?;
        let session = session_id();
        let hello = Frame::Hello(Hello {
            min_version: self.opts.protocol_versions.0,
            max_version: self.opts.protocol_versions.1,
            session,
            streams: self.opts.streams,
            config: self.source.describe(),
        });
        let bytes = hello.encode();
        control
            .write_all(&bytes)
            .map_err(MigrateError::Connection)?;
        self.bytes_sent += bytes.len() as u64;
        self.control = Some(control.try_clone().map_err(MigrateError::Connection)?);
        // Control reader: every frame from the target ends up in this channel.
        let (tx, rx) = mpsc::sync_channel(4);
        thread::Builder::new()
            .name("migrate-ctl-rx".into())
            .spawn(move || {
                loop {
                    let f = read_frame(&mut control, None);
                    let stop = f.is_err();
                    if tx.send(f).is_err() || stop {
                        break;
                    }
                }
            })
            .map_err(MigrateError::Connection)?;
        let deadline = Instant::now() + self.opts.connect_timeout;
        let answer = loop {
            if self.cancel.is_cancelled() {
                return Err(MigrateError::Cancelled);
            }
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(Ok(f)) => break f,
                Ok(Err(e)) => return Err(MigrateError::Read(e)),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => {
                    return Err(MigrateError::Connection(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no answer to the handshake",
                    )));
                }
            }
        };
        self.control_rx = Some(rx);
        match answer {
            Frame::Welcome { version }
                if (self.opts.protocol_versions.0..=self.opts.protocol_versions.1)
                    .contains(&version) => {}
            Frame::Welcome { version } => {
                return Err(MigrateError::Protocol(format!(
                    "target chose protocol version {version}, which was not offered"
                )));
            }
            Frame::Refuse { reason } => {
                self.target_answered = true;
                return Err(MigrateError::Refused(reason));
            }
            other => {
                return Err(MigrateError::Protocol(format!(
                    "unexpected {:?} frame in the handshake",
                    other.kind()
                )));
            }
        }

        for i in 0..self.opts.streams {
            let mut s = connect(&addr)?;
            let join = Frame::Join { session, stream: i }.encode();
            s.write_all(&join).map_err(MigrateError::Connection)?;
            self.bytes_sent += join.len() as u64;
            let socket = s.try_clone().map_err(MigrateError::Connection)?;
            let (tx, rx) = mpsc::sync_channel::<WriterMsg>(8);
            let error = Arc::new(Mutex::new(None));
            let err2 = error.clone();
            let handle = thread::Builder::new()
                .name(format!("migrate-tx-{i}"))
                .spawn(move || {
                    for msg in rx {
                        match msg {
                            WriterMsg::Frame(b) => {
                                if let Err(e) = s.write_all(&b) {
                                    *err2.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                                    return;
                                }
                            }
                            WriterMsg::Flush(done) => {
                                let _ = done.send(());
                            }
                        }
                    }
                })
                .map_err(MigrateError::Connection)?;
            self.data.push(DataStream {
                tx: Some(tx),
                handle: Some(handle),
                socket,
                error,
                batch: PageBatch::new(0),
                frames: 0,
                pages: 0,
            });
        }
        Ok(())
    }

    fn writer_error(&self, i: usize) -> MigrateError {
        let e = self.data[i]
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| std::io::Error::other("data stream writer stopped"));
        MigrateError::Connection(e)
    }

    fn push_frame(&mut self, i: usize, bytes: Vec<u8>) -> Result<(), MigrateError> {
        let len = bytes.len() as u64;
        if let Some(bucket) = &mut self.bucket {
            let wait = bucket.take(len, self.start.elapsed());
            if !wait.is_zero() {
                thread::sleep(wait);
            }
        }
        self.send_to_writer(i, WriterMsg::Frame(bytes))?;
        self.bytes_sent += len;
        Ok(())
    }

    /// Hands a message to writer `i`, waiting while its queue is full but never past a cancel.
    fn send_to_writer(&mut self, i: usize, mut msg: WriterMsg) -> Result<(), MigrateError> {
        loop {
            let tx = self.data[i].tx.as_ref().expect("writer runs");
            match tx.try_send(msg) {
                Ok(()) => return Ok(()),
                Err(mpsc::TrySendError::Disconnected(_)) => return Err(self.writer_error(i)),
                Err(mpsc::TrySendError::Full(m)) => {
                    msg = m;
                    if self.cancel.is_cancelled()
                        && self.machine.phase() != SenderPhase::AwaitingAck
                    {
                        return Err(MigrateError::Cancelled);
                    }
                    thread::sleep(Duration::from_micros(200));
                }
            }
        }
    }

    fn flush_batch(&mut self, i: usize) -> Result<(), MigrateError> {
        if self.data[i].batch.is_empty() {
            return Ok(());
        }
        let round = self.machine.round();
        let batch = std::mem::replace(&mut self.data[i].batch, PageBatch::new(round));
        self.data[i].frames += 1;
        self.data[i].pages += batch.len() as u64;
        self.push_frame(i, batch.into_frame_bytes())
    }

    /// Sends every pending batch and waits until every writer has written all it was given.
    fn flush_all(&mut self) -> Result<(), MigrateError> {
        for i in 0..self.data.len() {
            self.flush_batch(i)?;
        }
        self.wait_writers()
    }

    fn wait_writers(&mut self) -> Result<(), MigrateError> {
        let mut waits = Vec::new();
        for i in 0..self.data.len() {
            let (tx, rx) = mpsc::sync_channel(1);
            self.send_to_writer(i, WriterMsg::Flush(tx))?;
            waits.push((i, rx));
        }
        for (i, rx) in waits {
            loop {
                match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(()) => break,
                    Err(RecvTimeoutError::Disconnected) => return Err(self.writer_error(i)),
                    Err(RecvTimeoutError::Timeout) => {
                        if self.cancel.is_cancelled() {
                            return Err(MigrateError::Cancelled);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits for the target's acknowledgement of `round`, watching cancel and the I/O timeout.
    fn wait_round_ack(&mut self, round: u32) -> Result<(), MigrateError> {
        let deadline = Instant::now() + self.opts.io_timeout;
        loop {
            let rx = self.control_rx.as_ref().expect("control reader runs");
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(Ok(Frame::RoundAck { round: r })) if r == round => return Ok(()),
                Ok(Ok(Frame::Failed { reason } | Frame::Abort { reason })) => {
                    self.target_answered = true;
                    return Err(MigrateError::Target(reason));
                }
                Ok(Ok(other)) => {
                    return Err(MigrateError::Protocol(format!(
                        "unexpected {:?} frame while waiting for the end of round {round}",
                        other.kind()
                    )));
                }
                Ok(Err(e)) => return Err(MigrateError::Read(e)),
                Err(RecvTimeoutError::Timeout) => {
                    if self.cancel.is_cancelled() {
                        return Err(MigrateError::Cancelled);
                    }
                    if Instant::now() >= deadline {
                        return Err(MigrateError::Connection(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("target did not acknowledge round {round}"),
                        )));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrateError::Connection(std::io::Error::other(
                        "control stream reader stopped",
                    )));
                }
            }
        }
    }

    fn check_cancel_and_target(&mut self) -> Result<(), MigrateError> {
        if self.cancel.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        if let Some(rx) = &self.control_rx {
            match rx.try_recv() {
                Ok(Ok(Frame::Failed { reason })) | Ok(Ok(Frame::Abort { reason })) => {
                    self.target_answered = true;
                    return Err(MigrateError::Target(reason));
                }
                Ok(Ok(other)) => {
                    return Err(MigrateError::Protocol(format!(
                        "unexpected {:?} frame from the target",
                        other.kind()
                    )));
                }
                Ok(Err(e)) => return Err(MigrateError::Read(e)),
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => {
                    return Err(MigrateError::Connection(std::io::Error::other(
                        "control stream reader stopped",
                    )));
                }
            }
        }
        Ok(())
    }

    /// Sends the pages whose bits are set in `set` (a bitmap over page indices).
    fn send_pages(&mut self, set: &[u64]) -> Result<(), MigrateError> {
        let total = self.layout.total_pages();
        let regions = self.layout.regions().len();
        let mut buf = vec![0u8; MAX_PAGES_PER_FRAME * PAGE];
        let mut idx = 0u64;
        let mut batches = 0u32;
        while idx < total {
            // Next set bit.
            let w = (idx / 64) as usize;
            let bits = set[w] & (u64::MAX << (idx % 64));
            if bits == 0 {
                idx = (w as u64 + 1) * 64;
                continue;
            }
            let start = w as u64 * 64 + u64::from(bits.trailing_zeros());
            if start >= total {
                break;
            }
            // Extend the run: consecutive set bits, same region, same stripe, ≤ one frame.
            let region = (0..regions)
                .rev()
                .find(|&r| self.layout.region_first_page(r) <= start)
                .unwrap_or(0);
            let region_end =
                self.layout.region_first_page(region) + self.layout.regions()[region].pages();
            let stripe_end = (start / STRIPE_PAGES + 1) * STRIPE_PAGES;
            let limit = region_end.min(stripe_end).min(total);
            let mut end = start + 1;
            while end < limit && set[(end / 64) as usize] & (1 << (end % 64)) != 0 {
                end += 1;
            }
            idx = end;
            let n = (end - start) as usize;
            let run_start = Instant::now();
            let mut pushed = false;
            let gpa0 = self.layout.page_addr(start).expect("index in layout");
            self.source
                .read_pages(gpa0, &mut buf[..n * PAGE])
                .map_err(|e| MigrateError::Source("read_pages", e))?;
            let stream = ((start / STRIPE_PAGES) % self.data.len() as u64) as usize;
            for k in 0..n {
                let p = start + k as u64;
                let page = &buf[k * PAGE..(k + 1) * PAGE];
                let gpa = gpa0 + k as u64 * PAGE_SIZE;
                let (word, bit) = ((p / 64) as usize, 1u64 << (p % 64));
                if page == ZERO_PAGE {
                    if self.sent_nonzero[word] & bit == 0 {
                        self.zero_skipped += 1;
                        continue;
                    }
                    self.sent_nonzero[word] &= !bit;
                    self.data[stream].batch.push_zero(gpa);
                } else {
                    self.sent_nonzero[word] |= bit;
                    self.data[stream].batch.push_data(gpa, page);
                }
                pushed = true;
                if self.data[stream].batch.is_full() {
                    self.flush_batch(stream)?;
                    batches += 1;
                    if batches.is_multiple_of(8) {
                        self.check_cancel_and_target()?;
                        self.report_progress(self.current_phase(), false);
                    }
                }
            }
            if !pushed {
                self.zero_scan += run_start.elapsed();
            }
            self.round_remaining = self.round_remaining.saturating_sub(n as u64 * PAGE_SIZE);
        }
        self.check_cancel_and_target()
    }

    fn current_phase(&self) -> ProgressPhase {
        match self.machine.phase() {
            SenderPhase::Handshake => ProgressPhase::Setup,
            SenderPhase::PreCopy => ProgressPhase::PreCopy,
            SenderPhase::StopAndCopy => ProgressPhase::StopAndCopy,
            _ => ProgressPhase::Commit,
        }
    }

    /// Fetches and clears all regions' dirty bitmaps into one bitmap over page indices.
    fn fetch_dirty(&mut self) -> Result<(Vec<u64>, u64), MigrateError> {
        let mut out = vec![0u64; self.layout.total_pages().div_ceil(64) as usize];
        let mut count = 0;
        for (r, region) in self.layout.regions().iter().enumerate() {
            let bits = self
                .source
                .fetch_dirty(r)
                .map_err(|e| MigrateError::Source("fetch_dirty", e))?;
            let first = self.layout.region_first_page(r);
            let pages = region.pages();
            for (wi, &word) in bits.iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let b = u64::from(word.trailing_zeros());
                    word &= word - 1;
                    let i = wi as u64 * 64 + b;
                    if i >= pages {
                        break;
                    }
                    let p = first + i;
                    out[(p / 64) as usize] |= 1 << (p % 64);
                    count += 1;
                }
            }
        }
        Ok((out, count))
    }

    fn write_control(&mut self, frame: &Frame) -> Result<(), MigrateError> {
        let bytes = frame.encode();
        let c = self.control.as_mut().expect("connected");
        c.write_all(&bytes).map_err(MigrateError::Connection)?;
        self.bytes_sent += bytes.len() as u64;
        Ok(())
    }

    fn report_progress(&mut self, phase: ProgressPhase, force: bool) {
        let now = Instant::now();
        if !force && now.duration_since(self.last_progress) < Duration::from_millis(100) {
            return;
        }
        self.last_progress = now;
        let f = self.machine.figures();
        let p = Progress {
            phase,
            round: f.round,
            bytes_sent: self.bytes_sent,
            bytes_remaining: if force {
                f.remaining_bytes
            } else {
                self.round_remaining
            },
            dirty_bytes_per_sec: f.dirty_bytes_per_sec,
            bandwidth_bytes_per_sec: f.bandwidth_bytes_per_sec.unwrap_or(0.0),
            expected_downtime_ms: f.expected_downtime.map(|d| d.as_secs_f64() * 1e3),
            throttle_pct: f.throttle_pct,
            elapsed_ms: self.start.elapsed().as_millis() as u64,
        };
        (self.progress)(&p);
    }

    /// Turns the result into a report, undoing what a failure requires.
    fn finish(
        mut self,
        mut result: Result<Duration, MigrateError>,
    ) -> Result<MigrationReport, MigrationFailure> {
        // A target that gives up sends its reason on the control stream and closes the data
        // streams; a broken data stream may be noticed first. Give the reason a moment.
        if matches!(
            result,
            Err(MigrateError::Connection(_) | MigrateError::Read(_))
        ) && let Some(rx) = &self.control_rx
        {
            let grace = Instant::now() + Duration::from_millis(100);
            while let Some(left) = grace.checked_duration_since(Instant::now()) {
                match rx.recv_timeout(left) {
                    Ok(Ok(Frame::Failed { reason } | Frame::Abort { reason })) => {
                        self.target_answered = true;
                        result = Err(MigrateError::Target(reason));
                        break;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => break,
                }
            }
        }
        let reason = result.as_ref().err().map(|e| crate::recv::error_chain(e));
        let action = match &result {
            Ok(_) => None,
            Err(_) => Some(self.machine.failed(self.target_answered)),
        };
        // Tell the target (best effort) unless it already answered or we are in doubt.
        if matches!(
            action,
            Some(FailureAction::KeepRunning | FailureAction::ResumeSource)
        ) && !self.target_answered
            && let Some(c) = self.control.as_mut()
        {
            let reason = reason.unwrap_or_default();
            let _ = c.write_all(&Frame::Abort { reason }.encode());
        }
        let mut cleanup_error = None;
        if action != Some(FailureAction::InDoubt)
            && let Err(e) = self.source.set_throttle(0.0)
        {
            cleanup_error.get_or_insert(MigrateError::Source("set_throttle", e));
        }
        if action == Some(FailureAction::ResumeSource)
            && let Err(e) = self.source.resume()
        {
            cleanup_error.get_or_insert(MigrateError::Source("resume", e));
        }
        let downtime = match (&result, self.paused_at) {
            (Ok(d), _) => *d,
            (Err(_), Some(p)) => p.elapsed(),
            (Err(_), None) => Duration::ZERO,
        };
        if self.dirty_log_on {
            let _ = self.source.stop_dirty_log();
        }
        // Close everything: writers end when their channel closes.
        for d in &mut self.data {
            if result.is_err() {
                let _ = d.socket.shutdown(Shutdown::Both);
            }
            d.tx = None;
        }
        for d in &mut self.data {
            if let Some(h) = d.handle.take() {
                let _ = h.join();
            }
        }
        if let Some(c) = &self.control {
            let _ = c.shutdown(Shutdown::Both);
        }
        let f = self.machine.figures();
        let outcome = match &result {
            Ok(_) => Outcome::Completed,
            Err(MigrateError::Refused(_)) => Outcome::Refused,
            Err(MigrateError::Cancelled) => Outcome::Cancelled,
            Err(MigrateError::TimedOut) => Outcome::TimedOut,
            Err(MigrateError::InDoubt(_)) => Outcome::InDoubt,
            Err(_) => Outcome::Failed,
        };
        let report = MigrationReport {
            total_ms: self.start.elapsed().as_millis() as u64,
            downtime_ms: downtime.as_millis() as u64,
            rounds: if self.dirty_log_on {
                self.machine.round() + 1
            } else {
                0
            },
            bytes_sent: self.bytes_sent,
            pages_zero_skipped: self.zero_skipped,
            throttle_max_pct: f.throttle_max_pct,
            converged: self.machine.converged() && outcome == Outcome::Completed,
            outcome,
        };
        match result {
            Ok(_) => Ok(report),
            Err(e) => Err(MigrationFailure {
                error: cleanup_error.unwrap_or(e),
                report,
            }),
        }
    }
}

/// crc32c of guest memory in `chunk_bytes` chunks over the pages in index order.
pub fn memory_digest(
    layout: &MemoryLayout,
    chunk_bytes: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), VmError>,
) -> Result<MemoryDigest, VmError> {
    let mut crcs = Vec::with_capacity(MemoryDigest::chunks_for(layout, chunk_bytes) as usize);
    let mut buf = vec![0u8; (chunk_bytes.min(1 << 20)) as usize];
    let (mut crc, mut in_chunk) = (0u32, 0u64);
    for r in layout.regions() {
        let mut at = r.guest_addr;
        while at < r.end() {
            let n = (r.end() - at)
                .min(chunk_bytes - in_chunk)
                .min(buf.len() as u64);
            read(at, &mut buf[..n as usize])?;
            crc = crc32c::crc32c_append(crc, &buf[..n as usize]);
            in_chunk += n;
            at += n;
            if in_chunk == chunk_bytes {
                crcs.push(crc);
                (crc, in_chunk) = (0, 0);
            }
        }
    }
    if in_chunk > 0 {
        crcs.push(crc);
    }
    Ok(MemoryDigest { chunk_bytes, crcs })
}

fn session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

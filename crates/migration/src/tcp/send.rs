//! The source's I/O shell: TCP control and data streams (the data streams written by the copy
//! loop itself, without blocking), page reading, the bandwidth cap's sleeps, the clock, progress callbacks and cancel. What to send,
//! what an answer means, when the VM's storage is handed over or taken back and how a failure
//! is undone are the [`Sender`] machine's and [`pages`]' decisions; this file carries them out.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver as ChanRx, RecvTimeoutError, TryRecvError};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::{MemoryLayout, PAGE_SIZE};
use crate::machine::pages::{self, PageAction, PageSet, ZeroTracker};
use crate::machine::policy::{ConvergenceConfig, Decision, TokenBucket};
use crate::machine::sender::{
    Ending, Heard, InvalidTransition, Sender, StorageStep, TARGET_REASON_GRACE, TargetAnswer,
    check_options,
};
use crate::report::{MigrationReport, PauseStep, Progress};
use crate::tcp::common::{CancelToken, error_chain};
use crate::tcp::transport::{self, ConnWriter, DataSender, TlsClient, wait_writable};
use crate::vm::{GuestPages, MigrationSource, VmError};
use crate::wire::{
    Frame, FrameKind, HEADER_LEN, Hello, MAX_PAGES_PER_FRAME, MIN_PROTOCOL_VERSION, MemoryDigest,
    PAGE_DATA_PROTOCOL_VERSION, PROTOCOL_VERSION, PageDataFrame, ReadFrameError,
    VERIFY_CHUNK_BYTES, read_frame, seal,
};
// ── post-copy (tcp::postcopy, machine::postcopy) ──
use crate::machine::postcopy;
use crate::tcp::postcopy::{PostCopyError, SourceLink, serve_source};
use crate::wire::{MAX_OWED_RUNS, MAX_STREAMS, MAX_VERIFY_CHUNKS, POST_COPY_PROTOCOL_VERSION};

const PAGE: usize = PAGE_SIZE as usize;

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
    /// Switch to post-copy after this many pre-copy rounds (`--post-copy-after`; `None`:
    /// pre-copy only). After the switch a lost link loses the VM (`failed_post_copy`).
    pub post_copy_after: Option<u32>,
    /// Send pages straight from guest memory in `PageData` frames (protocol 5, plain TCP, a VM
    /// that offers its memory): no copy into a frame; each data page carries the crc32c the
    /// source took of it when it checked it, which the target compares once the page is in its
    /// memory (a page the guest rewrote meanwhile is suspect until its next copy; docs/migration.md,
    /// "`PageData` and what protects the page data"). Default on; off (`--copy-pages`) copies
    /// every page into a `Pages` frame whose crc32c covers every byte. TLS always copies.
    pub pages_in_place: bool,
}

/// The protocol versions a migration offers: post-copy needs [`POST_COPY_PROTOCOL_VERSION`]
/// at least, so an older target refuses the hello rather than meeting post-copy frames.
fn offered_versions(opts: &MigrateOptions) -> (u16, u16) {
    match opts.post_copy_after {
        Some(_) => (
            opts.protocol_versions.0.max(POST_COPY_PROTOCOL_VERSION),
            opts.protocol_versions.1,
        ),
        None => opts.protocol_versions,
    }
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
            post_copy_after: None,
            pages_in_place: true,
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
    #[error("Connection to the target failed{}", stalled_hint(.0))]
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
    /// Post-copy failed after the switch: the VM is lost (the source stays paused).
    #[error("Post-copy failed after the switch, the VM is lost (the source stays paused)")]
    PostCopy(#[source] PostCopyError),
}

/// What a send that ran into the socket's write timeout means (the OS reports it as `EAGAIN`,
/// "Resource temporarily unavailable"): the target stopped taking data.
fn stalled_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            " (it took no data within the write timeout: the target is frozen or the link is down)"
        }
        _ => "",
    }
}

/// A migration that did not complete: the error and the report (outcome, figures).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct MigrationFailure {
    /// What went wrong (boxed: the failure carries the report too, and stays small).
    #[source]
    pub error: Box<MigrateError>,
    /// Figures up to the failure; `outcome` tells whether the source runs.
    pub report: MigrationReport,
}

impl MigrateError {
    /// How the machine should read this error as the end of the migration.
    fn ending(&self) -> Ending {
        match self {
            MigrateError::Cancelled => Ending::Cancelled,
            MigrateError::Connection(_) | MigrateError::Read(_) | MigrateError::PostCopy(_) => {
                Ending::LinkLost
            }
            MigrateError::InDoubt(_) => Ending::NoAnswer,
            MigrateError::Options(_)
            | MigrateError::Connect { .. }
            | MigrateError::Refused(_)
            | MigrateError::Protocol(_)
            | MigrateError::Target(_)
            | MigrateError::Source(..)
            | MigrateError::TimedOut => Ending::Failed,
        }
    }
}

impl From<TargetAnswer> for MigrateError {
    fn from(a: TargetAnswer) -> Self {
        match a {
            TargetAnswer::Refused(reason) => MigrateError::Refused(reason),
            TargetAnswer::Failed(reason) => MigrateError::Target(reason),
            other @ (TargetAnswer::VersionNotOffered(_) | TargetAnswer::Unexpected { .. }) => {
                MigrateError::Protocol(other.to_string())
            }
        }
    }
}

impl From<InvalidTransition> for MigrateError {
    fn from(e: InvalidTransition) -> Self {
        MigrateError::Protocol(e.to_string())
    }
}

/// The low bit of a page entry's address: the page is all zeros and no data follows
/// (docs/migration.md, the `Pages` frame).
const ZERO_ENTRY_FLAG: u64 = 1;
/// Bytes of a page frame's payload before its entries: round `u32`, count `u16`.
const PAGES_PREFIX: usize = 6;
/// Bytes of a full page frame.
const FULL_PAGE_FRAME: usize = HEADER_LEN + PAGES_PREFIX + MAX_PAGES_PER_FRAME * (8 + PAGE);
/// Page frame buffers kept for reuse (each comes back once it is on the socket).
const SPARE_FRAMES: usize = 32;
/// Bytes a data stream may hold queued beyond what its socket took before the copy loop waits
/// for it: two full page frames, so the next frame is ready when the socket drains.
const STREAM_QUEUE_MAX: usize = 2 * FULL_PAGE_FRAME;
/// The longest single wait for a data stream's socket to take more (cancel is checked between).
const WRITABLE_WAIT: Duration = Duration::from_millis(20);

/// The pause after a wait for writable data sockets that was followed by nothing written (see
/// `write_until`), so a socket that poll reports writable but that takes nothing is not spun on.
const FRUITLESS_WAIT_PAUSE: Duration = Duration::from_millis(1);

/// A page frame built in place: each page is read from the VM straight into its entry (one
/// copy of guest memory on the way out), a page found zero shrinks back to its address entry
/// or out of the frame, and the finished frame is sealed (length, crc32c) where it lies. The
/// buffer keeps its full size, so reusing it costs no allocation, no page fault and no memset.
struct FrameBuf {
    buf: Vec<u8>,
    /// Bytes of the frame so far.
    len: usize,
    round: u32,
    count: u16,
}

impl FrameBuf {
    /// An empty frame of round `round`, in `buf` (a spare, or a new buffer when `None`).
    fn new(buf: Option<Vec<u8>>, round: u32) -> Self {
        let mut buf = buf.unwrap_or_default();
        if buf.len() < FULL_PAGE_FRAME {
            buf.resize(FULL_PAGE_FRAME, 0);
        }
        Self {
            buf,
            len: HEADER_LEN + PAGES_PREFIX,
            round,
            count: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn is_full(&self) -> bool {
        usize::from(self.count) >= MAX_PAGES_PER_FRAME
    }

    fn pages(&self) -> usize {
        usize::from(self.count)
    }

    /// Adds the page at `gpa`, its 4096 bytes filled by `fill` (straight from guest memory),
    /// then asks `action` what the filled page is to be (given whether it is all zeros).
    fn push_page<E>(
        &mut self,
        gpa: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
        action: impl FnOnce(bool) -> PageAction,
    ) -> Result<PageAction, E> {
        assert!(!self.is_full() && gpa.is_multiple_of(PAGE_SIZE));
        let at = self.len;
        let data = &mut self.buf[at + 8..at + 8 + PAGE];
        fill(data)?;
        let what = action(is_zero(data));
        let entry = match what {
            PageAction::Skip => return Ok(what),
            PageAction::Zero => {
                self.len += 8;
                gpa | ZERO_ENTRY_FLAG
            }
            PageAction::Data => {
                self.len += 8 + PAGE;
                gpa
            }
        };
        self.buf[at..at + 8].copy_from_slice(&entry.to_le_bytes());
        self.count += 1;
        Ok(what)
    }

    /// Seals the frame (header, round, count, length, crc32c) and returns the buffer and how
    /// many of its bytes are the frame.
    fn seal(mut self) -> (Vec<u8>, usize) {
        self.buf[..8].copy_from_slice(&*PAGES_HEADER_START);
        let len = u32::try_from(self.len - HEADER_LEN).unwrap_or(u32::MAX);
        self.buf[8..12].copy_from_slice(&len.to_le_bytes());
        self.buf[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&self.round.to_le_bytes());
        self.buf[HEADER_LEN + 4..HEADER_LEN + 6].copy_from_slice(&self.count.to_le_bytes());
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&self.buf[..12]),
            &self.buf[HEADER_LEN..self.len],
        );
        self.buf[12..16].copy_from_slice(&crc.to_le_bytes());
        (self.buf, self.len)
    }
}

/// The first 8 header bytes of a page frame, made once (no allocation per frame).
static PAGES_HEADER_START: std::sync::LazyLock<[u8; 8]> =
    std::sync::LazyLock::new(pages_header_start);

/// The first 8 header bytes of a page frame (magic, format, kind, flags), as the wire module
/// writes them.
fn pages_header_start() -> [u8; 8] {
    let empty = seal(FrameKind::Pages as u8, &[]);
    let mut head = [0u8; 8];
    head.copy_from_slice(&empty[..8]);
    head
}

/// Whether a page is all zeros (word by word: a data page usually differs in its first word).
fn is_zero(page: &[u8]) -> bool {
    let (words, rest) = page.as_chunks::<8>();
    words.iter().all(|w| u64::from_ne_bytes(*w) == 0) && rest.iter().all(|&b| b == 0)
}

/// Adds the page at `gpa` to a frame sent in place, as [`FrameBuf::push_page`] adds a copy:
/// `check` reads it where it lies (`None`: all zeros, else its crc32c), then `action` says
/// what it is to be (given whether it is all zeros). A data page's entry carries the crc32c
/// taken at this check, which the target compares with what it received.
fn push_in_place<E>(
    f: &mut PageDataFrame,
    gpa: u64,
    check: impl FnOnce() -> Result<Option<u32>, E>,
    action: impl FnOnce(bool) -> PageAction,
) -> Result<PageAction, E> {
    let crc = check()?;
    let what = action(crc.is_none());
    match (what, crc) {
        (PageAction::Data, Some(crc)) => f.push_data(gpa, crc),
        // The zero tracker sends a page as data only when it is not zero.
        (PageAction::Data, None) => f.push_data(gpa, crc32c::crc32c(&[0u8; PAGE])),
        (PageAction::Zero, _) => f.push_zero(gpa),
        (PageAction::Skip, _) => {}
    }
    Ok(what)
}

/// The page frame being built for a data stream: a copy of each page in a `Pages` frame, or
/// (plain TCP, protocol 5, a VM that offers its memory) a `PageData` frame whose pages are
/// written to the socket from guest memory in place, each with its own crc32c in the head.
enum Batch {
    Copy(FrameBuf),
    InPlace(PageDataFrame),
}

impl Batch {
    fn is_empty(&self) -> bool {
        match self {
            Batch::Copy(f) => f.is_empty(),
            Batch::InPlace(f) => f.is_empty(),
        }
    }

    fn is_full(&self) -> bool {
        match self {
            Batch::Copy(f) => f.is_full(),
            Batch::InPlace(f) => f.is_full(),
        }
    }

    fn pages(&self) -> usize {
        match self {
            Batch::Copy(f) => f.pages(),
            Batch::InPlace(f) => f.len(),
        }
    }
}

/// A sealed page frame on its way to a data stream's queue.
enum Outgoing {
    /// The first `len` bytes of a buffer.
    Bytes(Vec<u8>, usize),
    /// A `PageData` frame's head and its data pages' guest addresses.
    InPlace(Vec<u8>, Vec<u64>),
}

impl Outgoing {
    fn len(&self) -> usize {
        match self {
            Outgoing::Bytes(_, len) => *len,
            Outgoing::InPlace(head, pages) => PageDataFrame::wire_len(head, pages),
        }
    }
}

/// One data stream: its socket, written by the copy loop without blocking, and the page frame
/// being built for it.
struct DataStream {
    out: DataSender,
    batch: Batch,
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
    control: Option<ConnWriter>,
    control_rx: Option<ChanRx<Result<Frame, ReadFrameError>>>,
    data: Vec<DataStream>,
    /// Page frame buffers wholly written, for the next frames; other written frames land here
    /// too and are dropped by [`Run::recycle`].
    spares: Vec<Vec<u8>>,
    /// Buffers the last writes finished with.
    written: Vec<Vec<u8>>,
    bucket: Option<TokenBucket>,
    /// Guest memory the data streams send `PageData` frames from (plain TCP, protocol 5, and a
    /// VM that offers it); `None`: pages are copied into `Pages` frames.
    guest: Option<Arc<dyn GuestPages>>,
    zeros: ZeroTracker,
    bytes_sent: u64,
    zero_skipped: u64,
    round_remaining: u64,
    /// Time spent on runs of pages that were all zero and skipped: taken out of the round's
    /// time for the bandwidth estimate, since the final round carries dirty (data) pages.
    zero_scan: Duration,
    // ── post-copy: what opening the push stream after the switch needs ──
    tls: Option<&'a TlsClient>,
    target: Option<(SocketAddr, Option<tern_pki::Identity>, u64)>,
}

/// Migrates `source` to the target listening at `to`.
///
/// On success the VM runs on the target and `source` is left paused (the caller tears it
/// down). On failure before commit the source runs again (if it was paused, its storage is
/// taken back first and it is resumed) and the target has been told to discard; the returned
/// report says what happened. If the storage cannot be taken back the source stays paused and
/// the error says so.
pub fn migrate<S: MigrationSource + ?Sized>(
    source: &mut S,
    to: impl ToSocketAddrs,
    opts: &MigrateOptions,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrationFailure> {
    migrate_with_tls(source, to, opts, None, cancel, progress)
}

/// [`migrate`], over mutual TLS when `tls` is given: every stream is its own TLS connection, the
/// target must present a `host` certificate of our CA carrying `tls.target_name`, and every data
/// stream must reach the same certificate as the control stream (see [`crate::tcp::transport`]).
pub fn migrate_with_tls<S: MigrationSource + ?Sized>(
    source: &mut S,
    to: impl ToSocketAddrs,
    opts: &MigrateOptions,
    tls: Option<&TlsClient>,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrationFailure> {
    let start = Instant::now();
    let layout = source.describe().layout;
    let mut run = Run {
        machine: Sender::new(postcopy::pre_copy_convergence(
            &opts.convergence,
            opts.post_copy_after,
        ))
        .with_versions(offered_versions(opts)),
        bucket: opts
            .convergence
            .max_bandwidth
            .map(|r| TokenBucket::new(r, (r / 20).max(1 << 20), Duration::ZERO)),
        source,
        opts,
        cancel,
        progress,
        start,
        guest: None,
        zeros: ZeroTracker::new(layout.total_pages()),
        layout,
        control: None,
        control_rx: None,
        data: Vec::new(),
        spares: Vec::new(),
        written: Vec::new(),
        bytes_sent: 0,
        zero_skipped: 0,
        round_remaining: 0,
        zero_scan: Duration::ZERO,
        tls,
        target: None,
    };
    let result = run.execute(to, tls);
    run.finish(result)
}

impl<S: MigrationSource + ?Sized> Run<'_, S> {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn execute(
        &mut self,
        to: impl ToSocketAddrs,
        tls: Option<&TlsClient>,
    ) -> Result<Duration, MigrateError> {
        check_options(self.opts.streams, &self.opts.convergence)
            .map_err(|e| MigrateError::Options(e.to_string()))?;
        self.check_post_copy_options()?;
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
        self.handshake(addr, tls)?;
        self.machine.accepted(self.now())?;
        self.source
            .start_dirty_log()
            .map_err(|e| MigrateError::Source("start_dirty_log", e))?;
        self.machine.dirty_log_armed()?;

        // Round 0: every page but those the VM side knows to be zero.
        let known_zero: Vec<_> = (0..self.layout.regions().len())
            .map(|r| self.source.known_zero(r))
            .collect();
        let (mut set, skipped) = pages::round_zero(&self.layout, &known_zero);
        self.zero_skipped += skipped;
        self.machine.pages(0, skipped);
        let mut post_copy = false;
        loop {
            let (t0, scan0) = (Instant::now(), self.zero_scan);
            let before = self.bytes_sent;
            self.round_remaining = set.bytes();
            self.send_pages(&set)?;
            // Round barrier: the target acknowledges once it applied every page of the round,
            // so the time measured is end to end and no backlog is left for the pause.
            let round = self.machine.round();
            for i in 0..self.data.len() {
                self.flush_batch(i)?;
                self.push_frame(i, Frame::RoundEnd { round }.encode())?;
            }
            self.flush_all()?;
            self.machine.round_end_sent()?;
            self.wait_round_ack()?;
            let busy = t0.elapsed().saturating_sub(self.zero_scan - scan0);
            self.machine.sent(self.bytes_sent - before, busy)?;
            // The throttle was lifted before the switch-over: the guest runs free for the lead
            // (`throttle_release_lead`, one throttle slice by default) before the dirty log is
            // read.
            if let Some(at) = self.machine.sync_not_before() {
                let wait = at.saturating_sub(self.now());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
            }
            set = self.fetch_dirty()?;
            // Post-copy hook: after N rounds the rest is owed, whatever pre-copy would decide.
            if let Some(n) = self.opts.post_copy_after
                && postcopy::switch_due(n, self.machine.round())
            {
                post_copy = true;
                break;
            }
            let decision = self.machine.synced(self.now(), set.bytes())?;
            self.report_progress(true);
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
        self.machine.paused(self.now())?;
        let since = self.fetch_dirty()?;
        self.machine
            .pause_step(PauseStep::DirtyLog, self.now(), 0)?;
        let set = pages::stop_and_copy(set, &since);
        // Post-copy: the final set is owed, not sent during the pause.
        let (set, owed) = if post_copy {
            (pages::PageSet::empty(set.universe()), Some(set))
        } else {
            (set, None)
        };
        let (t0, scan0) = (Instant::now(), self.zero_scan);
        let before = self.bytes_sent;
        self.round_remaining = set.bytes();
        self.send_pages(&set)?;
        for i in 0..self.data.len() {
            self.flush_batch(i)?;
            let (frames, pages) = (self.data[i].frames, self.data[i].pages);
            self.push_frame(i, Frame::DataEnd { frames, pages }.encode())?;
        }
        self.flush_all()?;
        let busy = t0.elapsed().saturating_sub(self.zero_scan - scan0);
        self.machine.sent(self.bytes_sent - before, busy)?;
        let now = self.now();
        self.machine
            .pause_step(PauseStep::FinalPages, now, self.bytes_sent - before)?;
        let (version, bytes) = self
            .source
            .save_state()
            .map_err(|e| MigrateError::Source("save_state", e))?;
        self.machine
            .pause_step(PauseStep::SaveState, self.now(), 0)?;
        self.check_cancel_and_target()?;
        let step = self.machine.state_saved()?;
        self.storage(step)?;
        self.machine.storage_released()?;
        self.machine
            .pause_step(PauseStep::ReleaseStorage, self.now(), 0)?;
        let before = self.bytes_sent;
        self.write_control(&Frame::State { version, bytes })?;
        if self.opts.verify_memory {
            let layout = self.layout.clone();
            // Post-copy checks owed pages one by one as they arrive: one checksum per page.
            let chunk = if owed.is_some() {
                PAGE_SIZE
            } else {
                VERIFY_CHUNK_BYTES
            };
            let digest = MemoryDigest::of_memory(&layout, chunk, |gpa, buf| {
                self.source.read_pages(gpa, buf)
            })
            .map_err(|e| MigrateError::Source("read_pages", e))?;
            self.write_control(&Frame::Verify(digest))?;
        }
        self.report_progress(true);
        // The last chance to cancel: after this frame the target may run the VM.
        self.check_cancel_and_target()?;
        // Timed before the commit goes out: the target's steps start when it reads it, so they
        // fall inside the window from here to the answer even if this thread is preempted.
        self.machine
            .pause_step(PauseStep::StateSent, self.now(), self.bytes_sent - before)?;
        if let Some(owed) = &owed {
            let owed = postcopy::owed_runs(owed);
            if owed.len() > MAX_OWED_RUNS {
                return Err(MigrateError::Options(format!(
                    "post-copy: {} runs of owed pages, more than the {MAX_OWED_RUNS} a frame carries",
                    owed.len()
                )));
            }
            self.machine.post_copy_switched()?;
            self.write_control(&Frame::PostCopy { owed })?;
        }
        self.write_control(&Frame::Commit)?;
        self.machine.commit_sent()?;
        self.report_progress(true);

        let rx = self.control_rx.as_ref().expect("control reader runs");
        match rx.recv_timeout(self.opts.ack_timeout) {
            Ok(Ok(frame)) => match self.machine.heard(self.now(), frame)? {
                Heard::Running(downtime) => match owed {
                    Some(owed) => self.post_copy(owed).map(|()| downtime),
                    None => Ok(downtime),
                },
                other => Err(MigrateError::Protocol(format!(
                    "{other:?} instead of running"
                ))),
            },
            Ok(Err(e)) => Err(MigrateError::InDoubt(Some(e))),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                Err(MigrateError::InDoubt(None))
            }
        }
    }

    /// Connects the control stream (with `tls`: handshake and the target's certificate checked
    /// first), says hello, hands the answer to the machine, then opens and joins the data streams
    /// (non-blocking from then on: the copy loop writes them).
    fn handshake(&mut self, addr: SocketAddr, tls: Option<&TlsClient>) -> Result<(), MigrateError> {
        let connect = |addr: &SocketAddr, expect| {
            let (s, id) = transport::connect(addr, tls, expect, self.opts.connect_timeout)
                .map_err(|source| MigrateError::Connect {
                    addr: addr.to_string(),
                    source,
                })?;
            let _ = s.tcp().set_write_timeout(Some(self.opts.io_timeout));
            Ok::<_, MigrateError>((s, id))
        };
        let (control, target_id) = connect(&addr, None)?;
        let (mut control, mut control_writer) =
            control.split().map_err(MigrateError::Connection)?;
        let session = session_id();
        self.target = Some((addr, target_id.clone(), session));
        let hello = Frame::Hello(Hello {
            min_version: offered_versions(self.opts).0,
            max_version: offered_versions(self.opts).1,
            session,
            streams: self.opts.streams,
            config: self.source.describe(),
        });
        let bytes = hello.encode();
        control_writer
            .write_all(&bytes)
            .map_err(MigrateError::Connection)?;
        self.bytes_sent += bytes.len() as u64;
        self.control = Some(control_writer);
        // Control reader: every frame from the target ends up in this channel.
        let (tx, rx) = mpsc::sync_channel(4);
        thread::Builder::new()
            .name("migrate-ctl-rx".into())
            .spawn(move || {
                crate::thread_start::run();
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
        let now = self.now();
        let version = match self.machine.heard(now, answer)? {
            Heard::Welcomed(v) => v,
            _ => 0,
        };
        // Pages straight from guest memory: plain TCP only (TLS encrypts a copy anyway), with a
        // target that reads `PageData` frames, and a VM that offers its memory.
        self.guest = match tls {
            None if self.opts.pages_in_place && version >= PAGE_DATA_PROTOCOL_VERSION => {
                self.source.guest_pages()
            }
            _ => None,
        };

        for i in 0..self.opts.streams {
            let (mut s, _) = connect(&addr, target_id.as_ref())?;
            let join = Frame::Join { session, stream: i }.encode();
            s.write_all(&join).map_err(MigrateError::Connection)?;
            self.bytes_sent += join.len() as u64;
            let mut out = DataSender::new(s).map_err(MigrateError::Connection)?;
            if let Some(g) = &self.guest
                && !out.send_in_place(g.clone())
            {
                return Err(MigrateError::Protocol(
                    "a data stream that cannot send pages in place on a plain TCP link".into(),
                ));
            }
            let batch = self.new_frame();
            self.data.push(DataStream {
                out,
                batch,
                frames: 0,
                pages: 0,
            });
        }
        Ok(())
    }

    // ── post-copy ──

    /// Refuses post-copy options that cannot work, before anything is sent.
    fn check_post_copy_options(&self) -> Result<(), MigrateError> {
        let Some(n) = self.opts.post_copy_after else {
            return Ok(());
        };
        let bad = |m: String| Err(MigrateError::Options(m));
        if let Err(e) = postcopy::check_after_rounds(n) {
            return bad(e.to_string());
        }
        if self.opts.streams >= MAX_STREAMS {
            return bad(format!(
                "post-copy needs a stream of its own: at most {} data streams, not {}",
                MAX_STREAMS - 1,
                self.opts.streams
            ));
        }
        let (min, max) = offered_versions(self.opts);
        if min > max {
            return bad(format!(
                "post-copy needs protocol {POST_COPY_PROTOCOL_VERSION}, but only {}..={max} is offered",
                self.opts.protocol_versions.0
            ));
        }
        if self.opts.verify_memory && self.layout.total_pages() > MAX_VERIFY_CHUNKS as u64 {
            return bad(format!(
                "--verify-memory with post-copy checks every page and covers at most {} GiB",
                (MAX_VERIFY_CHUNKS as u64 * PAGE_SIZE) >> 30
            ));
        }
        Ok(())
    }

    /// The post-copy phase: opens the push stream, then serves the owed pages until the target
    /// placed every one. The source stays paused whatever happens.
    fn post_copy(&mut self, owed: pages::PageSet) -> Result<(), MigrateError> {
        let (addr, id, session) = self.target.clone().expect("connected");
        let conn = transport::connect(&addr, self.tls, id.as_ref(), self.opts.connect_timeout)
            .and_then(|(c, _)| {
                crate::tcp::postcopy::write_timeout(c.tcp(), self.opts.io_timeout);
                crate::tcp::postcopy::join_push(c, session, self.opts.streams)
            });
        let push = match conn {
            Ok(c) => c,
            Err(e) => {
                let err = PostCopyError::Link(format!("opening the push stream: {e}"));
                self.machine.post_copy_ended(false, Default::default());
                return Err(MigrateError::PostCopy(err));
            }
        };
        let layout = self.layout.clone();
        let link = SourceLink {
            control: self.control.as_mut().expect("connected"),
            control_rx: self.control_rx.as_ref().expect("control reader runs"),
            push,
            max_bandwidth: self.opts.convergence.max_bandwidth,
            answer_timeout: self.opts.ack_timeout,
            bytes_sent: &mut self.bytes_sent,
        };
        match serve_source(self.source, &layout, owed, link) {
            Ok(figures) => {
                self.machine.post_copy_ended(true, figures);
                Ok(())
            }
            Err((e, figures)) => {
                self.machine.post_copy_ended(false, figures);
                Err(MigrateError::PostCopy(e))
            }
        }
    }

    fn push_frame(&mut self, i: usize, bytes: Vec<u8>) -> Result<(), MigrateError> {
        let len = bytes.len();
        self.push_out(i, Outgoing::Bytes(bytes, len))
    }

    /// Queues one frame on data stream `i` within the bandwidth cap, writes what the sockets
    /// take now, and waits while stream `i` holds more than [`STREAM_QUEUE_MAX`] unwritten.
    fn push_out(&mut self, i: usize, frame: Outgoing) -> Result<(), MigrateError> {
        let len = frame.len();
        if let Some(bucket) = &mut self.bucket {
            let wait = bucket.take(len as u64, self.start.elapsed());
            if !wait.is_zero() {
                thread::sleep(wait);
            }
        }
        let out = &mut self.data[i].out;
        match frame {
            Outgoing::Bytes(buf, len) => out.push(buf, len, &mut self.written),
            Outgoing::InPlace(head, pages) => out.push_in_place(head, pages),
        }
        .map_err(MigrateError::Connection)?;
        self.bytes_sent += len as u64;
        self.write_until(|data| data[i].out.queued() <= STREAM_QUEUE_MAX)
    }

    /// Writes the data streams until `done` holds, waiting for their sockets when they are full,
    /// never past a cancel; a stream that takes nothing for the I/O timeout fails the migration.
    fn write_until(&mut self, done: impl Fn(&[DataStream]) -> bool) -> Result<(), MigrateError> {
        let mut last_progress = Instant::now();
        let mut waited = false;
        loop {
            let mut wrote = 0;
            for d in &mut self.data {
                if d.out.pending() {
                    wrote += d
                        .out
                        .drain(&mut self.written)
                        .map_err(MigrateError::Connection)?;
                }
            }
            self.recycle();
            if done(&self.data) {
                return Ok(());
            }
            if wrote > 0 {
                last_progress = Instant::now();
            } else if last_progress.elapsed() >= self.opts.io_timeout {
                return Err(MigrateError::Connection(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no data stream took a byte for {:?}", self.opts.io_timeout),
                )));
            }
            if self.cancel.is_cancelled() && self.machine.cancellable() {
                return Err(MigrateError::Cancelled);
            }
            if waited && wrote == 0 {
                // The sockets were reported writable (or the wait ran out) and still took
                // nothing: under host-wide TCP memory pressure a write can fail with EAGAIN while
                // poll says POLLOUT. Pause instead of spinning on it until the I/O timeout.
                thread::sleep(FRUITLESS_WAIT_PAUSE);
            }
            let left = self.opts.io_timeout.saturating_sub(last_progress.elapsed());
            wait_writable(self.data.iter().map(|d| &d.out), left.min(WRITABLE_WAIT))
                .map_err(MigrateError::Connection)?;
            waited = true;
        }
    }

    /// Keeps the written page frame buffers for the next frames (up to [`SPARE_FRAMES`]).
    fn recycle(&mut self) {
        for buf in self.written.drain(..) {
            if buf.len() >= FULL_PAGE_FRAME && self.spares.len() < SPARE_FRAMES {
                self.spares.push(buf);
            }
        }
    }

    /// An empty page frame of the current round: in place when the streams send so, else in a
    /// spare buffer when there is one.
    fn new_frame(&mut self) -> Batch {
        let round = self.machine.round();
        match self.guest {
            Some(_) => Batch::InPlace(PageDataFrame::new(round)),
            None => Batch::Copy(FrameBuf::new(self.spares.pop(), round)),
        }
    }

    fn flush_batch(&mut self, i: usize) -> Result<(), MigrateError> {
        if self.data[i].batch.is_empty() {
            return Ok(());
        }
        let fresh = self.new_frame();
        let batch = std::mem::replace(&mut self.data[i].batch, fresh);
        self.data[i].frames += 1;
        self.data[i].pages += batch.pages() as u64;
        let frame = match batch {
            Batch::Copy(f) => {
                let (buf, len) = f.seal();
                Outgoing::Bytes(buf, len)
            }
            Batch::InPlace(f) => {
                let (head, pages) = f.seal();
                Outgoing::InPlace(head, pages)
            }
        };
        self.push_out(i, frame)
    }

    /// Sends every pending batch and waits until every stream's socket took all it was given.
    fn flush_all(&mut self) -> Result<(), MigrateError> {
        for i in 0..self.data.len() {
            self.flush_batch(i)?;
        }
        self.write_until(|data| data.iter().all(|d| !d.out.pending()))
    }

    /// Waits for the target's acknowledgement of the round whose end was sent, watching
    /// cancel and the I/O timeout.
    fn wait_round_ack(&mut self) -> Result<(), MigrateError> {
        let deadline = Instant::now() + self.opts.io_timeout;
        while let Some(round) = self.machine.awaiting_round() {
            let rx = self.control_rx.as_ref().expect("control reader runs");
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(Ok(frame)) => {
                    let now = self.now();
                    self.machine.heard(now, frame)?;
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
        Ok(())
    }

    fn check_cancel_and_target(&mut self) -> Result<(), MigrateError> {
        if self.cancel.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        if let Some(rx) = &self.control_rx {
            match rx.try_recv() {
                Ok(Ok(frame)) => {
                    let now = self.now();
                    self.machine.heard(now, frame)?;
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

    /// Sends the pages of `set`, in the runs and on the streams [`pages::runs`] gives; zero
    /// pages as [`ZeroTracker`] says.
    fn send_pages(&mut self, set: &PageSet) -> Result<(), MigrateError> {
        let mut batches = 0u32;
        let (mut data, mut zero) = (0u64, 0u64);
        let layout = self.layout.clone();
        let guest = self.guest.clone();
        for run in pages::runs(&layout, set, self.data.len()) {
            let n = run.pages as usize;
            let run_start = Instant::now();
            let mut pushed = false;
            let stream = run.stream;
            for k in 0..n {
                let gpa = run.gpa + k as u64 * PAGE_SIZE;
                let page = run.first + k as u64;
                let (source, zeros) = (&mut *self.source, &mut self.zeros);
                let action = match &mut self.data[stream].batch {
                    Batch::InPlace(f) => {
                        let Some(guest) = &guest else {
                            return Err(MigrateError::Protocol(
                                "a page frame in place without guest memory".into(),
                            ));
                        };
                        push_in_place(
                            f,
                            gpa,
                            || {
                                source.before_send_in_place(gpa)?;
                                guest.check(gpa)
                            },
                            |is_zero| zeros.page(page, is_zero),
                        )
                        .map_err(|e| MigrateError::Source("reading a page in place", e))?
                    }
                    Batch::Copy(f) => f
                        .push_page(
                            gpa,
                            |buf| source.read_pages(gpa, buf),
                            |is_zero| zeros.page(page, is_zero),
                        )
                        .map_err(|e| MigrateError::Source("read_pages", e))?,
                };
                if action == PageAction::Data {
                    data += 1;
                } else {
                    zero += 1;
                }
                if action == PageAction::Skip {
                    self.zero_skipped += 1;
                    continue;
                }
                pushed = true;
                if self.data[stream].batch.is_full() {
                    self.flush_batch(stream)?;
                    batches += 1;
                    if batches.is_multiple_of(8) {
                        self.check_cancel_and_target()?;
                        self.report_progress(false);
                    }
                }
            }
            if !pushed {
                self.zero_scan += run_start.elapsed();
            }
            self.round_remaining = self.round_remaining.saturating_sub(n as u64 * PAGE_SIZE);
        }
        self.machine.pages(data, zero);
        self.check_cancel_and_target()
    }

    /// Fetches and clears every region's dirty bitmap.
    fn fetch_dirty(&mut self) -> Result<PageSet, MigrateError> {
        let bitmaps = (0..self.layout.regions().len())
            .map(|r| self.source.fetch_dirty(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| MigrateError::Source("fetch_dirty", e))?;
        Ok(PageSet::from_region_bitmaps(&self.layout, &bitmaps))
    }

    /// Carries out a storage step the machine ordered.
    fn storage(&mut self, step: StorageStep) -> Result<(), MigrateError> {
        match step {
            StorageStep::Release => self
                .source
                .release_storage()
                .map_err(|e| MigrateError::Source("release_storage", e)),
            StorageStep::Acquire => self
                .source
                .acquire_storage()
                .map_err(|e| MigrateError::Source("acquire_storage", e)),
        }
    }

    fn write_control(&mut self, frame: &Frame) -> Result<(), MigrateError> {
        let bytes = frame.encode();
        let c = self.control.as_mut().expect("connected");
        c.write_all(&bytes).map_err(MigrateError::Connection)?;
        self.bytes_sent += bytes.len() as u64;
        Ok(())
    }

    /// Gives the callback a progress snapshot when the machine says one is due.
    fn report_progress(&mut self, milestone: bool) {
        let now = self.now();
        if let Some(p) =
            self.machine
                .progress(now, milestone, self.bytes_sent, self.round_remaining)
        {
            (self.progress)(&p);
        }
    }

    /// Carries out the machine's clean-up for how the migration ended, and reports.
    fn finish(
        mut self,
        mut result: Result<Duration, MigrateError>,
    ) -> Result<MigrationReport, MigrationFailure> {
        let mut ending = match &result {
            Ok(_) => Ending::Completed,
            Err(e) => e.ending(),
        };
        // A broken stream may be the target giving up: its reason, if it comes in time, is
        // the better error.
        if ending.awaits_target_reason()
            && let Some(rx) = &self.control_rx
        {
            let grace = Instant::now() + TARGET_REASON_GRACE;
            while let Some(left) = grace.checked_duration_since(Instant::now()) {
                match rx.recv_timeout(left) {
                    Ok(Ok(frame @ (Frame::Failed { .. } | Frame::Abort { .. }))) => {
                        let now = self.start.elapsed();
                        if let Err(answer) = self.machine.heard(now, frame) {
                            result = Err(answer.into());
                            ending = Ending::Failed;
                        }
                        break;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => break,
                }
            }
        }
        let cleanup = self.machine.finish(ending);
        if cleanup.tell_target
            && let Some(c) = self.control.as_mut()
        {
            let reason = result
                .as_ref()
                .err()
                .map(|e| error_chain(e))
                .unwrap_or_default();
            let _ = c.write_all(&Frame::Abort { reason }.encode());
        }
        let mut cleanup_error = None;
        if cleanup.remove_throttle
            && let Err(e) = self.source.set_throttle(0.0)
        {
            cleanup_error.get_or_insert(MigrateError::Source("set_throttle", e));
        }
        let storage_ok = match cleanup.storage.map(|step| self.storage(step)) {
            Some(Err(e)) => {
                cleanup_error.get_or_insert(e);
                false
            }
            Some(Ok(())) | None => true,
        };
        if cleanup.resume
            && storage_ok
            && let Err(e) = self.source.resume()
        {
            cleanup_error.get_or_insert(MigrateError::Source("resume", e));
        }
        let report_at = self.now();
        if cleanup.stop_dirty_log {
            let _ = self.source.stop_dirty_log();
        }
        // Close everything (the data streams also close when the run is dropped).
        if cleanup.close_streams {
            for d in &self.data {
                let _ = d.out.tcp().shutdown(Shutdown::Both);
            }
        }
        if let Some(c) = &self.control {
            let _ = c.shutdown();
        }
        let report = self
            .machine
            .report(report_at, self.now(), self.bytes_sent, self.zero_skipped);
        match result {
            Ok(_) => Ok(report),
            Err(e) => Err(MigrationFailure {
                error: Box::new(cleanup_error.unwrap_or(e)),
                report,
            }),
        }
    }
}

/// The session token data streams present in their join: random (from the kernel's generator),
/// and with TLS only ever sent encrypted, so a stream cannot join a session it did not see.
fn session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::io::Read;
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u64::from_le_bytes(b);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Region;
    use crate::wire::decode;

    fn layout() -> MemoryLayout {
        MemoryLayout::new(vec![Region {
            guest_addr: 0,
            size: 4 * MAX_PAGES_PER_FRAME as u64 * PAGE_SIZE,
        }])
        .unwrap()
    }

    /// Fills a page the way a VM read would: byte `k` of page `gpa` is `(gpa / 4096 + k) % 251
    /// + 1` (never zero), or all zeros when `zero`.
    fn fill(gpa: u64, zero: bool, buf: &mut [u8]) -> Result<(), VmError> {
        for (k, b) in buf.iter_mut().enumerate() {
            *b = if zero {
                0
            } else {
                ((gpa / PAGE_SIZE + k as u64) % 251 + 1) as u8
            };
        }
        Ok(())
    }

    fn page_of(gpa: u64) -> Vec<u8> {
        let mut p = vec![0; PAGE];
        fill(gpa, false, &mut p).unwrap();
        p
    }

    #[test]
    fn a_frame_built_in_place_decodes_to_its_pages_zero_markers_and_nothing_for_skipped_pages() {
        let mut f = FrameBuf::new(None, 7);
        assert!(f.is_empty());
        // page 0 data, 1 zero marker, 2 skipped, 3 data; the action sees whether it is zero.
        let plan = [
            (0u64, false, PageAction::Data),
            (1, true, PageAction::Zero),
            (2, true, PageAction::Skip),
            (3, false, PageAction::Data),
        ];
        for (p, zero, act) in plan {
            let got = f
                .push_page(
                    p * PAGE_SIZE,
                    |buf| fill(p * PAGE_SIZE, zero, buf),
                    |is_zero| {
                        assert_eq!(is_zero, zero, "page {p}");
                        act
                    },
                )
                .unwrap();
            assert_eq!(got, act);
        }
        assert_eq!(f.pages(), 3);
        let (buf, len) = f.seal();
        assert_eq!(len, HEADER_LEN + PAGES_PREFIX + 3 * 8 + 2 * PAGE);
        let (frame, used) = decode(&buf[..len], Some(&layout())).unwrap();
        assert_eq!(used, len);
        let Frame::Pages(batch) = frame else {
            panic!("not a page frame: {frame:?}");
        };
        assert_eq!(batch.round(), 7);
        let pages: Vec<(u64, Option<Vec<u8>>)> = batch
            .iter()
            .map(|(g, d)| (g, d.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(
            pages,
            vec![
                (0, Some(page_of(0))),
                (PAGE_SIZE, None),
                (3 * PAGE_SIZE, Some(page_of(3 * PAGE_SIZE))),
            ]
        );
    }

    #[test]
    fn a_reused_buffer_carries_nothing_of_its_previous_frame() {
        let mut f = FrameBuf::new(None, 1);
        for p in 0..MAX_PAGES_PER_FRAME as u64 {
            f.push_page(
                p * PAGE_SIZE,
                |b| fill(p * PAGE_SIZE, false, b),
                |_| PageAction::Data,
            )
            .unwrap();
        }
        assert!(f.is_full());
        let (buf, len) = f.seal();
        assert_eq!(len, FULL_PAGE_FRAME);
        // The same buffer again, one zero marker only: the old bytes past the frame stay,
        // but the frame's length and checksum cover just the new entry.
        let mut g = FrameBuf::new(Some(buf), 2);
        g.push_page(5 * PAGE_SIZE, |b| fill(0, true, b), |_| PageAction::Zero)
            .unwrap();
        let (buf, len) = g.seal();
        assert_eq!(len, HEADER_LEN + PAGES_PREFIX + 8);
        let (frame, _) = decode(&buf[..len], Some(&layout())).unwrap();
        let Frame::Pages(batch) = frame else {
            panic!("not a page frame");
        };
        assert_eq!(batch.round(), 2);
        assert_eq!(
            batch.iter().collect::<Vec<_>>(),
            vec![(5 * PAGE_SIZE, None)]
        );
    }

    #[test]
    fn a_failed_read_adds_no_page() {
        let mut f = FrameBuf::new(None, 0);
        let r = f.push_page(
            0,
            |_| Err::<(), _>(VmError::from("read failed".to_string())),
            |_| PageAction::Data,
        );
        assert!(r.is_err());
        assert!(f.is_empty());
    }

    #[test]
    fn a_frame_sent_in_place_carries_each_data_page_s_checksum_from_its_check() {
        let mut f = PageDataFrame::new(4);
        let plan = [
            (0u64, Some(0xdead_beef), PageAction::Data),
            (1, None, PageAction::Zero),
            (2, None, PageAction::Skip),
            (
                3,
                Some(crc32c::crc32c(&page_of(3 * PAGE_SIZE))),
                PageAction::Data,
            ),
        ];
        for (p, check, act) in plan {
            let got = push_in_place(
                &mut f,
                p * PAGE_SIZE,
                || Ok::<_, VmError>(check),
                |is_zero| {
                    assert_eq!(is_zero, check.is_none(), "page {p}");
                    act
                },
            )
            .unwrap();
            assert_eq!(got, act);
        }
        let failed = push_in_place(
            &mut f,
            9 * PAGE_SIZE,
            || Err(VmError::from("read failed".to_string())),
            |_| PageAction::Data,
        );
        assert!(failed.is_err());
        assert_eq!(f.len(), 3);
        let (mut bytes, data) = f.seal();
        assert_eq!(data, vec![0, 3 * PAGE_SIZE]);
        for &gpa in &data {
            bytes.extend_from_slice(&page_of(gpa));
        }
        let (frame, _) = decode(&bytes, Some(&layout())).unwrap();
        let Frame::Pages(batch) = frame else {
            panic!("not a page frame");
        };
        // Page 0's checksum was not its data's (as for a page rewritten after its check);
        // page 3's was.
        assert_eq!(batch.mismatched(), &[0]);
        assert_eq!(batch.len(), 3);
    }

    #[test]
    fn zero_check_finds_a_single_set_byte_anywhere() {
        let mut p = vec![0u8; PAGE];
        assert!(is_zero(&p));
        for at in [0, 7, 8, 2047, PAGE - 1] {
            p[at] = 1;
            assert!(!is_zero(&p), "byte {at}");
            p[at] = 0;
        }
    }

    #[test]
    fn a_write_timeout_is_named_as_a_stalled_target() {
        let stalled = MigrateError::Connection(std::io::ErrorKind::WouldBlock.into());
        assert!(
            stalled
                .to_string()
                .contains("took no data within the write timeout"),
            "{stalled}"
        );
        let reset = MigrateError::Connection(std::io::ErrorKind::ConnectionReset.into());
        assert_eq!(reset.to_string(), "Connection to the target failed");
    }
}

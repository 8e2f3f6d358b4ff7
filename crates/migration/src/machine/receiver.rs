//! The target side's state machine: which frame it accepts on which stream in which phase,
//! per-stream accounting, when a commit may proceed, and what a failure means for the source.
//! No I/O, no clock.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::{MemoryLayout, VmConfigDescription};
use crate::machine::pages::stream_of;
use crate::wire::{
    Frame, Hello, MIN_PROTOCOL_VERSION, MemoryDigest, PAGE_DATA_PROTOCOL_VERSION, PROTOCOL_VERSION,
    PageBatch, TIMINGS_PROTOCOL_VERSION, TargetTimings,
};

/// After a stream error, how long the shell listens for the source's Abort (a source that
/// gives up says why on the control stream, then closes everything).
pub const SOURCE_REASON_GRACE: Duration = Duration::from_millis(200);

/// Names a stream in events and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamName {
    /// The control stream.
    Control,
    /// Data stream `n`.
    Data(u16),
}

impl std::fmt::Display for StreamName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamName::Control => f.write_str("control"),
            StreamName::Data(n) => write!(f, "data {n}"),
        }
    }
}

/// What the shell does with a frame the receiver accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write (data) or zero (`None`) these pages.
    Apply(PageBatch),
    /// Every data stream ended this pre-copy round: acknowledge it on the control stream.
    AckRound(u32),
    /// Nothing to do; keep reading.
    Wait,
    /// The source aborted with this reason: discard (the source knows).
    Aborted(String),
    /// Pages the source sent while paused did not match their checksums: discard and tell
    /// the source (which runs on).
    ChecksumFailed(PageChecksumFailure),
}

/// When pages that did not match their checksum fail a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumStage {
    /// They were sent while the source was paused (after a data stream's last pre-copy round
    /// end): no later copy can come, and the guest could not have changed them.
    Paused,
    /// They were still suspect at the commit: no later copy came.
    Commit,
}

/// Pages of `PageData` frames whose data did not match their crc32c and that no later copy
/// replaced: the migration fails (before the commit is acknowledged, so the source runs on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{pages} page(s) did not match their checksum {}, the first at guest address {first:#x}",
    match stage {
        ChecksumStage::Paused => "in the pages sent while the source was paused",
        ChecksumStage::Commit => "and were not sent again before the commit",
    }
)]
pub struct PageChecksumFailure {
    /// How many pages.
    pub pages: u64,
    /// The lowest guest address among them.
    pub first: u64,
    /// When the failure was found.
    pub stage: ChecksumStage,
}

/// Why a commit cannot proceed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitRefused {
    /// Out of order: a protocol violation.
    #[error(transparent)]
    Violation(#[from] ProtocolViolation),
    /// Pages are still suspect.
    #[error(transparent)]
    Checksum(#[from] PageChecksumFailure),
}

/// What the target does once the source asked to commit and everything arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitWork {
    /// The VM state: format version and bytes.
    pub state: (u32, Vec<u8>),
    /// The source's memory digest, to compare before resuming (with `--verify-memory`).
    pub digest: Option<MemoryDigest>,
}

/// How an incoming migration failed, as the shell saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The source aborted, or closed every stream: it needs no reason.
    SourceGone,
    /// The target refused the handshake and said why already.
    Refused,
    /// Anything else (a violation, a stream error, verify, the VM side, cancel, idle).
    Other,
}

/// What the shell must do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cleanup {
    /// Drop everything received (false once the VM runs here: it stays).
    pub discard: bool,
    /// Send the source `Failed` with the reason.
    pub tell_source: bool,
}

/// Where the target is in a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverPhase {
    /// Waiting for the source's hello on the control stream.
    AwaitHello,
    /// Versions agree; the VM side is checking (or building for) the described VM.
    Preparing,
    /// Welcome sent: data streams join, pages, state and verify digest arrive.
    Receiving,
    /// Commit received: verifying, restoring, resuming.
    Committing,
    /// The VM runs here and "running" was sent. Terminal.
    Running,
    /// Refused, aborted or failed: everything received is discarded. Terminal.
    Discarded,
}

/// A frame or event the target does not accept now: the migration is discarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol violation in phase {phase:?}: {what}")]
pub struct ProtocolViolation {
    /// Phase at the time.
    pub phase: ReceiverPhase,
    /// What was wrong.
    pub what: Violation,
}

/// What a [`ProtocolViolation`] was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A frame or event out of sequence, on a stream that may not carry it, or with counts
    /// that do not add up.
    #[error("{0}")]
    Sequence(String),
    /// A page on a data stream other than the one its stripe travels on
    /// ([`crate::machine::pages::stream_of`]): every copy of a page must come on one stream,
    /// so that TCP keeps a later copy behind an earlier one (the readers place each stream's
    /// pages in arrival order, in parallel with the other streams).
    #[error(
        "page at guest address {gpa:#x} arrived on data stream {stream}, but its stripe travels on data stream {stripe_stream}"
    )]
    OffStripe {
        /// The page's guest address.
        gpa: u64,
        /// The data stream it arrived on.
        stream: u16,
        /// The data stream its stripe travels on.
        stripe_stream: u16,
    },
}

impl From<String> for Violation {
    fn from(what: String) -> Self {
        Violation::Sequence(what)
    }
}

impl From<&str> for Violation {
    fn from(what: &str) -> Self {
        Violation::Sequence(what.to_owned())
    }
}

/// Why the target refuses a handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No protocol version in common.
    #[error(
        "Protocol version mismatch: source speaks {source_min}..={source_max}, target {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"
    )]
    Version {
        /// Source's oldest version.
        source_min: u16,
        /// Source's newest version.
        source_max: u16,
    },
    /// The target cannot host the VM described.
    #[error("{0}")]
    Config(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct StreamCount {
    joined: bool,
    ended: bool,
    frames: u64,
    pages: u64,
    /// The pre-copy round whose end marker is expected next.
    next_round: u32,
}

/// Where a suspect page's mismatching copy arrived: its data stream and that stream's round
/// position (the round ends it had passed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SuspectAt {
    stream: u16,
    position: u32,
}

/// The target's state machine.
#[derive(Debug, Clone)]
pub struct Receiver {
    phase: ReceiverPhase,
    version: u16,
    session: u64,
    config: Option<VmConfigDescription>,
    streams: Vec<StreamCount>,
    state_received: bool,
    verify_received: bool,
    state: Option<(u32, Vec<u8>)>,
    digest: Option<MemoryDigest>,
    commit_requested: bool,
    /// Pages whose last copy did not match its checksum, by guest address: a later copy
    /// clears them, and any left fails the migration.
    suspects: BTreeMap<u64, SuspectAt>,
    /// Pages ever marked suspect (a later copy came for each, or the migration failed).
    mismatches: u64,
}

impl Default for Receiver {
    fn default() -> Self {
        Self::new()
    }
}

impl Receiver {
    /// A receiver waiting for a hello.
    pub fn new() -> Self {
        Self {
            phase: ReceiverPhase::AwaitHello,
            version: 0,
            session: 0,
            config: None,
            streams: Vec::new(),
            state_received: false,
            verify_received: false,
            state: None,
            digest: None,
            commit_requested: false,
            suspects: BTreeMap::new(),
            mismatches: 0,
        }
    }

    fn violation(&mut self, what: impl Into<Violation>) -> ProtocolViolation {
        let v = ProtocolViolation {
            phase: self.phase,
            what: what.into(),
        };
        self.phase = ReceiverPhase::Discarded;
        v
    }

    fn expect(&mut self, phase: ReceiverPhase, what: &str) -> Result<(), ProtocolViolation> {
        if self.phase == phase {
            Ok(())
        } else {
            Err(self.violation(format!("unexpected {what}")))
        }
    }

    /// Current phase.
    pub fn phase(&self) -> ReceiverPhase {
        self.phase
    }

    /// The agreed memory layout (from the welcome on).
    pub fn layout(&self) -> Option<&MemoryLayout> {
        match self.phase {
            ReceiverPhase::Receiving | ReceiverPhase::Committing | ReceiverPhase::Running => {
                self.config.as_ref().map(|c| &c.layout)
            }
            _ => None,
        }
    }

    /// Session number from the hello.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Number of data streams announced.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// A hello arrived. On success the VM side must now check `hello.config`; the returned
    /// version is the one to welcome with. A version refusal discards.
    pub fn hello(&mut self, hello: &Hello) -> Result<Result<u16, Refusal>, ProtocolViolation> {
        self.expect(ReceiverPhase::AwaitHello, "hello")?;
        let top = hello.max_version.min(PROTOCOL_VERSION);
        if top < hello.min_version.max(MIN_PROTOCOL_VERSION) {
            self.phase = ReceiverPhase::Discarded;
            return Ok(Err(Refusal::Version {
                source_min: hello.min_version,
                source_max: hello.max_version,
            }));
        }
        self.version = top;
        self.session = hello.session;
        self.config = Some(hello.config.clone());
        self.streams = vec![StreamCount::default(); usize::from(hello.streams)];
        self.phase = ReceiverPhase::Preparing;
        Ok(Ok(top))
    }

    /// The first frame on the control stream: it must be a hello ([`Receiver::hello`]).
    pub fn control_opened(
        &mut self,
        frame: Frame,
    ) -> Result<Result<u16, Refusal>, ProtocolViolation> {
        match frame {
            Frame::Hello(h) => self.hello(&h),
            other => Err(self.violation(format!("expected hello, got {:?}", other.kind()))),
        }
    }

    /// The VM described in the accepted hello (to check before welcoming).
    pub fn described(&self) -> Option<&VmConfigDescription> {
        self.config.as_ref()
    }

    /// The first frame on a new data stream: it must be a join ([`Receiver::join`]). Returns
    /// the stream's index.
    pub fn data_opened(&mut self, frame: Frame) -> Result<u16, ProtocolViolation> {
        match frame {
            Frame::Join { session, stream } => self.join(stream, session).map(|()| stream),
            other => Err(self.violation(format!("data stream opened with {:?}", other.kind()))),
        }
    }

    /// Whether the data streams may carry `PageData` frames: only at a negotiated version that
    /// defines the layout this build reads ([`PAGE_DATA_PROTOCOL_VERSION`]; protocol 4's
    /// frames had no page checksums). The readers refuse one otherwise, before reading it.
    pub fn accepts_page_data(&self) -> bool {
        self.version >= PAGE_DATA_PROTOCOL_VERSION
    }

    /// A frame arrived on `stream` after the handshake.
    pub fn frame(&mut self, stream: StreamName, frame: Frame) -> Result<Step, ProtocolViolation> {
        match (stream, frame) {
            (StreamName::Data(i), Frame::Pages(batch)) => {
                self.page_fence(i)?;
                self.on_stripe(i, batch.iter().map(|(gpa, _)| gpa))?;
                self.pages(i, batch.len())?;
                self.checked(i, batch.iter().map(|(gpa, _)| gpa), batch.mismatched());
                Ok(Step::Apply(batch))
            }
            (StreamName::Data(i), Frame::RoundEnd { round }) => {
                Ok(self.round_end(i, round)?.map_or(Step::Wait, Step::AckRound))
            }
            (StreamName::Data(i), Frame::DataEnd { frames, pages }) => {
                self.data_end(i, frames, pages)?;
                Ok(match self.paused_suspects(i) {
                    Some(failure) => {
                        self.phase = ReceiverPhase::Discarded;
                        Step::ChecksumFailed(failure)
                    }
                    None => Step::Wait,
                })
            }
            (StreamName::Control, Frame::State { version, bytes }) => {
                self.state(version, bytes).map(|()| Step::Wait)
            }
            (StreamName::Control, Frame::Verify(d)) => self.verify(d).map(|()| Step::Wait),
            (StreamName::Control, Frame::Commit)
                if !self.commit_requested && self.phase == ReceiverPhase::Receiving =>
            {
                // Data streams may still carry their last frames: commit once they ended.
                self.commit_requested = true;
                Ok(Step::Wait)
            }
            (_, Frame::Abort { reason }) => {
                self.phase = ReceiverPhase::Discarded;
                Ok(Step::Aborted(reason))
            }
            (stream, other) => Err(self.violation(format!(
                "unexpected {:?} frame on stream {stream}",
                other.kind()
            ))),
        }
    }

    /// A page frame arrived on `stream` whose pages (`gpas`, every entry) its reader already
    /// wrote into guest memory (a `PageData` frame read in place), `mismatched` of them not
    /// matching their checksums: the checks and counts of a `Pages` frame in
    /// [`Receiver::frame`], without the batch.
    pub fn placed_pages(
        &mut self,
        stream: StreamName,
        gpas: &[u64],
        mismatched: &[u64],
    ) -> Result<(), ProtocolViolation> {
        match stream {
            StreamName::Data(i) => {
                self.page_fence(i)?;
                self.on_stripe(i, gpas.iter().copied())?;
                self.pages(i, gpas.len())?;
                self.checked(i, gpas.iter().copied(), mismatched);
                Ok(())
            }
            StreamName::Control => {
                Err(self.violation(format!("unexpected Pages frame on stream {stream}")))
            }
        }
    }

    /// Checks that every page of a frame on data stream `stream` belongs there: page `p`
    /// (numbered over the agreed layout) travels only on data stream `(p / 128) mod N`
    /// ([`stream_of`]), in every round, so two copies of a page are always ordered by one TCP
    /// stream. A page on another stream could race an older or newer copy of itself on its own
    /// stream: refused with [`Violation::OffStripe`]. (Its reader may have placed it already;
    /// the refusal discards the migration before any commit.)
    fn on_stripe(
        &mut self,
        stream: u16,
        gpas: impl Iterator<Item = u64>,
    ) -> Result<(), ProtocolViolation> {
        let streams = self.streams.len();
        let Some(layout) = self.config.as_ref().map(|c| &c.layout) else {
            return Err(self.violation("pages before the memory layout was agreed"));
        };
        let off = gpas
            .map(|gpa| (gpa, layout.page_index(gpa).map(|p| stream_of(p, streams))))
            .find(|&(_, stripe)| stripe != Some(usize::from(stream)));
        match off {
            None => Ok(()),
            Some((gpa, None)) => Err(self.violation(format!(
                "page at guest address {gpa:#x} is outside the agreed memory layout"
            ))),
            Some((gpa, Some(stripe))) => Err(self.violation(Violation::OffStripe {
                gpa,
                stream,
                // Below the stream count, a u16.
                stripe_stream: u16::try_from(stripe).unwrap_or(u16::MAX),
            })),
        }
    }

    /// The pages `gpas` of a frame on data stream `stream` were written, `mismatched` of them
    /// with data that did not match their checksum: those become suspect (the guest may have
    /// rewritten them while the source's kernel copied them, and then they come again in a
    /// later round), every other page is a good copy and clears its suspicion.
    fn checked(&mut self, stream: u16, gpas: impl Iterator<Item = u64>, mismatched: &[u64]) {
        if !self.suspects.is_empty() {
            for gpa in gpas {
                self.suspects.remove(&gpa);
            }
        }
        let position = self
            .streams
            .get(usize::from(stream))
            .map_or(0, |s| s.next_round);
        for &gpa in mismatched {
            self.suspects.insert(gpa, SuspectAt { stream, position });
            self.mismatches += 1;
        }
    }

    /// Suspect pages of `stream` that came after its last pre-copy round end, once it ended:
    /// the source sent them while paused, so they were not torn by the guest, and nothing
    /// can replace them now.
    fn paused_suspects(&self, stream: u16) -> Option<PageChecksumFailure> {
        let last = self.streams.get(usize::from(stream))?.next_round;
        let at = SuspectAt {
            stream,
            position: last,
        };
        let mut found = self.suspects.iter().filter(|(_, s)| **s == at);
        let (&first, _) = found.next()?;
        Some(PageChecksumFailure {
            pages: 1 + found.count() as u64,
            first,
            stage: ChecksumStage::Paused,
        })
    }

    /// Pages whose data did not match their checksum so far (each came again, or is still
    /// suspect).
    pub fn checksum_mismatches(&self) -> u64 {
        self.mismatches
    }

    /// Pages still suspect: their last copy did not match its checksum.
    pub fn suspect_pages(&self) -> usize {
        self.suspects.len()
    }

    /// The source asked to commit and every data stream ended: time for [`Receiver::commit`].
    pub fn ready_to_commit(&self) -> bool {
        self.commit_requested && self.all_ended()
    }

    /// Whether a cancel on the target still counts: not once the source asked to commit.
    pub fn cancellable(&self) -> bool {
        !self.commit_requested
    }

    /// The VM side has checked the described VM: welcome (`Ok`) or refuse.
    pub fn prepared(
        &mut self,
        result: Result<(), String>,
    ) -> Result<Result<u16, Refusal>, ProtocolViolation> {
        self.expect(ReceiverPhase::Preparing, "preparation result")?;
        match result {
            Ok(()) => {
                self.phase = ReceiverPhase::Receiving;
                Ok(Ok(self.version))
            }
            Err(reason) => {
                self.phase = ReceiverPhase::Discarded;
                Ok(Err(Refusal::Config(reason)))
            }
        }
    }

    fn stream(&mut self, stream: u16) -> Result<&mut StreamCount, ProtocolViolation> {
        let i = usize::from(stream);
        if i >= self.streams.len() {
            return Err(self.violation(format!("stream {stream} was not announced")));
        }
        Ok(&mut self.streams[i])
    }

    /// A data stream announced itself.
    pub fn join(&mut self, stream: u16, session: u64) -> Result<(), ProtocolViolation> {
        self.expect(ReceiverPhase::Receiving, "stream join")?;
        if session != self.session {
            return Err(self.violation(format!("stream joined with foreign session {session:#x}")));
        }
        let s = self.stream(stream)?;
        if s.joined {
            return Err(self.violation(format!("stream {stream} joined twice")));
        }
        s.joined = true;
        Ok(())
    }

    /// Whether every announced data stream has joined.
    pub fn all_joined(&self) -> bool {
        self.streams.iter().all(|s| s.joined)
    }

    /// Whether every announced data stream has ended.
    pub fn all_ended(&self) -> bool {
        self.streams.iter().all(|s| s.ended)
    }

    /// A page frame with `pages` entries arrived on `stream` (addresses were checked by the
    /// decoder against [`Receiver::layout`]).
    pub fn pages(&mut self, stream: u16, pages: usize) -> Result<(), ProtocolViolation> {
        self.expect(ReceiverPhase::Receiving, "page frame")?;
        let s = self.stream(stream)?;
        if !s.joined || s.ended {
            let what = format!("pages on stream {stream} outside its join..end");
            return Err(self.violation(what));
        }
        s.frames += 1;
        s.pages += pages as u64;
        Ok(())
    }

    /// Checks that a page frame may arrive on `stream` now: a stream that ended rounds
    /// `0..k` carries round `k`'s pages (a frame's round field is not relied on: a source may
    /// fill a frame it started before the round's end), and they may only come once every
    /// stream ended round `k - 1` (the target acknowledged it). So no page arrives while an
    /// older copy of it may still be on its way on another stream: the data streams' readers
    /// place the pages of an acknowledged stream position straight into guest memory, in
    /// parallel (`tcp::recv`), and rely on this fence (the source sends round `k` only after
    /// `RoundAck(k - 1)`, the pages after the pause only after the last acknowledgement).
    pub fn page_fence(&mut self, stream: u16) -> Result<(), ProtocolViolation> {
        self.expect(ReceiverPhase::Receiving, "page frame")?;
        let round = self.stream(stream)?.next_round;
        if let Some(behind) = self.streams.iter().position(|s| s.next_round < round) {
            return Err(self.violation(format!(
                "pages of round {round} on stream {stream} before stream {behind} ended round {}",
                round - 1
            )));
        }
        Ok(())
    }

    /// Pre-copy rounds every data stream ended (and the target acknowledged): a page frame on
    /// a stream that ended at most this many rounds has no older copy in flight.
    pub fn acknowledged_rounds(&self) -> u32 {
        self.streams.iter().map(|s| s.next_round).min().unwrap_or(0)
    }

    /// Pre-copy round `round` ended on `stream`. Returns the round to acknowledge once every
    /// stream has ended it (rounds end in order 0, 1, 2, … on each stream).
    pub fn round_end(&mut self, stream: u16, round: u32) -> Result<Option<u32>, ProtocolViolation> {
        self.expect(ReceiverPhase::Receiving, "round end")?;
        let s = self.stream(stream)?;
        if !s.joined || s.ended {
            return Err(self.violation(format!(
                "round end on stream {stream} outside its join..end"
            )));
        }
        if round != s.next_round {
            let want = s.next_round;
            return Err(self.violation(format!(
                "stream {stream} ended round {round}, expected round {want}"
            )));
        }
        s.next_round += 1;
        let all = self.streams.iter().all(|s| s.next_round > round);
        Ok(all.then_some(round))
    }

    /// A data stream ended, claiming it sent `frames` frames with `pages` pages.
    pub fn data_end(
        &mut self,
        stream: u16,
        frames: u64,
        pages: u64,
    ) -> Result<(), ProtocolViolation> {
        self.expect(ReceiverPhase::Receiving, "data end")?;
        let s = self.stream(stream)?;
        if !s.joined || s.ended {
            return Err(self.violation(format!("stream {stream} ended twice or before joining")));
        }
        if (s.frames, s.pages) != (frames, pages) {
            let (got_f, got_p) = (s.frames, s.pages);
            return Err(self.violation(format!(
                "stream {stream} sent {frames} frames / {pages} pages but {got_f} / {got_p} arrived"
            )));
        }
        s.ended = true;
        Ok(())
    }

    /// The VM state arrived (format version and bytes).
    pub fn state(&mut self, version: u32, bytes: Vec<u8>) -> Result<(), ProtocolViolation> {
        self.expect(ReceiverPhase::Receiving, "state")?;
        if self.state_received {
            return Err(self.violation("state sent twice"));
        }
        self.state_received = true;
        self.state = Some((version, bytes));
        Ok(())
    }

    /// The memory digest arrived.
    pub fn verify(&mut self, digest: MemoryDigest) -> Result<(), ProtocolViolation> {
        self.expect(ReceiverPhase::Receiving, "verify digest")?;
        if self.verify_received {
            return Err(self.violation("verify digest sent twice"));
        }
        self.verify_received = true;
        self.digest = Some(digest);
        Ok(())
    }

    /// Commit: allowed only once every stream ended and the state is here, and when no page
    /// is still suspect (with post-copy, a suspect page among the `owed` runs — `(first page
    /// index, pages)`, ascending — is fetched again after the switch, so it does not count).
    /// Returns what the VM side must check and restore.
    pub fn commit(&mut self, owed: Option<&[(u64, u32)]>) -> Result<CommitWork, CommitRefused> {
        self.expect(ReceiverPhase::Receiving, "commit")?;
        if let Some(i) = self.streams.iter().position(|s| !s.ended) {
            return Err(self
                .violation(format!("commit before data stream {i} ended"))
                .into());
        }
        if self.state.is_none() {
            return Err(self.violation("commit before the VM state").into());
        }
        let layout = self.config.as_ref().map(|c| &c.layout);
        let is_owed = |gpa: u64| {
            let (Some(owed), Some(page)) = (owed, layout.and_then(|l| l.page_index(gpa))) else {
                return false;
            };
            let i = owed.partition_point(|(first, _)| *first <= page);
            i > 0 && page < owed[i - 1].0 + u64::from(owed[i - 1].1)
        };
        let mut left = self.suspects.keys().copied().filter(|g| !is_owed(*g));
        if let Some(first) = left.next() {
            let pages = 1 + left.count() as u64;
            self.phase = ReceiverPhase::Discarded;
            return Err(PageChecksumFailure {
                pages,
                first,
                stage: ChecksumStage::Commit,
            }
            .into());
        }
        let Some(state) = self.state.take() else {
            return Err(self.violation("commit before the VM state").into());
        };
        self.phase = ReceiverPhase::Committing;
        Ok(CommitWork {
            state,
            digest: self.digest.take(),
        })
    }

    /// The VM side finished committing: `true` if it runs here now.
    pub fn committed(&mut self, running: bool) -> Result<(), ProtocolViolation> {
        self.expect(ReceiverPhase::Committing, "commit result")?;
        self.phase = if running {
            ReceiverPhase::Running
        } else {
            ReceiverPhase::Discarded
        };
        Ok(())
    }

    /// The answer once the VM runs here: `Running`, with the target's timings from the protocol
    /// version that carries them on (an older source reads only the empty frame).
    /// From protocol 5 on it also carries the pages sent again after a checksum mismatch.
    pub fn running_frame(&self, timings: TargetTimings) -> Frame {
        let timings = TargetTimings {
            pages_resent_after_checksum_mismatch: self
                .accepts_page_data()
                .then_some(self.mismatches),
            ..timings
        };
        Frame::Running {
            timings: (self.version >= TIMINGS_PROTOCOL_VERSION).then_some(timings),
        }
    }

    /// Abort, a stream error or a lost connection. Returns true if the VM side must discard
    /// (false once running: the VM stays).
    pub fn abort(&mut self) -> bool {
        if self.phase == ReceiverPhase::Running {
            return false;
        }
        self.phase = ReceiverPhase::Discarded;
        true
    }

    /// The incoming migration failed: discard unless running, and tell the source why unless
    /// it left by itself or was refused (it has the reason already).
    pub fn failed(&mut self, failure: Failure) -> Cleanup {
        Cleanup {
            discard: self.abort(),
            tell_source: failure == Failure::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CpuidDigest, PAGE_SIZE, Region};

    fn hello(min: u16, max: u16, streams: u16) -> Hello {
        Hello {
            min_version: min,
            max_version: max,
            session: 7,
            streams,
            config: VmConfigDescription {
                // Two stripes: with two data streams, pages 0..128 travel on stream 0 and
                // 128..256 on stream 1.
                layout: MemoryLayout::new(vec![Region {
                    guest_addr: 0,
                    size: 256 * PAGE_SIZE,
                }])
                .unwrap(),
                vcpus: 1,
                cpuid: CpuidDigest(1),
                devices: vec![],
            },
        }
    }

    fn digest() -> MemoryDigest {
        MemoryDigest {
            chunk_bytes: 1 << 20,
            crcs: vec![9],
        }
    }

    fn receiving(streams: u16) -> Receiver {
        let mut r = Receiver::new();
        assert_eq!(r.hello(&hello(1, 1, streams)).unwrap(), Ok(1));
        assert_eq!(r.layout(), None, "no layout before welcome");
        assert_eq!(r.prepared(Ok(())).unwrap(), Ok(1));
        assert!(r.layout().is_some());
        r
    }

    #[test]
    fn full_sequence_reaches_running() {
        let mut r = receiving(2);
        r.join(0, 7).unwrap();
        assert!(!r.all_joined());
        r.join(1, 7).unwrap();
        r.pages(0, 3).unwrap();
        assert_eq!(r.round_end(0, 0).unwrap(), None);
        r.pages(1, 1).unwrap();
        assert_eq!(
            r.round_end(1, 0).unwrap(),
            Some(0),
            "acked once both streams ended it"
        );
        r.pages(0, 2).unwrap();
        r.data_end(0, 2, 5).unwrap();
        r.data_end(1, 1, 1).unwrap();
        r.state(3, vec![1, 2]).unwrap();
        r.verify(digest()).unwrap();
        let work = r.commit(None).unwrap();
        assert_eq!(work.state, (3, vec![1, 2]));
        assert_eq!(work.digest, Some(digest()));
        r.committed(true).unwrap();
        assert_eq!(r.phase(), ReceiverPhase::Running);
        assert!(!r.abort(), "a running VM is not discarded");
    }

    #[test]
    fn version_without_overlap_is_refused() {
        let mut r = Receiver::new();
        let got = r.hello(&hello(7, 9, 1)).unwrap().unwrap_err();
        assert_eq!(
            got.to_string(),
            "Protocol version mismatch: source speaks 7..=9, target 1..=5"
        );
        assert_eq!(r.phase(), ReceiverPhase::Discarded);
        // A newer source that still speaks our version is accepted at ours.
        let mut r = Receiver::new();
        assert_eq!(r.hello(&hello(1, 6, 1)).unwrap(), Ok(5));
    }

    #[test]
    fn running_carries_the_timings_only_to_a_source_that_reads_them() {
        let t = TargetTimings {
            restore_us: 900,
            ..Default::default()
        };
        let mut old = Receiver::new();
        assert_eq!(old.hello(&hello(1, 1, 1)).unwrap(), Ok(1));
        assert_eq!(old.running_frame(t), Frame::Running { timings: None });
        let mut new = Receiver::new();
        assert_eq!(new.hello(&hello(1, 2, 1)).unwrap(), Ok(2));
        assert_eq!(new.running_frame(t), Frame::Running { timings: Some(t) });
    }

    fn receiving_at(version: u16, streams: u16) -> Receiver {
        let mut r = Receiver::new();
        assert_eq!(r.hello(&hello(1, version, streams)).unwrap(), Ok(version));
        assert_eq!(r.prepared(Ok(())).unwrap(), Ok(version));
        for i in 0..streams {
            r.join(i, 7).unwrap();
        }
        r
    }

    const P: u64 = PAGE_SIZE;

    /// A `Pages` frame (covered by its checksum whole) with data pages at `data` and zero
    /// pages at `zero`.
    fn copied(data: &[u64], zero: &[u64]) -> Frame {
        let mut b = PageBatch::new(0);
        for &gpa in data {
            b.push_data(gpa, &[1; 4096]);
        }
        for &gpa in zero {
            b.push_zero(gpa);
        }
        Frame::Pages(b)
    }

    fn ack_round(r: &mut Receiver, round: u32) {
        assert_eq!(r.round_end(0, round).unwrap(), Some(round));
    }

    #[test]
    fn page_data_is_accepted_only_at_the_version_that_gives_each_page_a_checksum() {
        assert!(!receiving_at(4, 1).accepts_page_data());
        assert!(!receiving_at(3, 1).accepts_page_data());
        assert!(receiving_at(5, 1).accepts_page_data());
    }

    #[test]
    fn a_page_that_fails_its_checksum_in_a_live_round_is_suspect_until_a_later_copy() {
        let mut r = receiving_at(5, 1);
        // Round 0: pages 1 and 2 arrive in place, page 2 does not match its checksum.
        r.placed_pages(StreamName::Data(0), &[P, 2 * P], &[2 * P])
            .unwrap();
        assert_eq!(r.suspect_pages(), 1);
        ack_round(&mut r, 0);
        // Round 1: another page only; page 2 stays suspect.
        r.placed_pages(StreamName::Data(0), &[3 * P], &[]).unwrap();
        assert_eq!(r.suspect_pages(), 1);
        ack_round(&mut r, 1);
        // Round 2: page 2 again, matching: cleared.
        r.placed_pages(StreamName::Data(0), &[2 * P], &[]).unwrap();
        assert_eq!(r.suspect_pages(), 0);
        ack_round(&mut r, 2);
        assert_eq!(
            r.frame(
                StreamName::Data(0),
                Frame::DataEnd {
                    frames: 3,
                    pages: 4
                }
            ),
            Ok(Step::Wait)
        );
        r.state(1, vec![]).unwrap();
        r.commit(None).unwrap();
        assert_eq!(r.checksum_mismatches(), 1);
        let Frame::Running { timings: Some(t) } = r.running_frame(TargetTimings::default()) else {
            panic!("protocol 5 carries the timings");
        };
        assert_eq!(t.pages_resent_after_checksum_mismatch, Some(1));
    }

    #[test]
    fn a_copied_frame_or_a_zero_entry_clears_a_suspect_page_too() {
        let mut r = receiving_at(5, 1);
        r.placed_pages(StreamName::Data(0), &[P, 2 * P], &[P, 2 * P])
            .unwrap();
        ack_round(&mut r, 0);
        assert_eq!(
            r.frame(StreamName::Data(0), copied(&[P], &[])),
            Ok(Step::Apply(match copied(&[P], &[]) {
                Frame::Pages(b) => b,
                _ => unreachable!(),
            }))
        );
        assert_eq!(r.suspect_pages(), 1);
        assert!(matches!(
            r.frame(StreamName::Data(0), copied(&[], &[2 * P])),
            Ok(Step::Apply(_))
        ));
        assert_eq!(r.suspect_pages(), 0);
        assert_eq!(r.checksum_mismatches(), 2);
    }

    #[test]
    fn pages_still_suspect_at_the_commit_fail_it_naming_how_many_and_the_first() {
        let mut r = receiving_at(5, 1);
        r.placed_pages(StreamName::Data(0), &[5 * P, 3 * P, 9 * P], &[9 * P, 3 * P])
            .unwrap();
        ack_round(&mut r, 0);
        // The final round (after the stream's last round end) brings other pages only.
        r.placed_pages(StreamName::Data(0), &[4 * P], &[]).unwrap();
        assert_eq!(
            r.frame(
                StreamName::Data(0),
                Frame::DataEnd {
                    frames: 2,
                    pages: 4
                }
            ),
            Ok(Step::Wait)
        );
        r.state(1, vec![]).unwrap();
        let e = r.commit(None).unwrap_err();
        assert_eq!(
            e,
            CommitRefused::Checksum(PageChecksumFailure {
                pages: 2,
                first: 3 * P,
                stage: ChecksumStage::Commit,
            })
        );
        assert_eq!(
            e.to_string(),
            "2 page(s) did not match their checksum and were not sent again before the commit, \
             the first at guest address 0x3000"
        );
        assert_eq!(r.phase(), ReceiverPhase::Discarded);
        // The shell's failure path tells the source, which runs on (nothing was committed).
        assert_eq!(
            r.failed(Failure::Other),
            Cleanup {
                discard: true,
                tell_source: true
            }
        );
    }

    #[test]
    fn a_mismatch_in_the_final_round_fails_when_its_stream_ends() {
        let mut r = receiving_at(5, 2);
        r.placed_pages(StreamName::Data(0), &[P], &[]).unwrap();
        assert_eq!(r.round_end(0, 0).unwrap(), None);
        assert_eq!(r.round_end(1, 0).unwrap(), Some(0));
        // Final round: stream 0 brings page 1 again, damaged, while the source is paused.
        r.placed_pages(StreamName::Data(0), &[P], &[P]).unwrap();
        let step = r
            .frame(
                StreamName::Data(0),
                Frame::DataEnd {
                    frames: 2,
                    pages: 2,
                },
            )
            .unwrap();
        assert_eq!(
            step,
            Step::ChecksumFailed(PageChecksumFailure {
                pages: 1,
                first: P,
                stage: ChecksumStage::Paused,
            })
        );
        assert_eq!(r.phase(), ReceiverPhase::Discarded);
        assert!(
            r.frame(
                StreamName::Data(1),
                Frame::DataEnd {
                    frames: 0,
                    pages: 0
                }
            )
            .is_err(),
            "nothing more once discarded"
        );
    }

    #[test]
    fn with_post_copy_a_suspect_page_among_the_owed_ones_is_fetched_again() {
        let run = |owed: &[(u64, u32)]| {
            let mut r = receiving_at(5, 1);
            r.placed_pages(StreamName::Data(0), &[2 * P, 6 * P], &[2 * P, 6 * P])
                .unwrap();
            ack_round(&mut r, 0);
            r.frame(
                StreamName::Data(0),
                Frame::DataEnd {
                    frames: 1,
                    pages: 2,
                },
            )
            .unwrap();
            r.state(1, vec![]).unwrap();
            r.commit(Some(owed)).map(|_| ())
        };
        assert_eq!(run(&[(1, 2), (6, 1)]), Ok(()));
        assert_eq!(
            run(&[(1, 2), (7, 1)]),
            Err(CommitRefused::Checksum(PageChecksumFailure {
                pages: 1,
                first: 6 * P,
                stage: ChecksumStage::Commit,
            }))
        );
    }

    #[test]
    fn config_refusal_discards() {
        let mut r = Receiver::new();
        r.hello(&hello(1, 1, 1)).unwrap().unwrap();
        let got = r.prepared(Err("vCPU count differs".into())).unwrap();
        assert_eq!(got, Err(Refusal::Config("vCPU count differs".into())));
        assert_eq!(r.phase(), ReceiverPhase::Discarded);
    }

    /// Every event that is illegal in a phase discards the migration.
    #[test]
    fn illegal_events_are_violations_in_every_phase() {
        type Step = fn(&mut Receiver) -> Result<(), ProtocolViolation>;
        let events: [(&str, Step); 9] = [
            ("round_end", |r| r.round_end(0, 0).map(|_| ())),
            ("join", |r| r.join(0, 7)),
            ("pages", |r| r.pages(0, 1)),
            ("data_end", |r| r.data_end(0, 0, 0)),
            ("state", |r| r.state(1, vec![])),
            ("verify", |r| r.verify(digest())),
            ("commit", |r| {
                r.commit(None).map(|_| ()).map_err(|e| ProtocolViolation {
                    phase: ReceiverPhase::Discarded,
                    what: e.to_string().into(),
                })
            }),
            ("committed", |r| r.committed(true)),
            ("hello", |r| r.hello(&hello(1, 1, 1)).map(|_| ())),
        ];
        // Which events each phase accepts (from a fresh receiver in that phase).
        let accepts: [(ReceiverPhase, &[&str]); 4] = [
            (ReceiverPhase::AwaitHello, &["hello"]),
            (ReceiverPhase::Preparing, &[]),
            (ReceiverPhase::Receiving, &["join", "state", "verify"]),
            (ReceiverPhase::Committing, &["committed"]),
        ];
        let make = |p: ReceiverPhase| -> Receiver {
            let mut r = Receiver::new();
            if p == ReceiverPhase::AwaitHello {
                return r;
            }
            r.hello(&hello(1, 1, 1)).unwrap().unwrap();
            if p == ReceiverPhase::Preparing {
                return r;
            }
            r.prepared(Ok(())).unwrap().unwrap();
            if p == ReceiverPhase::Receiving {
                return r;
            }
            r.join(0, 7).unwrap();
            r.data_end(0, 0, 0).unwrap();
            r.state(1, vec![]).unwrap();
            r.commit(None).unwrap();
            r
        };
        for (phase, ok) in accepts {
            for (name, ev) in events {
                let mut r = make(phase);
                let res = ev(&mut r);
                assert_eq!(
                    res.is_ok(),
                    ok.contains(&name),
                    "{name} in {phase:?}: {res:?}"
                );
                if res.is_err() {
                    assert_eq!(r.phase(), ReceiverPhase::Discarded);
                }
            }
        }
        // Terminal phases accept nothing.
        for (name, ev) in events {
            let mut r = make(ReceiverPhase::Committing);
            r.committed(false).unwrap();
            assert!(ev(&mut r).is_err(), "{name} after discard");
        }
    }

    #[test]
    fn pages_of_a_round_wait_until_every_stream_ended_the_one_before() {
        use crate::wire::PageBatch;
        // A zero page of round `round` on data stream `i`, from its stripe (page 128 × i).
        let pages = |r: &mut Receiver, i: u16, round: u32| {
            let mut b = PageBatch::new(round);
            b.push_zero(u64::from(i) * 128 * PAGE_SIZE);
            r.frame(StreamName::Data(i), Frame::Pages(b))
        };
        let mut r = receiving(2);
        r.join(0, 7).unwrap();
        r.join(1, 7).unwrap();
        assert_eq!(r.acknowledged_rounds(), 0);
        pages(&mut r, 0, 0).unwrap();
        pages(&mut r, 1, 0).unwrap();
        assert_eq!(r.round_end(0, 0).unwrap(), None);
        assert_eq!(r.acknowledged_rounds(), 0, "stream 1 is still in round 0");
        // Round 1 on stream 0 while stream 1 may still carry round 0's copy of a page.
        let mut early = r.clone();
        let e = pages(&mut early, 0, 1).unwrap_err();
        assert_eq!(
            e.what.to_string(),
            "pages of round 1 on stream 0 before stream 1 ended round 0"
        );
        assert_eq!(early.phase(), ReceiverPhase::Discarded);
        // The frame's round field does not decide: its stream's position does.
        let mut labelled = r.clone();
        let e = pages(&mut labelled, 0, 0).unwrap_err();
        assert_eq!(
            e.what.to_string(),
            "pages of round 1 on stream 0 before stream 1 ended round 0"
        );
        pages(&mut r.clone(), 1, 1).unwrap();
        // Once every stream ended round 0 (acknowledged), round 1 may come on either.
        assert_eq!(r.round_end(1, 0).unwrap(), Some(0));
        assert_eq!(r.acknowledged_rounds(), 1);
        pages(&mut r, 1, 1).unwrap();
        pages(&mut r, 0, 0).unwrap();
        // Stream 1 runs ahead into round 2 while stream 0 is still in round 1.
        assert_eq!(r.round_end(1, 1).unwrap(), None);
        let e = pages(&mut r, 1, 2).unwrap_err();
        assert_eq!(
            e.what.to_string(),
            "pages of round 2 on stream 1 before stream 0 ended round 1"
        );
    }

    /// Page `p` (numbered over every region, not by address) travels only on data stream
    /// `(p / 128) mod N`: a page on any other stream, in place or copied, is refused with a
    /// typed violation and discards the migration.
    #[test]
    fn a_page_on_a_data_stream_other_than_its_stripe_s_is_refused() {
        // Region 0: pages 0..200; region 1 (at 1 GiB): pages 200..300. By address, 1 GiB would
        // be page 262,144 (stripe 2048, stream 0 of 2); numbered over the layout it is page
        // 200, stripe 1: stream 1 of 2, stream 1 of 3.
        const HIGH: u64 = 1 << 30;
        let receiving_layout = |streams: u16| {
            let mut h = hello(5, 5, streams);
            h.config.layout = MemoryLayout::new(vec![
                Region {
                    guest_addr: 0,
                    size: 200 * P,
                },
                Region {
                    guest_addr: HIGH,
                    size: 100 * P,
                },
            ])
            .unwrap();
            let mut r = Receiver::new();
            assert_eq!(r.hello(&h).unwrap(), Ok(5));
            assert_eq!(r.prepared(Ok(())).unwrap(), Ok(5));
            for i in 0..streams {
                r.join(i, 7).unwrap();
            }
            r
        };
        // On their stripes' streams: accepted.
        let mut r = receiving_layout(2);
        r.placed_pages(StreamName::Data(0), &[0, 127 * P], &[])
            .unwrap();
        r.placed_pages(
            StreamName::Data(1),
            &[128 * P, 199 * P, HIGH, HIGH + 55 * P],
            &[],
        )
        .unwrap();
        assert!(matches!(
            r.frame(StreamName::Data(0), copied(&[HIGH + 56 * P], &[])),
            Ok(Step::Apply(_))
        ));
        let mut r3 = receiving_layout(3);
        r3.placed_pages(StreamName::Data(1), &[HIGH], &[]).unwrap();
        r3.placed_pages(StreamName::Data(2), &[HIGH + 56 * P], &[])
            .unwrap();

        // A frame whose last page belongs to the other stream, in place.
        let mut r = receiving_layout(2);
        let e = r
            .placed_pages(StreamName::Data(0), &[P, 2 * P, HIGH], &[])
            .unwrap_err();
        assert_eq!(
            e.what,
            Violation::OffStripe {
                gpa: HIGH,
                stream: 0,
                stripe_stream: 1,
            }
        );
        assert_eq!(
            e.to_string(),
            "Protocol violation in phase Receiving: page at guest address 0x40000000 arrived \
             on data stream 0, but its stripe travels on data stream 1"
        );
        assert_eq!(r.phase(), ReceiverPhase::Discarded);
        // Copied (`Pages`), a zero entry too.
        let mut r = receiving_layout(2);
        assert_eq!(
            r.frame(StreamName::Data(1), copied(&[], &[5 * P]))
                .unwrap_err()
                .what,
            Violation::OffStripe {
                gpa: 5 * P,
                stream: 1,
                stripe_stream: 0,
            }
        );
        assert_eq!(r.phase(), ReceiverPhase::Discarded);
        // In a later round too (a copy that would race the one on its own stream).
        let mut r = receiving_layout(3);
        r.placed_pages(StreamName::Data(2), &[HIGH + 56 * P], &[])
            .unwrap();
        for i in 0..3 {
            r.round_end(i, 0).unwrap();
        }
        let e = r
            .placed_pages(StreamName::Data(0), &[HIGH + 56 * P], &[])
            .unwrap_err();
        assert_eq!(
            e.what,
            Violation::OffStripe {
                gpa: HIGH + 56 * P,
                stream: 0,
                stripe_stream: 2,
            }
        );
        // A page outside the layout (the decoder refuses it first) is refused too.
        let mut r = receiving_layout(2);
        let e = r
            .placed_pages(StreamName::Data(0), &[HIGH + 100 * P], &[])
            .unwrap_err();
        assert_eq!(
            e.what.to_string(),
            "page at guest address 0x40064000 is outside the agreed memory layout"
        );
    }

    #[test]
    fn round_ends_must_come_in_order() {
        let mut r = receiving(1);
        r.join(0, 7).unwrap();
        assert_eq!(r.round_end(0, 0).unwrap(), Some(0));
        assert!(r.round_end(0, 2).is_err(), "round 1 skipped");
        let mut r = receiving(1);
        r.join(0, 7).unwrap();
        r.data_end(0, 0, 0).unwrap();
        assert!(r.round_end(0, 0).is_err(), "after data end");
    }

    #[test]
    fn stream_accounting_catches_lost_or_foreign_frames() {
        let mut r = receiving(1);
        assert!(r.join(0, 8).is_err(), "foreign session");
        let mut r = receiving(1);
        assert!(r.join(1, 7).is_err(), "unannounced stream");
        let mut r = receiving(1);
        assert!(r.pages(0, 1).is_err(), "pages before join");
        let mut r = receiving(1);
        r.join(0, 7).unwrap();
        r.pages(0, 4).unwrap();
        let err = r.data_end(0, 2, 8).unwrap_err();
        assert!(
            err.to_string().contains("2 frames / 8 pages but 1 / 4"),
            "{err}"
        );
        let mut r = receiving(1);
        r.join(0, 7).unwrap();
        r.state(1, vec![]).unwrap();
        assert!(r.commit(None).is_err(), "commit before data end");
        let mut r = receiving(1);
        r.join(0, 7).unwrap();
        r.data_end(0, 0, 0).unwrap();
        assert!(r.commit(None).is_err(), "commit before state");
    }

    /// Which frame each stream may carry while receiving, and what the shell is told to do.
    #[test]
    fn frames_map_to_steps_by_stream_and_phase() {
        use crate::wire::PageBatch;
        let mut batch = PageBatch::new(0);
        batch.push_zero(0);
        let cases: Vec<(StreamName, Frame)> = vec![
            (StreamName::Data(0), Frame::Pages(batch.clone())),
            (StreamName::Data(0), Frame::RoundEnd { round: 0 }),
            (StreamName::Data(1), Frame::RoundEnd { round: 0 }),
            (StreamName::Control, Frame::Commit),
            (
                StreamName::Control,
                Frame::State {
                    version: 2,
                    bytes: vec![7],
                },
            ),
            (
                StreamName::Data(0),
                Frame::DataEnd {
                    frames: 1,
                    pages: 1,
                },
            ),
            (
                StreamName::Data(1),
                Frame::DataEnd {
                    frames: 0,
                    pages: 0,
                },
            ),
        ];
        let mut r = receiving(2);
        r.join(0, 7).unwrap();
        r.join(1, 7).unwrap();
        let mut got = String::new();
        for (stream, frame) in cases {
            let kind = frame.kind();
            let step = r.frame(stream, frame).map(|s| match s {
                Step::Apply(b) => format!("Apply({} pages)", b.len()),
                other => format!("{other:?}"),
            });
            got += &format!(
                "{stream} {kind:?}: {step:?} ready={}\n",
                r.ready_to_commit()
            );
        }
        expect_test::expect![[r#"
            data 0 Pages: Ok("Apply(1 pages)") ready=false
            data 0 RoundEnd: Ok("Wait") ready=false
            data 1 RoundEnd: Ok("AckRound(0)") ready=false
            control Commit: Ok("Wait") ready=false
            control State: Ok("Wait") ready=false
            data 0 DataEnd: Ok("Wait") ready=false
            data 1 DataEnd: Ok("Wait") ready=true
        "#]]
        .assert_eq(&got);
        assert!(!r.cancellable(), "commit was asked");
        assert_eq!(r.commit(None).unwrap().state, (2, vec![7]));

        // Frames on the wrong stream, twice, or after an abort.
        let wrong: Vec<(StreamName, Frame)> = vec![
            (StreamName::Control, Frame::Pages(batch.clone())),
            (StreamName::Data(0), Frame::Commit),
            (
                StreamName::Data(0),
                Frame::State {
                    version: 1,
                    bytes: vec![],
                },
            ),
            (StreamName::Control, Frame::RoundAck { round: 0 }),
            (
                StreamName::Data(0),
                Frame::Abort {
                    reason: "bye".into(),
                },
            ),
        ];
        let mut got = String::new();
        for (stream, frame) in wrong {
            let mut r = receiving(1);
            r.join(0, 7).unwrap();
            let kind = frame.kind();
            let res = r.frame(stream, frame);
            got += &format!("{stream} {kind:?}: {res:?} → {:?}\n", r.phase());
        }
        let mut r = receiving(1);
        r.join(0, 7).unwrap();
        r.frame(StreamName::Control, Frame::Commit).unwrap();
        got += &format!(
            "second commit: {:?}\n",
            r.frame(StreamName::Control, Frame::Commit)
        );
        expect_test::expect![[r#"
            control Pages: Err(ProtocolViolation { phase: Receiving, what: Sequence("unexpected Pages frame on stream control") }) → Discarded
            data 0 Commit: Err(ProtocolViolation { phase: Receiving, what: Sequence("unexpected Commit frame on stream data 0") }) → Discarded
            data 0 State: Err(ProtocolViolation { phase: Receiving, what: Sequence("unexpected State frame on stream data 0") }) → Discarded
            control RoundAck: Err(ProtocolViolation { phase: Receiving, what: Sequence("unexpected RoundAck frame on stream control") }) → Discarded
            data 0 Abort: Ok(Aborted("bye")) → Discarded
            second commit: Err(ProtocolViolation { phase: Receiving, what: Sequence("unexpected Commit frame on stream control") })
        "#]].assert_eq(&got);
    }

    #[test]
    fn opening_frames_must_be_hello_and_join() {
        let mut r = Receiver::new();
        let e = r.control_opened(Frame::Commit).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Protocol violation in phase AwaitHello: expected hello, got Commit"
        );
        assert_eq!(r.phase(), ReceiverPhase::Discarded);
        let mut r = Receiver::new();
        assert_eq!(
            r.control_opened(Frame::Hello(hello(1, 1, 1))).unwrap(),
            Ok(1)
        );
        assert_eq!(r.described().map(|d| d.vcpus), Some(1));
        r.prepared(Ok(())).unwrap().unwrap();
        let e = r.data_opened(Frame::Commit).unwrap_err();
        assert_eq!(e.what.to_string(), "data stream opened with Commit");
        let mut r = receiving(1);
        assert_eq!(
            r.data_opened(Frame::Join {
                session: 7,
                stream: 0
            }),
            Ok(0)
        );
    }

    #[test]
    fn a_failure_discards_and_tells_the_source_unless_it_knows() {
        let cases = [
            (Failure::Other, true, true),
            (Failure::SourceGone, true, false),
            (Failure::Refused, true, false),
        ];
        for (failure, discard, tell_source) in cases {
            let mut r = receiving(1);
            assert_eq!(
                r.failed(failure),
                Cleanup {
                    discard,
                    tell_source
                },
                "{failure:?}"
            );
        }
        // Once running, the VM stays whatever happens next.
        let mut r = receiving(1);
        r.join(0, 7).unwrap();
        r.data_end(0, 0, 0).unwrap();
        r.state(1, vec![]).unwrap();
        r.commit(None).unwrap();
        r.committed(true).unwrap();
        assert!(!r.failed(Failure::Other).discard);
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Hello(u16, u16, u16),
        Prepared(bool),
        Join(u16, bool),
        Pages(u16, usize),
        DataEnd(u16, u64, u64),
        State,
        Verify,
        Commit,
        Committed(bool),
        Abort,
    }

    fn ev() -> impl proptest::strategy::Strategy<Value = Ev> {
        use proptest::prelude::*;
        prop_oneof![
            (0u16..3, 0u16..3, 1u16..3).prop_map(|(a, b, n)| Ev::Hello(a, b, n)),
            any::<bool>().prop_map(Ev::Prepared),
            (0u16..3, any::<bool>()).prop_map(|(s, ok)| Ev::Join(s, ok)),
            (0u16..3, 1usize..4).prop_map(|(s, n)| Ev::Pages(s, n)),
            (0u16..3, 0u64..3, 0u64..6).prop_map(|(s, f, p)| Ev::DataEnd(s, f, p)),
            Just(Ev::State),
            Just(Ev::Verify),
            Just(Ev::Commit),
            any::<bool>().prop_map(Ev::Committed),
            Just(Ev::Abort),
        ]
    }

    proptest::proptest! {
        /// Random event sequences: nothing panics, a discarded receiver stays discarded, a
        /// commit is accepted only with every stream ended and the state in, and Running is
        /// reached only through an accepted commit.
        #[test]
        fn random_event_sequences_keep_the_invariants(events in proptest::collection::vec(ev(), 0..40)) {
            let mut r = Receiver::new();
            let mut state_in = false;
            let mut commit_ok = false;
            for e in events {
                let before = r.phase();
                let ok = match e.clone() {
                    Ev::Hello(a, b, n) => r.hello(&hello(a, b, n)).map(|v| v.is_ok()).unwrap_or(false),
                    Ev::Prepared(ok) => r.prepared(if ok { Ok(()) } else { Err("no".into()) }).map(|v| v.is_ok()).unwrap_or(false),
                    Ev::Join(s, same) => r.join(s, if same { 7 } else { 8 }).is_ok(),
                    Ev::Pages(s, n) => r.pages(s, n).is_ok(),
                    Ev::DataEnd(s, f, p) => r.data_end(s, f, p).is_ok(),
                    Ev::State => r.state(1, vec![]).is_ok(),
                    Ev::Verify => r.verify(digest()).is_ok(),
                    Ev::Commit => {
                        let all = r.all_ended() && r.stream_count() > 0;
                        let ok = r.commit(None).is_ok();
                        if ok {
                            proptest::prop_assert!(all && state_in, "commit accepted too early");
                            commit_ok = true;
                        }
                        ok
                    }
                    Ev::Committed(run) => r.committed(run).is_ok(),
                    Ev::Abort => { r.abort(); false }
                };
                if matches!(e, Ev::State) && ok {
                    state_in = true;
                }
                if matches!(before, ReceiverPhase::Discarded | ReceiverPhase::Running) {
                    proptest::prop_assert!(!ok, "{e:?} accepted in terminal phase {before:?}");
                    proptest::prop_assert_eq!(r.phase(), before);
                }
                if r.phase() == ReceiverPhase::Running {
                    proptest::prop_assert!(commit_ok);
                }
                if r.layout().is_some() {
                    proptest::prop_assert!(matches!(r.phase(), ReceiverPhase::Receiving | ReceiverPhase::Committing | ReceiverPhase::Running));
                }
            }
        }
    }
}

//! The source side's state machine: phases, rounds, dirty-sync input, the convergence decision,
//! what each answer of the target means, when the VM's storage is handed over and taken back,
//! what a failure does to the source VM, and the outcome and report. No I/O, no clock: time is passed in (time since the migration started).

use std::time::Duration;

use crate::PAGE_SIZE;
use crate::machine::policy::{
    BandwidthEstimator, ConvergenceConfig, Decision, SyncInput, ThrottleRelease,
};
use crate::report::{
    DowntimeStep, MigrationReport, Outcome, PauseStep, PostCopyFigures, Progress, ProgressPhase,
    RoundDecision, RoundFigures,
};
use crate::wire::{
    Frame, FrameKind, MAX_STREAMS, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, TargetTimings,
};

/// Progress is reported at most this often within a round (always at a sync).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// After a broken stream, how long the shell listens for the target's reason (a target that
/// gives up says why on the control stream, then closes everything).
pub const TARGET_REASON_GRACE: Duration = Duration::from_millis(100);

/// The steps of the pause the source times, in their order (docs/migration.md).
pub const SOURCE_STEPS: [PauseStep; 5] = [
    PauseStep::DirtyLog,
    PauseStep::FinalPages,
    PauseStep::SaveState,
    PauseStep::ReleaseStorage,
    PauseStep::StateSent,
];

/// The pause from `paused_at` to the answer read at `acked`, step by step: the source's steps
/// (`marks`: step, end, bytes), then the target's timings fitted into the time from the last
/// source step to the answer (never more than that window: they happened inside it), then the
/// rest of that window as [`PauseStep::Ack`]. The steps add up to `acked − paused_at`.
pub fn breakdown(
    paused_at: Duration,
    marks: &[(PauseStep, Duration, u64)],
    target: Option<TargetTimings>,
    acked: Duration,
) -> Vec<DowntimeStep> {
    let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let mut steps = Vec::new();
    let mut at = paused_at;
    for &(step, end, bytes) in marks {
        let end = end.clamp(at, acked.max(at));
        steps.push(DowntimeStep {
            step,
            us: us(end - at),
            bytes,
        });
        at = end;
    }
    let mut window = us(acked.saturating_sub(at));
    if let Some(t) = target {
        for (step, took) in [
            (PauseStep::TargetData, t.data_us),
            (PauseStep::TargetVerify, t.verify_us),
            (PauseStep::TargetRestore, t.restore_us),
            (PauseStep::TargetResume, t.resume_us),
        ] {
            if step == PauseStep::TargetVerify && took == 0 {
                continue;
            }
            let took = took.min(window);
            window -= took;
            steps.push(DowntimeStep {
                step,
                us: took,
                bytes: 0,
            });
        }
    }
    steps.push(DowntimeStep {
        step: PauseStep::Ack,
        us: window,
        bytes: 0,
    });
    // Whole µs per step: the sum may fall short of the downtime by under 1 µs per step.
    steps
}

/// Where the source is in a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderPhase {
    /// Hello sent, waiting for welcome or refuse. The VM runs.
    Handshake,
    /// Sending pages while the VM runs.
    PreCopy,
    /// VM paused: sending the last dirty pages, state and verify digest.
    StopAndCopy,
    /// Commit sent: only the target can say how it ended.
    AwaitingAck,
    /// The target acknowledged "running". Terminal.
    Completed,
    /// Failed or cancelled. Terminal.
    Failed,
}

/// An event the machine does not accept in its phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Migration sender cannot {event} while in phase {phase:?}")]
pub struct InvalidTransition {
    /// Phase at the time.
    pub phase: SenderPhase,
    /// The refused event.
    pub event: &'static str,
}

/// Options of an outgoing migration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOptions {
    /// Stream count out of range.
    #[error("streams must be 1..={MAX_STREAMS}, got {0}")]
    Streams(u16),
    /// A bandwidth cap of zero.
    #[error("bandwidth cap must be above 0")]
    ZeroBandwidth,
}

/// Checks an outgoing migration's options before anything connects.
pub fn check_options(streams: u16, cfg: &ConvergenceConfig) -> Result<(), InvalidOptions> {
    if streams == 0 || streams > MAX_STREAMS {
        return Err(InvalidOptions::Streams(streams));
    }
    if cfg.max_bandwidth == Some(0) {
        return Err(InvalidOptions::ZeroBandwidth);
    }
    Ok(())
}

/// What the shell must do with the source VM after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureAction {
    /// The VM never stopped: only stop throttling.
    KeepRunning,
    /// The VM is paused and the target cannot be running: resume it.
    ResumeSource,
    /// Commit was sent but no answer came: the target may be running. Leave the source
    /// paused so that two copies never run; an operator decides.
    InDoubt,
}

/// A step with the source VM's storage (what moves with the VM under exclusive write
/// ownership, e.g. disks under a write lease), ordered by the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageStep {
    /// Hand it to the target ([`crate::MigrationSource::release_storage`]): the VM is paused
    /// and its state saved; the state and commit frames go out only after this succeeded.
    Release,
    /// Take it back ([`crate::MigrationSource::acquire_storage`]) before the source resumes.
    Acquire,
}

/// A frame from the target, understood in the sender's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// The handshake was accepted at this (offered) version.
    Welcomed(u16),
    /// The target applied every page of the round whose end the shell sent.
    RoundAcked(u32),
    /// The VM runs on the target; the downtime (pause → this answer).
    Running(Duration),
}

/// A frame from the target that ends the migration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetAnswer {
    /// The target refused the handshake.
    #[error("{0}")]
    Refused(String),
    /// The target failed or aborted and discarded what it had.
    #[error("{0}")]
    Failed(String),
    /// The target welcomed at a version the source did not offer.
    #[error("target chose protocol version {0}, which was not offered")]
    VersionNotOffered(u16),
    /// A frame that makes no sense now.
    #[error("unexpected {kind:?} frame {context}")]
    Unexpected {
        /// What came.
        kind: FrameKind,
        /// What the source was doing ("in the handshake", …).
        context: String,
    },
}

/// How the shell saw the migration end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The target answered "running" (see [`Heard::Running`]).
    Completed,
    /// The operator cancelled.
    Cancelled,
    /// A stream broke (write failed, read failed, closed): the target may have given up, and
    /// its reason may still arrive ([`TARGET_REASON_GRACE`]).
    LinkLost,
    /// Commit was sent and no readable answer came in time.
    NoAnswer,
    /// Anything else: a target answer, a timeout decision, bad options, a protocol or a source
    /// VM error. The machine knows which of these it saw itself.
    Failed,
}

impl Ending {
    /// Whether the shell should listen a moment for the target's own reason.
    pub fn awaits_target_reason(self) -> bool {
        self == Ending::LinkLost
    }
}

/// What the shell must do once a migration ended, and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cleanup {
    /// What happens to the source VM; `None` when the migration completed.
    pub action: Option<FailureAction>,
    /// Send the target Abort (best effort): it has not answered and no commit is in doubt.
    pub tell_target: bool,
    /// Set the throttle back to 0 (not while in doubt: the source stays exactly as it was).
    pub remove_throttle: bool,
    /// Carry out this storage step first: [`StorageStep::Acquire`] whenever the source is
    /// resumed (whether or not the release ran: taking back nothing is a no-op), never while
    /// in doubt.
    pub storage: Option<StorageStep>,
    /// Resume the source VM, once `storage` succeeded: a VM whose storage could not be taken
    /// back stays paused (its writes would go where it no longer owns them).
    pub resume: bool,
    /// Disarm the dirty log (it was armed).
    pub stop_dirty_log: bool,
    /// Shut the data streams down at once instead of letting the writers drain.
    pub close_streams: bool,
    /// The outcome reported.
    pub outcome: Outcome,
}

/// Figures for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SenderFigures {
    /// Current round (0 = the full copy).
    pub round: u32,
    /// Bytes still dirty at the last sync.
    pub remaining_bytes: u64,
    /// Dirty rate at the last sync, bytes/s.
    pub dirty_bytes_per_sec: f64,
    /// Bandwidth estimate (capped), bytes/s.
    pub bandwidth_bytes_per_sec: Option<f64>,
    /// Pause expected if switching over now.
    pub expected_downtime: Option<Duration>,
    /// Current throttle percent.
    pub throttle_pct: f64,
    /// Highest throttle percent so far.
    pub throttle_max_pct: f64,
}

/// The most rounds the report lists (`rounds_detail`): past that, the first half and the
/// latest rounds, the round numbers showing the gap. A migration that cannot converge runs
/// empty rounds until its timeout (one run of this machine's tests counted ~100,000), and the
/// report travels as one line of the VMM's API.
pub const ROUNDS_DETAIL_MAX: usize = 1024;

/// The source's state machine.
#[derive(Debug, Clone)]
pub struct Sender {
    cfg: ConvergenceConfig,
    offered: (u16, u16),
    phase: SenderPhase,
    round: u32,
    bandwidth: BandwidthEstimator,
    throttle_pct: f64,
    throttle_max_pct: f64,
    previous_remaining: Option<u64>,
    remaining: u64,
    last_sync: Duration,
    dirty_rate: f64,
    /// Bytes sent since the last sync (the round under way).
    round_sent: u64,
    /// The round under way: when it started (since the start), data pages, zero pages.
    round_start: Duration,
    round_pages: (u64, u64),
    /// The rounds that ended, for the report.
    rounds_detail: Vec<RoundFigures>,
    /// Syncs in a row whose remainder fit the budget (rounds spent shrinking the pause).
    fitted_in_a_row: u32,
    /// The throttle's release before the switch-over.
    release: ThrottleRelease,
    paused_at: Option<Duration>,
    /// The final state was saved: the storage release is due.
    state_saved: bool,
    /// The storage was released: the state and commit may go out.
    storage_released: bool,
    converged: bool,
    /// The round whose end was sent and whose acknowledgement is awaited.
    awaiting_round: Option<u32>,
    /// The target's welcome arrived (the data streams are joining).
    welcomed: bool,
    /// The target answered (refused, failed, aborted, or said something instead of running):
    /// it needs no Abort, and after Commit it is known not to run the VM.
    answered: bool,
    refused: bool,
    timed_out: bool,
    dirty_log_on: bool,
    last_progress: Option<Duration>,
    acked_downtime: Option<Duration>,
    /// Pages the target found not matching their checksum and had sent again (protocol 5's
    /// `Running`).
    resent_after_mismatch: Option<u32>,
    /// The source's steps of the pause so far: which, when it ended (since the start), bytes.
    pause_marks: Vec<(PauseStep, Duration, u64)>,
    /// The pause step by step, once the target's answer arrived.
    downtime_steps: Vec<DowntimeStep>,
    outcome: Option<Outcome>,
    // ── post-copy (machine::postcopy) ──
    /// The commit went out with pages still owed: from here only a completed post-copy ends
    /// well; no answer, or a lost link, is `failed_post_copy`.
    post_copy_switched: bool,
    /// The target reported every owed page placed.
    post_copy_done: bool,
    post_copy: Option<Box<PostCopyFigures>>,
}

impl Sender {
    /// A sender that has just sent its hello offering every protocol version this build speaks.
    pub fn new(cfg: ConvergenceConfig) -> Self {
        let bandwidth = BandwidthEstimator::new(cfg.bandwidth_window);
        Self {
            cfg,
            offered: (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            phase: SenderPhase::Handshake,
            round: 0,
            bandwidth,
            throttle_pct: 0.0,
            throttle_max_pct: 0.0,
            previous_remaining: None,
            remaining: 0,
            last_sync: Duration::ZERO,
            dirty_rate: 0.0,
            round_sent: 0,
            round_start: Duration::ZERO,
            round_pages: (0, 0),
            rounds_detail: Vec::new(),
            fitted_in_a_row: 0,
            release: ThrottleRelease::Ready,
            paused_at: None,
            state_saved: false,
            storage_released: false,
            converged: false,
            awaiting_round: None,
            welcomed: false,
            answered: false,
            refused: false,
            timed_out: false,
            dirty_log_on: false,
            last_progress: None,
            acked_downtime: None,
            resent_after_mismatch: None,
            pause_marks: Vec::new(),
            downtime_steps: Vec::new(),
            outcome: None,
            post_copy_switched: false,
            post_copy_done: false,
            post_copy: None,
        }
    }

    // ── post-copy hooks (decisions in machine::postcopy) ──

    /// The commit is about to go out with pages still owed (post-copy).
    pub fn post_copy_switched(&mut self) -> Result<(), InvalidTransition> {
        self.expect(SenderPhase::StopAndCopy, "switch to post-copy")?;
        self.post_copy_switched = true;
        Ok(())
    }

    /// Whether this migration switched to post-copy.
    pub fn in_post_copy(&self) -> bool {
        self.post_copy_switched
    }

    /// The post-copy phase ended (`done`: the target placed every owed page); its figures go
    /// into the report.
    pub fn post_copy_ended(&mut self, done: bool, figures: PostCopyFigures) {
        self.post_copy_done = done && self.phase == SenderPhase::Completed;
        self.post_copy = Some(Box::new(figures));
    }

    /// The protocol versions the hello offered (oldest, newest).
    pub fn with_versions(mut self, offered: (u16, u16)) -> Self {
        self.offered = offered;
        self
    }

    fn expect(&self, phase: SenderPhase, event: &'static str) -> Result<(), InvalidTransition> {
        if self.phase == phase {
            Ok(())
        } else {
            Err(InvalidTransition {
                phase: self.phase,
                event,
            })
        }
    }

    /// Current phase.
    pub fn phase(&self) -> SenderPhase {
        self.phase
    }

    /// Current round.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// The policy configuration.
    pub fn config(&self) -> &ConvergenceConfig {
        &self.cfg
    }

    /// Whether the switch-over came from the budget rule (not forced, not yet decided: false).
    pub fn converged(&self) -> bool {
        self.converged
    }

    /// When the source VM was paused (time since start).
    pub fn paused_at(&self) -> Option<Duration> {
        self.paused_at
    }

    /// Whether an operator's cancel still counts: until Commit is sent.
    pub fn cancellable(&self) -> bool {
        matches!(
            self.phase,
            SenderPhase::Handshake | SenderPhase::PreCopy | SenderPhase::StopAndCopy
        )
    }

    /// Whether the target has answered in a way that ends the migration.
    pub fn target_answered(&self) -> bool {
        self.answered
    }

    /// The target welcomed us: round 0 (every page) starts. The dirty log must be armed
    /// before the first page is read.
    pub fn accepted(&mut self, now: Duration) -> Result<(), InvalidTransition> {
        self.expect(SenderPhase::Handshake, "accept a welcome")?;
        self.phase = SenderPhase::PreCopy;
        self.last_sync = now;
        self.round_start = now;
        Ok(())
    }

    /// The dirty log is armed: it must be disarmed at the end, and the rounds count.
    pub fn dirty_log_armed(&mut self) -> Result<(), InvalidTransition> {
        self.expect(SenderPhase::PreCopy, "arm the dirty log")?;
        self.dirty_log_on = true;
        Ok(())
    }

    /// `bytes` were written to the streams in `busy` time.
    pub fn sent(&mut self, bytes: u64, busy: Duration) -> Result<(), InvalidTransition> {
        match self.phase {
            SenderPhase::PreCopy | SenderPhase::StopAndCopy => {
                self.bandwidth.record(bytes, busy);
                self.round_sent += bytes;
                Ok(())
            }
            phase => Err(InvalidTransition {
                phase,
                event: "send pages",
            }),
        }
    }

    /// The round under way handled `data` pages sent with their data and `zero` zero pages (sent
    /// as a marker or skipped), for the report's rounds.
    pub fn pages(&mut self, data: u64, zero: u64) {
        self.round_pages.0 += data;
        self.round_pages.1 += zero;
    }

    /// Closes the round under way into the report's rounds.
    fn end_round(&mut self, now: Duration, dirty_bytes: u64, decision: RoundDecision) {
        if self.rounds_detail.len() >= ROUNDS_DETAIL_MAX {
            // Keep the first half and the latest rounds: their numbers show the gap.
            self.rounds_detail.remove(ROUNDS_DETAIL_MAX / 2);
        }
        self.rounds_detail.push(RoundFigures {
            round: self.round,
            us: now.saturating_sub(self.round_start).as_micros() as u64,
            pages_data: self.round_pages.0,
            pages_zero: self.round_pages.1,
            bytes: self.round_sent,
            dirty_pages: dirty_bytes.div_ceil(PAGE_SIZE),
            throttle_pct: self.throttle_pct,
            decision,
        });
        self.round_start = now;
        self.round_pages = (0, 0);
        self.round_sent = 0;
    }

    /// The end of the current pre-copy round was sent on every data stream: the target's
    /// acknowledgement of it is awaited. Returns the round.
    pub fn round_end_sent(&mut self) -> Result<u32, InvalidTransition> {
        self.expect(SenderPhase::PreCopy, "end a round")?;
        self.awaiting_round = Some(self.round);
        Ok(self.round)
    }

    /// The round whose acknowledgement is awaited, if any.
    pub fn awaiting_round(&self) -> Option<u32> {
        self.awaiting_round
    }

    /// A frame from the target on the control stream, in the current phase.
    pub fn heard(&mut self, now: Duration, frame: Frame) -> Result<Heard, TargetAnswer> {
        let unexpected = |kind: FrameKind, context: &str| TargetAnswer::Unexpected {
            kind,
            context: context.to_owned(),
        };
        if self.phase == SenderPhase::Handshake && !self.welcomed {
            return match frame {
                Frame::Welcome { version }
                    if (self.offered.0..=self.offered.1).contains(&version) =>
                {
                    self.welcomed = true;
                    Ok(Heard::Welcomed(version))
                }
                Frame::Welcome { version } => Err(TargetAnswer::VersionNotOffered(version)),
                Frame::Refuse { reason } => {
                    self.answered = true;
                    self.refused = true;
                    Err(TargetAnswer::Refused(reason))
                }
                other => Err(unexpected(other.kind(), "in the handshake")),
            };
        }
        match (self.phase, frame) {
            (_, Frame::Failed { reason } | Frame::Abort { reason }) => {
                self.answered = true;
                Err(TargetAnswer::Failed(reason))
            }
            (SenderPhase::AwaitingAck, Frame::Running { timings }) => {
                self.phase = SenderPhase::Completed;
                let paused_at = self.paused_at.unwrap_or(now);
                let downtime = now.saturating_sub(paused_at);
                self.acked_downtime = Some(downtime);
                self.resent_after_mismatch = timings
                    .and_then(|t| t.pages_resent_after_checksum_mismatch)
                    .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
                self.downtime_steps = breakdown(paused_at, &self.pause_marks, timings, now);
                Ok(Heard::Running(downtime))
            }
            (SenderPhase::AwaitingAck, other) => {
                // Not "running": the target did not commit.
                self.answered = true;
                Err(unexpected(other.kind(), "instead of running"))
            }
            (SenderPhase::PreCopy, Frame::RoundAck { round })
                if self.awaiting_round == Some(round) =>
            {
                self.awaiting_round = None;
                Ok(Heard::RoundAcked(round))
            }
            (_, other) => Err(match self.awaiting_round {
                Some(r) => unexpected(
                    other.kind(),
                    &format!("while waiting for the end of round {r}"),
                ),
                None => unexpected(other.kind(), "from the target"),
            }),
        }
    }

    /// A round ended and the dirty log was fetched: `dirty_bytes` are dirty now. Returns the
    /// decision; on `Continue`/`Throttle` the next round has begun.
    pub fn synced(
        &mut self,
        now: Duration,
        dirty_bytes: u64,
    ) -> Result<Decision, InvalidTransition> {
        self.expect(SenderPhase::PreCopy, "sync the dirty log")?;
        let span = now.saturating_sub(self.last_sync).as_secs_f64();
        if span > 0.0 {
            self.dirty_rate = dirty_bytes as f64 / span;
        }
        self.last_sync = now;
        self.remaining = dirty_bytes;
        let decision = self.cfg.decide(&SyncInput {
            elapsed: now,
            remaining_bytes: dirty_bytes,
            previous_remaining_bytes: self.previous_remaining,
            round: self.round,
            throttle_pct: self.throttle_pct,
            bandwidth: self.bandwidth.bytes_per_sec(),
            dirty_bytes_per_sec: self.dirty_rate,
            round_sent_bytes: self.round_sent,
            fitted_before: self.fitted_in_a_row,
            release: self.release,
        });
        let fits = self
            .cfg
            .expected_downtime(dirty_bytes, self.bandwidth.bytes_per_sec())
            .is_some_and(|d| d <= self.cfg.downtime_budget);
        self.fitted_in_a_row = if fits { self.fitted_in_a_row + 1 } else { 0 };
        let leading = matches!(self.release, ThrottleRelease::Leading { since, .. }
            if now.saturating_sub(since) < self.cfg.throttle_release_lead);
        let kind = match decision {
            Decision::Continue if leading && fits => RoundDecision::Release,
            Decision::Continue if fits => RoundDecision::Shrink,
            Decision::Continue => RoundDecision::Continue,
            Decision::Throttle(p) if p < self.throttle_pct => RoundDecision::Release,
            Decision::Throttle(_) => RoundDecision::Throttle,
            Decision::SwitchOver { forced: false } => RoundDecision::SwitchOver,
            Decision::SwitchOver { forced: true } => RoundDecision::ForcedSwitchOver,
            Decision::Abort => RoundDecision::Abort,
        };
        // The throttle recorded is the one the round ran under (the decision changes it next).
        self.end_round(now, dirty_bytes, kind);
        self.awaiting_round = None;
        self.release = self.release.after(decision, self.throttle_pct, now);
        match decision {
            Decision::Continue => self.round += 1,
            Decision::Throttle(p) => {
                self.throttle_pct = p;
                self.throttle_max_pct = self.throttle_max_pct.max(p);
                self.round += 1;
            }
            Decision::SwitchOver { forced } => self.converged = !forced,
            Decision::Abort => {
                self.phase = SenderPhase::Failed;
                self.timed_out = true;
            }
        }
        self.previous_remaining = Some(dirty_bytes);
        Ok(decision)
    }

    /// When the shell may fetch the dirty log for the next sync: after the throttle's release
    /// before the switch-over, not before its lead has passed (the guest runs free meanwhile);
    /// `None` otherwise.
    pub fn sync_not_before(&self) -> Option<Duration> {
        match self.release {
            ThrottleRelease::Leading { since, .. } if self.phase == SenderPhase::PreCopy => {
                Some(since + self.cfg.throttle_release_lead)
            }
            _ => None,
        }
    }

    /// The source VM is paused: stop-and-copy begins.
    pub fn paused(&mut self, now: Duration) -> Result<(), InvalidTransition> {
        self.expect(SenderPhase::PreCopy, "pause the VM")?;
        if self.dirty_log_on && self.rounds_detail.last().map(|r| r.round) != Some(self.round) {
            // A pre-copy round that ended without a sync decision: the switch to post-copy.
            // Its remainder is owed (the report's `post_copy.pages_owed`), not dirty for a round.
            self.end_round(now, 0, RoundDecision::PostCopy);
        }
        self.phase = SenderPhase::StopAndCopy;
        self.paused_at = Some(now);
        self.round += 1;
        self.round_start = now;
        Ok(())
    }

    /// A source step of the pause ended at `now` having written `bytes` to the streams (for the
    /// report's breakdown). Steps come in their order, each once, between the pause and the
    /// target's answer.
    pub fn pause_step(
        &mut self,
        step: PauseStep,
        now: Duration,
        bytes: u64,
    ) -> Result<(), InvalidTransition> {
        if !matches!(
            self.phase,
            SenderPhase::StopAndCopy | SenderPhase::AwaitingAck
        ) {
            return Err(InvalidTransition {
                phase: self.phase,
                event: "time a step of the pause",
            });
        }
        let order = |s: PauseStep| SOURCE_STEPS.iter().position(|&x| x == s);
        let after_last = match self.pause_marks.last() {
            None => true,
            Some(&(last, ..)) => order(last) < order(step),
        };
        if order(step).is_none() || !after_last {
            return Err(InvalidTransition {
                phase: self.phase,
                event: "time a step of the pause out of order",
            });
        }
        self.pause_marks.push((step, now, bytes));
        if step == PauseStep::FinalPages {
            self.end_round(now, 0, RoundDecision::StopAndCopy);
        }
        Ok(())
    }

    /// The source VM's state was saved (paused, last pages sent). Returns the step due now,
    /// before the state frame: release the storage, then report [`Self::storage_released`].
    pub fn state_saved(&mut self) -> Result<StorageStep, InvalidTransition> {
        self.expect(SenderPhase::StopAndCopy, "save the state")?;
        if self.state_saved {
            return Err(InvalidTransition {
                phase: self.phase,
                event: "save the state twice",
            });
        }
        self.state_saved = true;
        Ok(StorageStep::Release)
    }

    /// The storage was released: the state, verify and commit frames may go out.
    pub fn storage_released(&mut self) -> Result<(), InvalidTransition> {
        self.expect(SenderPhase::StopAndCopy, "release the storage")?;
        if !self.state_saved || self.storage_released {
            return Err(InvalidTransition {
                phase: self.phase,
                event: "release the storage other than once after the state is saved",
            });
        }
        self.storage_released = true;
        Ok(())
    }

    /// The commit frame was written: from now on the source must not resume by itself.
    pub fn commit_sent(&mut self) -> Result<(), InvalidTransition> {
        self.expect(SenderPhase::StopAndCopy, "send commit")?;
        if !self.storage_released {
            return Err(InvalidTransition {
                phase: self.phase,
                event: "send commit before the storage is released",
            });
        }
        self.phase = SenderPhase::AwaitingAck;
        Ok(())
    }

    /// The target reports "running"; returns the downtime (pause → ack).
    pub fn running_acked(&mut self, now: Duration) -> Result<Duration, InvalidTransition> {
        self.expect(SenderPhase::AwaitingAck, "take a running ack")?;
        match self.heard(now, Frame::Running { timings: None }) {
            Ok(Heard::Running(d)) => Ok(d),
            _ => Err(InvalidTransition {
                phase: self.phase,
                event: "take a running ack",
            }),
        }
    }

    /// The migration failed or was cancelled. Returns what to do with the source VM: it
    /// depends only on the phase, and after Commit on whether the target answered.
    pub fn failed(&mut self) -> FailureAction {
        let action = match self.phase {
            SenderPhase::Handshake | SenderPhase::PreCopy => FailureAction::KeepRunning,
            SenderPhase::StopAndCopy => FailureAction::ResumeSource,
            SenderPhase::AwaitingAck if self.answered => FailureAction::ResumeSource,
            SenderPhase::AwaitingAck => FailureAction::InDoubt,
            // Completed: the VM runs on the target; nothing to undo. Failed: already handled,
            // the VM was resumed or never stopped (an Abort decision happens before any pause).
            SenderPhase::Completed => return FailureAction::InDoubt,
            SenderPhase::Failed => {
                if self.paused_at.is_some() {
                    FailureAction::ResumeSource
                } else {
                    FailureAction::KeepRunning
                }
            }
        };
        if self.phase != SenderPhase::Completed {
            self.phase = SenderPhase::Failed;
        }
        action
    }

    /// The migration ended as the shell saw it: what to undo, what to tell the target, and
    /// the outcome.
    pub fn finish(&mut self, ending: Ending) -> Cleanup {
        let completed = ending == Ending::Completed
            && self.phase == SenderPhase::Completed
            && (!self.post_copy_switched || self.post_copy_done);
        let action = (!completed).then(|| self.failed());
        // The outcome says whether the source runs: it must agree with the action.
        let outcome = if completed {
            Outcome::Completed
        } else if action == Some(FailureAction::InDoubt) && self.post_copy_switched {
            // Post-copy: the target either never resumed or cannot go on without the source's
            // pages; the source, stale once the target ran, stays paused (machine::postcopy).
            Outcome::FailedPostCopy
        } else if action == Some(FailureAction::InDoubt) {
            Outcome::InDoubt
        } else if self.refused {
            Outcome::Refused
        } else if self.timed_out {
            Outcome::TimedOut
        } else if ending == Ending::Cancelled {
            Outcome::Cancelled
        } else {
            Outcome::Failed
        };
        self.outcome = Some(outcome);
        Cleanup {
            action,
            tell_target: matches!(
                action,
                Some(FailureAction::KeepRunning | FailureAction::ResumeSource)
            ) && !self.answered,
            remove_throttle: action != Some(FailureAction::InDoubt),
            storage: (action == Some(FailureAction::ResumeSource)).then_some(StorageStep::Acquire),
            resume: action == Some(FailureAction::ResumeSource),
            stop_dirty_log: self.dirty_log_on,
            close_streams: !completed,
            outcome,
        }
    }

    /// The final report (times since start): `cleaned_up` is when the source VM was set
    /// right (resumed) after a failure, which ends a failed migration's pause; `now` is the end.
    /// `bytes_sent` counts every byte written, `pages_zero_skipped` the zero pages never sent.
    pub fn report(
        &self,
        cleaned_up: Duration,
        now: Duration,
        bytes_sent: u64,
        pages_zero_skipped: u64,
    ) -> MigrationReport {
        let outcome = self.outcome.unwrap_or(Outcome::Failed);
        let downtime = match (self.acked_downtime, self.paused_at) {
            (Some(d), _) if outcome == Outcome::Completed => d,
            (_, Some(p)) => cleaned_up.saturating_sub(p),
            (_, None) => Duration::ZERO,
        };
        MigrationReport {
            total_ms: now.as_millis() as u64,
            downtime_ms: downtime.as_millis() as u64,
            rounds: if self.dirty_log_on { self.round + 1 } else { 0 },
            bytes_sent,
            pages_zero_skipped,
            throttle_max_pct: self.throttle_max_pct,
            converged: self.converged && outcome == Outcome::Completed,
            outcome,
            downtime_steps: if outcome == Outcome::Completed {
                self.downtime_steps.clone().into_boxed_slice()
            } else {
                Box::default()
            },
            post_copy: self.post_copy.clone(),
            rounds_detail: self.rounds_detail(now),
            pages_resent_after_checksum_mismatch: self.resent_after_mismatch,
        }
    }

    /// The report's rounds: those that ended, then the one under way if the migration ended in
    /// it (`None` if the dirty log was never armed: no round counted).
    #[allow(clippy::box_collection)] // the report's field: one pointer wide
    fn rounds_detail(&self, now: Duration) -> Option<Box<Vec<RoundFigures>>> {
        if !self.dirty_log_on {
            return None;
        }
        let mut rounds = self.rounds_detail.clone();
        if rounds.last().map(|r| r.round) != Some(self.round) {
            rounds.push(RoundFigures {
                round: self.round,
                us: now.saturating_sub(self.round_start).as_micros() as u64,
                pages_data: self.round_pages.0,
                pages_zero: self.round_pages.1,
                bytes: self.round_sent,
                dirty_pages: 0,
                throttle_pct: self.throttle_pct,
                decision: RoundDecision::Unfinished,
            });
        }
        Some(Box::new(rounds))
    }

    /// The phase shown in progress reports.
    pub fn progress_phase(&self) -> ProgressPhase {
        match self.phase {
            SenderPhase::Handshake => ProgressPhase::Setup,
            SenderPhase::PreCopy => ProgressPhase::PreCopy,
            SenderPhase::StopAndCopy => ProgressPhase::StopAndCopy,
            SenderPhase::AwaitingAck | SenderPhase::Completed => ProgressPhase::Commit,
            // Only an Abort decision reports after failing: it came from a pre-copy sync.
            SenderPhase::Failed if self.paused_at.is_none() => ProgressPhase::PreCopy,
            SenderPhase::Failed => ProgressPhase::StopAndCopy,
        }
    }

    /// A progress snapshot, or `None` when the last one is younger than
    /// [`PROGRESS_INTERVAL`]. `milestone` (a sync, the pause, the commit) always reports, with
    /// the dirty bytes of the last sync as the remainder; within a round the remainder is
    /// `round_remaining`, what is left of the round.
    pub fn progress(
        &mut self,
        now: Duration,
        milestone: bool,
        bytes_sent: u64,
        round_remaining: u64,
    ) -> Option<Progress> {
        let since = now.saturating_sub(self.last_progress.unwrap_or(Duration::ZERO));
        if !milestone && since < PROGRESS_INTERVAL {
            return None;
        }
        self.last_progress = Some(now);
        let f = self.figures();
        Some(Progress {
            phase: self.progress_phase(),
            round: f.round,
            bytes_sent,
            bytes_remaining: if milestone {
                f.remaining_bytes
            } else {
                round_remaining
            },
            dirty_bytes_per_sec: f.dirty_bytes_per_sec,
            bandwidth_bytes_per_sec: f.bandwidth_bytes_per_sec.unwrap_or(0.0),
            expected_downtime_ms: f.expected_downtime.map(|d| d.as_secs_f64() * 1e3),
            throttle_pct: f.throttle_pct,
            elapsed_ms: now.as_millis() as u64,
        })
    }

    /// Figures for a progress report.
    pub fn figures(&self) -> SenderFigures {
        let bw = self.cfg.effective_bandwidth(self.bandwidth.bytes_per_sec());
        SenderFigures {
            round: self.round,
            remaining_bytes: self.remaining,
            dirty_bytes_per_sec: self.dirty_rate,
            bandwidth_bytes_per_sec: bw,
            expected_downtime: self.cfg.expected_downtime(self.remaining, bw),
            throttle_pct: self.throttle_pct,
            throttle_max_pct: self.throttle_max_pct,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn happy_path_walks_every_phase() {
        let mut s = Sender::new(ConvergenceConfig::default());
        assert_eq!(s.phase(), SenderPhase::Handshake);
        s.accepted(ms(1)).unwrap();
        s.sent(100 << 20, ms(100)).unwrap();
        assert_eq!(
            s.synced(ms(101), 1 << 20).unwrap(),
            Decision::SwitchOver { forced: false }
        );
        s.paused(ms(102)).unwrap();
        s.sent(1 << 20, ms(1)).unwrap();
        assert_eq!(s.state_saved(), Ok(StorageStep::Release));
        s.storage_released().unwrap();
        s.commit_sent().unwrap();
        assert_eq!(s.running_acked(ms(120)).unwrap(), ms(18));
        assert_eq!(s.phase(), SenderPhase::Completed);
        assert!(s.converged());
    }

    #[test]
    fn out_of_order_events_are_refused() {
        let mut s = Sender::new(ConvergenceConfig::default());
        assert!(s.synced(ms(1), 0).is_err());
        assert!(s.paused(ms(1)).is_err());
        assert!(s.commit_sent().is_err());
        assert!(s.running_acked(ms(1)).is_err());
        s.accepted(ms(1)).unwrap();
        assert!(s.accepted(ms(1)).is_err());
        assert!(s.commit_sent().is_err(), "commit needs a pause first");
    }

    /// Drives a sender through `script` (one word per event) from a fresh start.
    fn drive(script: &str) -> Sender {
        drive_logged(script).0
    }

    /// [`drive`], also returning the storage steps the machine ordered on the way.
    fn drive_logged(script: &str) -> (Sender, Vec<StorageStep>) {
        let mut ordered = Vec::new();
        let mut s = Sender::new(ConvergenceConfig {
            timeout: ms(1000),
            ..Default::default()
        })
        .with_versions((1, 2));
        let mut t = ms(0);
        for step in script.split_whitespace() {
            t += ms(10);
            let heard = |s: &mut Sender, f: Frame| {
                let _ = s.heard(t, f);
            };
            match step {
                "welcome" => assert_eq!(
                    s.heard(t, Frame::Welcome { version: 2 }),
                    Ok(Heard::Welcomed(2))
                ),
                "welcome9" => heard(&mut s, Frame::Welcome { version: 9 }),
                "refuse" => heard(
                    &mut s,
                    Frame::Refuse {
                        reason: "no".into(),
                    },
                ),
                "accept" => s.accepted(t).unwrap(),
                "arm" => s.dirty_log_armed().unwrap(),
                "round" => {
                    s.sent(1 << 20, ms(1)).unwrap();
                    let r = s.round_end_sent().unwrap();
                    assert_eq!(
                        s.heard(t, Frame::RoundAck { round: r }),
                        Ok(Heard::RoundAcked(r))
                    );
                }
                "converge" => assert_eq!(
                    s.synced(t, 0).unwrap(),
                    Decision::SwitchOver { forced: false }
                ),
                "timeout" => {
                    t += ms(2000);
                    assert_eq!(s.synced(t, 1 << 30).unwrap(), Decision::Abort);
                }
                "pause" => s.paused(t).unwrap(),
                "save" => ordered.push(s.state_saved().unwrap()),
                "released" => s.storage_released().unwrap(),
                "commit" => s.commit_sent().unwrap(),
                "failed" => heard(
                    &mut s,
                    Frame::Failed {
                        reason: "disk".into(),
                    },
                ),
                "junk" => heard(&mut s, Frame::Commit),
                "running" => assert!(matches!(
                    s.heard(t, Frame::Running { timings: None }),
                    Ok(Heard::Running(_))
                )),
                other => panic!("unknown step {other}"),
            }
        }
        (s, ordered)
    }

    fn show_cleanup(c: &Cleanup) -> String {
        let flags = [
            (c.tell_target, "tell-target"),
            (c.remove_throttle, "unthrottle"),
            (c.storage == Some(StorageStep::Acquire), "acquire"),
            (c.resume, "resume"),
            (c.stop_dirty_log, "stop-log"),
            (c.close_streams, "close"),
        ];
        let flags: Vec<_> = flags.iter().filter(|f| f.0).map(|f| f.1).collect();
        let action = c.action.map_or("-".to_string(), |a| format!("{a:?}"));
        format!("{:?} {action} {}", c.outcome, flags.join(","))
    }

    /// The whole outcome rule: phase, the target's answers and how the shell saw the end decide
    /// what happens to the source VM, whether the target is told, and the outcome.
    #[test]
    fn how_a_migration_ends_decides_the_source_vm_and_the_outcome() {
        let pre = "welcome accept arm round";
        let paused = "welcome accept arm round converge pause";
        let committed = format!("{paused} save released commit");
        let cases: Vec<(String, Ending)> = vec![
            ("".into(), Ending::Failed),
            ("refuse".into(), Ending::Failed),
            ("welcome9".into(), Ending::Failed),
            ("welcome accept".into(), Ending::Failed),
            (pre.into(), Ending::Cancelled),
            (pre.into(), Ending::LinkLost),
            (format!("{pre} failed"), Ending::Failed),
            (format!("{pre} timeout"), Ending::Failed),
            (paused.into(), Ending::Cancelled),
            (paused.into(), Ending::LinkLost),
            (format!("{paused} failed"), Ending::Failed),
            (format!("{paused} save"), Ending::Failed),
            (format!("{paused} save released"), Ending::Cancelled),
            (committed.clone(), Ending::NoAnswer),
            (committed.clone(), Ending::Cancelled),
            (format!("{committed} failed"), Ending::Failed),
            (format!("{committed} junk"), Ending::Failed),
            (format!("{committed} running"), Ending::Completed),
            (committed.clone(), Ending::Completed),
        ];
        let got: String = cases
            .iter()
            .map(|(script, ending)| {
                let c = drive(script).finish(*ending);
                let runs = matches!(
                    c.action,
                    Some(FailureAction::KeepRunning | FailureAction::ResumeSource)
                );
                assert_eq!(c.outcome.source_runs(), runs, "{script} + {ending:?}");
                format!("{script:>60} + {ending:?}: {}\n", show_cleanup(&c))
            })
            .collect();
        expect_test::expect![[r#"
                                                                         + Failed: Failed KeepRunning tell-target,unthrottle,close
                                                                  refuse + Failed: Refused KeepRunning unthrottle,close
                                                                welcome9 + Failed: Failed KeepRunning tell-target,unthrottle,close
                                                          welcome accept + Failed: Failed KeepRunning tell-target,unthrottle,close
                                                welcome accept arm round + Cancelled: Cancelled KeepRunning tell-target,unthrottle,stop-log,close
                                                welcome accept arm round + LinkLost: Failed KeepRunning tell-target,unthrottle,stop-log,close
                                         welcome accept arm round failed + Failed: Failed KeepRunning unthrottle,stop-log,close
                                        welcome accept arm round timeout + Failed: TimedOut KeepRunning tell-target,unthrottle,stop-log,close
                                 welcome accept arm round converge pause + Cancelled: Cancelled ResumeSource tell-target,unthrottle,acquire,resume,stop-log,close
                                 welcome accept arm round converge pause + LinkLost: Failed ResumeSource tell-target,unthrottle,acquire,resume,stop-log,close
                          welcome accept arm round converge pause failed + Failed: Failed ResumeSource unthrottle,acquire,resume,stop-log,close
                            welcome accept arm round converge pause save + Failed: Failed ResumeSource tell-target,unthrottle,acquire,resume,stop-log,close
                   welcome accept arm round converge pause save released + Cancelled: Cancelled ResumeSource tell-target,unthrottle,acquire,resume,stop-log,close
            welcome accept arm round converge pause save released commit + NoAnswer: InDoubt InDoubt stop-log,close
            welcome accept arm round converge pause save released commit + Cancelled: InDoubt InDoubt stop-log,close
            welcome accept arm round converge pause save released commit failed + Failed: Failed ResumeSource unthrottle,acquire,resume,stop-log,close
            welcome accept arm round converge pause save released commit junk + Failed: Failed ResumeSource unthrottle,acquire,resume,stop-log,close
            welcome accept arm round converge pause save released commit running + Completed: Completed - unthrottle,stop-log
            welcome accept arm round converge pause save released commit + Completed: InDoubt InDoubt stop-log,close
        "#]].assert_eq(&got);
    }

    /// The storage hooks, by how the migration ends: the release is ordered once, after the
    /// pause and the saved state, before anything that lets the target run; the source takes
    /// its storage back before every resume, and never while in doubt or after completion.
    #[test]
    fn storage_is_released_at_switch_over_and_taken_back_before_every_resume() {
        let pre = "welcome accept arm round";
        let paused = "welcome accept arm round converge pause";
        let committed = format!("{paused} save released commit");
        let cases: Vec<(String, Ending)> = vec![
            ("refuse".into(), Ending::Failed),
            (pre.into(), Ending::Cancelled),
            (format!("{pre} timeout"), Ending::Failed),
            (paused.into(), Ending::Cancelled),
            (paused.into(), Ending::LinkLost),
            // The release itself failed.
            (format!("{paused} save"), Ending::Failed),
            (format!("{paused} save released"), Ending::Cancelled),
            (format!("{paused} save released"), Ending::LinkLost),
            (committed.clone(), Ending::NoAnswer),
            (format!("{committed} failed"), Ending::Failed),
            (format!("{committed} junk"), Ending::Failed),
            (format!("{committed} running"), Ending::Completed),
        ];
        let got: String = cases
            .iter()
            .map(|(script, ending)| {
                let (mut s, mut hooks) = drive_logged(script);
                let c = s.finish(*ending);
                assert_eq!(
                    c.storage.is_some(),
                    c.action == Some(FailureAction::ResumeSource),
                    "{script} + {ending:?}: the storage comes back exactly when the source resumes"
                );
                hooks.extend(c.storage);
                let hooks: Vec<_> = hooks.iter().map(|h| format!("{h:?}")).collect();
                format!(
                    "{script:>60} + {ending:?}: {:?} [{}]\n",
                    c.outcome,
                    hooks.join(" ")
                )
            })
            .collect();
        expect_test::expect![[r#"
                                                                  refuse + Failed: Refused []
                                                welcome accept arm round + Cancelled: Cancelled []
                                        welcome accept arm round timeout + Failed: TimedOut []
                                 welcome accept arm round converge pause + Cancelled: Cancelled [Acquire]
                                 welcome accept arm round converge pause + LinkLost: Failed [Acquire]
                            welcome accept arm round converge pause save + Failed: Failed [Release Acquire]
                   welcome accept arm round converge pause save released + Cancelled: Cancelled [Release Acquire]
                   welcome accept arm round converge pause save released + LinkLost: Failed [Release Acquire]
            welcome accept arm round converge pause save released commit + NoAnswer: InDoubt [Release]
            welcome accept arm round converge pause save released commit failed + Failed: Failed [Release Acquire]
            welcome accept arm round converge pause save released commit junk + Failed: Failed [Release Acquire]
            welcome accept arm round converge pause save released commit running + Completed: Completed [Release]
        "#]].assert_eq(&got);
    }

    #[test]
    fn storage_steps_are_refused_out_of_order() {
        let mut s = drive("welcome accept arm round converge");
        assert_eq!(
            s.state_saved().unwrap_err().to_string(),
            "Migration sender cannot save the state while in phase PreCopy"
        );
        let mut s = drive("welcome accept arm round converge pause");
        assert!(
            s.storage_released().is_err(),
            "release before the state is saved"
        );
        assert_eq!(
            s.commit_sent().unwrap_err().event,
            "send commit before the storage is released"
        );
        assert_eq!(s.state_saved(), Ok(StorageStep::Release));
        assert!(s.state_saved().is_err(), "the state is saved once");
        assert_eq!(
            s.commit_sent().unwrap_err().event,
            "send commit before the storage is released",
            "a release that did not succeed does not let the commit out"
        );
        s.storage_released().unwrap();
        assert!(s.storage_released().is_err(), "released once");
        s.commit_sent().unwrap();
        assert!(s.state_saved().is_err(), "after commit");
    }

    #[test]
    fn answers_are_read_in_the_phase() {
        let cases = [
            ("", Frame::Welcome { version: 1 }),
            ("", Frame::Welcome { version: 3 }),
            (
                "",
                Frame::Refuse {
                    reason: "vCPU count differs".into(),
                },
            ),
            ("", Frame::Failed { reason: "x".into() }),
            ("welcome accept", Frame::RoundAck { round: 0 }),
            (
                "welcome accept",
                Frame::Abort {
                    reason: "stop".into(),
                },
            ),
            ("welcome accept", Frame::Welcome { version: 1 }),
            (
                "welcome accept arm round converge pause save released commit",
                Frame::Running { timings: None },
            ),
            (
                "welcome accept arm round converge pause save released commit",
                Frame::RoundAck { round: 0 },
            ),
            (
                "welcome accept arm round converge pause",
                Frame::Running { timings: None },
            ),
        ];
        let mut got = String::new();
        for (script, frame) in cases {
            let mut s = drive(script);
            let kind = frame.kind();
            got += &format!("{:?} {kind:?}: {:?}\n", s.phase(), s.heard(ms(100), frame));
        }
        // While a round's end is awaited, only its acknowledgement fits.
        let mut s = drive("welcome accept arm");
        assert_eq!(s.round_end_sent(), Ok(0));
        got += &format!(
            "awaiting 0 RoundAck 1: {:?}\n",
            s.heard(ms(100), Frame::RoundAck { round: 1 })
        );
        expect_test::expect![[r#"
            Handshake Welcome: Ok(Welcomed(1))
            Handshake Welcome: Err(VersionNotOffered(3))
            Handshake Refuse: Err(Refused("vCPU count differs"))
            Handshake Failed: Err(Unexpected { kind: Failed, context: "in the handshake" })
            PreCopy RoundAck: Err(Unexpected { kind: RoundAck, context: "from the target" })
            PreCopy Abort: Err(Failed("stop"))
            PreCopy Welcome: Err(Unexpected { kind: Welcome, context: "from the target" })
            AwaitingAck Running: Ok(Running(40ms))
            AwaitingAck RoundAck: Err(Unexpected { kind: RoundAck, context: "instead of running" })
            StopAndCopy Running: Err(Unexpected { kind: Running, context: "from the target" })
            awaiting 0 RoundAck 1: Err(Unexpected { kind: RoundAck, context: "while waiting for the end of round 0" })
        "#]].assert_eq(&got);
    }

    #[test]
    fn report_counts_rounds_downtime_and_convergence() {
        let mut s = drive("welcome accept arm round converge pause save released commit running");
        s.finish(Ending::Completed);
        let r = s.report(ms(400), ms(500), 1234, 7);
        assert_eq!(
            (
                r.outcome,
                r.rounds,
                r.downtime_ms,
                r.total_ms,
                r.bytes_sent,
                r.pages_zero_skipped,
                r.converged
            ),
            // Paused at the 6th step, running at the 10th: 10 ms a step.
            (Outcome::Completed, 2, 40, 500, 1234, 7, true)
        );
        // Failed while paused: the pause lasts until the report (the source was resumed).
        let mut s = drive("welcome accept arm round converge pause");
        s.finish(Ending::LinkLost);
        let r = s.report(ms(200), ms(300), 0, 0);
        assert_eq!(
            (r.outcome, r.rounds, r.downtime_ms, r.total_ms, r.converged),
            (Outcome::Failed, 2, 140, 300, false)
        );
        // Refused: no round ran.
        let mut s = drive("refuse");
        s.finish(Ending::Failed);
        assert_eq!(s.report(ms(20), ms(20), 10, 0).rounds, 0);
    }

    #[test]
    fn the_report_lists_the_first_and_the_latest_rounds_of_a_long_migration() {
        let mut s = Sender::new(ConvergenceConfig::default()).with_versions((1, 2));
        s.heard(ms(0), Frame::Welcome { version: 2 }).unwrap();
        s.accepted(ms(1)).unwrap();
        s.dirty_log_armed().unwrap();
        let n = 3 * ROUNDS_DETAIL_MAX as u64;
        for i in 0..n {
            // an idle guest's rounds that never fit: a link of 1 kB/s
            s.sent(1, ms(1)).unwrap();
            let r = s.round_end_sent().unwrap();
            s.heard(ms(2 + i), Frame::RoundAck { round: r }).unwrap();
            let d = s.synced(ms(2 + i), 4096).unwrap();
            assert!(
                matches!(d, Decision::Continue | Decision::Throttle(_)),
                "{d:?}"
            );
        }
        s.finish(Ending::Failed);
        let r = s.report(ms(n + 2), ms(n + 2), n, 0);
        let rounds = *r.rounds_detail.unwrap();
        assert_eq!(
            rounds.len(),
            ROUNDS_DETAIL_MAX + 1,
            "the cap and the unfinished round"
        );
        let numbers: Vec<u32> = rounds.iter().map(|d| d.round).collect();
        let half = ROUNDS_DETAIL_MAX / 2;
        assert_eq!(numbers[..half], (0..half as u32).collect::<Vec<_>>());
        let last = n as u32;
        let first_late = last + 1 - (ROUNDS_DETAIL_MAX - half + 1) as u32;
        assert_eq!(numbers[half..], (first_late..=last).collect::<Vec<_>>());
        assert_eq!(rounds.last().unwrap().decision, RoundDecision::Unfinished);
        assert_eq!(r.rounds, last + 1, "every round still counted");
    }

    #[test]
    fn the_rounds_in_the_report_add_up_to_its_totals() {
        // About 1 MiB per ms: a saturated full copy (throttled), a round whose remainder fits
        // the budget but is worth shrinking, one that switches over, then the stop-and-copy.
        // (The throttle's release before the pause is off here: its rounds have their own test.)
        let mut s = Sender::new(ConvergenceConfig {
            throttle_release_lead: Duration::ZERO,
            ..Default::default()
        })
        .with_versions((1, 2));
        s.heard(ms(0), Frame::Welcome { version: 2 }).unwrap();
        s.accepted(ms(1)).unwrap();
        s.dirty_log_armed().unwrap();
        let round = |s: &mut Sender, data: u64, zero: u64, bytes: u64, at: u64, dirty: u64| {
            s.pages(data, zero);
            s.sent(bytes, ms(bytes >> 20)).unwrap();
            let r = s.round_end_sent().unwrap();
            s.heard(ms(at), Frame::RoundAck { round: r }).unwrap();
            s.synced(ms(at), dirty).unwrap()
        };
        assert_eq!(
            round(&mut s, 66_000, 500, 260 << 20, 261, 256 << 20),
            Decision::Throttle(90.0)
        );
        assert_eq!(
            round(&mut s, 65_536, 0, 256 << 20, 517, 20 << 20),
            Decision::Continue
        );
        assert_eq!(
            round(&mut s, 5_120, 0, 20 << 20, 537, 64 << 10),
            Decision::SwitchOver { forced: false }
        );
        s.paused(ms(540)).unwrap();
        s.pages(14, 2);
        s.sent(70_000, ms(1)).unwrap();
        s.pause_step(PauseStep::DirtyLog, ms(541), 0).unwrap();
        s.pause_step(PauseStep::FinalPages, ms(543), 70_000)
            .unwrap();
        s.state_saved().unwrap();
        s.storage_released().unwrap();
        s.commit_sent().unwrap();
        s.heard(ms(560), Frame::Running { timings: None }).unwrap();
        s.finish(Ending::Completed);
        let total_sent = (260u64 << 20) + (256 << 20) + (20 << 20) + 70_000;
        let r = s.report(ms(560), ms(560), total_sent, 502);
        let rounds = *r.rounds_detail.clone().unwrap();
        let shown: Vec<_> = rounds
            .iter()
            .map(|d| {
                format!(
                    "{} {}us {}+{} {}B dirty {} at {}% {}",
                    d.round,
                    d.us,
                    d.pages_data,
                    d.pages_zero,
                    d.bytes,
                    d.dirty_pages,
                    d.throttle_pct,
                    d.decision.as_str()
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                "0 260000us 66000+500 272629760B dirty 65536 at 0% throttle",
                "1 256000us 65536+0 268435456B dirty 5120 at 90% shrink",
                "2 20000us 5120+0 20971520B dirty 16 at 90% switch_over",
                "3 3000us 14+2 70000B dirty 0 at 90% stop_and_copy",
            ]
        );
        assert_eq!(rounds.len() as u32, r.rounds);
        assert_eq!(rounds.iter().map(|d| d.bytes).sum::<u64>(), r.bytes_sent);
        let round_ms = rounds.iter().map(|d| d.us).sum::<u64>() / 1000;
        assert!(
            round_ms <= r.total_ms,
            "{round_ms} ms of rounds in {} ms",
            r.total_ms
        );

        // Failed in the middle of a round: that round is there, unfinished, and still counted.
        let mut s = drive("welcome accept arm round");
        s.pages(10, 1);
        s.finish(Ending::LinkLost);
        let r = s.report(ms(100), ms(100), 1 << 20, 0);
        let rounds = *r.rounds_detail.clone().unwrap();
        assert_eq!(rounds.len() as u32, r.rounds);
        assert_eq!(rounds[0].decision, RoundDecision::Unfinished);
        assert_eq!((rounds[0].pages_data, rounds[0].bytes), (10, 1 << 20));
        // No round ran: no rounds.
        let mut s = drive("refuse");
        s.finish(Ending::Failed);
        assert_eq!(s.report(ms(20), ms(20), 10, 0).rounds_detail, None);
    }

    #[test]
    fn the_pause_breaks_down_into_steps_that_add_up_to_the_downtime() {
        let us = |v: u64| Duration::from_micros(v);
        let mut s = drive("welcome accept arm round converge pause");
        let p = s.paused_at().unwrap();
        s.pause_step(PauseStep::DirtyLog, p + us(400), 0).unwrap();
        s.pause_step(PauseStep::FinalPages, p + us(3_400), 2 << 20)
            .unwrap();
        assert!(
            s.pause_step(PauseStep::DirtyLog, p + us(3_500), 0).is_err(),
            "steps come in order, once"
        );
        assert!(
            s.pause_step(PauseStep::TargetData, p + us(3_500), 0)
                .is_err()
        );
        s.state_saved().unwrap();
        s.pause_step(PauseStep::SaveState, p + us(3_600), 0)
            .unwrap();
        s.storage_released().unwrap();
        s.pause_step(PauseStep::ReleaseStorage, p + us(3_610), 0)
            .unwrap();
        s.commit_sent().unwrap();
        s.pause_step(PauseStep::StateSent, p + us(3_700), 9_000)
            .unwrap();
        assert!(
            s.pause_step(PauseStep::StateSent, p + us(3_800), 0)
                .is_err()
        );
        let timings = TargetTimings {
            data_us: 100,
            verify_us: 0,
            restore_us: 1_000,
            resume_us: 200,
            pages_resent_after_checksum_mismatch: Some(4),
        };
        let acked = p + us(5_500);
        assert_eq!(
            s.heard(
                acked,
                Frame::Running {
                    timings: Some(timings)
                }
            ),
            Ok(Heard::Running(us(5_500)))
        );
        s.finish(Ending::Completed);
        let r = s.report(acked, acked, 0, 0);
        assert_eq!(r.pages_resent_after_checksum_mismatch, Some(4));
        let shown: Vec<_> = r
            .downtime_steps
            .iter()
            .map(|d| format!("{} {} {}", d.step.as_str(), d.us, d.bytes))
            .collect();
        expect_test::expect![[r#"
            [
                "dirty_log 400 0",
                "final_pages 3000 2097152",
                "save_state 200 0",
                "release_storage 10 0",
                "state_sent 90 9000",
                "target_data 100 0",
                "target_restore 1000 0",
                "target_resume 200 0",
                "ack 500 0",
            ]
        "#]]
        .assert_debug_eq(&shown);
        let sum: u64 = r.downtime_steps.iter().map(|d| d.us).sum();
        assert_eq!(sum, 5_500);
        assert_eq!(r.downtime_ms, 5);

        // The target's figures never exceed the window they happened in; without them (a
        // protocol 1 target) the window is one step.
        let marks = [(PauseStep::StateSent, us(1_000), 0)];
        let long = TargetTimings {
            data_us: 10_000,
            verify_us: 7,
            restore_us: 5,
            resume_us: 5,
            pages_resent_after_checksum_mismatch: None,
        };
        let fitted = breakdown(Duration::ZERO, &marks, Some(long), us(3_000));
        assert_eq!(fitted.iter().map(|d| d.us).sum::<u64>(), 3_000);
        assert_eq!(fitted[1].us, 2_000);
        assert!(fitted[2..].iter().all(|d| d.us == 0));
        let old = breakdown(Duration::ZERO, &marks, None, us(3_000));
        assert_eq!(
            old.iter().map(|d| (d.step, d.us)).collect::<Vec<_>>(),
            [(PauseStep::StateSent, 1_000), (PauseStep::Ack, 2_000)]
        );
        // Only a completed migration reports steps.
        let mut s = drive("welcome accept arm round converge pause");
        s.finish(Ending::LinkLost);
        assert!(s.report(ms(200), ms(300), 0, 0).downtime_steps.is_empty());
    }

    #[test]
    fn options_are_checked_before_connecting() {
        let cfg = ConvergenceConfig::default();
        assert_eq!(check_options(2, &cfg), Ok(()));
        assert_eq!(check_options(MAX_STREAMS, &cfg), Ok(()));
        assert_eq!(
            check_options(0, &cfg).unwrap_err().to_string(),
            "streams must be 1..=64, got 0"
        );
        assert_eq!(check_options(65, &cfg), Err(InvalidOptions::Streams(65)));
        let capped = ConvergenceConfig {
            max_bandwidth: Some(0),
            ..Default::default()
        };
        assert_eq!(
            check_options(1, &capped),
            Err(InvalidOptions::ZeroBandwidth)
        );
    }

    #[test]
    fn progress_is_rate_limited_except_at_milestones() {
        let mut s = drive("welcome accept arm");
        assert!(s.progress(ms(50), false, 0, 10).is_none(), "first 100 ms");
        let p = s.progress(ms(120), false, 100, 10).unwrap();
        assert_eq!(
            (p.phase, p.bytes_remaining, p.elapsed_ms),
            (ProgressPhase::PreCopy, 10, 120)
        );
        assert!(s.progress(ms(150), false, 0, 10).is_none());
        let p = s.progress(ms(160), true, 0, 10).unwrap();
        assert_eq!(
            p.bytes_remaining, 0,
            "a milestone shows the last sync's remainder"
        );
        let mut s = drive("welcome accept arm round timeout");
        assert_eq!(
            s.progress(ms(3000), true, 0, 0).unwrap().phase,
            ProgressPhase::PreCopy
        );
        let mut s = drive("welcome accept arm round converge pause save released commit");
        assert_eq!(
            s.progress(ms(3000), true, 0, 0).unwrap().phase,
            ProgressPhase::Commit
        );
        assert!(!s.cancellable(), "no cancel after commit");
    }

    #[test]
    fn throttle_rises_while_the_remainder_stays_high() {
        let mut s = Sender::new(ConvergenceConfig::default());
        s.accepted(ms(0)).unwrap();
        let mut t = 0;
        let mut seen = vec![];
        for _ in 0..6 {
            t += 100;
            s.sent(100 << 20, ms(100)).unwrap(); // ~1 GB/s
            if let Decision::Throttle(p) = s.synced(ms(t), 200 << 20).unwrap() {
                seen.push(p);
            }
        }
        // Re-dirtying 200 MiB per 100 MiB round at ~1 GB/s: the working set is saturated, so
        // the throttle starts at its saturated strength right after the full copy (round 0),
        // then climbs (the run share halves, or what halving the remainder needs) while the
        // remainder does not fall, up to the cap.
        assert_eq!(seen, vec![90.0, 97.5, 99.38, 99.85, 99.9]);
        assert_eq!(s.figures().throttle_max_pct, 99.9);
        assert_eq!(s.round(), 6);
    }

    #[test]
    fn round_zero_throttles_only_a_saturated_working_set() {
        // Moderate: the full copy sent 300 MiB while 80 MiB were dirtied: above the budget, but
        // no throttle after round 0, and the next round's remainder converges (at the first
        // fit: no rounds to shrink the pause here).
        let first_fit = ConvergenceConfig {
            shrink_rounds_max: 0,
            ..Default::default()
        };
        let mut s = Sender::new(first_fit.clone());
        s.accepted(ms(0)).unwrap();
        s.sent(300 << 20, ms(300)).unwrap();
        assert_eq!(s.synced(ms(300), 80 << 20).unwrap(), Decision::Continue);
        s.sent(80 << 20, ms(80)).unwrap();
        assert_eq!(
            s.synced(ms(380), 6 << 20).unwrap(),
            Decision::SwitchOver { forced: false }
        );
        assert_eq!(s.figures().throttle_max_pct, 0.0);
        // Saturated: the full copy sent 260 MiB and 256 MiB of it were dirty again.
        let mut s = Sender::new(first_fit);
        s.accepted(ms(0)).unwrap();
        s.sent(260 << 20, ms(260)).unwrap();
        assert_eq!(
            s.synced(ms(260), 256 << 20).unwrap(),
            Decision::Throttle(90.0)
        );
        // Under that throttle the second round leaves little: the throttle is lifted for the
        // lead, and the switch-over follows after round 2, having sent the working set twice
        // rather than once per throttle step.
        s.sent(256 << 20, ms(256)).unwrap();
        assert_eq!(s.synced(ms(516), 4 << 20).unwrap(), Decision::Throttle(0.0));
        s.sent(4 << 20, ms(4)).unwrap();
        assert_eq!(
            s.synced(ms(526), 6 << 20).unwrap(),
            Decision::SwitchOver { forced: false }
        );
        assert_eq!(s.round(), 2);
    }

    #[test]
    fn a_throttled_migration_runs_free_for_the_lead_before_its_pause() {
        let cfg = ConvergenceConfig {
            shrink_rounds_max: 0,
            ..Default::default()
        };
        let lead = cfg.throttle_release_lead;
        let mut s = Sender::new(cfg.clone());
        s.accepted(ms(0)).unwrap();
        assert_eq!(s.sync_not_before(), None);
        s.sent(260 << 20, ms(260)).unwrap();
        assert_eq!(
            s.synced(ms(260), 256 << 20).unwrap(),
            Decision::Throttle(90.0)
        );
        assert_eq!(s.sync_not_before(), None, "no wait while throttled");
        s.sent(256 << 20, ms(256)).unwrap();
        assert_eq!(s.synced(ms(516), 4 << 20).unwrap(), Decision::Throttle(0.0));
        // The shell waits out the lead before the next sync.
        assert_eq!(s.sync_not_before(), Some(ms(516) + lead));
        s.sent(4 << 20, ms(4)).unwrap();
        assert_eq!(
            s.synced(ms(516) + lead, 5 << 20).unwrap(),
            Decision::SwitchOver { forced: false }
        );
        assert_eq!(s.sync_not_before(), None);
        let kinds: Vec<_> = s
            .rounds_detail
            .iter()
            .map(|r| (r.decision, r.throttle_pct))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (RoundDecision::Throttle, 0.0),
                (RoundDecision::Release, 90.0),
                (RoundDecision::SwitchOver, 0.0),
            ],
            "the round after the release ran unthrottled"
        );
        assert_eq!(s.figures().throttle_max_pct, 90.0);

        // Running free the guest dirtied past the budget: the throttle goes back on (once), and
        // the switch-over comes under it.
        let mut s = Sender::new(cfg);
        s.accepted(ms(0)).unwrap();
        s.sent(260 << 20, ms(260)).unwrap();
        s.synced(ms(260), 256 << 20).unwrap();
        s.sent(256 << 20, ms(256)).unwrap();
        assert_eq!(s.synced(ms(516), 4 << 20).unwrap(), Decision::Throttle(0.0));
        s.sent(4 << 20, ms(4)).unwrap();
        assert_eq!(
            s.synced(ms(516) + lead, 200 << 20).unwrap(),
            Decision::Throttle(90.0)
        );
        assert_eq!(s.sync_not_before(), None);
        s.sent(200 << 20, ms(200)).unwrap();
        assert_eq!(
            s.synced(ms(730) + lead, 3 << 20).unwrap(),
            Decision::SwitchOver { forced: false }
        );
        let last = s.rounds_detail.last().unwrap();
        assert_eq!(
            (last.decision, last.throttle_pct),
            (RoundDecision::SwitchOver, 90.0)
        );
    }

    #[test]
    fn abort_decision_ends_the_machine_without_a_pause() {
        let mut s = Sender::new(ConvergenceConfig {
            timeout: ms(50),
            ..Default::default()
        });
        s.accepted(ms(0)).unwrap();
        s.sent(1 << 20, ms(100)).unwrap();
        assert_eq!(s.synced(ms(100), 1 << 30).unwrap(), Decision::Abort);
        assert_eq!(s.phase(), SenderPhase::Failed);
        assert_eq!(s.failed(), FailureAction::KeepRunning);
    }
}

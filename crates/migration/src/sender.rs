//! The source side's state machine: phases, rounds, dirty-sync input, the convergence decision
//! and what a failure means for the source VM. No I/O, no clock: time is passed in.

use std::time::Duration;

use crate::policy::{BandwidthEstimator, ConvergenceConfig, Decision, SyncInput};

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

/// The source's state machine.
#[derive(Debug, Clone)]
pub struct Sender {
    cfg: ConvergenceConfig,
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
    paused_at: Option<Duration>,
    converged: bool,
}

impl Sender {
    /// A sender that has just sent its hello.
    pub fn new(cfg: ConvergenceConfig) -> Self {
        let bandwidth = BandwidthEstimator::new(cfg.bandwidth_window);
        Self {
            cfg,
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
            paused_at: None,
            converged: false,
        }
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

    /// The target welcomed us: round 0 (every page) starts. The dirty log must be armed
    /// before the first page is read.
    pub fn accepted(&mut self, now: Duration) -> Result<(), InvalidTransition> {
        self.expect(SenderPhase::Handshake, "accept a welcome")?;
        self.phase = SenderPhase::PreCopy;
        self.last_sync = now;
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
        });
        self.round_sent = 0;
        match decision {
            Decision::Continue => self.round += 1,
            Decision::Throttle(p) => {
                self.throttle_pct = p;
                self.throttle_max_pct = self.throttle_max_pct.max(p);
                self.round += 1;
            }
            Decision::SwitchOver { forced } => self.converged = !forced,
            Decision::Abort => self.phase = SenderPhase::Failed,
        }
        self.previous_remaining = Some(dirty_bytes);
        Ok(decision)
    }

    /// The source VM is paused: stop-and-copy begins.
    pub fn paused(&mut self, now: Duration) -> Result<(), InvalidTransition> {
        self.expect(SenderPhase::PreCopy, "pause the VM")?;
        self.phase = SenderPhase::StopAndCopy;
        self.paused_at = Some(now);
        self.round += 1;
        Ok(())
    }

    /// The commit frame was written: from now on the source must not resume by itself.
    pub fn commit_sent(&mut self) -> Result<(), InvalidTransition> {
        self.expect(SenderPhase::StopAndCopy, "send commit")?;
        self.phase = SenderPhase::AwaitingAck;
        Ok(())
    }

    /// The target reports "running"; returns the downtime (pause → ack).
    pub fn running_acked(&mut self, now: Duration) -> Result<Duration, InvalidTransition> {
        self.expect(SenderPhase::AwaitingAck, "take a running ack")?;
        self.phase = SenderPhase::Completed;
        Ok(now.saturating_sub(self.paused_at.unwrap_or(now)))
    }

    /// The migration failed or was cancelled (including a `Failed` answer to commit, which
    /// `target_answered` says). Returns what to do with the source VM.
    pub fn failed(&mut self, target_answered: bool) -> FailureAction {
        let action = match self.phase {
            SenderPhase::Handshake | SenderPhase::PreCopy => FailureAction::KeepRunning,
            SenderPhase::StopAndCopy => FailureAction::ResumeSource,
            SenderPhase::AwaitingAck if target_answered => FailureAction::ResumeSource,
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

    #[test]
    fn failure_action_depends_on_the_phase() {
        let cases: [(&[&str], bool, FailureAction); 6] = [
            (&[], false, FailureAction::KeepRunning),
            (&["accept"], false, FailureAction::KeepRunning),
            (&["accept", "pause"], false, FailureAction::ResumeSource),
            (
                &["accept", "pause", "commit"],
                true,
                FailureAction::ResumeSource,
            ),
            (
                &["accept", "pause", "commit"],
                false,
                FailureAction::InDoubt,
            ),
            (
                &["accept", "pause", "fail"],
                false,
                FailureAction::ResumeSource,
            ),
        ];
        for (steps, answered, want) in cases {
            let mut s = Sender::new(ConvergenceConfig::default());
            for step in steps {
                match *step {
                    "accept" => s.accepted(ms(0)).unwrap(),
                    "pause" => s.paused(ms(0)).unwrap(),
                    "commit" => s.commit_sent().unwrap(),
                    "fail" => {
                        s.failed(false);
                    }
                    _ => unreachable!(),
                }
            }
            assert_eq!(s.failed(answered), want, "after {steps:?}");
            assert_eq!(s.phase(), SenderPhase::Failed);
        }
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
        // then follows the measured rate up to the cap.
        assert_eq!(seen, vec![99.0, 99.88, 99.9]);
        assert_eq!(s.figures().throttle_max_pct, 99.9);
        assert_eq!(s.round(), 6);
    }

    #[test]
    fn round_zero_throttles_only_a_saturated_working_set() {
        // Moderate: the full copy sent 300 MiB while 80 MiB were dirtied: above the budget, but
        // no throttle after round 0, and the next round's remainder converges.
        let mut s = Sender::new(ConvergenceConfig::default());
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
        let mut s = Sender::new(ConvergenceConfig::default());
        s.accepted(ms(0)).unwrap();
        s.sent(260 << 20, ms(260)).unwrap();
        assert_eq!(
            s.synced(ms(260), 256 << 20).unwrap(),
            Decision::Throttle(99.0)
        );
        // Under that throttle the second round leaves little: switch over after round 1, having
        // sent the working set twice rather than once per throttle step.
        s.sent(256 << 20, ms(256)).unwrap();
        assert_eq!(
            s.synced(ms(516), 4 << 20).unwrap(),
            Decision::SwitchOver { forced: false }
        );
        assert_eq!(s.round(), 1);
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
        assert_eq!(s.failed(false), FailureAction::KeepRunning);
    }
}

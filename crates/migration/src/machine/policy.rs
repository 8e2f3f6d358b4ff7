//! Convergence policy: bandwidth estimate, the switch-over rule, the throttle schedule, the
//! timeout, and the bandwidth cap's token bucket. Pure: every time is passed in.

use std::collections::VecDeque;
use std::time::Duration;

/// What to do when the timeout passes before the migration converged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnTimeout {
    /// Give up: the source keeps running (the default).
    #[default]
    Abort,
    /// Switch over anyway, accepting a longer pause.
    Force,
}

/// Knobs of the convergence policy.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvergenceConfig {
    /// Largest acceptable pause (source pause → target running). Default 50 ms.
    pub downtime_budget: Duration,
    /// Give up (or force) after this long. Default 60 s.
    pub timeout: Duration,
    /// What to do at the timeout.
    pub on_timeout: OnTimeout,
    /// Bandwidth cap in bytes/s, if any (the estimate never exceeds it).
    pub max_bandwidth: Option<u64>,
    /// Expected size of the saved VM state, sent during the pause.
    pub state_bytes_estimate: u64,
    /// Expected time for the target to restore and resume, and the commit round trip.
    pub restore_estimate: Duration,
    /// Sending time the bandwidth window covers.
    pub bandwidth_window: Duration,
    /// Throttling starts only from this round on (round 0 is the full copy).
    pub throttle_from_round: u32,
    /// First throttle step, percent of vCPU time taken away.
    pub throttle_initial_pct: f64,
    /// Highest throttle, percent (below 100: the vCPUs always get some run time per slice).
    pub throttle_max_pct: f64,
    /// Each further step multiplies the vCPUs' remaining run share by this (0..1): steps grow.
    pub throttle_run_factor: f64,
    /// Throttle applied at once, from any round (round 0 included), when the guest re-dirtied
    /// at least half of what the round just sent: its measured dirty rate is then only a lower
    /// bound (the working set saturated), and a gentler start would re-send the whole working
    /// set once per step. 90 % by default: strong enough that the next round's remainder
    /// usually halves, and the schedule climbs from there only while it does not (99 % at once
    /// froze the guest for the whole round: its loop gaps, not the switch-over, were the pause).
    pub throttle_saturated_pct: f64,
    /// Length of one throttle slice (run + sleep); at most 10 ms.
    pub throttle_slice: Duration,
    /// How long the guest runs unthrottled before the switch-over ([`ThrottleRelease`]): once
    /// a throttled migration's remainder fits the budget, the throttle is lifted and the next
    /// sync waits until this much time has passed, so the pause does not land in the middle of
    /// work the throttle had stretched (at 90 % a task of 5 ms takes 50 ms: that stretch, not
    /// the switch-over, was the longest interruption the guest saw). One slice by default;
    /// zero keeps the throttle on through the pause.
    pub throttle_release_lead: Duration,
    /// Once the remainder fits the budget, at most this many more rounds to shrink the pause
    /// (each only if predicted to pay: [`Self::shrink_pays`]; 0: switch over at the first fit).
    pub shrink_rounds_max: u32,
    /// No round to shrink the pause once the remainder takes at most this long to send.
    pub shrink_floor: Duration,
    /// What a round costs besides sending its pages (the round barrier's round trip, the
    /// dirty-log fetch): the guest dirties pages meanwhile too. Used to predict what a round to
    /// shrink the pause leaves, and whether the round after the throttle's release fits in its
    /// lead (so a lead shorter than this never releases).
    pub round_overhead: Duration,
}

impl Default for ConvergenceConfig {
    fn default() -> Self {
        Self {
            downtime_budget: Duration::from_millis(50),
            timeout: Duration::from_secs(60),
            on_timeout: OnTimeout::Abort,
            max_bandwidth: None,
            state_bytes_estimate: 256 << 10,
            restore_estimate: Duration::from_millis(5),
            bandwidth_window: Duration::from_secs(1),
            throttle_from_round: 1,
            throttle_initial_pct: 20.0,
            throttle_max_pct: 99.9,
            throttle_run_factor: 0.5,
            throttle_saturated_pct: 90.0,
            throttle_slice: Duration::from_millis(10),
            throttle_release_lead: Duration::from_millis(10),
            shrink_rounds_max: 3,
            shrink_floor: Duration::from_millis(1),
            round_overhead: Duration::from_millis(1),
        }
    }
}

/// Bandwidth from a sliding window of send bursts: bytes over busy time, so idle gaps between
/// rounds do not drag the estimate down.
#[derive(Debug, Clone)]
pub struct BandwidthEstimator {
    window: Duration,
    samples: VecDeque<(u64, Duration)>,
    busy: Duration,
    bytes: u64,
}

impl BandwidthEstimator {
    /// An estimator over `window` of sending time.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            samples: VecDeque::new(),
            busy: Duration::ZERO,
            bytes: 0,
        }
    }

    /// Records that `bytes` were sent in `busy` time.
    pub fn record(&mut self, bytes: u64, busy: Duration) {
        if bytes == 0 && busy.is_zero() {
            return;
        }
        self.samples.push_back((bytes, busy));
        self.bytes += bytes;
        self.busy += busy;
        // Drop old samples while the rest still covers the window.
        while let Some(&(b, d)) = self.samples.front() {
            if self.samples.len() > 1 && self.busy - d >= self.window {
                self.samples.pop_front();
                self.bytes -= b;
                self.busy -= d;
            } else {
                break;
            }
        }
    }

    /// Bytes per second, or `None` before the first sample with measurable time.
    pub fn bytes_per_sec(&self) -> Option<f64> {
        let s = self.busy.as_secs_f64();
        (s > 0.0 && self.bytes > 0).then(|| self.bytes as f64 / s)
    }
}

/// The convergence decision after a dirty-log sync.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Run another pre-copy round.
    Continue,
    /// Set the throttle to this percent and run another round: a stronger one, or 0 (or the
    /// one lifted) around the release before the switch-over ([`ThrottleRelease`]).
    Throttle(f64),
    /// Pause and send the rest: converged (`forced` false) or forced at the timeout.
    SwitchOver {
        /// True when the timeout forced it.
        forced: bool,
    },
    /// Give up: the timeout passed.
    Abort,
}

/// Where a migration stands with the throttle's release before the switch-over
/// ([`ConvergenceConfig::throttle_release_lead`]). The sender keeps it; [`ConvergenceConfig::decide`]
/// reads it: `Ready` → (a throttled remainder fits: `Throttle(0)`) `Leading` → (the switch-over,
/// or the remainder no longer fits: the throttle goes back on) `Spent`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ThrottleRelease {
    /// Not released (the throttle may never have been on).
    #[default]
    Ready,
    /// Lifted at `since` (time since the start); `restore_pct` is the throttle it lifted.
    Leading {
        /// When the throttle was lifted.
        since: Duration,
        /// The throttle that made the remainder fit.
        restore_pct: f64,
    },
    /// Used once: no second release.
    Spent,
}

impl ThrottleRelease {
    /// The state after `decision`, taken at `now` under a throttle of `throttle_pct`: a lower
    /// throttle from `Ready` is the release; `Leading` lasts through `Continue` and is spent by
    /// anything else.
    pub fn after(self, decision: Decision, throttle_pct: f64, now: Duration) -> ThrottleRelease {
        match (self, decision) {
            (ThrottleRelease::Ready, Decision::Throttle(p)) if p < throttle_pct => {
                ThrottleRelease::Leading {
                    since: now,
                    restore_pct: throttle_pct,
                }
            }
            (ThrottleRelease::Leading { .. }, Decision::Continue) => self,
            (ThrottleRelease::Leading { .. }, _) => ThrottleRelease::Spent,
            (r, _) => r,
        }
    }
}

/// Inputs of one decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncInput {
    /// Time since the migration started.
    pub elapsed: Duration,
    /// Bytes still dirty after this sync.
    pub remaining_bytes: u64,
    /// Bytes that were dirty at the previous sync (before the round just sent).
    pub previous_remaining_bytes: Option<u64>,
    /// Round number just finished (0 = the full copy).
    pub round: u32,
    /// Current throttle percent.
    pub throttle_pct: f64,
    /// Current bandwidth estimate, bytes/s.
    pub bandwidth: Option<f64>,
    /// Dirty rate measured over the last round (under the current throttle), bytes/s.
    pub dirty_bytes_per_sec: f64,
    /// Bytes the round just finished sent (0 when unknown).
    pub round_sent_bytes: u64,
    /// Syncs in a row before this one whose remainder already fit the budget (rounds spent
    /// shrinking the pause).
    pub fitted_before: u32,
    /// The throttle's release before the switch-over, so far.
    pub release: ThrottleRelease,
}

impl SyncInput {
    /// The guest dirtied again at least half of what the round just sent: the dirty rate is
    /// limited by the working set, not measured.
    pub fn saturated(&self) -> bool {
        self.round_sent_bytes > 0 && self.remaining_bytes.saturating_mul(2) >= self.round_sent_bytes
    }
}

impl ConvergenceConfig {
    /// The bandwidth to plan with: the estimate capped by the configured maximum.
    pub fn effective_bandwidth(&self, estimate: Option<f64>) -> Option<f64> {
        match (estimate, self.max_bandwidth) {
            (Some(e), Some(cap)) => Some(e.min(cap as f64)),
            (e, _) => e,
        }
    }

    /// The pause expected if we switched over now with `remaining_bytes` dirty.
    /// `None` when the bandwidth is not yet known and something remains.
    pub fn expected_downtime(
        &self,
        remaining_bytes: u64,
        bandwidth: Option<f64>,
    ) -> Option<Duration> {
        let bytes = remaining_bytes + self.state_bytes_estimate;
        let transfer = match self.effective_bandwidth(bandwidth) {
            Some(bw) if bw > 0.0 => Duration::from_secs_f64(bytes as f64 / bw),
            _ if remaining_bytes == 0 => Duration::ZERO,
            _ => return None,
        };
        Some(transfer + self.restore_estimate)
    }

    /// The next throttle percent after `current`: first the initial step, then the run share
    /// shrinks by `throttle_run_factor` each step, up to the maximum.
    pub fn next_throttle(&self, current: f64) -> f64 {
        let max = self.throttle_max_pct.clamp(0.0, 99.99);
        if current <= 0.0 {
            return self.throttle_initial_pct.clamp(0.0, max);
        }
        let run = (100.0 - current.min(100.0)) * self.throttle_run_factor.clamp(0.0, 0.99);
        // Two decimals are plenty and keep the reported figures readable.
        let next = ((100.0 - run) * 100.0).round() / 100.0;
        next.min(max)
    }

    /// The throttle that would make the next round at least halve the remainder (or bring it
    /// within the budget, if that allows more) if the guest's unthrottled dirty rate stayed as
    /// measured: the round takes `remaining / B`, during which the guest may dirty
    /// `max(remaining / 2, B × budget)`. 0 when unknown. The schedule's next step is used when
    /// it is stronger; this lets a very busy guest skip steps. Halving rather than converging
    /// in one round keeps the guest running: converging at once asked ~99 % of a guest whose
    /// rate is several times the link's, and its loop then stalled for tens of ms per turn.
    pub fn needed_throttle(&self, i: &SyncInput) -> f64 {
        let Some(bw) = self.effective_bandwidth(i.bandwidth) else {
            return 0.0;
        };
        let run_share = (100.0 - i.throttle_pct) / 100.0;
        if bw <= 0.0 || i.remaining_bytes == 0 || i.dirty_bytes_per_sec <= 0.0 || run_share <= 0.0 {
            return 0.0;
        }
        let round_secs = i.remaining_bytes as f64 / bw;
        let allowed_rate = (bw * self.downtime_budget.as_secs_f64() / round_secs).max(bw / 2.0);
        let unthrottled = i.dirty_bytes_per_sec / run_share;
        let share = (allowed_rate / unthrottled).clamp(0.0, 1.0);
        ((1.0 - share) * 10_000.0).round() / 100.0
    }

    /// Bytes one more round is predicted to leave dirty: the guest goes on dirtying at the rate
    /// measured over the last round (under the same throttle) while the round sends the
    /// remainder at `bw` and pays its fixed cost ([`Self::round_overhead`]). Pages are counted
    /// as distinct (a sweeping writer), so the prediction errs high for a guest re-writing a
    /// few pages. A bandwidth that is not a positive finite figure is no measurement: the
    /// prediction is then the whole remainder.
    pub fn predicted_remainder(&self, i: &SyncInput, bw: f64) -> f64 {
        if !(bw.is_finite() && bw > 0.0) {
            return i.remaining_bytes as f64;
        }
        let round = i.remaining_bytes as f64 / bw + self.round_overhead.as_secs_f64();
        i.dirty_bytes_per_sec.max(0.0) * round
    }

    /// Whether a round to shrink the pause pays: the pause it saves — the remainder `R` less
    /// what the round leaves, `R'` — is at least what it adds to the total time, its fixed
    /// cost and `R'` sent once more: `(R − R') / B ≥ overhead + R' / B`. In bytes: the round
    /// adds no more than it takes off the final copy. (The rule before asked only for a dirty
    /// rate of at most half the bandwidth, so it ran rounds whose fixed cost let the guest
    /// dirty about as much as they sent: 490 pages in, 613 left.) Never with a bandwidth that
    /// is not positive and finite.
    pub fn shrink_pays(&self, i: &SyncInput, bw: f64) -> bool {
        if !(bw.is_finite() && bw > 0.0) {
            return false;
        }
        let r = i.remaining_bytes as f64;
        let left = self.predicted_remainder(i, bw);
        r - left >= left + bw * self.round_overhead.as_secs_f64()
    }

    /// Whether one more round runs to shrink a remainder that already fits the budget: while
    /// fewer than [`Self::shrink_rounds_max`] ran, before the timeout, not for a saturated
    /// working set (its rate is only a lower bound), not once the remainder takes at most
    /// [`Self::shrink_floor`] to send, and only if the round pays ([`Self::shrink_pays`]).
    pub fn another_round_pays(&self, i: &SyncInput) -> bool {
        let Some(bw) = self.effective_bandwidth(i.bandwidth).filter(|b| *b > 0.0) else {
            return false;
        };
        let send = Duration::from_secs_f64(i.remaining_bytes as f64 / bw);
        i.fitted_before < self.shrink_rounds_max
            && i.elapsed < self.timeout
            && send > self.shrink_floor
            && !i.saturated()
            && self.shrink_pays(i, bw)
    }

    /// Whether to lift the throttle for the lead now: the round that sends the current
    /// remainder takes no longer than the lead (a longer one would let the guest run free, and
    /// dirty, for all of it: another round under the throttle shrinks the remainder first), and
    /// the guest, dirtying at its free rate (the rate measured under the throttle over the run
    /// share it kept) for the lead, is predicted to leave a remainder that still fits the
    /// budget. A guest that would dirty past the budget meanwhile (several times the link, or
    /// measured under a throttle so strong that its free rate is unknown) keeps the throttle
    /// through the pause, and so does a saturated one (its rate is only a lower bound).
    pub fn release_fits(&self, i: &SyncInput) -> bool {
        let Some(bw) = self
            .effective_bandwidth(i.bandwidth)
            .filter(|b| b.is_finite() && *b > 0.0)
        else {
            return false;
        };
        let run_share = (100.0 - i.throttle_pct) / 100.0;
        if !(run_share > 0.0 && i.dirty_bytes_per_sec.is_finite()) {
            return false;
        }
        if i.saturated() {
            return false;
        }
        let free_rate = i.dirty_bytes_per_sec.max(0.0) / run_share;
        let lead = self.throttle_release_lead.as_secs_f64();
        let round = i.remaining_bytes as f64 / bw + self.round_overhead.as_secs_f64();
        round <= lead
            && self
                .expected_downtime((free_rate * lead) as u64, Some(bw))
                .is_some_and(|d| d <= self.downtime_budget)
    }

    /// The switch-over rule (with the throttle's release and the rounds that shrink the
    /// pause), the throttle schedule and the timeout, in that order.
    pub fn decide(&self, i: &SyncInput) -> Decision {
        if let Some(d) = self.expected_downtime(i.remaining_bytes, i.bandwidth)
            && d <= self.downtime_budget
        {
            let before_timeout = i.elapsed < self.timeout;
            match i.release {
                // The throttle brought the remainder within the budget: lift it for the lead.
                ThrottleRelease::Ready
                    if i.throttle_pct > 0.0
                        && !self.throttle_release_lead.is_zero()
                        && before_timeout
                        && self.release_fits(i) =>
                {
                    return Decision::Throttle(0.0);
                }
                // The shell waits out the lead before it syncs (`Sender::sync_not_before`); a
                // sync inside it all the same runs another round.
                ThrottleRelease::Leading { since, .. }
                    if i.elapsed.saturating_sub(since) < self.throttle_release_lead
                        && before_timeout =>
                {
                    return Decision::Continue;
                }
                _ => {}
            }
            if self.another_round_pays(i) {
                return Decision::Continue;
            }
            return Decision::SwitchOver { forced: false };
        }
        if i.elapsed >= self.timeout {
            return match self.on_timeout {
                OnTimeout::Abort => Decision::Abort,
                OnTimeout::Force => Decision::SwitchOver { forced: true },
            };
        }
        if let ThrottleRelease::Leading { restore_pct, .. } = i.release {
            // Running free, the guest dirtied more than the budget takes: the throttle that
            // made it fit goes back on, and the switch-over comes under it (no second release).
            return Decision::Throttle(restore_pct.max(i.throttle_pct));
        }
        // Above budget. Throttle harder unless the remainder is already falling fast (halved
        // since the previous sync): that converges on its own.
        let falling_fast = i
            .previous_remaining_bytes
            .is_some_and(|p| i.remaining_bytes.saturating_mul(2) <= p);
        let saturated = i.saturated();
        if (i.round >= self.throttle_from_round || saturated) && !falling_fast {
            let mut next = self
                .next_throttle(i.throttle_pct)
                .max(self.needed_throttle(i));
            if saturated {
                // A guest that rewrites its whole working set within a round: every round at
                // a weaker throttle would re-send that set in full. Go straight to the strength
                // that stops it (and keep climbing if even that does not).
                next = next.max(self.throttle_saturated_pct);
            }
            let next = next.min(self.throttle_max_pct.clamp(0.0, 99.99));
            if next > i.throttle_pct {
                return Decision::Throttle(next);
            }
        }
        Decision::Continue
    }
}

/// How a throttle percent is applied: in each slice the vCPUs run for `run` and sleep `sleep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleSlice {
    /// Time the vCPUs may run per slice.
    pub run: Duration,
    /// Time the vCPUs are held per slice.
    pub sleep: Duration,
}

impl ThrottleSlice {
    /// The slice for `pct` percent throttling with slices of `slice` (capped at 10 ms, so a
    /// pause request waits at most one slice).
    pub fn for_pct(pct: f64, slice: Duration) -> Self {
        let slice = slice.min(Duration::from_millis(10));
        let share = if pct.is_finite() {
            (pct / 100.0).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let sleep = Duration::from_nanos((slice.as_nanos() as f64 * share).round() as u64);
        Self {
            run: slice - sleep,
            sleep,
        }
    }
}

/// A token bucket for the bandwidth cap. Time is passed in.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    /// `rate` bytes/s with bursts of up to `burst` bytes; starts full at time `now`.
    pub fn new(rate: u64, burst: u64, now: Duration) -> Self {
        Self {
            rate: rate.max(1) as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last: now,
        }
    }

    /// Takes `bytes` at time `now`; returns how long to wait before sending them (zero if none).
    /// The tokens are taken either way (a debt is paid off by the wait).
    pub fn take(&mut self, bytes: u64, now: Duration) -> Duration {
        let dt = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GBPS: f64 = 1e9;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn bandwidth_estimate_uses_busy_time_and_slides() {
        let mut b = BandwidthEstimator::new(ms(100));
        assert_eq!(b.bytes_per_sec(), None);
        b.record(100 * MIB, ms(100)); // 1000 MiB/s
        let first = b.bytes_per_sec().unwrap();
        assert!((first - 1000.0 * MIB as f64).abs() < 1.0);
        // A slower link later: the old sample leaves the window.
        b.record(10 * MIB, ms(100));
        b.record(10 * MIB, ms(100));
        let later = b.bytes_per_sec().unwrap();
        assert!((later - 100.0 * MIB as f64).abs() < 1.0, "{later}");
    }

    #[test]
    fn switches_over_when_remainder_fits_the_budget() {
        // The first fit (no rounds to shrink the pause: `another_round_pays` below).
        let c = ConvergenceConfig {
            shrink_rounds_max: 0,
            ..Default::default()
        };
        let fits = SyncInput {
            elapsed: ms(100),
            remaining_bytes: 20 * MIB,
            previous_remaining_bytes: None,
            round: 0,
            throttle_pct: 0.0,
            bandwidth: Some(GBPS),
            dirty_bytes_per_sec: 0.0,
            round_sent_bytes: 0,
            fitted_before: 0,
            release: ThrottleRelease::Ready,
        };
        // 21 MB / 1 GB/s + 5 ms ≈ 27 ms ≤ 50 ms.
        assert_eq!(c.decide(&fits), Decision::SwitchOver { forced: false });
        let too_much = SyncInput {
            remaining_bytes: 60 * MIB,
            ..fits
        };
        assert_eq!(c.decide(&too_much), Decision::Continue);
        // The state estimate counts: a 50 MiB state would not fit.
        let big_state = ConvergenceConfig {
            state_bytes_estimate: 50 * MIB,
            ..c.clone()
        };
        assert_eq!(big_state.decide(&fits), Decision::Continue);
        // The cap counts: at 100 MB/s 20 MiB does not fit.
        let capped = ConvergenceConfig {
            max_bandwidth: Some(100_000_000),
            ..c.clone()
        };
        assert_eq!(capped.decide(&fits), Decision::Continue);
        // Nothing dirty converges even before any bandwidth is known.
        let empty = SyncInput {
            remaining_bytes: 0,
            bandwidth: None,
            ..fits
        };
        assert_eq!(
            ConvergenceConfig {
                state_bytes_estimate: 0,
                ..c
            }
            .decide(&empty),
            Decision::SwitchOver { forced: false }
        );
    }

    #[test]
    fn a_remainder_that_fits_gets_another_round_while_that_pays() {
        let c = ConvergenceConfig::default();
        // 24 MiB at 1 GB/s: 25 ms to send, within the budget; the guest dirties 80 MB/s, so
        // during one more round (and its 1 ms fixed cost) it dirties ~2 MB: the pause shrinks
        // by 23 ms for 2 MB and 3 ms more in all.
        let fits = SyncInput {
            elapsed: ms(400),
            remaining_bytes: 24 * MIB,
            previous_remaining_bytes: None,
            round: 0,
            throttle_pct: 0.0,
            bandwidth: Some(GBPS),
            dirty_bytes_per_sec: 80e6,
            round_sent_bytes: 260 * MIB,
            fitted_before: 0,
            release: ThrottleRelease::Ready,
        };
        let left = c.predicted_remainder(&fits, GBPS);
        assert!((left - 80e6 * (24.0 * MIB as f64 / GBPS + 0.001)).abs() < 1.0);
        assert!(c.another_round_pays(&fits));
        assert_eq!(c.decide(&fits), Decision::Continue);
        // What the next round leaves (~2 MB, 2 ms) gets one more; below the 1 ms floor none.
        let next = SyncInput {
            remaining_bytes: 2 * MIB,
            fitted_before: 1,
            ..fits
        };
        assert_eq!(c.decide(&next), Decision::Continue);
        let small = SyncInput {
            remaining_bytes: 900_000,
            fitted_before: 2,
            ..fits
        };
        assert_eq!(c.decide(&small), Decision::SwitchOver { forced: false });
        // No more than `shrink_rounds_max` such rounds, none at the timeout.
        let many = SyncInput {
            fitted_before: c.shrink_rounds_max,
            ..fits
        };
        assert_eq!(c.decide(&many), Decision::SwitchOver { forced: false });
        let late = SyncInput {
            elapsed: c.timeout,
            ..fits
        };
        assert_eq!(c.decide(&late), Decision::SwitchOver { forced: false });
        // A saturated working set would leave as much again: switch over now.
        let saturated = SyncInput {
            round_sent_bytes: 30 * MIB,
            ..fits
        };
        assert!(saturated.saturated());
        assert_eq!(c.decide(&saturated), Decision::SwitchOver { forced: false });
    }

    #[test]
    fn a_round_to_shrink_the_pause_runs_only_if_it_saves_more_than_it_costs() {
        let c = ConvergenceConfig::default();
        // 490 pages (2 MB, 2 ms at 1 GB/s) with the guest dirtying 300 MB/s: in the 3 ms of
        // the round (its 1 ms fixed cost included) the guest dirties 0.9 MB, so the round
        // would save 1.1 ms of pause for 1.9 ms more in all. The rule before (a dirty rate of
        // at most half the bandwidth) ran it. Switch over.
        let tail = SyncInput {
            elapsed: ms(400),
            remaining_bytes: 490 * 4096,
            previous_remaining_bytes: Some(2215 * 4096),
            round: 3,
            throttle_pct: 0.0,
            bandwidth: Some(GBPS),
            dirty_bytes_per_sec: 0.3 * GBPS,
            round_sent_bytes: 2215 * 4096,
            fitted_before: 2,
            release: ThrottleRelease::Ready,
        };
        let left = c.predicted_remainder(&tail, GBPS);
        assert!((left - 0.3 * GBPS * (490.0 * 4096.0 / GBPS + 0.001)).abs() < 1.0);
        assert!(!c.shrink_pays(&tail, GBPS));
        assert_eq!(c.decide(&tail), Decision::SwitchOver { forced: false });
        // Without the fixed cost the same round would pay (it halves the remainder).
        let free = ConvergenceConfig {
            round_overhead: Duration::ZERO,
            ..c.clone()
        };
        assert_eq!(free.decide(&tail), Decision::Continue);
        // Four times the remainder at the same rate pays: 8 MB in, ~3 MB left.
        let bigger = SyncInput {
            remaining_bytes: 4 * 490 * 4096,
            round_sent_bytes: 20 * MIB,
            ..tail
        };
        assert!(c.shrink_pays(&bigger, GBPS));
        assert_eq!(c.decide(&bigger), Decision::Continue);
        // A link that sends nothing never pays, and leaves the whole remainder (no NaN).
        for bw in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(!c.shrink_pays(&bigger, bw), "bandwidth {bw}");
            assert_eq!(
                c.predicted_remainder(&bigger, bw),
                bigger.remaining_bytes as f64,
                "bandwidth {bw}"
            );
        }
        // 24 MiB with the guest dirtying 0.6 GB/s: the round would leave ~16 MB, 9 ms less
        // pause for 17 ms more in all.
        let busy = SyncInput {
            remaining_bytes: 24 * MIB,
            previous_remaining_bytes: None,
            round: 1,
            dirty_bytes_per_sec: 0.6 * GBPS,
            round_sent_bytes: 100 * MIB,
            fitted_before: 0,
            ..tail
        };
        assert!(!c.shrink_pays(&busy, GBPS));
        assert_eq!(c.decide(&busy), Decision::SwitchOver { forced: false });
    }

    #[test]
    fn throttle_steps_grow_and_stop_at_the_maximum() {
        let c = ConvergenceConfig::default();
        let mut pct = 0.0;
        let mut steps = vec![];
        while pct < c.throttle_max_pct {
            let next = c.next_throttle(pct);
            assert!(next > pct);
            steps.push(next);
            pct = next;
        }
        assert_eq!(
            steps,
            vec![
                20.0, 60.0, 80.0, 90.0, 95.0, 97.5, 98.75, 99.38, 99.69, 99.85, 99.9
            ]
        );
        assert_eq!(c.next_throttle(99.9), 99.9);
        // Each step halves the run share the vCPUs keep.
        for w in steps.windows(2).take(8) {
            let ratio = (100.0 - w[1]) / (100.0 - w[0]);
            assert!((0.45..=0.55).contains(&ratio), "{w:?}");
        }
    }

    #[test]
    fn a_mildly_busy_guest_follows_the_schedule_a_very_busy_one_skips_steps() {
        let c = ConvergenceConfig::default();
        let input = |dirty_rate: f64| SyncInput {
            elapsed: ms(500),
            remaining_bytes: 60 * MIB,
            previous_remaining_bytes: Some(60 * MIB),
            round: 1,
            throttle_pct: 0.0,
            bandwidth: Some(GBPS),
            dirty_bytes_per_sec: dirty_rate,
            round_sent_bytes: 0,
            fitted_before: 0,
            release: ThrottleRelease::Ready,
        };
        // 60 MiB at 1 GB/s is a 63 ms round; 50 ms of budget carries 50 MB, so the guest may
        // dirty ~0.8 GB/s. At 0.9 GB/s a small cut does: the schedule's 20 % is stronger.
        assert_eq!(c.decide(&input(0.9 * GBPS)), Decision::Throttle(20.0));
        // At 8 GB/s it must keep ~10 % of its run time.
        match c.decide(&input(8.0 * GBPS)) {
            Decision::Throttle(p) => assert!((89.0..91.0).contains(&p), "{p}"),
            d => panic!("{d:?}"),
        }
        assert_eq!(c.needed_throttle(&input(0.0)), 0.0, "unknown rate: no jump");
    }

    #[test]
    fn throttle_slices_are_at_most_ten_ms() {
        let s = ThrottleSlice::for_pct(99.0, ms(50));
        assert_eq!(s.run + s.sleep, ms(10));
        assert_eq!(s.sleep, Duration::from_micros(9900));
        assert_eq!(
            ThrottleSlice::for_pct(99.9, ms(10)).run,
            Duration::from_micros(10)
        );
        assert_eq!(ThrottleSlice::for_pct(0.0, ms(5)).sleep, Duration::ZERO);
        assert_eq!(
            ThrottleSlice::for_pct(f64::NAN, ms(5)).sleep,
            Duration::ZERO
        );
    }

    #[test]
    fn timeout_aborts_or_forces() {
        let c = ConvergenceConfig {
            timeout: ms(1000),
            ..Default::default()
        };
        let stuck = SyncInput {
            elapsed: ms(1000),
            remaining_bytes: 500 * MIB,
            previous_remaining_bytes: Some(500 * MIB),
            round: 9,
            throttle_pct: 99.9,
            bandwidth: Some(GBPS),
            dirty_bytes_per_sec: 0.0,
            round_sent_bytes: 0,
            fitted_before: 0,
            release: ThrottleRelease::Ready,
        };
        assert_eq!(c.decide(&stuck), Decision::Abort);
        let f = ConvergenceConfig {
            on_timeout: OnTimeout::Force,
            ..c
        };
        assert_eq!(f.decide(&stuck), Decision::SwitchOver { forced: true });
    }

    #[test]
    fn token_bucket_paces_to_the_rate() {
        let mut t = TokenBucket::new(1000, 100, Duration::ZERO);
        assert_eq!(t.take(100, Duration::ZERO), Duration::ZERO);
        assert_eq!(t.take(500, Duration::ZERO), ms(500));
        // After the wait the debt is paid; 1 s later 100 tokens (the burst) are back.
        assert_eq!(t.take(100, Duration::from_millis(1600)), Duration::ZERO);
    }

    /// What [`simulate_trace`] saw: the final decision, the rounds, every decision, the
    /// throttle at the end and the highest, the final expected downtime and the bytes sent.
    struct Trace {
        end: Decision,
        rounds: u32,
        decisions: Vec<Decision>,
        throttle: f64,
        throttle_max: f64,
        downtime: Duration,
        sent: u64,
    }

    /// A synthetic pre-copy run: a guest dirtying `dirty_rate` bytes/s of a `wss`-byte working
    /// set, a link of `bw` bytes/s, throttling cutting the dirty rate. Returns the decisions'
    /// outcome, rounds, highest throttle, final expected downtime and bytes sent.
    fn simulate(
        c: &ConvergenceConfig,
        memory: u64,
        wss: u64,
        dirty_rate: f64,
        bw: f64,
    ) -> (Decision, u32, f64, Duration, u64) {
        let t = simulate_trace(c, memory, wss, dirty_rate, bw);
        (t.end, t.rounds, t.throttle_max, t.downtime, t.sent)
    }

    /// [`simulate`], with every decision on the way.
    fn simulate_trace(
        c: &ConvergenceConfig,
        memory: u64,
        wss: u64,
        dirty_rate: f64,
        bw: f64,
    ) -> Trace {
        let mut est = BandwidthEstimator::new(c.bandwidth_window);
        let mut elapsed = Duration::ZERO;
        let mut to_send = memory;
        let mut prev = None;
        let mut throttle = 0.0f64;
        let mut throttle_max = 0.0f64;
        let mut release = ThrottleRelease::Ready;
        let mut sent = 0u64;
        let mut decisions = Vec::new();
        for round in 0..10_000u32 {
            let send = Duration::from_secs_f64(to_send as f64 / bw + 0.0005);
            est.record(to_send, send);
            sent += to_send;
            // As the shell: the sync after a release waits out the lead.
            let mut t = send;
            if let ThrottleRelease::Leading { since, .. } = release {
                t = t.max((since + c.throttle_release_lead).saturating_sub(elapsed));
            }
            elapsed += t;
            let rate = dirty_rate * (100.0 - throttle) / 100.0;
            // Pages dirtied during the round, bounded by the working set.
            let dirtied = ((rate * t.as_secs_f64()) as u64).min(wss);
            let input = SyncInput {
                elapsed,
                remaining_bytes: dirtied,
                previous_remaining_bytes: prev,
                round,
                throttle_pct: throttle,
                bandwidth: est.bytes_per_sec(),
                dirty_bytes_per_sec: dirtied as f64 / t.as_secs_f64(),
                round_sent_bytes: to_send,
                fitted_before: 0,
                release,
            };
            let d = c.decide(&input);
            decisions.push(d);
            release = release.after(d, throttle, elapsed);
            match d {
                Decision::Continue => {}
                Decision::Throttle(p) => {
                    throttle = p;
                    throttle_max = throttle_max.max(p);
                }
                end => {
                    return Trace {
                        end,
                        rounds: round,
                        decisions,
                        throttle,
                        throttle_max,
                        downtime: c.expected_downtime(dirtied, est.bytes_per_sec()).unwrap(),
                        sent: sent + dirtied,
                    };
                }
            }
            prev = Some(dirtied);
            to_send = dirtied;
        }
        panic!("no decision in 10000 rounds");
    }

    #[test]
    fn idle_guest_converges_after_the_first_round() {
        let c = ConvergenceConfig::default();
        let (d, rounds, thr, dt, _) = simulate(&c, 1 << 30, 4 * MIB, 1e5, GBPS);
        assert_eq!(d, Decision::SwitchOver { forced: false });
        assert_eq!(rounds, 0);
        assert_eq!(thr, 0.0);
        assert!(dt <= c.downtime_budget);
    }

    #[test]
    fn moderate_dirtying_converges_without_throttle() {
        // 20,000 pages/s over 256 MiB at 1 GB/s.
        let c = ConvergenceConfig::default();
        let (d, rounds, thr, dt, _) = simulate(&c, 1 << 30, 256 * MIB, 20_000.0 * 4096.0, GBPS);
        assert_eq!(d, Decision::SwitchOver { forced: false });
        assert!(rounds <= 3, "rounds {rounds}");
        assert_eq!(thr, 0.0);
        assert!(dt <= c.downtime_budget);
    }

    #[test]
    fn max_rate_dirtying_is_throttled_at_once_but_only_as_hard_as_halving_needs() {
        // The guest dirties 4 GB/s over a 256 MiB working set, four times the link; the rest of
        // its memory is zero (skipped), so the full copy carries 260 MiB.
        let c = ConvergenceConfig::default();
        let mem = 260 * MIB;
        let (d, rounds, thr, dt, sent) = simulate(&c, mem, 256 * MIB, 4.0 * GBPS, GBPS);
        assert_eq!(d, Decision::SwitchOver { forced: false });
        // The saturated start (90 %) already halves each round (the guest keeps 10 %, 0.4 GB/s
        // against 1 GB/s): the throttle goes no higher, and the guest is never held at 99 %.
        assert_eq!(thr, c.throttle_saturated_pct);
        assert!(dt <= c.downtime_budget);
        // The working set goes over in the full copy and then in shrinking rounds (256, ~107,
        // ~45 … MiB): less than twice more in all.
        assert!(rounds <= 8, "rounds {rounds}");
        assert!(sent <= mem + 2 * 256 * MIB, "sent {sent}");
        // Without the saturated start (only the step schedule from round 1), the working set
        // goes over in full more often.
        let gentle = ConvergenceConfig {
            throttle_saturated_pct: 0.0,
            ..c
        };
        let (_, _, _, _, gentle_sent) = simulate(&gentle, mem, 256 * MIB, 4.0 * GBPS, GBPS);
        assert!(gentle_sent > sent, "{gentle_sent} vs {sent}");
    }

    #[test]
    fn a_throttled_remainder_that_fits_lifts_the_throttle_for_the_lead_then_switches_over() {
        let c = ConvergenceConfig {
            shrink_rounds_max: 0,
            ..Default::default()
        };
        let lead = c.throttle_release_lead;
        assert_eq!(lead, c.throttle_slice, "one slice by default");
        // 2 MiB left at 1 GB/s under the 90 % throttle: well within the 50 ms budget.
        let fits = SyncInput {
            elapsed: ms(800),
            remaining_bytes: 2 * MIB,
            previous_remaining_bytes: Some(20 * MIB),
            round: 3,
            throttle_pct: 90.0,
            bandwidth: Some(GBPS),
            dirty_bytes_per_sec: 0.02 * GBPS,
            round_sent_bytes: 20 * MIB,
            fitted_before: 0,
            release: ThrottleRelease::Ready,
        };
        assert_eq!(c.decide(&fits), Decision::Throttle(0.0), "released");
        // Released at 800 ms: a sync within the lead runs another round, the first after it
        // switches over.
        let leading = ThrottleRelease::Leading {
            since: ms(800),
            restore_pct: 90.0,
        };
        let early = SyncInput {
            elapsed: ms(800) + lead / 2,
            throttle_pct: 0.0,
            fitted_before: 1,
            release: leading,
            ..fits
        };
        assert_eq!(c.decide(&early), Decision::Continue);
        let after = SyncInput {
            elapsed: ms(800) + lead,
            // running free, the guest dirtied more than the round sent (not a shrink round)
            remaining_bytes: 6 * MIB,
            round_sent_bytes: 2 * MIB,
            ..early
        };
        assert_eq!(c.decide(&after), Decision::SwitchOver { forced: false });
        // Running free it dirtied more than the budget takes: the throttle goes back on.
        let broke = SyncInput {
            remaining_bytes: 200 * MIB,
            ..after
        };
        assert_eq!(c.decide(&broke), Decision::Throttle(90.0));
        // Once spent, a fit under the throttle switches over under it.
        let spent = SyncInput {
            release: ThrottleRelease::Spent,
            ..fits
        };
        assert_eq!(c.decide(&spent), Decision::SwitchOver { forced: false });
        // Never throttled, or the release turned off, or the timeout passed: no release.
        let unthrottled = SyncInput {
            throttle_pct: 0.0,
            ..fits
        };
        assert_eq!(
            c.decide(&unthrottled),
            Decision::SwitchOver { forced: false }
        );
        let off = ConvergenceConfig {
            throttle_release_lead: Duration::ZERO,
            ..c.clone()
        };
        assert_eq!(off.decide(&fits), Decision::SwitchOver { forced: false });
        let late = SyncInput {
            elapsed: c.timeout,
            ..fits
        };
        assert_eq!(c.decide(&late), Decision::SwitchOver { forced: false });
        // Free, this guest would dirty 10 × 0.02 GB/s = 0.2 GB/s: ~2 MB over the 10 ms lead,
        // which fits. At 0.5 GB/s measured under the throttle (5 GB/s free) it would dirty
        // ~50 MB, past the budget: the throttle stays on through the pause.
        assert!(c.release_fits(&fits));
        let fast = SyncInput {
            dirty_bytes_per_sec: 0.5 * GBPS,
            ..fits
        };
        assert!(!c.release_fits(&fast));
        assert_eq!(c.decide(&fast), Decision::SwitchOver { forced: false });
        // 20 MiB left take ~22 ms to send, longer than the lead: the guest would run free for
        // all of it, so no release yet (a round under the throttle shrinks it first, where
        // shrink rounds are allowed; none are here).
        let long_round = SyncInput {
            remaining_bytes: 20 * MIB,
            round_sent_bytes: 200 * MIB,
            ..fits
        };
        assert!(!long_round.saturated());
        assert!(!c.release_fits(&long_round));
        assert_eq!(
            c.decide(&long_round),
            Decision::SwitchOver { forced: false }
        );
    }

    #[test]
    fn a_throttled_run_ends_unthrottled_for_the_lead_and_within_the_budget() {
        // The bench's capped workload: a guest dirtying ~200 MiB/s of a 256 MiB working set
        // over a 256 MiB/s link. The saturated throttle makes it converge; the throttle is then
        // lifted, and the switch-over comes after the lead, unthrottled, with the remainder
        // still within the budget.
        let c = ConvergenceConfig::default();
        let (rate, link) = (200.0 * MIB as f64, 256.0 * MIB as f64);
        let t = simulate_trace(&c, 260 * MIB, 256 * MIB, rate, link);
        assert_eq!(t.end, Decision::SwitchOver { forced: false });
        assert!(
            t.decisions
                .contains(&Decision::Throttle(c.throttle_saturated_pct))
        );
        assert!(
            t.decisions.contains(&Decision::Throttle(0.0)),
            "{:?}",
            t.decisions
        );
        assert_eq!(t.throttle, 0.0, "switched over unthrottled");
        assert!(t.downtime <= c.downtime_budget, "{:?}", t.downtime);
        // Without the release the same run switches over under the throttle.
        let off = ConvergenceConfig {
            throttle_release_lead: Duration::ZERO,
            ..c
        };
        let t = simulate_trace(&off, 260 * MIB, 256 * MIB, rate, link);
        assert_eq!(t.end, Decision::SwitchOver { forced: false });
        assert!(
            !t.decisions.contains(&Decision::Throttle(0.0)),
            "{:?}",
            t.decisions
        );
        assert_eq!(t.throttle, off.throttle_saturated_pct);
    }

    #[test]
    fn a_guest_below_saturation_is_not_throttled_after_the_full_copy() {
        let c = ConvergenceConfig::default();
        // 100 MiB re-dirtied of 1 GiB sent: above budget but not saturated, round 0.
        let i = SyncInput {
            elapsed: ms(1000),
            remaining_bytes: 100 * MIB,
            previous_remaining_bytes: None,
            round: 0,
            throttle_pct: 0.0,
            bandwidth: Some(GBPS),
            dirty_bytes_per_sec: 0.1 * GBPS,
            round_sent_bytes: 1 << 30,
            fitted_before: 0,
            release: ThrottleRelease::Ready,
        };
        assert!(!i.saturated());
        assert_eq!(c.decide(&i), Decision::Continue);
        let sat = SyncInput {
            remaining_bytes: 256 * MIB,
            round_sent_bytes: 300 * MIB,
            ..i
        };
        assert!(sat.saturated());
        assert_eq!(c.decide(&sat), Decision::Throttle(90.0));
        // Falling fast (halved since the previous sync) still wins: no throttle needed.
        let falling = SyncInput {
            previous_remaining_bytes: Some(600 * MIB),
            ..sat
        };
        assert_eq!(c.decide(&falling), Decision::Continue);
    }

    #[test]
    fn unthrottleable_guest_aborts_at_the_timeout() {
        // Even 99.9 % throttling leaves more than the link can carry: the timeout decides.
        let c = ConvergenceConfig {
            timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let (d, _, thr, _, _) = simulate(&c, 1 << 30, 256 * MIB, 2000.0 * GBPS, GBPS);
        assert_eq!(d, Decision::Abort);
        assert_eq!(thr, 99.9);
        let f = ConvergenceConfig {
            on_timeout: OnTimeout::Force,
            ..c
        };
        assert_eq!(
            simulate(&f, 1 << 30, 256 * MIB, 2000.0 * GBPS, GBPS).0,
            Decision::SwitchOver { forced: true }
        );
    }
}

//! A move's predicted cost: total time, bytes and downtime, and whether it converges.
//!
//! [`predict_move`] is the one call the loop (and the controller, for its tasks) makes. It runs
//! `tern_migration`'s predictor, which drives the real sender machine — the same switch-over
//! rule, throttle schedule, timeout and bandwidth estimator a migration follows — against a
//! modelled guest (its memory and measured dirty rate) and link, under the migration's default
//! convergence settings with the loop's downtime budget. A move converges when the switch-over
//! rule fires within the budget; one that would be forced or abandoned at the timeout does not,
//! and the loop holds it back.
//!
//! The inputs come from the telemetry: the guest's memory, its resident memory (the agent's VMM
//! RSS, an upper bound of the pages the full copy sends: it skips pages never touched or zero),
//! its measured dirty rate, and the link into the target host as measured by the migrations
//! that landed there ([`LinkEstimator`], fed by [`link_from_migration`]); the default link
//! stands in until a host has been measured.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use tern_api::automation::{MigrationActual, MigrationPrediction};
use tern_migration::machine::policy::ConvergenceConfig;
use tern_migration::machine::predict::{PredictInput, predict};

use crate::telemetry::VmSample;

/// What a move's cost depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoveInput {
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// Memory the full copy sends at most (touched pages), bytes; `None`: all of
    /// `memory_bytes`. More than `memory_bytes` counts as all of it.
    pub resident_bytes: Option<u64>,
    /// Pages dirtied per second (0 when not measured).
    pub dirty_pages_per_sec: f64,
    /// The link between the hosts, bytes per second.
    pub link_bytes_per_sec: f64,
    /// The longest acceptable pause, milliseconds.
    pub downtime_budget_ms: f64,
    /// Shared-volume disks whose leases move with the guest (each adds its hand-over).
    pub volume_disks: u32,
}

impl MoveInput {
    /// The move of `vm` over a link of `link_bytes_per_sec`: its memory, resident memory (if
    /// reported), dirty rate (0 if not measured) and volume disks.
    pub fn for_vm(vm: &VmSample, link_bytes_per_sec: f64, downtime_budget_ms: f64) -> MoveInput {
        MoveInput {
            memory_bytes: vm.memory_mib << 20,
            resident_bytes: vm.resident_mib.map(|r| r << 20),
            dirty_pages_per_sec: vm.dirty_pages_per_sec.unwrap_or(0.0),
            link_bytes_per_sec,
            downtime_budget_ms,
            volume_disks: vm.volume_disks,
        }
    }
}

/// The migration policy and the guest of `input` as the migration model takes them: the
/// default convergence rules with the move's downtime budget, and its memory (resident part
/// capped at the whole), dirty rate and link. Shared by [`predict_move`] and the post-copy
/// fallback, so both predict from the same model set-up.
pub(crate) fn model_input(input: &MoveInput) -> (ConvergenceConfig, PredictInput) {
    let cfg = ConvergenceConfig {
        downtime_budget: Duration::from_secs_f64(input.downtime_budget_ms.max(0.0) / 1000.0),
        ..ConvergenceConfig::default()
    };
    let mut guest = PredictInput::new(
        input.memory_bytes,
        input.dirty_pages_per_sec,
        input.link_bytes_per_sec,
    );
    guest.resident_bytes = input.resident_bytes.map(|r| r.min(input.memory_bytes));
    guest.volume_disks = input.volume_disks;
    (cfg, guest)
}

/// The predicted cost of moving the guest in `input` (module docs). An input the predictor
/// refuses (no memory, no link, a negative rate) is predicted not to converge, with no time.
pub fn predict_move(input: &MoveInput) -> MigrationPrediction {
    let (cfg, guest) = model_input(input);
    match predict(&cfg, &guest) {
        Ok(p) => MigrationPrediction {
            time_s: p.total.as_secs_f64(),
            bytes: p.bytes_sent,
            downtime_ms: p.downtime.as_secs_f64() * 1000.0,
            converges: p.converges(),
        },
        Err(_) => MigrationPrediction {
            time_s: f64::INFINITY,
            bytes: 0,
            downtime_ms: 0.0,
            converges: false,
        },
    }
}

/// Moves smaller than this teach nothing about the link: their time is mostly fixed costs
/// (handshake, round barriers, the restore), which the model's own fixed costs do not match
/// closely enough on every host (an idle 64 MiB test guest sends ~200 KB in 20–40 ms, of which
/// the model puts ~20 ms on fixed costs; the rest, a few ms of noise, would read as a link of a
/// few tens of MB/s on a veth pair).
pub const MIN_LINK_SAMPLE_BYTES: u64 = 8 << 20;

/// The slowest and fastest link [`link_from_migration`] can find, bytes/s.
pub const LINK_SEARCH_BYTES_PER_SEC: (f64, f64) = (1e5, 1e12);

/// The link bandwidth a finished migration measured, bytes/s: the bandwidth at which the model
/// ([`predict_move`]) moves the bytes it sent (as resident memory of an idle guest of
/// `memory_bytes`) in the time it took — so the fixed costs the model counts (setup, round
/// overhead, restore) are not charged to the link, as a plain bytes / time would.
///
/// `None` when the move says nothing about the link: it sent less than
/// [`MIN_LINK_SAMPLE_BYTES`], its time is not a positive number, or it took no longer than the
/// model's fixed costs at the fastest link searched. A move slower than the model at the slowest
/// link gives that slowest link.
pub fn link_from_migration(
    memory_bytes: u64,
    actual: &MigrationActual,
    downtime_budget_ms: f64,
) -> Option<f64> {
    if actual.bytes < MIN_LINK_SAMPLE_BYTES || !(actual.time_s.is_finite() && actual.time_s > 0.0) {
        return None;
    }
    // the guest pages in the bytes sent: each page goes as its address and its contents
    let pages = actual.bytes / (PAGE_BYTES + 8);
    let resident = pages * PAGE_BYTES;
    let time_at = |link: f64| {
        predict_move(&MoveInput {
            memory_bytes: memory_bytes.max(resident),
            resident_bytes: Some(resident),
            dirty_pages_per_sec: 0.0,
            link_bytes_per_sec: link,
            downtime_budget_ms,
            // a disk's hand-over (a few ms) is noise against the ≥ 8 MiB this is asked about
            volume_disks: 0,
        })
        .time_s
    };
    let (mut lo, mut hi) = LINK_SEARCH_BYTES_PER_SEC;
    if time_at(hi) >= actual.time_s {
        return None;
    }
    if time_at(lo) <= actual.time_s {
        return Some(lo);
    }
    // the predicted time falls as the link gets faster: bisect on a log scale
    for _ in 0..64 {
        let mid = (lo * hi).sqrt();
        if time_at(mid) > actual.time_s {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi / lo < 1.0 + 1e-6 {
            break;
        }
    }
    Some((lo * hi).sqrt())
}

const PAGE_BYTES: u64 = 4096;

/// The weight of a new measurement in [`LinkEstimator`]'s moving average.
pub const LINK_EWMA_WEIGHT: f64 = 0.5;

/// Measured migration bandwidth per target host: an exponentially weighted moving average of
/// [`link_from_migration`]'s figures (weight [`LINK_EWMA_WEIGHT`]; the first measurement of a
/// host is taken as it is). Per target host, as the path into a host (its NIC, its load) is
/// what tells one move from another on one network.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkEstimator {
    links: BTreeMap<String, f64>,
}

impl LinkEstimator {
    /// Takes one measurement of the link into `to`. A figure that is not a finite number of at
    /// least 1 byte/s is ignored (returns false).
    pub fn observe(&mut self, to: &str, bytes_per_sec: f64) -> bool {
        if !(bytes_per_sec.is_finite() && bytes_per_sec >= 1.0) {
            return false;
        }
        self.links
            .entry(to.to_string())
            .and_modify(|b| *b += LINK_EWMA_WEIGHT * (bytes_per_sec - *b))
            .or_insert(bytes_per_sec);
        true
    }

    /// The estimate for the link into `to`, if measured.
    pub fn get(&self, to: &str) -> Option<f64> {
        self.links.get(to).copied()
    }

    /// Every measured link, by target host (to keep them across a controller's restart).
    pub fn measured(&self) -> &BTreeMap<String, f64> {
        &self.links
    }

    /// An estimator that starts from `links` (as [`LinkEstimator::measured`] gave them); a
    /// figure [`LinkEstimator::observe`] would refuse is left out.
    pub fn from_measured(links: &BTreeMap<String, f64>) -> LinkEstimator {
        let mut e = LinkEstimator::default();
        for (to, &b) in links {
            e.observe(to, b);
        }
        e
    }
}

/// What a migration costs beyond the model's time: per-move costs the model does not count —
/// the agents' round trips, the target VMM's start, the TLS set-up of its streams — and the
/// migration threads' share of a CPU the guest's own vCPUs keep busy (they run at nice 10, so a
/// busy guest's copy waits for CPU). Measured, not assumed: [`OverheadEstimator`] learns it from
/// finished migrations, starting from [`Overhead::PRIOR`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Overhead {
    /// Seconds every move costs beyond the model.
    pub fixed_s: f64,
    /// Further seconds per unit of the moving VM's CPU utilisation (0..1 of its vCPUs).
    pub per_utilization_s: f64,
    /// The highest utilisation the slope was measured at: [`Overhead::at`] does not extend the
    /// line above it (0 with no slope).
    pub max_utilization: f64,
}

impl Overhead {
    /// What a move costs beyond the model before any move has been measured: the residual
    /// (whole move less the model's time) that predicts the recorded first moves best under the
    /// goal's own loss, the mean relative error, each bench run weighing alike
    /// ([`PRIOR_EVIDENCE`]; docs/automation.md, "Before any move is measured").
    ///
    /// Two parts make it up, neither counted by the model: what a move costs outside the source
    /// VMM — the target's start and the `migrate_out` command beyond the VMM's own time, 17 ms in
    /// the task phases of runs 8–10, which was the whole prior before — and the source VMM's
    /// set-up and end beyond the model's (the model's 10 ms and 1 ms a connection were measured
    /// on loopback on an idle machine; on the test cluster the VMM's set-up and end took
    /// 31–122 ms a move in runs 16–24, 31–60 ms in run 27). Over the runs the prior is fitted
    /// on (from [`PRIOR_EVIDENCE_FROM_RUN`]) the loss is lowest at 0.086 s for the demo's move
    /// (model 0.037 s): 49 ms beyond the model. The first measured moves take over
    /// ([`OverheadEstimator`]).
    pub const PRIOR: Overhead = Overhead {
        fixed_s: 0.049,
        per_utilization_s: 0.0,
        max_utilization: 0.0,
    };

    /// The overhead of moving a VM at `utilization` (clamped to 0..=1, and to the highest
    /// utilisation the slope was measured at), seconds, never negative.
    pub fn at(&self, utilization: f64) -> f64 {
        let u = if utilization.is_finite() {
            utilization.clamp(0.0, 1.0).min(self.max_utilization)
        } else {
            0.0
        };
        (self.fixed_s + self.per_utilization_s * u).max(0.0)
    }

    /// `p` with this overhead added to its time (a move that does not converge keeps its time).
    pub fn add_to(&self, mut p: MigrationPrediction, utilization: f64) -> MigrationPrediction {
        if p.time_s.is_finite() {
            p.time_s += self.at(utilization);
        }
        p
    }
}

/// The moves [`OverheadEstimator`] keeps: its estimate is the median of the newest this many.
pub const OVERHEAD_WINDOW: usize = 9;

/// Until this many moves are measured, [`OverheadEstimator`] fills its window up to this many
/// values with its prior: the first two moves cannot move the estimate off the prior on their
/// own, three can if they agree.
pub const OVERHEAD_PRIOR_FILL: usize = 5;

/// The recorded first moves [`Overhead::PRIOR`] is chosen on: per run of the automation bench
/// (docs/benchmarks.md, "Automation"), the whole moves of the first sample's plan, predicted
/// before any move was measured, in seconds. Runs 8–15 are the moves as measured. For runs 16–24
/// the report keeps only the mean absolute error over all moves and over those after the first
/// sample's, so each stands as the one time at which the prediction then made (0.054 s) has the
/// first sample's recorded error: its three moves' error is `(n × all − (n − 3) × after) / 3`
/// with `n` the run's moves, and as those moves took 0.053–0.127 s (none much under 0.054 s),
/// it is `1 − 0.054 / m` with `m` their harmonic mean (run 16, say: `n` = 10, 23 % and 20 %,
/// error 30 %, `m` = 0.077 s). A prediction `p` up to the run's fastest first move errs by
/// `1 − p / m` on them exactly; above it, `|1 − p / m|` is an estimate. Runs 25–30 are the
/// moves as measured again (the reports kept).
pub const PRIOR_EVIDENCE: &[(u32, &[f64])] = &[
    (8, &[0.064, 0.065, 0.046]),
    (9, &[0.058, 0.061, 0.063]),
    (10, &[0.174, 0.155, 0.052]),
    (11, &[0.063, 0.066, 0.051]),
    (12, &[0.053, 0.048, 0.041]),
    (13, &[0.059, 0.053, 0.051]),
    (14, &[0.047, 0.049, 0.038]),
    (15, &[0.053, 0.054, 0.038]),
    (16, &[0.0771]),
    (17, &[0.1125]),
    (18, &[0.0880]),
    (19, &[0.0857]),
    (20, &[0.1473]),
    (21, &[0.0743]),
    (22, &[0.0651]),
    (23, &[0.1059]),
    (24, &[0.0783]),
    (25, &[0.122, 0.111, 0.103]),
    (26, &[0.093, 0.086, 0.071]),
    (27, &[0.105, 0.111, 0.068]),
    (28, &[0.122, 0.131, 0.096]),
    (29, &[0.142, 0.126, 0.075]),
    (30, &[0.139, 0.149, 0.086]),
];

/// The first run of [`PRIOR_EVIDENCE`] that [`Overhead::PRIOR`] is fitted on. The cluster the
/// bench measures changed between runs 15 and 16: 22 of the 24 first moves of runs 8–15 took
/// 0.038–0.066 s, where the first moves of each of runs 16–24 averaged 0.065–0.147 s (harmonic
/// means; the moves 0.053–0.127 s) and the 18 of runs 25–30 took 0.068–0.149 s. A prior fitted
/// on all runs (0.066 s) erred 29 % on the newer runs' first moves and 30 % on the older ones;
/// the prior predicts the cluster as it is now, and the older runs stay in the record.
pub const PRIOR_EVIDENCE_FROM_RUN: u32 = 16;

/// The model's time for the demo's move (an idle 64 MiB test guest with 59 non-zero pages and
/// one volume disk, over the default link), against which [`PRIOR_EVIDENCE`] is read.
pub const PRIOR_EVIDENCE_MODEL_S: f64 = 0.037;

/// The whole of what an [`OverheadEstimator`] has learnt: its newest moves and how many it
/// took, so a controller can keep it in etcd and the next one (after a fail-over or a restart)
/// goes on from it instead of starting again from the prior.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OverheadState {
    /// The newest moves, oldest first, at most [`OVERHEAD_WINDOW`]: (the VM's utilisation,
    /// the residual in seconds).
    pub recent: Vec<(f64, f64)>,
    /// Migrations taken.
    pub n: u64,
}

/// Why an [`OverheadState`] was not taken.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum RestoreOverheadError {
    /// More moves kept than the window holds or than were taken, fewer than the window holds
    /// while more were taken, or a figure [`OverheadEstimator::observe`] would refuse.
    #[error(
        "the stored move overhead is not a state an estimator can reach ({kept} moves kept of \
         {n} taken; at most {OVERHEAD_WINDOW}, each a utilisation in 0..=1 and a finite residual \
         of at most an hour)"
    )]
    Unreachable {
        /// The moves stored.
        kept: usize,
        /// The stored count.
        n: u64,
    },
}

/// Learns [`Overhead`] from finished migrations, robustly: each gives its residual — measured
/// time less the model's predicted time for the same move — and the VM's CPU utilisation when
/// it was predicted. The estimate is taken over the newest [`OVERHEAD_WINDOW`] moves:
///
/// - the slope in utilisation is the Theil–Sen line's (the median of the slopes between every
///   two moves at least 0.05 of utilisation apart), once at least 4 moves span
///   [`OVERHEAD_SLOPE_SPAN`] of utilisation; 0 before, or when it comes out negative; it is not
///   carried above the highest utilisation measured;
/// - the fixed part is the median of the residuals less slope × utilisation, the window filled
///   up to [`OVERHEAD_PRIOR_FILL`] values with the prior's fixed part while fewer moves were
///   measured; never below 0.
///
/// So one slow move — or two among a cluster's first three — moves the estimate no further
/// than the moves around it: a median ignores up to half its values whatever their size, where
/// a mean (or a least-squares line) takes each in whole. Before the first move the estimate is
/// the prior ([`Overhead::PRIOR`] by default).
#[derive(Debug, Clone, PartialEq)]
pub struct OverheadEstimator {
    recent: VecDeque<(f64, f64)>,
    n: u64,
    prior: Overhead,
}

impl Default for OverheadEstimator {
    fn default() -> OverheadEstimator {
        OverheadEstimator::with_prior(Overhead::PRIOR)
    }
}

impl OverheadEstimator {
    /// An estimator that has measured nothing and starts from `prior`.
    pub fn with_prior(prior: Overhead) -> OverheadEstimator {
        OverheadEstimator {
            recent: VecDeque::with_capacity(OVERHEAD_WINDOW),
            n: 0,
            prior,
        }
    }

    /// Takes one finished migration: the VM's utilisation (0..1) and the residual, seconds.
    /// A figure that is not a finite number (or a residual over an hour) is ignored (false).
    pub fn observe(&mut self, utilization: f64, residual_s: f64) -> bool {
        if !(utilization.is_finite() && residual_s.is_finite() && residual_s.abs() <= 3600.0) {
            return false;
        }
        if self.recent.len() == OVERHEAD_WINDOW {
            self.recent.pop_front();
        }
        self.recent
            .push_back((utilization.clamp(0.0, 1.0), residual_s));
        self.n += 1;
        true
    }

    /// Migrations taken.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// What it has learnt ([`OverheadEstimator::restore`] takes it back).
    pub fn state(&self) -> OverheadState {
        OverheadState {
            recent: self.recent.iter().copied().collect(),
            n: self.n,
        }
    }

    /// An estimator (with the default prior) that goes on from `s` exactly as the one that
    /// gave it would. A state no estimator can reach is refused: more moves kept than
    /// [`OVERHEAD_WINDOW`] or than `n`, fewer than the window while `n` is larger, or a move
    /// [`OverheadEstimator::observe`] would not have kept as it is.
    pub fn restore(s: OverheadState) -> Result<OverheadEstimator, RestoreOverheadError> {
        let kept = s.recent.len();
        let expected = usize::try_from(s.n).map_or(OVERHEAD_WINDOW, |n| n.min(OVERHEAD_WINDOW));
        let moves_ok = s
            .recent
            .iter()
            .all(|&(u, r)| (0.0..=1.0).contains(&u) && r.is_finite() && r.abs() <= 3600.0);
        if kept != expected || !moves_ok {
            return Err(RestoreOverheadError::Unreachable { kept, n: s.n });
        }
        Ok(OverheadEstimator {
            recent: s.recent.into_iter().collect(),
            n: s.n,
            prior: Overhead::PRIOR,
        })
    }

    /// The estimate (the prior before the first migration).
    pub fn estimate(&self) -> Overhead {
        if self.recent.is_empty() {
            return self.prior;
        }
        let slope = theil_sen_slope(&self.recent);
        let s = slope.unwrap_or(0.0);
        let mut fixed: Vec<f64> = self.recent.iter().map(|&(u, r)| r - s * u).collect();
        while fixed.len() < OVERHEAD_PRIOR_FILL {
            fixed.push(self.prior.fixed_s);
        }
        Overhead {
            fixed_s: median(&mut fixed).max(0.0),
            per_utilization_s: s,
            max_utilization: match slope {
                Some(_) => self.recent.iter().map(|&(u, _)| u).fold(0.0, f64::max),
                None => 0.0,
            },
        }
    }
}

/// The median of `v` (the mean of the two middle values of an even count); `v` not empty.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// The spread of utilisation the moves must have before [`OverheadEstimator`] fits a slope: over
/// a narrower one, a few milliseconds of noise make a slope that, carried to a busy VM, adds
/// a tenth of a second (the bench's run 12: moves at 0–0.12 predicted a move at 0.84 at 0.219 s,
/// measured 0.063 s).
pub const OVERHEAD_SLOPE_SPAN: f64 = 0.3;

/// The Theil–Sen slope of residual on utilisation over `moves`: the median of the slopes
/// between every two moves at least 0.05 of utilisation apart. `None` with fewer than 4 moves,
/// a spread of utilisation under [`OVERHEAD_SLOPE_SPAN`], or a slope that is not positive.
fn theil_sen_slope(moves: &VecDeque<(f64, f64)>) -> Option<f64> {
    if moves.len() < 4 {
        return None;
    }
    let (lo, hi) = moves
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(u, _)| {
            (lo.min(u), hi.max(u))
        });
    if hi - lo < OVERHEAD_SLOPE_SPAN {
        return None;
    }
    let mut slopes = Vec::new();
    for (i, &(u1, r1)) in moves.iter().enumerate() {
        for &(u2, r2) in moves.iter().skip(i + 1) {
            if (u2 - u1).abs() >= 0.05 {
                slopes.push((r2 - r1) / (u2 - u1));
            }
        }
    }
    if slopes.is_empty() {
        return None;
    }
    let s = median(&mut slopes);
    (s.is_finite() && s > 0.0).then_some(s)
}

/// The link a move whose target is not known yet is predicted over: the mean of the measured
/// links among `measured`, or `default` if none is measured.
pub fn typical_link(measured: impl IntoIterator<Item = Option<f64>>, default: f64) -> f64 {
    let (sum, n) = measured
        .into_iter()
        .flatten()
        .fold((0.0, 0u32), |(s, n), b| (s + b, n + 1));
    if n == 0 { default } else { sum / f64::from(n) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(mib: u64, pages: f64) -> MoveInput {
        MoveInput {
            memory_bytes: mib << 20,
            resident_bytes: None,
            dirty_pages_per_sec: pages,
            link_bytes_per_sec: 125e6,
            downtime_budget_ms: 50.0,
            volume_disks: 0,
        }
    }

    #[test]
    fn an_idle_guest_moves_in_about_memory_over_bandwidth() {
        let p = predict_move(&input(512, 0.0));
        assert!(p.converges);
        let floor = (512u64 << 20) as f64 / 125e6;
        assert!(p.time_s >= floor && p.time_s < floor * 1.05, "{p:?}");
        assert!(p.bytes >= 512 << 20);
        assert!(p.downtime_ms <= 50.0);
    }

    #[test]
    fn a_writer_costs_more_time_and_bytes_than_an_idle_guest() {
        let idle = predict_move(&input(1024, 0.0));
        let busy = predict_move(&input(1024, 10_000.0));
        assert!(busy.converges);
        assert!(
            busy.time_s > idle.time_s && busy.bytes > idle.bytes,
            "{busy:?} {idle:?}"
        );
    }

    #[test]
    fn the_overhead_estimate_recovers_a_fixed_cost_and_a_slope_in_utilisation() {
        // before any move: the prior
        let e = OverheadEstimator::default();
        assert_eq!(e.estimate(), Overhead::PRIOR);
        assert!(e.estimate().at(0.5) > 0.0);
        // residual = 4 ms + 80 ms × utilisation, over a spread of utilisations
        let mut e = OverheadEstimator::with_prior(Overhead::default());
        for &u in &[0.05, 0.1, 0.9, 0.15, 0.6, 0.1, 0.3] {
            e.observe(u, 0.004 + 0.08 * u);
        }
        let o = e.estimate();
        assert!((o.fixed_s - 0.004).abs() < 1e-9, "{o:?}");
        assert!((o.per_utilization_s - 0.08).abs() < 1e-9, "{o:?}");
        assert!((o.at(0.5) - 0.044).abs() < 1e-9);
        assert_eq!(o.at(f64::NAN), o.fixed_s);
        // refused figures change nothing
        assert!(!e.observe(f64::NAN, 1.0) && !e.observe(0.1, f64::INFINITY));
        assert!(!e.observe(0.1, 3601.0));
        assert_eq!(e.estimate(), o);
        assert_eq!(e.count(), 7);
    }

    #[test]
    fn the_overhead_follows_the_newest_moves_and_is_never_negative() {
        let mut e = OverheadEstimator::default();
        for _ in 0..5 {
            e.observe(0.1, 0.010);
        }
        assert!((e.estimate().fixed_s - 0.010).abs() < 1e-12);
        for _ in 0..10 {
            e.observe(0.1, 0.002);
        }
        // the window holds only the newest moves
        let o = e.estimate();
        assert!((o.fixed_s - 0.002).abs() < 1e-12, "{o:?}");
        // moves faster than the model: no negative overhead
        let mut neg = OverheadEstimator::default();
        for r in [-0.004, -0.001, -0.003, -0.002, -0.005] {
            neg.observe(0.2, r);
        }
        assert_eq!(neg.estimate().fixed_s, 0.0);
        // a slope fitted negative is dropped for the median
        let mut down = OverheadEstimator::default();
        for &(u, r) in &[
            (0.1, 0.02),
            (0.9, 0.01),
            (0.5, 0.015),
            (0.3, 0.018),
            (0.7, 0.012),
        ] {
            down.observe(u, r);
        }
        assert_eq!(down.estimate().per_utilization_s, 0.0);
        assert!((down.estimate().fixed_s - 0.015).abs() < 1e-12);
        let p = predict_move(&input(64, 0.0));
        let with = o.add_to(p, 0.5);
        assert!((with.time_s - p.time_s - o.at(0.5)).abs() < 1e-12);
    }

    #[test]
    fn one_slow_move_does_not_spoil_the_overhead() {
        // steady moves 20 ms beyond the model, then one of 500 ms (a stalled host)
        let mut e = OverheadEstimator::default();
        for _ in 0..6 {
            e.observe(0.1, 0.020);
        }
        e.observe(0.1, 0.5);
        assert!(
            (e.estimate().fixed_s - 0.020).abs() < 1e-12,
            "{:?}",
            e.estimate()
        );
        // nor at the very start: the first move is slow, the prior holds
        let mut first = OverheadEstimator::default();
        first.observe(0.05, 0.3);
        assert_eq!(first.estimate(), Overhead::PRIOR);
        // but a cluster that is slower than the prior throughout is followed within 3 moves
        let mut slow = OverheadEstimator::default();
        for _ in 0..3 {
            slow.observe(0.05, 0.080);
        }
        assert!((slow.estimate().fixed_s - 0.080).abs() < 1e-12);
    }

    #[test]
    fn a_slope_is_not_fitted_on_a_narrow_spread_nor_carried_above_the_moves() {
        // the bench's run 12: seven moves of idle VMs (utilisation 0–0.12), then a busy one
        let mut e = OverheadEstimator::default();
        for &(u, r) in &[
            (0.04, 0.016),
            (0.12, 0.011),
            (0.0, 0.004),
            (0.08, 0.034),
            (0.08, 0.050),
            (0.08, 0.024),
            (0.04, 0.029),
        ] {
            e.observe(u, r);
        }
        let o = e.estimate();
        assert_eq!(o.per_utilization_s, 0.0, "{o:?}");
        assert!((o.at(0.84) - 0.024).abs() < 1e-12, "{o:?}");
        // a slope measured up to 0.5 is not carried to 0.9
        let mut e = OverheadEstimator::with_prior(Overhead::default());
        for &u in &[0.05, 0.1, 0.5, 0.2, 0.4] {
            e.observe(u, 0.01 + 0.1 * u);
        }
        let o = e.estimate();
        assert!((o.per_utilization_s - 0.1).abs() < 1e-9, "{o:?}");
        assert_eq!(o.max_utilization, 0.5);
        assert!((o.at(0.9) - o.at(0.5)).abs() < 1e-12, "{o:?}");
        assert!((o.at(0.3) - 0.04).abs() < 1e-9, "{o:?}");
    }

    /// The model's time for the demo's moves (an idle 64 MiB test guest on a volume disk over
    /// the default link), as the controller predicted them in the recorded runs below.
    const DEMO_MODEL_S: f64 = PRIOR_EVIDENCE_MODEL_S;

    /// Mean absolute error of the predictions `model + overhead` for recorded whole moves,
    /// each plan's moves (a batch) predicted with what the moves before the plan taught: all
    /// moves, and those after the first batch.
    fn replay_recorded(batches: &[&[f64]]) -> (f64, f64, Vec<f64>) {
        let mut e = OverheadEstimator::default();
        let mut errors = Vec::new();
        let mut predicted = Vec::new();
        for batch in batches {
            let p = DEMO_MODEL_S + e.estimate().at(0.1);
            for &measured in *batch {
                errors.push((p - measured).abs() / measured);
                predicted.push(p);
            }
            for &measured in *batch {
                e.observe(0.1, measured - DEMO_MODEL_S);
            }
        }
        let first = batches[0].len();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        (mean(&errors), mean(&errors[first..]), predicted)
    }

    #[test]
    fn recorded_runs_are_predicted_within_20_percent_on_average_and_slow_first_moves_spoil_nothing()
    {
        // The whole moves (target start + migration) of the automation bench's runs 25-30
        // (docs/benchmarks.md, "Automation"), seconds, by plan.
        let runs: &[(u32, &[&[f64]])] = &[
            (
                25,
                &[
                    &[0.122, 0.111, 0.103],
                    &[0.128, 0.102, 0.107, 0.086],
                    &[0.139],
                ],
            ),
            (
                26,
                &[
                    &[0.093, 0.086, 0.071],
                    &[0.121, 0.114, 0.097, 0.088],
                    &[0.139],
                    &[0.136, 0.134],
                    &[0.085],
                    &[0.125],
                ],
            ),
            (
                27,
                &[
                    &[0.105, 0.111, 0.068],
                    &[0.135, 0.119, 0.138, 0.127],
                    &[0.125],
                    &[0.116],
                    &[0.091],
                ],
            ),
            (
                28,
                &[
                    &[0.122, 0.131, 0.096],
                    &[0.120, 0.113, 0.107, 0.114],
                    &[0.144],
                    &[0.112, 0.139],
                    &[0.127],
                    &[0.116],
                ],
            ),
            (
                29,
                &[
                    &[0.142, 0.126, 0.075],
                    &[0.102, 0.114, 0.106, 0.082],
                    &[0.114],
                    &[0.094],
                    &[0.117],
                    &[0.119],
                ],
            ),
            (
                30,
                &[
                    &[0.139, 0.149, 0.086],
                    &[0.090, 0.105, 0.133, 0.092],
                    &[0.138],
                    &[0.122],
                    &[0.107],
                ],
            ),
        ];
        let mut sum = 0.0;
        for (run, batches) in runs {
            let (all, _, p) = replay_recorded(batches);
            assert!(
                all < 0.25,
                "run {run}: {all} over all moves, predicted {p:?}"
            );
            sum += all;
        }
        let mean = sum / runs.len() as f64;
        assert!(mean < 0.20, "{mean} over runs 25-30");
        // Run 10's first two moves took 120-128 ms in the source VMM, against 32-73 ms for every
        // other move: they are not taken as the overhead of the moves after them (the
        // least-squares estimator predicted 0.118 s for the next four, measured 0.056-0.080 s).
        let run10: &[&[f64]] = &[
            &[0.174, 0.155, 0.052],
            &[0.059, 0.056, 0.080, 0.068],
            &[0.052],
            &[0.069, 0.062],
            &[0.057],
        ];
        let (_, later, p) = replay_recorded(run10);
        // its second plan is still predicted from the prior (fill), the rest from its moves
        assert!(
            p[3..7].iter().all(|&x| x <= p[0]),
            "run 10: predicted {p:?}"
        );
        assert!(p[7..].iter().all(|&x| x < 0.075), "run 10: predicted {p:?}");
        assert!(
            later < 0.25,
            "run 10: {later} after the first plan, predicted {p:?}"
        );
    }

    /// The recorded first moves' mean relative error when each is predicted at `p`, each run
    /// weighing alike: over the runs `runs` selects.
    fn first_move_error(p: f64, runs: impl Fn(u32) -> bool) -> f64 {
        let per_run: Vec<f64> = PRIOR_EVIDENCE
            .iter()
            .filter(|(run, _)| runs(*run))
            .map(|(_, moves)| {
                moves.iter().map(|m| (p - m).abs() / m).sum::<f64>() / moves.len() as f64
            })
            .collect();
        per_run.iter().sum::<f64>() / per_run.len() as f64
    }

    #[test]
    fn the_prior_predicts_the_recorded_first_moves_best_under_the_goals_loss() {
        // runs 16-24's stand-ins from the recorded errors: all / after the first sample's, moves
        let recorded = [
            (16, 0.23, 0.20, 10),
            (17, 0.25, 0.16, 12),
            (18, 0.28, 0.24, 11),
            (19, 0.23, 0.17, 10),
            (20, 0.33, 0.20, 10),
            (21, 0.25, 0.24, 10),
            (22, 0.31, 0.37, 10),
            (23, 0.25, 0.13, 9),
            (24, 0.24, 0.21, 10),
        ];
        for (run, all, after, n) in recorded {
            let first = (n as f64 * all - (n - 3) as f64 * after) / 3.0;
            let m = PRIOR_EVIDENCE.iter().find(|(r, _)| *r == run).unwrap().1[0];
            assert!(
                ((1.0 - 0.054 / m) - first).abs() < 0.002,
                "run {run}: {m} s for an error of {first}"
            );
        }
        let p = PRIOR_EVIDENCE_MODEL_S + Overhead::PRIOR.at(0.0);
        // the prediction is the best over the runs it is fitted on, to the half millisecond
        let fitted = |r| r >= PRIOR_EVIDENCE_FROM_RUN;
        let best = (80..=300)
            .map(|k| k as f64 * 0.0005)
            .min_by(|a, b| first_move_error(*a, fitted).total_cmp(&first_move_error(*b, fitted)))
            .unwrap();
        assert!((p - best).abs() < 0.001, "{p} against the best {best}");
        // against the priors before (0.054 s, then 0.063 s, fitted on every run): a third less
        // error on the fitted runs, and on the newest runs, whose reports were kept
        for older in [0.054, 0.063] {
            assert!(
                first_move_error(p, fitted) < 0.7 * first_move_error(older, fitted),
                "{} against {} at {older}",
                first_move_error(p, fitted),
                first_move_error(older, fitted)
            );
            assert!(first_move_error(p, |r| r >= 25) < 0.7 * first_move_error(older, |r| r >= 25));
        }
        // the older cluster's faster first moves (runs 8-15) are not what it predicts
        assert!(first_move_error(p, |r| r < PRIOR_EVIDENCE_FROM_RUN) > 0.5);
        // a fit over every run lies between, and errs more on the fitted runs than this one
        let all = |_| true;
        let best_all = (80..=300)
            .map(|k| k as f64 * 0.0005)
            .min_by(|a, b| first_move_error(*a, all).total_cmp(&first_move_error(*b, all)))
            .unwrap();
        assert!((0.06..p).contains(&best_all), "{best_all}");
        assert!(first_move_error(best_all, fitted) > first_move_error(p, fitted) + 0.05);
        // an overhead, not a move: under a tenth of a second
        let prior = OverheadEstimator::default().estimate();
        assert!((0.0..0.1).contains(&prior.fixed_s), "{prior:?}");
    }

    #[test]
    fn a_restored_overhead_goes_on_as_the_one_that_was_stored() {
        let moves = [
            (0.05, 0.21),
            (0.3, 0.26),
            (0.1, 0.19),
            (0.8, 0.35),
            (0.2, 0.24),
            (0.4, 0.27),
            (0.1, 0.2),
            (0.6, 0.3),
            (0.9, 0.36),
            (0.2, 0.23),
            (0.1, 0.22),
        ];
        let mut whole = OverheadEstimator::default();
        let mut first = OverheadEstimator::default();
        for &(u, r) in &moves[..3] {
            whole.observe(u, r);
            first.observe(u, r);
        }
        // kept as JSON (the controller's etcd value) and read back by the next controller
        let json = serde_json::to_string(&first.state()).unwrap();
        let back: OverheadState = serde_json::from_str(&json).unwrap();
        let mut next = OverheadEstimator::restore(back).unwrap();
        assert_eq!(next.estimate(), first.estimate());
        assert_eq!(next.count(), 3);
        for &(u, r) in &moves[3..] {
            whole.observe(u, r);
            next.observe(u, r);
        }
        assert_eq!(next, whole);
        assert!(next.estimate().fixed_s > 0.15, "{:?}", next.estimate());
        // a full window, stored and read back
        let again = OverheadEstimator::restore(whole.state()).unwrap();
        assert_eq!(again, whole);
        // a fresh estimator's state is a fresh estimator
        let fresh = OverheadEstimator::restore(OverheadState::default()).unwrap();
        assert_eq!(fresh.estimate(), Overhead::PRIOR);
    }

    #[test]
    fn a_stored_overhead_no_estimator_can_reach_is_refused() {
        let good = {
            let mut e = OverheadEstimator::default();
            e.observe(0.5, 0.1);
            e.observe(0.2, 0.2);
            e.state()
        };
        let with = |recent: Vec<(f64, f64)>, n: u64| OverheadState { recent, n };
        for bad in [
            with(vec![(0.5, f64::NAN), (0.2, 0.2)], 2),
            with(vec![(1.5, 0.1), (0.2, 0.2)], 2),
            with(vec![(-0.1, 0.1), (0.2, 0.2)], 2),
            with(vec![(0.5, 4000.0), (0.2, 0.2)], 2),
            // counts that do not match what was kept
            with(good.recent.clone(), 0),
            with(good.recent.clone(), 3),
            with(good.recent.clone(), 1),
            with(vec![(0.1, 0.1); OVERHEAD_WINDOW + 1], 20),
            with(vec![(0.1, 0.1); OVERHEAD_WINDOW - 1], 20),
        ] {
            let e = OverheadEstimator::restore(bad).unwrap_err();
            assert!(
                e.to_string().contains("not a state an estimator can reach"),
                "{e}"
            );
        }
        assert!(OverheadEstimator::restore(with(vec![(0.1, 0.1); OVERHEAD_WINDOW], 20)).is_ok());
    }

    #[test]
    fn measured_links_are_kept_and_bad_ones_left_out() {
        let mut e = LinkEstimator::default();
        e.observe("h1", 1e9);
        e.observe("h2", 2e8);
        let back = LinkEstimator::from_measured(e.measured());
        assert_eq!(back, e);
        let mut bad = e.measured().clone();
        bad.insert("h3".into(), f64::NAN);
        bad.insert("h4".into(), 0.5);
        assert_eq!(LinkEstimator::from_measured(&bad), e);
    }

    #[test]
    fn a_volume_disk_adds_its_hand_over_to_the_pause_and_the_time() {
        let plain = predict_move(&input(64, 0.0));
        let with_disk = predict_move(&MoveInput {
            volume_disks: 1,
            ..input(64, 0.0)
        });
        let handover = PredictInput::new(1, 0.0, 1.0).disk_handover.as_secs_f64();
        assert!(handover > 0.0);
        assert!(
            (with_disk.time_s - plain.time_s - handover).abs() < 1e-9,
            "{plain:?} {with_disk:?}"
        );
        assert!(
            (with_disk.downtime_ms - plain.downtime_ms - handover * 1000.0).abs() < 1e-6,
            "{plain:?} {with_disk:?}"
        );
        assert_eq!(with_disk.bytes, plain.bytes);
    }

    #[test]
    fn a_big_fast_writer_does_not_converge_before_the_timeout() {
        // 8 GiB take 69 s on the link, past the 60 s timeout, and are dirtied faster than sent
        let p = predict_move(&input(8192, 1e6));
        assert!(!p.converges, "{p:?}");
        let bad = predict_move(&MoveInput {
            link_bytes_per_sec: 0.0,
            ..input(512, 0.0)
        });
        assert!(!bad.converges);
    }
}

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

use std::collections::BTreeMap;
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
/// the agents' round trips, the target VMM's start, the TLS set-up of its streams, the volume
/// disk's lease hand-over — and the migration threads' share of a CPU the guest's own vCPUs keep
/// busy (they run at nice 10, so a busy guest's copy waits for CPU). Measured, not assumed:
/// [`OverheadEstimator`] learns it from finished migrations.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Overhead {
    /// Seconds every move costs beyond the model.
    pub fixed_s: f64,
    /// Further seconds per unit of the moving VM's CPU utilisation (0..1 of its vCPUs).
    pub per_utilization_s: f64,
}

impl Overhead {
    /// The overhead of moving a VM at `utilization` (clamped to 0..=1), seconds, never negative.
    pub fn at(&self, utilization: f64) -> f64 {
        let u = if utilization.is_finite() {
            utilization.clamp(0.0, 1.0)
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

/// The whole of what an [`OverheadEstimator`] has learnt: its weighted sums and count, so a
/// controller can keep it in etcd and the next one (after a fail-over or a restart) goes on
/// from it instead of predicting its first moves with no overhead at all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct OverheadState {
    /// Sum of the weights.
    pub w: f64,
    /// Weighted sums of utilisation, residual, utilisation², utilisation × residual.
    pub wx: f64,
    /// See `wx`.
    pub wy: f64,
    /// See `wx`.
    pub wxx: f64,
    /// See `wx`.
    pub wxy: f64,
    /// Migrations taken.
    pub n: u64,
}

/// Why an [`OverheadState`] was not taken.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum RestoreOverheadError {
    /// A sum is not a finite number, or the weights are negative or exceed what `n` moves give.
    #[error(
        "the stored move overhead is not a state an estimator can reach (weight {w} over {n} moves)"
    )]
    Unreachable {
        /// The stored weight.
        w: f64,
        /// The stored count.
        n: u64,
    },
}

/// How much an older migration counts against the newest in [`OverheadEstimator`]: each new
/// one multiplies the weight of those before by this.
pub const OVERHEAD_FORGET: f64 = 0.8;

/// Learns [`Overhead`] from finished migrations: each gives its residual — measured time less
/// the model's predicted time for the same move — and the VM's CPU utilisation when it was
/// predicted; the estimate is the exponentially weighted least-squares line through them
/// (residual = fixed + slope × utilisation; weight [`OVERHEAD_FORGET`] per newer move). Until
/// the moves span at least 0.1 of utilisation, or when the fitted slope is negative, the
/// slope is 0 and the fixed part the weighted mean residual; the fixed part is never below 0.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OverheadEstimator {
    w: f64,
    wx: f64,
    wy: f64,
    wxx: f64,
    wxy: f64,
    n: u64,
}

impl OverheadEstimator {
    /// Takes one finished migration: the VM's utilisation (0..1) and the residual, seconds.
    /// A figure that is not a finite number (or a residual over an hour) is ignored (false).
    pub fn observe(&mut self, utilization: f64, residual_s: f64) -> bool {
        if !(utilization.is_finite() && residual_s.is_finite() && residual_s.abs() <= 3600.0) {
            return false;
        }
        let x = utilization.clamp(0.0, 1.0);
        let y = residual_s;
        let f = OVERHEAD_FORGET;
        self.w = f * self.w + 1.0;
        self.wx = f * self.wx + x;
        self.wy = f * self.wy + y;
        self.wxx = f * self.wxx + x * x;
        self.wxy = f * self.wxy + x * y;
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
            w: self.w,
            wx: self.wx,
            wy: self.wy,
            wxx: self.wxx,
            wxy: self.wxy,
            n: self.n,
        }
    }

    /// An estimator that goes on from `s` exactly as the one that gave it would. A state no
    /// estimator can reach (a sum not finite, a negative weight or utilisation sum, a weight
    /// above `1 / (1 − OVERHEAD_FORGET)` or not matching `n`'s zero) is refused.
    pub fn restore(s: OverheadState) -> Result<OverheadEstimator, RestoreOverheadError> {
        let finite = [s.w, s.wx, s.wy, s.wxx, s.wxy]
            .iter()
            .all(|v| v.is_finite());
        let max_w = 1.0 / (1.0 - OVERHEAD_FORGET) + 1e-9;
        let reachable = finite
            && s.w >= 0.0
            && s.w <= max_w
            && (s.n == 0) == (s.w == 0.0)
            && s.wx >= 0.0
            && s.wx <= s.w + 1e-9
            && s.wxx >= 0.0
            && s.wxx <= s.wx + 1e-9;
        if !reachable {
            return Err(RestoreOverheadError::Unreachable { w: s.w, n: s.n });
        }
        Ok(OverheadEstimator {
            w: s.w,
            wx: s.wx,
            wy: s.wy,
            wxx: s.wxx,
            wxy: s.wxy,
            n: s.n,
        })
    }

    /// The estimate (zero before the first migration).
    pub fn estimate(&self) -> Overhead {
        if self.n == 0 || self.w <= 0.0 {
            return Overhead::default();
        }
        let mean_x = self.wx / self.w;
        let mean_y = self.wy / self.w;
        let var_x = self.wxx / self.w - mean_x * mean_x;
        let flat = Overhead {
            fixed_s: mean_y.max(0.0),
            per_utilization_s: 0.0,
        };
        // a spread of at least 0.1 of utilisation (standard deviation 0.05) to fit a slope
        if var_x < 0.05 * 0.05 {
            return flat;
        }
        let slope = (self.wxy / self.w - mean_x * mean_y) / var_x;
        if !(slope.is_finite() && slope > 0.0) {
            return flat;
        }
        Overhead {
            fixed_s: (mean_y - slope * mean_x).max(0.0),
            per_utilization_s: slope,
        }
    }
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
        let mut e = OverheadEstimator::default();
        assert_eq!(e.estimate(), Overhead::default());
        // one move: its residual is the fixed cost
        e.observe(0.1, 0.005);
        assert!(
            (e.estimate().fixed_s - 0.005).abs() < 1e-12,
            "{:?}",
            e.estimate()
        );
        assert_eq!(e.estimate().per_utilization_s, 0.0);
        // residual = 4 ms + 80 ms × utilisation, over a spread of utilisations
        let mut e = OverheadEstimator::default();
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
        assert_eq!(e.estimate(), o);
    }

    #[test]
    fn the_overhead_follows_the_newest_moves_and_is_never_negative() {
        let mut e = OverheadEstimator::default();
        for _ in 0..5 {
            e.observe(0.1, 0.010);
        }
        for _ in 0..10 {
            e.observe(0.1, 0.002);
        }
        let o = e.estimate();
        // 0.8^10 ≈ 0.11 of the weight left on the old figure
        assert!(o.fixed_s > 0.002 && o.fixed_s < 0.003, "{o:?}");
        let mut neg = OverheadEstimator::default();
        neg.observe(0.2, -0.004);
        neg.observe(0.3, -0.001);
        assert_eq!(neg.estimate().fixed_s, 0.0);
        // a slope fitted negative is dropped for the mean
        let mut down = OverheadEstimator::default();
        for &(u, r) in &[(0.1, 0.02), (0.9, 0.01), (0.5, 0.015)] {
            down.observe(u, r);
        }
        assert_eq!(down.estimate().per_utilization_s, 0.0);
        assert!(down.estimate().fixed_s > 0.01);
        let p = predict_move(&input(64, 0.0));
        let with = o.add_to(p, 0.5);
        assert!((with.time_s - p.time_s - o.at(0.5)).abs() < 1e-12);
    }

    #[test]
    fn a_restored_overhead_goes_on_as_the_one_that_was_stored() {
        let moves = [
            (0.05, 0.21),
            (0.3, 0.26),
            (0.1, 0.19),
            (0.8, 0.35),
            (0.2, 0.24),
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
        // a fresh estimator's state is a fresh estimator
        let fresh = OverheadEstimator::restore(OverheadState::default()).unwrap();
        assert_eq!(fresh.estimate(), Overhead::default());
    }

    #[test]
    fn a_stored_overhead_no_estimator_can_reach_is_refused() {
        let good = {
            let mut e = OverheadEstimator::default();
            e.observe(0.5, 0.1);
            e.observe(0.2, 0.2);
            e.state()
        };
        for bad in [
            OverheadState {
                wy: f64::NAN,
                ..good
            },
            OverheadState { w: -1.0, ..good },
            OverheadState { w: 6.0, ..good },
            OverheadState { n: 0, ..good },
            OverheadState { wx: 3.0, ..good },
            OverheadState {
                w: 0.0,
                ..OverheadState::default()
            }
            .with_n(2),
        ] {
            let e = OverheadEstimator::restore(bad).unwrap_err();
            assert!(
                e.to_string().contains("not a state an estimator can reach"),
                "{e}"
            );
        }
    }

    impl OverheadState {
        fn with_n(self, n: u64) -> OverheadState {
            OverheadState { n, ..self }
        }
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

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
}

impl MoveInput {
    /// The move of `vm` over a link of `link_bytes_per_sec`: its memory, resident memory (if
    /// reported) and dirty rate (0 if not measured).
    pub fn for_vm(vm: &VmSample, link_bytes_per_sec: f64, downtime_budget_ms: f64) -> MoveInput {
        MoveInput {
            memory_bytes: vm.memory_mib << 20,
            resident_bytes: vm.resident_mib.map(|r| r << 20),
            dirty_pages_per_sec: vm.dirty_pages_per_sec.unwrap_or(0.0),
            link_bytes_per_sec,
            downtime_budget_ms,
        }
    }
}

/// The predicted cost of moving the guest in `input` (module docs). An input the predictor
/// refuses (no memory, no link, a negative rate) is predicted not to converge, with no time.
pub fn predict_move(input: &MoveInput) -> MigrationPrediction {
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
/// the model puts ~12 ms on fixed costs; the rest would read as a 20–30 MB/s link on a veth pair).
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

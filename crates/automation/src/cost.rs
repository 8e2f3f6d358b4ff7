//! A move's predicted cost: total time, bytes and downtime, and whether it converges.
//!
//! [`predict_move`] is the one call the loop (and the controller, for its tasks) makes. It runs
//! `tern_migration`'s predictor, which drives the real sender machine — the same switch-over
//! rule, throttle schedule, timeout and bandwidth estimator a migration follows — against a
//! modelled guest (its memory and measured dirty rate) and link, under the migration's default
//! convergence settings with the loop's downtime budget. A move converges when the switch-over
//! rule fires within the budget; one that would be forced or abandoned at the timeout does not,
//! and the loop holds it back.

use std::time::Duration;

use tern_api::automation::MigrationPrediction;
use tern_migration::machine::policy::ConvergenceConfig;
use tern_migration::machine::predict::{PredictInput, predict};

/// What a move's cost depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoveInput {
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// Pages dirtied per second (0 when not measured).
    pub dirty_pages_per_sec: f64,
    /// The link between the hosts, bytes per second.
    pub link_bytes_per_sec: f64,
    /// The longest acceptable pause, milliseconds.
    pub downtime_budget_ms: f64,
}

/// The predicted cost of moving the guest in `input` (module docs). An input the predictor
/// refuses (no memory, no link, a negative rate) is predicted not to converge, with no time.
pub fn predict_move(input: &MoveInput) -> MigrationPrediction {
    let cfg = ConvergenceConfig {
        downtime_budget: Duration::from_secs_f64(input.downtime_budget_ms.max(0.0) / 1000.0),
        ..ConvergenceConfig::default()
    };
    let guest = PredictInput::new(
        input.memory_bytes,
        input.dirty_pages_per_sec,
        input.link_bytes_per_sec,
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn input(mib: u64, pages: f64) -> MoveInput {
        MoveInput {
            memory_bytes: mib << 20,
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

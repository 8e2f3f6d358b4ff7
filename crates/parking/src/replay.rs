//! Trace replay: a host whose cores are parked by a strategy, driven by a demand trace (pure).
//!
//! [`HostSim`] is the piece a simulator embeds: each interval it takes the demand (cores' worth of
//! work offered by the host's VMs), serves what the unparked cores can hold, reports power and the
//! excess (work that had to wait), and feeds the strategy what a real host would measure — the
//! unparked cores evenly busy, parked cores idle, the excess as run-queue wait. The decision made
//! after interval `t` applies to interval `t + 1`, as on a real host.

#![deny(clippy::disallowed_methods)]
use serde::{Deserialize, Serialize};

use crate::knobs::Knobs;
use crate::policy::{Policy, Sample};
use crate::power::ParkingPowerModel;
use crate::topology::Topology;

/// How cores are parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// Tern's policy with these knobs.
    Policy(Knobs),
    /// Every core always unparked.
    NoParking,
    /// The naive rule: each interval, park one core if the unparked cores were below `threshold_pct`
    /// busy, otherwise unpark one.
    Naive { threshold_pct: u32 },
}

#[derive(Debug, Clone)]
enum State {
    Policy(Box<Policy>),
    NoParking,
    Naive { threshold: f64 },
}

/// One simulated host.
#[derive(Debug, Clone)]
pub struct HostSim {
    state: State,
    model: ParkingPowerModel,
    unparked: usize,
}

/// What one interval cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepOutcome {
    /// Demand offered, cores.
    pub demand: f64,
    /// Cores unparked during the interval.
    pub unparked: usize,
    /// Host power, watts.
    pub power_w: f64,
    /// Host power had nothing been parked, watts.
    pub power_no_parking_w: f64,
    /// Demand above the unparked capacity, cores (it waits).
    pub excess: f64,
}

impl HostSim {
    /// A host of `model.cores` flat cores under `strategy` (knobs must be valid).
    pub fn new(strategy: Strategy, model: ParkingPowerModel) -> HostSim {
        let cores = model.cores;
        let state = match strategy {
            Strategy::Policy(knobs) => {
                State::Policy(Box::new(Policy::new(knobs, Topology::flat(cores))))
            }
            Strategy::NoParking => State::NoParking,
            Strategy::Naive { threshold_pct } => State::Naive {
                threshold: f64::from(threshold_pct) / 100.0,
            },
        };
        let unparked = match &state {
            State::Policy(p) => p.unparked().len(),
            _ => cores,
        };
        HostSim {
            state,
            model,
            unparked,
        }
    }

    /// Cores unparked for the next interval.
    pub fn unparked(&self) -> usize {
        self.unparked
    }

    /// Runs one interval with `demand` cores of work offered.
    pub fn step(&mut self, demand: f64) -> StepOutcome {
        let demand = if demand.is_finite() {
            demand.max(0.0)
        } else {
            0.0
        };
        let k = self.unparked;
        let out = StepOutcome {
            demand,
            unparked: k,
            power_w: self.model.power_w(demand, k),
            power_no_parking_w: self.model.power_no_parking_w(demand),
            excess: (demand - k as f64).max(0.0),
        };
        let cores = self.model.cores;
        self.unparked = match &mut self.state {
            State::NoParking => cores,
            State::Naive { threshold } => {
                if demand / (k as f64) < *threshold {
                    (k - 1).max(1)
                } else {
                    (k + 1).min(cores)
                }
            }
            State::Policy(p) => {
                let per = (demand / k as f64).min(1.0);
                let unparked = p.unparked().to_vec();
                let cpu_busy = (0..cores)
                    .map(|id| if unparked.contains(&id) { per } else { 0.0 })
                    .collect();
                p.step(&Sample {
                    cpu_busy,
                    runq_wait: out.excess,
                })
                .unparked
                .len()
            }
        };
        out
    }
}

/// Totals of a replay.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReplaySummary {
    /// Intervals replayed.
    pub intervals: usize,
    /// Interval length, seconds.
    pub interval_s: f64,
    /// Energy with this strategy, joules.
    pub energy_j: f64,
    /// Energy with no parking, joules.
    pub energy_no_parking_j: f64,
    /// Intervals in which demand exceeded the unparked capacity.
    pub exceeded_intervals: usize,
    /// Work that had to wait for capacity, core-seconds (the added delay).
    pub delayed_core_s: f64,
    /// Mean cores unparked.
    pub mean_unparked: f64,
    /// Times the unparked count changed.
    pub changes: usize,
}

impl ReplaySummary {
    /// Energy saved against no parking, %.
    pub fn saved_pct(&self) -> f64 {
        if self.energy_no_parking_j > 0.0 {
            100.0 * (1.0 - self.energy_j / self.energy_no_parking_j)
        } else {
            0.0
        }
    }

    /// Fraction of intervals in which demand exceeded the unparked capacity.
    pub fn exceeded_fraction(&self) -> f64 {
        if self.intervals == 0 {
            0.0
        } else {
            self.exceeded_intervals as f64 / self.intervals as f64
        }
    }
}

/// Replays `demands` (cores per interval) through one host; returns each interval and the totals.
pub fn replay(
    demands: &[f64],
    interval_s: f64,
    strategy: Strategy,
    model: ParkingPowerModel,
) -> (Vec<StepOutcome>, ReplaySummary) {
    let mut sim = HostSim::new(strategy, model);
    let steps: Vec<StepOutcome> = demands.iter().map(|&d| sim.step(d)).collect();
    (steps.clone(), summarise(&steps, interval_s))
}

/// Totals over a run of outcomes.
pub fn summarise(steps: &[StepOutcome], interval_s: f64) -> ReplaySummary {
    let n = steps.len();
    ReplaySummary {
        intervals: n,
        interval_s,
        energy_j: steps.iter().map(|s| s.power_w * interval_s).sum(),
        energy_no_parking_j: steps
            .iter()
            .map(|s| s.power_no_parking_w * interval_s)
            .sum(),
        exceeded_intervals: steps.iter().filter(|s| s.excess > 1e-9).count(),
        delayed_core_s: steps.iter().map(|s| s.excess * interval_s).sum(),
        mean_unparked: if n == 0 {
            0.0
        } else {
            steps.iter().map(|s| s.unparked as f64).sum::<f64>() / n as f64
        },
        changes: steps
            .windows(2)
            .filter(|w| w[0].unparked != w[1].unparked)
            .count(),
    }
}

/// Why a trace file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("Trace line {line}: `{value}` is not a non-negative number")]
    BadValue { line: usize, value: String },
    #[error("The trace has no samples")]
    Empty,
}

/// Parses a utilisation trace: one interval per line, each line one or more per-VM utilisations in
/// percent of one core (separated by spaces, tabs or commas); `#` starts a comment. Returns the
/// demand per interval in cores (the sum / 100). A PlanetLab file (one VM) is a valid trace.
pub fn parse_trace(text: &str) -> Result<Vec<f64>, TraceError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut sum = 0.0;
        for v in line
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
        {
            let x: f64 = v
                .parse()
                .ok()
                .filter(|x: &f64| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| TraceError::BadValue {
                    line: i + 1,
                    value: v.to_string(),
                })?;
            sum += x;
        }
        out.push(sum / 100.0);
    }
    if out.is_empty() {
        return Err(TraceError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::{CorePower, HostCurve};

    fn model(cores: usize) -> ParkingPowerModel {
        ParkingPowerModel::new(
            HostCurve::Linear {
                idle_w: 100.0,
                peak_w: 200.0,
            },
            cores,
            CorePower::default(),
        )
        .unwrap()
    }

    #[test]
    fn trace_parsing() {
        assert_eq!(
            parse_trace("# t\n50 25\n10,10\n\n100\n").unwrap(),
            vec![0.75, 0.2, 1.0]
        );
        assert_eq!(
            parse_trace("5\n-3\n").unwrap_err().to_string(),
            "Trace line 2: `-3` is not a non-negative number"
        );
        assert_eq!(parse_trace("# only\n"), Err(TraceError::Empty));
    }

    #[test]
    fn no_parking_never_exceeds_below_capacity() {
        let (_, s) = replay(&[0.5, 3.0, 0.1], 1.0, Strategy::NoParking, model(4));
        assert_eq!((s.exceeded_intervals, s.changes), (0, 0));
        assert_eq!(s.energy_j, s.energy_no_parking_j);
    }

    #[test]
    fn naive_rule_oscillates_on_steady_load() {
        // 0.6 cores: on 1 core 60 % → unpark; on 2 cores 30 % → park; forever.
        let (steps, _) = replay(
            &[0.6; 12],
            1.0,
            Strategy::Naive { threshold_pct: 50 },
            model(2),
        );
        let ks: Vec<usize> = steps.iter().map(|s| s.unparked).collect();
        assert_eq!(ks[2..8], [2, 1, 2, 1, 2, 1]);
    }
}

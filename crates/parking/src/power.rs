//! Power and energy model of a host whose idle cores may be parked.
//!
//! A host curve gives the power at a utilisation with no parking — linear (`P_idle + (P_peak −
//! P_idle)·u`, Fan et al. 2007) or a SPECpower_ssj2008 table (11 points, piecewise linear, as
//! CloudSim uses them). Parking changes where the idle time is spent: a parked core sits in its
//! deepest C-state instead of waking for stray work, so each parked core lowers the host power by
//! `CorePower::idle_w − CorePower::parked_w`. Served work is capped by the unparked capacity (what
//! does not fit waits, and is reported as delay, not energy).
//!
//! This is the public API the simulator uses: [`ParkingPowerModel::power_w`].

use serde::{Deserialize, Serialize};

/// The SPECpower tables shipped with Tern (CloudSim's PowerModelSpecPower* classes).
pub const SPECPOWER_CSV: &str = include_str!("../data/specpower_cloudsim.csv");

/// Host power as a function of utilisation, with no parking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HostCurve {
    /// `idle_w + (peak_w − idle_w)·u`.
    Linear { idle_w: f64, peak_w: f64 },
    /// Watts at 0 %, 10 %, …, 100 % utilisation; linear in between.
    SpecPower {
        name: String,
        cores: u32,
        watts: [f64; 11],
    },
}

/// Why a power model could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PowerModelError {
    #[error("Unknown SPECpower model `{name}` (known: {known})")]
    UnknownModel { name: String, known: String },
    #[error("Bad power model `{0}`: expected `linear:IDLE_W:PEAK_W` or `specpower:MODEL`")]
    BadSpec(String),
    #[error("Power figures must be finite, non-negative and rising: {0}")]
    BadFigures(String),
    #[error(
        "A parked core ({parked_w} W) must not draw more than an idle unparked one ({idle_w} W)"
    )]
    ParkedAboveIdle { parked_w: f64, idle_w: f64 },
}

impl HostCurve {
    /// Power in watts at utilisation `u` (clamped to 0–1).
    pub fn power_w(&self, u: f64) -> f64 {
        let u = if u.is_finite() {
            u.clamp(0.0, 1.0)
        } else {
            0.0
        };
        match self {
            HostCurve::Linear { idle_w, peak_w } => idle_w + (peak_w - idle_w) * u,
            HostCurve::SpecPower { watts, .. } => {
                let x = u * 10.0;
                let i = (x.floor() as usize).min(9);
                watts[i] + (watts[i + 1] - watts[i]) * (x - i as f64)
            }
        }
    }

    /// Looks a SPECpower table up by model name in [`SPECPOWER_CSV`].
    pub fn specpower(name: &str) -> Result<HostCurve, PowerModelError> {
        let mut known = Vec::new();
        for line in SPECPOWER_CSV
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("model,"))
        {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() < 17 {
                continue;
            }
            known.push(f[0].to_string());
            if f[0].eq_ignore_ascii_case(name) {
                let mut watts = [0.0; 11];
                for (w, s) in watts.iter_mut().zip(&f[6..17]) {
                    *w = s
                        .trim()
                        .parse()
                        .map_err(|_| PowerModelError::BadFigures(line.into()))?;
                }
                let cores = f[2].trim().parse().unwrap_or(1);
                return Ok(HostCurve::SpecPower {
                    name: f[0].to_string(),
                    cores,
                    watts,
                });
            }
        }
        Err(PowerModelError::UnknownModel {
            name: name.to_string(),
            known: known.join(", "),
        })
    }

    /// Parses `linear:IDLE_W:PEAK_W` or `specpower:MODEL`.
    pub fn parse(spec: &str) -> Result<HostCurve, PowerModelError> {
        let bad = || PowerModelError::BadSpec(spec.to_string());
        let (kind, rest) = spec.split_once(':').ok_or_else(bad)?;
        match kind {
            "linear" => {
                let (a, b) = rest.split_once(':').ok_or_else(bad)?;
                let idle_w: f64 = a.parse().map_err(|_| bad())?;
                let peak_w: f64 = b.parse().map_err(|_| bad())?;
                if !(idle_w.is_finite() && peak_w.is_finite() && idle_w >= 0.0 && peak_w >= idle_w)
                {
                    return Err(PowerModelError::BadFigures(spec.to_string()));
                }
                Ok(HostCurve::Linear { idle_w, peak_w })
            }
            "specpower" => HostCurve::specpower(rest),
            _ => Err(bad()),
        }
    }
}

/// Per-core power figures (sysfs `power` is usually "unknown", so they come from configuration).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CorePower {
    /// A core unparked but idle (shallow C-states, woken by stray work and ticks), watts.
    pub idle_w: f64,
    /// A parked core (deepest C-state), watts.
    pub parked_w: f64,
}

impl Default for CorePower {
    /// Server-class figures: ~3 W for an idle core in C1/C1E, ~0.5 W in C6.
    fn default() -> Self {
        CorePower {
            idle_w: 3.0,
            parked_w: 0.5,
        }
    }
}

/// A host curve plus per-core parking figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParkingPowerModel {
    /// Power with no parking.
    pub curve: HostCurve,
    /// Logical CPUs of the host.
    pub cores: usize,
    /// Idle versus parked core power.
    pub core: CorePower,
}

impl ParkingPowerModel {
    /// Builds a model, checking that parking a core can never raise power.
    pub fn new(
        curve: HostCurve,
        cores: usize,
        core: CorePower,
    ) -> Result<ParkingPowerModel, PowerModelError> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if !ok(core.idle_w) || !ok(core.parked_w) {
            return Err(PowerModelError::BadFigures(format!("{core:?}")));
        }
        if core.parked_w > core.idle_w {
            return Err(PowerModelError::ParkedAboveIdle {
                parked_w: core.parked_w,
                idle_w: core.idle_w,
            });
        }
        Ok(ParkingPowerModel {
            curve,
            cores: cores.max(1),
            core,
        })
    }

    /// Host power in watts when `demand_cores` of work is offered and `unparked` cores are unparked.
    /// Work above the unparked capacity is not served in this interval.
    pub fn power_w(&self, demand_cores: f64, unparked: usize) -> f64 {
        let unparked = unparked.clamp(1, self.cores);
        let demand = if demand_cores.is_finite() {
            demand_cores.max(0.0)
        } else {
            0.0
        };
        let served = demand.min(unparked as f64);
        let parked = (self.cores - unparked) as f64;
        self.curve.power_w(served / self.cores as f64)
            - parked * (self.core.idle_w - self.core.parked_w)
    }

    /// Host power with every core unparked.
    pub fn power_no_parking_w(&self, demand_cores: f64) -> f64 {
        self.power_w(demand_cores, self.cores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specpower_table_interpolates_by_hand() {
        let g4 = HostCurve::specpower("HpProLiantMl110G4Xeon3040").unwrap();
        assert_eq!(g4.power_w(0.0), 86.0);
        assert_eq!(g4.power_w(1.0), 117.0);
        // 45 %: halfway between 99.5 (40 %) and 102 (50 %).
        assert!((g4.power_w(0.45) - 100.75).abs() < 1e-9);
        let err = HostCurve::specpower("Nope").unwrap_err().to_string();
        assert!(
            err.starts_with("Unknown SPECpower model `Nope` (known: HpProLiantMl110G4Xeon3040")
        );
    }

    #[test]
    fn linear_and_parse() {
        let l = HostCurve::parse("linear:100:200").unwrap();
        assert_eq!(l.power_w(0.25), 125.0);
        assert_eq!(l.power_w(7.0), 200.0);
        assert!(HostCurve::parse("linear:200:100").is_err());
        assert!(HostCurve::parse("quadratic:1").is_err());
    }

    #[test]
    fn parked_core_energy_by_hand() {
        let m = ParkingPowerModel::new(
            HostCurve::Linear {
                idle_w: 100.0,
                peak_w: 200.0,
            },
            4,
            CorePower {
                idle_w: 3.0,
                parked_w: 0.5,
            },
        )
        .unwrap();
        // 1 core of demand on 4 cores: 125 W with no parking; parking 2 idle cores saves 2 × 2.5 W.
        assert_eq!(m.power_no_parking_w(1.0), 125.0);
        assert_eq!(m.power_w(1.0, 2), 120.0);
        // Demand 3 on 2 unparked cores: only 2 served.
        assert_eq!(m.power_w(3.0, 2), 150.0 - 5.0);
        assert!(
            ParkingPowerModel::new(
                m.curve.clone(),
                4,
                CorePower {
                    idle_w: 1.0,
                    parked_w: 2.0
                }
            )
            .is_err()
        );
    }
}

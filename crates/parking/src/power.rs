//! Power and energy model of a host whose idle cores may be parked.
//!
//! A host curve gives the power at a utilisation with no parking — linear (`P_idle + (P_peak −
//! P_idle)·u`, Fan et al. 2007) or a SPECpower_ssj2008 table (11 points, piecewise linear, as
//! CloudSim uses them). Such a curve was measured with the idle cores in whatever C-states they
//! reached, so parking can only save what those idle cores spent *above* the parked state:
//!
//! ```text
//! saving per parked core = share(u) · (shallow_w − deep_w)
//! ```
//!
//! where `shallow_w` is one core in the shallow state (C1/C3) an unparked idle core keeps falling
//! into, `deep_w` one core in the deepest per-core state (C6, power-gated) a parked core stays in,
//! and `share(u)` the part of an unparked core's idle time spent in the shallow state while the
//! curve was measured: `shallow_share` from the first measured load level (10 %) up, falling
//! linearly to 0 at active idle, where the curve's idle cores already sat in their deepest state.
//! The saving is counted once: the curve is never lowered below what its own idle cores drew, and a
//! CPU without a per-core deep state (Core 2, NetBurst) saves nothing by parking. Served work is
//! capped by the unparked capacity (what does not fit waits, and is reported as delay, not energy).
//! The per-CPU figures and their sources are in [`CoreFigures`] and `docs/parking.md`.
//!
//! This is the public API the simulator uses: [`ParkingPowerModel::power_w`].

#![deny(clippy::disallowed_methods)]
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
    #[error("Bad power model `{0}`: expected `auto`, `linear:IDLE_W:PEAK_W` or `specpower:MODEL`")]
    BadSpec(String),
    #[error("Power figures must be finite, non-negative and rising: {0}")]
    BadFigures(String),
    #[error(
        "A parked core ({deep_w} W) must not draw more than an idle unparked one in its shallow state ({shallow_w} W)"
    )]
    ParkedAboveIdle { deep_w: f64, shallow_w: f64 },
    #[error("The shallow-state share {0} is outside 0..=1")]
    BadShare(f64),
}

/// One row of [`SPECPOWER_CSV`].
fn specpower_rows() -> impl Iterator<Item = Vec<&'static str>> {
    SPECPOWER_CSV
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("model,"))
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() >= 17)
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
        for f in specpower_rows() {
            known.push(f[0].to_string());
            if f[0].eq_ignore_ascii_case(name) {
                let mut watts = [0.0; 11];
                for (w, s) in watts.iter_mut().zip(&f[6..17]) {
                    *w = s
                        .trim()
                        .parse()
                        .map_err(|_| PowerModelError::BadFigures(f.join(",")))?;
                }
                let cores = f[2]
                    .trim()
                    .parse()
                    .map_err(|_| PowerModelError::BadFigures(f.join(",")))?;
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

    /// The SPECpower table whose server has the core count nearest to `cores` (by ratio; on a tie
    /// the smaller server, then the first in the file). What `auto` picks.
    pub fn for_cores(cores: usize) -> HostCurve {
        let want = cores.max(1) as f64;
        let mut best: Option<(f64, u32, HostCurve)> = None;
        for f in specpower_rows() {
            let Ok(curve) = HostCurve::specpower(f[0]) else {
                continue;
            };
            let HostCurve::SpecPower { cores: c, .. } = curve else {
                continue;
            };
            let dist = (f64::from(c.max(1)) / want).ln().abs();
            let better = match &best {
                None => true,
                Some((d, bc, _)) => dist < d - 1e-12 || ((dist - d).abs() <= 1e-12 && c < *bc),
            };
            if better {
                best = Some((dist, c, curve));
            }
        }
        best.map(|(_, _, c)| c).unwrap_or(HostCurve::Linear {
            idle_w: 0.0,
            peak_w: 0.0,
        })
    }

    /// Parses `linear:IDLE_W:PEAK_W` or `specpower:MODEL`; `auto` picks by `cores` ([`HostCurve::for_cores`]).
    pub fn parse_for(spec: &str, cores: usize) -> Result<HostCurve, PowerModelError> {
        if spec.trim().eq_ignore_ascii_case("auto") {
            return Ok(HostCurve::for_cores(cores));
        }
        HostCurve::parse(spec)
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

    /// The curve as `--power-model` spells it, with the server's core count for a table.
    pub fn describe(&self) -> String {
        match self {
            HostCurve::Linear { idle_w, peak_w } => format!("linear:{idle_w}:{peak_w}"),
            HostCurve::SpecPower { name, cores, .. } => {
                format!("specpower:{name} ({cores}-core server)")
            }
        }
    }
}

/// Per-core power figures (sysfs `power` is usually "unknown", so they come from published figures
/// for the modelled CPU, or from the command line).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CorePower {
    /// One core in the shallow idle state (C1/C1E; C3 counted as C1) that an unparked idle core
    /// keeps waking into, watts.
    pub shallow_w: f64,
    /// One core in the deepest per-core state, where a parked core stays, watts. Equal to
    /// `shallow_w` on a CPU with no per-core state below C1.
    pub deep_w: f64,
    /// Share (0–1) of an unparked core's idle time spent in the shallow state while the host curve
    /// was measured under load; the rest was already in the deep state.
    pub shallow_share: f64,
}

impl CorePower {
    /// What parking one idle core saves under load (10 % and above), watts.
    pub fn saving_w(&self) -> f64 {
        self.shallow_share * (self.shallow_w - self.deep_w)
    }

    /// Checks the figures: finite, non-negative, a parked core never above an idle one, share in 0–1.
    pub fn validate(&self) -> Result<(), PowerModelError> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if !ok(self.shallow_w) || !ok(self.deep_w) {
            return Err(PowerModelError::BadFigures(format!("{self:?}")));
        }
        if self.deep_w > self.shallow_w {
            return Err(PowerModelError::ParkedAboveIdle {
                deep_w: self.deep_w,
                shallow_w: self.shallow_w,
            });
        }
        if !(self.shallow_share.is_finite() && (0.0..=1.0).contains(&self.shallow_share)) {
            return Err(PowerModelError::BadShare(self.shallow_share));
        }
        Ok(())
    }

    /// The figures of the CPU in `curve` (a linear curve gets Nehalem/Westmere's).
    pub fn for_curve(curve: &HostCurve) -> CoreFigures {
        match curve {
            HostCurve::SpecPower { name, .. } => CoreFigures::for_model(name),
            HostCurve::Linear { .. } => NEHALEM_WESTMERE,
        }
    }
}

impl Default for CorePower {
    /// Nehalem/Westmere, middle figure ([`NEHALEM_WESTMERE`]).
    fn default() -> Self {
        NEHALEM_WESTMERE.core
    }
}

/// Published per-core figures of a CPU family, and the range the saving is tested against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoreFigures {
    /// The CPU family.
    pub family: &'static str,
    /// The figures used by default (`shallow_w` is the middle of the range).
    pub core: CorePower,
    /// Lowest and highest published per-core shallow-state figure, watts (the sensitivity range).
    pub shallow_w_range: (f64, f64),
    /// Where the figures come from (details in `docs/parking.md`).
    pub source: &'static str,
}

impl CoreFigures {
    /// The figures with `shallow_w` at the low, middle and high end of the range.
    pub fn sensitivity(&self) -> [CorePower; 3] {
        let at = |w: f64| CorePower {
            shallow_w: w,
            deep_w: if self.core.deep_w == self.core.shallow_w {
                w
            } else {
                self.core.deep_w.min(w)
            },
            ..self.core
        };
        [
            at(self.shallow_w_range.0),
            self.core,
            at(self.shallow_w_range.1),
        ]
    }

    /// The family of a SPECpower model in [`SPECPOWER_CSV`] (unknown names get Nehalem/Westmere's).
    pub fn for_model(name: &str) -> CoreFigures {
        let cpu = specpower_rows()
            .find(|f| f[0].eq_ignore_ascii_case(name))
            .map(|f| f[1].to_ascii_lowercase())
            .unwrap_or_default();
        if cpu.contains("pentium d") {
            NETBURST
        } else if cpu.contains("xeon 30") {
            CORE2
        } else {
            NEHALEM_WESTMERE
        }
    }
}

/// Xeon X3470/X3480 (Lynnfield) and X5670/X5675 (Westmere-EP): each core can enter C6 alone, with
/// its voltage gated to zero (deep ≈ 0 W); an idle core under load spends ≈ 20 % of its idle time
/// in C1/C3 (AnandTech's C-state residency measurement on a Lynnfield Xeon L3426: 5.7 % C1 and
/// 10.3 % C3 of 81 % idle). The C1 figure per core is not published for these parts: 0.75 W (C6
/// saving per core measured at the wall on a Haswell Core i7-4770K) to 6.75 W (Core 2 Duo datasheet,
/// C1 13.5 W for two cores), 2.25 W (their geometric mean) by default.
pub const NEHALEM_WESTMERE: CoreFigures = CoreFigures {
    family: "Nehalem/Westmere (per-core C6)",
    core: CorePower {
        shallow_w: 2.25,
        deep_w: 0.0,
        shallow_share: 0.20,
    },
    shallow_w_range: (0.75, 6.75),
    source: "C6 power gate: PC Perspective, Inside the Nehalem (2008); residency: AnandTech 2919 p.9; \
             C1 range: Legit Reviews (i7-4770K C6/C7, ~3 W for 4 cores), Core 2 Duo datasheet (C1 13.5 W, 2 cores)",
};

/// Xeon 3040/3075 (Core 2 "Conroe"): no per-core state below C1 — the deeper states are package
/// states reached only when both cores idle — so a parked core draws what an idle one does.
pub const CORE2: CoreFigures = CoreFigures {
    family: "Core 2 (no per-core deep state)",
    core: CorePower {
        shallow_w: 6.75,
        deep_w: 6.75,
        shallow_share: 0.20,
    },
    shallow_w_range: (6.75, 6.75),
    source: "Core 2 Duo datasheet (C1 13.5 W, C4 1.2 W for the package of two cores; C4 only when both cores are in it); \
             per-core C6 arrived with Nehalem (Hardware Secrets, Nehalem architecture p.5)",
};

/// Pentium D 930 (NetBurst "Presler"): only the package-wide Enhanced HALT (C1E) below C0.
pub const NETBURST: CoreFigures = CoreFigures {
    family: "NetBurst (no per-core deep state)",
    core: CorePower {
        shallow_w: 0.0,
        deep_w: 0.0,
        shallow_share: 0.20,
    },
    shallow_w_range: (0.0, 0.0),
    source: "Tech Report Core 2 review p.16 (C1E is the halt state of the Intel parts of that generation)",
};

/// What the user asked for: a curve (`auto` picks by core count) and optional per-core overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PowerSpec {
    /// `auto`, `linear:IDLE_W:PEAK_W` or `specpower:MODEL`.
    pub curve: String,
    /// Overrides the CPU's shallow-state figure, watts per core.
    pub shallow_w: Option<f64>,
    /// Overrides the CPU's deep-state figure, watts per core.
    pub deep_w: Option<f64>,
    /// Overrides the CPU's shallow-state share of idle time (0–1).
    pub shallow_share: Option<f64>,
}

impl Default for PowerSpec {
    fn default() -> Self {
        PowerSpec {
            curve: "auto".into(),
            shallow_w: None,
            deep_w: None,
            shallow_share: None,
        }
    }
}

impl PowerSpec {
    /// The model for a host of `cores` CPUs, and one line saying which curve and figures are used.
    pub fn resolve(&self, cores: usize) -> Result<(ParkingPowerModel, String), PowerModelError> {
        let curve = HostCurve::parse_for(&self.curve, cores)?;
        let figures = CorePower::for_curve(&curve);
        let core = CorePower {
            shallow_w: self.shallow_w.unwrap_or(figures.core.shallow_w),
            deep_w: self.deep_w.unwrap_or(figures.core.deep_w),
            shallow_share: self.shallow_share.unwrap_or(figures.core.shallow_share),
        };
        let model = ParkingPowerModel::new(curve, cores, core)?;
        let how = if self.curve.trim().eq_ignore_ascii_case("auto") {
            format!(", picked for {cores} CPUs by core count (--power-model to choose)")
        } else {
            String::new()
        };
        let overridden = core != figures.core;
        let line = format!(
            "power model {}{how}; a parked core saves {:.2} W under load = {:.0} % of idle time × ({} W shallow − {} W deep), {}",
            model.curve.describe(),
            core.saving_w(),
            100.0 * core.shallow_share,
            core.shallow_w,
            core.deep_w,
            if overridden {
                "figures from the command line".to_string()
            } else {
                format!("{} figures", figures.family)
            }
        );
        Ok((model, line))
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
        core.validate()?;
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
        let u = served / self.cores as f64;
        let parked = (self.cores - unparked) as f64;
        // Never below the curve's own active idle, where every idle core already sat deep.
        (self.curve.power_w(u) - parked * self.saving_per_parked_core_w(u))
            .max(self.curve.power_w(0.0).min(self.curve.power_w(u)))
    }

    /// What one parked core saves at utilisation `u` of the host: the shallow share ramps from 0
    /// at active idle (the curve's idle cores already sat in their deepest state) to its full value
    /// at the first measured load level, 10 %.
    pub fn saving_per_parked_core_w(&self, u: f64) -> f64 {
        let ramp = if u.is_finite() {
            (u / 0.1).clamp(0.0, 1.0)
        } else {
            0.0
        };
        ramp * self.core.saving_w()
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
        assert_eq!(
            HostCurve::parse_for("auto", 4).unwrap(),
            HostCurve::specpower("IbmX3250XeonX3470").unwrap()
        );
    }

    /// Regression: every host got the 12-core X5670 curve, whatever its size.
    #[test]
    fn auto_picks_the_table_nearest_in_core_count() {
        let name = |n| match HostCurve::for_cores(n) {
            HostCurve::SpecPower { name, .. } => name,
            other => panic!("{other:?}"),
        };
        assert_eq!(name(1), "HpProLiantMl110G4Xeon3040");
        assert_eq!(name(2), "HpProLiantMl110G4Xeon3040");
        assert_eq!(name(3), "IbmX3250XeonX3470"); // 4/3 is nearer than 3/2
        assert_eq!(name(4), "IbmX3250XeonX3470");
        assert_eq!(name(6), "IbmX3250XeonX3470"); // 6/4 < 12/6
        assert_eq!(name(7), "IbmX3550XeonX5670"); // 12/7 < 7/4
        assert_eq!(name(12), "IbmX3550XeonX5670");
        assert_eq!(name(96), "IbmX3550XeonX5670");
    }

    #[test]
    fn parked_core_energy_by_hand() {
        let core = CorePower {
            shallow_w: 3.0,
            deep_w: 0.5,
            shallow_share: 0.2,
        };
        let m = ParkingPowerModel::new(
            HostCurve::Linear {
                idle_w: 100.0,
                peak_w: 200.0,
            },
            4,
            core,
        )
        .unwrap();
        // 1 core of demand on 4 cores (u = 25 %): 125 W with no parking; each parked idle core saves
        // 20 % × (3 − 0.5) = 0.5 W.
        assert_eq!(m.power_no_parking_w(1.0), 125.0);
        assert_eq!(m.power_w(1.0, 2), 124.0);
        // Demand 3 on 2 unparked cores: only 2 served (u = 50 %).
        assert_eq!(m.power_w(3.0, 2), 150.0 - 1.0);
        // At active idle the curve's idle cores were already in their deepest state: nothing to save.
        assert_eq!(m.power_w(0.0, 1), 100.0);
        // Halfway to the first load level (5 %): half the saving.
        assert!((m.power_w(0.2, 1) - (105.0 - 3.0 * 0.25)).abs() < 1e-9);
        let bad = |c: CorePower| ParkingPowerModel::new(m.curve.clone(), 4, c).unwrap_err();
        assert!(matches!(
            bad(CorePower {
                deep_w: 4.0,
                ..core
            }),
            PowerModelError::ParkedAboveIdle { .. }
        ));
        assert_eq!(
            bad(CorePower {
                shallow_share: 1.5,
                ..core
            })
            .to_string(),
            "The shallow-state share 1.5 is outside 0..=1"
        );
    }

    /// Regression: 2.5 W per parked core were subtracted from a curve that already held the idle
    /// cores' C-states, which put a parked host below its own measured active-idle power.
    #[test]
    fn the_saving_is_counted_once_and_follows_the_cpu() {
        for f in specpower_rows() {
            let curve = HostCurve::specpower(f[0]).unwrap();
            let figures = CorePower::for_curve(&curve);
            for core in figures.sensitivity() {
                for cores in [1usize, 2, 4, 12, 32] {
                    let m = ParkingPowerModel::new(curve.clone(), cores, core).unwrap();
                    for step in 0..=120 {
                        let d = f64::from(step) * cores as f64 / 120.0;
                        for k in 1..=cores {
                            assert!(
                                m.power_w(d, k) >= curve.power_w(0.0) - 1e-9,
                                "{} below its active idle at d={d} k={k}",
                                f[0]
                            );
                        }
                    }
                }
            }
        }
        // No per-core deep state: parking saves nothing.
        for name in [
            "HpProLiantMl110G4Xeon3040",
            "HpProLiantMl110G5Xeon3075",
            "HpProLiantMl110G3PentiumD930",
        ] {
            let curve = HostCurve::specpower(name).unwrap();
            let m = ParkingPowerModel::new(curve.clone(), 2, CorePower::for_curve(&curve).core)
                .unwrap();
            assert_eq!(m.power_w(0.5, 1), m.power_no_parking_w(0.5), "{name}");
        }
        let x5670 = CorePower::for_curve(&HostCurve::specpower("IbmX3550XeonX5670").unwrap());
        let [low, mid, high] = x5670.sensitivity().map(|c| c.saving_w());
        assert!(
            (low - 0.15).abs() < 1e-12 && (mid - 0.45).abs() < 1e-12 && (high - 1.35).abs() < 1e-12
        );
    }
}

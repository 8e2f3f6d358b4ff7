//! Energy valuation of a host layout, counting parked cores.
//!
//! A host's power is its SPECpower curve ([`tern_policy::PowerModel`]) at its utilisation, less what
//! its parked cores save. The saving is `tern-parking`'s C-state model (docs/parking.md): a parked
//! core saves `shallow_share × (shallow_w − deep_w)` under load, ramping in from 0 at idle to the
//! full figure at 10 % load, and the host never drops below its curve's own idle power (the curve
//! was measured with idle cores already in their deepest state at active idle). A CPU without a
//! per-core deep state (Core 2, as in the HP ML110 G4/G5) saves nothing by parking. The formula
//! itself lives in `tern_sim::preview::parked_host_power_w`, so the estimate and the plan preview
//! agree by construction; this crate does not link `tern-parking`, whose crate also holds the
//! actuator and daemon.
//!
//! A powered-off host draws nothing. So a packed host with parked cores is weighed against powering
//! a host off with the same model: see [`estimate_w`].

use tern_policy::{HP_ML110_G4, HP_ML110_G5, PowerModel};

/// IBM System x3250 M3 (Xeon X3470, 4 cores, 2933 MHz), SPECpower_ssj2008 2009q4/00213, as
/// CloudSim's `PowerModelSpecPowerIbmX3250XeonX3470`.
pub const IBM_X3250_X3470: PowerModel = PowerModel {
    name: "IbmX3250XeonX3470",
    watts: [
        41.6, 46.7, 52.3, 57.9, 65.4, 73.0, 80.7, 89.5, 99.6, 105.0, 113.0,
    ],
};

/// IBM System x3550 M3 (2 × Xeon X5670, 12 cores, 2933 MHz), SPECpower_ssj2008 2010q2/00239, as
/// CloudSim's `PowerModelSpecPowerIbmX3550XeonX5670`.
pub const IBM_X3550_X5670: PowerModel = PowerModel {
    name: "IbmX3550XeonX5670",
    watts: [
        66.0, 107.0, 120.0, 131.0, 143.0, 156.0, 173.0, 191.0, 211.0, 229.0, 247.0,
    ],
};

/// What one parked core of a Nehalem/Westmere CPU saves under load, watts: 20 % of idle time in
/// C1/C3 × (2.25 W in C1 − 0 W in C6), `tern-parking`'s default figures for that family.
pub const NEHALEM_PARKED_CORE_SAVING_W: f64 = 0.20 * 2.25;

/// A host's power: its curve and what one parked core saves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostPowerSpec {
    /// The SPECpower curve.
    pub model: PowerModel,
    /// Watts one parked core saves at 10 % load and above.
    pub parked_core_saving_w: f64,
}

/// The names [`HostPowerSpec::by_name`] knows, for error messages.
pub const KNOWN_MODELS: &str = "hp-ml110-g4, hp-ml110-g5, ibm-x3250-x3470, ibm-x3550-x5670 \
     (or HpProLiantMl110G4Xeon3040, HpProLiantMl110G5Xeon3075, IbmX3250XeonX3470, IbmX3550XeonX5670)";

impl HostPowerSpec {
    /// The model of a power-model name as agents register it (case-insensitive), if known.
    pub fn by_name(name: &str) -> Option<HostPowerSpec> {
        let n = name.to_ascii_lowercase();
        let core2 = |model| HostPowerSpec {
            model,
            parked_core_saving_w: 0.0,
        };
        let nehalem = |model| HostPowerSpec {
            model,
            parked_core_saving_w: NEHALEM_PARKED_CORE_SAVING_W,
        };
        match n.as_str() {
            "hp-ml110-g4" | "hpproliantml110g4xeon3040" => Some(core2(HP_ML110_G4)),
            "hp-ml110-g5" | "hpproliantml110g5xeon3075" => Some(core2(HP_ML110_G5)),
            "ibm-x3250-x3470" | "ibmx3250xeonx3470" => Some(nehalem(IBM_X3250_X3470)),
            "ibm-x3550-x5670" | "ibmx3550xeonx5670" => Some(nehalem(IBM_X3550_X5670)),
            _ => None,
        }
    }

    /// Capacity of one core in the policy's units: `tern_policy::power::core_mips` (the core clock
    /// in MHz of the server the curve was measured on, as CloudSim rates its hosts), the same figure
    /// the controller's placement uses.
    pub fn core_mips(&self) -> f64 {
        tern_policy::power::core_mips(self.model.name).unwrap_or(1000.0)
    }

    /// Power at utilisation `u` (0..1) with `parked` cores parked, watts.
    pub fn power_w(&self, u: f64, parked: u32) -> f64 {
        tern_sim::preview::parked_host_power_w(&self.model, u, parked, self.parked_core_saving_w)
    }
}

/// One host of a layout to value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayoutHost {
    /// Its power.
    pub power: HostPowerSpec,
    /// Powered on.
    pub on: bool,
    /// CPU utilisation (0..1).
    pub utilization: f64,
    /// Cores parked.
    pub parked_cores: u32,
}

/// The power of a layout, watts: each powered-on host at its utilisation less its parked cores'
/// saving; powered-off hosts draw nothing.
pub fn estimate_w(layout: &[LayoutHost]) -> f64 {
    layout
        .iter()
        .filter(|h| h.on)
        .map(|h| h.power.power_w(h.utilization, h.parked_cores))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x3470(on: bool, u: f64, parked: u32) -> LayoutHost {
        LayoutHost {
            power: HostPowerSpec::by_name("ibm-x3250-x3470").unwrap(),
            on,
            utilization: u,
            parked_cores: parked,
        }
    }

    #[test]
    fn names_resolve_case_insensitively_and_unknown_ones_do_not() {
        assert_eq!(
            HostPowerSpec::by_name("HpProLiantMl110G5Xeon3075")
                .unwrap()
                .model,
            HP_ML110_G5
        );
        assert_eq!(
            HostPowerSpec::by_name("hp-ml110-g4")
                .unwrap()
                .parked_core_saving_w,
            0.0
        );
        assert!(HostPowerSpec::by_name("dell-r740").is_none());
    }

    #[test]
    fn a_packed_host_with_parked_cores_against_two_half_loaded_hosts() {
        // The same 2 cores of work on two 4-core X3470 hosts, three layouts:
        //  spread: both on at 25 %, one core busy and three parked on each
        //  packed: one host at 50 %, two cores parked, the other powered off
        //  packed but idle host left on: as packed, the empty host on and unparked
        let spread = [x3470(true, 0.25, 3), x3470(true, 0.25, 3)];
        let packed = [x3470(true, 0.5, 2), x3470(false, 0.0, 0)];
        let packed_idle_on = [x3470(true, 0.5, 2), x3470(true, 0.0, 0)];
        let s = NEHALEM_PARKED_CORE_SAVING_W;
        // by hand from the SPECpower table: P(25 %) = 55.1 W, P(50 %) = 73 W, P(0) = 41.6 W
        let want_spread = 2.0 * (55.1 - 3.0 * s);
        let want_packed = 73.0 - 2.0 * s;
        let want_idle_on = want_packed + 41.6;
        assert!((estimate_w(&spread) - want_spread).abs() < 1e-9);
        assert!((estimate_w(&packed) - want_packed).abs() < 1e-9);
        assert!((estimate_w(&packed_idle_on) - want_idle_on).abs() < 1e-9);
        // the model's ranking: packed and powered off < spread with parked cores < packed with the
        // empty host left on (parking the spread hosts' idle cores does not pay for a second host's
        // idle power, but a powered-on empty host costs more than spreading)
        assert!(estimate_w(&packed) < estimate_w(&spread));
        assert!(estimate_w(&spread) < estimate_w(&packed_idle_on));
        // and parking is what makes the spread layout cheaper than it would be unparked
        let spread_unparked = [x3470(true, 0.25, 0), x3470(true, 0.25, 0)];
        assert!(
            (estimate_w(&spread_unparked) - estimate_w(&spread) - 6.0 * s).abs() < 1e-9,
            "six parked cores save 6 × {s} W"
        );
    }

    #[test]
    fn core2_hosts_save_nothing_by_parking() {
        let g5 = HostPowerSpec::by_name("hp-ml110-g5").unwrap();
        assert_eq!(g5.power_w(0.3, 1), HP_ML110_G5.watts_at(0.3));
    }
}

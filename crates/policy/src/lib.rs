//! Consolidation policy: overload detection, VM selection, placement and host power states; pure and
//! deterministic.
//!
//! This crate is the decision core shared by the data-centre simulator (`tern-sim`) and, later, the
//! live consolidation controller. It never reads a clock, a file or a socket: callers hand it a typed
//! snapshot of the cluster ([`ClusterView`]) and get typed [`Decisions`] back (migrations, and hosts
//! emptied so they can sleep). Randomness (the RS selector) comes from a caller-seeded [`SplitMix64`].
//!
//! The algorithms are those of Beloglazov & Buyya (CCPE 2012):
//! - overload detection ([`Detector`]): THR, IQR, MAD, LR, LRR, with THR 0.7 while history is short;
//! - VM selection ([`Selection`]): MMT, RS, MC, MU;
//! - placement: power-aware best-fit decreasing (PABFD);
//! - the underload loop that drains the least-used host when all its VMs fit elsewhere.
//!
//! A live caller adds its must-rules (VM–host pins, anti-affinity groups, hosts that take no VMs)
//! through [`Rules`] ([`RuleSet`] holds the usual ones) and [`optimize_with`]; [`optimize`] is the
//! rule-free round the simulator runs, unchanged by them.
//!
//! ```
//! use tern_policy::{PolicySpec, Policy};
//! let spec: PolicySpec = "lr-mmt-1.2".parse().unwrap();
//! assert!(matches!(spec, PolicySpec::Dynamic(Policy { .. })));
//! assert_eq!(spec.to_string(), "lr-mmt-1.2");
//! ```

#![deny(clippy::disallowed_methods)]
#![forbid(unsafe_code)]
// Numeric kernels index several parallel arrays at once; index loops read better there.
#![allow(clippy::needless_range_loop)]

pub mod cluster;
pub mod detect;
pub mod hash_order;
mod place_index;
pub mod power;
pub mod select;

pub use cluster::{
    ClusterView, Decisions, HostView, Migration, NoRules, PolicyConfig, RuleSet, Rules, VmView,
    optimize, optimize_with,
};
pub use detect::{Detector, HostSample};
pub use power::{HP_ML110_G4, HP_ML110_G5, PowerModel};
pub use select::Selection;

use std::fmt;
use std::str::FromStr;

/// Which semantics to follow where CloudSim 3.0.3 and the paper's text differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Model {
    /// Reproduce CloudSim 3.0.3's behaviour (the reference figures).
    #[default]
    CloudSim,
    /// Follow the paper's text.
    Paper,
}

impl FromStr for Model {
    type Err = ParsePolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cloudsim" => Ok(Model::CloudSim),
            "paper" => Ok(Model::Paper),
            _ => Err(ParsePolicyError::Model(s.to_string())),
        }
    }
}

/// A dynamic consolidation policy: detector × selection with its parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Overload detector (carries the parameter).
    pub detector: Detector,
    /// VM selection.
    pub selection: Selection,
}

/// Any policy the simulator can run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PolicySpec {
    /// Non power-aware: every host at full power all day.
    Npa,
    /// DVFS only: power follows load, no migrations.
    Dvfs,
    /// Dynamic consolidation.
    Dynamic(Policy),
}

/// Error parsing a policy or model name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParsePolicyError {
    /// The name is not detector-selection-parameter.
    #[error(
        "Unknown policy `{0}`: expected npa, dvfs or DETECTOR-SELECTION-PARAM with DETECTOR in thr|iqr|mad|lr|lrr and SELECTION in mmt|rs|mc|mu (e.g. lr-mmt-1.2)"
    )]
    Syntax(String),
    /// The parameter is out of range.
    #[error("Policy `{0}`: parameter must be a non-negative number")]
    Parameter(String),
    /// Unknown model.
    #[error("Unknown model `{0}`: expected cloudsim or paper")]
    Model(String),
}

impl FromStr for PolicySpec {
    type Err = ParsePolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        match lower.as_str() {
            "npa" => return Ok(PolicySpec::Npa),
            "dvfs" => return Ok(PolicySpec::Dvfs),
            _ => {}
        }
        let mut it = lower.splitn(3, '-');
        let (Some(d), Some(sel), Some(p)) = (it.next(), it.next(), it.next()) else {
            return Err(ParsePolicyError::Syntax(s.to_string()));
        };
        let p: f64 = p
            .parse()
            .map_err(|_| ParsePolicyError::Parameter(s.to_string()))?;
        if !p.is_finite() || p < 0.0 {
            return Err(ParsePolicyError::Parameter(s.to_string()));
        }
        let detector = match d {
            "thr" => Detector::Thr(p),
            "iqr" => Detector::Iqr(p),
            "mad" => Detector::Mad(p),
            "lr" => Detector::Lr(p),
            "lrr" => Detector::Lrr(p),
            _ => return Err(ParsePolicyError::Syntax(s.to_string())),
        };
        let selection = match sel {
            "mmt" => Selection::Mmt,
            "rs" => Selection::Rs,
            "mc" => Selection::Mc,
            "mu" => Selection::Mu,
            _ => return Err(ParsePolicyError::Syntax(s.to_string())),
        };
        Ok(PolicySpec::Dynamic(Policy {
            detector,
            selection,
        }))
    }
}

impl fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicySpec::Npa => write!(f, "npa"),
            PolicySpec::Dvfs => write!(f, "dvfs"),
            PolicySpec::Dynamic(p) => {
                let v = p.detector.parameter();
                write!(f, "{}-{}-", p.detector.name(), p.selection.name())?;
                if v.fract() == 0.0 {
                    write!(f, "{v:.1}")
                } else {
                    write!(f, "{v}")
                }
            }
        }
    }
}

/// The seven policies of the paper's Table V (and of the CloudSim reference runs).
pub const REFERENCE_POLICIES: [&str; 8] = [
    "npa",
    "dvfs",
    "thr-mmt-1.0",
    "thr-mmt-0.8",
    "iqr-mmt-1.5",
    "mad-mmt-2.5",
    "lrr-mmt-1.2",
    "lr-mmt-1.2",
];

/// A small, fast, seedable PRNG (SplitMix64) so that every run replays exactly from its seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator with the given seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_round_trip_and_bad_names_are_rejected() {
        for name in REFERENCE_POLICIES
            .iter()
            .chain(&["mad-rs-2", "iqr-mc-0.5", "thr-mu-0.9"])
        {
            let p: PolicySpec = name.parse().unwrap();
            let again: PolicySpec = p.to_string().parse().unwrap();
            assert_eq!(p, again, "{name}");
        }
        assert_eq!(
            "mad-rs-2.0".parse::<PolicySpec>().unwrap().to_string(),
            "mad-rs-2.0"
        );
        for bad in [
            "",
            "lr",
            "lr-mmt",
            "xx-mmt-1",
            "lr-xx-1",
            "lr-mmt-abc",
            "lr-mmt--1",
            "lr-mmt-inf",
        ] {
            let e = bad.parse::<PolicySpec>().unwrap_err();
            assert!(!e.to_string().is_empty());
        }
    }
}

//! The pure arithmetic of the agent's telemetry: utilisation under a declared CPU share, which
//! VMs have their dirty-page rate sampled at which interval, the parking mode, and the parked
//! cores reported. No clock, file or thread: the shell (`shell::telemetry`) measures and feeds.
//!
//! # Utilisation under `--cpu-share F`
//! A host declares `C` cores (`--cores`); each stands for `F` of one real CPU (`--cpu-share`,
//! `0 < F ≤ 1`, default 1). Over an interval of `T` seconds:
//!
//! - a VM with `V` vCPUs whose vCPU threads used `t` CPU-seconds is `t / (T × V × F)` busy;
//! - with `F = 1` the host is the whole machine's busy share from `/proc/stat`; with `F < 1` it
//!   is its VMM processes' CPU time `t` (every thread of each `tern vm` child) over
//!   `T × C × F`, because on a machine shared by several declared hosts the machine's load is
//!   not this host's.
//!
//! Both are clamped to `[0, 1]`. So four test hosts declaring 2 cores each at `F = 0.25` on a
//! 2-core machine see a VM whose one vCPU burns a quarter of a real CPU as fully busy.

#![deny(clippy::disallowed_methods)]

use std::fmt;
use std::str::FromStr;

/// The fraction of one real CPU each declared core stands for (`0 < F ≤ 1`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuShare(f64);

/// A `--cpu-share` outside `(0, 1]`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "--cpu-share {0} is out of range (above 0 and at most 1: the fraction of one real CPU each \
     declared core stands for)"
)]
pub struct BadCpuShare(pub f64);

impl CpuShare {
    /// Each declared core is a whole real CPU.
    pub const WHOLE: CpuShare = CpuShare(1.0);

    /// Checks `f` is in `(0, 1]`.
    pub fn new(f: f64) -> Result<CpuShare, BadCpuShare> {
        if f.is_finite() && f > 0.0 && f <= 1.0 {
            Ok(CpuShare(f))
        } else {
            Err(BadCpuShare(f))
        }
    }

    /// The fraction.
    pub fn get(self) -> f64 {
        self.0
    }

    /// Whether each declared core is a whole real CPU (host utilisation then comes from
    /// `/proc/stat`).
    pub fn is_whole(self) -> bool {
        self.0 >= 1.0
    }
}

impl Default for CpuShare {
    fn default() -> Self {
        CpuShare::WHOLE
    }
}

/// Utilisation (`0..=1`) of `cpus` declared CPUs, each worth `share` of a real one, that used
/// `cpu_s` CPU-seconds in `elapsed_s` seconds; `None` for an empty interval or no CPUs.
pub fn utilization(cpu_s: f64, elapsed_s: f64, cpus: u32, share: CpuShare) -> Option<f64> {
    if elapsed_s.is_nan() || elapsed_s <= 0.0 || cpus == 0 || cpu_s.is_nan() {
        return None;
    }
    let capacity = elapsed_s * f64::from(cpus) * share.get();
    Some((cpu_s / capacity).clamp(0.0, 1.0))
}

/// How often one VM's dirty-page rate is sampled, in telemetry intervals: a sample every
/// `period_ms` at least, never more than once an interval.
pub fn dirty_every(period_ms: u64, report_interval_ms: u64) -> u64 {
    period_ms.div_ceil(report_interval_ms.max(1)).max(1)
}

/// Whether the VM at `index` in the name-sorted list of sampleable VMs is due at telemetry
/// interval `interval`, when each VM is sampled every `every` intervals: the VMs are staggered so
/// that about `1/every` of them are sampled each interval.
pub fn dirty_due(interval: u64, index: usize, every: u64) -> bool {
    let every = every.max(1);
    index as u64 % every == interval % every
}

/// `tern agent --parking`: whether the core-parking policy runs on this host and whether its
/// decisions are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ParkingMode {
    /// Not run; reports carry no parked cores.
    Off,
    /// Run on the host's VMs' vCPU telemetry and reported; no affinity is changed. The default:
    /// safe where several agents share real CPUs (a one-machine test cluster).
    #[default]
    Report,
    /// Run, reported and applied: this agent's VMs' vCPU threads are confined to the unparked
    /// CPUs (only its own VMs: those in its runtime directory).
    On,
}

/// A `--parking` value other than off, report or on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("--parking {0:?} is not a parking mode (off, report or on)")]
pub struct BadParkingMode(pub String);

impl FromStr for ParkingMode {
    type Err = BadParkingMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(ParkingMode::Off),
            "report" => Ok(ParkingMode::Report),
            "on" => Ok(ParkingMode::On),
            other => Err(BadParkingMode(other.to_string())),
        }
    }
}

impl fmt::Display for ParkingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParkingMode::Off => "off",
            ParkingMode::Report => "report",
            ParkingMode::On => "on",
        })
    }
}

/// The parked cores a host reports: the CPUs the policy parked, at most the cores it declares
/// (several declared hosts may share one machine's CPUs).
pub fn parked_cores(parked_cpus: usize, declared_cores: u32) -> u32 {
    u32::try_from(parked_cpus)
        .unwrap_or(u32::MAX)
        .min(declared_cores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_share_outside_zero_to_one_is_refused_naming_the_range() {
        assert_eq!(CpuShare::new(0.25).unwrap().get(), 0.25);
        assert!(CpuShare::new(1.0).unwrap().is_whole());
        assert!(!CpuShare::new(0.5).unwrap().is_whole());
        for bad in [0.0, -0.5, 1.01, f64::NAN, f64::INFINITY] {
            let err = CpuShare::new(bad).unwrap_err().to_string();
            assert!(err.contains("above 0 and at most 1"), "{err}");
        }
        assert!(
            CpuShare::new(2.0)
                .unwrap_err()
                .to_string()
                .contains("--cpu-share 2")
        );
    }

    #[test]
    fn vm_utilisation_is_cpu_time_over_vcpus_times_the_share() {
        let whole = CpuShare::WHOLE;
        let quarter = CpuShare::new(0.25).unwrap();
        // 0.5 CPU-seconds in 1 s on one vCPU: half busy on a whole core ...
        assert_eq!(utilization(0.5, 1.0, 1, whole), Some(0.5));
        // ... twice over capacity at a quarter, clamped.
        assert_eq!(utilization(0.5, 1.0, 1, quarter), Some(1.0));
        // A tenth of a real CPU at a quarter is 40 % busy.
        assert!((utilization(0.1, 1.0, 1, quarter).unwrap() - 0.4).abs() < 1e-12);
        // Two vCPUs over 2 s: capacity 2 × 2 × 0.25 = 1 CPU-second.
        assert!((utilization(0.3, 2.0, 2, quarter).unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(utilization(0.1, 0.0, 1, whole), None);
        assert_eq!(utilization(0.1, 1.0, 0, whole), None);
    }

    #[test]
    fn host_utilisation_under_a_share_is_vmm_time_over_declared_cores() {
        // Four hosts of 2 declared cores at 0.25 on a 2-core machine: each is worth half a CPU;
        // its VMMs burning 0.25 CPU-seconds a second make it half busy.
        let quarter = CpuShare::new(0.25).unwrap();
        assert!((utilization(0.25, 1.0, 2, quarter).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(utilization(3.0, 1.0, 2, quarter), Some(1.0));
    }

    #[test]
    fn dirty_samples_come_every_period_and_are_staggered_across_vms() {
        assert_eq!(dirty_every(5_000, 1_000), 5);
        assert_eq!(dirty_every(5_000, 2_000), 3);
        assert_eq!(dirty_every(100, 1_000), 1, "at most once an interval");
        assert_eq!(
            dirty_every(5_000, 0),
            5_000,
            "a zero interval does not divide by zero"
        );
        // Ten VMs, every 5 intervals: each interval samples two, each VM once in 5 intervals.
        for interval in 0..20u64 {
            let due: Vec<usize> = (0..10).filter(|&i| dirty_due(interval, i, 5)).collect();
            assert_eq!(due.len(), 2, "interval {interval}: {due:?}");
        }
        for i in 0..10 {
            let hits: Vec<u64> = (0..20).filter(|&n| dirty_due(n, i, 5)).collect();
            assert_eq!(hits.len(), 4, "VM {i}: {hits:?}");
            assert!(
                hits.windows(2).all(|w| w[1] - w[0] == 5),
                "VM {i}: {hits:?}"
            );
        }
        assert!((0..3).all(|n| dirty_due(n, 7, 1)), "every = 1: always due");
        assert!(dirty_due(4, 4, 0), "every = 0 is taken as 1");
    }

    #[test]
    fn parking_modes_parse_and_print_and_a_bad_one_names_the_choices() {
        for m in [ParkingMode::Off, ParkingMode::Report, ParkingMode::On] {
            assert_eq!(m.to_string().parse::<ParkingMode>().unwrap(), m);
        }
        assert_eq!(ParkingMode::default(), ParkingMode::Report);
        let err = "yes".parse::<ParkingMode>().unwrap_err().to_string();
        assert!(
            err.contains("\"yes\"") && err.contains("off, report or on"),
            "{err}"
        );
    }

    #[test]
    fn parked_cores_are_at_most_the_declared_cores() {
        assert_eq!(parked_cores(1, 2), 1);
        assert_eq!(parked_cores(6, 2), 2);
        assert_eq!(parked_cores(0, 4), 0);
    }
}

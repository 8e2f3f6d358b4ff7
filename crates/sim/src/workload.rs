//! The simulated data centre: host and VM types of the benchmark, and the workload (one trace per VM).

use tern_policy::{HP_ML110_G4, HP_ML110_G5, Model, PowerModel};

/// Samples per trace (24 h of 5-minute intervals).
pub const SAMPLES: usize = 288;
/// Seconds per sample.
pub const INTERVAL_S: f64 = 300.0;
/// Hosts in the benchmark data centre.
pub const BENCHMARK_HOSTS: usize = 800;
/// Host network bandwidth (Mbit/s); half of it carries one migration.
pub const HOST_BW_MBIT: f64 = 1000.0;

/// A physical host type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostSpec {
    /// Cores.
    pub pes: u32,
    /// MIPS per core.
    pub pe_mips: f64,
    /// RAM (MB), enforced at initial placement in the CloudSim model only.
    pub ram_mb: u32,
    /// Power model.
    pub power: PowerModel,
}

/// A VM type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VmSpec {
    /// MIPS of its single virtual core.
    pub mips: f64,
    /// RAM (MB).
    pub ram_mb: u32,
}

/// The two host types, alternating by host index.
pub const HOST_TYPES: [HostSpec; 2] = [
    HostSpec {
        pes: 2,
        pe_mips: 1860.0,
        ram_mb: 4096,
        power: HP_ML110_G4,
    },
    HostSpec {
        pes: 2,
        pe_mips: 2660.0,
        ram_mb: 4096,
        power: HP_ML110_G5,
    },
];

/// The four VM types (High-CPU Medium, Extra Large, Small, Micro) with the reference code's RAM.
pub const VM_TYPES_CLOUDSIM: [VmSpec; 4] = [
    VmSpec {
        mips: 2500.0,
        ram_mb: 870,
    },
    VmSpec {
        mips: 2000.0,
        ram_mb: 1740,
    },
    VmSpec {
        mips: 1000.0,
        ram_mb: 1740,
    },
    VmSpec {
        mips: 500.0,
        ram_mb: 613,
    },
];

/// The four VM types with the paper's RAM (Extra Large = 3.75 GB).
pub const VM_TYPES_PAPER: [VmSpec; 4] = [
    VmSpec {
        mips: 2500.0,
        ram_mb: 870,
    },
    VmSpec {
        mips: 2000.0,
        ram_mb: 3840,
    },
    VmSpec {
        mips: 1000.0,
        ram_mb: 1740,
    },
    VmSpec {
        mips: 500.0,
        ram_mb: 613,
    },
];

/// Seconds to migrate `ram_mb` over half of a 1 Gbit/s link (62.5 MB/s).
pub fn migration_time_s(ram_mb: u32) -> f64 {
    ram_mb as f64 / (HOST_BW_MBIT * 1000.0 / (2.0 * 8000.0))
}

/// Bandwidth one migration gets (MB/s).
pub fn migration_mb_per_s() -> f64 {
    HOST_BW_MBIT * 1000.0 / (2.0 * 8000.0)
}

/// Hosts, VMs and the CPU trace of each VM.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Label (the day, or `synthetic-…`).
    pub name: String,
    /// Hosts.
    pub hosts: Vec<HostSpec>,
    /// VMs.
    pub vms: Vec<VmSpec>,
    /// Per VM: 288 utilisation samples in percent (0..=100).
    pub traces: Vec<[u8; SAMPLES]>,
}

impl Workload {
    /// The benchmark data centre (`n_hosts` alternating G4/G5) running one VM per trace. VM types are
    /// assigned in four contiguous blocks of the trace order, as the reference code does.
    pub fn benchmark(name: &str, n_hosts: usize, traces: Vec<[u8; SAMPLES]>, model: Model) -> Self {
        let types = match model {
            Model::CloudSim => VM_TYPES_CLOUDSIM,
            Model::Paper => VM_TYPES_PAPER,
        };
        let n = traces.len();
        let block = n.div_ceil(4).max(1);
        let vms = (0..n).map(|i| types[(i / block).min(3)]).collect();
        let hosts = (0..n_hosts).map(|i| HOST_TYPES[i % 2]).collect();
        Workload {
            name: name.to_string(),
            hosts,
            vms,
            traces,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_time_model() {
        let out: Vec<String> = [613, 870, 1740]
            .iter()
            .map(|&r| format!("{:.2}", migration_time_s(r)))
            .collect();
        assert_eq!(out, ["9.81", "13.92", "27.84"]);
        assert_eq!(migration_time_s(613), 9.808);
        assert_eq!(migration_mb_per_s(), 62.5);
    }

    #[test]
    fn vm_types_come_in_four_contiguous_blocks() {
        let w = Workload::benchmark("t", 4, vec![[0; SAMPLES]; 10], Model::CloudSim);
        let mips: Vec<f64> = w.vms.iter().map(|v| v.mips).collect();
        // ceil(10/4) = 3 per block
        assert_eq!(
            mips,
            [
                2500.0, 2500.0, 2500.0, 2000.0, 2000.0, 2000.0, 1000.0, 1000.0, 1000.0, 500.0
            ]
        );
        assert_eq!(w.hosts[0].pe_mips, 1860.0);
        assert_eq!(w.hosts[1].pe_mips, 2660.0);
    }
}

//! The data-centre simulator: drives tern-policy over utilisation traces and reports energy, SLA and
//! migrations.
//!
//! A [`Workload`] (hosts, VMs, one CPU trace per VM) is stepped through one day in 5-minute control
//! periods by [`simulate`]; each period the policy from `tern-policy` decides migrations, which take
//! RAM / (half the host bandwidth) and cost the VM 10 % of its CPU meanwhile. [`sweep`] runs days ×
//! policies on all cores and summarises them like the paper's Table V.
//!
//! ```
//! use tern_sim::{SimConfig, Workload, simulate, synth};
//! use tern_policy::Model;
//! let w = synth::workload(20, 30, 1, Model::CloudSim);
//! let r = simulate(&w, &SimConfig { policy: "thr-mmt-0.8".parse().unwrap(), model: Model::CloudSim, seed: 1, timeline: false });
//! assert!(r.energy_kwh > 0.0);
//! ```

#![forbid(unsafe_code)]
#![allow(clippy::needless_range_loop)]

pub mod bundled;
pub mod engine;
pub mod plot;
pub mod preview;
pub mod report;
pub mod sweep;
pub mod synth;
pub mod trace;
pub mod workload;

pub use engine::{SimConfig, simulate};
pub use report::{Report, Timeline};
pub use trace::{DayTraces, TraceError, TraceOrder, TraceSet};
pub use workload::Workload;

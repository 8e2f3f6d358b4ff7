//! Core parking: pack a host's vCPU threads onto the fewest cores so the idle ones can sleep.
//!
//! The crate has a pure core and thin I/O shells around it:
//!
//! * [`knobs`] — the Windows core-parking knob set, validation, power-plan files;
//! * [`topology`] — CPUs, NUMA nodes, packages, SMT siblings, and the unpark order;
//! * [`policy`] — the pure, deterministic policy: samples in, unparked CPU set out;
//! * [`power`] — host power curves (linear, SPECpower) and the parked-core energy model;
//! * [`replay`] — a host driven by a demand trace under a strategy (used by `tern park replay`, the
//!   benchmark and the simulator);
//! * [`telemetry`] — `/proc` and `/sys` readers (CPU busy time, thread run/wait time, C-state residency);
//! * [`runtime`] — the VMM runtime directory (`/run/tern/vms/NAME.json`);
//! * [`actuator`] — applies a CPU set to vCPU threads (affinity, optional cpuset, IRQs, halt-polling)
//!   and restores everything it changed;
//! * [`daemon`] — the loop tying them together, and its unix-socket control protocol.
//!
//! ```
//! use tern_parking::{knobs::Knobs, policy::{Policy, Sample}, topology::Topology};
//!
//! let knobs = Knobs { min_cores_pct: 0, increase_time: 1, decrease_time: 2, ..Knobs::default() };
//! let mut policy = Policy::new(knobs, Topology::flat(4));
//! assert_eq!(policy.unparked(), &[0, 1, 2, 3]); // starts fully unparked
//! let light = Sample { cpu_busy: vec![0.05; 4], runq_wait: 0.0 };
//! for _ in 0..20 {
//!     policy.step(&light);
//! }
//! assert_eq!(policy.unparked(), &[0]); // parked down to one core, one step at a time
//! ```

#![forbid(unsafe_code)]

pub mod actuator;
pub mod daemon;
pub mod knobs;
pub mod policy;
pub mod power;
pub mod replay;
pub mod runtime;
pub mod telemetry;
pub mod topology;

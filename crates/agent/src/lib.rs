//! The host agent's decision core.
//!
//! [`core::Agent`] is a state machine fed [`core::Input`]s (commands from the controller, lease
//! renewals, VMM exits, ticks) with the current time; the shell carries out its
//! [`core::Action`]s (spawn or kill a VMM, start a migration, answer a command). It refuses
//! commands from a controller generation lower than one it has seen, restarts crashed VMMs within
//! a budget, and kills every VMM before its host's etcd lease can expire when it cannot renew it.
//! It never links KVM, and never reads a clock itself.
//!
//! [`shell`] is the I/O around it that `tern agent` runs: the etcd lease and host record, the
//! command API, the supervised VMM children (`tern vm run|receive|migrate|resume`) and telemetry.
//! The shell never links KVM either: it runs VMMs as child processes.
//!
//! [`telemetry`] is the pure arithmetic of the reports: utilisation under `--cpu-share`, the
//! staggered dirty-rate sampling schedule, the parking mode and the parked cores reported.

#![forbid(unsafe_code)]

pub mod core;
pub mod shell;
pub mod telemetry;

//! The cluster controller's decision core.
//!
//! [`core::Controller`] is a state machine: the shell feeds it [`core::Input`]s (etcd changes,
//! agent reports, command replies, ticks) and API calls, each with the current time, and carries
//! out the [`core::Action`]s it emits (commands to agents, disk-lease fencing, desired-state writes
//! to etcd). It never reads a clock, opens a socket or starts a thread, so every decision is a
//! function of its inputs: the deterministic simulation test (`tests/simulation.rs`) drives it with
//! simulated agents, etcd, network and clock, and checks the invariants after every step.
//!
//! [`place`] chooses hosts: PABFD over `tern-policy`'s power models, never breaking a pin or an
//! anti-affinity group, with admission control for host failures.
//!
//! [`shell`] is the thin I/O layer around the core: the etcd election and desired state, the
//! REST API (axum, OpenAPI from `tern-api`'s types), commands to the agents over HTTP, and disk
//! lease fencing through the volume coordinator. It links no KVM; it decides nothing itself.

#![forbid(unsafe_code)]

pub mod core;
pub mod place;
pub mod shell;

//! The pure core of Tern's automation loop: telemetry in, plans and actions out.
//!
//! Every interval the loop turns the agents' telemetry into a `tern_policy::ClusterView` (per-VM
//! utilisation history, host cores and power models) and runs `tern_policy::optimize` — the code
//! `tern sim` runs — with the configured detector, selection and parameter (LR-MMT-1.2 by
//! default). What the policy decides becomes a [`Plan`](tern_api::automation::Plan): migrations
//! and host power actions, each with its reason, the cluster version it was computed on, and the
//! predicted effect from a `tern-sim` preview. The operator's [`Policy`](tern_api::automation::Policy)
//! sets how far the loop acts alone (manual, partial, full), how eager it is (aggressiveness 1–5,
//! [`knobs`]), the hysteresis, the per-VM cooldown with back-off, and host power management.
//!
//! Nothing here reads a clock, opens a socket or a file, or starts a thread: the shell (the
//! controller) passes the time into every call and carries out the [`Action`]s it gets back, then
//! reports each [`Outcome`]. The same inputs always give the same plans.
//!
//! ```
//! use tern_api::automation::{AutomationLevel, Policy, PlanState};
//! use tern_automation::{Action, Loop, LoopConfig, Outcome};
//! use tern_automation::telemetry::{HostSample, Telemetry, VmSample};
//!
//! let host = |name: &str| HostSample {
//!     name: name.into(), cores: 2, power_model: "hp-ml110-g5".into(), up: true,
//!     maintenance: false, cpu_utilization: None, parked_cores: None,
//!     migration_link_bytes_per_sec: None,
//! };
//! let vm = |name: &str, host: &str, u: f64| VmSample {
//!     name: name.into(), host: Some(host.into()), vcpus: 1, memory_mib: 512, resident_mib: None,
//!     cpu_utilization: Some(u), dirty_pages_per_sec: None, volume_disks: 0, pinned: false,
//!     anti_affinity: None, migrating: false,
//! };
//! // h1 carries three busy VMs (2.7 of its 2 cores), h2 one light VM
//! let telemetry = Telemetry {
//!     hosts: vec![host("h1"), host("h2")],
//!     vms: vec![vm("a", "h1", 0.9), vm("b", "h1", 0.9), vm("c", "h1", 0.9), vm("d", "h2", 0.1)],
//! };
//! let policy = Policy { hold_s: 0, ..Policy::default() }; // manual, LR-MMT-1.2
//! let mut lp = Loop::new(policy, LoopConfig::default()).unwrap();
//! lp.observe(0, &telemetry).unwrap();
//! assert!(lp.tick(0).is_empty()); // manual: a proposal, no action
//! let plan = lp.plans()[0].clone();
//! assert_eq!(plan.state, PlanState::Proposed);
//! assert!(plan.reason.contains("overloaded host h1"), "{}", plan.reason);
//!
//! // the operator applies it: the shell gets the migration to run
//! let actions = lp.apply(1_000, plan.id).unwrap();
//! let Action::Migrate { vm, to, .. } = &actions[0] else { panic!("{actions:?}") };
//! assert_eq!(to, "h2");
//! lp.report(5_000, Outcome::Migrated { plan: plan.id, vm: vm.clone(), actual: None }).unwrap();
//! assert_eq!(lp.plan(plan.id).unwrap().state, PlanState::Applied);
//! ```
//!
//! Modules: [`telemetry`] (the inputs), [`control`] (the loop: [`Loop`]), [`rules`] (pins,
//! anti-affinity, hosts that take no VMs; where the policy is called), [`knobs`] (aggressiveness),
//! [`energy`] (host power with parked cores), [`cost`] (a move's predicted cost), [`fallback`]
//! (a move pre-copy would not finish planned with post-copy, when the policy allows), [`power`] (a
//! host's power state), [`replay`] (the loop driven over traces on a modelled cluster: the live
//! loop simulated). The REST types are in `tern_api::automation`; docs/automation.md is the
//! user's page.

#![deny(clippy::disallowed_methods)]
#![forbid(unsafe_code)]

pub mod control;
pub mod cost;
pub mod energy;
pub mod fallback;
pub mod knobs;
pub mod power;
pub mod replay;
pub mod rules;
pub mod telemetry;

pub use control::{
    Action, ClearError, Loop, LoopConfig, Outcome, OutcomeError, PlanError, RoundReport,
};
pub use telemetry::{HostSample, Telemetry, TelemetryError, VmSample};

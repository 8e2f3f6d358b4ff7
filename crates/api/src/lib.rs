//! The typed messages every Tern client needs, with `Serialize`/`Deserialize` and OpenAPI schemas,
//! and no KVM: the cluster REST API ([`cluster`]), the automation loop's policy, plans and host
//! power states ([`automation`]), the agent protocol ([`agent`]), who may call the API ([`auth`]) and the VMM control protocol with
//! its migration progress and report and the runtime entry ([`vmm`]).
//!
//! Nothing here does I/O; the controller, the agents and the `tern cluster` client all decode into
//! these types, so a missing or mistyped field is an error at the edge, never a silent default.
//!
//! ```
//! use tern_api::cluster::VmCreate;
//! let req: VmCreate = serde_json::from_str(
//!     r#"{"name":"web-1","vcpus":1,"memory_mib":64,"kernel":"builtin:testguest"}"#,
//! ).unwrap();
//! assert!(req.validate().is_ok());
//! assert_eq!(req.restart_priority, 50);
//! ```

#![deny(clippy::disallowed_methods)]
#![forbid(unsafe_code)]

pub mod agent;
pub mod auth;
pub mod automation;
pub mod cluster;
pub mod vmm;

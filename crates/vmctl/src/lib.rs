//! The VMM's client library: what `tern vm`, the host agent and the parking daemon need to drive
//! VMMs without linking one. A VMM is a process (`tern vm run` or `tern vm receive`) that writes
//! a runtime entry `<runtime-dir>/<name>.json` and serves the control protocol of
//! [`tern_api::vmm`] on a unix socket; this crate finds it, talks to it and starts it.
//!
//! - [`runtime`]: the runtime directory — write, read and list entries, tell a live VMM from a
//!   stale entry (PID and process start time), remove stale entries, and [`find`] a VM's socket
//!   by name.
//! - [`client`]: [`call`], [`call_timeout`] and [`call_streaming`] (typed [`Progress`] lines).
//! - [`control`]: [`pause`], [`resume`], [`status`], [`dirty_rate`], and [`stop`] (shutdown,
//!   then SIGKILL).
//! - [`migrate`](mod@migrate): [`migrate()`] and the three ends of a migration
//!   ([`MigrationEnd`]: completed / failed / in doubt, `tern vm migrate`'s exit 0 / 1 / 3).
//! - [`args`]: [`VmmArgs`], the `tern vm run|receive` command line for a spec.
//! - [`local`]: the control sockets' private directory (0700), mode (0600) and peer check
//!   (`SO_PEERCRED` against allowed uids), shared by the VMM and the parking daemon.
//!
//! Everything here is blocking std I/O: an async caller runs it on a blocking task. No KVM and
//! no async runtime are linked (ARCHITECTURE.md: the agent and the controller never link KVM).
//!
//! ```no_run
//! use std::path::Path;
//! use tern_vmctl::{find, migrate, MigrationEnd, DEFAULT_RUNTIME_DIR};
//! use tern_api::vmm::MigrateRequest;
//!
//! let vm = find(Path::new(DEFAULT_RUNTIME_DIR), "web-1")?;
//! match migrate(&vm.sock, MigrateRequest::new("10.0.0.2:7000"), &mut |p| {
//!     eprintln!("round {}: {} bytes left", p.round, p.bytes_remaining)
//! }) {
//!     Ok(report) => println!("moved, {} ms downtime", report.downtime_ms),
//!     Err(e) if e.end() == MigrationEnd::InDoubt => eprintln!("{e}: check the target"),
//!     Err(e) if e.end() == MigrationEnd::Lost => eprintln!("{e}: start it from its disks"),
//!     Err(e) => eprintln!("{e}; the VM runs here"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod args;
pub mod client;
pub mod control;
pub mod local;
pub mod migrate;
pub mod runtime;

pub use args::{VmmArgs, VmmMode};
pub use client::{CallError, call, call_streaming, call_timeout};
pub use control::{
    ControlError, StopError, Stopped, dirty_rate, pause, request, resume, status, stop,
};
pub use migrate::{MigrateError, MigrationEnd, cancel, migrate};
pub use runtime::{DEFAULT_RUNTIME_DIR, FindVmError, FoundVm, find, is_live, read_entry};
pub use tern_api::vmm::{
    MigrateRequest, MigrationReport, Progress, Request, Response, RuntimeEntry,
};

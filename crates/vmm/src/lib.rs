//! The Tern VMM: a KVM virtual machine with its memory, vCPUs, boot loaders, devices and saved state.
//!
//! The only crate of the workspace allowed `unsafe`; each block says why it holds in a `// SAFETY:`
//! comment.
//!
//! The flow, from user input to a running guest:
//! 1. [`config::VmConfigInput::validate`] checks everything that can be checked without KVM and
//!    gives a typed [`config::VmConfig`];
//! 2. [`Vm::create`] creates the KVM VM (memory, in-kernel irqchip and PIT, devices), loads the
//!    kernel through PVH or the Linux boot protocol ([`boot`]), writes the MP table ([`mptable`]),
//!    shapes each vCPU's CPUID ([`cpuid`]) and starts one thread per vCPU, named `vcpuN` ([`vcpu`]), parked until [`Vm::resume`];
//! 3. [`Vm::pause`], [`Vm::resume`], [`Vm::status`], [`Vm::request_stop`] control it, also through
//!    the unix-socket API ([`api`]); [`Vm::save_state`] / [`Vm::restore_state`] move the typed
//!    [`state::VmState`] while it is paused, whole or not at all ([`persist`]);
//! 4. [`Vm::wait`] returns why it stopped ([`VmExit`]).

pub mod api;
pub mod boot;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod layout;
pub mod migrate;
pub mod mptable;
pub mod persist;
pub mod runtime;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod state;
pub mod testing;
pub mod uffd;
pub mod vcpu;
pub mod vm;

pub use persist::{Persist, RestoreStateError};
pub use vcpu::VmExit;
pub use vm::{ControlError, DirtyBitmap, MemoryRegionInfo, RunState, StartVmError, Vm, VmStatus};

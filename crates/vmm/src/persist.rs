//! Saved state apart from the live objects, and the rule that a state is restored whole or not
//! at all.
//!
//! Each device has a `persist` module beside it (`devices/serial/persist.rs`,
//! `devices/virtio_blk/persist.rs`, `devices/virtio_net/persist.rs`) holding its `…State`
//! struct, the error that says why a state does not fit, and its [`Persist`] implementation.
//! The one aggregate is [`crate::state::VmState`]: [`crate::Vm::save_state`] fills it from every
//! part, and [`crate::Vm::restore_state`] first checks every part against the VM it goes into
//! (vCPU count and ids, the MSRs this host saves, interrupt-controller chip ids, device slots,
//! each device's [`Persist::check`]) and only then applies any of it. A state that does not fit
//! is refused with a [`RestoreStateError`] naming the part, and the VM is left exactly as it was.
//!
//! There are no constructor arguments as in Firecracker's `Persist`: a VM is always built from
//! its configuration first (the configuration *is* the constructor argument, and the migration
//! handshake or the snapshot's meta checks it), and the state goes into that VM. The trait has
//! no default bodies, so a device that forgets a part of its state fails to compile.

use crate::devices::serial::persist::SerialStateError;
use crate::devices::virtio_blk::persist::VirtioBlkStateError;
use crate::devices::virtio_net::persist::VirtioNetStateError;
use crate::vm::ControlError;

/// A live object whose state can be saved and put back.
pub trait Persist {
    /// The saved form (plain data, serializable, carried by snapshots and migrations).
    type State;
    /// Why a saved state does not fit this object.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Takes the object's state (while the VM is paused; may drain queued input into it).
    fn save(&mut self) -> Self::State;

    /// Checks that `state` fits this object; changes nothing.
    fn check(&self, state: &Self::State) -> Result<(), Self::Error>;

    /// Puts `state` back. Runs [`Persist::check`] first: a state that does not fit leaves the
    /// object unchanged.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// Why a saved vCPU state does not fit the vCPU it would go into.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VcpuStateError {
    /// The state belongs to another vCPU.
    #[error("it is the state of vCPU {found}")]
    Id {
        /// The id the state carries.
        found: u8,
    },
    /// The XSAVE area is larger than KVM's.
    #[error("its XSAVE area has {words} words, more than KVM's {max}")]
    Xsave {
        /// Words in the state.
        words: usize,
        /// KVM's size.
        max: usize,
    },
    /// An MSR this host's KVM does not save (and would refuse to set).
    #[error("it carries MSR {index:#x}, which this host's KVM does not save")]
    Msr {
        /// The MSR.
        index: u32,
    },
}

/// Why [`crate::Vm::restore_state`] refused a state. Every variant but [`Self::Apply`] is found
/// before anything is changed: the VM is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum RestoreStateError {
    /// The VM is running or stopping.
    #[error("cannot restore the VM's state")]
    NotPaused(#[source] ControlError),
    /// A different number of vCPUs.
    #[error(
        "the saved state has {state} vCPU(s) but this VM has {vm}: restore it into a VM with {state} vCPU(s)"
    )]
    VcpuCount {
        /// vCPUs in the state.
        state: usize,
        /// vCPUs of this VM.
        vm: usize,
    },
    /// One vCPU's state does not fit.
    #[error("the saved state of vCPU {index} does not fit this VM")]
    Vcpu {
        /// The vCPU index.
        index: usize,
        /// What is wrong.
        #[source]
        source: VcpuStateError,
    },
    /// An interrupt controller's state is stored under the wrong chip.
    #[error("the saved {which} state is for irqchip {found}, not {expected}")]
    Irqchip {
        /// Master PIC, slave PIC or IOAPIC.
        which: &'static str,
        /// The chip id it must have.
        expected: u32,
        /// The chip id it has.
        found: u32,
    },
    /// The devices of one kind sit in other virtio-mmio slots than in this VM.
    #[error(
        "the saved state has {kind} devices in slots {state:?} but this VM has them in slots {vm:?}"
    )]
    Slots {
        /// `virtio-blk` or `virtio-net`.
        kind: &'static str,
        /// Slots in the state, in order.
        state: Vec<usize>,
        /// Slots of this VM, in order.
        vm: Vec<usize>,
    },
    /// The serial port's state does not fit.
    #[error("the saved state of the serial port does not fit")]
    Serial(#[source] SerialStateError),
    /// A disk's state does not fit.
    #[error("the saved state of the virtio-blk device in slot {slot} does not fit")]
    Block {
        /// Its slot.
        slot: usize,
        /// What is wrong.
        #[source]
        source: VirtioBlkStateError,
    },
    /// A NIC's state does not fit.
    #[error("the saved state of the virtio-net device in slot {slot} does not fit")]
    Net {
        /// Its slot.
        slot: usize,
        /// What is wrong.
        #[source]
        source: VirtioNetStateError,
    },
    /// KVM refused a checked state part-way: the VM is partly restored and must not be resumed
    /// (stop it).
    #[error("restoring the checked state failed part-way; stop this VM")]
    Apply(#[source] ControlError),
}

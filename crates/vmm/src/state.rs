//! Saved state of a VM, apart from the live objects: what a snapshot or a live migration carries.
//!
//! Every part has a typed `…State` struct. [`crate::Vm::save_state`] fills a [`VmState`] while
//! the VM is paused and [`crate::Vm::restore_state`] puts one back. The binary encoding
//! (versioned, checksummed) belongs to the migration crate; these structs are its input.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use vm_superio::serial::SerialState;

use crate::devices::virtio_blk::VirtioBlkState;

/// The MSRs saved with each vCPU (those of them KVM lists are saved).
pub const SAVED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x1b,        // IA32_APIC_BASE
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0x2ff,       // MTRRdefType
    0x6e0,       // TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d00, // KVM wall clock (new)
    0x4b56_4d01, // KVM system time (new)
    0x4b56_4d02, // KVM async PF
    0x4b56_4d03, // KVM steal time
    0x4b56_4d04, // KVM PV EOI
];

/// One vCPU's architectural state.
#[derive(Clone)]
pub struct VcpuState {
    /// The vCPU's index (its APIC ID).
    pub id: u8,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state (legacy view; XSAVE carries the full state).
    pub fpu: kvm_fpu,
    /// The XSAVE area (KVM_GET_XSAVE's 4 KiB region).
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// The saved MSRs.
    pub msrs: Vec<kvm_msr_entry>,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Running, halted, waiting for SIPI…
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The CPUID set the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The in-kernel interrupt controllers: two 8259 PICs and the IOAPIC.
#[derive(Clone)]
pub struct IrqchipState {
    /// The master PIC (chip 0).
    pub pic_master: kvm_irqchip,
    /// The slave PIC (chip 1).
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC (chip 2).
    pub ioapic: kvm_irqchip,
}

impl std::fmt::Debug for IrqchipState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqchipState").finish_non_exhaustive()
    }
}

/// The in-kernel PIT.
#[derive(Clone, Copy, Debug)]
pub struct PitState(pub kvm_pit_state2);

/// The VM's kvmclock.
#[derive(Clone, Copy, Debug)]
pub struct ClockState(pub kvm_clock_data);

/// The state of every device.
#[derive(Clone, Debug)]
pub struct DevicesState {
    /// COM1's registers.
    pub serial: SerialState,
    /// Each virtio-blk device, with its slot.
    pub blocks: Vec<(usize, VirtioBlkState)>,
}

/// The whole VM's state, taken while it is paused (guest memory apart).
#[derive(Clone, Debug)]
pub struct VmState {
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// PICs and IOAPIC.
    pub irqchip: IrqchipState,
    /// The PIT.
    pub pit: PitState,
    /// kvmclock.
    pub clock: ClockState,
    /// Devices.
    pub devices: DevicesState,
}

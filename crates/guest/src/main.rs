//! The Tern test guest: a freestanding x86_64 kernel that boots through PVH and runs its workloads
//! (heartbeat, memory writer, virtio-blk check, network echo) in user mode (CPL3) on every vCPU.
//!
//! Only the assembly in `boot.s` runs at CPL0 (page tables, GDT/TSS/IDT, interrupt and system-call
//! entry); all Rust code runs at CPL3, where KVM-PVM executes it natively. The Rust side reaches the
//! few privileged operations it needs (MSRs, arming the LAPIC timer and halting) through `int 0x80`
//! (see `sys`). The interface to the VMM is docs/guest-interface.md.
//!
//! This crate is not a member of the Tern workspace: `tern-guest-image` builds it with its own flags
//! and embeds the ELF. Being a kernel, it is the one crate besides tern-vmm that needs `unsafe`.

#![no_std]
#![no_main]

mod apic;
mod cmdline;
mod console;
mod load;
mod mem;
mod net;
mod platform;
mod pvh;
mod smp;
mod sys;
mod virtio;
mod virtio_mmio;
mod workload;

core::arch::global_asm!(include_str!("boot.s"), options(att_syntax));

/// First Rust code on every CPU, entered at CPL3 from `long64` in boot.s.
#[unsafe(no_mangle)]
extern "C" fn user_entry(cpu: u64, start_info: u64) -> ! {
    if cpu == 0 {
        workload::bsp_main(start_info)
    } else {
        workload::ap_main(cpu as usize)
    }
}

/// Entered at CPL3 on a fresh stack when a CPU takes an exception it cannot handle.
#[unsafe(no_mangle)]
extern "C" fn user_fault(vector: u64, error: u64, rip: u64, cr2: u64) -> ! {
    console::take_for_panic();
    println!(
        "PANIC exception vector={vector} error={error:#x} rip={rip:#x} cr2={cr2:#x} cpu={}",
        sys::cpu_index()
    );
    platform::stop(1)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::take_for_panic();
    println!("PANIC {} cpu={}", info.message(), sys::cpu_index());
    platform::stop(1)
}

//! What CPL3 code may do directly (port I/O through the TSS bitmap, `rdtsc`, `cpuid`, the per-CPU
//! `%gs` block) and the `int 0x80` system calls into boot.s for the rest.

use core::arch::asm;

const SYS_RDMSR: u64 = 1;
const SYS_WRMSR: u64 = 2;
const SYS_SLEEP: u64 = 3;
const SYS_STOP: u64 = 4;
const SYS_CPUID: u64 = 5;

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc is allowed at CPL3 (CR4.TSD is clear) and has no memory effects.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    ((hi as u64) << 32) | lo as u64
}

/// Executes `cpuid` for `leaf`, sub-leaf 0, in the kernel (see boot.s: at CPL3 KVM-PVM does not
/// intercept it); returns (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let (a, d): (u64, u64);
    // SAFETY: system call 5 returns in rax and rdx and preserves every other register.
    unsafe {
        asm!("int 0x80", inout("rax") SYS_CPUID => a, in("rdi") leaf as u64, in("rsi") 0u64,
             out("rdx") d, options(nostack))
    };
    (a as u32, (a >> 32) as u32, d as u32, (d >> 32) as u32)
}

/// Writes one byte to an I/O port the TSS bitmap opens to CPL3 (COM1, 0x64, 0x501).
#[inline]
pub fn outb(port: u16, value: u8) {
    // SAFETY: the port is one of those the I/O bitmap allows; port writes touch no guest memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads one byte from an I/O port the TSS bitmap opens to CPL3.
#[inline]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for outb.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// This CPU's index (0 = the boot CPU), from the per-CPU block boot.s points %gs at.
pub fn cpu_index() -> usize {
    let v: u64;
    // SAFETY: every CPU sets its GS base before it first reaches CPL3; offset 0 holds its index.
    unsafe { asm!("mov {}, gs:[0]", out(reg) v, options(nostack, readonly, preserves_flags)) };
    v as usize
}

fn syscall2(nr: u64, a: u64, b: u64) -> u64 {
    let ret: u64;
    // SAFETY: boot.s recognises `int 0x80` (raised as #UD or #GP) and preserves every register but rax.
    unsafe { asm!("int 0x80", inout("rax") nr => ret, in("rdi") a, in("rsi") b, options(nostack)) };
    ret
}

/// Reads a model-specific register (through the kernel).
pub fn rdmsr(msr: u32) -> u64 {
    syscall2(SYS_RDMSR, msr as u64, 0)
}

/// Writes a model-specific register (through the kernel).
pub fn wrmsr(msr: u32, value: u64) {
    syscall2(SYS_WRMSR, msr as u64, value);
}

/// Arms the LAPIC timer (TSC deadline, or a one-shot count when `oneshot_count` is non-zero) and
/// halts until the next interrupt. Returns early on any interrupt; callers re-check the time.
pub fn sleep_once(tsc_deadline: u64, oneshot_count: u32) {
    syscall2(SYS_SLEEP, tsc_deadline, oneshot_count as u64);
}

/// Stops this CPU for good (interrupts off, `hlt`).
pub fn stop_cpu() -> ! {
    syscall2(SYS_STOP, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}

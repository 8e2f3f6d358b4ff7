//! The local APIC in x2APIC mode: enabling it, the timer (TSC-deadline, else one-shot) that wakes a
//! halted CPU, and the INIT/SIPI inter-processor interrupts.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::sys::{rdmsr, rdtsc, sleep_once, wrmsr};

const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const MSR_X2APIC_ID: u32 = 0x802;
const MSR_X2APIC_TPR: u32 = 0x808;
const MSR_X2APIC_SVR: u32 = 0x80f;
const MSR_X2APIC_ICR: u32 = 0x830;
const MSR_X2APIC_LVT_TIMER: u32 = 0x832;
const MSR_X2APIC_DIVIDE: u32 = 0x83e;
const MSR_X2APIC_LVT_LINT0: u32 = 0x835;
const LVT_MASKED: u64 = 1 << 16;

/// Vectors; boot.s handles exactly these (and the exceptions below 32).
const TIMER_VECTOR: u64 = 32;
const SPURIOUS_VECTOR: u64 = 47;
const LVT_TSC_DEADLINE: u64 = 0b10 << 17;

/// How the timer is programmed: 0 = TSC deadline; otherwise the APIC timer's frequency in kHz.
static ONESHOT_KHZ: AtomicU64 = AtomicU64::new(0);
static TSC_KHZ: AtomicU32 = AtomicU32::new(0);

/// Why the APIC cannot be used.
#[derive(Clone, Copy, Debug)]
pub enum ApicError {
    NoX2Apic,
    NoTimerFrequency,
}

/// Chooses the timer mode from CPUID; call once on the boot CPU before `init_cpu`.
pub fn configure(tsc_khz: u32) -> Result<(), ApicError> {
    let (_, _, ecx, _) = crate::sys::cpuid(1);
    if ecx & (1 << 21) == 0 {
        return Err(ApicError::NoX2Apic);
    }
    TSC_KHZ.store(tsc_khz, Ordering::Relaxed);
    if ecx & (1 << 24) == 0 {
        // No TSC-deadline timer: one-shot mode, counting at the APIC bus frequency that the
        // hypervisor reports next to the TSC frequency (CPUID 0x40000010 EBX, in kHz).
        let (_, bus_khz, _, _) = crate::sys::cpuid(0x4000_0010);
        if bus_khz == 0 {
            return Err(ApicError::NoTimerFrequency);
        }
        ONESHOT_KHZ.store(bus_khz as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Whether the timer runs in TSC-deadline mode.
pub fn tsc_deadline_mode() -> bool {
    ONESHOT_KHZ.load(Ordering::Relaxed) == 0
}

/// Switches this CPU's APIC to x2APIC mode and sets up its timer; returns its APIC ID.
pub fn init_cpu() -> u32 {
    let base = rdmsr(MSR_APIC_BASE);
    if base & APIC_BASE_ENABLE == 0 {
        wrmsr(MSR_APIC_BASE, base | APIC_BASE_ENABLE);
    }
    if base & APIC_BASE_X2APIC == 0 {
        wrmsr(MSR_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
    }
    // The legacy PIC (virtual-wire through LINT0) would deliver the PIT's ticks at vector 0.
    wrmsr(MSR_X2APIC_LVT_LINT0, LVT_MASKED);
    wrmsr(MSR_X2APIC_TPR, 0);
    wrmsr(MSR_X2APIC_SVR, 0x100 | SPURIOUS_VECTOR);
    if tsc_deadline_mode() {
        wrmsr(MSR_X2APIC_LVT_TIMER, LVT_TSC_DEADLINE | TIMER_VECTOR);
    } else {
        wrmsr(MSR_X2APIC_DIVIDE, 0b1011);
        wrmsr(MSR_X2APIC_LVT_TIMER, TIMER_VECTOR);
    }
    rdmsr(MSR_X2APIC_ID) as u32
}

/// Halts (timer armed) until the TSC reaches `deadline`.
pub fn sleep_until(deadline: u64) {
    let oneshot_khz = ONESHOT_KHZ.load(Ordering::Relaxed);
    let tsc_khz = TSC_KHZ.load(Ordering::Relaxed) as u64;
    loop {
        let now = rdtsc();
        if now >= deadline {
            return;
        }
        if oneshot_khz == 0 {
            sleep_once(deadline, 0);
        } else {
            let count = ((deadline - now) as u128 * oneshot_khz as u128 / tsc_khz.max(1) as u128)
                .clamp(1, u32::MAX as u128) as u32;
            sleep_once(0, count);
        }
    }
}

/// Sends INIT to the CPU with x2APIC ID `apic_id`.
pub fn send_init(apic_id: u32) {
    wrmsr(MSR_X2APIC_ICR, ((apic_id as u64) << 32) | 0x4500);
}

/// Sends a start-up IPI: the CPU starts in real mode at `page << 12`.
pub fn send_sipi(apic_id: u32, page: u8) {
    wrmsr(
        MSR_X2APIC_ICR,
        ((apic_id as u64) << 32) | 0x4600 | page as u64,
    );
}

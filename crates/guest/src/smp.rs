//! Finding the other CPUs (ACPI MADT, else the MP table) and starting them with INIT-SIPI-SIPI
//! through the real-mode trampoline in boot.s, copied to `TRAMPOLINE` below 1 MiB.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::apic;
use crate::pvh::BootInfo;
use crate::sys::rdtsc;

/// How many CPUs boot.s has stacks and TSSs for.
pub const MAX_CPUS: usize = 32;
/// Physical address of the AP trampoline (SIPI vector 0x08).
const TRAMPOLINE: u64 = 0x8000;

unsafe extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static mut ap_boot_cpu: u32;
}

/// Set by each AP when it reaches CPL3: the index of the CPU that last arrived.
pub static AP_ARRIVED: AtomicU64 = AtomicU64::new(0);
/// Number of CPUs running (the boot CPU included).
pub static CPUS: AtomicU32 = AtomicU32::new(1);

/// APIC IDs of the CPUs the firmware tables list (possibly including the boot CPU).
#[derive(Debug)]
pub struct CpuList {
    pub ids: [u32; MAX_CPUS],
    pub len: usize,
    pub source: &'static str,
}

impl CpuList {
    fn push(&mut self, id: u32) {
        if self.len < MAX_CPUS && !self.ids[..self.len].contains(&id) {
            self.ids[self.len] = id;
            self.len += 1;
        }
    }
}

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: callers read firmware tables below 4 GiB, which are identity-mapped.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(rd::<u8>(addr + i))) == 0
}

fn scan(start: u64, end: u64, sig: &[u8], step: u64) -> Option<u64> {
    let mut a = start;
    while a + sig.len() as u64 <= end {
        if sig
            .iter()
            .enumerate()
            .all(|(i, &c)| rd::<u8>(a + i as u64) == c)
        {
            return Some(a);
        }
        a += step;
    }
    None
}

fn find_rsdp(boot: &BootInfo) -> Option<u64> {
    if boot.rsdp != 0 {
        return Some(boot.rsdp);
    }
    let mut from = 0xe0000;
    while let Some(a) = scan(from, 0x100000, b"RSD PTR ", 16) {
        if checksum_ok(a, 20) {
            return Some(a);
        }
        from = a + 16;
    }
    None
}

fn madt_cpus(boot: &BootInfo, list: &mut CpuList) -> bool {
    let Some(rsdp) = find_rsdp(boot) else {
        return false;
    };
    let revision: u8 = rd(rsdp + 15);
    let (table, entry_size) = if revision >= 2 && rd::<u64>(rsdp + 24) != 0 {
        (rd::<u64>(rsdp + 24), 8)
    } else {
        (rd::<u32>(rsdp + 16) as u64, 4)
    };
    if table == 0 || table >= 1 << 32 {
        return false;
    }
    let len: u32 = rd(table + 4);
    let count = (len.saturating_sub(36) / entry_size).min(64) as u64;
    for i in 0..count {
        let sdt = if entry_size == 8 {
            rd::<u64>(table + 36 + 8 * i)
        } else {
            rd::<u32>(table + 36 + 4 * i) as u64
        };
        if sdt == 0 || sdt >= 1 << 32 || rd::<[u8; 4]>(sdt) != *b"APIC" {
            continue;
        }
        let end = sdt + (rd::<u32>(sdt + 4) as u64).min(64 * 1024);
        let mut e = sdt + 44;
        while e + 2 <= end {
            let kind: u8 = rd(e);
            let elen = rd::<u8>(e + 1) as u64;
            if elen < 2 {
                break;
            }
            match kind {
                0 if rd::<u32>(e + 4) & 1 != 0 => list.push(rd::<u8>(e + 3) as u32),
                9 if rd::<u32>(e + 8) & 1 != 0 => list.push(rd::<u32>(e + 4)),
                _ => {}
            }
            e += elen;
        }
        list.source = "madt";
        return list.len > 0;
    }
    false
}

fn mp_cpus(list: &mut CpuList) -> bool {
    let ebda = (rd::<u16>(0x40e) as u64) << 4;
    let base_top = (rd::<u16>(0x413) as u64) * 1024;
    let mut areas = [(0u64, 0u64); 3];
    let mut n = 0;
    if (0x80000..0xa0000).contains(&ebda) {
        areas[n] = (ebda, ebda + 1024);
        n += 1;
    }
    if (0x80000..=0xa0000).contains(&base_top) {
        areas[n] = (base_top - 1024, base_top);
        n += 1;
    }
    areas[n] = (0xf0000, 0x100000);
    n += 1;
    for &(start, end) in &areas[..n] {
        let Some(fp) = scan(start, end, b"_MP_", 16) else {
            continue;
        };
        if !checksum_ok(fp, 16) {
            continue;
        }
        let cfg = rd::<u32>(fp + 4) as u64;
        if cfg == 0 || rd::<[u8; 4]>(cfg) != *b"PCMP" {
            continue;
        }
        let count = rd::<u16>(cfg + 34);
        let mut e = cfg + 44;
        for _ in 0..count {
            match rd::<u8>(e) {
                0 => {
                    if rd::<u8>(e + 3) & 1 != 0 {
                        list.push(rd::<u8>(e + 1) as u32);
                    }
                    e += 20;
                }
                1..=4 => e += 8,
                _ => break,
            }
        }
        list.source = "mptable";
        return list.len > 0;
    }
    false
}

/// Lists the CPUs from the ACPI MADT, or the MP table when there is no usable MADT.
pub fn discover(boot: &BootInfo) -> CpuList {
    let mut list = CpuList {
        ids: [0; MAX_CPUS],
        len: 0,
        source: "none",
    };
    if !madt_cpus(boot, &mut list) {
        list.len = 0;
        mp_cpus(&mut list);
    }
    list
}

fn wait_arrival(cpu: u64, ticks: u64) -> bool {
    let until = rdtsc() + ticks;
    while rdtsc() < until {
        if AP_ARRIVED.load(Ordering::Acquire) == cpu {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// Starts every listed CPU but `self_id`, one at a time; returns the number of CPUs now running.
pub fn start_aps(boot: &BootInfo, list: &CpuList, self_id: u32, tsc_khz: u64) -> usize {
    let mut next = 1usize;
    let others = list.ids[..list.len].iter().filter(|&&id| id != self_id);
    if list.len > 1 {
        // SAFETY: the trampoline is position-independent real-mode code between the two symbols;
        // TRAMPOLINE is RAM (checked) that nothing else uses once the start info was copied.
        unsafe {
            let start = &raw const ap_tramp_start;
            let len = (&raw const ap_tramp_end).offset_from(start) as usize;
            if !boot.is_ram(TRAMPOLINE, 4096) {
                panic!("no RAM at {TRAMPOLINE:#x} for the AP trampoline");
            }
            core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
        }
    }
    for &id in others {
        if next >= MAX_CPUS {
            break;
        }
        // SAFETY: written before the AP is started and read only by that AP in ap_entry32.
        unsafe { (&raw mut ap_boot_cpu).write_volatile(next as u32) };
        core::sync::atomic::fence(Ordering::SeqCst);
        apic::send_init(id);
        apic::send_sipi(id, (TRAMPOLINE >> 12) as u8);
        if !wait_arrival(next as u64, tsc_khz / 5) {
            apic::send_sipi(id, (TRAMPOLINE >> 12) as u8);
            if !wait_arrival(next as u64, tsc_khz * 500) {
                panic!("CPU with APIC ID {id} did not start");
            }
        }
        next += 1;
        CPUS.store(next as u32, Ordering::Release);
    }
    next
}

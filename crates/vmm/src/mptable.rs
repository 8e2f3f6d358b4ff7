//! The Intel MultiProcessor Specification 1.4 table that tells a guest about its CPUs and IOAPIC.
//!
//! [`build`] is pure: it returns the bytes to place at [`crate::layout::MPTABLE_START`] (the
//! floating pointer structure, followed by the configuration table it points to).

use crate::layout::{APIC_START, IOAPIC_START};

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;
/// Number of IOAPIC pins described (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const BUS_ISA: u8 = 0;

/// Why the table could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    /// Zero CPUs, or more than fit 8-bit APIC IDs next to the IOAPIC's.
    #[error("an MP table describes 1 to 254 CPUs, not {0}")]
    CpuCount(usize),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer and configuration table for `cpus` CPUs (APIC IDs 0..cpus, the
/// first one the bootstrap processor), one IOAPIC (ID `cpus`) and the ISA bus, to be written at
/// guest-physical address `base`.
pub fn build(base: u64, cpus: usize) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MpTableError::CpuCount(cpus));
    }
    let ioapic_id = cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let mut e = [0u8; PROCESSOR_LEN];
        e[0] = 0; // processor
        e[1] = id as u8;
        e[2] = APIC_VERSION;
        e[3] = 0x01 | if id == 0 { 0x02 } else { 0 }; // enabled, BSP
        e[4..8].copy_from_slice(&0x0006_00f0u32.to_le_bytes()); // family 6 signature
        e[8..12].copy_from_slice(&0x0000_0201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    // Bus: ISA.
    let mut bus = [0u8; SMALL_ENTRY_LEN];
    bus[0] = 1;
    bus[1] = BUS_ISA;
    bus[2..8].copy_from_slice(b"ISA   ");
    entries.extend_from_slice(&bus);
    count += 1;
    // The IOAPIC.
    let mut io = [0u8; SMALL_ENTRY_LEN];
    io[0] = 2;
    io[1] = ioapic_id;
    io[2] = IOAPIC_VERSION;
    io[3] = 1; // enabled
    io[4..8].copy_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.extend_from_slice(&io);
    count += 1;
    // Every IOAPIC pin, identity-mapped from the ISA IRQ of the same number (edge, active high by
    // the bus's default, which is what KVM's irqfd pulses give).
    for pin in 0..IOAPIC_PINS {
        let mut e = [0u8; SMALL_ENTRY_LEN];
        e[0] = 3;
        e[1] = 0; // INT
        e[2..4].copy_from_slice(&0u16.to_le_bytes()); // conforming polarity and trigger
        e[4] = BUS_ISA;
        e[5] = pin;
        e[6] = ioapic_id;
        e[7] = pin;
        entries.extend_from_slice(&e);
        count += 1;
    }
    // Local interrupts: LINT0 ExtINT (the PIC), LINT1 NMI, on every local APIC.
    for (kind, lint) in [(3u8, 0u8), (1, 1)] {
        let mut e = [0u8; SMALL_ENTRY_LEN];
        e[0] = 4;
        e[1] = kind;
        e[4] = BUS_ISA;
        e[5] = 0;
        e[6] = 0xff;
        e[7] = lint;
        entries.extend_from_slice(&e);
        count += 1;
    }

    let table_len = HEADER_LEN + entries.len();
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(b"PCMP");
    header[4..6].copy_from_slice(&(table_len as u16).to_le_bytes());
    header[6] = 4; // spec revision 1.4
    header[8..16].copy_from_slice(b"TERN    ");
    header[16..28].copy_from_slice(b"TERNVMM     ");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&(APIC_START as u32).to_le_bytes());
    let mut table = header.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = [0u8; FLOATING_LEN];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&((base + FLOATING_LEN as u64) as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4;
    fp[10] = checksum(&fp);

    let mut out = fp.to_vec();
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_and_table_checksum_to_zero() {
        let t = build(0x9fc00, 2).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
        assert_eq!(ptr, 0x9fc10);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn every_cpu_is_listed_enabled_and_only_the_first_is_bsp() {
        let t = build(0x9fc00, 3).unwrap();
        let table = &t[16..];
        let count = u16::from_le_bytes(table[34..36].try_into().unwrap());
        assert_eq!(count as usize, 3 + 1 + 1 + 24 + 2);
        let mut off = HEADER_LEN;
        for id in 0..3u8 {
            let e = &table[off..off + PROCESSOR_LEN];
            assert_eq!(e[0], 0);
            assert_eq!(e[1], id);
            assert_eq!(e[3] & 1, 1, "cpu {id} enabled");
            assert_eq!(e[3] & 2 != 0, id == 0, "bsp flag of cpu {id}");
            off += PROCESSOR_LEN;
        }
        // bus, then the IOAPIC with the next free ID at 0xfec00000
        assert_eq!(table[off], 1);
        off += 8;
        assert_eq!(table[off], 2);
        assert_eq!(table[off + 1], 3);
        assert_eq!(
            u32::from_le_bytes(table[off + 4..off + 8].try_into().unwrap()),
            0xfec0_0000
        );
        // The local APIC address in the header.
        assert_eq!(
            u32::from_le_bytes(table[36..40].try_into().unwrap()),
            0xfee0_0000
        );
    }

    #[test]
    fn cpu_counts_out_of_range_are_refused() {
        assert_eq!(build(0, 0), Err(MpTableError::CpuCount(0)));
        assert_eq!(build(0, 255), Err(MpTableError::CpuCount(255)));
        // The largest table still fits the 64 KiB BIOS area it is placed in.
        assert!(build(0xf0000, 254).unwrap().len() < 0x1_0000);
    }
}

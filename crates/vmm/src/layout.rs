//! The guest-physical memory map: where Tern puts RAM, boot structures and devices, and the e820 map.

/// Guest memory as the VMM maps it: every write the VMM itself makes (a device filling a guest
/// buffer, the boot loader) is recorded in a per-page bitmap, since KVM's dirty log sees only the
/// guest's own writes.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// First byte past the boot-time real-mode RAM (the EBDA starts here).
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of the high-memory RAM above the legacy hole.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap: RAM above this goes to 4 GiB and up.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// The GDT used for the Linux 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT for the Linux 64-bit entry.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-mapping page tables for the Linux 64-bit entry: PML4, then PDPT, then PD.
pub const PML4_START: u64 = 0x9000;
/// See [`PML4_START`].
pub const PDPTE_START: u64 = 0xa000;
/// See [`PML4_START`].
pub const PDE_START: u64 = 0xb000;
/// The initial stack pointer of the boot vCPU for the Linux entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Room reserved for the command line.
pub const CMDLINE_MAX_BYTES: u64 = 0x1_0000;
/// The MP table (floating pointer, then the configuration table) in the BIOS area, where a guest
/// scans for it; 64 KiB leave room for 254 CPUs.
pub const MPTABLE_START: u64 = 0xf_0000;

/// The first virtio-mmio slot, as on QEMU's microvm.
pub const VIRTIO_MMIO_BASE: u64 = 0xfeb0_0000;
/// The size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x200;
/// Number of slots a guest scans.
pub const VIRTIO_MMIO_SLOTS: usize = 24;
/// Slots Tern wires to an interrupt: the top 8 (slots 16..=23 use IOAPIC pins 16..=23).
pub const VIRTIO_MMIO_IRQ_SLOTS: usize = 8;

/// The IOAPIC's address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's address.
pub const APIC_START: u64 = 0xfee0_0000;

/// The slot used by the `index`-th virtio device (slots fill from the top, like QEMU's microvm).
pub fn virtio_slot(index: usize) -> usize {
    VIRTIO_MMIO_SLOTS - 1 - index
}

/// The guest-physical base of a virtio-mmio slot.
pub fn virtio_slot_addr(slot: usize) -> u64 {
    VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SLOT_SIZE
}

/// The GSI (IOAPIC pin) of a virtio-mmio slot: the slot number itself, for slots 16..=23.
pub fn virtio_slot_gsi(slot: usize) -> u32 {
    slot as u32
}

/// The RAM regions of a guest with `mem_bytes` of memory: (start, size) pairs.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// The end of RAM below 4 GiB.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

/// An e820 entry type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
}

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type.
    pub kind: E820Type,
}

/// The e820 map of a guest with `mem_bytes` of memory: base RAM, the EBDA (holding the MP table)
/// reserved, RAM from 1 MiB to the MMIO gap, and the rest above 4 GiB.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa_0000 - EBDA_START,
            kind: E820Type::Reserved,
        },
    ];
    let low_end = low_ram_end(mem_bytes);
    if low_end > HIGH_RAM_START {
        map.push(E820Entry {
            addr: HIGH_RAM_START,
            size: low_end - HIGH_RAM_START,
            kind: E820Type::Ram,
        });
    }
    if mem_bytes > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_bytes - MMIO_GAP_START,
            kind: E820Type::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_of_a_small_guest_has_base_ram_ebda_and_high_ram() {
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            (map[0].addr, map[0].size, map[0].kind),
            (0, 0x9fc00, E820Type::Ram)
        );
        assert_eq!(map[1].kind, E820Type::Reserved);
        assert_eq!(map[1].addr + map[1].size, 0xa0000);
        assert_eq!(map[2].addr, 0x10_0000);
        assert_eq!(map[2].addr + map[2].size, 256 << 20);
    }

    #[test]
    fn e820_of_a_large_guest_skips_the_mmio_gap() {
        let mem = 5u64 << 30;
        let map = e820_map(mem);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
        assert_eq!(map[3].addr, 1 << 32);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        // All memory but the 384 KiB hole below 1 MiB and the reserved EBDA is RAM.
        assert_eq!(ram, mem - (HIGH_RAM_START - EBDA_START));
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "overlap in {map:?}");
        }
    }

    #[test]
    fn ram_regions_match_the_e820_ends() {
        assert_eq!(ram_regions(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, MMIO_GAP_START), (1 << 32, (4 << 30) - MMIO_GAP_START)]
        );
    }

    #[test]
    fn virtio_slots_fill_from_the_top_with_their_own_gsi() {
        assert_eq!(virtio_slot(0), 23);
        assert_eq!(virtio_slot_addr(23), 0xfeb0_2e00);
        assert_eq!(virtio_slot_gsi(virtio_slot(7)), 16);
        assert!(virtio_slot_addr(23) + VIRTIO_MMIO_SLOT_SIZE < IOAPIC_START);
    }
}

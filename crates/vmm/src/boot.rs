//! Boot protocols: loading a kernel into guest memory and describing the machine to it.
//!
//! Two entries are supported:
//! - **PVH** (an ELF with the `XEN_ELFNOTE_PHYS32_ENTRY` note): 32-bit protected mode, paging off,
//!   `%ebx` = the `hvm_start_info` with the command line, memory map and (as a module) the initrd;
//! - the **Linux 64-bit boot protocol** (a bzImage, or an ELF vmlinux without the PVH note): long mode
//!   with identity-mapped page tables, `%rsi` = the `boot_params` zero page.
//!
//! The structures are built as bytes by pure functions ([`pvh_start_info`], [`linux_boot_params`])
//! so that their layout is unit-tested.

use std::io::Cursor;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::config::{KernelFormat, KernelSource, VmConfig};
use crate::layout::{self, E820Entry};

/// `hvm_start_info.magic`.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;
const HVM_START_INFO_LEN: usize = 56;
const HVM_MEMMAP_ENTRY_LEN: usize = 24;
const HVM_MODLIST_ENTRY_LEN: usize = 32;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode at this address.
    Pvh {
        /// The entry point.
        entry: u64,
    },
    /// Linux 64-bit boot protocol at this address.
    Linux64 {
        /// The entry point.
        entry: u64,
    },
}

/// Why the kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The loader refused the image.
    #[error(
        "cannot load kernel {what}: {source} (is it an x86-64 kernel that fits in guest memory?)"
    )]
    Load {
        /// The kernel.
        what: String,
        /// The cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd could not be read.
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit.
    #[error(
        "initrd of {size} bytes does not fit in guest memory above the kernel (give more --memory-mib)"
    )]
    InitrdTooLarge {
        /// Its size.
        size: u64,
    },
    /// The command line does not fit.
    #[error("the command line is too long")]
    CmdlineTooLong,
    /// A write to guest memory failed.
    #[error("cannot write the boot structures to guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The result of loading: where to enter, and what the vCPU registers must say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootPlan {
    /// The entry.
    pub entry: BootEntry,
    /// The end of the loaded kernel image.
    pub kernel_end: u64,
}

/// Builds an `hvm_start_info` followed by nothing; the memory map and the module list go at the
/// addresses given, written by [`pvh_memmap`] and [`pvh_modlist`].
pub fn pvh_start_info(
    cmdline_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    modlist_paddr: u64,
    nr_modules: u32,
) -> [u8; HVM_START_INFO_LEN] {
    let mut b = [0u8; HVM_START_INFO_LEN];
    b[0..4].copy_from_slice(&HVM_START_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&1u32.to_le_bytes()); // version 1: memmap fields valid
    b[8..12].copy_from_slice(&0u32.to_le_bytes()); // flags
    b[12..16].copy_from_slice(&nr_modules.to_le_bytes());
    b[16..24].copy_from_slice(&modlist_paddr.to_le_bytes());
    b[24..32].copy_from_slice(&cmdline_paddr.to_le_bytes());
    b[32..40].copy_from_slice(&0u64.to_le_bytes()); // rsdp_paddr: no ACPI
    b[40..48].copy_from_slice(&memmap_paddr.to_le_bytes());
    b[48..52].copy_from_slice(&memmap_entries.to_le_bytes());
    b
}

/// The PVH memory map table for `map`.
pub fn pvh_memmap(map: &[E820Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(map.len() * HVM_MEMMAP_ENTRY_LEN);
    for e in map {
        out.extend_from_slice(&e.addr.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&(e.kind as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    out
}

/// One PVH module entry (the initrd).
pub fn pvh_modlist(paddr: u64, size: u64) -> [u8; HVM_MODLIST_ENTRY_LEN] {
    let mut b = [0u8; HVM_MODLIST_ENTRY_LEN];
    b[0..8].copy_from_slice(&paddr.to_le_bytes());
    b[8..16].copy_from_slice(&size.to_le_bytes());
    b
}

/// Builds the Linux `boot_params` zero page from the image's setup header (or, for an ELF vmlinux,
/// a minimal one), the command line, the initrd and the e820 map.
pub fn linux_boot_params(
    hdr: Option<setup_header>,
    cmdline_paddr: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    map: &[E820Entry],
) -> boot_params {
    let mut p = boot_params {
        hdr: hdr.unwrap_or_else(|| setup_header {
            boot_flag: 0xaa55,
            header: 0x5372_6448, // "HdrS"
            kernel_alignment: 0x0100_0000,
            ..Default::default()
        }),
        ..Default::default()
    };
    p.hdr.type_of_loader = 0xff; // an undefined boot loader
    p.hdr.loadflags |= 0x01; // LOADED_HIGH
    p.hdr.cmd_line_ptr = cmdline_paddr as u32;
    p.ext_cmd_line_ptr = (cmdline_paddr >> 32) as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.ext_ramdisk_image = (addr >> 32) as u32;
        p.hdr.ramdisk_size = size as u32;
        p.ext_ramdisk_size = (size >> 32) as u32;
    }
    let n = map.len().min(p.e820_table.len());
    for (slot, e) in p.e820_table.iter_mut().zip(map.iter()) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind as u32;
    }
    p.e820_entries = n as u8;
    p
}

fn kernel_bytes(cfg: &VmConfig) -> Result<Vec<u8>, BootError> {
    match &cfg.kernel {
        KernelSource::Embedded { bytes, .. } => Ok(bytes.to_vec()),
        KernelSource::File(path) => std::fs::read(path).map_err(|source| BootError::OpenKernel {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Loads the kernel, initrd, command line and boot structures into `mem`; `cmdline` is the final
/// command line (the user's plus the devices Tern describes).
pub fn load<M: GuestMemoryBackend>(
    cfg: &VmConfig,
    mem: &M,
    cmdline: &str,
) -> Result<BootPlan, BootError> {
    let what = cfg.kernel.describe();
    let bytes_of_kernel = kernel_bytes(cfg)?;
    let mut image = Cursor::new(bytes_of_kernel.as_slice());
    let high = Some(GuestAddress(layout::HIGH_RAM_START));
    let load_err = |source| BootError::Load {
        what: what.clone(),
        source,
    };
    let (result, entry) = match cfg.kernel_format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut image, high).map_err(load_err)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => BootEntry::Pvh { entry: a.0 },
                _ => BootEntry::Linux64 {
                    entry: r.kernel_load.0,
                },
            };
            (r, entry)
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut image, high).map_err(load_err)?;
            // The 64-bit entry is 0x200 past the protected-mode kernel's start.
            let entry = BootEntry::Linux64 {
                entry: r.kernel_load.0 + 0x200,
            };
            (r, entry)
        }
    };

    let bytes = cmdline.as_bytes();
    if bytes.len() as u64 + 1 > layout::CMDLINE_MAX_BYTES {
        return Err(BootError::CmdlineTooLong);
    }
    mem.write_slice(bytes, GuestAddress(layout::CMDLINE_START))?;
    mem.write_obj(
        0u8,
        GuestAddress(layout::CMDLINE_START + bytes.len() as u64),
    )?;

    let mem_bytes = cfg.memory_bytes();
    let initrd = match &cfg.initrd {
        None => None,
        Some(path) => {
            let data = std::fs::read(path).map_err(|source| BootError::ReadInitrd {
                path: path.display().to_string(),
                source,
            })?;
            let size = data.len() as u64;
            // Highest page-aligned spot below the end of low RAM (and below Linux's usual
            // initrd_addr_max of 2 GiB), above the kernel.
            let top = layout::low_ram_end(mem_bytes).min(0x8000_0000);
            let addr = top.checked_sub(size).map(|a| a & !0xfff);
            match addr {
                Some(a) if a >= result.kernel_end => {
                    mem.write_slice(&data, GuestAddress(a))?;
                    Some((a, size))
                }
                _ => return Err(BootError::InitrdTooLarge { size }),
            }
        }
    };

    let map = layout::e820_map(mem_bytes);
    match entry {
        BootEntry::Pvh { .. } => {
            let memmap = pvh_memmap(&map);
            mem.write_slice(&memmap, GuestAddress(layout::PVH_MEMMAP_START))?;
            let nr_modules = match initrd {
                Some((a, s)) => {
                    mem.write_slice(&pvh_modlist(a, s), GuestAddress(layout::PVH_MODLIST_START))?;
                    1
                }
                None => 0,
            };
            let info = pvh_start_info(
                layout::CMDLINE_START,
                layout::PVH_MEMMAP_START,
                map.len() as u32,
                if nr_modules > 0 {
                    layout::PVH_MODLIST_START
                } else {
                    0
                },
                nr_modules,
            );
            mem.write_slice(&info, GuestAddress(layout::PVH_INFO_START))?;
        }
        BootEntry::Linux64 { .. } => {
            let params = linux_boot_params(
                result.setup_header,
                layout::CMDLINE_START,
                bytes.len() + 1,
                initrd,
                &map,
            );
            mem.write_slice(params.as_slice(), GuestAddress(layout::ZERO_PAGE_START))?;
            write_long_mode_tables(mem)?;
        }
    }
    Ok(BootPlan {
        entry,
        kernel_end: result.kernel_end,
    })
}

/// GDT entries used by both entries: null, 64-bit code, data, TSS (and the 32-bit code for PVH).
const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08: 64-bit code
    0x00cf_9300_0000_ffff, // 0x10: data
    0x008f_8b00_0000_ffff, // 0x18: TSS
];

fn write_long_mode_tables<M: GuestMemoryBackend>(
    mem: &M,
) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(layout::BOOT_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))?;
    // PML4[0] -> PDPT, PDPT[0] -> PD, PD: 512 × 2 MiB identity pages (the first GiB).
    mem.write_obj(layout::PDPTE_START | 0x03, GuestAddress(layout::PML4_START))?;
    mem.write_obj(layout::PDE_START | 0x03, GuestAddress(layout::PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(layout::PDE_START + i * 8))?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The boot vCPU's registers for `entry`: general registers and the changes to make to `sregs`.
pub fn boot_registers(entry: BootEntry, sregs: &mut kvm_sregs) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    let mut tss = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry } => {
            regs.rip = entry;
            regs.rbx = layout::PVH_INFO_START;
            sregs.cs = segment(0x08, 0xb, 0, 1);
            let data = segment(0x10, 0x3, 0, 1);
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.cr0 = 0x11; // PE | ET
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { entry } => {
            regs.rip = entry;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
            regs.rsi = layout::ZERO_PAGE_START;
            sregs.cs = segment(0x08, 0xb, 1, 0);
            let data = segment(0x10, 0x3, 0, 1);
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.gdt.base = layout::BOOT_GDT_START;
            sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
            sregs.idt.base = layout::BOOT_IDT_START;
            sregs.idt.limit = 7;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = 0x20; // PAE
            sregs.cr0 = 0x8000_0011; // PG | PE | ET
            sregs.efer = 0x500; // LME | LMA
            tss.limit = 0xfffff;
        }
    }
    sregs.tr = tss;
    regs
}

/// The FPU state at reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::e820_map;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn pvh_start_info_has_the_abi_layout() {
        let b = pvh_start_info(0x20000, 0x6100, 4, 0x6040, 1);
        assert_eq!(b.len(), 56);
        assert_eq!(u32_at(&b, 0), 0x336e_c578);
        assert_eq!(u32_at(&b, 4), 1);
        assert_eq!(u32_at(&b, 12), 1);
        assert_eq!(u64_at(&b, 16), 0x6040);
        assert_eq!(u64_at(&b, 24), 0x20000);
        assert_eq!(u64_at(&b, 32), 0);
        assert_eq!(u64_at(&b, 40), 0x6100);
        assert_eq!(u32_at(&b, 48), 4);
    }

    #[test]
    fn pvh_memmap_entries_are_24_bytes_each() {
        let map = e820_map(128 << 20);
        let b = pvh_memmap(&map);
        assert_eq!(b.len(), map.len() * 24);
        assert_eq!(u64_at(&b, 48), 0x10_0000);
        assert_eq!(u64_at(&b, 56), (128 << 20) - 0x10_0000);
        assert_eq!(u32_at(&b, 64), 1);
        assert_eq!(u32_at(&b, 24 + 16), 2, "the EBDA is reserved");
    }

    #[test]
    fn boot_params_fields_sit_at_the_boot_protocol_offsets() {
        // A bzImage's setup header as the loader returns it.
        let hdr = setup_header {
            setup_sects: 27,
            boot_flag: 0xaa55,
            header: 0x5372_6448,
            version: 0x020f,
            loadflags: 0x01,
            code32_start: 0x10_0000,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let map = e820_map(512 << 20);
        let p = linux_boot_params(Some(hdr), 0x20000, 42, Some((0x1f00_0000, 0x12345)), &map);
        let b = p.as_slice();
        assert_eq!(b.len(), 4096);
        assert_eq!(b[0x1e8], map.len() as u8, "e820_entries");
        assert_eq!(b[0x1f1], 27, "setup_sects");
        assert_eq!(
            u16::from_le_bytes([b[0x1fe], b[0x1ff]]),
            0xaa55,
            "boot_flag"
        );
        assert_eq!(&b[0x202..0x206], b"HdrS");
        assert_eq!(u16::from_le_bytes([b[0x206], b[0x207]]), 0x020f, "version");
        assert_eq!(b[0x210], 0xff, "type_of_loader");
        assert_eq!(b[0x211] & 1, 1, "LOADED_HIGH");
        assert_eq!(u32_at(b, 0x214), 0x10_0000, "code32_start");
        assert_eq!(u32_at(b, 0x218), 0x1f00_0000, "ramdisk_image");
        assert_eq!(u32_at(b, 0x21c), 0x12345, "ramdisk_size");
        assert_eq!(u32_at(b, 0x228), 0x20000, "cmd_line_ptr");
        assert_eq!(u32_at(b, 0x238), 42, "cmdline_size");
        // e820_table at 0x2d0, 20 bytes per entry.
        for (i, e) in map.iter().enumerate() {
            let off = 0x2d0 + i * 20;
            assert_eq!(u64_at(b, off), e.addr);
            assert_eq!(u64_at(b, off + 8), e.size);
            assert_eq!(u32_at(b, off + 16), e.kind as u32);
        }
    }

    #[test]
    fn an_elf_vmlinux_gets_a_minimal_valid_header() {
        let p = linux_boot_params(None, 0x20000, 10, None, &e820_map(64 << 20));
        let b = p.as_slice();
        assert_eq!(&b[0x202..0x206], b"HdrS");
        assert_eq!(u16::from_le_bytes([b[0x1fe], b[0x1ff]]), 0xaa55);
        assert_eq!(u32_at(b, 0x218), 0, "no ramdisk");
    }

    #[test]
    fn pvh_registers_enter_protected_mode_with_ebx_at_start_info() {
        let mut sregs = kvm_sregs::default();
        let regs = boot_registers(BootEntry::Pvh { entry: 0x10_0040 }, &mut sregs);
        assert_eq!(regs.rip, 0x10_0040);
        assert_eq!(regs.rbx, layout::PVH_INFO_START);
        assert_eq!(sregs.cr0 & 0x8000_0001, 1, "PE on, paging off");
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(sregs.efer, 0);
    }

    #[test]
    fn linux_registers_enter_long_mode_with_rsi_at_the_zero_page() {
        let mut sregs = kvm_sregs::default();
        let regs = boot_registers(BootEntry::Linux64 { entry: 0x100_0000 }, &mut sregs);
        assert_eq!(regs.rsi, layout::ZERO_PAGE_START);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.efer & 0x500, 0x500);
        assert_eq!(sregs.cr3, layout::PML4_START);
    }
}

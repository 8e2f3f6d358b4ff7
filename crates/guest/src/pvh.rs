//! The PVH `hvm_start_info` the loader hands over in %ebx: magic, command line, memory map, RSDP.
//! Everything is copied out before the APs start (the trampoline page may overlap the loader's data).

const MAGIC: u32 = 0x336e_c578;
/// The longest command line kept (Tern's VMM accepts 2048 bytes; a longer one is refused, see
/// [`BootInfo::cmdline_truncated`]).
pub const CMDLINE_MAX: usize = 4096;
const MEMMAP_MAX: usize = 64;
const E820_RAM: u32 = 1;

/// One e820-style memory map entry.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemRange {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// What the guest keeps of the start info.
#[derive(Debug)]
pub struct BootInfo {
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    /// The loader's command line did not end within `CMDLINE_MAX` bytes.
    pub cmdline_truncated: bool,
    pub memmap: [MemRange; MEMMAP_MAX],
    pub memmap_len: usize,
    pub rsdp: u64,
}

/// Why the start info is unusable.
#[derive(Clone, Copy, Debug)]
pub enum StartInfoError {
    BadMagic(u32),
    NoMemoryMap,
}

impl core::fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StartInfoError::BadMagic(m) => write!(f, "magic {m:#x}, expected {MAGIC:#x}"),
            StartInfoError::NoMemoryMap => f.write_str("no memory map (version 1 or later needed)"),
        }
    }
}

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: the first 4 GiB are identity-mapped; the loader placed the structure at this address.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

impl BootInfo {
    /// Reads and copies the start info at physical address `paddr`.
    pub fn read(paddr: u64) -> Result<BootInfo, StartInfoError> {
        let magic: u32 = read(paddr);
        if magic != MAGIC {
            return Err(StartInfoError::BadMagic(magic));
        }
        let version: u32 = read(paddr + 4);
        let cmdline_paddr: u64 = read(paddr + 24);
        let rsdp: u64 = read(paddr + 32);
        let mut info = BootInfo {
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            cmdline_truncated: false,
            memmap: [MemRange::default(); MEMMAP_MAX],
            memmap_len: 0,
            rsdp,
        };
        if cmdline_paddr != 0 {
            while info.cmdline_len < CMDLINE_MAX {
                let b: u8 = read(cmdline_paddr + info.cmdline_len as u64);
                if b == 0 {
                    break;
                }
                info.cmdline[info.cmdline_len] = b;
                info.cmdline_len += 1;
            }
            info.cmdline_truncated = info.cmdline_len == CMDLINE_MAX
                && read::<u8>(cmdline_paddr + CMDLINE_MAX as u64) != 0;
        }
        if version < 1 {
            return Err(StartInfoError::NoMemoryMap);
        }
        let memmap_paddr: u64 = read(paddr + 40);
        let entries: u32 = read(paddr + 48);
        if memmap_paddr == 0 || entries == 0 {
            return Err(StartInfoError::NoMemoryMap);
        }
        for i in 0..(entries as usize).min(MEMMAP_MAX) {
            let e = memmap_paddr + 24 * i as u64;
            info.memmap[i] = MemRange {
                addr: read(e),
                size: read(e + 8),
                kind: read(e + 16),
            };
        }
        info.memmap_len = (entries as usize).min(MEMMAP_MAX);
        Ok(info)
    }

    /// The command line (non-UTF-8 bytes make it empty).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// The usable RAM ranges.
    pub fn ram(&self) -> impl Iterator<Item = &MemRange> {
        self.memmap[..self.memmap_len]
            .iter()
            .filter(|r| r.kind == E820_RAM)
    }

    /// The guest's memory size in MiB (rounded up): the end of the highest RAM range, less the
    /// 32-bit MMIO hole when RAM lies above 4 GiB (from the end of the RAM below 4 GiB to 4 GiB).
    pub fn mem_mib(&self) -> u64 {
        const FOUR_GIB: u64 = 1 << 32;
        let top = self.ram().map(|r| r.addr + r.size).max().unwrap_or(0);
        let low_top = self
            .ram()
            .map(|r| r.addr + r.size)
            .filter(|&end| end <= FOUR_GIB)
            .max()
            .unwrap_or(0);
        let hole = if top > FOUR_GIB {
            FOUR_GIB - low_top
        } else {
            0
        };
        (top - hole).div_ceil(1 << 20)
    }

    /// Whether `[addr, addr + len)` lies inside one RAM range.
    pub fn is_ram(&self, addr: u64, len: u64) -> bool {
        self.ram()
            .any(|r| r.addr <= addr && addr + len <= r.addr + r.size)
    }
}

//! What both ends must agree on before a page moves: the guest memory layout and the VM's shape.

#![deny(clippy::disallowed_methods)]
use std::fmt;

/// Size of a guest page as carried on the wire. Tern guests use 4 KiB pages only.
pub const PAGE_SIZE: u64 = 4096;

/// Most memory regions a layout may hold (the decoder refuses more).
pub const MAX_REGIONS: usize = 64;
/// Most devices a configuration description may list.
pub const MAX_DEVICES: usize = 256;
/// Longest device name, in bytes.
pub const MAX_DEVICE_NAME: usize = 128;
/// Highest guest physical address (exclusive) a region may reach: 2^52, the x86-64 limit.
pub const MAX_GUEST_ADDR: u64 = 1 << 52;

/// One contiguous range of guest physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Guest physical address of the first byte (page-aligned).
    pub guest_addr: u64,
    /// Length in bytes (a non-zero multiple of [`PAGE_SIZE`]).
    pub size: u64,
}

impl Region {
    /// One past the last guest address of the region.
    pub fn end(&self) -> u64 {
        self.guest_addr + self.size
    }

    /// Number of pages in the region.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// Why a memory layout is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// No region at all.
    #[error("Memory layout has no region")]
    Empty,
    /// More regions than [`MAX_REGIONS`].
    #[error("Memory layout has {0} regions, at most {MAX_REGIONS} are allowed")]
    TooManyRegions(usize),
    /// A region that is empty, unaligned or beyond [`MAX_GUEST_ADDR`].
    #[error(
        "Memory region {index} ({guest_addr:#x}+{size:#x}) is empty, not page-aligned or beyond 2^52"
    )]
    BadRegion {
        /// Position in the list.
        index: usize,
        /// Its start.
        guest_addr: u64,
        /// Its size.
        size: u64,
    },
    /// Regions not sorted by address or overlapping.
    #[error("Memory region {0} overlaps the next one or the regions are not sorted by address")]
    Overlap(usize),
}

/// The guest memory layout: sorted, non-overlapping, page-aligned regions.
///
/// Every page address the receiver accepts is checked against this layout. Page indices used by
/// the sender number the pages of all regions in order (region 0 first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    regions: Vec<Region>,
    /// Page index of the first page of each region.
    first_page: Vec<u64>,
    total_pages: u64,
}

impl MemoryLayout {
    /// Checks and builds a layout.
    pub fn new(regions: Vec<Region>) -> Result<Self, LayoutError> {
        if regions.is_empty() {
            return Err(LayoutError::Empty);
        }
        if regions.len() > MAX_REGIONS {
            return Err(LayoutError::TooManyRegions(regions.len()));
        }
        let mut first_page = Vec::with_capacity(regions.len());
        let mut total_pages = 0u64;
        for (index, r) in regions.iter().enumerate() {
            let aligned = r.guest_addr % PAGE_SIZE == 0 && r.size % PAGE_SIZE == 0;
            let in_range = r
                .guest_addr
                .checked_add(r.size)
                .is_some_and(|end| end <= MAX_GUEST_ADDR);
            if r.size == 0 || !aligned || !in_range {
                return Err(LayoutError::BadRegion {
                    index,
                    guest_addr: r.guest_addr,
                    size: r.size,
                });
            }
            if index > 0 && regions[index - 1].end() > r.guest_addr {
                return Err(LayoutError::Overlap(index - 1));
            }
            first_page.push(total_pages);
            total_pages += r.pages();
        }
        Ok(Self {
            regions,
            first_page,
            total_pages,
        })
    }

    /// The regions, sorted by address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total number of pages over all regions.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Total bytes over all regions.
    pub fn total_bytes(&self) -> u64 {
        self.total_pages * PAGE_SIZE
    }

    /// Page index of the first page of region `region`.
    pub fn region_first_page(&self, region: usize) -> u64 {
        self.first_page[region]
    }

    /// The page index of the page at `gpa`, if `gpa` is page-aligned and the whole page lies
    /// inside one region.
    pub fn page_index(&self, gpa: u64) -> Option<u64> {
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        // Regions are sorted: find the last region starting at or below gpa.
        let pos = self.regions.partition_point(|r| r.guest_addr <= gpa);
        let i = pos.checked_sub(1)?;
        let r = &self.regions[i];
        if gpa.checked_add(PAGE_SIZE)? <= r.end() {
            Some(self.first_page[i] + (gpa - r.guest_addr) / PAGE_SIZE)
        } else {
            None
        }
    }

    /// The guest address of page `index` (the inverse of [`MemoryLayout::page_index`]).
    pub fn page_addr(&self, index: u64) -> Option<u64> {
        if index >= self.total_pages {
            return None;
        }
        let pos = self.first_page.partition_point(|&f| f <= index);
        let i = pos - 1;
        Some(self.regions[i].guest_addr + (index - self.first_page[i]) * PAGE_SIZE)
    }

    /// Whether `[gpa, gpa + len)` lies inside one region.
    pub fn contains_range(&self, gpa: u64, len: u64) -> bool {
        let pos = self.regions.partition_point(|r| r.guest_addr <= gpa);
        let Some(i) = pos.checked_sub(1) else {
            return false;
        };
        gpa.checked_add(len)
            .is_some_and(|end| end <= self.regions[i].end())
    }
}

/// A 64-bit digest of the CPUID a guest sees (entries hashed in the order the VMM sets them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CpuidDigest(pub u64);

impl CpuidDigest {
    /// Digest of CPUID entries given as `(function, index, eax, ebx, ecx, edx)`.
    pub fn of(entries: &[(u32, u32, u32, u32, u32, u32)]) -> Self {
        let mut bytes = Vec::with_capacity(entries.len() * 24);
        for &(f, i, a, b, c, d) in entries {
            for w in [f, i, a, b, c, d] {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
        }
        let lo = crc32c::crc32c(&bytes);
        let hi = crc32c::crc32c_append(0x5445_524e, &bytes);
        Self((u64::from(hi) << 32) | u64::from(lo))
    }
}

impl fmt::Display for CpuidDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What the source tells the target about the VM, checked before any page is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfigDescription {
    /// Guest memory layout.
    pub layout: MemoryLayout,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Digest of the CPUID the guest sees.
    pub cpuid: CpuidDigest,
    /// Devices, each named `kind:id` (e.g. `virtio-blk:0`), in the VMM's order.
    pub devices: Vec<String>,
}

/// Why a target cannot take a VM: a one-line reason meant for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigMismatch {
    /// Different number of memory regions.
    #[error("Memory layout differs: source has {source_regions} regions, target {target_regions}")]
    RegionCount {
        /// On the source.
        source_regions: usize,
        /// On the target.
        target_regions: usize,
    },
    /// A region differs in place or size.
    #[error(
        "Memory layout differs at region {index}: source {src_addr:#x}+{src_size:#x}, target {dst_addr:#x}+{dst_size:#x}"
    )]
    Region {
        /// Position.
        index: usize,
        /// Source start.
        src_addr: u64,
        /// Source size.
        src_size: u64,
        /// Target start.
        dst_addr: u64,
        /// Target size.
        dst_size: u64,
    },
    /// vCPU counts differ.
    #[error("vCPU count differs: source {source_vcpus}, target {target_vcpus}")]
    Vcpus {
        /// On the source.
        source_vcpus: u32,
        /// On the target.
        target_vcpus: u32,
    },
    /// CPUID digests differ.
    #[error("CPUID differs: source digest {source_cpuid}, target {target_cpuid}")]
    Cpuid {
        /// On the source.
        source_cpuid: CpuidDigest,
        /// On the target.
        target_cpuid: CpuidDigest,
    },
    /// Device lists differ.
    #[error("Device list differs: {0}")]
    Devices(String),
    /// The target has its own reason (e.g. it cannot build such a VM).
    #[error("Target cannot host this VM: {0}")]
    Other(String),
}

impl VmConfigDescription {
    /// Checks that a VM described by `self` (the source) can run as `target` describes.
    /// The first difference found is returned.
    pub fn check_compatible(&self, target: &VmConfigDescription) -> Result<(), ConfigMismatch> {
        let (s, t) = (self.layout.regions(), target.layout.regions());
        if s.len() != t.len() {
            return Err(ConfigMismatch::RegionCount {
                source_regions: s.len(),
                target_regions: t.len(),
            });
        }
        for (index, (a, b)) in s.iter().zip(t).enumerate() {
            if a != b {
                return Err(ConfigMismatch::Region {
                    index,
                    src_addr: a.guest_addr,
                    src_size: a.size,
                    dst_addr: b.guest_addr,
                    dst_size: b.size,
                });
            }
        }
        if self.vcpus != target.vcpus {
            return Err(ConfigMismatch::Vcpus {
                source_vcpus: self.vcpus,
                target_vcpus: target.vcpus,
            });
        }
        if self.cpuid != target.cpuid {
            return Err(ConfigMismatch::Cpuid {
                source_cpuid: self.cpuid,
                target_cpuid: target.cpuid,
            });
        }
        if let Some(d) = self.devices.iter().find(|d| !target.devices.contains(d)) {
            return Err(ConfigMismatch::Devices(format!(
                "source has {d}, the target does not"
            )));
        }
        if let Some(d) = target.devices.iter().find(|d| !self.devices.contains(d)) {
            return Err(ConfigMismatch::Devices(format!(
                "target has {d}, the source does not"
            )));
        }
        if self.devices != target.devices {
            return Err(ConfigMismatch::Devices(
                "same devices in a different order".to_owned(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(rs: &[(u64, u64)]) -> Result<MemoryLayout, LayoutError> {
        MemoryLayout::new(
            rs.iter()
                .map(|&(guest_addr, size)| Region { guest_addr, size })
                .collect(),
        )
    }

    #[test]
    fn layout_rejects_overlap_unaligned_and_empty() {
        assert_eq!(layout(&[]), Err(LayoutError::Empty));
        assert!(matches!(
            layout(&[(0, 4095)]),
            Err(LayoutError::BadRegion { .. })
        ));
        assert!(matches!(
            layout(&[(0, 0)]),
            Err(LayoutError::BadRegion { .. })
        ));
        assert_eq!(
            layout(&[(0, 8192), (4096, 4096)]),
            Err(LayoutError::Overlap(0))
        );
        assert!(matches!(
            layout(&[(MAX_GUEST_ADDR - 4096, 8192)]),
            Err(LayoutError::BadRegion { .. })
        ));
    }

    #[test]
    fn page_index_and_addr_are_inverse_and_reject_holes() {
        let l = layout(&[(0, 2 * PAGE_SIZE), (0x10_0000, 3 * PAGE_SIZE)]).unwrap();
        assert_eq!(l.total_pages(), 5);
        for i in 0..5 {
            let a = l.page_addr(i).unwrap();
            assert_eq!(l.page_index(a), Some(i));
        }
        assert_eq!(l.page_addr(5), None);
        assert_eq!(l.page_index(2 * PAGE_SIZE), None, "hole between regions");
        assert_eq!(
            l.page_index(0x10_0000 + 3 * PAGE_SIZE),
            None,
            "past the end"
        );
        assert_eq!(l.page_index(1), None, "unaligned");
        assert_eq!(l.page_index(u64::MAX - 4095), None);
        assert!(l.contains_range(0x10_0000, 3 * PAGE_SIZE));
        assert!(!l.contains_range(0x10_0000, 3 * PAGE_SIZE + 1));
    }

    fn desc() -> VmConfigDescription {
        VmConfigDescription {
            layout: layout(&[(0, 1 << 20)]).unwrap(),
            vcpus: 2,
            cpuid: CpuidDigest::of(&[(0, 0, 1, 2, 3, 4)]),
            devices: vec!["serial:com1".into(), "virtio-blk:0".into()],
        }
    }

    #[test]
    fn compatibility_check_names_the_first_difference() {
        let a = desc();
        assert_eq!(a.check_compatible(&a.clone()), Ok(()));
        let mut b = desc();
        b.vcpus = 1;
        assert_eq!(
            a.check_compatible(&b).unwrap_err().to_string(),
            "vCPU count differs: source 2, target 1"
        );
        let mut b = desc();
        b.layout = layout(&[(0, 2 << 20)]).unwrap();
        assert!(
            a.check_compatible(&b)
                .unwrap_err()
                .to_string()
                .starts_with("Memory layout differs at region 0")
        );
        let mut b = desc();
        b.cpuid = CpuidDigest::of(&[(0, 0, 1, 2, 3, 5)]);
        assert!(matches!(
            a.check_compatible(&b),
            Err(ConfigMismatch::Cpuid { .. })
        ));
        let mut b = desc();
        b.devices.pop();
        assert_eq!(
            a.check_compatible(&b).unwrap_err().to_string(),
            "Device list differs: source has virtio-blk:0, the target does not"
        );
    }
}

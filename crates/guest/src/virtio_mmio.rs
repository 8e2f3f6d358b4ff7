//! The driver side of the virtio-mmio transport (legacy version 1 and modern version 2), shared by
//! the block check and the network driver: the slot scan, register access, feature negotiation and
//! queue set-up. All of it runs at CPL3 against the identity-mapped device windows.

/// Slot `n`'s window starts at `SLOT_BASE + n * SLOT_SIZE` (QEMU microvm's layout, which Tern uses).
const SLOT_BASE: u64 = 0xfeb0_0000;
const SLOT_SIZE: u64 = 0x200;
const SLOTS: u64 = 24;
const MAGIC: u32 = 0x7472_6976;

const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_LEGACY_GUEST_PAGE_SIZE: u64 = 0x028;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_LEGACY_QUEUE_ALIGN: u64 = 0x03c;
const REG_LEGACY_QUEUE_PFN: u64 = 0x040;
const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC: u64 = 0x080;
const REG_QUEUE_DRIVER: u64 = 0x090;
const REG_QUEUE_DEVICE: u64 = 0x0a0;
pub const REG_CONFIG: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
/// VIRTIO_F_VERSION_1, bit 32: bit 0 of the high feature word.
const F_VERSION_1_HIGH: u32 = 1 << 0;

/// Rings are laid out for a 4 KiB QueueAlign: descriptors and the available ring in one page, the
/// used ring in the next (valid for both versions).
pub const RING_PAGE: u64 = 4096;

/// One virtio-mmio device window.
#[derive(Clone, Copy, Debug)]
pub struct Mmio {
    base: u64,
}

impl Mmio {
    /// The device of type `device_id` in the highest slot (devices are placed from the top), with
    /// its slot number.
    pub fn find(device_id: u32) -> Option<(u64, Mmio)> {
        (0..SLOTS).rev().find_map(|n| {
            let m = Mmio {
                base: SLOT_BASE + n * SLOT_SIZE,
            };
            (m.r32(REG_MAGIC) == MAGIC && m.r32(REG_DEVICE_ID) == device_id).then_some((n, m))
        })
    }

    /// The window's physical address.
    pub fn base(self) -> u64 {
        self.base
    }

    pub fn r32(self, off: u64) -> u32 {
        // SAFETY: the virtio-mmio window is identity-mapped (uncached) device memory.
        unsafe { ((self.base + off) as *const u32).read_volatile() }
    }

    pub fn w32(self, off: u64, v: u32) {
        // SAFETY: as above.
        unsafe { ((self.base + off) as *mut u32).write_volatile(v) }
    }

    pub fn r8(self, off: u64) -> u8 {
        // SAFETY: as above (config space is byte-addressable).
        unsafe { ((self.base + off) as *const u8).read_volatile() }
    }

    /// Resets the device and negotiates features: `choose` sees the device's low feature word and
    /// returns the low bits the driver accepts (or refuses the device); version 2 also needs
    /// VIRTIO_F_VERSION_1. Returns the status to pass to [`Mmio::driver_ok`].
    pub fn negotiate(
        self,
        version: u32,
        choose: impl FnOnce(u32) -> Result<u32, &'static str>,
    ) -> Result<u32, &'static str> {
        self.w32(REG_STATUS, 0);
        self.w32(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.w32(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.w32(REG_DEVICE_FEATURES_SEL, 0);
        let want = choose(self.r32(REG_DEVICE_FEATURES))?;
        self.w32(REG_DRIVER_FEATURES_SEL, 0);
        self.w32(REG_DRIVER_FEATURES, want);
        let mut status = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
        if version == 2 {
            self.w32(REG_DEVICE_FEATURES_SEL, 1);
            if self.r32(REG_DEVICE_FEATURES) & F_VERSION_1_HIGH == 0 {
                return Err("version 2 device without VIRTIO_F_VERSION_1");
            }
            self.w32(REG_DRIVER_FEATURES_SEL, 1);
            self.w32(REG_DRIVER_FEATURES, F_VERSION_1_HIGH);
            status |= STATUS_FEATURES_OK;
            self.w32(REG_STATUS, status);
            if self.r32(REG_STATUS) & STATUS_FEATURES_OK == 0 {
                return Err("device refused the features");
            }
        } else {
            self.w32(REG_LEGACY_GUEST_PAGE_SIZE, RING_PAGE as u32);
        }
        Ok(status)
    }

    /// The largest size queue `q` allows (0: no such queue).
    pub fn queue_max(self, q: u32) -> u32 {
        self.w32(REG_QUEUE_SEL, q);
        self.r32(REG_QUEUE_NUM_MAX)
    }

    /// Gives queue `q` of `size` entries the rings at `rings` (two pages, zeroed by the caller).
    pub fn setup_queue(self, version: u32, q: u32, size: u16, rings: u64) {
        self.w32(REG_QUEUE_SEL, q);
        self.w32(REG_QUEUE_NUM, size as u32);
        if version == 2 {
            let (desc, avail, used) = (rings, rings + 16 * size as u64, rings + RING_PAGE);
            for (reg, addr) in [
                (REG_QUEUE_DESC, desc),
                (REG_QUEUE_DRIVER, avail),
                (REG_QUEUE_DEVICE, used),
            ] {
                self.w32(reg, addr as u32);
                self.w32(reg + 4, (addr >> 32) as u32);
            }
            self.w32(REG_QUEUE_READY, 1);
        } else {
            self.w32(REG_LEGACY_QUEUE_ALIGN, RING_PAGE as u32);
            self.w32(REG_LEGACY_QUEUE_PFN, (rings / RING_PAGE) as u32);
        }
    }

    /// Tells the device the driver is ready (`status` from [`Mmio::negotiate`]).
    pub fn driver_ok(self, status: u32) {
        self.w32(REG_STATUS, status | STATUS_DRIVER_OK);
    }
}

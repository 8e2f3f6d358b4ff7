//! virtio-mmio (legacy version 1 and modern version 2 transports) and the virtio-blk check: scan the
//! slots, drive one request at a time through a polled queue, write a pattern, flush, read it back.

use core::sync::atomic::{Ordering, fence};

use crate::sys::rdtsc;

const SLOT_BASE: u64 = 0xfeb0_0000;
const SLOT_SIZE: u64 = 0x200;
const SLOTS: u64 = 24;
const MAGIC: u32 = 0x7472_6976;
const DEVICE_BLK: u32 = 2;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
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
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC: u64 = 0x080;
const REG_QUEUE_DRIVER: u64 = 0x090;
const REG_QUEUE_DEVICE: u64 = 0x0a0;
const REG_CONFIG: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;

const BLK_F_RO: u32 = 1 << 5;
const BLK_F_FLUSH: u32 = 1 << 9;
const F_VERSION_1_HIGH: u32 = 1 << 0;

const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_T_FLUSH: u32 = 4;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

const QSIZE: u16 = 8;
const PAGE: u64 = 4096;
const SECTOR: usize = 512;
/// Sectors the check writes and reads back (at most; fewer if the disk is smaller).
pub const VERIFY_SECTORS: u64 = 2048;
const CHUNK_SECTORS: usize = 128;

/// Ring memory: descriptors and the available ring in the first page, the used ring in the second
/// (the legacy layout for QueueAlign 4096, also valid for version 2).
#[repr(C, align(4096))]
struct Rings([u8; 2 * PAGE as usize]);
#[repr(C, align(4096))]
struct Data([u8; CHUNK_SECTORS * SECTOR]);
#[repr(C, align(16))]
struct Header([u8; 32]);

static mut RINGS: Rings = Rings([0; 2 * PAGE as usize]);
static mut DATA: Data = Data([0; CHUNK_SECTORS * SECTOR]);
static mut HEADER: Header = Header([0; 32]);

/// One virtio-mmio device window.
#[derive(Clone, Copy, Debug)]
struct Mmio {
    base: u64,
}

impl Mmio {
    fn r32(self, off: u64) -> u32 {
        // SAFETY: the virtio-mmio window is identity-mapped (uncached) device memory.
        unsafe { ((self.base + off) as *const u32).read_volatile() }
    }
    fn w32(self, off: u64, v: u32) {
        // SAFETY: as above.
        unsafe { ((self.base + off) as *mut u32).write_volatile(v) }
    }
}

/// The byte the check writes at offset `i` of sector `sector`: a 16-byte tag (`TERNBLK\0` and the
/// sector number, little-endian), then `(sector * 7 + i) % 251`.
pub fn pattern_byte(sector: u64, i: usize) -> u8 {
    const TAG: &[u8; 8] = b"TERNBLK\0";
    match i {
        0..8 => TAG[i],
        8..16 => sector.to_le_bytes()[i - 8],
        _ => ((sector * 7 + i as u64) % 251) as u8,
    }
}

fn find_blk() -> Option<(u64, Mmio)> {
    (0..SLOTS).rev().find_map(|n| {
        let m = Mmio {
            base: SLOT_BASE + n * SLOT_SIZE,
        };
        (m.r32(REG_MAGIC) == MAGIC && m.r32(REG_DEVICE_ID) == DEVICE_BLK).then_some((n, m))
    })
}

struct Blk {
    mmio: Mmio,
    /// Queue size in use (the device's maximum if that is below `QSIZE`).
    qsize: u16,
    used_seen: u16,
    avail_idx: u16,
    flush: bool,
    timeout_ticks: u64,
}

impl Blk {
    fn rings() -> u64 {
        &raw const RINGS as u64
    }

    fn setup(mmio: Mmio, version: u32, timeout_ticks: u64) -> Result<Blk, &'static str> {
        mmio.w32(REG_STATUS, 0);
        mmio.w32(REG_STATUS, STATUS_ACKNOWLEDGE);
        mmio.w32(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        mmio.w32(REG_DEVICE_FEATURES_SEL, 0);
        let low = mmio.r32(REG_DEVICE_FEATURES);
        if low & BLK_F_RO != 0 {
            return Err("device is read-only");
        }
        let flush = low & BLK_F_FLUSH != 0;
        mmio.w32(REG_DRIVER_FEATURES_SEL, 0);
        mmio.w32(REG_DRIVER_FEATURES, low & BLK_F_FLUSH);
        let mut status = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
        if version == 2 {
            mmio.w32(REG_DEVICE_FEATURES_SEL, 1);
            if mmio.r32(REG_DEVICE_FEATURES) & F_VERSION_1_HIGH == 0 {
                return Err("version 2 device without VIRTIO_F_VERSION_1");
            }
            mmio.w32(REG_DRIVER_FEATURES_SEL, 1);
            mmio.w32(REG_DRIVER_FEATURES, F_VERSION_1_HIGH);
            status |= STATUS_FEATURES_OK;
            mmio.w32(REG_STATUS, status);
            if mmio.r32(REG_STATUS) & STATUS_FEATURES_OK == 0 {
                return Err("device refused the features");
            }
        } else {
            mmio.w32(REG_LEGACY_GUEST_PAGE_SIZE, PAGE as u32);
        }
        mmio.w32(REG_QUEUE_SEL, 0);
        let max = mmio.r32(REG_QUEUE_NUM_MAX);
        if max < 3 {
            return Err("queue 0 too small or absent");
        }
        let qsize = QSIZE.min(max.min(u16::MAX as u32) as u16);
        // SAFETY: only this CPU touches the rings, before the device is told about them.
        unsafe { (&raw mut RINGS).write_bytes(0, 1) };
        mmio.w32(REG_QUEUE_NUM, qsize as u32);
        let rings = Self::rings();
        if version == 2 {
            let (desc, avail, used) = (rings, rings + 16 * qsize as u64, rings + PAGE);
            for (reg, addr) in [
                (REG_QUEUE_DESC, desc),
                (REG_QUEUE_DRIVER, avail),
                (REG_QUEUE_DEVICE, used),
            ] {
                mmio.w32(reg, addr as u32);
                mmio.w32(reg + 4, (addr >> 32) as u32);
            }
            mmio.w32(REG_QUEUE_READY, 1);
        } else {
            mmio.w32(REG_LEGACY_QUEUE_ALIGN, PAGE as u32);
            mmio.w32(REG_LEGACY_QUEUE_PFN, (rings / PAGE) as u32);
        }
        mmio.w32(REG_STATUS, status | STATUS_DRIVER_OK);
        Ok(Blk {
            mmio,
            qsize,
            used_seen: 0,
            avail_idx: 0,
            flush,
            timeout_ticks,
        })
    }

    fn capacity(&self) -> u64 {
        self.mmio.r32(REG_CONFIG) as u64 | (self.mmio.r32(REG_CONFIG + 4) as u64) << 32
    }

    /// Runs one request (header, optional data, status) and waits for the device to complete it.
    fn request(&mut self, kind: u32, sector: u64, data_len: usize) -> Result<(), &'static str> {
        let rings = Self::rings();
        let header = &raw mut HEADER as u64;
        let data = &raw mut DATA as u64;
        let qsize = self.qsize as u64;
        // SAFETY: one request in flight; the device reads these only after the notify below, and
        // the header, data and ring memory are identity-mapped statics owned by this driver.
        unsafe {
            let h = header as *mut u8;
            (h as *mut u32).write_volatile(kind);
            (h.add(4) as *mut u32).write_volatile(0);
            (h.add(8) as *mut u64).write_volatile(sector);
            h.add(16).write_volatile(0xff);
            let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
                let d = (rings + 16 * i) as *mut u8;
                (d as *mut u64).write_volatile(addr);
                (d.add(8) as *mut u32).write_volatile(len);
                (d.add(12) as *mut u16).write_volatile(flags);
                (d.add(14) as *mut u16).write_volatile(next);
            };
            if data_len > 0 {
                desc(0, header, 16, DESC_F_NEXT, 1);
                let wflag = if kind == BLK_T_IN { DESC_F_WRITE } else { 0 };
                desc(1, data, data_len as u32, wflag | DESC_F_NEXT, 2);
                desc(2, header + 16, 1, DESC_F_WRITE, 0);
            } else {
                desc(0, header, 16, DESC_F_NEXT, 1);
                desc(1, header + 16, 1, DESC_F_WRITE, 0);
            }
            let avail = rings + 16 * qsize;
            let slot = (self.avail_idx as u64) % qsize;
            ((avail + 4 + 2 * slot) as *mut u16).write_volatile(0);
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            ((avail + 2) as *mut u16).write_volatile(self.avail_idx);
            fence(Ordering::SeqCst);
        }
        self.mmio.w32(REG_QUEUE_NOTIFY, 0);
        let used_idx = (rings + PAGE + 2) as *const u16;
        let start = rdtsc();
        loop {
            // SAFETY: the used ring index is written by the device; read it volatile.
            let idx = unsafe { used_idx.read_volatile() };
            if idx != self.used_seen {
                self.used_seen = idx;
                break;
            }
            if rdtsc() - start > self.timeout_ticks {
                return Err("request timed out");
            }
            core::hint::spin_loop();
        }
        fence(Ordering::SeqCst);
        let isr = self.mmio.r32(REG_INTERRUPT_STATUS);
        self.mmio.w32(REG_INTERRUPT_ACK, isr);
        // SAFETY: the device has completed the request and written the status byte.
        let status = unsafe { ((header + 16) as *const u8).read_volatile() };
        match status {
            0 => Ok(()),
            1 => Err("device reported an I/O error"),
            2 => Err("device reported an unsupported request"),
            _ => Err("device did not write a status"),
        }
    }
}

fn data_buf() -> &'static mut [u8; CHUNK_SECTORS * SECTOR] {
    // SAFETY: only the boot CPU runs the check, and no request is in flight while this is used.
    unsafe { &mut *(&raw mut DATA).cast::<[u8; CHUNK_SECTORS * SECTOR]>() }
}

/// The outcome of the check, as printed on the console.
pub enum Outcome {
    Ok { sectors: u64 },
    Fail(FailReason),
}

/// A failure and where it happened.
pub struct FailReason {
    pub what: &'static str,
    pub sector: Option<u64>,
}

impl core::fmt::Display for FailReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.what)?;
        if let Some(s) = self.sector {
            write!(f, " at sector {s}")?;
        }
        Ok(())
    }
}

fn fail(what: &'static str, sector: Option<u64>) -> Outcome {
    Outcome::Fail(FailReason { what, sector })
}

/// Finds the virtio-blk device (highest slot first) and checks it: write the pattern over the first
/// `VERIFY_SECTORS` sectors, flush, read back and compare. Prints a `BLK device …` line on the way.
pub fn blk_verify(tsc_khz: u64) -> Outcome {
    let Some((slot, mmio)) = find_blk() else {
        return fail("no virtio-blk device", None);
    };
    let version = mmio.r32(REG_VERSION);
    if version != 1 && version != 2 {
        return fail("unknown virtio-mmio version", None);
    }
    let mut blk = match Blk::setup(mmio, version, tsc_khz * 5000) {
        Ok(b) => b,
        Err(e) => return fail(e, None),
    };
    let capacity = blk.capacity();
    crate::println!(
        "BLK device slot={slot} addr={:#x} version={version} capacity={capacity} flush={}",
        mmio.base,
        blk.flush as u8
    );
    let sectors = capacity.min(VERIFY_SECTORS);
    if sectors == 0 {
        return fail("disk is empty", None);
    }
    let mut s = 0;
    while s < sectors {
        let n = (sectors - s).min(CHUNK_SECTORS as u64);
        let buf = data_buf();
        for k in 0..n {
            for i in 0..SECTOR {
                buf[k as usize * SECTOR + i] = pattern_byte(s + k, i);
            }
        }
        if let Err(e) = blk.request(BLK_T_OUT, s, n as usize * SECTOR) {
            return fail(e, Some(s));
        }
        s += n;
    }
    if blk.flush
        && let Err(e) = blk.request(BLK_T_FLUSH, 0, 0)
    {
        return fail(e, None);
    }
    s = 0;
    while s < sectors {
        let n = (sectors - s).min(CHUNK_SECTORS as u64);
        data_buf().fill(0);
        if let Err(e) = blk.request(BLK_T_IN, s, n as usize * SECTOR) {
            return fail(e, Some(s));
        }
        let buf = data_buf();
        for k in 0..n {
            for i in 0..SECTOR {
                if buf[k as usize * SECTOR + i] != pattern_byte(s + k, i) {
                    return fail("read back differs", Some(s + k));
                }
            }
        }
        s += n;
    }
    Outcome::Ok { sectors }
}

//! The virtio-blk check over the shared virtio-mmio transport (`virtio_mmio`): drive one request at
//! a time through a polled queue, write a pattern, flush, read it back.

use core::sync::atomic::{Ordering, fence};

use crate::sys::rdtsc;
use crate::virtio_mmio::{
    Mmio, REG_CONFIG, REG_INTERRUPT_ACK, REG_INTERRUPT_STATUS, REG_QUEUE_NOTIFY, REG_VERSION,
};

const DEVICE_BLK: u32 = 2;

const BLK_F_RO: u32 = 1 << 5;
const BLK_F_FLUSH: u32 = 1 << 9;

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
        let mut flush = false;
        let status = mmio.negotiate(version, |low| {
            if low & BLK_F_RO != 0 {
                return Err("device is read-only");
            }
            flush = low & BLK_F_FLUSH != 0;
            Ok(low & BLK_F_FLUSH)
        })?;
        let max = mmio.queue_max(0);
        if max < 3 {
            return Err("queue 0 too small or absent");
        }
        let qsize = QSIZE.min(max.min(u16::MAX as u32) as u16);
        // SAFETY: only this CPU touches the rings, before the device is told about them.
        unsafe { (&raw mut RINGS).write_bytes(0, 1) };
        mmio.setup_queue(version, 0, qsize, Self::rings());
        mmio.driver_ok(status);
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
    let Some((slot, mmio)) = Mmio::find(DEVICE_BLK) else {
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
        mmio.base(),
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

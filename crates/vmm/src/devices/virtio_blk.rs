//! A virtio block device over a [`BlockBackend`] (a raw image file, or a registered kind such as
//! a volume file), behind the virtio-mmio (version 2) transport of [`super::virtio_mmio`].
//!
//! Requests are served
//! synchronously on the vCPU thread that writes QueueNotify: reads and writes through the backend
//! (`pread`/`pwrite` for a raw file), a flush through its `flush` (`fdatasync`), so an acknowledged
//! flush means the data reached stable storage.
//! Every descriptor the guest gives is bounds-checked: a malformed chain fails that request, it
//! never panics the VMM. Its saved state: [`persist`].

pub mod persist;

use std::fs::File;
use std::path::Path;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::block_backend::{self, BlockBackend, RawFile};
use super::virtio_mmio::{Event, STATUS_FAILED, Transport};

/// Device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Sector size.
pub const SECTOR_SIZE: u64 = 512;
/// The largest data transfer one request may make (bounds the VMM's buffer).
pub const MAX_REQUEST_BYTES: u32 = 4 << 20;
/// The most ranges one DISCARD request may carry (`max_discard_seg`).
pub const MAX_DISCARD_SEGMENTS: u32 = 16;
/// The most sectors one DISCARD range may cover (`max_discard_sectors`: 1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// The most ranges one WRITE_ZEROES request may carry (`max_write_zeroes_seg`).
pub const MAX_WRITE_ZEROES_SEGMENTS: u32 = 16;
/// The most sectors one WRITE_ZEROES range may cover (`max_write_zeroes_sectors`: 64 MiB, so a
/// backend that has to write real zeroes holds the vCPU for a bounded time).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 17;
/// The granularity the guest should align discards to (`discard_sector_alignment`: 4 KiB).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// Bytes of one DISCARD / WRITE_ZEROES range: sector (u64), sectors (u32), flags (u32).
const SEGMENT_BYTES: u32 = 16;
/// The WRITE_ZEROES range flag "the device may free the range".
const SEGMENT_FLAG_UNMAP: u32 = 1;
/// Bytes of the config space this device fills (up to `write_zeroes_may_unmap`).
const CONFIG_BYTES: usize = 0x3c;

/// VIRTIO_BLK_F_RO.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_FLUSH.
pub const F_FLUSH: u64 = 1 << 9;
/// VIRTIO_BLK_F_DISCARD.
pub const F_DISCARD: u64 = 1 << 13;
/// VIRTIO_BLK_F_WRITE_ZEROES.
pub const F_WRITE_ZEROES: u64 = 1 << 14;
/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
/// Request status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockOpenError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A backend registered for a `SCHEME://` spec refused to open.
    #[error("cannot open disk {spec}: {message}")]
    Backend {
        /// The disk spec.
        spec: String,
        /// The backend's one-line reason.
        message: String,
    },
}

/// Counters of served requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlkCounters {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Discard requests.
    pub discards: u64,
    /// Write-zeroes requests.
    pub write_zeroes: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// A virtio-blk device over a block backend.
#[derive(Debug)]
pub struct VirtioBlk {
    backend: Box<dyn BlockBackend>,
    readonly: bool,
    capacity_sectors: u64,
    irq: EventFd,
    transport: Transport<1>,
    counters: BlkCounters,
}

impl VirtioBlk {
    /// Opens `path` (read-only if asked) as a block device that interrupts through `irq`.
    /// A `SCHEME://…` spec goes to the backend registered for the scheme.
    pub fn open(path: &Path, readonly: bool, irq: EventFd) -> Result<Self, BlockOpenError> {
        if block_backend::split_scheme(&path.to_string_lossy()).is_some() {
            let backend =
                block_backend::open(path, readonly).map_err(|message| BlockOpenError::Backend {
                    spec: path.display().to_string(),
                    message,
                })?;
            return Ok(Self::from_backend(backend, irq));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| BlockOpenError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| BlockOpenError::Open {
                path: path.display().to_string(),
                source,
            })?
            .len();
        Ok(Self::from_file(file, len / SECTOR_SIZE, readonly, irq))
    }

    fn from_file(file: File, capacity_sectors: u64, readonly: bool, irq: EventFd) -> Self {
        let raw = RawFile::from_file(file, capacity_sectors * SECTOR_SIZE, readonly);
        Self::from_backend(Box::new(raw), irq)
    }

    /// A device over `backend` (its size, rounded down to whole sectors, is the capacity).
    pub fn from_backend(backend: Box<dyn BlockBackend>, irq: EventFd) -> Self {
        let readonly = backend.read_only();
        VirtioBlk {
            readonly,
            capacity_sectors: backend.len() / SECTOR_SIZE,
            backend,
            irq,
            // The driver's feature bits are kept as written (not masked by the offer).
            transport: Transport::new(VIRTIO_ID_BLOCK, Self::features(readonly), QUEUE_SIZE, false),
            counters: BlkCounters::default(),
        }
    }

    /// The features this device offers.
    pub fn device_features(&self) -> u64 {
        Self::features(self.readonly)
    }

    fn features(readonly: bool) -> u64 {
        F_VERSION_1
            | F_FLUSH
            | if readonly {
                F_RO
            } else {
                F_DISCARD | F_WRITE_ZEROES
            }
    }

    /// The config space (virtio 1.2, 5.2.4): capacity, then the discard and write-zeroes limits.
    fn config(&self) -> [u8; CONFIG_BYTES] {
        let mut c = [0u8; CONFIG_BYTES];
        c[0x00..0x08].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        let mut put = |at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(0x24, MAX_DISCARD_SECTORS);
        put(0x28, MAX_DISCARD_SEGMENTS);
        put(0x2c, DISCARD_SECTOR_ALIGNMENT);
        put(0x30, MAX_WRITE_ZEROES_SECTORS);
        put(0x34, MAX_WRITE_ZEROES_SEGMENTS);
        // write_zeroes_may_unmap: an unmapping WRITE_ZEROES frees the range.
        c[0x38] = 1;
        c
    }

    /// The storage behind the device (the migration path calls its hand-over hooks).
    pub fn backend(&self) -> &dyn BlockBackend {
        self.backend.as_ref()
    }

    /// Request counters.
    pub fn counters(&self) -> BlkCounters {
        self.counters
    }

    /// The capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// A guest read of `data.len()` bytes at `offset` in the slot.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        self.transport.read(offset, data, &config);
    }

    /// A guest write of `data` at `offset` in the slot; a queue notification serves the queue
    /// against `mem`. The block config space is read-only here.
    pub fn write<M: GuestMemoryBackend>(&mut self, mem: &M, offset: u64, data: &[u8]) {
        if self.transport.write(offset, data) == Event::Notify(0) {
            self.process_queue(mem);
        }
    }

    /// Serves every available request and interrupts the guest if it asked to be told.
    pub fn process_queue<M: GuestMemoryBackend>(&mut self, mem: &M) {
        if !self.transport.queues[0].ready() || !self.transport.queues[0].is_valid(mem) {
            return;
        }
        let mut served = false;
        while let Some(chain) = self.transport.queues[0].pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<(GuestAddress, u32, bool)> = chain
                .take(usize::from(QUEUE_SIZE))
                .map(|d| (d.addr(), d.len(), d.is_write_only()))
                .collect();
            let used = self.serve(mem, &descs);
            if self.transport.queues[0].add_used(mem, head, used).is_err() {
                self.transport.status |= STATUS_FAILED;
                return;
            }
            served = true;
        }
        if served
            && self.transport.queues[0]
                .needs_notification(mem)
                .unwrap_or(true)
        {
            self.transport.interrupt_status |= 1;
            let _ = self.irq.write(1);
        }
    }

    /// Serves one request; returns the number of bytes written into the guest's buffers.
    fn serve<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        descs: &[(GuestAddress, u32, bool)],
    ) -> u32 {
        // header (readable, 16 bytes) + data... + status (writable, >= 1 byte)
        let Some((&(status_addr, status_len, status_w), rest)) = descs.split_last() else {
            return 0;
        };
        if !status_w || status_len < 1 || rest.is_empty() {
            self.counters.errors += 1;
            return 0;
        }
        let (hdr_addr, hdr_len, hdr_w) = rest[0];
        let data = &rest[1..];
        let mut hdr = [0u8; 16];
        if hdr_w || hdr_len < 16 || mem.read_slice(&mut hdr, hdr_addr).is_err() {
            self.counters.errors += 1;
            let _ = mem.write_obj(S_IOERR, status_addr);
            return 1;
        }
        let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        let (status, written) = match kind {
            T_IN => {
                self.counters.reads += 1;
                self.transfer(mem, sector, data, true)
            }
            T_OUT => {
                self.counters.writes += 1;
                if self.readonly {
                    (S_IOERR, 0)
                } else {
                    self.transfer(mem, sector, data, false)
                }
            }
            T_FLUSH => {
                self.counters.flushes += 1;
                match self.backend.flush() {
                    Ok(()) => (S_OK, 0),
                    Err(_) => (S_IOERR, 0),
                }
            }
            T_GET_ID => {
                let mut id = [0u8; 20];
                id[..8].copy_from_slice(b"tern-blk");
                match data.first() {
                    Some(&(a, l, true)) if l >= 1 => {
                        let n = (l as usize).min(20);
                        match mem.write_slice(&id[..n], a) {
                            Ok(()) => (S_OK, n as u32),
                            Err(_) => (S_IOERR, 0),
                        }
                    }
                    _ => (S_IOERR, 0),
                }
            }
            T_DISCARD | T_WRITE_ZEROES => {
                let zero = kind == T_WRITE_ZEROES;
                if zero {
                    self.counters.write_zeroes += 1;
                } else {
                    self.counters.discards += 1;
                }
                (self.free_ranges(mem, data, zero), 0)
            }
            _ => (S_UNSUPP, 0),
        };
        if status != S_OK {
            self.counters.errors += 1;
        }
        if mem.write_obj(status, status_addr).is_err() {
            return written;
        }
        written + 1
    }

    /// Moves data between the image and the guest's buffers; `to_guest` for reads.
    fn transfer<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        sector: u64,
        data: &[(GuestAddress, u32, bool)],
        to_guest: bool,
    ) -> (u8, u32) {
        let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
        if total > u64::from(MAX_REQUEST_BYTES)
            || !total.is_multiple_of(SECTOR_SIZE)
            || data.iter().any(|d| d.2 != to_guest)
        {
            return (S_IOERR, 0);
        }
        let Some(end) = sector.checked_add(total / SECTOR_SIZE) else {
            return (S_IOERR, 0);
        };
        if end > self.capacity_sectors {
            return (S_IOERR, 0);
        }
        let mut offset = sector * SECTOR_SIZE;
        let mut written = 0u32;
        for &(addr, len, _) in data {
            let mut buf = vec![0u8; len as usize];
            let ok = if to_guest {
                self.backend.read_at(&mut buf, offset).is_ok()
                    && mem.write_slice(&buf, addr).is_ok()
            } else {
                mem.read_slice(&mut buf, addr).is_ok()
                    && self.backend.write_at(&buf, offset).is_ok()
            };
            if !ok {
                return (S_IOERR, written);
            }
            if to_guest {
                written += len;
            }
            offset += u64::from(len);
        }
        (S_OK, written)
    }

    /// Serves a DISCARD (`zero` false) or WRITE_ZEROES request: reads its ranges, checks every
    /// one (flags, size, bounds) before the first reaches the backend, then frees or zeroes
    /// them in order. Returns the status byte.
    fn free_ranges<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        data: &[(GuestAddress, u32, bool)],
        zero: bool,
    ) -> u8 {
        let (feature, max_segments, max_sectors) = if zero {
            (
                F_WRITE_ZEROES,
                MAX_WRITE_ZEROES_SEGMENTS,
                MAX_WRITE_ZEROES_SECTORS,
            )
        } else {
            (F_DISCARD, MAX_DISCARD_SEGMENTS, MAX_DISCARD_SECTORS)
        };
        if self.transport.driver_features & feature == 0 {
            return S_UNSUPP;
        }
        if self.readonly {
            return S_IOERR;
        }
        let ranges = match read_segments(mem, data, max_segments) {
            Ok(r) => r,
            Err(status) => return status,
        };
        for r in &ranges {
            let known = if zero { SEGMENT_FLAG_UNMAP } else { 0 };
            if r.flags & !known != 0 || r.sectors > max_sectors {
                return S_UNSUPP;
            }
            match r.sector.checked_add(u64::from(r.sectors)) {
                Some(end) if end <= self.capacity_sectors => {}
                _ => return S_IOERR,
            }
        }
        for r in &ranges {
            let (offset, len) = (r.sector * SECTOR_SIZE, u64::from(r.sectors) * SECTOR_SIZE);
            let done = if zero {
                self.backend
                    .write_zeroes(offset, len, r.flags & SEGMENT_FLAG_UNMAP != 0)
            } else {
                self.backend.discard(offset, len)
            };
            if done.is_err() {
                return S_IOERR;
            }
        }
        S_OK
    }
}

/// One range of a DISCARD or WRITE_ZEROES request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    sector: u64,
    sectors: u32,
    flags: u32,
}

/// Reads the ranges of a DISCARD / WRITE_ZEROES request from its data descriptors (all
/// device-readable, a whole number of 16-byte ranges, 1 to `max` of them); the error is the
/// status byte to answer.
fn read_segments<M: GuestMemoryBackend>(
    mem: &M,
    data: &[(GuestAddress, u32, bool)],
    max: u32,
) -> Result<Vec<Segment>, u8> {
    if data.iter().any(|d| d.2) {
        return Err(S_IOERR);
    }
    let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
    if total == 0 || !total.is_multiple_of(u64::from(SEGMENT_BYTES)) {
        return Err(S_IOERR);
    }
    if total / u64::from(SEGMENT_BYTES) > u64::from(max) {
        return Err(S_UNSUPP);
    }
    // At most `max` × 16 bytes: bounded before the allocation.
    let mut bytes = Vec::with_capacity(total as usize);
    for &(addr, len, _) in data {
        let start = bytes.len();
        bytes.resize(start + len as usize, 0);
        if mem.read_slice(&mut bytes[start..], addr).is_err() {
            return Err(S_IOERR);
        }
    }
    Ok(bytes
        .chunks_exact(SEGMENT_BYTES as usize)
        .map(|c| {
            let mut w8 = [0u8; 8];
            w8.copy_from_slice(&c[0..8]);
            let mut w4 = [0u8; 4];
            w4.copy_from_slice(&c[8..12]);
            let sectors = u32::from_le_bytes(w4);
            w4.copy_from_slice(&c[12..16]);
            Segment {
                sector: u64::from_le_bytes(w8),
                sectors,
                flags: u32::from_le_bytes(w4),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::virtio_mmio::{MMIO_MAGIC, reg};
    use super::*;
    use crate::persist::Persist;
    use std::io::{Read, Seek, SeekFrom, Write};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const WRITE: u16 = 2; // VRING_DESC_F_WRITE

    struct Rig {
        mem: GuestMemoryMmap,
        dev: VirtioBlk,
        file: File,
        irq: EventFd,
        /// The low feature bits the driver acknowledges.
        ack: u64,
    }

    fn rig(readonly: bool) -> Rig {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![0u8; 64 * 512]).unwrap();
        file.sync_all().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = VirtioBlk::from_file(
            file.try_clone().unwrap(),
            64,
            readonly,
            irq.try_clone().unwrap(),
        );
        file.seek(SeekFrom::Start(0)).unwrap();
        Rig {
            mem,
            dev,
            file,
            irq,
            ack: F_FLUSH | F_DISCARD | F_WRITE_ZEROES,
        }
    }

    fn w32(r: &mut Rig, off: u64, v: u32) {
        let mem = r.mem.clone();
        r.dev.write(&mem, off, &v.to_le_bytes());
    }

    fn r32(r: &mut Rig, off: u64) -> u32 {
        let mut b = [0u8; 4];
        r.dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Drives the transport the way a driver does: features, queue addresses, DRIVER_OK.
    fn activate<'a>(r: &mut Rig, q: &MockSplitQueue<'a, GuestMemoryMmap>) {
        assert_eq!(r32(r, reg::MAGIC), MMIO_MAGIC);
        assert_eq!(r32(r, reg::VERSION), 2);
        assert_eq!(r32(r, reg::DEVICE_ID), 2);
        w32(r, reg::STATUS, 1 | 2);
        w32(r, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r32(r, reg::DEVICE_FEATURES), 1, "VERSION_1");
        w32(r, reg::DRIVER_FEATURES_SEL, 1);
        w32(r, reg::DRIVER_FEATURES, 1);
        w32(r, reg::DRIVER_FEATURES_SEL, 0);
        w32(r, reg::DRIVER_FEATURES, r.ack as u32);
        w32(r, reg::STATUS, 1 | 2 | 8);
        w32(r, reg::QUEUE_SEL, 0);
        assert_eq!(r32(r, reg::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
        w32(r, reg::QUEUE_NUM, 16);
        w32(r, reg::QUEUE_DESC_LOW, q.desc_table_addr().0 as u32);
        w32(r, reg::QUEUE_DESC_HIGH, 0);
        w32(r, reg::QUEUE_DRIVER_LOW, q.avail_addr().0 as u32);
        w32(r, reg::QUEUE_DRIVER_HIGH, 0);
        w32(r, reg::QUEUE_DEVICE_LOW, q.used_addr().0 as u32);
        w32(r, reg::QUEUE_DEVICE_HIGH, 0);
        w32(r, reg::QUEUE_READY, 1);
        w32(r, reg::STATUS, 1 | 2 | 8 | 4);
    }

    const HDR: u64 = 0x8000;
    const STATUS: u64 = 0xa000;
    // Past HDR, STATUS and SEGS by more than the largest transfer (64 sectors), so writing a
    // request's header or status never changes the data it carries.
    const DATA: u64 = 0x10000;

    fn request(
        r: &Rig,
        q: &MockSplitQueue<'_, GuestMemoryMmap>,
        kind: u32,
        sector: u64,
        data: Option<(u32, bool)>,
        slot: u16,
    ) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        r.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut descs = vec![RawDescriptor::from(SplitDescriptor::new(
            HDR,
            16,
            1,
            slot + 1,
        ))];
        let mut next = slot + 1;
        if let Some((len, write)) = data {
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                DATA,
                len,
                1 | if write { WRITE } else { 0 },
                next + 1,
            )));
            next += 1;
        }
        let _ = next;
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            STATUS, 1, WRITE, 0,
        )));
        q.add_desc_chains(&descs, slot).unwrap();
    }

    fn used_idx(r: &Rig, q: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        r.mem
            .read_obj::<u16>(q.used_addr().unchecked_add(2))
            .unwrap()
    }

    use vm_memory::Address;

    const SEGS: u64 = 0xb000;

    /// Queues a DISCARD or WRITE_ZEROES request whose ranges (sector, sectors, flags) sit in
    /// one device-readable descriptor.
    fn free_request(
        r: &Rig,
        q: &MockSplitQueue<'_, GuestMemoryMmap>,
        kind: u32,
        ranges: &[(u64, u32, u32)],
        slot: u16,
    ) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        r.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut bytes = Vec::new();
        for &(sector, sectors, flags) in ranges {
            bytes.extend_from_slice(&sector.to_le_bytes());
            bytes.extend_from_slice(&sectors.to_le_bytes());
            bytes.extend_from_slice(&flags.to_le_bytes());
        }
        r.mem.write_slice(&bytes, GuestAddress(SEGS)).unwrap();
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, 1, slot + 1)),
            RawDescriptor::from(SplitDescriptor::new(SEGS, bytes.len() as u32, 1, slot + 2)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, WRITE, 0)),
        ];
        q.add_desc_chains(&descs, slot).unwrap();
    }

    fn status_of(r: &mut Rig) -> u8 {
        w32(r, reg::QUEUE_NOTIFY, 0);
        r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap()
    }

    fn image(r: &mut Rig) -> Vec<u8> {
        let mut all = vec![0u8; 64 * 512];
        r.file.seek(SeekFrom::Start(0)).unwrap();
        r.file.read_exact(&mut all).unwrap();
        all
    }

    fn allocated(f: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn config_space_offers_discard_and_write_zeroes_limits() {
        let mut r = rig(false);
        w32(&mut r, reg::DEVICE_FEATURES_SEL, 0);
        let f = u64::from(r32(&mut r, reg::DEVICE_FEATURES));
        assert_eq!(f & (F_DISCARD | F_WRITE_ZEROES), F_DISCARD | F_WRITE_ZEROES);
        let cfg = |r: &mut Rig, at: u64| r32(r, reg::CONFIG + at);
        assert_eq!(cfg(&mut r, 0x24), MAX_DISCARD_SECTORS);
        assert_eq!(cfg(&mut r, 0x28), MAX_DISCARD_SEGMENTS);
        assert_eq!(cfg(&mut r, 0x2c), DISCARD_SECTOR_ALIGNMENT);
        assert_eq!(cfg(&mut r, 0x30), MAX_WRITE_ZEROES_SECTORS);
        assert_eq!(cfg(&mut r, 0x34), MAX_WRITE_ZEROES_SEGMENTS);
        assert_eq!(cfg(&mut r, 0x38) & 0xff, 1, "write_zeroes_may_unmap");
        let mut ro = rig(true);
        w32(&mut ro, reg::DEVICE_FEATURES_SEL, 0);
        let f = u64::from(r32(&mut ro, reg::DEVICE_FEATURES));
        assert_eq!(
            f & (F_DISCARD | F_WRITE_ZEROES),
            0,
            "not on a read-only disk"
        );
    }

    #[test]
    fn a_guest_discard_and_write_zeroes_free_the_image_blocks() {
        let mut r = rig(false);
        let mem = r.mem.clone();
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        activate(&mut r, &q);
        // Fill the whole disk through the guest path, durably.
        mem.write_slice(&[0xa5u8; 64 * 512], GuestAddress(DATA))
            .unwrap();
        request(&r, &q, T_OUT, 0, Some((64 * 512, false)), 0);
        assert_eq!(status_of(&mut r), S_OK);
        r.file.sync_all().unwrap();
        let full = allocated(&r.file);
        assert!(full >= 64 * 512);

        // Discard sectors 8..24 (8 KiB, 4 KiB-aligned).
        free_request(&r, &q, T_DISCARD, &[(8, 16, 0)], 3);
        assert_eq!(status_of(&mut r), S_OK);
        let after = allocated(&r.file);
        assert!(
            after <= full - 8192,
            "discarded blocks are holes: {full} -> {after}"
        );
        // Write zeroes (unmap) over 32..40 and (no unmap) over 48..50, in one request.
        free_request(
            &r,
            &q,
            T_WRITE_ZEROES,
            &[(32, 8, SEGMENT_FLAG_UNMAP), (48, 2, 0)],
            6,
        );
        assert_eq!(status_of(&mut r), S_OK);
        assert!(
            allocated(&r.file) <= after - 4096,
            "the unmapped range is a hole"
        );
        let img = image(&mut r);
        for (i, sector) in img.chunks(512).enumerate() {
            let zero = (8..24).contains(&i) || (32..40).contains(&i) || (48..50).contains(&i);
            let want = if zero { 0 } else { 0xa5 };
            assert!(sector.iter().all(|&b| b == want), "sector {i}");
        }
        let c = r.dev.counters();
        assert_eq!((c.discards, c.write_zeroes, c.errors), (1, 1, 0));
        assert_eq!(used_idx(&r, &q), 3);
    }

    #[test]
    fn malformed_discards_fail_before_any_range_is_freed() {
        let mut r = rig(false);
        let mem = r.mem.clone();
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        activate(&mut r, &q);
        mem.write_slice(&[0x3cu8; 64 * 512], GuestAddress(DATA))
            .unwrap();
        request(&r, &q, T_OUT, 0, Some((64 * 512, false)), 0);
        assert_eq!(status_of(&mut r), S_OK);
        let before = image(&mut r);
        let mut slot = 3;
        let mut check = |r: &mut Rig, kind, ranges: &[(u64, u32, u32)], want: u8, what: &str| {
            free_request(r, &q, kind, ranges, slot);
            slot = (slot + 3) % 15; // each chain is used before its descriptors are reused
            assert_eq!(status_of(r), want, "{what}");
            assert_eq!(image(r), before, "{what}: the image is untouched");
        };
        // A good first range, then one past the end: nothing is freed.
        check(
            &mut r,
            T_DISCARD,
            &[(0, 8, 0), (60, 8, 0)],
            S_IOERR,
            "past the end",
        );
        check(
            &mut r,
            T_DISCARD,
            &[(0, 8, 0), (u64::MAX, 1, 0)],
            S_IOERR,
            "overflow",
        );
        check(
            &mut r,
            T_DISCARD,
            &[(0, 8, SEGMENT_FLAG_UNMAP)],
            S_UNSUPP,
            "unmap on discard",
        );
        check(
            &mut r,
            T_WRITE_ZEROES,
            &[(0, 8, 4)],
            S_UNSUPP,
            "unknown flag",
        );
        check(
            &mut r,
            T_WRITE_ZEROES,
            &[(0, MAX_WRITE_ZEROES_SECTORS + 1, 0)],
            S_UNSUPP,
            "range too long",
        );
        let many = vec![(0u64, 1u32, 0u32); MAX_DISCARD_SEGMENTS as usize + 1];
        check(&mut r, T_DISCARD, &many, S_UNSUPP, "too many ranges");
        check(&mut r, T_DISCARD, &[], S_IOERR, "no range");
        // A range split over a partial descriptor (not a multiple of 16 bytes).
        r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, 1, 1)),
            RawDescriptor::from(SplitDescriptor::new(SEGS, 12, 1, 2)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, WRITE, 0)),
        ];
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&T_DISCARD.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        q.add_desc_chains(&descs, 0).unwrap();
        assert_eq!(status_of(&mut r), S_IOERR, "a torn range");
        assert_eq!(image(&mut r), before);
    }

    #[test]
    fn discard_needs_the_feature_negotiated_and_a_writable_disk() {
        let mut r = rig(false);
        r.ack = F_FLUSH;
        let mem = r.mem.clone();
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        activate(&mut r, &q);
        free_request(&r, &q, T_DISCARD, &[(0, 8, 0)], 0);
        assert_eq!(status_of(&mut r), S_UNSUPP, "not negotiated");

        let mut ro = rig(true);
        let mem = ro.mem.clone();
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        activate(&mut ro, &q);
        free_request(&ro, &q, T_WRITE_ZEROES, &[(0, 8, 0)], 0);
        assert_eq!(status_of(&mut ro), S_IOERR, "read-only");
    }

    #[test]
    fn write_flush_read_round_trip_through_the_image() {
        let mut r = rig(false);
        let mem = r.mem.clone();
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        activate(&mut r, &q);

        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        request(&r, &q, T_OUT, 4, Some((1024, false)), 0);
        w32(&mut r, reg::QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        assert_eq!(used_idx(&r, &q), 1);
        assert!(r.irq.read().unwrap() >= 1, "the guest was interrupted");
        assert_eq!(r32(&mut r, reg::INTERRUPT_STATUS), 1);
        w32(&mut r, reg::INTERRUPT_ACK, 1);
        assert_eq!(r32(&mut r, reg::INTERRUPT_STATUS), 0);

        // The image holds the pattern at sector 4.
        let mut on_disk = vec![0u8; 1024];
        r.file.seek(SeekFrom::Start(4 * 512)).unwrap();
        r.file.read_exact(&mut on_disk).unwrap();
        assert_eq!(on_disk, pattern);

        request(&r, &q, T_FLUSH, 0, None, 3);
        w32(&mut r, reg::QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);

        mem.write_slice(&vec![0u8; 1024], GuestAddress(DATA))
            .unwrap();
        request(&r, &q, T_IN, 4, Some((1024, true)), 6);
        w32(&mut r, reg::QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
        assert_eq!(used_idx(&r, &q), 3);
        let c = r.dev.counters();
        assert_eq!((c.reads, c.writes, c.flushes, c.errors), (1, 1, 1, 0));
        // The used length of the read counts the data and the status byte.
        let used_len: u32 = mem
            .read_obj(q.used_addr().unchecked_add(4 + 2 * 8 + 4))
            .unwrap();
        assert_eq!(used_len, 1025);
    }

    #[test]
    fn a_readonly_disk_refuses_writes_and_says_so_in_features() {
        let mut r = rig(true);
        let mem = r.mem.clone();
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        w32(&mut r, reg::DEVICE_FEATURES_SEL, 0);
        assert_ne!(u64::from(r32(&mut r, reg::DEVICE_FEATURES)) & F_RO, 0);
        activate(&mut r, &q);
        mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
        request(&r, &q, T_OUT, 0, Some((512, false)), 0);
        w32(&mut r, reg::QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
        let mut on_disk = vec![0u8; 512];
        r.file.read_exact(&mut on_disk).unwrap();
        assert!(on_disk.iter().all(|b| *b == 0), "image untouched");
    }

    #[test]
    fn requests_beyond_the_capacity_fail_without_touching_the_image() {
        let mut r = rig(false);
        let mem = r.mem.clone();
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        activate(&mut r, &q);
        request(&r, &q, T_OUT, 63, Some((1024, false)), 0);
        w32(&mut r, reg::QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
        request(&r, &q, T_IN, u64::MAX, Some((512, true)), 3);
        w32(&mut r, reg::QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
        request(&r, &q, 99, 0, None, 6);
        w32(&mut r, reg::QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_UNSUPP);
        assert_eq!(used_idx(&r, &q), 3);
    }

    #[test]
    fn config_space_reports_the_capacity_in_sectors() {
        let mut r = rig(false);
        let mut b = [0u8; 8];
        r.dev.read(reg::CONFIG, &mut b);
        assert_eq!(u64::from_le_bytes(b), 64);
    }

    #[test]
    fn notifications_before_driver_ok_are_ignored() {
        let mut r = rig(false);
        let mem = r.mem.clone();
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        request(&r, &q, T_FLUSH, 0, None, 0);
        w32(&mut r, reg::QUEUE_NOTIFY, 0);
        assert_eq!(used_idx(&r, &q), 0);
    }

    #[test]
    fn state_round_trips_into_a_fresh_device() {
        let mut r = rig(false);
        let mem = r.mem.clone();
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        activate(&mut r, &q);
        request(&r, &q, T_FLUSH, 0, None, 0);
        w32(&mut r, reg::QUEUE_NOTIFY, 0);
        let s = r.dev.save();
        assert_eq!(s.queue.next_avail, 1);
        let mut other = rig(false);
        other.dev.restore(&s).unwrap();
        assert_eq!(other.dev.save(), s);
    }

    #[test]
    fn a_state_of_another_disk_or_a_broken_queue_is_refused_and_changes_nothing() {
        use persist::VirtioBlkStateError as E;
        let mut r = rig(false);
        let mem = r.mem.clone();
        let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        activate(&mut r, &q);
        let mut fresh = rig(false);
        let before = fresh.dev.save();
        let good = r.dev.save();
        let mut bigger = good.clone();
        bigger.capacity_sectors += 1;
        assert_eq!(
            fresh.dev.restore(&bigger),
            Err(E::Capacity {
                state: 65,
                device: 64
            })
        );
        let mut ro = good.clone();
        ro.device_features = rig(true).dev.device_features();
        assert!(matches!(fresh.dev.restore(&ro), Err(E::Features { .. })));
        let mut odd = good.clone();
        odd.queue.size = 12;
        assert!(matches!(fresh.dev.restore(&odd), Err(E::Queue(_))));
        assert_eq!(fresh.dev.save(), before, "nothing changed");
        fresh.dev.restore(&good).unwrap();
        assert_eq!(fresh.dev.save(), good);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever ranges a DISCARD or WRITE_ZEROES carries, the device never panics; it
        /// answers OK only when every range is in bounds with known flags, and otherwise leaves
        /// the image exactly as it was.
        #[test]
        fn arbitrary_discard_ranges_are_served_whole_or_not_at_all(
            ranges in proptest::collection::vec(
                (proptest::prop_oneof![0u64..70, proptest::prelude::any::<u64>()], 0u32..80, 0u32..3),
                0..20,
            ),
            zero in proptest::prelude::any::<bool>(),
        ) {
            let mut r = rig(false);
            let mem = r.mem.clone();
            let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
            activate(&mut r, &q);
            mem.write_slice(&[0x6bu8; 64 * 512], GuestAddress(DATA)).unwrap();
            request(&r, &q, T_OUT, 0, Some((64 * 512, false)), 0);
            proptest::prop_assert_eq!(status_of(&mut r), S_OK);
            let before = image(&mut r);
            let kind = if zero { T_WRITE_ZEROES } else { T_DISCARD };
            free_request(&r, &q, kind, &ranges, 3);
            let status = status_of(&mut r);
            let known = if zero { SEGMENT_FLAG_UNMAP } else { 0 };
            let valid = !ranges.is_empty()
                && ranges.len() <= 16
                && ranges.iter().all(|&(s, n, f)| {
                    f & !known == 0 && s.checked_add(u64::from(n)).is_some_and(|e| e <= 64)
                });
            proptest::prop_assert_eq!(status == S_OK, valid, "status {}", status);
            let after = image(&mut r);
            if valid {
                for (i, sector) in after.chunks(512).enumerate() {
                    let freed = ranges
                        .iter()
                        .any(|&(s, n, _)| (s..s + u64::from(n)).contains(&(i as u64)));
                    let want = if freed { 0 } else { 0x6b };
                    proptest::prop_assert!(sector.iter().all(|&b| b == want), "sector {}", i);
                }
            } else {
                proptest::prop_assert_eq!(after, before);
            }
            proptest::prop_assert_eq!(used_idx(&r, &q), 2);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Whatever descriptors a guest puts in the queue (buffers anywhere past the rings, some
        /// outside guest memory), the device never panics and completes every chain it takes.
        #[test]
        fn arbitrary_descriptor_chains_never_panic(
            descs in proptest::collection::vec((0x8000u64..0x11_0000, 0u32..0x2_0000, 0u16..8), 1..6),
            kind in 0u32..16,
            sector in proptest::prelude::any::<u64>(),
        ) {
            let mut r = rig(false);
            let mem = r.mem.clone();
            let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
            activate(&mut r, &q);
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&kind.to_le_bytes());
            hdr[8..16].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
            let n = descs.len();
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, flags))| {
                    let next = if i + 1 < n { 1 } else { 0 };
                    RawDescriptor::from(SplitDescriptor::new(addr, len, (flags & 2) | next, i as u16 + 1))
                })
                .collect();
            q.add_desc_chains(&raw, 0).unwrap();
            w32(&mut r, reg::QUEUE_NOTIFY, 0);
            proptest::prop_assert_eq!(used_idx(&r, &q), 1);
        }
    }
}

//! A virtio block device over a [`BlockBackend`] (a raw image file, or a registered kind such as
//! a volume file), behind the virtio-mmio (version 2) transport of [`super::virtio_mmio`].
//!
//! Requests are served
//! synchronously on the vCPU thread that writes QueueNotify: reads and writes through the backend
//! (`pread`/`pwrite` for a raw file), a flush through its `flush` (`fdatasync`), so an acknowledged
//! flush means the data reached stable storage.
//! Every descriptor the guest gives is bounds-checked: a malformed chain fails that request, it
//! never panics the VMM.

use std::fs::File;
use std::path::Path;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::block_backend::{self, BlockBackend, RawFile};
use super::virtio_mmio::{Event, QueueState, Registers, STATUS_FAILED, Transport};

/// Device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Sector size.
pub const SECTOR_SIZE: u64 = 512;
/// The largest data transfer one request may make (bounds the VMM's buffer).
pub const MAX_REQUEST_BYTES: u32 = 4 << 20;

/// VIRTIO_BLK_F_RO.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_FLUSH.
pub const F_FLUSH: u64 = 1 << 9;
/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
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

/// The saved state of a virtio-blk device and its transport.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioBlkState {
    /// Device status register.
    pub status: u32,
    /// Features the driver acknowledged.
    pub driver_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// The queue's size.
    pub queue_size: u16,
    /// The queue is ready.
    pub queue_ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
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
        F_VERSION_1 | F_FLUSH | if readonly { F_RO } else { 0 }
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
        let config = self.capacity_sectors.to_le_bytes();
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

    /// The device's saved state.
    pub fn state(&self) -> VirtioBlkState {
        let r = self.transport.registers();
        let q = self.transport.queue_state(0);
        VirtioBlkState {
            status: r.status,
            driver_features: r.driver_features,
            device_features_sel: r.device_features_sel,
            driver_features_sel: r.driver_features_sel,
            interrupt_status: r.interrupt_status,
            queue_sel: r.queue_sel,
            queue_size: q.size,
            queue_ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
        }
    }

    /// Restores a saved state (the backing file stays).
    pub fn restore(&mut self, s: &VirtioBlkState) {
        let r = Registers {
            status: s.status,
            driver_features: s.driver_features,
            device_features_sel: s.device_features_sel,
            driver_features_sel: s.driver_features_sel,
            interrupt_status: s.interrupt_status,
            queue_sel: s.queue_sel,
        };
        let q = QueueState {
            size: s.queue_size,
            ready: s.queue_ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
        };
        self.transport.restore(&r, &[q]);
    }
}

#[cfg(test)]
mod tests {
    use super::super::virtio_mmio::{MMIO_MAGIC, reg};
    use super::*;
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
    }

    fn rig(readonly: bool) -> Rig {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![0u8; 64 * 512]).unwrap();
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
    const DATA: u64 = 0x9000;
    const STATUS: u64 = 0xa000;

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
        let s = r.dev.state();
        assert_eq!(s.next_avail, 1);
        let mut other = rig(false);
        other.dev.restore(&s);
        assert_eq!(other.dev.state(), s);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Whatever descriptors a guest puts in the queue (buffers anywhere past the rings, some
        /// outside guest memory), the device never panics and completes every chain it takes.
        #[test]
        fn arbitrary_descriptor_chains_never_panic(
            descs in proptest::collection::vec((0x8000u64..0x11_0000, 0u32..0x2_0000, 0u16..8), 1..6),
            kind in 0u32..10,
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

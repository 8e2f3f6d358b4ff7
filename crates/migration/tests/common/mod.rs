//! Test doubles: an in-memory VM (memory as a Vec, a writer thread dirtying pages at a set
//! rate into a dirty bitmap) that implements both migration traits, and a TCP proxy that can cut
//! or corrupt the streams between source and target.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tern_migration::ThrottleSlice;
use tern_migration::wire::PageBatch;
use tern_migration::{
    CpuidDigest, GuestPages, MemoryLayout, MigrationSource, MigrationTarget, PAGE_SIZE, PagePlacer,
    Region, VmConfigDescription, VmError,
};

const PAGE: usize = PAGE_SIZE as usize;

/// Lifecycle of the double.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Target built, nothing received yet.
    Fresh,
    /// vCPUs run (the writer dirties memory).
    Running,
    /// Paused.
    Paused,
    /// Target discarded what it received.
    Discarded,
}

fn state_from(v: u8) -> VmState {
    match v {
        0 => VmState::Fresh,
        1 => VmState::Running,
        2 => VmState::Paused,
        _ => VmState::Discarded,
    }
}

struct Mem {
    bytes: Vec<u8>,
    dirty: Vec<u64>,
    logging: bool,
    /// The "vCPU state": how many writes the workload has made (a heartbeat sequence).
    seq: u64,
    rng: u64,
}

type Hook = Box<dyn FnMut() + Send>;

struct Shared {
    mem: Mutex<Mem>,
    state: AtomicU8,
    /// Throttle percent as f64 bits.
    throttle: AtomicU64,
    stop: AtomicBool,
    /// Pages per second the workload writes; 0 = as fast as it can.
    rate: u64,
    pages: u64,
    writes: AtomicU64,
}

/// An in-memory VM.
pub struct MemVm {
    shared: Arc<Shared>,
    layout: MemoryLayout,
    vcpus: u32,
    writer: Option<JoinHandle<()>>,
    /// Called inside `pause` after the VM stopped (fault injection).
    pub on_pause: Option<Hook>,
    /// Memory copied at the pause (source) or at resume (target).
    pub snapshot: Option<Vec<u8>>,
    /// Whether to take `snapshot` (a full copy of memory, in the pause): off for figures.
    pub keep_snapshots: bool,
    /// Target fault: `write_page` fails after this many pages (the target "dies").
    pub die_after_pages: Option<(u64, Hook)>,
    /// Target fault: flip a byte of the next page written after this many pages.
    pub corrupt_after_pages: Option<u64>,
    /// Called once when the target has written this many pages.
    pub on_pages: Option<(u64, Hook)>,
    /// Called in `restore_state` (fault injection after commit).
    pub on_restore: Option<Hook>,
    /// Called in `release_storage`, after the storage was handed over.
    pub on_release: Option<Hook>,
    /// Source fault: `release_storage` fails with this message (nothing handed over).
    pub fail_release: Option<&'static str>,
    /// Source fault: `acquire_storage` fails with this message (the storage stays away).
    pub fail_acquire: Option<&'static str>,
    /// Source: the lifecycle and storage calls in order (`pause`, `save_state`, `release`,
    /// `acquire`, `resume`).
    pub calls: Vec<&'static str>,
    /// Source: whether the storage is handed over now.
    pub storage_away: bool,
    pages_written: u64,
    pub resumed_count: u32,
    restored: Option<u64>,
    /// Pages moved in place (`PageData` frames): the source offers its memory
    /// (`guest_pages`), the target reads into it (`placer`, `read_into`); `None`: neither.
    pub in_place: Option<Arc<InPlaceCounts>>,
    /// Source, in place: the guest rewrites the page at this address once, right after the
    /// migration took its checksum and before the frame carrying it is written (a torn page).
    pub tear_after_check: Option<u64>,
}

/// What [`MemVm::with_in_place`] saw: frames written from memory and frames read into it.
#[derive(Debug, Default)]
pub struct InPlaceCounts {
    /// `PageData` frames the source began writing from its memory.
    pub frames_written: AtomicU64,
    /// `PageData` frames whose data the target read straight into its memory.
    pub frames_read: AtomicU64,
    /// Frames placed from a buffer (`place`).
    pub frames_placed: AtomicU64,
    /// Pages read in place whose data did not match their checksum.
    pub mismatched: AtomicU64,
    /// Pages the source's guest tore ([`MemVm::tear_after_check`]).
    pub torn: AtomicU64,
}

/// The memory of a [`MemVm`] as the in-place traits see it.
struct MemPages {
    shared: Arc<Shared>,
    layout: MemoryLayout,
    counts: Arc<InPlaceCounts>,
    /// The page the guest rewrites right after its next check ([`MemVm::tear_after_check`]).
    tear: Mutex<Option<u64>>,
}

impl MemPages {
    fn offset(&self, gpa: u64) -> Result<usize, VmError> {
        let idx = self
            .layout
            .page_index(gpa)
            .ok_or("address outside memory")?;
        Ok((idx * PAGE_SIZE) as usize)
    }
}

impl GuestPages for MemPages {
    fn check(&self, gpa: u64) -> Result<Option<u32>, VmError> {
        let off = self.offset(gpa)?;
        let mut m = self.shared.mem.lock().unwrap();
        let page = &m.bytes[off..off + PAGE];
        let crc = (!page.iter().all(|&b| b == 0)).then(|| crc32c::crc32c(page));
        // The guest writes the page now, after its checksum was taken and before the socket
        // copies it (`write_frame`), as a vCPU may while a frame waits in the queue: once,
        // while the VM runs, and through the dirty log like any guest write.
        let mut tear = self.tear.lock().unwrap();
        if *tear == Some(gpa)
            && state_from(self.shared.state.load(Ordering::SeqCst)) == VmState::Running
        {
            *tear = None;
            m.bytes[off + 64..off + 72].copy_from_slice(&0x7e4a_7e4a_7e4a_7e4a_u64.to_le_bytes());
            if m.logging {
                let p = (off / PAGE) as u64;
                m.dirty[(p / 64) as usize] |= 1 << (p % 64);
            }
            self.counts.torn.fetch_add(1, Ordering::SeqCst);
        }
        Ok(crc)
    }

    fn write_frame(
        &self,
        socket: std::os::fd::BorrowedFd<'_>,
        head: &[u8],
        pages: &[u64],
        skip: usize,
    ) -> std::io::Result<usize> {
        // A copy here (no unsafe outside the VMM), taken when the socket is written: the bytes
        // are whatever the memory holds now, as when the kernel reads guest memory.
        let mut all = head.to_vec();
        {
            let m = self.shared.mem.lock().unwrap();
            for &gpa in pages {
                let off = self.offset(gpa).map_err(std::io::Error::other)?;
                all.extend_from_slice(&m.bytes[off..off + PAGE]);
            }
        }
        // A second descriptor of the same socket (safe, unlike writing the borrowed one).
        let r = TcpStream::from(socket.try_clone_to_owned()?).write(&all[skip..]);
        if skip == 0 && matches!(r, Ok(n) if n > 0) {
            self.counts.frames_written.fetch_add(1, Ordering::SeqCst);
        }
        r
    }
}

impl PagePlacer for MemPages {
    fn place(&self, batch: &PageBatch) -> Result<(), VmError> {
        self.counts.frames_placed.fetch_add(1, Ordering::SeqCst);
        let mut m = self.shared.mem.lock().unwrap();
        for (gpa, data) in batch.iter() {
            let off = self.offset(gpa)?;
            match data {
                Some(d) => m.bytes[off..off + PAGE].copy_from_slice(d),
                None => m.bytes[off..off + PAGE].fill(0),
            }
        }
        Ok(())
    }

    fn reads_in_place(&self) -> bool {
        true
    }

    fn read_into(
        &self,
        socket: std::os::fd::BorrowedFd<'_>,
        data: &[u64],
        crcs: &[u32],
        zero: &[u64],
    ) -> std::io::Result<Vec<u64>> {
        let mut buf = vec![0u8; data.len() * PAGE];
        TcpStream::from(socket.try_clone_to_owned()?).read_exact(&mut buf)?;
        let mut m = self.shared.mem.lock().unwrap();
        let mut mismatched = Vec::new();
        for ((gpa, d), crc) in data.iter().zip(buf.chunks(PAGE)).zip(crcs) {
            let off = self.offset(*gpa).map_err(std::io::Error::other)?;
            m.bytes[off..off + PAGE].copy_from_slice(d);
            if crc32c::crc32c(&m.bytes[off..off + PAGE]) != *crc {
                mismatched.push(*gpa);
            }
        }
        self.counts
            .mismatched
            .fetch_add(mismatched.len() as u64, Ordering::SeqCst);
        for gpa in zero {
            let off = self.offset(*gpa).map_err(std::io::Error::other)?;
            m.bytes[off..off + PAGE].fill(0);
        }
        self.counts.frames_read.fetch_add(1, Ordering::SeqCst);
        Ok(mismatched)
    }
}

/// Two regions with a hole between them: `bytes * 3/4` at 0 and `bytes / 4` at 4 GiB.
pub fn layout(bytes: u64) -> MemoryLayout {
    let low = bytes / 4 * 3;
    MemoryLayout::new(vec![
        Region {
            guest_addr: 0,
            size: low,
        },
        Region {
            guest_addr: 1 << 32,
            size: bytes - low,
        },
    ])
    .unwrap()
}

impl MemVm {
    fn new(bytes: u64, vcpus: u32, rate: u64, state: VmState) -> Self {
        let layout = layout(bytes);
        let pages = layout.total_pages();
        let shared = Arc::new(Shared {
            mem: Mutex::new(Mem {
                bytes: vec![0; bytes as usize],
                dirty: vec![0; pages.div_ceil(64) as usize],
                logging: false,
                seq: 0,
                rng: 0x9e37_79b9_7f4a_7c15,
            }),
            state: AtomicU8::new(state as u8),
            throttle: AtomicU64::new(0f64.to_bits()),
            stop: AtomicBool::new(false),
            rate,
            pages,
            writes: AtomicU64::new(0),
        });
        Self {
            shared,
            layout,
            vcpus,
            writer: None,
            on_pause: None,
            snapshot: None,
            keep_snapshots: true,
            die_after_pages: None,
            corrupt_after_pages: None,
            on_pages: None,
            on_restore: None,
            on_release: None,
            fail_release: None,
            fail_acquire: None,
            calls: Vec::new(),
            storage_away: false,
            pages_written: 0,
            resumed_count: 0,
            restored: None,
            in_place: None,
            tear_after_check: None,
        }
    }

    /// Moves pages in place: as a source it offers its memory to the data streams, as a target
    /// it reads `PageData` frames' data into its memory; `counts` tells what happened.
    pub fn with_in_place(mut self, counts: Arc<InPlaceCounts>) -> Self {
        self.in_place = Some(counts);
        self
    }

    fn mem_pages(&self) -> Option<Arc<MemPages>> {
        let counts = self.in_place.clone()?;
        Some(Arc::new(MemPages {
            shared: self.shared.clone(),
            layout: self.layout.clone(),
            counts,
            tear: Mutex::new(self.tear_after_check),
        }))
    }

    /// A running source VM of `bytes` bytes whose workload writes `rate` pages/s (0 = max).
    /// One page in four starts with data, the rest are zero.
    pub fn source(bytes: u64, rate: u64) -> Self {
        let mut vm = Self::new(bytes, 1, rate, VmState::Running);
        vm.fill_source_memory();
        vm.start_writer();
        vm
    }

    /// A running source VM with [`MemVm::source`]'s memory but no workload: its memory changes
    /// only through the test's hooks, so what each round sends is known.
    pub fn quiet_source(bytes: u64) -> Self {
        let vm = Self::new(bytes, 1, 0, VmState::Running);
        vm.fill_source_memory();
        vm
    }

    /// One page in four holds data (its number and a last byte), the rest are zero.
    fn fill_source_memory(&self) {
        let mut m = self.shared.mem.lock().unwrap();
        for (i, page) in m.bytes.chunks_mut(PAGE).enumerate() {
            if i % 4 == 0 {
                page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
                page[PAGE - 1] = 0xa5;
            }
        }
    }

    /// An empty target able to host a VM of `bytes` bytes with `vcpus` vCPUs.
    pub fn target(bytes: u64, vcpus: u32, rate: u64) -> Self {
        Self::new(bytes, vcpus, rate, VmState::Fresh)
    }

    pub fn state(&self) -> VmState {
        state_from(self.shared.state.load(Ordering::SeqCst))
    }

    pub fn is_running(&self) -> bool {
        self.state() == VmState::Running
    }

    /// The workload's write count (grows while running).
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::SeqCst)
    }

    /// The workload's sequence number (its "heartbeat").
    pub fn seq(&self) -> u64 {
        self.shared.mem.lock().unwrap().seq
    }

    pub fn throttle(&self) -> f64 {
        f64::from_bits(self.shared.throttle.load(Ordering::SeqCst))
    }

    /// The sequence the target restored, if any.
    pub fn restored_seq(&self) -> Option<u64> {
        self.restored
    }

    pub fn memory(&self) -> Vec<u8> {
        self.shared.mem.lock().unwrap().bytes.clone()
    }

    fn offset(&self, gpa: u64, len: usize) -> Result<usize, VmError> {
        let idx = self
            .layout
            .page_index(gpa - gpa % PAGE_SIZE)
            .ok_or("address outside memory")?;
        let off = (idx * PAGE_SIZE + gpa % PAGE_SIZE) as usize;
        if !self.layout.contains_range(gpa, len as u64) {
            return Err("range crosses a region end".into());
        }
        Ok(off)
    }

    fn start_writer(&mut self) {
        let s = self.shared.clone();
        self.writer = Some(thread::spawn(move || workload(&s)));
    }

    /// Waits until the workload has made `n` more writes (proof that the VM runs).
    pub fn wait_writes(&self, n: u64, within: Duration) -> bool {
        let start = self.writes();
        let t = Instant::now();
        while t.elapsed() < within {
            if self.writes() >= start + n {
                return true;
            }
            thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

impl Drop for MemVm {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The vCPU: writes a sequence number into pseudo-random pages (every 16th write zeroes a
/// page), marking them dirty, paced to the rate and held by the throttle in ≤10 ms slices.
fn workload(s: &Shared) {
    let mut slice_start = Instant::now();
    let mut last = Instant::now();
    let mut credit = 0.0f64;
    while !s.stop.load(Ordering::SeqCst) {
        if state_from(s.state.load(Ordering::SeqCst)) != VmState::Running {
            thread::sleep(Duration::from_micros(500));
            last = Instant::now();
            credit = 0.0;
            continue;
        }
        let pct = f64::from_bits(s.throttle.load(Ordering::SeqCst));
        if pct > 0.0 {
            let sl = ThrottleSlice::for_pct(pct, Duration::from_millis(10));
            if slice_start.elapsed() >= sl.run {
                thread::sleep(sl.sleep);
                slice_start = Instant::now();
                last = slice_start; // no work is due for time spent held
            }
        } else {
            slice_start = Instant::now();
        }
        let burst = if s.rate == 0 {
            64
        } else {
            let now = Instant::now();
            credit += now.duration_since(last).as_secs_f64() * s.rate as f64;
            credit = credit.min(s.rate as f64 / 100.0 + 1.0);
            last = now;
            let n = (credit as u64).min(256);
            if n == 0 {
                thread::sleep(Duration::from_micros(200));
                continue;
            }
            credit -= n as f64;
            n
        };
        let mut m = s.mem.lock().unwrap();
        // Re-check under the lock: pause takes the lock, so no write lands after it.
        if state_from(s.state.load(Ordering::SeqCst)) != VmState::Running {
            continue;
        }
        for _ in 0..burst {
            let page = xorshift(&mut m.rng) % s.pages;
            m.seq += 1;
            let seq = m.seq;
            let off = (page as usize) * PAGE;
            if seq.is_multiple_of(16) {
                m.bytes[off..off + PAGE].fill(0);
            } else {
                let at = off + ((seq % 511) as usize) * 8;
                m.bytes[at..at + 8].copy_from_slice(&seq.to_le_bytes());
            }
            if m.logging {
                m.dirty[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
        drop(m);
        s.writes.fetch_add(burst, Ordering::SeqCst);
    }
}

impl MemVm {
    fn config(&self) -> VmConfigDescription {
        VmConfigDescription {
            layout: self.layout.clone(),
            vcpus: self.vcpus,
            cpuid: CpuidDigest::of(&[(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65)]),
            devices: vec!["serial:com1".into(), "virtio-blk:0".into()],
        }
    }
}

impl MigrationSource for MemVm {
    fn describe(&self) -> VmConfigDescription {
        self.config()
    }

    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        let mut m = self.shared.mem.lock().unwrap();
        m.logging = true;
        m.dirty.fill(0);
        Ok(())
    }

    fn stop_dirty_log(&mut self) -> Result<(), VmError> {
        self.shared.mem.lock().unwrap().logging = false;
        Ok(())
    }

    fn read_pages(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        let off = self.offset(gpa, buf.len())?;
        let m = self.shared.mem.lock().unwrap();
        buf.copy_from_slice(&m.bytes[off..off + buf.len()]);
        Ok(())
    }

    fn fetch_dirty(&mut self, region: usize) -> Result<Vec<u64>, VmError> {
        let first = self.layout.region_first_page(region);
        let pages = self.layout.regions()[region].pages();
        let mut out = vec![0u64; pages.div_ceil(64) as usize];
        let mut m = self.shared.mem.lock().unwrap();
        for i in 0..pages {
            let p = first + i;
            let (w, b) = ((p / 64) as usize, 1u64 << (p % 64));
            if m.dirty[w] & b != 0 {
                m.dirty[w] &= !b;
                out[(i / 64) as usize] |= 1 << (i % 64);
            }
        }
        Ok(out)
    }

    fn set_throttle(&mut self, pct: f64) -> Result<(), VmError> {
        self.shared.throttle.store(pct.to_bits(), Ordering::SeqCst);
        Ok(())
    }

    fn pause(&mut self) -> Result<(), VmError> {
        self.calls.push("pause");
        {
            let m = self.shared.mem.lock().unwrap();
            self.shared
                .state
                .store(VmState::Paused as u8, Ordering::SeqCst);
            if self.keep_snapshots {
                self.snapshot = Some(m.bytes.clone());
            }
        }
        if let Some(h) = self.on_pause.as_mut() {
            h();
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.calls.push("resume");
        if self.storage_away {
            return Err("resumed while the storage is handed over".into());
        }
        self.resumed_count += 1;
        self.shared
            .state
            .store(VmState::Running as u8, Ordering::SeqCst);
        Ok(())
    }

    fn save_state(&mut self) -> Result<(u32, Vec<u8>), VmError> {
        self.calls.push("save_state");
        let m = self.shared.mem.lock().unwrap();
        let mut v = b"memvm-state".to_vec();
        v.extend_from_slice(&m.seq.to_le_bytes());
        v.extend_from_slice(&m.rng.to_le_bytes());
        Ok((3, v))
    }

    fn release_storage(&mut self) -> Result<(), VmError> {
        self.calls.push("release");
        if self.state() != VmState::Paused {
            return Err("storage released while the VM runs".into());
        }
        if let Some(msg) = self.fail_release {
            return Err(msg.into());
        }
        self.storage_away = true;
        if let Some(h) = self.on_release.as_mut() {
            h();
        }
        Ok(())
    }

    fn acquire_storage(&mut self) -> Result<(), VmError> {
        self.calls.push("acquire");
        if let Some(msg) = self.fail_acquire {
            return Err(msg.into());
        }
        self.storage_away = false;
        Ok(())
    }

    fn guest_pages(&self) -> Option<Arc<dyn GuestPages>> {
        self.mem_pages().map(|p| p as Arc<dyn GuestPages>)
    }
}

impl MigrationTarget for MemVm {
    fn prepare(&mut self, config: &VmConfigDescription) -> Result<(), String> {
        config
            .check_compatible(&self.config())
            .map_err(|e| e.to_string())
    }

    fn write_page(&mut self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.pages_written += 1;
        if self
            .on_pages
            .as_ref()
            .is_some_and(|(n, _)| self.pages_written >= *n)
            && let Some((_, mut hook)) = self.on_pages.take()
        {
            hook();
        }
        if let Some((n, hook)) = self.die_after_pages.as_mut()
            && self.pages_written > *n
        {
            hook();
            return Err("target process killed".into());
        }
        let off = self.offset(gpa, data.len())?;
        let mut m = self.shared.mem.lock().unwrap();
        m.bytes[off..off + data.len()].copy_from_slice(data);
        if self
            .corrupt_after_pages
            .is_some_and(|n| self.pages_written > n)
        {
            m.bytes[off + 100] ^= 0xff;
            self.corrupt_after_pages = None;
        }
        Ok(())
    }

    fn zero_page(&mut self, gpa: u64) -> Result<(), VmError> {
        let off = self.offset(gpa, PAGE)?;
        self.shared.mem.lock().unwrap().bytes[off..off + PAGE].fill(0);
        Ok(())
    }

    fn read_pages(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        MigrationSource::read_pages(self, gpa, buf)
    }

    fn restore_state(&mut self, version: u32, bytes: &[u8]) -> Result<(), VmError> {
        if let Some(h) = self.on_restore.as_mut() {
            h();
        }
        if version != 3 || bytes.len() != 27 || &bytes[..11] != b"memvm-state" {
            return Err("bad state".into());
        }
        let seq = u64::from_le_bytes(bytes[11..19].try_into().unwrap());
        let rng = u64::from_le_bytes(bytes[19..27].try_into().unwrap());
        let mut m = self.shared.mem.lock().unwrap();
        m.seq = seq;
        m.rng = rng;
        self.restored = Some(seq);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        if self.keep_snapshots {
            self.snapshot = Some(self.memory());
        }
        self.resumed_count += 1;
        self.shared
            .state
            .store(VmState::Running as u8, Ordering::SeqCst);
        if self.writer.is_none() {
            self.start_writer();
        }
        Ok(())
    }

    fn discard(&mut self) {
        self.shared
            .state
            .store(VmState::Discarded as u8, Ordering::SeqCst);
        self.shared.mem.lock().unwrap().bytes.fill(0);
    }

    fn placer(&mut self) -> Option<Arc<dyn PagePlacer>> {
        self.mem_pages().map(|p| p as Arc<dyn PagePlacer>)
    }
}

/// A TCP relay between source and target that can cut every connection or corrupt one byte.
pub struct Proxy {
    pub addr: SocketAddr,
    ctl: Arc<ProxyCtl>,
}

#[derive(Default)]
struct ProxyCtl {
    cut: AtomicBool,
    sockets: Mutex<Vec<TcpStream>>,
    /// (connection index, byte offset, cut instead of flip) on the source → target direction.
    corrupt: Mutex<Option<(usize, u64, bool)>>,
    accepted: AtomicUsize,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let ctl = Arc::new(ProxyCtl::default());
        let c = ctl.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if c.cut.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    return;
                };
                let index = c.accepted.fetch_add(1, Ordering::SeqCst);
                {
                    let mut socks = c.sockets.lock().unwrap();
                    socks.push(client.try_clone().unwrap());
                    socks.push(server.try_clone().unwrap());
                }
                let corrupt = c
                    .corrupt
                    .lock()
                    .unwrap()
                    .filter(|&(i, _, _)| i == index)
                    .map(|(_, at, cut)| (at, cut));
                pump(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    corrupt,
                    c.clone(),
                );
                pump(server, client, None, c.clone());
            }
        });
        Self { addr, ctl }
    }

    /// Flip one byte at `offset` of the `index`-th connection (0 = control, 1.. = data).
    pub fn corrupt(&self, index: usize, offset: u64) {
        *self.ctl.corrupt.lock().unwrap() = Some((index, offset, false));
    }

    /// Cut every connection once the `index`-th connection has carried `offset` bytes.
    pub fn cut_after(&self, index: usize, offset: u64) {
        *self.ctl.corrupt.lock().unwrap() = Some((index, offset, true));
    }

    /// Cuts every connection now (both directions, like a dead host or a broken link).
    pub fn cut(&self) {
        cut(&self.ctl);
    }

    /// A function that cuts this proxy's connections, for hooks.
    pub fn cutter(&self) -> impl FnMut() + Send + 'static {
        let ctl = self.ctl.clone();
        move || cut(&ctl)
    }
}

fn cut(ctl: &ProxyCtl) {
    ctl.cut.store(true, Ordering::SeqCst);
    for s in ctl.sockets.lock().unwrap().iter() {
        let _ = s.shutdown(Shutdown::Both);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, fault: Option<(u64, bool)>, ctl: Arc<ProxyCtl>) {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut at = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some((c, cut_instead)) = fault
                && c >= at
                && c < at + n as u64
            {
                if cut_instead {
                    cut(&ctl);
                    break;
                }
                buf[(c - at) as usize] ^= 0x40;
            }
            at += n as u64;
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

//! The VM as a live-migration endpoint: [`VmSource`] and [`VmTarget`] implement tern-migration's
//! traits on a [`Vm`], and [`Throttle`] holds the vCPUs in slices of at most 10 ms. Disks whose
//! write ownership is exclusive per host (volume files and their write leases) move with the VM:
//! the source hands them to the named successor at switch-over (`release_storage`, when the
//! migration's sender machine orders it) and takes them back before a failed migration resumes
//! the VM (`acquire_storage`); the target takes them over before its first instruction.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tern_migration::{
    CpuidDigest, MemoryLayout, MigrationSource, MigrationTarget, Region, ThrottleSlice,
    VmConfigDescription, VmError,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::devices::block_backend::BlockBackend;
use crate::state;
use crate::vm::Vm;

/// The nice value of the source's migration stream threads (its control stream reader, post-copy's
/// threads; the data streams are written by the migration's own thread, at its priority): they
/// yield to the guest they migrate, whose vCPUs and device threads come first when the host is
/// short of CPU. With `tern demo` (20,000 pages/s writer, 2 loaded cores) the guest's
/// client waited 35–140 ms during pre-copy with every migration thread at nice 0, a median 10 ms
/// at nice 10 (docs/net.md); measured again with the December 2026 copy path, 4 runs each: 20–57
/// ms at nice 0 against 9–11 ms at nice 10 (one run of each also had a ~210 ms retransmission).
pub const MIGRATION_THREAD_NICE: i32 = 10;

/// The nice value of the target's migration stream threads (its data stream readers, post-copy's
/// threads): 0. No guest runs on the target before the switch-over, so there is nothing of its own
/// to yield to, and these threads sit between every two steps of a round: at nice 10 each wake-up
/// waited behind every runnable nice-0 thread of the host for 5–10× its own run time, which
/// with the test guest writing at its maximum rate halved the rounds' speed (a max-rate migration
/// took 360–1380 ms, sent 394–437 MiB and throttled the guest to 90 % in 2 of 3 runs; with the
/// target's threads at nice 0 it took 364–413 ms, 367–379 MiB, no throttle; docs/benchmarks.md,
/// "Pre-copy rounds at the link's speed").
pub const TARGET_THREAD_NICE: i32 = 0;

/// Whether this process's VM is being received (set by [`VmTarget::new`], cleared by
/// [`VmSource::new`]: one VM per VMM process, received first and migrated away later).
static TARGET_SIDE: AtomicBool = AtomicBool::new(false);

/// Sets the calling thread's CPU priority to [`MIGRATION_THREAD_NICE`] or [`TARGET_THREAD_NICE`] by
/// the side this process is on (run first by every migration thread, before its seccomp filter);
/// a failure leaves the priority as it was.
pub fn lower_this_threads_priority() {
    let nice = if TARGET_SIDE.load(Ordering::Relaxed) {
        TARGET_THREAD_NICE
    } else {
        MIGRATION_THREAD_NICE
    };
    // SAFETY: plain syscalls on the calling thread's own id (Linux nice values are per thread);
    // no memory is passed.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
    }
}

/// Lists the disk backends of this process's VM whose write ownership moves with it (the
/// embedding program opened them through a registered scheme and keeps a handle).
pub type HandoverDisks = Box<dyn Fn() -> Vec<Arc<dyn BlockBackend>> + Send + Sync>;

fn handover_registry() -> &'static Mutex<Option<HandoverDisks>> {
    static DISKS: OnceLock<Mutex<Option<HandoverDisks>>> = OnceLock::new();
    DISKS.get_or_init(|| Mutex::new(None))
}

/// Registers where [`VmSource`] and [`VmTarget`] find the disks to hand over (one VM per VMM
/// process; replaces an earlier registration).
pub fn register_handover_disks(list: HandoverDisks) {
    *handover_registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(list);
}

/// The writable disks that name a successor (hold exclusive write ownership), now.
fn handover_disks() -> Vec<Arc<dyn BlockBackend>> {
    let g = handover_registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    g.as_ref()
        .map(|f| f())
        .unwrap_or_default()
        .into_iter()
        .filter(|d| !d.read_only() && d.successor_id().is_some())
        .collect()
}

/// The longest slice the throttle uses: a vCPU is never held longer than this at a time.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// The migration description of a VM: layout, vCPUs, CPUID digest, devices.
pub fn describe(vm: &Vm) -> VmConfigDescription {
    let regions = vm
        .memory_regions()
        .iter()
        .map(|r| Region {
            guest_addr: r.guest_addr,
            size: r.size,
        })
        .collect();
    // The VMM builds its layouts from validated sizes: they are sorted, aligned and disjoint.
    let layout = MemoryLayout::new(regions).unwrap_or_else(|_| {
        MemoryLayout::new(vec![Region {
            guest_addr: 0,
            size: 4096,
        }])
        .expect("a one-page layout is valid")
    });
    let entries: Vec<_> = vm
        .cpuid()
        .iter()
        .map(|e| (e.function, e.index, e.eax, e.ebx, e.ecx, e.edx))
        .collect();
    let mut devices = vec!["serial:com1".to_string()];
    devices.extend(
        (0..vm.config().disks.len())
            .map(|i| format!("virtio-blk:{}", crate::layout::virtio_slot(i))),
    );
    let disks = vm.config().disks.len();
    devices.extend(
        (0..vm.config().nets.len())
            .map(|i| format!("virtio-net:{}", crate::layout::virtio_slot(disks + i))),
    );
    VmConfigDescription {
        layout,
        vcpus: u32::from(vm.config().vcpus),
        cpuid: CpuidDigest::of(&entries),
        devices,
    }
}

/// Holds a VM's vCPUs for a share of the time, in slices of at most [`THROTTLE_SLICE`].
///
/// A thread pauses the VM for `pct` % of each slice and lets it run for the rest. Changing the
/// percentage takes effect at the next slice; dropping the throttle (or `set(0)`) ends it at
/// once, cutting a hold short, with the vCPUs running.
#[derive(Debug)]
pub struct Throttle {
    vm: Vm,
    pct_milli: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    /// A throttle for `vm`, idle.
    pub fn new(vm: Vm) -> Self {
        Throttle {
            vm,
            pct_milli: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        }
    }

    /// Sets the share of time the vCPUs are held, percent (0 ends throttling).
    pub fn set(&mut self, pct: f64) -> std::io::Result<()> {
        let pct = if pct.is_finite() {
            pct.clamp(0.0, 99.9)
        } else {
            0.0
        };
        if pct <= 0.0 {
            self.stop();
            return Ok(());
        }
        self.pct_milli
            .store((pct * 1000.0) as u64, Ordering::Relaxed);
        if self.thread.is_none() {
            self.stop.store(false, Ordering::Relaxed);
            let vm = self.vm.clone();
            let pct = self.pct_milli.clone();
            let stop = self.stop.clone();
            self.thread = Some(std::thread::Builder::new().name("throttle".into()).spawn(
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        let p = pct.load(Ordering::Relaxed) as f64 / 1000.0;
                        let slice = ThrottleSlice::for_pct(p, THROTTLE_SLICE);
                        if !slice.sleep.is_zero() {
                            if vm.pause().is_err() {
                                return;
                            }
                            wait_unless_stopped(&stop, slice.sleep);
                            if vm.resume().is_err() {
                                return;
                            }
                        }
                        wait_unless_stopped(&stop, slice.run.max(Duration::from_micros(10)));
                    }
                },
            )?);
        }
        Ok(())
    }

    /// Ends throttling at once (a slice's hold is cut short); returns once the vCPUs run
    /// freely again.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        self.pct_milli.store(0, Ordering::Relaxed);
    }
}

/// Sleeps for `d`, or less if `stop` is set meanwhile ([`Throttle::stop`] unparks the thread).
fn wait_unless_stopped(stop: &AtomicBool, d: Duration) {
    let until = std::time::Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::park_timeout(left);
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Disks a migration handed over and never took back: its commit went out unanswered (in
/// doubt), or it completed (the VMM then exits). [`take_back_storage`] gives them back before the
/// VM may resume here.
fn pending_handovers() -> &'static Mutex<Vec<Arc<dyn BlockBackend>>> {
    static PENDING: OnceLock<Mutex<Vec<Arc<dyn BlockBackend>>>> = OnceLock::new();
    PENDING.get_or_init(|| Mutex::new(Vec::new()))
}

/// Before a paused source resumes after a migration left in doubt: takes back every write lease
/// it handed over (`abort_handover`, retried for about 2 s while a coordinator may be
/// mid-election). The coordinator refuses once the target confirmed the hand-over (it took the
/// disk over to run the VM): then this fails, the disk stays with the target, and the VM must
/// stay paused. Returns how many disks came back (0: none was pending).
pub fn take_back_storage() -> Result<usize, String> {
    let mut pending = pending_handovers()
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut back = 0;
    while let Some(d) = pending.last() {
        let mut r = d.abort_handover();
        for _ in 0..4 {
            if r.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
            r = d.abort_handover();
        }
        // A refused disk stays pending: the VM stays paused, a later resume asks again.
        r.map_err(|e| format!("taking the disk's write lease back: {e}"))?;
        pending.pop();
        back += 1;
    }
    Ok(back)
}

/// Pages whose dirty bits [`VmSource`] clears together, just before it copies the first of them
/// (with manual dirty-log protection): 4 MiB, 16 bitmap words. Smaller ranges leave pages
/// writable for longer before they are copied (a write meanwhile costs the guest no fault and
/// is carried by this copy); each range is one `KVM_CLEAR_DIRTY_LOG`.
pub const CLEAR_CHUNK_PAGES: u64 = 1024;

/// A running VM migrating away.
#[derive(Debug)]
pub struct VmSource {
    vm: Vm,
    throttle: Throttle,
    pending: HashMap<usize, Vec<u64>>,
    /// Per region, the dirty bits read and not yet cleared in KVM (manual protection only): a
    /// range is cleared (its pages write-protected again) when a page of it is first copied.
    uncleared: Vec<Vec<u64>>,
    /// The memory regions (guest address, size), read once: `read_pages` runs once per page.
    regions: Vec<(u64, u64)>,
    /// Paused for the switch-over: copies no longer clear (the VM writes nothing more here).
    paused: bool,
    successor: Option<String>,
    disks: Vec<Arc<dyn BlockBackend>>,
    /// How many of `disks` (a prefix) were handed to the successor.
    handed: usize,
}

impl VmSource {
    /// The source side of `vm`; its disks with exclusive write ownership come from
    /// [`register_handover_disks`].
    pub fn new(vm: Vm) -> Self {
        TARGET_SIDE.store(false, Ordering::Relaxed);
        VmSource {
            throttle: Throttle::new(vm.clone()),
            regions: vm
                .memory_regions()
                .iter()
                .map(|r| (r.guest_addr, r.size))
                .collect(),
            vm,
            pending: HashMap::new(),
            uncleared: Vec::new(),
            paused: false,
            successor: None,
            disks: handover_disks(),
            handed: 0,
        }
    }

    /// Names the target host's successor for the disks' write ownership (a volume node id).
    pub fn with_disk_successor(mut self, successor: Option<String>) -> Self {
        self.successor = successor;
        self
    }

    /// Checks, before the migration starts, that every disk that must move has a successor.
    pub fn check_handover(&self) -> Result<(), String> {
        if !self.disks.is_empty() && self.successor.is_none() {
            return Err(format!(
                "the VM has {} disk(s) holding an exclusive write lease: name the target host's volume node with --disk-successor NODE_ID",
                self.disks.len()
            ));
        }
        Ok(())
    }
}

impl Drop for VmSource {
    fn drop(&mut self) {
        // Whatever is still handed over when the migration ends stays so until a resume here
        // takes it back (`take_back_storage`).
        if self.handed > 0 {
            pending_handovers()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(self.disks.drain(..self.handed));
        }
    }
}

impl MigrationSource for VmSource {
    fn describe(&self) -> VmConfigDescription {
        describe(&self.vm)
    }

    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        self.pending.clear();
        self.uncleared.clear();
        self.paused = false;
        self.vm.set_dirty_logging(true)?;
        // Clear what the registration may have left.
        self.vm.take_dirty_bitmaps()?;
        Ok(())
    }

    fn stop_dirty_log(&mut self) -> Result<(), VmError> {
        self.pending.clear();
        self.uncleared.clear();
        self.vm.set_dirty_logging(false)?;
        Ok(())
    }

    fn read_pages(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        if !self.paused {
            self.clear_before_copy(gpa, buf.len() as u64)?;
        }
        self.vm.memory().read_slice(buf, GuestAddress(gpa))?;
        Ok(())
    }

    /// With manual dirty-log protection the read leaves KVM's bits set and the pages writable;
    /// [`MigrationSource::read_pages`] clears each [`CLEAR_CHUNK_PAGES`] range just before it
    /// copies the first page of it (a page written after its range was cleared is reported by
    /// the next read; one written between this read and the clear is carried by the copy).
    /// Pages read and never copied keep their bits and are reported again.
    fn fetch_dirty(&mut self, region: usize) -> Result<Vec<u64>, VmError> {
        if let Some(bits) = self.pending.remove(&region) {
            return Ok(bits);
        }
        // One KVM sync covers every region; the others wait for their turn.
        let maps = self.vm.peek_dirty_bitmaps()?;
        if self.vm.dirty_log_manual_protect() && !self.paused {
            self.uncleared = maps.iter().map(|b| b.bits.clone()).collect();
        }
        let mut mine = None;
        for (i, b) in maps.into_iter().enumerate() {
            if i == region {
                mine = Some(b.bits);
            } else {
                self.pending.insert(i, b.bits);
            }
        }
        mine.ok_or_else(|| format!("no memory region {region}").into())
    }

    fn known_zero(&mut self, region: usize) -> Option<Vec<u64>> {
        unbacked_pages(&self.vm, region)
    }

    fn guest_pages(&self) -> Option<Arc<dyn tern_migration::GuestPages>> {
        Some(Arc::new(SendInPlace(self.vm.memory().clone())))
    }

    /// As `read_pages` before its copy: the page's dirty-log range is cleared (write protection
    /// re-armed) before the page is classified and queued, so a write from here on, while the
    /// frame waits or while the kernel copies it, shows up in the next `fetch_dirty`.
    fn before_send_in_place(&mut self, gpa: u64) -> Result<(), VmError> {
        if !self.paused {
            self.clear_before_copy(gpa, 4096)?;
        }
        Ok(())
    }

    fn set_throttle(&mut self, pct: f64) -> Result<(), VmError> {
        self.throttle.set(pct)?;
        Ok(())
    }

    fn pause(&mut self) -> Result<(), VmError> {
        self.throttle.stop();
        self.vm.pause()?;
        // Paused, nothing is written: the final copy needs no protection, so the switch-over
        // pays for no write-protection at all.
        self.paused = true;
        self.uncleared.clear();
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.throttle.stop();
        self.vm.resume()?;
        self.paused = false;
        Ok(())
    }

    fn save_state(&mut self) -> Result<(u32, Vec<u8>), VmError> {
        let s = self.vm.save_state()?;
        Ok((state::STATE_VERSION, state::encode(&s)))
    }

    /// vCPUs paused, state saved, no disk request in flight: every disk flushes and hands its
    /// write ownership to the successor, before the state and commit frames. On a failure the
    /// ones already handed stay so until `acquire_storage`, which the migration calls before
    /// resuming the VM.
    fn release_storage(&mut self) -> Result<(), VmError> {
        let Some(to) = self.successor.clone() else {
            return self.check_handover().map_err(VmError::from);
        };
        while self.handed < self.disks.len() {
            self.disks[self.handed]
                .release_to(&to)
                .map_err(|e| VmError::from(format!("disk hand-over to {to}: {e}")))?;
            self.handed += 1;
        }
        Ok(())
    }

    /// The migration failed after the pause: takes back every disk handed over (nothing to do
    /// if none was), before the VM resumes here. An error leaves the VM paused (its writes
    /// would be refused) and says why.
    fn acquire_storage(&mut self) -> Result<(), VmError> {
        let mut first = None;
        while self.handed > 0 {
            let d = &self.disks[self.handed - 1];
            // The coordinator may be mid-election: try a few times before giving up.
            let mut r = d.abort_handover();
            for _ in 0..4 {
                if r.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
                r = d.abort_handover();
            }
            if let Err(e) = r {
                first.get_or_insert(e);
            }
            self.handed -= 1;
        }
        match first {
            Some(e) => Err(format!("taking the disk lease back: {e}").into()),
            None => Ok(()),
        }
    }
}

impl VmSource {
    /// Clears, in KVM's dirty log, the uncleared bits of every [`CLEAR_CHUNK_PAGES`] range that
    /// `len` bytes at `gpa` touch (manual protection; nothing otherwise).
    fn clear_before_copy(&mut self, gpa: u64, len: u64) -> Result<(), VmError> {
        if self.uncleared.is_empty() || len == 0 {
            return Ok(());
        }
        let Some((region, &(base, _))) = self
            .regions
            .iter()
            .enumerate()
            .find(|(_, (start, size))| gpa >= *start && gpa - *start < *size)
        else {
            return Ok(());
        };
        let Some(bits) = self.uncleared.get_mut(region) else {
            return Ok(());
        };
        let first = (gpa - base) / 4096;
        let last = (gpa - base + len - 1) / 4096;
        let words_per_chunk = (CLEAR_CHUNK_PAGES / 64) as usize;
        for chunk in first / CLEAR_CHUNK_PAGES..=last / CLEAR_CHUNK_PAGES {
            let w0 = chunk as usize * words_per_chunk;
            if w0 >= bits.len() {
                break;
            }
            let w1 = (w0 + words_per_chunk).min(bits.len());
            if bits[w0..w1].iter().all(|w| *w == 0) {
                continue;
            }
            self.vm
                .clear_dirty_pages(region, w0 as u64 * 64, &bits[w0..w1])?;
            bits[w0..w1].fill(0);
        }
        Ok(())
    }
}

/// The pages of RAM region `region` that no host page backs yet (neither present nor swapped,
/// from /proc/self/pagemap): they read as zero. `None` if pagemap cannot be read.
pub fn unbacked_pages(vm: &Vm, region: usize) -> Option<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let info = vm.memory_regions().into_iter().nth(region)?;
    let host = vm
        .memory()
        .get_host_address(GuestAddress(info.guest_addr))
        .ok()? as u64;
    let pages = (info.size / 4096) as usize;
    let f = std::fs::File::open("/proc/self/pagemap").ok()?;
    let mut out = vec![0u64; pages.div_ceil(64)];
    let mut buf = vec![0u8; 8 * 8192];
    let mut done = 0usize;
    while done < pages {
        let n = (pages - done).min(8192);
        let off = (host / 4096 + done as u64) * 8;
        f.read_exact_at(&mut buf[..n * 8], off).ok()?;
        for k in 0..n {
            let mut e = [0u8; 8];
            e.copy_from_slice(&buf[k * 8..k * 8 + 8]);
            let e = u64::from_le_bytes(e);
            // Bit 63: present; bit 62: swapped.
            if e & (3 << 62) == 0 {
                let i = done + k;
                out[i / 64] |= 1 << (i % 64);
            }
        }
        done += n;
    }
    Some(out)
}

/// Builds the incoming VM from the source's description (the caller knows the host's kernel
/// placeholder, serial output, disks…). The VM must come back parked.
pub type BuildVm = Box<dyn FnMut(&VmConfigDescription) -> Result<Vm, String> + Send>;

/// A VM being received.
pub struct VmTarget {
    build: BuildVm,
    vm: Option<Vm>,
    /// Post-copy: the guest memory's missing pages (`crate::uffd`), while they are owed.
    post_copy: Option<Arc<PostCopyPages>>,
}

impl std::fmt::Debug for VmTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmTarget")
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

impl VmTarget {
    /// A target that builds its VM with `build` when the handshake describes it.
    pub fn new(build: BuildVm) -> Self {
        TARGET_SIDE.store(true, Ordering::Relaxed);
        VmTarget {
            build,
            vm: None,
            post_copy: None,
        }
    }

    /// The VM, once the migration completed (it runs).
    pub fn into_vm(self) -> Option<Vm> {
        self.vm
    }

    fn vm(&self) -> Result<&Vm, VmError> {
        self.vm.as_ref().ok_or_else(|| "no VM was prepared".into())
    }
}

impl MigrationTarget for VmTarget {
    fn prepare(&mut self, config: &VmConfigDescription) -> Result<(), String> {
        let vm = (self.build)(config)?;
        let mine = describe(&vm);
        if let Err(e) = config.check_compatible(&mine) {
            vm.request_stop();
            vm.wait();
            return Err(e.to_string());
        }
        if let Err(e) = vm.zero_memory() {
            vm.request_stop();
            vm.wait();
            return Err(format!("cannot prepare guest memory: {e}"));
        }
        self.vm = Some(vm);
        Ok(())
    }

    fn write_page(&mut self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        // A plain copy: `write_slice` would also mark the page in the VMM's dirty bitmap,
        // which means nothing before this VM's first instruction (a migration away from here
        // starts with the bitmap cleared) and cost ~5 % of the receiving side's time.
        let slice = self
            .vm()?
            .memory()
            .get_slice(GuestAddress(gpa), data.len())?;
        let dst = slice.ptr_guard_mut();
        // SAFETY: `get_slice` checked that the `data.len()` bytes at `gpa` lie in one mapped
        // region, which stays mapped while the guard lives; `data` is our own buffer, so the
        // two do not overlap. The guest is not running yet (no concurrent access).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst.as_ptr(), data.len()) };
        Ok(())
    }

    fn zero_page(&mut self, gpa: u64) -> Result<(), VmError> {
        static ZERO: [u8; 4096] = [0; 4096];
        self.vm()?.memory().write_slice(&ZERO, GuestAddress(gpa))?;
        Ok(())
    }

    fn read_pages(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.vm()?.memory().read_slice(buf, GuestAddress(gpa))?;
        Ok(())
    }

    fn restore_state(&mut self, version: u32, bytes: &[u8]) -> Result<(), VmError> {
        if version != state::STATE_VERSION {
            return Err(format!(
                "VM state format {version} is not supported (this build reads {})",
                state::STATE_VERSION
            )
            .into());
        }
        let (s, _) = state::decode(bytes)?;
        if s.vcpus.len() != usize::from(self.vm()?.config().vcpus) {
            return Err("the state's vCPU count differs from the VM's".into());
        }
        self.vm()?.restore_state(&s)?;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        let vm = self.vm()?;
        // After restore_state, before the first instruction: pick the disks' write leases up
        // (the source named this host). A refusal fails the migration; the source takes back.
        for d in handover_disks() {
            d.take_over()
                .map_err(|e| VmError::from(format!("disk take-over: {e}")))?;
        }
        vm.resume()?;
        Ok(())
    }

    fn post_copy_memory(
        &mut self,
        owed: &[(u64, u64)],
    ) -> Result<Arc<dyn tern_migration::MissingMemory>, VmError> {
        let pages = crate::uffd::MissingPages::arm(self.vm()?.memory(), owed)?;
        let pages = Arc::new(PostCopyPages(pages));
        self.post_copy = Some(pages.clone());
        Ok(pages)
    }

    fn stop_post_copy_guest(&mut self) {
        if let Some(vm) = &self.vm {
            // Running vCPUs stop; one waiting on a missing page stays blocked until the
            // process exits.
            vm.request_stop();
        }
        // Never close the userfaultfd now: a vCPU waiting on a missing page would go on with
        // a zero page. It goes with the process.
        if let Some(p) = self.post_copy.take() {
            std::mem::forget(p);
        }
    }

    fn discard(&mut self) {
        if let Some(vm) = self.vm.take() {
            // A restored console line belongs to the source, which goes on printing it.
            vm.discard_pending_output();
            vm.request_stop();
            vm.wait();
        }
    }

    fn prefault(&mut self) -> Option<tern_migration::vm::Prefault> {
        // Each data stream's reader faults its frame's pages in (`crate::vm::populate_write`)
        // before the writer copies them: one call per run of pages instead of a page fault per
        // page on the writer. Done with the data streams, before post-copy drops any page.
        let mem = self.vm.as_ref()?.memory().clone();
        let supported = Arc::new(AtomicBool::new(true));
        Some(Arc::new(move |gpa, len| {
            // An old kernel (EINVAL: no MADV_POPULATE_WRITE before Linux 5.14) stops it for the
            // rest of the migration; any other refusal (e.g. ENOMEM, EINTR) skips this run only.
            // Either way the writer's own page faults do what was not done.
            if supported.load(Ordering::Relaxed)
                && matches!(crate::vm::populate_write(&mem, gpa, len), Ok(false))
            {
                supported.store(false, Ordering::Relaxed);
            }
        }))
    }

    fn placer(&mut self) -> Option<Arc<dyn tern_migration::vm::PagePlacer>> {
        // The data streams' readers write their frames' pages themselves, in parallel, instead
        // of handing each page to `write_page` on the receiving thread.
        let mem = self.vm.as_ref()?.memory().clone();
        Some(Arc::new(GuestPlacer(mem)))
    }
}

/// Writes received page frames into the target's guest memory from the data streams' reader
/// threads ([`MigrationTarget::placer`]). It holds its own handle on the memory's mappings,
/// so they stay mapped while a reader writes, even after the VM was discarded.
struct GuestPlacer(crate::layout::GuestMemory);

impl tern_migration::vm::PagePlacer for GuestPlacer {
    fn place(&self, batch: &tern_migration::wire::PageBatch) -> Result<(), VmError> {
        static ZERO: [u8; 4096] = [0; 4096];
        for (gpa, data) in batch.iter() {
            let data = data.unwrap_or(&ZERO);
            // A plain copy, as in `write_page`: no dirty bitmap before the VM's first run.
            let slice = self.0.get_slice(GuestAddress(gpa), data.len())?;
            let dst = slice.ptr_guard_mut();
            // SAFETY: `get_slice` checked that the `data.len()` bytes at `gpa` lie in one
            // mapped region, which stays mapped while `self.0` holds it; `data` is the reader's
            // own frame buffer (or a static), outside guest memory, so the two do not overlap.
            // Guest memory is memory shared with KVM that vm-memory never hands out as Rust
            // references (only volatile slices and raw pointers), and the guest has not run
            // (placers are used only before `resume`). Another write to the same bytes at the
            // same time — the receiving thread writing a frame the gate refused, or a faulty
            // source sending one page on two streams in a round — can only leave those guest
            // bytes garbled, never touch memory Rust code reads; the receiver's round fence
            // keeps an honest source's copies of a page in order.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst.as_ptr(), data.len()) };
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
        use std::os::fd::AsRawFd;
        let mut iov = Vec::with_capacity(data.len());
        page_iovecs(&self.0, data, &mut iov)?;
        let mut left = data.len() * PAGE;
        while left > 0 {
            let n = iov.len().min(1024) as libc::c_int;
            // SAFETY: every iovec points into a page of guest memory that `page_ptr` checked
            // lies in a mapped region, which `self.0` keeps mapped; the kernel writes the
            // socket's bytes there. As in `place`: the guest has not run, vm-memory hands out
            // no Rust reference to guest memory, and a concurrent write to the same page (a
            // faulty source) can only garble guest bytes; the round fence keeps an honest
            // source's copies of a page in order.
            let r = unsafe { libc::readv(socket.as_raw_fd(), iov.as_ptr(), n) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed inside a frame's page data",
                ));
            }
            let r = r as usize;
            left -= r.min(left);
            advance_iovecs(&mut iov, r);
        }
        // Each data page's checksum, from guest memory now that the page is there.
        let mut mismatched = Vec::new();
        let mut copy = [0u8; PAGE];
        for (i, &gpa) in data.iter().enumerate() {
            copy_page(&self.0, gpa, &mut copy)?;
            if crcs.get(i) != Some(&crc32c::crc32c(&copy)) {
                mismatched.push(gpa);
            }
        }
        for &gpa in zero {
            let at = page_ptr(&self.0, gpa)?;
            // SAFETY: `page_ptr` checked that the page lies in one mapped region, kept mapped
            // by `self.0`; the same as `place` zeroing a zero page.
            unsafe { std::ptr::write_bytes(at, 0, PAGE) };
        }
        Ok(mismatched)
    }
}

/// Bytes of a page.
const PAGE: usize = 4096;

/// The host address of the page at `gpa` in `mem`: one page inside one mapped region. The guard
/// `ptr_guard_mut` returns unmaps only Xen's foreign mappings; this memory is plain `mmap`ed
/// (`GuestMemoryMmap` without the `xen` feature), whose guard does nothing on drop, so the
/// address stays valid as long as `mem` holds the region.
fn page_ptr(mem: &crate::layout::GuestMemory, gpa: u64) -> std::io::Result<*mut u8> {
    let slice = mem
        .get_slice(GuestAddress(gpa), PAGE)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    Ok(slice.ptr_guard_mut().as_ptr())
}

/// Copies the page at `gpa` in `mem` into `out` with volatile word reads (guest memory that
/// the guest, or on the target a faulty source's other stream, may write meanwhile is never
/// read through a Rust reference); returns whether any byte is non-zero.
fn copy_page(
    mem: &crate::layout::GuestMemory,
    gpa: u64,
    out: &mut [u8; PAGE],
) -> std::io::Result<bool> {
    let at = page_ptr(mem, gpa)?.cast::<u64>();
    let (words, _) = out.as_chunks_mut::<8>();
    let mut any = 0u64;
    for (i, w) in words.iter_mut().enumerate() {
        // SAFETY: `page_ptr` checked that the page at `gpa` lies in one mapped region, which
        // `mem` keeps mapped; the page is 4096-aligned (regions are mapped page-aligned and
        // `gpa` is page-aligned), so each of its 512 u64 is aligned and inside it. A volatile
        // read sees some value of the word even while it is being written.
        let v = unsafe { std::ptr::read_volatile(at.add(i)) };
        any |= v;
        *w = v.to_ne_bytes();
    }
    Ok(any != 0)
}

/// Whether the page at `gpa` in `mem` is all zeros, read where it lies with volatile word reads,
/// eight words at a time (a data page usually differs in its first words).
fn is_zero_in_place(mem: &crate::layout::GuestMemory, gpa: u64) -> std::io::Result<bool> {
    let at = page_ptr(mem, gpa)?.cast::<u64>();
    let words = PAGE / 8;
    let mut i = 0;
    while i < words {
        let mut any = 0u64;
        for k in 0..8 {
            // SAFETY: `page_ptr` checked that the page at `gpa` lies in one mapped region,
            // which `mem` keeps mapped; the page is 4096-aligned (regions are mapped
            // page-aligned and `gpa` is page-aligned), so every u64 is aligned and in it.
            // The guest may write the page meanwhile: volatile reads of guest memory (never a
            // Rust reference to it) see some value of each word.
            any |= unsafe { std::ptr::read_volatile(at.add(i + k)) };
        }
        if any != 0 {
            return Ok(false);
        }
        i += 8;
    }
    Ok(true)
}

/// `iovec`s for the pages at `gpas` in `mem`, pages adjacent in host memory joined into one.
fn page_iovecs(
    mem: &crate::layout::GuestMemory,
    gpas: &[u64],
    out: &mut Vec<libc::iovec>,
) -> std::io::Result<()> {
    for &gpa in gpas {
        let at = page_ptr(mem, gpa)?;
        match out.last_mut() {
            Some(last) if (last.iov_base as usize).wrapping_add(last.iov_len) == at as usize => {
                last.iov_len += PAGE
            }
            _ => out.push(libc::iovec {
                iov_base: at.cast(),
                iov_len: PAGE,
            }),
        }
    }
    Ok(())
}

/// Drops the first `n` bytes of `iov` (a partial `readv` / `writev`).
fn advance_iovecs(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut whole = 0;
    for v in iov.iter_mut() {
        if n < v.iov_len {
            v.iov_base = (v.iov_base as usize + n) as *mut libc::c_void;
            v.iov_len -= n;
            break;
        }
        n -= v.iov_len;
        whole += 1;
    }
    iov.drain(..whole);
}

/// The source's guest memory as the data streams send it in place (`PageData` frames): pages
/// are checked for zero where they lie and written to the socket from there with `writev`.
/// It holds its own handle on the memory's mappings (the VM also outlives every migration of
/// it), so they stay mapped while a frame that names them is queued.
struct SendInPlace(crate::layout::GuestMemory);

impl tern_migration::GuestPages for SendInPlace {
    fn check(&self, gpa: u64) -> Result<Option<u32>, VmError> {
        // A zero page is read once, word by word, as before there were page checksums; a data
        // page (usually told by its first words) is then read whole into a buffer and its
        // checksum taken there. The guest may write the page meanwhile (and before `writev`
        // sends it): the target then finds the checksum does not match and waits for the next
        // round's copy, which the dirty log has; a page zeroed in between goes as data, its
        // checksum that of zeros.
        if is_zero_in_place(&self.0, gpa)? {
            return Ok(None);
        }
        let mut copy = [0u8; PAGE];
        copy_page(&self.0, gpa, &mut copy)?;
        Ok(Some(crc32c::crc32c(&copy)))
    }

    fn write_frame(
        &self,
        socket: std::os::fd::BorrowedFd<'_>,
        head: &[u8],
        pages: &[u64],
        skip: usize,
    ) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(1 + pages.len());
        let mut first = 0;
        let mut into_page = 0;
        if skip < head.len() {
            iov.push(libc::iovec {
                iov_base: head[skip..].as_ptr() as *mut libc::c_void,
                iov_len: head.len() - skip,
            });
        } else {
            first = (skip - head.len()) / PAGE;
            into_page = (skip - head.len()) % PAGE;
        }
        let Some(rest) = pages.get(first..).filter(|r| !r.is_empty()) else {
            return Ok(0);
        };
        let start = iov.len();
        page_iovecs(&self.0, rest, &mut iov)?;
        if into_page > 0 {
            advance_iovecs_from(&mut iov, start, into_page);
        }
        let n = iov.len().min(1024) as libc::c_int;
        // SAFETY: every iovec points into `head` (borrowed for this call) or into a page of
        // guest memory that `page_ptr` checked lies in a mapped region, which `self.0` keeps
        // mapped; `writev` only reads them. The guest may write those pages while the kernel
        // copies them: the bytes sent are then some mix of old and new, which the dirty log
        // has for the next round (and which does not match the page's checksum in the head).
        let r = unsafe { libc::writev(socket.as_raw_fd(), iov.as_ptr(), n) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

/// Drops the first `n` bytes of the iovecs from index `from` on (`n` within the first).
fn advance_iovecs_from(iov: &mut Vec<libc::iovec>, from: usize, n: usize) {
    let mut tail = iov.split_off(from);
    advance_iovecs(&mut tail, n);
    iov.extend(tail);
}

/// Post-copy's missing pages as tern-migration sees them.
#[derive(Debug)]
struct PostCopyPages(crate::uffd::MissingPages);

impl tern_migration::MissingMemory for PostCopyPages {
    fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, VmError> {
        Ok(self.0.next_fault(timeout)?)
    }

    fn place(&self, gpa: u64, data: &[u8]) -> Result<bool, VmError> {
        Ok(self.0.place(gpa, data)?)
    }

    fn place_zero(&self, gpa: u64) -> Result<bool, VmError> {
        Ok(self.0.place_zero(gpa)?)
    }
}

/// How long a migrated-away source keeps forwarding the frames for the guest that still reach its
/// taps ([`forward_late_frames`]), from after the target's acknowledgement. A frame lands here
/// only if its sender's host bridge had not yet learnt the guest's new port from the target's
/// announce when the frame passed it; the announce went out before the acknowledgement, so what
/// is still on the way is at most a bridge/veth queue behind (the lost request seen under
/// `cargo xtask bench net-migrate --dirty-mib 256` reached the source's tap 0.13 ms before the
/// announce). 5 ms covers that queueing many times over on a loaded host, and costs only the
/// source's exit: the guest already runs on the target and the migration's answer went out.
pub const LATE_FRAME_WINDOW: Duration = Duration::from_millis(5);

/// The pause between two reads of the taps within [`LATE_FRAME_WINDOW`].
pub const LATE_FRAME_POLL: Duration = Duration::from_micros(500);

/// Runs `forward` once at once and again after each `poll` slept through `sleep`, until `window`
/// was slept: `window / poll + 1` passes at most (the last sleep is cut to fit), so the work is
/// bounded even if `sleep` oversleeps. Returns the sum of what `forward` returned.
fn forward_for(
    window: Duration,
    poll: Duration,
    mut forward: impl FnMut() -> usize,
    mut sleep: impl FnMut(Duration),
) -> usize {
    let mut sent = forward();
    let mut slept = Duration::ZERO;
    while slept < window && !poll.is_zero() {
        let step = poll.min(window - slept);
        sleep(step);
        slept += step;
        sent += forward();
    }
    sent
}

/// On the source, once the migration completed (the target acknowledged, so its announce went
/// out) and just before this VMM stops: forwards for [`LATE_FRAME_WINDOW`] the frames for the
/// guest that reached the taps after the state was saved ([`Vm::forward_late_frames`]), so a
/// request that arrived during the switch-over reaches the target instead of waiting out TCP's
/// retransmission timeout. Never after a failed migration: the resumed VM reads its taps itself.
/// Uses only `read`, `write` and `nanosleep`, which every thread's seccomp filter allows.
/// Returns the frames forwarded.
pub fn forward_late_frames(vm: &Vm) -> usize {
    forward_for(
        LATE_FRAME_WINDOW,
        LATE_FRAME_POLL,
        || vm.forward_late_frames(),
        std::thread::sleep,
    )
}

/// Whether this process's VM may still run: cleared for good once another copy has run it.
struct RunGuard {
    /// A post-copy migration failed after the switch: its memory is stale (the target ran the
    /// guest), so it must never run again, here or elsewhere.
    post_copy_lost: AtomicBool,
    /// The migration completed: the target runs the guest, and this paused copy only waits to
    /// stop (forwarding late frames first).
    migrated_away: AtomicBool,
}

impl RunGuard {
    const fn new() -> RunGuard {
        RunGuard {
            post_copy_lost: AtomicBool::new(false),
            migrated_away: AtomicBool::new(false),
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.migrated_away.load(Ordering::SeqCst) {
            return Err(
                "this VM has migrated away: the target runs it, so this paused copy is stale \
                 and is stopping"
                    .into(),
            );
        }
        if self.post_copy_lost.load(Ordering::SeqCst) {
            return Err(
                "this VM's post-copy migration failed after the switch: the target ran it, \
                 so this paused copy is stale and must not run again (stop it and start the \
                 VM from its disks)"
                    .into(),
            );
        }
        Ok(())
    }
}

static RUN_GUARD: RunGuard = RunGuard::new();

/// Records that this VM's post-copy migration failed after the switch (outcome
/// `failed_post_copy`): from now on [`may_run_again`] refuses.
pub fn post_copy_lost() {
    RUN_GUARD.post_copy_lost.store(true, Ordering::SeqCst);
}

/// Records that this VM's migration completed: from now on [`may_run_again`] refuses (the
/// source stays up a few ms after it to forward late frames, still serving its API).
pub fn migrated_away() {
    RUN_GUARD.migrated_away.store(true, Ordering::SeqCst);
}

/// Whether this VM may be resumed, migrated or snapshotted again: not after a failed post-copy,
/// nor after a completed migration.
pub fn may_run_again() -> Result<(), String> {
    RUN_GUARD.check()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use tern_migration::GuestPages;
    use tern_migration::vm::PagePlacer;

    const P: u64 = PAGE as u64;

    /// Guest memory of `pages` pages at 0, page `i` filled with bytes derived from `i` and
    /// `seed` (so every byte position differs from its neighbours').
    fn memory(pages: u64, seed: u8) -> crate::layout::GuestMemory {
        let mem =
            crate::layout::GuestMemory::from_ranges(&[(GuestAddress(0), (pages * P) as usize)])
                .unwrap();
        for i in 0..pages {
            mem.write_slice(&page_bytes(i, seed), GuestAddress(i * P))
                .unwrap();
        }
        mem
    }

    fn page_bytes(i: u64, seed: u8) -> Vec<u8> {
        (0..PAGE)
            .map(|k| (k as u64 * 7 + i * 13 + u64::from(seed)) as u8)
            .collect()
    }

    fn page_at(mem: &crate::layout::GuestMemory, gpa: u64) -> Vec<u8> {
        let mut v = vec![0u8; PAGE];
        mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    #[test]
    fn advancing_iovecs_drops_whole_ones_and_cuts_into_the_next() {
        let buf = [0u8; 3 * PAGE];
        let base = buf.as_ptr() as usize;
        let v = |off: usize, len: usize| libc::iovec {
            iov_base: (base + off) as *mut libc::c_void,
            iov_len: len,
        };
        let shape = |iov: &[libc::iovec]| {
            iov.iter()
                .map(|v| (v.iov_base as usize - base, v.iov_len))
                .collect::<Vec<_>>()
        };
        let mut iov = vec![v(0, 100), v(100, 2 * PAGE), v(5000, 50)];
        advance_iovecs(&mut iov, 30);
        assert_eq!(shape(&iov), [(30, 70), (100, 2 * PAGE), (5000, 50)]);
        // Exactly to the end of the first: it goes, the next is whole.
        advance_iovecs(&mut iov, 70);
        assert_eq!(shape(&iov), [(100, 2 * PAGE), (5000, 50)]);
        // Across a boundary into the last.
        advance_iovecs(&mut iov, 2 * PAGE + 20);
        assert_eq!(shape(&iov), [(5020, 30)]);
        advance_iovecs(&mut iov, 30);
        assert!(iov.is_empty());
        // From an index on: the ones before stay.
        let mut iov = vec![v(0, 10), v(10, PAGE), v(10 + PAGE, PAGE)];
        advance_iovecs_from(&mut iov, 1, PAGE + 1);
        assert_eq!(shape(&iov), [(0, 10), (11 + PAGE, PAGE - 1)]);
    }

    /// Shrinks a socket's send buffer so that writes stop at arbitrary points.
    fn small_send_buffer(s: &UnixStream) {
        use std::os::fd::AsRawFd;
        let size: libc::c_int = 4608;
        // SAFETY: setsockopt on a socket this test owns, with a pointer to a live c_int and
        // its size.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
    }

    /// `write_frame` resumed at whatever byte the socket stopped at (inside the head, at its
    /// end, inside a page, on a page boundary, inside a run of adjacent pages) sends exactly
    /// the rest of the head and the pages.
    #[test]
    fn a_frame_written_in_place_resumes_exactly_where_a_partial_write_stopped() {
        let src = memory(8, 1);
        let send = SendInPlace(src.clone());
        let head: Vec<u8> = (0..37u8).collect();
        let pages = [0, P, 3 * P, 4 * P, 6 * P];
        let mut want = head.clone();
        for &gpa in &pages {
            want.extend_from_slice(&page_at(&src, gpa));
        }
        let starts = [0, 5, 37, 38, 37 + PAGE, 37 + 2 * PAGE + 1, want.len() - 1];
        for start in starts {
            let (a, mut b) = UnixStream::pair().unwrap();
            small_send_buffer(&a);
            a.set_nonblocking(true).unwrap();
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut chunk = [0u8; 1000];
                loop {
                    match b.read(&mut chunk).unwrap() {
                        0 => return got,
                        n => got.extend_from_slice(&chunk[..n]),
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
            });
            let (mut at, mut calls) = (start, 0);
            while at < want.len() {
                match send.write_frame(a.as_fd(), &head, &pages, at) {
                    Ok(n) => {
                        assert!(n > 0, "no progress at byte {at}");
                        at += n;
                        calls += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(100))
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            drop(a);
            let got = reader.join().unwrap();
            assert_eq!(got.len(), want.len() - start, "from byte {start}");
            assert!(got == want[start..], "from byte {start}: bytes differ");
            if start == 0 {
                assert!(calls > 3, "the small buffer forces partial writes: {calls}");
            }
        }
    }

    /// `read_into` reads a frame's data in as many `readv` calls as the socket needs, each
    /// stopping wherever the bytes ran out, into the right pages; leaves the next frame's bytes
    /// on the stream; zeroes the zero pages; and names the pages whose checksum differs.
    #[test]
    fn pages_read_in_place_land_whole_across_partial_reads_and_are_checked() {
        let src = memory(8, 1);
        let dst = memory(8, 9);
        let data = [0, 2 * P, 3 * P, 5 * P];
        let mut crcs: Vec<u32> = data
            .iter()
            .map(|&g| crc32c::crc32c(&page_at(&src, g)))
            .collect();
        crcs[2] ^= 1; // as if page 3 had been rewritten after its check on the source
        let mut stream = Vec::new();
        for &gpa in &data {
            stream.extend_from_slice(&page_at(&src, gpa));
        }
        stream.extend_from_slice(b"next frame");
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            for chunk in stream.chunks(777) {
                a.write_all(chunk).unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let placer = GuestPlacer(dst.clone());
        let mismatched = placer.read_into(b.as_fd(), &data, &crcs, &[6 * P]).unwrap();
        assert_eq!(mismatched, [3 * P]);
        writer.join().unwrap();
        for gpa in data {
            assert!(page_at(&dst, gpa) == page_at(&src, gpa), "page {gpa:#x}");
        }
        assert!(page_at(&dst, 6 * P).iter().all(|&x| x == 0), "zero page");
        for untouched in [P, 4 * P, 7 * P] {
            assert!(page_at(&dst, untouched) == page_bytes(untouched / P, 9));
        }
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"next frame");
    }

    #[test]
    fn a_page_is_checked_as_zero_or_by_its_checksum_in_one_read() {
        let src = memory(2, 3);
        src.write_slice(&[0u8; PAGE], GuestAddress(P)).unwrap();
        let send = SendInPlace(src.clone());
        assert_eq!(
            send.check(0).unwrap(),
            Some(crc32c::crc32c(&page_bytes(0, 3)))
        );
        assert_eq!(send.check(P).unwrap(), None);
        // One byte at the very end makes it data.
        src.write_slice(&[1], GuestAddress(2 * P - 1)).unwrap();
        let mut last = vec![0u8; PAGE];
        last[PAGE - 1] = 1;
        assert_eq!(send.check(P).unwrap(), Some(crc32c::crc32c(&last)));
        assert!(send.check(2 * P).is_err(), "outside the memory");
    }

    #[test]
    fn a_copy_that_migrated_away_or_lost_its_post_copy_may_not_run_again() {
        let g = RunGuard::new();
        assert_eq!(g.check(), Ok(()));
        g.migrated_away.store(true, Ordering::SeqCst);
        assert!(g.check().unwrap_err().contains("migrated away"));
        let g = RunGuard::new();
        g.post_copy_lost.store(true, Ordering::SeqCst);
        assert!(g.check().unwrap_err().contains("post-copy"));
    }

    #[test]
    fn late_frames_are_forwarded_for_a_bounded_window() {
        let mut calls = 0;
        let mut slept = Vec::new();
        let sent = forward_for(
            Duration::from_millis(5),
            Duration::from_micros(1500),
            || {
                calls += 1;
                // Two frames come in on the first read, one on the third.
                match calls {
                    1 => 2,
                    3 => 1,
                    _ => 0,
                }
            },
            |d| slept.push(d),
        );
        assert_eq!(sent, 3);
        // Once at once, then after each of 1.5, 1.5, 1.5 and the remaining 0.5 ms.
        assert_eq!(calls, 5);
        assert_eq!(slept.iter().sum::<Duration>(), Duration::from_millis(5));
        assert_eq!(slept.last(), Some(&Duration::from_micros(500)));
        // A zero poll reads once and never loops.
        let mut n = 0;
        forward_for(
            Duration::from_millis(5),
            Duration::ZERO,
            || {
                n += 1;
                0
            },
            |_| {},
        );
        assert_eq!(n, 1);
    }
}

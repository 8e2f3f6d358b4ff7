//! A VM built from a [`VmConfig`] (`vm/create.rs`: one builder step per concern) and controlled:
//! pause, resume, stop, status, and its saved state (the aggregate of [`crate::persist`]).

mod create;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_irqchip,
    kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::signal::{Killable, SIGRTMIN};

use crate::boot::{self, BootEntry, BootPlan};
use crate::config::VmConfig;
use crate::devices::virtio_blk::BlkCounters;
use crate::devices::{self, Devices};
use crate::layout::GuestMemory;
use crate::persist::RestoreStateError;
use crate::state::{ClockState, IrqchipState, PitState, VmState};
use crate::vcpu::{Control, VcpuCommand, VmExit, Want};

/// How long pause/resume wait for every vCPU to answer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartVmError {
    /// /dev/kvm is missing or not permitted.
    #[error(
        "cannot open /dev/kvm (load the kvm module and run as root or as a member of the kvm group)"
    )]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM allows fewer vCPUs than asked.
    #[error("--vcpus {asked} is more than this host's KVM allows ({max}); give at most {max}")]
    TooManyVcpus {
        /// Asked.
        asked: u8,
        /// KVM's limit.
        max: usize,
    },
    /// A KVM call failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {mib} MiB of guest memory (give a smaller --memory-mib)")]
    Memory {
        /// Size.
        mib: u64,
        /// The cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// The boot protocol failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The MP table could not be built or written.
    #[error("cannot write the MP table")]
    MpTable,
    /// A disk could not be opened.
    #[error(transparent)]
    Disk(#[from] devices::virtio_blk::BlockOpenError),
    /// A NIC's tap could not be opened.
    #[error(transparent)]
    Tap(#[from] devices::tap::TapError),
    /// The serial output file could not be opened.
    #[error("cannot open serial output {path} (give a writable path)")]
    SerialFile {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd, thread or signal could not be set up.
    #[error("cannot set up {what}")]
    Os {
        /// What.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StartVmError {
    move |source| StartVmError::Kvm { what, source }
}

/// Why a control request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// The VM is stopping or stopped.
    #[error("the VM is not running (it is stopping)")]
    NotRunning,
    /// Resume of a VM that is not paused.
    #[error("the VM is not paused")]
    NotPaused,
    /// State taken or restored while the VM runs.
    #[error("the VM must be paused first")]
    MustBePaused,
    /// Dirty bitmaps asked for without dirty logging.
    #[error("dirty logging is off")]
    DirtyLoggingOff,
    /// A vCPU did not answer in time.
    #[error("vCPU threads did not answer within {0:?}")]
    Timeout(Duration),
    /// A KVM call failed.
    #[error("KVM {what} failed: {cause}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The cause.
        cause: kvm_ioctls::Error,
    },
}

/// How often a dirty-rate sample's window looks whether someone waits to turn dirty logging on
/// ([`Vm::sample_dirty_rate`]): a migration starting during a sample waits at most this long.
pub const DIRTY_RATE_SLICE: Duration = Duration::from_millis(1);

/// Why a dirty-rate sample was refused or failed ([`Vm::sample_dirty_rate`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirtyRateError {
    /// The window is too short to mean anything or too long to hold dirty logging.
    #[error("dirty-rate window of {window_ms} ms is out of range (give {min} to {max} ms)")]
    Window {
        /// The window asked for.
        window_ms: u64,
        /// The shortest accepted.
        min: u64,
        /// The longest accepted.
        max: u64,
    },
    /// Dirty logging is on: a migration owns it.
    #[error(
        "dirty logging is in use by a migration under way; sample the dirty rate after it ends"
    )]
    LoggingBusy,
    /// Dirty logging could not be turned on, read or turned off.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// One guest RAM region and its KVM memory slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegionInfo {
    /// The KVM slot.
    pub slot: u32,
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The dirty pages of one region: bit `i` of word `i / 64` is page `i` (4 KiB) of the region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// The region.
    pub region: MemoryRegionInfo,
    /// The bitmap.
    pub bits: Vec<u64>,
}

impl DirtyBitmap {
    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Guest-physical addresses of the dirty pages.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(move |(w, &word)| {
            (0..64)
                .filter(move |b| word & (1u64 << b) != 0)
                .map(move |b| self.region.guest_addr + ((w as u64) * 64 + b) * 4096)
        })
    }
}

// The status types are the control protocol's, defined in `tern-api` so clients need no KVM.
pub use tern_api::vmm::{DiskStatus, RunState, VmStatus};

struct VcpuHandle {
    commands: Sender<VcpuCommand>,
    thread: JoinHandle<()>,
}

struct Shared {
    kvm_vm: VmFd,
    dirty_logging: Mutex<bool>,
    /// Callers of [`Vm::set_dirty_logging`] waiting for `dirty_logging`: a dirty-rate sample
    /// holding it ends its window early when this is not 0 (a migration does not wait for it).
    dirty_logging_wanted: AtomicU32,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is on: a dirty-log read leaves the pages writable and
    /// their bits set until [`Vm::clear_dirty_pages`] (see [`enable_manual_dirty_protect`]).
    manual_dirty_protect: bool,
    control: Arc<Control>,
    devices: Arc<Devices>,
    vcpus: Mutex<Vec<VcpuHandle>>,
    tids: Arc<Mutex<Vec<(u8, i32)>>>,
    config: VmConfig,
    started: Instant,
    boot: BootPlan,
    tsc_khz: u32,
    cpuid0: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// The MSRs saved with each vCPU (what a restored vCPU state may carry).
    msr_list: Vec<u32>,
}

/// A running VM. Cloning gives another handle to the same VM.
#[derive(Clone)]
pub struct Vm {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.shared.config.name)
            .finish_non_exhaustive()
    }
}

vmm_sys_util::ioctl_iowr_nr!(
    kvm_clear_dirty_log_nr,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_bindings::kvm_clear_dirty_log
);

/// Turns on KVM's manual dirty-log protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`) where the
/// host offers it, on a new VM fd (the thread that creates VMs is never under a seccomp filter).
/// Then `KVM_GET_DIRTY_LOG` only copies the bitmap: pages are write-protected again by
/// `KVM_CLEAR_DIRTY_LOG`, range by range, when the caller asks ([`Vm::clear_dirty_pages`]),
/// rather than all at once inside every read. Without it (an older kernel) the classic
/// read-and-protect is used. `KVM_DIRTY_LOG_INITIALLY_SET` is not asked for: round 0 skips the
/// pages known to be zero, which would then stay dirty. Returns whether it is on.
pub(crate) fn enable_manual_dirty_protect(fd: &VmFd) -> bool {
    let cap = kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
    let offered = fd.check_extension_raw(libc::c_ulong::from(cap));
    let enable = kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
    if offered < 0 || (offered as u32) & enable == 0 {
        return false;
    }
    let mut c = kvm_bindings::kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = u64::from(enable);
    fd.enable_cap(&c).is_ok()
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

impl Vm {
    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.shared.config
    }

    /// The guest's memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.shared.devices.mem
    }

    /// The KVM VM (for dirty logging and other VM-wide ioctls).
    pub fn kvm_vm(&self) -> &VmFd {
        &self.shared.kvm_vm
    }

    /// Thread IDs of the vCPU threads, in vCPU order.
    pub fn vcpu_tids(&self) -> Vec<i32> {
        let mut t = self
            .shared
            .tids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        t.sort();
        t.into_iter().map(|(_, tid)| tid).collect()
    }

    fn kick_all(&self) {
        for h in self.vcpus().iter() {
            // A thread that already left cannot be kicked and needs no kick.
            let _ = h.thread.kill(kick_signal());
        }
    }

    fn vcpus(&self) -> std::sync::MutexGuard<'_, Vec<VcpuHandle>> {
        self.shared.vcpus.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops every vCPU at an instruction boundary; returns once all are parked.
    pub fn pause(&self) -> Result<(), ControlError> {
        let control = &self.shared.control;
        {
            let mut g = control.lock();
            match g.want {
                Want::Stop => return Err(ControlError::NotRunning),
                Want::Pause => {}
                Want::Run => g.want = Want::Pause,
            }
        }
        self.kick_all();
        let n = usize::from(self.shared.config.vcpus);
        let g = control.lock();
        let (g, timeout) = control
            .cv
            .wait_timeout_while(g, CONTROL_TIMEOUT, |g| {
                g.want == Want::Pause && g.parked < n
            })
            .unwrap_or_else(|e| e.into_inner());
        if g.want == Want::Stop {
            return Err(ControlError::NotRunning);
        }
        if timeout.timed_out() {
            return Err(ControlError::Timeout(CONTROL_TIMEOUT));
        }
        self.shared.devices.set_net_paused(true);
        Ok(())
    }

    /// Lets every parked vCPU continue where it stopped.
    pub fn resume(&self) -> Result<(), ControlError> {
        let control = &self.shared.control;
        {
            let mut g = control.lock();
            match g.want {
                Want::Stop => return Err(ControlError::NotRunning),
                Want::Run => return Err(ControlError::NotPaused),
                Want::Pause => g.want = Want::Run,
            }
        }
        self.shared.devices.set_net_paused(false);
        if self.shared.devices.take_announce_pending() {
            let _ = self.announce_network();
        }
        for h in self.vcpus().iter() {
            let _ = h.commands.send(VcpuCommand::Resume);
        }
        let g = control.lock();
        let (_g, timeout) = control
            .cv
            .wait_timeout_while(g, CONTROL_TIMEOUT, |g| g.want == Want::Run && g.parked > 0)
            .unwrap_or_else(|e| e.into_inner());
        if timeout.timed_out() {
            return Err(ControlError::Timeout(CONTROL_TIMEOUT));
        }
        Ok(())
    }

    /// Asks the VM to stop; [`Vm::wait`] then returns [`VmExit::Stopped`].
    pub fn request_stop(&self) {
        self.shared.control.request_exit(VmExit::Stopped);
    }

    /// The VM's status.
    pub fn status(&self) -> VmStatus {
        let n = usize::from(self.shared.config.vcpus);
        let state = {
            let g = self.shared.control.lock();
            match g.want {
                Want::Stop => RunState::Stopping,
                Want::Pause if g.parked == n => RunState::Paused,
                Want::Run if g.parked == 0 => RunState::Running,
                _ => RunState::Transitioning,
            }
        };
        let disks = self
            .shared
            .config
            .disks
            .iter()
            .zip(self.shared.devices.blocks.iter())
            .map(|(d, (_, dev))| {
                let c: BlkCounters = dev.lock().unwrap_or_else(|e| e.into_inner()).counters();
                DiskStatus {
                    path: d.path.display().to_string(),
                    readonly: d.readonly,
                    reads: c.reads,
                    writes: c.writes,
                    flushes: c.flushes,
                    discards: c.discards,
                    write_zeroes: c.write_zeroes,
                    errors: c.errors,
                }
            })
            .collect();
        VmStatus {
            name: self.shared.config.name.clone(),
            pid: std::process::id(),
            state,
            vcpus: self.shared.config.vcpus,
            vcpu_tids: self.vcpu_tids(),
            memory_mib: self.shared.config.memory_mib,
            boot: match self.shared.boot.entry {
                BootEntry::Pvh { .. } => "pvh".into(),
                BootEntry::Linux64 { .. } => "linux64".into(),
            },
            tsc_khz: self.shared.tsc_khz,
            uptime_ms: self.shared.started.elapsed().as_millis() as u64,
            disks,
        }
    }

    /// Blocks until the VM stops, stops every vCPU thread, and says why it stopped.
    pub fn wait(&self) -> VmExit {
        let control = &self.shared.control;
        let exit = {
            let mut g = control.lock();
            while g.exit.is_none() {
                g = control.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.exit.clone().unwrap_or(VmExit::Stopped)
        };
        let handles: Vec<VcpuHandle> = std::mem::take(&mut *self.vcpus());
        for h in &handles {
            let _ = h.commands.send(VcpuCommand::Stop);
            let _ = h.thread.kill(kick_signal());
        }
        for h in handles {
            let _ = h.thread.join();
        }
        self.shared.devices.flush();
        exit
    }

    /// Takes the whole VM's state (guest memory apart). The VM must be paused.
    pub fn save_state(&self) -> Result<VmState, ControlError> {
        self.ensure_paused()?;
        let mut vcpus = Vec::new();
        for h in self.vcpus().iter() {
            let (tx, rx) = channel();
            h.commands
                .send(VcpuCommand::Save(tx))
                .map_err(|_| ControlError::NotRunning)?;
            let s = rx
                .recv_timeout(CONTROL_TIMEOUT)
                .map_err(|_| ControlError::Timeout(CONTROL_TIMEOUT))?
                .map_err(|source| ControlError::Kvm {
                    what: "vCPU state",
                    cause: source,
                })?;
            vcpus.push(s);
        }
        let vm = &self.shared.kvm_vm;
        let chip = |id| -> Result<kvm_irqchip, ControlError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c).map_err(|source| ControlError::Kvm {
                what: "KVM_GET_IRQCHIP",
                cause: source,
            })?;
            Ok(c)
        };
        let irqchip = IrqchipState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        };
        let pit = PitState(vm.get_pit2().map_err(|source| ControlError::Kvm {
            what: "KVM_GET_PIT2",
            cause: source,
        })?);
        let clock = ClockState(vm.get_clock().map_err(|source| ControlError::Kvm {
            what: "KVM_GET_CLOCK",
            cause: source,
        })?);
        let devices = self.shared.devices.save();
        Ok(VmState {
            vcpus,
            irqchip,
            pit,
            clock,
            devices,
            saved_at_realtime_ns: crate::state::realtime_ns(),
        })
    }

    /// Puts a saved state back into a paused VM built from the same configuration.
    ///
    /// Every part is checked first — the vCPU count, each vCPU's id, XSAVE size and MSRs, the
    /// interrupt controllers' chip ids, the device slots and each device's state — and a state
    /// that does not fit is refused with the part named, the VM left exactly as it was. Only
    /// then is it applied: PIT, kvmclock, irqchips, vCPUs, devices. A KVM refusal while
    /// applying ([`RestoreStateError::Apply`]) leaves the VM partly restored: stop it.
    pub fn restore_state(&self, state: &VmState) -> Result<(), RestoreStateError> {
        self.ensure_paused().map_err(RestoreStateError::NotPaused)?;
        self.check_state(state)?;
        let vm = &self.shared.kvm_vm;
        let kvm = |what| move |cause| RestoreStateError::Apply(ControlError::Kvm { what, cause });
        // Guest time keeps real time: the TSC and kvmclock move on by the wall-clock time that
        // passed since the state was taken (on this host or on the source host).
        let elapsed_ns = if state.saved_at_realtime_ns == 0 {
            0
        } else {
            crate::state::realtime_ns().saturating_sub(state.saved_at_realtime_ns)
        };
        let tsc_ticks =
            (u128::from(elapsed_ns) * u128::from(self.shared.tsc_khz) / 1_000_000) as u64;
        vm.set_pit2(&state.pit.0).map_err(kvm("KVM_SET_PIT2"))?;
        vm.set_clock(&kvm_bindings::kvm_clock_data {
            clock: state.clock.0.clock.wrapping_add(elapsed_ns),
            flags: 0,
            ..Default::default()
        })
        .map_err(kvm("KVM_SET_CLOCK"))?;
        for c in [
            &state.irqchip.pic_master,
            &state.irqchip.pic_slave,
            &state.irqchip.ioapic,
        ] {
            vm.set_irqchip(c).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        for (h, s) in self.vcpus().iter().zip(state.vcpus.iter()) {
            let (tx, rx) = channel();
            let mut s = s.clone();
            for m in s.msrs.iter_mut().filter(|m| m.index == 0x10) {
                m.data = m.data.wrapping_add(tsc_ticks);
            }
            h.commands
                .send(VcpuCommand::Restore(Box::new(s), tx))
                .map_err(|_| RestoreStateError::Apply(ControlError::NotRunning))?;
            rx.recv_timeout(CONTROL_TIMEOUT)
                .map_err(|_| RestoreStateError::Apply(ControlError::Timeout(CONTROL_TIMEOUT)))?
                .map_err(kvm("vCPU state"))?;
        }
        self.shared.devices.restore(&state.devices)
    }

    /// Checks that `state` fits this VM (see [`Vm::restore_state`]); changes nothing.
    pub fn check_state(&self, state: &VmState) -> Result<(), RestoreStateError> {
        let vcpus = self.vcpus().len();
        if state.vcpus.len() != vcpus {
            return Err(RestoreStateError::VcpuCount {
                state: state.vcpus.len(),
                vm: vcpus,
            });
        }
        for (index, v) in state.vcpus.iter().enumerate() {
            v.check(index, &self.shared.msr_list)
                .map_err(|source| RestoreStateError::Vcpu { index, source })?;
        }
        for (which, chip, expected) in [
            (
                "master PIC",
                &state.irqchip.pic_master,
                KVM_IRQCHIP_PIC_MASTER,
            ),
            ("slave PIC", &state.irqchip.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            ("IOAPIC", &state.irqchip.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != expected {
                return Err(RestoreStateError::Irqchip {
                    which,
                    expected,
                    found: chip.chip_id,
                });
            }
        }
        self.shared.devices.check(&state.devices)
    }

    /// Announces every NIC's new location on the network (RARP, and gratuitous ARP when the
    /// guest's IPv4 address is known) out of its tap, on the configured schedule: the rounds due
    /// at once on this thread before it returns, the rest from a thread whose handle yields the
    /// number of frames it sent. The resume after `restore_state` calls it before the vCPUs run.
    pub fn announce_network(&self) -> std::io::Result<JoinHandle<usize>> {
        let (now, later) = self.shared.config.announce.split_now();
        for _ in 0..now {
            self.shared.devices.announce_round();
        }
        devices::spawn_announcer(self.shared.devices.clone(), later)
    }

    /// A migrated-away source, just before it exits: sends the frames for the guest that reached
    /// its taps after the state was saved back out, to where the target's announce moved the
    /// guest (`crate::migrate::forward_late_frames` runs it for a bounded time); returns how many.
    pub fn forward_late_frames(&self) -> usize {
        self.shared.devices.forward_late_frames()
    }

    /// The CPUID entries vCPU 0 was given.
    pub fn cpuid(&self) -> &[kvm_bindings::kvm_cpuid_entry2] {
        &self.shared.cpuid0
    }

    /// Drops the console's partial output line instead of writing it: for a VM that continues
    /// elsewhere (the line went with its state and comes out whole there).
    pub fn discard_pending_output(&self) {
        self.shared
            .devices
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_pending_output(&[]);
    }

    /// Queues `data` on the serial port's receive side, waiting up to `wait` for the guest to
    /// make room in the FIFO (all of it goes in, or none).
    pub fn console_input(
        &self,
        data: &[u8],
        wait: Duration,
    ) -> Result<(), devices::serial::ConsoleInputError> {
        let deadline = Instant::now() + wait;
        loop {
            let queued = self
                .shared
                .devices
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(data);
            match queued {
                Err(devices::serial::ConsoleInputError::FifoFull { .. })
                    if Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    /// The TSC frequency the guest runs with, kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.shared.tsc_khz
    }

    /// Gives every guest RAM page back to the host, so that all guest memory reads as zero (the
    /// kernel and tables loaded at creation included). For a VM that is about to receive a
    /// snapshot or a migration: only non-zero pages are written then. The VM must be paused.
    pub fn zero_memory(&self) -> Result<(), ControlError> {
        self.ensure_paused()?;
        let mem = self.memory();
        for region in mem.iter() {
            let host =
                mem.get_host_address(region.start_addr())
                    .map_err(|_| ControlError::Kvm {
                        what: "guest memory address",
                        cause: kvm_ioctls::Error::new(libc::EFAULT),
                    })?;
            // SAFETY: `host` and `region.len()` describe one private anonymous mapping owned by
            // this VM's memory; MADV_DONTNEED only replaces its pages with zero pages, and no
            // vCPU runs (the VM is paused).
            let rc =
                unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTNEED) };
            if rc != 0 {
                return Err(ControlError::Kvm {
                    what: "madvise(MADV_DONTNEED)",
                    cause: kvm_ioctls::Error::last(),
                });
            }
        }
        Ok(())
    }

    /// The guest RAM regions, one KVM memory slot each.
    pub fn memory_regions(&self) -> Vec<MemoryRegionInfo> {
        self.memory()
            .iter()
            .enumerate()
            .map(|(slot, r)| MemoryRegionInfo {
                slot: slot as u32,
                guest_addr: r.start_addr().raw_value(),
                size: r.len(),
            })
            .collect()
    }

    fn register_slots(&self, flags: u32) -> Result<(), ControlError> {
        let mem = self.memory();
        for (slot, region) in mem.iter().enumerate() {
            let host =
                mem.get_host_address(region.start_addr())
                    .map_err(|_| ControlError::Kvm {
                        what: "guest memory address",
                        cause: kvm_ioctls::Error::new(libc::EFAULT),
                    })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the same live mapping, owned by this VM's memory, is registered again for
            // the same slot with other flags; nothing else changes.
            unsafe { self.shared.kvm_vm.set_user_memory_region(r) }.map_err(|source| {
                ControlError::Kvm {
                    what: "KVM_SET_USER_MEMORY_REGION",
                    cause: source,
                }
            })?;
        }
        Ok(())
    }

    /// Turns KVM's dirty-page logging on or off for all guest RAM. Turning it on also clears the
    /// VMM-side bitmap, so that [`Vm::take_dirty_bitmaps`] reports writes from then on.
    pub fn set_dirty_logging(&self, enabled: bool) -> Result<(), ControlError> {
        self.shared
            .dirty_logging_wanted
            .fetch_add(1, Ordering::SeqCst);
        let mut on = self
            .shared
            .dirty_logging
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.shared
            .dirty_logging_wanted
            .fetch_sub(1, Ordering::SeqCst);
        let flags = if enabled {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        self.register_slots(flags)?;
        if enabled {
            for r in self.memory().iter() {
                vm_memory::mmap::MmapRegion::bitmap(r).reset();
            }
        }
        *on = enabled;
        Ok(())
    }

    /// The pages written since the previous call (or since logging was turned on), per region:
    /// KVM's log of guest writes OR'd with the VMM's own writes. Reading clears both (and
    /// write-protects the pages again, all at once).
    pub fn take_dirty_bitmaps(&self) -> Result<Vec<DirtyBitmap>, ControlError> {
        let maps = self.peek_dirty_bitmaps()?;
        if self.shared.manual_dirty_protect {
            for (i, m) in maps.iter().enumerate() {
                self.clear_dirty_pages(i, 0, &m.bits)?;
            }
        }
        Ok(maps)
    }

    /// Whether KVM runs in manual dirty-log protection here: [`Vm::peek_dirty_bitmaps`] then
    /// leaves the pages writable until [`Vm::clear_dirty_pages`].
    pub fn dirty_log_manual_protect(&self) -> bool {
        self.shared.manual_dirty_protect
    }

    /// As [`Vm::take_dirty_bitmaps`], but with manual protection
    /// ([`Vm::dirty_log_manual_protect`]) KVM's bits stay set and the pages stay writable: a
    /// later read reports them again until [`Vm::clear_dirty_pages`] clears them (the caller
    /// clears a range just before it copies it, so writes between the read and the copy cost
    /// the guest nothing and are not reported twice). The VMM's own bitmap is reset either way.
    /// Without manual protection this is [`Vm::take_dirty_bitmaps`].
    pub fn peek_dirty_bitmaps(&self) -> Result<Vec<DirtyBitmap>, ControlError> {
        if !*self
            .shared
            .dirty_logging
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            return Err(ControlError::DirtyLoggingOff);
        }
        let mut out = Vec::new();
        for (info, region) in self.memory_regions().into_iter().zip(self.memory().iter()) {
            let mut bits = self
                .shared
                .kvm_vm
                .get_dirty_log(info.slot, info.size as usize)
                .map_err(|source| ControlError::Kvm {
                    what: "KVM_GET_DIRTY_LOG",
                    cause: source,
                })?;
            let vmm = vm_memory::mmap::MmapRegion::bitmap(region).get_and_reset();
            for (k, v) in bits.iter_mut().zip(vmm.iter()) {
                *k |= *v;
            }
            out.push(DirtyBitmap { region: info, bits });
        }
        Ok(out)
    }

    /// With manual protection: clears KVM's dirty bits of region `region` set in `bits` (bit `i`
    /// of word `i / 64` is page `first_page + i`) and write-protects those pages again
    /// (`KVM_CLEAR_DIRTY_LOG`). `first_page` must be a multiple of 64; bits past the region's end
    /// are ignored. Without manual protection (or with no bit set) it does nothing.
    pub fn clear_dirty_pages(
        &self,
        region: usize,
        first_page: u64,
        bits: &[u64],
    ) -> Result<(), ControlError> {
        if !self.shared.manual_dirty_protect || bits.iter().all(|w| *w == 0) {
            return Ok(());
        }
        let bad = |errno| ControlError::Kvm {
            what: "KVM_CLEAR_DIRTY_LOG",
            cause: kvm_ioctls::Error::new(errno),
        };
        let info = self
            .memory_regions()
            .into_iter()
            .nth(region)
            .ok_or(bad(libc::EINVAL))?;
        let region_pages = info.size / 4096;
        if !first_page.is_multiple_of(64) || first_page >= region_pages {
            return Err(bad(libc::EINVAL));
        }
        // KVM wants a multiple of 64 pages unless the range ends at the slot's end.
        let pages = (bits.len() as u64 * 64).min(region_pages - first_page);
        let mut words = bits[..pages.div_ceil(64) as usize].to_vec();
        if !pages.is_multiple_of(64) {
            let last = words.len() - 1;
            words[last] &= (1u64 << (pages % 64)) - 1;
        }
        let mut clear = kvm_bindings::kvm_clear_dirty_log {
            slot: info.slot,
            num_pages: u32::try_from(pages).map_err(|_| bad(libc::EINVAL))?,
            first_page,
            ..Default::default()
        };
        clear.__bindgen_anon_1.dirty_bitmap = words.as_mut_ptr().cast();
        // SAFETY: KVM_CLEAR_DIRTY_LOG reads `num_pages` bits from `dirty_bitmap`, which points
        // at `words` (at least `num_pages.div_ceil(64)` u64s), alive until the call returns; the
        // structure is the kernel's layout (kvm-bindings).
        let r = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(
                &self.shared.kvm_vm,
                kvm_clear_dirty_log_nr(),
                &clear,
            )
        };
        if r < 0 {
            return Err(ControlError::Kvm {
                what: "KVM_CLEAR_DIRTY_LOG",
                cause: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }

    /// Measures how fast the guest dirties its memory: turns KVM's dirty logging on for `window`,
    /// counts the pages written meanwhile (KVM's log OR'd with the VMM's own writes) and turns
    /// logging off again. It holds the dirty-logging lock throughout; a migration starting
    /// meanwhile ends the window early (checked every [`DIRTY_RATE_SLICE`]: the sample reports
    /// the window it really had) and then arms logging itself; while logging is on (a migration
    /// owns it) the sample is refused. The guest pays one write-protection fault per
    /// page it dirties in the window (a few µs each here); the VMM's own cost is in `cost_us`.
    pub fn sample_dirty_rate(
        &self,
        window: Duration,
    ) -> Result<tern_api::vmm::DirtyRate, DirtyRateError> {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        if !(tern_api::vmm::DIRTY_RATE_WINDOW_MS.0..=tern_api::vmm::DIRTY_RATE_WINDOW_MS.1)
            .contains(&window_ms)
        {
            return Err(DirtyRateError::Window {
                window_ms,
                min: tern_api::vmm::DIRTY_RATE_WINDOW_MS.0,
                max: tern_api::vmm::DIRTY_RATE_WINDOW_MS.1,
            });
        }
        let on = self
            .shared
            .dirty_logging
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *on {
            return Err(DirtyRateError::LoggingBusy);
        }
        let t0 = Instant::now();
        self.register_slots(kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)?;
        for r in self.memory().iter() {
            vm_memory::mmap::MmapRegion::bitmap(r).reset();
        }
        let armed = Instant::now();
        // The window, in slices, cut short when a migration (or anything else turning logging
        // on or off) waits for the lock: it then starts at once and the sample counts what it
        // saw so far.
        loop {
            let left = window.saturating_sub(armed.elapsed());
            if left.is_zero() || self.shared.dirty_logging_wanted.load(Ordering::SeqCst) != 0 {
                break;
            }
            std::thread::sleep(left.min(DIRTY_RATE_SLICE));
        }
        let read_at = Instant::now();
        let mut pages = 0u64;
        let mut counted = Ok(());
        for (info, region) in self.memory_regions().into_iter().zip(self.memory().iter()) {
            match self
                .shared
                .kvm_vm
                .get_dirty_log(info.slot, info.size as usize)
            {
                Ok(mut bits) => {
                    let vmm = vm_memory::mmap::MmapRegion::bitmap(region).get_and_reset();
                    for (k, v) in bits.iter_mut().zip(vmm.iter()) {
                        *k |= *v;
                    }
                    pages += bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
                }
                Err(cause) => {
                    counted = Err(ControlError::Kvm {
                        what: "KVM_GET_DIRTY_LOG",
                        cause,
                    });
                    break;
                }
            }
        }
        // Logging goes off even when the count failed.
        let off = self.register_slots(0);
        let done = Instant::now();
        counted?;
        off?;
        let measured = read_at - armed;
        let measured_us = measured.as_micros().max(1);
        Ok(tern_api::vmm::DirtyRate {
            pages,
            window_ms: u64::try_from(measured.as_millis()).unwrap_or(u64::MAX),
            pages_per_s: u64::try_from(u128::from(pages) * 1_000_000 / measured_us)
                .unwrap_or(u64::MAX),
            cost_us: u64::try_from(((armed - t0) + (done - read_at)).as_micros())
                .unwrap_or(u64::MAX),
        })
    }

    fn ensure_paused(&self) -> Result<(), ControlError> {
        let n = usize::from(self.shared.config.vcpus);
        let g = self.shared.control.lock();
        match g.want {
            Want::Pause if g.parked == n => Ok(()),
            Want::Stop => Err(ControlError::NotRunning),
            _ => Err(ControlError::MustBePaused),
        }
    }
}

/// Faults the guest RAM at `gpa..gpa + len` in, writable, in one call
/// (`madvise(MADV_POPULATE_WRITE)`): pages already there keep their contents, absent ones
/// become zero pages, as a first write would make them, without a page fault each. For a
/// migration target, before the received pages are copied in (`crate::migrate`). `Ok(false)`
/// if this kernel lacks the flag (before Linux 5.14: `EINVAL`); an error if the range is not
/// inside one guest RAM region or the kernel refuses otherwise (no memory: `ENOMEM`, `EFAULT`).
pub fn populate_write(mem: &GuestMemory, gpa: u64, len: u64) -> Result<bool, ControlError> {
    let fault = |cause| ControlError::Kvm {
        what: "madvise(MADV_POPULATE_WRITE)",
        cause,
    };
    let len = usize::try_from(len).map_err(|_| fault(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let slice = mem
        .get_slice(GuestAddress(gpa), len)
        .map_err(|_| fault(kvm_ioctls::Error::new(libc::EFAULT)))?;
    let guard = slice.ptr_guard_mut();
    // SAFETY: `get_slice` checked that the `len` bytes at `gpa` lie in one mapped region of
    // `mem`, which stays mapped while the guard lives; MADV_POPULATE_WRITE only faults the
    // range's pages in (present ones are left as they are), it changes no byte of it.
    let rc = unsafe { libc::madvise(guard.as_ptr().cast(), len, libc::MADV_POPULATE_WRITE) };
    if rc == 0 {
        return Ok(true);
    }
    let e = kvm_ioctls::Error::last();
    if e.errno() == libc::EINVAL {
        return Ok(false);
    }
    Err(fault(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn populate_write_keeps_written_pages_and_leaves_the_rest_zero() {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 16 * 4096),
            (GuestAddress(0x10_0000), 4 * 4096),
        ])
        .unwrap();
        mem.write_slice(&[0xab; 4096], GuestAddress(2 * 4096))
            .unwrap();
        // Linux 5.14 or later has the flag; on an older kernel this test fails (by design:
        // the migration target then falls back to faulting page by page).
        assert!(populate_write(&mem, 0, 16 * 4096).unwrap());
        assert!(populate_write(&mem, 0x10_0000 + 4096, 4096).unwrap());
        let mut page = [1u8; 4096];
        mem.read_slice(&mut page, GuestAddress(2 * 4096)).unwrap();
        assert_eq!(page, [0xab; 4096]);
        for gpa in [0, 4096, 15 * 4096, 0x10_0000 + 4096] {
            mem.read_slice(&mut page, GuestAddress(gpa)).unwrap();
            assert_eq!(page, [0; 4096], "page at {gpa:#x}");
        }
        // Across the end of a region, or outside guest RAM: refused, nothing touched.
        assert!(populate_write(&mem, 15 * 4096, 2 * 4096).is_err());
        assert!(populate_write(&mem, 0x20_0000, 4096).is_err());
    }
}

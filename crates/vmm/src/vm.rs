//! Building a VM from a [`VmConfig`] and controlling it: pause, resume, stop, status, state.

use std::io::Write;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, Msrs, kvm_irqchip, kvm_msr_entry, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::boot::{self, BootEntry, BootPlan};
use crate::config::{SerialOutput, VmConfig};
use crate::cpuid::{self, CpuidParams};
use crate::devices::serial::{COM1_GSI, SerialDevice};
use crate::devices::virtio_blk::{BlkCounters, VirtioBlk};
use crate::devices::virtio_net::{self, VirtioNet};
use crate::devices::{self, Devices};
use crate::layout::{self, GuestMemory};
use crate::mptable;
use crate::state::{ClockState, DevicesState, IrqchipState, PitState, SAVED_MSRS, VmState};
use crate::vcpu::{Control, VcpuCommand, VcpuThread, VmExit, Want, kick_handler};

/// How long pause/resume wait for every vCPU to answer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// The TSS KVM needs below 4 GiB (three pages), out of the way of RAM and devices.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

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

/// The run state reported by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// Every vCPU is parked.
    Paused,
    /// Pausing or resuming is under way.
    Transitioning,
    /// The VM is stopping.
    Stopping,
}

/// What `status` answers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VmStatus {
    /// The VM's name.
    pub name: String,
    /// The VMM's process ID.
    pub pid: u32,
    /// Run state.
    pub state: RunState,
    /// vCPU count.
    pub vcpus: u8,
    /// Thread IDs of the vCPU threads, by index.
    pub vcpu_tids: Vec<i32>,
    /// Guest memory.
    pub memory_mib: u64,
    /// "pvh" or "linux64".
    pub boot: String,
    /// TSC frequency given to the guest.
    pub tsc_khz: u32,
    /// Milliseconds since the VM started.
    pub uptime_ms: u64,
    /// Per-disk request counters.
    pub disks: Vec<DiskStatus>,
}

/// One disk's status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskStatus {
    /// The image.
    pub path: String,
    /// Read-only.
    pub readonly: bool,
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Failed requests.
    pub errors: u64,
}

struct VcpuHandle {
    commands: Sender<VcpuCommand>,
    thread: JoinHandle<()>,
}

struct Shared {
    kvm_vm: VmFd,
    dirty_logging: Mutex<bool>,
    control: Arc<Control>,
    devices: Arc<Devices>,
    vcpus: Mutex<Vec<VcpuHandle>>,
    tids: Arc<Mutex<Vec<(u8, i32)>>>,
    config: VmConfig,
    started: Instant,
    boot: BootPlan,
    tsc_khz: u32,
    cpuid0: Vec<kvm_bindings::kvm_cpuid_entry2>,
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

static KICK_HANDLER: Once = Once::new();

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

fn serial_out(cfg: &VmConfig) -> Result<Box<dyn Write + Send>, StartVmError> {
    Ok(match &cfg.serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Null => Box::new(std::io::sink()),
        SerialOutput::File(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| StartVmError::SerialFile {
                    path: p.display().to_string(),
                    source,
                })?,
        ),
    })
}

fn eventfd() -> Result<EventFd, StartVmError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| StartVmError::Os {
        what: "an eventfd",
        source,
    })
}

/// MSRs set on every vCPU at boot: the SYSCALL/SYSENTER MSRs cleared, fast strings on, the MTRRs
/// enabled with write-back as the default type.
fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(0x174, 0),
        e(0x175, 0),
        e(0x176, 0),
        e(0xc000_0081, 0),
        e(0xc000_0082, 0),
        e(0xc000_0083, 0),
        e(0xc000_0084, 0),
        e(0xc000_0102, 0),
        e(0x1a0, 1),             // MISC_ENABLE: fast strings
        e(0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ]
}

/// Points LINT0 at the PIC (ExtINT) and LINT1 at NMI, as firmware would.
fn setup_lapic(fd: &VcpuFd) -> Result<(), StartVmError> {
    let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (off, mode) in [(0x350usize, 0x700u32), (0x360, 0x400)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | mode;
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as libc::c_char;
        }
    }
    fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

impl Vm {
    /// Builds the VM: KVM, memory, irqchip, PIT, devices, the kernel, and one thread per vCPU.
    /// The vCPUs are parked before their first instruction: call [`Vm::resume`] to run the guest
    /// (after registering the VM, or after [`Vm::restore_state`] on a migration target).
    pub fn create(cfg: VmConfig) -> Result<Vm, StartVmError> {
        let kvm = Kvm::new().map_err(StartVmError::OpenKvm)?;
        let max = kvm.get_max_vcpus();
        if usize::from(cfg.vcpus) > max {
            return Err(StartVmError::TooManyVcpus {
                asked: cfg.vcpus,
                max,
            });
        }
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let regions: Vec<(GuestAddress, usize)> = layout::ram_regions(cfg.memory_bytes())
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        let mem = GuestMemory::from_ranges(&regions).map_err(|source| StartVmError::Memory {
            mib: cfg.memory_mib,
            source,
        })?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|_| StartVmError::MpTable)?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the VM keeps (through the
            // devices) for as long as the VM fd exists; the slots do not overlap.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        // Devices.
        let serial_irq = eventfd()?;
        vm.register_irqfd(&serial_irq, COM1_GSI)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial = SerialDevice::new(serial_irq, serial_out(&cfg)?);
        let mut blocks = Vec::new();
        for (i, d) in cfg.disks.iter().enumerate() {
            let slot = layout::virtio_slot(i);
            let irq = eventfd()?;
            vm.register_irqfd(&irq, layout::virtio_slot_gsi(slot))
                .map_err(kvm_err("KVM_IRQFD (virtio-blk)"))?;
            blocks.push((slot, Mutex::new(VirtioBlk::open(&d.path, d.readonly, irq)?)));
        }
        let mut nets = Vec::new();
        for (i, n) in cfg.nets.iter().enumerate() {
            let slot = layout::virtio_slot(cfg.disks.len() + i);
            let irq = eventfd()?;
            vm.register_irqfd(&irq, layout::virtio_slot_gsi(slot))
                .map_err(kvm_err("KVM_IRQFD (virtio-net)"))?;
            let tap = devices::tap::Tap::open(&n.tap)?;
            if let Some(bridge) = &n.bridge {
                tap.attach_to_bridge(bridge)?;
            }
            let dev = VirtioNet::new(Box::new(tap), n.mac, n.ip, irq).map_err(|source| {
                StartVmError::Os {
                    what: "virtio-net eventfd",
                    source,
                }
            })?;
            nets.push((slot, Arc::new(Mutex::new(dev))));
        }
        let devices = Arc::new(Devices {
            serial: Mutex::new(serial),
            blocks,
            nets,
            announce_pending: Default::default(),
            mem: mem.clone(),
        });
        for (_, d) in &devices.nets {
            virtio_net::spawn_rx_thread(Arc::downgrade(d), mem.clone()).map_err(|source| {
                StartVmError::Os {
                    what: "virtio-net RX thread",
                    source,
                }
            })?;
        }

        // Firmware tables and the kernel.
        let mp = mptable::build(layout::MPTABLE_START, usize::from(cfg.vcpus))
            .map_err(|_| StartVmError::MpTable)?;
        mem.write_slice(&mp, GuestAddress(layout::MPTABLE_START))
            .map_err(|_| StartVmError::MpTable)?;
        let mut cmdline = cfg.cmdline.clone();
        let extra = devices.linux_cmdline();
        if !extra.is_empty() {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&extra);
        }
        let plan = boot::load(&cfg, &mem, &cmdline)?;

        // vCPUs.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_index = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let msr_list: Vec<u32> = SAVED_MSRS
            .iter()
            .copied()
            .filter(|m| msr_index.as_slice().contains(m))
            .collect();
        let mut fds = Vec::new();
        let mut tsc_khz = 0;
        let mut cpuid0 = Vec::new();
        for id in 0..cfg.vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            if id == 0 {
                tsc_khz = fd.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
            }
            let entries = cpuid::shape(
                supported.as_slice(),
                CpuidParams {
                    vcpu_id: id,
                    vcpus: cfg.vcpus,
                    tsc_khz,
                },
            );
            let cpuid = CpuId::from_entries(&entries).map_err(|_| StartVmError::Kvm {
                what: "CPUID (too many entries)",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            if id == 0 {
                cpuid0 = entries.clone();
            }
            let msrs = Msrs::from_entries(&boot_msrs()).map_err(|_| StartVmError::Kvm {
                what: "MSRs",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            // MSRs this KVM refuses are left at their reset values: set_msrs stops at the first.
            let _ = fd.set_msrs(&msrs);
            setup_lapic(&fd)?;
            if id == 0 {
                let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                let regs = boot::boot_registers(plan.entry, &mut sregs);
                fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
                fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
                fd.set_fpu(&boot::boot_fpu())
                    .map_err(kvm_err("KVM_SET_FPU"))?;
            }
            fds.push((id, fd, entries));
        }

        let mut sig_err = None;
        KICK_HANDLER.call_once(|| {
            if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
                sig_err = Some(e);
            }
        });
        if let Some(e) = sig_err {
            return Err(StartVmError::Os {
                what: "the vCPU kick signal",
                source: std::io::Error::from_raw_os_error(e.errno()),
            });
        }

        let control = Arc::new(Control::new_paused());
        let tids = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for (id, fd, entries) in fds {
            let (tx, rx) = channel();
            let t = VcpuThread {
                id,
                fd,
                devices: devices.clone(),
                control: control.clone(),
                commands: rx,
                tids: tids.clone(),
                msr_list: msr_list.clone(),
                cpuid: entries,
            };
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let control = t.control.clone();
                    let id = t.id;
                    // A bug in a device model must stop the VM with a report, not leave it hung.
                    if let Err(panic) =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.run()))
                    {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        control.request_exit(VmExit::Fault {
                            vcpu: id,
                            report: format!("vCPU {id}: the VMM's vCPU thread panicked: {what}"),
                        });
                    }
                })
                .map_err(|source| StartVmError::Os {
                    what: "a vCPU thread",
                    source,
                })?;
            handles.push(VcpuHandle {
                commands: tx,
                thread,
            });
        }
        let handles_len = handles.len();
        let vm = Vm {
            shared: Arc::new(Shared {
                kvm_vm: vm,
                dirty_logging: Mutex::new(false),
                control,
                devices,
                vcpus: Mutex::new(handles),
                tids,
                config: cfg,
                started: Instant::now(),
                boot: plan,
                tsc_khz,
                cpuid0,
            }),
        };
        // Every vCPU thread registers its TID and parks before running guest code.
        let n = handles_len;
        let timed_out = {
            let control = &vm.shared.control;
            let g = control.lock();
            let (_g, timeout) = control
                .cv
                .wait_timeout_while(g, CONTROL_TIMEOUT, |g| g.parked < n)
                .unwrap_or_else(|e| e.into_inner());
            timeout.timed_out()
        };
        if timed_out {
            return Err(StartVmError::Os {
                what: "the vCPU threads",
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            });
        }
        Ok(vm)
    }

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
        let serial = {
            let mut dev = self
                .shared
                .devices
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut regs: crate::state::SerialRegs = (&dev.state()).into();
            regs.pending_output = dev.pending_output();
            regs
        };
        let devices = DevicesState {
            serial,
            blocks: self
                .shared
                .devices
                .blocks
                .iter()
                .map(|(slot, d)| (*slot, d.lock().unwrap_or_else(|e| e.into_inner()).state()))
                .collect(),
            nets: self.shared.devices.net_states(),
        };
        Ok(VmState {
            vcpus,
            irqchip,
            pit,
            clock,
            devices,
            saved_at_realtime_ns: crate::state::realtime_ns(),
        })
    }

    /// Puts a saved state back. The VM must be paused and built from the same configuration.
    pub fn restore_state(&self, state: &VmState) -> Result<(), ControlError> {
        self.ensure_paused()?;
        let vm = &self.shared.kvm_vm;
        let kvm = |what| move |cause| ControlError::Kvm { what, cause };
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
                .map_err(|_| ControlError::NotRunning)?;
            rx.recv_timeout(CONTROL_TIMEOUT)
                .map_err(|_| ControlError::Timeout(CONTROL_TIMEOUT))?
                .map_err(kvm("vCPU state"))?;
        }
        {
            let mut dev = self
                .shared
                .devices
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let _ = dev.restore(&(&state.devices.serial).into());
            dev.set_pending_output(&state.devices.serial.pending_output);
        }
        for ((slot, d), (s_slot, s)) in self.shared.devices.blocks.iter().zip(&state.devices.blocks)
        {
            if slot == s_slot {
                d.lock().unwrap_or_else(|e| e.into_inner()).restore(s);
            }
        }
        self.shared.devices.restore_nets(&state.devices.nets);
        Ok(())
    }

    /// Announces every NIC's new location on the network (RARP, and gratuitous ARP when the
    /// guest's IPv4 address is known) out of its tap, on the configured schedule, from a thread;
    /// the handle yields the number of frames sent. The resume after `restore_state` calls it.
    pub fn announce_network(&self) -> std::io::Result<JoinHandle<usize>> {
        devices::spawn_announcer(
            self.shared.devices.clone(),
            self.shared.config.announce.clone(),
        )
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
        let mut on = self
            .shared
            .dirty_logging
            .lock()
            .unwrap_or_else(|e| e.into_inner());
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
    /// KVM's log of guest writes OR'd with the VMM's own writes. Reading clears both.
    pub fn take_dirty_bitmaps(&self) -> Result<Vec<DirtyBitmap>, ControlError> {
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

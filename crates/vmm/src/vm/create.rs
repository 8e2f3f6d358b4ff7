//! Building a VM from a validated [`VmConfig`], one step per concern:
//!
//! 1. [`VmBuilder::machine`]: open KVM, check the vCPU limit, create the VM with its TSS, the
//!    in-kernel irqchip and the PIT;
//! 2. [`VmBuilder::memory`]: guest RAM (with or without transparent huge pages) and its KVM
//!    memory slots;
//! 3. [`VmBuilder::devices`]: COM1, the disks and the NICs, with their interrupt lines;
//! 4. [`VmBuilder::boot`]: the MP table, the command line and the kernel;
//! 5. [`VmBuilder::vcpus`]: one KVM vCPU per index, with its CPUID, boot MSRs, LAPIC and (vCPU
//!    0) boot registers;
//! 6. [`VmBuilder::start`]: one thread per vCPU, each parked before its first instruction.
//!
//! Each step only adds to what the earlier ones made; an error drops everything built so far.

use std::io::Write;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::Instant;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, Msrs, kvm_cpuid_entry2, kvm_msr_entry,
    kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{FromRangesError, MmapRegion, MmapRegionError};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

use super::{CONTROL_TIMEOUT, Shared, StartVmError, VcpuHandle, Vm, kick_signal, kvm_err};
use crate::boot::{self, BootPlan};
use crate::config::{HugePages, SerialOutput, VmConfig};
use crate::cpuid::{self, CpuidParams};
use crate::devices::serial::{COM1_GSI, SerialDevice};
use crate::devices::virtio_blk::VirtioBlk;
use crate::devices::virtio_net::{self, VirtioNet};
use crate::devices::{self, Devices};
use crate::layout::{self, GuestMemory};
use crate::mptable;
use crate::state::SAVED_MSRS;
use crate::vcpu::{Control, VcpuThread, VmExit, kick_handler};

/// The TSS KVM needs below 4 GiB (three pages), out of the way of RAM and devices.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

static KICK_HANDLER: Once = Once::new();

impl Vm {
    /// Builds the VM: KVM, memory, irqchip, PIT, devices, the kernel, and one thread per vCPU
    /// (the steps of `VmBuilder` in `vm/create.rs`). The vCPUs are parked before their first instruction: call
    /// [`Vm::resume`] to run the guest (after registering the VM, or after
    /// [`Vm::restore_state`] on a migration target).
    pub fn create(cfg: VmConfig) -> Result<Vm, StartVmError> {
        let b = VmBuilder::machine(cfg)?;
        let mem = b.memory()?;
        let devices = b.devices(&mem)?;
        let plan = b.boot(&mem, &devices)?;
        let vcpus = b.vcpus(&plan)?;
        b.start(devices, plan, vcpus)
    }
}

/// A VM under construction: KVM and the VM's file descriptor, and the configuration it follows.
pub(super) struct VmBuilder {
    cfg: VmConfig,
    kvm: Kvm,
    fd: VmFd,
}

/// The vCPUs made by [`VmBuilder::vcpus`], not yet running.
pub(super) struct Vcpus {
    /// Index, KVM vCPU and the CPUID it was given.
    fds: Vec<(u8, VcpuFd, Vec<kvm_cpuid_entry2>)>,
    /// The MSRs saved with each vCPU (those of [`SAVED_MSRS`] this KVM lists).
    msr_list: Vec<u32>,
    tsc_khz: u32,
}

impl VmBuilder {
    /// Opens KVM, checks the vCPU count against its limit, and creates the VM with its TSS, the
    /// in-kernel irqchip (PIC, IOAPIC, LAPICs) and the PIT.
    pub(super) fn machine(cfg: VmConfig) -> Result<VmBuilder, StartVmError> {
        let kvm = Kvm::new().map_err(StartVmError::OpenKvm)?;
        let max = kvm.get_max_vcpus();
        if usize::from(cfg.vcpus) > max {
            return Err(StartVmError::TooManyVcpus {
                asked: cfg.vcpus,
                max,
            });
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(VmBuilder { cfg, kvm, fd })
    }

    /// Allocates guest RAM (with the 3–4 GiB gap), each region at a 2 MiB-aligned host address
    /// ([`map_guest_ram`]), advises it for huge pages or against them (`--huge-pages`), and
    /// registers each region as a KVM slot.
    pub(super) fn memory(&self) -> Result<GuestMemory, StartVmError> {
        let regions: Vec<(GuestAddress, usize)> = layout::ram_regions(self.cfg.memory_bytes())
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        let mem = map_guest_ram(&regions).map_err(|source| StartVmError::Memory {
            mib: self.cfg.memory_mib,
            source,
        })?;
        // Before KVM maps any of it and before the kernel is loaded: the first touches then
        // already take huge pages.
        advise_huge_pages(&mem, self.cfg.huge_pages)?;
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
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(mem)
    }

    /// COM1, then the disks and the NICs in virtio-mmio slot order, each with an irqfd; starts
    /// every NIC's RX thread.
    pub(super) fn devices(&self, mem: &GuestMemory) -> Result<Arc<Devices>, StartVmError> {
        let (cfg, vm) = (&self.cfg, &self.fd);
        let serial_irq = eventfd()?;
        vm.register_irqfd(&serial_irq, COM1_GSI)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial = SerialDevice::new(serial_irq, serial_out(cfg)?);
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
        Ok(devices)
    }

    /// Writes the MP table and loads the kernel (PVH or the Linux 64-bit protocol) with the
    /// command line, extended by the virtio-mmio device list for Linux.
    pub(super) fn boot(
        &self,
        mem: &GuestMemory,
        devices: &Devices,
    ) -> Result<BootPlan, StartVmError> {
        let mp = mptable::build(layout::MPTABLE_START, usize::from(self.cfg.vcpus))
            .map_err(|_| StartVmError::MpTable)?;
        mem.write_slice(&mp, GuestAddress(layout::MPTABLE_START))
            .map_err(|_| StartVmError::MpTable)?;
        let mut cmdline = self.cfg.cmdline.clone();
        let extra = devices.linux_cmdline();
        if !extra.is_empty() {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&extra);
        }
        Ok(boot::load(&self.cfg, mem, &cmdline)?)
    }

    /// Creates every vCPU: its shaped CPUID, the boot MSRs, the LAPIC's LINT pins, and on vCPU
    /// 0 the boot entry's registers.
    pub(super) fn vcpus(&self, plan: &BootPlan) -> Result<Vcpus, StartVmError> {
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_index = self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let msr_list: Vec<u32> = SAVED_MSRS
            .iter()
            .copied()
            .filter(|m| msr_index.as_slice().contains(m))
            .collect();
        let mut fds = Vec::new();
        let mut tsc_khz = 0;
        for id in 0..self.cfg.vcpus {
            let fd = self
                .fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            if id == 0 {
                tsc_khz = fd.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
            }
            let entries = cpuid::shape(
                supported.as_slice(),
                CpuidParams {
                    vcpu_id: id,
                    vcpus: self.cfg.vcpus,
                    tsc_khz,
                },
            );
            let cpuid = CpuId::from_entries(&entries).map_err(|_| StartVmError::Kvm {
                what: "CPUID (too many entries)",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
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
        Ok(Vcpus {
            fds,
            msr_list,
            tsc_khz,
        })
    }

    /// Installs the kick signal handler, starts one thread `vcpuN` per vCPU and waits until
    /// every one has registered its TID and parked.
    pub(super) fn start(
        self,
        devices: Arc<Devices>,
        plan: BootPlan,
        vcpus: Vcpus,
    ) -> Result<Vm, StartVmError> {
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

        let cpuid0 = vcpus
            .fds
            .first()
            .map(|(_, _, e)| e.clone())
            .unwrap_or_default();
        let control = Arc::new(Control::new_paused());
        let tids = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for (id, fd, entries) in vcpus.fds {
            let (tx, rx) = channel();
            let t = VcpuThread {
                id,
                fd,
                devices: devices.clone(),
                control: control.clone(),
                commands: rx,
                tids: tids.clone(),
                msr_list: vcpus.msr_list.clone(),
                cpuid: entries,
            };
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let control = t.control.clone();
                    let id = t.id;
                    crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Vcpu);
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
        let n = handles.len();
        let manual_dirty_protect = super::enable_manual_dirty_protect(&self.fd);
        let vm = Vm {
            shared: Arc::new(Shared {
                kvm_vm: self.fd,
                dirty_logging: Mutex::new(false),
                dirty_logging_wanted: std::sync::atomic::AtomicU32::new(0),
                manual_dirty_protect,
                control,
                devices,
                vcpus: Mutex::new(handles),
                tids,
                config: self.cfg,
                started: Instant::now(),
                boot: plan,
                tsc_khz: vcpus.tsc_khz,
                cpuid0,
                msr_list: vcpus.msr_list,
            }),
        };
        // Every vCPU thread registers its TID and parks before running guest code.
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
}

/// The host alignment of every guest RAM region: KVM maps the guest with 2 MiB pages only where
/// the guest-physical and host addresses agree modulo 2 MiB, and every region starts at a 2 MiB
/// multiple in guest-physical space (0 and 4 GiB).
const RAM_ALIGN: usize = 2 << 20;

/// The host's base page size (x86-64).
const PAGE_SIZE: usize = 4096;

/// The flags of every guest RAM mapping (those vm-memory's own anonymous regions use).
const RAM_MMAP_FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
const RAM_MMAP_PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;

/// A guest RAM mapping made by [`map_aligned`]: vm-memory's region over it does not own it (a
/// region built from a raw pointer never unmaps), so it is unmapped here once no region is left.
struct RamMapping {
    region: Weak<MmapRegion<AtomicBitmap>>,
    addr: usize,
    len: usize,
}

/// Every guest RAM mapping of this process still mapped.
static RAM_MAPPINGS: Mutex<Vec<RamMapping>> = Mutex::new(Vec::new());

/// Unmaps the guest RAM mappings no `GuestMemory` refers to any more (the VMs they served and
/// every clone of their memory are gone). Called before each new VM's memory is mapped; what a
/// process's last VM leaves goes with the process.
fn unmap_released_ram() {
    let mut maps = RAM_MAPPINGS.lock().unwrap_or_else(|e| e.into_inner());
    maps.retain(|m| {
        if m.region.strong_count() > 0 {
            return true;
        }
        // SAFETY: `[addr, addr + len)` is a mapping made by `map_aligned` and unmapped only
        // here, once: the entry is removed with it. Its one `MmapRegion` is dropped (no strong
        // reference is left, and a `Weak` cannot be upgraded again), so no `GuestMemory`, and
        // hence no guest memory access of this process, can reach these addresses any more.
        unsafe { libc::munmap(m.addr as *mut libc::c_void, m.len) };
        false
    });
}

/// Maps `len` bytes of private anonymous memory at a host address that is a multiple of
/// [`RAM_ALIGN`], whatever the kernel's placement: `len + RAM_ALIGN` bytes are mapped and the
/// slack before and after the aligned start is unmapped again. Linux ≥ 6.7 aligns large
/// anonymous mappings itself (since 6.13 only those whose length is a multiple of 2 MiB); older
/// kernels do not.
fn map_aligned(len: usize) -> std::io::Result<*mut u8> {
    if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let Some(total) = len.checked_add(RAM_ALIGN) else {
        return Err(std::io::Error::from_raw_os_error(libc::ENOMEM));
    };
    // SAFETY: a new anonymous mapping at an address the kernel chooses (no MAP_FIXED): it
    // replaces nothing of this process.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            RAM_MMAP_PROT,
            RAM_MMAP_FLAGS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = raw as usize;
    let start = base.next_multiple_of(RAM_ALIGN);
    let head = start - base;
    let tail = total - head - len;
    // SAFETY: `[base, start)` and `[start + len, base + total)` lie inside the mapping just made,
    // which nothing else knows of yet; `head` and `tail` are multiples of the page size (`base`
    // is page-aligned, `len` (checked above) and `RAM_ALIGN` are page multiples). Unmapping them
    // leaves `[start, start + len)` mapped.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
    }
    Ok(start as *mut u8)
}

/// Guest RAM: one private anonymous mapping per `(guest address, length)` region, each at a
/// 2 MiB-aligned host address ([`map_aligned`]), so that transparent huge pages can back it and
/// KVM can map it with 2 MiB pages on every kernel. The lengths are page multiples
/// (`layout::ram_regions`; any other is refused with `EINVAL`).
fn map_guest_ram(regions: &[(GuestAddress, usize)]) -> Result<GuestMemory, FromRangesError> {
    unmap_released_ram();
    let mut built = Vec::with_capacity(regions.len());
    for &(guest, len) in regions {
        let addr = map_aligned(len).map_err(MmapRegionError::Mmap)?;
        // SAFETY: `addr` and `len` are exactly the live mapping `map_aligned` just made, with
        // these prot and flags; nothing else refers to it. The region does not own it: the
        // mapping is registered below and unmapped by `unmap_released_ram` once this region is
        // dropped.
        let region = match unsafe {
            MmapRegion::<AtomicBitmap>::build_raw(addr, len, RAM_MMAP_PROT, RAM_MMAP_FLAGS)
        } {
            Ok(r) => Arc::new(r),
            Err(e) => {
                // SAFETY: the mapping `map_aligned` just made, which no region refers to.
                unsafe { libc::munmap(addr.cast(), len) };
                return Err(e.into());
            }
        };
        RAM_MAPPINGS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(RamMapping {
                region: Arc::downgrade(&region),
                addr: addr as usize,
                len,
            });
        built.push(
            GuestRegionMmap::with_arc(region, guest).ok_or(FromRangesError::InvalidGuestRegion)?,
        );
    }
    Ok(GuestMemory::from_regions(built)?)
}

/// `madvise(MADV_HUGEPAGE)` on every RAM region for [`HugePages::On`]; `MADV_NOHUGEPAGE` for
/// [`HugePages::Off`], so that off holds on a host whose THP mode is `always` too (a kernel
/// without THP refuses both with `EINVAL`: off is then what it is anyway). The advice belongs to
/// the mapping, so it outlives `MADV_DONTNEED` ([`Vm::zero_memory`]).
pub(crate) fn advise_huge_pages(
    mem: &GuestMemory,
    huge_pages: HugePages,
) -> Result<(), StartVmError> {
    let (advice, what) = match huge_pages {
        HugePages::On => (
            libc::MADV_HUGEPAGE,
            "madvise(MADV_HUGEPAGE) on guest memory",
        ),
        HugePages::Off => (
            libc::MADV_NOHUGEPAGE,
            "madvise(MADV_NOHUGEPAGE) on guest memory",
        ),
    };
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| StartVmError::Os {
                what,
                source: std::io::Error::from_raw_os_error(libc::EFAULT),
            })?;
        // SAFETY: `host` and `region.len()` describe one private anonymous mapping owned by
        // `mem`, alive for this call. MADV_HUGEPAGE and MADV_NOHUGEPAGE only set or clear a flag
        // of that mapping that says which page size later faults may use (and whether
        // khugepaged may collapse it); they change no byte of it and unmap nothing.
        let rc = unsafe { libc::madvise(host.cast(), region.len() as usize, advice) };
        if rc != 0 {
            let source = std::io::Error::last_os_error();
            if huge_pages == HugePages::Off && source.raw_os_error() == Some(libc::EINVAL) {
                continue;
            }
            return Err(StartVmError::Os { what, source });
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn registered(addr: usize) -> bool {
        RAM_MAPPINGS.lock().unwrap().iter().any(|m| m.addr == addr)
    }

    /// Every region sits at a 2 MiB-aligned host address whatever its length (odd MiB counts
    /// included), holds its length, and is unmapped once the last clone of the memory is gone.
    #[test]
    fn guest_ram_regions_are_2_mib_aligned_and_unmapped_once_released() {
        let mem = map_guest_ram(&[
            (GuestAddress(0), 65 << 20),
            (GuestAddress(4 << 30), 3 << 20),
        ])
        .unwrap();
        let clone = mem.clone();
        let mut addrs = Vec::new();
        for region in mem.iter() {
            let host = mem.get_host_address(region.start_addr()).unwrap() as usize;
            assert_eq!(host % RAM_ALIGN, 0, "region at {host:#x}");
            assert!(registered(host));
            addrs.push(host);
        }
        assert_eq!(
            mem.iter().map(|r| r.len()).collect::<Vec<_>>(),
            [65 << 20, 3 << 20]
        );
        // Writable to the last byte of each region.
        mem.write_slice(&[7], GuestAddress((65 << 20) - 1)).unwrap();
        mem.write_slice(&[9], GuestAddress((4 << 30) + (3 << 20) - 1))
            .unwrap();
        drop(mem);
        unmap_released_ram();
        assert!(
            addrs.iter().all(|&a| registered(a)),
            "a clone still holds it"
        );
        let mut b = [0u8];
        clone
            .read_slice(&mut b, GuestAddress((65 << 20) - 1))
            .unwrap();
        assert_eq!(b, [7]);
        drop(clone);
        unmap_released_ram();
        assert!(addrs.iter().all(|&a| !registered(a)));
    }

    #[test]
    fn a_length_that_is_not_a_page_multiple_is_refused() {
        for len in [0, 4095, (1 << 20) + 1] {
            let e = map_aligned(len).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{len}");
        }
    }
}

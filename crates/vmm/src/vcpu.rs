//! vCPU threads: the run loop, exit dispatch, the pause protocol and per-vCPU state save/restore.
//!
//! Pause protocol: the controller sets the wanted state to *pause* and sends each vCPU thread a
//! signal. The signal handler sets `immediate_exit` in that thread's `kvm_run`, so a `KVM_RUN`
//! about to start returns at once and one in progress returns `EINTR`. The thread then sees the
//! wanted state, runs `KVM_RUN` once more with `immediate_exit` set (KVM completes a pending I/O or
//! MMIO exit and returns without running guest code, so no exit is left half-handled), reports
//! itself parked and waits for commands (save, restore, resume, stop).

use std::cell::Cell;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};

use kvm_bindings::{Msrs, kvm_msr_entry, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::{Devices, IoAction};
use crate::state::VcpuState;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VmExit {
    /// The guest wrote this status to the exit port.
    PowerOff {
        /// The status.
        status: u8,
    },
    /// The guest asked for a reset (i8042 0xfe, or a KVM reset event).
    Reset,
    /// The control API or the host asked the VM to stop.
    Stopped,
    /// A vCPU hit a triple fault or an exit Tern does not handle.
    Fault {
        /// The vCPU.
        vcpu: u8,
        /// What happened, with the registers.
        report: String,
    },
}

/// What the controller wants the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
pub(crate) struct ControlInner {
    pub want: Want,
    pub parked: usize,
    pub exit: Option<VmExit>,
    pub exited_threads: usize,
}

/// State shared by the controller and the vCPU threads.
#[derive(Debug)]
pub(crate) struct Control {
    pub inner: Mutex<ControlInner>,
    pub cv: Condvar,
}

impl Control {
    /// Control of vCPUs that start parked, before running any guest code.
    pub fn new_paused() -> Self {
        Control {
            inner: Mutex::new(ControlInner {
                want: Want::Pause,
                parked: 0,
                exit: None,
                exited_threads: 0,
            }),
            cv: Condvar::new(),
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, ControlInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn want(&self) -> Want {
        self.lock().want
    }

    /// Records why the VM stops (the first reason wins) and asks every vCPU to stop.
    pub fn request_exit(&self, exit: VmExit) {
        let mut g = self.lock();
        if g.exit.is_none() {
            g.exit = Some(exit);
        }
        g.want = Want::Stop;
        self.cv.notify_all();
    }

    fn add_parked(&self, delta: isize) {
        let mut g = self.lock();
        g.parked = g.parked.saturating_add_signed(delta);
        self.cv.notify_all();
    }

    fn thread_exited(&self) {
        let mut g = self.lock();
        g.exited_threads += 1;
        self.cv.notify_all();
    }
}

/// Commands a parked vCPU thread serves.
pub(crate) enum VcpuCommand {
    Resume,
    Stop,
    Save(Sender<Result<VcpuState, kvm_ioctls::Error>>),
    Restore(Box<VcpuState>, Sender<Result<(), kvm_ioctls::Error>>),
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The handler of the kick signal: makes this thread's next or current `KVM_RUN` return.
pub(crate) extern "C" fn kick_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    let p = KVM_RUN.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: `p` points to the `kvm_run` mapping of the VcpuFd owned by this very thread,
        // set in `VcpuThread::run` and cleared before the VcpuFd is dropped; a volatile byte
        // store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
    }
}

/// Everything a vCPU thread owns.
pub(crate) struct VcpuThread {
    pub id: u8,
    pub fd: VcpuFd,
    pub devices: Arc<Devices>,
    pub control: Arc<Control>,
    pub commands: Receiver<VcpuCommand>,
    pub tids: Arc<Mutex<Vec<(u8, i32)>>>,
    pub msr_list: Vec<u32>,
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
}

enum Outcome {
    Continue,
    Exit(VmExit),
    Fault(String),
}

impl VcpuThread {
    /// The thread body.
    pub fn run(mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|c| c.set(run_ptr));
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        self.tids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((self.id, tid));
        self.run_loop();
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        self.devices.flush();
        self.control.thread_exited();
    }

    fn run_loop(&mut self) {
        loop {
            match self.control.want() {
                Want::Stop => return,
                Want::Pause => {
                    if !self.park() {
                        return;
                    }
                    continue;
                }
                Want::Run => {}
            }
            let outcome = match self.fd.run() {
                Ok(exit) => handle_exit(&self.devices, exit),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    Outcome::Continue
                }
                Err(e) => Outcome::Fault(format!("KVM_RUN failed: {e}")),
            };
            match outcome {
                Outcome::Continue => {}
                Outcome::Exit(exit) => {
                    self.control.request_exit(exit);
                    return;
                }
                Outcome::Fault(what) => {
                    let report = format!("vCPU {}: {what}\n{}", self.id, self.register_report());
                    self.control.request_exit(VmExit::Fault {
                        vcpu: self.id,
                        report,
                    });
                    return;
                }
            }
        }
    }

    /// Parks the thread; returns false when it must stop.
    fn park(&mut self) -> bool {
        // Complete a pending I/O or MMIO exit without entering the guest.
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        self.control.add_parked(1);
        let keep_going = loop {
            match self.commands.recv() {
                Ok(VcpuCommand::Resume) => break true,
                Ok(VcpuCommand::Save(reply)) => {
                    let _ = reply.send(self.save());
                }
                Ok(VcpuCommand::Restore(state, reply)) => {
                    let _ = reply.send(self.restore(&state));
                }
                Ok(VcpuCommand::Stop) | Err(_) => break false,
            }
        };
        self.control.add_parked(-1);
        keep_going
    }

    fn register_report(&self) -> String {
        let mut s = String::new();
        match self.fd.get_regs() {
            Ok(r) => s.push_str(&format!(
                "  rip={:#018x} rsp={:#018x} rflags={:#x}\n  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x}\n  rsi={:#x} rdi={:#x} rbp={:#x} r8={:#x} r9={:#x}\n",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9
            )),
            Err(e) => s.push_str(&format!("  (registers unavailable: {e})\n")),
        }
        if let Ok(sr) = self.fd.get_sregs() {
            s.push_str(&format!(
                "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n  cs={:#x} (l={} db={} dpl={}) ss={:#x} gdt={:#x}/{:#x} idt={:#x}/{:#x}",
                sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer, sr.cs.selector, sr.cs.l, sr.cs.db, sr.cs.dpl,
                sr.ss.selector, sr.gdt.base, sr.gdt.limit, sr.idt.base, sr.idt.limit
            ));
        }
        s
    }

    fn save(&self) -> Result<VcpuState, kvm_ioctls::Error> {
        let mut msrs = Msrs::from_entries(
            &self
                .msr_list
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        let n = self.fd.get_msrs(&mut msrs)?;
        Ok(VcpuState {
            id: self.id,
            regs: self.fd.get_regs()?,
            sregs: self.fd.get_sregs()?,
            fpu: self.fd.get_fpu()?,
            xsave: self.fd.get_xsave()?.region.to_vec(),
            xcrs: self.fd.get_xcrs()?,
            msrs: msrs.as_slice()[..n].to_vec(),
            lapic: self.fd.get_lapic()?,
            events: self.fd.get_vcpu_events()?,
            mp_state: self.fd.get_mp_state()?,
            debugregs: self.fd.get_debug_regs()?,
            cpuid: self.cpuid.clone(),
        })
    }

    fn restore(&self, s: &VcpuState) -> Result<(), kvm_ioctls::Error> {
        self.fd.set_sregs(&s.sregs)?;
        self.fd.set_regs(&s.regs)?;
        let mut xsave = kvm_bindings::kvm_xsave::default();
        let n = s.xsave.len().min(xsave.region.len());
        xsave.region[..n].copy_from_slice(&s.xsave[..n]);
        // SAFETY: `xsave` is a whole `kvm_xsave` (the 4 KiB region KVM_GET_XSAVE returns), so
        // the kernel reads only within it.
        unsafe { self.fd.set_xsave(&xsave)? };
        self.fd.set_xcrs(&s.xcrs)?;
        self.fd.set_debug_regs(&s.debugregs)?;
        // The LAPIC before the MSRs: setting the LAPIC resets its timer, and the TSC-deadline
        // MSR re-arms it.
        self.fd.set_lapic(&s.lapic)?;
        let msrs = Msrs::from_entries(&s.msrs).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        let set = self.fd.set_msrs(&msrs)?;
        if set != s.msrs.len() {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        self.fd.set_mp_state(s.mp_state)?;
        self.fd.set_vcpu_events(&s.events)?;
        Ok(())
    }
}

fn handle_exit(devices: &Devices, exit: VcpuExit<'_>) -> Outcome {
    match exit {
        VcpuExit::IoIn(port, data) => {
            devices.pio_read(port, data);
            Outcome::Continue
        }
        VcpuExit::IoOut(port, data) => match devices.pio_write(port, data) {
            IoAction::None => Outcome::Continue,
            IoAction::PowerOff(status) => Outcome::Exit(VmExit::PowerOff { status }),
            IoAction::Reset => Outcome::Exit(VmExit::Reset),
        },
        VcpuExit::MmioRead(addr, data) => {
            devices.mmio_read(addr, data);
            Outcome::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            devices.mmio_write(addr, data);
            Outcome::Continue
        }
        // With the in-kernel irqchip KVM handles HLT itself; these are benign.
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Outcome::Continue,
        VcpuExit::Shutdown => Outcome::Fault("triple fault (KVM_EXIT_SHUTDOWN)".into()),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Outcome::Exit(VmExit::Reset),
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                Outcome::Exit(VmExit::PowerOff { status: 0 })
            }
            other => Outcome::Fault(format!("unhandled system event {other}")),
        },
        VcpuExit::FailEntry(reason, cpu) => Outcome::Fault(format!(
            "VM entry failed (hardware reason {reason:#x}, host cpu {cpu})"
        )),
        VcpuExit::InternalError => Outcome::Fault(
            "KVM internal error (often an instruction KVM's emulator cannot run)".into(),
        ),
        other => Outcome::Fault(format!("unhandled exit {other:?}")),
    }
}

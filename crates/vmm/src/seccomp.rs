//! Seccomp filters per VMM thread kind, compiled with rust-vmm's `seccompiler`.
//!
//! `tern vm run`/`receive` call [`configure`] once, before the VM is built, with the mode from
//! `--seccomp off|log|kill` (default `kill`). From then on every thread the VMM starts calls
//! [`enter`] with its [`ThreadKind`] first thing, which installs that kind's allow-list on the
//! calling thread (filters are per thread and inherited by threads it starts; a second filter on
//! a thread only narrows the first):
//!
//! | kind | threads | installed by |
//! |---|---|---|
//! | `vcpu` | `vcpuN` | the vCPU thread itself (`vm/create.rs`) |
//! | `device` | `virtio-net-rx`, `net-announce` | the device thread itself |
//! | `api` | `signals`, `api`, `api-conn`, `throttle` and the threads they start | the main thread, just before it starts them (`tern vm` `serve`) |
//! | `migration` | `migrate-ctl-rx`, `migrate-rx-*`, post-copy's `migrate-pc-*` (with the userfaultfd ioctls) | each migration thread, through `tern_migration::thread_start` |
//! | `main` | the main thread once the VM runs | the main thread, after the API is up |
//!
//! The lists were measured (strace -f on the test guest doing boot, virtio-blk, virtio-net over a
//! tap, pause/resume, snapshot, restore, migration send and receive) and are kept tight where it is
//! cheap: `ioctl` on vCPU threads only with the KVM vCPU requests the VMM makes, on the API with
//! the VM requests it makes; `mmap`/`mprotect` never with `PROT_EXEC`; `clone` only with
//! `CLONE_THREAD` (`clone3`, whose flags a filter cannot see, answers `ENOSYS`, and glibc falls
//! back to `clone`); `socket` only for unix, IPv4 and IPv6; `tgkill` only within this process;
//! `prctl` only to name a thread or set `no_new_privs`. No thread may `execve`, `fork`, `ptrace`,
//! `mount` or open a new KVM VM.
//!
//! **A violation** (mode `kill`) raises `SIGSYS` (`SECCOMP_RET_TRAP`). The handler writes one line
//! to stderr naming the thread, its kind and the syscall (number and name) — the VMM's last words,
//! which `tern vm` (and an agent reading its log) shows — and ends the whole process with
//! `exit_group(159)` (128 + `SIGSYS`, as a shell reports a death by that signal). The trap is used
//! rather than `SECCOMP_RET_KILL_PROCESS` because only the trapping thread knows what it tried; a
//! kill leaves nothing but the signal. Mode `log` lets the call through and the kernel logs it
//! (`audit: type=1326 … syscall=N comm=…` in the kernel log), for building the lists.
//!
//! Debug builds only: `TERN_SECCOMP_TEST_TRIGGER=KIND` makes the first thread of that kind issue
//! a syscall outside its filter (`getppid`) right after entering it (the tests' proof that a violating thread
//! is caught and reported). Release builds compile the trigger out.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a filter does with a syscall outside its list (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    /// No filters.
    Off,
    /// Allowed, but logged by the kernel (for debugging a list).
    Log,
    /// The VMM reports the thread and the syscall and exits with status [`VIOLATION_EXIT`].
    Kill,
}

impl std::str::FromStr for SeccompMode {
    type Err = ParseSeccompModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            "kill" => Ok(SeccompMode::Kill),
            other => Err(ParseSeccompModeError(other.to_string())),
        }
    }
}

/// A `--seccomp` value that is none of `off`, `log`, `kill`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown seccomp mode {0:?} (give off, log or kill)")]
pub struct ParseSeccompModeError(String);

/// The exit status of a VMM one of whose threads broke its filter (128 + `SIGSYS`).
pub const VIOLATION_EXIT: i32 = 128 + libc::SIGSYS;

/// The kinds of VMM threads, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread once the VM runs: runtime entry, resume, wait, clean-up.
    Main,
    /// The control API (and what it starts: snapshot writing, the migration's control).
    Api,
    /// A vCPU thread: KVM_RUN, device emulation, disk I/O.
    Vcpu,
    /// A device's own thread (virtio-net receive, network announcements).
    Device,
    /// A migration stream thread (send or receive).
    Migration,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Main,
        ThreadKind::Api,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Migration,
    ];

    /// The kind's name, as reports and `TERN_SECCOMP_TEST_TRIGGER` spell it.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Migration => "migration",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The unprivileged ids a jailed VMM drops to: the filters let every thread take exactly these
/// (glibc's `setresuid` makes each thread of the process change its own credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropIds {
    /// The user id.
    pub uid: u32,
    /// The group id.
    pub gid: u32,
}

/// Why the filters could not be set up or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// [`configure`] was called twice.
    #[error("seccomp is already configured for this process")]
    AlreadyConfigured,
    /// A filter did not compile (a bug in the lists).
    #[error("cannot compile the {kind} seccomp filter")]
    Compile {
        /// The thread kind.
        kind: &'static str,
        /// The cause.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused a filter.
    #[error("cannot install the {kind} seccomp filter on thread {thread}")]
    Apply {
        /// The thread kind.
        kind: &'static str,
        /// The thread's name.
        thread: String,
        /// The cause.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

struct Compiled {
    mode: SeccompMode,
    /// One allow-list per kind, by [`ThreadKind::index`].
    filters: Vec<BpfProgram>,
    /// `clone3` → `ENOSYS`, everything else allowed; installed before each allow-list.
    no_clone3: BpfProgram,
    /// `openat`/`open` → `EACCES`, everything else allowed; installed before the allow-list of the
    /// kinds that open no files (their lists let `openat` through to it instead of trapping).
    no_open: BpfProgram,
    opts: FilterOptions,
}

static CONFIG: OnceLock<Compiled> = OnceLock::new();

thread_local! {
    /// This thread's kind (index + 1; 0 = none entered here), for the SIGSYS report.
    static KIND: Cell<u8> = const { Cell::new(0) };
    /// This thread's name, for the SIGSYS report.
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// The mode [`configure`] set ([`SeccompMode::Off`] when it was never called, as in library
/// tests that build VMs in their own process).
pub fn mode() -> SeccompMode {
    CONFIG.get().map_or(SeccompMode::Off, |c| c.mode)
}

/// What the filters must allow beyond the VMM's fixed needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilterOptions {
    /// The ids a jailed VMM will drop to.
    pub drop_ids: Option<DropIds>,
    /// The VM has volume disks, whose vCPU-thread I/O (re)connects to the node and reopens the
    /// LUN's direct path: those threads may then make unix/IPv4/IPv6 sockets, connect them, and
    /// open and stat files.
    pub volume_disks: bool,
}

/// Compiles every kind's filter for `mode` and, for `kill`, installs the SIGSYS handler. Call
/// once, before the VM is built.
pub fn configure(mode: SeccompMode, opts: FilterOptions) -> Result<(), SeccompError> {
    if CONFIG.get().is_some() {
        return Err(SeccompError::AlreadyConfigured);
    }
    let mismatch = match mode {
        SeccompMode::Kill => SeccompAction::Trap,
        SeccompMode::Log | SeccompMode::Off => SeccompAction::Log,
    };
    let pid = std::process::id();
    let mut filters = Vec::new();
    for kind in ThreadKind::ALL {
        filters.push(compile(
            allowed(kind, pid, opts),
            mismatch.clone(),
            SeccompAction::Allow,
            kind.name(),
        )?);
    }
    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, vec![]);
    let no_clone3 = compile(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        "clone3",
    )?;
    // glibc's malloc reads /proc/sys/vm/overcommit_memory once per process, from whichever thread
    // first trims a heap, and copes with a failed open: those threads get EACCES, not a trap.
    let mut opens = BTreeMap::new();
    opens.insert(libc::SYS_openat, vec![]);
    opens.insert(libc::SYS_open, vec![]);
    let no_open = compile(
        opens,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        "open",
    )?;
    if mode == SeccompMode::Kill {
        install_sigsys_handler()?;
    }
    tern_migration::thread_start::set_hook(|| {
        crate::migrate::lower_this_threads_priority();
        enter_or_exit(ThreadKind::Migration)
    });
    CONFIG
        .set(Compiled {
            mode,
            filters,
            no_clone3,
            no_open,
            opts,
        })
        .map_err(|_| SeccompError::AlreadyConfigured)
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
    kind: &'static str,
) -> Result<BpfProgram, SeccompError> {
    let err = |source| SeccompError::Compile { kind, source };
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64).map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// Installs `kind`'s filter on the calling thread (nothing when seccomp is off or was never
/// configured).
pub fn enter(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(c) = CONFIG.get() else {
        return Ok(());
    };
    if c.mode == SeccompMode::Off {
        return Ok(());
    }
    let thread = std::thread::current().name().unwrap_or("main").to_string();
    let mut name = [0u8; 16];
    let n = thread.len().min(15);
    name[..n].copy_from_slice(&thread.as_bytes()[..n]);
    NAME.with(|c| c.set(name));
    KIND.with(|c| c.set(kind.index() as u8 + 1));
    #[cfg(debug_assertions)]
    let trigger = std::env::var("TERN_SECCOMP_TEST_TRIGGER").ok();
    let apply = |prog: &BpfProgram| {
        seccompiler::apply_filter(prog).map_err(|source| SeccompError::Apply {
            kind: kind.name(),
            thread: thread.clone(),
            source,
        })
    };
    apply(&c.no_clone3)?;
    if opens_no_files(kind, c.opts) {
        apply(&c.no_open)?;
    }
    apply(&c.filters[kind.index()])?;
    #[cfg(debug_assertions)]
    if trigger.as_deref() == Some(kind.name()) {
        test_trigger();
    }
    Ok(())
}

/// [`enter`] for a thread that has no way to report an error: a VMM that cannot sandbox one of
/// its threads stops rather than run it unfiltered.
pub fn enter_or_exit(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        eprintln!("tern: {e}: {:?}", std::error::Error::source(&e));
        std::process::exit(1);
    }
}

/// The syscall the test trigger makes: harmless (so `--seccomp log` lets it through and the
/// VMM carries on) and in no allow-list.
pub const TEST_TRIGGER_SYSCALL: i64 = libc::SYS_getppid;

/// A syscall no filter allows, issued on purpose (debug builds only).
#[cfg(debug_assertions)]
fn test_trigger() {
    // SAFETY: getppid has no arguments and no side effects.
    unsafe { libc::syscall(TEST_TRIGGER_SYSCALL) };
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; the handler is an `extern "C"` function with the
    // SA_SIGINFO signature, and the mask is initialised by sigemptyset before use.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = sigsys_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(SeccompError::Handler(std::io::Error::last_os_error()))
    }
}

/// A fixed buffer that `core::fmt` writes into without allocating (signal handler use).
struct StackBuf {
    buf: [u8; 256],
    len: usize,
}

impl std::fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The line the SIGSYS handler writes; pure, so it is tested without a trap.
fn violation_report(
    out: &mut impl std::fmt::Write,
    thread: &[u8],
    kind: Option<ThreadKind>,
    nr: i64,
) -> std::fmt::Result {
    let end = thread.iter().position(|&b| b == 0).unwrap_or(thread.len());
    let thread = std::str::from_utf8(&thread[..end]).unwrap_or("?");
    let kind = kind.map_or("inherited", ThreadKind::name);
    writeln!(
        out,
        "tern: seccomp: thread {thread} (filter {kind}) made syscall {nr} ({}) outside its allow-list; the VMM stops (exit {VIOLATION_EXIT})",
        syscall_name(nr).unwrap_or("?")
    )
}

extern "C" fn sigsys_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // The SIGSYS part of siginfo: `void *_call_addr` at offset 16, `int _syscall` at 24.
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; for a seccomp trap its
    // union holds the `_sigsys` member, whose `_syscall` is at byte offset 24 on x86_64.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let kind = match KIND.with(|c| c.get()) {
        0 => None,
        k => ThreadKind::ALL.get(usize::from(k) - 1).copied(),
    };
    let mut name = NAME.with(|c| c.get());
    if kind.is_none() {
        // SAFETY: PR_GET_NAME writes at most 16 bytes into the 16-byte buffer.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    }
    let mut b = StackBuf {
        buf: [0; 256],
        len: 0,
    };
    let _ = violation_report(&mut b, &name, kind, i64::from(nr));
    // SAFETY: write(2) and exit_group are async-signal-safe; the buffer is valid for `len` bytes.
    unsafe {
        libc::write(2, b.buf.as_ptr().cast(), b.len);
        libc::syscall(libc::SYS_exit_group, VIOLATION_EXIT);
    }
}

// ---- The allow-lists ------------------------------------------------------------------------

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// `(number, name)` of every syscall the lists name, and the test trigger's.
macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        const SYSCALL_NAMES: &[(i64, &str)] = &[$((libc::$name, stringify!($name))),*];
    };
}

syscalls!(
    SYS_read,
    SYS_flock,
    SYS_open,
    SYS_write,
    SYS_close,
    SYS_fstat,
    SYS_lseek,
    SYS_mmap,
    SYS_mprotect,
    SYS_munmap,
    SYS_brk,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_ioctl,
    SYS_pread64,
    SYS_pwrite64,
    SYS_readv,
    SYS_writev,
    SYS_sched_yield,
    SYS_mremap,
    SYS_madvise,
    SYS_dup,
    SYS_nanosleep,
    SYS_getpid,
    SYS_socket,
    SYS_connect,
    SYS_accept,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_shutdown,
    SYS_bind,
    SYS_listen,
    SYS_getsockname,
    SYS_getpeername,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_clone,
    SYS_fork,
    SYS_vfork,
    SYS_execve,
    SYS_exit,
    SYS_kill,
    SYS_uname,
    SYS_fcntl,
    SYS_fsync,
    SYS_fdatasync,
    SYS_ftruncate,
    SYS_getcwd,
    SYS_rename,
    SYS_mkdir,
    SYS_unlink,
    SYS_chmod,
    SYS_fchmod,
    SYS_umask,
    SYS_gettimeofday,
    SYS_ptrace,
    SYS_getuid,
    SYS_getppid,
    SYS_setresuid,
    SYS_setresgid,
    SYS_setgroups,
    SYS_sigaltstack,
    SYS_prctl,
    SYS_mount,
    SYS_gettid,
    SYS_futex,
    SYS_sched_getaffinity,
    SYS_restart_syscall,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_exit_group,
    SYS_tgkill,
    SYS_openat,
    SYS_mkdirat,
    SYS_newfstatat,
    SYS_unlinkat,
    SYS_renameat,
    SYS_fchmodat,
    SYS_ppoll,
    SYS_poll,
    SYS_set_robust_list,
    SYS_fallocate,
    SYS_accept4,
    SYS_eventfd2,
    SYS_dup3,
    SYS_pipe2,
    SYS_preadv,
    SYS_pwritev,
    SYS_rt_sigtimedwait,
    SYS_getrandom,
    SYS_statx,
    SYS_rseq,
    SYS_clone3,
    SYS_seccomp,
    SYS_renameat2,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_getdents64,
    SYS_epoll_wait,
    SYS_openat2,
    SYS_pidfd_open,
    SYS_kexec_load,
);

/// The name of syscall `nr` when the lists name it.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    SYSCALL_NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| name.trim_start_matches("SYS_"))
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Argument indices below 6 and these operators always validate.
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).expect("argument index below 6")
}

fn cond32(arg: u8, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .expect("argument index below 6")
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).expect("a rule with conditions")
}

fn allow(r: &mut Rules, nrs: &[i64]) {
    for &n in nrs {
        r.insert(n, vec![]);
    }
}

/// Adds conditional rules; a syscall already allowed without condition stays so.
fn allow_if(r: &mut Rules, nr: i64, rules: Vec<SeccompRule>) {
    match r.get_mut(&nr) {
        Some(existing) if existing.is_empty() => {}
        Some(existing) => existing.extend(rules),
        None => {
            r.insert(nr, rules);
        }
    }
}

/// The kinds whose `openat` fails with `EACCES` (see [`configure`]).
fn opens_no_files(kind: ThreadKind, opts: FilterOptions) -> bool {
    match kind {
        ThreadKind::Vcpu => !opts.volume_disks,
        ThreadKind::Device | ThreadKind::Migration => true,
        ThreadKind::Api | ThreadKind::Main => false,
    }
}

/// `ioctl(fd, request)` for each request.
fn allow_ioctls(r: &mut Rules, requests: &[u64]) {
    let rules = requests.iter().map(|&q| rule(vec![cond32(1, q)])).collect();
    allow_if(r, libc::SYS_ioctl, rules);
}

// userfaultfd ioctl numbers (linux/userfaultfd.h, as in crate::uffd).
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
const UFFDIO_WAKE: u64 = 0x8010_aa02;

// KVM ioctl numbers (linux/kvm.h), as _IO/_IOR/_IOW/_IOWR of KVMIO with the structures' sizes.
const KVMIO: u64 = 0xAE;
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn io(nr: u64) -> u64 {
    ioc(0, nr, 0)
}
const fn iow<T>(nr: u64) -> u64 {
    ioc(1, nr, std::mem::size_of::<T>())
}
const fn ior<T>(nr: u64) -> u64 {
    ioc(2, nr, std::mem::size_of::<T>())
}
const fn iowr<T>(nr: u64) -> u64 {
    ioc(3, nr, std::mem::size_of::<T>())
}

mod kvm_nr {
    use super::{io, ior, iow, iowr};
    use kvm_bindings::*;
    pub const RUN: u64 = io(0x80);
    pub const GET_REGS: u64 = ior::<kvm_regs>(0x81);
    pub const SET_REGS: u64 = iow::<kvm_regs>(0x82);
    pub const GET_SREGS: u64 = ior::<kvm_sregs>(0x83);
    pub const SET_SREGS: u64 = iow::<kvm_sregs>(0x84);
    pub const GET_MSRS: u64 = iowr::<kvm_msrs>(0x88);
    pub const SET_MSRS: u64 = iow::<kvm_msrs>(0x89);
    pub const GET_FPU: u64 = ior::<kvm_fpu>(0x8c);
    pub const SET_FPU: u64 = iow::<kvm_fpu>(0x8d);
    pub const GET_LAPIC: u64 = ior::<kvm_lapic_state>(0x8e);
    pub const SET_LAPIC: u64 = iow::<kvm_lapic_state>(0x8f);
    pub const GET_MP_STATE: u64 = ior::<kvm_mp_state>(0x98);
    pub const SET_MP_STATE: u64 = iow::<kvm_mp_state>(0x99);
    pub const GET_VCPU_EVENTS: u64 = ior::<kvm_vcpu_events>(0x9f);
    pub const SET_VCPU_EVENTS: u64 = iow::<kvm_vcpu_events>(0xa0);
    pub const GET_DEBUGREGS: u64 = ior::<kvm_debugregs>(0xa1);
    pub const SET_DEBUGREGS: u64 = iow::<kvm_debugregs>(0xa2);
    pub const GET_XSAVE: u64 = ior::<kvm_xsave>(0xa4);
    pub const SET_XSAVE: u64 = iow::<kvm_xsave>(0xa5);
    pub const GET_XCRS: u64 = ior::<kvm_xcrs>(0xa6);
    pub const SET_XCRS: u64 = iow::<kvm_xcrs>(0xa7);
    pub const KVMCLOCK_CTRL: u64 = io(0xad);
    // VM requests.
    pub const SET_USER_MEMORY_REGION: u64 = iow::<kvm_userspace_memory_region>(0x46);
    pub const IRQ_LINE: u64 = iow::<kvm_irq_level>(0x61);
    pub const GET_IRQCHIP: u64 = iowr::<kvm_irqchip>(0x62);
    pub const SET_IRQCHIP: u64 = ior::<kvm_irqchip>(0x63);
    pub const GET_DIRTY_LOG: u64 = iow::<kvm_dirty_log>(0x42);
    pub const CLEAR_DIRTY_LOG: u64 = iowr::<kvm_clear_dirty_log>(0xc0);
    pub const GET_PIT2: u64 = ior::<kvm_pit_state2>(0x9f);
    pub const SET_PIT2: u64 = iow::<kvm_pit_state2>(0xa0);
    pub const SET_CLOCK: u64 = iow::<kvm_clock_data>(0x7b);
    pub const GET_CLOCK: u64 = ior::<kvm_clock_data>(0x7c);
}

/// What every kind may do: memory, locks, time, its own thread's life, stderr.
fn common(r: &mut Rules, pid: u32, drop_ids: Option<DropIds>) {
    use libc::*;
    allow(
        r,
        &[
            SYS_read,
            SYS_write,
            SYS_writev,
            SYS_close,
            SYS_munmap,
            SYS_madvise,
            SYS_mremap,
            SYS_brk,
            SYS_futex,
            SYS_sched_yield,
            SYS_nanosleep,
            SYS_clock_nanosleep,
            SYS_clock_gettime,
            SYS_gettimeofday,
            SYS_getrandom,
            SYS_gettid,
            SYS_getpid,
            SYS_rt_sigreturn,
            SYS_rt_sigprocmask,
            SYS_sigaltstack,
            SYS_exit,
            SYS_exit_group,
            SYS_restart_syscall,
            SYS_rseq,
            SYS_set_robust_list,
            SYS_sched_getaffinity,
            SYS_fcntl,
        ],
    );
    // Memory never becomes executable.
    let no_exec = |arg| rule(vec![cond(arg, SeccompCmpOp::MaskedEq(PROT_EXEC as u64), 0)]);
    allow_if(r, SYS_mmap, vec![no_exec(2)]);
    allow_if(r, SYS_mprotect, vec![no_exec(2)]);
    // Thread names (std names each thread; the SIGSYS report reads it), no_new_privs and further
    // (narrowing) filters.
    allow_if(
        r,
        SYS_prctl,
        [PR_SET_NAME, PR_GET_NAME, PR_SET_NO_NEW_PRIVS]
            .iter()
            .map(|&op| rule(vec![cond32(0, op as u64)]))
            .collect(),
    );
    allow_if(
        r,
        SYS_seccomp,
        vec![rule(vec![cond32(0, SECCOMP_SET_MODE_FILTER as u64)])],
    );
    // Signals only to this process's own threads (the vCPU kick).
    allow_if(r, SYS_tgkill, vec![rule(vec![cond32(0, u64::from(pid))])]);
    if let Some(ids) = drop_ids {
        for (nr, id) in [(SYS_setresuid, ids.uid), (SYS_setresgid, ids.gid)] {
            let same = (0..3).map(|a| cond32(a, u64::from(id))).collect();
            allow_if(r, nr, vec![rule(same)]);
        }
        allow_if(
            r,
            SYS_setgroups,
            vec![rule(vec![cond(0, SeccompCmpOp::Eq, 0)])],
        );
    }
}

/// Disk I/O (raw files and volume disks' NBD sockets) as the vCPU threads do it.
fn disk_io(r: &mut Rules) {
    use libc::*;
    allow(
        r,
        &[
            SYS_pread64,
            SYS_pwrite64,
            SYS_preadv,
            SYS_pwritev,
            SYS_preadv2,
            SYS_pwritev2,
            SYS_readv,
            SYS_lseek,
            SYS_fsync,
            SYS_fdatasync,
            SYS_fallocate,
            SYS_fstat,
            SYS_sendto,
            SYS_recvfrom,
            SYS_sendmsg,
            SYS_recvmsg,
            SYS_poll,
            SYS_ppoll,
            SYS_shutdown,
            SYS_setsockopt,
            SYS_getsockopt,
        ],
    );
}

/// Threads that start threads: `clone` for threads only (`clone3` gets `ENOSYS` elsewhere).
fn spawn_threads(r: &mut Rules) {
    use libc::*;
    allow(r, &[SYS_clone3]);
    allow_if(
        r,
        SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(CLONE_THREAD as u64),
            CLONE_THREAD as u64,
        )])],
    );
}

/// Files and sockets as the API (snapshot files, the socket, migration, volume leases) and the
/// main thread (runtime entry) use them.
fn files_and_sockets(r: &mut Rules) {
    use libc::*;
    disk_io(r);
    allow(
        r,
        &[
            SYS_openat,
            SYS_newfstatat,
            SYS_statx,
            SYS_rename,
            SYS_renameat,
            SYS_renameat2,
            SYS_unlink,
            SYS_unlinkat,
            SYS_mkdir,
            SYS_mkdirat,
            SYS_chmod,
            SYS_fchmod,
            SYS_fchmodat,
            SYS_ftruncate,
            SYS_getdents64,
            SYS_dup,
            SYS_dup3,
            SYS_eventfd2,
            SYS_rt_sigtimedwait,
            SYS_getuid,
        ],
    );
    sockets(r);
}

/// New unix, IPv4 and IPv6 sockets, connected.
fn sockets(r: &mut Rules) {
    use libc::*;
    allow(r, &[SYS_connect, SYS_getsockname, SYS_getpeername]);
    // std's connect_timeout and set_nonblocking.
    allow_ioctls(r, &[FIONBIO, FIOCLEX]);
    allow_if(
        r,
        SYS_socket,
        [AF_UNIX, AF_INET, AF_INET6]
            .iter()
            .map(|&d| rule(vec![cond32(0, d as u64)]))
            .collect(),
    );
}

/// The allow-list of `kind`. `pid`: this process (tgkill's target); `opts`: see [`configure`].
fn allowed(kind: ThreadKind, pid: u32, opts: FilterOptions) -> Rules {
    use kvm_nr::*;
    use libc::*;
    let mut r = Rules::new();
    common(&mut r, pid, opts.drop_ids);
    if opens_no_files(kind, opts) {
        // Answered EACCES by the filter installed before this one.
        allow(&mut r, &[SYS_openat, SYS_open]);
    }
    match kind {
        ThreadKind::Vcpu => {
            disk_io(&mut r);
            if opts.volume_disks {
                sockets(&mut r);
                allow(
                    &mut r,
                    &[SYS_openat, SYS_newfstatat, SYS_statx, SYS_fstat, SYS_flock],
                );
            }
            allow_ioctls(
                &mut r,
                &[
                    RUN,
                    GET_REGS,
                    SET_REGS,
                    GET_SREGS,
                    SET_SREGS,
                    GET_MSRS,
                    SET_MSRS,
                    GET_FPU,
                    SET_FPU,
                    GET_LAPIC,
                    SET_LAPIC,
                    GET_MP_STATE,
                    SET_MP_STATE,
                    GET_VCPU_EVENTS,
                    SET_VCPU_EVENTS,
                    GET_DEBUGREGS,
                    SET_DEBUGREGS,
                    GET_XSAVE,
                    SET_XSAVE,
                    GET_XCRS,
                    SET_XCRS,
                    KVMCLOCK_CTRL,
                ],
            );
        }
        ThreadKind::Device => {
            allow(&mut r, &[SYS_poll, SYS_ppoll, SYS_readv, SYS_epoll_wait]);
        }
        ThreadKind::Migration => {
            allow(
                &mut r,
                &[
                    SYS_sendto,
                    SYS_recvfrom,
                    SYS_sendmsg,
                    SYS_recvmsg,
                    SYS_poll,
                    SYS_ppoll,
                    SYS_shutdown,
                    SYS_setsockopt,
                    SYS_getsockopt,
                    SYS_readv,
                ],
            );
            // Post-copy's target threads (`migrate-pc-fault`, `migrate-pc-rx`) place pages
            // and wake faulting accesses through the userfaultfd (crate::uffd).
            allow_ioctls(&mut r, &[UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE]);
        }
        ThreadKind::Api | ThreadKind::Main => {
            files_and_sockets(&mut r);
            spawn_threads(&mut r);
            // A migration thread they spawn lowers its own priority before its filter goes on.
            allow(&mut r, &[SYS_setpriority]);
            allow_ioctls(
                &mut r,
                &[
                    SET_USER_MEMORY_REGION,
                    GET_DIRTY_LOG,
                    CLEAR_DIRTY_LOG,
                    GET_IRQCHIP,
                    SET_IRQCHIP,
                    IRQ_LINE,
                    GET_PIT2,
                    SET_PIT2,
                    GET_CLOCK,
                    SET_CLOCK,
                ],
            );
            // setrlimit on the process itself (a jailed VMM's rlimits).
            allow_if(
                &mut r,
                SYS_prlimit64,
                vec![rule(vec![cond(0, SeccompCmpOp::Eq, 0)])],
            );
            if kind == ThreadKind::Api {
                allow(&mut r, &[SYS_accept4, SYS_accept, SYS_bind, SYS_listen]);
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_modes_parse_and_anything_else_is_refused_by_name() {
        assert_eq!("kill".parse(), Ok(SeccompMode::Kill));
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert_eq!("off".parse(), Ok(SeccompMode::Off));
        let e = "on".parse::<SeccompMode>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown seccomp mode \"on\" (give off, log or kill)"
        );
    }

    #[test]
    fn every_kind_compiles_with_and_without_drop_ids() {
        let jailed = FilterOptions {
            drop_ids: Some(DropIds {
                uid: 65534,
                gid: 65534,
            }),
            volume_disks: true,
        };
        for opts in [FilterOptions::default(), jailed] {
            for kind in ThreadKind::ALL {
                let p = compile(
                    allowed(kind, 42, opts),
                    SeccompAction::Trap,
                    SeccompAction::Allow,
                    kind.name(),
                )
                .unwrap();
                assert!(!p.is_empty());
            }
        }
    }

    #[test]
    fn the_kvm_request_numbers_match_linux() {
        // Values from linux/kvm.h as the kernel computes them on x86_64.
        assert_eq!(kvm_nr::RUN, 0xae80);
        assert_eq!(kvm_nr::GET_REGS, 0x8090_ae81);
        assert_eq!(kvm_nr::SET_SREGS, 0x4138_ae84);
        assert_eq!(kvm_nr::GET_MSRS, 0xc008_ae88);
        assert_eq!(kvm_nr::GET_XSAVE, 0x9000_aea4);
        assert_eq!(kvm_nr::GET_LAPIC, 0x8400_ae8e);
        assert_eq!(kvm_nr::SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(kvm_nr::GET_DIRTY_LOG, 0x4010_ae42);
        assert_eq!(kvm_nr::GET_IRQCHIP, 0xc208_ae62);
    }

    #[test]
    fn the_api_connection_may_forward_late_frames() {
        // A migrated source's API connection thread forwards the frames that reached the taps
        // late (`crate::migrate::forward_late_frames`): tap reads and writes, and sleeps between.
        for opts in [
            FilterOptions::default(),
            FilterOptions {
                volume_disks: true,
                ..Default::default()
            },
        ] {
            let r = allowed(ThreadKind::Api, 1, opts);
            for nr in [libc::SYS_read, libc::SYS_write, libc::SYS_clock_nanosleep] {
                assert!(r.contains_key(&nr), "api lacks {:?}", syscall_name(nr));
            }
        }
    }

    #[test]
    fn no_kind_may_exec_fork_trace_or_mount() {
        for kind in ThreadKind::ALL {
            let r = allowed(kind, 1, FilterOptions::default());
            for nr in [
                libc::SYS_execve,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
                libc::SYS_mount,
            ] {
                assert!(
                    !r.contains_key(&nr),
                    "{} allows {:?}",
                    kind.name(),
                    syscall_name(nr)
                );
            }
        }
        // The test trigger's syscall is in no list.
        for kind in ThreadKind::ALL {
            assert!(
                !allowed(kind, 1, FilterOptions::default()).contains_key(&TEST_TRIGGER_SYSCALL)
            );
        }
        // vCPU threads make sockets only for volume disks.
        let vcpu = |volume_disks| {
            let opts = FilterOptions {
                volume_disks,
                ..Default::default()
            };
            allowed(ThreadKind::Vcpu, 1, opts).contains_key(&libc::SYS_socket)
        };
        assert!(!vcpu(false) && vcpu(true));
        // Only the API and main threads start threads; vCPUs and devices cannot even clone.
        assert!(
            !allowed(ThreadKind::Vcpu, 1, FilterOptions::default()).contains_key(&libc::SYS_clone)
        );
        assert!(
            allowed(ThreadKind::Api, 1, FilterOptions::default()).contains_key(&libc::SYS_clone)
        );
    }

    #[test]
    fn the_report_names_thread_kind_and_syscall() {
        let mut s = String::new();
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"vcpu0");
        violation_report(&mut s, &name, Some(ThreadKind::Vcpu), libc::SYS_ptrace).unwrap();
        assert_eq!(
            s,
            "tern: seccomp: thread vcpu0 (filter vcpu) made syscall 101 (ptrace) outside its allow-list; the VMM stops (exit 159)\n"
        );
        let mut s = String::new();
        violation_report(&mut s, b"api-conn", None, 9999).unwrap();
        assert!(
            s.contains("thread api-conn (filter inherited) made syscall 9999 (?)"),
            "{s}"
        );
    }
}

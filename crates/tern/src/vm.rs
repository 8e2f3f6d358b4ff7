//! `tern vm …`: run one VM in the foreground (`run`, also from a snapshot), list the VMs of this
//! host (`list`), drive running VMs through their control socket, named by `--api-sock` or by
//! `--name` (`pause`, `resume`, `status`, `stop`, `snapshot`), and move them live between hosts
//! (`migrate` on the source, `receive` on the target).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tern_vmctl::Request;
use tern_vmm::api::{ApiServer, ApiStop};
use tern_vmm::config::{HostLimits, KernelSource, VmConfigInput};
use tern_vmm::runtime::{self, DEFAULT_RUNTIME_DIR, RuntimeEntry, RuntimeEntryGuard};
use tern_vmm::{Vm, VmExit, signals};

/// Exit status of `tern vm run` when the guest faulted or hit an exit Tern does not handle.
pub const EXIT_GUEST_FAULT: u8 = 70;

mod guest_io;
mod jail;
mod list;
mod local;
mod migrate;
mod progress;
mod resolve;
mod target;
mod volume_disk;

pub use target::VmRef;

/// Subcommands of `tern vm`.
#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Run one VM in the foreground until the guest powers off, resets, or is stopped.
    ///
    /// The command stays in the foreground with the serial console on stdout; drive the VM from
    /// another terminal (`tern vm list`, `tern vm stop --name NAME`). Every VM has a control
    /// socket: --api-sock, or RUNTIME_DIR/api/NAME.sock by default.
    ///
    /// The process exits with the status the guest wrote to port 0x501 (0 = clean power-off),
    /// 0 after a reset request or `tern vm stop`, and 70 after a guest fault (the vCPU registers are
    /// printed on stderr).
    Run(Box<RunArgs>),
    /// List this host's VMs: name, pid, state, vCPUs, memory, uptime, control socket.
    ///
    /// Read from the runtime directory; each live VM is asked for its state. Entries left by VMMs
    /// whose process is gone are shown as `dead` (`--prune` removes them).
    List(list::ListArgs),
    /// Pause every vCPU of a running VM.
    Pause(ApiArgs),
    /// Resume a paused VM.
    Resume(ApiArgs),
    /// Print a running VM's status as JSON.
    Status(ApiArgs),
    /// Stop a running VM (its VMM exits with status 0).
    Stop(ApiArgs),
    /// Announce a running VM's NICs on the network now (RARP, and gratuitous ARP when the guest's
    /// IPv4 address is known), on its announce schedule, as after a restore or migration.
    Announce(ApiArgs),
    /// Write a snapshot of a running VM (state and memory) to a file.
    ///
    /// The VM is paused while the file is written, then resumes (or stops with --stop).
    /// `tern vm run --restore FILE` continues it.
    Snapshot(SnapshotArgs),
    /// Live-migrate a running VM to a host where `tern vm receive` waits.
    ///
    /// The migration runs inside the source VMM. On success the source VMM exits once the
    /// target has acknowledged that the VM runs there; on any failure before that the VM keeps
    /// running here. Exit status: 0 completed, 1 failed (VM still runs here), 3 in doubt (the VM
    /// stays paused here; check the target before resuming it).
    Migrate(migrate::MigrateArgs),
    /// Send text to a running VM's serial port (the test guest reads commands such as `load 70`
    /// there and answers on its console).
    ///
    /// A newline is added unless the text ends with one (or --raw). Text longer than the UART's
    /// 64-byte receive FIFO goes in several requests, each waiting for the guest to make room.
    ConsoleInput(guest_io::ConsoleInputArgs),
    /// Measure how fast a running VM dirties its memory (pages per second over a short window).
    ///
    /// Dirty logging is on only for the window (default 200 ms); refused while the VM migrates.
    DirtyRate(guest_io::DirtyRateArgs),
    /// Wait for an incoming live migration, then run the VM here.
    ///
    /// Start this first. The VM is built from the source's description; a refused, failed or
    /// aborted migration exits non-zero and leaves nothing behind.
    Receive(ReceiveArgs),
}

/// Options of `tern vm snapshot`.
#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// The VM.
    #[command(flatten)]
    pub vm: VmRef,
    /// The snapshot file to write: a file name in the VM's snapshot directory (its VMM's
    /// --snapshot-dir, default RUNTIME_DIR/snapshots), or a path directly inside it. An existing
    /// file is never overwritten.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Stop the VM after the snapshot instead of resuming it.
    #[arg(long)]
    pub stop: bool,
}

/// Options of `tern vm receive`.
#[derive(Debug, clap::Args)]
pub struct ReceiveArgs {
    /// Address to listen on, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// Serve the control API on this unix socket once the VM runs (default:
    /// RUNTIME_DIR/api/NAME.sock).
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Where the serial console goes: stdout, null or file:PATH.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// The VM's name (default: vm-<pid>).
    #[arg(long)]
    pub name: Option<String>,
    /// Disks (shared storage), as for `tern vm run`.
    #[arg(long, value_name = "PATH[,readonly]")]
    pub disk: Vec<String>,
    /// NICs, as for `tern vm run` (same MAC as on the source; `bridge=` puts the tap on this
    /// host's bridge before the VM resumes here).
    #[arg(long, value_name = "tap=NAME,mac=MAC[,ip=ADDR][,bridge=BR]")]
    pub net: Vec<String>,
    /// When the NICs announce themselves once the VM resumes here: offsets in ms, or `off`.
    #[arg(long, default_value = "0,50,200,450,800", value_name = "MS,MS,...|off")]
    pub announce: String,
    /// The VMM's sandbox: seccomp filters and the jail.
    #[command(flatten)]
    pub sandbox: jail::SandboxArgs,
    /// Who may use the API socket, and where snapshots go.
    #[command(flatten)]
    pub local: local::LocalArgs,
    /// Refuse a VM that does not have exactly this many vCPUs.
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Refuse a VM that does not have exactly this much memory, MiB.
    #[arg(long, value_name = "N")]
    pub memory_mib: Option<u64>,
    /// Give up if no source connects within this many seconds (default: wait forever).
    #[arg(long, value_name = "SECONDS")]
    pub accept_timeout: Option<f64>,
    /// Accept only mutual TLS from a source holding a host certificate of this directory's CA
    /// (`tern pki issue --role host`); plain connections are refused. Connections that fail
    /// (plain TCP, scans, other CAs, expired or user certificates) are logged and dropped while
    /// the receive keeps waiting. The same certificate is what `volume://` disks present to
    /// their node (as `tern vm run --tls-dir`).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Back guest RAM with transparent huge pages (madvise MADV_HUGEPAGE) or not (MADV_NOHUGEPAGE):
    /// on or off. Default: on where this host's THP mode (/sys/kernel/mm/transparent_hugepage/enabled)
    /// is madvise or always, off elsewhere; `on` is refused where it is never.
    /// This host's own choice: the source's setting does not travel (the guest cannot see it).
    #[arg(long, value_name = "on|off")]
    pub huge_pages: Option<tern_vmm::config::HugePages>,
    /// Directory of runtime entries.
    #[arg(long, default_value = DEFAULT_RUNTIME_DIR, value_name = "DIR")]
    pub runtime_dir: PathBuf,
}

/// Options of `tern vm run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The kernel: a PVH ELF, an ELF vmlinux, a bzImage, or builtin:testguest.
    #[arg(
        long,
        value_name = "PATH|builtin:NAME",
        required_unless_present = "restore"
    )]
    pub kernel: Option<String>,
    /// Continue a VM from a snapshot file (`tern vm snapshot`); memory, vCPUs and command line
    /// come from the snapshot, disks from --disk (one per snapshot disk) or, allowed by
    /// --restore-allow-disk, from the snapshot.
    #[arg(long, value_name = "FILE")]
    pub restore: Option<PathBuf>,
    /// With --restore and no --disk: a file or directory the snapshot's own disks may name;
    /// repeat for more. A snapshot never opens other host files by itself.
    #[arg(long, value_name = "PATH", requires = "restore")]
    pub restore_allow_disk: Vec<PathBuf>,
    /// An initramfs for a Linux kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line (e.g. "tern.hb_ms=50" or "console=ttyS0").
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub memory_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vcpus: u32,
    /// A virtio-blk disk: a raw image file, or volume://NODE_ADDR/FILE (a cluster-shared-volume
    /// file through this host's node, holding its write lease unless readonly); repeat for more.
    #[arg(long, value_name = "PATH|volume://NODE_ADDR/FILE[,readonly]")]
    pub disk: Vec<String>,
    /// Where the serial console (COM1) goes: stdout, null or file:PATH.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// A virtio-net NIC over a tap (created if missing, or an existing one used); `ip=` tells the
    /// announce the guest's address (otherwise learnt from its traffic). Repeat for more NICs.
    #[arg(long, value_name = "tap=NAME,mac=MAC[,ip=ADDR][,bridge=BR]")]
    pub net: Vec<String>,
    /// When the NICs announce themselves after a restore or migration: offsets in ms from the
    /// resume, or `off`.
    #[arg(long, default_value = "0,50,200,450,800", value_name = "MS,MS,...|off")]
    pub announce: String,
    /// The VMM's sandbox: seccomp filters and the jail.
    #[command(flatten)]
    pub sandbox: jail::SandboxArgs,
    /// Serve the control API on this unix socket (default: RUNTIME_DIR/api/NAME.sock).
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// The VM's name (default: vm-<pid>); names the runtime entry NAME.json.
    #[arg(long)]
    pub name: Option<String>,
    /// Who may use the API socket, and where snapshots go.
    #[command(flatten)]
    pub local: local::LocalArgs,
    /// The certificate `volume://` disks present to their node (a `tern pki issue --role host`
    /// directory, normally this host's): the NBD connection runs NBD_OPT_STARTTLS with it and
    /// the lease messages go over TLS. Needed when the node runs with --tls-dir.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Back guest RAM with transparent huge pages (madvise MADV_HUGEPAGE) or not (MADV_NOHUGEPAGE):
    /// on or off. Default: on where this host's THP mode (/sys/kernel/mm/transparent_hugepage/enabled)
    /// is madvise or always, off elsewhere; `on` is refused where it is never.
    #[arg(long, value_name = "on|off")]
    pub huge_pages: Option<tern_vmm::config::HugePages>,
    /// Directory of runtime entries.
    #[arg(long, default_value = DEFAULT_RUNTIME_DIR, value_name = "DIR")]
    pub runtime_dir: PathBuf,
}

/// Options of the control subcommands.
#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// The VM.
    #[command(flatten)]
    pub vm: VmRef,
}

pub fn run(cmd: VmCommand) -> anyhow::Result<ExitCode> {
    // `--disk volume://…`; the guard releases the disks' write leases when the command ends.
    // A migration target opens its writable disks without the lease (it comes by hand-over).
    let _volume_disks = volume_disk::register(matches!(cmd, VmCommand::Receive(_)));
    match cmd {
        VmCommand::Run(args) => run_vm(*args),
        VmCommand::List(a) => list::run(a),
        VmCommand::Pause(a) => control(&a.vm, Request::Pause),
        VmCommand::Resume(a) => control(&a.vm, Request::Resume),
        VmCommand::Status(a) => control(&a.vm, Request::Status),
        VmCommand::Stop(a) => control(&a.vm, Request::Shutdown),
        VmCommand::Announce(a) => control(&a.vm, Request::Announce),
        VmCommand::Snapshot(a) => snapshot(a),
        VmCommand::Migrate(a) => migrate::run(a),
        VmCommand::Receive(a) => receive(a),
        VmCommand::ConsoleInput(a) => guest_io::console_input(a),
        VmCommand::DirtyRate(a) => guest_io::dirty_rate(a),
    }
}

/// The images `builtin:NAME` can name.
fn builtin(name: &str) -> Option<Arc<[u8]>> {
    tern_guest_image::builtin(name).map(Arc::from)
}

pub(crate) fn kernel_source(arg: &str) -> anyhow::Result<KernelSource> {
    match arg.strip_prefix("builtin:") {
        None => Ok(KernelSource::File(PathBuf::from(arg))),
        Some(name) => match builtin(name) {
            Some(bytes) => Ok(KernelSource::Embedded {
                name: arg.to_string(),
                bytes,
            }),
            None => Err(tern_vmm::config::ConfigError::UnknownBuiltin {
                name: name.to_string(),
                known: tern_guest_image::NAMES.join(", "),
            }
            .into()),
        },
    }
}

fn run_vm(args: RunArgs) -> anyhow::Result<ExitCode> {
    // Read the certificate and key before the sandbox closes the files off.
    volume_disk::use_tls(args.tls_dir.as_deref())?;
    let mut snap = match &args.restore {
        Some(p) => Some(tern_vmm::snapshot::open(p)?),
        None => None,
    };
    let (kernel, cmdline, memory_mib, vcpus, disks) = match &snap {
        // The snapshot's memory replaces the kernel's: the kernel is a placeholder, and no file
        // the snapshot names is opened unless the command line names or allows it.
        Some(s) => (
            "builtin:testguest".to_string(),
            s.meta.cmdline.clone(),
            s.meta.memory_mib,
            u32::from(s.meta.vcpus),
            local::restore_disks(&s.meta.disks, &args.disk, &args.restore_allow_disk)?,
        ),
        None => (
            args.kernel.clone().unwrap_or_default(),
            args.cmdline.clone(),
            args.memory_mib,
            args.vcpus,
            args.disk.clone(),
        ),
    };
    let name = args
        .name
        .unwrap_or_else(|| format!("vm-{}", std::process::id()));
    let api_sock = local::api_sock(args.api_sock, &args.runtime_dir, &name)?;
    let api_opts = args.local.api_options(&args.runtime_dir);
    let input = VmConfigInput {
        kernel: kernel_source(&kernel)?,
        initrd: args.initrd,
        cmdline,
        memory_mib,
        vcpus,
        disks,
        serial: args.serial,
        api_sock: Some(api_sock),
        name,
        runtime_dir: args.runtime_dir,
    };
    let host = HostLimits::probe();
    let cfg = with_huge_pages(
        with_network(input.validate(&host)?, &args.net, &args.announce)?,
        args.huge_pages,
        &host,
    )?;
    jail::start(
        &args.sandbox,
        &cfg.name,
        &jail::JailFiles::for_config(&cfg)?.with_snapshot_dir(&api_opts.snapshot_dir),
    )?;
    signals::block_termination_signals().context("cannot block termination signals")?;
    let vm = Vm::create(cfg.clone())?;
    if let Some(s) = snap.as_mut() {
        let spinner = progress::spinner(format!(
            "restoring {} MiB from {}",
            memory_mib,
            args.restore.as_deref().unwrap_or(Path::new("")).display()
        ));
        let restored = (|| -> anyhow::Result<()> {
            vm.zero_memory()?;
            s.load_memory(&vm)?;
            vm.restore_state(&s.state)
                .context("cannot restore the snapshot's state")?;
            Ok(())
        })();
        progress::clear(spinner);
        if let Err(e) = restored {
            vm.request_stop();
            vm.wait();
            return Err(e);
        }
    }
    serve(vm, &cfg, api_opts)
}

/// Registers a built, parked VM (API socket, runtime entry), resumes it and waits for its end.
pub(crate) fn serve(
    vm: Vm,
    cfg: &tern_vmm::config::VmConfig,
    api_opts: tern_vmm::api::ApiOptions,
) -> anyhow::Result<ExitCode> {
    jail::enter_api_filter()?;
    signals::stop_on_termination(vm.clone()).context("cannot watch termination signals")?;
    let api = match &cfg.api_sock {
        Some(path) => match ApiServer::start(path, vm.clone(), api_opts) {
            Ok(s) => Some(s),
            Err(e) => {
                vm.request_stop();
                vm.wait();
                return Err(e.into());
            }
        },
        None => None,
    };
    let pid = std::process::id();
    let entry = RuntimeEntry {
        name: cfg.name.clone(),
        pid,
        api_sock: cfg.api_sock.clone(),
        // Thread ids are positive.
        vcpu_tids: vm
            .vcpu_tids()
            .into_iter()
            .filter_map(|t| u32::try_from(t).ok())
            .collect(),
        vcpus: Some(cfg.vcpus),
        memory_mib: Some(cfg.memory_mib),
        started_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_millis() as u64),
        pid_start_ticks: runtime::process_start_ticks(pid),
    };
    let entry = match RuntimeEntryGuard::write(&cfg.runtime_dir, &entry) {
        Ok(g) => g,
        Err(e) => {
            vm.request_stop();
            vm.wait();
            return Err(e.into());
        }
    };
    if let Err(e) = jail::lock_down(cfg) {
        vm.request_stop();
        vm.wait();
        return Err(e);
    }
    if vm.status().state != tern_vmm::RunState::Running
        && let Err(e) = vm.resume()
    {
        vm.request_stop();
        vm.wait();
        return Err(e.into());
    }
    let exit = vm.wait();
    let stopped_by = api.as_ref().and_then(ApiServer::stopped_by);
    drop(entry);
    drop(api);
    Ok(match exit {
        VmExit::PowerOff { status } => {
            eprintln!("tern: guest powered off with status {status}");
            ExitCode::from(status)
        }
        VmExit::Reset => {
            eprintln!("tern: guest reboot requested; VM stopped");
            ExitCode::SUCCESS
        }
        VmExit::Stopped => {
            eprintln!("tern: {}", stopped_message(stopped_by.as_ref()));
            ExitCode::SUCCESS
        }
        VmExit::Fault { report, .. } => {
            eprintln!("tern: guest stopped on a fault\n{report}");
            ExitCode::from(EXIT_GUEST_FAULT)
        }
    })
}

/// The last line of a VMM whose VM was stopped: by whom, and where the VM is now.
fn stopped_message(by: Option<&ApiStop>) -> String {
    match by {
        Some(ApiStop::Migrated { to }) => {
            format!("VM migrated to {to}; it runs there now and has stopped here")
        }
        Some(ApiStop::Snapshot { path }) => format!(
            "VM stopped after its snapshot to {} (continue it with `tern vm run --restore {}`)",
            path.display(),
            path.display()
        ),
        Some(ApiStop::Shutdown) => "VM stopped (tern vm stop)".into(),
        None => "VM stopped".into(),
    }
}

fn control(vm: &VmRef, req: Request) -> anyhow::Result<ExitCode> {
    control_at(&vm.socket()?, req)
}

/// Sends one request to the VM at `sock` and prints the answer (`ok`, or the status as JSON).
fn control_at(sock: &Path, req: Request) -> anyhow::Result<ExitCode> {
    let resp = tern_vmctl::request(sock, &req)?;
    match resp.status {
        Some(status) => println!("{}", serde_json::to_string_pretty(&status)?),
        None => println!("ok"),
    }
    Ok(ExitCode::SUCCESS)
}

fn snapshot(a: SnapshotArgs) -> anyhow::Result<ExitCode> {
    let sock = a.vm.socket()?;
    // A bare file name goes into the VM's snapshot directory; any other relative path is made
    // absolute here, and the VMM refuses it unless it lies directly in that directory.
    let bare = a.out.parent().is_some_and(|p| p.as_os_str().is_empty());
    let path = if bare {
        a.out
    } else {
        std::path::absolute(&a.out).unwrap_or(a.out)
    };
    let spinner = progress::spinner(format!("writing a snapshot to {}", path.display()));
    let resp = tern_vmctl::request(&sock, &Request::Snapshot { path, stop: a.stop });
    progress::clear(spinner);
    resp?;
    println!("ok");
    Ok(ExitCode::SUCCESS)
}

/// Adds the `--net` NICs and the `--announce` schedule to a validated configuration.
fn with_network(
    cfg: tern_vmm::config::VmConfig,
    nets: &[String],
    announce: &str,
) -> anyhow::Result<tern_vmm::config::VmConfig> {
    let nets = nets
        .iter()
        .map(|n| tern_vmm::config::parse_net(n))
        .collect::<Result<Vec<_>, _>>()?;
    let mut cfg = cfg.with_nets(nets)?;
    cfg.announce =
        tern_vmm::devices::announce::AnnounceSchedule::parse(announce).with_context(|| {
            format!(
                "bad --announce {announce:?} (give offsets in ms like 0,50,200,450,800, or off)"
            )
        })?;
    Ok(cfg)
}

/// `--huge-pages` when given; the configuration's default (by the host's THP mode) otherwise.
fn with_huge_pages(
    cfg: tern_vmm::config::VmConfig,
    huge_pages: Option<tern_vmm::config::HugePages>,
    host: &HostLimits,
) -> anyhow::Result<tern_vmm::config::VmConfig> {
    Ok(match huge_pages {
        Some(h) => cfg.with_huge_pages(h, host)?,
        None => cfg,
    })
}

fn receive(a: ReceiveArgs) -> anyhow::Result<ExitCode> {
    // Read the certificate and key before the sandbox closes the files off.
    let tls = match &a.tls_dir {
        Some(d) => {
            Some(Arc::new(tern_pki::TlsDir::load(d).with_context(|| {
                format!("cannot use --tls-dir {}", d.display())
            })?))
        }
        None => None,
    };
    volume_disk::use_tls(a.tls_dir.as_deref())?;
    let jail_name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("vm-{}", std::process::id()));
    let jail_files = jail::JailFiles::for_receive(
        &a.disk,
        !a.net.is_empty(),
        a.api_sock.as_deref(),
        &a.runtime_dir,
        &a.serial,
    )?
    .with_snapshot_dir(&a.local.api_options(&a.runtime_dir).snapshot_dir);
    // Probed now: a jailed VMM does not see /sys (its THP mode).
    let host = HostLimits::probe();
    let huge_pages = a.huge_pages;
    if huge_pages == Some(tern_vmm::config::HugePages::On) && !host.thp.allows_huge_pages() {
        return Err(tern_vmm::config::ConfigError::HugePagesUnavailable(host.thp).into());
    }
    jail::start(&a.sandbox, &jail_name, &jail_files)?;
    let listener = std::net::TcpListener::bind(&a.listen)
        .with_context(|| format!("cannot listen on {} (give a free HOST:PORT)", a.listen))?;
    signals::block_termination_signals().context("cannot block termination signals")?;
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("vm-{}", std::process::id()));
    let built: Arc<std::sync::Mutex<Option<tern_vmm::config::VmConfig>>> = Arc::default();
    let built2 = built.clone();
    let api_sock = Some(local::api_sock(a.api_sock.clone(), &a.runtime_dir, &name)?);
    let api_opts = a.local.api_options(&a.runtime_dir);
    let (serial, disks, runtime_dir) = (a.serial.clone(), a.disk.clone(), a.runtime_dir.clone());
    let (want_vcpus, want_mib) = (a.vcpus, a.memory_mib);
    let (nets, announce) = (a.net.clone(), a.announce.clone());
    // Check the network options now, not when the source connects.
    for n in &nets {
        tern_vmm::config::parse_net(n)?;
    }
    tern_vmm::devices::announce::AnnounceSchedule::parse(&announce)
        .with_context(|| format!("bad --announce {announce:?} (give offsets in ms, or off)"))?;
    let build: tern_vmm::migrate::BuildVm = Box::new(move |d| {
        let mib = d.layout.total_bytes() >> 20;
        if let Some(v) = want_vcpus.filter(|&v| v != d.vcpus) {
            return Err(format!(
                "vCPU count differs: source {}, this host accepts {v}",
                d.vcpus
            ));
        }
        if let Some(m) = want_mib.filter(|&m| m != mib) {
            return Err(format!(
                "memory differs: source {mib} MiB, this host accepts {m} MiB"
            ));
        }
        // The VM's memory is replaced by the source's: the kernel loaded here is a placeholder.
        let input = VmConfigInput {
            kernel: kernel_source("builtin:testguest").map_err(|e| e.to_string())?,
            initrd: None,
            cmdline: String::new(),
            memory_mib: mib,
            vcpus: d.vcpus,
            disks: disks.clone(),
            serial: serial.clone(),
            api_sock: api_sock.clone(),
            name: name.clone(),
            runtime_dir: runtime_dir.clone(),
        };
        let cfg = input.validate(&host).map_err(|e| e.to_string())?;
        let cfg = with_network(cfg, &nets, &announce).map_err(|e| format!("{e:#}"))?;
        let cfg = with_huge_pages(cfg, huge_pages, &host).map_err(|e| format!("{e:#}"))?;
        let vm = Vm::create(cfg.clone()).map_err(|e| format!("cannot build the VM here: {e}"))?;
        *built2.lock().unwrap_or_else(|e| e.into_inner()) = Some(cfg);
        Ok(vm)
    });
    // A termination signal while waiting or receiving cancels the migration (the source keeps
    // the VM); once the VM runs here it stops it cleanly.
    let cancel = tern_migration::CancelToken::new();
    let handed: Arc<std::sync::Mutex<Option<Vm>>> = Arc::default();
    {
        let (cancel, handed) = (cancel.clone(), handed.clone());
        signals::on_termination(move || {
            match handed.lock().unwrap_or_else(|e| e.into_inner()).take() {
                Some(vm) => vm.request_stop(),
                None => cancel.cancel(),
            }
        })
        .context("cannot watch termination signals")?;
    }
    let mut target = resolve::FaultHooks::new(tern_vmm::migrate::VmTarget::new(build));
    let opts = tern_migration::ReceiveOptions {
        accept_timeout: a.accept_timeout.map(std::time::Duration::from_secs_f64),
        ..Default::default()
    };
    let guard = tern_migration::ListenGuard {
        tls,
        on_rejected: Some(Arc::new(|r: &tern_migration::Rejected| {
            eprintln!("tern: {r}")
        })),
        ..Default::default()
    };
    eprintln!(
        "tern: waiting for a migration on {}{}",
        a.listen,
        if guard.tls.is_some() {
            " (mutual TLS)"
        } else {
            ""
        }
    );
    let report = tern_migration::receive_guarded(&listener, &mut target, &opts, &guard, &cancel);
    match report {
        Ok(r) => {
            eprintln!(
                "tern: migration received in {} ms; the VM runs here",
                r.total_ms
            );
            let vm = target
                .into_inner()
                .into_vm()
                .context("no VM after the migration")?;
            // The receive address stays ours while the VM runs: it answers `--resolve` queries.
            resolve::start_responder(listener, vm.clone(), guard.tls.clone());
            *handed.lock().unwrap_or_else(|e| e.into_inner()) = Some(vm.clone());
            let cfg = built
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .context("no VM configuration after the migration")?;
            serve(vm, &cfg, api_opts)
        }
        Err(e) => {
            drop(listener);
            eprintln!(
                "tern: incoming migration failed: {}; nothing runs here",
                tern_migration::error_chain(&e)
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: Vec<String>) -> VmCommand {
        let argv = std::iter::once("tern".to_string()).chain(args);
        match crate::Cli::try_parse_from(argv) {
            Ok(crate::Cli {
                command: crate::Command::Vm(cmd),
            }) => cmd,
            Ok(other) => panic!("not a vm command: {other:?}"),
            Err(e) => panic!("tern vm refuses the agent's arguments: {e}"),
        }
    }

    fn spec() -> tern_api::cluster::VmCreate {
        serde_json::from_str(
            r#"{"name":"db","vcpus":2,"memory_mib":128,"kernel":"builtin:testguest","cmdline":"tern.hb_ms=50"}"#,
        )
        .unwrap()
    }

    #[test]
    fn the_vmm_command_line_tern_vmctl_builds_is_the_one_tern_vm_run_parses() {
        let args = tern_vmctl::VmmArgs::run(&spec(), Path::new("/run/t"))
            .disk("volume://10.0.0.1:7000/db")
            .to_args();
        let VmCommand::Run(r) = parse(args) else {
            panic!("not run");
        };
        assert_eq!(r.kernel.as_deref(), Some("builtin:testguest"));
        assert_eq!(r.cmdline, "tern.hb_ms=50");
        assert_eq!((r.vcpus, r.memory_mib), (2, 128));
        assert_eq!(r.name.as_deref(), Some("db"));
        assert_eq!(r.runtime_dir, Path::new("/run/t"));
        assert_eq!(r.serial, "file:/run/t/db.console");
        assert_eq!(r.disk, ["volume://10.0.0.1:7000/db"]);
        assert_eq!(r.api_sock, None);
        assert_eq!(r.tls_dir, None);
    }

    #[test]
    fn the_agents_tls_dir_reaches_run_and_receive() {
        // The agent appends its host directory to every VMM's command line.
        let spec = spec();
        let tls = ["--tls-dir".to_string(), "/pki/h0".to_string()];
        let run = tern_vmctl::VmmArgs::run(&spec, Path::new("/run/t"))
            .disk("volume://10.0.0.1:7000/db")
            .to_args();
        let VmCommand::Run(r) = parse(run.into_iter().chain(tls.clone()).collect()) else {
            panic!("not run");
        };
        assert_eq!(r.tls_dir.as_deref(), Some(Path::new("/pki/h0")));
        let recv = tern_vmctl::VmmArgs::receive(&spec, "10.0.0.2:7001", Path::new("/run/t"))
            .disk("volume://10.0.0.2:7000/db")
            .to_args();
        let VmCommand::Receive(r) = parse(recv.into_iter().chain(tls).collect()) else {
            panic!("not receive");
        };
        assert_eq!(r.tls_dir.as_deref(), Some(Path::new("/pki/h0")));
    }

    #[test]
    fn the_receive_command_line_tern_vmctl_builds_is_the_one_tern_vm_receive_parses() {
        let args = tern_vmctl::VmmArgs::receive(&spec(), "10.0.0.2:7001", Path::new("/run/t"))
            .api_sock("/tmp/db.sock")
            .to_args();
        let VmCommand::Receive(r) = parse(args) else {
            panic!("not receive");
        };
        assert_eq!(r.listen, "10.0.0.2:7001");
        assert_eq!((r.vcpus, r.memory_mib), (Some(2), Some(128)));
        assert_eq!(r.name.as_deref(), Some("db"));
        assert_eq!(r.api_sock.as_deref(), Some(Path::new("/tmp/db.sock")));
        assert_eq!(r.serial, "file:/run/t/db.console");
    }
}

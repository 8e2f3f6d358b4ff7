//! `tern vm …`: run one VM in the foreground (`run`) and drive running VMs through their control
//! socket (`pause`, `resume`, `status`, `stop`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tern_vmm::api::{self, ApiServer, Request};
use tern_vmm::config::{HostLimits, KernelSource, VmConfigInput};
use tern_vmm::runtime::{DEFAULT_RUNTIME_DIR, RuntimeEntry, RuntimeEntryGuard};
use tern_vmm::{Vm, VmExit, signals};

/// Exit status of `tern vm run` when the guest faulted or hit an exit Tern does not handle.
pub const EXIT_GUEST_FAULT: u8 = 70;

/// Subcommands of `tern vm`.
#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Run one VM in the foreground until the guest powers off, resets, or is stopped.
    ///
    /// The process exits with the status the guest wrote to port 0x501 (0 = clean power-off),
    /// 0 after a reset request or `tern vm stop`, and 70 after a guest fault (the vCPU registers are
    /// printed on stderr).
    Run(Box<RunArgs>),
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
}

/// Options of `tern vm run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The kernel: a PVH ELF, an ELF vmlinux, a bzImage, or builtin:testguest.
    #[arg(long, value_name = "PATH|builtin:NAME")]
    pub kernel: String,
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
    /// A virtio-blk disk over a raw image file; repeat for more disks.
    #[arg(long, value_name = "PATH[,readonly]")]
    pub disk: Vec<String>,
    /// Where the serial console (COM1) goes: stdout, null or file:PATH.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// A virtio-net NIC over a tap (created if missing, or an existing one used); `ip=` tells the
    /// announce the guest's address (otherwise learnt from its traffic). Repeat for more NICs.
    #[arg(long, value_name = "tap=NAME,mac=MAC[,ip=ADDR]")]
    pub net: Vec<String>,
    /// When the NICs announce themselves after a restore or migration: offsets in ms from the
    /// resume, or `off`.
    #[arg(long, default_value = "0,50,200,450,800", value_name = "MS,MS,...|off")]
    pub announce: String,
    /// Serve the control API on this unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// The VM's name (default: vm-<pid>); names the runtime entry NAME.json.
    #[arg(long)]
    pub name: Option<String>,
    /// Directory of runtime entries.
    #[arg(long, default_value = DEFAULT_RUNTIME_DIR, value_name = "DIR")]
    pub runtime_dir: PathBuf,
}

/// Options of the control subcommands.
#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// The VM's control socket (its --api-sock).
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
}

pub fn run(cmd: VmCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VmCommand::Run(args) => run_vm(*args),
        VmCommand::Pause(a) => control(&a, Request::Pause),
        VmCommand::Resume(a) => control(&a, Request::Resume),
        VmCommand::Status(a) => control(&a, Request::Status),
        VmCommand::Stop(a) => control(&a, Request::Shutdown),
        VmCommand::Announce(a) => control(&a, Request::Announce),
    }
}

/// The images `builtin:NAME` can name.
fn builtin(name: &str) -> Option<Arc<[u8]>> {
    tern_guest_image::builtin(name).map(Arc::from)
}

fn kernel_source(arg: &str) -> anyhow::Result<KernelSource> {
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
    let input = VmConfigInput {
        kernel: kernel_source(&args.kernel)?,
        initrd: args.initrd,
        cmdline: args.cmdline,
        memory_mib: args.memory_mib,
        vcpus: args.vcpus,
        disks: args.disk,
        serial: args.serial,
        api_sock: args.api_sock,
        name: args
            .name
            .unwrap_or_else(|| format!("vm-{}", std::process::id())),
        runtime_dir: args.runtime_dir,
    };
    let mut cfg = input.validate(&HostLimits::probe())?;
    let nets = args
        .net
        .iter()
        .map(|n| tern_vmm::config::parse_net(n))
        .collect::<Result<Vec<_>, _>>()?;
    cfg = cfg.with_nets(nets)?;
    cfg.announce = tern_vmm::devices::announce::AnnounceSchedule::parse(&args.announce)
        .with_context(|| {
            format!(
                "bad --announce {:?} (give offsets in ms like 0,50,200,450,800, or off)",
                args.announce
            )
        })?;
    signals::block_termination_signals().context("cannot block termination signals")?;
    let vm = Vm::create(cfg.clone())?;
    signals::stop_on_termination(vm.clone()).context("cannot watch termination signals")?;
    let api = match &cfg.api_sock {
        Some(path) => match ApiServer::start(path, vm.clone()) {
            Ok(s) => Some(s),
            Err(e) => {
                vm.request_stop();
                vm.wait();
                return Err(e.into());
            }
        },
        None => None,
    };
    let entry = RuntimeEntry {
        name: cfg.name.clone(),
        pid: std::process::id(),
        api_sock: cfg.api_sock.clone(),
        vcpu_tids: vm.vcpu_tids(),
    };
    let entry = match RuntimeEntryGuard::write(&cfg.runtime_dir, &entry) {
        Ok(g) => g,
        Err(e) => {
            vm.request_stop();
            vm.wait();
            return Err(e.into());
        }
    };
    if let Err(e) = vm.resume() {
        vm.request_stop();
        vm.wait();
        return Err(e.into());
    }
    let exit = vm.wait();
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
            eprintln!("tern: VM stopped");
            ExitCode::SUCCESS
        }
        VmExit::Fault { report, .. } => {
            eprintln!("tern: guest stopped on a fault\n{report}");
            ExitCode::from(EXIT_GUEST_FAULT)
        }
    })
}

fn control(args: &ApiArgs, req: Request) -> anyhow::Result<ExitCode> {
    let resp = api::call(&args.api_sock, req)?;
    if !resp.ok {
        anyhow::bail!(
            "the VM refused: {}",
            resp.error.unwrap_or_else(|| "no reason given".into())
        );
    }
    match resp.status {
        Some(status) => println!("{}", serde_json::to_string_pretty(&status)?),
        None => println!("ok"),
    }
    Ok(ExitCode::SUCCESS)
}

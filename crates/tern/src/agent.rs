//! `tern agent`: the host agent, one per host (a thin shell over `tern_agent::shell`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tern_api::cluster::HostCapacity;

/// Register this host in etcd and run the VMs the leading controller asks for.
///
/// The host record `/tern/hosts/ID` lives under an etcd lease kept alive every TTL/3. When the
/// lease cannot be renewed until TTL minus the fence margin, the agent kills its VMMs (so the
/// controller may restart them elsewhere once the lease has expired). Commands come in on
/// `POST /v1/agent/commands`; `GET /v1/agent/status` and `GET /metrics` show the agent's view.
/// Each VM runs as a child `tern vm run` process, and dies with the agent. Every report carries
/// each VM's CPU utilisation and dirty-page rate (sampled every 5 s over 200 ms), the host's
/// utilisation and, unless `--parking off`, the cores the parking policy parked.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The host's name (its key under /tern/hosts/)
    #[arg(long, value_name = "ID")]
    host_id: String,
    /// etcd client URL(s), comma-separated
    #[arg(long, value_name = "URL", value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// Where the command API listens, ADDR:PORT (receivers listen on the same address)
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The URL controllers reach this agent at (default: http://LISTEN)
    #[arg(long, value_name = "URL")]
    advertise_url: Option<String>,
    /// Physical cores offered to VMs (default: this host's CPUs)
    #[arg(long, value_name = "N")]
    cores: Option<u32>,
    /// Memory offered to VMs, MiB (default: this host's memory less 1 GiB)
    #[arg(long, value_name = "MIB")]
    memory_mib: Option<u64>,
    /// The host's SPECpower model (hp-ml110-g4, hp-ml110-g5 or their full names)
    #[arg(long, value_name = "NAME", default_value = "hp-ml110-g5")]
    power_model: String,
    /// This host's volume node, ADDR:PORT
    #[arg(long, value_name = "ADDR:PORT")]
    volume_node: Option<String>,
    /// This host's volume node id
    #[arg(long, value_name = "N")]
    volume_node_id: Option<u32>,
    /// The etcd lease TTL, ms
    #[arg(long, value_name = "MS", default_value_t = 5_000)]
    lease_ttl_ms: u64,
    /// Kill the VMMs this long before the lease could expire, ms
    #[arg(long, value_name = "MS", default_value_t = 2_000)]
    fence_margin_ms: u64,
    /// Telemetry interval (reports to the leading controller), ms
    #[arg(long, value_name = "MS", default_value_t = 1_000)]
    report_interval_ms: u64,
    /// Where the highest controller generation seen is kept (default: /var/lib/tern/agent-ID)
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The VMMs' runtime directory (default: /run/tern/agent-ID)
    #[arg(long, value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// How long a command may take (a migration out) before its request answers 504, seconds
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    command_timeout: u64,
    /// The fraction of one real CPU each declared core stands for (0 < F <= 1): VM utilisation is
    /// vCPU time / (vCPUs x F); below 1, host utilisation is its VMMs' CPU time / (cores x F)
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    cpu_share: f64,
    /// Core parking on this host: off; report (run the policy on this host's vCPU threads and
    /// report parked cores, change nothing); on (also confine this agent's vCPU threads to the
    /// unparked CPUs)
    #[arg(long, value_name = "off|report|on", default_value = "report")]
    parking: String,
    /// This host's TLS directory (`tern pki issue --name ID --role host`): the command API then
    /// serves only mutual TLS (commands from controller certificates only), etcd and the
    /// controller are reached over TLS with this certificate, and the VMMs present it to the
    /// volume node (their volume:// disks) and to each other (live migrations)
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
}

fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((kib / 1024).saturating_sub(1024).max(256))
}

/// Runs `tern agent`.
pub fn run(a: AgentArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        tern_controller::place::known_power_model(&a.power_model).is_some(),
        "--power-model {:?} is not a model Tern knows (hp-ml110-g4, hp-ml110-g5, \
         HpProLiantMl110G4Xeon3040, HpProLiantMl110G5Xeon3075)",
        a.power_model
    );
    if let Some(node) = &a.volume_node {
        anyhow::ensure!(
            node.parse::<SocketAddr>().is_ok(),
            "--volume-node {node:?} is not ADDR:PORT"
        );
    }
    let cores = match a.cores {
        Some(c) => c,
        None => std::thread::available_parallelism()
            .context("cannot count this host's CPUs; give --cores")?
            .get() as u32,
    };
    let memory_mib = match a.memory_mib {
        Some(m) => m,
        None => host_memory_mib().context("cannot read /proc/meminfo; give --memory-mib")?,
    };
    let cpu_share = tern_agent::telemetry::CpuShare::new(a.cpu_share)?;
    let parking: tern_agent::telemetry::ParkingMode = a.parking.parse()?;
    let opts = tern_agent::shell::Options {
        state_dir: a
            .state_dir
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/tern/agent-{}", a.host_id))),
        runtime_dir: a
            .runtime_dir
            .unwrap_or_else(|| PathBuf::from(format!("/run/tern/agent-{}", a.host_id))),
        host_id: a.host_id,
        etcd: a.etcd,
        listen: a.listen,
        advertise_url: a.advertise_url,
        capacity: HostCapacity {
            cores,
            memory_mib,
            power_model: a.power_model,
            volume_node: a.volume_node,
            volume_node_id: a.volume_node_id,
        },
        lease_ttl_ms: a.lease_ttl_ms,
        fence_margin_ms: a.fence_margin_ms,
        report_interval_ms: a.report_interval_ms,
        command_timeout: Duration::from_secs(a.command_timeout.max(1)),
        exe: std::env::current_exe().context("cannot find the tern binary to run VMMs with")?,
        cpu_share,
        parking,
        tls_dir: a.tls_dir,
    };
    tern_agent::shell::run(opts)?;
    Ok(ExitCode::SUCCESS)
}

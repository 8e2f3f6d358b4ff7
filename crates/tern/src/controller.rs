//! `tern controller`: the cluster controller (a thin shell over `tern_controller::shell`).

use std::net::SocketAddr;
use std::process::ExitCode;

use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tern_controller::core::Config;
use tern_controller::shell::{Shell, ShellConfig};
use tern_power::ipmi::{BmcAddr, IpmiConfig, IpmiDriver};

/// Run a cluster controller: campaign for leadership in etcd, and while leading place, move and
/// restart VMs and serve the REST API.
///
/// Several may run: one leads (etcd election `/tern/leader`; the leader key's revision is its
/// generation, attached to every command and checked in every etcd write). The others answer
/// every `/v1` call with 503 naming the leader's URL. The API is under `/v1`, its OpenAPI
/// document at `/openapi.json`, Prometheus metrics at `/metrics` (see docs/cluster.md). On SIGINT
/// or SIGTERM it resigns and revokes its election lease, so another controller leads at once.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// etcd client URL(s), comma-separated
    #[arg(long, value_name = "URL", value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// Where the REST API listens, ADDR:PORT
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The URL agents and clients reach this controller at (default: http://LISTEN)
    #[arg(long, value_name = "URL")]
    advertise_url: Option<String>,
    /// The election lease's TTL, ms (whole seconds in etcd; at least 1000)
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    lease_ttl_ms: u64,
    /// The agents' etcd lease TTL, ms (the HA timing: a lost host's VMs restart after its
    /// lease expired plus the fence margin)
    #[arg(long, value_name = "MS", default_value_t = Config::default().lease_ttl_ms)]
    agent_lease_ttl_ms: u64,
    /// Host failures the cluster keeps room for when placing new VMs
    #[arg(long, value_name = "N", default_value_t = Config::default().ha_reserve_hosts)]
    ha_reserve_hosts: u32,
    /// The hosts' BMCs, for the automation loop's host power actions: a JSON array of
    /// `{"host": NAME, "bmc": "ADDR:PORT", "user": USER, "password_file": PATH}` (IPMI over LAN
    /// with ipmitool, lanplus; other fields are ignored, so `tern cluster up --json`'s `bmcs`
    /// list works as it is). Without it, power actions fail with "no power driver for host".
    #[arg(long, value_name = "FILE")]
    power_file: Option<std::path::PathBuf>,
}

/// One entry of `--power-file`.
#[derive(Debug, serde::Deserialize)]
struct PowerEntry {
    host: String,
    bmc: String,
    user: String,
    password_file: std::path::PathBuf,
}

/// The IPMI drivers `--power-file` names, by host; every entry is checked (address, password
/// file) before the controller starts.
fn power_drivers(path: &std::path::Path) -> anyhow::Result<Vec<(String, IpmiDriver)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --power-file {}", path.display()))?;
    let entries: Vec<PowerEntry> = serde_json::from_str(&text).with_context(|| {
        format!(
            "--power-file {} is not a JSON array of {{\"host\", \"bmc\", \"user\", \"password_file\"}} objects",
            path.display()
        )
    })?;
    let mut out: Vec<(String, IpmiDriver)> = Vec::new();
    for e in entries {
        anyhow::ensure!(
            !out.iter().any(|(h, _)| *h == e.host),
            "--power-file {} names host {:?} twice",
            path.display(),
            e.host
        );
        let bmc: BmcAddr = e
            .bmc
            .parse()
            .with_context(|| format!("--power-file: host {}", e.host))?;
        let password = crate::host_power::read_password(&e.password_file)
            .with_context(|| format!("--power-file: host {}", e.host))?;
        let driver = IpmiDriver::new(IpmiConfig::new(e.host.clone(), bmc, e.user, password));
        out.push((e.host, driver));
    }
    Ok(out)
}

/// Runs `tern controller` until the process is killed.
pub fn run(args: ControllerArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.lease_ttl_ms >= 1000,
        "--lease-ttl-ms {} is too short: at least 1000",
        args.lease_ttl_ms
    );
    anyhow::ensure!(
        args.agent_lease_ttl_ms >= 1000,
        "--agent-lease-ttl-ms {} is too short: at least 1000",
        args.agent_lease_ttl_ms
    );
    let drivers = match &args.power_file {
        Some(p) => power_drivers(p)?,
        None => Vec::new(),
    };
    let cfg = ShellConfig {
        etcd: args.etcd,
        listen: args.listen,
        url: args.advertise_url,
        lease_ttl_ms: args.lease_ttl_ms,
        core: Config {
            lease_ttl_ms: args.agent_lease_ttl_ms,
            ha_reserve_hosts: args.ha_reserve_hosts,
            ..Config::default()
        },
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let shell = Shell::start_etcd(&cfg).await?;
        for (host, driver) in drivers {
            shell.set_power_driver(&host, Arc::new(driver));
        }
        eprintln!(
            "tern controller: API on http://{} ({}); campaigning in etcd at {}",
            cfg.listen,
            shell.shared().url(),
            cfg.etcd.join(",")
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = shell.serve_on(listener) => r?,
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        // A clean stop hands the leadership over at once rather than after the lease's TTL.
        eprintln!("tern controller: stopping; resigning the leadership and revoking the lease");
        shell.stop().await;
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

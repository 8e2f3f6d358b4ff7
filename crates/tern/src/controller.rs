//! `tern controller`: the cluster controller (a thin shell over `tern_controller::shell`).

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tern_controller::core::Config;
use tern_controller::shell::{Shell, ShellConfig};

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

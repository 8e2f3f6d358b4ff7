//! `tern controller`: the cluster controller (a thin shell over `tern_controller::shell`).

use std::net::SocketAddr;
use std::process::ExitCode;

use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tern_api::auth::TokenFile;
use tern_controller::core::Config;
use tern_controller::shell::auth::{Access, SharedAccess};
use tern_controller::shell::tls::ServerTls;
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
    /// This controller's TLS directory (`tern pki issue --role controller`): the API then serves
    /// only TLS and checks every caller (a client certificate of the cluster CA or a bearer
    /// token; viewers read, admins change), and etcd and the agents are reached over TLS with
    /// this certificate. Without it the API is open to anyone who can connect
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<std::path::PathBuf>,
    /// Bearer tokens: lines `NAME ROLE SHA256-HEX` (role viewer or admin; `tern cluster token
    /// add` writes them). Re-read when the file changes. Needs --tls-dir
    #[arg(long, value_name = "FILE")]
    tokens: Option<std::path::PathBuf>,
    /// Names of user certificates that are admins (other user certificates are viewers),
    /// comma-separated. Needs --tls-dir
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    admins: Vec<String>,
}

/// Reads the token file (an absent `path`: no tokens).
fn read_tokens(path: Option<&std::path::Path>) -> anyhow::Result<TokenFile> {
    let Some(path) = path else {
        return Ok(TokenFile::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --tokens {}", path.display()))?;
    TokenFile::parse(&text).with_context(|| format!("--tokens {}", path.display()))
}

/// Re-reads the token file whenever its modification time changes (checked every 2 s); a file
/// that no longer parses keeps the tokens in force and says why.
async fn watch_tokens(path: std::path::PathBuf, access: SharedAccess) {
    let stamp = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = stamp(&path);
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match read_tokens(Some(&path)) {
            Ok(tokens) => {
                let n = tokens.entries().len();
                access.write().unwrap_or_else(|e| e.into_inner()).tokens = tokens;
                eprintln!("tern controller: {} re-read: {n} token(s)", path.display());
            }
            Err(e) => eprintln!("tern controller: keeping the tokens in force: {e:#}"),
        }
    }
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
    anyhow::ensure!(
        args.tls_dir.is_some() || (args.tokens.is_none() && args.admins.is_empty()),
        "--tokens and --admins need --tls-dir: a bearer token over plain HTTP is readable by anyone on the path"
    );
    let tls = args.tls_dir.as_deref().map(ServerTls::load).transpose()?;
    // Its requests to volume nodes (fencing a lost host's leases) present the same certificate.
    if let Some(d) = &args.tls_dir {
        tern_volume::control::set_client_tls(d)
            .with_context(|| format!("--tls-dir {} for volume nodes", d.display()))?;
    }
    let access: SharedAccess = Arc::new(std::sync::RwLock::new(Access {
        tokens: read_tokens(args.tokens.as_deref())?,
        admins: args.admins.iter().cloned().collect(),
    }));
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
        tls_dir: args.tls_dir.clone(),
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
        let scheme = if tls.is_some() { "https" } else { "http" };
        eprintln!(
            "tern controller: API on {scheme}://{} ({}); campaigning in etcd at {}",
            cfg.listen,
            shell.shared().url(),
            cfg.etcd.join(",")
        );
        if tls.is_none() {
            eprintln!(
                "tern controller: no --tls-dir: the API is plain HTTP and anyone who can connect may change the cluster"
            );
        }
        if let Some(path) = args.tokens.clone() {
            tokio::spawn(watch_tokens(path, Arc::clone(&access)));
        }
        let serve = async {
            match &tls {
                Some(t) => {
                    shell.serve_tls_on(listener, t, access).await;
                    Ok(())
                }
                None => shell.serve_on(listener).await,
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = serve => r?,
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        // A clean stop hands the leadership over at once rather than after the lease's TTL.
        eprintln!("tern controller: stopping; resigning the leadership and revoking the lease");
        shell.stop().await;
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

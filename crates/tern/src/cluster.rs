//! `tern cluster`: a thin client of the controller's REST API (hosts, VMs, migrations,
//! maintenance, the automation loop's policy and plans), plus the test cluster's `up` and `down` (`cluster_up.rs`).
//!
//! The controller's URL comes from `--controller`, else `$TERN_CONTROLLER`, else
//! `http://127.0.0.1:7100`. A controller that does not lead answers 503 naming the leader's URL;
//! the client then asks the leader once. Errors are printed from the API's `ErrorBody`.
//!
//! Credentials for a controller served over TLS: `--tls-dir DIR` (else `$TERN_TLS_DIR`) holds
//! the cluster CA (`ca-cert.pem`, the only certificate trusted for `https://`) and, if the user
//! has one, a user certificate and key (`client-cert.pem`, `client-key.pem`); `--token TOKEN`
//! (else `$TERN_TOKEN`) is sent as `Authorization: Bearer`. `tern cluster token add` makes a
//! token and appends its hash to the controller's `--tokens` file.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use tern_api::automation::{Plan, PlanAction, Policy};
use tern_api::cluster::{
    ErrorBody, HostInfo, MaintenanceRequest, MigrateRequest, TaskInfo, TaskRef, TaskState,
    VmCreate, VmInfo,
};
use tern_controller::shell::http;

/// The controller URL used when neither `--controller` nor `$TERN_CONTROLLER` is given.
pub const DEFAULT_CONTROLLER: &str = "http://127.0.0.1:7100";

/// How long one API call may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The cluster: hosts, VMs, migrations and maintenance through the controller's API; a test
/// cluster on this machine (`up`, `down`).
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// List the hosts: state, maintenance, what is placed on them.
    Hosts(Conn),
    /// List the VMs: state and host.
    Vms(Conn),
    /// Create, remove and migrate VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Put a host into maintenance (its VMs move away live) or take it out.
    #[command(subcommand)]
    Host(HostCommand),
    /// The automation loop's policy: show it, or change some knobs (the rest stay).
    Policy {
        #[command(subcommand)]
        cmd: Option<PolicyCommand>,
        #[command(flatten)]
        conn: Conn,
    },
    /// The automation loop's plans, newest first.
    Plans(Conn),
    /// Apply or reject a proposed plan.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Bearer tokens for a controller's --tokens file.
    #[command(subcommand)]
    Token(TokenCommand),
    #[command(flatten)]
    Lab(crate::cluster_up::LabCommand),
}

/// Where the controller is and how to print.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// The controller's URL (default: $TERN_CONTROLLER, else http://127.0.0.1:7100)
    #[arg(long, value_name = "URL")]
    controller: Option<String>,
    /// Print the API's JSON instead of a table
    #[arg(long)]
    json: bool,
    /// TLS directory: the cluster CA (ca-cert.pem) and, optionally, a user certificate
    /// (client-cert.pem, client-key.pem) (default: $TERN_TLS_DIR)
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<std::path::PathBuf>,
    /// Bearer token for the controller (default: $TERN_TOKEN)
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
}

/// `tern cluster token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a random bearer token, append its hash to the controller's token file (created 0600
    /// if absent) and print the token once: it is stored nowhere else.
    Add {
        /// The token file (the one given to `tern controller --tokens`)
        #[arg(long, value_name = "FILE")]
        file: std::path::PathBuf,
        /// Who holds it (1-63 of a-z, A-Z, 0-9, '-', '_', '.', '@'; unique in the file)
        #[arg(long)]
        name: String,
        /// viewer (reads everything) or admin (also changes)
        #[arg(long, value_name = "viewer|admin")]
        role: tern_api::auth::Role,
    },
}

/// `tern cluster vm ...`.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM: the controller places it (PABFD, pins, anti-affinity) and starts it.
    Create(CreateArgs),
    /// Stop a VM and forget it.
    Rm {
        /// The VM's name
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Move a running VM live to another host.
    Migrate {
        /// The VM's name
        name: String,
        /// The target host (default: where placement says)
        #[arg(long, value_name = "HOST")]
        to: Option<String>,
        /// Switch to post-copy after N pre-copy rounds (1-1000): the source pauses for good, and
        /// the VM runs on the target at once, fetching the pages still owed on demand while the
        /// source pushes the rest. Failure rule: after the switch the VM's memory is split across
        /// both hosts, so a lost link is fatal (as in QEMU's post-copy): the target stops the
        /// guest, the paused source is killed, and the cluster restarts the VM from its disk.
        /// The target host needs userfaultfd (its agent runs as root). Default: pre-copy only
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
        post_copy_after: Option<u32>,
        /// Wait until the migration ends (exit status 1 if it failed)
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `tern cluster vm create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM's name (1-63 of a-z, 0-9 and '-')
    name: String,
    /// Virtual CPUs (1-64)
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory, MiB (16-1048576)
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    memory_mib: u64,
    /// The kernel: builtin:testguest or an absolute path present on every host
    #[arg(long, default_value = "builtin:testguest")]
    kernel: String,
    /// The kernel command line
    #[arg(long, default_value = "")]
    cmdline: String,
    /// A file on the shared volume used as the VM's disk
    #[arg(long, value_name = "FILE")]
    disk: Option<String>,
    /// Pin the VM to this host
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// VMs of the same group never share a host
    #[arg(long, value_name = "GROUP")]
    anti_affinity: Option<String>,
    /// Restart order after a host failure, 0-100 (higher first)
    #[arg(long, value_name = "N", default_value_t = 50)]
    restart_priority: u32,
    #[command(flatten)]
    conn: Conn,
}

/// `tern cluster host ...`.
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Enter maintenance (the host's VMs move away live; it takes no new ones) or leave it.
    Maintenance {
        /// The host's name
        host: String,
        /// Enter maintenance
        #[arg(long, conflicts_with = "leave", required_unless_present = "leave")]
        enter: bool,
        /// Leave maintenance
        #[arg(long)]
        leave: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `tern cluster policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Show the policy in force (the default).
    Get(Conn),
    /// Change the knobs given; the others keep their values. Out-of-range values are refused
    /// with the valid range, and nothing changes.
    Set(PolicySet),
}

/// `tern cluster policy set`.
#[derive(Debug, Args)]
pub struct PolicySet {
    /// How far the loop acts on its own
    #[arg(long, value_enum)]
    automation: Option<AutomationArg>,
    /// 1 (only relieve overloads) to 5 (consolidate eagerly)
    #[arg(long, value_name = "1-5")]
    aggressiveness: Option<u8>,
    /// The loop's period, seconds (2-3600)
    #[arg(long, value_name = "S")]
    interval_s: Option<u32>,
    /// Overload detector: thr, iqr, mad, lr, lrr
    #[arg(long, value_name = "NAME")]
    detector: Option<String>,
    /// VM selection: mmt, rs, mc, mu
    #[arg(long, value_name = "NAME")]
    selection: Option<String>,
    /// The detector's parameter
    #[arg(long, value_name = "X")]
    parameter: Option<f64>,
    /// Hysteresis: a host stays over/under this long before a plan acts, seconds
    #[arg(long, value_name = "S")]
    hold_s: Option<u32>,
    /// A consolidation plan must save at least this much energy, percent
    #[arg(long, value_name = "PCT")]
    min_improvement_pct: Option<f64>,
    /// Per-VM cooldown after a move, seconds
    #[arg(long, value_name = "S")]
    cooldown_s: Option<u32>,
    /// Migrations the loop may run at once (1-64)
    #[arg(long, value_name = "N")]
    max_migrations: Option<u32>,
    /// Host power management on or off
    #[arg(long, value_name = "BOOL")]
    power: Option<bool>,
    /// Powered-on empty hosts kept beyond need
    #[arg(long, value_name = "N")]
    spare_hosts: Option<u32>,
    /// A drained host stays empty this long before power-off, seconds
    #[arg(long, value_name = "S")]
    off_hold_s: Option<u32>,
    /// Capacity short this long before a host is powered on, seconds
    #[arg(long, value_name = "S")]
    on_hold_s: Option<u32>,
    /// Plan a move pre-copy is predicted not to finish with post-copy instead of holding it
    /// back (a lost link during post-copy loses the VM: the cluster restarts it from its disk)
    #[arg(long, value_name = "BOOL")]
    post_copy_fallback: Option<bool>,
    #[command(flatten)]
    conn: Conn,
}

/// `--automation`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AutomationArg {
    /// Plans are proposals; an operator applies them
    Manual,
    /// Placement automatic, migrations need approval
    Partial,
    /// Plans are applied as soon as they are made
    Full,
}

/// `tern cluster plan ...`.
#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Start applying a proposed plan (its migrations become tasks).
    Apply {
        /// The plan's id
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Reject a proposed plan.
    Reject {
        /// The plan's id
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Builds the policy to PUT: the one in force with the knobs given changed.
fn changed_policy(mut p: serde_json::Value, s: &PolicySet) -> serde_json::Value {
    let mut set = |key: &str, v: Option<serde_json::Value>| {
        if let Some(v) = v {
            match key.split_once('.') {
                Some((a, b)) => p[a][b] = v,
                None => p[key] = v,
            }
        }
    };
    let level = s.automation.map(|a| match a {
        AutomationArg::Manual => "manual",
        AutomationArg::Partial => "partial",
        AutomationArg::Full => "full",
    });
    set("automation", level.map(Into::into));
    set("aggressiveness", s.aggressiveness.map(Into::into));
    set("interval_s", s.interval_s.map(Into::into));
    set("detector", s.detector.clone().map(Into::into));
    set("selection", s.selection.clone().map(Into::into));
    set("parameter", s.parameter.map(Into::into));
    set("hold_s", s.hold_s.map(Into::into));
    set("min_improvement_pct", s.min_improvement_pct.map(Into::into));
    set("cooldown_s", s.cooldown_s.map(Into::into));
    set("max_migrations", s.max_migrations.map(Into::into));
    set("power.enabled", s.power.map(Into::into));
    set("power.spare_hosts", s.spare_hosts.map(Into::into));
    set("power.off_hold_s", s.off_hold_s.map(Into::into));
    set("power.on_hold_s", s.on_hold_s.map(Into::into));
    set("post_copy_fallback", s.post_copy_fallback.map(Into::into));
    p
}

fn policy_text(p: &Policy) -> String {
    format!(
        "automation {}, aggressiveness {}, every {} s, {}-{}-{}, hold {} s, min improvement {} %, \
         cooldown {} s, max {} migrations; power {} (spare {}, off after {} s, on after {} s); \
         post-copy fallback {}\n",
        serde_json::to_value(p.automation)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        p.aggressiveness,
        p.interval_s,
        p.detector.name(),
        p.selection.name(),
        p.parameter,
        p.hold_s,
        p.min_improvement_pct,
        p.cooldown_s,
        p.max_migrations,
        if p.power.enabled { "on" } else { "off" },
        p.power.spare_hosts,
        p.power.off_hold_s,
        p.power.on_hold_s,
        if p.post_copy_fallback { "on" } else { "off" }
    )
}

fn plans_table(plans: &[Plan]) -> String {
    use std::fmt::Write;
    let mut o = format!(
        "{:>4}  {:<10}  {:<8}  {}\n",
        "ID", "STATE", "LEVEL", "ACTIONS / REASON"
    );
    for p in plans {
        let _ = writeln!(
            o,
            "{:>4}  {:<10}  {:<8}  {}",
            p.id,
            p.state.name(),
            serde_json::to_value(p.automation)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            p.reason
        );
        for a in &p.actions {
            let what = match a {
                PlanAction::Migrate {
                    vm,
                    from,
                    to,
                    predicted,
                    ..
                } => {
                    let cost = predicted
                        .map(|c| format!(" (~{:.1} s, pause ~{:.0} ms)", c.time_s, c.downtime_ms))
                        .unwrap_or_default();
                    format!("migrate {vm} {from} -> {to}{cost}")
                }
                PlanAction::PowerOff { host, .. } => format!("power off {host}"),
                PlanAction::PowerOn { host, .. } => format!("power on {host}"),
            };
            let status = serde_json::to_value(a.status())
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let _ = writeln!(o, "{:>28}  {what} [{status}]", "");
        }
        if let Some(d) = &p.detail {
            let _ = writeln!(o, "{:>28}  {d}", "");
        }
    }
    o
}

/// Runs a `tern cluster` command.
pub fn run(cmd: ClusterCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ClusterCommand::Hosts(conn) => {
            let c = Client::new(&conn)?;
            let hosts: Vec<HostInfo> = c.call("GET", "/v1/hosts", None, 200)?;
            print(&conn, &hosts, || hosts_table(&hosts))
        }
        ClusterCommand::Vms(conn) => {
            let c = Client::new(&conn)?;
            let vms: Vec<VmInfo> = c.call("GET", "/v1/vms", None, 200)?;
            print(&conn, &vms, || vms_table(&vms))
        }
        ClusterCommand::Vm(VmCommand::Create(a)) => {
            let c = Client::new(&a.conn)?;
            let spec = VmCreate {
                name: a.name,
                vcpus: a.vcpus,
                memory_mib: a.memory_mib,
                kernel: a.kernel,
                cmdline: a.cmdline,
                disk: a.disk,
                host: a.host,
                anti_affinity: a.anti_affinity,
                restart_priority: a.restart_priority,
            };
            let vm: VmInfo = c.call("POST", "/v1/vms", Some(to_json(&spec)), 201)?;
            print(&a.conn, &vm, || {
                format!(
                    "VM {} created: {} on {}\n",
                    vm.name,
                    state_word(&vm),
                    vm.host.as_deref().unwrap_or("(no host yet)")
                )
            })
        }
        ClusterCommand::Vm(VmCommand::Rm { name, conn }) => {
            let c = Client::new(&conn)?;
            c.call_empty("DELETE", &format!("/v1/vms/{name}"), None, 204)?;
            print(&conn, &serde_json::json!({"deleted": name}), || {
                format!("VM {name} deleted\n")
            })
        }
        ClusterCommand::Vm(VmCommand::Migrate {
            name,
            to,
            post_copy_after,
            wait,
            conn,
        }) => {
            let c = Client::new(&conn)?;
            let req = MigrateRequest {
                to,
                post_copy_after,
            };
            let path = format!("/v1/vms/{name}/migrate");
            let task: TaskRef = c.call("POST", &path, Some(to_json(&req)), 202)?;
            if !wait {
                return print(&conn, &task, || {
                    format!(
                        "migration of {name} queued: task {} (tern cluster vm migrate --wait, or GET /v1/tasks/{})\n",
                        task.task, task.task
                    )
                });
            }
            let info = c.wait_task(task.task)?;
            let ok = info.state == TaskState::Succeeded;
            print(&conn, &info, || {
                let route = format!(
                    "{} -> {}",
                    info.from.as_deref().unwrap_or("?"),
                    info.to.as_deref().unwrap_or("?")
                );
                let secs = info
                    .finished_ms
                    .map(|f| f.saturating_sub(info.created_ms) as f64 / 1000.0)
                    .unwrap_or(0.0);
                // A post-copy move: what was owed at the switch and how it came over.
                let post_copy = info
                    .report
                    .clone()
                    .and_then(|r| serde_json::from_value::<tern_api::vmm::MigrationReport>(r).ok())
                    .and_then(|r| r.post_copy)
                    .map(|p| {
                        format!(
                            " (post-copy: {} pages owed, {} demanded in {} faults, {} pushed, {} ms)",
                            p.pages_owed,
                            p.pages_demanded,
                            p.demand_faults,
                            p.pages_pushed,
                            p.post_copy_ms
                        )
                    });
                let post_copy = post_copy.as_deref().unwrap_or("");
                match &info.error {
                    None if ok => format!("{name} moved {route} in {secs:.1} s{post_copy}\n"),
                    e => format!(
                        "{name} did not move ({route}): {}\n",
                        e.as_deref().unwrap_or("failed")
                    ),
                }
            })?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        ClusterCommand::Host(HostCommand::Maintenance {
            host,
            enter,
            leave,
            conn,
        }) => {
            debug_assert!(enter != leave);
            let c = Client::new(&conn)?;
            let path = format!("/v1/hosts/{host}/maintenance");
            let req = to_json(&MaintenanceRequest { enter });
            let (status, body) = c.send("POST", &path, Some(req))?;
            match status {
                202 => {
                    let t: TaskRef = decode(&body)?;
                    print(&conn, &t, || {
                        format!(
                            "host {host} entering maintenance: task {} moves its VMs away\n",
                            t.task
                        )
                    })
                }
                200 => {
                    let h: HostInfo = decode(&body)?;
                    print(&conn, &h, || {
                        format!(
                            "host {host} is {}in maintenance\n",
                            if h.maintenance { "" } else { "not " }
                        )
                    })
                }
                _ => Err(api_error(status, &body, &c.url)),
            }
        }
        ClusterCommand::Policy { cmd, conn } => {
            let (conn, set) = match cmd {
                None => (conn, None),
                Some(PolicyCommand::Get(c)) => (c, None),
                Some(PolicyCommand::Set(set)) => (set.conn.clone(), Some(set)),
            };
            let c = Client::new(&conn)?;
            let p: Policy = match set {
                None => c.call("GET", "/v1/policy", None, 200)?,
                Some(set) => {
                    let now: serde_json::Value = c.call("GET", "/v1/policy", None, 200)?;
                    let want = changed_policy(now, &set);
                    c.call("PUT", "/v1/policy", Some(to_json(&want)), 200)?
                }
            };
            print(&conn, &p, || policy_text(&p))
        }
        ClusterCommand::Plans(conn) => {
            let c = Client::new(&conn)?;
            let plans: Vec<Plan> = c.call("GET", "/v1/plans", None, 200)?;
            print(&conn, &plans, || plans_table(&plans))
        }
        ClusterCommand::Plan(PlanCommand::Apply { id, conn }) => {
            let c = Client::new(&conn)?;
            let p: Plan = c.call("POST", &format!("/v1/plans/{id}/apply"), None, 202)?;
            print(&conn, &p, || {
                format!(
                    "plan {id} is {} (tern cluster plans shows its progress)\n",
                    p.state.name()
                )
            })
        }
        ClusterCommand::Plan(PlanCommand::Reject { id, conn }) => {
            let c = Client::new(&conn)?;
            let p: Plan = c.call("POST", &format!("/v1/plans/{id}/reject"), None, 200)?;
            print(&conn, &p, || format!("plan {id} is {}\n", p.state.name()))
        }
        ClusterCommand::Token(TokenCommand::Add { file, name, role }) => {
            let token = add_token(&file, &name, role)?;
            eprintln!(
                "token {name:?} ({role}) added to {}; it is printed once, here:",
                file.display()
            );
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Lab(cmd) => crate::cluster_up::run(cmd),
    }
}

/// Makes a random token (32 bytes from the kernel's CSPRNG, hex, `tern_` in front), appends
/// `NAME ROLE SHA256` to `file` (created 0600 when absent) after checking the file still parses
/// with it, and returns the token.
pub fn add_token(
    file: &std::path::Path,
    name: &str,
    role: tern_api::auth::Role,
) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .context("cannot read /dev/urandom")?;
    let token: String = std::iter::once("tern_".to_string())
        .chain(random.iter().map(|b| format!("{b:02x}")))
        .collect();
    let line = tern_api::auth::token_line(name, role, &token)?;
    let old = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    let sep = if old.is_empty() || old.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    tern_api::auth::TokenFile::parse(&format!("{old}{sep}{line}\n"))
        .with_context(|| format!("{} with the new line", file.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("cannot open {}", file.display()))?;
    f.write_all(format!("{sep}{line}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(token)
}

/// The rustls client configuration for `dir`: its `ca-cert.pem` as the only trust anchor, and
/// its user certificate if it holds one.
pub fn client_tls(dir: &std::path::Path) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    if dir.join("client-cert.pem").exists() || dir.join("server-cert.pem").exists() {
        let t =
            tern_pki::TlsDir::load(dir).with_context(|| format!("--tls-dir {}", dir.display()))?;
        return Ok(t.client_config());
    }
    // Only the CA (a token user): its revocation list, when it has one, refuses a revoked
    // controller.
    tern_pki::TlsDir::ca_only_client_config(dir)
        .with_context(|| format!("--tls-dir {}", dir.display()))
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("API types serialise")
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> anyhow::Result<T> {
    serde_json::from_slice(body).with_context(|| {
        format!(
            "the controller's answer does not parse: {}",
            String::from_utf8_lossy(body)
        )
    })
}

fn print<T: serde::Serialize>(
    conn: &Conn,
    value: &T,
    text: impl FnOnce() -> String,
) -> anyhow::Result<ExitCode> {
    if conn.json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text());
    }
    Ok(ExitCode::SUCCESS)
}

/// The error of a non-success answer, from its `ErrorBody`.
fn api_error(status: u16, body: &[u8], url: &str) -> anyhow::Error {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => anyhow::anyhow!("{}: {} (HTTP {status} from {url})", e.error, e.detail),
        Err(_) => anyhow::anyhow!(
            "HTTP {status} from {url}: {}",
            String::from_utf8_lossy(body).trim()
        ),
    }
}

struct Client {
    url: String,
    rt: tokio::runtime::Runtime,
    http: http::Client,
}

impl Client {
    fn new(conn: &Conn) -> anyhow::Result<Client> {
        let url = conn
            .controller
            .clone()
            .or_else(|| std::env::var("TERN_CONTROLLER").ok())
            .unwrap_or_else(|| DEFAULT_CONTROLLER.to_string());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let tls_dir = conn
            .tls_dir
            .clone()
            .or_else(|| std::env::var_os("TERN_TLS_DIR").map(Into::into));
        let token = conn
            .token
            .clone()
            .or_else(|| std::env::var("TERN_TOKEN").ok())
            .filter(|t| !t.is_empty());
        let http = match &tls_dir {
            Some(dir) => http::Client::tls(client_tls(dir)?),
            None => http::Client::plain(),
        };
        Ok(Client {
            url: url.trim_end_matches('/').to_string(),
            rt,
            http: http.with_token(token),
        })
    }

    /// One request; a 503 from a controller that names the leader is retried there once.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let method: hyper::Method = method.parse().expect("a method");
        let once = |base: &str| {
            let url = format!("{base}{path}");
            self.rt
                .block_on(
                    self.http
                        .request(method.clone(), &url, body.clone(), TIMEOUT),
                )
                .with_context(|| format!("{method} {url}"))
        };
        let r = once(&self.url)?;
        if r.status == 503
            && let Ok(e) = serde_json::from_slice::<ErrorBody>(&r.body)
            && let Some((_, leader)) = e.detail.split_once("the leader is at ")
        {
            let leader = leader.trim().trim_end_matches('/');
            if leader != self.url {
                let r = once(leader)?;
                return Ok((r.status, r.body));
            }
        }
        Ok((r.status, r.body))
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        want: u16,
    ) -> anyhow::Result<T> {
        let (status, bytes) = self.send(method, path, body)?;
        if status != want {
            return Err(api_error(status, &bytes, &self.url));
        }
        decode(&bytes)
    }

    fn call_empty(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        want: u16,
    ) -> anyhow::Result<()> {
        let (status, bytes) = self.send(method, path, body)?;
        if status != want {
            return Err(api_error(status, &bytes, &self.url));
        }
        Ok(())
    }

    /// Polls a task until it ends (up to 10 minutes).
    fn wait_task(&self, id: u64) -> anyhow::Result<TaskInfo> {
        let start = Instant::now();
        loop {
            let t: TaskInfo = self.call("GET", &format!("/v1/tasks/{id}"), None, 200)?;
            if matches!(t.state, TaskState::Succeeded | TaskState::Failed) {
                return Ok(t);
            }
            if start.elapsed() > Duration::from_secs(600) {
                bail!(
                    "task {id} has not ended after 10 minutes (state {:?})",
                    t.state
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn state_word(vm: &VmInfo) -> String {
    serde_json::to_value(vm.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", s.join("  ").trim_end())
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

fn hosts_table(hosts: &[HostInfo]) -> String {
    if hosts.is_empty() {
        return "no hosts registered\n".into();
    }
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            let state = serde_json::to_value(h.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            vec![
                h.name.clone(),
                state,
                if h.maintenance { "yes" } else { "no" }.into(),
                format!("{}/{}", h.vcpus_used, h.capacity.cores),
                format!("{}/{}", h.memory_mib_used, h.capacity.memory_mib),
                h.cpu_utilization
                    .map_or("-".into(), |u| format!("{:.0}%", u * 100.0)),
                h.vms.len().to_string(),
            ]
        })
        .collect();
    table(
        &[
            "HOST",
            "STATE",
            "MAINT",
            "VCPUS/CORES",
            "MEM MiB",
            "CPU",
            "VMS",
        ],
        &rows,
    )
}

fn vms_table(vms: &[VmInfo]) -> String {
    if vms.is_empty() {
        return "no VMs\n".into();
    }
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                state_word(v),
                v.host.clone().unwrap_or_else(|| "-".into()),
                v.spec.vcpus.to_string(),
                v.spec.memory_mib.to_string(),
                v.restarts.to_string(),
                v.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "VM",
            "STATE",
            "HOST",
            "VCPUS",
            "MEM MiB",
            "RESTARTS",
            "LAST ERROR",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let t = table(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz\n");
    }

    #[test]
    fn an_error_body_becomes_its_error_and_detail() {
        let body = br#"{"error":"unknown VM","detail":"unknown VM \"x\""}"#;
        let e = api_error(404, body, "http://c").to_string();
        assert_eq!(e, "unknown VM: unknown VM \"x\" (HTTP 404 from http://c)");
        let e = api_error(502, b"bad gateway", "http://c").to_string();
        assert_eq!(e, "HTTP 502 from http://c: bad gateway");
    }

    /// A controller-like server for `dir`'s certificate that, as the API, takes clients without a
    /// certificate (token users).
    fn api_server(dir: &std::path::Path) -> std::sync::Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        let tls = tern_pki::TlsDir::load(dir).unwrap();
        let pem = tern_pki::PemFiles::read(dir).unwrap();
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(pem.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).unwrap();
        #[allow(deprecated)]
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(tls.optional_client_verifier())
            .with_single_cert(chain, key)
            .unwrap();
        std::sync::Arc::new(cfg)
    }

    /// One handshake of `client_tls(dir)` with `server`, expected under the name "ctl".
    fn handshake_with(
        server: &std::sync::Arc<rustls::ServerConfig>,
        dir: &std::path::Path,
    ) -> Result<String, String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = server.clone();
        let srv = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let mut conn = rustls::ServerConnection::new(cfg).unwrap();
            let mut tcp = tcp;
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            // Until the handshake ends either way (a refusing client sends an alert and closes).
            while conn.is_handshaking() {
                if conn.complete_io(&mut tcp).is_err() {
                    break;
                }
            }
        });
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        let r = client_tls(dir)
            .map_err(|e| format!("{e:#}"))
            .and_then(|cfg| {
                tern_pki::connect(
                    cfg,
                    tern_pki::TlsDir::server_name("ctl"),
                    tcp,
                    Duration::from_secs(5),
                )
                .map(|(_, id)| id.name)
                .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))
            });
        srv.join().unwrap();
        r
    }

    #[test]
    fn a_token_users_ca_only_directory_refuses_a_revoked_controller() {
        let ca = tempfile::tempdir().unwrap();
        tern_pki::init_ca(ca.path()).unwrap();
        let ctl_dir = tern_pki::issue(
            ca.path(),
            "ctl",
            tern_pki::Role::Controller,
            &tern_pki::IssueOptions::default(),
        )
        .unwrap();
        // Loaded once before the revocation: this server keeps presenting its certificate.
        let server = api_server(&ctl_dir);
        // A token user's directory: the CA certificate only (no CRL yet).
        let user = tempfile::tempdir().unwrap();
        std::fs::copy(
            ca.path().join("ca-cert.pem"),
            user.path().join("ca-cert.pem"),
        )
        .unwrap();
        assert_eq!(handshake_with(&server, user.path()).unwrap(), "ctl");

        tern_pki::revoke(ca.path(), "ctl").unwrap();
        // No list in the user's directory yet: nothing tells it the controller is revoked.
        assert_eq!(handshake_with(&server, user.path()).unwrap(), "ctl");
        std::fs::copy(ca.path().join("ca-crl.pem"), user.path().join("ca-crl.pem")).unwrap();
        let after = handshake_with(&server, user.path()).unwrap_err();
        assert!(after.contains("Revoked"), "{after}");

        // A damaged list is refused with its path, not ignored.
        std::fs::write(user.path().join("ca-crl.pem"), "not a CRL").unwrap();
        let e = format!("{:#}", client_tls(user.path()).unwrap_err());
        assert!(e.contains("ca-crl.pem"), "{e}");
    }
}

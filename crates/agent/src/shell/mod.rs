//! The agent's I/O shell around [`crate::core::Agent`]: `tern agent` runs [`run`].
//!
//! ```text
//!  etcd lease task ──LeaseRenewed/LeaseLost──┐
//!  HTTP POST /v1/agent/commands ──Command────┤
//!  VMM supervisors ──running/listening/exit──┼──▶ one loop owning the core ──▶ actions, in order:
//!  tern vm migrate ──MigrationEnded──────────┤     (Tick every 100 ms)          spawn / kill / migrate /
//!  telemetry, status, metrics ──snapshot─────┘                                  resume / reply
//! ```
//!
//! Time is milliseconds since the agent started (a monotonic clock), for the core and for the
//! lease's send times alike. The highest controller generation seen is written to
//! `STATE_DIR/generation` (fsync, then rename) before any reply to the command that raised it, and
//! read back at start ([`crate::core::Agent::restore`]).

mod children;
mod http;
mod lease;
pub mod procfs;
mod report;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tern_api::agent::{
    AgentReport, Command, CommandBody, CommandResponse, HostRecord, ObservedState,
};
use tern_api::cluster::HostCapacity;
use tokio::sync::{mpsc, oneshot};

use crate::core::{self, Action, Agent, Input};
use crate::telemetry::{CpuShare, ParkingMode};

/// How often the core is ticked.
const TICK: Duration = Duration::from_millis(100);

/// What `tern agent` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The host's name (its key under `/tern/hosts/`).
    pub host_id: String,
    /// etcd client URLs.
    pub etcd: Vec<String>,
    /// Where the command API listens.
    pub listen: SocketAddr,
    /// The URL controllers use to reach this agent (default `http://LISTEN`).
    pub advertise_url: Option<String>,
    /// What the host offers (registered in its host record).
    pub capacity: HostCapacity,
    /// The etcd lease TTL, ms.
    pub lease_ttl_ms: u64,
    /// Kill the VMMs this long before the lease could expire, ms.
    pub fence_margin_ms: u64,
    /// Telemetry interval, ms.
    pub report_interval_ms: u64,
    /// Where the highest generation seen is kept.
    pub state_dir: PathBuf,
    /// The VMMs' runtime directory.
    pub runtime_dir: PathBuf,
    /// How long a command may take before its HTTP request answers 504.
    pub command_timeout: Duration,
    /// The `tern` binary that runs VMMs (`tern vm run|receive|migrate|resume`).
    pub exe: PathBuf,
    /// The fraction of one real CPU each declared core stands for (see [`crate::telemetry`]).
    pub cpu_share: CpuShare,
    /// Whether the core-parking policy runs here, and whether it acts.
    pub parking: ParkingMode,
    /// The host's `--tls-dir` (CA, certificate, key; the certificate's name must be the host id
    /// and its role `host`): the command API then serves only mutual TLS, etcd and the controller
    /// are reached over TLS with it, and every VMM it starts gets it for its volume disk and
    /// migrations. `None`: plain connections everywhere.
    pub tls_dir: Option<PathBuf>,
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A bad option value.
    #[error("{0}")]
    BadOption(String),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A directory could not be created.
    #[error("cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state file could not be read or written.
    #[error("state file {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state file holds something other than a generation number.
    #[error(
        "state file {path} holds {text:?}, not a generation number; it must be repaired by hand (deleting it lets a deposed controller's commands through)"
    )]
    BadState {
        /// The file.
        path: PathBuf,
        /// What it holds.
        text: String,
    },
    /// etcd could not be reached.
    #[error("cannot connect to etcd at {urls}: {source}")]
    Etcd {
        /// The URLs tried.
        urls: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// The `--tls-dir` could not be loaded or is not this host's.
    #[error("--tls-dir {dir}: {why}")]
    Tls {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The command API could not listen.
    #[error("cannot listen on {addr} (give a free ADDR:PORT): {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl Options {
    /// Checks the values, naming the bad one and the valid range.
    pub fn validate(&self) -> Result<(), AgentError> {
        let bad = |s: String| Err(AgentError::BadOption(s));
        let id = &self.host_id;
        if id.is_empty()
            || id.len() > 63
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return bad(format!(
                "--host-id {id:?} is not a host name (1 to 63 of a-z, A-Z, 0-9, '-', '_', '.')"
            ));
        }
        if !(1_000..=600_000).contains(&self.lease_ttl_ms) {
            return bad(format!(
                "--lease-ttl-ms {} is out of range (1000 to 600000)",
                self.lease_ttl_ms
            ));
        }
        if self.fence_margin_ms >= self.lease_ttl_ms {
            return bad(format!(
                "--fence-margin-ms {} must be below the lease TTL ({} ms)",
                self.fence_margin_ms, self.lease_ttl_ms
            ));
        }
        if !(100..=3_600_000).contains(&self.report_interval_ms) {
            return bad(format!(
                "--report-interval-ms {} is out of range (100 to 3600000)",
                self.report_interval_ms
            ));
        }
        if self.listen.ip().is_unspecified() {
            return bad(format!(
                "--listen {}: give this host's own address, not a wildcard (controllers reach the \
                 agent there, and migration receivers listen on it)",
                self.listen
            ));
        }
        if self.etcd.is_empty() {
            return bad("--etcd needs at least one URL".into());
        }
        if self.capacity.cores == 0 || self.capacity.memory_mib == 0 {
            return bad(format!(
                "the host offers {} cores and {} MiB: both must be above 0",
                self.capacity.cores, self.capacity.memory_mib
            ));
        }
        Ok(())
    }
}

/// Milliseconds since the agent started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock(tokio::time::Instant);

impl Clock {
    pub(crate) fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// What the loop owning the core is told.
#[derive(Debug)]
pub(crate) enum Event {
    /// An input for the core as it is.
    Input(Input),
    /// A command, and where its response goes.
    Command(Command, oneshot::Sender<CommandResponse>),
    /// A receiver child listens.
    ChildListening {
        vm: String,
        serial: u64,
        listen: String,
    },
    /// A VMM child runs its VM (its runtime entry names it).
    ChildRunning { vm: String, serial: u64 },
    /// A VMM child exited.
    ChildExited {
        vm: String,
        serial: u64,
        status: String,
    },
    /// A view of the agent for status, metrics and reports.
    Snapshot(oneshot::Sender<Snapshot>),
    /// The report the telemetry task took last (shown in the status).
    Telemetry(AgentReport),
    /// Kill every VMM (the agent is stopping); answered with their pids.
    Shutdown(oneshot::Sender<Vec<u32>>),
}

/// The agent as `GET /v1/agent/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentStatus {
    /// The host.
    pub host: String,
    /// The URL controllers reach it at.
    pub agent_url: String,
    /// The etcd lease the host is registered under, if any.
    pub lease: Option<u64>,
    /// Whether the VMMs were killed for want of a lease (until the next renewal).
    pub fenced: bool,
    /// Milliseconds until the VMMs are killed unless the lease is renewed (negative: past).
    pub fence_deadline_in_ms: Option<i64>,
    /// The highest controller generation seen.
    pub generation_seen: u64,
    /// The highest command id of that generation handled.
    pub last_command_id: u64,
    /// The agent's event counter.
    pub seq: u64,
    /// Times the agent killed its VMMs for want of a lease.
    pub self_fences: u64,
    /// VMs restarted by the restart policy.
    pub restarts: u64,
    /// The VMs supervised here.
    pub vms: Vec<VmStatus>,
    /// The last telemetry report taken (what went, or would have gone, to the leader).
    pub telemetry: Option<AgentReport>,
}

/// One VM in [`AgentStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    /// The VM.
    pub name: String,
    /// What the agent sees.
    pub state: ObservedState,
    /// Its VMM's process id, while one runs.
    pub pid: Option<u32>,
    /// Whether a migration out of it is under way.
    pub migrating: bool,
}

/// A consistent view of the agent at one moment.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub status: AgentStatus,
    pub metrics: String,
    pub report: AgentReport,
}

/// Renders the Prometheus text of an agent's status.
pub fn render_metrics(s: &AgentStatus) -> String {
    let mut by_state: BTreeMap<&str, usize> =
        ["starting", "running", "paused", "receiving", "exited"]
            .into_iter()
            .map(|k| (k, 0))
            .collect();
    for v in &s.vms {
        let key = match v.state {
            ObservedState::Starting => "starting",
            ObservedState::Running => "running",
            ObservedState::Paused => "paused",
            ObservedState::Receiving => "receiving",
            ObservedState::Exited => "exited",
            ObservedState::Absent => continue,
        };
        *by_state.entry(key).or_default() += 1;
    }
    let mut out = String::new();
    out.push_str("# HELP tern_agent_vms VMs supervised by this agent, by state.\n");
    out.push_str("# TYPE tern_agent_vms gauge\n");
    for (state, n) in by_state {
        out.push_str(&format!("tern_agent_vms{{state=\"{state}\"}} {n}\n"));
    }
    let lines = [
        (
            "tern_agent_vm_restarts_total",
            "counter",
            "VMMs restarted by the restart policy.",
            s.restarts,
        ),
        (
            "tern_agent_self_fences_total",
            "counter",
            "Times the agent killed its VMMs for want of an etcd lease.",
            s.self_fences,
        ),
        (
            "tern_agent_generation_seen",
            "gauge",
            "The highest controller generation seen (commands below it are refused).",
            s.generation_seen,
        ),
        (
            "tern_agent_lease_held",
            "gauge",
            "1 while the host is registered under an etcd lease.",
            u64::from(s.lease.is_some()),
        ),
        (
            "tern_agent_fenced",
            "gauge",
            "1 while the agent's VMMs are fenced.",
            u64::from(s.fenced),
        ),
    ];
    for (name, kind, help, value) in lines {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    out
}

/// Reads the highest generation kept in `path` (0 when the file does not exist).
pub fn load_generation(path: &Path) -> Result<u64, AgentError> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map_err(|_| AgentError::BadState {
            path: path.into(),
            text,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(AgentError::State {
            path: path.into(),
            source,
        }),
    }
}

/// Writes `generation` to `path` durably (a temporary file, fsync, rename).
pub fn store_generation(path: &Path, generation: u64) -> Result<(), AgentError> {
    let err = |source| AgentError::State {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(format!("{generation}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The loop's state: the core and what carries out its actions.
struct Shell {
    agent: Agent,
    host: String,
    agent_url: String,
    clock: Clock,
    ctx: children::Ctx,
    events: mpsc::Sender<Event>,
    children: HashMap<String, children::Child>,
    next_serial: u64,
    waiters: HashMap<(u64, u64), Vec<oneshot::Sender<CommandResponse>>>,
    state_file: PathBuf,
    stored_generation: u64,
    lease: Option<u64>,
    restarts: u64,
    /// The last telemetry report.
    last_report: Option<AgentReport>,
    /// Inputs that arose while carrying out actions (a VMM that could not start): fed after the
    /// current batch, so actions stay in the core's order.
    later: Vec<Input>,
}

impl Shell {
    fn handle(&mut self, ev: Event) {
        let now = self.clock.now_ms();
        match ev {
            Event::Input(input) => {
                match &input {
                    Input::LeaseRenewed { lease, .. } => self.lease = Some(*lease),
                    Input::LeaseLost => self.lease = None,
                    _ => {}
                }
                self.step(input, now);
            }
            Event::Command(cmd, tx) => {
                let key = (cmd.generation, cmd.id);
                // The same command while it is under way: answer both when it ends.
                let in_flight = self.waiters.contains_key(&key);
                self.waiters.entry(key).or_default().push(tx);
                if !in_flight {
                    self.step(Input::Command(cmd), now);
                }
            }
            Event::ChildListening { vm, serial, listen } => {
                if self.is_current(&vm, serial) {
                    self.step(Input::ReceiverListening { vm, listen }, now);
                }
            }
            Event::ChildRunning { vm, serial } => {
                if self.is_current(&vm, serial) {
                    self.step(Input::VmmRunning { vm }, now);
                }
            }
            Event::ChildExited { vm, serial, status } => {
                if self.is_current(&vm, serial) {
                    self.children.remove(&vm);
                    eprintln!("tern agent: the VMM of {vm} exited: {status}");
                    self.step(Input::VmmExited { vm, status }, now);
                }
            }
            Event::Snapshot(tx) => {
                let _ = tx.send(self.snapshot(now));
            }
            Event::Telemetry(report) => self.last_report = Some(report),
            Event::Shutdown(tx) => {
                for c in self.children.values() {
                    c.kill();
                }
                let _ = tx.send(self.children.values().map(|c| c.pid).collect());
            }
        }
    }

    fn is_current(&self, vm: &str, serial: u64) -> bool {
        self.children.get(vm).is_some_and(|c| c.serial == serial)
    }

    fn step(&mut self, input: Input, now: u64) {
        self.step_one(input, now);
        while !self.later.is_empty() {
            for input in std::mem::take(&mut self.later) {
                self.step_one(input, now);
            }
        }
    }

    fn step_one(&mut self, input: Input, now: u64) {
        let started = match &input {
            Input::Command(Command {
                body: CommandBody::Start { spec, .. },
                ..
            }) => Some(spec.name.clone()),
            _ => None,
        };
        self.agent.step(input, now);
        let generation = self.agent.generation_seen();
        if generation > self.stored_generation {
            // Before any reply: a restarted agent must keep refusing the older generations.
            match store_generation(&self.state_file, generation) {
                Ok(()) => self.stored_generation = generation,
                Err(e) => eprintln!("tern agent: cannot keep generation {generation}: {e}"),
            }
        }
        for action in self.agent.drain_actions() {
            self.carry_out(action, started.as_deref());
        }
    }

    fn carry_out(&mut self, action: Action, started: Option<&str>) {
        match action {
            Action::Reply {
                generation,
                id,
                seq,
                reply,
            } => {
                for tx in self.waiters.remove(&(generation, id)).unwrap_or_default() {
                    let _ = tx.send(CommandResponse {
                        seq,
                        reply: reply.clone(),
                    });
                }
            }
            Action::Spawn { spec, disk_url } => {
                if started != Some(spec.name.as_str()) {
                    self.restarts += 1;
                }
                self.spawn(&spec, disk_url.as_deref(), false);
            }
            Action::SpawnReceiver { spec, disk_url } => {
                self.spawn(&spec, disk_url.as_deref(), true);
            }
            Action::Migrate {
                vm,
                to,
                disk_successor,
                post_copy_after,
            } => children::migrate(
                &self.ctx,
                vm,
                to,
                disk_successor,
                post_copy_after,
                &self.events,
            ),
            Action::Resume { vm } => children::resume(&self.ctx, vm),
            Action::Kill { vm } => {
                if let Some(c) = self.children.get(&vm) {
                    c.kill();
                }
            }
        }
    }

    fn spawn(&mut self, spec: &tern_api::cluster::VmCreate, disk_url: Option<&str>, receive: bool) {
        self.next_serial += 1;
        let serial = self.next_serial;
        match children::spawn_vmm(&self.ctx, spec, disk_url, receive, serial, &self.events) {
            Ok(child) => {
                if let Some(old) = self.children.insert(spec.name.clone(), child) {
                    old.kill();
                }
            }
            Err(e) => {
                let status = format!("cannot start its VMM: {e}");
                eprintln!("tern agent: {}: {status}", spec.name);
                self.children.remove(&spec.name);
                self.later.push(Input::VmmExited {
                    vm: spec.name.clone(),
                    status,
                });
            }
        }
    }

    fn snapshot(&self, now: u64) -> Snapshot {
        let vms: Vec<VmStatus> = self
            .agent
            .observed()
            .into_iter()
            .map(|v| VmStatus {
                pid: self.children.get(&v.name).map(|c| c.pid),
                migrating: self.agent.is_migrating(&v.name),
                name: v.name,
                state: v.state,
            })
            .collect();
        let status = AgentStatus {
            host: self.host.clone(),
            agent_url: self.agent_url.clone(),
            lease: self.lease,
            fenced: self.agent.is_fenced(),
            fence_deadline_in_ms: self
                .agent
                .fence_deadline_ms()
                .map(|d| d as i64 - now as i64),
            generation_seen: self.agent.generation_seen(),
            last_command_id: self.agent.last_command_id(),
            seq: self.agent.seq(),
            self_fences: self.agent.self_fences,
            restarts: self.restarts,
            vms,
            telemetry: self.last_report.clone(),
        };
        let report = AgentReport {
            host: self.host.clone(),
            generation_seen: self.agent.generation_seen(),
            seq: self.agent.seq(),
            last_command_id: self.agent.last_command_id(),
            vms: self.agent.observed(),
            cpu_utilization: None,
            parked_cores: None,
        };
        Snapshot {
            metrics: render_metrics(&status),
            status,
            report,
        }
    }
}

/// Loads the host's `--tls-dir` and checks that its certificate is host `host_id`'s.
fn load_tls(dir: &Path, host_id: &str) -> Result<tern_pki::TlsDir, AgentError> {
    let bad = |why: String| AgentError::Tls {
        dir: dir.to_owned(),
        why,
    };
    // Follows the CA's revocation list as it changes (the agent runs no seccomp filter).
    let t = tern_pki::TlsDir::load_watching(dir).map_err(|e| bad(e.to_string()))?;
    let id = t.identity();
    if id.role != tern_pki::Role::Host || id.name != host_id {
        return Err(bad(format!(
            "its certificate is {id}, but this agent is host {host_id:?}: give it the directory \
             `tern pki issue --name {host_id} --role host` made"
        )));
    }
    Ok(t)
}

/// etcd connection options for a `--tls-dir` and `https://` endpoints: the CA as the only trust
/// anchor, the host's certificate as the client certificate (etcd's `--client-cert-auth`).
fn etcd_options(
    tls_dir: Option<&Path>,
    endpoints: &[String],
) -> Result<etcd_client::ConnectOptions, AgentError> {
    let opts = etcd_client::ConnectOptions::new();
    // TLS for https:// endpoints only (an http:// etcd is the operator's explicit choice).
    let https = endpoints.iter().any(|e| e.starts_with("https://"));
    let Some(dir) = tls_dir.filter(|_| https) else {
        return Ok(opts);
    };
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| AgentError::Tls {
            dir: dir.to_owned(),
            why: format!("{name}: {e}"),
        })
    };
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read("ca-cert.pem")?))
        .identity(etcd_client::Identity::from_pem(
            read("client-cert.pem")?,
            read("client-key.pem")?,
        ));
    Ok(opts.with_tls(tls))
}

/// Runs the agent until SIGINT or SIGTERM (then its VMMs are killed and its lease revoked).
pub fn run(opts: Options) -> Result<(), AgentError> {
    opts.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    rt.block_on(run_async(opts))
}

async fn run_async(opts: Options) -> Result<(), AgentError> {
    for dir in [&opts.state_dir, &opts.runtime_dir] {
        std::fs::create_dir_all(dir).map_err(|source| AgentError::Dir {
            path: dir.clone(),
            source,
        })?;
    }
    let state_file = opts.state_dir.join("generation");
    let generation = load_generation(&state_file)?;
    let cfg = core::Config {
        lease_ttl_ms: opts.lease_ttl_ms,
        fence_margin_ms: opts.fence_margin_ms,
        ..core::Config::default()
    };
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: opts.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| AgentError::Listen {
        addr: opts.listen,
        source,
    })?;
    let tls = match &opts.tls_dir {
        Some(dir) => Some(load_tls(dir, &opts.host_id)?),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let agent_url = opts
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{local}"));
    let connect = etcd_options(opts.tls_dir.as_deref(), &opts.etcd)?
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    let client = etcd_client::Client::connect(&opts.etcd, Some(connect))
        .await
        .map_err(|source| AgentError::Etcd {
            urls: opts.etcd.join(","),
            source,
        })?;
    let clock = Clock(tokio::time::Instant::now());
    let (tx, mut rx) = mpsc::channel::<Event>(1024);
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if setpriv.is_none() {
        eprintln!(
            "tern agent: setpriv not found: VMMs will not die with the agent if it is killed"
        );
    }
    let mut shell = Shell {
        agent: Agent::restore(cfg, generation),
        host: opts.host_id.clone(),
        agent_url: agent_url.clone(),
        clock,
        ctx: children::Ctx {
            exe: opts.exe.clone(),
            runtime_dir: opts.runtime_dir.clone(),
            setpriv,
            listen_ip: local.ip(),
            tls_dir: opts.tls_dir.clone(),
        },
        events: tx.clone(),
        children: HashMap::new(),
        next_serial: 0,
        waiters: HashMap::new(),
        state_file,
        stored_generation: generation,
        lease: None,
        restarts: 0,
        last_report: None,
        later: Vec::new(),
    };
    let mut parking = report::Parking::start(opts.parking, opts.runtime_dir.clone());
    // The loop that owns the core.
    let core_loop = tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => shell.handle(ev),
                    None => return,
                },
                _ = tick.tick() => {
                    let now = shell.clock.now_ms();
                    shell.step(Input::Tick, now);
                }
            }
        }
    });
    let lease_id = Arc::new(AtomicI64::new(0));
    let record = HostRecord {
        name: opts.host_id.clone(),
        agent_url: agent_url.clone(),
        capacity: opts.capacity.clone(),
        lease: 0,
    };
    tokio::spawn(lease::keep_registered(
        client.clone(),
        record,
        opts.lease_ttl_ms,
        clock,
        tx.clone(),
        lease_id.clone(),
    ));
    tokio::spawn(report::run(
        client.clone(),
        tx.clone(),
        report::Config {
            interval: Duration::from_millis(opts.report_interval_ms),
            runtime_dir: opts.runtime_dir.clone(),
            cpu_share: opts.cpu_share,
            cores: opts.capacity.cores,
            parked: parking.parked.clone(),
            tls: tls.as_ref().map(|t| t.client_config()),
        },
    ));
    let app = http::router(tx.clone(), opts.command_timeout, tls.is_some());
    let server = match &tls {
        Some(t) => tokio::spawn(http::serve_tls(listener, app, t.server_config())),
        None => tokio::spawn(http::serve_plain(listener, app)),
    };
    eprintln!(
        "tern agent: {} serving {agent_url}, generation seen {generation}",
        opts.host_id
    );
    wait_for_stop().await;
    eprintln!("tern agent: stopping: killing the VMMs and revoking the lease");
    let (done_tx, done_rx) = oneshot::channel();
    let mut all_gone = false;
    if tx.send(Event::Shutdown(done_tx)).await.is_ok()
        && let Ok(pids) = done_rx.await
    {
        // The lease goes only once the VMMs are gone (their supervisors reap them).
        let gone = async {
            while pids
                .iter()
                .any(|p| Path::new(&format!("/proc/{p}")).exists())
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        all_gone = tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .is_ok();
    }
    let id = lease_id.load(Ordering::Relaxed);
    if id != 0 && all_gone {
        let mut c = client.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(id)).await;
    } else if id != 0 {
        eprintln!("tern agent: VMMs outlived SIGKILL by 5 s: the lease is left to expire");
    }
    server.abort();
    core_loop.abort();
    tokio::task::block_in_place(|| parking.stop());
    Ok(())
}

async fn wait_for_stop() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> AgentStatus {
        AgentStatus {
            host: "h1".into(),
            agent_url: "http://127.0.0.1:1".into(),
            lease: Some(7),
            fenced: false,
            fence_deadline_in_ms: Some(2500),
            generation_seen: 42,
            last_command_id: 3,
            seq: 9,
            self_fences: 1,
            restarts: 2,
            telemetry: None,
            vms: vec![
                VmStatus {
                    name: "a".into(),
                    state: ObservedState::Running,
                    pid: Some(10),
                    migrating: false,
                },
                VmStatus {
                    name: "b".into(),
                    state: ObservedState::Running,
                    pid: Some(11),
                    migrating: false,
                },
                VmStatus {
                    name: "c".into(),
                    state: ObservedState::Exited,
                    pid: None,
                    migrating: false,
                },
            ],
        }
    }

    #[test]
    fn metrics_count_vms_by_state_and_carry_the_counters() {
        let text = render_metrics(&status());
        for line in [
            "tern_agent_vms{state=\"running\"} 2",
            "tern_agent_vms{state=\"exited\"} 1",
            "tern_agent_vms{state=\"starting\"} 0",
            "tern_agent_vm_restarts_total 2",
            "tern_agent_self_fences_total 1",
            "tern_agent_generation_seen 42",
            "tern_agent_lease_held 1",
            "tern_agent_fenced 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
        }
    }

    #[test]
    fn the_generation_survives_a_restart_and_a_garbled_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("generation");
        assert_eq!(load_generation(&path).unwrap(), 0, "no file: nothing seen");
        store_generation(&path, 17).unwrap();
        assert_eq!(load_generation(&path).unwrap(), 17);
        store_generation(&path, 18).unwrap();
        assert_eq!(load_generation(&path).unwrap(), 18);
        std::fs::write(&path, "eighteen").unwrap();
        let err = load_generation(&path).unwrap_err().to_string();
        assert!(
            err.contains("eighteen") && err.contains("generation"),
            "{err}"
        );
    }

    fn shell(dir: &Path, events: mpsc::Sender<Event>) -> Shell {
        Shell {
            agent: Agent::new(core::Config::default()),
            host: "h1".into(),
            agent_url: "http://127.0.0.1:1".into(),
            clock: Clock(tokio::time::Instant::now()),
            ctx: children::Ctx {
                exe: dir.join("no-such-tern"),
                runtime_dir: dir.join("run"),
                setpriv: None,
                listen_ip: "127.0.0.1".parse().unwrap(),
                tls_dir: None,
            },
            events,
            children: HashMap::new(),
            next_serial: 0,
            waiters: HashMap::new(),
            state_file: dir.join("generation"),
            stored_generation: 0,
            lease: None,
            restarts: 0,
            last_report: None,
            later: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_receiver_that_cannot_start_fails_its_command_and_the_generation_is_kept_first() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = mpsc::channel(16);
        let mut sh = shell(dir.path(), tx);
        sh.handle(Event::Input(Input::LeaseRenewed {
            sent_ms: 0,
            lease: 9,
        }));
        let spec: tern_api::cluster::VmCreate = serde_json::from_value(serde_json::json!({
            "name": "r1", "vcpus": 1, "memory_mib": 64, "kernel": "builtin:testguest",
            "cmdline": "", "disk": null, "host": null, "anti_affinity": null,
            "restart_priority": 50
        }))
        .unwrap();
        let cmd = Command {
            generation: 4,
            id: 1,
            host_lease: 9,
            body: CommandBody::Receive {
                spec,
                disk_url: None,
            },
        };
        let (first, first_rx) = oneshot::channel();
        let (again, again_rx) = oneshot::channel();
        sh.handle(Event::Command(cmd.clone(), first));
        // The same command again is answered again, not redone.
        sh.handle(Event::Command(cmd, again));
        let a = first_rx.await.unwrap();
        let b = again_rx.await.unwrap();
        assert_eq!(a.reply, b.reply);
        assert!(sh.children.is_empty());
        match a.reply {
            tern_api::agent::CommandReply::Failed { error } => {
                assert!(error.contains("cannot start its VMM"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(sh.agent.state_of("r1"), ObservedState::Absent);
        assert_eq!(load_generation(&dir.path().join("generation")).unwrap(), 4);
        assert_eq!(sh.snapshot(0).status.generation_seen, 4);
    }

    #[tokio::test]
    async fn a_command_repeated_while_under_way_is_not_fed_to_the_core_again() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // A stand-in VMM that starts and never listens: the receive stays under way.
        let exe = dir.path().join("fake-tern");
        std::fs::write(&exe, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let mut sh = shell(dir.path(), tx);
        sh.ctx.exe = exe;
        sh.handle(Event::Input(Input::LeaseRenewed {
            sent_ms: 0,
            lease: 9,
        }));
        let spec: tern_api::cluster::VmCreate = serde_json::from_value(serde_json::json!({
            "name": "r2", "vcpus": 1, "memory_mib": 64, "kernel": "builtin:testguest",
            "cmdline": "", "disk": null, "host": null, "anti_affinity": null,
            "restart_priority": 50
        }))
        .unwrap();
        let cmd = Command {
            generation: 4,
            id: 2,
            host_lease: 9,
            body: CommandBody::Receive {
                spec,
                disk_url: None,
            },
        };
        let (first, mut first_rx) = oneshot::channel();
        let (again, mut again_rx) = oneshot::channel();
        sh.handle(Event::Command(cmd.clone(), first));
        let seq = sh.agent.seq();
        sh.handle(Event::Command(cmd, again));
        assert_eq!(sh.agent.seq(), seq, "the repeat did not reach the core");
        assert_eq!(sh.children.len(), 1);
        assert_eq!(sh.agent.state_of("r2"), ObservedState::Receiving);
        assert!(first_rx.try_recv().is_err() && again_rx.try_recv().is_err());
        // The receiver dies: both waiters get the one answer.
        sh.children["r2"].kill();
        loop {
            let ev = rx.recv().await.expect("the child's exit");
            let exited = matches!(ev, Event::ChildExited { .. });
            sh.handle(ev);
            if exited {
                break;
            }
        }
        let (a, b) = (first_rx.await.unwrap(), again_rx.await.unwrap());
        assert_eq!(a, b);
        assert!(
            matches!(a.reply, tern_api::agent::CommandReply::Failed { .. }),
            "{a:?}"
        );
    }

    fn options() -> Options {
        Options {
            host_id: "h1".into(),
            etcd: vec!["http://127.0.0.1:2379".into()],
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise_url: None,
            capacity: HostCapacity {
                cores: 2,
                memory_mib: 1024,
                power_model: "hp-ml110-g5".into(),
                volume_node: None,
                volume_node_id: None,
            },
            lease_ttl_ms: 5000,
            fence_margin_ms: 2000,
            report_interval_ms: 1000,
            state_dir: "/tmp".into(),
            runtime_dir: "/tmp".into(),
            command_timeout: Duration::from_secs(600),
            exe: "/bin/true".into(),
            cpu_share: CpuShare::WHOLE,
            parking: ParkingMode::Report,
            tls_dir: None,
        }
    }

    #[test]
    fn bad_options_are_refused_naming_the_value_and_the_range() {
        assert!(options().validate().is_ok());
        let cases: Vec<(Options, &str)> = vec![
            (
                Options {
                    host_id: "a b".into(),
                    ..options()
                },
                "--host-id \"a b\"",
            ),
            (
                Options {
                    lease_ttl_ms: 500,
                    ..options()
                },
                "1000 to 600000",
            ),
            (
                Options {
                    fence_margin_ms: 5000,
                    ..options()
                },
                "--fence-margin-ms 5000",
            ),
            (
                Options {
                    report_interval_ms: 10,
                    ..options()
                },
                "100 to 3600000",
            ),
            (
                Options {
                    listen: "0.0.0.0:7100".parse().unwrap(),
                    ..options()
                },
                "--listen 0.0.0.0:7100",
            ),
        ];
        for (o, want) in cases {
            let err = o.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should name {want:?}");
        }
    }
}

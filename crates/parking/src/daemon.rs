//! The parking daemon: sample → policy → actuator, every check interval, with a unix-socket control
//! channel for `status` and `set`, and a clean restore on SIGINT/SIGTERM.
//!
//! Control protocol: the client connects, writes one JSON [`Request`] line, reads one JSON
//! [`Response`] line. Example: `{"op":"set","assignments":["headroom=30"]}`.
//!
//! The control socket never holds up the tick: it is bound 0600 in a private (0700) directory,
//! an acceptor thread hands each connection to a client thread (at most [`MAX_CLIENTS`] at once)
//! that checks the peer's uid (`SO_PEERCRED`, default this process's uid and root) and reads at
//! most [`MAX_REQUEST_BYTES`] within [`CLIENT_DEADLINE`]; only a complete, parsed request
//! reaches the tick thread, through a channel it drains between ticks, and the answer goes back
//! the same way. A silent client, a half line or a client that never reads its answer costs one
//! client thread until its deadline, never a tick.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tern_vmctl::local::{BindPrivateError, PeerPolicy};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde::{Deserialize, Serialize};

use crate::actuator::{ActReport, Actuator, ActuatorConfig};
use crate::knobs::Knobs;
use crate::policy::{Policy, Reason, Sample};
use crate::power::{ParkingPowerModel, PowerModelError, PowerSpec};
use crate::runtime::{RuntimeEntry, Skip, read_entries};
use crate::telemetry::{
    CpuTimes, HostPaths, IdleState, ThreadReader, ThreadSched, busy_fractions, read_allowed_list,
    read_cpu_times, read_idle_states, residency,
};
use crate::topology::{ReadTopologyError, Topology, format_cpus};

/// The default control socket (its directory is private: 0700).
pub const DEFAULT_SOCKET: &str = "/run/tern/park/park.sock";
/// The longest request line, bytes (a `set` of every knob is far below this).
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// How long a client has to send its request and take its answer.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(2);
/// Client connections served at once; more wait in the listen backlog.
pub const MAX_CLIENTS: usize = 16;

/// Everything the daemon needs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Policy knobs (validated).
    pub knobs: Knobs,
    /// `/proc` and `/sys` roots.
    pub paths: HostPaths,
    /// The VMM runtime directory.
    pub runtime_dir: PathBuf,
    /// The control socket.
    pub socket: PathBuf,
    /// Restrict management to these CPUs (default: all online).
    pub cpus: Option<Vec<usize>>,
    /// Cgroup cpuset to drive, if any.
    pub cpuset_dir: Option<PathBuf>,
    /// Move IRQs off parked CPUs.
    pub irq: bool,
    /// Lower KVM halt-polling to this while running.
    pub halt_poll_ns: Option<u64>,
    /// Host power curve and per-core figures for the estimate (`auto` picks by the managed CPUs).
    pub power: PowerSpec,
    /// Where the policy's per-CPU busy figures come from.
    pub demand: DemandSource,
    /// Log every interval, not only changes.
    pub verbose: bool,
}

/// What counts as demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DemandSource {
    /// Run time of the managed vCPU threads, attributed to the CPU each last ran on (other work on
    /// the host shows only as run-queue wait of the vCPUs). The default: parking packs vCPUs.
    Vcpu,
    /// Whole-host busy time from `/proc/stat`, like Windows.
    Host,
}

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Current state.
    Status,
    /// Change knobs (`KNOB=VALUE` each); all or nothing.
    Set { assignments: Vec<String> },
}

/// A control reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The error, when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The state after the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

/// One CPU in the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuStatus {
    /// CPU id.
    pub cpu: usize,
    /// Parked?
    pub parked: bool,
    /// Busy % over the last interval.
    pub busy_pct: f64,
    /// Measured C-state residency over the last interval (name, % of time), where the host has cpuidle.
    pub idle_residency_pct: Vec<(String, f64)>,
}

/// One vCPU thread in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadStatus {
    /// Thread id.
    pub tid: u32,
    /// CPU it last ran on.
    pub last_cpu: Option<usize>,
    /// Its current `Cpus_allowed_list`.
    pub allowed: String,
}

/// One VM in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// VM name.
    pub name: String,
    /// VMM pid.
    pub pid: u32,
    /// Its vCPU threads.
    pub threads: Vec<ThreadStatus>,
}

/// The daemon's state, as `tern park status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Check intervals done.
    pub interval: u64,
    /// Knobs in force.
    pub knobs: Knobs,
    /// Unparked CPUs.
    pub unparked: Vec<usize>,
    /// Interval of the last change of the unparked set.
    pub last_change_interval: u64,
    /// Why it last changed.
    pub last_reason: Reason,
    /// Demand over the last interval, cores.
    pub demand: f64,
    /// Per CPU.
    pub cpus: Vec<CpuStatus>,
    /// Per VM.
    pub vms: Vec<VmStatus>,
    /// Which power model the estimates use, and why.
    pub power_model: String,
    /// Estimated host power now, W.
    pub power_w: f64,
    /// Estimated host power without parking, W.
    pub power_no_parking_w: f64,
    /// Estimated energy saved since start, J.
    pub energy_saved_j: f64,
    /// Recent skips (vanished threads, refused calls, bad entries).
    pub recent_skips: Vec<Skip>,
}

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("Cannot read the CPU topology")]
    Topology(#[source] ReadTopologyError),
    #[error("Another parking daemon is already listening on {0}")]
    AlreadyRunning(PathBuf),
    #[error("Cannot listen on {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot listen on the control socket")]
    Bind(#[source] BindPrivateError),
    #[error("Cannot set up signal handling")]
    Signals(#[source] nix::Error),
    #[error("Bad power model")]
    Power(#[source] PowerModelError),
    #[error("Cannot read CPU telemetry")]
    Telemetry(#[source] crate::telemetry::TelemetryError),
}

/// SIGINT/SIGTERM (and optionally more) delivered through a non-blocking signalfd.
#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks `signals` in the calling thread (call before spawning threads, which inherit the mask)
    /// and opens a signalfd for them.
    pub fn block(signals: &[Signal]) -> Result<Signals, nix::Error> {
        let mut set = SigSet::empty();
        for &s in signals {
            set.add(s);
        }
        set.thread_block()?;
        Ok(Signals {
            fd: SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?,
        })
    }

    /// The next pending signal, if any.
    pub fn pending(&self) -> Option<Signal> {
        match self.fd.read_signal() {
            Ok(Some(info)) => Signal::try_from(info.ssi_signo as i32).ok(),
            _ => None,
        }
    }

    /// Waits up to `timeout` for a signal.
    pub fn wait(&self, timeout: Duration) -> Option<Signal> {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let t = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let _ = poll(&mut fds, t);
        self.pending()
    }
}

/// Sends one request to a running daemon.
pub fn request(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(ClientError::Io)?;
    let mut line = serde_json::to_string(req).expect("requests serialise");
    line.push('\n');
    match stream.write_all(line.as_bytes()) {
        // The daemon closed first (a refused peer): its answer, if any, says why.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        r => r.map_err(ClientError::Io)?,
    }
    let mut reply = String::new();
    BufReader::new(stream)
        .take(16 << 20)
        .read_line(&mut reply)
        .map_err(ClientError::Io)?;
    serde_json::from_str(&reply).map_err(|e| ClientError::BadReply(e.to_string()))
}

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("No parking daemon at {path} (is `tern park run` running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Talking to the parking daemon failed")]
    Io(#[source] io::Error),
    #[error("The parking daemon sent a bad reply: {0}")]
    BadReply(String),
}

/// The daemon's state and one check interval of it ([`Daemon::tick`]), usable as a library by a
/// process with its own loop (the host agent): [`Daemon::new`] needs no socket and no signals.
pub struct Daemon {
    cfg: DaemonConfig,
    /// Whether decisions are applied (affinities written); off, the policy runs on the same
    /// telemetry and only reports.
    actuate: bool,
    policy: Policy,
    actuator: Actuator,
    model: ParkingPowerModel,
    model_line: String,
    interval: u64,
    last_change_interval: u64,
    last_reason: Reason,
    prev_cpu: BTreeMap<usize, CpuTimes>,
    prev_threads: BTreeMap<u32, ThreadSched>,
    prev_idle: BTreeMap<usize, Vec<IdleState>>,
    last_tick: Instant,
    vms: Vec<RuntimeEntry>,
    busy: Vec<f64>,
    demand: f64,
    threads: BTreeMap<u32, ThreadSched>,
    residency: BTreeMap<usize, Vec<(String, f64)>>,
    energy_saved_j: f64,
    skips: Vec<Skip>,
    seen_skips: BTreeSet<String>,
    readers: BTreeMap<u32, ThreadReader>,
    runtime_mtime: Option<std::time::SystemTime>,
    reread_entries: bool,
    last_idle_read: Instant,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("runtime_dir", &self.cfg.runtime_dir)
            .field("actuate", &self.actuate)
            .field("interval", &self.interval)
            .field("unparked", &self.policy.unparked())
            .finish_non_exhaustive()
    }
}

fn log(msg: &str) {
    eprintln!("tern park: {msg}");
}

impl Daemon {
    fn note_skips(&mut self, skips: Vec<Skip>) {
        for s in skips {
            let key = format!("{}: {}", s.what, s.why);
            if self.seen_skips.insert(key.clone()) {
                log(&format!("skipped {key}"));
            }
            self.skips.push(s);
        }
        let n = self.skips.len();
        if n > 20 {
            self.skips.drain(..n - 20);
        }
        if self.seen_skips.len() > 10_000 {
            self.seen_skips.clear();
        }
    }

    /// Re-reads the runtime directory only when it changed (or a thread went missing), so a quiet
    /// host costs one `stat` per interval for it.
    fn refresh_entries(&mut self) {
        let mtime = std::fs::metadata(&self.cfg.runtime_dir)
            .and_then(|m| m.modified())
            .ok();
        if !self.reread_entries && mtime == self.runtime_mtime {
            return;
        }
        self.runtime_mtime = mtime;
        self.reread_entries = false;
        let (vms, skips) = read_entries(&self.cfg.runtime_dir, &self.cfg.paths);
        self.note_skips(skips);
        let tids: BTreeSet<u32> = vms
            .iter()
            .flat_map(|v| v.vcpu_tids.iter().copied())
            .collect();
        self.readers.retain(|t, _| tids.contains(t));
        self.vms = vms;
    }

    /// A daemon over `cfg`'s CPUs and VMs that has not ticked yet (nothing applied until then).
    pub fn new(cfg: DaemonConfig) -> Result<Daemon, DaemonError> {
        let topology = Topology::read(&cfg.paths.sys_root, cfg.cpus.as_deref())
            .map_err(DaemonError::Topology)?;
        let (model, model_line) = cfg
            .power
            .resolve(topology.len())
            .map_err(DaemonError::Power)?;
        let prev_cpu = read_cpu_times(&cfg.paths).map_err(DaemonError::Telemetry)?;
        let managed: Vec<usize> = topology.cpus.iter().map(|c| c.id).collect();
        let actuator = Actuator::new(ActuatorConfig {
            paths: cfg.paths.clone(),
            managed,
            cpuset_dir: cfg.cpuset_dir.clone(),
            irq: cfg.irq,
            halt_poll_ns: cfg.halt_poll_ns,
        });
        Ok(Daemon {
            policy: Policy::new(cfg.knobs, topology),
            cfg,
            actuate: true,
            actuator,
            model,
            model_line,
            interval: 0,
            last_change_interval: 0,
            last_reason: Reason::Hold,
            prev_cpu,
            prev_threads: BTreeMap::new(),
            prev_idle: BTreeMap::new(),
            last_tick: Instant::now(),
            vms: Vec::new(),
            busy: Vec::new(),
            demand: 0.0,
            threads: BTreeMap::new(),
            residency: BTreeMap::new(),
            energy_saved_j: 0.0,
            skips: Vec::new(),
            seen_skips: BTreeSet::new(),
            readers: BTreeMap::new(),
            runtime_mtime: None,
            reread_entries: true,
            last_idle_read: Instant::now() - Duration::from_secs(10),
        })
    }

    /// Report-only (`false`): the policy keeps deciding, but no affinity or file is written (and
    /// whatever was written is restored).
    pub fn set_actuate(&mut self, actuate: bool) {
        if self.actuate && !actuate {
            self.restore();
        }
        self.actuate = actuate;
    }

    /// The managed CPUs the policy has parked now.
    pub fn parked_cpus(&self) -> usize {
        self.policy.topology().len() - self.policy.unparked().len()
    }

    /// The managed CPUs.
    pub fn managed_cpus(&self) -> usize {
        self.policy.topology().len()
    }

    /// The check interval, from the knobs.
    pub fn period(&self) -> Duration {
        Duration::from_millis(u64::from(self.policy.knobs().interval_ms))
    }

    /// Restores every affinity and file the actuator changed.
    pub fn restore(&mut self) -> ActReport {
        self.actuator.restore()
    }

    /// One check interval: sample, decide, and (unless report-only) apply.
    pub fn tick(&mut self) {
        self.interval += 1;
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_tick);
        self.last_tick = now;
        self.refresh_entries();
        let vms = self.vms.clone();
        let ids: Vec<usize> = self.policy.topology().cpus.iter().map(|c| c.id).collect();
        if self.cfg.demand == DemandSource::Host {
            match read_cpu_times(&self.cfg.paths) {
                Ok(cur) => {
                    self.busy = busy_fractions(&self.prev_cpu, &cur, &ids);
                    self.prev_cpu = cur;
                }
                Err(e) => self.note_skips(vec![Skip {
                    what: "/proc/stat".into(),
                    why: e.to_string(),
                }]),
            }
        }
        let mut threads = BTreeMap::new();
        let mut wait_ns = 0u64;
        let mut vcpu_busy = vec![0.0; ids.len()];
        let elapsed_ns = elapsed.as_nanos().max(1) as f64;
        let mut gone = Vec::new();
        // Where each thread ran matters only for threads that did run: below 10 % of the interval a
        // thread's share is spread over the CPUs it may use, which saves a read per idle vCPU.
        // With one CPU unparked, a confined thread can only have run there.
        let unparked = self.policy.unparked().to_vec();
        let mut spread = 0.0;
        for vm in &vms {
            for &tid in &vm.vcpu_tids {
                let confined = self.actuator.is_confined(tid);
                let reader = match self.readers.entry(tid) {
                    std::collections::btree_map::Entry::Occupied(e) => Ok(e.into_mut()),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        ThreadReader::open(&self.cfg.paths, vm.pid, tid).map(|r| v.insert(r))
                    }
                };
                let sample = reader.and_then(|r| {
                    let mut t = r.read(!confined)?;
                    let run = self.prev_threads.get(&tid).map_or(0.0, |p| {
                        t.run_ns.saturating_sub(p.run_ns) as f64 / elapsed_ns
                    });
                    if confined {
                        t.last_cpu = match unparked.as_slice() {
                            [one] => Some(*one),
                            _ if run >= 0.1 => r.last_cpu()?,
                            _ => None,
                        };
                    }
                    Ok(t)
                });
                match sample {
                    Ok(t) => {
                        if let Some(p) = self.prev_threads.get(&tid) {
                            // The kernel books a wait when the thread gets the CPU, so a long
                            // wait can land in one sample: never count more than the interval.
                            wait_ns += t.wait_ns.saturating_sub(p.wait_ns).min(elapsed_ns as u64);
                            let run = t.run_ns.saturating_sub(p.run_ns) as f64 / elapsed_ns;
                            match t.last_cpu.and_then(|c| ids.iter().position(|&x| x == c)) {
                                Some(i) => vcpu_busy[i] = (vcpu_busy[i] + run).min(1.0),
                                None => spread += run,
                            }
                        }
                        threads.insert(tid, t);
                    }
                    Err(_) => {
                        self.readers.remove(&tid);
                        self.reread_entries = true;
                        gone.push(Skip {
                            what: format!("{} thread {tid}", vm.name),
                            why: "thread is gone".into(),
                        })
                    }
                }
            }
        }
        if spread > 0.0 {
            let share = spread / unparked.len() as f64;
            for (i, id) in ids.iter().enumerate() {
                if unparked.contains(id) {
                    vcpu_busy[i] = (vcpu_busy[i] + share).min(1.0);
                }
            }
        }
        self.note_skips(gone);
        self.prev_threads = threads.clone();
        self.threads = threads;
        let runq_wait = wait_ns as f64 / elapsed_ns;
        if self.cfg.demand == DemandSource::Vcpu {
            self.busy = vcpu_busy;
        }
        let d = self.policy.step(&Sample {
            cpu_busy: self.busy.clone(),
            runq_wait,
        });
        self.demand = d.demand;
        if d.changed {
            self.last_change_interval = self.interval;
            self.last_reason = d.reason;
            log(&format!(
                "interval {}: unparked {} ({} of {} CPUs; {:?}, demand {:.2} cores)",
                self.interval,
                format_cpus(&d.unparked),
                d.unparked.len(),
                ids.len(),
                d.reason,
                d.demand
            ));
        } else if self.cfg.verbose {
            log(&format!(
                "interval {}: hold {} (demand {:.2} cores)",
                self.interval,
                format_cpus(&d.unparked),
                d.demand
            ));
        }
        if self.actuate {
            let ActReport { skips, .. } = self.actuator.apply(&vms, &d.unparked);
            self.note_skips(skips);
        }
        self.vms = vms;
        // C-state residency is for people reading `status`: every 5 s is plenty.
        let idle_window = now.duration_since(self.last_idle_read);
        if idle_window >= Duration::from_secs(5) {
            self.last_idle_read = now;
            for &id in &ids {
                let cur = read_idle_states(&self.cfg.paths, id);
                if let Some(prev) = self.prev_idle.get(&id) {
                    let r = residency(prev, &cur, idle_window.as_micros() as u64);
                    self.residency.insert(id, r);
                }
                self.prev_idle.insert(id, cur);
            }
        }
        let k = d.unparked.len();
        let saved = self.model.power_no_parking_w(self.demand) - self.model.power_w(self.demand, k);
        self.energy_saved_j += saved * elapsed.as_secs_f64();
    }

    fn status(&self) -> Status {
        let unparked = self.policy.unparked().to_vec();
        let cpus = self
            .policy
            .topology()
            .cpus
            .iter()
            .enumerate()
            .map(|(i, c)| CpuStatus {
                cpu: c.id,
                parked: !unparked.contains(&c.id),
                busy_pct: 100.0 * self.busy.get(i).copied().unwrap_or(0.0),
                idle_residency_pct: self
                    .residency
                    .get(&c.id)
                    .map(|r| r.iter().map(|(n, f)| (n.clone(), 100.0 * f)).collect())
                    .unwrap_or_default(),
            })
            .collect();
        let vms = self
            .vms
            .iter()
            .map(|vm| VmStatus {
                name: vm.name.clone(),
                pid: vm.pid,
                threads: vm
                    .vcpu_tids
                    .iter()
                    .map(|&tid| ThreadStatus {
                        tid,
                        last_cpu: crate::telemetry::read_thread(&self.cfg.paths, vm.pid, tid)
                            .ok()
                            .and_then(|t| t.last_cpu),
                        allowed: read_allowed_list(&self.cfg.paths, vm.pid, tid)
                            .unwrap_or_else(|_| "gone".into()),
                    })
                    .collect(),
            })
            .collect();
        Status {
            interval: self.interval,
            knobs: *self.policy.knobs(),
            unparked: unparked.clone(),
            last_change_interval: self.last_change_interval,
            last_reason: self.last_reason,
            demand: self.demand,
            cpus,
            vms,
            power_model: self.model_line.clone(),
            power_w: self.model.power_w(self.demand, unparked.len()),
            power_no_parking_w: self.model.power_no_parking_w(self.demand),
            energy_saved_j: self.energy_saved_j,
            recent_skips: self.skips.clone(),
        }
    }

    /// Answers one control request (on the tick thread, between ticks).
    fn handle_request(&mut self, req: Request) -> Response {
        match req {
            Request::Status => Response {
                ok: true,
                error: None,
                status: Some(self.status()),
            },
            Request::Set { assignments } => {
                let mut knobs = *self.policy.knobs();
                match knobs.apply_assignments(&assignments) {
                    Err(e) => Response::error(e.to_string()),
                    Ok(()) => {
                        let d = self.policy.set_knobs(knobs);
                        log(&format!("knobs set: {}", assignments.join(" ")));
                        if d.changed {
                            self.last_change_interval = self.interval;
                            self.last_reason = d.reason;
                            let ActReport { skips, .. } =
                                self.actuator.apply(&self.vms, &d.unparked);
                            self.note_skips(skips);
                        }
                        Response {
                            ok: true,
                            error: None,
                            status: Some(self.status()),
                        }
                    }
                }
            }
        }
    }
}

impl Response {
    fn error(msg: String) -> Response {
        Response {
            ok: false,
            error: Some(msg),
            status: None,
        }
    }
}

/// Why a request line was refused (pure).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Longer than [`MAX_REQUEST_BYTES`].
    #[error("Request longer than {MAX_REQUEST_BYTES} bytes")]
    TooLong,
    /// Not a request.
    #[error("Bad request: {0}")]
    Bad(String),
}

/// Parses one request line (without or with its newline), bounded (pure).
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLong);
    }
    serde_json::from_slice(line).map_err(|e| RequestError::Bad(e.to_string()))
}

/// A parsed request on its way to the tick thread, with where its answer goes.
type Pending = (Request, mpsc::SyncSender<Response>);

/// Reads one request line from `stream` by `deadline`: at most [`MAX_REQUEST_BYTES`] and its
/// newline (a client that closes after a full line without a newline is served too).
fn read_request(stream: &UnixStream, deadline: Instant) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(stream);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "No complete request within {} ms",
                CLIENT_DEADLINE.as_millis()
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        let room = (MAX_REQUEST_BYTES + 1 - line.len()) as u64;
        match (&mut reader).take(room).read_until(b'\n', &mut line) {
            Ok(0) if line.is_empty() => return Err("The client sent nothing".into()),
            Ok(0) => return Ok(line),
            Ok(_) if line.ends_with(b"\n") => return Ok(line),
            Ok(_) if line.len() > MAX_REQUEST_BYTES => {
                return Err(RequestError::TooLong.to_string());
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// One client, on its own thread: read the request by the deadline, hand it to the tick thread,
/// write its answer by the deadline.
fn serve_client(stream: UnixStream, to_tick: &mpsc::Sender<Pending>, wake: &UnixStream) {
    let deadline = Instant::now() + CLIENT_DEADLINE;
    let resp = match read_request(&stream, deadline)
        .and_then(|l| parse_request(&l).map_err(|e| e.to_string()))
    {
        Err(e) => Response::error(e),
        Ok(req) => {
            let (tx, rx) = mpsc::sync_channel(1);
            if to_tick.send((req, tx)).is_err() {
                return;
            }
            let _ = (&*wake).write(&[1]);
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(r) => r,
                Err(_) => Response::error("The daemon did not answer in time".into()),
            }
        }
    };
    let mut out = serde_json::to_string(&resp).unwrap_or_default();
    out.push('\n');
    let left = deadline.saturating_duration_since(Instant::now());
    let _ = stream.set_write_timeout(Some(left.max(Duration::from_millis(100))));
    let _ = (&stream).write_all(out.as_bytes());
}

/// Answers a peer whose uid is not allowed, after reading its request (bounded, 200 ms at most, so
/// that it is not cut off while still writing), and logs it.
fn refuse(stream: UnixStream, why: &str) {
    log(&format!("control connection refused: {why}"));
    let _ = read_request(&stream, Instant::now() + Duration::from_millis(200));
    let mut out =
        serde_json::to_string(&Response::error(format!("Refused: {why}"))).unwrap_or_default();
    out.push('\n');
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let _ = (&stream).write_all(out.as_bytes());
}

/// The acceptor: client cap, one thread per client (which checks the peer). Accept errors (EMFILE,
/// ECONNABORTED, …) are waited out, never fatal.
fn accept_clients(
    listener: UnixListener,
    peers: PeerPolicy,
    to_tick: mpsc::Sender<Pending>,
    wake: UnixStream,
) {
    let wake = Arc::new(wake);
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                log(&format!(
                    "accept on the control socket failed ({e}); retrying"
                ));
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        // At the cap, the acceptor waits for a client thread to finish (each within its deadline).
        while active.load(Ordering::Acquire) >= MAX_CLIENTS {
            std::thread::sleep(Duration::from_millis(10));
        }
        active.fetch_add(1, Ordering::AcqRel);
        let (to_tick, wake, active2) = (to_tick.clone(), wake.clone(), active.clone());
        let peers = peers.clone();
        // The peer is checked on the client's thread: a refused one never holds up the acceptor.
        let spawned = std::thread::Builder::new()
            .name("park-client".into())
            .spawn(move || {
                match peers.check(&stream) {
                    Ok(_) => serve_client(stream, &to_tick, &wake),
                    Err(why) => refuse(stream, &why.to_string()),
                }
                active2.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM, then restores every affinity and file it changed.
/// The control socket admits the peers `peers` allows. Returns the number of check intervals run.
pub fn run(cfg: DaemonConfig, peers: PeerPolicy) -> Result<u64, DaemonError> {
    let signals =
        Signals::block(&[Signal::SIGINT, Signal::SIGTERM]).map_err(DaemonError::Signals)?;
    let socket = cfg.socket.clone();
    let mut d = Daemon::new(cfg)?;
    let listener = match tern_vmctl::local::bind_private(&socket) {
        Ok(l) => l,
        Err(BindPrivateError::InUse { path }) => return Err(DaemonError::AlreadyRunning(path)),
        Err(e) => return Err(DaemonError::Bind(e)),
    };
    let sock_err = |source| DaemonError::Socket {
        path: socket.clone(),
        source,
    };
    // Client threads wake the tick thread through this pair when a request waits.
    let (wake_rx, wake_tx) = UnixStream::pair().map_err(sock_err)?;
    wake_rx.set_nonblocking(true).map_err(sock_err)?;
    wake_tx.set_nonblocking(true).map_err(sock_err)?;
    let (to_tick, requests) = mpsc::channel::<Pending>();
    std::thread::Builder::new()
        .name("park-accept".into())
        .spawn(move || accept_clients(listener, peers, to_tick, wake_tx))
        .map_err(sock_err)?;
    let managed: Vec<usize> = d.policy.topology().cpus.iter().map(|c| c.id).collect();
    log(&format!(
        "managing CPUs {} every {} ms; VMs from {}; control socket {}",
        format_cpus(&managed),
        d.cfg.knobs.interval_ms,
        d.cfg.runtime_dir.display(),
        socket.display()
    ));
    log(&d.model_line);
    let period = |d: &Daemon| d.period();
    let mut next = Instant::now() + period(&d);
    let stop = loop {
        let now = Instant::now();
        if now >= next {
            d.tick();
            next += period(&d);
            if next <= Instant::now() {
                next = Instant::now() + period(&d);
            }
            continue;
        }
        // Round the wait up to whole milliseconds: rounding down would spin with zero timeouts
        // just before every tick.
        let wait_ms = (next - now).as_micros().div_ceil(1000);
        let wait = PollTimeout::try_from(wait_ms as u64).unwrap_or(PollTimeout::MAX);
        let mut fds = [
            PollFd::new(signals.fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake_rx.as_fd(), PollFlags::POLLIN),
        ];
        if poll(&mut fds, wait).is_err() {
            continue;
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
        let (signal_ready, request_ready) = (ready(&fds[0]), ready(&fds[1]));
        if signal_ready && let Some(sig) = signals.pending() {
            break sig;
        }
        if request_ready {
            let mut drain = [0u8; 64];
            while matches!((&wake_rx).read(&mut drain), Ok(n) if n > 0) {}
        }
        // Parsed requests only: answering one is as quick as a status.
        while let Ok((req, reply)) = requests.try_recv() {
            let _ = reply.try_send(d.handle_request(req));
        }
    };
    let rep = d.actuator.restore();
    for s in &rep.skips {
        log(&format!("restore: {}: {}", s.what, s.why));
    }
    let _ = std::fs::remove_file(&d.cfg.socket);
    log(&format!(
        "{stop} received after {} intervals: affinities restored ({} threads)",
        d.interval, rep.written
    ));
    Ok(d.interval)
}

#[cfg(test)]
mod control_tests {
    use super::*;

    #[test]
    fn request_lines_are_bounded_and_typed() {
        assert_eq!(parse_request(b"{\"op\":\"status\"}\n"), Ok(Request::Status));
        let long = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert_eq!(parse_request(&long), Err(RequestError::TooLong));
        assert!(
            matches!(parse_request(b"{\"op\":\"nope\"}"), Err(RequestError::Bad(m)) if m.contains("nope"))
        );
    }

    #[test]
    fn a_silent_or_half_line_client_is_dropped_at_its_deadline() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = Instant::now();
        let e = read_request(&a, t + Duration::from_millis(150)).unwrap_err();
        assert!(e.contains("No complete request"), "{e}");
        b.write_all(b"{\"op\":").unwrap();
        let e = read_request(&a, Instant::now() + Duration::from_millis(150)).unwrap_err();
        assert!(e.contains("No complete request"), "{e}");
        b.write_all(b"\"status\"}\n").unwrap();
        // What came after the deadline is a line of its own now: the first half is gone.
        let l = read_request(&a, Instant::now() + Duration::from_millis(150)).unwrap();
        assert_eq!(l, b"\"status\"}\n");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn an_endless_line_is_refused_at_the_size_limit() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'x'; 8192];
            for _ in 0..(MAX_REQUEST_BYTES / 8192 + 4) {
                if b.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let e = read_request(&a, Instant::now() + Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("longer than 65536 bytes"), "{e}");
        drop(a);
        writer.join().unwrap();
    }
}

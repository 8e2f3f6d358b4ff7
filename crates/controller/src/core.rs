//! The controller's decision core: a state machine fed inputs (etcd changes, agent reports and
//! replies, API calls) with the time as an argument, and emitting [`Action`]s for the shell to carry
//! out (commands to agents, lease fencing, desired-state writes). No clock, socket or thread.
//!
//! # What it decides
//! - **Placement** of new and restarted VMs ([`crate::place`], PABFD over `tern-policy`), with
//!   pinning and anti-affinity, and admission control that keeps room for `ha_reserve_hosts` host
//!   failures.
//! - **Migrations** on request and for **maintenance**, at most `max_migrations_per_host` touching
//!   a host and `max_migrations` in the cluster at once; the rest wait queued.
//! - **HA**: a host whose lease expired at `t` is fenced (its disk leases' epochs bumped) at
//!   `t + fence_margin_ms` — by then its agent has killed its VMMs itself, since it could not renew
//!   before `TTL − margin` — and only then are its VMs restarted elsewhere, highest priority first.
//! - **In doubt**: a migration whose commit had no answer is settled by asking both agents.
//! - **Power holds**: a host the automation is powering off (or whose power-off is in doubt), or
//!   has powered off, takes no VM — no placement, HA restart or migration goes there, and an
//!   operator naming it gets [`ApiError::HostPowerHeld`] — for as long as the automation's shell
//!   says so ([`Controller::set_power_holds`]).
//!
//! # Failure rule per command (the table the shell relies on)
//! | command      | `Done`                              | `Failed` / lost reply           | `InDoubt`          | `Lost` |
//! |--------------|-------------------------------------|---------------------------------|--------------------|--------|
//! | start        | VM `starting` (running once seen)   | `Failed`: back to `pending`; lost: wait for reports | — | — |
//! | stop         | VM `stopped` / removed              | retried on the next tick        | —                  | — |
//! | receive      | send `migrate_out` to the source    | task failed, VM stays           | —                  | — |
//! | migrate_out  | VM on the target, task succeeded    | task failed, VM on the source   | query both sides   | task failed, both copies stopped, VM `pending` (starts from its disk) |
//! | query        | settle by what each side runs       | ask again on the next tick      | —                  | — |
//!
//! **Invariant:** the core never sends `start` or `receive` for a VM that may run elsewhere: a VM is
//! started only when it has no host, or its host was fenced; a migration's target becomes the VM's
//! host only after the source reports success or the target reports it running.

#![deny(clippy::disallowed_methods)]
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use tern_api::agent::{AgentReport, Command, CommandBody, CommandReply, HostRecord, ObservedState};
use tern_api::automation::HostPower;
use tern_api::cluster::{
    EventInfo, HostInfo, HostState, InvalidInput, TaskInfo, TaskKind, TaskPhases, TaskRef,
    TaskState, VmCreate, VmInfo, VmState,
};

use crate::place::{self, Candidate, Placement};

/// Events kept for `GET /v1/events`.
pub const EVENTS_KEPT: usize = 1000;

/// A VM whose start failed is placed again after this long, ms.
pub const START_RETRY_MS: u64 = 2_000;

/// The controller's knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Agents' etcd lease TTL, ms.
    pub lease_ttl_ms: u64,
    /// Agents self-fence at `TTL − margin`; the controller acts at `expiry + margin`, ms.
    pub fence_margin_ms: u64,
    /// A command without a reply after this long counts as failed, ms.
    pub command_timeout_ms: u64,
    /// Migrations touching one host at once (in or out).
    pub max_migrations_per_host: usize,
    /// Migrations in the cluster at once.
    pub max_migrations: usize,
    /// Host failures the cluster keeps room for (admission control).
    pub ha_reserve_hosts: u32,
    /// vCPUs per physical core placement allows.
    pub vcpus_per_core: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lease_ttl_ms: 5_000,
            fence_margin_ms: 2_000,
            command_timeout_ms: 60_000,
            max_migrations_per_host: 2,
            max_migrations: 4,
            ha_reserve_hosts: 1,
            vcpus_per_core: 4,
        }
    }
}

/// What the core feeds on (besides the API calls, which are methods).
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// This controller won the election; `desired` is what etcd holds.
    Elected {
        /// The election key's revision: the fencing token of every command.
        generation: u64,
        /// The desired state stored by earlier leaders.
        desired: Vec<VmRecord>,
        /// Hosts in maintenance.
        maintenance: Vec<String>,
    },
    /// Another controller leads (or the session was lost): stop acting.
    Deposed,
    /// A host record appeared or changed in etcd.
    HostUp(HostRecord),
    /// A host's record vanished (its lease expired or was revoked).
    HostExpired {
        /// The host.
        host: String,
    },
    /// An agent's periodic report.
    Report(AgentReport),
    /// The reply to a command.
    Reply {
        /// The command's id.
        cmd: u64,
        /// The agent's event counter when it answered.
        seq: u64,
        /// The reply.
        reply: CommandReply,
    },
    /// A command could not be delivered or its reply was lost.
    SendFailed {
        /// The command's id.
        cmd: u64,
        /// Why.
        error: String,
    },
    /// The shell fenced a host's disk leases (or failed to).
    Fenced {
        /// The host.
        host: String,
        /// Leases fenced, or why not.
        result: Result<u32, String>,
    },
    /// Time passed.
    Tick,
}

/// A VM as stored in etcd (desired state).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    /// What it was created with.
    pub spec: VmCreate,
    /// Where it is placed.
    pub host: Option<String>,
    /// Whether it should run.
    pub run: bool,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a command to an agent and feed back its reply ([`Input::Reply`] or
    /// [`Input::SendFailed`]).
    Send {
        /// The host.
        host: String,
        /// Its agent's URL.
        agent_url: String,
        /// The command.
        command: Command,
    },
    /// Fence the host's disk write leases through the volume coordinator, then feed back
    /// [`Input::Fenced`].
    FenceLeases {
        /// The host.
        host: String,
        /// Its volume node id, if it has one.
        volume_node_id: Option<u32>,
    },
    /// Write (or delete) a VM's desired state in etcd, guarded by this leader's key.
    StoreVm {
        /// The VM.
        name: String,
        /// The record, or `None` to delete it.
        record: Option<VmRecord>,
    },
    /// Record a host's maintenance flag in etcd.
    StoreMaintenance {
        /// The host.
        host: String,
        /// In maintenance or not.
        on: bool,
    },
}

/// Why an API call is refused; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Bad input (400).
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// No such VM (404).
    #[error("unknown VM {0:?}")]
    UnknownVm(String),
    /// No such host (404).
    #[error("unknown host {0:?}")]
    UnknownHost(String),
    /// No such task (404).
    #[error("unknown task {0}")]
    UnknownTask(u64),
    /// The name is taken (409).
    #[error("a VM named {0:?} exists")]
    Exists(String),
    /// No host can take the VM (409).
    #[error("no host fits: {0}")]
    NoHostFits(String),
    /// The VM is not in a state that allows this (409).
    #[error("VM {vm:?} is {state:?}: {why}")]
    Conflict {
        /// The VM.
        vm: String,
        /// Its state.
        state: VmState,
        /// What would be needed.
        why: String,
    },
    /// This controller does not lead (503); the leader's URL is in etcd.
    #[error("this controller is not the leader")]
    NotLeader,
    /// A new leader that has not heard from every host yet (503; retry in a second).
    #[error("the leader is still gathering every host's report; retry in a moment")]
    NotReady,
    /// The host named is being powered off (or its power-off is in doubt), or is off, by the
    /// automation: it takes no VMs (409).
    #[error("host {host:?} is {}: it takes no VMs", held_why(.power))]
    HostPowerHeld {
        /// The host.
        host: String,
        /// Its power state (`powering_off` or `off`).
        power: HostPower,
    },
}

/// What a power hold means, for [`ApiError::HostPowerHeld`] and the placement reasons.
fn held_why(power: &HostPower) -> &'static str {
    match power {
        HostPower::Off => "off (powered off by the automation)",
        _ => "powering_off (the automation is powering it off, or its power-off is in doubt)",
    }
}

impl ApiError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::Invalid(_) => 400,
            ApiError::UnknownVm(_) | ApiError::UnknownHost(_) | ApiError::UnknownTask(_) => 404,
            ApiError::Exists(_)
            | ApiError::NoHostFits(_)
            | ApiError::Conflict { .. }
            | ApiError::HostPowerHeld { .. } => 409,
            ApiError::NotLeader | ApiError::NotReady => 503,
        }
    }

    /// The short, stable phrase of the error body.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "invalid input",
            ApiError::UnknownVm(_) => "unknown VM",
            ApiError::UnknownHost(_) => "unknown host",
            ApiError::UnknownTask(_) => "unknown task",
            ApiError::Exists(_) => "already exists",
            ApiError::NoHostFits(_) => "no host fits",
            ApiError::Conflict { .. } => "conflict",
            ApiError::NotLeader => "not the leader",
            ApiError::NotReady => "not ready",
            ApiError::HostPowerHeld { .. } => "host off or powering off",
        }
    }
}

#[derive(Debug, Clone)]
struct Host {
    record: HostRecord,
    state: HostState,
    /// When the lease expiry was seen.
    lost_at_ms: Option<u64>,
    fence_requested: bool,
    /// When the fence was asked for (asked again if no answer comes in time).
    fence_asked_ms: u64,
    /// The host's etcd record exists (its agent holds a lease).
    registered: bool,
    /// When its last trusted report (of this term) arrived.
    report_ms: Option<u64>,
    /// The last command id that report covered.
    report_cmd_id: u64,
    /// The agent's event counter in that report.
    report_seq: u64,
    maintenance: bool,
    observed: BTreeMap<String, ObservedState>,
    cpu: Option<f64>,
    parked: Option<u32>,
    vm_cpu: BTreeMap<String, f64>,
}

#[derive(Debug, Clone)]
struct Vm {
    spec: VmCreate,
    host: Option<String>,
    state: VmState,
    run: bool,
    restarts: u32,
    last_error: Option<String>,
    /// The migration task moving it.
    task: Option<u64>,
    /// A start command in flight.
    starting_cmd: Option<u64>,
    /// After a failed start, placement waits until then.
    retry_at_ms: u64,
    /// Lost without a fence of its own (it vanished from its host's report, or its host was
    /// fenced): placed again only once every host has reported since without it.
    vanished_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queued,
    Receiving {
        cmd: u64,
    },
    Sending {
        cmd: u64,
    },
    /// Asking both sides which runs the VM.
    Resolving {
        source: Option<u64>,
        target: Option<u64>,
    },
    Done,
}

#[derive(Debug, Clone)]
struct Task {
    info: TaskInfo,
    phase: Phase,
    /// A migration's `post_copy_after` (rounds before a post-copy switch), as asked.
    post_copy_after: Option<u32>,
    /// When both sides were last asked (in doubt).
    asked_ms: u64,
    /// For resolving: what each side said.
    source_says: Option<ObservedState>,
    target_says: Option<ObservedState>,
    /// When `receive` and `migrate_out` went out (the phases' starts).
    receive_sent_ms: Option<u64>,
    migrate_sent_ms: Option<u64>,
}

impl Task {
    /// A task that has not begun.
    fn new(info: TaskInfo) -> Task {
        Task {
            info,
            phase: Phase::Queued,
            post_copy_after: None,
            asked_ms: 0,
            source_says: None,
            target_says: None,
            receive_sent_ms: None,
            migrate_sent_ms: None,
        }
    }

    /// Records the end of the phase under way at `now` (the receiver listens, or the source
    /// answered `migrate_out`), in the task's [`TaskPhases`].
    fn phase_ended(&mut self, now: u64) {
        let p = self.info.phases.get_or_insert_with(TaskPhases::default);
        match (self.phase, self.receive_sent_ms, self.migrate_sent_ms) {
            (Phase::Receiving { .. }, Some(t), _) => {
                p.target_start_ms = Some(now.saturating_sub(t));
            }
            (Phase::Sending { .. }, _, Some(t)) => p.migrate_ms = Some(now.saturating_sub(t)),
            _ => {}
        }
    }

    /// The VM moved, the host it leaves and the host it goes to (empty where the task has none).
    fn ends(&self) -> (String, String, String) {
        (
            self.info.vm.clone().unwrap_or_default(),
            self.info.from.clone().unwrap_or_default(),
            self.info.to.clone().unwrap_or_default(),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Ping,
    /// Asking a host whether a VM whose start got no answer is there.
    CheckStart,
    Start,
    Stop,
    Receive {
        task: u64,
    },
    MigrateOut {
        task: u64,
    },
    QuerySource {
        task: u64,
    },
    QueryTarget {
        task: u64,
    },
    Resume,
}

#[derive(Debug, Clone)]
struct Pending {
    host: String,
    vm: String,
    sent_ms: u64,
    purpose: Purpose,
}

/// The controller's state machine. See the module docs.
#[derive(Debug, Clone)]
pub struct Controller {
    cfg: Config,
    generation: Option<u64>,
    /// When this term began.
    term_start_ms: u64,
    hosts: BTreeMap<String, Host>,
    vms: BTreeMap<String, Vm>,
    tasks: BTreeMap<u64, Task>,
    next_task: u64,
    next_cmd: u64,
    pending: BTreeMap<u64, Pending>,
    /// The last command sent to each (host, VM): a report speaks for that VM only once it covers it.
    last_cmd: BTreeMap<(String, String), u64>,
    /// The agent's event counter at its last answer about each (host, VM): a report speaks for
    /// that VM only if it was taken after that answer.
    seq_floor: BTreeMap<(String, String), u64>,
    events: VecDeque<EventInfo>,
    next_event: u64,
    outbox: Vec<Action>,
    /// Hosts in maintenance whose host record has not appeared yet.
    maintenance_pending: BTreeSet<String>,
    /// Hosts the automation holds out of placement ([`Controller::set_power_holds`]): being
    /// powered off (or in doubt), or off. Kept across terms until the shell replaces them (the
    /// automation does when it takes office).
    power_holds: BTreeMap<String, HostPower>,
    /// Counters for `/metrics`.
    pub counters: Counters,
}

/// Running totals for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Migrations that completed.
    pub migrations_succeeded: u64,
    /// Migrations that failed (the VM stayed).
    pub migrations_failed: u64,
    /// VMs restarted after their host was lost.
    pub ha_restarts: u64,
    /// Times this controller became the leader.
    pub elections_won: u64,
    /// Hosts whose leases were fenced.
    pub hosts_fenced: u64,
}

impl Controller {
    /// A controller that does not lead yet.
    pub fn new(cfg: Config) -> Controller {
        Controller {
            cfg,
            generation: None,
            term_start_ms: 0,
            hosts: BTreeMap::new(),
            vms: BTreeMap::new(),
            tasks: BTreeMap::new(),
            next_task: 1,
            next_cmd: 1,
            pending: BTreeMap::new(),
            last_cmd: BTreeMap::new(),
            seq_floor: BTreeMap::new(),
            events: VecDeque::new(),
            next_event: 1,
            outbox: Vec::new(),
            maintenance_pending: BTreeSet::new(),
            power_holds: BTreeMap::new(),
            counters: Counters::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The generation while leading.
    pub fn generation(&self) -> Option<u64> {
        self.generation
    }

    /// Takes the actions decided so far, oldest first.
    pub fn drain_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.outbox)
    }

    /// Feeds one input at time `now_ms`, then reconciles.
    pub fn step(&mut self, input: Input, now_ms: u64) {
        match input {
            Input::Elected {
                generation,
                desired,
                maintenance,
            } => self.elected(generation, desired, maintenance, now_ms),
            Input::Deposed => self.deposed(now_ms),
            Input::HostUp(record) => self.host_up(record, now_ms),
            Input::HostExpired { host } => self.host_expired(&host, now_ms),
            Input::Report(report) => self.report(report, now_ms),
            Input::Reply { cmd, seq, reply } => self.reply(cmd, seq, reply, now_ms),
            Input::SendFailed { cmd, error } => self.send_failed(cmd, &error, now_ms),
            Input::Fenced { host, result } => self.fenced(&host, result, now_ms),
            Input::Tick => {}
        }
        self.reconcile(now_ms);
    }

    // ----- inputs -----

    fn elected(
        &mut self,
        generation: u64,
        desired: Vec<VmRecord>,
        maintenance: Vec<String>,
        now: u64,
    ) {
        self.generation = Some(generation);
        self.term_start_ms = now;
        self.counters.elections_won += 1;
        // What an earlier term knew of host liveness is stale: a registered host is up; one that is
        // not is lost as of now, and waits out the whole margin before it is fenced.
        for h in self.hosts.values_mut() {
            h.fence_requested = false;
            h.observed.clear();
            h.report_ms = None;
            h.report_cmd_id = 0;
            h.report_seq = 0;
            if h.registered {
                h.state = HostState::Up;
                h.lost_at_ms = None;
            } else {
                h.state = HostState::Lost;
                h.lost_at_ms = Some(now);
            }
        }
        // Commands of an earlier term are void: their replies are ignored.
        self.pending.clear();
        self.vms.clear();
        for rec in desired {
            let state = match (rec.run, &rec.host) {
                (false, _) => VmState::Stopped,
                (true, None) => VmState::Pending,
                // Confirmed by the agents' next reports; until then assumed to still run.
                (true, Some(_)) => VmState::Running,
            };
            self.vms.insert(
                rec.spec.name.clone(),
                Vm {
                    spec: rec.spec,
                    host: rec.host,
                    state,
                    run: rec.run,
                    restarts: 0,
                    last_error: None,
                    task: None,
                    starting_cmd: None,
                    retry_at_ms: 0,
                    vanished_ms: None,
                },
            );
        }
        // Tasks of an earlier term that were under way: their VMs may be paused on a source.
        for t in self.tasks.values_mut() {
            if !matches!(t.phase, Phase::Done) {
                t.phase = Phase::Done;
                t.info.state = TaskState::Failed;
                t.info.finished_ms = Some(now);
                t.info.error = Some("the controller that ran it lost the leadership".into());
            }
        }
        // Maintenance flags come from the store alone: one set by an earlier term (or by a call
        // whose write failed) is void.
        for h in self.hosts.values_mut() {
            h.maintenance = false;
        }
        self.maintenance_pending.clear();
        for h in maintenance {
            match self.hosts.get_mut(&h) {
                Some(host) => host.maintenance = true,
                None => {
                    self.maintenance_pending.insert(h);
                }
            }
        }
        self.event(
            now,
            "leader",
            None,
            None,
            format!("leading with generation {generation}"),
        );
        // Each agent learns the new generation first: from then on it refuses older commands,
        // and its reports can be trusted.
        self.last_cmd.clear();
        self.seq_floor.clear();
        let hosts: Vec<String> = self.hosts.keys().cloned().collect();
        for h in hosts {
            self.send(&h, "", CommandBody::Ping, Purpose::Ping, now);
        }
    }

    fn deposed(&mut self, now: u64) {
        if self.generation.take().is_some() {
            self.pending.clear();
            self.outbox.clear();
            self.event(now, "deposed", None, None, "no longer the leader".into());
        }
    }

    fn host_up(&mut self, record: HostRecord, now: u64) {
        let name = record.name.clone();
        let maintenance = self.maintenance_pending.remove(&name);
        match self.hosts.get_mut(&name) {
            Some(h) => {
                let was = h.state;
                let new_life = h.record.lease != record.lease;
                h.record = record;
                h.registered = true;
                if new_life {
                    // A new registration: its agent is empty, and nothing said to or about its
                    // earlier life applies.
                    h.report_ms = None;
                    h.report_cmd_id = 0;
                    h.report_seq = 0;
                    h.observed.clear();
                    self.last_cmd.retain(|(host, _), _| host != &name);
                    self.seq_floor.retain(|(host, _), _| host != &name);
                }
                // A fenced host comes back empty (its agent killed its VMMs); a lost host whose
                // fence was not yet asked for is simply up again (its agent reports what runs).
                if was != HostState::Up && !(was == HostState::Lost && h.fence_requested) {
                    h.state = HostState::Up;
                    h.lost_at_ms = None;
                    h.fence_requested = false;
                    self.event(
                        now,
                        "host_up",
                        None,
                        Some(&name),
                        format!("host {name} is back"),
                    );
                }
            }
            None => {
                self.hosts.insert(
                    name.clone(),
                    Host {
                        record,
                        state: HostState::Up,
                        lost_at_ms: None,
                        fence_requested: false,
                        fence_asked_ms: 0,
                        registered: true,
                        report_ms: None,
                        report_cmd_id: 0,
                        report_seq: 0,
                        maintenance,
                        observed: BTreeMap::new(),
                        cpu: None,
                        parked: None,
                        vm_cpu: BTreeMap::new(),
                    },
                );
                self.event(
                    now,
                    "host_up",
                    None,
                    Some(&name),
                    format!("host {name} joined"),
                );
            }
        }
        if self.generation.is_some() {
            self.send(&name, "", CommandBody::Ping, Purpose::Ping, now);
        }
    }

    fn host_expired(&mut self, host: &str, now: u64) {
        if let Some(h) = self.hosts.get_mut(host) {
            h.registered = false;
        }
        if let Some(h) = self.hosts.get_mut(host)
            && h.state == HostState::Up
        {
            h.state = HostState::Lost;
            h.lost_at_ms = Some(now);
            h.observed.clear();
            h.report_ms = None;
            let msg = format!(
                "host {host}'s lease expired; its VMs restart elsewhere after {} ms",
                self.cfg.fence_margin_ms
            );
            self.event(now, "host_lost", None, Some(host), msg);
        }
    }

    fn report(&mut self, report: AgentReport, now: u64) {
        let Some(generation) = self.generation else {
            return;
        };
        if report.generation_seen > generation {
            // A newer leader has spoken to this agent.
            self.deposed(now);
            return;
        }
        let Some(h) = self.hosts.get_mut(&report.host) else {
            return;
        };
        if h.state != HostState::Up {
            return;
        }
        h.cpu = report.cpu_utilization;
        h.parked = report.parked_cores;
        h.vm_cpu = report
            .vms
            .iter()
            .filter_map(|v| v.cpu_utilization.map(|u| (v.name.clone(), u)))
            .collect();
        // A restarted agent counts from zero again; its command ids of this term still rise.
        let older = report.last_command_id < h.report_cmd_id
            || (report.last_command_id == h.report_cmd_id && report.seq < h.report_seq);
        if report.generation_seen < generation || older {
            // Taken before the agent heard from this leader, or older than one already seen:
            // telemetry only. An agent that has not heard this leader yet is told again (the
            // first word may have been lost).
            let name = report.host.clone();
            let ping_pending = self
                .pending
                .values()
                .any(|p| p.host == name && p.purpose == Purpose::Ping);
            if report.generation_seen < generation && !ping_pending {
                self.send(&name, "", CommandBody::Ping, Purpose::Ping, now);
            }
            return;
        }
        let before: Vec<String> = h.observed.keys().cloned().collect();
        h.observed = report
            .vms
            .iter()
            .map(|v| (v.name.clone(), v.state))
            .collect();
        h.report_ms = Some(now);
        h.report_cmd_id = report.last_command_id;
        h.report_seq = report.seq;
        // Only the VMs this report can say something about: placed on this host, or seen there
        // now or in its previous report.
        let host = report.host.clone();
        let mut scope: BTreeSet<String> = before.into_iter().collect();
        scope.extend(report.vms.iter().map(|v| v.name.clone()));
        scope.extend(
            self.vms
                .iter()
                .filter(|(_, v)| v.host.as_deref() == Some(host.as_str()))
                .map(|(n, _)| n.clone()),
        );
        self.reconcile_vms(&host, scope, now);
    }

    /// Whether host `h`'s latest trusted report speaks for VM `vm` (it covers every command sent
    /// there about the VM).
    fn covers(&self, h: &str, vm: &str) -> bool {
        let Some(host) = self.hosts.get(h) else {
            return false;
        };
        let key = (h.to_string(), vm.to_string());
        host.report_ms.is_some()
            && host.report_cmd_id >= self.last_cmd.get(&key).copied().unwrap_or(0)
            && host.report_seq >= self.seq_floor.get(&key).copied().unwrap_or(0)
    }

    /// Whether every host that might run a VM has reported since `t`: all up hosts sent a trusted
    /// report after it, and no host is lost without being fenced.
    fn heard_from_all_since(&self, t: u64) -> bool {
        self.hosts.values().all(|h| match h.state {
            HostState::Up => h.report_ms.is_some_and(|r| r > t),
            HostState::Lost => false,
            HostState::Fenced => true,
        })
    }

    /// Where the up hosts' latest trusted reports show `vm`: (running or booting, paused).
    fn seen_on(&self, vm: &str) -> (Vec<String>, Vec<String>) {
        let mut running = Vec::new();
        let mut paused = Vec::new();
        for (name, h) in &self.hosts {
            if h.state != HostState::Up || !self.covers(name, vm) {
                continue;
            }
            match h.observed.get(vm) {
                Some(ObservedState::Running | ObservedState::Starting) => {
                    running.push(name.clone())
                }
                Some(ObservedState::Paused) => paused.push(name.clone()),
                _ => {}
            }
        }
        (running, paused)
    }

    /// Squares the placements with what the agents report: a VM found running elsewhere than
    /// placed is adopted there; a VM missing from its host's covering report has vanished (and
    /// is placed again once every host has reported without it); extra copies are stopped; a
    /// paused copy nobody else runs is resumed.
    fn reconcile_vms(&mut self, reporter: &str, scope: BTreeSet<String>, now: u64) {
        let names: Vec<String> = scope
            .iter()
            .filter(|n| self.vms.contains_key(*n))
            .cloned()
            .collect();
        for name in names {
            let Some(vm) = self.vms.get(&name) else {
                continue;
            };
            let busy = vm
                .task
                .and_then(|t| self.tasks.get(&t))
                .is_some_and(|t| !matches!(t.phase, Phase::Queued | Phase::Done));
            if !vm.run {
                // Being deleted: forgotten once its host no longer has it (or was fenced).
                let host = vm.host.clone();
                let gone = host.as_ref().is_none_or(|h| {
                    self.hosts.get(h).is_none_or(|x| {
                        x.state == HostState::Fenced
                            || (x.state == HostState::Up
                                && self.covers(h, &name)
                                && matches!(
                                    x.observed.get(&name),
                                    None | Some(ObservedState::Exited | ObservedState::Absent)
                                ))
                    })
                });
                if gone {
                    self.forget(&name, now);
                } else if let Some(h) = host {
                    let stopping = self
                        .pending
                        .values()
                        .any(|p| p.host == h && p.vm == name && p.purpose == Purpose::Stop);
                    if !stopping && self.hosts.get(&h).is_some_and(|x| x.state == HostState::Up) {
                        let body = CommandBody::Stop { vm: name.clone() };
                        self.send(&h, &name, body, Purpose::Stop, now);
                    }
                }
                continue;
            }
            if busy {
                continue;
            }
            let placed = vm.host.clone();
            let (running, paused) = self.seen_on(&name);
            match running.as_slice() {
                [one] => {
                    if placed.as_deref() != Some(one.as_str()) {
                        if let Some(task) = vm.task {
                            self.task_failed(task, &format!("{name} was found on {one}"), now);
                        }
                        let v = self.vms.get_mut(&name).expect("listed above");
                        v.host = Some(one.clone());
                        v.vanished_ms = None;
                        v.starting_cmd = None;
                        self.store_vm(&name);
                        let msg = format!("VM {name} found running on {one}; adopted there");
                        self.event(now, "vm_adopted", Some(&name), Some(one), msg);
                    }
                    let v = self.vms.get_mut(&name).expect("listed above");
                    if v.state != VmState::Running
                        && self.hosts[one].observed.get(&name) == Some(&ObservedState::Running)
                    {
                        v.state = VmState::Running;
                        v.last_error = None;
                        let msg = format!("VM {name} runs on {one}");
                        self.event(now, "vm_running", Some(&name), Some(one), msg);
                    }
                    for p in paused {
                        self.send(
                            &p,
                            &name,
                            CommandBody::Stop { vm: name.clone() },
                            Purpose::Stop,
                            now,
                        );
                    }
                }
                [] => {
                    let vanished = self.vms[&name].vanished_ms;
                    match (&placed, paused.as_slice()) {
                        // Paused on one host and running nowhere, now that everyone has spoken:
                        // the in-doubt source of an earlier term. It resumes.
                        (placed_on, [p])
                            if placed_on.as_ref().is_none_or(|h| h == p)
                                && self.heard_from_all_since(
                                    vanished.unwrap_or(0).max(self.term_start_ms),
                                ) =>
                        {
                            let p = p.clone();
                            let v = self.vms.get_mut(&name).expect("listed above");
                            v.host = Some(p.clone());
                            v.vanished_ms = None;
                            v.state = VmState::Running;
                            self.store_vm(&name);
                            let body = CommandBody::Resume { vm: name.clone() };
                            self.send(&p, &name, body, Purpose::Resume, now);
                            let msg = format!("VM {name} was paused on {p}; resumed there");
                            self.event(now, "vm_resumed", Some(&name), Some(&p), msg);
                        }
                        // Paused copies on other hosts than the placed one are stale (the VM
                        // moved on from them): they never resume, and go when the VM is re-placed.
                        (Some(h), stale) if !stale.contains(h) => {
                            let h = h.clone();
                            let stale = stale.to_vec();
                            let state = self.vms[&name].state;
                            let gone = self.hosts.get(&h).is_some_and(|x| {
                                x.state == HostState::Up && !x.observed.contains_key(&name)
                            }) && self.covers(&h, &name);
                            let exited = self.hosts.get(&h).is_some_and(|x| {
                                x.state == HostState::Up
                                    && x.observed.get(&name) == Some(&ObservedState::Exited)
                            }) && self.covers(&h, &name);
                            if exited && state == VmState::Running {
                                // The agent's restart policy gave up on it.
                                let v = self.vms.get_mut(&name).expect("listed above");
                                v.state = VmState::Failed;
                                v.last_error = Some(format!("its VMM exited on {h}"));
                                let msg = format!("VM {name} exited on {h}");
                                self.event(now, "vm_failed", Some(&name), Some(&h), msg);
                            } else if gone
                                && matches!(
                                    state,
                                    VmState::Running | VmState::Starting | VmState::Migrating
                                )
                            {
                                if let Some(task) = self.vms[&name].task {
                                    self.task_failed(
                                        task,
                                        &format!("{name} vanished from {h}"),
                                        now,
                                    );
                                }
                                let v = self.vms.get_mut(&name).expect("listed above");
                                v.host = None;
                                v.state = VmState::Pending;
                                v.restarts += 1;
                                v.vanished_ms = Some(now);
                                v.last_error = Some(format!("its VMM vanished from {h}"));
                                self.store_vm(&name);
                                let msg = format!("VM {name} vanished from {h}; placing it again");
                                self.event(now, "vm_lost", Some(&name), Some(&h), msg);
                                for p in stale {
                                    let body = CommandBody::Stop { vm: name.clone() };
                                    self.send(&p, &name, body, Purpose::Stop, now);
                                }
                            }
                        }
                        _ => {}
                    }
                }
                many => {
                    // More than one copy: keep the placed one (or the first), stop the rest.
                    let keep = placed
                        .clone()
                        .filter(|p| many.contains(p))
                        .unwrap_or_else(|| many[0].clone());
                    for h in many.iter().filter(|h| **h != keep) {
                        let msg = format!("stopping an extra copy of {name} on {h}");
                        self.event(now, "copy_stopped", Some(&name), Some(h), msg);
                        self.send(
                            h,
                            &name,
                            CommandBody::Stop { vm: name.clone() },
                            Purpose::Stop,
                            now,
                        );
                    }
                }
            }
        }
        // VMs the controller does not know (deleted) are stopped wherever they run.
        let mut strays = Vec::new();
        if let Some(host) = self.hosts.get(reporter)
            && host.state == HostState::Up
        {
            for (vm, st) in &host.observed {
                if !self.vms.contains_key(vm)
                    && !matches!(st, ObservedState::Exited | ObservedState::Absent)
                    && self.covers(reporter, vm)
                {
                    strays.push((reporter.to_string(), vm.clone()));
                }
            }
        }
        for (h, vm) in strays {
            self.send(
                &h,
                &vm,
                CommandBody::Stop { vm: vm.clone() },
                Purpose::Stop,
                now,
            );
        }
    }

    fn reply(&mut self, cmd: u64, seq: u64, reply: CommandReply, now: u64) {
        let Some(p) = self.pending.remove(&cmd) else {
            return;
        };
        // Reports taken before this answer no longer speak for the VM on that host.
        if !p.vm.is_empty() {
            let floor = self
                .seq_floor
                .entry((p.host.clone(), p.vm.clone()))
                .or_insert(0);
            *floor = (*floor).max(seq);
        }
        match reply {
            CommandReply::StaleGeneration { seen } => {
                // Another controller leads: stop acting until re-elected.
                let msg = format!("host {} has seen generation {seen}", p.host);
                self.event(now, "stale_generation", Some(&p.vm), Some(&p.host), msg);
                self.deposed(now);
            }
            CommandReply::Done {
                listen,
                report,
                vm_state,
            } => self.done(cmd, p, listen, report, vm_state, now),
            CommandReply::Failed { error } => self.failed(p, &error, now),
            CommandReply::InDoubt { error } => match p.purpose {
                Purpose::MigrateOut { task } => self.resolve(task, &error, now),
                _ => self.failed(p, &error, now),
            },
            CommandReply::Lost { error } => match p.purpose {
                Purpose::MigrateOut { task } => self.lost_in_post_copy(task, &error, now),
                _ => self.failed(p, &error, now),
            },
        }
    }

    fn send_failed(&mut self, cmd: u64, error: &str, now: u64) {
        if let Some(p) = self.pending.remove(&cmd) {
            // The command may never have arrived: until the agent handles a later one, its
            // reports cannot cover this VM. A ping moves it on (unless one is on its way).
            let host_up = self
                .hosts
                .get(&p.host)
                .is_some_and(|h| h.state == HostState::Up);
            let ping_pending = self
                .pending
                .values()
                .any(|q| q.host == p.host && q.purpose == Purpose::Ping);
            if host_up && !ping_pending {
                self.send(&p.host, "", CommandBody::Ping, Purpose::Ping, now);
            }
            match p.purpose {
                // A lost reply to migrate_out: the migration may have committed.
                Purpose::MigrateOut { task } => self.resolve(task, error, now),
                // A lost reply to start (or to the question after it): the VM may run. It stays
                // `starting` there, and the host is asked what it has.
                Purpose::Start | Purpose::CheckStart => {
                    if let Some(vm) = self.vms.get_mut(&p.vm) {
                        vm.starting_cmd = None;
                    }
                    let placed_there = self
                        .vms
                        .get(&p.vm)
                        .is_some_and(|v| v.host.as_deref() == Some(p.host.as_str()));
                    let host_up = self
                        .hosts
                        .get(&p.host)
                        .is_some_and(|h| h.state == HostState::Up);
                    if placed_there && host_up {
                        let body = CommandBody::Query { vm: p.vm.clone() };
                        self.send(&p.host, &p.vm, body, Purpose::CheckStart, now);
                    }
                }
                _ => self.failed(p, error, now),
            }
        }
    }

    fn done(
        &mut self,
        p_cmd: u64,
        p: Pending,
        listen: Option<String>,
        report: Option<serde_json::Value>,
        vm_state: Option<ObservedState>,
        now: u64,
    ) {
        match p.purpose {
            Purpose::Start => {
                if let Some(vm) = self.vms.get_mut(&p.vm) {
                    vm.starting_cmd = None;
                }
            }
            Purpose::Ping | Purpose::Stop | Purpose::Resume => {}
            Purpose::CheckStart => {
                let absent = matches!(
                    vm_state,
                    None | Some(ObservedState::Absent | ObservedState::Exited)
                );
                if let Some(v) = self.vms.get_mut(&p.vm)
                    && absent
                    && v.host.as_deref() == Some(p.host.as_str())
                    && v.state == VmState::Starting
                {
                    v.host = None;
                    v.state = VmState::Pending;
                    v.vanished_ms = Some(now);
                    v.last_error = Some(format!("its start on {} never arrived", p.host));
                    self.store_vm(&p.vm);
                }
            }
            Purpose::Receive { task } => {
                let live = self
                    .tasks
                    .get(&task)
                    .is_some_and(|t| matches!(t.phase, Phase::Receiving { cmd } if cmd == p_cmd));
                if !live {
                    // The move was called off meanwhile: the receiver goes.
                    let vm = p.vm.clone();
                    self.send(
                        &p.host,
                        &vm,
                        CommandBody::Stop { vm: vm.clone() },
                        Purpose::Stop,
                        now,
                    );
                    return;
                }
                if let Some(t) = self.tasks.get_mut(&task) {
                    t.phase_ended(now);
                }
                let Some(listen) = listen else {
                    self.task_failed(task, "the target gave no listen address", now);
                    return;
                };
                self.migrate_out(task, listen, now);
            }
            Purpose::MigrateOut { task } => self.migration_succeeded(task, report, now),
            Purpose::QuerySource { task } | Purpose::QueryTarget { task } => {
                let Some(t) = self.tasks.get_mut(&task) else {
                    return;
                };
                let said = vm_state.unwrap_or(ObservedState::Absent);
                if let Phase::Resolving { source, target } = &mut t.phase {
                    if matches!(p.purpose, Purpose::QuerySource { .. }) {
                        t.source_says = Some(said);
                        *source = None;
                    } else {
                        t.target_says = Some(said);
                        *target = None;
                    }
                }
                self.settle(task, now);
            }
        }
    }

    fn failed(&mut self, p: Pending, error: &str, now: u64) {
        match p.purpose {
            Purpose::Start => {
                if let Some(vm) = self.vms.get_mut(&p.vm)
                    && vm.host.as_deref() == Some(p.host.as_str())
                {
                    vm.starting_cmd = None;
                    vm.host = None;
                    vm.state = VmState::Pending;
                    vm.retry_at_ms = now + START_RETRY_MS;
                    vm.last_error = Some(format!("start on {} failed: {error}", p.host));
                    self.store_vm(&p.vm);
                    let msg = format!("VM {} did not start on {}: {error}", p.vm, p.host);
                    self.event(now, "start_failed", Some(&p.vm), Some(&p.host), msg);
                }
            }
            Purpose::Ping | Purpose::Stop | Purpose::Resume | Purpose::CheckStart => {}
            // A receiver may have started even though its answer was lost: task_failed stops it.
            Purpose::Receive { task } => {
                self.task_failed(task, &format!("the target could not receive: {error}"), now)
            }
            // The source keeps the VM running; the target drops what it received.
            Purpose::MigrateOut { task } => {
                self.task_failed(task, &format!("migration failed: {error}"), now);
            }
            Purpose::QuerySource { task } | Purpose::QueryTarget { task } => {
                if let Some(t) = self.tasks.get_mut(&task)
                    && let Phase::Resolving { source, target } = &mut t.phase
                {
                    if matches!(p.purpose, Purpose::QuerySource { .. }) {
                        *source = None;
                    } else {
                        *target = None;
                    }
                }
            }
        }
    }

    fn fenced(&mut self, host: &str, result: Result<u32, String>, now: u64) {
        let Some(h) = self.hosts.get_mut(host) else {
            return;
        };
        if h.state != HostState::Lost || !h.fence_requested {
            return;
        }
        match result {
            Err(e) => {
                // Try again on a later tick.
                h.fence_requested = false;
                let msg = format!("fencing {host}'s disk leases failed: {e}");
                self.event(now, "fence_failed", None, Some(host), msg);
            }
            Ok(n) => {
                h.state = HostState::Fenced;
                self.counters.hosts_fenced += 1;
                let msg = format!("{n} disk lease(s) of {host} fenced");
                self.event(now, "leases_fenced", None, Some(host), msg);
                let mut lost: Vec<(u32, String)> = self
                    .vms
                    .iter()
                    .filter(|(_, vm)| vm.host.as_deref() == Some(host))
                    .map(|(n, vm)| (vm.spec.restart_priority, n.clone()))
                    .collect();
                lost.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                for (_, name) in lost {
                    // A VM leaving this host after `migrate_out` was sent may already run on the
                    // target: ask the target before anything restarts it.
                    let committing = self.vms.get(&name).and_then(|v| v.task).filter(|t| {
                        self.tasks.get(t).is_some_and(|t| {
                            matches!(t.phase, Phase::Sending { .. } | Phase::Resolving { .. })
                        })
                    });
                    if let Some(task) = committing {
                        if let Some(t) = self.tasks.get_mut(&task) {
                            t.source_says = Some(ObservedState::Absent);
                        }
                        self.resolve(task, &format!("the source {host} was lost"), now);
                        continue;
                    }
                    if let Some(task) = self.vms.get(&name).and_then(|v| v.task) {
                        self.task_failed(task, &format!("host {host} was lost"), now);
                    }
                    if let Some(vm) = self.vms.get_mut(&name) {
                        vm.host = None;
                        vm.starting_cmd = None;
                        vm.retry_at_ms = 0;
                        vm.vanished_ms = Some(now);
                        if vm.run {
                            vm.state = VmState::Pending;
                            vm.restarts += 1;
                            vm.last_error = Some(format!("host {host} was lost"));
                        }
                    }
                    self.store_vm(&name);
                }
                // Migrations towards this host that had not committed: the VM stays where it is.
                let towards: Vec<u64> = self
                    .tasks
                    .iter()
                    .filter(|(_, t)| {
                        t.info.to.as_deref() == Some(host)
                            && matches!(t.phase, Phase::Queued | Phase::Receiving { .. })
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for task in towards {
                    self.task_failed(task, &format!("the target {host} was lost"), now);
                }
                // Re-registered while being fenced: back in service, empty.
                if let Some(h) = self.hosts.get_mut(host)
                    && h.registered
                {
                    h.state = HostState::Up;
                    h.lost_at_ms = None;
                    h.fence_requested = false;
                    let msg = format!("host {host} is back");
                    self.event(now, "host_up", None, Some(host), msg);
                }
            }
        }
    }

    // ----- the API -----

    fn leading(&self) -> Result<u64, ApiError> {
        self.generation.ok_or(ApiError::NotLeader)
    }

    /// Whether this term's leader has heard every host's report, so its picture of where VMs run
    /// is complete: it places and moves nothing before that.
    pub fn ready(&self) -> bool {
        self.generation.is_some() && self.heard_from_all_since(self.term_start_ms)
    }

    fn leading_and_ready(&self) -> Result<u64, ApiError> {
        let g = self.leading()?;
        if !self.ready() {
            return Err(ApiError::NotReady);
        }
        Ok(g)
    }

    /// `POST /v1/vms`: validates, places and starts a VM. Nothing is created on error.
    pub fn create_vm(&mut self, spec: VmCreate, now_ms: u64) -> Result<VmInfo, ApiError> {
        self.leading()?;
        spec.validate()?;
        self.leading_and_ready()?;
        spec.validate()?;
        if self.vms.contains_key(&spec.name) {
            return Err(ApiError::Exists(spec.name));
        }
        if let Some(pin) = &spec.host {
            if !self.hosts.contains_key(pin) {
                return Err(ApiError::UnknownHost(pin.clone()));
            }
            self.not_held(pin)?;
        }
        let host = match self.choose_host(&spec, None, true) {
            Placement::Host(h) => h,
            Placement::None(why) => return Err(ApiError::NoHostFits(why)),
        };
        let name = spec.name.clone();
        self.vms.insert(
            name.clone(),
            Vm {
                spec,
                host: None,
                state: VmState::Pending,
                run: true,
                restarts: 0,
                last_error: None,
                task: None,
                starting_cmd: None,
                retry_at_ms: 0,
                vanished_ms: None,
            },
        );
        self.start_on(&name, &host, now_ms);
        self.reconcile(now_ms);
        self.vm(&name)
    }

    /// `DELETE /v1/vms/{name}`: stops the VM and forgets it.
    pub fn delete_vm(&mut self, name: &str, now_ms: u64) -> Result<(), ApiError> {
        self.leading()?;
        let vm = self
            .vms
            .get(name)
            .ok_or_else(|| ApiError::UnknownVm(name.into()))?;
        if vm.task.is_some() {
            return Err(ApiError::Conflict {
                vm: name.into(),
                state: vm.state,
                why: "wait for its migration to end".into(),
            });
        }
        if let Some(host) = vm.host.clone() {
            // It is forgotten once its host confirms it stopped; until then it still holds its
            // place (room and rules) on that host, and a new leader finds it being deleted.
            if let Some(v) = self.vms.get_mut(name) {
                v.run = false;
                v.state = VmState::Stopped;
            }
            self.store_vm(name);
            let body = CommandBody::Stop { vm: name.into() };
            self.send(&host, name, body, Purpose::Stop, now_ms);
            let msg = format!("VM {name} is being deleted: stopping it on {host}");
            self.event(now_ms, "vm_deleting", Some(name), Some(&host), msg);
            return Ok(());
        }
        self.forget(name, now_ms);
        Ok(())
    }

    /// Drops a VM for good (deleted, and stopped or never placed).
    fn forget(&mut self, name: &str, now: u64) {
        self.vms.remove(name);
        self.outbox.push(Action::StoreVm {
            name: name.into(),
            record: None,
        });
        self.event(
            now,
            "vm_deleted",
            Some(name),
            None,
            format!("VM {name} deleted"),
        );
    }

    /// `POST /v1/vms/{name}/migrate`: queues a pre-copy live migration (to `to`, or where
    /// placement says); [`Controller::migrate_vm_with`] with no post-copy.
    pub fn migrate_vm(
        &mut self,
        name: &str,
        to: Option<&str>,
        now_ms: u64,
    ) -> Result<TaskRef, ApiError> {
        self.migrate_vm_with(name, to, None, now_ms)
    }

    /// `POST /v1/vms/{name}/migrate`: queues a live migration (to `to`, or where placement says)
    /// that switches to post-copy after `post_copy_after` pre-copy rounds if given
    /// ([`tern_api::cluster::POST_COPY_AFTER_RANGE`]; out of it: 400, nothing queued). After the
    /// switch a lost link loses the VM; the agent reports it `lost` and the VM is placed again
    /// from its disk ("Lost in post-copy", docs/cluster.md).
    pub fn migrate_vm_with(
        &mut self,
        name: &str,
        to: Option<&str>,
        post_copy_after: Option<u32>,
        now_ms: u64,
    ) -> Result<TaskRef, ApiError> {
        tern_api::cluster::MigrateRequest {
            to: to.map(str::to_string),
            post_copy_after,
        }
        .validate()?;
        self.leading_and_ready()?;
        let vm = self
            .vms
            .get(name)
            .ok_or_else(|| ApiError::UnknownVm(name.into()))?;
        if vm.state != VmState::Running || vm.task.is_some() {
            return Err(ApiError::Conflict {
                vm: name.into(),
                state: vm.state,
                why: "only a running VM that is not already moving can be migrated".into(),
            });
        }
        let from = vm.host.clone().unwrap_or_default();
        let spec = vm.spec.clone();
        let target = match to {
            Some(t) => {
                let h = self
                    .hosts
                    .get(t)
                    .ok_or_else(|| ApiError::UnknownHost(t.into()))?;
                if t == from {
                    return Err(ApiError::Conflict {
                        vm: name.into(),
                        state: VmState::Running,
                        why: format!("it already runs on {t}"),
                    });
                }
                self.not_held(t)?;
                if h.state != HostState::Up || h.maintenance {
                    return Err(ApiError::NoHostFits(format!(
                        "host {t} is not up or is in maintenance"
                    )));
                }
                match self.check_fit(&spec, t) {
                    Ok(()) => t.to_string(),
                    Err(why) => return Err(ApiError::NoHostFits(why)),
                }
            }
            None => match self.choose_host(&spec, Some(&from), false) {
                Placement::Host(h) => h,
                Placement::None(why) => return Err(ApiError::NoHostFits(why)),
            },
        };
        let task = self.new_migration(name, &from, &target, TaskKind::Migrate, now_ms);
        if let Some(t) = self.tasks.get_mut(&task) {
            t.post_copy_after = post_copy_after;
        }
        self.reconcile(now_ms);
        Ok(TaskRef { task })
    }

    /// `POST /v1/hosts/{name}/maintenance`: enter (empty the host live) or leave maintenance.
    pub fn set_maintenance(
        &mut self,
        host: &str,
        enter: bool,
        now_ms: u64,
    ) -> Result<Option<TaskRef>, ApiError> {
        self.leading()?;
        let h = self
            .hosts
            .get_mut(host)
            .ok_or_else(|| ApiError::UnknownHost(host.into()))?;
        if h.maintenance == enter {
            return Ok(None);
        }
        h.maintenance = enter;
        self.outbox.push(Action::StoreMaintenance {
            host: host.into(),
            on: enter,
        });
        if !enter {
            let msg = format!("host {host} left maintenance");
            self.event(now_ms, "maintenance_off", None, Some(host), msg);
            return Ok(None);
        }
        let id = self.next_task;
        self.next_task += 1;
        self.tasks.insert(
            id,
            Task::new(TaskInfo {
                id,
                kind: TaskKind::Maintenance,
                vm: None,
                from: Some(host.into()),
                to: None,
                state: TaskState::Running,
                created_ms: now_ms,
                finished_ms: None,
                error: None,
                report: None,
                phases: None,
            }),
        );
        let msg = format!("host {host} entered maintenance; moving its VMs away");
        self.event(now_ms, "maintenance_on", None, Some(host), msg);
        self.reconcile(now_ms);
        Ok(Some(TaskRef { task: id }))
    }

    /// `GET /v1/hosts`.
    pub fn hosts(&self) -> Vec<HostInfo> {
        self.hosts
            .keys()
            .filter_map(|h| self.host(h).ok())
            .collect()
    }

    /// `GET /v1/hosts/{name}`.
    pub fn host(&self, name: &str) -> Result<HostInfo, ApiError> {
        let h = self
            .hosts
            .get(name)
            .ok_or_else(|| ApiError::UnknownHost(name.into()))?;
        let placed: Vec<&Vm> = self
            .vms
            .values()
            .filter(|v| v.host.as_deref() == Some(name))
            .collect();
        Ok(HostInfo {
            name: name.into(),
            state: h.state,
            maintenance: h.maintenance,
            capacity: h.record.capacity.clone(),
            agent_url: h.record.agent_url.clone(),
            vms: placed.iter().map(|v| v.spec.name.clone()).collect(),
            vcpus_used: placed.iter().map(|v| v.spec.vcpus).sum(),
            memory_mib_used: placed.iter().map(|v| v.spec.memory_mib).sum(),
            cpu_utilization: h.cpu,
            power: self.power_holds.get(name).copied().unwrap_or_default(),
            parked_cores: h.parked,
        })
    }

    /// `GET /v1/vms`.
    pub fn vms(&self) -> Vec<VmInfo> {
        self.vms.keys().filter_map(|v| self.vm(v).ok()).collect()
    }

    /// `GET /v1/vms/{name}`.
    pub fn vm(&self, name: &str) -> Result<VmInfo, ApiError> {
        let vm = self
            .vms
            .get(name)
            .ok_or_else(|| ApiError::UnknownVm(name.into()))?;
        Ok(VmInfo {
            name: name.into(),
            host: vm.host.clone(),
            state: vm.state,
            spec: vm.spec.clone(),
            restarts: vm.restarts,
            last_error: vm.last_error.clone(),
        })
    }

    /// `GET /v1/tasks/{id}`.
    pub fn task(&self, id: u64) -> Result<TaskInfo, ApiError> {
        self.tasks
            .get(&id)
            .map(|t| t.info.clone())
            .ok_or(ApiError::UnknownTask(id))
    }

    /// `GET /v1/tasks`: every task kept, oldest first; with `active`, only queued and running ones.
    pub fn tasks(&self, active: bool) -> Vec<TaskInfo> {
        self.tasks
            .values()
            .filter(|t| !active || matches!(t.info.state, TaskState::Queued | TaskState::Running))
            .map(|t| t.info.clone())
            .collect()
    }

    /// `GET /v1/events`: events after `since` (0 for all kept), oldest first.
    pub fn events(&self, since: u64) -> Vec<EventInfo> {
        self.events
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect()
    }

    /// What the controller holds about a host's reports, for a failing test's message.
    pub fn debug_host(&self, name: &str) -> String {
        match self.hosts.get(name) {
            None => format!("{name}: unknown"),
            Some(h) => format!(
                "{name}: {:?} lease {} report_ms {:?} cmd {} seq {} observed {:?}",
                h.state, h.record.lease, h.report_ms, h.report_cmd_id, h.report_seq, h.observed
            ),
        }
    }

    /// The VMs and where the controller believes each runs (for invariant checks).
    pub fn placements(&self) -> BTreeMap<String, (Option<String>, VmState)> {
        self.vms
            .iter()
            .map(|(n, v)| (n.clone(), (v.host.clone(), v.state)))
            .collect()
    }

    /// The automation's power holds: `holds` names every host it is powering off (or whose
    /// power-off is in doubt) and every host it powered off, replacing the previous set (entries
    /// in another power state are ignored). A held host takes no VM: placement (new VMs, HA
    /// restarts, maintenance moves, migrations without a target) leaves it out, a migration
    /// queued to it fails when it would begin, and an operator's call that names it (a pin, a
    /// migration's target) is refused with [`ApiError::HostPowerHeld`]. Each change is an
    /// event. Nothing is sent: VMs waiting for a host are placed at the next input.
    pub fn set_power_holds(&mut self, holds: BTreeMap<String, HostPower>, now_ms: u64) {
        let holds: BTreeMap<String, HostPower> = holds
            .into_iter()
            .filter(|(_, p)| matches!(p, HostPower::PoweringOff | HostPower::Off))
            .collect();
        if holds == self.power_holds {
            return;
        }
        let old = std::mem::replace(&mut self.power_holds, holds);
        let hosts: BTreeSet<String> = old.keys().chain(self.power_holds.keys()).cloned().collect();
        for host in hosts {
            let (was, is) = (old.get(&host), self.power_holds.get(&host).copied());
            if was == is.as_ref() {
                continue;
            }
            let msg = match is {
                Some(p) => format!("host {host} is {}: it takes no VMs", held_why(&p)),
                None => format!("host {host} takes VMs again: the automation's power hold ended"),
            };
            self.event(now_ms, "host_power", None, Some(&host), msg);
        }
    }

    /// The hosts the automation holds out of placement, with their power state.
    pub fn power_holds(&self) -> &BTreeMap<String, HostPower> {
        &self.power_holds
    }

    /// The names of the hosts known, in order.
    pub fn host_names(&self) -> impl Iterator<Item = &str> {
        self.hosts.keys().map(String::as_str)
    }

    /// The VMs placed on `host` or on their way to it (a migration not yet ended), by name: what
    /// must be gone before the host is powered off. A stopped or failed VM that still names the
    /// host runs nothing there and is not one (the automation's loop does not see those VMs
    /// either, so it would find the host empty and propose its power-off again and again).
    pub fn occupants(&self, host: &str) -> Vec<String> {
        let mut vms: BTreeSet<String> = self
            .vms
            .iter()
            .filter(|(_, v)| {
                v.host.as_deref() == Some(host)
                    && !matches!(v.state, VmState::Stopped | VmState::Failed)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for t in self.tasks.values() {
            if !matches!(t.phase, Phase::Done)
                && t.info.kind == TaskKind::Migrate
                && t.info.to.as_deref() == Some(host)
                && let Some(vm) = &t.info.vm
            {
                vms.insert(vm.clone());
            }
        }
        vms.into_iter().collect()
    }

    /// `Ok` unless the automation holds `host` out of placement.
    fn not_held(&self, host: &str) -> Result<(), ApiError> {
        match self.power_holds.get(host) {
            Some(&power) => Err(ApiError::HostPowerHeld {
                host: host.into(),
                power,
            }),
            None => Ok(()),
        }
    }

    // ----- reconciliation -----

    fn reconcile(&mut self, now: u64) {
        if self.generation.is_none() {
            return;
        }
        self.expire_commands(now);
        self.fence_lost_hosts(now);
        if !self.ready() {
            // Until every host has reported in this term, nothing is placed or moved.
            return;
        }
        self.place_pending(now);
        self.drain_maintenance(now);
        self.start_queued_migrations(now);
        self.retry_resolving(now);
    }

    fn expire_commands(&mut self, now: u64) {
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_sub(p.sent_ms) >= self.cfg.command_timeout_ms)
            .map(|(c, _)| *c)
            .collect();
        for cmd in late {
            self.send_failed(cmd, "no reply in time", now);
        }
    }

    fn fence_lost_hosts(&mut self, now: u64) {
        let margin = self.cfg.fence_margin_ms;
        let timeout = self.cfg.command_timeout_ms;
        let due: Vec<(String, Option<u32>)> = self
            .hosts
            .iter_mut()
            .filter(|(_, h)| {
                h.state == HostState::Lost
                    && (!h.fence_requested || now.saturating_sub(h.fence_asked_ms) >= timeout)
            })
            .filter_map(|(name, h)| {
                let lost = h.lost_at_ms?;
                Some((name, h, lost))
            })
            .filter(|(_, _, lost)| self_fence_passed(*lost, margin, now))
            .map(|(name, h, _)| {
                h.fence_requested = true;
                h.fence_asked_ms = now;
                (name.clone(), h.record.capacity.volume_node_id)
            })
            .collect();
        for (host, volume_node_id) in due {
            self.outbox.push(Action::FenceLeases {
                host,
                volume_node_id,
            });
        }
    }

    fn place_pending(&mut self, now: u64) {
        let mut pending: Vec<(u32, String)> = self
            .vms
            .iter()
            .filter(|(name, v)| {
                v.run
                    && v.host.is_none()
                    && v.state == VmState::Pending
                    && now >= v.retry_at_ms
                    && v.vanished_ms.is_none_or(|t| {
                        self.heard_from_all_since(t) && self.seen_on(name) == (vec![], vec![])
                    })
            })
            .map(|(n, v)| (v.spec.restart_priority, n.clone()))
            .collect();
        pending.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, name) in pending {
            let spec = self.vms[&name].spec.clone();
            match self.choose_host(&spec, None, false) {
                Placement::Host(h) => {
                    if let Some(v) = self.vms.get_mut(&name) {
                        v.vanished_ms = None;
                    }
                    let restarted = self.vms[&name].restarts > 0;
                    if restarted {
                        self.counters.ha_restarts += 1;
                    }
                    self.start_on(&name, &h, now);
                }
                Placement::None(why) => {
                    if let Some(vm) = self.vms.get_mut(&name)
                        && vm.last_error.as_deref() != Some(why.as_str())
                    {
                        vm.last_error = Some(why.clone());
                        let msg = format!("VM {name} waits: {why}");
                        self.event(now, "vm_waiting", Some(&name), None, msg);
                    }
                }
            }
        }
    }

    fn drain_maintenance(&mut self, now: u64) {
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.maintenance && h.state == HostState::Up)
            .map(|(n, _)| n.clone())
            .collect();
        for host in hosts {
            let to_move: Vec<String> = self
                .vms
                .iter()
                .filter(|(_, v)| {
                    v.host.as_deref() == Some(host.as_str())
                        && v.task.is_none()
                        && v.state == VmState::Running
                        && now >= v.retry_at_ms
                })
                .map(|(n, _)| n.clone())
                .collect();
            for name in to_move {
                let spec = self.vms[&name].spec.clone();
                if spec.host.as_deref() == Some(host.as_str()) {
                    continue; // pinned: it stays (reported by the maintenance task)
                }
                if let Placement::Host(target) = self.choose_host(&spec, Some(&host), false) {
                    self.new_migration(&name, &host, &target, TaskKind::Migrate, now);
                }
            }
            // The maintenance task succeeds once nothing but pinned VMs is left.
            let left: Vec<String> = self
                .vms
                .iter()
                .filter(|(_, v)| v.host.as_deref() == Some(host.as_str()))
                .map(|(n, _)| n.clone())
                .collect();
            let only_pinned = left
                .iter()
                .all(|n| self.vms[n].spec.host.as_deref() == Some(&host));
            let open: Vec<u64> = self
                .tasks
                .iter()
                .filter(|(_, t)| {
                    t.info.kind == TaskKind::Maintenance
                        && t.info.state == TaskState::Running
                        && t.info.from.as_deref() == Some(host.as_str())
                })
                .map(|(id, _)| *id)
                .collect();
            if only_pinned {
                for id in open {
                    if let Some(t) = self.tasks.get_mut(&id) {
                        t.info.state = TaskState::Succeeded;
                        t.info.finished_ms = Some(now);
                        t.phase = Phase::Done;
                        if !left.is_empty() {
                            t.info.error = Some(format!("pinned VMs stay: {}", left.join(", ")));
                        }
                    }
                    let msg = format!("host {host} is empty");
                    self.event(now, "maintenance_done", None, Some(&host), msg);
                }
            }
        }
    }

    fn start_queued_migrations(&mut self, now: u64) {
        let queued: Vec<u64> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.phase == Phase::Queued && t.info.kind == TaskKind::Migrate)
            .map(|(id, _)| *id)
            .collect();
        for id in queued {
            let (from, to, vm) = {
                let t = &self.tasks[&id].info;
                (
                    t.from.clone().unwrap_or_default(),
                    t.to.clone().unwrap_or_default(),
                    t.vm.clone().unwrap_or_default(),
                )
            };
            let active = self.active_migrations();
            let touching = |h: &str| active.iter().filter(|(f, t)| f == h || t == h).count();
            if active.len() >= self.cfg.max_migrations
                || touching(&from) >= self.cfg.max_migrations_per_host
                || touching(&to) >= self.cfg.max_migrations_per_host
            {
                continue;
            }
            // Both ends must be in service when the move begins.
            let target_up = [&to, &from]
                .iter()
                .all(|h| self.hosts.get(*h).is_some_and(|h| h.state == HostState::Up));
            let still_there = self.vms.get(&vm).is_some_and(|v| {
                v.host.as_deref() == Some(from.as_str()) && v.state == VmState::Running
            });
            if !target_up || !still_there {
                self.task_failed(
                    id,
                    "the VM or the target changed before the move began",
                    now,
                );
                continue;
            }
            if let Err(e) = self.not_held(&to) {
                self.task_failed(id, &format!("before the move began: {e}"), now);
                continue;
            }
            let Some(v) = self.vms.get_mut(&vm) else {
                continue;
            };
            v.state = VmState::Migrating;
            let body = CommandBody::Receive {
                spec: v.spec.clone(),
                disk_url: self.disk_url(&vm, &to),
            };
            let cmd = self.send(&to, &vm, body, Purpose::Receive { task: id }, now);
            if let Some(t) = self.tasks.get_mut(&id) {
                t.phase = Phase::Receiving { cmd };
                t.info.state = TaskState::Running;
                t.receive_sent_ms = Some(now);
                t.info.phases = Some(TaskPhases {
                    queued_ms: Some(now.saturating_sub(t.info.created_ms)),
                    ..TaskPhases::default()
                });
            }
            let msg = format!("moving {vm} from {from} to {to}");
            self.event(now, "migration_started", Some(&vm), Some(&from), msg);
        }
    }

    fn retry_resolving(&mut self, now: u64) {
        let ids: Vec<u64> = self
            .tasks
            .iter()
            .filter(|(_, t)| {
                matches!(
                    t.phase,
                    Phase::Resolving {
                        source: None,
                        target: None
                    }
                ) && now.saturating_sub(t.asked_ms) >= START_RETRY_MS
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.ask_both(id, now);
        }
    }

    // ----- migrations -----

    fn active_migrations(&self) -> Vec<(String, String)> {
        self.tasks
            .values()
            .filter(|t| {
                t.info.kind == TaskKind::Migrate && !matches!(t.phase, Phase::Queued | Phase::Done)
            })
            .map(|t| {
                (
                    t.info.from.clone().unwrap_or_default(),
                    t.info.to.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    fn new_migration(&mut self, vm: &str, from: &str, to: &str, kind: TaskKind, now: u64) -> u64 {
        let id = self.next_task;
        self.next_task += 1;
        self.tasks.insert(
            id,
            Task::new(TaskInfo {
                id,
                kind,
                vm: Some(vm.into()),
                from: Some(from.into()),
                to: Some(to.into()),
                state: TaskState::Queued,
                created_ms: now,
                finished_ms: None,
                error: None,
                report: None,
                phases: None,
            }),
        );
        if let Some(v) = self.vms.get_mut(vm) {
            v.task = Some(id);
        }
        id
    }

    fn migrate_out(&mut self, task: u64, listen: String, now: u64) {
        let Some(t) = self.tasks.get(&task) else {
            return;
        };
        let (vm, from, to) = t.ends();
        let post_copy_after = t.post_copy_after;
        let disk_successor = self
            .vms
            .get(&vm)
            .and_then(|v| v.spec.disk.as_ref())
            .and_then(|_| self.hosts.get(&to))
            .and_then(|h| h.record.capacity.volume_node_id);
        let body = CommandBody::MigrateOut {
            vm: vm.clone(),
            to: listen,
            disk_successor,
            post_copy_after,
        };
        let cmd = self.send(&from, &vm, body, Purpose::MigrateOut { task }, now);
        if let Some(t) = self.tasks.get_mut(&task) {
            t.phase = Phase::Sending { cmd };
            t.migrate_sent_ms = Some(now);
        }
    }

    fn migration_succeeded(&mut self, task: u64, report: Option<serde_json::Value>, now: u64) {
        let Some(t) = self.tasks.get_mut(&task) else {
            return;
        };
        if t.phase == Phase::Done {
            return;
        }
        t.phase_ended(now);
        t.phase = Phase::Done;
        t.info.state = TaskState::Succeeded;
        t.info.finished_ms = Some(now);
        t.info.report = report;
        let (vm, from, to) = t.ends();
        self.counters.migrations_succeeded += 1;
        let target_up = self
            .hosts
            .get(&to)
            .is_some_and(|h| h.state == HostState::Up);
        if let Some(v) = self.vms.get_mut(&vm)
            && v.task == Some(task)
        {
            v.task = None;
            if target_up {
                v.host = Some(to.clone());
                v.state = VmState::Running;
            } else {
                // It moved to a host lost since: placed again.
                v.host = None;
                v.state = VmState::Pending;
                v.last_error = Some(format!("moved to {to}, which was lost"));
            }
        }
        self.store_vm(&vm);
        let msg = format!("{vm} moved from {from} to {to}");
        self.event(now, "migration_done", Some(&vm), Some(&to), msg);
    }

    fn task_failed(&mut self, task: u64, error: &str, now: u64) {
        let Some(t) = self.tasks.get_mut(&task) else {
            return;
        };
        if t.phase == Phase::Done {
            return;
        }
        let was_started = t.phase != Phase::Queued;
        if was_started {
            t.phase_ended(now);
        }
        // A receiver may be waiting on the target: stop it (not after an in-doubt settlement,
        // which decides the target's fate itself).
        let stop_target = matches!(t.phase, Phase::Receiving { .. } | Phase::Sending { .. });
        t.phase = Phase::Done;
        t.info.state = TaskState::Failed;
        t.info.finished_ms = Some(now);
        t.info.error = Some(error.into());
        let vm = t.info.vm.clone().unwrap_or_default();
        let target = t.info.to.clone().unwrap_or_default();
        if was_started {
            self.counters.migrations_failed += 1;
        }
        if stop_target
            && self
                .hosts
                .get(&target)
                .is_some_and(|h| h.state == HostState::Up)
        {
            let body = CommandBody::Stop { vm: vm.clone() };
            self.send(&target, &vm, body, Purpose::Stop, now);
        }
        if let Some(v) = self.vms.get_mut(&vm)
            && v.task == Some(task)
        {
            v.task = None;
            v.retry_at_ms = now + START_RETRY_MS;
            if v.state == VmState::Migrating {
                v.state = VmState::Running;
            }
        }
        let msg = format!("moving {vm} failed: {error}");
        self.event(now, "migration_failed", Some(&vm), None, msg);
    }

    /// A post-copy migration that failed after the switch: no copy runs (the target stopped the
    /// guest, the source's stays paused and refuses to run), so nothing is in doubt. The task
    /// fails, both copies are stopped, and the VM is placed again to start from its disk, as
    /// after a host failure.
    fn lost_in_post_copy(&mut self, task: u64, error: &str, now: u64) {
        let Some(t) = self.tasks.get(&task) else {
            return;
        };
        if !matches!(t.phase, Phase::Sending { .. }) {
            return;
        }
        let (vm, from, _) = t.ends();
        // Stops the target's copy (the task was sending).
        self.task_failed(task, &format!("lost in post-copy: {error}"), now);
        if self
            .hosts
            .get(&from)
            .is_some_and(|h| h.state == HostState::Up)
        {
            let body = CommandBody::Stop { vm: vm.clone() };
            self.send(&from, &vm, body, Purpose::Stop, now);
        }
        if let Some(v) = self.vms.get_mut(&vm)
            && v.host.as_deref() == Some(from.as_str())
        {
            v.host = None;
            v.state = VmState::Pending;
            v.last_error = Some(format!(
                "lost in a post-copy migration from {from}: {error}"
            ));
            self.store_vm(&vm);
        }
        let msg = format!("{vm} was lost in post-copy ({error}); it starts again from its disk");
        self.event(now, "migration_lost", Some(&vm), Some(&from), msg);
    }

    /// A migration with no answer to its commit: ask both sides.
    fn resolve(&mut self, task: u64, error: &str, now: u64) {
        if !self
            .tasks
            .get(&task)
            .is_some_and(|t| matches!(t.phase, Phase::Sending { .. } | Phase::Resolving { .. }))
        {
            return;
        }
        if let Some(t) = self.tasks.get_mut(&task) {
            t.phase = Phase::Resolving {
                source: None,
                target: None,
            };
            t.info.error = Some(format!("in doubt: {error}"));
        }
        let vm = self.tasks.get(&task).and_then(|t| t.info.vm.clone());
        if let Some(vm) = vm {
            let msg = format!("moving {vm} is in doubt ({error}); asking both hosts");
            self.event(now, "migration_in_doubt", Some(&vm), None, msg);
        }
        self.ask_both(task, now);
    }

    fn ask_both(&mut self, task: u64, now: u64) {
        let Some(t) = self.tasks.get(&task) else {
            return;
        };
        let (vm, from, to) = t.ends();
        let up = |h: &str| self.hosts.get(h).is_some_and(|x| x.state == HostState::Up);
        let (from_up, to_up) = (up(&from), up(&to));
        let source = from_up.then(|| {
            let body = CommandBody::Query { vm: vm.clone() };
            self.send(&from, &vm, body, Purpose::QuerySource { task }, now)
        });
        let target = to_up.then(|| {
            let body = CommandBody::Query { vm: vm.clone() };
            self.send(&to, &vm, body, Purpose::QueryTarget { task }, now)
        });
        if let Some(t) = self.tasks.get_mut(&task) {
            t.phase = Phase::Resolving { source, target };
            t.asked_ms = now;
        }
    }

    /// Settles an in-doubt migration once the answers allow it.
    fn settle(&mut self, task: u64, now: u64) {
        let Some(t) = self.tasks.get(&task) else {
            return;
        };
        if !matches!(t.phase, Phase::Resolving { .. }) {
            return;
        }
        let owner = t.info.vm.clone().unwrap_or_default();
        if self.vms.get(&owner).is_none_or(|v| v.task != Some(task)) {
            self.task_failed(task, "the VM was settled otherwise", now);
            return;
        }
        let (vm, from, to) = t.ends();
        match (t.source_says, t.target_says) {
            // The target runs it: the move happened. The paused source copy is stopped.
            (_, Some(ObservedState::Running)) => {
                if t.source_says
                    .is_some_and(|s| s != ObservedState::Absent && s != ObservedState::Exited)
                {
                    self.send(
                        &from,
                        &vm,
                        CommandBody::Stop { vm: vm.clone() },
                        Purpose::Stop,
                        now,
                    );
                }
                self.migration_succeeded(task, None, now);
            }
            // The target has no running copy and will not get one: the source resumes.
            (Some(s), Some(target))
                if target != ObservedState::Running
                    && matches!(s, ObservedState::Paused | ObservedState::Running) =>
            {
                if target != ObservedState::Absent && target != ObservedState::Exited {
                    self.send(
                        &to,
                        &vm,
                        CommandBody::Stop { vm: vm.clone() },
                        Purpose::Stop,
                        now,
                    );
                }
                if s == ObservedState::Paused {
                    let body = CommandBody::Resume { vm: vm.clone() };
                    self.send(&from, &vm, body, Purpose::Resume, now);
                }
                self.task_failed(
                    task,
                    "the target did not take over; the source resumes",
                    now,
                );
            }
            // Neither runs it (both gone): it is lost, and placed again.
            (Some(s), Some(target))
                if !matches!(s, ObservedState::Paused | ObservedState::Running)
                    && target != ObservedState::Running =>
            {
                if target != ObservedState::Absent && target != ObservedState::Exited {
                    self.send(
                        &to,
                        &vm,
                        CommandBody::Stop { vm: vm.clone() },
                        Purpose::Stop,
                        now,
                    );
                }
                self.task_failed(task, "neither host runs the VM", now);
                if let Some(v) = self.vms.get_mut(&vm) {
                    v.host = None;
                    v.state = VmState::Pending;
                    v.last_error = Some("lost during an in-doubt migration".into());
                }
                self.store_vm(&vm);
            }
            // Wait for the other answer (or ask again on the next tick).
            _ => {}
        }
    }

    // ----- helpers -----

    fn start_on(&mut self, name: &str, host: &str, now: u64) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        vm.host = Some(host.into());
        vm.state = VmState::Starting;
        let spec = vm.spec.clone();
        // The placement is stored before the command goes: a leader that cannot store it (it was
        // deposed) must not send it, and the next leader finds the VM where it may run.
        self.store_vm(name);
        let body = CommandBody::Start {
            spec,
            disk_url: self.disk_url(name, host),
        };
        let cmd = self.send(host, name, body, Purpose::Start, now);
        if let Some(vm) = self.vms.get_mut(name) {
            vm.starting_cmd = Some(cmd);
        }
        let msg = format!("VM {name} placed on {host}");
        self.event(now, "vm_placed", Some(name), Some(host), msg);
    }

    /// The disk URL a VMM on `host` opens for VM `name` (`volume://NODE/FILE`), if it has a disk.
    fn disk_url(&self, name: &str, host: &str) -> Option<String> {
        let file = self.vms.get(name)?.spec.disk.clone()?;
        let node = self.hosts.get(host)?.record.capacity.volume_node.clone()?;
        Some(format!("volume://{node}/{file}"))
    }

    fn send(&mut self, host: &str, vm: &str, body: CommandBody, purpose: Purpose, now: u64) -> u64 {
        let id = self.next_cmd;
        self.next_cmd += 1;
        let Some(generation) = self.generation else {
            return id;
        };
        let agent_url = self
            .hosts
            .get(host)
            .map(|h| h.record.agent_url.clone())
            .unwrap_or_default();
        self.pending.insert(
            id,
            Pending {
                host: host.into(),
                vm: vm.into(),
                sent_ms: now,
                purpose,
            },
        );
        if !vm.is_empty() {
            self.last_cmd.insert((host.to_string(), vm.to_string()), id);
        }
        let host_lease = self.hosts.get(host).map_or(0, |h| h.record.lease);
        self.outbox.push(Action::Send {
            host: host.into(),
            agent_url,
            command: Command {
                generation,
                id,
                host_lease,
                body,
            },
        });
        id
    }

    fn store_vm(&mut self, name: &str) {
        let record = self.vms.get(name).map(|v| VmRecord {
            spec: v.spec.clone(),
            host: v.host.clone(),
            run: v.run,
        });
        self.outbox.push(Action::StoreVm {
            name: name.into(),
            record,
        });
    }

    fn event(
        &mut self,
        now: u64,
        kind: &str,
        vm: Option<&str>,
        host: Option<&str>,
        message: String,
    ) {
        self.events.push_back(EventInfo {
            seq: self.next_event,
            at_ms: now,
            kind: kind.into(),
            vm: vm.map(Into::into),
            host: host.map(Into::into),
            message,
        });
        self.next_event += 1;
        while self.events.len() > EVENTS_KEPT {
            self.events.pop_front();
        }
    }

    /// Every host as placement sees it: the VMs placed there, and those migrating there (counted
    /// on both hosts until the move ends). One pass over the VMs and the tasks.
    fn candidates(&self) -> Vec<Candidate> {
        let mut on: BTreeMap<&str, Vec<&Vm>> = BTreeMap::new();
        for v in self.vms.values() {
            if let Some(h) = v.host.as_deref() {
                on.entry(h).or_default().push(v);
            }
        }
        for t in self.tasks.values() {
            if matches!(t.phase, Phase::Done) || t.info.kind != TaskKind::Migrate {
                continue;
            }
            let (Some(to), Some(name)) = (t.info.to.as_deref(), t.info.vm.as_deref()) else {
                continue;
            };
            if let Some(v) = self.vms.get(name)
                && v.host.as_deref() != Some(to)
            {
                on.entry(to).or_default().push(v);
            }
        }
        self.hosts
            .iter()
            .map(|(name, h)| {
                let placed = on.get(name.as_str()).map(Vec::as_slice).unwrap_or(&[]);
                Candidate {
                    name: name.clone(),
                    unusable: if h.state != HostState::Up {
                        Some("down")
                    } else if h.maintenance {
                        Some("in maintenance")
                    } else if self.power_holds.contains_key(name) {
                        Some("off or powering off")
                    } else {
                        None
                    },
                    cores: h.record.capacity.cores,
                    memory_mib: h.record.capacity.memory_mib,
                    power_model: h.record.capacity.power_model.clone(),
                    vcpus_used: placed.iter().map(|v| v.spec.vcpus).sum(),
                    memory_mib_used: placed.iter().map(|v| v.spec.memory_mib).sum(),
                    cpu_demand: placed
                        .iter()
                        .map(|v| {
                            h.vm_cpu.get(&v.spec.name).copied().unwrap_or(1.0)
                                * f64::from(v.spec.vcpus)
                        })
                        .sum(),
                    groups: placed
                        .iter()
                        .filter_map(|v| v.spec.anti_affinity.clone())
                        .collect(),
                }
            })
            .collect()
    }

    fn choose_host(&self, spec: &VmCreate, leaving: Option<&str>, admission: bool) -> Placement {
        if let Some(pin) = &spec.host
            && let Err(e) = self.not_held(pin)
        {
            return Placement::None(e.to_string());
        }
        let cands = self.candidates();
        let reserve = if admission {
            self.cfg.ha_reserve_hosts
        } else {
            0
        };
        // the VM's utilisation as its host last measured it, with that host's power model
        let measured = self
            .vms
            .get(&spec.name)
            .and_then(|v| v.host.as_deref())
            .and_then(|h| self.hosts.get(h))
            .and_then(|h| {
                let u = h.vm_cpu.get(&spec.name)?;
                Some((h.record.capacity.power_model.as_str(), *u))
            });
        place::choose(
            &cands,
            spec,
            leaving,
            measured,
            self.cfg.vcpus_per_core,
            reserve,
        )
    }

    fn check_fit(&self, spec: &VmCreate, host: &str) -> Result<(), String> {
        let cands = self.candidates();
        let c = cands
            .iter()
            .find(|c| c.name == host)
            .ok_or_else(|| format!("unknown host {host}"))?;
        place::fits(c, spec, self.cfg.vcpus_per_core)
    }
}

/// Whether a host whose lease expiry was seen at `lost_at_ms` has certainly self-fenced by `now_ms`:
/// its agent stops renewing at `TTL − margin` before expiry at the latest, so `margin` after the
/// expiry every VMM it ran is dead.
fn self_fence_passed(lost_at_ms: u64, margin_ms: u64, now_ms: u64) -> bool {
    now_ms >= lost_at_ms.saturating_add(margin_ms)
}

#[cfg(test)]
mod tests {
    use tern_api::agent::ObservedVm;
    use tern_api::cluster::HostCapacity;

    use super::*;

    /// A leading core over h1, h2 and h3 (4 cores each, ready, no host kept in reserve for HA)
    /// whose agents carry out every command at once, with the time and the agents' counters.
    struct Lab {
        c: Controller,
        now: u64,
        seq: u64,
        /// The last command each host answered.
        last_cmd: BTreeMap<String, u64>,
        /// Which VM runs where, as the agents see it.
        runs: BTreeMap<String, String>,
        /// Hosts whose agents are gone.
        down: BTreeSet<String>,
        fences: Vec<String>,
    }

    const HOSTS: [&str; 3] = ["h1", "h2", "h3"];

    fn spec(name: &str, pin: Option<&str>) -> VmCreate {
        VmCreate {
            name: name.into(),
            vcpus: 1,
            memory_mib: 64,
            kernel: "builtin:testguest".into(),
            cmdline: String::new(),
            disk: None,
            host: pin.map(Into::into),
            anti_affinity: None,
            restart_priority: 50,
        }
    }

    fn holds(h: &[(&str, HostPower)]) -> BTreeMap<String, HostPower> {
        h.iter().map(|(n, p)| (n.to_string(), *p)).collect()
    }

    impl Lab {
        /// The cluster with `vms` running where given.
        fn new(vms: &[(&str, &str)]) -> Lab {
            let mut lab = Lab {
                c: Controller::new(Config {
                    ha_reserve_hosts: 0,
                    ..Config::default()
                }),
                now: 0,
                seq: 0,
                last_cmd: BTreeMap::new(),
                runs: vms
                    .iter()
                    .map(|(v, h)| (v.to_string(), h.to_string()))
                    .collect(),
                down: BTreeSet::new(),
                fences: Vec::new(),
            };
            for (i, h) in HOSTS.iter().enumerate() {
                let record = HostRecord {
                    name: (*h).into(),
                    agent_url: format!("http://{h}:7000"),
                    capacity: HostCapacity {
                        cores: 4,
                        memory_mib: 16 * 1024,
                        power_model: "hp-ml110-g5".into(),
                        volume_node: None,
                        volume_node_id: None,
                    },
                    lease: i as u64 + 1,
                };
                lab.step(Input::HostUp(record));
            }
            let desired = vms
                .iter()
                .map(|(v, h)| VmRecord {
                    spec: spec(v, None),
                    host: Some(h.to_string()),
                    run: true,
                })
                .collect();
            lab.step(Input::Elected {
                generation: 1,
                desired,
                maintenance: vec![],
            });
            lab.report_all();
            assert!(lab.c.ready());
            lab
        }

        /// Feeds `input`, then answers what it caused.
        fn step(&mut self, input: Input) {
            self.now += 1;
            self.c.step(input, self.now);
            self.answer();
        }

        /// The agents answer every command sent (done at once); fences are noted.
        fn answer(&mut self) {
            loop {
                let actions = self.c.drain_actions();
                if actions.is_empty() {
                    return;
                }
                for a in actions {
                    match a {
                        Action::Send { host, command, .. } => {
                            if self.down.contains(&host) {
                                self.now += 1;
                                let error = "unreachable".to_string();
                                let cmd = command.id;
                                self.c.step(Input::SendFailed { cmd, error }, self.now);
                                continue;
                            }
                            let listen = match command.body {
                                CommandBody::Start { spec, .. } => {
                                    self.runs.insert(spec.name, host.clone());
                                    None
                                }
                                CommandBody::Stop { vm } => {
                                    self.runs.remove(&vm);
                                    None
                                }
                                CommandBody::Receive { .. } => Some(format!("fake:{host}")),
                                CommandBody::MigrateOut { vm, to, .. } => {
                                    self.runs.insert(vm, to.trim_start_matches("fake:").into());
                                    None
                                }
                                _ => None,
                            };
                            let last = self.last_cmd.entry(host).or_default();
                            *last = (*last).max(command.id);
                            self.seq += 1;
                            self.now += 1;
                            let reply = CommandReply::Done {
                                listen,
                                report: None,
                                vm_state: None,
                            };
                            let (cmd, seq) = (command.id, self.seq);
                            self.c.step(Input::Reply { cmd, seq, reply }, self.now);
                        }
                        Action::FenceLeases { host, .. } => self.fences.push(host),
                        Action::StoreVm { .. } | Action::StoreMaintenance { .. } => {}
                    }
                }
            }
        }

        /// Every agent still up reports what runs on it.
        fn report_all(&mut self) {
            for h in HOSTS {
                if self.down.contains(h) {
                    continue;
                }
                self.seq += 1;
                let vms = self
                    .runs
                    .iter()
                    .filter(|(_, on)| on.as_str() == h)
                    .map(|(v, _)| ObservedVm {
                        name: v.clone(),
                        state: ObservedState::Running,
                        cpu_utilization: Some(0.1),
                        rss_mib: Some(64),
                        guest_resident_kib: None,
                        guest_nonzero_kib: None,
                        dirty_pages_per_sec: None,
                    })
                    .collect();
                let report = AgentReport {
                    host: h.into(),
                    generation_seen: 1,
                    seq: self.seq,
                    last_command_id: self.last_cmd.get(h).copied().unwrap_or(0),
                    vms,
                    cpu_utilization: Some(0.1),
                    parked_cores: None,
                };
                self.step(Input::Report(report));
            }
        }

        fn hold(&mut self, h: &[(&str, HostPower)]) {
            self.now += 1;
            self.c.set_power_holds(holds(h), self.now);
        }

        fn create(&mut self, name: &str, pin: Option<&str>) -> Result<VmInfo, ApiError> {
            self.now += 1;
            let r = self.c.create_vm(spec(name, pin), self.now);
            self.answer();
            r
        }

        fn host_of(&self, vm: &str) -> Option<String> {
            self.c.vm(vm).ok().and_then(|v| v.host)
        }
    }

    #[test]
    fn new_vms_and_targetless_migrations_skip_hosts_held_off_or_powering_off() {
        let mut lab = Lab::new(&[("a", "h1")]);
        // Whichever host placement would choose, the held ones are left out.
        lab.hold(&[("h2", HostPower::PoweringOff), ("h3", HostPower::Off)]);
        for n in ["n1", "n2", "n3"] {
            let vm = lab.create(n, None).unwrap();
            assert_eq!(vm.host.as_deref(), Some("h1"), "{vm:?}");
        }
        let h2 = lab.c.host("h2").unwrap();
        assert_eq!(h2.power, HostPower::PoweringOff);
        assert_eq!(lab.c.host("h3").unwrap().power, HostPower::Off);
        // a move with no target has nowhere to go but held hosts: refused
        lab.now += 1;
        let e = lab.c.migrate_vm("a", None, lab.now).unwrap_err();
        assert!(matches!(e, ApiError::NoHostFits(_)), "{e:?}");
        assert!(lab.c.tasks(true).is_empty());
        lab.hold(&[("h1", HostPower::PoweringOff), ("h3", HostPower::Off)]);
        let vm = lab.create("n4", None).unwrap();
        assert_eq!(vm.host.as_deref(), Some("h2"), "{vm:?}");
        // every host held: nothing fits, nothing is created
        lab.hold(&[
            ("h1", HostPower::PoweringOff),
            ("h2", HostPower::PoweringOff),
            ("h3", HostPower::Off),
        ]);
        let e = lab.create("n5", None).unwrap_err();
        assert!(matches!(e, ApiError::NoHostFits(_)), "{e:?}");
        assert!(lab.c.vm("n5").is_err());
        // the hold ends (entries `on` are no hold): placed as before
        lab.hold(&[("h1", HostPower::On), ("h3", HostPower::Off)]);
        assert_eq!(lab.c.power_holds().len(), 1);
        let vm = lab.create("n5", None).unwrap();
        assert_eq!(vm.host.as_deref(), Some("h2"), "{vm:?}");
        // admission control counts no held host as room for a failure
        lab.c.cfg.ha_reserve_hosts = 1;
        lab.hold(&[("h2", HostPower::PoweringOff), ("h3", HostPower::Off)]);
        let e = lab.create("n6", None).unwrap_err();
        assert_eq!(
            e,
            ApiError::NoHostFits(
                "admission control keeps room for 1 host failure(s), and only 1 host(s) are \
                 usable"
                    .into()
            )
        );
        let kinds: Vec<String> = lab.c.events(0).into_iter().map(|e| e.message).collect();
        assert!(
            kinds
                .iter()
                .any(|m| m.starts_with("host h2 is powering_off")),
            "{kinds:?}"
        );
        assert!(
            kinds
                .iter()
                .any(|m| m == "host h1 takes VMs again: the automation's power hold ended"),
            "{kinds:?}"
        );
    }

    #[test]
    fn an_operator_naming_a_held_host_gets_a_conflict_naming_its_power_state() {
        let mut lab = Lab::new(&[("a", "h1")]);
        lab.hold(&[("h2", HostPower::PoweringOff), ("h3", HostPower::Off)]);
        lab.now += 1;
        let e = lab.c.migrate_vm("a", Some("h2"), lab.now).unwrap_err();
        assert_eq!(
            e,
            ApiError::HostPowerHeld {
                host: "h2".into(),
                power: HostPower::PoweringOff
            }
        );
        assert_eq!((e.status(), e.kind()), (409, "host off or powering off"));
        assert_eq!(
            e.to_string(),
            "host \"h2\" is powering_off (the automation is powering it off, or its power-off \
             is in doubt): it takes no VMs"
        );
        assert!(lab.c.tasks(false).is_empty(), "nothing queued");
        // off, with its agent still registered (the lease outlives the power-off a while)
        let e = lab.c.migrate_vm("a", Some("h3"), lab.now).unwrap_err();
        assert_eq!(
            e.to_string(),
            "host \"h3\" is off (powered off by the automation): it takes no VMs"
        );
        // a new VM pinned to a held host
        let e = lab.create("p", Some("h2")).unwrap_err();
        assert!(
            matches!(&e, ApiError::HostPowerHeld { host, .. } if host == "h2"),
            "{e:?}"
        );
        assert!(lab.c.vm("p").is_err(), "nothing created");
        // unknown hosts are still unknown, and a free host still takes the move
        let e = lab.c.migrate_vm("a", Some("h9"), lab.now).unwrap_err();
        assert_eq!(e, ApiError::UnknownHost("h9".into()));
        lab.hold(&[("h3", HostPower::Off)]);
        let t = lab.c.migrate_vm("a", Some("h2"), lab.now).unwrap();
        assert_eq!(lab.c.task(t.task).unwrap().to.as_deref(), Some("h2"));
    }

    #[test]
    fn a_vm_whose_vmm_exited_occupies_no_host() {
        let mut lab = Lab::new(&[("a", "h1"), ("b", "h1")]);
        assert_eq!(
            lab.c.occupants("h1"),
            vec!["a".to_string(), "b".to_string()]
        );
        // h1's agent reports a's VMM exited (its restart policy gave up): a fails, still
        // naming h1, where nothing of it runs
        lab.seq += 1;
        let vm = |name: &str, state| ObservedVm {
            name: name.into(),
            state,
            cpu_utilization: None,
            rss_mib: None,
            guest_resident_kib: None,
            guest_nonzero_kib: None,
            dirty_pages_per_sec: None,
        };
        let report = AgentReport {
            host: "h1".into(),
            generation_seen: 1,
            seq: lab.seq,
            last_command_id: lab.last_cmd.get("h1").copied().unwrap_or(0),
            vms: vec![
                vm("a", ObservedState::Exited),
                vm("b", ObservedState::Running),
            ],
            cpu_utilization: Some(0.1),
            parked_cores: None,
        };
        lab.step(Input::Report(report));
        let a = lab.c.vm("a").unwrap();
        assert_eq!(a.state, VmState::Failed, "{a:?}");
        assert_eq!(a.host.as_deref(), Some("h1"));
        assert_eq!(lab.c.occupants("h1"), vec!["b".to_string()]);
    }

    #[test]
    fn a_migration_queued_to_a_host_held_before_it_began_fails_and_the_vm_stays() {
        let mut lab = Lab::new(&[("a", "h1"), ("b", "h1")]);
        lab.c.cfg.max_migrations = 1;
        lab.now += 1;
        // "a" moves to h2 first; "b" waits its turn for h3
        let ta = lab.c.migrate_vm("a", Some("h2"), lab.now).unwrap().task;
        let tb = lab.c.migrate_vm("b", Some("h3"), lab.now).unwrap().task;
        assert_eq!(lab.c.task(tb).unwrap().state, TaskState::Queued);
        assert_eq!(lab.c.occupants("h3"), vec!["b".to_string()], "arriving");
        lab.hold(&[("h3", HostPower::PoweringOff)]);
        lab.answer();
        lab.report_all();
        assert_eq!(lab.c.task(ta).unwrap().state, TaskState::Succeeded);
        let t = lab.c.task(tb).unwrap();
        assert_eq!(t.state, TaskState::Failed, "{t:?}");
        let error = t.error.unwrap();
        assert!(error.contains("host \"h3\" is powering_off"), "{error}");
        assert_eq!(lab.host_of("b").as_deref(), Some("h1"));
        assert!(lab.c.occupants("h3").is_empty());
        assert_eq!(lab.c.occupants("h1"), vec!["b".to_string()]);
    }

    #[test]
    fn ha_restarts_skip_held_hosts_and_wait_while_every_other_host_is_held() {
        let mut lab = Lab::new(&[("m", "h1")]);
        lab.hold(&[
            ("h2", HostPower::PoweringOff),
            ("h3", HostPower::PoweringOff),
        ]);
        // h1 dies: lost, fenced after the margin, and the others report without m
        lab.down.insert("h1".into());
        lab.runs.remove("m");
        lab.step(Input::HostExpired { host: "h1".into() });
        lab.now += lab.c.cfg.fence_margin_ms;
        lab.step(Input::Tick);
        assert_eq!(lab.fences, vec!["h1".to_string()]);
        lab.step(Input::Fenced {
            host: "h1".into(),
            result: Ok(1),
        });
        lab.report_all();
        lab.step(Input::Tick);
        // every other host is being powered off: m waits, saying why
        let m = lab.c.vm("m").unwrap();
        assert_eq!((m.state, m.host.as_deref()), (VmState::Pending, None));
        assert!(
            lab.c
                .events(0)
                .iter()
                .any(|e| e.kind == "vm_waiting" && e.message.contains("h2")),
            "{:?}",
            lab.c.events(0)
        );
        // h3's power-off failed (on again): m restarts there, not on h2
        lab.hold(&[("h2", HostPower::PoweringOff)]);
        lab.step(Input::Tick);
        assert_eq!(lab.host_of("m").as_deref(), Some("h3"));
        assert_eq!(lab.c.counters.ha_restarts, 1);
        assert_eq!(lab.runs.get("m").map(String::as_str), Some("h3"));
    }

    #[test]
    fn a_vm_pinned_to_a_held_host_waits_saying_so() {
        let mut lab = Lab::new(&[]);
        let vm = lab.create("p", Some("h2")).unwrap();
        assert_eq!(vm.host.as_deref(), Some("h2"));
        lab.report_all();
        // h2 dies and is fenced while the automation holds it off (its agent gone with it)
        lab.hold(&[("h2", HostPower::Off)]);
        lab.down.insert("h2".into());
        lab.runs.remove("p");
        lab.step(Input::HostExpired { host: "h2".into() });
        lab.now += lab.c.cfg.fence_margin_ms;
        lab.step(Input::Tick);
        lab.step(Input::Fenced {
            host: "h2".into(),
            result: Ok(0),
        });
        lab.report_all();
        lab.step(Input::Tick);
        let p = lab.c.vm("p").unwrap();
        assert_eq!(p.host, None);
        assert_eq!(
            p.last_error.as_deref(),
            Some("host \"h2\" is off (powered off by the automation): it takes no VMs")
        );
    }
}

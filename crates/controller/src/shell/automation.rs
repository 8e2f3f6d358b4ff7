//! The automation loop inside the controller: the shell around [`tern_automation::Loop`].
//!
//! While this controller leads (and has heard every host, [`Controller::ready`]), every
//! [`CYCLE`] it
//!
//! 1. builds a [`Telemetry`] snapshot from the core (hosts, their state and maintenance, VMs and
//!    where they run) and the agents' latest reports (per-VM and host CPU utilisation, which
//!    [`note_report`] takes from `POST /v1/agent/reports` before the core sees them);
//! 2. feeds it to the loop (`observe`) and ticks it: every `interval_s` the loop runs a policy
//!    round and makes a plan — stored as `proposed` in manual and partial mode, applied at once
//!    in full mode;
//! 3. carries out the loop's actions: a migration goes through the core's own task machinery
//!    ([`Controller::migrate_vm`], so its queueing and concurrency limits hold), a host power
//!    action through that host's [`PowerDriver`] (none configured: the action fails with "no power
//!    driver for host …" and the plan records it). A migration is a task; a power-on holds the
//!    action queue only for its driver's call (an `ipmitool` command, at most 10 s) and then
//!    waits for the host's agent to register without holding anything; a power-off (soft, then hard
//!    after [`SOFT_OFF_GRACE`]: seconds) runs on a blocking task of its own while the host stays
//!    powering off for the loop — counted on, taking no VMs — and the dashboard;
//! 4. reports back what became of each, at the first cycle that finds it: a migration task that
//!    succeeded (with the measured time, bytes and pause from the agent's migration report) or
//!    failed, a power-on registered or timed out. A power-off's task reports its own outcome,
//!    cycles or not (none runs while a host is lost, as the one powered off soon is): the
//!    driver's answer, or after [`POWER_OFF_TIMEOUT`] without one the power-off in doubt — the
//!    plan fails but the host stays powering off (the power-off `running` in the failed plan),
//!    its BMC may still be turning it off — until the driver's late answer (off), a snapshot
//!    showing the host down (off), or [`POWER_OFF_TIMEOUT`] more with its agent still
//!    reporting (on). A driver's error never makes the host on by itself: for a host whose
//!    agent no longer reports, on time or late, it makes it off (a host seen down while on
//!    stays on for good); for one whose agent reports, the power-off is in doubt, watched the
//!    same way.
//!
//! A new leader (or this controller elected again) finds the power-offs the previous term was
//! carrying out or held in doubt in the plans it stored (the power-off `running`, the plan
//! `applying` or `failed`): it holds those hosts powering off too, until they are seen down
//! (off), or for [`POWER_OFF_TIMEOUT`] while their agents still report (then on).
//!
//! The core's own placement (new VMs, HA restarts, maintenance moves, an operator's migration)
//! knows these power states through [`Controller::set_power_holds`]: every host the loop has
//! powering off or off is held out of it — set before a power-off's driver is called (the host
//! must then be empty in the core too: a VM placed or moving there meanwhile fails the
//! power-off), and brought up to date after every batch of actions carried out (every cycle,
//! apply and power-off outcome) and when this controller takes office.
//!
//! The policy is stored in etcd (`/tern/desired/automation/policy`, a guarded write like every
//! desired-state write), so a new leader runs under the same knobs. So are the plans, each under
//! `/tern/desired/automation/plans/ID` (its `Plan` JSON and the placement fingerprint it was
//! computed on), written whenever its state changes — an applied plan's `applying` before its
//! first action is carried out — and deleted when the loop forgets it: a new leader takes them
//! over ([`tern_automation::Loop::restore_plans`]), so a proposal made under the old leader can be
//! applied on the new one while the placement is what it was computed on. Plan times
//! (`created_ms`) are on the clock of the controller that made the plan (ms since it started).
//!
//! Every migration task gets a predicted cost when it is seen (the plan's prediction, or the
//! loop's model for an operator's move) and, once done, the measured one: `GET /v1/tasks/{id}`
//! shows both.
//!
//! The model's inputs beyond the VM's memory: its resident memory (the guest RAM the agent
//! found resident and not zero in the VMM, what the first pass sends; the resident guest RAM,
//! an upper bound, or the VMM's RSS from older agents) and dirty rate, and the link into the
//! target host, learned from every succeeded migration task that landed there
//! ([`tern_automation::cost::link_from_migration`] into a [`LinkEstimator`]; the loop's default
//! link until then).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use tern_api::agent::AgentReport;
use tern_api::automation::{
    AutomationRound, AutomationRounds, HostPower, MigrationActual, MigrationPrediction, Plan,
    PlanAction, PlanState, Policy, RoundPoint, StatsSeries,
};
use tern_api::cluster::{HostState, TaskDetail, TaskInfo, TaskKind, TaskState, VmState};
use tern_automation::cost::{
    LinkEstimator, MoveInput, OverheadEstimator, OverheadState, link_from_migration, predict_move,
};
use tern_automation::{
    Action, HostSample, Loop, LoopConfig, Outcome, PlanError, Telemetry, VmSample,
};
use tern_power::{OffMode, OffOutcome, PowerDriver, PowerOffError};

use super::Shared;
use super::store::StoreError;
use crate::core::Controller;

/// How often the loop is fed and ticked (its own `interval_s` decides when a round runs).
pub const CYCLE: Duration = Duration::from_millis(500);

/// Rounds kept for `GET /v1/automation/rounds` (the newest; 8.5 minutes at a 2 s interval).
pub const ROUNDS_KEPT: usize = 256;

/// Where the policy is stored.
pub const POLICY_KEY: &str = "/tern/desired/automation/policy";

/// Where the plans are stored: one key per plan, `PLANS_PREFIX` + the id in 20 digits.
pub const PLANS_PREFIX: &str = "/tern/desired/automation/plans/";

/// Where what the controller learnt of moves is stored ([`StoredMoveCost`]): a new leader, after
/// a fail-over or a restart, predicts its first moves with it instead of starting again from the
/// prior.
pub const MOVE_COST_KEY: &str = "/tern/desired/automation/move_cost";

/// What the controller learnt of moves, as stored: the overhead of a move beyond the model
/// ([`OverheadEstimator`]'s state) and the measured link into each host.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredMoveCost {
    /// The overhead estimator's state.
    pub overhead: OverheadState,
    /// The measured link into each host, bytes/s.
    pub links: BTreeMap<String, f64>,
}

impl StoredMoveCost {
    /// What `a` has learnt, as stored (`None` before its first measured move).
    fn of(a: &Automation) -> Option<Vec<u8>> {
        if a.overhead.count() == 0 && a.links.measured().is_empty() {
            return None;
        }
        let stored = StoredMoveCost {
            overhead: a.overhead.state(),
            links: a.links.measured().clone(),
        };
        Some(serde_json::to_vec(&stored).expect("the learnt move cost serialises"))
    }

    /// The estimators stored in `bytes`, or why they are not usable. The measured links are
    /// read from any stored form that has them; the overhead alone may be unusable (an older
    /// controller stored it in another form), which comes back as its reason, and the caller
    /// starts it from the prior without losing the links.
    fn read(bytes: &[u8]) -> Result<(Result<OverheadEstimator, String>, LinkEstimator), String> {
        #[derive(serde::Deserialize)]
        struct Links {
            links: BTreeMap<String, f64>,
        }
        let l: Links = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let overhead = serde_json::from_slice::<StoredMoveCost>(bytes)
            .map_err(|e| e.to_string())
            .and_then(|m| OverheadEstimator::restore(m.overhead).map_err(|e| e.to_string()));
        Ok((overhead, LinkEstimator::from_measured(&l.links)))
    }
}

/// A plan as stored: the plan and the placement fingerprint it was computed on.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoredPlan {
    /// The plan.
    pub plan: Plan,
    /// [`tern_automation::Loop::placement_fingerprint`] when it was computed.
    pub fingerprint: u64,
}

/// A host powered on must register (its agent up) within this long, or it failed to wake.
pub const WAKE_TIMEOUT: Duration = Duration::from_secs(180);

/// How long a soft power-off may take before the power is cut.
pub const SOFT_OFF_GRACE: Duration = Duration::from_secs(10);

/// A power-off whose driver has not answered within this long fails its plan (the soft-off's
/// grace, then the hard power-off's and the status reads' `ipmitool` calls, with room to spare),
/// but its host is held powering off until the driver answers or the host is seen down: the BMC
/// may still be turning it off. A power-off in doubt, or one a new leader takes over, is given as
/// long again before a host whose agent still reports is believed on.
pub const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(60);

/// A power-off under way for a plan's running action: the driver runs on a blocking task of its
/// own while the cycles go on.
#[derive(Debug)]
struct PoweringOff {
    /// The plan it is for.
    plan: u64,
    /// Which power-off this is ([`Automation::power_offs_started`] when it started): a driver
    /// answering for an earlier one (timed out, or a former term's) finds another number.
    token: u64,
}

/// How a power-off's wait ended.
#[derive(Debug)]
enum PowerOffEnd {
    /// The driver answered: done, or why not.
    Answer(Result<(), String>),
    /// The driver did not answer within this long (it may still).
    NoAnswerWithin(Duration),
}

/// Totals for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AutomationCounters {
    /// Plans that reached each state (counted once per plan and state).
    pub proposed: u64,
    /// Plans applied in full.
    pub applied: u64,
    /// Plans superseded (the cluster changed under them).
    pub superseded: u64,
    /// Plans vetoed (predicted harmful).
    pub vetoed: u64,
    /// Plans rejected by an operator.
    pub rejected: u64,
    /// Plans failed (an action failed).
    pub failed: u64,
    /// Loop cycles run.
    pub cycles: u64,
    /// The last cycle's duration (observe, tick, carrying out), seconds.
    pub last_cycle_s: f64,
}

/// The controller's automation state.
#[derive(Debug)]
pub struct Automation {
    lp: Loop,
    /// The generation the loop was built for.
    generation: Option<u64>,
    /// Latest per-VM CPU utilisation from the agents' reports.
    vm_cpu: BTreeMap<String, f64>,
    /// Latest host CPU utilisation.
    host_cpu: BTreeMap<String, f64>,
    /// Latest per-VM dirty-page rate (pages/s) and per-host parked cores from the reports.
    vm_dirty: BTreeMap<String, f64>,
    host_parked: BTreeMap<String, u32>,
    /// Latest per-VM resident memory, MiB: the guest's resident RAM, or the VMM's RSS from
    /// agents that do not report it.
    vm_rss: BTreeMap<String, u64>,
    /// Measured migration bandwidth into each host.
    links: LinkEstimator,
    /// Succeeded migration tasks already measured into `links`.
    measured: BTreeSet<u64>,
    /// Migration tasks started for a plan: task → (plan, VM).
    plan_tasks: BTreeMap<u64, (u64, String)>,
    /// Predicted cost of every migration task seen.
    predicted: BTreeMap<u64, MigrationPrediction>,
    /// Per migration task: the model's own time for it (no overhead) and the VM's utilisation
    /// when it was first seen.
    model_time: BTreeMap<u64, (f64, f64)>,
    /// The measured overhead of a move beyond the model's time.
    overhead: OverheadEstimator,
    /// What the store holds of `overhead` and `links` (JSON), as last written or read.
    stored_move_cost: Option<Vec<u8>>,
    /// Power-ons sent, awaiting the host's registration: host → (plan, deadline).
    waking: BTreeMap<String, (u64, Instant)>,
    /// Power-offs under way for a running plan action, awaiting their driver's answer, by host.
    powering_off: BTreeMap<String, PoweringOff>,
    /// Power-offs started by this controller (each one's token).
    power_offs_started: u64,
    /// How long a power-off's driver may take ([`POWER_OFF_TIMEOUT`] unless set).
    power_off_timeout: Duration,
    /// Power drivers by host.
    drivers: BTreeMap<String, Arc<dyn PowerDriver>>,
    /// Last state counted per plan (for the totals).
    seen: BTreeMap<u64, PlanState>,
    /// What the store holds per plan (its JSON), as last written or read.
    stored_plans: BTreeMap<u64, Vec<u8>>,
    counters: AutomationCounters,
    /// The loop's most recent rounds since this controller took office, oldest first (at most
    /// [`ROUNDS_KEPT`]).
    rounds: VecDeque<AutomationRound>,
    /// The loop's `rounds_run` when `rounds` was last added to.
    rounds_noted: u64,
}

impl Automation {
    /// A loop under the default policy (a leader loads the stored one when it takes office).
    pub fn new(ha_reserve_hosts: u32) -> Automation {
        Automation {
            lp: new_loop(Policy::default(), ha_reserve_hosts),
            generation: None,
            vm_cpu: BTreeMap::new(),
            host_cpu: BTreeMap::new(),
            vm_dirty: BTreeMap::new(),
            host_parked: BTreeMap::new(),
            vm_rss: BTreeMap::new(),
            links: LinkEstimator::default(),
            measured: BTreeSet::new(),
            plan_tasks: BTreeMap::new(),
            predicted: BTreeMap::new(),
            model_time: BTreeMap::new(),
            overhead: OverheadEstimator::default(),
            stored_move_cost: None,
            waking: BTreeMap::new(),
            powering_off: BTreeMap::new(),
            power_offs_started: 0,
            power_off_timeout: POWER_OFF_TIMEOUT,
            drivers: BTreeMap::new(),
            seen: BTreeMap::new(),
            stored_plans: BTreeMap::new(),
            counters: AutomationCounters::default(),
            rounds: VecDeque::new(),
            rounds_noted: 0,
        }
    }

    /// `hosts` with each one's power state as the loop tracks it (the core knows none: a host
    /// the loop never touched is on).
    pub fn with_power(
        &self,
        mut hosts: Vec<tern_api::cluster::HostInfo>,
    ) -> Vec<tern_api::cluster::HostInfo> {
        for h in &mut hosts {
            if let Some(p) = self.lp.host_power(&h.name) {
                h.power = p;
            }
        }
        hosts
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        self.lp.policy()
    }

    /// Every plan kept, newest first.
    pub fn plans(&self) -> Vec<Plan> {
        self.lp.plans().into_iter().cloned().collect()
    }

    /// One plan.
    pub fn plan(&self, id: u64) -> Option<Plan> {
        self.lp.plan(id).cloned()
    }

    /// What the loop's last round saw and decided (diagnostics).
    pub fn last_round(&self) -> tern_automation::RoundReport {
        self.lp.last_round().clone()
    }

    /// The dashboard's series.
    pub fn series(&self) -> StatsSeries {
        self.lp.series()
    }

    /// `GET /v1/automation/rounds`: the rounds kept, oldest first, with the controller's clock
    /// `now_ms`.
    pub fn rounds(&self, now_ms: u64) -> AutomationRounds {
        AutomationRounds {
            now_ms,
            interval_s: self.lp.policy().interval_s,
            rounds: self.rounds.iter().cloned().collect(),
        }
    }

    /// Keeps the loop's last round if it is one not kept yet (called after each tick).
    fn note_round(&mut self) {
        if self.lp.rounds_run() == self.rounds_noted {
            return;
        }
        self.rounds_noted = self.lp.rounds_run();
        let r = self.lp.last_round();
        self.rounds.push_back(AutomationRound {
            at_ms: r.at_ms,
            points: r
                .points
                .iter()
                .map(|(vm, u)| RoundPoint {
                    vm: vm.clone(),
                    utilization: *u,
                })
                .collect(),
            overloaded: r.overloaded.clone(),
            drained: r.drained.clone(),
            plan: r.plan,
        });
        while self.rounds.len() > ROUNDS_KEPT {
            self.rounds.pop_front();
        }
    }

    /// The totals for `/metrics`.
    pub fn counters(&self) -> AutomationCounters {
        self.counters
    }

    /// The measured overhead of a move beyond the migration model's time, and the migrations
    /// it was learnt from.
    pub fn overhead(&self) -> (tern_automation::cost::Overhead, u64) {
        (self.overhead.estimate(), self.overhead.count())
    }

    /// The loop's SLATAH counts since this controller took office: (host-intervals with load,
    /// of which overloaded).
    pub fn sla_counts(&self) -> (u64, u64) {
        self.lp.sla_counts()
    }

    /// Each VM's latest CPU utilisation from its agent's reports (0..1 of its vCPUs), as the
    /// loop reads it.
    pub fn vm_utilization(&self) -> &BTreeMap<String, f64> {
        &self.vm_cpu
    }

    /// Sets how long a power-off's driver may take before its plan fails with the host held
    /// powering off, how long a new leader waits on a power-off it took over, and how long a
    /// power-off in doubt waits for its host's agent to stop reporting ([`POWER_OFF_TIMEOUT`]
    /// unless set; tests shorten it). Power-offs already started keep theirs for their driver's
    /// answer; one that comes into doubt later waits as long as set then.
    pub fn set_power_off_timeout(&mut self, timeout: Duration) {
        self.power_off_timeout = timeout;
    }

    /// Sets (or replaces) the power driver of `host`.
    pub fn set_driver(&mut self, host: &str, driver: Arc<dyn PowerDriver>) {
        self.drivers.insert(host.to_string(), driver);
    }

    /// A task with a migration's predicted and measured cost.
    pub fn detail(&self, t: TaskInfo) -> TaskDetail {
        let migration = t.kind != TaskKind::Maintenance;
        TaskDetail {
            predicted: migration
                .then(|| self.predicted.get(&t.id).copied())
                .flatten(),
            actual: if migration { actual_of(&t) } else { None },
            task: t,
        }
    }

    /// Over the succeeded migrations among `tasks` with both a prediction and a measured time:
    /// how many, and the mean absolute error of the predicted time relative to the measured one.
    pub fn prediction_error(&self, tasks: &[TaskInfo]) -> (u64, f64) {
        let errors: Vec<f64> = tasks
            .iter()
            .filter_map(|t| {
                let p = self.predicted.get(&t.id)?;
                let a = actual_of(t)?;
                (a.time_s > 0.0).then(|| (p.time_s - a.time_s).abs() / a.time_s)
            })
            .collect();
        let n = errors.len() as u64;
        let mean = if n == 0 {
            0.0
        } else {
            errors.iter().sum::<f64>() / n as f64
        };
        (n, mean)
    }

    /// Counts plans that reached a state they were not in at the last count.
    fn count(&mut self) {
        let now: Vec<(u64, PlanState)> = self.lp.plans().iter().map(|p| (p.id, p.state)).collect();
        for (id, state) in now {
            if self.seen.get(&id) == Some(&state) {
                continue;
            }
            self.seen.insert(id, state);
            let c = &mut self.counters;
            match state {
                PlanState::Proposed => c.proposed += 1,
                PlanState::Applied => c.applied += 1,
                PlanState::Superseded => c.superseded += 1,
                PlanState::Vetoed => c.vetoed += 1,
                PlanState::Rejected => c.rejected += 1,
                PlanState::Failed => c.failed += 1,
                PlanState::Applying => {}
            }
        }
        let kept: Vec<u64> = self.lp.plans().iter().map(|p| p.id).collect();
        self.seen.retain(|id, _| kept.contains(id));
    }
}

fn new_loop(policy: Policy, ha_reserve_hosts: u32) -> Loop {
    let cfg = LoopConfig {
        ha_reserve_hosts,
        ..LoopConfig::default()
    };
    Loop::new(policy, cfg)
        .unwrap_or_else(|_| Loop::new(Policy::default(), cfg).expect("the default policy is valid"))
}

/// What a migration task measured: the whole move's time — the target's start and the migration,
/// as the task's phases timed them ([`tern_api::cluster::TaskPhases::move_ms`]; the source VMM's
/// `total_ms` where they are not known) — and the bytes and pause from the VMM's report.
pub fn actual_of(t: &TaskInfo) -> Option<MigrationActual> {
    if t.state != TaskState::Succeeded {
        return None;
    }
    let r = t.report.as_ref()?;
    let time_ms = match t.phases.and_then(|p| p.move_ms()) {
        Some(ms) => ms as f64,
        None => r.get("total_ms")?.as_f64()?,
    };
    Some(MigrationActual {
        time_s: time_ms / 1000.0,
        bytes: r.get("bytes_sent")?.as_u64()?,
        downtime_ms: r.get("downtime_ms")?.as_f64()?,
    })
}

fn lock(s: &Shared) -> MutexGuard<'_, Automation> {
    s.automation.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes the utilisation figures of an agent's report (called before the core sees it).
pub fn note_report(s: &Shared, report: &AgentReport) {
    let mut a = lock(s);
    if let Some(u) = report.cpu_utilization {
        a.host_cpu.insert(report.host.clone(), u);
    }
    match report.parked_cores {
        Some(p) => a.host_parked.insert(report.host.clone(), p),
        None => a.host_parked.remove(&report.host),
    };
    for v in &report.vms {
        if let Some(u) = v.cpu_utilization {
            a.vm_cpu.insert(v.name.clone(), u);
        }
        match v.dirty_pages_per_sec {
            Some(d) => a.vm_dirty.insert(v.name.clone(), d),
            None => a.vm_dirty.remove(&v.name),
        };
        // kept while the VM migrates (the agent measures only running VMs); what the first
        // pass sends: the guest's resident RAM that is not zero where the agent reports it
        // (never above the resident figure), else the guest's resident RAM (which counts a
        // whole 2 MiB for each huge page touched), else the VMM's RSS, which also counts the
        // VMM's own pages; KiB rounded up to whole MiB
        let nonzero = match (v.guest_nonzero_kib, v.guest_resident_kib) {
            (Some(n), Some(r)) => Some(n.min(r)),
            (n, r) => n.or(r),
        };
        let resident = nonzero.map(|k| k.div_ceil(1024)).or(v.rss_mib);
        if let Some(r) = resident {
            a.vm_rss.insert(v.name.clone(), r);
        }
    }
}

/// The snapshot the loop observes: the core's hosts and VMs with the reported utilisation.
fn telemetry(core: &Controller, a: &Automation) -> Telemetry {
    let hosts = core
        .hosts()
        .into_iter()
        .map(|h| HostSample {
            cores: h.capacity.cores,
            power_model: h.capacity.power_model.clone(),
            up: h.state == HostState::Up,
            maintenance: h.maintenance,
            cpu_utilization: a.host_cpu.get(&h.name).copied().or(h.cpu_utilization),
            parked_cores: a.host_parked.get(&h.name).copied().or(h.parked_cores),
            migration_link_bytes_per_sec: a.links.get(&h.name),
            name: h.name,
        })
        .collect();
    let vms = core
        .vms()
        .into_iter()
        .filter(|v| {
            matches!(
                v.state,
                VmState::Running | VmState::Migrating | VmState::Starting
            )
        })
        .map(|v| VmSample {
            host: v.host.clone(),
            vcpus: v.spec.vcpus,
            memory_mib: v.spec.memory_mib,
            resident_mib: a.vm_rss.get(&v.name).copied(),
            cpu_utilization: a.vm_cpu.get(&v.name).copied(),
            dirty_pages_per_sec: a.vm_dirty.get(&v.name).copied(),
            // a cluster VM's disk is a file on the shared volume
            volume_disks: u32::from(v.spec.disk.is_some()),
            pinned: v.spec.host.is_some(),
            anti_affinity: v.spec.anti_affinity.clone(),
            migrating: v.state == VmState::Migrating,
            name: v.name,
        })
        .collect();
    Telemetry { hosts, vms }
}

/// Called when this controller takes office: loads the stored policy and starts a fresh loop.
pub async fn take_office(s: &Arc<Shared>, generation: u64) {
    let stored = match s.store.get(POLICY_KEY).await {
        Ok(Some(bytes)) => match serde_json::from_slice::<Policy>(&bytes) {
            Ok(p) if p.validate().is_ok() => Some(p),
            Ok(_) | Err(_) => {
                eprintln!(
                    "tern controller: the stored automation policy is invalid; using the default"
                );
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            eprintln!("tern controller: cannot read the automation policy: {e}; using the default");
            None
        }
    };
    // the plans the previous leaders stored
    let mut plans: Vec<(Plan, u64)> = Vec::new();
    let mut stored_plans = BTreeMap::new();
    match s.store.get_prefix(PLANS_PREFIX).await {
        Ok(kvs) => {
            for (key, bytes) in kvs {
                match serde_json::from_slice::<StoredPlan>(&bytes) {
                    Ok(p) => {
                        stored_plans.insert(p.plan.id, bytes);
                        plans.push((p.plan, p.fingerprint));
                    }
                    Err(e) => {
                        eprintln!(
                            "tern controller: skipping the stored plan {PLANS_PREFIX}{key}: {e}"
                        )
                    }
                }
            }
        }
        Err(e) => {
            eprintln!("tern controller: cannot read the stored plans: {e}; starting with none")
        }
    }
    // what the previous leaders learnt of moves
    let learnt = match s.store.get(MOVE_COST_KEY).await {
        Ok(Some(bytes)) => match StoredMoveCost::read(&bytes) {
            Ok((Ok(overhead), links)) => Some((overhead, links, Some(bytes))),
            Ok((Err(e), links)) => {
                eprintln!(
                    "tern controller: the stored move cost {MOVE_COST_KEY} has measured links \
                     but no usable overhead ({e}); the overhead starts from the prior"
                );
                // No stored bytes kept: the next measured move writes the whole state anew.
                Some((OverheadEstimator::default(), links, None))
            }
            Err(e) => {
                eprintln!(
                    "tern controller: the stored move cost {MOVE_COST_KEY} is not usable ({e}); \
                     keeping what this controller learnt"
                );
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            eprintln!(
                "tern controller: cannot read the stored move cost: {e}; keeping what this \
                 controller learnt"
            );
            None
        }
    };
    let reserve = s.core().config().ha_reserve_hosts;
    let now = s.now_ms();
    let mut a = lock(s);
    a.lp = new_loop(stored.unwrap_or_default(), reserve);
    if let Some((overhead, links, bytes)) = learnt {
        a.overhead = overhead;
        a.links = links;
        a.stored_move_cost = bytes;
    }
    let overhead = a.overhead.estimate();
    a.lp.set_overhead(overhead);
    a.lp.restore_plans(now, plans);
    a.generation = Some(generation);
    a.plan_tasks.clear();
    a.waking.clear();
    // (a former term's driver calls still answer: see `power_off_ended`)
    a.powering_off.clear();
    a.seen = a.lp.plans().iter().map(|p| (p.id, p.state)).collect();
    a.stored_plans = stored_plans;
    a.rounds.clear();
    a.rounds_noted = 0;
    let timeout = a.power_off_timeout;
    let inherited: Vec<(String, u64)> =
        a.lp.power_offs_in_doubt()
            .iter()
            .map(|(h, p)| (h.clone(), *p))
            .collect();
    drop(a);
    hold_hosts(s);
    for (host, plan) in inherited {
        eprintln!(
            "tern controller: host {host}'s power-off (plan {plan}) was under way or in doubt \
             when the previous term ended; held powering off until it is seen down, or for \
             {timeout:?} while its agent reports"
        );
        watch_power_off_in_doubt(
            s,
            generation,
            plan,
            host,
            timeout,
            "the next leader took over",
        );
    }
}

/// A power-off whose end is not known — one the previous term was carrying out or held in doubt
/// (its plan stored with the power-off `running`), or one whose driver did not answer in time or
/// failed while the host's agent reports:
/// the host is held powering off by the loop; if its agent still reports `wait` from now (`since`
/// saying what happened now), the power-off did not happen and the host is on again; if it
/// stopped reporting, it is off (cycles need not run for this: they wait while a host is lost).
/// Nothing is done if the power-off settled meanwhile, or this term ended.
fn watch_power_off_in_doubt(
    s: &Arc<Shared>,
    generation: u64,
    plan: u64,
    host: String,
    wait: Duration,
    since: &'static str,
) {
    let s = Arc::clone(s);
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        let up = host_up(&s, &host);
        let now = s.now_ms();
        let settled = {
            let mut a = lock(&s);
            if a.generation != Some(generation) {
                return;
            }
            let why = if up {
                format!("its agent still reports {wait:?} after {since}")
            } else {
                "its agent stopped reporting".to_string()
            };
            let settled = a.lp.power_off_settled(now, plan, &host, !up, &why);
            a.count();
            settled
        };
        hold_hosts(&s);
        if settled {
            eprintln!(
                "tern controller: host {host}'s power-off in doubt (plan {plan}): {}",
                if up { "it still runs" } else { "it is off" }
            );
            persist_if_leading(&s).await;
        }
    });
}

/// Whether `host`'s agent reports (the core has it up).
fn host_up(s: &Shared, host: &str) -> bool {
    s.core()
        .hosts()
        .iter()
        .any(|h| h.name == host && h.state == HostState::Up)
}

/// Writes the plans if this controller still leads in the term its loop was built for.
async fn persist_if_leading(s: &Arc<Shared>) {
    let leading = s.core().generation();
    if leading.is_some() && lock(s).generation == leading {
        persist_plans(s).await;
    }
}

/// Writes to the store every plan whose state changed since it was last written, and deletes
/// the plans the loop no longer keeps. A write that fails is tried again at the next call.
pub async fn persist_plans(s: &Arc<Shared>) {
    let _one = s.plans_store.lock().await;
    let (writes, deletes): (Vec<(u64, Vec<u8>)>, Vec<u64>) = {
        let a = lock(s);
        let mut writes = Vec::new();
        let mut kept = BTreeSet::new();
        for p in a.lp.plans() {
            kept.insert(p.id);
            let stored = StoredPlan {
                plan: p.clone(),
                fingerprint: a.lp.plan_fingerprint(p.id).unwrap_or(0),
            };
            let bytes = serde_json::to_vec(&stored).expect("a plan serialises");
            if a.stored_plans.get(&p.id) != Some(&bytes) {
                writes.push((p.id, bytes));
            }
        }
        let deletes = a
            .stored_plans
            .keys()
            .filter(|id| !kept.contains(id))
            .copied()
            .collect();
        (writes, deletes)
    };
    for (id, bytes) in writes {
        let key = format!("{PLANS_PREFIX}{id:020}");
        match s.store.put_guarded(&key, Some(bytes.clone())).await {
            Ok(()) => {
                lock(s).stored_plans.insert(id, bytes);
            }
            Err(e) => {
                eprintln!("tern controller: plan {id} not stored: {e}");
                return;
            }
        }
    }
    for id in deletes {
        let key = format!("{PLANS_PREFIX}{id:020}");
        match s.store.put_guarded(&key, None).await {
            Ok(()) => {
                lock(s).stored_plans.remove(&id);
            }
            Err(e) => {
                eprintln!("tern controller: forgotten plan {id} not deleted from the store: {e}");
                return;
            }
        }
    }
}

/// Writes what was learnt of moves (the overhead and the links) to the store when it changed
/// since it was last written; a failed write is tried again at the next call.
pub async fn persist_move_cost(s: &Arc<Shared>) {
    let bytes = {
        let a = lock(s);
        match StoredMoveCost::of(&a) {
            Some(b) if a.stored_move_cost.as_ref() != Some(&b) => b,
            _ => return,
        }
    };
    match s
        .store
        .put_guarded(MOVE_COST_KEY, Some(bytes.clone()))
        .await
    {
        Ok(()) => lock(s).stored_move_cost = Some(bytes),
        Err(e) => eprintln!("tern controller: the learnt move cost not stored: {e}"),
    }
}

/// Why a policy change was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SetPolicyError {
    /// A field out of range (400).
    #[error(transparent)]
    Invalid(#[from] tern_api::automation::PolicyError),
    /// Not leading (503).
    #[error("this controller is not the leader")]
    NotLeader,
    /// The store refused (503).
    #[error("the policy could not be stored ({0})")]
    NotStored(StoreError),
}

/// `PUT /v1/policy`: checks, stores, then puts the policy in force. Nothing changes on error.
pub async fn set_policy(s: &Arc<Shared>, policy: Policy) -> Result<Policy, SetPolicyError> {
    policy.validate()?;
    if s.core().generation().is_none() {
        return Err(SetPolicyError::NotLeader);
    }
    // One change at a time, in the order the store took them.
    let _batch = s.exec.lock().await;
    let bytes = serde_json::to_vec(&policy).expect("a policy serialises");
    s.store
        .put_guarded(POLICY_KEY, Some(bytes))
        .await
        .map_err(SetPolicyError::NotStored)?;
    let mut a = lock(s);
    a.lp.set_policy(policy.clone())?;
    Ok(policy)
}

/// `POST /v1/plans/{id}/apply`: the loop first sees the cluster as it is now (a plan computed on an
/// older picture is superseded), then starts the plan's actions.
pub async fn apply(s: &Arc<Shared>, id: u64) -> Result<Plan, PlanError> {
    let now = s.now_ms();
    let actions = {
        let t = {
            let core = s.core();
            let a = lock(s);
            telemetry(&core, &a)
        };
        let mut a = lock(s);
        if let Err(e) = a.lp.observe(now, &t) {
            eprintln!("tern controller: automation telemetry refused: {e}");
        }
        let r = a.lp.apply(now, id);
        a.count();
        r
    };
    hold_hosts(s);
    // stored first: a plan superseded here, or applying before its first action runs
    persist_plans(s).await;
    carry_out(s, actions?).await;
    persist_plans(s).await;
    let a = lock(s);
    a.lp.plan(id).cloned().ok_or(PlanError::Unknown(id))
}

/// `POST /v1/plans/{id}/reject`.
pub async fn reject(s: &Arc<Shared>, id: u64) -> Result<Plan, PlanError> {
    let now = s.now_ms();
    let plan = {
        let mut a = lock(s);
        let plan = a.lp.reject(now, id)?.clone();
        a.count();
        plan
    };
    persist_plans(s).await;
    Ok(plan)
}

/// One cycle: observe, tick, carry out, collect outcomes. Does nothing unless leading and ready.
pub async fn cycle(s: &Arc<Shared>) {
    let started = Instant::now();
    let (generation, ready) = {
        let core = s.core();
        (core.generation(), core.ready())
    };
    let Some(generation) = generation else {
        return;
    };
    if !ready || lock(s).generation != Some(generation) {
        return;
    }
    let now = s.now_ms();
    let mut actions = collect_outcomes(s, now);
    {
        let t = {
            let core = s.core();
            let a = lock(s);
            telemetry(&core, &a)
        };
        let mut a = lock(s);
        if let Err(e) = a.lp.observe(now, &t) {
            eprintln!("tern controller: automation telemetry refused: {e}");
        }
        actions.extend(a.lp.tick(now));
        a.note_round();
        a.count();
    }
    // the holds as this snapshot left them, before any action: a host that came back on by
    // itself (off → on in `observe`) may be a target of the actions below
    hold_hosts(s);
    if !actions.is_empty() {
        persist_plans(s).await;
    }
    carry_out(s, actions).await;
    predict_tasks(s);
    persist_plans(s).await;
    persist_move_cost(s).await;
    let mut a = lock(s);
    a.count();
    a.counters.cycles += 1;
    a.counters.last_cycle_s = started.elapsed().as_secs_f64();
}

/// Outcomes of the plan's migration tasks that ended and of power-ons that registered (or timed
/// out); returns the loop's follow-up actions. (A power-off's task reports its own outcome, see
/// [`start_power_off`].)
fn collect_outcomes(s: &Arc<Shared>, now: u64) -> Vec<Action> {
    let (tasks, up): (Vec<(u64, Option<TaskInfo>)>, Vec<String>) = {
        let core = s.core();
        let a = lock(s);
        let tasks = a
            .plan_tasks
            .keys()
            .map(|&id| (id, core.task(id).ok()))
            .collect();
        let up = core
            .hosts()
            .into_iter()
            .filter(|h| h.state == HostState::Up)
            .map(|h| h.name)
            .collect();
        (tasks, up)
    };
    let mut a = lock(s);
    let mut out = Vec::new();
    for (id, info) in tasks {
        let Some((plan, vm)) = a.plan_tasks.get(&id).cloned() else {
            continue;
        };
        let outcome = match info {
            None => Outcome::MigrationFailed {
                plan,
                vm,
                error: format!("task {id} is gone"),
            },
            Some(t) => match t.state {
                TaskState::Succeeded => Outcome::Migrated {
                    plan,
                    vm,
                    actual: actual_of(&t),
                },
                TaskState::Failed => Outcome::MigrationFailed {
                    plan,
                    vm,
                    error: t.error.unwrap_or_else(|| format!("task {id} failed")),
                },
                TaskState::Queued | TaskState::Running => continue,
            },
        };
        a.plan_tasks.remove(&id);
        match a.lp.report(now, outcome) {
            Ok(more) => out.extend(more),
            Err(e) => eprintln!("tern controller: automation outcome not matched: {e}"),
        }
    }
    let waking: Vec<(String, u64, Instant)> = a
        .waking
        .iter()
        .map(|(h, (p, d))| (h.clone(), *p, *d))
        .collect();
    for (host, plan, deadline) in waking {
        let outcome = if up.contains(&host) {
            Outcome::PoweredOn {
                plan,
                host: host.clone(),
            }
        } else if Instant::now() >= deadline {
            Outcome::PowerOnFailed {
                plan,
                host: host.clone(),
                error: format!("its agent did not register within {WAKE_TIMEOUT:?}"),
            }
        } else {
            continue;
        };
        a.waking.remove(&host);
        match a.lp.report(now, outcome) {
            Ok(more) => out.extend(more),
            Err(e) => eprintln!("tern controller: automation outcome not matched: {e}"),
        }
    }
    a.count();
    out
}

/// Starts `host`'s power-off (soft, then hard after [`SOFT_OFF_GRACE`]) on a blocking task and
/// returns at once: the host stays powering off for the loop (counted on, taking no VMs). The
/// task itself reports the outcome when the driver answers, whether cycles run or not (they wait
/// while a host is lost, as one being powered off soon is): done; or the power-off in doubt —
/// its plan fails, the host stays powering off — when the driver failed, or has not answered
/// within the timeout ([`POWER_OFF_TIMEOUT`]); the doubt is settled as [`power_off_ended`]
/// says.
fn start_power_off(s: &Arc<Shared>, plan: u64, host: String, driver: Arc<dyn PowerDriver>) {
    let (token, timeout) = {
        let mut a = lock(s);
        a.power_offs_started += 1;
        let token = a.power_offs_started;
        a.powering_off
            .insert(host.clone(), PoweringOff { plan, token });
        (token, a.power_off_timeout)
    };
    let s = Arc::clone(s);
    tokio::spawn(async move {
        let mut call = tokio::task::spawn_blocking(move || {
            driver.power_off(OffMode::SoftThenHard {
                grace: SOFT_OFF_GRACE,
            })
        });
        type Joined = Result<Result<OffOutcome, PowerOffError>, tokio::task::JoinError>;
        let answer = |r: Joined| match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(chain(&e)),
            Err(e) => Err(e.to_string()),
        };
        let end = match tokio::time::timeout(timeout, &mut call).await {
            Ok(r) => PowerOffEnd::Answer(answer(r)),
            Err(_) => {
                let no_answer = PowerOffEnd::NoAnswerWithin(timeout);
                power_off_ended(&s, plan, token, &host, no_answer).await;
                PowerOffEnd::Answer(answer(call.await))
            }
        };
        power_off_ended(&s, plan, token, &host, end).await;
    });
}

/// What became of power-off `token` of `host` for plan `plan`: reported to the loop as the
/// outcome of its plan's action while that action waits for it; a later answer (after the
/// timeout, or a former term's power-off) settles the host if the loop holds that plan's
/// power-off in doubt, and is only logged otherwise. A driver's error never makes the host on by
/// itself: the host may be shutting down all the same (a soft power-off under way when the
/// driver gave up), and one taken for on would stay on for good, never woken. For a host whose
/// agent no longer reports, the power-off is settled off (on time: reported in doubt and settled
/// at once); for one whose agent still reports, an error on time puts it in doubt, watched for
/// the power-off timeout ([`watch_power_off_in_doubt`]) as one whose driver does not answer in
/// time: off if the agent's registration ran out by then, on if it still reports (a soft
/// power-off the driver gave up on may still end well after the error); a late error leaves
/// the doubt to the watch that began with it. Carries out what follows and stores the plans.
/// Nothing happens unless this controller leads in the term its loop was built for (a term that
/// ended: the next one's loop holds the stored doubt).
async fn power_off_ended(s: &Arc<Shared>, plan: u64, token: u64, host: &str, end: PowerOffEnd) {
    let now = s.now_ms();
    let leading = s.core().generation();
    let up = host_up(s, host);
    let mut watch = None;
    let more = {
        let mut a = lock(s);
        let Some(generation) = leading.filter(|g| a.generation == Some(*g)) else {
            eprintln!(
                "tern controller: host {host}'s power driver answered ({end:?}) while this \
                 controller does not lead; ignored"
            );
            return;
        };
        let waited = if a.powering_off.get(host).is_some_and(|p| p.token == token) {
            a.powering_off.remove(host).map(|p| p.plan)
        } else {
            None
        };
        let report = |a: &mut Automation, outcome: Outcome| match a.lp.report(now, outcome) {
            Ok(more) => more,
            Err(e) => {
                eprintln!("tern controller: automation outcome not matched: {e}");
                Vec::new()
            }
        };
        let in_doubt = |a: &mut Automation, plan, error| {
            let host = host.to_string();
            report(a, Outcome::PowerOffInDoubt { plan, host, error })
        };
        let more = match (waited, end) {
            (Some(plan), PowerOffEnd::Answer(Ok(()))) => {
                let host = host.to_string();
                report(&mut a, Outcome::PoweredOff { plan, host })
            }
            (Some(plan), PowerOffEnd::Answer(Err(error))) if !up => {
                let why = "its agent no longer reports";
                let error = format!("its power driver failed ({error}) while {why}");
                let more = in_doubt(&mut a, plan, error);
                a.lp.power_off_settled(now, plan, host, true, why);
                more
            }
            (Some(plan), PowerOffEnd::Answer(Err(error))) => {
                let error = format!("its power driver failed ({error}) while its agent reports");
                let more = in_doubt(&mut a, plan, error);
                let since = "its power driver failed";
                watch = Some((generation, plan, a.power_off_timeout, since));
                more
            }
            (Some(plan), PowerOffEnd::NoAnswerWithin(t)) => {
                let error = format!("its power driver did not answer within {t:?}");
                let more = in_doubt(&mut a, plan, error);
                let since = "its power-off came into doubt";
                watch = Some((generation, plan, a.power_off_timeout, since));
                more
            }
            (None, PowerOffEnd::Answer(Err(e))) if up => {
                // The doubt stays: the watch that began with it (timeout or take-over) decides.
                let still = a.lp.power_offs_in_doubt().get(host) == Some(&plan);
                eprintln!(
                    "tern controller: host {host}'s power driver answered late ({e}) while its \
                     agent reports; {}",
                    if still {
                        "still in doubt, its watch decides"
                    } else {
                        "ignored"
                    }
                );
                Vec::new()
            }
            (None, PowerOffEnd::Answer(answer)) => {
                let (off, why) = match &answer {
                    Ok(()) => (true, "its power driver answered late: off".to_string()),
                    Err(e) => (
                        true,
                        format!(
                            "its power driver answered late ({e}) while its agent no longer \
                             reports"
                        ),
                    ),
                };
                if a.lp.power_off_settled(now, plan, host, off, &why) {
                    eprintln!("tern controller: host {host}'s power-off settled: {why}");
                } else {
                    eprintln!(
                        "tern controller: host {host}'s power driver answered too late ({}); \
                         ignored",
                        match &answer {
                            Ok(()) => "powered off",
                            Err(e) => e.as_str(),
                        }
                    );
                }
                Vec::new()
            }
            (None, PowerOffEnd::NoAnswerWithin(_)) => Vec::new(),
        };
        a.count();
        more
    };
    if let Some((generation, plan, wait, since)) = watch {
        watch_power_off_in_doubt(s, generation, plan, host.to_string(), wait, since);
    }
    carry_out(s, more).await;
    persist_if_leading(s).await;
}

/// Carries out the loop's actions in order, feeding back the immediate outcomes (and carrying
/// out what those lead to).
async fn carry_out(s: &Arc<Shared>, actions: Vec<Action>) {
    let mut queue: std::collections::VecDeque<Action> = actions.into();
    while let Some(action) = queue.pop_front() {
        let outcome = match action {
            Action::Migrate {
                plan,
                vm,
                to,
                post_copy_after,
                ..
            } => {
                let r = s
                    .api(|c, now| c.migrate_vm_with(&vm, Some(&to), post_copy_after, now))
                    .await;
                match r {
                    Ok(task) => {
                        let mut a = lock(s);
                        a.plan_tasks.insert(task.task, (plan, vm.clone()));
                        let predicted = a.lp.plan(plan).and_then(|p| {
                            p.actions.iter().find_map(|x| match x {
                                PlanAction::Migrate {
                                    vm: v, predicted, ..
                                } if *v == vm => *predicted,
                                _ => None,
                            })
                        });
                        if let Some(p) = predicted {
                            a.predicted.insert(task.task, p);
                        }
                        None
                    }
                    Err(e) => Some(Outcome::MigrationFailed {
                        plan,
                        vm,
                        error: e.to_string(),
                    }),
                }
            }
            Action::PowerOff { plan, host } => {
                let driver = lock(s).drivers.get(&host).cloned();
                // held out of the core's placement before the driver is called, and empty there
                let occupants = {
                    hold_hosts(s);
                    s.core().occupants(&host)
                };
                match driver {
                    None => Some(Outcome::PowerOffFailed {
                        plan,
                        error: format!("no power driver for host {host}"),
                        host,
                    }),
                    Some(_) if !occupants.is_empty() => Some(Outcome::PowerOffFailed {
                        plan,
                        error: format!(
                            "host {host} is no longer empty: {} placed or moving there",
                            occupants.join(", ")
                        ),
                        host,
                    }),
                    Some(d) => {
                        start_power_off(s, plan, host, d);
                        None
                    }
                }
            }
            Action::PowerOn { plan, host } => {
                let driver = lock(s).drivers.get(&host).cloned();
                match driver {
                    None => Some(Outcome::PowerOnFailed {
                        plan,
                        error: format!("no power driver for host {host}"),
                        host,
                    }),
                    Some(d) => {
                        let r = tokio::task::spawn_blocking(move || d.power_on()).await;
                        match r {
                            Ok(Ok(())) => {
                                lock(s)
                                    .waking
                                    .insert(host, (plan, Instant::now() + WAKE_TIMEOUT));
                                None
                            }
                            Ok(Err(e)) => Some(Outcome::PowerOnFailed {
                                plan,
                                host,
                                error: chain(&e),
                            }),
                            Err(e) => Some(Outcome::PowerOnFailed {
                                plan,
                                host,
                                error: e.to_string(),
                            }),
                        }
                    }
                }
            }
        };
        if let Some(o) = outcome {
            let now = s.now_ms();
            let mut a = lock(s);
            match a.lp.report(now, o) {
                Ok(more) => queue.extend(more),
                Err(e) => eprintln!("tern controller: automation outcome not matched: {e}"),
            }
            a.count();
        }
    }
    hold_hosts(s);
}

/// The core's power holds brought up to date with the loop ([`Controller::set_power_holds`]):
/// every host the loop has powering off (or in doubt) or off. Takes the core's lock, then the
/// loop's (call it holding neither).
fn hold_hosts(s: &Shared) {
    let now = s.now_ms();
    let mut core = s.core();
    let holds = {
        let a = lock(s);
        core.host_names()
            .chain(a.lp.power_offs_in_doubt().keys().map(String::as_str))
            .filter_map(|h| match a.lp.host_power(h)? {
                p @ (HostPower::PoweringOff | HostPower::Off) => Some((h.to_string(), p)),
                HostPower::On | HostPower::PoweringOn | HostPower::FailedToWake => None,
            })
            .collect()
    };
    core.set_power_holds(holds, now);
}

/// An error and its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Gives every migration task without a prediction one: the loop's model (the migration's own
/// predictor) from the VM's memory, its last reported resident memory and dirty rate, its volume
/// disk, and the link into the task's target (measured, else the configured default). Then measures the link
/// of every succeeded migration task not measured yet (in task order).
fn predict_tasks(s: &Arc<Shared>) {
    let core = s.core();
    let mut a = lock(s);
    let cfg = *a.lp.config();
    let tasks = core.tasks(false);
    for t in &tasks {
        if t.kind == TaskKind::Maintenance || a.model_time.contains_key(&t.id) {
            continue;
        }
        let Some(vm) = t.vm.as_deref().and_then(|v| core.vm(v).ok()) else {
            continue;
        };
        let link =
            t.to.as_deref()
                .and_then(|h| a.links.get(h))
                .unwrap_or(cfg.link_bytes_per_sec);
        let p = predict_move(&MoveInput {
            memory_bytes: vm.spec.memory_mib << 20,
            resident_bytes: a.vm_rss.get(&vm.name).map(|r| r << 20),
            dirty_pages_per_sec: a.vm_dirty.get(&vm.name).copied().unwrap_or(0.0),
            link_bytes_per_sec: link,
            downtime_budget_ms: cfg.downtime_budget_ms,
            volume_disks: u32::from(vm.spec.disk.is_some()),
        });
        let u = a.vm_cpu.get(&vm.name).copied().unwrap_or(0.0);
        a.model_time.insert(t.id, (p.time_s, u));
        // a plan's move has its prediction already (with the overhead when it was planned)
        if !a.predicted.contains_key(&t.id) {
            let with = a.overhead.estimate().add_to(p, u);
            a.predicted.insert(t.id, with);
        }
    }
    for t in &tasks {
        if t.kind == TaskKind::Maintenance || a.measured.contains(&t.id) {
            continue;
        }
        let (Some(mut actual), Some(to)) = (actual_of(t), t.to.as_deref()) else {
            continue;
        };
        a.measured.insert(t.id);
        // what the move took beyond the model teaches the overhead; the link is then measured
        // on the time less that overhead
        let (model_s, u) = a.model_time.get(&t.id).copied().unwrap_or((f64::NAN, 0.0));
        if model_s.is_finite() {
            a.overhead.observe(u, actual.time_s - model_s);
        }
        actual.time_s -= a.overhead.estimate().at(u);
        let memory =
            t.vm.as_deref()
                .and_then(|v| core.vm(v).ok())
                .map_or(0, |v| v.spec.memory_mib << 20);
        if let Some(b) = link_from_migration(memory, &actual, cfg.downtime_budget_ms) {
            a.links.observe(to, b);
        }
    }
    let overhead = a.overhead.estimate();
    a.lp.set_overhead(overhead);
    // forget tasks the core no longer keeps
    let kept: BTreeSet<u64> = tasks.iter().map(|t| t.id).collect();
    a.measured.retain(|id| kept.contains(id));
    a.model_time.retain(|id, _| kept.contains(id));
}

/// Runs [`cycle`] every [`CYCLE`] for the life of the process.
pub fn start(s: Arc<Shared>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(CYCLE);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            cycle(&s).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_move_cost_of_the_older_form_keeps_its_links_and_starts_the_overhead_afresh() {
        // The form controllers stored before the overhead became a window of recent moves.
        let older = br#"{"overhead":{"w":6.0,"wx":0.6,"wy":2.4,"wxx":0.08,"wxy":0.24,"n":6},
            "links":{"h1":900000000.0,"h2":400000000.0}}"#;
        let (overhead, links) = StoredMoveCost::read(older).expect("the links are read");
        assert!(overhead.is_err(), "the older overhead is not taken");
        assert_eq!(links.measured().get("h1"), Some(&9e8));
        assert_eq!(links.measured().get("h2"), Some(&4e8));

        // The current form comes back whole.
        let mut o = OverheadEstimator::default();
        for u in [0.05, 0.1, 0.2] {
            o.observe(u, 0.4);
        }
        let mut l = LinkEstimator::default();
        l.observe("h1", 9e8);
        let bytes = serde_json::to_vec(&StoredMoveCost {
            overhead: o.state(),
            links: l.measured().clone(),
        })
        .unwrap();
        let (overhead, links) = StoredMoveCost::read(&bytes).unwrap();
        let overhead = overhead.expect("the current overhead is taken");
        assert_eq!(overhead.count(), 3);
        assert_eq!(overhead.estimate(), o.estimate());
        assert_eq!(links.measured(), l.measured());

        // Bytes that are not a move cost at all are refused whole.
        assert!(StoredMoveCost::read(b"{\"links\":7}").is_err());
        assert!(StoredMoveCost::read(b"not json").is_err());
    }

    #[test]
    fn every_round_is_kept_with_the_load_it_decided_on_up_to_rounds_kept() {
        let mut a = Automation::new(0);
        a.lp.set_policy(Policy {
            interval_s: 2,
            ..Policy::default()
        })
        .unwrap();
        let host = HostSample {
            name: "h1".into(),
            cores: 2,
            power_model: "hp-ml110-g5".into(),
            up: true,
            maintenance: false,
            cpu_utilization: None,
            parked_cores: None,
            migration_link_bytes_per_sec: None,
        };
        let vm = |u: f64| VmSample {
            name: "a".into(),
            host: Some("h1".into()),
            vcpus: 1,
            memory_mib: 64,
            resident_mib: None,
            cpu_utilization: Some(u),
            dirty_pages_per_sec: None,
            volume_disks: 1,
            pinned: false,
            anti_affinity: None,
            migrating: false,
        };
        // a cycle every 500 ms, a little late now and then, the VM's load rising by 0.0005 a
        // cycle: 300 rounds in 600 s
        for k in 0..1200u64 {
            let now = k * 500 + [0, 2, 1][(k % 3) as usize];
            let t = Telemetry {
                hosts: vec![host.clone()],
                vms: vec![vm(k as f64 / 2000.0)],
            };
            a.lp.observe(now, &t).unwrap();
            a.lp.tick(now);
            a.note_round();
        }
        let r = a.rounds(600_000);
        assert_eq!((r.now_ms, r.interval_s), (600_000, 2));
        assert_eq!(
            r.rounds.len(),
            ROUNDS_KEPT,
            "the newest {ROUNDS_KEPT} of 300"
        );
        for (i, round) in r.rounds.iter().enumerate() {
            // round n ran at cycle 4n, on the 2 s grid; it kept the newest ones
            let n = (300 - ROUNDS_KEPT + i) as u64;
            assert!(round.at_ms.abs_diff(n * 2000) <= 2, "{i}: {round:?}");
            // its point is the mean of the four cycles' loads since the round before
            let want = (4 * n) as f64 / 2000.0 - 1.5 / 2000.0;
            assert_eq!(round.points.len(), 1, "{round:?}");
            assert_eq!(round.points[0].vm, "a");
            assert!(
                (round.points[0].utilization - want).abs() < 1e-9,
                "round {n}: {} against {want}",
                round.points[0].utilization
            );
        }
    }
}

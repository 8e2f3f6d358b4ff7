//! The loop itself: telemetry in, plans and actions out, outcomes back in.
//!
//! ```text
//!   shell                                   Loop (pure)
//!   ─────                                   ───────────
//!   observe(now, telemetry)  ───────────▶  samples, placement version, hold timers
//!   tick(now)                ───────────▶  every interval: history point, policy round, plan
//!                            ◀───────────  actions (full automation, or continuing a plan)
//!   apply(now, id) / reject  ───────────▶  proposed → applying (or superseded) / rejected
//!                            ◀───────────  actions
//!   report(now, outcome)     ───────────▶  action done/failed, cooldown, plan applied/failed
//!                            ◀───────────  further actions
//! ```
//!
//! Plan states: `proposed → applying → applied | failed`; `proposed → rejected | superseded |
//! vetoed`. One plan applies at a time; while it does, rounds keep the history but make no plan.
//!
//! A power-off whose end is not known — its driver did not answer in time
//! ([`Outcome::PowerOffInDoubt`]), or the leader carrying it out stopped leading (a restored
//! `applying` plan, [`Loop::restore_plans`]) — fails its plan but keeps its host powering off:
//! counted on, taking no VMs, in no round's view, until [`Loop::power_off_settled`] says how it
//! ended or a snapshot shows the host down (off). The rounds go on meanwhile. The doubt is kept
//! in the plan itself, so that the plans a leader stores carry it to the next: the power-off
//! action stays `running` in the failed plan until it settles (then `done` or `failed`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use tern_api::automation::{
    ActionStatus, AutomationLevel, HostPower, MigrationActual, MigrationPrediction, Plan,
    PlanAction, PlanEffect, PlanState, Policy, PolicyError, PredictedOutcome, SeriesPoint,
    StatsSeries,
};
use tern_policy::cluster::HISTORY_LEN;
use tern_policy::{ClusterView, HostView, Model, PolicyConfig, SplitMix64, VmView};
use tern_sim::preview::{
    Forecast, PreviewHost, PreviewInput, PreviewMove, PreviewOutcome, PreviewVm, Scenario, preview,
};

use crate::cost::{MoveInput, Overhead, typical_link};
use crate::energy::{HostPowerSpec, KNOWN_MODELS};
use crate::fallback::plan_move;
use crate::knobs::Knobs;
use crate::power::{PowerRequestError, PowerTracker};
use crate::rules::{Filtered, Fixed, MoveKind, Rules, enforce, optimize_with_rules};
use crate::telemetry::{HostSample, Telemetry, TelemetryError, VmSample};

/// Relative difference in predicted energy below which a plan counts as meeting the policy's
/// `min_improvement_pct` ([`Loop`]'s preview veto): model noise, not a saving or a loss (a
/// 50 ms migration's modelled CPU on two hosts is about 1e-9 of a 10-minute horizon's energy).
pub const ENERGY_TIE: f64 = 1e-6;

/// Settings of the loop that are not the operator's policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoopConfig {
    /// Seed of the random selection (RS).
    pub seed: u64,
    /// Empty powered-on hosts the controller's HA admission control wants kept (beyond
    /// `spare_hosts`).
    pub ha_reserve_hosts: u32,
    /// The migration link, bytes per second, for hosts whose telemetry carries no measured one
    /// (`HostSample::migration_link_bytes_per_sec`).
    pub link_bytes_per_sec: f64,
    /// The longest acceptable pause of a migration, milliseconds (the migration's own default).
    pub downtime_budget_ms: f64,
    /// How far the preview looks ahead, seconds (0: no preview, no veto by preview).
    pub preview_horizon_s: u32,
    /// How the preview forecasts demand.
    pub forecast: Forecast,
    /// Capacity counts as short when the VMs' demand exceeds this share of the powered-on cores.
    pub demand_high_water: f64,
    /// Plans kept (the oldest final ones are forgotten first).
    pub plans_kept: usize,
    /// Points of the series kept.
    pub series_kept: usize,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            seed: 1,
            ha_reserve_hosts: 0,
            link_bytes_per_sec: 125e6,
            downtime_budget_ms: 50.0,
            preview_horizon_s: 600,
            forecast: Forecast::Replay,
            demand_high_water: 0.8,
            plans_kept: 200,
            series_kept: 360,
        }
    }
}

/// Something for the shell to carry out; its outcome comes back through [`Loop::report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Move `vm` live from `from` to `to`.
    Migrate {
        /// The plan.
        plan: u64,
        /// The VM.
        vm: String,
        /// Its host now.
        from: String,
        /// Its destination.
        to: String,
        /// Switch to post-copy after this many pre-copy rounds (a move planned by the
        /// post-copy fallback); `None`: pre-copy only.
        post_copy_after: Option<u32>,
    },
    /// Power `host` off (it is empty).
    PowerOff {
        /// The plan.
        plan: u64,
        /// The host.
        host: String,
    },
    /// Power `host` on.
    PowerOn {
        /// The plan.
        plan: u64,
        /// The host.
        host: String,
    },
}

/// What became of an action.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The VM runs on the target.
    Migrated {
        /// The plan.
        plan: u64,
        /// The VM.
        vm: String,
        /// What it cost, if measured.
        actual: Option<MigrationActual>,
    },
    /// The migration failed; the VM still runs on the source.
    MigrationFailed {
        /// The plan.
        plan: u64,
        /// The VM.
        vm: String,
        /// Why.
        error: String,
    },
    /// The host is off.
    PoweredOff {
        /// The plan.
        plan: u64,
        /// The host.
        host: String,
    },
    /// The power-off failed and the host still runs (the controller reports this for checks
    /// before the driver is called; a driver's own error is in doubt, [`Outcome::PowerOffInDoubt`],
    /// until the controller's watch or a snapshot decides).
    PowerOffFailed {
        /// The plan.
        plan: u64,
        /// The host.
        host: String,
        /// Why.
        error: String,
    },
    /// The power-off's driver has not answered in time, or failed while the host may be shutting
    /// down all the same: the plan fails, but whether the host goes off is not known (its BMC
    /// may still be turning it off). The host stays powering off
    /// — counted on, taking no VMs, in no round's view — and the plan's power-off action
    /// `running`, until [`Loop::power_off_settled`] says how it ended or a snapshot shows the
    /// host down (then it is off).
    PowerOffInDoubt {
        /// The plan.
        plan: u64,
        /// The host.
        host: String,
        /// Why.
        error: String,
    },
    /// The host is on (booted and registered).
    PoweredOn {
        /// The plan.
        plan: u64,
        /// The host.
        host: String,
    },
    /// The host did not come up: marked as failed to wake.
    PowerOnFailed {
        /// The plan.
        plan: u64,
        /// The host.
        host: String,
        /// Why.
        error: String,
    },
}

/// Why `apply` or `reject` refused (the REST layer answers 404 or 409 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No such plan.
    #[error("no plan {0}")]
    Unknown(u64),
    /// The plan is not proposed any more.
    #[error("plan {id} is {}{}", .state.name(), .detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    NotProposed {
        /// The plan.
        id: u64,
        /// Its state.
        state: PlanState,
        /// Why it is in that state, if known.
        detail: Option<String>,
    },
    /// The cluster changed since the plan was computed; it is now superseded.
    #[error(
        "plan {id} is superseded: the cluster changed since it was computed (version {basis}, now {now})"
    )]
    Superseded {
        /// The plan.
        id: u64,
        /// The version it was computed on.
        basis: u64,
        /// The version now.
        now: u64,
    },
    /// Another plan is being applied.
    #[error("plan {id} cannot start: plan {applying} is being applied")]
    Busy {
        /// The plan asked for.
        id: u64,
        /// The plan under way.
        applying: u64,
    },
}

/// An outcome the loop cannot match with a running action of its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no running action of plan {plan} for {what}")]
pub struct OutcomeError {
    /// The plan named.
    pub plan: u64,
    /// The VM or host named.
    pub what: String,
}

/// Why an operator's clear was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClearError {
    /// No such host.
    #[error("unknown host {0}")]
    UnknownHost(String),
    /// The host is not marked.
    #[error(transparent)]
    NotMarked(#[from] PowerRequestError),
}

/// What the last round saw and decided, for diagnostics and the dashboard.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundReport {
    /// When it ran.
    pub at_ms: u64,
    /// Hosts in the policy's view.
    pub hosts_in_view: usize,
    /// VMs in the policy's view.
    pub vms_in_view: usize,
    /// Hosts the detector found overloaded.
    pub overloaded: Vec<String>,
    /// Hosts drained by the plan.
    pub drained: Vec<String>,
    /// Moves the policy wanted that the rules or the hysteresis took out: (VM, why).
    pub dropped: Vec<(String, String)>,
    /// VMs on overloaded hosts held back because their move is predicted not to converge:
    /// (VM, why).
    pub held_back: Vec<(String, String)>,
    /// The plan made this round, if any.
    pub plan: Option<u64>,
    /// Capacity short since, if it is.
    pub short_since_ms: Option<u64>,
    /// The history point each VM got this round (step 1 of a round: the mean of its utilisation
    /// samples since the last round, 0..1 of its vCPUs); a VM with no sample since is not in it.
    /// What the round decided on, for a replay fed the loop's own inputs.
    pub points: BTreeMap<String, f64>,
}

#[derive(Debug, Clone)]
struct HostTrack {
    sample: HostSample,
    spec: HostPowerSpec,
    power: PowerTracker,
    over_since: Option<u64>,
    under_since: Option<u64>,
    empty_since: Option<u64>,
}

#[derive(Debug, Clone)]
struct VmTrack {
    sample: VmSample,
    /// One point per round, most recent first.
    history: VecDeque<f64>,
    acc_sum: f64,
    acc_n: u32,
    last_move_ms: Option<u64>,
    backoff: u32,
    cooldown_until_ms: u64,
}

impl VmTrack {
    fn demand_cores(&self) -> f64 {
        let u = self
            .history
            .front()
            .copied()
            .or(self.sample.cpu_utilization)
            .unwrap_or(0.0);
        u * f64::from(self.sample.vcpus)
    }
}

#[derive(Debug, Clone)]
struct PlanRec {
    plan: Plan,
    /// The placement it was computed on ([`Loop::placement_fingerprint`]).
    fingerprint: u64,
    /// Restored from another loop (a previous leader): its basis is that loop's version until
    /// this loop's first snapshot shows the same placement.
    restored: bool,
    /// Made by another loop (restored).
    inherited: bool,
}

/// The automation loop's pure core. See the crate docs for a walk-through.
#[derive(Debug, Clone)]
pub struct Loop {
    policy: Policy,
    knobs: Knobs,
    cfg: LoopConfig,
    rng: SplitMix64,
    hosts: BTreeMap<String, HostTrack>,
    vms: BTreeMap<String, VmTrack>,
    version: u64,
    plans: BTreeMap<u64, PlanRec>,
    next_plan: u64,
    applying: Option<u64>,
    /// Hosts whose power-off's end is not known, with the plan that asked for it: held powering
    /// off until [`Loop::power_off_settled`] or a snapshot showing them down.
    off_in_doubt: BTreeMap<String, u64>,
    /// The grid point of the last round (see [`Loop::tick`]): rounds fall due every interval
    /// from it, whenever within the tolerance the shell's tick lands.
    round_due_ms: Option<u64>,
    /// Rounds run since the loop started.
    rounds_run: u64,
    /// The first snapshot's time.
    first_seen_ms: Option<u64>,
    short_since: Option<u64>,
    overhead: Overhead,
    series: VecDeque<SeriesPoint>,
    energy_kwh: f64,
    active_rounds: u64,
    overloaded_rounds: u64,
    last_report: RoundReport,
}

/// A round runs this fraction of the interval before its grid point at the earliest
/// ([`Loop::tick`]): 100 ms at 2 s.
pub const ROUND_TOLERANCE_DIV: u64 = 20;

fn ms(s: u32) -> u64 {
    u64::from(s) * 1000
}

impl Loop {
    /// A loop under `policy` (checked first) with `cfg`.
    pub fn new(policy: Policy, cfg: LoopConfig) -> Result<Loop, PolicyError> {
        policy.validate()?;
        Ok(Loop {
            knobs: Knobs::of(&policy),
            policy,
            rng: SplitMix64::new(cfg.seed),
            cfg,
            hosts: BTreeMap::new(),
            vms: BTreeMap::new(),
            version: 0,
            plans: BTreeMap::new(),
            next_plan: 1,
            applying: None,
            off_in_doubt: BTreeMap::new(),
            round_due_ms: None,
            rounds_run: 0,
            first_seen_ms: None,
            short_since: None,
            overhead: Overhead::default(),
            series: VecDeque::new(),
            energy_kwh: 0.0,
            active_rounds: 0,
            overloaded_rounds: 0,
            last_report: RoundReport::default(),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replaces the policy if it is valid; nothing changes otherwise.
    pub fn set_policy(&mut self, policy: Policy) -> Result<(), PolicyError> {
        policy.validate()?;
        self.knobs = Knobs::of(&policy);
        self.policy = policy;
        Ok(())
    }

    /// The settings that are not the operator's.
    pub fn config(&self) -> &LoopConfig {
        &self.cfg
    }

    /// The measured cost of a move beyond the migration model's time (the shell learns it with
    /// [`crate::cost::OverheadEstimator`]): added to each planned move's predicted time. The
    /// policy's choice (MMT's time order) reads the model's time alone.
    pub fn set_overhead(&mut self, overhead: Overhead) {
        self.overhead = overhead;
    }

    /// The HA reserve the controller's admission control keeps (empty hosts kept on).
    pub fn set_ha_reserve(&mut self, hosts: u32) {
        self.cfg.ha_reserve_hosts = hosts;
    }

    /// The cluster version: bumped on every placement or host-state change the loop is told of.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// A fingerprint of what a plan's validity rests on: the hosts that take VMs (name, cores)
    /// and every VM's placement and rules (name, host, vCPUs, pinned, anti-affinity group).
    /// Two loops that see the same cluster give the same figure (FNV-1a over a fixed order),
    /// so a plan made by one can be checked by the other.
    pub fn placement_fingerprint(&self) -> u64 {
        let mut h = Fnv::default();
        for (name, t) in self.hosts.iter().filter(|(_, t)| Self::takes_vms(t)) {
            h.str(name);
            h.u64(u64::from(t.sample.cores));
        }
        h.u64(u64::MAX);
        for (name, v) in &self.vms {
            h.str(name);
            h.str(v.sample.host.as_deref().unwrap_or(""));
            h.u64(u64::from(v.sample.vcpus));
            h.u64(u64::from(v.sample.pinned));
            h.str(v.sample.anti_affinity.as_deref().unwrap_or(""));
        }
        h.0
    }

    /// A plan with the placement fingerprint it was computed on, for the shell to store.
    pub fn plan_fingerprint(&self, id: u64) -> Option<u64> {
        self.plans.get(&id).map(|r| r.fingerprint)
    }

    /// Takes the plans a previous leader stored (each with its placement fingerprint), before
    /// this loop acts: new plans are numbered after them. A proposal stays proposed; on the
    /// loop's first snapshot it is rebased on this loop's version if that snapshot shows the
    /// placement it was computed on, else superseded. A plan that was being applied is failed
    /// (the leader carrying it out is gone; its migrations end as the agents carry them out,
    /// and the next snapshots show where the VMs are). A host whose power-off is `running` in a
    /// plan of any state (one being applied, or one failed with its power-off in doubt) is held
    /// powering off (its BMC may still be turning it off), the action left `running`, until
    /// [`Loop::power_off_settled`] or a snapshot that shows it down. Final plans are kept as
    /// they were. Nothing is restored over a plan this loop already holds.
    pub fn restore_plans(&mut self, now_ms: u64, plans: Vec<(Plan, u64)>) {
        for (mut plan, fingerprint) in plans {
            if self.plans.contains_key(&plan.id) {
                continue;
            }
            self.next_plan = self.next_plan.max(plan.id.saturating_add(1));
            for a in &plan.actions {
                if let PlanAction::PowerOff { host, status, .. } = a
                    && *status == ActionStatus::Running
                {
                    // the newest plan's power-off of a host is the one that counts
                    let held = self.off_in_doubt.entry(host.clone()).or_insert(plan.id);
                    *held = (*held).max(plan.id);
                }
            }
            if plan.state == PlanState::Applying {
                for a in &mut plan.actions {
                    if !matches!(a, PlanAction::PowerOff { .. }) {
                        set_status_if(a, ActionStatus::Running, ActionStatus::Failed);
                    }
                    set_status_if(a, ActionStatus::Pending, ActionStatus::Skipped);
                }
                finish(
                    &mut plan,
                    PlanState::Failed,
                    now_ms,
                    "interrupted: the controller applying it stopped leading".into(),
                );
            }
            let restored = plan.state == PlanState::Proposed;
            self.plans.insert(
                plan.id,
                PlanRec {
                    plan,
                    fingerprint,
                    restored,
                    inherited: true,
                },
            );
        }
    }

    /// Rebases restored proposals on this loop's version, or supersedes them (after a snapshot).
    fn rebase_restored(&mut self, now_ms: u64) {
        if !self.plans.values().any(|r| r.restored) {
            return;
        }
        let now = self.placement_fingerprint();
        let version = self.version;
        for r in self.plans.values_mut().filter(|r| r.restored) {
            r.restored = false;
            if r.plan.state != PlanState::Proposed {
                continue;
            }
            if r.fingerprint == now {
                r.plan.basis = version;
            } else {
                finish(
                    &mut r.plan,
                    PlanState::Superseded,
                    now_ms,
                    "the cluster changed since it was computed (seen by the next leader)".into(),
                );
            }
        }
    }

    /// Tells the loop the cluster changed in a way telemetry will not show at once (an operator's
    /// migration, a host entering maintenance): plans computed before are superseded.
    pub fn cluster_changed(&mut self) {
        self.version += 1;
    }

    /// Takes a snapshot of the cluster. A placement or host-state change bumps the version.
    /// A refused snapshot changes nothing.
    pub fn observe(&mut self, now_ms: u64, t: &Telemetry) -> Result<(), TelemetryError> {
        t.validate()?;
        let mut specs = Vec::with_capacity(t.hosts.len());
        for h in &t.hosts {
            let spec = HostPowerSpec::by_name(&h.power_model).ok_or_else(|| {
                TelemetryError::UnknownPowerModel {
                    host: h.name.clone(),
                    name: h.power_model.clone(),
                    known: KNOWN_MODELS.to_string(),
                }
            })?;
            specs.push(spec);
        }
        let mut changed = false;
        let seen: BTreeSet<&str> = t.hosts.iter().map(|h| h.name.as_str()).collect();
        let before = self.hosts.len();
        self.hosts.retain(|n, _| seen.contains(n.as_str()));
        changed |= self.hosts.len() != before;
        // a power-off in doubt ends when its host is seen down (off) or leaves the cluster
        let ended: Vec<(String, bool)> = self
            .off_in_doubt
            .keys()
            .filter_map(|n| match t.hosts.iter().find(|h| h.name == *n) {
                Some(h) if h.up => None,
                Some(_) => Some((n.clone(), true)),
                None => Some((n.clone(), false)),
            })
            .collect();
        for (n, seen_down) in ended {
            let Some(&plan) = self.off_in_doubt.get(&n) else {
                continue;
            };
            if seen_down {
                self.power_off_settled(now_ms, plan, &n, true, "seen down");
            } else {
                self.off_in_doubt.remove(&n);
                self.note_power_off_end(
                    plan,
                    &n,
                    ActionStatus::Failed,
                    format!("{n} left the cluster before its power was known"),
                );
            }
        }
        for (h, spec) in t.hosts.iter().zip(specs) {
            match self.hosts.get_mut(&h.name) {
                Some(tr) => {
                    if tr.sample.up != h.up
                        || tr.sample.maintenance != h.maintenance
                        || tr.sample.cores != h.cores
                    {
                        changed = true;
                    }
                    let was_on = tr.power.is_on();
                    tr.power.observe_up(h.up, now_ms);
                    changed |= was_on != tr.power.is_on();
                    tr.sample = h.clone();
                    tr.spec = spec;
                }
                None => {
                    changed = true;
                    let phase = match (h.up, self.off_in_doubt.contains_key(&h.name)) {
                        (true, true) => HostPower::PoweringOff,
                        (true, false) => HostPower::On,
                        (false, _) => HostPower::Off,
                    };
                    self.hosts.insert(
                        h.name.clone(),
                        HostTrack {
                            sample: h.clone(),
                            spec,
                            power: PowerTracker::new(h.name.clone(), phase, now_ms),
                            over_since: None,
                            under_since: None,
                            empty_since: None,
                        },
                    );
                }
            }
        }
        let seen: BTreeSet<&str> = t.vms.iter().map(|v| v.name.as_str()).collect();
        let before = self.vms.len();
        self.vms.retain(|n, _| seen.contains(n.as_str()));
        changed |= self.vms.len() != before;
        for v in &t.vms {
            match self.vms.get_mut(&v.name) {
                Some(tr) => {
                    if tr.sample.host != v.host
                        || tr.sample.pinned != v.pinned
                        || tr.sample.anti_affinity != v.anti_affinity
                        || tr.sample.vcpus != v.vcpus
                    {
                        changed = true;
                    }
                    tr.sample = v.clone();
                }
                None => {
                    changed = true;
                    self.vms.insert(
                        v.name.clone(),
                        VmTrack {
                            sample: v.clone(),
                            history: VecDeque::with_capacity(HISTORY_LEN + 1),
                            acc_sum: 0.0,
                            acc_n: 0,
                            last_move_ms: None,
                            backoff: 0,
                            cooldown_until_ms: 0,
                        },
                    );
                }
            }
            let tr = self.vms.get_mut(&v.name).expect("inserted above");
            if let Some(u) = v.cpu_utilization {
                tr.acc_sum += u;
                tr.acc_n += 1;
            }
        }
        // empty hosts (none placed, none on the way in)
        let mut occupied: BTreeSet<&str> = self
            .vms
            .values()
            .filter_map(|v| v.sample.host.as_deref())
            .collect();
        let incoming: Vec<String> = self.running_moves().map(|(_, _, to)| to).collect();
        occupied.extend(incoming.iter().map(String::as_str));
        for (name, h) in &mut self.hosts {
            if occupied.contains(name.as_str()) {
                h.empty_since = None;
            } else if h.empty_since.is_none() {
                h.empty_since = Some(now_ms);
            }
        }
        if changed {
            self.version += 1;
        }
        self.first_seen_ms.get_or_insert(now_ms);
        self.rebase_restored(now_ms);
        Ok(())
    }

    /// Runs a round when one is due, and carries on with a plan being applied. Returns the
    /// actions to carry out, in order.
    ///
    /// Rounds fall on a fixed grid of the interval anchored at the first round: the next is due
    /// at the last one's grid point plus the interval, not its actual time, and runs at the
    /// first tick at or after the due time less [`ROUND_TOLERANCE_DIV`]th of the interval, so a
    /// shell that ticks every few hundred milliseconds with some jitter runs one round per
    /// interval. A tick an interval or more past the due time (a gap in the ticks: a cycle held
    /// up) runs one round, on the latest grid point at or before it: the points missed are
    /// skipped rather than run in a burst, and the grid keeps its phase.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let interval = ms(self.policy.interval_s);
        let tolerance = interval / ROUND_TOLERANCE_DIV;
        let run = match self.round_due_ms {
            None => Some(now_ms),
            Some(last) => {
                let due = last + interval;
                if now_ms + tolerance < due {
                    None
                } else {
                    // the latest grid point at or before the tick (within the tolerance): late
                    // by an interval or more, the points missed are skipped, not run
                    let missed = (now_ms + tolerance - due) / interval.max(1);
                    Some(due + missed * interval)
                }
            }
        };
        let mut out = Vec::new();
        if let Some(grid) = run {
            self.round_due_ms = Some(grid);
            out.extend(self.round(now_ms, grid));
        }
        out.extend(self.dispatch(now_ms));
        out
    }

    /// Starts applying a proposed plan (the operator's approval, or the loop's own in full mode).
    pub fn apply(&mut self, now_ms: u64, id: u64) -> Result<Vec<Action>, PlanError> {
        let version = self.version;
        let applying = self.applying;
        let rec = self.plans.get_mut(&id).ok_or(PlanError::Unknown(id))?;
        if rec.plan.state != PlanState::Proposed {
            return Err(PlanError::NotProposed {
                id,
                state: rec.plan.state,
                detail: rec.plan.detail.clone(),
            });
        }
        if rec.plan.basis != version {
            let basis = rec.plan.basis;
            finish(
                &mut rec.plan,
                PlanState::Superseded,
                now_ms,
                format!(
                    "the cluster changed since it was computed (version {basis}, now {version})"
                ),
            );
            return Err(PlanError::Superseded {
                id,
                basis,
                now: version,
            });
        }
        if let Some(a) = applying {
            return Err(PlanError::Busy { id, applying: a });
        }
        rec.plan.state = PlanState::Applying;
        self.applying = Some(id);
        Ok(self.dispatch(now_ms))
    }

    /// Rejects a proposed plan.
    pub fn reject(&mut self, now_ms: u64, id: u64) -> Result<&Plan, PlanError> {
        let rec = self.plans.get_mut(&id).ok_or(PlanError::Unknown(id))?;
        if rec.plan.state != PlanState::Proposed {
            return Err(PlanError::NotProposed {
                id,
                state: rec.plan.state,
                detail: rec.plan.detail.clone(),
            });
        }
        finish(
            &mut rec.plan,
            PlanState::Rejected,
            now_ms,
            "rejected by an operator".into(),
        );
        Ok(&rec.plan)
    }

    /// Tells the loop what became of one of its actions; returns the actions that follow.
    pub fn report(&mut self, now_ms: u64, outcome: Outcome) -> Result<Vec<Action>, OutcomeError> {
        let (plan_id, what) = match &outcome {
            Outcome::Migrated { plan, vm, .. } | Outcome::MigrationFailed { plan, vm, .. } => {
                (*plan, vm.clone())
            }
            Outcome::PoweredOff { plan, host }
            | Outcome::PowerOffFailed { plan, host, .. }
            | Outcome::PowerOffInDoubt { plan, host, .. }
            | Outcome::PoweredOn { plan, host }
            | Outcome::PowerOnFailed { plan, host, .. } => (*plan, host.clone()),
        };
        let err = || OutcomeError {
            plan: plan_id,
            what: what.clone(),
        };
        let in_doubt = &self.off_in_doubt;
        let rec = self.plans.get_mut(&plan_id).ok_or_else(err)?;
        let idx = rec
            .plan
            .actions
            .iter()
            .position(|a| {
                a.status() == ActionStatus::Running
                    && match (a, &outcome) {
                        (
                            PlanAction::Migrate { vm, .. },
                            Outcome::Migrated { vm: v, .. }
                            | Outcome::MigrationFailed { vm: v, .. },
                        ) => vm == v,
                        (
                            PlanAction::PowerOff { host, .. },
                            Outcome::PoweredOff { host: h, .. }
                            | Outcome::PowerOffFailed { host: h, .. }
                            | Outcome::PowerOffInDoubt { host: h, .. },
                        ) => host == h && in_doubt.get(host) != Some(&plan_id),
                        (
                            PlanAction::PowerOn { host, .. },
                            Outcome::PoweredOn { host: h, .. }
                            | Outcome::PowerOnFailed { host: h, .. },
                        ) => host == h,
                        _ => false,
                    }
            })
            .ok_or_else(err)?;
        let mut failure = None;
        match (&mut rec.plan.actions[idx], outcome) {
            (
                PlanAction::Migrate {
                    status, actual, to, ..
                },
                Outcome::Migrated { actual: a, vm, .. },
            ) => {
                *status = ActionStatus::Done;
                *actual = a;
                if let Some(v) = self.vms.get_mut(&vm) {
                    v.sample.host = Some(to.clone());
                    v.sample.migrating = false;
                }
                self.version += 1;
            }
            (PlanAction::Migrate { status, .. }, Outcome::MigrationFailed { vm, error, .. }) => {
                *status = ActionStatus::Failed;
                failure = Some(format!("migration of {vm} failed: {error}"));
            }
            (PlanAction::PowerOff { status, .. }, Outcome::PoweredOff { host, .. }) => {
                *status = ActionStatus::Done;
                if let Some(h) = self.hosts.get_mut(&host) {
                    h.power.off_done(now_ms);
                }
                self.version += 1;
            }
            (PlanAction::PowerOff { status, .. }, Outcome::PowerOffFailed { host, error, .. }) => {
                *status = ActionStatus::Failed;
                // A host already seen down is off whatever its driver says: counted on, it
                // would stay on for good (a host seen down while on is HA's business, not a
                // power state) and never be woken.
                let down = match self.hosts.get_mut(&host) {
                    Some(h) if !h.sample.up => {
                        h.power.off_done(now_ms);
                        self.version += 1;
                        true
                    }
                    Some(h) => {
                        h.power.off_failed(now_ms);
                        // the hold starts again: a power-off refused (a VM the shell still sees
                        // there, a driver that failed) is proposed again a full hold later at
                        // the earliest, not at every round
                        h.empty_since = Some(now_ms);
                        false
                    }
                    None => false,
                };
                failure = Some(if down {
                    format!("power-off of {host} failed: {error}; the host is seen down: off")
                } else {
                    format!("power-off of {host} failed: {error}")
                });
            }
            (PlanAction::PowerOff { .. }, Outcome::PowerOffInDoubt { host, error, .. }) => {
                // the action stays running: the power-off may still be under way
                failure = Some(format!(
                    "power-off of {host} in doubt: {error}; the host is held powering off until \
                     its power is known"
                ));
                self.off_in_doubt.insert(host, plan_id);
            }
            (PlanAction::PowerOn { status, .. }, Outcome::PoweredOn { host, .. }) => {
                *status = ActionStatus::Done;
                if let Some(h) = self.hosts.get_mut(&host) {
                    h.power.on_done(now_ms);
                }
                self.version += 1;
            }
            (PlanAction::PowerOn { status, .. }, Outcome::PowerOnFailed { host, error, .. }) => {
                *status = ActionStatus::Failed;
                if let Some(h) = self.hosts.get_mut(&host) {
                    h.power.on_failed(now_ms);
                }
                failure = Some(format!(
                    "power-on of {host} failed: {error}; not chosen again until cleared"
                ));
            }
            _ => return Err(err()),
        }
        if let Some(f) = failure {
            let p = &mut self.plans.get_mut(&plan_id).expect("found above").plan;
            if p.detail.is_none() {
                p.detail = Some(f);
            }
        }
        Ok(self.dispatch(now_ms))
    }

    /// How the power-off of `host` for plan `plan`, in doubt ([`Outcome::PowerOffInDoubt`], or
    /// one a previous leader was carrying out), ended: `off` (a late answer of its driver, or
    /// the host seen down), or the host still runs (its agent still reports well after the
    /// power-off should have ended, or after its driver failed). The host is off
    /// or on from now; the plan that asked for it keeps its state (failed) but its power-off
    /// action says what happened (done, or failed) and its detail why. Returns whether that
    /// power-off was in doubt (`false`: nothing changed — none was, or the host's doubt is
    /// another plan's, as for a stale answer of an earlier power-off).
    pub fn power_off_settled(
        &mut self,
        now_ms: u64,
        plan: u64,
        host: &str,
        off: bool,
        why: &str,
    ) -> bool {
        if self.off_in_doubt.get(host) != Some(&plan) {
            return false;
        }
        self.off_in_doubt.remove(host);
        if let Some(h) = self.hosts.get_mut(host) {
            if off {
                h.power.off_done(now_ms);
            } else {
                h.power.off_failed(now_ms);
            }
        }
        self.version += 1;
        let (status, end) = if off {
            (
                ActionStatus::Done,
                format!("{host} powered off later ({why})"),
            )
        } else {
            (ActionStatus::Failed, format!("{host} still runs ({why})"))
        };
        self.note_power_off_end(plan, host, status, end);
        true
    }

    /// Ends the `running` power-off of `host` in plan `plan` as `status`, adding `end` to the
    /// plan's detail.
    fn note_power_off_end(&mut self, plan: u64, host: &str, status: ActionStatus, end: String) {
        let Some(r) = self.plans.get_mut(&plan) else {
            return;
        };
        for a in &mut r.plan.actions {
            if let PlanAction::PowerOff { host: h, .. } = a
                && h == host
            {
                set_status_if(a, ActionStatus::Running, status);
            }
        }
        r.plan.detail = Some(match r.plan.detail.take() {
            Some(d) => format!("{d}; {end}"),
            None => end,
        });
    }

    /// Hosts whose power-off's end is not known (held powering off), with the plan that asked.
    pub fn power_offs_in_doubt(&self) -> &BTreeMap<String, u64> {
        &self.off_in_doubt
    }

    /// An operator clears a host's failed wake: it may be powered on again.
    pub fn clear_failed_wake(&mut self, now_ms: u64, host: &str) -> Result<(), ClearError> {
        let h = self
            .hosts
            .get_mut(host)
            .ok_or_else(|| ClearError::UnknownHost(host.to_string()))?;
        h.power.clear(now_ms)?;
        Ok(())
    }

    /// Every plan kept, newest first.
    pub fn plans(&self) -> Vec<&Plan> {
        self.plans.values().rev().map(|r| &r.plan).collect()
    }

    /// One plan.
    pub fn plan(&self, id: u64) -> Option<&Plan> {
        self.plans.get(&id).map(|r| &r.plan)
    }

    /// A host's power state as the loop tracks it (powering off for a host whose power-off is in
    /// doubt before the loop's first snapshot of it).
    pub fn host_power(&self, host: &str) -> Option<HostPower> {
        match self.hosts.get(host) {
            Some(h) => Some(h.power.phase()),
            None => self
                .off_in_doubt
                .contains_key(host)
                .then_some(HostPower::PoweringOff),
        }
    }

    /// The dashboard's series (one point per round, oldest first).
    pub fn series(&self) -> StatsSeries {
        StatsSeries {
            interval_s: self.policy.interval_s,
            points: self.series.iter().copied().collect(),
        }
    }

    /// What the last round saw and decided.
    pub fn last_round(&self) -> &RoundReport {
        &self.last_report
    }

    /// How many rounds the loop has run since it started (a shell that keeps every round's
    /// report reads [`Loop::last_round`] when this moved on).
    pub fn rounds_run(&self) -> u64 {
        self.rounds_run
    }

    /// The counts behind the series' SLATAH since the loop started: (host-intervals with load,
    /// of which overloaded), one per powered-on host with VMs per round. Two readings give the
    /// SLATAH of the rounds between them.
    pub fn sla_counts(&self) -> (u64, u64) {
        (self.active_rounds, self.overloaded_rounds)
    }

    /// Migrations of the loop under way: (plan, VM, target).
    fn running_moves(&self) -> impl Iterator<Item = (u64, String, String)> + '_ {
        self.applying
            .and_then(|id| self.plans.get(&id))
            .into_iter()
            .flat_map(|r| {
                r.plan.actions.iter().filter_map(move |a| match a {
                    PlanAction::Migrate { vm, to, status, .. }
                        if *status == ActionStatus::Running =>
                    {
                        Some((r.plan.id, vm.clone(), to.clone()))
                    }
                    _ => None,
                })
            })
    }

    fn takes_vms(h: &HostTrack) -> bool {
        h.sample.up && !h.sample.maintenance && h.power.phase() == HostPower::On
    }

    /// A round at `now_ms` whose grid point ([`Loop::tick`]) is `grid_ms`: the hold timers
    /// (overloaded, under-loaded, capacity short) start and are read at the grid point, so a
    /// hold of whole intervals is met at the same round whatever the jitter of the ticks.
    fn round(&mut self, now_ms: u64, grid_ms: u64) -> Vec<Action> {
        self.rounds_run += 1;
        // 1. a history point per VM: the mean of the samples since the last round
        let mut points = BTreeMap::new();
        for (name, v) in &mut self.vms {
            if v.acc_n > 0 {
                let point = v.acc_sum / f64::from(v.acc_n);
                v.history.push_front(point);
                v.history.truncate(HISTORY_LEN);
                v.acc_sum = 0.0;
                v.acc_n = 0;
                points.insert(name.clone(), point);
            }
        }
        self.push_series_point(now_ms);
        // 2. proposals computed on an older cluster are superseded
        let version = self.version;
        for r in self.plans.values_mut() {
            if r.plan.state == PlanState::Proposed && r.plan.basis != version {
                let b = r.plan.basis;
                finish(
                    &mut r.plan,
                    PlanState::Superseded,
                    now_ms,
                    format!(
                        "the cluster changed since it was computed (version {b}, now {version})"
                    ),
                );
            }
        }
        let mut report = RoundReport {
            at_ms: now_ms,
            points,
            ..RoundReport::default()
        };
        if self.applying.is_some() {
            report.short_since_ms = self.short_since;
            self.last_report = report;
            return Vec::new();
        }
        // 3. the policy's view: hosts that take VMs and the VMs on them
        let host_names: Vec<String> = self
            .hosts
            .iter()
            .filter(|(_, h)| Self::takes_vms(h))
            .map(|(n, _)| n.clone())
            .collect();
        let host_idx: BTreeMap<&str, u32> = host_names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i as u32))
            .collect();
        let mut view = ClusterView {
            hosts: host_names
                .iter()
                .map(|n| {
                    // one processing element of all its cores, as the controller's placement
                    // sees a host: a live VM's vCPUs may keep several cores busy
                    let h = &self.hosts[n];
                    HostView::live(h.sample.cores, h.spec.model, h.spec.core_mips())
                })
                .collect(),
            vms: Vec::new(),
        };
        let mut vm_names: Vec<String> = Vec::new();
        let mut rules = Rules::default();
        let mut predictions: Vec<crate::fallback::PlannedMove> = Vec::new();
        let mut groups: BTreeMap<String, u32> = BTreeMap::new();
        let mb_per_s = self.cfg.link_bytes_per_sec / 1e6;
        let link = typical_link(
            host_names
                .iter()
                .map(|n| self.hosts[n].sample.migration_link_bytes_per_sec),
            self.cfg.link_bytes_per_sec,
        );
        for (name, v) in &self.vms {
            let Some(h) = v.sample.host.as_deref().and_then(|h| host_idx.get(h)) else {
                continue;
            };
            let idx = vm_names.len() as u32;
            let u = v
                .history
                .front()
                .copied()
                .or(v.sample.cpu_utilization)
                .unwrap_or(0.0);
            let core = self.hosts[v.sample.host.as_deref().unwrap_or_default()]
                .spec
                .core_mips();
            let mips = core * f64::from(v.sample.vcpus);
            // the target is not chosen yet: the typical measured link into the hosts in view;
            // a move pre-copy would not finish may fall back to post-copy (policy knob)
            let planned = plan_move(
                &MoveInput::for_vm(&v.sample, link, self.cfg.downtime_budget_ms),
                self.policy.post_copy_fallback,
            );
            let pred = planned.predicted;
            // MMT and the regression's look-ahead read RAM / bandwidth: hand them the predicted
            // time as an equivalent RAM (a move that would not converge sorts last)
            let ram_mb = if planned.movable() {
                (pred.time_s * mb_per_s)
                    .ceil()
                    .clamp(1.0, f64::from(u32::MAX / 4)) as u32
            } else {
                u32::MAX / 4
            };
            view.vms.push(VmView {
                host: *h,
                mips,
                ram_mb,
                requested_mips: u * mips,
                utilization: u,
                history: v.history.iter().copied().collect(),
            });
            view.hosts[*h as usize].vms.push(idx);
            let fixed = if v.sample.pinned {
                Some(Fixed::Pinned)
            } else if v.sample.migrating {
                Some(Fixed::Migrating)
            } else if v.cooldown_until_ms > now_ms {
                Some(Fixed::Cooldown(v.cooldown_until_ms))
            } else if !planned.movable() {
                Some(Fixed::WouldNotConverge)
            } else {
                None
            };
            rules.fixed.push(fixed);
            let next = groups.len() as u32;
            rules.group.push(
                v.sample
                    .anti_affinity
                    .as_ref()
                    .map(|g| *groups.entry(g.clone()).or_insert(next)),
            );
            predictions.push(planned);
            vm_names.push(name.clone());
        }
        for h in &mut view.hosts {
            let req: f64 = h
                .vms
                .iter()
                .map(|&v| view.vms[v as usize].requested_mips)
                .sum();
            h.utilization = (req / h.total_mips()).min(1.0);
        }
        report.hosts_in_view = view.hosts.len();
        report.vms_in_view = view.vms.len();
        // 4. the policy's round
        let pcfg = PolicyConfig {
            detector: self.knobs.detector,
            selection: self.knobs.selection,
            model: Model::Paper,
            migration_mb_per_s: mb_per_s,
            interval_s: f64::from(self.policy.interval_s),
        };
        let decisions = optimize_with_rules(&view, &pcfg, &rules, &mut self.rng);
        // 5. hysteresis timers
        let over: BTreeSet<u32> = decisions.overloaded.iter().copied().collect();
        for (i, n) in host_names.iter().enumerate() {
            let hv = &view.hosts[i];
            let h = self.hosts.get_mut(n).expect("view host");
            if over.contains(&(i as u32)) {
                h.over_since.get_or_insert(grid_ms);
            } else {
                h.over_since = None;
            }
            let under = !over.contains(&(i as u32))
                && !hv.vms.is_empty()
                && self.knobs.drain_below.is_some_and(|b| hv.utilization < b);
            if under {
                h.under_since.get_or_insert(grid_ms);
            } else {
                h.under_since = None;
            }
        }
        for &h in &decisions.overloaded {
            for &v in &view.hosts[h as usize].vms {
                if rules.fixed[v as usize] == Some(Fixed::WouldNotConverge) {
                    let p = &predictions[v as usize].predicted;
                    report.held_back.push((
                        vm_names[v as usize].clone(),
                        format!(
                            "predicted not to converge: {:.0} ms pause over the {:.0} ms budget",
                            p.downtime_ms, self.cfg.downtime_budget_ms
                        ),
                    ));
                }
            }
        }
        report.overloaded = decisions
            .overloaded
            .iter()
            .map(|&h| host_names[h as usize].clone())
            .collect();
        // 6. the rules and the hysteresis
        let hold = self.knobs.hold_ms;
        let hosts = &self.hosts;
        let name_of = |h: u32| &host_names[h as usize];
        let drain_below = self.knobs.drain_below;
        let filtered: Filtered = enforce(
            &view,
            &decisions,
            &rules,
            |h| match hosts[name_of(h)].over_since {
                Some(t) if t + hold <= grid_ms => Ok(()),
                Some(t) => Err(format!(
                    "host {} overloaded for {} s only (hold {} s)",
                    name_of(h),
                    grid_ms.saturating_sub(t) / 1000,
                    hold / 1000
                )),
                None => Err(format!("host {} not overloaded", name_of(h))),
            },
            |h| {
                let Some(b) = drain_below else {
                    return Err("aggressiveness 1 relieves overloads only".to_string());
                };
                match hosts[name_of(h)].under_since {
                    Some(t) if t + hold <= grid_ms => Ok(()),
                    Some(t) => Err(format!(
                        "host {} under-loaded for {} s only (hold {} s)",
                        name_of(h),
                        grid_ms.saturating_sub(t) / 1000,
                        hold / 1000
                    )),
                    None => Err(format!(
                        "host {} not under {:.0} % utilisation",
                        name_of(h),
                        100.0 * b
                    )),
                }
            },
        );
        report.dropped = filtered
            .dropped
            .iter()
            .map(|d| (vm_names[d.vm as usize].clone(), d.why.clone()))
            .collect();
        report.drained = filtered
            .drained
            .iter()
            .map(|&h| host_names[h as usize].clone())
            .collect();
        // 7. capacity: short when an overload held past its hold finds no target, or the demand is
        //    above the high-water mark of the powered-on cores
        let on_cores: f64 = self
            .hosts
            .values()
            .filter(|h| Self::takes_vms(h))
            .map(|h| f64::from(h.sample.cores))
            .sum();
        let demand: f64 = self
            .vms
            .values()
            .filter(|v| v.sample.host.is_some())
            .map(VmTrack::demand_cores)
            .sum();
        let stuck: Vec<&String> = decisions
            .overloaded
            .iter()
            .filter(|&&h| {
                hosts[name_of(h)]
                    .over_since
                    .is_some_and(|t| t + hold <= grid_ms)
                    && !decisions.migrations.iter().any(|m| m.from == h)
            })
            .map(|&h| name_of(h))
            .collect();
        let high = demand > self.cfg.demand_high_water * on_cores;
        let short_why = if let Some(h) = stuck.first() {
            Some(format!("overloaded host {h} cannot be relieved"))
        } else if high {
            Some(format!(
                "demand {demand:.2} of {on_cores} powered-on cores is above {:.0} %",
                100.0 * self.cfg.demand_high_water
            ))
        } else {
            None
        };
        if short_why.is_some() {
            self.short_since.get_or_insert(grid_ms);
        } else {
            self.short_since = None;
        }
        report.short_since_ms = self.short_since;
        // 8. the plan
        let mut actions: Vec<PlanAction> = Vec::new();
        let mut reasons: Vec<String> = Vec::new();
        let mut scenario = Scenario::default();
        let mut extra_hosts: Vec<String> = Vec::new();
        let power = self.policy.power;
        let powering_on = self
            .hosts
            .values()
            .any(|h| h.power.phase() == HostPower::PoweringOn);
        if power.enabled
            && !powering_on
            && let (Some(since), Some(why)) = (self.short_since, &short_why)
            && since + ms(power.on_hold_s) <= grid_ms
            && let Some(host) = self.wake_candidate()
        {
            let reason = format!(
                "capacity short for {} s: {why}",
                grid_ms.saturating_sub(since) / 1000
            );
            reasons.push(format!("power on {host}: {reason}"));
            actions.push(PlanAction::PowerOn {
                host: host.clone(),
                reason,
                status: ActionStatus::Pending,
            });
            scenario
                .power_on
                .push((view.hosts.len() + extra_hosts.len()) as u32);
            extra_hosts.push(host);
        }
        let mut shed_hosts: BTreeSet<u32> = BTreeSet::new();
        for m in &filtered.moves {
            let from = name_of(m.from);
            let reason = match m.kind {
                MoveKind::Shed => {
                    shed_hosts.insert(m.from);
                    format!("overloaded host {from}")
                }
                MoveKind::Drain => format!("under-loaded host {from} drained"),
            };
            // over the link into the chosen target, measured or the default
            let planned = match self.hosts.get(name_of(m.to)) {
                Some(h) => plan_move(
                    &MoveInput::for_vm(
                        &self.vms[&vm_names[m.vm as usize]].sample,
                        h.sample
                            .migration_link_bytes_per_sec
                            .unwrap_or(self.cfg.link_bytes_per_sec),
                        self.cfg.downtime_budget_ms,
                    ),
                    self.policy.post_copy_fallback,
                ),
                None => predictions[m.vm as usize],
            };
            let reason = match planned.fallback_reason(self.cfg.downtime_budget_ms) {
                Some(why) => format!("{reason}; {why}"),
                None => reason,
            };
            actions.push(PlanAction::Migrate {
                vm: vm_names[m.vm as usize].clone(),
                from: from.clone(),
                to: name_of(m.to).clone(),
                reason,
                // with the measured overhead of a move
                predicted: Some(
                    self.overhead
                        .add_to(planned.predicted, view.vms[m.vm as usize].utilization),
                ),
                actual: None,
                status: ActionStatus::Pending,
                post_copy_after: planned.post_copy_after(),
            });
            scenario.moves.push(PreviewMove { vm: m.vm, to: m.to });
        }
        for h in &shed_hosts {
            reasons.push(format!("relieve overloaded host {}", name_of(*h)));
        }
        for (vm, why) in &report.held_back {
            reasons.push(format!("{vm} not moved: {why}"));
        }
        // Empty hosts kept on: the spares. The HA reserve is capacity, not empty hosts: a host
        // goes off only if the hosts left on, less the reserve's largest hosts, still carry the
        // demand under the high-water mark (so a host failure's VMs find room).
        let keep = power.spare_hosts as usize;
        let reserve_cores = self.ha_reserve_cores();
        let empty_on = self.empty_on_hosts();
        let mut left_cores = on_cores;
        for (k, h) in filtered.drained.iter().enumerate() {
            let cores = hosts
                .get(name_of(*h))
                .map_or(0.0, |t| f64::from(t.sample.cores));
            let off = power.enabled
                && empty_on.len() + k + 1 > keep
                && demand <= self.cfg.demand_high_water * (left_cores - cores - reserve_cores);
            if off {
                left_cores -= cores;
            }
            reasons.push(if off {
                format!(
                    "drain under-loaded host {} to power it off after {} s empty",
                    name_of(*h),
                    power.off_hold_s
                )
            } else {
                format!("drain under-loaded host {}", name_of(*h))
            });
            if off {
                scenario.power_off.push((*h, f64::from(power.off_hold_s)));
            }
        }
        if actions.is_empty() && power.enabled && short_why.is_none() {
            // power off empty hosts held long enough, keeping the spares and the HA reserve
            let spare = empty_on.len().saturating_sub(keep);
            // hosts left to take VMs (one powering off, or in doubt, takes none)
            let any_on_left = self.hosts.values().filter(|h| Self::takes_vms(h)).count();
            let mut left_cores = on_cores;
            for (name, since) in empty_on
                .iter()
                .filter(|(_, since)| since + ms(power.off_hold_s) <= now_ms)
                .take(spare.min(any_on_left.saturating_sub(1)))
            {
                let cores = f64::from(self.hosts[name].sample.cores);
                if demand > self.cfg.demand_high_water * (left_cores - cores - reserve_cores) {
                    break;
                }
                left_cores -= cores;
                let reason = format!(
                    "empty for {} s; keeping {} spare host(s) on and room for {} host failure(s)",
                    (now_ms - since) / 1000,
                    power.spare_hosts,
                    self.cfg.ha_reserve_hosts
                );
                reasons.push(format!("power off {name}: {reason}"));
                actions.push(PlanAction::PowerOff {
                    host: name.clone(),
                    reason,
                    status: ActionStatus::Pending,
                });
                match host_idx.get(name.as_str()) {
                    Some(&i) => scenario.power_off.push((i, 0.0)),
                    None => {
                        scenario
                            .power_off
                            .push(((view.hosts.len() + extra_hosts.len()) as u32, 0.0));
                        extra_hosts.push(name.clone());
                    }
                }
            }
        }
        if actions.is_empty() {
            // a previous leader's proposals stand until this loop has watched the cluster for
            // a hold time and a round (its hold timers start from nothing)
            let warm = self
                .first_seen_ms
                .is_some_and(|t| now_ms >= t + self.knobs.hold_ms + ms(self.policy.interval_s));
            let why = "no longer proposed: the latest round found nothing to do";
            for r in self.plans.values_mut() {
                if r.plan.state == PlanState::Proposed && (warm || !r.inherited) {
                    finish(&mut r.plan, PlanState::Superseded, now_ms, why.to_string());
                }
            }
            self.last_report = report;
            return Vec::new();
        }
        // 9. the preview, and the veto
        let fixes = !shed_hosts.is_empty() || !scenario.power_on.is_empty();
        let (effect, veto) = if self.cfg.preview_horizon_s > 0 {
            let predicted: Vec<MigrationPrediction> =
                predictions.iter().map(|p| p.predicted).collect();
            let input = self.preview_input(&view, &predicted, &extra_hosts);
            let without = preview(&input, &Scenario::default());
            let with = preview(&input, &scenario);
            let effect = PlanEffect {
                horizon_s: u64::from(self.cfg.preview_horizon_s),
                with: outcome(&with),
                without: outcome(&without),
            };
            (effect, self.veto(&with, &without, fixes))
        } else {
            (
                PlanEffect {
                    horizon_s: 0,
                    with: zero_outcome(),
                    without: zero_outcome(),
                },
                None,
            )
        };
        let plan = Plan {
            id: 0,
            state: if veto.is_some() {
                PlanState::Vetoed
            } else {
                PlanState::Proposed
            },
            created_ms: now_ms,
            finished_ms: veto.as_ref().map(|_| now_ms),
            automation: self.policy.automation,
            basis: self.version,
            reason: reasons.join("; "),
            actions,
            effect: (self.cfg.preview_horizon_s > 0).then_some(effect),
            detail: veto,
        };
        let id = self.add_plan(now_ms, plan);
        report.plan = id;
        self.last_report = report;
        match id {
            Some(id)
                if self.plans[&id].plan.state == PlanState::Proposed
                    && Self::acts_alone(self.policy.automation, &self.plans[&id].plan) =>
            {
                self.apply(now_ms, id).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    /// Whether a fresh plan is applied without an operator: every plan in `full`; in `partial`
    /// only plans that move no running VM (powering a host on for capacity, powering off hosts
    /// already empty), so migrations wait for approval as DRS's partial level has them; in
    /// `manual` none.
    fn acts_alone(level: AutomationLevel, plan: &Plan) -> bool {
        match level {
            AutomationLevel::Full => true,
            AutomationLevel::Partial => !plan
                .actions
                .iter()
                .any(|a| matches!(a, PlanAction::Migrate { .. })),
            AutomationLevel::Manual => false,
        }
    }

    /// Empty powered-on hosts that take VMs, least efficient first: (name, empty since).
    /// The cores the HA reserve keeps free: those of the `ha_reserve_hosts` largest powered-on
    /// hosts that take VMs (their failure must find room on the rest).
    fn ha_reserve_cores(&self) -> f64 {
        let mut cores: Vec<u32> = self
            .hosts
            .values()
            .filter(|h| Self::takes_vms(h))
            .map(|h| h.sample.cores)
            .collect();
        cores.sort_unstable_by(|a, b| b.cmp(a));
        cores
            .iter()
            .take(self.cfg.ha_reserve_hosts as usize)
            .map(|&c| f64::from(c))
            .sum()
    }

    fn empty_on_hosts(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(&String, &HostTrack)> = self
            .hosts
            .iter()
            .filter(|(_, h)| Self::takes_vms(h) && h.empty_since.is_some())
            .collect();
        v.sort_by(|a, b| {
            let w = |h: &HostTrack| h.spec.model.watts[0] / f64::from(h.sample.cores);
            w(b.1).total_cmp(&w(a.1)).then(a.0.cmp(b.0))
        });
        v.into_iter()
            .map(|(n, h)| (n.clone(), h.empty_since.unwrap_or(0)))
            .collect()
    }

    /// The off host to wake: most cores, then least idle power, then name.
    fn wake_candidate(&self) -> Option<String> {
        self.hosts
            .iter()
            .filter(|(_, h)| h.power.can_wake() && !h.sample.maintenance)
            .min_by(|a, b| {
                b.1.sample
                    .cores
                    .cmp(&a.1.sample.cores)
                    .then(a.1.spec.model.watts[0].total_cmp(&b.1.spec.model.watts[0]))
                    .then(a.0.cmp(b.0))
            })
            .map(|(n, _)| n.clone())
    }

    fn preview_input(
        &self,
        view: &ClusterView,
        predictions: &[MigrationPrediction],
        extra_hosts: &[String],
    ) -> PreviewInput {
        // the view's hosts are the tracked hosts that take VMs, in the same order; the preview
        // needs their real cores (for parking), which the view folds into one
        let host = |h: &HostTrack| PreviewHost {
            pes: h.sample.cores,
            pe_mips: h.spec.core_mips(),
            power: h.spec.model,
            parked_core_saving_w: h.spec.parked_core_saving_w,
            on: h.power.is_on(),
        };
        let mut hosts: Vec<PreviewHost> = self
            .hosts
            .values()
            .filter(|h| Self::takes_vms(h))
            .map(host)
            .collect();
        debug_assert_eq!(hosts.len(), view.hosts.len());
        hosts.extend(extra_hosts.iter().map(|n| host(&self.hosts[n])));
        let steps = self
            .cfg
            .preview_horizon_s
            .div_ceil(self.policy.interval_s)
            .max(1);
        PreviewInput {
            hosts,
            vms: view
                .vms
                .iter()
                .zip(predictions)
                .map(|(v, p)| PreviewVm {
                    host: v.host,
                    mips: v.mips,
                    history: if v.history.is_empty() {
                        vec![v.utilization]
                    } else {
                        v.history.clone()
                    },
                    migration_time_s: p.time_s,
                })
                .collect(),
            interval_s: f64::from(self.policy.interval_s),
            steps,
            forecast: self.cfg.forecast,
        }
    }

    /// Why a plan is vetoed, if it is.
    fn veto(&self, with: &PreviewOutcome, without: &PreviewOutcome, fixes: bool) -> Option<String> {
        let margin = self.knobs.slatah_margin_pp;
        if with.slatah_pct > without.slatah_pct + margin {
            return Some(format!(
                "vetoed by the preview: SLATAH {:.2} % with the plan against {:.2} % doing nothing \
                 (margin {margin} pp)",
                with.slatah_pct, without.slatah_pct
            ));
        }
        // A plan must cut energy by `min_improvement`; one within ENERGY_TIE of that is taken
        // as meeting it, so that at a margin of 0 a plan that changes nothing but adds a short
        // migration's modelled CPU (a few 1e-9 of the total) is not vetoed by that noise.
        let want = without.energy_kwh * (1.0 - self.knobs.min_improvement + ENERGY_TIE);
        if !fixes && with.energy_kwh > want {
            return Some(format!(
                "vetoed by the preview: {:.4} kWh with the plan against {:.4} kWh doing nothing \
                 fixes no overload and saves less than {:.1} %",
                with.energy_kwh,
                without.energy_kwh,
                100.0 * self.knobs.min_improvement
            ));
        }
        None
    }

    /// Supersedes the proposals still open (a round replaced or dropped them).
    fn retire_proposals(&mut self, now_ms: u64, why: &str) {
        for r in self.plans.values_mut() {
            if r.plan.state == PlanState::Proposed {
                finish(&mut r.plan, PlanState::Superseded, now_ms, why.to_string());
            }
        }
    }

    /// Adds a plan unless an open one (or the last vetoed one) already says the same on the same
    /// basis; returns its id.
    fn add_plan(&mut self, now_ms: u64, mut plan: Plan) -> Option<u64> {
        let same = |p: &Plan| {
            p.basis == plan.basis
                && p.actions.len() == plan.actions.len()
                && p.actions
                    .iter()
                    .zip(&plan.actions)
                    .all(|(a, b)| same_step(a, b))
        };
        if let Some(r) = self.plans.values().rev().find(|r| {
            (r.plan.state == PlanState::Proposed || r.plan.state == PlanState::Vetoed)
                && same(&r.plan)
        }) && (r.plan.state == plan.state)
        {
            return Some(r.plan.id);
        }
        let id = self.next_plan;
        self.next_plan += 1;
        self.retire_proposals(now_ms, &format!("replaced by plan {id}"));
        plan.id = id;
        let fingerprint = self.placement_fingerprint();
        self.plans.insert(
            id,
            PlanRec {
                plan,
                fingerprint,
                restored: false,
                inherited: false,
            },
        );
        // forget the oldest final plans beyond the limit (not one holding a power-off in
        // doubt: it carries the doubt to the next leader)
        while self.plans.len() > self.cfg.plans_kept {
            let Some(old) = self
                .plans
                .iter()
                .find(|(k, r)| {
                    r.plan.state.is_final() && !self.off_in_doubt.values().any(|p| p == *k)
                })
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.plans.remove(&old);
        }
        Some(id)
    }

    /// Starts what the applying plan may start now, and closes it when it is done.
    fn dispatch(&mut self, now_ms: u64) -> Vec<Action> {
        let Some(id) = self.applying else {
            return Vec::new();
        };
        let max = self.policy.max_migrations as usize;
        let cooldown_ms = ms(self.policy.cooldown_s);
        let mut out = Vec::new();
        let Some(rec) = self.plans.get_mut(&id) else {
            self.applying = None;
            return out;
        };
        // a power-off in doubt stays running in the plan, but fails it
        let in_doubt = |a: &PlanAction| {
            matches!(a, PlanAction::PowerOff { host, status: ActionStatus::Running, .. }
                if self.off_in_doubt.get(host) == Some(&id))
        };
        let failed = rec
            .plan
            .actions
            .iter()
            .any(|a| a.status() == ActionStatus::Failed || in_doubt(a));
        let mut running = rec
            .plan
            .actions
            .iter()
            .filter(|a| {
                matches!(a, PlanAction::Migrate { .. }) && a.status() == ActionStatus::Running
            })
            .count();
        // starting actions turns none of the plan's migrations done, so this holds for the pass
        let all_moved =
            rec.plan.actions.iter().all(|a| {
                !matches!(a, PlanAction::Migrate { .. }) || a.status() == ActionStatus::Done
            });
        // Hosts with a VM, built only when a power-off is reached: a dispatch runs at every
        // outcome report, and a plan of thousands of moves reports thousands of times.
        let mut occupied: Option<BTreeSet<String>> = None;
        let mut stop: Option<String> = None;
        if !failed {
            for i in 0..rec.plan.actions.len() {
                if rec.plan.actions[i].status() != ActionStatus::Pending {
                    continue;
                }
                match &mut rec.plan.actions[i] {
                    PlanAction::PowerOn { host, status, .. } => {
                        match request_power(&mut self.hosts, id, host, true, now_ms) {
                            Ok(a) => {
                                *status = ActionStatus::Running;
                                out.push(a);
                            }
                            Err(e) => {
                                stop = Some(e);
                                break;
                            }
                        }
                    }
                    PlanAction::Migrate {
                        vm,
                        from,
                        to,
                        status,
                        post_copy_after,
                        ..
                    } => {
                        if running >= max {
                            break;
                        }
                        let ok_vm = self.vms.get(vm.as_str()).is_some_and(|v| {
                            v.sample.host.as_deref() == Some(from.as_str()) && !v.sample.migrating
                        });
                        if !ok_vm {
                            stop = Some(format!("{vm} is no longer on {from}"));
                            break;
                        }
                        if !self.hosts.get(to.as_str()).is_some_and(Self::takes_vms) {
                            stop = Some(format!("{to} no longer takes VMs"));
                            break;
                        }
                        // Planned with post-copy (which can lose the VM with its link) under a
                        // policy that allowed it: not carried out once the operator took that
                        // back, nor as pre-copy, which was predicted not to converge.
                        if post_copy_after.is_some() && !self.policy.post_copy_fallback {
                            stop = Some(format!(
                                "{vm}'s move was planned with post-copy, which the policy no \
                                 longer allows (post_copy_fallback is off)"
                            ));
                            break;
                        }
                        *status = ActionStatus::Running;
                        running += 1;
                        let v = self.vms.get_mut(vm.as_str()).expect("checked above");
                        let window = 4 * cooldown_ms * u64::from(v.backoff.max(1));
                        v.backoff = match v.last_move_ms {
                            Some(t) if now_ms < t + window => (v.backoff * 2).clamp(1, 16),
                            _ => 1,
                        };
                        v.last_move_ms = Some(now_ms);
                        v.cooldown_until_ms = now_ms + cooldown_ms * u64::from(v.backoff);
                        out.push(Action::Migrate {
                            plan: id,
                            vm: vm.clone(),
                            from: from.clone(),
                            to: to.clone(),
                            post_copy_after: *post_copy_after,
                        });
                    }
                    PlanAction::PowerOff { host, status, .. } => {
                        if !all_moved {
                            break;
                        }
                        let occupied = occupied.get_or_insert_with(|| {
                            self.vms
                                .values()
                                .filter_map(|v| v.sample.host.clone())
                                .collect()
                        });
                        if occupied.contains(host) {
                            stop = Some(format!("host {host} is no longer empty"));
                            break;
                        }
                        match request_power(&mut self.hosts, id, host, false, now_ms) {
                            Ok(a) => {
                                *status = ActionStatus::Running;
                                out.push(a);
                            }
                            Err(e) => {
                                stop = Some(e);
                                break;
                            }
                        }
                    }
                }
            }
        }
        let p = &mut rec.plan;
        if let Some(why) = stop {
            p.detail.get_or_insert(why);
            for a in &mut p.actions {
                set_status_if(a, ActionStatus::Pending, ActionStatus::Failed);
            }
        }
        let any_running = p
            .actions
            .iter()
            .any(|a| a.status() == ActionStatus::Running && !in_doubt(a));
        let any_failed = p
            .actions
            .iter()
            .any(|a| a.status() == ActionStatus::Failed || in_doubt(a));
        if any_failed && !any_running {
            for a in &mut p.actions {
                set_status_if(a, ActionStatus::Pending, ActionStatus::Skipped);
            }
            let d = p
                .detail
                .clone()
                .unwrap_or_else(|| "an action failed".into());
            finish(p, PlanState::Failed, now_ms, d);
            self.applying = None;
        } else if p.actions.iter().all(|a| a.status() == ActionStatus::Done) {
            p.state = PlanState::Applied;
            p.finished_ms = Some(now_ms);
            self.applying = None;
        }
        out
    }

    fn push_series_point(&mut self, now_ms: u64) {
        let mut power_w = 0.0;
        let mut hosts_on = 0;
        let mut load: BTreeMap<&str, f64> = BTreeMap::new();
        for v in self.vms.values() {
            if let Some(h) = v.sample.host.as_deref() {
                *load.entry(h).or_default() += v.demand_cores();
            }
        }
        for (name, h) in &self.hosts {
            if !h.power.is_on() {
                continue;
            }
            hosts_on += 1;
            let cores = f64::from(h.sample.cores);
            let demand = load.get(name.as_str()).copied().unwrap_or(0.0);
            let u = h
                .sample
                .cpu_utilization
                .unwrap_or((demand / cores).min(1.0));
            let parked = h.sample.parked_cores.unwrap_or(0);
            power_w += h.spec.power_w(u, parked);
            if demand > 0.0 {
                self.active_rounds += 1;
                if demand >= cores {
                    self.overloaded_rounds += 1;
                }
            }
        }
        if let Some(last) = self.series.back() {
            let dt_h = now_ms.saturating_sub(last.t_ms) as f64 / 3.6e6;
            self.energy_kwh += last.power_w * dt_h / 1000.0;
        }
        let slatah_pct = if self.active_rounds > 0 {
            100.0 * self.overloaded_rounds as f64 / self.active_rounds as f64
        } else {
            0.0
        };
        self.series.push_back(SeriesPoint {
            t_ms: now_ms,
            hosts_on,
            power_w,
            energy_kwh: self.energy_kwh,
            slatah_pct,
            vms: self.vms.len() as u32,
        });
        while self.series.len() > self.cfg.series_kept {
            self.series.pop_front();
        }
    }
}

/// FNV-1a, 64 bits: a hash that is the same in every process and build.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.bytes(s.as_bytes());
    }
}

fn set_status_if(a: &mut PlanAction, from: ActionStatus, to: ActionStatus) {
    match a {
        PlanAction::Migrate { status, .. }
        | PlanAction::PowerOff { status, .. }
        | PlanAction::PowerOn { status, .. } => {
            if *status == from {
                *status = to;
            }
        }
    }
}

fn same_step(a: &PlanAction, b: &PlanAction) -> bool {
    match (a, b) {
        (
            PlanAction::Migrate {
                vm: v1,
                from: f1,
                to: t1,
                ..
            },
            PlanAction::Migrate {
                vm: v2,
                from: f2,
                to: t2,
                ..
            },
        ) => v1 == v2 && f1 == f2 && t1 == t2,
        (PlanAction::PowerOff { host: a, .. }, PlanAction::PowerOff { host: b, .. })
        | (PlanAction::PowerOn { host: a, .. }, PlanAction::PowerOn { host: b, .. }) => a == b,
        _ => false,
    }
}

fn finish(p: &mut Plan, state: PlanState, now_ms: u64, detail: String) {
    p.state = state;
    p.finished_ms = Some(now_ms);
    p.detail = Some(detail);
}

fn outcome(o: &PreviewOutcome) -> PredictedOutcome {
    PredictedOutcome {
        energy_kwh: o.energy_kwh,
        slatah_pct: o.slatah_pct,
        pdm_pct: o.pdm_pct,
        hosts_on: o.hosts_on,
    }
}

fn zero_outcome() -> PredictedOutcome {
    PredictedOutcome {
        energy_kwh: 0.0,
        slatah_pct: 0.0,
        pdm_pct: 0.0,
        hosts_on: 0,
    }
}

/// Asks `host`'s power tracker to turn it on (`on`) or off at `now_ms`: the action for the shell
/// to carry out for plan `plan`, or why not.
fn request_power(
    hosts: &mut BTreeMap<String, HostTrack>,
    plan: u64,
    host: &str,
    on: bool,
    now_ms: u64,
) -> Result<Action, String> {
    let h = hosts
        .get_mut(host)
        .ok_or_else(|| format!("host {host} is gone"))?;
    let asked = if on {
        h.power.request_on(now_ms)
    } else {
        h.power.request_off(now_ms)
    };
    asked.map_err(|e| e.to_string())?;
    let host = host.to_string();
    Ok(if on {
        Action::PowerOn { plan, host }
    } else {
        Action::PowerOff { plan, host }
    })
}

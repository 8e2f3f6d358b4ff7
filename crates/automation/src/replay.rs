//! The loop without a cluster: [`Replay`] plays per-VM utilisation traces through a [`Loop`] and
//! carries out its actions on a modelled cluster, one interval per step.
//!
//! This is how the live loop is simulated: the controller and the replay drive the same
//! [`Loop`] (the same detector, selection, placement, hysteresis, cool-down, preview veto, HA
//! reserve and host power rules), so a replay started from a live cluster's placement and
//! traces predicts what that cluster's loop will do. What the replay models instead of running:
//! a migration lands after [`Timing::migration_steps`] steps and never fails; a power action is
//! answered after its [`Timing`] steps (a host named in [`Replay::wont_wake`] fails to wake);
//! a VM's utilisation at step `k` is its trace at `offset + k` (the last value repeats).
//!
//! Pure: no clock, no I/O; time is the step count times the interval the caller gives.

use std::collections::{BTreeMap, BTreeSet};

use crate::control::{Action, Loop, Outcome, OutcomeError};
use crate::telemetry::{HostSample, Telemetry, TelemetryError, VmSample};

/// A modelled host.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    /// Cores it gives to VMs.
    pub cores: u32,
    /// Its power model (as [`HostSample::power_model`]).
    pub model: String,
    /// Powered on and reporting.
    pub up: bool,
    /// In maintenance.
    pub maintenance: bool,
}

/// A modelled VM.
#[derive(Debug, Clone, PartialEq)]
pub struct Vm {
    /// Where it runs.
    pub host: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Resident memory reported, MiB (`None`: not reported).
    pub resident_mib: Option<u64>,
    /// Pages dirtied per second, if measured.
    pub dirty: Option<f64>,
    /// Its disks on the shared volume (the move cost's hand-overs).
    pub volume_disks: u32,
    /// Pinned to its host.
    pub pinned: bool,
    /// Anti-affinity group.
    pub group: Option<String>,
    /// Utilisation (0..1 of its vCPUs) per step; the last value repeats. Empty: idle.
    pub trace: Vec<f64>,
    /// The trace index at step 0.
    pub offset: usize,
}

impl Vm {
    /// Its utilisation at `step`.
    pub fn utilization_at(&self, step: u32) -> f64 {
        let i = self.offset.saturating_add(step as usize);
        self.trace
            .get(i)
            .or(self.trace.last())
            .copied()
            .unwrap_or(0.0)
    }
}

/// How many steps the modelled cluster takes to carry out an action. A power action given at a
/// step is answered at a later one (at least one step); a migration of 0 steps is shorter than a
/// step: it lands within the step it started in, and the loop hears of it (and starts what
/// follows, e.g. the next move of a drain) before the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A migration, from its start until it lands (0: within its step).
    pub migration_steps: u32,
    /// Powering a host on, until it reports.
    pub power_on_steps: u32,
    /// Powering a host off.
    pub power_off_steps: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            migration_steps: 1,
            power_on_steps: 1,
            power_off_steps: 1,
        }
    }
}

/// An action the modelled cluster cannot carry out (the loop broke one of its own promises).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReplayError {
    /// A migration names a VM the replay does not hold.
    #[error("migration of unknown VM {0}")]
    UnknownVm(String),
    /// An action names a host the replay does not hold.
    #[error("action on unknown host {0}")]
    UnknownHost(String),
    /// A migration's source is not where the VM runs.
    #[error("{vm} is to move from {from}, but it runs on {on}")]
    NotOnSource {
        /// The VM.
        vm: String,
        /// The source the action names.
        from: String,
        /// Where it runs.
        on: String,
    },
    /// A migration targets a host that is off or in maintenance.
    #[error("{vm} sent to {to}, which takes no VMs (off or in maintenance)")]
    TargetTakesNoVms {
        /// The VM.
        vm: String,
        /// The target.
        to: String,
    },
    /// A power-off names a host that still runs VMs.
    #[error("{host} to be powered off while it runs {vms:?}")]
    PowerOffWithVms {
        /// The host.
        host: String,
        /// Its VMs.
        vms: Vec<String>,
    },
    /// The loop refused the replay's snapshot.
    #[error("the loop refused the snapshot: {0}")]
    Telemetry(#[from] TelemetryError),
    /// The loop refused an outcome.
    #[error("the loop refused an outcome: {0}")]
    Outcome(#[from] OutcomeError),
}

#[derive(Debug, Clone, PartialEq)]
struct Moving {
    plan: u64,
    vm: String,
    to: String,
    lands_at: u32,
}

#[derive(Debug, Clone, PartialEq)]
struct Powering {
    plan: u64,
    host: String,
    on: bool,
    done_at: u32,
}

/// A modelled cluster driven by a [`Loop`] (module docs).
#[derive(Debug, Clone, Default)]
pub struct Replay {
    /// The hosts, by name.
    pub hosts: BTreeMap<String, Host>,
    /// The VMs, by name.
    pub vms: BTreeMap<String, Vm>,
    /// Hosts whose wake fails.
    pub wont_wake: BTreeSet<String>,
    /// How long actions take.
    pub timing: Timing,
    /// Every action the loop gave, with the step it was given at.
    pub log: Vec<(u32, Action)>,
    /// The next step to play.
    pub step: u32,
    moving: Vec<Moving>,
    powering: Vec<Powering>,
}

impl Replay {
    /// Adds (or replaces) a host.
    pub fn host(&mut self, name: &str, cores: u32, model: &str, up: bool) -> &mut Host {
        self.hosts.insert(
            name.into(),
            Host {
                cores,
                model: model.into(),
                up,
                maintenance: false,
            },
        );
        self.hosts.get_mut(name).expect("inserted above")
    }

    /// Adds (or replaces) a 1-vCPU, 512 MiB VM on `host` following `trace` from its start.
    pub fn vm(&mut self, name: &str, host: &str, trace: Vec<f64>) -> &mut Vm {
        self.vms.insert(
            name.into(),
            Vm {
                host: host.into(),
                vcpus: 1,
                memory_mib: 512,
                resident_mib: None,
                dirty: None,
                volume_disks: 0,
                pinned: false,
                group: None,
                trace,
                offset: 0,
            },
        );
        self.vms.get_mut(name).expect("inserted above")
    }

    /// The snapshot the loop sees at the current step.
    pub fn telemetry(&self) -> Telemetry {
        let moving: BTreeSet<&str> = self.moving.iter().map(|m| m.vm.as_str()).collect();
        Telemetry {
            hosts: self
                .hosts
                .iter()
                .map(|(n, h)| HostSample {
                    name: n.clone(),
                    cores: h.cores,
                    power_model: h.model.clone(),
                    up: h.up,
                    maintenance: h.maintenance,
                    cpu_utilization: None,
                    parked_cores: None,
                    migration_link_bytes_per_sec: None,
                })
                .collect(),
            vms: self
                .vms
                .iter()
                .map(|(n, v)| VmSample {
                    name: n.clone(),
                    host: Some(v.host.clone()),
                    vcpus: v.vcpus,
                    memory_mib: v.memory_mib,
                    resident_mib: v.resident_mib,
                    cpu_utilization: Some(v.utilization_at(self.step).clamp(0.0, 1.0)),
                    dirty_pages_per_sec: v.dirty,
                    volume_disks: v.volume_disks,
                    pinned: v.pinned,
                    anti_affinity: v.group.clone(),
                    migrating: moving.contains(n.as_str()),
                })
                .collect(),
        }
    }

    /// Takes the loop's actions: migrations start, power actions are queued. Nothing is taken
    /// from a batch holding an action the cluster cannot carry out.
    pub fn take(&mut self, actions: Vec<Action>) -> Result<(), ReplayError> {
        for a in &actions {
            self.check(a)?;
        }
        for a in actions {
            self.log.push((self.step, a.clone()));
            match a {
                Action::Migrate { plan, vm, to, .. } => self.moving.push(Moving {
                    plan,
                    vm,
                    to,
                    lands_at: self.step + self.timing.migration_steps,
                }),
                Action::PowerOff { plan, host } => self.powering.push(Powering {
                    plan,
                    host,
                    on: false,
                    done_at: self.step + self.timing.power_off_steps.max(1),
                }),
                Action::PowerOn { plan, host } => self.powering.push(Powering {
                    plan,
                    host,
                    on: true,
                    done_at: self.step + self.timing.power_on_steps.max(1),
                }),
            }
        }
        Ok(())
    }

    fn check(&self, a: &Action) -> Result<(), ReplayError> {
        match a {
            Action::Migrate { vm, from, to, .. } => {
                let v = self
                    .vms
                    .get(vm)
                    .ok_or_else(|| ReplayError::UnknownVm(vm.clone()))?;
                if &v.host != from {
                    return Err(ReplayError::NotOnSource {
                        vm: vm.clone(),
                        from: from.clone(),
                        on: v.host.clone(),
                    });
                }
                let t = self
                    .hosts
                    .get(to)
                    .ok_or_else(|| ReplayError::UnknownHost(to.clone()))?;
                if !t.up || t.maintenance {
                    return Err(ReplayError::TargetTakesNoVms {
                        vm: vm.clone(),
                        to: to.clone(),
                    });
                }
            }
            Action::PowerOff { host, .. } => {
                if !self.hosts.contains_key(host) {
                    return Err(ReplayError::UnknownHost(host.clone()));
                }
                let vms: Vec<String> = self
                    .vms
                    .iter()
                    .filter(|(_, v)| &v.host == host)
                    .map(|(n, _)| n.clone())
                    .collect();
                if !vms.is_empty() {
                    return Err(ReplayError::PowerOffWithVms {
                        host: host.clone(),
                        vms,
                    });
                }
            }
            Action::PowerOn { host, .. } => {
                if !self.hosts.contains_key(host) {
                    return Err(ReplayError::UnknownHost(host.clone()));
                }
            }
        }
        Ok(())
    }

    /// One step of `interval_ms`: finish what is due, let the loop observe, report the outcomes
    /// and tick; the actions it gives are taken.
    pub fn step(&mut self, lp: &mut Loop, interval_ms: u64) -> Result<(), ReplayError> {
        let now = u64::from(self.step) * interval_ms;
        let mut outcomes = self.land(self.step);
        let (due, later): (Vec<Powering>, Vec<Powering>) = std::mem::take(&mut self.powering)
            .into_iter()
            .partition(|p| p.done_at <= self.step);
        self.powering = later;
        for p in due {
            if p.on && self.wont_wake.contains(&p.host) {
                outcomes.push(Outcome::PowerOnFailed {
                    plan: p.plan,
                    host: p.host,
                    error: "no answer from its BMC".into(),
                });
                continue;
            }
            if let Some(h) = self.hosts.get_mut(&p.host) {
                h.up = p.on;
            }
            outcomes.push(if p.on {
                Outcome::PoweredOn {
                    plan: p.plan,
                    host: p.host,
                }
            } else {
                Outcome::PoweredOff {
                    plan: p.plan,
                    host: p.host,
                }
            });
        }
        lp.observe(now, &self.telemetry())?;
        for o in outcomes {
            let more = lp.report(now, o)?;
            self.take(more)?;
        }
        let actions = lp.tick(now);
        self.take(actions)?;
        // migrations shorter than a step land within it, and what follows them starts
        loop {
            let landed = self.land(self.step);
            if landed.is_empty() {
                break;
            }
            for o in landed {
                let more = lp.report(now, o)?;
                self.take(more)?;
            }
        }
        self.step += 1;
        Ok(())
    }

    /// Lands the migrations due by `step`: their VMs move, and their outcomes are returned.
    fn land(&mut self, step: u32) -> Vec<Outcome> {
        let (due, later): (Vec<Moving>, Vec<Moving>) = std::mem::take(&mut self.moving)
            .into_iter()
            .partition(|m| m.lands_at <= step);
        self.moving = later;
        due.into_iter()
            .map(|m| {
                if let Some(v) = self.vms.get_mut(&m.vm) {
                    v.host = m.to;
                }
                Outcome::Migrated {
                    plan: m.plan,
                    vm: m.vm,
                    actual: None,
                }
            })
            .collect()
    }

    /// Migrations started and not yet landed.
    pub fn in_flight(&self) -> usize {
        self.moving.len()
    }

    /// Hosts powered on now.
    pub fn hosts_on(&self) -> u32 {
        self.hosts.values().filter(|h| h.up).count() as u32
    }

    /// How often each VM was moved.
    pub fn moves(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (_, a) in &self.log {
            if let Action::Migrate { vm, .. } = a {
                *m.entry(vm.clone()).or_default() += 1;
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::LoopConfig;
    use tern_api::automation::{AutomationLevel, Policy};

    fn full() -> Loop {
        let p = Policy {
            automation: AutomationLevel::Full,
            ..Policy::default()
        };
        Loop::new(p, LoopConfig::default()).unwrap()
    }

    #[test]
    fn a_trace_is_read_from_its_offset_and_its_last_value_repeats() {
        let mut r = Replay::default();
        r.host("h", 2, "hp-ml110-g5", true);
        r.vm("a", "h", vec![0.1, 0.2, 0.3]).offset = 1;
        let u = |r: &Replay| r.telemetry().vms[0].cpu_utilization;
        assert_eq!(u(&r), Some(0.2));
        r.step = 1;
        assert_eq!(u(&r), Some(0.3));
        r.step = 7;
        assert_eq!(u(&r), Some(0.3));
    }

    #[test]
    fn an_impossible_action_is_refused_and_nothing_of_its_batch_is_taken() {
        let mut r = Replay::default();
        r.host("h1", 2, "hp-ml110-g5", true);
        r.host("h2", 2, "hp-ml110-g5", false);
        r.vm("a", "h1", vec![0.1]);
        let go = Action::PowerOn {
            plan: 1,
            host: "h2".into(),
        };
        let bad = Action::Migrate {
            plan: 1,
            vm: "a".into(),
            from: "h1".into(),
            to: "h2".into(),
            post_copy_after: None,
        };
        let e = r.take(vec![go.clone(), bad]).unwrap_err();
        assert_eq!(
            e,
            ReplayError::TargetTakesNoVms {
                vm: "a".into(),
                to: "h2".into()
            }
        );
        assert!(r.log.is_empty());
        let off = Action::PowerOff {
            plan: 2,
            host: "h1".into(),
        };
        assert!(matches!(
            r.take(vec![off]),
            Err(ReplayError::PowerOffWithVms { .. })
        ));
        r.take(vec![go]).unwrap();
        assert_eq!(r.log.len(), 1);
    }

    #[test]
    fn migrations_shorter_than_a_step_land_within_it_and_a_drain_goes_on() {
        // three light VMs on h1, one on h2: the loop drains h1 (two moves at once at most);
        // with moves shorter than a step the whole drain is done in the step it started in
        let mut r = Replay {
            timing: Timing {
                migration_steps: 0,
                ..Timing::default()
            },
            ..Replay::default()
        };
        r.host("h1", 2, "hp-ml110-g5", true);
        r.host("h2", 2, "hp-ml110-g5", true);
        for v in ["a", "b", "c"] {
            r.vm(v, "h1", vec![0.05]);
        }
        r.vm("d", "h2", vec![0.3]);
        let mut lp = full();
        for _ in 0..12 {
            r.step(&mut lp, 10_000).unwrap();
            if !r.log.is_empty() {
                break;
            }
        }
        let started: Vec<u32> = r
            .log
            .iter()
            .filter(|(_, a)| matches!(a, Action::Migrate { .. }))
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(started.len(), 3, "{:?}", r.log);
        assert!(started.iter().all(|&s| s == started[0]), "{:?}", r.log);
        assert_eq!(r.in_flight(), 0);
        assert!(r.vms.values().all(|v| v.host == "h2"), "{:?}", r.vms);
    }

    #[test]
    fn slow_actions_land_after_their_steps() {
        // two light VMs on two hosts: the loop drains one host; a 3-step migration is seen
        // moving between the three steps that follow its start, and lands at the third
        let mut r = Replay {
            timing: Timing {
                migration_steps: 3,
                ..Timing::default()
            },
            ..Replay::default()
        };
        r.host("h1", 2, "hp-ml110-g5", true);
        r.host("h2", 2, "hp-ml110-g5", true);
        r.vm("a", "h1", vec![0.2]);
        r.vm("b", "h2", vec![0.1]);
        let mut lp = full();
        let mut moving_after = Vec::new();
        for _ in 0..12 {
            r.step(&mut lp, 10_000).unwrap();
            if r.telemetry().vms.iter().any(|v| v.migrating) {
                moving_after.push(r.step);
            }
        }
        let (s, vm, to) = match r.log.first() {
            Some((s, Action::Migrate { vm, to, .. })) => (*s, vm.clone(), to.clone()),
            other => panic!("no drain first: {other:?}"),
        };
        assert_eq!(moving_after, vec![s + 1, s + 2, s + 3], "{:?}", r.log);
        assert_eq!(r.vms[&vm].host, to);
        assert_eq!(r.moves().values().sum::<usize>(), 1, "{:?}", r.log);
    }
}

//! A small cluster that carries out the loop's actions, for the loop's tests: migrations land on
//! the next step, power actions are done at once (or fail for the hosts told to), and every step
//! feeds the loop a snapshot.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use tern_automation::{Action, HostSample, Loop, Outcome, Telemetry, VmSample};

#[derive(Debug, Clone)]
pub struct Host {
    pub cores: u32,
    pub model: &'static str,
    pub up: bool,
    pub maintenance: bool,
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub host: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub dirty: Option<f64>,
    pub pinned: bool,
    pub group: Option<String>,
    /// Utilisation at each step (the last value repeats).
    pub trace: Vec<f64>,
}

#[derive(Debug, Default)]
pub struct Cluster {
    pub hosts: BTreeMap<String, Host>,
    pub vms: BTreeMap<String, Vm>,
    /// Migrations under way: (plan, vm, to).
    pub moving: Vec<(u64, String, String)>,
    /// Power actions to answer on the next step: (plan, host, on?).
    pub power: Vec<(u64, String, bool)>,
    /// Hosts whose wake fails.
    pub wont_wake: BTreeSet<String>,
    /// Every action the loop gave, with the step.
    pub log: Vec<(u32, Action)>,
    pub step: u32,
}

impl Cluster {
    pub fn host(&mut self, name: &str, cores: u32, model: &'static str, up: bool) {
        self.hosts.insert(
            name.into(),
            Host {
                cores,
                model,
                up,
                maintenance: false,
            },
        );
    }

    pub fn vm(&mut self, name: &str, host: &str, trace: Vec<f64>) -> &mut Vm {
        self.vms.insert(
            name.into(),
            Vm {
                host: host.into(),
                vcpus: 1,
                memory_mib: 512,
                dirty: None,
                pinned: false,
                group: None,
                trace,
            },
        );
        self.vms.get_mut(name).unwrap()
    }

    pub fn telemetry(&self) -> Telemetry {
        let moving: BTreeSet<&str> = self.moving.iter().map(|(_, v, _)| v.as_str()).collect();
        Telemetry {
            hosts: self
                .hosts
                .iter()
                .map(|(n, h)| HostSample {
                    name: n.clone(),
                    cores: h.cores,
                    power_model: h.model.into(),
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
                .map(|(n, v)| {
                    let i = (self.step as usize).min(v.trace.len() - 1);
                    VmSample {
                        name: n.clone(),
                        host: Some(v.host.clone()),
                        vcpus: v.vcpus,
                        memory_mib: v.memory_mib,
                        resident_mib: None,
                        cpu_utilization: Some(v.trace[i]),
                        dirty_pages_per_sec: v.dirty,
                        pinned: v.pinned,
                        anti_affinity: v.group.clone(),
                        migrating: moving.contains(n.as_str()),
                    }
                })
                .collect(),
        }
    }

    /// Takes the loop's actions: migrations start, power actions are queued.
    pub fn take(&mut self, actions: Vec<Action>) {
        for a in actions {
            self.log.push((self.step, a.clone()));
            match a {
                Action::Migrate { plan, vm, from, to } => {
                    assert_eq!(self.vms[&vm].host, from, "{vm} is not on {from}");
                    assert!(
                        self.hosts[&to].up && !self.hosts[&to].maintenance,
                        "{vm} sent to {to}, which takes no VMs"
                    );
                    self.moving.push((plan, vm, to));
                }
                Action::PowerOff { plan, host } => {
                    assert!(
                        self.vms.values().all(|v| v.host != host),
                        "{host} powered off with VMs on it"
                    );
                    self.power.push((plan, host, false));
                }
                Action::PowerOn { plan, host } => self.power.push((plan, host, true)),
            }
        }
    }

    /// One step of `interval_ms`: finish what was started, observe, tick.
    pub fn step(&mut self, lp: &mut Loop, interval_ms: u64) {
        let now = u64::from(self.step) * interval_ms;
        let mut outcomes = Vec::new();
        for (plan, vm, to) in std::mem::take(&mut self.moving) {
            self.vms.get_mut(&vm).unwrap().host = to;
            outcomes.push(Outcome::Migrated {
                plan,
                vm,
                actual: None,
            });
        }
        for (plan, host, on) in std::mem::take(&mut self.power) {
            if on && self.wont_wake.contains(&host) {
                outcomes.push(Outcome::PowerOnFailed {
                    plan,
                    host,
                    error: "no answer from its BMC".into(),
                });
            } else {
                self.hosts.get_mut(&host).unwrap().up = on;
                outcomes.push(if on {
                    Outcome::PoweredOn { plan, host }
                } else {
                    Outcome::PoweredOff { plan, host }
                });
            }
        }
        lp.observe(now, &self.telemetry()).unwrap();
        for o in outcomes {
            let more = lp.report(now, o).unwrap();
            self.take(more);
        }
        let actions = lp.tick(now);
        self.take(actions);
        self.step += 1;
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

    /// Anti-affinity and pins hold in the settled placement.
    pub fn check_rules(&self, pinned_at: &BTreeMap<String, String>) {
        let mut seen = BTreeSet::new();
        for (n, v) in &self.vms {
            if let Some(g) = &v.group {
                assert!(
                    seen.insert((v.host.clone(), g.clone())),
                    "group {g} twice on {} (VM {n})",
                    v.host
                );
            }
            if let Some(h) = pinned_at.get(n) {
                assert_eq!(&v.host, h, "pinned {n} moved");
            }
        }
    }
}

//! Deterministic simulation of the control plane: the controller's and the agents' pure cores, run
//! against a simulated etcd (leases, election, guarded writes), network (delay, loss, partitions),
//! VMMs and clock, all driven by one seeded RNG. Faults are injected at random: agent crashes (with
//! their VMMs), host partitions that leave the VMMs running, etcd outages, lost messages, failed
//! and in-doubt migrations, controller crashes. After every step the invariants are checked:
//!
//! 1. no VM ever runs (or boots) on two hosts at once;
//! 2. election generations only rise, and no agent's seen generation ever falls;
//! 3. no must-rule is broken: a pinned VM runs only on its host, and two VMs of one anti-affinity
//!    group never run on one host;
//!
//! and, once the faults stop, that every VM that should run runs on exactly one host, where the
//! leader believes it is.
//!
//! `TERN_SIM_SEEDS=N` sets how many seeds run (default 2000); `TERN_SIM_SEED=S` replays one seed
//! and prints its trace.

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tern_agent::core::{self as agent, Agent, MigrationOutcome};
use tern_api::agent::{AgentReport, Command, CommandBody, CommandReply, HostRecord, ObservedState};
use tern_api::cluster::{HostCapacity, VmCreate, VmState};
use tern_controller::core::{self as ctl, Action, Controller, Input, VmRecord};

const STEP_MS: u64 = 100;
const HOSTS: usize = 4;
const CONTROLLERS: usize = 2;
const FAULT_PHASE_MS: u64 = 120_000;
const QUIET_PHASE_MS: u64 = 90_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Real {
    Booting,
    Running,
    Paused,
    Receiving,
}

#[derive(Debug, Clone)]
enum Msg {
    /// Agent → etcd: keep-alive (or grant when it has no lease).
    KeepAlive {
        host: usize,
        sent_ms: u64,
        lease: Option<u64>,
    },
    /// etcd → agent.
    Renewed {
        host: usize,
        sent_ms: u64,
        lease: u64,
    },
    LeaseGone {
        host: usize,
    },
    /// Controller → agent.
    Cmd {
        from: usize,
        host: usize,
        cmd: Command,
    },
    /// Agent → controller.
    Reply {
        to: usize,
        cmd: u64,
        seq: u64,
        reply: CommandReply,
    },
    Report {
        to: usize,
        report: AgentReport,
    },
    /// etcd watch → controller.
    Watch {
        to: usize,
        input: Input,
    },
    /// Local completions on a host (a VMM booted, a migration ended, …).
    Local {
        host: usize,
        incarnation: u64,
        ev: LocalEv,
    },
    /// Fencing done → controller.
    Fenced {
        to: usize,
        host: String,
        n: u32,
    },
}

#[derive(Debug, Clone)]
enum LocalEv {
    VmmUp(String),
    VmmExited(String),
    Listening(String),
    MigrationEnd { vm: String, to: usize },
}

struct Host {
    agent: Agent,
    alive: bool,
    incarnation: u64,
    partitioned_until: u64,
    /// The lease the agent holds (None: it asks for a new one).
    lease: Option<u64>,
    next_keepalive: u64,
    next_report: u64,
    real: BTreeMap<String, Real>,
    /// The controller each command came from, by (generation, id).
    cmd_from: BTreeMap<(u64, u64), usize>,
    restart_at: u64,
}

struct Ctl {
    core: Controller,
    alive: bool,
    paused_until: u64,
    /// Send time of the last successful leader-lease renewal.
    renewed_sent: Option<u64>,
    restart_at: u64,
}

struct Etcd {
    down_until: u64,
    /// host → lease expiry.
    host_leases: BTreeMap<usize, u64>,
    /// host → its current lease id.
    lease_ids: BTreeMap<usize, u64>,
    next_lease: u64,
    leader: Option<(usize, u64, u64)>, // (controller, generation, lease expiry)
    revision: u64,
    desired: BTreeMap<String, VmRecord>,
    maintenance: BTreeSet<String>,
}

struct World {
    now: u64,
    rng: ChaCha8Rng,
    ccfg: ctl::Config,
    acfg: agent::Config,
    etcd: Etcd,
    etcd_was_down: bool,
    hosts: Vec<Host>,
    ctls: Vec<Ctl>,
    net: Vec<(u64, u64, Msg)>,
    seq: u64,
    trace: Vec<String>,
    verbose: bool,
    loss: f64,
    faults: bool,
    created: BTreeSet<String>,
    deleted: BTreeSet<String>,
    next_vm: u32,
    max_generation: u64,
    seen_generation: Vec<u64>,
    pins: BTreeMap<String, String>,
    groups: BTreeMap<String, String>,
}

fn host_name(i: usize) -> String {
    format!("h{i}")
}

fn host_index(name: &str) -> Option<usize> {
    name.strip_prefix('h')?.split(':').next()?.parse().ok()
}

impl World {
    fn new(seed: u64, verbose: bool) -> World {
        let ccfg = ctl::Config {
            lease_ttl_ms: 5_000,
            fence_margin_ms: 2_000,
            command_timeout_ms: 10_000,
            max_migrations_per_host: 1,
            max_migrations: 2,
            ha_reserve_hosts: 1,
            vcpus_per_core: 2,
        };
        let acfg = agent::Config {
            lease_ttl_ms: 5_000,
            fence_margin_ms: 2_000,
            restart_limit: 3,
            restart_window_ms: 30_000,
            restart_backoff_ms: 300,
            receive_timeout_ms: 20_000,
        };
        let hosts = (0..HOSTS)
            .map(|_| Host {
                agent: Agent::new(acfg),
                alive: true,
                incarnation: 0,
                partitioned_until: 0,
                lease: None,
                next_keepalive: 0,
                next_report: 1_000,
                real: BTreeMap::new(),
                cmd_from: BTreeMap::new(),
                restart_at: 0,
            })
            .collect();
        let ctls = (0..CONTROLLERS)
            .map(|_| Ctl {
                core: Controller::new(ccfg),
                alive: true,
                paused_until: 0,
                renewed_sent: None,
                restart_at: 0,
            })
            .collect();
        World {
            now: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            ccfg,
            acfg,
            etcd: Etcd {
                down_until: 0,
                host_leases: BTreeMap::new(),
                lease_ids: BTreeMap::new(),
                next_lease: 1,
                leader: None,
                revision: 100,
                desired: BTreeMap::new(),
                maintenance: BTreeSet::new(),
            },
            etcd_was_down: false,
            hosts,
            ctls,
            net: Vec::new(),
            seq: 0,
            trace: Vec::new(),
            verbose,
            loss: 0.02,
            faults: true,
            created: BTreeSet::new(),
            deleted: BTreeSet::new(),
            next_vm: 0,
            max_generation: 0,
            seen_generation: vec![0; HOSTS],
            pins: BTreeMap::new(),
            groups: BTreeMap::new(),
        }
    }

    fn log(&mut self, s: String) {
        if self.verbose {
            println!("{:>7} {s}", self.now);
        }
        self.trace.push(format!("{:>7} {s}", self.now));
        if self.trace.len() > 400 {
            self.trace.remove(0);
        }
    }

    fn etcd_up(&self) -> bool {
        self.now >= self.etcd.down_until
    }

    fn host_reachable(&self, h: usize) -> bool {
        self.hosts[h].alive && self.now >= self.hosts[h].partitioned_until
    }

    fn send(&mut self, delay: u64, msg: Msg, lossy: bool) {
        if lossy && self.rng.random_bool(self.loss) {
            return;
        }
        self.seq += 1;
        self.net.push((self.now + delay, self.seq, msg));
    }

    /// A host's own event (its VMM's or its agent's), never lost: it does not cross the network.
    fn local(&mut self, delay: u64, host: usize, incarnation: u64, ev: LocalEv) {
        self.send(
            delay,
            Msg::Local {
                host,
                incarnation,
                ev,
            },
            false,
        );
    }

    fn delay(&mut self) -> u64 {
        self.rng.random_range(1..40)
    }

    fn record(&self, h: usize) -> HostRecord {
        HostRecord {
            name: host_name(h),
            agent_url: format!("http://{}", host_name(h)),
            capacity: HostCapacity {
                cores: 4,
                memory_mib: 1024,
                power_model: "hp-ml110-g5".into(),
                volume_node: Some(format!("{}:7700", host_name(h))),
                volume_node_id: Some(h as u32 + 1),
            },
            lease: self.etcd.lease_ids.get(&h).copied().unwrap_or(0),
        }
    }

    fn watch_all(&mut self, input: Input) {
        for c in 0..CONTROLLERS {
            let d = self.delay();
            self.send(
                d,
                Msg::Watch {
                    to: c,
                    input: input.clone(),
                },
                false,
            );
        }
    }

    // ----- etcd -----

    fn etcd_tick(&mut self) {
        let now = self.now;
        // etcd expires no lease while it has no leader, and gives every lease a full TTL again
        // when it comes back.
        if !self.etcd_up() {
            self.etcd_was_down = true;
            return;
        }
        if self.etcd_was_down {
            self.etcd_was_down = false;
            let ttl = self.acfg.lease_ttl_ms;
            for exp in self.etcd.host_leases.values_mut() {
                *exp = (*exp).max(now + ttl);
            }
            if let Some((_, _, exp)) = &mut self.etcd.leader {
                *exp = (*exp).max(now + self.ccfg.lease_ttl_ms);
            }
        }
        let expired: Vec<usize> = self
            .etcd
            .host_leases
            .iter()
            .filter(|(_, exp)| **exp <= now)
            .map(|(h, _)| *h)
            .collect();
        for h in expired {
            self.etcd.host_leases.remove(&h);
            self.log(format!("etcd: lease of h{h} expired"));
            self.watch_all(Input::HostExpired { host: host_name(h) });
        }
        if let Some((c, _, exp)) = self.etcd.leader
            && exp <= now
        {
            self.log(format!("etcd: leader c{c}'s lease expired"));
            self.etcd.leader = None;
        }
        if self.etcd.leader.is_none() && self.etcd_up() {
            // The first live, running controller campaigns and wins.
            let cand = (0..CONTROLLERS)
                .find(|c| self.ctls[*c].alive && self.now >= self.ctls[*c].paused_until);
            if let Some(c) = cand {
                self.etcd.revision += 1;
                let generation = self.etcd.revision;
                assert!(generation > self.max_generation, "generations must rise");
                self.max_generation = generation;
                self.etcd.leader = Some((c, generation, now + self.ccfg.lease_ttl_ms));
                self.ctls[c].renewed_sent = Some(now);
                self.log(format!("etcd: c{c} elected, generation {generation}"));
                let desired: Vec<VmRecord> = self.etcd.desired.values().cloned().collect();
                let maintenance: Vec<String> = self.etcd.maintenance.iter().cloned().collect();
                // The new leader reads the host records first, then its term begins.
                let hosts: Vec<usize> = self.etcd.host_leases.keys().copied().collect();
                for h in hosts {
                    let rec = self.record(h);
                    self.ctl_input(c, Input::HostUp(rec));
                }
                self.ctl_input(
                    c,
                    Input::Elected {
                        generation,
                        desired,
                        maintenance,
                    },
                );
            }
        }
    }

    // ----- controllers -----

    fn ctl_input(&mut self, c: usize, input: Input) {
        if !self.ctls[c].alive {
            return;
        }
        if self.now < self.ctls[c].paused_until {
            // A stopped process reads its sockets when it resumes.
            let at = self.ctls[c].paused_until;
            self.seq += 1;
            self.net.push((at, self.seq, Msg::Watch { to: c, input }));
            return;
        }
        self.ctls[c].core.step(input, self.now);
        self.ctl_flush(c);
    }

    /// Carries out a controller's actions in order, as the shell does: a store that fails (not
    /// the leader any more) deposes the core and drops what follows it; nothing is sent once the
    /// controller's own lease deadline has passed.
    fn ctl_flush(&mut self, c: usize) -> bool {
        let actions = self.ctls[c].core.drain_actions();
        for a in actions {
            let generation = self.ctls[c].core.generation();
            let deadline_ok = self.ctls[c]
                .renewed_sent
                .is_some_and(|s| self.now < s + self.ccfg.lease_ttl_ms - self.ccfg.fence_margin_ms);
            let leads = generation.is_some()
                && self.etcd_up()
                && self
                    .etcd
                    .leader
                    .is_some_and(|(l, g, _)| l == c && Some(g) == generation);
            match a {
                Action::StoreVm { name, record } => {
                    if !leads || !deadline_ok {
                        self.log(format!("c{c}: store of {name} refused: deposed"));
                        self.ctls[c].core.step(Input::Deposed, self.now);
                        self.ctls[c].core.drain_actions();
                        return false;
                    }
                    match record {
                        Some(r) => {
                            self.etcd.desired.insert(name, r);
                        }
                        None => {
                            self.etcd.desired.remove(&name);
                        }
                    }
                }
                Action::StoreMaintenance { host, on } => {
                    if !leads || !deadline_ok {
                        self.ctls[c].core.step(Input::Deposed, self.now);
                        self.ctls[c].core.drain_actions();
                        return false;
                    }
                    if on {
                        self.etcd.maintenance.insert(host);
                    } else {
                        self.etcd.maintenance.remove(&host);
                    }
                }
                Action::Send { host, command, .. } => {
                    if !deadline_ok {
                        self.ctls[c].core.step(Input::Deposed, self.now);
                        self.ctls[c].core.drain_actions();
                        return false;
                    }
                    let Some(h) = host_index(&host) else { continue };
                    self.log(format!(
                        "c{c} → {host}: #{} {:?}",
                        command.id,
                        short(&command.body)
                    ));
                    if self.verbose
                        && matches!(
                            command.body,
                            CommandBody::Start { .. } | CommandBody::Receive { .. }
                        )
                    {
                        let view = self.ctls[c].core.host(&host).map(|h| h.vms);
                        self.log(format!("   {host} holds {view:?}"));
                        let evs: Vec<String> = self.ctls[c]
                            .core
                            .events(0)
                            .iter()
                            .rev()
                            .take(8)
                            .map(|e| e.message.clone())
                            .collect();
                        self.log(format!("   recent events {evs:?}"));
                    }
                    let d = self.delay();
                    self.send(
                        d,
                        Msg::Cmd {
                            from: c,
                            host: h,
                            cmd: command,
                        },
                        true,
                    );
                }
                Action::FenceLeases { host, .. } => {
                    // The volume coordinator bumps the epochs of the host's disk leases.
                    let n = self
                        .etcd
                        .desired
                        .values()
                        .filter(|r| r.host.as_deref() == Some(host.as_str()))
                        .count() as u32;
                    self.log(format!("c{c}: fencing {host}'s leases"));
                    let d = self.delay() + 50;
                    self.send(d, Msg::Fenced { to: c, host, n }, false);
                }
            }
        }
        true
    }

    fn ctl_tick(&mut self, c: usize) {
        let now = self.now;
        if !self.ctls[c].alive {
            if now >= self.ctls[c].restart_at && self.ctls[c].restart_at > 0 {
                self.log(format!("c{c}: restarted"));
                self.ctls[c] = Ctl {
                    core: Controller::new(self.ccfg),
                    alive: true,
                    paused_until: 0,
                    renewed_sent: None,
                    restart_at: 0,
                };
            }
            return;
        }
        if now < self.ctls[c].paused_until {
            return;
        }
        // A shell whose core was deposed while etcd still names it resigns (revokes its election
        // lease), so an election can take place.
        if let Some((l, g, _)) = self.etcd.leader
            && l == c
            && self.ctls[c].core.generation() != Some(g)
            && self.etcd_up()
        {
            self.log(format!("c{c}: resigns generation {g}"));
            self.etcd.leader = None;
            return;
        }
        // Leader keep-alive (synchronous with etcd in this model).
        if let Some((l, g, _)) = self.etcd.leader
            && l == c
            && self.etcd_up()
            && now.is_multiple_of(1_000)
        {
            self.etcd.leader = Some((l, g, now + self.ccfg.lease_ttl_ms));
            self.ctls[c].renewed_sent = Some(now);
        }
        let lapsed = self.ctls[c]
            .renewed_sent
            .is_some_and(|s| now >= s + self.ccfg.lease_ttl_ms - self.ccfg.fence_margin_ms);
        if lapsed && self.ctls[c].core.generation().is_some() {
            self.log(format!("c{c}: own lease deadline passed: deposed"));
            self.ctls[c].core.step(Input::Deposed, now);
            self.ctls[c].core.drain_actions();
        }
        self.ctl_input(c, Input::Tick);
    }

    fn leader(&self) -> Option<usize> {
        let (c, g, _) = self.etcd.leader?;
        (self.ctls[c].alive && self.ctls[c].core.generation() == Some(g)).then_some(c)
    }

    // ----- agents -----

    fn agent_input(&mut self, h: usize, input: agent::Input) {
        if !self.hosts[h].alive {
            return;
        }
        self.hosts[h].agent.step(input, self.now);
        let seen = self.hosts[h].agent.generation_seen();
        assert!(
            seen >= self.seen_generation[h],
            "h{h}'s seen generation fell from {} to {seen}",
            self.seen_generation[h]
        );
        self.seen_generation[h] = seen;
        self.agent_flush(h);
    }

    fn agent_flush(&mut self, h: usize) {
        let actions = self.hosts[h].agent.drain_actions();
        let inc = self.hosts[h].incarnation;
        for a in actions {
            match a {
                agent::Action::Reply {
                    generation,
                    id,
                    seq,
                    reply,
                } => {
                    let Some(&to) = self.hosts[h].cmd_from.get(&(generation, id)) else {
                        continue;
                    };
                    if self.host_reachable(h) {
                        let d = self.delay();
                        self.send(
                            d,
                            Msg::Reply {
                                to,
                                cmd: id,
                                seq,
                                reply,
                            },
                            true,
                        );
                    }
                }
                agent::Action::Spawn { spec, .. } => {
                    self.hosts[h].real.insert(spec.name.clone(), Real::Booting);
                    let d = self.rng.random_range(100..400);
                    self.local(d, h, inc, LocalEv::VmmUp(spec.name));
                }
                agent::Action::SpawnReceiver { spec, .. } => {
                    self.hosts[h]
                        .real
                        .insert(spec.name.clone(), Real::Receiving);
                    self.local(50, h, inc, LocalEv::Listening(spec.name));
                }
                agent::Action::Kill { vm } => {
                    self.hosts[h].real.remove(&vm);
                    self.local(10, h, inc, LocalEv::VmmExited(vm));
                }
                agent::Action::Resume { vm } => {
                    if let Some(r) = self.hosts[h].real.get_mut(&vm)
                        && *r == Real::Paused
                    {
                        *r = Real::Running;
                    }
                }
                agent::Action::Migrate { vm, to, .. } => {
                    let Some(t) = host_index(&to) else { continue };
                    let d = self.rng.random_range(200..1_500);
                    self.local(d, h, inc, LocalEv::MigrationEnd { vm, to: t });
                }
            }
        }
    }

    fn agent_tick(&mut self, h: usize) {
        let now = self.now;
        if !self.hosts[h].alive {
            if now >= self.hosts[h].restart_at {
                self.log(format!("h{h}: agent restarted"));
                let host = &mut self.hosts[h];
                host.alive = true;
                host.incarnation += 1;
                // The shell kept the highest generation on disk.
                host.agent = Agent::restore(self.acfg, self.seen_generation[h]);
                host.lease = None;
                host.next_keepalive = now;
                host.cmd_from.clear();
            }
            return;
        }
        if now >= self.hosts[h].next_keepalive {
            self.hosts[h].next_keepalive = now + self.acfg.lease_ttl_ms / 3;
            if self.host_reachable(h) {
                let d = self.delay();
                let lease = self.hosts[h].lease;
                self.send(
                    d,
                    Msg::KeepAlive {
                        host: h,
                        sent_ms: now,
                        lease,
                    },
                    false,
                );
            }
        }
        if now >= self.hosts[h].next_report {
            self.hosts[h].next_report = now + 1_000;
            if self.host_reachable(h) {
                let report = AgentReport {
                    host: host_name(h),
                    generation_seen: self.hosts[h].agent.generation_seen(),
                    seq: self.hosts[h].agent.seq(),
                    last_command_id: self.hosts[h].agent.last_command_id(),
                    vms: self.hosts[h].agent.observed(),
                    cpu_utilization: Some(0.1),
                    parked_cores: None,
                };
                for c in 0..CONTROLLERS {
                    let d = self.delay();
                    self.send(
                        d,
                        Msg::Report {
                            to: c,
                            report: report.clone(),
                        },
                        true,
                    );
                }
            }
        }
        self.agent_input(h, agent::Input::Tick);
    }

    fn migration_end(&mut self, src: usize, vm: &str, dst: usize) {
        let src_running = self.hosts[src].real.get(vm) == Some(&Real::Running);
        let dst_ready = self.host_reachable(dst)
            && self.hosts[src].alive
            && self.now >= self.hosts[src].partitioned_until
            && self.hosts[dst].real.get(vm) == Some(&Real::Receiving);
        let dst_inc = self.hosts[dst].incarnation;
        let roll: f64 = self.rng.random();
        let (fail, doubt, lost) = if self.faults {
            (0.1, 0.1, 0.05)
        } else {
            (0.0, 0.0, 0.0)
        };
        let outcome = if !src_running || !dst_ready || roll < fail {
            MigrationOutcome::Failed
        } else if roll < fail + doubt {
            MigrationOutcome::InDoubt
        } else if roll < fail + doubt + lost {
            MigrationOutcome::Lost
        } else {
            MigrationOutcome::Completed
        };
        self.log(format!("h{src}: migration of {vm} to h{dst}: {outcome:?}"));
        match outcome {
            MigrationOutcome::Completed => {
                self.hosts[src].real.remove(vm);
                self.hosts[dst].real.insert(vm.into(), Real::Running);
                self.local(1, dst, dst_inc, LocalEv::VmmUp(vm.into()));
            }
            MigrationOutcome::Failed => {
                if self.hosts[dst].real.get(vm) == Some(&Real::Receiving) {
                    self.hosts[dst].real.remove(vm);
                    self.local(1, dst, dst_inc, LocalEv::VmmExited(vm.into()));
                }
            }
            MigrationOutcome::Lost => {
                // Post-copy failed after the switch: the source stays paused for good and the
                // target stopped the guest (its VMM exits).
                if let Some(r) = self.hosts[src].real.get_mut(vm) {
                    *r = Real::Paused;
                }
                self.hosts[dst].real.remove(vm);
                self.local(1, dst, dst_inc, LocalEv::VmmExited(vm.into()));
            }
            MigrationOutcome::InDoubt => {
                // The source paused for the commit; the target may or may not have run it.
                if let Some(r) = self.hosts[src].real.get_mut(vm) {
                    *r = Real::Paused;
                }
                if self.rng.random_bool(0.5) {
                    self.hosts[dst].real.insert(vm.into(), Real::Running);
                    self.local(1, dst, dst_inc, LocalEv::VmmUp(vm.into()));
                } else {
                    self.hosts[dst].real.remove(vm);
                    self.local(1, dst, dst_inc, LocalEv::VmmExited(vm.into()));
                }
            }
        }
        if src_running || outcome != MigrationOutcome::Failed {
            self.agent_input(
                src,
                agent::Input::MigrationEnded {
                    vm: vm.into(),
                    outcome,
                    report: None,
                },
            );
        } else {
            self.agent_input(
                src,
                agent::Input::MigrationEnded {
                    vm: vm.into(),
                    outcome: MigrationOutcome::Failed,
                    report: None,
                },
            );
        }
    }

    // ----- delivery -----

    fn deliver(&mut self, msg: Msg) {
        match msg {
            Msg::KeepAlive {
                host,
                sent_ms,
                lease,
            } => {
                if !self.etcd_up() || !self.host_reachable(host) {
                    return;
                }
                let now = self.now;
                let ttl = self.acfg.lease_ttl_ms;
                let current = self
                    .etcd
                    .host_leases
                    .contains_key(&host)
                    .then(|| self.etcd.lease_ids.get(&host).copied())
                    .flatten();
                let id = match lease {
                    // A grant: a new lease, the record put with it (replacing any older one).
                    None => {
                        self.etcd.next_lease += 1;
                        let id = self.etcd.next_lease;
                        self.etcd.lease_ids.insert(host, id);
                        self.etcd.host_leases.insert(host, now + ttl);
                        self.log(format!("etcd: h{host} registered with lease {id}"));
                        let rec = self.record(host);
                        self.watch_all(Input::HostUp(rec));
                        id
                    }
                    Some(id) if current == Some(id) => {
                        self.etcd.host_leases.insert(host, now + ttl);
                        id
                    }
                    Some(_) => {
                        let d = self.delay();
                        self.send(d, Msg::LeaseGone { host }, false);
                        return;
                    }
                };
                let d = self.delay();
                self.send(
                    d,
                    Msg::Renewed {
                        host,
                        sent_ms,
                        lease: id,
                    },
                    false,
                );
            }
            Msg::Renewed {
                host,
                sent_ms,
                lease,
            } => {
                if self.host_reachable(host) && self.hosts[host].lease.is_none_or(|l| l == lease) {
                    self.hosts[host].lease = Some(lease);
                    self.agent_input(host, agent::Input::LeaseRenewed { sent_ms, lease });
                }
            }
            Msg::LeaseGone { host } => {
                if self.host_reachable(host) {
                    self.log(format!("h{host}: lease gone"));
                    self.hosts[host].lease = None;
                    self.agent_input(host, agent::Input::LeaseLost);
                    self.hosts[host].next_keepalive = self.now;
                }
            }
            Msg::Cmd { from, host, cmd } => {
                if !self.host_reachable(host) {
                    return;
                }
                self.hosts[host]
                    .cmd_from
                    .insert((cmd.generation, cmd.id), from);
                self.agent_input(host, agent::Input::Command(cmd));
            }
            Msg::Reply {
                to,
                cmd,
                seq,
                reply,
            } => {
                if !matches!(reply, CommandReply::Done { vm_state: None, .. }) {
                    self.log(format!("c{to} ← #{cmd} {reply:?}"));
                }
                self.ctl_input(to, Input::Reply { cmd, seq, reply });
            }
            Msg::Report { to, report } => {
                self.ctl_input(to, Input::Report(report));
            }
            Msg::Watch { to, input } => {
                self.ctl_input(to, input);
            }
            Msg::Fenced { to, host, n } => {
                self.ctl_input(
                    to,
                    Input::Fenced {
                        host,
                        result: Ok(n),
                    },
                );
            }
            Msg::Local {
                host,
                incarnation,
                ev,
            } => {
                if !self.hosts[host].alive || self.hosts[host].incarnation != incarnation {
                    return;
                }
                match ev {
                    LocalEv::VmmUp(vm) => {
                        if let Some(r) = self.hosts[host].real.get_mut(&vm)
                            && matches!(*r, Real::Booting | Real::Running)
                        {
                            *r = Real::Running;
                            self.agent_input(host, agent::Input::VmmRunning { vm });
                        }
                    }
                    LocalEv::VmmExited(vm) => {
                        if !self.hosts[host].real.contains_key(&vm) {
                            self.agent_input(
                                host,
                                agent::Input::VmmExited {
                                    vm,
                                    status: "exited".into(),
                                },
                            );
                        }
                    }
                    LocalEv::Listening(vm) => {
                        if self.hosts[host].real.get(&vm) == Some(&Real::Receiving) {
                            self.agent_input(
                                host,
                                agent::Input::ReceiverListening {
                                    vm,
                                    listen: format!("h{host}:7000"),
                                },
                            );
                        }
                    }
                    LocalEv::MigrationEnd { vm, to } => self.migration_end(host, &vm, to),
                }
            }
        }
    }

    // ----- the operator and the faults -----

    fn operator(&mut self) {
        let Some(c) = self.leader() else { return };
        let now = self.now;
        let roll: f64 = self.rng.random();
        if roll < 0.02 && self.created.len() < 12 {
            self.next_vm += 1;
            let name = format!("vm{}", self.next_vm);
            let pin = self
                .rng
                .random_bool(0.1)
                .then(|| host_name(self.rng.random_range(0..HOSTS)));
            let group = self
                .rng
                .random_bool(0.3)
                .then(|| format!("g{}", self.rng.random_range(0..2)));
            let spec = VmCreate {
                name: name.clone(),
                vcpus: 1,
                memory_mib: 128,
                kernel: "builtin:testguest".into(),
                cmdline: String::new(),
                disk: Some(format!("{name}.raw")),
                host: pin.clone(),
                anti_affinity: group.clone(),
                restart_priority: self.rng.random_range(0..=100),
            };
            let r = self.ctls[c].core.create_vm(spec, now);
            self.log(format!(
                "api: create {name} pin {pin:?} group {group:?}: {:?}",
                r.as_ref().map(|v| v.host.clone())
            ));
            // The shell answers 201 only once the VM's record is stored.
            let stored = self.ctl_flush(c);
            if r.is_ok() && stored {
                self.created.insert(name.clone());
                if let Some(p) = pin {
                    self.pins.insert(name.clone(), p);
                }
                if let Some(g) = group {
                    self.groups.insert(name, g);
                }
            }
        } else if roll < 0.04 {
            let vms: Vec<String> = self.created.difference(&self.deleted).cloned().collect();
            if vms.is_empty() {
                return;
            }
            let vm = vms[self.rng.random_range(0..vms.len())].clone();
            let to = self
                .rng
                .random_bool(0.5)
                .then(|| host_name(self.rng.random_range(0..HOSTS)));
            let r = self.ctls[c].core.migrate_vm(&vm, to.as_deref(), now);
            self.log(format!("api: migrate {vm} to {to:?}: {r:?}"));
            self.ctl_flush(c);
        } else if roll < 0.045 {
            let h = host_name(self.rng.random_range(0..HOSTS));
            let enter = self.rng.random_bool(0.5);
            let r = self.ctls[c].core.set_maintenance(&h, enter, now);
            self.log(format!("api: maintenance {h} {enter}: {r:?}"));
            self.ctl_flush(c);
        } else if roll < 0.047 {
            let vms: Vec<String> = self.created.difference(&self.deleted).cloned().collect();
            if vms.is_empty() {
                return;
            }
            let vm = vms[self.rng.random_range(0..vms.len())].clone();
            let r = self.ctls[c].core.delete_vm(&vm, now);
            self.log(format!("api: delete {vm}: {r:?}"));
            if self.ctl_flush(c) && r.is_ok() {
                self.deleted.insert(vm);
            }
        }
    }

    fn inject_fault(&mut self) {
        let roll: f64 = self.rng.random();
        let now = self.now;
        if roll < 0.002 {
            // SIGKILL an agent and its VMMs.
            let h = self.rng.random_range(0..HOSTS);
            if self.hosts[h].alive {
                self.log(format!("fault: h{h} agent and VMMs killed"));
                self.hosts[h].alive = false;
                self.hosts[h].real.clear();
                self.hosts[h].restart_at = now + self.rng.random_range(2_000..20_000);
            }
        } else if roll < 0.004 {
            // Cut a host off; its VMMs keep running.
            let h = self.rng.random_range(0..HOSTS);
            let d = self.rng.random_range(1_000..15_000);
            self.log(format!("fault: h{h} partitioned for {d} ms"));
            self.hosts[h].partitioned_until = now + d;
        } else if roll < 0.005 {
            let d = self.rng.random_range(500..8_000);
            self.log(format!("fault: etcd unavailable for {d} ms"));
            self.etcd.down_until = now + d;
        } else if roll < 0.006 {
            let c = self.rng.random_range(0..CONTROLLERS);
            if self.ctls[c].alive {
                self.log(format!("fault: c{c} killed"));
                self.ctls[c].alive = false;
                self.ctls[c].restart_at = now + self.rng.random_range(1_000..10_000);
            }
        } else if roll < 0.007 {
            let c = self.rng.random_range(0..CONTROLLERS);
            let d = self.rng.random_range(500..8_000);
            self.log(format!("fault: c{c} paused for {d} ms"));
            self.ctls[c].paused_until = now + d;
        }
    }

    // ----- invariants -----

    fn check(&self) -> Result<(), String> {
        let mut running: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (h, host) in self.hosts.iter().enumerate() {
            for (vm, r) in &host.real {
                if matches!(r, Real::Running | Real::Booting) {
                    running.entry(vm.as_str()).or_default().push(h);
                }
            }
        }
        for (vm, hs) in &running {
            if hs.len() > 1 {
                return Err(format!("{vm} runs on hosts {hs:?} at once"));
            }
            if let Some(pin) = self.pins.get(*vm)
                && host_name(hs[0]) != *pin
            {
                return Err(format!("{vm} is pinned to {pin} but runs on h{}", hs[0]));
            }
        }
        for (h, host) in self.hosts.iter().enumerate() {
            let mut seen = BTreeMap::new();
            for (vm, r) in &host.real {
                if !matches!(r, Real::Running | Real::Booting) {
                    continue;
                }
                if let Some(g) = self.groups.get(vm)
                    && let Some(other) = seen.insert(g.clone(), vm.clone())
                {
                    return Err(format!("{vm} and {other} of group {g} both run on h{h}"));
                }
            }
        }
        Ok(())
    }

    fn check_settled(&self) -> Result<(), String> {
        let Some(c) = self.leader() else {
            return Err("no leader after the quiet phase".into());
        };
        let view = self.ctls[c].core.placements();
        for vm in self.created.difference(&self.deleted) {
            let copies: Vec<usize> = (0..HOSTS)
                .filter(|h| self.hosts[*h].real.get(vm) == Some(&Real::Running))
                .collect();
            let Some((host, state)) = view.get(vm) else {
                return Err(format!("the leader forgot {vm}"));
            };
            if *state == VmState::Failed {
                continue;
            }
            // Waiting for room is allowed when no host fits it under the rules (e.g. its pinned
            // host is full); the leader must say so.
            if *state == VmState::Pending && copies.is_empty() {
                let info = self.ctls[c].core.vm(vm).map_err(|e| e.to_string())?;
                let why = info.last_error.unwrap_or_default();
                // A placement refusal (no host fits under the rules, or every host is down or in
                // maintenance) is a legitimate wait; a loss that was never followed by a placement
                // attempt is not.
                let placement_refusal = why.contains("slots")
                    || why.contains("MiB")
                    || why.contains("anti-affinity")
                    || why.contains(" is down")
                    || why.contains(" is in maintenance")
                    || why.contains(" is off or powering off");
                if placement_refusal {
                    continue;
                }
                // Pinned to a host in maintenance: it waits for the host.
                if let Some(pin) = self.pins.get(vm)
                    && self.ctls[c].core.host(pin).is_ok_and(|h| h.maintenance)
                {
                    continue;
                }
                let hosts: Vec<String> = self.ctls[c]
                    .core
                    .hosts()
                    .iter()
                    .map(|h| format!("{} {:?} m={}", h.name, h.state, h.maintenance))
                    .collect();
                return Err(format!(
                    "{vm} is pending after the quiet phase: {why}; hosts {hosts:?}"
                ));
            }
            if copies.len() != 1 {
                let debug: Vec<String> = (0..HOSTS)
                    .map(|h| self.ctls[c].core.debug_host(&host_name(h)))
                    .collect();
                return Err(format!(
                    "{vm} runs on {copies:?} after the quiet phase (leader: {host:?} {state:?})\n{}",
                    debug.join("\n")
                ));
            }
            if host.as_deref() != Some(host_name(copies[0]).as_str()) || *state != VmState::Running
            {
                return Err(format!(
                    "{vm} runs on h{} but the leader says {host:?} {state:?}",
                    copies[0]
                ));
            }
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), String> {
        let end = FAULT_PHASE_MS + QUIET_PHASE_MS;
        while self.now < end {
            self.now += STEP_MS;
            if self.now >= FAULT_PHASE_MS && self.faults {
                self.faults = false;
                self.loss = 0.0;
                self.log("quiet phase: faults stop".into());
                for h in 0..HOSTS {
                    self.hosts[h].partitioned_until = 0;
                }
            }
            // Deliver what is due, in order.
            self.net.sort_by_key(|(t, s, _)| (*t, *s));
            let due: Vec<Msg> = {
                let split = self.net.partition_point(|(t, _, _)| *t <= self.now);
                self.net.drain(..split).map(|(_, _, m)| m).collect()
            };
            for m in due {
                self.deliver(m);
                self.check()?;
            }
            self.etcd_tick();
            for c in 0..CONTROLLERS {
                self.ctl_tick(c);
            }
            for h in 0..HOSTS {
                self.agent_tick(h);
                self.check()?;
            }
            if self.faults {
                self.inject_fault();
            }
            if self.now < FAULT_PHASE_MS {
                self.operator();
            }
            self.check()?;
        }
        self.check_settled()
    }
}

fn short(b: &CommandBody) -> String {
    match b {
        CommandBody::Start { spec, .. } => format!("start {}", spec.name),
        CommandBody::Stop { vm } => format!("stop {vm}"),
        CommandBody::Receive { spec, .. } => format!("receive {}", spec.name),
        CommandBody::MigrateOut { vm, to, .. } => format!("migrate {vm} → {to}"),
        CommandBody::Resume { vm } => format!("resume {vm}"),
        CommandBody::Ping => "ping".into(),
        CommandBody::Query { vm } => format!("query {vm}"),
    }
}

fn run_seed(seed: u64, verbose: bool) -> Result<World, (String, Vec<String>)> {
    let mut w = World::new(seed, verbose);
    match w.run() {
        Ok(()) => Ok(w),
        Err(e) => Err((e, w.trace.clone())),
    }
}

#[test]
fn the_invariants_hold_on_every_step_of_every_seed() {
    if let Ok(seed) = std::env::var("TERN_SIM_SEED") {
        let seed: u64 = seed.parse().expect("TERN_SIM_SEED is a number");
        if let Err((e, _)) = run_seed(seed, true) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let seeds: u64 = std::env::var("TERN_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let mut created = 0;
    let mut elections = 0;
    let mut fences = 0;
    for seed in 0..seeds {
        match run_seed(seed, false) {
            Ok(w) => {
                created += w.created.len();
                elections += w.max_generation - 100;
                fences += w.hosts.iter().map(|h| h.agent.self_fences).sum::<u64>();
            }
            Err((e, trace)) => {
                let tail = trace[trace.len().saturating_sub(60)..].join("\n");
                panic!(
                    "seed {seed}: {e}\nlast events:\n{tail}\nreplay: TERN_SIM_SEED={seed} cargo test -p tern-controller --test simulation -- --nocapture"
                );
            }
        }
    }
    // The runs did something: VMs were created, leaders changed, hosts fenced themselves.
    assert!(
        created as u64 > seeds,
        "{created} VMs created over {seeds} seeds"
    );
    assert!(
        elections > seeds,
        "{elections} elections over {seeds} seeds"
    );
    assert!(fences > 0, "no agent ever fenced itself");
    println!("{seeds} seeds: {created} VMs, {elections} elections, {fences} self-fences");
}

#[test]
fn an_agent_refuses_a_deposed_leaders_command_after_hearing_the_new_one() {
    let mut a = Agent::new(agent::Config::default());
    a.step(
        agent::Input::LeaseRenewed {
            sent_ms: 0,
            lease: 1,
        },
        0,
    );
    let ping = |generation, id| {
        agent::Input::Command(Command {
            generation,
            id,
            host_lease: 1,
            body: CommandBody::Ping,
        })
    };
    a.step(ping(7, 1), 1);
    a.step(ping(8, 1), 2);
    a.drain_actions();
    a.step(
        agent::Input::Command(Command {
            generation: 7,
            id: 2,
            host_lease: 1,
            body: CommandBody::Stop { vm: "x".into() },
        }),
        3,
    );
    assert_eq!(
        a.drain_actions(),
        vec![agent::Action::Reply {
            generation: 7,
            id: 2,
            seq: 4,
            reply: CommandReply::StaleGeneration { seen: 8 }
        }]
    );
    assert_eq!(a.state_of("x"), ObservedState::Absent);
}

//! The simulation loop: hosts, VMs and migrations stepped through one day, with energy and SLA
//! accounting.
//!
//! In `Model::CloudSim` the loop reproduces CloudSim 3.0.3's event order: VMs are created at t = 0 at
//! full demand, the control loop runs at t = 300.1, 600.1, … (the first tick 300 s after the cloudlets
//! arrive at 0.1 s), every migration completion triggers a data-centre update just before and just
//! after it, a host at 0 % CPU draws 0 W, and a VM whose demand is exactly zero at an update leaves
//! the data centre for good. `Model::Paper` steps at t = 0, 300, …, 86 400 and follows the paper's
//! text (see docs/sim.md for every difference).

use std::collections::VecDeque;

use tern_policy::cluster::HISTORY_LEN;
use tern_policy::hash_order::SchedOrder;
use tern_policy::{
    ClusterView, HostView, Model, PolicyConfig, PolicySpec, SplitMix64, VmView, optimize,
};

use crate::report::{Report, Timeline};
use crate::workload::{INTERVAL_S, SAMPLES, Workload, migration_mb_per_s, migration_time_s};

/// Run options.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    /// Policy to run.
    pub policy: PolicySpec,
    /// Reference-code or paper semantics.
    pub model: Model,
    /// Seed for the random selector.
    pub seed: u64,
    /// Record per-step series for plots.
    pub timeline: bool,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    t: f64,
    alloc: f64,
    req: f64,
    flag: bool,
}

#[derive(Debug)]
struct Host {
    pe_mips: f64,
    total_mips: f64,
    power: tern_policy::PowerModel,
    vms: Vec<u32>,
    mig_in: Vec<u32>,
    util_mips: f64,
    prev_util_mips: f64,
    awake: bool,
    prev_awake: bool,
    last: Option<Entry>,
    prev_active: bool,
    active_s: f64,
    violation_s: f64,
    shutdowns: u64,
    /// CloudSim emulation: free MIPS last rebuilt in hash order / most VMs ever held.
    by_uid: bool,
    peak: u32,
}

#[derive(Debug)]
struct Vm {
    mips: f64,
    ram_mb: u32,
    host: Option<u32>,
    in_migration: bool,
    req: f64,
    alloc: f64,
    history: VecDeque<f64>,
    history_t: f64,
    last: Option<Entry>,
    req_mips_s: f64,
    alloc_mips_s: f64,
    mig_under_mips_s: f64,
}

struct Sim<'a> {
    w: &'a Workload,
    model: Model,
    hosts: Vec<Host>,
    vms: Vec<Vm>,
    energy_j: f64,
    last_t: f64,
    migrations: u64,
    unplaced: u64,
}

impl Host {
    fn utilization(&self, mips: f64) -> f64 {
        let u = mips / self.total_mips;
        if u > 1.0 && u < 1.01 { 1.0 } else { u }
    }

    fn record(&mut self, e: Entry) {
        if let Some(last) = self.last {
            if last.t == e.t {
                self.last = Some(e);
                return;
            }
            let dt = e.t - last.t;
            if last.flag {
                self.active_s += dt;
                if last.alloc < last.req {
                    self.violation_s += dt;
                }
            }
            if self.prev_active && !last.flag {
                self.shutdowns += 1;
            }
            self.prev_active = last.flag;
        }
        self.last = Some(e);
    }

    fn finish(&mut self) {
        if let Some(last) = self.last
            && self.prev_active
            && !last.flag
        {
            self.shutdowns += 1;
        }
    }
}

impl Vm {
    fn record(&mut self, e: Entry) {
        if let Some(last) = self.last {
            if last.t == e.t {
                self.last = Some(e);
                return;
            }
            let dt = e.t - last.t;
            self.alloc_mips_s += last.alloc * dt;
            self.req_mips_s += last.req * dt;
            if last.alloc < last.req && last.flag {
                self.mig_under_mips_s += (last.req - last.alloc) * dt;
            }
        }
        self.last = Some(e);
    }
}

/// Where time `t` falls between trace samples (computed once per update, used for every VM).
#[derive(Debug, Clone, Copy)]
struct TimePoint {
    grid: Option<usize>,
    i1: usize,
    i2: usize,
    denom: f64,
    offset: f64,
}

impl TimePoint {
    fn new(t: f64) -> Self {
        if t % INTERVAL_S == 0.0 {
            let i = (t as i64 / INTERVAL_S as i64) as usize;
            return TimePoint {
                grid: Some(i),
                i1: i,
                i2: i,
                denom: 1.0,
                offset: 0.0,
            };
        }
        let t1 = (t / INTERVAL_S).floor();
        let t2 = (t / INTERVAL_S).ceil();
        TimePoint {
            grid: None,
            i1: t1 as usize,
            i2: t2 as usize,
            denom: (t2 - t1) * INTERVAL_S,
            offset: t - t1 * INTERVAL_S,
        }
    }

    /// Utilisation of a trace at this time (linear between samples; the sample after the last
    /// repeats it).
    fn utilization(&self, trace: &[u8; SAMPLES]) -> f64 {
        let at = |i: usize| trace[i.min(SAMPLES - 1)] as f64 / 100.0;
        match self.grid {
            Some(i) => at(i),
            None => {
                let (u1, u2) = (at(self.i1), at(self.i2));
                let delta = (u2 - u1) / self.denom;
                u1 + delta * self.offset
            }
        }
    }
}

#[cfg(test)]
fn trace_utilization(trace: &[u8; SAMPLES], t: f64) -> f64 {
    TimePoint::new(t).utilization(trace)
}

impl<'a> Sim<'a> {
    fn new(w: &'a Workload, model: Model) -> Self {
        let hosts = w
            .hosts
            .iter()
            .map(|s| Host {
                pe_mips: s.pe_mips,
                total_mips: s.pe_mips * s.pes as f64,
                power: s.power,
                vms: Vec::new(),
                mig_in: Vec::new(),
                util_mips: 0.0,
                prev_util_mips: 0.0,
                awake: false,
                prev_awake: false,
                last: None,
                prev_active: true,
                active_s: 0.0,
                violation_s: 0.0,
                shutdowns: 0,
                by_uid: false,
                peak: 0,
            })
            .collect();
        let vms = w
            .vms
            .iter()
            .map(|s| Vm {
                mips: s.mips,
                ram_mb: s.ram_mb,
                host: None,
                in_migration: false,
                req: 0.0,
                alloc: 0.0,
                history: VecDeque::with_capacity(HISTORY_LEN + 1),
                history_t: 0.0,
                last: None,
                req_mips_s: 0.0,
                alloc_mips_s: 0.0,
                mig_under_mips_s: 0.0,
            })
            .collect();
        Sim {
            w,
            model,
            hosts,
            vms,
            energy_j: 0.0,
            last_t: 0.0,
            migrations: 0,
            unplaced: 0,
        }
    }

    fn is_history_tick(&self, t: f64) -> bool {
        match self.model {
            Model::CloudSim => (t - 0.1) % INTERVAL_S == 0.0,
            Model::Paper => t % INTERVAL_S == 0.0,
        }
    }

    /// Recompute one host at time `t`: VM demands, CPU shares, utilisation and the state records.
    fn host_update(&mut self, h: usize, t: f64) {
        let (tick, tp) = (self.is_history_tick(t), TimePoint::new(t));
        self.host_update_at(h, t, tick, tp);
    }

    fn host_update_at(&mut self, h: usize, t: f64, tick: bool, tp: TimePoint) {
        let host = &mut self.hosts[h];
        // An empty host that was already idle and recorded as such twice in a row: one more idle
        // record changes no metric (no energy, no active time, no new shutdown), so skip the work.
        if host.vms.is_empty()
            && host.util_mips == 0.0
            && host.prev_util_mips == 0.0
            && !host.awake
            && !host.prev_awake
            && !host.prev_active
            && host.last.is_some_and(|e| !e.flag)
        {
            host.by_uid = false;
            return;
        }
        host.by_uid = false;
        host.peak = host.peak.max(host.vms.len() as u32);
        for &v in &host.vms {
            let vm = &mut self.vms[v as usize];
            let u = tp.utilization(&self.w.traces[v as usize]);
            vm.req = u * vm.mips;
            if tick && t > vm.history_t {
                if t != 0.0 || u != 0.0 {
                    vm.history.push_front(u);
                    vm.history.truncate(HISTORY_LEN);
                }
                vm.history_t = t;
            }
        }
        // CPU shares: demands capped at one core; migrating-in VMs cost 10 % on the destination
        let cap = host.total_mips;
        let mut avail = cap;
        let mut over = false;
        let mut required = 0.0;
        for &v in &host.vms {
            let vm = &self.vms[v as usize];
            let incoming = host.mig_in.contains(&v);
            let mut r = vm.req.min(host.pe_mips);
            if incoming {
                r *= 0.1;
            }
            required += r;
            if !over {
                if avail >= r {
                    avail -= r;
                } else {
                    over = true;
                }
            }
        }
        let scale = cap / required;
        host.prev_util_mips = host.util_mips;
        host.prev_awake = host.awake;
        let mut util = 0.0;
        let mut host_req = 0.0;
        for &v in &host.vms {
            let vm = &mut self.vms[v as usize];
            let incoming = host.mig_in.contains(&v);
            let outgoing = vm.in_migration && !incoming;
            let c = vm.req.min(host.pe_mips);
            let alloc = if !over {
                if outgoing {
                    c * 0.9
                } else if incoming {
                    c * 0.1
                } else {
                    c
                }
            } else if outgoing {
                (c * scale * 0.9).floor()
            } else if incoming {
                (c * 0.1 * scale).floor()
            } else {
                (c * scale).floor()
            };
            vm.alloc = alloc;
            if incoming {
                // the destination only reserves 10 % for an incoming VM and keeps no record of it
                util += alloc;
            } else {
                vm.record(Entry {
                    t,
                    alloc,
                    req: vm.req,
                    flag: outgoing,
                });
                // the source host is charged the VM's full share while it migrates
                util += if vm.in_migration { alloc / 0.9 } else { alloc };
            }
            host_req += vm.req;
        }
        host.util_mips = util;
        host.awake = !host.vms.is_empty();
        let active = match self.model {
            Model::CloudSim => util > 0.0,
            Model::Paper => host.awake,
        };
        host.record(Entry {
            t,
            alloc: util,
            req: host_req,
            flag: active,
        });
    }

    /// Update every host at `t`, add the energy since the last update, retire finished VMs.
    fn dc_update(&mut self, t: f64) {
        let (tick, tp) = (self.is_history_tick(t), TimePoint::new(t));
        for h in 0..self.hosts.len() {
            self.host_update_at(h, t, tick, tp);
        }
        let dt = t - self.last_t;
        if dt > 0.0 {
            let mut e = 0.0;
            for host in &self.hosts {
                let from = host.utilization(host.prev_util_mips).min(1.0);
                let to = host.utilization(host.util_mips).min(1.0);
                e += match self.model {
                    Model::CloudSim => {
                        if from == 0.0 {
                            0.0
                        } else {
                            let pf = host.power.watts_at(from);
                            let pt = host.power.watts_at(to);
                            (pf + (pt - pf) / 2.0) * dt
                        }
                    }
                    Model::Paper => {
                        let pf = if host.prev_awake {
                            host.power.watts_at(from)
                        } else {
                            0.0
                        };
                        let pt = if host.awake {
                            host.power.watts_at(to)
                        } else {
                            0.0
                        };
                        (pf + pt) / 2.0 * dt
                    }
                };
            }
            self.energy_j += e;
        }
        if self.model == Model::CloudSim {
            // the reference code treats a VM whose demand is exactly zero as finished
            for h in 0..self.hosts.len() {
                let vms = &self.vms;
                let done: Vec<u32> = self.hosts[h]
                    .vms
                    .iter()
                    .copied()
                    .filter(|&v| !vms[v as usize].in_migration && vms[v as usize].req == 0.0)
                    .collect();
                for v in done {
                    if let Some(src) = self.vms[v as usize].host.take() {
                        self.hosts[src as usize].vms.retain(|&x| x != v);
                        self.hosts[src as usize].by_uid = true;
                    }
                }
            }
        }
        self.last_t = t;
    }

    /// Initial placement at t = 0 with every VM at full demand.
    fn place_initial(&mut self, policy: &PolicySpec) {
        let n = self.hosts.len();
        let mut alloc = vec![0.0f64; n];
        let mut ram = vec![0u32; n];
        let mut count = vec![0u32; n];
        let limits = self.model == Model::CloudSim;
        for v in 0..self.vms.len() {
            let (mips, vram) = (self.vms[v].mips, self.vms[v].ram_mb);
            let mut best = None;
            let mut min = f64::MAX;
            for h in 0..n {
                let host = &self.hosts[h];
                let spec = &self.w.hosts[h];
                if host.pe_mips < mips || host.total_mips - alloc[h] < mips {
                    continue;
                }
                // RAM and the 10-VM bandwidth limit bind only here, and only in the reference code
                if limits && (spec.ram_mb - ram[h] < vram || count[h] >= 10) {
                    continue;
                }
                match policy {
                    PolicySpec::Dynamic(p) => {
                        let thr = match p.detector {
                            tern_policy::Detector::Thr(t) => t,
                            _ => tern_policy::detect::FALLBACK_THRESHOLD,
                        };
                        if alloc[h] != 0.0 && mips / host.total_mips > thr {
                            continue;
                        }
                        let after = (alloc[h] + mips) / host.total_mips;
                        let diff = host.power.watts_at(after) - host.power.watts_at(0.0);
                        if diff < min {
                            min = diff;
                            best = Some(h);
                        }
                    }
                    _ => {
                        best = Some(h);
                        break;
                    }
                }
            }
            if best.is_none() {
                self.unplaced += 1;
            }
            if let Some(h) = best {
                alloc[h] += mips;
                ram[h] += vram;
                count[h] += 1;
                self.hosts[h].vms.push(v as u32);
                self.vms[v].host = Some(h as u32);
            }
        }
    }

    /// Refresh the policy's snapshot in place (reusing its buffers from the previous round).
    fn fill_view(&self, t: f64, view: &mut ClusterView) {
        let tp = TimePoint::new(t);
        if view.hosts.len() != self.hosts.len() {
            view.hosts = self
                .hosts
                .iter()
                .map(|h| HostView {
                    pes: (h.total_mips / h.pe_mips).round() as u32,
                    pe_mips: h.pe_mips,
                    power: h.power,
                    utilization: 0.0,
                    vms: Vec::new(),
                    sched: SchedOrder::default(),
                })
                .collect();
            view.vms = self
                .vms
                .iter()
                .map(|vm| VmView {
                    host: u32::MAX,
                    mips: vm.mips,
                    ram_mb: vm.ram_mb,
                    requested_mips: 0.0,
                    utilization: 0.0,
                    history: Vec::with_capacity(HISTORY_LEN),
                })
                .collect();
        }
        for (hv, h) in view.hosts.iter_mut().zip(&self.hosts) {
            hv.utilization = h.utilization(h.util_mips).min(1.0);
            hv.vms.clear();
            hv.vms.extend_from_slice(&h.vms);
            hv.sched = SchedOrder {
                by_uid: h.by_uid,
                peak_entries: h.peak.max(h.vms.len() as u32),
            };
        }
        for (i, (vv, vm)) in view.vms.iter_mut().zip(&self.vms).enumerate() {
            vv.host = vm.host.unwrap_or(u32::MAX);
            vv.requested_mips = vm.req;
            vv.utilization = if vm.host.is_some() {
                tp.utilization(&self.w.traces[i])
            } else {
                0.0
            };
            vv.history.clear();
            vv.history.extend(vm.history.iter().copied());
        }
    }
}

/// Simulate one day of `w` under `cfg`.
pub fn simulate(w: &Workload, cfg: &SimConfig) -> Report {
    let mut timeline = cfg.timeline.then(Timeline::default);
    if let PolicySpec::Npa = cfg.policy {
        // every host at full power for the whole day
        let watts: f64 = w.hosts.iter().map(|h| h.power.max_watts()).sum();
        let hours = SAMPLES as f64 * INTERVAL_S / 3600.0;
        if let Some(tl) = timeline.as_mut() {
            for k in 0..SAMPLES {
                tl.push(k as f64 * INTERVAL_S, w.hosts.len(), watts, 0);
            }
        }
        return Report::npa(&w.name, cfg.model, watts * hours / 1000.0, timeline);
    }
    let mut sim = Sim::new(w, cfg.model);
    sim.place_initial(&cfg.policy);
    let mut rng = SplitMix64::new(cfg.seed);
    let pcfg = match cfg.policy {
        PolicySpec::Dynamic(p) => Some(PolicyConfig {
            detector: p.detector,
            selection: p.selection,
            model: cfg.model,
            migration_mb_per_s: migration_mb_per_s(),
            interval_s: INTERVAL_S,
        }),
        _ => None,
    };
    let (first, steps) = match cfg.model {
        // cloudlets arrive at 0.1 s, the first tick is 300 s later, the run stops at 86 400 s
        Model::CloudSim => (0.1 + INTERVAL_S, SAMPLES - 1),
        Model::Paper => (0.0, SAMPLES),
    };
    let mut t = first;
    let mut view = ClusterView::default();
    for _ in 0..steps {
        sim.dc_update(t);
        let mut started = 0;
        if let Some(pcfg) = &pcfg {
            sim.fill_view(t, &mut view);
            let dec = optimize(&view, pcfg, &mut rng);
            for (h, &peak) in sim.hosts.iter_mut().zip(&dec.table_peaks) {
                h.peak = h.peak.max(peak);
            }
            let mut events: Vec<(f64, u32, u32)> = Vec::with_capacity(dec.migrations.len());
            for m in &dec.migrations {
                let v = m.vm as usize;
                let target = m.to as usize;
                sim.vms[v].in_migration = true;
                if !sim.hosts[target].mig_in.contains(&m.vm) {
                    sim.hosts[target].mig_in.push(m.vm);
                    sim.hosts[target].vms.push(m.vm);
                    sim.host_update(target, t);
                    if let Some(src) = sim.vms[v].host {
                        sim.host_update(src as usize, t);
                    }
                }
                sim.migrations += 1;
                started += 1;
                events.push((t + migration_time_s(sim.vms[v].ram_mb), m.vm, m.to));
            }
            // completions in time order (stable: same-time events keep their start order)
            events.sort_by(|a, b| a.0.total_cmp(&b.0));
            for i in 0..events.len() {
                let (tc, v, target) = events[i];
                if tc > sim.last_t {
                    sim.dc_update(tc);
                }
                let (vu, tu) = (v as usize, target as usize);
                if let Some(src) = sim.vms[vu].host.take() {
                    sim.hosts[src as usize].vms.retain(|&x| x != v);
                }
                let th = &mut sim.hosts[tu];
                th.vms.retain(|&x| x != v);
                th.mig_in.retain(|&x| x != v);
                th.vms.push(v);
                sim.vms[vu].in_migration = false;
                sim.vms[vu].host = Some(target);
                if i + 1 == events.len() || events[i + 1].0 != tc {
                    sim.dc_update(tc);
                }
            }
        }
        if let Some(tl) = timeline.as_mut() {
            let active = sim.hosts.iter().filter(|h| h.util_mips > 0.0).count();
            let watts: f64 = sim
                .hosts
                .iter()
                .filter(|h| h.util_mips > 0.0 || (cfg.model == Model::Paper && h.awake))
                .map(|h| h.power.watts_at(h.utilization(h.util_mips).min(1.0)))
                .sum();
            tl.push(t, active, watts, started);
        }
        t += INTERVAL_S;
    }
    if cfg.model == Model::Paper {
        // close the last interval at 86 400 s
        sim.dc_update(t);
    }
    for h in &mut sim.hosts {
        h.finish();
    }
    let hosts: Vec<(f64, f64, u64)> = sim
        .hosts
        .iter()
        .map(|h| (h.active_s, h.violation_s, h.shutdowns))
        .collect();
    let vms: Vec<(f64, f64, f64)> = sim
        .vms
        .iter()
        .map(|v| (v.req_mips_s, v.alloc_mips_s, v.mig_under_mips_s))
        .collect();
    let mut r = Report::from_accounts(
        &w.name,
        &cfg.policy,
        cfg.model,
        sim.energy_j,
        sim.migrations,
        &hosts,
        &vms,
        timeline,
    );
    r.unplaced_vms = sim.unplaced;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{HOST_TYPES, VmSpec};

    fn one_vm(percent: u8) -> Workload {
        Workload {
            name: "one".into(),
            hosts: vec![HOST_TYPES[0]],
            vms: vec![VmSpec {
                mips: 1000.0,
                ram_mb: 613,
            }],
            traces: vec![[percent; SAMPLES]],
        }
    }

    fn energy(w: &Workload, policy: &str, model: Model) -> f64 {
        simulate(
            w,
            &SimConfig {
                policy: policy.parse().unwrap(),
                model,
                seed: 0,
                timeline: false,
            },
        )
        .energy_kwh
    }

    #[test]
    fn vms_that_fit_nowhere_are_counted_not_lost_silently() {
        // one G4 host (2 × 1860 MIPS): a 2500-MIPS VM exceeds a core, two 1000-MIPS VMs fit
        let w = Workload {
            name: "tight".into(),
            hosts: vec![HOST_TYPES[0]],
            vms: vec![
                VmSpec {
                    mips: 2500.0,
                    ram_mb: 870,
                },
                VmSpec {
                    mips: 1000.0,
                    ram_mb: 613,
                },
                VmSpec {
                    mips: 1000.0,
                    ram_mb: 613,
                },
            ],
            traces: vec![[30; SAMPLES]; 3],
        };
        let r = simulate(
            &w,
            &SimConfig {
                policy: "dvfs".parse().unwrap(),
                model: Model::CloudSim,
                seed: 0,
                timeline: false,
            },
        );
        assert_eq!(r.unplaced_vms, 1);
        assert!(
            r.to_json().ends_with(",\"unplaced_vms\":1}"),
            "{}",
            r.to_json()
        );
    }

    #[test]
    fn energy_of_one_steady_vm_by_hand() {
        // 500 MIPS on a 3720-MIPS G4 host: u = 0.13441, P = 89.4 + 0.32 W/% × 3.441 % = 90.501 W
        let u: f64 = 500.0 / 3720.0;
        let p = 89.4 + (92.6 - 89.4) / 10.0 * (u - 0.1) * 100.0;
        // paper: 24 h; CloudSim: the loop integrates 300.1 s … 86 100.1 s = 85 800 s
        let paper = energy(&one_vm(50), "dvfs", Model::Paper);
        let cloudsim = energy(&one_vm(50), "dvfs", Model::CloudSim);
        assert!((paper - p * 86_400.0 / 3.6e6).abs() < 1e-9, "{paper}");
        assert!((cloudsim - p * 85_800.0 / 3.6e6).abs() < 1e-9, "{cloudsim}");
        assert!((paper - 2.17202).abs() < 1e-4, "{paper}");
    }

    #[test]
    fn idle_vm_costs_idle_power_in_the_paper_model_and_nothing_in_cloudsim() {
        // demand 0 all day: CloudSim counts the host as off (and retires the VM); the paper's host is
        // awake at 86 W because it still holds a VM
        assert_eq!(energy(&one_vm(0), "lr-mmt-1.2", Model::CloudSim), 0.0);
        let paper = energy(&one_vm(0), "lr-mmt-1.2", Model::Paper);
        assert!((paper - 86.0 * 24.0 / 1000.0).abs() < 1e-9, "{paper}");
    }

    #[test]
    fn trace_interpolation_between_samples() {
        let mut tr = [0u8; SAMPLES];
        tr[0] = 10;
        tr[1] = 40;
        tr[SAMPLES - 1] = 50;
        assert_eq!(trace_utilization(&tr, 0.0), 0.1);
        assert_eq!(trace_utilization(&tr, 300.0), 0.4);
        assert!((trace_utilization(&tr, 150.0) - 0.25).abs() < 1e-12);
        // after the last sample the last value holds
        assert_eq!(trace_utilization(&tr, 86_350.0), 0.5);
    }
}

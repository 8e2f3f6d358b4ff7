//! `tern demo cluster`: the automation loop on a live test cluster, side by side with the simulator.
//!
//! Four network-namespace hosts (each with a volume node, an agent and an ipmi_sim BMC) and a
//! controller; twelve test-guest VMs on volume disks, each following a PlanetLab CPU trace played
//! at one 5-minute sample per step (2 s by default). The controller runs in `full` automation: it
//! packs the VMs onto fewer hosts with live migrations, powers the emptied hosts off through
//! their BMCs (ipmitool), and powers one on again when load rises — the demo raises it half-way
//! by telling four guests, over their serial consoles, to load their vCPUs.
//!
//! The hosts share this machine's few cores, so every host declares 2 cores that each stand for a
//! quarter of a real one (`--host-cpu-share`): a guest spinning 10 % of a real CPU reads as 40 %
//! of its vCPU, and the whole demo costs well under one real core of guest load.
//!
//! At the end it prints what happened (with `--json`, as a report) beside what `tern-sim`
//! predicts for the same hosts, VMs, traces and policy: the active-host series, migrations and
//! energy, and how well they agree.

use std::collections::BTreeMap;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};
use tern_api::automation::{
    AutomationLevel, AutomationRounds, HostPower, Plan, PlanAction, PlanState, Policy, StatsSeries,
};
use tern_api::cluster::{HostInfo, TaskInfo, TaskKind, TaskState, VmInfo, VmState};

use crate::cluster_up::{HostShape, Lab, LabOptions, LabSpec, http};
use crate::demo::Say;

/// Options of `tern demo cluster`.
#[derive(Debug, clap::Args)]
pub struct ClusterDemoArgs {
    /// Print only the final report, as JSON, on stdout (the live table goes to stderr): `hosts`,
    /// `vms`, `migrations`, `host_power_offs`, `host_power_ons`, `energy_kwh`, `slatah_pct`,
    /// `pdm_pct`, `vms_lost`, `hosts_on_series`, `hosts_series` (each sample's hosts: power and
    /// measured utilisation), `migration_times` (each migration's predicted and measured seconds),
    /// `cycle_s_series` (the loop's last cycle time per sample) and `sim` (the simulator's
    /// prediction of the same scenario, with the agreement figures).
    #[arg(long)]
    pub json: bool,
    /// Trace samples to play (each a 5-minute PlanetLab sample), 20-288.
    #[arg(long, default_value_t = 75, value_parser = clap::value_parser!(u64).range(20..=288))]
    pub samples: u64,
    /// Real time per sample, seconds (the loop runs once per sample), 2-30.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(2..=30))]
    pub step_s: u64,
    /// The PlanetLab day whose traces the VMs follow (built into the binary).
    #[arg(long, default_value = "20110303")]
    pub day: String,
    /// Start no cluster: compute the simulated side (`sim`) again from a saved `--json` report
    /// and print it as JSON.
    #[arg(long, value_name = "REPORT")]
    pub sim_from: Option<std::path::PathBuf>,
}

/// Hosts in the demo.
const HOSTS: usize = 4;
/// VMs in the demo.
const VMS: usize = 12;
/// Cores each host declares.
const HOST_CORES: u32 = 2;
/// The real CPU each declared core stands for.
const CPU_SHARE: f64 = 0.25;
/// The power model of every host.
const POWER_MODEL: &str = "hp-ml110-g5";
/// VMs raised half-way when the loop has packed the cluster onto two hosts (more when more are
/// on: [`raised_count`]), and the load they are raised to (percent of a vCPU, as the agents
/// report it).
const RAISED_VMS: usize = 4;
const RAISED_PCT: f64 = 90.0;

/// How many VMs the raise loads with `hosts_on` hosts powered on: [`RAISED_VMS`] on two hosts,
/// two more per host beyond two, so that the raised demand outgrows the hosts on whether the
/// loop packed the cluster onto two hosts or three (on two cores shared by everything the raised
/// VMs deliver about 0.7 of a vCPU: four of them and the eight light ones fill two hosts' four
/// cores, six fill three hosts' six), and the loop has to wake a host.
fn raised_count(hosts_on: usize) -> usize {
    (RAISED_VMS + 2 * hosts_on.saturating_sub(2)).min(VMS)
}

/// The VMs the raise loads, of the running VMs `(name, host)` in the API's order: the busiest
/// host's first, then the next busiest host's (hosts with as many VMs in reverse name order),
/// `n` in all.
fn raised_vms<'a>(running: &[(&'a str, &'a str)], n: usize) -> Vec<&'a str> {
    let mut by_host: BTreeMap<&str, Vec<&'a str>> = BTreeMap::new();
    for &(vm, host) in running {
        by_host.entry(host).or_default().push(vm);
    }
    let mut hosts: Vec<(&str, Vec<&'a str>)> = by_host.into_iter().collect();
    hosts.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(b.0.cmp(a.0)));
    hosts.into_iter().flat_map(|(_, v)| v).take(n).collect()
}
/// Simulated seconds per trace sample (PlanetLab's 5 minutes).
const SAMPLE_S: f64 = 300.0;
/// The played samples start this share of a step before the first round under the demo's
/// policy: each round then runs half-way through its sample, clear of the reads at the
/// samples' ends (a round 50 ms after a read's due time raced the read's requests, and its
/// moves were counted in the sample before).
const ROUND_LEAD_STEPS: f64 = 0.5;

/// Twelve traces of `day` for the demo: those whose mean over the first `samples` values lies in
/// 5-30 % and whose peak stays under 70 % (light, varied VMs), spread evenly over the day's
/// sorted file list; the first `samples` values of each.
pub fn pick_traces(day: &str, samples: usize) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let set = tern_sim::TraceSet::bundled().context("cannot open the built-in PlanetLab traces")?;
    let traces = set
        .load_day(day, &tern_sim::TraceOrder::Sorted)
        .with_context(|| format!("cannot load PlanetLab day {day}"))?;
    let fit: Vec<(String, Vec<u8>)> = traces
        .names
        .iter()
        .zip(&traces.samples)
        .filter_map(|(name, s)| {
            let w = &s[..samples];
            let mean = w.iter().map(|&v| f64::from(v)).sum::<f64>() / w.len() as f64;
            let peak = w.iter().copied().max().unwrap_or(0);
            ((5.0..=30.0).contains(&mean) && peak < 70).then(|| (name.clone(), w.to_vec()))
        })
        .collect();
    ensure!(
        fit.len() >= VMS,
        "day {day} has only {} light traces (mean 5-30 %, peak < 70 %) over its first {samples} samples; {VMS} are needed",
        fit.len()
    );
    Ok((0..VMS).map(|i| fit[i * fit.len() / VMS].clone()).collect())
}

/// A trace as the guest's command line gives it: each value scaled to real CPU (× the cpu share),
/// as whole percent, runs written `V*N`.
pub fn guest_trace(values: &[u8], share: f64) -> String {
    let scaled: Vec<u32> = values
        .iter()
        .map(|&v| (f64::from(v) * share).round() as u32)
        .collect();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < scaled.len() {
        let mut j = i;
        while j < scaled.len() && scaled[j] == scaled[i] {
            j += 1;
        }
        out.push(match j - i {
            1 => scaled[i].to_string(),
            n => format!("{}*{n}", scaled[i]),
        });
        i = j;
    }
    out.join(",")
}

/// What the replayed loop did over the played samples, and how it compares with the live run.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayFigures {
    /// Energy over the played samples, kWh (trace time, as the live `energy_kwh`).
    pub energy_kwh: f64,
    /// Migrations started over the played samples.
    pub migrations: u64,
    /// Host power actions over the played samples.
    pub host_power_offs: u64,
    pub host_power_ons: u64,
    /// Hosts powered on after each sample.
    pub hosts_on_series: Vec<u32>,
    /// The loop's SLATAH over the played samples (its own count, as the live figure is read),
    /// and PDM (10 % of a moving VM's load for a live migration's mean duration).
    pub slatah_pct: f64,
    pub pdm_pct: f64,
    /// Samples where live and simulated hosts-on differ by at most one host, percent.
    pub hosts_on_agreement_pct: f64,
    /// Live ÷ simulated, for each figure (`None` when the simulated one is zero).
    pub migrations_ratio: Option<f64>,
    pub energy_ratio: Option<f64>,
    pub slatah_ratio: Option<f64>,
    pub pdm_ratio: Option<f64>,
    /// The migrations, in order: the sample each started at, VM, source and target.
    pub moves: Vec<Move>,
}

/// One migration started by a loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub sample: usize,
    pub vm: String,
    pub from: String,
    pub to: String,
}

/// The simulated side of the same scenario.
#[derive(Debug, Clone, Serialize)]
pub struct SimFigures {
    /// How it was simulated.
    pub method: &'static str,
    /// The replay on the load the agents measured: the goals' figures.
    #[serde(flatten)]
    pub measured: ReplayFigures,
    /// The same replay on the load the guests were asked for (the trace values and the raise,
    /// in the whole percent of real CPU the guests play): what the scenario would do on a
    /// machine that delivered every guest its CPU.
    pub as_asked: ReplayFigures,
    /// Asked against delivered load.
    pub load: LoadFigures,
    /// How long the simulated actions took, in steps (the live run's medians; a
    /// migration of 0 lands within the sample it started in).
    pub migration_samples: u32,
    pub power_on_samples: u32,
    /// The live power-offs' median (from the action to its reported outcome) in steps, counted
    /// from the live round's place half-way through its sample (`in_samples`: at least 1); 1 for
    /// a report that did not keep them.
    pub power_off_samples: u32,
    /// The live migrations' mean duration, s.
    pub migration_s: f64,
    /// The duration each simulated migration counts for in PDM, s: `fixed + per_load × load`
    /// of the moving VM, fitted to the live migrations ([`move_time_fit`]).
    pub migration_fit: MoveTimeFit,
    /// `tern-sim`'s whole-day engine on the same hosts, traces and raised load, for reference:
    /// the CloudSim-faithful policy run (placed by PABFD at t = 0, no hold, cool-down, preview,
    /// HA reserve or high-water mark).
    pub engine: EngineFigures,
}

/// The load the guests were asked to play against the load their agents measured (mean over VMs
/// and played samples, 0..1 of a vCPU).
#[derive(Debug, Clone, Serialize)]
pub struct LoadFigures {
    pub asked: f64,
    pub measured: f64,
    /// The load the live loop's rounds decided on, over the same VMs and samples (`None` in a
    /// report from before the rounds were kept).
    pub decided: Option<f64>,
    /// The raised VMs after the raise.
    pub raised_asked: f64,
    pub raised_measured: f64,
}

/// `tern-sim`'s engine on the demo's scenario.
#[derive(Debug, Clone, Serialize)]
pub struct EngineFigures {
    /// Energy over the played samples, kWh.
    pub energy_kwh: f64,
    /// Migrations over the played samples.
    pub migrations: u64,
    /// Hosts with load, per sample.
    pub hosts_on_series: Vec<u32>,
    /// SLATAH and PDM over the whole simulated day (the engine reports them only per day).
    pub day_slatah_pct: f64,
    pub day_pdm_pct: f64,
}

/// What the live cluster looked like when the automation started.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LiveStart {
    /// Its hosts: name, powered on.
    pub hosts: Vec<(String, bool)>,
    /// Its VMs.
    pub vms: Vec<StartVm>,
}

/// A VM when the automation started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartVm {
    /// `vmN`, following the demo's trace N.
    pub name: String,
    pub host: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// How many samples into its trace its guest was (it starts its trace at boot).
    pub trace_offset: usize,
}

impl LiveStart {
    /// From the API's view, and when each VM was seen running.
    fn from_api(
        hosts: &[HostInfo],
        vms: &[VmInfo],
        offsets: &BTreeMap<String, usize>,
    ) -> anyhow::Result<LiveStart> {
        Ok(LiveStart {
            hosts: hosts
                .iter()
                .map(|h| {
                    (
                        h.name.clone(),
                        !matches!(h.power, HostPower::Off | HostPower::FailedToWake),
                    )
                })
                .collect(),
            vms: vms
                .iter()
                .map(|v| {
                    Ok(StartVm {
                        name: v.name.clone(),
                        host: v.host.clone().with_context(|| {
                            format!("{} had no host when the automation started", v.name)
                        })?,
                        vcpus: v.spec.vcpus,
                        memory_mib: v.spec.memory_mib,
                        trace_offset: offsets.get(&v.name).copied().unwrap_or(0),
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        })
    }
}

/// What the replayed loop did over the played samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    pub hosts_on_series: Vec<u32>,
    /// The migrations started, in order.
    pub moves: Vec<Move>,
    pub host_power_offs: u64,
    pub host_power_ons: u64,
    /// The loop's energy over the samples, kWh of real time (scale by the time scale).
    pub energy_kwh: f64,
    /// The loop's SLATAH over the samples.
    pub slatah_pct: f64,
    /// Each VM's utilisation per played sample, as the replay fed it (0..1 of its vCPUs).
    pub load: BTreeMap<String, Vec<f64>>,
}

/// The load the demo plays: each VM's trace values (percent of a vCPU), the VMs raised to
/// [`RAISED_PCT`] from sample `raise_at`, and how many samples are played; `measured`, when
/// given, is what the agents measured instead (per played sample, per VM).
#[derive(Debug, Clone, Copy)]
pub struct PlayedLoad<'a> {
    pub traces: &'a [Vec<u8>],
    pub raised: &'a [usize],
    pub raise_at: usize,
    pub samples: usize,
    pub measured: Option<&'a [BTreeMap<String, f64>]>,
    /// With `measured`: what the agents measured before the start, (seconds before, loads).
    pub boot: &'a [(f64, BTreeMap<String, f64>)],
    /// With `measured`: the load the live loop's round in each played sample decided on
    /// ([`round_load`]), which replaces `measured` for the played samples (a VM missing from a
    /// sample's round falls back to `measured`).
    pub rounds: Option<&'a [BTreeMap<String, f64>]>,
    /// With `rounds`: the live rounds up to the first played one, (seconds from the start,
    /// points). A boot step gets the point of the first of them at or after its time (the
    /// round whose mean it was part of), so the replay's rounds average what the live ones did.
    pub boot_rounds: &'a [(f64, BTreeMap<String, f64>)],
}

/// A trace value (percent of a vCPU) as the guest plays it: it is given whole percent of a real
/// CPU (`guest_trace`), so the value the agents can read is that, over the CPU share.
pub fn played(pct: f64) -> f64 {
    ((pct * CPU_SHARE).round() / CPU_SHARE / 100.0).clamp(0.0, 1.0)
}

/// The index of the demo trace VM `name` (`vmN`) follows.
fn trace_index(name: &str, traces: usize) -> anyhow::Result<usize> {
    name.trim_start_matches("vm")
        .parse::<usize>()
        .ok()
        .and_then(|i| i.checked_sub(1))
        .filter(|&i| i < traces)
        .with_context(|| format!("VM {name} follows none of the demo's traces"))
}

/// A migration's duration against the moving VM's load (0..1 of its vCPUs), fitted to the live
/// run's migrations: busy VMs move more slowly (in the bench's run 21 the raised VMs' moves took
/// 0.11–0.27 s, the idle ones' 0.06–0.09 s), and PDM weighs each move by that load.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MoveTimeFit {
    pub fixed_s: f64,
    pub per_load_s: f64,
    /// The live range, which a fitted duration is kept within.
    pub min_s: f64,
    pub max_s: f64,
}

impl MoveTimeFit {
    /// The fitted duration of a move of a VM at `load`.
    pub fn at(&self, load: f64) -> f64 {
        (self.fixed_s + self.per_load_s * load).clamp(self.min_s, self.max_s)
    }
}

/// Least squares over the live migrations' (load, seconds); the mean alone (no slope) when they
/// span less than 0.3 of load. `None` without any.
pub fn move_time_fit(moves: &[(f64, f64)]) -> Option<MoveTimeFit> {
    let n = moves.len() as f64;
    if moves.is_empty() {
        return None;
    }
    let mean_u = moves.iter().map(|m| m.0).sum::<f64>() / n;
    let mean_t = moves.iter().map(|m| m.1).sum::<f64>() / n;
    let (lo, hi) = moves
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), m| (l.min(m.0), h.max(m.0)));
    let sxx: f64 = moves.iter().map(|m| (m.0 - mean_u).powi(2)).sum();
    let sxy: f64 = moves.iter().map(|m| (m.0 - mean_u) * (m.1 - mean_t)).sum();
    let per_load_s = if hi - lo >= 0.3 && sxx > 0.0 {
        sxy / sxx
    } else {
        0.0
    };
    let (min_s, max_s) = moves
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), m| (l.min(m.1), h.max(m.1)));
    Some(MoveTimeFit {
        fixed_s: mean_t - per_load_s * mean_u,
        per_load_s,
        min_s,
        max_s,
    })
}

/// The live loop's rounds (`GET /v1/automation/rounds`; each one's time in seconds from the
/// demo's start, and the history point each VM got) on the `samples` played samples of `step_s`:
/// per sample, each VM's load as the live round in that sample decided on it — carried from the
/// sample before where no round ran, or the VM had no point — and that round's time (`None` when
/// carried). The rounds run on a grid of the interval; the first played round sets its phase,
/// and a round goes to the sample whose grid point it is nearest, so a round a few milliseconds
/// either side of a sample's start is not counted twice in one sample and not at all in the next.
#[allow(clippy::type_complexity)]
pub fn round_load(
    rounds: &[(f64, BTreeMap<String, f64>)],
    samples: usize,
    step_s: u64,
) -> (Vec<BTreeMap<String, f64>>, Vec<Option<f64>>) {
    let step = step_s as f64;
    let end = samples as f64 * step;
    let played: Vec<&(f64, BTreeMap<String, f64>)> = rounds
        .iter()
        .filter(|(t, _)| *t >= 0.0 && *t < end)
        .collect();
    let mut at: Vec<Option<&(f64, BTreeMap<String, f64>)>> = vec![None; samples];
    if let Some((first, _)) = played.first() {
        let phase = first.rem_euclid(step);
        for r in &played {
            let k = ((r.0 - phase) / step).round();
            if k >= 0.0 && (k as usize) < samples && at[k as usize].is_none() {
                at[k as usize] = Some(r);
            }
        }
    }
    let mut carried: BTreeMap<String, f64> = BTreeMap::new();
    let mut load = Vec::with_capacity(samples);
    let mut times = Vec::with_capacity(samples);
    for r in at {
        if let Some((_, points)) = r {
            carried.extend(points.iter().map(|(v, u)| (v.clone(), *u)));
        }
        load.push(carried.clone());
        times.push(r.map(|(t, _)| *t));
    }
    (load, times)
}

/// The point `vm` got in the first of `rounds` (oldest first, seconds from the start) at or after
/// `t_s`: the live round whose mean the load at `t_s` was part of.
pub fn covering_point(rounds: &[(f64, BTreeMap<String, f64>)], t_s: f64, vm: &str) -> Option<f64> {
    rounds
        .iter()
        .find(|(t, _)| *t >= t_s)
        .and_then(|(_, l)| l.get(vm).copied())
}

/// The live loop's own code (`tern_automation::replay`) over the demo's scenario, started from
/// `start` with the controller's loop configuration, under `policy`: per VM, its trace from where
/// its guest was, as the guest plays it ([`played`]; the raised VMs at [`RAISED_PCT`] from
/// `raise_at`) — or, with `load.measured`, what the agents measured; each action taking
/// `timing`'s samples.
///
/// `before`: the policy the live loop ran under while the VMs booted. The replay then first
/// plays those samples too (each VM from the sample its guest booted, on its start host, at its
/// trace), as the live loop saw them, so its history and hold timers at the start are the live
/// loop's; figures count the played samples only.
pub fn replay_loop(
    start: &LiveStart,
    load: &PlayedLoad<'_>,
    policy: &Policy,
    before: Option<&Policy>,
    step_s: u64,
    timing: tern_automation::replay::Timing,
) -> anyhow::Result<Replayed> {
    use tern_automation::replay::Replay;
    let PlayedLoad {
        traces,
        raised,
        raise_at,
        samples,
        measured,
        boot,
        rounds,
        boot_rounds,
    } = *load;
    let warm = if before.is_some() {
        start.vms.iter().map(|v| v.trace_offset).max().unwrap_or(0)
    } else {
        0
    };
    let mut r = Replay::default();
    r.timing = timing;
    for (name, on) in &start.hosts {
        r.host(name, HOST_CORES, POWER_MODEL, *on);
    }
    // per VM: the replay step it joins at and its utilisation at every replay step
    let mut joining: Vec<(usize, &StartVm, Vec<f64>)> = Vec::new();
    for v in &start.vms {
        let idx = trace_index(&v.name, traces.len())?;
        let values = &traces[idx];
        let asked = |i: usize| {
            played(f64::from(
                values.get(i).or(values.last()).copied().unwrap_or(0),
            ))
        };
        let join = warm - v.trace_offset.min(warm);
        let mut u = vec![0.0; warm + samples];
        let mut last = None;
        for (s, slot) in u.iter_mut().enumerate().skip(join) {
            *slot = if s < warm {
                // the reading nearest the round's time, if one lies within a step of it
                let before_s = ((warm - s) * step_s as usize) as f64;
                let covering = rounds.and(covering_point(boot_rounds, -before_s, &v.name));
                let read = covering.or(measured.and(
                    boot.iter()
                        .filter(|(t, _)| (t - before_s).abs() <= step_s as f64 / 2.0)
                        .min_by(|a, b| (a.0 - before_s).abs().total_cmp(&(b.0 - before_s).abs()))
                        .and_then(|(_, l)| l.get(&v.name).copied()),
                ));
                read.unwrap_or_else(|| asked(v.trace_offset + s - warm))
            } else {
                let k = s - warm;
                let want = if raised.contains(&idx) && k >= raise_at {
                    played(RAISED_PCT)
                } else {
                    asked(v.trace_offset + k)
                };
                let round = rounds
                    .and_then(|r| r.get(k))
                    .and_then(|r| r.get(&v.name))
                    .copied();
                match (measured, round) {
                    // the load the live round in sample k decided on
                    (Some(_), Some(x)) => {
                        last = Some(x);
                        x.clamp(0.0, 1.0)
                    }
                    // sample k is read at its end, a step after the round at its start: the
                    // round at step k saw what sample k - 1 read
                    (Some(m), None) => {
                        let x = k
                            .checked_sub(1)
                            .and_then(|i| m.get(i))
                            .and_then(|m| m.get(&v.name))
                            .copied()
                            .or(last)
                            .unwrap_or(want);
                        last = Some(x);
                        x.clamp(0.0, 1.0)
                    }
                    (None, _) => want,
                }
            };
        }
        joining.push((join, v, u));
    }
    let cfg = tern_automation::LoopConfig {
        ha_reserve_hosts: tern_controller::core::Config::default().ha_reserve_hosts,
        ..tern_automation::LoopConfig::default()
    };
    let mut lp = tern_automation::Loop::new(before.unwrap_or(policy).clone(), cfg)
        .map_err(|e| anyhow::anyhow!("the live policy: {e}"))?;
    let step_ms = step_s * 1000;
    let mut hosts_on_series = Vec::with_capacity(samples);
    let energy =
        |lp: &tern_automation::Loop| lp.series().points.last().map_or(0.0, |p| p.energy_kwh);
    let (mut energy0, mut sla0) = (0.0, (0, 0));
    for s in 0..warm + samples {
        if s == warm {
            lp.set_policy(policy.clone())
                .map_err(|e| anyhow::anyhow!("the live policy: {e}"))?;
            energy0 = energy(&lp);
            sla0 = lp.sla_counts();
        }
        for (join, v, u) in &joining {
            if *join == s {
                let vm = r.vm(&v.name, &v.host, u.clone());
                vm.vcpus = v.vcpus;
                vm.memory_mib = v.memory_mib;
                // every demo VM runs on a volume disk, as the live controller's samples say
                vm.volume_disks = 1;
            }
        }
        r.step(&mut lp, step_ms)
            .context("replaying the automation loop")?;
        if s >= warm {
            hosts_on_series.push(r.hosts_on());
        }
    }
    let (active, overloaded) = lp.sla_counts();
    let (active, overloaded) = (active - sla0.0, overloaded - sla0.1);
    let mut out = Replayed {
        hosts_on_series,
        moves: Vec::new(),
        host_power_offs: 0,
        host_power_ons: 0,
        energy_kwh: energy(&lp) - energy0,
        slatah_pct: if active > 0 {
            100.0 * overloaded as f64 / active as f64
        } else {
            0.0
        },
        load: joining
            .into_iter()
            .map(|(_, v, u)| (v.name.clone(), u[warm..].to_vec()))
            .collect(),
    };
    for (s, a) in &r.log {
        let Some(sample) = (*s as usize).checked_sub(warm) else {
            continue;
        };
        match a {
            tern_automation::Action::Migrate { vm, from, to, .. } => out.moves.push(Move {
                sample,
                vm: vm.clone(),
                from: from.clone(),
                to: to.clone(),
            }),
            tern_automation::Action::PowerOff { .. } => out.host_power_offs += 1,
            tern_automation::Action::PowerOn { .. } => out.host_power_ons += 1,
        }
    }
    Ok(out)
}

/// The demo's automation policy on top of the controller's `base`: full automation, one round
/// per sample, holds and cool-down counted in samples, host power on with no spare host.
pub fn demo_policy(base: Policy, step_s: u64) -> Policy {
    let mut policy = base;
    policy.automation = tern_api::automation::AutomationLevel::Full;
    policy.interval_s = step_s as u32;
    policy.hold_s = (2 * step_s) as u32;
    policy.cooldown_s = (10 * step_s) as u32;
    policy.power.enabled = true;
    policy.power.spare_hosts = 0;
    policy.power.off_hold_s = (3 * step_s) as u32;
    policy.power.on_hold_s = (2 * step_s) as u32;
    policy
}

/// The median of `secs`, if any is a number of seconds.
fn median_s(mut secs: Vec<f64>) -> Option<f64> {
    secs.retain(|s| s.is_finite() && *s >= 0.0);
    secs.sort_by(f64::total_cmp);
    secs.get(secs.len() / 2).copied()
}

/// A live power action of `secs` as the replay's steps of `step_s`, at least one (the replay
/// answers a power action at the start of a later step). A live round runs
/// [`ROUND_LEAD_STEPS`] into its sample, so an action it starts that takes `secs` is read done at
/// the end of the sample `ceil(secs / step − ROUND_LEAD_STEPS)` on; rounded up from the
/// sample's start instead, the bench's run 25 put a 2.5 s power-off a sample after the live one.
fn in_samples(secs: f64, step_s: u64) -> u32 {
    ((secs / step_s as f64 - ROUND_LEAD_STEPS).ceil().max(1.0)) as u32
}

/// Runs the simulator on the demo's hosts, VMs and traces (as the agents report them: the trace
/// values, with the raised VMs at [`RAISED_PCT`] from `raise_at`) under LR-MMT-1.2.
pub fn simulate(
    traces: &[Vec<u8>],
    raised: &[usize],
    raise_at: usize,
    samples: usize,
) -> anyhow::Result<(tern_sim::Report, usize)> {
    use tern_sim::workload::{HostSpec, SAMPLES, VmSpec, Workload};
    let model = tern_controller::place::power_model(POWER_MODEL);
    let mips = tern_controller::place::core_mips(POWER_MODEL);
    let host = HostSpec {
        pes: HOST_CORES,
        pe_mips: mips,
        ram_mb: 1 << 20,
        power: model,
    };
    let mut full: Vec<[u8; SAMPLES]> = Vec::new();
    for (i, t) in traces.iter().enumerate() {
        let mut f = [0u8; SAMPLES];
        for (k, slot) in f.iter_mut().enumerate() {
            let v = t.get(k).or(t.last()).copied().unwrap_or(0);
            *slot = if raised.contains(&i) && k >= raise_at {
                RAISED_PCT as u8
            } else {
                v
            };
        }
        full.push(f);
    }
    let w = Workload {
        name: "demo-cluster".into(),
        hosts: vec![host; HOSTS],
        vms: vec![VmSpec { mips, ram_mb: 64 }; traces.len()],
        traces: full,
    };
    let cfg = tern_sim::SimConfig {
        policy: "lr-mmt-1.2"
            .parse()
            .map_err(|e| anyhow::anyhow!("policy: {e}"))?,
        model: tern_policy::Model::Paper,
        seed: 1,
        timeline: true,
    };
    Ok((tern_sim::simulate(&w, &cfg), samples))
}

/// One host at one sample, as the API showed it.
#[derive(Debug, Clone, Serialize)]
pub struct HostAtSample {
    /// Powered on (or powering on/off): counted in `hosts_on_series`.
    pub on: bool,
    /// Measured CPU utilisation, 0..1 of its declared cores.
    pub cpu_utilization: Option<f64>,
    /// Cores parked at its last report.
    pub parked_cores: Option<u32>,
}

/// A migration task of the live run (`GET /v1/tasks/{id}`): when, what, and its predicted and
/// measured time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationTime {
    /// The task.
    #[serde(default)]
    pub task: u64,
    /// The played sample it was first seen at.
    #[serde(default)]
    pub sample: usize,
    /// The VM moved, and from where to where.
    pub vm: Option<String>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    /// Whether it succeeded.
    #[serde(default)]
    pub succeeded: bool,
    /// The task's duration on the controller (request to completion), seconds, once it ended.
    #[serde(default)]
    pub task_s: Option<f64>,
    /// The migration model's predicted total time, seconds, if the controller made one.
    pub predicted_s: Option<f64>,
    /// The measured time of the whole move (the task's target start and migration phases;
    /// the source VMM's total in reports made before the tasks had phases), once it succeeded.
    pub actual_s: Option<f64>,
    /// Bytes the migration sent, from the source VMM's report.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// Where the task's time went (`GET /v1/tasks/{id}`), if it started.
    #[serde(default)]
    pub phases: Option<tern_api::cluster::TaskPhases>,
    /// The source VMM's own total time (its report's `total_ms`), seconds.
    #[serde(default)]
    pub vmm_s: Option<f64>,
    /// The source VMM's whole migration report (`GET /v1/tasks/{id}`'s `report`: the pause
    /// step by step, each round's time), to tell where a slow move's time went.
    #[serde(default)]
    pub vmm_report: Option<serde_json::Value>,
}

/// A live plan's times, seconds from the start (on the demo's clock): when the loop decided it,
/// when it was applied (at once under full automation, which the demo runs; `None` otherwise:
/// the API's plan carries no apply time), and when it reached its final state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanTimes {
    pub id: u64,
    pub state: PlanState,
    /// Its actions by kind, e.g. `3 migrate, 1 power_off`.
    pub actions: String,
    pub decided_s: f64,
    pub applied_s: Option<f64>,
    pub finished_s: Option<f64>,
}

impl PlanTimes {
    /// `p`'s times, with the controller's clock at `start_ms` as the start.
    pub fn of(p: &Plan, start_ms: f64) -> PlanTimes {
        let at = |ms: u64| (ms as f64 - start_ms) / 1000.0;
        let (mut moves, mut offs, mut ons) = (0, 0, 0);
        for a in &p.actions {
            match a {
                PlanAction::Migrate { .. } => moves += 1,
                PlanAction::PowerOff { .. } => offs += 1,
                PlanAction::PowerOn { .. } => ons += 1,
            }
        }
        let actions = [(moves, "migrate"), (offs, "power_off"), (ons, "power_on")]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, k)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ");
        let applied = p.automation == AutomationLevel::Full
            && matches!(
                p.state,
                PlanState::Applying | PlanState::Applied | PlanState::Failed
            );
        PlanTimes {
            id: p.id,
            state: p.state,
            actions,
            decided_s: at(p.created_ms),
            applied_s: applied.then(|| at(p.created_ms)),
            finished_s: p.finished_ms.map(at),
        }
    }
}

/// How long each live power-off took, seconds, oldest first: from the action to the outcome the
/// loop was told, i.e. each applied plan of power-offs only (the loop makes power-offs a plan of
/// their own), applied at its round (full automation), from its decision to its end. A plan of
/// several power-offs counts once (they run at once).
pub fn power_off_times(plans: &[Plan]) -> Vec<f64> {
    let mut out: Vec<(u64, f64)> = plans
        .iter()
        .filter(|p| p.state == PlanState::Applied && p.automation == AutomationLevel::Full)
        .filter(|p| {
            !p.actions.is_empty()
                && p.actions
                    .iter()
                    .all(|a| matches!(a, PlanAction::PowerOff { .. }))
        })
        .filter_map(|p| {
            let f = p.finished_ms?;
            Some((p.id, f.saturating_sub(p.created_ms) as f64 / 1000.0))
        })
        .collect();
    out.sort_by_key(|(id, _)| *id);
    out.into_iter().map(|(_, s)| s).collect()
}

/// A live round: when, seconds from the start; the plan it made; the point each VM got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveRound {
    pub t_s: f64,
    pub plan: Option<u64>,
    pub points: BTreeMap<String, f64>,
}

/// What the simulated side needs of a live run, kept in the report so `--sim-from` can compute
/// it again without a cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    /// The PlanetLab day and the samples played.
    pub day: String,
    pub samples: usize,
    pub step_s: u64,
    /// The policy in force while the VMs booted, and the demo's.
    pub policy_before: Policy,
    pub policy: Policy,
    /// The cluster when the automation started.
    pub start: LiveStart,
    /// The raised VMs (trace indices) and the sample they were raised at.
    pub raised: Vec<usize>,
    pub raise_at: usize,
    /// Per played sample, each VM's utilisation as its agent last reported it (0..1 of its
    /// vCPUs), read from the controller's `/metrics`.
    pub vm_load: Vec<BTreeMap<String, f64>>,
    /// The same while the VMs booted, a reading per step: (seconds before the start, loads).
    #[serde(default)]
    pub boot_load: Vec<(f64, BTreeMap<String, f64>)>,
    /// Per played sample, each VM's load as the live loop's round in that sample decided on it
    /// (its history point: the mean of the controller's 500 ms readings since the round
    /// before; [`round_load`]), from `GET /v1/automation/rounds`. Empty in reports made before
    /// the controller kept its rounds: the replay is then fed `vm_load`.
    #[serde(default)]
    pub round_load: Vec<BTreeMap<String, f64>>,
    /// Per played sample, when its live round ran, seconds from the start (`None`: no round
    /// ran in it and the sample before's load was carried).
    #[serde(default)]
    pub round_at_s: Vec<Option<f64>>,
    /// Every round the controller kept (the boot's too: before the start, `t_s` < 0).
    #[serde(default)]
    pub live_rounds: Vec<LiveRound>,
    /// The median time of the plans that powered a host on, seconds.
    pub power_on_s: Option<f64>,
    /// How long each live power-off took, seconds ([`power_off_times`]); empty in a report
    /// from before they were kept (the replay's power-off then takes one sample).
    #[serde(default)]
    pub power_off_s: Vec<f64>,
    /// Every live plan's times ([`PlanTimes`]), oldest first.
    #[serde(default)]
    pub plan_times: Vec<PlanTimes>,
}

/// The live figures the comparison reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveFigures {
    pub migrations: u64,
    pub energy_kwh: f64,
    pub slatah_pct: f64,
    pub pdm_pct: f64,
    pub hosts_on_series: Vec<u32>,
    pub migration_times: Vec<MigrationTime>,
}

/// The final report of `tern demo cluster --json`.
#[derive(Debug, Serialize)]
struct Figures {
    hosts: usize,
    vms: usize,
    samples: u64,
    step_s: u64,
    /// Simulated seconds each real second stands for (a sample's 300 s per step).
    time_scale: f64,
    migrations: u64,
    migrations_failed: u64,
    host_power_offs: u64,
    host_power_ons: u64,
    /// Modelled energy of the hosts powered on, kWh, in trace time (× time_scale).
    energy_kwh: f64,
    /// The loop's SLATAH over the played samples (`/metrics`' host-interval counts).
    slatah_pct: f64,
    /// CPU lost to migrations (10 % of a moving VM's load for the task's duration) ÷ the VMs'
    /// load over the played samples, percent: the load the live loop's rounds decided on
    /// (`recorded.round_load`), as the replay's PDM counts it.
    pdm_pct: f64,
    /// The same on the agents' readings at each sample (`recorded.vm_load`), for reference.
    pdm_read_pct: f64,
    /// Rounds the live loop ran over the played samples (one per sample is the schedule), and
    /// samples in which none ran (the load of the sample before was carried).
    live_rounds: usize,
    samples_without_round: usize,
    vms_lost: usize,
    hosts_on_series: Vec<u32>,
    /// Cores each host declares and the power model they all share.
    host_cores: u32,
    power_model: &'static str,
    /// Per sample, per host (by name order).
    hosts_series: Vec<Vec<HostAtSample>>,
    migration_times: Vec<MigrationTime>,
    /// `tern_automation_cycle_seconds` from the controller's /metrics at each sample.
    cycle_s_series: Vec<f64>,
    plans: BTreeMap<String, u64>,
    dashboard: String,
    recorded: Recorded,
    sim: SimFigures,
}

/// A saved report, as `--sim-from` reads it.
#[derive(Debug, Deserialize)]
struct Saved {
    recorded: Recorded,
    migrations: u64,
    energy_kwh: f64,
    slatah_pct: f64,
    pdm_pct: f64,
    hosts_on_series: Vec<u32>,
    migration_times: Vec<MigrationTime>,
}

/// The simulated side of a recorded live run: the loop replayed on the measured load and on
/// the asked load, the engine for reference, and how each compares with the live figures.
pub fn sim_side(rec: &Recorded, live: &LiveFigures) -> anyhow::Result<SimFigures> {
    let traces: Vec<Vec<u8>> = pick_traces(&rec.day, rec.samples)?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let succeeded: Vec<&MigrationTime> = live
        .migration_times
        .iter()
        .filter(|m| m.succeeded)
        .collect();
    let task_s: Vec<f64> = succeeded.iter().filter_map(|m| m.task_s).collect();
    // a migration shorter than a sample lands within the sample it started in (0)
    let migration_samples =
        median_s(task_s.clone()).map_or(1, |s| (s / rec.step_s as f64).floor() as u32);
    // PDM adds the migrations' durations up: a simulated one counts for the live mean
    let migration_s = if task_s.is_empty() {
        f64::from(migration_samples.max(1)) * rec.step_s as f64
    } else {
        task_s.iter().sum::<f64>() / task_s.len() as f64
    };
    // PDM weighs a move by its VM's load, and busy VMs move more slowly: a simulated move
    // counts for the live moves' duration at its VM's load
    let decided = if rec.round_load.is_empty() {
        &rec.vm_load
    } else {
        &rec.round_load
    };
    let fit_points: Vec<(f64, f64)> = succeeded
        .iter()
        .filter_map(|m| {
            let u = decided.get(m.sample)?.get(m.vm.as_deref()?)?;
            Some((*u, m.task_s?))
        })
        .collect();
    let migration_fit = move_time_fit(&fit_points).unwrap_or(MoveTimeFit {
        fixed_s: migration_s,
        per_load_s: 0.0,
        min_s: migration_s,
        max_s: migration_s,
    });
    let power_on_samples = rec.power_on_s.map_or(1, |s| in_samples(s, rec.step_s));
    let power_off_samples =
        median_s(rec.power_off_s.clone()).map_or(1, |s| in_samples(s, rec.step_s));
    let timing = tern_automation::replay::Timing {
        migration_steps: migration_samples,
        power_on_steps: power_on_samples,
        power_off_steps: power_off_samples,
    };
    let time_scale = SAMPLE_S / rec.step_s as f64;
    let rounds = (!rec.round_load.is_empty()).then_some(rec.round_load.as_slice());
    // the live rounds up to the first played one, oldest first (reports from before they were
    // kept have none: the boot steps then take the readings)
    let first_played = rec.live_rounds.iter().position(|r| r.t_s >= 0.0);
    let boot_rounds: Vec<(f64, BTreeMap<String, f64>)> = rec
        .live_rounds
        .iter()
        .take(first_played.map_or(0, |i| i + 1))
        .map(|r| (r.t_s, r.points.clone()))
        .collect();
    let figures =
        |measured: Option<&[BTreeMap<String, f64>]>| -> anyhow::Result<(ReplayFigures, Replayed)> {
            let load = PlayedLoad {
                traces: &traces,
                raised: &rec.raised,
                raise_at: rec.raise_at,
                samples: rec.samples,
                measured,
                boot: &rec.boot_load,
                rounds: measured.and(rounds),
                boot_rounds: &boot_rounds,
            };
            let r = replay_loop(
                &rec.start,
                &load,
                &rec.policy,
                Some(&rec.policy_before),
                rec.step_s,
                timing,
            )?;
            let lost: f64 = r
                .moves
                .iter()
                .map(|m| {
                    let u = r
                        .load
                        .get(&m.vm)
                        .and_then(|l| l.get(m.sample))
                        .copied()
                        .unwrap_or(0.0);
                    0.1 * migration_fit.at(u) * u
                })
                .sum();
            let demand: f64 = r.load.values().flatten().sum::<f64>() * rec.step_s as f64;
            let pdm_pct = if demand > 0.0 {
                100.0 * lost / demand
            } else {
                0.0
            };
            let energy_kwh = r.energy_kwh * time_scale;
            let agree = live
                .hosts_on_series
                .iter()
                .zip(&r.hosts_on_series)
                .filter(|(a, b)| a.abs_diff(**b) <= 1)
                .count();
            let ratio = |l: f64, s: f64| (s > 0.0).then(|| l / s);
            let f = ReplayFigures {
                energy_kwh,
                migrations: r.moves.len() as u64,
                host_power_offs: r.host_power_offs,
                host_power_ons: r.host_power_ons,
                hosts_on_series: r.hosts_on_series.clone(),
                slatah_pct: r.slatah_pct,
                pdm_pct,
                hosts_on_agreement_pct: 100.0 * agree as f64
                    / r.hosts_on_series.len().max(1) as f64,
                migrations_ratio: ratio(live.migrations as f64, r.moves.len() as f64),
                energy_ratio: ratio(live.energy_kwh, energy_kwh),
                slatah_ratio: ratio(live.slatah_pct, r.slatah_pct),
                pdm_ratio: ratio(live.pdm_pct, pdm_pct),
                moves: r.moves.clone(),
            };
            Ok((f, r))
        };
    let (measured, _) = figures(Some(&rec.vm_load))?;
    let (as_asked, asked_run) = figures(None)?;
    // asked against measured, over the VMs and samples both have
    let (mut a, mut m, mut n, mut ra, mut rm, mut rn) = (0.0, 0.0, 0u32, 0.0, 0.0, 0u32);
    let (mut d, mut dn) = (0.0, 0u32);
    for (vm, asked) in &asked_run.load {
        let idx = trace_index(vm, traces.len())?;
        for (k, want) in asked.iter().enumerate() {
            let Some(got) = rec.vm_load.get(k).and_then(|l| l.get(vm)) else {
                continue;
            };
            a += want;
            m += got;
            n += 1;
            if let Some(x) = rec.round_load.get(k).and_then(|l| l.get(vm)) {
                d += x;
                dn += 1;
            }
            if rec.raised.contains(&idx) && k >= rec.raise_at {
                ra += want;
                rm += got;
                rn += 1;
            }
        }
    }
    let mean = |x: f64, n: u32| if n > 0 { x / f64::from(n) } else { 0.0 };
    let (report, n_samples) = simulate(&traces, &rec.raised, rec.raise_at, rec.samples)?;
    let tl = report.timeline.clone().unwrap_or_default();
    let engine = EngineFigures {
        energy_kwh: tl
            .power_w
            .iter()
            .take(n_samples)
            .map(|w| w * SAMPLE_S)
            .sum::<f64>()
            / 3_600_000.0,
        migrations: tl
            .migrations
            .iter()
            .take(n_samples)
            .map(|&m| u64::from(m))
            .sum(),
        hosts_on_series: tl.active_hosts.iter().take(n_samples).copied().collect(),
        day_slatah_pct: report.slatah_pct,
        day_pdm_pct: report.pdm_pct,
    };
    Ok(SimFigures {
        method: if rounds.is_some() {
            "the live loop's code (tern_automation::replay) from the live start, its boot \
             samples replayed first (on the agents' readings), then fed per sample the load the \
             live loop's round in that sample decided on (GET /v1/automation/rounds)"
        } else {
            "the live loop's code (tern_automation::replay) from the live start, its boot \
             samples replayed first, on the load the agents measured (the controller's /metrics \
             read at each sample: a report from before the controller kept its rounds)"
        },
        measured,
        as_asked,
        load: LoadFigures {
            asked: mean(a, n),
            measured: mean(m, n),
            decided: (dn > 0).then(|| d / f64::from(dn)),
            raised_asked: mean(ra, rn),
            raised_measured: mean(rm, rn),
        },
        migration_samples,
        power_on_samples,
        power_off_samples,
        migration_s,
        migration_fit,
        engine,
    })
}

/// `tern demo cluster --sim-from REPORT`: the simulated side of a saved report, as JSON.
fn sim_from(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let saved: Saved = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a tern demo cluster --json report",
            path.display()
        )
    })?;
    let live = LiveFigures {
        migrations: saved.migrations,
        energy_kwh: saved.energy_kwh,
        slatah_pct: saved.slatah_pct,
        pdm_pct: saved.pdm_pct,
        hosts_on_series: saved.hosts_on_series,
        migration_times: saved.migration_times,
    };
    let sim = sim_side(&saved.recorded, &live)?;
    println!("{}", serde_json::to_string(&sim)?);
    Ok(ExitCode::SUCCESS)
}

struct Api {
    url: String,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<String> {
        let start = Instant::now();
        loop {
            let (status, text) = http(&self.url, method, path, body)?;
            if (200..300).contains(&status) {
                return Ok(text);
            }
            // a leader still gathering its hosts' first reports answers 503 "not ready"
            if status == 503 && start.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            bail!("{method} {path}: {status} {text}");
        }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let text = self.call("GET", path, None)?;
        serde_json::from_str(&text).with_context(|| format!("GET {path}: unexpected answer {text}"))
    }
}

/// Runs `tern volume ARGS --node N --json` in a host's namespace.
fn volume(lab: &Lab, args: &[&str]) -> anyhow::Result<()> {
    let h = &lab.state().hosts[0];
    let out = Command::new("ip")
        .args(["netns", "exec", &h.namespace])
        .arg(std::env::current_exe()?)
        .arg("volume")
        .args(args)
        .args(["--node", &h.volume_node, "--json"])
        .args(
            h.tls_dir
                .iter()
                .flat_map(|d| [std::ffi::OsStr::new("--tls-dir"), d.as_os_str()]),
        )
        .output()
        .context("cannot run tern volume")?;
    ensure!(
        out.status.success(),
        "tern volume {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Sends `text` to VM `vm`'s serial console on whichever host runs it.
fn console_input(lab: &Lab, host: &str, vm: &str, text: &str) -> anyhow::Result<()> {
    let h = lab
        .state()
        .hosts
        .iter()
        .find(|h| h.name == host)
        .with_context(|| format!("no host {host}"))?;
    let out = Command::new("ip")
        .args(["netns", "exec", &h.namespace])
        .arg(std::env::current_exe()?)
        .args(["vm", "console-input", "--name", vm, "--runtime-dir"])
        .arg(&h.runtime_dir)
        .arg(text)
        .output()
        .context("cannot run tern vm console-input")?;
    ensure!(
        out.status.success(),
        "tern vm console-input {vm}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The value of an unlabelled gauge in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Each VM's `tern_vm_cpu_utilization{vm="NAME"}` in a Prometheus text exposition.
fn vm_utilization(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("tern_vm_cpu_utilization{vm=\"")?;
            let (vm, v) = rest.split_once("\"} ")?;
            Some((vm.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn count_actions(plans: &[Plan]) -> (u64, u64) {
    let mut offs = 0;
    let mut ons = 0;
    for p in plans.iter().filter(|p| p.state == PlanState::Applied) {
        for a in &p.actions {
            match a {
                PlanAction::PowerOff { .. } => offs += 1,
                PlanAction::PowerOn { .. } => ons += 1,
                PlanAction::Migrate { .. } => {}
            }
        }
    }
    (offs, ons)
}

fn table_line(t: f64, hosts: &[HostInfo], vms: &[VmInfo], migrations: u64) -> String {
    let mut s = format!("{t:6.0} s ");
    for h in hosts {
        let power = match h.power {
            HostPower::On => "on",
            HostPower::PoweringOff => "powering off",
            HostPower::Off => "off",
            HostPower::PoweringOn => "powering on",
            HostPower::FailedToWake => "failed to wake",
        };
        let n = vms
            .iter()
            .filter(|v| v.host.as_deref() == Some(h.name.as_str()) && v.state != VmState::Stopped)
            .count();
        let u = h
            .cpu_utilization
            .map_or("  -".into(), |u| format!("{:3.0}", u * 100.0));
        s.push_str(&format!("| {} {:<12} {:2} VMs {u}% ", h.name, power, n));
    }
    s.push_str(&format!("| migrations {migrations}"));
    s
}

/// `tern demo cluster`.
pub fn run(args: ClusterDemoArgs) -> anyhow::Result<ExitCode> {
    if let Some(report) = &args.sim_from {
        return sim_from(report);
    }
    let say = Say { json: args.json };
    let samples = args.samples as usize;
    let traces = pick_traces(&args.day, samples)?;
    let spec = LabSpec {
        name: format!("dc{}", std::process::id() % 100_000),
        hosts: HOSTS,
        controllers: 1,
        lun_size: "2G".into(),
        tern: std::env::current_exe().context("cannot find the tern binary")?,
    };
    say.line(&format!(
        "starting a test cluster: etcd, {HOSTS} hosts (volume node, agent and IPMI BMC each, {HOST_CORES} cores of {CPU_SHARE} real CPU), a controller"
    ));
    let shapes = vec![
        HostShape {
            cores: HOST_CORES,
            power_model: POWER_MODEL.into(),
        };
        HOSTS
    ];
    let opts = LabOptions {
        bmc: true,
        host_cpu_share: Some(CPU_SHARE),
        ..LabOptions::default()
    };
    let lab = Lab::start_with(&spec, &shapes, &opts, &|s| say.line(&format!("  {s}")))?;
    let api = Api {
        url: lab.state().controllers[0].url.clone(),
    };
    let dashboard = format!("{}/", api.url);
    match (lab.state().tokens_file(), lab.state().pki.as_ref()) {
        // Over TLS: an admin token for the browser, in the fragment (never sent to the server).
        (Some(tokens), Some(pki)) => {
            let token = crate::cluster::add_token(&tokens, "demo", tern_api::auth::Role::Admin)?;
            say.line(&format!(
                "dashboard: {dashboard}#token={token} (HTTPS: the browser must trust {} or accept the certificate)",
                pki.join("ca-cert.pem").display()
            ));
        }
        _ => say.line(&format!("dashboard: {dashboard}")),
    }

    // VMs arrive in three waves, so placement sees the first ones' measured load.
    let step_ms = args.step_s * 1000;
    // when each VM was seen running: its guest's trace starts at boot
    let mut booted: BTreeMap<String, Instant> = BTreeMap::new();
    // what the agents measured while the VMs boot, a reading per step (the live loop already
    // runs then, and the replay plays those samples too)
    let mut boot_readings: Vec<(Instant, BTreeMap<String, f64>)> = Vec::new();
    let read_boot = |readings: &mut Vec<(Instant, BTreeMap<String, f64>)>| {
        let due = readings
            .last()
            .is_none_or(|(t, _)| t.elapsed() >= Duration::from_secs(args.step_s));
        if due && let Ok(m) = api.call("GET", "/metrics", None) {
            readings.push((Instant::now(), vm_utilization(&m)));
        }
    };
    for (wave, chunk) in traces.chunks(VMS / 3).enumerate() {
        for (k, (name, values)) in chunk.iter().enumerate() {
            let i = wave * (VMS / 3) + k + 1;
            let disk = format!("dc-vm{i}.raw");
            volume(&lab, &["create", &disk, "--size", "8M"])?;
            let cmdline = format!(
                "tern.hb_ms=1000 tern.cpu_trace={} tern.trace_step_ms={step_ms} tern.trace_end=hold",
                guest_trace(values, CPU_SHARE)
            );
            let body = serde_json::json!({
                "name": format!("vm{i}"), "vcpus": 1, "memory_mib": 64,
                "kernel": "builtin:testguest", "cmdline": cmdline, "disk": disk,
            });
            api.call("POST", "/v1/vms", Some(&body.to_string()))
                .with_context(|| format!("creating vm{i} (trace {name})"))?;
        }
        let start = Instant::now();
        loop {
            let vms: Vec<VmInfo> = api.get("/v1/vms")?;
            if vms.iter().all(|v| v.state == VmState::Running) {
                for v in &vms {
                    booted.entry(v.name.clone()).or_insert_with(Instant::now);
                }
                let hosts: Vec<HostInfo> = api.get("/v1/hosts")?;
                say.line(&table_line(0.0, &hosts, &vms, 0));
                break;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(120),
                "the VMs did not all start within 120 s: {vms:?}"
            );
            read_boot(&mut boot_readings);
            std::thread::sleep(Duration::from_millis(250));
        }
        // let the agents measure the wave's load before the next one is placed
        let until = Instant::now() + Duration::from_secs(2 * args.step_s);
        while Instant::now() < until {
            read_boot(&mut boot_readings);
            std::thread::sleep(Duration::from_millis(250).min(until - Instant::now()));
        }
    }

    let policy_json = api.call("GET", "/v1/policy", None)?;
    let policy_before: Policy = serde_json::from_str(&policy_json)?;
    let policy = demo_policy(policy_before.clone(), args.step_s);

    // the state the automation starts from, read before the demo's policy is in force (under
    // the controller's, manual, nothing moves): the simulated side starts here too
    let start_hosts: Vec<HostInfo> = api.get("/v1/hosts")?;
    let start_vms: Vec<VmInfo> = api.get("/v1/vms")?;
    let energy_before = api
        .get::<StatsSeries>("/v1/stats/series")
        .ok()
        .and_then(|s| s.points.last().map(|p| p.energy_kwh))
        .unwrap_or(0.0);
    // the loop's SLATAH counts so far, so the live SLATAH covers the played samples only
    let sla = |text: &str| {
        (
            metric(text, "tern_automation_host_intervals_active_total").unwrap_or(0.0),
            metric(text, "tern_automation_host_intervals_overloaded_total").unwrap_or(0.0),
        )
    };
    let sla_before = sla(&api.call("GET", "/metrics", None)?);
    let mut sla_last = sla_before;
    let before_put: AutomationRounds = api
        .get("/v1/automation/rounds")
        .context("reading the loop's rounds (GET /v1/automation/rounds)")?;
    api.call("PUT", "/v1/policy", Some(&serde_json::to_string(&policy)?))
        .context("setting the automation policy")?;
    say.line(&format!(
        "automation: full, LR-MMT-{}, interval {} s, host power on; playing {samples} samples",
        policy.parameter, args.step_s
    ));
    // The played samples start half a step before the first round under the demo's policy,
    // so that each holds one live round, whose moves the read at the sample's end sees, as each
    // replay step does: started at the PUT, that round (within a cycle of it) fell before the
    // start or after it by chance, and a drain it made was compared with the replay's round a
    // sample later. The controller's
    // clock is placed on ours by its answer, taken as given halfway through the request.
    let waiting = Instant::now();
    let (first_round_ms, clock_ms, clock_at) = loop {
        let asked_at = Instant::now();
        let r: AutomationRounds = api.get("/v1/automation/rounds")?;
        let got = Instant::now();
        if let Some(first) = r.rounds.iter().find(|x| x.at_ms > before_put.now_ms) {
            break (
                first.at_ms,
                r.now_ms,
                asked_at + got.duration_since(asked_at) / 2,
            );
        }
        ensure!(
            waiting.elapsed() < Duration::from_secs(30),
            "the automation loop ran no round within 30 s of the demo's policy"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let start_ms = first_round_ms.saturating_sub((ROUND_LEAD_STEPS * step_ms as f64) as u64);
    let start = clock_at
        .checked_sub(Duration::from_millis(clock_ms.saturating_sub(start_ms)))
        .context("the controller's clock is ahead of this process's")?;
    let start_ms = start_ms as f64;
    let boot_load: Vec<(f64, BTreeMap<String, f64>)> = boot_readings
        .into_iter()
        .map(|(t, l)| (start.saturating_duration_since(t).as_secs_f64(), l))
        .collect();
    let trace_offsets: BTreeMap<String, usize> = booted
        .iter()
        .map(|(n, t)| {
            let ahead = start.saturating_duration_since(*t).as_secs_f64();
            (n.clone(), (ahead / args.step_s as f64).round() as usize)
        })
        .collect();
    let raise_at = samples / 2;
    let mut raised: Vec<usize> = Vec::new();
    let mut hosts_on_series: Vec<u32> = Vec::new();
    let mut hosts_series: Vec<Vec<HostAtSample>> = Vec::new();
    let mut vm_load: Vec<BTreeMap<String, f64>> = Vec::new();
    let mut first_seen: BTreeMap<u64, usize> = BTreeMap::new();
    let mut cycle_s_series: Vec<f64> = Vec::new();
    let mut ever_lost: Vec<String> = Vec::new();
    for k in 0..samples {
        let due = start + Duration::from_secs(args.step_s * (k as u64 + 1));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let hosts: Vec<HostInfo> = api.get("/v1/hosts").unwrap_or_default();
        let vms: Vec<VmInfo> = api.get("/v1/vms").unwrap_or_default();
        let tasks: Vec<TaskInfo> = api.get("/v1/tasks").unwrap_or_default();
        for t in tasks.iter().filter(|t| t.kind == TaskKind::Migrate) {
            first_seen.entry(t.id).or_insert(k);
        }
        let done = tasks
            .iter()
            .filter(|t| t.kind == TaskKind::Migrate && t.state == TaskState::Succeeded)
            .count() as u64;
        hosts_on_series.push(
            hosts
                .iter()
                .filter(|h| !matches!(h.power, HostPower::Off | HostPower::FailedToWake))
                .count() as u32,
        );
        hosts_series.push(
            hosts
                .iter()
                .map(|h| HostAtSample {
                    on: !matches!(h.power, HostPower::Off | HostPower::FailedToWake),
                    cpu_utilization: h.cpu_utilization,
                    parked_cores: h.parked_cores,
                })
                .collect(),
        );
        let metrics = api.call("GET", "/metrics", None).ok();
        if let Some(m) = &metrics {
            if let Some(c) = metric(m, "tern_automation_cycle_seconds") {
                cycle_s_series.push(c);
            }
            sla_last = sla(m);
        }
        vm_load.push(metrics.as_deref().map(vm_utilization).unwrap_or_default());
        for v in &vms {
            if v.state == VmState::Failed && !ever_lost.contains(&v.name) {
                ever_lost.push(v.name.clone());
            }
        }
        say.line(&table_line(
            start.elapsed().as_secs_f64(),
            &hosts,
            &vms,
            done,
        ));
        if k + 1 == raise_at {
            // the busiest hosts' first VMs load their vCPUs, enough to outgrow the hosts on
            let on = hosts
                .iter()
                .filter(|h| !matches!(h.power, HostPower::Off | HostPower::FailedToWake))
                .count();
            let running: Vec<(&str, &str)> = vms
                .iter()
                .filter(|v| v.state == VmState::Running)
                .filter_map(|v| Some((v.name.as_str(), v.host.as_deref()?)))
                .collect();
            let busiest = raised_vms(&running, raised_count(on));
            let pct = (RAISED_PCT * CPU_SHARE).round();
            for &name in &busiest {
                let host = running
                    .iter()
                    .find(|(v, _)| *v == name)
                    .map(|(_, h)| *h)
                    .unwrap_or_default();
                console_input(&lab, host, name, &format!("load {pct}\n"))?;
                let idx: usize = name.trim_start_matches("vm").parse::<usize>()? - 1;
                raised.push(idx);
            }
            say.line(&format!(
                "raising the load: {} now spin {RAISED_PCT:.0} % of their vCPU",
                busiest.join(" ")
            ));
        }
    }

    let plans: Vec<Plan> = api.get("/v1/plans")?;
    let tasks: Vec<TaskInfo> = api.get("/v1/tasks")?;
    let series: StatsSeries = api.get("/v1/stats/series")?;
    // the load the live loop's rounds decided on, per played sample
    let live_rounds: AutomationRounds = api.get("/v1/automation/rounds")?;
    let rounds: Vec<(f64, BTreeMap<String, f64>)> = live_rounds
        .rounds
        .iter()
        .map(|r| {
            (
                (r.at_ms as f64 - start_ms) / 1000.0,
                r.points
                    .iter()
                    .map(|p| (p.vm.clone(), p.utilization))
                    .collect(),
            )
        })
        .collect();
    let (round_load, round_at_s) = round_load(&rounds, samples, args.step_s);
    let live_rounds_kept: Vec<LiveRound> = live_rounds
        .rounds
        .iter()
        .zip(&rounds)
        .map(|(r, (t_s, points))| LiveRound {
            t_s: *t_s,
            plan: r.plan,
            points: points.clone(),
        })
        .collect();
    let end_s = samples as f64 * args.step_s as f64;
    let live_rounds_played = rounds
        .iter()
        .filter(|(t, _)| (0.0..end_s).contains(t))
        .count();
    let vms: Vec<VmInfo> = api.get("/v1/vms")?;
    let migrations: Vec<&TaskInfo> = tasks
        .iter()
        .filter(|t| t.kind == TaskKind::Migrate)
        .collect();
    let succeeded = migrations
        .iter()
        .filter(|t| t.state == TaskState::Succeeded)
        .count() as u64;
    let failed = migrations
        .iter()
        .filter(|t| t.state == TaskState::Failed)
        .count() as u64;
    let mut migration_times = Vec::new();
    for t in &migrations {
        let d: tern_api::cluster::TaskDetail = api.get(&format!("/v1/tasks/{}", t.id))?;
        migration_times.push(MigrationTime {
            task: t.id,
            sample: first_seen.get(&t.id).copied().unwrap_or(samples),
            vm: t.vm.clone(),
            from: t.from.clone(),
            to: t.to.clone(),
            succeeded: t.state == TaskState::Succeeded,
            task_s: t
                .finished_ms
                .map(|f| f.saturating_sub(t.created_ms) as f64 / 1000.0),
            predicted_s: d.predicted.map(|p| p.time_s),
            actual_s: d.actual.map(|a| a.time_s),
            bytes: d.actual.map(|a| a.bytes),
            phases: t.phases,
            vmm_s: t
                .report
                .as_ref()
                .and_then(|r| r.get("total_ms")?.as_f64())
                .map(|ms| ms / 1000.0),
            vmm_report: t.report.clone(),
        });
    }
    let (offs, ons) = count_actions(&plans);
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for p in &plans {
        *by_state
            .entry(format!("{:?}", p.state).to_lowercase())
            .or_default() += 1;
    }
    let time_scale = SAMPLE_S / args.step_s as f64;
    let last = series.points.last();
    let energy_kwh = (last.map_or(0.0, |p| p.energy_kwh) - energy_before).max(0.0) * time_scale;
    let (active, overloaded) = (sla_last.0 - sla_before.0, sla_last.1 - sla_before.1);
    let slatah_pct = if active > 0.0 {
        100.0 * overloaded / active
    } else {
        0.0
    };
    // PDM: each migration costs 10 % of the moving VM's load while its task runs, over the
    // VMs' load through the played samples: the load the live rounds decided on (the replay's
    // too), and for reference the agents' readings at each sample
    let pdm = |load: &[BTreeMap<String, f64>]| {
        let load_at = |vm: &str, k: usize| load.get(k).and_then(|l| l.get(vm)).copied();
        let lost_cpu: f64 = migration_times
            .iter()
            .filter(|m| m.succeeded)
            .filter_map(|m| Some(0.1 * m.task_s? * load_at(m.vm.as_deref()?, m.sample)?))
            .sum();
        let demand: f64 = load.iter().flat_map(|l| l.values()).sum::<f64>() * args.step_s as f64;
        if demand > 0.0 {
            100.0 * lost_cpu / demand
        } else {
            0.0
        }
    };
    let pdm_read_pct = pdm(&vm_load);
    let pdm_pct = if round_load.iter().any(|l| !l.is_empty()) {
        pdm(&round_load)
    } else {
        pdm_read_pct
    };
    let vms_lost = vms
        .iter()
        .filter(|v| v.state != VmState::Running)
        .count()
        .max(ever_lost.len());

    // the simulated side: the same loop, from the same start, its actions taking the live
    // run's median times
    let power_on_s = median_s(
        plans
            .iter()
            .filter(|p| p.state == PlanState::Applied)
            .filter(|p| {
                p.actions
                    .iter()
                    .any(|a| matches!(a, PlanAction::PowerOn { .. }))
            })
            .filter_map(|p| Some(p.finished_ms?.saturating_sub(p.created_ms) as f64 / 1000.0))
            .collect(),
    );
    let recorded = Recorded {
        day: args.day.clone(),
        samples,
        step_s: args.step_s,
        policy_before,
        policy,
        start: LiveStart::from_api(&start_hosts, &start_vms, &trace_offsets)?,
        raised,
        raise_at,
        vm_load,
        boot_load,
        round_load,
        round_at_s,
        live_rounds: live_rounds_kept,
        power_on_s,
        power_off_s: power_off_times(&plans),
        plan_times: {
            let mut t: Vec<PlanTimes> = plans.iter().map(|p| PlanTimes::of(p, start_ms)).collect();
            t.sort_by_key(|p| p.id);
            t
        },
    };
    let live = LiveFigures {
        migrations: succeeded,
        energy_kwh,
        slatah_pct,
        pdm_pct,
        hosts_on_series: hosts_on_series.clone(),
        migration_times: migration_times.clone(),
    };
    let sim = sim_side(&recorded, &live)?;
    let figures = Figures {
        hosts: HOSTS,
        vms: VMS,
        samples: args.samples,
        step_s: args.step_s,
        time_scale,
        migrations: succeeded,
        migrations_failed: failed,
        host_power_offs: offs,
        host_power_ons: ons,
        energy_kwh,
        slatah_pct,
        pdm_pct,
        pdm_read_pct,
        live_rounds: live_rounds_played,
        samples_without_round: recorded.round_at_s.iter().filter(|t| t.is_none()).count(),
        vms_lost,
        hosts_on_series,
        host_cores: HOST_CORES,
        power_model: POWER_MODEL,
        hosts_series,
        migration_times,
        cycle_s_series,
        plans: by_state,
        dashboard,
        recorded,
        sim,
    };
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    } else {
        say.line(&format!(
            "done: {} migrations ({} failed), {} host power-offs, {} power-ons, {:.3} kWh (model, trace time), SLATAH {:.2} %, PDM {:.3} %, VMs lost {}",
            figures.migrations,
            figures.migrations_failed,
            figures.host_power_offs,
            figures.host_power_ons,
            figures.energy_kwh,
            figures.slatah_pct,
            figures.pdm_pct,
            figures.vms_lost
        ));
        say.line(&format!(
            "simulated: {} migrations, {:.3} kWh; hosts on within one host of the simulation in {:.0} % of samples",
            figures.sim.measured.migrations,
            figures.sim.measured.energy_kwh,
            figures.sim.measured.hosts_on_agreement_pct
        ));
    }
    say.line("taking the cluster down");
    let left = lab.shutdown();
    ensure!(left.is_empty(), "the cluster left: {}", left.join("; "));
    Ok(if figures.vms_lost == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_raise_loads_enough_vms_to_outgrow_the_hosts_on_busiest_hosts_first() {
        use super::{raised_count, raised_vms};
        assert_eq!(
            raised_count(2),
            4,
            "packed onto two hosts: four VMs, as always"
        );
        assert_eq!(raised_count(3), 6);
        assert_eq!(raised_count(4), 8);
        assert_eq!(raised_count(1), 4);
        assert_eq!(raised_count(9), 12, "never more than the demo's VMs");
        // three hosts on: h0 and h3 hold four VMs each, h2 three; the later of the tied hosts
        // first (as the demo always chose), then the other, then the rest
        let running = [
            ("vm1", "h0"),
            ("vm2", "h3"),
            ("vm3", "h0"),
            ("vm4", "h2"),
            ("vm5", "h3"),
            ("vm6", "h0"),
            ("vm7", "h3"),
            ("vm8", "h2"),
            ("vm9", "h0"),
            ("vm10", "h3"),
            ("vm11", "h2"),
        ];
        assert_eq!(
            raised_vms(&running, raised_count(3)),
            ["vm2", "vm5", "vm7", "vm10", "vm1", "vm3"]
        );
        assert_eq!(raised_vms(&running, 4), ["vm2", "vm5", "vm7", "vm10"]);
        assert_eq!(raised_vms(&running, 20).len(), running.len());
    }

    use super::*;

    /// Four hosts up, twelve 1-vCPU VMs spread three to a host, each at `pct` of its vCPU.
    fn spread(pct: u8, samples: usize) -> (LiveStart, Vec<Vec<u8>>) {
        let start = LiveStart {
            hosts: (1..=HOSTS).map(|h| (format!("h{h}"), true)).collect(),
            vms: (1..=VMS)
                .map(|i| StartVm {
                    name: format!("vm{i}"),
                    host: format!("h{}", (i - 1) % HOSTS + 1),
                    vcpus: 1,
                    memory_mib: 64,
                    trace_offset: 0,
                })
                .collect(),
        };
        (start, vec![vec![pct; samples]; VMS])
    }

    fn policy() -> Policy {
        demo_policy(Policy::default(), 2)
    }

    fn load<'a>(
        traces: &'a [Vec<u8>],
        raised: &'a [usize],
        raise_at: usize,
        samples: usize,
    ) -> PlayedLoad<'a> {
        PlayedLoad {
            traces,
            raised,
            raise_at,
            samples,
            measured: None,
            boot: &[],
            rounds: None,
            boot_rounds: &[],
        }
    }

    #[test]
    fn the_replayed_loop_packs_a_light_spread_cluster_and_powers_hosts_off() {
        let (start, traces) = spread(10, 30);
        let r = replay_loop(
            &start,
            &load(&traces, &[], 30, 30),
            &policy(),
            None,
            2,
            Default::default(),
        )
        .unwrap();
        assert_eq!(r.hosts_on_series.len(), 30);
        assert_eq!(r.hosts_on_series[0], 4, "{r:?}");
        let last = *r.hosts_on_series.last().unwrap();
        // 1.2 cores of demand: one host carries it, one more is the HA reserve
        assert_eq!(last, 2, "{r:?}");
        assert_eq!(r.host_power_offs, 2, "{r:?}");
        assert_eq!(r.host_power_ons, 0, "{r:?}");
        assert!(r.moves.len() >= 6, "two hosts' VMs moved: {r:?}");
        assert!(r.energy_kwh > 0.0);
    }

    #[test]
    fn the_live_power_off_time_keeps_the_replayed_host_on_as_long() {
        let (start, traces) = spread(10, 30);
        let run = |power_off_steps| {
            let timing = tern_automation::replay::Timing {
                power_off_steps,
                ..Default::default()
            };
            replay_loop(
                &start,
                &load(&traces, &[], 30, 30),
                &policy(),
                None,
                2,
                timing,
            )
            .unwrap()
        };
        let (one, three) = (run(1), run(3));
        // the same moves and power-offs, each powered-off host counted on two samples longer
        assert_eq!(one.moves, three.moves, "{one:?} vs {three:?}");
        assert_eq!((one.host_power_offs, three.host_power_offs), (2, 2));
        let on = |r: &Replayed| r.hosts_on_series.iter().sum::<u32>();
        assert_eq!(on(&three), on(&one) + 2 * 2, "{one:?} vs {three:?}");
        assert!(three.energy_kwh > one.energy_kwh);
    }

    #[test]
    fn each_live_power_off_is_timed_from_its_decision_to_its_outcome() {
        use tern_api::automation::{ActionStatus, AutomationLevel, Plan, PlanAction, PlanState};
        let off = |host: &str| PlanAction::PowerOff {
            host: host.into(),
            reason: "empty".into(),
            status: ActionStatus::Done,
        };
        let plan = |id, state, automation, created_ms, finished_ms, actions| Plan {
            id,
            state,
            created_ms,
            finished_ms,
            automation,
            basis: 1,
            reason: "r".into(),
            actions,
            effect: None,
            detail: None,
        };
        let mv = PlanAction::Migrate {
            vm: "a".into(),
            from: "h1".into(),
            to: "h2".into(),
            reason: "drain".into(),
            predicted: None,
            actual: None,
            status: ActionStatus::Done,
            post_copy_after: None,
        };
        let (full, manual) = (AutomationLevel::Full, AutomationLevel::Manual);
        let plans = vec![
            // newest first, as the API lists them
            plan(
                7,
                PlanState::Applied,
                full,
                30_000,
                Some(33_250),
                vec![off("h3"), off("h4")],
            ),
            plan(
                5,
                PlanState::Applied,
                full,
                20_000,
                Some(20_700),
                vec![mv.clone()],
            ),
            plan(
                4,
                PlanState::Failed,
                full,
                12_000,
                Some(13_000),
                vec![off("h2")],
            ),
            plan(
                3,
                PlanState::Applied,
                manual,
                9_000,
                Some(15_000),
                vec![off("h2")],
            ),
            plan(
                2,
                PlanState::Applied,
                full,
                10_000,
                Some(11_500),
                vec![off("h1")],
            ),
            plan(
                1,
                PlanState::Vetoed,
                full,
                8_000,
                Some(8_000),
                vec![mv, off("h1")],
            ),
        ];
        // plans 2 and 7: full automation applied them at their round; a plan of two power-offs
        // counts once; a manual plan's apply time is not known, a failed one never powered off
        assert_eq!(power_off_times(&plans), vec![1.5, 3.25]);
        let t = PlanTimes::of(&plans[0], 1_000.0);
        assert_eq!(t.actions, "2 power_off");
        assert_eq!(
            (t.decided_s, t.applied_s, t.finished_s),
            (29.0, Some(29.0), Some(32.25))
        );
        let t = PlanTimes::of(&plans[3], 1_000.0);
        assert_eq!((t.applied_s, t.finished_s), (None, Some(14.0)));
        let t = PlanTimes::of(&plans[5], 1_000.0);
        assert_eq!(
            (t.actions.as_str(), t.applied_s),
            ("1 migrate, 1 power_off", None)
        );
        // started half-way through a 2 s sample: done by the end of the next one up to 3 s
        assert_eq!(in_samples(3.25, 2), 2);
        assert_eq!(in_samples(2.5, 2), 1);
        assert_eq!(in_samples(3.0, 2), 1);
        assert_eq!(in_samples(0.5, 2), 1, "at least a step");
        assert_eq!(in_samples(f64::NAN, 2), 1);
    }

    #[test]
    fn raised_load_wakes_a_host_and_offsets_shift_the_traces() {
        let (mut start, traces) = spread(10, 40);
        let calm = replay_loop(
            &start,
            &load(&traces, &[], 40, 40),
            &policy(),
            None,
            2,
            Default::default(),
        )
        .unwrap();
        let raised = replay_loop(
            &start,
            &load(&traces, &[0, 1, 2, 3], 20, 40),
            &policy(),
            None,
            2,
            Default::default(),
        )
        .unwrap();
        assert_eq!(calm.host_power_ons, 0, "{calm:?}");
        assert!(raised.host_power_ons >= 1, "{raised:?}");
        assert!(
            raised.hosts_on_series.last() > calm.hosts_on_series.last(),
            "{raised:?} vs {calm:?}"
        );
        // a trace whose first half is idle and second half busy, read from half-way: busy at once
        let mut steps = vec![0u8; 20];
        steps.extend(vec![90u8; 20]);
        let traces = vec![steps; VMS];
        for v in &mut start.vms {
            v.trace_offset = 20;
        }
        let busy = replay_loop(
            &start,
            &load(&traces, &[], 40, 10),
            &policy(),
            None,
            2,
            Default::default(),
        )
        .unwrap();
        assert_eq!(busy.host_power_offs, 0, "{busy:?}");
        assert!(busy.hosts_on_series.iter().all(|&h| h == 4), "{busy:?}");
    }

    #[test]
    fn the_boot_samples_are_replayed_first_so_the_loop_starts_warm() {
        let (mut start, traces) = spread(10, 40);
        for v in &mut start.vms {
            v.trace_offset = 6;
        }
        let played = load(&traces, &[], 40, 30);
        let cold = replay_loop(&start, &played, &policy(), None, 2, Default::default()).unwrap();
        // the controller's default policy ran while the VMs booted: hold timers and history
        // are under way at the start, so the first drain comes at once
        let before = Policy::default();
        let warm = replay_loop(
            &start,
            &played,
            &policy(),
            Some(&before),
            2,
            Default::default(),
        )
        .unwrap();
        let first = |r: &Replayed| r.moves.first().map(|m| m.sample);
        assert_eq!(first(&warm), Some(0), "{warm:?}");
        assert!(first(&cold) > Some(0), "{cold:?}");
        assert_eq!(warm.hosts_on_series.len(), 30);
        assert_eq!(warm.load["vm1"].len(), 30);
    }

    #[test]
    fn the_measured_load_replaces_the_trace_and_the_played_values_are_whole_percent() {
        let (start, traces) = spread(10, 30);
        let busy: Vec<BTreeMap<String, f64>> = (0..30)
            .map(|_| start.vms.iter().map(|v| (v.name.clone(), 0.6)).collect())
            .collect();
        let measured = PlayedLoad {
            measured: Some(&busy),
            ..load(&traces, &[], 30, 30)
        };
        let r = replay_loop(&start, &measured, &policy(), None, 2, Default::default()).unwrap();
        // 12 VMs at 0.6 of a core need all four 2-core hosts: nothing is powered off
        assert_eq!(r.host_power_offs, 0, "{r:?}");
        assert!((r.load["vm3"][5] - 0.6).abs() < 1e-12);
        // the trace's 10 % played as 3 % of a real CPU at a 0.25 share reads 12 %
        assert!((played(10.0) - 0.12).abs() < 1e-12);
        assert!((played(RAISED_PCT) - 0.92).abs() < 1e-12);
        let asked = replay_loop(
            &start,
            &load(&traces, &[], 30, 30),
            &policy(),
            None,
            2,
            Default::default(),
        )
        .unwrap();
        assert!((asked.load["vm3"][5] - 0.12).abs() < 1e-12);
        assert!(asked.host_power_offs >= 1, "{asked:?}");
    }

    #[test]
    fn a_move_time_is_fitted_to_the_load_when_the_moves_span_enough_of_it() {
        // run 21's moves: idle VMs 0.06-0.09 s, the raised ones slower
        let moves = [
            (0.09, 0.082),
            (0.08, 0.087),
            (0.05, 0.058),
            (0.14, 0.056),
            (0.11, 0.060),
            (0.09, 0.060),
            (0.08, 0.061),
            (0.66, 0.132),
            (0.77, 0.265),
            (0.78, 0.105),
        ];
        let f = move_time_fit(&moves).unwrap();
        assert!(f.per_load_s > 0.05, "{f:?}");
        assert!(f.at(0.1) < 0.08 && f.at(0.75) > 0.12, "{f:?}");
        // the weighted sum of the live moves is the fit's (least squares through the means,
        // within the live range), where the mean alone counted a third less
        let live: f64 = moves.iter().map(|(u, t)| u * t).sum();
        let fitted: f64 = moves.iter().map(|(u, _)| u * f.at(*u)).sum();
        let mean = moves.iter().map(|m| m.1).sum::<f64>() / moves.len() as f64;
        let flat: f64 = moves.iter().map(|(u, _)| u * mean).sum();
        assert!((fitted / live - 1.0).abs() < 0.1, "{fitted} vs {live}");
        assert!(live / flat > 1.4, "{live} vs {flat}");
        // moves of alike loads: the mean, no slope
        let f = move_time_fit(&[(0.1, 0.05), (0.2, 0.07), (0.15, 0.09)]).unwrap();
        assert_eq!(f.per_load_s, 0.0);
        assert!((f.at(0.9) - 0.07).abs() < 1e-12);
        assert_eq!(move_time_fit(&[]), None);
    }

    #[test]
    fn a_boot_step_gets_the_point_of_the_live_round_that_averaged_it() {
        let pt = |u: f64| -> BTreeMap<String, f64> { [("vm1".to_string(), u)].into() };
        // 10 s boot rounds at -16.0 and -6.5 s, the first played one at +1.0 s
        let rounds = vec![(-16.0, pt(0.1)), (-6.5, pt(0.2)), (1.0, pt(0.3))];
        assert_eq!(covering_point(&rounds, -10.0, "vm1"), Some(0.2));
        assert_eq!(covering_point(&rounds, -6.5, "vm1"), Some(0.2));
        assert_eq!(covering_point(&rounds, -4.0, "vm1"), Some(0.3));
        assert_eq!(covering_point(&rounds, -2.0, "vm2"), None);
        assert_eq!(covering_point(&rounds, 2.0, "vm1"), None);
    }

    #[test]
    fn each_sample_gets_the_live_round_that_ran_in_it_and_a_missing_one_is_carried() {
        let pt = |pairs: &[(&str, f64)]| -> BTreeMap<String, f64> {
            pairs.iter().map(|(v, u)| (v.to_string(), *u)).collect()
        };
        // 2 s rounds on a grid whose phase is a few ms before the samples' starts, woken up
        // to 5 ms late: a round just before a sample's start belongs to that sample; a round
        // before the start is the boot's; none ran in sample 3; vm2 had no point at 4.0 s
        let rounds = vec![
            (-0.003, pt(&[("vm1", 0.9)])),
            (1.998, pt(&[("vm1", 0.1), ("vm2", 0.5)])),
            (4.002, pt(&[("vm1", 0.2)])),
            (5.997, pt(&[("vm1", 0.3), ("vm2", 0.6)])),
            (9.999, pt(&[("vm1", 0.4), ("vm2", 0.7)])),
            (12.0, pt(&[("vm1", 0.8)])),
        ];
        let (load, at) = round_load(&rounds, 6, 2);
        assert_eq!(
            at,
            [
                Some(1.998),
                Some(4.002),
                Some(5.997),
                None,
                Some(9.999),
                None
            ]
        );
        let vm = |k: usize, v: &str| load[k].get(v).copied();
        assert_eq!(vm(0, "vm1"), Some(0.1));
        assert_eq!((vm(1, "vm1"), vm(1, "vm2")), (Some(0.2), Some(0.5)));
        assert_eq!((vm(2, "vm1"), vm(2, "vm2")), (Some(0.3), Some(0.6)));
        assert_eq!((vm(3, "vm1"), vm(3, "vm2")), (Some(0.3), Some(0.6)));
        assert_eq!((vm(4, "vm1"), vm(4, "vm2")), (Some(0.4), Some(0.7)));
        assert_eq!(
            vm(5, "vm1"),
            Some(0.4),
            "the round at 12.0 s is past the samples"
        );
        assert_eq!(round_load(&[], 3, 2).0, vec![BTreeMap::new(); 3]);
    }

    #[test]
    fn the_live_rounds_load_is_fed_at_its_own_sample_and_replaces_the_readings() {
        let (start, traces) = spread(10, 30);
        let read: Vec<BTreeMap<String, f64>> = (0..30)
            .map(|_| start.vms.iter().map(|v| (v.name.clone(), 0.2)).collect())
            .collect();
        // the rounds decided on 0.6 for every VM but vm1, which no round had a point for
        let decided: Vec<BTreeMap<String, f64>> = (0..30)
            .map(|k| {
                start
                    .vms
                    .iter()
                    .filter(|v| v.name != "vm1")
                    .map(|v| (v.name.clone(), 0.5 + k as f64 / 300.0))
                    .collect()
            })
            .collect();
        let fed = PlayedLoad {
            measured: Some(&read),
            rounds: Some(&decided),
            ..load(&traces, &[], 30, 30)
        };
        let r = replay_loop(&start, &fed, &policy(), None, 2, Default::default()).unwrap();
        // step k gets sample k's round (not k - 1's, as the readings taken at a sample's end)
        for k in [0, 7, 29] {
            assert!(
                (r.load["vm3"][k] - (0.5 + k as f64 / 300.0)).abs() < 1e-12,
                "{k}"
            );
        }
        assert!(
            (r.load["vm1"][7] - 0.2).abs() < 1e-12,
            "vm1 falls back to the readings"
        );
        // eleven VMs at 0.5+ of a core and one at 0.2 need all four hosts
        assert_eq!(r.host_power_offs, 0, "{r:?}");
    }
}

//! `cargo xtask bench park`: core parking on PlanetLab traces (energy, capacity shortfall) against no
//! parking and a naive rule, and the daemon's own CPU cost per check on this host.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tern_parking::knobs::{Knobs, Plan};
use tern_parking::policy::{Policy, Sample};
use tern_parking::power::{CorePower, ParkingPowerModel, PowerSpec};
use tern_parking::replay::{HostSim, StepOutcome, Strategy, summarise};
use tern_parking::topology::Topology;

/// Options of `cargo xtask bench park`.
#[derive(Debug, clap::Args)]
pub struct BenchParkArgs {
    /// PlanetLab traces (.tar.xz of day folders, or a directory of day folders).
    #[arg(long, default_value = "data/planetlab/traces.tar.xz")]
    traces: PathBuf,
    /// Days to run (folder names); default all.
    #[arg(long)]
    day: Vec<String>,
    /// Cores per host.
    #[arg(long, default_value_t = 12)]
    cores: usize,
    /// VMs (one vCPU each) packed per host, in name order; default 2 × cores.
    #[arg(long)]
    vms_per_host: Option<usize>,
    /// Check intervals per 5-minute trace sample (demand interpolated linearly in between).
    #[arg(long, default_value_t = 10)]
    substeps: usize,
    /// Host power curve (`specpower:MODEL` or `linear:IDLE:PEAK`).
    #[arg(long, default_value = "specpower:IbmX3550XeonX5670")]
    power_model: String,
    /// Seconds to run the real daemon for the CPU-cost measurement (0 skips it).
    #[arg(long, default_value_t = 20)]
    daemon_seconds: u64,
    /// A `tern` binary to measure; default: build `tern` in release mode and use it.
    #[arg(long)]
    tern: Option<PathBuf>,
}

fn load_traces(path: &Path) -> anyhow::Result<BTreeMap<String, BTreeMap<String, Vec<f64>>>> {
    let mut days: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    let mut add = |rel: &str, text: &str| {
        let mut parts = rel.trim_start_matches("./").splitn(2, '/');
        let (Some(day), Some(name)) = (parts.next(), parts.next()) else {
            return;
        };
        if name.is_empty() {
            return;
        }
        let v: Vec<f64> = text
            .lines()
            .filter_map(|l| l.trim().parse::<f64>().ok())
            .collect();
        if !v.is_empty() {
            days.entry(day.to_string())
                .or_default()
                .insert(name.to_string(), v);
        }
    };
    if path.is_dir() {
        for day in std::fs::read_dir(path)? {
            let day = day?.path();
            if !day.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&day)? {
                let f = f?.path();
                let rel = f.strip_prefix(path)?.to_string_lossy().to_string();
                add(&rel, &std::fs::read_to_string(&f)?);
            }
        }
    } else {
        let file = std::fs::File::open(path).with_context(|| {
            format!(
                "cannot open PlanetLab traces at {} (pass --traces, e.g. the shared copy)",
                path.display()
            )
        })?;
        let mut ar = tar::Archive::new(xz2::read::XzDecoder::new(file));
        for e in ar.entries()? {
            let mut e = e?;
            if !e.header().entry_type().is_file() {
                continue;
            }
            let rel = e.path()?.to_string_lossy().to_string();
            let mut text = String::new();
            e.read_to_string(&mut text)?;
            add(&rel, &text);
        }
    }
    if days.is_empty() {
        bail!("no traces found in {}", path.display());
    }
    Ok(days)
}

#[derive(Default, Clone, Copy)]
struct Totals {
    energy_j: f64,
    /// Energy with the per-core shallow-state figure at the low, middle and high end.
    energy_sens_j: [f64; 3],
    no_parking_j: f64,
    exceeded: usize,
    intervals: usize,
    delayed_core_s: f64,
    unparked_sum: f64,
    changes: usize,
}

fn run_strategy(
    hosts: &[Vec<f64>],
    strategy: Strategy,
    model: &ParkingPowerModel,
    sens: &[ParkingPowerModel; 3],
    dt: f64,
) -> Totals {
    let mut t = Totals::default();
    for demands in hosts {
        let mut sim = HostSim::new(strategy, model.clone());
        let steps: Vec<StepOutcome> = demands.iter().map(|&d| sim.step(d)).collect();
        let s = summarise(&steps, dt);
        // The decisions do not depend on the watts: price the same run under each figure.
        for (e, m) in t.energy_sens_j.iter_mut().zip(sens) {
            *e += steps
                .iter()
                .map(|st| m.power_w(st.demand, st.unparked) * dt)
                .sum::<f64>();
        }
        t.energy_j += s.energy_j;
        t.no_parking_j += s.energy_no_parking_j;
        t.exceeded += s.exceeded_intervals;
        t.intervals += s.intervals;
        t.delayed_core_s += s.delayed_core_s;
        t.unparked_sum += s.mean_unparked * s.intervals as f64;
        t.changes += s.changes;
    }
    t
}

pub fn run(args: BenchParkArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.cores >= 1 && args.substeps >= 1,
        "--cores and --substeps must be at least 1"
    );
    let per_host = args.vms_per_host.unwrap_or(2 * args.cores).max(1);
    let spec = PowerSpec {
        curve: args.power_model.clone(),
        ..PowerSpec::default()
    };
    let (model, model_line) = spec.resolve(args.cores)?;
    let figures = CorePower::for_curve(&model.curve);
    let sens_cores = figures.sensitivity();
    let sens = sens_cores.map(|c| {
        ParkingPowerModel::new(model.curve.clone(), args.cores, c)
            .expect("published figures are valid")
    });
    let started = Instant::now();
    let days = load_traces(&args.traces)?;
    println!(
        "# core parking on PlanetLab traces: {} cores/host, {per_host} one-vCPU VMs/host, {} check intervals per 5-min sample ({} s each)\n# {model_line}\n# figures: {}",
        args.cores,
        args.substeps,
        300 / args.substeps,
        figures.source
    );
    let dt = 300.0 / args.substeps as f64;
    let knobs = Knobs {
        min_cores_pct: 0,
        ..Plan::Balanced.knobs()
    };
    let strategies = [
        ("no parking", Strategy::NoParking),
        ("naive <50 %", Strategy::Naive { threshold_pct: 50 }),
        ("tern balanced", Strategy::Policy(knobs)),
        (
            "tern aggressive",
            Strategy::Policy(Knobs {
                headroom_pct: 80,
                distribution_pct: 95,
                decrease_time: 3,
                ..knobs
            }),
        ),
    ];
    println!(
        "\n| day | hosts | strategy | energy kWh | saved vs no parking | intervals demand > unparked | delayed core-h | mean unparked | changes per host-day |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut grand: Vec<Totals> = vec![Totals::default(); strategies.len()];
    let mut days_run = 0;
    for (day, vms) in &days {
        if !args.day.is_empty() && !args.day.contains(day) {
            continue;
        }
        days_run += 1;
        let names: Vec<&String> = vms.keys().collect();
        let hosts: Vec<Vec<f64>> = names
            .chunks(per_host)
            .map(|chunk| {
                let len = chunk.iter().map(|n| vms[*n].len()).max().unwrap_or(0);
                let samples: Vec<f64> = (0..len)
                    .map(|i| {
                        chunk
                            .iter()
                            .map(|n| vms[*n].get(i).copied().unwrap_or(0.0) / 100.0)
                            .sum()
                    })
                    .collect();
                let mut fine = Vec::with_capacity(len * args.substeps);
                for i in 0..len {
                    let next = samples.get(i + 1).copied().unwrap_or(samples[i]);
                    for s in 0..args.substeps {
                        let f = s as f64 / args.substeps as f64;
                        fine.push(samples[i] + (next - samples[i]) * f);
                    }
                }
                fine
            })
            .collect();
        for (i, (name, st)) in strategies.iter().enumerate() {
            let t = run_strategy(&hosts, *st, &model, &sens, dt);
            let g = &mut grand[i];
            g.energy_j += t.energy_j;
            for (a, b) in g.energy_sens_j.iter_mut().zip(t.energy_sens_j) {
                *a += b;
            }
            g.no_parking_j += t.no_parking_j;
            g.exceeded += t.exceeded;
            g.intervals += t.intervals;
            g.delayed_core_s += t.delayed_core_s;
            g.unparked_sum += t.unparked_sum;
            g.changes += t.changes;
            print_row(day, hosts.len(), name, &t, args.substeps);
        }
    }
    println!();
    for (i, (name, _)) in strategies.iter().enumerate() {
        print_row("all", 0, name, &grand[i], args.substeps);
    }
    println!(
        "\nSensitivity to the per-core C1 figure ({}; shallow share {:.0} %, deep {} W), all days:\n",
        figures.family,
        100.0 * figures.core.shallow_share,
        figures.core.deep_w
    );
    let head: Vec<String> = sens_cores
        .iter()
        .zip(["low", "mid", "high"])
        .map(|(c, l)| {
            format!(
                "{l}: C1 {} W → {:.2} W per parked core",
                c.shallow_w,
                c.saving_w()
            )
        })
        .collect();
    println!("| strategy | {} |", head.join(" | "));
    println!("|---|---|---|---|");
    for (i, (name, _)) in strategies.iter().enumerate() {
        let g = &grand[i];
        let cells: Vec<String> = g
            .energy_sens_j
            .iter()
            .map(|e| {
                format!(
                    "{:.2} kWh, {:.2} % saved",
                    e / 3.6e6,
                    100.0 * (1.0 - e / g.no_parking_j.max(1e-9))
                )
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    println!(
        "\n(replay of {days_run} days took {:.1} s)",
        started.elapsed().as_secs_f64()
    );

    // The pure policy's cost per check.
    let topo = Topology::flat(args.cores);
    let mut p = Policy::new(knobs, topo);
    let n = 200_000;
    let t0 = Instant::now();
    for i in 0..n {
        let b = (i % 100) as f64 / 100.0;
        p.step(&Sample {
            cpu_busy: vec![b; args.cores],
            runq_wait: 0.0,
        });
    }
    let per_step = t0.elapsed().as_nanos() as f64 / n as f64;
    println!(
        "\npolicy step ({} CPUs, in-process): {:.0} ns per check",
        args.cores, per_step
    );

    if args.daemon_seconds > 0 {
        daemon_cost(&args)?;
    }
    Ok(())
}

fn print_row(day: &str, hosts: usize, name: &str, t: &Totals, substeps: usize) {
    let host_days = t.intervals as f64 / (288 * substeps) as f64;
    println!(
        "| {day} | {} | {name} | {:.2} | {:.2} % | {:.3} % | {:.2} | {:.2} | {:.0} |",
        if hosts > 0 {
            hosts.to_string()
        } else {
            "-".into()
        },
        t.energy_j / 3.6e6,
        100.0 * (1.0 - t.energy_j / t.no_parking_j.max(1e-9)),
        100.0 * t.exceeded as f64 / t.intervals.max(1) as f64,
        t.delayed_core_s / 3600.0,
        t.unparked_sum / t.intervals.max(1) as f64,
        t.changes as f64 / host_days.max(1e-9)
    );
}

fn schedstat_run_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let s = std::fs::read_to_string(task?.path().join("schedstat"))?;
        total += s
            .split_whitespace()
            .next()
            .unwrap_or("0")
            .parse::<u64>()
            .unwrap_or(0);
    }
    Ok(total)
}

/// Runs the real daemon at a 100 ms interval over 4 stand-in VMs (2 vCPU threads each, 5 % busy)
/// and reads its CPU time from schedstat.
fn daemon_cost(args: &BenchParkArgs) -> anyhow::Result<()> {
    let tern = match &args.tern {
        Some(t) => t.clone(),
        None => {
            let st = Command::new(env!("CARGO"))
                .args(["build", "--release", "--quiet", "-p", "tern"])
                .status()?;
            anyhow::ensure!(st.success(), "building tern failed");
            PathBuf::from("target/release/tern")
        }
    };
    let dir = std::env::temp_dir().join(format!("tern-bench-park-{}", std::process::id()));
    let runtime = dir.join("vms");
    // 0700: the daemon's control socket goes into `dir`, which must be private.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&runtime)?;
    let mut loads = Vec::new();
    for i in 0..4 {
        let mut c = Command::new(&tern)
            .args([
                "park",
                "load",
                "--name",
                &format!("bench{i}"),
                "--threads",
                "2",
                "--busy",
                "5",
            ])
            .arg("--runtime-dir")
            .arg(&runtime)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(c.stdout.take().context("load stdout")?).read_line(&mut line)?;
        loads.push(c);
    }
    let socket = dir.join("park.sock");
    let mut d = Command::new(&tern)
        .args(["park", "run", "--interval-ms", "100", "--runtime-dir"])
        .arg(&runtime)
        .arg("--socket")
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(1));
    // The peer: an empty loop that wakes every 100 ms and does nothing — the floor any daemon pays
    // for its timer on this host.
    let secs = args.daemon_seconds;
    let floor = std::thread::spawn(move || {
        let me = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
        let start: u64 = me
            .split_whitespace()
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        let t = Instant::now();
        let mut next = t;
        while t.elapsed() < Duration::from_secs(secs) {
            next += Duration::from_millis(100);
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        let me = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
        let end: u64 = me
            .split_whitespace()
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        (end - start) as f64 / (t.elapsed().as_secs_f64() / 0.1)
    });
    let r0 = schedstat_run_ns(d.id())?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(args.daemon_seconds));
    let r1 = schedstat_run_ns(d.id())?;
    let wall = t0.elapsed();
    let floor_ns = floor
        .join()
        .map_err(|_| anyhow::anyhow!("floor thread panicked"))?;
    let checks = wall.as_secs_f64() / 0.1;
    let _ = Command::new("kill").arg(d.id().to_string()).status();
    let _ = d.wait();
    for mut l in loads {
        let _ = l.kill();
        let _ = l.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let cpu = (r1 - r0) as f64;
    println!(
        "daemon ({}, 100 ms interval, 4 VMs × 2 vCPU threads, {} s): {:.1} µs CPU per check, {:.4} % of one core (goal < 0.1 %)",
        tern.display(),
        args.daemon_seconds,
        cpu / checks / 1000.0,
        100.0 * cpu / wall.as_nanos() as f64
    );
    println!(
        "peer: an empty 100 ms timer loop on this host: {:.1} µs CPU per wake-up, {:.4} % of one core (daemon / empty loop = {:.2}×)",
        floor_ns / 1000.0,
        100.0 * floor_ns / 1e8,
        (cpu / checks) / floor_ns.max(1.0)
    );
    Ok(())
}

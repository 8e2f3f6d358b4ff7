//! `tern sim …`: the data-centre simulator (runs and sweeps of consolidation policies over traces).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use tern_policy::{Model, PolicySpec, REFERENCE_POLICIES};
use tern_sim::report::model_name;
use tern_sim::{SimConfig, TraceSet, Workload, plot, simulate, sweep, synth};

/// Subcommands of `tern sim`.
#[derive(Debug, clap::Subcommand)]
pub enum SimCommand {
    /// Simulate one day (or one synthetic data centre) under one policy and print its metrics.
    Run(RunArgs),
    /// Simulate days × policies in parallel; print the paper-style table of medians and a CSV.
    Sweep(SweepArgs),
}

/// Where the traces are and how to read them.
#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// PlanetLab traces: a folder of day folders, or the `traces.tar.xz` as shipped
    /// [default: data/planetlab/traces.tar.xz of this repository]
    #[arg(long, value_name = "PATH")]
    traces: Option<PathBuf>,
    /// Simulation semantics: `cloudsim` reproduces CloudSim 3.0.3, `paper` follows the paper's text
    /// (docs/sim.md lists every difference).
    #[arg(long, default_value = "cloudsim", value_parser = parse_model)]
    model: Model,
    /// Number of hosts (half HP ML110 G4, half G5, alternating).
    #[arg(long, default_value_t = 800)]
    hosts: usize,
    /// Seed for the random VM selection (RS) and for synthetic traces.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// `tern sim run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    t: TraceArgs,
    /// Day folder (YYYYMMDD), e.g. 20110303.
    #[arg(long, required_unless_present = "synthetic")]
    day: Option<String>,
    /// Policy: npa, dvfs, or DETECTOR-SELECTION-PARAM with DETECTOR thr|iqr|mad|lr|lrr and SELECTION
    /// mmt|rs|mc|mu, e.g. lr-mmt-1.2, mad-rs-2.0.
    #[arg(long, value_parser = parse_policy)]
    policy: PolicySpec,
    /// Replay a file order (one trace name per line), e.g.
    /// data/planetlab/cloudsim-listfiles-order/20110303.txt; default: sorted names.
    #[arg(long, value_name = "FILE")]
    trace_order: Option<PathBuf>,
    /// Instead of traces, a synthetic data centre with this many VMs (PlanetLab-like traces from
    /// --seed; use --hosts for the host count), e.g. --hosts 20000 --synthetic 40000.
    #[arg(long, value_name = "VMS", conflicts_with_all = ["day", "trace_order"])]
    synthetic: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also print wall time, CPU time and peak resident memory of this process on stderr.
    #[arg(long)]
    resources: bool,
}

/// `tern sim sweep`.
#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    #[command(flatten)]
    t: TraceArgs,
    /// Days to run (comma-separated), or `all`.
    #[arg(long, default_value = "all")]
    days: String,
    /// Policies (comma-separated), or `reference` for npa, dvfs, thr-mmt-1.0, thr-mmt-0.8,
    /// iqr-mmt-1.5, mad-mmt-2.5, lrr-mmt-1.2, lr-mmt-1.2.
    #[arg(long, default_value = "reference")]
    policies: String,
    /// Folder of per-day order files (<day>.txt) to replay, e.g.
    /// data/planetlab/cloudsim-listfiles-order; default: sorted names.
    #[arg(long, value_name = "DIR")]
    trace_order: Option<PathBuf>,
    /// Write all runs as CSV to this file (`-` for stdout, the default prints it after the table).
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Write SVG plots to this folder: active hosts, power and migrations over the first day, and
    /// ESV per policy as a box plot.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Also print wall time, CPU time and peak resident memory of this process on stderr.
    #[arg(long)]
    resources: bool,
}

fn parse_model(s: &str) -> Result<Model, String> {
    s.parse()
        .map_err(|e: tern_policy::ParsePolicyError| e.to_string())
}

fn parse_policy(s: &str) -> Result<PolicySpec, String> {
    s.parse()
        .map_err(|e: tern_policy::ParsePolicyError| e.to_string())
}

fn default_traces() -> PathBuf {
    let local = PathBuf::from("data/planetlab/traces.tar.xz");
    if local.exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/planetlab/traces.tar.xz")
}

fn open_traces(t: &TraceArgs) -> anyhow::Result<TraceSet> {
    let path = t.traces.clone().unwrap_or_else(default_traces);
    TraceSet::open(&path).with_context(|| format!("opening traces {}", path.display()))
}

pub fn run(cmd: SimCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SimCommand::Run(a) => run_one(a),
        SimCommand::Sweep(a) => run_sweep(a),
    }
}

fn check_hosts(n: usize) -> anyhow::Result<()> {
    if n == 0 {
        bail!("--hosts must be at least 1");
    }
    Ok(())
}

/// Wall time, CPU seconds and peak RSS (kB) of this process, read from /proc/self.
fn resources(start: Instant) -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // fields after the command name: state is field 3, utime 14, stime 15 (clock ticks of 1/100 s)
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    let cpu_s = (ticks(11) + ticks(12)) as f64 / 100.0;
    format!(
        "resources: wall_s={:.3} cpu_s={cpu_s:.2} peak_rss_kb={hwm}",
        start.elapsed().as_secs_f64()
    )
}

fn run_one(a: RunArgs) -> anyhow::Result<ExitCode> {
    let process_start = Instant::now();
    check_hosts(a.t.hosts)?;
    let w = match a.synthetic {
        Some(vms) => synth::workload(a.t.hosts, vms, a.t.seed, a.t.model),
        None => {
            let day = a.day.as_deref().unwrap_or_default();
            let path = a.t.traces.clone().unwrap_or_else(default_traces);
            let set = TraceSet::open_day(&path, day)
                .with_context(|| format!("opening traces {}", path.display()))?;
            let d = set.load_day(day, a.trace_order.as_deref())?;
            Workload::benchmark(day, a.t.hosts, d.samples, a.t.model)
        }
    };
    let start = Instant::now();
    let r = simulate(
        &w,
        &SimConfig {
            policy: a.policy,
            model: a.t.model,
            seed: a.t.seed,
            timeline: false,
        },
    );
    let wall = start.elapsed().as_secs_f64();
    if r.unplaced_vms > 0 {
        eprintln!(
            "tern: warning: {} of {} VMs found no host at the start (too few hosts) and were left out",
            r.unplaced_vms,
            w.vms.len()
        );
    }
    if a.json {
        println!("{}", r.to_json());
    } else {
        println!(
            "{} {} ({} model, {} hosts, {} VMs) in {wall:.3} s",
            r.workload,
            r.policy,
            model_name(r.model),
            w.hosts.len(),
            w.vms.len()
        );
        println!("  energy          {:.2} kWh", r.energy_kwh);
        println!("  migrations      {}", r.migrations);
        println!("  SLATAH          {:.2} %", r.slatah_pct);
        println!("  PDM             {:.3} %", r.pdm_pct);
        println!("  SLAV            {:.3e}", r.slav);
        println!("  ESV             {:.3e}", r.esv);
        println!("  host shutdowns  {}", r.host_shutdowns);
        println!("  overall CPU under-allocation {:.3} %", r.sla_overall_pct);
    }
    if a.resources {
        eprintln!("{}", resources(process_start));
    }
    Ok(ExitCode::SUCCESS)
}

fn run_sweep(a: SweepArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    check_hosts(a.t.hosts)?;
    let set = open_traces(&a.t)?;
    let days: Vec<String> = if a.days == "all" {
        set.days()?
    } else {
        a.days
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    if days.is_empty() {
        bail!("no days to run");
    }
    let names: Vec<&str> = if a.policies == "reference" {
        REFERENCE_POLICIES.to_vec()
    } else {
        a.policies
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    };
    let policies = names
        .iter()
        .map(|p| parse_policy(p).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut workloads = Vec::with_capacity(days.len());
    for day in &days {
        let order = a.trace_order.as_ref().map(|d| d.join(format!("{day}.txt")));
        let d = set.load_day(day, order.as_deref())?;
        workloads.push(Workload::benchmark(day, a.t.hosts, d.samples, a.t.model));
    }
    let load_s = start.elapsed().as_secs_f64();
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let reports = sweep::run(
        &workloads,
        &policies,
        a.t.model,
        a.t.seed,
        threads,
        a.plot.is_some(),
    );
    let total_s = start.elapsed().as_secs_f64();
    let summaries = sweep::summarize(&reports);
    println!(
        "{} days × {} policies, {} model, {threads} threads: {total_s:.2} s ({load_s:.2} s loading traces)\n",
        days.len(),
        policies.len(),
        model_name(a.t.model)
    );
    print!("{}", sweep::table(&summaries));
    let csv = sweep::csv(&reports);
    match &a.csv {
        Some(p) if p.as_os_str() != "-" => {
            std::fs::write(p, &csv).with_context(|| format!("writing {}", p.display()))?;
            println!("\nCSV written to {}", p.display());
        }
        _ => print!("\n{csv}"),
    }
    if let Some(dir) = &a.plot {
        write_plots(dir, &reports, &days[0])?;
        println!("plots written to {}", dir.display());
    }
    if a.resources {
        eprintln!("{}", resources(start));
    }
    Ok(ExitCode::SUCCESS)
}

fn write_plots(dir: &Path, reports: &[tern_sim::Report], day: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let first: Vec<&tern_sim::Report> = reports.iter().filter(|r| r.workload == day).collect();
    let series = |f: &dyn Fn(&tern_sim::Timeline, usize) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        first
            .iter()
            .filter_map(|r| {
                let tl = r.timeline.as_ref()?;
                Some((
                    r.policy.clone(),
                    (0..tl.t_s.len())
                        .map(|i| (tl.t_s[i] / 3600.0, f(tl, i)))
                        .collect(),
                ))
            })
            .collect()
    };
    let files = [
        (
            "active_hosts.svg",
            plot::lines(
                &format!("Active hosts, {day}"),
                "hour",
                "hosts",
                &series(&|tl, i| tl.active_hosts[i] as f64),
            ),
        ),
        (
            "power.svg",
            plot::lines(
                &format!("Data-centre power, {day}"),
                "hour",
                "kW",
                &series(&|tl, i| tl.power_w[i] / 1000.0),
            ),
        ),
        (
            "migrations.svg",
            plot::lines(
                &format!("Migrations per step, {day}"),
                "hour",
                "migrations",
                &series(&|tl, i| tl.migrations[i] as f64),
            ),
        ),
    ];
    let mut groups: Vec<(String, Vec<f64>)> = Vec::new();
    for r in reports
        .iter()
        .filter(|r| r.policy != "npa" && r.policy != "dvfs")
    {
        match groups.iter_mut().find(|g| g.0 == r.policy) {
            Some(g) => g.1.push(r.esv * 1e3),
            None => groups.push((r.policy.clone(), vec![r.esv * 1e3])),
        }
    }
    let esv = plot::boxes("ESV per policy over the days (×10⁻³)", "ESV ×10⁻³", &groups);
    for (name, svg) in files
        .iter()
        .map(|(n, s)| (*n, s.as_str()))
        .chain([("esv_boxplot.svg", esv.as_str())])
    {
        let p = dir.join(name);
        std::fs::write(&p, svg).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

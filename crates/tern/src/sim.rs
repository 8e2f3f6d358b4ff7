//! `tern sim …`: the data-centre simulator (runs and sweeps of consolidation policies over traces).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use tern_policy::{Model, PolicySpec, REFERENCE_POLICIES};
use tern_sim::report::model_name;
use tern_sim::{SimConfig, TraceOrder, TraceSet, Workload, plot, simulate, sweep, synth};

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
    /// PlanetLab traces: a folder of day folders, or a `.tar.xz` like the one shipped (a relative
    /// path is taken from the current directory) [default: the ten PlanetLab days built into tern]
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
    /// Which trace goes to which VM (VM types come in four blocks of this order): `cloudsim`
    /// (CloudSim 3.0.3's recorded file order, built in), `sorted` (sorted file names), or an order
    /// file (one trace name per line; a folder means FOLDER/DAY.txt) [default: `cloudsim` with
    /// --model cloudsim, `sorted` with --model paper]
    #[arg(long, value_name = "cloudsim|sorted|FILE")]
    trace_order: Option<String>,
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
    /// Which trace goes to which VM: `cloudsim` (CloudSim 3.0.3's recorded file order, built in),
    /// `sorted` (sorted file names), or a folder of order files DIR/DAY.txt [default: `cloudsim` with
    /// --model cloudsim, `sorted` with --model paper]
    #[arg(long, value_name = "cloudsim|sorted|DIR")]
    trace_order: Option<String>,
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

/// A path as given, and where it resolves to when relative (for error messages).
fn tried(path: &Path) -> String {
    if path.is_absolute() {
        return path.display().to_string();
    }
    match std::env::current_dir() {
        Ok(cwd) => format!("{} (= {})", path.display(), cwd.join(path).display()),
        Err(_) => path.display().to_string(),
    }
}

/// The traces: `--traces PATH`, or the copy built into the binary. `day` limits the decompression of
/// an archive to that day.
fn open_traces(t: &TraceArgs, day: Option<&str>) -> anyhow::Result<TraceSet> {
    match &t.traces {
        Some(path) => match day {
            Some(day) => TraceSet::open_day(path, day),
            None => TraceSet::open(path),
        }
        .with_context(|| format!("opening traces {}", tried(path))),
        None => match day {
            Some(day) => TraceSet::bundled_day(day),
            None => TraceSet::bundled(),
        }
        .context("opening the built-in traces"),
    }
}

/// The order a `--trace-order` value names for `day` (a folder holds DAY.txt files), or the
/// model's default: CloudSim's recorded order with `--model cloudsim` for the days it was recorded
/// for, sorted names otherwise.
fn trace_order(arg: Option<&str>, model: Model, day: &str) -> anyhow::Result<TraceOrder> {
    Ok(match arg {
        Some("cloudsim") => TraceOrder::CloudSim,
        Some("sorted") => TraceOrder::Sorted,
        Some(path) => {
            let path = PathBuf::from(path);
            let meta = std::fs::metadata(&path).with_context(|| {
                format!(
                    "reading --trace-order {} (not `cloudsim`, `sorted` or an existing file or folder)",
                    tried(&path)
                )
            })?;
            if meta.is_dir() {
                TraceOrder::File(path.join(format!("{day}.txt")))
            } else {
                TraceOrder::File(path)
            }
        }
        None => match model {
            Model::CloudSim if tern_sim::bundled::cloudsim_order(day).is_some() => {
                TraceOrder::CloudSim
            }
            _ => TraceOrder::Sorted,
        },
    })
}

fn load_day(set: &TraceSet, day: &str, order: &TraceOrder) -> anyhow::Result<tern_sim::DayTraces> {
    set.load_day(day, order).with_context(|| match order {
        TraceOrder::File(p) => format!("loading day {day} in the order of {}", tried(p)),
        _ => format!("loading day {day} ({order})"),
    })
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
    let (w, order) = match a.synthetic {
        Some(vms) => (
            synth::workload(a.t.hosts, vms, a.t.seed, a.t.model),
            format!("synthetic traces, seed {}", a.t.seed),
        ),
        None => {
            let day = a.day.as_deref().unwrap_or_default();
            let order = trace_order(a.trace_order.as_deref(), a.t.model, day)?;
            let set = open_traces(&a.t, Some(day))?;
            let d = load_day(&set, day, &order)?;
            (
                Workload::benchmark(day, a.t.hosts, d.samples, a.t.model),
                order.to_string(),
            )
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
            "{} {} ({} model, {} hosts, {} VMs, {order}) in {wall:.3} s",
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
    let set = open_traces(&a.t, None)?;
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
    if let Some(o) = a.trace_order.as_deref()
        && o != "cloudsim"
        && o != "sorted"
        && !Path::new(o).is_dir()
    {
        bail!(
            "--trace-order {} is not `cloudsim`, `sorted` or a folder of DAY.txt order files",
            tried(Path::new(o))
        );
    }
    let mut workloads = Vec::with_capacity(days.len());
    let mut orders: Vec<String> = Vec::new();
    for day in &days {
        let order = trace_order(a.trace_order.as_deref(), a.t.model, day)?;
        let d = load_day(&set, day, &order)?;
        workloads.push(Workload::benchmark(day, a.t.hosts, d.samples, a.t.model));
        let label = match &order {
            TraceOrder::File(_) => format!(
                "order files from {}",
                a.trace_order.as_deref().unwrap_or_default()
            ),
            o => o.to_string(),
        };
        if !orders.contains(&label) {
            orders.push(label);
        }
    }
    let load_s = start.elapsed().as_secs_f64();
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // a bar on a terminal, nothing when stderr is piped or redirected
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new((workloads.len() * policies.len()) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "simulating {bar:30} {pos}/{len} runs ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let reports = sweep::run_with_progress(
        &workloads,
        &policies,
        a.t.model,
        a.t.seed,
        threads,
        a.plot.is_some(),
        &|done, _| {
            if let Some(b) = &bar {
                b.set_position(done as u64);
            }
        },
    );
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let total_s = start.elapsed().as_secs_f64();
    let summaries = sweep::summarize(&reports);
    println!(
        "{} days × {} policies, {} model, {}, {threads} threads: {total_s:.2} s ({load_s:.2} s loading traces)\n",
        days.len(),
        policies.len(),
        model_name(a.t.model),
        orders.join(" / ")
    );
    print!("{}", sweep::table(&summaries));
    let csv = sweep::csv(&reports);
    match &a.csv {
        Some(p) if p.as_os_str() != "-" => {
            std::fs::write(p, &csv).with_context(|| format!("writing {}", p.display()))?;
            println!(
                "\nCSV written to {}",
                std::path::absolute(p)
                    .unwrap_or_else(|_| p.clone())
                    .display()
            );
        }
        _ => print!("\n{csv}"),
    }
    if let Some(dir) = &a.plot {
        println!("\nplots of {} (and ESV over all days) written to:", days[0]);
        for p in write_plots(dir, &reports, &days[0])? {
            println!("  {}", p.display());
        }
    }
    if a.resources {
        eprintln!("{}", resources(start));
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the SVG plots into `dir` and returns their paths.
fn write_plots(
    dir: &Path,
    reports: &[tern_sim::Report],
    day: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", tried(dir)))?;
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
    let hours = plot::LinearAxis::fixed(24.0, 6.0);
    // NPA keeps every host at full power all day: drawn, it would squash the other panels' axes,
    // so the title gives its constant value instead
    let day_plot = |title: &str, ylabel: &str, f: &dyn Fn(&tern_sim::Timeline, usize) -> f64| {
        let mut all = series(f);
        let npa = all.iter().position(|s| s.0 == "npa").map(|i| all.remove(i));
        let title = match npa.as_ref().and_then(|s| s.1.first()) {
            Some(&(_, v)) => format!("{title}, {day} (NPA, not drawn: {v:.1} all day)"),
            None => format!("{title}, {day}"),
        };
        plot::small_multiples(&title, "hour of the day", ylabel, &hours, &all)
    };
    let mut groups: Vec<(String, Vec<f64>)> = Vec::new();
    for r in reports
        .iter()
        .filter(|r| r.policy != "npa" && r.policy != "dvfs")
    {
        match groups.iter_mut().find(|g| g.0 == r.policy) {
            Some(g) => g.1.push(r.esv),
            None => groups.push((r.policy.clone(), vec![r.esv])),
        }
    }
    let days = reports
        .iter()
        .map(|r| r.workload.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let files = [
        (
            "active_hosts.svg",
            day_plot("Active hosts", "active hosts", &|tl, i| {
                tl.active_hosts[i] as f64
            }),
        ),
        (
            "power.svg",
            day_plot("Data-centre power", "power (kW)", &|tl, i| {
                tl.power_w[i] / 1000.0
            }),
        ),
        (
            "migrations.svg",
            day_plot(
                "VM migrations started per 5-minute step",
                "migrations",
                &|tl, i| tl.migrations[i] as f64,
            ),
        ),
        (
            "esv_boxplot.svg",
            plot::boxes(
                &format!("ESV per policy over {days} day(s)"),
                "policy",
                "ESV (energy × SLAV)",
                &groups,
            ),
        ),
    ];
    let mut written = Vec::with_capacity(files.len());
    for (name, svg) in files {
        let p = dir.join(name);
        std::fs::write(&p, svg).with_context(|| format!("writing {}", tried(&p)))?;
        written.push(std::path::absolute(&p).unwrap_or(p));
    }
    Ok(written)
}

//! `tern park …`: the core-parking daemon, its control commands, trace replay and a load generator.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use tern_parking::daemon::{self, DaemonConfig, DemandSource, Request, Signals, Status};
use tern_parking::knobs::{KNOB_NAMES, Knobs, Plan};
use tern_parking::power::PowerSpec;
use tern_parking::replay::{self, Strategy};
use tern_parking::runtime::{DEFAULT_RUNTIME_DIR, RuntimeEntry, write_entry};
use tern_parking::telemetry::HostPaths;
use tern_parking::topology::{format_cpus, parse_cpu_list};

/// Subcommands of `tern park`.
#[derive(Debug, clap::Subcommand)]
pub enum ParkCommand {
    /// Run the parking daemon for this host until SIGINT/SIGTERM (then every affinity is restored).
    Run(Box<RunArgs>),
    /// Show the running daemon's state: unparked cores, busy %, where vCPU threads sit, power saved.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Change knobs of the running daemon (all or nothing), e.g. `tern park set headroom=30`.
    Set {
        /// KNOB=VALUE assignments.
        #[arg(required = true, value_name = "KNOB=VALUE")]
        assignments: Vec<String>,
        /// The daemon's control socket.
        #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Run the policy over a utilisation trace: cores unparked over time, energy against no
    /// parking, and the added delay.
    Replay(Box<ReplayArgs>),
    /// A stand-in for a VM: a process with busy/idle "vCPU" threads that registers itself in the
    /// runtime directory. SIGUSR1 switches it to 100 % busy, SIGUSR2 back.
    Load(LoadArgs),
}

/// Policy knobs shared by `run` and `replay`.
#[derive(Debug, clap::Args)]
pub struct KnobArgs {
    /// Start from a plan: balanced, high-performance, power-saver.
    #[arg(long, default_value = "balanced")]
    plan: String,
    /// A power-plan file (`key = value` lines; `plan = NAME` first picks the base).
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Check interval in milliseconds (the `interval_ms` knob).
    #[arg(long)]
    interval_ms: Option<u32>,
    /// Knob assignments applied last.
    #[arg(value_name = "KNOB=VALUE", help = format!("Knob assignments applied last. Knobs: {KNOB_NAMES}"))]
    knobs: Vec<String>,
}

impl KnobArgs {
    fn resolve(&self) -> anyhow::Result<Knobs> {
        let mut knobs = match &self.policy {
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read policy file {}", file.display()))?;
                Knobs::from_plan_file(&text)
                    .with_context(|| format!("policy file {}", file.display()))?
            }
            None => Plan::parse(&self.plan)?.knobs(),
        };
        let mut all = self.knobs.clone();
        if let Some(ms) = self.interval_ms {
            all.push(format!("interval_ms={ms}"));
        }
        knobs.apply_assignments(&all)?;
        Ok(knobs)
    }
}

/// Power model options shared by `run` and `replay`.
#[derive(Debug, clap::Args)]
pub struct PowerArgs {
    /// Host power curve: `auto` (the SPECpower server nearest in core count to this host, or to
    /// `--cores` for replay), `linear:IDLE_W:PEAK_W`, or `specpower:MODEL` (CloudSim's tables).
    #[arg(long, default_value = "auto")]
    power_model: String,
    /// Power of one core in the shallow idle state (C1) an unparked idle core keeps waking into,
    /// watts; default: the published figure for the model's CPU (docs/parking.md).
    #[arg(long, value_name = "W")]
    core_shallow_w: Option<f64>,
    /// Power of one parked core in its deepest per-core state (C6), watts; default: the CPU's.
    #[arg(long, value_name = "W")]
    core_deep_w: Option<f64>,
    /// Share (0–1) of an unparked core's idle time spent in the shallow state under load;
    /// default: the CPU's.
    #[arg(long, value_name = "SHARE")]
    shallow_share: Option<f64>,
}

impl PowerArgs {
    /// The spec, checked (curve name, figures) before anything starts.
    fn resolve(&self) -> anyhow::Result<PowerSpec> {
        let spec = PowerSpec {
            curve: self.power_model.clone(),
            shallow_w: self.core_shallow_w,
            deep_w: self.core_deep_w,
            shallow_share: self.shallow_share,
        };
        spec.resolve(1)?;
        Ok(spec)
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    knobs: KnobArgs,
    #[command(flatten)]
    power: PowerArgs,
    /// The VMM runtime directory listing running VMs (`NAME.json`).
    #[arg(long, default_value = DEFAULT_RUNTIME_DIR)]
    runtime_dir: PathBuf,
    /// Control socket for `status` and `set` (created 0600; its directory must be 0700 and
    /// yours, or missing).
    #[arg(long, default_value = daemon::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// A uid allowed on the control socket besides the daemon's own (SO_PEERCRED); repeat for
    /// more. Default: the daemon's own uid and root. Once given, root is allowed only if listed.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uid: Vec<u32>,
    /// Manage only these CPUs (kernel list, e.g. `0-3`); default all online.
    #[arg(long)]
    cpus: Option<String>,
    /// A cgroup directory whose `cpuset.cpus` follows the unparked set (restored on stop).
    #[arg(long, value_name = "DIR")]
    cpuset: Option<PathBuf>,
    /// Move movable IRQs onto the unparked CPUs (restored on stop).
    #[arg(long)]
    irq: bool,
    /// Set KVM's halt_poll_ns to this while running (restored on stop).
    #[arg(long, value_name = "NS")]
    halt_poll_ns: Option<u64>,
    /// Root of /proc (for tests).
    #[arg(long, default_value = "/proc", hide = true)]
    proc_root: PathBuf,
    /// Root of /sys (for tests).
    #[arg(long, default_value = "/sys", hide = true)]
    sys_root: PathBuf,
    /// What counts as demand: `vcpu` (run time of the VMs' vCPU threads) or `host` (all of /proc/stat).
    #[arg(long, default_value = "vcpu", value_parser = ["vcpu", "host"])]
    demand: String,
    /// Log every interval.
    #[arg(long, short)]
    verbose: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Trace file: one line per check interval (`interval_ms`, 100 ms unless set), each line the
    /// utilisation of every VM in % of one core, separated by spaces or commas; `#` starts a
    /// comment. Format and a sample: docs/parking.md, data/parking/sample-trace.txt.
    #[arg(long, value_name = "FILE")]
    trace: PathBuf,
    /// Cores of the host.
    #[arg(long, default_value_t = 4)]
    cores: usize,
    #[command(flatten)]
    knobs: KnobArgs,
    #[command(flatten)]
    power: PowerArgs,
    /// Print JSON (timeline and summaries).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Name of the stand-in VM (its runtime entry is NAME.json).
    #[arg(long)]
    name: String,
    /// Number of "vCPU" threads.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Busy % of each thread.
    #[arg(long, default_value_t = 10)]
    busy: u32,
    /// Runtime directory to register in.
    #[arg(long, default_value = DEFAULT_RUNTIME_DIR)]
    runtime_dir: PathBuf,
}

pub fn run(cmd: ParkCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ParkCommand::Run(args) => run_daemon(*args),
        ParkCommand::Status { json, socket } => {
            let status = ask(&socket, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(ExitCode::SUCCESS)
        }
        ParkCommand::Set {
            assignments,
            socket,
        } => {
            let status = ask(&socket, &Request::Set { assignments })?;
            println!(
                "{}",
                status.knobs.to_plan_file().trim_end().replace('\n', ", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        ParkCommand::Replay(args) => replay_cmd(*args),
        ParkCommand::Load(args) => load(args),
    }
}

fn ask(socket: &std::path::Path, req: &Request) -> anyhow::Result<Status> {
    let resp = daemon::request(socket, req)?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_else(|| "request refused".into()));
    }
    resp.status.context("the daemon sent no status")
}

fn run_daemon(args: RunArgs) -> anyhow::Result<ExitCode> {
    let knobs = args.knobs.resolve()?;
    let power = args.power.resolve()?;
    let cpus = match &args.cpus {
        Some(s) => Some(parse_cpu_list(s).with_context(|| format!("bad CPU list `{s}`"))?),
        None => None,
    };
    if cpus.as_ref().is_some_and(|c| c.is_empty()) {
        bail!("--cpus must name at least one CPU");
    }
    let peers = tern_vmctl::local::PeerPolicy::owner_and(&args.allow_uid);
    daemon::run(
        DaemonConfig {
            knobs,
            paths: HostPaths {
                proc_root: args.proc_root,
                sys_root: args.sys_root,
            },
            runtime_dir: args.runtime_dir,
            socket: args.socket,
            cpus,
            cpuset_dir: args.cpuset,
            irq: args.irq,
            halt_poll_ns: args.halt_poll_ns,
            power,
            demand: if args.demand == "host" {
                DemandSource::Host
            } else {
                DemandSource::Vcpu
            },
            verbose: args.verbose,
        },
        peers,
    )?;
    Ok(ExitCode::SUCCESS)
}

fn print_status(s: &Status) {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "interval {} ({} ms): unparked {} ({} of {} CPUs) since interval {} ({:?}); demand {:.2} cores",
        s.interval,
        s.knobs.interval_ms,
        format_cpus(&s.unparked),
        s.unparked.len(),
        s.cpus.len(),
        s.last_change_interval,
        s.last_reason,
        s.demand
    );
    let _ = writeln!(
        o,
        "power estimate: {:.1} W (no parking {:.1} W, saving {:.1} W); saved so far {:.1} J",
        s.power_w,
        s.power_no_parking_w,
        s.power_no_parking_w - s.power_w,
        s.energy_saved_j
    );
    let _ = writeln!(o, "{}", s.power_model);
    let _ = writeln!(
        o,
        "{:>6}  {:<8} {:>6}  idle residency",
        "cpu", "state", "busy%"
    );
    for c in &s.cpus {
        let res: Vec<String> = c
            .idle_residency_pct
            .iter()
            .map(|(n, p)| format!("{n} {p:.0}%"))
            .collect();
        let _ = writeln!(
            o,
            "{:>6}  {:<8} {:>6.1}  {}",
            format!("cpu{}", c.cpu),
            if c.parked { "parked" } else { "unparked" },
            c.busy_pct,
            if res.is_empty() {
                "-".into()
            } else {
                res.join(", ")
            }
        );
    }
    for vm in &s.vms {
        for t in &vm.threads {
            let last = t.last_cpu.map_or("-".into(), |c| format!("cpu{c}"));
            let _ = writeln!(
                o,
                "vm {} (pid {}) thread {}: on {last}, allowed CPUs {}",
                vm.name, vm.pid, t.tid, t.allowed
            );
        }
    }
    for sk in &s.recent_skips {
        let _ = writeln!(o, "skipped {}: {}", sk.what, sk.why);
    }
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), o.as_bytes());
}

fn replay_cmd(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    if args.cores == 0 {
        bail!("--cores must be at least 1");
    }
    let knobs = args.knobs.resolve()?;
    let (model, model_line) = args.power.resolve()?.resolve(args.cores)?;
    let text = std::fs::read_to_string(&args.trace)
        .with_context(|| format!("cannot read trace {}", args.trace.display()))?;
    let demands =
        replay::parse_trace(&text).with_context(|| format!("trace {}", args.trace.display()))?;
    let dt = f64::from(knobs.interval_ms) / 1000.0;
    let (steps, ours) = replay::replay(&demands, dt, Strategy::Policy(knobs), model.clone());
    let (_, naive) = replay::replay(&demands, dt, Strategy::Naive { threshold_pct: 50 }, model);
    if args.json {
        let v = serde_json::json!({
            "power_model": model_line,
            "timeline": steps,
            "policy": ours,
            "naive_50": naive,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{model_line}");
    println!(
        "{:>6} {:>8} {:>8} {:>8}",
        "t", "demand", "unparked", "power_w"
    );
    for (i, s) in steps.iter().enumerate() {
        if i == 0 || s.unparked != steps[i - 1].unparked || i + 1 == steps.len() {
            println!(
                "{:>6} {:>8.2} {:>8} {:>8.1}",
                i, s.demand, s.unparked, s.power_w
            );
        }
    }
    for (name, s) in [("policy", &ours), ("naive <50% rule", &naive)] {
        println!(
            "{name}: energy {:.1} J vs {:.1} J with no parking ({:.2} % saved); mean unparked {:.2} of {}; \
             demand exceeded unparked capacity in {} of {} intervals ({:.2} %); added delay {:.3} core-s; {} changes",
            s.energy_j,
            s.energy_no_parking_j,
            s.saved_pct(),
            s.mean_unparked,
            args.cores,
            s.exceeded_intervals,
            s.intervals,
            100.0 * s.exceeded_fraction(),
            s.delayed_core_s,
            s.changes
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    if args.threads == 0 || args.threads > 256 {
        bail!("--threads must be within 1..=256");
    }
    if args.busy > 100 {
        bail!("--busy must be within 0..=100");
    }
    let signals = Signals::block(&[
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ])
    .context("cannot set up signal handling")?;
    let busy = Arc::new(AtomicU32::new(args.busy));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let mut handles = Vec::new();
    for i in 0..args.threads {
        let (busy, stop, tx) = (busy.clone(), stop.clone(), tx.clone());
        let h = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || {
                let _ = tx.send(nix::unistd::gettid().as_raw() as u32);
                let period = Duration::from_millis(10);
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let on = period * busy.load(Ordering::Relaxed) / 100;
                    while start.elapsed() < on {
                        std::hint::spin_loop();
                    }
                    if let Some(rest) = period.checked_sub(start.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
            })?;
        handles.push(h);
    }
    drop(tx);
    let mut tids: Vec<u32> = rx.iter().take(args.threads as usize).collect();
    tids.sort_unstable();
    let entry = RuntimeEntry::new(args.name.clone(), std::process::id(), tids.clone());
    let path = write_entry(&args.runtime_dir, &entry).with_context(|| {
        format!(
            "cannot write runtime entry in {}",
            args.runtime_dir.display()
        )
    })?;
    println!("load {} pid {} tids {:?}", args.name, entry.pid, tids);
    loop {
        match signals.wait(Duration::from_secs(3600)) {
            Some(Signal::SIGUSR1) => busy.store(100, Ordering::Relaxed),
            Some(Signal::SIGUSR2) => busy.store(args.busy, Ordering::Relaxed),
            Some(_) => break,
            None => {}
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = std::fs::remove_file(&path);
    for h in handles {
        let _ = h.join();
    }
    Ok(ExitCode::SUCCESS)
}

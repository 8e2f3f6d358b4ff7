//! `cargo xtask bench migrate`: live migration of the same test guest ELF and workloads under
//! Tern and under QEMU with KVM (`-M microvm`, `-incoming tcp:…`, `migrate` over QMP; QEMU's
//! defaults and with max-bandwidth 10 GB/s), on loopback, several runs each, medians.
//!
//! Guest-visible pause: `maxgap_us` of the first heartbeat the target prints (`tern.hb_ms=50`;
//! the guest's TSC keeps real time through the pause under both VMMs), cross-checked by the
//! host-timed gap between the last source heartbeat line and the first target line. Also total
//! time, bytes sent and rounds (Tern: rounds; QEMU: dirty-sync count).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use crate::bench_common::{build_release_tern, export_testguest, peer_version, scratch_dir};
use anyhow::{Context, bail, ensure};

/// Options of `cargo xtask bench migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Runs per VMM, configuration and workload.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// Give up on a QEMU migration after this many seconds (it may never converge).
    #[arg(long, default_value_t = 30)]
    pub qemu_timeout_s: u64,
    /// Only these workloads (idle, moderate, max); default all.
    #[arg(long)]
    pub workload: Vec<String>,
}

struct Workload {
    name: &'static str,
    label: &'static str,
    memory_mib: u64,
    cmdline: &'static str,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "idle",
        label: "idle 1 GiB",
        memory_mib: 1024,
        cmdline: "tern.hb_ms=50",
    },
    Workload {
        name: "moderate",
        label: "256 MiB @ 20,000 pages/s",
        memory_mib: 1024,
        cmdline: "tern.hb_ms=50 tern.dirty_mib=256 tern.dirty_rate=20000",
    },
    Workload {
        name: "max",
        label: "256 MiB @ max rate",
        memory_mib: 1024,
        cmdline: "tern.hb_ms=50 tern.dirty_mib=256 tern.dirty_rate=0",
    },
];

/// One migration's figures; `None` fields: not converged / not measured.
#[derive(Debug, Clone, Default)]
struct Sample {
    completed: bool,
    pause_ms: Option<f64>,
    host_gap_ms: Option<f64>,
    total_ms: f64,
    bytes: f64,
    rounds: f64,
    vmm_downtime_ms: f64,
    panicked: bool,
}

/// A process whose stdout lines are read on a thread, each with its arrival time.
struct Proc {
    child: Child,
    lines: Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> anyhow::Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start a VMM")?;
        let out = child.stdout.take().context("no stdout")?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        })
    }

    fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let (t, l) = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .context("the guest printed no expected line in time")?;
            let hit = pred(&l);
            self.seen.push((t, l));
            if hit {
                return Ok(());
            }
        }
    }

    fn drain(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while let Ok(x) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(x);
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits for the guest's steady state: the writer's first report (or, idle, a few heartbeats),
/// then one more second.
fn wait_steady(src: &mut Proc, w: &Workload) -> anyhow::Result<()> {
    if w.cmdline.contains("dirty_mib") {
        src.wait_line(Duration::from_secs(60), |l| l.starts_with("DIRTY "))?;
    } else {
        src.wait_line(Duration::from_secs(60), |l| {
            l.starts_with("HB ") && field(l, "seq").is_some_and(|s| s >= 5)
        })?;
    }
    src.drain(Duration::from_secs(1));
    Ok(())
}

/// Pause figures from the two consoles: the first target heartbeat's maxgap, and the host
/// time between the last source heartbeat line and the first target line.
fn pause_of(src: &Proc, dst: &mut Proc) -> (Option<f64>, Option<f64>, bool) {
    let _ = dst.wait_line(Duration::from_secs(10), |l| l.starts_with("HB "));
    let first = dst.seen.iter().find(|(_, l)| l.starts_with("HB "));
    let last_src = src.seen.iter().rev().find(|(_, l)| l.starts_with("HB "));
    let pause = first
        .and_then(|(_, l)| field(l, "maxgap_us"))
        .map(|u| u as f64 / 1000.0);
    let gap = match (last_src, first) {
        (Some((a, _)), Some((b, _))) => {
            Some(b.saturating_duration_since(*a).as_secs_f64() * 1000.0)
        }
        _ => None,
    };
    dst.drain(Duration::from_millis(1500));
    let panicked = dst
        .seen
        .iter()
        .chain(src.seen.iter())
        .any(|(_, l)| l.contains("PANIC"));
    (pause, gap, panicked)
}

fn tern_run(tern: &Path, elf: &Path, dir: &Path, w: &Workload) -> anyhow::Result<Sample> {
    let port = free_port()?;
    let to = format!("127.0.0.1:{port}");
    let rt = dir.join("rt");
    let (ssock, dsock) = (dir.join("src.sock"), dir.join("dst.sock"));
    let mut dst = Proc::spawn({
        let mut c = Command::new(tern);
        c.args([
            "vm",
            "receive",
            "--listen",
            &to,
            "--name",
            "bench-dst",
            "--api-sock",
        ])
        .arg(&dsock)
        .arg("--runtime-dir")
        .arg(&rt);
        c
    })?;
    let mut src = Proc::spawn({
        let mut c = Command::new(tern);
        c.args(["vm", "run", "--kernel"])
            .arg(elf)
            .args([
                "--memory-mib",
                &w.memory_mib.to_string(),
                "--cmdline",
                w.cmdline,
            ])
            .args(["--name", "bench-src", "--api-sock"])
            .arg(&ssock)
            .arg("--runtime-dir")
            .arg(&rt);
        c
    })?;
    let result = (|| -> anyhow::Result<Sample> {
        wait_steady(&mut src, w)?;
        let out = Command::new(tern)
            .args(["vm", "migrate", "--api-sock"])
            .arg(&ssock)
            .args(["--to", &to, "--json"])
            .output()?;
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let completed = out.status.success() && r["outcome"] == "completed";
        src.drain(Duration::from_millis(300));
        let (pause_ms, host_gap_ms, panicked) = if completed {
            pause_of(&src, &mut dst)
        } else {
            (None, None, false)
        };
        Ok(Sample {
            completed,
            pause_ms,
            host_gap_ms,
            total_ms: r["total_ms"].as_f64().unwrap_or(0.0),
            bytes: r["bytes_sent"].as_f64().unwrap_or(0.0),
            rounds: r["rounds"].as_f64().unwrap_or(0.0),
            vmm_downtime_ms: r["downtime_ms"].as_f64().unwrap_or(0.0),
            panicked,
        })
    })();
    src.stop();
    dst.stop();
    let _ = std::fs::remove_file(&ssock);
    let _ = std::fs::remove_file(&dsock);
    result
}

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e).context("QEMU's QMP socket did not come up"),
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        q.read()?; // greeting
        q.cmd("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> anyhow::Result<serde_json::Value> {
        let mut line = String::new();
        ensure!(self.r.read_line(&mut line)? > 0, "QMP closed");
        Ok(serde_json::from_str(&line)?)
    }

    fn cmd(&mut self, name: &str, args: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let mut m = serde_json::json!({ "execute": name, "arguments": args }).to_string();
        m.push('\n');
        self.w.write_all(m.as_bytes())?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {name}: {e}");
            }
            return Ok(v["return"].clone());
        }
    }
}

fn qemu_cmd(qemu: &str, elf: &Path, w: &Workload, tsc_hz: u64, qmp: &Path) -> Command {
    let mut c = Command::new(qemu);
    c.args(["-accel", "kvm", "-M", "microvm", "-cpu"])
        .arg(format!("qemu64,tsc-frequency={tsc_hz},+tsc-deadline"))
        .args(["-m", &w.memory_mib.to_string(), "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-serial",
            "stdio",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-append", w.cmdline, "-kernel"])
        .arg(elf)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    c
}

fn qemu_run(
    args: &MigrateArgs,
    elf: &Path,
    dir: &Path,
    w: &Workload,
    tsc_hz: u64,
    bandwidth: Option<u64>,
) -> anyhow::Result<Sample> {
    let port = free_port()?;
    let (q1, q2) = (dir.join("q1.sock"), dir.join("q2.sock"));
    let _ = std::fs::remove_file(&q1);
    let _ = std::fs::remove_file(&q2);
    let mut dst = Proc::spawn({
        let mut c = qemu_cmd(&args.qemu, elf, w, tsc_hz, &q2);
        c.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
        c
    })?;
    let mut src = Proc::spawn(qemu_cmd(&args.qemu, elf, w, tsc_hz, &q1))?;
    let result = (|| -> anyhow::Result<Sample> {
        // Both QEMUs fully up before anything is timed.
        let _q2 = Qmp::connect(&q2, Duration::from_secs(60))?;
        let mut q = Qmp::connect(&q1, Duration::from_secs(60))?;
        wait_steady(&mut src, w)?;
        if let Some(b) = bandwidth {
            q.cmd(
                "migrate-set-parameters",
                serde_json::json!({ "max-bandwidth": b }),
            )?;
        }
        q.cmd(
            "migrate",
            serde_json::json!({ "uri": format!("tcp:127.0.0.1:{port}") }),
        )?;
        let deadline = Instant::now() + Duration::from_secs(args.qemu_timeout_s);
        let info = loop {
            std::thread::sleep(Duration::from_millis(20));
            let i = q.cmd("query-migrate", serde_json::json!({}))?;
            match i["status"].as_str().unwrap_or("") {
                "completed" | "failed" | "cancelled" => break i,
                _ if Instant::now() > deadline => {
                    let _ = q.cmd("migrate_cancel", serde_json::json!({}));
                    break i;
                }
                _ => {}
            }
        };
        let completed = info["status"] == "completed";
        src.drain(Duration::from_millis(300));
        let (pause_ms, host_gap_ms, panicked) = if completed {
            pause_of(&src, &mut dst)
        } else {
            (None, None, false)
        };
        Ok(Sample {
            completed,
            pause_ms,
            host_gap_ms,
            total_ms: info["total-time"].as_f64().unwrap_or(0.0),
            bytes: info["ram"]["transferred"].as_f64().unwrap_or(0.0),
            rounds: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(0.0),
            vmm_downtime_ms: info["downtime"].as_f64().unwrap_or(0.0),
            panicked,
        })
    })();
    src.stop();
    dst.stop();
    result
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[derive(Debug, Clone, Copy)]
struct Medians {
    ok: usize,
    runs: usize,
    pause: Option<f64>,
    gap: Option<f64>,
    total: Option<f64>,
    bytes: Option<f64>,
    rounds: Option<f64>,
    downtime: Option<f64>,
    panics: usize,
}

fn medians(s: &[Sample]) -> Medians {
    let ok: Vec<&Sample> = s.iter().filter(|x| x.completed).collect();
    let m = |f: &dyn Fn(&Sample) -> Option<f64>| median(ok.iter().filter_map(|x| f(x)).collect());
    Medians {
        ok: ok.len(),
        runs: s.len(),
        pause: m(&|x| x.pause_ms),
        gap: m(&|x| x.host_gap_ms),
        total: m(&|x| Some(x.total_ms)),
        bytes: m(&|x| Some(x.bytes)),
        rounds: m(&|x| Some(x.rounds)),
        downtime: m(&|x| Some(x.vmm_downtime_ms)),
        panics: s.iter().filter(|x| x.panicked).count(),
    }
}

fn fmt(v: Option<f64>, scale: f64, prec: usize) -> String {
    v.map_or("–".into(), |x| format!("{:.*}", prec, x / scale))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        (Some(_), None) => "peer did not converge".into(),
        _ => "–".into(),
    }
}

pub fn run(args: MigrateArgs) -> anyhow::Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    let tern = build_release_tern()?;
    let dir = scratch_dir("migrate")?;
    let elf = export_testguest(&tern, &dir)?;
    let qemu_version = peer_version(&args.qemu)?;
    // The TSC frequency the guest sees under Tern; QEMU is given the same.
    let tsc_hz = {
        let mut p = Proc::spawn({
            let mut c = Command::new(&tern);
            c.args(["vm", "run", "--kernel"])
                .arg(&elf)
                .args([
                    "--memory-mib",
                    "64",
                    "--cmdline",
                    "tern.hb_ms=50",
                    "--runtime-dir",
                ])
                .arg(dir.join("rt"));
            c
        })?;
        p.wait_line(Duration::from_secs(20), |l| l.contains("tsc_khz="))?;
        p.stop();
        p.seen
            .iter()
            .find_map(|(_, l)| field(l, "tsc_khz"))
            .context("the guest did not report tsc_khz")?
            * 1000
    };

    let mut rows = Vec::new();
    for w in WORKLOADS {
        if !args.workload.is_empty() && !args.workload.iter().any(|n| n == w.name) {
            continue;
        }
        let (mut t, mut qd, mut qf) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..args.runs {
            eprintln!("{}: run {}/{}", w.label, run + 1, args.runs);
            // Interleaved, so host noise hits all alike.
            t.push(tern_run(&tern, &elf, &dir, w)?);
            qd.push(qemu_run(&args, &elf, &dir, w, tsc_hz, None)?);
            qf.push(qemu_run(
                &args,
                &elf,
                &dir,
                w,
                tsc_hz,
                Some(10_000_000_000),
            )?);
        }
        rows.push((w, medians(&t), medians(&qd), medians(&qf)));
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "\nlive migration on loopback, medians of {} runs each, same ELF (tern.hb_ms=50), 1 GiB guests; peer: {qemu_version} -M microvm, KVM",
        args.runs
    );
    println!(
        "{:<26} {:<16} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>6}",
        "workload",
        "vmm",
        "ok",
        "pause ms",
        "gap ms",
        "vmm dt",
        "total ms",
        "MiB sent",
        "rounds",
        "panic"
    );
    for (w, t, qd, qf) in &rows {
        for (name, m) in [("tern", t), ("qemu defaults", qd), ("qemu 10 GB/s", qf)] {
            println!(
                "{:<26} {:<16} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>6}",
                w.label,
                name,
                format!("{}/{}", m.ok, m.runs),
                fmt(m.pause, 1.0, 1),
                fmt(m.gap, 1.0, 1),
                fmt(m.downtime, 1.0, 0),
                fmt(m.total, 1.0, 0),
                fmt(m.bytes, 1048576.0, 1),
                fmt(m.rounds, 1.0, 0),
                m.panics,
            );
        }
        println!(
            "{:<26} ratios tern/qemu-defaults: pause {}, total {}, bytes {}; tern/qemu-10GB/s: pause {}, total {}, bytes {}",
            "",
            ratio(t.pause, qd.pause),
            ratio(t.total, qd.total),
            ratio(t.bytes, qd.bytes),
            ratio(t.pause, qf.pause),
            ratio(t.total, qf.total),
            ratio(t.bytes, qf.bytes),
        );
    }
    println!(
        "goals: pause <= 0.5x QEMU's where above ~10 ms noise; total <= QEMU's; bytes <= QEMU's; convergence where QEMU defaults do not"
    );
    Ok(())
}

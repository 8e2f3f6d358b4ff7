//! `cargo xtask bench net-migrate`: the longest stall a client sees while the VM it talks to is
//! live-migrated between two hosts, Tern vs QEMU, same test guest, same tern-netlab topology, in
//! one run; plus the guest's TCP echo throughput over virtio-net under each VMM.
//!
//! The client (in the topology's client namespace) holds one TCP connection to the guest's echo
//! server and sends a 16-byte request every `--interval-ms`, waiting for each answer; the stall is
//! the longest time from a request to its complete echo. Tern: `tern vm run` on h0, `tern vm
//! receive` on h1, `tern vm migrate`. QEMU: a source on h0 and `-incoming tcp:` on h1 (taps on the
//! hosts' bridges, virtio-mmio version 2 like Tern), `migrate` over QMP with QEMU's defaults; QEMU
//! announces the guest with its self-announce (RARP, 0/50/200/450/800 ms), Tern with its own.
//!
//! With `--dirty-mib N` the guest also runs its memory writer (`tern.dirty_mib=N
//! tern.dirty_rate=--dirty-rate`, RAM N + 64 MiB, heartbeat every 50 ms) under both VMMs.
//!
//! Every run prints the client's longest wait among the requests that overlap the migration (sent
//! before its end, answered after its start; the start is the migrate command, the end its return
//! for Tern and the first `completed` of `query-migrate`, polled every 5 ms, for QEMU) next to the
//! VMM's own downtime (Tern: the sum of its report's `downtime_steps`, to the µs, else
//! `downtime_ms`; QEMU: `query-migrate`'s `downtime`) and their difference, the part of the wait
//! the pause does not explain (issue 14's goal: ≤ 5 ms); when the slowest of those requests was
//! sent against when the pause began (total − downtime after the start); the longest wait in the
//! second before the migration and after it (the host's noise floor: on a loaded host the guest's
//! vCPU thread waits for a core now and then, migration or not); the guest's own longest loop gap
//! (its heartbeats' `maxgap_us`) before, on the source during, and on the target after the
//! migration; and the guest's work rate during the migration (the writer's pages/s while it ran
//! against the second before, from the source's `DIRTY` lines, as `cargo xtask bench migrate`
//! does).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use crate::bench_common::{build_release_tern, load_average, peer_version, scratch_dir};
use crate::bench_migrate::{WorkRate, field, work_rate};
use anyhow::{Context, bail, ensure};
use tern_guest_image::qemu::{QemuConfig, QemuNet};
use tern_netlab::ns::{
    EchoReport, connect_from, longest_overlapping, realtime_this_thread, stream_echo,
};
use tern_netlab::scenario::{
    GUEST_MAC, GuestWriter, MIGRATION_PORT, MigrationScenario, guest_cmdline, guest_memory_mib,
    run_migration, signed_ms,
};
use tern_netlab::{Topology, TopologySpec};

/// Options of `cargo xtask bench net-migrate`.
#[derive(Debug, clap::Args)]
pub struct NetMigrateArgs {
    /// Migrations per VMM.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Time between client requests, ms.
    #[arg(long, default_value_t = 1)]
    pub interval_ms: u64,
    /// Bytes echoed for the throughput figure.
    #[arg(long, default_value_t = 8 << 20)]
    pub throughput_bytes: usize,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// The guest's memory writer's buffer, MiB (0 = no writer: an idle guest).
    #[arg(long, default_value_t = 0)]
    pub dirty_mib: u64,
    /// The writer's pace, pages per second (0 = as fast as it can).
    #[arg(long, default_value_t = 20_000)]
    pub dirty_rate: u64,
    /// Run this tern binary instead of building the workspace's (e.g. an earlier build, for
    /// before/after figures in one sitting).
    #[arg(long, value_name = "PATH")]
    pub tern: Option<std::path::PathBuf>,
    /// Tern's migrations only: no QEMU runs and no throughput figures (to look into Tern's
    /// figures; no comparison).
    #[arg(long)]
    pub tern_only: bool,
    /// The client thread's scheduling, for both VMMs: `normal` (default) leaves it a normal
    /// thread, which waits its turn for a core behind the VMMs' threads and whatever else runs on
    /// this host (that wait then counts as the VM's); `fifo` runs it in the SCHED_FIFO class at
    /// priority 1, as a client on a machine of its own would answer at once.
    #[arg(long, default_value = "normal", value_parser = ["fifo", "normal"])]
    pub client_sched: String,
}

impl NetMigrateArgs {
    fn writer(&self) -> Option<GuestWriter> {
        (self.dirty_mib > 0).then_some(GuestWriter {
            mib: self.dirty_mib,
            pages_per_s: self.dirty_rate,
        })
    }

    /// The guest's heartbeat period: its `DIRTY` lines give the work rate, so they come often
    /// when the writer runs.
    fn hb_ms(&self) -> u64 {
        if self.writer().is_some() { 50 } else { 500 }
    }

    /// The client thread's SCHED_FIFO priority, if it gets one.
    fn client_realtime(&self) -> Option<u8> {
        (self.client_sched == "fifo").then_some(CLIENT_FIFO_PRIORITY)
    }
}

/// The client thread's SCHED_FIFO priority with `--client-sched fifo`: the lowest real-time one,
/// above every normal thread.
const CLIENT_FIFO_PRIORITY: u8 = 1;

/// One migration's figures, for either VMM.
#[derive(Debug, Clone, Default)]
struct RunFigures {
    /// The client's longest wait that overlaps the migration (from the command to its end).
    stall_ms: f64,
    /// The client's longest wait in the second before the migration: the host's noise floor.
    stall_before_ms: Option<f64>,
    /// The client's longest wait after the migration, to the end of the stream.
    stall_after_ms: Option<f64>,
    downtime_ms: Option<f64>,
    total_ms: Option<f64>,
    /// When the slowest request of the migration was sent, ms after the migration was asked for.
    stall_at_ms: Option<f64>,
    work: Option<WorkRate>,
    /// The guest's own longest loop gap (`maxgap_us` of its heartbeats), ms: in the second before
    /// the migration, on the source during it, and on the target after its first heartbeat
    /// (whose gap holds the pause itself).
    gap_before_ms: Option<f64>,
    gap_during_ms: Option<f64>,
    gap_after_ms: Option<f64>,
    /// Tern's migration phases on the bench's clock (empty for QEMU): where the slowest request
    /// fell.
    phases: Vec<Phase>,
}

/// A phase of a Tern migration, ms after the migrate command was started.
#[derive(Debug, Clone, PartialEq)]
struct Phase {
    name: String,
    from_ms: f64,
    to_ms: f64,
}

/// Tern's migration phases, ms after the migrate command was started, from its report: the
/// connection and handshake, each pre-copy round (`rounds_detail`, laid back to back ending at the
/// pause) and the pause (its downtime). The VMM's clock is taken to start `total_ms` before the
/// command returned (`returned_ms`), so the phases sit late by the command's own answer and exit
/// (the "pause at ~" figure, counted from the command's start, sits early by its start-up; the two
/// differed by 2–5 ms here). Empty when the report has no rounds.
fn tern_phases(report: &serde_json::Value, returned_ms: f64) -> Vec<Phase> {
    let (Some(total), Some(downtime)) = (
        report.get("total_ms").and_then(|v| v.as_f64()),
        tern_downtime_ms(report),
    ) else {
        return Vec::new();
    };
    let detail = match report.get("rounds_detail") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(d) => match serde_json::from_value::<Vec<tern_api::vmm::RoundFigures>>(d.clone()) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("the migration report's rounds_detail is malformed ({e}): no phases");
                Vec::new()
            }
        },
    };
    let rounds: Vec<(u64, f64)> = detail
        .iter()
        .filter(|r| r.decision != tern_api::vmm::RoundDecision::StopAndCopy)
        .map(|r| (u64::from(r.round), r.us as f64 / 1000.0))
        .collect();
    if rounds.is_empty() {
        return Vec::new();
    }
    let start = returned_ms - total;
    let pause_at = start + total - downtime;
    let mut out = Vec::new();
    let mut end = pause_at;
    for (round, ms) in rounds.iter().rev() {
        let from = (end - ms).max(start);
        out.push(Phase {
            name: format!("round {round}"),
            from_ms: from,
            to_ms: end,
        });
        end = from;
    }
    out.push(Phase {
        name: "handshake".into(),
        from_ms: start,
        to_ms: end,
    });
    out.reverse();
    out.push(Phase {
        name: "pause".into(),
        from_ms: pause_at,
        to_ms: pause_at + downtime,
    });
    out
}

/// The phase at `at_ms` (`before`, `after`, or a phase's name).
fn phase_at(phases: &[Phase], at_ms: f64) -> &str {
    match (phases.first(), phases.last()) {
        (Some(f), _) if at_ms < f.from_ms => "before",
        (_, Some(l)) if at_ms >= l.to_ms => "after",
        _ => phases
            .iter()
            .find(|p| at_ms < p.to_ms)
            .map_or("?", |p| p.name.as_str()),
    }
}

/// The phases on one line: `handshake 0.0-2.1, round 0 2.1-98.3, …, pause 120.4-122.0 ms`.
fn phases_line(phases: &[Phase]) -> String {
    phases
        .iter()
        .map(|p| format!("{} {:.1}-{:.1}", p.name, p.from_ms, p.to_ms))
        .collect::<Vec<_>>()
        .join(", ")
        + " ms"
}

/// What one migration left behind, for [`RunFigures::measure`].
struct RunRecord<'a> {
    samples: &'a [(Instant, Duration)],
    source_console: &'a [(Instant, String)],
    target_console: &'a [String],
    started: Instant,
    finished: Instant,
}

/// A heartbeat line's `maxgap_us`, ms.
fn heartbeat_gap_ms(line: &str) -> Option<f64> {
    line.starts_with("HB ")
        .then(|| field(line, "maxgap_us"))
        .flatten()
        .map(|us| us as f64 / 1000.0)
}

impl RunFigures {
    /// The client's and the guest's figures of a run; the VMM's own are filled in by the caller.
    fn measure(r: &RunRecord<'_>) -> RunFigures {
        let second = Duration::from_secs(1);
        let before_from = r.started.checked_sub(second).unwrap_or(r.started);
        let during = longest_overlapping(r.samples, r.started, r.finished);
        let after = r
            .samples
            .iter()
            .filter(|(sent, _)| *sent > r.finished)
            .map(|(_, took)| took.as_secs_f64() * 1000.0)
            .reduce(f64::max);
        let src_gaps = |keep: &dyn Fn(Instant) -> bool| {
            r.source_console
                .iter()
                .filter(|(at, _)| keep(*at))
                .filter_map(|(_, l)| heartbeat_gap_ms(l))
                .reduce(f64::max)
        };
        RunFigures {
            stall_ms: during.map_or(0.0, |d| d.1),
            stall_before_ms: r
                .samples
                .iter()
                .filter(|(sent, took)| *sent >= before_from && *sent + *took < r.started)
                .map(|(_, took)| took.as_secs_f64() * 1000.0)
                .reduce(f64::max),
            stall_after_ms: after,
            stall_at_ms: during.map(|d| signed_ms(d.0, r.started)),
            work: work_rate(r.source_console, r.started),
            gap_before_ms: src_gaps(&|at| at >= before_from && at < r.started),
            gap_during_ms: src_gaps(&|at| at >= r.started),
            gap_after_ms: r
                .target_console
                .iter()
                .filter_map(|l| heartbeat_gap_ms(l))
                .skip(1)
                .reduce(f64::max),
            ..RunFigures::default()
        }
    }
}

/// Issue 14's bound on the client's wait beyond the VMM's downtime.
const GOAL_EXCESS_MS: f64 = 5.0;

impl RunFigures {
    /// The client's wait the VMM's downtime does not explain.
    fn excess_ms(&self) -> Option<f64> {
        self.downtime_ms.map(|d| self.stall_ms - d)
    }

    /// When the pause began, ms after the migration was asked for (the report's total less its
    /// downtime; the acknowledgement's trip is in neither).
    fn pause_at_ms(&self) -> Option<f64> {
        Some(self.total_ms? - self.downtime_ms?)
    }

    /// Where the slowest request of the migration was sent and answered (Tern: the phases).
    fn slowest_in(&self) -> Option<(String, String)> {
        let at = self.stall_at_ms?;
        (!self.phases.is_empty()).then(|| {
            (
                phase_at(&self.phases, at).to_string(),
                phase_at(&self.phases, at + self.stall_ms).to_string(),
            )
        })
    }

    fn line(&self, vmm: &str, i: usize, requests: u64) -> String {
        let o = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.1}"));
        let work = self.work.map_or("?".into(), |w| {
            format!("{:.0}% (slowest period {:.0}%)", w.mean_pct, w.min_pct)
        });
        format!(
            "{vmm} run {i}: client's longest wait during the migration {:.1} ms, downtime {} ms, wait - downtime {} ms \
             (slowest request sent at {} ms, pause at ~{} ms, total {} ms); \
             longest wait in the second before {} ms, after {} ms; \
             guest's own longest gap before/during/after {}/{}/{} ms; work rate {work}; {requests} requests",
            self.stall_ms,
            o(self.downtime_ms),
            o(self.excess_ms()),
            o(self.stall_at_ms),
            o(self.pause_at_ms()),
            o(self.total_ms),
            o(self.stall_before_ms),
            o(self.stall_after_ms),
            o(self.gap_before_ms),
            o(self.gap_during_ms),
            o(self.gap_after_ms),
        )
    }
}

/// The medians of a set of runs and how many met the goal.
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    stall_ms: f64,
    before_ms: f64,
    after_ms: f64,
    downtime_ms: f64,
    excess_ms: f64,
    work_mean_pct: f64,
    /// Runs whose stall exceeded the downtime by at most [`GOAL_EXCESS_MS`], of `runs`.
    met: usize,
    runs: usize,
}

fn summarise(runs: &[RunFigures]) -> Summary {
    let of = |f: &dyn Fn(&RunFigures) -> Option<f64>| median(runs.iter().filter_map(f).collect());
    Summary {
        stall_ms: of(&|r| Some(r.stall_ms)),
        before_ms: of(&|r| r.stall_before_ms),
        after_ms: of(&|r| r.stall_after_ms),
        downtime_ms: of(&|r| r.downtime_ms),
        excess_ms: of(&|r| r.excess_ms()),
        work_mean_pct: of(&|r| r.work.map(|w| w.mean_pct)),
        met: runs
            .iter()
            .filter(|r| r.excess_ms().is_some_and(|e| e <= GOAL_EXCESS_MS))
            .count(),
        runs: runs.len(),
    }
}

/// Tern's pause step by step from its report's `downtime_steps`: `step ms` each.
fn steps_line(report: &serde_json::Value) -> String {
    let Some(steps) = report.get("downtime_steps").and_then(|s| s.as_array()) else {
        return "no downtime_steps in the report".into();
    };
    steps
        .iter()
        .filter_map(|st| {
            let name = st.get("step")?.as_str()?;
            let us = st.get("us")?.as_f64()?;
            Some(format!("{name} {:.2}", us / 1000.0))
        })
        .collect::<Vec<_>>()
        .join(", ")
        + " ms"
}

/// Tern's downtime from its migration report: the sum of `downtime_steps` (µs) when it has them,
/// else `downtime_ms`.
fn tern_downtime_ms(report: &serde_json::Value) -> Option<f64> {
    let steps: Option<Vec<f64>> = report
        .get("downtime_steps")
        .and_then(|s| s.as_array())
        .filter(|s| !s.is_empty())
        .and_then(|s| s.iter().map(|st| st.get("us")?.as_f64()).collect());
    match steps {
        Some(us) => Some(us.iter().sum::<f64>() / 1000.0),
        None => report.get("downtime_ms")?.as_f64(),
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Proc {
    child: Child,
    lines: Receiver<(Instant, String)>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(mut cmd: Command) -> anyhow::Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let out = child.stdout.take().context("no stdout")?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), l)).is_err() {
                    break;
                }
            }
        });
        Ok(Proc { child, lines })
    }

    fn wait_line(&self, prefix: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let l = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .with_context(|| format!("no {prefix:?} line from the guest"))?;
            if l.1.starts_with(prefix) {
                return Ok(l.1);
            }
        }
    }
}

/// A minimal QMP client: one command at a time, events skipped.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> anyhow::Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => bail!("cannot connect to QMP at {}: {e}", path.display()),
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)?;
        q.cmd(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    fn cmd(&mut self, json: &str) -> anyhow::Result<serde_json::Value> {
        self.w.write_all(json.as_bytes())?;
        self.w.write_all(b"\n")?;
        loop {
            let mut line = String::new();
            ensure!(self.r.read_line(&mut line)? > 0, "QMP closed");
            let v: serde_json::Value = serde_json::from_str(&line)?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {json}: {e}");
            }
            return Ok(v.get("return").cloned().unwrap_or(serde_json::Value::Null));
        }
    }
}

fn host_tsc_hz() -> anyhow::Result<u64> {
    let log = Command::new("dmesg").output()?;
    if let Some(hz) =
        tern_guest_image::qemu::tsc_hz_from_kernel_log(&String::from_utf8_lossy(&log.stdout))
    {
        return Ok(hz);
    }
    tern_guest_image::qemu::tsc_hz_from_cpuinfo(&std::fs::read_to_string("/proc/cpuinfo")?)
        .context("no TSC frequency in the kernel log or /proc/cpuinfo")
}

struct QemuRun {
    echo: EchoReport,
    figures: RunFigures,
}

fn qemu_cmd(qemu: &str, ns: &str, cfg: &QemuConfig, qmp: &Path, extra: &[String]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, qemu])
        .args(cfg.args())
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(extra);
    c
}

fn qemu_migration(
    topo: &Topology,
    args: &NetMigrateArgs,
    elf: &Path,
    tsc_hz: u64,
    dir: &Path,
) -> anyhow::Result<QemuRun> {
    let ip = Topology::guest_addr(0);
    let cfg = |tap: &str| QemuConfig {
        kernel: elf.to_path_buf(),
        cmdline: guest_cmdline(ip, args.hb_ms(), args.writer(), None),
        memory_mib: guest_memory_mib(256, args.writer()),
        vcpus: 1,
        tsc_hz,
        disk: None,
        virtio_modern: true,
        net: Some(QemuNet {
            tap: tap.into(),
            mac: GUEST_MAC.into(),
        }),
    };
    let (qs, qd) = (dir.join("qsrc.qmp"), dir.join("qdst.qmp"));
    let _ = std::fs::remove_file(&qs);
    let _ = std::fs::remove_file(&qd);
    let src = Proc::spawn(qemu_cmd(
        &args.qemu,
        &topo.host_ns(0),
        &cfg("qsrc"),
        &qs,
        &[],
    ))?;
    src.wait_line("NET up")?;
    topo.attach_to_host_bridge(0, "qsrc")?;
    let listen = format!("{}:{MIGRATION_PORT}", topo.host_addr(1));
    let _dst = Proc::spawn(qemu_cmd(
        &args.qemu,
        &topo.host_ns(1),
        &cfg("qdst"),
        &qd,
        &["-incoming".into(), format!("tcp:{listen}")],
    ))?;
    let mut qmp_src = Qmp::connect(&qs)?;
    let dst_lines = &_dst.lines;
    let _qmp_dst = Qmp::connect(&qd)?;
    topo.attach_to_host_bridge(1, "qdst")?;
    // The source guest says where it is (as `tern vm announce` does for Tern's source).
    qmp_src.cmd(
        r#"{"execute":"announce-self","arguments":{"initial":50,"max":550,"rounds":1,"step":100}}"#,
    )?;
    std::thread::sleep(Duration::from_millis(100));

    let client = topo.client_ns().context("no client namespace")?;
    let mut stream = connect_from(&client, SocketAddr::from((ip, 7)), Duration::from_secs(5))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let interval = Duration::from_millis(args.interval_ms);
    let realtime = args.client_realtime();
    let client_thread = std::thread::spawn(move || {
        if let Some(priority) = realtime {
            realtime_this_thread(priority)?;
        }
        Ok::<_, tern_netlab::ns::RealtimeError>(stream_echo(
            &mut stream,
            interval,
            Duration::from_secs(10),
            || stop2.load(Ordering::Relaxed),
        ))
    });
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    qmp_src.cmd(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"tcp:{listen}"}}}}"#
    ))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let info = loop {
        let v = qmp_src.cmd(r#"{"execute":"query-migrate"}"#)?;
        match v.get("status").and_then(|s| s.as_str()) {
            Some("completed") => break v,
            Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {v}"),
            _ => {}
        }
        ensure!(Instant::now() < deadline, "QEMU migration did not complete");
        std::thread::sleep(Duration::from_millis(5));
    };
    let finished = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let echo = client_thread
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    // The source QEMU stays up (paused) after the migration: its console up to now is all.
    let console: Vec<(Instant, String)> = src.lines.try_iter().collect();
    drop(src);
    let target: Vec<String> = dst_lines.try_iter().map(|(_, l)| l).collect();
    let figures = RunFigures {
        downtime_ms: info.get("downtime").and_then(|v| v.as_f64()),
        total_ms: info.get("total-time").and_then(|v| v.as_f64()),
        ..RunFigures::measure(&RunRecord {
            samples: &echo.samples,
            source_console: &console,
            target_console: &target,
            started,
            finished,
        })
    };
    Ok(QemuRun { echo, figures })
}

/// Echoes `bytes` through the guest at `ip` from the client namespace; MB/s.
fn echo_throughput(topo: &Topology, bytes: usize) -> anyhow::Result<f64> {
    let client = topo.client_ns().context("no client namespace")?;
    let addr = SocketAddr::from((Topology::guest_addr(0), 7));
    let mut s = connect_from(&client, addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut w = s.try_clone()?;
    let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let expect = data.clone();
    let t = Instant::now();
    let writer = std::thread::spawn(move || w.write_all(&data));
    let mut got = vec![0u8; bytes];
    s.read_exact(&mut got)?;
    let secs = t.elapsed().as_secs_f64();
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    ensure!(got == expect, "the echo differs from what was sent");
    Ok(bytes as f64 / secs / 1e6)
}

/// Boots the test guest under `tern` (plus `extra` arguments) on the topology's host 0 and echoes
/// `bytes` through it; MB/s.
pub(crate) fn tern_throughput(
    topo: &Topology,
    tern: &Path,
    dir: &Path,
    bytes: usize,
    extra: &[&str],
) -> anyhow::Result<f64> {
    let ip = Topology::guest_addr(0);
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &topo.host_ns(0)])
        .arg(tern)
        .args([
            "vm",
            "run",
            "--kernel",
            "builtin:testguest",
            "--name",
            "bench-tput",
        ])
        .args(["--cmdline", &format!("tern.hb_ms=1000 tern.ip={ip}/24")])
        .args(["--net", &format!("tap=tput0,mac={GUEST_MAC},bridge=br0")])
        .arg("--api-sock")
        .arg(dir.join("tput.sock"))
        .arg("--runtime-dir")
        .arg(dir)
        .args(extra);
    let vm = Proc::spawn(c)?;
    vm.wait_line("NET up")?;
    let _ = Command::new(tern)
        .args(["vm", "announce", "--api-sock"])
        .arg(dir.join("tput.sock"))
        .output();
    std::thread::sleep(Duration::from_millis(50));
    echo_throughput(topo, bytes)
}

fn qemu_throughput(
    topo: &Topology,
    args: &NetMigrateArgs,
    elf: &Path,
    tsc_hz: u64,
    dir: &Path,
) -> anyhow::Result<f64> {
    let ip = Topology::guest_addr(0);
    let cfg = QemuConfig {
        kernel: elf.to_path_buf(),
        cmdline: format!("tern.hb_ms=1000 tern.ip={ip}/24"),
        memory_mib: 256,
        vcpus: 1,
        tsc_hz,
        disk: None,
        virtio_modern: true,
        net: Some(QemuNet {
            tap: "qtput".into(),
            mac: GUEST_MAC.into(),
        }),
    };
    let qmp = dir.join("qtput.qmp");
    let vm = Proc::spawn(qemu_cmd(&args.qemu, &topo.host_ns(0), &cfg, &qmp, &[]))?;
    vm.wait_line("NET up")?;
    topo.attach_to_host_bridge(0, "qtput")?;
    let mut q = Qmp::connect(&qmp)?;
    q.cmd(
        r#"{"execute":"announce-self","arguments":{"initial":50,"max":550,"rounds":1,"step":100}}"#,
    )?;
    std::thread::sleep(Duration::from_millis(50));
    echo_throughput(topo, args.throughput_bytes)
}

pub fn run(args: NetMigrateArgs) -> anyhow::Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    let tern = match &args.tern {
        Some(t) => t.clone(),
        None => build_release_tern()?,
    };
    let dir = scratch_dir("net")?;
    let elf = dir.join("testguest.elf");
    std::fs::write(&elf, tern_guest_image::testguest_elf())?;
    let tsc_hz = host_tsc_hz()?;
    let qemu_version = peer_version(&args.qemu)?;
    let mut spec = TopologySpec::new("bnm", 2);
    spec.replace_stale = true;
    let topo = Topology::build(spec)?;

    let mut tern_runs = Vec::new();
    let mut qemu_runs = Vec::new();
    for i in 0..args.runs {
        let mut s = MigrationScenario::new(&tern, &dir);
        s.interval = Duration::from_millis(args.interval_ms);
        s.writer = args.writer();
        s.hb_ms = args.hb_ms();
        s.client_realtime = args.client_realtime();
        let t = run_migration(&topo, &s)?;
        ensure!(
            !t.echo.connection_broken,
            "Tern run {i}: the connection broke: {:?}",
            t.echo
        );
        let report = t.migration.clone().unwrap_or_default();
        let (Some(started), Some(finished)) = (t.migrate_started, t.migrate_finished) else {
            bail!("Tern run {i}: the scenario did not time the migration");
        };
        let f = RunFigures {
            downtime_ms: tern_downtime_ms(&report),
            total_ms: report.get("total_ms").and_then(|v| v.as_f64()),
            phases: tern_phases(&report, signed_ms(finished, started)),
            ..RunFigures::measure(&RunRecord {
                samples: &t.echo.samples,
                source_console: &t.source_console,
                target_console: &t.target_console,
                started,
                finished,
            })
        };
        println!(
            "{}; throttle max {}%",
            f.line("tern", i, t.echo.requests),
            report.get("throttle_max_pct").cloned().unwrap_or_default()
        );
        println!("  tern run {i}'s pause: {}", steps_line(&report));
        if let Some((sent, answered)) = f.slowest_in() {
            println!(
                "  tern run {i}'s slowest request: sent in {sent}, answered in {answered}; phases {}",
                phases_line(&f.phases)
            );
        }
        tern_runs.push(f);
        if args.tern_only {
            continue;
        }

        let q = qemu_migration(&topo, &args, &elf, tsc_hz, &dir)?;
        ensure!(
            !q.echo.connection_broken,
            "QEMU run {i}: the connection broke: {:?}",
            q.echo
        );
        println!("{}", q.figures.line("qemu", i, q.echo.requests));
        qemu_runs.push(q.figures);
    }
    let throughput = if args.tern_only {
        None
    } else {
        Some((
            tern_throughput(&topo, &tern, &dir, args.throughput_bytes, &[])?,
            qemu_throughput(&topo, &args, &elf, tsc_hz, &dir)?,
        ))
    };
    let _ = std::fs::remove_dir_all(&dir);

    let (ts, qs) = (summarise(&tern_runs), summarise(&qemu_runs));
    let (tm, qm) = (ts.stall_ms, qs.stall_ms);
    let max = |v: &[RunFigures]| v.iter().map(|r| r.stall_ms).fold(0.0, f64::max);
    let guest = match args.writer() {
        Some(w) => format!(
            "{} MiB guest writing {} pages/s over {} MiB",
            guest_memory_mib(256, Some(w)),
            w.pages_per_s,
            w.mib
        ),
        None => "256 MiB idle guest".into(),
    };
    println!(
        "\nlongest client stall during a live migration h0 -> h1 (TCP echo request every {} ms, client thread {}, {guest}, {} runs each, load average {}); peer: {qemu_version}",
        args.interval_ms,
        match args.client_realtime() {
            Some(p) => format!("SCHED_FIFO {p}"),
            None => "normal".into(),
        },
        args.runs,
        load_average()
    );
    println!(
        "  {:<6} {:>10} {:>8} {:>10} {:>14} {:>14} {:>10} {:>10} {:>10}",
        "",
        "wait ms",
        "max ms",
        "downtime",
        "wait-downtime",
        "goal (<= 5 ms)",
        "work rate",
        "1 s before",
        "after"
    );
    for (name, s, runs) in [("tern", &ts, &tern_runs), ("qemu", &qs, &qemu_runs)] {
        if runs.is_empty() {
            continue;
        }
        println!(
            "  {name:<6} {:>10.1} {:>8.1} {:>10.1} {:>14.1} {:>14} {:>9.0}% {:>10.1} {:>10.1}",
            s.stall_ms,
            max(runs),
            s.downtime_ms,
            s.excess_ms,
            format!("{} of {}", s.met, s.runs),
            s.work_mean_pct,
            s.before_ms,
            s.after_ms
        );
    }
    let wheres: Vec<String> = tern_runs
        .iter()
        .filter_map(|r| {
            let (sent, answered) = r.slowest_in()?;
            Some(format!(
                "{:.1} ms over, sent in {sent}{}",
                r.excess_ms()?,
                if answered == sent {
                    String::new()
                } else {
                    format!(" (answered in {answered})")
                }
            ))
        })
        .collect();
    if !wheres.is_empty() {
        println!("  tern's slowest request per run: {}", wheres.join("; "));
    }
    println!(
        "  (medians; wait: the client's longest wait overlapping the migration; downtime as each VMM reports it; \
         work rate: the writer's pages/s during the migration against the second before; \
         1 s before / after: the longest wait outside the migration, the host's noise floor)"
    );
    let Some((tt, qt)) = throughput else {
        return Ok(());
    };
    println!(
        "  tern/qemu median: {:.2} (goal <= 0.5, and tern below TCP's 200 ms minimum RTO)",
        tm / qm
    );
    println!(
        "guest TCP echo throughput over virtio-net ({} MiB): tern {tt:.1} MB/s, qemu {qt:.1} MB/s, tern/qemu {:.2} (goal >= 0.5)",
        args.throughput_bytes >> 20,
        tt / qt
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stall: f64, downtime: Option<f64>, work: Option<f64>) -> RunFigures {
        RunFigures {
            stall_ms: stall,
            downtime_ms: downtime,
            total_ms: Some(200.0),
            work: work.map(|w| WorkRate {
                mean_pct: w,
                min_pct: w,
            }),
            ..RunFigures::default()
        }
    }

    #[test]
    fn a_runs_figures_split_the_client_and_the_guest_at_the_migration() {
        let o = Instant::now() + Duration::from_secs(5);
        let ms = Duration::from_millis;
        let started = o + ms(1000);
        let finished = o + ms(1100);
        let samples = [
            (o - ms(10), ms(9)),    // before the second before: ignored
            (o + ms(500), ms(7)),   // the second before
            (o + ms(995), ms(20)),  // straddles the start: during
            (o + ms(1050), ms(3)),  // during
            (o + ms(1101), ms(30)), // after
        ];
        let src: Vec<(Instant, String)> = [
            (o + ms(400), "HB seq=1 t_us=1 maxgap_us=2000"),
            (o + ms(450), "DIRTY pages=0 rate=2000"),
            (o + ms(900), "HB seq=2 t_us=2 maxgap_us=4000"),
            (o + ms(950), "DIRTY pages=1000 rate=2000"),
            (o + ms(1040), "HB seq=3 t_us=3 maxgap_us=6500"),
            (o + ms(1045), "DIRTY pages=1171 rate=1800"),
        ]
        .into_iter()
        .map(|(t, l)| (t, l.to_string()))
        .collect();
        let dst = [
            "HB seq=4 t_us=4 maxgap_us=50000".to_string(),
            "NET tcp_accepts=1".into(),
            "HB seq=5 t_us=5 maxgap_us=1500".into(),
        ];
        let f = RunFigures::measure(&RunRecord {
            samples: &samples,
            source_console: &src,
            target_console: &dst,
            started,
            finished,
        });
        assert_eq!(f.stall_ms, 20.0);
        assert!((f.stall_at_ms.unwrap() + 5.0).abs() < 1e-6, "{f:?}");
        assert_eq!(f.stall_before_ms, Some(7.0));
        assert_eq!(f.stall_after_ms, Some(30.0));
        assert_eq!(f.gap_before_ms, Some(4.0));
        assert_eq!(f.gap_during_ms, Some(6.5));
        assert_eq!(
            f.gap_after_ms,
            Some(1.5),
            "the first target heartbeat holds the pause"
        );
        let w = f.work.expect("a work rate");
        assert!((w.mean_pct - 90.0).abs() < 0.5, "{w:?}");
    }

    #[test]
    fn the_summary_counts_runs_within_downtime_plus_five_ms() {
        let runs = [
            run(10.0, Some(6.0), Some(90.0)),
            run(20.0, Some(4.0), Some(80.0)),
            run(9.0, Some(4.0), None),
            run(30.0, None, Some(100.0)),
        ];
        let s = summarise(&runs);
        assert_eq!(
            (s.met, s.runs),
            (2, 4),
            "4 and 5 ms over pass, 16 and unknown do not"
        );
        assert_eq!(s.stall_ms, 15.0);
        assert_eq!(s.downtime_ms, 4.0);
        assert_eq!(s.excess_ms, 5.0);
        assert_eq!(s.work_mean_pct, 90.0);
        assert_eq!(runs[0].pause_at_ms(), Some(194.0));
        assert_eq!(runs[3].pause_at_ms(), None);
    }

    #[test]
    fn the_phases_end_at_the_pause_and_place_the_slowest_request() {
        // The command returned 130 ms after it started; the VMM's migration took 125 ms (so it
        // began at 5 ms), its pause the last 2 ms; rounds of 100 and 15 ms before it.
        let r = serde_json::json!({
            "total_ms": 125,
            "downtime_ms": 2,
            "downtime_steps": [{"step": "final_pages", "us": 1500.0}, {"step": "ack", "us": 500.0}],
            "rounds_detail": [
                {"round": 0, "us": 100000, "pages_data": 65536, "pages_zero": 196608,
                 "bytes": 268435456, "dirty_pages": 4000, "throttle_pct": 0.0,
                 "decision": "continue"},
                {"round": 1, "us": 15000, "pages_data": 4000, "pages_zero": 0,
                 "bytes": 16384000, "dirty_pages": 100, "throttle_pct": 0.0,
                 "decision": "switch_over"},
                {"round": 2, "us": 1500, "pages_data": 100, "pages_zero": 0,
                 "bytes": 409600, "dirty_pages": 0, "throttle_pct": 0.0,
                 "decision": "stop_and_copy"}
            ]
        });
        let p = tern_phases(&r, 130.0);
        assert_eq!(
            phases_line(&p),
            "handshake 5.0-13.0, round 0 13.0-113.0, round 1 113.0-128.0, pause 128.0-130.0 ms"
        );
        assert_eq!(phase_at(&p, 1.0), "before");
        assert_eq!(phase_at(&p, 50.0), "round 0");
        assert_eq!(phase_at(&p, 113.0), "round 1");
        assert_eq!(phase_at(&p, 129.0), "pause");
        assert_eq!(phase_at(&p, 131.0), "after");
        let f = RunFigures {
            stall_ms: 20.0,
            stall_at_ms: Some(100.0),
            phases: p,
            ..RunFigures::default()
        };
        assert_eq!(
            f.slowest_in(),
            Some(("round 0".to_string(), "round 1".to_string()))
        );
        // No rounds (an older report, or QEMU): no phases.
        assert!(tern_phases(&serde_json::json!({"total_ms": 1, "downtime_ms": 0}), 2.0).is_empty());
        assert_eq!(RunFigures::default().slowest_in(), None);
    }

    #[test]
    fn tern_downtime_prefers_the_steps_sum() {
        let r = serde_json::json!({
            "downtime_ms": 3,
            "downtime_steps": [{"step": "a", "us": 1500.0}, {"step": "b", "us": 2250.0}]
        });
        assert_eq!(tern_downtime_ms(&r), Some(3.75));
        assert_eq!(steps_line(&r), "a 1.50, b 2.25 ms");
        let r = serde_json::json!({"downtime_ms": 3, "downtime_steps": []});
        assert_eq!(tern_downtime_ms(&r), Some(3.0));
        assert_eq!(tern_downtime_ms(&serde_json::json!({})), None);
    }
}

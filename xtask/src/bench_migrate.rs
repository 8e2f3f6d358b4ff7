//! `cargo xtask bench migrate`: live migration of the same test guest ELF and workloads under
//! Tern and under QEMU with KVM (`-M microvm -bios qboot.rom`, `-incoming defer`, `migrate` over
//! QMP), on loopback, several runs each, interleaved, medians.
//!
//! QEMU runs twice: **tuned** as an operator would tune it to match Tern's settings (downtime limit =
//! Tern's budget, auto-converge on, multifd with as many channels as Tern's streams, the bandwidth cap
//! lifted to 10 GB/s, as Tern has none) and with its **defaults** (300 ms downtime limit, 128 MiB/s,
//! no auto-converge, one stream). The `capped` workload gives Tern and tuned QEMU the same 256 MiB/s
//! cap, below the max-rate writer's dirty rate, so that both must throttle: it shows what each
//! throttle costs the guest.
//!
//! The `large` workload is a 4 GiB guest with a 1 GiB working set written at 20,000 pages/s: the
//! same pace as `moderate`, so that what changes is the size. Its buffer holds data from the start
//! (`tern.dirty_fill=data`; the other workloads' buffers are zero until the writer reaches them, so
//! a VMM skips most of them as zero pages), which makes the first round send the whole GiB; the
//! dirty log covers four times the memory; the guest's RAM lies on both sides of the 32-bit MMIO
//! hole and the working set above it. At the maximum rate a 1 GiB buffer would be the `max`
//! workload again with a longer first round: the writer's pace, not its buffer, sets the dirty
//! rate there.
//!
//! Guest pause: a VMM may hide part of its pause from the guest's clock (QEMU restores the guest TSC
//! at its saved value where the TSC can be offset; Tern moves it on by the time since the state was
//! saved), and a guest clock that runs on makes the overdue heartbeat fire at once on resume, which
//! shortens the host-timed gap. No single figure sees every pause whole, so three are taken for every
//! run and the pause is the largest: the host-timed gap between the last source heartbeat line and
//! the first target line minus the heartbeat period (`tern.hb_ms=20`); the `maxgap_us` of the first
//! target heartbeat (the guest's clock, start to start of its loop, so blind to a pause while it
//! sleeps; it also holds any stall on the source in the last period); and the clock shift, how far the
//! guest's clock fell behind the host's (least host-arrival − `t_us` over the target's lines minus the
//! same over the source's lines before the migration).
//! Also each VMM's own downtime figure, total time, bytes sent, rounds (Tern: rounds; QEMU:
//! dirty-sync count), the largest throttle, and the guest's work rate (pages written per second)
//! while the migration ran, against its rate just before.
//!
//! For Tern also its own breakdown of the pause (the report's `downtime_steps`, timed on both
//! sides): per step the median and the slowest run, printed under each workload.
//!
//! A run counts only if it completed, the target printed heartbeats afterwards and no guest
//! panicked; others are counted as failures, never medians' inputs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use crate::bench_common::{
    build_release_tern, export_testguest, load_average, peer_version, scratch_dir,
};
use anyhow::{Context, bail, ensure};
use tern_api::vmm::RoundFigures;
use tern_guest_image::qemu::{QEMU_FIRMWARE, QemuConfig};
use tern_test_support::free_port;

/// Tern's settings, passed explicitly; the tuned QEMU row copies them.
pub(crate) const TERN_STREAMS: u16 = 2;
pub(crate) const TERN_BUDGET_MS: u64 = 50;
/// The guest's heartbeat period (`tern.hb_ms`).
pub(crate) const HB_MS: u64 = 20;
/// Tuned QEMU's bandwidth cap, bytes/s (QEMU's default is 128 MiB/s; Tern has no cap).
const QEMU_TUNED_BANDWIDTH: u64 = 10_000_000_000;

/// Options of `cargo xtask bench migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Runs per VMM, configuration and workload (7, the least the medians are quoted from; fewer
    /// for a quick look).
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// Give up on a QEMU migration after this many seconds (it may never converge).
    #[arg(long, default_value_t = 30)]
    pub qemu_timeout_s: u64,
    /// Only these workloads (idle, moderate, max, capped, large); default all.
    #[arg(long)]
    pub workload: Vec<String>,
    /// Run this tern binary instead of building the workspace's (e.g. an earlier build, for
    /// before/after figures in one sitting).
    #[arg(long, value_name = "PATH")]
    pub tern: Option<std::path::PathBuf>,
    /// Run Tern and tuned QEMU only (QEMU's defaults never converge at the maximum rate and
    /// take 30 s a run there).
    #[arg(long)]
    pub skip_qemu_defaults: bool,
    /// `--seccomp` for Tern's VMMs (default: tern's own default).
    #[arg(long, value_name = "off|log|kill")]
    pub tern_seccomp: Option<String>,
    /// Also run Tern with `--post-copy-after 2` on the writing workloads (a `tern post-copy`
    /// row).
    #[arg(long)]
    pub post_copy: bool,
    /// Also run Tern with `--copy-pages` (every page copied into a frame under the frame's
    /// checksum, instead of the default: sent from and read into guest memory in place, each
    /// page under its own checksum) on every workload: a `tern copied` row, with its own
    /// ratios to tuned QEMU.
    #[arg(long)]
    pub copy_pages: bool,
}

/// `--tern-seccomp`, for every Tern VMM this process starts.
static TERN_SECCOMP: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn seccomp_args() -> Vec<&'static str> {
    match TERN_SECCOMP.get() {
        Some(m) => vec!["--seccomp", m.as_str()],
        None => Vec::new(),
    }
}

pub(crate) struct Workload {
    pub(crate) name: &'static str,
    pub(crate) label: &'static str,
    pub(crate) memory_mib: u64,
    pub(crate) cmdline: &'static str,
    /// A bandwidth cap for Tern and tuned QEMU alike, MiB/s (so that both must throttle); QEMU's
    /// defaults are not run then (their own 128 MiB/s cap never converges on this writer).
    pub(crate) cap_mibps: Option<u64>,
}

pub(crate) const WORKLOADS: &[Workload] = &[
    Workload {
        name: "idle",
        label: "idle 1 GiB",
        memory_mib: 1024,
        cmdline: "tern.hb_ms=20",
        cap_mibps: None,
    },
    Workload {
        name: "moderate",
        label: "256 MiB @ 20,000 pages/s",
        memory_mib: 1024,
        cmdline: "tern.hb_ms=20 tern.dirty_mib=256 tern.dirty_rate=20000",
        cap_mibps: None,
    },
    Workload {
        name: "max",
        label: "256 MiB @ max rate",
        memory_mib: 1024,
        cmdline: "tern.hb_ms=20 tern.dirty_mib=256 tern.dirty_rate=0",
        cap_mibps: None,
    },
    Workload {
        name: "capped",
        label: "max rate, 256 MiB/s cap",
        memory_mib: 1024,
        cmdline: "tern.hb_ms=20 tern.dirty_mib=256 tern.dirty_rate=0",
        cap_mibps: Some(256),
    },
    Workload {
        name: "large",
        label: "4 GiB: 1 GiB @ 20k pages/s",
        memory_mib: 4096,
        cmdline: "tern.hb_ms=20 tern.dirty_mib=1024 tern.dirty_rate=20000 tern.dirty_fill=data",
        cap_mibps: None,
    },
];

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunEnd {
    /// Completed, the target heartbeats, no panic: the only runs the medians use.
    Ok,
    /// The VMM gave up or did not converge in time.
    NotConverged,
    /// The VMM said "completed" but the target printed no heartbeat afterwards.
    TargetSilent,
    /// A guest printed PANIC.
    Panicked,
    /// The run itself went wrong (a VMM did not start, a QMP command failed); printed.
    Error,
}

/// One migration's figures; `None` fields: not measured.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    end: RunEnd,
    /// Host time between the last source heartbeat line and the first target one, minus `HB_MS`.
    host_gap_ms: Option<f64>,
    /// `maxgap_us` of the first target heartbeat (the guest's own clock).
    guest_gap_ms: Option<f64>,
    /// How far the guest's clock fell behind the host's across the switch-over: the least
    /// (host arrival − guest `t_us`) of the target's heartbeat lines minus that of the source's
    /// lines before the migration (the least filters out late line delivery).
    clock_shift_ms: Option<f64>,
    total_ms: f64,
    bytes: f64,
    rounds: f64,
    vmm_downtime_ms: f64,
    /// The largest throttle the VMM applied, %.
    throttle_max_pct: f64,
    work: Option<WorkRate>,
    /// The VMM's own breakdown of its pause (Tern's `downtime_steps`): step, ms, bytes.
    steps: Vec<(String, f64, f64)>,
    /// Tern's rounds one by one (its report's `rounds_detail`; empty for QEMU, or a Tern build
    /// whose report has none).
    rounds_detail: Vec<RoundFigures>,
}

impl Sample {
    fn failed(end: RunEnd) -> Sample {
        Sample {
            end,
            host_gap_ms: None,
            guest_gap_ms: None,
            clock_shift_ms: None,
            total_ms: 0.0,
            bytes: 0.0,
            rounds: 0.0,
            vmm_downtime_ms: 0.0,
            throttle_max_pct: 0.0,
            work: None,
            steps: Vec::new(),
            rounds_detail: Vec::new(),
        }
    }

    /// The pause the guest suffered: the largest of the host-timed gap, the guest-timed gap and
    /// the clock shift (each can miss part of it: see the module's comment).
    fn pause_ms(&self) -> Option<f64> {
        [self.host_gap_ms, self.guest_gap_ms, self.clock_shift_ms]
            .into_iter()
            .flatten()
            .reduce(f64::max)
    }
}

/// The writer's pace on the source while the migration ran, as a share of its pace just before.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkRate {
    /// Pages written per second over the whole migration / over the second before it.
    pub(crate) mean_pct: f64,
    /// The slowest heartbeat period during the migration / the pace before.
    pub(crate) min_pct: f64,
}

/// A process whose stdout lines are read on a thread, each with its arrival time.
pub(crate) struct Proc {
    child: Child,
    lines: Receiver<(Instant, String)>,
    pub(crate) seen: Vec<(Instant, String)>,
}

impl Proc {
    pub(crate) fn spawn(mut cmd: Command) -> anyhow::Result<Proc> {
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

    pub(crate) fn wait_line(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
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

    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The number at `path` (object keys) in a JSON reply; a missing or non-numeric field is an error.
fn num(v: &serde_json::Value, path: &[&str]) -> anyhow::Result<f64> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(serde_json::Value::as_f64)
        .with_context(|| format!("no number at {} in {v}", path.join(".")))
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

/// The pause figures of one run.
#[derive(Debug, Clone, Copy, Default)]
struct PauseFigures {
    host_gap_ms: Option<f64>,
    guest_gap_ms: Option<f64>,
    clock_shift_ms: Option<f64>,
}

/// The run's end and its pause figures, from the two consoles once the VMM reported "completed"
/// (`started`: when the migration was asked for).
fn after_completion(src: &mut Proc, dst: &mut Proc, started: Instant) -> (RunEnd, PauseFigures) {
    src.drain(Duration::from_millis(300));
    // A target that runs keeps heartbeating: wait for its first line, then for more.
    let _ = dst.wait_line(Duration::from_secs(10), |l| l.starts_with("HB "));
    dst.drain(Duration::from_millis(1500));
    judge(&src.seen, &dst.seen, started)
}

/// How a completed run ended, and its pause figures, from the lines of both consoles: a panic on
/// either side or fewer than two target heartbeats is a failure.
fn judge(
    src: &[(Instant, String)],
    dst: &[(Instant, String)],
    started: Instant,
) -> (RunEnd, PauseFigures) {
    let heartbeats = |lines: &[(Instant, String)]| -> Vec<(Instant, String)> {
        lines
            .iter()
            .filter(|(_, l)| l.starts_with("HB "))
            .cloned()
            .collect()
    };
    let (src_hbs, dst_hbs) = (heartbeats(src), heartbeats(dst));
    if dst
        .iter()
        .chain(src.iter())
        .any(|(_, l)| l.contains("PANIC"))
    {
        return (RunEnd::Panicked, PauseFigures::default());
    }
    if dst_hbs.len() < 2 {
        return (RunEnd::TargetSilent, PauseFigures::default());
    }
    let (first_at, first_line) = &dst_hbs[0];
    let guest_gap_ms = field(first_line, "maxgap_us").map(|u| u as f64 / 1000.0);
    let host_gap_ms = src_hbs.last().map(|(at, _)| {
        first_at.saturating_duration_since(*at).as_secs_f64() * 1000.0 - HB_MS as f64
    });
    // Host arrival minus guest time, ms, for each heartbeat line; the least of a set.
    let origin = src_hbs.first().map_or(started, |(at, _)| *at);
    let least_offset = |lines: &[&(Instant, String)]| {
        lines
            .iter()
            .filter_map(|(at, l)| {
                let host = at.checked_duration_since(origin)?.as_secs_f64() * 1000.0;
                Some(host - field(l, "t_us")? as f64 / 1000.0)
            })
            .reduce(f64::min)
    };
    let before: Vec<&(Instant, String)> = src_hbs.iter().filter(|(at, _)| *at < started).collect();
    let after: Vec<&(Instant, String)> = dst_hbs.iter().collect();
    let clock_shift_ms = match (least_offset(&before), least_offset(&after)) {
        (Some(b), Some(a)) => Some(a - b),
        _ => None,
    };
    (
        RunEnd::Ok,
        PauseFigures {
            host_gap_ms,
            guest_gap_ms,
            clock_shift_ms,
        },
    )
}

/// The writer's pace during the migration (from `started` to the source's last heartbeat) against
/// the second before it, from the source's `DIRTY pages=<total> rate=<pages/s>` lines.
pub(crate) fn work_rate(src: &[(Instant, String)], started: Instant) -> Option<WorkRate> {
    let dirty: Vec<(Instant, u64, u64)> = src
        .iter()
        .filter(|(_, l)| l.starts_with("DIRTY pages="))
        .filter_map(|(t, l)| Some((*t, field(l, "pages")?, field(l, "rate")?)))
        .collect();
    let before: Vec<&(Instant, u64, u64)> = dirty
        .iter()
        .filter(|(t, _, _)| *t < started && started.duration_since(*t) <= Duration::from_secs(1))
        .collect();
    let during: Vec<&(Instant, u64, u64)> =
        dirty.iter().filter(|(t, _, _)| *t >= started).collect();
    let pace = |a: &(Instant, u64, u64), b: &(Instant, u64, u64)| {
        let secs = b.0.saturating_duration_since(a.0).as_secs_f64();
        (secs > 0.0).then(|| b.1.saturating_sub(a.1) as f64 / secs)
    };
    let base = pace(before.first()?, before.last()?)?;
    let mean = pace(before.last()?, during.last()?)?;
    let min = during.iter().map(|d| d.2).min()? as f64;
    (base > 0.0).then(|| WorkRate {
        mean_pct: 100.0 * mean / base,
        min_pct: 100.0 * min / base,
    })
}

/// One step of Tern's report's `downtime_steps`.
#[derive(Debug, serde::Deserialize)]
struct DowntimeStep {
    step: String,
    us: f64,
    bytes: f64,
}

/// Tern's report's `downtime_steps` as (step, ms, bytes); a report without them or with a
/// malformed step is an error.
fn downtime_steps(r: &serde_json::Value) -> anyhow::Result<Vec<(String, f64, f64)>> {
    let steps: Vec<DowntimeStep> = serde_json::from_value(
        r.get("downtime_steps")
            .cloned()
            .context("the migration report has no downtime_steps")?,
    )
    .context("the migration report's downtime_steps")?;
    Ok(steps
        .into_iter()
        .map(|s| (s.step, s.us / 1000.0, s.bytes))
        .collect())
}

/// Tern's report's `rounds_detail` (empty when the report has none: a build from before it); a
/// malformed one is an error.
fn rounds_detail(r: &serde_json::Value) -> anyhow::Result<Vec<RoundFigures>> {
    match r.get("rounds_detail") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(d) => {
            serde_json::from_value(d.clone()).context("the migration report's rounds_detail")
        }
    }
}

/// One migration's rounds, one line each: time, pages with data and zero pages, bytes, the
/// throttle it ran under, the pages dirty at its end and the policy's decision; a header line
/// first (`who`: which run).
fn rounds_lines(who: &str, rounds: &[RoundFigures]) -> Vec<String> {
    if rounds.is_empty() {
        return vec![format!("{who}: no rounds_detail in the report")];
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    let total_bytes: u64 = rounds.iter().map(|d| d.bytes).sum();
    let total_us: u64 = rounds.iter().map(|d| d.us).sum();
    let mut out = vec![format!(
        "{who}: {} rounds, {:.1} ms, {:.1} MiB in the rounds",
        rounds.len(),
        total_us as f64 / 1000.0,
        mib(total_bytes)
    )];
    for d in rounds {
        let throttle = if d.throttle_pct > 0.0 {
            format!(", throttle {:.1} %", d.throttle_pct)
        } else {
            String::new()
        };
        out.push(format!(
            "    round {:>2} {:>8.1} ms {:>8} data + {:>7} zero pages {:>8.1} MiB{throttle} -> {} dirty, {}",
            d.round,
            d.us as f64 / 1000.0,
            d.pages_data,
            d.pages_zero,
            mib(d.bytes),
            d.dirty_pages,
            d.decision.as_str().replace('_', " ")
        ));
    }
    out
}

/// A workload's rounds over its runs that ended well, one line: per run the MiB of each round and
/// the decisions (`run 1: 257.0 + 86.2 + 0.1 MiB (shrink, switch over, stop and copy)`).
fn rounds_summary(s: &[Sample]) -> Option<String> {
    let runs: Vec<String> = s
        .iter()
        .enumerate()
        .filter(|(_, x)| x.end == RunEnd::Ok && !x.rounds_detail.is_empty())
        .map(|(i, x)| {
            let mib: Vec<String> = x
                .rounds_detail
                .iter()
                .map(|d| format!("{:.1}", d.bytes as f64 / 1048576.0))
                .collect();
            let decisions: Vec<String> = x
                .rounds_detail
                .iter()
                .map(|d| d.decision.as_str().replace('_', " "))
                .collect();
            format!(
                "run {}: {} MiB ({})",
                i + 1,
                mib.join(" + "),
                decisions.join(", ")
            )
        })
        .collect();
    (!runs.is_empty()).then(|| runs.join(" | "))
}

/// The pause step by step over the runs that ended well: per step (in the first run's order)
/// the median ms, the slowest run's ms and the median bytes; then the median of the sums.
fn breakdown_line(s: &[Sample]) -> Option<String> {
    let ok: Vec<&Sample> = s
        .iter()
        .filter(|x| x.end == RunEnd::Ok && !x.steps.is_empty())
        .collect();
    let first = ok.first()?;
    let mut out = String::new();
    for (name, _, _) in &first.steps {
        let of = |f: &dyn Fn(&(String, f64, f64)) -> f64| -> Vec<f64> {
            ok.iter()
                .filter_map(|x| x.steps.iter().find(|st| &st.0 == name).map(f))
                .collect()
        };
        let ms = of(&|st| st.1);
        let max = ms.iter().copied().fold(0.0, f64::max);
        let bytes = median(of(&|st| st.2)).unwrap_or(0.0);
        out += &format!(
            "{name} {} (max {max:.1}){} | ",
            fmt(median(ms), 1.0, 1),
            if bytes > 0.0 {
                format!(" {:.2} MiB", bytes / 1048576.0)
            } else {
                String::new()
            }
        );
    }
    let sums = ok
        .iter()
        .map(|x| x.steps.iter().map(|st| st.1).sum())
        .collect();
    out += &format!("sum {} ms", fmt(median(sums), 1.0, 1));
    Some(out)
}

/// One Tern migration of workload `w`; `receive_extra` and `migrate_extra` are added to the
/// `tern vm receive` and `tern vm migrate` command lines (e.g. `--tls-dir`).
pub(crate) fn tern_run(
    tern: &Path,
    elf: &Path,
    dir: &Path,
    w: &Workload,
    receive_extra: &[&str],
    migrate_extra: &[&str],
) -> anyhow::Result<Sample> {
    let port = free_port();
    let to = format!("127.0.0.1:{port}");
    let rt = dir.join("rt");
    let (ssock, dsock) = (dir.join("src.sock"), dir.join("dst.sock"));
    let mut dst = Proc::spawn({
        let mut c = Command::new(tern);
        c.args(["vm", "receive", "--listen", &to, "--name", "bench-dst"])
            .args(seccomp_args())
            .arg("--api-sock")
            .arg(&dsock)
            .arg("--runtime-dir")
            .arg(&rt)
            .args(receive_extra);
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
            .args(seccomp_args())
            .args(["--name", "bench-src", "--api-sock"])
            .arg(&ssock)
            .arg("--runtime-dir")
            .arg(&rt);
        c
    })?;
    let result = (|| -> anyhow::Result<Sample> {
        wait_steady(&mut src, w)?;
        let started = Instant::now();
        let out = Command::new(tern)
            .args(["vm", "migrate", "--api-sock"])
            .arg(&ssock)
            .args(["--to", &to, "--json"])
            .args(["--streams", &TERN_STREAMS.to_string()])
            .args(["--downtime-ms", &TERN_BUDGET_MS.to_string()])
            .args(
                w.cap_mibps
                    .map(|c| vec!["--max-bandwidth-mibps".to_string(), c.to_string()])
                    .unwrap_or_default(),
            )
            .args(migrate_extra)
            .output()?;
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if !(out.status.success() && r["outcome"] == "completed") {
            return Ok(Sample::failed(RunEnd::NotConverged));
        }
        let (end, pause) = after_completion(&mut src, &mut dst, started);
        if let Some(n) = r["pages_resent_after_checksum_mismatch"].as_u64() {
            eprintln!("  pages sent again after a checksum mismatch: {n}");
        }
        Ok(Sample {
            end,
            host_gap_ms: pause.host_gap_ms,
            guest_gap_ms: pause.guest_gap_ms,
            clock_shift_ms: pause.clock_shift_ms,
            total_ms: num(&r, &["total_ms"])?,
            bytes: num(&r, &["bytes_sent"])?,
            rounds: num(&r, &["rounds"])?,
            vmm_downtime_ms: num(&r, &["downtime_ms"])?,
            throttle_max_pct: num(&r, &["throttle_max_pct"])?,
            work: work_rate(&src.seen, started),
            steps: downtime_steps(&r)?,
            // The rounds are shown, not measured: a build whose rounds this xtask cannot read
            // (an older or newer `--tern BIN`) keeps its run, without them.
            rounds_detail: rounds_detail(&r).unwrap_or_else(|e| {
                eprintln!("  ({e:#}: its rounds are not shown)");
                Vec::new()
            }),
        })
    })();
    src.stop();
    dst.stop();
    let _ = std::fs::remove_file(&ssock);
    let _ = std::fs::remove_file(&dsock);
    result
}

pub(crate) struct Qmp {
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

    pub(crate) fn cmd(
        &mut self,
        name: &str,
        args: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
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

/// QEMU's migration settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QemuSetup {
    /// As an operator would tune it to match Tern: downtime limit = Tern's budget, auto-converge,
    /// multifd with Tern's stream count, bandwidth cap lifted.
    Tuned,
    /// QEMU's defaults.
    Defaults,
}

fn qemu_cmd(qemu: &str, elf: &Path, w: &Workload, tsc_hz: u64, qmp: &Path) -> Command {
    let cfg = QemuConfig {
        kernel: elf.to_path_buf(),
        cmdline: w.cmdline.to_string(),
        memory_mib: w.memory_mib,
        vcpus: 1,
        tsc_hz,
        disk: None,
        virtio_modern: false,
        net: None,
    };
    let mut c = Command::new(qemu);
    c.args(cfg.args())
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    c
}

/// Sets up one side of a tuned migration (`source`: also the source-only parameters).
fn qemu_tune(q: &mut Qmp, source: bool, cap_mibps: Option<u64>) -> anyhow::Result<()> {
    let mut caps = vec![serde_json::json!({ "capability": "multifd", "state": true })];
    if source {
        caps.push(serde_json::json!({ "capability": "auto-converge", "state": true }));
    }
    q.cmd(
        "migrate-set-capabilities",
        serde_json::json!({ "capabilities": caps }),
    )?;
    let mut params = serde_json::json!({ "multifd-channels": TERN_STREAMS });
    if source {
        params["downtime-limit"] = TERN_BUDGET_MS.into();
        params["max-bandwidth"] = cap_mibps
            .map_or(QEMU_TUNED_BANDWIDTH, |c| c * 1024 * 1024)
            .into();
    }
    q.cmd("migrate-set-parameters", params)?;
    Ok(())
}

/// One QEMU migration of workload `w`; `prepare(qmp, is_source)` runs on each side after the
/// tuning and before the target listens (e.g. to add TLS credentials).
#[allow(clippy::too_many_arguments)]
pub(crate) fn qemu_run(
    args: &MigrateArgs,
    elf: &Path,
    dir: &Path,
    w: &Workload,
    tsc_hz: u64,
    setup: QemuSetup,
    prepare: &dyn Fn(&mut Qmp, bool) -> anyhow::Result<()>,
) -> anyhow::Result<Sample> {
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let (q1, q2) = (dir.join("q1.sock"), dir.join("q2.sock"));
    let _ = std::fs::remove_file(&q1);
    let _ = std::fs::remove_file(&q2);
    // `-incoming defer`: multifd must be on at the target before it listens.
    let mut dst = Proc::spawn({
        let mut c = qemu_cmd(&args.qemu, elf, w, tsc_hz, &q2);
        c.args(["-incoming", "defer"]);
        c
    })?;
    let mut src = Proc::spawn(qemu_cmd(&args.qemu, elf, w, tsc_hz, &q1))?;
    let result = (|| -> anyhow::Result<Sample> {
        // Both QEMUs fully up before anything is timed.
        let mut qd = Qmp::connect(&q2, Duration::from_secs(60))?;
        let mut q = Qmp::connect(&q1, Duration::from_secs(60))?;
        wait_steady(&mut src, w)?;
        if setup == QemuSetup::Tuned {
            qemu_tune(&mut qd, false, w.cap_mibps)?;
            qemu_tune(&mut q, true, w.cap_mibps)?;
        }
        prepare(&mut qd, false)?;
        prepare(&mut q, true)?;
        qd.cmd("migrate-incoming", serde_json::json!({ "uri": uri }))?;
        let started = Instant::now();
        q.cmd("migrate", serde_json::json!({ "uri": uri }))?;
        let deadline = Instant::now() + Duration::from_secs(args.qemu_timeout_s);
        let mut throttle_max = 0.0f64;
        let info = loop {
            std::thread::sleep(Duration::from_millis(20));
            let i = q.cmd("query-migrate", serde_json::json!({}))?;
            if let Some(t) = i["cpu-throttle-percentage"].as_f64() {
                throttle_max = throttle_max.max(t);
            }
            // Right after `migrate`, QEMU may answer `{}` (no migration state yet).
            if i.as_object().is_some_and(|o| o.is_empty()) && Instant::now() < deadline {
                continue;
            }
            let status = i
                .get("status")
                .and_then(serde_json::Value::as_str)
                .with_context(|| format!("query-migrate without a status: {i}"))?;
            match status {
                "completed" | "failed" | "cancelled" => break i,
                _ if Instant::now() > deadline => {
                    let _ = q.cmd("migrate_cancel", serde_json::json!({}));
                    break i;
                }
                _ => {}
            }
        };
        if info["status"] != "completed" {
            return Ok(Sample::failed(RunEnd::NotConverged));
        }
        let (end, pause) = after_completion(&mut src, &mut dst, started);
        Ok(Sample {
            end,
            host_gap_ms: pause.host_gap_ms,
            guest_gap_ms: pause.guest_gap_ms,
            clock_shift_ms: pause.clock_shift_ms,
            total_ms: num(&info, &["total-time"])?,
            bytes: num(&info, &["ram", "transferred"])?,
            rounds: num(&info, &["ram", "dirty-sync-count"])?,
            vmm_downtime_ms: num(&info, &["downtime"])?,
            throttle_max_pct: throttle_max,
            work: work_rate(&src.seen, started),
            steps: Vec::new(),
            rounds_detail: Vec::new(),
        })
    })();
    src.stop();
    dst.stop();
    result
}

/// A run that went wrong is printed and counted as a failed run; the others go on.
pub(crate) fn or_error(vmm: &str, r: anyhow::Result<Sample>) -> Sample {
    r.unwrap_or_else(|e| {
        eprintln!("{vmm}: run failed: {e:#}");
        Sample::failed(RunEnd::Error)
    })
}

pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
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
pub(crate) struct Medians {
    pub(crate) ok: usize,
    pub(crate) runs: usize,
    pub(crate) not_converged: usize,
    pub(crate) target_silent: usize,
    pub(crate) panicked: usize,
    pub(crate) errors: usize,
    pub(crate) pause: Option<f64>,
    pub(crate) host_gap: Option<f64>,
    pub(crate) guest_gap: Option<f64>,
    pub(crate) clock_shift: Option<f64>,
    pub(crate) total: Option<f64>,
    pub(crate) bytes: Option<f64>,
    pub(crate) rounds: Option<f64>,
    pub(crate) downtime: Option<f64>,
    pub(crate) throttle: Option<f64>,
    pub(crate) work_mean: Option<f64>,
    pub(crate) work_min: Option<f64>,
}

/// Medians over the runs that ended well only; the others are counted by how they ended.
pub(crate) fn medians(s: &[Sample]) -> Medians {
    let ok: Vec<&Sample> = s.iter().filter(|x| x.end == RunEnd::Ok).collect();
    let m = |f: &dyn Fn(&Sample) -> Option<f64>| median(ok.iter().filter_map(|x| f(x)).collect());
    let count = |e: RunEnd| s.iter().filter(|x| x.end == e).count();
    Medians {
        ok: ok.len(),
        runs: s.len(),
        not_converged: count(RunEnd::NotConverged),
        target_silent: count(RunEnd::TargetSilent),
        panicked: count(RunEnd::Panicked),
        errors: count(RunEnd::Error),
        pause: m(&|x| x.pause_ms()),
        host_gap: m(&|x| x.host_gap_ms),
        guest_gap: m(&|x| x.guest_gap_ms),
        clock_shift: m(&|x| x.clock_shift_ms),
        total: m(&|x| Some(x.total_ms)),
        bytes: m(&|x| Some(x.bytes)),
        rounds: m(&|x| Some(x.rounds)),
        downtime: m(&|x| Some(x.vmm_downtime_ms)),
        throttle: m(&|x| Some(x.throttle_max_pct)),
        work_mean: m(&|x| x.work.map(|w| w.mean_pct)),
        work_min: m(&|x| x.work.map(|w| w.min_pct)),
    }
}

pub(crate) fn fmt(v: Option<f64>, scale: f64, prec: usize) -> String {
    v.map_or("–".into(), |x| format!("{:.*}", prec, x / scale))
}

pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        (Some(_), None) => "peer did not converge".into(),
        _ => "–".into(),
    }
}

pub fn run(args: MigrateArgs) -> anyhow::Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    if let Some(bad) = args
        .workload
        .iter()
        .find(|n| !WORKLOADS.iter().any(|w| w.name == n.as_str()))
    {
        let names: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
        bail!(
            "--workload {bad}: no such workload (one of {})",
            names.join(", ")
        );
    }
    if let Some(m) = &args.tern_seccomp {
        let _ = TERN_SECCOMP.set(m.clone());
    }
    let tern = match &args.tern {
        Some(t) => t.clone(),
        None => build_release_tern()?,
    };
    let dir = scratch_dir("migrate")?;
    let elf = export_testguest(&tern, &dir)?;
    let qemu_version = peer_version(&args.qemu)?;
    let load_before = load_average();
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
        let (mut t, mut qt, mut qd) = (Vec::new(), Vec::new(), Vec::new());
        let mut tp = Vec::new(); // post-copy row
        let mut ti = Vec::new(); // copied row
        let post_copy: &[&str] = &["--post-copy-after", "2"];
        for run in 0..args.runs {
            eprintln!("{}: run {}/{}", w.label, run + 1, args.runs);
            // Interleaved, so host noise hits all alike.
            let s = or_error("tern", tern_run(&tern, &elf, &dir, w, &[], &[]));
            if s.end == RunEnd::Ok {
                let who = format!("tern, {}, run {}", w.label, run + 1);
                for l in rounds_lines(&who, &s.rounds_detail) {
                    println!("{l}");
                }
            }
            t.push(s);
            if args.post_copy && w.name != "idle" {
                let r = tern_run(&tern, &elf, &dir, w, &[], post_copy);
                tp.push(or_error("tern post-copy", r));
            }
            if args.copy_pages {
                let r = tern_run(&tern, &elf, &dir, w, &[], &["--copy-pages"]);
                ti.push(or_error("tern copied", r));
            }
            qt.push(or_error(
                "qemu tuned",
                qemu_run(&args, &elf, &dir, w, tsc_hz, QemuSetup::Tuned, &|_, _| {
                    Ok(())
                }),
            ));
            if w.cap_mibps.is_none() && !args.skip_qemu_defaults {
                qd.push(or_error(
                    "qemu defaults",
                    qemu_run(
                        &args,
                        &elf,
                        &dir,
                        w,
                        tsc_hz,
                        QemuSetup::Defaults,
                        &|_, _| Ok(()),
                    ),
                ));
            }
        }
        rows.push((
            w,
            medians(&t),
            medians(&qt),
            medians(&qd),
            (breakdown_line(&t), rounds_summary(&t)),
            medians(&tp),
            medians(&ti),
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "\nlive migration on loopback, medians of {} runs each, same ELF (tern.hb_ms={HB_MS}), 1 GiB guests but `large` (4 GiB); peer: {qemu_version} -M microvm -bios {QEMU_FIRMWARE}, KVM",
        args.runs
    );
    println!(
        "tern: {TERN_STREAMS} streams, {TERN_BUDGET_MS} ms budget, its throttle, no cap; qemu tuned: downtime-limit {TERN_BUDGET_MS} ms, auto-converge, multifd {TERN_STREAMS} channels, max-bandwidth {} GB/s; qemu defaults: 300 ms, 128 MiB/s, one stream; a workload with a cap gives it to tern and qemu tuned alike, and skips qemu defaults",
        QEMU_TUNED_BANDWIDTH / 1_000_000_000
    );
    println!(
        "pause = max(host gap between heartbeat lines - {HB_MS} ms, guest maxgap, guest clock shift), medians of per-run figures; work = the guest writer's pace during the migration, % of its pace before (mean / slowest {HB_MS} ms period)"
    );
    println!(
        "load average: before {load_before}, after {}",
        load_average()
    );
    println!("tern binary: {}", tern.display());
    println!(
        "{:<26} {:<14} {:>5} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8} {:>8} {:>6} {:>9} {:>12} {:>13}",
        "workload",
        "vmm",
        "ok",
        "pause ms",
        "host gap",
        "guest gap",
        "clk shift",
        "vmm dt",
        "total ms",
        "MiB sent",
        "rounds",
        "throttle%",
        "work % m/min",
        "failed"
    );
    for (w, t, qt, qd, (tb, tr), tp, ti) in &rows {
        let rows = [("tern", t), ("tern post-copy", tp), ("tern copied", ti)];
        for (name, m) in rows
            .into_iter()
            .chain([("qemu tuned", qt), ("qemu defaults", qd)])
        {
            if m.runs == 0 {
                continue;
            }
            println!(
                "{:<26} {:<14} {:>5} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8} {:>8} {:>6} {:>9} {:>12} {:>13}",
                w.label,
                name,
                format!("{}/{}", m.ok, m.runs),
                fmt(m.pause, 1.0, 1),
                fmt(m.host_gap, 1.0, 1),
                fmt(m.guest_gap, 1.0, 1),
                fmt(m.clock_shift, 1.0, 1),
                fmt(m.downtime, 1.0, 0),
                fmt(m.total, 1.0, 0),
                fmt(m.bytes, 1048576.0, 1),
                fmt(m.rounds, 1.0, 0),
                fmt(m.throttle, 1.0, 0),
                format!("{}/{}", fmt(m.work_mean, 1.0, 0), fmt(m.work_min, 1.0, 0)),
                format!(
                    "{}nc {}s {}p {}e",
                    m.not_converged, m.target_silent, m.panicked, m.errors
                ),
            );
        }
        let mut ratios = format!(
            "ratios tern/qemu-tuned: pause {}, total {}, bytes {}, work {}",
            ratio(t.pause, qt.pause),
            ratio(t.total, qt.total),
            ratio(t.bytes, qt.bytes),
            ratio(t.work_mean, qt.work_mean),
        );
        if qd.runs > 0 {
            ratios += &format!(
                "; tern/qemu-defaults: pause {}, total {}, bytes {}, work {}",
                ratio(t.pause, qd.pause),
                ratio(t.total, qd.total),
                ratio(t.bytes, qd.bytes),
                ratio(t.work_mean, qd.work_mean),
            );
        }
        println!("{:<26} {ratios}", "");
        if ti.runs > 0 {
            println!(
                "{:<26} ratios tern-copied/qemu-tuned: pause {}, total {}, bytes {}, work {}",
                "",
                ratio(ti.pause, qt.pause),
                ratio(ti.total, qt.total),
                ratio(ti.bytes, qt.bytes),
                ratio(ti.work_mean, qt.work_mean),
            );
        }
        if let Some(b) = tb {
            println!(
                "{:<26} tern pause by step, ms (median over {} runs, slowest): {b}",
                "", t.ok
            );
        }
        if let Some(r) = tr {
            println!("{:<26} tern rounds by run: {r}", "");
        }
    }
    println!(
        "failed: nc = did not complete in time, s = completed but the target never heartbeat, p = a guest panicked, e = the run went wrong (printed above); none of these enter the medians"
    );
    println!(
        "goals: pause <= 0.5x QEMU's where above ~10 ms noise; total <= QEMU's; bytes <= QEMU's; work (the guest writer's pace during the migration) >= QEMU's; convergence where QEMU defaults do not"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines at `origin + ms`.
    fn at(origin: Instant, lines: &[(u64, &str)]) -> Vec<(Instant, String)> {
        lines
            .iter()
            .map(|(ms, l)| (origin + Duration::from_millis(*ms), l.to_string()))
            .collect()
    }

    #[test]
    fn a_frozen_guest_clock_shows_the_pause_as_host_gap_and_clock_shift() {
        // QEMU-like: the guest clock stops for 30 ms; heartbeats every 20 ms of guest time.
        let o = Instant::now();
        let src = at(
            o,
            &[
                (0, "HB seq=1 t_us=0 maxgap_us=100"),
                (20, "HB seq=2 t_us=20000 maxgap_us=100"),
                (40, "HB seq=3 t_us=40000 maxgap_us=100"),
            ],
        );
        let dst = at(
            o,
            &[
                (90, "HB seq=4 t_us=60000 maxgap_us=200"),
                (110, "HB seq=5 t_us=80000 maxgap_us=100"),
            ],
        );
        let (end, p) = judge(&src, &dst, o + Duration::from_millis(30));
        assert_eq!(end, RunEnd::Ok);
        assert!((p.host_gap_ms.unwrap() - 30.0).abs() < 0.5, "{p:?}");
        assert!((p.clock_shift_ms.unwrap() - 30.0).abs() < 0.5, "{p:?}");
        assert!((p.guest_gap_ms.unwrap() - 0.2).abs() < 1e-9);
    }

    #[test]
    fn a_running_guest_clock_shows_the_pause_as_its_own_gap() {
        // Tern-like with a busy guest: the clock runs on through a 30 ms pause starting just after
        // seq=3, so the overdue heartbeat comes at once on resume and the guest's gap shows it.
        let o = Instant::now();
        let src = at(
            o,
            &[
                (0, "HB seq=1 t_us=0 maxgap_us=100"),
                (20, "HB seq=2 t_us=20000 maxgap_us=100"),
                (40, "HB seq=3 t_us=40000 maxgap_us=100"),
            ],
        );
        let dst = at(
            o,
            &[
                (71, "HB seq=4 t_us=71000 maxgap_us=30000"),
                (80, "HB seq=5 t_us=80000 maxgap_us=100"),
            ],
        );
        let (end, p) = judge(&src, &dst, o + Duration::from_millis(30));
        assert_eq!(end, RunEnd::Ok);
        assert!(p.host_gap_ms.unwrap() < 15.0, "{p:?}");
        assert!(p.clock_shift_ms.unwrap().abs() < 0.5, "{p:?}");
        let s = Sample {
            end,
            host_gap_ms: p.host_gap_ms,
            guest_gap_ms: p.guest_gap_ms,
            clock_shift_ms: p.clock_shift_ms,
            ..Sample::failed(RunEnd::Ok)
        };
        assert_eq!(s.pause_ms(), Some(30.0));
    }

    #[test]
    fn the_breakdown_takes_medians_per_step_over_the_good_runs_only() {
        let r: serde_json::Value = serde_json::from_str(
            r#"{"downtime_steps":[{"step":"dirty_log","us":500,"bytes":0},
                {"step":"final_pages","us":3000,"bytes":2097152},{"step":"ack","us":1500,"bytes":0}]}"#,
        )
        .unwrap();
        let run = |scale: f64, end: RunEnd| Sample {
            steps: downtime_steps(&r)
                .unwrap()
                .into_iter()
                .map(|(n, ms, b)| (n, ms * scale, b))
                .collect(),
            ..Sample::failed(end)
        };
        let runs = [
            run(1.0, RunEnd::Ok),
            run(3.0, RunEnd::Ok),
            run(2.0, RunEnd::Ok),
            run(100.0, RunEnd::TargetSilent),
        ];
        assert_eq!(
            breakdown_line(&runs).unwrap(),
            "dirty_log 1.0 (max 1.5) | final_pages 6.0 (max 9.0) 2.00 MiB | ack 3.0 (max 4.5) | sum 10.0 ms"
        );
        assert_eq!(breakdown_line(&runs[3..]), None);
    }

    #[test]
    fn ratios_name_a_peer_that_did_not_converge() {
        assert_eq!(ratio(Some(1.0), Some(2.0)), "0.50x");
        assert_eq!(ratio(Some(1.0), None), "peer did not converge");
        assert_eq!(ratio(None, None), "–");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "–");
    }

    #[test]
    fn rounds_print_one_line_each_and_a_summary_per_workload() {
        let r: serde_json::Value = serde_json::from_str(
            r#"{"rounds_detail":[
                {"round":0,"us":195000,"pages_data":65536,"pages_zero":120,"bytes":269484032,
                 "dirty_pages":21000,"throttle_pct":0.0,"decision":"shrink"},
                {"round":1,"us":46500,"pages_data":21000,"pages_zero":0,"bytes":86114304,
                 "dirty_pages":300,"throttle_pct":90.0,"decision":"switch_over"},
                {"round":2,"us":600,"pages_data":310,"pages_zero":2,"bytes":1310720,
                 "dirty_pages":0,"throttle_pct":0.0,"decision":"stop_and_copy"}]}"#,
        )
        .unwrap();
        let rounds = rounds_detail(&r).unwrap();
        let lines = rounds_lines("tern, max, run 1", &rounds);
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert_eq!(
            lines[0],
            "tern, max, run 1: 3 rounds, 242.1 ms, 340.4 MiB in the rounds"
        );
        assert_eq!(
            lines[1],
            "    round  0    195.0 ms    65536 data +     120 zero pages    257.0 MiB -> 21000 dirty, shrink"
        );
        assert!(
            lines[2].ends_with("82.1 MiB, throttle 90.0 % -> 300 dirty, switch over"),
            "{}",
            lines[2]
        );
        assert!(
            lines[3].ends_with("-> 0 dirty, stop and copy"),
            "{}",
            lines[3]
        );

        // An older report has none; a malformed one is an error, not an empty list.
        assert!(
            rounds_detail(&serde_json::json!({"rounds": 3}))
                .unwrap()
                .is_empty()
        );
        assert!(rounds_detail(&serde_json::json!({"rounds_detail": [{"round": 0}]})).is_err());
        assert_eq!(
            rounds_lines("x", &[]),
            vec!["x: no rounds_detail in the report".to_string()]
        );

        let ok = Sample {
            rounds_detail: rounds.clone(),
            ..Sample::failed(RunEnd::Ok)
        };
        let failed = Sample {
            rounds_detail: rounds,
            ..Sample::failed(RunEnd::TargetSilent)
        };
        assert_eq!(
            rounds_summary(&[failed, ok]).unwrap(),
            "run 2: 257.0 + 82.1 + 1.2 MiB (shrink, switch over, stop and copy)"
        );
        assert_eq!(rounds_summary(&[Sample::failed(RunEnd::Ok)]), None);
    }

    #[test]
    fn a_silent_or_panicking_target_fails_the_run_and_stays_out_of_the_medians() {
        let o = Instant::now();
        let src = at(o, &[(0, "HB seq=1 t_us=0 maxgap_us=100")]);
        let one = at(o, &[(50, "HB seq=2 t_us=20000 maxgap_us=100")]);
        assert_eq!(judge(&src, &[], o).0, RunEnd::TargetSilent);
        assert_eq!(judge(&src, &one, o).0, RunEnd::TargetSilent);
        let mut panicked = at(
            o,
            &[
                (50, "HB seq=2 t_us=20000 maxgap_us=100"),
                (70, "HB seq=3 t_us=40000 maxgap_us=100"),
            ],
        );
        panicked.push((o, "PANIC at workload.rs".into()));
        assert_eq!(judge(&src, &panicked, o).0, RunEnd::Panicked);

        let good = |ms: f64| Sample {
            host_gap_ms: Some(ms),
            total_ms: 100.0,
            ..Sample::failed(RunEnd::Ok)
        };
        let runs = [
            good(10.0),
            Sample::failed(RunEnd::TargetSilent),
            good(30.0),
            Sample::failed(RunEnd::NotConverged),
            Sample::failed(RunEnd::Panicked),
        ];
        let m = medians(&runs);
        assert_eq!((m.ok, m.runs), (2, 5));
        assert_eq!((m.target_silent, m.not_converged, m.panicked), (1, 1, 1));
        assert_eq!(m.pause, Some(20.0));
        assert_eq!(m.total, Some(100.0));
    }

    #[test]
    fn work_rate_compares_the_pace_during_the_migration_with_the_second_before() {
        let o = Instant::now();
        // 100 pages per 20 ms before (5000/s); from 100 ms on, 10 pages per 20 ms (500/s).
        let src = at(
            o,
            &[
                (0, "DIRTY pages=0 rate=5000"),
                (20, "DIRTY pages=100 rate=5000"),
                (40, "DIRTY pages=200 rate=5000"),
                (60, "DIRTY pages=300 rate=5000"),
                (80, "DIRTY pages=400 rate=5000"),
                (100, "DIRTY pages=410 rate=500"),
                (120, "DIRTY pages=420 rate=500"),
            ],
        );
        let w = work_rate(&src, o + Duration::from_millis(90)).unwrap();
        assert!((w.mean_pct - 10.0).abs() < 0.5, "{w:?}");
        assert!((w.min_pct - 10.0).abs() < 0.5, "{w:?}");
        assert!(work_rate(&src[..3], o + Duration::from_millis(90)).is_none());
    }
}

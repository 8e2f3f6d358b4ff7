//! Telemetry: every interval the agent measures its VMs and host and posts an [`AgentReport`] to
//! the leading controller; the last one shows in `GET /v1/agent/status` as `telemetry`.
//!
//! - **CPU**: vCPU threads' and VMM processes' CPU time from `/proc`, turned into utilisation
//!   under `--cpu-share` by [`crate::telemetry::utilization`].
//! - **Dirty-page rate**: each running VM that is not migrating is sampled every
//!   [`DIRTY_PERIOD_MS`] (staggered across VMs by [`crate::telemetry::dirty_due`]) over a
//!   [`DIRTY_WINDOW`], through `tern_vmctl::dirty_rate` on a blocking task so the interval never
//!   waits for it. Every report carries the VM's last sample; a failed sample is logged once per
//!   VMM and leaves the field out.
//! - **Non-zero guest RAM**: after each good dirty-rate sample, the resident guest pages that are
//!   not zero, estimated from pages drawn at random ([`procfs::guest_nonzero_kib`]): what a
//!   migration's first pass sends, which the resident figure over-counts by whole huge pages. A
//!   failed estimate is logged once per VMM and leaves the field out.
//! - **Parked cores**: the parking daemon's own code (`tern_parking::daemon::Daemon`) runs on a
//!   thread of its own over this agent's runtime directory, so it sees and (with `--parking on`)
//!   confines only this agent's vCPU threads.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_api::agent::ObservedState;
use tokio::sync::{mpsc, oneshot};

use super::{Event, TICK, children, http, lease, procfs};
use crate::telemetry::{self as calc, CpuShare, ParkingMode};

/// How long one dirty-rate sample watches the guest. Short, because a migration of the VM that
/// started during a sample used to wait for it to end before it could arm the dirty log (the
/// VMM holds its dirty-logging lock over the window): with 200 ms, a move that started during
/// one took 82–128 ms in the source VMM against 30–37 ms (round 0 waited 51–91 ms), on the test
/// cluster. The VMM now cuts a sample short within 1 ms when a migration wants the lock; a
/// short window also keeps the guest's write-protection faults few. The rate's resolution is
/// 20 pages/s, far below the rates that slow a migration.
pub const DIRTY_WINDOW: Duration = Duration::from_millis(50);
/// How often each VM's dirty rate is sampled, ms.
pub const DIRTY_PERIOD_MS: u64 = 5_000;
/// "No parked-core figure yet" in the shared counter.
const NO_FIGURE: u64 = u64::MAX;

/// What the telemetry task needs.
pub(crate) struct Config {
    pub interval: Duration,
    pub runtime_dir: PathBuf,
    pub cpu_share: CpuShare,
    pub cores: u32,
    /// The parking thread's latest parked-CPU count ([`NO_FIGURE`] until it has one).
    pub parked: Arc<AtomicU64>,
    /// TLS to the controller (the host's certificate), when the agent has a `--tls-dir`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// A VM's CPU times at the previous interval.
struct CpuPrev {
    pid: u32,
    vcpu_ticks: u64,
    vmm_ticks: u64,
}

/// The dirty-rate samples, shared with their blocking tasks.
#[derive(Default)]
struct Dirty {
    /// VM → (its VMM's pid, last rate in pages/s, or `None` after a failure).
    last: HashMap<String, (u32, Option<f64>)>,
    /// VM → (its VMM's pid, its non-zero resident guest RAM in KiB), taken with each sample.
    nonzero: HashMap<String, (u32, u64)>,
    /// VMs with a sample under way.
    in_flight: HashSet<String>,
    /// (VM, pid) whose failure was logged.
    logged: HashSet<(String, u32)>,
    /// (VM, pid) whose non-zero RAM failure was logged.
    logged_nonzero: HashSet<(String, u32)>,
}

fn lock(d: &Mutex<Dirty>) -> std::sync::MutexGuard<'_, Dirty> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts one dirty-rate sample of `vm` (VMM `pid` started at `start_ticks`, control socket
/// `sock`) on a blocking task, and after a good one the non-zero RAM estimate.
fn sample_dirty(dirty: &Arc<Mutex<Dirty>>, vm: String, pid: u32, start_ticks: u64, sock: PathBuf) {
    if !lock(dirty).in_flight.insert(vm.clone()) {
        return;
    }
    let dirty = dirty.clone();
    tokio::task::spawn_blocking(move || {
        let got = tern_vmctl::dirty_rate(&sock, DIRTY_WINDOW);
        // only after a good sample: a failed one says the VMM is busy or gone
        let nonzero = got.is_ok().then(|| {
            let seed = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), pid);
            procfs::guest_nonzero_kib(pid, start_ticks, seed)
        });
        let mut d = lock(&dirty);
        d.in_flight.remove(&vm);
        match nonzero {
            Some(Ok(k)) => {
                d.nonzero.insert(vm.clone(), (pid, k));
            }
            Some(Err(e)) => {
                if d.logged_nonzero.insert((vm.clone(), pid)) {
                    let mut msg = e.to_string();
                    let mut cause = std::error::Error::source(&e);
                    while let Some(c) = cause {
                        msg += &format!(": {c}");
                        cause = c.source();
                    }
                    eprintln!("tern agent: cannot estimate the non-zero guest RAM of {vm}: {msg}");
                }
                d.nonzero.remove(&vm);
            }
            None => {
                d.nonzero.remove(&vm);
            }
        }
        match got {
            Ok(r) if r.window_ms > 0 => {
                let rate = r.pages as f64 * 1000.0 / r.window_ms as f64;
                d.last.insert(vm, (pid, Some(rate)));
            }
            Ok(_) => {}
            Err(e) => {
                if d.logged.insert((vm.clone(), pid)) {
                    eprintln!("tern agent: cannot sample the dirty-page rate of {vm}: {e}");
                }
                d.last.insert(vm, (pid, None));
            }
        }
    });
}

/// Samples telemetry every interval and posts a report to the leading controller.
pub(crate) async fn run(mut client: etcd_client::Client, events: mpsc::Sender<Event>, cfg: Config) {
    let start = tokio::time::Instant::now();
    let mut prev_vm: HashMap<String, CpuPrev> = HashMap::new();
    let mut prev_at: Option<u64> = None;
    let mut prev_host: Option<(u64, u64)> = None;
    let dirty = Arc::new(Mutex::new(Dirty::default()));
    let every = calc::dirty_every(DIRTY_PERIOD_MS, cfg.interval.as_millis() as u64);
    let mut interval_no: u64 = 0;
    let mut leader: Option<String> = None;
    let mut last_error = String::new();
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        interval_no += 1;
        let (tx, rx) = oneshot::channel();
        if events.send(Event::Snapshot(tx)).await.is_err() {
            return;
        }
        let Ok(snap) = rx.await else { return };
        let now = start.elapsed().as_millis() as u64;
        let elapsed_s = prev_at.map(|p| now.saturating_sub(p) as f64 / 1000.0);
        prev_at = Some(now);
        let mut report = snap.report;
        let pids: HashMap<String, u32> = snap
            .status
            .vms
            .iter()
            .filter_map(|v| Some((v.name.clone(), v.pid?)))
            .collect();
        // VMs whose dirty rate may be sampled: running, not migrating, by name.
        let mut sampleable: Vec<(String, u32)> = snap
            .status
            .vms
            .iter()
            .filter(|v| v.state == ObservedState::Running && !v.migrating)
            .filter_map(|v| Some((v.name.clone(), v.pid?)))
            .collect();
        sampleable.sort();
        let mut vmm_cpu_s = 0.0;
        for vm in &mut report.vms {
            let Some(&pid) = pids.get(&vm.name) else {
                continue;
            };
            vm.rss_mib = procfs::rss_mib(pid);
            vm.guest_resident_kib = procfs::guest_rss_kib(pid);
            let Some(entry) =
                children::read_entry(&cfg.runtime_dir, &vm.name).filter(|e| e.pid == pid)
            else {
                continue;
            };
            let vcpu_ticks: u64 = entry
                .vcpu_tids
                .iter()
                .filter_map(|&t| procfs::thread_cpu_ticks(pid, t))
                .sum();
            let vmm_ticks = procfs::process_cpu_ticks(pid).unwrap_or(0);
            if let (Some(p), Some(el)) = (prev_vm.get(&vm.name), elapsed_s)
                && p.pid == pid
            {
                let secs = |t: u64| t as f64 / procfs::USER_HZ as f64;
                vm.cpu_utilization = calc::utilization(
                    secs(vcpu_ticks.saturating_sub(p.vcpu_ticks)),
                    el,
                    entry.vcpu_tids.len() as u32,
                    cfg.cpu_share,
                );
                vmm_cpu_s += secs(vmm_ticks.saturating_sub(p.vmm_ticks));
            }
            prev_vm.insert(
                vm.name.clone(),
                CpuPrev {
                    pid,
                    vcpu_ticks,
                    vmm_ticks,
                },
            );
            if let Some(i) = sampleable.iter().position(|(n, _)| n == &vm.name)
                && calc::dirty_due(interval_no, i, every)
                && let Some(sock) = entry.api_sock.clone()
                && let Some(start_ticks) = entry
                    .pid_start_ticks
                    .or_else(|| tern_vmctl::runtime::process_start_ticks(pid))
            {
                sample_dirty(&dirty, vm.name.clone(), pid, start_ticks, sock);
            }
        }
        prev_vm.retain(|name, _| pids.contains_key(name));
        {
            let mut d = lock(&dirty);
            d.last.retain(|name, (pid, _)| pids.get(name) == Some(pid));
            d.nonzero
                .retain(|name, (pid, _)| pids.get(name) == Some(pid));
            for vm in &mut report.vms {
                vm.guest_nonzero_kib = d.nonzero.get(&vm.name).map(|&(_, k)| k);
                vm.dirty_pages_per_sec = d
                    .last
                    .get(&vm.name)
                    .filter(|(pid, _)| pids.get(&vm.name) == Some(pid))
                    .and_then(|(_, r)| *r);
            }
        }
        if cfg.cpu_share.is_whole() {
            if let Some((busy, total)) = procfs::host_cpu() {
                if let Some((b0, t0)) = prev_host
                    && total > t0
                {
                    report.cpu_utilization =
                        Some((busy.saturating_sub(b0)) as f64 / (total - t0) as f64);
                }
                prev_host = Some((busy, total));
            }
        } else if let Some(el) = elapsed_s {
            report.cpu_utilization = calc::utilization(vmm_cpu_s, el, cfg.cores, cfg.cpu_share);
        }
        let parked = cfg.parked.load(Ordering::Relaxed);
        if parked != NO_FIGURE {
            report.parked_cores = Some(calc::parked_cores(parked as usize, cfg.cores));
        }
        if events.send(Event::Telemetry(report.clone())).await.is_err() {
            return;
        }
        if let Some(url) = lease::leader_url(&mut client).await {
            leader = Some(url);
        }
        let Some(url) = &leader else { continue };
        let body = serde_json::to_vec(&report).unwrap_or_default();
        let within = cfg.interval.max(TICK);
        let sent = http::post_json(url, "/v1/agent/reports", body, within, cfg.tls.as_ref()).await;
        let error = match sent {
            Ok(code) if (200..300).contains(&code) => String::new(),
            Ok(code) => format!("the controller at {url} answered {code} to a report"),
            Err(e) => e,
        };
        // Log a change of trouble, not every interval.
        if error != last_error && !error.is_empty() {
            eprintln!("tern agent: {error}");
        }
        last_error = error;
    }
}

/// The parking policy on its own thread, stopped through `stop` (it then restores what it
/// changed).
pub(crate) struct Parking {
    pub parked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Parking {
    /// Starts the parking daemon's policy over the VMs in `runtime_dir` (nothing for
    /// [`ParkingMode::Off`]).
    pub fn start(mode: ParkingMode, runtime_dir: PathBuf) -> Parking {
        let parked = Arc::new(AtomicU64::new(NO_FIGURE));
        let stop = Arc::new(AtomicBool::new(false));
        let mut p = Parking {
            parked: parked.clone(),
            stop: stop.clone(),
            thread: None,
        };
        if mode == ParkingMode::Off {
            return p;
        }
        use tern_parking::daemon::{Daemon, DaemonConfig, DemandSource};
        let cfg = DaemonConfig {
            knobs: tern_parking::knobs::Knobs::default(),
            paths: tern_parking::telemetry::HostPaths::default(),
            // Never bound: the agent's parking has no control socket of its own.
            socket: runtime_dir.join("park.sock"),
            runtime_dir,
            cpus: None,
            cpuset_dir: None,
            irq: false,
            halt_poll_ns: None,
            power: tern_parking::power::PowerSpec::default(),
            demand: DemandSource::Vcpu,
            verbose: false,
        };
        let mut d = match Daemon::new(cfg) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("tern agent: parking off: cannot start the parking policy: {e}");
                return p;
            }
        };
        d.set_actuate(mode == ParkingMode::On);
        let spawned = std::thread::Builder::new()
            .name("parking".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(d.period());
                    d.tick();
                    parked.store(d.parked_cpus() as u64, Ordering::Relaxed);
                }
                d.restore();
            });
        match spawned {
            Ok(t) => p.thread = Some(t),
            Err(e) => eprintln!("tern agent: parking off: cannot start its thread: {e}"),
        }
        p
    }

    /// Stops the policy and waits for it to restore what it changed.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

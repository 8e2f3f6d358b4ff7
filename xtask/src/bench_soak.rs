//! `cargo xtask bench soak`: N consecutive live migrations of one test guest back and forth between
//! two tern-netlab hosts (h0, h1). The guest dirties memory at `--dirty-rate` pages/s, has a disk on
//! the cluster shared volume (etcd in h0, one `tern volume serve` node per host, the VM's disk
//! `volume://NODE/vm1.raw`, the write lease handed over with every migration through
//! `--disk-successor`), and serves one TCP echo connection that a client in the client namespace
//! holds for the whole soak (a request every `--interval-ms`). Every migration runs with
//! `--verify-memory`.
//!
//! Per hop: `tern vm receive` on the other host (its `--disk` on its own node, its `--net` tap),
//! `tern vm migrate --json` from the current one; the report must say `completed` and the source
//! VMM must exit 0. Measured: failures, the client's longest stall per hop and whether the
//! connection broke, each migration's total time and guest pause (the report's `downtime_ms`),
//! the running VMM's and both volume nodes' RSS and open file descriptors after each hop (goal:
//! flat; first, last, max and the least-squares slope per 100 migrations), wall time.
//!
//! Everything started here (processes, namespaces) is owned by a guard and ends on drop, also on
//! error; the scratch folder (logs) stays when a migration failed, for the reproduction.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tern_netlab::ns::{EchoReport, connect_from, stream_echo_from};
use tern_netlab::scenario::{GUEST_MAC, MIGRATION_PORT};
use tern_netlab::{Topology, TopologySpec};
use tern_test_support::ChildGuard;

use crate::bench_common::{build_release_tern, load_average, scratch_dir};

const FILE: &str = "vm1.raw";
const ETCD_PORT: u16 = 2379;
const NODE_PORT: u16 = 10811;

/// Options of `cargo xtask bench soak`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Consecutive migrations (h0 → h1 → h0 …).
    #[arg(long, default_value_t = 200)]
    pub migrations: usize,
    /// Pages per second the guest dirties (`tern.dirty_rate`).
    #[arg(long, default_value_t = 20_000)]
    pub dirty_rate: u64,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// The buffer the guest's writer dirties, MiB (`tern.dirty_mib`).
    #[arg(long, default_value_t = 64)]
    pub dirty_mib: u64,
    /// Time between the client's echo requests, ms.
    #[arg(long, default_value_t = 1)]
    pub interval_ms: u64,
    /// How long the guest runs on its new host before the next migration, ms.
    #[arg(long, default_value_t = 300)]
    pub settle_ms: u64,
    /// Go on after a failed migration (from the host the VM still runs on) instead of stopping.
    #[arg(long)]
    pub keep_going: bool,
}

/// A process started here: killed and reaped on drop; its stdout and stderr go to files.
struct Proc {
    guard: ChildGuard,
    what: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(dir: &Path, tag: &str, what: String, mut cmd: Command) -> anyhow::Result<Proc> {
        let (stdout, stderr) = (
            dir.join(format!("{tag}.stdout")),
            dir.join(format!("{tag}.stderr")),
        );
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout)?)
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        Ok(Proc {
            guard: ChildGuard(child),
            what,
            stdout,
            stderr,
        })
    }

    fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// Waits until `file` (its stdout or stderr) contains `needle`; fails early if it exited.
    fn wait_text(&mut self, stderr: bool, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let file = if stderr { &self.stderr } else { &self.stdout };
        let deadline = Instant::now() + timeout;
        loop {
            if std::fs::read_to_string(file)
                .unwrap_or_default()
                .contains(needle)
            {
                return Ok(());
            }
            if let Some(st) = self.guard.0.try_wait()? {
                bail!(
                    "{} exited ({st}) before printing {needle:?}; stderr: {}",
                    self.what,
                    self.tail()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "{} printed no {needle:?} within {timeout:?}; stderr: {}",
                self.what,
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit; its exit code (None: still running after `timeout`).
    fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.guard.0.try_wait()? {
                return Ok(Some(st.code().unwrap_or(-1)));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last lines of its stderr.
    fn tail(&self) -> String {
        let s = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// A process's resident set (KiB) and open file descriptors, from /proc.
fn rss_fds(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok((rss, fds))
}

/// The lab: dropped in field order, so the VMMs end first, then the volume nodes, etcd, and
/// last the namespaces.
struct Lab {
    vms: [Option<Proc>; 2],
    nodes: Vec<Proc>,
    etcd: Option<Proc>,
    topo: Topology,
    dir: PathBuf,
    tern: PathBuf,
}

impl Lab {
    fn in_host(&self, i: usize, program: &Path) -> Command {
        Topology::command_in(&self.topo.host_ns(i), &program.to_string_lossy())
    }

    fn node_addr(&self, i: usize) -> String {
        format!("{}:{NODE_PORT}", self.topo.host_addr(i))
    }

    /// `tern ARGS` inside host `i`'s namespace: stdout, or the failure with stderr.
    fn tern_in(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let out = self.in_host(i, &self.tern).args(args).output()?;
        ensure!(
            out.status.success(),
            "tern {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn start_volume(&mut self) -> anyhow::Result<()> {
        let url = format!("http://{}:{ETCD_PORT}", self.topo.host_addr(0));
        let peer = format!("http://{}:{}", self.topo.host_addr(0), ETCD_PORT + 1);
        let mut c = self.in_host(0, Path::new("etcd"));
        c.arg("--data-dir")
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")]);
        self.etcd = Some(Proc::spawn(&self.dir, "etcd", "etcd".into(), c)?);
        let lun = self.dir.join("lun");
        let out = Command::new(&self.tern)
            .args(["volume", "format", "--size", "256M", "--lun"])
            .arg(&lun)
            .output()?;
        ensure!(
            out.status.success(),
            "tern volume format: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for i in 0..2 {
            let addr = self.node_addr(i);
            let mut c = self.in_host(i, &self.tern);
            c.args(["volume", "serve", "--node-id", &(i + 1).to_string()])
                .args(["--listen", &addr, "--etcd", &url, "--lun"])
                .arg(&lun);
            let p = Proc::spawn(
                &self.dir,
                &format!("node{}", i + 1),
                format!("volume node {}", i + 1),
                c,
            )?;
            self.nodes.push(p);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let ready = self
                    .tern_in(i, &["volume", "status", "--node", &addr, "--json"])
                    .ok()
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(s.trim()).ok())
                    .is_some_and(|v| v["coordinator"]["node_id"].is_u64());
                if ready {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "volume node {} at {addr} did not come up with a coordinator; stderr: {}",
                    i + 1,
                    self.nodes[i].tail()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        self.tern_in(
            0,
            &[
                "volume",
                "create",
                FILE,
                "--size",
                "64M",
                "--node",
                &self.node_addr(0),
            ],
        )?;
        Ok(())
    }

    fn vm_common(&self, c: &mut Command, host: usize) {
        c.args(["--name", &format!("soak-h{host}")])
            .args([
                "--disk",
                &format!("volume://{}/{FILE}", self.node_addr(host)),
            ])
            .args([
                "--net",
                &format!("tap=soak{host},mac={GUEST_MAC},bridge=br0"),
            ])
            .arg("--api-sock")
            .arg(self.sock(host))
            .arg("--runtime-dir")
            .arg(self.dir.join("rt"));
    }

    fn sock(&self, host: usize) -> PathBuf {
        self.dir.join(format!("h{host}.sock"))
    }
}

/// Least-squares slope of `ys` against their index, times 100 (change per 100 migrations).
fn slope_per_100(ys: &[f64]) -> f64 {
    let n = ys.len() as f64;
    if ys.len() < 2 {
        return 0.0;
    }
    let mx = (n - 1.0) / 2.0;
    let my = ys.iter().sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        num += (i as f64 - mx) * (y - my);
        den += (i as f64 - mx).powi(2);
    }
    num / den * 100.0
}

fn trend(name: &str, unit: &str, ys: &[f64]) {
    if ys.is_empty() {
        return;
    }
    let max = ys.iter().copied().fold(f64::MIN, f64::max);
    println!(
        "  {name:<26} first {:>9.0} {unit}, last {:>9.0}, max {:>9.0}, slope {:>+8.1} {unit} per 100 migrations",
        ys[0],
        ys[ys.len() - 1],
        max,
        slope_per_100(ys)
    );
}

fn spread(name: &str, unit: &str, ys: &[f64]) {
    if ys.is_empty() {
        return;
    }
    let mut v = ys.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    println!(
        "  {name:<26} min {:>8.1} {unit}, median {:>8.1}, p95 {:>8.1}, max {:>8.1}",
        v[0],
        q(0.5),
        q(0.95),
        v[v.len() - 1]
    );
}

/// The fields of `tern vm migrate --json`'s report the soak reads.
#[derive(Debug, serde::Deserialize)]
struct MigrateJson {
    outcome: String,
    total_ms: f64,
    downtime_ms: f64,
}

/// One hop's figures.
#[derive(Debug, Default, Clone)]
struct Hop {
    ok: bool,
    total_ms: f64,
    downtime_ms: f64,
    stall_ms: f64,
    vmm: (u64, u64),
    nodes: [(u64, u64); 2],
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.migrations >= 1,
        "--migrations must be at least 1, not 0"
    );
    ensure!(
        (1..=1_000_000).contains(&args.dirty_rate),
        "--dirty-rate must be 1..=1000000 pages/s, not {}",
        args.dirty_rate
    );
    ensure!(
        args.memory_mib >= 64 && args.dirty_mib < args.memory_mib,
        "--memory-mib must be at least 64 and above --dirty-mib ({}), not {}",
        args.dirty_mib,
        args.memory_mib
    );
    let built = build_release_tern()?;
    let dir = scratch_dir("soak")?;
    // One binary for the whole soak: the shared target folder may be rebuilt while it runs.
    let tern = dir.join("tern");
    std::fs::copy(&built, &tern).with_context(|| format!("copying {}", built.display()))?;
    let mut spec = TopologySpec::new(format!("sk{}", std::process::id()), 2);
    spec.replace_stale = true;
    let topo = Topology::build(spec)?;
    let mut lab = Lab {
        vms: [None, None],
        nodes: Vec::new(),
        etcd: None,
        topo,
        dir: dir.clone(),
        tern,
    };
    let result = soak(&mut lab, &args);
    // Stop the guest cleanly (flush, lease released) before the guards kill the rest.
    for (h, vm) in lab.vms.iter().enumerate() {
        if vm.is_some() {
            let _ = Command::new(&lab.tern)
                .args(["vm", "stop", "--api-sock"])
                .arg(lab.sock(h))
                .output();
        }
    }
    drop(lab);
    match result {
        Ok(true) => {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        }
        Ok(false) => bail!(
            "the soak had failures; logs kept in {} (every process and namespace was stopped)",
            dir.display()
        ),
        Err(e) => Err(e.context(format!(
            "the soak stopped; logs kept in {} (every process and namespace was stopped)",
            dir.display()
        ))),
    }
}

/// Runs the soak in `lab`; Ok(true) when every migration completed and the connection held.
fn soak(lab: &mut Lab, args: &Args) -> anyhow::Result<bool> {
    let started = Instant::now();
    let load_before = load_average();
    lab.start_volume()?;
    let ip = Topology::guest_addr(0);
    let cmdline = format!(
        "tern.hb_ms=500 tern.ip={ip}/24 tern.echo_port=7 tern.blk=verify tern.dirty_mib={} tern.dirty_rate={}",
        args.dirty_mib, args.dirty_rate
    );
    let mut c = lab.in_host(0, &lab.tern);
    c.args(["vm", "run", "--kernel", "builtin:testguest"])
        .args(["--memory-mib", &args.memory_mib.to_string()])
        .args(["--cmdline", &cmdline]);
    lab.vm_common(&mut c, 0);
    let vm_cmd = format!("{c:?}");
    let mut vm = Proc::spawn(
        &lab.dir,
        "vm-0",
        "the source VMM (tern vm run on h0)".into(),
        c,
    )?;
    vm.wait_text(false, "BLK verify ok", Duration::from_secs(60))?;
    vm.wait_text(false, "NET up", Duration::from_secs(30))?;
    lab.vms[0] = Some(vm);
    let _ = Command::new(&lab.tern)
        .args(["vm", "announce", "--api-sock"])
        .arg(lab.sock(0))
        .output();
    std::thread::sleep(Duration::from_millis(100));

    // The client: one connection for the whole soak; one echo report per hop (segment).
    let client_ns = lab.topo.client_ns().context("no client namespace")?;
    let mut stream = connect_from(
        &client_ns,
        SocketAddr::from((ip, 7)),
        Duration::from_secs(5),
    )
    .context("the client cannot connect to the guest's echo server")?;
    let segment = Arc::new(AtomicU64::new(0));
    let seg2 = segment.clone();
    let interval = Duration::from_millis(args.interval_ms);
    let (tx, reports): (_, Receiver<EchoReport>) = channel();
    std::thread::spawn(move || {
        let mut seq = 0;
        loop {
            let mine = seg2.load(Ordering::Relaxed);
            if mine == u64::MAX {
                break;
            }
            let r = stream_echo_from(&mut stream, seq, interval, Duration::from_secs(10), || {
                seg2.load(Ordering::Relaxed) != mine
            });
            seq += r.requests;
            let broken = r.connection_broken;
            if tx.send(r).is_err() || broken {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));

    println!(
        "soak: {} migrations h0 <-> h1, {} MiB guest writing {} pages/s over {} MiB, volume disk, TCP echo every {} ms, --verify-memory; load average {load_before}",
        args.migrations, args.memory_mib, args.dirty_rate, args.dirty_mib, args.interval_ms
    );
    println!(
        "{:>5} {:>5} {:>9} {:>9} {:>9} {:>10} {:>5} {:>10} {:>5} {:>10} {:>5}",
        "hop",
        "dir",
        "total ms",
        "pause ms",
        "stall ms",
        "VMM KiB",
        "fds",
        "node1 KiB",
        "fds",
        "node2 KiB",
        "fds"
    );
    let tty = std::io::stderr().is_terminal();
    let mut hops: Vec<Hop> = Vec::new();
    let mut failures = 0usize;
    let mut broken = 0usize;
    let mut cur = 0usize;
    let mut repro: Option<String> = None;
    for k in 0..args.migrations {
        let dst = 1 - cur;
        let hop_start = Instant::now();
        let listen = format!("{}:{MIGRATION_PORT}", lab.topo.host_addr(dst));
        let mut c = lab.in_host(dst, &lab.tern);
        c.args(["vm", "receive", "--listen", &listen]);
        lab.vm_common(&mut c, dst);
        let recv_cmd = format!("{c:?}");
        let _ = std::fs::remove_file(lab.sock(dst));
        let mut target = Proc::spawn(
            &lab.dir,
            &format!("vm-{}", k + 1),
            format!(
                "the target VMM of migration {} (tern vm receive on h{dst})",
                k + 1
            ),
            c,
        )?;
        target.wait_text(true, "waiting for a migration", Duration::from_secs(20))?;
        let mut m = Command::new(&lab.tern);
        m.args(["vm", "migrate", "--api-sock"])
            .arg(lab.sock(cur))
            .args(["--to", &listen, "--json", "--verify-memory"])
            .args(["--disk-successor", &(dst + 1).to_string()]);
        let migrate_cmd = format!("{m:?}");
        let out = m.output()?;
        let report = String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<MigrateJson>(l).ok());
        let outcome = match &report {
            Some(r) => r.outcome.clone(),
            None => "no report on stdout".to_string(),
        };
        let mut hop = Hop {
            total_ms: report.as_ref().map_or(f64::NAN, |r| r.total_ms),
            downtime_ms: report.as_ref().map_or(f64::NAN, |r| r.downtime_ms),
            ..Hop::default()
        };
        let mut problem = None;
        if out.status.success() && outcome == "completed" {
            // The source VMM stops by itself after a completed migration.
            let src = lab.vms[cur].as_mut().context("no source VMM")?;
            match src.wait_exit(Duration::from_secs(20))? {
                Some(0) => {}
                other => {
                    problem = Some(format!(
                        "the source VMM did not exit 0 after the migration completed ({other:?}); stderr: {}",
                        src.tail()
                    ))
                }
            }
            lab.vms[cur] = None;
            target.wait_text(false, "HB ", Duration::from_secs(10))?;
            lab.vms[dst] = Some(target);
            cur = dst;
            hop.ok = problem.is_none();
        } else {
            problem = Some(format!(
                "tern vm migrate exited {:?}, outcome {outcome:?}; stderr: {}\ntarget stderr: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim(),
                target.tail()
            ));
            let _ = target.wait_exit(Duration::from_secs(20))?;
            drop(target);
        }
        std::thread::sleep(Duration::from_millis(args.settle_ms));
        let running = lab.vms[cur].as_mut().context("no running VMM")?;
        if let Some(code) = running.wait_exit(Duration::ZERO)? {
            let p = format!(
                "the VMM running the guest on h{cur} exited ({code}); stderr: {}",
                running.tail()
            );
            println!("migration {} failed: {p}", k + 1);
            println!(
                "to reproduce: cargo xtask bench soak --migrations {} --dirty-rate {} --memory-mib {} --dirty-mib {}\n  guest: {vm_cmd}\n  target: {recv_cmd}\n  migrate: {migrate_cmd}\n  logs: {}",
                k + 1,
                args.dirty_rate,
                args.memory_mib,
                args.dirty_mib,
                lab.dir.display()
            );
            lab.vms[cur] = None;
            bail!("migration {} of {}: {p}", k + 1, args.migrations);
        }
        hop.vmm = rss_fds(running.pid())?;
        for (i, n) in lab.nodes.iter().enumerate() {
            hop.nodes[i] = rss_fds(n.pid())?;
        }
        // End the client's segment: its longest stall over this hop.
        segment.fetch_add(1, Ordering::Relaxed);
        let echo = reports
            .recv_timeout(Duration::from_secs(15))
            .context("the client thread gave no report")?;
        hop.stall_ms = echo.max_stall_ms;
        if echo.connection_broken {
            broken += 1;
            problem
                .get_or_insert_with(String::new)
                .push_str(&format!(" the client's connection broke: {:?}", echo.error));
        }
        println!(
            "{:>5} {:>5} {:>9.0} {:>9.0} {:>9.1} {:>10} {:>5} {:>10} {:>5} {:>10} {:>5}{}",
            k + 1,
            if dst == 1 { "h0>h1" } else { "h1>h0" },
            hop.total_ms,
            hop.downtime_ms,
            hop.stall_ms,
            hop.vmm.0,
            hop.vmm.1,
            hop.nodes[0].0,
            hop.nodes[0].1,
            hop.nodes[1].0,
            hop.nodes[1].1,
            if hop.ok { "" } else { "  FAILED" }
        );
        if tty {
            let per = started.elapsed().as_secs_f64() / (k + 1) as f64;
            eprint!(
                "\r  {}/{} migrations, {:.1} s per hop, about {:.0} s left, load {}   \r",
                k + 1,
                args.migrations,
                hop_start.elapsed().as_secs_f64(),
                per * (args.migrations - k - 1) as f64,
                load_average()
            );
        }
        hops.push(hop.clone());
        if let Some(p) = problem {
            failures += 1;
            println!("migration {} failed: {p}", k + 1);
            repro = Some(format!(
                "to reproduce: cargo xtask bench soak --migrations {} --dirty-rate {} --memory-mib {} --dirty-mib {}\n  it failed at migration {} of the run (h{} -> h{dst});\n  guest: {vm_cmd}\n  target: {recv_cmd}\n  migrate: {migrate_cmd}\n  logs: {}",
                k + 1,
                args.dirty_rate,
                args.memory_mib,
                args.dirty_mib,
                k + 1,
                1 - dst,
                lab.dir.display()
            ));
            if echo.connection_broken || !args.keep_going {
                break;
            }
        }
    }
    segment.store(u64::MAX, Ordering::Relaxed);
    if tty {
        eprintln!();
    }
    let wall = started.elapsed().as_secs_f64();
    let ok: Vec<&Hop> = hops.iter().filter(|h| h.ok).collect();
    let col = |f: &dyn Fn(&Hop) -> f64| hops.iter().map(f).collect::<Vec<f64>>();
    println!(
        "\nsoak summary: {} of {} migrations run, {failures} failed (goal 0), {broken} broken client connections (goal 0); wall {wall:.0} s; load average before {load_before}, after {}",
        hops.len(),
        args.migrations,
        load_average()
    );
    spread(
        "migration total",
        "ms",
        &ok.iter().map(|h| h.total_ms).collect::<Vec<_>>(),
    );
    spread(
        "guest pause (downtime_ms)",
        "ms",
        &ok.iter().map(|h| h.downtime_ms).collect::<Vec<_>>(),
    );
    spread("client stall per hop", "ms", &col(&|h| h.stall_ms));
    println!("  after each hop (goal: flat):");
    trend("VMM RSS", "KiB", &col(&|h| h.vmm.0 as f64));
    trend("VMM fds", "fds", &col(&|h| h.vmm.1 as f64));
    for i in 0..2 {
        trend(
            &format!("volume node {} RSS", i + 1),
            "KiB",
            &col(&|h| h.nodes[i].0 as f64),
        );
        trend(
            &format!("volume node {} fds", i + 1),
            "fds",
            &col(&|h| h.nodes[i].1 as f64),
        );
    }
    if let Some(r) = repro {
        println!("{r}");
    }
    Ok(failures == 0 && broken == 0)
}

#[cfg(test)]
mod tests {
    use super::slope_per_100;

    #[test]
    fn slope_is_the_least_squares_change_per_100() {
        assert_eq!(slope_per_100(&[5.0; 10]), 0.0);
        let line: Vec<f64> = (0..50).map(|i| 10.0 + 2.0 * i as f64).collect();
        assert!((slope_per_100(&line) - 200.0).abs() < 1e-9);
        assert_eq!(slope_per_100(&[1.0]), 0.0);
    }
}

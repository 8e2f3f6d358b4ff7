//! `tern demo`: live migration of a busy guest between two hosts, with both ends' heartbeats
//! on screen so the pause shows, and the migration report at the end.
//!
//! As root the two hosts are network namespaces joined by a switch (tern-netlab): the source
//! VMM runs in `h0`, the target in `h1`, and the migration streams go over the hosts' addresses.
//! Otherwise both are processes on loopback. Every VM is a child `tern vm run` / `tern vm
//! receive` process, driven exactly as an operator would drive it (`tern vm migrate`).
//!
//! With namespaces the guest is also on the network: its tap sits on h0's bridge (on h1's after
//! the move, announced by the target VMM), and a client in the client namespace holds a TCP
//! connection to the guest's echo server, sending a request every 2 ms through the migration; the
//! report adds the client's longest wait (`max_stall_ms`), the requests answered and whether the
//! connection ever broke.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use anyhow::Context;
use tern_netlab::{Topology, TopologySpec};
use tern_vmm::api::{self, Request};

/// Options of `tern demo`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DemoArgs {
    /// Another demo instead of the live migration.
    #[command(subcommand)]
    pub scenario: Option<Scenario>,
    /// vCPUs of the demo VM.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest memory in MiB (the writer dirties all but 64 MiB of it).
    #[arg(long, default_value_t = 320)]
    pub memory_mib: u64,
    /// Pages per second the guest's memory writer dirties (0 = as fast as it can).
    #[arg(long, default_value_t = 20_000)]
    pub dirty_rate: u64,
    /// Use two processes on loopback even as root (no network namespaces).
    #[arg(long)]
    pub loopback: bool,
    /// Print only the migration report, as JSON, on stdout (the narrative goes to stderr). With
    /// namespaces it includes the client's `max_stall_ms`, `requests` and `connection_broken`.
    #[arg(long)]
    pub json: bool,
    /// The target's announce schedule after the move (ms offsets, or `off`).
    #[arg(long, default_value = "0,50,200,450,800")]
    pub announce: String,
}

/// The other demos.
#[derive(Debug, clap::Subcommand)]
pub enum Scenario {
    /// High availability: a 3-host test cluster with 6 VMs on volume disks; one host is killed
    /// (its agent and VMMs, SIGKILL) and its VMs come back on the others; then the leading
    /// controller is killed and another takes over. Needs root, KVM and etcd.
    Ha(HaArgs),
    /// The automation loop: 4 hosts (network namespaces with IPMI BMCs), 12 VMs on volume disks
    /// following PlanetLab CPU traces; the controller packs them with live migrations, powers the
    /// emptied hosts off through their BMCs and one on again as load rises; a live table, the
    /// dashboard's URL, and a report beside the simulator's prediction of the same scenario.
    /// Needs root, KVM, etcd, ipmi_sim and ipmitool.
    Cluster(crate::demo_cluster::ClusterDemoArgs),
}

/// Options of `tern demo ha`.
#[derive(Debug, clap::Args)]
pub struct HaArgs {
    /// Print only the figures, as JSON, on stdout (the narrative goes to stderr): `vms`,
    /// `host_killed`, `vms_restarted`, `restart_s`, `two_copies_seen`, `leases_fenced`,
    /// `leases_released_by_node` (by the host's surviving volume node once its VMMs died),
    /// `controller_failover_s`.
    #[arg(long)]
    pub json: bool,
}

/// The guest NIC's MAC in the demo.
const DEMO_MAC: &str = "52:54:00:de:40:01";

/// Where a demo's narrative goes: stdout, or stderr when stdout carries its JSON report.
pub(crate) struct Say {
    pub(crate) json: bool,
}

impl Say {
    pub(crate) fn line(&self, s: &str) {
        if self.json {
            eprintln!("{s}");
        } else {
            println!("{s}");
            let _ = std::io::stdout().flush();
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn pipe_lines(child: &mut Child, tag: &'static str, tx: Sender<(&'static str, String)>) {
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((tag, line)).is_err() {
                    break;
                }
            }
        });
    }
}

fn show_for(say: &Say, lines: &Receiver<(&'static str, String)>, d: Duration) {
    let deadline = Instant::now() + d;
    while let Ok((tag, line)) =
        lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        say.line(&format!("  {tag} | {line}"));
    }
}

fn command(ns: Option<&str>, exe: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Topology::command_in(ns, &exe.display().to_string());
            c.stdin(Stdio::null());
            c
        }
        None => Command::new(exe),
    }
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    match args.scenario {
        Some(Scenario::Ha(ha)) => return ha::run(ha),
        Some(Scenario::Cluster(c)) => return crate::demo_cluster::run(c),
        None => {}
    }
    let say = Say { json: args.json };
    anyhow::ensure!(
        args.memory_mib >= 80,
        "--memory-mib must be at least 80 (the writer uses all but 64 MiB)"
    );
    let dir = std::env::temp_dir().join(format!("tern-demo-{}", std::process::id()));
    // The VMs' API sockets live here: it must be private (0700).
    tern_vmctl::local::ensure_private_dir(&dir).context("cannot create a scratch directory")?;
    let exe = std::env::current_exe().context("cannot find the tern binary")?;
    let topo = if is_root() && !args.loopback {
        let spec = TopologySpec {
            client: true,
            replace_stale: true,
            ..TopologySpec::new(format!("tdemo{}", std::process::id() % 10_000), 2)
        };
        match Topology::build(spec) {
            Ok(t) => Some(t),
            Err(e) => {
                say.line(&format!(
                    "== cannot build network namespaces ({e}); using loopback"
                ));
                None
            }
        }
    } else {
        None
    };
    let (src_ns, dst_ns, to) = match &topo {
        Some(t) => (
            Some(t.host_ns(0)),
            Some(t.host_ns(1)),
            format!("{}:4444", t.host_addr(1)),
        ),
        None => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .context("no free loopback port")?;
            (None, None, format!("127.0.0.1:{port}"))
        }
    };
    match &topo {
        Some(_) => say.line(&format!(
            "== two hosts: network namespaces {} and {} on one switch; the VM moves h0 → h1 ({to})",
            src_ns.as_deref().unwrap_or(""),
            dst_ns.as_deref().unwrap_or("")
        )),
        None => say.line(&format!(
            "== two processes on loopback; the VM moves to {to}"
        )),
    }
    let rt = dir.join("rt");
    let (src_sock, dst_sock) = (dir.join("src.sock"), dir.join("dst.sock"));
    let (tx, lines) = channel();

    let net = topo.is_some();
    let guest_ip = Topology::guest_addr(0);
    let net_args = |tap: &str| -> Vec<String> {
        if net {
            vec![
                "--net".into(),
                format!("tap={tap},mac={DEMO_MAC},bridge=br0"),
            ]
        } else {
            vec![]
        }
    };
    let mut dst = command(dst_ns.as_deref(), &exe)
        .args(["vm", "receive", "--listen", &to, "--name", "demo-dst"])
        .args(net_args("demodst"))
        .args(["--announce", &args.announce])
        .arg("--api-sock")
        .arg(&dst_sock)
        .arg("--runtime-dir")
        .arg(&rt)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start `tern vm receive`")?;
    pipe_lines(&mut dst, "h1", tx.clone());
    std::thread::sleep(Duration::from_millis(300));

    let mut cmdline = format!(
        "tern.hb_ms=100 tern.dirty_mib={} tern.dirty_rate={}",
        args.memory_mib - 64,
        args.dirty_rate
    );
    if net {
        cmdline.push_str(&format!(" tern.ip={guest_ip}/24"));
    }
    say.line(&format!(
        "== booting the embedded test guest on h0: {} vCPU(s), {} MiB, `{cmdline}`",
        args.vcpus, args.memory_mib
    ));
    let mut src = command(src_ns.as_deref(), &exe)
        .args([
            "vm",
            "run",
            "--kernel",
            "builtin:testguest",
            "--name",
            "demo-src",
        ])
        .args(["--vcpus", &args.vcpus.to_string()])
        .args(["--memory-mib", &args.memory_mib.to_string()])
        .args(["--cmdline", &cmdline])
        .args(net_args("demosrc"))
        .arg("--api-sock")
        .arg(&src_sock)
        .arg("--runtime-dir")
        .arg(&rt)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start `tern vm run`")?;
    pipe_lines(&mut src, "h0", tx);

    let result = (|| -> anyhow::Result<serde_json::Value> {
        // Wait for the writer's first report: before it the guest is still touching its buffer
        // for the first time, faster than any steady workload.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (tag, line) = lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .context("the guest did not start its writer within 30 s")?;
            say.line(&format!("  {tag} | {line}"));
            if line.starts_with("DIRTY ") {
                break;
            }
        }
        // The client: a TCP connection to the guest's echo server, a request every 2 ms.
        let client = match (&topo, net) {
            (Some(t), true) => {
                let _ = Command::new(&exe)
                    .args(["vm", "announce", "--api-sock"])
                    .arg(&src_sock)
                    .output();
                let cl = t.client_ns().context("no client namespace")?;
                let mut stream = tern_netlab::ns::connect_from(
                    &cl,
                    std::net::SocketAddr::from((guest_ip, 7)),
                    Duration::from_secs(5),
                )
                .context("the client cannot connect to the guest's echo server")?;
                say.line(&format!(
                    "== client {} (namespace {cl}) streams a TCP echo request every 2 ms to {guest_ip}:7",
                    Topology::client_addr()
                ));
                let stop = Arc::new(AtomicBool::new(false));
                let stop2 = stop.clone();
                let h = std::thread::spawn(move || {
                    tern_netlab::ns::stream_echo(
                        &mut stream,
                        Duration::from_millis(2),
                        Duration::from_secs(10),
                        || stop2.load(Ordering::Relaxed),
                    )
                });
                Some((stop, h))
            }
            _ => None,
        };
        show_for(&say, &lines, Duration::from_millis(1500));
        say.line(&format!(
            "== live-migrating to {to} (watch maxgap_us in h1's first heartbeat: the pause the guest saw)"
        ));
        let mut m = Command::new(&exe)
            .args(["vm", "migrate", "--api-sock"])
            .arg(&src_sock)
            .args(["--to", &to, "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start `tern vm migrate`")?;
        loop {
            show_for(&say, &lines, Duration::from_millis(50));
            if m.try_wait()?.is_some() {
                break;
            }
        }
        let out = m.wait_with_output()?;
        let mut report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        anyhow::ensure!(
            out.status.success(),
            "the migration failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        show_for(&say, &lines, Duration::from_millis(2000));
        if let Some((stop, h)) = client {
            stop.store(true, Ordering::Relaxed);
            let echo = h
                .join()
                .map_err(|_| anyhow::anyhow!("the client thread panicked"))?;
            say.line(&format!(
                "== client: {} requests answered, longest wait {:.1} ms, connection {}",
                echo.requests,
                echo.max_stall_ms,
                if echo.connection_broken {
                    format!("BROKEN ({})", echo.error.clone().unwrap_or_default())
                } else {
                    "intact".into()
                }
            ));
            if let Some(m) = report.as_object_mut() {
                m.insert("max_stall_ms".into(), serde_json::json!(echo.max_stall_ms));
                m.insert("requests".into(), serde_json::json!(echo.requests));
                m.insert(
                    "connection_broken".into(),
                    serde_json::json!(echo.connection_broken),
                );
            }
        }
        say.line("== the VM runs on h1 now; the source VMM has exited");
        let _ = src.wait();
        let r = api::call(&dst_sock, &Request::Shutdown)?;
        anyhow::ensure!(r.ok, "the target refused to stop: {:?}", r.error);
        let _ = dst.wait();
        Ok(report)
    })();
    let _ = src.kill();
    let _ = dst.kill();
    let _ = src.wait();
    let _ = dst.wait();
    show_for(&say, &lines, Duration::from_millis(100));
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(t) = topo {
        let _ = t.teardown();
    }
    let report = result?;
    if args.json {
        println!("{report}");
    } else {
        let g = |k: &str| report.get(k).cloned().unwrap_or(serde_json::Value::Null);
        println!(
            "== report: outcome {}, total {} ms, downtime {} ms, {} rounds, {:.1} MiB sent, {} zero pages skipped, throttle max {} %, converged {}",
            g("outcome"),
            g("total_ms"),
            g("downtime_ms"),
            g("rounds"),
            g("bytes_sent").as_f64().unwrap_or(0.0) / 1048576.0,
            g("pages_zero_skipped"),
            g("throttle_max_pct"),
            g("converged"),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `tern demo ha`: the cluster's high availability, shown on a `tern cluster up` lab run in this
/// process. Everything is observed the way an operator would: the controllers' REST API for
/// placement and restarts, the agents' own status endpoints for what actually runs where.
mod ha {
    use std::collections::BTreeMap;
    use std::process::{Command, ExitCode};
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail, ensure};
    use serde::Deserialize;
    use tern_api::cluster::{EventInfo, VmInfo, VmState};

    use super::{HaArgs, Say};
    use crate::cluster_up::{Lab, LabSpec, http, http_in};

    const VMS: usize = 6;

    /// What the demo measured.
    #[derive(Debug, serde::Serialize)]
    struct Figures {
        vms: usize,
        host_killed: String,
        vms_restarted: usize,
        restart_s: f64,
        two_copies_seen: bool,
        leases_fenced: u64,
        leases_released_by_node: usize,
        stale_writes_refused: usize,
        controller_failover_s: f64,
    }

    #[derive(Debug, Deserialize)]
    struct AgentStatus {
        vms: Vec<AgentVm>,
    }

    #[derive(Debug, Deserialize)]
    struct AgentVm {
        name: String,
        state: tern_api::agent::ObservedState,
    }

    struct Api<'a> {
        lab: &'a Lab,
    }

    impl Api<'_> {
        /// A request to whichever controller leads.
        /// A request to whichever controller leads; a leader still gathering its hosts' first
        /// reports ("not ready") is asked again for up to 20 s.
        fn call(&self, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<String> {
            let start = Instant::now();
            loop {
                match self.call_once(method, path, body) {
                    Err(e)
                        if format!("{e:#}").contains("not ready")
                            && start.elapsed() < Duration::from_secs(20) =>
                    {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    r => return r,
                }
            }
        }

        fn call_once(
            &self,
            method: &str,
            path: &str,
            body: Option<&str>,
        ) -> anyhow::Result<String> {
            let mut last = String::from("no controller answered");
            for c in &self.lab.state().controllers {
                match http(&c.url, method, path, body) {
                    Ok((s, b)) if (200..300).contains(&s) => return Ok(b),
                    Ok((503, b)) => last = format!("{}: 503 {b}", c.url),
                    Ok((s, b)) => bail!("{method} {path}: {s} {b}"),
                    Err(e) => last = format!("{e:#}"),
                }
            }
            bail!("{method} {path}: {last}")
        }

        fn vms(&self) -> Vec<VmInfo> {
            self.call("GET", "/v1/vms", None)
                .ok()
                .and_then(|b| serde_json::from_str(&b).ok())
                .unwrap_or_default()
        }

        fn events(&self, since: u64) -> Vec<EventInfo> {
            self.call("GET", &format!("/v1/events?since={since}"), None)
                .ok()
                .and_then(|b| serde_json::from_str(&b).ok())
                .unwrap_or_default()
        }
    }

    /// For each VM, the hosts whose agent reports it running now.
    fn running_copies(lab: &Lab) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for h in &lab.state().hosts {
            let Ok((200, body)) =
                http_in(&h.namespace, &h.agent_url, "GET", "/v1/agent/status", None)
            else {
                continue;
            };
            let Ok(st) = serde_json::from_str::<AgentStatus>(&body) else {
                continue;
            };
            for v in st.vms {
                if v.state == tern_api::agent::ObservedState::Running {
                    out.entry(v.name).or_default().push(h.name.clone());
                }
            }
        }
        out
    }

    fn volume(lab: &Lab, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let h = &lab.state().hosts[0];
        let tern = std::env::current_exe()?;
        let out = Command::new("ip")
            .args(["netns", "exec", &h.namespace])
            .arg(tern)
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
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub fn run(args: HaArgs) -> anyhow::Result<ExitCode> {
        let say = Say { json: args.json };
        let spec = LabSpec {
            name: format!("ha{}", std::process::id() % 100_000),
            hosts: 3,
            controllers: 2,
            lun_size: "2G".into(),
            tern: std::env::current_exe().context("cannot find the tern binary")?,
        };
        say.line(
            "starting a test cluster: etcd, 3 hosts (volume node + agent each), 2 controllers",
        );
        let mut lab = Lab::start(&spec, &|s| say.line(&format!("  {s}")))?;
        let api = Api { lab: &lab };

        say.line(&format!(
            "creating {VMS} VMs (test guest, 64 MiB, 1 vCPU) on volume disks"
        ));
        for i in 1..=VMS {
            let disk = format!("ha-vm{i}.raw");
            volume(&lab, &["create", &disk, "--size", "16M"])?;
            let body = serde_json::json!({
                "name": format!("vm{i}"), "vcpus": 1, "memory_mib": 64,
                "kernel": "builtin:testguest", "cmdline": "tern.hb_ms=500", "disk": disk,
            });
            api.call("POST", "/v1/vms", Some(&body.to_string()))?;
        }
        let start = Instant::now();
        let vms = loop {
            let vms = api.vms();
            if vms.len() == VMS && vms.iter().all(|v| v.state == VmState::Running) {
                break vms;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(120),
                "the VMs did not all start within 120 s: {vms:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let mut by_host: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for v in &vms {
            by_host
                .entry(v.host.clone().unwrap_or_default())
                .or_default()
                .push(v.name.clone());
        }
        for (h, names) in &by_host {
            say.line(&format!("  {h}: {}", names.join(" ")));
        }
        let (victim, lost) = by_host
            .iter()
            .max_by_key(|(_, v)| v.len())
            .map(|(h, v)| (h.clone(), v.clone()))
            .context("no VM placed")?;
        let victim_idx = lab
            .state()
            .hosts
            .iter()
            .position(|h| h.name == victim)
            .context("victim host")?;
        let victim_node = lab.state().hosts[victim_idx].volume_node_id;
        let mut old_epochs = Vec::new();
        for n in &lost {
            let disk = vms
                .iter()
                .find(|v| &v.name == n)
                .and_then(|v| v.spec.disk.clone())
                .context("disk")?;
            let st = volume(&lab, &["stat", &disk])?;
            let epoch = st["lease"]["epoch"].as_u64().context("lease epoch")?;
            old_epochs.push((disk, epoch));
        }
        let since = api.events(0).last().map_or(0, |e| e.seq);

        say.line(&format!(
            "killing host {victim}: its agent and VMMs (SIGKILL); its VMs: {}",
            lost.join(" ")
        ));
        lab.kill_host(victim_idx)?;
        let killed = Instant::now();
        let api = Api { lab: &lab };
        let mut two_copies = false;
        let mut seen_events = since;
        let mut leases_fenced = 0;
        let restart_s = loop {
            for e in api.events(seen_events) {
                seen_events = e.seq;
                say.line(&format!(
                    "  +{:5.1} s  {:<16} {}",
                    killed.elapsed().as_secs_f64(),
                    e.kind,
                    e.message
                ));
                if e.kind == "leases_fenced" && e.host.as_deref() == Some(victim.as_str()) {
                    // "N disk lease(s) of HOST fenced"
                    leases_fenced = e
                        .message
                        .split_whitespace()
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                }
            }
            let copies = running_copies(&lab);
            if copies.values().any(|h| h.len() > 1) {
                two_copies = true;
            }
            let vms = api.vms();
            let back = lost.iter().all(|n| {
                vms.iter().any(|v| {
                    &v.name == n
                        && v.state == VmState::Running
                        && v.host.as_deref().is_some_and(|h| h != victim)
                })
            });
            if back {
                break killed.elapsed().as_secs_f64();
            }
            ensure!(
                killed.elapsed() < Duration::from_secs(90),
                "{victim}'s VMs were not running elsewhere 90 s after the kill: {vms:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        say.line(&format!(
            "all {} VMs of {victim} run elsewhere {restart_s:.1} s after the kill",
            lost.len()
        ));
        // The old write leases are fenced: a write under the dead host's old epoch is refused.
        let status = volume(&lab, &["status"])?;
        let coord = status["coordinator"]["node_id"]
            .as_u64()
            .context("coordinator")?;
        let coord_host = lab
            .state()
            .hosts
            .iter()
            .find(|h| u64::from(h.volume_node_id) == coord)
            .context("coordinator host")?
            .clone();
        // The writes come as the dead host's volume node would send them: over TLS with its
        // certificate (only node N may open FILE@N.EPOCH).
        let node_tls = match &lab.state().pki {
            Some(pki) => {
                let dir = pki.join(tern_volume::control::certificate_name_of_node(victim_node));
                let tls = tern_pki::TlsDir::load(&dir)
                    .with_context(|| format!("--tls-dir {}", dir.display()))?;
                Some(tern_nbd::ClientTls {
                    config: tls.client_config(),
                    server_name: None,
                })
            }
            None => None,
        };
        let mut refused = 0;
        for (disk, epoch) in &old_epochs {
            let export = format!("{disk}@{victim_node}.{epoch}");
            let addr = coord_host.volume_node.clone();
            let tls = node_tls.clone();
            let r = tern_netlab::ns::in_namespace(&coord_host.namespace, move || {
                let timeout = Duration::from_secs(10);
                let mut c =
                    tern_nbd::Client::connect_tls(addr.as_str(), &export, timeout, tls.as_ref())?;
                c.write(0, &[0xEE; 512], true)
            })?;
            if matches!(r, Err(tern_nbd::ClientError::Remote(tern_nbd::Errno::Perm))) {
                refused += 1;
            }
        }
        say.line(&format!(
            "{refused} of {} writes under {victim}'s old lease epochs refused by the volume coordinator",
            old_epochs.len()
        ));
        // The victim's volume node outlives its VMMs here (only the agent and the VMMs were
        // killed): it releases the leases of the disks whose VMM died by itself, and the
        // controller then finds those already free to fence.
        let released = std::fs::read_to_string(lab.log_path(&format!("volume-{victim}")))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("write lease released"))
            .count();
        say.line(&format!(
            "{released} lease(s) released by {victim}'s own volume node after its VMMs died, {leases_fenced} fenced by the controller"
        ));

        let leader = lab.leader().context("no leader")?;
        say.line(&format!(
            "killing the leading controller ({}, SIGKILL)",
            lab.state().controllers[leader].url
        ));
        lab.kill_controller(leader)?;
        let killed = Instant::now();
        let failover_s = loop {
            if let Some(l) = lab.leader()
                && l != leader
            {
                break killed.elapsed().as_secs_f64();
            }
            ensure!(
                killed.elapsed() < Duration::from_secs(30),
                "no controller took over within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        say.line(&format!(
            "controller {} leads {failover_s:.1} s later",
            lab.state().controllers[lab.leader().unwrap_or(0)].url
        ));
        let figures = Figures {
            vms: VMS,
            host_killed: victim,
            vms_restarted: lost.len(),
            restart_s,
            two_copies_seen: two_copies,
            leases_fenced,
            leases_released_by_node: released,
            stale_writes_refused: refused,
            controller_failover_s: failover_s,
        };
        if args.json {
            println!("{}", serde_json::to_string(&figures)?);
        } else {
            say.line(&format!(
                "two copies of a VM ever seen by the agents: {}",
                if figures.two_copies_seen { "YES" } else { "no" }
            ));
        }
        say.line("taking the cluster down");
        let left = lab.shutdown();
        ensure!(left.is_empty(), "the cluster left: {}", left.join("; "));
        Ok(ExitCode::SUCCESS)
    }
}

//! `cargo xtask bench cluster`: the cluster control plane's figures.
//!
//! Two parts:
//! - **Live** (root, KVM, etcd): a `tern cluster up --hosts 3` lab; the time to create 20 VMs
//!   through the API until all run; the HA restart time (SIGKILL a host's agent and VMMs → every VM
//!   of that host running elsewhere, as the API shows it); the controller fail-over time (SIGKILL
//!   the leader → another answers as leader). Compared with the anchors' *published* figures.
//! - **Core**: the controller core's decision time, driven directly (`tern_controller::core`), for
//!   one placement (`create_vm`) and one maintenance plan (`set_maintenance`) at 100, 1,000 and
//!   10,000 simulated hosts with four VMs each.

use std::time::Instant;

use std::time::Duration;

use anyhow::{bail, ensure};
use tern_api::agent::{AgentReport, CommandReply, HostRecord, ObservedState, ObservedVm};
use tern_api::cluster::{HostCapacity, VmCreate, VmState};
use tern_controller::core::{Action, Config, Controller, Input, VmRecord};

use crate::bench_common;

/// Options of `cargo xtask bench cluster`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only the controller core's decision times (no root, KVM or etcd needed).
    #[arg(long)]
    pub core_only: bool,
    /// Simulated host counts for the decision times.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub hosts: Vec<usize>,
    /// VMs created through the API in the live part.
    #[arg(long, default_value_t = 20)]
    pub vms: usize,
}

/// The anchors' published HA figures (not measured here).
const PUBLISHED: &[(&str, &str)] = &[
    (
        "Proxmox VE HA",
        "≈ 60 s+ (fencing: the lost node's watchdog self-fences after 60 s, then services recover)",
    ),
    (
        "OpenShift Virtualization",
        "≈ 545 s documented worst case for a VM to restart after a node failure with default settings",
    ),
    (
        "vSphere HA",
        "no single figure: a host is declared failed after ≈ 15 s without heartbeats, then its VMs restart",
    ),
];

pub fn run(args: Args) -> anyhow::Result<()> {
    println!("== controller core decision times (tern_controller::core, driven directly) ==");
    println!(
        "{:>7} {:>7} {:>16} {:>22}",
        "hosts", "VMs", "placement (ms)", "maintenance plan (ms)"
    );
    for &n in &args.hosts {
        let d = decision_times(n)?;
        println!(
            "{:>7} {:>7} {:>16.3} {:>22.3}",
            n, d.vms, d.placement_ms, d.maintenance_ms
        );
    }
    if args.core_only {
        return Ok(());
    }
    live(&args)
}

/// Decision times at one cluster size (medians).
#[derive(Debug, Clone, Copy)]
pub struct DecisionTimes {
    /// VMs in the simulated cluster.
    pub vms: usize,
    /// One `create_vm` (validate, place, command, reconcile), ms.
    pub placement_ms: f64,
    /// One `set_maintenance` (plan the moves off a host with four VMs, reconcile), ms.
    pub maintenance_ms: f64,
}

const VMS_PER_HOST: usize = 4;

fn host_name(i: usize) -> String {
    format!("h{i:05}")
}

fn spec(name: &str, i: usize) -> VmCreate {
    VmCreate {
        name: name.to_string(),
        vcpus: 2,
        memory_mib: 4096,
        kernel: "builtin:testguest".into(),
        cmdline: String::new(),
        disk: None,
        host: None,
        // Every fifth VM shares a group with its neighbours, so the rule is checked on the way.
        anti_affinity: i.is_multiple_of(5).then(|| format!("g{}", i % 97)),
        restart_priority: 50,
    }
}

/// A leading controller with `hosts` hosts (16 cores, 128 GiB each) and four VMs on each.
fn simulated_cluster(hosts: usize) -> Controller {
    let mut c = Controller::new(Config::default());
    for i in 0..hosts {
        let name = host_name(i);
        c.step(
            Input::HostUp(HostRecord {
                agent_url: format!("http://{name}:7000"),
                name,
                capacity: HostCapacity {
                    cores: 16,
                    memory_mib: 128 * 1024,
                    power_model: "hp-ml110-g5".into(),
                    volume_node: None,
                    volume_node_id: None,
                },
                lease: i as u64 + 1,
            }),
            0,
        );
    }
    let desired = (0..hosts * VMS_PER_HOST)
        .map(|i| VmRecord {
            spec: spec(&format!("vm{i}"), i),
            host: Some(host_name(i / VMS_PER_HOST)),
            run: true,
        })
        .collect();
    c.step(
        Input::Elected {
            generation: 1,
            desired,
            maintenance: vec![],
        },
        1,
    );
    // Every agent answers the new leader's ping and reports its VMs running, lightly loaded.
    let pings: Vec<(String, u64)> = c
        .drain_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Send { host, command, .. } => Some((host, command.id)),
            _ => None,
        })
        .collect();
    for (host, id) in pings {
        let i: usize = host[1..].parse().unwrap_or(0);
        c.step(
            Input::Reply {
                cmd: id,
                seq: 1,
                reply: CommandReply::Done {
                    listen: None,
                    report: None,
                    vm_state: None,
                },
            },
            2,
        );
        let vms = (i * VMS_PER_HOST..(i + 1) * VMS_PER_HOST)
            .map(|v| ObservedVm {
                name: format!("vm{v}"),
                state: ObservedState::Running,
                cpu_utilization: Some(0.2),
                rss_mib: Some(4096),
                guest_resident_kib: None,
                guest_nonzero_kib: None,
                dirty_pages_per_sec: None,
            })
            .collect();
        c.step(
            Input::Report(AgentReport {
                host,
                generation_seen: 1,
                seq: 2,
                last_command_id: id,
                vms,
                cpu_utilization: Some(0.2),
                parked_cores: None,
            }),
            3,
        );
    }
    c.drain_actions();
    c
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times one placement and one maintenance plan on a simulated cluster of `hosts` hosts.
pub fn decision_times(hosts: usize) -> anyhow::Result<DecisionTimes> {
    let base = simulated_cluster(hosts);
    let vms = base.vms().len();
    ensure!(
        vms == hosts * VMS_PER_HOST,
        "the simulated cluster holds {vms} VMs"
    );
    let rounds = if hosts >= 10_000 { 5 } else { 15 };
    let mut placement = Vec::new();
    let mut maintenance = Vec::new();
    for r in 0..rounds {
        let mut c = base.clone();
        let name = format!("new{r}");
        let t = Instant::now();
        let info = c
            .create_vm(spec(&name, r), 4)
            .map_err(|e| anyhow::anyhow!("placement at {hosts} hosts: {e}"))?;
        let _ = c.drain_actions();
        placement.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(
            info.host.is_some()
                || info.state == VmState::Starting
                || info.state == VmState::Pending,
            "the new VM was not placed: {info:?}"
        );

        let mut c = base.clone();
        let host = host_name((r * 7919) % hosts);
        let t = Instant::now();
        let task = c
            .set_maintenance(&host, true, 4)
            .map_err(|e| anyhow::anyhow!("maintenance at {hosts} hosts: {e}"))?;
        let actions = c.drain_actions();
        maintenance.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(task.is_some(), "no maintenance task for {host}");
        ensure!(
            actions.len() > 1,
            "the maintenance plan for {host} decided nothing: {actions:?}"
        );
    }
    Ok(DecisionTimes {
        vms,
        placement_ms: median(placement),
        maintenance_ms: median(maintenance),
    })
}

// ----- the live part -----

/// What `tern cluster up --json` prints (the parts the bench reads).
#[derive(Debug, serde::Deserialize)]
struct UpInfo {
    name: String,
    controllers: Vec<String>,
    hosts: Vec<UpHost>,
    state_file: std::path::PathBuf,
}

#[derive(Debug, serde::Deserialize)]
struct UpHost {
    name: String,
    namespace: String,
    agent_pid: u32,
    volume_pid: u32,
}

#[derive(Debug, serde::Deserialize)]
struct StateController {
    url: String,
    pid: u32,
}

#[derive(Debug, serde::Deserialize)]
struct StateFile {
    controllers: Vec<StateController>,
}

/// A `tern cluster up` child, taken down on drop.
struct Up {
    child: std::process::Child,
    info: UpInfo,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on loopback (`Connection: close`): status and body.
fn http(base: &str, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let addr: std::net::SocketAddr = host.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, rest) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP header from {base}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad HTTP status line from {base}"))?;
    ensure!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked answer from {base}"
    );
    Ok((status, rest.to_string()))
}

impl Up {
    /// A request to whichever controller leads (retrying a leader that is not ready yet).
    fn api(&self, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<String> {
        let start = Instant::now();
        loop {
            let mut last = String::from("no controller answered");
            for c in &self.info.controllers {
                match http(c, method, path, body) {
                    Ok((s, b)) if (200..300).contains(&s) => return Ok(b),
                    Ok((503, b)) => last = b,
                    Ok((s, b)) => bail!("{method} {path}: {s} {b}"),
                    Err(e) => last = e.to_string(),
                }
            }
            ensure!(
                start.elapsed() < Duration::from_secs(20),
                "{method} {path}: {last}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn vms(&self) -> Vec<tern_api::cluster::VmInfo> {
        self.api("GET", "/v1/vms", None)
            .ok()
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or_default()
    }

    fn leader(&self) -> Option<usize> {
        self.info
            .controllers
            .iter()
            .position(|c| matches!(http(c, "GET", "/v1/hosts", None), Ok((200, _))))
    }
}

/// SIGKILLs a host's agent and every process in its namespace but its volume node.
fn kill_host(h: &UpHost) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let kill = |pid: u32| {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    };
    kill(h.agent_pid);
    let target = std::fs::metadata(format!("/run/netns/{}", h.namespace))?;
    for _ in 0..3 {
        for e in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid != h.volume_pid
                && let Ok(m) = std::fs::metadata(e.path().join("ns/net"))
                && m.ino() == target.ino()
                && m.dev() == target.dev()
            {
                kill(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn live(args: &Args) -> anyhow::Result<()> {
    use std::io::BufRead;
    let tern = bench_common::build_release_tern()?;
    let name = format!("bench{}", std::process::id() % 100_000);
    let hosts = 4;
    println!(
        "\n== live: tern cluster up --hosts {hosts} --controllers 2 (agent lease TTL 5 s, fence margin 2 s, election TTL 5 s); load {} ==",
        bench_common::load_average()
    );
    let mut child = std::process::Command::new(&tern)
        .args([
            "cluster",
            "up",
            "--name",
            &name,
            "--json",
            "--controllers",
            "2",
        ])
        .args(["--hosts", &hosts.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let info: UpInfo = match serde_json::from_str(line.trim()) {
        Ok(i) => i,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("tern cluster up did not come up ({e}): {line:?}");
        }
    };
    let up = Up { child, info };
    ensure!(up.info.name == name, "cluster {} came up", up.info.name);

    // 1. Create VMs through the API until all run.
    let start = Instant::now();
    let names: Vec<String> = (1..=args.vms).map(|i| format!("b{i}")).collect();
    for n in &names {
        let body = format!(
            r#"{{"name":"{n}","vcpus":1,"memory_mib":64,"kernel":"builtin:testguest","cmdline":"tern.hb_ms=1000"}}"#
        );
        up.api("POST", "/v1/vms", Some(&body))?;
    }
    let accepted = start.elapsed().as_secs_f64();
    let vms = loop {
        let vms = up.vms();
        if vms.len() == names.len() && vms.iter().all(|v| v.state == VmState::Running) {
            break vms;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(300),
            "the VMs did not all run within 300 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let create_s = start.elapsed().as_secs_f64();

    // 2. HA: kill the host with most VMs.
    let mut count: std::collections::BTreeMap<String, usize> = Default::default();
    for v in &vms {
        *count.entry(v.host.clone().unwrap_or_default()).or_default() += 1;
    }
    let (victim, lost) = count
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(h, n)| (h.clone(), *n))
        .unwrap_or_default();
    let victim_host = up
        .info
        .hosts
        .iter()
        .find(|h| h.name == victim)
        .ok_or_else(|| anyhow::anyhow!("no host {victim}"))?;
    let on_victim: Vec<String> = vms
        .iter()
        .filter(|v| v.host.as_deref() == Some(victim.as_str()))
        .map(|v| v.name.clone())
        .collect();
    kill_host(victim_host)?;
    let killed = Instant::now();
    loop {
        let vms = up.vms();
        let back = on_victim.iter().all(|n| {
            vms.iter().any(|v| {
                &v.name == n
                    && v.state == VmState::Running
                    && v.host.as_deref().is_some_and(|h| h != victim)
            })
        });
        if back {
            break;
        }
        ensure!(
            killed.elapsed() < Duration::from_secs(120),
            "{victim}'s VMs did not run elsewhere within 120 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ha_s = killed.elapsed().as_secs_f64();

    // 3. Controller fail-over.
    let state: StateFile = serde_json::from_slice(&std::fs::read(&up.info.state_file)?)?;
    let leader = up
        .leader()
        .ok_or_else(|| anyhow::anyhow!("no controller leads"))?;
    let pid = state
        .controllers
        .iter()
        .find(|c| c.url == up.info.controllers[leader])
        .map(|c| c.pid)
        .ok_or_else(|| anyhow::anyhow!("leader's pid"))?;
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    let killed = Instant::now();
    loop {
        if up.leader().is_some_and(|l| l != leader) {
            break;
        }
        ensure!(
            killed.elapsed() < Duration::from_secs(60),
            "no controller took over within 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let failover_s = killed.elapsed().as_secs_f64();
    drop(up);

    println!("{:<52} {:>10}  goal", "measured", "s");
    println!(
        "{:<52} {:>10.2}  (all accepted by the API in {accepted:.2} s)",
        format!("create {} VMs through the API until all run", args.vms),
        create_s
    );
    println!(
        "{:<52} {:>10.2}  ≤ 15 s",
        format!("HA restart: SIGKILL {victim} ({lost} VMs) → all run elsewhere"),
        ha_s
    );
    println!(
        "{:<52} {:>10.2}  ≤ TTL + 2 s = 7 s",
        "controller fail-over: SIGKILL the leader → another leads", failover_s
    );
    println!("\npublished figures of the anchors (not measured here):");
    for (who, what) in PUBLISHED {
        println!("  {who:<26} {what}");
    }
    Ok(())
}

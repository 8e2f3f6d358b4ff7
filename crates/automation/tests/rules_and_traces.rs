//! The must-rules hold on random clusters, and a recorded PlanetLab day replays to the same plans.

mod common;

use std::collections::BTreeMap;

use common::Cluster;
use proptest::prelude::*;
use tern_api::automation::{AutomationLevel, PlanState, Policy};
use tern_automation::{Action, Loop, LoopConfig};
use tern_sim::{TraceOrder, TraceSet};

const STEP_MS: u64 = 10_000;

#[derive(Debug, Clone)]
struct Spec {
    hosts: Vec<(u32, bool, bool)>,
    vms: Vec<(usize, bool, Option<u8>, Vec<f64>)>,
    seed: u64,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::collection::vec(
            (prop::sample::select(vec![2u32, 4]), any::<bool>(), 0u8..8),
            3..8,
        ),
        prop::collection::vec(
            (
                0usize..64,
                0u8..5,
                prop::option::of(0u8..3),
                prop::collection::vec(0.0f64..1.0, 1..12),
            ),
            4..24,
        ),
        any::<u64>(),
    )
        .prop_map(|(hosts, vms, seed)| Spec {
            // (cores, G4?, maintenance: one host in eight)
            hosts: hosts
                .into_iter()
                .map(|(c, g4, m)| (c, g4, m == 0))
                .collect(),
            // (host pick, pinned: one in five, group, trace)
            vms: vms
                .into_iter()
                .map(|(h, pin, g, t)| (h, pin == 0, g, t))
                .collect(),
            seed,
        })
}

/// Builds the cluster, placing each VM on the first host from its pick that has no VM of its
/// group (dropping the group if none has room), so the start obeys anti-affinity.
fn build(s: &Spec) -> (Cluster, BTreeMap<String, String>) {
    let mut c = Cluster::default();
    for (i, (cores, g4, maint)) in s.hosts.iter().enumerate() {
        let model = if *g4 { "hp-ml110-g4" } else { "hp-ml110-g5" };
        c.host(&format!("h{i}"), *cores, model, true);
        c.hosts.get_mut(&format!("h{i}")).unwrap().maintenance = *maint;
    }
    let n = s.hosts.len();
    let mut pinned = BTreeMap::new();
    for (i, (pick, pin, group, trace)) in s.vms.iter().enumerate() {
        let group = group.map(|g| format!("g{g}"));
        let free = |h: usize, c: &Cluster| {
            group.as_ref().is_none_or(|g| {
                !c.vms
                    .values()
                    .any(|v| v.host == format!("h{h}") && v.group.as_ref() == Some(g))
            })
        };
        let host = (0..n).map(|k| (pick + k) % n).find(|&h| free(h, &c));
        let (host, group) = match host {
            Some(h) => (h, group),
            None => (pick % n, None),
        };
        let name = format!("vm{i}");
        let v = c.vm(&name, &format!("h{host}"), trace.clone());
        v.pinned = *pin;
        v.group = group;
        v.memory_mib = 256 + 128 * (i as u64 % 8);
        if *pin {
            pinned.insert(name, format!("h{host}"));
        }
    }
    (c, pinned)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn no_plan_breaks_a_pin_an_anti_affinity_group_or_a_host_that_takes_no_vms(s in spec()) {
        let (mut c, pinned) = build(&s);
        let mut p = Policy {
            automation: AutomationLevel::Full,
            aggressiveness: 5,
            hold_s: 0,
            cooldown_s: 0,
            max_migrations: 64,
            ..Policy::default()
        };
        p.power.off_hold_s = 0;
        let cfg = LoopConfig { seed: s.seed, ..LoopConfig::default() };
        let mut lp = Loop::new(p, cfg).unwrap();
        let maint: Vec<String> = c
            .hosts
            .iter()
            .filter(|(_, h)| h.maintenance)
            .map(|(n, _)| n.clone())
            .collect();
        for _ in 0..12 {
            // Cluster::take checks every target takes VMs and every powered-off host is empty
            c.step(&mut lp, STEP_MS);
            c.check_rules(&pinned);
        }
        for (_, a) in &c.log {
            if let Action::Migrate { vm, from, to, .. } = a {
                prop_assert!(!pinned.contains_key(vm), "pinned {} moved", vm);
                prop_assert!(!maint.contains(to), "{} sent to {} in maintenance", vm, to);
                prop_assert!(!maint.contains(from), "{} taken off {} in maintenance", vm, from);
            }
        }
    }
}

/// Twelve PlanetLab VMs (day 20110303, sorted names, the first twelve with a mean load of at
/// least 5 %) on four G4/G5 hosts, one trace sample per 10 s interval.
fn planetlab() -> Cluster {
    let day = "20110303";
    let traces = TraceSet::bundled_day(day)
        .unwrap()
        .load_day(day, &TraceOrder::Sorted)
        .unwrap();
    let mut c = Cluster::default();
    for h in 0..4 {
        let model = if h % 2 == 0 {
            "hp-ml110-g4"
        } else {
            "hp-ml110-g5"
        };
        c.host(&format!("h{h}"), 2, model, true);
    }
    let busy = traces
        .samples
        .iter()
        .filter(|s| s.iter().map(|&x| f64::from(x)).sum::<f64>() / s.len() as f64 >= 5.0)
        .take(12);
    for (i, s) in busy.enumerate() {
        let trace = s.iter().map(|&x| f64::from(x) / 100.0).collect();
        c.vm(&format!("vm{i}"), &format!("h{}", i % 4), trace)
            .memory_mib = 512;
    }
    c
}

fn replay() -> (Cluster, Vec<(u64, PlanState, String)>) {
    let mut c = planetlab();
    let mut p = Policy {
        automation: AutomationLevel::Full,
        hold_s: 20,
        ..Policy::default()
    };
    p.power.off_hold_s = 30;
    let mut lp = Loop::new(p, LoopConfig::default()).unwrap();
    for _ in 0..120 {
        c.step(&mut lp, STEP_MS);
        c.check_rules(&BTreeMap::new());
    }
    let plans = lp
        .plans()
        .into_iter()
        .map(|p| (p.id, p.state, p.reason.clone()))
        .collect();
    (c, plans)
}

#[test]
fn a_recorded_planetlab_day_consolidates_and_replays_to_the_same_plans() {
    let (c, plans) = replay();
    let migrations = c
        .log
        .iter()
        .filter(|(_, a)| matches!(a, Action::Migrate { .. }))
        .count();
    let offs = c
        .log
        .iter()
        .filter(|(_, a)| matches!(a, Action::PowerOff { .. }))
        .count();
    // the day's light load packs onto fewer hosts, and the emptied ones are powered off
    assert!(migrations >= 3, "{:?}", c.log);
    assert!(offs >= 1, "{:?}", c.log);
    assert!(
        c.hosts.values().filter(|h| h.up).count() < 4,
        "{:?}",
        c.hosts
    );
    // no VM ping-pongs: with a 120 s cooldown doubling on repeats, at most 4 moves in 1200 s
    for (vm, n) in c.moves() {
        assert!(n <= 4, "{vm} moved {n} times");
    }
    // the same telemetry gives the same plans and actions
    let (c2, plans2) = replay();
    assert_eq!(plans, plans2);
    assert_eq!(format!("{:?}", c.log), format!("{:?}", c2.log));
}

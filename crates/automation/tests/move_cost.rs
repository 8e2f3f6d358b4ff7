//! The inputs of a planned move's predicted cost: the VM's resident memory from the telemetry
//! and the link into the target as measured by an earlier migration.
//!
//! `cargo test -p tern-automation --test move_cost`

mod common;

use tern_api::automation::{MigrationActual, MigrationPrediction, PlanAction, Policy};
use tern_automation::cost::{
    LINK_EWMA_WEIGHT, LinkEstimator, MIN_LINK_SAMPLE_BYTES, MoveInput, link_from_migration,
    predict_move,
};
use tern_automation::telemetry::{HostSample, Telemetry, VmSample};
use tern_automation::{Loop, LoopConfig};

const MEMORY_MIB: u64 = 1024;

fn host(name: &str, link: Option<f64>) -> HostSample {
    HostSample {
        migration_link_bytes_per_sec: link,
        ..common::host(name)
    }
}

fn vm(name: &str, host: &str, u: f64, resident_mib: Option<u64>) -> VmSample {
    VmSample {
        memory_mib: MEMORY_MIB,
        resident_mib,
        ..common::vm(name, host, u)
    }
}

/// h1 carries three busy VMs (2.7 of its 2 cores), h2 one light VM: the loop proposes moving one
/// of h1's VMs to h2. Returns the VM and the move's prediction.
fn planned_move(
    resident_mib: Option<u64>,
    h2_link: Option<f64>,
) -> (VmSample, MigrationPrediction) {
    let vms = vec![
        vm("a", "h1", 0.9, resident_mib),
        vm("b", "h1", 0.9, resident_mib),
        vm("c", "h1", 0.9, resident_mib),
        vm("d", "h2", 0.1, resident_mib),
    ];
    let t = Telemetry {
        hosts: vec![host("h1", None), host("h2", h2_link)],
        vms: vms.clone(),
    };
    let policy = Policy {
        hold_s: 0,
        ..Policy::default()
    };
    let mut lp = Loop::new(policy, LoopConfig::default()).unwrap();
    lp.observe(0, &t).unwrap();
    assert!(lp.tick(0).is_empty(), "manual mode proposes only");
    let plans = lp.plans();
    let plan = plans.first().expect("a plan for the overloaded host");
    let (name, to, predicted) = plan
        .actions
        .iter()
        .find_map(|a| match a {
            PlanAction::Migrate {
                vm, to, predicted, ..
            } => Some((vm.clone(), to.clone(), *predicted)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no migration in {plan:?}"));
    assert_eq!(to, "h2");
    let v = vms.into_iter().find(|v| v.name == name).unwrap();
    (v, predicted.expect("a planned move carries its prediction"))
}

#[test]
fn a_vm_with_little_resident_memory_is_predicted_to_send_little() {
    let (_, whole) = planned_move(None, None);
    let (_, small) = planned_move(Some(4), None);
    // without a resident figure the whole GiB is sent; with 4 MiB resident, about 4 MiB (plus
    // the policy's 256 KiB state estimate and the pages' address words)
    assert!(whole.bytes >= MEMORY_MIB << 20, "{whole:?}");
    assert!(
        small.bytes >= 4 << 20 && small.bytes < 5 << 20,
        "4 MiB resident, predicted {small:?}"
    );
    assert!(small.time_s < whole.time_s / 50.0, "{small:?} {whole:?}");
    // a resident figure above the guest's memory (the VMM's own pages) counts as all of it
    let (_, over) = planned_move(Some(MEMORY_MIB + 20), None);
    assert_eq!(over.bytes, whole.bytes, "{over:?} {whole:?}");
}

#[test]
fn a_measured_migration_sets_the_link_the_next_prediction_uses() {
    let default_link = LoopConfig::default().link_bytes_per_sec;
    let budget = LoopConfig::default().downtime_budget_ms;
    // a 64 MiB-resident guest moved into h2 in the time the model gives it at 1 GB/s
    let b = 1e9;
    let seen = predict_move(&MoveInput {
        memory_bytes: MEMORY_MIB << 20,
        resident_bytes: Some(64 << 20),
        dirty_pages_per_sec: 0.0,
        link_bytes_per_sec: b,
        downtime_budget_ms: budget,
        volume_disks: 0,
    });
    let actual = MigrationActual {
        time_s: seen.time_s,
        bytes: seen.bytes,
        downtime_ms: seen.downtime_ms,
    };
    let measured = link_from_migration(MEMORY_MIB << 20, &actual, budget).unwrap();
    assert!((measured / b - 1.0).abs() < 0.01, "measured {measured} B/s");
    // a plain bytes / time would charge the model's fixed costs to the link
    assert!(actual.bytes as f64 / actual.time_s < 0.95 * b, "{actual:?}");

    let mut links = LinkEstimator::default();
    assert!(links.observe("h2", measured));
    assert_eq!(links.get("h2"), Some(measured));
    assert_eq!(links.get("h1"), None);

    let (v, before) = planned_move(Some(64), links.get("h1"));
    let (v2, after) = planned_move(Some(64), links.get("h2"));
    assert_eq!(v, v2);
    let at = |link: f64| predict_move(&MoveInput::for_vm(&v, link, budget));
    assert_eq!(before, at(default_link), "no measurement: the default link");
    assert_eq!(after, at(measured), "measured: the link into the target");
    assert!(
        after.time_s < before.time_s / 4.0,
        "1 GB/s against 125 MB/s: {after:?} {before:?}"
    );

    // a second measurement moves the estimate by the EWMA weight
    assert!(links.observe("h2", 2e9));
    let next = links.get("h2").unwrap();
    let want = measured + LINK_EWMA_WEIGHT * (2e9 - measured);
    assert!((next - want).abs() < 1.0, "{next} {want}");
    // nonsense is ignored
    assert!(!links.observe("h2", f64::NAN) && !links.observe("h2", 0.0));
    assert_eq!(links.get("h2"), Some(next));
}

#[test]
fn a_move_too_small_or_too_fast_teaches_nothing_about_the_link() {
    let budget = LoopConfig::default().downtime_budget_ms;
    // the lab's idle 64 MiB guest: ~205 KB in 30 ms is mostly fixed costs
    let idle = MigrationActual {
        time_s: 0.03,
        bytes: 205_000,
        downtime_ms: 10.0,
    };
    assert_eq!(link_from_migration(64 << 20, &idle, budget), None);
    // enough bytes, but no longer than the model's fixed costs even at the fastest link
    let instant = MigrationActual {
        time_s: 0.001,
        bytes: MIN_LINK_SAMPLE_BYTES,
        downtime_ms: 0.5,
    };
    assert_eq!(link_from_migration(64 << 20, &instant, budget), None);
    let zero = MigrationActual {
        time_s: 0.0,
        ..instant
    };
    assert_eq!(link_from_migration(64 << 20, &zero, budget), None);
    // slower than the model at the slowest link searched: that link
    let crawl = MigrationActual {
        time_s: 10_000.0,
        bytes: 64 << 20,
        downtime_ms: 10.0,
    };
    assert_eq!(
        link_from_migration(64 << 20, &crawl, budget),
        Some(tern_automation::cost::LINK_SEARCH_BYTES_PER_SEC.0)
    );
}

#[test]
fn a_measured_link_out_of_range_is_refused_by_name() {
    let t = Telemetry {
        hosts: vec![host("h1", Some(0.5)), host("h2", None)],
        vms: vec![vm("a", "h1", 0.5, Some(8))],
    };
    let err = t.validate().unwrap_err().to_string();
    assert_eq!(
        err,
        "host h1: migration_link_bytes_per_sec = 0.5 is out of range: allowed 1..=1000000000000"
    );
    let mut lp = Loop::new(Policy::default(), LoopConfig::default()).unwrap();
    assert_eq!(lp.observe(0, &t).unwrap_err().to_string(), err);
}

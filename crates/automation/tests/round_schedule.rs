//! When the loop runs its rounds: on a fixed grid of the interval anchored at the first round,
//! whatever the jitter of the shell's ticks, and re-anchored after a long gap instead of running
//! a burst of rounds.

mod common;

use common::{host, vm};
use tern_api::automation::{AutomationLevel, Policy};
use tern_automation::{Loop, LoopConfig, Telemetry};

const INTERVAL_MS: u64 = 2_000;
/// The controller's cycle.
const CYCLE_MS: u64 = 500;

fn two_second_loop() -> Loop {
    let policy = Policy {
        automation: AutomationLevel::Manual,
        interval_s: (INTERVAL_MS / 1000) as u32,
        ..Policy::default()
    };
    Loop::new(policy, LoopConfig::default()).expect("a valid policy")
}

fn snapshot() -> Telemetry {
    Telemetry {
        hosts: vec![host("h1")],
        vms: vec![vm("a", "h1", 0.3)],
    }
}

/// Observes and ticks at each of `times`; returns the times a round ran.
fn rounds_at(lp: &mut Loop, times: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let t = snapshot();
    let mut rounds = Vec::new();
    let mut last = None;
    for now in times {
        lp.observe(now, &t).expect("a valid snapshot");
        lp.tick(now);
        let at = lp.last_round().at_ms;
        if last != Some(at) {
            rounds.push(at);
            last = Some(at);
        }
    }
    rounds
}

#[test]
fn a_half_second_cycle_with_jitter_runs_one_round_per_interval_on_the_grid() {
    // 150 s of cycles 500 ms apart, each woken 0, 1 or 3 ms late in turn: the round's wake-up
    // jitter is often larger than the next one's, which must not push a round a cycle later
    let jitter = [0, 1, 3];
    let mut lp = two_second_loop();
    let times = (0..300u64).map(|k| k * CYCLE_MS + jitter[(k % 3) as usize]);
    let rounds = rounds_at(&mut lp, times);
    assert_eq!(
        rounds.len(),
        75,
        "one round per 2 s over 150 s, got {} at {rounds:?}",
        rounds.len()
    );
    for (k, at) in rounds.iter().enumerate() {
        let grid = k as u64 * INTERVAL_MS;
        assert!(
            at.abs_diff(grid) <= 3,
            "round {k} ran at {at} ms, off its grid point {grid} ms"
        );
    }
    // SLATAH counts one host-interval per round for the loaded host
    assert_eq!(lp.sla_counts().0, 75);
    assert_eq!(lp.series().points.len(), 75);
}

#[test]
fn a_tick_a_little_early_runs_the_round_and_keeps_the_grid() {
    let mut lp = two_second_loop();
    // within a twentieth of the interval before the grid point: due; further before: not yet
    let rounds = rounds_at(&mut lp, [0, 1_950, 2_500, 3_850, 3_950, 5_999, 6_500]);
    assert_eq!(rounds, vec![0, 1_950, 3_950, 5_999]);
}

#[test]
fn after_a_gap_one_round_runs_and_the_grid_keeps_its_phase() {
    let mut lp = two_second_loop();
    // rounds at 0 and 2 s, then no tick until 9.3 s (the 4, 6 and 8 s points missed): one
    // round, on the 8 s point, not three to catch up; the next ones on 10 and 12 s
    let times = [
        0, 2_000, 9_300, 9_800, 10_300, 10_800, 11_300, 11_800, 13_300,
    ];
    let rounds = rounds_at(&mut lp, times);
    assert_eq!(rounds, vec![0, 2_000, 9_300, 10_300, 13_300]);
    // late by less than an interval: the 14 s point runs at 15 s, and the 16 s point at 16 s
    let rounds = rounds_at(&mut lp, [15_000, 16_000, 16_800, 17_300, 17_950]);
    assert_eq!(rounds, vec![15_000, 16_000, 17_950]);
}

#[test]
fn a_hold_of_whole_intervals_is_met_at_the_same_round_whatever_the_ticks_jitter() {
    // hold 4 s = two intervals: an overload seen at round 0 is acted on at round 2, whether
    // round 0's tick came 3 ms late and round 2's on time, or the other way round
    let plan_round = |jitter: [u64; 4]| {
        let policy = Policy {
            automation: AutomationLevel::Manual,
            interval_s: 2,
            hold_s: 4,
            detector: tern_api::automation::DetectorKind::Thr,
            parameter: 0.8,
            ..Policy::default()
        };
        let mut lp = Loop::new(policy, LoopConfig::default()).unwrap();
        let t = Telemetry {
            hosts: vec![host("h1"), host("h2")],
            vms: vec![
                vm("a", "h1", 0.9),
                vm("b", "h1", 0.9),
                vm("c", "h1", 0.9),
                vm("d", "h2", 0.1),
            ],
        };
        for (k, j) in jitter.iter().enumerate() {
            let now = k as u64 * INTERVAL_MS + j;
            lp.observe(now, &t).unwrap();
            lp.tick(now);
            if lp.last_round().plan.is_some() {
                return Some(k);
            }
        }
        None
    };
    assert_eq!(plan_round([0, 0, 0, 0]), Some(2));
    assert_eq!(
        plan_round([3, 0, 0, 0]),
        Some(2),
        "round 0 late, round 2 on time"
    );
    assert_eq!(plan_round([0, 0, 3, 0]), Some(2), "round 2 late");
}

#[test]
fn a_round_a_whole_interval_late_takes_the_grid_point_it_falls_on() {
    let mut lp = two_second_loop();
    // due at 2 s, first tick at 4 s: the round is at the 4 s grid point (the 2 s one is
    // skipped), so the next is due at 6 s, not at once
    let rounds = rounds_at(&mut lp, [0, 4_000, 4_500, 5_000, 5_950]);
    assert_eq!(rounds, vec![0, 4_000, 5_950]);
}

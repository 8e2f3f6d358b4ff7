//! Trace-driven invariant tests of the parking policy: tables of cores unparked over synthetic
//! utilisation traces (expect-test), with the invariants checked at every interval.

use expect_test::{Expect, expect};
use tern_parking::knobs::{Knobs, Plan};
use tern_parking::power::{CorePower, HostCurve, ParkingPowerModel, SPECPOWER_CSV};
use tern_parking::replay::{HostSim, Strategy, replay};

/// Bounds as the knobs define them for a flat host of `cores`.
fn bounds(k: &Knobs, cores: usize) -> (usize, usize) {
    let hi = (cores * k.max_cores_pct as usize)
        .div_ceil(100)
        .clamp(1, cores);
    let lo = (cores * k.min_cores_pct as usize)
        .div_ceil(100)
        .min(hi)
        .max(1);
    (lo, hi)
}

fn model(cores: usize) -> ParkingPowerModel {
    ParkingPowerModel::new(
        HostCurve::Linear {
            idle_w: 100.0,
            peak_w: 200.0,
        },
        cores,
        CorePower::default(),
    )
    .unwrap()
}

/// Runs the policy over `demands` and checks, at every interval:
/// * the count stays within [min, max];
/// * an increase comes at least `increase_time` intervals after the previous change, a decrease at
///   least `decrease_time` after it, and a decrease parks exactly one core;
/// * when demand exceeds the headroom of the unparked set, more cores are unparked within
///   `increase_time` intervals (unless already at max).
///
/// Returns the unparked count per interval.
fn run_checked(knobs: Knobs, cores: usize, demands: &[f64]) -> Vec<usize> {
    knobs.validate().unwrap();
    let (lo, hi) = bounds(&knobs, cores);
    let mut sim = HostSim::new(Strategy::Policy(knobs), model(cores));
    let ks: Vec<usize> = demands.iter().map(|&d| sim.step(d).unparked).collect();
    let mut last_change: Option<usize> = None;
    for t in 0..ks.len() {
        assert!(
            (lo..=hi).contains(&ks[t]),
            "t={t}: {} outside [{lo}, {hi}]",
            ks[t]
        );
        if t > 0 && ks[t] != ks[t - 1] {
            if let Some(prev) = last_change {
                let gap = t - prev;
                if ks[t] > ks[t - 1] {
                    assert!(
                        gap >= knobs.increase_time as usize,
                        "t={t}: increase {gap} after last change"
                    );
                } else {
                    assert!(
                        gap >= knobs.decrease_time as usize,
                        "t={t}: decrease {gap} after last change"
                    );
                }
            }
            if ks[t] < ks[t - 1] {
                assert_eq!(ks[t - 1] - ks[t], 1, "t={t}: parks one core at a time");
                assert!(
                    t >= knobs.decrease_time as usize,
                    "t={t}: parked before decrease_time"
                );
            }
            last_change = Some(t);
        }
        // Demand above what the headroom allows on the current set must be answered in time.
        let pressing = demands[t] / ks[t] as f64 > f64::from(knobs.headroom_pct) / 100.0 + 1e-9;
        let within = t + 1 + knobs.increase_time.max(1) as usize;
        if pressing && ks[t] < hi && within < ks.len() {
            let sustained = demands[t..=within].iter().all(|&d| d >= demands[t]);
            if sustained {
                assert!(
                    ks[t + 1..=within].iter().any(|&k| k > ks[t]),
                    "t={t}: demand {:.2} on {} cores not answered within {} intervals: {:?}",
                    demands[t],
                    ks[t],
                    knobs.increase_time,
                    &ks[t..=within]
                );
            }
        }
    }
    ks
}

/// Renders `demand → unparked` as run-length rows for the expect tables.
fn table(demands: &[f64], ks: &[usize]) -> String {
    let mut out = String::new();
    let mut start = 0;
    for t in 1..=ks.len() {
        if t == ks.len() || ks[t] != ks[start] || demands[t] != demands[start] {
            out.push_str(&format!(
                "t {:>3}..{:<3} demand {:>4.2} unparked {}\n",
                start,
                t - 1,
                demands[start],
                ks[start]
            ));
            start = t;
        }
    }
    out
}

fn check(knobs: Knobs, cores: usize, demands: &[f64], want: Expect) {
    let ks = run_checked(knobs, cores, demands);
    want.assert_eq(&table(demands, &ks));
}

fn fast() -> Knobs {
    Knobs {
        min_cores_pct: 0,
        increase_time: 2,
        decrease_time: 4,
        ..Knobs::default()
    }
}

fn steps(parts: &[(f64, usize)]) -> Vec<f64> {
    parts
        .iter()
        .flat_map(|&(d, n)| std::iter::repeat_n(d, n))
        .collect()
}

#[test]
fn parks_slowly_to_one_core_on_light_load() {
    check(
        fast(),
        4,
        &steps(&[(0.3, 20)]),
        expect![[r#"
            t   0..3   demand 0.30 unparked 4
            t   4..7   demand 0.30 unparked 3
            t   8..11  demand 0.30 unparked 2
            t  12..19  demand 0.30 unparked 1
        "#]],
    );
}

#[test]
fn step_up_unparks_fast_and_steps_down_slowly() {
    check(
        fast(),
        8,
        &steps(&[(0.5, 40), (5.0, 10), (0.5, 40)]),
        expect![[r#"
            t   0..3   demand 0.50 unparked 8
            t   4..7   demand 0.50 unparked 7
            t   8..11  demand 0.50 unparked 6
            t  12..15  demand 0.50 unparked 5
            t  16..19  demand 0.50 unparked 4
            t  20..23  demand 0.50 unparked 3
            t  24..39  demand 0.50 unparked 2
            t  40..40  demand 5.00 unparked 2
            t  41..42  demand 5.00 unparked 6
            t  43..44  demand 5.00 unparked 7
            t  45..49  demand 5.00 unparked 8
            t  50..53  demand 0.50 unparked 8
            t  54..57  demand 0.50 unparked 7
            t  58..61  demand 0.50 unparked 6
            t  62..65  demand 0.50 unparked 5
            t  66..69  demand 0.50 unparked 4
            t  70..73  demand 0.50 unparked 3
            t  74..89  demand 0.50 unparked 2
        "#]],
    );
}

#[test]
fn respects_min_and_max_cores() {
    let k = Knobs {
        min_cores_pct: 50,
        max_cores_pct: 75,
        ..fast()
    };
    check(
        k,
        8,
        &steps(&[(0.1, 30), (8.0, 10), (0.1, 10)]),
        expect![[r#"
            t   0..3   demand 0.10 unparked 6
            t   4..7   demand 0.10 unparked 5
            t   8..29  demand 0.10 unparked 4
            t  30..30  demand 8.00 unparked 4
            t  31..39  demand 8.00 unparked 6
            t  40..43  demand 0.10 unparked 6
            t  44..47  demand 0.10 unparked 5
            t  48..49  demand 0.10 unparked 4
        "#]],
    );
}

#[test]
fn no_oscillation_on_a_square_wave_shorter_than_decrease_time() {
    // Load toggles every 3 intervals, faster than decrease_time (4): once up, it stays up.
    let mut demands = steps(&[(0.3, 20)]);
    for i in 0..60 {
        demands.push(if (i / 3) % 2 == 0 { 2.5 } else { 0.3 });
    }
    let ks = run_checked(fast(), 4, &demands);
    let first_up = (20..ks.len())
        .find(|&t| ks[t] > ks[t - 1])
        .expect("load rose");
    let after: Vec<usize> = ks[first_up..].to_vec();
    assert!(
        after.windows(2).all(|w| w[1] >= w[0]),
        "parked during a fast square wave: {after:?}"
    );
    check(
        fast(),
        4,
        &demands,
        expect![[r#"
        t   0..3   demand 0.30 unparked 4
        t   4..7   demand 0.30 unparked 3
        t   8..11  demand 0.30 unparked 2
        t  12..19  demand 0.30 unparked 1
        t  20..20  demand 2.50 unparked 1
        t  21..22  demand 2.50 unparked 3
        t  23..25  demand 0.30 unparked 4
        t  26..28  demand 2.50 unparked 4
        t  29..31  demand 0.30 unparked 4
        t  32..34  demand 2.50 unparked 4
        t  35..37  demand 0.30 unparked 4
        t  38..40  demand 2.50 unparked 4
        t  41..43  demand 0.30 unparked 4
        t  44..46  demand 2.50 unparked 4
        t  47..49  demand 0.30 unparked 4
        t  50..52  demand 2.50 unparked 4
        t  53..55  demand 0.30 unparked 4
        t  56..58  demand 2.50 unparked 4
        t  59..61  demand 0.30 unparked 4
        t  62..64  demand 2.50 unparked 4
        t  65..67  demand 0.30 unparked 4
        t  68..70  demand 2.50 unparked 4
        t  71..73  demand 0.30 unparked 4
        t  74..76  demand 2.50 unparked 4
        t  77..79  demand 0.30 unparked 4
    "#]],
    );
}

#[test]
fn no_oscillation_on_a_slow_square_wave_or_at_constant_load() {
    // Period 40: within each half period the count moves one way only.
    let mut demands = Vec::new();
    for i in 0..200 {
        demands.push(if (i / 20) % 2 == 0 { 2.2 } else { 0.4 });
    }
    let ks = run_checked(fast(), 8, &demands);
    for half in ks.chunks(20).skip(1) {
        let up = half.windows(2).any(|w| w[1] > w[0]);
        let down = half.windows(2).any(|w| w[1] < w[0]);
        assert!(
            !(up && down),
            "both directions within one half period: {half:?}"
        );
    }
    // Constant load at every level: the count never reverses direction.
    for plan in [Plan::Balanced, Plan::PowerSaver] {
        let knobs = Knobs {
            min_cores_pct: 0,
            ..plan.knobs()
        };
        for tenth in 0..=80 {
            let d = f64::from(tenth) / 10.0;
            let ks = run_checked(knobs, 8, &vec![d; 300]);
            let changes: Vec<i64> = ks
                .windows(2)
                .map(|w| w[1] as i64 - w[0] as i64)
                .filter(|&x| x != 0)
                .collect();
            assert!(
                changes.iter().all(|&c| c < 0) || changes.iter().all(|&c| c > 0),
                "{plan:?} demand {d}: reversed {changes:?}"
            );
            let tail = &ks[200..];
            assert!(
                tail.iter().all(|&k| k == tail[0]),
                "{plan:?} demand {d}: not settled"
            );
        }
    }
}

#[test]
fn unparks_within_increase_time_when_load_rises() {
    for inc in [0u32, 1, 3, 7] {
        let k = Knobs {
            increase_time: inc,
            decrease_time: 3,
            min_cores_pct: 0,
            ..Knobs::default()
        };
        for rise_at in 30..45 {
            let demands = steps(&[(0.2, rise_at), (3.5, 30)]);
            // run_checked asserts the deadline; make sure the rise is actually answered.
            let ks = run_checked(k, 4, &demands);
            let answered = (rise_at..ks.len())
                .find(|&t| ks[t] >= 4)
                .expect("reached 4 cores");
            assert!(
                answered <= rise_at + 1 + inc.max(1) as usize,
                "inc {inc}: answered at {answered}"
            );
        }
    }
}

#[test]
fn random_traces_keep_every_invariant_and_are_deterministic() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _case in 0..200 {
        let cores = 1 + (next() % 16) as usize;
        let min = (next() % 101) as u32;
        let max = min + (next() % (101 - u64::from(min))) as u32;
        let knobs = Knobs {
            min_cores_pct: min,
            max_cores_pct: max.max(1),
            increase_time: (next() % 6) as u32,
            decrease_time: 1 + (next() % 12) as u32,
            headroom_pct: 10 + (next() % 90) as u32,
            concurrency_pct: 50 + (next() % 51) as u32,
            ..Knobs::default()
        };
        let demands: Vec<f64> = (0..300)
            .map(|_| (next() % 1000) as f64 / 1000.0 * cores as f64 * 1.2)
            .collect();
        let a = run_checked(knobs, cores, &demands);
        let b = run_checked(knobs, cores, &demands);
        assert_eq!(a, b, "same inputs, same decisions");
    }
}

#[test]
fn energy_never_rises_when_an_idle_core_is_parked() {
    let names: Vec<&str> = SPECPOWER_CSV
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("model,"))
        .filter_map(|l| l.split(',').next())
        .collect();
    assert!(names.len() >= 5);
    for name in names {
        let curve = HostCurve::specpower(name).unwrap();
        for cores in [1usize, 2, 4, 12, 32] {
            let m = ParkingPowerModel::new(curve.clone(), cores, CorePower::default()).unwrap();
            for k in 2..=cores {
                for step in 0..=20 {
                    // Demand that leaves at least one of the k cores idle.
                    let d = (k - 1) as f64 * f64::from(step) / 20.0;
                    assert!(
                        m.power_w(d, k - 1) <= m.power_w(d, k),
                        "{name} {cores} cores k={k} d={d}"
                    );
                }
            }
        }
    }
    // Over a whole trace: the policy's energy never exceeds no parking's when demand never needs
    // every core.
    let demands = steps(&[(0.5, 50), (2.0, 50), (0.2, 100)]);
    let (_, s) = replay(&demands, 1.0, Strategy::Policy(fast()), model(8));
    assert!(s.energy_j < s.energy_no_parking_j, "{s:?}");
    assert_eq!(s.exceeded_intervals, 0, "{s:?}");
}

#[test]
fn numa_bounds_and_smt_order_hold_on_every_interval() {
    use tern_parking::policy::{Policy, Sample};
    use tern_parking::topology::{Cpu, Topology};
    // Two nodes, one package each, 2 cores × 2 SMT threads per package; kernel numbering puts the
    // siblings apart (cpu k and k+4 share a core), as x86 hosts do.
    let cpus = (0..8)
        .map(|id| Cpu {
            id,
            node: (id % 4) / 2,
            package: (id % 4) / 2,
            core: id % 2,
        })
        .collect();
    let topo = Topology { cpus };
    let knobs = Knobs {
        min_cores_pct: 25,
        max_cores_pct: 75,
        increase_time: 1,
        decrease_time: 2,
        ..Knobs::default()
    };
    let mut p = Policy::new(knobs, topo.clone());
    let mut trace = String::new();
    let mut seed = 7u64;
    for t in 0..400 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let level = if (t / 40) % 2 == 0 {
            0.05
        } else {
            ((seed >> 33) % 100) as f64 / 100.0
        };
        let set = p.unparked().to_vec();
        let busy = topo
            .cpus
            .iter()
            .map(|c| if set.contains(&c.id) { level } else { 0.0 })
            .collect();
        let d = p.step(&Sample {
            cpu_busy: busy,
            runq_wait: 0.0,
        });
        for node in topo.nodes() {
            let order: Vec<usize> = topo
                .unpark_order(node)
                .iter()
                .map(|&i| topo.cpus[i].id)
                .collect();
            let on: Vec<usize> = order
                .iter()
                .copied()
                .filter(|c| d.unparked.contains(c))
                .collect();
            // Per node: 25 % of 4 = 1 CPU at least, 75 % = 3 at most.
            assert!((1..=3).contains(&on.len()), "t={t} node {node}: {on:?}");
            // The unparked CPUs of a node are a prefix of its order: SMT siblings before new cores.
            assert_eq!(on, order[..on.len()], "t={t} node {node}");
        }
        if d.changed {
            trace.push_str(&format!("t {t:>3}: {:?}\n", d.unparked));
        }
    }
    expect![[r#"
        t   1: [0, 1, 2, 4, 6]
        t   3: [0, 1, 2, 4]
        t   5: [0, 2, 4]
        t   7: [0, 2]
        t  42: [0, 2, 4]
        t  44: [0, 1, 2, 4]
        t  47: [0, 2, 4]
        t  49: [0, 1, 2, 4]
        t  50: [0, 1, 2, 4, 6]
        t  51: [0, 1, 2, 3, 4, 6]
        t  59: [0, 1, 2, 4, 6]
        t  60: [0, 1, 2, 3, 4, 6]
        t  70: [0, 1, 2, 4, 6]
        t  71: [0, 1, 2, 3, 4, 6]
        t  73: [0, 1, 2, 4, 6]
        t  75: [0, 1, 2, 3, 4, 6]
        t  80: [0, 1, 2, 4, 6]
        t  82: [0, 1, 2, 4]
        t  84: [0, 2, 4]
        t  86: [0, 2]
        t 122: [0, 2, 4]
        t 124: [0, 1, 2, 4]
        t 125: [0, 1, 2, 4, 6]
        t 127: [0, 1, 2, 4]
        t 128: [0, 1, 2, 4, 6]
        t 129: [0, 1, 2, 3, 4, 6]
        t 131: [0, 1, 2, 4, 6]
        t 133: [0, 1, 2, 3, 4, 6]
        t 154: [0, 1, 2, 4, 6]
        t 155: [0, 1, 2, 3, 4, 6]
        t 157: [0, 1, 2, 4, 6]
        t 158: [0, 1, 2, 3, 4, 6]
        t 161: [0, 1, 2, 4, 6]
        t 163: [0, 1, 2, 4]
        t 165: [0, 2, 4]
        t 167: [0, 2]
        t 201: [0, 2, 4]
        t 202: [0, 1, 2, 4]
        t 204: [0, 1, 2, 4, 6]
        t 206: [0, 1, 2, 4]
        t 208: [0, 2, 4]
        t 211: [0, 1, 2, 4]
        t 213: [0, 2, 4]
        t 214: [0, 1, 2, 4]
        t 216: [0, 1, 2, 4, 6]
        t 218: [0, 1, 2, 3, 4, 6]
        t 220: [0, 1, 2, 4, 6]
        t 222: [0, 1, 2, 3, 4, 6]
        t 224: [0, 1, 2, 4, 6]
        t 226: [0, 1, 2, 4]
        t 228: [0, 2, 4]
        t 229: [0, 1, 2, 4]
        t 232: [0, 1, 2, 4, 6]
        t 233: [0, 1, 2, 3, 4, 6]
        t 241: [0, 1, 2, 4, 6]
        t 243: [0, 1, 2, 4]
        t 245: [0, 2, 4]
        t 247: [0, 2]
        t 280: [0, 2, 4]
        t 283: [0, 1, 2, 4]
        t 285: [0, 1, 2, 4, 6]
        t 287: [0, 1, 2, 3, 4, 6]
        t 313: [0, 1, 2, 4, 6]
        t 314: [0, 1, 2, 3, 4, 6]
        t 321: [0, 1, 2, 4, 6]
        t 323: [0, 1, 2, 4]
        t 325: [0, 2, 4]
        t 327: [0, 2]
        t 360: [0, 2, 4]
        t 362: [0, 1, 2, 4]
        t 364: [0, 1, 2, 4, 6]
        t 366: [0, 1, 2, 4]
        t 367: [0, 1, 2, 4, 6]
        t 368: [0, 1, 2, 3, 4, 6]
        t 372: [0, 1, 2, 4, 6]
        t 374: [0, 1, 2, 3, 4, 6]
        t 376: [0, 1, 2, 4, 6]
        t 378: [0, 1, 2, 3, 4, 6]
        t 380: [0, 1, 2, 4, 6]
        t 381: [0, 1, 2, 3, 4, 6]
        t 383: [0, 1, 2, 4, 6]
        t 385: [0, 1, 2, 4]
        t 387: [0, 2, 4]
        t 388: [0, 1, 2, 4]
        t 390: [0, 1, 2, 4, 6]
        t 391: [0, 1, 2, 3, 4, 6]
        t 397: [0, 1, 2, 4, 6]
    "#]]
    .assert_eq(&trace);
}

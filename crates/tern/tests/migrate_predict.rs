//! The migration cost model (`tern_migration::machine::predict`) against real migrations: test
//! guests dirtying memory at three rates (500, 1,000 and 1,500 pages/s) migrate over loopback
//! under a bandwidth cap, and the total time and bytes each is predicted to take — from the
//! configured rate, the guest's layout and the cap alone, before it starts — must be within 50 %
//! of what the report measures, the rounds within two (the machine is shared, so the bounds are
//! generous). The errors are printed for docs/migration.md ("Predicting a migration").

mod common;

use std::time::{Duration, Instant};

use common::{MigrationPair, field};
use tern_migration::ConvergenceConfig;
use tern_migration::machine::predict::{PredictInput, predict};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Guest memory.
const MEMORY_MIB: u64 = 128;
/// The writer's buffer.
const DIRTY_MIB: u64 = 16;
/// The migration starts once the writer has written every page of its buffer (it pre-touches
/// the buffer with zeros, and the full copy skips zero pages). Before that its frontier moves
/// into zero memory during the full copy, so pages written ahead of the copy's scan travel in
/// it as well: a first-pass artefact a guest with a resident working set does not have.
const WRITTEN_BEFORE: u64 = DIRTY_MIB * MIB / PAGE;
/// The non-zero part of the test guest outside the writer's buffer (an idle guest's full copy
/// sends about 200 KB).
const IMAGE_NONZERO_BYTES: u64 = 256 << 10;
/// The migration's bandwidth cap, MiB/s: loopback is far faster, so the cap sets the pace. The
/// rates below stay under half of it (2,048 pages/s), where the policy does not throttle: the
/// test guest's writer is paced by its clock and catches up after a throttle slice, which the
/// model (a CPU-bound writer slowed by the throttle) does not describe.
const CAP_MIBPS: u64 = 16;
/// Loopback's own speed as the model sees it (well above the cap).
const LOOPBACK_BYTES_PER_SEC: f64 = 2e9;

struct Case {
    rate: u64,
    predicted: tern_migration::machine::predict::Prediction,
    report: serde_json::Value,
}

fn run(rate: u64) -> Case {
    let cmdline = format!("tern.hb_ms=50 tern.dirty_mib={DIRTY_MIB} tern.dirty_rate={rate}");
    let mut p = MigrationPair::start(MEMORY_MIB, 1, &cmdline, &[]);
    // The writer's own count of pages written, fresh from its last DIRTY line (every 50 ms).
    let line = p.src.wait_line(Duration::from_secs(30), |l| {
        l.starts_with("DIRTY ") && field(l, "pages").is_some_and(|n| n >= WRITTEN_BEFORE)
    });
    let seen = Instant::now();
    assert!(field(&line, "pages").unwrap() >= WRITTEN_BEFORE);
    let cfg = ConvergenceConfig {
        max_bandwidth: Some(CAP_MIBPS * MIB),
        ..Default::default()
    };
    let input = PredictInput {
        resident_bytes: Some(IMAGE_NONZERO_BYTES + DIRTY_MIB * MIB),
        working_set_bytes: Some(DIRTY_MIB * MIB),
        ..PredictInput::new(MEMORY_MIB * MIB, rate as f64, LOOPBACK_BYTES_PER_SEC)
    };
    let predicted = predict(&cfg, &input).expect("a prediction");
    assert!(
        seen.elapsed() < Duration::from_millis(100),
        "the count went stale"
    );
    let cap = CAP_MIBPS.to_string();
    let (rc, report, err) = p.migrate(&["--max-bandwidth-mibps", &cap]);
    assert_eq!(rc, 0, "migrate failed: {err}\nreport: {report}");
    assert_eq!(report["outcome"], "completed", "{report}");
    Case {
        rate,
        predicted,
        report,
    }
}

fn error_pct(predicted: f64, actual: f64) -> f64 {
    (predicted - actual) / actual.max(1e-9) * 100.0
}

#[test]
fn predicted_migration_time_is_within_half_of_the_measured_time() {
    let cases: Vec<Case> = [500, 1000, 1500].into_iter().map(run).collect();
    println!(
        "{:>12} | {:>9} {:>9} {:>7} | {:>8} {:>8} {:>7} | {:>6} {:>6} | {:>6} {:>6}",
        "pages/s",
        "pred ms",
        "real ms",
        "err %",
        "pred MiB",
        "real MiB",
        "err %",
        "pred r",
        "real r",
        "pred p",
        "real p"
    );
    let mut bad = Vec::new();
    for c in &cases {
        let real_ms = c.report["total_ms"].as_u64().unwrap() as f64;
        let real_bytes = c.report["bytes_sent"].as_u64().unwrap() as f64;
        let pred_ms = c.predicted.total.as_secs_f64() * 1000.0;
        let pred_bytes = c.predicted.bytes_sent as f64;
        let time_err = error_pct(pred_ms, real_ms);
        let bytes_err = error_pct(pred_bytes, real_bytes);
        println!(
            "{:>12} | {:>9.0} {:>9.0} {:>+7.1} | {:>8.1} {:>8.1} {:>+7.1} | {:>6} {:>6} | {:>6.1} {:>6}",
            c.rate,
            pred_ms,
            real_ms,
            time_err,
            pred_bytes / MIB as f64,
            real_bytes / MIB as f64,
            bytes_err,
            c.predicted.rounds,
            c.report["rounds"],
            c.predicted.downtime.as_secs_f64() * 1000.0,
            c.report["downtime_ms"],
        );
        assert!(
            c.predicted.converges(),
            "the cases are chosen to converge: {:?}",
            c.predicted
        );
        let rounds_off = c
            .predicted
            .rounds
            .abs_diff(c.report["rounds"].as_u64().unwrap() as u32);
        if time_err.abs() > 50.0 || bytes_err.abs() > 50.0 || rounds_off > 2 {
            bad.push(format!(
                "rate {}: predicted {:?}, measured {}",
                c.rate, c.predicted, c.report
            ));
        }
    }
    // The faster writer must cost more, in the model and in reality.
    assert!(cases[2].predicted.total > cases[1].predicted.total + Duration::from_millis(100));
    assert!(
        bad.is_empty(),
        "prediction off by more than 50 % (or 2 rounds):\n{}",
        bad.join("\n")
    );
}

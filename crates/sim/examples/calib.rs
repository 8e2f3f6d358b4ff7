//! Calibration run: day 20110303 with the CloudSim order, reference policies, against CloudSim 3.0.3.

use tern_policy::Model;
use tern_sim::{SimConfig, TraceOrder, TraceSet, Workload, simulate};

fn main() {
    let day = std::env::args().nth(1).unwrap_or_else(|| "20110303".into());
    let set = TraceSet::bundled_day(&day).unwrap();
    let d = set.load_day(&day, &TraceOrder::CloudSim).unwrap();
    let w = Workload::benchmark(&day, 800, d.samples, Model::CloudSim);
    for p in [
        "dvfs",
        "iqr-mmt-1.5",
        "lr-mmt-1.2",
        "mad-mmt-2.5",
        "thr-mmt-0.8",
        "thr-mmt-1.0",
    ] {
        let t = std::time::Instant::now();
        let r = simulate(
            &w,
            &SimConfig {
                policy: p.parse().unwrap(),
                model: Model::CloudSim,
                seed: 1,
                timeline: false,
            },
        );
        println!(
            "{p:<12} E {:8.2} mig {:6} slatah {:5.2} pdm {:5.3} overall {:5.3} shut {:5} ({:.2}s)",
            r.energy_kwh,
            r.migrations,
            r.slatah_pct,
            r.pdm_pct,
            r.sla_overall_pct,
            r.host_shutdowns,
            t.elapsed().as_secs_f64()
        );
    }
}

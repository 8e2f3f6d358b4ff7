//! Fidelity against CloudSim 3.0.3 (reference notes §1.8), at the precision CloudSim prints:
//! - calibration day 20110303, CloudSim's file order: energy (kWh, 2 decimals), VM migrations (exact),
//!   SLATAH (%, 2 decimals), PDM (%, 2 decimals), overall SLA violation (%, 2 decimals) and host
//!   shutdowns (exact) equal CloudSim's printout for each of the seven policies; NPA is 2419.2 kWh
//!   exactly. CloudSim also prints SLAV (`SLA: %.5f%%`), but the reference run did not record it, and
//!   it does not print ESV: for those two the test holds the definitions (SLAV = SLATAH × PDM,
//!   ESV = energy × SLAV) on the unrounded figures, so they follow from figures that match.
//! - ten-day medians: every median the reference notes give (DVFS energy; THR-MMT-0.8 energy and
//!   migrations; LR-MMT-1.2 energy, migrations, SLATAH and PDM) equals CloudSim's at the precision the
//!   notes give it (2 decimals; migrations in thousands with 2 decimals), and LRR-MMT-1.2 equals
//!   LR-MMT-1.2 as it does in CloudSim.

use tern_policy::Model;
use tern_sim::{Report, SimConfig, TraceOrder, TraceSet, Workload, simulate, sweep};

fn day(set: &TraceSet, d: &str) -> Workload {
    let traces = set
        .load_day(d, &TraceOrder::CloudSim)
        .expect("built-in traces load in CloudSim's order");
    Workload::benchmark(d, 800, traces.samples, Model::CloudSim)
}

fn run(w: &Workload, policy: &str) -> Report {
    simulate(
        w,
        &SimConfig {
            policy: policy.parse().unwrap(),
            model: Model::CloudSim,
            seed: 1,
            timeline: false,
        },
    )
}

/// CloudSim 3.0.3, day 20110303 (reference notes §1.8), as printed: energy kWh, migrations,
/// SLATAH %, PDM %, overall SLA violation %, host shutdowns.
const CALIBRATION: [(&str, &str, u64, &str, &str, &str, u64); 7] = [
    ("dvfs", "764.96", 0, "0.00", "0.00", "0.00", 473),
    ("iqr-mmt-1.5", "193.63", 27592, "5.02", "0.07", "0.08", 6045),
    ("lr-mmt-1.2", "167.83", 27649, "5.72", "0.08", "0.13", 5190),
    ("lrr-mmt-1.2", "167.83", 27649, "5.72", "0.08", "0.13", 5190),
    ("mad-mmt-2.5", "189.79", 27781, "5.09", "0.07", "0.08", 5981),
    ("thr-mmt-0.8", "198.08", 27728, "5.00", "0.07", "0.08", 6109),
    (
        "thr-mmt-1.0",
        "168.71",
        47987,
        "15.68",
        "0.19",
        "0.56",
        6309,
    ),
];

/// Our figures in CloudSim's print format, in the order of [`CALIBRATION`].
fn printed(r: &Report) -> (String, u64, String, String, String, u64) {
    (
        format!("{:.2}", r.energy_kwh),
        r.migrations,
        format!("{:.2}", r.slatah_pct),
        format!("{:.2}", r.pdm_pct),
        format!("{:.2}", r.sla_overall_pct),
        r.host_shutdowns,
    )
}

#[test]
fn calibration_day_matches_cloudsim_3_0_3() {
    let set = TraceSet::bundled_day("20110303").expect("built-in archive opens");
    let w = day(&set, "20110303");
    assert_eq!(w.vms.len(), 1052);
    assert_eq!(
        run(&w, "npa").energy_kwh,
        2419.2,
        "NPA must be exactly 2419.2 kWh"
    );
    let mut mismatches = Vec::new();
    for (policy, energy, migrations, slatah, pdm, overall, shutdowns) in CALIBRATION {
        let r = run(&w, policy);
        let want = (
            energy.to_string(),
            migrations,
            slatah.to_string(),
            pdm.to_string(),
            overall.to_string(),
            shutdowns,
        );
        let got = printed(&r);
        println!("{policy:<12} ours {got:?}\n{:<12} CloudSim {want:?}", "");
        if got != want {
            mismatches.push(format!("{policy}: ours {got:?}, CloudSim {want:?}"));
        }
        // the figures CloudSim's run did not record follow from the matched ones by definition
        // (the report keeps SLATAH and PDM in per cent: undoing the ×100 may cost the last bit)
        let slav = r.slatah_pct / 100.0 * (r.pdm_pct / 100.0);
        assert!(
            (r.slav - slav).abs() <= 1e-15 * slav,
            "{policy}: SLAV {} = SLATAH × PDM {slav}",
            r.slav
        );
        assert_eq!(
            r.esv.to_bits(),
            (r.energy_kwh * r.slav).to_bits(),
            "{policy}: ESV = energy × SLAV"
        );
    }
    assert!(
        mismatches.is_empty(),
        "differs from CloudSim's printout:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn ten_day_medians_match_cloudsim_3_0_3() {
    let set = TraceSet::bundled().expect("built-in archive opens");
    let days = set.days().unwrap();
    assert_eq!(days.len(), 10);
    let ws: Vec<Workload> = days.iter().map(|d| day(&set, d)).collect();
    let policies: Vec<_> = ["dvfs", "thr-mmt-0.8", "lr-mmt-1.2", "lrr-mmt-1.2"]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let reports = sweep::run(&ws, &policies, Model::CloudSim, 1, threads, false);
    let s = sweep::summarize(&reports);
    println!("{}", sweep::table(&s));
    let f2 = |x: f64| format!("{x:.2}");
    // reference notes §0 and §1.8: ten-day medians of CloudSim 3.0.3 as the notes give them
    let got = [
        ("DVFS energy kWh", f2(s[0].energy_kwh), "764.25"),
        ("THR-MMT-0.8 energy kWh", f2(s[1].energy_kwh), "187.59"),
        (
            "THR-MMT-0.8 migrations ×10³",
            f2(s[1].migrations / 1e3),
            "26.75",
        ),
        ("LR-MMT-1.2 energy kWh", f2(s[2].energy_kwh), "162.16"),
        (
            "LR-MMT-1.2 migrations ×10³",
            f2(s[2].migrations / 1e3),
            "27.28",
        ),
        ("LR-MMT-1.2 SLATAH %", f2(s[2].slatah_pct), "6.18"),
        ("LR-MMT-1.2 PDM %", f2(s[2].pdm_pct), "0.08"),
    ];
    let bad: Vec<String> = got
        .iter()
        .filter(|(_, ours, theirs)| ours != theirs)
        .map(|(what, ours, theirs)| format!("{what}: ours {ours}, CloudSim {theirs}"))
        .collect();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert_eq!(s[0].migrations, 0.0);
    // LR ≡ LRR in CloudSim's code (docs/sim.md, difference 3): the whole summary is equal
    assert_eq!(
        (
            s[2].energy_kwh,
            s[2].migrations,
            s[2].slatah_pct,
            s[2].pdm_pct
        ),
        (
            s[3].energy_kwh,
            s[3].migrations,
            s[3].slatah_pct,
            s[3].pdm_pct
        )
    );
}

#[test]
fn same_seed_same_output_also_for_random_selection() {
    let set = TraceSet::bundled_day("20110306").expect("built-in archive opens");
    let d = set.load_day("20110306", &TraceOrder::Sorted).unwrap();
    let w = Workload::benchmark("20110306", 800, d.samples, Model::Paper);
    let cfg = |seed| SimConfig {
        policy: "mad-rs-2.5".parse().unwrap(),
        model: Model::Paper,
        seed,
        timeline: true,
    };
    let a = simulate(&w, &cfg(5));
    let b = simulate(&w, &cfg(5));
    let c = simulate(&w, &cfg(6));
    assert_eq!(a, b);
    assert_ne!(a.migrations, c.migrations);
}

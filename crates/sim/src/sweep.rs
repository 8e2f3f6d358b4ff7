//! Days × policies in parallel (std threads over a shared work index) and the paper-style summary.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tern_policy::{Model, PolicySpec};

use crate::engine::{SimConfig, simulate};
use crate::report::Report;
use crate::workload::Workload;

/// Run every (workload, policy) pair on `threads` threads. Results come back workload-major, in the
/// order of the inputs, whatever the thread count.
pub fn run(
    workloads: &[Workload],
    policies: &[PolicySpec],
    model: Model,
    seed: u64,
    threads: usize,
    timeline: bool,
) -> Vec<Report> {
    run_with_progress(
        workloads,
        policies,
        model,
        seed,
        threads,
        timeline,
        &|_, _| {},
    )
}

/// [`run`], calling `progress(done, total)` from the worker threads as each run finishes.
pub fn run_with_progress(
    workloads: &[Workload],
    policies: &[PolicySpec],
    model: Model,
    seed: u64,
    threads: usize,
    timeline: bool,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Vec<Report> {
    let jobs: Vec<(usize, usize)> = (0..workloads.len())
        .flat_map(|w| (0..policies.len()).map(move |p| (w, p)))
        .collect();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Report>>> = Mutex::new(vec![None; jobs.len()]);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1).min(jobs.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(w, p)) = jobs.get(i) else { break };
                    let cfg = SimConfig {
                        policy: policies[p],
                        model,
                        seed,
                        timeline,
                    };
                    let r = simulate(&workloads[w], &cfg);
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1, jobs.len());
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .flatten()
        .collect()
}

/// Median (mean of the middle two for even counts); NaN for no data.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Per-policy medians over the workloads, in first-seen policy order.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Policy name.
    pub policy: String,
    /// Number of workloads (days).
    pub days: usize,
    /// Median ESV.
    pub esv: f64,
    /// Median energy (kWh).
    pub energy_kwh: f64,
    /// Median SLAV.
    pub slav: f64,
    /// Median SLATAH (%).
    pub slatah_pct: f64,
    /// Median PDM (%).
    pub pdm_pct: f64,
    /// Median migrations.
    pub migrations: f64,
}

/// Medians per policy.
pub fn summarize(reports: &[Report]) -> Vec<Summary> {
    let mut order: Vec<String> = Vec::new();
    for r in reports {
        if !order.contains(&r.policy) {
            order.push(r.policy.clone());
        }
    }
    order
        .into_iter()
        .map(|p| {
            let rs: Vec<&Report> = reports.iter().filter(|r| r.policy == p).collect();
            let m =
                |f: &dyn Fn(&Report) -> f64| median(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
            Summary {
                days: rs.len(),
                esv: m(&|r| r.esv),
                energy_kwh: m(&|r| r.energy_kwh),
                slav: m(&|r| r.slav),
                slatah_pct: m(&|r| r.slatah_pct),
                pdm_pct: m(&|r| r.pdm_pct),
                migrations: m(&|r| r.migrations as f64),
                policy: p,
            }
        })
        .collect()
}

/// The paper's Table V layout: medians over days, said so in a caption line above the table.
pub fn table(summaries: &[Summary]) -> String {
    let mut out = String::from(
        "Medians over the days, per policy (the paper's Table V layout; each run is in the CSV):\n\n| Policy | days | ESV (×10⁻³) | Energy (kWh) | SLAV (×10⁻⁵) | SLATAH | PDM | VM migr. (×10³) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for s in summaries {
        out += &format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} % | {:.2} % | {:.2} |\n",
            s.policy.to_uppercase(),
            s.days,
            s.esv * 1e3,
            s.energy_kwh,
            s.slav * 1e5,
            s.slatah_pct,
            s.pdm_pct,
            s.migrations / 1e3
        );
    }
    out
}

/// All reports as CSV (header + one row each).
pub fn csv(reports: &[Report]) -> String {
    let mut out = String::from(Report::CSV_HEADER);
    out.push('\n');
    for r in reports {
        out += &r.csv_row();
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth;

    #[test]
    fn parallel_sweep_equals_serial_and_is_deterministic() {
        let ws: Vec<Workload> = (0..2)
            .map(|s| synth::workload(40, 70, s, Model::CloudSim))
            .collect();
        let ps: Vec<PolicySpec> = ["dvfs", "thr-rs-0.8", "mad-mc-2.5", "lr-mu-1.2"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let a = run(&ws, &ps, Model::CloudSim, 9, 1, false);
        let calls = Mutex::new(Vec::new());
        let b = run_with_progress(&ws, &ps, Model::CloudSim, 9, 3, false, &|done, total| {
            calls.lock().unwrap().push((done, total))
        });
        assert_eq!(a, b);
        let mut calls = calls.into_inner().unwrap();
        calls.sort();
        assert_eq!(calls, (1..=8).map(|d| (d, 8)).collect::<Vec<_>>());
        assert_eq!(a.len(), 8);
        assert_eq!(a[1].workload, ws[0].name);
        assert_eq!(a[5].policy, "thr-rs-0.8");
        let s = summarize(&a);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].policy, "dvfs");
        assert_eq!(s[0].migrations, 0.0);
        let t = table(&s);
        assert!(t.starts_with("Medians over the days, per policy"), "{t}");
        assert!(t.contains("| THR-RS-0.8 | 2 |"));
        assert_eq!(csv(&a).lines().count(), 9);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}

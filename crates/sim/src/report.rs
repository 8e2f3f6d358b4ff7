//! Results of one simulated day: the benchmark's metrics, and optional per-step series for plots.

use tern_policy::{Model, PolicySpec};

/// Per-step series (one point per control period).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timeline {
    /// Simulated time (s) of each point.
    pub t_s: Vec<f64>,
    /// Hosts with non-zero CPU load.
    pub active_hosts: Vec<u32>,
    /// Data-centre power (W).
    pub power_w: Vec<f64>,
    /// Migrations started at that step.
    pub migrations: Vec<u32>,
}

impl Timeline {
    pub(crate) fn push(&mut self, t: f64, active: usize, watts: f64, migrations: u32) {
        self.t_s.push(t);
        self.active_hosts.push(active as u32);
        self.power_w.push(watts);
        self.migrations.push(migrations);
    }
}

/// The metrics of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Workload label (day).
    pub workload: String,
    /// Policy name.
    pub policy: String,
    /// Model.
    pub model: Model,
    /// Energy (kWh).
    pub energy_kwh: f64,
    /// VM migrations started.
    pub migrations: u64,
    /// SLA violation time per active host (%).
    pub slatah_pct: f64,
    /// Performance degradation due to migrations (%).
    pub pdm_pct: f64,
    /// SLATAH × PDM (fractions).
    pub slav: f64,
    /// Energy × SLAV.
    pub esv: f64,
    /// Host active → idle transitions.
    pub host_shutdowns: u64,
    /// Overall CPU under-allocation (%): the reference code's "overall SLA violation".
    pub sla_overall_pct: f64,
    /// VMs that found no host at t = 0 (too few hosts) and took no part in the run.
    pub unplaced_vms: u64,
    /// Per-step series, when asked for.
    pub timeline: Option<Timeline>,
}

impl Report {
    pub(crate) fn npa(
        name: &str,
        model: Model,
        energy_kwh: f64,
        timeline: Option<Timeline>,
    ) -> Self {
        Report {
            workload: name.to_string(),
            policy: PolicySpec::Npa.to_string(),
            model,
            energy_kwh,
            migrations: 0,
            slatah_pct: 0.0,
            pdm_pct: 0.0,
            slav: 0.0,
            esv: 0.0,
            host_shutdowns: 0,
            sla_overall_pct: 0.0,
            unplaced_vms: 0,
            timeline,
        }
    }

    /// Build the metrics from per-host (active s, violation s, shutdowns) and per-VM (requested,
    /// allocated, under-allocated while migrating; MIPS·s) accounts.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_accounts(
        name: &str,
        policy: &PolicySpec,
        model: Model,
        energy_j: f64,
        migrations: u64,
        hosts: &[(f64, f64, u64)],
        vms: &[(f64, f64, f64)],
        timeline: Option<Timeline>,
    ) -> Self {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let (slatah, pdm) = match model {
            // ratio of sums, as the reference code computes them
            Model::CloudSim => (
                ratio(
                    hosts.iter().map(|h| h.1).sum(),
                    hosts.iter().map(|h| h.0).sum(),
                ),
                ratio(vms.iter().map(|v| v.2).sum(), vms.iter().map(|v| v.0).sum()),
            ),
            // mean of ratios, as the paper defines them
            Model::Paper => {
                let hs: Vec<f64> = hosts
                    .iter()
                    .filter(|h| h.0 > 0.0)
                    .map(|h| h.1 / h.0)
                    .collect();
                let vs: Vec<f64> = vms
                    .iter()
                    .filter(|v| v.0 > 0.0)
                    .map(|v| v.2 / v.0)
                    .collect();
                (
                    ratio(hs.iter().sum(), hs.len() as f64),
                    ratio(vs.iter().sum(), vs.len() as f64),
                )
            }
        };
        let req: f64 = vms.iter().map(|v| v.0).sum();
        let alloc: f64 = vms.iter().map(|v| v.1).sum();
        let energy_kwh = energy_j / 3_600_000.0;
        let slav = slatah * pdm;
        Report {
            workload: name.to_string(),
            policy: policy.to_string(),
            model,
            energy_kwh,
            migrations,
            slatah_pct: slatah * 100.0,
            pdm_pct: pdm * 100.0,
            slav,
            esv: energy_kwh * slav,
            host_shutdowns: hosts.iter().map(|h| h.2).sum(),
            sla_overall_pct: ratio(req - alloc, req) * 100.0,
            unplaced_vms: 0,
            timeline,
        }
    }

    /// One JSON object with the benchmark's metrics.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"workload\":\"{}\",\"policy\":\"{}\",\"model\":\"{}\",\"energy_kwh\":{},\"migrations\":{},\"slatah_pct\":{},\"pdm_pct\":{},\"slav\":{},\"esv\":{},\"host_shutdowns\":{},\"sla_overall_pct\":{},\"unplaced_vms\":{}}}",
            json_escape(&self.workload),
            self.policy,
            model_name(self.model),
            self.energy_kwh,
            self.migrations,
            self.slatah_pct,
            self.pdm_pct,
            self.slav,
            self.esv,
            self.host_shutdowns,
            self.sla_overall_pct,
            self.unplaced_vms
        )
    }

    /// CSV header matching [`Report::csv_row`].
    pub const CSV_HEADER: &'static str = "workload,policy,model,energy_kwh,migrations,slatah_pct,pdm_pct,slav,esv,host_shutdowns,sla_overall_pct";

    /// One CSV row.
    pub fn csv_row(&self) -> String {
        format!(
            "{},{},{},{:.4},{},{:.4},{:.4},{:.6e},{:.6e},{},{:.4}",
            self.workload,
            self.policy,
            model_name(self.model),
            self.energy_kwh,
            self.migrations,
            self.slatah_pct,
            self.pdm_pct,
            self.slav,
            self.esv,
            self.host_shutdowns,
            self.sla_overall_pct
        )
    }
}

/// `cloudsim` or `paper`.
pub fn model_name(m: Model) -> &'static str {
    match m {
        Model::CloudSim => "cloudsim",
        Model::Paper => "paper",
    }
}

fn json_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

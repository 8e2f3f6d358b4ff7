//! Synthetic workloads for data centres larger than the PlanetLab days: PlanetLab-like CPU traces
//! (mostly light, heavy-tailed, ~15 % idle samples, autocorrelated) generated from a seed.

use tern_policy::{Model, SplitMix64};

use crate::workload::{SAMPLES, Workload};

fn normal(rng: &mut SplitMix64) -> f64 {
    let u1 = rng.next_f64().max(1e-12);
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// One synthetic trace.
pub fn trace(rng: &mut SplitMix64) -> [u8; SAMPLES] {
    // per-VM level: log-normal around 6 %, like the PlanetLab medians
    let level = (6.0f64.ln() + 1.0 * normal(rng)).exp().min(90.0);
    let idle = 0.15 * rng.next_f64() * 2.0;
    let mut z = normal(rng);
    let mut out = [0u8; SAMPLES];
    for x in out.iter_mut() {
        z = 0.9 * z + (1.0f64 - 0.81).sqrt() * normal(rng);
        if rng.next_f64() < idle {
            *x = 0;
        } else {
            *x = (level * (0.6 * z).exp()).round().clamp(0.0, 99.0) as u8;
        }
    }
    out
}

/// A synthetic benchmark-style data centre: `hosts` alternating G4/G5 hosts and `vms` VMs.
pub fn workload(hosts: usize, vms: usize, seed: u64, model: Model) -> Workload {
    let mut rng = SplitMix64::new(seed);
    let traces = (0..vms).map(|_| trace(&mut rng)).collect();
    Workload::benchmark(
        &format!("synthetic-{hosts}h-{vms}vm-s{seed}"),
        hosts,
        traces,
        model,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_traces_are_seeded_and_planetlab_like() {
        let a = workload(10, 500, 42, Model::CloudSim);
        let b = workload(10, 500, 42, Model::CloudSim);
        let c = workload(10, 500, 43, Model::CloudSim);
        assert_eq!(a.traces, b.traces);
        assert_ne!(a.traces, c.traces);
        let all: Vec<f64> = a
            .traces
            .iter()
            .flat_map(|t| t.iter().map(|&x| x as f64))
            .collect();
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        let zeros = all.iter().filter(|&&x| x == 0.0).count() as f64 / all.len() as f64;
        assert!((5.0..20.0).contains(&mean), "mean {mean}");
        assert!((0.08..0.30).contains(&zeros), "zeros {zeros}");
    }
}

//! The parking policy: pure and deterministic — samples in, a set of unparked CPUs out.
//!
//! Each check interval the caller hands a [`Sample`] (busy fraction of every managed CPU and the
//! run-queue wait of the managed threads, in cores' worth). The policy keeps a count `n` of unparked
//! CPUs and decides, with these rules (all percentages are knobs, see [`Knobs`]):
//!
//! * **demand** `D = Σ busy + runq_wait` (cores' worth of work, including work that waited);
//! * **concurrency** `N_c`: the smallest `N` such that at least `concurrency %` of the time at most `N`
//!   CPUs were busy, with the per-CPU busy fractions taken as independent (Poisson-binomial);
//! * **distribution** `N_d = ⌈D / distribution %⌉`: CPUs needed to keep each at the target busy share;
//! * **increase** when the mean busy of the unparked CPUs exceeds the increase threshold, or the least
//!   busy unparked CPU exceeds the headroom, or one unparked CPU exceeds the over-utilisation
//!   threshold, or `max(N_c, N_d) > n`. The jump goes straight to `max(n + 1, N_c, N_d)` ("ideal"),
//!   as soon as `increase_time` intervals have passed since the last change — **unpark fast**;
//! * **decrease** by one CPU only when, for `decrease_time` consecutive intervals, the mean is below
//!   the decrease threshold *and* the demand would fit on `n − 1` CPUs below both the headroom and the
//!   increase threshold *and* `max(N_c, N_d) < n` (so the park cannot itself trigger an unpark:
//!   **hysteresis**), and
//!   `decrease_time` intervals have passed since the last change — **park slowly**;
//! * `n` stays within `[min, max]`, computed per NUMA node from the min/max percentages; the CPUs
//!   chosen are the first `n` of [`Topology::unpark_order`] (SMT siblings and packages filled first).

#![deny(clippy::disallowed_methods)]
use serde::{Deserialize, Serialize};

use crate::knobs::Knobs;
use crate::topology::Topology;

/// What the policy sees each interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Busy fraction (0–1) of each managed CPU over the interval, in [`Topology::cpus`] order.
    pub cpu_busy: Vec<f64>,
    /// Time the managed threads spent runnable but waiting, in cores' worth (wait time / interval).
    pub runq_wait: f64,
}

/// Why the count changed (or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// No change.
    Hold,
    /// Mean busy of unparked CPUs above the increase threshold.
    Busy,
    /// The least busy unparked CPU is above the headroom threshold.
    Headroom,
    /// An unparked CPU is above the over-utilisation threshold.
    OverUtilised,
    /// Concurrency or distribution asks for more CPUs.
    Concurrency,
    /// Sustained low load: one CPU parked.
    Low,
    /// The knobs changed and the count was clamped into the new [min, max].
    Knobs,
}

/// The decision of one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// CPU ids that stay unparked, ascending.
    pub unparked: Vec<usize>,
    /// Whether the set differs from the previous interval.
    pub changed: bool,
    /// Why.
    pub reason: Reason,
    /// Demand seen this interval, in cores.
    pub demand: f64,
}

/// Policy state across intervals.
#[derive(Debug, Clone)]
pub struct Policy {
    knobs: Knobs,
    topology: Topology,
    /// Unparked count.
    n: usize,
    since_change: u64,
    low_streak: u64,
    unparked: Vec<usize>,
}

impl Policy {
    /// A policy that starts with the maximum allowed set unparked (the safe state).
    /// `knobs` must be valid ([`Knobs::validate`]); `topology` must not be empty.
    pub fn new(knobs: Knobs, topology: Topology) -> Policy {
        assert!(!topology.is_empty(), "the policy needs at least one CPU");
        let mut p = Policy {
            knobs,
            topology,
            n: 0,
            since_change: 0,
            low_streak: 0,
            unparked: Vec::new(),
        };
        p.n = p.bounds().1;
        p.unparked = p.select(p.n);
        p
    }

    /// The knobs in force.
    pub fn knobs(&self) -> &Knobs {
        &self.knobs
    }

    /// The topology managed.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// CPU ids currently unparked, ascending.
    pub fn unparked(&self) -> &[usize] {
        &self.unparked
    }

    /// Replaces the knobs (already validated); the count is clamped into the new bounds at once.
    pub fn set_knobs(&mut self, knobs: Knobs) -> Decision {
        self.knobs = knobs;
        let (lo, hi) = self.bounds();
        let n = self.n.clamp(lo, hi);
        let changed = n != self.n;
        if changed {
            self.change_to(n);
        }
        Decision {
            unparked: self.unparked.clone(),
            changed,
            reason: Reason::Knobs,
            demand: 0.0,
        }
    }

    /// Smallest and largest allowed unparked counts, from the per-node percentages.
    pub fn bounds(&self) -> (usize, usize) {
        let (mut lo, mut hi) = (0, 0);
        for node in self.topology.nodes() {
            let (a, b) = self.node_bounds(node);
            lo += a;
            hi += b;
        }
        (lo.max(1), hi.max(1))
    }

    fn node_bounds(&self, node: usize) -> (usize, usize) {
        let size = self.topology.cpus.iter().filter(|c| c.node == node).count();
        let pct = |p: u32| (size * p as usize).div_ceil(100);
        let hi = pct(self.knobs.max_cores_pct).clamp(1, size);
        (pct(self.knobs.min_cores_pct).min(hi), hi)
    }

    /// The CPU ids of an `n`-CPU unparked set: every node gets its minimum, then nodes fill in order
    /// up to their maximum.
    fn select(&self, n: usize) -> Vec<usize> {
        let nodes = self.topology.nodes();
        let bounds: Vec<(usize, usize)> = nodes.iter().map(|&k| self.node_bounds(k)).collect();
        let mut take: Vec<usize> = bounds.iter().map(|b| b.0).collect();
        let mut left = n.saturating_sub(take.iter().sum());
        for (i, b) in bounds.iter().enumerate() {
            let add = left.min(b.1 - take[i]);
            take[i] += add;
            left -= add;
        }
        let mut ids: Vec<usize> = nodes
            .iter()
            .zip(&take)
            .flat_map(|(&node, &t)| {
                self.topology
                    .unpark_order(node)
                    .into_iter()
                    .take(t)
                    .map(|p| self.topology.cpus[p].id)
            })
            .collect();
        ids.sort_unstable();
        ids
    }

    fn change_to(&mut self, n: usize) {
        self.n = n;
        self.unparked = self.select(n);
        self.since_change = 0;
        self.low_streak = 0;
    }

    /// One check interval. Deterministic: the same samples from the same state give the same decisions.
    pub fn step(&mut self, sample: &Sample) -> Decision {
        self.since_change = self.since_change.saturating_add(1);
        let k = &self.knobs;
        let clean = |x: f64| {
            if x.is_finite() {
                x.clamp(0.0, 1.0)
            } else {
                0.0
            }
        };
        let busy: Vec<f64> = (0..self.topology.len())
            .map(|i| clean(sample.cpu_busy.get(i).copied().unwrap_or(0.0)))
            .collect();
        let wait = if sample.runq_wait.is_finite() {
            sample.runq_wait.max(0.0)
        } else {
            0.0
        };
        let demand = busy.iter().sum::<f64>() + wait;
        let n = self.n;
        let unparked_busy: Vec<f64> = self
            .topology
            .cpus
            .iter()
            .zip(&busy)
            .filter(|(c, _)| self.unparked.binary_search(&c.id).is_ok())
            .map(|(_, &b)| b)
            .collect();
        let least = unparked_busy.iter().copied().fold(f64::INFINITY, f64::min);
        let most = unparked_busy.iter().copied().fold(0.0, f64::max);
        let mean = demand / n as f64;
        let pct = |p: u32| f64::from(p) / 100.0;
        let n_c = concurrency(&busy, pct(k.concurrency_pct));
        let n_d = (demand / pct(k.distribution_pct) - 1e-9).ceil().max(1.0) as usize;
        let ideal = n_c.max(n_d);

        let reason_up = if most > pct(k.over_utilisation_pct) {
            Some(Reason::OverUtilised)
        } else if least > pct(k.headroom_pct) {
            Some(Reason::Headroom)
        } else if mean > pct(k.increase_threshold_pct) {
            Some(Reason::Busy)
        } else if ideal > n {
            Some(Reason::Concurrency)
        } else {
            None
        };
        let (lo, hi) = self.bounds();
        let low = reason_up.is_none()
            && n > lo
            && mean < pct(k.decrease_threshold_pct)
            && demand / (n - 1) as f64 <= pct(k.headroom_pct).min(pct(k.increase_threshold_pct))
            && ideal < n;
        self.low_streak = if low { self.low_streak + 1 } else { 0 };

        let mut reason = Reason::Hold;
        if let Some(r) = reason_up {
            if n < hi && self.since_change >= u64::from(k.increase_time) {
                let target = (n + 1).max(ideal).min(hi);
                self.change_to(target);
                reason = r;
            }
        } else if low
            && self.low_streak >= u64::from(k.decrease_time)
            && self.since_change >= u64::from(k.decrease_time)
        {
            self.change_to(n - 1);
            reason = Reason::Low;
        }
        Decision {
            unparked: self.unparked.clone(),
            changed: reason != Reason::Hold,
            reason,
            demand,
        }
    }
}

/// The concurrency of a set of per-CPU busy fractions: the smallest `N` with
/// `P(at most N busy) ≥ threshold`, treating CPUs as independent. At least 1.
pub fn concurrency(busy: &[f64], threshold: f64) -> usize {
    // dist[j] = probability that exactly j CPUs are busy.
    let mut dist = vec![1.0f64];
    for &p in busy {
        let mut next = vec![0.0; dist.len() + 1];
        for (j, &q) in dist.iter().enumerate() {
            next[j] += q * (1.0 - p);
            next[j + 1] += q * p;
        }
        dist = next;
    }
    let mut cdf = 0.0;
    for (j, q) in dist.iter().enumerate() {
        cdf += q;
        if cdf >= threshold - 1e-9 {
            return j.max(1);
        }
    }
    busy.len().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_follows_the_definition() {
        // Two CPUs at 50 %: P(0)=.25, P(≤1)=.75, P(≤2)=1.
        assert_eq!(concurrency(&[0.5, 0.5], 0.70), 1);
        assert_eq!(concurrency(&[0.5, 0.5], 0.95), 2);
        // Light load: 1 CPU is enough 99 % of the time.
        assert_eq!(concurrency(&[0.1, 0.1], 0.95), 1);
        assert_eq!(concurrency(&[0.0, 0.0, 0.0], 0.95), 1);
        assert_eq!(concurrency(&[1.0, 1.0, 1.0], 0.95), 3);
    }

    #[test]
    fn bounds_are_per_node() {
        let mut t = Topology::flat(8);
        for c in &mut t.cpus[4..] {
            c.node = 1;
        }
        let knobs = Knobs {
            min_cores_pct: 25,
            max_cores_pct: 50,
            ..Knobs::default()
        };
        let p = Policy::new(knobs, t);
        assert_eq!(p.bounds(), (2, 4));
        // Starts at max: two per node.
        assert_eq!(p.unparked(), &[0, 1, 4, 5]);
        assert_eq!(p.select(2), vec![0, 4]);
        assert_eq!(p.select(3), vec![0, 1, 4]);
    }

    #[test]
    fn smt_siblings_fill_before_another_core() {
        let mut t = Topology::flat(4);
        // cpu0+cpu2 share core 0, cpu1+cpu3 share core 1.
        t.cpus[2].core = 0;
        t.cpus[1].core = 1;
        t.cpus[3].core = 1;
        let p = Policy::new(
            Knobs {
                min_cores_pct: 0,
                ..Knobs::default()
            },
            t,
        );
        assert_eq!(p.select(2), vec![0, 2]);
        assert_eq!(p.select(3), vec![0, 1, 2]);
    }
}

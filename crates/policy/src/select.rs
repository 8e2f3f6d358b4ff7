//! VM selection: which VM to take off an overloaded host (MMT, RS, MC, MU).

use crate::SplitMix64;

/// A VM selection policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Minimum migration time: the VM with the least RAM.
    Mmt,
    /// Random selection (seeded, so runs replay exactly).
    Rs,
    /// Maximum correlation: the VM whose CPU history is best explained by the others' (largest R²).
    Mc,
    /// Minimum utilisation: the VM with the lowest CPU utilisation now.
    Mu,
}

impl Selection {
    /// Short lower-case name.
    pub fn name(&self) -> &'static str {
        match self {
            Selection::Mmt => "mmt",
            Selection::Rs => "rs",
            Selection::Mc => "mc",
            Selection::Mu => "mu",
        }
    }
}

/// What a selector sees of one candidate VM.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// RAM in MB (migration time is proportional to it).
    pub ram_mb: u32,
    /// CPU utilisation of the VM now (0..1 of its own capacity).
    pub utilization: f64,
    /// CPU utilisation history of the VM, most recent first.
    pub history: &'a [f64],
}

/// Index (into `candidates`) of the VM to migrate, or `None` when there is none. Ties go to the first.
pub fn select(
    selection: Selection,
    candidates: &[Candidate<'_>],
    rng: &mut SplitMix64,
) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    match selection {
        Selection::Mmt => argmin(candidates.iter().map(|c| c.ram_mb as f64)),
        Selection::Mu => argmin(candidates.iter().map(|c| c.utilization)),
        Selection::Rs => Some(rng.below(candidates.len())),
        Selection::Mc => match max_correlation(candidates) {
            Some(i) => Some(i),
            None => select(Selection::Mmt, candidates, rng),
        },
    }
}

fn argmin(it: impl Iterator<Item = f64>) -> Option<usize> {
    let mut best = None;
    let mut min = f64::MAX;
    for (i, v) in it.enumerate() {
        if v < min {
            min = v;
            best = Some(i);
        }
    }
    best
}

/// Largest R² of each VM's history regressed (with intercept) on the others' over the common length;
/// `None` when the regression is not defined (one VM, too few points, or a singular design).
fn max_correlation(c: &[Candidate<'_>]) -> Option<usize> {
    let n = c.len();
    let m = c.iter().map(|x| x.history.len()).min().unwrap_or(0);
    if n < 2 || m == 0 || m < n {
        return None;
    }
    let mut best = 0;
    let mut max = f64::MIN_POSITIVE;
    for i in 0..n {
        let y: Vec<f64> = c[i].history[..m].to_vec();
        let x: Vec<&[f64]> = (0..n)
            .filter(|&j| j != i)
            .map(|j| &c[j].history[..m])
            .collect();
        let r2 = r_squared(&y, &x)?;
        if r2 > max {
            max = r2;
            best = i;
        }
    }
    Some(best)
}

/// R² of an OLS fit of y on the columns xs plus an intercept (normal equations solved by Gaussian
/// elimination with partial pivoting). `None` if the design is singular.
pub fn r_squared(y: &[f64], xs: &[&[f64]]) -> Option<f64> {
    let m = y.len();
    let k = xs.len() + 1;
    let col = |j: usize, r: usize| if j == 0 { 1.0 } else { xs[j - 1][r] };
    let mut a = vec![vec![0.0f64; k + 1]; k];
    for (p, row) in a.iter_mut().enumerate() {
        for q in 0..k {
            row[q] = (0..m).map(|r| col(p, r) * col(q, r)).sum();
        }
        row[k] = (0..m).map(|r| col(p, r) * y[r]).sum();
    }
    for p in 0..k {
        let piv = (p..k).max_by(|&i, &j| a[i][p].abs().total_cmp(&a[j][p].abs()))?;
        if a[piv][p].abs() < 1e-12 {
            return None;
        }
        a.swap(p, piv);
        for i in 0..k {
            if i != p {
                let f = a[i][p] / a[p][p];
                for q in p..=k {
                    a[i][q] -= f * a[p][q];
                }
            }
        }
    }
    let beta: Vec<f64> = (0..k).map(|p| a[p][k] / a[p][p]).collect();
    let mean = y.iter().sum::<f64>() / m as f64;
    let (mut ssr, mut sst) = (0.0, 0.0);
    for r in 0..m {
        let fit: f64 = (0..k).map(|j| beta[j] * col(j, r)).sum();
        ssr += (y[r] - fit).powi(2);
        sst += (y[r] - mean).powi(2);
    }
    Some(1.0 - ssr / sst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    #[test]
    fn selection_table() {
        let a = [0.2, 0.4, 0.6, 0.8, 0.6, 0.4];
        let b = [0.1, 0.2, 0.3, 0.4, 0.3, 0.2]; // b = a / 2: perfectly explained by a
        let c = [0.5, 0.1, 0.7, 0.2, 0.9, 0.3];
        let d = [0.3, 0.3, 0.1, 0.5, 0.2, 0.6];
        let vms = [
            Candidate {
                ram_mb: 1740,
                utilization: 0.30,
                history: &a,
            },
            Candidate {
                ram_mb: 613,
                utilization: 0.50,
                history: &b,
            },
            Candidate {
                ram_mb: 870,
                utilization: 0.10,
                history: &c,
            },
            Candidate {
                ram_mb: 613,
                utilization: 0.10,
                history: &d,
            },
        ];
        let mut rng = SplitMix64::new(7);
        let mut out = String::new();
        for s in [Selection::Mmt, Selection::Mu] {
            out += &format!("{} -> {:?}\n", s.name(), select(s, &vms, &mut rng));
        }
        out += &format!("empty -> {:?}\n", select(Selection::Mmt, &[], &mut rng));
        // MMT: least RAM, first of the two 613 MB VMs; MU: first of the two at 10 %;
        expect![[r#"
            mmt -> Some(1)
            mu -> Some(2)
            empty -> None
        "#]]
        .assert_eq(&out);
        // MC: a and b are collinear, so each is explained exactly by the others (R² = 1 up to
        // rounding) while c and d are not: the pick is a or b.
        let mc = select(Selection::Mc, &vms, &mut rng).unwrap();
        assert!(mc == 0 || mc == 1, "{mc}");
        let r2_c = r_squared(&c, &[&a, &d]).unwrap();
        assert!(r2_c < 0.999, "{r2_c}");
        // a design with two collinear regressors is singular
        assert_eq!(r_squared(&c, &[&a, &b, &d]), None);
    }

    #[test]
    fn random_selection_replays_with_the_same_seed() {
        let h = [0.0; 3];
        let vms = vec![
            Candidate {
                ram_mb: 613,
                utilization: 0.1,
                history: &h
            };
            5
        ];
        let run = |seed| {
            let mut r = SplitMix64::new(seed);
            (0..20)
                .map(|_| select(Selection::Rs, &vms, &mut r).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        assert!(run(3).iter().all(|&i| i < 5));
    }

    #[test]
    fn max_correlation_falls_back_to_mmt_when_history_is_too_short() {
        let h = [0.5, 0.4];
        let vms = [
            Candidate {
                ram_mb: 1740,
                utilization: 0.3,
                history: &h,
            },
            Candidate {
                ram_mb: 870,
                utilization: 0.3,
                history: &h,
            },
            Candidate {
                ram_mb: 870,
                utilization: 0.3,
                history: &h,
            },
        ];
        assert_eq!(
            select(Selection::Mc, &vms, &mut SplitMix64::new(0)),
            Some(1)
        );
    }
}

//! Host overload detectors: static threshold (THR), adaptive thresholds (IQR, MAD) and local regression
//! (LR, LRR), with the THR 0.7 fall-back used while a host's history is too short.

use crate::Model;

/// Utilisation threshold used by the adaptive detectors while the history is too short.
pub const FALLBACK_THRESHOLD: f64 = 0.7;
/// History points MAD and IQR need before they trust their own threshold.
pub const MIN_HISTORY_ADAPTIVE: usize = 12;
/// History points (and window) of the regression detectors.
pub const LR_WINDOW: usize = 10;

/// An overload detector with its safety parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Detector {
    /// Overloaded when requested utilisation > threshold.
    Thr(f64),
    /// Threshold 1 − s·IQR(history).
    Iqr(f64),
    /// Threshold 1 − s·MAD(history).
    Mad(f64),
    /// s · (regression forecast one migration ahead) ≥ 1.
    Lr(f64),
    /// As LR with a robust (bisquare re-weighted) fit.
    Lrr(f64),
}

/// What a detector looks at for one host.
#[derive(Debug, Clone, Copy)]
pub struct HostSample<'a> {
    /// Host CPU utilisation history (0..1 of host capacity), most recent first, zero tail trimmed.
    pub history: &'a [f64],
    /// Requested utilisation now (sum of VM demands / host capacity; may exceed 1).
    pub requested_utilization: f64,
    /// Longest migration time among the host's VMs, seconds.
    pub max_migration_time_s: f64,
}

impl Detector {
    /// Short lower-case name (`thr`, `iqr`, `mad`, `lr`, `lrr`).
    pub fn name(&self) -> &'static str {
        match self {
            Detector::Thr(_) => "thr",
            Detector::Iqr(_) => "iqr",
            Detector::Mad(_) => "mad",
            Detector::Lr(_) => "lr",
            Detector::Lrr(_) => "lrr",
        }
    }

    /// The safety parameter (or threshold for THR).
    pub fn parameter(&self) -> f64 {
        match *self {
            Detector::Thr(p)
            | Detector::Iqr(p)
            | Detector::Mad(p)
            | Detector::Lr(p)
            | Detector::Lrr(p) => p,
        }
    }

    /// Is the host overloaded? `interval_s` is the control period (300 s in the benchmark).
    pub fn is_overloaded(&self, s: &HostSample<'_>, model: Model, interval_s: f64) -> bool {
        let fallback = || s.requested_utilization > FALLBACK_THRESHOLD;
        match *self {
            Detector::Thr(t) => s.requested_utilization > t,
            Detector::Iqr(p) => match iqr_threshold(s.history, p) {
                Some(t) => s.requested_utilization > t,
                None => fallback(),
            },
            Detector::Mad(p) => match mad_threshold(s.history, p) {
                Some(t) => s.requested_utilization > t,
                None => fallback(),
            },
            Detector::Lr(p) | Detector::Lrr(p) => {
                let robust = matches!(self, Detector::Lrr(_)) && model == Model::Paper;
                match lr_forecast(s.history, s.max_migration_time_s, interval_s, model, robust) {
                    Some(f) => f * p >= 1.0,
                    None => fallback(),
                }
            }
        }
    }
}

/// Number of history points the history-based detectors count (a history that is all zeros counts
/// as one point, as in the reference code).
fn usable_len(history: &[f64]) -> usize {
    match history.iter().rposition(|&x| x != 0.0) {
        Some(i) => i + 1,
        None => 1,
    }
}

/// IQR threshold 1 − s·IQR, or `None` with fewer than 12 points.
pub fn iqr_threshold(history: &[f64], s: f64) -> Option<f64> {
    (history.len() >= MIN_HISTORY_ADAPTIVE && usable_len(history) >= MIN_HISTORY_ADAPTIVE)
        .then(|| 1.0 - s * iqr(history))
}

/// MAD threshold 1 − s·MAD, or `None` with fewer than 12 points.
pub fn mad_threshold(history: &[f64], s: f64) -> Option<f64> {
    (history.len() >= MIN_HISTORY_ADAPTIVE && usable_len(history) >= MIN_HISTORY_ADAPTIVE)
        .then(|| 1.0 - s * mad(history))
}

/// Median with the (n+1)-position rule (mean of the two middle values for even n).
pub fn median(data: &[f64]) -> f64 {
    let mut buf = [0.0f64; 64];
    if data.len() > buf.len() {
        let mut v = data.to_vec();
        v.sort_by(f64::total_cmp);
        return percentile_sorted(&v, 50.0);
    }
    let v = &mut buf[..data.len()];
    v.copy_from_slice(data);
    median_in_place(v)
}

/// Median by selection (same value as sorting and taking the (n+1)/2 position).
fn median_in_place(v: &mut [f64]) -> f64 {
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n == 1 {
        return v[0];
    }
    let pos = 50.0 * (n as f64 + 1.0) / 100.0;
    let fpos = pos.floor();
    let d = pos - fpos;
    let k = fpos as usize;
    if k >= n {
        let (_, m, _) = v.select_nth_unstable_by(n - 1, f64::total_cmp);
        return *m;
    }
    let (left, upper, _) = v.select_nth_unstable_by(k, f64::total_cmp);
    let upper = *upper;
    let lower = left.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    lower + d * (upper - lower)
}

fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n == 1 {
        return sorted[0];
    }
    let pos = p * (n as f64 + 1.0) / 100.0;
    let fpos = pos.floor();
    let d = pos - fpos;
    if pos < 1.0 {
        return sorted[0];
    }
    if pos >= n as f64 {
        return sorted[n - 1];
    }
    let lower = sorted[fpos as usize - 1];
    let upper = sorted[fpos as usize];
    lower + d * (upper - lower)
}

/// Median absolute deviation from the median.
pub fn mad(data: &[f64]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let m = median(data);
    if data.len() <= 64 {
        let mut buf = [0.0f64; 64];
        for (b, x) in buf.iter_mut().zip(data) {
            *b = (m - x).abs();
        }
        return median_in_place(&mut buf[..data.len()]);
    }
    let dev: Vec<f64> = data.iter().map(|x| (m - x).abs()).collect();
    median(&dev)
}

/// Interquartile range with nearest-rank quartiles at round(q·(n+1)).
pub fn iqr(data: &[f64]) -> f64 {
    let mut v = data.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let q1 = ((0.25 * (n + 1.0) + 0.5).floor() as usize).saturating_sub(1);
    let q3 = ((0.75 * (n + 1.0) + 0.5).floor() as usize).saturating_sub(1);
    v[q3.min(v.len() - 1)] - v[q1.min(v.len() - 1)]
}

/// Ordinary least squares fit of y against x = 1..n with the running-sum update the reference code
/// uses; returns (intercept, slope).
pub fn ols(y: &[f64]) -> (f64, f64) {
    let (mut n, mut xbar, mut ybar) = (0.0f64, 0.0f64, 0.0f64);
    let (mut sxx, mut sxy, mut sx, mut sy) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (i, &yi) in y.iter().enumerate() {
        let x = (i + 1) as f64;
        if n == 0.0 {
            xbar = x;
            ybar = yi;
        } else {
            let fact1 = 1.0 + n;
            let fact2 = n / (1.0 + n);
            let dx = x - xbar;
            let dy = yi - ybar;
            sxx += dx * dx * fact2;
            sxy += dx * dy * fact2;
            xbar += dx / fact1;
            ybar += dy / fact1;
        }
        sx += x;
        sy += yi;
        n += 1.0;
    }
    let slope = sxy / sxx;
    ((sy - slope * sx) / n, slope)
}

/// Weighted least squares of y against x = 1..n; returns (intercept, slope).
pub fn wls(y: &[f64], w: &[f64]) -> (f64, f64) {
    let (mut sw, mut swx, mut swy) = (0.0, 0.0, 0.0);
    for (i, (&yi, &wi)) in y.iter().zip(w).enumerate() {
        let x = (i + 1) as f64;
        sw += wi;
        swx += wi * x;
        swy += wi * yi;
    }
    let (xm, ym) = (swx / sw, swy / sw);
    let (mut sxx, mut sxy) = (0.0, 0.0);
    for (i, (&yi, &wi)) in y.iter().zip(w).enumerate() {
        let dx = (i + 1) as f64 - xm;
        sxx += wi * dx * dx;
        sxy += wi * dx * (yi - ym);
    }
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (ym - slope * xm, slope)
}

/// Tricube weights for x = 1..n with the newest point (x = n) weighted 1 and the oldest 0.
pub fn tricube_weights(n: usize) -> Vec<f64> {
    let span = (n - 1) as f64;
    (1..=n)
        .map(|x| {
            let d = (n - x) as f64 / span;
            let k = 1.0 - d * d * d;
            // the oldest point would get 0; give it a small weight so the fit stays defined
            (k * k * k).max(1e-3)
        })
        .collect()
}

/// Forecast of host utilisation one migration time ahead from the last 10 points, or `None` when the
/// history is shorter than 10. `Model::CloudSim` fits plain OLS (the reference code's weighting never
/// takes effect, so LR and LRR coincide); `Model::Paper` fits tricube-weighted (LR) or tricube ×
/// bisquare re-weighted (LRR) local regression.
pub fn lr_forecast(
    history: &[f64],
    max_migration_time_s: f64,
    interval_s: f64,
    model: Model,
    robust: bool,
) -> Option<f64> {
    if history.len() < LR_WINDOW {
        return None;
    }
    let y: Vec<f64> = (0..LR_WINDOW).map(|i| history[LR_WINDOW - 1 - i]).collect();
    let (a, b) = match model {
        Model::CloudSim => ols(&y),
        Model::Paper => {
            let w = tricube_weights(LR_WINDOW);
            let (a, b) = wls(&y, &w);
            if robust {
                let res: Vec<f64> = y
                    .iter()
                    .enumerate()
                    .map(|(i, yi)| yi - (a + b * (i + 1) as f64))
                    .collect();
                let abs: Vec<f64> = res.iter().map(|r| r.abs()).collect();
                let s6 = 6.0 * median(&abs);
                let w2: Vec<f64> = res
                    .iter()
                    .zip(&w)
                    .map(|(r, wi)| {
                        if s6 <= 0.0 {
                            *wi
                        } else {
                            let u = r / s6;
                            let k = (1.0 - u * u).max(0.0);
                            wi * k * k
                        }
                    })
                    .collect();
                if w2.iter().filter(|&&x| x > 0.0).count() >= 3 {
                    wls(&y, &w2)
                } else {
                    (a, b)
                }
            } else {
                (a, b)
            }
        }
    };
    let ahead = (max_migration_time_s / interval_s).ceil();
    Some(a + b * (LR_WINDOW as f64 + ahead))
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    fn sample(history: &[f64], req: f64) -> HostSample<'_> {
        HostSample {
            history,
            requested_utilization: req,
            max_migration_time_s: 27.84,
        }
    }

    #[test]
    fn statistics_on_hand_computed_data() {
        let d = [0.1, 0.5, 0.2, 0.9, 0.3];
        // sorted 0.1 0.2 0.3 0.5 0.9: median 0.3; |dev| 0.2 0.2 0.1 0.6 0 → median 0.2
        // IQR: q1 = round(1.5)-1 = 1 → 0.2, q3 = round(4.5)-1 = 4 → 0.9
        let out = format!(
            "median={:.3} mad={:.3} iqr={:.3}",
            median(&d),
            mad(&d),
            iqr(&d)
        );
        expect![["median=0.300 mad=0.200 iqr=0.700"]].assert_eq(&out);
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), 2.5);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
        // selection gives exactly what sorting gives
        let d: Vec<f64> = (0..30).map(|i| ((i * 37) % 11) as f64 * 0.013).collect();
        let mut s = d.clone();
        s.sort_by(f64::total_cmp);
        assert_eq!(median(&d), percentile_sorted(&s, 50.0));
    }

    #[test]
    fn ols_recovers_a_straight_line() {
        let y: Vec<f64> = (1..=10).map(|x| 0.1 + 0.05 * x as f64).collect();
        let (a, b) = ols(&y);
        assert!(
            (a - 0.1).abs() < 1e-12 && (b - 0.05).abs() < 1e-12,
            "{a} {b}"
        );
    }

    #[test]
    fn detector_table() {
        // history most recent first
        let rising: Vec<f64> = (0..12).map(|i| 0.9 - 0.05 * i as f64).collect(); // 0.9 .. 0.35
        let flat: Vec<f64> = vec![0.5; 12];
        let short: Vec<f64> = vec![0.5; 5];
        let mut out = String::new();
        let cases: [(&str, Detector, &[f64], f64); 12] = [
            ("thr 0.8 at 0.79", Detector::Thr(0.8), &flat, 0.79),
            ("thr 0.8 at 0.81", Detector::Thr(0.8), &flat, 0.81),
            ("mad 2.5 flat at 0.95", Detector::Mad(2.5), &flat, 0.95),
            ("mad 2.5 flat at 1.01", Detector::Mad(2.5), &flat, 1.01),
            (
                "mad short at 0.69 (fallback)",
                Detector::Mad(2.5),
                &short,
                0.69,
            ),
            (
                "mad short at 0.71 (fallback)",
                Detector::Mad(2.5),
                &short,
                0.71,
            ),
            ("iqr 1.5 rising at 0.45", Detector::Iqr(1.5), &rising, 0.45),
            ("iqr 1.5 rising at 0.6", Detector::Iqr(1.5), &rising, 0.6),
            ("lr 1.2 rising", Detector::Lr(1.2), &rising, 0.1),
            ("lr 1.2 flat", Detector::Lr(1.2), &flat, 0.1),
            (
                "lr short at 0.71 (fallback)",
                Detector::Lr(1.2),
                &short,
                0.71,
            ),
            ("lrr 1.2 flat", Detector::Lrr(1.2), &flat, 0.1),
        ];
        for (name, d, h, req) in cases {
            let o = d.is_overloaded(&sample(h, req), Model::CloudSim, 300.0);
            out += &format!("{name:<30} {o}\n");
        }
        // rising: IQR of 0.35..0.9 step 0.05 (n=12): q1 idx 2 → 0.45, q3 idx 9 → 0.8 → IQR 0.35,
        // threshold 1 - 1.5*0.35 = 0.475. LR: slope 0.05/step, forecast at x = 10 + 1 = 0.9 + 0.05 = 0.95,
        // ×1.2 = 1.14 ≥ 1. Flat 0.5 × 1.2 = 0.6 < 1.
        expect![[r#"
            thr 0.8 at 0.79                false
            thr 0.8 at 0.81                true
            mad 2.5 flat at 0.95           false
            mad 2.5 flat at 1.01           true
            mad short at 0.69 (fallback)   false
            mad short at 0.71 (fallback)   true
            iqr 1.5 rising at 0.45         false
            iqr 1.5 rising at 0.6          true
            lr 1.2 rising                  true
            lr 1.2 flat                    false
            lr short at 0.71 (fallback)    true
            lrr 1.2 flat                   false
        "#]]
        .assert_eq(&out);
        let t = iqr_threshold(&rising, 1.5).unwrap();
        assert!((t - 0.475).abs() < 1e-9, "{t}");
        let f = lr_forecast(&rising, 27.84, 300.0, Model::CloudSim, false).unwrap();
        assert!((f - 0.95).abs() < 1e-9, "{f}");
    }

    #[test]
    fn robust_regression_discounts_an_outlier_in_paper_mode() {
        // flat 0.3 with one spike in the middle
        let mut h = vec![0.3; 10];
        h[4] = 0.95;
        let plain = lr_forecast(&h, 10.0, 300.0, Model::Paper, false).unwrap();
        let robust = lr_forecast(&h, 10.0, 300.0, Model::Paper, true).unwrap();
        assert!(
            (robust - 0.3).abs() < (plain - 0.3).abs(),
            "robust {robust} plain {plain}"
        );
        // the reference-code mode fits plain OLS for both
        let a = lr_forecast(&h, 10.0, 300.0, Model::CloudSim, false).unwrap();
        let b = lr_forecast(&h, 10.0, 300.0, Model::CloudSim, true).unwrap();
        assert_eq!(a, b);
    }
}

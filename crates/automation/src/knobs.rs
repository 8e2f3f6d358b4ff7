//! The thresholds a [`Policy`] sets: its own fields, adjusted by the aggressiveness level
//! (docs/automation.md has the same table).
//!
//! | level | detector parameter | drain a host under | min improvement | hold | SLATAH margin |
//! |---|---|---|---|---|---|
//! | 1 | × 1.10 (THR: × 0.90) | never: overloads only | — | × 2 | 0 pp |
//! | 2 | × 1.05 (THR: × 0.95) | 20 % | × 2 | × 1.5 | 0.5 pp |
//! | 3 | as set | 40 % | as set | as set | 1 pp |
//! | 4 | × 0.95 (THR: × 1.05) | 60 % | × 0.5 | × 0.5 | 2 pp |
//! | 5 | × 0.90 (THR: × 1.10) | any (the policy's choice) | 0 | 0 | 5 pp |
//!
//! The safety parameter of MAD, IQR, LR and LRR grows with caution (a larger `s` sees overload
//! sooner), a THR threshold shrinks with it; an adjusted parameter is kept inside its detector's
//! range. The SLATAH margin is how much worse a plan's predicted SLATAH may be than doing nothing
//! before the preview vetoes it.

use tern_api::automation::{DetectorKind, Policy, SelectionKind};
use tern_policy::{Detector, Selection};

/// The effective thresholds of a policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Knobs {
    /// The detector with its effective parameter.
    pub detector: Detector,
    /// The selection.
    pub selection: Selection,
    /// Hosts at or above this utilisation are never drained (`None`: no drains at all).
    pub drain_below: Option<f64>,
    /// A consolidation plan must cut predicted energy by this fraction (0..1).
    pub min_improvement: f64,
    /// Hysteresis, milliseconds.
    pub hold_ms: u64,
    /// How much worse predicted SLATAH may be, percentage points.
    pub slatah_margin_pp: f64,
}

impl Knobs {
    /// The thresholds `policy` sets (it is assumed valid).
    pub fn of(policy: &Policy) -> Knobs {
        let level = policy.aggressiveness.clamp(1, 5) as usize - 1;
        let safety = [1.10, 1.05, 1.0, 0.95, 0.90][level];
        let drain_below = [
            None,
            Some(0.20),
            Some(0.40),
            Some(0.60),
            Some(f64::INFINITY),
        ][level];
        let improvement = [0.0, 2.0, 1.0, 0.5, 0.0][level];
        let hold = [2.0, 1.5, 1.0, 0.5, 0.0][level];
        let margin = [0.0, 0.5, 1.0, 2.0, 5.0][level];
        let (lo, hi) = policy.detector.parameter_range();
        let p = policy.parameter;
        let detector = match policy.detector {
            DetectorKind::Thr => Detector::Thr((p / safety).clamp(lo, hi)),
            DetectorKind::Iqr => Detector::Iqr((p * safety).clamp(lo, hi)),
            DetectorKind::Mad => Detector::Mad((p * safety).clamp(lo, hi)),
            DetectorKind::Lr => Detector::Lr((p * safety).clamp(lo, hi)),
            DetectorKind::Lrr => Detector::Lrr((p * safety).clamp(lo, hi)),
        };
        let selection = match policy.selection {
            SelectionKind::Mmt => Selection::Mmt,
            SelectionKind::Rs => Selection::Rs,
            SelectionKind::Mc => Selection::Mc,
            SelectionKind::Mu => Selection::Mu,
        };
        Knobs {
            detector,
            selection,
            drain_below,
            min_improvement: policy.min_improvement_pct / 100.0 * improvement,
            hold_ms: (f64::from(policy.hold_s) * 1000.0 * hold) as u64,
            slatah_margin_pp: margin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_three_is_the_policy_as_set() {
        let p = Policy::default();
        let k = Knobs::of(&p);
        assert_eq!(k.detector, Detector::Lr(1.2));
        assert_eq!(k.selection, Selection::Mmt);
        assert_eq!(k.drain_below, Some(0.40));
        assert_eq!(k.min_improvement, 0.05);
        assert_eq!(k.hold_ms, 30_000);
    }

    #[test]
    fn the_levels_follow_the_table() {
        let mut p = Policy {
            aggressiveness: 1,
            ..Policy::default()
        };
        let k = Knobs::of(&p);
        assert_eq!(k.drain_below, None);
        assert_eq!(k.hold_ms, 60_000);
        assert!(matches!(k.detector, Detector::Lr(s) if (s - 1.32).abs() < 1e-12));
        p.aggressiveness = 5;
        let k = Knobs::of(&p);
        assert_eq!(k.hold_ms, 0);
        assert_eq!(k.min_improvement, 0.0);
        assert!(matches!(k.detector, Detector::Lr(s) if (s - 1.08).abs() < 1e-12));
        p.detector = DetectorKind::Thr;
        p.parameter = 0.95;
        // 0.95 / 0.9 = 1.056: kept inside THR's range
        assert_eq!(Knobs::of(&p).detector, Detector::Thr(1.0));
        p.aggressiveness = 1;
        assert!(
            matches!(Knobs::of(&p).detector, Detector::Thr(t) if (t - 0.95 / 1.1).abs() < 1e-12)
        );
    }
}

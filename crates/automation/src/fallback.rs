//! The post-copy fallback ([`Policy::post_copy_fallback`](tern_api::automation::Policy)): a
//! move that pre-copy is predicted not to finish within the downtime budget is planned with
//! post-copy instead of held back, when post-copy is predicted to finish it with a pause within
//! the budget. Off by default: after the switch the VM's memory is split across both hosts, so a
//! lost link loses it (the cluster then restarts it from its disk).
//!
//! The post-copy prediction is `tern_migration`'s ([`predict_with`] with `post_copy_after`):
//! the same sender machine as [`predict_move`]'s pre-copy prediction, switching where the
//! migration switches (after [`POST_COPY_FALLBACK_AFTER_ROUNDS`] unthrottled rounds), with the
//! post-copy phase simulated for its length and the pages the guest is expected to ask for.

use tern_api::automation::{MigrationPrediction, POST_COPY_FALLBACK_AFTER_ROUNDS};
use tern_migration::machine::predict::{
    PostCopyPrediction, PredictOptions, PredictedEnd, predict_with,
};

use crate::cost::{MoveInput, model_input, predict_move};

/// Why a move falls back to post-copy, and what post-copy is predicted to do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fallback {
    /// The pre-copy prediction that does not converge.
    pub pre_copy: MigrationPrediction,
    /// Pre-copy rounds before the switch.
    pub after_rounds: u32,
    /// The post-copy phase.
    pub post_copy: PostCopyPrediction,
}

/// How a move is planned: its predicted cost, and whether it falls back to post-copy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlannedMove {
    /// The cost of the move as planned: pre-copy's, or post-copy's when it falls back (then
    /// `converges` is false: pre-copy would not).
    pub predicted: MigrationPrediction,
    /// Set when the move is planned with post-copy.
    pub fallback: Option<Fallback>,
}

impl PlannedMove {
    /// Whether the move may be planned: pre-copy converges, or post-copy finishes it.
    pub fn movable(&self) -> bool {
        self.predicted.converges || self.fallback.is_some()
    }

    /// The migration's `post_copy_after`, when it falls back.
    pub fn post_copy_after(&self) -> Option<u32> {
        self.fallback.map(|f| f.after_rounds)
    }

    /// The plan's words for a fallback: why, and what post-copy is expected to do.
    pub fn fallback_reason(&self, downtime_budget_ms: f64) -> Option<String> {
        let f = self.fallback?;
        let why = if f.pre_copy.downtime_ms > downtime_budget_ms {
            format!(
                "{:.0} ms pause over the {downtime_budget_ms:.0} ms budget",
                f.pre_copy.downtime_ms
            )
        } else {
            "it would time out".to_string()
        };
        Some(format!(
            "post-copy after {} round{}: pre-copy predicted not to converge ({why}); post-copy \
             pause {:.0} ms, then {} pages owed over {:.1} s, {} of them demanded by the guest",
            f.after_rounds,
            if f.after_rounds == 1 { "" } else { "s" },
            self.predicted.downtime_ms,
            f.post_copy.pages_owed,
            f.post_copy.duration.as_secs_f64(),
            f.post_copy.pages_demanded,
        ))
    }
}

/// Plans the move of the guest in `input`: pre-copy ([`predict_move`]); when that does not
/// converge and `post_copy_fallback` is on, post-copy after
/// [`POST_COPY_FALLBACK_AFTER_ROUNDS`] rounds if it is predicted to finish the move with a pause
/// within the budget. Otherwise the pre-copy prediction stands (and the loop holds the VM back).
pub fn plan_move(input: &MoveInput, post_copy_fallback: bool) -> PlannedMove {
    let pre_copy = predict_move(input);
    let plain = PlannedMove {
        predicted: pre_copy,
        fallback: None,
    };
    if pre_copy.converges || !post_copy_fallback {
        return plain;
    }
    // The guest and the policy as `predict_move` models them.
    let (cfg, guest) = model_input(input);
    let budget = cfg.downtime_budget;
    let opts = PredictOptions {
        post_copy_after: Some(POST_COPY_FALLBACK_AFTER_ROUNDS),
        ..PredictOptions::default()
    };
    match predict_with(&cfg, &guest, &opts) {
        Ok(p) if p.end == PredictedEnd::PostCopy && p.downtime <= budget => match p.post_copy {
            Some(post_copy) => PlannedMove {
                predicted: MigrationPrediction {
                    time_s: p.total.as_secs_f64(),
                    bytes: p.bytes_sent,
                    downtime_ms: p.downtime.as_secs_f64() * 1000.0,
                    converges: false,
                },
                fallback: Some(Fallback {
                    pre_copy,
                    after_rounds: POST_COPY_FALLBACK_AFTER_ROUNDS,
                    post_copy,
                }),
            },
            None => plain,
        },
        _ => plain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// An 8 GiB guest writing a million pages a second over the loop's default 125 MB/s link:
    /// pre-copy is still on its full copy (69 s) at the 60 s timeout.
    fn outrunning() -> MoveInput {
        MoveInput {
            memory_bytes: 8192 * MIB,
            resident_bytes: None,
            dirty_pages_per_sec: 1e6,
            link_bytes_per_sec: 125e6,
            downtime_budget_ms: 50.0,
            volume_disks: 0,
        }
    }

    #[test]
    fn the_cluster_api_takes_the_rounds_the_migration_takes() {
        use tern_migration::machine::postcopy::{AFTER_ROUNDS_RANGE, check_after_rounds};
        assert_eq!(tern_api::cluster::POST_COPY_AFTER_RANGE, AFTER_ROUNDS_RANGE);
        assert_eq!(check_after_rounds(POST_COPY_FALLBACK_AFTER_ROUNDS), Ok(()));
    }

    #[test]
    fn a_move_that_converges_is_planned_as_pre_copy_whatever_the_knob() {
        let input = MoveInput {
            memory_bytes: 1024 * MIB,
            dirty_pages_per_sec: 1_000.0,
            ..outrunning()
        };
        for knob in [false, true] {
            let m = plan_move(&input, knob);
            assert_eq!(m.predicted, predict_move(&input), "knob {knob}");
            assert!(m.predicted.converges && m.movable());
            assert_eq!((m.post_copy_after(), m.fallback_reason(50.0)), (None, None));
        }
    }

    #[test]
    fn without_the_knob_a_move_that_would_not_converge_stays_held_back() {
        let input = outrunning();
        let m = plan_move(&input, false);
        assert!(!m.predicted.converges, "{m:?}");
        assert!(!m.movable());
        assert_eq!(m.predicted, predict_move(&input));
    }

    #[test]
    fn with_the_knob_it_is_planned_with_post_copy_and_says_why() {
        let input = outrunning();
        let m = plan_move(&input, true);
        assert!(m.movable(), "{m:?}");
        assert_eq!(m.post_copy_after(), Some(POST_COPY_FALLBACK_AFTER_ROUNDS));
        let f = m.fallback.unwrap();
        assert_eq!(f.pre_copy, predict_move(&input));
        // The pause of post-copy carries only the state: within the budget, unlike pre-copy's.
        assert!(m.predicted.downtime_ms <= 50.0, "{m:?}");
        assert!(f.pre_copy.downtime_ms > 50.0 || !f.pre_copy.converges);
        // The owed pages: the guest rewrote all its memory during the full copy; it asks for
        // some of them as it runs on the target, the push sends the rest.
        assert_eq!(f.post_copy.pages_owed, 8192 * MIB / 4096, "{f:?}");
        assert!(f.post_copy.pages_demanded > 0, "{f:?}");
        // Post-copy costs a second pass over the link after the full copy: about 2 × 69 s.
        assert!((130.0..150.0).contains(&m.predicted.time_s), "{m:?}");
        let reason = m.fallback_reason(50.0).unwrap();
        assert!(
            reason.starts_with("post-copy after 1 round: pre-copy predicted not to converge"),
            "{reason}"
        );
        assert!(
            reason.contains("(it would time out)") && reason.contains("pages owed"),
            "{reason}"
        );
    }

    #[test]
    fn a_post_copy_pause_over_the_budget_keeps_the_move_held_back() {
        // A budget below even the restore estimate: post-copy's pause does not fit either.
        let input = MoveInput {
            downtime_budget_ms: 1.0,
            ..outrunning()
        };
        let m = plan_move(&input, true);
        assert!(!m.movable(), "{m:?}");
        assert_eq!(m.fallback, None);
    }
}

//! A move's predicted cost: total time, bytes and downtime, and whether it converges.
//!
//! [`predict_move`] is the one call the loop makes. Today it runs a placeholder pre-copy model
//! of its own ([`placeholder_predict`]); `tern_migration`'s predictor (which runs the real sender
//! machine against a modelled guest) replaces it inside `predict_move` once it is in the tree, with
//! no change to callers.
//!
//! The placeholder, round by round: round 0 sends the whole memory `M` over the link `B`; each
//! later round sends what the guest dirtied during the previous one (`D × t`, at most `M`); the
//! switch-over happens when a round's bytes would take at most the downtime budget; after
//! [`MAX_ROUNDS`] rounds without that, the move is predicted not to converge (its pause would
//! exceed the budget).

use tern_api::automation::MigrationPrediction;

/// Bytes of a guest page.
pub const PAGE_BYTES: f64 = 4096.0;
/// Pre-copy rounds before the placeholder gives up.
pub const MAX_ROUNDS: u32 = 30;

/// What a move's cost depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoveInput {
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// Pages dirtied per second (0 when not measured).
    pub dirty_pages_per_sec: f64,
    /// The link between the hosts, bytes per second.
    pub link_bytes_per_sec: f64,
    /// The longest acceptable pause, milliseconds.
    pub downtime_budget_ms: f64,
}

/// The loop's one entry point for a move's cost (see the module docs).
pub fn predict_move(input: &MoveInput) -> MigrationPrediction {
    placeholder_predict(input)
}

/// The placeholder pre-copy model (module docs).
pub fn placeholder_predict(input: &MoveInput) -> MigrationPrediction {
    let m = input.memory_bytes as f64;
    let b = input.link_bytes_per_sec.max(1.0);
    let d = (input.dirty_pages_per_sec.max(0.0) * PAGE_BYTES).min(m * 1e3);
    let budget_s = input.downtime_budget_ms.max(0.0) / 1000.0;
    let mut sent = m;
    let mut time = m / b;
    let mut round_bytes = m;
    for _ in 0..MAX_ROUNDS {
        let dirty = (d * round_bytes / b).min(m);
        if dirty / b <= budget_s {
            return MigrationPrediction {
                time_s: time + dirty / b,
                bytes: (sent + dirty) as u64,
                downtime_ms: 1000.0 * dirty / b,
                converges: true,
            };
        }
        sent += dirty;
        time += dirty / b;
        round_bytes = dirty;
    }
    let dirty = (d * round_bytes / b).min(m);
    MigrationPrediction {
        time_s: time + dirty / b,
        bytes: (sent + dirty) as u64,
        downtime_ms: 1000.0 * dirty / b,
        converges: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(mib: u64, pages: f64) -> MoveInput {
        MoveInput {
            memory_bytes: mib << 20,
            dirty_pages_per_sec: pages,
            link_bytes_per_sec: 125e6,
            downtime_budget_ms: 300.0,
        }
    }

    #[test]
    fn an_idle_guest_moves_in_memory_over_bandwidth() {
        let p = predict_move(&input(1024, 0.0));
        assert!(p.converges);
        assert!((p.time_s - (1024.0 * 1048576.0 / 125e6)).abs() < 1e-9);
        assert_eq!(p.bytes, 1 << 30);
        assert_eq!(p.downtime_ms, 0.0);
    }

    #[test]
    fn a_moderate_writer_converges_after_a_few_rounds_and_costs_more() {
        // 10,000 pages/s = 41 MB/s on a 125 MB/s link: each round a third of the one before
        let p = predict_move(&input(1024, 10_000.0));
        assert!(p.converges);
        assert!(p.time_s > 8.59 && p.time_s < 8.59 * 1.6, "{p:?}");
        assert!(p.downtime_ms <= 300.0);
        assert!(p.bytes > 1 << 30);
    }

    #[test]
    fn a_writer_faster_than_the_link_does_not_converge() {
        // 40,000 pages/s = 164 MB/s > 125 MB/s
        let p = predict_move(&input(1024, 40_000.0));
        assert!(!p.converges);
        assert!(p.downtime_ms > 300.0);
    }
}

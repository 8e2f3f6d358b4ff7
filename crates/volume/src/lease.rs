//! The write-lease state machine (pure: time is an argument, no clocks, no I/O).
//!
//! One exclusive write lease per file, carrying a fencing **epoch**. Every grant bumps the epoch, so
//! a write stamped with an older epoch can always be told apart and refused.
//!
//! ```text
//!            acquire(n)                       handover(n, e, m)            abort_handover(n or m)
//!   Free ───────────────▶ Held{n, e+1} ──────────────────────────▶ Held{m, e+2, from n} ─────────▶ Held{n, e+3}
//!    ▲   release(n, e) /        │  renew(n, e) extends                 │ confirm_handover(m)
//!    └── expiry (now ≥ deadline)┘                                      ▼
//!                                                                  Held{m, e+2}
//! ```
//!
//! Hand-over is a single compare-and-swap: it succeeds only if `n` holds epoch `e`, and it installs
//! `m` in the same step, so nobody can take the lease between the source's release and the
//! destination's acquire. While the hand-over is unconfirmed the source may take it back
//! (`abort_handover`), which again bumps the epoch so the destination's writes are refused.
//!
//! Only holder, epoch and pending hand-over are persisted ([`LeaseRecord`]); deadlines live in
//! memory. A coordinator that loads the table after a take-over gives every holder one full TTL
//! from that moment to renew with it.

#![deny(clippy::disallowed_methods)]
use std::collections::BTreeMap;

use crate::format::{LeaseRecord, NodeId};

/// Lease timings in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How long a grant or renewal lasts at the coordinator.
    pub ttl_ms: u64,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        LeaseTimings { ttl_ms: 4000 }
    }
}

/// A request to the lease table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOp {
    /// Take the write lease (or renew it if already held by the same node).
    Acquire {
        /// Requesting node.
        node: NodeId,
    },
    /// Extend a held lease.
    Renew {
        /// Holder.
        node: NodeId,
        /// Its epoch.
        epoch: u64,
    },
    /// Give the lease up.
    Release {
        /// Holder.
        node: NodeId,
        /// Its epoch.
        epoch: u64,
    },
    /// Compare-and-swap the lease from `node` at `epoch` to `to`.
    Handover {
        /// Current holder.
        node: NodeId,
        /// Its epoch.
        epoch: u64,
        /// Successor.
        to: NodeId,
    },
    /// Give a pending hand-over back to its source (called by the source or the destination).
    AbortHandover {
        /// Caller.
        node: NodeId,
    },
    /// The destination confirms a hand-over (the source can no longer take it back).
    ConfirmHandover {
        /// The destination.
        node: NodeId,
        /// Its epoch.
        epoch: u64,
    },
}

/// Why a lease request or a write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// Someone else holds it.
    #[error(
        "The write lease is held by node {holder} (epoch {epoch}) for another {remaining_ms} ms"
    )]
    Busy {
        /// Holder.
        holder: NodeId,
        /// Epoch.
        epoch: u64,
        /// Time left.
        remaining_ms: u64,
    },
    /// The caller's epoch is not the current one, or it is not the holder.
    #[error("Stale lease: node {node} epoch {epoch}, current holder {holder:?} epoch {current}")]
    Stale {
        /// Caller.
        node: NodeId,
        /// Caller's epoch.
        epoch: u64,
        /// Current holder.
        holder: Option<NodeId>,
        /// Current epoch.
        current: u64,
    },
    /// The lease ran out.
    #[error("The lease of node {node} (epoch {epoch}) has expired")]
    Expired {
        /// Holder.
        node: NodeId,
        /// Epoch.
        epoch: u64,
    },
    /// No hand-over is pending.
    #[error("No hand-over is pending")]
    NoHandover,
    /// Hand-over to oneself or to node 0.
    #[error("Invalid hand-over target {0}")]
    BadTarget(NodeId),
}

/// The outcome of a lease request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Holder after the request (None after a release).
    pub holder: Option<NodeId>,
    /// Epoch after the request.
    pub epoch: u64,
    /// When the lease ends at the coordinator (ms on its clock).
    pub deadline_ms: u64,
    /// Whether the persisted record changed (it must be committed before answering).
    pub persist: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Live {
    record: LeaseRecord,
    deadline_ms: u64,
}

/// The coordinator's lease table.
#[derive(Debug, Clone, Default)]
pub struct LeaseTable {
    timings: LeaseTimings,
    files: BTreeMap<String, Live>,
}

impl LeaseTable {
    /// Load persisted records at time `now_ms`: every holder gets one TTL from now to renew.
    pub fn load<'a>(
        timings: LeaseTimings,
        records: impl IntoIterator<Item = (&'a str, LeaseRecord)>,
        now_ms: u64,
    ) -> Self {
        let files = records
            .into_iter()
            .map(|(n, record)| {
                (
                    n.to_owned(),
                    Live {
                        record,
                        deadline_ms: now_ms + timings.ttl_ms,
                    },
                )
            })
            .collect();
        LeaseTable { timings, files }
    }

    /// The persisted record of a file (default if unknown).
    pub fn record(&self, name: &str) -> LeaseRecord {
        self.files.get(name).map(|l| l.record).unwrap_or_default()
    }

    /// Holder and deadline, if the lease is live at `now_ms`.
    pub fn holder(&self, name: &str, now_ms: u64) -> Option<(NodeId, u64, u64)> {
        let l = self.files.get(name)?;
        let h = l.record.holder?;
        (now_ms < l.deadline_ms).then_some((h, l.record.epoch, l.deadline_ms))
    }

    /// Forget a deleted file.
    pub fn remove(&mut self, name: &str) {
        self.files.remove(name);
    }

    /// Apply `op` to `name` at `now_ms`. On error nothing changes.
    pub fn apply(&mut self, name: &str, op: LeaseOp, now_ms: u64) -> Result<Grant, LeaseError> {
        let ttl = self.timings.ttl_ms;
        let l = self.files.get(name).copied().unwrap_or_default();
        let live_holder = l.record.holder.filter(|_| now_ms < l.deadline_ms);
        let cur = l.record.epoch;
        let stale = |node, epoch| LeaseError::Stale {
            node,
            epoch,
            holder: l.record.holder,
            current: cur,
        };
        let check_holder = |node: NodeId, epoch: u64| -> Result<(), LeaseError> {
            if l.record.holder != Some(node) || epoch != cur {
                return Err(stale(node, epoch));
            }
            if live_holder.is_none() {
                return Err(LeaseError::Expired { node, epoch });
            }
            Ok(())
        };
        let (record, deadline, persist) = match op {
            LeaseOp::Acquire { node } => match live_holder {
                Some(h) if h == node => (l.record, now_ms + ttl, false),
                Some(h) => {
                    return Err(LeaseError::Busy {
                        holder: h,
                        epoch: cur,
                        remaining_ms: l.deadline_ms - now_ms,
                    });
                }
                None => (
                    LeaseRecord {
                        epoch: cur + 1,
                        holder: Some(node),
                        handover_from: None,
                    },
                    now_ms + ttl,
                    true,
                ),
            },
            LeaseOp::Renew { node, epoch } => {
                check_holder(node, epoch)?;
                (l.record, now_ms + ttl, false)
            }
            LeaseOp::Release { node, epoch } => {
                check_holder(node, epoch)?;
                (
                    LeaseRecord {
                        epoch: cur,
                        holder: None,
                        handover_from: None,
                    },
                    now_ms,
                    true,
                )
            }
            LeaseOp::Handover { node, epoch, to } => {
                if to == 0 || to == node {
                    return Err(LeaseError::BadTarget(to));
                }
                check_holder(node, epoch)?;
                (
                    LeaseRecord {
                        epoch: cur + 1,
                        holder: Some(to),
                        handover_from: Some(node),
                    },
                    now_ms + ttl,
                    true,
                )
            }
            LeaseOp::AbortHandover { node } => {
                let from = l.record.handover_from.ok_or(LeaseError::NoHandover)?;
                if node != from && Some(node) != l.record.holder {
                    return Err(stale(node, cur));
                }
                (
                    LeaseRecord {
                        epoch: cur + 1,
                        holder: Some(from),
                        handover_from: None,
                    },
                    now_ms + ttl,
                    true,
                )
            }
            LeaseOp::ConfirmHandover { node, epoch } => {
                check_holder(node, epoch)?;
                if l.record.handover_from.is_none() {
                    return Err(LeaseError::NoHandover);
                }
                (
                    LeaseRecord {
                        handover_from: None,
                        ..l.record
                    },
                    l.deadline_ms,
                    true,
                )
            }
        };
        self.files.insert(
            name.to_owned(),
            Live {
                record,
                deadline_ms: deadline,
            },
        );
        Ok(Grant {
            holder: record.holder,
            epoch: record.epoch,
            deadline_ms: deadline,
            persist,
        })
    }

    /// Takes every write lease `node` holds away from it now (live or lapsed): the epoch is bumped
    /// and the lease left free, so any write or renewal stamped with the old epoch is refused. A
    /// pending hand-over from `node` is settled for its destination (the source cannot take it
    /// back). Returns the files whose record changed, in name order, with whether `node` held
    /// the lease (`true`) or was only a hand-over's source; each changed record must be persisted
    /// before the caller answers.
    pub fn fence_node(&mut self, node: NodeId, now_ms: u64) -> Vec<(String, bool)> {
        let mut changed = Vec::new();
        for (name, l) in &mut self.files {
            if l.record.holder == Some(node) {
                l.record = LeaseRecord {
                    epoch: l.record.epoch + 1,
                    holder: None,
                    handover_from: None,
                };
                l.deadline_ms = now_ms;
                changed.push((name.clone(), true));
            } else if l.record.handover_from == Some(node) {
                l.record.handover_from = None;
                changed.push((name.clone(), false));
            }
        }
        changed
    }

    /// May `node` write with `epoch` at `now_ms`? (The redirected path asks this for every write.)
    pub fn check_write(
        &self,
        name: &str,
        node: NodeId,
        epoch: u64,
        now_ms: u64,
    ) -> Result<(), LeaseError> {
        let l = self.files.get(name).copied().unwrap_or_default();
        if l.record.holder != Some(node) || l.record.epoch != epoch {
            return Err(LeaseError::Stale {
                node,
                epoch,
                holder: l.record.holder,
                current: l.record.epoch,
            });
        }
        if now_ms >= l.deadline_ms {
            return Err(LeaseError::Expired { node, epoch });
        }
        Ok(())
    }
}

/// A node's own view of a lease it holds: it stops writing at `deadline_ms` on *its* clock, which
/// it started before sending the request, so it always stops before the coordinator re-grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldLease {
    /// Epoch to stamp on writes.
    pub epoch: u64,
    /// Local deadline (ms on the node's clock).
    pub deadline_ms: u64,
}

impl HeldLease {
    /// From a grant, where `sent_ms` is when the node sent the request (its clock).
    pub fn from_grant(epoch: u64, sent_ms: u64, ttl_ms: u64) -> HeldLease {
        HeldLease {
            epoch,
            deadline_ms: sent_ms + ttl_ms,
        }
    }
    /// Whether the node may still write at `now_ms`.
    pub fn valid_at(&self, now_ms: u64) -> bool {
        now_ms < self.deadline_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TTL: u64 = 1000;

    fn table() -> LeaseTable {
        LeaseTable {
            timings: LeaseTimings { ttl_ms: TTL },
            files: BTreeMap::new(),
        }
    }

    #[test]
    fn acquire_is_exclusive_until_expiry_then_regrant_bumps_epoch() {
        let mut t = table();
        let g = t.apply("f", LeaseOp::Acquire { node: 1 }, 0).unwrap();
        assert_eq!((g.holder, g.epoch, g.persist), (Some(1), 1, true));
        assert!(matches!(
            t.apply("f", LeaseOp::Acquire { node: 2 }, 999),
            Err(LeaseError::Busy { holder: 1, .. })
        ));
        let g = t.apply("f", LeaseOp::Acquire { node: 2 }, 1000).unwrap();
        assert_eq!((g.holder, g.epoch), (Some(2), 2));
        assert!(matches!(
            t.check_write("f", 1, 1, 1001),
            Err(LeaseError::Stale { .. })
        ));
        assert!(matches!(
            t.apply("f", LeaseOp::Renew { node: 1, epoch: 1 }, 1001),
            Err(LeaseError::Stale { .. })
        ));
    }

    #[test]
    fn fencing_a_node_bumps_its_epochs_and_refuses_its_late_writes() {
        let mut t = table();
        t.apply("a", LeaseOp::Acquire { node: 2 }, 0).unwrap();
        t.apply("b", LeaseOp::Acquire { node: 3 }, 0).unwrap();
        t.apply("c", LeaseOp::Acquire { node: 2 }, 0).unwrap();
        // c moves from 2 to 3, unconfirmed: 2 could take it back until fenced.
        t.apply(
            "c",
            LeaseOp::Handover {
                node: 2,
                epoch: 1,
                to: 3,
            },
            10,
        )
        .unwrap();
        let fenced = t.fence_node(2, 20);
        assert_eq!(
            fenced,
            vec![("a".to_string(), true), ("c".to_string(), false)]
        );
        // a: free at a higher epoch; the old epoch can neither write nor renew.
        assert_eq!(t.record("a").epoch, 2);
        assert_eq!(t.holder("a", 20), None);
        assert!(matches!(
            t.check_write("a", 2, 1, 21),
            Err(LeaseError::Stale { .. })
        ));
        assert!(
            t.apply("a", LeaseOp::Renew { node: 2, epoch: 1 }, 21)
                .is_err()
        );
        // Someone else takes it at once, above the fenced epoch.
        let g = t.apply("a", LeaseOp::Acquire { node: 3 }, 22).unwrap();
        assert_eq!((g.holder, g.epoch), (Some(3), 3));
        // b is untouched; c stays with its destination, and the source cannot abort any more.
        assert_eq!(t.holder("b", 20).map(|h| h.0), Some(3));
        assert_eq!(t.record("c").holder, Some(3));
        assert_eq!(
            t.apply("c", LeaseOp::AbortHandover { node: 2 }, 23),
            Err(LeaseError::NoHandover)
        );
        assert!(t.fence_node(2, 30).is_empty());
    }

    #[test]
    fn handover_is_one_step_and_abort_returns_the_lease_to_the_source() {
        let mut t = table();
        t.apply("f", LeaseOp::Acquire { node: 1 }, 0).unwrap();
        let g = t
            .apply(
                "f",
                LeaseOp::Handover {
                    node: 1,
                    epoch: 1,
                    to: 2,
                },
                10,
            )
            .unwrap();
        assert_eq!((g.holder, g.epoch), (Some(2), 2));
        // A third node cannot slip in, and the source's old epoch is dead.
        assert!(matches!(
            t.apply("f", LeaseOp::Acquire { node: 3 }, 11),
            Err(LeaseError::Busy { holder: 2, .. })
        ));
        assert!(t.check_write("f", 1, 1, 12).is_err());
        t.check_write("f", 2, 2, 12).unwrap();
        let g = t
            .apply("f", LeaseOp::AbortHandover { node: 1 }, 20)
            .unwrap();
        assert_eq!((g.holder, g.epoch), (Some(1), 3));
        assert!(t.check_write("f", 2, 2, 21).is_err());
        assert_eq!(
            t.apply("f", LeaseOp::AbortHandover { node: 1 }, 22),
            Err(LeaseError::NoHandover)
        );
        // Hand-over with a stale epoch fails and changes nothing.
        assert!(
            t.apply(
                "f",
                LeaseOp::Handover {
                    node: 1,
                    epoch: 1,
                    to: 3
                },
                23
            )
            .is_err()
        );
        assert_eq!(t.record("f").holder, Some(1));
    }

    #[test]
    fn loaded_table_gives_holders_one_ttl_and_regrants_above_persisted_epoch() {
        let rec = LeaseRecord {
            epoch: 41,
            holder: Some(3),
            handover_from: None,
        };
        let mut t = LeaseTable::load(LeaseTimings { ttl_ms: TTL }, [("f", rec)], 5000);
        t.apply("f", LeaseOp::Renew { node: 3, epoch: 41 }, 5500)
            .unwrap();
        let g = t.apply("f", LeaseOp::Acquire { node: 1 }, 6500).unwrap();
        assert_eq!(g.epoch, 42);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Advance(u64),
        Op(LeaseOp),
        /// A node tries to write with the epoch it last got.
        Write(NodeId),
    }

    fn step() -> impl Strategy<Value = Step> {
        let node = 1u32..5;
        prop_oneof![
            (0u64..700).prop_map(Step::Advance),
            node.clone()
                .prop_map(|node| Step::Op(LeaseOp::Acquire { node })),
            (node.clone(), 0u64..12)
                .prop_map(|(node, epoch)| Step::Op(LeaseOp::Renew { node, epoch })),
            (node.clone(), 0u64..12)
                .prop_map(|(node, epoch)| Step::Op(LeaseOp::Release { node, epoch })),
            (node.clone(), 0u64..12, node.clone())
                .prop_map(|(node, epoch, to)| Step::Op(LeaseOp::Handover { node, epoch, to })),
            node.clone()
                .prop_map(|node| Step::Op(LeaseOp::AbortHandover { node })),
            (node.clone(), 0u64..12)
                .prop_map(|(node, epoch)| Step::Op(LeaseOp::ConfirmHandover { node, epoch })),
            node.prop_map(Step::Write),
        ]
    }

    proptest! {
        /// Under a fake clock and any interleaving: at most one (node, epoch) may write at any
        /// instant; epochs only grow; once a newer epoch was granted, no older one writes again;
        /// refused requests change nothing.
        #[test]
        fn at_most_one_writer_and_stale_epochs_never_write(steps in proptest::collection::vec(step(), 1..80)) {
            let mut t = table();
            let mut now = 0u64;
            let mut max_granted = 0u64;
            let mut last_epoch: BTreeMap<NodeId, u64> = BTreeMap::new();
            for s in steps {
                match s {
                    Step::Advance(d) => now += d,
                    Step::Op(op) => {
                        let before = t.clone();
                        match t.apply("f", op, now) {
                            Ok(g) => {
                                prop_assert!(g.epoch >= max_granted, "epoch went backwards");
                                if g.epoch > max_granted {
                                    prop_assert!(g.persist, "a new epoch must be persisted");
                                }
                                max_granted = g.epoch;
                                if let Some(h) = g.holder {
                                    last_epoch.insert(h, g.epoch);
                                }
                            }
                            Err(_) => prop_assert_eq!(before.files, t.files.clone()),
                        }
                    }
                    Step::Write(n) => {
                        let e = last_epoch.get(&n).copied().unwrap_or(0);
                        if t.check_write("f", n, e, now).is_ok() {
                            prop_assert_eq!(e, max_granted, "only the newest epoch writes");
                        }
                    }
                }
                let writers: Vec<_> = (1u32..5)
                    .filter(|&n| (0..=max_granted).any(|e| t.check_write("f", n, e, now).is_ok()))
                    .collect();
                prop_assert!(writers.len() <= 1, "two writers at t={}: {:?}", now, writers);
            }
        }

        /// A node that respects its own deadline (started when it sent the request) never writes
        /// after the coordinator could have re-granted the lease.
        #[test]
        fn holder_deadline_precedes_coordinator_deadline(sent in 0u64..10_000, delay in 0u64..500) {
            let mut t = table();
            let g = t.apply("f", LeaseOp::Acquire { node: 1 }, sent + delay).unwrap();
            let held = HeldLease::from_grant(g.epoch, sent, TTL);
            prop_assert!(held.deadline_ms <= g.deadline_ms);
            let last_local_write = held.deadline_ms.saturating_sub(1).max(sent + delay);
            let other = t.apply("f", LeaseOp::Acquire { node: 2 }, last_local_write);
            prop_assert!(other.is_err(), "re-granted while the holder may still write");
        }
    }
}

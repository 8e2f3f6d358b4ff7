//! The rules a plan never breaks, and the one call that runs the policy under them.
//!
//! Pinned VMs stay where they are, VMs of one anti-affinity group never share a host, and hosts
//! that take no VMs (maintenance, powered off, on their way off or on) are never targets. The loop
//! adds its own fixed VMs: those in cooldown, those being moved, those whose move is predicted not
//! to converge.
//!
//! [`optimize_with_rules`] runs `tern_policy::optimize_with` under a `tern_policy::RuleSet` made
//! of these rules (a VM that may not move is pinned to the host it is on), so the policy itself
//! sheds other VMs and picks other hosts. [`enforce`] then checks the decisions again and applies
//! the loop's hysteresis: it drops every move off a host the loop does not want to act on yet,
//! and any move that would still break a rule once other moves were dropped. A drain is all or
//! nothing: if any of a drained host's moves is dropped, all of them are, so no host is left half
//! empty.

use std::collections::{BTreeMap, BTreeSet};

use tern_policy::{ClusterView, Decisions, PolicyConfig, RuleSet, SplitMix64};

/// Why a VM may not move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixed {
    /// Pinned to its host.
    Pinned,
    /// Moved recently; in cooldown until this time (ms).
    Cooldown(u64),
    /// Being moved.
    Migrating,
    /// Its move is predicted not to converge within the downtime budget.
    WouldNotConverge,
}

/// The rules over one view (indices are the view's).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Per VM: why it may not move, if it may not.
    pub fixed: Vec<Option<Fixed>>,
    /// Per VM: its anti-affinity group, if any.
    pub group: Vec<Option<u32>>,
}

impl Rules {
    /// The policy's rule tables for these rules: fixed VMs pinned where they are.
    pub fn rule_set(&self, view: &ClusterView) -> RuleSet {
        RuleSet {
            closed: Vec::new(),
            pins: self
                .fixed
                .iter()
                .zip(&view.vms)
                .map(|(f, v)| f.map(|_| v.host))
                .collect(),
            groups: self.group.clone(),
        }
    }
}

/// One round of the policy under `rules`. The single place where the policy is called.
pub fn optimize_with_rules(
    view: &ClusterView,
    cfg: &PolicyConfig,
    rules: &Rules,
    rng: &mut SplitMix64,
) -> Decisions {
    tern_policy::optimize_with(view, cfg, rng, &rules.rule_set(view))
}

/// Why a move was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveKind {
    /// Shed from an overloaded host.
    Shed,
    /// Part of draining an under-loaded host.
    Drain,
}

/// A move that survived the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// VM index.
    pub vm: u32,
    /// From host index.
    pub from: u32,
    /// To host index.
    pub to: u32,
    /// Why.
    pub kind: MoveKind,
}

/// A move the rules (or the loop's hysteresis) took out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// VM index.
    pub vm: u32,
    /// Host index it stays on.
    pub from: u32,
    /// Why, in words.
    pub why: String,
}

/// What is left of a round's decisions.
#[derive(Debug, Clone, Default)]
pub struct Filtered {
    /// Moves to make, in the policy's order.
    pub moves: Vec<Move>,
    /// Hosts drained whole.
    pub drained: Vec<u32>,
    /// Moves taken out.
    pub dropped: Vec<Dropped>,
}

/// Drops from `decisions` every move that breaks `rules`, and the moves off hosts the caller does
/// not want to act on yet (`may_shed(host)`, `may_drain(host)`, each `Err(why)` to refuse).
pub fn enforce(
    view: &ClusterView,
    decisions: &Decisions,
    rules: &Rules,
    may_shed: impl Fn(u32) -> Result<(), String>,
    may_drain: impl Fn(u32) -> Result<(), String>,
) -> Filtered {
    let sleeps: BTreeSet<u32> = decisions.sleeps.iter().copied().collect();
    let moves: Vec<Move> = decisions
        .migrations
        .iter()
        .map(|m| Move {
            vm: m.vm,
            from: m.from,
            to: m.to,
            kind: if sleeps.contains(&m.from) {
                MoveKind::Drain
            } else {
                MoveKind::Shed
            },
        })
        .collect();
    let mut keep = vec![true; moves.len()];
    let mut dropped = Vec::new();
    let mut dead_drains: BTreeSet<u32> = BTreeSet::new();
    let mut cut = |i: usize, why: String, keep: &mut Vec<bool>, dead: &mut BTreeSet<u32>| {
        if keep[i] {
            keep[i] = false;
            dropped.push(Dropped {
                vm: moves[i].vm,
                from: moves[i].from,
                why,
            });
        }
        if moves[i].kind == MoveKind::Drain {
            dead.insert(moves[i].from);
        }
    };
    for (i, m) in moves.iter().enumerate() {
        let gate = match m.kind {
            MoveKind::Shed => may_shed(m.from),
            MoveKind::Drain => may_drain(m.from),
        };
        if let Err(why) = gate {
            cut(i, why, &mut keep, &mut dead_drains);
            continue;
        }
        if let Some(f) = rules.fixed.get(m.vm as usize).copied().flatten() {
            let why = match f {
                Fixed::Pinned => "pinned to its host".to_string(),
                Fixed::Cooldown(until) => format!("in cooldown until {until} ms"),
                Fixed::Migrating => "already being moved".to_string(),
                Fixed::WouldNotConverge => {
                    "vetoed: predicted not to converge within the downtime budget".to_string()
                }
            };
            cut(i, why, &mut keep, &mut dead_drains);
        }
    }
    // anti-affinity: replay the kept moves in order until none breaks a group
    loop {
        // a dead drain takes all its moves with it
        for i in 0..moves.len() {
            if keep[i] && moves[i].kind == MoveKind::Drain && dead_drains.contains(&moves[i].from) {
                cut(
                    i,
                    "another move of its host's drain was dropped".to_string(),
                    &mut keep,
                    &mut dead_drains,
                );
            }
        }
        let mut count: BTreeMap<(u32, u32), u32> = BTreeMap::new();
        for (v, g) in rules.group.iter().enumerate() {
            if let Some(g) = g {
                let h = view.vms[v].host;
                if view
                    .hosts
                    .get(h as usize)
                    .is_some_and(|hv| hv.vms.contains(&(v as u32)))
                {
                    *count.entry((h, *g)).or_default() += 1;
                }
            }
        }
        let mut broke = None;
        for (i, m) in moves.iter().enumerate() {
            if !keep[i] {
                continue;
            }
            let Some(g) = rules.group.get(m.vm as usize).copied().flatten() else {
                continue;
            };
            if count.get(&(m.to, g)).copied().unwrap_or(0) > 0 {
                broke = Some(i);
                break;
            }
            if let Some(c) = count.get_mut(&(m.from, g)) {
                *c = c.saturating_sub(1);
            }
            *count.entry((m.to, g)).or_default() += 1;
        }
        match broke {
            Some(i) => cut(
                i,
                "its anti-affinity group already has a VM on the target".to_string(),
                &mut keep,
                &mut dead_drains,
            ),
            None => break,
        }
    }
    let kept: Vec<Move> = moves
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|(m, _)| *m)
        .collect();
    let drained = decisions
        .sleeps
        .iter()
        .copied()
        .filter(|h| !dead_drains.contains(h) && kept.iter().any(|m| m.from == *h))
        .collect();
    Filtered {
        moves: kept,
        drained,
        dropped,
    }
}

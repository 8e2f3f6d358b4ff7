//! An index of the busy hosts for PABFD ([`crate::cluster::find_host`]): a best-first search that
//! makes the same choice as scanning every host in list order, without looking at most of them.
//!
//! A host's power rise for a VM of `req` MIPS is `base + (P((sum + req)/T) − P(sum/T))`, where
//! `base = P(sum/T) − P(measured)` is fixed until the host's VM list changes. The power curve is
//! piecewise linear, so the bracket is at least `req` times the least slope of the curve's segments
//! between `sum/T` and `(sum + req)/T`. The index keeps the hosts in groups by (curve and capacity,
//! segment of `sum/T`), each ordered by `base`: a whole group's bound for a VM is its least base plus
//! `req` times the least slope it can reach, and its hosts come out in bound order. The search
//! evaluates hosts in increasing bound order and stops when the next bound exceeds the best rise
//! found; the winner is the least (rise, host id) among the hosts that fit — list order's "first
//! host with the least rise" — with the detector asked in that order until one host is not
//! overloaded. Equal rises are compared as the scan compares them, so ties to the last bit go to
//! the lower host id, as before.
//!
//! The bound is lowered by 1e-9 W, far above the rounding of the power formula (≈ 1e-13 W), so no
//! host that the scan could choose is left out.

#![deny(clippy::disallowed_methods)]

use std::collections::BTreeSet;

use crate::cluster::HostView;

/// Margin taken off every bound (watts).
const MARGIN_W: f64 = 1e-9;

/// Segments of a SPECpower curve (eleven points).
const SEGMENTS: usize = 10;

/// `x` as an integer with the same order (finite values; −0.0 counts as +0.0, as `<` sees it).
pub(crate) fn order_key(x: f64) -> u64 {
    let b = (x + 0.0).to_bits();
    if b >> 63 == 1 { !b } else { b | (1 << 63) }
}

fn from_key(k: u64) -> f64 {
    f64::from_bits(if k >> 63 == 1 { k & !(1 << 63) } else { !k })
}

/// Hosts with one power curve and one capacity.
#[derive(Debug, Clone)]
struct Class {
    watts: [u64; 11],
    total_bits: u64,
    total: f64,
    /// Per segment: watts per MIPS.
    slope: [f64; SEGMENTS],
}

/// The busy hosts, grouped and ordered for the search.
#[derive(Debug, Clone)]
pub(crate) struct PlaceIndex {
    classes: Vec<Class>,
    class_of: Vec<u32>,
    /// Per (class, segment): (base as an order key, host).
    groups: Vec<BTreeSet<(u64, u32)>>,
    /// Per host: where it is filed (group, key).
    slot: Vec<Option<(u32, u64)>>,
    /// Hosts whose VM list changed since they were filed.
    dirty: Vec<u32>,
    is_dirty: Vec<bool>,
    /// Hosts never to be filed again this round (excluded for the rest of it).
    gone: Vec<bool>,
    /// With the reference scheduler emulated: the filed hosts a trial placement could still change,
    /// by free MIPS (as an order key), and each one's key.
    untried: BTreeSet<(u64, u32)>,
    untried_slot: Vec<Option<u64>>,
}

impl PlaceIndex {
    /// An empty index for `hosts` (file the busy ones with [`PlaceIndex::file`]).
    pub(crate) fn new(hosts: &[HostView]) -> Self {
        let mut classes: Vec<Class> = Vec::new();
        let class_of = hosts
            .iter()
            .map(|h| {
                let watts = h.power.watts.map(f64::to_bits);
                let total = h.total_mips();
                let total_bits = total.to_bits();
                let i = match classes
                    .iter()
                    .position(|c| c.watts == watts && c.total_bits == total_bits)
                {
                    Some(i) => i,
                    None => {
                        let w = &h.power.watts;
                        // the same expression as the scan's per-host least slope
                        let slope = std::array::from_fn(|j| (w[j + 1] - w[j]) * 10.0 / total);
                        classes.push(Class {
                            watts,
                            total_bits,
                            total,
                            slope,
                        });
                        classes.len() - 1
                    }
                };
                i as u32
            })
            .collect();
        let n = hosts.len();
        PlaceIndex {
            groups: vec![BTreeSet::new(); classes.len() * SEGMENTS],
            classes,
            class_of,
            slot: vec![None; n],
            dirty: Vec::new(),
            is_dirty: vec![false; n],
            gone: vec![false; n],
            untried: BTreeSet::new(),
            untried_slot: vec![None; n],
        }
    }

    /// Host `h`'s VM list changed: file it again before the next search.
    pub(crate) fn touch(&mut self, h: usize) {
        if !self.is_dirty[h] {
            self.is_dirty[h] = true;
            self.dirty.push(h as u32);
        }
    }

    /// Hosts to file again (the caller files each one that is busy with [`PlaceIndex::file`]).
    pub(crate) fn take_dirty(&mut self) -> Vec<u32> {
        for &h in &self.dirty {
            self.is_dirty[h as usize] = false;
        }
        std::mem::take(&mut self.dirty)
    }

    /// Take host `h` out for the rest of the round.
    pub(crate) fn remove_for_good(&mut self, h: usize) {
        self.unfile(h);
        self.gone[h] = true;
    }

    fn unfile(&mut self, h: usize) {
        if let Some((g, k)) = self.slot[h].take() {
            self.groups[g as usize].remove(&(k, h as u32));
        }
        self.tried(h);
    }

    /// Host `h` was tried: no longer among the untried.
    pub(crate) fn tried(&mut self, h: usize) {
        if let Some(k) = self.untried_slot[h].take() {
            self.untried.remove(&(k, h as u32));
        }
    }

    /// The untried hosts with at least `req` free MIPS.
    pub(crate) fn untried_fitting(&self, req: f64) -> impl Iterator<Item = usize> + '_ {
        self.untried
            .range((order_key(req), 0)..)
            .map(|&(_, h)| h as usize)
    }

    /// File host `h` with allocation `sum` MIPS, `avail` free and rise-so-far `base` watts;
    /// `untried`: a trial placement could still change it. Returns `false` (and files nothing) if a
    /// figure is not finite, which the index cannot order: the caller then scans instead.
    pub(crate) fn file(
        &mut self,
        h: usize,
        sum: f64,
        avail: f64,
        base: f64,
        untried: bool,
    ) -> bool {
        self.unfile(h);
        if self.gone[h] {
            return true;
        }
        // (a negative load would sit on the curve's flat clamp below 0 %, outside the bound)
        if !sum.is_finite() || !base.is_finite() || sum < 0.0 || avail.is_nan() {
            return false;
        }
        if untried {
            let k = order_key(avail);
            self.untried.insert((k, h as u32));
            self.untried_slot[h] = Some(k);
        }
        let c = self.class_of[h] as usize;
        let u = sum / self.classes[c].total;
        let seg = if u > 0.0 {
            ((u * 10.0) as usize).min(SEGMENTS - 1)
        } else {
            0
        };
        let g = (c * SEGMENTS + seg) as u32;
        let k = order_key(base);
        self.groups[g as usize].insert((k, h as u32));
        self.slot[h] = Some((g, k));
        true
    }

    /// The groups to search for a VM of `req` MIPS (finite, ≥ 0), least bound first: per group,
    /// the bound of its first host (an order key), the group, and what its hosts' bounds add to
    /// their base (see [`PlaceIndex::hosts`]).
    pub(crate) fn plan(&self, req: f64) -> Vec<(u64, u32, f64)> {
        let mut plan = Vec::new();
        for (g, set) in self.groups.iter().enumerate() {
            let Some(&(first, _)) = set.first() else {
                continue;
            };
            let class = &self.classes[g / SEGMENTS];
            let seg = g % SEGMENTS;
            // (sum + req)/T lies below (seg + 1)/10 + req/T, so the rise runs over these segments
            let reach = (seg as f64 + 1.0 + 10.0 * req / class.total + 1e-9).floor();
            let last = if reach.is_finite() && reach < (SEGMENTS - 1) as f64 {
                (reach as usize).max(seg)
            } else {
                SEGMENTS - 1
            };
            let least = class.slope[seg..=last]
                .iter()
                .copied()
                .fold(f64::MAX, f64::min);
            let add = least * req - MARGIN_W;
            plan.push((order_key(from_key(first) + add), g as u32, add));
        }
        plan.sort_unstable_by_key(|p| (p.0, p.1));
        plan
    }

    /// Group `g`'s hosts in increasing order of base: (base, host). A host's bound for the VM
    /// [`PlaceIndex::plan`] was asked about is base + that group's `add`, so it grows along this
    /// order.
    pub(crate) fn hosts(&self, g: u32) -> impl Iterator<Item = (f64, usize)> + '_ {
        self.groups[g as usize]
            .iter()
            .map(|&(k, h)| (from_key(k), h as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_sort_like_the_numbers() {
        let xs = [
            -1e300, -2.5, -1e-300, -0.0, 0.0, 1e-300, 1e-9, 0.5, 3.0, 1e300,
        ];
        for a in xs {
            assert_eq!(from_key(order_key(a)), a + 0.0);
            for b in xs {
                assert_eq!(
                    order_key(a).cmp(&order_key(b)),
                    a.partial_cmp(&b).unwrap(),
                    "{a} {b}"
                );
            }
        }
    }
}

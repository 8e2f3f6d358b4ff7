//! Emulation of a CloudSim 3.0.3 artefact that decides placements at the boundary (used by
//! `Model::CloudSim` only): the order in which a host's CPU scheduler sums its free MIPS.
//!
//! After an update the reference scheduler subtracts the VMs' demands in placement order; after any VM
//! leaves it rebuilds the figure walking its `HashMap<String, …>` of VM uids (`"2-<vm id>"`, broker 2).
//! The two sums can differ in the last bit, which decides `free ≥ demand` when a VM's demand equals a
//! host's free MIPS. PABFD's trial placement (create the VM, test for overload, destroy it) counts as a
//! departure, so every host that passes the free-MIPS test is left rebuilt in hash order. This module
//! keeps that state per host through a round and sums in the same order: Java's `String.hashCode`,
//! `HashMap`'s bucket walk and its table growth (16 buckets, doubling past 3/4 full, never shrinking).
//!
//! Pure: the state lives in [`HostView::sched`] between rounds and in [`Emulation`] within one.

use crate::cluster::{HostView, View, host_allocation};

/// How a host's scheduler last totted up its free MIPS (kept between rounds by the caller).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedOrder {
    /// The free-MIPS figure was last rebuilt in hash-table order.
    pub by_uid: bool,
    /// Most VM entries the host's table has ever held (sets the table size, which never shrinks).
    pub peak_entries: u32,
}

/// Java's `String.hashCode` of the reference code's VM uid `"2-<id>"` (broker id 2), spread as in
/// `java.util.HashMap.hash`.
pub fn uid_hash(vm: u32) -> u32 {
    let mut digits = [0u8; 10];
    let mut n = 0;
    let mut x = vm;
    loop {
        digits[n] = b'0' + (x % 10) as u8;
        n += 1;
        x /= 10;
        if x == 0 {
            break;
        }
    }
    let mut h: i32 = b'2' as i32;
    h = h.wrapping_mul(31).wrapping_add(b'-' as i32);
    for &d in digits[..n].iter().rev() {
        h = h.wrapping_mul(31).wrapping_add(d as i32);
    }
    let h = h as u32;
    h ^ (h >> 16)
}

/// Table size of a Java `HashMap` that has held `peak` entries (16, doubling past 3/4 full).
pub fn table_capacity(peak: u32) -> u32 {
    let mut c = 16u32;
    while peak > c / 4 * 3 {
        c *= 2;
    }
    c
}

/// Per-host scheduler state through one round (all hosts; inert unless switched on).
#[derive(Debug, Clone)]
pub struct Emulation {
    on: bool,
    /// Free MIPS last rebuilt in hash order.
    by_uid: Vec<bool>,
    /// VMs added since that rebuild (summed after the hash walk, in arrival order).
    appended: Vec<Vec<u32>>,
    /// Most entries each host's table has held.
    peak: Vec<u32>,
    /// A trial placement would leave the state as it is (known since the host's VM list last
    /// changed).
    settled: Vec<bool>,
}

impl Emulation {
    /// The state the snapshot carries; `on` follows the model.
    pub fn new(hosts: &[HostView], on: bool) -> Self {
        let n = hosts.len();
        Emulation {
            on,
            by_uid: hosts.iter().map(|h| h.sched.by_uid).collect(),
            appended: vec![Vec::new(); n],
            peak: hosts
                .iter()
                .map(|h| h.sched.peak_entries.max(h.vms.len() as u32))
                .collect(),
            settled: vec![false; n],
        }
    }

    /// A VM left host `h`: its scheduler rebuilds the free MIPS in hash order.
    pub fn removed(&mut self, h: usize) {
        self.settled[h] = false;
        self.by_uid[h] = true;
        self.appended[h].clear();
    }

    /// VM `v` was added to host `h`, which now holds `len` VMs.
    pub fn added(&mut self, h: usize, v: u32, len: usize) {
        self.settled[h] = false;
        self.appended[h].push(v);
        self.peak[h] = self.peak[h].max(len as u32);
    }

    /// [`host_allocation`] with the free MIPS summed in the emulated scheduler's order.
    pub fn allocation(&self, view: View<'_>, h: usize) -> (f64, f64) {
        let (sum, avail) = host_allocation(view, h);
        if !self.on || !self.by_uid[h] || avail == 0.0 {
            return (sum, avail);
        }
        let host = &view.hosts[h];
        let appended = &self.appended[h];
        let mask = table_capacity(self.peak[h]) - 1;
        let mut order: Vec<(u32, usize, u32)> = host
            .vms
            .iter()
            .enumerate()
            .filter(|(_, v)| !appended.contains(v))
            .map(|(i, &v)| (uid_hash(v) & mask, i, v))
            .collect();
        order.sort_unstable();
        let mut free = host.total_mips();
        for v in order.iter().map(|o| o.2).chain(appended.iter().copied()) {
            let c = view.vms[v as usize].requested_mips.min(host.pe_mips);
            if free >= c {
                free -= c;
            } else {
                return (sum, 0.0);
            }
        }
        (sum, free)
    }

    /// Whether a trial placement on host `h` (allocation `sum` MIPS) could still change anything:
    /// the emulation is on, the host holds load, and it was not tried since its VM list changed.
    pub fn untried(&self, h: usize, sum: f64) -> bool {
        self.on && sum != 0.0 && !self.settled[h]
    }

    /// PABFD tried a VM on host `h` (holding `len` VMs, allocation `sum` MIPS), which the reference
    /// code does by creating and destroying it. Returns whether that changed how the host sums its
    /// free MIPS (a cached allocation must then be recomputed).
    pub fn trial(&mut self, h: usize, sum: f64, len: u32) -> bool {
        if !self.on || sum == 0.0 || self.settled[h] {
            return false;
        }
        let mut changed = false;
        // (a host already rebuilt in hash order whose table already held one VM more is left as is)
        if !self.by_uid[h] || !self.appended[h].is_empty() || self.peak[h] <= len {
            let new_peak = self.peak[h].max(len + 1);
            if !self.by_uid[h]
                || !self.appended[h].is_empty()
                || table_capacity(new_peak) != table_capacity(self.peak[h])
            {
                changed = true;
                self.by_uid[h] = true;
                self.appended[h].clear();
            }
            self.peak[h] = new_peak;
        }
        // a second trial before the VM list changes would change nothing
        self.settled[h] = true;
        changed
    }

    /// Most entries each host's table has held by the end of the round.
    pub fn into_peaks(self) -> Vec<u32> {
        self.peak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_hash_of_vm_uids() {
        // "2-0".hashCode() = 50·31² + 45·31 + 48 = 49493; "2-1052".hashCode() computed the same way
        assert_eq!(uid_hash(0), 49493); // < 2^16, so the spreading shift changes nothing
        let h: i32 = "2-1052"
            .bytes()
            .fold(0i32, |h, b| h.wrapping_mul(31).wrapping_add(b as i32));
        assert_eq!(uid_hash(1052), (h as u32) ^ ((h as u32) >> 16));
        assert_eq!(
            (table_capacity(12), table_capacity(13), table_capacity(25)),
            (16, 32, 64)
        );
    }
}

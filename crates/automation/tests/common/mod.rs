//! The loop's tests drive it through `tern_automation::replay::Replay` (migrations land on the
//! next step, power actions are answered on the next step, or fail for the hosts told to), with
//! a refused action failing the test at once.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Deref, DerefMut};

use tern_automation::replay::Replay;
use tern_automation::{Action, Loop};

#[derive(Debug, Default)]
pub struct Cluster(pub Replay);

impl Deref for Cluster {
    type Target = Replay;
    fn deref(&self) -> &Replay {
        &self.0
    }
}

impl DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut Replay {
        &mut self.0
    }
}

impl Cluster {
    /// Takes the loop's actions; one the cluster cannot carry out fails the test.
    pub fn take(&mut self, actions: Vec<Action>) {
        if let Err(e) = self.0.take(actions) {
            panic!("the loop gave an impossible action: {e}");
        }
    }

    /// One step of `interval_ms`.
    pub fn step(&mut self, lp: &mut Loop, interval_ms: u64) {
        if let Err(e) = self.0.step(lp, interval_ms) {
            panic!("step {}: {e}", self.0.step);
        }
    }

    /// Anti-affinity and pins hold in the settled placement.
    pub fn check_rules(&self, pinned_at: &BTreeMap<String, String>) {
        let mut seen = BTreeSet::new();
        for (n, v) in &self.vms {
            if let Some(g) = &v.group {
                assert!(
                    seen.insert((v.host.clone(), g.clone())),
                    "group {g} twice on {} (VM {n})",
                    v.host
                );
            }
            if let Some(h) = pinned_at.get(n) {
                assert_eq!(&v.host, h, "pinned {n} moved");
            }
        }
    }
}

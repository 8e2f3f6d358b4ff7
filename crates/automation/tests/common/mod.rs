//! The loop's tests drive it through `tern_automation::replay::Replay` (migrations land on the
//! next step, power actions are answered on the next step, or fail for the hosts told to), with
//! a refused action failing the test at once.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Deref, DerefMut};

use tern_automation::replay::Replay;
use tern_automation::telemetry::{HostSample, VmSample};
use tern_automation::{Action, Loop};

/// An up 2-core host out of maintenance, with no measurements yet.
pub fn host(name: &str) -> HostSample {
    HostSample {
        name: name.into(),
        cores: 2,
        power_model: "hp-ml110-g5".into(),
        up: true,
        maintenance: false,
        cpu_utilization: None,
        parked_cores: None,
        migration_link_bytes_per_sec: None,
    }
}

/// A 1-vCPU, 512 MiB VM on `host` using `u` of its vCPU, free to move.
pub fn vm(name: &str, host: &str, u: f64) -> VmSample {
    VmSample {
        name: name.into(),
        host: Some(host.into()),
        vcpus: 1,
        memory_mib: 512,
        resident_mib: None,
        cpu_utilization: Some(u),
        dirty_pages_per_sec: None,
        volume_disks: 0,
        pinned: false,
        anti_affinity: None,
        migrating: false,
    }
}

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

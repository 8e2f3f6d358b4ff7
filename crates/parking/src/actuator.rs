//! The actuator: confines vCPU threads to the unparked CPUs and restores everything it changed.
//!
//! Per thread it uses `sched_setaffinity` (through `nix`); optionally it also writes a cgroup cpuset's
//! `cpuset.cpus`, moves IRQ affinity (`/proc/irq/N/smp_affinity_list`) onto the unparked CPUs, and
//! lowers KVM's `halt_poll_ns` so packed vCPUs do not burn their core polling. Each original value is
//! saved on first change and written back by [`Actuator::restore`] (also run on drop).
//!
//! Threads that vanish are forgotten with a skip; threads a user pinned to a subset of the managed
//! CPUs are left alone (their pin is respected); a refused call (no permission, CPU offline) is a
//! skip with the reason, never a panic.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

use crate::runtime::{RuntimeEntry, Skip};
use crate::telemetry::HostPaths;
use crate::topology::{format_cpu_list, parse_cpu_list};

/// What the actuator may touch.
#[derive(Debug, Clone, Default)]
pub struct ActuatorConfig {
    /// `/proc` and `/sys` roots.
    pub paths: HostPaths,
    /// CPUs under management: a thread whose original affinity does not cover them all was pinned by
    /// someone else and is left alone.
    pub managed: Vec<usize>,
    /// A cgroup (v1 or v2) holding the VMs, whose `cpuset.cpus` follows the unparked set.
    pub cpuset_dir: Option<PathBuf>,
    /// Move IRQ affinity onto the unparked CPUs.
    pub irq: bool,
    /// Set KVM's `halt_poll_ns` to this while running.
    pub halt_poll_ns: Option<u64>,
}

#[derive(Debug, Clone)]
struct Pinned {
    pid: u32,
    original: Vec<usize>,
}

/// Applies CPU sets and remembers what to restore.
#[derive(Debug)]
pub struct Actuator {
    cfg: ActuatorConfig,
    threads: BTreeMap<u32, Pinned>,
    left_alone: BTreeMap<u32, u32>,
    cpuset_original: Option<String>,
    irq_original: BTreeMap<String, String>,
    halt_poll_original: Option<String>,
    current: Vec<usize>,
}

/// What an apply or restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActReport {
    /// Threads whose affinity was written.
    pub written: usize,
    /// Things not done, and why.
    pub skips: Vec<Skip>,
}

fn to_cpuset(cpus: &[usize]) -> Result<CpuSet, Errno> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c)?;
    }
    Ok(set)
}

fn from_cpuset(set: &CpuSet) -> Vec<usize> {
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

fn errno_why(e: Errno) -> String {
    match e {
        Errno::ESRCH => "thread is gone".into(),
        Errno::EPERM => {
            "no permission to change its affinity (run as root or as the VM's user)".into()
        }
        Errno::EINVAL => "CPU set refused (CPU offline or outside the thread's cpuset)".into(),
        other => other.desc().into(),
    }
}

impl Actuator {
    /// An actuator that has changed nothing yet.
    pub fn new(cfg: ActuatorConfig) -> Actuator {
        Actuator {
            cfg,
            threads: BTreeMap::new(),
            left_alone: BTreeMap::new(),
            cpuset_original: None,
            irq_original: BTreeMap::new(),
            halt_poll_original: None,
            current: Vec::new(),
        }
    }

    /// Threads currently confined by us: (pid, tid).
    pub fn confined(&self) -> Vec<(u32, u32)> {
        self.threads.iter().map(|(&tid, p)| (p.pid, tid)).collect()
    }

    /// Whether `tid` is confined by us (so it runs only on the CPUs last applied).
    pub fn is_confined(&self, tid: u32) -> bool {
        self.threads.contains_key(&tid)
    }

    /// Threads left alone because someone else pinned them: (pid, tid).
    pub fn left_alone(&self) -> Vec<(u32, u32)> {
        self.left_alone
            .iter()
            .map(|(&tid, &pid)| (pid, tid))
            .collect()
    }

    fn thread_alive(&self, pid: u32, tid: u32) -> bool {
        self.cfg
            .paths
            .proc_root
            .join(format!("{pid}/task/{tid}"))
            .exists()
    }

    /// Confines every vCPU thread of `vms` to `cpus` (must not be empty). Threads confined earlier
    /// that are no longer listed get their original affinity back.
    pub fn apply(&mut self, vms: &[RuntimeEntry], cpus: &[usize]) -> ActReport {
        let mut rep = ActReport::default();
        if cpus.is_empty() {
            rep.skips.push(Skip {
                what: "apply".into(),
                why: "empty CPU set refused".into(),
            });
            return rep;
        }
        let changed = self.current != cpus;
        let target = match to_cpuset(cpus) {
            Ok(s) => s,
            Err(e) => {
                rep.skips.push(Skip {
                    what: format_cpu_list(cpus),
                    why: e.desc().into(),
                });
                return rep;
            }
        };
        // The cpuset first: a thread's affinity cannot widen beyond its cpuset.
        if changed {
            self.apply_extras(cpus, &mut rep);
        }
        let listed: Vec<(u32, u32)> = vms
            .iter()
            .flat_map(|vm| vm.vcpu_tids.iter().map(move |&t| (vm.pid, t)))
            .collect();
        // Threads no longer listed: give back what we took.
        let stale: Vec<u32> = self
            .threads
            .keys()
            .copied()
            .filter(|t| !listed.iter().any(|&(_, l)| l == *t))
            .collect();
        for tid in stale {
            let p = self.threads.remove(&tid).expect("listed above");
            self.restore_thread(tid, &p, &mut rep);
        }
        self.left_alone
            .retain(|t, _| listed.iter().any(|&(_, l)| l == *t));
        for (pid, tid) in listed {
            if self.left_alone.contains_key(&tid) || (!changed && self.threads.contains_key(&tid)) {
                continue;
            }
            let first_touch = !self.threads.contains_key(&tid);
            if first_touch {
                let original = match sched_getaffinity(Pid::from_raw(tid as i32)) {
                    Ok(s) => from_cpuset(&s),
                    Err(e) => {
                        rep.skips.push(Skip {
                            what: format!("thread {tid}"),
                            why: errno_why(e),
                        });
                        continue;
                    }
                };
                if !self.cfg.managed.iter().all(|c| original.contains(c)) {
                    self.left_alone.insert(tid, pid);
                    rep.skips.push(Skip {
                        what: format!("thread {tid}"),
                        why: format!(
                            "pinned to {} by someone else; left alone",
                            format_cpu_list(&original)
                        ),
                    });
                    continue;
                }
                self.threads.insert(tid, Pinned { pid, original });
            }
            match sched_setaffinity(Pid::from_raw(tid as i32), &target) {
                Ok(()) => rep.written += 1,
                Err(e) => {
                    // Nothing changed for this thread: nothing to restore either.
                    if e == Errno::ESRCH || first_touch {
                        self.threads.remove(&tid);
                    }
                    rep.skips.push(Skip {
                        what: format!("thread {tid}"),
                        why: errno_why(e),
                    });
                }
            }
        }
        if changed {
            self.current = cpus.to_vec();
        }
        rep
    }

    fn apply_extras(&mut self, cpus: &[usize], rep: &mut ActReport) {
        let list = format_cpu_list(cpus);
        if let Some(dir) = &self.cfg.cpuset_dir {
            let file = dir.join("cpuset.cpus");
            if self.cpuset_original.is_none() {
                match fs::read_to_string(&file) {
                    Ok(v) => self.cpuset_original = Some(v.trim().to_string()),
                    Err(e) => rep.skips.push(Skip {
                        what: file.display().to_string(),
                        why: e.to_string(),
                    }),
                }
            }
            if self.cpuset_original.is_some()
                && let Err(e) = fs::write(&file, &list)
            {
                rep.skips.push(Skip {
                    what: file.display().to_string(),
                    why: e.to_string(),
                });
            }
        }
        if self.cfg.irq
            && let Ok(rd) = fs::read_dir(self.cfg.paths.proc_root.join("irq"))
        {
            let mut dirs: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            dirs.sort();
            for d in dirs {
                let file = d.join("smp_affinity_list");
                let Ok(orig) = fs::read_to_string(&file) else {
                    continue;
                };
                let key = file.display().to_string();
                self.irq_original
                    .entry(key.clone())
                    .or_insert_with(|| orig.trim().to_string());
                // Only IRQs that may run on every managed CPU are moved; others were placed on purpose.
                let allowed = parse_cpu_list(&self.irq_original[&key]).unwrap_or_default();
                if !self.cfg.managed.iter().all(|c| allowed.contains(c)) {
                    self.irq_original.remove(&key);
                    continue;
                }
                if let Err(e) = fs::write(&file, &list) {
                    // Per-CPU and chained IRQs refuse (EIO): expected, recorded once.
                    self.irq_original.remove(&key);
                    rep.skips.push(Skip {
                        what: key,
                        why: e.to_string(),
                    });
                }
            }
        }
        if let Some(ns) = self.cfg.halt_poll_ns
            && self.halt_poll_original.is_none()
        {
            let file = self
                .cfg
                .paths
                .sys_root
                .join("module/kvm/parameters/halt_poll_ns");
            match fs::read_to_string(&file) {
                Ok(orig) => match fs::write(&file, ns.to_string()) {
                    Ok(()) => self.halt_poll_original = Some(orig.trim().to_string()),
                    Err(e) => rep.skips.push(Skip {
                        what: file.display().to_string(),
                        why: e.to_string(),
                    }),
                },
                Err(e) => rep.skips.push(Skip {
                    what: file.display().to_string(),
                    why: e.to_string(),
                }),
            }
        }
    }

    fn restore_thread(&self, tid: u32, p: &Pinned, rep: &mut ActReport) {
        // The tid may have been reused by another process: only restore if it is still that thread.
        if !self.thread_alive(p.pid, tid) {
            return;
        }
        let res = to_cpuset(&p.original)
            .and_then(|set| sched_setaffinity(Pid::from_raw(tid as i32), &set));
        match res {
            Ok(()) => rep.written += 1,
            Err(Errno::ESRCH) => {}
            Err(e) => rep.skips.push(Skip {
                what: format!("restore thread {tid}"),
                why: errno_why(e),
            }),
        }
    }

    /// Gives every thread its original affinity and every file its original value. Idempotent.
    pub fn restore(&mut self) -> ActReport {
        let mut rep = ActReport::default();
        if let (Some(dir), Some(orig)) = (&self.cfg.cpuset_dir, self.cpuset_original.take()) {
            let file = dir.join("cpuset.cpus");
            if let Err(e) = fs::write(&file, &orig) {
                rep.skips.push(Skip {
                    what: file.display().to_string(),
                    why: e.to_string(),
                });
            }
        }
        for (file, orig) in std::mem::take(&mut self.irq_original) {
            if let Err(e) = fs::write(&file, &orig) {
                rep.skips.push(Skip {
                    what: file,
                    why: e.to_string(),
                });
            }
        }
        // Threads last: their original affinity may need the restored cpuset.
        for (tid, p) in std::mem::take(&mut self.threads) {
            self.restore_thread(tid, &p, &mut rep);
        }
        self.left_alone.clear();
        if let Some(orig) = self.halt_poll_original.take() {
            let file = self
                .cfg
                .paths
                .sys_root
                .join("module/kvm/parameters/halt_poll_ns");
            if let Err(e) = fs::write(&file, &orig) {
                rep.skips.push(Skip {
                    what: file.display().to_string(),
                    why: e.to_string(),
                });
            }
        }
        self.current.clear();
        rep
    }
}

impl Drop for Actuator {
    fn drop(&mut self) {
        self.restore();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extras_are_written_and_restored_in_a_fake_tree() {
        let root = tempfile::tempdir().unwrap();
        let paths = HostPaths {
            proc_root: root.path().join("proc"),
            sys_root: root.path().join("sys"),
        };
        let cg = root.path().join("cg");
        let kvm = paths.sys_root.join("module/kvm/parameters");
        fs::create_dir_all(&cg).unwrap();
        fs::create_dir_all(&kvm).unwrap();
        fs::write(cg.join("cpuset.cpus"), "0-3\n").unwrap();
        fs::write(kvm.join("halt_poll_ns"), "200000\n").unwrap();
        for (irq, aff) in [("5", "0-3"), ("6", "2")] {
            let d = paths.proc_root.join("irq").join(irq);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("smp_affinity_list"), aff).unwrap();
        }
        let mut a = Actuator::new(ActuatorConfig {
            paths: paths.clone(),
            managed: vec![0, 1, 2, 3],
            cpuset_dir: Some(cg.clone()),
            irq: true,
            halt_poll_ns: Some(0),
        });
        let rep = a.apply(&[], &[0, 1]);
        assert!(rep.skips.is_empty(), "{rep:?}");
        let rd = |p: PathBuf| fs::read_to_string(p).unwrap();
        assert_eq!(rd(cg.join("cpuset.cpus")), "0-1");
        assert_eq!(rd(kvm.join("halt_poll_ns")), "0");
        assert_eq!(rd(paths.proc_root.join("irq/5/smp_affinity_list")), "0-1");
        // An IRQ placed on one CPU on purpose stays there.
        assert_eq!(rd(paths.proc_root.join("irq/6/smp_affinity_list")), "2");
        a.apply(&[], &[0]);
        assert_eq!(rd(cg.join("cpuset.cpus")), "0");
        drop(a);
        assert_eq!(rd(cg.join("cpuset.cpus")), "0-3");
        assert_eq!(rd(kvm.join("halt_poll_ns")), "200000");
        assert_eq!(rd(paths.proc_root.join("irq/5/smp_affinity_list")), "0-3");
    }

    #[test]
    fn empty_set_is_refused() {
        let mut a = Actuator::new(ActuatorConfig::default());
        let rep = a.apply(&[], &[]);
        assert_eq!(rep.skips[0].why, "empty CPU set refused");
    }
}

//! CPU topology (NUMA node, package, core, SMT siblings) and the order in which CPUs are unparked.
//!
//! The pure part ([`Topology`], [`parse_cpu_list`], [`format_cpu_list`]) has no I/O; [`Topology::read`]
//! reads it from a sysfs root (`/sys` on a real host, a fake tree in tests).

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One logical CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpu {
    /// The kernel's CPU number.
    pub id: usize,
    /// NUMA node.
    pub node: usize,
    /// Physical package (socket).
    pub package: usize,
    /// Core id within the package; SMT siblings share it.
    pub core: usize,
}

/// The logical CPUs the policy manages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// CPUs in kernel order.
    pub cpus: Vec<Cpu>,
}

/// Why the topology could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadTopologyError {
    #[error("Cannot read {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Bad CPU list `{0}`")]
    BadList(String),
    #[error("No online CPU left after applying the CPU filter")]
    Empty,
}

impl Topology {
    /// A flat topology of `n` CPUs: one node, one package, one core per CPU.
    pub fn flat(n: usize) -> Topology {
        Topology {
            cpus: (0..n)
                .map(|id| Cpu {
                    id,
                    node: 0,
                    package: 0,
                    core: id,
                })
                .collect(),
        }
    }

    /// Number of logical CPUs.
    pub fn len(&self) -> usize {
        self.cpus.len()
    }

    /// True if there is no CPU.
    pub fn is_empty(&self) -> bool {
        self.cpus.is_empty()
    }

    /// NUMA nodes present, ascending.
    pub fn nodes(&self) -> Vec<usize> {
        let mut n: Vec<usize> = self.cpus.iter().map(|c| c.node).collect();
        n.sort_unstable();
        n.dedup();
        n
    }

    /// Positions (indices into `cpus`) of one node in unpark order: by package, then core, then CPU id,
    /// so both SMT siblings of a core are used before another core wakes, and one package fills
    /// before the next — the most whole cores and packages stay idle.
    pub fn unpark_order(&self, node: usize) -> Vec<usize> {
        let mut pos: Vec<usize> = (0..self.cpus.len())
            .filter(|&i| self.cpus[i].node == node)
            .collect();
        pos.sort_by_key(|&i| (self.cpus[i].package, self.cpus[i].core, self.cpus[i].id));
        pos
    }

    /// Reads the online CPUs under `sys_root` (`devices/system/cpu/online`, `cpuN/topology/*`,
    /// `devices/system/node/nodeK/cpulist`). Missing topology files fall back to one core per CPU in
    /// package 0, node 0. `only` restricts to a CPU list.
    pub fn read(sys_root: &Path, only: Option<&[usize]>) -> Result<Topology, ReadTopologyError> {
        let cpu_dir = sys_root.join("devices/system/cpu");
        let online_path = cpu_dir.join("online");
        let online_text =
            fs::read_to_string(&online_path).map_err(|source| ReadTopologyError::Io {
                path: online_path.display().to_string(),
                source,
            })?;
        let online = parse_cpu_list(online_text.trim())
            .ok_or_else(|| ReadTopologyError::BadList(online_text.trim().to_string()))?;
        let mut node_of = std::collections::BTreeMap::new();
        if let Ok(entries) = fs::read_dir(sys_root.join("devices/system/node")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let Some(node) = name
                    .strip_prefix("node")
                    .and_then(|n| n.parse::<usize>().ok())
                else {
                    continue;
                };
                if let Ok(list) = fs::read_to_string(e.path().join("cpulist")) {
                    for cpu in parse_cpu_list(list.trim()).unwrap_or_default() {
                        node_of.insert(cpu, node);
                    }
                }
            }
        }
        let read_num = |p: &Path| -> Option<usize> {
            fs::read_to_string(p)
                .ok()?
                .trim()
                .parse::<i64>()
                .ok()
                .map(|v| v.max(0) as usize)
        };
        let mut cpus = Vec::new();
        for id in online {
            if only.is_some_and(|o| !o.contains(&id)) {
                continue;
            }
            let topo = cpu_dir.join(format!("cpu{id}/topology"));
            cpus.push(Cpu {
                id,
                node: node_of.get(&id).copied().unwrap_or(0),
                package: read_num(&topo.join("physical_package_id")).unwrap_or(0),
                core: read_num(&topo.join("core_id")).unwrap_or(id),
            });
        }
        if cpus.is_empty() {
            return Err(ReadTopologyError::Empty);
        }
        Ok(Topology { cpus })
    }
}

/// Parses a kernel CPU list such as `0-3,8,10-11`. Returns `None` on malformed input.
pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    if s.trim().is_empty() {
        return Some(out);
    }
    for part in s.trim().split(',') {
        let part = part.trim();
        if let Some((a, b)) = part.split_once('-') {
            let (a, b) = (
                a.trim().parse::<usize>().ok()?,
                b.trim().parse::<usize>().ok()?,
            );
            if b < a || b - a > 65_536 {
                return None;
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().ok()?);
        }
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// Formats CPU ids as a kernel CPU list (`0-3,8`).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut v = cpus.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let start = v[i];
        let mut end = start;
        while i + 1 < v.len() && v[i + 1] == end + 1 {
            i += 1;
            end = v[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// Names CPUs for people: `cpu0`, `cpu0-3`, `cpu0-1,cpu8` (a bare `0` in a log reads as a count).
pub fn format_cpus(cpus: &[usize]) -> String {
    let list = format_cpu_list(cpus);
    if list.is_empty() {
        return "no CPU".into();
    }
    list.split(',')
        .map(|p| format!("cpu{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_are_named_not_counted() {
        assert_eq!(format_cpus(&[0]), "cpu0");
        assert_eq!(format_cpus(&[3, 2, 1, 0]), "cpu0-3");
        assert_eq!(format_cpus(&[0, 1, 8]), "cpu0-1,cpu8");
        assert_eq!(format_cpus(&[]), "no CPU");
    }

    #[test]
    fn cpu_lists_round_trip() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(format_cpu_list(&[11, 0, 1, 2, 3, 8, 10]), "0-3,8,10-11");
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(format_cpu_list(&[]), "");
    }

    #[test]
    fn reads_fake_sysfs_with_smt_and_two_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let cpu = dir.path().join("devices/system/cpu");
        fs::create_dir_all(&cpu).unwrap();
        fs::write(cpu.join("online"), "0-3\n").unwrap();
        // cpu0/cpu2 are SMT siblings of core 0 on node 0; cpu1/cpu3 core 0 of package 1, node 1.
        for (id, pkg, core) in [(0, 0, 0), (1, 1, 0), (2, 0, 0), (3, 1, 0)] {
            let t = cpu.join(format!("cpu{id}/topology"));
            fs::create_dir_all(&t).unwrap();
            fs::write(t.join("physical_package_id"), format!("{pkg}\n")).unwrap();
            fs::write(t.join("core_id"), format!("{core}\n")).unwrap();
        }
        for (node, list) in [(0, "0,2"), (1, "1,3")] {
            let n = dir.path().join(format!("devices/system/node/node{node}"));
            fs::create_dir_all(&n).unwrap();
            fs::write(n.join("cpulist"), list).unwrap();
        }
        let t = Topology::read(dir.path(), None).unwrap();
        assert_eq!(t.nodes(), vec![0, 1]);
        assert_eq!(t.unpark_order(0), vec![0, 2]);
        assert_eq!(
            t.cpus[3],
            Cpu {
                id: 3,
                node: 1,
                package: 1,
                core: 0
            }
        );
        let only = Topology::read(dir.path(), Some(&[1, 3])).unwrap();
        assert_eq!(
            only.cpus.iter().map(|c| c.id).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert!(matches!(
            Topology::read(dir.path(), Some(&[9])),
            Err(ReadTopologyError::Empty)
        ));
    }
}

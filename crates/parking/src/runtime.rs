//! The VMM runtime directory as the parking daemon sees it: one `NAME.json` entry per running
//! VM ([`RuntimeEntry`], read through `tern-vmctl`), of which it needs the PID and the vCPU
//! threads.
//!
//! `tern vm run` writes an entry when a VM starts and removes it when it stops. Entries whose
//! process is gone, or that do not parse, are skipped with a reason (the daemon logs it), never
//! fatal.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
pub use tern_vmctl::runtime::{DEFAULT_RUNTIME_DIR, RuntimeEntry, WriteEntryError};

use crate::telemetry::HostPaths;

/// An entry that was not used, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skip {
    /// The file or thread concerned.
    pub what: String,
    /// Why it was skipped.
    pub why: String,
}

/// Reads every `*.json` entry of `dir`. A missing directory means no VMs. Entries whose process is
/// gone (under `paths.proc_root`) are skipped; vCPU threads that are gone are dropped from their
/// entry (with a skip).
pub fn read_entries(dir: &Path, paths: &HostPaths) -> (Vec<RuntimeEntry>, Vec<Skip>) {
    let mut vms = Vec::new();
    let mut skips = Vec::new();
    let listed = match tern_vmctl::runtime::list_entries(dir) {
        Ok(l) => l,
        Err(e) => {
            skips.push(Skip {
                what: dir.display().to_string(),
                why: e.source.to_string(),
            });
            return (vms, skips);
        }
    };
    for l in listed {
        let what = l.path.display().to_string();
        let entry = match l.entry {
            Ok(e) => e,
            Err(e) => {
                let why = match e {
                    tern_vmctl::runtime::ReadEntryError::Bad { reason, .. } => {
                        format!("bad entry: {reason}")
                    }
                    tern_vmctl::runtime::ReadEntryError::Io { source, .. } => source.to_string(),
                };
                skips.push(Skip { what, why });
                continue;
            }
        };
        if !paths.proc_root.join(entry.pid.to_string()).exists() {
            skips.push(Skip {
                what,
                why: format!("process {} is gone", entry.pid),
            });
            continue;
        }
        let mut alive = Vec::new();
        for &tid in &entry.vcpu_tids {
            if paths
                .proc_root
                .join(format!("{}/task/{tid}", entry.pid))
                .exists()
            {
                alive.push(tid);
            } else {
                skips.push(Skip {
                    what: format!("{} thread {tid}", entry.name),
                    why: "thread is gone".into(),
                });
            }
        }
        vms.push(RuntimeEntry {
            vcpu_tids: alive,
            ..entry
        });
    }
    (vms, skips)
}

/// Writes an entry atomically (temporary file, then rename), creating the directory.
pub fn write_entry(dir: &Path, entry: &RuntimeEntry) -> Result<PathBuf, WriteEntryError> {
    tern_vmctl::runtime::write_entry(dir, entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn skips_gone_processes_threads_and_garbage() {
        let root = tempfile::tempdir().unwrap();
        let paths = HostPaths {
            proc_root: root.path().join("proc"),
            sys_root: root.path().join("sys"),
        };
        fs::create_dir_all(paths.proc_root.join("10/task/11")).unwrap();
        let dir = root.path().join("vms");
        let e = |name: &str, pid, tids: Vec<u32>| RuntimeEntry::new(name, pid, tids);
        write_entry(&dir, &e("a", 10, vec![11, 12])).unwrap();
        write_entry(&dir, &e("b", 99, vec![100])).unwrap();
        fs::write(dir.join("c.json"), "{not json").unwrap();
        // The VMM's own temporary files are not entries.
        fs::write(dir.join(".d.json.10"), "{").unwrap();
        // The VMM's first format: api_sock may be null, and nothing else.
        fs::write(
            dir.join("e.json"),
            r#"{"name":"e","pid":10,"api_sock":null,"vcpu_tids":[11]}"#,
        )
        .unwrap();
        fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let (vms, skips) = read_entries(&dir, &paths);
        assert_eq!(vms, vec![e("a", 10, vec![11]), e("e", 10, vec![11])]);
        let why: Vec<&str> = skips.iter().map(|s| s.why.as_str()).collect();
        assert_eq!(why.len(), 3, "{skips:?}");
        assert!(why.contains(&"thread is gone"));
        assert!(why.contains(&"process 99 is gone"));
        assert!(why.iter().any(|w| w.starts_with("bad entry")));
        assert_eq!(
            read_entries(&root.path().join("none"), &paths),
            (vec![], vec![])
        );
    }
}

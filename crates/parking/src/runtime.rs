//! The VMM runtime directory: one `NAME.json` per running VM, `{"name", "pid", "api_sock", "vcpu_tids"}`.
//!
//! `tern vm run` writes an entry when a VM starts and removes it when it stops. Entries whose process
//! is gone, or that do not parse, are skipped with a reason (the daemon logs it), never fatal.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::telemetry::HostPaths;

/// The default runtime directory.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/tern/vms";

/// One running VM as the VMM describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEntry {
    /// VM name.
    pub name: String,
    /// VMM process id.
    pub pid: u32,
    /// The VMM's API socket, if it has one (`null` in the JSON otherwise).
    #[serde(default)]
    pub api_sock: Option<String>,
    /// Thread ids of the vCPU threads.
    pub vcpu_tids: Vec<u32>,
}

/// An entry that was not used, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skip {
    /// The file or thread concerned.
    pub what: String,
    /// Why it was skipped.
    pub why: String,
}

/// Reads every `*.json` entry of `dir`. A missing directory means no VMs. Entries whose process is
/// gone are skipped; vCPU threads that are gone are dropped from their entry (with a skip).
pub fn read_entries(dir: &Path, paths: &HostPaths) -> (Vec<VmEntry>, Vec<Skip>) {
    let mut vms = Vec::new();
    let mut skips = Vec::new();
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return (vms, skips),
        Err(e) => {
            skips.push(Skip {
                what: dir.display().to_string(),
                why: e.to_string(),
            });
            return (vms, skips);
        }
    };
    files.sort();
    for file in files {
        let what = file.display().to_string();
        let entry: VmEntry = match fs::read_to_string(&file)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| format!("bad entry: {e}")))
        {
            Ok(e) => e,
            Err(why) => {
                // A file being replaced may vanish between listing and reading.
                if !why.contains("No such file") {
                    skips.push(Skip { what, why });
                }
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
        vms.push(VmEntry {
            vcpu_tids: alive,
            ..entry
        });
    }
    (vms, skips)
}

/// Writes an entry atomically (temporary file, then rename), creating the directory.
pub fn write_entry(dir: &Path, entry: &VmEntry) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let path = dir.join(format!("{}.json", entry.name));
    let tmp = dir.join(format!(".{}.json.tmp", entry.name));
    fs::write(&tmp, serde_json::to_vec(entry).map_err(io::Error::other)?)?;
    fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_gone_processes_threads_and_garbage() {
        let root = tempfile::tempdir().unwrap();
        let paths = HostPaths {
            proc_root: root.path().join("proc"),
            sys_root: root.path().join("sys"),
        };
        fs::create_dir_all(paths.proc_root.join("10/task/11")).unwrap();
        let dir = root.path().join("vms");
        let e = |name: &str, pid, tids: Vec<u32>| VmEntry {
            name: name.into(),
            pid,
            api_sock: None,
            vcpu_tids: tids,
        };
        write_entry(&dir, &e("a", 10, vec![11, 12])).unwrap();
        write_entry(&dir, &e("b", 99, vec![100])).unwrap();
        fs::write(dir.join("c.json"), "{not json").unwrap();
        // The VMM's own temporary files are not entries.
        fs::write(dir.join(".d.json.10"), "{").unwrap();
        // The VMM's format: api_sock may be null, tids are signed in its code.
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

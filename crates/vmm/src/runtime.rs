//! The runtime entry `<dir>/<name>.json` by which host tools find running VMs, and the default
//! control socket `<dir>/<name>.sock` beside it.
//!
//! The entry ([`RuntimeEntry`]) is `tern-api`'s, whose docs say how its format grows; this module
//! writes it, reads it back and tells a live VMM's entry from a stale one.

use std::io;
use std::path::{Path, PathBuf};

pub use tern_api::vmm::{
    DEFAULT_RUNTIME_DIR, RuntimeEntry, default_api_sock, entry_path, parse_stat_start_ticks,
};

/// Whether the process that wrote `entry` still runs (its PID exists and, when the entry
/// records it, with the same start time).
pub fn is_live(entry: &RuntimeEntry) -> bool {
    entry.is_written_by(process_start_ticks(entry.pid))
}

/// The start time of process `pid` in clock ticks after boot, or `None` if it does not exist.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_start_ticks(&stat)
}

/// Why the entry could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write runtime entry {path} (run as root, or give a writable --runtime-dir)")]
pub struct WriteEntryError {
    /// The path.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// Why one entry could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadEntryError {
    /// The file could not be read.
    #[error("cannot read runtime entry {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not an entry.
    #[error("runtime entry {path} is not valid: {reason}")]
    Bad {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Reads the entry of VM `name` in `dir`: `Ok(None)` if there is none.
pub fn read_entry(dir: &Path, name: &str) -> Result<Option<RuntimeEntry>, ReadEntryError> {
    read_entry_file(&entry_path(dir, name))
}

fn read_entry_file(path: &Path) -> Result<Option<RuntimeEntry>, ReadEntryError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ReadEntryError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ReadEntryError::Bad {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Why the runtime directory could not be listed.
#[derive(Debug, thiserror::Error)]
#[error("cannot list the runtime directory {path}")]
pub struct ListEntriesError {
    /// The directory.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// One `*.json` file of the runtime directory.
#[derive(Debug)]
pub struct ListedEntry {
    /// The file.
    pub path: PathBuf,
    /// Its entry, or why it is not one.
    pub entry: Result<RuntimeEntry, ReadEntryError>,
}

/// Every entry file of `dir` (`NAME.json`; the VMM's hidden temporary files are not entries), in
/// name order, live or not. A missing directory holds no entries.
pub fn list_entries(dir: &Path) -> Result<Vec<ListedEntry>, ListEntriesError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ListEntriesError {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_name()
                    .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files
        .into_iter()
        .filter_map(|path| match read_entry_file(&path) {
            // Removed between listing and reading: the VM just stopped.
            Ok(None) => None,
            Ok(Some(e)) => Some(ListedEntry { path, entry: Ok(e) }),
            Err(e) => Some(ListedEntry {
                path,
                entry: Err(e),
            }),
        })
        .collect())
}

/// Why a stale entry was not removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveStaleError {
    /// The VM runs (again): its entry is not stale.
    #[error("VM {name:?} runs as pid {pid}; its entry is not stale")]
    Live {
        /// The name.
        name: String,
        /// Its process.
        pid: u32,
    },
    /// The file could not be read or removed.
    #[error("cannot remove stale runtime entry {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Removes the entry of `name` in `dir` if the process that wrote it is gone, together with its
/// control socket when that lies in `dir` and nobody serves it. Returns the removed entry, or
/// `None` if there was no entry.
pub fn remove_stale(dir: &Path, name: &str) -> Result<Option<RuntimeEntry>, RemoveStaleError> {
    let path = entry_path(dir, name);
    let io_err = |source| RemoveStaleError::Io {
        path: path.clone(),
        source,
    };
    let entry = match read_entry_file(&path) {
        Ok(None) => return Ok(None),
        Ok(Some(e)) => e,
        Err(ReadEntryError::Io { source, .. }) => return Err(io_err(source)),
        // Not an entry at all: nothing can be running under it.
        Err(ReadEntryError::Bad { .. }) => {
            std::fs::remove_file(&path).map_err(io_err)?;
            return Ok(None);
        }
    };
    if is_live(&entry) {
        return Err(RemoveStaleError::Live {
            name: entry.name,
            pid: entry.pid,
        });
    }
    if let Some(sock) = entry
        .api_sock
        .as_deref()
        .filter(|s| s.parent() == Some(dir))
        && std::os::unix::net::UnixStream::connect(sock).is_err()
    {
        let _ = std::fs::remove_file(sock);
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(Some(entry)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Some(entry)),
        Err(e) => Err(io_err(e)),
    }
}

/// A written entry; the file is removed when this is dropped.
#[derive(Debug)]
pub struct RuntimeEntryGuard {
    path: PathBuf,
}

impl RuntimeEntryGuard {
    /// Writes `entry` into `dir` atomically (a temporary file renamed into place).
    pub fn write(dir: &Path, entry: &RuntimeEntry) -> Result<Self, WriteEntryError> {
        let path = entry_path(dir, &entry.name);
        let err = |source| WriteEntryError {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = dir.join(format!(".{}.json.{}", entry.name, entry.pid));
        let text = serde_json::to_string_pretty(entry).map_err(|e| err(e.into()))?;
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        Ok(RuntimeEntryGuard { path })
    }

    /// The entry's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeEntryGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, pid: u32) -> RuntimeEntry {
        RuntimeEntry {
            name: name.into(),
            pid,
            api_sock: Some("/tmp/vm7.sock".into()),
            vcpu_tids: vec![100, 101],
            vcpus: Some(2),
            memory_mib: Some(256),
            started_unix_ms: Some(1_700_000_000_000),
            pid_start_ticks: Some(12345),
        }
    }

    #[test]
    fn the_entry_is_written_with_the_fields_tools_read_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let g = RuntimeEntryGuard::write(&dir.path().join("vms"), &entry("vm7", 42)).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(g.path()).unwrap()).unwrap();
        assert_eq!(v["name"], "vm7");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["api_sock"], "/tmp/vm7.sock");
        assert_eq!(v["vcpu_tids"], serde_json::json!([100, 101]));
        assert_eq!(v["vcpus"], 2);
        assert_eq!(v["memory_mib"], 256);
        let p = g.path().to_path_buf();
        drop(g);
        assert!(!p.exists());
    }

    #[test]
    fn liveness_checks_the_pid_and_its_start_time() {
        let me = std::process::id();
        let ticks = process_start_ticks(me).expect("our own stat");
        let mut e = entry("me", me);
        e.pid_start_ticks = Some(ticks);
        assert!(is_live(&e));
        e.pid_start_ticks = None;
        assert!(
            is_live(&e),
            "an older entry without start time: the PID decides"
        );
        e.pid_start_ticks = Some(ticks + 1);
        assert!(!is_live(&e), "same PID, another process");
        e.pid = u32::MAX - 1;
        assert!(!is_live(&e));
    }

    #[test]
    fn listing_reads_entries_in_name_order_and_reports_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(list_entries(&d.join("none")).unwrap().is_empty());
        let _b = RuntimeEntryGuard::write(d, &entry("b", 2)).unwrap();
        let _a = RuntimeEntryGuard::write(d, &entry("a", 1)).unwrap();
        std::fs::write(d.join("c.json"), "{not json").unwrap();
        std::fs::write(d.join(".a.json.1"), "{").unwrap();
        std::fs::write(d.join("a.sock"), "").unwrap();
        let got = list_entries(d).unwrap();
        let names: Vec<String> = got
            .iter()
            .map(|l| l.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.json", "b.json", "c.json"]);
        assert_eq!(got[0].entry.as_ref().unwrap().name, "a");
        assert!(matches!(got[2].entry, Err(ReadEntryError::Bad { .. })));
    }

    #[test]
    fn only_the_entries_of_gone_processes_are_removed_as_stale() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut live = entry("live", std::process::id());
        live.pid_start_ticks = process_start_ticks(live.pid);
        let _l = RuntimeEntryGuard::write(d, &live).unwrap();
        let mut dead = entry("dead", u32::MAX - 1);
        let sock = default_api_sock(d, "dead");
        dead.api_sock = Some(sock.clone());
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        std::mem::forget(RuntimeEntryGuard::write(d, &dead).unwrap());
        assert!(matches!(
            remove_stale(d, "live"),
            Err(RemoveStaleError::Live { .. })
        ));
        assert!(entry_path(d, "live").exists());
        assert_eq!(remove_stale(d, "dead").unwrap().unwrap().name, "dead");
        assert!(!entry_path(d, "dead").exists());
        assert!(
            !sock.exists(),
            "the dead VM's socket in the runtime dir goes too"
        );
        assert!(remove_stale(d, "nobody").unwrap().is_none());
    }
}

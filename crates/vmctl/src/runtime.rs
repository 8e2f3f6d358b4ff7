//! The runtime directory: one `NAME.json` entry ([`RuntimeEntry`]) per running VM, written by its
//! VMM, and the control socket `NAME.sock` beside it by default. Here are the entry's file
//! operations (atomic write, read, listing, stale-entry removal), the liveness test by PID and
//! process start time, and [`find`], which turns a VM's name into its control socket.

use std::io;
use std::path::{Path, PathBuf};

pub use tern_api::vmm::{
    DEFAULT_RUNTIME_DIR, RuntimeEntry, default_api_sock, entry_path, parse_stat_start_ticks,
};

/// The start time of process `pid` in clock ticks after boot, or `None` if it does not exist.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_start_ticks(&stat)
}

/// Whether the process that wrote `entry` still runs (its PID exists and, when the entry
/// records it, with the same start time).
pub fn is_live(entry: &RuntimeEntry) -> bool {
    entry.is_written_by(process_start_ticks(entry.pid))
}

/// Why an entry could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write runtime entry {path} (run as root, or give a writable --runtime-dir)")]
pub struct WriteEntryError {
    /// The path.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// Writes `entry` as `<dir>/<name>.json` atomically (a hidden temporary file renamed into
/// place), creating `dir`. Returns the entry's path.
pub fn write_entry(dir: &Path, entry: &RuntimeEntry) -> Result<PathBuf, WriteEntryError> {
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
    Ok(path)
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

/// Reads one entry file: `Ok(None)` if it does not exist.
pub fn read_entry_file(path: &Path) -> Result<Option<RuntimeEntry>, ReadEntryError> {
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
    if let Some(sock) = entry.api_sock.as_deref().filter(|s| {
        // A socket of its own (RUNTIME_DIR/NAME.sock, or the default RUNTIME_DIR/api/NAME.sock).
        s.parent() == Some(dir)
            || s.parent() == Some(dir.join(crate::local::API_SOCKET_DIR).as_path())
    }) && std::os::unix::net::UnixStream::connect(sock).is_err()
    {
        let _ = std::fs::remove_file(sock);
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(Some(entry)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Some(entry)),
        Err(e) => Err(io_err(e)),
    }
}

/// A running VM found by name: its entry and its control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundVm {
    /// The VM's runtime entry.
    pub entry: RuntimeEntry,
    /// Its control socket.
    pub sock: PathBuf,
}

/// Why a VM could not be found by name.
#[derive(Debug, thiserror::Error)]
pub enum FindVmError {
    /// Its entry could not be read.
    #[error(transparent)]
    Read(#[from] ReadEntryError),
    /// No entry has the name.
    #[error(
        "no VM named {name:?} in {} (`tern vm list --runtime-dir {}` shows the VMs there)",
        dir.display(),
        dir.display()
    )]
    NoSuchVm {
        /// The name.
        name: String,
        /// The runtime directory.
        dir: PathBuf,
    },
    /// The entry's process is gone.
    #[error(
        "VM {name:?} is not running: its process {pid} is gone and {} is a stale entry \
         (`tern vm list --prune` removes it)",
        entry.display()
    )]
    Stale {
        /// The name.
        name: String,
        /// The process that wrote the entry.
        pid: u32,
        /// The entry file.
        entry: PathBuf,
    },
    /// The VM runs without a control socket.
    #[error(
        "VM {name:?} (pid {pid}) was started without a control socket; stop it with `kill -TERM {pid}`"
    )]
    NoSocket {
        /// The name.
        name: String,
        /// Its VMM.
        pid: u32,
    },
}

/// The live VM named `name` in `dir`, with its control socket.
pub fn find(dir: &Path, name: &str) -> Result<FoundVm, FindVmError> {
    let Some(entry) = read_entry(dir, name)? else {
        return Err(FindVmError::NoSuchVm {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        });
    };
    if !is_live(&entry) {
        return Err(FindVmError::Stale {
            name: name.to_string(),
            pid: entry.pid,
            entry: entry_path(dir, name),
        });
    }
    match entry.api_sock.clone() {
        Some(sock) => Ok(FoundVm { entry, sock }),
        None => Err(FindVmError::NoSocket {
            name: name.to_string(),
            pid: entry.pid,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, pid: u32) -> RuntimeEntry {
        RuntimeEntry {
            api_sock: Some("/tmp/vm7.sock".into()),
            vcpus: Some(2),
            memory_mib: Some(256),
            started_unix_ms: Some(1_700_000_000_000),
            pid_start_ticks: Some(12345),
            ..RuntimeEntry::new(name, pid, vec![100, 101])
        }
    }

    fn me(name: &str) -> RuntimeEntry {
        let pid = std::process::id();
        RuntimeEntry {
            pid_start_ticks: process_start_ticks(pid),
            ..entry(name, pid)
        }
    }

    #[test]
    fn an_entry_is_written_atomically_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("vms");
        let path = write_entry(&d, &entry("vm7", 42)).unwrap();
        assert_eq!(path, d.join("vm7.json"));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["api_sock"], "/tmp/vm7.sock");
        assert_eq!(v["vcpu_tids"], serde_json::json!([100, 101]));
        assert_eq!(read_entry(&d, "vm7").unwrap(), Some(entry("vm7", 42)));
        assert_eq!(read_entry(&d, "other").unwrap(), None);
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn liveness_checks_the_pid_and_its_start_time() {
        let mut e = me("me");
        assert!(is_live(&e));
        e.pid_start_ticks = None;
        assert!(
            is_live(&e),
            "an older entry without start time: the PID decides"
        );
        e.pid_start_ticks = process_start_ticks(e.pid).map(|t| t + 1);
        assert!(!is_live(&e), "same PID, another process");
        e.pid = u32::MAX - 1;
        assert!(!is_live(&e));
    }

    #[test]
    fn listing_reads_entries_in_name_order_and_reports_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(list_entries(&d.join("none")).unwrap().is_empty());
        write_entry(d, &entry("b", 2)).unwrap();
        write_entry(d, &entry("a", 1)).unwrap();
        std::fs::write(d.join("c.json"), "{not json").unwrap();
        std::fs::write(d.join(".a.json.1"), "{").unwrap();
        std::fs::write(d.join(".x.json"), "{").unwrap();
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
        write_entry(d, &me("live")).unwrap();
        let mut dead = entry("dead", u32::MAX - 1);
        let sock = crate::local::default_api_sock(d, "dead");
        std::fs::create_dir(sock.parent().unwrap()).unwrap();
        dead.api_sock = Some(sock.clone());
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        write_entry(d, &dead).unwrap();
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

    #[test]
    fn find_gives_a_live_vms_socket_and_names_every_other_case() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let live = me("live");
        write_entry(d, &live).unwrap();
        let found = find(d, "live").unwrap();
        assert_eq!(found.sock, Path::new("/tmp/vm7.sock"));
        assert_eq!(found.entry, live);

        let e = find(d, "ghost").unwrap_err();
        assert!(matches!(e, FindVmError::NoSuchVm { .. }), "{e}");
        assert!(e.to_string().starts_with("no VM named \"ghost\" in"), "{e}");

        write_entry(d, &entry("dead", u32::MAX - 1)).unwrap();
        let e = find(d, "dead").unwrap_err();
        assert!(
            matches!(e, FindVmError::Stale { pid, .. } if pid == u32::MAX - 1),
            "{e}"
        );
        assert!(e.to_string().contains("tern vm list --prune"), "{e}");

        write_entry(
            d,
            &RuntimeEntry {
                api_sock: None,
                ..me("bare")
            },
        )
        .unwrap();
        let e = find(d, "bare").unwrap_err();
        assert!(matches!(e, FindVmError::NoSocket { .. }), "{e}");
        assert!(e.to_string().contains("kill -TERM"), "{e}");

        std::fs::write(entry_path(d, "junk"), "[").unwrap();
        assert!(matches!(
            find(d, "junk"),
            Err(FindVmError::Read(ReadEntryError::Bad { .. }))
        ));
    }
}

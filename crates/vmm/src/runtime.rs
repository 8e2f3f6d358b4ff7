//! The runtime entry `<dir>/<name>.json` by which host tools find running VMs, and the default
//! control socket `<dir>/<name>.sock` beside it.
//!
//! The entry ([`RuntimeEntry`]) is `tern-api`'s, whose docs say how its format grows, and
//! `tern-vmctl` reads, lists and writes it (re-exported here); this module holds the VMM's own
//! entry for as long as the VM runs ([`RuntimeEntryGuard`]).

use std::path::{Path, PathBuf};

pub use tern_vmctl::runtime::{
    DEFAULT_RUNTIME_DIR, ListEntriesError, ListedEntry, ReadEntryError, RemoveStaleError,
    RuntimeEntry, WriteEntryError, default_api_sock, entry_path, is_live, list_entries,
    parse_stat_start_ticks, process_start_ticks, read_entry, remove_stale,
};

/// A written entry; the file is removed when this is dropped.
#[derive(Debug)]
pub struct RuntimeEntryGuard {
    path: PathBuf,
}

impl RuntimeEntryGuard {
    /// Writes `entry` into `dir` atomically (a temporary file renamed into place).
    pub fn write(dir: &Path, entry: &RuntimeEntry) -> Result<Self, WriteEntryError> {
        let path = tern_vmctl::runtime::write_entry(dir, entry)?;
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
}

//! The runtime entry `<dir>/<name>.json` by which host tools find running VMs.

use std::path::{Path, PathBuf};

/// The default runtime directory.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/tern/vms";

/// What the entry says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuntimeEntry {
    /// The VM's name.
    pub name: String,
    /// The VMM's process ID.
    pub pid: u32,
    /// The control socket, if any.
    pub api_sock: Option<PathBuf>,
    /// Thread IDs of the vCPU threads, in vCPU order.
    pub vcpu_tids: Vec<i32>,
}

/// Why the entry could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write runtime entry {path} (run as root, or give a writable --runtime-dir)")]
pub struct WriteEntryError {
    /// The path.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// A written entry; the file is removed when this is dropped.
#[derive(Debug)]
pub struct RuntimeEntryGuard {
    path: PathBuf,
}

impl RuntimeEntryGuard {
    /// Writes `entry` into `dir` atomically (a temporary file renamed into place).
    pub fn write(dir: &Path, entry: &RuntimeEntry) -> Result<Self, WriteEntryError> {
        let path = dir.join(format!("{}.json", entry.name));
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

    #[test]
    fn the_entry_is_written_with_the_fields_tools_read_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let e = RuntimeEntry {
            name: "vm7".into(),
            pid: 42,
            api_sock: Some("/tmp/vm7.sock".into()),
            vcpu_tids: vec![100, 101],
        };
        let g = RuntimeEntryGuard::write(&dir.path().join("vms"), &e).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(g.path()).unwrap()).unwrap();
        assert_eq!(v["name"], "vm7");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["api_sock"], "/tmp/vm7.sock");
        assert_eq!(v["vcpu_tids"], serde_json::json!([100, 101]));
        let p = g.path().to_path_buf();
        drop(g);
        assert!(!p.exists());
    }
}

//! The VMM's local trust options, shared by `tern vm run` and `tern vm receive`: who may use the
//! API socket (`--api-allow-uid`), where `snapshot` writes (`--snapshot-dir`), and which host
//! files a restored snapshot may name by itself (`--restore-allow-disk`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use tern_vmm::api::{ApiOptions, PeerPolicy};

/// The snapshot directory's name under the runtime directory when `--snapshot-dir` is not given.
pub const DEFAULT_SNAPSHOT_SUBDIR: &str = "snapshots";

/// `--api-allow-uid` and `--snapshot-dir`.
#[derive(Debug, Clone, clap::Args)]
pub struct LocalArgs {
    /// A uid allowed to use the API socket besides the VMM's own (checked with SO_PEERCRED on
    /// each connection); repeat for more. Default: the VMM's own uid and root. Once given, root
    /// is allowed only if listed.
    #[arg(long = "api-allow-uid", value_name = "UID")]
    pub api_allow_uid: Vec<u32>,
    /// The only directory `tern vm snapshot` may write into (created 0700; refused if looser or
    /// another user's). Default: RUNTIME_DIR/snapshots.
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,
}

impl LocalArgs {
    /// The API server's options for a VMM whose runtime directory is `runtime_dir`.
    pub fn api_options(&self, runtime_dir: &Path) -> ApiOptions {
        ApiOptions {
            peers: PeerPolicy::owner_and(&self.api_allow_uid),
            snapshot_dir: self
                .snapshot_dir
                .clone()
                .unwrap_or_else(|| runtime_dir.join(DEFAULT_SNAPSHOT_SUBDIR)),
        }
    }
}

/// The control socket a VM serves: `--api-sock`, or `RUNTIME_DIR/api/NAME.sock`. Its directory is
/// created 0700 when missing and refused when it exists looser or owned by another user, before
/// anything else starts.
pub fn api_sock(given: Option<PathBuf>, runtime_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = given.unwrap_or_else(|| tern_vmctl::local::default_api_sock(runtime_dir, name));
    let dir = path.parent().unwrap_or(Path::new("."));
    tern_vmctl::local::ensure_private_dir(dir).with_context(|| {
        format!(
            "cannot serve the API socket {} (run as root, or give --api-sock in a 0700 directory of yours)",
            path.display()
        )
    })?;
    Ok(path)
}

/// The disks a VM restored from a snapshot gets. A snapshot does not choose host files by
/// itself: the disks named on the command line (`given`, as many as the snapshot has) are used;
/// without them, each of the snapshot's own disks must be an `allowed` path or lie under an
/// `allowed` directory (compared with symlinks resolved).
pub fn restore_disks(
    snapshot_disks: &[String],
    given: &[String],
    allowed: &[PathBuf],
) -> anyhow::Result<Vec<String>> {
    if !given.is_empty() {
        anyhow::ensure!(
            given.len() == snapshot_disks.len(),
            "the snapshot has {} disk(s) ({}) but {} --disk given: give one --disk per snapshot disk, in order",
            snapshot_disks.len(),
            snapshot_disks.join(" "),
            given.len()
        );
        return Ok(given.to_vec());
    }
    let allowed: Vec<PathBuf> = allowed
        .iter()
        .map(|a| std::fs::canonicalize(a).unwrap_or_else(|_| a.clone()))
        .collect();
    for d in snapshot_disks {
        let path = Path::new(d.split(',').next().unwrap_or(d));
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let ok = path.is_absolute()
            && !path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            && allowed.iter().any(|a| real.starts_with(a));
        anyhow::ensure!(
            ok,
            "the snapshot names disk {d}; a snapshot does not choose host files: name its disks with --disk, or allow this one with --restore-allow-disk PATH"
        );
    }
    Ok(snapshot_disks.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshots_disks_are_used_only_when_named_or_allowed() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("a.img");
        std::fs::write(&img, b"").unwrap();
        let snap = vec![format!("{},readonly", img.display())];
        let e = restore_disks(&snap, &[], &[]).unwrap_err().to_string();
        assert!(
            e.contains("--restore-allow-disk") && e.contains("a.img"),
            "{e}"
        );
        assert_eq!(restore_disks(&snap, &[], &[t.path().into()]).unwrap(), snap);
        assert_eq!(
            restore_disks(&snap, &[], std::slice::from_ref(&img)).unwrap(),
            snap
        );
        let e = restore_disks(&snap, &[], &[t.path().join("other")]).unwrap_err();
        assert!(e.to_string().contains("a.img"), "{e}");
        let sneaky = vec![format!("{}/../etc/shadow", t.path().display())];
        assert!(restore_disks(&sneaky, &[], &[t.path().into()]).is_err());
        let given = vec!["/dev/null".to_string()];
        assert_eq!(restore_disks(&snap, &given, &[]).unwrap(), given);
        let e = restore_disks(&snap, &[], &[]).map(drop);
        assert!(e.is_err());
        let e = restore_disks(&[], &given, &[]).unwrap_err().to_string();
        assert!(e.contains("0 disk(s)"), "{e}");
    }
}

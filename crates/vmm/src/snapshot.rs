//! Snapshot files: a paused VM's description, its saved state and its non-zero memory pages.
//!
//! Layout (all integers little-endian):
//! ```text
//! "TERNSNAP" | version u32 (1) | meta length u32 | meta (bincode SnapshotMeta)
//! | state (crate::state::encode: own header, length and crc32c)
//! | pages: { gpa u64 | 4096 bytes }* | u64::MAX | crc32c of the page records u32
//! ```
//! Zero pages are not written: the restoring VM's memory starts zeroed.
//!
//! Where a snapshot may go: only directly inside the VMM's snapshot directory (`--snapshot-dir`,
//! created 0700 and refused if another user owns it or it is looser), named by a bare file name or
//! a path whose parent is that directory ([`resolve_path`]; `..` and `.` are refused), created with
//! `O_CREAT|O_EXCL|O_NOFOLLOW` (never an existing file, never through a symlink) and mode 0600.
//!
//! What a snapshot file may make the restoring VMM do: nothing outside the VM. The description's
//! kernel and disks are not opened by themselves (see `tern vm run --restore`); every length is
//! bounded before it is allocated (description [`MAX_META`] bytes, state
//! [`state::MAX_STATE_BYTES`]); every page address is checked, with `checked_add`, to lie inside
//! the restoring VM's memory.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use crate::state::{self, StateDecodeError, VmState};
use crate::vm::{ControlError, Vm};

/// The magic that opens a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"TERNSNAP";
/// The snapshot file format version.
pub const SNAPSHOT_VERSION: u32 = 1;
const PAGE: usize = 4096;
/// The longest description a snapshot file may carry, bytes.
pub const MAX_META: u32 = 1 << 20;

/// What is needed to build the VM again before its state is restored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotMeta {
    /// The kernel as given to `tern vm run` (a path or `builtin:NAME`).
    pub kernel: String,
    /// The command line.
    pub cmdline: String,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Disks as `PATH[,readonly]`.
    pub disks: Vec<String>,
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File I/O.
    #[error("snapshot file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM refused (not paused, KVM error).
    #[error("cannot take the VM's state: {0}")]
    Vm(#[from] ControlError),
    /// Not a snapshot file, or a format this build does not read.
    #[error("{path} is not a Tern snapshot (format {SNAPSHOT_VERSION}): {why}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The saved state inside is damaged.
    #[error("snapshot {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: StateDecodeError,
    },
    /// Guest memory could not be read or written.
    #[error("guest memory access at {0:#x} failed")]
    Memory(u64),
    /// The file exists already: snapshots never overwrite.
    #[error(
        "snapshot file {path} exists already; a snapshot never overwrites a file (choose a new name, or remove it)"
    )]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The snapshot directory is not private.
    #[error("snapshot directory refused")]
    Dir(#[from] tern_vmctl::local::PrivateDirError),
}

/// Why a requested snapshot path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotPathError {
    /// `..`, `.`, an empty name or a path ending in a directory.
    #[error("snapshot path {path} must name a file without `..` or `.` components")]
    BadName {
        /// The path as requested.
        path: PathBuf,
    },
    /// Not directly inside the snapshot directory.
    #[error(
        "snapshot path {path} is outside this VM's snapshot directory {dir} (give a file name, or a path directly inside {dir}; the VMM's --snapshot-dir sets it)"
    )]
    OutsideDir {
        /// The path as requested.
        path: PathBuf,
        /// The snapshot directory.
        dir: PathBuf,
    },
}

/// Where a snapshot requested as `requested` goes: `dir/NAME` for a bare file name `NAME`, or
/// `requested` itself when its parent is `dir` (compared as given, then as the same directory).
/// Anything else — `..` or `.` components, subdirectories, other directories — is refused.
pub fn resolve_path(dir: &Path, requested: &Path) -> Result<PathBuf, SnapshotPathError> {
    use std::path::Component;
    let bad = || SnapshotPathError::BadName {
        path: requested.to_path_buf(),
    };
    let outside = || SnapshotPathError::OutsideDir {
        path: requested.to_path_buf(),
        dir: dir.to_path_buf(),
    };
    let text = requested.as_os_str().as_encoded_bytes();
    if text.is_empty() || text.ends_with(b"/") || text.ends_with(b"/.") {
        return Err(bad());
    }
    let mut comps = requested.components();
    if comps.any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err(bad());
    }
    let name = requested.file_name().ok_or_else(bad)?;
    let parent = requested.parent().unwrap_or(Path::new(""));
    if requested.is_relative() {
        return if parent.as_os_str().is_empty() {
            Ok(dir.join(name))
        } else {
            Err(outside())
        };
    }
    if parent == dir {
        return Ok(dir.join(name));
    }
    // The same directory by another name (a symlink on the way): the same device and inode.
    // (Compared with stat, not realpath: the API thread's seccomp filter has no readlink.)
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(parent), std::fs::metadata(dir)) {
        (Ok(p), Ok(d)) if (p.dev(), p.ino()) == (d.dev(), d.ino()) => Ok(dir.join(name)),
        _ => Err(outside()),
    }
}

/// Writes a snapshot of `vm`, which must be paused. Returns the bytes written.
pub fn write(vm: &Vm, meta: &SnapshotMeta, path: &Path) -> Result<u64, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let st = vm.save_state()?;
    if let Some(dir) = path.parent() {
        // SAFETY: getuid takes no arguments, touches no memory and cannot fail. (The real uid:
        // the VMM is not set-uid, and a jailed VMM sets all its uids at once.)
        let uid = unsafe { libc::getuid() };
        tern_vmctl::local::ensure_private_dir_for(dir, uid)?;
    }
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true) // O_CREAT | O_EXCL
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
    };
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(SnapshotError::Exists {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(io(e)),
    };
    // A failure part-way removes the file (this call created it: O_EXCL).
    let written = write_body(vm, meta, &st, file, path);
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

fn write_body(
    vm: &Vm,
    meta: &SnapshotMeta,
    st: &VmState,
    file: std::fs::File,
    path: &Path,
) -> Result<u64, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let meta_bytes = bincode::serialize(meta).unwrap_or_default();
    let mut n = 0u64;
    let mut put = |w: &mut BufWriter<std::fs::File>, b: &[u8]| -> Result<(), SnapshotError> {
        n += b.len() as u64;
        w.write_all(b).map_err(io)
    };
    put(&mut w, &SNAPSHOT_MAGIC)?;
    put(&mut w, &SNAPSHOT_VERSION.to_le_bytes())?;
    put(&mut w, &(meta_bytes.len() as u32).to_le_bytes())?;
    put(&mut w, &meta_bytes)?;
    put(&mut w, &state::encode(st))?;
    let mut crc = 0u32;
    let mut page = [0u8; PAGE];
    for r in vm.memory_regions() {
        for off in (0..r.size).step_by(PAGE) {
            let gpa = r.guest_addr + off;
            vm.memory()
                .read_slice(&mut page, GuestAddress(gpa))
                .map_err(|_| SnapshotError::Memory(gpa))?;
            if page.iter().all(|&b| b == 0) {
                continue;
            }
            let a = gpa.to_le_bytes();
            crc = crc32c::crc32c_append(crc, &a);
            crc = crc32c::crc32c_append(crc, &page);
            put(&mut w, &a)?;
            put(&mut w, &page)?;
        }
    }
    put(&mut w, &u64::MAX.to_le_bytes())?;
    put(&mut w, &crc.to_le_bytes())?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(n)
}

/// An opened snapshot: its meta and state; the pages follow with [`Snapshot::load_memory`].
#[derive(Debug)]
pub struct Snapshot {
    path: PathBuf,
    /// How to build the VM.
    pub meta: SnapshotMeta,
    /// The saved state.
    pub state: VmState,
    reader: BufReader<std::fs::File>,
}

/// Opens a snapshot and reads its meta and state.
pub fn open(path: &Path) -> Result<Snapshot, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let format = |why: &str| SnapshotError::Format {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let mut r = BufReader::with_capacity(1 << 20, std::fs::File::open(path).map_err(io)?);
    let mut head = [0u8; 16];
    r.read_exact(&mut head).map_err(|_| format("too short"))?;
    if head[..8] != SNAPSHOT_MAGIC {
        return Err(format("bad magic"));
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if version != SNAPSHOT_VERSION {
        return Err(format(&format!("file format {version}")));
    }
    let meta_len = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
    if meta_len > MAX_META {
        return Err(format("description too long"));
    }
    let mut meta = vec![0u8; meta_len as usize];
    r.read_exact(&mut meta).map_err(|_| format("truncated"))?;
    let meta: SnapshotMeta = {
        use bincode::Options;
        // `bincode::serialize`'s encoding, with every length bounded by the bytes there are.
        bincode::DefaultOptions::new()
            .with_fixint_encoding()
            .allow_trailing_bytes()
            .with_limit(u64::from(MAX_META))
            .deserialize(&meta)
            .map_err(|e| format(&format!("description: {e}")))?
    };
    let mut sh = [0u8; state::STATE_HEADER_BYTES];
    r.read_exact(&mut sh).map_err(|_| format("truncated"))?;
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&sh[12..20]);
    let len = u64::from_le_bytes(len8);
    if len > state::MAX_STATE_BYTES {
        return Err(SnapshotError::State {
            path: path.to_path_buf(),
            source: StateDecodeError::TooLong(len),
        });
    }
    let mut buf = sh.to_vec();
    buf.resize(state::STATE_HEADER_BYTES + len as usize, 0);
    r.read_exact(&mut buf[state::STATE_HEADER_BYTES..])
        .map_err(|_| format("truncated state"))?;
    let (st, _) = state::decode(&buf).map_err(|source| SnapshotError::State {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Snapshot {
        path: path.to_path_buf(),
        meta,
        state: st,
        reader: r,
    })
}

impl Snapshot {
    /// Writes the snapshot's pages into `vm` (built from [`Snapshot::meta`], memory zeroed,
    /// paused) and checks their checksum. Returns the number of pages.
    pub fn load_memory(&mut self, vm: &Vm) -> Result<u64, SnapshotError> {
        let format = |why: &str| SnapshotError::Format {
            path: self.path.clone(),
            why: why.to_string(),
        };
        let regions = vm.memory_regions();
        let mut crc = 0u32;
        let mut n = 0;
        let mut page = [0u8; PAGE];
        loop {
            let mut a = [0u8; 8];
            self.reader
                .read_exact(&mut a)
                .map_err(|_| format("truncated memory"))?;
            let gpa = u64::from_le_bytes(a);
            if gpa == u64::MAX {
                break;
            }
            let inside = |r: &&crate::vm::MemoryRegionInfo| match (
                gpa.checked_add(PAGE as u64),
                r.guest_addr.checked_add(r.size),
            ) {
                (Some(end), Some(r_end)) => gpa >= r.guest_addr && end <= r_end,
                _ => false,
            };
            if gpa % PAGE as u64 != 0 || !regions.iter().any(|r| inside(&r)) {
                return Err(format(&format!("page {gpa:#x} outside guest memory")));
            }
            self.reader
                .read_exact(&mut page)
                .map_err(|_| format("truncated memory"))?;
            crc = crc32c::crc32c_append(crc, &a);
            crc = crc32c::crc32c_append(crc, &page);
            vm.memory()
                .write_slice(&page, GuestAddress(gpa))
                .map_err(|_| SnapshotError::Memory(gpa))?;
            n += 1;
        }
        let mut c = [0u8; 4];
        self.reader
            .read_exact(&mut c)
            .map_err(|_| format("truncated memory"))?;
        if u32::from_le_bytes(c) != crc {
            return Err(format("memory checksum mismatch (corrupted)"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lengths claimed by a file are checked before anything of that size is allocated.
    #[test]
    fn claimed_description_and_state_lengths_are_bounded_before_allocation() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("s.snap");
        let head = |meta_len: u32| {
            let mut b = SNAPSHOT_MAGIC.to_vec();
            b.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
            b.extend_from_slice(&meta_len.to_le_bytes());
            b
        };
        std::fs::write(&f, head(u32::MAX)).unwrap();
        let e = open(&f).unwrap_err();
        assert!(e.to_string().contains("description too long"), "{e}");

        let meta = bincode::serialize(&SnapshotMeta {
            kernel: "builtin:testguest".into(),
            cmdline: String::new(),
            memory_mib: 32,
            vcpus: 1,
            disks: vec![],
        })
        .unwrap();
        let mut b = head(meta.len() as u32);
        b.extend_from_slice(&meta);
        let mut sh = vec![0u8; state::STATE_HEADER_BYTES];
        sh[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        b.extend_from_slice(&sh);
        std::fs::write(&f, &b).unwrap();
        let e = open(&f).unwrap_err();
        assert!(
            matches!(
                e,
                SnapshotError::State {
                    source: StateDecodeError::TooLong(u64::MAX),
                    ..
                }
            ),
            "{e}"
        );
        // A description whose disk list claims more entries than its bytes hold.
        let mut lying = meta.clone();
        let n = lying.len();
        lying[n - 8..].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut b = head(lying.len() as u32);
        b.extend_from_slice(&lying);
        std::fs::write(&f, &b).unwrap();
        let e = open(&f).unwrap_err();
        assert!(e.to_string().contains("description"), "{e}");
    }

    #[test]
    fn a_snapshot_path_is_a_file_directly_in_the_snapshot_directory() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let ok = |p: &str| resolve_path(d, Path::new(p));
        assert_eq!(ok("a.snap").unwrap(), d.join("a.snap"));
        assert_eq!(
            resolve_path(d, &d.join("b.snap")).unwrap(),
            d.join("b.snap")
        );
        // The same directory through a symlink: accepted, placed under the configured name.
        let link = d.join("link");
        std::os::unix::fs::symlink(d, &link).unwrap();
        assert_eq!(
            resolve_path(d, &link.join("c.snap")).unwrap(),
            d.join("c.snap")
        );
        for bad in [
            "",
            "..",
            ".",
            "../a.snap",
            "x/../a.snap",
            "a.snap/",
            "./a.snap",
        ] {
            assert!(
                matches!(ok(bad), Err(SnapshotPathError::BadName { .. })),
                "{bad:?}: {:?}",
                ok(bad)
            );
        }
        for outside in ["sub/a.snap", "/etc/a.snap"] {
            let e = ok(outside).unwrap_err();
            assert!(matches!(e, SnapshotPathError::OutsideDir { .. }), "{e}");
            assert!(e.to_string().contains("--snapshot-dir"), "{e}");
        }
        let e = resolve_path(d, &d.join("..").join("a.snap")).unwrap_err();
        assert!(matches!(e, SnapshotPathError::BadName { .. }), "{e}");
    }
}

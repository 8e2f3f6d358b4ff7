//! Local control sockets (the VMM's API socket, the parking daemon's): who may reach them and who
//! may use them.
//!
//! - The socket lives in a *private directory*: mode 0700, owned by the serving process's user.
//!   [`ensure_private_dir`] creates it so when it is missing and refuses one that exists with
//!   looser permissions, another owner, or as a symlink — a shared directory would let another
//!   user replace the socket or race its creation.
//! - [`bind_private`] binds the socket there and sets it to 0600.
//! - Each accepted connection's peer is checked with `SO_PEERCRED` against a [`PeerPolicy`]: by
//!   default the server's own uid and root; a refused peer gets a [`PeerRefused`] naming its uid
//!   and the allowed ones, which the server sends back and logs.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::geteuid;

/// The private directory's name under a runtime directory that holds the VMMs' default API
/// sockets (`RUNTIME_DIR/api/NAME.sock`); the runtime directory itself stays readable.
pub const API_SOCKET_DIR: &str = "api";

/// The control socket a VM named `name` gets when none is given: `<dir>/api/<name>.sock`.
pub fn default_api_sock(runtime_dir: &Path, name: &str) -> PathBuf {
    runtime_dir
        .join(API_SOCKET_DIR)
        .join(format!("{name}.sock"))
}

/// Why a directory is not private.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    /// It could not be created or examined.
    #[error("cannot create or examine directory {dir}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Something that is not a directory (a file, a symlink) sits at the path.
    #[error(
        "{dir} is not a directory (a private socket directory must be a real directory, not a symlink)"
    )]
    NotADirectory {
        /// The path.
        dir: PathBuf,
    },
    /// Another user owns it.
    #[error(
        "directory {dir} is owned by uid {owner}, not by this process's uid {uid}: refused (give a directory of your own, or remove it so it is created 0700)"
    )]
    Owner {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        uid: u32,
    },
    /// Group or others have some access.
    #[error(
        "directory {dir} has mode {mode:04o}; a socket directory must be 0700 (chmod 700 {dir}, or give another directory)"
    )]
    Mode {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Makes sure `dir` is private: creates it 0700 (and its missing parents, with default modes) when
/// missing; refuses it when it exists as a symlink or not as a directory, with another owner than
/// this process's effective uid, or with any group or other permission bit.
pub fn ensure_private_dir(dir: &Path) -> Result<(), PrivateDirError> {
    ensure_private_dir_for(dir, geteuid().as_raw())
}

/// [`ensure_private_dir`] for the owner `uid` (for a caller that knows its uid without asking the
/// kernel again, such as a VMM thread under a seccomp filter).
pub fn ensure_private_dir_for(dir: &Path, uid: u32) -> Result<(), PrivateDirError> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let io_err = |source| PrivateDirError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let md = match std::fs::symlink_metadata(dir) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(io_err)?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {
                    // The umask can only have narrowed 0700; set it exactly anyway.
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                        .map_err(io_err)?;
                }
                // Created meanwhile by someone else: checked below like any existing one.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(e)),
            }
            std::fs::symlink_metadata(dir).map_err(io_err)?
        }
        Err(e) => return Err(io_err(e)),
    };
    check_private(dir, md.file_type().is_dir(), md.uid(), md.mode(), uid)
}

/// The pure rule of [`ensure_private_dir`] on a directory's type, owner and mode.
pub fn check_private(
    dir: &Path,
    is_dir: bool,
    owner: u32,
    mode: u32,
    uid: u32,
) -> Result<(), PrivateDirError> {
    if !is_dir {
        return Err(PrivateDirError::NotADirectory {
            dir: dir.to_path_buf(),
        });
    }
    if owner != uid {
        return Err(PrivateDirError::Owner {
            dir: dir.to_path_buf(),
            owner,
            uid,
        });
    }
    if mode & 0o077 != 0 {
        return Err(PrivateDirError::Mode {
            dir: dir.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Why a private socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindPrivateError {
    /// Its directory is not private.
    #[error("cannot place socket {path} there")]
    Dir {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: PrivateDirError,
    },
    /// A live process serves the path.
    #[error("socket {path} is in use by a running process")]
    InUse {
        /// The socket.
        path: PathBuf,
    },
    /// Something that is not a socket sits at the path.
    #[error("{path} exists and is not a socket (remove it or choose another path)")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// bind(2) or chmod(2) failed.
    #[error("cannot bind socket {path}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Binds a unix socket at `path`, mode 0600, inside a private directory ([`ensure_private_dir`]
/// on its parent). A stale socket nobody serves is replaced; a live one is [`BindPrivateError::InUse`].
pub fn bind_private(path: &Path) -> Result<UnixListener, BindPrivateError> {
    bind_private_for(path, geteuid().as_raw())
}

/// [`bind_private`] with the directory's owner given (see [`ensure_private_dir_for`]).
pub fn bind_private_for(path: &Path, uid: u32) -> Result<UnixListener, BindPrivateError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    ensure_private_dir_for(parent, uid).map_err(|source| BindPrivateError::Dir {
        path: path.to_path_buf(),
        source,
    })?;
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(BindPrivateError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(BindPrivateError::InUse {
                path: path.to_path_buf(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| BindPrivateError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    // Nobody else can reach the directory meanwhile, so the umask's mode never shows.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Which peers may use a socket, by uid (`SO_PEERCRED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    allowed: Vec<u32>,
}

/// Why a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefused {
    /// Its credentials could not be read.
    #[error("cannot read the peer's credentials (SO_PEERCRED): {0}")]
    Unknown(String),
    /// Its uid is not allowed.
    #[error("uid {uid} (pid {pid}) may not use this socket; allowed uids: {}", list(.allowed))]
    NotAllowed {
        /// The peer's uid.
        uid: u32,
        /// The peer's pid.
        pid: i32,
        /// The allowed uids.
        allowed: Vec<u32>,
    },
}

fn list(uids: &[u32]) -> String {
    uids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl PeerPolicy {
    /// The default: this process's effective uid and root.
    pub fn owner_and_root() -> PeerPolicy {
        PeerPolicy::allowing(&[geteuid().as_raw(), 0])
    }

    /// This process's effective uid (always: the owner may use its own socket) and `extra`;
    /// `extra` empty means [`PeerPolicy::owner_and_root`].
    pub fn owner_and(extra: &[u32]) -> PeerPolicy {
        if extra.is_empty() {
            return PeerPolicy::owner_and_root();
        }
        let mut all = vec![geteuid().as_raw()];
        all.extend_from_slice(extra);
        PeerPolicy::allowing(&all)
    }

    /// Exactly these uids.
    pub fn allowing(uids: &[u32]) -> PeerPolicy {
        let mut allowed = uids.to_vec();
        allowed.sort_unstable();
        allowed.dedup();
        PeerPolicy { allowed }
    }

    /// The allowed uids, ascending.
    pub fn allowed(&self) -> &[u32] {
        &self.allowed
    }

    /// Checks a peer's uid (pure).
    pub fn check_uid(&self, uid: u32, pid: i32) -> Result<(), PeerRefused> {
        if self.allowed.contains(&uid) {
            Ok(())
        } else {
            Err(PeerRefused::NotAllowed {
                uid,
                pid,
                allowed: self.allowed.clone(),
            })
        }
    }

    /// Reads the peer's credentials from the connected `stream` and checks its uid. Returns the
    /// uid when allowed.
    pub fn check(&self, stream: &UnixStream) -> Result<u32, PeerRefused> {
        let cred =
            getsockopt(stream, PeerCredentials).map_err(|e| PeerRefused::Unknown(e.to_string()))?;
        self.check_uid(cred.uid(), cred.pid())?;
        Ok(cred.uid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn the_directory_rule_names_what_is_wrong() {
        let d = Path::new("/x");
        assert!(check_private(d, true, 5, 0o40700, 5).is_ok());
        let e = check_private(d, true, 5, 0o40755, 5).unwrap_err();
        assert!(e.to_string().contains("mode 0755"), "{e}");
        let e = check_private(d, true, 6, 0o40700, 5).unwrap_err();
        assert!(e.to_string().contains("owned by uid 6"), "{e}");
        let e = check_private(d, false, 5, 0o120777, 5).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        assert!(check_private(d, true, 5, 0o40710, 5).is_err());
        assert!(check_private(d, true, 5, 0o40701, 5).is_err());
    }

    #[test]
    fn a_missing_directory_is_created_0700_and_a_loose_one_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        ensure_private_dir(&d).unwrap();
        let md = std::fs::metadata(&d).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o700);
        ensure_private_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            ensure_private_dir(&d),
            Err(PrivateDirError::Mode { mode: 0o755, .. })
        ));
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(matches!(
            ensure_private_dir(&link),
            Err(PrivateDirError::NotADirectory { .. })
        ));
    }

    #[test]
    fn a_private_socket_is_0600_and_a_live_one_is_not_taken_over() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s/api.sock");
        let l = bind_private(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert!(matches!(
            bind_private(&p),
            Err(BindPrivateError::InUse { .. })
        ));
        drop(l);
        // Stale now: replaced.
        let _l = bind_private(&p).unwrap();
        let f = t.path().join("s/file");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(
            bind_private(&f),
            Err(BindPrivateError::NotASocket { .. })
        ));
    }

    #[test]
    fn the_peer_is_checked_by_its_uid() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let me = geteuid().as_raw();
        assert_eq!(PeerPolicy::owner_and_root().check(&a), Ok(me));
        let other = me.wrapping_add(4242);
        let e = PeerPolicy::allowing(&[other]).check(&a).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "uid {me} (pid {}) may not use",
                std::process::id()
            )),
            "{e}"
        );
        assert!(
            e.to_string().ends_with(&format!("allowed uids: {other}")),
            "{e}"
        );
        assert_eq!(
            PeerPolicy::owner_and(&[7, 7]).allowed(),
            PeerPolicy::allowing(&[me, 7]).allowed()
        );
        // The pair still works: checking reads nothing.
        (&a).write_all(b"k").unwrap();
        let mut x = [0u8; 1];
        b.read_exact(&mut x).unwrap();
    }
}

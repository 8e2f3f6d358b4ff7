//! A volume file opened as a VM's disk (`tern vm run --disk volume://NODE_ADDR/FILE`): the write
//! lease taken through the host's own node, data over NBD to that node (which does direct I/O at
//! the file's mapped extents, or redirects to the coordinator when its LUN path fails), and the
//! hooks live migration calls to move the lease with the VM.
//!
//! Ownership on one host: the lease belongs to a node, so two VMs on the same host would both be
//! "the holder". A writable open therefore also takes an exclusive `flock` on a claim file
//! (`/run/tern/volume-claims/ADDR_FILE.lock`), which the kernel drops when the process dies.
//! Across hosts, the coordinator's lease refuses the second writer.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tern_nbd::{Client, ClientError};

use crate::control::{self, ControlError, ErrorKind, LeaseAction, Request};
use crate::format::NodeId;

/// Where writable opens take their per-host claim files.
pub const CLAIM_DIR: &str = "/run/tern/volume-claims";

const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a volume disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The spec is not `NODE_ADDR/FILE`.
    #[error("bad volume disk {0:?}: expected volume://HOST:PORT/FILE")]
    BadSpec(String),
    /// The node did not answer, or refused.
    #[error("volume node {addr}: {source}")]
    Node {
        /// Node address.
        addr: String,
        /// Its answer.
        #[source]
        source: ControlError,
    },
    /// The file does not exist on the volume.
    #[error(
        "no file {name:?} on the volume served by {addr} (create it with `tern volume create`)"
    )]
    NotFound {
        /// Node address.
        addr: String,
        /// File.
        name: String,
    },
    /// Another host's node holds the write lease.
    #[error(
        "{name} is open for writing elsewhere: node {holder} holds its write lease (open it ,readonly, or stop that VM first)"
    )]
    Busy {
        /// File.
        name: String,
        /// The holder.
        holder: String,
    },
    /// Another VM on this host has the file open for writing.
    #[error(
        "{name} is already open for writing by another VM on this host (claim {path}); open it ,readonly, or stop that VM first"
    )]
    Claimed {
        /// File.
        name: String,
        /// The claim file.
        path: PathBuf,
    },
    /// The claim file could not be made.
    #[error("cannot take the local claim {path}: {source}")]
    Claim {
        /// The claim file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The NBD connection failed.
    #[error("cannot open {name} over NBD at {addr}: {source}")]
    Nbd {
        /// Node address.
        addr: String,
        /// File.
        name: String,
        /// The cause.
        #[source]
        source: ClientError,
    },
}

/// A failed lease hand-over step.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The disk was opened read-only: there is no lease to move.
    #[error("{0} is open read-only: no write lease to hand over")]
    ReadOnly(String),
    /// This disk does not hold the write lease (incoming, already handed over, or closed).
    #[error("{name} does not hold its write lease here ({state:?}): nothing to hand over")]
    NotWriter {
        /// File.
        name: String,
        /// What the disk is.
        state: Ownership,
    },
    /// Making earlier writes durable failed: the lease is kept.
    #[error("flushing {name} before the hand-over failed: {source}")]
    Flush {
        /// File.
        name: String,
        /// The cause.
        #[source]
        source: ClientError,
    },
    /// The node or coordinator refused.
    #[error("lease {action} for {name}: {source}")]
    Lease {
        /// What was asked.
        action: &'static str,
        /// File.
        name: String,
        /// The answer.
        #[source]
        source: ControlError,
    },
}

/// What this disk may do with the file right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// Read-only open: never writes.
    Reader,
    /// This host's node holds the write lease for us.
    Writer,
    /// Opened as a migration target: writes wait for [`VolumeDisk::take_over`].
    Incoming,
    /// The lease went to `to` (migration source after switch-over).
    HandedOver {
        /// The successor node.
        to: NodeId,
    },
    /// Closed: the lease was released.
    Closed,
}

/// A volume file opened as a disk. All methods take `&self` (one NBD connection behind a lock).
#[derive(Debug)]
pub struct VolumeDisk {
    addr: String,
    name: String,
    size: u64,
    node_id: NodeId,
    conn: Mutex<Client>,
    owner: Mutex<Ownership>,
    _claim: Option<File>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Splits `HOST:PORT/FILE`.
pub fn parse_spec(spec: &str) -> Result<(String, String), OpenError> {
    match spec.split_once('/') {
        Some((addr, name)) if addr.contains(':') && !name.is_empty() && !name.contains('/') => {
            Ok((addr.to_owned(), name.to_owned()))
        }
        _ => Err(OpenError::BadSpec(spec.to_owned())),
    }
}

fn claim_path(addr: &str, name: &str) -> PathBuf {
    let safe: String = format!("{addr}_{name}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from(CLAIM_DIR).join(format!("{safe}.lock"))
}

fn take_claim(addr: &str, name: &str) -> Result<File, OpenError> {
    let path = claim_path(addr, name);
    let claim_err = |source| OpenError::Claim {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(CLAIM_DIR).map_err(claim_err)?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(claim_err)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::Claimed {
            name: name.to_owned(),
            path,
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(claim_err(e)),
    }
}

impl VolumeDisk {
    /// Opens `HOST:PORT/FILE` through the node at HOST:PORT. A writable open takes the local
    /// claim and the write lease (refused with [`OpenError::Busy`] / [`OpenError::Claimed`] while
    /// another VM writes the file); a read-only open takes neither.
    pub fn open(spec: &str, readonly: bool) -> Result<VolumeDisk, OpenError> {
        Self::open_as(
            spec,
            if readonly {
                Ownership::Reader
            } else {
                Ownership::Writer
            },
        )
    }

    /// Opens `HOST:PORT/FILE` on a migration target: the local claim is taken but not the lease,
    /// which arrives with the source's [`VolumeDisk::release_to`] and is picked up by
    /// [`VolumeDisk::take_over`]; writes before that are refused.
    pub fn open_incoming(spec: &str) -> Result<VolumeDisk, OpenError> {
        Self::open_as(spec, Ownership::Incoming)
    }

    fn open_as(spec: &str, mode: Ownership) -> Result<VolumeDisk, OpenError> {
        let (addr, name) = parse_spec(spec)?;
        let node_err = |source| OpenError::Node {
            addr: addr.clone(),
            source,
        };
        let status =
            control::call(&addr, &Request::Status, false, CONTROL_TIMEOUT).map_err(node_err)?;
        let node_id = status["node_id"].as_u64().unwrap_or(0) as NodeId;
        let stat = control::call(
            &addr,
            &Request::Stat {
                name: name.clone(),
                map: false,
            },
            false,
            CONTROL_TIMEOUT,
        )
        .map_err(|e| match e.kind {
            ErrorKind::NotFound => OpenError::NotFound {
                addr: addr.clone(),
                name: name.clone(),
            },
            _ => node_err(e),
        })?;
        let claim = match mode {
            Ownership::Reader => None,
            _ => Some(take_claim(&addr, &name)?),
        };
        if mode == Ownership::Writer {
            let req = Request::Lease {
                name: name.clone(),
                action: LeaseAction::Acquire,
            };
            control::call(&addr, &req, false, CONTROL_TIMEOUT).map_err(|e| match e.kind {
                ErrorKind::Busy => OpenError::Busy {
                    name: name.clone(),
                    holder: stat["lease"]["holder"]
                        .as_u64()
                        .map(|h| h.to_string())
                        .unwrap_or_else(|| e.message.clone()),
                },
                _ => node_err(e),
            })?;
        }
        let conn = match Client::connect(&addr, &name) {
            Ok(c) => c,
            Err(source) => {
                if mode == Ownership::Writer {
                    let _ = release(&addr, &name);
                }
                return Err(OpenError::Nbd { addr, name, source });
            }
        };
        Ok(VolumeDisk {
            size: conn.size(),
            addr,
            name,
            node_id,
            conn: Mutex::new(conn),
            owner: Mutex::new(mode),
            _claim: claim,
        })
    }

    /// The file's size in bytes.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The file name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id of the node this disk goes through: what a migration source names in
    /// [`VolumeDisk::release_to`] when this disk is the target.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Whether this disk was opened read-only.
    pub fn read_only(&self) -> bool {
        *lock(&self.owner) == Ownership::Reader
    }

    /// What the disk may do now.
    pub fn ownership(&self) -> Ownership {
        *lock(&self.owner)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ClientError> {
        lock(&self.conn).read(offset, buf)
    }

    /// Writes `data` at `offset`. Refused (`EPERM`) unless this disk is the writer; the node
    /// checks its lease (deadline and epoch) before the data reaches the LUN or the coordinator.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<(), ClientError> {
        // The ownership lock is held across the write, so a hand-over never overtakes one.
        let owner = lock(&self.owner);
        if *owner != Ownership::Writer {
            return Err(ClientError::Remote(tern_nbd::Errno::Perm));
        }
        let r = lock(&self.conn).write(offset, data, false);
        drop(owner);
        r
    }

    /// Makes every earlier write durable (on the LUN, or at the coordinator when redirected).
    pub fn flush(&self) -> Result<(), ClientError> {
        lock(&self.conn).flush()
    }

    /// Migration source, at switch-over (the VM paused, its last write acknowledged): flushes,
    /// then hands the write lease to node `successor` in one compare-and-swap. From here on this
    /// disk refuses writes. On error the lease stays with the source and the VM may resume.
    pub fn release_to(&self, successor: NodeId) -> Result<(), HandoverError> {
        let mut owner = lock(&self.owner);
        match *owner {
            Ownership::Writer => {}
            Ownership::Reader => return Err(HandoverError::ReadOnly(self.name.clone())),
            state => {
                return Err(HandoverError::NotWriter {
                    name: self.name.clone(),
                    state,
                });
            }
        }
        lock(&self.conn)
            .flush()
            .map_err(|source| HandoverError::Flush {
                name: self.name.clone(),
                source,
            })?;
        self.lease("handover", LeaseAction::Handover { to: successor })?;
        *owner = Ownership::HandedOver { to: successor };
        Ok(())
    }

    /// Migration source, when the migration is aborted after [`VolumeDisk::release_to`]: takes
    /// the pending hand-over back (the coordinator first stops the target writing), so the VM can
    /// resume here.
    pub fn abort_handover(&self) -> Result<(), HandoverError> {
        let mut owner = lock(&self.owner);
        if *owner == Ownership::Reader {
            return Err(HandoverError::ReadOnly(self.name.clone()));
        }
        if *owner == Ownership::Writer {
            return Ok(()); // Never handed over.
        }
        self.lease("abort_handover", LeaseAction::AbortHandover)?;
        *owner = Ownership::Writer;
        Ok(())
    }

    /// Migration target, after the source's [`VolumeDisk::release_to`] named this node and
    /// before the VM resumes here: confirms the hand-over (the named successor is the only node
    /// the coordinator lets in), after which the source can no longer abort it.
    pub fn take_over(&self) -> Result<(), HandoverError> {
        let mut owner = lock(&self.owner);
        if *owner == Ownership::Reader {
            return Err(HandoverError::ReadOnly(self.name.clone()));
        }
        self.lease("confirm_handover", LeaseAction::ConfirmHandover)?;
        // The holder's acquire is a renewal at the same epoch: it (re)enters the lease in the
        // node's held table, which its write path checks.
        self.lease("acquire", LeaseAction::Acquire)?;
        *owner = Ownership::Writer;
        Ok(())
    }

    /// Flushes and releases the lease (a writer) — called when the VM exits. Idempotent.
    pub fn close(&self) -> Result<(), HandoverError> {
        let mut owner = lock(&self.owner);
        if *owner == Ownership::Writer {
            let flushed = lock(&self.conn).flush();
            *owner = Ownership::Closed;
            release(&self.addr, &self.name).map_err(|source| HandoverError::Lease {
                action: "release",
                name: self.name.clone(),
                source,
            })?;
            flushed.map_err(|source| HandoverError::Flush {
                name: self.name.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn lease(&self, action: &'static str, a: LeaseAction) -> Result<(), HandoverError> {
        let req = Request::Lease {
            name: self.name.clone(),
            action: a,
        };
        control::call(&self.addr, &req, false, CONTROL_TIMEOUT)
            .map(|_| ())
            .map_err(|source| HandoverError::Lease {
                action,
                name: self.name.clone(),
                source,
            })
    }
}

fn release(addr: &str, name: &str) -> Result<(), ControlError> {
    let req = Request::Lease {
        name: name.to_owned(),
        action: LeaseAction::Release,
    };
    control::call(addr, &req, false, CONTROL_TIMEOUT).map(|_| ())
}

impl Drop for VolumeDisk {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_need_an_address_and_one_file_name() {
        assert_eq!(
            parse_spec("127.0.0.1:10811/vm1.raw").unwrap(),
            ("127.0.0.1:10811".to_owned(), "vm1.raw".to_owned())
        );
        for bad in [
            "",
            "vm1.raw",
            "127.0.0.1:1/",
            "/vm1.raw",
            "host/a",
            "h:1/a/b",
        ] {
            assert!(
                matches!(parse_spec(bad), Err(OpenError::BadSpec(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn claim_files_are_one_per_node_and_file() {
        let a = claim_path("127.0.0.1:1", "vm1.raw");
        assert_eq!(a, PathBuf::from(CLAIM_DIR).join("127.0.0.1_1_vm1.raw.lock"));
        assert_ne!(a, claim_path("127.0.0.1:2", "vm1.raw"));
    }
}

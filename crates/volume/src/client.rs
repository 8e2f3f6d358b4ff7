//! A volume file opened as a VM's disk (`tern vm run --disk volume://NODE_ADDR/FILE`): the write
//! lease taken through the host's own node, and the hooks live migration calls to move it with
//! the VM.
//!
//! Data path of a writer: **direct** `pread`/`pwrite` on the LUN at the file's mapped extents
//! (the node tells where the LUN is), with the node's fencing rule: the local lease deadline
//! (`request sent + TTL` of our own renewals, never later than the node's or the coordinator's)
//! is checked right before each `pwrite`. Writes to a hole (thin file), and all I/O once the LUN
//! fails, go over NBD to the node — which allocates, or redirects to the coordinator when its own
//! path is down. Direct writes not yet flushed are journaled and replayed over NBD when the path
//! fails, so a later flush covers them; a probe every 100 ms brings the disk back to direct after
//! flushing the NBD connection. Readers (no lease) read over NBD.
//!
//! Ownership on one host: the lease belongs to a node, so two VMs on the same host would both be
//! "the holder". A writable open therefore also takes an exclusive `flock` on a claim file
//! (`/run/tern/volume-claims/ADDR_FILE.lock`), which the kernel drops when the process dies; a
//! clean close also removes the file (while still holding the lock).
//! Across hosts, the coordinator's lease refuses the second writer.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tern_nbd::{Client, ClientError};

use crate::control::{self, ControlError, ErrorKind, LeaseAction, LeaseGrant, NodeStatus, Request};
use crate::format::{NodeId, SECTOR, Superblock};
use crate::store::{Segment, segments};

/// Unflushed direct writes kept for replay beyond this are flushed inline instead.
const JOURNAL_MAX_BYTES: usize = 64 << 20;
/// How often a disk on the node path checks whether the LUN works again.
const PROBE_EVERY: Duration = Duration::from_millis(100);

/// Where writable opens take their per-host claim files.
pub const CLAIM_DIR: &str = "/run/tern/volume-claims";

const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// What every thread a [`VolumeDisk`] starts (its lease renewer, `volume-renew`) runs first.
type ThreadStart = Box<dyn Fn() + Send + Sync>;
static THREAD_START: std::sync::OnceLock<ThreadStart> = std::sync::OnceLock::new();

/// Sets what every thread a [`VolumeDisk`] of this process starts runs before anything else: a
/// VMM enters its seccomp filter there, as each of its own threads does (this crate knows no
/// filters). Set once; `false` when it was set already.
pub fn on_thread_start(f: ThreadStart) -> bool {
    THREAD_START.set(f).is_ok()
}

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
    /// The thread that renews the write lease could not be started.
    #[error("cannot start the lease renewer: {0}")]
    Renewer(#[source] io::Error),
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

/// Counters of where a disk's I/O went.
#[derive(Debug, Default)]
pub struct PathCounters {
    /// Writes done with `pwrite` on the LUN.
    pub direct_writes: AtomicU64,
    /// Writes sent to the node over NBD (holes, path down).
    pub node_writes: AtomicU64,
    /// Direct writes replayed over NBD after the path failed.
    pub replayed: AtomicU64,
    /// Switches from direct to the node path.
    pub redirects: AtomicU64,
}

/// The write lease as this process sees it: epoch and local deadline.
#[derive(Debug)]
struct LeaseClock {
    epoch: AtomicU64,
    ttl_ms: AtomicU64,
    /// Milliseconds after `origin_ms`.
    deadline_ms: AtomicU64,
    /// `CLOCK_BOOTTIME` at open ([`crate::node::boottime_ms`]): deadlines pass during a suspend.
    origin_ms: u64,
    renewing: AtomicBool,
    stop: AtomicBool,
}

impl LeaseClock {
    fn now_ms(&self) -> u64 {
        crate::node::boottime_ms().saturating_sub(self.origin_ms)
    }
    fn valid(&self) -> bool {
        self.renewing.load(Ordering::SeqCst)
            && self.now_ms() < self.deadline_ms.load(Ordering::SeqCst)
    }
}

/// The direct path of a writer.
#[derive(Debug)]
struct Direct {
    lun: crate::lun::DirectFile,
    sb: Superblock,
    map: Vec<u32>,
    fault_file: Option<PathBuf>,
    up: bool,
    last_probe: Instant,
    journal: Vec<(u64, Vec<u8>)>,
    journal_bytes: usize,
    dirty: bool,
}

impl Direct {
    fn path_ok(&self) -> io::Result<()> {
        if self.fault_file.as_ref().is_some_and(|f| f.exists()) {
            return Err(io::Error::other("injected LUN path fault"));
        }
        Ok(())
    }
}

/// A volume file opened as a disk. All methods take `&self`.
#[derive(Debug)]
pub struct VolumeDisk {
    addr: String,
    name: String,
    size: u64,
    node_id: NodeId,
    conn: Mutex<Client>,
    owner: Mutex<Ownership>,
    direct: Mutex<Option<Direct>>,
    lease: Arc<LeaseClock>,
    counters: Arc<PathCounters>,
    claim: Mutex<Option<Claim>>,
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

/// The claim file a writable open of `FILE` through node `addr` takes (in [`CLAIM_DIR`]).
pub fn claim_path(addr: &str, name: &str) -> PathBuf {
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

fn take_claim(addr: &str, name: &str) -> Result<Claim, OpenError> {
    let path = claim_path(addr, name);
    std::fs::create_dir_all(CLAIM_DIR).map_err(|source| OpenError::Claim {
        path: path.clone(),
        source,
    })?;
    Claim::take(path, name)
}

/// A held per-host claim: an exclusive `flock` on the claim file. Dropping it removes the file
/// while the lock is still held, so a clean exit leaves nothing in [`CLAIM_DIR`].
///
/// Because a holder unlinks the file, a taker may lock a file that is no longer (or no longer the
/// same file) at the path: it then checks, after locking, that the path still names the inode it
/// locked, and starts over if not. Two processes can therefore never both hold the claim: the
/// path names one inode at a time, and only one open file can hold that inode's lock.
#[derive(Debug)]
struct Claim {
    _file: File,
    path: PathBuf,
}

impl Claim {
    /// Takes the claim at `path` (`name` is the volume file, for the error), or
    /// [`OpenError::Claimed`] while another open file holds it.
    fn take(path: PathBuf, name: &str) -> Result<Claim, OpenError> {
        use std::os::unix::fs::MetadataExt;
        let claim_err = |source| OpenError::Claim {
            path: path.clone(),
            source,
        };
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(claim_err)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(OpenError::Claimed {
                        name: name.to_owned(),
                        path,
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(claim_err(e)),
            }
            // The previous holder may have unlinked the file between our open and our lock.
            let locked = file.metadata().map_err(claim_err)?;
            match std::fs::metadata(&path) {
                Ok(now) if (now.dev(), now.ino()) == (locked.dev(), locked.ino()) => {
                    return Ok(Claim { _file: file, path });
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(claim_err(e)),
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Unlink first, close (and so unlock) after: see the type's comment.
        // `self._file` is closed after this body, when the fields are dropped.
        let _ = std::fs::remove_file(&self.path);
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
        let status = control::request(&addr, &Request::Status, false, CONTROL_TIMEOUT)
            .and_then(|r| Ok(r.into_status()?))
            .map_err(node_err)?;
        let node_id = status.node_id;
        let stat = control::request(
            &addr,
            &Request::Stat {
                name: name.clone(),
                map: false,
            },
            false,
            CONTROL_TIMEOUT,
        )
        .and_then(|r| Ok(r.into_file()?))
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
        let lease = Arc::new(LeaseClock {
            epoch: AtomicU64::new(0),
            ttl_ms: AtomicU64::new(0),
            deadline_ms: AtomicU64::new(0),
            origin_ms: crate::node::boottime_ms(),
            renewing: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        if mode == Ownership::Writer {
            let req = Request::Lease {
                name: name.clone(),
                action: LeaseAction::Acquire,
            };
            let sent = lease.now_ms();
            let grant = control::request(&addr, &req, false, CONTROL_TIMEOUT)
                .and_then(|r| Ok(r.into_lease()?))
                .map_err(|e| match e.kind {
                    ErrorKind::Busy => OpenError::Busy {
                        name: name.clone(),
                        holder: stat
                            .lease
                            .holder
                            .map(|h| h.to_string())
                            .unwrap_or_else(|| e.message.clone()),
                    },
                    _ => node_err(e),
                })?;
            note_grant(&lease, &grant, sent);
        }
        let conn = match control::client_tls() {
            None => Client::connect(&addr, &name),
            Some(tls) => Client::connect_tls(&addr, &name, CONTROL_TIMEOUT, Some(tls)),
        };
        let conn = match conn {
            Ok(c) => c,
            Err(source) => {
                if mode == Ownership::Writer {
                    let _ = release(&addr, &name);
                }
                return Err(OpenError::Nbd { addr, name, source });
            }
        };
        let direct = match mode {
            Ownership::Reader => None,
            _ => open_direct(&status),
        };
        let disk = VolumeDisk {
            size: conn.size(),
            addr,
            name,
            node_id,
            conn: Mutex::new(conn),
            owner: Mutex::new(mode),
            direct: Mutex::new(direct),
            lease,
            counters: Arc::default(),
            claim: Mutex::new(claim),
        };
        if mode != Ownership::Reader {
            disk.refresh_map();
            // On failure the disk is dropped, which gives the lease back.
            disk.spawn_renewer().map_err(OpenError::Renewer)?;
        }
        Ok(disk)
    }

    /// Where this disk's I/O went so far.
    pub fn counters(&self) -> &PathCounters {
        &self.counters
    }

    /// Whether the direct path is in use now.
    pub fn is_direct(&self) -> bool {
        lock(&self.direct).as_ref().is_some_and(|d| d.up)
    }

    fn refresh_map(&self) {
        let map = control::request(
            &self.addr,
            &Request::Stat {
                name: self.name.clone(),
                map: true,
            },
            false,
            CONTROL_TIMEOUT,
        )
        .ok()
        .and_then(|r| r.into_file().ok()?.into_map().ok());
        let mut g = lock(&self.direct);
        match (g.as_mut(), map) {
            (Some(d), Some(m)) => d.map = m,
            // Without a map the direct path cannot place data: use the node.
            (Some(d), None) => d.map.clear(),
            _ => {}
        }
    }

    /// Renews the lease through the node every TTL/4 while this disk writes; the local deadline
    /// is `request sent + TTL` of the last confirmed renewal.
    fn spawn_renewer(&self) -> io::Result<()> {
        let (clock, addr, name, node) = (
            Arc::clone(&self.lease),
            self.addr.clone(),
            self.name.clone(),
            self.node_id,
        );
        std::thread::Builder::new()
            .name("volume-renew".into())
            .spawn(move || {
                if let Some(start) = THREAD_START.get() {
                    start();
                }
                Self::renew_loop(&clock, &addr, &name, node);
            })
            .map(drop)
    }

    /// The renewer's loop: every TTL/4, while the disk writes, renew the lease through the node.
    fn renew_loop(clock: &LeaseClock, addr: &str, name: &str, node: NodeId) {
        while !clock.stop.load(Ordering::SeqCst) {
            let ttl = clock.ttl_ms.load(Ordering::SeqCst).max(200);
            std::thread::sleep(Duration::from_millis(ttl / 4));
            if !clock.renewing.load(Ordering::SeqCst) {
                continue;
            }
            let sent = clock.now_ms();
            let req = Request::Lease {
                name: name.to_owned(),
                action: LeaseAction::Acquire,
            };
            if let Ok(Ok(v)) =
                control::request(addr, &req, false, CONTROL_TIMEOUT).map(|r| r.into_lease())
                && v.holder == Some(node)
                && v.epoch == clock.epoch.load(Ordering::SeqCst)
            {
                note_grant(clock, &v, sent);
            }
        }
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

    /// Reads `buf.len()` bytes at `offset`: direct from the LUN when possible, else via the node.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ClientError> {
        let mut g = lock(&self.direct);
        if let Some(d) = g.as_mut() {
            self.probe(d);
            if d.up && offset.saturating_add(buf.len() as u64) <= self.size {
                let segs = segments(&d.sb, &d.map, offset, buf.len());
                if segs.iter().all(|s| matches!(s, Segment::Mapped { .. })) {
                    let mut done = 0;
                    let mut ok = true;
                    for s in segs {
                        if let Segment::Mapped { lun_offset, len } = s {
                            ok = d.path_ok().is_ok()
                                && d.lun
                                    .read_exact_at(&mut buf[done..done + len], lun_offset)
                                    .is_ok();
                            if !ok {
                                break;
                            }
                            done += len;
                        }
                    }
                    if ok {
                        return Ok(());
                    }
                    self.go_redirected(d)?;
                }
            }
        }
        drop(g);
        lock(&self.conn).read(offset, buf)
    }

    /// Writes `data` at `offset`. Refused (`EPERM`) unless this disk is the writer. On the direct
    /// path the local lease deadline is checked right before each `pwrite`; on the node path the
    /// node (and, redirected, the coordinator) checks the lease.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<(), ClientError> {
        // The ownership lock is held across the write, so a hand-over never overtakes one.
        let owner = lock(&self.owner);
        if *owner != Ownership::Writer {
            return Err(ClientError::Remote(tern_nbd::Errno::Perm));
        }
        let mut g = lock(&self.direct);
        if let Some(d) = g.as_mut() {
            self.probe(d);
            if d.up && offset.saturating_add(data.len() as u64) <= self.size {
                let segs = segments(&d.sb, &d.map, offset, data.len());
                if segs.iter().all(|s| matches!(s, Segment::Mapped { .. })) {
                    match self.direct_write(d, &segs, data, offset) {
                        Ok(true) => return Ok(()),
                        // Lease lapsed locally: let the node decide (it renews or refuses).
                        Ok(false) => {}
                        Err(_) => {
                            d.journal.push((offset, data.to_vec()));
                            d.journal_bytes += data.len();
                            return self.go_redirected(d);
                        }
                    }
                } else {
                    // A hole: the node allocates; make it durable and visible before any later
                    // direct I/O, then learn the new extents.
                    let mut c = lock(&self.conn);
                    c.write(offset, data, false)?;
                    c.flush()?;
                    drop(c);
                    self.counters.node_writes.fetch_add(1, Ordering::Relaxed);
                    drop(g);
                    self.refresh_map();
                    return Ok(());
                }
            }
        }
        drop(g);
        self.counters.node_writes.fetch_add(1, Ordering::Relaxed);
        lock(&self.conn).write(offset, data, false)
    }

    /// `Ok(true)`: written; `Ok(false)`: the local lease is not valid (nothing written);
    /// `Err`: the LUN path failed (part may be written; the caller replays the whole write).
    fn direct_write(
        &self,
        d: &mut Direct,
        segs: &[Segment],
        data: &[u8],
        offset: u64,
    ) -> io::Result<bool> {
        let mut done = 0;
        for s in segs {
            if let Segment::Mapped { lun_offset, len } = *s {
                // Fencing: the lease must still be ours right before the write.
                if !self.lease.valid() {
                    if done == 0 {
                        return Ok(false);
                    }
                    return Err(io::Error::other("lease lapsed inside a write"));
                }
                d.path_ok()?;
                crate::lun::stop_point("disk-pwrite");
                d.lun.write_all_at(&data[done..done + len], lun_offset)?;
                done += len;
            }
        }
        self.counters.direct_writes.fetch_add(1, Ordering::Relaxed);
        d.dirty = true;
        d.journal.push((offset, data.to_vec()));
        d.journal_bytes += data.len();
        if d.journal_bytes > JOURNAL_MAX_BYTES {
            d.path_ok()?;
            d.lun.sync_data()?;
            d.journal.clear();
            d.journal_bytes = 0;
            d.dirty = false;
        }
        Ok(true)
    }

    /// The LUN failed: replay every direct write not known durable over NBD, in order, and use
    /// the node from now on (until the probe finds the LUN again).
    fn go_redirected(&self, d: &mut Direct) -> Result<(), ClientError> {
        if d.up {
            d.up = false;
            d.last_probe = Instant::now();
            self.counters.redirects.fetch_add(1, Ordering::Relaxed);
        }
        let mut c = lock(&self.conn);
        for (off, bytes) in &d.journal {
            c.write(*off, bytes, false)?;
            self.counters.replayed.fetch_add(1, Ordering::Relaxed);
        }
        d.journal.clear();
        d.journal_bytes = 0;
        d.dirty = false;
        Ok(())
    }

    /// On the node path: every 100 ms, check the LUN; when it works, flush the NBD connection
    /// (everything sent is durable, so no later direct write can be overtaken) and go direct.
    fn probe(&self, d: &mut Direct) {
        if d.up || d.last_probe.elapsed() < PROBE_EVERY || d.map.is_empty() {
            return;
        }
        d.last_probe = Instant::now();
        let mut sector = vec![0u8; SECTOR as usize];
        if d.path_ok().is_ok()
            && d.lun.read_exact_at(&mut sector, 0).is_ok()
            && lock(&self.conn).flush().is_ok()
        {
            d.up = true;
        }
    }

    /// Makes every earlier write durable: `fdatasync` on the LUN for direct writes (on failure
    /// they are replayed over NBD first), then a FLUSH on the NBD connection.
    pub fn flush(&self) -> Result<(), ClientError> {
        let mut g = lock(&self.direct);
        if let Some(d) = g.as_mut()
            && d.dirty
        {
            match d.path_ok().and_then(|()| d.lun.sync_data()) {
                Ok(()) => {
                    d.journal.clear();
                    d.journal_bytes = 0;
                    d.dirty = false;
                }
                Err(_) => self.go_redirected(d)?,
            }
        }
        drop(g);
        lock(&self.conn).flush()
    }

    /// Frees `len` bytes at `offset` (a guest's DISCARD): an NBD TRIM to the node, which frees
    /// the file's whole extents in the range. Refused (`EPERM`) unless this disk is the writer.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.free_range(offset, len, false)
    }

    /// Makes `len` bytes at `offset` read as zeroes (a guest's WRITE_ZEROES): an NBD
    /// WRITE_ZEROES to the node, which frees whole extents and zeroes partial ones. Refused
    /// (`EPERM`) unless this disk is the writer.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.free_range(offset, len, true)
    }

    /// TRIM (`zeroes` false) or WRITE_ZEROES over NBD, in requests of at most 1 GiB. Earlier
    /// writes are flushed first, so no journaled direct write is replayed over the range later;
    /// the extent map is dropped before the node frees anything (direct I/O goes to the node
    /// until it is read again), so no direct write lands in an extent the file gave back.
    fn free_range(&self, offset: u64, len: u64, zeroes: bool) -> Result<(), ClientError> {
        const CHUNK: u64 = 1 << 30;
        let owner = lock(&self.owner);
        if *owner != Ownership::Writer {
            return Err(ClientError::Remote(tern_nbd::Errno::Perm));
        }
        self.flush()?;
        let mut g = lock(&self.direct);
        if let Some(d) = g.as_mut() {
            d.map.clear();
        }
        let mut c = lock(&self.conn);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as u32;
            if zeroes {
                c.write_zeroes(offset + done, n, false)?;
            } else {
                c.trim(offset + done, n)?;
            }
            done += u64::from(n);
        }
        drop((c, g));
        self.refresh_map();
        Ok(())
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
        self.flush().map_err(|source| HandoverError::Flush {
            name: self.name.clone(),
            source,
        })?;
        // No direct write after this point (the owner lock also keeps new ones out).
        self.lease.renewing.store(false, Ordering::SeqCst);
        if let Err(e) = self.lease("handover", LeaseAction::Handover { to: successor }) {
            self.lease.renewing.store(true, Ordering::SeqCst);
            return Err(e);
        }
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
        let v = self.lease("abort_handover", LeaseAction::AbortHandover)?;
        note_grant(&self.lease, &v, self.lease.now_ms());
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
        let sent = self.lease.now_ms();
        let v = self.lease("acquire", LeaseAction::Acquire)?;
        note_grant(&self.lease, &v, sent);
        *owner = Ownership::Writer;
        drop(owner);
        // The source may have allocated extents: place our direct writes by the current map.
        self.refresh_map();
        Ok(())
    }

    /// Flushes and releases the lease (a writer), then the host's claim (its file removed) —
    /// called when the VM exits. Idempotent.
    pub fn close(&self) -> Result<(), HandoverError> {
        let closed = self.close_lease();
        // After the lease: a VM on this host that takes the claim next must not have its fresh
        // lease released by our release.
        drop(lock(&self.claim).take());
        closed
    }

    fn close_lease(&self) -> Result<(), HandoverError> {
        let mut owner = lock(&self.owner);
        self.lease.stop.store(true, Ordering::SeqCst);
        if *owner == Ownership::Writer {
            let flushed = self.flush();
            self.lease.renewing.store(false, Ordering::SeqCst);
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

    fn lease(&self, action: &'static str, a: LeaseAction) -> Result<LeaseGrant, HandoverError> {
        let req = Request::Lease {
            name: self.name.clone(),
            action: a,
        };
        control::request(&self.addr, &req, false, CONTROL_TIMEOUT)
            .and_then(|r| Ok(r.into_lease()?))
            .map_err(|source| HandoverError::Lease {
                action,
                name: self.name.clone(),
                source,
            })
    }
}

/// Records a grant or renewal: epoch, and deadline = `sent` + TTL on our clock.
fn note_grant(clock: &LeaseClock, v: &LeaseGrant, sent: u64) {
    clock.epoch.store(v.epoch, Ordering::SeqCst);
    clock.ttl_ms.store(v.ttl_ms, Ordering::SeqCst);
    clock.deadline_ms.store(sent + v.ttl_ms, Ordering::SeqCst);
    clock.renewing.store(true, Ordering::SeqCst);
}

/// The direct path from the node's status: its LUN (same host) and fault file. `None` when the
/// node has no direct path (`--no-direct`) or the LUN cannot be opened here.
fn open_direct(status: &NodeStatus) -> Option<Direct> {
    if status.no_direct {
        return None;
    }
    let lun = crate::lun::DirectFile::open(&status.lun).ok()?;
    let mut sector = vec![0u8; SECTOR as usize];
    lun.read_exact_at(&mut sector, 0).ok()?;
    let sb = Superblock::decode(&sector).ok()?;
    Some(Direct {
        lun,
        sb,
        map: Vec::new(),
        fault_file: status.fault_file.clone(),
        up: true,
        last_probe: Instant::now(),
        journal: Vec::new(),
        journal_bytes: 0,
        dirty: false,
    })
}

fn release(addr: &str, name: &str) -> Result<(), ControlError> {
    let req = Request::Lease {
        name: name.to_owned(),
        action: LeaseAction::Release,
    };
    control::request(addr, &req, false, CONTROL_TIMEOUT)
        .and_then(|r| Ok(r.into_lease().map(drop)?))
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

    #[test]
    fn a_claim_is_exclusive_and_its_file_goes_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.lock");
        let first = Claim::take(path.clone(), "a").unwrap();
        assert!(path.exists());
        match Claim::take(path.clone(), "a") {
            Err(OpenError::Claimed { name, path: p }) => {
                assert_eq!((name.as_str(), p), ("a", path.clone()))
            }
            other => panic!("a second claim while the first is held: {other:?}"),
        }
        drop(first);
        assert!(!path.exists(), "a released claim leaves its file behind");
        let again = Claim::take(path.clone(), "a").unwrap();
        assert!(path.exists());
        drop(again);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn racing_claimers_never_both_hold_the_claim() {
        use std::sync::atomic::AtomicUsize;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("race.lock");
        let holders = AtomicUsize::new(0);
        let wins = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..2000 {
                        match Claim::take(path.clone(), "race") {
                            Ok(claim) => {
                                let before = holders.fetch_add(1, Ordering::SeqCst);
                                assert_eq!(
                                    before,
                                    0,
                                    "two claimers hold {} at once",
                                    path.display()
                                );
                                wins.fetch_add(1, Ordering::SeqCst);
                                std::thread::yield_now();
                                holders.fetch_sub(1, Ordering::SeqCst);
                                drop(claim);
                            }
                            Err(OpenError::Claimed { .. }) => std::thread::yield_now(),
                            Err(e) => panic!("claiming {}: {e}", path.display()),
                        }
                    }
                });
            }
        });
        assert!(wins.load(Ordering::SeqCst) > 0, "no claimer ever won");
        assert!(!path.exists(), "the last holder left its claim file behind");
    }
}

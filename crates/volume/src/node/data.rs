//! An open file on a node ([`FileHandle`], the NBD backend local clients see): direct I/O on the
//! LUN at the mapped extents, the switch to the coordinator when the path fails (replaying the
//! journal of unflushed writes) and back when it returns, flushes, and freeing or zeroing ranges.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tern_nbd::proto::StatusExtent;
use tern_nbd::server::ZeroFlags;
use tern_nbd::{Backend, Errno};

use crate::control::{self, ControlError, ErrorKind, FileInfo, Request};
use crate::format::{EXTENT_SIZE, Superblock};
use crate::lun::Lun;
use crate::store::{Segment, segments};

use super::journal::Journal;
use super::{CALL_TIMEOUT, COORDINATOR_WAIT, JOURNAL_MAX_BYTES, Node, PathState, lock};

impl Node {
    /// A file's details with its extent map, from the coordinator.
    fn stat_with_map(&self, name: &str) -> Result<FileInfo, ControlError> {
        let f = self
            .call_coordinator(&Request::Stat {
                name: name.into(),
                map: true,
            })?
            .into_file()?;
        if f.map.is_none() {
            return Err(control::ReplyError::Missing("map").into());
        }
        Ok(f)
    }

    pub(super) fn handle_for(self: &Arc<Self>, name: &str) -> Option<Arc<FileHandle>> {
        // Every new connection gets a fresh map; a handle of the same size is reused (its path
        // state and unflushed-write journal live on), a resized or re-created file gets a new one.
        let st = self.stat_with_map(name).ok()?;
        let map = st.map?;
        if let Some(h) = lock(&self.handles).get(name).cloned()
            && h.size == st.size
        {
            lock(&h.state).map = map;
            return Some(h);
        }
        let h = Arc::new(FileHandle {
            node: Arc::clone(self),
            name: name.to_owned(),
            size: st.size,
            preallocated: st.preallocated,
            state: Mutex::new(HandleState {
                map,
                mode: PathState::Direct,
                redirect: None,
                dirty_redirected: false,
                inflight: Arc::default(),
            }),
            logged_refusal: AtomicU64::new(0),
            direct: AtomicBool::new(true),
            io: Mutex::default(),
            io_done: Condvar::new(),
        });
        let old = lock(&self.handles).insert(name.to_owned(), Arc::clone(&h));
        if let Some(old) = old
            && lock(&old.state).mode == PathState::Redirected
        {
            self.redirected_files.fetch_sub(1, Ordering::SeqCst);
        }
        Some(h)
    }
}

/// `base:allocation` runs of `len` bytes from `offset` under `map`: holes read as zeroes.
pub(super) fn map_status(sb: &Superblock, map: &[u32], offset: u64, len: u32) -> Vec<StatusExtent> {
    segments(sb, map, offset, len as usize)
        .into_iter()
        .map(|s| match s {
            Segment::Mapped { len, .. } => StatusExtent {
                len: len as u64,
                hole: false,
                zero: false,
            },
            Segment::Hole { len, .. } => StatusExtent {
                len: len as u64,
                hole: true,
                zero: true,
            },
        })
        .collect()
}

struct Redirect {
    /// One connection to the coordinator's export `NAME@NODE.EPOCH`, shared by every request of
    /// this file: requests from several clients (or one pipelining client) are in flight on it
    /// together.
    client: Arc<tern_nbd::SharedClient>,
    epoch: u64,
    generation: u64,
}

pub(super) struct HandleState {
    map: Vec<u32>,
    mode: PathState,
    redirect: Option<Redirect>,
    dirty_redirected: bool,
    /// One clone per request in flight to the coordinator without the state lock held
    /// ([`FileHandle::with_redirect_unlocked`]); going back to direct I/O waits for them.
    inflight: Arc<()>,
}

/// A file opened on a node: the NBD backend local clients see.
///
/// Besides reads and writes it frees and zeroes ranges (NBD TRIM and WRITE_ZEROES, which is how
/// `qemu-img`, `nbdcopy` and a VM's volume disk give space back: whole 1 MiB extents of a thin file
/// return to the volume, partial ones are zeroed) and reports `base:allocation` block status.
pub struct FileHandle {
    pub(super) node: Arc<Node>,
    pub(super) name: String,
    size: u64,
    /// Preallocated files keep their extents: zeroing them writes every byte.
    preallocated: bool,
    pub(super) state: Mutex<HandleState>,
    /// The errno of the last refused write that was logged (0: none since the last success), so
    /// a client retrying a refused write does not flood the node's log.
    logged_refusal: AtomicU64,
    /// `state.mode` is direct (a copy readable without the lock, for the relay's fast refusal).
    direct: AtomicBool,
    /// Direct reads and writes issued on the LUN without the state lock ([`DirectIo`]).
    io: Mutex<DirectIo>,
    /// `io` went down: an op ended.
    io_done: Condvar,
}

/// The direct I/O of a file on the LUN. Requests take the state lock only to pick their path
/// and extents, register here, and issue the `pread`/`pwrite` after dropping it, so one file's
/// requests reach the LUN together. They leave when done without the state lock, so whoever
/// holds the state lock can wait for them all ([`FileHandle::drain_io`]): a flush, a zeroing,
/// the switch to redirected I/O and giving the lease away all happen with no direct I/O in
/// flight and none starting. A write overlapping one in flight waits for it before it is
/// issued, so overlapping writes reach the LUN, and the journal, in the order they were sent.
#[derive(Default)]
struct DirectIo {
    /// Reads and writes issued and not yet done.
    ops: usize,
    /// The byte ranges `[start, end)` (of the file) of the writes among them.
    writes: Vec<(u64, u64)>,
    /// Threads waiting in `drain_io` or for an overlapping write.
    waiters: usize,
    /// Direct writes done since the last successful flush, for replay through the coordinator
    /// (each added as it ends; taken or cleared only with the state lock held and nothing in
    /// flight).
    journal: Journal,
}

/// One registered direct op ([`FileHandle::begin_io`]); dropping it ends the op.
struct IoGuard<'a> {
    handle: &'a FileHandle,
    write: Option<(u64, u64)>,
    /// A write to journal as it ends.
    written: Option<(u64, &'a [u8])>,
}

impl<'a> IoGuard<'a> {
    /// End a write that reached the LUN (or may have: the path failed), journaling it.
    fn written(mut self, offset: u64, data: &'a [u8]) {
        self.written = Some((offset, data));
    }
}

impl Drop for IoGuard<'_> {
    fn drop(&mut self) {
        let mut io = lock(&self.handle.io);
        if let Some((offset, data)) = self.written {
            io.journal.push(offset, data);
        }
        io.ops -= 1;
        if let Some(r) = self.write
            && let Some(i) = io.writes.iter().position(|w| *w == r)
        {
            io.writes.swap_remove(i);
        }
        let wake = io.waiters > 0;
        drop(io);
        if wake {
            self.handle.io_done.notify_all();
        }
    }
}

impl std::fmt::Debug for FileHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileHandle")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish()
    }
}

impl FileHandle {
    /// Register a direct op (the caller holds the state lock, so nothing drains meanwhile); a
    /// write (`write`: its byte range) first waits for in-flight writes it overlaps.
    fn begin_io(&self, write: Option<(u64, u64)>) -> IoGuard<'_> {
        let mut io = lock(&self.io);
        if let Some((s, e)) = write {
            while io.writes.iter().any(|&(ws, we)| ws < e && s < we) {
                io.waiters += 1;
                io = self.io_done.wait(io).unwrap_or_else(|e| e.into_inner());
                io.waiters -= 1;
            }
            io.writes.push((s, e));
        }
        io.ops += 1;
        IoGuard {
            handle: self,
            write,
            written: None,
        }
    }

    /// Wait until no direct op is in flight (the caller holds the state lock, so none starts).
    /// In-flight ops end without the state lock.
    fn drain_io(&self) {
        let mut io = lock(&self.io);
        while io.ops > 0 {
            io.waiters += 1;
            io = self.io_done.wait(io).unwrap_or_else(|e| e.into_inner());
            io.waiters -= 1;
        }
    }

    pub(super) fn refresh_map(&self, node: &Node) -> Result<(), Errno> {
        let map = node
            .stat_with_map(&self.name)
            .ok()
            .and_then(|f| f.map)
            .ok_or(Errno::Io)?;
        lock(&self.state).map = map;
        Ok(())
    }

    pub(super) fn use_direct(&self, st: &mut HandleState) -> Result<bool, Errno> {
        let node = &self.node;
        let ok = node.path_ok.load(Ordering::SeqCst);
        if st.mode == PathState::Redirected && ok {
            // Coming back: every request sent through the coordinator must have landed (none
            // may overtake a later direct write) and be durable first. Requests in flight need
            // no lock to finish, and each gives up within CALL_TIMEOUT.
            while Arc::strong_count(&st.inflight) > 1 {
                std::thread::sleep(Duration::from_millis(1));
            }
            if let Some(r) = st.redirect.as_ref() {
                r.client.flush().map_err(|_| Errno::Io)?;
            }
            st.redirect = None;
            st.dirty_redirected = false;
            st.mode = PathState::Direct;
            self.direct.store(true, Ordering::SeqCst);
            node.redirected_files.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(st.mode == PathState::Direct && ok)
    }

    /// Whether the file is on the direct path and the LUN answers, read without the state lock
    /// (for the relay: such a request is not forwarded, and is executed here without a look
    /// at the state first). A `false` is only a hint: [`FileHandle::redirected_token`] decides.
    pub(super) fn direct_now(&self) -> bool {
        self.direct.load(Ordering::SeqCst) && self.node.path_ok.load(Ordering::SeqCst)
    }

    /// For the relay ([`super::relay`]): whether a read or write of this file goes to the
    /// coordinator now (redirected, and for a write no journal left to replay first), and if so
    /// the token that keeps the file from going back to direct I/O until it is answered.
    pub(super) fn redirected_token(&self, write: bool) -> Option<Arc<()>> {
        let mut st = lock(&self.state);
        if !matches!(self.use_direct(&mut st), Ok(false)) {
            return None;
        }
        if write {
            if !lock(&self.io).journal.is_empty() {
                return None;
            }
            st.dirty_redirected = true;
        }
        Some(Arc::clone(&st.inflight))
    }

    fn go_redirected(&self, st: &mut HandleState) {
        // Direct ops in flight land (or fail) before anything goes to the coordinator.
        self.drain_io();
        if st.mode == PathState::Direct {
            st.mode = PathState::Redirected;
            self.direct.store(false, Ordering::SeqCst);
            self.node.redirected_files.fetch_add(1, Ordering::SeqCst);
        }
        self.node.path_ok.store(false, Ordering::SeqCst);
    }

    fn redirect<'a>(
        &self,
        st: &'a mut HandleState,
        epoch: u64,
    ) -> Result<&'a Arc<tern_nbd::SharedClient>, Errno> {
        let leader = self.node.leader().ok_or(Errno::Shutdown)?;
        let stale = st
            .redirect
            .as_ref()
            .is_none_or(|r| r.epoch != epoch || r.generation != leader.generation);
        if stale {
            let export = format!("{}@{}.{}", self.name, self.node.cfg.node_id, epoch);
            let client = tern_nbd::SharedClient::connect_tls(
                &leader.addr,
                &export,
                CALL_TIMEOUT,
                crate::control::client_tls(),
            )
            .map_err(|_| Errno::Io)?;
            st.redirect = Some(Redirect {
                client: Arc::new(client),
                epoch,
                generation: leader.generation,
            });
        }
        st.redirect.as_ref().map(|r| &r.client).ok_or(Errno::Io)
    }

    /// Run `f` against the coordinator with the state lock held (journal replay, flush, zeroing:
    /// nothing else of this file starts meanwhile), reconnecting through a coordinator change.
    /// Writes are idempotent (same bytes, same place, nothing later sent yet), so a retry never
    /// reorders.
    fn with_redirect<T>(
        &self,
        st: &mut HandleState,
        epoch: u64,
        mut f: impl FnMut(&tern_nbd::SharedClient) -> Result<T, tern_nbd::ClientError>,
    ) -> Result<T, Errno> {
        let start = Instant::now();
        loop {
            let res = match self.redirect(st, epoch) {
                Ok(c) => f(c),
                Err(e) => Err(tern_nbd::ClientError::Remote(e)),
            };
            match res {
                Ok(v) => return Ok(v),
                Err(tern_nbd::ClientError::Remote(Errno::Perm)) => return Err(Errno::Perm),
                Err(tern_nbd::ClientError::Remote(Errno::NoSpc)) => return Err(Errno::NoSpc),
                Err(_) if start.elapsed() < COORDINATOR_WAIT => {
                    st.redirect = None;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(_) => return Err(Errno::Io),
            }
        }
    }

    /// Run one read or write against the coordinator *without* the state lock: the lock is
    /// released once the connection is chosen, so requests of this file are in flight together
    /// (each NBD reply is matched by cookie). A failed request retries on a new connection
    /// within COORDINATOR_WAIT, as [`FileHandle::with_redirect`] does; it was never acknowledged,
    /// so every request that overlaps it was sent while it was in flight, and NBD gives such
    /// requests no order. Journal replay happens under the lock before the first of these.
    fn with_redirect_unlocked<'s, T>(
        &'s self,
        mut st: MutexGuard<'s, HandleState>,
        epoch: u64,
        mut f: impl FnMut(&tern_nbd::SharedClient) -> Result<T, tern_nbd::ClientError>,
    ) -> Result<T, Errno> {
        let start = Instant::now();
        loop {
            let client = self.redirect(&mut st, epoch).map(Arc::clone);
            let token = Arc::clone(&st.inflight);
            drop(st);
            let res = match &client {
                Ok(c) => f(c),
                Err(e) => Err(tern_nbd::ClientError::Remote(*e)),
            };
            drop(token);
            match res {
                Ok(v) => return Ok(v),
                Err(tern_nbd::ClientError::Remote(Errno::Perm)) => return Err(Errno::Perm),
                Err(tern_nbd::ClientError::Remote(Errno::NoSpc)) => return Err(Errno::NoSpc),
                Err(_) if start.elapsed() < COORDINATOR_WAIT => {
                    std::thread::sleep(Duration::from_millis(100));
                    st = lock(&self.state);
                    // Drop the connection that failed (another request may have replaced it).
                    if let Ok(c) = &client
                        && st
                            .redirect
                            .as_ref()
                            .is_some_and(|r| Arc::ptr_eq(c, &r.client))
                    {
                        st.redirect = None;
                    }
                }
                Err(_) => return Err(Errno::Io),
            }
        }
    }

    fn replay_journal(&self, st: &mut HandleState, epoch: u64) -> Result<(), Errno> {
        self.drain_io();
        let mut journal = std::mem::take(&mut lock(&self.io).journal);
        let res = journal.iter().try_for_each(|(off, data)| {
            self.with_redirect(st, epoch, |c| c.write(off, data, false))
        });
        if res.is_err() {
            // Not replayed: kept for the next try (nothing was journaled meanwhile: the file
            // is redirected and the state lock held).
            lock(&self.io).journal = journal;
            return res;
        }
        st.dirty_redirected |= !journal.is_empty();
        // Keep the buffers (no page faults on the next run of direct writes).
        journal.clear();
        lock(&self.io).journal = journal;
        Ok(())
    }

    fn journal_is_empty(&self) -> bool {
        lock(&self.io).journal.is_empty()
    }

    /// The LUN pieces of a direct write of `len` bytes at `offset`, after allocating the holes
    /// it covers (under the state lock: the map changes).
    fn map_for_write(
        &self,
        st: &mut HandleState,
        len: usize,
        offset: u64,
    ) -> Result<Vec<Segment>, Errno> {
        let node = &self.node;
        let mut segs = segments(&node.sb, &st.map, offset, len);
        for s in segs.clone() {
            if let Segment::Hole { logical, .. } = s {
                let v = node
                    .call_coordinator(&Request::Allocate {
                        name: self.name.clone(),
                        logical,
                    })
                    .and_then(|r| Ok(r.into_file()?.into_map()?))
                    .map_err(|e| {
                        if e.kind == ErrorKind::NoSpace {
                            Errno::NoSpc
                        } else {
                            Errno::Io
                        }
                    })?;
                st.map = v;
                segs = segments(&node.sb, &st.map, offset, len);
            }
        }
        Ok(segs)
    }

    /// Write `data` at the mapped `segs` on the LUN (without the state lock: the op is
    /// registered with [`FileHandle::begin_io`]).
    fn pwrite_segments(&self, segs: &[Segment], data: &[u8]) -> Result<(), DirectFail> {
        let node = &self.node;
        let mut done = 0;
        for s in segs {
            let Segment::Mapped { lun_offset, len } = *s else {
                return Err(DirectFail::Refused(Errno::Io));
            };
            // Fencing on the direct path: the lease must still be ours right before the write.
            if node.held_lease(&self.name).is_none() {
                return Err(DirectFail::Refused(Errno::Perm));
            }
            node.lun
                .write_at(&data[done..done + len], lun_offset)
                .map_err(|_| DirectFail::Path)?;
            done += len;
        }
        Ok(())
    }
}

/// Fill `buf` from the mapped `segs` (holes read as zeroes).
fn pread_segments(lun: &dyn Lun, segs: &[Segment], buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    for s in segs {
        match *s {
            Segment::Mapped { lun_offset, len } => {
                lun.read_at(&mut buf[done..done + len], lun_offset)?;
                done += len;
            }
            Segment::Hole { len, .. } => {
                buf[done..done + len].fill(0);
                done += len;
            }
        }
    }
    Ok(())
}

impl FileHandle {
    /// Log a refused write or zeroing once per cause (until a write succeeds again).
    pub(super) fn refused(&self, what: &str, offset: u64, e: Errno) -> Errno {
        let code = u64::from(e.code());
        if self.logged_refusal.swap(code, Ordering::Relaxed) != code {
            let why = match e {
                Errno::Perm => format!(
                    "node {} holds no valid write lease (take it with `tern volume lease acquire {} --node {}`), or it was fenced",
                    self.node.cfg.node_id, self.name, self.node.cfg.listen
                ),
                Errno::NoSpc => "no free extent left on the volume (thin files over-commit it; \
                                 free space with TRIM or `tern volume rm`)"
                    .to_owned(),
                e => e.to_string(),
            };
            eprintln!(
                "tern volume: node {}: {what} of {} at offset {offset} refused ({e}): {why}",
                self.node.cfg.node_id, self.name
            );
        }
        e
    }

    pub(super) fn accepted(&self) {
        if self.logged_refusal.load(Ordering::Relaxed) != 0 {
            self.logged_refusal.store(0, Ordering::Relaxed);
        }
    }

    /// Zero `len` bytes at `offset`, freeing whole extents of a thin file (the work behind NBD
    /// TRIM and WRITE_ZEROES). Needs the write lease, like a write. Earlier writes are flushed
    /// first (so a journal replay can never bring them back over the zeroes), the coordinator
    /// frees and zeroes under its lease check, and this node's map is refreshed before the reply.
    ///
    /// A local direct-I/O client (a VM's volume disk) does the same by sending NBD TRIM or
    /// WRITE_ZEROES on its connection to this node, and must refresh its own extent map before
    /// its next direct write: the freed extents may already belong to another file.
    pub fn zero_range(&self, offset: u64, len: u32, fua: bool) -> Result<(), Errno> {
        let node = &self.node;
        let held = node
            .ensure_lease(&self.name)
            .ok_or_else(|| self.refused("zeroing", offset, Errno::Perm))?;
        let mut st = lock(&self.state);
        self.flush_locked(&mut st, held.epoch)?;
        let res = if node.is_coordinator() {
            node.redirected_zero(
                &self.name,
                node.cfg.node_id,
                held.epoch,
                offset,
                u64::from(len),
                fua,
            )
        } else {
            self.with_redirect(&mut st, held.epoch, |c| c.write_zeroes(offset, len, fua))
        };
        // Whatever happened, the coordinator's map is the truth from here on.
        st.map = node
            .stat_with_map(&self.name)
            .ok()
            .and_then(|f| f.map)
            .ok_or(Errno::Io)?;
        res.map_err(|e| self.refused("zeroing", offset, e))?;
        self.accepted();
        Ok(())
    }

    pub(super) fn flush_locked(&self, st: &mut HandleState, epoch: u64) -> Result<(), Errno> {
        let node = &self.node;
        // Every direct write sent so far must be done before the flush that clears the journal
        // (and a node giving its lease away waits here for its writes in flight).
        self.drain_io();
        if self.use_direct(st)? {
            if node.lun.flush().is_ok() {
                lock(&self.io).journal.clear();
                return Ok(());
            }
            self.go_redirected(st);
        }
        if !self.journal_is_empty() {
            self.replay_journal(st, epoch)?;
        }
        self.with_redirect(st, epoch, |c| c.flush())?;
        st.dirty_redirected = false;
        Ok(())
    }
}

enum DirectFail {
    Path,
    Refused(Errno),
}

impl Backend for FileHandle {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        let node = &self.node;
        let mut st = lock(&self.state);
        if self.use_direct(&mut st)? {
            let mut segs = segments(&node.sb, &st.map, offset, buf.len());
            if segs.iter().any(|s| matches!(s, Segment::Hole { .. })) {
                // Another node may have allocated since we cached the map.
                drop(st);
                let _ = self.refresh_map(node);
                st = lock(&self.state);
                segs = segments(&node.sb, &st.map, offset, buf.len());
            }
            if self.use_direct(&mut st)? {
                // The read runs without the state lock, beside the file's other requests.
                let io = self.begin_io(None);
                drop(st);
                let res = pread_segments(&*node.lun, &segs, buf);
                drop(io);
                if res.is_ok() {
                    return Ok(());
                }
                st = lock(&self.state);
                self.go_redirected(&mut st);
            }
        }
        let epoch = node.held_lease(&self.name).map_or(0, |h| h.epoch);
        self.with_redirect_unlocked(st, epoch, |c| c.read(offset, buf))
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), Errno> {
        let res = self.write_inner(data, offset, fua);
        match res {
            Ok(()) => self.accepted(),
            Err(e @ (Errno::Perm | Errno::NoSpc)) => return Err(self.refused("write", offset, e)),
            Err(_) => {}
        }
        res
    }

    fn flush(&self) -> Result<(), Errno> {
        let epoch = self
            .node
            .held_lease(&self.name)
            .map(|h| h.epoch)
            .unwrap_or(0);
        let mut st = lock(&self.state);
        self.flush_locked(&mut st, epoch)
    }

    fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), Errno> {
        if flags.no_hole || self.preallocated {
            // Every byte is written (the range stays allocated): not faster than a write.
            if flags.fast {
                return Err(Errno::NotSup);
            }
            return write_zero_buffers(self, offset, len, flags.fua);
        }
        self.zero_range(offset, len, flags.fua)
    }

    fn trim(&self, offset: u64, len: u32) -> Result<(), Errno> {
        self.zero_range(offset, len, false)
    }

    fn relay(self: Arc<Self>) -> Option<Box<dyn tern_nbd::Relay>> {
        Some(Box::new(super::relay::FileRelay::new(self)))
    }

    fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, Errno> {
        let node = &self.node;
        let has_hole = {
            let st = lock(&self.state);
            segments(&node.sb, &st.map, offset, len as usize)
                .iter()
                .any(|s| matches!(s, Segment::Hole { .. }))
        };
        if has_hole {
            // Another node may have allocated since we cached the map.
            let _ = self.refresh_map(node);
        }
        let st = lock(&self.state);
        Ok(map_status(&node.sb, &st.map, offset, len))
    }
}

/// WRITE_ZEROES with `NO_HOLE` (or on a preallocated file): real zero writes, 1 MiB at a time.
pub(super) fn write_zero_buffers(
    b: &dyn Backend,
    offset: u64,
    len: u32,
    fua: bool,
) -> Result<(), Errno> {
    let zeroes = vec![0u8; (len as usize).min(EXTENT_SIZE as usize)];
    let mut done = 0u64;
    while done < u64::from(len) {
        let n = (u64::from(len) - done).min(zeroes.len() as u64) as usize;
        b.write_at(&zeroes[..n], offset + done, false)?;
        done += n as u64;
    }
    if fua { b.flush() } else { Ok(()) }
}

impl FileHandle {
    fn write_inner(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), Errno> {
        let node = &self.node;
        let held = node.ensure_lease(&self.name).ok_or(Errno::Perm)?;
        let mut st = lock(&self.state);
        if self.use_direct(&mut st)? {
            let segs = self.map_for_write(&mut st, data.len(), offset)?;
            if lock(&self.io).journal.bytes() > JOURNAL_MAX_BYTES {
                // Make the journaled writes durable (all of them: none is in flight after the
                // drain) and start a new journal; a failing LUN sends them to the coordinator.
                self.drain_io();
                if node.lun.flush().is_ok() {
                    lock(&self.io).journal.clear();
                } else {
                    self.go_redirected(&mut st);
                    self.replay_journal(&mut st, held.epoch)?;
                    return self.write_redirected(st, held.epoch, data, offset, fua);
                }
            }
            // Issued without the state lock, beside the file's other requests.
            let io = self.begin_io(Some((offset, offset + data.len() as u64)));
            drop(st);
            match self.pwrite_segments(&segs, data) {
                Ok(()) => {
                    io.written(offset, data);
                    // With FUA the journal keeps the entry all the same: a replay of durable
                    // bytes writes the same bytes again.
                    if !fua || node.lun.flush().is_ok() {
                        return Ok(());
                    }
                }
                Err(DirectFail::Path) => io.written(offset, data),
                Err(DirectFail::Refused(e)) => return Err(e),
            }
            // The path failed: replay everything not yet known durable, this write included.
            st = lock(&self.state);
            self.go_redirected(&mut st);
            self.replay_journal(&mut st, held.epoch)?;
            if fua {
                self.with_redirect(&mut st, held.epoch, |c| c.flush())?;
                st.dirty_redirected = false;
            }
            return Ok(());
        }
        self.write_redirected(st, held.epoch, data, offset, fua)
    }

    /// A write through the coordinator (the file is redirected), after the journal's replay.
    fn write_redirected(
        &self,
        mut st: MutexGuard<'_, HandleState>,
        epoch: u64,
        data: &[u8],
        offset: u64,
        fua: bool,
    ) -> Result<(), Errno> {
        if !self.journal_is_empty() {
            self.replay_journal(&mut st, epoch)?;
        }
        st.dirty_redirected = true;
        self.with_redirect_unlocked(st, epoch, |c| c.write(offset, data, fua))
    }
}

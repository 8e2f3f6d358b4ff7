//! Redirected reads and writes of one client connection, relayed to the coordinator with many
//! in flight ([`FileRelay`], the file's [`tern_nbd::Relay`]).
//!
//! ```text
//! client ──NBD──▶ node: reading thread ──forward──▶ relay connection ──▶ coordinator
//!        ◀─reply── node: relay thread  ◀──reply──── (own cookies)    ◀──
//! ```
//!
//! Each client connection of a redirected file gets its own connection to the coordinator's
//! export `NAME@NODE.EPOCH` ([`tern_nbd::RelayConnection`]). The node's reading thread sends
//! each READ and WRITE on at once (the socket write is batched while the client has more
//! requests queued) and goes back to reading; the connection's relay thread reads the
//! coordinator's replies in whatever order they come, matches them by cookie and answers the
//! client. No thread waits per request, so the client's queue depth reaches the coordinator.
//!
//! What the relay keeps from the one-request path ([`FileHandle`]'s `with_redirect_unlocked`):
//! * the coordinator checks (node, epoch, deadline) for every write (the export names the
//!   epoch; a write is forwarded only on a connection opened for the lease held now);
//! * a write is answered only after the coordinator did it, so a FLUSH (executed by the file,
//!   through the coordinator, whose flush covers the whole LUN) covers every write answered
//!   before it was sent;
//! * every forwarded request holds the file's in-flight token until it is answered, so the
//!   file returns to direct I/O only after the coordinator has answered all of them;
//! * a journal of direct writes not yet replayed, a direct path, a lease that must be renewed:
//!   the request is declined and the file executes it as before;
//! * a write refused by the coordinator (`EPERM`, `ENOSPC`) fails that request only; any other
//!   failure (an error reply, a dead connection, no reply within `CALL_TIMEOUT`) re-executes
//!   each request it touched through the file, which retries through a coordinator change
//!   (it was never answered, so requests overlapping it were in flight with it, unordered).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

use tern_nbd::proto::{CMD_FLAG_FUA, Command, RequestHeader};
use tern_nbd::{Backend, ClientError, Errno, Relay, RelayConnection, Relayed};

use super::{CALL_TIMEOUT, FileHandle, lock};

/// One connection to the coordinator for the relay.
struct Upstream {
    conn: RelayConnection,
    epoch: u64,
    generation: u64,
}

/// A request forwarded and not yet answered.
struct Pending {
    request: RequestHeader,
    /// A write's payload, kept for a retry through the file.
    data: Vec<u8>,
    upstream: Arc<Upstream>,
    /// Keeps the file redirected until the request is answered.
    token: Arc<()>,
}

#[derive(Default)]
struct RelayState {
    upstream: Option<Arc<Upstream>>,
    pending: HashMap<u64, Pending>,
    next_cookie: u64,
    /// Requests to execute through the file (their connection failed, or the coordinator
    /// answered with an error that a retry may cure), without their in-flight tokens. They run
    /// on the relay thread only once nothing is pending (so the relay holds no token the file
    /// may be waiting for), and nothing new is forwarded meanwhile.
    retry: VecDeque<(RequestHeader, Vec<u8>)>,
    /// Payload buffers to reuse.
    free: Vec<Vec<u8>>,
    closed: bool,
}

/// The relay of one client connection to a file ([`FileHandle::relay`]).
pub(super) struct FileRelay {
    handle: Arc<FileHandle>,
    st: Mutex<RelayState>,
    /// A connection was made, or the relay closed (for a relay thread with no connection).
    changed: Condvar,
}

/// Payload buffers kept for reuse, and the largest one kept.
const FREE_BUFFERS: usize = 64;
const FREE_BUFFER_BYTES: usize = 1 << 20;

fn is_timeout(e: &ClientError) -> bool {
    matches!(e, ClientError::Io(io) if matches!(
        io.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ))
}

impl FileRelay {
    pub(super) fn new(handle: Arc<FileHandle>) -> FileRelay {
        FileRelay {
            handle,
            st: Mutex::new(RelayState {
                next_cookie: 1,
                ..RelayState::default()
            }),
            changed: Condvar::new(),
        }
    }

    /// A connection for a request under (`epoch`, `generation`): the current one if it fits,
    /// a new one if nothing is in flight on the current one, else `None` (the file executes
    /// the request). Called by the connection's reading thread only.
    fn upstream(
        &self,
        rs: &mut RelayState,
        write: bool,
        epoch: u64,
        generation: u64,
    ) -> Option<Arc<Upstream>> {
        if let Some(u) = &rs.upstream {
            if u.generation == generation && (!write || u.epoch == epoch) {
                return Some(Arc::clone(u));
            }
            if rs.pending.values().any(|p| Arc::ptr_eq(&p.upstream, u)) {
                return None;
            }
        }
        let node = &self.handle.node;
        let leader = node.leader().filter(|l| l.generation == generation)?;
        let export = format!("{}@{}.{}", self.handle.name, node.cfg.node_id, epoch);
        let conn = RelayConnection::connect_tls(
            &leader.addr,
            &export,
            CALL_TIMEOUT,
            crate::control::client_tls(),
        )
        .ok()?;
        let up = Arc::new(Upstream {
            conn,
            epoch,
            generation,
        });
        if let Some(old) = rs.upstream.replace(Arc::clone(&up)) {
            // Wake the relay thread if it waits on the old one (nothing is in flight there).
            old.conn.shutdown();
        }
        self.changed.notify_all();
        Some(up)
    }

    /// Execute a request through the file (which retries through a coordinator change).
    fn execute_here(&self, request: RequestHeader, data: Vec<u8>, buf: &mut Vec<u8>) -> Relayed {
        let h = &*self.handle;
        let len = request.length as usize;
        let result = match request.command {
            Command::Read => {
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                h.read_at(&mut buf[..len], request.offset)
            }
            _ => {
                let fua = request.flags & CMD_FLAG_FUA != 0;
                h.write_at(&data, request.offset, fua)
            }
        };
        self.recycle(data);
        Relayed { request, result }
    }

    fn recycle(&self, mut data: Vec<u8>) {
        if data.capacity() == 0 || data.capacity() > FREE_BUFFER_BYTES {
            return;
        }
        data.clear();
        let mut rs = lock(&self.st);
        if rs.free.len() < FREE_BUFFERS {
            rs.free.push(data);
        }
    }

    /// The connection `up` failed: every request in flight on it is executed through the file.
    fn failed(&self, up: &Arc<Upstream>) {
        let mut rs = lock(&self.st);
        if rs.upstream.as_ref().is_some_and(|u| Arc::ptr_eq(u, up)) {
            rs.upstream = None;
        }
        let cookies: Vec<u64> = rs
            .pending
            .iter()
            .filter(|(_, p)| Arc::ptr_eq(&p.upstream, up))
            .map(|(&c, _)| c)
            .collect();
        for c in cookies {
            if let Some(p) = rs.pending.remove(&c) {
                rs.retry.push_back((p.request, p.data));
            }
        }
        drop(rs);
        up.conn.shutdown();
    }
}

impl Relay for FileRelay {
    fn forward(&self, request: &RequestHeader, data: &[u8], more: bool) -> bool {
        let h = &self.handle;
        let node = &h.node;
        let write = match request.command {
            Command::Read => false,
            Command::Write => true,
            _ => return false,
        };
        if h.direct_now() {
            // The file does it itself, on the LUN: no lock taken on the reading thread.
            return false;
        }
        let epoch = if write {
            match node.ensure_lease(&h.name) {
                Some(l) => l.epoch,
                // Refused (and logged) by the file.
                None => return false,
            }
        } else {
            node.held_lease(&h.name).map_or(0, |l| l.epoch)
        };
        let Some(generation) = node.leader_generation() else {
            return false;
        };
        let Some(token) = h.redirected_token(write) else {
            return false;
        };
        let (up, cookie) = {
            let mut rs = lock(&self.st);
            if rs.closed || !rs.retry.is_empty() {
                return false;
            }
            let Some(up) = self.upstream(&mut rs, write, epoch, generation) else {
                return false;
            };
            let cookie = rs.next_cookie;
            rs.next_cookie += 1;
            let mut kept = rs.free.pop().unwrap_or_default();
            kept.extend_from_slice(data);
            rs.pending.insert(
                cookie,
                Pending {
                    request: *request,
                    data: kept,
                    upstream: Arc::clone(&up),
                    token,
                },
            );
            (up, cookie)
        };
        let header = RequestHeader { cookie, ..*request };
        if up.conn.send(&header, data, !more).is_err() {
            // The relay thread sees the dead socket and executes the request through the file.
            up.conn.shutdown();
        }
        true
    }

    fn push(&self) {
        let up = lock(&self.st).upstream.clone();
        if let Some(up) = up
            && up.conn.flush().is_err()
        {
            up.conn.shutdown();
        }
    }

    fn next_reply(&self, buf: &mut Vec<u8>) -> Option<Relayed> {
        loop {
            let up = {
                let mut rs = lock(&self.st);
                loop {
                    if rs.pending.is_empty()
                        && let Some((request, data)) = rs.retry.pop_front()
                    {
                        drop(rs);
                        return Some(self.execute_here(request, data, buf));
                    }
                    if rs.closed && rs.pending.is_empty() {
                        return None;
                    }
                    if let Some(u) = &rs.upstream {
                        break Arc::clone(u);
                    }
                    rs = self.changed.wait(rs).unwrap_or_else(|e| e.into_inner());
                }
            };
            let got = up.conn.recv(buf, |cookie| {
                lock(&self.st)
                    .pending
                    .get(&cookie)
                    .map(|p| match p.request.command {
                        Command::Read => p.request.length as usize,
                        _ => 0,
                    })
            });
            let reply = match got {
                Ok(reply) => reply,
                Err(e) => {
                    let idle = {
                        let rs = lock(&self.st);
                        !rs.pending.values().any(|p| Arc::ptr_eq(&p.upstream, &up))
                    };
                    // An idle connection's read timeout is no failure; anything else is.
                    if !(idle && is_timeout(&e)) {
                        self.failed(&up);
                    }
                    continue;
                }
            };
            let Some(p) = lock(&self.st).pending.remove(&reply.cookie) else {
                // `recv` found it, and only this thread removes entries: cannot happen, but a
                // confused connection is dropped rather than trusted.
                self.failed(&up);
                continue;
            };
            let write = p.request.command == Command::Write;
            let Pending {
                request,
                data,
                token,
                ..
            } = p;
            drop(token);
            let result = match reply.error {
                None => Ok(()),
                // Refused by the coordinator's lease check or out of space: this request only.
                Some(e @ (Errno::Perm | Errno::NoSpc)) => Err(e),
                // Anything else is retried through the file, as on the one-request path.
                Some(_) => {
                    lock(&self.st).retry.push_back((request, data));
                    continue;
                }
            };
            self.recycle(data);
            match result {
                Ok(()) if write => self.handle.accepted(),
                Err(e) if write => {
                    self.handle.refused("write", request.offset, e);
                }
                _ => {}
            }
            return Some(Relayed { request, result });
        }
    }

    fn reply_ready(&self) -> bool {
        let rs = lock(&self.st);
        (!rs.retry.is_empty() && rs.pending.is_empty())
            || rs
                .upstream
                .as_ref()
                .is_some_and(|u| u.conn.reply_buffered())
    }

    fn close(&self) {
        let mut rs = lock(&self.st);
        rs.closed = true;
        if rs.pending.is_empty()
            && rs.retry.is_empty()
            && let Some(u) = rs.upstream.take()
        {
            // Wake a relay thread waiting on the idle connection.
            u.conn.shutdown();
        }
        drop(rs);
        self.changed.notify_all();
    }
}

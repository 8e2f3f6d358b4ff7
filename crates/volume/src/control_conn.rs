//! Kept-alive control connections: the process's control requests to a node (lease renewals,
//! forwarded requests, status) reuse an open connection instead of a new TCP connection and TLS
//! handshake each.
//!
//! A control request is an NBD option ([`OPT_TERN_CONTROL`]) sent during option haggling, which
//! the server answers and then waits for the next option; so one connection carries any number
//! of requests, one at a time. The pool keeps, per node address (and plain or TLS), the
//! connections that are idle: a request takes one (or opens one), sends, reads the reply and
//! puts it back. A connection idle longer than the idle limit ([`set_idle_limit`], 5 s by
//! default, under the server's 10 s handshake deadline that closes an idle one) is closed rather
//! than reused.
//!
//! **Nothing about fencing rides on the connection.** The receiver decides every request on its
//! own state when it reads it (a deposed coordinator answers `not_coordinator`, a stale epoch is
//! refused), exactly as on a new connection; a node drops its pooled connections to the old
//! coordinator when the coordinator changes ([`forget`]).
//!
//! **Resending.** A reused connection may have been closed by the server meanwhile (its handshake
//! deadline, a restart). When sending on a reused connection fails, or it ends (EOF, reset)
//! before the first byte of the reply, the server never took the request in: it is sent once
//! more on a new connection. A timeout, or a failure after the reply began, is returned as is
//! (the server may have acted), as with a new connection.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, BufWriter};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tern_nbd::ClientError;
use tern_nbd::client;
use tern_nbd::proto::{MAX_CONTROL_REPLY, OPT_ABORT, OPT_TERN_CONTROL, REP_TERN_CONTROL};
use tern_nbd::tls::{ClientTls, NetReader, NetWriter};

/// Default of [`set_idle_limit`].
pub const DEFAULT_IDLE_LIMIT: Duration = Duration::from_secs(5);

/// Idle connections kept per node address; more are closed when they come back.
const MAX_IDLE_PER_NODE: usize = 8;

/// The idle limit in milliseconds ([`set_idle_limit`]).
static IDLE_LIMIT_MS: AtomicU64 = AtomicU64::new(DEFAULT_IDLE_LIMIT.as_millis() as u64);

/// Connections this process opened for control requests (for tests and measurements).
static OPENED: AtomicU64 = AtomicU64::new(0);

/// Idle connections by (node address, TLS).
type Idle = HashMap<(String, bool), Vec<Conn>>;

/// The process's idle connections (`None` until the first is kept).
static POOL: Mutex<Option<Idle>> = Mutex::new(None);

/// Close a connection that was idle longer than `limit` instead of reusing it. Zero: no
/// connection is kept (every request on a new one, as before connections were kept).
pub fn set_idle_limit(limit: Duration) {
    IDLE_LIMIT_MS.store(limit.as_millis() as u64, Ordering::SeqCst);
    if limit.is_zero() {
        drop(pool().take());
    }
}

/// How many control connections this process has opened.
pub fn opened_connections() -> u64 {
    OPENED.load(Ordering::SeqCst)
}

/// Close the idle connections to `addr` (the coordinator changed: the next request opens anew).
pub fn forget(addr: &str) {
    if let Some(p) = pool().as_mut() {
        p.retain(|(a, _), _| a != addr);
    }
}

fn idle_limit() -> Duration {
    Duration::from_millis(IDLE_LIMIT_MS.load(Ordering::SeqCst))
}

fn pool() -> MutexGuard<'static, Option<Idle>> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One control connection in option haggling (inside TLS when the pool key says so).
struct Conn {
    r: BufReader<NetReader>,
    w: BufWriter<NetWriter>,
    idle_since: Instant,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Best effort and brief: the server ends the session at once on NBD_OPT_ABORT.
        let _ = self
            .w
            .get_ref()
            .tcp()
            .set_write_timeout(Some(Duration::from_millis(100)));
        if client::send_option(&mut self.w, OPT_ABORT, &[]).is_ok() {
            self.w.get_mut().close();
        }
    }
}

/// How a request on a connection failed.
enum Failure {
    /// Before the server can have taken the request in (sending failed, or the connection
    /// ended before the first byte of the reply): safe to send again.
    NotTaken(ClientError),
    /// Anything else (a timeout, a broken reply, a refusal).
    Other(ClientError),
}

/// Send one control request to the node at `addr` and return the reply's bytes, on a kept
/// connection when one is idle, else on a new one (kept afterwards).
pub fn exchange(
    addr: &str,
    request: &[u8],
    timeout: Duration,
    tls: Option<&ClientTls>,
) -> Result<Vec<u8>, ClientError> {
    let key = (addr.to_owned(), tls.is_some());
    if let Some(mut conn) = take_idle(&key) {
        match conn.exchange(request, timeout) {
            Ok(reply) => {
                put_back(key, conn);
                return Ok(reply);
            }
            Err(Failure::NotTaken(_)) => {}
            Err(Failure::Other(e)) => return Err(e),
        }
    }
    let mut conn = Conn::open(addr, timeout, tls)?;
    match conn.exchange(request, timeout) {
        Ok(reply) => {
            put_back(key, conn);
            Ok(reply)
        }
        Err(Failure::NotTaken(e) | Failure::Other(e)) => Err(e),
    }
}

/// An idle connection to `key` still young enough and not closed by the server; older ones go.
fn take_idle(key: &(String, bool)) -> Option<Conn> {
    let limit = idle_limit();
    let mut closed = Vec::new();
    let found = {
        let mut g = pool();
        let p = g.get_or_insert_with(HashMap::new);
        // Every node's stale connections go, not only this one's.
        for conns in p.values_mut() {
            let (keep, old) = conns
                .drain(..)
                .partition(|c: &Conn| c.idle_since.elapsed() < limit);
            *conns = keep;
            closed.extend(old);
        }
        p.retain(|_, v| !v.is_empty());
        let mut found = None;
        if let Some(conns) = p.get_mut(key) {
            while let Some(c) = conns.pop() {
                if c.looks_open() {
                    found = Some(c);
                    break;
                }
                closed.push(c);
            }
        }
        found
    };
    // Closed outside the pool's lock (each sends NBD_OPT_ABORT).
    drop(closed);
    found
}

fn put_back(key: (String, bool), mut conn: Conn) {
    if idle_limit().is_zero() {
        return;
    }
    conn.idle_since = Instant::now();
    let mut g = pool();
    let conns = g.get_or_insert_with(HashMap::new).entry(key).or_default();
    if conns.len() < MAX_IDLE_PER_NODE {
        conns.push(conn);
    } else {
        drop(g);
        drop(conn);
    }
}

impl Conn {
    /// Connect, greeting, client flags and, with `tls`, `NBD_OPT_STARTTLS` and the handshake
    /// (tern-nbd's option channel).
    fn open(addr: &str, timeout: Duration, tls: Option<&ClientTls>) -> Result<Conn, ClientError> {
        let (r, w) = client::option_channel(addr, timeout, tls, 16 * 1024)?;
        OPENED.fetch_add(1, Ordering::SeqCst);
        Ok(Conn {
            r,
            w,
            idle_since: Instant::now(),
        })
    }

    /// Whether the server has not closed the connection (a non-blocking peek at the socket).
    fn looks_open(&self) -> bool {
        if !self.r.buffer().is_empty() {
            // Bytes nobody asked for: the connection is out of step.
            return false;
        }
        let tcp = self.r.get_ref().tcp();
        if tcp.set_nonblocking(true).is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        let open = match tcp.peek(&mut b) {
            Ok(0) => false,
            // TLS records (a session ticket) may come unasked; plain bytes may not.
            Ok(_) => self.r.get_ref().is_tls(),
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        };
        tcp.set_nonblocking(false).is_ok() && open
    }

    /// One request and its reply.
    fn exchange(&mut self, request: &[u8], timeout: Duration) -> Result<Vec<u8>, Failure> {
        let tcp = self.r.get_ref().tcp();
        tcp.set_read_timeout(Some(timeout))
            .and_then(|()| tcp.set_write_timeout(Some(timeout)))
            .map_err(|e| Failure::Other(e.into()))?;
        client::send_option(&mut self.w, OPT_TERN_CONTROL, request).map_err(|e| {
            if is_timeout(&e) {
                Failure::Other(e.into())
            } else {
                Failure::NotTaken(e.into())
            }
        })?;
        match self.r.fill_buf() {
            Ok([]) => {
                return Err(Failure::NotTaken(
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the node closed the connection",
                    )
                    .into(),
                ));
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return Err(Failure::Other(e.into())),
            Err(e) => return Err(Failure::NotTaken(e.into())),
        }
        let (reply, data) = client::recv_option(&mut self.r, OPT_TERN_CONTROL, MAX_CONTROL_REPLY)
            .map_err(Failure::Other)?;
        if reply != REP_TERN_CONTROL {
            return Err(Failure::Other(ClientError::Protocol(format!(
                "unexpected control reply {reply:#x}"
            ))));
        }
        Ok(data)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use tern_nbd::proto::{
        FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, NBDMAGIC, OPT_REPLY_MAGIC,
    };

    fn rd32(r: &mut impl Read) -> io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn rd64(r: &mut impl Read) -> io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// A scripted plain server: greets, then answers each control request on a connection with
    /// its data reversed; on connection 1, the second request is read and the connection closed
    /// without a reply (the server going away as the request arrives).
    fn scripted_server() -> (String, std::thread::JoinHandle<usize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let mut connections = 0;
            for s in l.incoming() {
                connections += 1;
                let mut s = s.unwrap();
                s.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
                s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
                s.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
                    .unwrap();
                rd32(&mut s).unwrap();
                let mut answered = 0;
                loop {
                    if rd64(&mut s).is_err() {
                        break;
                    }
                    let option = rd32(&mut s).unwrap();
                    let mut data = vec![0u8; rd32(&mut s).unwrap() as usize];
                    s.read_exact(&mut data).unwrap();
                    if option == OPT_ABORT {
                        break;
                    }
                    if connections == 1 && answered == 1 {
                        break;
                    }
                    data.reverse();
                    let mut rep = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
                    rep.extend_from_slice(&option.to_be_bytes());
                    rep.extend_from_slice(&REP_TERN_CONTROL.to_be_bytes());
                    rep.extend_from_slice(&(data.len() as u32).to_be_bytes());
                    rep.extend_from_slice(&data);
                    s.write_all(&rep).unwrap();
                    answered += 1;
                }
                if connections == 2 {
                    return connections;
                }
            }
            connections
        });
        (addr, h)
    }

    #[test]
    fn a_request_the_server_closed_on_unanswered_is_sent_again_on_a_new_connection() {
        let (addr, server) = scripted_server();
        let t = Duration::from_secs(5);
        assert_eq!(exchange(&addr, b"abc", t, None).unwrap(), b"cba");
        // Kept: the second request goes on the same connection, which the server closes
        // without answering; it is sent again on a second connection and answered there.
        assert_eq!(exchange(&addr, b"xyz", t, None).unwrap(), b"zyx");
        forget(&addr);
        assert_eq!(server.join().unwrap(), 2, "two connections in all");
    }
}

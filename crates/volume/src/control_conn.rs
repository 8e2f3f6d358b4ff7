//! Kept-alive control connections: the process's control requests to a node (lease renewals,
//! forwarded requests, status) reuse an open connection instead of a new TCP connection and TLS
//! handshake each.
//!
//! A control request is an NBD option ([`OPT_TERN_CONTROL`]) sent during option haggling, which
//! the server answers and then waits for the next option; so one connection carries any number
//! of requests, one at a time. The pool keeps, per node address (and plain or TLS), the
//! connections that are idle: a request takes one (or opens one), sends, reads the reply and
//! puts it back. A connection idle longer than the idle limit ([`set_idle_limit`], 5 s by
//! default; a node lowers it to half its server's handshake deadline, [`keep_idle_below`], since
//! the server closes a connection idle in option haggling after that deadline, restarted after
//! each request) is closed rather than reused.
//!
//! **Age cap.** A connection opened more than [`set_max_age`] ago (50 s by default) is closed at
//! its next use instead of carrying the request, however busy it is: renewals every TTL/4 would
//! otherwise keep it open forever, and certificates (and their revocation) are checked only at
//! the TLS handshake. So a revoked certificate's connections are given up within the cap, and
//! the next handshake meets the server's current revocation list. The server enforces the same
//! on its side for clients that do not keep to this: a connection still in option haggling
//! 60 s after it was accepted (`tern_nbd::ListenerOptions::max_option_age`) has its next
//! request answered `NBD_REP_ERR_SHUTDOWN`, not carried out, and is closed. Our cap stays below
//! the server's (the server counts from accept, before the TLS handshake), so a client that
//! keeps to it does not meet the refusal; when it does anyway (a server with a lower limit), the
//! request is sent again on a new connection, whatever it is, since the server did not carry it
//! out.
//!
//! **Nothing about fencing rides on the connection.** The receiver decides every request on its
//! own state when it reads it (a deposed coordinator answers `not_coordinator`, a stale epoch is
//! refused), exactly as on a new connection; a node drops its pooled connections to the old
//! coordinator when the coordinator changes ([`forget`]).
//!
//! **Resending.** A reused connection may have been closed by the server meanwhile (its handshake
//! deadline, a restart); one seen closed before sending is not used. When sending on a reused
//! connection fails, or it ends (EOF, reset) before the first byte of the reply, the server may
//! still have executed the request: it can have read the request whole and then crashed before
//! replying, or its handshake deadline can have shut the socket down just after it read the
//! request (the request is still executed, its reply lost). So only an idempotent request
//! (`resend`, [`crate::control::Request::is_idempotent`]: running it twice leaves the state and
//! the answer of running it once) is sent once more on a new connection; any other gets the
//! error, as when every request had its own connection. A timeout, or a failure after the reply
//! began, is returned as is.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, BufWriter};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tern_nbd::ClientError;
use tern_nbd::client;
use tern_nbd::proto::{
    MAX_CONTROL_REPLY, OPT_ABORT, OPT_TERN_CONTROL, REP_ERR_SHUTDOWN, REP_TERN_CONTROL,
};
use tern_nbd::tls::{ClientTls, NetReader, NetWriter};

/// Default of [`set_idle_limit`].
pub const DEFAULT_IDLE_LIMIT: Duration = Duration::from_secs(5);

/// Default of [`set_max_age`]: below the servers' own limit on a connection's option haggling
/// (`tern_nbd::server::DEFAULT_MAX_OPTION_AGE`, 60 s), so a kept connection is given up before
/// a server refuses it.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(50);

const _: () = assert!(
    DEFAULT_MAX_AGE.as_millis() + 5_000 <= tern_nbd::server::DEFAULT_MAX_OPTION_AGE.as_millis(),
    "the client's age cap must stay well below the server's option age"
);

/// Idle connections kept per node address; more are closed when they come back.
const MAX_IDLE_PER_NODE: usize = 8;

/// The idle limit in milliseconds ([`set_idle_limit`]).
static IDLE_LIMIT_MS: AtomicU64 = AtomicU64::new(DEFAULT_IDLE_LIMIT.as_millis() as u64);

/// The age cap in milliseconds ([`set_max_age`]).
static MAX_AGE_MS: AtomicU64 = AtomicU64::new(DEFAULT_MAX_AGE.as_millis() as u64);

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

/// Lower the idle limit to half of `server_deadline` if it is above that: a node calls it with
/// its own server's handshake deadline (the cluster's nodes share `--handshake-timeout-ms`), so
/// a kept connection is never used near the moment the peer's deadline closes it.
pub fn keep_idle_below(server_deadline: Duration) {
    let half = (server_deadline / 2).as_millis() as u64;
    IDLE_LIMIT_MS.fetch_min(half, Ordering::SeqCst);
    if half == 0 {
        drop(pool().take());
    }
}

/// Close a connection opened more than `age` ago at its next use instead of reusing it, however
/// recently it was used (certificates are checked only when a connection is opened).
pub fn set_max_age(age: Duration) {
    MAX_AGE_MS.store(age.as_millis() as u64, Ordering::SeqCst);
}

/// How many control connections this process has opened.
pub fn opened_connections() -> u64 {
    OPENED.load(Ordering::SeqCst)
}

/// Close the idle connections to `addr` (the coordinator changed: the next request opens anew).
pub fn forget(addr: &str) {
    let mut closed = Vec::new();
    if let Some(p) = pool().as_mut() {
        p.retain(|(a, _), conns| {
            if a == addr {
                closed.append(conns);
            }
            a != addr
        });
    }
    // Closed outside the pool's lock (each sends NBD_OPT_ABORT).
    drop(closed);
}

fn idle_limit() -> Duration {
    Duration::from_millis(IDLE_LIMIT_MS.load(Ordering::SeqCst))
}

fn max_age() -> Duration {
    Duration::from_millis(MAX_AGE_MS.load(Ordering::SeqCst))
}

/// Whether a kept connection may carry another request: idle for less than `idle_limit` and
/// opened less than `max_age` ago.
fn reusable(idle: Duration, age: Duration, idle_limit: Duration, max_age: Duration) -> bool {
    idle < idle_limit && age < max_age
}

fn pool() -> MutexGuard<'static, Option<Idle>> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One control connection in option haggling (inside TLS when the pool key says so).
struct Conn {
    r: BufReader<NetReader>,
    w: BufWriter<NetWriter>,
    idle_since: Instant,
    opened_at: Instant,
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
    /// Sending failed, or the connection ended before the first byte of the reply: the server
    /// may or may not have executed the request (it may have read it whole and then crashed, or
    /// been shut down by its handshake deadline before replying).
    Closed(ClientError),
    /// The server answered `NBD_REP_ERR_SHUTDOWN`: it did not carry the request out and closes
    /// the connection (Tern's server: the connection was in option haggling longer than it
    /// allows).
    NotCarriedOut(ClientError),
    /// Anything else (a timeout, a broken reply, a refusal).
    Other(ClientError),
}

/// Send one control request to the node at `addr` and return the reply's bytes, on a kept
/// connection when one is idle, else on a new one (kept afterwards). `resend`: the request is
/// idempotent, so when a kept connection fails or ends before the reply begins, it is sent once
/// more on a new connection; otherwise that error is returned. A request the server refused
/// on a kept connection without carrying it out (`NBD_REP_ERR_SHUTDOWN`: the connection is too
/// old for it) is sent again on a new connection whatever it is.
pub fn exchange(
    addr: &str,
    request: &[u8],
    timeout: Duration,
    tls: Option<&ClientTls>,
    resend: bool,
) -> Result<Vec<u8>, ClientError> {
    let key = (addr.to_owned(), tls.is_some());
    if let Some(mut conn) = take_idle(&key) {
        match conn.exchange(request, timeout) {
            Ok(reply) => {
                put_back(key, conn);
                return Ok(reply);
            }
            Err(Failure::Closed(_)) if resend => {}
            Err(Failure::NotCarriedOut(_)) => {}
            Err(Failure::Closed(e) | Failure::Other(e)) => return Err(e),
        }
    }
    let mut conn = Conn::open(addr, timeout, tls)?;
    match conn.exchange(request, timeout) {
        Ok(reply) => {
            put_back(key, conn);
            Ok(reply)
        }
        Err(Failure::Closed(e) | Failure::NotCarriedOut(e) | Failure::Other(e)) => Err(e),
    }
}

/// An idle connection to `key` not idle too long, not past the age cap and not closed by the
/// server; the others go.
fn take_idle(key: &(String, bool)) -> Option<Conn> {
    let (limit, age) = (idle_limit(), max_age());
    let mut closed = Vec::new();
    let found = {
        let mut g = pool();
        let p = g.get_or_insert_with(HashMap::new);
        // Every node's stale connections go, not only this one's.
        for conns in p.values_mut() {
            let (keep, old) = conns.drain(..).partition(|c: &Conn| {
                reusable(c.idle_since.elapsed(), c.opened_at.elapsed(), limit, age)
            });
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
    if idle_limit().is_zero() || conn.opened_at.elapsed() >= max_age() {
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
        let now = Instant::now();
        Ok(Conn {
            r,
            w,
            idle_since: now,
            opened_at: now,
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
                Failure::Closed(e.into())
            }
        })?;
        match self.r.fill_buf() {
            Ok([]) => {
                return Err(Failure::Closed(
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the node closed the connection",
                    )
                    .into(),
                ));
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return Err(Failure::Other(e.into())),
            Err(e) => return Err(Failure::Closed(e.into())),
        }
        let (reply, data) = client::recv_option(&mut self.r, OPT_TERN_CONTROL, MAX_CONTROL_REPLY)
            .map_err(|e| match e {
            ClientError::Refused {
                reply: REP_ERR_SHUTDOWN,
                ..
            } => Failure::NotCarriedOut(e),
            e => Failure::Other(e),
        })?;
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

    /// Requests a scripted server read: (connection number, request).
    type Seen = Vec<(usize, Vec<u8>)>;

    /// What the scripted server does with the second request on its first connection.
    #[derive(Clone, Copy)]
    enum Second {
        /// Reads it and closes without a reply (the server going away, or its deadline
        /// firing, once it has read the request).
        Close,
        /// Answers `NBD_REP_ERR_SHUTDOWN` and closes (the connection is past the server's
        /// option age: the request was not carried out).
        RefuseAsTooOld,
    }

    /// A scripted plain server: greets, then answers each control request on a connection with
    /// its data reversed; on connection 1, the second request gets `second`. Returns every
    /// request it carried out, with the connection (1, 2) it came on.
    fn scripted_server(second: Second) -> (String, std::thread::JoinHandle<Seen>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let mut connections = 0;
            let mut seen = Vec::new();
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
                        match second {
                            Second::Close => seen.push((connections, data.clone())),
                            Second::RefuseAsTooOld => {
                                let why = b"too old: not carried out";
                                let mut rep = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
                                rep.extend_from_slice(&option.to_be_bytes());
                                rep.extend_from_slice(&REP_ERR_SHUTDOWN.to_be_bytes());
                                rep.extend_from_slice(&(why.len() as u32).to_be_bytes());
                                rep.extend_from_slice(why);
                                s.write_all(&rep).unwrap();
                            }
                        }
                        break;
                    }
                    seen.push((connections, data.clone()));
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
                    break;
                }
            }
            seen
        });
        (addr, h)
    }

    #[test]
    fn an_idempotent_request_the_server_closed_on_unanswered_is_sent_again() {
        let (addr, server) = scripted_server(Second::Close);
        let t = Duration::from_secs(5);
        assert_eq!(exchange(&addr, b"abc", t, None, true).unwrap(), b"cba");
        // Kept: the second request goes on the same connection, which the server closes
        // without answering; it is sent again on a second connection and answered there.
        assert_eq!(exchange(&addr, b"xyz", t, None, true).unwrap(), b"zyx");
        forget(&addr);
        let seen = server.join().unwrap();
        assert_eq!(
            seen,
            [
                (1, b"abc".to_vec()),
                (1, b"xyz".to_vec()),
                (2, b"xyz".to_vec())
            ],
            "read on the kept connection, then again on a new one"
        );
    }

    #[test]
    fn another_request_the_server_closed_on_unanswered_is_not_sent_again() {
        let (addr, server) = scripted_server(Second::Close);
        let t = Duration::from_secs(5);
        assert_eq!(exchange(&addr, b"abc", t, None, false).unwrap(), b"cba");
        // The server read it and may have executed it: the error is returned, not a resend.
        let e = exchange(&addr, b"xyz", t, None, false).expect_err("no reply came");
        assert!(
            matches!(&e, ClientError::Io(io) if matches!(
                io.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            )),
            "{e:?}"
        );
        // The next request opens a new connection.
        assert_eq!(exchange(&addr, b"123", t, None, false).unwrap(), b"321");
        forget(&addr);
        let seen = server.join().unwrap();
        assert_eq!(
            seen,
            [
                (1, b"abc".to_vec()),
                (1, b"xyz".to_vec()),
                (2, b"123".to_vec())
            ],
            "the unanswered request was read once"
        );
    }

    #[test]
    fn any_request_the_server_refused_as_too_old_is_sent_again_on_a_new_connection() {
        let (addr, server) = scripted_server(Second::RefuseAsTooOld);
        let t = Duration::from_secs(5);
        assert_eq!(exchange(&addr, b"abc", t, None, false).unwrap(), b"cba");
        // Not idempotent, but the refusal says it was not carried out: sent again.
        assert_eq!(exchange(&addr, b"xyz", t, None, false).unwrap(), b"zyx");
        forget(&addr);
        let seen = server.join().unwrap();
        assert_eq!(
            seen,
            [(1, b"abc".to_vec()), (2, b"xyz".to_vec())],
            "carried out once, on the new connection"
        );
    }

    #[test]
    fn a_connection_is_reusable_only_within_the_idle_limit_and_the_age_cap() {
        let ms = Duration::from_millis;
        let (idle, age) = (ms(5000), ms(60_000));
        assert!(reusable(ms(10), ms(59_999), idle, age));
        assert!(!reusable(ms(10), ms(60_000), idle, age), "too old");
        assert!(!reusable(ms(5000), ms(10), idle, age), "idle too long");
        assert!(
            !reusable(ms(0), ms(0), Duration::ZERO, age),
            "keeping is off"
        );
    }
}

//! TLS for NBD (`NBD_OPT_STARTTLS`, x509 with client certificates) over blocking sockets.
//!
//! The NBD server reads a connection's requests on one thread while others write replies, and
//! the pipelining clients do the same the other way round; a TLS session, though, is one state
//! machine. [`split`] therefore makes a [`TlsReader`] and a [`TlsWriter`] that share the rustls
//! connection behind a lock held only while bytes are encrypted or decrypted, never while a
//! thread waits on the socket: the reader waits for ciphertext on its own handle of the socket,
//! the writer encrypts under the lock and sends the records under a second lock that keeps them
//! in order. [`NetReader`] and [`NetWriter`] are the two halves of either a plain or a TLS
//! connection, so the rest of the crate has one type for both.
//!
//! Who the peer is ([`PeerId`]) is left to the caller: [`ServerTls::identify`] turns the
//! verified peer certificate into a name and a role (the volume service uses tern-pki's
//! certificate layout), so this crate knows nothing about the cluster's naming.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

/// Who is on the other end of a TLS connection, from its verified certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerId {
    /// The certificate's name (its CN).
    pub name: String,
    /// Its role (`host`, `controller`, `user`: tern-pki's OU).
    pub role: String,
}

/// Turns the verified peer of a finished handshake into a [`PeerId`] (an error refuses it).
pub type Identify = dyn Fn(&rustls::CommonState) -> Result<PeerId, String> + Send + Sync;

/// A server's TLS settings: with them, TLS is required (plain clients are refused).
#[derive(Clone)]
pub struct ServerTls {
    /// The rustls configuration (it should require and verify client certificates).
    pub config: Arc<rustls::ServerConfig>,
    /// Names the peer from its certificate.
    pub identify: Arc<Identify>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

/// A client's TLS settings: `NBD_OPT_STARTTLS` is sent first and the server must accept it.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The rustls configuration (our certificate, the CA to verify the server against).
    pub config: Arc<rustls::ClientConfig>,
    /// The name the server's certificate must carry; `None`: the host part of the address.
    pub server_name: Option<ServerName<'static>>,
}

/// The name to check a server certificate against when [`ClientTls::server_name`] is unset:
/// the address without its port (an IP literal or a DNS name).
pub fn server_name_for(addr: &str) -> Result<ServerName<'static>, io::Error> {
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is not a host name or IP address for TLS: {e}"),
        )
    })
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Run a TLS handshake on `tcp` to its end, giving up at `deadline`.
fn handshake(
    conn: &mut rustls::Connection,
    tcp: &mut TcpStream,
    deadline: Instant,
) -> io::Result<()> {
    let old_r = tcp.read_timeout()?;
    let old_w = tcp.write_timeout()?;
    let res = (|| {
        while conn.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake did not finish in time",
                ));
            }
            tcp.set_read_timeout(Some(left))?;
            tcp.set_write_timeout(Some(left))?;
            let (rd, wr) = conn.complete_io(tcp)?;
            if rd == 0 && wr == 0 && conn.is_handshaking() && !conn.wants_write() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during the TLS handshake",
                ));
            }
        }
        // The last flight (a TLS 1.3 server's session tickets) goes out now.
        while conn.wants_write() {
            conn.write_tls(tcp)?;
        }
        Ok(())
    })();
    tcp.set_read_timeout(old_r)?;
    tcp.set_write_timeout(old_w)?;
    res
}

/// Server side: handshake on an accepted connection (after `NBD_OPT_STARTTLS` was answered),
/// then name the peer. Fails at `deadline`, on a certificate the configuration refuses, or
/// when [`ServerTls::identify`] refuses it.
pub fn accept(
    tls: &ServerTls,
    mut tcp: TcpStream,
    deadline: Instant,
) -> Result<(NetReader, NetWriter, PeerId), io::Error> {
    let mut conn: rustls::Connection = rustls::ServerConnection::new(Arc::clone(&tls.config))
        .map_err(tls_err)?
        .into();
    handshake(&mut conn, &mut tcp, deadline)?;
    let peer = (tls.identify)(&conn).map_err(|why| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("peer certificate refused: {why}"),
        )
    })?;
    let (r, w) = split(conn, tcp)?;
    Ok((r, w, peer))
}

/// Client side: handshake (after the server acknowledged `NBD_OPT_STARTTLS`).
pub fn connect(
    tls: &ClientTls,
    addr: &str,
    mut tcp: TcpStream,
    timeout: Duration,
) -> Result<(NetReader, NetWriter), io::Error> {
    let name = match &tls.server_name {
        Some(n) => n.clone(),
        None => server_name_for(addr)?,
    };
    let mut conn: rustls::Connection = rustls::ClientConnection::new(Arc::clone(&tls.config), name)
        .map_err(tls_err)?
        .into();
    handshake(&mut conn, &mut tcp, Instant::now() + timeout)?;
    split(conn, tcp)
}

struct Shared {
    conn: Mutex<rustls::Connection>,
    /// Held while records are sent, so they leave in the order they were made.
    send: Mutex<TcpStream>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Send every record the session has ready (taken under the session lock, sent after it).
    fn send_pending(&self) -> io::Result<()> {
        let mut tcp = lock(&self.send);
        let mut out = Vec::new();
        {
            let mut c = lock(&self.conn);
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
        }
        tcp.write_all(&out)
    }
}

/// Split an established TLS session into a reading and a writing half.
fn split(conn: rustls::Connection, tcp: TcpStream) -> io::Result<(NetReader, NetWriter)> {
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        send: Mutex::new(tcp.try_clone()?),
    });
    let r = TlsReader {
        tcp: tcp.try_clone()?,
        shared: Arc::clone(&shared),
        raw: vec![0u8; 64 * 1024],
        start: 0,
        end: 0,
        eof: false,
    };
    let w = TlsWriter { tcp, shared };
    Ok((NetReader::Tls(r), NetWriter::Tls(w)))
}

/// The reading half of a TLS session.
pub struct TlsReader {
    tcp: TcpStream,
    shared: Arc<Shared>,
    /// Ciphertext read from the socket and not yet given to the session.
    raw: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let (wants_write, fed) = {
                let mut c = lock(&self.shared.conn);
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                let fed = self.start < self.end;
                if fed {
                    let n = c.read_tls(&mut &self.raw[self.start..self.end])?;
                    self.start += n;
                    c.process_new_packets().map_err(tls_err)?;
                } else if self.eof {
                    // Tell the session the stream ended (its reader then says how: a clean
                    // close_notify, or an unexpected end).
                    c.read_tls(&mut &[][..])?;
                    c.process_new_packets().map_err(tls_err)?;
                    return match c.reader().read(buf) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            Err(io::ErrorKind::UnexpectedEof.into())
                        }
                        other => other,
                    };
                }
                (c.wants_write(), fed)
            };
            if wants_write {
                // An answer the session owes the peer (a key update, an alert).
                self.shared.send_pending()?;
            }
            if !fed && !self.eof {
                let n = self.tcp.read(&mut self.raw)?;
                self.start = 0;
                self.end = n;
                self.eof = n == 0;
            }
        }
    }
}

/// The writing half of a TLS session.
pub struct TlsWriter {
    tcp: TcpStream,
    shared: Arc<Shared>,
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut tcp = lock(&self.shared.send);
        let mut out = Vec::with_capacity(buf.len() + 256);
        let n = {
            let mut c = lock(&self.shared.conn);
            let n = c.writer().write(buf)?;
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
            n
        };
        tcp.write_all(&out)?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        // Every write sent its records already.
        Ok(())
    }
}

impl TlsWriter {
    /// Tell the peer we are done (a TLS close_notify), best effort.
    fn close(&mut self) {
        lock(&self.shared.conn).send_close_notify();
        let _ = self.shared.send_pending();
    }
}

/// The reading half of a connection, plain or TLS.
pub enum NetReader {
    /// Plain TCP.
    Plain(TcpStream),
    /// Inside TLS.
    Tls(TlsReader),
}

/// The writing half of a connection, plain or TLS.
pub enum NetWriter {
    /// Plain TCP.
    Plain(TcpStream),
    /// Inside TLS.
    Tls(TlsWriter),
}

impl std::fmt::Debug for TlsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReader")
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TlsWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsWriter")
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for NetReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetReader::Plain(s) => f.debug_tuple("Plain").field(s).finish(),
            NetReader::Tls(r) => f.debug_tuple("Tls").field(&r.tcp).finish(),
        }
    }
}

impl std::fmt::Debug for NetWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetWriter::Plain(s) => f.debug_tuple("Plain").field(s).finish(),
            NetWriter::Tls(w) => f.debug_tuple("Tls").field(&w.tcp).finish(),
        }
    }
}

impl NetReader {
    /// The socket underneath (for timeouts and shutdown).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            NetReader::Plain(s) => s,
            NetReader::Tls(r) => &r.tcp,
        }
    }
    /// Whether this is a TLS connection.
    pub fn is_tls(&self) -> bool {
        matches!(self, NetReader::Tls(_))
    }
}

impl NetWriter {
    /// The socket underneath (for timeouts and shutdown).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            NetWriter::Plain(s) => s,
            NetWriter::Tls(w) => &w.tcp,
        }
    }
    /// End the session (TLS: close_notify) and shut the socket for writing.
    pub fn close(&mut self) {
        if let NetWriter::Tls(w) = self {
            w.close();
        }
        let _ = self.tcp().shutdown(Shutdown::Write);
    }
}

impl Read for NetReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            NetReader::Plain(s) => s.read(buf),
            NetReader::Tls(r) => r.read(buf),
        }
    }
}

impl Write for NetWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            NetWriter::Plain(s) => s.write(buf),
            NetWriter::Tls(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            NetWriter::Plain(s) => s.flush(),
            NetWriter::Tls(w) => w.flush(),
        }
    }
}

/// Plain halves of a TCP connection.
pub fn plain(tcp: TcpStream) -> io::Result<(NetReader, NetWriter)> {
    Ok((NetReader::Plain(tcp.try_clone()?), NetWriter::Plain(tcp)))
}

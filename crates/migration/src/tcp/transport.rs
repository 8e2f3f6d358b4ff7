//! How migration streams are carried: plain TCP, or mutual TLS (rustls, certificates of the cluster
//! PKI, [`tern_pki`]); and how the target's listener tells the real source from anything else that
//! connects.
//!
//! # Mutual TLS
//!
//! With a [`TlsDir`] every stream — the control stream and each data stream — is its own TLS
//! connection. Both ends present a certificate chained to the cluster CA, with role `host`; the
//! source also checks that the target's certificate carries the name it expects. The handshake
//! completes and the peer's certificate is checked *before any frame is parsed*.
//!
//! The data streams are bound to the control stream's authenticated session twice over: each must
//! come from the same certificate (name) as the control stream, and must open with a `Join` carrying
//! the session token, a 64-bit random number the source sent inside the control stream's TLS (never
//! on the wire in clear).
//!
//! # The listener
//!
//! [`Acceptor`] accepts connections and runs each one's TLS handshake and first-frame read on its own
//! thread (at most [`ListenGuard::max_handshakes`] at once, each bounded by the handshake timeout),
//! so a silent or slow connection cannot hold up the real source. A connection that fails — plain
//! TCP on a TLS listener, a port scan that connects and closes, garbage bytes, a foreign CA, an
//! expired certificate, a `user` certificate, a `Join` with a foreign token — is reported through
//! [`ListenGuard::on_rejected`] and dropped, and the listener keeps waiting, up to
//! [`ListenGuard::max_rejected`] such connections and the caller's deadline. `accept` errors that
//! say "try again" (`EMFILE`, `ENFILE`, `ECONNABORTED`, `ENOBUFS`, ...) are retried after a pause,
//! never fatal.

use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver as ChanRx, Sender as ChanTx, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use tern_pki::rustls::{self, ClientConnection, ServerConnection, StreamOwned};
use tern_pki::{Identity, Role, TlsDir};

use crate::vm::GuestPages;
use crate::wire::{Frame, PageDataFrame, ReadFrameError, read_frame};

/// Bytes the TLS layer reads from the socket at once (rustls alone reads 4 KiB per call).
const SOCKET_READ_BUF: usize = 256 * 1024;
/// Pause after an `accept` error that says "try again" (no descriptors, no buffers...).
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The source's TLS settings: our certificate and the name the target's certificate must carry.
#[derive(Debug, Clone)]
pub struct TlsClient {
    /// Our `--tls-dir`.
    pub dir: Arc<TlsDir>,
    /// The target's name (a DNS SAN or IP SAN of its certificate), e.g. its node name.
    pub target_name: String,
}

impl TlsClient {
    /// From the PEM text of a `--tls-dir` (read by a process allowed to read the key) and the
    /// target's expected name. `dir` only labels errors.
    pub fn from_pem(
        dir: &str,
        ca_cert_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        target_name: &str,
    ) -> Result<TlsClient, tern_pki::LoadError> {
        Self::from_pem_with_crl(dir, ca_cert_pem, cert_pem, key_pem, None, target_name)
    }

    /// [`TlsClient::from_pem`] with the text of the directory's `ca-crl.pem` (`None`: it has
    /// none): a target whose certificate it lists is refused. No file is read.
    pub fn from_pem_with_crl(
        dir: &str,
        ca_cert_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        crl_pem: Option<&str>,
        target_name: &str,
    ) -> Result<TlsClient, tern_pki::LoadError> {
        let pem = tern_pki::PemFiles {
            ca_cert: ca_cert_pem.to_owned(),
            cert: cert_pem.to_owned(),
            key: key_pem.to_owned(),
        };
        let dir = std::path::Path::new(dir);
        Ok(TlsClient {
            dir: Arc::new(TlsDir::from_pem_with_crl(dir, &pem, crl_pem)?),
            target_name: target_name.to_owned(),
        })
    }
}

/// A connection the target's listener dropped, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The peer's address, when known.
    pub peer: Option<SocketAddr>,
    /// What was wrong, on one line.
    pub reason: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.peer {
            Some(p) => write!(f, "dropped a connection from {p}: {}", self.reason),
            None => write!(f, "dropped a connection: {}", self.reason),
        }
    }
}

/// Called for every connection the listener drops.
pub type RejectedLog = Arc<dyn Fn(&Rejected) + Send + Sync>;

/// How the target's listener treats connections.
#[derive(Clone)]
pub struct ListenGuard {
    /// `Some`: every stream must be mutual TLS from a `host` certificate of this CA; plain TCP is
    /// refused. `None`: plain TCP.
    pub tls: Option<Arc<TlsDir>>,
    /// Connections dropped before the receive gives up. Default 64.
    pub max_rejected: u32,
    /// Handshakes running at once; connections beyond are dropped at once. Default 16.
    pub max_handshakes: usize,
    /// Told about every dropped connection (logs). Default: nothing.
    pub on_rejected: Option<RejectedLog>,
}

impl Default for ListenGuard {
    fn default() -> Self {
        Self {
            tls: None,
            max_rejected: 64,
            max_handshakes: 16,
            on_rejected: None,
        }
    }
}

impl fmt::Debug for ListenGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenGuard")
            .field("tls", &self.tls.as_ref().map(|t| t.dir().to_owned()))
            .field("max_rejected", &self.max_rejected)
            .field("max_handshakes", &self.max_handshakes)
            .field("on_rejected", &self.on_rejected.is_some())
            .finish()
    }
}

/// The raw socket under rustls, read through a large buffer so that one `read` system call
/// carries many TLS records.
#[derive(Debug)]
pub(crate) struct BufSock(BufReader<TcpStream>);

impl Read for BufSock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for BufSock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_mut().write(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.get_mut().write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.get_mut().flush()
    }
}

/// One established stream, plain or TLS (either side).
#[derive(Debug)]
pub(crate) enum Conn {
    Plain(TcpStream),
    Server(Box<StreamOwned<ServerConnection, BufSock>>),
    Client(Box<StreamOwned<ClientConnection, BufSock>>),
}

impl Conn {
    /// The TCP socket underneath (timeouts, shutdown).
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Server(s) => s.sock.0.get_ref(),
            Conn::Client(s) => s.sock.0.get_ref(),
        }
    }

    /// A handle on the TCP socket that can shut it down from another thread.
    pub(crate) fn shutdown_handle(&self) -> io::Result<TcpStream> {
        self.tcp().try_clone()
    }

    /// Splits into a reader and a writer usable from two threads at once (the control stream).
    pub(crate) fn split(self) -> io::Result<(ConnReader, ConnWriter)> {
        match self {
            Conn::Plain(s) => {
                let w = s.try_clone()?;
                Ok((ConnReader::Plain(s), ConnWriter::Plain(w)))
            }
            Conn::Server(s) => {
                let (c, sock) = s.into_parts();
                split_tls(rustls::Connection::Server(c), sock)
            }
            Conn::Client(s) => {
                let (c, sock) = s.into_parts();
                split_tls(rustls::Connection::Client(c), sock)
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Server(s) => s.read(buf),
            Conn::Client(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Server(s) => s.write(buf),
            Conn::Client(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Server(s) => s.flush(),
            Conn::Client(s) => s.flush(),
        }
    }
}

/// A TLS connection shared by a reader thread and a writer. Lock order: `wire` before `conn`.
/// The reader blocks on the socket holding neither lock; the writer holds `wire` while it writes
/// to the socket but `conn` only while encrypting, so neither ever waits on the other's socket.
struct TlsShared {
    conn: Mutex<rustls::Connection>,
    wire: Mutex<TcpStream>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn split_tls(mut conn: rustls::Connection, sock: BufSock) -> io::Result<(ConnReader, ConnWriter)> {
    // Encrypt any amount in one call; the writer sends it at once.
    conn.set_buffer_limit(None);
    let leftover = sock.0.buffer().to_vec();
    let tcp = sock.0.into_inner();
    let shared = Arc::new(TlsShared {
        conn: Mutex::new(conn),
        wire: Mutex::new(tcp.try_clone()?),
    });
    let mut reader = TlsReader {
        tcp,
        shared: shared.clone(),
        raw: vec![0; SOCKET_READ_BUF].into_boxed_slice(),
        plain: Vec::new(),
        pos: 0,
    };
    // Bytes the handshake's buffered reads took from the socket but rustls has not seen yet.
    reader.feed(&leftover)?;
    Ok((
        ConnReader::Tls(Box::new(reader)),
        ConnWriter::Tls(TlsWriter { shared }),
    ))
}

/// The reading half of a split stream.
pub(crate) enum ConnReader {
    Plain(TcpStream),
    Tls(Box<TlsReader>),
}

impl Read for ConnReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ConnReader::Plain(s) => s.read(buf),
            ConnReader::Tls(r) => r.read(buf),
        }
    }
}

/// The writing half of a split stream.
pub(crate) enum ConnWriter {
    Plain(TcpStream),
    Tls(TlsWriter),
}

impl fmt::Debug for ConnWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnWriter::Plain(s) => write!(f, "Plain({s:?})"),
            ConnWriter::Tls(_) => f.write_str("Tls"),
        }
    }
}

impl ConnWriter {
    /// Shuts the socket down (both halves), ending the reader too.
    pub(crate) fn shutdown(&self) -> io::Result<()> {
        match self {
            ConnWriter::Plain(s) => s.shutdown(Shutdown::Both),
            ConnWriter::Tls(w) => lock(&w.shared.wire).shutdown(Shutdown::Both),
        }
    }
}

impl Write for ConnWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConnWriter::Plain(s) => s.write(buf),
            ConnWriter::Tls(w) => w.write_all(buf).map(|()| buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            ConnWriter::Plain(s) => s.flush(),
            ConnWriter::Tls(_) => Ok(()),
        }
    }
}

pub(crate) struct TlsReader {
    tcp: TcpStream,
    shared: Arc<TlsShared>,
    raw: Box<[u8]>,
    plain: Vec<u8>,
    pos: usize,
}

impl TlsReader {
    /// Hands `bytes` from the socket to rustls and collects the plaintext they carry.
    fn feed(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        let mut reply = false;
        {
            let mut c = lock(&self.shared.conn);
            loop {
                if !bytes.is_empty() {
                    c.read_tls(&mut bytes)?;
                }
                let state = c
                    .process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if state.plaintext_bytes_to_read() > 0 {
                    let at = self.plain.len();
                    self.plain.resize(at + state.plaintext_bytes_to_read(), 0);
                    c.reader().read_exact(&mut self.plain[at..])?;
                }
                reply |= c.wants_write();
                if bytes.is_empty() {
                    break;
                }
            }
        }
        if reply {
            // Alerts, key updates: sent in order with the writer's records.
            let mut wire = lock(&self.shared.wire);
            let mut out = Vec::new();
            {
                let mut c = lock(&self.shared.conn);
                while c.wants_write() {
                    c.write_tls(&mut out)?;
                }
            }
            wire.write_all(&out)?;
        }
        Ok(())
    }
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.plain.len() {
                let n = buf.len().min(self.plain.len() - self.pos);
                buf[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
                self.pos += n;
                if self.pos == self.plain.len() {
                    self.plain.clear();
                    self.pos = 0;
                }
                return Ok(n);
            }
            let n = match self.tcp.read(&mut self.raw) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                // The socket ended: clean after close_notify, else a truncation.
                let mut c = lock(&self.shared.conn);
                let _ = c.read_tls(&mut &[][..]);
                let _ = c.process_new_packets();
                return match c.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    Err(e) => Err(e),
                };
            }
            let raw = std::mem::take(&mut self.raw);
            let r = self.feed(&raw[..n]);
            self.raw = raw;
            r?;
        }
    }
}

pub(crate) struct TlsWriter {
    shared: Arc<TlsShared>,
}

impl TlsWriter {
    fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        let mut wire = lock(&self.shared.wire);
        let mut out = Vec::with_capacity(buf.len() + buf.len() / 512 + 64);
        {
            let mut c = lock(&self.shared.conn);
            c.writer().write_all(buf)?;
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
        }
        wire.write_all(&out)
    }
}

/// The source's sending half of one data stream, written without blocking by the thread that
/// builds the frames: no writer thread sits between the copy loop and the socket. Frames are
/// queued in order and written as far as the socket takes them (a frame may go out in several
/// parts); plain TCP writes the queued frames with one `writev`, TLS encrypts each frame into
/// rustls's buffer when it is queued (the frame's buffer is free at once) and writes the records
/// from there. The socket is non-blocking: [`wait_writable`] is how the caller waits.
pub(crate) struct DataSender {
    link: SendLink,
    /// Plain TCP: frames not yet wholly on the socket, with the bytes of each already written.
    queue: std::collections::VecDeque<Queued>,
    /// Bytes queued and not yet written (TLS: plaintext bytes, an estimate once records are
    /// partly out; exact at 0).
    queued: usize,
    /// Plain TCP with `PageData` frames: the guest memory their pages are written from.
    guest: Option<Arc<dyn GuestPages>>,
}

/// A frame in a [`DataSender`]'s queue: the first `len` bytes of `buf`, `done` of them written;
/// or, when `pages` is not empty, a `PageData` frame: its head in `buf`, then the 4096 bytes
/// of each page of `pages` read from guest memory as they are written (`len` in all).
struct Queued {
    buf: Vec<u8>,
    len: usize,
    done: usize,
    pages: Vec<u64>,
}

enum SendLink {
    Plain(TcpStream),
    Tls {
        conn: Box<ClientConnection>,
        tcp: TcpStream,
    },
}

/// Frames one `writev` carries at most.
const WRITEV_FRAMES: usize = 8;

impl DataSender {
    /// The sending half of a connected data stream (the source's side: plain or TLS client),
    /// its socket switched to non-blocking.
    pub(crate) fn new(conn: Conn) -> io::Result<Self> {
        let link = match conn {
            Conn::Plain(tcp) => SendLink::Plain(tcp),
            Conn::Client(s) => {
                let (mut conn, sock) = s.into_parts();
                conn.set_buffer_limit(None);
                // Bytes the handshake's buffered read took (session tickets) are not needed:
                // the source never reads a data stream.
                SendLink::Tls {
                    conn: Box::new(conn),
                    tcp: sock.0.into_inner(),
                }
            }
            Conn::Server(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a data stream's sender is the TLS client",
                ));
            }
        };
        let s = Self {
            link,
            queue: Default::default(),
            queued: 0,
            guest: None,
        };
        s.tcp().set_nonblocking(true)?;
        Ok(s)
    }

    /// The TCP socket underneath (shutdown, poll).
    pub(crate) fn tcp(&self) -> &TcpStream {
        match &self.link {
            SendLink::Plain(t) | SendLink::Tls { tcp: t, .. } => t,
        }
    }

    /// Bytes queued and not yet on the socket.
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// Whether anything is left to write.
    pub(crate) fn pending(&self) -> bool {
        match &self.link {
            SendLink::Plain(_) => !self.queue.is_empty(),
            SendLink::Tls { conn, .. } => conn.wants_write(),
        }
    }

    /// Queues the first `len` bytes of `buf` (one whole frame) after the frames queued before.
    /// Nothing is written yet ([`DataSender::drain`]); with TLS the frame is encrypted now and
    /// its buffer handed back in `free`.
    pub(crate) fn push(
        &mut self,
        buf: Vec<u8>,
        len: usize,
        free: &mut Vec<Vec<u8>>,
    ) -> io::Result<()> {
        let len = len.min(buf.len());
        match &mut self.link {
            SendLink::Plain(_) => self.queue.push_back(Queued {
                buf,
                len,
                done: 0,
                pages: Vec::new(),
            }),
            SendLink::Tls { conn, .. } => {
                conn.writer().write_all(&buf[..len])?;
                free.push(buf);
            }
        }
        self.queued += len;
        Ok(())
    }

    /// Sends `PageData` frames from `guest` ([`DataSender::push_in_place`]): plain TCP only.
    /// Returns whether the link takes them (false with TLS, whose records need the bytes).
    pub(crate) fn send_in_place(&mut self, guest: Arc<dyn GuestPages>) -> bool {
        match self.link {
            SendLink::Plain(_) => {
                self.guest = Some(guest);
                true
            }
            SendLink::Tls { .. } => false,
        }
    }

    /// Queues a sealed `PageData` frame: `head` (header, round, count, entries) and the data
    /// pages `pages`, written from guest memory when the socket takes them. Nothing is
    /// written yet ([`DataSender::drain`]). Only after [`DataSender::send_in_place`].
    pub(crate) fn push_in_place(&mut self, head: Vec<u8>, pages: Vec<u64>) -> io::Result<()> {
        if self.guest.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "page data in place on a link that does not send it",
            ));
        }
        let len = PageDataFrame::wire_len(&head, &pages);
        if pages.is_empty() {
            return self.push(head, len, &mut Vec::new());
        }
        self.queue.push_back(Queued {
            buf: head,
            len,
            done: 0,
            pages,
        });
        self.queued += len;
        Ok(())
    }

    /// Writes as much as the socket takes now without blocking; every buffer wholly written
    /// goes to `free`. Returns the bytes written (0: the socket is full, or nothing was queued).
    pub(crate) fn drain(&mut self, free: &mut Vec<Vec<u8>>) -> io::Result<usize> {
        let mut total = 0;
        match &mut self.link {
            SendLink::Plain(tcp) => {
                while let Some(front) = self.queue.front() {
                    let written = if front.pages.is_empty() {
                        // Frames in buffers, up to the next in-place frame: one writev.
                        let slices: Vec<io::IoSlice<'_>> = self
                            .queue
                            .iter()
                            .take(WRITEV_FRAMES)
                            .take_while(|q| q.pages.is_empty())
                            .map(|q| io::IoSlice::new(&q.buf[q.done..q.len]))
                            .collect();
                        tcp.write_vectored(&slices)
                    } else {
                        match &self.guest {
                            Some(g) => {
                                use std::os::fd::AsFd;
                                g.write_frame(tcp.as_fd(), &front.buf, &front.pages, front.done)
                            }
                            None => Err(io::ErrorKind::Unsupported.into()),
                        }
                    };
                    let n = match written {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    };
                    total += n;
                    self.queued = self.queued.saturating_sub(n);
                    let mut left = n;
                    while left > 0 {
                        let front = self.queue.front_mut().expect("written bytes were queued");
                        let step = left.min(front.len - front.done);
                        front.done += step;
                        left -= step;
                        if front.done == front.len {
                            let q = self.queue.pop_front().expect("front exists");
                            free.push(q.buf);
                        }
                    }
                }
            }
            SendLink::Tls { conn, tcp } => {
                while conn.wants_write() {
                    match conn.write_tls(tcp) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => {
                            total += n;
                            self.queued = self.queued.saturating_sub(n);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                if !conn.wants_write() {
                    self.queued = 0;
                }
            }
        }
        Ok(total)
    }
}

/// Waits up to `timeout` until a sender of `senders` with bytes left can take more (or its
/// socket failed: the next [`DataSender::drain`] reports the error). Returns at once when none
/// has bytes left.
pub(crate) fn wait_writable<'a>(
    senders: impl IntoIterator<Item = &'a DataSender>,
    timeout: Duration,
) -> io::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut fds: Vec<PollFd<'_>> = senders
        .into_iter()
        .filter(|s| s.pending())
        .map(|s| PollFd::new(s.tcp().as_fd(), PollFlags::POLLOUT))
        .collect();
    if fds.is_empty() {
        return Ok(());
    }
    let ms = u16::try_from(timeout.as_millis().max(1)).unwrap_or(u16::MAX);
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Opens one stream to the target: TCP, then (with `tls`) the handshake, the target's certificate
/// checked for role `host` and, when `expect` is given, for that exact identity. Returns the
/// stream and the target's identity (`None` in plain TCP).
pub(crate) fn connect(
    addr: &SocketAddr,
    tls: Option<&TlsClient>,
    expect: Option<&Identity>,
    timeout: Duration,
) -> io::Result<(Conn, Option<Identity>)> {
    let tcp = TcpStream::connect_timeout(addr, timeout)?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok((Conn::Plain(tcp), None));
    };
    let name = TlsDir::try_server_name(&tls.target_name)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let conn = ClientConnection::new(tls.dir.client_config(), name).map_err(io::Error::other)?;
    let mut s = StreamOwned::new(
        conn,
        BufSock(BufReader::with_capacity(SOCKET_READ_BUF, tcp)),
    );
    handshake(&mut s.conn, &mut s.sock, timeout)?;
    let id = tern_pki::peer_identity(&s.conn)
        .and_then(|id| id.require_role(Role::Host).map(|()| id))
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
    if let Some(want) = expect
        && *want != id
    {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("data stream reached {id}, not the control stream's {want}"),
        ));
    }
    s.conn.set_buffer_limit(None);
    Ok((Conn::Client(Box::new(s)), Some(id)))
}

/// A blocking handshake within `deadline`; the socket's timeouts are cleared after it.
fn handshake<D: rustls::SideData>(
    conn: &mut rustls::ConnectionCommon<D>,
    sock: &mut BufSock,
    deadline: Duration,
) -> io::Result<()> {
    let start = Instant::now();
    while conn.is_handshaking() || conn.wants_write() {
        let left = deadline.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("TLS handshake not complete within {deadline:?}"),
            ));
        }
        let tcp = sock.0.get_ref();
        tcp.set_read_timeout(Some(left))?;
        tcp.set_write_timeout(Some(left))?;
        let (rd, wr) = conn.complete_io(sock)?;
        if rd == 0 && wr == 0 && conn.is_handshaking() && !conn.wants_write() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed during the TLS handshake",
            ));
        }
    }
    let tcp = sock.0.get_ref();
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)?;
    Ok(())
}

/// A connection that passed the listener's checks: authenticated (with TLS) and with its first
/// frame read.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub(crate) conn: Conn,
    pub(crate) peer: SocketAddr,
    /// The source's certificate identity (`None` in plain TCP).
    pub(crate) identity: Option<Identity>,
    pub(crate) first: Frame,
}

/// Why the listener stopped waiting.
#[derive(Debug)]
pub(crate) enum AcceptFailure {
    /// `accept` failed in a way retrying cannot fix, or the deadline passed.
    Io(io::Error),
    /// Too many connections were dropped; the last reason.
    TooManyRejected(u32, String),
    Cancelled,
}

/// Accepts connections on the target's listener, handshakes each on its own thread, and yields
/// those that passed; the others are reported and dropped.
pub(crate) struct Acceptor<'l> {
    listener: &'l TcpListener,
    guard: ListenGuard,
    handshake_timeout: Duration,
    tx: ChanTx<Result<Accepted, Rejected>>,
    rx: ChanRx<Result<Accepted, Rejected>>,
    in_flight: usize,
    rejected: u32,
    last_transient: Option<Instant>,
}

impl<'l> Acceptor<'l> {
    pub(crate) fn new(
        listener: &'l TcpListener,
        guard: &ListenGuard,
        handshake_timeout: Duration,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let (tx, rx) = mpsc::channel();
        Ok(Self {
            listener,
            guard: guard.clone(),
            handshake_timeout,
            tx,
            rx,
            in_flight: 0,
            rejected: 0,
            last_transient: None,
        })
    }

    /// Connections dropped so far.
    pub(crate) fn rejected(&self) -> u32 {
        self.rejected
    }

    /// Reports and counts a connection dropped by the caller (e.g. a `Join` with a foreign token);
    /// fails once too many were.
    pub(crate) fn reject(&mut self, r: Rejected) -> Result<(), AcceptFailure> {
        if let Some(log) = &self.guard.on_rejected {
            log(&r);
        }
        self.rejected += 1;
        if self.rejected >= self.guard.max_rejected {
            return Err(AcceptFailure::TooManyRejected(self.rejected, r.reason));
        }
        Ok(())
    }

    /// The next connection that handshook and sent a first frame, before `deadline`.
    pub(crate) fn next(
        &mut self,
        deadline: Option<Instant>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Accepted, AcceptFailure> {
        loop {
            match self.rx.try_recv() {
                Ok(Ok(a)) => {
                    self.in_flight -= 1;
                    return Ok(a);
                }
                Ok(Err(r)) => {
                    self.in_flight -= 1;
                    self.reject(r)?;
                    continue;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
            }
            if cancelled() {
                return Err(AcceptFailure::Cancelled);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(AcceptFailure::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "timed out waiting for a connection",
                )));
            }
            match self.listener.accept() {
                Ok((tcp, peer)) => self.start(tcp, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) if accept_error_is_transient(&e) => {
                    // Out of descriptors or buffers, or the peer gave up before accept: wait and
                    // retry; report it at most once a second.
                    if self
                        .last_transient
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                    {
                        self.last_transient = Some(Instant::now());
                        if let Some(log) = &self.guard.on_rejected {
                            log(&Rejected {
                                peer: None,
                                reason: format!("accept failed ({e}); retrying"),
                            });
                        }
                    }
                    thread::sleep(ACCEPT_RETRY_PAUSE);
                }
                Err(e) => return Err(AcceptFailure::Io(e)),
            }
        }
    }

    fn start(&mut self, tcp: TcpStream, peer: SocketAddr) {
        if self.in_flight >= self.guard.max_handshakes {
            let _ = tcp.shutdown(Shutdown::Both);
            let r = Rejected {
                peer: Some(peer),
                reason: format!(
                    "{} handshakes already in progress (the limit)",
                    self.in_flight
                ),
            };
            if let Some(log) = &self.guard.on_rejected {
                log(&r);
            }
            return;
        }
        let tls = self.guard.tls.clone();
        let timeout = self.handshake_timeout;
        let tx = self.tx.clone();
        let spawned = thread::Builder::new()
            .name("migrate-accept".into())
            .spawn(move || {
                crate::thread_start::run();
                let r = admit(tcp, peer, tls.as_deref(), timeout).map_err(|reason| Rejected {
                    peer: Some(peer),
                    reason,
                });
                let _ = tx.send(r);
            });
        match spawned {
            Ok(_) => self.in_flight += 1,
            Err(e) => {
                if let Some(log) = &self.guard.on_rejected {
                    log(&Rejected {
                        peer: Some(peer),
                        reason: format!("cannot start a handshake thread: {e}"),
                    });
                }
            }
        }
    }
}

impl Drop for Acceptor<'_> {
    fn drop(&mut self) {
        let _ = self.listener.set_nonblocking(false);
    }
}

/// One accepted connection: the handshake (with TLS), the role check, the first frame, all within
/// `timeout`. Nothing the peer sends is parsed before its certificate was verified.
fn admit(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<&TlsDir>,
    timeout: Duration,
) -> Result<Accepted, String> {
    let start = Instant::now();
    // Blocking already: accept(2) does not pass the listener's O_NONBLOCK on (and an ioctl here
    // would be outside the migration threads' seccomp filter).
    let _ = tcp.set_nodelay(true);
    let (mut conn, identity) = match tls {
        None => (Conn::Plain(tcp), None),
        Some(tls) => {
            let c = ServerConnection::new(tls.server_config())
                .map_err(|e| format!("TLS set-up failed: {e}"))?;
            let mut s =
                StreamOwned::new(c, BufSock(BufReader::with_capacity(SOCKET_READ_BUF, tcp)));
            handshake(&mut s.conn, &mut s.sock, timeout)
                .map_err(|e| format!("TLS handshake failed: {}", tls_reason(&e)))?;
            let id = tern_pki::peer_identity(&s.conn)
                .and_then(|id| id.require_role(Role::Host).map(|()| id))
                .map_err(|e| format!("certificate refused: {e}"))?;
            (Conn::Server(Box::new(s)), Some(id))
        }
    };
    let left = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(1));
    conn.tcp()
        .set_read_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    let first = read_frame(&mut conn, None).map_err(|e| match e {
        ReadFrameError::Closed => "closed before its first frame".to_string(),
        e => format!("bad first frame: {}", crate::tcp::common::error_chain(&e)),
    })?;
    match &first {
        Frame::Hello(_) | Frame::Join { .. } => {}
        other => {
            return Err(format!(
                "first frame is {}, not hello or join",
                frame_name(other)
            ));
        }
    }
    conn.tcp()
        .set_read_timeout(None)
        .map_err(|e| e.to_string())?;
    Ok(Accepted {
        conn,
        peer,
        identity,
        first,
    })
}

fn frame_name(f: &Frame) -> String {
    let s = format!("{f:?}");
    s.split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("?")
        .to_owned()
}

fn tls_reason(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls @ rustls::Error::InvalidMessage(_)) => {
            format!("not TLS (plain TCP or garbage): {tls}")
        }
        Some(tls) => tls.to_string(),
        None if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
        ) =>
        {
            "the peer closed the connection during the handshake".into()
        }
        None => e.to_string(),
    }
}

/// Whether an `accept` error only means "try again later" (accept(2): the pending connection's
/// network errors, and running out of descriptors, buffers or memory).
pub(crate) fn accept_error_is_transient(e: &io::Error) -> bool {
    if matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted | io::ErrorKind::TimedOut
    ) {
        return true;
    }
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frame `k` of stream `s`: a length that varies from a few bytes to 96 KiB, and bytes that
    /// name the stream, the frame and the offset (so a lost, doubled or reordered part shows).
    fn frame(s: usize, k: usize) -> Vec<u8> {
        let len = 7 + (k * 7919) % (96 * 1024);
        (0..len)
            .map(|i| (s * 131 + k * 31 + i * 7 + i / 251) as u8)
            .collect()
    }

    /// A connected loopback pair with small socket buffers (the sender's tiny): the sender's side
    /// and the receiver's.
    fn tiny_pair() -> (TcpStream, TcpStream) {
        use nix::sys::socket::{setsockopt, sockopt};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (rx, _) = l.accept().unwrap();
        // As `connect` sets it: without, Nagle waits for delayed acknowledgements.
        tx.set_nodelay(true).unwrap();
        setsockopt(&tx, sockopt::SndBuf, &4096).unwrap();
        // The receiver keeps a window of at least one loopback segment (64 KiB): below, the
        // sender waits for its persist timer.
        setsockopt(&rx, sockopt::RcvBuf, &(128 * 1024)).unwrap();
        (tx, rx)
    }

    #[test]
    fn frames_written_without_blocking_arrive_whole_and_in_order_on_both_streams() {
        let (mut senders, mut readers) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            let (tx, mut rx) = tiny_pair();
            senders.push(DataSender::new(Conn::Plain(tx)).unwrap());
            // A slow reader: the socket fills, and writes go out in parts.
            readers.push(thread::spawn(move || {
                let (mut got, mut buf) = (Vec::new(), vec![0u8; 16 * 1024]);
                loop {
                    match rx.read(&mut buf).unwrap() {
                        0 => return got,
                        n => got.extend_from_slice(&buf[..n]),
                    }
                    thread::sleep(Duration::from_micros(300));
                }
            }));
        }
        const FRAMES: usize = 60;
        let (mut free, mut partial) = (Vec::new(), 0);
        let mut expected = vec![Vec::new(); 2];
        let drain_all = |senders: &mut Vec<DataSender>, free: &mut Vec<Vec<u8>>| {
            for s in senders.iter_mut() {
                s.drain(free).unwrap();
            }
        };
        for k in 0..FRAMES {
            let s = k % 2;
            let mut f = frame(s, k);
            expected[s].extend_from_slice(&f);
            // A buffer longer than its frame: only the first `len` bytes go out.
            let len = f.len();
            f.extend_from_slice(b"not part of the frame");
            senders[s].push(f, len, &mut free).unwrap();
            drain_all(&mut senders, &mut free);
            if senders[s].queued() > 0 {
                partial += 1;
            }
            while senders[s].queued() > 64 * 1024 {
                wait_writable(&senders, Duration::from_millis(20)).unwrap();
                drain_all(&mut senders, &mut free);
            }
        }
        while senders.iter().any(DataSender::pending) {
            wait_writable(&senders, Duration::from_millis(20)).unwrap();
            drain_all(&mut senders, &mut free);
        }
        assert!(senders.iter().all(|s| s.queued() == 0));
        // Every buffer came back once, when its frame was wholly written.
        assert_eq!(free.len(), FRAMES);
        assert!(
            partial > 0,
            "the tiny socket buffers never filled: nothing tested the partial writes"
        );
        drop(senders);
        for (s, r) in readers.into_iter().enumerate() {
            let got = r.join().unwrap();
            assert_eq!(got.len(), expected[s].len(), "stream {s}");
            assert!(got == expected[s], "stream {s}: bytes differ");
        }
    }

    #[test]
    fn waiting_on_senders_with_nothing_queued_returns_at_once() {
        let (tx, _rx) = tiny_pair();
        let s = DataSender::new(Conn::Plain(tx)).unwrap();
        let t = Instant::now();
        wait_writable([&s], Duration::from_secs(5)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_sender_whose_peer_closed_reports_the_error() {
        let (tx, rx) = tiny_pair();
        let mut s = DataSender::new(Conn::Plain(tx)).unwrap();
        drop(rx);
        let mut free = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = loop {
            assert!(Instant::now() < deadline, "no error after the peer closed");
            if let Err(e) = s.push(vec![1; 64 * 1024], 64 * 1024, &mut free) {
                break e;
            }
            if let Err(e) = s.drain(&mut free) {
                break e;
            }
            let _ = wait_writable([&s], Duration::from_millis(20));
        };
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{err}"
        );
    }

    #[test]
    fn descriptor_exhaustion_and_aborted_connections_are_retried() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ECONNABORTED,
            libc::ENOBUFS,
        ] {
            assert!(
                accept_error_is_transient(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for errno in [libc::EBADF, libc::EINVAL, libc::ENOTSOCK] {
            assert!(
                !accept_error_is_transient(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
    }
}

//! NBD clients: fixed-newstyle handshake with structured replies, then either one request at a
//! time ([`Client`]: each reply is awaited, so replies can never be matched to the wrong request)
//! or many in flight from any number of threads ([`SharedClient`]: replies matched by cookie).

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::proto::*;
use crate::tls::{self, ClientTls, NetReader, NetWriter};

/// Errors of a client operation.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed.
    #[error("NBD connection failed")]
    Io(#[from] io::Error),
    /// The server broke the protocol.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// The server refused an option (reply type given).
    #[error("NBD server refused option {option}: reply {reply:#x} {message:?}")]
    Refused {
        /// Option code.
        option: u32,
        /// Reply type.
        reply: u32,
        /// Server's message.
        message: String,
    },
    /// The server answered a request with an error.
    #[error("NBD server replied {0}")]
    Remote(Errno),
    /// The TLS handshake failed (the server's certificate was refused, or ours).
    #[error("TLS handshake with the NBD server failed")]
    Tls(#[source] io::Error),
    /// The request is outside what the export allows.
    #[error("Request outside the export (offset {offset}, length {length}, size {size})")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
        /// Export size.
        size: u64,
    },
}

/// A connected client in the transmission phase.
#[derive(Debug)]
pub struct Client {
    r: BufReader<NetReader>,
    w: BufWriter<NetWriter>,
    size: u64,
    flags: u16,
    structured: bool,
    next_cookie: u64,
}

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
fn rd16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

struct OptReply {
    reply: u32,
    data: Vec<u8>,
}

type Halves = (BufReader<NetReader>, BufWriter<NetWriter>);

fn open(addr: impl ToSocketAddrs) -> Result<Halves, ClientError> {
    let s = TcpStream::connect(addr)?;
    handshake_start(s, None, 256 * 1024)
}

fn open_timeout(
    addr: impl ToSocketAddrs,
    timeout: std::time::Duration,
    tls: Option<&ClientTls>,
) -> Result<Halves, ClientError> {
    option_channel(addr, timeout, tls, 256 * 1024)
}

/// The halves of a connection in the option phase: reads and writes buffered, over TLS when
/// it was asked for.
pub type OptionHalves = (BufReader<NetReader>, BufWriter<NetWriter>);

/// Connect within `timeout` (also set as the socket's read and write timeout), greet, and
/// with `tls` upgrade with `NBD_OPT_STARTTLS`: the connection is left in the option phase,
/// for [`send_option`] and [`recv_option`], with buffers of `buf_capacity` bytes. Used for
/// the private control requests by callers that keep such a connection open.
pub fn option_channel(
    addr: impl ToSocketAddrs,
    timeout: std::time::Duration,
    tls: Option<&ClientTls>,
    buf_capacity: usize,
) -> Result<OptionHalves, ClientError> {
    let sa = addr.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "address resolves to nothing")
    })?;
    let s = TcpStream::connect_timeout(&sa, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    handshake_start(s, tls.map(|t| (t, sa.to_string(), timeout)), buf_capacity)
}

/// Greeting and client flags; with `tls` (settings, the address as dialled, handshake
/// timeout), `NBD_OPT_STARTTLS` and the TLS handshake, so option haggling continues inside TLS.
fn handshake_start(
    s: TcpStream,
    tls: Option<(&ClientTls, String, Duration)>,
    buf_capacity: usize,
) -> Result<Halves, ClientError> {
    s.set_nodelay(true)?;
    let (r, w) = tls::plain(s)?;
    let mut r = BufReader::with_capacity(buf_capacity, r);
    let mut w = BufWriter::with_capacity(buf_capacity, w);
    if rd64(&mut r)? != NBDMAGIC || rd64(&mut r)? != IHAVEOPT {
        return Err(ClientError::Protocol("not a newstyle NBD server".into()));
    }
    let hflags = rd16(&mut r)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Protocol("server is not fixed-newstyle".into()));
    }
    let mut cflags = CLIENT_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= CLIENT_NO_ZEROES;
    }
    w.write_all(&cflags.to_be_bytes())?;
    let Some((tls, addr, timeout)) = tls else {
        w.flush()?;
        return Ok((r, w));
    };
    send_opt(&mut w, OPT_STARTTLS, &[])?;
    let rep = recv_opt(&mut r, OPT_STARTTLS)?;
    if rep.reply != REP_ACK || !r.buffer().is_empty() {
        return Err(ClientError::Protocol(format!(
            "unexpected STARTTLS reply {:#x}",
            rep.reply
        )));
    }
    let tcp = r.into_inner().tcp().try_clone()?;
    drop(w);
    let (r, w) = tls::connect(tls, &addr, tcp, timeout).map_err(ClientError::Tls)?;
    Ok((
        BufReader::with_capacity(buf_capacity, r),
        BufWriter::with_capacity(buf_capacity, w),
    ))
}

/// Send option `option` with `data` and flush (on an [`option_channel`]).
pub fn send_option(w: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    send_opt(w, option, data)
}

/// Read the reply to `option`: its reply type and data. An error reply is
/// [`ClientError::Refused`] with the server's message; a reply for another option, or of more
/// than `max` bytes, is a protocol error.
pub fn recv_option(
    r: &mut impl Read,
    option: u32,
    max: u32,
) -> Result<(u32, Vec<u8>), ClientError> {
    let rep = recv_opt_max(r, option, max)?;
    Ok((rep.reply, rep.data))
}

fn send_opt(w: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&option.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)?;
    w.flush()
}

fn recv_opt(r: &mut impl Read, option: u32) -> Result<OptReply, ClientError> {
    recv_opt_max(r, option, MAX_OPTION_LEN)
}

fn recv_opt_max(r: &mut impl Read, option: u32, max: u32) -> Result<OptReply, ClientError> {
    if rd64(r)? != OPT_REPLY_MAGIC {
        return Err(ClientError::Protocol("bad option reply magic".into()));
    }
    let opt = rd32(r)?;
    let reply = rd32(r)?;
    let len = rd32(r)?;
    if opt != option {
        return Err(ClientError::Protocol(format!(
            "reply for option {opt}, expected {option}"
        )));
    }
    if len > max {
        return Err(ClientError::Protocol(format!(
            "option reply of {len} bytes"
        )));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data)?;
    if reply & REP_FLAG_ERROR != 0 {
        return Err(ClientError::Refused {
            option,
            reply,
            message: String::from_utf8_lossy(&data).into_owned(),
        });
    }
    Ok(OptReply { reply, data })
}

/// List the exports of a server.
pub fn list_exports(addr: impl ToSocketAddrs) -> Result<Vec<String>, ClientError> {
    list_from(open(addr)?)
}

/// [`list_exports`] over TLS, with `timeout` on connecting and each read and write.
pub fn list_exports_tls(
    addr: impl ToSocketAddrs,
    tls: &ClientTls,
    timeout: Duration,
) -> Result<Vec<String>, ClientError> {
    list_from(open_timeout(addr, timeout, Some(tls))?)
}

fn list_from((mut r, mut w): Halves) -> Result<Vec<String>, ClientError> {
    send_opt(&mut w, OPT_LIST, &[])?;
    let mut names = Vec::new();
    loop {
        let rep = recv_opt(&mut r, OPT_LIST)?;
        match rep.reply {
            REP_ACK => break,
            REP_SERVER if rep.data.len() >= 4 => {
                let n = be32(&rep.data[0..4]) as usize;
                let name = rep
                    .data
                    .get(4..4 + n)
                    .ok_or_else(|| ClientError::Protocol("short LIST reply".into()))?;
                names.push(String::from_utf8_lossy(name).into_owned());
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "unexpected LIST reply {other}"
                )));
            }
        }
    }
    send_opt(&mut w, OPT_ABORT, &[])?;
    Ok(names)
}

/// Send one private control request ([`OPT_TERN_CONTROL`]) and return the reply bytes.
pub fn control(
    addr: impl ToSocketAddrs,
    request: &[u8],
    timeout: std::time::Duration,
) -> Result<Vec<u8>, ClientError> {
    control_tls(addr, request, timeout, None)
}

/// [`control`], over TLS when `tls` is given.
pub fn control_tls(
    addr: impl ToSocketAddrs,
    request: &[u8],
    timeout: std::time::Duration,
    tls: Option<&ClientTls>,
) -> Result<Vec<u8>, ClientError> {
    let (mut r, mut w) = open_timeout(addr, timeout, tls)?;
    send_opt(&mut w, OPT_TERN_CONTROL, request)?;
    let rep = recv_opt_max(&mut r, OPT_TERN_CONTROL, MAX_CONTROL_REPLY)?;
    if rep.reply != REP_TERN_CONTROL {
        return Err(ClientError::Protocol(format!(
            "unexpected control reply {}",
            rep.reply
        )));
    }
    let _ = send_opt(&mut w, OPT_ABORT, &[]);
    Ok(rep.data)
}

impl Client {
    /// Connect, negotiate structured replies and select `export` with `NBD_OPT_GO`.
    pub fn connect(addr: impl ToSocketAddrs, export: &str) -> Result<Client, ClientError> {
        Client::go(open(addr)?, export)
    }

    /// Like [`Client::connect`], with a timeout on connecting and on every later read and write.
    pub fn connect_timeout(
        addr: impl ToSocketAddrs,
        export: &str,
        timeout: std::time::Duration,
    ) -> Result<Client, ClientError> {
        Client::go(open_timeout(addr, timeout, None)?, export)
    }

    /// [`Client::connect_timeout`], over TLS when `tls` is given (`NBD_OPT_STARTTLS` first).
    pub fn connect_tls(
        addr: impl ToSocketAddrs,
        export: &str,
        timeout: std::time::Duration,
        tls: Option<&ClientTls>,
    ) -> Result<Client, ClientError> {
        Client::go(open_timeout(addr, timeout, tls)?, export)
    }

    fn go(halves: Halves, export: &str) -> Result<Client, ClientError> {
        Client::go_with(halves, export, true)
    }

    fn go_with(
        (mut r, mut w): Halves,
        export: &str,
        want_structured: bool,
    ) -> Result<Client, ClientError> {
        let structured = want_structured && {
            send_opt(&mut w, OPT_STRUCTURED_REPLY, &[])?;
            recv_opt(&mut r, OPT_STRUCTURED_REPLY)?.reply == REP_ACK
        };
        let go = encode_go(&GoRequest {
            name: export.to_owned(),
            infos: vec![INFO_BLOCK_SIZE],
        });
        send_opt(&mut w, OPT_GO, &go)?;
        let mut export_info = None;
        loop {
            let rep = recv_opt(&mut r, OPT_GO)?;
            match rep.reply {
                REP_ACK => break,
                REP_INFO if rep.data.len() >= 2 => {
                    if be16(&rep.data[0..2]) == INFO_EXPORT && rep.data.len() == 12 {
                        export_info = Some((be64(&rep.data[2..10]), be16(&rep.data[10..12])));
                    }
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected GO reply {other}"
                    )));
                }
            }
        }
        let (size, flags) = export_info
            .ok_or_else(|| ClientError::Protocol("GO finished without NBD_INFO_EXPORT".into()))?;
        Ok(Client {
            r,
            w,
            size,
            flags,
            structured,
            next_cookie: 1,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags the server sent.
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), ClientError> {
        match offset.checked_add(length) {
            Some(e) if e <= self.size && length <= u64::from(MAX_REQUEST_LEN) => Ok(()),
            _ => Err(ClientError::OutOfRange {
                offset,
                length,
                size: self.size,
            }),
        }
    }

    fn send(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> Result<u64, ClientError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let h = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.w.write_all(&h.encode())?;
        self.w.write_all(data)?;
        self.w.flush()?;
        Ok(cookie)
    }

    /// Send a request header without checks (for tests of the server's validation).
    pub fn raw_request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> Result<(), ClientError> {
        let cookie = self.send(Command::from_code(command), flags, offset, length, &[])?;
        self.simple_status(cookie)
    }

    fn simple_status(&mut self, cookie: u64) -> Result<(), ClientError> {
        let magic = rd32(&mut self.r)?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let err = rd32(&mut self.r)?;
                let c = rd64(&mut self.r)?;
                if c != cookie {
                    return Err(ClientError::Protocol(format!(
                        "reply cookie {c}, expected {cookie}"
                    )));
                }
                if err != 0 {
                    Err(ClientError::Remote(Errno::from_code(err)))
                } else {
                    Ok(())
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut result = Ok(());
                loop {
                    let (flags, kind, payload) = self.chunk(cookie)?;
                    if kind & 0x8000 != 0 {
                        result = Err(ClientError::Remote(chunk_errno(&payload)?));
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return result;
                    }
                    if rd32(&mut self.r)? != STRUCTURED_REPLY_MAGIC {
                        return Err(ClientError::Protocol("bad chunk magic".into()));
                    }
                }
            }
            m => Err(ClientError::Protocol(format!("bad reply magic {m:#x}"))),
        }
    }

    /// Read one structured chunk after its magic. Payloads are bounded by the request size.
    fn chunk(&mut self, cookie: u64) -> Result<(u16, u16, Vec<u8>), ClientError> {
        let flags = rd16(&mut self.r)?;
        let kind = rd16(&mut self.r)?;
        let c = rd64(&mut self.r)?;
        let len = rd32(&mut self.r)?;
        if c != cookie {
            return Err(ClientError::Protocol(format!(
                "chunk cookie {c}, expected {cookie}"
            )));
        }
        if len > MAX_REQUEST_LEN + 64 {
            return Err(ClientError::Protocol(format!("chunk of {len} bytes")));
        }
        let mut payload = vec![0u8; len as usize];
        self.r.read_exact(&mut payload)?;
        Ok((flags, kind, payload))
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        self.check_range(offset, buf.len() as u64)?;
        let cookie = self.send(Command::Read, 0, offset, buf.len() as u32, &[])?;
        let magic = rd32(&mut self.r)?;
        if magic == SIMPLE_REPLY_MAGIC {
            let err = rd32(&mut self.r)?;
            let c = rd64(&mut self.r)?;
            if c != cookie {
                return Err(ClientError::Protocol("reply cookie mismatch".into()));
            }
            if err != 0 {
                return Err(ClientError::Remote(Errno::from_code(err)));
            }
            self.r.read_exact(buf)?;
            return Ok(());
        }
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(ClientError::Protocol(format!("bad reply magic {magic:#x}")));
        }
        let mut result = Ok(());
        loop {
            let (flags, kind, payload) = self.chunk(cookie)?;
            match kind {
                REPLY_TYPE_OFFSET_DATA if payload.len() >= 8 => {
                    let at = be64(&payload[0..8]);
                    let data = &payload[8..];
                    let start = at.checked_sub(offset).map(|s| s as usize);
                    match start {
                        Some(s) if s.checked_add(data.len()).is_some_and(|e| e <= buf.len()) => {
                            buf[s..s + data.len()].copy_from_slice(data)
                        }
                        _ => {
                            return Err(ClientError::Protocol(
                                "data chunk outside the request".into(),
                            ));
                        }
                    }
                }
                REPLY_TYPE_OFFSET_HOLE if payload.len() == 12 => {
                    let at = be64(&payload[0..8]);
                    let n = be32(&payload[8..12]) as usize;
                    let start = at.checked_sub(offset).map(|s| s as usize);
                    match start {
                        Some(s) if s.checked_add(n).is_some_and(|e| e <= buf.len()) => {
                            buf[s..s + n].fill(0)
                        }
                        _ => {
                            return Err(ClientError::Protocol(
                                "hole chunk outside the request".into(),
                            ));
                        }
                    }
                }
                REPLY_TYPE_NONE => {}
                k if k & 0x8000 != 0 => result = Err(ClientError::Remote(chunk_errno(&payload)?)),
                k => return Err(ClientError::Protocol(format!("unexpected chunk type {k}"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return result;
            }
            if rd32(&mut self.r)? != STRUCTURED_REPLY_MAGIC {
                return Err(ClientError::Protocol("bad chunk magic".into()));
            }
        }
    }

    /// Write `data` at `offset` (with `fua`, durable when this returns).
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        self.check_range(offset, data.len() as u64)?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let cookie = self.send(Command::Write, flags, offset, data.len() as u32, data)?;
        self.simple_status(cookie)
    }

    /// Make every acknowledged write durable.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        let cookie = self.send(Command::Flush, 0, 0, 0, &[])?;
        self.simple_status(cookie)
    }

    /// Discard a range.
    pub fn trim(&mut self, offset: u64, length: u32) -> Result<(), ClientError> {
        self.check_range(offset, u64::from(length))?;
        let cookie = self.send(Command::Trim, 0, offset, length, &[])?;
        self.simple_status(cookie)
    }

    /// Write zeroes over a range.
    pub fn write_zeroes(&mut self, offset: u64, length: u32, fua: bool) -> Result<(), ClientError> {
        self.check_range(offset, u64::from(length))?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let cookie = self.send(Command::WriteZeroes, flags, offset, length, &[])?;
        self.simple_status(cookie)
    }

    /// Soft disconnect.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.send(Command::Disc, 0, 0, 0, &[])?;
        Ok(())
    }

    /// Whether structured replies were negotiated.
    pub fn structured(&self) -> bool {
        self.structured
    }
}

fn chunk_errno(payload: &[u8]) -> Result<Errno, ClientError> {
    if payload.len() < 6 {
        return Err(ClientError::Protocol("short error chunk".into()));
    }
    Ok(Errno::from_code(be32(&payload[0..4])))
}

/// What a pipelined request waits for: its reply's data (reads) or just its status.
type Outcome = Result<Vec<u8>, ClientError>;

/// What a waiting request is told: its outcome, or that it should read replies now.
enum Msg {
    Done(Outcome),
    TakeOver,
}

/// A request sent on a [`SharedClient`] whose reply has not fully arrived.
struct Waiter {
    tx: std::sync::mpsc::Sender<Msg>,
    offset: u64,
    /// Expected data length for a read (simple replies carry no length).
    read_len: Option<usize>,
    data: Vec<u8>,
    error: Option<Errno>,
}

#[derive(Default)]
struct Pending {
    waiters: std::collections::HashMap<u64, Waiter>,
    next_cookie: u64,
    /// Why the connection is unusable (every later request fails at once with this).
    dead: Option<String>,
}

/// State shared between a [`SharedClient`]'s callers and its reply reader.
struct SharedState {
    pending: Mutex<Pending>,
    stream: TcpStream,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SharedState {
    /// Mark the connection dead: shut the socket (the reader stops) and fail every waiter.
    fn kill(&self, why: String) {
        let mut p = lock(&self.pending);
        p.dead.get_or_insert(why);
        let why = p.dead.clone().unwrap_or_default();
        for (_, w) in p.waiters.drain() {
            // The caller may have given up already.
            let _ = w.tx.send(Msg::Done(Err(ClientError::Protocol(format!(
                "connection lost: {why}"
            )))));
        }
        drop(p);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// An NBD client that keeps several requests in flight on one connection: any number of threads
/// call it at once (`&self`); each request gets its own cookie and waits for its own reply. One
/// waiting caller at a time reads replies off the socket and hands each to its request by cookie
/// (replies may come in any order); when its own has come it passes the reading on to another
/// waiting caller, so no extra thread sits between a caller and its reply. Memory stays bounded by the
/// callers' requests: a reply is accepted only for a request in flight and only up to its length.
///
/// A FLUSH sent after a write's reply arrived covers that write (the NBD rule); writes in flight
/// together have no order between them, as on any NBD connection. A timeout, a protocol violation
/// or a socket error kills the connection: every request in flight and every later one fails.
pub struct SharedClient {
    w: Mutex<BufWriter<NetWriter>>,
    shared: Arc<SharedState>,
    /// The reply side of the socket: whichever waiting caller holds it reads replies (its own
    /// and others'), and hands it on when its own has come.
    reader: Mutex<BufReader<NetReader>>,
    size: u64,
    flags: u16,
    timeout: Duration,
    /// Threads about to write a request (the last one flushes the writer).
    sending: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for SharedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedClient")
            .field("size", &self.size)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

impl SharedClient {
    /// Connect with a timeout on connecting, the handshake and every later request's reply,
    /// negotiate structured replies and select `export`.
    pub fn connect_timeout(
        addr: impl ToSocketAddrs,
        export: &str,
        timeout: Duration,
    ) -> Result<SharedClient, ClientError> {
        SharedClient::connect_tls(addr, export, timeout, None)
    }

    /// [`SharedClient::connect_timeout`], over TLS when `tls` is given.
    pub fn connect_tls(
        addr: impl ToSocketAddrs,
        export: &str,
        timeout: Duration,
        tls: Option<&ClientTls>,
    ) -> Result<SharedClient, ClientError> {
        let c = Client::connect_tls(addr, export, timeout, tls)?;
        let Client {
            r, w, size, flags, ..
        } = c;
        let shared = Arc::new(SharedState {
            pending: Mutex::new(Pending {
                next_cookie: 1,
                ..Pending::default()
            }),
            stream: r.get_ref().tcp().try_clone()?,
        });
        Ok(SharedClient {
            w: Mutex::new(w),
            shared,
            reader: Mutex::new(r),
            size,
            flags,
            timeout,
            sending: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags the server sent.
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// Whether the connection still works (no error or timeout seen).
    pub fn is_alive(&self) -> bool {
        lock(&self.shared.pending).dead.is_none()
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), ClientError> {
        match offset.checked_add(length) {
            Some(e) if e <= self.size && length <= u64::from(MAX_REQUEST_LEN) => Ok(()),
            _ => Err(ClientError::OutOfRange {
                offset,
                length,
                size: self.size,
            }),
        }
    }

    fn request(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> Outcome {
        let (tx, rx) = std::sync::mpsc::channel();
        let cookie = {
            let mut p = lock(&self.shared.pending);
            if let Some(why) = &p.dead {
                return Err(ClientError::Protocol(format!("connection lost: {why}")));
            }
            let cookie = p.next_cookie;
            p.next_cookie += 1;
            let read_len = (command == Command::Read).then_some(length as usize);
            p.waiters.insert(
                cookie,
                Waiter {
                    tx,
                    offset,
                    read_len,
                    data: Vec::new(),
                    error: None,
                },
            );
            cookie
        };
        let h = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        // Senders queue on the writer; the last one queued sends everything buffered, so requests
        // made together leave in one write to the socket.
        self.sending
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let sent = {
            let mut w = lock(&self.w);
            let res = w.write_all(&h.encode()).and_then(|()| w.write_all(data));
            if self
                .sending
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
                == 1
            {
                res.and_then(|()| w.flush())
            } else {
                res
            }
        };
        if let Err(e) = sent {
            self.shared.kill(format!("sending a request failed: {e}"));
            return Err(ClientError::Io(e));
        }
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            // Nobody reads replies: we do, until ours has come (at queue depth 1 the caller
            // reads its own reply, with no thread in between).
            if let Ok(mut r) = self.reader.try_lock() {
                let outcome = loop {
                    match rx.try_recv() {
                        Ok(Msg::Done(o)) => break Some(o),
                        Ok(Msg::TakeOver) => continue,
                        Err(_) => {}
                    }
                    if std::time::Instant::now() >= deadline {
                        break None;
                    }
                    // The socket's read timeout bounds this wait too.
                    if let Err(e) = read_reply(&mut *r, &self.shared) {
                        if let ClientError::Io(io) = &e
                            && matches!(
                                io.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            )
                        {
                            break None;
                        }
                        self.shared.kill(e.to_string());
                        if let Ok(Msg::Done(o)) = rx.try_recv() {
                            break Some(o);
                        }
                        break Some(Err(e));
                    }
                };
                drop(r);
                // Someone else still waits: it reads next.
                if let Some(w) = lock(&self.shared.pending).waiters.values().next() {
                    let _ = w.tx.send(Msg::TakeOver);
                }
                match outcome {
                    Some(o) => return o,
                    None => return Err(self.timed_out()),
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(Msg::Done(o)) => return o,
                Ok(Msg::TakeOver) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Err(self.timed_out()),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(ClientError::Protocol("connection lost".into()));
                }
            }
        }
    }

    fn timed_out(&self) -> ClientError {
        self.shared
            .kill(format!("no reply within {:?}", self.timeout));
        ClientError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no NBD reply within {:?}", self.timeout),
        ))
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        self.check_range(offset, buf.len() as u64)?;
        let data = self.request(Command::Read, 0, offset, buf.len() as u32, &[])?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Write `data` at `offset` (with `fua`, durable when this returns).
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        self.check_range(offset, data.len() as u64)?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(Command::Write, flags, offset, data.len() as u32, data)
            .map(drop)
    }

    /// Make every write whose reply arrived before this call durable.
    pub fn flush(&self) -> Result<(), ClientError> {
        self.request(Command::Flush, 0, 0, 0, &[]).map(drop)
    }

    /// Discard a range.
    pub fn trim(&self, offset: u64, length: u32) -> Result<(), ClientError> {
        self.check_range(offset, u64::from(length))?;
        self.request(Command::Trim, 0, offset, length, &[])
            .map(drop)
    }

    /// Write zeroes over a range.
    pub fn write_zeroes(&self, offset: u64, length: u32, fua: bool) -> Result<(), ClientError> {
        self.check_range(offset, u64::from(length))?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(Command::WriteZeroes, flags, offset, length, &[])
            .map(drop)
    }
}

impl Drop for SharedClient {
    fn drop(&mut self) {
        // Best effort: a soft disconnect, then the socket goes (which ends the reader).
        let h = RequestHeader {
            flags: 0,
            command: Command::Disc,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        let mut w = lock(&self.w);
        let _ = w.write_all(&h.encode()).and_then(|()| w.flush());
        drop(w);
        self.shared.kill("closed".into());
    }
}

/// Read one reply (simple, or one structured chunk) and hand it to its waiter.
fn read_reply(r: &mut impl Read, sh: &SharedState) -> Result<(), ClientError> {
    let magic = rd32(r)?;
    let take = |cookie: u64| {
        lock(&sh.pending)
            .waiters
            .remove(&cookie)
            .ok_or_else(|| ClientError::Protocol(format!("reply for unknown cookie {cookie}")))
    };
    match magic {
        SIMPLE_REPLY_MAGIC => {
            let err = rd32(r)?;
            let cookie = rd64(r)?;
            let w = take(cookie)?;
            let outcome = if err != 0 {
                Err(ClientError::Remote(Errno::from_code(err)))
            } else {
                let mut data = vec![0u8; w.read_len.unwrap_or(0)];
                r.read_exact(&mut data)?;
                Ok(data)
            };
            let _ = w.tx.send(Msg::Done(outcome));
            Ok(())
        }
        STRUCTURED_REPLY_MAGIC => {
            let flags = rd16(r)?;
            let kind = rd16(r)?;
            let cookie = rd64(r)?;
            let len = rd32(r)?;
            let mut w = take(cookie)?;
            // A chunk never carries more than its request asked for (plus its own header).
            let max = w.read_len.unwrap_or(0) as u64 + 64;
            if u64::from(len) > max {
                return Err(ClientError::Protocol(format!(
                    "chunk of {len} bytes for a request of {} bytes",
                    w.read_len.unwrap_or(0)
                )));
            }
            let mut payload = vec![0u8; len as usize];
            r.read_exact(&mut payload)?;
            apply_chunk(&mut w, kind, &payload)?;
            if flags & REPLY_FLAG_DONE != 0 {
                let outcome = match (w.error, w.read_len) {
                    (Some(e), _) => Err(ClientError::Remote(e)),
                    // A read that ends without a data or hole chunk: the caller gets no bytes.
                    (None, Some(n)) if w.data.len() != n => Err(ClientError::Protocol(format!(
                        "the reply to a {n}-byte read ended without its data"
                    ))),
                    (None, _) => Ok(std::mem::take(&mut w.data)),
                };
                let _ = w.tx.send(Msg::Done(outcome));
            } else {
                lock(&sh.pending).waiters.insert(cookie, w);
            }
            Ok(())
        }
        m => Err(ClientError::Protocol(format!("bad reply magic {m:#x}"))),
    }
}

/// Apply one structured chunk to the request it answers.
fn apply_chunk(w: &mut Waiter, kind: u16, payload: &[u8]) -> Result<(), ClientError> {
    let want = w.read_len.unwrap_or(0);
    let place = |w: &mut Waiter, at: u64, n: usize| -> Result<usize, ClientError> {
        let start = at
            .checked_sub(w.offset)
            .and_then(|s| usize::try_from(s).ok())
            .filter(|s| s.checked_add(n).is_some_and(|e| e <= want))
            .ok_or_else(|| ClientError::Protocol("chunk outside the request".into()))?;
        if w.data.len() != want {
            w.data = vec![0u8; want];
        }
        Ok(start)
    };
    match kind {
        REPLY_TYPE_OFFSET_DATA if payload.len() >= 8 && w.read_len.is_some() => {
            let data = &payload[8..];
            let s = place(w, be64(&payload[0..8]), data.len())?;
            w.data[s..s + data.len()].copy_from_slice(data);
        }
        REPLY_TYPE_OFFSET_HOLE if payload.len() == 12 && w.read_len.is_some() => {
            let n = be32(&payload[8..12]) as usize;
            let s = place(w, be64(&payload[0..8]), n)?;
            w.data[s..s + n].fill(0);
        }
        REPLY_TYPE_NONE => {}
        k if k & 0x8000 != 0 => w.error = Some(chunk_errno(payload)?),
        k => return Err(ClientError::Protocol(format!("unexpected chunk type {k}"))),
    }
    Ok(())
}

/// One NBD connection that relays requests: one thread sends them (with cookies of its own
/// choosing), another receives the replies as the server sends them, in any order. No request
/// waits for another and no thread sits between the two, so a relaying server keeps as many
/// requests in flight as its client sends. Only simple replies are negotiated, so the reply to a
/// read is its header followed by exactly the bytes asked for (or no bytes, with an error).
pub struct RelayConnection {
    w: Mutex<BufWriter<NetWriter>>,
    r: Mutex<BufReader<NetReader>>,
    stream: TcpStream,
    size: u64,
    flags: u16,
}

impl std::fmt::Debug for RelayConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayConnection")
            .field("size", &self.size)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

/// The header of one reply received by [`RelayConnection::recv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayReply {
    /// The cookie of the request it answers.
    pub cookie: u64,
    /// The server's error, if any (a failed read carries no data).
    pub error: Option<Errno>,
}

impl RelayConnection {
    /// Connect and select `export` (simple replies), with `timeout` on connecting, the handshake
    /// and every later socket read and write (an idle [`RelayConnection::recv`] returns a
    /// `WouldBlock` or `TimedOut` I/O error after it).
    pub fn connect_timeout(
        addr: impl ToSocketAddrs,
        export: &str,
        timeout: Duration,
    ) -> Result<RelayConnection, ClientError> {
        RelayConnection::connect_tls(addr, export, timeout, None)
    }

    /// [`RelayConnection::connect_timeout`], over TLS when `tls` is given.
    pub fn connect_tls(
        addr: impl ToSocketAddrs,
        export: &str,
        timeout: Duration,
        tls: Option<&ClientTls>,
    ) -> Result<RelayConnection, ClientError> {
        let Client {
            r, w, size, flags, ..
        } = Client::go_with(open_timeout(addr, timeout, tls)?, export, false)?;
        let stream = r.get_ref().tcp().try_clone()?;
        Ok(RelayConnection {
            w: Mutex::new(w),
            r: Mutex::new(r),
            stream,
            size,
            flags,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags the server sent.
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// Queue one request (with its payload, for a write); with `flush`, send everything queued.
    /// The caller picks unique cookies and checks ranges (the server refuses bad ones).
    pub fn send(&self, header: &RequestHeader, data: &[u8], flush: bool) -> io::Result<()> {
        let mut w = lock(&self.w);
        w.write_all(&header.encode())?;
        w.write_all(data)?;
        if flush { w.flush() } else { Ok(()) }
    }

    /// Send every queued request.
    pub fn flush(&self) -> io::Result<()> {
        lock(&self.w).flush()
    }

    /// Receive the next reply. `read_len(cookie)` gives the data length a successful reply to
    /// that cookie carries (0 for anything but a read; `None`: no such request, a protocol
    /// error); the data lands in `buf[..len]`.
    pub fn recv(
        &self,
        buf: &mut Vec<u8>,
        read_len: impl FnOnce(u64) -> Option<usize>,
    ) -> Result<RelayReply, ClientError> {
        let mut r = lock(&self.r);
        let mut h = [0u8; 16];
        r.read_exact(&mut h)?;
        if be32(&h[0..4]) != SIMPLE_REPLY_MAGIC {
            return Err(ClientError::Protocol(format!(
                "bad reply magic {:#x}",
                be32(&h[0..4])
            )));
        }
        let err = be32(&h[4..8]);
        let cookie = be64(&h[8..16]);
        let len = read_len(cookie)
            .ok_or_else(|| ClientError::Protocol(format!("reply for unknown cookie {cookie}")))?;
        if err != 0 {
            return Ok(RelayReply {
                cookie,
                error: Some(Errno::from_code(err)),
            });
        }
        if buf.len() < len {
            buf.resize(len, 0);
        }
        r.read_exact(&mut buf[..len])?;
        Ok(RelayReply {
            cookie,
            error: None,
        })
    }

    /// Whether a whole reply header is already buffered (the next [`RelayConnection::recv`]
    /// will not wait for the network to learn which request it answers).
    pub fn reply_buffered(&self) -> bool {
        self.r.try_lock().is_ok_and(|r| r.buffer().len() >= 16)
    }

    /// Close the socket both ways: a thread blocked in [`RelayConnection::recv`] wakes with an
    /// error, and later sends fail.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for RelayConnection {
    fn drop(&mut self) {
        // Best effort: a soft disconnect before the socket goes.
        let h = RequestHeader {
            flags: 0,
            command: Command::Disc,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        let _ = self.send(&h, &[], true);
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{Backend, StaticExports, run_listener};
    use std::sync::Condvar;
    use std::time::Instant;

    /// Reads fill each byte with its offset's low byte. A read at `GATED` waits (up to 5 s)
    /// until a read elsewhere has started, so it succeeds only if the two are in flight together.
    struct Gated {
        seen_other: Mutex<bool>,
        cv: Condvar,
        delay: Duration,
    }

    const GATED: u64 = 0;
    /// A read at this offset fails with `EIO`.
    const FAILING: u64 = 3;
    const SIZE: u64 = 1 << 20;

    impl Backend for Gated {
        fn size(&self) -> u64 {
            SIZE
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
            if offset == FAILING {
                return Err(Errno::Io);
            }
            if offset == GATED {
                let g = lock(&self.seen_other);
                let (g, _) = self
                    .cv
                    .wait_timeout_while(g, Duration::from_secs(5), |seen| !*seen)
                    .unwrap();
                if !*g {
                    return Err(Errno::Io);
                }
            } else {
                *lock(&self.seen_other) = true;
                self.cv.notify_all();
            }
            std::thread::sleep(self.delay);
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (offset + i as u64) as u8;
            }
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64, _: bool) -> Result<(), Errno> {
            Ok(())
        }
        fn flush(&self) -> Result<(), Errno> {
            Ok(())
        }
    }

    fn server(delay: Duration) -> String {
        let mut ex = StaticExports::new();
        ex.insert(
            "g",
            Arc::new(Gated {
                seen_other: Mutex::new(false),
                cv: Condvar::new(),
                delay,
            }),
        );
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || run_listener(l, Arc::new(ex)));
        addr
    }

    /// A server that completes the handshake (structured replies, export `m` of 64 KiB), then
    /// sends `replies` and reads until the client goes.
    fn scripted_server(replies: Vec<u8>) -> std::net::SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut out = NBDMAGIC.to_be_bytes().to_vec();
            out.extend_from_slice(&IHAVEOPT.to_be_bytes());
            out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
            out.extend_from_slice(&option_reply(OPT_STRUCTURED_REPLY, REP_ACK, 0));
            out.extend_from_slice(&option_reply(OPT_GO, REP_INFO, 12));
            out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
            out.extend_from_slice(&(64u64 << 10).to_be_bytes());
            out.extend_from_slice(&(TF_HAS_FLAGS | TF_SEND_FLUSH).to_be_bytes());
            out.extend_from_slice(&option_reply(OPT_GO, REP_ACK, 0));
            out.extend_from_slice(&replies);
            s.write_all(&out).unwrap();
            let _ = io::copy(&mut s, &mut io::sink());
        });
        addr
    }

    #[test]
    fn a_structured_read_reply_without_data_is_a_protocol_error_not_a_panic() {
        // Found by fuzz/fuzz_targets/nbd_client.rs: the reply's only chunk is a final NONE.
        let addr = scripted_server(chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, 0).to_vec());
        let c = SharedClient::connect_timeout(addr, "m", Duration::from_secs(5)).unwrap();
        let mut buf = [0u8; 512];
        match c.read(0, &mut buf) {
            Err(ClientError::Protocol(why)) => {
                assert!(
                    why.contains("512-byte read ended without its data"),
                    "{why}"
                )
            }
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn shared_client_keeps_requests_in_flight_and_matches_replies_out_of_order() {
        let c = SharedClient::connect_timeout(server(Duration::ZERO), "g", Duration::from_secs(10))
            .unwrap();
        std::thread::scope(|s| {
            // The gated read is sent first and answered last: it needs the second one in flight.
            let first = s.spawn(|| {
                let mut b = vec![0u8; 4096];
                c.read(GATED, &mut b).map(|()| b)
            });
            std::thread::sleep(Duration::from_millis(50));
            let mut b = vec![0u8; 512];
            c.read(4096 + 7, &mut b).unwrap();
            assert!(
                b.iter()
                    .enumerate()
                    .all(|(i, &x)| x == (4096 + 7 + i) as u8)
            );
            let b = first.join().unwrap().expect("the gated read completes");
            assert!(b.iter().enumerate().all(|(i, &x)| x == i as u8));
        });
        assert!(c.is_alive());
    }

    #[test]
    fn many_threads_on_one_shared_client_each_get_their_own_data() {
        let c = SharedClient::connect_timeout(
            server(Duration::from_micros(200)),
            "g",
            Duration::from_secs(10),
        )
        .unwrap();
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let c = &c;
                s.spawn(move || {
                    for i in 0..50u64 {
                        let off = 4096 + (t * 50 + i) * 1000 % (SIZE - 8192);
                        let mut b = vec![0u8; 1000 + t as usize];
                        c.read(off, &mut b).unwrap();
                        assert!(
                            b.iter()
                                .enumerate()
                                .all(|(k, &x)| x == (off + k as u64) as u8)
                        );
                        c.write(off, &b, i % 7 == 0).unwrap();
                    }
                    c.flush().unwrap();
                });
            }
        });
        assert!(
            matches!(
                c.read(SIZE - 1, &mut [0u8; 2]),
                Err(ClientError::OutOfRange { .. })
            ),
            "a request past the end is refused before it is sent"
        );
        assert!(c.is_alive());
    }

    #[test]
    fn a_reply_that_does_not_come_in_time_kills_the_connection_for_every_later_request() {
        // The gated read never sees another read, so its reply comes only after 5 s.
        let c =
            SharedClient::connect_timeout(server(Duration::ZERO), "g", Duration::from_millis(300))
                .unwrap();
        let t = Instant::now();
        let e = c.read(GATED, &mut [0u8; 16]).unwrap_err();
        assert!(
            matches!(e, ClientError::Io(ref io) if io.kind() == io::ErrorKind::TimedOut),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(!c.is_alive());
        let e = c.read(4096, &mut [0u8; 16]).unwrap_err();
        assert!(
            matches!(e, ClientError::Protocol(ref m) if m.contains("connection lost")),
            "{e}"
        );
    }

    /// A backend that relays every read to `upstream` (the gated server) through a
    /// [`RelayConnection`]; executing anything itself is an error the test would see.
    struct Forwarder {
        upstream: String,
    }

    struct ForwardRelay {
        up: RelayConnection,
        pending: Mutex<std::collections::HashMap<u64, RequestHeader>>,
        next: std::sync::atomic::AtomicU64,
        closed: std::sync::atomic::AtomicBool,
    }

    impl Backend for Forwarder {
        fn size(&self) -> u64 {
            SIZE
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> Result<(), Errno> {
            Err(Errno::Inval)
        }
        fn write_at(&self, _: &[u8], _: u64, _: bool) -> Result<(), Errno> {
            Err(Errno::Inval)
        }
        fn flush(&self) -> Result<(), Errno> {
            Ok(())
        }
        fn relay(self: Arc<Self>) -> Option<Box<dyn crate::server::Relay>> {
            let up = RelayConnection::connect_timeout(&self.upstream, "g", Duration::from_secs(10))
                .ok()?;
            Some(Box::new(ForwardRelay {
                up,
                pending: Mutex::default(),
                next: 1.into(),
                closed: false.into(),
            }))
        }
    }

    impl crate::server::Relay for ForwardRelay {
        fn forward(&self, request: &RequestHeader, data: &[u8], more: bool) -> bool {
            let cookie = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            lock(&self.pending).insert(cookie, *request);
            let h = RequestHeader { cookie, ..*request };
            self.up.send(&h, data, !more).is_ok()
        }
        fn push(&self) {
            self.up.flush().unwrap();
        }
        fn next_reply(&self, buf: &mut Vec<u8>) -> Option<crate::server::Relayed> {
            loop {
                if self.closed.load(std::sync::atomic::Ordering::SeqCst)
                    && lock(&self.pending).is_empty()
                {
                    return None;
                }
                let reply = match self.up.recv(buf, |c| {
                    lock(&self.pending).get(&c).map(|r| match r.command {
                        Command::Read => r.length as usize,
                        _ => 0,
                    })
                }) {
                    Ok(r) => r,
                    // The idle connection was shut down by `close`.
                    Err(_) => continue,
                };
                let request = lock(&self.pending).remove(&reply.cookie).unwrap();
                let result = reply.error.map_or(Ok(()), Err);
                return Some(crate::server::Relayed { request, result });
            }
        }
        fn reply_ready(&self) -> bool {
            self.up.reply_buffered()
        }
        fn close(&self) {
            self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
            if lock(&self.pending).is_empty() {
                self.up.shutdown();
            }
        }
    }

    #[test]
    fn a_relay_keeps_requests_in_flight_and_fails_only_the_request_upstream_refuses() {
        let upstream = server(Duration::from_micros(100));
        let mut ex = StaticExports::new();
        ex.insert("r", Arc::new(Forwarder { upstream }));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || run_listener(l, Arc::new(ex)));
        let c = SharedClient::connect_timeout(&addr, "r", Duration::from_secs(10)).unwrap();
        std::thread::scope(|s| {
            // Completes only if a later read reaches the upstream while it is in flight there.
            let gated = s.spawn(|| {
                let mut b = vec![0u8; 4096];
                c.read(GATED, &mut b).map(|()| b)
            });
            std::thread::sleep(Duration::from_millis(50));
            for t in 0..16u64 {
                let c = &c;
                s.spawn(move || {
                    for i in 0..40u64 {
                        if i % 10 == t % 10 {
                            let e = c.read(FAILING, &mut [0u8; 64]).unwrap_err();
                            assert!(matches!(e, ClientError::Remote(Errno::Io)), "{e}");
                            continue;
                        }
                        let off = 4096 + (t * 40 + i) * 997 % (SIZE - 16384);
                        let mut b = vec![0u8; 512 + (t * 40 + i) as usize % 4096];
                        c.read(off, &mut b).unwrap();
                        assert!(
                            b.iter()
                                .enumerate()
                                .all(|(k, &x)| x == (off + k as u64) as u8),
                            "thread {t} read {i} at {off} got another request's bytes"
                        );
                    }
                });
            }
            let b = gated.join().unwrap().expect("the gated read completes");
            assert!(b.iter().enumerate().all(|(i, &x)| x == i as u8));
        });
        assert!(
            c.is_alive(),
            "the failed reads did not break the connection"
        );
    }
}

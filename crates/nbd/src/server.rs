//! The NBD server: handshake and transmission over any byte stream, plus a TCP accept loop.
//!
//! Requests on one connection are read in order and executed concurrently (up to
//! [`MAX_IN_FLIGHT`] at once, within [`MAX_IN_FLIGHT_BYTES`] of buffers); each reply goes out when
//! its request completes. A write is acknowledged only after the backend did it, and a FLUSH runs
//! the backend's flush after it was read, so its reply covers every write acknowledged before it
//! was sent, on that connection and, because every backend call goes straight to the shared
//! backend, on every other connection too (we advertise `CAN_MULTI_CONN`).

use std::collections::BTreeMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::proto::*;
use crate::tls::{self, PeerId, ServerTls};

/// What an export must provide. Implementations are shared between connections.
pub trait Backend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// Fill `buf` from `offset` (the range was checked against `size`).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno>;
    /// Write `data` at `offset`; with `fua`, durable before returning.
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), Errno>;
    /// Make every completed write durable.
    fn flush(&self) -> Result<(), Errno>;
    /// Write zeroes over a range. A backend that can free or mark the range without writing
    /// every byte overrides this (and honours `flags.no_hole`); this default writes zero buffers,
    /// so it refuses `flags.fast` with `ENOTSUP`, as the protocol asks.
    fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), Errno> {
        if flags.fast {
            return Err(Errno::NotSup);
        }
        let fua = flags.fua;
        let zeroes = vec![0u8; (len as usize).min(1 << 20)];
        let mut done = 0u64;
        while done < u64::from(len) {
            let n = (u64::from(len) - done).min(zeroes.len() as u64) as usize;
            self.write_at(&zeroes[..n], offset + done, false)?;
            done += n as u64;
        }
        if fua { self.flush() } else { Ok(()) }
    }
    /// Discard a range; we keep the simple contract that trimmed bytes read back as zeroes.
    fn trim(&self, offset: u64, len: u32) -> Result<(), Errno> {
        self.write_zeroes(offset, len, ZeroFlags::default())
    }
    /// `base:allocation` status of `len` bytes from `offset` (the range was checked against
    /// `size`): runs in order from `offset`, which may cover less than `len` (the client asks
    /// again for the rest) but at least one byte. The default: all data, nothing known zero.
    fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, Errno> {
        let _ = offset;
        Ok(vec![StatusExtent {
            len: u64::from(len),
            hole: false,
            zero: false,
        }])
    }
    /// A backend that sends reads and writes on to another NBD server returns a [`Relay`] for
    /// one connection (asked once, when the connection starts transmission): the connection's
    /// reads and writes it forwards are in flight together without a serving thread each. The
    /// default: none, every request is executed through the methods above.
    fn relay(self: Arc<Self>) -> Option<Box<dyn Relay>> {
        None
    }
}

/// Forwarding of one connection's reads and writes to another server ([`Backend::relay`]).
///
/// The connection's reading thread offers each validated READ and WRITE to [`Relay::forward`];
/// a forwarded request is answered when [`Relay::next_reply`] hands back its completion, on the
/// connection's one relay thread, which writes the reply at once. So any number of requests
/// (up to [`MAX_RELAYED`], within [`MAX_IN_FLIGHT_BYTES`]) are in flight through a relay, and
/// neither side has a thread per request. A write is answered only once the relay reports it
/// done, so FLUSH keeps its meaning. Requests a relay declines, and every other command, are
/// executed through the [`Backend`] as usual.
pub trait Relay: Send + Sync {
    /// Forward a validated READ or WRITE (`data`: a write's payload, to be copied if kept).
    /// `false`: not forwarded, the server executes it through the backend. With `more`, the
    /// next request is already buffered: the relay may hold this one back until a later
    /// `forward` without `more` or [`Relay::push`].
    fn forward(&self, request: &RequestHeader, data: &[u8], more: bool) -> bool;
    /// Send on everything held back (the server is about to wait, or to execute a request).
    fn push(&self);
    /// Wait for the next forwarded request to complete: the request and its result, a read's
    /// data in `buf[..request.length]`. `None` once [`Relay::close`] was called and every
    /// forwarded request has been handed back.
    fn next_reply(&self, buf: &mut Vec<u8>) -> Option<Relayed>;
    /// Whether another completion is ready now (the server then holds back flushing).
    fn reply_ready(&self) -> bool;
    /// No more requests will be forwarded (the connection is ending).
    fn close(&self);
}

/// A forwarded request's completion ([`Relay::next_reply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// The request, as it was forwarded.
    pub request: RequestHeader,
    /// Its result.
    pub result: Result<(), Errno>,
}

/// Flags of a WRITE_ZEROES request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Durable before the reply (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
    /// The range must stay allocated (`NBD_CMD_FLAG_NO_HOLE`).
    pub no_hole: bool,
    /// Fail with `ENOTSUP` unless faster than writing zeroes (`NBD_CMD_FLAG_FAST_ZERO`).
    pub fast: bool,
}

/// The set of exports a server offers, looked up by name at `NBD_OPT_GO`.
pub trait Exports: Send + Sync {
    /// Names for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<String>;
    /// Open an export for one connection (`None`: unknown name, or refused).
    fn open(&self, name: &str) -> Option<Arc<dyn Backend>>;
    /// Answer a private control request ([`OPT_TERN_CONTROL`]); `None`: not supported.
    fn control(&self, _request: &[u8]) -> Option<Vec<u8>> {
        None
    }
    /// [`Exports::list`] for a given client (the server calls this one). Default: the same
    /// list for everyone.
    fn list_for(&self, _peer: &Peer) -> Vec<String> {
        self.list()
    }
    /// [`Exports::open`] for a given client (the server calls this one): a set that decides by
    /// the client's identity refuses with [`Refusal::Policy`] or opens read-only. Default:
    /// everyone gets the same.
    fn open_for(&self, name: &str, _peer: &Peer) -> Result<Arc<dyn Backend>, Refusal> {
        self.open(name).ok_or(Refusal::Unknown)
    }
    /// [`Exports::control`] for a given client (the server calls this one).
    fn control_for(&self, request: &[u8], _peer: &Peer) -> Option<Vec<u8>> {
        self.control(request)
    }
}

/// The client of one connection, as far as the server knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// Its address, when it came over TCP.
    pub addr: Option<std::net::SocketAddr>,
    /// Its verified identity, when it came over TLS.
    pub id: Option<PeerId>,
}

/// Why [`Exports::open_for`] gives no export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No such export (`NBD_REP_ERR_UNKNOWN`).
    Unknown,
    /// The client may not use it (`NBD_REP_ERR_POLICY`, with this message).
    Policy(String),
}

/// A fixed map of names to backends.
#[derive(Default)]
pub struct StaticExports {
    map: BTreeMap<String, Arc<dyn Backend>>,
}

impl std::fmt::Debug for StaticExports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticExports")
            .field("names", &self.map.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl StaticExports {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }
    /// Add (or replace) an export.
    pub fn insert(&mut self, name: &str, backend: Arc<dyn Backend>) {
        self.map.insert(name.to_owned(), backend);
    }
}

impl Exports for StaticExports {
    fn list(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }
    fn open(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.map.get(name).cloned()
    }
}

/// A plain file as an export.
#[derive(Debug)]
pub struct FileBackend {
    file: std::fs::File,
    size: u64,
    read_only: bool,
}

impl FileBackend {
    /// Open `path` for reading and (unless `read_only`) writing.
    pub fn open(path: &std::path::Path, read_only: bool) -> io::Result<FileBackend> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(FileBackend {
            file,
            size,
            read_only,
        })
    }
}

fn io_errno(e: &io::Error) -> Errno {
    match e.raw_os_error() {
        Some(28) => Errno::NoSpc,
        Some(1) | Some(13) => Errno::Perm,
        _ => Errno::Io,
    }
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| io_errno(&e))
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), Errno> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| io_errno(&e))?;
        if fua { self.flush() } else { Ok(()) }
    }
    fn flush(&self) -> Result<(), Errno> {
        self.file.sync_data().map_err(|e| io_errno(&e))
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket failed.
    #[error("Connection I/O failed")]
    Io(#[from] io::Error),
    /// The client did not speak fixed newstyle or sent unknown flags.
    #[error("Client flags {0:#x} are not supported")]
    ClientFlags(u32),
    /// The client sent a bad magic number.
    #[error("Bad magic from client: {0:#x}")]
    BadMagic(u64),
    /// The client asked for an export we do not have with `NBD_OPT_EXPORT_NAME` (no error path).
    #[error("Unknown export {0:?}")]
    UnknownExport(String),
    /// An option or request too large to skip.
    #[error("Request too large: {0} bytes")]
    TooLarge(u64),
    /// The server requires TLS and the client selected an export without it (or aborted).
    #[error("Client did not start TLS, which this server requires")]
    TlsRequired,
    /// The TLS handshake failed, or the client's certificate was refused.
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    /// An option came after the connection had spent its [`ListenerOptions::max_option_age`]
    /// in option haggling: it was answered `NBD_REP_ERR_SHUTDOWN`, not carried out, and the
    /// connection closed.
    #[error(
        "Connection in option haggling for {} ms, longer than the {} ms allowed: closed at its next option",
        age.as_millis(),
        max.as_millis()
    )]
    OptionAge {
        /// Since the connection was accepted.
        age: Duration,
        /// The limit.
        max: Duration,
    },
}

struct Session {
    /// Option haggling runs inside TLS (`NBD_OPT_STARTTLS` is then invalid).
    tls: bool,
    structured: bool,
    no_zeroes: bool,
    /// `base:allocation` was selected with `NBD_OPT_SET_META_CONTEXT`.
    base_allocation: bool,
    /// When the connection was accepted and how long it may haggle: an option read later is
    /// refused (`None`: no limit).
    option_age: Option<OptionAge>,
}

impl Session {
    /// A connection's session before its first option.
    fn new(no_zeroes: bool, tls: bool, option_age: Option<OptionAge>) -> Session {
        Session {
            tls,
            structured: false,
            no_zeroes,
            base_allocation: false,
            option_age,
        }
    }
}

/// The age limit of a connection's option haggling ([`ListenerOptions::max_option_age`]).
#[derive(Debug, Clone, Copy)]
struct OptionAge {
    accepted: Instant,
    max: Duration,
}

/// Whether an option read `age` after the connection was accepted is still carried out, under
/// a limit of `max` (pure). `NBD_OPT_ABORT` always is: the client leaves anyway.
fn option_allowed(option: u32, age: Duration, max: Duration) -> bool {
    option == OPT_ABORT || age < max
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn skip(r: &mut impl Read, mut n: u64) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..k])?;
        n -= k as u64;
    }
    Ok(())
}

fn send_opt_reply(w: &mut impl Write, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&option_reply(option, reply, data.len() as u32))?;
    w.write_all(data)
}

fn transmission_flags(backend: &dyn Backend, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_SEND_FAST_ZERO
        | TF_CAN_MULTI_CONN;
    if structured {
        f |= TF_SEND_DF;
    }
    if backend.read_only() {
        f |= TF_READ_ONLY;
    }
    f
}

/// Serve one client from handshake to disconnect. Returns `Ok` on a clean end (DISC, ABORT, EOF
/// during the handshake counts as an error).
pub fn serve<R: Read + Send, W: Write + Send>(
    r: R,
    mut w: W,
    exports: &dyn Exports,
) -> Result<(), ServeError> {
    // Our own buffer, so the transmission phase can tell whether another request is waiting.
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let no_zeroes = greet(&mut r, &mut w)?;
    let session = Session::new(no_zeroes, false, None);
    serve_session(r, w, exports, &Peer::default(), session, &mut |_| {})
}

/// The server's greeting, then the client's flags: whether the client agreed to skip the
/// 124 zero bytes.
fn greet(r: &mut impl Read, w: &mut impl Write) -> Result<bool, ServeError> {
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    w.flush()?;
    let cflags = read_u32(r)?;
    if cflags & CLIENT_FIXED_NEWSTYLE == 0
        || cflags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
    {
        return Err(ServeError::ClientFlags(cflags));
    }
    Ok(cflags & CLIENT_NO_ZEROES != 0)
}

/// Where a connection is, for the listener's deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The server works on a control request (the client waits for us: no deadline).
    Working,
    /// Back to option haggling after a control request (a fresh handshake deadline).
    Options,
    /// An export was selected; the first request comes next.
    Transmission,
}

/// Option haggling (inside TLS when `session.tls`; within `session.option_age` when given),
/// then transmission. `on_phase` is told when a control request starts and ends and when an
/// export was selected, before the first request is read.
fn serve_session<R: Read + Send, W: Write + Send>(
    mut r: BufReader<R>,
    mut w: W,
    exports: &dyn Exports,
    peer: &Peer,
    mut session: Session,
    on_phase: &mut dyn FnMut(Phase),
) -> Result<(), ServeError> {
    let backend = match handshake(&mut r, &mut w, exports, peer, &mut session, on_phase)? {
        Some(b) => b,
        None => return Ok(()),
    };
    on_phase(Phase::Transmission);
    let meta = session.base_allocation && session.structured;
    let relay = Arc::clone(&backend).relay();
    transmission(r, w, &*backend, relay, session.structured, meta)
}

/// Before TLS, on a server that requires it: answer every option but `NBD_OPT_STARTTLS` with
/// `NBD_REP_ERR_TLS_REQD` (and close on `NBD_OPT_EXPORT_NAME`, which has no error reply).
/// `Ok(true)`: STARTTLS was acknowledged, the TLS handshake comes next; `Ok(false)`: the client
/// aborted.
fn await_starttls(r: &mut impl Read, w: &mut impl Write) -> Result<bool, ServeError> {
    loop {
        let magic = read_u64(r)?;
        if magic != IHAVEOPT {
            return Err(ServeError::BadMagic(magic));
        }
        let option = read_u32(r)?;
        let len = read_u32(r)?;
        if option == OPT_EXPORT_NAME {
            // No error reply exists for it: close (after reading the name, so the client sees
            // an orderly end rather than a reset).
            if len <= MAX_OPTION_LEN {
                skip(r, u64::from(len))?;
            }
            return Err(ServeError::TlsRequired);
        }
        skip(r, u64::from(len))?;
        match option {
            OPT_STARTTLS if len == 0 => {
                send_opt_reply(w, option, REP_ACK, &[])?;
                w.flush()?;
                return Ok(true);
            }
            OPT_STARTTLS => send_opt_reply(w, option, REP_ERR_INVALID, b"STARTTLS takes no data")?,
            OPT_ABORT => {
                let _ = send_opt_reply(w, option, REP_ACK, &[]).and_then(|()| w.flush());
                return Ok(false);
            }
            _ => send_opt_reply(
                w,
                option,
                REP_ERR_TLS_REQD,
                b"this server requires TLS: send NBD_OPT_STARTTLS first",
            )?,
        }
        w.flush()?;
    }
}

fn handshake<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    exports: &dyn Exports,
    peer: &Peer,
    session: &mut Session,
    on_phase: &mut dyn FnMut(Phase),
) -> Result<Option<Arc<dyn Backend>>, ServeError> {
    loop {
        let magic = read_u64(r)?;
        if magic != IHAVEOPT {
            return Err(ServeError::BadMagic(magic));
        }
        let option = read_u32(r)?;
        let len = read_u32(r)?;
        if let Some(limit) = session.option_age {
            let age = limit.accepted.elapsed();
            if !option_allowed(option, age, limit.max) {
                refuse_old(r, w, option, len, age, limit.max)?;
                return Err(ServeError::OptionAge {
                    age,
                    max: limit.max,
                });
            }
        }
        if len > MAX_OPTION_LEN {
            if option == OPT_EXPORT_NAME {
                return Err(ServeError::TooLarge(u64::from(len)));
            }
            skip(r, u64::from(len))?;
            send_opt_reply(w, option, REP_ERR_TOO_BIG, b"option data too large")?;
            w.flush()?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Ok(b) = exports.open_for(&name, peer) else {
                    return Err(ServeError::UnknownExport(name));
                };
                w.write_all(&b.size().to_be_bytes())?;
                w.write_all(&transmission_flags(&*b, false).to_be_bytes())?;
                if !session.no_zeroes {
                    w.write_all(&[0u8; 124])?;
                }
                w.flush()?;
                session.structured = false;
                return Ok(Some(b));
            }
            OPT_ABORT => {
                // Best effort: the client may already have closed.
                let _ = send_opt_reply(w, option, REP_ACK, &[]).and_then(|()| w.flush());
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send_opt_reply(w, option, REP_ERR_INVALID, b"LIST takes no data")?;
                } else {
                    for name in exports.list_for(peer) {
                        let mut d = (name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        send_opt_reply(w, option, REP_SERVER, &d)?;
                    }
                    send_opt_reply(w, option, REP_ACK, &[])?;
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_opt_reply(
                        w,
                        option,
                        REP_ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    )?;
                } else {
                    session.structured = true;
                    send_opt_reply(w, option, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => match decode_go(&data) {
                Err(_) => send_opt_reply(w, option, REP_ERR_INVALID, b"malformed GO/INFO data")?,
                Ok(req) => match exports.open_for(&req.name, peer) {
                    Err(Refusal::Unknown) => {
                        send_opt_reply(w, option, REP_ERR_UNKNOWN, b"no such export")?
                    }
                    Err(Refusal::Policy(why)) => {
                        send_opt_reply(w, option, REP_ERR_POLICY, why.as_bytes())?
                    }
                    Ok(b) => {
                        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                        info.extend_from_slice(&b.size().to_be_bytes());
                        info.extend_from_slice(
                            &transmission_flags(&*b, session.structured).to_be_bytes(),
                        );
                        send_opt_reply(w, option, REP_INFO, &info)?;
                        if req.infos.contains(&INFO_BLOCK_SIZE) {
                            let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                            bs.extend_from_slice(&1u32.to_be_bytes());
                            bs.extend_from_slice(&4096u32.to_be_bytes());
                            bs.extend_from_slice(&MAX_REQUEST_LEN.to_be_bytes());
                            send_opt_reply(w, option, REP_INFO, &bs)?;
                        }
                        if req.infos.contains(&INFO_NAME) {
                            let mut nm = INFO_NAME.to_be_bytes().to_vec();
                            nm.extend_from_slice(req.name.as_bytes());
                            send_opt_reply(w, option, REP_INFO, &nm)?;
                        }
                        send_opt_reply(w, option, REP_ACK, &[])?;
                        if option == OPT_GO {
                            w.flush()?;
                            return Ok(Some(b));
                        }
                    }
                },
            },
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(w, option, &data, session)?
            }
            OPT_STARTTLS if session.tls => {
                send_opt_reply(w, option, REP_ERR_INVALID, b"TLS is already running")?
            }
            OPT_TERN_CONTROL => {
                // A control request may wait for a coordinator: not the client's delay.
                on_phase(Phase::Working);
                let reply = exports.control_for(&data, peer);
                on_phase(Phase::Options);
                match reply {
                    Some(reply) => send_opt_reply(w, option, REP_TERN_CONTROL, &reply)?,
                    None => send_opt_reply(w, option, REP_ERR_UNSUP, b"option not supported")?,
                }
            }
            _ => send_opt_reply(w, option, REP_ERR_UNSUP, b"option not supported")?,
        }
        w.flush()?;
    }
}

/// Refuse an option that came after the connection's option age ran out: read its data (so
/// closing does not reset the connection under the reply), answer `NBD_REP_ERR_SHUTDOWN` (none
/// for `NBD_OPT_EXPORT_NAME`, which has no error reply). The caller then closes.
fn refuse_old(
    r: &mut impl Read,
    w: &mut impl Write,
    option: u32,
    len: u32,
    age: Duration,
    max: Duration,
) -> io::Result<()> {
    if len > MAX_OPTION_LEN {
        return Ok(());
    }
    skip(r, u64::from(len))?;
    if option == OPT_EXPORT_NAME {
        return Ok(());
    }
    let why = format!(
        "connection in option haggling for {} ms, more than the {} ms this server allows: \
         option not carried out, reconnect",
        age.as_millis(),
        max.as_millis()
    );
    send_opt_reply(w, option, REP_ERR_SHUTDOWN, why.as_bytes())?;
    w.flush()
}

/// Answer LIST/SET_META_CONTEXT: we offer `base:allocation` only (for every export).
fn meta_context<W: Write>(
    w: &mut W,
    option: u32,
    data: &[u8],
    session: &mut Session,
) -> io::Result<()> {
    let set = option == OPT_SET_META_CONTEXT;
    if !session.structured {
        return send_opt_reply(
            w,
            option,
            REP_ERR_INVALID,
            b"negotiate structured replies first",
        );
    }
    let Ok(req) = decode_meta_context(data) else {
        return send_opt_reply(w, option, REP_ERR_INVALID, b"malformed meta context data");
    };
    let selected = if req.queries.is_empty() {
        // LIST with no query lists everything; SET with none selects nothing.
        !set
    } else {
        req.queries
            .iter()
            .any(|q| query_selects_base_allocation(q, !set))
    };
    if set {
        session.base_allocation = selected;
    }
    if selected {
        let mut d = META_BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
        send_opt_reply(w, option, REP_META_CONTEXT, &d)?;
    }
    send_opt_reply(w, option, REP_ACK, &[])
}

fn send_error<W: Write>(
    w: &mut W,
    structured: bool,
    req: &RequestHeader,
    errno: Errno,
) -> io::Result<()> {
    if structured && matches!(req.command, Command::Read | Command::BlockStatus) {
        let msg = errno.to_string();
        w.write_all(&chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            req.cookie,
            6 + msg.len() as u32,
        ))?;
        w.write_all(&errno.code().to_be_bytes())?;
        w.write_all(&(msg.len() as u16).to_be_bytes())?;
        w.write_all(msg.as_bytes())
    } else {
        w.write_all(&simple_reply(req.cookie, errno.code()))
    }
}

/// Requests one connection may have in flight at once (each is executed on its own thread).
pub const MAX_IN_FLIGHT: usize = 16;
/// Bytes of request payloads and read buffers one connection may hold at once; a request waits
/// (and with it the reading of later ones) until earlier ones free enough. At least one request
/// of [`MAX_REQUEST_LEN`] always fits.
pub const MAX_IN_FLIGHT_BYTES: u64 = 2 * MAX_REQUEST_LEN as u64;
/// Requests one connection may have forwarded through its [`Relay`] at once.
pub const MAX_RELAYED: usize = 128;
/// Small reads and writes a serving thread takes with the one it read, when they are already
/// buffered, and executes after it: fewer hand-overs of the reader between threads.
const MAX_BATCH: usize = 8;
/// The largest request taken into a batch.
const BATCH_REQUEST_LEN: u32 = 64 * 1024;

/// Whether `buffered` starts with the header of a small READ or WRITE (which may join a batch).
fn small_request_next(buffered: &[u8]) -> bool {
    let Some(h) = buffered.first_chunk::<REQUEST_HEADER_LEN>() else {
        return false;
    };
    RequestHeader::decode(h).is_ok_and(|h| {
        matches!(h.command, Command::Read | Command::Write) && h.length <= BATCH_REQUEST_LEN
    })
}

/// What the threads serving one connection share.
struct Conn<'a, R, W> {
    r: Mutex<BufReader<R>>,
    w: Mutex<W>,
    backend: &'a dyn Backend,
    relay: Option<Box<dyn Relay>>,
    /// The relay thread runs (started at the first forwarded request).
    relaying: AtomicBool,
    structured: bool,
    /// `base:allocation` negotiated: BLOCK_STATUS is allowed.
    base_allocation: bool,
    state: Mutex<ConnState>,
    freed: Condvar,
    /// Threads about to write a reply (the last one flushes the writer).
    replying: AtomicUsize,
    /// Threads serving this connection (besides the relay thread).
    threads: AtomicUsize,
    /// Threads waiting to read the next request.
    waiting: AtomicUsize,
    /// `ConnState::stop`, readable without the lock.
    stopped: AtomicBool,
}

#[derive(Default)]
struct ConnState {
    /// Bytes reserved by requests being executed.
    bytes: u64,
    /// Threads waiting for `bytes` or `relayed` to go down.
    blocked: usize,
    /// Requests forwarded through the relay and not yet answered.
    relayed: usize,
    /// No more requests are read (DISC, or an error).
    stop: bool,
    /// The first error that ended the connection.
    error: Option<ServeError>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One request read off the wire, with its payload (writes) in the reading thread's buffer.
enum Next {
    Execute(RequestHeader, u64),
    Handled,
    Stop,
}

impl<R: Read + Send, W: Write + Send> Conn<'_, R, W> {
    fn fail(&self, e: ServeError) {
        let mut st = lock(&self.state);
        st.stop = true;
        self.stopped.store(true, Ordering::SeqCst);
        st.error.get_or_insert(e);
        drop(st);
        self.freed.notify_all();
        self.close_relay();
    }

    /// No more requests are read: stop the relay once its requests are answered.
    fn close_relay(&self) {
        if let Some(relay) = &self.relay {
            relay.close();
        }
    }

    /// Read and validate the next request (the caller holds the reader). Rejected requests are
    /// answered here; accepted ones reserve their bytes before anything is allocated.
    fn next(&self, r: &mut BufReader<R>, buf: &mut Vec<u8>) -> Result<Next, ServeError> {
        let mut hb = [0u8; REQUEST_HEADER_LEN];
        r.read_exact(&mut hb)?;
        let req = match RequestHeader::decode(&hb) {
            Ok(h) => h,
            Err(BadMagic(m)) => return Err(ServeError::BadMagic(u64::from(m))),
        };
        match validate(&req, self.backend.size(), self.backend.read_only()) {
            Verdict::Reject { errno, payload } => {
                skip(r, u64::from(payload))?;
                let mut w = lock(&self.w);
                send_error(&mut *w, self.structured, &req, errno)?;
                w.flush()?;
                return Ok(Next::Handled);
            }
            Verdict::RejectAndClose(errno) => {
                let mut w = lock(&self.w);
                send_error(&mut *w, self.structured, &req, errno)?;
                w.flush()?;
                return Err(ServeError::TooLarge(u64::from(req.length)));
            }
            Verdict::Execute => {}
        }
        if req.command == Command::Disc {
            return Ok(Next::Stop);
        }
        let len = req.length as usize;
        let bytes = match req.command {
            Command::Read | Command::Write => u64::from(req.length),
            _ => 0,
        };
        {
            let mut pushed = false;
            let mut st = lock(&self.state);
            loop {
                let full = (st.bytes > 0 && st.bytes + bytes > MAX_IN_FLIGHT_BYTES)
                    || st.relayed >= MAX_RELAYED;
                if !full || st.stop {
                    break;
                }
                // Requests the relay holds back must go out before we wait for their replies
                // (never with the state lock held: the relay thread needs it to free them).
                if let (Some(relay), false) = (&self.relay, pushed) {
                    drop(st);
                    relay.push();
                    pushed = true;
                    st = lock(&self.state);
                    continue;
                }
                st.blocked += 1;
                st = self.freed.wait(st).unwrap_or_else(|e| e.into_inner());
                st.blocked -= 1;
            }
            if st.stop {
                return Ok(Next::Stop);
            }
            st.bytes += bytes;
        }
        if bytes > 0 {
            buf.resize(len, 0);
        }
        if req.command == Command::Write
            && let Err(e) = r.read_exact(&mut buf[..len])
        {
            self.release(bytes);
            return Err(e.into());
        }
        Ok(Next::Execute(req, bytes))
    }

    fn release(&self, bytes: u64) {
        let mut st = lock(&self.state);
        st.bytes -= bytes;
        let wake = st.blocked > 0;
        drop(st);
        if wake {
            self.freed.notify_all();
        }
    }

    /// Offer a request just read (its payload in `buf`) to the relay; `true`: forwarded, its
    /// reply will come from the relay thread (started here the first time).
    fn try_relay<'s>(
        &'s self,
        scope: &'s std::thread::Scope<'s, '_>,
        req: &RequestHeader,
        buf: &[u8],
        r: &BufReader<R>,
    ) -> bool
    where
        R: 's,
        W: 's,
    {
        let Some(relay) = &self.relay else {
            return false;
        };
        let data = match req.command {
            Command::Read => &[][..],
            Command::Write => &buf[..req.length as usize],
            _ => return false,
        };
        // Counted first: the relay thread may answer it before `forward` returns.
        lock(&self.state).relayed += 1;
        let more = r.buffer().len() >= REQUEST_HEADER_LEN;
        if relay.forward(req, data, more) {
            if !self.relaying.swap(true, Ordering::SeqCst) {
                scope.spawn(move || self.relay_thread(&**relay));
            }
            true
        } else {
            lock(&self.state).relayed -= 1;
            false
        }
    }

    /// The relay thread: write each forwarded request's reply as it completes, flushing when
    /// no other completion is ready, until the relay is closed and drained.
    fn relay_thread(&self, relay: &dyn Relay) {
        let mut buf: Vec<u8> = Vec::new();
        let mut broken = false;
        while let Some(done) = relay.next_reply(&mut buf) {
            let req = done.request;
            if !broken {
                let last = !relay.reply_ready();
                let res = self.send_reply_when(last, |w| match (req.command, done.result) {
                    (Command::Read, Ok(())) => {
                        write_read_reply(w, self.structured, &req, &buf[..req.length as usize])
                    }
                    (_, res) => reply_status(w, self.structured, &req, res),
                });
                if let Err(e) = res {
                    // Keep draining the relay (its requests must still be released).
                    broken = true;
                    self.fail(e.into());
                }
            }
            let bytes = match req.command {
                Command::Read | Command::Write => u64::from(req.length),
                _ => 0,
            };
            let mut st = lock(&self.state);
            st.bytes -= bytes;
            st.relayed -= 1;
            let wake = st.blocked > 0;
            drop(st);
            if wake {
                self.freed.notify_all();
            }
            if buf.capacity() > 1 << 20 {
                buf = Vec::new();
            }
        }
    }

    /// One serving thread: take the reader, read one request, hand the reader on, execute the
    /// request and send its reply; repeat. A thread that finds nobody waiting to read after it
    /// starts another (up to [`MAX_IN_FLIGHT`]), so a busy connection keeps reading while earlier
    /// requests run, and an idle one keeps a single waiting thread.
    fn worker<'s>(&'s self, scope: &'s std::thread::Scope<'s, '_>)
    where
        R: 's,
        W: 's,
    {
        let mut buf: Vec<u8> = Vec::new();
        // Requests read after the first while the next ones were already buffered, and spare
        // buffers for them.
        let mut batch: Vec<(RequestHeader, u64, Vec<u8>)> = Vec::new();
        let mut spare: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut after: Option<Result<Next, ServeError>> = None;
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let next = {
                let mut r = lock(&self.r);
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                if self.stopped.load(Ordering::SeqCst) {
                    return;
                }
                // A request the relay forwards needs no thread: keep reading.
                let next = loop {
                    let next = self.next(&mut r, &mut buf);
                    match &next {
                        Ok(Next::Execute(req, _)) if self.try_relay(scope, req, &buf, &r) => {}
                        _ => break next,
                    }
                };
                // Small reads and writes already buffered behind a small one join it.
                if self.relay.is_none()
                    && let Ok(Next::Execute(req, _)) = &next
                    && matches!(req.command, Command::Read | Command::Write)
                    && req.length <= BATCH_REQUEST_LEN
                {
                    while batch.len() < MAX_BATCH && small_request_next(r.buffer()) {
                        let mut b = spare.pop().unwrap_or_default();
                        match self.next(&mut r, &mut b) {
                            Ok(Next::Execute(q, bytes)) => batch.push((q, bytes, b)),
                            Ok(Next::Handled) => spare.push(b),
                            other => {
                                // The reading ends here: nobody may read after us.
                                let mut st = lock(&self.state);
                                st.stop = true;
                                self.stopped.store(true, Ordering::SeqCst);
                                drop(st);
                                after = Some(other);
                                break;
                            }
                        }
                    }
                }
                next
            };
            if let Some(relay) = &self.relay {
                // Whatever comes next (a wait, or executing a request here), nothing forwarded
                // may stay behind.
                relay.push();
            }
            let (req, bytes) = match next {
                Ok(Next::Execute(req, bytes)) => (req, bytes),
                Ok(Next::Handled) => continue,
                Ok(Next::Stop) => {
                    let mut st = lock(&self.state);
                    st.stop = true;
                    self.stopped.store(true, Ordering::SeqCst);
                    drop(st);
                    self.freed.notify_all();
                    self.close_relay();
                    return;
                }
                Err(e) => return self.fail(e),
            };
            if self.waiting.load(Ordering::SeqCst) == 0
                && !self.stopped.load(Ordering::SeqCst)
                && self
                    .threads
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        (n < MAX_IN_FLIGHT).then_some(n + 1)
                    })
                    .is_ok()
            {
                scope.spawn(move || self.worker(scope));
            }
            let res = self.execute(&req, &mut buf);
            self.release(bytes);
            if let Err(e) = res {
                self.fail(e.into());
            }
            for (req, bytes, mut b) in batch.drain(..) {
                let res =
                    if self.stopped.load(Ordering::SeqCst) && lock(&self.state).error.is_some() {
                        Ok(())
                    } else {
                        self.execute(&req, &mut b)
                    };
                self.release(bytes);
                if let Err(e) = res {
                    self.fail(e.into());
                }
                if b.capacity() <= BATCH_REQUEST_LEN as usize {
                    spare.push(b);
                }
            }
            match after {
                Some(Ok(_)) => {
                    self.freed.notify_all();
                    self.close_relay();
                    return;
                }
                Some(Err(e)) => return self.fail(e),
                None => {}
            }
            if self.stopped.load(Ordering::SeqCst) && lock(&self.state).error.is_some() {
                return;
            }
            // Keep an idle thread from pinning a 32 MiB allocation.
            if buf.capacity() > 1 << 20 {
                buf = Vec::new();
            }
        }
    }

    /// Run one validated request on the backend and send its reply.
    fn execute(&self, req: &RequestHeader, buf: &mut [u8]) -> io::Result<()> {
        let backend = self.backend;
        let structured = self.structured;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let len = req.length as usize;
        let res = match req.command {
            Command::Read => {
                let res = backend.read_at(&mut buf[..len], req.offset);
                return self.send_reply(|w| match res {
                    Ok(()) => write_read_reply(w, structured, req, &buf[..len]),
                    Err(e) => send_error(w, structured, req, e),
                });
            }
            Command::Write => backend.write_at(&buf[..len], req.offset, fua),
            Command::Flush => backend.flush(),
            Command::Trim => backend
                .trim(req.offset, req.length)
                .and_then(|()| if fua { backend.flush() } else { Ok(()) }),
            Command::WriteZeroes => {
                let flags = ZeroFlags {
                    fua,
                    no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
                    fast: req.flags & CMD_FLAG_FAST_ZERO != 0,
                };
                backend.write_zeroes(req.offset, req.length, flags)
            }
            Command::BlockStatus if self.base_allocation => {
                let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
                let res = backend.block_status(req.offset, req.length).and_then(|ex| {
                    encode_block_status(META_BASE_ALLOCATION_ID, &ex, req.length, req_one)
                        .ok_or(Errno::Io)
                });
                return self.send_reply(|w| match res {
                    Ok(payload) => {
                        w.write_all(&chunk_header(
                            REPLY_FLAG_DONE,
                            REPLY_TYPE_BLOCK_STATUS,
                            req.cookie,
                            payload.len() as u32,
                        ))?;
                        w.write_all(&payload)
                    }
                    Err(e) => send_error(w, structured, req, e),
                });
            }
            Command::Disc | Command::Unknown(_) | Command::BlockStatus => Err(Errno::Inval),
        };
        self.send_reply(|w| reply_status(w, structured, req, res))
    }

    /// Write one reply. Threads queue on the writer; the last one queued sends everything
    /// buffered, so replies that complete together leave in one write to the socket.
    fn send_reply(&self, f: impl FnOnce(&mut W) -> io::Result<()>) -> io::Result<()> {
        self.send_reply_when(true, f)
    }

    /// [`Self::send_reply`], where `last` false means the caller has another reply to send at
    /// once (and will flush then).
    fn send_reply_when(
        &self,
        last: bool,
        f: impl FnOnce(&mut W) -> io::Result<()>,
    ) -> io::Result<()> {
        self.replying.fetch_add(1, Ordering::SeqCst);
        let mut w = lock(&self.w);
        let res = f(&mut w);
        // Every thread counted here takes the writer after us, and the last one flushes.
        if self.replying.fetch_sub(1, Ordering::SeqCst) == 1 && last {
            res.and_then(|()| w.flush())
        } else {
            res
        }
    }
}

/// The transmission phase. Requests are read in order by one thread at a time and executed
/// concurrently (up to [`MAX_IN_FLIGHT`], within [`MAX_IN_FLIGHT_BYTES`]); each reply is sent as
/// its request completes, so replies may come out of order (matched by cookie, as NBD allows).
/// A write is replied to only after the backend has done it, and a FLUSH calls the backend's
/// flush only once read, so it covers every write replied to before it was sent. DISC stops the
/// reading; requests already read still complete and are answered before the connection ends.
fn transmission<R: Read + Send, W: Write + Send>(
    r: BufReader<R>,
    w: W,
    backend: &dyn Backend,
    relay: Option<Box<dyn Relay>>,
    structured: bool,
    base_allocation: bool,
) -> Result<(), ServeError> {
    let conn = Conn {
        r: Mutex::new(r),
        w: Mutex::new(w),
        backend,
        relay,
        relaying: AtomicBool::new(false),
        structured,
        base_allocation,
        state: Mutex::new(ConnState::default()),
        freed: Condvar::new(),
        replying: AtomicUsize::new(0),
        threads: AtomicUsize::new(1),
        waiting: AtomicUsize::new(0),
        stopped: AtomicBool::new(false),
    };
    std::thread::scope(|scope| conn.worker(scope));
    let Conn { w, state, .. } = conn;
    let state = state.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = state.error {
        return Err(e);
    }
    w.into_inner().unwrap_or_else(|e| e.into_inner()).flush()?;
    Ok(())
}

/// A successful READ's reply: one data chunk (structured) or the simple reply and the data.
fn write_read_reply<W: Write>(
    w: &mut W,
    structured: bool,
    req: &RequestHeader,
    data: &[u8],
) -> io::Result<()> {
    if structured {
        w.write_all(&chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            req.cookie,
            8 + req.length,
        ))?;
        w.write_all(&req.offset.to_be_bytes())?;
        w.write_all(data)
    } else {
        w.write_all(&simple_reply(req.cookie, 0))?;
        w.write_all(data)
    }
}

fn reply_status<W: Write>(
    w: &mut W,
    structured: bool,
    req: &RequestHeader,
    res: Result<(), Errno>,
) -> io::Result<()> {
    match res {
        Ok(()) => w.write_all(&simple_reply(req.cookie, 0)),
        Err(e) => send_error(w, structured, req, e),
    }
}

/// Serve one TCP connection (buffered both ways), plain, with no limits.
pub fn serve_tcp(stream: TcpStream, exports: &dyn Exports) -> Result<(), ServeError> {
    let peer = Peer {
        addr: stream.peer_addr().ok(),
        id: None,
    };
    serve_conn(
        stream,
        exports,
        None,
        &peer,
        Instant::now(),
        None,
        &mut |_| {},
    )
}

/// Serve one TCP connection: plain when `tls` is `None`; otherwise TLS is required (options
/// before `NBD_OPT_STARTTLS` get `NBD_REP_ERR_TLS_REQD`), the TLS handshake must end by
/// `deadline`, and the client's certificate names it ([`Peer::id`]). With `option_age`, an
/// option read after it ran out is refused and the connection closed.
fn serve_conn(
    stream: TcpStream,
    exports: &dyn Exports,
    tls: Option<&ServerTls>,
    peer: &Peer,
    deadline: Instant,
    option_age: Option<OptionAge>,
    on_phase: &mut dyn FnMut(Phase),
) -> Result<(), ServeError> {
    stream.set_nodelay(true)?;
    let Some(tls) = tls else {
        // `serve` buffers the reading side itself.
        let r = stream.try_clone()?;
        let w = BufWriter::with_capacity(256 * 1024, stream);
        let mut r = BufReader::with_capacity(256 * 1024, r);
        let mut w = w;
        let no_zeroes = greet(&mut r, &mut w)?;
        let session = Session::new(no_zeroes, false, option_age);
        return serve_session(r, w, exports, peer, session, on_phase);
    };
    // Before TLS: unbuffered, so no byte of the TLS handshake is read as NBD.
    let mut plain = &stream;
    let mut w = &stream;
    let no_zeroes = greet(&mut plain, &mut w)?;
    if !await_starttls(&mut plain, &mut w)? {
        return Ok(());
    }
    let (r, w, id) = tls::accept(tls, stream, deadline).map_err(ServeError::Tls)?;
    let peer = Peer {
        addr: peer.addr,
        id: Some(id),
    };
    let r = BufReader::with_capacity(256 * 1024, r);
    let w = BufWriter::with_capacity(256 * 1024, w);
    let session = Session::new(no_zeroes, true, option_age);
    serve_session(r, w, exports, &peer, session, on_phase)
}

/// Limits and TLS of a listener ([`run_listener_with`]).
#[derive(Debug, Clone)]
pub struct ListenerOptions {
    /// With it, TLS is required and plain clients are refused.
    pub tls: Option<ServerTls>,
    /// Connections served at once; one more is accepted and closed at once (so the backlog
    /// keeps draining), and counted in [`ListenerStats::over_cap`].
    pub max_connections: usize,
    /// From accept to the selected export (greeting, STARTTLS, TLS handshake, options), and
    /// after each control request ([`OPT_TERN_CONTROL`]) to the next option: a connection still
    /// haggling after it is closed. The time the server spends on a control request does not
    /// count.
    pub handshake_timeout: Duration,
    /// How long a connection may stay in option haggling in all, from accept: an option read
    /// later (a control request on a kept connection, say) is answered `NBD_REP_ERR_SHUTDOWN`,
    /// not carried out, and the connection closed. Control connections that a client keeps
    /// open for one request after another are thus cut at their first request past it, so a
    /// certificate revoked meanwhile meets the revocation list at the next TLS handshake even
    /// when its client ignores its own age cap. With `handshake_timeout` this bounds the whole
    /// option phase: `max_option_age + handshake_timeout` plus the server's own work.
    pub max_option_age: Duration,
    /// In transmission: a connection that sends no request for this long is closed. `None`:
    /// idle connections stay (a VM's disk may be idle for hours).
    pub idle_timeout: Option<Duration>,
    /// Refusals (TLS, cap, accept errors) are written to stderr with this prefix; `None`: silent.
    pub log_prefix: Option<String>,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            tls: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_option_age: DEFAULT_MAX_OPTION_AGE,
            idle_timeout: None,
            log_prefix: None,
        }
    }
}

/// Default of [`ListenerOptions::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default of [`ListenerOptions::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ListenerOptions::max_option_age`]: a revoked peer's kept control connection
/// ends within about a minute.
pub const DEFAULT_MAX_OPTION_AGE: Duration = Duration::from_secs(60);

/// Counters of a listener, readable while it runs.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections being served now.
    pub live: AtomicUsize,
    /// Connections accepted and closed at once because [`ListenerOptions::max_connections`]
    /// were being served.
    pub over_cap: AtomicUsize,
    /// Connections closed by the handshake deadline.
    pub handshake_timeouts: AtomicUsize,
    /// Connections closed at an option that came after [`ListenerOptions::max_option_age`].
    pub option_age_closes: AtomicUsize,
    /// `accept` errors retried (`EMFILE`, `ECONNABORTED`, …), and connections dropped for want
    /// of a descriptor.
    pub accept_errors: AtomicUsize,
    /// Of those, `accept` itself out of descriptors or memory (`EMFILE`, `ENFILE`, …).
    pub accept_emfile: AtomicUsize,
}

/// What to do after an `accept` error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptRetry {
    /// A connection died before we took it (`ECONNABORTED`, `EPROTO`, `EINTR`): next one.
    Now,
    /// Out of descriptors or memory (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`): wait, then retry.
    Later,
    /// The listening socket itself is unusable (`EBADF`, `EINVAL`, `ENOTSOCK`, `EOPNOTSUPP`).
    Fatal,
}

/// Classify an `accept` error (pure).
fn accept_retry(e: &io::Error) -> AcceptRetry {
    match e.raw_os_error() {
        Some(9 | 22 | 88 | 95) => AcceptRetry::Fatal,
        Some(23 | 24 | 105 | 12) => AcceptRetry::Later,
        _ => AcceptRetry::Now,
    }
}

/// The back-off after `n` accept errors in a row that asked to wait: 10 ms doubling, at most 1 s.
fn accept_backoff(n: u32) -> Duration {
    Duration::from_millis(10u64.saturating_mul(1 << n.min(7)).min(1000))
}

/// Closes connections whose handshake deadline passed (one thread per listener).
struct Watchdog {
    /// Per connection: its deadline (`None`: paused while the server works) and its socket.
    armed: Mutex<BTreeMap<u64, (Option<Instant>, TcpStream)>>,
    changed: Condvar,
}

impl Watchdog {
    fn arm(&self, id: u64, deadline: Instant, stream: TcpStream) {
        lock(&self.armed).insert(id, (Some(deadline), stream));
        self.changed.notify_one();
    }
    /// A new deadline (`None`: none for now) for a connection still watched.
    fn set_deadline(&self, id: u64, deadline: Option<Instant>) {
        if let Some(e) = lock(&self.armed).get_mut(&id) {
            e.0 = deadline;
        }
        self.changed.notify_one();
    }
    fn disarm(&self, id: u64) {
        lock(&self.armed).remove(&id);
    }
    /// Run until the listener is gone.
    fn run(me: Weak<Watchdog>, stats: Weak<ListenerStats>) {
        loop {
            let Some(w) = me.upgrade() else { return };
            let mut armed = lock(&w.armed);
            let now = Instant::now();
            let expired: Vec<u64> = armed
                .iter()
                .filter(|(_, (d, _))| d.is_some_and(|d| d <= now))
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                if let Some((_, s)) = armed.remove(&id) {
                    if let Some(st) = stats.upgrade() {
                        st.handshake_timeouts.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
            let next = armed
                .values()
                .filter_map(|(d, _)| d.map(|d| d.saturating_duration_since(now)))
                .min()
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(5), Duration::from_secs(1));
            drop(w.changed.wait_timeout(armed, next));
        }
    }
}

/// Accept connections forever, one thread per client, plain and with the default limits.
pub fn run_listener(listener: TcpListener, exports: Arc<dyn Exports>) -> io::Result<()> {
    run_listener_with(
        listener,
        exports,
        ListenerOptions::default(),
        Arc::default(),
    )
}

/// Accept connections until the listening socket itself fails, one thread per client, within
/// `opts`' limits: at most `max_connections` at once, each closed if it has not selected an
/// export `handshake_timeout` after it was accepted (or after its last control request), at its
/// first option later than `max_option_age` after it was accepted, and in transmission after
/// `idle_timeout` without a request. An `accept` error never ends the loop unless the listening socket is
/// unusable: a lost connection is skipped, running out of descriptors or memory waits (10 ms
/// doubling to 1 s) and tries again.
pub fn run_listener_with(
    listener: TcpListener,
    exports: Arc<dyn Exports>,
    opts: ListenerOptions,
    stats: Arc<ListenerStats>,
) -> io::Result<()> {
    let opts = Arc::new(opts);
    let watchdog = Arc::new(Watchdog {
        armed: Mutex::new(BTreeMap::new()),
        changed: Condvar::new(),
    });
    {
        let (w, st) = (Arc::downgrade(&watchdog), Arc::downgrade(&stats));
        std::thread::Builder::new()
            .name("nbd-watchdog".into())
            .spawn(move || Watchdog::run(w, st))?;
    }
    let log = |msg: &str| {
        if let Some(p) = &opts.log_prefix {
            eprintln!("{p}: {msg}");
        }
    };
    let mut waits = 0u32;
    let mut next_id = 0u64;
    loop {
        let (stream, addr) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                let n = stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                stats.accept_emfile.fetch_add(
                    usize::from(accept_retry(&e) == AcceptRetry::Later),
                    Ordering::Relaxed,
                );
                match accept_retry(&e) {
                    AcceptRetry::Fatal => return Err(e),
                    AcceptRetry::Now => {}
                    AcceptRetry::Later => {
                        let wait = accept_backoff(waits);
                        waits = waits.saturating_add(1);
                        if n.is_power_of_two() || n == 0 {
                            log(&format!("accept failed ({e}); retrying in {wait:?}"));
                        }
                        std::thread::sleep(wait);
                    }
                }
                continue;
            }
        };
        waits = 0;
        if stats.live.load(Ordering::SeqCst) >= opts.max_connections {
            let n = stats.over_cap.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() || n == 0 {
                log(&format!(
                    "{} connections open, the most allowed: closing {addr} ({} refused so far)",
                    opts.max_connections,
                    n + 1
                ));
            }
            continue;
        }
        next_id += 1;
        let id = next_id;
        let accepted = Instant::now();
        let deadline = accepted + opts.handshake_timeout;
        match stream.try_clone() {
            Ok(s) => watchdog.arm(id, deadline, s),
            Err(e) => {
                // Out of descriptors: this one goes, and the next accept waits.
                stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                let wait = accept_backoff(waits);
                waits = waits.saturating_add(1);
                log(&format!(
                    "no descriptor for a new connection ({e}); waiting {wait:?}"
                ));
                std::thread::sleep(wait);
                continue;
            }
        }
        stats.live.fetch_add(1, Ordering::SeqCst);
        let conn = ConnSlot {
            id,
            watchdog: Arc::clone(&watchdog),
            stats: Arc::clone(&stats),
        };
        let (exports, opts2) = (Arc::clone(&exports), Arc::clone(&opts));
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                let peer = Peer {
                    addr: Some(addr),
                    id: None,
                };
                let idle = opts2.idle_timeout;
                let tcp = stream.try_clone().ok();
                let handshake_timeout = opts2.handshake_timeout;
                let mut on_phase = |p: Phase| match p {
                    Phase::Working => conn.watchdog.set_deadline(conn.id, None),
                    Phase::Options => conn
                        .watchdog
                        .set_deadline(conn.id, Some(Instant::now() + handshake_timeout)),
                    Phase::Transmission => {
                        conn.watchdog.disarm(conn.id);
                        if let Some(t) = &tcp {
                            let _ = t.set_read_timeout(idle);
                        }
                    }
                };
                let option_age = OptionAge {
                    accepted,
                    max: opts2.max_option_age,
                };
                let res = serve_conn(
                    stream,
                    &*exports,
                    opts2.tls.as_ref(),
                    &peer,
                    deadline,
                    Some(option_age),
                    &mut on_phase,
                );
                if let Err(ServeError::OptionAge { .. }) = &res {
                    conn.stats.option_age_closes.fetch_add(1, Ordering::Relaxed);
                }
                if let (
                    Err(
                        e @ (ServeError::Tls(_)
                        | ServeError::TlsRequired
                        | ServeError::OptionAge { .. }),
                    ),
                    Some(p),
                ) = (&res, &opts2.log_prefix)
                {
                    let what = if matches!(e, ServeError::OptionAge { .. }) {
                        "closed"
                    } else {
                        "refused"
                    };
                    eprintln!("{p}: {what} {addr}: {}", error_chain(e));
                }
                drop(conn);
            });
        if spawned.is_err() {
            // No thread for it (the slot's guard went with the closure): keep accepting.
            log("cannot start a connection thread; connection closed");
        }
    }
}

/// `e: cause: cause…` on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut c = e.source();
    while let Some(x) = c {
        out.push_str(": ");
        out.push_str(&x.to_string());
        c = x.source();
    }
    out
}

/// One served connection: frees its place in the cap and its watchdog entry when it ends.
struct ConnSlot {
    id: u64,
    watchdog: Arc<Watchdog>,
    stats: Arc<ListenerStats>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.watchdog.disarm(self.id);
        self.stats.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serve one TCP connection with `opts`' TLS and no listener (tests, single connections):
/// the handshake deadline is enforced on the TLS handshake only, the option age as by a
/// listener.
pub fn serve_tcp_with(
    stream: TcpStream,
    exports: &dyn Exports,
    opts: &ListenerOptions,
) -> Result<(), ServeError> {
    let peer = Peer {
        addr: stream.peer_addr().ok(),
        id: None,
    };
    let accepted = Instant::now();
    let option_age = OptionAge {
        accepted,
        max: opts.max_option_age,
    };
    serve_conn(
        stream,
        exports,
        opts.tls.as_ref(),
        &peer,
        accepted + opts.handshake_timeout,
        Some(option_age),
        &mut |_| {},
    )
}

#[cfg(test)]
mod listener_tests {
    use super::*;

    #[test]
    fn options_are_carried_out_only_within_the_option_age_but_abort_always() {
        let ms = Duration::from_millis;
        let max = ms(60_000);
        assert!(option_allowed(OPT_TERN_CONTROL, ms(59_999), max));
        assert!(!option_allowed(OPT_TERN_CONTROL, ms(60_000), max));
        assert!(!option_allowed(OPT_GO, ms(60_001), max));
        assert!(!option_allowed(OPT_EXPORT_NAME, ms(3_600_000), max));
        assert!(option_allowed(OPT_ABORT, ms(3_600_000), max));
        assert!(
            !option_allowed(OPT_LIST, ms(0), Duration::ZERO),
            "limit 0: none"
        );
    }

    #[test]
    fn accept_errors_that_concern_one_connection_are_skipped_and_exhaustion_waits() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(accept_retry(&e(103)), AcceptRetry::Now); // ECONNABORTED
        assert_eq!(accept_retry(&e(71)), AcceptRetry::Now); // EPROTO
        assert_eq!(accept_retry(&e(4)), AcceptRetry::Now); // EINTR
        assert_eq!(accept_retry(&e(24)), AcceptRetry::Later); // EMFILE
        assert_eq!(accept_retry(&e(23)), AcceptRetry::Later); // ENFILE
        assert_eq!(accept_retry(&e(105)), AcceptRetry::Later); // ENOBUFS
        assert_eq!(accept_retry(&e(9)), AcceptRetry::Fatal); // EBADF
        assert_eq!(accept_retry(&e(22)), AcceptRetry::Fatal); // EINVAL (not listening)
    }

    #[test]
    fn accept_backoff_doubles_from_10_ms_up_to_1_s() {
        assert_eq!(accept_backoff(0), Duration::from_millis(10));
        assert_eq!(accept_backoff(1), Duration::from_millis(20));
        assert_eq!(accept_backoff(6), Duration::from_millis(640));
        assert_eq!(accept_backoff(7), Duration::from_millis(1000));
        assert_eq!(accept_backoff(u32::MAX), Duration::from_millis(1000));
    }
}

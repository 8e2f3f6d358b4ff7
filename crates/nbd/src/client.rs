//! A synchronous NBD client: fixed-newstyle handshake with structured replies, then one request at
//! a time (each reply is awaited, so replies can never be matched to the wrong request).

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};

use crate::proto::*;

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
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
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

type Halves = (BufReader<TcpStream>, BufWriter<TcpStream>);

fn open(addr: impl ToSocketAddrs) -> Result<Halves, ClientError> {
    let s = TcpStream::connect(addr)?;
    handshake_start(s)
}

fn open_timeout(
    addr: impl ToSocketAddrs,
    timeout: std::time::Duration,
) -> Result<Halves, ClientError> {
    let sa = addr.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "address resolves to nothing")
    })?;
    let s = TcpStream::connect_timeout(&sa, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    handshake_start(s)
}

fn handshake_start(s: TcpStream) -> Result<Halves, ClientError> {
    s.set_nodelay(true)?;
    let mut r = BufReader::with_capacity(256 * 1024, s.try_clone()?);
    let mut w = BufWriter::with_capacity(256 * 1024, s);
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
    Ok((r, w))
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
    let (mut r, mut w) = open(addr)?;
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
    let (mut r, mut w) = open_timeout(addr, timeout)?;
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
        Client::go(open_timeout(addr, timeout)?, export)
    }

    fn go((mut r, mut w): Halves, export: &str) -> Result<Client, ClientError> {
        send_opt(&mut w, OPT_STRUCTURED_REPLY, &[])?;
        let structured = recv_opt(&mut r, OPT_STRUCTURED_REPLY)?.reply == REP_ACK;
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

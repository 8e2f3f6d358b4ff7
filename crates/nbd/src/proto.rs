//! Wire constants and pure encoders/decoders of the NBD protocol (no I/O).
//!
//! Everything here works on byte slices so that it can be tested and fuzzed without sockets.

#![deny(clippy::disallowed_methods)]
/// `NBDMAGIC`, first thing the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic and prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server will not send the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server).
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client agrees to skip the 124 zero bytes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Option codes.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort the handshake.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade the connection to TLS; option haggling then starts again inside it.
pub const OPT_STARTTLS: u32 = 5;
/// Ask about an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Select an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Negotiate structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List the metadata contexts matching some queries.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts for `NBD_CMD_BLOCK_STATUS` (after structured replies).
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// The one metadata context we offer: allocation state (holes, zeroes) of the export.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// The id we give `base:allocation` in `NBD_REP_META_CONTEXT`.
pub const META_BASE_ALLOCATION_ID: u32 = 1;
/// `base:allocation` state bit: the range is not allocated (a hole).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state bit: the range reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// Most descriptors in one `BLOCK_STATUS` reply (64 KiB of payload); a client asks again for the rest.
pub const MAX_STATUS_DESCRIPTORS: usize = 8192;

/// Tern's private option: a control request (JSON) answered with [`REP_TERN_CONTROL`]. Standard
/// servers answer it with `NBD_REP_ERR_UNSUP`; standard clients never send it. This lets one port
/// carry both NBD and the volume's control protocol.
pub const OPT_TERN_CONTROL: u32 = 0x5445_524e;
/// Reply type of [`OPT_TERN_CONTROL`].
pub const REP_TERN_CONTROL: u32 = 0x5445;
/// Largest control reply a client accepts.
pub const MAX_CONTROL_REPLY: u32 = 16 * 1024 * 1024;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// One export in a LIST reply.
pub const REP_SERVER: u32 = 2;
/// One information item in an INFO/GO reply.
pub const REP_INFO: u32 = 3;
/// One metadata context (id, name) in a LIST/SET_META_CONTEXT reply.
pub const REP_META_CONTEXT: u32 = 4;
/// Error bit of option reply types.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option not supported.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Refused by the server's policy (the client's identity may not use this export).
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option malformed.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// The server requires TLS before this option (`NBD_OPT_STARTTLS` first).
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Export unknown.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// The server will not go on with option haggling on this connection and closes it; the
/// option it answers was not carried out (Tern's server: the connection spent longer than its
/// `max_option_age` in option haggling; the client may send the option again on a new one).
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Option data too big.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Information types inside `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
/// Export name.
pub const INFO_NAME: u16 = 1;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// Server understands FLUSH.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// Server understands FUA.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// Server understands TRIM.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// Server understands WRITE_ZEROES.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Server understands the DF flag.
pub const TF_SEND_DF: u16 = 1 << 7;
/// FLUSH on one connection covers writes acknowledged on every connection.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// Server understands `NBD_CMD_FLAG_FAST_ZERO`.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// WRITE_ZEROES must write real zeroes (no holes).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// READ: do not fragment the reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// BLOCK_STATUS: one descriptor per context is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// WRITE_ZEROES: fail with `ENOTSUP` at once unless zeroing is faster than writing zeroes.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// All command flags this implementation knows.
pub const CMD_FLAGS_KNOWN: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

/// Structured reply chunk flag: last chunk for this cookie.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A hole at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// An error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// An error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;
/// Block status descriptors of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;

/// Largest request payload we accept (and advertise as the maximum block size).
pub const MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;
/// Largest option payload we read during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest export name.
pub const MAX_NAME_LEN: usize = 4096;

/// NBD error numbers (the wire values, which equal Linux errno values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Errno {
    /// EPERM: operation not permitted (a stale lease epoch, a read-only export).
    Perm,
    /// EIO: input/output error.
    Io,
    /// ENOMEM.
    NoMem,
    /// EINVAL: malformed request.
    Inval,
    /// ENOSPC: write past the end or no space.
    NoSpc,
    /// EOVERFLOW: request too large.
    Overflow,
    /// ENOTSUP: command not supported.
    NotSup,
    /// ESHUTDOWN: the server is going away (or the client has been fenced).
    Shutdown,
    /// Any other value received from a peer.
    Other(u32),
}

impl Errno {
    /// Wire value.
    pub fn code(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
            Errno::Other(v) => v,
        }
    }

    /// Decode a wire value.
    pub fn from_code(v: u32) -> Errno {
        match v {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            22 => Errno::Inval,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            v => Errno::Other(v),
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
            Errno::Other(v) => return write!(f, "errno {v}"),
        };
        f.write_str(s)
    }
}

/// Transmission command types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes at `offset`.
    Read,
    /// Write `length` bytes (which follow the header) at `offset`.
    Write,
    /// Soft disconnect.
    Disc,
    /// Make every acknowledged write durable.
    Flush,
    /// Discard a range (reads afterwards return unspecified data; we return zeroes).
    Trim,
    /// Write zeroes over a range.
    WriteZeroes,
    /// Allocation status of a range (needs a metadata context).
    BlockStatus,
    /// Any other type, answered with `EINVAL`.
    Unknown(u16),
}

impl Command {
    /// Wire value.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(v) => v,
        }
    }

    /// Decode a wire value.
    pub fn from_code(v: u16) -> Command {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            v => Command::Unknown(v),
        }
    }
}

/// Size of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;

/// A decoded request header (the payload of a WRITE follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub command: Command,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

/// A request header that cannot be decoded at all: the stream is out of sync and must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

impl RequestHeader {
    /// Encode to wire bytes.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decode from wire bytes.
    pub fn decode(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, BadMagic> {
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: be16(&b[4..6]),
            command: Command::from_code(be16(&b[6..8])),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }
}

/// What a server must do with a request, decided from its header alone (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Carry it out.
    Execute,
    /// Reply with this error; `payload` bytes of WRITE data follow on the wire and must be skipped.
    Reject {
        /// The error to send.
        errno: Errno,
        /// How many payload bytes to discard before the next header.
        payload: u32,
    },
    /// The stream cannot be resynchronised (a WRITE too large to skip): reply, then close.
    RejectAndClose(Errno),
}

/// Validate a request against the export (size, flags, limits) without touching any data.
pub fn validate(req: &RequestHeader, export_size: u64, read_only: bool) -> Verdict {
    let is_write = req.command == Command::Write;
    let payload = if is_write { req.length } else { 0 };
    if req.length > MAX_REQUEST_LEN {
        if is_write {
            return Verdict::RejectAndClose(Errno::Overflow);
        }
        if matches!(req.command, Command::Read) {
            return Verdict::Reject {
                errno: Errno::Overflow,
                payload: 0,
            };
        }
    }
    let fast_zero_misused =
        req.flags & CMD_FLAG_FAST_ZERO != 0 && req.command != Command::WriteZeroes;
    if req.flags & !CMD_FLAGS_KNOWN != 0 || fast_zero_misused {
        return Verdict::Reject {
            errno: Errno::Inval,
            payload,
        };
    }
    match req.command {
        Command::Unknown(_) => Verdict::Reject {
            errno: Errno::Inval,
            payload,
        },
        Command::Disc => Verdict::Execute,
        Command::Flush => {
            if req.offset != 0 || req.length != 0 {
                Verdict::Reject {
                    errno: Errno::Inval,
                    payload,
                }
            } else {
                Verdict::Execute
            }
        }
        Command::BlockStatus => {
            let end = req.offset.checked_add(u64::from(req.length));
            if req.length == 0 || !matches!(end, Some(e) if e <= export_size) {
                Verdict::Reject {
                    errno: Errno::Inval,
                    payload,
                }
            } else {
                Verdict::Execute
            }
        }
        Command::Read | Command::Write | Command::Trim | Command::WriteZeroes => {
            let end = req.offset.checked_add(u64::from(req.length));
            let in_bounds = matches!(end, Some(e) if e <= export_size);
            let mutates = !matches!(req.command, Command::Read);
            if mutates && read_only {
                return Verdict::Reject {
                    errno: Errno::Perm,
                    payload,
                };
            }
            if !in_bounds {
                let errno = if mutates { Errno::NoSpc } else { Errno::Inval };
                return Verdict::Reject { errno, payload };
            }
            if req.length == 0 && !matches!(req.command, Command::Read) {
                // Zero-length writes/trims are allowed but pointless; accept them.
                return Verdict::Execute;
            }
            Verdict::Execute
        }
    }
}

/// Encode a simple reply header.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encode a structured reply chunk header (20 bytes).
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// Encode an option reply header.
pub fn option_reply(option: u32, reply: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&reply.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// The body of `NBD_OPT_GO` / `NBD_OPT_INFO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    /// Export name.
    pub name: String,
    /// Information items requested.
    pub infos: Vec<u16>,
}

/// Why an option body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// Lengths inside the body disagree with its size, or the name is not UTF-8.
    #[error("Malformed option data")]
    Invalid,
}

/// Decode a GO/INFO body.
pub fn decode_go(data: &[u8]) -> Result<GoRequest, OptionError> {
    if data.len() < 6 {
        return Err(OptionError::Invalid);
    }
    let name_len = be32(&data[0..4]) as usize;
    if name_len > MAX_NAME_LEN || data.len() < 4 + name_len + 2 {
        return Err(OptionError::Invalid);
    }
    let name = std::str::from_utf8(&data[4..4 + name_len]).map_err(|_| OptionError::Invalid)?;
    let n = be16(&data[4 + name_len..6 + name_len]) as usize;
    let rest = &data[6 + name_len..];
    if rest.len() != n * 2 {
        return Err(OptionError::Invalid);
    }
    let infos = rest.chunks_exact(2).map(be16).collect();
    Ok(GoRequest {
        name: name.to_owned(),
        infos,
    })
}

/// Encode a GO/INFO body.
pub fn encode_go(req: &GoRequest) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 + req.name.len() + 2 * req.infos.len());
    v.extend_from_slice(&(req.name.len() as u32).to_be_bytes());
    v.extend_from_slice(req.name.as_bytes());
    v.extend_from_slice(&(req.infos.len() as u16).to_be_bytes());
    for i in &req.infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// The body of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name the contexts are for.
    pub name: String,
    /// Queries (`namespace:` or `namespace:leaf`).
    pub queries: Vec<String>,
}

/// Decode a LIST/SET_META_CONTEXT body (bounded by the option length already checked).
pub fn decode_meta_context(data: &[u8]) -> Result<MetaContextRequest, OptionError> {
    let mut pos = 0usize;
    let mut take = |n: usize| -> Result<&[u8], OptionError> {
        let end = pos.checked_add(n).filter(|&e| e <= data.len());
        let end = end.ok_or(OptionError::Invalid)?;
        let b = &data[pos..end];
        pos = end;
        Ok(b)
    };
    let name_len = be32(take(4)?) as usize;
    if name_len > MAX_NAME_LEN {
        return Err(OptionError::Invalid);
    }
    let name = std::str::from_utf8(take(name_len)?).map_err(|_| OptionError::Invalid)?;
    let name = name.to_owned();
    let n = be32(take(4)?) as usize;
    // Each query takes at least 4 bytes: refuse counts the body cannot hold before allocating.
    if n > data.len() / 4 {
        return Err(OptionError::Invalid);
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        let len = be32(take(4)?) as usize;
        let q = std::str::from_utf8(take(len)?).map_err(|_| OptionError::Invalid)?;
        queries.push(q.to_owned());
    }
    if pos != data.len() {
        return Err(OptionError::Invalid);
    }
    Ok(MetaContextRequest { name, queries })
}

/// Encode a LIST/SET_META_CONTEXT body.
pub fn encode_meta_context(req: &MetaContextRequest) -> Vec<u8> {
    let mut v = (req.name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(req.name.as_bytes());
    v.extend_from_slice(&(req.queries.len() as u32).to_be_bytes());
    for q in &req.queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Whether a metadata context query selects `base:allocation`. With `list`, the namespace
/// wildcard `base:` matches too (SET needs the full name).
pub fn query_selects_base_allocation(query: &str, list: bool) -> bool {
    query == META_BASE_ALLOCATION || (list && query == "base:")
}

/// One run of a `base:allocation` answer: `len` bytes in one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Length in bytes.
    pub len: u64,
    /// Not allocated.
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

impl StatusExtent {
    /// The `base:allocation` state bits.
    pub fn flags(&self) -> u32 {
        (if self.hole { STATE_HOLE } else { 0 }) | (if self.zero { STATE_ZERO } else { 0 })
    }
}

/// Encode the payload of a `BLOCK_STATUS` chunk for `context`, covering at most `len` bytes from
/// the start of `extents` (merging neighbours in the same state, dropping empty ones), at most
/// [`MAX_STATUS_DESCRIPTORS`] descriptors, or one with `req_one`. `None` when nothing is left.
pub fn encode_block_status(
    context: u32,
    extents: &[StatusExtent],
    len: u32,
    req_one: bool,
) -> Option<Vec<u8>> {
    let max = if req_one { 1 } else { MAX_STATUS_DESCRIPTORS };
    let mut descs: Vec<(u32, u32)> = Vec::new();
    let mut left = u64::from(len);
    for e in extents {
        if left == 0 {
            break;
        }
        let n = e.len.min(left);
        if n == 0 {
            continue;
        }
        left -= n;
        let full = descs.len() == max;
        match descs.last_mut() {
            Some((l, f)) if *f == e.flags() => *l += n as u32,
            _ if full => break,
            _ => descs.push((n as u32, e.flags())),
        }
    }
    if descs.is_empty() {
        return None;
    }
    let mut v = Vec::with_capacity(4 + 8 * descs.len());
    v.extend_from_slice(&context.to_be_bytes());
    for (l, f) in descs {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    Some(v)
}

pub(crate) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hdr(command: Command, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags: 0,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn read_past_end_is_einval_and_write_past_end_is_enospc() {
        assert_eq!(
            validate(&hdr(Command::Read, 4096, 1), 4096, false),
            Verdict::Reject {
                errno: Errno::Inval,
                payload: 0
            }
        );
        assert_eq!(
            validate(&hdr(Command::Write, 4000, 200), 4096, false),
            Verdict::Reject {
                errno: Errno::NoSpc,
                payload: 200
            }
        );
    }

    #[test]
    fn offset_plus_length_overflow_is_rejected() {
        assert_eq!(
            validate(&hdr(Command::Read, u64::MAX, 10), u64::MAX, false),
            Verdict::Reject {
                errno: Errno::Inval,
                payload: 0
            }
        );
    }

    #[test]
    fn oversized_read_is_eoverflow_and_oversized_write_closes() {
        assert_eq!(
            validate(&hdr(Command::Read, 0, MAX_REQUEST_LEN + 1), u64::MAX, false),
            Verdict::Reject {
                errno: Errno::Overflow,
                payload: 0
            }
        );
        assert_eq!(
            validate(
                &hdr(Command::Write, 0, MAX_REQUEST_LEN + 1),
                u64::MAX,
                false
            ),
            Verdict::RejectAndClose(Errno::Overflow)
        );
    }

    #[test]
    fn writes_to_read_only_export_are_eperm() {
        assert_eq!(
            validate(&hdr(Command::Write, 0, 512), 4096, true),
            Verdict::Reject {
                errno: Errno::Perm,
                payload: 512
            }
        );
        assert_eq!(
            validate(&hdr(Command::Read, 0, 512), 4096, true),
            Verdict::Execute
        );
    }

    #[test]
    fn flush_with_range_and_unknown_flags_are_einval() {
        assert_eq!(
            validate(&hdr(Command::Flush, 1, 0), 4096, false),
            Verdict::Reject {
                errno: Errno::Inval,
                payload: 0
            }
        );
        let mut h = hdr(Command::Read, 0, 1);
        h.flags = 1 << 9;
        assert_eq!(
            validate(&h, 4096, false),
            Verdict::Reject {
                errno: Errno::Inval,
                payload: 0
            }
        );
    }

    #[test]
    fn bad_magic_is_detected() {
        let mut b = hdr(Command::Read, 0, 1).encode();
        b[0] ^= 1;
        assert!(RequestHeader::decode(&b).is_err());
    }

    #[test]
    fn go_body_with_inconsistent_lengths_is_invalid() {
        assert_eq!(
            decode_go(&[0, 0, 0, 9, b'a', 0, 0]),
            Err(OptionError::Invalid)
        );
        assert_eq!(
            decode_go(&[0, 0, 0, 1, b'a', 0, 1]),
            Err(OptionError::Invalid)
        );
    }

    #[test]
    fn fast_zero_only_on_write_zeroes_and_block_status_needs_a_length_in_range() {
        let mut h = hdr(Command::Write, 0, 512);
        h.flags = CMD_FLAG_FAST_ZERO;
        assert_eq!(
            validate(&h, 4096, false),
            Verdict::Reject {
                errno: Errno::Inval,
                payload: 512
            }
        );
        let mut z = hdr(Command::WriteZeroes, 0, 4096);
        z.flags = CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE;
        assert_eq!(validate(&z, 4096, false), Verdict::Execute);
        assert_eq!(
            validate(&hdr(Command::BlockStatus, 0, 0), 4096, false),
            Verdict::Reject {
                errno: Errno::Inval,
                payload: 0
            }
        );
        assert_eq!(
            validate(&hdr(Command::BlockStatus, 4095, 2), 4096, false),
            Verdict::Reject {
                errno: Errno::Inval,
                payload: 0
            }
        );
        // No payload, so longer than the request cap is fine.
        assert_eq!(
            validate(&hdr(Command::BlockStatus, 0, u32::MAX), u64::MAX, true),
            Verdict::Execute
        );
    }

    #[test]
    fn block_status_merges_clips_and_honours_req_one() {
        let ex = |len, hole, zero| StatusExtent { len, hole, zero };
        let runs = [
            ex(4096, false, false),
            ex(4096, false, false),
            ex(0, true, true),
            ex(1 << 20, true, true),
        ];
        let v = encode_block_status(1, &runs, 12288, false).unwrap();
        assert_eq!(
            v,
            [
                1u32.to_be_bytes(),
                8192u32.to_be_bytes(),
                0u32.to_be_bytes(),
                4096u32.to_be_bytes(),
                3u32.to_be_bytes()
            ]
            .concat()
        );
        let one = encode_block_status(1, &runs, u32::MAX, true).unwrap();
        assert_eq!(one.len(), 12);
        assert_eq!(be32(&one[4..8]), 8192);
        assert_eq!(encode_block_status(1, &[], 10, false), None);
    }

    #[test]
    fn meta_context_queries_match_base_allocation_only() {
        assert!(query_selects_base_allocation("base:allocation", false));
        assert!(query_selects_base_allocation("base:", true));
        assert!(!query_selects_base_allocation("base:", false));
        assert!(!query_selects_base_allocation("qemu:dirty-bitmap:x", true));
        assert_eq!(
            decode_meta_context(&[0, 0, 0, 1, b'a', 0, 0, 0, 2, 0, 0, 0, 0]),
            Err(OptionError::Invalid),
            "two queries announced, body holds one"
        );
    }

    proptest! {
        #[test]
        fn meta_context_body_round_trips(name in "[a-z0-9._-]{0,32}", queries in proptest::collection::vec("[a-z:]{0,20}", 0..6)) {
            let m = MetaContextRequest { name, queries };
            prop_assert_eq!(decode_meta_context(&encode_meta_context(&m)), Ok(m));
        }

        #[test]
        fn meta_context_decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..96)) {
            let _ = decode_meta_context(&data);
        }

        #[test]
        fn request_header_round_trips(flags: u16, cmd: u16, cookie: u64, offset: u64, length: u32) {
            let h = RequestHeader { flags, command: Command::from_code(cmd), cookie, offset, length };
            prop_assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn go_body_round_trips(name in "[a-z0-9._-]{0,64}", infos in proptest::collection::vec(any::<u16>(), 0..8)) {
            let g = GoRequest { name, infos };
            prop_assert_eq!(decode_go(&encode_go(&g)), Ok(g));
        }

        #[test]
        fn go_decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_go(&data);
        }

        #[test]
        fn validated_requests_stay_in_bounds(cmd in 0u16..9, offset: u64, length: u32, size: u64) {
            let h = RequestHeader { flags: 0, command: Command::from_code(cmd), cookie: 0, offset, length };
            if validate(&h, size, false) == Verdict::Execute
                && matches!(h.command, Command::Read | Command::Write | Command::Trim | Command::WriteZeroes | Command::BlockStatus)
            {
                if matches!(h.command, Command::Read | Command::Write) {
                    prop_assert!(length <= MAX_REQUEST_LEN, "payload-carrying requests are bounded");
                }
                prop_assert!(offset.checked_add(u64::from(length)).is_some_and(|e| e <= size));
            }
        }
    }
}

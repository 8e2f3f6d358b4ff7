//! Wire constants and pure encoders/decoders of the NBD protocol (no I/O).
//!
//! Everything here works on byte slices so that it can be tested and fuzzed without sockets.

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
/// Ask about an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Select an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Negotiate structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;

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
/// Error bit of option reply types.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option not supported.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option malformed.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Export unknown.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
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

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// WRITE_ZEROES must write real zeroes (no holes).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// READ: do not fragment the reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// All command flags this implementation knows.
pub const CMD_FLAGS_KNOWN: u16 = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF;

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
    if req.flags & !CMD_FLAGS_KNOWN != 0 {
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

    proptest! {
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
        fn validated_requests_stay_in_bounds(cmd in 0u16..8, offset: u64, length: u32, size: u64) {
            let h = RequestHeader { flags: 0, command: Command::from_code(cmd), cookie: 0, offset, length };
            if validate(&h, size, false) == Verdict::Execute
                && matches!(h.command, Command::Read | Command::Write | Command::Trim | Command::WriteZeroes)
            {
                if matches!(h.command, Command::Read | Command::Write) {
                    prop_assert!(length <= MAX_REQUEST_LEN, "payload-carrying requests are bounded");
                }
                prop_assert!(offset.checked_add(u64::from(length)).is_some_and(|e| e <= size));
            }
        }
    }
}

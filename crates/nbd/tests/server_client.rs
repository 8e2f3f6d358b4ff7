//! Our client against our server over real TCP, and the server against malformed byte streams.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use proptest::prelude::*;
use tern_nbd::proto::*;
use tern_nbd::{Client, ClientError, Errno, FileBackend, StaticExports};

fn start(size: u64) -> (String, tempfile::NamedTempFile) {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(size).unwrap();
    let mut ex = StaticExports::new();
    ex.insert(
        "disk",
        Arc::new(FileBackend::open(f.path(), false).unwrap()),
    );
    ex.insert("ro", Arc::new(FileBackend::open(f.path(), true).unwrap()));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || tern_nbd::run_listener(l, Arc::new(ex)));
    (addr, f)
}

#[test]
fn write_flush_read_round_trip_over_tcp() {
    let (addr, f) = start(1 << 20);
    let mut c = Client::connect(&addr, "disk").unwrap();
    assert!(c.structured());
    assert_eq!(c.size(), 1 << 20);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    c.write(4096, &data, false).unwrap();
    c.write(65536, &data, true).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; 8192];
    c.read(4096, &mut back).unwrap();
    assert_eq!(back, data);
    c.write_zeroes(4096, 4096, false).unwrap();
    c.trim(65536, 8192).unwrap();
    c.read(4096, &mut back).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert_eq!(&back[4096..], &data[4096..]);
    c.disconnect().unwrap();
    let on_disk = std::fs::read(f.path()).unwrap();
    assert_eq!(&on_disk[8192..12288], &data[4096..]);
    assert!(on_disk[65536..65536 + 8192].iter().all(|&b| b == 0));
}

#[test]
fn list_and_unknown_export() {
    let (addr, _f) = start(4096);
    assert_eq!(
        tern_nbd::list_exports(&addr).unwrap(),
        vec!["disk".to_string(), "ro".to_string()]
    );
    match Client::connect(&addr, "nope") {
        Err(ClientError::Refused { reply, .. }) => assert_eq!(reply, REP_ERR_UNKNOWN),
        other => panic!("expected refusal, got {other:?}"),
    }
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let (addr, _f) = start(4096);
    let mut c = Client::connect(&addr, "ro").unwrap();
    assert_ne!(c.transmission_flags() & TF_READ_ONLY, 0);
    assert!(matches!(
        c.write(0, &[1; 512], false),
        Err(ClientError::Remote(Errno::Perm))
    ));
    let mut b = [0u8; 512];
    c.read(0, &mut b).unwrap();
}

#[test]
fn past_the_end_and_oversized_requests_get_error_replies_and_session_survives() {
    let (addr, _f) = start(1 << 20);
    let mut c = Client::connect(&addr, "disk").unwrap();
    // Past the end, sent raw (the client would refuse locally).
    assert!(matches!(
        c.raw_request(0, 0, 1 << 20, 1),
        Err(ClientError::Remote(Errno::Inval))
    ));
    assert!(matches!(
        c.raw_request(0, 0, 0, MAX_REQUEST_LEN + 1),
        Err(ClientError::Remote(Errno::Overflow))
    ));
    assert!(matches!(
        c.raw_request(4, 0, (1 << 20) - 1, 2),
        Err(ClientError::Remote(Errno::NoSpc))
    ));
    assert!(matches!(
        c.raw_request(42, 0, 0, 0),
        Err(ClientError::Remote(Errno::Inval))
    ));
    assert!(matches!(
        c.raw_request(3, 0, 5, 0),
        Err(ClientError::Remote(Errno::Inval))
    ));
    // Still usable afterwards.
    c.write(0, &[9; 4096], false).unwrap();
    let mut b = [0u8; 4096];
    c.read(0, &mut b).unwrap();
    assert_eq!(b, [9; 4096]);
}

#[test]
fn block_status_without_a_context_and_misused_fast_zero_are_einval() {
    let (addr, _f) = start(1 << 20);
    let mut c = Client::connect(&addr, "disk").unwrap();
    assert_ne!(c.transmission_flags() & TF_SEND_FAST_ZERO, 0);
    // BLOCK_STATUS (7) before `base:allocation` was negotiated.
    assert!(matches!(
        c.raw_request(7, 0, 0, 4096),
        Err(ClientError::Remote(Errno::Inval))
    ));
    // FAST_ZERO on a TRIM; and on WRITE_ZEROES of a plain file (zeroes are written: not fast).
    assert!(matches!(
        c.raw_request(4, CMD_FLAG_FAST_ZERO, 0, 4096),
        Err(ClientError::Remote(Errno::Inval))
    ));
    assert!(matches!(
        c.raw_request(6, CMD_FLAG_FAST_ZERO, 0, 4096),
        Err(ClientError::Remote(Errno::NotSup))
    ));
    c.raw_request(6, 0, 0, 4096).unwrap();
}

fn handshake_raw(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .unwrap();
    s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    s.write_all(&OPT_EXPORT_NAME.to_be_bytes()).unwrap();
    s.write_all(&4u32.to_be_bytes()).unwrap();
    s.write_all(b"disk").unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    assert_eq!(u64::from_be_bytes(info[..8].try_into().unwrap()), 1 << 20);
    s
}

#[test]
fn export_name_handshake_then_bad_magic_closes_connection() {
    let (addr, _f) = start(1 << 20);
    let mut s = handshake_raw(&addr);
    let mut h = RequestHeader {
        flags: 0,
        command: Command::Read,
        cookie: 1,
        offset: 0,
        length: 16,
    }
    .encode();
    h[0] = 0;
    s.write_all(&h).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        s.read(&mut b).unwrap(),
        0,
        "server must hard-close on bad magic"
    );
}

#[test]
fn oversized_write_is_answered_then_closed_without_reading_payload() {
    let (addr, _f) = start(1 << 20);
    let mut s = handshake_raw(&addr);
    let h = RequestHeader {
        flags: 0,
        command: Command::Write,
        cookie: 5,
        offset: 0,
        length: u32::MAX,
    }
    .encode();
    s.write_all(&h).unwrap();
    let mut rep = [0u8; 16];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(
        u32::from_be_bytes(rep[4..8].try_into().unwrap()),
        Errno::Overflow.code()
    );
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
}

#[test]
fn unknown_option_gets_unsup_and_session_continues() {
    let (addr, _f) = start(4096);
    let mut s = TcpStream::connect(&addr).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    for _ in 0..2 {
        s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
        s.write_all(&99u32.to_be_bytes()).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s.write_all(b"abc").unwrap();
        let mut rep = [0u8; 20];
        s.read_exact(&mut rep).unwrap();
        assert_eq!(
            u32::from_be_bytes(rep[12..16].try_into().unwrap()),
            REP_ERR_UNSUP
        );
        let n = u32::from_be_bytes(rep[16..20].try_into().unwrap());
        let mut msg = vec![0u8; n as usize];
        s.read_exact(&mut msg).unwrap();
    }
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let (addr, _f) = start(4096);
    let mut s = TcpStream::connect(&addr).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&0x80u32.to_be_bytes()).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
}

struct MemBackend(std::sync::Mutex<Vec<u8>>);
impl tern_nbd::Backend for MemBackend {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        let v = self.0.lock().unwrap();
        buf.copy_from_slice(&v[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), Errno> {
        let mut v = self.0.lock().unwrap();
        v[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), Errno> {
        Ok(())
    }
}

fn mem_exports() -> StaticExports {
    let mut ex = StaticExports::new();
    ex.insert(
        "m",
        Arc::new(MemBackend(std::sync::Mutex::new(vec![0; 65536]))),
    );
    ex
}

/// A valid handshake selecting export "m" with structured replies, as raw client bytes.
fn valid_prefix() -> Vec<u8> {
    let mut v = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes());
    // `base:allocation`, so BLOCK_STATUS requests are executed too.
    let meta = encode_meta_context(&MetaContextRequest {
        name: "m".into(),
        queries: vec![META_BASE_ALLOCATION.into()],
    });
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&OPT_SET_META_CONTEXT.to_be_bytes());
    v.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    v.extend_from_slice(&meta);
    let go = encode_go(&GoRequest {
        name: "m".into(),
        infos: vec![],
    });
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&OPT_GO.to_be_bytes());
    v.extend_from_slice(&(go.len() as u32).to_be_bytes());
    v.extend_from_slice(&go);
    v
}

#[test]
fn block_status_after_set_meta_context_answers_one_data_run_per_request() {
    let mut input = valid_prefix();
    for (flags, len) in [(0u16, 65536u32), (CMD_FLAG_REQ_ONE, 4096)] {
        let h = RequestHeader {
            flags,
            command: Command::BlockStatus,
            cookie: 9,
            offset: 0,
            length: len,
        };
        input.extend_from_slice(&h.encode());
    }
    let ex = mem_exports();
    let mut out = Vec::new();
    let _ = tern_nbd::serve(&input[..], &mut out, &ex);
    // Each reply (in either order: requests run concurrently): a BLOCK_STATUS chunk (done) for
    // context 1 with one descriptor (len, flags 0).
    for len in [65536u32, 4096] {
        let mut want = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 9, 12).to_vec();
        want.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
        want.extend_from_slice(&len.to_be_bytes());
        want.extend_from_slice(&0u32.to_be_bytes());
        assert!(
            out.windows(want.len()).any(|w| w == want),
            "no block status reply of {len} bytes in {out:02x?}"
        );
    }
}

fn request_strategy() -> impl Strategy<Value = Vec<u8>> {
    // Mostly well-magicked headers with wild fields, sometimes raw noise.
    prop_oneof![
        (
            any::<u16>(),
            0u16..10,
            any::<u64>(),
            prop_oneof![0u64..70000, any::<u64>()],
            prop_oneof![0u32..5000, any::<u32>()]
        )
            .prop_map(|(flags, cmd, cookie, offset, length)| {
                let mut b = RequestHeader {
                    flags,
                    command: Command::from_code(cmd),
                    cookie,
                    offset,
                    length,
                }
                .encode()
                .to_vec();
                if cmd == 1 && length < 5000 {
                    b.extend(std::iter::repeat_n(0xa5, length as usize));
                }
                b
            }),
        proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// The fuzz target for the request parser: arbitrary request bytes after a valid handshake
    /// never panic the server, and it always terminates.
    #[test]
    fn server_survives_random_request_streams(reqs in proptest::collection::vec(request_strategy(), 0..12)) {
        let mut input = valid_prefix();
        for r in reqs {
            input.extend(r);
        }
        let ex = mem_exports();
        let mut out = Vec::new();
        let _ = tern_nbd::serve(&input[..], &mut out, &ex);
        prop_assert!(out.len() < 64 * 1024 * 12 + 4096);
    }

    /// Entirely random handshake bytes never panic either.
    #[test]
    fn server_survives_random_handshakes(input in proptest::collection::vec(any::<u8>(), 0..256)) {
        let ex = mem_exports();
        let mut out = Vec::new();
        let _ = tern_nbd::serve(&input[..], &mut out, &ex);
    }
}

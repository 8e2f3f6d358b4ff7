//! `cargo xtask fuzz --seed-corpus`: writes the seed corpora in `fuzz/corpus/<target>/`, from
//! the crates' own encoders and from real conversations (the NBD client against the NBD server
//! over loopback), in the input layouts the targets document at their top. Deterministic: the
//! same tree gives the same files, named by content (`seed-<crc32c>`), so a re-run changes
//! nothing unless an encoder changed. It writes only those files and removes none: an input added
//! by hand, or a seed an older encoder wrote, stays until someone removes it (the run lists
//! them). Every seed is checked against the parser it feeds, so a protocol change that breaks a
//! seed fails here, naming it, instead of silently weakening the corpus.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Shutdown, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use tern_migration::wire::{self, Frame, Hello, MemoryDigest, PageBatch};
use tern_migration::{CpuidDigest, MemoryLayout, PAGE_SIZE, Region, VmConfigDescription};
use tern_nbd::proto::*;
use tern_volume::control::{
    ControlError, Envelope, ErrorKind, FileInfo, LeaseAction, LeaseInfo, Reply, Request, Response,
};
use tern_volume::format::{FileEntry, HOLE, LeaseRecord, Metadata, SlotHeader, Superblock};

/// Seeds by target name.
pub type Corpora = BTreeMap<&'static str, Vec<Vec<u8>>>;

/// Every target's seeds.
pub fn all() -> Result<Corpora> {
    let mut c = Corpora::new();
    c.insert("migration_frames", migration_frames());
    c.insert("migration_receiver", migration_receiver());
    c.insert("migration_sender", migration_sender());
    c.insert("nbd_handshake", nbd_handshake());
    c.insert("nbd_request_stream", nbd_request_stream());
    c.insert("nbd_client", nbd_client()?);
    c.insert("volume_control", volume_control()?);
    c.insert("volume_format", volume_format());
    c.insert("vmm_state", vmm_state()?);
    c.insert("vmm_snapshot", vmm_snapshot()?);
    c.insert("vmm_api", vmm_api()?);
    c.insert("cluster_api", cluster_api()?);
    Ok(c)
}

/// The CRC-32C of any bytes followed by their own CRC-32C (little-endian), as a sealed
/// migration frame with an empty payload is: named by their CRC, all such seeds would share one
/// name.
const CRC32C_RESIDUE: u32 = 0x4867_4bc7;

/// The file name of a seed: `seed-` and the CRC-32C of its bytes, or of the bytes before its
/// last four when it ends in their CRC.
fn seed_name(seed: &[u8]) -> String {
    let crc = match crc32c::crc32c(seed) {
        CRC32C_RESIDUE if seed.len() > 4 => crc32c::crc32c(&seed[..seed.len() - 4]),
        crc => crc,
    };
    format!("seed-{crc:08x}")
}

/// What [`write`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Seeds written (new files).
    pub written: usize,
    /// Seeds that were already there.
    pub current: usize,
    /// The other files in the targets' directories, left alone: inputs added by hand, seeds an
    /// older encoder wrote. Sorted.
    pub others: Vec<PathBuf>,
}

/// Writes each target's seeds into `dir/<target>/` as `seed-<crc32c>` files, creating only
/// those missing. No other file is touched: nothing is removed, and a file with a seed's name
/// but other bytes (not a seed this generator wrote) is an error rather than overwritten.
pub fn write(dir: &Path, corpora: &Corpora) -> Result<Written> {
    let mut w = Written::default();
    for (target, seeds) in corpora {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        let mut mine: BTreeMap<String, &[u8]> = BTreeMap::new();
        for s in seeds {
            let name = seed_name(s);
            if let Some(other) = mine.insert(name.clone(), s) {
                ensure!(
                    other == &s[..],
                    "two different {target} seeds have the name {name} (a CRC-32C collision): \
                     change one"
                );
            }
        }
        for (name, seed) in &mine {
            let f = d.join(name);
            match std::fs::read(&f) {
                Ok(old) if old == *seed => {
                    w.current += 1;
                    continue;
                }
                Ok(_) => bail!(
                    "{} is not the seed of that name (its bytes differ): the generator does not \
                     overwrite it; rename or remove it",
                    f.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", f.display())),
            }
            std::fs::write(&f, seed).with_context(|| format!("writing {}", f.display()))?;
            w.written += 1;
        }
        for entry in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let entry = entry.with_context(|| format!("listing {}", d.display()))?;
            let name = entry.file_name();
            if !name.to_str().is_some_and(|n| mine.contains_key(n)) {
                w.others.push(entry.path());
            }
        }
    }
    w.others.sort();
    Ok(w)
}

// ---------------------------------------------------------------------------------------------
// Migration. The VM must match `tern_fuzz::migration_target_vm` (fuzz/src/lib.rs): 192 pages
// below 4 GiB and 16 above, so that the page at 4 GiB (index 192) travels on data stream 1 of two
// (page `i` on stream `(i / 128) mod streams`, which the receiver holds every page to).

fn target_vm() -> VmConfigDescription {
    VmConfigDescription {
        layout: MemoryLayout::new(vec![
            Region {
                guest_addr: 0,
                size: 192 * PAGE_SIZE,
            },
            Region {
                guest_addr: 1 << 32,
                size: 16 * PAGE_SIZE,
            },
        ])
        .expect("a valid layout"),
        vcpus: 2,
        cpuid: CpuidDigest(0x7465_726e),
        devices: vec!["virtio-blk:0".into(), "virtio-net:0".into()],
    }
}

const SESSION: u64 = 0x5eed_0000_0000_0001;

fn hello(streams: u16) -> Frame {
    Frame::Hello(Hello {
        min_version: 1,
        max_version: wire::PROTOCOL_VERSION,
        session: SESSION,
        streams,
        config: target_vm(),
    })
}

fn pages(round: u32, data: &[u64], zero: &[u64]) -> Frame {
    let mut b = PageBatch::new(round);
    for (i, &gpa) in data.iter().enumerate() {
        let page: Vec<u8> = (0..PAGE_SIZE as usize).map(|j| (i + j) as u8).collect();
        b.push_data(gpa, &page);
    }
    for &gpa in zero {
        b.push_zero(gpa);
    }
    let (frame, _) =
        wire::decode(&b.into_frame_bytes(), Some(&target_vm().layout)).expect("a page frame");
    frame
}

/// A `PageData` frame (protocol 5): the same pages as [`pages`] makes, entries first, each
/// data page's entry with the crc32c of its data.
fn page_data(round: u32, data: &[u64], zero: &[u64]) -> Vec<u8> {
    let Frame::Pages(b) = pages(round, data, zero) else {
        unreachable!("pages() makes a page frame")
    };
    b.to_page_data_bytes()
}

/// [`page_data`] with the last data byte flipped after the checksums were taken: the last data
/// page does not match its checksum (as a page the guest rewrote while it was sent).
fn page_data_damaged(round: u32, data: &[u64], zero: &[u64]) -> Vec<u8> {
    let mut f = page_data(round, data, zero);
    if let Some(last) = f.last_mut() {
        *last ^= 0x40;
    }
    f
}

fn verify() -> Frame {
    let layout = target_vm().layout;
    let d = MemoryDigest::of_memory(&layout, wire::VERIFY_CHUNK_BYTES, |_, buf| {
        buf.fill(0);
        Ok::<(), ()>(())
    })
    .expect("zeroes");
    Frame::Verify(d)
}

/// A `Running` frame in protocol 1 (no timings), by its kind number.
fn running() -> Vec<u8> {
    wire::seal(wire::FrameKind::Running as u8, &[])
}

/// `[0x80 | kind] [len: u16 LE] [payload]`, as `tern_fuzz::next_frame` reads a sealed frame.
fn sealed(frame_bytes: &[u8]) -> Vec<u8> {
    let payload = &frame_bytes[wire::HEADER_LEN..];
    let mut out = vec![0x80 | frame_bytes[5]];
    out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn migration_frames() -> Vec<Vec<u8>> {
    let frames: Vec<Vec<u8>> = vec![
        hello(2).encode(),
        Frame::Welcome { version: 1 }.encode(),
        Frame::Refuse {
            reason: "memory layout differs".into(),
        }
        .encode(),
        Frame::Join {
            session: SESSION,
            stream: 1,
        }
        .encode(),
        pages(0, &[0, 1 << 32], &[PAGE_SIZE, 63 * PAGE_SIZE]).encode(),
        page_data(1, &[2 * PAGE_SIZE, (1 << 32) + PAGE_SIZE], &[3 * PAGE_SIZE]),
        page_data_damaged(2, &[4 * PAGE_SIZE], &[]),
        Frame::DataEnd {
            frames: 3,
            pages: 9,
        }
        .encode(),
        Frame::State {
            version: 2,
            bytes: b"TERNVMST state bytes".to_vec(),
        }
        .encode(),
        verify().encode(),
        Frame::Commit.encode(),
        running(),
        Frame::Failed {
            reason: "restore failed".into(),
        }
        .encode(),
        Frame::Abort {
            reason: "cancelled".into(),
        }
        .encode(),
        Frame::RoundEnd { round: 2 }.encode(),
        Frame::RoundAck { round: 2 }.encode(),
        Frame::PostCopy {
            owed: vec![(3, 5), (1 << 20, 1)],
        }
        .encode(),
        Frame::PageRequest {
            first: 7,
            pages: 16,
        }
        .encode(),
        Frame::PostCopyDone {
            pages: 6,
            demand_faults: 2,
            max_fault_us: 850,
        }
        .encode(),
    ];
    let mut seeds = Vec::new();
    // The target: first byte with the top bit set = `seal(b & 0x1f, rest)`; else a raw stream.
    for f in &frames {
        seeds.push(f.clone());
        let mut s = vec![0x80 | f[5]];
        s.extend_from_slice(&f[wire::HEADER_LEN..]);
        seeds.push(s);
    }
    seeds.push(frames.concat());
    seeds
}

fn migration_receiver() -> Vec<Vec<u8>> {
    let record = |conn: u8, f: &[u8]| {
        let mut r = vec![conn];
        r.extend_from_slice(&sealed(f));
        r
    };
    let join = |stream: u16| {
        Frame::Join {
            session: SESSION,
            stream,
        }
        .encode()
    };
    let state = Frame::State {
        version: 2,
        bytes: vec![7; 64],
    }
    .encode();
    // A whole migration on two data streams, with a verify digest.
    let full = [
        record(0, &hello(2).encode()),
        record(1, &join(0)),
        record(2, &join(1)),
        record(1, &pages(0, &[0], &[PAGE_SIZE]).encode()),
        record(2, &pages(0, &[1 << 32], &[]).encode()),
        record(1, &Frame::RoundEnd { round: 0 }.encode()),
        record(2, &Frame::RoundEnd { round: 0 }.encode()),
        record(1, &pages(1, &[], &[2 * PAGE_SIZE, 3 * PAGE_SIZE]).encode()),
        record(
            1,
            &Frame::DataEnd {
                frames: 2,
                pages: 4,
            }
            .encode(),
        ),
        record(
            2,
            &Frame::DataEnd {
                frames: 1,
                pages: 1,
            }
            .encode(),
        ),
        record(0, &state),
        record(0, &verify().encode()),
        record(0, &Frame::Commit.encode()),
    ]
    .concat();
    // One stream, no verify; and a source that aborts mid-way; and a foreign VM.
    let single = [
        record(0, &hello(1).encode()),
        record(1, &join(0)),
        record(1, &pages(0, &[5 * PAGE_SIZE], &[]).encode()),
        record(
            1,
            &Frame::DataEnd {
                frames: 1,
                pages: 1,
            }
            .encode(),
        ),
        record(0, &state),
        record(0, &Frame::Commit.encode()),
    ]
    .concat();
    let aborted = [
        record(0, &hello(1).encode()),
        record(1, &join(0)),
        record(
            0,
            &Frame::Abort {
                reason: "cancelled".into(),
            }
            .encode(),
        ),
    ]
    .concat();
    let mut foreign = target_vm();
    foreign.vcpus = 4;
    let foreign = record(
        0,
        &Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
            session: 9,
            streams: 1,
            config: foreign,
        })
        .encode(),
    );
    // The same whole migration with raw (unsealed) frames: connection, a mode byte without the
    // top bit (`tern_fuzz::next_frame`: raw bytes follow), the frame.
    let raw = [
        vec![0, 0],
        hello(1).encode(),
        vec![1, 0],
        join(0),
        vec![1, 0],
        Frame::DataEnd {
            frames: 0,
            pages: 0,
        }
        .encode(),
        vec![0, 0],
        state.clone(),
        vec![0, 0],
        Frame::Commit.encode(),
    ]
    .concat();
    // In place (protocol 5): a page that fails its checksum in round 0 and comes again intact
    // after the pause; and one that fails it after the last round end.
    let in_place = |final_damaged: bool| {
        let last = if final_damaged {
            page_data_damaged(1, &[PAGE_SIZE], &[])
        } else {
            page_data(1, &[PAGE_SIZE], &[])
        };
        [
            record(0, &hello(1).encode()),
            record(1, &join(0)),
            record(1, &page_data_damaged(0, &[0, PAGE_SIZE], &[2 * PAGE_SIZE])),
            record(1, &Frame::RoundEnd { round: 0 }.encode()),
            record(1, &last),
            record(
                1,
                &Frame::DataEnd {
                    frames: 2,
                    pages: 4,
                }
                .encode(),
            ),
            record(0, &state),
            record(0, &Frame::Commit.encode()),
        ]
        .concat()
    };
    vec![
        full,
        single,
        aborted,
        foreign,
        raw,
        in_place(false),
        in_place(true),
    ]
}

fn migration_sender() -> Vec<Vec<u8>> {
    let seed = |rounds: u8, frames: &[Vec<u8>]| {
        let mut s = vec![rounds];
        for f in frames {
            s.extend_from_slice(&sealed(f));
        }
        s
    };
    let welcome = Frame::Welcome { version: 1 }.encode();
    let ack = |round| Frame::RoundAck { round }.encode();
    let mut timed = wire::seal(wire::FrameKind::Running as u8, &[0; 32]);
    timed[wire::HEADER_LEN] = 1;
    let timed = wire::seal(wire::FrameKind::Running as u8, &timed[wire::HEADER_LEN..]);
    vec![
        seed(0, &[welcome.clone(), ack(0), running()]),
        seed(2, &[welcome.clone(), ack(0), ack(1), ack(2), running()]),
        seed(1, &[welcome.clone(), ack(0), ack(1), timed]),
        seed(
            0,
            &[Frame::Refuse {
                reason: "vCPU count differs".into(),
            }
            .encode()],
        ),
        seed(
            1,
            &[
                welcome.clone(),
                ack(0),
                Frame::Failed {
                    reason: "restore_state failed".into(),
                }
                .encode(),
            ],
        ),
        seed(0, &[Frame::Welcome { version: 9 }.encode()]),
        seed(0, &[welcome, ack(0), ack(0)]),
    ]
}

// ---------------------------------------------------------------------------------------------
// NBD.

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&option.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    o
}

fn req(command: Command, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length,
    }
    .encode()
    .to_vec()
}

/// A stream of requests of every kind (for the transmission phase).
fn requests() -> Vec<Vec<u8>> {
    let mut write = req(Command::Write, CMD_FLAG_FUA, 2, 4096, 512);
    write.extend_from_slice(&[0xa5; 512]);
    vec![
        req(Command::Read, 0, 1, 0, 4096),
        write,
        req(Command::Flush, 0, 3, 0, 0),
        req(Command::Trim, 0, 4, 8192, 4096),
        req(Command::WriteZeroes, CMD_FLAG_NO_HOLE, 5, 0, 65536),
        req(Command::BlockStatus, CMD_FLAG_REQ_ONE, 6, 0, 65536),
        req(Command::Read, CMD_FLAG_DF, 7, 65536 - 512, 512),
        req(Command::Disc, 0, 8, 0, 0),
    ]
}

fn go(name: &str) -> Vec<u8> {
    opt(
        OPT_GO,
        &encode_go(&GoRequest {
            name: name.into(),
            infos: vec![INFO_BLOCK_SIZE, INFO_NAME],
        }),
    )
}

fn nbd_handshake() -> Vec<Vec<u8>> {
    let flags = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let meta = encode_meta_context(&MetaContextRequest {
        name: "m".into(),
        queries: vec![META_BASE_ALLOCATION.into()],
    });
    let info = opt(
        OPT_INFO,
        &encode_go(&GoRequest {
            name: "m".into(),
            infos: vec![INFO_EXPORT, INFO_BLOCK_SIZE],
        }),
    );
    let mut export_name = opt(OPT_EXPORT_NAME, b"m");
    export_name.extend_from_slice(&requests()[0]);
    vec![
        [flags.clone(), opt(OPT_LIST, &[]), opt(OPT_ABORT, &[])].concat(),
        [
            flags.clone(),
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(OPT_LIST_META_CONTEXT, &meta),
            opt(OPT_SET_META_CONTEXT, &meta),
            info,
            go("m"),
            requests().concat(),
        ]
        .concat(),
        [
            flags.clone(),
            go("nope"),
            opt(OPT_STARTTLS, &[]),
            opt(99, b"?"),
        ]
        .concat(),
        [
            flags.clone(),
            opt(OPT_TERN_CONTROL, br#"{"request":{"op":"status"}}"#),
        ]
        .concat(),
        [0u32.to_be_bytes().to_vec(), export_name].concat(),
    ]
}

fn nbd_request_stream() -> Vec<Vec<u8>> {
    let mut seeds = requests();
    seeds.push(requests().concat());
    seeds
}

/// A zeroed in-memory export.
struct MemBackend(Mutex<Vec<u8>>);

impl tern_nbd::Backend for MemBackend {
    fn size(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), tern_nbd::Errno> {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let at = offset as usize;
        buf.copy_from_slice(v.get(at..at + buf.len()).ok_or(tern_nbd::Errno::Inval)?);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), tern_nbd::Errno> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let at = offset as usize;
        v.get_mut(at..at + data.len())
            .ok_or(tern_nbd::Errno::Inval)?
            .copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), tern_nbd::Errno> {
        Ok(())
    }
}

/// Everything a writer was given, kept.
struct Tee<W> {
    inner: W,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Runs `client` against Tern's NBD server (export `m`, 64 KiB) on a loopback socket and
/// returns every byte the server sent.
fn record_server(client: impl FnOnce(std::net::SocketAddr)) -> Result<Vec<u8>> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    let addr = l.local_addr()?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server = {
        let seen = Arc::clone(&seen);
        std::thread::spawn(move || -> Result<()> {
            let (conn, _) = l.accept()?;
            let mut ex = tern_nbd::StaticExports::new();
            ex.insert("m", Arc::new(MemBackend(Mutex::new(vec![0; 64 << 10]))));
            let r = conn.try_clone()?;
            let _ = tern_nbd::serve(r, Tee { inner: &conn, seen }, &ex);
            let _ = conn.shutdown(Shutdown::Both);
            Ok(())
        })
    };
    client(addr);
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the NBD server thread panicked"))??;
    let bytes = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    ensure!(!bytes.is_empty(), "the NBD server sent nothing");
    Ok(bytes)
}

/// The conversation `fuzz_targets/nbd_client.rs` runs for `script`, against a real server.
fn nbd_client_script(script: u8, addr: std::net::SocketAddr) {
    let timeout = Duration::from_secs(5);
    match script & 3 {
        1 => {
            let Ok(c) = tern_nbd::SharedClient::connect_timeout(addr, "m", timeout) else {
                return;
            };
            let mut buf = vec![0u8; if script & 4 != 0 { 8192 } else { 512 }];
            let _ = c.read(0, &mut buf);
            if script & 8 != 0 {
                let _ = c.write(4096, &buf[..512], script & 16 != 0);
            }
            if script & 32 != 0 {
                let _ = c.flush();
            }
            if script & 64 != 0 {
                let _ = c.trim(0, 4096);
            }
            if script & 128 != 0 {
                let _ = c.write_zeroes(0, 4096, false);
            }
            let _ = c.read(512, &mut buf[..512]);
        }
        0 => {
            let Ok(mut c) = tern_nbd::Client::connect_timeout(addr, "m", timeout) else {
                return;
            };
            let mut buf = vec![0u8; if script & 4 != 0 { 8192 } else { 512 }];
            let _ = c.read(0, &mut buf);
            if script & 8 != 0 {
                let _ = c.write(4096, &buf[..512], script & 16 != 0);
            }
            if script & 32 != 0 {
                let _ = c.flush();
            }
            if script & 64 != 0 {
                let _ = c.trim(0, 4096);
            }
            if script & 128 != 0 {
                let _ = c.write_zeroes(0, 4096, false);
            }
            let _ = c.read(512, &mut buf[..512]);
            let _ = c.disconnect();
        }
        2 => {
            let _ = tern_nbd::list_exports(addr);
        }
        _ => {
            let _ = tern_nbd::control(addr, br#"{"request":{"op":"status"}}"#, timeout);
        }
    }
}

fn nbd_client() -> Result<Vec<Vec<u8>>> {
    let mut seeds = Vec::new();
    for script in [0x00u8, 0x04, 0xf8, 0xfc, 0x01, 0xfd, 0x02, 0x03] {
        let server = record_server(|addr| nbd_client_script(script, addr))
            .with_context(|| format!("recording the NBD server for script {script:#x}"))?;
        seeds.push([vec![script], server].concat());
    }
    Ok(seeds)
}

// ---------------------------------------------------------------------------------------------
// Volume.

fn volume_control() -> Result<Vec<Vec<u8>>> {
    let env = |request: Request, forwarded: bool| Envelope {
        forwarded,
        request,
        from: forwarded.then(|| (2, "10.0.0.2:10809".to_string())),
    };
    let requests = vec![
        env(
            Request::Create {
                name: "disk0".into(),
                size: 3 << 20,
                preallocated: false,
            },
            false,
        ),
        env(
            Request::Create {
                name: "pre".into(),
                size: 1 << 20,
                preallocated: true,
            },
            true,
        ),
        env(
            Request::Remove {
                name: "thin".into(),
            },
            false,
        ),
        env(
            Request::Resize {
                name: "thin".into(),
                size: 16 << 20,
            },
            false,
        ),
        env(
            Request::Resize {
                name: "full".into(),
                size: 6 << 20,
            },
            false,
        ),
        env(Request::List, false),
        env(
            Request::Stat {
                name: "thin".into(),
                map: true,
            },
            false,
        ),
        env(Request::Status, false),
        env(
            Request::Lease {
                name: "thin".into(),
                action: LeaseAction::Handover { to: 3 },
            },
            false,
        ),
        env(
            Request::CoordLease {
                name: "thin".into(),
                node: 2,
                epoch: 4,
                action: LeaseAction::Acquire,
                renew: true,
            },
            true,
        ),
        env(
            Request::Revoke {
                name: "full".into(),
            },
            true,
        ),
        env(
            Request::Allocate {
                name: "thin".into(),
                logical: 3,
            },
            true,
        ),
        env(Request::FenceNode { node: 1 }, false),
    ];
    let mut seeds = Vec::new();
    for e in &requests {
        let json = serde_json::to_vec(e)?;
        let back: Envelope = serde_json::from_slice(&json)?;
        ensure!(&back == e, "envelope seed does not round-trip: {e:?}");
        seeds.push([vec![0], json].concat());
    }
    let file = FileInfo {
        name: "thin".into(),
        size: 8 << 20,
        preallocated: false,
        allocated_extents: 2,
        lease: LeaseInfo {
            epoch: 4,
            holder: Some(2),
            remaining_ms: Some(900),
            handover_from: None,
        },
        map: Some(vec![HOLE, 10, HOLE, HOLE, HOLE, 11, HOLE, HOLE]),
    };
    let replies = [
        Reply::from_result(Ok(Response::File(file))),
        Reply::from_result(Err(ControlError::new(
            ErrorKind::NotCoordinator,
            "node 3 is not the coordinator",
        ))),
    ];
    for r in &replies {
        let json = serde_json::to_vec(r)?;
        let _ = tern_volume::control::decode_reply(&json);
        seeds.push([vec![1], json].concat());
    }
    for literal in [
        r#"{"ok":true,"data":{"reply":"removed","name":"a","removed":true}}"#,
        r#"{"ok":true,"data":{"reply":"lease","name":"a","holder":2,"epoch":5,"ttl_ms":1500,"remaining_ms":1400}}"#,
        r#"{"ok":true,"data":{"reply":"revoked","name":"a","dropped_epoch":5}}"#,
        r#"{"ok":true,"data":{"reply":"fenced","node":2,"files":["a","b"]}}"#,
    ] {
        tern_volume::control::decode_reply(literal.as_bytes())
            .map_err(|e| anyhow::anyhow!("reply seed {literal} is refused: {e}"))?;
        seeds.push([vec![1], literal.as_bytes().to_vec()].concat());
    }
    Ok(seeds)
}

fn metadata() -> Metadata {
    let mut m = Metadata {
        seq: 12,
        generation: 3,
        ..Default::default()
    };
    m.files.insert(
        "disk0".into(),
        FileEntry {
            size: 5 << 20,
            preallocated: false,
            map: vec![4, HOLE, HOLE, 5, HOLE],
            lease: LeaseRecord {
                epoch: 9,
                holder: Some(2),
                handover_from: Some(1),
            },
        },
    );
    m.files.insert(
        "pre".into(),
        FileEntry {
            size: (2 << 20) + 1,
            preallocated: true,
            map: vec![0, 1, 2],
            lease: LeaseRecord::default(),
        },
    );
    m
}

/// The first `n` bytes of a sector: the decoders read no further, the rest is zero.
fn head(mut sector: Vec<u8>, n: usize) -> Vec<u8> {
    sector.truncate(n);
    sector
}

fn volume_format() -> Vec<Vec<u8>> {
    let sb = Superblock::for_size(64 << 20, *b"seed-volume-0001").expect("geometry");
    let payload = metadata().encode_payload();
    let empty = Metadata::default().encode_payload();
    let header = SlotHeader {
        seq: 12,
        generation: 3,
        payload_len: payload.len() as u32,
        payload_crc: crc32c::crc32c(&payload),
    };
    let whole = |mode: u8, seqs: [u8; 2], p0: &[u8], p1: &[u8]| {
        let mut s = vec![mode, seqs[0], seqs[1]];
        s.extend_from_slice(&(p0.len() as u16).to_le_bytes());
        s.extend_from_slice(p0);
        s.extend_from_slice(p1);
        s
    };
    vec![
        [vec![0], head(sb.encode(), 64)].concat(),
        [vec![1], head(header.encode(), 64)].concat(),
        [vec![2], 64u16.to_le_bytes().to_vec(), payload.clone()].concat(),
        whole(3, [12, 13], &payload, &empty),
        whole(0x13, [12, 13], &payload, &empty),
        whole(0x43, [12, 0], &payload, &[]),
    ]
}

// ---------------------------------------------------------------------------------------------
// VMM.

fn vm_state() -> tern_vmm::state::VmState {
    use kvm_bindings::{
        kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state,
        kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events,
        kvm_xcrs,
    };
    use tern_vmm::devices::serial::persist::SerialDeviceState;
    use tern_vmm::devices::virtio_blk::persist::VirtioBlkState;
    use tern_vmm::devices::virtio_mmio::QueueState;
    use tern_vmm::devices::virtio_net::persist::VirtioNetState;
    use tern_vmm::state::*;

    let queue = QueueState {
        size: 256,
        ready: true,
        desc_table: 0x10_0000,
        avail_ring: 0x10_1000,
        used_ring: 0x10_2000,
        next_avail: 17,
        next_used: 17,
    };
    let vcpu = |id: u8| VcpuState {
        id,
        regs: kvm_regs {
            rip: 0x10_0000,
            rsp: 0x8000,
            rflags: 2,
            ..Default::default()
        },
        sregs: kvm_sregs {
            cr0: 0x8000_0011,
            cr4: 0x20,
            efer: 0x500,
            ..Default::default()
        },
        fpu: (&kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        })
            .into(),
        xsave: vec![0; 1024],
        xcrs: kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        },
        msrs: vec![
            kvm_msr_entry {
                index: 0x10,
                data: 123_456,
                ..Default::default()
            },
            kvm_msr_entry {
                index: 0xc000_0080,
                data: 0x500,
                ..Default::default()
            },
        ],
        lapic: kvm_lapic_state::default(),
        events: kvm_vcpu_events::default(),
        mp_state: kvm_mp_state { mp_state: 0 },
        debugregs: kvm_debugregs::default(),
        cpuid: vec![kvm_cpuid_entry2 {
            function: 1,
            eax: 0x806f8,
            ..Default::default()
        }],
    };
    VmState {
        vcpus: vec![vcpu(0), vcpu(1)],
        irqchip: IrqchipState {
            pic_master: kvm_irqchip::default(),
            pic_slave: kvm_irqchip {
                chip_id: 1,
                ..Default::default()
            },
            ioapic: kvm_irqchip {
                chip_id: 2,
                ..Default::default()
            },
        },
        pit: PitState(kvm_pit_state2::default()),
        clock: ClockState(kvm_clock_data {
            clock: 5_000_000_000,
            ..Default::default()
        }),
        devices: DevicesState {
            serial: SerialDeviceState {
                baud_divisor_low: 1,
                baud_divisor_high: 0,
                interrupt_enable: 1,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: b"load 70\n".to_vec(),
                pending_output: b"heartbeat".to_vec(),
            },
            blocks: vec![(
                0,
                VirtioBlkState {
                    capacity_sectors: 2048,
                    device_features: 1 << 32,
                    status: 15,
                    driver_features: 1 << 32,
                    device_features_sel: 0,
                    driver_features_sel: 0,
                    interrupt_status: 0,
                    queue_sel: 0,
                    queue: queue.clone(),
                },
            )],
            nets: vec![(
                1,
                VirtioNetState {
                    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                    status: 15,
                    driver_features: 1 << 32 | 1 << 5,
                    device_features_sel: 0,
                    driver_features_sel: 0,
                    interrupt_status: 0,
                    queue_sel: 1,
                    queues: [queue.clone(), queue],
                    rx_pending: vec![vec![0xff; 60]],
                    guest_ip: Some(std::net::Ipv4Addr::new(10, 0, 0, 2)),
                },
            )],
        },
        saved_at_realtime_ns: 1_765_000_000_000_000_000,
    }
}

fn vmm_state() -> Result<Vec<Vec<u8>>> {
    use tern_vmm::state::{STATE_HEADER_BYTES, decode, encode};
    let full = encode(&vm_state());
    decode(&full).map_err(|e| anyhow::anyhow!("the state seed does not decode: {e}"))?;
    let mut one_vcpu = vm_state();
    one_vcpu.vcpus.truncate(1);
    one_vcpu.devices.nets.clear();
    let small = encode(&one_vcpu);
    Ok(vec![
        [vec![0], full.clone()].concat(),
        [vec![0x80], full[STATE_HEADER_BYTES..].to_vec()].concat(),
        [vec![0x80], small[STATE_HEADER_BYTES..].to_vec()].concat(),
    ])
}

fn vmm_snapshot() -> Result<Vec<Vec<u8>>> {
    use tern_vmm::snapshot::{SNAPSHOT_MAGIC, SNAPSHOT_VERSION, SnapshotMeta};
    use tern_vmm::state::{STATE_HEADER_BYTES, encode};
    let meta = SnapshotMeta {
        kernel: "builtin:testguest".into(),
        cmdline: "console=ttyS0 load=50".into(),
        memory_mib: 64,
        vcpus: 2,
        disks: vec![
            "/var/lib/tern/disk0.img".into(),
            "/srv/iso.img,readonly".into(),
        ],
    };
    let meta = bincode::serialize(&meta)?;
    let mut one_vcpu = vm_state();
    one_vcpu.vcpus.truncate(1);
    let state = encode(&one_vcpu);
    // A file as `snapshot::write` lays it out, with one page.
    let mut file = SNAPSHOT_MAGIC.to_vec();
    file.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    file.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    file.extend_from_slice(&meta);
    file.extend_from_slice(&state);
    let page = [0x5au8; 4096];
    let gpa = 0x1000u64.to_le_bytes();
    file.extend_from_slice(&gpa);
    file.extend_from_slice(&page);
    file.extend_from_slice(&u64::MAX.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&gpa), &page);
    file.extend_from_slice(&crc.to_le_bytes());
    let mut sealed = vec![0x80];
    sealed.extend_from_slice(&(meta.len() as u16).to_le_bytes());
    sealed.extend_from_slice(&meta);
    sealed.extend_from_slice(&state[STATE_HEADER_BYTES..]);
    Ok(vec![[vec![0], file].concat(), sealed])
}

fn vmm_api() -> Result<Vec<Vec<u8>>> {
    use tern_api::vmm::{Response, parse_request};
    let requests = [
        r#"{"op":"status"}"#,
        r#"{"op":"pause"}"#,
        r#"{"op":"resume"}"#,
        r#"{"op":"shutdown"}"#,
        r#"{"op":"announce"}"#,
        r#"{"op":"snapshot","path":"snap-1.tsnap","stop":true}"#,
        r#"{"op":"migrate","to":"10.0.0.2:7000","streams":4,"downtime_ms":30,"timeout_s":20.5,"force_on_timeout":true,"max_bandwidth_mibps":800,"verify_memory":true,"protocol_version":1,"disk_successor":"2"}"#,
        r#"{"op":"migrate_cancel"}"#,
        r#"{"op":"console_input","data":"load 70\n","wait_ms":100}"#,
        r#"{"op":"dirty_rate","window_ms":200}"#,
    ];
    let mut seeds = Vec::new();
    for r in requests {
        parse_request(r).map_err(|e| anyhow::anyhow!("request seed {r} is refused: {e}"))?;
        seeds.push([b"\0".to_vec(), r.as_bytes().to_vec(), b"\n".to_vec()].concat());
    }
    let answers = [
        Response::ok().to_line(),
        Response::error("the VM is not paused").to_line(),
        r#"{"ok":true,"dirty_rate":{"pages_per_s":1200,"window_ms":201,"pages":241,"cost_us":90}}"#
            .to_string(),
    ];
    for a in answers {
        serde_json::from_str::<Response>(&a)
            .map_err(|e| anyhow::anyhow!("answer seed {a} is refused: {e}"))?;
        seeds.push([b"\x01".to_vec(), a.into_bytes()].concat());
    }
    Ok(seeds)
}

fn cluster_api() -> Result<Vec<Vec<u8>>> {
    use tern_api::agent::{AgentReport, Command, CommandResponse};
    use tern_api::automation::Policy;
    use tern_api::cluster::{MaintenanceRequest, MigrateRequest, VmCreate};
    fn check<T: serde::de::DeserializeOwned>(json: &str) -> Result<()> {
        match serde_json::from_str::<T>(json) {
            Ok(_) => Ok(()),
            Err(e) => bail!("body seed {json} is refused: {e}"),
        }
    }
    let vm = r#"{"name":"web-1","vcpus":1,"memory_mib":64,"kernel":"builtin:testguest","cmdline":"load=30","disk":"volume://1/web-1","anti_affinity":"web","restart_priority":80}"#;
    let policy = serde_json::to_string(&Policy::default())?;
    let bodies: Vec<(u8, String)> = vec![
        (0, vm.to_string()),
        (
            0,
            r#"{"name":"db","vcpus":2,"memory_mib":128,"kernel":"builtin:testguest"}"#.into(),
        ),
        (1, r#"{"to":"host-2"}"#.into()),
        (1, r#"{"to":null}"#.into()),
        (1, r#"{"to":"host-2","post_copy_after":2}"#.into()),
        (2, r#"{"enter":true}"#.into()),
        (3, policy),
        // A float whose shortest decimal an inexact parser reads one ulp off.
        (
            3,
            r#"{"automation":"manual","aggressiveness":3,"interval_s":10,"detector":"lr","selection":"mmt","parameter":1.2,"hold_s":30,"min_improvement_pct":4.444444444444445e+63,"cooldown_s":120,"max_migrations":0,"power":{"enabled":true,"spare_hosts":0,"off_hold_s":60,"on_hold_s":10}}"#.into(),
        ),
        (
            4,
            r#"{"host":"host-1","generation_seen":3,"seq":41,"last_command_id":7,"vms":[],"cpu_utilization":0.42,"parked_cores":2}"#.into(),
        ),
        (
            5,
            format!(r#"{{"generation":3,"id":8,"host_lease":77,"body":{{"op":"start","spec":{vm},"disk_url":null}}}}"#),
        ),
        (
            5,
            r#"{"generation":3,"id":9,"host_lease":77,"body":{"op":"migrate_out","vm":"web-1","to":"10.77.0.12:7000","disk_successor":2}}"#.into(),
        ),
        (
            5,
            r#"{"generation":3,"id":10,"host_lease":77,"body":{"op":"migrate_out","vm":"web-1","to":"10.77.0.12:7000","disk_successor":null,"post_copy_after":1}}"#.into(),
        ),
        (5, r#"{"generation":4,"id":1,"host_lease":77,"body":{"op":"ping"}}"#.into()),
    ];
    let mut seeds = Vec::new();
    for (mode, body) in bodies {
        match mode {
            0 => check::<VmCreate>(&body)?,
            1 => check::<MigrateRequest>(&body)?,
            2 => check::<MaintenanceRequest>(&body)?,
            3 => check::<Policy>(&body)?,
            4 => check::<AgentReport>(&body)?,
            5 => check::<Command>(&body)?,
            _ => check::<CommandResponse>(&body)?,
        }
        seeds.push([vec![mode], body.into_bytes()].concat());
    }
    Ok(seeds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_migration::StreamName;
    use tern_migration::machine::receiver::{ChecksumStage, Receiver, Step};

    /// Replays a `migration_receiver` seed as the fuzz target reads it (sealed records only)
    /// through the receiver machine: the last step, and whether the commit went through.
    fn replay(seed: &[u8]) -> (Receiver, Option<Step>, bool) {
        let mut rx = Receiver::new();
        let mut rest = seed;
        let mut streams: BTreeMap<u8, u16> = BTreeMap::new();
        let mut last = None;
        while let [conn, mode, a, b, tail @ ..] = rest {
            assert!(mode & 0x80 != 0, "sealed records only");
            let len = usize::from(u16::from_le_bytes([*a, *b]));
            let bytes = wire::seal(mode & 0x7f, &tail[..len]);
            rest = &tail[len..];
            let layout = rx.layout().cloned();
            let (frame, _) = wire::decode(&bytes, layout.as_ref()).expect("a seed frame decodes");
            if *conn == 0 && rx.layout().is_none() {
                rx.control_opened(frame).unwrap().unwrap();
                rx.prepared(Ok(())).unwrap().unwrap();
            } else if let Some(&i) = streams.get(conn) {
                let step = rx.frame(StreamName::Data(i), frame).unwrap();
                if matches!(step, Step::ChecksumFailed(_)) {
                    return (rx, Some(step), false);
                }
                last = Some(step);
            } else if *conn == 0 {
                last = Some(rx.frame(StreamName::Control, frame).unwrap());
            } else {
                streams.insert(*conn, rx.data_opened(frame).unwrap());
            }
            if rx.ready_to_commit() {
                let ok = rx.commit(None).is_ok();
                return (rx, last, ok);
            }
        }
        (rx, last, false)
    }

    #[test]
    fn every_seed_of_a_target_has_a_name_of_its_own() {
        // Two sealed frames with no payload: the same CRC-32C, the residue.
        let a = wire::seal(9, &[]);
        let b = wire::seal(10, &[]);
        assert_eq!(crc32c::crc32c(&a), CRC32C_RESIDUE);
        assert_eq!(crc32c::crc32c(&b), CRC32C_RESIDUE);
        assert_ne!(seed_name(&a), seed_name(&b));
        for (target, seeds) in all().unwrap() {
            let mut names: BTreeMap<String, &[u8]> = BTreeMap::new();
            for s in &seeds {
                if let Some(other) = names.insert(seed_name(s), s) {
                    assert_eq!(other, &s[..], "two {target} seeds named {}", seed_name(s));
                }
            }
        }
    }

    /// A scratch directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Every file under `dir`, with its bytes.
    fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut files = BTreeMap::new();
        for d in std::fs::read_dir(dir).unwrap() {
            for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
                let f = f.unwrap().path();
                files.insert(f.clone(), std::fs::read(&f).unwrap());
            }
        }
        files
    }

    #[test]
    fn writing_the_seeds_leaves_every_other_file_alone() {
        let scratch =
            Scratch(std::env::temp_dir().join(format!("tern-xtask-seeds-{}", std::process::id())));
        let dir = &scratch.0;
        let t = dir.join("target_a");
        std::fs::create_dir_all(&t).unwrap();
        // An input added by hand and a seed an older encoder wrote (named as the generator
        // names seeds), which this run does not generate.
        std::fs::write(t.join("crash-regression"), b"by hand").unwrap();
        let stale = t.join(seed_name(b"old encoding"));
        std::fs::write(&stale, b"old encoding").unwrap();
        let corpora: Corpora = [
            (
                "target_a",
                vec![b"one".to_vec(), b"two".to_vec(), b"one".to_vec()],
            ),
            ("target_b", vec![b"three".to_vec()]),
        ]
        .into();

        let first = write(dir, &corpora).unwrap();
        let mut kept = vec![t.join("crash-regression"), stale.clone()];
        kept.sort();
        assert_eq!(
            first,
            Written {
                written: 3,
                current: 0,
                others: kept.clone()
            }
        );
        let after = tree(dir);
        assert_eq!(after.len(), 5, "{after:?}");
        assert_eq!(after[&t.join("crash-regression")], b"by hand");
        assert_eq!(after[&stale], b"old encoding");
        assert_eq!(after[&t.join(seed_name(b"two"))], b"two");
        assert_eq!(
            after[&dir.join("target_b").join(seed_name(b"three"))],
            b"three"
        );

        // Seeds already current: nothing changes.
        let again = write(dir, &corpora).unwrap();
        assert_eq!(
            again,
            Written {
                written: 0,
                current: 3,
                others: kept
            }
        );
        assert_eq!(tree(dir), after);

        // A file with a seed's name but other bytes is not overwritten.
        let forged = t.join(seed_name(b"one"));
        std::fs::write(&forged, b"not one").unwrap();
        let err = write(dir, &corpora).unwrap_err().to_string();
        assert!(err.contains(&seed_name(b"one")), "{err}");
        assert_eq!(std::fs::read(&forged).unwrap(), b"not one");
    }

    #[test]
    fn the_whole_two_stream_receiver_seed_commits() {
        let seeds = migration_receiver();
        let (rx, last, committed) = replay(&seeds[0]);
        assert!(
            committed,
            "each page on its stripe's stream, both streams ended: {last:?}"
        );
        assert!(rx.ready_to_commit());
    }

    #[test]
    fn the_in_place_receiver_seeds_reach_the_page_checks() {
        let seeds = migration_receiver();
        let [.., good, bad] = &seeds[..] else {
            panic!("the in-place seeds are the last two");
        };
        // A page fails its checksum in round 0 and comes again intact: the commit goes
        // through with one page sent again.
        let (rx, _, committed) = replay(good);
        assert!(rx.accepts_page_data());
        assert!(committed, "the whole in-place migration commits");
        assert_eq!(rx.checksum_mismatches(), 1);
        assert_eq!(rx.suspect_pages(), 0);
        // The same page fails it again after the last round end: the stream's end fails it.
        let (_, last, committed) = replay(bad);
        assert!(!committed);
        assert!(
            matches!(last, Some(Step::ChecksumFailed(ref f)) if f.stage == ChecksumStage::Paused),
            "{last:?}"
        );
    }
}

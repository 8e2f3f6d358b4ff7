//! Helpers shared by the fuzz targets in `fuzz_targets/`: a sparse in-memory LUN for the volume
//! format, a one-connection loopback NBD "server" that plays back the fuzzer's bytes to the real
//! client, and the "sealed" input convention that lets the fuzzer reach payload parsers behind a
//! checksum it could never guess.
//!
//! The input layout of every target is documented at its top; `cargo xtask fuzz --seed-corpus`
//! writes seeds in exactly those layouts (xtask/src/fuzz_seeds.rs).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::{Mutex, OnceLock};

/// Splits `n` little-endian bytes off the front of `data` as a number (missing bytes read as 0).
pub fn take_le(data: &mut &[u8], n: usize) -> u64 {
    let k = n.min(data.len());
    let mut v = 0u64;
    for (i, b) in data[..k].iter().enumerate() {
        v |= u64::from(*b) << (8 * i);
    }
    *data = &data[k..];
    v
}

/// Splits up to `n` bytes off the front of `data`.
pub fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let k = n.min(data.len());
    let (head, rest) = data.split_at(k);
    *data = rest;
    head
}

/// A LUN of a fixed length whose unwritten bytes read as zero; only written ranges use memory,
/// so a fuzz input can describe a multi-megabyte volume in a few hundred bytes.
#[derive(Debug)]
pub struct SparseLun {
    len: u64,
    chunks: Mutex<BTreeMap<u64, Vec<u8>>>,
}

impl SparseLun {
    /// An all-zero LUN of `len` bytes.
    pub fn new(len: u64) -> Self {
        SparseLun {
            len,
            chunks: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Vec<u8>>> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `data` at `offset` (later writes win where ranges overlap).
    pub fn put(&self, offset: u64, data: &[u8]) {
        self.lock().insert(offset, data.to_vec());
    }
}

impl tern_volume::lun::Lun for SparseLun {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the LUN"))?;
        buf.fill(0);
        for (&at, bytes) in self.lock().iter() {
            let c_end = at + bytes.len() as u64;
            if c_end <= offset || at >= end {
                continue;
            }
            let from = at.max(offset);
            let to = c_end.min(end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&bytes[(from - at) as usize..(to - at) as usize]);
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write past the LUN",
            ));
        }
        self.put(offset, data);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A loopback listener, bound once per fuzzing process.
fn listener() -> &'static (TcpListener, SocketAddr) {
    static L: OnceLock<(TcpListener, SocketAddr)> = OnceLock::new();
    L.get_or_init(|| {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port for the fuzzer");
        let a = l.local_addr().expect("local address");
        (l, a)
    })
}

/// Plays `server_bytes` to the one client that `client` connects to the given address: the
/// bytes are written as the server's side of the conversation (then the server closes its
/// sending half) while whatever the client sends is read and dropped. Returns what `client`
/// returned. The client must connect exactly once.
pub fn with_scripted_server<T>(server_bytes: &[u8], client: impl FnOnce(SocketAddr) -> T) -> T {
    let (l, addr) = listener();
    std::thread::scope(|s| {
        let server = s.spawn(move || {
            let Ok((mut conn, _)) = l.accept() else {
                return;
            };
            let _ = conn.write_all(server_bytes);
            let _ = conn.shutdown(Shutdown::Write);
            let _ = io::copy(&mut conn.take(u64::MAX), &mut io::sink());
        });
        let out = client(*addr);
        server.join().expect("the scripted server does not panic");
        out
    })
}

/// One migration frame as the fuzzer gives it: `[0x80 | kind] [len: u16 LE] [payload]` is wrapped
/// in a valid header and checksum (so mutations reach the payload parser); any other first byte
/// means the frame's raw bytes follow (header, checksum and all, up to the end of the frame the
/// header announces). Returns the frame bytes and moves `data` past them; `None` at the end.
pub fn next_frame(data: &mut &[u8]) -> Option<Vec<u8>> {
    let mode = *data.first()?;
    *data = &data[1..];
    if mode & 0x80 != 0 {
        let len = take_le(data, 2) as usize;
        let payload = take(data, len);
        Some(tern_migration::wire::seal(mode & 0x7f, payload))
    } else {
        let header = data.get(..tern_migration::wire::HEADER_LEN)?;
        let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        let total = tern_migration::wire::HEADER_LEN.saturating_add(len);
        Some(take(data, total).to_vec())
    }
}

/// The VM the migration targets pretend to be: the receiver accepts only a hello describing it
/// (as `tern vm receive` accepts only the VM it was started for), so the agreed layout, and with
/// it any memory walk a verify digest causes, stays small. Its first region holds 192 pages so
/// that a two-stream migration has pages of both stripes (page `i` travels on data stream
/// `(i / 128) mod streams`; the page at 4 GiB, index 192, on stream 1 of two).
pub fn migration_target_vm() -> tern_migration::VmConfigDescription {
    use tern_migration::{CpuidDigest, MemoryLayout, PAGE_SIZE, Region, VmConfigDescription};
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

/// An in-memory NBD export of `len` bytes for the server targets. Its reads and writes index
/// the buffer directly, so a request the server's validator let through outside the export
/// panics here: that is a finding.
#[derive(Debug)]
pub struct MemBackend(Mutex<Vec<u8>>);

impl MemBackend {
    /// A zeroed export of `len` bytes.
    pub fn new(len: usize) -> Self {
        MemBackend(Mutex::new(vec![0; len]))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl tern_nbd::Backend for MemBackend {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), tern_nbd::Errno> {
        let v = self.lock();
        buf.copy_from_slice(&v[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), tern_nbd::Errno> {
        let mut v = self.lock();
        v[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), tern_nbd::Errno> {
        Ok(())
    }
}

/// The exports the NBD server targets serve: `m`, 64 KiB.
pub fn nbd_exports() -> tern_nbd::StaticExports {
    let mut ex = tern_nbd::StaticExports::new();
    ex.insert("m", std::sync::Arc::new(MemBackend::new(64 << 10)));
    ex
}

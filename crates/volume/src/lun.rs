//! Access to the shared LUN: a trait over positional I/O, the file/block-device implementation, and
//! a fault-injecting wrapper (crashes at the N-th write, torn writes, path loss on demand).
//!
//! **Cache policy: none.** Every host opens the LUN with `O_DIRECT` ([`DirectFile`]), so reads
//! come from the storage and a completed write is on the storage, never in one host's page
//! cache: another host's read (a metadata load, a commit's generation check, a reader's data)
//! sees it, and a killed writer leaves no dirty page behind to be written back after its fence.
//! `O_DIRECT` wants the buffer, offset and length aligned to the device's logical block; I/O
//! goes through a buffer aligned to [`DIRECT_ALIGN`] (4 KiB, a multiple of every logical block
//! size in use), and a write that does not cover whole 4 KiB blocks reads the blocks around it
//! first (read-modify-write, exclusive within the process; across processes every block
//! belongs to one file's extent or to the metadata, which one writer at a time owns). A file
//! system that refuses `O_DIRECT` (tmpfs before Linux 6.6, some FUSE file systems) is refused
//! with an error that says so: there is no buffered fallback, since it would be wrong as soon
//! as two hosts share the LUN.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

/// Alignment of buffers, offsets and lengths of `O_DIRECT` I/O on the LUN.
pub const DIRECT_ALIGN: usize = 4096;

/// A buffer of `len` bytes starting on a [`DIRECT_ALIGN`] boundary. Its memory comes from a
/// per-thread spare and goes back to it on drop, so a request does not allocate and zero a new
/// bounce buffer (that was about 13 % of a node's CPU on 4 KiB reads). A taken buffer holds
/// stale bytes: every user overwrites or zeroes all of it (see [`DirectFile::read_span`]).
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

/// Largest buffer a thread keeps as its spare; bigger ones are freed on drop.
const SPARE_KEEP: usize = 1 << 20;

thread_local! {
    static SPARE: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

impl AlignedBuf {
    fn take(len: usize) -> AlignedBuf {
        let mut raw = SPARE.with(|s| s.take());
        if raw.len() < len + DIRECT_ALIGN {
            raw = vec![0u8; len + DIRECT_ALIGN];
        }
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { raw, start, len }
    }
    fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.raw.len() <= SPARE_KEEP + DIRECT_ALIGN {
            let raw = std::mem::take(&mut self.raw);
            SPARE.with(|s| s.set(raw));
        }
    }
}

/// The aligned block range `[start, end)` covering `len` bytes at `offset`.
fn aligned_span(offset: u64, len: usize) -> (u64, u64) {
    let a = DIRECT_ALIGN as u64;
    let start = offset / a * a;
    let end = (offset + len as u64).div_ceil(a) * a;
    (start, end)
}

/// The LUN opened with `O_DIRECT`: positional reads and writes of any size and offset, through
/// aligned buffers (see the module's cache policy). Its methods are named as `File`'s.
#[derive(Debug)]
pub struct DirectFile {
    file: File,
    /// Aligned writes share it; a read-modify-write of partial blocks takes it exclusively.
    rmw: RwLock<()>,
}

impl DirectFile {
    /// Opens `path` read-write with `O_DIRECT`. A file system that refuses `O_DIRECT` gives an
    /// `InvalidInput` error naming the path and the cause.
    pub fn open(path: &Path) -> io::Result<DirectFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .map_err(|e| direct_open_error(path, e))?;
        Ok(DirectFile {
            file,
            rmw: RwLock::new(()),
        })
    }

    /// The size, where a seek to the end lands (block devices report 0 in their metadata).
    pub fn size(&self) -> io::Result<u64> {
        (&self.file).seek(SeekFrom::End(0))
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (start, end) = aligned_span(offset, buf.len());
        let mut tmp = AlignedBuf::take((end - start) as usize);
        self.read_span(&mut tmp, start, offset + buf.len() as u64)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&tmp.as_slice()[skip..skip + buf.len()]);
        Ok(())
    }

    /// Fills `tmp` from the aligned `start`; bytes past the end of the LUN are zeroed, and at
    /// least up to `need` must be read.
    fn read_span(&self, tmp: &mut AlignedBuf, start: u64, need: u64) -> io::Result<()> {
        let mut done = 0usize;
        let total = tmp.len;
        while done < total {
            let n = self
                .file
                .read_at(&mut tmp.as_mut_slice()[done..], start + done as u64)?;
            if n == 0 || n % DIRECT_ALIGN != 0 {
                done += n;
                break;
            }
            done += n;
        }
        tmp.as_mut_slice()[done..].fill(0);
        if start + (done as u64) < need {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read past the end of the LUN: bytes up to {need} asked, it ends at {}",
                    start + done as u64
                ),
            ));
        }
        Ok(())
    }

    /// Writes all of `data` at `offset`.
    pub fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let (start, end) = aligned_span(offset, data.len());
        let mut tmp = AlignedBuf::take((end - start) as usize);
        let skip = (offset - start) as usize;
        if start == offset && end == offset + data.len() as u64 {
            let _shared = self.rmw.read().unwrap_or_else(|e| e.into_inner());
            tmp.as_mut_slice().copy_from_slice(data);
            return self.file.write_all_at(tmp.as_slice(), start);
        }
        let _excl = self.rmw.write().unwrap_or_else(|e| e.into_inner());
        self.read_span(&mut tmp, start, start)?;
        tmp.as_mut_slice()[skip..skip + data.len()].copy_from_slice(data);
        self.file.write_all_at(tmp.as_slice(), start)
    }

    /// Makes completed writes durable (the device's own cache).
    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A test-only fault point, honoured in debug builds alone: when `TERN_TEST_STOP_AT` names
/// `point`, the process stops itself with SIGSTOP the `TERN_TEST_STOP_SKIP + 1`-th time it gets
/// here (default: the first), as a host frozen at exactly that step would. Points:
/// `disk-pwrite` (a VM disk's direct write, after its lease check, before the `pwrite`).
pub fn stop_point(point: &str) {
    #[cfg(debug_assertions)]
    {
        use std::sync::OnceLock;
        use std::sync::atomic::AtomicU64;
        static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
        static PASSES: AtomicU64 = AtomicU64::new(0);
        let plan = PLAN.get_or_init(|| {
            let at = std::env::var("TERN_TEST_STOP_AT").ok()?;
            let skip = std::env::var("TERN_TEST_STOP_SKIP")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            Some((at, skip))
        });
        if let Some((at, skip)) = plan
            && at == point
            && PASSES.fetch_add(1, Ordering::SeqCst) == *skip
        {
            eprintln!("tern-volume: test stop point {point}: stopping (SIGSTOP)");
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::STOP,
            );
            // The signal is for the process: another thread may take it, and this one would
            // run on past the point (through the next checks, into the next write) before the
            // group stop reaches it. It reaches a sleeping thread at once, so sleep.
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

fn direct_open_error(path: &Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: the file system refuses O_DIRECT (as tmpfs before Linux 6.6 does); the LUN \
                 must be a block device or a file on a file system with direct I/O (ext4, xfs, \
                 btrfs), or hosts would read stale data from their page caches",
                path.display()
            ),
        )
    } else {
        e
    }
}

/// Positional I/O on the shared LUN.
pub trait Lun: Send + Sync {
    /// Usable size in bytes.
    fn len(&self) -> u64;
    /// Whether the LUN is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Read exactly `buf.len()` bytes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `data`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Make completed writes durable.
    fn flush(&self) -> io::Result<()>;
}

/// A regular file or block device standing for the LUN, opened with `O_DIRECT`.
#[derive(Debug)]
pub struct FileLun {
    file: DirectFile,
    len: u64,
}

impl FileLun {
    /// Open an existing LUN read-write, with `O_DIRECT` (see the module's cache policy).
    pub fn open(path: &Path) -> io::Result<FileLun> {
        let file = DirectFile::open(path)?;
        let len = file.size()?;
        Ok(FileLun { file, len })
    }
}

impl Lun for FileLun {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// What the fault injector does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultPlan {
    /// Crash (fail this and every later mutation) at the N-th mutation (write or flush), 0-based.
    pub crash_at: Option<usize>,
    /// At the crashing write, persist the first half of the data before failing (a torn write).
    pub torn: bool,
}

/// Wraps a LUN and injects faults: a crash at a chosen write step, or a lost path (every I/O fails
/// with EIO while `set_path_lost(true)`).
pub struct FaultyLun<L> {
    inner: L,
    plan: FaultPlan,
    steps: Mutex<usize>,
    crashed: AtomicBool,
    path_lost: AtomicBool,
    volatile: AtomicBool,
    /// Writes not yet flushed, in order, while the volatile cache is on.
    pending: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl<L: std::fmt::Debug> std::fmt::Debug for FaultyLun<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyLun")
            .field("inner", &self.inner)
            .field("plan", &self.plan)
            .finish()
    }
}

impl<L: Lun> FaultyLun<L> {
    /// Wrap `inner` with `plan`.
    pub fn new(inner: L, plan: FaultPlan) -> Self {
        FaultyLun {
            inner,
            plan,
            steps: Mutex::new(0),
            crashed: AtomicBool::new(false),
            path_lost: AtomicBool::new(false),
            volatile: AtomicBool::new(false),
            pending: Mutex::new(Vec::new()),
        }
    }

    /// Model a volatile write cache: writes are kept in memory until a flush, and are lost when
    /// the path is lost. This is what makes "a flush covers every earlier write" testable.
    pub fn set_volatile_cache(&self, on: bool) {
        self.volatile.store(on, Ordering::SeqCst);
    }

    /// Mutations attempted so far.
    pub fn steps(&self) -> usize {
        *self.steps.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Whether the planned crash happened.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }
    /// Simulate losing (or regaining) the path to the storage.
    pub fn set_path_lost(&self, lost: bool) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if lost {
            // Whatever was only in the cache is gone with the path.
            pending.clear();
        }
        self.path_lost.store(lost, Ordering::SeqCst);
    }

    fn step(&self) -> Result<bool, io::Error> {
        if self.crashed() || self.path_lost.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected fault: LUN unavailable"));
        }
        let mut s = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        let now = *s;
        *s += 1;
        Ok(self.plan.crash_at == Some(now))
    }
}

impl<L: Lun> Lun for FaultyLun<L> {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.path_lost.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected fault: path lost"));
        }
        self.inner.read_at(buf, offset)?;
        // Overlay cached writes, oldest first.
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let end = offset + buf.len() as u64;
        for (o, d) in pending.iter() {
            let (ws, we) = (*o, *o + d.len() as u64);
            if ws < end && we > offset {
                let s = ws.max(offset);
                let e = we.min(end);
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&d[(s - ws) as usize..(e - ws) as usize]);
            }
        }
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if self.step()? {
            if self.plan.torn {
                self.inner.write_at(&data[..data.len() / 2], offset)?;
            }
            self.crashed.store(true, Ordering::SeqCst);
            return Err(io::Error::other("injected crash"));
        }
        if self.volatile.load(Ordering::SeqCst) {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if self.path_lost.load(Ordering::SeqCst) {
                return Err(io::Error::other("injected fault: path lost"));
            }
            pending.push((offset, data.to_vec()));
            return Ok(());
        }
        self.inner.write_at(data, offset)
    }
    fn flush(&self) -> io::Result<()> {
        if self.step()? {
            self.crashed.store(true, Ordering::SeqCst);
            return Err(io::Error::other("injected crash"));
        }
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        for (o, d) in &pending {
            self.inner.write_at(d, *o)?;
        }
        self.inner.flush()
    }
}

impl<L: Lun + ?Sized> Lun for std::sync::Arc<L> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(data, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn scratch(len: u64) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lun");
        File::create(&path).unwrap().set_len(len).unwrap();
        (dir, path)
    }

    #[test]
    fn the_lun_is_opened_with_o_direct() {
        let (_d, path) = scratch(1 << 20);
        let lun = FileLun::open(&path).unwrap();
        let fd = lun.file.file.as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        assert_ne!(
            flags & rustix::fs::OFlags::DIRECT.bits(),
            0,
            "flags {flags:o} lack O_DIRECT"
        );
        assert_eq!(lun.len(), 1 << 20);
    }

    #[test]
    fn unaligned_reads_and_writes_match_a_plain_model() {
        let len = 256 * 1024u64;
        let (_d, path) = scratch(len);
        let lun = FileLun::open(&path).unwrap();
        let mut model = vec![0u8; len as usize];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for i in 0..400u32 {
            let n = 1 + next(20_000) as usize;
            let off = next(len - n as u64);
            let data: Vec<u8> = (0..n).map(|k| (k as u32 ^ i) as u8).collect();
            lun.write_at(&data, off).unwrap();
            model[off as usize..off as usize + n].copy_from_slice(&data);
            let rn = 1 + next(30_000) as usize;
            let roff = next(len - rn as u64);
            let mut got = vec![0u8; rn];
            lun.read_at(&mut got, roff).unwrap();
            assert!(
                got == model[roff as usize..roff as usize + rn],
                "read {rn} at {roff} after write {n} at {off}"
            );
        }
        // What a buffered reader (the storage) sees is the same.
        assert!(std::fs::read(&path).unwrap() == model);
        let mut past = vec![0u8; 10];
        assert!(
            lun.read_at(&mut past, len - 5).is_err(),
            "read past the end"
        );
    }

    #[test]
    fn a_partial_write_at_the_end_of_the_lun_adds_zeros_not_an_earlier_buffer() {
        // The LUN ends 100 bytes into its second block, and the thread's spare buffer last held
        // another block's bytes (0xCD). A partial write into the short block reads that block
        // back first: what lies past the LUN's end must come out as zeros, whether the file
        // system's short direct read zeroed the buffer's tail (this one's does) or not.
        let (_d, path) = scratch(4096 + 100);
        let lun = FileLun::open(&path).unwrap();
        lun.write_at(&[0xCD; 4096], 0).unwrap();
        let mut b = vec![0u8; 4096];
        lun.read_at(&mut b, 0).unwrap();
        lun.write_at(&[0xAB; 10], 4096 + 50).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 8192, "the block was written whole");
        assert!(bytes[..4096].iter().all(|&x| x == 0xCD));
        assert!(bytes[4096..4146].iter().all(|&x| x == 0));
        assert!(bytes[4146..4156].iter().all(|&x| x == 0xAB));
        assert!(
            bytes[4156..].iter().all(|&x| x == 0),
            "bytes past the LUN's end came from a reused buffer"
        );
    }

    #[test]
    fn concurrent_partial_writes_in_one_block_are_not_lost() {
        let (_d, path) = scratch(64 * 1024);
        let lun = std::sync::Arc::new(FileLun::open(&path).unwrap());
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let lun = lun.clone();
                std::thread::spawn(move || {
                    for round in 0..50u64 {
                        // Thread t owns bytes [t*512, t*512+512) of block 0 and writes them.
                        lun.write_at(&[t + 1; 512], u64::from(t) * 512).unwrap();
                        // And a whole aligned block of its own.
                        lun.write_at(&[round as u8; 4096], 4096 * (1 + u64::from(t)))
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut b = vec![0u8; 4096];
        lun.read_at(&mut b, 0).unwrap();
        for t in 0..8u8 {
            assert!(
                b[t as usize * 512..(t as usize + 1) * 512]
                    .iter()
                    .all(|&x| x == t + 1),
                "thread {t}'s bytes were overwritten by another's read-modify-write"
            );
        }
    }

    #[test]
    fn a_file_system_refusing_o_direct_is_named() {
        let e = direct_open_error(
            Path::new("/mnt/tmpfs/lun"),
            io::Error::from_raw_os_error(rustix::io::Errno::INVAL.raw_os_error()),
        );
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let msg = e.to_string();
        assert!(
            msg.contains("/mnt/tmpfs/lun") && msg.contains("O_DIRECT"),
            "{msg}"
        );
        // Other errors pass through unchanged.
        let e = direct_open_error(Path::new("/x"), io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}

//! What a virtio-blk device reads and writes: a [`BlockBackend`] (a raw file here; other kinds,
//! such as a cluster-shared-volume file, are registered by the program embedding the VMM under
//! a URL scheme, so this crate stays free of their dependencies).
//!
//! A disk spec with `SCHEME://` (e.g. `volume://127.0.0.1:10811/vm1.raw`) is opened through the
//! opener registered for `SCHEME`; anything else is a path to a raw image file.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// Storage behind one virtio-blk device. Calls come from vCPU threads, one request at a time per
/// device; `flush` must make every write that returned before it durable.
pub trait BlockBackend: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from byte `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `data` at byte `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every earlier acknowledged write durable.
    fn flush(&self) -> io::Result<()>;
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Whether the size is zero.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether writes are refused (the device then offers VIRTIO_BLK_F_RO).
    fn read_only(&self) -> bool;
    /// Gives the `len` bytes at byte `offset` back to the storage (a guest's DISCARD): a hint,
    /// after which reads of the range return zeroes or the old data. Storage that cannot free
    /// space answers `Ok` and keeps the data.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes the `len` bytes at byte `offset` read as zeroes (a guest's WRITE_ZEROES); with
    /// `may_unmap` the storage may free the range instead of writing zeroes into it.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;

    // Live-migration hooks. Backends whose write ownership is exclusive per host (a volume file
    // holds a cluster write lease) move it with the VM; a raw file says so by naming no
    // successor. Every backend answers each hook: there are no default bodies.

    /// Target side: the id the source must name as successor (a volume node id); `None` for
    /// storage without exclusive write ownership (the migration then leaves it alone).
    fn successor_id(&self) -> Option<String>;
    /// Source side, at switch-over (vCPUs paused, no request in flight): make every write
    /// durable and hand write ownership to `successor` (the target's [`Self::successor_id`]) in
    /// one step; writes are refused afterwards. On error ownership stays here.
    fn release_to(&self, successor: &str) -> io::Result<()>;
    /// Source side, the migration aborted after [`Self::release_to`]: take ownership back
    /// before the VM resumes here.
    fn abort_handover(&self) -> io::Result<()>;
    /// Target side, after the source's [`Self::release_to`] and before the VM first runs here:
    /// pick ownership up.
    fn take_over(&self) -> io::Result<()>;
}

/// A raw image file.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    len: u64,
    readonly: bool,
}

impl RawFile {
    /// Opens `path` (read-only if asked).
    pub fn open(path: &Path, readonly: bool) -> io::Result<RawFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)?;
        let len = file.metadata()?.len();
        Ok(RawFile::from_file(file, len, readonly))
    }

    /// Wraps an open file whose usable size is `len`.
    pub fn from_file(file: File, len: u64, readonly: bool) -> RawFile {
        RawFile {
            file,
            len,
            readonly,
        }
    }
}

impl BlockBackend for RawFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.file.write_all_at(data, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn read_only(&self) -> bool {
        self.readonly
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        match self.fallocate(PUNCH_HOLE, offset, len) {
            // A file system without holes keeps the data: a discard is only a hint.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.check_range(offset, len)?;
        let mode = if may_unmap { PUNCH_HOLE } else { ZERO_RANGE };
        match self.fallocate(mode, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_buffers(offset, len)
            }
            r => r,
        }
    }
    fn successor_id(&self) -> Option<String> {
        // A raw file has no per-host write ownership: nothing moves with the VM.
        None
    }
    fn release_to(&self, _successor: &str) -> io::Result<()> {
        Ok(())
    }
    fn abort_handover(&self) -> io::Result<()> {
        Ok(())
    }
    fn take_over(&self) -> io::Result<()> {
        Ok(())
    }
}

/// `fallocate` mode: free the range, keep the file size.
const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// `fallocate` mode: make the range read as zeroes (the file system may unwrite its blocks).
const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
/// The largest zero buffer written when the file system zeroes no range itself.
const ZERO_CHUNK: u64 = 1 << 20;

impl RawFile {
    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} is outside the disk's {} bytes",
                    self.len
                ),
            )),
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only reads its integer arguments and acts on the open descriptor
        // this struct owns; no memory is shared with the kernel.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let zero = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK) as usize;
            self.file.write_all_at(&zero[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Opens a backend from the rest of a spec (after `SCHEME://`) and the read-only flag; the error
/// is a one-line message for the user.
pub type Opener = Box<dyn Fn(&str, bool) -> Result<Box<dyn BlockBackend>, String> + Send + Sync>;

fn openers() -> &'static Mutex<HashMap<String, Opener>> {
    static OPENERS: OnceLock<Mutex<HashMap<String, Opener>>> = OnceLock::new();
    OPENERS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Registers the opener for `SCHEME://…` disk specs (replacing an earlier one).
pub fn register_scheme(scheme: &str, opener: Opener) {
    openers()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(scheme.to_owned(), opener);
}

/// Splits `SCHEME://REST` into (scheme, rest); `None` for a plain path.
pub fn split_scheme(spec: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = spec.split_once("://")?;
    (!scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+'))
    .then_some((scheme, rest))
}

/// Whether an opener is registered for `scheme`.
pub fn scheme_known(scheme: &str) -> bool {
    openers()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(scheme)
}

/// Opens a disk spec: a registered `SCHEME://…` or a raw file path.
pub fn open(spec: &Path, readonly: bool) -> Result<Box<dyn BlockBackend>, String> {
    let text = spec.to_string_lossy();
    match split_scheme(&text) {
        Some((scheme, rest)) => {
            let g = openers().lock().unwrap_or_else(|e| e.into_inner());
            let opener = g
                .get(scheme)
                .ok_or_else(|| format!("no disk backend for {scheme}:// in this program"))?;
            opener(rest, readonly)
        }
        None => RawFile::open(spec, readonly)
            .map(|f| Box::new(f) as Box<dyn BlockBackend>)
            .map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_split_only_on_url_like_specs() {
        assert_eq!(
            split_scheme("volume://127.0.0.1:1/a.raw"),
            Some(("volume", "127.0.0.1:1/a.raw"))
        );
        assert_eq!(split_scheme("/tmp/disk.img"), None);
        assert_eq!(split_scheme("://x"), None);
        assert_eq!(split_scheme("/a/b://c"), None);
    }

    #[test]
    fn registered_schemes_open_through_their_opener_and_unknown_ones_fail_clearly() {
        register_scheme(
            "unittest",
            Box::new(|rest, ro| {
                assert!(ro);
                Err(format!("opener saw {rest}"))
            }),
        );
        assert!(scheme_known("unittest"));
        assert_eq!(
            open(Path::new("unittest://x/y"), true).unwrap_err(),
            "opener saw x/y"
        );
        let e = open(Path::new("nosuch://x/y"), false).unwrap_err();
        assert!(e.contains("no disk backend for nosuch://"), "{e}");
    }

    /// Bytes the file system has allocated to `f`.
    fn allocated(f: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks() * 512
    }

    fn filled_file(len: usize) -> (tempfile::NamedTempFile, RawFile) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &vec![0x5au8; len]).unwrap();
        f.as_file().sync_all().unwrap();
        let b = RawFile::open(f.path(), false).unwrap();
        (f, b)
    }

    #[test]
    fn discard_and_unmapping_write_zeroes_turn_blocks_into_holes() {
        const MIB: u64 = 1 << 20;
        let (f, b) = filled_file(4 * MIB as usize);
        let before = allocated(f.as_file());
        assert!(before >= 4 * MIB, "the data is allocated ({before} bytes)");

        b.discard(MIB, MIB).unwrap();
        let after_discard = allocated(f.as_file());
        assert!(
            after_discard <= before - MIB,
            "a discarded MiB is a hole: {before} -> {after_discard} bytes allocated"
        );
        b.write_zeroes(2 * MIB, MIB, true).unwrap();
        let after_zero = allocated(f.as_file());
        assert!(
            after_zero <= after_discard - MIB,
            "write-zeroes with unmap frees its MiB too: {after_discard} -> {after_zero}"
        );
        let mut buf = vec![1u8; 2 * MIB as usize];
        b.read_at(&mut buf, MIB).unwrap();
        assert!(
            buf.iter().all(|&x| x == 0),
            "the freed range reads as zeroes"
        );
        let mut edge = [0u8; 1];
        b.read_at(&mut edge, MIB - 1).unwrap();
        assert_eq!(edge, [0x5a], "the byte before the range is kept");
        b.read_at(&mut edge, 3 * MIB).unwrap();
        assert_eq!(edge, [0x5a], "the byte after the range is kept");
        assert_eq!(
            f.as_file().metadata().unwrap().len(),
            4 * MIB,
            "the size stays"
        );
    }

    #[test]
    fn write_zeroes_without_unmap_zeroes_an_unaligned_range() {
        let (_f, b) = filled_file(64 * 1024);
        b.write_zeroes(1000, 5000, false).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        b.read_at(&mut buf, 0).unwrap();
        assert!(buf[..1000].iter().all(|&x| x == 0x5a));
        assert!(buf[1000..6000].iter().all(|&x| x == 0));
        assert!(buf[6000..].iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn discard_and_write_zeroes_refuse_ranges_past_the_end_and_readonly_files() {
        let (f, b) = filled_file(8192);
        assert!(b.discard(4096, 8192).is_err());
        assert!(b.write_zeroes(u64::MAX, 2, true).is_err());
        let ro = RawFile::open(f.path(), true).unwrap();
        assert_eq!(
            ro.write_zeroes(0, 512, false).unwrap_err().raw_os_error(),
            Some(libc::EROFS)
        );
        assert!(ro.discard(0, 512).is_err());
        let mut buf = [0u8; 8192];
        b.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&x| x == 0x5a), "nothing changed");
    }

    #[test]
    fn a_readonly_raw_file_refuses_writes() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &[7u8; 1024]).unwrap();
        let b = RawFile::open(f.path(), true).unwrap();
        assert_eq!(b.len(), 1024);
        assert!(b.read_only());
        assert!(b.write_at(&[0u8; 512], 0).is_err());
        let mut buf = [0u8; 512];
        b.read_at(&mut buf, 512).unwrap();
        assert_eq!(buf, [7u8; 512]);
    }
}

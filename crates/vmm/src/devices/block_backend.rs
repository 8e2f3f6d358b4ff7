//! What a virtio-blk device reads and writes: a [`BlockBackend`] (a raw file here; other kinds,
//! such as a cluster-shared-volume file, are registered by the program embedding the VMM under
//! a URL scheme, so this crate stays free of their dependencies).
//!
//! A disk spec with `SCHEME://` (e.g. `volume://127.0.0.1:10811/vm1.raw`) is opened through the
//! opener registered for `SCHEME`; anything else is a path to a raw image file.

use std::collections::HashMap;
use std::fs::File;
use std::io;
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

    // Live-migration hooks. Backends whose write ownership is exclusive per host (a volume file
    // holds a cluster write lease) move it with the VM; a raw file has nothing to move.

    /// Target side: the id the source must name as successor (a volume node id), if any.
    fn successor_id(&self) -> Option<String> {
        None
    }
    /// Source side, at switch-over (vCPUs paused, no request in flight): make every write
    /// durable and hand write ownership to `successor` (the target's [`Self::successor_id`]) in
    /// one step; writes are refused afterwards. On error ownership stays here.
    fn release_to(&self, _successor: &str) -> io::Result<()> {
        Ok(())
    }
    /// Source side, the migration aborted after [`Self::release_to`]: take ownership back
    /// before the VM resumes here.
    fn abort_handover(&self) -> io::Result<()> {
        Ok(())
    }
    /// Target side, after the source's [`Self::release_to`] and before the VM first runs here:
    /// pick ownership up.
    fn take_over(&self) -> io::Result<()> {
        Ok(())
    }
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

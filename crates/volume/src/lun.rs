//! Access to the shared LUN: a trait over positional I/O, the file/block-device implementation, and
//! a fault-injecting wrapper (crashes at the N-th write, torn writes, path loss on demand).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// A regular file or block device standing for the LUN.
#[derive(Debug)]
pub struct FileLun {
    file: File,
    len: u64,
}

impl FileLun {
    /// Open an existing LUN read-write.
    pub fn open(path: &Path) -> io::Result<FileLun> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        // Block devices report 0 in metadata; their size is where a seek to the end lands.
        let len = file.seek(SeekFrom::End(0))?;
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

//! Guest memory with missing pages, for post-copy migration: a userfaultfd in missing-page mode
//! over every RAM region of a VM. A page that is absent from the mapping (dropped with
//! `MADV_DONTNEED`, or never written) no longer reads as zeros: the access — a vCPU's, through
//! KVM's own page-table walk or instruction emulation (kernel context, hence the userfaultfd is
//! opened without `UFFD_USER_MODE_ONLY`), or a device thread's — blocks and becomes a fault event
//! that [`MissingPages::next_fault`] reads; [`MissingPages::place`] fills the page (`UFFDIO_COPY`)
//! and wakes every waiter. Placing a page that is already there is harmless (`EEXIST`).
//!
//! Needs root (or `CAP_SYS_PTRACE`) when `/proc/sys/vm/unprivileged_userfaultfd` is 0, which is
//! the default; [`MissingPages::arm`] says so in its error. Measured on KVM-PVM (this project's
//! development hosts) and, as documented for KVM, on VMX/SVM hosts: a vCPU touching a missing
//! page waits in `KVM_RUN` and continues once the page is placed (docs/migration.md,
//! "Post-copy").
//!
//! Every `unsafe` of post-copy lives here; the migration crate sees only the safe
//! [`MissingPages`] handle (through `tern_migration::MissingMemory`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::GuestMemory;

const PAGE: u64 = 4096;

// linux/userfaultfd.h (x86_64), checked against the C header: _IOWR/_IOR of 0xAA.
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_WAKE: u64 = 0x8010_aa02;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `/dev/userfaultfd`'s ioctl that hands out a new userfaultfd (kernels ≥ 6.1).
const USERFAULTFD_IOC_NEW: u64 = 0xaa00;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// A VM's guest memory under a userfaultfd: owed pages missing until placed.
#[derive(Debug)]
pub struct MissingPages {
    fd: OwnedFd,
    /// Keeps the mappings alive for as long as the handle exists, and maps guest addresses.
    memory: GuestMemory,
}

/// Why post-copy memory could not be set up or served.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// No userfaultfd: neither the system call nor `/dev/userfaultfd` gave one.
    #[error(
        "cannot open a userfaultfd (post-copy needs root or CAP_SYS_PTRACE while \
         /proc/sys/vm/unprivileged_userfaultfd is 0, and a kernel with userfaultfd)"
    )]
    Open(#[source] io::Error),
    /// A userfaultfd call failed.
    #[error("userfaultfd {what} failed")]
    Call {
        /// Which call.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A guest address outside the VM's memory (or a range crossing a region's end).
    #[error("guest address {gpa:#x} (+{len:#x}) is outside the VM's memory")]
    Outside {
        /// Address.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

fn call(what: &'static str) -> UffdError {
    UffdError::Call {
        what,
        source: io::Error::last_os_error(),
    }
}

fn open_uffd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the userfaultfd system call takes flags only and returns a new descriptor or -1.
    // UFFD_USER_MODE_ONLY is deliberately not set: KVM's accesses come from kernel context.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let first = io::Error::last_os_error();
    // The device node is the other way in (its permissions, not the sysctl, decide).
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|_| UffdError::Open(first))?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags as its argument and returns a
    // new descriptor or -1; `dev` is a valid open descriptor.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(UffdError::Open(io::Error::last_os_error()));
    }
    // SAFETY: as above, a fresh descriptor from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl MissingPages {
    /// Arms post-copy on `memory` (the VM is paused, its state restored, not yet resumed):
    /// drops the `owed` guest ranges `(gpa, len)` (so a stale copy from an earlier pre-copy
    /// round is never read), then registers every RAM region in missing-page mode. From here
    /// an access to an owed page, or to any page never written, waits for [`Self::place`] or
    /// [`Self::place_zero`].
    pub fn arm(memory: &GuestMemory, owed: &[(u64, u64)]) -> Result<Self, UffdError> {
        let fd = open_uffd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes the `UffdioApi` it is given, which lives on this
        // stack frame for the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
            return Err(call("UFFDIO_API"));
        }
        let this = Self {
            fd,
            memory: memory.clone(),
        };
        for &(gpa, len) in owed {
            let host = this.host(gpa, len)?;
            // SAFETY: `host..host + len` lies inside one private anonymous mapping of guest RAM
            // that `this.memory` keeps alive (checked by `host`); MADV_DONTNEED only makes those
            // pages absent, and no vCPU runs (the VM is paused before its resume).
            if unsafe {
                libc::madvise(host as *mut libc::c_void, len as usize, libc::MADV_DONTNEED)
            } != 0
            {
                return Err(call("madvise(MADV_DONTNEED)"));
            }
        }
        for region in this.memory.iter() {
            let len = region.len();
            let host = this.host(region.start_addr().0, len)?;
            let mut reg = UffdioRegister {
                range: UffdioRange { start: host, len },
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER reads and writes `reg` (on this frame); the range is a
            // whole guest RAM mapping kept alive by `this.memory`.
            if unsafe { libc::ioctl(this.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } != 0 {
                return Err(call("UFFDIO_REGISTER"));
            }
        }
        Ok(this)
    }

    /// The host address of guest range `gpa..gpa + len`, which must lie inside one region.
    fn host(&self, gpa: u64, len: u64) -> Result<u64, UffdError> {
        let outside = || UffdError::Outside { gpa, len };
        let region = self
            .memory
            .find_region(GuestAddress(gpa))
            .ok_or_else(outside)?;
        let offset = gpa - region.start_addr().0;
        if offset.checked_add(len).is_none_or(|end| end > region.len()) {
            return Err(outside());
        }
        let host = self
            .memory
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| outside())?;
        Ok(host as u64)
    }

    /// Waits up to `timeout` for the next fault; its guest-physical page address. Events other
    /// than page faults (none are enabled) are skipped.
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, UffdError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: poll reads and writes one `pollfd` on this frame.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(UffdError::Call {
                what: "poll",
                source: e,
            });
        }
        if n == 0 {
            return Ok(None);
        }
        let mut msg = [0u8; 32];
        // SAFETY: read writes at most 32 bytes into the 32-byte buffer on this frame.
        let got = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(UffdError::Call {
                what: "read",
                source: e,
            });
        }
        if got != 32 || msg[0] != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        let host = u64::from_le_bytes(msg[16..24].try_into().unwrap_or([0; 8])) & !(PAGE - 1);
        Ok(self.gpa_of(host))
    }

    /// The guest address of a host address inside guest RAM.
    fn gpa_of(&self, host: u64) -> Option<u64> {
        self.memory.iter().find_map(|r| {
            let base = self.memory.get_host_address(r.start_addr()).ok()? as u64;
            (host >= base && host < base + r.len()).then(|| r.start_addr().0 + (host - base))
        })
    }

    /// Places one page of `data` at `gpa` and wakes its waiters; `false` if the page was
    /// already there (nothing changed).
    pub fn place(&self, gpa: u64, data: &[u8]) -> Result<bool, UffdError> {
        if data.len() as u64 != PAGE || !gpa.is_multiple_of(PAGE) {
            return Err(UffdError::Outside {
                gpa,
                len: data.len() as u64,
            });
        }
        let dst = self.host(gpa, PAGE)?;
        let mut c = UffdioCopy {
            dst,
            src: data.as_ptr() as u64,
            len: PAGE,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `PAGE` bytes from `data` (a live slice of that length) and
        // atomically fills the absent page at `dst`, inside a registered mapping that
        // `self.memory` keeps alive; it never overwrites a present page (EEXIST instead).
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
        self.placed(rc, "UFFDIO_COPY", gpa)
    }

    /// Places a zero page at `gpa` and wakes its waiters; `false` if it was already there.
    pub fn place_zero(&self, gpa: u64) -> Result<bool, UffdError> {
        let gpa = gpa & !(PAGE - 1);
        let start = self.host(gpa, PAGE)?;
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len: PAGE },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes `z` (on this frame) and maps the zero page
        // at an absent page inside a registered mapping kept alive by `self.memory`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) };
        self.placed(rc, "UFFDIO_ZEROPAGE", gpa)
    }

    fn placed(&self, rc: i32, what: &'static str, gpa: u64) -> Result<bool, UffdError> {
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            // Already present; a waiter queued in between still needs its wake-up.
            self.wake(gpa)?;
            return Ok(false);
        }
        Err(UffdError::Call { what, source: e })
    }

    /// Wakes whoever waits on the page at `gpa` (it is present).
    pub fn wake(&self, gpa: u64) -> Result<(), UffdError> {
        let start = self.host(gpa & !(PAGE - 1), PAGE)?;
        let mut r = UffdioRange { start, len: PAGE };
        // SAFETY: UFFDIO_WAKE reads the range (on this frame); it only wakes waiters.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut r) } != 0 {
            return Err(call("UFFDIO_WAKE"));
        }
        Ok(())
    }

    /// Keeps the userfaultfd open until the process exits, so that a guest stopped after a
    /// failed post-copy never sees a missing page as zeros (closing the descriptor would let
    /// every waiting access go on with an empty page).
    pub fn hold_until_exit(self) {
        std::mem::forget(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[
            (GuestAddress(0), 64 * 4096),
            (GuestAddress(0x100_0000), 16 * 4096),
        ])
        .unwrap()
    }

    fn uffd_available() -> bool {
        // SAFETY: geteuid has no arguments and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    /// A thread reading an owed page blocks until it is placed; a page never written becomes a
    /// zero page on demand; present pages outside `owed` keep their contents; placing twice is
    /// harmless.
    #[test]
    fn an_access_to_a_missing_page_waits_for_it_to_be_placed() {
        assert!(
            uffd_available(),
            "this test needs root (userfaultfd without UFFD_USER_MODE_ONLY)"
        );
        use vm_memory::Bytes;
        let mem = memory();
        mem.write_slice(&[7u8; 4096], GuestAddress(0)).unwrap();
        mem.write_slice(&[9u8; 4096], GuestAddress(4096)).unwrap();
        let pages = Arc::new(MissingPages::arm(&mem, &[(4096, 4096)]).unwrap());
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0)).unwrap(),
            7,
            "not owed: kept"
        );
        let m2 = mem.clone();
        let reader = std::thread::spawn(move || {
            let a = m2.read_obj::<u8>(GuestAddress(4096)).unwrap();
            let b = m2
                .read_obj::<u8>(GuestAddress(0x100_0000 + 5 * 4096))
                .unwrap();
            (a, b)
        });
        let f1 = loop {
            if let Some(f) = pages.next_fault(Duration::from_secs(5)).unwrap() {
                break f;
            }
        };
        assert_eq!(
            f1, 4096,
            "the owed page faults (its stale copy was dropped)"
        );
        assert!(!reader.is_finished());
        assert!(pages.place(4096, &[3u8; 4096]).unwrap());
        assert!(
            !pages.place(4096, &[4u8; 4096]).unwrap(),
            "second placement: EEXIST"
        );
        let f2 = pages.next_fault(Duration::from_secs(5)).unwrap();
        assert_eq!(f2, Some(0x100_0000 + 5 * 4096));
        assert!(pages.place_zero(f2.unwrap()).unwrap());
        assert_eq!(reader.join().unwrap(), (3, 0));
        assert!(
            pages.place(0x200_0000, &[0u8; 4096]).is_err(),
            "outside memory"
        );
    }
}

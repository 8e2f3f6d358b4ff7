//! The VM side of a migration: what the VMM implements so the transport can move a VM.

#![deny(clippy::disallowed_methods)]
use crate::config::VmConfigDescription;

/// Error type the VM side returns: any error, shown in the report's reason.
pub type VmError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A running VM that can be migrated away.
///
/// The migration calls these from one thread, in this order: `describe`, `start_dirty_log`,
/// (`read_pages`, `fetch_dirty`, `set_throttle`)*, `pause`, `fetch_dirty`, `read_pages`*,
/// `save_state`, `release_storage`, and on failure after the pause `acquire_storage` then
/// `resume` (not when the commit is in doubt: the source then stays paused as it is).
/// `stop_dirty_log` and `set_throttle(0)` end every migration, successful or not. The sender
/// machine ([`crate::machine::sender::Sender`]) decides when each storage hook is due.
pub trait MigrationSource {
    /// The VM's shape: memory layout, vCPUs, CPUID, devices.
    fn describe(&self) -> VmConfigDescription;

    /// Arms dirty tracking (KVM dirty log plus the VMM's own bitmap) and clears it: pages
    /// written from now on show up in `fetch_dirty`.
    fn start_dirty_log(&mut self) -> Result<(), VmError>;

    /// Disarms dirty tracking.
    fn stop_dirty_log(&mut self) -> Result<(), VmError>;

    /// Copies guest memory at `gpa` into `buf` (within one region of the layout).
    fn read_pages(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError>;

    /// Fetches and clears the dirty bitmap of region `region`: bit `i` of word `i / 64` is
    /// page `i` of the region. The result has `ceil(pages / 64)` words.
    fn fetch_dirty(&mut self, region: usize) -> Result<Vec<u64>, VmError>;

    /// Pages of region `region` known to be zero without reading them (e.g. never backed by
    /// host memory), bit `i` of word `i / 64` = page `i`; called once, after `start_dirty_log`,
    /// before round 0. `None` (the default): unknown, every page is read.
    fn known_zero(&mut self, region: usize) -> Option<Vec<u64>> {
        let _ = region;
        None
    }

    /// Holds the vCPUs for `pct` percent of the time (0 ≤ pct < 100, e.g. 99.9), in slices of
    /// at most 10 ms: `ThrottleSlice::for_pct(pct, 10 ms)` gives run and sleep per slice
    /// ([`crate::machine::policy::ThrottleSlice`]). 0 ends throttling.
    fn set_throttle(&mut self, pct: f64) -> Result<(), VmError>;

    /// Stops the vCPUs (and device activity that writes guest memory).
    fn pause(&mut self) -> Result<(), VmError>;

    /// Resumes the vCPUs after a failed migration.
    fn resume(&mut self) -> Result<(), VmError>;

    /// The VM's complete saved state (vCPUs, irqchips, clocks, devices) as versioned bytes.
    /// Called while paused. Returns the format version and the bytes.
    fn save_state(&mut self) -> Result<(u32, Vec<u8>), VmError>;

    /// Switch-over: hands the storage whose write ownership moves with the VM (e.g. disks
    /// under an exclusive write lease) to the target. Called once, paused, after `save_state`
    /// and before the state and commit frames go out; from here the source must not write it.
    /// An error fails the migration; what was already handed over stays so until
    /// `acquire_storage`. A VM with no such storage returns `Ok(())`.
    fn release_storage(&mut self) -> Result<(), VmError>;

    /// Takes back whatever `release_storage` handed over (nothing if it did not run or
    /// handed nothing). Called before `resume` on every failure after the pause (never in
    /// doubt); an error leaves the VM paused (its storage may be elsewhere) and is reported.
    fn acquire_storage(&mut self) -> Result<(), VmError>;

    /// Guest memory the data streams may send pages from in place, without copying them
    /// first ([`GuestPages`]): used on plain TCP links at protocol 5 or newer
    /// ([`crate::wire::PAGE_DATA_PROTOCOL_VERSION`]). Called once, after the handshake. The
    /// default: none (every page is copied with `read_pages`).
    fn guest_pages(&self) -> Option<std::sync::Arc<dyn GuestPages>> {
        None
    }

    /// Before a page at `gpa` is sent in place ([`MigrationSource::guest_pages`]): whatever
    /// `read_pages` does before its copy (e.g. re-arming the dirty log's write protection of
    /// the page's range, so that a write from here on shows up in `fetch_dirty`). The
    /// default: nothing.
    fn before_send_in_place(&mut self, gpa: u64) -> Result<(), VmError> {
        let _ = gpa;
        Ok(())
    }
}

/// The source's guest memory as the data streams send it in place: pages are classified zero
/// or data where they lie, checksummed, and written to the socket from there, so a page the
/// guest rewrites while its frame is queued goes out with whatever bytes it has when the kernel
/// copies them (the dirty log then has it for the next round, as for a copy taken earlier; the
/// target sees that its checksum differs and holds it suspect until then). Used from the
/// migration's thread; the memory must stay mapped as long as the handle lives.
pub trait GuestPages: Send + Sync {
    /// Reads the page at `gpa` (page-aligned, inside the layout) where it lies: `None` if it
    /// is all zeros, else the crc32c of its 4096 bytes as read.
    fn check(&self, gpa: u64) -> Result<Option<u32>, VmError>;

    /// Writes bytes `skip..` of `head` followed by the 4096 bytes of each page in `pages`
    /// (page-aligned guest addresses inside the layout) to `socket` (a connected, non-blocking
    /// TCP socket) with one `writev`, as far as the socket takes them without blocking. Returns
    /// the bytes written; a full socket is `WouldBlock`, as from `write`.
    fn write_frame(
        &self,
        socket: std::os::fd::BorrowedFd<'_>,
        head: &[u8],
        pages: &[u64],
        skip: usize,
    ) -> std::io::Result<usize>;
}

/// Makes the guest memory at `(gpa, len)` ready to be written (see
/// [`MigrationTarget::prefault`]); called from several threads at once.
pub type Prefault = std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Places received pages straight into the target's guest memory, from the data streams'
/// reader threads (see [`MigrationTarget::placer`]); used from several threads at once.
pub trait PagePlacer: Send + Sync {
    /// Writes every page of `batch` into guest memory, in the batch's order: a data page's
    /// bytes, or zeros for a zero page. The addresses were checked against the agreed layout.
    /// On an error some pages may have been written; the caller then writes the batch again
    /// with `write_page` / `zero_page`.
    fn place(&self, batch: &crate::wire::PageBatch) -> Result<(), VmError>;

    /// Whether [`PagePlacer::read_into`] is supported. The default: no.
    fn reads_in_place(&self) -> bool {
        false
    }

    /// Reads a `PageData` frame's data straight from `socket` (a connected, blocking TCP
    /// socket) into guest memory:
    /// the next `4096 * data.len()` bytes of the stream go to the pages at `data`, in order,
    /// then the pages at `zero` are zeroed. Then each data page's crc32c is taken from guest
    /// memory and compared with `crcs` (one per data page, in order): returns the addresses of
    /// the pages that differ (written all the same). The addresses were checked against the
    /// agreed layout. An error leaves the stream at an unknown position: the caller fails the
    /// stream. Called only when [`PagePlacer::reads_in_place`] says so; the default refuses.
    fn read_into(
        &self,
        socket: std::os::fd::BorrowedFd<'_>,
        data: &[u64],
        crcs: &[u32],
        zero: &[u64],
    ) -> std::io::Result<Vec<u64>> {
        let _ = (socket, data, crcs, zero);
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// A VM being built on the target from an incoming migration.
///
/// Its memory starts zeroed. The migration calls `prepare` first, then `write_page` /
/// `zero_page` many times (or the data streams' readers write the pages through `placer`),
/// then `read_pages` (with verify), `restore_state` and `resume`; or
/// `discard` at any point before `resume` succeeded.
pub trait MigrationTarget {
    /// Checks that this host can run the VM described (and builds it if it builds on demand).
    /// The error is sent to the source as the refusal reason.
    fn prepare(&mut self, config: &VmConfigDescription) -> Result<(), String>;

    /// Writes one page at `gpa` (checked against the agreed layout already).
    fn write_page(&mut self, gpa: u64, data: &[u8]) -> Result<(), VmError>;

    /// Zeroes one page at `gpa`.
    fn zero_page(&mut self, gpa: u64) -> Result<(), VmError>;

    /// Copies guest memory at `gpa` into `buf`, for the memory verification.
    fn read_pages(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError>;

    /// Restores the saved state (version and bytes from the source's `save_state`).
    fn restore_state(&mut self, version: u32, bytes: &[u8]) -> Result<(), VmError>;

    /// Starts the vCPUs. After success the VM runs here.
    fn resume(&mut self) -> Result<(), VmError>;

    /// Drops everything received; the VM never ran here.
    fn discard(&mut self);

    /// After `prepare`: a function the data streams' reader threads call with each received
    /// run of pages `(gpa, len)` (checked against the layout, data to come by `placer` or
    /// `write_page`) before they write or hand the frame on, so that the memory is ready when
    /// the pages are written (the target's first touch of its memory, page faults, happens on
    /// the readers, one call per run). Best effort: it reports nothing and must leave the
    /// memory's contents alone. The default: none.
    fn prefault(&mut self) -> Option<Prefault> {
        None
    }

    /// After `prepare`: a handle with which the data streams' reader threads write each
    /// checked page frame into guest memory themselves, in parallel, instead of handing its
    /// pages to `write_page` / `zero_page` on the receiving thread. Used only before `resume`
    /// and never after post-copy armed the memory: every data stream has ended by then. The
    /// readers keep it (and what it holds, e.g. the memory's mapping) until they end, which
    /// may be after `discard`; what they write then is not read by anyone. The default: none
    /// (every page goes through `write_page` / `zero_page`).
    fn placer(&mut self) -> Option<std::sync::Arc<dyn PagePlacer>> {
        None
    }

    // ── post-copy (docs/migration.md, "Post-copy") ──

    /// Post-copy, after `restore_state` and before `resume`: drops the `owed` guest ranges
    /// `(gpa, len)` and makes every absent page of guest memory (owed, or never written) wait
    /// for the returned handle instead of reading as zeros. The default: not supported.
    fn post_copy_memory(
        &mut self,
        owed: &[(u64, u64)],
    ) -> Result<std::sync::Arc<dyn MissingMemory>, VmError> {
        let _ = owed;
        Err("this VMM does not support post-copy".into())
    }

    /// Post-copy failed after `resume`: stops the guest, which cannot go on without the pages
    /// it lacks, and keeps every absent page waiting (never zero-filled) until the process
    /// ends. The default: nothing (a target without `post_copy_memory` never gets here).
    fn stop_post_copy_guest(&mut self) {}
}

/// Guest memory of a target during post-copy: owed pages are absent until placed, and an
/// access to one waits (a fault event). Used from several threads at once.
pub trait MissingMemory: Send + Sync {
    /// Waits up to `timeout` for the next fault; the faulting page's guest address.
    fn next_fault(&self, timeout: std::time::Duration) -> Result<Option<u64>, VmError>;

    /// Places one page of data at `gpa` and wakes its waiters; `false` if it was present.
    fn place(&self, gpa: u64, data: &[u8]) -> Result<bool, VmError>;

    /// Places a zero page at `gpa` and wakes its waiters; `false` if it was present.
    fn place_zero(&self, gpa: u64) -> Result<bool, VmError>;
}

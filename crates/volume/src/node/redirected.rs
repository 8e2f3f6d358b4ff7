//! The coordinator's end of the redirected data path: the export `NAME@NODE.EPOCH` a node writes
//! through when it has no direct path, each request fenced by the lease table under the
//! coordinator lock. The LUN I/O itself runs outside the lock, registered as in flight
//! ([`InFlight`]), and every change that ends a writer's right or frees extents waits, under the
//! lock, for the writes in flight to end.

use std::sync::{Arc, Condvar, Mutex};

use tern_nbd::proto::StatusExtent;
use tern_nbd::server::ZeroFlags;
use tern_nbd::{Backend, Errno, Relay};

use crate::format::{EXTENT_SIZE, NodeId};
use crate::lun::Lun;
use crate::namespace::{self, NamespaceError};
use crate::store::{Segment, segments};

use super::data::{map_status, write_zero_buffers};
use super::{Node, lock};

/// The redirected writes past their check that are still writing to the LUN, kept outside the
/// coordinator mutex. A write registers under the coordinator lock, after its check and its
/// extent mapping, and ends (the [`InFlightWrite`] guard is dropped) once its LUN I/O returns;
/// [`InFlight::wait_idle`], called under the coordinator lock so no write can register meanwhile,
/// returns once none is left.
#[derive(Default)]
pub(super) struct InFlight {
    pub(super) count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    /// Registers one write; call it with the coordinator lock held.
    pub(super) fn register(&self) -> InFlightWrite<'_> {
        *lock(&self.count) += 1;
        InFlightWrite { of: self }
    }

    /// Waits until no registered write is left. Call it with the coordinator lock held (writes
    /// in flight never take that lock, so they can always end).
    pub(super) fn wait_idle(&self) {
        let mut n = lock(&self.count);
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// One registered redirected write: ends on drop (also on an error or a panic).
pub(super) struct InFlightWrite<'a> {
    of: &'a InFlight,
}

impl Drop for InFlightWrite<'_> {
    fn drop(&mut self) {
        let mut n = lock(&self.of.count);
        *n -= 1;
        if *n == 0 {
            self.of.idle.notify_all();
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Test seam: run on this thread by a redirected write or zeroing once it is registered in
    /// flight and the coordinator lock is released, right before its LUN I/O.
    pub(super) static BEFORE_LUN_WRITE: std::cell::RefCell<Option<Box<dyn FnMut()>>> =
        const { std::cell::RefCell::new(None) };
}

fn before_lun_write() {
    #[cfg(test)]
    BEFORE_LUN_WRITE.with(|h| {
        if let Some(f) = h.borrow_mut().as_mut() {
            f();
        }
    });
}

impl Node {
    /// Redirected write at the coordinator: checked against the lease table and mapped (holes
    /// allocated) under the coordinator lock, then registered in flight and written without it.
    pub(super) fn redirected_write(
        &self,
        name: &str,
        node: NodeId,
        epoch: u64,
        data: &[u8],
        offset: u64,
        fua: bool,
    ) -> Result<(), Errno> {
        let mut g = self.coordinator().map_err(|_| Errno::Shutdown)?;
        let c = g.as_mut().ok_or(Errno::Shutdown)?;
        let now = self.now_ms();
        c.leases
            .check_write(name, node, epoch, now)
            .map_err(|_| Errno::Perm)?;
        let f = c.volume.meta.files.get(name).ok_or(Errno::Io)?;
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > f.size)
        {
            return Err(Errno::NoSpc);
        }
        let mut segs = segments(&self.sb, &f.map, offset, data.len());
        if segs.iter().any(|s| matches!(s, Segment::Hole { .. })) {
            for s in &segs {
                if let Segment::Hole { logical, .. } = s {
                    let view = super::coordinator::reserved_view(&c.volume.meta, &c.zeroing);
                    let ch = namespace::allocate(&view, self.sb.extent_count, name, *logical)
                        .map_err(|e| {
                            if matches!(e, NamespaceError::NoSpace { .. }) {
                                Errno::NoSpc
                            } else {
                                Errno::Io
                            }
                        })?;
                    let ch = super::coordinator::without_reserved(ch);
                    self.commit_change(c, ch).map_err(|_| Errno::Io)?;
                }
            }
            let f = c.volume.meta.files.get(name).ok_or(Errno::Io)?;
            segs = segments(&self.sb, &f.map, offset, data.len());
        }
        // Registered only after the allocation (whose commit may wait for the writes in flight).
        let _in_flight = self.redirected_in_flight.register();
        drop(g);
        before_lun_write();
        let mut done = 0;
        for s in segs {
            if let Segment::Mapped { lun_offset, len } = s {
                self.lun
                    .write_at(&data[done..done + len], lun_offset)
                    .map_err(|_| Errno::Io)?;
                done += len;
            } else {
                return Err(Errno::Io);
            }
        }
        if fua {
            self.lun.flush().map_err(|_| Errno::Io)?;
        }
        Ok(())
    }

    /// Zero `len` bytes at `offset` of `name` for the writer (`node`, `epoch`), fenced like a
    /// write: whole extents of a thin file go back to the volume (one metadata commit), the
    /// mapped parts of partial ones are overwritten with zeroes, holes stay holes.
    pub(super) fn redirected_zero(
        &self,
        name: &str,
        node: NodeId,
        epoch: u64,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), Errno> {
        let mut g = self.coordinator().map_err(|_| Errno::Shutdown)?;
        let c = g.as_mut().ok_or(Errno::Shutdown)?;
        let now = self.now_ms();
        c.leases
            .check_write(name, node, epoch, now)
            .map_err(|_| Errno::Perm)?;
        let f = c.volume.meta.files.get(name).ok_or(Errno::Io)?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= f.size)
            .ok_or(Errno::NoSpc)?;
        // Whole extents inside the range; the file's last extent counts as whole when the
        // range reaches the end of the file.
        let first = offset.div_ceil(EXTENT_SIZE);
        let last = if end == f.size {
            end.div_ceil(EXTENT_SIZE)
        } else {
            end / EXTENT_SIZE
        };
        if first < last {
            let ch = namespace::deallocate(&c.volume.meta, name, first, last - first)
                .map_err(|_| Errno::Io)?;
            if ch.next.seq != c.volume.meta.seq {
                self.commit_change(c, ch).map_err(|_| Errno::Io)?;
            }
        }
        let f = c.volume.meta.files.get(name).ok_or(Errno::Io)?;
        // The mapped parts left (at most the partial extents at either end), one extent per
        // step so each `len` fits a usize on any target.
        let mut mapped = Vec::new();
        let mut pos = offset;
        while pos < end {
            let step = (end - pos).min(EXTENT_SIZE - pos % EXTENT_SIZE) as usize;
            for s in segments(&self.sb, &f.map, pos, step) {
                if let Segment::Mapped { lun_offset, len } = s {
                    mapped.push((lun_offset, len));
                }
            }
            pos += step as u64;
        }
        // Registered only after the deallocation (whose commit waits for the writes in flight).
        let _in_flight = self.redirected_in_flight.register();
        drop(g);
        before_lun_write();
        let zeroes = vec![0u8; EXTENT_SIZE as usize];
        for (lun_offset, len) in mapped {
            self.lun
                .write_at(&zeroes[..len], lun_offset)
                .map_err(|_| Errno::Io)?;
        }
        if fua {
            self.lun.flush().map_err(|_| Errno::Io)?;
        }
        Ok(())
    }

    pub(super) fn redirected_read(
        &self,
        name: &str,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), Errno> {
        // Only the request's segments are taken under the lock (not a copy of the whole map).
        let segs = {
            let g = self.coordinator().map_err(|_| Errno::Shutdown)?;
            let c = g.as_ref().ok_or(Errno::Shutdown)?;
            let f = c.volume.meta.files.get(name).ok_or(Errno::Io)?;
            segments(&self.sb, &f.map, offset, buf.len())
        };
        let mut done = 0;
        for s in segs {
            match s {
                Segment::Mapped { lun_offset, len } => {
                    self.lun
                        .read_at(&mut buf[done..done + len], lun_offset)
                        .map_err(|_| Errno::Io)?;
                    done += len;
                }
                Segment::Hole { len, .. } => {
                    buf[done..done + len].fill(0);
                    done += len;
                }
            }
        }
        Ok(())
    }
}

/// The coordinator's side of a redirected export `NAME@NODE.EPOCH`.
pub(super) struct RedirectTarget {
    pub(super) node: Arc<Node>,
    pub(super) name: String,
    pub(super) writer: NodeId,
    pub(super) epoch: u64,
    pub(super) size: u64,
}

impl Backend for RedirectTarget {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.node.redirected_read(&self.name, buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), Errno> {
        self.node
            .redirected_write(&self.name, self.writer, self.epoch, data, offset, fua)
    }
    fn flush(&self) -> Result<(), Errno> {
        drop(self.node.coordinator().map_err(|_| Errno::Shutdown)?);
        self.node.lun.flush().map_err(|_| Errno::Io)
    }
    fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), Errno> {
        if flags.no_hole {
            if flags.fast {
                return Err(Errno::NotSup);
            }
            return write_zero_buffers(self, offset, len, flags.fua);
        }
        let len = u64::from(len);
        let n = &self.node;
        n.redirected_zero(&self.name, self.writer, self.epoch, offset, len, flags.fua)
    }
    fn trim(&self, offset: u64, len: u32) -> Result<(), Errno> {
        let len = u64::from(len);
        let n = &self.node;
        n.redirected_zero(&self.name, self.writer, self.epoch, offset, len, false)
    }
    fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, Errno> {
        let g = self.node.coordinator().map_err(|_| Errno::Shutdown)?;
        let c = g.as_ref().ok_or(Errno::Shutdown)?;
        let f = c.volume.meta.files.get(&self.name).ok_or(Errno::Io)?;
        Ok(map_status(&self.node.sb, &f.map, offset, len))
    }
    /// Reads and writes run on the connection's I/O threads, many at once
    /// ([`super::redirected_io`]).
    fn relay(self: Arc<Self>) -> Option<Box<dyn Relay>> {
        Some(Box::new(super::redirected_io::RedirectIo::new(self)))
    }
}

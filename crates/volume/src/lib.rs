//! The cluster shared volume: one LUN opened by every host at once.
//!
//! * [`format`]: the on-disk format (superblock, two copy-on-write metadata slots, data extents).
//! * [`store`]: format/open/commit on a [`lun::Lun`], recovery of the newest valid metadata, and
//!   mapping of file ranges to LUN segments.
//! * [`namespace`]: pure create/delete/resize/allocate over a metadata state.
//! * [`lun`]: positional I/O on the LUN, with a fault-injecting wrapper for crash tests.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod codec;
pub mod control;
pub mod format;
pub mod lease;
pub mod lun;
pub mod namespace;
pub mod node;
pub mod store;

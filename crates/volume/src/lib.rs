//! The cluster shared volume: one LUN opened by every host at once.
//!
//! Pure cores (no I/O, no clocks):
//! * [`mod@format`]: the on-disk format (superblock, two copy-on-write metadata slots, data extents).
//! * [`namespace`]: create/delete/resize/allocate over a metadata state.
//! * [`lease`]: the write-lease state machine with fencing epochs and named-successor hand-over.
//! * [`control`]: the JSON control messages.
//!
//! Shells:
//! * [`control_conn`]: kept-alive control connections, one pool per process.
//! * [`lun`]: positional I/O on the LUN, with a fault-injecting wrapper (crash at step N, torn
//!   writes, path loss, volatile cache).
//! * [`store`]: format/open/commit on a [`lun::Lun`], recovery of the newest valid metadata, and
//!   mapping of file ranges to LUN segments.
//! * [`node`]: one host's service: NBD exports, control requests, the coordinator role, direct and
//!   redirected data paths.
//! * [`client`]: a volume file as a VM's disk (`volume://NODE_ADDR/FILE`): write lease, data
//!   through the host's node, the migration hand-over hooks.
//! * [`cluster`]: the etcd election, membership and the node's periodic duties (`tern volume serve`).
//!
//! ```text
//!  tern volume CLI ──control (NBD private option)──▶ any node ──forward──▶ coordinator (etcd-elected)
//!  NBD client (qemu, VMM) ──NBD──▶ node ── pread/pwrite ──▶ LUN ◀── metadata commits ── coordinator
//!                                    └──── NBD "FILE@NODE.EPOCH" (redirected) ────▶ coordinator
//! ```

#![forbid(unsafe_code)]

pub mod client;
pub mod cluster;
pub mod codec;
pub mod control;
pub mod control_conn;
pub mod format;
pub mod lease;
pub mod lun;
pub mod namespace;
pub mod node;
pub mod store;

//! The I/O shells: TCP streams, threads, the clock, progress callbacks and cancel. They decide
//! nothing themselves: they read frames and VM calls into events for the machines in
//! [`crate::machine`] and carry out what those answer.
//!
//! [`send`] drives the source, [`recv`] the target; [`common`] holds what both use. Neither
//! shell imports the other.

pub mod common;
pub mod postcopy;
pub mod recv;
pub mod send;
pub mod transport;

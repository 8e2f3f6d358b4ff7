//! The pure core: every decision of a migration, with time passed in. Nothing here reads a
//! clock, opens a socket or a file, or starts a thread; the TCP shells in [`crate::tcp`] do the
//! I/O and feed these machines events.
//!
//! | module | decides |
//! |---|---|
//! | [`sender`] | the source's phases, what a target's answer means, what a failure does to the source VM, the outcome and the report |
//! | [`receiver`] | the target's phases: which frame it accepts when, when a commit may proceed |
//! | [`policy`] | bandwidth estimate, switch-over rule, throttle schedule, timeout, token bucket |
//! | [`postcopy`] | post-copy: when to switch, which pages are owed, what a fault asks for, what the source sends next, when it is over, what a failure does |
//! | [`pages`] | which pages go in a round, which stream carries a page, which zero pages are skipped |
//! | [`predict`] | a migration's cost before it starts (time, bytes, rounds, pause, convergence), by running [`sender`] against a modelled guest and link |

#![deny(clippy::disallowed_methods)]
pub mod pages;
pub mod policy;
pub mod postcopy;
pub mod predict;
pub mod receiver;
pub mod sender;

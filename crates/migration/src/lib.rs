//! Live migration: versioned checksummed wire frames, sender and receiver state machines, convergence policy, TCP transport

#![forbid(unsafe_code)]

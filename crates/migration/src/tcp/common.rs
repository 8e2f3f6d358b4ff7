//! What both TCP shells use: the operator's cancel switch and the one-line error text sent as a
//! reason on the wire.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A cancel switch shared between the operator (another thread, a signal handler) and the
/// migration. Cancelling after commit was sent has no effect.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A fresh, not cancelled token.
    pub fn new() -> Self {
        Self::default()
    }
    /// Requests cancellation.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// An error and its causes on one line: "A: B: C".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

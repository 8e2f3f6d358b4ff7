//! A hook that every migration stream thread runs first: the VMM installs its seccomp filter for
//! migration threads there (`tern_vmm::seccomp`). Without a hook set, nothing runs.

use std::sync::OnceLock;

static HOOK: OnceLock<fn()> = OnceLock::new();

/// Sets the hook for this process; false when one was already set (the first stays).
pub fn set_hook(hook: fn()) -> bool {
    HOOK.set(hook).is_ok()
}

/// Runs the hook, if one is set (called at the top of each migration thread).
pub fn run() {
    if let Some(hook) = HOOK.get() {
        hook();
    }
}

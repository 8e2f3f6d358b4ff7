//! Termination signals (SIGINT, SIGTERM, SIGHUP) turned into a clean VM stop, so that the runtime
//! entry and the API socket are removed when a VMM is told to quit.

use crate::vm::Vm;

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the local set; the signal numbers are valid.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks the termination signals in the calling thread and the threads it starts afterwards.
/// Call before [`Vm::create`], then [`stop_on_termination`].
pub fn block_termination_signals() -> std::io::Result<()> {
    let set = termination_set();
    // SAFETY: `set` is an initialised signal set; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Starts a thread that waits for a termination signal and asks `vm` to stop.
pub fn stop_on_termination(vm: Vm) -> std::io::Result<()> {
    on_termination(move || vm.request_stop())
}

/// Starts a thread that waits for a termination signal (blocked beforehand with
/// [`block_termination_signals`]) and then calls `f`.
pub fn on_termination(f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = termination_set();
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is initialised and blocked in this thread (inherited), `sig` is a
            // valid out-pointer.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc == 0 {
                f();
            }
        })
        .map(|_| ())
}

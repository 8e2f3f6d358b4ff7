//! The one-request operations: [`request`] (any request, a refusal as an error), [`status`],
//! [`pause`], [`resume`], [`dirty_rate`], and [`stop`], which asks for a shutdown and kills the
//! VMM if it does not go.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tern_api::vmm::{DirtyRate, Request, Response, RuntimeEntry, VmStatus};

use crate::client::{CallError, call, call_timeout};
use crate::runtime::is_live;

/// Why a one-request operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The VMM could not be asked.
    #[error(transparent)]
    Call(#[from] CallError),
    /// The VMM refused.
    #[error("the VM refused: {0}")]
    Refused(String),
    /// The answer lacks what the request asks for.
    #[error("bad response from the VMM: {0}")]
    BadAnswer(&'static str),
}

/// Sends `req` to the VM at `sock` and returns its answer, a refusal being
/// [`ControlError::Refused`] with the VMM's reason.
pub fn request(sock: &Path, req: &Request) -> Result<Response, ControlError> {
    refused_is_error(call(sock, req)?)
}

fn refused_is_error(resp: Response) -> Result<Response, ControlError> {
    if resp.ok {
        Ok(resp)
    } else {
        Err(ControlError::Refused(
            resp.error.unwrap_or_else(|| "no reason given".into()),
        ))
    }
}

/// The VM's status, waiting at most `timeout` for it.
pub fn status(sock: &Path, timeout: Duration) -> Result<VmStatus, ControlError> {
    refused_is_error(call_timeout(sock, &Request::Status, timeout)?)?
        .status
        .ok_or(ControlError::BadAnswer(
            "a status answer without the status",
        ))
}

/// Parks every vCPU (returns once all are parked).
pub fn pause(sock: &Path) -> Result<(), ControlError> {
    request(sock, &Request::Pause).map(drop)
}

/// Continues a paused VM.
pub fn resume(sock: &Path) -> Result<(), ControlError> {
    request(sock, &Request::Resume).map(drop)
}

/// Samples the guest's dirty-page rate: the VMM turns dirty logging on for `window` (10 ms to
/// 10 s), counts the pages, and turns it off. Refused while a migration runs (it owns dirty
/// logging); the guest pays one write-protection fault per page it dirties in the window.
pub fn dirty_rate(sock: &Path, window: Duration) -> Result<DirtyRate, ControlError> {
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let req = Request::DirtyRate { window_ms };
    refused_is_error(call_timeout(sock, &req, window + Duration::from_secs(5))?)?
        .dirty_rate
        .ok_or(ControlError::BadAnswer(
            "a dirty_rate answer without the sample",
        ))
}

/// How [`stop`] ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It stopped on the `shutdown` request.
    Shutdown,
    /// It did not stop within the grace period (or could not be asked) and was killed.
    Killed,
    /// Its process was gone already.
    WasGone,
}

/// Why [`stop`] could not stop the VM.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// The VMM's process could not be signalled.
    #[error("cannot kill VM {name:?}'s VMM (pid {pid})")]
    Kill {
        /// The VM.
        name: String,
        /// Its VMM.
        pid: u32,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The process outlived SIGKILL by a second.
    #[error("VM {name:?}'s VMM (pid {pid}) still runs a second after SIGKILL")]
    StillRunning {
        /// The VM.
        name: String,
        /// Its VMM.
        pid: u32,
    },
}

/// Stops the VM of `entry`: asks its VMM to shut down (when it has a socket) and waits up to
/// `grace` for the process to end; kills it with SIGKILL if it is still there. The entry's PID is
/// signalled only while it is still the process that wrote the entry (start time checked).
pub fn stop(entry: &RuntimeEntry, grace: Duration) -> Result<Stopped, StopError> {
    if !is_live(entry) {
        return Ok(Stopped::WasGone);
    }
    if let Some(sock) = &entry.api_sock
        && call_timeout(sock, &Request::Shutdown, grace).is_ok_and(|r| r.ok)
        && gone_within(entry, grace)
    {
        return Ok(Stopped::Shutdown);
    }
    if !is_live(entry) {
        return Ok(Stopped::Shutdown);
    }
    let pid = i32::try_from(entry.pid).map_err(|_| StopError::Kill {
        name: entry.name.clone(),
        pid: entry.pid,
        source: nix::Error::ESRCH,
    })?;
    match kill(Pid::from_raw(pid), Signal::SIGKILL) {
        Ok(()) => {}
        Err(nix::Error::ESRCH) => return Ok(Stopped::Shutdown),
        Err(source) => {
            return Err(StopError::Kill {
                name: entry.name.clone(),
                pid: entry.pid,
                source,
            });
        }
    }
    if gone_within(entry, Duration::from_secs(1)) {
        Ok(Stopped::Killed)
    } else {
        Err(StopError::StillRunning {
            name: entry.name.clone(),
            pid: entry.pid,
        })
    }
}

/// Whether the entry's process ends within `d` (a zombie not yet reaped by its parent counts
/// as ended: it runs nothing).
fn gone_within(entry: &RuntimeEntry, d: Duration) -> bool {
    let until = Instant::now() + d;
    loop {
        if !is_live(entry) || is_zombie(entry.pid) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::tests::fake_vmm;
    use crate::runtime::process_start_ticks;

    #[test]
    fn a_refusal_is_an_error_with_the_vmms_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, _h) = fake_vmm(
            dir.path(),
            vec![r#"{"ok":false,"error":"the VM is not paused"}"#.into()],
        );
        let e = resume(&sock).unwrap_err();
        assert_eq!(e.to_string(), "the VM refused: the VM is not paused");
        let (sock, _h) = fake_vmm(dir.path(), vec![r#"{"ok":true}"#.into(), String::new()]);
        let e = status(&sock, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, ControlError::BadAnswer(_)), "{e}");
    }

    #[test]
    fn a_dirty_rate_sample_asks_for_its_window_and_decodes_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, h) = fake_vmm(
            dir.path(),
            vec![r#"{"ok":true,"dirty_rate":{"pages_per_s":5000,"window_ms":251,"pages":1255,"cost_us":90}}"#.into()],
        );
        let d = dirty_rate(&sock, Duration::from_millis(250)).unwrap();
        assert_eq!((d.pages_per_s, d.pages, d.window_ms), (5000, 1255, 251));
        assert_eq!(
            h.join().unwrap(),
            "{\"op\":\"dirty_rate\",\"window_ms\":250}\n"
        );
        let (sock, _h) = fake_vmm(
            dir.path(),
            vec![
                r#"{"ok":false,"error":"dirty logging is in use by a migration under way"}"#.into(),
                String::new(),
            ],
        );
        let e = dirty_rate(&sock, Duration::from_millis(250)).unwrap_err();
        assert!(
            matches!(e, ControlError::Refused(ref r) if r.contains("migration")),
            "{e}"
        );
    }

    fn sleeper() -> (std::process::Child, RuntimeEntry) {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep(1) runs");
        let pid = child.id();
        let entry = RuntimeEntry {
            pid_start_ticks: process_start_ticks(pid),
            ..RuntimeEntry::new("sleeper", pid, vec![])
        };
        (child, entry)
    }

    #[test]
    fn a_vmm_without_a_socket_is_killed() {
        let (mut child, entry) = sleeper();
        assert_eq!(
            stop(&entry, Duration::from_millis(50)).unwrap(),
            Stopped::Killed
        );
        let st = child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
        assert_eq!(
            stop(&entry, Duration::from_millis(50)).unwrap(),
            Stopped::WasGone
        );
    }

    #[test]
    fn a_vmm_that_accepts_shutdown_but_stays_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, h) = fake_vmm(dir.path(), vec![r#"{"ok":true}"#.into()]);
        let (mut child, mut entry) = sleeper();
        entry.api_sock = Some(sock);
        let t = Instant::now();
        assert_eq!(
            stop(&entry, Duration::from_millis(200)).unwrap(),
            Stopped::Killed
        );
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert_eq!(h.join().unwrap(), "{\"op\":\"shutdown\"}\n");
        child.wait().unwrap();
    }

    #[test]
    fn a_pid_reused_by_another_process_is_not_signalled() {
        let (mut child, mut entry) = sleeper();
        entry.pid_start_ticks = entry.pid_start_ticks.map(|t| t + 1);
        assert_eq!(
            stop(&entry, Duration::from_millis(50)).unwrap(),
            Stopped::WasGone
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the other process runs on"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

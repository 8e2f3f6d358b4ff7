//! The control-socket client: one request line out, answer lines back (docs/api.md).
//!
//! [`call`] and [`call_timeout`] wait for the one answer; [`call_streaming`] hands each progress
//! line of a `migrate` to a callback and returns the final answer. Answers are bounded (1 MiB a
//! line) and decoded into `tern-api`'s [`Response`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tern_api::vmm::{Progress, Request, Response};

/// The longest answer line read.
const MAX_ANSWER_BYTES: u64 = 1 << 20;

/// How long [`call`] waits for an answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The socket could not be reached.
    #[error("cannot connect to {path} (is the VM running with --api-sock {path}?)")]
    Connect {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket or its directory is not this user's (a control socket is 0600 in a 0700
    /// directory of the VMM's user).
    #[error(
        "permission denied on {path}: the socket and its directory are the VMM owner's only (run as that user or root)"
    )]
    Denied {
        /// The path.
        path: String,
    },
    /// The exchange failed.
    #[error("API exchange failed: {0}")]
    Io(#[from] std::io::Error),
    /// The answer was not a response.
    #[error("bad response from the VMM: {0}")]
    BadResponse(String),
}

/// Sends one request and reads its response (waiting at most 30 s for it).
pub fn call(path: &Path, req: &Request) -> Result<Response, CallError> {
    call_timeout(path, req, DEFAULT_TIMEOUT)
}

fn send(path: &Path, req: &Request) -> Result<UnixStream, CallError> {
    let mut conn = UnixStream::connect(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            CallError::Denied {
                path: path.display().to_string(),
            }
        } else {
            CallError::Connect {
                path: path.display().to_string(),
                source,
            }
        }
    })?;
    let mut line = serde_json::to_string(req).map_err(|e| CallError::BadResponse(e.to_string()))?;
    line.push('\n');
    match conn.write_all(line.as_bytes()) {
        // The VMM closed first (a refused peer): its answer, if any, says why.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(conn),
        Err(e) => Err(e.into()),
        Ok(()) => Ok(conn),
    }
}

fn read_answer(reader: &mut impl BufRead) -> Result<Response, CallError> {
    let mut answer = String::new();
    if reader.take(MAX_ANSWER_BYTES).read_line(&mut answer)? == 0 {
        return Err(CallError::BadResponse(
            "the VMM closed the connection without an answer".into(),
        ));
    }
    serde_json::from_str(&answer).map_err(|e| CallError::BadResponse(format!("{e}: {answer:?}")))
}

/// Sends one request and reads its response, waiting at most `timeout` for it.
pub fn call_timeout(path: &Path, req: &Request, timeout: Duration) -> Result<Response, CallError> {
    let conn = send(path, req)?;
    conn.set_read_timeout(Some(timeout))?;
    read_answer(&mut BufReader::new(conn))
}

/// Sends one request and reads answer lines until the final one (a line without `progress`),
/// giving each progress line to `on_progress`. For `migrate`; no read timeout.
pub fn call_streaming(
    path: &Path,
    req: &Request,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<Response, CallError> {
    let mut reader = BufReader::new(send(path, req)?);
    loop {
        let r = read_answer(&mut reader)?;
        match &r.progress {
            Some(p) => on_progress(p),
            None => return Ok(r),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    /// A one-connection fake VMM: records the request line, answers with `lines`.
    pub(crate) fn fake_vmm(
        dir: &Path,
        lines: Vec<String>,
    ) -> (PathBuf, std::thread::JoinHandle<String>) {
        let sock = dir.join(format!("fake-{}.sock", lines.len()));
        let listener = UnixListener::bind(&sock).unwrap();
        let h = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut out = conn.try_clone().unwrap();
            let mut req = String::new();
            BufReader::new(conn).read_line(&mut req).unwrap();
            for l in lines {
                out.write_all(l.as_bytes()).unwrap();
                out.write_all(b"\n").unwrap();
            }
            req
        });
        (sock, h)
    }

    #[test]
    fn a_call_sends_one_line_and_decodes_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, h) = fake_vmm(dir.path(), vec![r#"{"ok":false,"error":"nope"}"#.into()]);
        let r = call(&sock, &Request::Resume).unwrap();
        assert_eq!(r, Response::error("nope"));
        assert_eq!(h.join().unwrap(), "{\"op\":\"resume\"}\n");
    }

    #[test]
    fn progress_lines_go_to_the_callback_and_the_last_line_is_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let p = |round: u32| {
            format!(
                r#"{{"ok":true,"progress":{{"phase":"pre_copy","round":{round},"bytes_sent":1,"bytes_remaining":2,"dirty_bytes_per_sec":0.0,"bandwidth_bytes_per_sec":0.0,"expected_downtime_ms":null,"throttle_pct":0.0,"elapsed_ms":5}}}}"#
            )
        };
        let (sock, _h) = fake_vmm(dir.path(), vec![p(0), p(1), r#"{"ok":true}"#.into()]);
        let mut rounds = Vec::new();
        let r = call_streaming(&sock, &Request::Status, &mut |p| rounds.push(p.round)).unwrap();
        assert_eq!(rounds, [0, 1]);
        assert_eq!(r, Response::ok());
    }

    #[test]
    fn failures_name_what_went_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let e = call(&dir.path().join("none.sock"), &Request::Status).unwrap_err();
        assert!(matches!(e, CallError::Connect { .. }), "{e}");
        assert!(e.to_string().contains("none.sock"), "{e}");
        let (sock, _h) = fake_vmm(dir.path(), vec!["hello".into()]);
        let e = call(&sock, &Request::Status).unwrap_err();
        assert!(
            e.to_string().starts_with("bad response from the VMM"),
            "{e}"
        );
        let (sock, _h) = fake_vmm(dir.path(), vec![]);
        let e = call_streaming(&sock, &Request::Status, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("without an answer"), "{e}");
    }

    #[test]
    fn a_silent_vmm_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("silent.sock");
        let _listener = UnixListener::bind(&sock).unwrap();
        let t = std::time::Instant::now();
        let e = call_timeout(&sock, &Request::Status, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, CallError::Io(_)), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}

//! The control API: newline-delimited JSON over a unix stream socket (see docs/api.md).
//!
//! One request per line, one response line per request:
//! `{"op":"status"}` → `{"ok":true,"status":{…}}`; `{"op":"pause"}`, `{"op":"resume"}`,
//! `{"op":"shutdown"}` → `{"ok":true}`; any failure → `{"ok":false,"error":"…"}`.
//! [`parse_request`] is pure and bounded (a line longer than [`MAX_REQUEST_BYTES`] is refused).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::vm::{Vm, VmStatus};

/// The longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// A control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Report the VM's status.
    Status,
    /// Park every vCPU.
    Pause,
    /// Continue every parked vCPU.
    Resume,
    /// Stop the VM; the VMM process exits with status 0.
    Shutdown,
    /// Announce the NICs on the network now (RARP / gratuitous ARP on the announce schedule),
    /// as the resume after a restore does.
    Announce,
}

/// A response.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The status, for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VmStatus>,
}

impl Response {
    fn ok() -> Self {
        Response {
            ok: true,
            error: None,
            status: None,
        }
    }
    fn err(e: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            status: None,
        }
    }
}

/// Why a request line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseRequestError {
    /// Longer than [`MAX_REQUEST_BYTES`].
    #[error("request longer than {MAX_REQUEST_BYTES} bytes")]
    TooLong,
    /// Not JSON, or not one of the requests.
    #[error(
        "bad request: {0} (send one of {{\"op\":\"status\"|\"pause\"|\"resume\"|\"shutdown\"}})"
    )]
    Bad(String),
}

/// Parses one request line.
pub fn parse_request(line: &str) -> Result<Request, ParseRequestError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(ParseRequestError::TooLong);
    }
    serde_json::from_str(line.trim()).map_err(|e| ParseRequestError::Bad(e.to_string()))
}

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeApiError {
    /// The socket could not be bound.
    #[error("cannot listen on API socket {path} (give a writable path that no running VM uses)")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A bound API socket; the socket file is removed when this is dropped.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket nobody serves) and serves `vm` on a thread.
    pub fn start(path: &Path, vm: Vm) -> Result<ApiServer, ServeApiError> {
        let bind_err = |source| ServeApiError::Bind {
            path: path.to_path_buf(),
            source,
        };
        if path.exists() && UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let vm = vm.clone();
                    // One thread per client; clients are few (the CLI, an agent).
                    let _ = std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || serve_connection(conn, &vm));
                }
            })
            .map_err(bind_err)?;
        Ok(ApiServer {
            path: path.to_path_buf(),
        })
    }
}

fn serve_connection(conn: UnixStream, vm: &Vm) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn.take(u64::MAX));
    loop {
        let mut line = String::new();
        let n = match (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_line(&mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let (resp, stop_after) = if n > MAX_REQUEST_BYTES {
            (Response::err(ParseRequestError::TooLong), false)
        } else {
            match parse_request(&line) {
                Err(e) => (Response::err(e), false),
                Ok(Request::Shutdown) => (Response::ok(), true),
                Ok(req) => (handle(vm, req), false),
            }
        };
        let mut text = serde_json::to_string(&resp).unwrap_or_else(|_| "{\"ok\":false}".into());
        text.push('\n');
        let written = out.write_all(text.as_bytes()).and_then(|_| out.flush());
        // The answer goes out before the stop: the VMM process may exit right after it.
        if stop_after {
            vm.request_stop();
        }
        if written.is_err() || n > MAX_REQUEST_BYTES {
            return;
        }
    }
}

fn handle(vm: &Vm, req: Request) -> Response {
    match req {
        Request::Status => Response {
            status: Some(vm.status()),
            ..Response::ok()
        },
        Request::Pause => vm.pause().map_or_else(Response::err, |_| Response::ok()),
        Request::Resume => vm.resume().map_or_else(Response::err, |_| Response::ok()),
        Request::Shutdown => {
            vm.request_stop();
            Response::ok()
        }
        Request::Announce => vm
            .announce_network()
            .map_or_else(Response::err, |_| Response::ok()),
    }
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiCallError {
    /// The socket could not be reached.
    #[error("cannot connect to {path} (is the VM running with --api-sock {path}?)")]
    Connect {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("API exchange failed: {0}")]
    Io(#[from] std::io::Error),
    /// The answer was not a response.
    #[error("bad response from the VMM: {0}")]
    BadResponse(String),
}

/// Sends one request and reads its response.
pub fn call(path: &Path, req: Request) -> Result<Response, ApiCallError> {
    let mut conn = UnixStream::connect(path).map_err(|source| ApiCallError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line =
        serde_json::to_string(&req).map_err(|e| ApiCallError::BadResponse(e.to_string()))?;
    line.push('\n');
    conn.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(conn.take(1 << 20)).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| ApiCallError::BadResponse(format!("{e}: {answer:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_four_requests_parse() {
        assert_eq!(parse_request(r#"{"op":"status"}"#), Ok(Request::Status));
        assert_eq!(parse_request(" {\"op\":\"pause\"}\n"), Ok(Request::Pause));
        assert_eq!(parse_request(r#"{"op":"resume"}"#), Ok(Request::Resume));
        assert_eq!(parse_request(r#"{"op":"shutdown"}"#), Ok(Request::Shutdown));
    }

    #[test]
    fn unknown_and_malformed_requests_are_refused() {
        assert!(matches!(
            parse_request(r#"{"op":"explode"}"#),
            Err(ParseRequestError::Bad(_))
        ));
        assert!(matches!(
            parse_request("status"),
            Err(ParseRequestError::Bad(_))
        ));
        assert!(matches!(parse_request(""), Err(ParseRequestError::Bad(_))));
        assert!(matches!(
            parse_request(r#"{"nop":1}"#),
            Err(ParseRequestError::Bad(_))
        ));
    }

    #[test]
    fn overlong_requests_are_refused_before_parsing() {
        let long = format!(
            r#"{{"op":"status","pad":"{}"}}"#,
            "x".repeat(MAX_REQUEST_BYTES)
        );
        assert_eq!(parse_request(&long), Err(ParseRequestError::TooLong));
    }

    #[test]
    fn requests_serialize_to_what_the_server_parses() {
        for r in [
            Request::Status,
            Request::Pause,
            Request::Resume,
            Request::Shutdown,
        ] {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(parse_request(&line), Ok(r));
        }
    }

    #[test]
    fn error_responses_omit_the_status() {
        let text = serde_json::to_string(&Response::err("nope")).unwrap();
        assert_eq!(text, r#"{"ok":false,"error":"nope"}"#);
        let back: Response = serde_json::from_str(&text).unwrap();
        assert!(!back.ok);
    }
}

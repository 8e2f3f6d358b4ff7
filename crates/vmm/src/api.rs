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

use std::sync::Mutex;

use tern_migration::{CancelToken, ConvergenceConfig, MigrateOptions, OnTimeout, Progress};

use crate::config::KernelSource;
use crate::migrate::VmSource;
use crate::snapshot::{self, SnapshotMeta};
use crate::vm::{Vm, VmStatus};

/// The longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// A control request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// Pause, write a snapshot file, then resume (or stop the VM with `stop`).
    Snapshot {
        /// The file to write.
        path: PathBuf,
        /// Stop the VM after the snapshot instead of resuming it.
        #[serde(default)]
        stop: bool,
    },
    /// Live-migrate the VM to a waiting `tern vm receive`. Progress lines precede the answer.
    Migrate(MigrateRequest),
    /// Cancel the migration under way (before its commit).
    MigrateCancel,
}

/// The options of a `migrate` request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MigrateRequest {
    /// The target, HOST:PORT.
    pub to: String,
    /// Parallel data streams.
    #[serde(default = "default_streams")]
    pub streams: u16,
    /// Downtime budget, ms.
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// Timeout, seconds.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Force the switch-over at the timeout instead of aborting.
    #[serde(default)]
    pub force_on_timeout: bool,
    /// Bandwidth cap, MiB/s.
    #[serde(default)]
    pub max_bandwidth_mibps: Option<u64>,
    /// Compare a digest of all memory on the target before it resumes.
    #[serde(default)]
    pub verify_memory: bool,
    /// Offer only this protocol version (for testing version refusal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u16>,
    /// The target host's successor for disks with an exclusive write lease (its volume node id);
    /// required when the VM has such disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_successor: Option<String>,
}

fn default_streams() -> u16 {
    2
}
fn default_downtime() -> u64 {
    50
}
fn default_timeout() -> f64 {
    60.0
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
    /// A migration's progress (a line before the final answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<serde_json::Value>,
    /// A migration's final report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
}

impl Response {
    fn ok() -> Self {
        Response {
            ok: true,
            error: None,
            status: None,
            progress: None,
            report: None,
        }
    }
    fn err(e: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            status: None,
            progress: None,
            report: None,
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
        "bad request: {0} (send one of {{\"op\":\"status\"|\"pause\"|\"resume\"|\"shutdown\"|\"snapshot\"|\"migrate\"|\"migrate_cancel\"}})"
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
    stopped_by: std::sync::Arc<Mutex<Option<ApiStop>>>,
}

/// Which request stopped the VM, for the VMM's last message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiStop {
    /// `shutdown` (`tern vm stop`).
    Shutdown,
    /// `snapshot` with `stop`: the VM continues from this file.
    Snapshot {
        /// The snapshot file.
        path: PathBuf,
    },
    /// A completed `migrate`: the VM runs on this target now.
    Migrated {
        /// The target, HOST:PORT.
        to: String,
    },
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
        let stopped_by = std::sync::Arc::new(Mutex::new(None));
        let stopped_by2 = stopped_by.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let (vm, stopped_by) = (vm.clone(), stopped_by2.clone());
                    // One thread per client; clients are few (the CLI, an agent).
                    let _ = std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || serve_connection(conn, &vm, &stopped_by));
                }
            })
            .map_err(bind_err)?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            stopped_by,
        })
    }

    /// The request that stopped the VM, if one did.
    pub fn stopped_by(&self) -> Option<ApiStop> {
        self.stopped_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn serve_connection(conn: UnixStream, vm: &Vm, stopped_by: &Mutex<Option<ApiStop>>) {
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
        let parsed = parse_request(&line);
        let stop_cause = match &parsed {
            Ok(Request::Shutdown) => Some(ApiStop::Shutdown),
            Ok(Request::Snapshot { path, .. }) => Some(ApiStop::Snapshot { path: path.clone() }),
            Ok(Request::Migrate(m)) => Some(ApiStop::Migrated { to: m.to.clone() }),
            _ => None,
        };
        let (resp, stop_after) = if n > MAX_REQUEST_BYTES {
            (Response::err(ParseRequestError::TooLong), false)
        } else {
            match parsed {
                Err(e) => (Response::err(e), false),
                Ok(Request::Shutdown) => (Response::ok(), true),
                Ok(Request::Migrate(m)) => {
                    let (resp, completed) = run_migration(vm, &m, &mut out);
                    (resp, completed)
                }
                Ok(req) => handle(vm, req),
            }
        };
        let mut text = serde_json::to_string(&resp).unwrap_or_else(|_| "{\"ok\":false}".into());
        text.push('\n');
        let written = out.write_all(text.as_bytes()).and_then(|_| out.flush());
        // The answer goes out before the stop: the VMM process may exit right after it.
        if stop_after {
            *stopped_by.lock().unwrap_or_else(|e| e.into_inner()) = stop_cause;
            vm.request_stop();
        }
        if written.is_err() || n > MAX_REQUEST_BYTES {
            return;
        }
    }
}

fn handle(vm: &Vm, req: Request) -> (Response, bool) {
    let r = match req {
        Request::Status => Response {
            status: Some(vm.status()),
            ..Response::ok()
        },
        Request::Pause => vm.pause().map_or_else(Response::err, |_| Response::ok()),
        Request::Resume => vm.resume().map_or_else(Response::err, |_| Response::ok()),
        Request::Shutdown => return (Response::ok(), true),
        Request::Snapshot { path, stop } => return snapshot(vm, &path, stop),
        Request::Migrate(_) => Response::err("internal: migrate is served apart"),
        Request::MigrateCancel => {
            match MIGRATION.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                Some(c) => {
                    c.cancel();
                    Response::ok()
                }
                None => Response::err("no migration is under way"),
            }
        }
        Request::Announce => vm
            .announce_network()
            .map_or_else(Response::err, |_| Response::ok()),
    };
    (r, false)
}

/// The cancel token of the migration under way (one VM per VMM process).
static MIGRATION: Mutex<Option<CancelToken>> = Mutex::new(None);

fn snapshot(vm: &Vm, path: &Path, stop: bool) -> (Response, bool) {
    let cfg = vm.config();
    let meta = SnapshotMeta {
        kernel: match &cfg.kernel {
            KernelSource::File(p) => p.display().to_string(),
            KernelSource::Embedded { name, .. } => name.clone(),
        },
        cmdline: cfg.cmdline.clone(),
        memory_mib: cfg.memory_mib,
        vcpus: cfg.vcpus,
        disks: cfg
            .disks
            .iter()
            .map(|d| {
                let mut s = d.path.display().to_string();
                if d.readonly {
                    s.push_str(",readonly");
                }
                s
            })
            .collect(),
    };
    let was_paused = vm.status().state == crate::vm::RunState::Paused;
    if !was_paused && let Err(e) = vm.pause() {
        return (Response::err(e), false);
    }
    let written = snapshot::write(vm, &meta, path);
    if stop && written.is_ok() {
        // The partial console line is in the snapshot; the restored VM prints it.
        vm.discard_pending_output();
        return (Response::ok(), true);
    }
    if !was_paused && let Err(e) = vm.resume() {
        return (Response::err(e), false);
    }
    (
        written.map_or_else(Response::err, |_| Response::ok()),
        false,
    )
}

/// Runs a migration on this connection: progress lines, then the answer. Returns whether the
/// VM now runs on the target (the VMM must then stop).
fn run_migration(vm: &Vm, m: &MigrateRequest, out: &mut UnixStream) -> (Response, bool) {
    let cancel = {
        let mut g = MIGRATION.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_some() {
            return (Response::err("a migration is already under way"), false);
        }
        let c = CancelToken::new();
        *g = Some(c.clone());
        c
    };
    let opts = MigrateOptions {
        streams: m.streams,
        verify_memory: m.verify_memory,
        convergence: ConvergenceConfig {
            downtime_budget: Duration::from_millis(m.downtime_ms),
            timeout: Duration::from_secs_f64(m.timeout_s.clamp(0.1, 86_400.0)),
            on_timeout: if m.force_on_timeout {
                OnTimeout::Force
            } else {
                OnTimeout::Abort
            },
            max_bandwidth: m.max_bandwidth_mibps.map(|x| x << 20),
            ..Default::default()
        },
        ..Default::default()
    };
    let opts = match m.protocol_version {
        Some(v) => MigrateOptions {
            protocol_versions: (v, v),
            ..opts
        },
        None => opts,
    };
    let mut source = VmSource::new(vm.clone()).with_disk_successor(m.disk_successor.clone());
    if let Err(e) = source.check_handover() {
        drop(source);
        *MIGRATION.lock().unwrap_or_else(|e| e.into_inner()) = None;
        return (Response::err(e), false);
    }
    let mut client_gone = false;
    let mut show = |p: &Progress| {
        if client_gone {
            return;
        }
        let r = Response {
            progress: serde_json::to_value(p).ok(),
            ..Response::ok()
        };
        let mut text = serde_json::to_string(&r).unwrap_or_default();
        text.push('\n');
        // Progress is best effort: a client that went away does not stop the migration.
        client_gone = out.write_all(text.as_bytes()).is_err();
    };
    let result = tern_migration::migrate(&mut source, m.to.as_str(), &opts, &cancel, &mut show);
    drop(source);
    *MIGRATION.lock().unwrap_or_else(|e| e.into_inner()) = None;
    match result {
        Ok(report) => {
            // The VM runs on the target now; its partial console line is printed there.
            vm.discard_pending_output();
            (
                Response {
                    report: serde_json::to_value(&report).ok(),
                    ..Response::ok()
                },
                true,
            )
        }
        Err(f) => (
            Response {
                report: serde_json::to_value(&f.report).ok(),
                ..Response::err(tern_migration::error_chain(&f.error))
            },
            false,
        ),
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

/// Sends one request and reads its response (waiting at most 30 s for it).
pub fn call(path: &Path, req: &Request) -> Result<Response, ApiCallError> {
    call_timeout(path, req, Duration::from_secs(30))
}

/// Sends one request and reads its response, waiting at most `timeout` for it.
pub fn call_timeout(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, ApiCallError> {
    let mut conn = UnixStream::connect(path).map_err(|source| ApiCallError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    conn.set_read_timeout(Some(timeout))?;
    let mut line =
        serde_json::to_string(req).map_err(|e| ApiCallError::BadResponse(e.to_string()))?;
    line.push('\n');
    conn.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(conn.take(1 << 20)).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| ApiCallError::BadResponse(format!("{e}: {answer:?}")))
}

/// Sends one request and reads response lines until the final one (a line without
/// `progress`), giving each progress value to `on_progress`. For `migrate`; no read timeout.
pub fn call_streaming(
    path: &Path,
    req: &Request,
    on_progress: &mut dyn FnMut(&serde_json::Value),
) -> Result<Response, ApiCallError> {
    let mut conn = UnixStream::connect(path).map_err(|source| ApiCallError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    let mut line =
        serde_json::to_string(req).map_err(|e| ApiCallError::BadResponse(e.to_string()))?;
    line.push('\n');
    conn.write_all(line.as_bytes())?;
    let mut reader = BufReader::new(conn);
    loop {
        let mut answer = String::new();
        if (&mut reader).take(1 << 20).read_line(&mut answer)? == 0 {
            return Err(ApiCallError::BadResponse(
                "the VMM closed the connection without an answer".into(),
            ));
        }
        let r: Response = serde_json::from_str(&answer)
            .map_err(|e| ApiCallError::BadResponse(format!("{e}: {answer:?}")))?;
        match &r.progress {
            Some(p) => on_progress(p),
            None => return Ok(r),
        }
    }
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

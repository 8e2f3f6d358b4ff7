//! The control API server: newline-delimited JSON over a unix stream socket (see docs/api.md).
//!
//! One request per line, one response line per request:
//! `{"op":"status"}` → `{"ok":true,"status":{…}}`; `{"op":"pause"}`, `{"op":"resume"}`,
//! `{"op":"shutdown"}` → `{"ok":true}`; any failure → `{"ok":false,"error":"…"}`.
//! The messages are `tern-api`'s ([`tern_api::vmm`], re-exported here, as is `tern-vmctl`'s
//! client); [`parse_request`] is pure and bounded (a line longer than [`MAX_REQUEST_BYTES`] is
//! refused). A new request is a variant of [`Request`] there and an arm of [`handle`] here (or of
//! `serve_connection`, for one that streams lines before its answer, as `migrate` does).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Mutex;

use tern_migration::{CancelToken, ConvergenceConfig, MigrateOptions, OnTimeout, Progress};

pub use tern_api::vmm::{
    MAX_REQUEST_BYTES, MigrateRequest, ParseRequestError, Request, Response, parse_request,
};
/// The client half lives in `tern-vmctl`; re-exported for callers that name it here.
pub use tern_vmctl::client::{CallError as ApiCallError, call, call_streaming, call_timeout};

use crate::config::KernelSource;
use crate::migrate::VmSource;
use crate::snapshot::{self, SnapshotMeta};
use crate::vm::Vm;

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
            (Response::error(ParseRequestError::TooLong), false)
        } else {
            match parsed {
                Err(e) => (Response::error(e), false),
                Ok(Request::Shutdown) => (Response::ok(), true),
                Ok(Request::Migrate(m)) => {
                    let (resp, completed) = run_migration(vm, &m, &mut out);
                    (resp, completed)
                }
                Ok(req) => handle(vm, req),
            }
        };
        let written = out
            .write_all(resp.to_line().as_bytes())
            .and_then(|_| out.flush());
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
        Request::Pause => vm.pause().map_or_else(Response::error, |_| Response::ok()),
        Request::Resume => vm.resume().map_or_else(Response::error, |_| Response::ok()),
        Request::Shutdown => return (Response::ok(), true),
        Request::Snapshot { path, stop } => return snapshot(vm, &path, stop),
        Request::Migrate(_) => Response::error("internal: migrate is served apart"),
        Request::MigrateCancel => {
            match MIGRATION.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                Some(c) => {
                    c.cancel();
                    Response::ok()
                }
                None => Response::error("no migration is under way"),
            }
        }
        Request::Announce => vm
            .announce_network()
            .map_or_else(Response::error, |_| Response::ok()),
        Request::ConsoleInput { data, wait_ms } => {
            if wait_ms > tern_api::vmm::CONSOLE_INPUT_MAX_WAIT_MS {
                Response::error(format!(
                    "wait_ms {wait_ms} is out of range (give 0 to {} ms)",
                    tern_api::vmm::CONSOLE_INPUT_MAX_WAIT_MS
                ))
            } else {
                vm.console_input(data.as_bytes(), Duration::from_millis(wait_ms))
                    .map_or_else(Response::error, |_| Response::ok())
            }
        }
        Request::DirtyRate { window_ms } => {
            // A migration owns dirty logging from before it arms it until after it ends.
            if MIGRATION
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
            {
                Response::error(crate::vm::DirtyRateError::LoggingBusy)
            } else {
                match vm.sample_dirty_rate(Duration::from_millis(window_ms)) {
                    Ok(d) => Response {
                        dirty_rate: Some(d),
                        ..Response::ok()
                    },
                    Err(e) => Response::error(e),
                }
            }
        }
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
        return (Response::error(e), false);
    }
    let written = snapshot::write(vm, &meta, path);
    if stop && written.is_ok() {
        // The partial console line is in the snapshot; the restored VM prints it.
        vm.discard_pending_output();
        return (Response::ok(), true);
    }
    if !was_paused && let Err(e) = vm.resume() {
        return (Response::error(e), false);
    }
    (
        written.map_or_else(Response::error, |_| Response::ok()),
        false,
    )
}

/// Runs a migration on this connection: progress lines, then the answer. Returns whether the
/// VM now runs on the target (the VMM must then stop).
fn run_migration(vm: &Vm, m: &MigrateRequest, out: &mut UnixStream) -> (Response, bool) {
    let cancel = {
        let mut g = MIGRATION.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_some() {
            return (Response::error("a migration is already under way"), false);
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
        return (Response::error(e), false);
    }
    let mut client_gone = false;
    let mut show = |p: &Progress| {
        if client_gone {
            return;
        }
        let r = Response {
            progress: Some(p.clone()),
            ..Response::ok()
        };
        // Progress is best effort: a client that went away does not stop the migration.
        client_gone = out.write_all(r.to_line().as_bytes()).is_err();
    };
    let result = tern_migration::migrate_with_tls(
        &mut source,
        m.to.as_str(),
        &opts,
        tls.as_ref(),
        &cancel,
        &mut show,
    );
    drop(source);
    *MIGRATION.lock().unwrap_or_else(|e| e.into_inner()) = None;
    match result {
    // Mutual TLS: the identity the client read from its --tls-dir.
    let tls = match m.tls.as_ref().map(|t| {
        tern_migration::TlsClient::from_pem(
            &t.dir,
            &t.ca_cert_pem,
            &t.cert_pem,
            &t.key_pem,
            &t.target_name,
        )
    }) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            let e = tern_migration::error_chain(&e);
            return (Response::error(format!("bad TLS identity: {e}")), false);
        }
    };
        Ok(report) => {
            // The VM runs on the target now; its partial console line is printed there.
            vm.discard_pending_output();
            (
                Response {
                    report: Some(report),
                    ..Response::ok()
                },
                true,
            )
        }
        Err(f) => (
            Response {
                report: Some(f.report),
                ..Response::error(tern_migration::error_chain(&f.error))
            },
            false,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_is_reexported_under_its_old_paths() {
        // Callers name `tern_vmm::api::{Request, MigrateRequest, parse_request, …}`.
        let line = serde_json::to_string(&Request::Migrate(MigrateRequest::new("h:1"))).unwrap();
        assert!(matches!(parse_request(&line), Ok(Request::Migrate(m)) if m.to == "h:1"));
        assert_eq!(
            Response::error(ParseRequestError::TooLong).error.as_deref(),
            Some("request longer than 4096 bytes")
        );
    }
}

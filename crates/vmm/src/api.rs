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
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tern_migration::{CancelToken, ConvergenceConfig, MigrateOptions, OnTimeout, Progress};

pub use tern_api::vmm::{
    MAX_REQUEST_BYTES, MigrateRequest, ParseRequestError, Request, Response, parse_request,
};
/// The client half lives in `tern-vmctl`; re-exported for callers that name it here.
pub use tern_vmctl::client::{CallError as ApiCallError, call, call_streaming, call_timeout};
pub use tern_vmctl::local::{BindPrivateError, PeerPolicy, PeerRefused};

use crate::config::KernelSource;
use crate::migrate::VmSource;
use crate::snapshot::{self, SnapshotMeta};
use crate::vm::Vm;

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeApiError {
    /// The socket could not be bound (or its directory is not private).
    #[error(
        "cannot listen on API socket {path} (give a path in a 0700 directory of yours that no running VM uses)"
    )]
    Bind {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: BindPrivateError,
    },
    /// The serving thread could not start.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// Who may use the API socket and where `snapshot` may write.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// The peers allowed by uid (`SO_PEERCRED`); default: this process's uid and root.
    pub peers: PeerPolicy,
    /// The only directory `snapshot` writes into (created 0700 at the first snapshot).
    pub snapshot_dir: PathBuf,
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
    /// Binds `path` 0600 inside a private (0700) directory, replacing a stale socket nobody
    /// serves, and serves `vm` on a thread to the peers `opts` allows.
    pub fn start(path: &Path, vm: Vm, opts: ApiOptions) -> Result<ApiServer, ServeApiError> {
        // SAFETY: getuid takes no arguments, touches no memory and cannot fail. (Asked here rather
        // than geteuid inside `bind_private`: the VMM is not set-uid, and the API's seccomp
        // filter allows getuid.)
        let uid = unsafe { libc::getuid() };
        let listener = tern_vmctl::local::bind_private_for(path, uid).map_err(|source| {
            ServeApiError::Bind {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let stopped_by = std::sync::Arc::new(Mutex::new(None));
        let stopped_by2 = stopped_by.clone();
        let opts = std::sync::Arc::new(opts);
        let spawned = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let active = std::sync::Arc::new(AtomicUsize::new(0));
                for conn in listener.incoming() {
                    let conn = match conn {
                        Ok(c) => c,
                        Err(_) => {
                            // EMFILE, ECONNABORTED…: wait a little and go on, never a busy loop.
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    };
                    if active.load(Ordering::Acquire) >= MAX_API_CONNECTIONS {
                        refuse_busy(conn);
                        continue;
                    }
                    active.fetch_add(1, Ordering::AcqRel);
                    let (vm, stopped_by, opts) = (vm.clone(), stopped_by2.clone(), opts.clone());
                    let active2 = active.clone();
                    // One thread per client; clients are few (the CLI, an agent). The peer is
                    // checked there, so a refused one never holds up the next accept.
                    let spawned =
                        std::thread::Builder::new()
                            .name("api-conn".into())
                            .spawn(move || {
                                match opts.peers.check(&conn) {
                                    Err(refused) => refuse(conn, &refused),
                                    Ok(_) => serve_connection(conn, &vm, &stopped_by, &opts),
                                }
                                active2.fetch_sub(1, Ordering::AcqRel);
                            });
                    if spawned.is_err() {
                        active.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            });
        if let Err(e) = spawned {
            let _ = std::fs::remove_file(path);
            return Err(ServeApiError::Thread(e));
        }
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

/// Client connections served at once; more are answered with an error and closed.
pub const MAX_API_CONNECTIONS: usize = 32;
/// How long a connection may stay silent between requests before it is closed.
pub const API_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Answers a connection beyond [`MAX_API_CONNECTIONS`] and closes it.
fn refuse_busy(mut conn: UnixStream) {
    let _ = conn.set_write_timeout(Some(Duration::from_millis(200)));
    let resp = Response::error(format!(
        "the VMM serves {MAX_API_CONNECTIONS} API connections at most; try again"
    ));
    let _ = conn.write_all(resp.to_line().as_bytes());
}

/// Answers a refused peer with one error line (it may not be listening) and logs it. Its request
/// line is read first (bounded, 200 ms at most), so that it is not cut off while still writing.
fn refuse(mut conn: UnixStream, why: &PeerRefused) {
    eprintln!("tern: API connection refused: {why}");
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = BufReader::new(&conn)
        .take(MAX_REQUEST_BYTES as u64 + 1)
        .read_line(&mut String::new());
    let _ = conn.set_write_timeout(Some(Duration::from_millis(200)));
    let resp = Response::error(format!(
        "refused: {why} (the VMM's --api-allow-uid sets who may connect)"
    ));
    let _ = conn.write_all(resp.to_line().as_bytes());
}

fn serve_connection(
    conn: UnixStream,
    vm: &Vm,
    stopped_by: &Mutex<Option<ApiStop>>,
    opts: &ApiOptions,
) {
    // A client that says nothing for this long is gone (the CLI and the agent send at once).
    let _ = conn.set_read_timeout(Some(API_IDLE_TIMEOUT));
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
            Ok(Request::Snapshot { path, .. }) => Some(ApiStop::Snapshot {
                path: snapshot::resolve_path(&opts.snapshot_dir, path).unwrap_or(path.clone()),
            }),
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
                Ok(req) => handle(vm, req, opts),
            }
        };
        let written = out
            .write_all(resp.to_line().as_bytes())
            .and_then(|_| out.flush());
        // The answer goes out before the stop: the VMM process may exit right after it.
        if stop_after {
            // Migrated (never after a failure: `stop_after` is false then): the frames that still
            // reached this source's taps go on to the target before the taps close. Not after
            // post-copy: its phase ends long after the switch, so what the taps hold by then is
            // old, and the senders have long heard the announce.
            let post_copied = resp.report.as_ref().is_some_and(|r| r.post_copy.is_some());
            if matches!(stop_cause, Some(ApiStop::Migrated { .. })) && !post_copied {
                crate::migrate::forward_late_frames(vm);
            }
            *stopped_by.lock().unwrap_or_else(|e| e.into_inner()) = stop_cause;
            vm.request_stop();
        }
        if written.is_err() || n > MAX_REQUEST_BYTES {
            return;
        }
    }
}

fn handle(vm: &Vm, req: Request, opts: &ApiOptions) -> (Response, bool) {
    let r = match req {
        Request::Status => Response {
            status: Some(vm.status()),
            ..Response::ok()
        },
        Request::Pause => vm.pause().map_or_else(Response::error, |_| Response::ok()),
        // A source a migration left in doubt first takes back the disks it handed over; if the
        // target took them, it stays paused.
        Request::Resume => crate::migrate::may_run_again()
            .and_then(|()| crate::migrate::take_back_storage())
            .and_then(|_| vm.resume().map_err(|e| e.to_string()))
            .map_or_else(Response::error, |_| Response::ok()),
        Request::Shutdown => return (Response::ok(), true),
        // A snapshot of a copy that another host runs would restore as a second copy.
        Request::Snapshot { path, stop } => match crate::migrate::may_run_again() {
            Ok(()) => return snapshot(vm, &opts.snapshot_dir, &path, stop),
            Err(e) => Response::error(e),
        },
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

fn snapshot(vm: &Vm, dir: &Path, requested: &Path, stop: bool) -> (Response, bool) {
    // The file is checked before the VM pauses: a refused name costs the guest nothing.
    let path = match snapshot::resolve_path(dir, requested) {
        Ok(p) => p,
        Err(e) => return (Response::error(e), false),
    };
    let path = path.as_path();
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
    // Mutual TLS: the identity the client read from its --tls-dir.
    let tls = match m.tls.as_ref().map(|t| {
        tern_migration::TlsClient::from_pem_with_crl(
            &t.dir,
            &t.ca_cert_pem,
            &t.cert_pem,
            &t.key_pem,
            t.crl_pem.as_deref(),
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
    if let Err(e) = crate::migrate::may_run_again() {
        return (Response::error(e), false);
    }
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
        post_copy_after: m.post_copy_after,
        pages_in_place: m.pages_in_place,
        convergence: ConvergenceConfig {
            downtime_budget: Duration::from_millis(m.downtime_ms),
            timeout: Duration::from_secs_f64(m.timeout_s.clamp(0.1, 86_400.0)),
            on_timeout: if m.force_on_timeout {
                OnTimeout::Force
            } else {
                OnTimeout::Abort
            },
            max_bandwidth: m.max_bandwidth_mibps.map(|x| x << 20),
            state_bytes_estimate: state_bytes_estimate(vm.config().vcpus),
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
    if result.is_ok() {
        // Before the migration slot frees: a resume or migration asked on another connection
        // from here on is refused (the target runs the guest; this copy is stale).
        crate::migrate::migrated_away();
    }
    *MIGRATION.lock().unwrap_or_else(|e| e.into_inner()) = None;
    match result {
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
                report: Some({
                    if f.report.outcome == tern_migration::Outcome::FailedPostCopy {
                        crate::migrate::post_copy_lost();
                    }
                    f.report
                }),
                ..Response::error(tern_migration::error_chain(&f.error))
            },
            false,
        ),
    }
}

/// The saved state's size to plan the pause with: 64 KiB per vCPU (registers, the local APIC,
/// MSRs, the XSAVE area) and 64 KiB for the devices, where the test guest's one vCPU and
/// devices save 12.6 KB. The policy's default (256 KiB whatever the VM) made the state alone
/// look unsendable within the budget for a small VM whose every round measured a host's slow
/// round trips, and its migration ran until the timeout.
fn state_bytes_estimate(vcpus: u8) -> u64 {
    (1 + u64::from(vcpus)) * (64 << 10)
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

//! Settling a migration left in doubt.
//!
//! A migration whose `Commit` went out unanswered ends `in_doubt`: the source stays paused and
//! the target may run the VM. Two halves settle it:
//!
//! - **The target** (`tern vm receive`) keeps its receive address after it committed, for as long
//!   as the VM runs there, and answers a status query on it ([`start_responder`]): one line
//!   [`QUERY`] in, one JSON line out (`{"committed":true,"state":…,"name":…,"vcpus":…,
//!   "memory_mib":…}`). With `--tls-dir` the query goes over mutual TLS with host certificates of
//!   the cluster CA, as the migration did. A target that did not commit never answers: a failed
//!   receive exits, a receive still under way drops anything that is not its source's stream.
//! - **The source** (`tern vm migrate --resolve --to HOST:PORT`, [`run`]) asks and acts:
//!   the target answers that it committed and has the VM (same vCPUs and memory) → the paused copy
//!   here is stopped (exit 0); nothing listens at the address (connection refused: the target's
//!   receive is gone, and a committed one would hold the address while its VM runs) → the copy here
//!   resumes (exit 1, "the source runs") after the VMM took back the write lease of every volume
//!   disk the migration handed over — if the coordinator refuses (the target confirmed the
//!   hand-over: it took the disk to run the VM), the copy stays paused (exit 3); anything else (no route, a timeout, a frozen or silent
//!   peer, a refused TLS handshake, an answer that does not match) → nothing changes (exit 3).
//!
//! Debug builds only: `TERN_TEST_FAULT=crash-after-restore` in a receive's environment aborts the
//! process right after the VM state is restored, before it resumes (the fault matrix's "target
//! crash during restore"). Release builds compile the hook out.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use tern_migration::{MigrationTarget, VmConfigDescription, VmError};
use tern_pki::{Role, TlsDir};
use tern_vmctl::Request;
use tern_vmm::Vm;

/// The status query a resolving source sends.
pub const QUERY: &str = "TERN-MIGRATION-STATUS 1\n";

/// How long either side waits for the other's line (and a TLS handshake).
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Status queries answered at once; connections beyond are closed unanswered.
const MAX_QUERIES: usize = 8;

/// Answers status queries on `listener` for as long as the process lives (the VM runs here: the
/// receive committed). With `tls`, only a host certificate of the CA gets an answer.
pub fn start_responder(listener: TcpListener, vm: Vm, tls: Option<Arc<TlsDir>>) {
    let spawned = std::thread::Builder::new()
        .name("api-resolve".into())
        .spawn(move || {
            // The API's filter: it accepts, reads and writes sockets, nothing more.
            if let Err(e) = super::jail::enter_api_filter() {
                eprintln!("tern: migration status answers disabled: {e:#}");
                return;
            }
            let busy = Arc::new(AtomicUsize::new(0));
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                // Each query on its own thread (a silent peer holds only its own, for at most
                // the timeout), at most MAX_QUERIES at once; more are closed unanswered.
                if busy.fetch_add(1, Ordering::SeqCst) >= MAX_QUERIES {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
                let (vm, tls, held) = (vm.clone(), tls.clone(), busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("api-resolve-q".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &vm, tls.as_deref()) {
                            eprintln!("tern: migration status query not answered: {e:#}");
                        }
                        held.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    busy.fetch_sub(1, Ordering::SeqCst);
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("tern: migration status answers disabled: cannot start a thread: {e}");
    }
}

fn answer(conn: TcpStream, vm: &Vm, tls: Option<&TlsDir>) -> anyhow::Result<()> {
    conn.set_read_timeout(Some(QUERY_TIMEOUT))?;
    conn.set_write_timeout(Some(QUERY_TIMEOUT))?;
    match tls {
        None => answer_on(conn, vm),
        Some(t) => {
            let (s, peer) = tern_pki::accept(t.server_config(), conn, QUERY_TIMEOUT)?;
            peer.require_role(Role::Host)?;
            s.sock.set_read_timeout(Some(QUERY_TIMEOUT))?;
            s.sock.set_write_timeout(Some(QUERY_TIMEOUT))?;
            answer_on(s, vm)
        }
    }
}

fn answer_on<S: Read + Write>(mut s: S, vm: &Vm) -> anyhow::Result<()> {
    let mut line = String::new();
    BufReader::new((&mut s).take(QUERY.len() as u64)).read_line(&mut line)?;
    anyhow::ensure!(line == QUERY, "not a status query: {line:?}");
    let st = vm.status();
    let reply = serde_json::to_string(&Committed {
        committed: true,
        state: st.state,
        name: st.name,
        vcpus: st.vcpus,
        memory_mib: st.memory_mib,
    })?;
    s.write_all(format!("{reply}\n").as_bytes())?;
    s.flush()?;
    Ok(())
}

/// A committed target's answer to [`QUERY`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Committed {
    /// Always true: only a committed target answers.
    committed: bool,
    /// The VM's state there.
    state: tern_api::vmm::RunState,
    name: String,
    vcpus: u8,
    memory_mib: u64,
}

/// What the target's address said.
#[derive(Debug)]
enum Verdict {
    /// It committed and has a VM of this shape in this state.
    Committed(Committed),
    /// Nothing listens there.
    Gone(String),
    /// No usable answer.
    Unknown(String),
}

fn ask(to: &str, tls: Option<(&TlsDir, &str)>) -> Verdict {
    let addrs: Vec<SocketAddr> = match to.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => return Verdict::Unknown(format!("cannot resolve {to}: {e}")),
    };
    let Some(addr) = addrs.first() else {
        return Verdict::Unknown(format!("{to} names no address"));
    };
    let tcp = match TcpStream::connect_timeout(addr, QUERY_TIMEOUT) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Verdict::Gone(format!("nothing listens at {to} (connection refused)"));
        }
        Err(e) => return Verdict::Unknown(format!("cannot reach {to}: {e}")),
    };
    let _ = tcp.set_read_timeout(Some(QUERY_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(QUERY_TIMEOUT));
    let line = match tls {
        None => query_on(tcp),
        Some((t, name)) => {
            match tern_pki::connect(
                t.client_config(),
                TlsDir::server_name(name),
                tcp,
                QUERY_TIMEOUT,
            ) {
                Ok((s, peer)) => match peer.require_role(Role::Host) {
                    Ok(()) => {
                        let _ = s.sock.set_read_timeout(Some(QUERY_TIMEOUT));
                        query_on(s)
                    }
                    Err(e) => Err(anyhow::anyhow!("{e}")),
                },
                Err(e) => Err(anyhow::anyhow!("TLS handshake with {to} failed: {e}")),
            }
        }
    };
    match line {
        Err(e) => Verdict::Unknown(format!("{to} gave no answer: {e:#}")),
        Ok(line) => match serde_json::from_str::<Committed>(line.trim()) {
            Ok(c) if c.committed => Verdict::Committed(c),
            _ => Verdict::Unknown(format!("{to} answered something else: {:?}", line.trim())),
        },
    }
}

fn query_on<S: Read + Write>(mut s: S) -> anyhow::Result<String> {
    s.write_all(QUERY.as_bytes())?;
    s.flush()?;
    let mut line = String::new();
    let n = BufReader::new(s.take(4096)).read_line(&mut line)?;
    anyhow::ensure!(n > 0, "the connection closed without an answer");
    Ok(line)
}

/// `tern vm migrate --resolve`: settles the paused source at `sock` by asking the target at `to`.
/// Exit 0: the target runs the VM, this copy stopped; 1: this copy resumed; 3: still in doubt.
pub fn run(
    sock: &Path,
    what: &str,
    to: &str,
    tls: Option<(&Path, Option<&str>)>,
) -> anyhow::Result<ExitCode> {
    let here = tern_vmctl::status(sock, QUERY_TIMEOUT)
        .with_context(|| format!("cannot ask {what} for its state"))?;
    anyhow::ensure!(
        here.state == tern_vmm::RunState::Paused,
        "{what} is {} here, not paused: --resolve only settles a source a migration left paused in doubt",
        serde_json::to_value(here.state)?
            .as_str()
            .unwrap_or("not paused")
    );
    let tls_dir = match tls {
        None => None,
        Some((dir, name)) => {
            let t = TlsDir::load(dir)
                .with_context(|| format!("cannot use --tls-dir {}", dir.display()))?;
            let name = name
                .unwrap_or_else(|| super::migrate::host_of(to))
                .to_owned();
            TlsDir::try_server_name(&name).map_err(|e| anyhow::anyhow!("bad --tls-name: {e}"))?;
            Some((t, name))
        }
    };
    let verdict = ask(to, tls_dir.as_ref().map(|(t, n)| (t, n.as_str())));
    match verdict {
        Verdict::Committed(v) if v.vcpus == here.vcpus && v.memory_mib == here.memory_mib => {
            tern_vmctl::request(sock, &Request::Shutdown)
                .with_context(|| format!("the target runs the VM, but stopping {what} failed"))?;
            eprintln!(
                "tern: the target {to} committed the migration and has the VM ({} there); \
                 the paused copy here is stopped",
                serde_json::to_string(&v.state)?.trim_matches('"')
            );
            Ok(ExitCode::SUCCESS)
        }
        Verdict::Committed(v) => {
            eprintln!(
                "tern: still in doubt: {to} runs a VM of another shape ({} vCPUs, {} MiB; here {} vCPUs, \
                 {} MiB), not this one's copy; nothing changed (the VM stays paused here)",
                v.vcpus, v.memory_mib, here.vcpus, here.memory_mib
            );
            Ok(ExitCode::from(3))
        }
        Verdict::Gone(why) => {
            // The VMM's resume first takes back the write lease of every volume disk the
            // migration handed over. The coordinator refuses that once the target confirmed the
            // hand-over (it took the disk to run the VM, and its writes may be on it): then the
            // copy here must not run either, and it stays paused, in doubt.
            if let Err(e) = tern_vmctl::request(sock, &Request::Resume) {
                eprintln!(
                    "tern: still in doubt: {why}, but {what} cannot resume: {e:#}; the VM stays \
                     paused here (if the target took the disk over, it ran the VM there: stop \
                     this copy and start the VM again from its disk)"
                );
                return Ok(ExitCode::from(3));
            }
            eprintln!(
                "tern: {why}: the target's receive is gone without the VM (a committed target keeps \
                 its address while the VM runs there); {what} resumed here"
            );
            Ok(ExitCode::from(1))
        }
        Verdict::Unknown(why) => {
            eprintln!(
                "tern: still in doubt: {why}; nothing changed (the VM stays paused here); \
                 try again when {to} can be reached, or check that host"
            );
            Ok(ExitCode::from(3))
        }
    }
}

/// A receive's target with the debug-only fault hook (module docs).
pub struct FaultHooks<T> {
    inner: T,
    crash_after_restore: bool,
}

impl<T> FaultHooks<T> {
    pub fn new(inner: T) -> Self {
        let crash_after_restore = cfg!(debug_assertions)
            && std::env::var("TERN_TEST_FAULT").is_ok_and(|v| v == "crash-after-restore");
        FaultHooks {
            inner,
            crash_after_restore,
        }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: MigrationTarget> MigrationTarget for FaultHooks<T> {
    fn prepare(&mut self, config: &VmConfigDescription) -> Result<(), String> {
        self.inner.prepare(config)
    }
    fn write_page(&mut self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.inner.write_page(gpa, data)
    }
    fn zero_page(&mut self, gpa: u64) -> Result<(), VmError> {
        self.inner.zero_page(gpa)
    }
    fn read_pages(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.inner.read_pages(gpa, buf)
    }
    fn restore_state(&mut self, version: u32, bytes: &[u8]) -> Result<(), VmError> {
        self.inner.restore_state(version, bytes)?;
        if self.crash_after_restore {
            eprintln!("tern: TERN_TEST_FAULT=crash-after-restore: aborting after the state load");
            std::process::abort();
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.inner.resume()
    }
    fn discard(&mut self) {
        self.inner.discard()
    }
    fn prefault(&mut self) -> Option<tern_migration::vm::Prefault> {
        self.inner.prefault()
    }
    fn placer(&mut self) -> Option<std::sync::Arc<dyn tern_migration::vm::PagePlacer>> {
        self.inner.placer()
    }
    fn post_copy_memory(
        &mut self,
        owed: &[(u64, u64)],
    ) -> Result<std::sync::Arc<dyn tern_migration::MissingMemory>, VmError> {
        self.inner.post_copy_memory(owed)
    }
    fn stop_post_copy_guest(&mut self) {
        self.inner.stop_post_copy_guest()
    }
}

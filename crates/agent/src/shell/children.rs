//! The VMM children: `tern vm run` and `tern vm receive` processes supervised by the agent (their
//! command line built by `tern-vmctl`'s [`VmmArgs`]), and the migrate and resume requests the
//! agent sends their control sockets through `tern-vmctl`, on blocking tasks.
//!
//! Every VMM child is started through `setpriv --pdeathsig KILL` when setpriv exists, so the VMMs
//! die with the agent (a restarted agent starts empty, and an agent that crashed cannot leave VMs
//! running unfenced). Each child gets a serial number: exits and "running" signals of an earlier
//! child of the same VM are recognised and dropped.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tern_api::cluster::VmCreate;
use tern_vmctl::{MigrateRequest, MigrationEnd, RuntimeEntry, VmmArgs};
use tokio::process::Command;
use tokio::sync::mpsc;

use super::{Event, procfs};
use crate::core::{Input, MigrationOutcome};

/// Where and how VMM children run.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    /// The `tern` binary.
    pub exe: PathBuf,
    /// The runtime directory given to every VMM (`--runtime-dir`).
    pub runtime_dir: PathBuf,
    /// `setpriv`, if installed (for `--pdeathsig KILL`).
    pub setpriv: Option<PathBuf>,
    /// The address receivers listen on (the agent's own).
    pub listen_ip: IpAddr,
    /// The host's `--tls-dir`: every VMM gets it (`tern vm run|receive --tls-dir`), so its
    /// `volume://` disk reaches the host's TLS-only volume node with the host's certificate;
    /// receivers take only mutual TLS from a host certificate of the cluster CA, and migrations
    /// out go over mutual TLS with it, the target's certificate checked against the target's
    /// address.
    pub tls_dir: Option<PathBuf>,
}

/// How often the watcher looks for a receiver's listening socket: the migration waits for it,
/// so a coarse poll adds up to a whole period to every move (it was 50 ms).
const LISTEN_POLL: Duration = Duration::from_millis(2);
/// How long the watcher polls at [`LISTEN_POLL`] (a receiver listens 3–13 ms after its spawn on
/// the test cluster); a receiver not listening by then is looked for at [`WATCH_POLL`], so a
/// stuck one does not cost ~500 reads of the namespace's socket tables a second.
const LISTEN_FAST_FOR: Duration = Duration::from_millis(250);
/// How often the watcher looks for a VMM's runtime entry otherwise.
const WATCH_POLL: Duration = Duration::from_millis(50);

/// A VMM child as the agent's loop knows it.
#[derive(Debug)]
pub(crate) struct Child {
    /// Tells this child apart from earlier ones of the same VM.
    pub serial: u64,
    /// Its process id.
    pub pid: u32,
    kill: mpsc::UnboundedSender<()>,
}

impl Child {
    /// SIGKILLs the child (its supervisor reaps it and reports the exit).
    pub fn kill(&self) {
        let _ = self.kill.send(());
    }
}

/// Reads the runtime entry of `vm`, if there is one (a bad or unreadable entry is none).
pub(crate) fn read_entry(dir: &Path, vm: &str) -> Option<RuntimeEntry> {
    tern_vmctl::read_entry(dir, vm).ok().flatten()
}

fn command(ctx: &Ctx, args: &[String]) -> Command {
    let mut cmd = match &ctx.setpriv {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(&ctx.exe);
            c
        }
        None => Command::new(&ctx.exe),
    };
    cmd.args(args);
    cmd
}

/// Starts a VMM for `spec`: `tern vm run`, or, with `receive`, `tern vm receive` on a free port of
/// the agent's address. Reports [`Event::ChildListening`] (receivers), [`Event::ChildRunning`] and
/// [`Event::ChildExited`].
pub(crate) fn spawn_vmm(
    ctx: &Ctx,
    spec: &VmCreate,
    disk_url: Option<&str>,
    receive: bool,
    serial: u64,
    events: &mpsc::Sender<Event>,
) -> std::io::Result<Child> {
    let mut listen = None;
    let mut vmm = if receive {
        let port = std::net::TcpListener::bind((ctx.listen_ip, 0))?
            .local_addr()?
            .port();
        let addr = std::net::SocketAddr::new(ctx.listen_ip, port).to_string();
        let vmm = VmmArgs::receive(spec, &addr, &ctx.runtime_dir);
        listen = Some((addr, port));
        vmm
    } else {
        VmmArgs::run(spec, &ctx.runtime_dir)
    };
    if let Some(d) = disk_url {
        vmm = vmm.disk(d);
    }
    let mut args = vmm.to_args();
    if let Some(dir) = &ctx.tls_dir {
        args.extend(["--tls-dir".to_string(), dir.display().to_string()]);
    }
    std::fs::create_dir_all(&ctx.runtime_dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ctx.runtime_dir.join(format!("{}.log", spec.name)))?;
    let mut child = command(ctx, &args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("the child exited at once"))?;
    let (kill_tx, mut kill_rx) = mpsc::unbounded_channel::<()>();
    let vm = spec.name.clone();
    // The supervisor: kills on request, reaps, reports the exit.
    {
        let (vm, events) = (vm.clone(), events.clone());
        tokio::spawn(async move {
            let mut killed = false;
            let status = loop {
                tokio::select! {
                    k = kill_rx.recv(), if !killed => {
                        // A dropped sender (the VM was replaced) is not a kill request.
                        if k.is_some() {
                            let _ = child.start_kill();
                        }
                        killed = true;
                    }
                    s = child.wait() => break s,
                }
            };
            let status = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("cannot wait for it: {e}"),
            };
            let _ = events.send(Event::ChildExited { vm, serial, status }).await;
        });
    }
    // The watcher: listening (receivers), then running (its runtime entry names this process).
    {
        let (events, dir) = (events.clone(), ctx.runtime_dir.clone());
        let spawned = std::time::Instant::now();
        tokio::spawn(async move {
            let mut listening = listen.is_none();
            loop {
                // A migration waits for the receiver to listen: look often until it does (for a
                // while).
                let poll = if listening || spawned.elapsed() > LISTEN_FAST_FOR {
                    WATCH_POLL
                } else {
                    LISTEN_POLL
                };
                tokio::time::sleep(poll).await;
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    return;
                }
                if let Some((addr, port)) = &listen
                    && !listening
                    && procfs::listens(pid, *port)
                {
                    listening = true;
                    eprintln!(
                        "tern agent: the receiver of {vm} listens {} ms after its spawn",
                        spawned.elapsed().as_millis()
                    );
                    let listen = addr.clone();
                    let ev = Event::ChildListening {
                        vm: vm.clone(),
                        serial,
                        listen,
                    };
                    let _ = events.send(ev).await;
                }
                if read_entry(&dir, &vm).is_some_and(|e| e.pid == pid) {
                    let ev = Event::ChildRunning {
                        vm: vm.clone(),
                        serial,
                    };
                    let _ = events.send(ev).await;
                    return;
                }
            }
        });
    }
    Ok(Child {
        serial,
        pid,
        kill: kill_tx,
    })
}

/// The core's view of where a migrated VM runs.
pub(crate) fn migration_outcome(end: MigrationEnd) -> MigrationOutcome {
    match end {
        MigrationEnd::Completed => MigrationOutcome::Completed,
        MigrationEnd::Failed => MigrationOutcome::Failed,
        MigrationEnd::InDoubt => MigrationOutcome::InDoubt,
        MigrationEnd::Lost => MigrationOutcome::Lost,
    }
}

/// Migrates `vm` to `to` through its control socket (on a blocking task: the call lasts the
/// whole migration) and reports [`Input::MigrationEnded`] with the VMM's report; with
/// `post_copy_after`, a post-copy migration that switches after that many rounds.
pub(crate) fn migrate(
    ctx: &Ctx,
    vm: String,
    to: String,
    disk_successor: Option<u32>,
    post_copy_after: Option<u32>,
    events: &mpsc::Sender<Event>,
) {
    let dir = ctx.runtime_dir.clone();
    let tls_dir = ctx.tls_dir.clone();
    let events = events.clone();
    tokio::spawn(async move {
        let name = vm.clone();
        let ended = tokio::task::spawn_blocking(move || {
            let found = tern_vmctl::find(&dir, &name)
                .map_err(|e| format!("cannot find its control socket: {e}"))?;
            let tls = match &tls_dir {
                None => None,
                Some(d) => {
                    let pem = tern_pki::PemFiles::read(d)
                        .map_err(|e| format!("--tls-dir {}: {e}", d.display()))?;
                    let crl = tern_pki::PemFiles::read_crl(d)
                        .map_err(|e| format!("--tls-dir {}: {e}", d.display()))?;
                    // The target's certificate must carry its address (the lab issues the host
                    // certificates with it as SAN).
                    let host = to.rsplit_once(':').map_or(to.as_str(), |(h, _)| h);
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    Some(tern_api::vmm::MigrateTls {
                        dir: d.display().to_string(),
                        ca_cert_pem: pem.ca_cert,
                        cert_pem: pem.cert,
                        key_pem: pem.key,
                        crl_pem: crl,
                        target_name: host.to_string(),
                    })
                }
            };
            let mut req = MigrateRequest::new(to);
            req.disk_successor = disk_successor.map(|n| n.to_string());
            req.tls = tls.map(Box::new);
            req.post_copy_after = post_copy_after;
            Ok::<_, String>(tern_vmctl::migrate(&found.sock, req, &mut |_| {}))
        })
        .await;
        let (end, report) = match ended {
            Ok(Ok(Ok(report))) => (MigrationEnd::Completed, Some(report)),
            Ok(Ok(Err(e))) => {
                eprintln!("tern agent: migrating {vm}: {:?}: {e}", e.end());
                (e.end(), e.report().cloned())
            }
            Ok(Err(why)) => {
                eprintln!("tern agent: migrating {vm}: {why}");
                (MigrationEnd::Failed, None)
            }
            Err(e) => {
                eprintln!("tern agent: migrating {vm}: the migration task failed: {e}");
                (MigrationEnd::Failed, None)
            }
        };
        let input = Input::MigrationEnded {
            vm,
            outcome: migration_outcome(end),
            report: report.and_then(|r| serde_json::to_value(r).ok()),
        };
        let _ = events.send(Event::Input(input)).await;
    });
}

/// Resumes `vm` through its control socket (a failure is logged: the VM stays paused and reports
/// say so only through its exit or a later command).
pub(crate) fn resume(ctx: &Ctx, vm: String) {
    let dir = ctx.runtime_dir.clone();
    tokio::task::spawn_blocking(move || {
        let resumed = tern_vmctl::find(&dir, &vm)
            .map_err(|e| e.to_string())
            .and_then(|found| tern_vmctl::resume(&found.sock).map_err(|e| e.to_string()));
        if let Err(e) = resumed {
            eprintln!("tern agent: resuming {vm} failed: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_ends_map_to_the_cores_outcomes() {
        for (code, outcome) in [
            (Some(0), MigrationOutcome::Completed),
            (Some(1), MigrationOutcome::Failed),
            (Some(3), MigrationOutcome::InDoubt),
            (Some(4), MigrationOutcome::Lost),
            (None, MigrationOutcome::Failed),
        ] {
            assert_eq!(
                migration_outcome(MigrationEnd::from_exit_code(code)),
                outcome
            );
        }
    }
}

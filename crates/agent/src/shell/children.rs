//! The VMM children: `tern vm run` and `tern vm receive` processes supervised by the agent, and the
//! short-lived `tern vm migrate` / `tern vm resume` commands.
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
}

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

/// The fields of a runtime entry the agent uses (readers ignore the others).
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Entry {
    pub pid: u32,
    #[serde(default)]
    pub vcpu_tids: Vec<i32>,
}

/// Reads the runtime entry of `vm`, if there is one.
pub(crate) fn read_entry(dir: &Path, vm: &str) -> Option<Entry> {
    let text = std::fs::read_to_string(dir.join(format!("{vm}.json"))).ok()?;
    serde_json::from_str(&text).ok()
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

fn vm_args(spec: &VmCreate, disk_url: Option<&str>, ctx: &Ctx) -> Vec<String> {
    let dir = ctx.runtime_dir.display().to_string();
    let mut a = vec![
        "--name".into(),
        spec.name.clone(),
        "--vcpus".into(),
        spec.vcpus.to_string(),
        "--memory-mib".into(),
        spec.memory_mib.to_string(),
        "--runtime-dir".into(),
        dir.clone(),
        "--serial".into(),
        format!("file:{dir}/{}.console", spec.name),
    ];
    if let Some(d) = disk_url {
        a.push("--disk".into());
        a.push(d.to_string());
    }
    a
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
    let mut args: Vec<String> = vec!["vm".into()];
    let mut listen = None;
    if receive {
        let port = std::net::TcpListener::bind((ctx.listen_ip, 0))?
            .local_addr()?
            .port();
        let addr = std::net::SocketAddr::new(ctx.listen_ip, port).to_string();
        args.extend(["receive".into(), "--listen".into(), addr.clone()]);
        listen = Some((addr, port));
    } else {
        args.extend([
            "run".into(),
            "--kernel".into(),
            spec.kernel.clone(),
            "--cmdline".into(),
            spec.cmdline.clone(),
        ]);
    }
    args.extend(vm_args(spec, disk_url, ctx));
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
        tokio::spawn(async move {
            let mut listening = listen.is_none();
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    return;
                }
                if let Some((addr, port)) = &listen
                    && !listening
                    && procfs::listens(pid, *port)
                {
                    listening = true;
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

/// The outcome a `tern vm migrate` exit status means (0 completed, 3 in doubt, else failed).
pub(crate) fn migration_outcome(code: Option<i32>) -> MigrationOutcome {
    match code {
        Some(0) => MigrationOutcome::Completed,
        Some(3) => MigrationOutcome::InDoubt,
        _ => MigrationOutcome::Failed,
    }
}

/// Runs `tern vm migrate` for `vm` and reports [`Input::MigrationEnded`].
pub(crate) fn migrate(
    ctx: &Ctx,
    vm: String,
    to: String,
    disk_successor: Option<u32>,
    events: &mpsc::Sender<Event>,
) {
    let mut args: Vec<String> = vec![
        "vm".into(),
        "migrate".into(),
        "--name".into(),
        vm.clone(),
        "--runtime-dir".into(),
        ctx.runtime_dir.display().to_string(),
        "--to".into(),
        to,
        "--json".into(),
    ];
    if let Some(n) = disk_successor {
        args.extend(["--disk-successor".into(), n.to_string()]);
    }
    let mut cmd = command(ctx, &args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let events = events.clone();
    tokio::spawn(async move {
        let (outcome, report) = match cmd.output().await {
            Ok(out) => {
                let report = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .ok()
                    .filter(|v| !v.is_null());
                let outcome = migration_outcome(out.status.code());
                if outcome != MigrationOutcome::Completed {
                    eprintln!(
                        "tern agent: migrating {vm}: {outcome:?}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                (outcome, report)
            }
            Err(e) => {
                eprintln!("tern agent: cannot run tern vm migrate for {vm}: {e}");
                (MigrationOutcome::Failed, None)
            }
        };
        let input = Input::MigrationEnded {
            vm,
            outcome,
            report,
        };
        let _ = events.send(Event::Input(input)).await;
    });
}

/// Runs `tern vm resume` for `vm` (a failure is logged: the VM stays paused and reports say so
/// only through its exit or a later command).
pub(crate) fn resume(ctx: &Ctx, vm: String) {
    let args: Vec<String> = vec![
        "vm".into(),
        "resume".into(),
        "--name".into(),
        vm.clone(),
        "--runtime-dir".into(),
        ctx.runtime_dir.display().to_string(),
    ];
    let mut cmd = command(ctx, &args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    tokio::spawn(async move {
        match cmd.output().await {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "tern agent: resuming {vm} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("tern agent: cannot run tern vm resume for {vm}: {e}"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrate_exit_statuses_map_to_outcomes() {
        assert_eq!(migration_outcome(Some(0)), MigrationOutcome::Completed);
        assert_eq!(migration_outcome(Some(1)), MigrationOutcome::Failed);
        assert_eq!(migration_outcome(Some(3)), MigrationOutcome::InDoubt);
        assert_eq!(migration_outcome(None), MigrationOutcome::Failed);
    }
}

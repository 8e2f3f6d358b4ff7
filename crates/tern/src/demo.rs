//! `tern demo`: boots the embedded test guest, shows its heartbeats and memory-dirtying rate,
//! pauses it (the heartbeats stop), resumes it (the sequence continues) and stops it.
//!
//! The VM runs as a child `tern vm run` process, as every VM does, driven through its control
//! socket exactly as `tern vm pause|resume|stop` drive it.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use anyhow::Context;
use tern_vmm::api::{self, Request};

/// Options of `tern demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// vCPUs of the demo VM.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// Pages per second the guest's memory writer dirties.
    #[arg(long, default_value_t = 20_000)]
    pub dirty_rate: u64,
}

fn show_for(lines: &Receiver<String>, d: Duration) -> usize {
    let deadline = Instant::now() + d;
    let mut n = 0;
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        println!("  guest | {line}");
        n += 1;
    }
    n
}

fn call(sock: &std::path::Path, req: Request) -> anyhow::Result<api::Response> {
    let r = api::call(sock, &req)?;
    anyhow::ensure!(
        r.ok,
        "the VM refused {req:?}: {}",
        r.error.unwrap_or_default()
    );
    Ok(r)
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("tern-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("cannot create a scratch directory")?;
    let sock = dir.join("api.sock");
    let exe = std::env::current_exe().context("cannot find the tern binary")?;
    let cmdline = format!(
        "tern.hb_ms=500 tern.dirty_mib=64 tern.dirty_rate={}",
        args.dirty_rate
    );
    println!(
        "== booting the embedded test guest: {} vCPUs, {} MiB, `{cmdline}`",
        args.vcpus, args.memory_mib
    );
    let started = Instant::now();
    let mut child = Command::new(exe)
        .args(["vm", "run", "--kernel", "builtin:testguest", "--name"])
        .arg(format!("demo-{}", std::process::id()))
        .args(["--vcpus", &args.vcpus.to_string()])
        .args(["--memory-mib", &args.memory_mib.to_string()])
        .args(["--cmdline", &cmdline])
        .arg("--api-sock")
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start `tern vm run`")?;
    let out = child.stdout.take().context("no console pipe")?;
    let (tx, lines) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = (|| -> anyhow::Result<()> {
        let first = lines
            .recv_timeout(Duration::from_secs(20))
            .context("the guest printed nothing within 20 s")?;
        println!(
            "  guest | {first}    ({} ms after start)",
            started.elapsed().as_millis()
        );
        show_for(&lines, Duration::from_millis(2600));

        let status = call(&sock, Request::Status)?.status.context("no status")?;
        println!(
            "== status: {:?}, pid {}, vCPU threads {:?}, TSC {} kHz",
            status.state, status.pid, status.vcpu_tids, status.tsc_khz
        );
        println!("== pausing every vCPU for 2 s: no heartbeats should appear");
        call(&sock, Request::Pause)?;
        show_for(&lines, Duration::from_millis(150)); // lines already in the pipe
        let during = show_for(&lines, Duration::from_secs(2));
        println!(
            "== {during} console lines while paused; resuming (maxgap_us shows the pause the guest saw)"
        );
        call(&sock, Request::Resume)?;
        show_for(&lines, Duration::from_millis(2100));
        println!("== stopping the VM");
        call(&sock, Request::Shutdown)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().context("waiting for the VM")?;
    show_for(&lines, Duration::from_millis(100));
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    println!("== the VMM exited with {status}");
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

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
    /// Show live migration with the network instead: the guest moves between two hosts of a
    /// network-namespace topology while a client streams TCP echo requests to it (needs root).
    #[arg(long)]
    pub net: bool,
    /// With --net: print one JSON object (the migration report, `max_stall_ms`, `requests`,
    /// `connection_broken`, `switch_port_after`) instead of the narration.
    #[arg(long, requires = "net")]
    pub json: bool,
    /// With --net: the target's announce schedule (ms offsets, or `off`).
    #[arg(long, default_value = "0,50,200,450,800", requires = "net")]
    pub announce: String,
}

/// `tern demo --net`: a migration between the hosts of a tern-netlab topology with a client
/// holding a TCP connection to the guest's echo server.
fn run_net(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the tern binary")?;
    let dir = std::env::temp_dir().join(format!("tern-demo-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("cannot create a scratch directory")?;
    let name = format!("tdm{}", std::process::id() % 100_000);
    let mut spec = tern_netlab::TopologySpec::new(&name, 2);
    spec.replace_stale = true;
    let topo = tern_netlab::Topology::build(spec)
        .context("cannot build the network topology (tern demo --net needs root)")?;
    if !args.json {
        println!(
            "== topology {name}: switch {}, hosts {} and {}, client {} ({})",
            topo.switch_ns(),
            topo.host_ns(0),
            topo.host_ns(1),
            topo.client_ns().unwrap_or_default(),
            tern_netlab::Topology::client_addr()
        );
        println!(
            "== guest {} (MAC {}) on {}; a client sends a TCP echo request every 2 ms; migrating to {}",
            tern_netlab::Topology::guest_addr(0),
            tern_netlab::scenario::GUEST_MAC,
            topo.host_ns(0),
            topo.host_ns(1)
        );
    }
    let mut s = tern_netlab::scenario::MigrationScenario::new(exe, &dir);
    s.memory_mib = args.memory_mib;
    s.announce = args.announce.clone();
    let out = tern_netlab::scenario::run_migration(&topo, &s);
    let _ = std::fs::remove_dir_all(&dir);
    drop(topo);
    let out = out.map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut report = out
        .migration
        .clone()
        .unwrap_or_else(|| serde_json::json!({}));
    if let Some(m) = report.as_object_mut() {
        m.insert(
            "max_stall_ms".into(),
            serde_json::json!(out.echo.max_stall_ms),
        );
        m.insert("requests".into(), serde_json::json!(out.echo.requests));
        m.insert(
            "connection_broken".into(),
            serde_json::json!(out.echo.connection_broken),
        );
        m.insert(
            "switch_port_after".into(),
            serde_json::json!(out.switch_port_after),
        );
    }
    if args.json {
        println!("{report}");
    } else {
        for l in &out.target_console {
            println!("  guest on {} | {l}", topo_host_name(1));
        }
        println!("== migration: {}", out.migration.unwrap_or_default());
        println!(
            "== client: {} requests answered, longest wait {:.1} ms, connection {}; the switch now sends the guest's MAC to port {}",
            out.echo.requests,
            out.echo.max_stall_ms,
            if out.echo.connection_broken {
                format!("BROKEN ({})", out.echo.error.unwrap_or_default())
            } else {
                "intact".into()
            },
            out.switch_port_after.unwrap_or_else(|| "?".into())
        );
    }
    Ok(if out.echo.connection_broken {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn topo_host_name(i: usize) -> String {
    format!("h{i}")
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
    if args.net {
        return run_net(&args);
    }
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

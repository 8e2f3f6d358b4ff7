//! `tern agent` against a real etcd and real VMMs: the host record under a lease, a VM started by an
//! HTTP command, the generation fence, self-fencing when etcd stops answering, and the record and
//! VMMs gone after the agent is SIGKILLed. Needs root, KVM and the etcd binary.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tern_test_support::{ChildGuard, Etcd, free_port, require_kvm, wait_for};

const TTL_MS: u64 = 5_000;
/// Keep-alives go out every TTL/3.
const KEEPALIVE_MS: u64 = TTL_MS / 3;

/// One HTTP/1.1 request; the status code and the body.
fn http(method: &str, addr: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

fn status(addr: &str) -> Value {
    let (code, body) = http("GET", addr, "/v1/agent/status", None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn command(addr: &str, generation: u64, id: u64, lease: u64, body: Value) -> Value {
    let cmd = json!({"generation": generation, "id": id, "host_lease": lease, "body": body});
    let (code, text) = http("POST", addr, "/v1/agent/commands", Some(&cmd));
    assert_eq!(code, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// The value of `key` in etcd, if it exists.
fn etcd_get(url: &str, key: &str) -> Option<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([url], None).await.unwrap();
        let r = c.get(key, None).await.unwrap();
        r.kvs()
            .first()
            .map(|kv| kv.value_str().unwrap().to_string())
    })
}

/// The pid of the etcd serving `url` (to stop and continue it).
fn etcd_pid(url: &str) -> i32 {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.starts_with("etcd\0") && cmd.contains(&format!("--listen-client-urls\0{url}\0"))
        })
        .unwrap_or_else(|| panic!("no etcd process serves {url}"))
}

/// Whether `pid` is gone or a zombie.
fn dead(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
    }
}

fn signal(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

fn start_agent(etcd: &Etcd, host: &str, listen: &str, dir: &Path) -> ChildGuard {
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "agent",
            "--host-id",
            host,
            "--etcd",
            &etcd.url,
            "--listen",
            listen,
        ])
        .args([
            "--cores",
            "2",
            "--memory-mib",
            "2048",
            "--volume-node-id",
            "3",
        ])
        .args(["--lease-ttl-ms", &TTL_MS.to_string()])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--runtime-dir")
        .arg(dir.join("run"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("tern agent starts");
    let child = ChildGuard(child);
    wait_for("the agent's API", Duration::from_secs(20), || {
        TcpStream::connect(listen).is_ok()
    });
    child
}

fn vm(name: &str) -> Value {
    json!({"op": "start", "disk_url": null, "spec": {
        "name": name, "vcpus": 1, "memory_mib": 64, "kernel": "builtin:testguest",
        "cmdline": "tern.hb_ms=50", "disk": null, "host": null, "anti_affinity": null,
        "restart_priority": 50}})
}

/// The highest heartbeat sequence number on a VM's console file.
fn last_hb(console: &Path) -> u64 {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("HB "))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("seq=")?.parse().ok())
        })
        .max()
        .unwrap_or(0)
}

fn vm_of<'a>(st: &'a Value, name: &str) -> Option<&'a Value> {
    st["vms"].as_array()?.iter().find(|v| v["name"] == name)
}

/// Waits until `name` runs (the agent says so, its runtime entry names the VMM, heartbeats flow);
/// its VMM's pid.
fn wait_running(addr: &str, dir: &Path, name: &str) -> u64 {
    wait_for(&format!("{name} running"), Duration::from_secs(30), || {
        vm_of(&status(addr), name).is_some_and(|v| v["state"] == "running")
    });
    let pid = vm_of(&status(addr), name).unwrap()["pid"].as_u64().unwrap();
    let entry: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("run/{name}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        entry["pid"].as_u64(),
        Some(pid),
        "the runtime entry names the VMM: {entry}"
    );
    let console = dir.join(format!("run/{name}.console"));
    wait_for("heartbeats", Duration::from_secs(10), || {
        last_hb(&console) > 0
    });
    let first = last_hb(&console);
    wait_for("more heartbeats", Duration::from_secs(10), || {
        last_hb(&console) > first + 2
    });
    pid
}

#[test]
fn the_agent_registers_runs_vms_refuses_stale_commands_and_fences_itself() {
    require_kvm();
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let host = format!("agent-test-{}", std::process::id());
    let listen = format!("127.0.0.1:{}", free_port());
    let mut agent = start_agent(&etcd, &host, &listen, dir.path());
    let key = format!("/tern/hosts/{host}");

    // Registered under its lease, with the capacity given.
    wait_for("the host record", Duration::from_secs(15), || {
        etcd_get(&etcd.url, &key).is_some()
    });
    let record: Value = serde_json::from_str(&etcd_get(&etcd.url, &key).unwrap()).unwrap();
    let lease = status(&listen)["lease"].as_u64().expect("a lease");
    assert_eq!(record["lease"].as_u64(), Some(lease), "{record}");
    assert_eq!(record["agent_url"], format!("http://{listen}"));
    assert_eq!(record["capacity"]["cores"], 2);
    assert_eq!(record["capacity"]["memory_mib"], 2048);
    assert_eq!(record["capacity"]["volume_node_id"], 3);
    assert_eq!(record["capacity"]["power_model"], "hp-ml110-g5");

    // A VM started by a command.
    let r = command(&listen, 10, 1, lease, vm("v1"));
    assert_eq!(r["reply"]["result"], "done", "{r}");
    let pid = wait_running(&listen, dir.path(), "v1");

    // A lower generation is refused, and changes nothing.
    let r = command(&listen, 9, 1, lease, vm("v2"));
    assert_eq!(
        r["reply"],
        json!({"result": "stale_generation", "seen": 10}),
        "{r}"
    );
    assert!(vm_of(&status(&listen), "v2").is_none());
    let kept = std::fs::read_to_string(dir.path().join("state/generation")).unwrap();
    assert_eq!(kept.trim(), "10", "the generation is kept on disk");
    let (code, metrics) = http("GET", &listen, "/metrics", None);
    assert_eq!(code, 200);
    for line in [
        "tern_agent_vms{state=\"running\"} 1",
        "tern_agent_generation_seen 10",
        "tern_agent_self_fences_total 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

    // etcd stops answering: the VMM is killed before the lease could expire. The last keep-alive
    // etcd saw was sent at most KEEPALIVE_MS before the stop, so the lease lives at least until
    // stop − KEEPALIVE_MS + TTL.
    let etcd_pid = etcd_pid(&etcd.url);
    signal(etcd_pid, "STOP");
    let stopped = Instant::now();
    let earliest_expiry = Duration::from_millis(TTL_MS - KEEPALIVE_MS);
    while !dead(pid) {
        assert!(
            stopped.elapsed() < earliest_expiry,
            "the VMM (pid {pid}) still runs {:?} after etcd stopped answering",
            stopped.elapsed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let fenced_after = stopped.elapsed();
    let st = status(&listen);
    assert_eq!(st["fenced"], true, "{st}");
    assert!(vm_of(&st, "v1").is_none(), "{st}");
    let (_, metrics) = http("GET", &listen, "/metrics", None);
    assert!(
        metrics
            .lines()
            .any(|l| l == "tern_agent_self_fences_total 1"),
        "{metrics}"
    );
    eprintln!("self-fenced {fenced_after:?} after etcd stopped (TTL {TTL_MS} ms)");
    // Keep etcd stopped past the TTL: when it answers again, the lease has expired.
    std::thread::sleep(Duration::from_millis(TTL_MS + 500).saturating_sub(stopped.elapsed()));
    signal(etcd_pid, "CONT");

    // Back in etcd, the host registers again under a new lease and runs VMs again; commands
    // addressed to the old registration are refused.
    wait_for("a new registration", Duration::from_secs(20), || {
        let st = status(&listen);
        st["lease"].as_u64().is_some_and(|l| l != lease) && st["fenced"] == false
    });
    let lease2 = status(&listen)["lease"].as_u64().unwrap();
    let r = command(&listen, 10, 2, lease, vm("v2"));
    assert_eq!(r["reply"]["result"], "failed", "{r}");
    let r = command(&listen, 11, 1, lease2, vm("v2"));
    assert_eq!(r["reply"]["result"], "done", "{r}");
    let pid2 = wait_running(&listen, dir.path(), "v2");

    // SIGKILL the agent: its VMM dies with it, and its record vanishes once the lease expires.
    signal(agent.id() as i32, "KILL");
    let killed = Instant::now();
    let _ = agent.0.wait();
    wait_for(
        "the VMM to die with its agent",
        Duration::from_secs(2),
        || dead(pid2),
    );
    let deadline = Duration::from_millis(TTL_MS + 1_000);
    while etcd_get(&etcd.url, &key).is_some() {
        assert!(
            killed.elapsed() < deadline,
            "the host record outlived the lease: {:?} after the kill",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("host record gone {:?} after SIGKILL", killed.elapsed());
}

#[test]
fn the_agent_refuses_an_unknown_power_model() {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["agent", "--host-id", "h", "--etcd", "http://127.0.0.1:1"])
        .args(["--listen", "127.0.0.1:0", "--power-model", "pentium-4"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"pentium-4\"") && err.contains("hp-ml110-g5"),
        "{err}"
    );
}

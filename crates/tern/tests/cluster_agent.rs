//! `tern agent` against a real etcd and real VMMs: the host record under a lease, a VM started by an
//! HTTP command, the generation fence, self-fencing when etcd stops answering, and the record and
//! VMMs gone after the agent is SIGKILLed. Needs root, KVM and the etcd binary.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::{command, http, start_vm_body, status, vm_of};
use serde_json::{Value, json};
use tern_test_support::{ChildGuard, Etcd, free_port, require_kvm, wait_for};

const TTL_MS: u64 = 5_000;
/// Keep-alives go out every TTL/3.
const KEEPALIVE_MS: u64 = TTL_MS / 3;

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
        .args([
            "--lease-ttl-ms",
            &TTL_MS.to_string(),
            "--report-interval-ms",
            "300",
        ])
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
    start_vm_body(name, "tern.hb_ms=50")
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

    // A body that is not a command: 400 with a clear error, nothing done.
    let (code, text) = http(
        "POST",
        &listen,
        "/v1/agent/commands",
        Some(&json!({"generation": 10, "id": 9, "body": {"op": "launch"}})),
    );
    assert_eq!(code, 400, "{text}");
    let err: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(err["error"], "bad command", "{err}");
    assert!(err["detail"].as_str().unwrap().contains("launch"), "{err}");

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
        "tern_agent_vm_restarts_total 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

    // A VMM that dies unasked is started again by the restart policy.
    signal(pid as i32, "KILL");
    wait_for("the VM restarted", Duration::from_secs(15), || {
        vm_of(&status(&listen), "v1")
            .is_some_and(|v| v["state"] == "running" && v["pid"].as_u64().is_some_and(|p| p != pid))
    });
    let pid = wait_running(&listen, dir.path(), "v1");
    let (_, metrics) = http("GET", &listen, "/metrics", None);
    assert!(
        metrics
            .lines()
            .any(|l| l == "tern_agent_vm_restarts_total 1"),
        "{metrics}"
    );

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

    // Started again, it registers anew, runs nothing, and still refuses the generation below the
    // highest it saw before the crash.
    let _again = start_agent(&etcd, &host, &listen, dir.path());
    wait_for(
        "the restarted agent's lease",
        Duration::from_secs(15),
        || status(&listen)["lease"].as_u64().is_some(),
    );
    let st = status(&listen);
    assert_eq!(st["generation_seen"], 11, "{st}");
    assert_eq!(st["vms"], json!([]), "{st}");
    let lease3 = st["lease"].as_u64().unwrap();
    assert!(lease3 != lease && lease3 != lease2);
    let r = command(&listen, 10, 3, lease3, json!({"op": "ping"}));
    assert_eq!(
        r["reply"],
        json!({"result": "stale_generation", "seen": 11}),
        "{r}"
    );
}

/// Puts `key` = `value` into etcd.
fn etcd_put(url: &str, key: &str, value: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([url], None).await.unwrap();
        c.put(key, value, None).await.unwrap();
    });
}

/// A stand-in for the leading controller's report endpoint: every report body it receives.
fn fake_leader() -> (String, std::sync::mpsc::Receiver<(String, Value)>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head, len) = loop {
                let n = conn.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break (String::new(), 0);
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_string();
                    buf.drain(..i + 4);
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    break (head, len);
                }
            };
            while buf.len() < len {
                let n = conn.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                && tx.send((path, v)).is_err()
            {
                return;
            }
        }
    });
    (url, rx)
}

#[test]
fn two_agents_move_a_vm_live_and_report_telemetry_to_the_leader() {
    require_kvm();
    let etcd = Etcd::start();
    let (leader, reports) = fake_leader();
    etcd_put(&etcd.url, "/tern/leader/694d0000000000a1", &leader);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ha, hb) = (
        format!("mig-a-{}", std::process::id()),
        format!("mig-b-{}", std::process::id()),
    );
    let (la, lb) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let _a = start_agent(&etcd, &ha, &la, da.path());
    let mut b = start_agent(&etcd, &hb, &lb, db.path());
    let lease_of = |addr: &str| {
        wait_for("a lease", Duration::from_secs(15), || {
            status(addr)["lease"].as_u64().is_some()
        });
        status(addr)["lease"].as_u64().unwrap()
    };
    let (lease_a, lease_b) = (lease_of(&la), lease_of(&lb));

    let r = command(&la, 5, 1, lease_a, vm("m1"));
    assert_eq!(r["reply"]["result"], "done", "{r}");
    let pid_a = wait_running(&la, da.path(), "m1");
    let hb_on_a = last_hb(&da.path().join("run/m1.console"));

    // The target listens on a port of its own address; the source moves the VM there.
    let mut receive = vm("m1");
    receive["op"] = json!("receive");
    let r = command(&lb, 5, 1, lease_b, receive);
    assert_eq!(r["reply"]["result"], "done", "{r}");
    let listen = r["reply"]["listen"]
        .as_str()
        .expect("the receiver's address")
        .to_string();
    assert!(listen.starts_with("127.0.0.1:"), "{listen}");
    assert_eq!(vm_of(&status(&lb), "m1").unwrap()["state"], "receiving");
    let out = json!({"op": "migrate_out", "vm": "m1", "to": listen, "disk_successor": null});
    let r = command(&la, 5, 2, lease_a, out);
    assert_eq!(r["reply"]["result"], "done", "{r}");
    assert!(
        r["reply"]["report"].is_object(),
        "the VMM's migration report: {r}"
    );
    assert_eq!(r["reply"]["vm_state"], "absent", "{r}");
    wait_for("the source VMM to end", Duration::from_secs(10), || {
        dead(pid_a)
    });
    assert!(vm_of(&status(&la), "m1").is_none());
    let q = command(&la, 5, 3, lease_a, json!({"op": "query", "vm": "m1"}));
    assert_eq!(q["reply"]["vm_state"], "absent", "{q}");
    // The target runs it, and the guest goes on counting where it was.
    let pid_b = wait_running(&lb, db.path(), "m1");
    assert!(!dead(pid_b));
    assert!(last_hb(&db.path().join("run/m1.console")) > hb_on_a);

    // Reports reach the leader named in etcd, with the VM's telemetry from the target.
    let deadline = Instant::now() + Duration::from_secs(20);
    let report = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (path, r) = reports
            .recv_timeout(left)
            .expect("a report from the target naming m1 running, with telemetry");
        assert_eq!(path, "/v1/agent/reports");
        let running = r["vms"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "m1"))
            .is_some_and(|v| v["state"] == "running" && v["cpu_utilization"].is_number());
        if r["host"] == hb.as_str() && running {
            break r;
        }
    };
    assert_eq!(report["generation_seen"], 5, "{report}");
    assert!(report["seq"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["last_command_id"], 1, "{report}");
    let m1 = &report["vms"][0];
    let util = m1["cpu_utilization"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&util), "{report}");
    assert!(m1["rss_mib"].as_u64().is_some_and(|m| m > 0), "{report}");
    // the guest's own resident RAM: some of it touched, far less than the VMM's RSS and its size
    let guest_kib = m1["guest_resident_kib"]
        .as_u64()
        .expect("guest resident RAM");
    assert!(guest_kib > 0, "{report}");
    assert!(
        guest_kib < m1["rss_mib"].as_u64().unwrap() * 1024,
        "{report}"
    );
    let host_util = report["cpu_utilization"].as_f64().expect("host CPU");
    assert!((0.0..=1.0).contains(&host_util), "{report}");

    // A VM whose vCPU never halts shows up busy in the source host's reports; a stop ends it.
    let mut busy = vm("busy");
    busy["spec"]["cmdline"] = json!("tern.hb_ms=50 tern.dirty_mib=4 tern.dirty_rate=0");
    let r = command(&la, 5, 4, lease_a, busy);
    assert_eq!(r["reply"]["result"], "done", "{r}");
    let pid_busy = wait_running(&la, da.path(), "busy");
    let deadline = Instant::now() + Duration::from_secs(20);
    let util = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, r) = reports
            .recv_timeout(left)
            .expect("a report naming the busy VM");
        let util = r["vms"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "busy"))
            .and_then(|v| v["cpu_utilization"].as_f64());
        if r["host"] == ha.as_str()
            && let Some(u) = util
        {
            break u;
        }
    };
    assert!(
        util > 0.2 && util <= 1.0,
        "a spinning vCPU measured at {util}"
    );
    let r = command(&la, 5, 5, lease_a, json!({"op": "stop", "vm": "busy"}));
    assert_eq!(r["reply"]["result"], "done", "{r}");
    wait_for("the stopped VMM to end", Duration::from_secs(10), || {
        dead(pid_busy)
    });
    wait_for(
        "the stopped VM to leave the status",
        Duration::from_secs(5),
        || vm_of(&status(&la), "busy").is_none(),
    );
    eprintln!("reports: m1 on the target {report}; busy VM at {util:.2}");

    // SIGTERM: the agent kills its VMMs and revokes its lease, so its record goes at once.
    signal(b.id() as i32, "TERM");
    let termed = Instant::now();
    wait_for(
        "the VMM to end with a stopped agent",
        Duration::from_secs(3),
        || dead(pid_b),
    );
    wait_for(
        "the revoked record to go",
        Duration::from_millis(TTL_MS / 2),
        || etcd_get(&etcd.url, &format!("/tern/hosts/{hb}")).is_none(),
    );
    let code = b.0.wait().unwrap();
    assert!(code.success(), "a stopped agent exits 0: {code}");
    eprintln!(
        "agent stopped, record revoked {:?} after SIGTERM",
        termed.elapsed()
    );
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

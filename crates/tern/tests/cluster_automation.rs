//! The automation loop end to end: `tern cluster up` (real etcd, network-namespace hosts, an
//! agent and a volume node per host, a controller), three test-guest VMs spread over the three
//! hosts at low load, and an eager policy in manual mode set through `tern cluster policy set`.
//! A plan to drain a host appears in `GET /v1/plans` and nothing moves; `tern cluster plan apply`
//! runs its migrations live (the guests' heartbeats go on from where they were, no reboot), the
//! drained host ends empty, and each migration task carries its predicted and measured cost. The
//! hosts have no power drivers: a power-off in the plan would fail naming that, after the moves.
//!
//! Needs root, KVM and etcd; fails loudly without them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use tern_api::cluster::{HostInfo, VmInfo, VmState};
use tern_test_support::{require_kvm, require_tools, wait_for};

fn tern() -> &'static str {
    env!("CARGO_BIN_EXE_tern")
}

#[derive(Debug, Clone, Deserialize)]
struct LabHost {
    name: String,
    runtime_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
struct UpInfo {
    name: String,
    controllers: Vec<String>,
    etcd: String,
    hosts: Vec<LabHost>,
    state_file: PathBuf,
}

/// A running `tern cluster up`; dropping it takes the cluster down.
struct Lab {
    child: Option<Child>,
    info: UpInfo,
    _scratch: tempfile::TempDir,
    stderr: PathBuf,
}

impl Lab {
    /// `tern cluster up --hosts HOSTS --controllers CONTROLLERS`, named after `tag` and this process.
    fn up(tag: &str, hosts: usize, controllers: usize) -> Lab {
        require_kvm();
        require_tools(&["etcd", "ip"]);
        let name = format!("e{tag}{}", std::process::id() % 100_000);
        let scratch = tempfile::tempdir().unwrap();
        let stderr = scratch.path().join("up.stderr");
        let mut child = Command::new(tern())
            .args(["cluster", "up", "--name", &name, "--json"])
            .args(["--hosts", &hosts.to_string()])
            .args(["--controllers", &controllers.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("tern cluster up starts");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        let info: UpInfo = match serde_json::from_str(line.trim()) {
            Ok(i) => i,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tern cluster up did not print its JSON line ({line:?}); stderr:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
        };
        assert_eq!(info.name, name);
        assert_eq!(info.hosts.len(), hosts);
        assert_eq!(info.controllers.len(), controllers);
        assert!(info.etcd.starts_with("http://127.0.0.1:"), "{}", info.etcd);
        Lab {
            child: Some(child),
            info,
            _scratch: scratch,
            stderr,
        }
    }

    /// Sends a request to whichever controller leads (a stand-by answers 503); a leader that is
    /// still gathering its hosts' first reports ("not ready", 503) is asked again for up to 20 s.
    fn api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let start = Instant::now();
        loop {
            let r = self.api_once(method, path, body);
            if r.0 == 503 && r.1.contains("not ready") && start.elapsed() < Duration::from_secs(20)
            {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            return r;
        }
    }

    fn api_once(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let body = body.map(|b| b.to_string());
        let mut last = (0, String::from("no controller answered"));
        for c in &self.info.controllers {
            match http(None, c, method, path, body.as_deref()) {
                Ok((503, b)) => last = (503, b),
                Ok(r) => return r,
                Err(e) => last = (0, e),
            }
        }
        last
    }

    fn vms(&self) -> Vec<VmInfo> {
        let (st, body) = self.api("GET", "/v1/vms", None);
        if st != 200 {
            return Vec::new();
        }
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /v1/vms: {e}: {body}"))
    }

    fn vm(&self, name: &str) -> Option<VmInfo> {
        self.vms().into_iter().find(|v| v.name == name)
    }

    fn hosts(&self) -> Vec<HostInfo> {
        let (st, body) = self.api("GET", "/v1/hosts", None);
        assert_eq!(st, 200, "GET /v1/hosts: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// A 1-vCPU, 64 MiB test guest with a heartbeat every 200 ms, placed by the controller.
    fn create(&self, name: &str) -> VmInfo {
        let body = json!({
            "name": name, "vcpus": 1, "memory_mib": 64, "kernel": "builtin:testguest",
            "cmdline": "tern.hb_ms=200",
        });
        let (st, body) = self.api("POST", "/v1/vms", Some(&body));
        assert!(st == 200 || st == 201, "POST /v1/vms {name}: {st} {body}");
        serde_json::from_str(&body).unwrap()
    }

    fn wait_running(&self, names: &[&str], timeout: Duration) -> Vec<VmInfo> {
        let start = Instant::now();
        loop {
            let last = self.vms();
            let ok = names.iter().all(|n| {
                last.iter()
                    .any(|v| v.name == *n && v.state == VmState::Running && v.host.is_some())
            });
            if ok {
                return last;
            }
            assert!(
                start.elapsed() < timeout,
                "{names:?} not all running within {timeout:?}: {last:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn host(&self, name: &str) -> &LabHost {
        self.info.hosts.iter().find(|h| h.name == name).unwrap()
    }

    fn console(&self, host: &str, vm: &str) -> String {
        std::fs::read_to_string(self.host(host).runtime_dir.join(format!("{vm}.console")))
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        let dir = self.info.state_file.parent().unwrap().join("logs");
        let mut s = format!(
            "--- cluster up stderr:\n{}",
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        );
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s += &format!(
                "\n--- {}:\n{}",
                e.path().display(),
                lines[lines.len().saturating_sub(12)..].join("\n")
            );
        }
        s
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new(tern())
                .args(["cluster", "down", "--name", &self.info.name])
                .status();
        }
    }
}

/// One HTTP/1.1 request (`Connection: close`), from inside namespace `ns` if given.
fn http(
    ns: Option<&str>,
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let addr: SocketAddr = host.parse().map_err(|e| format!("{base}: {e}"))?;
    let stream = match ns {
        Some(ns) => tern_netlab::ns::connect_from(ns, addr, Duration::from_secs(2)),
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
    }
    .map_err(|e| format!("connect {base}: {e}"))?;
    let mut stream = stream;
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(req.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out += &rest[..n];
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn hb_seqs(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter(|l| l.starts_with("HB "))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("seq=")?.parse().ok())
        })
        .collect()
}

/// `tern cluster ARGS --controller URL`: (exit status, stdout, stderr).
fn cli(lab: &Lab, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(tern())
        .arg("cluster")
        .args(args)
        .args(["--controller", &lab.info.controllers[0]])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn get(lab: &Lab, path: &str) -> Value {
    let (st, body) = lab.api("GET", path, None);
    assert_eq!(st, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn a_manual_plan_drains_a_host_live_once_applied() {
    let started = Instant::now();
    let lab = Lab::up("aut", 3, 1);
    let hosts: Vec<String> = lab.info.hosts.iter().map(|h| h.name.clone()).collect();
    let names = ["au-1", "au-2", "au-3"];
    for n in names {
        lab.create(n);
    }
    lab.wait_running(&names, Duration::from_secs(60));
    // Placement packs; spread the VMs one per host with operator migrations.
    for (n, h) in names.iter().zip(&hosts) {
        if lab.vm(n).unwrap().host.as_deref() == Some(h.as_str()) {
            continue;
        }
        let (st, body) = lab.api(
            "POST",
            &format!("/v1/vms/{n}/migrate"),
            Some(&json!({"to": h})),
        );
        assert_eq!(st, 202, "{body}");
        wait_for("the spreading move", Duration::from_secs(30), || {
            lab.vm(n).is_some_and(|v| {
                v.host.as_deref() == Some(h.as_str()) && v.state == VmState::Running
            })
        });
    }
    let tasks_before = get(&lab, "/v1/tasks").as_array().unwrap().len();

    // An eager manual policy through the CLI; an out-of-range knob is refused naming its range.
    let (rc, _, err) = cli(&lab, &["policy", "set", "--aggressiveness", "9"]);
    assert_ne!(rc, 0);
    assert!(
        err.contains("aggressiveness = 9 is out of range: allowed 1..=5"),
        "{err}"
    );
    let (rc, out, err) = cli(
        &lab,
        &[
            "policy",
            "set",
            "--automation",
            "manual",
            "--aggressiveness",
            "5",
            "--interval-s",
            "2",
            "--hold-s",
            "0",
            "--cooldown-s",
            "0",
            "--min-improvement-pct",
            "0",
            "--power",
            "true",
            "--off-hold-s",
            "0",
            "--json",
        ],
    );
    assert_eq!(rc, 0, "{err}");
    let p: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (p["automation"].as_str(), p["aggressiveness"].as_u64()),
        (Some("manual"), Some(5))
    );

    // A plan to drain a host is proposed; nothing moves on its own. (Each round makes a fresh
    // plan that replaces the one before, so the newest proposed plan is the one to apply.)
    let newest_proposed = || {
        let start = Instant::now();
        loop {
            let plans = get(&lab, "/v1/plans");
            if let Some(p) = plans
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["state"] == "proposed")
            {
                return p.clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no plan proposed: {plans}\n{}",
                lab.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let first = newest_proposed();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        get(&lab, "/v1/tasks").as_array().unwrap().len(),
        tasks_before,
        "manual mode moved a VM"
    );
    let (rc, out, _) = cli(&lab, &["plans"]);
    assert_eq!(rc, 0);
    assert!(out.contains("proposed"), "{out}");
    assert!(
        out.contains(&format!(
            "migrate {}",
            first["actions"][0]["vm"].as_str().unwrap_or("?")
        )),
        "{out}"
    );

    let mut attempts = 0;
    let (id, moves, seq_before) = loop {
        let plan = newest_proposed();
        let id = plan["id"].as_u64().unwrap();
        let moves: Vec<Value> = plan["actions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == "migrate")
            .cloned()
            .collect();
        assert!(!moves.is_empty(), "{plan}");
        // Heartbeats before the apply, on the hosts to be drained. (A target's console file may
        // hold an earlier stay of the VM there: only what is written after its length counts.)
        let seq_before: Vec<(String, String, u64, usize)> = moves
            .iter()
            .map(|m| {
                let (vm, from) = (m["vm"].as_str().unwrap(), m["from"].as_str().unwrap());
                let last = *hb_seqs(&lab.console(from, vm)).last().expect("heartbeats");
                let seen = lab.console(m["to"].as_str().unwrap(), vm).len();
                (vm.to_string(), from.to_string(), last, seen)
            })
            .collect();
        let (rc, out, err) = cli(&lab, &["plan", "apply", &id.to_string()]);
        if rc == 0 {
            break (id, moves, seq_before);
        }
        // Replaced by the next round's plan between the read and the apply: take that one.
        attempts += 1;
        assert!(attempts < 5 && err.contains("is superseded"), "{out}{err}");
    };
    let drained: Vec<String> = moves
        .iter()
        .map(|m| m["from"].as_str().unwrap().to_string())
        .collect();

    // Its migrations run live; the drained hosts end empty.
    let start = Instant::now();
    let done = loop {
        let p = get(&lab, &format!("/v1/plans/{id}"));
        let moved = p["actions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == "migrate")
            .all(|a| a["status"] == "done");
        if moved && p["state"] != "applying" {
            break p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "plan {id} not carried out: {p}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    match done["state"].as_str() {
        Some("applied") => {}
        Some("failed") => assert!(
            done["detail"]
                .as_str()
                .unwrap_or("")
                .contains("no power driver for host"),
            "{done}"
        ),
        s => panic!("plan {id} ended {s:?}: {done}"),
    }
    for h in &drained {
        let host = lab.hosts().into_iter().find(|x| x.name == *h).unwrap();
        assert!(host.vms.is_empty(), "{h} not drained: {host:?}");
    }
    for (vm, from, last, seen) in &seq_before {
        let v = lab.vm(vm).unwrap();
        let to = v.host.clone().unwrap();
        assert_ne!(&to, from, "{v:?}");
        assert_eq!(v.restarts, 0, "{v:?}");
        let after = || {
            lab.console(&to, vm)
                .get(*seen..)
                .unwrap_or_default()
                .to_string()
        };
        wait_for("heartbeats on the target", Duration::from_secs(20), || {
            hb_seqs(&after()).len() >= 2
        });
        let target = after();
        assert!(
            !target.contains("TERN-GUEST up"),
            "{vm} booted again on {to}:\n{target}"
        );
        assert!(
            hb_seqs(&target)[0] > *last,
            "{vm}'s heartbeats did not go on: {target}"
        );
    }
    // Each of the plan's migration tasks has its predicted and measured cost.
    let tasks = get(&lab, "/v1/tasks");
    let new = &tasks.as_array().unwrap()[tasks_before..];
    assert_eq!(new.len(), moves.len(), "{tasks}");
    for t in new {
        let t = get(&lab, &format!("/v1/tasks/{}", t["id"]));
        assert_eq!(t["state"], "succeeded", "{t}");
        assert!(t["predicted"]["time_s"].as_f64().unwrap() > 0.0, "{t}");
        assert!(t["actual"]["time_s"].as_f64().unwrap() > 0.0, "{t}");
        assert!(t["actual"]["bytes"].as_u64().unwrap() > 0, "{t}");
        eprintln!(
            "task {}: {} predicted {:.2} s / {} B / pause {:.0} ms, measured {:.2} s / {} B / pause {:.0} ms",
            t["id"],
            t["vm"],
            t["predicted"]["time_s"].as_f64().unwrap(),
            t["predicted"]["bytes"],
            t["predicted"]["downtime_ms"].as_f64().unwrap_or(0.0),
            t["actual"]["time_s"].as_f64().unwrap(),
            t["actual"]["bytes"],
            t["actual"]["downtime_ms"].as_f64().unwrap_or(0.0),
        );
    }
    let metrics = lab.api("GET", "/metrics", None).1;
    assert!(
        metrics.contains("tern_automation_plans_proposed_total"),
        "{metrics}"
    );
    eprintln!("plan {id} ended {}: {}", done["state"], done["detail"]);
    eprintln!("cluster_automation took {:?}", started.elapsed());
}

//! `tern controller` on a real etcd: two controllers, one leads (its generation in `/metrics`),
//! the other answers the API with 503 naming the leader's URL. The leader creates a VM (its desired
//! state goes to etcd in a transaction guarded by the leader key) and puts a host into
//! maintenance; then it is SIGKILLed, and the other controller leads within the election TTL + 5 s
//! with a higher generation and the same desired state. `tern cluster` talks to both. Needs root
//! and the etcd binary (fails loudly without them).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tern_test_support::{ChildGuard, Etcd, free_port, require_root, wait_for};

const TTL_MS: u64 = 3_000;

/// One request: status and body (JSON, or the text as a JSON string; `null` if empty).
fn http(method: &str, url: &str, body: Option<&Value>) -> Option<(u16, Value)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let method: hyper::Method = method.parse().unwrap();
    let body = body.map(|b| b.to_string().into_bytes());
    let r = rt
        .block_on(tern_controller::shell::http::request(
            method,
            url,
            body,
            Duration::from_secs(10),
        ))
        .ok()?;
    let v = if r.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&r.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.body).into_owned()))
    };
    Some((r.status, v))
}

fn metric(url: &str, name: &str) -> Option<u64> {
    let (_, text) = http("GET", &format!("{url}/metrics"), None)?;
    text.as_str()?
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Etcd operations for the test's own use (a host record, reading desired state).
fn with_etcd<T>(url: &str, f: impl AsyncFnOnce(etcd_client::Client) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = etcd_client::Client::connect([url], None).await.unwrap();
        f(c).await
    })
}

fn controller(etcd: &str, port: u16, log: &std::path::Path) -> ChildGuard {
    let child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["controller", "--etcd", etcd])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--lease-ttl-ms",
            &TTL_MS.to_string(),
            "--ha-reserve-hosts",
            "0",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("tern controller starts");
    ChildGuard(child)
}

/// Each host's agent reports to the leader (empty, as agents do every second): a new leader
/// places nothing before it has heard from every host.
fn report_all(leader: &str, generation: u64, seq: u64) {
    for h in ["h1", "h2"] {
        let report = json!({"host": h, "generation_seen": generation, "seq": seq,
            "last_command_id": 0, "vms": [], "cpu_utilization": null});
        let (st, v) = http("POST", &format!("{leader}/v1/agent/reports"), Some(&report)).unwrap();
        assert_eq!(st, 204, "{v}");
    }
}

fn tern_cluster(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("cluster")
        .args(args)
        .env_remove("TERN_CONTROLLER")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_other_controller_takes_over_within_the_ttl_with_a_higher_generation_and_the_same_desired_state()
 {
    require_root();
    let etcd = Etcd::start();
    let logs = tempfile::tempdir().unwrap();
    // A host as its agent registers it (nothing listens at its agent URL: commands to it fail,
    // which the controller handles; this test is about the controllers).
    for h in ["h1", "h2"] {
        let record = json!({
            "name": h,
            "agent_url": format!("http://127.0.0.1:{}", free_port()),
            "capacity": {"cores": 4, "memory_mib": 4096, "power_model": "hp-ml110-g5",
                         "volume_node": null, "volume_node_id": null},
            "lease": 0,
        });
        with_etcd(&etcd.url, async |mut c| {
            c.put(format!("/tern/hosts/{h}"), record.to_string(), None)
                .await
                .unwrap()
        });
    }
    let ports = [free_port(), free_port()];
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let mut procs: Vec<Option<ChildGuard>> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Some(controller(
                &etcd.url,
                *p,
                &logs.path().join(format!("c{i}.log")),
            ))
        })
        .collect();
    let log = |i: usize| std::fs::read_to_string(logs.path().join(format!("c{i}.log"))).unwrap();

    // Exactly one leads.
    let mut leader = None;
    wait_for("one controller to lead", Duration::from_secs(20), || {
        let leading: Vec<usize> = (0..2)
            .filter(|i| metric(&urls[*i], "tern_controller_leader") == Some(1))
            .collect();
        leader = leading.first().copied().filter(|_| leading.len() == 1);
        leader.is_some()
    });
    let l = leader.unwrap();
    let f = 1 - l;
    let gen1 = metric(&urls[l], "tern_controller_generation").unwrap();
    assert!(gen1 > 0);
    assert_eq!(metric(&urls[f], "tern_controller_generation"), Some(0));
    wait_for(
        "the leader to see both hosts",
        Duration::from_secs(10),
        || {
            http("GET", &format!("{}/v1/hosts", urls[l]), None)
                .is_some_and(|(s, v)| s == 200 && v.as_array().is_some_and(|a| a.len() == 2))
        },
    );
    report_all(&urls[l], gen1, 1);

    // The follower refuses with 503 and names the leader.
    wait_for(
        "the follower to know the leader",
        Duration::from_secs(10),
        || {
            let (st, v) = http("GET", &format!("{}/v1/vms", urls[f]), None).unwrap();
            assert_eq!(st, 503, "{v}");
            assert_eq!(v["error"], "not the leader", "{v}");
            v["detail"].as_str().unwrap().contains(&urls[l])
        },
    );

    // Desired state through the CLI (asked at the follower: it retries at the leader).
    let (ok, out, err) = tern_cluster(&[
        "vm",
        "create",
        "web-1",
        "--vcpus",
        "1",
        "--memory-mib",
        "64",
        "--controller",
        &urls[f],
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("VM web-1 created"), "{out}");
    let (ok, out, err) = tern_cluster(&[
        "host",
        "maintenance",
        "h2",
        "--enter",
        "--controller",
        &urls[l],
    ]);
    assert!(ok, "{out}{err}");
    // A clear error from the ErrorBody, and nothing created.
    let (ok, out, err) = tern_cluster(&["vm", "create", "Bad_Name", "--controller", &urls[l]]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("invalid input: invalid VM name \"Bad_Name\""),
        "{err}"
    );
    assert!(err.contains("HTTP 400"), "{err}");
    let stored = with_etcd(&etcd.url, async |mut c| {
        let r = c
            .get(
                "/tern/desired/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        r.kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap().to_string())
            .collect::<Vec<_>>()
    });
    assert_eq!(
        stored,
        ["/tern/desired/maintenance/h2", "/tern/desired/vms/web-1"],
        "what the leader stored"
    );

    // SIGKILL the leader: the other leads within TTL + 5 s, with a higher generation.
    let killed = Instant::now();
    procs[l] = None;
    let mut gen2 = 0;
    wait_for(
        "the other controller to lead",
        Duration::from_millis(TTL_MS + 5_000),
        || {
            gen2 = metric(&urls[f], "tern_controller_generation").unwrap_or(0);
            gen2 > 0
        },
    );
    let failover = killed.elapsed();
    eprintln!(
        "controller fail-over: {:.2} s (election TTL {TTL_MS} ms)",
        failover.as_secs_f64()
    );
    assert!(gen2 > gen1, "generation {gen2} after {gen1}");
    assert_eq!(metric(&urls[f], "tern_controller_leader"), Some(1));
    report_all(&urls[f], gen2, 2);

    // The desired state written by the first leader survives.
    let (st, vms) = http("GET", &format!("{}/v1/vms", urls[f]), None).unwrap();
    assert_eq!(st, 200, "{vms}");
    let names: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web-1"], "{vms}\n{}", log(f));
    assert_eq!(vms[0]["spec"]["memory_mib"], 64);
    let (_, h2) = http("GET", &format!("{}/v1/hosts/h2", urls[f]), None).unwrap();
    assert_eq!(h2["maintenance"], true, "{h2}");
    let (ok, out, err) = tern_cluster(&["vms", "--controller", &urls[f]]);
    assert!(ok, "{err}");
    assert!(out.starts_with("VM ") && out.contains("web-1"), "{out}");
    let (ok, out, err) = tern_cluster(&["hosts", "--json", "--controller", &urls[f]]);
    assert!(ok, "{err}");
    let hosts: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(hosts.as_array().unwrap().len(), 2, "{out}");
    // The new leader writes under its own key: the deletion reaches etcd (the record is gone, or
    // kept with `run: false` until its host, unreachable here, confirms the VM is stopped).
    let (ok, out, err) = tern_cluster(&["vm", "rm", "web-1", "--controller", &urls[f]]);
    assert!(ok, "{out}{err}");
    let left = with_etcd(&etcd.url, async |mut c| {
        let r = c.get("/tern/desired/vms/web-1", None).await.unwrap();
        r.kvs()
            .first()
            .map(|kv| kv.value_str().unwrap().to_string())
    });
    if let Some(record) = left {
        let v: Value = serde_json::from_str(&record).unwrap();
        assert_eq!(v["run"], false, "{record}");
    }

    // A third controller joins; SIGTERM the leader: it resigns and revokes its lease, so the third
    // leads well before the TTL would have run out, and the stopped one exits cleanly.
    let p3 = free_port();
    let url3 = format!("http://127.0.0.1:{p3}");
    let _c3 = controller(&etcd.url, p3, &logs.path().join("c2.log"));
    wait_for(
        "the third controller to serve",
        Duration::from_secs(10),
        || metric(&url3, "tern_controller_leader") == Some(0),
    );
    let mut leader = procs[f].take().unwrap();
    let stopped = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(leader.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut gen3 = 0;
    wait_for(
        "the third controller to lead",
        Duration::from_millis(TTL_MS),
        || {
            gen3 = metric(&url3, "tern_controller_generation").unwrap_or(0);
            gen3 > 0
        },
    );
    let handover = stopped.elapsed();
    eprintln!("hand-over on SIGTERM: {:.2} s", handover.as_secs_f64());
    assert!(gen3 > gen2, "generation {gen3} after {gen2}");
    let status = leader.0.wait().unwrap();
    assert!(
        status.success(),
        "the stopped controller: {status}\n{}",
        log(f)
    );
    assert!(log(f).contains("resigning the leadership"), "{}", log(f));
    drop(procs);
}

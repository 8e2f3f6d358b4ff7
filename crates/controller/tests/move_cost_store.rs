//! What the controller learns of moves outlives its term: the overhead of a move beyond the
//! migration model and the measured links are kept in the store (`/tern/desired/automation/
//! move_cost`, etcd in a cluster; here the in-memory store with the same keys and guarded
//! writes), and a controller taking office predicts with what is stored there.
//!
//! Two fake agents (HTTP servers) carry out commands with a delay — the receiver listens after
//! 30 ms, a migration takes 60 ms — and report every 100 ms, so each move takes about 90 ms
//! against a model time of about 20 ms for the guest's 1 MiB resident.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use hyper::Method;
use serde_json::{Value, json};
use tern_api::agent::{
    AgentReport, Command, CommandBody, CommandReply, CommandResponse, ObservedState, ObservedVm,
};
use tern_automation::cost::OverheadEstimator;
use tern_controller::shell::automation::{MOVE_COST_KEY, StoredMoveCost};
use tern_controller::shell::http;

const HOSTS: [&str; 2] = ["h1", "h2"];

/// Which VM runs where, and each host's event counter and last command.
#[derive(Debug, Default)]
struct Table {
    vms: BTreeMap<String, String>,
    seq: BTreeMap<String, u64>,
    last_cmd: BTreeMap<String, u64>,
}

#[derive(Clone)]
struct Agent {
    host: String,
    table: Arc<Mutex<Table>>,
}

async fn command(State(a): State<Agent>, body: axum::body::Bytes) -> axum::Json<CommandResponse> {
    let cmd: Command = serde_json::from_slice(&body).expect("a command");
    let done = |listen: Option<String>, report: Option<Value>| CommandReply::Done {
        listen,
        report,
        vm_state: None,
    };
    let reply = match cmd.body {
        CommandBody::Receive { .. } => {
            tokio::time::sleep(Duration::from_millis(30)).await;
            done(Some(format!("fake:{}", a.host)), None)
        }
        CommandBody::MigrateOut { vm, to, .. } => {
            tokio::time::sleep(Duration::from_millis(60)).await;
            let target = to.trim_start_matches("fake:").to_string();
            a.table.lock().unwrap().vms.insert(vm, target);
            let report = json!({"total_ms": 50, "downtime_ms": 2, "rounds": 2,
                "bytes_sent": 254_190u64, "pages_zero_skipped": 0, "throttle_max_pct": 0.0,
                "converged": true, "outcome": "completed"});
            done(None, Some(report))
        }
        CommandBody::Start { spec, .. } => {
            a.table
                .lock()
                .unwrap()
                .vms
                .insert(spec.name, a.host.clone());
            done(None, None)
        }
        CommandBody::Stop { vm } => {
            a.table.lock().unwrap().vms.remove(&vm);
            done(None, None)
        }
        _ => done(None, None),
    };
    let mut t = a.table.lock().unwrap();
    let seq = {
        let s = t.seq.entry(a.host.clone()).or_default();
        *s += 1;
        *s
    };
    let last = t.last_cmd.entry(a.host.clone()).or_default();
    *last = (*last).max(cmd.id);
    axum::Json(CommandResponse { seq, reply })
}

async fn call(base: &str, method: Method, path: &str, body: Option<&Value>) -> (u16, Value) {
    let r = http::request(
        method,
        &format!("{base}{path}"),
        body.map(|b| b.to_string().into_bytes()),
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|e| panic!("{path}: {e}"));
    let v = serde_json::from_slice(&r.body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.body).into_owned()));
    (r.status, v)
}

async fn wait<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `/metrics` gauge's value.
fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

async fn metrics(base: &str) -> String {
    let (st, m) = call(base, Method::GET, "/metrics", None).await;
    assert_eq!(st, 200);
    m.as_str().unwrap().to_string()
}

/// Moves `vm` to the other host and waits for its task to succeed; the task.
async fn move_once(base: &str, vm: &str) -> Value {
    let (_, v) = call(base, Method::GET, &format!("/v1/vms/{vm}"), None).await;
    let to = if v["host"] == "h1" { "h2" } else { "h1" };
    let path = format!("/v1/vms/{vm}/migrate");
    let body = json!({ "to": to });
    // a leader still hearing from its hosts answers 503
    let id = wait("the move accepted", async || {
        match call(base, Method::POST, &path, Some(&body)).await {
            (202, r) => r["task"].as_u64(),
            (503, _) => None,
            (st, r) => panic!("migrate: {st} {r}"),
        }
    })
    .await;
    let t = wait("the move", async || {
        let (_, t) = call(base, Method::GET, &format!("/v1/tasks/{id}"), None).await;
        // the controller predicts each task at its next cycle (every 0.5 s)
        (t["state"] == "succeeded" && t["predicted"].is_object()).then_some(t)
    })
    .await;
    // back to running on its new host before the next move
    wait("the VM running", async || {
        let (_, v) = call(base, Method::GET, &format!("/v1/vms/{vm}"), None).await;
        (v["state"] == "running" && v["host"] == to).then_some(())
    })
    .await;
    t
}

#[tokio::test]
async fn the_learnt_move_cost_is_stored_and_a_new_term_predicts_with_the_stored_one() {
    let table = Arc::new(Mutex::new(Table::default()));
    let (shell, base) = common::in_memory_shell(&HOSTS, |host| {
        let agent = Agent {
            host: host.to_string(),
            table: Arc::clone(&table),
        };
        Router::new()
            .route("/v1/agent/commands", post(command))
            .with_state(agent)
    })
    .await;
    // the agents report every 100 ms: each VM running at 10 % with 1 MiB resident
    {
        let table = Arc::clone(&table);
        common::spawn_reports(
            shell.clone(),
            base.clone(),
            &HOSTS,
            move |host, generation| {
                let mut t = table.lock().unwrap();
                let seq = {
                    let s = t.seq.entry(host.to_string()).or_default();
                    *s += 1;
                    *s
                };
                let vms = t.vms.iter().filter(|(_, h)| h.as_str() == host);
                Some(AgentReport {
                    host: host.into(),
                    generation_seen: generation,
                    seq,
                    last_command_id: t.last_cmd.get(host).copied().unwrap_or(0),
                    vms: vms
                        .map(|(name, _)| ObservedVm {
                            name: name.clone(),
                            state: ObservedState::Running,
                            cpu_utilization: Some(0.1),
                            rss_mib: Some(1),
                            guest_resident_kib: Some(1024),
                            guest_nonzero_kib: None,
                            dirty_pages_per_sec: None,
                        })
                        .collect(),
                    cpu_utilization: Some(0.1),
                    parked_cores: None,
                })
            },
        );
    }
    let spec = json!({"name": "m", "vcpus": 1, "memory_mib": 64, "kernel": "builtin:testguest"});
    wait("the VM created", async || {
        match call(&base, Method::POST, "/v1/vms", Some(&spec)).await {
            (201, _) => Some(()),
            (503, _) => None,
            (st, v) => panic!("create: {st} {v}"),
        }
    })
    .await;
    wait("the VM running", async || {
        let (_, v) = call(&base, Method::GET, "/v1/vms/m", None).await;
        (v["state"] == "running").then_some(())
    })
    .await;

    // Three moves of about 90 ms each: the overhead is learnt and stored.
    let mut moves_s = Vec::new();
    for _ in 0..3 {
        let t = move_once(&base, "m").await;
        let a = t["actual"]["time_s"].as_f64().unwrap();
        assert!(a >= 0.09, "the fake agents take 90 ms: {t}");
        moves_s.push(a);
    }
    let store = shell.shared().store();
    let stored: StoredMoveCost = wait("the learnt move cost in the store", async || {
        let bytes = store.get(MOVE_COST_KEY).await.unwrap()?;
        let m: StoredMoveCost = serde_json::from_slice(&bytes).unwrap();
        (m.overhead.n == 3).then_some(m)
    })
    .await;
    let learnt = OverheadEstimator::restore(stored.overhead)
        .unwrap()
        .estimate();
    let slowest = moves_s.iter().copied().fold(0.0, f64::max);
    assert!(
        learnt.fixed_s > 0.04 && learnt.fixed_s < slowest,
        "{learnt:?} from moves of {moves_s:?} s"
    );
    let m = metrics(&base).await;
    assert_eq!(gauge(&m, "tern_migration_overhead_samples"), 3.0, "{m}");

    // Another controller's state in the store (7 moves with 0.5 s beyond the model): the next
    // term takes it over instead of what this process learnt.
    let mut other = OverheadEstimator::default();
    for _ in 0..7 {
        other.observe(0.1, 0.5);
    }
    let theirs = StoredMoveCost {
        overhead: other.state(),
        links: stored.links.clone(),
    };
    store
        .put_guarded(MOVE_COST_KEY, Some(serde_json::to_vec(&theirs).unwrap()))
        .await
        .unwrap();
    shell.step_down("test: fail-over").await;
    wait("a new term", async || {
        (shell.shared().core().generation() == Some(2)).then_some(())
    })
    .await;
    let m = metrics(&base).await;
    assert_eq!(gauge(&m, "tern_migration_overhead_samples"), 7.0, "{m}");
    let fixed = gauge(&m, "tern_migration_overhead_seconds{part=\"fixed\"}");
    assert!((fixed - 0.5).abs() < 1e-9, "{m}");
    // and the next move is predicted with it
    let t = move_once(&base, "m").await;
    let predicted = t["predicted"]["time_s"].as_f64().unwrap();
    assert!(predicted > 0.5, "{t}");
}

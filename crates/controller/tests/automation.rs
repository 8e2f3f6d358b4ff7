//! The automation loop wired into the controller, in-process: the real router, core and loop
//! behind the in-memory store, and three fake agents (HTTP servers that carry out commands on a
//! shared table of which VM runs where, and report every 100 ms as real agents do).
//!
//! * Knob validation: each bad field of `PUT /v1/policy` is a 400 naming the field and its range,
//!   and the policy in force (and stored) stays as it was; a good one is stored and in force.
//! * Manual mode only proposes: a plan to drain a host appears in `GET /v1/plans` and nothing
//!   moves until `POST /v1/plans/{id}/apply`, which runs its migrations as controller tasks
//!   (each with a predicted and, once done, a measured cost); the host ends empty.
//! * A plan computed before the cluster changed is refused with 409 (superseded), and so is a
//!   second apply of a plan no longer proposed; an unknown plan is 404.
//! * Full mode applies its own plan at once (no apply call), through the same tasks.
//! * A new leader (the in-memory shell taking office again) runs under the stored policy.
//! * A slow power-off (3 s) holds neither the cycle nor the apply call: the host is powering
//!   off meanwhile, and the driver's answer is reported when it comes.
//! * A power-off whose driver does not answer within its timeout fails its plan, with no cycle
//!   needed (none runs while a host is unheard), but the host stays powering off, out of the
//!   rounds' view, until the driver's late answer turns it off; or, its agent still reporting
//!   as long again, it is on again.
//! * A new leader that takes over mid power-off holds the host powering off, out of the
//!   rounds' view, and the former term's driver answer turns it off; so does one that takes
//!   over after the timeout, the power-off in doubt (its plan stored failed).
//! * A driver's error for a host that shut down (its agent gone), on time or late, leaves it
//!   off, not on.
//! * While hosts are being powered off (and once off), the core places nothing there: an
//!   operator's move to one is a 409 naming its power state, a move without a target finds no
//!   host, a VM pinned to one is refused, and new VMs go to the host left on.

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
    AgentReport, Command, CommandBody, CommandReply, CommandResponse, HostRecord, ObservedState,
    ObservedVm,
};
use tern_api::cluster::HostCapacity;
use tern_controller::shell::automation::POLICY_KEY;
use tern_controller::shell::{Shell, http};
use tern_power::{
    DriverKind, OffMode, OffOutcome, PowerDriver, PowerOffError, PowerOnError, PowerStatus,
    StatusError,
};

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];

/// Which VM runs where, as the fake agents see it, and each host's event counter.
#[derive(Debug, Default)]
struct Table {
    vms: BTreeMap<String, String>,
    seq: BTreeMap<String, u64>,
    last_cmd: BTreeMap<String, u64>,
    migrations: u64,
    /// Hosts powered off through their (fake) power driver: their agents are gone.
    off: Vec<String>,
    /// Each power-off's host, start and end, as the driver ran it.
    off_calls: Vec<(String, Instant, Instant)>,
    /// Hosts whose power-off started (and may be held at the gate).
    started: Vec<String>,
    /// Power-offs end in an error (after the gate), touching nothing.
    off_fails: bool,
}

/// A host's power driver that "powers off" a fake host: its agent stops and its registration
/// expires, as a real host's would.
#[derive(Debug)]
struct FakePower {
    host: String,
    table: Arc<Mutex<Table>>,
    expired: tokio::sync::mpsc::UnboundedSender<String>,
    /// Power-offs wait until this gate opens (a soft-off waiting for the host to shut down);
    /// `None`: they finish at once.
    gate: Option<Arc<Gate>>,
}

/// Holds power-offs until the test opens it.
#[derive(Debug, Default)]
struct Gate {
    open: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    /// Waits until the gate opens (at most a minute, so that a failed test cannot hang).
    fn pass(&self) {
        let open = self.open.lock().unwrap();
        drop(
            self.opened
                .wait_timeout_while(open, Duration::from_secs(60), |open| !*open)
                .unwrap(),
        );
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl PowerDriver for FakePower {
    fn host(&self) -> &str {
        &self.host
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Ipmi
    }
    fn power_on(&self) -> Result<(), PowerOnError> {
        self.table.lock().unwrap().off.retain(|h| *h != self.host);
        Ok(())
    }
    fn power_off(&self, _: OffMode) -> Result<OffOutcome, PowerOffError> {
        let started = Instant::now();
        self.table.lock().unwrap().started.push(self.host.clone());
        if let Some(gate) = &self.gate {
            gate.pass();
        }
        let mut t = self.table.lock().unwrap();
        if t.off_fails {
            return Err(PowerOffError::SoftTimeout {
                host: self.host.clone(),
                bmc: "fake".into(),
                waited_ms: 0,
            });
        }
        t.off.push(self.host.clone());
        t.off_calls
            .push((self.host.clone(), started, Instant::now()));
        drop(t);
        let _ = self.expired.send(self.host.clone());
        Ok(OffOutcome::Soft)
    }
    fn status(&self) -> Result<PowerStatus, StatusError> {
        let off = self.table.lock().unwrap().off.contains(&self.host);
        Ok(if off {
            PowerStatus::Off
        } else {
            PowerStatus::On
        })
    }
}

#[derive(Clone)]
struct Agent {
    host: String,
    table: Arc<Mutex<Table>>,
}

async fn command(State(a): State<Agent>, body: axum::body::Bytes) -> axum::Json<CommandResponse> {
    let cmd: Command = serde_json::from_slice(&body).expect("a command");
    let mut t = a.table.lock().unwrap();
    let done = |listen: Option<String>, report: Option<Value>, vm_state| CommandReply::Done {
        listen,
        report,
        vm_state,
    };
    let reply = match cmd.body {
        CommandBody::Ping | CommandBody::Resume { .. } => done(None, None, None),
        CommandBody::Start { spec, .. } => {
            t.vms.insert(spec.name, a.host.clone());
            done(None, None, None)
        }
        CommandBody::Stop { vm } => {
            t.vms.remove(&vm);
            done(None, None, None)
        }
        CommandBody::Receive { .. } => done(Some(format!("fake:{}", a.host)), None, None),
        CommandBody::MigrateOut { vm, to, .. } => {
            let target = to.trim_start_matches("fake:").to_string();
            t.vms.insert(vm, target);
            t.migrations += 1;
            let report = json!({"total_ms": 1200, "downtime_ms": 12, "rounds": 2,
                "bytes_sent": 70_000_000u64, "pages_zero_skipped": 0, "throttle_max_pct": 0.0,
                "converged": true, "outcome": "completed"});
            done(None, Some(report), None)
        }
        CommandBody::Query { vm } => {
            let here = t.vms.get(&vm) == Some(&a.host);
            let state = if here {
                ObservedState::Running
            } else {
                ObservedState::Absent
            };
            done(None, None, Some(state))
        }
    };
    let seq = {
        let s = t.seq.entry(a.host.clone()).or_default();
        *s += 1;
        *s
    };
    let last = t.last_cmd.entry(a.host.clone()).or_default();
    *last = (*last).max(cmd.id);
    axum::Json(CommandResponse { seq, reply })
}

struct Lab {
    shell: Shell,
    base: String,
    table: Arc<Mutex<Table>>,
}

impl Lab {
    async fn start() -> Lab {
        Lab::start_with(None).await
    }

    /// A lab whose hosts' power-offs wait at `gate` (if any) until the test opens it.
    async fn start_with(gate: Option<Arc<Gate>>) -> Lab {
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
        let (expired, mut gone) = tokio::sync::mpsc::unbounded_channel::<String>();
        for host in HOSTS {
            let driver = FakePower {
                host: host.into(),
                table: Arc::clone(&table),
                expired: expired.clone(),
                gate: gate.clone(),
            };
            shell.set_power_driver(host, Arc::new(driver));
        }
        let s = shell.clone();
        tokio::spawn(async move {
            while let Some(host) = gone.recv().await {
                s.host_expired(&host).await;
            }
        });
        let lab = Lab { shell, base, table };
        lab.start_reports();
        lab
    }

    /// Every 100 ms each fake agent reports its VMs, running at 5 % CPU, to the leader.
    fn start_reports(&self) {
        let table = Arc::clone(&self.table);
        common::spawn_reports(
            self.shell.clone(),
            self.base.clone(),
            &HOSTS,
            move |host, generation| {
                let mut t = table.lock().unwrap();
                if t.off.iter().any(|h| h == host) {
                    return None;
                }
                let seq = {
                    let s = t.seq.entry(host.to_string()).or_default();
                    *s += 1;
                    *s
                };
                Some(AgentReport {
                    host: host.into(),
                    generation_seen: generation,
                    seq,
                    last_command_id: t.last_cmd.get(host).copied().unwrap_or(0),
                    vms: t
                        .vms
                        .iter()
                        .filter(|(_, h)| h.as_str() == host)
                        .map(|(name, _)| ObservedVm {
                            name: name.clone(),
                            state: ObservedState::Running,
                            cpu_utilization: Some(0.05),
                            rss_mib: Some(64),
                            guest_resident_kib: None,
                            guest_nonzero_kib: None,
                            dirty_pages_per_sec: None,
                        })
                        .collect(),
                    cpu_utilization: Some(0.05),
                    parked_cores: None,
                })
            },
        );
    }

    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let r = http::request(
            method,
            &format!("{}{path}", self.base),
            body.map(|b| b.to_string().into_bytes()),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
        let v = if r.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&r.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.body).into_owned()))
        };
        (r.status, v)
    }

    async fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl AsyncFnMut() -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates 1-vCPU VMs (unpinned, so the loop may move them), waits until each runs, and
    /// moves each to its host with an operator's migration, so they are spread out.
    async fn create_vms(&self, names: &[(&str, &str)]) {
        for (name, _) in names {
            let spec = json!({"name": name, "vcpus": 1, "memory_mib": 256,
                "kernel": "builtin:testguest"});
            self.wait(
                "the leader to be ready",
                Duration::from_secs(10),
                async || {
                    let (st, v) = self.call(Method::POST, "/v1/vms", Some(&spec)).await;
                    match st {
                        201 => Some(()),
                        503 => None,
                        _ => panic!("create {name}: {st} {v}"),
                    }
                },
            )
            .await;
        }
        self.wait("every VM running", Duration::from_secs(10), async || {
            let (_, v) = self.call(Method::GET, "/v1/vms", None).await;
            v.as_array()?
                .iter()
                .all(|vm| vm["state"] == "running")
                .then_some(())
        })
        .await;
        for (name, host) in names {
            let (_, v) = self
                .call(Method::GET, &format!("/v1/vms/{name}"), None)
                .await;
            if v["host"] == *host {
                continue;
            }
            let to = json!({ "to": host });
            let path = format!("/v1/vms/{name}/migrate");
            let (st, v) = self.call(Method::POST, &path, Some(&to)).await;
            assert_eq!(st, 202, "{v}");
            self.wait("the spreading move", Duration::from_secs(10), async || {
                let (_, v) = self
                    .call(Method::GET, &format!("/v1/vms/{name}"), None)
                    .await;
                (v["host"] == *host && v["state"] == "running").then_some(())
            })
            .await;
        }
        self.table.lock().unwrap().migrations = 0;
    }

    async fn policy(&self) -> Value {
        let (st, v) = self.call(Method::GET, "/v1/policy", None).await;
        assert_eq!(st, 200, "{v}");
        v
    }

    async fn put_policy(&self, p: &Value) -> (u16, Value) {
        self.call(Method::PUT, "/v1/policy", Some(p)).await
    }

    /// A manual, eager policy with no hold, no cooldown, drained hosts powered off at once.
    fn eager(&self, base: &Value) -> Value {
        let mut p = base.clone();
        p["automation"] = "manual".into();
        p["aggressiveness"] = 5.into();
        p["interval_s"] = 2.into();
        p["hold_s"] = 0.into();
        p["cooldown_s"] = 0.into();
        p["min_improvement_pct"] = 0.0.into();
        p["power"]["enabled"] = true.into();
        p["power"]["off_hold_s"] = 0.into();
        p
    }

    async fn first_proposed(&self) -> Value {
        self.wait("a proposed plan", Duration::from_secs(20), async || {
            let (st, v) = self.call(Method::GET, "/v1/plans", None).await;
            assert_eq!(st, 200, "{v}");
            v.as_array()?
                .iter()
                .find(|p| p["state"] == "proposed")
                .cloned()
        })
        .await
    }
    /// The first proposed plan with a power-off (waited for).
    async fn power_off_proposal(&self) -> Value {
        self.wait(
            "a power-off proposal",
            Duration::from_secs(20),
            async || {
                let (_, plans) = self.call(Method::GET, "/v1/plans", None).await;
                plans.as_array()?.iter().find_map(|p| {
                    (p["state"] == "proposed"
                        && p["actions"]
                            .as_array()
                            .is_some_and(|a| a.iter().any(|a| a["kind"] == "power_off")))
                    .then(|| p.clone())
                })
            },
        )
        .await
    }

    /// Applies plan `id` (a 202, the plan applying or already applied) and waits until it is
    /// applied; the applied plan.
    async fn apply_and_wait(&self, id: u64) -> Value {
        let (st, v) = self
            .call(Method::POST, &format!("/v1/plans/{id}/apply"), None)
            .await;
        assert_eq!(st, 202, "{v}");
        assert!(v["state"] == "applying" || v["state"] == "applied", "{v}");
        self.wait(
            &format!("plan {id} applied"),
            Duration::from_secs(20),
            async || {
                let (_, p) = self
                    .call(Method::GET, &format!("/v1/plans/{id}"), None)
                    .await;
                (p["state"] == "applied").then_some(p)
            },
        )
        .await
    }
}

#[tokio::test]
async fn each_bad_knob_is_a_400_naming_its_range_and_changes_nothing() {
    let lab = Lab::start().await;
    let before = lab.policy().await;
    assert_eq!(before["automation"], "manual", "{before}");
    let cases: [(&str, Value, &str); 12] = [
        (
            "aggressiveness",
            0.into(),
            "aggressiveness = 0 is out of range: allowed 1..=5",
        ),
        ("aggressiveness", 6.into(), "allowed 1..=5"),
        (
            "interval_s",
            1.into(),
            "interval_s = 1 is out of range: allowed 2..=3600",
        ),
        ("interval_s", 3601.into(), "allowed 2..=3600"),
        (
            "parameter",
            2.5.into(),
            "parameter = 2.5 is out of range for detector lr: allowed 0.5..=2",
        ),
        (
            "hold_s",
            86_401.into(),
            "hold_s = 86401 is out of range: allowed 0..=86400",
        ),
        (
            "min_improvement_pct",
            101.into(),
            "min_improvement_pct = 101 is out of range: allowed 0..=100",
        ),
        (
            "cooldown_s",
            100_000.into(),
            "cooldown_s = 100000 is out of range: allowed 0..=86400",
        ),
        (
            "max_migrations",
            0.into(),
            "max_migrations = 0 is out of range: allowed 1..=64",
        ),
        ("max_migrations", 65.into(), "allowed 1..=64"),
        (
            "power.spare_hosts",
            1001.into(),
            "power.spare_hosts = 1001 is out of range: allowed 0..=1000",
        ),
        (
            "power.off_hold_s",
            90_000.into(),
            "power.off_hold_s = 90000 is out of range: allowed 0..=86400",
        ),
    ];
    for (field, value, detail) in cases {
        let mut p = before.clone();
        match field.split_once('.') {
            Some((a, b)) => p[a][b] = value.clone(),
            None => p[field] = value.clone(),
        }
        let (st, v) = lab.put_policy(&p).await;
        assert_eq!(st, 400, "{field} = {value}: {v}");
        assert_eq!(v["error"], "invalid input", "{v}");
        let d = v["detail"].as_str().unwrap();
        assert!(
            d.contains(detail),
            "{field} = {value}: {d:?} lacks {detail:?}"
        );
        assert_eq!(
            lab.policy().await,
            before,
            "{field} = {value} changed the policy"
        );
    }
    // A wrong type, an unknown field and a missing field are 400s naming the problem.
    let mut p = before.clone();
    p["automation"] = "sometimes".into();
    let (st, v) = lab.put_policy(&p).await;
    assert_eq!((st, v["error"].as_str()), (400, Some("bad JSON")), "{v}");
    assert!(v["detail"].as_str().unwrap().contains("sometimes"), "{v}");
    let mut p = before.clone();
    p["colour"] = "red".into();
    let (st, v) = lab.put_policy(&p).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("colour"), "{v}");
    let mut p = before.clone();
    p.as_object_mut().unwrap().remove("hold_s");
    let (st, v) = lab.put_policy(&p).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("hold_s"), "{v}");
    assert_eq!(lab.policy().await, before);
    assert_eq!(
        lab.shell.shared().store().get(POLICY_KEY).await.unwrap(),
        None,
        "nothing refused was stored"
    );

    // A good one is in force and stored.
    let good = lab.eager(&before);
    let (st, v) = lab.put_policy(&good).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v, good);
    assert_eq!(lab.policy().await, good);
    let stored = lab.shell.shared().store().get(POLICY_KEY).await.unwrap();
    let stored: Value = serde_json::from_slice(&stored.expect("stored")).unwrap();
    assert_eq!(stored, good);
    // A store that refuses writes: 503, and the policy in force stays.
    lab.shell.shared().store().set_fail_writes(true);
    let mut other = good.clone();
    other["aggressiveness"] = 2.into();
    let (st, v) = lab.put_policy(&other).await;
    assert_eq!((st, v["error"].as_str()), (503, Some("not stored")), "{v}");
    lab.shell.shared().store().set_fail_writes(false);
    assert_eq!(lab.policy().await, good);
    // The OpenAPI document lists the automation paths and their bodies.
    let (st, doc) = lab.call(Method::GET, "/openapi.json", None).await;
    assert_eq!(st, 200);
    for path in [
        "/v1/policy",
        "/v1/plans",
        "/v1/plans/{id}",
        "/v1/plans/{id}/apply",
        "/v1/plans/{id}/reject",
        "/v1/stats/series",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    for schema in ["Policy", "Plan", "PlanAction", "StatsSeries", "TaskDetail"] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "{schema} missing from the OpenAPI document"
        );
    }
}

#[tokio::test]
async fn manual_mode_only_proposes_and_apply_drains_the_host_through_migration_tasks() {
    let lab = Lab::start().await;
    lab.create_vms(&[("a", "h1"), ("b", "h2"), ("c", "h3")])
        .await;
    let (_, tasks_before) = lab.call(Method::GET, "/v1/tasks", None).await;
    let tasks_before = tasks_before.as_array().unwrap().len();
    let before = lab.policy().await;
    let (st, v) = lab.put_policy(&lab.eager(&before)).await;
    assert_eq!(st, 200, "{v}");
    let plan = lab.first_proposed().await;
    let id = plan["id"].as_u64().unwrap();
    assert_eq!(plan["automation"], "manual");
    let moves: Vec<&Value> = plan["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "migrate")
        .collect();
    assert!(!moves.is_empty(), "a drain plan moves VMs: {plan}");
    for m in &moves {
        assert!(m["predicted"]["time_s"].as_f64().unwrap() > 0.0, "{m}");
        assert_eq!(m["status"], "pending", "{m}");
    }
    // Manual: nothing moves on its own, however many rounds pass.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        lab.table.lock().unwrap().migrations,
        0,
        "manual mode moved a VM"
    );
    let (st, v) = lab.call(Method::GET, "/v1/tasks", None).await;
    assert_eq!(
        (st, v.as_array().map(Vec::len)),
        (200, Some(tasks_before)),
        "{v}"
    );
    let (st, same) = lab
        .call(Method::GET, &format!("/v1/plans/{id}"), None)
        .await;
    assert_eq!(st, 200, "{same}");

    // Apply: 202, the plan is applying and its migrations are tasks.
    let drained = moves[0]["from"].as_str().unwrap().to_string();
    let done = lab.apply_and_wait(id).await;
    for a in done["actions"].as_array().unwrap() {
        assert_eq!(a["status"], "done", "{done}");
        if a["kind"] == "migrate" {
            assert_eq!(a["actual"]["bytes"], 70_000_000, "{done}");
        }
        if a["kind"] == "power_off" {
            // Through the host's power driver: its agent is gone.
            let host = a["host"].as_str().unwrap();
            assert!(
                lab.table.lock().unwrap().off.iter().any(|h| h == host),
                "{done}"
            );
            // and the API says so
            let (_, h) = lab
                .call(Method::GET, &format!("/v1/hosts/{host}"), None)
                .await;
            assert_eq!(h["power"], "off", "{h}");
            let (_, all) = lab.call(Method::GET, "/v1/hosts", None).await;
            let listed = all.as_array().unwrap().iter().find(|x| x["name"] == host);
            assert_eq!(listed.unwrap()["power"], "off", "{all}");
        }
    }
    // The host ends empty, and each migration task carries its predicted and measured cost.
    let (_, h) = lab
        .call(Method::GET, &format!("/v1/hosts/{drained}"), None)
        .await;
    assert_eq!(h["vms"], json!([]), "{h}");
    let (_, tasks) = lab.call(Method::GET, "/v1/tasks", None).await;
    let tasks = &tasks.as_array().unwrap()[tasks_before..];
    assert_eq!(tasks.len(), moves.len(), "{tasks:?}");
    for t in tasks {
        let id = t["id"].as_u64().unwrap();
        let (st, t) = lab
            .call(Method::GET, &format!("/v1/tasks/{id}"), None)
            .await;
        assert_eq!(st, 200, "{t}");
        assert_eq!(t["state"], "succeeded", "{t}");
        assert!(t["predicted"]["time_s"].as_f64().unwrap() > 0.0, "{t}");
        eprintln!(
            "task {id} to {}: predicted {:.3} s / {} B, measured {} s / {} B",
            t["to"],
            t["predicted"]["time_s"].as_f64().unwrap_or(f64::NAN),
            t["predicted"]["bytes"],
            t["actual"]["time_s"],
            t["actual"]["bytes"]
        );
        // the measured time is the whole move as the task's phases timed it (the fake agents
        // answer at once); the pause is the report's
        let phases = &t["phases"];
        let move_ms =
            phases["target_start_ms"].as_u64().unwrap() + phases["migrate_ms"].as_u64().unwrap();
        assert_eq!(t["actual"]["time_s"], move_ms as f64 / 1000.0, "{t}");
        assert_eq!(t["actual"]["downtime_ms"], 12.0, "{t}");
    }
    // Applied once: a second apply is a conflict naming the state.
    let (st, v) = lab
        .call(Method::POST, &format!("/v1/plans/{id}/apply"), None)
        .await;
    assert_eq!((st, v["error"].as_str()), (409, Some("conflict")), "{v}");
    assert!(v["detail"].as_str().unwrap().contains("applied"), "{v}");
    let metrics = lab.call(Method::GET, "/metrics", None).await.1;
    let text = metrics.as_str().unwrap();
    assert!(
        text.contains("tern_automation_plans_applied_total 1"),
        "{text}"
    );
    assert!(text.contains("tern_automation_cycle_seconds "), "{text}");
    // Every migration (the spreading ones too) was predicted and measured.
    let all = tasks_before + moves.len();
    assert!(
        text.contains(&format!("tern_migration_predictions_compared {all}\n")),
        "{text}"
    );
    // The emptied hosts' power-off comes as the next proposal; applied, the BMC powers the host
    // off and the API shows it off.
    let off_plan = lab.power_off_proposal().await;
    let off_id = off_plan["id"].as_u64().unwrap();
    let off_done = lab.apply_and_wait(off_id).await;
    for a in off_done["actions"].as_array().unwrap() {
        let host = a["host"].as_str().unwrap();
        assert!(
            lab.table.lock().unwrap().off.iter().any(|h| h == host),
            "{off_done}"
        );
        let (_, h) = lab
            .call(Method::GET, &format!("/v1/hosts/{host}"), None)
            .await;
        assert_eq!(h["power"], "off", "{h}");
    }
}

/// A metric's value from the controller's `/metrics` text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test]
async fn a_slow_power_off_holds_neither_the_cycle_nor_the_api_and_its_outcome_is_reported() {
    // Every power-off waits at a gate until the test opens it (a soft-off waiting for the host
    // to shut down): what runs meanwhile cannot have waited for it, however slow the machine.
    let gate = Arc::new(Gate::default());
    let lab = Lab::start_with(Some(Arc::clone(&gate))).await;
    lab.create_vms(&[("a", "h1"), ("b", "h2"), ("c", "h3")])
        .await;
    let before = lab.policy().await;
    let (st, v) = lab.put_policy(&lab.eager(&before)).await;
    assert_eq!(st, 200, "{v}");
    let drain = lab.first_proposed().await;
    lab.apply_and_wait(drain["id"].as_u64().unwrap()).await;
    let off_plan = lab.power_off_proposal().await;
    let id = off_plan["id"].as_u64().unwrap();
    let hosts: Vec<String> = off_plan["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["host"].as_str().unwrap().to_string())
        .collect();
    let (_, series) = lab.call(Method::GET, "/v1/stats/series", None).await;
    let on_before = series["points"].as_array().unwrap().last().unwrap()["hosts_on"].clone();
    let metrics = lab.call(Method::GET, "/metrics", None).await.1;
    let cycles_before = metric(metrics.as_str().unwrap(), "tern_automation_cycles_total");

    // The apply answers while every power-off is held: they run in the background.
    let (st, v) = tokio::time::timeout(
        Duration::from_secs(20),
        lab.call(Method::POST, &format!("/v1/plans/{id}/apply"), None),
    )
    .await
    .expect("the apply waited for a held power-off");
    assert_eq!(st, 202, "{v}");
    assert_eq!(v["state"], "applying", "{v}");
    for a in v["actions"].as_array().unwrap() {
        assert_eq!(
            a["status"], "running",
            "every power-off started at once: {v}"
        );
    }

    // Meanwhile the cycles go on, and the hosts are powering off: neither off nor counted off,
    // nor anyone's target.
    lab.wait(
        "three cycles while the power-offs are held",
        Duration::from_secs(30),
        async || {
            let metrics = lab.call(Method::GET, "/metrics", None).await.1;
            let cycles = metric(metrics.as_str().unwrap(), "tern_automation_cycles_total");
            (cycles >= cycles_before + 3.0).then_some(())
        },
    )
    .await;
    // every held power-off started (they run side by side, not one after the other)
    lab.wait(
        "every power-off started",
        Duration::from_secs(20),
        async || (lab.table.lock().unwrap().started.len() == hosts.len()).then_some(()),
    )
    .await;
    for host in &hosts {
        let (_, h) = lab
            .call(Method::GET, &format!("/v1/hosts/{host}"), None)
            .await;
        assert_eq!(h["power"], "powering_off", "{h}");
        assert!(!lab.table.lock().unwrap().off.contains(host), "{host}");
    }
    let (_, series) = lab.call(Method::GET, "/v1/stats/series", None).await;
    let last = series["points"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["hosts_on"], on_before, "{series}");
    let (_, p) = lab
        .call(Method::GET, &format!("/v1/plans/{id}"), None)
        .await;
    assert_eq!(p["state"], "applying", "{p}");

    // The driver's answer is reported when it comes: the plan applied, the hosts off.
    assert!(lab.table.lock().unwrap().off_calls.is_empty());
    gate.open();
    let done = lab
        .wait(
            &format!("plan {id} applied"),
            Duration::from_secs(20),
            async || {
                let (_, p) = lab
                    .call(Method::GET, &format!("/v1/plans/{id}"), None)
                    .await;
                (p["state"] != "applying").then_some(p)
            },
        )
        .await;
    assert_eq!(done["state"], "applied", "{done}");
    let calls = lab.table.lock().unwrap().off_calls.clone();
    assert_eq!(calls.len(), hosts.len(), "{calls:?}");
    for host in &hosts {
        assert!(lab.table.lock().unwrap().off.contains(host), "{host}");
        let (_, h) = lab
            .call(Method::GET, &format!("/v1/hosts/{host}"), None)
            .await;
        assert_eq!(h["power"], "off", "{h}");
    }
}

/// A lab with every power-off held at a gate: the VMs spread and drained, the power-off plan
/// proposed and applied (every power-off running). (the lab, the gate, the plan's id, its hosts)
async fn held_power_off(timeout: Option<Duration>) -> (Lab, Arc<Gate>, u64, Vec<String>) {
    let gate = Arc::new(Gate::default());
    let lab = Lab::start_with(Some(Arc::clone(&gate))).await;
    if let Some(t) = timeout {
        lab.shell.shared().automation().set_power_off_timeout(t);
    }
    lab.create_vms(&[("a", "h1"), ("b", "h2"), ("c", "h3")])
        .await;
    let before = lab.policy().await;
    let (st, v) = lab.put_policy(&lab.eager(&before)).await;
    assert_eq!(st, 200, "{v}");
    let drain = lab.first_proposed().await;
    lab.apply_and_wait(drain["id"].as_u64().unwrap()).await;
    let off_plan = lab.power_off_proposal().await;
    let id = off_plan["id"].as_u64().unwrap();
    let hosts: Vec<String> = off_plan["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["host"].as_str().unwrap().to_string())
        .collect();
    let (st, v) = lab
        .call(Method::POST, &format!("/v1/plans/{id}/apply"), None)
        .await;
    assert_eq!((st, v["state"].as_str()), (202, Some("applying")), "{v}");
    lab.wait(
        "every power-off started",
        Duration::from_secs(20),
        async || (lab.table.lock().unwrap().started.len() == hosts.len()).then_some(()),
    )
    .await;
    (lab, gate, id, hosts)
}

impl Lab {
    /// Waits until every one of `hosts` shows `power` in the API.
    /// This controller steps down and leads again: its second term.
    async fn new_term(&self, why: &str) {
        self.shell.step_down(why).await;
        self.wait("a new term", Duration::from_secs(10), async || {
            (self.shell.shared().core().generation() == Some(2)).then_some(())
        })
        .await;
    }

    /// `hosts` are held powering off, out of the rounds' view, until the former term's driver
    /// calls held at `gate` answer; then they are off and plan `id`'s actions done.
    async fn held_then_off_when_the_driver_answers(&self, gate: &Gate, id: u64, hosts: &[String]) {
        self.wait_power(hosts, "powering_off").await;
        assert_eq!(
            self.next_round_hosts_in_view().await,
            HOSTS.len() - hosts.len()
        );
        self.wait_power(hosts, "powering_off").await;
        gate.open();
        self.wait_power(hosts, "off").await;
        let (_, p) = self
            .call(Method::GET, &format!("/v1/plans/{id}"), None)
            .await;
        for a in p["actions"].as_array().unwrap() {
            assert_eq!(a["status"], "done", "{p}");
        }
    }

    async fn wait_power(&self, hosts: &[String], power: &str) {
        for host in hosts {
            self.wait(
                &format!("{host} {power}"),
                Duration::from_secs(20),
                async || {
                    let (_, h) = self
                        .call(Method::GET, &format!("/v1/hosts/{host}"), None)
                        .await;
                    (h["power"] == power).then_some(())
                },
            )
            .await;
        }
    }

    /// Waits for a round of the loop that runs after this call, and returns how many hosts it
    /// had in view.
    async fn next_round_hosts_in_view(&self) -> usize {
        let after = self.shell.shared().now_ms();
        self.wait("a round", Duration::from_secs(20), async || {
            let r = self.shell.shared().automation().last_round();
            (r.at_ms > after).then_some(r.hosts_in_view)
        })
        .await
    }

    /// Waits until plan `id` is no longer applying; the plan.
    async fn plan_ended(&self, id: u64) -> Value {
        self.wait(
            &format!("plan {id} ended"),
            Duration::from_secs(20),
            async || {
                let (_, p) = self
                    .call(Method::GET, &format!("/v1/plans/{id}"), None)
                    .await;
                (p["state"] != "applying").then_some(p)
            },
        )
        .await
    }

    async fn cycles(&self) -> f64 {
        let metrics = self.call(Method::GET, "/metrics", None).await.1;
        metric(metrics.as_str().unwrap(), "tern_automation_cycles_total")
    }
}

/// Registers a host whose agent never reports: the controller is not ready (it has not heard
/// every host), so no automation cycle runs.
async fn silent_host(lab: &Lab) {
    lab.shell
        .host_up(HostRecord {
            name: "h4".into(),
            agent_url: "http://127.0.0.1:9".into(),
            capacity: HostCapacity {
                cores: 4,
                memory_mib: 8192,
                power_model: "hp-ml110-g5".into(),
                volume_node: None,
                volume_node_id: None,
            },
            lease: 200,
        })
        .await;
}

#[tokio::test]
async fn a_power_off_past_its_timeout_fails_its_plan_without_a_cycle_but_holds_the_host_until_the_late_answer()
 {
    let (lab, gate, id, hosts) = held_power_off(Some(Duration::from_secs(3))).await;
    // (the power-offs started keep their 3 s; once in doubt, their hosts' agents may report for
    // a minute before they count as on again)
    lab.shell
        .shared()
        .automation()
        .set_power_off_timeout(Duration::from_secs(60));
    // No cycle from now on: a host is never heard.
    silent_host(&lab).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let cycles = lab.cycles().await;

    // The timeout passes: the plan fails, the hosts are not on again (their BMCs may still be
    // turning them off) but powering off.
    let p = lab.plan_ended(id).await;
    assert_eq!(p["state"], "failed", "{p}");
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("in doubt: its power driver did not answer within 3s"),
        "{detail}"
    );
    for a in p["actions"].as_array().unwrap() {
        assert_eq!(a["status"], "running", "the doubt is kept in the plan: {p}");
    }
    for host in &hosts {
        let (_, h) = lab
            .call(Method::GET, &format!("/v1/hosts/{host}"), None)
            .await;
        assert_eq!(h["power"], "powering_off", "{h}");
    }
    assert_eq!(lab.cycles().await, cycles, "reported without a cycle");

    // Cycles again (the silent host lost and fenced): no plan applies, the rounds run, and the
    // held hosts, their agents still reporting, are out of their view.
    lab.shell.host_expired("h4").await;
    assert_eq!(
        lab.next_round_hosts_in_view().await,
        HOSTS.len() - hosts.len()
    );
    lab.wait_power(&hosts, "powering_off").await;

    // The drivers answer late: off. The hosts are off; the plan stays failed, its power-offs
    // done.
    silent_host(&lab).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let cycles = lab.cycles().await;
    gate.open();
    lab.wait_power(&hosts, "off").await;
    let (_, p) = lab
        .call(Method::GET, &format!("/v1/plans/{id}"), None)
        .await;
    assert_eq!(p["state"], "failed", "{p}");
    for a in p["actions"].as_array().unwrap() {
        assert_eq!(a["status"], "done", "{p}");
    }
    assert!(
        p["detail"].as_str().unwrap().contains("powered off later"),
        "{p}"
    );
    assert_eq!(lab.cycles().await, cycles, "settled without a cycle");
}

#[tokio::test]
async fn a_new_leader_holds_a_host_the_former_leader_was_powering_off() {
    let (lab, gate, id, hosts) = held_power_off(None).await;
    let key = format!("/tern/desired/automation/plans/{id:020}");
    lab.wait(
        "the plan stored as applying",
        Duration::from_secs(5),
        async || {
            let b = lab.shell.shared().store().get(&key).await.unwrap()?;
            let v: Value = serde_json::from_slice(&b).unwrap();
            (v["plan"]["state"] == "applying").then_some(())
        },
    )
    .await;

    lab.new_term("test: fail-over mid power-off").await;
    // The new term failed the interrupted plan, but holds its hosts powering off: out of the
    // rounds' view, though their agents still report.
    let (_, p) = lab
        .call(Method::GET, &format!("/v1/plans/{id}"), None)
        .await;
    assert_eq!(p["state"], "failed", "{p}");
    assert!(
        p["detail"].as_str().unwrap().starts_with("interrupted"),
        "{p}"
    );
    lab.held_then_off_when_the_driver_answers(&gate, id, &hosts)
        .await;
}

#[tokio::test]
async fn a_new_leader_after_the_timeout_still_holds_the_hosts_whose_power_off_is_in_doubt() {
    let (lab, gate, id, hosts) = held_power_off(Some(Duration::from_secs(3))).await;
    // (the doubt's watch and the next term's wait outlast the test)
    lab.shell
        .shared()
        .automation()
        .set_power_off_timeout(Duration::from_secs(60));
    let p = lab.plan_ended(id).await;
    assert_eq!(p["state"], "failed", "{p}");
    let key = format!("/tern/desired/automation/plans/{id:020}");
    lab.wait(
        "the plan stored failed, its power-offs running",
        Duration::from_secs(5),
        async || {
            let b = lab.shell.shared().store().get(&key).await.unwrap()?;
            let v: Value = serde_json::from_slice(&b).unwrap();
            let running = v["plan"]["actions"]
                .as_array()?
                .iter()
                .all(|a| a["status"] == "running");
            (v["plan"]["state"] == "failed" && running).then_some(())
        },
    )
    .await;

    lab.new_term("test: fail-over with power-offs in doubt")
        .await;
    // The new term holds the hosts powering off (not on, though their agents report): out of
    // the rounds' view.
    let (_, p) = lab
        .call(Method::GET, &format!("/v1/plans/{id}"), None)
        .await;
    assert_eq!(p["state"], "failed", "{p}");
    for a in p["actions"].as_array().unwrap() {
        assert_eq!(a["status"], "running", "{p}");
    }
    lab.held_then_off_when_the_driver_answers(&gate, id, &hosts)
        .await;
}

#[tokio::test]
async fn a_power_off_in_doubt_whose_host_still_reports_as_long_again_is_on_again() {
    let (lab, gate, id, hosts) = held_power_off(Some(Duration::from_secs(2))).await;
    let p = lab.plan_ended(id).await;
    assert_eq!(p["state"], "failed", "{p}");
    // The agents still report 2 s after the doubt began: the power-offs did not happen.
    let p = lab
        .wait(
            "the power-offs settled",
            Duration::from_secs(20),
            async || {
                let (_, p) = lab
                    .call(Method::GET, &format!("/v1/plans/{id}"), None)
                    .await;
                p["actions"]
                    .as_array()?
                    .iter()
                    .all(|a| a["status"] == "failed")
                    .then_some(p)
            },
        )
        .await;
    let detail = p["detail"].as_str().unwrap();
    for host in &hosts {
        assert!(
            detail.contains(&format!(
                "{host} still runs (its agent still reports 2s after its power-off came into \
                 doubt)"
            )),
            "{detail}"
        );
    }
    gate.open();
}

/// Shuts `hosts` down as their BMCs would, their drivers not having answered yet: their agents
/// stop and their registrations expire; waits until the core has them lost.
async fn hosts_shut_down(lab: &Lab, hosts: &[String]) {
    for host in hosts {
        lab.table.lock().unwrap().off.push(host.clone());
        lab.shell.host_expired(host).await;
    }
    for host in hosts {
        lab.wait(
            &format!("{host} lost"),
            Duration::from_secs(20),
            async || {
                let (_, h) = lab
                    .call(Method::GET, &format!("/v1/hosts/{host}"), None)
                    .await;
                (h["state"] != "up").then_some(())
            },
        )
        .await;
    }
}

#[tokio::test]
async fn a_late_driver_error_for_hosts_that_shut_down_leaves_them_off() {
    let (lab, gate, id, hosts) = held_power_off(Some(Duration::from_secs(3))).await;
    lab.shell
        .shared()
        .automation()
        .set_power_off_timeout(Duration::from_secs(60));
    // No cycle from now on (a host is never heard), so no snapshot shows the hosts down.
    silent_host(&lab).await;
    let p = lab.plan_ended(id).await;
    assert_eq!(p["state"], "failed", "{p}");
    lab.wait_power(&hosts, "powering_off").await;

    // The hosts shut down; then their drivers answer, late, with an error.
    hosts_shut_down(&lab, &hosts).await;
    lab.table.lock().unwrap().off_fails = true;
    gate.open();
    lab.wait_power(&hosts, "off").await;
    let (_, p) = lab
        .call(Method::GET, &format!("/v1/plans/{id}"), None)
        .await;
    assert_eq!(p["state"], "failed", "{p}");
    for a in p["actions"].as_array().unwrap() {
        assert_eq!(a["status"], "done", "{p}");
    }
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("while its agent no longer reports"),
        "{p}"
    );
}

#[tokio::test]
async fn a_driver_error_for_hosts_that_shut_down_leaves_them_off() {
    let (lab, gate, id, hosts) = held_power_off(None).await;
    silent_host(&lab).await;
    hosts_shut_down(&lab, &hosts).await;
    lab.table.lock().unwrap().off_fails = true;
    gate.open();
    let p = lab.plan_ended(id).await;
    assert_eq!(p["state"], "failed", "{p}");
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("its power driver failed (")
            && detail.contains("while its agent no longer reports"),
        "{detail}"
    );
    for a in p["actions"].as_array().unwrap() {
        assert_eq!(a["status"], "done", "{p}");
    }
    lab.wait_power(&hosts, "off").await;
}

/// Plan `id`'s power-offs failed on time while the hosts' agents report: the plan fails, the hosts
/// stay `powering_off` (they may be shutting down all the same); returns the plan.
async fn failed_while_reporting(lab: &Lab, gate: &Gate, id: u64, hosts: &[String]) -> Value {
    lab.table.lock().unwrap().off_fails = true;
    gate.open();
    let p = lab.plan_ended(id).await;
    assert_eq!(p["state"], "failed", "{p}");
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("its power driver failed (") && detail.contains("while its agent reports"),
        "{detail}"
    );
    for a in p["actions"].as_array().unwrap() {
        assert_eq!(a["status"], "running", "{p}");
    }
    lab.wait_power(hosts, "powering_off").await;
    p
}

#[tokio::test]
async fn a_driver_error_while_the_agents_report_holds_the_hosts_until_they_are_seen_to_run() {
    let (lab, gate, id, hosts) = held_power_off(Some(Duration::from_secs(8))).await;
    failed_while_reporting(&lab, &gate, id, &hosts).await;
    // The agents go on reporting for the power-off timeout (8 s here): the hosts are on again.
    lab.wait_power(&hosts, "on").await;
    let (_, p) = lab
        .call(Method::GET, &format!("/v1/plans/{id}"), None)
        .await;
    for a in p["actions"].as_array().unwrap() {
        assert_eq!(a["status"], "failed", "{p}");
    }
    let detail = p["detail"].as_str().unwrap();
    for host in &hosts {
        assert!(
            detail.contains(&format!(
                "{host} still runs (its agent still reports 8s after its power driver failed)"
            )),
            "{detail}"
        );
    }
}

#[tokio::test]
async fn a_driver_error_for_hosts_that_then_shut_down_leaves_them_off() {
    // Long enough that the hosts are seen down (expired at once below) before the watch looks;
    // in a cluster an agent's registration runs out one lease (5 s) after it stops.
    let (lab, gate, id, hosts) = held_power_off(Some(Duration::from_secs(12))).await;
    failed_while_reporting(&lab, &gate, id, &hosts).await;
    // The soft power-off went on after the driver gave up: the hosts shut down.
    hosts_shut_down(&lab, &hosts).await;
    lab.wait_power(&hosts, "off").await;
    let (_, p) = lab
        .call(Method::GET, &format!("/v1/plans/{id}"), None)
        .await;
    for a in p["actions"].as_array().unwrap() {
        assert_eq!(a["status"], "done", "{p}");
    }
}

#[tokio::test]
async fn hosts_being_powered_off_take_no_vm_from_the_core_and_an_operator_naming_one_gets_409() {
    let (lab, gate, _, held) = held_power_off(None).await;
    let free: Vec<String> = HOSTS
        .iter()
        .map(|h| h.to_string())
        .filter(|h| !held.contains(h))
        .collect();
    assert_eq!(
        free.len(),
        1,
        "the VMs were consolidated on one host: {held:?}"
    );
    let free = &free[0];
    let (_, a) = lab.call(Method::GET, "/v1/vms/a", None).await;
    assert_eq!(a["host"], *free, "{a}");

    // An operator's move to a host being powered off: 409 naming its power state, nothing queued.
    let to = json!({ "to": held[0] });
    let (st, v) = lab.call(Method::POST, "/v1/vms/a/migrate", Some(&to)).await;
    assert_eq!(st, 409, "{v}");
    assert_eq!(v["error"], "host off or powering off", "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(&format!("host \"{}\" is powering_off", held[0])),
        "{detail}"
    );
    // A move without a target has nowhere to go (before, the core chose a held host).
    let (st, v) = lab
        .call(Method::POST, "/v1/vms/a/migrate", Some(&json!({})))
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (409, Some("no host fits")),
        "{v}"
    );
    let (_, tasks) = lab.call(Method::GET, "/v1/tasks?active=true", None).await;
    assert_eq!(tasks.as_array().map(Vec::len), Some(0), "{tasks}");
    // A new VM pinned to a held host is refused; an unpinned one goes to the free host.
    let pinned = json!({"name": "p", "vcpus": 1, "memory_mib": 256,
        "kernel": "builtin:testguest", "host": held[0]});
    let (st, v) = lab.call(Method::POST, "/v1/vms", Some(&pinned)).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (409, Some("host off or powering off")),
        "{v}"
    );
    for name in ["d", "e"] {
        let spec = json!({"name": name, "vcpus": 1, "memory_mib": 256,
            "kernel": "builtin:testguest"});
        let (st, v) = lab.call(Method::POST, "/v1/vms", Some(&spec)).await;
        assert_eq!((st, &v["host"]), (201, &json!(free)), "{v}");
    }

    // Powered off (their agents gone: lost, then fenced): still no VM goes there.
    gate.open();
    lab.wait_power(&held, "off").await;
    let v = lab
        .wait(
            "the leader ready again",
            Duration::from_secs(20),
            async || {
                let (st, v) = lab.call(Method::POST, "/v1/vms", Some(&pinned)).await;
                (st != 503).then_some(v)
            },
        )
        .await;
    assert_eq!(v["error"], "host off or powering off", "{v}");
    assert!(
        lab.shell
            .shared()
            .core()
            .power_holds()
            .keys()
            .eq(held.iter()),
        "{:?}",
        lab.shell.shared().core().power_holds()
    );
}

#[tokio::test]
async fn a_plan_made_before_the_cluster_changed_is_refused_as_superseded() {
    let lab = Lab::start().await;
    lab.create_vms(&[("a", "h1"), ("b", "h2"), ("c", "h3")])
        .await;
    let before = lab.policy().await;
    let p = lab.eager(&before);
    let (st, v) = lab.put_policy(&p).await;
    assert_eq!(st, 200, "{v}");
    let plan = lab.first_proposed().await;
    let id = plan["id"].as_u64().unwrap();
    // Long rounds from now on: no newer round replaces this plan while the cluster changes.
    let mut slow = p.clone();
    slow["interval_s"] = 3600.into();
    let (st, v) = lab.put_policy(&slow).await;
    assert_eq!(st, 200, "{v}");
    let (_, still) = lab
        .call(Method::GET, &format!("/v1/plans/{id}"), None)
        .await;
    assert_eq!(still["state"], "proposed", "{still}");
    // The cluster changes under it: a new VM.
    let spec = json!({"name": "d", "vcpus": 1, "memory_mib": 256, "kernel": "builtin:testguest"});
    let (st, v) = lab.call(Method::POST, "/v1/vms", Some(&spec)).await;
    assert_eq!(st, 201, "{v}");
    lab.wait("d running", Duration::from_secs(10), async || {
        let (_, v) = lab.call(Method::GET, "/v1/vms/d", None).await;
        (v["state"] == "running").then_some(())
    })
    .await;
    let (st, v) = lab
        .call(Method::POST, &format!("/v1/plans/{id}/apply"), None)
        .await;
    assert_eq!((st, v["error"].as_str()), (409, Some("conflict")), "{v}");
    let d = v["detail"].as_str().unwrap();
    assert!(d.contains(&format!("plan {id} is superseded")), "{d}");
    let (_, p) = lab
        .call(Method::GET, &format!("/v1/plans/{id}"), None)
        .await;
    assert_eq!(p["state"], "superseded", "{p}");
    assert_eq!(lab.table.lock().unwrap().migrations, 0);
    // Unknown plans and bad ids.
    let (st, v) = lab.call(Method::POST, "/v1/plans/999/apply", None).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (404, Some("unknown plan")),
        "{v}"
    );
    let (st, v) = lab.call(Method::POST, "/v1/plans/x/reject", None).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = lab
        .call(Method::POST, &format!("/v1/plans/{id}/reject"), None)
        .await;
    assert_eq!((st, v["error"].as_str()), (409, Some("conflict")), "{v}");
}

#[tokio::test]
async fn full_mode_applies_its_plan_at_once() {
    let lab = Lab::start().await;
    lab.create_vms(&[("a", "h1"), ("b", "h2"), ("c", "h3")])
        .await;
    let before = lab.policy().await;
    let mut p = lab.eager(&before);
    p["automation"] = "full".into();
    let (st, v) = lab.put_policy(&p).await;
    assert_eq!(st, 200, "{v}");
    // No apply: the loop's own plan runs, its migrations through the controller's tasks.
    let plan = lab
        .wait(
            "a plan applied on its own",
            Duration::from_secs(20),
            async || {
                let (_, v) = lab.call(Method::GET, "/v1/plans", None).await;
                v.as_array()?
                    .iter()
                    .find(|p| p["state"] == "applied")
                    .cloned()
            },
        )
        .await;
    assert_eq!(plan["automation"], "full", "{plan}");
    let moved = lab.table.lock().unwrap().migrations;
    let moves = plan["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "migrate")
        .count() as u64;
    assert!(moves > 0 && moved >= moves, "{moved} moves for {plan}");
    let (_, hosts) = lab.call(Method::GET, "/v1/hosts", None).await;
    let empty = hosts
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["vms"] == json!([]))
        .count();
    assert!(empty >= 1, "{hosts}");
}

#[tokio::test]
async fn a_new_leader_runs_under_the_stored_policy() {
    let lab = Lab::start().await;
    let before = lab.policy().await;
    let good = lab.eager(&before);
    let (st, v) = lab.put_policy(&good).await;
    assert_eq!(st, 200, "{v}");
    // The election lease runs out: the next command makes this controller step down, and (in
    // memory) it takes office again with a higher generation, reading the stored state afresh.
    lab.shell.set_lease_deadline(lab.shell.shared().now_ms());
    lab.shell
        .host_up(HostRecord {
            name: "h4".into(),
            agent_url: "http://127.0.0.1:9".into(),
            capacity: HostCapacity {
                cores: 4,
                memory_mib: 8192,
                power_model: "hp-ml110-g5".into(),
                volume_node: None,
                volume_node_id: None,
            },
            lease: 200,
        })
        .await;
    lab.wait("a new term", Duration::from_secs(10), async || {
        (lab.shell.shared().core().generation() == Some(2)).then_some(())
    })
    .await;
    assert_eq!(
        lab.policy().await,
        good,
        "the new term lost the stored policy"
    );
}

#[tokio::test]
async fn a_new_leader_takes_over_the_stored_plans_and_applies_a_proposal() {
    let lab = Lab::start().await;
    lab.create_vms(&[("a", "h1"), ("b", "h2"), ("c", "h3")])
        .await;
    let before = lab.policy().await;
    let (st, v) = lab.put_policy(&lab.eager(&before)).await;
    assert_eq!(st, 200, "{v}");
    lab.first_proposed().await;
    // No more rounds for an hour, and a hold longer than the test: the proposal stands, and
    // the next leader's own rounds (its hold timers start afresh) propose nothing over it.
    let mut slow = lab.eager(&before);
    slow["interval_s"] = 3600.into();
    slow["hold_s"] = 600.into();
    let (st, v) = lab.put_policy(&slow).await;
    assert_eq!(st, 200, "{v}");
    let plan = lab.first_proposed().await;
    let id = plan["id"].as_u64().unwrap();
    let key = format!("/tern/desired/automation/plans/{id:020}");
    let stored = lab
        .wait(
            "the plan in the store",
            Duration::from_secs(5),
            async || lab.shell.shared().store().get(&key).await.unwrap(),
        )
        .await;
    let stored: Value = serde_json::from_slice(&stored).unwrap();
    assert_eq!(stored["plan"]["state"], "proposed", "{stored}");

    lab.shell.step_down("test: fail-over").await;
    lab.wait("a new term", Duration::from_secs(10), async || {
        (lab.shell.shared().core().generation() == Some(2)).then_some(())
    })
    .await;
    // The new term shows the plan as it was, and several cycles later still.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (st, p) = lab
        .call(Method::GET, &format!("/v1/plans/{id}"), None)
        .await;
    assert_eq!(st, 200, "{p}");
    assert_eq!(p["state"], "proposed", "{p}");
    assert_eq!(p["actions"], plan["actions"], "{p}");
    // Applied on the new term: its migrations run.
    let done = lab.apply_and_wait(id).await;
    assert!(lab.table.lock().unwrap().migrations >= 1, "{done}");
    // and the store holds the final state
    let stored: Value =
        serde_json::from_slice(&lab.shell.shared().store().get(&key).await.unwrap().unwrap())
            .unwrap();
    assert_eq!(stored["plan"]["state"], "applied", "{stored}");
    // A rejected plan stays rejected across a term too.
    let (st, v) = lab.put_policy(&lab.eager(&before)).await;
    assert_eq!(st, 200, "{v}");
    let next = lab.first_proposed().await;
    let next_id = next["id"].as_u64().unwrap();
    assert!(next_id > id, "{next}");
    let (st, v) = lab
        .call(Method::POST, &format!("/v1/plans/{next_id}/reject"), None)
        .await;
    assert_eq!(st, 200, "{v}");
    lab.shell.step_down("test: second fail-over").await;
    lab.wait("a third term", Duration::from_secs(10), async || {
        (lab.shell.shared().core().generation() == Some(3)).then_some(())
    })
    .await;
    let (st, p) = lab
        .call(Method::GET, &format!("/v1/plans/{next_id}"), None)
        .await;
    assert_eq!((st, p["state"].as_str()), (200, Some("rejected")), "{p}");
}

//! The REST API in-process: the real axum router and the real core behind an in-memory store (no
//! etcd), reached over loopback with the shell's own HTTP client.
//!
//! Bad input gets a clear 4xx and creates nothing: unknown VM (404), no host fits (409), bad
//! JSON, wrong types and unknown fields (400 naming the problem), invalid names and sizes out of
//! range (400 naming the value and the range). A change whose desired state cannot be stored is
//! refused (503) and leaves nothing behind after the next election. `/openapi.json` is an OpenAPI
//! 3 document listing the `/v1` paths and the `VmCreate` schema; `/metrics` is Prometheus text.

use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};
use tern_api::agent::HostRecord;
use tern_api::cluster::HostCapacity;
use tern_controller::core::Config;
use tern_controller::shell::{Shell, http};

struct Api {
    shell: Shell,
    base: String,
    seq: std::sync::atomic::AtomicU64,
}

impl Api {
    async fn start() -> Api {
        let cfg = Config {
            ha_reserve_hosts: 0,
            ..Config::default()
        };
        let shell = Shell::in_memory(cfg, "http://in-memory");
        assert_eq!(shell.wait_leading(Duration::from_secs(5)).await, Some(1));
        for (name, lease) in [("h1", 11), ("h2", 12)] {
            shell
                .host_up(HostRecord {
                    name: name.into(),
                    // Nothing listens there: commands fail fast, which the core handles.
                    agent_url: "http://127.0.0.1:9".into(),
                    capacity: HostCapacity {
                        cores: 4,
                        memory_mib: 4096,
                        power_model: "hp-ml110-g5".into(),
                        volume_node: None,
                        volume_node_id: None,
                    },
                    lease,
                })
                .await;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let s = shell.clone();
        tokio::spawn(async move { s.serve_on(listener).await });
        let api = Api {
            shell,
            base,
            seq: 0.into(),
        };
        api.report_all().await;
        api
    }

    /// Each host's agent reports to this term's leader (empty hosts), as agents do every second:
    /// a new leader places nothing before it has heard from every host.
    async fn report_all(&self) {
        let generation = self.shell.shared().core().generation().expect("leading");
        for host in ["h1", "h2"] {
            let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let report = json!({"host": host, "generation_seen": generation, "seq": seq,
                "last_command_id": 0, "vms": [], "cpu_utilization": 0.1});
            let (st, v) = self
                .call(Method::POST, "/v1/agent/reports", Some(&report.to_string()))
                .await;
            assert_eq!(st, 204, "{v}");
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<&str>) -> (u16, Value) {
        let r = http::request(
            method,
            &format!("{}{path}", self.base),
            body.map(|b| b.as_bytes().to_vec()),
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

    /// Expects an error reply: status, `error` phrase, and a detail containing `detail`.
    async fn refused(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        status: u16,
        error: &str,
        detail: &str,
    ) {
        let (st, v) = self.call(method, path, body).await;
        assert_eq!(st, status, "{path} {body:?}: {v}");
        assert_eq!(v["error"], error, "{path} {body:?}: {v}");
        let d = v["detail"].as_str().unwrap_or_default();
        assert!(
            d.contains(detail),
            "{path} {body:?}: detail {d:?} lacks {detail:?}"
        );
    }

    async fn vm_names(&self) -> Vec<String> {
        let (st, v) = self.call(Method::GET, "/v1/vms", None).await;
        assert_eq!(st, 200, "{v}");
        v.as_array()
            .unwrap()
            .iter()
            .map(|vm| vm["name"].as_str().unwrap().to_string())
            .collect()
    }
}

fn vm(name: &str, vcpus: u32, memory_mib: u64) -> String {
    json!({"name": name, "vcpus": vcpus, "memory_mib": memory_mib, "kernel": "builtin:testguest"})
        .to_string()
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_creates_nothing() {
    let api = Api::start().await;
    use Method as M;
    // Unknown VM.
    api.refused(M::GET, "/v1/vms/nope", None, 404, "unknown VM", "\"nope\"")
        .await;
    api.refused(
        M::DELETE,
        "/v1/vms/nope",
        None,
        404,
        "unknown VM",
        "\"nope\"",
    )
    .await;
    api.refused(
        M::POST,
        "/v1/vms/nope/migrate",
        Some("{}"),
        404,
        "unknown VM",
        "\"nope\"",
    )
    .await;
    api.refused(M::GET, "/v1/hosts/h9", None, 404, "unknown host", "\"h9\"")
        .await;
    api.refused(M::GET, "/v1/tasks/77", None, 404, "unknown task", "77")
        .await;
    api.refused(
        M::GET,
        "/v1/tasks/x",
        None,
        400,
        "invalid input",
        "not a number",
    )
    .await;
    // No host fits: 64 vCPUs on 4-core hosts (16 vCPUs each), and more memory than any host has.
    api.refused(
        M::POST,
        "/v1/vms",
        Some(&vm("big", 64, 64)),
        409,
        "no host fits",
        "",
    )
    .await;
    api.refused(
        M::POST,
        "/v1/vms",
        Some(&vm("fat", 1, 8192)),
        409,
        "no host fits",
        "",
    )
    .await;
    // A pin to a host that does not exist.
    let pinned = json!({"name": "p", "vcpus": 1, "memory_mib": 64, "kernel": "builtin:testguest", "host": "h9"});
    api.refused(
        M::POST,
        "/v1/vms",
        Some(&pinned.to_string()),
        404,
        "unknown host",
        "h9",
    )
    .await;
    // Bad JSON, wrong types, unknown fields, missing fields.
    api.refused(
        M::POST,
        "/v1/vms",
        Some("{\"name\": "),
        400,
        "bad JSON",
        "EOF",
    )
    .await;
    api.refused(
        M::POST,
        "/v1/vms",
        Some(""),
        400,
        "bad JSON",
        "not a valid VM",
    )
    .await;
    let wrong = r#"{"name":"a","vcpus":"one","memory_mib":64,"kernel":"builtin:testguest"}"#;
    api.refused(
        M::POST,
        "/v1/vms",
        Some(wrong),
        400,
        "bad JSON",
        "invalid type: string \"one\"",
    )
    .await;
    let unknown =
        r#"{"name":"a","vcpus":1,"memory_mib":64,"kernel":"builtin:testguest","colour":"red"}"#;
    api.refused(
        M::POST,
        "/v1/vms",
        Some(unknown),
        400,
        "bad JSON",
        "unknown field `colour`",
    )
    .await;
    api.refused(
        M::POST,
        "/v1/vms",
        Some(r#"{"name":"a"}"#),
        400,
        "bad JSON",
        "missing field `vcpus`",
    )
    .await;
    api.refused(
        M::POST,
        "/v1/hosts/h1/maintenance",
        Some(r#"{"enter":"yes"}"#),
        400,
        "bad JSON",
        "invalid type",
    )
    .await;
    api.refused(
        M::POST,
        "/v1/vms/a/migrate",
        Some(r#"{"target":"h2"}"#),
        400,
        "bad JSON",
        "unknown field `target`",
    )
    .await;
    // Invalid names.
    api.refused(
        M::POST,
        "/v1/vms",
        Some(&vm("Web_1", 1, 64)),
        400,
        "invalid input",
        "invalid VM name \"Web_1\"",
    )
    .await;
    api.refused(
        M::POST,
        "/v1/vms",
        Some(&vm(&"a".repeat(64), 1, 64)),
        400,
        "invalid input",
        "1-63 characters",
    )
    .await;
    api.refused(
        M::GET,
        "/v1/vms/Bad.Name",
        None,
        400,
        "invalid input",
        "invalid VM name",
    )
    .await;
    api.refused(
        M::GET,
        "/v1/hosts/-h",
        None,
        400,
        "invalid input",
        "invalid host name",
    )
    .await;
    // Sizes out of range, with the range.
    api.refused(
        M::POST,
        "/v1/vms",
        Some(&vm("a", 0, 64)),
        400,
        "invalid input",
        "vcpus = 0 is out of range: allowed 1..=64",
    )
    .await;
    api.refused(
        M::POST,
        "/v1/vms",
        Some(&vm("a", 65, 64)),
        400,
        "invalid input",
        "allowed 1..=64",
    )
    .await;
    api.refused(
        M::POST,
        "/v1/vms",
        Some(&vm("a", 1, 8)),
        400,
        "invalid input",
        "memory_mib = 8 is out of range: allowed 16..=1048576",
    )
    .await;
    let prio = json!({"name": "a", "vcpus": 1, "memory_mib": 64, "kernel": "builtin:testguest", "restart_priority": 101});
    api.refused(
        M::POST,
        "/v1/vms",
        Some(&prio.to_string()),
        400,
        "invalid input",
        "restart_priority = 101",
    )
    .await;
    api.refused(
        M::GET,
        "/v1/events?since=x",
        None,
        400,
        "invalid input",
        "since=\"x\"",
    )
    .await;
    // Nothing was created by any of it.
    assert!(api.vm_names().await.is_empty());
    let (_, hosts) = api.call(M::GET, "/v1/hosts", None).await;
    assert!(
        hosts
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["vms"].as_array().unwrap().is_empty()),
        "{hosts}"
    );
    let (_, events) = api.call(M::GET, "/v1/events", None).await;
    assert!(!events.to_string().contains("vm_placed"), "{events}");

    // A good request: 201 with name, host and state; the name is then taken.
    let (st, v) = api
        .call(M::POST, "/v1/vms", Some(&vm("web-1", 1, 64)))
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["name"], "web-1");
    assert!(v["host"] == "h1" || v["host"] == "h2", "{v}");
    assert_eq!(v["state"], "starting");
    api.refused(
        M::POST,
        "/v1/vms",
        Some(&vm("web-1", 1, 64)),
        409,
        "already exists",
        "web-1",
    )
    .await;
    assert_eq!(api.vm_names().await, ["web-1"]);
    // A VM that is not running cannot be migrated.
    api.refused(
        M::POST,
        "/v1/vms/web-1/migrate",
        Some(r#"{"to":null}"#),
        409,
        "conflict",
        "web-1",
    )
    .await;
    // Deleted: gone, or `stopped` while its host (unreachable here) has not confirmed it is.
    let (st, _) = api.call(M::DELETE, "/v1/vms/web-1", None).await;
    assert_eq!(st, 204);
    let (st, v) = api.call(M::GET, "/v1/vms/web-1", None).await;
    assert!(
        st == 404 || (st == 200 && v["state"] == "stopped"),
        "{st} {v}"
    );
    api.refused(
        M::GET,
        "/v1/nothing",
        None,
        404,
        "not found",
        "/openapi.json",
    )
    .await;
    drop(api.shell);
}

#[tokio::test]
async fn a_change_that_cannot_be_stored_is_refused_and_leaves_nothing_behind() {
    let api = Api::start().await;
    api.shell.shared().store().set_fail_writes(true);
    let (st, v) = api
        .call(Method::POST, "/v1/vms", Some(&vm("db-1", 1, 64)))
        .await;
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["error"], "not stored");
    assert!(
        v["detail"].as_str().unwrap().contains("stepped down"),
        "{v}"
    );
    api.shell.shared().store().set_fail_writes(false);
    // The next term starts from the store, which never got the VM.
    let generation = api.shell.wait_leading(Duration::from_secs(5)).await;
    assert_eq!(generation, Some(2), "a new term after stepping down");
    api.report_all().await;
    assert!(api.vm_names().await.is_empty());
    // The same request now succeeds, and survives another term.
    let (st, v) = api
        .call(Method::POST, "/v1/vms", Some(&vm("db-1", 1, 64)))
        .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = api
        .call(
            Method::POST,
            "/v1/hosts/h1/maintenance",
            Some(r#"{"enter":true}"#),
        )
        .await;
    assert_eq!(st, 202, "{v}");
    assert!(v["task"].as_u64().is_some(), "{v}");
    api.shell.shared().store().set_fail_writes(true);
    let (st, v) = api
        .call(
            Method::POST,
            "/v1/hosts/h2/maintenance",
            Some(r#"{"enter":true}"#),
        )
        .await;
    assert_eq!(st, 503, "{v}");
    api.shell.shared().store().set_fail_writes(false);
    assert_eq!(
        api.shell.wait_leading(Duration::from_secs(5)).await,
        Some(3)
    );
    api.report_all().await;
    assert_eq!(api.vm_names().await, ["db-1"]);
    let (_, h1) = api.call(Method::GET, "/v1/hosts/h1", None).await;
    let (_, h2) = api.call(Method::GET, "/v1/hosts/h2", None).await;
    assert_eq!(
        (h1["maintenance"].clone(), h2["maintenance"].clone()),
        (json!(true), json!(false))
    );
}

#[tokio::test]
async fn openapi_lists_the_v1_paths_and_schemas_and_metrics_are_prometheus_text() {
    let api = Api::start().await;
    let (st, doc) = api.call(Method::GET, "/openapi.json", None).await;
    assert_eq!(st, 200);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/v1/hosts",
        "/v1/hosts/{name}",
        "/v1/hosts/{name}/maintenance",
        "/v1/vms",
        "/v1/vms/{name}",
        "/v1/vms/{name}/migrate",
        "/v1/tasks/{id}",
        "/v1/events",
        "/v1/agent/reports",
    ] {
        assert!(paths.contains_key(p), "{p} missing from {:?}", paths.keys());
    }
    assert!(paths["/v1/vms"]["post"].is_object());
    assert!(paths["/v1/vms/{name}"]["delete"].is_object());
    let schemas = &doc["components"]["schemas"];
    let create = &schemas["VmCreate"];
    let required: Vec<&str> = create["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for f in ["name", "vcpus", "memory_mib", "kernel"] {
        assert!(required.contains(&f), "{f} not required in {create}");
    }
    for s in [
        "VmInfo",
        "HostInfo",
        "ErrorBody",
        "TaskInfo",
        "EventInfo",
        "MigrateRequest",
    ] {
        assert!(schemas[s].is_object(), "schema {s} missing");
    }
    // post_copy_after: optional, with its range.
    let pc = &schemas["MigrateRequest"]["properties"]["post_copy_after"];
    assert_eq!(
        (pc["minimum"].as_f64(), pc["maximum"].as_f64()),
        (Some(1.0), Some(1000.0)),
        "{pc}"
    );
    assert!(
        schemas["MigrateRequest"]["required"]
            .as_array()
            .is_none_or(|r| !r.iter().any(|f| f == "post_copy_after")),
        "{}",
        schemas["MigrateRequest"]
    );
    // Every reference resolves.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 20, "{all:?}");
    for r in &all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected reference {r}"));
        assert!(schemas[name].is_object(), "{r} does not resolve");
    }
    let body = paths["/v1/vms"]["post"]["requestBody"].to_string();
    assert!(body.contains("#/components/schemas/VmCreate"), "{body}");

    let r = http::request(
        Method::GET,
        &format!("{}/metrics", api.base),
        None,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let text = String::from_utf8(r.body).unwrap();
    for line in [
        "tern_controller_leader 1",
        "tern_controller_generation 1",
        "tern_hosts{state=\"up\"} 2",
        "tern_vms{state=\"running\"} 0",
        "tern_migrations_total{result=\"succeeded\"} 0",
        "tern_migration_duration_seconds_count 0",
        "tern_migration_duration_seconds_sum 0",
        "tern_ha_restarts_total 0",
        "tern_controller_elections_won_total 1",
        "# TYPE tern_migration_duration_seconds histogram",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing from\n{text}"
        );
    }
}

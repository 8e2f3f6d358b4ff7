//! The dashboard's endpoints in-process (the real router and core behind the in-memory store, no
//! etcd, no browser): `GET /` is the page with its security headers, `GET /dashboard/leader` says
//! who leads, and `GET /v1/tasks` (the migrations panel's source) lists tasks, filters the active
//! ones and refuses a query it does not know. The page in a real browser is
//! `crates/tern/tests/cluster_dashboard.rs`.

use std::time::Duration;

use serde_json::{Value, json};
use tern_api::agent::HostRecord;
use tern_api::cluster::HostCapacity;
use tern_controller::core::Config;
use tern_controller::shell::Shell;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const URL: &str = "http://in-memory";

/// A leading in-memory controller with two empty hosts that have reported; its API's address.
async fn start() -> String {
    let shell = Shell::in_memory(Config::default(), URL);
    let generation = shell.wait_leading(Duration::from_secs(5)).await;
    assert_eq!(generation, Some(1));
    for (name, lease) in [("h1", 1), ("h2", 2)] {
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
    let addr = listener.local_addr().unwrap().to_string();
    let s = shell.clone();
    tokio::spawn(async move { s.serve_on(listener).await });
    for (seq, host) in ["h1", "h2"].into_iter().enumerate() {
        let report = json!({"host": host, "generation_seen": 1, "seq": seq + 1,
            "last_command_id": 0, "vms": [], "cpu_utilization": 0.1});
        let (status, _, body) = call(&addr, "POST", "/v1/agent/reports", Some(report)).await;
        assert_eq!(status, 204, "{body}");
    }
    addr
}

/// One HTTP/1.1 request: status, head (lower-cased) and body (JSON, or the text as a string).
async fn call(addr: &str, method: &str, path: &str, body: Option<Value>) -> (u16, String, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.into()));
    (status, head.to_ascii_lowercase(), body)
}

#[tokio::test]
async fn the_page_is_served_with_its_policy_and_the_leader_endpoint_names_the_leader() {
    let addr = start().await;
    let (status, head, body) = call(&addr, "GET", "/", None).await;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(head.contains("cache-control: no-cache"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    let csp = head
        .lines()
        .find_map(|l| l.strip_prefix("content-security-policy: "))
        .expect("a Content-Security-Policy");
    assert!(csp.starts_with("default-src 'none';"), "{csp}");
    assert_eq!(csp.matches("'sha256-").count(), 2, "{csp}");
    assert!(!csp.contains("unsafe"), "{csp}");
    let page = body.as_str().unwrap();
    assert!(page.contains("<title>Tern cluster</title>"));

    let (status, head, who) = call(&addr, "GET", "/dashboard/leader", None).await;
    assert_eq!(status, 200, "{who}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    assert_eq!(
        who,
        json!({"leading": true, "generation": 1, "url": URL, "leader_url": URL})
    );
}

#[tokio::test]
async fn tasks_are_listed_oldest_first_filtered_by_active_and_a_bad_query_is_refused() {
    let addr = start().await;
    let (status, _, all) = call(&addr, "GET", "/v1/tasks", None).await;
    assert_eq!((status, all), (200, json!([])));
    // Two maintenance tasks (the hosts are empty: each ends at once or soon).
    let mut ids = Vec::new();
    for host in ["h1", "h2"] {
        let path = format!("/v1/hosts/{host}/maintenance");
        let (status, _, r) = call(&addr, "POST", &path, Some(json!({"enter": true}))).await;
        assert_eq!(status, 202, "{r}");
        ids.push(r["task"].as_u64().unwrap());
    }
    let (status, _, all) = call(&addr, "GET", "/v1/tasks", None).await;
    assert_eq!(status, 200, "{all}");
    let listed: Vec<u64> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, ids, "oldest first: {all}");
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .all(|t| t["kind"] == "maintenance")
    );
    let (status, _, explicit) = call(&addr, "GET", "/v1/tasks?active=false", None).await;
    assert_eq!(status, 200);
    assert_eq!(explicit, all);
    // Hosts with no VMs are emptied at once: nothing is active. (A running task listed as active
    // is checked in the browser test, a migration held in flight.)
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .all(|t| t["state"] == "succeeded"),
        "{all}"
    );
    let (status, _, active) = call(&addr, "GET", "/v1/tasks?active=true", None).await;
    assert_eq!((status, active), (200, json!([])));
    for query in ["active=yes", "state=running", "active"] {
        let (status, _, r) = call(&addr, "GET", &format!("/v1/tasks?{query}"), None).await;
        assert_eq!(status, 400, "{query}: {r}");
        assert_eq!(r["error"], "invalid input", "{r}");
        let detail = r["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("{query:?}")) && detail.contains("active=true|false"),
            "{detail}"
        );
    }
}

//! Talking to one `tern agent` over its HTTP API, as the controller does: its status, its
//! commands, the command that starts a test-guest VM.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};

/// One HTTP/1.1 request; the status code and the body.
pub fn http(method: &str, addr: &str, path: &str, body: Option<&Value>) -> (u16, String) {
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

/// `GET /v1/agent/status` (which must answer 200).
pub fn status(addr: &str) -> Value {
    let (code, body) = http("GET", addr, "/v1/agent/status", None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `POST /v1/agent/commands` with command `id` of `body` under controller generation
/// `generation` and host lease `lease` (which must answer 200); the agent's answer.
pub fn command(addr: &str, generation: u64, id: u64, lease: u64, body: Value) -> Value {
    let cmd = json!({"generation": generation, "id": id, "host_lease": lease, "body": body});
    let (code, text) = http("POST", addr, "/v1/agent/commands", Some(&cmd));
    assert_eq!(code, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// The body of a command that starts `name`: a 1-vCPU, 64 MiB test guest with `cmdline`, no disk.
pub fn start_vm_body(name: &str, cmdline: &str) -> Value {
    json!({"op": "start", "disk_url": null, "spec": {
        "name": name, "vcpus": 1, "memory_mib": 64, "kernel": "builtin:testguest",
        "cmdline": cmdline, "disk": null, "host": null, "anti_affinity": null,
        "restart_priority": 50}})
}

/// The entry for VM `name` in an agent's status or telemetry report.
pub fn vm_of<'a>(report: &'a Value, name: &str) -> Option<&'a Value> {
    report["vms"].as_array()?.iter().find(|v| v["name"] == name)
}

//! Set-ups shared by the controller's integration tests: a ready controller core driven
//! directly, and an in-memory shell serving its API over fake agents.

// Each test binary compiles this module on its own and uses only some of its items.
#![allow(dead_code)]

use std::time::Duration;

use axum::Router;
use hyper::Method;
use serde_json::Value;
use tern_api::agent::{AgentReport, Command, CommandReply, HostRecord, ObservedState, ObservedVm};
use tern_api::cluster::{HostCapacity, VmCreate};
use tern_controller::core::{Action, Config, Controller, Input, VmRecord};
use tern_controller::shell::{Shell, http};

/// An agent's `done` answer.
pub fn done(listen: Option<&str>, report: Option<Value>) -> CommandReply {
    CommandReply::Done {
        listen: listen.map(Into::into),
        report,
        vm_state: None,
    }
}

/// The commands the core sent since the last call, as (host, command).
pub fn sent(c: &mut Controller) -> Vec<(String, Command)> {
    c.drain_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Send { host, command, .. } => Some((host, command)),
            _ => None,
        })
        .collect()
}

/// A leading, ready controller over h1 and h2 with VM `m` running on h1, at t = 3 ms.
pub fn cluster() -> Controller {
    let mut c = Controller::new(Config::default());
    for (i, h) in ["h1", "h2"].iter().enumerate() {
        let record = HostRecord {
            name: (*h).into(),
            agent_url: format!("http://{h}:7000"),
            capacity: HostCapacity {
                cores: 4,
                memory_mib: 16 * 1024,
                power_model: "hp-ml110-g5".into(),
                volume_node: None,
                volume_node_id: None,
            },
            lease: i as u64 + 1,
        };
        c.step(Input::HostUp(record), 0);
    }
    let spec = VmCreate {
        name: "m".into(),
        vcpus: 1,
        memory_mib: 64,
        kernel: "builtin:testguest".into(),
        cmdline: String::new(),
        disk: None,
        host: None,
        anti_affinity: None,
        restart_priority: 50,
    };
    let desired = vec![VmRecord {
        spec,
        host: Some("h1".into()),
        run: true,
    }];
    let elected = Input::Elected {
        generation: 1,
        desired,
        maintenance: vec![],
    };
    c.step(elected, 1);
    for (host, cmd) in sent(&mut c) {
        let reply = Input::Reply {
            cmd: cmd.id,
            seq: 1,
            reply: done(None, None),
        };
        c.step(reply, 2);
        let vms = if host == "h1" {
            vec![ObservedVm {
                name: "m".into(),
                state: ObservedState::Running,
                cpu_utilization: Some(0.2),
                rss_mib: Some(64),
                guest_resident_kib: None,
                guest_nonzero_kib: None,
                dirty_pages_per_sec: None,
            }]
        } else {
            vec![]
        };
        let report = AgentReport {
            host,
            generation_seen: 1,
            seq: 2,
            last_command_id: cmd.id,
            vms,
            cpu_utilization: Some(0.2),
            parked_cores: Some(0),
        };
        c.step(Input::Report(report), 3);
    }
    sent(&mut c);
    assert!(c.ready(), "every host reported");
    c
}

/// A leading in-memory shell (no host held in reserve for HA) with `hosts` registered, each
/// host's agent an HTTP server on a free local port answering with `agent(host)`, and the
/// controller's API served on another: (shell, the API's base URL).
pub async fn in_memory_shell(hosts: &[&str], agent: impl Fn(&str) -> Router) -> (Shell, String) {
    let cfg = Config {
        ha_reserve_hosts: 0,
        ..Config::default()
    };
    let shell = Shell::in_memory(cfg, "http://in-memory");
    assert_eq!(shell.wait_leading(Duration::from_secs(5)).await, Some(1));
    for (i, host) in hosts.iter().enumerate() {
        let app = agent(host);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        shell
            .host_up(HostRecord {
                name: host.to_string(),
                agent_url: url,
                capacity: HostCapacity {
                    cores: 4,
                    memory_mib: 8192,
                    power_model: "hp-ml110-g5".into(),
                    volume_node: None,
                    volume_node_id: None,
                },
                lease: 100 + i as u64,
            })
            .await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let s = shell.clone();
    tokio::spawn(async move { s.serve_on(listener).await });
    (shell, base)
}

/// Spawns the fake agents' reports: every 100 ms, for each of `hosts`, `report(host, the
/// leader's generation)` posted to the controller at `base` (`None`: that host stays silent).
pub fn spawn_reports(
    shell: Shell,
    base: String,
    hosts: &'static [&'static str],
    mut report: impl FnMut(&str, u64) -> Option<AgentReport> + Send + 'static,
) {
    tokio::spawn(async move {
        loop {
            let generation = shell.shared().core().generation().unwrap_or(0);
            for host in hosts {
                let Some(report) = report(host, generation) else {
                    continue;
                };
                let body = serde_json::to_vec(&report).unwrap();
                let url = format!("{base}/v1/agent/reports");
                let _ = http::request(Method::POST, &url, Some(body), Duration::from_secs(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

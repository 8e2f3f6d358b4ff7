//! The shell's duties around the core, in-process with the in-memory store (no etcd):
//!
//! * no command goes out once the election lease's deadline has passed: the shell steps down
//!   instead (and, in memory, takes office again with a higher generation);
//! * a lost host's disk leases are fenced through a live host's volume node (a real volume node
//!   served in-process): the lease it held is free at a higher epoch, and the core hears how many
//!   were fenced; a host with no volume node is fenced at once (it can hold no disk lease).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_api::agent::{AgentReport, HostRecord};
use tern_api::cluster::{HostCapacity, HostState, VmCreate};
use tern_controller::core::{Config, Input};
use tern_controller::shell::Shell;
use tern_volume::control::{self, LeaseAction, Request};
use tern_volume::format::{EXTENT_SIZE, MIN_LUN_SIZE};
use tern_volume::lun::FileLun;
use tern_volume::node::{Node, NodeConfig, NodeExports};
use tern_volume::store::{self, FormatOptions};

fn host(name: &str, lease: u64, volume: Option<(&str, u32)>) -> HostRecord {
    HostRecord {
        name: name.into(),
        agent_url: "http://127.0.0.1:9".into(),
        capacity: HostCapacity {
            cores: 4,
            memory_mib: 4096,
            power_model: "hp-ml110-g5".into(),
            volume_node: volume.map(|(a, _)| a.to_string()),
            volume_node_id: volume.map(|(_, id)| id),
        },
        lease,
    }
}

async fn wait(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn no_command_goes_out_after_the_lease_deadline() {
    let shell = Shell::in_memory(Config::default(), "http://in-memory");
    assert_eq!(shell.wait_leading(Duration::from_secs(5)).await, Some(1));
    // The deadline passes; the next host to register would get a command (the leader's ping).
    shell.set_lease_deadline(shell.shared().now_ms());
    shell.host_up(host("h1", 1, None)).await;
    let events = shell.shared().core().events(0);
    assert!(
        events.iter().any(|e| e.kind == "deposed"),
        "the shell stepped down: {events:?}"
    );
    // In memory it takes office again, with a higher generation.
    assert_eq!(shell.wait_leading(Duration::from_secs(5)).await, Some(2));
}

/// A formatted LUN served by one in-process volume node (the coordinator, node id 1).
fn volume_node(dir: &std::path::Path) -> String {
    let lun = dir.join("lun");
    std::fs::File::create(&lun)
        .unwrap()
        .set_len(MIN_LUN_SIZE + 15 * EXTENT_SIZE)
        .unwrap();
    store::format(
        &FileLun::open(&lun).unwrap(),
        FormatOptions {
            force: false,
            uuid: [4; 16],
        },
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let node = Node::new(
        NodeConfig {
            node_id: 1,
            listen: addr.clone(),
            no_direct: false,
            lease_ttl_ms: 600_000,
            lun: lun.clone(),
            fault_file: None,
        },
        &lun,
    )
    .unwrap();
    node.become_coordinator(1, u64::MAX).unwrap();
    std::thread::spawn(move || tern_nbd::run_listener(listener, Arc::new(NodeExports(node))));
    addr
}

fn ctl(addr: &str, req: Request) -> control::Response {
    control::request(addr, &req, false, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{req:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_hosts_disk_leases_are_fenced_through_a_live_hosts_volume_node() {
    let dir = tempfile::tempdir().unwrap();
    let addr = volume_node(dir.path());
    // Volume node 1 writes vm1.raw (as h1's VMM would).
    ctl(
        &addr,
        Request::Create {
            name: "vm1.raw".into(),
            size: 1 << 20,
            preallocated: true,
        },
    );
    let epoch = ctl(
        &addr,
        Request::Lease {
            name: "vm1.raw".into(),
            action: LeaseAction::Acquire,
        },
    )
    .into_lease()
    .unwrap()
    .epoch;

    let cfg = Config {
        fence_margin_ms: 100,
        ..Config::default()
    };
    let shell = Shell::in_memory(cfg, "http://in-memory");
    assert_eq!(shell.wait_leading(Duration::from_secs(5)).await, Some(1));
    // h1 serves volume node 1; h2 reaches the same volume through its own node (here the same
    // address); h3 has no volume node.
    shell.host_up(host("h1", 1, Some((&addr, 1)))).await;
    shell.host_up(host("h2", 2, Some((&addr, 2)))).await;
    shell.host_up(host("h3", 3, None)).await;

    shell.host_expired("h1").await;
    shell.host_expired("h3").await;
    let state = |h: &str| shell.shared().core().host(h).unwrap().state;
    wait("h1 and h3 fenced", Duration::from_secs(20), || {
        state("h1") == HostState::Fenced && state("h3") == HostState::Fenced
    })
    .await;
    let events = shell.shared().core().events(0);
    let fenced: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "leases_fenced")
        .map(|e| e.message.as_str())
        .collect();
    assert!(
        fenced.contains(&"1 disk lease(s) of h1 fenced"),
        "{fenced:?}"
    );
    assert!(
        fenced.contains(&"0 disk lease(s) of h3 fenced"),
        "{fenced:?}"
    );
    assert_eq!(state("h2"), HostState::Up);
    // The volume agrees: free, one epoch up.
    let f = ctl(
        &addr,
        Request::Stat {
            name: "vm1.raw".into(),
            map: false,
        },
    )
    .into_file()
    .unwrap();
    assert_eq!((f.lease.holder, f.lease.epoch), (None, epoch + 1));
}

#[tokio::test]
async fn a_change_stored_before_the_deadline_cut_its_command_short_stands() {
    let cfg = Config {
        ha_reserve_hosts: 0,
        ..Config::default()
    };
    let shell = Shell::in_memory(cfg, "http://in-memory");
    assert_eq!(shell.wait_leading(Duration::from_secs(5)).await, Some(1));
    shell.host_up(host("h1", 1, None)).await;
    let report = |generation: u64, seq: u64| {
        Input::Report(AgentReport {
            host: "h1".into(),
            generation_seen: generation,
            seq,
            last_command_id: 0,
            vms: vec![],
            cpu_utilization: None,
            parked_cores: None,
        })
    };
    shell.shared().feed(report(1, 1)).await;
    // The VM's record is stored first; its start command would go out after the deadline.
    shell.set_lease_deadline(shell.shared().now_ms());
    let spec: VmCreate = serde_json::from_value(serde_json::json!({
        "name": "web-1", "vcpus": 1, "memory_mib": 64, "kernel": "builtin:testguest"
    }))
    .unwrap();
    let vm = shell
        .shared()
        .api(|c, now| c.create_vm(spec, now))
        .await
        .expect("stored, so it stands");
    assert_eq!(vm.host.as_deref(), Some("h1"));
    // The next term finds it in the store.
    assert_eq!(shell.wait_leading(Duration::from_secs(5)).await, Some(2));
    assert!(shell.shared().core().vm("web-1").is_ok());
}

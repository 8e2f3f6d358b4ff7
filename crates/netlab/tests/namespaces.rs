//! Builds real network namespaces (needs root): hosts reach each other and the client across the
//! switch, and the switch learns where a MAC moved.

use std::process::Command;

use tern_netlab::{Topology, TopologySpec};
use tern_test_support::require_root_for;

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ping(ns: &str, addr: std::net::Ipv4Addr) -> bool {
    Topology::command_in(ns, "ping")
        .args(["-c", "1", "-W", "2", &addr.to_string()])
        .output()
        .expect("spawn ping")
        .status
        .success()
}

#[test]
fn hosts_and_client_reach_each_other_and_the_switch_follows_a_moved_mac() {
    require_root_for("it builds network namespaces");
    let name = format!("tnl{}", std::process::id());
    let mut spec = TopologySpec::new(&name, 2);
    spec.replace_stale = true;
    let topo = Topology::build(spec).expect("build topology");

    let client = topo.client_ns().expect("client");
    assert!(ping(&client, topo.host_addr(0)), "client reaches host 0");
    assert!(ping(&client, topo.host_addr(1)), "client reaches host 1");
    assert!(
        ping(&topo.host_ns(0), topo.host_addr(1)),
        "host 0 reaches host 1"
    );

    // A stand-in VM port: a veth whose far end carries the "guest" address and MAC, first on host 0.
    let mac = "52:54:00:aa:bb:01";
    let guest = Topology::guest_addr(0);
    for host in 0..2 {
        let ns = topo.host_ns(host);
        ok(Command::new("ip").args([
            "-n", &ns, "link", "add", "vmtap", "type", "veth", "peer", "name", "vmeth",
        ]));
        ok(Command::new("ip").args(["-n", &ns, "link", "set", "vmeth", "address", mac]));
        topo.attach_to_host_bridge(host, "vmtap").expect("attach");
        ok(Command::new("ip").args(["-n", &ns, "link", "set", "vmeth", "up"]));
        ok(Command::new("ip").args([
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{guest}/32"),
            "dev",
            "vmeth",
        ]));
        ok(Command::new("ip").args([
            "-n",
            &ns,
            "route",
            "add",
            &format!("{}/32", Topology::client_addr()),
            "dev",
            "vmeth",
        ]));
        // The "guest" speaks: the switch learns its port.
        ok(Topology::command_in(&ns, "ping").args([
            "-c",
            "1",
            "-W",
            "2",
            "-I",
            "vmeth",
            &Topology::client_addr().to_string(),
        ]));
        let port = topo.switch_port_of_mac(mac).expect("fdb");
        assert_eq!(
            port.as_deref(),
            Some(topo.switch_port_of_host(host).as_str()),
            "after speaking from host {host}"
        );
        // Leave host `host`: remove the port, as a migrated VM's tap goes away.
        ok(Command::new("ip").args(["-n", &ns, "link", "del", "vmtap"]));
    }

    let namespaces = topo.namespaces();
    topo.teardown().expect("teardown");
    let left = tern_netlab::list_namespaces().expect("list");
    assert!(
        namespaces.iter().all(|ns| !left.contains(ns)),
        "teardown removed every namespace"
    );
}

#[test]
fn building_over_an_existing_namespace_is_refused_without_replace() {
    require_root_for("it builds network namespaces");
    let name = format!("tnx{}", std::process::id());
    let mut spec = TopologySpec::new(&name, 1);
    spec.client = false;
    let first = Topology::build(spec.clone()).expect("first build");
    let err = Topology::build(spec).expect_err("second build must be refused");
    assert!(err.to_string().contains("already exists"), "{err}");
    // The refused build must not have deleted the first one's namespaces.
    assert!(
        tern_netlab::list_namespaces()
            .unwrap()
            .contains(&first.switch_ns())
    );
    let reopened = Topology::open(&name).unwrap().expect("open finds it");
    assert_eq!(reopened.spec().hosts, 1);
    assert!(!reopened.spec().client);
    drop(reopened); // not owned: leaves the namespaces
    assert!(
        tern_netlab::list_namespaces()
            .unwrap()
            .contains(&first.switch_ns())
    );
    drop(first);
    assert!(
        !tern_netlab::list_namespaces()
            .unwrap()
            .contains(&format!("{name}-sw"))
    );
}

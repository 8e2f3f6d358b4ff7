//! Live migration between two "hosts" that are network namespaces built with tern-netlab: the
//! source VMM runs in h0, the target in h1, and the streams go over the hosts' addresses through
//! the switch. Idle, 20,000 pages/s over 256 MiB and maximum-rate dirtying, each verified.

mod common;

use common::MigrationPair;
use tern_netlab::{Topology, TopologySpec};

fn over_two_hosts(tag: &str, memory_mib: u64, cmdline: &str) {
    common::require_kvm();
    let spec = TopologySpec {
        client: false,
        replace_stale: true,
        ..TopologySpec::new(format!("{tag}{}", std::process::id() % 10_000), 2)
    };
    let topo = Topology::build(spec).expect("build the two-host topology (needs root, iproute2)");
    let mut p = MigrationPair::start_on(
        Some(&topo.host_ns(0)),
        Some((&topo.host_ns(1), topo.host_addr(1))),
        memory_mib,
        1,
        cmdline,
        &[],
    );
    let (rc, report, err) = p.migrate(&["--verify-memory", "--streams", "2"]);
    assert_eq!(rc, 0, "migrate failed: {err}\nreport: {report}");
    assert_eq!(report["outcome"], "completed", "{report}");
    p.assert_moved();
    drop(p);
    topo.teardown().expect("tear down the topology");
}

#[test]
fn idle_guest_moves_between_two_namespaced_hosts() {
    over_two_hosts("mgi", 64, "tern.hb_ms=50");
}

#[test]
fn moderately_dirtying_guest_moves_between_two_namespaced_hosts() {
    over_two_hosts(
        "mgm",
        300,
        "tern.hb_ms=50 tern.dirty_mib=256 tern.dirty_rate=20000",
    );
}

#[test]
fn maximum_rate_guest_moves_between_two_namespaced_hosts() {
    over_two_hosts(
        "mgx",
        300,
        "tern.hb_ms=50 tern.dirty_mib=256 tern.dirty_rate=0",
    );
}

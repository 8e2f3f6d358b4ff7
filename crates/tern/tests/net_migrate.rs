//! Live migration with the network: the test guest moves from host h0 to host h1 of a tern-netlab
//! topology while a client holds a TCP connection to its echo server. The connection must survive
//! with every byte echoed once and in order, and the switch must follow the VM to h1.
//!
//! The announce is what makes the network follow a guest that has nothing to say: with a
//! connection that is idle across the migration, the first request after it is answered at once
//! with the announce, and stalls (the switch still sends it to h0) without it.
//!
//! Needs root and /dev/kvm; without them these tests fail with a message saying so.

mod common;

use tern_netlab::scenario::{MigrationScenario, run_migration};
use tern_netlab::{Topology, TopologySpec};

fn topology(name: &str) -> Topology {
    common::require_kvm();
    let mut spec = TopologySpec::new(name, 2);
    spec.replace_stale = true;
    Topology::build(spec).unwrap_or_else(|e| panic!("cannot build topology {name}: {e}"))
}

/// The `outcome` of a migration's JSON report.
fn outcome(migration: Option<&serde_json::Value>) -> Option<&str> {
    migration?.get("outcome")?.as_str()
}

#[test]
fn a_streaming_tcp_connection_survives_migration_between_hosts() {
    let topo = topology("tnmig");
    let dir = common::scratch();
    let out = run_migration(&topo, &MigrationScenario::new(common::tern(), dir.path()))
        .unwrap_or_else(|e| panic!("migration: {e}"));
    eprintln!(
        "streaming: {} requests, max stall {:.1} ms, migration {:?}",
        out.echo.requests, out.echo.max_stall_ms, out.migration
    );
    assert!(!out.echo.connection_broken, "{:?}", out.echo);
    assert!(!out.echo.mismatched, "{:?}", out.echo);
    assert!(out.echo.requests > 200, "{:?}", out.echo);
    assert_eq!(out.switch_port_after.as_deref(), Some("h1"));
    let outcome = outcome(out.migration.as_ref());
    assert_eq!(outcome, Some("completed"), "{:?}", out.migration);
    assert!(
        out.target_console.iter().any(|l| l.starts_with("HB ")),
        "the guest's heartbeats continue on the target: {:?}",
        out.target_console
    );
}

#[test]
fn without_the_announce_an_idle_connection_stalls_after_migration() {
    let topo = topology("tnmiq");
    let dir = common::scratch();
    let mut s = MigrationScenario::new(common::tern(), dir.path());
    s.quiet = true;
    s.after = std::time::Duration::from_millis(1200);
    let with = run_migration(&topo, &s).unwrap_or_else(|e| panic!("with the announce: {e}"));
    s.announce = "off".into();
    let without = run_migration(&topo, &s).unwrap_or_else(|e| panic!("without the announce: {e}"));
    eprintln!(
        "idle across the migration: with the announce max stall {:.1} ms ({} requests, port {:?}); \
         without {:.1} ms ({} requests, broken {}, port {:?})",
        with.echo.max_stall_ms,
        with.echo.requests,
        with.switch_port_after,
        without.echo.max_stall_ms,
        without.echo.requests,
        without.echo.connection_broken,
        without.switch_port_after
    );
    assert!(
        !with.echo.connection_broken && !with.echo.mismatched,
        "{:?}",
        with.echo
    );
    assert_eq!(with.switch_port_after.as_deref(), Some("h1"));
    assert!(!without.echo.mismatched, "{:?}", without.echo);
    assert!(
        without.echo.connection_broken
            || without.echo.max_stall_ms > with.echo.max_stall_ms + 100.0,
        "without the announce the first request after the migration should stall: {:.1} ms vs {:.1} ms",
        without.echo.max_stall_ms,
        with.echo.max_stall_ms
    );
}

#[test]
fn a_streaming_connection_survives_migration_of_a_guest_writing_memory() {
    let topo = topology("tnmiw");
    let dir = common::scratch();
    let mut s = MigrationScenario::new(common::tern(), dir.path());
    s.writer = Some(tern_netlab::scenario::GuestWriter {
        mib: 64,
        pages_per_s: 20_000,
    });
    s.hb_ms = 50;
    let out = run_migration(&topo, &s).unwrap_or_else(|e| panic!("migration: {e}"));
    eprintln!(
        "with the writer: {} requests, max stall {:.1} ms (request sent {:?} ms after the migrate command), migration {:?}",
        out.echo.requests, out.echo.max_stall_ms, out.max_stall_at_ms, out.migration
    );
    assert!(!out.echo.connection_broken, "{:?}", out.echo);
    assert!(!out.echo.mismatched, "{:?}", out.echo);
    assert_eq!(out.switch_port_after.as_deref(), Some("h1"));
    let outcome = outcome(out.migration.as_ref());
    assert_eq!(outcome, Some("completed"), "{:?}", out.migration);
    // The writer checks every page it rewrites against what it wrote a pass earlier and panics on
    // a difference: its lines continuing on the target, with no panic, say memory moved whole.
    let target_dirty = out
        .target_console
        .iter()
        .filter(|l| l.starts_with("DIRTY pages="))
        .count();
    assert!(
        target_dirty >= 2 && !out.target_console.iter().any(|l| l.contains("PANIC")),
        "the writer runs on the target: {:?}",
        out.target_console
    );
    let started = out.migrate_started.expect("the migration was timed");
    assert!(
        out.source_console
            .iter()
            .any(|(at, l)| *at < started && l.starts_with("DIRTY pages=")),
        "the writer ran on the source before the migration: {:?}",
        out.source_console
    );
}

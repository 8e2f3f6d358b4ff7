//! `tern demo --json` as root (namespaces): the migration report carries the client's figures, and
//! the client's TCP connection to the guest survives the move.
//!
//! Needs root and /dev/kvm; without them this test fails with a message saying so.

mod common;

use std::process::Command;

#[test]
fn the_network_demo_reports_the_client_and_the_migration() {
    common::require_kvm();
    let out = Command::new(common::tern())
        .args(["demo", "--json"])
        .output()
        .expect("run tern demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tern demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["outcome"], "completed", "{v}");
    assert_eq!(v["connection_broken"], false, "{v}");
    assert!(v["requests"].as_u64().unwrap_or(0) > 100, "{v}");
    assert!(v["max_stall_ms"].as_f64().is_some_and(|s| s > 0.0), "{v}");
}

//! `tern demo` end to end: a busy guest live-migrated between two hosts (namespaces as root),
//! both ends' heartbeats shown with their host prefix, the report at the end.

mod common;

use common::{field, require_kvm, tern_cmd};

#[test]
fn the_demo_moves_the_guest_and_shows_both_ends() {
    require_kvm();
    let (rc, out, err) = tern_cmd(&["demo", "--memory-mib", "128"]);
    assert_eq!(rc, 0, "tern demo failed:\n{out}\n{err}");
    let last_src = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("h0 | "))
        .filter(|l| l.starts_with("HB "))
        .filter_map(|l| field(l, "seq"))
        .max()
        .expect("source heartbeats shown");
    let first_dst = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("h1 | "))
        .find(|l| l.starts_with("HB "))
        .and_then(|l| field(l, "seq"))
        .expect("target heartbeats shown");
    assert_eq!(first_dst, last_src + 1, "{out}");
    assert!(out.contains("outcome \"completed\""), "{out}");
    assert!(!out.contains("PANIC"), "{out}");
}

#[test]
fn the_demo_json_is_the_report_only() {
    require_kvm();
    let (rc, out, err) = tern_cmd(&["demo", "--loopback", "--json", "--memory-mib", "96"]);
    assert_eq!(rc, 0, "tern demo --json failed: {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["outcome"], "completed", "{v}");
    assert!(
        v["downtime_ms"].is_u64() && v["bytes_sent"].as_u64().unwrap() > 0,
        "{v}"
    );
}

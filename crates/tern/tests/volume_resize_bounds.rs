//! `tern volume resize` to sizes the volume cannot hold, against a real node (etcd on loopback, a
//! `tern volume serve` process on a LUN file): 2^64 − 1, 1 TiB + 1 and a preallocated file past the
//! volume's extents are each one clear error naming the size and the range, and the coordinator
//! keeps serving (status, a valid resize, reads through NBD) afterwards. Needs `etcd` on PATH.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tern_test_support::{ChildGuard, Etcd, free_port, wait_for};
use tern_volume::control::{self, Request};

const TERN: &str = env!("CARGO_BIN_EXE_tern");

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn resize_past_the_volume_is_a_clear_error_and_the_coordinator_keeps_serving() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let lun = dir.path().join("lun");
    let out = Command::new(TERN)
        .args(["volume", "format", "--size", "128M", "--lun"])
        .arg(&lun)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let addr = format!("127.0.0.1:{}", free_port());
    let log = dir.path().join("node.log");
    let _node = ChildGuard(
        Command::new(TERN)
            .args(["volume", "serve", "--node-id", "1", "--listen", &addr])
            .args(["--etcd", &etcd.url, "--lun"])
            .arg(&lun)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let status = || control::call(&addr, &Request::Status, false, Duration::from_secs(10));
    wait_for("the node to coordinate", Duration::from_secs(30), || {
        status().is_ok_and(|s| s["coordinator"]["node_id"].as_u64() == Some(1))
    });
    let run = |args: &[&str]| {
        Command::new(TERN)
            .args(args)
            .args(["--node", &addr])
            .output()
            .unwrap()
    };
    assert!(
        run(&["volume", "create", "a", "--size", "8M"])
            .status
            .success()
    );
    assert!(
        run(&["volume", "create", "p", "--size", "8M", "--preallocate"])
            .status
            .success()
    );

    for size in [u64::MAX.to_string(), ((1u64 << 40) + 1).to_string()] {
        let o = run(&["volume", "resize", "a", "--size", &size]);
        assert!(!o.status.success(), "resize to {size} must fail");
        let err = text(&o);
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(&format!("Invalid size {size}")) && err.contains("1 byte to 1 TiB"),
            "the error names the size and the range: {err}"
        );
    }
    // A preallocated file cannot take more extents than the volume has.
    let o = run(&["volume", "resize", "p", "--size", "1G"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("ENOSPC"), "{}", text(&o));

    // The coordinator is the same process, still serving: status, a valid resize, NBD reads.
    let s: Value = status().expect("the node still answers");
    assert_eq!(s["coordinator"]["node_id"], 1, "{s}");
    assert!(
        run(&["volume", "resize", "a", "--size", "16M"])
            .status
            .success()
    );
    let st: Value =
        serde_json::from_slice(&run(&["volume", "stat", "a", "--json"]).stdout).unwrap();
    assert_eq!(st["size"], 16u64 << 20);
    let mut c = tern_nbd::Client::connect(&addr, "a").unwrap();
    let mut b = vec![1u8; 4096];
    c.read((16 << 20) - 4096, &mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "a thin file's new tail reads as zeroes"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

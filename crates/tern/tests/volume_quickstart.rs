//! docs/volume.md's quick start, run as written: the `sh` blocks of the page are extracted and run
//! with bash against a scratch etcd and LUN. Only the fixed paths and ports are rewritten (to a
//! scratch directory and free ports, so parallel runs cannot clash); the test fails if any of them
//! disappears from the page, so the page and the test cannot drift apart unnoticed. `tern` is the
//! binary under test, put first on PATH; `debian.qcow2` is a small qcow2 made by the test.
//!
//! Then a clean stop: SIGTERM to node 2 announces the stop in its log, and node 1's `status` no
//! longer lists it (instead of showing it `direct` until its etcd lease ran out).
//!
//! Needs `etcd`, `qemu-img`, `qemu-io` on PATH; fails loudly without them.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tern_test_support::free_port;

const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// The contents of every fenced block opened with "```sh", in order.
fn sh_blocks(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in md.lines() {
        match (&mut cur, line.trim_end()) {
            (None, "```sh") => cur = Some(String::new()),
            (Some(_), "```") => out.extend(cur.take()),
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

fn tool(name: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is required for the quick-start test (etcd-server, qemu-utils)"
    );
}

/// Kills the script's process group (bash, etcd, the nodes) however the test ends.
struct Group(i32);
impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .status();
    }
}

fn tern(args: &[&str]) -> std::process::Output {
    Command::new(TERN).args(args).output().unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = tern(args);
    assert!(
        out.status.success(),
        "tern {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The pid of the process in group `pgid` whose command line contains `needle`.
fn pid_in_group(pgid: i32, needle: &str) -> Option<i32> {
    let out = Command::new("ps")
        .args(["-o", "pid=,pgid=,args=", "-e"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let pid: i32 = f.next()?.parse().ok()?;
        let g: i32 = f.next()?.parse().ok()?;
        (g == pgid && l.contains(needle)).then_some(pid)
    })
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn docs_volume_quick_start_runs_as_written() {
    for t in ["etcd", "qemu-img", "qemu-io", "bash"] {
        tool(t);
    }
    let md = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/volume.md"))
        .unwrap();
    let blocks = sh_blocks(&md);
    assert!(!blocks.is_empty(), "docs/volume.md has no sh block");
    let mut script = blocks.join("\n");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_owned();
    let (client, peer, n1, n2) = (free_port(), free_port(), free_port(), free_port());
    let name = format!("qs{}", std::process::id());
    let etcd = format!(
        "etcd --data-dir {d}/etcd --name {name} --listen-client-urls http://127.0.0.1:{client} \
         --advertise-client-urls http://127.0.0.1:{client} --listen-peer-urls http://127.0.0.1:{peer} \
         --initial-advertise-peer-urls http://127.0.0.1:{peer} --initial-cluster {name}=http://127.0.0.1:{peer}"
    );
    for (from, to) in [
        ("etcd --data-dir /tmp/etcd", etcd),
        (
            "http://127.0.0.1:2379",
            format!("http://127.0.0.1:{client}"),
        ),
        ("/tmp/lun", format!("{d}/lun")),
        ("127.0.0.1:10811", format!("127.0.0.1:{n1}")),
        ("127.0.0.1:10812", format!("127.0.0.1:{n2}")),
    ] {
        assert!(
            script.contains(from),
            "the quick start no longer mentions {from:?}: update this test with the page"
        );
        script = script.replace(from, &to);
    }
    let rest = script.replace(&d, "SCRATCH");
    assert!(
        !rest.contains("/tmp/") && !rest.contains(":108") && !rest.contains(":2379"),
        "a fixed path or port is left in the script:\n{script}"
    );

    // The image the quick start converts: 64 MiB with 2 MiB of data.
    let img = format!("{d}/debian.qcow2");
    for args in [
        vec!["qemu-img", "create", "-q", "-f", "qcow2", &img, "64M"],
        vec!["qemu-io", "-f", "qcow2", "-c", "write -P 0x6b 1M 2M", &img],
    ] {
        assert!(
            Command::new(args[0])
                .args(&args[1..])
                .status()
                .unwrap()
                .success()
        );
    }

    let bin = Path::new(TERN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = dir.path().join("script.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new("bash")
        .args(["-e", "-x", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", &path)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .unwrap();
    let group = Group(child.id() as i32);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the quick start did not finish in 180 s:\n{}",
            read(&log)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = read(&log);
    assert!(status.success(), "the quick start failed:\n{out}");

    // What the page promises: node 1 holds vm1.raw after the hand-over, the image's data is
    // there and only its extents are allocated (thin), the text status names the LUN.
    let a1 = format!("127.0.0.1:{n1}");
    let st = json(&["volume", "stat", "vm1.raw", "--node", &a1, "--json"]);
    assert_eq!(st["lease"]["holder"], 1, "{st}");
    assert_eq!(st["size"], 20u64 << 30);
    assert_eq!(st["allocated_extents"], 2, "{st}");
    assert!(out.contains(&format!("LUN: {d}/lun")), "{out}");
    assert!(out.contains("coordinator: node"), "{out}");

    // A clean stop of node 2: announced, and gone from node 1's status at once.
    let pid2 = pid_in_group(group.0, "--node-id 2").expect("node 2 is running");
    let listed = |id: u64| {
        json(&["volume", "status", "--node", &a1, "--json"])["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node_id"] == id)
    };
    // node 2 registers its membership in etcd asynchronously after it starts serving
    let t0 = std::time::Instant::now();
    while !listed(2) {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "node 2 must be listed while it runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid2.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let stopped = Instant::now();
    while listed(2) {
        assert!(
            stopped.elapsed() < Duration::from_secs(2),
            "a cleanly stopped node is still listed after 2 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let start = Instant::now();
    while !read(&log).contains("tern volume: node 2 stopped") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "node 2 did not say it stopped:\n{}",
            read(&log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(read(&log).contains("tern volume: node 2 stopping (SIGTERM)"));
    drop(group);
}

//! The test guest on a real network under Tern: a tern-netlab topology (hosts, switch, client
//! namespaces), the VM's tap on a host bridge; ping, TCP and UDP echo from the client namespace,
//! the announce that moves the switch's forwarding entry for the guest's MAC to the new host, and a
//! snapshot restored on another host that keeps an open TCP connection.
//!
//! Needs root and /dev/kvm; without them these tests fail with a message saying so.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use tern_netlab::ns::{connect_from, in_namespace, stream_echo};
use tern_netlab::{Topology, TopologySpec};

const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// A `tern vm run` of the test guest inside a host namespace, with a NIC on the host's bridge.
struct NetVm {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    sock: PathBuf,
    stderr: PathBuf,
}

impl NetVm {
    fn start(
        topo: &Topology,
        host: usize,
        dir: &Path,
        tap: &str,
        mac: &str,
        cmdline: &str,
        extra: &[&str],
    ) -> NetVm {
        // The VM is named after its tap.
        let name = tap;
        let sock = dir.join(format!("{name}.sock"));
        let stderr = dir.join(format!("{name}.stderr"));
        let mut child = Command::new("ip")
            .args(["netns", "exec", &topo.host_ns(host), common::tern()])
            .args([
                "vm",
                "run",
                "--kernel",
                "builtin:testguest",
                "--cmdline",
                cmdline,
            ])
            .args(["--net", &format!("tap={tap},mac={mac}")])
            .arg("--api-sock")
            .arg(&sock)
            .args(["--name", name])
            .arg("--runtime-dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn ip netns exec tern vm run");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut vm = NetVm {
            child,
            lines: rx,
            seen: Vec::new(),
            sock,
            stderr,
        };
        // The VMM creates the tap before the guest boots; put it on the host's bridge.
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let ok = Command::new("ip")
                .args(["-n", &topo.host_ns(host), "link", "show", tap])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            if let Ok(Some(st)) = vm.child.try_wait() {
                panic!(
                    "the VMM exited ({st}) before creating its tap: {}",
                    vm.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no tap {tap} after {BOOT_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        topo.attach_to_host_bridge(host, tap)
            .expect("attach the tap to the host bridge");
        vm
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no matching console line; console:\n{}\nstderr:\n{}",
                    self.seen.join("\n"),
                    self.stderr()
                ),
            }
        }
    }

    fn api(&self, op: &str) {
        let out = Command::new(common::tern())
            .args(["vm", op, "--api-sock"])
            .arg(&self.sock)
            .output()
            .expect("run tern vm");
        assert!(
            out.status.success(),
            "tern vm {op} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stop(mut self) {
        self.api("stop");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < deadline, "the VMM did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for NetVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn topology(name: &str) -> Topology {
    common::require_kvm();
    let mut spec = TopologySpec::new(name, 2);
    spec.replace_stale = true;
    Topology::build(spec).unwrap_or_else(|e| panic!("cannot build topology {name}: {e}"))
}

#[test]
fn ping_tcp_and_udp_echo_reach_the_guest_under_tern() {
    let topo = topology("tnecho");
    let dir = common::scratch();
    let ip = Topology::guest_addr(0);
    let mut vm = NetVm::start(
        &topo,
        0,
        dir.path(),
        "tnecho0",
        "52:54:00:4e:00:01",
        &format!("tern.hb_ms=500 tern.ip={ip}/24 tern.echo_port=7"),
        &[],
    );
    let up = vm.wait_line(|l| l.starts_with("NET "));
    assert!(up.starts_with("NET up") && up.contains("version=2"), "{up}");
    let client = topo.client_ns().expect("a client namespace");

    let ping = Command::new("ip")
        .args([
            "netns", "exec", &client, "ping", "-c", "3", "-i", "0.2", "-W", "2",
        ])
        .arg(ip.to_string())
        .output()
        .expect("run ping");
    assert!(
        ping.status.success(),
        "ping from the client failed:\n{}",
        String::from_utf8_lossy(&ping.stdout)
    );

    let addr = SocketAddr::from((ip, 7));
    let mut stream = connect_from(&client, addr, Duration::from_secs(5)).expect("TCP connect");
    let mut n = 0;
    let report = stream_echo(
        &mut stream,
        Duration::from_millis(1),
        Duration::from_secs(5),
        || {
            n += 1;
            n > 300
        },
    );
    assert!(!report.connection_broken, "{report:?}");
    assert_eq!(report.requests, 300);

    let echoed = in_namespace(&client, move || {
        let u = UdpSocket::bind("0.0.0.0:0")?;
        u.set_read_timeout(Some(Duration::from_secs(3)))?;
        u.send_to(b"tern-udp-echo", addr)?;
        let mut b = [0u8; 64];
        let (n, from) = u.recv_from(&mut b)?;
        Ok::<_, std::io::Error>((b[..n].to_vec(), from))
    })
    .expect("enter the client namespace")
    .expect("UDP echo");
    assert_eq!(echoed.0, b"tern-udp-echo");
    assert_eq!(echoed.1, addr);

    // The guest counted what it echoed (TCP: 300 requests of 16 bytes).
    vm.wait_line(|l| l == "NET tcp_accepts=1 tcp_bytes=4800 udp_packets=1");
    vm.stop();
}

fn diagnostics(topo: &Topology) -> String {
    let mut out = String::new();
    for args in [
        vec!["-n", &topo.switch_ns(), "fdb", "show", "br", "sw0"],
        vec!["-n", &topo.host_ns(0), "link", "show"],
        vec!["-n", &topo.host_ns(0), "fdb", "show", "br", "br0"],
    ] {
        let o = Command::new("bridge").args(&args).output().expect("bridge");
        out.push_str(&format!(
            "\nbridge {args:?}:\n{}",
            String::from_utf8_lossy(&o.stdout)
        ));
    }
    let o = Command::new("ip")
        .args(["-n", &topo.host_ns(0), "-s", "link", "show"])
        .output()
        .expect("ip");
    out.push_str(&String::from_utf8_lossy(&o.stdout));
    out
}

fn wait_port(topo: &Topology, mac: &str, want: &str, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if topo
            .switch_port_of_mac(mac)
            .expect("read the switch fdb")
            .as_deref()
            == Some(want)
        {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

#[test]
fn the_announce_moves_the_switch_fdb_entry_to_the_new_host() {
    let topo = topology("tnann");
    let dir = common::scratch();
    let mac = "52:54:00:4e:00:02";
    let cmdline = format!("tern.hb_ms=1000 tern.ip={}/24", Topology::guest_addr(0));
    let (h0, h1) = (topo.switch_port_of_host(0), topo.switch_port_of_host(1));

    // The guest on h0 announces itself: the switch learns it behind h0.
    let a = NetVm::start(&topo, 0, dir.path(), "tnann0", mac, &cmdline, &[]);
    a.api("announce");
    assert!(
        wait_port(&topo, mac, &h0, Duration::from_secs(2)).is_some(),
        "the switch did not learn the MAC behind {h0} after the announce on h0: {}",
        diagnostics(&topo)
    );
    a.stop();

    // The same MAC on h1 with the announce disabled: the switch keeps the stale entry.
    let b = NetVm::start(
        &topo,
        1,
        dir.path(),
        "tnann1",
        mac,
        &cmdline,
        &["--announce", "off"],
    );
    b.api("announce");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        topo.switch_port_of_mac(mac).expect("fdb").as_deref(),
        Some(h0.as_str()),
        "without an announce the switch still points at the old host"
    );
    b.stop();

    // With the announce, the entry moves to h1 right away (the first round goes out at 0 ms).
    let c = NetVm::start(&topo, 1, dir.path(), "tnann1", mac, &cmdline, &[]);
    let asked = Instant::now();
    c.api("announce");
    let moved = wait_port(&topo, mac, &h1, Duration::from_secs(1));
    assert!(
        moved.is_some(),
        "the switch fdb entry for {mac} did not move to {h1} after the announce"
    );
    assert!(
        asked.elapsed() < Duration::from_millis(700),
        "the entry moved only after {:?}",
        asked.elapsed()
    );
    c.stop();
}

#[test]
fn a_snapshot_restored_on_another_host_keeps_the_tcp_connection() {
    let topo = topology("tnsnap");
    let dir = common::scratch();
    let ip = Topology::guest_addr(0);
    let mac = "52:54:00:4e:00:03";
    let cmdline = format!("tern.hb_ms=500 tern.ip={ip}/24");
    let snap_dir = dir.path().to_str().expect("utf-8 path").to_string();
    let mut a = NetVm::start(
        &topo,
        0,
        dir.path(),
        "tnsnap0",
        mac,
        &cmdline,
        &["--snapshot-dir", &snap_dir],
    );
    a.wait_line(|l| l.starts_with("NET up"));
    a.api("announce");
    let client = topo.client_ns().expect("a client namespace");
    let mut stream = connect_from(&client, SocketAddr::from((ip, 7)), Duration::from_secs(5))
        .expect("TCP connect");
    let mut n = 0;
    let before = stream_echo(
        &mut stream,
        Duration::from_millis(1),
        Duration::from_secs(5),
        || {
            n += 1;
            n > 200
        },
    );
    assert!(!before.connection_broken, "{before:?}");

    // Snapshot and stop the VM on h0; the connection stays open on the client meanwhile.
    let snap = dir.path().join("vm.snap");
    let out = Command::new(common::tern())
        .args(["vm", "snapshot", "--stop", "--api-sock"])
        .arg(&a.sock)
        .arg("--out")
        .arg(&snap)
        .output()
        .expect("run tern vm snapshot");
    assert!(
        out.status.success(),
        "tern vm snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.child.try_wait().expect("try_wait").is_none() {
        assert!(Instant::now() < deadline, "the snapshotted VM did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Restore it on h1: the resume announces the MAC there, and the same connection goes on.
    let snap_arg = snap.to_str().expect("utf-8 path").to_string();
    let b = NetVm::start(
        &topo,
        1,
        dir.path(),
        "tnsnap1",
        mac,
        &cmdline,
        &["--restore", &snap_arg],
    );
    let mut m = 0;
    let after = tern_netlab::ns::stream_echo_from(
        &mut stream,
        before.requests,
        Duration::from_millis(1),
        Duration::from_secs(10),
        || {
            m += 1;
            m > 200
        },
    );
    assert!(
        !after.connection_broken && !after.mismatched,
        "after the restore: {after:?}"
    );
    assert_eq!(after.requests, 200);
    assert_eq!(
        topo.switch_port_of_mac(mac).expect("fdb").as_deref(),
        Some("h1")
    );
    b.stop();
}

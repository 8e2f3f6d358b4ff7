//! The test guest's network under QEMU (`-M microvm`, virtio-net-device over a tap), the peer the
//! network benchmark compares Tern with: in a tern-netlab topology, the guest's tap on host h0's
//! bridge; ping, TCP echo and UDP echo from the client namespace, on both virtio-mmio transports.
//!
//! Needs root, /dev/kvm and qemu-system-x86_64; without them these tests fail saying so.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use tern_guest_image::qemu::{self, QemuConfig, QemuNet};
use tern_netlab::ns::{connect_from, in_namespace, stream_echo};
use tern_netlab::{Topology, TopologySpec};

const QEMU: &str = "qemu-system-x86_64";
const TIMEOUT: Duration = Duration::from_secs(30);

fn require_environment() {
    // Root and a usable /dev/kvm.
    tern_test_support::require_kvm();
    match Command::new(QEMU).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => panic!("{QEMU} is needed for these tests (apt-get install qemu-system-x86)"),
    }
}

fn host_tsc_hz() -> u64 {
    let log = Command::new("dmesg")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if let Some(hz) = log.ok().as_deref().and_then(qemu::tsc_hz_from_kernel_log) {
        return hz;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
    qemu::tsc_hz_from_cpuinfo(&cpuinfo)
        .expect("no TSC frequency in the kernel log or /proc/cpuinfo")
}

struct Qemu {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no matching console line; console:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

fn echo_under_qemu(topo_name: &str, modern: bool) {
    require_environment();
    let mut spec = TopologySpec::new(topo_name, 1);
    spec.replace_stale = true;
    let topo = Topology::build(spec).unwrap_or_else(|e| panic!("cannot build topology: {e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("testguest.elf");
    std::fs::write(&kernel, tern_guest_image::testguest_elf()).expect("write the guest");
    let ip = Topology::guest_addr(0);
    let tap = format!("{topo_name}q");
    let config = QemuConfig {
        kernel,
        cmdline: format!("tern.hb_ms=500 tern.ip={ip}/24 tern.echo_port=7"),
        memory_mib: 256,
        vcpus: 1,
        tsc_hz: host_tsc_hz(),
        disk: None,
        virtio_modern: modern,
        net: Some(QemuNet {
            tap: tap.clone(),
            mac: "52:54:00:4e:00:11".into(),
        }),
    };
    let mut child = Command::new("ip")
        .args(["netns", "exec", &topo.host_ns(0), QEMU])
        .args(config.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {QEMU}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut g = Qemu {
        child,
        lines,
        seen: Vec::new(),
        _dir: dir,
    };
    let up = g.wait_line(|l| l.starts_with("NET "));
    let version = if modern { "version=2" } else { "version=1" };
    assert!(up.starts_with("NET up") && up.contains(version), "{up}");
    topo.attach_to_host_bridge(0, &tap)
        .expect("attach QEMU's tap to the host bridge");
    let client = topo.client_ns().expect("client namespace");

    let ping = Command::new("ip")
        .args([
            "netns", "exec", &client, "ping", "-c", "3", "-i", "0.2", "-W", "2",
        ])
        .arg(ip.to_string())
        .output()
        .expect("run ping");
    assert!(
        ping.status.success(),
        "ping failed:\n{}",
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
    let (data, from) = in_namespace(&client, move || {
        let u = UdpSocket::bind("0.0.0.0:0")?;
        u.set_read_timeout(Some(Duration::from_secs(3)))?;
        u.send_to(b"qemu-udp-echo", addr)?;
        let mut b = [0u8; 64];
        let (n, from) = u.recv_from(&mut b)?;
        Ok::<_, std::io::Error>((b[..n].to_vec(), from))
    })
    .expect("enter the client namespace")
    .expect("UDP echo");
    assert_eq!((data.as_slice(), from), (&b"qemu-udp-echo"[..], addr));
    g.wait_line(|l| l == "NET tcp_accepts=1 tcp_bytes=4800 udp_packets=1");
}

#[test]
fn ping_tcp_and_udp_echo_under_qemu_legacy_transport() {
    echo_under_qemu("tnql", false);
}

#[test]
fn ping_tcp_and_udp_echo_under_qemu_modern_transport() {
    echo_under_qemu("tnqm", true);
}

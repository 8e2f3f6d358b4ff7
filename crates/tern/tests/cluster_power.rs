//! Host power in the test cluster: `tern cluster up --bmc` gives every host an ipmi_sim BMC;
//! powering a host off through ipmitool takes its agent and volume node away (the controller sees
//! the host lost), powering it on brings them back (the host registers again).
//!
//! Needs root, etcd, ipmi_sim and ipmitool; fails loudly without them. No VMs, so no KVM.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tern_api::cluster::{HostInfo, HostState};
use tern_test_support::{require_root_for, require_tools, wait_for};

fn tern() -> &'static str {
    env!("CARGO_BIN_EXE_tern")
}

#[derive(Debug, Deserialize)]
struct Bmc {
    host: String,
    bmc: String,
    netns: String,
    user: String,
    password: String,
    password_file: PathBuf,
    wake_mac: String,
}

#[derive(Debug, Deserialize)]
struct Host {
    name: String,
    namespace: String,
    volume_node: String,
    volume_node_id: u64,
    /// The host's certificate: its volume node takes only TLS.
    tls_dir: Option<PathBuf>,
}

/// The volume coordinator's node id, as host `h`'s node reports it.
fn coordinator(h: &Host) -> Option<u64> {
    let o = Command::new("ip")
        .args(["netns", "exec", &h.namespace, tern(), "volume", "status"])
        .args(["--node", &h.volume_node, "--json"])
        .args(
            h.tls_dir
                .iter()
                .flat_map(|d| [std::ffi::OsStr::new("--tls-dir"), d.as_os_str()]),
        )
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    v["coordinator"]["node_id"].as_u64()
}

#[derive(Debug, Deserialize)]
struct UpInfo {
    name: String,
    controllers: Vec<String>,
    hosts: Vec<Host>,
    bmcs: Vec<Bmc>,
    state_file: PathBuf,
    /// The admin's TLS directory (the cluster runs over TLS).
    tls_dir: Option<PathBuf>,
}

/// `tern cluster up`, taken down (SIGTERM, then waited for) when dropped.
struct Up(Option<Child>);

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn power(b: &Bmc, args: &[&str]) -> Output {
    let pf = b.password_file.display().to_string();
    Command::new(tern())
        .args(["host", "power"])
        .args(args)
        .args(["--bmc", &b.bmc, "--user", &b.user, "--password-file", &pf])
        .args(["--netns", &b.netns, "--host", &b.host, "--json"])
        .output()
        .unwrap()
}

fn json_of(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "tern host power failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn host_state(controller: &str, tls: &std::path::Path, name: &str) -> Option<HostState> {
    let o = Command::new(tern())
        .args(["cluster", "hosts", "--controller", controller, "--json"])
        .arg("--tls-dir")
        .arg(tls)
        .output()
        .ok()?;
    let hosts: Vec<HostInfo> = serde_json::from_slice(&o.stdout).ok()?;
    hosts.into_iter().find(|h| h.name == name).map(|h| h.state)
}

/// The commands of the processes in network namespace `ns`.
/// The log of a cluster process (`volume-h0`, `agent-h1`, …).
fn dir_log(info: &UpInfo, what: &str) -> String {
    let dir = info.state_file.parent().unwrap().join("logs");
    std::fs::read_to_string(dir.join(format!("{what}.log"))).unwrap_or_default()
}

fn processes_in(ns: &str) -> Vec<String> {
    let o = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| !c.is_empty())
        .collect()
}

#[test]
fn a_host_powered_off_through_ipmi_is_lost_and_registers_again_when_powered_on_or_woken() {
    require_root_for("tern cluster up (network namespaces, /run/tern)");
    require_tools(&["etcd", "ip", "ipmi_sim", "ipmitool"]);
    let name = format!("pw{}", std::process::id() % 100_000);
    let scratch = tempfile::tempdir().unwrap();
    let stderr = scratch.path().join("up.stderr");
    let mut child = Command::new(tern())
        .args(["cluster", "up", "--name", &name, "--hosts", "2"])
        .args(["--controllers", "1", "--bmc", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let up = Up(Some(child));
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_default();
    let info: UpInfo = serde_json::from_str(line.trim()).unwrap_or_else(|e| {
        panic!(
            "tern cluster up --bmc printed no JSON line ({e}: {line:?}); stderr:\n{}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        )
    });
    assert_eq!(info.name, name);
    let names: Vec<&str> = info.bmcs.iter().map(|b| b.host.as_str()).collect();
    assert_eq!(names, ["h0", "h1"]);
    let b1 = &info.bmcs[1];
    assert_eq!(b1.netns, format!("{name}-cl"));
    let mode = std::fs::metadata(&b1.password_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the password file is root's only");
    assert_eq!(
        std::fs::read_to_string(&b1.password_file).unwrap().trim(),
        b1.password
    );
    let h1 = &info.hosts[1];
    assert_eq!(h1.name, "h1");
    let controller = &info.controllers[0];
    let tls = info.tls_dir.as_deref().expect("the cluster runs over TLS");
    assert_eq!(host_state(controller, tls, "h1"), Some(HostState::Up));

    // On: the host's agent and volume node run in its namespace.
    assert_eq!(json_of(&power(b1, &["status"]))["status"], "on");
    let before = processes_in(&h1.namespace);
    assert!(
        before.iter().any(|c| c.contains(" agent --host-id h1")),
        "{before:?}"
    );

    // Off (hard): everything on the host is gone, and the controller loses the host.
    assert_eq!(
        json_of(&power(b1, &["off", "--mode", "hard"]))["outcome"],
        "hard"
    );
    assert!(
        processes_in(&h1.namespace).is_empty(),
        "{:?}",
        processes_in(&h1.namespace)
    );
    assert_eq!(json_of(&power(b1, &["status"]))["status"], "off");
    wait_for(
        "the controller to see h1 lost",
        Duration::from_secs(60),
        || {
            matches!(
                host_state(controller, tls, "h1"),
                Some(HostState::Lost | HostState::Fenced)
            )
        },
    );
    assert_eq!(host_state(controller, tls, "h0"), Some(HostState::Up));

    // On: the volume node and the agent start again and the host registers again.
    assert_eq!(json_of(&power(b1, &["on"]))["outcome"], "on");
    wait_for("h1 to register again", Duration::from_secs(60), || {
        host_state(controller, tls, "h1") == Some(HostState::Up)
    });
    let after = processes_in(&h1.namespace);
    assert!(
        after.iter().any(|c| c.contains(" agent --host-id h1"))
            && after.iter().any(|c| c.contains(" volume serve ")),
        "{after:?}"
    );

    // Off the default way: the soft power-off (SIGTERM) takes the host down within the grace.
    assert_eq!(
        json_of(&power(b1, &["off", "--grace", "10"]))["outcome"],
        "soft"
    );
    assert!(processes_in(&h1.namespace).is_empty());

    // Wake-on-LAN: a magic packet for h1's MAC, broadcast from the control namespace over the
    // switch, powers it on through its BMC; it registers again.
    let o = Command::new(tern())
        .args(["host", "wake", "--mac", &b1.wake_mac, "--netns", &b1.netns])
        .args(["--broadcast", "10.77.0.255"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_for(
        "h1 to register again after its wake",
        Duration::from_secs(60),
        || host_state(controller, tls, "h1") == Some(HostState::Up),
    );
    assert_eq!(json_of(&power(b1, &["status"]))["status"], "on");
    // h1's BMC saw every change, the wake's power-on last.
    let dir = info.state_file.parent().unwrap();
    let bmc_dir = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("tern-bmc-h1-")
        })
        .expect("h1's BMC folder in the cluster's folder");
    assert_eq!(
        std::fs::read_to_string(bmc_dir.join("events")).unwrap(),
        "off\non\nsoft\non\n"
    );

    // The coordinator's host, soft powered off (the automation loop's default), hands the volume
    // coordinator role over as it goes: its node steps down on the SIGTERM, and the other node
    // coordinates without waiting for the old one's etcd lease to run out.
    wait_for(
        "both nodes to agree on a coordinator",
        Duration::from_secs(30),
        || {
            let c = coordinator(&info.hosts[0]);
            c.is_some() && c == coordinator(&info.hosts[1])
        },
    );
    let c = coordinator(&info.hosts[0]).unwrap();
    let (from, to) = if c == info.hosts[0].volume_node_id {
        (0, 1)
    } else {
        (1, 0)
    };
    assert_eq!(
        json_of(&power(&info.bmcs[from], &["off", "--grace", "10"]))["outcome"],
        "soft"
    );
    let off = Instant::now();
    let log = dir_log(&info, &format!("volume-{}", info.hosts[from].name));
    assert!(
        log.contains("coordinator role given up"),
        "the coordinator's node stepped down on its way off:\n{log}"
    );
    let new = info.hosts[to].volume_node_id;
    wait_for(
        "the other node to coordinate",
        Duration::from_secs(20),
        || coordinator(&info.hosts[to]) == Some(new),
    );
    eprintln!(
        "coordinator handed over from {} to {} {:.2} s after the soft power-off",
        info.hosts[from].name,
        info.hosts[to].name,
        off.elapsed().as_secs_f64()
    );

    // Down: nothing of the cluster or its BMCs is left.
    let dir = info.state_file.parent().unwrap().to_path_buf();
    drop(up);
    assert!(!dir.exists(), "{} is gone", dir.display());
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&format!("cluster-{name}/")))
        .collect();
    assert!(left.is_empty(), "left running: {left:?}");
}

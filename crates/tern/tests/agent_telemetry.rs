//! `tern agent`'s telemetry against real VMMs: a test-guest VM with a known writer rate shows that
//! dirty-page rate in the agent's report, one with a known CPU load shows a utilisation that
//! matches its vCPU thread's CPU time under `--cpu-share`, and the report carries the parked cores
//! of the parking policy run in report-only mode (which leaves every affinity alone). Needs root,
//! KVM and the etcd binary.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::{command, start_vm_body, status, vm_of};
use serde_json::Value;
use tern_test_support::{ChildGuard, Etcd, cpus_allowed, free_port, require_kvm, wait_for};

/// The agent's `--cpu-share`.
const SHARE: f64 = 0.5;
/// The writer's configured rate, pages per second.
const WRITER_RATE: f64 = 2_000.0;

/// Starts `tern agent` as `host` on `listen` (2 cores, 2048 MiB, its state and runtime directories
/// and its log `agent.log` in `dir`) with `extra` options, and waits for its host lease; the agent
/// and the lease.
fn start_agent(
    etcd: &Etcd,
    host: &str,
    listen: &str,
    dir: &Path,
    extra: &[&str],
) -> (ChildGuard, u64) {
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let agent = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["agent", "--host-id", host, "--etcd", &etcd.url])
        .args(["--listen", listen, "--cores", "2", "--memory-mib", "2048"])
        .args(extra)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--runtime-dir")
        .arg(dir.join("run"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("tern agent starts");
    let agent = ChildGuard(agent);
    wait_for("the agent's lease", Duration::from_secs(20), || {
        TcpStream::connect(listen).is_ok() && status(listen)["lease"].as_u64().is_some()
    });
    let lease = status(listen)["lease"].as_u64().unwrap();
    (agent, lease)
}

fn start_vm(addr: &str, id: u64, lease: u64, name: &str, cmdline: &str) {
    let resp = command(addr, 1, id, lease, start_vm_body(name, cmdline));
    assert_eq!(resp["reply"]["result"], "done", "{resp}");
}

/// `utime + stime` of a thread, clock ticks (100 a second).
fn thread_ticks(pid: u64, tid: u64) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    let rest = &text[text.rfind(')').unwrap() + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn reports_carry_the_dirty_rate_the_cpu_load_under_the_share_and_parked_cores() {
    require_kvm();
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let host = format!("telemetry-{}", std::process::id());
    let listen = format!("127.0.0.1:{}", free_port());
    let (_agent, lease) = start_agent(
        &etcd,
        &host,
        &listen,
        dir.path(),
        &[
            "--report-interval-ms",
            "500",
            "--parking",
            "report",
            "--cpu-share",
            &SHARE.to_string(),
        ],
    );

    // One VM writes WRITER_RATE pages a second; the other spins 25 % of every slice.
    let (writer, loaded) = ("tel-writer", "tel-load");
    start_vm(
        &listen,
        1,
        lease,
        writer,
        &format!("tern.hb_ms=0 tern.dirty_mib=16 tern.dirty_rate={WRITER_RATE}"),
    );
    start_vm(&listen, 2, lease, loaded, "tern.hb_ms=0 tern.cpu_pct=25");
    let log_text = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();

    // Both VMs get a dirty-rate sample within a sampling period or two (every 5 s, staggered).
    let deadline = Duration::from_secs(30);
    let start = Instant::now();
    let last = loop {
        let st = status(&listen);
        let last = st["telemetry"].clone();
        let sampled =
            |name| vm_of(&last, name).is_some_and(|v| v["dirty_pages_per_sec"].as_f64().is_some());
        if sampled(writer) && sampled(loaded) {
            break last;
        }
        assert!(
            start.elapsed() < deadline,
            "no dirty-rate sample of both VMs in {deadline:?}: {last}\nagent log:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let rate = vm_of(&last, writer).unwrap()["dirty_pages_per_sec"]
        .as_f64()
        .unwrap();
    assert!(
        (0.5 * WRITER_RATE..=1.5 * WRITER_RATE).contains(&rate),
        "the writer dirties {WRITER_RATE} pages/s; the agent reports {rate}: {last}"
    );
    let idle_rate = vm_of(&last, loaded).unwrap()["dirty_pages_per_sec"]
        .as_f64()
        .unwrap();
    assert!(
        idle_rate < 0.25 * WRITER_RATE,
        "the loaded VM writes no buffer; the agent reports {idle_rate} pages/s: {last}"
    );
    // With the dirty-rate sample, the guest RAM that is resident and not zero: the writer's
    // 16 MiB buffer (rewritten every ~2 s) against the other guest's few pages, each within its
    // resident figure (which counts every touched huge page whole).
    let kib = |name, field| vm_of(&last, name).unwrap()[field].as_u64();
    let (w_nonzero, w_resident) = (
        kib(writer, "guest_nonzero_kib").expect("the writer's non-zero RAM"),
        kib(writer, "guest_resident_kib").expect("the writer's resident RAM"),
    );
    assert!(
        (8 * 1024..=w_resident).contains(&w_nonzero),
        "the writer fills 16 MiB; non-zero {w_nonzero} KiB of {w_resident} resident: {last}"
    );
    let (l_nonzero, l_resident) = (
        kib(loaded, "guest_nonzero_kib").expect("the loaded VM's non-zero RAM"),
        kib(loaded, "guest_resident_kib").expect("the loaded VM's resident RAM"),
    );
    assert!(
        l_nonzero > 0 && l_nonzero <= l_resident.min(2048),
        "the loaded VM touches little; non-zero {l_nonzero} KiB of {l_resident} resident: {last}"
    );

    // CPU: the agent's figures over ~5 s against the vCPU thread's own CPU time over that span.
    let st = status(&listen);
    let pid = st["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == loaded)
        .and_then(|v| v["pid"].as_u64())
        .expect("the loaded VM's pid");
    let entry: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(format!("run/{loaded}.json"))).unwrap(),
    )
    .unwrap();
    let tid = entry["vcpu_tids"][0].as_u64().unwrap();
    let (t0, ticks0) = (Instant::now(), thread_ticks(pid, tid));
    let mut seen_seq = Vec::new();
    let (mut vm_u, mut host_u, mut parked) = (Vec::new(), Vec::new(), Vec::new());
    while t0.elapsed() < Duration::from_secs(5) {
        let r = status(&listen)["telemetry"].clone();
        let seq = r["seq"].as_u64().unwrap_or(0);
        let key = (seq, r.to_string());
        if !seen_seq.contains(&key) {
            if let Some(u) = vm_of(&r, loaded).and_then(|v| v["cpu_utilization"].as_f64()) {
                vm_u.push(u);
            }
            if let Some(u) = r["cpu_utilization"].as_f64() {
                host_u.push(u);
            }
            parked.push(r["parked_cores"].as_u64());
            seen_seq.push(key);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let used_s = thread_ticks(pid, tid).saturating_sub(ticks0) as f64 / 100.0;
    let expected = (used_s / (t0.elapsed().as_secs_f64() * SHARE)).min(1.0);
    assert!(
        vm_u.len() >= 5,
        "reports with the VM's utilisation: {vm_u:?}"
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let vm_mean = mean(&vm_u);
    assert!(
        expected > 0.1,
        "a 25 % load on one vCPU at a share of {SHARE} is visible ({expected:.2})"
    );
    assert!(
        (vm_mean - expected).abs() <= 0.15 + 0.2 * expected,
        "the agent reports {vm_mean:.2} (from {vm_u:?}); the vCPU thread used {used_s:.2} \
         CPU-s, which is {expected:.2} of one vCPU worth {SHARE} of a CPU"
    );
    // The host: its VMMs' CPU time over 2 declared cores x SHARE; the VMMs used at least the
    // loaded vCPU's time, and the host's capacity is twice the VM's.
    assert!(!host_u.is_empty(), "no host utilisation in the reports");
    let host_mean = mean(&host_u);
    assert!(
        host_mean >= 0.4 * vm_mean && host_mean <= 1.0,
        "host {host_mean:.2} (from {host_u:?}) against the VM's {vm_mean:.2}"
    );

    eprintln!(
        "dirty {rate:.0} pages/s (configured {WRITER_RATE}), idle VM {idle_rate:.0}; VM \
         utilisation {vm_mean:.2} (thread time says {expected:.2}), host {host_mean:.2}; \
         parked {parked:?}"
    );
    // Parked cores come from the parking policy, at most the 2 declared cores; in report-only
    // mode no vCPU thread is confined.
    assert!(
        parked.iter().all(|p| p.is_some_and(|n| n <= 2)),
        "parked cores in every report, at most 2: {parked:?}"
    );
    let all = cpus_allowed(std::process::id(), std::process::id());
    for name in [writer, loaded] {
        let e: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("run/{name}.json"))).unwrap(),
        )
        .unwrap();
        let vpid = e["pid"].as_u64().unwrap() as u32;
        for t in e["vcpu_tids"].as_array().unwrap() {
            assert_eq!(
                cpus_allowed(vpid, t.as_u64().unwrap() as u32),
                all,
                "--parking report leaves {name}'s vCPU threads alone"
            );
        }
    }
    assert!(
        Path::new(&dir.path().join("run")).exists(),
        "the agent's runtime directory"
    );
}

/// How many CPUs a `Cpus_allowed_list` value ("0-1", "0,2-3", "1") names.
fn count_cpus(list: &str) -> usize {
    list.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

#[test]
fn parking_on_confines_only_the_agents_own_vcpu_threads_to_the_unparked_cpus() {
    require_kvm();
    let all = cpus_allowed(std::process::id(), std::process::id());
    assert!(
        count_cpus(&all) >= 2,
        "this test needs 2 CPUs to park one (allowed: {all})"
    );
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let host = format!("parking-{}", std::process::id());
    let listen = format!("127.0.0.1:{}", free_port());
    let (_agent, lease) = start_agent(
        &etcd,
        &host,
        &listen,
        dir.path(),
        &["--report-interval-ms", "300", "--parking", "on"],
    );
    let name = "park-idle";
    start_vm(&listen, 1, lease, name, "tern.hb_ms=0");
    let entry_path = dir.path().join(format!("run/{name}.json"));
    wait_for("the VM's runtime entry", Duration::from_secs(30), || {
        entry_path.exists()
    });
    let entry: Value =
        serde_json::from_str(&std::fs::read_to_string(&entry_path).unwrap()).unwrap();
    let (pid, tid) = (
        entry["pid"].as_u64().unwrap() as u32,
        entry["vcpu_tids"][0].as_u64().unwrap() as u32,
    );
    // An idle VM: the policy parks down to its minimum, and its vCPU thread follows.
    let log_text = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let parked = status(&listen)["telemetry"]["parked_cores"].clone();
        let allowed = cpus_allowed(pid, tid);
        if parked.as_u64().is_some_and(|p| p >= 1)
            && count_cpus(&allowed) + parked.as_u64().unwrap() as usize == count_cpus(&all)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no parked core with the vCPU confined to the rest in 20 s (parked {parked}, allowed {allowed}; \
             all: {all})\nagent log:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Only the agent's own VMs: this process's threads keep every CPU.
    assert_eq!(cpus_allowed(std::process::id(), std::process::id()), all);
}

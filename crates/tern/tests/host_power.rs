//! `tern host power on|off|status` against an ipmi_sim test BMC through the real ipmitool, and
//! `tern host wake` into a listener in a network namespace.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use tern_power::bmc_sim::{SimBmc, SimBmcOptions};
use tern_power::wol::{MacAddr, WolListener};
use tern_test_support::{require_root_for, require_tools};

fn tern(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .expect("running tern")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn alive(pid_file: &Path) -> bool {
    std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .is_some_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        })
}

#[test]
fn power_on_status_and_off_through_the_cli() {
    require_tools(&["ipmi_sim", "ipmitool"]);
    let scratch = tempfile::tempdir().unwrap();
    let pf = scratch.path().join("agent.pid");
    let mut opts = SimBmcOptions::new("cli-h0", "admin", "cli-pw");
    opts.power_on_cmd = Some(format!(
        "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $! > {}",
        pf.display()
    ));
    opts.power_off_cmd = Some(format!("kill -KILL $(cat {})", pf.display()));
    let bmc = SimBmc::start(opts).unwrap();
    let pw = scratch.path().join("pw");
    std::fs::write(&pw, "cli-pw\n").unwrap();
    let addr = bmc.addr().to_string();
    let common = |verb: &str| -> Vec<String> {
        [
            "host",
            "power",
            verb,
            "--bmc",
            &addr,
            "--user",
            "admin",
            "--password-file",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([pw.display().to_string()])
        .collect()
    };
    let run = |verb: &str, extra: &[&str]| {
        let mut a = common(verb);
        a.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        tern(&a)
    };

    let o = run("status", &[]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(text(&o).0, "off\n");

    let o = run("on", &["--json", "--host", "h0"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let v: serde_json::Value = serde_json::from_str(&text(&o).0).unwrap();
    assert_eq!(v["outcome"], "on");
    assert_eq!(v["host"], "h0");
    assert_eq!(v["bmc"], addr.as_str());
    assert!(alive(&pf), "power on started the host's process");

    let o = run("status", &["--json"]);
    let v: serde_json::Value = serde_json::from_str(&text(&o).0).unwrap();
    assert_eq!(v["status"], "on");

    // No soft-off command: the soft power-off is ignored and the hard one follows the grace.
    let o = run("off", &["--grace", "0", "--json"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let v: serde_json::Value = serde_json::from_str(&text(&o).0).unwrap();
    assert_eq!(v["outcome"], "hard");
    assert!(!alive(&pf), "power off killed the host's process");

    let o = run("off", &["--mode", "hard"]);
    assert_eq!(text(&o).0, format!("host {addr}: already off\n"));
    assert_eq!(bmc.events(), ["on", "soft-ignored", "off"]);
}

#[test]
fn cli_errors_name_the_bad_value_and_the_cause() {
    require_tools(&["ipmi_sim", "ipmitool"]);
    let scratch = tempfile::tempdir().unwrap();
    let bmc = SimBmc::start(SimBmcOptions::new("cli-err", "admin", "good-pw")).unwrap();
    let addr = bmc.addr().to_string();
    let wrong = scratch.path().join("wrong");
    std::fs::write(&wrong, "bad-pw\n").unwrap();
    let empty = scratch.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    let wrong_s = wrong.display().to_string();

    let o = tern(&[
        "host",
        "power",
        "status",
        "--bmc",
        &addr,
        "--user",
        "admin",
        "--password-file",
        &wrong_s,
    ]);
    let (out, err) = text(&o);
    assert!(!o.status.success());
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains(&format!("BMC {addr}")) && err.contains("refused user 'admin'"),
        "{err}"
    );
    assert!(
        !err.contains("bad-pw"),
        "the password is never printed: {err}"
    );

    let o = tern(&[
        "host",
        "power",
        "on",
        "--bmc",
        &addr,
        "--user",
        "admin",
        "--password-file",
        "/nonexistent/pw",
    ]);
    assert!(
        text(&o)
            .1
            .contains("cannot read the BMC password file /nonexistent/pw"),
        "{:?}",
        text(&o)
    );

    let empty_s = empty.display().to_string();
    let o = tern(&[
        "host",
        "power",
        "on",
        "--bmc",
        &addr,
        "--user",
        "admin",
        "--password-file",
        &empty_s,
    ]);
    assert!(text(&o).1.contains("is empty"), "{:?}", text(&o));

    let o = tern(&[
        "host",
        "power",
        "on",
        "--bmc",
        "h:99999",
        "--user",
        "admin",
        "--password-file",
        &wrong_s,
    ]);
    assert!(
        text(&o).1.contains("Invalid BMC address \"h:99999\""),
        "{:?}",
        text(&o)
    );
    assert!(text(&o).1.contains("1-65535"), "{:?}", text(&o));

    let o = tern(&["host", "wake", "--mac", "52:54:00:zz:00:01"]);
    assert!(!o.status.success());
    assert!(
        text(&o)
            .1
            .contains("Invalid MAC address \"52:54:00:zz:00:01\""),
        "{:?}",
        text(&o)
    );

    let o = tern(&[
        "host",
        "power",
        "off",
        "--bmc",
        &addr,
        "--user",
        "a",
        "--password-file",
        &wrong_s,
        "--mode",
        "gentle",
    ]);
    assert!(text(&o).1.contains("soft-then-hard"), "{:?}", text(&o));
    assert_eq!(bmc.events(), Vec::<String>::new());
}

#[test]
fn help_explains_the_commands() {
    let (out, _) = text(&tern(&["host", "--help"]));
    assert!(out.contains("power") && out.contains("wake"), "{out}");
    let (out, _) = text(&tern(&["host", "power", "off", "--help"]));
    for needle in [
        "--bmc <HOST:PORT>",
        "--password-file <FILE>",
        "soft-then-hard",
        "--grace",
        "lanplus",
    ] {
        assert!(out.contains(needle), "{needle} missing from:\n{out}");
    }
    let (out, _) = text(&tern(&["host", "wake", "--help"]));
    for needle in [
        "--mac",
        "--broadcast",
        "--netns",
        "magic packet",
        "can only wake",
    ] {
        assert!(out.contains(needle), "{needle} missing from:\n{out}");
    }
}

/// A network namespace made by this test, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("tpw-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(argv: &[&str]) {
    let st = Command::new("ip").args(argv).status().unwrap();
    assert!(st.success(), "ip {argv:?} failed");
}

#[test]
fn wake_sends_a_magic_packet_a_listener_in_another_namespace_sees() {
    require_root_for("network namespaces");
    // Two "hosts" on one link: the sender (like a controller's namespace) and the sleeping host.
    let (a, b) = (Netns::new("clia"), Netns::new("clib"));
    let id = std::process::id() % 100000;
    let (va, vb) = (format!("tpca{id}"), format!("tpcb{id}"));
    ip(&[
        "link", "add", &va, "netns", &a.0, "type", "veth", "peer", "name", &vb, "netns", &b.0,
    ]);
    ip(&["-n", &a.0, "addr", "add", "10.94.0.1/24", "dev", &va]);
    ip(&["-n", &b.0, "addr", "add", "10.94.0.2/24", "dev", &vb]);
    ip(&["-n", &a.0, "link", "set", &va, "up"]);
    ip(&["-n", &b.0, "link", "set", &vb, "up"]);
    let listener = WolListener::bind(Some(&b.0), "0.0.0.0:9".parse().unwrap()).unwrap();
    let o = tern(&[
        "host",
        "wake",
        "--mac",
        "52-54-00-AB-CD-EF",
        "--netns",
        &a.0,
        "--broadcast",
        "10.94.0.255",
        "--json",
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    let v: serde_json::Value = serde_json::from_str(&text(&o).0).unwrap();
    assert_eq!(v["mac"], "52:54:00:ab:cd:ef");
    assert_eq!(v["target"], "10.94.0.255:9");
    let wake = listener
        .recv_timeout(Duration::from_secs(3))
        .unwrap()
        .expect("the magic packet");
    assert_eq!(wake.mac, "52:54:00:ab:cd:ef".parse::<MacAddr>().unwrap());
    assert_eq!(wake.from.ip().to_string(), "10.94.0.1");
}

//! The drivers against the real thing: `ipmitool` against `ipmi_sim` test BMCs whose power
//! commands start and kill a process, and Wake-on-LAN packets between two network namespaces.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tern_power::bmc_sim::{SimBmc, SimBmcOptions};
use tern_power::ipmi::{IpmiDriver, IpmiInterface, Password};
use tern_power::wol::{MacAddr, WakeWatcher, WolConfig, WolDriver, WolListener};
use tern_power::{
    IpmiFailure, OffMode, OffOutcome, PowerDriver, PowerOffError, PowerOnError, PowerStatus,
    StatusError,
};
use tern_test_support::{require_root_for, require_tools, wait_for};

fn tools() {
    require_tools(&["ipmi_sim", "ipmitool"]);
}

/// A pid file for a host's stand-in process (`sleep`), unique to this test.
fn pid_file(dir: &Path, name: &str) -> String {
    dir.join(format!("{name}.pid")).display().to_string()
}

fn alive(pid_file: &str) -> bool {
    std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid))
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// Options whose power-on starts `sleep` in the background and power-off kills it.
fn sleeper_opts(host: &str, scratch: &Path) -> (SimBmcOptions, String) {
    let pf = pid_file(scratch, host);
    let mut o = SimBmcOptions::new(host, "admin", "s3cret-pw");
    o.power_on_cmd = Some(format!(
        "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $! > {pf}"
    ));
    o.power_off_cmd = Some(format!("kill -KILL $(cat {pf}); rm -f {pf}"));
    (o, pf)
}

#[test]
fn power_off_on_and_status_go_through_ipmitool_to_the_hosts_process() {
    tools();
    let scratch = tempfile::tempdir().unwrap();
    let (opts, pf) = sleeper_opts("live-h0", scratch.path());
    let t0 = Instant::now();
    let bmc = SimBmc::start(opts).unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "ipmi_sim took {:?} to start",
        t0.elapsed()
    );
    let d = bmc.driver();
    assert_eq!(d.status().unwrap(), PowerStatus::Off);

    d.power_on().unwrap();
    assert_eq!(d.status().unwrap(), PowerStatus::On);
    assert!(alive(&pf), "power on started the host's process");
    d.power_on().unwrap();
    assert_eq!(bmc.events(), ["on"], "a second power-on changes nothing");

    assert_eq!(d.power_off(OffMode::Hard).unwrap(), OffOutcome::Hard);
    assert_eq!(d.status().unwrap(), PowerStatus::Off);
    assert!(!alive(&pf), "power off killed the host's process");
    assert_eq!(d.power_off(OffMode::Hard).unwrap(), OffOutcome::AlreadyOff);

    d.power_on().unwrap();
    assert!(alive(&pf));
    assert_eq!(bmc.events(), ["on", "off", "on"]);
}

#[test]
fn a_soft_power_off_runs_the_soft_command_or_falls_back_to_hard() {
    tools();
    let scratch = tempfile::tempdir().unwrap();
    let marker = scratch.path().join("soft-marker");
    let (mut opts, pf) = sleeper_opts("live-soft", scratch.path());
    opts.soft_off_cmd = Some(format!(
        "kill -TERM $(cat {pf}); touch {}",
        marker.display()
    ));
    opts.initially_on = false;
    let bmc = SimBmc::start(opts).unwrap();
    let d = bmc.driver();
    d.power_on().unwrap();
    let out = d
        .power_off(OffMode::SoftThenHard {
            grace: Duration::from_secs(3),
        })
        .unwrap();
    assert_eq!(out, OffOutcome::Soft);
    assert!(marker.exists(), "the soft-off command ran");
    wait_for("the host's process to end", Duration::from_secs(3), || {
        !alive(&pf)
    });
    assert_eq!(bmc.events(), ["on", "soft"]);

    // Without a soft-off command the BMC ignores soft-off, as an OS ignoring ACPI would.
    let (opts, pf) = sleeper_opts("live-nosoft", scratch.path());
    let bmc = SimBmc::start(opts).unwrap();
    let mut cfg = bmc.ipmi_config();
    cfg.poll_interval = Duration::from_millis(50);
    let d = IpmiDriver::new(cfg);
    d.power_on().unwrap();
    let e = d
        .power_off(OffMode::Soft {
            grace: Duration::from_millis(300),
        })
        .unwrap_err();
    assert!(
        matches!(e, PowerOffError::SoftTimeout { waited_ms: 300, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("live-nosoft"), "{e}");
    assert!(
        alive(&pf),
        "a soft-only power-off that timed out leaves the host on"
    );
    let t0 = Instant::now();
    let out = d
        .power_off(OffMode::SoftThenHard {
            grace: Duration::from_millis(300),
        })
        .unwrap();
    assert_eq!(out, OffOutcome::Hard);
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert!(!alive(&pf));
    assert_eq!(bmc.events(), ["on", "soft-ignored", "soft-ignored", "off"]);
}

#[test]
fn a_wrong_password_or_user_is_refused_with_a_clear_error() {
    tools();
    let bmc = SimBmc::start(SimBmcOptions::new("live-auth", "admin", "right-pw")).unwrap();
    for interface in [IpmiInterface::default(), IpmiInterface::Lan] {
        let mut cfg = bmc.ipmi_config();
        cfg.interface = interface;
        cfg.password = Password::new("wrong-pw");
        let e = IpmiDriver::new(cfg.clone()).status().unwrap_err();
        let StatusError::Ipmi {
            cause: IpmiFailure::AuthRefused { user, .. },
            host,
            bmc: addr,
        } = &e
        else {
            panic!("{interface:?}: {e:?}");
        };
        assert_eq!((user.as_str(), host.as_str()), ("admin", "live-auth"));
        assert_eq!(addr, &bmc.addr().to_string());
        let shown = format!("{:#}", anyhow_like(&e));
        assert!(shown.contains("refused user 'admin'"), "{shown}");
        assert!(
            !shown.contains("wrong-pw"),
            "the password is never shown: {shown}"
        );

        cfg.user = "nobody".into();
        cfg.password = Password::new("right-pw");
        let e = IpmiDriver::new(cfg.clone()).power_on().unwrap_err();
        assert!(
            matches!(&e, PowerOnError::Ipmi { cause: IpmiFailure::AuthRefused { user, .. }, .. } if user == "nobody"),
            "{interface:?}: {e:?}"
        );
        // With the right credentials the same interface works.
        cfg.user = "admin".into();
        assert_eq!(
            IpmiDriver::new(cfg).status().unwrap(),
            PowerStatus::Off,
            "{interface:?}"
        );
    }
    assert!(bmc.events().is_empty(), "nothing refused changed the power");
}

/// The error and its causes, one per line (what `tern` prints with `{:#}`).
fn anyhow_like(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[test]
fn an_unreachable_bmc_fails_in_bounded_time_with_a_clear_error() {
    tools();
    // A port nobody listens on: ipmitool gives up after its retries.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bmc_addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cfg =
        tern_power::ipmi::IpmiConfig::new("live-gone", bmc_addr, "admin", Password::new("x"));
    cfg.retries = 1;
    let t0 = Instant::now();
    let e = IpmiDriver::new(cfg.clone()).status().unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        matches!(
            &e,
            StatusError::Ipmi {
                cause: IpmiFailure::Unreachable { .. },
                ..
            }
        ),
        "{e:?}"
    );
    let shown = anyhow_like(&e);
    assert!(
        shown.contains(&format!("BMC 127.0.0.1:{port}")) && shown.contains("did not answer"),
        "{shown}"
    );

    // Our own deadline is shorter than ipmitool's retries: ipmitool is killed.
    cfg.command_timeout = Duration::from_millis(300);
    cfg.retries = 5;
    let t0 = Instant::now();
    let e = IpmiDriver::new(cfg).power_off(OffMode::Hard).unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        matches!(
            &e,
            PowerOffError::Ipmi {
                cause: IpmiFailure::Timeout { timeout_ms: 300 },
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        anyhow_like(&e).contains("did not finish within 300 ms"),
        "{e}"
    );
}

#[test]
fn a_failing_power_command_is_a_command_failure_with_ipmitools_stderr() {
    tools();
    let mut opts = SimBmcOptions::new("live-fail", "admin", "pw");
    opts.power_on_cmd = Some("echo 'no power supply' >&2; exit 3".into());
    let bmc = SimBmc::start(opts).unwrap();
    let e = bmc.driver().power_on().unwrap_err();
    let PowerOnError::Ipmi {
        cause: IpmiFailure::CommandFailed { stderr, .. },
        ..
    } = &e
    else {
        panic!("{e:?}");
    };
    assert!(
        stderr.contains("Set Chassis Power Control to Up/On failed"),
        "{stderr}"
    );
    assert_eq!(bmc.driver().status().unwrap(), PowerStatus::Off);
    assert_eq!(bmc.events(), ["on-failed"]);
    assert!(bmc.hooks_log().contains("no power supply"));
}

#[test]
fn the_password_is_not_on_ipmitools_command_line() {
    tools();
    let scratch = tempfile::tempdir().unwrap();
    let seen = scratch.path().join("argv");
    let wrapper = scratch.path().join("ipmitool-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$@\" > {}\nexec ipmitool \"$@\"\n",
            seen.display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&wrapper)
        .status()
        .unwrap();
    let bmc = SimBmc::start(SimBmcOptions::new("live-ps", "admin", "Pw-1234567")).unwrap();
    let mut cfg = bmc.ipmi_config();
    cfg.program = wrapper;
    assert_eq!(IpmiDriver::new(cfg).status().unwrap(), PowerStatus::Off);
    let argv = std::fs::read_to_string(&seen).unwrap();
    assert!(argv.contains("-U admin -E"), "{argv}");
    assert!(!argv.contains("Pw-1234567"), "{argv}");
}

#[test]
fn dropping_a_bmc_leaves_nothing_behind() {
    tools();
    let scratch = tempfile::tempdir().unwrap();
    let (opts, pf) = sleeper_opts("live-drop", scratch.path());
    let bmc = SimBmc::start(opts).unwrap();
    bmc.driver().power_on().unwrap();
    assert!(alive(&pf));
    let pid = bmc.pid().unwrap();
    let dir = bmc.dir().to_path_buf();
    drop(bmc);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid as i32),
        "ipmi_sim is gone"
    );
    assert!(!dir.exists(), "its folder is gone");
    assert!(!alive(&pf), "the host it powered was powered off");
}

#[test]
fn several_bmcs_start_at_once_on_their_own_ports() {
    tools();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let bmc = SimBmc::start(SimBmcOptions::new(format!("live-many{i}"), "admin", "pw"))
                    .unwrap();
                let took = t0.elapsed();
                assert_eq!(bmc.driver().status().unwrap(), PowerStatus::Off);
                (bmc, took)
            })
        })
        .collect();
    let bmcs: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut ports: Vec<u16> = bmcs.iter().map(|(b, _)| b.addr().port).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 4);
    for (b, took) in &bmcs {
        assert!(
            *took < Duration::from_secs(1),
            "{} took {took:?} to start",
            b.host()
        );
    }
}

#[test]
fn bad_bmc_options_are_refused_before_anything_starts() {
    let e = SimBmc::start(SimBmcOptions::new("h", "ad min", "pw")).unwrap_err();
    assert!(e.to_string().contains("test BMC of host h"), "{e}");
    assert!(
        anyhow_like(&e).contains("Invalid BMC user"),
        "{}",
        anyhow_like(&e)
    );
    let e = SimBmc::start(SimBmcOptions::new("h/../x", "admin", "pw")).unwrap_err();
    assert!(e.to_string().contains("1-32 of a-z"), "{e}");
}

/// A network namespace made and deleted by this test.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("tpw-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(argv: &[&str]) {
    let st = Command::new(argv[0]).args(&argv[1..]).status().unwrap();
    assert!(st.success(), "{argv:?} failed");
}

#[test]
fn a_bmc_in_a_network_namespace_is_reached_from_inside_it() {
    tools();
    require_root_for("network namespaces");
    let ns = Netns::new("bmc");
    let mut opts = SimBmcOptions::new("live-ns", "admin", "pw");
    opts.netns = Some(ns.0.clone());
    let scratch = tempfile::tempdir().unwrap();
    let marker = scratch.path().join("on");
    opts.power_on_cmd = Some(format!("touch {}", marker.display()));
    let bmc = SimBmc::start(opts).unwrap();
    let d = bmc.driver();
    d.power_on().unwrap();
    assert!(marker.exists());
    assert_eq!(d.status().unwrap(), PowerStatus::On);
    // From the root namespace the same loopback address has no BMC.
    let mut outside = bmc.ipmi_config();
    outside.netns = None;
    outside.retries = 1;
    let e = IpmiDriver::new(outside).status().unwrap_err();
    assert!(
        matches!(
            e,
            StatusError::Ipmi {
                cause: IpmiFailure::Unreachable { .. },
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn a_magic_packet_crosses_from_one_namespace_to_a_listener_in_another() {
    require_root_for("network namespaces");
    let a = Netns::new("wa");
    let b = Netns::new("wb");
    let (va, vb) = (
        format!("tpwa{}", std::process::id() % 100000),
        format!("tpwb{}", std::process::id() % 100000),
    );
    run(&[
        "ip", "link", "add", &va, "netns", &a.0, "type", "veth", "peer", "name", &vb, "netns", &b.0,
    ]);
    run(&["ip", "-n", &a.0, "addr", "add", "10.93.0.1/24", "dev", &va]);
    run(&["ip", "-n", &b.0, "addr", "add", "10.93.0.2/24", "dev", &vb]);
    run(&["ip", "-n", &a.0, "link", "set", &va, "up"]);
    run(&["ip", "-n", &b.0, "link", "set", &vb, "up"]);

    let listener = WolListener::bind(Some(&b.0), "0.0.0.0:9".parse().unwrap()).unwrap();
    let mac: MacAddr = "52:54:00:aa:bb:01".parse().unwrap();
    let mut cfg = WolConfig::new("wol-h1", mac);
    cfg.netns = Some(a.0.clone());
    cfg.target = "10.93.0.255:9".parse().unwrap();
    let driver = WolDriver::new(cfg.clone());
    driver.power_on().unwrap();
    let wake = listener
        .recv_timeout(Duration::from_secs(3))
        .unwrap()
        .expect("a magic packet");
    assert_eq!(wake.mac, mac);
    assert_eq!(wake.from.ip().to_string(), "10.93.0.1");

    // The limited broadcast out of a named interface arrives too.
    cfg.target = "255.255.255.255:9".parse().unwrap();
    cfg.interface = Some(va.clone());
    WolDriver::new(cfg.clone()).send().unwrap();
    assert_eq!(
        listener
            .recv_timeout(Duration::from_secs(3))
            .unwrap()
            .map(|w| w.mac),
        Some(mac)
    );

    // An interface that does not exist is named in the error.
    cfg.interface = Some("nosuch0".into());
    let e = WolDriver::new(cfg).power_on().unwrap_err();
    assert!(
        anyhow_like(&e).contains("interface nosuch0"),
        "{}",
        anyhow_like(&e)
    );

    // Wake-on-LAN cannot power off or read the status.
    let e = driver.power_off(OffMode::Hard).unwrap_err();
    assert!(matches!(e, PowerOffError::Unsupported { .. }), "{e:?}");
    assert!(e.to_string().contains("Wake-on-LAN can only wake"), "{e}");
    let e = driver.status().unwrap_err();
    assert!(matches!(e, StatusError::Unsupported { .. }), "{e:?}");

    // Nothing else arrived.
    assert_eq!(
        listener.recv_timeout(Duration::from_millis(100)).unwrap(),
        None
    );
}

#[test]
fn a_wake_watcher_powers_its_host_on_through_the_bmc_when_its_magic_packet_comes() {
    tools();
    require_root_for("network namespaces");
    let ns = Netns::new("ww");
    let scratch = tempfile::tempdir().unwrap();
    let (opts, pf) = sleeper_opts("live-wake", scratch.path());
    let bmc = SimBmc::start(opts).unwrap();
    let mac: MacAddr = "52:54:00:aa:bb:02".parse().unwrap();
    let listener = WolListener::bind(Some(&ns.0), "127.0.0.1:9".parse().unwrap()).unwrap();
    let driver = bmc.driver();
    let watcher = WakeWatcher::spawn(listener, mac, move |_| {
        let _ = driver.power_on();
    });
    let send = |m: &str| {
        let mut cfg = WolConfig::new("live-wake", m.parse().unwrap());
        cfg.netns = Some(ns.0.clone());
        cfg.target = "127.0.0.1:9".parse().unwrap();
        WolDriver::new(cfg).power_on().unwrap();
    };
    // Another host's packet first: the watcher sees packets in order, so by the time its own
    // has woken the host the other one was seen and skipped.
    send("52:54:00:aa:bb:03");
    send("52:54:00:aa:bb:02");
    wait_for("the host to be woken", Duration::from_secs(5), || {
        alive(&pf)
    });
    assert_eq!(watcher.wakes(), 1, "only its own MAC counts");
    assert_eq!(bmc.events(), ["on"]);
    assert_eq!(bmc.driver().status().unwrap(), PowerStatus::On);
    drop(watcher);
}

#[test]
fn a_port_in_use_is_refused_with_ipmi_sims_own_words() {
    tools();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut opts = SimBmcOptions::new("live-port", "admin", "pw");
    opts.port = Some(taken.local_addr().unwrap().port());
    let t0 = Instant::now();
    let e = SimBmc::start(opts).unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
    let shown = e.to_string();
    assert!(
        shown.contains("exited during start") && shown.contains("Address already in use"),
        "{shown}"
    );
}

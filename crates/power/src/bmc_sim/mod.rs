//! Test BMCs: OpenIPMI's `ipmi_sim` (Debian `openipmi`), one per test host, on a free UDP port
//! on loopback or inside a network namespace, its chassis power wired to commands the caller
//! gives. `ipmitool … chassis power off` against it runs the host's power-off command (say, stop
//! its agent and volume node), `power on` runs the power-on command, `power soft` runs the
//! soft-off command (or is ignored, like an OS that ignores ACPI, if there is none), and `power
//! status` answers from the state those left. Dropping the [`SimBmc`] runs the power-off command
//! if the host is on (unless told not to), stops ipmi_sim and removes its folder: nothing is left.

pub mod conf;

use std::io::Read;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ipmi::{BmcAddr, IpmiConfig, IpmiDriver, Password};

/// How to start a test BMC.
#[derive(Debug, Clone)]
pub struct SimBmcOptions {
    /// The host it belongs to (for messages, ipmi_sim's name and the driver).
    pub host: String,
    /// The admin user (1-16 printable ASCII characters, no space, '"' or '\').
    pub user: String,
    /// Its password (1-20 such characters).
    pub password: String,
    /// Listening address (default 127.0.0.1; inside `netns` it must exist there).
    pub addr: Ipv4Addr,
    /// Listening UDP port; `None` picks a free one (retried if taken meanwhile).
    pub port: Option<u16>,
    /// Run ipmi_sim inside this network namespace.
    pub netns: Option<String>,
    /// Shell command run on power-on; must return once the host's processes are started.
    pub power_on_cmd: Option<String>,
    /// Shell command run on a hard power-off.
    pub power_off_cmd: Option<String>,
    /// Shell command run on a soft power-off; `None` ignores soft power-offs.
    pub soft_off_cmd: Option<String>,
    /// Whether the chassis starts powered (the power-on command is not run for it).
    pub initially_on: bool,
    /// Whether dropping the BMC runs the power-off command if the host is on (default true).
    pub power_off_on_drop: bool,
    /// The ipmi_sim program (default `ipmi_sim` on `PATH`).
    pub program: PathBuf,
    /// How long start may wait for ipmi_sim to listen (default 5 s).
    pub start_timeout: Duration,
    /// Make the BMC's folder inside this one (default: the system's temporary folder), e.g. a
    /// test cluster's own folder, so that whoever removes that removes the BMC's files too.
    pub parent_dir: Option<PathBuf>,
}

impl SimBmcOptions {
    /// Options with the defaults above and no power commands.
    pub fn new(
        host: impl Into<String>,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        SimBmcOptions {
            host: host.into(),
            user: user.into(),
            password: password.into(),
            addr: Ipv4Addr::LOCALHOST,
            port: None,
            netns: None,
            power_on_cmd: None,
            power_off_cmd: None,
            soft_off_cmd: None,
            initially_on: false,
            power_off_on_drop: true,
            program: PathBuf::from("ipmi_sim"),
            start_timeout: Duration::from_secs(5),
            parent_dir: None,
        }
    }
}

/// Why a test BMC did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartSimBmcError {
    /// A user name or password cannot be used.
    #[error("Cannot start the test BMC of host {host}")]
    Credential {
        /// The host.
        host: String,
        /// What is wrong.
        #[source]
        source: conf::InvalidCredential,
    },
    /// The host name cannot name a BMC.
    #[error(
        "Cannot start a test BMC for host {host:?}: the name must be 1-32 of a-z, A-Z, 0-9, '-', '_', '.'"
    )]
    HostName {
        /// The host.
        host: String,
    },
    /// Its folder or files could not be written.
    #[error("Cannot start the test BMC of host {host}: cannot write {path}")]
    Files {
        /// The host.
        host: String,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No free port was found.
    #[error("Cannot start the test BMC of host {host}: no free UDP port on {addr}")]
    NoPort {
        /// The host.
        host: String,
        /// The address.
        addr: Ipv4Addr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// ipmi_sim could not be started.
    #[error(
        "Cannot run {program} for the test BMC of host {host} (scripts/install-deps.sh installs openipmi)"
    )]
    Spawn {
        /// The host.
        host: String,
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// ipmi_sim exited during start.
    #[error(
        "The test BMC of host {host} (ipmi_sim on {addr}) exited during start ({status}): {log}"
    )]
    Exited {
        /// The host.
        host: String,
        /// Its address.
        addr: String,
        /// How it ended.
        status: String,
        /// Its output.
        log: String,
    },
    /// ipmi_sim did not listen in time.
    #[error(
        "The test BMC of host {host} (ipmi_sim) was not listening on {addr} after {waited_ms} ms: {log}"
    )]
    NotListening {
        /// The host.
        host: String,
        /// Its address.
        addr: String,
        /// How long start waited.
        waited_ms: u64,
        /// Its output.
        log: String,
    },
}

/// A running test BMC. Dropping it cleans everything up.
#[derive(Debug)]
pub struct SimBmc {
    opts: SimBmcOptions,
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl SimBmc {
    /// Writes the BMC's files into a new temporary folder, starts ipmi_sim and returns once it
    /// listens.
    pub fn start(opts: SimBmcOptions) -> Result<SimBmc, StartSimBmcError> {
        let host = opts.host.clone();
        let name_ok = !host.is_empty()
            && host.len() <= 32
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            return Err(StartSimBmcError::HostName { host });
        }
        let cred = |source| StartSimBmcError::Credential {
            host: host.clone(),
            source,
        };
        conf::check_credential("user", &opts.user, conf::MAX_USER_LEN).map_err(cred)?;
        conf::check_credential("password", &opts.password, conf::MAX_PASSWORD_LEN).map_err(cred)?;
        let files = |path: &Path, source| StartSimBmcError::Files {
            host: host.clone(),
            path: path.to_path_buf(),
            source,
        };
        let prefix = format!("tern-bmc-{host}-");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix);
        let dir = match &opts.parent_dir {
            Some(parent) => builder.tempdir_in(parent).map_err(|e| files(parent, e))?,
            None => builder
                .tempdir()
                .map_err(|e| files(Path::new("a temporary folder"), e))?,
        };
        let d = dir.path().to_path_buf();
        let d_str = d.display().to_string();
        let write = |name: &str, text: &str, exec: bool| -> Result<(), StartSimBmcError> {
            let path = d.join(name);
            std::fs::write(&path, text).map_err(|e| files(&path, e))?;
            if exec {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| files(&path, e))?;
            }
            Ok(())
        };
        write("bmc.emu", &conf::bmc_emu(), false)?;
        write(
            "chassis-control",
            &conf::chassis_control(&d_str, opts.soft_off_cmd.is_some()),
            true,
        )?;
        for (name, cmd) in [
            ("on.sh", &opts.power_on_cmd),
            ("off.sh", &opts.power_off_cmd),
            ("soft.sh", &opts.soft_off_cmd),
        ] {
            if let Some(cmd) = cmd {
                write(name, &format!("#!/bin/sh\nset -e\n{cmd}\n"), false)?;
            }
        }
        write(
            "power",
            if opts.initially_on { "on\n" } else { "off\n" },
            false,
        )?;
        write("events", "", false)?;
        std::fs::create_dir_all(d.join("state")).map_err(|e| files(&d.join("state"), e))?;

        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = match opts.port {
                Some(p) => p,
                None => free_udp_port(opts.addr).map_err(|source| StartSimBmcError::NoPort {
                    host: host.clone(),
                    addr: opts.addr,
                    source,
                })?,
            };
            let rendered = conf::Rendered {
                name: &format!("tern-{host}"),
                addr: opts.addr,
                port,
                user: &opts.user,
                password: &opts.password,
                dir: &d_str,
            };
            write("lan.conf", &conf::lan_conf(&rendered), false)?;
            match spawn_and_wait(&opts, &d, port) {
                Ok(child) => {
                    return Ok(SimBmc {
                        opts,
                        port,
                        child: Some(child),
                        dir,
                    });
                }
                // A port picked for us may have been taken meanwhile: try another.
                Err(e @ StartSimBmcError::Exited { .. }) if opts.port.is_none() && attempt < 4 => {
                    let _ = e;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The BMC's address.
    pub fn addr(&self) -> BmcAddr {
        BmcAddr {
            host: self.opts.addr.to_string(),
            port: self.port,
        }
    }

    /// The host it belongs to.
    pub fn host(&self) -> &str {
        &self.opts.host
    }

    /// The admin user.
    pub fn user(&self) -> &str {
        &self.opts.user
    }

    /// Its password.
    pub fn password(&self) -> &str {
        &self.opts.password
    }

    /// The network namespace it listens in.
    pub fn netns(&self) -> Option<&str> {
        self.opts.netns.as_deref()
    }

    /// ipmi_sim's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The folder of its files (`lan.conf`, `events`, `hooks.log`, …).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An IPMI driver configuration for this BMC (ipmitool runs in the BMC's namespace).
    pub fn ipmi_config(&self) -> IpmiConfig {
        let mut c = IpmiConfig::new(
            self.opts.host.clone(),
            self.addr(),
            self.opts.user.clone(),
            Password::new(self.opts.password.clone()),
        );
        c.netns = self.opts.netns.clone();
        c
    }

    /// An IPMI driver for this BMC.
    pub fn driver(&self) -> IpmiDriver {
        IpmiDriver::new(self.ipmi_config())
    }

    /// The power changes so far, one word each: `on`, `off`, `soft`, `soft-ignored`, `reset`,
    /// `on-failed`, `off-failed`, `soft-failed`.
    pub fn events(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir().join("events"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// What the power commands printed.
    pub fn hooks_log(&self) -> String {
        std::fs::read_to_string(self.dir().join("hooks.log")).unwrap_or_default()
    }

    /// Whether the chassis is powered, read from the BMC's own state (not through IPMI).
    pub fn is_on(&self) -> bool {
        std::fs::read_to_string(self.dir().join("power")).is_ok_and(|s| s.trim() == "on")
    }

    /// Stops the BMC now (as dropping it does).
    pub fn stop(self) {}
}

impl Drop for SimBmc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM, then SIGKILL after a second.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(1);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.opts.power_off_on_drop && self.is_on() && self.dir().join("off.sh").exists() {
            let _ = Command::new("/bin/sh")
                .arg(self.dir().join("off.sh"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A UDP port on `addr` that nobody used a moment ago.
fn free_udp_port(addr: Ipv4Addr) -> std::io::Result<u16> {
    let bind_addr = if addr.is_unspecified() || addr.is_loopback() {
        addr
    } else {
        // An address that exists only in another namespace cannot be bound here; loopback's
        // free ports are a good guess there too.
        Ipv4Addr::LOCALHOST
    };
    Ok(UdpSocket::bind((bind_addr, 0))?.local_addr()?.port())
}

/// Starts ipmi_sim and waits until its socket is bound.
fn spawn_and_wait(opts: &SimBmcOptions, dir: &Path, port: u16) -> Result<Child, StartSimBmcError> {
    let host = opts.host.clone();
    let addr = format!("{}:{port}", opts.addr);
    let mut cmd = match &opts.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&opts.program);
            c
        }
        None => Command::new(&opts.program),
    };
    let log_path = dir.join("ipmi_sim.log");
    let log = std::fs::File::create(&log_path).map_err(|source| StartSimBmcError::Files {
        host: host.clone(),
        path: log_path.clone(),
        source,
    })?;
    let log2 = log.try_clone().map_err(|source| StartSimBmcError::Files {
        host: host.clone(),
        path: log_path.clone(),
        source,
    })?;
    cmd.arg("-c")
        .arg(dir.join("lan.conf"))
        .arg("-f")
        .arg(dir.join("bmc.emu"))
        .arg("-s")
        .arg(dir.join("state"))
        .args(["-n", "-p"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    let mut child = cmd.spawn().map_err(|source| StartSimBmcError::Spawn {
        host: host.clone(),
        program: opts.program.display().to_string(),
        source,
    })?;
    let read_log = || {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s.trim().replace('\n', "; ")
    };
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(StartSimBmcError::Exited {
                host,
                addr,
                status: status.to_string(),
                log: read_log(),
            });
        }
        if udp_port_bound(child.id(), port) {
            return Ok(child);
        }
        if start.elapsed() >= opts.start_timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(StartSimBmcError::NotListening {
                host,
                addr,
                waited_ms: opts.start_timeout.as_millis() as u64,
                log: read_log(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether process `pid` holds a UDP socket bound to `port` (its own socket, seen in the table of
/// its network namespace).
fn udp_port_bound(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/udp")) else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols
                .get(1)
                .and_then(|local| local.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            (local_port == Some(port)).then(|| cols.get(9).map(|i| format!("socket:[{i}]")))?
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

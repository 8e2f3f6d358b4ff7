//! The IPMI driver: the real `ipmitool` against a host's BMC, each run under a deadline, its
//! answers read by the pure [`cli`]. The password goes to ipmitool in its environment
//! (`IPMI_PASSWORD`, `-E`), so `ps` never shows it.

pub mod cli;

use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{
    DriverKind, OffMode, OffOutcome, PowerDriver, PowerOffError, PowerOnError, PowerStatus,
    StatusError,
};
pub use cli::{BmcAddr, ChassisAction, IpmiInterface, ParseBmcAddrError};

/// What went wrong talking to a BMC through ipmitool.
#[derive(Debug, thiserror::Error)]
pub enum IpmiFailure {
    /// Nothing answered (no BMC at that address, or it is unreachable).
    #[error("the BMC did not answer (ipmitool: {detail})")]
    Unreachable {
        /// ipmitool's own words.
        detail: String,
    },
    /// The BMC answered and refused the user name, password or privilege.
    #[error(
        "the BMC refused user '{user}': wrong user name or password, or too little privilege (ipmitool: {detail})"
    )]
    AuthRefused {
        /// The user.
        user: String,
        /// ipmitool's own words.
        detail: String,
    },
    /// ipmitool failed for another reason; its stderr says why.
    #[error("ipmitool failed (exit status {code:?}): {stderr}")]
    CommandFailed {
        /// ipmitool's exit code (none if a signal ended it).
        code: Option<i32>,
        /// ipmitool's stderr, without noise.
        stderr: String,
    },
    /// ipmitool did not finish in time and was killed.
    #[error("ipmitool did not finish within {timeout_ms} ms and was killed")]
    Timeout {
        /// The deadline.
        timeout_ms: u64,
    },
    /// ipmitool could not be started.
    #[error("cannot run {program} (scripts/install-deps.sh installs ipmitool)")]
    Spawn {
        /// What was run.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// ipmitool succeeded but its answer was not understood.
    #[error("ipmitool's answer to 'chassis power {action}' was not understood: {stdout:?}")]
    UnexpectedOutput {
        /// The command word.
        action: &'static str,
        /// What it printed.
        stdout: String,
    },
}

/// A BMC password; `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(p: impl Into<String>) -> Self {
        Password(p.into())
    }

    /// The password itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// How to reach one host's BMC.
#[derive(Debug, Clone)]
pub struct IpmiConfig {
    /// The host's name (for messages).
    pub host: String,
    /// The BMC's address.
    pub bmc: BmcAddr,
    /// The BMC user.
    pub user: String,
    /// The BMC password.
    pub password: Password,
    /// The protocol (default: lanplus, cipher suite 3).
    pub interface: IpmiInterface,
    /// ipmitool's wait for one answer (`-N`, whole seconds, default 1).
    pub answer_timeout_s: u32,
    /// ipmitool's retries per request (`-R`, default 2).
    pub retries: u32,
    /// The longest one ipmitool run may take before it is killed (default 10 s).
    pub command_timeout: Duration,
    /// How often a soft power-off's progress is read (default 200 ms).
    pub poll_interval: Duration,
    /// Run ipmitool inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// The ipmitool program (default `ipmitool` on `PATH`).
    pub program: PathBuf,
}

impl IpmiConfig {
    /// A configuration with the defaults above.
    pub fn new(
        host: impl Into<String>,
        bmc: BmcAddr,
        user: impl Into<String>,
        password: Password,
    ) -> Self {
        IpmiConfig {
            host: host.into(),
            bmc,
            user: user.into(),
            password,
            interface: IpmiInterface::default(),
            answer_timeout_s: 1,
            retries: 2,
            command_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(200),
            netns: None,
            program: PathBuf::from("ipmitool"),
        }
    }
}

/// Host power through a BMC and `ipmitool`.
#[derive(Debug, Clone)]
pub struct IpmiDriver {
    config: IpmiConfig,
}

impl IpmiDriver {
    /// A driver for the BMC `config` names; nothing is sent yet.
    pub fn new(config: IpmiConfig) -> Self {
        IpmiDriver { config }
    }

    /// Its configuration.
    pub fn config(&self) -> &IpmiConfig {
        &self.config
    }

    /// Runs `ipmitool … chassis power ACTION` once and returns its stdout, or why it failed.
    pub fn run(&self, action: ChassisAction) -> Result<String, IpmiFailure> {
        let c = &self.config;
        let target = cli::Target {
            bmc: c.bmc.clone(),
            user: c.user.clone(),
            interface: c.interface,
            answer_timeout_s: c.answer_timeout_s,
            retries: c.retries,
        };
        let mut cmd = match &c.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(&c.program);
                cmd
            }
            None => Command::new(&c.program),
        };
        cmd.args(cli::ipmitool_args(&target, action))
            .env(cli::PASSWORD_ENV, c.password.expose())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let program = c.program.display().to_string();
        let mut child = cmd.spawn().map_err(|source| IpmiFailure::Spawn {
            program: program.clone(),
            source,
        })?;
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        let deadline = Instant::now() + c.command_timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(IpmiFailure::Timeout {
                        timeout_ms: c.command_timeout.as_millis() as u64,
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(source) => return Err(IpmiFailure::Spawn { program, source }),
            }
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        if status.success() {
            Ok(stdout)
        } else {
            Err(cli::classify_failure(status.code(), &stderr, &c.user))
        }
    }

    /// Sends a power command and checks that the BMC acknowledged it.
    fn control(&self, action: ChassisAction) -> Result<(), IpmiFailure> {
        let stdout = self.run(action)?;
        if cli::control_acknowledged(&stdout, action) {
            Ok(())
        } else {
            Err(IpmiFailure::UnexpectedOutput {
                action: action.word(),
                stdout,
            })
        }
    }

    fn read_status(&self) -> Result<PowerStatus, IpmiFailure> {
        let stdout = self.run(ChassisAction::Status)?;
        cli::parse_status(&stdout).ok_or(IpmiFailure::UnexpectedOutput {
            action: ChassisAction::Status.word(),
            stdout,
        })
    }

    fn bmc(&self) -> String {
        self.config.bmc.to_string()
    }

    fn off_error(&self, cause: IpmiFailure) -> PowerOffError {
        PowerOffError::Ipmi {
            host: self.config.host.clone(),
            bmc: self.bmc(),
            cause,
        }
    }

    /// Polls the status until the host is off or `grace` has passed; whether it went off.
    fn wait_off(&self, grace: Duration) -> Result<bool, IpmiFailure> {
        let start = Instant::now();
        loop {
            if self.read_status()? == PowerStatus::Off {
                return Ok(true);
            }
            let elapsed = start.elapsed();
            if elapsed >= grace {
                return Ok(false);
            }
            std::thread::sleep(self.config.poll_interval.min(grace - elapsed));
        }
    }
}

/// Reads a child's pipe to the end on its own thread (so a full pipe never stalls the child).
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let mut bytes = Vec::new();
            let _ = p.read_to_end(&mut bytes);
            s = String::from_utf8_lossy(&bytes).into_owned();
        }
        s
    })
}

impl PowerDriver for IpmiDriver {
    fn host(&self) -> &str {
        &self.config.host
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Ipmi
    }

    fn power_on(&self) -> Result<(), PowerOnError> {
        self.control(ChassisAction::On)
            .map_err(|cause| PowerOnError::Ipmi {
                host: self.config.host.clone(),
                bmc: self.bmc(),
                cause,
            })
    }

    fn power_off(&self, mode: OffMode) -> Result<OffOutcome, PowerOffError> {
        if self.read_status().map_err(|e| self.off_error(e))? == PowerStatus::Off {
            return Ok(OffOutcome::AlreadyOff);
        }
        let grace = match mode {
            OffMode::Hard => {
                self.control(ChassisAction::Off)
                    .map_err(|e| self.off_error(e))?;
                return Ok(OffOutcome::Hard);
            }
            OffMode::Soft { grace } | OffMode::SoftThenHard { grace } => grace,
        };
        self.control(ChassisAction::Soft)
            .map_err(|e| self.off_error(e))?;
        if self.wait_off(grace).map_err(|e| self.off_error(e))? {
            return Ok(OffOutcome::Soft);
        }
        match mode {
            OffMode::SoftThenHard { .. } => {
                self.control(ChassisAction::Off)
                    .map_err(|e| self.off_error(e))?;
                Ok(OffOutcome::Hard)
            }
            _ => Err(PowerOffError::SoftTimeout {
                host: self.config.host.clone(),
                bmc: self.bmc(),
                waited_ms: grace.as_millis() as u64,
            }),
        }
    }

    fn status(&self) -> Result<PowerStatus, StatusError> {
        self.read_status().map_err(|cause| StatusError::Ipmi {
            host: self.config.host.clone(),
            bmc: self.bmc(),
            cause,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_password() {
        let c = IpmiConfig::new(
            "h0",
            "127.0.0.1:623".parse().unwrap(),
            "admin",
            Password::new("hunter2"),
        );
        let shown = format!("{:?}", IpmiDriver::new(c));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("Password(***)"), "{shown}");
    }

    #[test]
    fn a_missing_ipmitool_is_a_spawn_error_naming_it() {
        let mut c = IpmiConfig::new(
            "h0",
            "127.0.0.1:623".parse().unwrap(),
            "admin",
            Password::new("x"),
        );
        c.program = PathBuf::from("/nonexistent/ipmitool");
        let e = IpmiDriver::new(c).status().unwrap_err();
        let StatusError::Ipmi {
            cause: IpmiFailure::Spawn { program, .. },
            host,
            ..
        } = &e
        else {
            panic!("{e:?}");
        };
        assert_eq!(
            (host.as_str(), program.as_str()),
            ("h0", "/nonexistent/ipmitool")
        );
    }
}

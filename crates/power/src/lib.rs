//! Host power through drivers: turning a whole host on and off, and asking whether it is on.
//!
//! The cluster powers a drained host off and wakes one when capacity falls short (docs/power.md).
//! What it asks of a host's power is the [`PowerDriver`] trait; two drivers carry it out:
//!
//! - [`ipmi::IpmiDriver`] runs the real `ipmitool` against the host's BMC (`chassis power
//!   on|off|soft|status`), with the password in the environment (`-E`), never on the command line;
//! - [`wol::WolDriver`] sends a Wake-on-LAN magic packet as a UDP broadcast, optionally from inside
//!   a network namespace. It can only wake: powering off or reading the status is a typed
//!   `Unsupported` error.
//!
//! Each shell is thin over a pure core: [`ipmi::cli`] builds ipmitool's arguments and reads its
//! answers (captured outputs are its tests), [`wol::packet`] builds and parses magic packets, and
//! [`state`] tracks one host's power through its transitions with the time as an argument
//! (on, powering off, off, powering on, failed to wake; a host that failed to wake is not chosen
//! again until an operator clears it).
//!
//! [`bmc_sim::SimBmc`] is a BMC for test hosts: OpenIPMI's `ipmi_sim` on a free UDP port, on
//! loopback or in a network namespace, whose chassis power-on and power-off run commands the
//! caller gives (start or stop that host's agent and volume node).
//!
//! ```no_run
//! use std::time::Duration;
//! use tern_power::{OffMode, PowerDriver, PowerStatus};
//! use tern_power::bmc_sim::{SimBmc, SimBmcOptions};
//!
//! // A BMC whose power-off kills the host's "agent" and whose power-on starts it.
//! let mut opts = SimBmcOptions::new("h0", "admin", "s3cret");
//! opts.power_on_cmd = Some("setsid sleep 1000 >/dev/null 2>&1 & echo $! > /tmp/h0.pid".into());
//! opts.power_off_cmd = Some("kill $(cat /tmp/h0.pid)".into());
//! let bmc = SimBmc::start(opts).unwrap();
//! let driver = bmc.driver();
//! driver.power_on().unwrap();
//! assert_eq!(driver.status().unwrap(), PowerStatus::On);
//! driver.power_off(OffMode::SoftThenHard { grace: Duration::from_secs(2) }).unwrap();
//! assert_eq!(driver.status().unwrap(), PowerStatus::Off);
//! ```
#![forbid(unsafe_code)]

pub mod bmc_sim;
pub mod ipmi;
pub mod state;
pub mod wol;

use std::fmt;
use std::time::Duration;

pub use ipmi::IpmiFailure;
pub use wol::SendWolError;

/// What a host's power is, as its driver reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PowerStatus {
    /// The chassis is powered.
    On,
    /// The chassis is off (or in soft-off).
    Off,
    /// The BMC answered but named neither state.
    Unknown,
}

impl fmt::Display for PowerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PowerStatus::On => "on",
            PowerStatus::Off => "off",
            PowerStatus::Unknown => "unknown",
        })
    }
}

/// How to power a host off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffMode {
    /// Ask the operating system to shut down (ACPI soft-off); if the host is still on after
    /// `grace`, cut the power.
    SoftThenHard {
        /// How long the soft power-off may take.
        grace: Duration,
    },
    /// Ask the operating system to shut down, and fail if the host is still on after `grace`.
    Soft {
        /// How long the soft power-off may take.
        grace: Duration,
    },
    /// Cut the power at once.
    Hard,
}

/// How a power-off ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffOutcome {
    /// The host was off already; nothing was sent.
    AlreadyOff,
    /// The soft power-off took the host down within its grace time.
    Soft,
    /// The power was cut (asked for, or the soft power-off's grace ran out).
    Hard,
}

impl fmt::Display for OffOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OffOutcome::AlreadyOff => "already_off",
            OffOutcome::Soft => "soft",
            OffOutcome::Hard => "hard",
        })
    }
}

/// Which kind of driver a host's power goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// A BMC through `ipmitool`.
    Ipmi,
    /// Wake-on-LAN magic packets (wake only).
    WakeOnLan,
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverKind::Ipmi => "IPMI",
            DriverKind::WakeOnLan => "Wake-on-LAN",
        })
    }
}

/// A host's power, as the cluster uses it. Every call blocks until it is done or has failed, and
/// every failure names the host and its cause.
pub trait PowerDriver: fmt::Debug + Send + Sync {
    /// The host this driver powers (for messages).
    fn host(&self) -> &str;
    /// Which kind of driver this is.
    fn kind(&self) -> DriverKind;
    /// Powers the host on (or wakes it). Powering on a host that is on is not an error.
    fn power_on(&self) -> Result<(), PowerOnError>;
    /// Powers the host off the way `mode` says.
    fn power_off(&self, mode: OffMode) -> Result<OffOutcome, PowerOffError>;
    /// Reads whether the host is on.
    fn status(&self) -> Result<PowerStatus, StatusError>;
}

/// Why a host could not be powered on.
#[derive(Debug, thiserror::Error)]
pub enum PowerOnError {
    /// The BMC could not be asked, or refused.
    #[error("Cannot power on host {host} through BMC {bmc}")]
    Ipmi {
        /// The host.
        host: String,
        /// The BMC's address.
        bmc: String,
        /// What went wrong.
        #[source]
        cause: IpmiFailure,
    },
    /// The magic packet could not be sent.
    #[error("Cannot wake host {host} (MAC {mac}) with a magic packet to {target}")]
    WakeOnLan {
        /// The host.
        host: String,
        /// The MAC address woken.
        mac: String,
        /// Where the packet went.
        target: String,
        /// What went wrong.
        #[source]
        cause: SendWolError,
    },
}

/// Why a host could not be powered off.
#[derive(Debug, thiserror::Error)]
pub enum PowerOffError {
    /// The BMC could not be asked, or refused.
    #[error("Cannot power off host {host} through BMC {bmc}")]
    Ipmi {
        /// The host.
        host: String,
        /// The BMC's address.
        bmc: String,
        /// What went wrong.
        #[source]
        cause: IpmiFailure,
    },
    /// A soft-only power-off did not take the host down in time.
    #[error(
        "Host {host} is still on {waited_ms} ms after a soft power-off through BMC {bmc} \
         (a hard power-off was not asked for)"
    )]
    SoftTimeout {
        /// The host.
        host: String,
        /// The BMC's address.
        bmc: String,
        /// How long the driver waited.
        waited_ms: u64,
    },
    /// The driver cannot power a host off.
    #[error("Cannot power off host {host}: {driver} can only wake a host (use its BMC)")]
    Unsupported {
        /// The host.
        host: String,
        /// The driver.
        driver: DriverKind,
    },
}

/// Why a host's power status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The BMC could not be asked, or refused.
    #[error("Cannot read the power status of host {host} from BMC {bmc}")]
    Ipmi {
        /// The host.
        host: String,
        /// The BMC's address.
        bmc: String,
        /// What went wrong.
        #[source]
        cause: IpmiFailure,
    },
    /// The driver cannot read a host's power status.
    #[error("Cannot read the power status of host {host}: {driver} has no way to ask a host")]
    Unsupported {
        /// The host.
        host: String,
        /// The driver.
        driver: DriverKind,
    },
}

//! What the IPMI driver says to `ipmitool` and what its answers mean: the BMC address, the
//! argument list (never the password: it travels in `IPMI_PASSWORD` with `-E`), the power status
//! and acknowledgements on stdout, and the cause of a failure read from stderr. Pure: the tests
//! below feed it outputs captured from ipmitool 1.8.19 against `ipmi_sim`.
#![deny(clippy::disallowed_methods)]

use std::fmt;
use std::str::FromStr;

use super::IpmiFailure;
use crate::PowerStatus;

/// The IPMI port a BMC listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 623;

/// A BMC's address: a host name or IP address and a UDP port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BmcAddr {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// UDP port.
    pub port: u16,
}

impl fmt::Display for BmcAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a BMC address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Invalid BMC address {input:?}: {reason} (expected HOST, HOST:PORT or [IPV6]:PORT, port 1-65535)"
)]
pub struct ParseBmcAddrError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for BmcAddr {
    type Err = ParseBmcAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseBmcAddrError {
            input: s.to_string(),
            reason,
        };
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(|| err("no closing ']'"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(p.strip_prefix(':').ok_or_else(|| err("junk after ']'"))?),
                ),
            }
        } else if s.matches(':').count() > 1 {
            (s, None)
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        if host.is_empty() {
            return Err(err("the host is empty"));
        }
        if host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/')
        {
            return Err(err("the host has a space, '/' or a control character"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(err("the port is not a number in 1-65535")),
                Ok(p) => p,
            },
        };
        Ok(BmcAddr {
            host: host.to_string(),
            port,
        })
    }
}

/// Which IPMI LAN protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpmiInterface {
    /// IPMI 2.0 RMCP+ (`-I lanplus`) with the given cipher suite (`-C`). Suite 3 (HMAC-SHA1,
    /// AES-CBC-128) is what `ipmi_sim` and most BMCs speak; without `-C` ipmitool 1.8.19 first asks
    /// for suite 17, which `ipmi_sim` lacks, and loses a second on every call.
    Lanplus {
        /// The RMCP+ cipher suite.
        cipher_suite: u8,
    },
    /// IPMI 1.5 (`-I lan`): MD5 challenge-response, no encryption.
    Lan,
}

impl Default for IpmiInterface {
    fn default() -> Self {
        IpmiInterface::Lanplus { cipher_suite: 3 }
    }
}

/// A chassis command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChassisAction {
    /// `chassis power on`.
    On,
    /// `chassis power off` (hard).
    Off,
    /// `chassis power soft` (ACPI soft-off).
    Soft,
    /// `chassis power status`.
    Status,
}

impl ChassisAction {
    /// The word ipmitool takes after `chassis power`.
    pub fn word(self) -> &'static str {
        match self {
            ChassisAction::On => "on",
            ChassisAction::Off => "off",
            ChassisAction::Soft => "soft",
            ChassisAction::Status => "status",
        }
    }

    /// What ipmitool prints after `Chassis Power Control: ` when the BMC took the command.
    fn acknowledgement(self) -> Option<&'static str> {
        match self {
            ChassisAction::On => Some("Up/On"),
            ChassisAction::Off => Some("Down/Off"),
            ChassisAction::Soft => Some("Soft"),
            ChassisAction::Status => None,
        }
    }
}

/// Everything ipmitool's command line carries (the password is not among it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The BMC.
    pub bmc: BmcAddr,
    /// The BMC user.
    pub user: String,
    /// The protocol.
    pub interface: IpmiInterface,
    /// ipmitool's wait for one answer, in whole seconds (`-N`, at least 1).
    pub answer_timeout_s: u32,
    /// ipmitool's retries per request (`-R`, at least 1: ipmitool reads 0 as its own default,
    /// which waits 20 s for a silent BMC).
    pub retries: u32,
}

/// The environment variable ipmitool reads the password from with `-E`.
pub const PASSWORD_ENV: &str = "IPMI_PASSWORD";

/// ipmitool's arguments for `action` against `target`. `-v` makes ipmitool name the cause of a
/// failed session (HMAC invalid, unauthorised name, no answer), which [`classify_failure`] reads.
pub fn ipmitool_args(target: &Target, action: ChassisAction) -> Vec<String> {
    let mut args: Vec<String> = vec!["-v".into(), "-I".into()];
    match target.interface {
        IpmiInterface::Lanplus { cipher_suite } => {
            args.push("lanplus".into());
            args.push("-C".into());
            args.push(cipher_suite.to_string());
        }
        IpmiInterface::Lan => args.push("lan".into()),
    }
    args.extend([
        "-H".into(),
        target.bmc.host.clone(),
        "-p".into(),
        target.bmc.port.to_string(),
        "-U".into(),
        target.user.clone(),
        "-E".into(),
        "-N".into(),
        target.answer_timeout_s.max(1).to_string(),
        "-R".into(),
        target.retries.max(1).to_string(),
        "chassis".into(),
        "power".into(),
        action.word().into(),
    ]);
    args
}

/// The power state in the stdout of `chassis power status` (`Chassis Power is on`), or `None` if
/// no line says it.
pub fn parse_status(stdout: &str) -> Option<PowerStatus> {
    stdout.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("Chassis Power is ")?;
        Some(match rest.trim().to_ascii_lowercase().as_str() {
            "on" => PowerStatus::On,
            "off" => PowerStatus::Off,
            _ => PowerStatus::Unknown,
        })
    })
}

/// Whether the stdout of a power command says the BMC took it (`Chassis Power Control: Up/On`).
pub fn control_acknowledged(stdout: &str, action: ChassisAction) -> bool {
    let Some(ack) = action.acknowledgement() else {
        return false;
    };
    stdout.lines().any(|line| {
        line.trim()
            .strip_prefix("Chassis Power Control:")
            .is_some_and(|rest| rest.trim() == ack)
    })
}

/// Lines of ipmitool's stderr that say nothing about a failure.
const NOISE: &[&str] = &["Loading IANA PEN Registry"];

/// ipmitool's stderr without its noise, lines joined with "; ".
pub fn clean_stderr(stderr: &str) -> String {
    stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !NOISE.iter().any(|n| l.starts_with(n)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What ipmitool says when the BMC refused the user name, the password or the privilege level.
const AUTH_REFUSED: &[&str] = &[
    "RAKP 2 HMAC is invalid",
    "RAKP 4 message has invalid integrity check",
    "unauthorized name",
    "Invalid user name",
    "Activate Session command failed",
    "Activate Session error",
    "invalid role",
    "unauthorized role or privilege level",
    "Set Session Privilege Level to",
    "password is invalid",
];

/// What ipmitool says when nothing answered.
const UNREACHABLE: &[&str] = &[
    "Get Auth Capabilities error",
    "Get Auth Capabilities command failed",
    "Error issuing Get Channel Authentication Capabilities request",
    "No response from remote controller",
    "Address lookup for",
    "Unable to establish IPMI v2 / RMCP+ session",
    "Unable to establish IPMI v1.5 / RMCP session",
    "Unable to establish LAN session",
];

/// The cause of a failed ipmitool run, from its exit code and stderr. An answer that refused the
/// credentials wins over "no session" (ipmitool prints both), and a session that was never
/// established without a named refusal means no answer.
pub fn classify_failure(exit_code: Option<i32>, stderr: &str, user: &str) -> IpmiFailure {
    let detail = clean_stderr(stderr);
    if AUTH_REFUSED.iter().any(|m| stderr.contains(m)) {
        return IpmiFailure::AuthRefused {
            user: user.to_string(),
            detail,
        };
    }
    if UNREACHABLE.iter().any(|m| stderr.contains(m)) {
        return IpmiFailure::Unreachable { detail };
    }
    IpmiFailure::CommandFailed {
        code: exit_code,
        stderr: detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            bmc: "127.0.0.1:16231".parse().unwrap(),
            user: "admin".into(),
            interface: IpmiInterface::default(),
            answer_timeout_s: 1,
            retries: 2,
        }
    }

    #[test]
    fn bmc_addresses_parse_with_and_without_a_port() {
        let a: BmcAddr = "10.0.0.5:6230".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("10.0.0.5", 6230));
        let b: BmcAddr = "bmc-h1".parse().unwrap();
        assert_eq!((b.host.as_str(), b.port), ("bmc-h1", 623));
        let c: BmcAddr = "[fe80::1]:700".parse().unwrap();
        assert_eq!((c.host.as_str(), c.port), ("fe80::1", 700));
        assert_eq!(c.to_string(), "[fe80::1]:700");
        let d: BmcAddr = "fe80::2".parse().unwrap();
        assert_eq!(d.port, 623);
    }

    #[test]
    fn bad_bmc_addresses_are_refused_naming_the_input_and_the_range() {
        for bad in [
            "", ":623", "h:0", "h:70000", "h:x", "[::1", "[::1]x", "a b:1",
        ] {
            let e = bad.parse::<BmcAddr>().unwrap_err();
            assert_eq!(e.input, bad);
            assert!(e.to_string().contains("1-65535"), "{e}");
        }
    }

    #[test]
    fn the_password_never_reaches_the_command_line() {
        let args = ipmitool_args(&target(), ChassisAction::Off);
        assert!(args.contains(&"-E".to_string()));
        assert!(!args.iter().any(|a| a == "-P" || a == "-f"));
        assert_eq!(
            args.join(" "),
            "-v -I lanplus -C 3 -H 127.0.0.1 -p 16231 -U admin -E -N 1 -R 2 chassis power off"
        );
    }

    #[test]
    fn lan_interface_has_no_cipher_suite() {
        let mut t = target();
        t.interface = IpmiInterface::Lan;
        t.answer_timeout_s = 0;
        t.retries = 0;
        let args = ipmitool_args(&t, ChassisAction::Status).join(" ");
        assert!(args.starts_with("-v -I lan -H 127.0.0.1"), "{args}");
        assert!(
            args.contains("-N 1 "),
            "the answer timeout is at least 1 s: {args}"
        );
        assert!(args.contains("-R 1 "), "at least one try: {args}");
    }

    #[test]
    fn status_is_read_from_the_captured_answers() {
        assert_eq!(parse_status("Chassis Power is on\n"), Some(PowerStatus::On));
        assert_eq!(
            parse_status("Chassis Power is off\n"),
            Some(PowerStatus::Off)
        );
        assert_eq!(
            parse_status("Running Get PICMG Properties my_addr 0x20\nChassis Power is off\n"),
            Some(PowerStatus::Off)
        );
        assert_eq!(
            parse_status("Chassis Power is flickering"),
            Some(PowerStatus::Unknown)
        );
        assert_eq!(parse_status(""), None);
        assert_eq!(parse_status("System Power : on"), None);
    }

    #[test]
    fn acknowledgements_match_their_command_only() {
        assert!(control_acknowledged(
            "Chassis Power Control: Up/On\n",
            ChassisAction::On
        ));
        assert!(control_acknowledged(
            "Chassis Power Control: Down/Off\n",
            ChassisAction::Off
        ));
        assert!(control_acknowledged(
            "Chassis Power Control: Soft\n",
            ChassisAction::Soft
        ));
        assert!(!control_acknowledged(
            "Chassis Power Control: Up/On\n",
            ChassisAction::Off
        ));
        assert!(!control_acknowledged("", ChassisAction::On));
        assert!(!control_acknowledged(
            "Chassis Power is on",
            ChassisAction::Status
        ));
    }

    // stderr of `ipmitool -v -I lanplus -C 3 … chassis power status` against ipmi_sim, captured.
    const LANPLUS_WRONG_PASSWORD: &str = "Loading IANA PEN Registry...\n> RAKP 2 HMAC is invalid\nError: Unable to establish IPMI v2 / RMCP+ session\n";
    const LANPLUS_WRONG_USER: &str = "Loading IANA PEN Registry...\nRAKP 2 message indicates an error : unauthorized name\nError: Unable to establish IPMI v2 / RMCP+ session\n";
    const LANPLUS_NO_ANSWER: &str = "Loading IANA PEN Registry...\nGet Auth Capabilities error\nError issuing Get Channel Authentication Capabilities request\nError: Unable to establish IPMI v2 / RMCP+ session\n";
    const LAN_WRONG_PASSWORD: &str = "Loading IANA PEN Registry...\nActivate Session command failed\nError: Unable to establish LAN session\nError: Unable to establish IPMI v1.5 / RMCP session\n";
    const LAN_WRONG_USER: &str = "Loading IANA PEN Registry...\nInvalid user name\nError: Unable to establish LAN session\nError: Unable to establish IPMI v1.5 / RMCP session\n";
    const LAN_NO_ANSWER: &str = "Loading IANA PEN Registry...\nGet Auth Capabilities command failed\nError: Unable to establish LAN session\nError: Unable to establish IPMI v1.5 / RMCP session\n";
    // A power command the BMC turned down (ipmi_sim without a chassis control program).
    const CONTROL_REFUSED: &str =
        "Set Chassis Power Control to Down/Off failed: Invalid data field in request\n";

    #[test]
    fn refused_credentials_are_told_apart_from_silence() {
        for stderr in [
            LANPLUS_WRONG_PASSWORD,
            LANPLUS_WRONG_USER,
            LAN_WRONG_PASSWORD,
            LAN_WRONG_USER,
        ] {
            let f = classify_failure(Some(1), stderr, "admin");
            assert!(
                matches!(&f, IpmiFailure::AuthRefused { user, .. } if user == "admin"),
                "{stderr}: {f:?}"
            );
        }
        for stderr in [LANPLUS_NO_ANSWER, LAN_NO_ANSWER] {
            let f = classify_failure(Some(1), stderr, "admin");
            assert!(
                matches!(f, IpmiFailure::Unreachable { .. }),
                "{stderr}: {f:?}"
            );
        }
    }

    #[test]
    fn other_failures_carry_ipmitools_stderr_without_noise() {
        let f = classify_failure(Some(1), CONTROL_REFUSED, "admin");
        match f {
            IpmiFailure::CommandFailed { code, stderr } => {
                assert_eq!(code, Some(1));
                assert_eq!(
                    stderr,
                    "Set Chassis Power Control to Down/Off failed: Invalid data field in request"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            clean_stderr(LANPLUS_WRONG_PASSWORD),
            "> RAKP 2 HMAC is invalid; Error: Unable to establish IPMI v2 / RMCP+ session"
        );
    }
}

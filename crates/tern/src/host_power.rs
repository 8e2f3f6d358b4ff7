//! `tern host power on|off|status` and `tern host wake`: a host's power through its BMC (IPMI, with
//! the real `ipmitool`) or a Wake-on-LAN magic packet; a thin shell over tern-power.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use tern_power::ipmi::{BmcAddr, IpmiConfig, IpmiDriver, IpmiInterface, Password};
use tern_power::wol::{MacAddr, WolConfig, WolDriver};
use tern_power::{OffMode, PowerDriver};

/// Subcommands of `tern host`.
#[derive(Debug, clap::Subcommand)]
pub enum HostCommand {
    /// Power a host on or off, or read its power, through its BMC with ipmitool (IPMI over LAN).
    /// The password is read from a file and handed to ipmitool in its environment, never on a
    /// command line.
    #[command(subcommand)]
    Power(PowerCommand),
    /// Wake a host with a Wake-on-LAN magic packet (6 x 0xff, then its MAC 16 times) sent as a
    /// UDP broadcast. Wake-on-LAN can only wake: use `tern host power` to power off or ask.
    Wake(WakeArgs),
}

/// Subcommands of `tern host power`.
#[derive(Debug, clap::Subcommand)]
pub enum PowerCommand {
    /// Power the host on (a host already on stays on).
    On(BmcArgs),
    /// Power the host off: by default a soft power-off (ACPI), then a hard one if the host is
    /// still on after --grace.
    Off(OffArgs),
    /// Print whether the host is on: "on", "off" or "unknown".
    Status(BmcArgs),
}

/// How to reach a BMC.
#[derive(Debug, Clone, clap::Args)]
pub struct BmcArgs {
    /// The BMC's address: HOST, HOST:PORT or [IPV6]:PORT (IPMI's port 623 if none).
    #[arg(long, value_name = "HOST:PORT")]
    pub bmc: String,
    /// The BMC user.
    #[arg(long, short = 'U')]
    pub user: String,
    /// A file holding the BMC password (its first line; keep it readable by root only).
    #[arg(long, value_name = "FILE")]
    pub password_file: PathBuf,
    /// The IPMI protocol: lanplus (IPMI 2.0 RMCP+) or lan (IPMI 1.5).
    #[arg(long, default_value = "lanplus", value_parser = ["lanplus", "lan"])]
    pub interface: String,
    /// The RMCP+ cipher suite for lanplus (3: HMAC-SHA1 and AES-128, what most BMCs speak).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(0..=17))]
    pub cipher_suite: u8,
    /// How long one ipmitool run may take before it is killed, in seconds (1-600).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub timeout: u64,
    /// ipmitool's tries per request (1-10); each waits a second or more for an answer.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub retries: u32,
    /// Run ipmitool inside this network namespace (`ip netns exec NS`).
    #[arg(long, value_name = "NS")]
    pub netns: Option<String>,
    /// The host's name in messages (default: the BMC's address).
    #[arg(long)]
    pub host: Option<String>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Options of `tern host power off`.
#[derive(Debug, Clone, clap::Args)]
pub struct OffArgs {
    #[command(flatten)]
    pub bmc: BmcArgs,
    /// soft-then-hard (ACPI first, then cut the power after --grace), soft (ACPI only; an error if
    /// the host is still on after --grace) or hard (cut the power at once).
    #[arg(long, default_value = "soft-then-hard", value_parser = ["soft-then-hard", "soft", "hard"])]
    pub mode: String,
    /// How long a soft power-off may take, in seconds (0-3600).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub grace: u64,
}

/// Options of `tern host wake`.
#[derive(Debug, Clone, clap::Args)]
pub struct WakeArgs {
    /// The MAC address of the host's network card (e.g. 52:54:00:12:34:56).
    #[arg(long)]
    pub mac: String,
    /// Where the packet goes: 255.255.255.255 (the local link) or a subnet's broadcast address
    /// such as 10.77.0.255.
    #[arg(long, default_value_t = Ipv4Addr::BROADCAST)]
    pub broadcast: Ipv4Addr,
    /// The UDP port (9, discard, is the usual one; 7 also common).
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// Send from inside this network namespace (e.g. a test cluster's NAME-cl).
    #[arg(long, value_name = "NS")]
    pub netns: Option<String>,
    /// Send out of this network interface.
    #[arg(long, value_name = "IFACE")]
    pub interface: Option<String>,
    /// The host's name in messages (default: the MAC address).
    #[arg(long)]
    pub host: Option<String>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: HostCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        HostCommand::Power(PowerCommand::On(args)) => {
            let driver = ipmi_driver(&args)?;
            driver.power_on()?;
            report(&args, &driver, "on", "powered on")
        }
        HostCommand::Power(PowerCommand::Off(args)) => {
            let grace = Duration::from_secs(args.grace);
            let mode = match args.mode.as_str() {
                "soft" => OffMode::Soft { grace },
                "hard" => OffMode::Hard,
                _ => OffMode::SoftThenHard { grace },
            };
            let driver = ipmi_driver(&args.bmc)?;
            let outcome = driver.power_off(mode)?;
            let human = match outcome {
                tern_power::OffOutcome::AlreadyOff => "already off".to_string(),
                o => format!("powered off ({o})"),
            };
            report(&args.bmc, &driver, &outcome.to_string(), &human)
        }
        HostCommand::Power(PowerCommand::Status(args)) => {
            let driver = ipmi_driver(&args)?;
            let status = driver.status()?;
            if args.json {
                let v = serde_json::json!({
                    "host": driver.host(),
                    "bmc": driver.config().bmc.to_string(),
                    "status": status.to_string(),
                });
                println!("{v}");
            } else {
                println!("{status}");
            }
            Ok(ExitCode::SUCCESS)
        }
        HostCommand::Wake(args) => wake(args),
    }
}

fn report(
    args: &BmcArgs,
    driver: &IpmiDriver,
    outcome: &str,
    human: &str,
) -> anyhow::Result<ExitCode> {
    if args.json {
        let v = serde_json::json!({
            "host": driver.host(),
            "bmc": driver.config().bmc.to_string(),
            "outcome": outcome,
        });
        println!("{v}");
    } else {
        println!("host {}: {human}", driver.host());
    }
    Ok(ExitCode::SUCCESS)
}

fn ipmi_driver(args: &BmcArgs) -> anyhow::Result<IpmiDriver> {
    let bmc: BmcAddr = args.bmc.parse()?;
    let password = read_password(&args.password_file)?;
    let host = args.host.clone().unwrap_or_else(|| bmc.to_string());
    let mut config = IpmiConfig::new(host, bmc, args.user.clone(), password);
    config.interface = match args.interface.as_str() {
        "lan" => IpmiInterface::Lan,
        _ => IpmiInterface::Lanplus {
            cipher_suite: args.cipher_suite,
        },
    };
    config.command_timeout = Duration::from_secs(args.timeout);
    config.retries = args.retries;
    config.netns = args.netns.clone();
    Ok(IpmiDriver::new(config))
}

/// The first line of the password file, without its line end.
pub(crate) fn read_password(path: &Path) -> anyhow::Result<Password> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the BMC password file {}", path.display()))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        bail!(
            "the BMC password file {} is empty: put the password on its first line",
            path.display()
        );
    }
    Ok(Password::new(line))
}

fn wake(args: WakeArgs) -> anyhow::Result<ExitCode> {
    let mac: MacAddr = args.mac.parse()?;
    let mut config = WolConfig::new(args.host.clone().unwrap_or_else(|| mac.to_string()), mac);
    config.target = SocketAddrV4::new(args.broadcast, args.port);
    config.netns = args.netns.clone();
    config.interface = args.interface.clone();
    let driver = WolDriver::new(config);
    driver.power_on()?;
    if args.json {
        let v = serde_json::json!({
            "host": driver.host(),
            "mac": mac.to_string(),
            "target": driver.config().target.to_string(),
            "sent": true,
        });
        println!("{v}");
    } else {
        println!(
            "sent a magic packet for {mac} to {}{}",
            driver.config().target,
            args.netns
                .map(|ns| format!(" from namespace {ns}"))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

//! The `tern.*` keys of the kernel command line (docs/guest-interface.md); unknown keys are ignored.

/// The workload the command line asks for.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Heartbeat period in ms (0 = none).
    pub hb_ms: u64,
    /// Size of the buffer the memory writer dirties, in MiB (0 = no writer).
    pub dirty_mib: u64,
    /// Pages per second the writer dirties (0 = as fast as it can).
    pub dirty_rate: u64,
    /// Switch the writer to its maximum rate after this many ms of workload.
    pub max_after_ms: Option<u64>,
    /// Run the virtio-blk check.
    pub blk_verify: bool,
    /// Power off after this many ms of workload.
    pub poweroff_ms: Option<u64>,
    /// A deliberate fault right after the `up` line, to test how a guest crash is reported.
    pub selftest_fault: bool,
    /// A deliberate corruption of the writer's first page after its first pass, to test the
    /// writer's memory check.
    pub selftest_corrupt: bool,
    /// The network's static address and prefix length (`tern.ip=10.77.0.2/24`); none = no network.
    pub ip: Option<([u8; 4], u8)>,
    /// The TCP and UDP echo port.
    pub echo_port: u16,
    /// How often (µs) the network is polled while the loop would otherwise sleep.
    pub net_tick_us: u64,
}

impl Config {
    pub const DEFAULT: Config = Config {
        hb_ms: 1000,
        dirty_mib: 0,
        dirty_rate: 0,
        max_after_ms: None,
        blk_verify: false,
        poweroff_ms: None,
        selftest_fault: false,
        selftest_corrupt: false,
        ip: None,
        echo_port: 7,
        net_tick_us: 1000,
    };
}

/// A key whose value could not be used; the guest reports it and stops.
#[derive(Clone, Copy, Debug)]
pub struct BadValue<'a> {
    pub key: &'a str,
    pub value: &'a str,
}

/// Parses `A.B.C.D/N` (N defaults to 24).
fn parse_cidr(s: &str) -> Option<([u8; 4], u8)> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, p.parse::<u8>().ok().filter(|p| (1..=32).contains(p))?),
        None => (s, 24),
    };
    let mut ip = [0u8; 4];
    let mut n = 0;
    for part in addr.split('.') {
        if n == 4 {
            return None;
        }
        ip[n] = part.parse().ok()?;
        n += 1;
    }
    (n == 4).then_some((ip, prefix))
}

/// Parses the command line into a `Config`.
pub fn parse(cmdline: &str) -> Result<Config, BadValue<'_>> {
    let mut c = Config::DEFAULT;
    for word in cmdline.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let bad = BadValue { key, value };
        let num = || value.parse::<u64>().map_err(|_| bad);
        match key {
            "tern.hb_ms" => c.hb_ms = num()?,
            "tern.dirty_mib" => c.dirty_mib = num()?,
            "tern.dirty_rate" => c.dirty_rate = num()?,
            "tern.poweroff_ms" => c.poweroff_ms = Some(num()?),
            "tern.max_after_ms" => c.max_after_ms = Some(num()?),
            "tern.ip" => c.ip = Some(parse_cidr(value).ok_or(bad)?),
            "tern.echo_port" => {
                c.echo_port = value.parse::<u16>().ok().filter(|p| *p != 0).ok_or(bad)?
            }
            "tern.net_tick_us" => c.net_tick_us = num()?.clamp(50, 1_000_000),
            "tern.blk" => match value {
                "verify" => c.blk_verify = true,
                "off" => c.blk_verify = false,
                _ => return Err(bad),
            },
            "tern.selftest" => match value {
                "pagefault" => c.selftest_fault = true,
                "corruptpage" => c.selftest_corrupt = true,
                _ => return Err(bad),
            },
            _ => {}
        }
    }
    Ok(c)
}

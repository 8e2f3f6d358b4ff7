//! The `tern.*` keys of the kernel command line (docs/guest-interface.md); unknown keys are ignored.
//! Also the CPU-utilisation trace syntax and the commands the guest reads on its serial input,
//! which share it. Pure: no port, clock or global state here (the host runs its tests).

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
    /// The writer fills its buffer with data before the workload starts (`tern.dirty_fill=data`),
    /// instead of zeroes a VMM can skip.
    pub dirty_fill: bool,
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
    /// The CPU load every vCPU runs (`tern.cpu_pct`, `tern.cpu_trace`; the later key wins).
    pub load: Load,
    /// The trace of `tern.cpu_trace` (used when `load` is `Load::Trace`).
    pub trace: Trace,
    /// How long each trace value lasts, ms (`tern.trace_step_ms`, at least 1).
    pub trace_step_ms: u64,
    /// What happens after the trace's last value (`tern.trace_end`).
    pub trace_end: TraceEnd,
    /// The load's duty-cycle slice, ms: busy `pct` % of each slice, halted for the rest.
    pub load_slice_ms: u64,
    /// How often (ms) the boot CPU polls the serial input for commands (0 = never).
    pub input_poll_ms: u64,
}

/// The CPU load the command line asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// No load workload (and no `load_pct` in the heartbeat).
    Off,
    /// A constant percentage of every slice.
    Const(u8),
    /// Follow [`Config::trace`].
    Trace,
}

/// The most values a trace holds (after `v*n` repetitions are expanded).
pub const TRACE_MAX: usize = 1024;

/// A CPU-utilisation trace: percentages 0–100, one per step.
#[derive(Clone, Copy, Debug)]
pub struct Trace {
    values: [u8; TRACE_MAX],
    len: usize,
}

impl Trace {
    pub const EMPTY: Trace = Trace {
        values: [0; TRACE_MAX],
        len: 0,
    };

    /// Parses `v,v,…` where each item is a percentage `v` (0–100) or `v*n`, the value repeated
    /// `n` times (n ≥ 1); at least one and at most [`TRACE_MAX`] values in all.
    pub fn parse(s: &str) -> Option<Trace> {
        let mut t = Trace::EMPTY;
        for item in s.split(',') {
            let (v, n) = match item.split_once('*') {
                Some((v, n)) => (v, n.parse::<usize>().ok().filter(|n| *n >= 1)?),
                None => (item, 1),
            };
            let v = parse_pct(v)?;
            if n > TRACE_MAX - t.len {
                return None;
            }
            t.values[t.len..t.len + n].fill(v);
            t.len += n;
        }
        (t.len > 0).then_some(t)
    }

    /// The values.
    pub fn values(&self) -> &[u8] {
        &self.values[..self.len]
    }
}

impl PartialEq for Trace {
    fn eq(&self, other: &Trace) -> bool {
        self.values() == other.values()
    }
}

impl Eq for Trace {}

/// What a trace does after its last value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceEnd {
    /// Start again from the first value.
    Loop,
    /// Keep the last value.
    Hold,
    /// Stop the load (the vCPUs idle).
    Idle,
}

impl TraceEnd {
    pub fn parse(s: &str) -> Option<TraceEnd> {
        match s {
            "loop" => Some(TraceEnd::Loop),
            "hold" => Some(TraceEnd::Hold),
            "idle" => Some(TraceEnd::Idle),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TraceEnd::Loop => "loop",
            TraceEnd::Hold => "hold",
            TraceEnd::Idle => "idle",
        }
    }
}

/// The step of a trace of `len` values, each `step` long, at `elapsed` since it started (any unit,
/// the same for both); `None` once an `Idle`-ended trace is over.
pub fn trace_index(len: usize, step: u64, elapsed: u64, end: TraceEnd) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let i = elapsed / step.max(1);
    let last = len as u64 - 1;
    match end {
        TraceEnd::Loop => Some((i % len as u64) as usize),
        TraceEnd::Hold => Some(i.min(last) as usize),
        TraceEnd::Idle => (i <= last).then_some(i as usize),
    }
}

/// A percentage, 0–100.
fn parse_pct(s: &str) -> Option<u8> {
    s.parse::<u8>().ok().filter(|v| *v <= 100)
}

/// A command read from the serial input (one line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "the guest has no allocator to box the trace; one command lives at a time"
)]
pub enum Command {
    /// `load <pct>`: a constant load.
    Load(u8),
    /// `load off` or `trace off`: no load.
    Off,
    /// `trace <v,v,…> [step_ms=<ms>] [end=loop|hold|idle]`: follow a new trace from now; the step
    /// and end default to the command line's.
    Trace {
        trace: Trace,
        step_ms: Option<u64>,
        end: Option<TraceEnd>,
    },
    /// `status`: report the load.
    Status,
}

/// Why a command line was refused (printed as `LOAD error …`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandError<'a> {
    /// Not one of the commands.
    Unknown(&'a str),
    /// A value that cannot be used, with what was expected.
    BadValue {
        value: &'a str,
        expected: &'static str,
    },
}

impl core::fmt::Display for CommandError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CommandError::Unknown(w) => write!(
                f,
                "unknown command {w:?} (use load <0-100>, load off, trace <v,v,...> [step_ms=N] [end=loop|hold|idle], trace off, status)"
            ),
            CommandError::BadValue { value, expected } => {
                write!(f, "bad value {value:?}: expected {expected}")
            }
        }
    }
}

/// Parses one line of serial input; an empty line is `Ok(None)`.
pub fn parse_command(line: &str) -> Result<Option<Command>, CommandError<'_>> {
    let mut words = line.split_ascii_whitespace();
    let Some(cmd) = words.next() else {
        return Ok(None);
    };
    let arg = words.next();
    let cmd = match (cmd, arg) {
        ("status", None) => Command::Status,
        ("status", Some(w)) => {
            return Err(CommandError::BadValue {
                value: w,
                expected: "nothing more on the line",
            });
        }
        ("load" | "trace", Some("off")) => Command::Off,
        ("load", Some(v)) => Command::Load(parse_pct(v).ok_or(CommandError::BadValue {
            value: v,
            expected: "a percentage 0-100 or off",
        })?),
        ("trace", Some(v)) => {
            let trace = Trace::parse(v).ok_or(CommandError::BadValue {
                value: v,
                expected: "1 to 1024 percentages 0-100, comma-separated, v*n repeats v n times",
            })?;
            let (mut step_ms, mut end) = (None, None);
            for w in words.by_ref() {
                if let Some(ms) = w.strip_prefix("step_ms=") {
                    step_ms = Some(ms.parse::<u64>().ok().filter(|ms| *ms >= 1).ok_or(
                        CommandError::BadValue {
                            value: w,
                            expected: "step_ms=<ms, at least 1>",
                        },
                    )?);
                } else if let Some(e) = w.strip_prefix("end=") {
                    end = Some(TraceEnd::parse(e).ok_or(CommandError::BadValue {
                        value: w,
                        expected: "end=loop, end=hold or end=idle",
                    })?);
                } else {
                    return Err(CommandError::BadValue {
                        value: w,
                        expected: "step_ms=<ms> or end=loop|hold|idle",
                    });
                }
            }
            return Ok(Some(Command::Trace {
                trace,
                step_ms,
                end,
            }));
        }
        _ => return Err(CommandError::Unknown(line.trim())),
    };
    match words.next() {
        None => Ok(Some(cmd)),
        Some(w) => Err(CommandError::BadValue {
            value: w,
            expected: "nothing more on the line",
        }),
    }
}

impl Config {
    pub const DEFAULT: Config = Config {
        hb_ms: 1000,
        dirty_mib: 0,
        dirty_rate: 0,
        max_after_ms: None,
        dirty_fill: false,
        blk_verify: false,
        poweroff_ms: None,
        selftest_fault: false,
        selftest_corrupt: false,
        ip: None,
        echo_port: 7,
        net_tick_us: 1000,
        load: Load::Off,
        trace: Trace::EMPTY,
        trace_step_ms: 2000,
        trace_end: TraceEnd::Loop,
        load_slice_ms: 10,
        input_poll_ms: 100,
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
            "tern.dirty_fill" => match value {
                "data" => c.dirty_fill = true,
                "zero" => c.dirty_fill = false,
                _ => return Err(bad),
            },
            "tern.ip" => c.ip = Some(parse_cidr(value).ok_or(bad)?),
            "tern.echo_port" => {
                c.echo_port = value.parse::<u16>().ok().filter(|p| *p != 0).ok_or(bad)?
            }
            "tern.net_tick_us" => c.net_tick_us = num()?.clamp(50, 1_000_000),
            "tern.cpu_pct" => c.load = Load::Const(parse_pct(value).ok_or(bad)?),
            "tern.cpu_trace" => {
                c.trace = Trace::parse(value).ok_or(bad)?;
                c.load = Load::Trace;
            }
            "tern.trace_step_ms" => {
                c.trace_step_ms = Some(num()?).filter(|v| *v >= 1).ok_or(bad)?
            }
            "tern.trace_end" => c.trace_end = TraceEnd::parse(value).ok_or(bad)?,
            "tern.load_slice_ms" => {
                c.load_slice_ms = Some(num()?).filter(|v| (1..=1000).contains(v)).ok_or(bad)?
            }
            "tern.input_poll_ms" => c.input_poll_ms = num()?,
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

/// Compiled for the host by `tern-guest-image` (`cargo test -p tern-guest-image --lib`).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_takes_values_and_repeats() {
        let t = Trace::parse("20,35,80*3,10").unwrap();
        assert_eq!(t.values(), &[20, 35, 80, 80, 80, 10]);
        assert_eq!(Trace::parse("100*1024").unwrap().values().len(), TRACE_MAX);
        for bad in [
            "",
            "20,,30",
            "101",
            "-1",
            "5*0",
            "5*",
            "x",
            "100*1025",
            "50*1000,1*25",
        ] {
            assert!(Trace::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn load_keys_set_the_load_and_the_later_one_wins() {
        let c = parse("tern.cpu_pct=50").unwrap();
        assert_eq!(c.load, Load::Const(50));
        let c = parse("tern.cpu_trace=1,2,3 tern.trace_step_ms=500 tern.trace_end=hold").unwrap();
        assert_eq!(c.load, Load::Trace);
        assert_eq!((c.trace.values(), c.trace_step_ms), (&[1u8, 2, 3][..], 500));
        assert_eq!(c.trace_end, TraceEnd::Hold);
        assert_eq!(
            parse("tern.cpu_trace=1 tern.cpu_pct=7").unwrap().load,
            Load::Const(7)
        );
        assert_eq!(
            parse("tern.cpu_pct=7 tern.cpu_trace=1").unwrap().load,
            Load::Trace
        );
        let d = parse("").unwrap();
        assert_eq!(
            (d.load, d.trace_step_ms, d.trace_end, d.load_slice_ms),
            (Load::Off, 2000, TraceEnd::Loop, 10)
        );
        assert_eq!(
            (
                d.input_poll_ms,
                parse("tern.input_poll_ms=0").unwrap().input_poll_ms
            ),
            (100, 0)
        );
        assert_eq!(parse("tern.load_slice_ms=20").unwrap().load_slice_ms, 20);
        for (line, key) in [
            ("tern.cpu_pct=101", "tern.cpu_pct"),
            ("tern.cpu_trace=50,x", "tern.cpu_trace"),
            ("tern.trace_step_ms=0", "tern.trace_step_ms"),
            ("tern.trace_end=never", "tern.trace_end"),
            ("tern.load_slice_ms=0", "tern.load_slice_ms"),
            ("tern.load_slice_ms=1001", "tern.load_slice_ms"),
            ("tern.input_poll_ms=soon", "tern.input_poll_ms"),
        ] {
            assert_eq!(parse(line).unwrap_err().key, key, "{line}");
        }
    }

    #[test]
    fn a_planetlab_day_fits_the_vmms_command_line() {
        // 288 five-minute samples of up to three digits each, plus the other keys a test sets.
        let values: Vec<String> = (0..288).map(|i| ((i * 37) % 101).to_string()).collect();
        let line = format!(
            "tern.hb_ms=1000 tern.trace_step_ms=2000 tern.cpu_trace={}",
            values.join(",")
        );
        assert!(line.len() <= 2048 - 200, "{} bytes", line.len());
        let c = parse(&line).unwrap();
        assert_eq!(c.trace.values().len(), 288);
        assert_eq!(c.trace.values()[287], ((287 * 37) % 101) as u8);
    }

    #[test]
    fn trace_index_loops_holds_or_ends() {
        assert_eq!(trace_index(3, 10, 0, TraceEnd::Loop), Some(0));
        assert_eq!(trace_index(3, 10, 29, TraceEnd::Loop), Some(2));
        assert_eq!(trace_index(3, 10, 30, TraceEnd::Loop), Some(0));
        assert_eq!(trace_index(3, 10, 95, TraceEnd::Hold), Some(2));
        assert_eq!(trace_index(3, 10, 29, TraceEnd::Idle), Some(2));
        assert_eq!(trace_index(3, 10, 30, TraceEnd::Idle), None);
        assert_eq!(trace_index(0, 10, 0, TraceEnd::Loop), None);
        assert_eq!(
            trace_index(2, 0, 5, TraceEnd::Loop),
            Some(1),
            "a zero step counts as 1"
        );
        for e in [TraceEnd::Loop, TraceEnd::Hold, TraceEnd::Idle] {
            assert_eq!(TraceEnd::parse(e.name()), Some(e));
        }
    }

    #[test]
    fn serial_commands_parse() {
        assert!(matches!(
            parse_command("load 70"),
            Ok(Some(Command::Load(70)))
        ));
        assert!(matches!(
            parse_command(" load off "),
            Ok(Some(Command::Off))
        ));
        assert!(matches!(parse_command("trace off"), Ok(Some(Command::Off))));
        assert!(matches!(parse_command("status"), Ok(Some(Command::Status))));
        assert!(matches!(parse_command("   "), Ok(None)));
        match parse_command("trace 10,90*2 step_ms=300 end=idle") {
            Ok(Some(Command::Trace {
                trace,
                step_ms,
                end,
            })) => {
                assert_eq!(trace.values(), &[10, 90, 90]);
                assert_eq!((step_ms, end), (Some(300), Some(TraceEnd::Idle)));
            }
            other => panic!("{other:?}"),
        }
        match parse_command("trace 5") {
            Ok(Some(Command::Trace { step_ms, end, .. })) => {
                assert_eq!((step_ms, end), (None, None))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_serial_commands_say_what_is_wrong() {
        assert_eq!(parse_command("jump"), Err(CommandError::Unknown("jump")));
        assert_eq!(parse_command("load"), Err(CommandError::Unknown("load")));
        for (line, value) in [
            ("load 101", "101"),
            ("load 50 now", "now"),
            ("trace 1,x", "1,x"),
            ("trace 1 step_ms=0", "step_ms=0"),
            ("trace 1 end=never", "end=never"),
            ("trace 1 fast", "fast"),
            ("status now", "now"),
        ] {
            match parse_command(line) {
                Err(CommandError::BadValue { value: v, .. }) => assert_eq!(v, value, "{line}"),
                other => panic!("{line}: {other:?}"),
            }
        }
        let mut s = std::string::String::new();
        use core::fmt::Write;
        write!(s, "{}", CommandError::Unknown("jump")).unwrap();
        assert!(s.contains("load <0-100>"), "{s}");
    }
}

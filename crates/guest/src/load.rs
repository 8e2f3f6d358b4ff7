//! The CPU-load workload and the serial input that steers it.
//!
//! Every vCPU runs the same duty cycle: time is cut into slices (`tern.load_slice_ms`, 10 ms by
//! default, aligned to the `up` line so all vCPUs share them); in each slice a vCPU spins for the
//! target percentage at CPL3 (native speed on KVM-PVM, so the host's vCPU thread really burns that
//! CPU) and halts for the rest. The target is a constant (`tern.cpu_pct`, `load <pct>`) or the
//! current step of a trace (`tern.cpu_trace`, `trace <v,…>`); 0 % halts through whole slices.
//!
//! The boot CPU polls COM1's receive side (LSR bit 0, then RBR) every `tern.input_poll_ms`, collects
//! a line and carries out its command (`cmdline::parse_command`), answering with a `LOAD …` line.
//! The load settings are global atomics that only the boot CPU writes; the other vCPUs read them at
//! every slice, so a change reaches every vCPU within one slice (a reader racing a change may see a
//! mix of old and new settings for one slice, which is harmless: every value is a valid percentage).

use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::cmdline::{self, Command, Config, Load, TRACE_MAX, Trace, TraceEnd};
use crate::println;
use crate::sys::{inb, rdtsc};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_DATA_READY: u8 = 0x01;
/// A busy vCPU spins at most this long (µs) before it goes round its loop again (heartbeats,
/// the writer), so the loop's `maxgap_us` stays small under load.
const SPIN_CHUNK_US: u64 = 500;
/// The longest input line kept (a 288-value trace command is about 1.2 KiB); longer lines are
/// refused whole.
const INPUT_LINE_MAX: usize = 2048;
/// Bytes read from the UART per poll at most (its FIFO holds 64; each read is an exit to the VMM).
const INPUT_BYTES_PER_POLL: usize = 256;

const MODE_OFF: u32 = 0;
const MODE_CONST: u32 = 1;
const MODE_TRACE: u32 = 2;

static MODE: AtomicU32 = AtomicU32::new(MODE_OFF);
static CONST_PCT: AtomicU32 = AtomicU32::new(0);
static TRACE: [AtomicU8; TRACE_MAX] = [const { AtomicU8::new(0) }; TRACE_MAX];
static TRACE_LEN: AtomicUsize = AtomicUsize::new(0);
static TRACE_STEP_TICKS: AtomicU64 = AtomicU64::new(1);
static TRACE_STEP_MS: AtomicU64 = AtomicU64::new(2000);
static TRACE_START: AtomicU64 = AtomicU64::new(0);
static TRACE_END: AtomicU32 = AtomicU32::new(0);
static SLICE_TICKS: AtomicU64 = AtomicU64::new(1);
static EPOCH: AtomicU64 = AtomicU64::new(0);
static TSC_KHZ: AtomicU64 = AtomicU64::new(1);

fn end_code(e: TraceEnd) -> u32 {
    match e {
        TraceEnd::Loop => 0,
        TraceEnd::Hold => 1,
        TraceEnd::Idle => 2,
    }
}

fn end_of(code: u32) -> TraceEnd {
    match code {
        1 => TraceEnd::Hold,
        2 => TraceEnd::Idle,
        _ => TraceEnd::Loop,
    }
}

/// Takes the command line's load settings; `start` (TSC) is the `up` line, where slices and a
/// command-line trace begin.
pub fn configure(config: &Config, start: u64, tsc_khz: u64) {
    TSC_KHZ.store(tsc_khz, Ordering::Relaxed);
    SLICE_TICKS.store(config.load_slice_ms * tsc_khz, Ordering::Relaxed);
    EPOCH.store(start, Ordering::Relaxed);
    TRACE_STEP_MS.store(config.trace_step_ms, Ordering::Relaxed);
    TRACE_END.store(end_code(config.trace_end), Ordering::Relaxed);
    match config.load {
        Load::Off => {}
        Load::Const(pct) => set_const(pct),
        Load::Trace => set_trace(&config.trace, config.trace_step_ms, config.trace_end, start),
    }
}

fn set_const(pct: u8) {
    MODE.store(MODE_OFF, Ordering::Release);
    CONST_PCT.store(u32::from(pct), Ordering::Relaxed);
    MODE.store(MODE_CONST, Ordering::Release);
}

fn set_trace(trace: &Trace, step_ms: u64, end: TraceEnd, start: u64) {
    MODE.store(MODE_OFF, Ordering::Release);
    for (slot, v) in TRACE.iter().zip(trace.values()) {
        slot.store(*v, Ordering::Relaxed);
    }
    TRACE_LEN.store(trace.values().len(), Ordering::Relaxed);
    TRACE_STEP_MS.store(step_ms, Ordering::Relaxed);
    TRACE_STEP_TICKS.store(
        step_ms.saturating_mul(TSC_KHZ.load(Ordering::Relaxed)),
        Ordering::Relaxed,
    );
    TRACE_END.store(end_code(end), Ordering::Relaxed);
    TRACE_START.store(start, Ordering::Relaxed);
    MODE.store(MODE_TRACE, Ordering::Release);
}

/// The load at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Percent of each slice to spin.
    pub pct: u8,
    /// The trace step (`None` for a constant load).
    pub step: Option<usize>,
    /// TSC time of the next trace step (`u64::MAX` for a constant load).
    pub next_change: u64,
}

/// The load due at `now`; `None` when there is no load workload (or a trace ended with `idle`).
pub fn target(now: u64) -> Option<Target> {
    match MODE.load(Ordering::Acquire) {
        MODE_CONST => Some(Target {
            pct: CONST_PCT.load(Ordering::Relaxed).min(100) as u8,
            step: None,
            next_change: u64::MAX,
        }),
        MODE_TRACE => {
            let len = TRACE_LEN.load(Ordering::Relaxed).min(TRACE_MAX);
            let step = TRACE_STEP_TICKS.load(Ordering::Relaxed).max(1);
            let start = TRACE_START.load(Ordering::Relaxed);
            let elapsed = now.saturating_sub(start);
            let end = end_of(TRACE_END.load(Ordering::Relaxed));
            let i = cmdline::trace_index(len, step, elapsed, end)?;
            Some(Target {
                pct: TRACE[i].load(Ordering::Relaxed).min(100),
                step: Some(i),
                next_change: start.saturating_add((elapsed / step + 1).saturating_mul(step)),
            })
        }
        _ => None,
    }
}

/// What the duty cycle wants of this loop iteration.
pub enum Duty {
    /// Keep spinning: go round the loop again without halting.
    Busy,
    /// Idle: halt no later than this TSC time (the next slice with work, or the next trace step).
    IdleUntil(u64),
    /// No load workload.
    None,
}

/// One turn of the duty cycle at `now`: while in the busy part of the current slice, spins for up
/// to `SPIN_CHUNK_US` and answers `Busy`; otherwise says when the loop must wake next.
pub fn duty(now: u64) -> Duty {
    let Some(t) = target(now) else {
        // An idle-ended trace that is over, or no load: nothing is due.
        return Duty::None;
    };
    let slice = SLICE_TICKS.load(Ordering::Relaxed).max(1);
    let epoch = EPOCH.load(Ordering::Relaxed);
    let slice_start = now - now.saturating_sub(epoch) % slice;
    let busy_end = slice_start + slice * u64::from(t.pct) / 100;
    if now < busy_end {
        let khz = TSC_KHZ.load(Ordering::Relaxed);
        let until = busy_end.min(now + SPIN_CHUNK_US * khz / 1000);
        while rdtsc() < until {
            core::hint::spin_loop();
        }
        return Duty::Busy;
    }
    let wake = if t.pct > 0 {
        slice_start + slice
    } else {
        u64::MAX
    };
    Duty::IdleUntil(wake.min(t.next_change))
}

/// Writes the load settings as the rest of a `LOAD` line.
fn describe(out: &mut crate::console::Line, now: u64) {
    use core::fmt::Write;
    match MODE.load(Ordering::Acquire) {
        MODE_CONST => {
            let _ = write!(out, "const pct={}", CONST_PCT.load(Ordering::Relaxed));
        }
        MODE_TRACE => {
            let _ = write!(
                out,
                "trace values={} step_ms={} end={}",
                TRACE_LEN.load(Ordering::Relaxed),
                TRACE_STEP_MS.load(Ordering::Relaxed),
                end_of(TRACE_END.load(Ordering::Relaxed)).name()
            );
            match target(now) {
                Some(t) => {
                    let _ = write!(out, " step={} pct={}", t.step.unwrap_or(0), t.pct);
                }
                None => {
                    let _ = write!(out, " done");
                }
            }
        }
        _ => {
            let _ = write!(out, "off");
        }
    }
}

/// Prints `LOAD <settings>`.
pub fn report(now: u64) {
    let mut line = crate::console::Line::new();
    use core::fmt::Write;
    let _ = write!(line, "LOAD ");
    describe(&mut line, now);
    line.emit();
}

/// The boot CPU's reader of serial input lines.
pub struct Input {
    line: [u8; INPUT_LINE_MAX],
    len: usize,
    /// The current line outgrew `INPUT_LINE_MAX`: it is dropped at its end.
    overflow: bool,
    /// The last trace step reported (to print `LOAD step …` once per step).
    reported: Option<Option<usize>>,
}

impl Input {
    pub const fn new() -> Input {
        Input {
            line: [0; INPUT_LINE_MAX],
            len: 0,
            overflow: false,
            reported: None,
        }
    }

    /// Reads what the UART has received and carries out each complete line.
    pub fn poll(&mut self) {
        for _ in 0..INPUT_BYTES_PER_POLL {
            if inb(LSR) & LSR_DATA_READY == 0 {
                return;
            }
            let b = inb(COM1);
            match b {
                b'\n' | b'\r' => {
                    let (len, overflow) = (self.len, self.overflow);
                    self.len = 0;
                    self.overflow = false;
                    if overflow {
                        println!("LOAD error input line longer than {INPUT_LINE_MAX} bytes");
                    } else if len > 0 {
                        let mut copy = [0u8; INPUT_LINE_MAX];
                        copy[..len].copy_from_slice(&self.line[..len]);
                        execute(&copy[..len]);
                    }
                }
                _ if self.len < INPUT_LINE_MAX => {
                    self.line[self.len] = b;
                    self.len += 1;
                }
                _ => self.overflow = true,
            }
        }
    }

    /// Prints `LOAD step=<i> pct=<v>` when a trace moves to another step (boot CPU only), and
    /// `LOAD trace done` when an idle-ended trace is over.
    pub fn report_step(&mut self, now: u64) {
        if MODE.load(Ordering::Acquire) != MODE_TRACE {
            self.reported = None;
            return;
        }
        let t = target(now);
        let step = t.and_then(|t| t.step);
        if self.reported == Some(step) {
            return;
        }
        self.reported = Some(step);
        match t {
            Some(t) => println!("LOAD step={} pct={}", t.step.unwrap_or(0), t.pct),
            None => println!("LOAD trace done"),
        }
    }
}

/// Carries out one input line and answers on the console.
fn execute(line: &[u8]) {
    let Ok(text) = core::str::from_utf8(line) else {
        println!("LOAD error input is not UTF-8");
        return;
    };
    let now = rdtsc();
    match cmdline::parse_command(text) {
        Ok(None) => {}
        Ok(Some(Command::Load(pct))) => {
            set_const(pct);
            report(now);
        }
        Ok(Some(Command::Off)) => {
            MODE.store(MODE_OFF, Ordering::Release);
            report(now);
        }
        Ok(Some(Command::Trace {
            trace,
            step_ms,
            end,
        })) => {
            let step_ms = step_ms.unwrap_or(TRACE_STEP_MS.load(Ordering::Relaxed));
            let end = end.unwrap_or(end_of(TRACE_END.load(Ordering::Relaxed)));
            set_trace(&trace, step_ms, end, now);
            report(now);
        }
        Ok(Some(Command::Status)) => report(now),
        Err(e) => println!("LOAD error {e}"),
    }
}

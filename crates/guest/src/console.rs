//! The serial console: whole lines to the COM1 16550, written from CPL3 through the TSS I/O bitmap,
//! one CPU at a time.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::sys::{inb, outb};

const COM1: u16 = 0x3f8;
const LSR_THR_EMPTY: u8 = 0x20;
const FIFO_BYTES: usize = 16;
const LINE_MAX: usize = 256;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Sets the UART to 8N1 with FIFOs on and interrupts off (the console is output-only).
pub fn init() {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0x07);
    outb(COM1 + 4, 0x03);
}

/// Releases the console lock whatever its state (used on the way to a panic report).
pub fn force_unlock() {
    LOCK.store(false, Ordering::Release);
}

/// A line being formatted on the stack; longer lines are cut at `LINE_MAX` bytes.
pub struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Line {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    /// Sends the line and a `\n` to the UART. Waits for an empty transmitter once per FIFO's worth.
    pub fn emit(&mut self) {
        if self.len == LINE_MAX {
            self.buf[LINE_MAX - 1] = b'\n';
        } else {
            self.buf[self.len] = b'\n';
            self.len += 1;
        }
        while LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        for (i, &b) in self.buf[..self.len].iter().enumerate() {
            if i % FIFO_BYTES == 0 {
                let mut spins = 0u32;
                while inb(COM1 + 5) & LSR_THR_EMPTY == 0 && spins < 100_000 {
                    spins += 1;
                    core::hint::spin_loop();
                }
            }
            outb(COM1, b);
        }
        LOCK.store(false, Ordering::Release);
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = LINE_MAX - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Prints one console line (format arguments as `format!`).
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let mut line = $crate::console::Line::new();
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!($($arg)*));
        line.emit();
    }};
}

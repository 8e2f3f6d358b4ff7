//! Power off, reset and stop: port 0x501 (Tern's exit port, QEMU's isa-debug-exit), then the i8042
//! reset as a fallback, then halting for good.

use crate::sys::{outb, stop_cpu};

const EXIT_PORT: u16 = 0x501;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Ends the VM with `code` (0 = clean power-off). Only returns if no VMM device took the request.
pub fn stop(code: u8) -> ! {
    outb(EXIT_PORT, code);
    outb(I8042_COMMAND, I8042_RESET);
    stop_cpu()
}

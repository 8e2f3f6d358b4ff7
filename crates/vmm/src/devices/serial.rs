//! The 16550 UART on COM1 (vm-superio's model), its interrupt line, its output sink and its
//! receive FIFO, which the control API's `console_input` fills (the guest sees LSR bit 0, data
//! ready, and the received-data interrupt if it enabled it). Its saved state: [`persist`].

pub mod persist;

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1's first I/O port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's IRQ (ISA IRQ 4).
pub const COM1_GSI: u32 = 4;
/// A partial output line is written out once it grows to this many bytes.
const LINE_MAX: usize = 4096;

/// Why input for the guest could not be queued; nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleInputError {
    /// No bytes.
    #[error("console input is empty (give 1 to {max} bytes)")]
    Empty {
        /// The most accepted at once.
        max: usize,
    },
    /// More bytes than the FIFO holds at all.
    #[error(
        "console input of {len} bytes is longer than the UART's {max}-byte receive FIFO (send it in pieces)"
    )]
    TooLong {
        /// Bytes given.
        len: usize,
        /// The FIFO's size.
        max: usize,
    },
    /// The guest has not read enough of what was sent before.
    #[error(
        "the UART's receive FIFO is full: room for {free} of the {len} bytes (the guest has not read its earlier input yet; retry later)"
    )]
    FifoFull {
        /// Bytes given.
        len: usize,
        /// Room left in the FIFO.
        free: usize,
    },
}

/// Raises the UART's interrupt through an eventfd registered with KVM as an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Collects the guest's output and writes it whole lines at a time (one `write` per line, so
/// readers of a pipe or file see complete lines; a partial line is written when it grows long).
pub struct LineSink {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for LineSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineSink")
            .field("pending", &self.buf.len())
            .finish()
    }
}

impl LineSink {
    /// A sink over `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        LineSink {
            out,
            buf: Vec::with_capacity(256),
        }
    }
}

impl Write for LineSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if data.contains(&b'\n') || self.buf.len() >= LINE_MAX {
            self.drain();
        }
        Ok(data.len())
    }

    /// The UART model flushes after every byte; lines are written whole instead (see
    /// [`LineSink::drain`]).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LineSink {
    /// Writes out what is buffered, a partial line included.
    pub fn drain(&mut self) {
        if !self.buf.is_empty() {
            // Output errors (a closed pipe) must not stop the guest: the bytes are dropped.
            let _ = self.out.write_all(&self.buf);
            let _ = self.out.flush();
            self.buf.clear();
        }
    }
}

/// COM1: a 16550 at 0x3f8..0x3ff.
#[derive(Debug)]
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, LineSink>,
}

impl SerialDevice {
    /// A UART that interrupts through `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), LineSink::new(out)),
        }
    }

    /// A guest read of register `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// A guest write of `value` to register `offset` (0..8).
    pub fn write(&mut self, offset: u8, value: u8) {
        // An interrupt that cannot be raised is not fatal to the output path.
        let _ = self.uart.write(offset, value);
    }

    /// Queues `data` in the receive FIFO, all of it or (with an error) none of it.
    pub fn enqueue_input(&mut self, data: &[u8]) -> Result<(), ConsoleInputError> {
        let max = persist::FIFO_BYTES;
        if data.is_empty() {
            return Err(ConsoleInputError::Empty { max });
        }
        if data.len() > max {
            return Err(ConsoleInputError::TooLong {
                len: data.len(),
                max,
            });
        }
        let free = self.uart.fifo_capacity();
        if free < data.len() {
            return Err(ConsoleInputError::FifoFull {
                len: data.len(),
                free,
            });
        }
        // Room was checked, so every byte goes in; an interrupt that cannot be raised leaves the
        // bytes queued for a polling guest.
        let _ = self.uart.enqueue_raw_bytes(data);
        Ok(())
    }

    /// The partial output line not yet written (carried by a snapshot or migration, so that the
    /// line comes out whole where the VM continues).
    pub fn pending_output(&mut self) -> Vec<u8> {
        self.uart.writer_mut().buf.clone()
    }

    /// Replaces the partial output line (see [`SerialDevice::pending_output`]).
    pub fn set_pending_output(&mut self, bytes: &[u8]) {
        let sink = self.uart.writer_mut();
        sink.buf.clear();
        sink.buf.extend_from_slice(bytes);
    }

    /// Writes out a pending partial line.
    pub fn flush(&mut self) {
        self.uart.writer_mut().drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Persist;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (SerialDevice, Shared, EventFd) {
        let out = Shared::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(evt.try_clone().unwrap(), Box::new(out.clone()));
        (dev, out, evt)
    }

    #[test]
    fn bytes_written_to_thr_come_out_as_whole_lines() {
        let (mut dev, out, _) = device();
        for b in b"HB seq=1" {
            dev.write(0, *b);
        }
        assert!(out.0.lock().unwrap().is_empty(), "no partial line yet");
        dev.write(0, b'\n');
        assert_eq!(out.0.lock().unwrap().as_slice(), b"HB seq=1\n");
    }

    #[test]
    fn line_status_reports_an_empty_transmitter() {
        let (mut dev, _, _) = device();
        // LSR (offset 5): THR empty (bit 5) and transmitter idle (bit 6).
        assert_eq!(dev.read(5) & 0x60, 0x60);
    }

    #[test]
    fn enabling_the_thr_interrupt_raises_the_irq_line() {
        let (mut dev, _, evt) = device();
        dev.write(1, 0x02); // IER: THR empty interrupt
        dev.write(0, b'x');
        assert!(evt.read().unwrap() >= 1);
    }

    #[test]
    fn input_is_read_back_through_rbr_with_data_ready_in_lsr() {
        let (mut dev, _, _) = device();
        assert_eq!(dev.read(5) & 0x01, 0, "nothing received yet");
        dev.enqueue_input(b"load 70\n").unwrap();
        let mut got = Vec::new();
        while dev.read(5) & 0x01 != 0 {
            got.push(dev.read(0));
        }
        assert_eq!(got, b"load 70\n");
    }

    #[test]
    fn input_raises_the_receive_interrupt_only_when_enabled() {
        let (mut dev, _, evt) = device();
        dev.enqueue_input(b"a").unwrap();
        assert!(evt.read().is_err(), "no interrupt while IER is 0");
        dev.read(0);
        dev.write(1, 0x01); // IER: received data available
        dev.enqueue_input(b"b").unwrap();
        assert!(evt.read().unwrap() >= 1);
    }

    #[test]
    fn input_that_does_not_fit_is_refused_whole() {
        let (mut dev, _, _) = device();
        let max = persist::FIFO_BYTES;
        assert_eq!(
            dev.enqueue_input(b""),
            Err(ConsoleInputError::Empty { max })
        );
        assert_eq!(
            dev.enqueue_input(&vec![b'x'; max + 1]),
            Err(ConsoleInputError::TooLong { len: max + 1, max })
        );
        dev.enqueue_input(&vec![b'y'; max - 3]).unwrap();
        let err = dev.enqueue_input(b"load").unwrap_err();
        assert_eq!(err, ConsoleInputError::FifoFull { len: 4, free: 3 });
        assert!(err.to_string().contains("retry later"), "{err}");
        assert_eq!(dev.save().in_buffer.len(), max - 3, "nothing of it queued");
        dev.enqueue_input(b"abc").unwrap();
        assert_eq!(dev.save().in_buffer.len(), max);
    }

    #[test]
    fn unread_input_survives_save_and_restore() {
        let (mut dev, _, _) = device();
        dev.enqueue_input(b"trace 1,2\n").unwrap();
        dev.read(0); // the guest read one byte before the snapshot
        let s = dev.save();
        let (mut other, _, _) = device();
        other.restore(&s).unwrap();
        let mut got = Vec::new();
        while other.read(5) & 0x01 != 0 {
            got.push(other.read(0));
        }
        assert_eq!(got, b"race 1,2\n");
    }

    #[test]
    fn state_round_trips_through_restore() {
        let (mut dev, _, _) = device();
        dev.write(7, 0x5a); // scratch register
        dev.write(3, 0x03); // LCR: 8N1
        for b in b"half a li" {
            dev.write(0, *b);
        }
        let s = dev.save();
        assert_eq!(s.pending_output, b"half a li");
        let (mut other, out, _) = device();
        other.restore(&s).unwrap();
        assert_eq!(other.read(7), 0x5a);
        assert_eq!(other.save(), s);
        other.write(0, b'\n');
        assert_eq!(
            out.0.lock().unwrap().as_slice(),
            b"half a li\n",
            "the line comes out whole"
        );
    }

    #[test]
    fn a_state_that_does_not_fit_is_refused_and_changes_nothing() {
        let (mut dev, out, _) = device();
        dev.write(7, 0x11);
        dev.write(0, b'x');
        let before = dev.save();
        let mut bad = before.clone();
        bad.scratch = 0x22;
        bad.in_buffer = vec![b'a'; persist::FIFO_BYTES + 1];
        assert_eq!(
            dev.restore(&bad).unwrap_err(),
            persist::SerialStateError::FullFifo {
                len: persist::FIFO_BYTES + 1,
                max: persist::FIFO_BYTES
            }
        );
        let mut long = before.clone();
        long.scratch = 0x22;
        long.pending_output = vec![b'y'; persist::MAX_PENDING_OUTPUT + 1];
        assert!(matches!(
            dev.restore(&long).unwrap_err(),
            persist::SerialStateError::PendingOutput { .. }
        ));
        assert_eq!(dev.save(), before, "registers and pending line unchanged");
        assert_eq!(dev.read(7), 0x11);
        dev.write(0, b'\n');
        assert_eq!(out.0.lock().unwrap().as_slice(), b"x\n", "the same sink");
    }
}

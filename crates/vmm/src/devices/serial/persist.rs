//! The saved state of COM1: the 16550's registers, its receive FIFO and the partial output line.

use serde::{Deserialize, Serialize};
use vm_superio::Serial;
use vm_superio::serial::{NoEvents, SerialState};

use super::{IrqTrigger, LineSink, SerialDevice};
use crate::persist::Persist;

/// The 16550's receive FIFO size: a state with more received bytes cannot be restored.
pub const FIFO_BYTES: usize = 64;
/// The longest partial output line a state may carry (the sink writes a line out at this length).
pub const MAX_PENDING_OUTPUT: usize = super::LINE_MAX;

/// The 16550's registers (vm-superio's `SerialState`, mirrored so that it can be serialized),
/// and the console's unwritten partial line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Received bytes not yet read by the guest.
    pub in_buffer: Vec<u8>,
    /// Output of a partial line the VMM had not written yet (written where the VM continues).
    pub pending_output: Vec<u8>,
}

/// Why a serial state does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SerialStateError {
    /// More received bytes than the FIFO holds.
    #[error("its receive FIFO holds {len} bytes, more than the 16550's {max}")]
    FullFifo {
        /// Bytes in the state.
        len: usize,
        /// The FIFO's size.
        max: usize,
    },
    /// A partial output line longer than the console ever keeps.
    #[error("its pending output line has {len} bytes, more than {max}")]
    PendingOutput {
        /// Bytes in the state.
        len: usize,
        /// The most kept.
        max: usize,
    },
    /// The interrupt line could not be duplicated for the restored UART.
    #[error("cannot set up the UART's interrupt line: {0}")]
    Irq(String),
}

impl From<&SerialState> for SerialDeviceState {
    fn from(s: &SerialState) -> Self {
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
            pending_output: Vec::new(),
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type Error = SerialStateError;

    fn save(&mut self) -> SerialDeviceState {
        let mut s: SerialDeviceState = (&self.uart.state()).into();
        s.pending_output = self.pending_output();
        s
    }

    fn check(&self, s: &SerialDeviceState) -> Result<(), SerialStateError> {
        if s.in_buffer.len() > FIFO_BYTES {
            return Err(SerialStateError::FullFifo {
                len: s.in_buffer.len(),
                max: FIFO_BYTES,
            });
        }
        if s.pending_output.len() > MAX_PENDING_OUTPUT {
            return Err(SerialStateError::PendingOutput {
                len: s.pending_output.len(),
                max: MAX_PENDING_OUTPUT,
            });
        }
        Ok(())
    }

    fn restore(&mut self, s: &SerialDeviceState) -> Result<(), SerialStateError> {
        self.check(s)?;
        let irq = self
            .uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| SerialStateError::Irq(e.to_string()))?;
        // Built beside the live UART; the output sink moves over only once it exists.
        let mut uart = Serial::from_state(
            &s.into(),
            IrqTrigger(irq),
            NoEvents,
            LineSink::new(Box::new(std::io::sink())),
        )
        .map_err(|e| match e {
            vm_superio::serial::Error::FullFifo => SerialStateError::FullFifo {
                len: s.in_buffer.len(),
                max: FIFO_BYTES,
            },
            other => SerialStateError::Irq(other.to_string()),
        })?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        self.set_pending_output(&s.pending_output);
        Ok(())
    }
}

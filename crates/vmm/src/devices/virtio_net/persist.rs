//! The saved state of a virtio-net device: the transport, both queues, the frames that wait for
//! the guest (those queued in the tap during the pause included) and what the device learnt.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{MAX_FRAME, MAX_PENDING_FRAMES, VirtioNet};
use crate::devices::virtio_mmio::{QueueState, QueueStateError, Registers};
use crate::persist::Persist;

/// The shortest frame carried (an Ethernet header).
const MIN_FRAME: usize = 14;

/// The saved state of a virtio-net device and its transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    /// The MAC address.
    pub mac: [u8; 6],
    /// Device status register.
    pub status: u32,
    /// Features the driver acknowledged.
    pub driver_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// RX and TX queues.
    pub queues: [QueueState; 2],
    /// Frames read from the backend that wait for receive buffers (in flight in the VMM). A
    /// state taken while paused includes what had queued in the tap, so a migration carries the
    /// frames that reached the source during its pause instead of dropping them.
    pub rx_pending: Vec<Vec<u8>>,
    /// The guest's IPv4 address as learnt from its traffic or given (for gratuitous ARP).
    pub guest_ip: Option<Ipv4Addr>,
}

/// Why a virtio-net state does not fit the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VirtioNetStateError {
    /// The driver acknowledged features this device does not offer.
    #[error("its driver acknowledged features {acked:#x}, this device offers {offered:#x}")]
    Features {
        /// Acknowledged in the state.
        acked: u64,
        /// Offered here.
        offered: u64,
    },
    /// A queue cannot be put back as saved.
    #[error("its {which} queue")]
    Queue {
        /// RX or TX.
        which: &'static str,
        /// What is wrong.
        #[source]
        source: QueueStateError,
    },
    /// More waiting frames than the device holds.
    #[error("it holds {count} waiting frames, more than {MAX_PENDING_FRAMES}")]
    TooManyFrames {
        /// Frames in the state.
        count: usize,
    },
    /// A waiting frame of a size the device never carries.
    #[error("waiting frame {index} has {len} bytes (frames carry {MIN_FRAME} to {MAX_FRAME})")]
    FrameSize {
        /// Its position.
        index: usize,
        /// Its size.
        len: usize,
    },
}

impl Persist for VirtioNet {
    type State = VirtioNetState;
    type Error = VirtioNetStateError;

    /// Frames waiting in the backend join the state first.
    fn save(&mut self) -> VirtioNetState {
        self.drain_backend();
        self.state()
    }

    fn check(&self, s: &VirtioNetState) -> Result<(), VirtioNetStateError> {
        let offered = self.device_features();
        if s.driver_features & !offered != 0 {
            return Err(VirtioNetStateError::Features {
                acked: s.driver_features,
                offered,
            });
        }
        for (q, which) in s.queues.iter().zip(["receive", "transmit"]) {
            q.check(self.transport.queue_max())
                .map_err(|source| VirtioNetStateError::Queue { which, source })?;
        }
        if s.rx_pending.len() > MAX_PENDING_FRAMES {
            return Err(VirtioNetStateError::TooManyFrames {
                count: s.rx_pending.len(),
            });
        }
        if let Some((index, f)) = s
            .rx_pending
            .iter()
            .enumerate()
            .find(|(_, f)| !(MIN_FRAME..=MAX_FRAME).contains(&f.len()))
        {
            return Err(VirtioNetStateError::FrameSize {
                index,
                len: f.len(),
            });
        }
        Ok(())
    }

    /// The backend stays; the MAC comes from the state.
    fn restore(&mut self, s: &VirtioNetState) -> Result<(), VirtioNetStateError> {
        self.check(s)?;
        self.mac = s.mac;
        let r = Registers {
            status: s.status,
            driver_features: s.driver_features,
            device_features_sel: s.device_features_sel,
            driver_features_sel: s.driver_features_sel,
            interrupt_status: s.interrupt_status,
            queue_sel: s.queue_sel,
        };
        self.transport.restore(&r, &s.queues);
        self.rx_pending = s.rx_pending.iter().cloned().collect();
        if s.guest_ip.is_some() {
            self.guest_ip = s.guest_ip;
        }
        Ok(())
    }
}

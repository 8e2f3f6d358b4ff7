//! The saved state of a virtio-blk device: its size and offer (to catch a different disk), the
//! transport's registers and the queue. Requests are served synchronously, so a paused device
//! has none in flight and this is all of it.

use serde::{Deserialize, Serialize};

use super::VirtioBlk;
use crate::devices::virtio_mmio::{QueueState, QueueStateError, Registers};
use crate::persist::Persist;

/// The saved state of a virtio-blk device and its transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlkState {
    /// The disk's capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// The features the device offered.
    pub device_features: u64,
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
    /// The request queue.
    pub queue: QueueState,
}

/// Why a virtio-blk state does not fit the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VirtioBlkStateError {
    /// The disk has another size.
    #[error("the saved disk has {state} sectors, this one {device}")]
    Capacity {
        /// Sectors in the state.
        state: u64,
        /// Sectors of this disk.
        device: u64,
    },
    /// The device offers other features (e.g. one disk is read-only).
    #[error("the saved device offered features {state:#x}, this one offers {device:#x}")]
    Features {
        /// Offered in the state.
        state: u64,
        /// Offered here.
        device: u64,
    },
    /// The queue cannot be put back as saved.
    #[error("its request queue")]
    Queue(#[source] QueueStateError),
}

impl Persist for VirtioBlk {
    type State = VirtioBlkState;
    type Error = VirtioBlkStateError;

    fn save(&mut self) -> VirtioBlkState {
        let r = self.transport.registers();
        VirtioBlkState {
            capacity_sectors: self.capacity_sectors,
            device_features: self.device_features(),
            status: r.status,
            driver_features: r.driver_features,
            device_features_sel: r.device_features_sel,
            driver_features_sel: r.driver_features_sel,
            interrupt_status: r.interrupt_status,
            queue_sel: r.queue_sel,
            queue: self.transport.queue_state(0),
        }
    }

    fn check(&self, s: &VirtioBlkState) -> Result<(), VirtioBlkStateError> {
        if s.capacity_sectors != self.capacity_sectors {
            return Err(VirtioBlkStateError::Capacity {
                state: s.capacity_sectors,
                device: self.capacity_sectors,
            });
        }
        if s.device_features != self.device_features() {
            return Err(VirtioBlkStateError::Features {
                state: s.device_features,
                device: self.device_features(),
            });
        }
        s.queue
            .check(self.transport.queue_max())
            .map_err(VirtioBlkStateError::Queue)
    }

    fn restore(&mut self, s: &VirtioBlkState) -> Result<(), VirtioBlkStateError> {
        self.check(s)?;
        let r = Registers {
            status: s.status,
            driver_features: s.driver_features,
            device_features_sel: s.device_features_sel,
            driver_features_sel: s.driver_features_sel,
            interrupt_status: s.interrupt_status,
            queue_sel: s.queue_sel,
        };
        self.transport.restore(&r, std::array::from_ref(&s.queue));
        Ok(())
    }
}

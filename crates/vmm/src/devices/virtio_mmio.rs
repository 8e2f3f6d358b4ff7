//! The virtio-mmio (version 2) transport shared by the virtio devices: the common register
//! window (virtio 1.2, section 4.2.2), feature selection and negotiation, device status, queue
//! set-up and the interrupt status.
//!
//! A device owns one [`Transport`] and hands it every guest access to its slot. The transport
//! answers the common registers itself, serves config-space reads from the bytes the device
//! gives, and returns what it cannot act on alone (a queue notification, a reset) as an
//! [`Event`] for the device to handle.

use virtio_queue::{Queue, QueueT};

/// Magic value of every virtio-mmio device ("virt").
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// virtio-mmio version 2 (modern).
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID ("TERN").
pub const VENDOR_ID: u32 = 0x4e52_4554;
/// VIRTIO_F_RING_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// Device status bit DRIVER_OK.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Device status bit FAILED (the device sets it when a queue is broken).
pub const STATUS_FAILED: u32 = 128;

/// Register offsets of the virtio-mmio transport within a slot.
pub(crate) mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// What a guest write asks of the device behind the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Nothing more to do.
    None,
    /// The driver (with DRIVER_OK set) notified this queue index.
    Notify(u32),
    /// The driver wrote 0 to Status: the transport and its queues are reset; the device drops
    /// its own transient state.
    Reset,
}

/// The saved state of one virtqueue.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    /// Its size.
    pub size: u16,
    /// Ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
}

/// Why a saved queue cannot be put back into a queue of this transport.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueStateError {
    /// Not a power of two in 1..=max.
    #[error("queue size {size} is not a power of two from 1 to {max}")]
    Size {
        /// The size in the state.
        size: u16,
        /// This transport's largest size.
        max: u16,
    },
    /// A ring address without the alignment virtio requires.
    #[error("the {ring} address {addr:#x} is not {align}-byte aligned")]
    Alignment {
        /// Which ring.
        ring: &'static str,
        /// The address.
        addr: u64,
        /// The alignment required.
        align: u64,
    },
}

impl QueueState {
    /// Checks that this state can be put into a queue of at most `max` entries as it is
    /// (virtio-queue silently ignores a bad size or a misaligned ring instead).
    pub fn check(&self, max: u16) -> Result<(), QueueStateError> {
        if !self.size.is_power_of_two() || self.size > max {
            return Err(QueueStateError::Size {
                size: self.size,
                max,
            });
        }
        for (ring, addr, align) in [
            ("descriptor table", self.desc_table, 16),
            ("available ring", self.avail_ring, 2),
            ("used ring", self.used_ring, 4),
        ] {
            if addr % align != 0 {
                return Err(QueueStateError::Alignment { ring, addr, align });
            }
        }
        Ok(())
    }
}

/// The transport's registers that a saved state carries (the queues are saved apart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Registers {
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
}

/// The virtio-mmio transport of one device with `N` virtqueues.
#[derive(Debug)]
pub struct Transport<const N: usize> {
    device_id: u32,
    device_features: u64,
    /// Whether DriverFeatures keeps only the bits the device offers (else it keeps what the
    /// driver wrote).
    ack_only_offered: bool,
    queue_max: u16,
    /// Device status register.
    pub status: u32,
    /// Features the driver acknowledged.
    pub driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    queue_sel: u32,
    /// The virtqueues, by index.
    pub queues: [Queue; N],
}

impl<const N: usize> Transport<N> {
    /// A reset transport for a device of `device_id` offering `device_features`, with `N`
    /// queues of at most `queue_max` entries (a power of two).
    pub fn new(
        device_id: u32,
        device_features: u64,
        queue_max: u16,
        ack_only_offered: bool,
    ) -> Self {
        Transport {
            device_id,
            device_features,
            ack_only_offered,
            queue_max,
            status: 0,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            interrupt_status: 0,
            queue_sel: 0,
            // queue_max is a power of two; Queue::new cannot fail for it.
            queues: std::array::from_fn(|_| {
                Queue::new(queue_max).unwrap_or_else(|_| unreachable!("valid queue size"))
            }),
        }
    }

    /// The features the device offers.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// Whether the driver has set DRIVER_OK.
    pub fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }

    fn sel(&self) -> Option<usize> {
        let q = self.queue_sel as usize;
        (q < N).then_some(q)
    }

    /// A guest read of `data.len()` bytes at `offset` in the slot; the config space reads from
    /// `config` (zero beyond it).
    pub fn read(&self, offset: u64, data: &mut [u8], config: &[u8]) {
        if offset >= reg::CONFIG {
            let start = (offset - reg::CONFIG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        let q = self.sel();
        let v: u32 = match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX if q.is_some() => u32::from(self.queue_max),
            reg::QUEUE_READY => q.map(|q| u32::from(self.queues[q].ready())).unwrap_or(0),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A guest write of `data` at `offset` in the slot (config-space writes are dropped);
    /// returns what the device must do about it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Event {
        if offset >= reg::CONFIG {
            return Event::None;
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        let q = self.sel();
        match (offset, q) {
            (reg::DEVICE_FEATURES_SEL, _) => self.device_features_sel = v,
            (reg::DRIVER_FEATURES_SEL, _) => self.driver_features_sel = v,
            (reg::DRIVER_FEATURES, _) => {
                let (v, keep) = match self.driver_features_sel {
                    0 => (u64::from(v), 0xffff_ffff_0000_0000),
                    1 => (u64::from(v) << 32, 0xffff_ffff),
                    _ => return Event::None,
                };
                let v = if self.ack_only_offered {
                    v & self.device_features
                } else {
                    v
                };
                self.driver_features = (self.driver_features & keep) | v;
            }
            (reg::QUEUE_SEL, _) => self.queue_sel = v,
            (reg::QUEUE_NUM, Some(q)) => self.queues[q].set_size(v as u16),
            (reg::QUEUE_READY, Some(q)) => {
                self.queues[q].set_event_idx(self.event_idx());
                self.queues[q].set_ready(v == 1);
            }
            (reg::QUEUE_DESC_LOW, Some(q)) => self.queues[q].set_desc_table_address(Some(v), None),
            (reg::QUEUE_DESC_HIGH, Some(q)) => self.queues[q].set_desc_table_address(None, Some(v)),
            (reg::QUEUE_DRIVER_LOW, Some(q)) => {
                self.queues[q].set_avail_ring_address(Some(v), None)
            }
            (reg::QUEUE_DRIVER_HIGH, Some(q)) => {
                self.queues[q].set_avail_ring_address(None, Some(v))
            }
            (reg::QUEUE_DEVICE_LOW, Some(q)) => self.queues[q].set_used_ring_address(Some(v), None),
            (reg::QUEUE_DEVICE_HIGH, Some(q)) => {
                self.queues[q].set_used_ring_address(None, Some(v))
            }
            (reg::QUEUE_NOTIFY, _) if self.driver_ok() => return Event::Notify(v),
            (reg::INTERRUPT_ACK, _) => self.interrupt_status &= !v,
            (reg::STATUS, _) => {
                if v == 0 {
                    self.reset();
                    return Event::Reset;
                }
                self.status = v;
            }
            _ => {}
        }
        Event::None
    }

    /// Whether the queues run with VIRTIO_F_RING_EVENT_IDX (offered and acknowledged).
    pub fn event_idx(&self) -> bool {
        self.driver_features & self.device_features & F_EVENT_IDX != 0
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.interrupt_status = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
    }

    /// The common registers, for a saved state.
    pub fn registers(&self) -> Registers {
        Registers {
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            interrupt_status: self.interrupt_status,
            queue_sel: self.queue_sel,
        }
    }

    /// The saved state of queue `i`.
    pub fn queue_state(&self, i: usize) -> QueueState {
        let q = &self.queues[i];
        QueueState {
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
        }
    }

    /// The largest queue size this transport offers.
    pub fn queue_max(&self) -> u16 {
        self.queue_max
    }

    /// Restores the common registers and the queues from a saved state (each queue state
    /// passed [`QueueState::check`] against [`Self::queue_max`]).
    pub fn restore(&mut self, r: &Registers, queues: &[QueueState; N]) {
        self.status = r.status;
        self.driver_features = r.driver_features;
        self.device_features_sel = r.device_features_sel;
        self.driver_features_sel = r.driver_features_sel;
        self.interrupt_status = r.interrupt_status;
        self.queue_sel = r.queue_sel;
        let event_idx = self.event_idx();
        for (q, qs) in self.queues.iter_mut().zip(queues) {
            q.set_size(qs.size);
            q.set_desc_table_address(
                Some(qs.desc_table as u32),
                Some((qs.desc_table >> 32) as u32),
            );
            q.set_avail_ring_address(
                Some(qs.avail_ring as u32),
                Some((qs.avail_ring >> 32) as u32),
            );
            q.set_used_ring_address(Some(qs.used_ring as u32), Some((qs.used_ring >> 32) as u32));
            q.set_next_avail(qs.next_avail);
            q.set_next_used(qs.next_used);
            q.set_event_idx(event_idx);
            q.set_ready(qs.ready);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r32<const N: usize>(t: &Transport<N>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b, &[1, 2, 3]);
        u32::from_le_bytes(b)
    }

    fn w32<const N: usize>(t: &mut Transport<N>, off: u64, v: u32) -> Event {
        t.write(off, &v.to_le_bytes())
    }

    #[test]
    fn identity_features_and_config_read_through_the_window() {
        let t = Transport::<2>::new(7, 0x1_0000_0020, 64, true);
        assert_eq!(r32(&t, reg::MAGIC), MMIO_MAGIC);
        assert_eq!(r32(&t, reg::VERSION), 2);
        assert_eq!(r32(&t, reg::DEVICE_ID), 7);
        assert_eq!(r32(&t, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(r32(&t, reg::DEVICE_FEATURES), 0x20);
        assert_eq!(
            r32(&t, reg::CONFIG),
            0x0003_0201,
            "config bytes, zero past the end"
        );
        let mut b = [0u8; 2];
        t.read(reg::CONFIG + 2, &mut b, &[1, 2, 3]);
        assert_eq!(b, [3, 0]);
    }

    #[test]
    fn queue_registers_follow_queue_sel_and_ignore_missing_queues() {
        let mut t = Transport::<2>::new(1, 0, 64, true);
        w32(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r32(&t, reg::QUEUE_NUM_MAX), 64);
        w32(&mut t, reg::QUEUE_NUM, 16);
        w32(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        w32(&mut t, reg::QUEUE_DESC_HIGH, 0x2);
        w32(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r32(&t, reg::QUEUE_READY), 1);
        assert_eq!(t.queue_state(1).size, 16);
        assert_eq!(t.queue_state(1).desc_table, 0x2_0000_1000);
        assert!(!t.queues[0].ready());
        w32(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(r32(&t, reg::QUEUE_NUM_MAX), 0);
        assert_eq!(r32(&t, reg::QUEUE_READY), 0);
        w32(&mut t, reg::QUEUE_NUM, 8);
        assert_eq!(t.queue_state(0).size, 64);
        assert_eq!(t.queue_state(1).size, 16);
    }

    #[test]
    fn driver_features_are_masked_only_when_asked() {
        for (only_offered, want) in [(true, 0x20), (false, 0x21)] {
            let mut t = Transport::<1>::new(2, 0x20, 64, only_offered);
            w32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
            w32(&mut t, reg::DRIVER_FEATURES, 0x21);
            w32(&mut t, reg::DRIVER_FEATURES_SEL, 5);
            w32(&mut t, reg::DRIVER_FEATURES, 0xffff);
            assert_eq!(t.driver_features, want);
        }
    }

    #[test]
    fn notify_needs_driver_ok_and_status_zero_resets() {
        let mut t = Transport::<1>::new(2, 0, 64, true);
        assert_eq!(w32(&mut t, reg::QUEUE_NOTIFY, 0), Event::None);
        w32(&mut t, reg::STATUS, 1 | 2 | 8 | STATUS_DRIVER_OK);
        assert_eq!(w32(&mut t, reg::QUEUE_NOTIFY, 3), Event::Notify(3));
        t.interrupt_status = 3;
        w32(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r32(&t, reg::INTERRUPT_STATUS), 2);
        w32(&mut t, reg::QUEUE_NUM, 16);
        assert_eq!(w32(&mut t, reg::STATUS, 0), Event::Reset);
        assert_eq!(t.registers(), Registers::default());
        assert_eq!(t.queue_state(0).size, 64);
    }

    #[test]
    fn queue_states_with_a_bad_size_or_ring_are_refused() {
        let good = QueueState {
            size: 16,
            desc_table: 0x1000,
            avail_ring: 0x2002,
            used_ring: 0x3004,
            ..Default::default()
        };
        assert_eq!(good.check(64), Ok(()));
        for size in [0, 3, 128] {
            let q = QueueState {
                size,
                ..good.clone()
            };
            assert_eq!(q.check(64), Err(QueueStateError::Size { size, max: 64 }));
        }
        let q = QueueState {
            desc_table: 0x1008,
            ..good.clone()
        };
        assert!(matches!(
            q.check(64),
            Err(QueueStateError::Alignment { align: 16, .. })
        ));
        let q = QueueState {
            used_ring: 0x3002,
            ..good
        };
        assert!(matches!(
            q.check(64),
            Err(QueueStateError::Alignment { align: 4, .. })
        ));
    }
}

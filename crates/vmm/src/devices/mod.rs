//! The devices a vCPU exit reaches: port I/O (COM1, the exit port, the i8042) and MMIO (the
//! virtio-mmio slots). Unclaimed ports read as all-ones and unclaimed MMIO as zero; writes to
//! them are dropped, as on a bus with nothing behind the address.

pub mod announce;
pub mod block_backend;
pub mod serial;
pub mod tap;
pub mod virtio_blk;
pub mod virtio_mmio;
pub mod virtio_net;

use std::sync::{Arc, Mutex};

use crate::layout::{self, GuestMemory};
use crate::persist::{Persist, RestoreStateError};
use crate::state::DevicesState;
use serial::{COM1_BASE, SerialDevice};
use virtio_blk::VirtioBlk;
use virtio_net::VirtioNet;

/// The guest's power-off port (one byte: the exit status), as QEMU's isa-debug-exit at 0x501.
pub const EXIT_PORT: u16 = 0x501;
/// The i8042 command port; writing 0xfe pulses the CPU reset line.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
const I8042_CMD_RESET: u8 = 0xfe;

/// What a guest I/O access asks of the VM as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    /// Nothing: keep running.
    None,
    /// The guest powered off with this status.
    PowerOff(u8),
    /// The guest asked for a reset.
    Reset,
}

/// All devices of one VM.
#[derive(Debug)]
pub struct Devices {
    /// COM1.
    pub serial: Mutex<SerialDevice>,
    /// virtio-blk devices with their slot number.
    pub blocks: Vec<(usize, Mutex<VirtioBlk>)>,
    /// virtio-net devices with their slot number (shared with their RX threads).
    pub nets: Vec<(usize, Arc<Mutex<VirtioNet>>)>,
    /// Set by a restore: the next resume announces the NICs.
    pub announce_pending: std::sync::atomic::AtomicBool,
    /// The guest's memory (for virtio queues).
    pub mem: GuestMemory,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic on another vCPU thread must not wedge the devices: take the data as it is.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Devices {
    /// A port read.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                data[0] = lock(&self.serial).read((p - COM1_BASE) as u8);
            }
            // i8042 status: output buffer empty, input buffer empty; data port: nothing.
            I8042_COMMAND_PORT | I8042_DATA_PORT => data[0] = 0,
            _ => {}
        }
    }

    /// A port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> IoAction {
        let Some(&v) = data.first() else {
            return IoAction::None;
        };
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                lock(&self.serial).write((p - COM1_BASE) as u8, v);
                IoAction::None
            }
            EXIT_PORT => IoAction::PowerOff(v),
            I8042_COMMAND_PORT if v == I8042_CMD_RESET => IoAction::Reset,
            _ => IoAction::None,
        }
    }

    fn slot_of(addr: u64) -> Option<(usize, u64)> {
        if !(layout::VIRTIO_MMIO_BASE
            ..layout::VIRTIO_MMIO_BASE
                + layout::VIRTIO_MMIO_SLOTS as u64 * layout::VIRTIO_MMIO_SLOT_SIZE)
            .contains(&addr)
        {
            return None;
        }
        let rel = addr - layout::VIRTIO_MMIO_BASE;
        Some((
            (rel / layout::VIRTIO_MMIO_SLOT_SIZE) as usize,
            rel % layout::VIRTIO_MMIO_SLOT_SIZE,
        ))
    }

    fn block_at(&self, addr: u64) -> Option<(&Mutex<VirtioBlk>, u64)> {
        let (slot, off) = Self::slot_of(addr)?;
        self.blocks
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, d)| (d, off))
    }

    fn net_at(&self, addr: u64) -> Option<(&Mutex<VirtioNet>, u64)> {
        let (slot, off) = Self::slot_of(addr)?;
        self.nets
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, d)| (&**d, off))
    }

    /// An MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some((dev, off)) = self.block_at(addr) {
            lock(dev).read(off, data);
        } else if let Some((dev, off)) = self.net_at(addr) {
            lock(dev).read(off, data);
        }
    }

    /// An MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((dev, off)) = self.block_at(addr) {
            lock(dev).write(&self.mem, off, data);
        } else if let Some((dev, off)) = self.net_at(addr) {
            lock(dev).write(&self.mem, off, data);
        }
    }

    /// Stops (or lets again) the network devices touching guest memory on their own, so a
    /// paused VM's memory and device state stay consistent.
    pub fn set_net_paused(&self, paused: bool) {
        for (_, d) in &self.nets {
            lock(d).set_paused(paused);
        }
    }

    /// One announce round on every NIC (RARP, and gratuitous ARP when the guest's IP is known);
    /// returns the frames sent.
    pub fn announce_round(&self) -> usize {
        self.nets
            .iter()
            .map(|(_, d)| lock(d).announce_round())
            .sum()
    }

    /// Sends the late frames for the guest out of every NIC's tap again
    /// ([`VirtioNet::forward_late_frames`]); returns how many.
    pub fn forward_late_frames(&self) -> usize {
        self.nets
            .iter()
            .map(|(_, d)| lock(d).forward_late_frames())
            .sum()
    }

    /// The saved state of every device (frames waiting in the taps join the NICs' state).
    pub fn save(&self) -> DevicesState {
        DevicesState {
            serial: lock(&self.serial).save(),
            blocks: self
                .blocks
                .iter()
                .map(|(s, d)| (*s, lock(d).save()))
                .collect(),
            nets: self
                .nets
                .iter()
                .map(|(s, d)| (*s, lock(d).save()))
                .collect(),
        }
    }

    /// Checks that `state` fits these devices (the same slots, and each device's own check);
    /// changes nothing.
    pub fn check(&self, state: &DevicesState) -> Result<(), RestoreStateError> {
        lock(&self.serial)
            .check(&state.serial)
            .map_err(RestoreStateError::Serial)?;
        check_slots("virtio-blk", &self.blocks, &state.blocks)?;
        check_slots("virtio-net", &self.nets, &state.nets)?;
        for ((slot, d), (_, s)) in self.blocks.iter().zip(&state.blocks) {
            lock(d)
                .check(s)
                .map_err(|source| RestoreStateError::Block {
                    slot: *slot,
                    source,
                })?;
        }
        for ((slot, d), (_, s)) in self.nets.iter().zip(&state.nets) {
            lock(d).check(s).map_err(|source| RestoreStateError::Net {
                slot: *slot,
                source,
            })?;
        }
        Ok(())
    }

    /// Puts `state` back into every device, after [`Devices::check`] passed for all of them;
    /// arms the announce for the next resume when the VM has NICs.
    pub fn restore(&self, state: &DevicesState) -> Result<(), RestoreStateError> {
        self.check(state)?;
        lock(&self.serial)
            .restore(&state.serial)
            .map_err(RestoreStateError::Serial)?;
        for ((slot, d), (_, s)) in self.blocks.iter().zip(&state.blocks) {
            lock(d)
                .restore(s)
                .map_err(|source| RestoreStateError::Block {
                    slot: *slot,
                    source,
                })?;
        }
        for ((slot, d), (_, s)) in self.nets.iter().zip(&state.nets) {
            lock(d)
                .restore(s)
                .map_err(|source| RestoreStateError::Net {
                    slot: *slot,
                    source,
                })?;
        }
        if !self.nets.is_empty() {
            self.announce_pending
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    /// Takes the "announce at the next resume" flag.
    pub fn take_announce_pending(&self) -> bool {
        self.announce_pending
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    /// Writes out any partial console line.
    pub fn flush(&self) {
        lock(&self.serial).flush();
    }

    /// The extra kernel command line that describes the virtio-mmio devices to Linux.
    pub fn linux_cmdline(&self) -> String {
        linux_cmdline_for(
            self.blocks
                .iter()
                .map(|(s, _)| *s)
                .chain(self.nets.iter().map(|(s, _)| *s)),
        )
    }
}

/// The same kind of devices in the same slots, in the same order, or a [`RestoreStateError::Slots`].
fn check_slots<D, S>(
    kind: &'static str,
    live: &[(usize, D)],
    saved: &[(usize, S)],
) -> Result<(), RestoreStateError> {
    let vm: Vec<usize> = live.iter().map(|(s, _)| *s).collect();
    let state: Vec<usize> = saved.iter().map(|(s, _)| *s).collect();
    if vm != state {
        return Err(RestoreStateError::Slots { kind, state, vm });
    }
    Ok(())
}

/// Sends the announce rounds of every NIC of `devices` on `schedule`, from a new thread; the
/// handle yields the number of frames sent.
pub fn spawn_announcer(
    devices: Arc<Devices>,
    schedule: announce::AnnounceSchedule,
) -> std::io::Result<std::thread::JoinHandle<usize>> {
    std::thread::Builder::new()
        .name("net-announce".into())
        .spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Device);
            let start = std::time::Instant::now();
            let mut sent = 0;
            for at in schedule.offsets {
                if let Some(wait) = at.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
                sent += devices.announce_round();
            }
            sent
        })
}

/// `virtio_mmio.device=512@0xfeb02e00:23 ...` for the given slots.
pub fn linux_cmdline_for(slots: impl Iterator<Item = usize>) -> String {
    slots
        .map(|slot| {
            format!(
                "virtio_mmio.device={}@{:#x}:{}",
                layout::VIRTIO_MMIO_SLOT_SIZE,
                layout::virtio_slot_addr(slot),
                layout::virtio_slot_gsi(slot)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    fn devices() -> Devices {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        Devices {
            serial: Mutex::new(SerialDevice::new(
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                Box::new(std::io::sink()),
            )),
            blocks: vec![],
            nets: vec![],
            announce_pending: Default::default(),
            mem,
        }
    }

    #[test]
    fn the_exit_port_reports_the_status_byte() {
        let d = devices();
        assert_eq!(d.pio_write(EXIT_PORT, &[0]), IoAction::PowerOff(0));
        assert_eq!(d.pio_write(EXIT_PORT, &[3]), IoAction::PowerOff(3));
    }

    #[test]
    fn i8042_reset_command_asks_for_a_reset() {
        let d = devices();
        assert_eq!(d.pio_write(0x64, &[0xfe]), IoAction::Reset);
        assert_eq!(d.pio_write(0x64, &[0xad]), IoAction::None);
    }

    #[test]
    fn unclaimed_ports_read_all_ones_and_empty_mmio_slots_read_zero() {
        let d = devices();
        let mut b = [0u8; 2];
        d.pio_read(0x1234, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        let mut m = [1u8; 4];
        d.mmio_read(0xfeb0_0000, &mut m);
        assert_eq!(m, [0; 4], "no magic in an empty slot");
    }

    #[test]
    fn linux_cmdline_names_size_address_and_irq() {
        assert_eq!(
            linux_cmdline_for([23usize, 22].into_iter()),
            "virtio_mmio.device=512@0xfeb02e00:23 virtio_mmio.device=512@0xfeb02c00:22"
        );
    }
}

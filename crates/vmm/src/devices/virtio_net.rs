//! A virtio network device behind the virtio-mmio (version 2) transport of [`super::virtio_mmio`],
//! with a frame backend (a tap in production). Queue 0 receives, queue 1 transmits.
//!
//! TX is served on the vCPU thread that writes QueueNotify; RX is served by a thread per device
//! that polls the backend (`spawn_rx_thread`) and by the vCPU thread when the guest adds receive
//! buffers. Notifications are suppressed both ways with VIRTIO_F_RING_EVENT_IDX (or the
//! NO_INTERRUPT / NO_NOTIFY flags when the driver does not take it). Every descriptor is
//! bounds-checked: a malformed chain or frame drops that frame, it never panics the VMM. Its
//! saved state: [`persist`].

pub mod persist;

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, Weak};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::announce::{self, snoop_ipv4};
use super::tap::NetBackend;
pub use super::virtio_mmio::QueueState;
use super::virtio_mmio::{Event, STATUS_DRIVER_OK, STATUS_FAILED, Transport};
pub use persist::VirtioNetState;

/// Device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// The virtio-net header with VIRTIO_F_VERSION_1 (num_buffers included).
pub const NET_HDR_LEN: usize = 12;
/// The largest frame carried (no TSO/GSO offered): a 1500-byte MTU with room for VLAN tags.
pub const MAX_FRAME: usize = 1518 + 4;

/// The most received frames the device holds for its guest (beyond that they wait in the tap).
pub const MAX_PENDING_FRAMES: usize = 256;

/// VIRTIO_NET_F_MAC.
pub const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_STATUS.
pub const F_STATUS: u64 = 1 << 16;
/// VIRTIO_F_RING_EVENT_IDX.
pub const F_EVENT_IDX: u64 = super::virtio_mmio::F_EVENT_IDX;
/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

const RX: usize = 0;
const TX: usize = 1;

/// Counters of the device's traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetCounters {
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Frames sent by the guest.
    pub tx_frames: u64,
    /// Frames dropped (malformed, too large, backend errors).
    pub dropped: u64,
    /// Interrupts raised.
    pub interrupts: u64,
}

/// A virtio-net device.
#[derive(Debug)]
pub struct VirtioNet {
    backend: Box<dyn NetBackend>,
    mac: [u8; 6],
    irq: EventFd,
    /// Written when the guest adds receive buffers, to wake the RX thread.
    rx_wake: EventFd,
    transport: Transport<2>,
    rx_pending: std::collections::VecDeque<Vec<u8>>,
    guest_ip: Option<Ipv4Addr>,
    paused: bool,
    counters: NetCounters,
}

impl VirtioNet {
    /// A device with `mac` over `backend`, interrupting through `irq`; `guest_ip` if known.
    pub fn new(
        backend: Box<dyn NetBackend>,
        mac: [u8; 6],
        guest_ip: Option<Ipv4Addr>,
        irq: EventFd,
    ) -> std::io::Result<Self> {
        Ok(VirtioNet {
            backend,
            mac,
            irq,
            rx_wake: EventFd::new(libc::EFD_NONBLOCK)?,
            // The driver's feature bits are masked by the offer.
            transport: Transport::new(VIRTIO_ID_NET, Self::FEATURES, QUEUE_SIZE, true),
            rx_pending: Default::default(),
            guest_ip,
            paused: false,
            counters: NetCounters::default(),
        })
    }

    /// The features this device offers.
    pub fn device_features(&self) -> u64 {
        Self::FEATURES
    }

    const FEATURES: u64 = F_VERSION_1 | F_MAC | F_STATUS | F_EVENT_IDX;

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The guest's IPv4 address, if known.
    pub fn guest_ip(&self) -> Option<Ipv4Addr> {
        self.guest_ip
    }

    /// Traffic counters.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// While paused the device leaves guest memory and the queues alone (frames wait in the
    /// backend), so a saved state and the guest's memory agree.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        if !paused {
            let _ = self.rx_wake.write(1);
        }
    }

    /// Sends the announce frames of one round out of the backend; returns how many went out.
    pub fn announce_round(&mut self) -> usize {
        let mut sent = 0;
        for f in announce::round_frames(self.mac, self.guest_ip) {
            if self.backend.send(&f).is_ok() {
                sent += 1;
            }
        }
        sent
    }

    /// Sends back out of the backend the frames for the guest that reached it after its state was
    /// saved, and returns how many. A paused source never reads its tap again, so a frame the
    /// network still delivered there between the save's drain and the target's announce would be
    /// lost (a TCP peer then waits out its 200 ms retransmission timeout). Called on the source
    /// once the target has acknowledged (it announced before that), the frames go out through
    /// this host's bridge, which the announce taught the guest's new port, to the target. Only
    /// frames unicast to the guest's MAC are sent (broadcasts reached the target themselves); the
    /// rest, and the frames already carried in the state, are left alone. At most
    /// [`MAX_PENDING_FRAMES`] frames. Each goes out with [`forwarder_mac`] as its source, not its
    /// sender's: a bridge learns a frame's source on the port it came in by, and sent unchanged
    /// it taught this host's bridge and the switch the *sender* behind this dead tap, so the
    /// guest's answer (addressed by its neighbour cache, which only ARP fills) went here and the
    /// sender waited out its retransmission. Call it just before the source's VMM closes the tap.
    pub fn forward_late_frames(&mut self) -> usize {
        let forwarder = forwarder_mac(self.mac);
        let mut buf = vec![0u8; MAX_FRAME + 64];
        let mut sent = 0;
        for _ in 0..MAX_PENDING_FRAMES {
            let n = match self.backend.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let len = n.min(buf.len());
            let frame = &mut buf[..len];
            if (14..=MAX_FRAME).contains(&n) && frame[..6] == self.mac {
                frame[6..12].copy_from_slice(&forwarder);
                if self.backend.send(frame).is_ok() {
                    sent += 1;
                }
            } else {
                self.counters.dropped += 1;
            }
        }
        sent
    }

    /// A guest read of `data.len()` bytes at `offset` in the slot.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        // mac[6], status u16 (VIRTIO_NET_S_LINK_UP).
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6] = 1;
        self.transport.read(offset, data, &config);
    }

    /// A guest write of `data` at `offset` in the slot; queue notifications are served against
    /// `mem`.
    pub fn write<M: GuestMemoryBackend>(&mut self, mem: &M, offset: u64, data: &[u8]) {
        match self.transport.write(offset, data) {
            Event::Notify(0) => {
                self.process_rx(mem);
                let _ = self.rx_wake.write(1);
            }
            Event::Notify(1) => self.process_tx(mem),
            Event::Reset => self.rx_pending.clear(),
            Event::Notify(_) | Event::None => {}
        }
    }

    /// Moves the frames waiting in the backend into the device's queue (at most
    /// `MAX_PENDING_FRAMES` in all), so they become part of its state.
    pub fn drain_backend(&mut self) {
        let mut buf = vec![0u8; MAX_FRAME + 64];
        while self.rx_pending.len() < MAX_PENDING_FRAMES {
            match self.backend.recv(&mut buf) {
                Ok(n) if (14..=MAX_FRAME).contains(&n) => {
                    self.rx_pending.push_back(buf[..n].to_vec())
                }
                Ok(_) => self.counters.dropped += 1,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    fn active<M: GuestMemoryBackend>(&self, mem: &M, q: usize) -> bool {
        !self.paused
            && self.transport.status & STATUS_DRIVER_OK != 0
            && self.transport.status & STATUS_FAILED == 0
            && self.transport.queues[q].ready()
            && self.transport.queues[q].is_valid(mem)
    }

    /// Whether the driver wants an interrupt for what was just used: EVENT_IDX's used_event when
    /// negotiated, else the avail ring's VRING_AVAIL_F_NO_INTERRUPT flag.
    fn wants_interrupt<M: GuestMemoryBackend>(&mut self, mem: &M, q: usize) -> bool {
        if self.transport.driver_features & F_EVENT_IDX != 0 {
            return self.transport.queues[q]
                .needs_notification(mem)
                .unwrap_or(true);
        }
        let flags: u16 = mem
            .read_obj(GuestAddress(self.transport.queues[q].avail_ring()))
            .unwrap_or(0);
        flags & 1 == 0
    }

    fn interrupt(&mut self) {
        self.transport.interrupt_status |= 1;
        self.counters.interrupts += 1;
        let _ = self.irq.write(1);
    }

    /// Sends every frame the guest queued; interrupts it if it asked to be told.
    pub fn process_tx<M: GuestMemoryBackend>(&mut self, mem: &M) {
        if !self.active(mem, TX) {
            return;
        }
        let mut served = false;
        let mut frame = Vec::with_capacity(NET_HDR_LEN + MAX_FRAME);
        loop {
            if self.transport.queues[TX].disable_notification(mem).is_err() {
                self.transport.status |= STATUS_FAILED;
                return;
            }
            while let Some(chain) = self.transport.queues[TX].pop_descriptor_chain(mem) {
                let head = chain.head_index();
                frame.clear();
                let mut ok = true;
                for d in chain.take(usize::from(QUEUE_SIZE)) {
                    let len = d.len() as usize;
                    if d.is_write_only() || frame.len() + len > NET_HDR_LEN + MAX_FRAME {
                        ok = false;
                        break;
                    }
                    let start = frame.len();
                    frame.resize(start + len, 0);
                    if mem.read_slice(&mut frame[start..], d.addr()).is_err() {
                        ok = false;
                        break;
                    }
                }
                if ok && frame.len() > NET_HDR_LEN + 14 {
                    let eth = &frame[NET_HDR_LEN..];
                    if let Some(ip) = snoop_ipv4(self.mac, eth) {
                        self.guest_ip = Some(ip);
                    }
                    match self.backend.send(eth) {
                        Ok(()) => self.counters.tx_frames += 1,
                        Err(_) => self.counters.dropped += 1,
                    }
                } else {
                    self.counters.dropped += 1;
                }
                if self.transport.queues[TX].add_used(mem, head, 0).is_err() {
                    self.transport.status |= STATUS_FAILED;
                    return;
                }
                served = true;
            }
            match self.transport.queues[TX].enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => {
                    self.transport.status |= STATUS_FAILED;
                    return;
                }
            }
        }
        if served && self.wants_interrupt(mem, TX) {
            self.interrupt();
        }
    }

    /// Moves frames from the backend into the guest's receive buffers until one side runs dry;
    /// interrupts the guest if it asked to be told. Returns true when the backend need not be
    /// polled until the guest kicks the RX queue: a frame waits for buffers, or the driver has
    /// not set the device up (or it is paused).
    pub fn process_rx<M: GuestMemoryBackend>(&mut self, mem: &M) -> bool {
        if !self.active(mem, RX) {
            return true;
        }
        let mut served = false;
        let mut buf = vec![0u8; MAX_FRAME + 64];
        // Bounded so one busy backend cannot hold the device lock for ever.
        for _ in 0..2 * usize::from(QUEUE_SIZE) {
            let frame = match self.rx_pending.pop_front() {
                Some(f) => f,
                None => match self.backend.recv(&mut buf) {
                    Ok(n) if !(14..=MAX_FRAME).contains(&n) => {
                        self.counters.dropped += 1;
                        continue;
                    }
                    Ok(n) => buf[..n].to_vec(),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                },
            };
            let chain = match self.transport.queues[RX].pop_descriptor_chain(mem) {
                Some(c) => c,
                None => {
                    // No buffer: keep the frame and ask the guest to kick when it adds some.
                    self.rx_pending.push_front(frame);
                    match self.transport.queues[RX].enable_notification(mem) {
                        Ok(true) => {
                            let _ = self.transport.queues[RX].disable_notification(mem);
                            continue;
                        }
                        _ => break,
                    }
                }
            };
            let head = chain.head_index();
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[10] = 1; // num_buffers
            let mut src: &[u8] = &hdr;
            let mut rest: &[u8] = &frame;
            let mut written = 0u32;
            let mut ok = true;
            for d in chain.take(usize::from(QUEUE_SIZE)) {
                if !d.is_write_only() {
                    ok = false;
                    break;
                }
                let mut room = d.len() as usize;
                let mut addr = d.addr();
                while room > 0 && (!src.is_empty() || !rest.is_empty()) {
                    if src.is_empty() {
                        src = rest;
                        rest = &[];
                    }
                    let n = room.min(src.len());
                    if mem.write_slice(&src[..n], addr).is_err() {
                        ok = false;
                        break;
                    }
                    src = &src[n..];
                    room -= n;
                    written += n as u32;
                    addr = GuestAddress(addr.0.wrapping_add(n as u64));
                }
                if !ok || (src.is_empty() && rest.is_empty()) {
                    break;
                }
            }
            if ok && src.is_empty() && rest.is_empty() {
                self.counters.rx_frames += 1;
            } else {
                // Too small or bad buffers: the frame is dropped, the buffer returned empty.
                self.counters.dropped += 1;
                written = 0;
            }
            if self.transport.queues[RX]
                .add_used(mem, head, written)
                .is_err()
            {
                self.transport.status |= STATUS_FAILED;
                return false;
            }
            served = true;
        }
        if served && self.wants_interrupt(mem, RX) {
            self.interrupt();
        }
        !self.rx_pending.is_empty()
    }

    /// The device's state as it is now, without draining the backend ([`Persist::save`]
    /// drains it first).
    ///
    /// [`Persist::save`]: crate::persist::Persist::save
    pub fn state(&self) -> VirtioNetState {
        let r = self.transport.registers();
        VirtioNetState {
            mac: self.mac,
            status: r.status,
            driver_features: r.driver_features,
            device_features_sel: r.device_features_sel,
            driver_features_sel: r.driver_features_sel,
            interrupt_status: r.interrupt_status,
            queue_sel: r.queue_sel,
            queues: [
                self.transport.queue_state(RX),
                self.transport.queue_state(TX),
            ],
            rx_pending: self.rx_pending.iter().cloned().collect(),
            guest_ip: self.guest_ip,
        }
    }
}

/// Starts the thread that feeds frames from the device's backend to its guest. It ends soon
/// after the device is dropped.
pub fn spawn_rx_thread<M>(
    dev: Weak<Mutex<VirtioNet>>,
    mem: M,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    M: GuestMemoryBackend + Send + 'static,
{
    let (fd, wake) = {
        let Some(d) = dev.upgrade() else {
            return Err(std::io::Error::other("device gone"));
        };
        let d = d.lock().unwrap_or_else(|e| e.into_inner());
        (d.backend.poll_fd(), d.rx_wake.try_clone()?)
    };
    std::thread::Builder::new()
        .name("virtio-net-rx".into())
        .spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Device);
            let mut blocked = false;
            loop {
                let mut fds = [
                    libc::pollfd {
                        fd: wake.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: if blocked { -1 } else { fd.unwrap_or(-1) },
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: poll on two pollfd structs we own; a negative fd is ignored by poll.
                let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
                if fds[0].revents != 0 {
                    let _ = wake.read();
                }
                let Some(d) = dev.upgrade() else {
                    return;
                };
                if rc <= 0 && !blocked {
                    continue;
                }
                // Blocked (no buffers, not set up, paused): wait for a kick or a resume on the
                // wake eventfd instead of polling the tap.
                blocked = d.lock().unwrap_or_else(|e| e.into_inner()).process_rx(&mem);
            }
        })
}

/// The source MAC a migrated-away source puts on the late frames it forwards
/// ([`VirtioNet::forward_late_frames`]): the guest's MAC with bit 2 of its first octet flipped,
/// marked locally administered and unicast. It is assumed to be no station's own on the
/// segment (the operator assigns the guests' MACs: a guest at `02:…` makes `06:…`, which
/// another VM there must not use), so the bridges that learn it on the old tap's port send
/// nothing anyone waits for there; the guest's MAC and every sender's stay where they are.
pub fn forwarder_mac(guest: [u8; 6]) -> [u8; 6] {
    let mut m = guest;
    m[0] = ((guest[0] ^ 0x04) | 0x02) & !0x01;
    m
}

#[cfg(test)]
mod tests {
    use super::super::virtio_mmio::{MMIO_MAGIC, reg};
    use super::*;
    use crate::persist::Persist;
    use std::collections::VecDeque;
    use std::sync::Arc;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestMemoryMmap};

    const WRITE: u16 = 2;
    const MAC: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];

    #[derive(Debug, Default)]
    struct Wire {
        to_guest: VecDeque<Vec<u8>>,
        from_guest: Vec<Vec<u8>>,
    }

    #[derive(Debug, Clone, Default)]
    struct Loop(Arc<Mutex<Wire>>);

    impl NetBackend for Loop {
        fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.0.lock().unwrap().from_guest.push(frame.to_vec());
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.0.lock().unwrap().to_guest.pop_front() {
                Some(f) => {
                    let n = f.len().min(buf.len());
                    buf[..n].copy_from_slice(&f[..n]);
                    Ok(f.len())
                }
                None => Err(std::io::ErrorKind::WouldBlock.into()),
            }
        }
        fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
            None
        }
    }

    struct Rig {
        mem: GuestMemoryMmap,
        dev: VirtioNet,
        wire: Loop,
        irq: EventFd,
    }

    fn rig() -> Rig {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let wire = Loop::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev =
            VirtioNet::new(Box::new(wire.clone()), MAC, None, irq.try_clone().unwrap()).unwrap();
        Rig {
            mem,
            dev,
            wire,
            irq,
        }
    }

    fn w32(r: &mut Rig, off: u64, v: u32) {
        let mem = r.mem.clone();
        r.dev.write(&mem, off, &v.to_le_bytes());
    }

    fn r32(r: &mut Rig, off: u64) -> u32 {
        let mut b = [0u8; 4];
        r.dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn activate(
        r: &mut Rig,
        rx: &MockSplitQueue<'_, GuestMemoryMmap>,
        tx: &MockSplitQueue<'_, GuestMemoryMmap>,
        event_idx: bool,
    ) {
        assert_eq!(r32(r, reg::MAGIC), MMIO_MAGIC);
        assert_eq!(r32(r, reg::DEVICE_ID), VIRTIO_ID_NET);
        w32(r, reg::STATUS, 1 | 2);
        w32(r, reg::DEVICE_FEATURES_SEL, 0);
        let lo = r32(r, reg::DEVICE_FEATURES);
        assert_ne!(u64::from(lo) & F_MAC, 0);
        assert_ne!(u64::from(lo) & F_EVENT_IDX, 0);
        w32(r, reg::DRIVER_FEATURES_SEL, 0);
        let want = F_MAC | if event_idx { F_EVENT_IDX } else { 0 };
        w32(r, reg::DRIVER_FEATURES, want as u32);
        w32(r, reg::DRIVER_FEATURES_SEL, 1);
        w32(r, reg::DRIVER_FEATURES, 1);
        w32(r, reg::STATUS, 1 | 2 | 8);
        for (i, q) in [rx, tx].into_iter().enumerate() {
            w32(r, reg::QUEUE_SEL, i as u32);
            assert_eq!(r32(r, reg::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
            w32(r, reg::QUEUE_NUM, 16);
            w32(r, reg::QUEUE_DESC_LOW, q.desc_table_addr().0 as u32);
            w32(r, reg::QUEUE_DRIVER_LOW, q.avail_addr().0 as u32);
            w32(r, reg::QUEUE_DEVICE_LOW, q.used_addr().0 as u32);
            w32(r, reg::QUEUE_READY, 1);
        }
        w32(r, reg::STATUS, 1 | 2 | 8 | 4);
    }

    fn used_idx(mem: &GuestMemoryMmap, q: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        mem.read_obj::<u16>(q.used_addr().unchecked_add(2)).unwrap()
    }

    fn used_len(mem: &GuestMemoryMmap, q: &MockSplitQueue<'_, GuestMemoryMmap>, i: u64) -> u32 {
        mem.read_obj(q.used_addr().unchecked_add(4 + 8 * i + 4))
            .unwrap()
    }

    fn frame(len: usize, tag: u8) -> Vec<u8> {
        let mut f = vec![tag; len];
        f[..6].copy_from_slice(&MAC);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x88, 0xb5]);
        f
    }

    #[test]
    fn a_device_the_driver_has_not_set_up_leaves_the_backend_alone() {
        let mut r = rig();
        let mem = r.mem.clone();
        r.wire.0.lock().unwrap().to_guest.push_back(frame(64, 1));
        assert!(r.dev.process_rx(&mem), "nothing to poll before DRIVER_OK");
        assert_eq!(
            r.wire.0.lock().unwrap().to_guest.len(),
            1,
            "the frame stays queued"
        );
    }

    #[test]
    fn config_space_holds_the_mac_and_link_up() {
        let mut r = rig();
        let mut b = [0u8; 8];
        r.dev.read(reg::CONFIG, &mut b);
        assert_eq!(&b[..6], &MAC);
        assert_eq!(b[6] & 1, 1);
    }

    #[test]
    fn tx_frames_reach_the_backend_without_the_header_and_teach_the_guest_ip() {
        let mut r = rig();
        let mem = r.mem.clone();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
        activate(&mut r, &rx, &tx, false);
        let garp = announce::garp_frame(MAC, Ipv4Addr::new(10, 77, 0, 2));
        mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(0x8000))
            .unwrap();
        mem.write_slice(&garp, GuestAddress(0x9000)).unwrap();
        // Header and frame in two descriptors.
        tx.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(0x8000, NET_HDR_LEN as u32, 1, 1)),
                RawDescriptor::from(SplitDescriptor::new(0x9000, garp.len() as u32, 0, 0)),
            ],
            0,
        )
        .unwrap();
        w32(&mut r, reg::QUEUE_NOTIFY, 1);
        assert_eq!(r.wire.0.lock().unwrap().from_guest, vec![garp]);
        assert_eq!(used_idx(&mem, &tx), 1);
        assert!(r.irq.read().unwrap() >= 1);
        assert_eq!(r.dev.guest_ip(), Some(Ipv4Addr::new(10, 77, 0, 2)));
        assert_eq!(r.dev.counters().tx_frames, 1);
    }

    #[test]
    fn rx_frames_wait_for_buffers_then_land_with_a_header() {
        let mut r = rig();
        let mem = r.mem.clone();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
        activate(&mut r, &rx, &tx, false);
        let f1 = frame(100, 0x11);
        let f2 = frame(1514, 0x22);
        r.wire
            .0
            .lock()
            .unwrap()
            .to_guest
            .extend([f1.clone(), f2.clone()]);
        // No buffers yet: the first frame waits in the device.
        assert!(r.dev.process_rx(&mem));
        assert_eq!(used_idx(&mem, &rx), 0);
        assert_eq!(r.dev.state().rx_pending, vec![f1.clone()]);
        // Two buffers of 2048 bytes; the guest kicks the RX queue.
        rx.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(0x10000, 2048, WRITE, 0)),
                RawDescriptor::from(SplitDescriptor::new(0x20000, 2048, WRITE, 0)),
            ],
            0,
        )
        .unwrap();
        w32(&mut r, reg::QUEUE_NOTIFY, 0);
        assert_eq!(used_idx(&mem, &rx), 2);
        assert_eq!(used_len(&mem, &rx, 0), (NET_HDR_LEN + 100) as u32);
        assert_eq!(used_len(&mem, &rx, 1), (NET_HDR_LEN + 1514) as u32);
        let mut got = vec![0u8; NET_HDR_LEN + 1514];
        mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
        assert_eq!(got[10], 1, "num_buffers");
        assert_eq!(&got[NET_HDR_LEN..], &f2[..]);
        mem.read_slice(&mut got[..NET_HDR_LEN + 100], GuestAddress(0x10000))
            .unwrap();
        assert_eq!(&got[NET_HDR_LEN..NET_HDR_LEN + 100], &f1[..]);
        assert_eq!(r.dev.counters().rx_frames, 2);
        assert!(r.irq.read().unwrap() >= 1);
    }

    #[test]
    fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
        let mut r = rig();
        let mem = r.mem.clone();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
        activate(&mut r, &rx, &tx, true);
        // used_event (after the avail ring's 16 entries) = 5: interrupt only once used idx passes 5.
        let used_event = tx.avail_addr().unchecked_add(4 + 2 * 16);
        mem.write_obj(5u16, used_event).unwrap();
        let f = frame(60, 1);
        mem.write_slice(&f, GuestAddress(0x9000 + NET_HDR_LEN as u64))
            .unwrap();
        tx.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                0x9000,
                (NET_HDR_LEN + 60) as u32,
                0,
                0,
            ))],
            0,
        )
        .unwrap();
        w32(&mut r, reg::QUEUE_NOTIFY, 1);
        assert_eq!(used_idx(&mem, &tx), 1);
        assert!(r.irq.read().is_err(), "no interrupt before used_event");
        // The device published avail_event so the driver knows when to kick.
        let avail_event: u16 = mem
            .read_obj(tx.used_addr().unchecked_add(4 + 8 * 16))
            .unwrap();
        assert_eq!(avail_event, 1);
    }

    #[test]
    fn the_no_interrupt_flag_is_honoured_without_event_idx() {
        let mut r = rig();
        let mem = r.mem.clone();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
        activate(&mut r, &rx, &tx, false);
        mem.write_obj(1u16, rx.avail_addr()).unwrap();
        rx.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                0x10000, 2048, WRITE, 0,
            ))],
            0,
        )
        .unwrap();
        mem.write_obj(1u16, rx.avail_addr()).unwrap();
        r.wire.0.lock().unwrap().to_guest.push_back(frame(64, 3));
        r.dev.process_rx(&mem);
        assert_eq!(used_idx(&mem, &rx), 1);
        assert!(r.irq.read().is_err(), "the driver polls: no interrupt");
    }

    #[test]
    fn frames_waiting_in_the_backend_travel_with_the_state() {
        let mut r = rig();
        let mem = r.mem.clone();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
        activate(&mut r, &rx, &tx, false);
        r.dev.set_paused(true);
        let frames = [frame(64, 1), frame(80, 2), vec![3u8; 10]];
        r.wire
            .0
            .lock()
            .unwrap()
            .to_guest
            .extend(frames.iter().cloned());
        r.dev.drain_backend();
        let s = r.dev.state();
        assert_eq!(
            s.rx_pending,
            vec![frames[0].clone(), frames[1].clone()],
            "runts dropped"
        );
        // A fresh device (the target) delivers them once the guest has buffers.
        let mut t = rig();
        t.dev.restore(&s).unwrap();
        rx.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(0x10000, 2048, WRITE, 0)),
                RawDescriptor::from(SplitDescriptor::new(0x20000, 2048, WRITE, 0)),
            ],
            0,
        )
        .unwrap();
        t.dev.process_rx(&mem);
        assert_eq!(used_idx(&mem, &rx), 2);
        let mut got = vec![0u8; 80];
        mem.read_slice(&mut got, GuestAddress(0x20000 + NET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, frames[1]);
    }

    #[test]
    fn late_frames_for_the_guest_go_back_out_and_the_rest_are_dropped() {
        let mut r = rig();
        let mut broadcast = frame(64, 7);
        broadcast[..6].copy_from_slice(&[0xff; 6]);
        let mut other = frame(64, 8);
        other[..6].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
        // One frame drained into the state by the save, then three that came later.
        r.wire.0.lock().unwrap().to_guest.push_back(frame(64, 5));
        r.dev.drain_backend();
        r.wire
            .0
            .lock()
            .unwrap()
            .to_guest
            .extend([frame(70, 6), broadcast, other]);
        assert_eq!(r.dev.forward_late_frames(), 1);
        let w = r.wire.0.lock().unwrap();
        let mut forwarded = frame(70, 6);
        forwarded[6..12].copy_from_slice(&forwarder_mac(MAC));
        assert_eq!(
            w.from_guest,
            vec![forwarded],
            "only the late unicast frame, from the forwarder's MAC"
        );
        assert!(w.to_guest.is_empty(), "the backend was read dry");
        drop(w);
        assert_eq!(
            r.dev.state().rx_pending,
            vec![frame(64, 5)],
            "the state's frame stays"
        );
        assert_eq!(r.dev.counters().dropped, 2);
        assert_eq!(r.dev.forward_late_frames(), 0, "nothing twice");
    }

    #[test]
    fn the_forwarder_mac_is_unicast_local_and_neither_the_guests_nor_a_senders() {
        for guest in [
            MAC,
            [0, 0x16, 0x3e, 1, 2, 3],
            [0xfe, 0xff, 0xff, 0xff, 0xff, 0xfe],
        ] {
            let f = forwarder_mac(guest);
            assert_ne!(f, guest);
            assert_eq!(f[0] & 0x01, 0, "unicast: {f:02x?}");
            assert_eq!(f[0] & 0x02, 0x02, "locally administered: {f:02x?}");
            assert_eq!(f[1..], guest[1..], "the rest is the guest's");
        }
        // The late frame's own sender (frame()'s source bytes) is never what goes out.
        let late = frame(70, 6);
        assert_ne!(late[6..12], forwarder_mac(MAC));
    }

    #[test]
    fn paused_devices_leave_the_queues_alone() {
        let mut r = rig();
        let mem = r.mem.clone();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
        activate(&mut r, &rx, &tx, false);
        rx.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                0x10000, 2048, WRITE, 0,
            ))],
            0,
        )
        .unwrap();
        r.wire.0.lock().unwrap().to_guest.push_back(frame(64, 3));
        r.dev.set_paused(true);
        assert!(
            r.dev.process_rx(&mem),
            "a paused device does not poll its backend"
        );
        assert_eq!(used_idx(&mem, &rx), 0);
        r.dev.set_paused(false);
        r.dev.process_rx(&mem);
        assert_eq!(used_idx(&mem, &rx), 1);
    }

    #[test]
    fn a_state_with_frames_the_device_never_holds_is_refused_and_changes_nothing() {
        use persist::VirtioNetStateError as E;
        let mut r = rig();
        let before = r.dev.state();
        let mut bad = before.clone();
        bad.mac = [2, 0, 0, 0, 0, 9];
        bad.rx_pending = vec![frame(64, 1); MAX_PENDING_FRAMES + 1];
        assert_eq!(
            r.dev.restore(&bad),
            Err(E::TooManyFrames {
                count: MAX_PENDING_FRAMES + 1
            })
        );
        bad.rx_pending = vec![frame(64, 1), vec![0u8; MAX_FRAME + 1]];
        assert_eq!(
            r.dev.restore(&bad),
            Err(E::FrameSize {
                index: 1,
                len: MAX_FRAME + 1
            })
        );
        bad.rx_pending.clear();
        bad.driver_features = 1 << 40;
        assert!(matches!(r.dev.restore(&bad), Err(E::Features { .. })));
        bad.driver_features = 0;
        bad.queues[1].size = 1000;
        assert!(matches!(
            r.dev.restore(&bad),
            Err(E::Queue {
                which: "transmit",
                ..
            })
        ));
        assert_eq!(r.dev.state(), before, "nothing changed");
    }

    #[test]
    fn state_round_trips_with_the_pending_frame_and_ip() {
        let mut r = rig();
        let mem = r.mem.clone();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
        activate(&mut r, &rx, &tx, true);
        r.wire.0.lock().unwrap().to_guest.push_back(frame(64, 3));
        r.dev.process_rx(&mem);
        let mut s = r.dev.state();
        s.guest_ip = Some(Ipv4Addr::new(10, 77, 0, 2));
        let json = serde_json::to_string(&s).unwrap();
        let back: VirtioNetState = serde_json::from_str(&json).unwrap();
        let mut other = rig();
        other.dev.restore(&back).unwrap();
        assert_eq!(other.dev.state(), s);
        // The restored device announces with what it learnt.
        assert_eq!(other.dev.announce_round(), 2);
        let sent = other.wire.0.lock().unwrap().from_guest.clone();
        assert_eq!(sent[0], announce::rarp_frame(MAC));
        assert_eq!(
            sent[1],
            announce::garp_frame(MAC, Ipv4Addr::new(10, 77, 0, 2))
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Arbitrary descriptor chains on both queues and arbitrary frames from the backend never
        /// panic the device, and every chain it takes is returned.
        #[test]
        fn arbitrary_chains_and_frames_never_panic(
            descs in proptest::collection::vec((0x8000u64..0x11_0000, 0u32..0x4000, 0u16..8), 1..6),
            frames in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000), 0..4),
            queue in 0u32..3,
            event_idx in proptest::prelude::any::<bool>(),
        ) {
            let mut r = rig();
            let mem = r.mem.clone();
            let rx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
            let tx = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
            activate(&mut r, &rx, &tx, event_idx);
            r.wire.0.lock().unwrap().to_guest.extend(frames.iter().cloned());
            let n = descs.len();
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, flags))| {
                    let next = if i + 1 < n { 1 } else { 0 };
                    RawDescriptor::from(SplitDescriptor::new(addr, len, (flags & 2) | next, i as u16 + 1))
                })
                .collect();
            let q = if queue == 1 { &tx } else { &rx };
            q.add_desc_chains(&raw, 0).unwrap();
            w32(&mut r, reg::QUEUE_NOTIFY, queue);
            r.dev.process_rx(&mem);
            let deliverable = frames.iter().any(|f| (14..=MAX_FRAME).contains(&f.len()));
            if queue == 1 {
                proptest::prop_assert_eq!(used_idx(&mem, &tx), 1);
            } else if deliverable {
                proptest::prop_assert_eq!(used_idx(&mem, &rx), 1);
            }
            proptest::prop_assert!(used_idx(&mem, &rx) <= 1);
        }
    }
}

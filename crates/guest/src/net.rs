//! The network: a polled virtio-net driver (virtio-mmio legacy version 1, as QEMU's microvm offers,
//! and modern version 2, as Tern offers) under smoltcp, with a static IPv4 address, answering ARP
//! and ICMP echo, a TCP echo server and a UDP echo responder on one port.
//!
//! Everything runs at CPL3 on the boot CPU, polled from the workload loop; the device's interrupts
//! are not used (the guest never unmasks their IOAPIC pins). With VIRTIO_F_RING_EVENT_IDX the driver
//! kicks the device only when it asked to be kicked.

// The socket buffers are `static mut`; `&mut *(&raw mut X)` is how a unique reference to one is taken
// without the `static_mut_refs` lint, which clippy's `deref_addrof` misreads as redundant.
#![allow(clippy::deref_addrof)]

use core::sync::atomic::{Ordering, fence};

use crate::virtio_mmio::{Mmio, REG_CONFIG, REG_QUEUE_NOTIFY, REG_VERSION};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

const DEVICE_NET: u32 = 1;

const F_MAC: u32 = 1 << 5;
const F_EVENT_IDX: u32 = 1 << 29;

const DESC_F_WRITE: u16 = 2;
const USED_F_NO_NOTIFY: u16 = 1;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

const QSIZE: usize = 32;
const PAGE: usize = 4096;
const BUF: usize = 2048;
const RXQ: usize = 0;
const TXQ: usize = 1;

/// Ring memory of both queues: per queue, descriptors and the available ring in the first page,
/// the used ring in the second (the legacy layout for QueueAlign 4096, also valid for version 2).
#[repr(C, align(4096))]
struct Rings([[u8; 2 * PAGE]; 2]);
#[repr(C, align(4096))]
struct Buffers([[[u8; BUF]; QSIZE]; 2]);

static mut RINGS: Rings = Rings([[0; 2 * PAGE]; 2]);
static mut BUFFERS: Buffers = Buffers([[[0; BUF]; QSIZE]; 2]);

fn ring(q: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { (&raw const RINGS.0[q]) as u64 }
}

fn buf_addr(q: usize, i: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { (&raw const BUFFERS.0[q][i]) as u64 }
}

fn w16(addr: u64, v: u16) {
    // SAFETY: addresses inside the static rings, identity-mapped.
    unsafe { (addr as *mut u16).write_volatile(v) }
}
fn r16(addr: u64) -> u16 {
    // SAFETY: as above.
    unsafe { (addr as *const u16).read_volatile() }
}
fn r32(addr: u64) -> u32 {
    // SAFETY: as above.
    unsafe { (addr as *const u32).read_volatile() }
}

/// One split virtqueue of `QSIZE` entries in `RINGS[q]`.
struct Queue {
    q: usize,
    avail_idx: u16,
    used_seen: u16,
    /// avail_idx at the last kick.
    kicked_at: u16,
}

impl Queue {
    fn desc(&self) -> u64 {
        ring(self.q)
    }
    fn avail(&self) -> u64 {
        ring(self.q) + 16 * QSIZE as u64
    }
    fn used(&self) -> u64 {
        ring(self.q) + PAGE as u64
    }
    fn set_desc(&self, i: usize, addr: u64, len: u32, flags: u16) {
        let d = self.desc() + 16 * i as u64;
        // SAFETY: descriptor i of this queue's table.
        unsafe {
            (d as *mut u64).write_volatile(addr);
            ((d + 8) as *mut u32).write_volatile(len);
            ((d + 12) as *mut u16).write_volatile(flags);
            ((d + 14) as *mut u16).write_volatile(0);
        }
    }
    /// Makes descriptor `i` available.
    fn push(&mut self, i: usize) {
        w16(
            self.avail() + 4 + 2 * (self.avail_idx as u64 % QSIZE as u64),
            i as u16,
        );
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        w16(self.avail() + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }
    /// The next used entry (descriptor, length), if any.
    fn pop_used(&mut self) -> Option<(usize, usize)> {
        fence(Ordering::SeqCst);
        if r16(self.used() + 2) == self.used_seen {
            return None;
        }
        let e = self.used() + 4 + 8 * (self.used_seen as u64 % QSIZE as u64);
        let id = r32(e) as usize % QSIZE;
        let len = r32(e + 4) as usize;
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }
    /// Whether the device wants a kick for what was pushed since the last one.
    fn needs_kick(&mut self, event_idx: bool) -> bool {
        fence(Ordering::SeqCst);
        let old = self.kicked_at;
        let new = self.avail_idx;
        if old == new {
            return false;
        }
        let kick = if event_idx {
            let event = r16(self.used() + 4 + 8 * QSIZE as u64);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            r16(self.used()) & USED_F_NO_NOTIFY == 0
        };
        if kick {
            self.kicked_at = new;
        }
        kick
    }
}

/// The virtio-net device and its queues.
pub struct VirtioNet {
    mmio: Mmio,
    hdr_len: usize,
    event_idx: bool,
    rx: Queue,
    tx: Queue,
    /// TX descriptors free for reuse.
    tx_free: [bool; QSIZE],
    /// A received frame smoltcp has not taken yet: (descriptor, length).
    rx_ready: Option<(usize, usize)>,
    pub mac: [u8; 6],
    pub slot: u64,
    pub version: u32,
}

impl VirtioNet {
    /// Finds the first virtio-net device (highest slot first) and brings it up.
    pub fn probe() -> Result<VirtioNet, &'static str> {
        let (slot, mmio) = Mmio::find(DEVICE_NET).ok_or("no virtio-net device")?;
        let version = mmio.r32(REG_VERSION);
        if version != 1 && version != 2 {
            return Err("unknown virtio-mmio version");
        }
        let mut want = 0;
        let status = mmio.negotiate(version, |low| {
            if low & F_MAC == 0 {
                return Err("device has no MAC address");
            }
            want = low & (F_MAC | F_EVENT_IDX);
            Ok(want)
        })?;
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = mmio.r8(REG_CONFIG + i as u64);
        }
        // SAFETY: the device is reset; nothing else touches the rings or buffers.
        unsafe {
            (&raw mut RINGS).write_bytes(0, 1);
        }
        for q in [RXQ, TXQ] {
            if (mmio.queue_max(q as u32) as usize) < QSIZE {
                return Err("virtio-net queue too small or absent");
            }
            // We poll: no interrupts wanted (without EVENT_IDX this flag says so).
            w16(ring(q) + 16 * QSIZE as u64, AVAIL_F_NO_INTERRUPT);
            mmio.setup_queue(version, q as u32, QSIZE as u16, ring(q));
        }
        let mut dev = VirtioNet {
            mmio,
            hdr_len: if version == 2 { 12 } else { 10 },
            event_idx: want & F_EVENT_IDX != 0,
            rx: Queue {
                q: RXQ,
                avail_idx: 0,
                used_seen: 0,
                kicked_at: 0,
            },
            tx: Queue {
                q: TXQ,
                avail_idx: 0,
                used_seen: 0,
                kicked_at: 0,
            },
            tx_free: [true; QSIZE],
            rx_ready: None,
            mac,
            slot,
            version,
        };
        if dev.event_idx {
            // Interrupts only after 2^15 completions: effectively never (the guest polls).
            for q in [&dev.rx, &dev.tx] {
                w16(q.avail() + 4 + 2 * QSIZE as u64, 0x8000);
            }
        }
        for i in 0..QSIZE {
            dev.rx
                .set_desc(i, buf_addr(RXQ, i), BUF as u32, DESC_F_WRITE);
            dev.rx.push(i);
        }
        mmio.driver_ok(status);
        dev.mmio.w32(REG_QUEUE_NOTIFY, RXQ as u32);
        dev.rx.kicked_at = dev.rx.avail_idx;
        Ok(dev)
    }

    /// Takes back sent TX buffers and gives consumed RX buffers back to the device.
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.tx.pop_used() {
            self.tx_free[id] = true;
        }
    }

    fn rx_return(&mut self, id: usize) {
        self.rx
            .set_desc(id, buf_addr(RXQ, id), BUF as u32, DESC_F_WRITE);
        self.rx.push(id);
        if self.rx.needs_kick(self.event_idx) {
            self.mmio.w32(REG_QUEUE_NOTIFY, RXQ as u32);
        }
    }
}

/// smoltcp's view of a received frame.
pub struct RxToken<'a>(&'a mut VirtioNet);
/// smoltcp's view of a free transmit buffer.
pub struct TxToken<'a>(&'a mut VirtioNet);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let dev = self.0;
        let (id, len) = dev.rx_ready.take().unwrap_or((0, 0));
        let hdr = dev.hdr_len;
        let len = len.clamp(hdr, BUF);
        // SAFETY: the device has finished writing buffer `id` (it is in the used ring) and will not
        // touch it until it is made available again below.
        let r = f(unsafe { &BUFFERS.0[RXQ][id][hdr..len] });
        dev.rx_return(id);
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let dev = self.0;
        let hdr = dev.hdr_len;
        let id = dev.tx_free.iter().position(|f| *f).unwrap_or(0);
        dev.tx_free[id] = false;
        let len = len.min(BUF - hdr);
        // SAFETY: buffer `id` is not in the device's hands (it was free).
        let buf = unsafe { &mut BUFFERS.0[TXQ][id] };
        buf[..hdr].fill(0);
        let r = f(&mut buf[hdr..hdr + len]);
        dev.tx
            .set_desc(id, buf_addr(TXQ, id), (hdr + len) as u32, 0);
        dev.tx.push(id);
        if dev.tx.needs_kick(dev.event_idx) {
            dev.mmio.w32(REG_QUEUE_NOTIFY, TXQ as u32);
        }
        r
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        self.reclaim();
        if self.rx_ready.is_none() {
            self.rx_ready = self.rx.pop_used();
        }
        if self.rx_ready.is_none() || !self.tx_free.iter().any(|f| *f) {
            return None;
        }
        // Two tokens borrowing the device: smoltcp uses them one after the other.
        let p: *mut VirtioNet = self;
        // SAFETY: smoltcp consumes the RX token before it uses the TX token; the tokens never touch
        // the device at the same time.
        Some((RxToken(unsafe { &mut *p }), TxToken(self)))
    }

    fn transmit(&mut self, _t: Instant) -> Option<TxToken<'_>> {
        self.reclaim();
        self.tx_free.iter().any(|f| *f).then_some(TxToken(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps.max_burst_size = Some(QSIZE / 2);
        caps
    }
}

const TCP_BUF: usize = 16 * 1024;
const UDP_META: usize = 8;
const UDP_BUF: usize = 8 * 1024;
const TCP_SOCKETS: usize = 4;

static mut SOCKET_STORAGE: [SocketStorage<'static>; TCP_SOCKETS + 1] =
    [SocketStorage::EMPTY; TCP_SOCKETS + 1];
static mut TCP_RX: [[u8; TCP_BUF]; TCP_SOCKETS] = [[0; TCP_BUF]; TCP_SOCKETS];
static mut TCP_TX: [[u8; TCP_BUF]; TCP_SOCKETS] = [[0; TCP_BUF]; TCP_SOCKETS];
static mut UDP_RX_META: [udp::PacketMetadata; UDP_META] = [udp::PacketMetadata::EMPTY; UDP_META];
static mut UDP_TX_META: [udp::PacketMetadata; UDP_META] = [udp::PacketMetadata::EMPTY; UDP_META];
static mut UDP_RX: [u8; UDP_BUF] = [0; UDP_BUF];
static mut UDP_TX: [u8; UDP_BUF] = [0; UDP_BUF];

/// Counters printed in the `NET` heartbeat line.
#[derive(Default, Clone, Copy)]
pub struct Stats {
    pub tcp_bytes: u64,
    pub udp_packets: u64,
    pub tcp_accepts: u64,
}

/// The guest's network: device, interface and echo sockets.
pub struct Net {
    dev: VirtioNet,
    iface: Interface,
    sockets: SocketSet<'static>,
    tcp: [SocketHandle; TCP_SOCKETS],
    udp: SocketHandle,
    port: u16,
    was_open: [bool; TCP_SOCKETS],
    pub stats: Stats,
}

impl Net {
    /// Brings the network up with `addr/prefix`, echoing on `port`.
    pub fn up(addr: [u8; 4], prefix: u8, port: u16, now_us: i64) -> Result<Net, &'static str> {
        let mut dev = VirtioNet::probe()?;
        let hw = HardwareAddress::Ethernet(EthernetAddress(dev.mac));
        let mut cfg = IfaceConfig::new(hw);
        cfg.random_seed = now_us as u64;
        let mut iface = Interface::new(cfg, &mut dev, Instant::from_micros(now_us));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(
                Ipv4Address::new(addr[0], addr[1], addr[2], addr[3]).into(),
                prefix,
            ));
        });
        // SAFETY: `up` runs once, on the boot CPU; these statics are handed to smoltcp for good.
        let mut sockets =
            SocketSet::new(unsafe { (&mut *(&raw mut SOCKET_STORAGE)).as_mut_slice() });
        let mut tcp = [SocketHandle::default(); TCP_SOCKETS];
        for (i, h) in tcp.iter_mut().enumerate() {
            // SAFETY: as above; each socket gets its own buffers.
            let (rx, tx) = unsafe {
                (
                    (&mut *(&raw mut TCP_RX))[i].as_mut_slice(),
                    (&mut *(&raw mut TCP_TX))[i].as_mut_slice(),
                )
            };
            let mut s = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
            s.set_nagle_enabled(false);
            s.set_ack_delay(None);
            *h = sockets.add(s);
        }
        // SAFETY: as above.
        let udp_socket = unsafe {
            udp::Socket::new(
                udp::PacketBuffer::new(
                    (&mut *(&raw mut UDP_RX_META)).as_mut_slice(),
                    (&mut *(&raw mut UDP_RX)).as_mut_slice(),
                ),
                udp::PacketBuffer::new(
                    (&mut *(&raw mut UDP_TX_META)).as_mut_slice(),
                    (&mut *(&raw mut UDP_TX)).as_mut_slice(),
                ),
            )
        };
        let udp = sockets.add(udp_socket);
        sockets
            .get_mut::<udp::Socket<'_>>(udp)
            .bind(port)
            .map_err(|_| "cannot bind the UDP echo port")?;
        let mut net = Net {
            dev,
            iface,
            sockets,
            tcp,
            udp,
            port,
            was_open: [false; TCP_SOCKETS],
            stats: Stats::default(),
        };
        net.listen_all();
        Ok(net)
    }

    /// Slot, version and MAC of the device, for the console.
    pub fn describe(&self) -> (u64, u32, [u8; 6]) {
        (self.dev.slot, self.dev.version, self.dev.mac)
    }

    fn listen_all(&mut self) {
        for h in self.tcp {
            let s = self.sockets.get_mut::<tcp::Socket<'_>>(h);
            if !s.is_open() {
                let _ = s.listen(self.port);
            }
        }
    }

    /// Moves frames and echoes whatever arrived; returns true if anything happened.
    pub fn poll(&mut self, now_us: i64) -> bool {
        let now = Instant::from_micros(now_us);
        let mut any = false;
        for _ in 0..8 {
            let changed = self.iface.poll(now, &mut self.dev, &mut self.sockets);
            let echoed = self.echo();
            any |= echoed;
            if changed == smoltcp::iface::PollResult::None && !echoed {
                break;
            }
        }
        self.listen_all();
        any
    }

    fn echo(&mut self) -> bool {
        let mut moved = false;
        let mut buf = [0u8; 2048];
        for (i, h) in self.tcp.into_iter().enumerate() {
            let s = self.sockets.get_mut::<tcp::Socket<'_>>(h);
            let open = s.is_active();
            if open && !self.was_open[i] {
                self.stats.tcp_accepts += 1;
            }
            self.was_open[i] = open;
            while s.can_recv() && s.can_send() {
                let room = s.send_capacity() - s.send_queue();
                let n = match s.recv_slice(&mut buf[..room.min(2048)]) {
                    Ok(n) if n > 0 => n,
                    _ => break,
                };
                let _ = s.send_slice(&buf[..n]);
                self.stats.tcp_bytes += n as u64;
                moved = true;
            }
            if s.state() == tcp::State::CloseWait && s.send_queue() == 0 {
                s.close();
            }
        }
        let u = self.sockets.get_mut::<udp::Socket<'_>>(self.udp);
        while u.can_send() {
            let Ok((n, meta)) = u.recv_slice(&mut buf) else {
                break;
            };
            let _ = u.send_slice(&buf[..n], meta.endpoint);
            self.stats.udp_packets += 1;
            moved = true;
        }
        moved
    }
}

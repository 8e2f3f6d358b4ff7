//! The self-announce after a restore or migration: the frames (RARP for the MAC, gratuitous ARP
//! when the guest's IPv4 address is known) and the schedule they go out on. Pure: no I/O, no clock.

#![deny(clippy::disallowed_methods)]
use std::net::Ipv4Addr;
use std::time::Duration;

/// Ethernet frames are padded to this length (without the FCS).
pub const MIN_FRAME: usize = 60;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_RARP: u16 = 0x8035;
const BROADCAST: [u8; 6] = [0xff; 6];

/// When the announce frames go out, as offsets from the resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceSchedule {
    /// Offsets from the first round, non-decreasing.
    pub offsets: Vec<Duration>,
}

impl Default for AnnounceSchedule {
    /// QEMU's default rounds: 0, 50, 200, 450 and 800 ms.
    fn default() -> Self {
        AnnounceSchedule::from_millis(&[0, 50, 200, 450, 800])
    }
}

impl AnnounceSchedule {
    /// A schedule from offsets in milliseconds (sorted here).
    pub fn from_millis(ms: &[u64]) -> Self {
        let mut offsets: Vec<Duration> = ms.iter().map(|m| Duration::from_millis(*m)).collect();
        offsets.sort();
        AnnounceSchedule { offsets }
    }

    /// No announce at all.
    pub fn disabled() -> Self {
        AnnounceSchedule { offsets: vec![] }
    }

    /// Splits off the rounds due at once (offset 0): how many there are, and the schedule of the
    /// rest (offsets unchanged). The resume sends the first on its own thread before the guest
    /// runs, since a new thread can take milliseconds to start on a loaded host and every frame the
    /// network still sends to the old host meanwhile is lost.
    pub fn split_now(&self) -> (usize, AnnounceSchedule) {
        let now = self.offsets.iter().take_while(|o| o.is_zero()).count();
        let later = AnnounceSchedule {
            offsets: self.offsets[now..].to_vec(),
        };
        (now, later)
    }

    /// Parses `0,50,200,450,800` (milliseconds) or `off`.
    pub fn parse(s: &str) -> Option<Self> {
        if s == "off" || s == "none" {
            return Some(Self::disabled());
        }
        let ms: Option<Vec<u64>> = s.split(',').map(|p| p.trim().parse().ok()).collect();
        ms.filter(|v| !v.is_empty() && v.len() <= 64 && v.iter().all(|m| *m <= 60_000))
            .map(|v| Self::from_millis(&v))
    }
}

fn eth_header(frame: &mut Vec<u8>, src: [u8; 6], ethertype: u16) {
    frame.extend_from_slice(&BROADCAST);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
}

fn arp_body(frame: &mut Vec<u8>, op: u16, sha: [u8; 6], spa: [u8; 4], tha: [u8; 6], tpa: [u8; 4]) {
    frame.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    frame.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    frame.push(6);
    frame.push(4);
    frame.extend_from_slice(&op.to_be_bytes());
    frame.extend_from_slice(&sha);
    frame.extend_from_slice(&spa);
    frame.extend_from_slice(&tha);
    frame.extend_from_slice(&tpa);
}

/// A RARP "reverse request" for `mac`, broadcast from `mac` (what QEMU sends): every switch on
/// the way learns the MAC's new port.
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME);
    eth_header(&mut f, mac, ETHERTYPE_RARP);
    arp_body(&mut f, 3, mac, [0; 4], mac, [0; 4]);
    f.resize(MIN_FRAME, 0);
    f
}

/// A gratuitous ARP request for `ip` at `mac`: switches learn the port, neighbours refresh
/// their ARP caches.
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME);
    eth_header(&mut f, mac, ETHERTYPE_ARP);
    arp_body(&mut f, 1, mac, ip.octets(), [0; 6], ip.octets());
    f.resize(MIN_FRAME, 0);
    f
}

/// The frames of one round for a NIC.
pub fn round_frames(mac: [u8; 6], ip: Option<Ipv4Addr>) -> Vec<Vec<u8>> {
    let mut v = vec![rarp_frame(mac)];
    if let Some(ip) = ip {
        v.push(garp_frame(mac, ip));
    }
    v
}

/// The IPv4 address `mac` uses, if `frame` (sent by the guest) shows it: the sender of an ARP
/// packet or the source of an IPv4 packet, from that MAC.
pub fn snoop_ipv4(mac: [u8; 6], frame: &[u8]) -> Option<Ipv4Addr> {
    if frame.len() < 14 || frame[6..12] != mac {
        return None;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let ip = match ethertype {
        ETHERTYPE_ARP if frame.len() >= 14 + 28 && frame[22..28] == mac => {
            [frame[28], frame[29], frame[30], frame[31]]
        }
        0x0800 if frame.len() >= 14 + 20 && frame[14] >> 4 == 4 => {
            [frame[26], frame[27], frame[28], frame[29]]
        }
        _ => return None,
    };
    let ip = Ipv4Addr::from(ip);
    (!ip.is_unspecified() && !ip.is_broadcast() && !ip.is_multicast()).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn rarp_frame_bytes() {
        let f = rarp_frame(MAC);
        let mut want = vec![
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // dst broadcast
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // src
            0x80, 0x35, // RARP
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, // Ethernet/IPv4, 6/4
            0x00, 0x03, // reverse request
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, // sender
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, // target
        ];
        want.resize(60, 0);
        assert_eq!(f, want);
    }

    #[test]
    fn garp_frame_bytes() {
        let f = garp_frame(MAC, Ipv4Addr::new(10, 77, 0, 2));
        let mut want = vec![
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x08, 0x06,
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, // request
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 10, 77, 0, 2, // sender
            0, 0, 0, 0, 0, 0, 10, 77, 0, 2, // target: the same address
        ];
        want.resize(60, 0);
        assert_eq!(f, want);
        assert_eq!(round_frames(MAC, None).len(), 1);
        assert_eq!(round_frames(MAC, Some(Ipv4Addr::LOCALHOST)).len(), 2);
    }

    #[test]
    fn the_default_schedule_is_qemus() {
        let s = AnnounceSchedule::default();
        let ms: Vec<u128> = s.offsets.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [0, 50, 200, 450, 800]);
        assert_eq!(AnnounceSchedule::parse("0,50,200,450,800"), Some(s));
        assert_eq!(AnnounceSchedule::parse("off").unwrap().offsets.len(), 0);
        assert_eq!(AnnounceSchedule::parse("5,x"), None);
        assert_eq!(AnnounceSchedule::parse(""), None);
    }

    #[test]
    fn the_rounds_due_at_once_are_split_off() {
        let (now, later) = AnnounceSchedule::default().split_now();
        assert_eq!(now, 1);
        assert_eq!(later, AnnounceSchedule::from_millis(&[50, 200, 450, 800]));
        let (now, later) = AnnounceSchedule::from_millis(&[0, 0, 30]).split_now();
        assert_eq!((now, later.offsets.len()), (2, 1));
        let (now, later) = AnnounceSchedule::from_millis(&[10, 20]).split_now();
        assert_eq!((now, later.offsets.len()), (0, 2));
        assert_eq!(AnnounceSchedule::disabled().split_now().0, 0);
    }

    #[test]
    fn the_guest_address_is_learnt_from_its_own_arp_and_ip_frames() {
        let garp = garp_frame(MAC, Ipv4Addr::new(10, 77, 0, 2));
        assert_eq!(snoop_ipv4(MAC, &garp), Some(Ipv4Addr::new(10, 77, 0, 2)));
        let other = [1, 2, 3, 4, 5, 6];
        assert_eq!(snoop_ipv4(other, &garp), None, "another MAC's frame");
        let mut ip = vec![0u8; 34];
        ip[..6].copy_from_slice(&[0xff; 6]);
        ip[6..12].copy_from_slice(&MAC);
        ip[12..14].copy_from_slice(&[0x08, 0x00]);
        ip[14] = 0x45;
        ip[26..30].copy_from_slice(&[10, 77, 0, 9]);
        assert_eq!(snoop_ipv4(MAC, &ip), Some(Ipv4Addr::new(10, 77, 0, 9)));
        assert_eq!(snoop_ipv4(MAC, &ip[..20]), None, "short");
        assert_eq!(snoop_ipv4(MAC, &rarp_frame(MAC)), None);
    }
}

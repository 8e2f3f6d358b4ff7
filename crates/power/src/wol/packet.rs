//! Wake-on-LAN magic packets: the MAC address, the packet (6 × 0xFF, then the MAC 16 times) and
//! the receiver's parser, which finds a magic packet anywhere in a datagram (after a header, before
//! a SecureOn password) and never reads past it. Pure.
#![deny(clippy::disallowed_methods)]

use std::fmt;
use std::str::FromStr;

/// The length of the sync stream (0xFF bytes).
pub const SYNC_LEN: usize = 6;
/// How often the MAC repeats.
pub const REPEATS: usize = 16;
/// The length of a magic packet.
pub const MAGIC_LEN: usize = SYNC_LEN + REPEATS * 6;
/// The UDP port magic packets go to by default (discard).
pub const DEFAULT_PORT: u16 = 9;
/// The largest datagram the parser looks at; longer ones are refused.
pub const MAX_DATAGRAM: usize = 1500;

/// A 48-bit Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Why a MAC address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Invalid MAC address {input:?}: {reason} (expected six hex byte pairs such as 52:54:00:12:34:56, '-' or ':' between them, or none)"
)]
pub struct ParseMacError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseMacError {
            input: s.to_string(),
            reason,
        };
        let parts: Vec<&str> = if s.contains(':') {
            s.split(':').collect()
        } else if s.contains('-') {
            s.split('-').collect()
        } else if s.len() == 12 && s.is_ascii() {
            (0..6).map(|i| &s[2 * i..2 * i + 2]).collect()
        } else {
            return Err(err("not six byte pairs"));
        };
        if parts.len() != 6 {
            return Err(err("not six byte pairs"));
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(&parts) {
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(err("a byte is not two hex digits"));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| err("a byte is not two hex digits"))?;
        }
        if mac == [0; 6] || mac == [0xff; 6] {
            return Err(err("all-zero and broadcast addresses name no host"));
        }
        if mac[0] & 1 == 1 {
            return Err(err("a multicast address names no host"));
        }
        Ok(MacAddr(mac))
    }
}

/// The magic packet that wakes `mac`.
pub fn magic_packet(mac: MacAddr) -> [u8; MAGIC_LEN] {
    let mut p = [0xffu8; MAGIC_LEN];
    for chunk in p[SYNC_LEN..].chunks_exact_mut(6) {
        chunk.copy_from_slice(&mac.0);
    }
    p
}

/// Why a datagram is not a magic packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseMagicError {
    /// Too short to hold one.
    #[error("{len} bytes cannot hold a magic packet ({MAGIC_LEN} bytes)")]
    TooShort {
        /// The datagram's length.
        len: usize,
    },
    /// Longer than any Ethernet frame's payload.
    #[error("a {len}-byte datagram is longer than {MAX_DATAGRAM} bytes")]
    TooLong {
        /// The datagram's length.
        len: usize,
    },
    /// No sync stream followed by 16 copies of one MAC.
    #[error("no sync stream (6 x 0xff) followed by 16 copies of one MAC address")]
    NotMagic,
}

/// The MAC a datagram wakes: the first place where six 0xFF bytes are followed by sixteen copies
/// of one address (bytes before it are a header, bytes after it a password).
pub fn parse_magic_packet(datagram: &[u8]) -> Result<MacAddr, ParseMagicError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(ParseMagicError::TooLong {
            len: datagram.len(),
        });
    }
    if datagram.len() < MAGIC_LEN {
        return Err(ParseMagicError::TooShort {
            len: datagram.len(),
        });
    }
    for start in 0..=datagram.len() - MAGIC_LEN {
        let candidate = &datagram[start..start + MAGIC_LEN];
        if candidate[..SYNC_LEN].iter().any(|&b| b != 0xff) {
            continue;
        }
        let first = &candidate[SYNC_LEN..SYNC_LEN + 6];
        if candidate[SYNC_LEN..]
            .chunks_exact(6)
            .all(|chunk| chunk == first)
        {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(first);
            return Ok(MacAddr(mac));
        }
    }
    Err(ParseMagicError::NotMagic)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    #[test]
    fn the_packet_is_sync_then_sixteen_copies() {
        let p = magic_packet(MAC);
        assert_eq!(p.len(), 102);
        assert_eq!(&p[..6], &[0xff; 6]);
        for i in 0..16 {
            assert_eq!(&p[6 + 6 * i..12 + 6 * i], &MAC.0, "copy {i}");
        }
    }

    #[test]
    fn a_packet_parses_back_to_its_mac() {
        assert_eq!(parse_magic_packet(&magic_packet(MAC)), Ok(MAC));
    }

    #[test]
    fn a_header_before_and_a_password_after_are_skipped() {
        let mut d = vec![0x00, 0xff, 0xff, 0x12];
        d.extend_from_slice(&magic_packet(MAC));
        d.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(parse_magic_packet(&d), Ok(MAC));
    }

    #[test]
    fn a_mac_starting_with_ff_bytes_is_still_found() {
        // A sync stream of 7 0xff bytes: the first window's "MAC" would be ff:52:…, wrong.
        let mac = MacAddr([0x02, 0xff, 0xff, 0x00, 0x00, 0x01]);
        let mut d = vec![0xff];
        d.extend_from_slice(&magic_packet(mac));
        assert_eq!(parse_magic_packet(&d), Ok(mac));
    }

    #[test]
    fn broken_packets_are_refused() {
        assert_eq!(
            parse_magic_packet(&[0xff; 50]),
            Err(ParseMagicError::TooShort { len: 50 })
        );
        let mut p = magic_packet(MAC);
        p[60] ^= 1;
        assert_eq!(parse_magic_packet(&p), Err(ParseMagicError::NotMagic));
        let mut p = magic_packet(MAC);
        p[2] = 0;
        assert_eq!(parse_magic_packet(&p), Err(ParseMagicError::NotMagic));
        assert_eq!(
            parse_magic_packet(&[0xff; 1501]),
            Err(ParseMagicError::TooLong { len: 1501 })
        );
    }

    #[test]
    fn every_datagram_prefix_parses_without_panicking() {
        let mut d = vec![7u8; 20];
        d.extend_from_slice(&magic_packet(MAC));
        for n in 0..=d.len() {
            let r = parse_magic_packet(&d[..n]);
            assert_eq!(r.is_ok(), n == d.len(), "prefix of {n} bytes");
        }
    }

    #[test]
    fn mac_addresses_parse_in_the_usual_spellings() {
        for s in [
            "52:54:00:12:34:56",
            "52-54-00-12-34-56",
            "525400123456",
            "52:54:00:12:34:56".to_uppercase().as_str(),
        ] {
            assert_eq!(s.parse::<MacAddr>(), Ok(MAC), "{s}");
        }
        assert_eq!(MAC.to_string(), "52:54:00:12:34:56");
    }

    #[test]
    fn bad_mac_addresses_are_refused_naming_the_input() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5g",
            "52:54:0:12:34:56",
            "00:00:00:00:00:00",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "ééééééé",
        ] {
            let e = bad.parse::<MacAddr>().unwrap_err();
            assert_eq!(e.input, bad);
            assert!(e.to_string().contains("six hex byte pairs"), "{e}");
        }
    }
}

//! A Linux tap interface as the backend of a virtio-net device: frames in and out, one per
//! `read`/`write`, without a packet-information or virtio-net header (IFF_TAP | IFF_NO_PI).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};

/// Where a virtio-net device sends its guest's frames and reads the frames for its guest.
pub trait NetBackend: Send + std::fmt::Debug {
    /// Sends one Ethernet frame.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
    /// Reads one frame into `buf`, returning its length; `WouldBlock` when none waits.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// A file descriptor that polls readable when a frame waits (None: nothing to poll).
    fn poll_fd(&self) -> Option<RawFd>;
}

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("tap name {0:?} must be 1 to 15 bytes without '/', ' ' or NUL")]
    BadName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun (needs root or CAP_NET_ADMIN and the tun module)")]
    OpenTun(#[source] std::io::Error),
    /// TUNSETIFF failed.
    #[error(
        "cannot create or attach tap {name} (TUNSETIFF; an existing interface of another kind has that name?)"
    )]
    SetIff {
        /// The name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The tap could not be added to the bridge.
    #[error(
        "cannot add tap {name} to bridge {bridge} (does the bridge exist in this network namespace?)"
    )]
    Bridge {
        /// The tap.
        name: String,
        /// The bridge.
        bridge: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The interface could not be brought up.
    #[error("cannot bring tap {name} up")]
    Up {
        /// The name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

const IFF_UP: libc::c_short = 0x1;
const IFF_TAP: libc::c_short = 0x2;
const IFF_NO_PI: libc::c_short = 0x1000;
// _IOW('T', 202, int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    /// ifr_flags, or the start of ifr_ifindex (an int) for the index ioctls.
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(name: &str) -> IfReq {
    let mut r = IfReq {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    r
}

/// Checks an interface name: 1–15 bytes, no '/', whitespace or NUL.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
}

/// An open tap interface (non-blocking).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens the tap `name` in the calling thread's network namespace, creating it if missing,
    /// and brings it up.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !valid_ifname(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = ifreq(name);
        req.flags = IFF_TAP | IFF_NO_PI;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq` lays out (40 bytes);
        // the fd is the tun device we just opened.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if rc < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: F_GETFL/F_SETFL on an fd we own.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        set_up(name).map_err(|source| TapError::Up {
            name: name.to_string(),
            source,
        })?;
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes the tap a port of `bridge` (in the same network namespace), as `ip link set TAP
    /// master BRIDGE` does. Already a port of it: nothing to do.
    pub fn attach_to_bridge(&self, bridge: &str) -> Result<(), TapError> {
        let err = |source| TapError::Bridge {
            name: self.name.clone(),
            bridge: bridge.to_string(),
            source,
        };
        if !valid_ifname(bridge) {
            return Err(err(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
        }
        let master = std::fs::read_link(format!("/sys/class/net/{}/master", self.name)).ok();
        if master.is_some_and(|m| m.file_name().is_some_and(|f| f == bridge)) {
            return Ok(());
        }
        // SAFETY: a plain socket call; the fd is closed below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        let mut req = ifreq(&self.name);
        // SAFETY: SIOCGIFINDEX fills the ifindex (an int at the flags' offset) of one ifreq;
        // SIOCBRADDIF reads one ifreq (the bridge's name, the port's ifindex); the socket is ours.
        let res = unsafe {
            if libc::ioctl(sock, libc::SIOCGIFINDEX as _, &mut req) < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                let index = std::ptr::addr_of!(req.flags)
                    .cast::<libc::c_int>()
                    .read_unaligned();
                let mut br = ifreq(bridge);
                std::ptr::addr_of_mut!(br.flags)
                    .cast::<libc::c_int>()
                    .write_unaligned(index);
                if libc::ioctl(sock, SIOCBRADDIF as _, &mut br) < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            }
        };
        // SAFETY: closing the socket opened above.
        unsafe { libc::close(sock) };
        res.map_err(err)?;
        // The bridge learns of the tap's carrier asynchronously; frames sent before its port
        // forwards are dropped. Wait a little for it (3 = BR_STATE_FORWARDING).
        let state = format!("/sys/class/net/{}/brport/state", self.name);
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(1) {
            if std::fs::read_to_string(&state).is_ok_and(|s| s.trim() == "3") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }
}

const SIOCBRADDIF: libc::c_ulong = 0x89a2;

fn set_up(name: &str) -> std::io::Result<()> {
    // SAFETY: a plain socket call; the fd is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read/write one `struct ifreq` on a socket we own.
    let res = unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            req.flags |= IFF_UP;
            if libc::ioctl(sock, libc::SIOCSIFFLAGS as _, &mut req) < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(sock) };
    res
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write(frame).map(|_| ())
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(valid_ifname("tap0"));
        assert!(valid_ifname("abcdefghijklmno"));
        assert!(!valid_ifname("abcdefghijklmnop"));
        assert!(!valid_ifname(""));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname("a b"));
        assert!(matches!(Tap::open("bad/name"), Err(TapError::BadName(_))));
    }

    #[test]
    fn ifreq_is_the_kernels_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}

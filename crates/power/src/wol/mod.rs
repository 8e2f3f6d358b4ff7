//! The Wake-on-LAN driver: a magic packet ([`packet`]) sent as a UDP broadcast, from inside a
//! network namespace and out of a given interface if asked; and the receiving side, a listener
//! that test harnesses run in a host's namespace to see the packet and "wake" that host.

pub mod packet;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tern_netlab::ns::{NamespaceError, in_namespace};

use crate::{
    DriverKind, OffMode, OffOutcome, PowerDriver, PowerOffError, PowerOnError, PowerStatus,
    StatusError,
};
pub use packet::{MacAddr, ParseMacError, ParseMagicError};

/// Why a magic packet could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendWolError {
    /// The namespace could not be entered.
    #[error("cannot send from inside the network namespace")]
    Namespace(#[source] NamespaceError),
    /// The socket could not be opened or set up.
    #[error("cannot open a broadcast UDP socket")]
    Socket(#[source] std::io::Error),
    /// The socket could not be tied to the interface.
    #[error("cannot send out of interface {interface} (does it exist in that namespace?)")]
    Interface {
        /// The interface.
        interface: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The packet could not be sent.
    #[error("sending failed")]
    Send(#[source] std::io::Error),
    /// Only part of the packet went out.
    #[error("only {sent} of {} bytes were sent", packet::MAGIC_LEN)]
    Short {
        /// Bytes sent.
        sent: usize,
    },
}

/// Where and how a magic packet goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WolConfig {
    /// The host's name (for messages).
    pub host: String,
    /// The MAC address to wake.
    pub mac: MacAddr,
    /// Where the packet goes (default 255.255.255.255:9); a subnet's broadcast address reaches
    /// that subnet only.
    pub target: SocketAddrV4,
    /// Send from inside this network namespace.
    pub netns: Option<String>,
    /// Send out of this interface (`SO_BINDTODEVICE`).
    pub interface: Option<String>,
}

impl WolConfig {
    /// To the limited broadcast address, port 9, from this namespace.
    pub fn new(host: impl Into<String>, mac: MacAddr) -> Self {
        WolConfig {
            host: host.into(),
            mac,
            target: SocketAddrV4::new(Ipv4Addr::BROADCAST, packet::DEFAULT_PORT),
            netns: None,
            interface: None,
        }
    }
}

/// Wakes a host with a magic packet; cannot power off or read the status.
#[derive(Debug, Clone)]
pub struct WolDriver {
    config: WolConfig,
}

impl WolDriver {
    /// A driver for `config`; nothing is sent yet.
    pub fn new(config: WolConfig) -> Self {
        WolDriver { config }
    }

    /// Its configuration.
    pub fn config(&self) -> &WolConfig {
        &self.config
    }

    /// Sends one magic packet.
    pub fn send(&self) -> Result<(), SendWolError> {
        let c = self.config.clone();
        match &self.config.netns {
            Some(ns) => in_namespace(ns, move || send_here(&c)).map_err(SendWolError::Namespace)?,
            None => send_here(&c),
        }
    }
}

fn send_here(c: &WolConfig) -> Result<(), SendWolError> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
        .map_err(SendWolError::Socket)?;
    socket.set_broadcast(true).map_err(SendWolError::Socket)?;
    if let Some(interface) = &c.interface {
        let name = std::ffi::OsString::from(interface);
        nix::sys::socket::setsockopt(
            &socket.as_fd(),
            nix::sys::socket::sockopt::BindToDevice,
            &name,
        )
        .map_err(|e| SendWolError::Interface {
            interface: interface.clone(),
            source: e.into(),
        })?;
    }
    let p = packet::magic_packet(c.mac);
    let sent = socket.send_to(&p, c.target).map_err(SendWolError::Send)?;
    if sent != p.len() {
        return Err(SendWolError::Short { sent });
    }
    Ok(())
}

impl PowerDriver for WolDriver {
    fn host(&self) -> &str {
        &self.config.host
    }

    fn kind(&self) -> DriverKind {
        DriverKind::WakeOnLan
    }

    fn power_on(&self) -> Result<(), PowerOnError> {
        self.send().map_err(|cause| PowerOnError::WakeOnLan {
            host: self.config.host.clone(),
            mac: self.config.mac.to_string(),
            target: self.config.target.to_string(),
            cause,
        })
    }

    fn power_off(&self, _mode: OffMode) -> Result<OffOutcome, PowerOffError> {
        Err(PowerOffError::Unsupported {
            host: self.config.host.clone(),
            driver: DriverKind::WakeOnLan,
        })
    }

    fn status(&self) -> Result<PowerStatus, StatusError> {
        Err(StatusError::Unsupported {
            host: self.config.host.clone(),
            driver: DriverKind::WakeOnLan,
        })
    }
}

/// Why a listener could not be set up or could not receive.
#[derive(Debug, thiserror::Error)]
pub enum ListenWolError {
    /// The namespace could not be entered.
    #[error("cannot listen inside the network namespace")]
    Namespace(#[source] NamespaceError),
    /// The socket could not be bound.
    #[error("cannot listen for magic packets on UDP {addr}")]
    Bind {
        /// The address.
        addr: SocketAddrV4,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Receiving failed.
    #[error("receiving failed")]
    Recv(#[source] std::io::Error),
}

/// A magic packet a listener saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    /// The MAC it wakes.
    pub mac: MacAddr,
    /// Who sent it.
    pub from: SocketAddr,
}

/// The receiving side of Wake-on-LAN: a UDP socket (in a namespace if asked) that reports the
/// magic packets it sees and ignores every other datagram.
#[derive(Debug)]
pub struct WolListener {
    socket: UdpSocket,
}

impl WolListener {
    /// Listens on `addr` (e.g. 0.0.0.0:9, which also receives broadcasts), inside `netns` if given.
    pub fn bind(netns: Option<&str>, addr: SocketAddrV4) -> Result<Self, ListenWolError> {
        let bind =
            move || UdpSocket::bind(addr).map_err(|source| ListenWolError::Bind { addr, source });
        let socket = match netns {
            Some(ns) => in_namespace(ns, bind).map_err(ListenWolError::Namespace)??,
            None => bind()?,
        };
        Ok(WolListener { socket })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, ListenWolError> {
        self.socket.local_addr().map_err(ListenWolError::Recv)
    }

    /// The next magic packet within `timeout`, or `None` if none came; other datagrams are skipped.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Wake>, ListenWolError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; packet::MAX_DATAGRAM + 1];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.socket
                .set_read_timeout(Some(left))
                .map_err(ListenWolError::Recv)?;
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Ok(mac) = packet::parse_magic_packet(&buf[..n]) {
                        return Ok(Some(Wake { mac, from }));
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ListenWolError::Recv(e)),
            }
        }
    }
}

/// A listener on its own thread that calls `on_wake` for every magic packet naming its MAC: a
/// test host's Wake-on-LAN circuit, which keeps listening in the host's namespace while the host
/// is off (the socket belongs to this process, not to the host's). Dropping it stops the thread.
#[derive(Debug)]
pub struct WakeWatcher {
    mac: MacAddr,
    stop: Arc<AtomicBool>,
    wakes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl WakeWatcher {
    /// Watches `listener` for magic packets naming `mac`; packets for other MACs are skipped.
    pub fn spawn(
        listener: WolListener,
        mac: MacAddr,
        mut on_wake: impl FnMut(Wake) + Send + 'static,
    ) -> WakeWatcher {
        let stop = Arc::new(AtomicBool::new(false));
        let wakes = Arc::new(AtomicU64::new(0));
        let (stop2, wakes2) = (stop.clone(), wakes.clone());
        let thread = std::thread::Builder::new()
            .name(format!("wol-{mac}"))
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.recv_timeout(Duration::from_millis(100)) {
                        Ok(Some(w)) if w.mac == mac => {
                            wakes2.fetch_add(1, Ordering::Relaxed);
                            on_wake(w);
                        }
                        Ok(_) => {}
                        // A broken socket: nothing more will arrive.
                        Err(_) => break,
                    }
                }
            })
            .ok();
        WakeWatcher {
            mac,
            stop,
            wakes,
            thread,
        }
    }

    /// The MAC it wakes for.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// How many magic packets for its MAC it has seen.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }
}

impl Drop for WakeWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

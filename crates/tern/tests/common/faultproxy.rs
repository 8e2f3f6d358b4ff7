//! A frame-aware TCP proxy for migration fault tests. It sits between a source and a target
//! (the source migrates to the proxy's port), forwards every stream frame by frame (16-byte
//! header: `TRNM`, format, kind, flags, len u32, crc32c u32, then `len` bytes), and when the
//! first frame that marks the chosen [`Phase`] arrives it runs the test's fault *before* it
//! forwards that frame. The fault's [`Disposition`] says what becomes of the frame: forwarded,
//! forwarded with one byte flipped, or swallowed with every stream black-holed (nothing read,
//! nothing written, nothing closed: the peers see neither data nor a reset, as behind a dead
//! link).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// Where in a migration the fault strikes, by the frame that marks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The target's `Welcome` (kind 2), held back from the source: the hello was accepted, the
    /// data streams have not joined yet (the join window).
    Handshake,
    /// The first `RoundEnd` of round 0 (kind 13) on a data stream: mid pre-copy, VM running.
    PreCopy,
    /// The first `DataEnd` (kind 6): the source is paused, the last pages are on their way.
    StopAndCopy,
    /// `Commit` (kind 9): the source has written it and waits for the answer.
    Commit,
    /// The target's `Running` (kind 10), held back from the source: the VM runs on the target.
    AfterCommit,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Handshake,
        Phase::PreCopy,
        Phase::StopAndCopy,
        Phase::Commit,
        Phase::AfterCommit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Handshake => "handshake",
            Phase::PreCopy => "pre-copy",
            Phase::StopAndCopy => "stop-and-copy",
            Phase::Commit => "commit",
            Phase::AfterCommit => "after-commit",
        }
    }

    fn marked_by(self, to_target: bool, kind: u8, payload: &[u8]) -> bool {
        match self {
            Phase::Handshake => !to_target && kind == 2,
            Phase::PreCopy => to_target && kind == 13 && payload.get(..4) == Some(&[0, 0, 0, 0]),
            Phase::StopAndCopy => to_target && kind == 6,
            Phase::Commit => to_target && kind == 9,
            Phase::AfterCommit => !to_target && kind == 10,
        }
    }
}

/// What the proxy does with the frame that marked the phase, once the fault ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Forward,
    /// Swallow it (it was lost: e.g. its sender died before it left), go on with the rest.
    Drop,
    /// Forward it with one byte flipped (the first payload byte, or the checksum if it has none).
    Corrupt,
    /// Swallow it and stop every stream, in both directions, without closing anything.
    BlackHole,
}

type Fault = Box<dyn FnOnce() -> Disposition + Send>;

/// What marks the moment the fault strikes: a phase, or any frame kind in one direction.
#[derive(Debug, Clone, Copy)]
enum Marker {
    Phase(Phase),
    Frame { to_target: bool, kind: u8 },
}

impl Marker {
    fn marked_by(self, to_target: bool, kind: u8, payload: &[u8]) -> bool {
        match self {
            Marker::Phase(p) => p.marked_by(to_target, kind, payload),
            Marker::Frame {
                to_target: t,
                kind: k,
            } => t == to_target && k == kind,
        }
    }
}

struct Shared {
    phase: Marker,
    fault: Mutex<Option<Fault>>,
    fired: AtomicBool,
    hole: AtomicBool,
    done: AtomicBool,
}

/// The running proxy; dropping it closes every stream.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:target_port`.
    pub fn start(
        target_port: u16,
        phase: Phase,
        fault: impl FnOnce() -> Disposition + Send + 'static,
    ) -> FaultProxy {
        Self::start_marked(target_port, Marker::Phase(phase), fault)
    }

    /// Like [`FaultProxy::start`], striking at the first frame of kind `kind` (the wire's kind
    /// byte) going to the target (`to_target`) or back, e.g. post-copy's first `PageRequest`
    /// (16, from the target).
    pub fn start_at_frame(
        target_port: u16,
        to_target: bool,
        kind: u8,
        fault: impl FnOnce() -> Disposition + Send + 'static,
    ) -> FaultProxy {
        Self::start_marked(target_port, Marker::Frame { to_target, kind }, fault)
    }

    fn start_marked(
        target_port: u16,
        phase: Marker,
        fault: impl FnOnce() -> Disposition + Send + 'static,
    ) -> FaultProxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared {
            phase,
            fault: Mutex::new(Some(Box::new(fault))),
            fired: AtomicBool::new(false),
            hole: AtomicBool::new(false),
            done: AtomicBool::new(false),
        });
        let sh = shared.clone();
        thread::spawn(move || {
            while !sh.done.load(Ordering::Relaxed) {
                let a = match l.accept() {
                    Ok((a, _)) => a,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = a.set_nonblocking(false);
                let Ok(b) = TcpStream::connect(("127.0.0.1", target_port)) else {
                    continue;
                };
                let _ = a.set_nodelay(true);
                let _ = b.set_nodelay(true);
                for (from, to, to_target) in [
                    (a.try_clone().unwrap(), b.try_clone().unwrap(), true),
                    (b, a, false),
                ] {
                    let sh = sh.clone();
                    thread::spawn(move || pump(from, to, to_target, &sh));
                }
            }
        });
        FaultProxy { port, shared }
    }

    /// Whether the phase was reached (and the fault ran).
    pub fn fired(&self) -> bool {
        self.shared.fired.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.done.store(true, Ordering::SeqCst);
    }
}

/// Blocks (reading nothing) until the proxy is dropped.
fn park(from: &TcpStream, to: &TcpStream, sh: &Shared) {
    while !sh.done.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(20));
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

fn pump(mut from: TcpStream, mut to: TcpStream, to_target: bool, sh: &Shared) {
    let mut hdr = [0u8; 16];
    loop {
        if sh.hole.load(Ordering::SeqCst) {
            return park(&from, &to, sh);
        }
        if from.read_exact(&mut hdr).is_err() || sh.done.load(Ordering::Relaxed) {
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
        let len = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        let framed = &hdr[..4] == b"TRNM" && len <= 64 << 20;
        let mut payload = vec![0u8; if framed { len } else { 0 }];
        if from.read_exact(&mut payload).is_err() {
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
        if sh.hole.load(Ordering::SeqCst) {
            return park(&from, &to, sh);
        }
        if framed
            && !sh.fired.load(Ordering::SeqCst)
            && sh.phase.marked_by(to_target, hdr[5], &payload)
        {
            let fault = sh.fault.lock().unwrap().take();
            if let Some(fault) = fault {
                sh.fired.store(true, Ordering::SeqCst);
                match fault() {
                    Disposition::Forward => {}
                    Disposition::Drop => continue,
                    Disposition::Corrupt => match payload.first_mut() {
                        Some(b) => *b ^= 0x5a,
                        None => hdr[12] ^= 0x5a,
                    },
                    Disposition::BlackHole => {
                        sh.hole.store(true, Ordering::SeqCst);
                        return park(&from, &to, sh);
                    }
                }
            }
        }
        if to.write_all(&hdr).is_err() || to.write_all(&payload).is_err() {
            let _ = from.shutdown(Shutdown::Both);
            return;
        }
    }
}

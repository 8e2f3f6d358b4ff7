//! The target's I/O shell: accept the control and data streams, decode frames on one thread
//! per stream, hand every frame to the [`Receiver`] machine and carry out its step (apply
//! pages, acknowledge a round, verify, restore, resume, answer); discard on any failure.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::MemoryLayout;
pub use crate::machine::receiver::StreamName;
use crate::machine::receiver::{
    CommitWork, Failure, ProtocolViolation, Receiver, SOURCE_REASON_GRACE, Step,
};
use crate::tcp::common::{CancelToken, error_chain};
use crate::vm::{MigrationTarget, VmError};
use crate::wire::{Frame, MemoryDigest, ReadFrameError, TargetTimings, read_frame};

/// Options of an incoming migration.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// How long to wait for the source to connect at all. `None`: forever (until cancelled).
    pub accept_timeout: Option<Duration>,
    /// Time allowed for the hello and for every data stream to join. Default 10 s.
    pub handshake_timeout: Duration,
    /// With no frame on any stream for this long, the migration fails. Default 30 s.
    pub idle_timeout: Duration,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            accept_timeout: None,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Figures of an incoming migration that completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveReport {
    /// Data pages written.
    pub pages_written: u64,
    /// Pages zeroed because they became zero on the source.
    pub pages_zeroed: u64,
    /// Page frames received.
    pub frames: u64,
    /// Hello → running sent, ms.
    pub total_ms: u64,
    /// Commit received → running sent (verify, restore, resume), ms.
    pub commit_ms: u64,
}

/// Why an incoming migration did not complete. In every case the target discarded the VM.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// No source connected in time, or accepting failed.
    #[error("No migration source connected")]
    Accept(#[source] std::io::Error),
    /// A stream failed or closed early.
    #[error("Stream {stream} failed")]
    Stream {
        /// `None` for the control stream, else the data stream's index.
        stream: StreamName,
        /// Cause.
        #[source]
        source: ReadFrameError,
    },
    /// The refusal sent to the source.
    #[error("Refused the migration: {0}")]
    Refused(String),
    /// The source broke the protocol (or the frame sequence was damaged).
    #[error(transparent)]
    Protocol(#[from] ProtocolViolation),
    /// The source aborted.
    #[error("Source aborted the migration: {0}")]
    Aborted(String),
    /// The memory digest did not match what was loaded.
    #[error("Memory verification failed: chunk {chunk} differs")]
    VerifyMismatch {
        /// First differing chunk.
        chunk: usize,
    },
    /// The VM side failed.
    #[error("Target VM error during {0}")]
    Target(&'static str, #[source] VmError),
    /// Nothing arrived for too long.
    #[error("No frame from the source for {0:?}")]
    Idle(Duration),
    /// Cancelled on the target.
    #[error("Migration cancelled on the target")]
    Cancelled,
    /// Writing to the source failed.
    #[error("Writing to the source failed")]
    Write(#[source] std::io::Error),
}

enum Event {
    /// A frame and when its reader had it whole.
    Frame(StreamName, Frame, Instant),
    Error(StreamName, ReadFrameError),
}

struct Incoming<'a, T: MigrationTarget + ?Sized> {
    target: &'a mut T,
    opts: &'a ReceiveOptions,
    cancel: &'a CancelToken,
    machine: Receiver,
    control: Option<TcpStream>,
    sockets: Vec<TcpStream>,
    start: Instant,
    report: ReceiveReport,
}

impl ReceiveError {
    /// How the machine should read this error.
    fn failure(&self) -> Failure {
        match self {
            ReceiveError::Aborted(_) => Failure::SourceGone,
            ReceiveError::Refused(_) => Failure::Refused,
            ReceiveError::Accept(_)
            | ReceiveError::Stream { .. }
            | ReceiveError::Protocol(_)
            | ReceiveError::VerifyMismatch { .. }
            | ReceiveError::Target(..)
            | ReceiveError::Idle(_)
            | ReceiveError::Cancelled
            | ReceiveError::Write(_) => Failure::Other,
        }
    }
}

/// Receives one migration on `listener` into `target`.
///
/// Returns once the VM runs on the target and "running" was sent; on any error the target
/// was discarded and the source told (when still reachable).
pub fn receive<T: MigrationTarget + ?Sized>(
    listener: &TcpListener,
    target: &mut T,
    opts: &ReceiveOptions,
    cancel: &CancelToken,
) -> Result<ReceiveReport, ReceiveError> {
    let mut run = Incoming {
        target,
        opts,
        cancel,
        machine: Receiver::new(),
        control: None,
        sockets: Vec::new(),
        start: Instant::now(),
        report: ReceiveReport {
            pages_written: 0,
            pages_zeroed: 0,
            frames: 0,
            total_ms: 0,
            commit_ms: 0,
        },
    };
    let result = run.execute(listener);
    if let Err(e) = &result {
        let cleanup = run.machine.failed(e.failure());
        if cleanup.discard {
            run.target.discard();
        }
        if cleanup.tell_source
            && let Some(c) = run.control.as_mut()
        {
            let reason = error_chain(e);
            let _ = c.write_all(&Frame::Failed { reason }.encode());
        }
    }
    for s in run.sockets.iter().chain(run.control.iter()) {
        let _ = s.shutdown(Shutdown::Both);
    }
    result.map(|()| run.report)
}

fn accept(
    listener: &TcpListener,
    deadline: Option<Instant>,
    cancel: &CancelToken,
) -> Result<TcpStream, ReceiveError> {
    listener
        .set_nonblocking(true)
        .map_err(ReceiveError::Accept)?;
    let r = loop {
        match listener.accept() {
            Ok((s, _)) => break Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if cancel.is_cancelled() {
                    break Err(ReceiveError::Cancelled);
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break Err(ReceiveError::Accept(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "timed out waiting for a connection",
                    )));
                }
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(ReceiveError::Accept(e)),
        }
    };
    let _ = listener.set_nonblocking(false);
    let s = r?;
    s.set_nonblocking(false).map_err(ReceiveError::Accept)?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

fn spawn_reader(
    mut socket: TcpStream,
    name: StreamName,
    layout: Option<MemoryLayout>,
    tx: SyncSender<Event>,
) {
    let _ = thread::Builder::new()
        .name(format!("migrate-rx-{name}"))
        .spawn(move || {
            crate::thread_start::run();
            loop {
                match read_frame(&mut socket, layout.as_ref()) {
                    Ok(f) => {
                        let end = matches!(f, Frame::DataEnd { .. });
                        if tx.send(Event::Frame(name, f, Instant::now())).is_err() {
                            return;
                        }
                        if end {
                            // Nothing may follow on a data stream: any byte is an error.
                            match read_frame(&mut socket, layout.as_ref()) {
                                Err(ReadFrameError::Closed) => return,
                                Ok(f) => {
                                    let _ = tx.send(Event::Frame(name, f, Instant::now()));
                                    return;
                                }
                                Err(e) => {
                                    let _ = tx.send(Event::Error(name, e));
                                    return;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Event::Error(name, e));
                        return;
                    }
                }
            }
        });
}

impl<T: MigrationTarget + ?Sized> Incoming<'_, T> {
    fn send_control(&mut self, f: &Frame) -> Result<(), ReceiveError> {
        let c = self.control.as_mut().expect("control connected");
        c.write_all(&f.encode()).map_err(ReceiveError::Write)
    }

    fn execute(&mut self, listener: &TcpListener) -> Result<(), ReceiveError> {
        let deadline = self.opts.accept_timeout.map(|t| Instant::now() + t);
        let mut control = accept(listener, deadline, self.cancel)?;
        self.start = Instant::now();
        control
            .set_read_timeout(Some(self.opts.handshake_timeout))
            .map_err(ReceiveError::Write)?;
        self.control = Some(control.try_clone().map_err(ReceiveError::Write)?);
        let first = read_frame(&mut control, None).map_err(|source| ReceiveError::Stream {
            stream: StreamName::Control,
            source,
        })?;
        let version = match self.machine.control_opened(first)? {
            Ok(_) => {
                let described = self.machine.described().cloned().expect("hello accepted");
                let prepared = self.target.prepare(&described);
                self.machine.prepared(prepared)?
            }
            Err(refusal) => Err(refusal),
        };
        match version {
            Ok(version) => self.send_control(&Frame::Welcome { version })?,
            Err(refusal) => {
                let reason = refusal.to_string();
                let _ = self.send_control(&Frame::Refuse {
                    reason: reason.clone(),
                });
                return Err(ReceiveError::Refused(reason));
            }
        }
        let layout = self.machine.layout().cloned();
        let (tx, rx) = mpsc::sync_channel::<Event>(64);
        control
            .set_read_timeout(None)
            .map_err(ReceiveError::Write)?;
        spawn_reader(control, StreamName::Control, layout.clone(), tx.clone());

        // Data streams: each must open with its join.
        let join_deadline = Instant::now() + self.opts.handshake_timeout;
        while !self.machine.all_joined() {
            let mut s = accept(listener, Some(join_deadline), self.cancel)?;
            s.set_read_timeout(Some(self.opts.handshake_timeout))
                .map_err(ReceiveError::Write)?;
            let first = read_frame(&mut s, None).map_err(|source| ReceiveError::Stream {
                stream: StreamName::Control,
                source,
            })?;
            let stream = self.machine.data_opened(first)?;
            s.set_read_timeout(None).map_err(ReceiveError::Write)?;
            self.sockets
                .push(s.try_clone().map_err(ReceiveError::Write)?);
            spawn_reader(s, StreamName::Data(stream), layout.clone(), tx.clone());
        }
        drop(tx);

        let mut commit_at: Option<Instant> = None;
        let mut idle_since = Instant::now();
        while !self.machine.ready_to_commit() {
            if self.cancel.is_cancelled() && self.machine.cancellable() {
                return Err(ReceiveError::Cancelled);
            }
            let ev = match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => {
                    if idle_since.elapsed() >= self.opts.idle_timeout {
                        return Err(ReceiveError::Idle(self.opts.idle_timeout));
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ReceiveError::Aborted("all streams closed".into()));
                }
            };
            idle_since = Instant::now();
            let (stream, frame, read_at) = match ev {
                Event::Frame(stream, frame, read_at) => (stream, frame, read_at),
                Event::Error(stream, source) => {
                    // A source that gives up sends Abort on the control stream and then
                    // closes everything: give its reason a moment to arrive.
                    let grace = Instant::now() + SOURCE_REASON_GRACE;
                    while let Some(left) = grace.checked_duration_since(Instant::now()) {
                        match rx.recv_timeout(left) {
                            Ok(Event::Frame(StreamName::Control, Frame::Abort { reason }, _)) => {
                                return Err(ReceiveError::Aborted(reason));
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    return Err(ReceiveError::Stream { stream, source });
                }
            };
            let is_commit = matches!(frame, Frame::Commit);
            match self.machine.frame(stream, frame)? {
                Step::Apply(batch) => {
                    self.report.frames += 1;
                    for (gpa, data) in batch.iter() {
                        match data {
                            Some(d) => {
                                self.target
                                    .write_page(gpa, d)
                                    .map_err(|e| ReceiveError::Target("write_page", e))?;
                                self.report.pages_written += 1;
                            }
                            None => {
                                self.target
                                    .zero_page(gpa)
                                    .map_err(|e| ReceiveError::Target("zero_page", e))?;
                                self.report.pages_zeroed += 1;
                            }
                        }
                    }
                }
                Step::AckRound(round) => self.send_control(&Frame::RoundAck { round })?,
                Step::Wait => {}
                Step::Aborted(reason) => return Err(ReceiveError::Aborted(reason)),
            }
            if is_commit {
                commit_at = Some(read_at);
            }
        }

        // Commit: every stream ended; check, restore, resume.
        let commit_at = commit_at.unwrap_or_else(Instant::now);
        let since = |t: Instant| u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut timings = TargetTimings {
            data_us: since(commit_at),
            ..Default::default()
        };
        let CommitWork {
            state: (version, bytes),
            digest,
        } = self.machine.commit()?;
        if let Some(want) = digest {
            let layout = layout.expect("layout agreed");
            let got = MemoryDigest::of_memory(&layout, want.chunk_bytes, |gpa, buf| {
                self.target.read_pages(gpa, buf)
            })
            .map_err(|e| ReceiveError::Target("read_pages", e))?;
            if let Some(chunk) = want.first_difference(&got) {
                let _ = self.machine.committed(false);
                return Err(ReceiveError::VerifyMismatch { chunk });
            }
            timings.verify_us = since(commit_at) - timings.data_us;
        }
        if let Err(e) = self.target.restore_state(version, &bytes) {
            let _ = self.machine.committed(false);
            return Err(ReceiveError::Target("restore_state", e));
        }
        timings.restore_us = since(commit_at) - timings.data_us - timings.verify_us;
        if let Err(e) = self.target.resume() {
            let _ = self.machine.committed(false);
            return Err(ReceiveError::Target("resume", e));
        }
        timings.resume_us =
            since(commit_at) - timings.data_us - timings.verify_us - timings.restore_us;
        self.machine.committed(true)?;
        self.report.commit_ms = commit_at.elapsed().as_millis() as u64;
        self.report.total_ms = self.start.elapsed().as_millis() as u64;
        // The VM runs here now; if this write fails the source stays paused (in doubt), which
        // keeps exactly one copy running.
        let running = self.machine.running_frame(timings);
        let _ = self.send_control(&running);
        Ok(())
    }
}

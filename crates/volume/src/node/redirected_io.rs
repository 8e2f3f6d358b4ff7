//! The coordinator's I/O threads for one redirected connection ([`RedirectIo`], the
//! [`tern_nbd::Relay`] of a `NAME@NODE.EPOCH` export).
//!
//! ```text
//! node's relay ──NBD──▶ coordinator: reading thread ──queue──▶ I/O threads (≤ 16) ── pread/pwrite ──▶ LUN
//!              ◀─reply── coordinator: relay thread  ◀──done──┘
//! ```
//!
//! A node's relay sends its requests in batches (one socket write while its client has more
//! queued), so they reach the coordinator already buffered together. Served by the NBD server's
//! own threads, a thread that reads a small request takes those buffered behind it and executes
//! them one after another: on the page cache that saves hand-overs, on the `O_DIRECT` LUN it
//! waits for each disk request in turn, and a client at depth 4 got no more reads per second
//! than at depth 1. Here the connection's reading thread only queues each READ and WRITE; up
//! to [`MAX_IO_THREADS`] threads of the connection take them in turn and issue them to the LUN
//! together, and the server's relay thread sends each reply as it completes (those ready
//! together in one socket write). A relay thread with nothing to answer executes a queued
//! request itself. A request that comes alone (nothing buffered behind it, nothing of the
//! relay's under way) is left to the server's thread that read it, as before: at depth 1
//! nothing changes hands.
//!
//! Fencing is unchanged: each write is checked (node, epoch, deadline) and registered in flight
//! by [`Node::redirected_write`](super::Node) when its I/O thread executes it, under the
//! coordinator lock, exactly as when a server thread executed it; a write is answered only
//! once done, so a FLUSH (executed by the server through the backend) covers every write
//! answered before it was sent.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use tern_nbd::proto::{CMD_FLAG_FUA, Command, RequestHeader};
use tern_nbd::{Backend, Errno, Relay, Relayed};

use super::lock;
#[cfg(doc)]
use super::redirected::RedirectTarget;

/// I/O threads of one connection at most (the NBD server's own limit per connection).
pub(super) const MAX_IO_THREADS: usize = tern_nbd::server::MAX_IN_FLIGHT;

/// Spare buffers kept, and the largest one kept.
const FREE_BUFFERS: usize = 64;
const FREE_BUFFER_BYTES: usize = 1 << 20;

/// A request queued or done: a write's payload, or a read's data once done.
struct Job {
    request: RequestHeader,
    buf: Vec<u8>,
    result: Result<(), Errno>,
}

#[derive(Default)]
struct IoState {
    queue: VecDeque<Job>,
    done: VecDeque<Job>,
    /// Forwarded and not yet handed back by `next_reply`.
    outstanding: usize,
    threads: usize,
    /// I/O threads waiting for a request, and how many of them were woken already.
    idle: usize,
    signalled: usize,
    /// The relay thread waits for a completion (or a request to execute itself), and was woken.
    reply_waiting: bool,
    reply_signalled: bool,
    closed: bool,
    free: Vec<Vec<u8>>,
}

struct Shared<B> {
    target: Arc<B>,
    st: Mutex<IoState>,
    /// A request was queued, or the connection closed.
    work: Condvar,
    /// A request completed, or the connection closed.
    done: Condvar,
}

/// The relay of one connection to a redirected export: its reads and writes run on I/O
/// threads of the connection, many at once.
pub(super) struct RedirectIo<B>(Arc<Shared<B>>);

impl<B: Backend + 'static> RedirectIo<B> {
    /// The relay of one connection to `target` (a [`RedirectTarget`]).
    pub(super) fn new(target: Arc<B>) -> RedirectIo<B> {
        RedirectIo(Arc::new(Shared {
            target,
            st: Mutex::new(IoState::default()),
            work: Condvar::new(),
            done: Condvar::new(),
        }))
    }
}

impl<B: Backend + 'static> Shared<B> {
    /// Execute one request on the LUN (through the coordinator's checks).
    fn execute(&self, job: &mut Job) {
        let len = job.request.length as usize;
        let offset = job.request.offset;
        job.result = match job.request.command {
            Command::Read => self.target.read_at(&mut job.buf[..len], offset),
            _ => {
                let fua = job.request.flags & CMD_FLAG_FUA != 0;
                self.target.write_at(&job.buf[..len], offset, fua)
            }
        };
    }

    /// Hand a completed request to the relay thread.
    fn complete(&self, job: Job) {
        let mut st = lock(&self.st);
        st.done.push_back(job);
        let wake = st.reply_waiting && !st.reply_signalled;
        st.reply_signalled |= wake;
        drop(st);
        if wake {
            self.done.notify_one();
        }
    }

    /// One I/O thread: execute queued requests until the connection closes.
    fn io_thread(&self) {
        loop {
            let mut job = {
                let mut st = lock(&self.st);
                loop {
                    if let Some(j) = st.queue.pop_front() {
                        break j;
                    }
                    if st.closed {
                        st.threads -= 1;
                        return;
                    }
                    st.idle += 1;
                    st = self.work.wait(st).unwrap_or_else(|e| e.into_inner());
                    st.idle -= 1;
                    st.signalled = st.signalled.saturating_sub(1);
                }
            };
            self.execute(&mut job);
            self.complete(job);
        }
    }
}

impl<B: Backend + 'static> Relay for RedirectIo<B> {
    fn forward(&self, request: &RequestHeader, data: &[u8], more: bool) -> bool {
        if !matches!(request.command, Command::Read | Command::Write) {
            return false;
        }
        let s = &self.0;
        let mut st = lock(&s.st);
        // A request alone (none buffered behind it, none of ours under way) is executed by the
        // server's thread that read it, as before: no hand-over to another thread. (With a
        // relay the server takes no batches, so requests it executes run in parallel too.)
        if st.closed || (!more && st.outstanding == 0) {
            return false;
        }
        let mut buf = st.free.pop().unwrap_or_default();
        buf.clear();
        if request.command == Command::Write {
            buf.extend_from_slice(data);
        } else {
            // Stale bytes of a reused buffer are overwritten by the read (or not sent: an
            // error reply carries no data).
            buf.resize(request.length as usize, 0);
        }
        st.queue.push_back(Job {
            request: *request,
            buf,
            result: Ok(()),
        });
        st.outstanding += 1;
        // One executor for it: the relay thread if it waits (no hand-over to another thread
        // at depth 1), else an idle I/O thread, else a new one; with none, a busy one takes it.
        let (mut wake_reply, mut wake_io, mut spawn) = (false, false, false);
        if st.reply_waiting && !st.reply_signalled {
            st.reply_signalled = true;
            wake_reply = true;
        } else if st.idle > st.signalled {
            st.signalled += 1;
            wake_io = true;
        } else if st.threads < MAX_IO_THREADS {
            st.threads += 1;
            spawn = true;
        }
        drop(st);
        if wake_reply {
            s.done.notify_one();
        }
        if wake_io {
            s.work.notify_one();
        }
        if spawn {
            let shared = Arc::clone(s);
            let started = std::thread::Builder::new()
                .name("vol-redirect-io".into())
                .spawn(move || shared.io_thread());
            if started.is_err() {
                // The threads running take it; with none, this thread executes what is queued.
                let orphans: Vec<Job> = {
                    let mut st = lock(&s.st);
                    st.threads -= 1;
                    if st.threads == 0 {
                        st.queue.drain(..).collect()
                    } else {
                        Vec::new()
                    }
                };
                for mut job in orphans {
                    s.execute(&mut job);
                    s.complete(job);
                }
            }
        }
        true
    }

    fn push(&self) {}

    fn next_reply(&self, buf: &mut Vec<u8>) -> Option<Relayed> {
        let s = &self.0;
        let mut st = lock(&s.st);
        loop {
            let mut next = st.done.pop_front();
            if next.is_none()
                && let Some(mut job) = st.queue.pop_front()
            {
                // Nothing to answer yet: execute a queued request here.
                drop(st);
                s.execute(&mut job);
                st = lock(&s.st);
                next = Some(job);
            }
            if let Some(mut job) = next {
                st.outstanding -= 1;
                if job.request.command == Command::Read {
                    // The read's data becomes the server's buffer; its old one a spare.
                    std::mem::swap(buf, &mut job.buf);
                }
                if st.free.len() < FREE_BUFFERS && job.buf.capacity() <= FREE_BUFFER_BYTES {
                    st.free.push(job.buf);
                }
                return Some(Relayed {
                    request: job.request,
                    result: job.result,
                });
            }
            if st.closed && st.outstanding == 0 {
                return None;
            }
            st.reply_waiting = true;
            st = s.done.wait(st).unwrap_or_else(|e| e.into_inner());
            st.reply_waiting = false;
            st.reply_signalled = false;
        }
    }

    fn reply_ready(&self) -> bool {
        !lock(&self.0.st).done.is_empty()
    }

    fn close(&self) {
        let s = &self.0;
        lock(&s.st).closed = true;
        s.work.notify_all();
        s.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A backend whose reads wait until `want` of them are inside at once (or 5 s passed), and
    /// record the most seen together.
    struct Gate {
        want: usize,
        inside: Mutex<(usize, usize)>,
        changed: Condvar,
        writes: Mutex<Vec<u64>>,
    }

    impl Backend for Gate {
        fn size(&self) -> u64 {
            1 << 30
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut g = lock(&self.inside);
            g.0 += 1;
            g.1 = g.1.max(g.0);
            self.changed.notify_all();
            while g.1 < self.want && Instant::now() < deadline {
                g = self
                    .changed
                    .wait_timeout(g, Duration::from_millis(50))
                    .unwrap()
                    .0;
            }
            g.0 -= 1;
            buf.fill(offset as u8);
            Ok(())
        }
        fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), Errno> {
            assert!(data.iter().all(|&b| b == offset as u8));
            lock(&self.writes).push(offset);
            Ok(())
        }
        fn flush(&self) -> Result<(), Errno> {
            Ok(())
        }
    }

    fn gate(want: usize) -> Arc<Gate> {
        Arc::new(Gate {
            want,
            inside: Mutex::new((0, 0)),
            changed: Condvar::new(),
            writes: Mutex::new(Vec::new()),
        })
    }

    fn req(command: Command, cookie: u64) -> RequestHeader {
        RequestHeader {
            flags: 0,
            command,
            cookie,
            offset: cookie * 4096 + cookie,
            length: 4096,
        }
    }

    #[test]
    fn reads_forwarded_together_are_on_the_lun_together() {
        // The regression: executed one after another on the thread that read them, four
        // buffered reads were never inside the backend together.
        const N: u64 = 4;
        let g = gate(N as usize);
        let io = RedirectIo::new(Arc::clone(&g));
        // Buffered together: the first three with more behind them, the last with the others
        // under way.
        for c in 1..=N {
            assert!(io.forward(&req(Command::Read, c), &[], c < N));
        }
        let mut seen = Vec::new();
        let mut buf = Vec::new();
        for _ in 0..N {
            let r = io.next_reply(&mut buf).unwrap();
            assert_eq!(r.result, Ok(()));
            assert!(
                buf[..4096].iter().all(|&b| b == r.request.offset as u8),
                "a read's data comes back with it"
            );
            seen.push(r.request.cookie);
        }
        seen.sort();
        assert_eq!(seen, (1..=N).collect::<Vec<_>>(), "each answered once");
        assert_eq!(
            lock(&g.inside).1,
            N as usize,
            "all {N} reads in the backend at once"
        );
        io.close();
        assert!(io.next_reply(&mut buf).is_none(), "closed and drained");
    }

    #[test]
    fn a_request_alone_is_left_to_the_server_thread_that_read_it() {
        let g = gate(1);
        let io = RedirectIo::new(Arc::clone(&g));
        assert!(
            !io.forward(&req(Command::Read, 1), &[], false),
            "alone: declined"
        );
        assert!(
            io.forward(&req(Command::Read, 2), &[], true),
            "more behind: taken"
        );
        let mut buf = Vec::new();
        assert_eq!(io.next_reply(&mut buf).unwrap().request.cookie, 2);
        io.close();
        assert!(io.next_reply(&mut buf).is_none());
    }

    #[test]
    fn a_closed_relay_answers_every_request_it_took_then_ends() {
        let g = gate(1);
        let io = RedirectIo::new(Arc::clone(&g));
        for c in 1..=20u64 {
            let command = if c % 2 == 0 {
                Command::Write
            } else {
                Command::Read
            };
            let data = vec![req(command, c).offset as u8; 4096];
            let payload = if command == Command::Write {
                &data[..]
            } else {
                &[][..]
            };
            assert!(io.forward(&req(command, c), payload, true));
        }
        io.close();
        assert!(
            !io.forward(&req(Command::Read, 21), &[], false),
            "nothing is taken after the close"
        );
        let mut buf = Vec::new();
        let mut answered = 0;
        while let Some(r) = io.next_reply(&mut buf) {
            assert_eq!(r.result, Ok(()));
            answered += 1;
        }
        assert_eq!(answered, 20);
        let mut writes = lock(&g.writes).clone();
        writes.sort();
        assert_eq!(
            writes,
            (1..=10)
                .map(|i| req(Command::Write, 2 * i).offset)
                .collect::<Vec<_>>()
        );
    }
}

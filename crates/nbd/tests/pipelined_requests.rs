//! Requests in flight together on one connection, against a slow backend (a device's latency):
//! they run on several threads at once (up to `MAX_IN_FLIGHT`), every request is answered once
//! with its own data, and requests read before a DISC are all executed and answered before the
//! connection closes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_nbd::proto::*;
use tern_nbd::{Errno, SharedClient, StaticExports};

/// Memory with a slow read and write (a device's latency), counting how many run at once.
struct SlowMem {
    data: Mutex<Vec<u8>>,
    running: AtomicUsize,
    most: AtomicUsize,
    writes: AtomicUsize,
}

impl SlowMem {
    fn enter(&self) {
        let n = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(n, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(2));
    }
    fn leave(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl tern_nbd::Backend for SlowMem {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.enter();
        let o = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
        self.leave();
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), Errno> {
        self.enter();
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.leave();
        Ok(())
    }
    fn flush(&self) -> Result<(), Errno> {
        Ok(())
    }
}

fn start() -> (String, Arc<SlowMem>) {
    let mem = Arc::new(SlowMem {
        data: Mutex::new(vec![0; 1 << 20]),
        running: AtomicUsize::new(0),
        most: AtomicUsize::new(0),
        writes: AtomicUsize::new(0),
    });
    let mut ex = StaticExports::new();
    ex.insert("p", Arc::clone(&mem) as Arc<dyn tern_nbd::Backend>);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || tern_nbd::run_listener(l, Arc::new(ex)));
    (addr, mem)
}

fn block(tag: u64) -> Vec<u8> {
    (0..4096u64).map(|k| (tag * 37 + k % 253) as u8).collect()
}

#[test]
fn requests_that_arrive_together_run_at_once_and_each_gets_its_own_answer() {
    let (addr, mem) = start();
    let c = SharedClient::connect_timeout(&addr, "p", Duration::from_secs(10)).unwrap();
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let c = &c;
            s.spawn(move || {
                for round in 0..8u64 {
                    let off = (t * 8 + round) * 4096;
                    c.write(off, &block(t * 100 + round), false).unwrap();
                    let mut back = vec![0u8; 4096];
                    c.read(off, &mut back).unwrap();
                    assert!(back == block(t * 100 + round), "thread {t} round {round}");
                }
            });
        }
    });
    c.flush().unwrap();
    let most = mem.most.load(Ordering::SeqCst);
    assert!(
        most > 2,
        "at most {most} requests ran at once with 16 clients in flight"
    );
    assert!(most <= tern_nbd::server::MAX_IN_FLIGHT, "{most} at once");
}

/// Raw bytes: handshake for export "p" without structured replies (simple replies only).
fn handshake(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    let mut v = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let go = encode_go(&GoRequest {
        name: "p".into(),
        infos: vec![],
    });
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&OPT_GO.to_be_bytes());
    v.extend_from_slice(&(go.len() as u32).to_be_bytes());
    v.extend_from_slice(&go);
    s.write_all(&v).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        if kind == REP_ACK {
            return s;
        }
        assert_eq!(kind, REP_INFO, "unexpected option reply {kind:#x}");
    }
}

#[test]
fn requests_read_before_disc_are_all_answered_before_the_close() {
    let (addr, mem) = start();
    let mut s = handshake(&addr);
    // 16 writes and DISC in one send: the server reads them all from one buffer.
    let mut wire = Vec::new();
    for i in 0..16u64 {
        let h = RequestHeader {
            flags: 0,
            command: Command::Write,
            cookie: 1000 + i,
            offset: i * 4096,
            length: 4096,
        };
        wire.extend_from_slice(&h.encode());
        wire.extend_from_slice(&block(i));
    }
    let disc = RequestHeader {
        flags: 0,
        command: Command::Disc,
        cookie: 1,
        offset: 0,
        length: 0,
    };
    wire.extend_from_slice(&disc.encode());
    s.write_all(&wire).unwrap();
    let mut cookies = Vec::new();
    for _ in 0..16 {
        let mut r = [0u8; 16];
        s.read_exact(&mut r).unwrap();
        assert_eq!(
            u32::from_be_bytes(r[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        assert_eq!(
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            0,
            "error reply"
        );
        cookies.push(u64::from_be_bytes(r[8..16].try_into().unwrap()));
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (1000..1016).collect::<Vec<u64>>());
    // Then the server closes.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} bytes after the replies", rest.len());
    assert_eq!(mem.writes.load(Ordering::SeqCst), 16);
    let data = mem.data.lock().unwrap();
    for i in 0..16u64 {
        let o = i as usize * 4096;
        assert!(data[o..o + 4096] == block(i)[..], "write {i} did not land");
    }
}

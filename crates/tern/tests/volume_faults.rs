//! A randomized fault test of the shared volume, in the Jepsen style (real etcd, real node
//! processes, real writer processes).
//!
//! Three `tern volume serve` nodes on one LUN; writer processes (this test binary, re-executed,
//! each a `VolumeDisk` as a VMM has) on random nodes compete for the write leases of two
//! preallocated files: one at a time holds a file's lease and writes 4 KiB blocks, each stamped
//! with (writer, epoch, sequence) and a checksum, flushing each and printing an acknowledgement;
//! when a writer dies another takes over at a higher epoch. Meanwhile random faults are injected:
//! a writer frozen (SIGSTOP, then SIGCONT) or killed (SIGKILL), a node partitioned
//! (`--partition-file`), a node's LUN path lost (`--fault-file`), a node frozen, and the
//! coordinator's host crashed (the node and its writers SIGKILLed, the node restarted).
//!
//! Then every fault is healed, every writer stopped, and a checker reads every block: each
//! block must hold the newest acknowledged write to it (by epoch, then sequence), or a newer
//! write that was in flight; a block holding an older epoch's write than an acknowledged one is
//! a lost acknowledgement or a fenced writer's write landing after its fence.
//!
//! Bounded: `TERN_FAULT_OPS` acknowledged writes (default 2,000) and `TERN_FAULT_FAULTS` faults
//! (default 50). The seed is printed; `TERN_FAULT_SEED=N` replays the fault schedule (process
//! timing still varies). `cargo xtask bench faults` runs it at scale.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::volume::{call, format_lun};
use common::{free_port, scratch, tern, tern_cmd, wait_for};
use tern_test_support::{Etcd, require_tools};
use tern_volume::client::VolumeDisk;
use tern_volume::control::Request;

const FILES: [&str; 2] = ["f0.raw", "f1.raw"];
const BLOCKS: u64 = 64;
const NODES: u32 = 3;
const TTL_MS: u64 = 1000;
const WRITER_ENV: &str = "TERN_FAULT_WRITER";
const MAGIC: u32 = 0x5445_524e;

/// xorshift64*: the fault schedule from the seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }
}

/// FNV-1a over `b`: the stamp's checksum.
fn checksum(b: &[u8]) -> u32 {
    b.iter().fold(0x811c_9dc5u32, |h, &x| {
        (h ^ u32::from(x)).wrapping_mul(0x0100_0193)
    })
}

/// A stamped block: magic, writer, epoch, seq, file, block, then a filler, then a checksum.
fn stamp(writer: u32, epoch: u64, seq: u64, file: u32, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&writer.to_le_bytes());
    b[8..16].copy_from_slice(&epoch.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b[24..28].copy_from_slice(&file.to_le_bytes());
    b[28..36].copy_from_slice(&block.to_le_bytes());
    for (i, x) in b[36..4092].iter_mut().enumerate() {
        *x = (i as u64 ^ seq ^ epoch << 3) as u8;
    }
    let crc = checksum(&b[..4092]);
    b[4092..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// What a block holds: `None` if never written, `Err` if not a whole stamped block.
fn parse(b: &[u8]) -> Result<Option<(u64, u64, u32)>, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let u32at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u64at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    if u32at(0) != MAGIC || checksum(&b[..4092]) != u32at(4092) {
        return Err(format!("torn or foreign block: {:02x?}", &b[..16]));
    }
    Ok(Some((u64at(8), u64at(16), u32at(4))))
}

/// A writer process: take `file`'s lease through `node` (waiting while another holds it),
/// then write random blocks, each flushed and acknowledged on stdout, until anything fails.
fn writer(spec: &str) -> ! {
    let mut it = spec.split(' ');
    let (node, file, id) = (
        it.next().unwrap().to_owned(),
        it.next().unwrap().parse::<u32>().unwrap(),
        it.next().unwrap().parse::<u32>().unwrap(),
    );
    let name = FILES[file as usize];
    let mut tries = 0;
    let disk = loop {
        match VolumeDisk::open(&format!("{node}/{name}"), false) {
            Ok(d) => break d,
            // Another writer holds the lease, or the node is away: wait, then make room.
            Err(_) if tries < 100 => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => std::process::exit(3),
        }
        tries += 1;
    };
    let epoch = match call(
        &node,
        Request::Stat {
            name: name.into(),
            map: false,
        },
    ) {
        Ok(v) => v["lease"]["epoch"].as_u64().unwrap(),
        Err(_) => std::process::exit(3),
    };
    println!("OPEN {epoch}");
    let mut rng = Rng(u64::from(id) * 0x9e37_79b9 + epoch + 1);
    for seq in 0.. {
        let block = rng.below(BLOCKS);
        let ok = disk
            .write_at(&stamp(id, epoch, seq, file, block), block * 4096)
            .is_ok()
            && disk.flush().is_ok();
        if !ok {
            std::process::exit(3);
        }
        println!("ACK {block} {epoch} {seq}");
        std::thread::sleep(Duration::from_millis(3));
    }
    unreachable!()
}

struct NodeProc {
    addr: String,
    child: Option<Child>,
    partition: PathBuf,
    fault: PathBuf,
}

struct WriterProc {
    child: Child,
    node: u32,
    file: u32,
}

/// An acknowledged write.
#[derive(Debug, Clone, Copy)]
struct Ack {
    file: u32,
    block: u64,
    epoch: u64,
    seq: u64,
    writer: u32,
    at: Instant,
}

/// Writers in the order they took a lease (their `OPEN` lines). Two writers of one file with
/// the same epoch are successive VM disks on one node (the node still held the lease when the
/// second took the host's claim, which the first had to lose by dying): the later one's writes
/// are the newer ones. So writes are ordered by (epoch, open order, sequence).
type Opens = Arc<Mutex<BTreeMap<u32, u64>>>;

/// What happened when, for explaining the longest waits (printed with the summary).
type Events = Arc<Mutex<Vec<(Instant, String)>>>;

fn event(events: &Events, what: String) {
    events.lock().unwrap().push((Instant::now(), what));
}

struct Run {
    dir: PathBuf,
    lun: PathBuf,
    etcd: String,
    nodes: Vec<NodeProc>,
    writers: BTreeMap<u32, WriterProc>,
    /// Every writer ever started: its node.
    writer_nodes: BTreeMap<u32, u32>,
    next_writer: u32,
    acks: Arc<Mutex<Vec<Ack>>>,
    opens: Opens,
    events: Events,
    /// Nodes stopped (SIGSTOP) right now: not asked anything until continued.
    frozen: std::collections::BTreeSet<usize>,
    /// Nodes found dead that the test did not kill (their commit watchdog's doing).
    watchdog_kills: u64,
}

impl Run {
    fn start_node(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node{}.log", i + 1)))
            .unwrap();
        let child = Command::new(tern())
            .args(["volume", "serve", "--node-id", &(i + 1).to_string()])
            .args(["--listen", &n.addr, "--etcd", &self.etcd])
            .args(["--lease-ttl-ms", &TTL_MS.to_string(), "--session-ttl", "2"])
            .arg("--partition-file")
            .arg(&n.partition)
            .arg("--fault-file")
            .arg(&n.fault)
            .arg("--lun")
            .arg(&self.lun)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        n.child = Some(child);
        event(&self.events, format!("node {} started", i + 1));
    }

    fn spawn_writer(&mut self, node: u32, file: u32) {
        let id = self.next_writer;
        self.next_writer += 1;
        let addr = self.nodes[node as usize].addr.clone();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["randomized_faults_lose_no_acknowledged_write", "--exact"])
            .args(["--nocapture", "--test-threads=1"])
            .env(WRITER_ENV, format!("{addr} {file} {id}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let acks = self.acks.clone();
        let opens = self.opens.clone();
        let events = self.events.clone();
        event(
            &events,
            format!("writer {id} spawned on node {} for file {file}", node + 1),
        );
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let f: Vec<&str> = line.split(' ').collect();
                // The first line may follow libtest's "test NAME ... " on the same line.
                if line.contains("OPEN ") {
                    event(&events, format!("writer {id} opened file {file}: {line}"));
                    let mut o = opens.lock().unwrap();
                    let n = o.len() as u64;
                    o.insert(id, n);
                } else if f[0] == "ACK" && f.len() == 4 {
                    acks.lock().unwrap().push(Ack {
                        file,
                        block: f[1].parse().unwrap(),
                        epoch: f[2].parse().unwrap(),
                        seq: f[3].parse().unwrap(),
                        writer: id,
                        at: Instant::now(),
                    });
                }
            }
        });
        self.writers.insert(id, WriterProc { child, node, file });
        self.writer_nodes.insert(id, node + 1);
    }

    /// Replace dead writers so that every file has two (one writing, one waiting).
    fn top_up(&mut self, rng: &mut Rng) {
        let events = self.events.clone();
        self.writers.retain(|id, w| match w.child.try_wait() {
            Ok(None) => true,
            Ok(Some(s)) => {
                event(
                    &events,
                    format!("writer {id} (node {}) exited: {s}", w.node + 1),
                );
                false
            }
            Err(_) => false,
        });
        for file in 0..FILES.len() as u32 {
            while self.writers.values().filter(|w| w.file == file).count() < 2 {
                let live: Vec<u32> = (0..NODES)
                    .filter(|&i| self.nodes[i as usize].child.is_some())
                    .collect();
                if live.is_empty() {
                    return;
                }
                let node = live[rng.below(live.len() as u64) as usize];
                self.spawn_writer(node, file);
            }
        }
    }

    /// Who the nodes say the coordinator is. Frozen and dead nodes are not asked (a request
    /// to a stopped node would hold this loop, and with it the node's SIGCONT, until its
    /// timeout), and nobody is waited for long.
    fn coordinator(&self) -> Option<usize> {
        self.nodes.iter().enumerate().find_map(|(i, n)| {
            if n.child.is_none() || self.frozen.contains(&i) {
                return None;
            }
            let s = tern_volume::control::call(
                &n.addr,
                &Request::Status,
                false,
                Duration::from_secs(2),
            )
            .ok()?;
            let id = s["coordinator"]["node_id"].as_u64()?;
            Some(id as usize - 1)
        })
    }

    /// A node that died without the test killing it was killed by its commit watchdog (it
    /// stalled, frozen, past its coordinator session with a metadata write pending): start it
    /// again, as its host's service manager would.
    fn restart_dead_nodes(&mut self) {
        for i in 0..self.nodes.len() {
            let dead = match self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(s))) => Some(s),
                _ => None,
            };
            if let Some(s) = dead {
                self.nodes[i].child = None;
                self.frozen.remove(&i);
                self.watchdog_kills += 1;
                event(&self.events, format!("node {} found dead ({s})", i + 1));
                self.start_node(i);
            }
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A fault in progress, to be healed at `until`.
enum Pending {
    Cont(u32),
    ContNode(usize, u32),
    RemoveFile(PathBuf),
    Restart(usize),
}

const KINDS: [&str; 6] = [
    "writer_freeze",
    "writer_kill",
    "partition",
    "path_loss",
    "node_freeze",
    "coordinator_crash",
];

#[test]
fn randomized_faults_lose_no_acknowledged_write() {
    if let Ok(spec) = std::env::var(WRITER_ENV) {
        writer(&spec);
    }
    require_tools(&["etcd"]);
    let seed = env_u64(
        "TERN_FAULT_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1,
    );
    let ops = env_u64("TERN_FAULT_OPS", 2000);
    let faults = env_u64("TERN_FAULT_FAULTS", 50);
    // 0: a fault every 0.1-0.6 s, overlapping (the default); N: one fault at a time, the next
    // N ms after the previous one healed, so each wait belongs to one fault.
    let spacing = env_u64("TERN_FAULT_SPACING_MS", 0);
    eprintln!(
        "volume_faults: seed={seed} ops={ops} faults={faults} spacing_ms={spacing} (replay: \
         TERN_FAULT_SEED={seed})"
    );
    let mut rng = Rng(seed);

    let dir = scratch();
    let etcd = Etcd::start();
    let lun = dir.path().join("lun");
    format_lun(&lun);
    let mut run = Run {
        dir: dir.path().to_owned(),
        lun,
        etcd: etcd.url.clone(),
        nodes: (1..=NODES)
            .map(|i| NodeProc {
                addr: format!("127.0.0.1:{}", free_port()),
                child: None,
                partition: dir.path().join(format!("partition{i}")),
                fault: dir.path().join(format!("fault{i}")),
            })
            .collect(),
        writers: BTreeMap::new(),
        writer_nodes: BTreeMap::new(),
        next_writer: 1,
        acks: Arc::new(Mutex::new(Vec::new())),
        opens: Arc::new(Mutex::new(BTreeMap::new())),
        events: Arc::new(Mutex::new(Vec::new())),
        frozen: Default::default(),
        watchdog_kills: 0,
    };
    for i in 0..NODES as usize {
        run.start_node(i);
    }
    let first = run.nodes[0].addr.clone();
    wait_for("a coordinator", Duration::from_secs(30), || {
        call(&first, Request::Status).is_ok_and(|s| s["coordinator"]["node_id"].is_u64())
    });
    for f in FILES {
        let (code, _, err) = tern_cmd(&[
            "volume",
            "create",
            f,
            "--size",
            "256K",
            "--preallocate",
            "--node",
            &first,
        ]);
        assert_eq!(code, 0, "{err}");
    }

    let mut pending: Vec<(Instant, Pending)> = Vec::new();
    let mut injected: BTreeMap<&str, u64> = BTreeMap::new();
    let mut fault_log: Vec<(Instant, &str, String)> = Vec::new();
    let started = Instant::now();
    let deadline =
        started + Duration::from_secs(60 + ops / 10 + faults * (3 + 2 * spacing.div_ceil(1000)));
    let mut next_fault = Instant::now() + Duration::from_millis(500);
    let mut n_faults = 0;
    loop {
        let now = Instant::now();
        // Heal what is due.
        let (due, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(t, _)| *t <= now);
        pending = rest;
        if spacing > 0 && !due.is_empty() && pending.is_empty() {
            next_fault = now + Duration::from_millis(spacing);
        }
        for (_, p) in due {
            match p {
                Pending::Cont(pid) => signal(pid, "-CONT"),
                Pending::ContNode(i, pid) => {
                    signal(pid, "-CONT");
                    run.frozen.remove(&i);
                    event(&run.events, format!("node {} continued", i + 1));
                }
                Pending::RemoveFile(f) => {
                    let _ = std::fs::remove_file(f);
                }
                Pending::Restart(i) => run.start_node(i),
            }
        }
        run.restart_dead_nodes();
        run.top_up(&mut rng);
        let acked = run.acks.lock().unwrap().len() as u64;
        if acked >= ops && n_faults >= faults && pending.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: only {acked} of {ops} writes acknowledged after {} faults in {:?}",
            n_faults,
            started.elapsed()
        );
        if n_faults < faults && now >= next_fault && (spacing == 0 || pending.is_empty()) {
            n_faults += 1;
            let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
            let hold = Duration::from_millis(rng.range(200, 2500));
            let ids: Vec<u32> = run.writers.keys().copied().collect();
            let node = rng.below(u64::from(NODES)) as usize;
            let mut applied = true;
            match kind {
                "writer_freeze" | "writer_kill" => {
                    let id = ids[rng.below(ids.len() as u64) as usize];
                    let pid = run.writers[&id].child.id();
                    event(&run.events, format!("{kind}: writer {id}"));
                    if kind == "writer_kill" {
                        signal(pid, "-KILL");
                    } else {
                        signal(pid, "-STOP");
                        pending.push((now + hold, Pending::Cont(pid)));
                    }
                }
                "partition" | "path_loss" => {
                    let n = &run.nodes[node];
                    let f = if kind == "partition" {
                        &n.partition
                    } else {
                        &n.fault
                    };
                    std::fs::write(f, b"").unwrap();
                    pending.push((now + hold, Pending::RemoveFile(f.clone())));
                }
                "node_freeze" => {
                    applied = !run.frozen.contains(&node) && run.nodes[node].child.is_some();
                    if let Some(c) = run.nodes[node].child.as_ref().filter(|_| applied) {
                        signal(c.id(), "-STOP");
                        run.frozen.insert(node);
                        pending.push((
                            now + hold.min(Duration::from_millis(1500)),
                            Pending::ContNode(node, c.id()),
                        ));
                    }
                }
                _ => {
                    // The coordinator's host crashes: its node and its writers (the random
                    // node's when none is named). Not when the one named crashed a moment ago
                    // (the others still name it) or is the last node up: drawn again.
                    let alive = |i: usize| run.nodes[i].child.is_some();
                    let c = run.coordinator().unwrap_or(node);
                    let up = (0..run.nodes.len()).filter(|&i| alive(i)).count();
                    applied = alive(c) && up > 1;
                    if applied {
                        event(&run.events, format!("{kind}: node {}", c + 1));
                    }
                    if applied && let Some(mut child) = run.nodes[c].child.take() {
                        let _ = child.kill();
                        let _ = child.wait();
                        for w in run.writers.values_mut().filter(|w| w.node == c as u32) {
                            let _ = w.child.kill();
                        }
                        pending.push((now + hold, Pending::Restart(c)));
                    }
                }
            }
            if !applied {
                // The node was down or already frozen: nothing happened, try again soon.
                n_faults -= 1;
                next_fault = now + Duration::from_millis(100);
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            *injected.entry(kind).or_default() += 1;
            event(
                &run.events,
                format!(
                    "FAULT {kind} (node {}, hold {} ms)",
                    node + 1,
                    hold.as_millis()
                ),
            );
            fault_log.push((
                now,
                kind,
                format!("node {}, hold {} ms", node + 1, hold.as_millis()),
            ));
            next_fault = now
                + Duration::from_millis(if spacing > 0 {
                    spacing
                } else {
                    rng.range(100, 600)
                });
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // Heal everything, stop the writers (their acknowledged writes are flushed), and read.
    for n in &run.nodes {
        let _ = std::fs::remove_file(&n.partition);
        let _ = std::fs::remove_file(&n.fault);
        if let Some(c) = &n.child {
            signal(c.id(), "-CONT");
        }
    }
    for w in run.writers.values_mut() {
        signal(w.child.id(), "-CONT");
        let _ = w.child.kill();
        let _ = w.child.wait();
    }
    // Anything still in flight would have to land within a lease's life.
    std::thread::sleep(Duration::from_millis(3 * TTL_MS));
    let acks = run.acks.lock().unwrap().clone();
    let opens = run.opens.lock().unwrap().clone();
    let order = |epoch: u64, writer: u32, seq: u64| {
        (epoch, opens.get(&writer).copied().unwrap_or(u64::MAX), seq)
    };
    run.frozen.clear();
    run.restart_dead_nodes();
    let reader_node = run
        .nodes
        .iter()
        .find(|n| n.child.is_some())
        .map(|n| n.addr.clone())
        .unwrap();
    let mut violations = Vec::new();
    // Blocks holding an older write of the same writer than one it had acknowledged (lost
    // acknowledgements), and blocks holding an earlier lease holder's write (stale writes).
    let (mut lost, mut stale) = (0, 0);
    let mut checked = 0;
    for (fi, name) in FILES.iter().enumerate() {
        let mut r = loop {
            match tern_nbd::Client::connect(&reader_node, name) {
                Ok(c) => break c,
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        for block in 0..BLOCKS {
            let mut b = vec![0u8; 4096];
            r.read(block * 4096, &mut b).unwrap();
            let newest = acks
                .iter()
                .filter(|a| a.file == fi as u32 && a.block == block)
                .max_by_key(|a| order(a.epoch, a.writer, a.seq));
            checked += 1;
            match (parse(&b), newest) {
                (Err(e), _) => violations.push(format!("{name} block {block}: {e}")),
                (Ok(None), Some(a)) => {
                    lost += 1;
                    violations.push(format!(
                    "{name} block {block}: acknowledged write lost (writer {} epoch {} seq {}), block empty",
                    a.writer, a.epoch, a.seq
                    ))
                }
                (Ok(Some((e, s, w))), Some(a))
                    if order(e, w, s) < order(a.epoch, a.writer, a.seq) =>
                {
                    if e < a.epoch || w != a.writer {
                        stale += 1;
                    } else {
                        lost += 1;
                    }
                    violations.push(format!(
                        "{name} block {block}: holds writer {w} epoch {e} seq {s}, older than the \
                         acknowledged writer {} epoch {} seq {} ({})",
                        a.writer,
                        a.epoch,
                        a.seq,
                        if e < a.epoch || w != a.writer {
                            "an earlier lease holder's write landed after its fence, or the \
                             acknowledged one was lost"
                        } else {
                            "an acknowledged write was lost"
                        }
                    ))
                }
                _ => {}
            }
        }
    }
    // The longest wait for an acknowledgement of a file, and the last fault injected before it.
    let mut longest: BTreeMap<&str, Duration> = BTreeMap::new();
    // Per kind, the longest gap's file and window, to print what happened in it.
    let mut longest_at: BTreeMap<&str, (u32, Instant, Instant)> = BTreeMap::new();
    for fi in 0..FILES.len() as u32 {
        let mut times: Vec<Instant> = acks.iter().filter(|a| a.file == fi).map(|a| a.at).collect();
        times.sort();
        for w in times.windows(2) {
            let gap = w[1] - w[0];
            if let Some((_, kind, _)) = fault_log
                .iter()
                .rev()
                .find(|(t, _, _)| *t <= w[0] + Duration::from_millis(50))
            {
                let e = longest.entry(kind).or_default();
                if gap > *e {
                    *e = gap;
                    longest_at.insert(kind, (fi, w[0], w[1]));
                }
            }
        }
    }
    {
        let events = run.events.lock().unwrap();
        for (kind, (fi, from, to)) in &longest_at {
            eprintln!(
                "volume_faults: longest wait after {kind}: file {fi}, {} ms (from {} ms):",
                (*to - *from).as_millis(),
                (*from - started).as_millis()
            );
            for (t, what) in events
                .iter()
                .filter(|(t, _)| *t + Duration::from_secs(1) >= *from && *t <= *to)
                .take(200)
            {
                eprintln!("  {:>8} ms  {what}", (*t - started).as_millis());
            }
        }
    }
    let epochs: std::collections::BTreeSet<(u32, u64)> =
        acks.iter().map(|a| (a.file, a.epoch)).collect();
    eprintln!(
        "volume_faults: seed={seed} spacing_ms={spacing} acknowledged={} blocks_checked={checked} \
         epochs={} faults={injected:?} \
         violations={} lost={lost} stale={stale} nodes_killed_by_commit_watchdog={} elapsed_ms={} \
         longest_ack_gap_ms={:?}",
        acks.len(),
        epochs.len(),
        violations.len(),
        run.watchdog_kills,
        started.elapsed().as_millis(),
        longest
            .iter()
            .map(|(k, v)| (*k, v.as_millis() as u64))
            .collect::<BTreeMap<_, _>>()
    );
    for n in &mut run.nodes {
        if let Some(mut c) = n.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    if !violations.is_empty() {
        // Who wrote what when, for the writers named.
        let t0 = started;
        for (w, n) in &run.writer_nodes {
            let mine: Vec<&Ack> = acks.iter().filter(|a| a.writer == *w).collect();
            if let (Some(f), Some(l)) = (mine.first(), mine.last()) {
                eprintln!(
                    "writer {w}: node {n}, file {}, epoch {}, open #{:?}, acks {} from {} ms to {} ms",
                    f.file,
                    f.epoch,
                    opens.get(w),
                    mine.len(),
                    (f.at - t0).as_millis(),
                    (l.at - t0).as_millis()
                );
            }
        }
        for (t, k, what) in &fault_log {
            eprintln!("fault at {} ms: {k} ({what})", (*t - t0).as_millis());
        }
        let kept = dir.keep();
        eprintln!("volume_faults: node logs kept in {}", kept.display());
        let _ = std::fs::remove_file(kept.join("lun"));
    }
    assert!(
        violations.is_empty(),
        "seed {seed} (replay with TERN_FAULT_SEED={seed}): {} violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
    assert!(epochs.len() > FILES.len(), "no lease ever changed hands");
    drop(etcd);
}

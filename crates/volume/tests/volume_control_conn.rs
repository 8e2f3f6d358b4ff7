//! Kept-alive control connections (`control_conn`), over mutual TLS as in a cluster with
//! `--tls-dir`: a VM disk's lease renewals to its node, and the node's forwards to the
//! coordinator, each use one connection however many there are; a connection the server closed
//! is reopened without the request failing; one older than the age cap is replaced however busy
//! it is; a client that ignores the cap is cut off by the servers' option age without a request
//! failing or running twice; after a coordinator change a request on the old
//! coordinator's connection is still refused, and the renewals go to the new one.
//!
//! Connections are counted by the servers (the distinct client addresses their control requests
//! came from). One test binary = one process, so the TLS identity (`node-2`, set once) and the
//! connection pool are shared by the tests here, which therefore run one at a time.

mod common;

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{MIB, TIMEOUT, format_lun};
use tern_nbd::server::DEFAULT_MAX_OPTION_AGE;
use tern_nbd::{Backend, Exports, ListenerOptions, ListenerStats, Peer, PeerId, Refusal};
use tern_pki::{IssueOptions, Role, TlsDir};
use tern_volume::control::{self, Envelope, ErrorKind, LeaseAction, Request};
use tern_volume::control_conn;
use tern_volume::node::{LeaderInfo, Node, NodeConfig, NodeExports};

/// A node's exports that remember which client connections sent control requests.
struct Counting {
    inner: NodeExports,
    peers: Mutex<HashSet<SocketAddr>>,
}

impl Counting {
    fn connections(&self) -> usize {
        self.peers.lock().unwrap().len()
    }
}

impl Exports for Counting {
    fn list(&self) -> Vec<String> {
        self.inner.list()
    }
    fn open(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.inner.open(name)
    }
    fn open_for(&self, name: &str, peer: &Peer) -> Result<Arc<dyn Backend>, Refusal> {
        self.inner.open_for(name, peer)
    }
    fn control(&self, request: &[u8]) -> Option<Vec<u8>> {
        self.inner.control(request)
    }
    fn control_for(&self, request: &[u8], peer: &Peer) -> Option<Vec<u8>> {
        self.peers
            .lock()
            .unwrap()
            .insert(peer.addr.expect("a TCP client"));
        self.inner.control_for(request, peer)
    }
}

/// The test PKI: a CA and the certificates `node-1` … `node-3` (this process presents `node-2`'s).
struct Pki {
    _dir: tempfile::TempDir,
    nodes: Vec<TlsDir>,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        tern_pki::init_ca(&ca).unwrap();
        let nodes: Vec<TlsDir> = (1..=3)
            .map(|n| {
                let d = tern_pki::issue(
                    &ca,
                    &format!("node-{n}"),
                    Role::Host,
                    &IssueOptions::default(),
                )
                .unwrap();
                TlsDir::load(&d).unwrap()
            })
            .collect();
        control::set_client_tls(nodes[1].dir()).unwrap();
        Pki { _dir: dir, nodes }
    })
}

/// Tests here share the process's pool and counters: one at a time, each from the default idle
/// limit and age cap.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    control_conn::set_idle_limit(control_conn::DEFAULT_IDLE_LIMIT);
    control_conn::set_max_age(control_conn::DEFAULT_MAX_AGE);
    g
}

struct TestNode {
    node: Arc<Node>,
    addr: String,
    exports: Arc<Counting>,
    stats: Arc<ListenerStats>,
}

/// What a test node starts as.
enum Start<'a> {
    /// The coordinator, generation 1.
    Coordinator,
    /// Following this coordinator.
    Follower(&'a LeaderInfo),
    /// Knowing no coordinator (its own pooled connections are the process's: a node told of a
    /// change closes them for every node here).
    Unaware,
}

/// Node `id` on `lun` behind a TLS-only listener (its certificate `node-ID`) that closes a
/// connection idle in option haggling after `handshake_timeout`.
fn tls_node(lun: &Path, id: u32, start: Start<'_>, handshake_timeout: Duration) -> TestNode {
    tls_node_aged(lun, id, start, handshake_timeout, DEFAULT_MAX_OPTION_AGE)
}

/// [`tls_node`] whose listener refuses options on a connection older than `max_option_age`.
fn tls_node_aged(
    lun: &Path,
    id: u32,
    start: Start<'_>,
    handshake_timeout: Duration,
    max_option_age: Duration,
) -> TestNode {
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let node = Node::new(
        NodeConfig {
            node_id: id,
            listen: addr.clone(),
            no_direct: false,
            lease_ttl_ms: 600_000,
            lun: lun.to_owned(),
            fault_file: None,
        },
        lun,
    )
    .unwrap();
    match start {
        Start::Coordinator => node.become_coordinator(1, u64::MAX).unwrap(),
        Start::Follower(l) => node.set_leader(Some(l.clone())),
        Start::Unaware => {}
    }
    let exports = Arc::new(Counting {
        inner: NodeExports(Arc::clone(&node)),
        peers: Mutex::new(HashSet::new()),
    });
    let stats = Arc::new(ListenerStats::default());
    let opts = ListenerOptions {
        tls: Some(tern_nbd::ServerTls {
            config: pki.nodes[id as usize - 1].server_config(),
            identify: Arc::new(|c| {
                tern_pki::peer_identity(c)
                    .map(|i| PeerId {
                        name: i.name,
                        role: i.role.to_string(),
                    })
                    .map_err(|e| e.to_string())
            }),
        }),
        handshake_timeout,
        max_option_age,
        ..ListenerOptions::default()
    };
    let (ex, st) = (Arc::clone(&exports) as Arc<dyn Exports>, Arc::clone(&stats));
    std::thread::spawn(move || tern_nbd::run_listener_with(listener, ex, opts, st));
    TestNode {
        node,
        addr,
        exports,
        stats,
    }
}

fn leader_of(n: &TestNode, generation: u64) -> LeaderInfo {
    LeaderInfo {
        node_id: n.node.id(),
        addr: n.addr.clone(),
        generation,
    }
}

/// A VM disk's renewal: the write lease of `name` asked of its node (which holds it: renewed).
fn renew(addr: &str, name: &str) -> u64 {
    common::lease(addr, name, LeaseAction::Acquire)
}

/// The coordinator (node 1) and node 2 following it, a file `f` whose lease node 2 holds.
fn two_nodes(dir: &Path, handshake_timeout: Duration) -> (TestNode, TestNode, u64) {
    two_nodes_aged(dir, handshake_timeout, DEFAULT_MAX_OPTION_AGE)
}

/// [`two_nodes`] whose listeners refuse options on connections older than `max_option_age`.
fn two_nodes_aged(
    dir: &Path,
    handshake_timeout: Duration,
    max_option_age: Duration,
) -> (TestNode, TestNode, u64) {
    let lun = format_lun(dir, 8);
    let n1 = tls_node_aged(
        &lun,
        1,
        Start::Coordinator,
        handshake_timeout,
        max_option_age,
    );
    let n2 = tls_node_aged(
        &lun,
        2,
        Start::Follower(&leader_of(&n1, 1)),
        handshake_timeout,
        max_option_age,
    );
    common::create(&n2.addr, "f", MIB, false);
    let epoch = renew(&n2.addr, "f");
    (n1, n2, epoch)
}

#[test]
fn a_hundred_renewals_use_one_connection_on_each_hop() {
    let _one = serial();
    control_conn::set_idle_limit(control_conn::DEFAULT_IDLE_LIMIT);
    let dir = tempfile::tempdir().unwrap();
    let (n1, n2, epoch) = two_nodes(dir.path(), Duration::from_secs(10));
    let opened = control_conn::opened_connections();
    for _ in 0..100 {
        assert_eq!(renew(&n2.addr, "f"), epoch, "a renewal keeps the epoch");
    }
    assert_eq!(
        n2.exports.connections(),
        1,
        "node 2 served the create, the acquire and 100 renewals on one connection"
    );
    assert_eq!(
        n1.exports.connections(),
        1,
        "node 2 forwarded everything to the coordinator on one connection"
    );
    assert_eq!(
        control_conn::opened_connections(),
        opened,
        "no connection opened for the renewals"
    );
}

#[test]
fn a_connection_the_server_closed_is_reopened_without_failing_the_request() {
    let _one = serial();
    control_conn::set_idle_limit(control_conn::DEFAULT_IDLE_LIMIT);
    let dir = tempfile::tempdir().unwrap();
    // Both servers close a connection idle in option haggling for 300 ms, before our 5 s limit.
    let (n1, n2, epoch) = two_nodes(dir.path(), Duration::from_millis(300));
    assert_eq!(n2.exports.connections(), 1);
    assert_eq!(n1.exports.connections(), 1);
    let deadline = Instant::now() + TIMEOUT;
    while n1.stats.handshake_timeouts.load(Ordering::SeqCst) == 0
        || n2.stats.handshake_timeouts.load(Ordering::SeqCst) == 0
    {
        assert!(
            Instant::now() < deadline,
            "the servers closed no idle connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        renew(&n2.addr, "f"),
        epoch,
        "the renewal succeeds over new connections"
    );
    assert_eq!(n2.exports.connections(), 2, "node 2: a second connection");
    assert_eq!(n1.exports.connections(), 2, "node 1: a second connection");
    // Kept again: the next renewals use the new ones.
    for _ in 0..10 {
        assert_eq!(renew(&n2.addr, "f"), epoch);
    }
    assert_eq!(n2.exports.connections(), 2);
    assert_eq!(n1.exports.connections(), 2);
}

#[test]
fn connections_idle_past_the_limit_are_not_reused() {
    let _one = serial();
    control_conn::set_idle_limit(Duration::from_millis(200));
    let dir = tempfile::tempdir().unwrap();
    let (n1, n2, epoch) = two_nodes(dir.path(), Duration::from_secs(10));
    for _ in 0..5 {
        assert_eq!(renew(&n2.addr, "f"), epoch);
    }
    assert_eq!(
        n2.exports.connections(),
        1,
        "within the limit: one connection"
    );
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(renew(&n2.addr, "f"), epoch);
    control_conn::set_idle_limit(control_conn::DEFAULT_IDLE_LIMIT);
    assert_eq!(
        n2.exports.connections(),
        2,
        "past the limit: a new connection"
    );
    assert_eq!(n1.exports.connections(), 2, "on the forwarding hop too");
    // The server closed its end of the old ones when the client did (NBD_OPT_ABORT): none is
    // left for its handshake deadline.
    assert_eq!(n2.stats.handshake_timeouts.load(Ordering::SeqCst), 0);
}

#[test]
fn connections_older_than_the_age_cap_are_not_reused_however_busy() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let (n1, n2, epoch) = two_nodes(dir.path(), Duration::from_secs(10));
    control_conn::set_max_age(Duration::from_millis(300));
    let (c1, c2) = (n1.exports.connections(), n2.exports.connections());
    // A renewal every 50 ms for 1 s: never idle near the 5 s limit, so only the age cap can
    // end a connection.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        assert_eq!(renew(&n2.addr, "f"), epoch);
        std::thread::sleep(Duration::from_millis(50));
    }
    control_conn::set_max_age(control_conn::DEFAULT_MAX_AGE);
    let (d1, d2) = (n1.exports.connections() - c1, n2.exports.connections() - c2);
    // 1 s of connections at most 300 ms old each: at least 3 new ones per hop; far fewer than
    // one per renewal (~20).
    assert!((3..=10).contains(&d2), "node 2: {d2} new connections");
    assert!((3..=10).contains(&d1), "node 1: {d1} new connections");
    // The old ones were closed by the client (NBD_OPT_ABORT), not left to the server's deadline.
    assert_eq!(n2.stats.handshake_timeouts.load(Ordering::SeqCst), 0);
    assert_eq!(n1.stats.handshake_timeouts.load(Ordering::SeqCst), 0);
}

#[test]
fn a_client_ignoring_its_age_cap_is_cut_off_by_the_servers_without_a_request_failing() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    // The servers refuse options on a connection older than 800 ms (room for a TLS handshake
    // on a loaded machine); this process keeps its connections for an hour, as a client that
    // ignores its cap would.
    let age = Duration::from_millis(800);
    let (n1, n2, epoch) = two_nodes_aged(dir.path(), Duration::from_secs(10), age);
    control_conn::set_max_age(Duration::from_secs(3600));
    let (c1, c2) = (n1.exports.connections(), n2.exports.connections());
    // A renewal every 50 ms for 2.6 s: never idle, so only the servers' option age ends a
    // connection; each refused renewal is sent again on a new one.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2600) {
        assert_eq!(renew(&n2.addr, "f"), epoch);
        std::thread::sleep(Duration::from_millis(50));
    }
    // A create is not idempotent (a second run answers `exists`): on kept connections past
    // the age it is refused on both hops without being carried out, and sent again.
    std::thread::sleep(age + Duration::from_millis(100));
    common::create(&n2.addr, "g", MIB, false);
    control_conn::set_max_age(control_conn::DEFAULT_MAX_AGE);
    let closes = |n: &TestNode| n.stats.option_age_closes.load(Ordering::SeqCst);
    let (k1, k2) = (closes(&n1), closes(&n2));
    assert!(k2 >= 3, "node 2's server cut {k2} connections");
    assert!(k1 >= 3, "node 1's server cut {k1} connections");
    let (d1, d2) = (n1.exports.connections() - c1, n2.exports.connections() - c2);
    assert!(
        (k2..=k2 + 2).contains(&d2),
        "node 2: {d2} new connections, {k2} cut"
    );
    assert!(
        (k1..=k1 + 2).contains(&d1),
        "node 1: {d1} new connections, {k1} cut"
    );
    assert!(
        d2 <= 10 && d1 <= 10,
        "{d2} and {d1}: not a connection per request"
    );
    assert_eq!(n2.stats.handshake_timeouts.load(Ordering::SeqCst), 0);
    assert_eq!(n1.stats.handshake_timeouts.load(Ordering::SeqCst), 0);
}

#[test]
fn after_a_coordinator_change_the_old_connection_is_refused_and_renewals_reach_the_new_one() {
    let _one = serial();
    control_conn::set_idle_limit(control_conn::DEFAULT_IDLE_LIMIT);
    let dir = tempfile::tempdir().unwrap();
    let (n1, n2, epoch) = two_nodes(dir.path(), Duration::from_secs(10));
    let lun = dir.path().join("lun");
    let n3 = tls_node(&lun, 3, Start::Unaware, Duration::from_secs(10));
    // Node 1 steps down, node 3 takes office (generation 2); node 2 does not know it yet.
    n1.node.set_coordinator_deadline(0);
    n3.node.become_coordinator(2, u64::MAX).unwrap();
    // A forwarded renewal on the connection kept to node 1 (node 2's certificate, as node 2
    // would send it) is refused there: node 1 judges it on its own state.
    let stale = control::send(
        &n1.addr,
        Envelope {
            forwarded: true,
            request: Request::CoordLease {
                name: "f".into(),
                node: 2,
                epoch,
                action: LeaseAction::Acquire,
                renew: false,
            },
            from: Some((2, n2.addr.clone())),
        },
        TIMEOUT,
    )
    .expect_err("a deposed coordinator renews nothing");
    assert_eq!(stale.kind, ErrorKind::NotCoordinator, "{stale}");
    assert_eq!(
        n1.exports.connections(),
        1,
        "the refused request came on the kept connection"
    );
    // A renewal through node 2 now: node 2 forwards to node 1 (refused, retried every 100 ms)
    // until it learns of node 3, then renews there, on a new connection.
    let learn = {
        let (n2, l3) = (Arc::clone(&n2.node), leader_of(&n3, 2));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            n2.set_leader(Some(l3));
        })
    };
    assert_eq!(
        renew(&n2.addr, "f"),
        epoch,
        "renewed by the new coordinator"
    );
    learn.join().unwrap();
    assert_eq!(n3.exports.connections(), 1);
    assert_eq!(
        n1.exports.connections(),
        1,
        "node 1's refusals all came on the one kept connection"
    );
    for _ in 0..10 {
        assert_eq!(renew(&n2.addr, "f"), epoch);
    }
    assert_eq!(n3.exports.connections(), 1, "and the new one is kept");
}

/// CPU time of this process (client, node and coordinator together).
fn cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Lease renewals through a node to the coordinator over TLS, with every request on a new
/// connection (idle limit 0, as before connections were kept) and on kept connections: CPU per
/// renewal (both hops' client and server side, all in this process), printed for
/// docs/benchmarks.md. Kept connections must cost less than half: a TLS handshake on each hop
/// is most of a renewal's work.
#[test]
fn kept_connections_cost_a_fraction_of_a_handshake_per_renewal() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let (_n1, n2, epoch) = two_nodes(dir.path(), Duration::from_secs(10));
    const N: u32 = 300;
    let measure = |limit: Duration| {
        control_conn::set_idle_limit(limit);
        renew(&n2.addr, "f");
        let (c0, t0) = (cpu(), Instant::now());
        for _ in 0..N {
            assert_eq!(renew(&n2.addr, "f"), epoch);
        }
        (cpu() - c0, t0.elapsed())
    };
    let (fresh_cpu, fresh_wall) = measure(Duration::ZERO);
    let (kept_cpu, kept_wall) = measure(control_conn::DEFAULT_IDLE_LIMIT);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(N);
    eprintln!(
        "{N} renewals through node 2 to the coordinator over TLS, per renewal: new connections \
         {:.0} µs CPU ({:.0} µs wall), kept connections {:.0} µs CPU ({:.0} µs wall): {:.1}× less CPU",
        per(fresh_cpu),
        per(fresh_wall),
        per(kept_cpu),
        per(kept_wall),
        fresh_cpu.as_secs_f64() / kept_cpu.as_secs_f64()
    );
    assert!(
        kept_cpu * 2 < fresh_cpu,
        "kept connections {kept_cpu:?} vs new ones {fresh_cpu:?} for {N} renewals"
    );
}

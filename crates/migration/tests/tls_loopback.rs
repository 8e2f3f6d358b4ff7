//! Migrations over mutual TLS on loopback between in-memory VMs: the memory arrives intact, and every
//! foreign connection — plain TCP, a port scan, garbage, another CA, an expired certificate, a user
//! certificate, a wrong target name — is refused while the target keeps waiting for the real source.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{MemVm, VmState};
use tern_migration::{
    CancelToken, ConvergenceConfig, ListenGuard, MigrateError, MigrateOptions, Outcome,
    ReceiveError, ReceiveOptions, ReceiveReport, Rejected, TlsClient, migrate_with_tls,
    receive_guarded,
};
use tern_pki::{IssueOptions, Role, TlsDir};

const MIB: u64 = 1 << 20;

struct Pki {
    _tmp: tempfile::TempDir,
    ca: std::path::PathBuf,
}

impl Pki {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        tern_pki::init_ca(&ca).unwrap();
        Pki { _tmp: tmp, ca }
    }
    fn issue_with(&self, name: &str, role: Role, opts: &IssueOptions) -> Arc<TlsDir> {
        Arc::new(TlsDir::load(&tern_pki::issue(&self.ca, name, role, opts).unwrap()).unwrap())
    }
    fn issue(&self, name: &str, role: Role) -> Arc<TlsDir> {
        self.issue_with(name, role, &IssueOptions::default())
    }
    fn dir(&self) -> &Path {
        &self.ca
    }
}

type TargetResult = (MemVm, Result<ReceiveReport, ReceiveError>, Vec<String>);

fn spawn_target(
    mut tgt: MemVm,
    tls: Option<Arc<TlsDir>>,
    max_rejected: u32,
) -> (SocketAddr, JoinHandle<TargetResult>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = thread::spawn(move || {
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        let guard = ListenGuard {
            tls,
            max_rejected,
            on_rejected: Some(Arc::new(move |r: &Rejected| {
                log2.lock().unwrap().push(r.to_string())
            })),
            ..ListenGuard::default()
        };
        let opts = ReceiveOptions {
            accept_timeout: Some(Duration::from_secs(30)),
            handshake_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(10),
        };
        let r = receive_guarded(&listener, &mut tgt, &opts, &guard, &CancelToken::new());
        let log = log.lock().unwrap().clone();
        (tgt, r, log)
    });
    (addr, h)
}

fn opts(streams: u16) -> MigrateOptions {
    MigrateOptions {
        streams,
        verify_memory: true,
        convergence: ConvergenceConfig {
            timeout: Duration::from_secs(30),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn client(dir: &Arc<TlsDir>, target_name: &str) -> TlsClient {
    TlsClient {
        dir: dir.clone(),
        target_name: target_name.into(),
    }
}

/// Runs one migration attempt from a fresh source VM; returns the error of a failed one.
fn attempt(addr: SocketAddr, tls: Option<&TlsClient>) -> MigrateError {
    let mut src = MemVm::source(4 * MIB, 1);
    let r = migrate_with_tls(
        &mut src,
        addr,
        &opts(2),
        tls,
        &CancelToken::new(),
        &mut |_| {},
    );
    let f = r.expect_err("a foreign source migrated");
    assert!(f.report.outcome.source_runs(), "{:?}", f.report);
    assert_eq!(src.state(), VmState::Running);
    *f.error
}

#[test]
fn migrates_over_mutual_tls_with_verified_memory() {
    let pki = Pki::new();
    let a = pki.issue("node-a", Role::Host);
    let b = pki.issue("node-b", Role::Host);
    let (addr, h) = spawn_target(MemVm::target(32 * MIB, 1, 2000), Some(b), 64);
    let mut src = MemVm::source(32 * MIB, 2000);
    let report = migrate_with_tls(
        &mut src,
        addr,
        &opts(4),
        Some(&client(&a, "node-b")),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap();
    let (tgt, rr, log) = h.join().unwrap();
    let rr = rr.unwrap();
    assert_eq!(report.outcome, Outcome::Completed);
    assert_eq!(src.state(), VmState::Paused);
    assert_eq!(tgt.state(), VmState::Running);
    assert_eq!(
        src.snapshot, tgt.snapshot,
        "memory at resume = memory at pause"
    );
    assert_eq!(rr.rejected_connections, 0, "{log:?}");
}

#[test]
fn foreign_connections_are_dropped_and_the_real_source_still_migrates() {
    let pki = Pki::new();
    let other = Pki::new();
    let a = pki.issue("node-a", Role::Host);
    let b = pki.issue("node-b", Role::Host);
    let (addr, h) = spawn_target(MemVm::target(4 * MIB, 1, 1000), Some(b.clone()), 64);

    // A port scan: connect and close, several times; then garbage; then a silent connection
    // left open (it must not hold up anything).
    for _ in 0..5 {
        drop(TcpStream::connect(addr).unwrap());
    }
    let mut g = TcpStream::connect(addr).unwrap();
    g.write_all(b"\x16\x03\x01\x00\x05hello garbage that is not TLS")
        .unwrap();
    drop(g);
    let _silent = TcpStream::connect(addr).unwrap();

    // A plain-TCP source.
    let e = attempt(addr, None);
    assert!(
        matches!(e, MigrateError::Read(_) | MigrateError::Connection(_)),
        "{e:?}"
    );

    // A host certificate from another CA (trusting ours, so only the target's check can fail).
    let foreign_dir =
        tern_pki::issue(other.dir(), "node-x", Role::Host, &IssueOptions::default()).unwrap();
    std::fs::copy(
        pki.dir().join("ca-cert.pem"),
        foreign_dir.join("ca-cert.pem"),
    )
    .unwrap();
    let foreign = Arc::new(TlsDir::load(&foreign_dir).unwrap());
    attempt(addr, Some(&client(&foreign, "node-b")));

    // An expired host certificate of our CA.
    let expired = pki.issue_with(
        "node-old",
        Role::Host,
        &IssueOptions {
            valid_days: 1,
            not_before_offset_days: -5,
            ..IssueOptions::default()
        },
    );
    attempt(addr, Some(&client(&expired, "node-b")));

    // A valid user certificate: the target takes VMs from hosts only.
    let alice = pki.issue("alice", Role::User);
    attempt(addr, Some(&client(&alice, "node-b")));

    // The source expecting another target name refuses the target itself.
    match attempt(addr, Some(&client(&a, "node-c"))) {
        MigrateError::Connect { source, .. } => {
            assert!(
                source.to_string().contains("not valid for name \"node-c\""),
                "{source}"
            )
        }
        other => panic!("{other:?}"),
    }

    // The real source.
    let mut src = MemVm::source(4 * MIB, 1000);
    let report = migrate_with_tls(
        &mut src,
        addr,
        &opts(2),
        Some(&client(&a, "node-b")),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(report.outcome, Outcome::Completed);
    let (tgt, rr, log) = h.join().unwrap();
    let rr = rr.unwrap();
    assert_eq!(tgt.state(), VmState::Running);
    assert_eq!(src.snapshot, tgt.snapshot);
    let all = log.join("\n");
    // 5 scans + garbage + plain + foreign CA + expired + user (+ the wrong-name attempt, which the
    // target sees as a client that hung up mid-handshake).
    assert!(
        rr.rejected_connections >= 10,
        "{}: {all}",
        rr.rejected_connections
    );
    for needle in [
        "UnknownIssuer",
        "certificate expired",
        "role user",
        "closed the connection",
        "not TLS",
    ] {
        assert!(all.contains(needle), "no {needle:?} in the log:\n{all}");
    }
}

#[test]
fn a_plain_receiver_drops_a_scan_and_garbage_too() {
    let (addr, h) = spawn_target(MemVm::target(4 * MIB, 1, 1000), None, 64);
    drop(TcpStream::connect(addr).unwrap());
    let mut g = TcpStream::connect(addr).unwrap();
    g.write_all(&[0xff; 64]).unwrap();
    drop(g);
    let mut src = MemVm::source(4 * MIB, 1000);
    let report = migrate_with_tls(
        &mut src,
        addr,
        &opts(2),
        None,
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(report.outcome, Outcome::Completed);
    let (tgt, rr, _) = h.join().unwrap();
    assert_eq!(rr.unwrap().rejected_connections, 2);
    assert_eq!(src.snapshot, tgt.snapshot);
}

#[test]
fn receive_gives_up_after_too_many_foreign_connections() {
    let pki = Pki::new();
    let b = pki.issue("node-b", Role::Host);
    let (addr, h) = spawn_target(MemVm::target(4 * MIB, 1, 1000), Some(b), 3);
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(b"plain");
    }
    let (tgt, rr, log) = h.join().unwrap();
    match rr {
        Err(ReceiveError::TooManyRejected { count: 3, .. }) => {}
        other => panic!("{other:?} {log:?}"),
    }
    assert_ne!(tgt.state(), VmState::Running);
}

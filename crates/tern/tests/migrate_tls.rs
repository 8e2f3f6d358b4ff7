//! Live migration of the KVM test guest over mutual TLS between two `tern` processes on loopback,
//! with certificates from `tern pki`; and a `tern vm receive --tls-dir` that drops everything but
//! the real source — a port scan, garbage, a plain-TCP source, a host certificate of another CA, an
//! expired host certificate, a user certificate — and then still takes the real source's VM.
//! Needs root and /dev/kvm.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::{MigrationPair, pki, tern_cmd};
use tern_pki::{IssueOptions, Role};

fn completed(report: &serde_json::Value, rc: i32, err: &str) {
    assert_eq!(rc, 0, "migrate failed: {err}\nreport: {report}");
    assert_eq!(report["outcome"], "completed", "report: {report}");
}

/// A migration attempt that must fail with the source VM still running.
fn refused(p: &mut MigrationPair, what: &str, extra: &[&str]) {
    let (rc, report, err) = p.migrate(extra);
    assert_ne!(rc, 0, "{what}: the migration must fail; report {report}");
    assert_ne!(report["outcome"], "completed", "{what}: {report}\n{err}");
    // The source is untouched: still running, still beating.
    let (rc, out, err) = tern_cmd(&["vm", "status", "--api-sock", p.src_sock.to_str().unwrap()]);
    assert_eq!(rc, 0, "{what}: status: {err}");
    assert!(out.contains("\"running\""), "{what}: source status {out}");
    // The target is still waiting.
    assert!(
        p.dst.child.try_wait().unwrap().is_none(),
        "{what}: `tern vm receive` ended:\n{}",
        p.dst.stderr()
    );
}

#[test]
fn live_migration_over_mutual_tls_with_verified_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = pki(tmp.path(), &[("node-a", "host"), ("node-b", "host")]);
    let dst_dir = ca.join("node-b");
    let src_dir = ca.join("node-a");
    let mut p = MigrationPair::start(
        64,
        1,
        "tern.hb_ms=50 tern.dirty_mib=32 tern.dirty_rate=5000",
        &["--tls-dir", dst_dir.to_str().unwrap()],
    );
    assert!(
        p.dst.stderr().contains("(mutual TLS)"),
        "{}",
        p.dst.stderr()
    );
    let (rc, report, err) = p.migrate(&[
        "--verify-memory",
        "--tls-dir",
        src_dir.to_str().unwrap(),
        "--tls-name",
        "node-b",
    ]);
    completed(&report, rc, &err);
    p.assert_moved();
    assert!(
        !p.dst.stderr().contains("dropped a connection"),
        "{}",
        p.dst.stderr()
    );
}

#[test]
fn foreign_connections_are_refused_and_the_real_source_still_migrates() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = pki(
        tmp.path(),
        &[("node-a", "host"), ("node-b", "host"), ("alice", "user")],
    );
    // A host certificate of another CA; it trusts ours (public) so that only the target's check
    // of its certificate can fail.
    let other = pki(&tmp.path().join("other"), &[("node-x", "host")]);
    let foreign = other.join("node-x");
    std::fs::copy(ca.join("ca-cert.pem"), foreign.join("ca-cert.pem")).unwrap();
    // An expired host certificate of our CA.
    let expired = tern_pki::issue(
        &ca,
        "node-old",
        Role::Host,
        &IssueOptions {
            valid_days: 1,
            not_before_offset_days: -3,
            ..IssueOptions::default()
        },
    )
    .unwrap();

    let dst_dir = ca.join("node-b");
    let mut p = MigrationPair::start(
        64,
        1,
        "tern.hb_ms=50",
        &["--tls-dir", dst_dir.to_str().unwrap()],
    );
    let addr = format!("127.0.0.1:{}", p.port);

    // A port scan: connect and close, several times; garbage; a silent connection left open.
    for _ in 0..5 {
        drop(TcpStream::connect(&addr).unwrap());
    }
    let mut g = TcpStream::connect(&addr).unwrap();
    g.write_all(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01garbage")
        .unwrap();
    drop(g);
    let _silent = TcpStream::connect(&addr).unwrap();

    refused(&mut p, "plain TCP", &[]);
    let with = |dir: &Path| {
        vec![
            "--tls-dir".to_string(),
            dir.to_str().unwrap().to_string(),
            "--tls-name".to_string(),
            "node-b".to_string(),
        ]
    };
    for (what, dir) in [
        ("another CA", foreign.clone()),
        ("an expired certificate", expired.clone()),
        ("a user certificate", ca.join("alice")),
    ] {
        let args = with(&dir);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&mut p, what, &args);
    }

    let args = with(&ca.join("node-a"));
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.push("--verify-memory");
    let (rc, report, err) = p.migrate(&args);
    completed(&report, rc, &err);
    p.assert_moved();

    let log = p.dst.stderr();
    for needle in [
        "the peer closed the connection during the handshake",
        "not TLS",
        "UnknownIssuer",
        "certificate expired",
        "Peer alice has role user, but only host is accepted here",
    ] {
        assert!(
            log.contains(needle),
            "no {needle:?} in the target's log:\n{log}"
        );
    }
}

#[test]
fn a_source_with_tls_refuses_a_target_of_another_name() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = pki(tmp.path(), &[("node-a", "host"), ("node-b", "host")]);
    let mut p = MigrationPair::start(
        64,
        1,
        "tern.hb_ms=50",
        &["--tls-dir", ca.join("node-b").to_str().unwrap()],
    );
    let src = ca.join("node-a");
    let (rc, report, err) =
        p.migrate(&["--tls-dir", src.to_str().unwrap(), "--tls-name", "node-c"]);
    assert_ne!(rc, 0, "{report}");
    assert!(
        err.contains("not valid for name \"node-c\""),
        "{err}\n{report}"
    );
    // Then the right name works on the same pair.
    std::thread::sleep(Duration::from_millis(100));
    let (rc, report, err) =
        p.migrate(&["--tls-dir", src.to_str().unwrap(), "--tls-name", "node-b"]);
    completed(&report, rc, &err);
    p.assert_moved();
}

#[test]
fn a_source_refuses_a_target_revoked_after_it_started() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = pki(tmp.path(), &[("node-a", "host"), ("node-b", "host")]);
    // The target loaded its certificate before the revocation: it keeps presenting it.
    let mut p = MigrationPair::start(
        64,
        1,
        "tern.hb_ms=50",
        &["--tls-dir", ca.join("node-b").to_str().unwrap()],
    );
    // `tern pki revoke` writes the list into every issued directory, the source's too; the
    // source's VMM gets its text with the PEM handed over by `tern vm migrate`.
    tern_pki::revoke(&ca, "node-b").unwrap();
    let src = ca.join("node-a");
    let args = ["--tls-dir", src.to_str().unwrap(), "--tls-name", "node-b"];
    let (rc, report, err) = p.migrate(&args);
    assert_ne!(rc, 0, "migrated to a revoked target: {report}");
    assert!(err.contains("Revoked"), "{err}\n{report}");
    refused(&mut p, "a revoked target", &args);
}

//! Mutual-TLS handshakes over loopback TCP between certificates issued by `tern-pki`: the chain is
//! verified both ways, identities are read back, and every foreign peer is refused.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use tern_pki::{
    HandshakeError, InitError, IssueError, IssueOptions, LoadError, PeerError, Role, TlsDir,
};

const DEADLINE: Duration = Duration::from_secs(5);

fn ca() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    tern_pki::init_ca(d.path()).unwrap();
    d
}

fn issue(ca: &Path, name: &str, role: Role) -> TlsDir {
    TlsDir::load(&tern_pki::issue(ca, name, role, &IssueOptions::default()).unwrap()).unwrap()
}

/// Runs one handshake: the server side in a thread (it echoes one line after the handshake), the
/// client side here, expecting the server under `name`. Returns both sides' results.
/// What each side of one handshake saw: the server the client's identity; the client the server's
/// identity and the echoed bytes.
type Outcome = (
    Result<tern_pki::Identity, HandshakeError>,
    Result<(tern_pki::Identity, Vec<u8>), String>,
);

fn issue_watching(ca: &Path, name: &str, role: Role) -> TlsDir {
    let dir = tern_pki::issue(ca, name, role, &IssueOptions::default()).unwrap();
    TlsDir::load_watching(&dir).unwrap()
}

fn handshake(server: &TlsDir, client: &TlsDir, name: &str) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = server.server_config();
    let srv = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let (mut s, id) = tern_pki::accept(cfg, tcp, DEADLINE)?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        s.flush().unwrap();
        Ok(id)
    });
    let tcp = TcpStream::connect(addr).unwrap();
    let client_result = tern_pki::connect(
        client.client_config(),
        TlsDir::server_name(name),
        tcp,
        DEADLINE,
    )
    .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))
    .and_then(|(mut s, id)| {
        s.write_all(b"hello").map_err(|e| e.to_string())?;
        let mut back = vec![0u8; 5];
        s.read_exact(&mut back).map_err(|e| e.to_string())?;
        Ok((id, back))
    });
    (srv.join().unwrap(), client_result)
}

#[test]
fn chain_verifies_and_each_side_reads_the_others_name_and_role() {
    let ca = ca();
    let a = issue(ca.path(), "node-a", Role::Host);
    let b = issue(ca.path(), "ctl", Role::Controller);
    let (srv, cli) = handshake(&a, &b, "node-a");
    let seen_by_server = srv.unwrap();
    assert_eq!(seen_by_server.name, "ctl");
    assert_eq!(seen_by_server.role, Role::Controller);
    let (seen_by_client, echoed) = cli.unwrap();
    assert_eq!(seen_by_client.name, "node-a");
    assert_eq!(seen_by_client.role, Role::Host);
    assert_eq!(echoed, b"hello");
    // The server certificate is also valid for the loopback address and localhost.
    for n in ["127.0.0.1", "localhost"] {
        let (srv, cli) = handshake(&a, &b, n);
        srv.unwrap();
        cli.unwrap();
    }
}

#[test]
fn a_client_from_another_ca_is_refused_by_the_server() {
    let ours = ca();
    let theirs = ca();
    let a = issue(ours.path(), "node-a", Role::Host);
    // The intruder trusts our CA (its certificate is public) but holds one from another CA.
    let dir = tern_pki::issue(
        theirs.path(),
        "node-b",
        Role::Host,
        &IssueOptions::default(),
    )
    .unwrap();
    std::fs::copy(ours.path().join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
    let intruder = TlsDir::load(&dir).unwrap();
    let (srv, cli) = handshake(&a, &intruder, "node-a");
    match srv {
        Err(HandshakeError::Tls(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ))) => {}
        other => panic!("server accepted a foreign CA's client: {other:?}"),
    }
    // The client learns it on its first read (TLS 1.3 checks the client after the server finished).
    assert!(cli.is_err(), "{cli:?}");
}

#[test]
fn a_server_from_another_ca_is_refused_by_the_client() {
    let ours = ca();
    let theirs = ca();
    let b = issue(ours.path(), "node-b", Role::Host);
    let dir = tern_pki::issue(
        theirs.path(),
        "node-a",
        Role::Host,
        &IssueOptions::default(),
    )
    .unwrap();
    std::fs::copy(ours.path().join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
    let impostor = TlsDir::load(&dir).unwrap();
    let (srv, cli) = handshake(&impostor, &b, "node-a");
    let err = cli.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(srv.is_err());
}

#[test]
fn an_expired_certificate_is_refused() {
    let ca = ca();
    let a = issue(ca.path(), "node-a", Role::Host);
    let expired_dir = tern_pki::issue(
        ca.path(),
        "old",
        Role::Host,
        &IssueOptions {
            sans: vec![],
            valid_days: 1,
            not_before_offset_days: -10,
        },
    )
    .unwrap();
    let old = TlsDir::load(&expired_dir).unwrap();
    let (srv, _) = handshake(&a, &old, "node-a");
    match srv {
        Err(HandshakeError::Tls(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ExpiredContext { .. } | rustls::CertificateError::Expired,
        ))) => {}
        other => panic!("server accepted an expired client certificate: {other:?}"),
    }
    // And an expired server is refused by the client.
    let (_, cli) = handshake(&old, &a, "old");
    let err = cli.unwrap_err();
    assert!(err.contains("Expired"), "{err}");
}

#[test]
fn a_user_certificate_is_valid_but_distinguishable_from_a_host() {
    let ca = ca();
    let a = issue(ca.path(), "node-a", Role::Host);
    let alice = issue(ca.path(), "alice", Role::User);
    let (srv, cli) = handshake(&a, &alice, "node-a");
    let id = srv.unwrap();
    cli.unwrap();
    assert_eq!(id.role, Role::User);
    assert_eq!(
        id.require_role(Role::Host),
        Err(PeerError::WrongRole {
            name: "alice".into(),
            role: Role::User,
            expected: Role::Host
        })
    );
    assert_eq!(
        id.require_role(Role::Host).unwrap_err().to_string(),
        "Peer alice has role user, but only host is accepted here"
    );
}

#[test]
fn the_client_checks_the_server_name() {
    let ca = ca();
    let a = issue(ca.path(), "node-a", Role::Host);
    let b = issue(ca.path(), "node-b", Role::Host);
    let (_, cli) = handshake(&a, &b, "node-c");
    let err = cli.unwrap_err();
    assert!(err.contains("NotValidForName"), "{err}");
    // An extra --san is honoured.
    let dir = tern_pki::issue(
        ca.path(),
        "node-d",
        Role::Host,
        &IssueOptions {
            sans: vec!["10.1.2.3".into(), "d.example".into()],
            ..IssueOptions::default()
        },
    )
    .unwrap();
    let d = TlsDir::load(&dir).unwrap();
    for n in ["node-d", "10.1.2.3", "d.example"] {
        let (srv, cli) = handshake(&d, &b, n);
        srv.unwrap();
        cli.unwrap();
    }
}

#[test]
fn plain_tcp_garbage_a_closed_scan_and_a_silent_peer_fail_the_handshake() {
    let ca = ca();
    let a = issue(ca.path(), "node-a", Role::Host);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();

    // Plain bytes (a migration frame header, an HTTP request...).
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let (tcp, _) = listener.accept().unwrap();
    match tern_pki::accept(a.server_config(), tcp, DEADLINE) {
        Err(HandshakeError::Tls(_)) => {}
        other => panic!("plain bytes: {:?}", other.map(|(_, id)| id)),
    }

    // Connect and close (a port scan).
    drop(TcpStream::connect(addr).unwrap());
    let (tcp, _) = listener.accept().unwrap();
    match tern_pki::accept(a.server_config(), tcp, DEADLINE) {
        Err(HandshakeError::Closed) => {}
        other => panic!("closed scan: {:?}", other.map(|(_, id)| id)),
    }

    // Connect and say nothing: the deadline ends it.
    let _silent = TcpStream::connect(addr).unwrap();
    let (tcp, _) = listener.accept().unwrap();
    let t0 = Instant::now();
    match tern_pki::accept(a.server_config(), tcp, Duration::from_millis(300)) {
        Err(HandshakeError::Timeout { .. }) => {}
        other => panic!("silent peer: {:?}", other.map(|(_, id)| id)),
    }
    assert!(t0.elapsed() < Duration::from_secs(3));
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn files_use_qemu_names_and_private_modes() {
    let ca = ca();
    assert_eq!(mode(&ca.path().join("ca-key.pem")), 0o600);
    assert_eq!(mode(&ca.path().join("ca-cert.pem")), 0o644);
    let dir: PathBuf =
        tern_pki::issue(ca.path(), "node-a", Role::Host, &IssueOptions::default()).unwrap();
    assert_eq!(dir, ca.path().join("node-a"));
    assert_eq!(mode(&dir), 0o700);
    for (f, m) in [
        ("ca-cert.pem", 0o644),
        ("server-cert.pem", 0o644),
        ("client-cert.pem", 0o644),
        ("server-key.pem", 0o600),
        ("client-key.pem", 0o600),
    ] {
        assert_eq!(mode(&dir.join(f)), m, "{f}");
    }
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    assert_eq!(read("server-cert.pem"), read("client-cert.pem"));
    assert_eq!(read("server-key.pem"), read("client-key.pem"));
    assert_eq!(
        read("ca-cert.pem"),
        std::fs::read(ca.path().join("ca-cert.pem")).unwrap()
    );
    assert!(!dir.join("ca-key.pem").exists());

    // A key readable by others is refused at load.
    std::fs::set_permissions(
        dir.join("server-key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    match TlsDir::load(&dir) {
        Err(LoadError::KeyPermissions { mode: 0o644, .. }) => {}
        other => panic!("{other:?}"),
    }
    // A directory without certificates names what is missing.
    let empty = tempfile::tempdir().unwrap();
    let e = TlsDir::load(empty.path()).unwrap_err();
    assert!(e.to_string().contains("server-cert.pem is missing"), "{e}");
}

#[test]
fn init_refuses_to_replace_a_ca_unless_asked_and_issue_needs_one() {
    let ca = ca();
    let before = std::fs::read(ca.path().join("ca-key.pem")).unwrap();
    match tern_pki::init_ca(ca.path()) {
        Err(InitError::Exists { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(ca.path().join("ca-key.pem")).unwrap(), before);
    tern_pki::init_ca_with(ca.path(), true).unwrap();
    assert_ne!(std::fs::read(ca.path().join("ca-key.pem")).unwrap(), before);

    let none = tempfile::tempdir().unwrap();
    match tern_pki::issue(none.path(), "a", Role::Host, &IssueOptions::default()) {
        Err(IssueError::NoCa {
            file: "ca-cert.pem",
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    for (name, opts) in [
        ("../evil", IssueOptions::default()),
        (
            "a",
            IssueOptions {
                valid_days: 0,
                ..IssueOptions::default()
            },
        ),
        (
            "a",
            IssueOptions {
                valid_days: 100_000,
                ..IssueOptions::default()
            },
        ),
        (
            "a",
            IssueOptions {
                sans: vec!["not a name".into()],
                ..IssueOptions::default()
            },
        ),
    ] {
        assert!(
            tern_pki::issue(ca.path(), name, Role::Host, &opts).is_err(),
            "{name} {opts:?}"
        );
    }
    assert!(!ca.path().join("../evil").exists());
}

#[test]
fn a_revoked_certificate_is_refused_both_ways_by_running_configurations() {
    let ca = ca();
    // Loaded before the revocation: these configurations follow the CRL file as it changes.
    let server = issue_watching(ca.path(), "node-a", Role::Host);
    let client = issue_watching(ca.path(), "ctl", Role::Controller);
    let other = issue_watching(ca.path(), "ctl-2", Role::Controller);
    // Read once (what a sandboxed VMM uses): it keeps the list it loaded.
    let fixed = TlsDir::load(server.dir()).unwrap();
    let (srv, cli) = handshake(&server, &client, "node-a");
    srv.unwrap();
    cli.unwrap();

    let r = tern_pki::revoke(ca.path(), "ctl").unwrap();
    assert!(!r.already);
    let (srv, cli) = handshake(&server, &client, "node-a");
    match srv {
        Err(HandshakeError::Tls(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Revoked,
        ))) => {}
        other => panic!("server accepted a revoked client: {other:?}"),
    }
    let cli = cli.unwrap_err();
    assert!(cli.contains("CertificateRevoked"), "{cli}");
    let (srv, cli) = handshake(&fixed, &client, "node-a");
    assert_eq!(
        srv.unwrap().name,
        "ctl",
        "a fixed configuration read the file again"
    );
    cli.unwrap();
    // Loaded again, it has the new list.
    let reloaded = TlsDir::load(server.dir()).unwrap();
    let (srv, _) = handshake(&reloaded, &client, "node-a");
    assert!(srv.is_err(), "{srv:?}");
    // So does one built from PEM with the list's text (a VMM's, handed over by its parent).
    let pem = tern_pki::PemFiles::read(server.dir()).unwrap();
    let crl = tern_pki::PemFiles::read_crl(server.dir()).unwrap();
    let from_pem = TlsDir::from_pem_with_crl(server.dir(), &pem, crl.as_deref()).unwrap();
    let (srv, _) = handshake(&from_pem, &client, "node-a");
    assert!(srv.is_err(), "{srv:?}");
    // An unrevoked client of the same CA is still served.
    let (srv, cli) = handshake(&server, &other, "node-a");
    assert_eq!(srv.unwrap().name, "ctl-2");
    cli.unwrap();

    // A revoked server (by serial this time) is refused by its clients.
    let serial = tern_pki::serial_hex(&tern_pki::serial_of(server.dir()).unwrap());
    tern_pki::revoke(ca.path(), &serial).unwrap();
    let (srv, cli) = handshake(&server, &other, "node-a");
    assert!(srv.is_err());
    let cli = cli.unwrap_err();
    assert!(cli.contains("Revoked"), "{cli}");
}

#[test]
fn a_damaged_revocation_list_is_refused_at_load() {
    let ca = ca();
    let dir = tern_pki::issue(ca.path(), "node-a", Role::Host, &IssueOptions::default()).unwrap();
    std::fs::write(dir.join("ca-crl.pem"), "not a CRL").unwrap();
    match TlsDir::load(&dir) {
        Err(LoadError::Crl { path, .. }) => assert_eq!(path, dir.join("ca-crl.pem")),
        other => panic!("loaded with a damaged CRL: {other:?}"),
    }
}

#[test]
fn the_optional_client_verifier_serves_certificate_less_clients_but_refuses_revoked_ones() {
    let ca = ca();
    let server = issue_watching(ca.path(), "ctl", Role::Controller);
    let user = issue_watching(ca.path(), "alice", Role::User);
    let v = server.optional_client_verifier();
    assert!(!v.client_auth_mandatory());
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(v)
            .with_single_cert(
                rustls::pki_types::CertificateDer::pem_file_iter(
                    server.dir().join("server-cert.pem"),
                )
                .unwrap()
                .map(Result::unwrap)
                .collect(),
                rustls::pki_types::PrivateKeyDer::from_pem_file(
                    server.dir().join("server-key.pem"),
                )
                .unwrap(),
            )
            .unwrap(),
    );
    let serve = |client: std::sync::Arc<rustls::ClientConfig>| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = cfg.clone();
        let srv = thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(cfg).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut buf = [0u8; 2];
            s.read_exact(&mut buf)
                .map(|()| s.conn.peer_certificates().is_some())
        });
        let tcp = TcpStream::connect(addr).unwrap();
        let conn = rustls::ClientConnection::new(client, TlsDir::server_name("ctl")).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let w = s.write_all(b"hi").and_then(|()| s.flush());
        let mut buf = [0u8; 1];
        let r = s.read(&mut buf);
        (srv.join().unwrap(), w.and(r.map(|_| ())))
    };
    use rustls::pki_types::pem::PemObject;
    // No certificate: served (a token client).
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            rustls::pki_types::CertificateDer::from_pem_file(ca.path().join("ca-cert.pem"))
                .unwrap(),
        )
        .unwrap();
    let anonymous = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    assert!(!serve(anonymous).0.unwrap(), "no certificate expected");
    // A valid certificate: served and seen.
    assert!(serve(user.client_config()).0.unwrap());
    // Revoked: refused, and the client reads the alert naming it.
    tern_pki::revoke(ca.path(), "alice").unwrap();
    let (srv, cli) = serve(user.client_config());
    let srv = srv.unwrap_err().to_string();
    assert!(srv.contains("Revoked"), "{srv}");
    let cli = cli.unwrap_err().to_string();
    assert!(cli.contains("CertificateRevoked"), "{cli}");
}

//! NBD over TLS (`NBD_OPT_STARTTLS`, mutual x509) and the bounded listener, between Tern's own
//! server and client; the standard tools are in `tls_interop.rs`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_nbd::proto::*;
use tern_nbd::{
    Client, ClientError, ClientTls, FileBackend, ListenerOptions, ListenerStats, PeerId, ServerTls,
    StaticExports,
};
use tern_pki::{IssueOptions, Role, TlsDir};

const SIZE: u64 = 1 << 20;

struct Pki {
    _dir: tempfile::TempDir,
    ca: std::path::PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        tern_pki::init_ca(&ca).unwrap();
        Pki { _dir: dir, ca }
    }
    fn issue(&self, name: &str, role: Role) -> TlsDir {
        let d = tern_pki::issue(&self.ca, name, role, &IssueOptions::default()).unwrap();
        TlsDir::load(&d).unwrap()
    }
}

fn server_tls(dir: &TlsDir) -> ServerTls {
    ServerTls {
        config: dir.server_config(),
        identify: Arc::new(|c| {
            tern_pki::peer_identity(c)
                .map(|i| PeerId {
                    name: i.name,
                    role: i.role.to_string(),
                })
                .map_err(|e| e.to_string())
        }),
    }
}

fn client_tls(dir: &TlsDir) -> ClientTls {
    ClientTls {
        config: dir.client_config(),
        server_name: None,
    }
}

fn exports(path: &Path) -> Arc<StaticExports> {
    let mut ex = StaticExports::new();
    ex.insert("disk", Arc::new(FileBackend::open(path, false).unwrap()));
    Arc::new(ex)
}

/// A listener on a free port, with `opts`; its address and counters.
/// Serves `ex` (any exports: static disks, or the control echo below) on a fresh loopback port.
fn listen<E: tern_nbd::Exports + 'static>(
    ex: Arc<E>,
    opts: ListenerOptions,
) -> (String, Arc<ListenerStats>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let stats = Arc::new(ListenerStats::default());
    let st = Arc::clone(&stats);
    std::thread::spawn(move || tern_nbd::run_listener_with(l, ex, opts, st));
    (addr, stats)
}

fn disk() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(SIZE).unwrap();
    f
}

const T: Duration = Duration::from_secs(10);

/// The legitimate client still gets through: write a pattern, read it back.
fn check_serves(addr: &str, tls: &ClientTls, seed: u8) {
    let mut c = Client::connect_tls(addr, "disk", T, Some(tls)).expect("TLS client served");
    let data: Vec<u8> = (0..65536u32).map(|i| (i as u8) ^ seed).collect();
    c.write(4096, &data, true).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(4096, &mut back).unwrap();
    assert_eq!(back, data);
    c.disconnect().unwrap();
}

fn tls_opts(dir: &TlsDir) -> ListenerOptions {
    ListenerOptions {
        tls: Some(server_tls(dir)),
        log_prefix: Some("nbd test server".into()),
        ..ListenerOptions::default()
    }
}

#[test]
fn starttls_client_reads_and_writes_and_the_data_reaches_the_file() {
    let pki = Pki::new();
    let (srv, cli) = (pki.issue("srv", Role::Host), pki.issue("cli", Role::Host));
    let f = disk();
    let (addr, _) = listen(exports(f.path()), tls_opts(&srv));
    let tls = client_tls(&cli);
    // Large requests too: records split and joined across TLS frames both ways.
    let mut c = Client::connect_tls(&addr, "disk", T, Some(&tls)).unwrap();
    assert_eq!(c.size(), SIZE);
    let big: Vec<u8> = (0..SIZE as u32).map(|i| (i >> 7) as u8).collect();
    c.write(0, &big, false).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; SIZE as usize];
    c.read(0, &mut back).unwrap();
    assert_eq!(back, big);
    c.disconnect().unwrap();
    assert_eq!(std::fs::read(f.path()).unwrap(), big);
    // The pipelining client over TLS: many requests in flight from several threads.
    let sc = Arc::new(tern_nbd::SharedClient::connect_tls(&addr, "disk", T, Some(&tls)).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let sc = Arc::clone(&sc);
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    let off = (t * 64 + i) * 4096;
                    let d = vec![(t * 64 + i) as u8; 4096];
                    sc.write(off, &d, false).unwrap();
                    let mut b = vec![0u8; 4096];
                    sc.read(off, &mut b).unwrap();
                    assert_eq!(b, d);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_plain_client_is_refused_and_the_tls_client_still_served() {
    let pki = Pki::new();
    let (srv, cli) = (pki.issue("srv", Role::Host), pki.issue("cli", Role::Host));
    let f = disk();
    let (addr, _) = listen(exports(f.path()), tls_opts(&srv));
    // GO without TLS: NBD_REP_ERR_TLS_REQD.
    match Client::connect_timeout(&addr, "disk", T) {
        Err(ClientError::Refused { reply, .. }) => assert_eq!(reply, REP_ERR_TLS_REQD),
        other => panic!("plain GO on a TLS server: {other:?}"),
    }
    match tern_nbd::list_exports(&addr) {
        Err(ClientError::Refused { reply, .. }) => assert_eq!(reply, REP_ERR_TLS_REQD),
        other => panic!("plain LIST on a TLS server: {other:?}"),
    }
    // NBD_OPT_EXPORT_NAME without TLS has no error reply: the server closes.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .unwrap();
    s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    s.write_all(&OPT_EXPORT_NAME.to_be_bytes()).unwrap();
    s.write_all(&4u32.to_be_bytes()).unwrap();
    s.write_all(b"disk").unwrap();
    let mut rest = Vec::new();
    // Closed without a byte of export data (an orderly end, or a reset: either way nothing).
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no export data without TLS: {rest:?}");
    check_serves(&addr, &client_tls(&cli), 1);
}

#[test]
fn starttls_is_invalid_inside_tls_and_unsupported_on_a_plain_server() {
    let pki = Pki::new();
    let (srv, cli) = (pki.issue("srv", Role::Host), pki.issue("cli", Role::Host));
    let f = disk();
    let (plain_addr, _) = listen(exports(f.path()), ListenerOptions::default());
    match Client::connect_tls(&plain_addr, "disk", T, Some(&client_tls(&cli))) {
        Err(ClientError::Refused { reply, .. }) => assert_eq!(reply, REP_ERR_UNSUP),
        other => panic!("STARTTLS on a plain server: {other:?}"),
    }
    let (addr, _) = listen(exports(f.path()), tls_opts(&srv));
    // A second STARTTLS, inside TLS: NBD_REP_ERR_INVALID, and the session goes on.
    let tls = client_tls(&cli);
    let reply = tern_nbd::control_tls(&addr, b"x", T, Some(&tls));
    // The server has no control handler: unsupported, but answered inside TLS.
    assert!(
        matches!(reply, Err(ClientError::Refused { reply, .. }) if reply == REP_ERR_UNSUP),
        "{reply:?}"
    );
    check_serves(&addr, &tls, 2);
}

#[test]
fn foreign_ca_expired_and_missing_client_certificates_are_refused() {
    let pki = Pki::new();
    let (srv, cli) = (pki.issue("srv", Role::Host), pki.issue("cli", Role::Host));
    let other = Pki::new();
    let stranger = other.issue("cli", Role::Host);
    let expired = {
        let d = tern_pki::issue(
            &pki.ca,
            "old",
            Role::Host,
            &IssueOptions {
                valid_days: 1,
                not_before_offset_days: -10,
                ..IssueOptions::default()
            },
        )
        .unwrap();
        TlsDir::load(&d).unwrap()
    };
    let f = disk();
    let (addr, _) = listen(exports(f.path()), tls_opts(&srv));
    for (what, dir) in [("foreign CA", &stranger), ("expired", &expired)] {
        let res = Client::connect_tls(&addr, "disk", T, Some(&client_tls(dir)));
        assert!(res.is_err(), "{what} client certificate accepted");
    }
    // A client without any certificate (trusting the right CA).
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        let pem = std::fs::read(pki.ca.join("ca-cert.pem")).unwrap();
        for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
            let c: rustls::pki_types::CertificateDer<'static> = c.unwrap();
            r.add(c).unwrap();
        }
        r
    };
    // The same provider tern-pki builds its configurations with.
    #[allow(deprecated)]
    let anon = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let res = Client::connect_tls(
        &addr,
        "disk",
        T,
        Some(&ClientTls {
            config: Arc::new(anon),
            server_name: None,
        }),
    );
    assert!(res.is_err(), "client without a certificate accepted");
    // A server from another CA is refused by our client, too.
    let f2 = disk();
    let (addr2, _) = listen(
        exports(f2.path()),
        tls_opts(&other.issue("srv", Role::Host)),
    );
    assert!(matches!(
        Client::connect_tls(&addr2, "disk", T, Some(&client_tls(&cli))),
        Err(ClientError::Tls(_))
    ));
    check_serves(&addr, &client_tls(&cli), 3);
}

#[test]
fn a_silent_connection_is_closed_at_the_handshake_deadline() {
    let f = disk();
    let (addr, stats) = listen(
        exports(f.path()),
        ListenerOptions {
            handshake_timeout: Duration::from_millis(300),
            ..ListenerOptions::default()
        },
    );
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let t0 = Instant::now();
    let mut all = Vec::new();
    // The greeting comes, then nothing: the server closes after the deadline.
    let _ = s.read_to_end(&mut all);
    assert_eq!(all.len(), 18, "greeting only");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(
        stats
            .handshake_timeouts
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // A client that selects its export in time is not cut at the deadline.
    let mut c = Client::connect_timeout(&addr, "disk", T).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let mut b = [0u8; 512];
    c.read(0, &mut b).unwrap();
}

#[test]
fn idle_timeout_closes_a_connection_that_stops_sending_requests() {
    let f = disk();
    let (addr, stats) = listen(
        exports(f.path()),
        ListenerOptions {
            idle_timeout: Some(Duration::from_millis(300)),
            ..ListenerOptions::default()
        },
    );
    let mut c = Client::connect_timeout(&addr, "disk", T).unwrap();
    let mut b = [0u8; 512];
    c.read(0, &mut b).unwrap();
    std::thread::sleep(Duration::from_millis(900));
    assert!(c.read(0, &mut b).is_err(), "idle connection still served");
    tern_test_support::wait_for("the idle connection's slot freed", T, || {
        stats.live.load(std::sync::atomic::Ordering::SeqCst) == 0
    });
}

#[test]
fn connections_over_the_cap_are_closed_at_once_and_served_once_a_slot_frees() {
    let f = disk();
    let (addr, stats) = listen(
        exports(f.path()),
        ListenerOptions {
            max_connections: 4,
            handshake_timeout: Duration::from_secs(1),
            ..ListenerOptions::default()
        },
    );
    let idle: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            let mut g = [0u8; 18];
            s.read_exact(&mut g).unwrap();
            s
        })
        .collect();
    // The fifth gets no greeting: closed at once.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    assert!(all.is_empty());
    assert!(stats.over_cap.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    // The idle four reach their handshake deadline; then a real client gets in.
    tern_test_support::wait_for("the idle connections closed", T, || {
        stats.live.load(std::sync::atomic::Ordering::SeqCst) == 0
    });
    let mut c = Client::connect_timeout(&addr, "disk", T).unwrap();
    let mut b = [0u8; 512];
    c.read(0, &mut b).unwrap();
    drop(idle);
}

/// Raise this process's open-file limit (soft and hard) to `n` with util-linux `prlimit`.
fn raise_nofile(n: u64) {
    tern_test_support::require_tools(&["prlimit"]);
    let pid = std::process::id().to_string();
    let st = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={n}:{n}")])
        .status()
        .unwrap();
    assert!(
        st.success(),
        "prlimit --nofile={n} failed (needs root to raise the hard limit)"
    );
}

#[test]
fn a_thousand_idle_connections_do_not_stop_a_real_tls_client() {
    raise_nofile(16384);
    let pki = Pki::new();
    let (srv, cli) = (pki.issue("srv", Role::Host), pki.issue("cli", Role::Host));
    let f = disk();
    let (addr, stats) = listen(
        exports(f.path()),
        ListenerOptions {
            handshake_timeout: Duration::from_secs(60),
            ..tls_opts(&srv)
        },
    );
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    tern_test_support::wait_for("1000 idle connections accepted", T, || {
        stats.live.load(std::sync::atomic::Ordering::SeqCst) == 1000
    });
    let t0 = Instant::now();
    check_serves(&addr, &client_tls(&cli), 4);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    drop(idle);
    tern_test_support::wait_for("the idle connections' slots freed", T, || {
        stats.live.load(std::sync::atomic::Ordering::SeqCst) == 0
    });
}

/// Control requests answered slowly (as a node waiting for its coordinator does).
struct SlowControl;

impl tern_nbd::Exports for SlowControl {
    fn list(&self) -> Vec<String> {
        Vec::new()
    }
    fn open(&self, _name: &str) -> Option<Arc<dyn tern_nbd::Backend>> {
        None
    }
    fn control(&self, request: &[u8]) -> Option<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(800));
        Some(request.to_vec())
    }
}

#[test]
fn the_handshake_deadline_does_not_count_the_time_the_server_works_on_a_control_request() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let opts = ListenerOptions {
        handshake_timeout: Duration::from_millis(300),
        ..ListenerOptions::default()
    };
    std::thread::spawn(move || {
        tern_nbd::run_listener_with(l, Arc::new(SlowControl), opts, Arc::default())
    });
    let reply = tern_nbd::control(&addr, b"ping", T).unwrap();
    assert_eq!(reply, b"ping");
}

/// Control requests echoed back at once, counted (a refused one must not be carried out).
#[derive(Default)]
struct EchoControl {
    carried_out: std::sync::atomic::AtomicUsize,
}

impl tern_nbd::Exports for EchoControl {
    fn list(&self) -> Vec<String> {
        vec!["disk".into()]
    }
    fn open(&self, _name: &str) -> Option<Arc<dyn tern_nbd::Backend>> {
        None
    }
    fn control(&self, request: &[u8]) -> Option<Vec<u8>> {
        self.carried_out
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Some(request.to_vec())
    }
}

impl EchoControl {
    fn carried_out(&self) -> usize {
        self.carried_out.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A listener for `ex` with `opts`, its address and counters.
type Halves = tern_nbd::client::OptionHalves;

/// One control request on a kept option channel: the echoed bytes, or the client's error.
fn control_on((r, w): &mut Halves, request: &[u8]) -> Result<Vec<u8>, ClientError> {
    tern_nbd::client::send_option(w, OPT_TERN_CONTROL, request)?;
    let (reply, data) = tern_nbd::client::recv_option(r, OPT_TERN_CONTROL, MAX_CONTROL_REPLY)?;
    assert_eq!(reply, REP_TERN_CONTROL);
    Ok(data)
}

/// The connection ends: nothing more to read (EOF, or a reset).
fn assert_closed((r, _): &mut Halves) {
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    assert!(rest.is_empty(), "bytes after the refusal: {rest:?}");
}

fn relaxed(a: &std::sync::atomic::AtomicUsize) -> usize {
    a.load(std::sync::atomic::Ordering::SeqCst)
}

#[test]
fn a_client_that_keeps_sending_control_requests_is_cut_off_at_its_first_past_the_option_age() {
    let ex = Arc::new(EchoControl::default());
    let max = Duration::from_millis(1000);
    let (addr, stats) = listen(
        Arc::clone(&ex),
        ListenerOptions {
            handshake_timeout: Duration::from_millis(400),
            max_option_age: max,
            ..ListenerOptions::default()
        },
    );
    let t0 = Instant::now();
    let mut ch = tern_nbd::client::option_channel(&addr, T, None, 16 * 1024).unwrap();
    // A request every 100 ms: each one restarts the 400 ms handshake deadline, so only the
    // option age can end the connection.
    let mut answered = 0;
    let refusal = loop {
        match control_on(&mut ch, format!("req {answered}").as_bytes()) {
            Ok(echo) => {
                assert_eq!(echo, format!("req {answered}").as_bytes());
                answered += 1;
            }
            Err(e) => break e,
        }
        assert!(t0.elapsed() < T, "still served after {:?}", t0.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = t0.elapsed();
    match &refusal {
        ClientError::Refused { reply, message, .. } => {
            assert_eq!(*reply, REP_ERR_SHUTDOWN, "{message}");
            assert!(message.contains("not carried out"), "{message}");
        }
        other => panic!("expected NBD_REP_ERR_SHUTDOWN, got {other:?}"),
    }
    assert!(
        took >= max && took < max + Duration::from_secs(2),
        "cut off after {took:?}"
    );
    assert!(
        answered >= 5,
        "only {answered} requests answered before the limit"
    );
    assert_closed(&mut ch);
    assert_eq!(
        ex.carried_out(),
        answered,
        "the refused request was not carried out"
    );
    assert_eq!(relaxed(&stats.option_age_closes), 1);
    assert_eq!(relaxed(&stats.handshake_timeouts), 0);
    // A new connection is served.
    assert_eq!(tern_nbd::control(&addr, b"again", T).unwrap(), b"again");
}

#[test]
fn a_client_haggling_without_control_requests_is_cut_off_at_the_handshake_deadline() {
    let ex = Arc::new(EchoControl::default());
    let (addr, stats) = listen(
        Arc::clone(&ex),
        ListenerOptions {
            handshake_timeout: Duration::from_millis(300),
            ..ListenerOptions::default()
        },
    );
    let t0 = Instant::now();
    let (mut r, mut w) = tern_nbd::client::option_channel(&addr, T, None, 16 * 1024).unwrap();
    // NBD_OPT_LIST every 20 ms: answered, but it buys no time.
    let mut lists = 0;
    let ended = loop {
        let res = tern_nbd::client::send_option(&mut w, OPT_LIST, &[])
            .map_err(ClientError::from)
            .and_then(|()| {
                let (reply, _) = tern_nbd::client::recv_option(&mut r, OPT_LIST, 4096)?;
                assert_eq!(reply, REP_SERVER);
                tern_nbd::client::recv_option(&mut r, OPT_LIST, 4096)
            });
        match res {
            Ok((reply, _)) => {
                assert_eq!(reply, REP_ACK);
                lists += 1;
            }
            Err(e) => break e,
        }
        assert!(t0.elapsed() < T, "still haggling after {:?}", t0.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t0.elapsed();
    assert!(matches!(ended, ClientError::Io(_)), "{ended:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "cut off after {took:?}"
    );
    assert!(lists >= 3, "only {lists} lists answered");
    assert_eq!(relaxed(&stats.handshake_timeouts), 1);
    assert_eq!(relaxed(&stats.option_age_closes), 0);
}

#[test]
fn a_kept_tls_connection_past_the_option_age_is_closed_and_its_reconnection_meets_the_crl() {
    let pki = Pki::new();
    let srv_dir = tern_pki::issue(&pki.ca, "srv", Role::Host, &IssueOptions::default()).unwrap();
    // The server follows the CA's revocation list as a volume node's does.
    let srv = TlsDir::load_watching(&srv_dir).unwrap();
    let cli = pki.issue("cli", Role::Host);
    let ex = Arc::new(EchoControl::default());
    // Room for two TLS handshakes and a revocation on a loaded machine before the age runs out.
    let max = Duration::from_millis(1500);
    let (addr, stats) = listen(
        Arc::clone(&ex),
        ListenerOptions {
            handshake_timeout: Duration::from_secs(5),
            max_option_age: max,
            ..tls_opts(&srv)
        },
    );
    let tls = client_tls(&cli);
    let t0 = Instant::now();
    let mut ch = tern_nbd::client::option_channel(&addr, T, Some(&tls), 16 * 1024).unwrap();
    assert_eq!(control_on(&mut ch, b"before").unwrap(), b"before");
    tern_pki::revoke(&pki.ca, "cli").unwrap();
    // Revocation is checked at handshakes: the open connection still carries requests until
    // its age runs out (or the client's own, shorter cap makes it reconnect).
    assert_eq!(control_on(&mut ch, b"revoked").unwrap(), b"revoked");
    assert!(t0.elapsed() < max, "too slow to test: {:?}", t0.elapsed());
    std::thread::sleep(max.saturating_sub(t0.elapsed()) + Duration::from_millis(100));
    match control_on(&mut ch, b"too old") {
        Err(ClientError::Refused { reply, .. }) => assert_eq!(reply, REP_ERR_SHUTDOWN),
        other => panic!("expected NBD_REP_ERR_SHUTDOWN, got {other:?}"),
    }
    assert_closed(&mut ch);
    assert_eq!(
        ex.carried_out(),
        2,
        "the refused request was not carried out"
    );
    assert_eq!(relaxed(&stats.option_age_closes), 1);
    // The client must reconnect, and the new handshake meets the current list. (In TLS 1.3
    // the client may finish its side before the server's verdict: the refusal then ends the
    // first exchange.)
    let again = tern_nbd::client::option_channel(&addr, T, Some(&tls), 16 * 1024)
        .and_then(|mut ch| control_on(&mut ch, b"reconnected"));
    let e = again.expect_err("a revoked client was served on a new connection");
    assert!(
        format!("{e:?}").contains("Revoked"),
        "not refused for its revocation: {e:?}"
    );
    assert_eq!(ex.carried_out(), 2);
}

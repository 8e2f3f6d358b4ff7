//! The REST API over TLS with callers checked: the real router, auth middleware and TLS accept
//! loop in front of the real core (in-memory store), reached over loopback with the shell's own
//! HTTP client and certificates made by `tern-pki` in a scratch directory.
//!
//! Refused: plain TCP (no TLS), a client certificate of another CA, an expired one, no
//! credentials (401), an unknown bearer token (401), a host certificate used as a user (403), a
//! viewer changing anything (403 naming the role needed), a host reporting for another host, a
//! client revoked after it was served (no session is ever resumed, so a saved ticket does not help).
//! After every refusal the legitimate admin is still served. And the controller's client sends a
//! command meant for one host only to a server holding that host's certificate.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};
use tern_api::agent::HostRecord;
use tern_api::auth::{Role as UserRole, TokenFile, token_line};
use tern_api::cluster::HostCapacity;
use tern_controller::core::Config;
use tern_controller::shell::auth::Access;
use tern_controller::shell::http::Client;
use tern_controller::shell::tls::ServerTls;
use tern_controller::shell::{Shell, http};
use tern_pki::{IssueOptions, Role, TlsDir};

const VIEWER_TOKEN: &str = "viewer-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

struct Pki {
    _scratch: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let scratch = tempfile::tempdir().unwrap();
        let ca = scratch.path().join("ca");
        let other_ca = scratch.path().join("other-ca");
        tern_pki::init_ca(&ca).unwrap();
        tern_pki::init_ca(&other_ca).unwrap();
        let opts = IssueOptions::default();
        for (name, role) in [
            ("ctl", Role::Controller),
            ("h1", Role::Host),
            ("h2", Role::Host),
            ("alice", Role::User),
            ("bob", Role::User),
        ] {
            tern_pki::issue(&ca, name, role, &opts).unwrap();
        }
        let expired = IssueOptions {
            valid_days: 1,
            not_before_offset_days: -10,
            ..IssueOptions::default()
        };
        tern_pki::issue(&ca, "old", Role::User, &expired).unwrap();
        // Same name as the admin, another CA.
        tern_pki::issue(&other_ca, "alice", Role::User, &opts).unwrap();
        Pki {
            _scratch: scratch,
            ca,
            other_ca,
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.ca.join(name)
    }

    fn client(&self, name: &str) -> Client {
        Client::tls(TlsDir::load(&self.dir(name)).unwrap().client_config())
    }

    /// A client that trusts our CA but presents a certificate of `dir` (loaded by hand: its own
    /// CA is not ours).
    fn foreign_client(&self, dir: &Path) -> Client {
        let roots = roots(&self.ca.join("ca-cert.pem"));
        let chain = certs(&dir.join("client-cert.pem"));
        let key = key(&dir.join("client-key.pem"));
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        Client::tls(Arc::new(cfg))
    }

    /// A client with no certificate (trusting our CA).
    fn anonymous(&self) -> Client {
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(&self.ca.join("ca-cert.pem")))
            .with_no_client_auth();
        Client::tls(Arc::new(cfg))
    }
}

#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn key(path: &Path) -> rustls::pki_types::PrivateKeyDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivateKeyDer::from_pem_file(path).unwrap()
}

fn roots(path: &Path) -> rustls::RootCertStore {
    let mut r = rustls::RootCertStore::empty();
    for c in certs(path) {
        r.add(c).unwrap();
    }
    r
}

struct Api {
    pki: Pki,
    base: String,
    addr: std::net::SocketAddr,
}

impl Api {
    async fn start() -> Api {
        let pki = Pki::new();
        let cfg = Config {
            ha_reserve_hosts: 0,
            ..Config::default()
        };
        let shell = Shell::in_memory(cfg, "https://in-memory");
        assert_eq!(shell.wait_leading(Duration::from_secs(5)).await, Some(1));
        for (name, lease) in [("h1", 11), ("h2", 12)] {
            shell
                .host_up(HostRecord {
                    name: name.into(),
                    // Nothing listens there: commands fail fast, which the core handles.
                    agent_url: "https://127.0.0.1:9".into(),
                    capacity: HostCapacity {
                        cores: 4,
                        memory_mib: 4096,
                        power_model: "hp-ml110-g5".into(),
                        volume_node: None,
                        volume_node_id: None,
                    },
                    lease,
                })
                .await;
        }
        let tls = ServerTls::load(&pki.dir("ctl")).unwrap();
        let tokens = format!(
            "{}\n{}\n",
            token_line("ci", UserRole::Viewer, VIEWER_TOKEN).unwrap(),
            token_line("ops", UserRole::Admin, ADMIN_TOKEN).unwrap()
        );
        let access = Access {
            tokens: TokenFile::parse(&tokens).unwrap(),
            admins: BTreeSet::from(["alice".to_string()]),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s = shell.clone();
        let access = Arc::new(std::sync::RwLock::new(access));
        tokio::spawn(async move { s.serve_tls_on(listener, &tls, access).await });
        let api = Api {
            pki,
            base: format!("https://{addr}"),
            addr,
        };
        for (i, host) in ["h1", "h2"].into_iter().enumerate() {
            let report = json!({"host": host, "generation_seen": 1, "seq": i + 1,
                "last_command_id": 0, "vms": [], "cpu_utilization": 0.1});
            let (st, v) = api
                .call(
                    &api.pki.client(host),
                    Method::POST,
                    "/v1/agent/reports",
                    Some(&report),
                )
                .await
                .unwrap();
            assert_eq!(st, 204, "{host}'s report: {v}");
        }
        api
    }

    async fn call(
        &self,
        client: &Client,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), http::HttpError> {
        let r = client
            .request(
                method,
                &format!("{}{path}", self.base),
                body.map(|b| b.to_string().into_bytes()),
                Duration::from_secs(10),
            )
            .await?;
        let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        Ok((r.status, v))
    }

    /// The legitimate admin still gets the VM list.
    async fn still_serves_the_admin(&self) {
        let (st, v) = self
            .call(&self.pki.client("alice"), Method::GET, "/v1/vms", None)
            .await
            .expect("the admin is served");
        assert_eq!(st, 200, "{v}");
    }
}

fn create_body(name: &str) -> Value {
    json!({"name": name, "vcpus": 1, "memory_mib": 64, "kernel": "builtin:testguest"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_a_foreign_ca_and_an_expired_certificate_are_refused_and_the_admin_still_served()
{
    let api = Api::start().await;

    // Plain HTTP on the TLS port: no HTTP answer, the connection is dropped.
    let addr = api.addr;
    let answer = tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        tcp.write_all(b"GET /v1/vms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap();
    assert!(
        !answer.contains("HTTP/1.1"),
        "plain HTTP was answered: {answer:?}"
    );
    let plain = http::request(
        Method::GET,
        &format!("http://{addr}/v1/vms"),
        None,
        Duration::from_secs(10),
    )
    .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    api.still_serves_the_admin().await;

    // A certificate named like the admin, signed by another CA.
    let foreign = api.pki.foreign_client(&api.pki.other_ca.join("alice"));
    let r = api.call(&foreign, Method::GET, "/v1/vms", None).await;
    assert!(r.is_err(), "another CA's certificate was served: {r:?}");
    api.still_serves_the_admin().await;

    // An expired certificate of our CA.
    let r = api
        .call(&api.pki.client("old"), Method::GET, "/v1/vms", None)
        .await;
    assert!(r.is_err(), "an expired certificate was served: {r:?}");
    api.still_serves_the_admin().await;

    // A client that does not trust the server's CA refuses the server.
    let theirs = Client::tls(
        TlsDir::load(&api.pki.other_ca.join("alice"))
            .unwrap()
            .client_config(),
    );
    let r = api.call(&theirs, Method::GET, "/v1/vms", None).await;
    assert!(matches!(r, Err(http::HttpError::Tls { .. })), "{r:?}");
    api.still_serves_the_admin().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credentials_is_401_and_an_unknown_token_too() {
    let api = Api::start().await;
    let anon = api.pki.anonymous();
    for (method, path) in [
        (Method::GET, "/v1/vms"),
        (Method::GET, "/metrics"),
        (Method::POST, "/v1/vms"),
    ] {
        let (st, v) = api.call(&anon, method.clone(), path, None).await.unwrap();
        assert_eq!(st, 401, "{method} {path}: {v}");
        assert_eq!(v["error"], "unauthenticated", "{v}");
    }
    // The dashboard's static page holds no cluster data: served without credentials.
    let r = anon
        .request(
            Method::GET,
            &format!("{}/", api.base),
            None,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let bad = api
        .pki
        .anonymous()
        .with_token(Some("not-a-token-0123456789".into()));
    let (st, v) = api.call(&bad, Method::GET, "/v1/vms", None).await.unwrap();
    assert_eq!(st, 401, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("not in this controller's token file"),
        "{v}"
    );
    api.still_serves_the_admin().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_reads_everything_and_changes_nothing_an_admin_changes() {
    let api = Api::start().await;
    let viewers = [
        ("viewer certificate", api.pki.client("bob")),
        (
            "viewer token",
            api.pki.anonymous().with_token(Some(VIEWER_TOKEN.into())),
        ),
    ];
    for (who, c) in &viewers {
        for path in [
            "/v1/hosts",
            "/v1/vms",
            "/v1/tasks",
            "/v1/events",
            "/v1/policy",
            "/v1/plans",
            "/metrics",
            "/openapi.json",
            "/dashboard/leader",
        ] {
            let (st, v) = api.call(c, Method::GET, path, None).await.unwrap();
            assert_eq!(st, 200, "{who}: GET {path}: {v}");
        }
        let changes: [(Method, &str, Value); 6] = [
            (Method::POST, "/v1/vms", create_body("v1")),
            (Method::DELETE, "/v1/vms/v1", Value::Null),
            (Method::POST, "/v1/vms/v1/migrate", json!({"to": "h2"})),
            (Method::PUT, "/v1/policy", json!({})),
            (
                Method::POST,
                "/v1/hosts/h1/maintenance",
                json!({"enter": true}),
            ),
            (Method::POST, "/v1/plans/1/apply", Value::Null),
        ];
        for (method, path, body) in changes {
            let body = (!body.is_null()).then_some(body);
            let (st, v) = api
                .call(c, method.clone(), path, body.as_ref())
                .await
                .unwrap();
            assert_eq!(st, 403, "{who}: {method} {path}: {v}");
            assert_eq!(v["error"], "forbidden");
            assert!(
                v["detail"].as_str().unwrap().contains("needs role admin"),
                "{v}"
            );
        }
    }
    assert!(
        api.call(&viewers[0].1, Method::GET, "/v1/vms", None)
            .await
            .unwrap()
            .1
            .as_array()
            .unwrap()
            .is_empty(),
        "a viewer's create made nothing"
    );
    // Admins: by certificate (named in --admins) and by token.
    let admins = [
        ("v-cert", api.pki.client("alice")),
        (
            "v-token",
            api.pki.anonymous().with_token(Some(ADMIN_TOKEN.into())),
        ),
    ];
    for (vm, c) in &admins {
        let (st, v) = api
            .call(c, Method::POST, "/v1/vms", Some(&create_body(vm)))
            .await
            .unwrap();
        assert!(st == 201 || st == 200, "{vm}: {st} {v}");
        assert_eq!(v["name"], *vm);
    }
    let (st, v) = api
        .call(&admins[1].1, Method::DELETE, "/v1/vms/v-cert", None)
        .await
        .unwrap();
    assert!((200..300).contains(&st), "{st} {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_certificate_is_not_a_user_and_reports_only_for_its_own_host() {
    let api = Api::start().await;
    let h1 = api.pki.client("h1");
    for (method, path, body) in [
        (Method::GET, "/v1/vms", None),
        (Method::POST, "/v1/vms", Some(create_body("x"))),
    ] {
        let (st, v) = api
            .call(&h1, method.clone(), path, body.as_ref())
            .await
            .unwrap();
        assert_eq!(st, 403, "{method} {path}: {v}");
        assert!(
            v["detail"].as_str().unwrap().contains("is not a user"),
            "{v}"
        );
    }
    let report = json!({"host": "h2", "generation_seen": 1, "seq": 99,
        "last_command_id": 0, "vms": [], "cpu_utilization": 0.1});
    let (st, v) = api
        .call(&h1, Method::POST, "/v1/agent/reports", Some(&report))
        .await
        .unwrap();
    assert_eq!(st, 403, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("may report only for host \"h1\""),
        "{v}"
    );
    // A user (even an admin) cannot post an agent's report.
    let (st, v) = api
        .call(
            &api.pki.client("alice"),
            Method::POST,
            "/v1/agent/reports",
            Some(&report),
        )
        .await
        .unwrap();
    assert_eq!(st, 403, "{v}");
    api.still_serves_the_admin().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_one_host_is_not_sent_to_another_hosts_certificate() {
    let pki = Pki::new();
    // An agent-like TLS server holding host h1's certificate.
    let tls = ServerTls::load(&pki.dir("h1")).unwrap();
    let router = axum::Router::new().route("/ping", axum::routing::post(|| async { "pong" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/ping", listener.local_addr().unwrap());
    tokio::spawn(tern_controller::shell::tls::serve_tls(
        listener,
        router,
        tls.config.clone(),
        "test agent",
    ));
    let host = |name: &str| tern_pki::Identity {
        name: name.into(),
        role: Role::Host,
    };
    let ctl = pki.client("ctl");
    let send = |who: tern_pki::Identity| {
        let c = ctl.clone().expecting(Some(who));
        let url = url.clone();
        async move {
            c.request(Method::POST, &url, None, Duration::from_secs(10))
                .await
        }
    };
    let r = send(host("h1")).await.unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"pong"[..]));
    let r = send(host("h2")).await;
    match r {
        Err(http::HttpError::WrongPeer { expected, why, .. }) => {
            assert_eq!(expected, "h2 (host)");
            assert!(why.contains("h1 (host)"), "{why}");
        }
        other => panic!("a command for h2 went to h1's certificate: {other:?}"),
    }
    // No downgrade: the same client does not send it over plain HTTP.
    let plain = url.replace("https://", "http://");
    let r = ctl
        .clone()
        .expecting(Some(host("h1")))
        .request(Method::POST, &plain, None, Duration::from_secs(10))
        .await;
    assert!(matches!(r, Err(http::HttpError::BadUrl { .. })), "{r:?}");
    // A controller's certificate is not a host's either.
    let r = send(tern_pki::Identity {
        name: "h1".into(),
        role: Role::Controller,
    })
    .await;
    assert!(matches!(r, Err(http::HttpError::WrongPeer { .. })), "{r:?}");
}

/// One request over raw rustls with `cfg` (its session store kept between calls): how the
/// handshake went and the HTTP status line, or why it failed.
fn raw_get(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<(Option<rustls::HandshakeKind>, String), String> {
    let name = rustls::pki_types::ServerName::try_from("ctl").unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /v1/vms HTTP/1.1\r\nHost: ctl\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    // The server closes without close_notify after `Connection: close`: what was read counts.
    let read = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.lines().next().unwrap_or("").to_owned();
    if !status.starts_with("HTTP/1.1") {
        return Err(format!("no HTTP answer ({read:?})"));
    }
    Ok((tls.conn.handshake_kind(), status))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_is_resumed_so_a_revoked_client_with_a_saved_ticket_is_refused() {
    let api = Api::start().await;
    let addr = api.addr;
    // rustls' default client: keeps tickets and offers them on the next connection.
    let client_cfg = |name: &str| {
        let dir = api.pki.dir(name);
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots(&dir.join("ca-cert.pem")))
                .with_client_auth_cert(
                    certs(&dir.join("client-cert.pem")),
                    key(&dir.join("client-key.pem")),
                )
                .unwrap(),
        )
    };
    let get =
        |cfg: Arc<rustls::ClientConfig>| tokio::task::spawn_blocking(move || raw_get(addr, cfg));

    // The admin connects twice: both handshakes are full (nothing to resume).
    let alice = client_cfg("alice");
    for _ in 0..2 {
        let (kind, status) = get(alice.clone()).await.unwrap().unwrap();
        assert_eq!(kind, Some(rustls::HandshakeKind::Full), "{status}");
        assert!(status.contains(" 200 "), "{status}");
    }

    // Bob is served, then revoked; his next connection, offering whatever the first left him,
    // is refused at the handshake.
    let bob = client_cfg("bob");
    let (kind, status) = get(bob.clone()).await.unwrap().unwrap();
    assert_eq!(kind, Some(rustls::HandshakeKind::Full), "{status}");
    assert!(status.starts_with("HTTP/1.1"), "{status}");
    tern_pki::revoke(&api.pki.ca, "bob").unwrap();
    let r = get(bob).await.unwrap();
    assert!(r.is_err(), "a revoked client was served: {r:?}");
    api.still_serves_the_admin().await;
}

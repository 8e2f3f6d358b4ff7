//! The agent's HTTP side: the command endpoint, its status and metrics (axum), and the small
//! client that posts reports to the leading controller.
//!
//! With `--tls-dir` the agent serves only mutual TLS ([`serve_tls`]): a client must present a
//! certificate of the cluster CA, in date, or the handshake fails and the connection is dropped
//! before any HTTP is read. Commands are then taken only from `controller` certificates (403
//! otherwise); status and metrics from any certificate of the CA. Reports go to the leader over
//! TLS with the host's certificate, and the leader's must be a `controller` certificate.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, Full};
use tern_api::agent::Command;
use tern_api::cluster::ErrorBody;
use tokio::sync::{mpsc, oneshot};

use super::Event;

#[derive(Clone)]
struct App {
    events: mpsc::Sender<Event>,
    command_timeout: Duration,
}

/// The agent's routes; with `tls`, behind [`only_controllers_command`].
pub(crate) fn router(events: mpsc::Sender<Event>, command_timeout: Duration, tls: bool) -> Router {
    let r = Router::new()
        .route("/v1/agent/commands", post(command))
        .route("/v1/agent/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(App {
            events,
            command_timeout,
        });
    if tls {
        r.layer(axum::middleware::from_fn(only_controllers_command))
    } else {
        r
    }
}

// The verified client certificate of a TLS connection (every one has a certificate: the agent
// requires it in the handshake).
use tern_pki::http::PeerCert;

/// Over TLS: commands only from a controller's certificate; reads from any of the CA's.
async fn only_controllers_command(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let peer = req.extensions().get::<PeerCert>().and_then(|p| p.0.clone());
    let Some(peer) = peer else {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "the agent takes only clients with a certificate of the cluster CA".into(),
        );
    };
    if req.method() != axum::http::Method::GET && peer.role != tern_pki::Role::Controller {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} {} needs a controller certificate; {peer} is not one",
                req.method(),
                req.uri().path()
            ),
        );
    }
    next.run(req).await
}

/// Serves `router` over plain HTTP until the process ends (no `--tls-dir`).
pub(crate) async fn serve_plain(listener: tokio::net::TcpListener, router: Router) {
    if let Err(e) = axum::serve(tern_pki::http::plain_listener(listener), router).await {
        eprintln!("tern agent: the command API stopped: {e}");
    }
}

/// Serves `router` over mutual TLS until the process ends (see the module docs).
pub(crate) async fn serve_tls(
    listener: tokio::net::TcpListener,
    router: Router,
    config: Arc<rustls::ServerConfig>,
) {
    tern_pki::http::serve_tls(listener, router, config, "tern agent").await;
}

fn error(code: StatusCode, error: &str, detail: String) -> Response {
    let body = ErrorBody {
        error: error.into(),
        detail,
    };
    (code, axum::Json(body)).into_response()
}

fn gone() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "agent stopping",
        "the agent is shutting down".into(),
    )
}

async fn command(State(app): State<App>, body: Bytes) -> Response {
    let cmd: Command = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad command",
                format!("the body is not a Command: {e}"),
            );
        }
    };
    let what = format!("command {} of generation {}", cmd.id, cmd.generation);
    let (tx, rx) = oneshot::channel();
    if app.events.send(Event::Command(cmd, tx)).await.is_err() {
        return gone();
    }
    match tokio::time::timeout(app.command_timeout, rx).await {
        Ok(Ok(resp)) => axum::Json(resp).into_response(),
        Ok(Err(_)) => gone(),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "command timed out",
            format!(
                "{what} got no answer within {:?}; send it again with the same id to learn how it ended",
                app.command_timeout
            ),
        ),
    }
}

async fn status(State(app): State<App>) -> Response {
    let (tx, rx) = oneshot::channel();
    if app.events.send(Event::Snapshot(tx)).await.is_err() {
        return gone();
    }
    match rx.await {
        Ok(s) => axum::Json(s.status).into_response(),
        Err(_) => gone(),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    let (tx, rx) = oneshot::channel();
    if app.events.send(Event::Snapshot(tx)).await.is_err() {
        return gone();
    }
    match rx.await {
        Ok(s) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            s.metrics,
        )
            .into_response(),
        Err(_) => gone(),
    }
}

/// POSTs `body` as JSON to `base` (`http://HOST:PORT`, or `https://` with `tls`) + `path`; the
/// answer's status code. Over TLS the server's certificate must be valid for the URL's host and
/// be a controller's; with `tls` a plain `http://` leader is refused (no downgrade).
pub(crate) async fn post_json(
    base: &str,
    path: &str,
    body: Vec<u8>,
    within: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<u16, String> {
    let (authority, tls) = match (base.split_once("://"), tls) {
        (Some(("http", _)), Some(_)) => {
            return Err(format!(
                "{base:?} is plain http://: an agent with a --tls-dir reports only over TLS"
            ));
        }
        (Some(("http", rest)), _) => (rest, None),
        (Some(("https", rest)), Some(cfg)) => (rest, Some(Arc::clone(cfg))),
        (Some(("https", _)), None) => {
            return Err(format!(
                "{base:?} is an https:// URL but the agent has no --tls-dir"
            ));
        }
        _ => return Err(format!("{base:?} is not an http:// or https:// URL")),
    };
    let authority = authority.trim_end_matches('/').to_string();
    let call = async {
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        // Small request after the TLS handshake: not held for the peer's delayed ACK (Nagle).
        let _ = stream.set_nodelay(true);
        match tls {
            None => {
                send(
                    hyper_util::rt::TokioIo::new(stream),
                    &authority,
                    base,
                    path,
                    body,
                )
                .await
            }
            Some(cfg) => {
                let host = authority
                    .rsplit_once(':')
                    .map_or(authority.as_str(), |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = tern_pki::TlsDir::try_server_name(host)?;
                let stream = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS with {authority}: {e}"))?;
                match tern_pki::peer_identity(stream.get_ref().1) {
                    Ok(id) if id.role == tern_pki::Role::Controller => {}
                    Ok(id) => return Err(format!("{base} is {id}, not a controller")),
                    Err(e) => return Err(format!("{base}: {e}")),
                }
                send(
                    hyper_util::rt::TokioIo::new(stream),
                    &authority,
                    base,
                    path,
                    body,
                )
                .await
            }
        }
    };
    tokio::time::timeout(within, call)
        .await
        .map_err(|_| format!("POST {base}{path}: no answer within {within:?}"))?
}

async fn send<IO>(
    io: IO,
    authority: &str,
    base: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<u16, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("HTTP handshake with {authority}: {e}"))?;
        tokio::spawn(conn);
        let req = hyper::Request::post(path)
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("POST {base}{path}: {e}"))?;
        let code = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use tern_pki::{IssueOptions, Role, TlsDir};

    use super::*;

    /// POSTs `body` to `path` over TLS with `client`; `Err` when TLS fails.
    async fn call(
        addr: std::net::SocketAddr,
        client: Arc<rustls::ClientConfig>,
        method: &str,
        path: &str,
    ) -> Result<u16, String> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = TlsDir::server_name("127.0.0.1");
        let tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "agent")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn over_tls_only_a_controller_commands_and_strangers_are_dropped() {
        let scratch = tempfile::tempdir().unwrap();
        let (ca, other) = (scratch.path().join("ca"), scratch.path().join("other"));
        tern_pki::init_ca(&ca).unwrap();
        tern_pki::init_ca(&other).unwrap();
        let o = IssueOptions::default();
        let dir = |ca: &std::path::Path, name: &str, role| {
            TlsDir::load(&tern_pki::issue(ca, name, role, &o).unwrap()).unwrap()
        };
        let (host, ctl, user) = (
            dir(&ca, "h0", Role::Host),
            dir(&ca, "ctl", Role::Controller),
            dir(&ca, "alice", Role::User),
        );
        let stranger = dir(&other, "ctl", Role::Controller);
        let (events, rx) = mpsc::channel(8);
        drop(rx); // handlers that reach the core answer 503 "agent stopping"
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(events, Duration::from_secs(1), true);
        tokio::spawn(serve_tls(listener, app, host.server_config()));

        // A controller's command reaches the handler (here: a body that is no command, 400).
        let ok = || call(addr, ctl.client_config(), "POST", "/v1/agent/commands");
        assert_eq!(ok().await, Ok(400));
        // A user may read but not command.
        let r = call(addr, user.client_config(), "POST", "/v1/agent/commands").await;
        assert_eq!(r, Ok(403));
        let r = call(addr, user.client_config(), "GET", "/metrics").await;
        assert_eq!(r, Ok(503));
        // Another CA's controller certificate: refused in the handshake (or on the first read).
        let r = call(addr, stranger.client_config(), "POST", "/v1/agent/commands").await;
        assert!(r.is_err(), "{r:?}");
        assert_eq!(ok().await, Ok(400));
        // Plain HTTP: dropped without an HTTP answer.
        let answer = tokio::task::spawn_blocking(move || {
            let mut tcp = std::net::TcpStream::connect(addr).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
                .unwrap();
            let mut out = Vec::new();
            let _ = tcp.read_to_end(&mut out);
            out
        })
        .await
        .unwrap();
        assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1"));
        assert_eq!(ok().await, Ok(400));
    }
}

//! An HTTP/1 server over TLS for axum routers: the controller's REST API and the agents' command
//! API share it (feature `http`).
//!
//! Each accepted connection completes its TLS handshake within [`HANDSHAKE_TIMEOUT`] before any
//! byte of HTTP is read (else it is logged and dropped); the verified peer certificate, if the
//! client presented one, reaches every request as a [`PeerCert`] extension. An `accept` error
//! (out of file descriptors, an aborted connection) is logged and retried, never fatal. Whether a
//! client certificate is required is the server configuration's choice.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;

use crate::Identity;

/// How long a client has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The verified certificate of the connection a request came on (`None`: the client presented
/// none). Inserted into every request's extensions by [`serve_tls`].
#[derive(Debug, Clone)]
pub struct PeerCert(pub Option<Identity>);

/// Serves `router` over TLS with `config` until the process ends; `what` names the server in
/// its log lines (module docs).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    router: Router,
    config: Arc<ServerConfig>,
    what: &'static str,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{what}: accept failed ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Answers go out at once, not held for the client's delayed ACK (Nagle: ~40 ms per
        // request after a handshake).
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    eprintln!("{what}: refused a connection from {from}: TLS handshake: {e}");
                    return;
                }
                Err(_) => {
                    eprintln!(
                        "{what}: dropped a connection from {from}: no TLS handshake within {HANDSHAKE_TIMEOUT:?}"
                    );
                    return;
                }
            };
            let peer = crate::peer_identity(stream.get_ref().1).ok();
            let svc = router.layer(axum::Extension(PeerCert(peer)));
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

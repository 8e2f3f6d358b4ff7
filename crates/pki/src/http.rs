//! An HTTP/1 server over TLS for axum routers: the controller's REST API and the agents' command
//! API share it (feature `http`), and the listener both serve on without TLS
//! ([`plain_listener`]).
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

/// The listener of a plain (no TLS) API: every accepted connection gets `TCP_NODELAY`, as
/// [`serve_tls`]'s do, so an answer goes out at once instead of waiting for the client's
/// delayed ACK (Nagle: ~40 ms on every call). Serve it with `axum::serve`.
pub fn plain_listener(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    use axum::serve::ListenerExt;
    fn nodelay(tcp: &mut tokio::net::TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            eprintln!("cannot set TCP_NODELAY on an accepted API connection: {e}");
        }
    }
    listener.tap_io(nodelay as fn(&mut tokio::net::TcpStream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_plain_listener_sets_tcp_nodelay_on_every_accepted_connection() {
        use axum::serve::Listener;
        let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = raw.local_addr().unwrap();
        // Without it the kernel's default holds: Nagle on (what the check below must tell).
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (plain, _) = raw.accept().await.unwrap();
        assert!(
            !plain.nodelay().unwrap(),
            "TCP_NODELAY is on by default here"
        );
        let mut l = plain_listener(raw);
        for _ in 0..2 {
            let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (tcp, _) = Listener::accept(&mut l).await;
            assert!(
                tcp.nodelay().unwrap(),
                "an accepted connection without TCP_NODELAY"
            );
        }
    }
}

//! A small HTTP/1.1 JSON client (hyper's connection API over one TCP or TLS connection per
//! request): the controller's commands to agents and the `tern cluster` client use it.
//!
//! `https://` URLs need a [`Client`] with a TLS configuration (the cluster CA as the only trust
//! anchor, our certificate presented if we have one); the server's certificate must be valid for
//! the URL's host (an IP address SAN for `https://10.77.0.10:7000`). A [`Client`] may also carry a
//! bearer token (sent as `Authorization: Bearer`) and the name and role the server's certificate
//! must carry (the controller checks that the agent it commands is that host).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;

/// Why a request got no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not `http://HOST:PORT/...`.
    #[error("bad URL {url:?}: {why}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The TCP connection failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// `HOST:PORT`.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The exchange failed half-way (connection reset, malformed answer).
    #[error("HTTP exchange with {addr} failed: {source}")]
    Protocol {
        /// `HOST:PORT`.
        addr: String,
        /// The cause.
        source: hyper::Error,
    },
    /// The TLS handshake failed (unknown CA, expired or wrong-name certificate, not TLS).
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        /// `HOST:PORT`.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The server's certificate is not the one expected.
    #[error("{addr} is not {expected}: {why}")]
    WrongPeer {
        /// `HOST:PORT`.
        addr: String,
        /// Who was expected.
        expected: String,
        /// Who answered, or why no identity was read.
        why: String,
    },
    /// No complete answer in time.
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout {
        /// `HOST:PORT`.
        addr: String,
        /// The limit.
        timeout: Duration,
    },
}

/// An HTTP answer: status and body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

/// How a request is sent: TLS settings, a bearer token, the expected server identity.
#[derive(Debug, Clone, Default)]
pub struct Client {
    tls: Option<Arc<rustls::ClientConfig>>,
    bearer: Option<String>,
    expect: Option<tern_pki::Identity>,
}

impl Client {
    /// Plain HTTP only (an `https://` URL is refused).
    pub fn plain() -> Client {
        Client::default()
    }

    /// `http://` and `https://` URLs, the latter with `config` (trust anchors, our certificate).
    pub fn tls(config: Arc<rustls::ClientConfig>) -> Client {
        Client {
            tls: Some(config),
            ..Client::default()
        }
    }

    /// Sends `Authorization: Bearer TOKEN` with every request.
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.bearer = token;
        self
    }

    /// Requires the server's certificate to carry this name and role. A client with TLS settings
    /// and an expected peer refuses `http://` URLs (no downgrade: plain HTTP proves no one);
    /// without TLS settings the expectation is moot (a plain cluster).
    pub fn expecting(mut self, who: Option<tern_pki::Identity>) -> Client {
        self.expect = who;
        self
    }

    /// Sends `method url` with an optional JSON body and waits (up to `timeout`) for the whole
    /// answer.
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        json: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<HttpReply, HttpError> {
        let bad = |why: &str| HttpError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        let tls = match (uri.scheme_str(), &self.tls) {
            (Some("http"), Some(_)) if self.expect.is_some() => {
                return Err(bad(
                    "plain http:// cannot show the peer's certificate; this client speaks only TLS to it",
                ));
            }
            (Some("http"), _) => None,
            (Some("https"), Some(cfg)) => Some(Arc::clone(cfg)),
            (Some("https"), None) => {
                return Err(bad(
                    "an https:// URL needs TLS settings (--tls-dir, or TERN_TLS_DIR)",
                ));
            }
            _ => return Err(bad("only http:// and https:// URLs are supported")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?.clone();
        let default_port = if tls.is_some() { 443 } else { 80 };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let addr = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(default_port)
        );
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(&addr)
                .await
                .map_err(|source| HttpError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
            // Without it the request waits behind the handshake's last unacknowledged segment
            // for the peer's delayed ACK (Nagle): ~40 ms on every command to an agent.
            let _ = tcp.set_nodelay(true);
            match tls {
                None => {
                    self.exchange(tcp, &addr, &authority, method, path, json)
                        .await
                }
                Some(cfg) => {
                    let name = tern_pki::TlsDir::try_server_name(host).map_err(|e| bad(&e))?;
                    let stream = tokio_rustls::TlsConnector::from(cfg)
                        .connect(name, tcp)
                        .await
                        .map_err(|source| HttpError::Tls {
                            addr: addr.clone(),
                            source,
                        })?;
                    if let Some(want) = &self.expect {
                        let got = tern_pki::peer_identity(stream.get_ref().1);
                        if got.as_ref() != Ok(want) {
                            return Err(HttpError::WrongPeer {
                                addr: addr.clone(),
                                expected: want.to_string(),
                                why: match got {
                                    Ok(id) => format!("its certificate names {id}"),
                                    Err(e) => e.to_string(),
                                },
                            });
                        }
                    }
                    self.exchange(stream, &addr, &authority, method, path, json)
                        .await
                }
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout {
                addr: addr.clone(),
                timeout,
            })?
    }

    async fn exchange<IO>(
        &self,
        stream: IO,
        addr: &str,
        authority: &hyper::http::uri::Authority,
        method: Method,
        path: String,
        json: Option<Vec<u8>>,
    ) -> Result<HttpReply, HttpError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let proto = |source| HttpError::Protocol {
            addr: addr.to_string(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(proto)?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, authority.as_str());
        if json.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = &self.bearer {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(Bytes::from(json.unwrap_or_default())))
            .map_err(|e| HttpError::BadUrl {
                url: addr.to_string(),
                why: e.to_string(),
            })?;
        let resp = sender.send_request(req).await.map_err(proto)?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(proto)?.to_bytes();
        conn.abort();
        Ok(HttpReply {
            status,
            body: body.to_vec(),
        })
    }
}

/// Sends `method url` (plain `http://` only) with an optional JSON body and waits (up to
/// `timeout`) for the whole answer; [`Client::request`] with [`Client::plain`].
pub async fn request(
    method: Method,
    url: &str,
    json: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<HttpReply, HttpError> {
    Client::plain().request(method, url, json, timeout).await
}

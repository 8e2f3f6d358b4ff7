//! A small HTTP/1.1 JSON client (hyper's connection API over one TCP connection per request):
//! the controller's commands to agents and the `tern cluster` client use it.

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

/// Sends `method url` with an optional JSON body and waits (up to `timeout`) for the whole answer.
pub async fn request(
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
    if uri.scheme_str() != Some("http") {
        return Err(bad("only http:// URLs are supported"));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?.clone();
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|source| HttpError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let proto = |source| HttpError::Protocol {
            addr: addr.clone(),
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
        let req = req
            .body(Full::new(Bytes::from(json.unwrap_or_default())))
            .map_err(|e| bad(&e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(proto)?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(proto)?.to_bytes();
        conn.abort();
        Ok(HttpReply {
            status,
            body: body.to_vec(),
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HttpError::Timeout {
            addr: addr.clone(),
            timeout,
        })?
}

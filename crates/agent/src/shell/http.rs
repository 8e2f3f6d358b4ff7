//! The agent's HTTP side: the command endpoint, its status and metrics (axum), and the small
//! client that posts reports to the leading controller.

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

/// The agent's routes.
pub(crate) fn router(events: mpsc::Sender<Event>, command_timeout: Duration) -> Router {
    Router::new()
        .route("/v1/agent/commands", post(command))
        .route("/v1/agent/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(App {
            events,
            command_timeout,
        })
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

/// POSTs `body` as JSON to `base` (`http://HOST:PORT`) + `path`; the answer's status code.
pub(crate) async fn post_json(
    base: &str,
    path: &str,
    body: Vec<u8>,
    within: Duration,
) -> Result<u16, String> {
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("{base:?} is not an http:// URL"))?
        .trim_end_matches('/')
        .to_string();
    let call = async {
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("HTTP handshake with {authority}: {e}"))?;
        tokio::spawn(conn);
        let req = hyper::Request::post(path)
            .header(header::HOST, &authority)
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
    };
    tokio::time::timeout(within, call)
        .await
        .map_err(|_| format!("POST {base}{path}: no answer within {within:?}"))?
}

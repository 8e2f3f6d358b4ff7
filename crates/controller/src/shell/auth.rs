//! Who is calling, and may they: the middleware in front of every route of a controller served
//! with `--tls-dir` (see docs/security.md, "etcd and the cluster REST API").
//!
//! A caller is recognised, in this order, by
//! 1. a bearer token (`Authorization: Bearer TOKEN`) found in the `--tokens` file: a user with
//!    that line's role; a token that is not in the file is a 401 even with a certificate;
//! 2. the verified client certificate of the connection ([`PeerCert`]): a `user` certificate is
//!    an `admin` if its name is in `--admins`, else a `viewer`; a `controller` certificate is an
//!    admin (it is the cluster's own service); a `host` certificate is not a user at all: it may
//!    only post its own agent report.
//!
//! Then [`tern_api::auth::controller_need`] decides: reads (`GET`, including `/metrics` and
//! `/openapi.json`) need a viewer, every change an admin, `/v1/agent/reports` a host certificate
//! and `GET /` (the dashboard's static page, no cluster data) nothing. No identity: 401 with
//! `WWW-Authenticate: Bearer`; too little: 403 whose detail names the role needed. The
//! recognised [`Caller`] goes into the request's extensions for the handlers.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tern_api::auth::{Need, Role, TokenFile, controller_need};
use tern_api::cluster::ErrorBody;

use super::tls::PeerCert;

/// Who may call: the token file and the user certificates that are admins.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The bearer tokens (hashes) and their roles.
    pub tokens: TokenFile,
    /// Names of `user` certificates that are admins (the others are viewers).
    pub admins: BTreeSet<String>,
}

/// The [`Access`] in force, replaced as a whole when the token file changes.
pub type SharedAccess = Arc<RwLock<Access>>;

/// The caller of a request, once recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A host's agent, by its certificate.
    Host(String),
    /// A controller, by its certificate.
    Controller(String),
    /// A user, by certificate or token.
    User {
        /// The certificate's or the token line's name.
        name: String,
        /// What it may do.
        role: Role,
        /// `certificate` or `token`.
        by: &'static str,
    },
}

impl Caller {
    fn describe(&self) -> String {
        match self {
            Caller::Host(n) => format!("host certificate {n:?}"),
            Caller::Controller(n) => format!("controller certificate {n:?}"),
            Caller::User { name, role, by } => format!("{by} {name:?} (role {role})"),
        }
    }
}

fn refuse(status: StatusCode, error: &str, detail: String) -> Response {
    let body = axum::Json(ErrorBody {
        error: error.into(),
        detail,
    });
    if status == StatusCode::UNAUTHORIZED {
        return (status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response();
    }
    (status, body).into_response()
}

/// Recognises the caller of `headers`/`peer` (`Ok(None)`: no credentials at all).
pub fn recognise(
    access: &Access,
    authorization: Option<&str>,
    peer: Option<&tern_pki::Identity>,
) -> Result<Option<Caller>, String> {
    if let Some(value) = authorization {
        let token = value
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or("the Authorization header is not `Bearer TOKEN`")?;
        let entry = access
            .tokens
            .find(token)
            .ok_or("the bearer token is not in this controller's token file")?;
        return Ok(Some(Caller::User {
            name: entry.name.clone(),
            role: entry.role,
            by: "token",
        }));
    }
    Ok(peer.map(|id| match id.role {
        tern_pki::Role::Host => Caller::Host(id.name.clone()),
        tern_pki::Role::Controller => Caller::Controller(id.name.clone()),
        tern_pki::Role::User => Caller::User {
            name: id.name.clone(),
            role: if access.admins.contains(&id.name) {
                Role::Admin
            } else {
                Role::Viewer
            },
            by: "certificate",
        },
    }))
}

/// Whether `caller` may make a request that needs `need` (`Err`: the 403's detail).
pub fn allowed(need: Need, caller: &Caller, what: &str) -> Result<(), String> {
    match (need, caller) {
        (Need::Public, _) | (Need::Host, Caller::Host(_)) => Ok(()),
        (Need::Host, c) => Err(format!(
            "{what} takes only a host certificate (an agent's report); {} is not one",
            c.describe()
        )),
        (_, Caller::Host(n)) => Err(format!(
            "{what} needs role {}; host certificate {n:?} is not a user (hosts may only post their agent reports)",
            if need == Need::Admin {
                "admin"
            } else {
                "viewer"
            }
        )),
        (Need::Viewer, _) | (Need::Admin, Caller::Controller(_)) => Ok(()),
        (Need::Admin, Caller::User { role, .. }) if *role == Role::Admin => Ok(()),
        (Need::Admin, c) => Err(format!(
            "{what} needs role admin; {} may only read",
            c.describe()
        )),
    }
}

/// The middleware (see the module docs).
pub async fn check(State(access): State<SharedAccess>, mut req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let what = format!("{method} {path}");
    let need = controller_need(&method, &path);
    let peer = req.extensions().get::<PeerCert>().and_then(|p| p.0.clone());
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("").to_string());
    let recognised = {
        let access = access.read().unwrap_or_else(|e| e.into_inner());
        recognise(&access, authorization.as_deref(), peer.as_ref())
    };
    let caller = match recognised {
        Ok(Some(c)) => c,
        Ok(None) if need == Need::Public => return next.run(req).await,
        Ok(None) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                format!(
                    "{what} needs credentials: a client certificate of the cluster CA or `Authorization: Bearer TOKEN`"
                ),
            );
        }
        Err(why) => return refuse(StatusCode::UNAUTHORIZED, "unauthenticated", why),
    };
    if let Err(why) = allowed(need, &caller, &what) {
        return refuse(StatusCode::FORBIDDEN, "forbidden", why);
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

//! The control protocol between `tern volume` clients, nodes and the coordinator: JSON requests
//! carried in Tern's private NBD option, so one port serves NBD and control.

use serde::{Deserialize, Serialize};

use crate::format::NodeId;

/// A lease request as a client states it (the node adds its own id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum LeaseAction {
    /// Take the write lease for this node.
    Acquire,
    /// Give it up.
    Release,
    /// Compare-and-swap it to node `to`.
    Handover {
        /// Successor.
        to: NodeId,
    },
    /// Take a pending hand-over back.
    AbortHandover,
    /// Confirm a hand-over received.
    ConfirmHandover,
}

/// Requests. The first group is what clients send to any node; the second is node → coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Create a file.
    Create {
        /// Name.
        name: String,
        /// Bytes.
        size: u64,
        /// Allocate and zero every extent now.
        preallocated: bool,
    },
    /// Delete a file.
    Remove {
        /// Name.
        name: String,
    },
    /// Grow a file.
    Resize {
        /// Name.
        name: String,
        /// New size.
        size: u64,
    },
    /// List files.
    List,
    /// One file's details (with its extent map when `map`).
    Stat {
        /// Name.
        name: String,
        /// Include the extent map.
        #[serde(default)]
        map: bool,
    },
    /// This node's view of the cluster.
    Status,
    /// A lease action on behalf of the receiving node.
    Lease {
        /// File.
        name: String,
        /// What to do.
        #[serde(flatten)]
        action: LeaseAction,
    },
    /// Node → coordinator: a lease action for `node`; `epoch` is the caller's current epoch.
    CoordLease {
        /// File.
        name: String,
        /// Node the action is for.
        node: NodeId,
        /// Caller's epoch (for renew/release/hand-over/confirm).
        epoch: u64,
        /// What to do (`Renew` is expressed as `renew: true` with action `acquire`).
        action: LeaseAction,
        /// Renew instead of acquire.
        #[serde(default)]
        renew: bool,
    },
    /// Coordinator → node: stop writing this file now (an aborted hand-over moves the lease back).
    Revoke {
        /// File.
        name: String,
    },
    /// Node → coordinator: map logical extent `logical` of a thin file.
    Allocate {
        /// File.
        name: String,
        /// Logical extent.
        logical: u64,
    },
}

/// A request with its routing flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Set by a node forwarding to the coordinator: the receiver must not forward again.
    #[serde(default)]
    pub forwarded: bool,
    /// The request.
    pub request: Request,
    /// The forwarding node and its listen address (so the coordinator can reach it back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<(NodeId, String)>,
}

/// Error categories a client can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The receiver is not (or no longer) the coordinator.
    NotCoordinator,
    /// No coordinator could be reached in time.
    NoCoordinator,
    /// Bad name, size, request.
    Invalid,
    /// File exists.
    Exists,
    /// No such file.
    NotFound,
    /// ENOSPC.
    NoSpace,
    /// Lease held by someone else / file busy.
    Busy,
    /// Stale or expired lease.
    Stale,
    /// I/O or internal failure.
    Failed,
}

/// A reply: `ok` with `data`, or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Success.
    pub ok: bool,
    /// Result on success.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
    /// Error category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    /// One-line error message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A failed control call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// Category.
    pub kind: ErrorKind,
    /// Message.
    pub message: String,
}

impl ControlError {
    /// Build one.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ControlError {
            kind,
            message: message.into(),
        }
    }
}

impl Reply {
    /// From a result.
    pub fn from_result(r: Result<serde_json::Value, ControlError>) -> Reply {
        match r {
            Ok(data) => Reply {
                ok: true,
                data,
                kind: None,
                error: None,
            },
            Err(e) => Reply {
                ok: false,
                data: serde_json::Value::Null,
                kind: Some(e.kind),
                error: Some(e.message),
            },
        }
    }
    /// Into a result.
    pub fn into_result(self) -> Result<serde_json::Value, ControlError> {
        if self.ok {
            Ok(self.data)
        } else {
            Err(ControlError {
                kind: self.kind.unwrap_or(ErrorKind::Failed),
                message: self.error.unwrap_or_else(|| "unknown error".into()),
            })
        }
    }
}

/// Send `request` to the node at `addr` and wait for the reply.
pub fn call(
    addr: &str,
    request: &Request,
    forwarded: bool,
    timeout: std::time::Duration,
) -> Result<serde_json::Value, ControlError> {
    send(
        addr,
        Envelope {
            forwarded,
            request: request.clone(),
            from: None,
        },
        timeout,
    )
}

/// Send an envelope as is.
pub fn send(
    addr: &str,
    env: Envelope,
    timeout: std::time::Duration,
) -> Result<serde_json::Value, ControlError> {
    let bytes = serde_json::to_vec(&env)
        .map_err(|e| ControlError::new(ErrorKind::Failed, e.to_string()))?;
    let reply = tern_nbd::control(addr, &bytes, timeout).map_err(|e| {
        ControlError::new(
            ErrorKind::NoCoordinator,
            format!("cannot reach node {addr}: {e}"),
        )
    })?;
    let reply: Reply = serde_json::from_slice(&reply).map_err(|e| {
        ControlError::new(
            ErrorKind::Failed,
            format!("malformed reply from {addr}: {e}"),
        )
    })?;
    reply.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_json() {
        for r in [
            Request::Create {
                name: "a".into(),
                size: 5,
                preallocated: true,
            },
            Request::Lease {
                name: "a".into(),
                action: LeaseAction::Handover { to: 3 },
            },
            Request::CoordLease {
                name: "a".into(),
                node: 2,
                epoch: 7,
                action: LeaseAction::Acquire,
                renew: true,
            },
            Request::Stat {
                name: "a".into(),
                map: false,
            },
        ] {
            let env = Envelope {
                forwarded: true,
                request: r,
                from: Some((2, "127.0.0.1:1".into())),
            };
            let s = serde_json::to_string(&env).unwrap();
            assert_eq!(serde_json::from_str::<Envelope>(&s).unwrap(), env, "{s}");
        }
    }
}

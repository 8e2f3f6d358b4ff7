//! The control protocol between `tern volume` clients, nodes and the coordinator: JSON requests
//! carried in Tern's private NBD option, so one port serves NBD and control.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use tern_nbd::{ClientTls, PeerId};

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
    /// Take every write lease `node` holds away from it now, each with an epoch bump persisted
    /// before the reply, so a late write with an old epoch is refused (the cluster controller
    /// sends it for a host that was lost). Any node forwards it to the coordinator.
    FenceNode {
        /// The node to fence.
        node: NodeId,
    },
}

impl Request {
    /// Whether executing the request twice leaves the state, and gives the answer, of executing
    /// it once: only such a request is sent again when a kept connection ends before its reply
    /// began, since the server may have executed it ([`crate::control_conn`]).
    ///
    /// * `status`, `list`, `stat`: they read only.
    /// * A lease `acquire` (a client's `lease`, a node's `coord_lease`, renewal or not): the
    ///   lease table answers an acquire by the live holder with its lease as it is, renewed,
    ///   at the same epoch (`LeaseOp::Acquire` in `lease.rs`), and a renewal extends it again.
    /// * `allocate`: a logical extent already mapped is answered with the map as it is
    ///   (`namespace::allocate`), so a second allocation maps nothing new.
    ///
    /// Not resent: `create` (a second one finds the file: `exists`), `remove` (`not_found`),
    /// `release`, `handover`, `abort_handover`, `confirm_handover` (each moves the lease or its
    /// epoch: a second one is refused as stale, or acts on the new state), `revoke` and
    /// `fence_node` (a second one acts again and answers differently: no epoch dropped, no file
    /// fenced), `resize` (an absolute size, but a resize by another client in between would
    /// turn the second into a refusal; an operator's command, which fails as before).
    pub fn is_idempotent(&self) -> bool {
        match self {
            Request::Status | Request::List | Request::Stat { .. } | Request::Allocate { .. } => {
                true
            }
            Request::Lease { action, .. } | Request::CoordLease { action, .. } => {
                *action == LeaseAction::Acquire
            }
            Request::Create { .. }
            | Request::Remove { .. }
            | Request::Resize { .. }
            | Request::Revoke { .. }
            | Request::FenceNode { .. } => false,
        }
    }
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
    /// The peer's reply did not follow the protocol (a field missing or of the wrong type, or
    /// an answer to another kind of request).
    BadReply,
    /// The client's certificate does not allow this request (TLS nodes).
    Denied,
}

/// Whether a node's data path is direct or redirected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathState {
    /// pread/pwrite on the LUN.
    Direct,
    /// NBD to the coordinator.
    Redirected,
}

impl PathState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            PathState::Direct => "direct",
            PathState::Redirected => "redirected",
        }
    }
}

/// A node's role in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The elected coordinator.
    Coordinator,
    /// Any other node.
    Node,
}

// Reply fields of type `Option` are required on the wire (`null` when absent): serde would
// otherwise read a missing one as `None`, a silent default for a fencing value such as a holder.
// `#[serde(deserialize_with = "Option::deserialize")]` turns that default off.

/// A file's write lease as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// Fencing epoch of the last grant.
    pub epoch: u64,
    /// The live holder (`None`: free or expired).
    #[serde(deserialize_with = "Option::deserialize")]
    pub holder: Option<NodeId>,
    /// Time left of the live holder's lease.
    #[serde(deserialize_with = "Option::deserialize")]
    pub remaining_ms: Option<u64>,
    /// The source of a pending hand-over.
    #[serde(deserialize_with = "Option::deserialize")]
    pub handover_from: Option<NodeId>,
}

/// One file (create, resize, stat, allocate, and each entry of a list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Every extent allocated at creation.
    pub preallocated: bool,
    /// Extents mapped so far.
    pub allocated_extents: u64,
    /// The write lease.
    pub lease: LeaseInfo,
    /// The extent map (physical extent per logical extent, [`crate::format::HOLE`] for a
    /// hole); present only when asked for (`stat` with `map`, `allocate`): see
    /// [`FileInfo::into_map`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<Vec<u32>>,
}

impl FileInfo {
    /// The extent map, which the request asked for: its absence is a protocol error.
    pub fn into_map(self) -> Result<Vec<u32>, ReplyError> {
        self.map.ok_or(ReplyError::Missing("map"))
    }
}

/// The answer to `remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// Name.
    pub name: String,
    /// Always true (a refusal is an error reply).
    pub removed: bool,
}

/// The answer to `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileList {
    /// Every file.
    pub files: Vec<FileInfo>,
    /// Bytes per extent.
    pub extent_size: u64,
    /// Extents of the volume.
    pub extents: u32,
    /// Extents not mapped by any file.
    pub free_extents: u64,
    /// The coordinator's generation.
    pub generation: u64,
}

/// The answer to a lease action: who holds the lease now, at which epoch, for how long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// File.
    pub name: String,
    /// The holder after the action (`None`: released).
    #[serde(deserialize_with = "Option::deserialize")]
    pub holder: Option<NodeId>,
    /// Fencing epoch after the action.
    pub epoch: u64,
    /// The lease's TTL (a holder's local deadline is request sent + TTL).
    pub ttl_ms: u64,
    /// Time left at the coordinator.
    pub remaining_ms: u64,
}

/// The answer to `revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// File.
    pub name: String,
    /// The epoch of the lease the node dropped (`None`: it held none).
    #[serde(deserialize_with = "Option::deserialize")]
    pub dropped_epoch: Option<u64>,
}

/// The answer to `fence_node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fenced {
    /// The node fenced.
    pub node: NodeId,
    /// The files whose write lease it held, now free at a higher epoch.
    pub files: Vec<String>,
}

/// The coordinator as a node knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorRef {
    /// Node id.
    pub node_id: NodeId,
    /// Listen address.
    pub addr: String,
    /// Generation (etcd revision of its election key).
    pub generation: u64,
}

/// One node of the cluster (its membership entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Node id.
    pub node_id: NodeId,
    /// Listen address.
    pub addr: String,
    /// Its data path.
    pub path: PathState,
}

/// A write lease a node holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLeaseInfo {
    /// File.
    pub name: String,
    /// Fencing epoch.
    pub epoch: u64,
    /// Whether its local deadline has not passed.
    pub valid: bool,
}

/// The answer to `status`: one node's view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This node.
    pub node_id: NodeId,
    /// Its listen address.
    pub listen: String,
    /// Coordinator or not.
    pub role: Role,
    /// Its data path.
    pub path: PathState,
    /// Started with `--no-direct`.
    pub no_direct: bool,
    /// The LUN's path on this host (for local direct-I/O clients).
    pub lun: std::path::PathBuf,
    /// The fault-injection file, if any.
    #[serde(deserialize_with = "Option::deserialize")]
    pub fault_file: Option<std::path::PathBuf>,
    /// The coordinator, if one is known.
    #[serde(deserialize_with = "Option::deserialize")]
    pub coordinator: Option<CoordinatorRef>,
    /// The cluster's members.
    pub nodes: Vec<Member>,
    /// Leases this node holds.
    pub held_leases: Vec<HeldLeaseInfo>,
}

/// A successful reply, one variant per kind of answer (the `reply` field names it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    /// `create`, `resize`, `stat`, `allocate`.
    File(FileInfo),
    /// `remove`.
    Removed(Removed),
    /// `list`.
    Files(FileList),
    /// `lease`, `coord_lease`.
    Lease(LeaseGrant),
    /// `revoke`.
    Revoked(Revoked),
    /// `status`.
    Status(NodeStatus),
    /// `fence_node`.
    Fenced(Fenced),
}

impl Response {
    /// The variant's name, as on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Response::File(_) => "file",
            Response::Removed(_) => "removed",
            Response::Files(_) => "files",
            Response::Lease(_) => "lease",
            Response::Revoked(_) => "revoked",
            Response::Status(_) => "status",
            Response::Fenced(_) => "fenced",
        }
    }

    fn unexpected(&self, expected: &'static str) -> ReplyError {
        ReplyError::Unexpected {
            expected,
            got: self.kind(),
        }
    }

    /// A file, or [`ReplyError::Unexpected`].
    pub fn into_file(self) -> Result<FileInfo, ReplyError> {
        match self {
            Response::File(f) => Ok(f),
            other => Err(other.unexpected("file")),
        }
    }

    /// A removal, or [`ReplyError::Unexpected`].
    pub fn into_removed(self) -> Result<Removed, ReplyError> {
        match self {
            Response::Removed(r) => Ok(r),
            other => Err(other.unexpected("removed")),
        }
    }

    /// A file list, or [`ReplyError::Unexpected`].
    pub fn into_files(self) -> Result<FileList, ReplyError> {
        match self {
            Response::Files(l) => Ok(l),
            other => Err(other.unexpected("files")),
        }
    }

    /// A lease grant, or [`ReplyError::Unexpected`].
    pub fn into_lease(self) -> Result<LeaseGrant, ReplyError> {
        match self {
            Response::Lease(l) => Ok(l),
            other => Err(other.unexpected("lease")),
        }
    }

    /// A revocation, or [`ReplyError::Unexpected`].
    pub fn into_revoked(self) -> Result<Revoked, ReplyError> {
        match self {
            Response::Revoked(r) => Ok(r),
            other => Err(other.unexpected("revoked")),
        }
    }

    /// A fence's outcome, or [`ReplyError::Unexpected`].
    pub fn into_fenced(self) -> Result<Fenced, ReplyError> {
        match self {
            Response::Fenced(f) => Ok(f),
            other => Err(other.unexpected("fenced")),
        }
    }

    /// A node status, or [`ReplyError::Unexpected`].
    pub fn into_status(self) -> Result<NodeStatus, ReplyError> {
        match self {
            Response::Status(s) => Ok(s),
            other => Err(other.unexpected("status")),
        }
    }
}

/// A reply on the wire: `ok` with `data`, or `kind` and `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Success.
    pub ok: bool,
    /// Result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Response>,
    /// Error category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    /// One-line error message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A reply that does not follow the protocol: nothing of it is used.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// Not JSON, or a field missing or of the wrong type.
    #[error("Malformed control reply")]
    Malformed(#[source] serde_json::Error),
    /// A field the request asked for is absent.
    #[error("Control reply lacks {0:?}")]
    Missing(&'static str),
    /// `ok` with no data, or an error without its kind or message.
    #[error("Inconsistent control reply: {0}")]
    Inconsistent(&'static str),
    /// A well-formed answer to another kind of request.
    #[error("Expected a {expected:?} reply, got {got:?}")]
    Unexpected {
        /// What the request calls for.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
}

impl From<ReplyError> for ControlError {
    fn from(e: ReplyError) -> Self {
        let mut message = e.to_string();
        if let ReplyError::Malformed(src) = &e {
            message = format!("{message}: {src}");
        }
        ControlError::new(ErrorKind::BadReply, message)
    }
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
    pub fn from_result(r: Result<Response, ControlError>) -> Reply {
        match r {
            Ok(data) => Reply {
                ok: true,
                data: Some(data),
                kind: None,
                error: None,
            },
            Err(e) => Reply {
                ok: false,
                data: None,
                kind: Some(e.kind),
                error: Some(e.message),
            },
        }
    }

    /// Into a result: the answer, the peer's error, or a [`ReplyError`] if the reply is not
    /// consistent (nothing is filled in by default).
    pub fn into_result(self) -> Result<Result<Response, ControlError>, ReplyError> {
        match (self.ok, self.data, self.kind, self.error) {
            (true, Some(data), None, None) => Ok(Ok(data)),
            (true, ..) => Err(ReplyError::Inconsistent(
                "a success needs data and no error",
            )),
            (false, None, Some(kind), Some(message)) => Ok(Err(ControlError { kind, message })),
            (false, ..) => Err(ReplyError::Inconsistent(
                "an error needs a kind and a message and no data",
            )),
        }
    }
}

/// Decode a reply's bytes: the answer, or the peer's error; a reply that breaks the protocol is
/// an [`ErrorKind::BadReply`] error.
pub fn decode_reply(bytes: &[u8]) -> Result<Response, ControlError> {
    let reply: Reply = serde_json::from_slice(bytes).map_err(ReplyError::Malformed)?;
    reply.into_result()?
}

/// Send `request` to the node at `addr` and wait for the typed reply.
pub fn request(
    addr: &str,
    request: &Request,
    forwarded: bool,
    timeout: std::time::Duration,
) -> Result<Response, ControlError> {
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

/// Like [`request`], with the reply as JSON (for printing it: `tern volume … --json`). The reply
/// is decoded strictly first, so a malformed one is refused here too; logic that acts on a reply
/// uses [`request`] and the typed [`Response`].
pub fn call(
    addr: &str,
    req: &Request,
    forwarded: bool,
    timeout: std::time::Duration,
) -> Result<serde_json::Value, ControlError> {
    let r = request(addr, req, forwarded, timeout)?;
    serde_json::to_value(&r).map_err(|e| ControlError::new(ErrorKind::Failed, e.to_string()))
}

/// The certificate this process presents to volume nodes (`--tls-dir`), set once at start:
/// every connection it makes to a node (control, redirected I/O, relays, volume disks) then
/// runs `NBD_OPT_STARTTLS` with it. Unset: plain connections, as before TLS.
static CLIENT_TLS: OnceLock<ClientTls> = OnceLock::new();

/// Why [`set_client_tls`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SetTlsError {
    /// The directory does not hold a usable CA, certificate and key.
    #[error("Cannot load the TLS directory")]
    Load(#[from] tern_pki::LoadError),
    /// A different TLS directory was set already in this process.
    #[error("This process already uses another TLS directory")]
    AlreadySet,
}

/// Use the certificate in `dir` for every connection this process makes to a volume node.
/// Returns the certificate's identity.
pub fn set_client_tls(dir: &std::path::Path) -> Result<tern_pki::Identity, SetTlsError> {
    let tls = tern_pki::TlsDir::load(dir)?;
    let id = tls.identity().clone();
    CLIENT_TLS
        .set(ClientTls {
            config: tls.client_config(),
            server_name: None,
        })
        .map_err(|_| SetTlsError::AlreadySet)?;
    Ok(id)
}

/// The TLS settings of this process's connections to volume nodes ([`set_client_tls`]).
pub fn client_tls() -> Option<&'static ClientTls> {
    CLIENT_TLS.get()
}

/// The node id a volume node's certificate stands for: a host certificate named `node-N`
/// (N ≥ 1, decimal) is node N. Any other certificate is not a volume node.
pub fn node_of_certificate(peer: &PeerId) -> Option<NodeId> {
    if peer.role != "host" {
        return None;
    }
    let digits = peer.name.strip_prefix("node-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.starts_with('0') {
        return None;
    }
    digits.parse().ok().filter(|&n: &NodeId| n >= 1)
}

/// The certificate name a volume node with id `node` must carry.
pub fn certificate_name_of_node(node: NodeId) -> String {
    format!("node-{node}")
}

/// What a client's certificate lets it do on a volume node (pure; `None` peer = TLS off, all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No TLS: everything, as before (only on a node started without `--tls-dir`).
    Unauthenticated,
    /// Volume node N (a host certificate `node-N`): node-to-node requests as node N, the
    /// redirected exports `FILE@N.EPOCH`, and everything a host may do.
    Node(NodeId),
    /// A controller certificate: every client request (files, leases, fencing a node).
    Controller,
    /// Any other host certificate (an agent, a VMM): every client request but fencing.
    Host,
    /// A user certificate: read-only (`list`, `stat`, `status`; files opened read-only).
    User,
}

impl Access {
    /// The access of a connection's client.
    pub fn of(peer: Option<&PeerId>) -> Access {
        let Some(p) = peer else {
            return Access::Unauthenticated;
        };
        if let Some(n) = node_of_certificate(p) {
            return Access::Node(n);
        }
        match p.role.as_str() {
            "controller" => Access::Controller,
            "host" => Access::Host,
            _ => Access::User,
        }
    }

    /// Whether files may be opened for writing.
    pub fn may_write(self) -> bool {
        !matches!(self, Access::User)
    }

    /// Whether this client may open the redirected export of `writer`'s writes (`FILE@N.EPOCH`).
    pub fn may_write_as(self, writer: NodeId) -> bool {
        match self {
            Access::Unauthenticated => true,
            Access::Node(n) => n == writer,
            _ => false,
        }
    }

    /// Whether this client may send `env` (pure). `Err` says why not.
    pub fn check(self, env: &Envelope) -> Result<(), String> {
        let node = match self {
            Access::Unauthenticated => return Ok(()),
            Access::Node(n) => Some(n),
            _ => None,
        };
        let me = |what: &str| match node {
            Some(_) => Ok(()),
            None => Err(format!(
                "{what} is accepted only from a volume node's certificate"
            )),
        };
        if env.forwarded {
            me("a forwarded request")?;
        }
        if let Some((from, _)) = &env.from {
            me("a request naming its sending node")?;
            if Some(*from) != node {
                return Err(format!(
                    "the request says it comes from node {from}, the certificate is node {}'s",
                    node.unwrap_or_default()
                ));
            }
        }
        match &env.request {
            Request::List | Request::Stat { .. } | Request::Status => Ok(()),
            Request::Create { .. }
            | Request::Remove { .. }
            | Request::Resize { .. }
            | Request::Lease { .. } => {
                if self.may_write() {
                    Ok(())
                } else {
                    Err("a user certificate may only read (list, stat, status)".into())
                }
            }
            Request::FenceNode { .. } => match self {
                Access::Controller | Access::Node(_) => Ok(()),
                _ => Err("fencing a node is accepted only from a controller certificate".into()),
            },
            Request::Revoke { .. } => me("revoke"),
            Request::Allocate { .. } => me("allocate"),
            Request::CoordLease { node: n, .. } => {
                me("a coordinator lease request")?;
                if Some(*n) != node {
                    return Err(format!(
                        "a lease request for node {n} from node {}'s certificate",
                        node.unwrap_or_default()
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Send an envelope as is, on a kept-alive connection to `addr` when one is idle
/// ([`crate::control_conn`]; sent again on a new connection after the kept one ended before the
/// reply only when [`Request::is_idempotent`]).
pub fn send(
    addr: &str,
    env: Envelope,
    timeout: std::time::Duration,
) -> Result<Response, ControlError> {
    let bytes = serde_json::to_vec(&env)
        .map_err(|e| ControlError::new(ErrorKind::Failed, e.to_string()))?;
    let resend = env.request.is_idempotent();
    let reply = crate::control_conn::exchange(addr, &bytes, timeout, client_tls(), resend)
        .map_err(|e| {
            ControlError::new(
                ErrorKind::NoCoordinator,
                format!("cannot reach node {addr}: {}", with_causes(&e)),
            )
        })?;
    decode_reply(&reply).map_err(|e| match e.kind {
        ErrorKind::BadReply => ControlError::new(
            ErrorKind::BadReply,
            format!("from node {addr}: {}", e.message),
        ),
        _ => e,
    })
}

/// `e` and its chain of causes, `: `-separated.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    with_causes(e)
}

/// `e` and its chain of causes, `: `-separated ("NBD connection failed: Connection refused
/// (os error 111)"): a [`ControlError`] carries a message only, so the cause must be in it.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reads_acquires_and_allocations_are_idempotent() {
        let name = || "f".to_string();
        let lease = |action| Request::Lease {
            name: name(),
            action,
        };
        let coord = |action, renew| Request::CoordLease {
            name: name(),
            node: 2,
            epoch: 3,
            action,
            renew,
        };
        for r in [
            Request::Status,
            Request::List,
            Request::Stat {
                name: name(),
                map: true,
            },
            Request::Allocate {
                name: name(),
                logical: 4,
            },
            lease(LeaseAction::Acquire),
            coord(LeaseAction::Acquire, true),
            coord(LeaseAction::Acquire, false),
        ] {
            assert!(r.is_idempotent(), "{r:?}");
        }
        for r in [
            Request::Create {
                name: name(),
                size: 1,
                preallocated: false,
            },
            Request::Remove { name: name() },
            Request::Resize {
                name: name(),
                size: 1,
            },
            Request::Revoke { name: name() },
            Request::FenceNode { node: 2 },
            lease(LeaseAction::Release),
            lease(LeaseAction::Handover { to: 3 }),
            lease(LeaseAction::AbortHandover),
            lease(LeaseAction::ConfirmHandover),
            coord(LeaseAction::Release, false),
            coord(LeaseAction::Handover { to: 3 }, false),
            coord(LeaseAction::AbortHandover, false),
            coord(LeaseAction::ConfirmHandover, false),
        ] {
            assert!(!r.is_idempotent(), "{r:?}");
        }
    }

    #[test]
    fn an_unreachable_node_is_reported_with_the_cause() {
        // A port that was just free: nobody listens on it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let e = request(
            &addr,
            &Request::Status,
            false,
            std::time::Duration::from_secs(5),
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NoCoordinator);
        assert!(
            e.message
                .starts_with(&format!("cannot reach node {addr}: "))
                && e.message.contains("Connection refused"),
            "the message must name the node and the cause: {}",
            e.message
        );
    }

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

    fn grant() -> Response {
        Response::Lease(LeaseGrant {
            name: "vm1.raw".into(),
            holder: Some(2),
            epoch: 7,
            ttl_ms: 4000,
            remaining_ms: 3990,
        })
    }

    fn file() -> Response {
        Response::File(FileInfo {
            name: "vm1.raw".into(),
            size: 1 << 20,
            preallocated: false,
            allocated_extents: 1,
            lease: LeaseInfo {
                epoch: 3,
                holder: None,
                remaining_ms: None,
                handover_from: Some(1),
            },
            map: Some(vec![4]),
        })
    }

    fn status() -> Response {
        Response::Status(NodeStatus {
            node_id: 1,
            listen: "127.0.0.1:1".into(),
            role: Role::Coordinator,
            path: PathState::Direct,
            no_direct: false,
            lun: "/tmp/lun".into(),
            fault_file: None,
            coordinator: Some(CoordinatorRef {
                node_id: 1,
                addr: "127.0.0.1:1".into(),
                generation: 9,
            }),
            nodes: vec![Member {
                node_id: 1,
                addr: "127.0.0.1:1".into(),
                path: PathState::Redirected,
            }],
            held_leases: vec![HeldLeaseInfo {
                name: "a".into(),
                epoch: 2,
                valid: true,
            }],
        })
    }

    /// The reply bytes of `r` with `edit` applied to its `data` object.
    fn edited(
        r: Response,
        edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    ) -> Vec<u8> {
        let mut v = serde_json::to_value(Reply::from_result(Ok(r))).unwrap();
        edit(v["data"].as_object_mut().unwrap());
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn every_reply_round_trips_through_json() {
        let err = ControlError::new(ErrorKind::Stale, "stale epoch 3");
        for r in [grant(), file(), status()] {
            let bytes = serde_json::to_vec(&Reply::from_result(Ok(r.clone()))).unwrap();
            assert_eq!(decode_reply(&bytes).unwrap(), r);
        }
        let bytes = serde_json::to_vec(&Reply::from_result(Err(err.clone()))).unwrap();
        assert_eq!(decode_reply(&bytes).unwrap_err(), err);
    }

    #[test]
    fn a_reply_missing_a_fencing_field_is_refused_not_defaulted() {
        // The epoch, the TTL and the holder each decide who may write: none may be left out.
        for field in ["epoch", "ttl_ms", "holder", "name", "reply"] {
            let bytes = edited(grant(), |d| {
                d.remove(field);
            });
            let e = decode_reply(&bytes).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadReply, "{field}: {e}");
            assert!(e.message.contains("Malformed"), "{field}: {e}");
        }
        // A file's lease holder and a status's fault file: `null` is a value, absence is not.
        let bytes = edited(file(), |d| {
            d["lease"].as_object_mut().unwrap().remove("holder");
        });
        assert_eq!(decode_reply(&bytes).unwrap_err().kind, ErrorKind::BadReply);
        let bytes = edited(status(), |d| {
            d.remove("fault_file");
        });
        assert_eq!(decode_reply(&bytes).unwrap_err().kind, ErrorKind::BadReply);
    }

    #[test]
    fn a_reply_with_a_field_of_the_wrong_type_is_refused() {
        for (field, value) in [
            ("epoch", serde_json::json!("7")),
            ("epoch", serde_json::json!(-1)),
            ("epoch", serde_json::json!(1.5)),
            ("ttl_ms", serde_json::Value::Null),
            ("holder", serde_json::json!(1u64 << 40)),
            ("reply", serde_json::json!("lease_grant")),
        ] {
            let bytes = edited(grant(), |d| {
                d.insert(field.into(), value.clone());
            });
            let e = decode_reply(&bytes).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadReply, "{field} = {value}: {e}");
        }
        let bytes = edited(status(), |d| {
            d.insert("path".into(), serde_json::json!("sideways"));
        });
        assert_eq!(decode_reply(&bytes).unwrap_err().kind, ErrorKind::BadReply);
    }

    #[test]
    fn an_inconsistent_envelope_is_refused() {
        for bytes in [
            &br#"{"ok":true}"#[..],
            br#"{"ok":false}"#,
            br#"{"ok":false,"kind":"busy"}"#,
            br#"{"ok":false,"error":"no kind"}"#,
            br#"{"ok":"yes"}"#,
            b"not json",
        ] {
            let e = decode_reply(bytes).unwrap_err();
            assert_eq!(
                e.kind,
                ErrorKind::BadReply,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        let r: Reply = serde_json::from_slice(br#"{"ok":true}"#).unwrap();
        assert!(matches!(r.into_result(), Err(ReplyError::Inconsistent(_))));
    }

    #[test]
    fn an_answer_to_another_request_is_refused_with_a_typed_error() {
        assert!(matches!(
            file().into_lease(),
            Err(ReplyError::Unexpected {
                expected: "lease",
                got: "file"
            })
        ));
        assert!(matches!(
            grant().into_status(),
            Err(ReplyError::Unexpected { .. })
        ));
        let Response::File(mut f) = file() else {
            unreachable!()
        };
        f.map = None;
        assert!(matches!(f.into_map(), Err(ReplyError::Missing("map"))));
        let e: ControlError = ReplyError::Missing("map").into();
        assert_eq!(e.kind, ErrorKind::BadReply);
    }

    fn peer(name: &str, role: &str) -> PeerId {
        PeerId {
            name: name.into(),
            role: role.into(),
        }
    }

    fn env(request: Request, forwarded: bool, from: Option<NodeId>) -> Envelope {
        Envelope {
            forwarded,
            request,
            from: from.map(|n| (n, format!("10.0.0.{n}:10809"))),
        }
    }

    #[test]
    fn only_host_certificates_named_node_n_are_volume_nodes() {
        assert_eq!(node_of_certificate(&peer("node-3", "host")), Some(3));
        assert_eq!(node_of_certificate(&peer("node-3", "controller")), None);
        assert_eq!(node_of_certificate(&peer("node-3", "user")), None);
        for bad in [
            "node-",
            "node-0",
            "node-03",
            "node-x",
            "node3",
            "h0",
            "node-4294967296",
        ] {
            assert_eq!(node_of_certificate(&peer(bad, "host")), None, "{bad}");
        }
        assert_eq!(certificate_name_of_node(12), "node-12");
    }

    #[test]
    fn node_to_node_messages_only_from_the_node_they_name() {
        let n1 = Access::of(Some(&peer("node-1", "host")));
        let n2 = Access::of(Some(&peer("node-2", "host")));
        let host = Access::of(Some(&peer("h0", "host")));
        let ctl = Access::of(Some(&peer("ctl", "controller")));
        let user = Access::of(Some(&peer("alice", "user")));
        let revoke = Request::Revoke { name: "f".into() };
        let coord = |node| Request::CoordLease {
            name: "f".into(),
            node,
            epoch: 1,
            action: LeaseAction::Acquire,
            renew: false,
        };
        assert!(n1.check(&env(revoke.clone(), true, Some(1))).is_ok());
        assert!(n1.check(&env(coord(1), true, Some(1))).is_ok());
        // Claiming another node's id, in `from` or in the lease request.
        assert!(n2.check(&env(coord(1), true, Some(1))).is_err());
        assert!(n2.check(&env(coord(1), true, Some(2))).is_err());
        for who in [host, ctl, user] {
            assert!(who.check(&env(revoke.clone(), false, None)).is_err());
            assert!(who.check(&env(Request::List, true, None)).is_err());
            assert!(who.check(&env(coord(1), false, None)).is_err());
            let alloc = Request::Allocate {
                name: "f".into(),
                logical: 0,
            };
            assert!(who.check(&env(alloc, false, None)).is_err());
        }
        // Without TLS everything passes, as before.
        assert!(
            Access::of(None)
                .check(&env(coord(1), true, Some(2)))
                .is_ok()
        );
    }

    #[test]
    fn users_only_read_and_only_controllers_fence() {
        let host = Access::of(Some(&peer("h0", "host")));
        let ctl = Access::of(Some(&peer("ctl", "controller")));
        let user = Access::of(Some(&peer("alice", "user")));
        let create = Request::Create {
            name: "f".into(),
            size: 1 << 20,
            preallocated: false,
        };
        let lease = Request::Lease {
            name: "f".into(),
            action: LeaseAction::Acquire,
        };
        let fence = Request::FenceNode { node: 2 };
        for r in [
            Request::List,
            Request::Status,
            Request::Stat {
                name: "f".into(),
                map: false,
            },
        ] {
            for who in [host, ctl, user] {
                assert!(who.check(&env(r.clone(), false, None)).is_ok());
            }
        }
        for r in [create, lease] {
            assert!(host.check(&env(r.clone(), false, None)).is_ok());
            assert!(ctl.check(&env(r.clone(), false, None)).is_ok());
            assert!(user.check(&env(r, false, None)).is_err());
        }
        assert!(ctl.check(&env(fence.clone(), false, None)).is_ok());
        assert!(host.check(&env(fence.clone(), false, None)).is_err());
        assert!(user.check(&env(fence, false, None)).is_err());
        assert!(!user.may_write() && host.may_write() && ctl.may_write());
        assert!(Access::Node(1).may_write_as(1) && !Access::Node(2).may_write_as(1));
        assert!(!host.may_write_as(1) && !ctl.may_write_as(1) && !user.may_write_as(1));
    }
}

//! The node as an NBD server's export set ([`NodeExports`]): the files by name, the coordinator's
//! redirected exports `NAME@NODE.EPOCH`, and the control protocol carried in an NBD option.
//!
//! With TLS (`tern volume serve --tls-dir`), what a client may do follows from its certificate
//! ([`Access`]): a user certificate opens files read-only and sends only `list`/`stat`/`status`;
//! `NAME@N.EPOCH` opens only for volume node N's certificate (`node-N`); node-to-node messages
//! (forwarded requests, `revoke`, `allocate`, coordinator lease requests) only from a volume
//! node's certificate, naming that node.

use std::sync::Arc;

use tern_nbd::proto::StatusExtent;
use tern_nbd::server::ZeroFlags;
use tern_nbd::{Backend, Errno, Exports, Peer, Refusal};

use crate::control::{Access, ControlError, Envelope, ErrorKind, Reply, Request, Response};
use crate::format::NodeId;

use super::Node;
use super::redirected::RedirectTarget;

/// The node as a set of NBD exports plus the control protocol.
#[derive(Debug, Clone)]
pub struct NodeExports(pub Arc<Node>);

impl Exports for NodeExports {
    fn list(&self) -> Vec<String> {
        // NBD_OPT_LIST has no error path of its own: an unreachable coordinator lists nothing.
        match self
            .0
            .call_coordinator(&Request::List)
            .map(Response::into_files)
        {
            Ok(Ok(l)) => l.files.into_iter().map(|f| f.name).collect(),
            _ => Vec::new(),
        }
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.open_for(name, &Peer::default()).ok()
    }

    fn open_for(&self, name: &str, peer: &Peer) -> Result<Arc<dyn Backend>, Refusal> {
        let access = Access::of(peer.id.as_ref());
        if let Some((_, who)) = name.split_once('@')
            && let Some(writer) = who
                .split_once('.')
                .and_then(|(w, _)| w.parse::<NodeId>().ok())
            && !access.may_write_as(writer)
        {
            return Err(Refusal::Policy(format!(
                "{name:?} carries node {writer}'s writes; only the certificate {:?} may open it",
                crate::control::certificate_name_of_node(writer)
            )));
        }
        let backend = self.open_any(name).ok_or(Refusal::Unknown)?;
        if access.may_write() {
            Ok(backend)
        } else {
            Ok(Arc::new(ReadOnly(backend)))
        }
    }

    fn control(&self, request: &[u8]) -> Option<Vec<u8>> {
        self.control_for(request, &Peer::default())
    }

    fn control_for(&self, request: &[u8], peer: &Peer) -> Option<Vec<u8>> {
        let access = Access::of(peer.id.as_ref());
        let res = serde_json::from_slice::<Envelope>(request)
            .map_err(|e| {
                ControlError::new(
                    ErrorKind::Invalid,
                    format!("malformed control request: {e}"),
                )
            })
            .and_then(|env| {
                access.check(&env).map_err(|why| {
                    let who = peer.id.as_ref().map(|p| p.name.as_str()).unwrap_or("?");
                    ControlError::new(ErrorKind::Denied, format!("certificate {who:?}: {why}"))
                })?;
                self.0.handle(env)
            });
        serde_json::to_vec(&Reply::from_result(res)).ok()
    }
}

impl NodeExports {
    fn open_any(&self, name: &str) -> Option<Arc<dyn Backend>> {
        let node = &self.0;
        if let Some((file, who)) = name.split_once('@') {
            let (writer, epoch) = who.split_once('.')?;
            let writer: NodeId = writer.parse().ok()?;
            let epoch: u64 = epoch.parse().ok()?;
            let g = node.coordinator().ok()?;
            let size = g.as_ref()?.volume.meta.files.get(file)?.size;
            drop(g);
            return Some(Arc::new(RedirectTarget {
                node: Arc::clone(node),
                name: file.to_owned(),
                writer,
                epoch,
                size,
            }));
        }
        node.handle_for(name).map(|h| h as Arc<dyn Backend>)
    }
}

/// A file opened for a client that may only read: writes refused with `EPERM` (the export also
/// says read-only, so standard clients do not try).
struct ReadOnly(Arc<dyn Backend>);

impl Backend for ReadOnly {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _data: &[u8], _offset: u64, _fua: bool) -> Result<(), Errno> {
        Err(Errno::Perm)
    }
    fn flush(&self) -> Result<(), Errno> {
        Ok(())
    }
    fn write_zeroes(&self, _offset: u64, _len: u32, _flags: ZeroFlags) -> Result<(), Errno> {
        Err(Errno::Perm)
    }
    fn trim(&self, _offset: u64, _len: u32) -> Result<(), Errno> {
        Err(Errno::Perm)
    }
    fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, Errno> {
        self.0.block_status(offset, len)
    }
}

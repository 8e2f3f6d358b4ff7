//! The node as an NBD server's export set ([`NodeExports`]): the files by name, the coordinator's
//! redirected exports `NAME@NODE.EPOCH`, and the control protocol carried in an NBD option.

use std::sync::Arc;

use tern_nbd::{Backend, Exports};

use crate::control::{ControlError, Envelope, ErrorKind, Reply, Request, Response};
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

    fn control(&self, request: &[u8]) -> Option<Vec<u8>> {
        let res = serde_json::from_slice::<Envelope>(request)
            .map_err(|e| {
                ControlError::new(
                    ErrorKind::Invalid,
                    format!("malformed control request: {e}"),
                )
            })
            .and_then(|env| self.0.handle(env));
        serde_json::to_vec(&Reply::from_result(res)).ok()
    }
}

//! The Peer service: what other members ask of this node about the disks it owns. Protocol
//! translation only; the rules live in [`crate::Node`]'s `*_local` methods, which never
//! forward again (so a request cannot loop between members).

use std::sync::Arc;
use std::time::Instant;

use shadowcache_proto as pb;
use tonic::{Request, Response, Status};

use super::grpc::{info_to_pb, observe, status};
use crate::Node;

/// The Peer service over one node.
#[derive(Debug, Clone)]
pub struct PeerFrontend {
    node: Arc<Node>,
}

impl PeerFrontend {
    /// Serves `node`.
    pub fn new(node: Arc<Node>) -> Self {
        PeerFrontend { node }
    }
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerFrontend {
    async fn owned_disks(
        &self,
        _request: Request<pb::OwnedDisksRequest>,
    ) -> Result<Response<pb::OwnedDisksResponse>, Status> {
        let t = Instant::now();
        let version = self.node.cluster().disks_version();
        let disks = self
            .node
            .local_disks()
            .into_iter()
            .map(info_to_pb)
            .collect();
        observe::<()>("peer_owned_disks", t, 0, &Ok(()));
        Ok(Response::new(pb::OwnedDisksResponse {
            disks,
            disks_version: version,
        }))
    }

    async fn read(
        &self,
        request: Request<pb::PeerReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let t = Instant::now();
        let r = request.into_inner();
        let res = self.node.read_local(&r.disk, r.offset, r.length).await;
        observe("peer_read", t, r.length, &res);
        res.map(|data| Response::new(pb::ReadResponse { data }))
            .map_err(|e| status(&e))
    }

    async fn write(
        &self,
        request: Request<pb::PeerWriteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let t = Instant::now();
        let r = request.into_inner();
        let len = r.data.len() as u64;
        let res = self.node.write_local(&r.disk, r.offset, r.data).await;
        observe("peer_write", t, len, &res);
        res.map(|()| Response::new(pb::WriteResponse {}))
            .map_err(|e| status(&e))
    }

    async fn flush(
        &self,
        request: Request<pb::PeerFlushRequest>,
    ) -> Result<Response<pb::FlushResponse>, Status> {
        let t = Instant::now();
        let r = request.into_inner();
        let res = self.node.flush_local(&r.disk).await;
        observe("peer_flush", t, 0, &res);
        res.map(|()| Response::new(pb::FlushResponse {}))
            .map_err(|e| status(&e))
    }
}

//! The Peer service: what other members ask of this node about the disks it owns. Protocol
//! translation only; the rules live in [`crate::Node`]'s `*_local` methods, which never
//! forward again (so a request cannot loop between members).
//!
//! Architecture invariant: protocol translation only; nothing here forwards a request to another
//! member.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shadowcache_proto as pb;
use tonic::{Request, Response, Status};

use anyhow::Context;
use tokio::net::TcpListener;

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

/// Fail point `peer-serve-corrupt` (built with `--features failpoints`, switched on by
/// `FAILPOINTS=peer-serve-corrupt=return`): every block this node serves to a member has its
/// first byte flipped, a lying peer for the tests of the verification path. Compiled out
/// otherwise.
fn lying() -> bool {
    fail::fail_point!("peer-serve-corrupt", |_| true);
    false
}

/// Over TLS, a member's certificate that names its node speaks for that node only: a call
/// that says it comes from another member (its lease, its revocation, its block map
/// subscription, its forwarded read) is refused. Without TLS, or with a certificate that
/// names no node (shared, or issued before), the caller's word is taken.
fn speaks_for<T>(request: &Request<T>, from_node: &str) -> Result<(), Status> {
    match super::conn::identity(request) {
        Some(id) if !id.speaks_for(from_node) => {
            metrics::counter!(crate::telemetry::ROLE_REFUSED, "rpc" => "peer_from_node")
                .increment(1);
            Err(Status::permission_denied(format!(
                "peer call refused: it says it comes from {from_node:?}, and the certificate it came with speaks for {:?} only",
                id.nodes
            )))
        }
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerFrontend {
    type FetchBlocksStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::BlockData, Status>> + Send + 'static>,
    >;

    async fn content_map(
        &self,
        request: Request<pb::ContentMapRequest>,
    ) -> Result<Response<pb::ContentMapResponse>, Status> {
        let t = Instant::now();
        let r = request.into_inner();
        let res = self
            .node
            .content_map_chunk(
                &r.disk,
                crate::ids::Version::new(r.generation, r.epoch),
                r.first_block,
                r.count,
            )
            .await;
        let bytes = res.as_ref().map_or(0, |e| e.len() as u64 * 41);
        observe("peer_content_map", t, bytes, &res);
        let entries = res.map_err(|e| status(&e))?;
        Ok(Response::new(pb::ContentMapResponse {
            generation: r.generation,
            block_size: self.node.config().block_bytes,
            entries: entries
                .into_iter()
                .map(|(index, b)| match b {
                    crate::disk::BlockRef::Zero => pb::ContentMapEntry {
                        index,
                        zero: true,
                        fingerprint: bytes::Bytes::new(),
                    },
                    crate::disk::BlockRef::Data(fp) => pb::ContentMapEntry {
                        index,
                        zero: false,
                        fingerprint: bytes::Bytes::copy_from_slice(&fp.0),
                    },
                })
                .collect(),
        }))
    }

    async fn fetch_blocks(
        &self,
        request: Request<pb::FetchBlocksRequest>,
    ) -> Result<Response<Self::FetchBlocksStream>, Status> {
        let t = Instant::now();
        speaks_for(&request, &request.get_ref().from_node)?;
        let (_, extensions, r) = request.into_parts();
        let res = self
            .node
            .blocks_for_peer(
                &r.disk,
                crate::ids::Version::new(r.generation, r.epoch),
                &r.indices,
                r.cached_only,
            )
            .await;
        let bytes = res.as_ref().map_or(0, |b| {
            b.iter()
                .map(|(_, d)| d.as_ref().map_or(0, |d| d.len() as u64))
                .sum()
        });
        observe("peer_fetch_blocks", t, bytes, &res);
        self.node.cluster().stats.peer_served_bytes.add(bytes);
        let blocks = res.map_err(|e| status(&e))?;
        // The answer's bytes, held until the member has taken them (`conn.rs`). Taken once
        // the blocks are read: waiting for them before would hold a read that a home forwards
        // to the owner while the owner's Peer budget waits on this one's.
        let held = super::conn::hold(&extensions, bytes).await;
        let lie = lying();
        let msgs: Vec<pb::BlockData> = blocks
            .into_iter()
            .map(|(index, data)| match data {
                Some(mut d) => {
                    metrics::counter!(crate::telemetry::PEER_SERVED_BLOCKS).increment(1);
                    if lie && !d.is_empty() {
                        let mut v = d.to_vec();
                        v[0] ^= 0xFF;
                        d = bytes::Bytes::from(v);
                    }
                    pb::BlockData {
                        index,
                        data: d,
                        missing: false,
                        more: Vec::new(),
                    }
                }
                None => pb::BlockData {
                    index,
                    data: bytes::Bytes::new(),
                    missing: true,
                    more: Vec::new(),
                },
            })
            .collect();
        let msgs = if r.packed { pack(msgs) } else { msgs };
        Ok(super::conn::attach(
            Response::new(Box::pin(futures::stream::iter(msgs.into_iter().map(Ok)))),
            held,
        ))
    }
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
        speaks_for(&request, &request.get_ref().from_node)?;
        let (_, extensions, r) = request.into_parts();
        let res = self
            .node
            .read_local(
                &r.disk,
                r.offset,
                r.length,
                &r.from_node,
                crate::ids::Version::new(r.generation, r.epoch),
            )
            .await;
        observe("peer_read", t, r.length, &res);
        if res.is_ok() {
            self.node.cluster().stats.peer_served_bytes.add(r.length);
        }
        // The version after the read: a detection that came first is in it.
        let disks_version = self.node.cluster().disks_version();
        let data = res.map_err(|e| status(&e))?;
        // Held once read, as FetchBlocks' answers.
        let held = super::conn::hold(&extensions, data.len() as u64).await;
        Ok(super::conn::attach(
            Response::new(pb::ReadResponse {
                data,
                disks_version,
            }),
            held,
        ))
    }

    async fn write(
        &self,
        request: Request<pb::PeerWriteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let t = Instant::now();
        speaks_for(&request, &request.get_ref().from_node)?;
        let r = request.into_inner();
        let len = r.data.len() as u64;
        // The deadline is read against this host's clock once, here: below it is a point on
        // the node's own clock.
        let within = (r.deadline_unix_ms != 0).then(|| {
            Duration::from_millis(
                r.deadline_unix_ms
                    .saturating_sub(crate::cluster::gossip_auth::now_ms()),
            )
        });
        let res = self
            .node
            .write_local(&r.disk, r.offset, r.data, within)
            .await;
        observe("peer_write", t, len, &res);
        res.map(|()| {
            Response::new(pb::WriteResponse {
                host_boot: self.node.host_boot(),
            })
        })
        .map_err(|e| status(&e))
    }

    type SubscribeBlockMapStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::BlockMapUpdate, Status>> + Send + 'static>,
    >;

    async fn subscribe_block_map(
        &self,
        request: Request<pb::BlockMapRequest>,
    ) -> Result<Response<Self::SubscribeBlockMapStream>, Status> {
        let t = Instant::now();
        speaks_for(&request, &request.get_ref().from_node)?;
        let r = request.into_inner();
        let res = self.node.block_map_stream(
            &r.disk,
            crate::ids::Version::new(r.generation, r.epoch),
            &r.from_node,
        );
        observe("peer_subscribe_block_map", t, 0, &res);
        res.map(|rx| {
            use futures::StreamExt;
            let updates = tokio_stream::wrappers::ReceiverStream::new(rx).map(|u| {
                Ok(pb::BlockMapUpdate {
                    generation: u.generation,
                    reset: u.reset,
                    bits: u.bits,
                    removed: u.removed,
                })
            });
            Response::new(Box::pin(updates) as Self::SubscribeBlockMapStream)
        })
        .map_err(|e| status(&e))
    }

    async fn lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let t = Instant::now();
        speaks_for(&request, &request.get_ref().from_node)?;
        let r = request.into_inner();
        let res = self.node.grant_lease(
            &r.disk,
            crate::ids::Version::new(r.generation, r.epoch),
            (&r.from_node, r.from_boot),
        );
        observe("peer_lease", t, 0, &res);
        res.map(|term| {
            Response::new(pb::LeaseResponse {
                term_ms: term.as_millis() as u64,
            })
        })
        .map_err(|e| status(&e))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let t = Instant::now();
        speaks_for(&request, &request.get_ref().from_node)?;
        let r = request.into_inner();
        let res = self
            .node
            .revoke_held(&r.disk, r.generation, &r.from_node, r.to_boot);
        observe("peer_revoke", t, 0, &res);
        res.map(|()| Response::new(pb::RevokeResponse {}))
            .map_err(|e| status(&e))
    }

    async fn hello(
        &self,
        request: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloResponse>, Status> {
        speaks_for(&request, &request.get_ref().from_node)?;
        let r = request.into_inner();
        let h = self.node.hello(&r.from_node, r.from_boot);
        let (same_id_addr, same_id_boot) = h
            .same_id
            .map_or((String::new(), 0), |(a, b)| (a.to_string(), b));
        Ok(Response::new(pb::HelloResponse {
            node: h.node,
            boot: h.boot,
            same_id_addr,
            same_id_boot,
        }))
    }

    async fn flush(
        &self,
        request: Request<pb::PeerFlushRequest>,
    ) -> Result<Response<pb::FlushResponse>, Status> {
        let t = Instant::now();
        speaks_for(&request, &request.get_ref().from_node)?;
        let r = request.into_inner();
        let res = self.node.flush_local(&r.disk).await;
        observe("peer_flush", t, 0, &res);
        res.map(|()| {
            Response::new(pb::FlushResponse {
                host_boot: self.node.host_boot(),
            })
        })
        .map_err(|e| status(&e))
    }
}

/// Most block bytes packed in one `FetchBlocks` message (well under the 16 MiB message limit).
const PACKED_MESSAGE_BYTES: usize = 4 << 20;

/// `blocks` as few messages: each the first of a run of blocks with the rest of the run in
/// `more`, a run holding at most [`PACKED_MESSAGE_BYTES`] of block bytes.
fn pack(blocks: Vec<pb::BlockData>) -> Vec<pb::BlockData> {
    let mut out: Vec<pb::BlockData> = Vec::new();
    let mut bytes = 0;
    for b in blocks {
        match out.last_mut() {
            Some(head) if bytes + b.data.len() <= PACKED_MESSAGE_BYTES => {
                bytes += b.data.len();
                head.more.push(b);
            }
            _ => {
                bytes = b.data.len();
                out.push(b);
            }
        }
    }
    out
}

/// HTTP/2 streams a member's connection may have open at once.
pub const PEER_STREAMS: u32 = 1024;
/// Requests of one member connection handled at once (the rest wait their turn).
pub const PEER_REQUESTS: usize = 64;

/// Serves the Peer service on the node's `peer_listen` address until `stopped` turns true.
pub async fn serve_peer(
    node: Arc<Node>,
    listener: TcpListener,
    tls: Option<super::tls::PeerTls>,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let max = pb::MAX_MESSAGE_BYTES;
    let key = match &node.config().cluster.secret_file {
        Some(p) => Some(
            crate::cluster::gossip_auth::ClusterKey::from_file(p)
                .map_err(|e| anyhow::anyhow!("cluster.secret_file: {e}"))?,
        ),
        None => None,
    };
    let require_roles = (node.config().cluster.tls.as_ref()).is_some_and(|t| t.require_roles);
    let incoming = super::conn::Limits::peers().incoming(listener);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        builder = builder
            .tls_config(tls.server.clone())
            .context("peer tls configuration")?;
    }
    builder
        .layer(super::conn::AnswersLayer)
        .http2_keepalive_interval(Some(super::conn::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(super::conn::KEEPALIVE_TIMEOUT))
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .max_frame_size(Some(super::peer_client::MAX_FRAME_BYTES))
        // Block map subscriptions are long streams (one per shadowed disk): many streams, but
        // few requests handled at once per connection, which bounds the request bytes held.
        .max_concurrent_streams(Some(PEER_STREAMS))
        .concurrency_limit_per_connection(PEER_REQUESTS)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            pb::peer_server::PeerServer::new(PeerFrontend::new(node))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            super::peer_auth::CheckCalls::new(key.as_ref(), require_roles),
        ))
        .serve_with_incoming_shutdown(incoming, super::grpc::until_stopped(stopped))
        .await
        .context("peer grpc server")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(index: u64, len: usize) -> pb::BlockData {
        pb::BlockData {
            index,
            data: bytes::Bytes::from(vec![index as u8; len]),
            missing: len == 0,
            more: Vec::new(),
        }
    }

    #[test]
    fn packed_answers_keep_every_block_in_order_within_the_message_budget() {
        // 64 blocks of 1 MiB (the largest block size) and some missing ones.
        let blocks: Vec<pb::BlockData> = (0..70)
            .map(|i| block(i, if i % 10 == 9 { 0 } else { 1 << 20 }))
            .collect();
        let msgs = pack(blocks.clone());
        assert!(msgs.len() > 1 && msgs.len() < blocks.len());
        let mut flat = Vec::new();
        for m in msgs {
            let bytes: usize = m.data.len() + m.more.iter().map(|b| b.data.len()).sum::<usize>();
            assert!(
                bytes <= PACKED_MESSAGE_BYTES,
                "{bytes} bytes in one message"
            );
            assert!(m.more.iter().all(|b| b.more.is_empty()));
            let mut m = m;
            let more = std::mem::take(&mut m.more);
            flat.push(m);
            flat.extend(more);
        }
        assert_eq!(flat, blocks);
        // 16 KiB blocks: one message for the 64 of a request.
        let small: Vec<pb::BlockData> = (0..64).map(|i| block(i, 16 << 10)).collect();
        assert_eq!(pack(small).len(), 1);
        assert!(pack(Vec::new()).is_empty());
    }
}

//! The gRPC client of other members' Peer services: [`PeerService`] over tonic, explicit
//! message limits, HTTP/2 windows and frame sizes, and mutual TLS when configured. Each member
//! gets [`BULK_CONNECTIONS`] lazily connected channels: control calls (leases, revocations,
//! writes, block maps) use the first; block bytes (reads, fetches, content maps) take turns
//! over all of them, so one HTTP/2 connection's single task does not cap a member's transfer
//! rate on a many-core host. Deadlines are the caller's (`cluster::peers::Peers`).
//!
//! Architecture invariant: transport only: no retries, no deadlines (the caller's), no decision
//! about what an answer means.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::hashing::DashMap;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use shadowcache_proto as pb;
use tonic::transport::{Channel, Endpoint};

use super::grpc::info_from_pb;
use crate::admin::DiskInfo;
use crate::cache::Fingerprint;
use crate::cluster::blockmap::Update;
use crate::cluster::peers::{BlockMapStream, FetchedBlocks, Hello, MapChunk, PeerService, To};
use crate::disk::BlockRef;
use crate::error::{Error, Result};
use crate::ids::{Epoch, Generation, Version};

/// Why a call to a member failed, as a node error: the member's own answer keeps its kind and
/// message; anything else means the member could not serve it (UNAVAILABLE).
fn peer_error(node: &str, disk: &str, s: tonic::Status) -> Error {
    super::status::from_status(node, disk, &s)
}

/// HTTP/2 connections to each member; block bytes are spread over them.
pub const BULK_CONNECTIONS: usize = 4;
/// Largest HTTP/2 frame this node accepts (the protocol's default is 16 KiB, less than one
/// default block with its message header, which split every block into two frames).
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

type Client = pb::peer_client::PeerClient<
    tonic::service::interceptor::InterceptedService<Channel, super::peer_auth::SignCalls>,
>;

/// Channels to the other members.
#[derive(Debug)]
pub struct TonicPeers {
    me: String,
    connect_timeout: Duration,
    channels: DashMap<String, (SocketAddr, Arc<[Client]>)>,
    turn: AtomicUsize,
    tls: Option<super::tls::PeerClientTls>,
    sign: super::peer_auth::SignCalls,
}

impl TonicPeers {
    /// Clients on behalf of node `me`; with `tls`, every call is made over mutual TLS; with
    /// `key`, every call is signed under the cluster key.
    pub fn new(
        me: &str,
        connect_timeout: Duration,
        tls: Option<super::tls::PeerClientTls>,
        key: Option<&crate::cluster::gossip_auth::ClusterKey>,
    ) -> Self {
        TonicPeers {
            me: me.to_string(),
            connect_timeout,
            channels: crate::hashing::dash_map(),
            turn: AtomicUsize::new(0),
            tls,
            sign: super::peer_auth::SignCalls::new(key),
        }
    }

    /// The control client for `node` at `addr`.
    fn client(&self, to: To<'_>) -> Result<Client> {
        Ok(self.clients(to)?[0].clone())
    }

    /// A client for block bytes: the member's connections in turn.
    fn bulk(&self, to: To<'_>) -> Result<Client> {
        let all = self.clients(to)?;
        Ok(all[self.turn.fetch_add(1, Ordering::Relaxed) % all.len()].clone())
    }

    /// The clients for `node` at `addr` (new channels if the address changed).
    fn clients(&self, to: To<'_>) -> Result<Arc<[Client]>> {
        if let Some(c) = self.channels.get(to.node)
            && c.0 == to.addr
        {
            return Ok(c.1.clone());
        }
        let clients = self.connect(to, BULK_CONNECTIONS)?;
        self.channels
            .insert(to.node.to_string(), (to.addr, clients.clone()));
        Ok(clients)
    }

    /// `n` new lazily connected channels to `to`.
    fn connect(&self, to: To<'_>, n: usize) -> Result<Arc<[Client]>> {
        let endpoint =
            Endpoint::from_shared(format!("http://{}", to.addr)).map_err(|e| Error::Peer {
                node: to.node.to_string(),
                cause: e.to_string(),
            })?;
        // Over TLS, the connection is made here: the server's certificate must be the called
        // member's (`tls.rs`), which tonic's TLS settings cannot say.
        let tls = match &self.tls {
            Some(tls) => Some((
                tls.connector_for(to.node).map_err(|e| Error::Peer {
                    node: to.node.to_string(),
                    cause: format!("tls: {e:#}"),
                })?,
                tls.server_name(),
            )),
            None => None,
        };
        let endpoint = endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .max_frame_size(MAX_FRAME_BYTES)
            // A peer that vanishes without a FIN (a cut link) is noticed by keepalive, not
            // by the next call's deadline alone.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(self.connect_timeout.min(Duration::from_secs(10)))
            .keep_alive_while_idle(true);
        let (addr, timeout) = (to.addr, self.connect_timeout);
        Ok((0..n)
            .map(|_| {
                let channel = match &tls {
                    None => endpoint.connect_lazy(),
                    Some((connector, name)) => {
                        let (connector, name) = (connector.clone(), name.clone());
                        endpoint.connect_with_connector_lazy(tower::service_fn(
                            move |_: tonic::transport::Uri| {
                                let (connector, name) = (connector.clone(), name.clone());
                                async move {
                                    let timed_out = |what: &str| {
                                        std::io::Error::new(
                                            std::io::ErrorKind::TimedOut,
                                            format!("{what} to {addr} timed out"),
                                        )
                                    };
                                    let tcp = tokio::time::timeout(
                                        timeout,
                                        tokio::net::TcpStream::connect(addr),
                                    )
                                    .await
                                    .map_err(|_| timed_out("connect"))??;
                                    let _ = tcp.set_nodelay(true);
                                    let tls =
                                        tokio::time::timeout(timeout, connector.connect(name, tcp))
                                            .await
                                            .map_err(|_| timed_out("TLS handshake"))??;
                                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                                }
                            },
                        ))
                    }
                };
                pb::peer_client::PeerClient::with_interceptor(channel, self.sign.clone())
                    .max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(pb::MAX_MESSAGE_BYTES)
            })
            .collect())
    }
}

impl PeerService for TonicPeers {
    fn owned_disks<'a>(&'a self, to: To<'a>) -> BoxFuture<'a, Result<(Vec<DiskInfo>, u64)>> {
        Box::pin(async move {
            let r = self
                .client(to)?
                .owned_disks(pb::OwnedDisksRequest {})
                .await
                .map_err(|s| peer_error(to.node, "", s))?
                .into_inner();
            Ok((
                r.disks.into_iter().map(info_from_pb).collect(),
                r.disks_version,
            ))
        })
    }

    fn lease<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        Version {
            generation: Generation(generation),
            epoch: Epoch(epoch),
        }: Version,
        boot: u64,
    ) -> BoxFuture<'a, Result<Duration>> {
        Box::pin(async move {
            self.client(to)?
                .lease(pb::LeaseRequest {
                    disk: disk.to_string(),
                    generation,
                    epoch,
                    from_node: self.me.clone(),
                    from_boot: boot,
                })
                .await
                .map(|r| Duration::from_millis(r.into_inner().term_ms))
                .map_err(|s| peer_error(to.node, disk, s))
        })
    }

    fn revoke<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        generation: u64,
        boot: u64,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.client(to)?
                .revoke(pb::RevokeRequest {
                    disk: disk.to_string(),
                    generation,
                    from_node: self.me.clone(),
                    to_boot: boot,
                })
                .await
                .map(|_| ())
                .map_err(|s| peer_error(to.node, disk, s))
        })
    }

    fn hello<'a>(&'a self, to: To<'a>, boot: u64) -> BoxFuture<'a, Result<Hello>> {
        Box::pin(async move {
            // Asked of seeds before this node joins: a channel of its own, not kept.
            let r = self.connect(to, 1)?[0]
                .clone()
                .hello(pb::HelloRequest {
                    from_node: self.me.clone(),
                    from_boot: boot,
                })
                .await
                .map_err(|s| peer_error(&to.addr.to_string(), "", s))?
                .into_inner();
            let same_id = if r.same_id_addr.is_empty() {
                None
            } else {
                let addr = r.same_id_addr.parse().map_err(|_| Error::Peer {
                    node: r.node.clone(),
                    cause: format!("bad address {:?} in its Hello", r.same_id_addr),
                })?;
                Some((addr, r.same_id_boot))
            };
            Ok(Hello {
                node: r.node,
                boot: r.boot,
                same_id,
            })
        })
    }

    fn read<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        offset: u64,
        length: u64,
        Version {
            generation: Generation(generation),
            epoch: Epoch(epoch),
        }: Version,
    ) -> BoxFuture<'a, Result<(Bytes, u64)>> {
        Box::pin(async move {
            self.bulk(to)?
                .read(pb::PeerReadRequest {
                    disk: disk.to_string(),
                    offset,
                    length,
                    from_node: self.me.clone(),
                    generation,
                    epoch,
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (r.data, r.disks_version)
                })
                .map_err(|s| peer_error(to.node, disk, s))
        })
    }

    fn write<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        offset: u64,
        data: Bytes,
        within: Duration,
    ) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let deadline_unix_ms = crate::cluster::gossip_auth::now_ms()
                .saturating_add(within.as_millis() as u64)
                .max(1);
            self.client(to)?
                .write(pb::PeerWriteRequest {
                    disk: disk.to_string(),
                    offset,
                    data,
                    from_node: self.me.clone(),
                    deadline_unix_ms,
                })
                .await
                .map(|r| r.into_inner().host_boot)
                .map_err(|s| peer_error(to.node, disk, s))
        })
    }

    fn flush<'a>(&'a self, to: To<'a>, disk: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            self.client(to)?
                .flush(pb::PeerFlushRequest {
                    disk: disk.to_string(),
                    from_node: self.me.clone(),
                })
                .await
                .map(|r| r.into_inner().host_boot)
                .map_err(|s| peer_error(to.node, disk, s))
        })
    }

    fn content_map<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        Version {
            generation: Generation(generation),
            epoch: Epoch(epoch),
        }: Version,
        first: u64,
        count: u32,
    ) -> BoxFuture<'a, Result<MapChunk>> {
        Box::pin(async move {
            let r = self
                .bulk(to)?
                .content_map(pb::ContentMapRequest {
                    disk: disk.to_string(),
                    generation,
                    first_block: first,
                    count,
                    epoch,
                })
                .await
                .map_err(|s| peer_error(to.node, disk, s))?
                .into_inner();
            metrics::counter!(crate::telemetry::OWNER_MAP_BYTES)
                .increment(prost::Message::encoded_len(&r) as u64);
            Ok(MapChunk {
                generation: r.generation,
                block_bytes: u64::from(r.block_size),
                entries: r
                    .entries
                    .into_iter()
                    .filter_map(|e| {
                        if e.zero {
                            return Some((e.index, BlockRef::Zero));
                        }
                        let fp: [u8; 32] = e.fingerprint[..].try_into().ok()?;
                        Some((e.index, BlockRef::Data(Fingerprint(fp))))
                    })
                    .collect(),
            })
        })
    }

    fn fetch_blocks<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        Version {
            generation: Generation(generation),
            epoch: Epoch(epoch),
        }: Version,
        indices: &'a [u64],
        cached_only: bool,
    ) -> BoxFuture<'a, Result<FetchedBlocks>> {
        Box::pin(async move {
            let mut stream = self
                .bulk(to)?
                .fetch_blocks(pb::FetchBlocksRequest {
                    disk: disk.to_string(),
                    generation,
                    indices: indices.to_vec(),
                    from_node: self.me.clone(),
                    epoch,
                    cached_only,
                    packed: true,
                })
                .await
                .map_err(|s| peer_error(to.node, disk, s))?
                .into_inner();
            let mut out = Vec::with_capacity(indices.len());
            while let Some(msg) = stream.next().await {
                let mut b = msg.map_err(|s| peer_error(to.node, disk, s))?;
                let more = std::mem::take(&mut b.more);
                for b in std::iter::once(b).chain(more) {
                    // A block packed inside a packed block is not an answer: dropped.
                    out.push((b.index, (!b.missing).then_some(b.data)));
                }
                if out.len() > indices.len() {
                    return Err(Error::Peer {
                        node: to.node.to_string(),
                        cause: "sent more blocks than asked for".into(),
                    });
                }
            }
            Ok(out)
        })
    }

    fn subscribe_block_map<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        Version {
            generation: Generation(generation),
            epoch: Epoch(epoch),
        }: Version,
    ) -> BoxFuture<'a, Result<BlockMapStream>> {
        Box::pin(async move {
            let stream = self
                .client(to)?
                .subscribe_block_map(pb::BlockMapRequest {
                    disk: disk.to_string(),
                    generation,
                    epoch,
                    from_node: self.me.clone(),
                })
                .await
                .map_err(|s| peer_error(to.node, disk, s))?
                .into_inner();
            let (node, disk) = (to.node.to_string(), disk.to_string());
            let updates = stream.map(move |m| {
                m.map(|u| Update {
                    generation: u.generation,
                    reset: u.reset,
                    bits: u.bits,
                    removed: u.removed,
                })
                .map_err(|s| peer_error(&node, &disk, s))
            });
            Ok(Box::pin(updates) as BlockMapStream)
        })
    }

    fn forget(&self, node: &str) {
        self.channels.remove(node);
    }
}

//! Clients of other members' Peer services: one lazily connected channel per member, every
//! call with a deadline and explicit message limits.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use shadowcache_proto as pb;
use tonic::transport::{Channel, Endpoint};

use crate::cache::Fingerprint;
use crate::disk::BlockRef;
use crate::error::{Error, Result};

/// Why a call to a peer failed, as a node error: the owner's own answer keeps its kind (an
/// unknown or sealed disk); anything else means the owner could not serve it (UNAVAILABLE).
fn peer_error(node: &str, disk: &str, s: tonic::Status) -> Error {
    use tonic::Code;
    match s.code() {
        Code::NotFound => Error::UnknownDisk(disk.to_string()),
        Code::FailedPrecondition => Error::Sealed(disk.to_string()),
        _ => Error::Peer {
            node: node.to_string(),
            cause: format!("{:?}: {}", s.code(), s.message()),
        },
    }
}

/// Channels to the other members.
#[derive(Debug)]
pub struct Peers {
    me: String,
    timeout: Duration,
    channels: DashMap<String, (SocketAddr, pb::peer_client::PeerClient<Channel>)>,
}

impl Peers {
    /// Clients on behalf of node `me`, with `timeout` on every call.
    pub fn new(me: &str, timeout: Duration) -> Self {
        Peers {
            me: me.to_string(),
            timeout,
            channels: DashMap::new(),
        }
    }

    /// The client for `node` at `addr` (a new channel if the address changed).
    fn client(&self, node: &str, addr: SocketAddr) -> Result<pb::peer_client::PeerClient<Channel>> {
        if let Some(c) = self.channels.get(node)
            && c.0 == addr
        {
            return Ok(c.1.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Peer {
                node: node.to_string(),
                cause: e.to_string(),
            })?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20));
        let client = pb::peer_client::PeerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(pb::MAX_MESSAGE_BYTES);
        self.channels
            .insert(node.to_string(), (addr, client.clone()));
        Ok(client)
    }

    /// Forgets a member's channel (it left the cluster).
    pub fn forget(&self, node: &str) {
        self.channels.remove(node);
    }

    /// The disks `node` owns.
    pub async fn owned_disks(
        &self,
        node: &str,
        addr: SocketAddr,
    ) -> Result<pb::OwnedDisksResponse> {
        let mut c = self.client(node, addr)?;
        c.owned_disks(pb::OwnedDisksRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| peer_error(node, "", s))
    }

    /// Reads through the owner.
    pub async fn read(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        offset: u64,
        length: u64,
    ) -> Result<Bytes> {
        let mut c = self.client(node, addr)?;
        c.read(pb::PeerReadRequest {
            disk: disk.to_string(),
            offset,
            length,
            from_node: self.me.clone(),
        })
        .await
        .map(|r| r.into_inner().data)
        .map_err(|s| peer_error(node, disk, s))
    }

    /// Writes through the owner.
    pub async fn write(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<()> {
        let mut c = self.client(node, addr)?;
        c.write(pb::PeerWriteRequest {
            disk: disk.to_string(),
            offset,
            data,
            from_node: self.me.clone(),
        })
        .await
        .map(|_| ())
        .map_err(|s| peer_error(node, disk, s))
    }

    /// Entries of the owner's content map of `disk` in [first, first + count); refused (as an
    /// error) when the owner's block size differs from `block_bytes`.
    #[allow(clippy::too_many_arguments)]
    pub async fn content_map(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        generation: u64,
        first: u64,
        count: u32,
        block_bytes: u64,
    ) -> Result<Vec<(u64, BlockRef)>> {
        let mut c = self.client(node, addr)?;
        let r = c
            .content_map(pb::ContentMapRequest {
                disk: disk.to_string(),
                generation,
                first_block: first,
                count,
            })
            .await
            .map_err(|s| peer_error(node, disk, s))?
            .into_inner();
        if u64::from(r.block_size) != block_bytes || r.generation != generation {
            return Err(Error::Peer {
                node: node.to_string(),
                cause: format!(
                    "content map of {disk:?} is for block size {} generation {}, not {block_bytes} and {generation}",
                    r.block_size, r.generation
                ),
            });
        }
        Ok(r.entries
            .into_iter()
            .filter_map(|e| {
                if e.zero {
                    return Some((e.index, BlockRef::Zero));
                }
                let fp: [u8; 32] = e.fingerprint[..].try_into().ok()?;
                Some((e.index, BlockRef::Data(Fingerprint(fp))))
            })
            .collect())
    }

    /// Blocks of `disk` from `node`: (index, bytes) for each block it sent, bytes `None` where
    /// it had none. Nothing here is verified: the caller checks every block.
    pub async fn fetch_blocks(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        generation: u64,
        indices: &[u64],
    ) -> Result<Vec<(u64, Option<Bytes>)>> {
        use futures::StreamExt;
        let mut c = self.client(node, addr)?;
        let mut stream = c
            .fetch_blocks(pb::FetchBlocksRequest {
                disk: disk.to_string(),
                generation,
                indices: indices.to_vec(),
                from_node: self.me.clone(),
            })
            .await
            .map_err(|s| peer_error(node, disk, s))?
            .into_inner();
        let mut out = Vec::with_capacity(indices.len());
        while let Some(msg) = stream.next().await {
            let b = msg.map_err(|s| peer_error(node, disk, s))?;
            out.push((b.index, (!b.missing).then_some(b.data)));
            if out.len() > indices.len() {
                return Err(Error::Peer {
                    node: node.to_string(),
                    cause: "sent more blocks than asked for".into(),
                });
            }
        }
        Ok(out)
    }

    /// Flushes through the owner.
    pub async fn flush(&self, node: &str, addr: SocketAddr, disk: &str) -> Result<()> {
        let mut c = self.client(node, addr)?;
        c.flush(pb::PeerFlushRequest {
            disk: disk.to_string(),
            from_node: self.me.clone(),
        })
        .await
        .map(|_| ())
        .map_err(|s| peer_error(node, disk, s))
    }
}

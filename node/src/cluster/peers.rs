//! Clients of other members' Peer services: one lazily connected channel per member, every
//! call with a deadline and explicit message limits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use shadowcache_proto as pb;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::cache::Fingerprint;
use crate::disk::BlockRef;
use crate::error::{Error, Result};

/// Why a call to a peer failed, as a node error: the member's own answer keeps its kind and
/// message; anything else means the member could not serve it (UNAVAILABLE).
fn peer_error(node: &str, disk: &str, s: tonic::Status) -> Error {
    crate::frontend::status::from_status(node, disk, &s)
}

/// Channels to the other members.
#[derive(Debug)]
pub struct Peers {
    me: String,
    timeout: Duration,
    write_timeout: Duration,
    channels: DashMap<String, (SocketAddr, pb::peer_client::PeerClient<Channel>)>,
    /// Block fetches in flight to each member (its load, for choosing among holders).
    inflight: DashMap<String, Arc<AtomicU64>>,
    tls: Option<ClientTlsConfig>,
}

/// Counts one fetch in flight to a member while it lives.
struct InFlight(Arc<AtomicU64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Peers {
    /// Clients on behalf of node `me`, with `timeout` on every call but writes, which get
    /// `write_timeout` (they may wait for a lease to run out at the owner).
    /// With `tls`, every call is made over mutual TLS.
    pub fn new(
        me: &str,
        timeout: Duration,
        write_timeout: Duration,
        tls: Option<ClientTlsConfig>,
    ) -> Self {
        Peers {
            me: me.to_string(),
            timeout,
            write_timeout,
            channels: DashMap::new(),
            inflight: DashMap::new(),
            tls,
        }
    }

    /// The client for `node` at `addr` (a new channel if the address changed).
    fn client(&self, node: &str, addr: SocketAddr) -> Result<pb::peer_client::PeerClient<Channel>> {
        if let Some(c) = self.channels.get(node)
            && c.0 == addr
        {
            return Ok(c.1.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint =
            Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| Error::Peer {
                node: node.to_string(),
                cause: e.to_string(),
            })?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| Error::Peer {
                node: node.to_string(),
                cause: format!("tls: {e}"),
            })?;
        }
        let endpoint = endpoint
            .connect_timeout(self.timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            // A peer that vanishes without a FIN (a cut link) is noticed by keepalive, not
            // by the next call's deadline alone.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(self.timeout.min(Duration::from_secs(10)))
            .keep_alive_while_idle(true);
        let client = pb::peer_client::PeerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(pb::MAX_MESSAGE_BYTES);
        self.channels
            .insert(node.to_string(), (addr, client.clone()));
        Ok(client)
    }

    /// Runs one call with the deadline (tonic's `timeout` covers the response headers only; a
    /// stream that stalls after them is cut here).
    async fn deadline<T>(
        &self,
        node: &str,
        disk: &str,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(Error::Peer {
                node: node.to_string(),
                cause: format!(
                    "no answer within {} ms{}",
                    self.timeout.as_millis(),
                    if disk.is_empty() {
                        String::new()
                    } else {
                        format!(" (disk {disk:?})")
                    }
                ),
            }),
        }
    }

    /// Forgets a member's channel (it left the cluster).
    pub fn forget(&self, node: &str) {
        self.channels.remove(node);
        self.inflight.remove(node);
    }

    /// Block fetches in flight to `node` now.
    pub fn load(&self, node: &str) -> u64 {
        self.inflight
            .get(node)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Subscribes to `node`'s block map of (disk, generation, epoch). No deadline: the stream
    /// lives as long as the map does (HTTP/2 keepalive notices a dead peer).
    pub async fn subscribe_block_map(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        generation: u64,
        epoch: u64,
    ) -> Result<tonic::Streaming<pb::BlockMapUpdate>> {
        let mut c = self.client(node, addr)?;
        self.deadline(node, disk, async {
            c.subscribe_block_map(pb::BlockMapRequest {
                disk: disk.to_string(),
                generation,
                epoch,
                from_node: self.me.clone(),
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| peer_error(node, disk, s))
        })
        .await
    }

    /// The disks `node` owns.
    pub async fn owned_disks(
        &self,
        node: &str,
        addr: SocketAddr,
    ) -> Result<pb::OwnedDisksResponse> {
        let mut c = self.client(node, addr)?;
        self.deadline(node, "", async {
            c.owned_disks(pb::OwnedDisksRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| peer_error(node, "", s))
        })
        .await
    }

    /// Asks `node` (the owner) for a lease on (disk, generation, epoch): the term granted.
    pub async fn lease(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        generation: u64,
        epoch: u64,
    ) -> Result<Duration> {
        let mut c = self.client(node, addr)?;
        self.deadline(node, disk, async {
            c.lease(pb::LeaseRequest {
                disk: disk.to_string(),
                generation,
                epoch,
                from_node: self.me.clone(),
            })
            .await
            .map(|r| Duration::from_millis(r.into_inner().term_ms))
            .map_err(|s| peer_error(node, disk, s))
        })
        .await
    }

    /// Tells lease holder `node` to stop serving (disk, generation); Ok once it has.
    pub async fn revoke(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        generation: u64,
    ) -> Result<()> {
        let mut c = self.client(node, addr)?;
        self.deadline(node, disk, async {
            c.revoke(pb::RevokeRequest {
                disk: disk.to_string(),
                generation,
                from_node: self.me.clone(),
            })
            .await
            .map(|_| ())
            .map_err(|s| peer_error(node, disk, s))
        })
        .await
    }

    /// Reads through the owner; with a `generation` (not 0) the owner refuses unless the disk
    /// is at that generation and `epoch`.
    #[allow(clippy::too_many_arguments)]
    pub async fn read(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        offset: u64,
        length: u64,
        generation: u64,
        epoch: u64,
    ) -> Result<Bytes> {
        let mut c = self.client(node, addr)?;
        let data = self
            .deadline(node, disk, async {
                c.read(pb::PeerReadRequest {
                    disk: disk.to_string(),
                    offset,
                    length,
                    from_node: self.me.clone(),
                    generation,
                    epoch,
                })
                .await
                .map(|r| r.into_inner().data)
                .map_err(|s| peer_error(node, disk, s))
            })
            .await?;
        if data.len() as u64 != length {
            return Err(Error::Peer {
                node: node.to_string(),
                cause: format!(
                    "answered a read of {length} bytes of {disk:?} with {} bytes",
                    data.len()
                ),
            });
        }
        Ok(data)
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
        // A longer deadline: the owner may wait for a lease to run out before it applies it.
        let call = c.write(pb::PeerWriteRequest {
            disk: disk.to_string(),
            offset,
            data,
            from_node: self.me.clone(),
        });
        match tokio::time::timeout(self.write_timeout, call).await {
            Ok(r) => r.map(|_| ()).map_err(|s| peer_error(node, disk, s)),
            Err(_) => Err(Error::Peer {
                node: node.to_string(),
                cause: format!(
                    "write of {disk:?} not acknowledged within {} ms",
                    self.write_timeout.as_millis()
                ),
            }),
        }
    }

    /// Entries of the owner's content map of `disk` in [first, first + count); refused (as an
    /// error) when the owner's block size differs from `block_bytes`.
    #[allow(clippy::too_many_arguments)]
    pub async fn content_map(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        (generation, epoch): (u64, u64),
        first: u64,
        count: u32,
        block_bytes: u64,
    ) -> Result<Vec<(u64, BlockRef)>> {
        let mut c = self.client(node, addr)?;
        let r = self
            .deadline(node, disk, async {
                c.content_map(pb::ContentMapRequest {
                    disk: disk.to_string(),
                    generation,
                    first_block: first,
                    count,
                    epoch,
                })
                .await
                .map_err(|s| peer_error(node, disk, s))
            })
            .await?
            .into_inner();
        metrics::counter!(crate::telemetry::OWNER_MAP_BYTES)
            .increment(prost::Message::encoded_len(&r) as u64);
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
        (generation, epoch): (u64, u64),
        indices: &[u64],
        cached_only: bool,
    ) -> Result<Vec<(u64, Option<Bytes>)>> {
        use futures::StreamExt;
        let mut c = self.client(node, addr)?;
        let counter = self.inflight.entry(node.to_string()).or_default().clone();
        counter.fetch_add(1, Ordering::Relaxed);
        let _inflight = InFlight(counter);
        self.deadline(node, disk, async {
            let mut stream = c
                .fetch_blocks(pb::FetchBlocksRequest {
                    disk: disk.to_string(),
                    generation,
                    indices: indices.to_vec(),
                    from_node: self.me.clone(),
                    epoch,
                    cached_only,
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
        })
        .await
    }

    /// Flushes through the owner.
    pub async fn flush(&self, node: &str, addr: SocketAddr, disk: &str) -> Result<()> {
        let mut c = self.client(node, addr)?;
        self.deadline(node, disk, async {
            c.flush(pb::PeerFlushRequest {
                disk: disk.to_string(),
                from_node: self.me.clone(),
            })
            .await
            .map(|_| ())
            .map_err(|s| peer_error(node, disk, s))
        })
        .await
    }
}

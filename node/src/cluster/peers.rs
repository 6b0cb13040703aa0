//! Calls to other members' Peer services, behind [`PeerService`]: the gRPC client in
//! production (`frontend/peer_client.rs`), an in-process one in tests (`inprocess.rs`), so that
//! the lease, revocation and fetch logic runs unchanged over either.
//!
//! [`Peers`] wraps the service with what every transport needs the same way: a deadline on
//! every call, counted on the node's [`Clock`] (writes get a longer one: the owner may wait for
//! a lease to run out before it applies them); the count of block fetches in flight to each
//! member (its load, for choosing among holders); and the checks of what came back (a read of
//! the length asked, a content map of the block size and generation asked).
//!
//! Architecture invariant: no protocol type here; a member's answer is a node [`Error`] of the
//! kind it reported, or [`Error::Peer`] when it could not answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::hashing::DashMap;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use super::blockmap::Update;
use crate::clock::Clock;
use crate::disk::BlockRef;
use crate::disk::DiskInfo;
use crate::error::{Error, Result};
use crate::ids::{Epoch, Generation, Version};

/// Blocks a member sent: (index, bytes), `None` where it had none.
pub type FetchedBlocks = Vec<(u64, Option<Bytes>)>;

/// A member's block map, as it streams.
pub type BlockMapStream = BoxStream<'static, Result<Update>>;

/// One chunk of an owner's content map, as it answered.
#[derive(Debug, Clone, PartialEq)]
pub struct MapChunk {
    /// The generation it is of.
    pub generation: u64,
    /// The owner's block size.
    pub block_bytes: u64,
    /// (block index, what it holds).
    pub entries: Vec<(u64, BlockRef)>,
}

/// Who answered a [`PeerService::hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The answering node's id.
    pub node: String,
    /// Its incarnation.
    pub boot: u64,
    /// A live incarnation of the asker's id the member knows (other than the asker's): its
    /// Peer address and incarnation.
    pub same_id: Option<(SocketAddr, u64)>,
}

/// Where a call goes: a member and its Peer address.
#[derive(Debug, Clone, Copy)]
pub struct To<'a> {
    /// The member's node id.
    pub node: &'a str,
    /// Its Peer address.
    pub addr: SocketAddr,
}

/// The Peer service of other members, as this node calls it. Every method is one request;
/// deadlines are the caller's ([`Peers`]).
pub trait PeerService: Send + Sync + std::fmt::Debug {
    /// The disks `to` owns, and the registry version it advertises.
    fn owned_disks<'a>(&'a self, to: To<'a>) -> BoxFuture<'a, Result<(Vec<DiskInfo>, u64)>>;
    /// A lease (or its renewal) on (disk, generation, epoch) for this node's incarnation
    /// `boot`: the term granted.
    fn lease<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        version: Version,
        boot: u64,
    ) -> BoxFuture<'a, Result<Duration>>;
    /// Tells incarnation `boot` of a holder to stop serving (disk, generation); Ok once it has.
    /// Another incarnation with the holder's id refuses.
    fn revoke<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        generation: u64,
        boot: u64,
    ) -> BoxFuture<'a, Result<()>>;
    /// Who answers at `to`, and the live incarnation of this node's id it knows, other than
    /// `boot` (this process).
    fn hello<'a>(&'a self, to: To<'a>, boot: u64) -> BoxFuture<'a, Result<Hello>>;
    /// Reads at the owner; with a `generation` (not 0), only at that generation and `epoch`.
    /// With the bytes, the owner's disk registry version when it answered.
    fn read<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        offset: u64,
        length: u64,
        version: Version,
    ) -> BoxFuture<'a, Result<(Bytes, u64)>>;
    /// Writes at the owner, which refuses the write ([`crate::error::Error::Late`]) unless it
    /// takes its place in the disk's write order `within` this long of the call. With the
    /// owner's host boot ([`crate::ids::host_boot`]; 0: not known).
    fn write<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        offset: u64,
        data: Bytes,
        within: Duration,
    ) -> BoxFuture<'a, Result<u64>>;
    /// Flushes at the owner; with its host boot, as `write`.
    fn flush<'a>(&'a self, to: To<'a>, disk: &'a str) -> BoxFuture<'a, Result<u64>>;
    /// Entries of the owner's content map in [first, first + count).
    fn content_map<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        version: Version,
        first: u64,
        count: u32,
    ) -> BoxFuture<'a, Result<MapChunk>>;
    /// Blocks of `disk`: (index, bytes), `None` where the member had none. Unverified.
    fn fetch_blocks<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        version: Version,
        indices: &'a [u64],
        cached_only: bool,
    ) -> BoxFuture<'a, Result<FetchedBlocks>>;
    /// The member's block map of (disk, generation, epoch), as it changes.
    fn subscribe_block_map<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        version: Version,
    ) -> BoxFuture<'a, Result<BlockMapStream>>;
    /// Forgets what is kept for `node` (it left the cluster).
    fn forget(&self, node: &str);
}

/// Calls to other members with deadlines, load counts and checks (see the module doc).
#[derive(Debug)]
pub struct Peers {
    service: Arc<dyn PeerService>,
    clock: Arc<dyn Clock>,
    timeout: Duration,
    write_timeout: Duration,
    /// Block fetches in flight to each member (its load, for choosing among holders).
    inflight: DashMap<String, Arc<AtomicU64>>,
    /// Members that failed a block fetch (no answer in time, an error, bytes that did not
    /// verify), and until when (on `clock`) they are not asked for blocks.
    suspects: DashMap<String, Duration>,
    /// Writes owners acknowledged that no flush has covered yet.
    unflushed: Unflushed,
}

/// Writes forwarded to owners and acknowledged, that no flush has covered yet: per disk, by
/// which owner under which host boot, and the sequence number of the last. A flush covers
/// the writes acknowledged before it was sent by the same owner under the same host boot; any
/// other such write may have been lost with the page cache of a host that restarted (or
/// lives on at an owner the flush did not reach), and the flush says so instead of OK, once.
#[derive(Debug, Default)]
struct Unflushed {
    seq: AtomicU64,
    by_disk: parking_lot::Mutex<HashMap<String, Vec<Acked>>>,
}

/// Writes of one disk acknowledged by one owner under one host boot.
#[derive(Debug)]
struct Acked {
    node: String,
    host_boot: u64,
    last: u64,
}

impl Unflushed {
    /// `node`, under `host_boot`, acknowledged a write of `disk`.
    fn acked(&self, disk: &str, node: &str, host_boot: u64) {
        if host_boot == 0 {
            // An owner that does not say: nothing to compare.
            return;
        }
        let last = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let mut by_disk = self.by_disk.lock();
        let acked = by_disk.entry(disk.to_string()).or_default();
        match acked
            .iter_mut()
            .find(|a| a.node == node && a.host_boot == host_boot)
        {
            // Another ack may have taken a later number and got here first.
            Some(a) => a.last = a.last.max(last),
            None => acked.push(Acked {
                node: node.to_string(),
                host_boot,
                last,
            }),
        }
    }

    /// The mark of a flush about to be sent: it covers writes acknowledged up to here.
    fn mark(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// A flush sent at `mark` was done by `node` under `host_boot`: forgets the writes it
    /// covered, and returns one it could not have (acknowledged before it, by another owner or
    /// under another host boot), forgotten too.
    fn flushed(&self, disk: &str, node: &str, host_boot: u64, mark: u64) -> Option<(String, u64)> {
        let mut by_disk = self.by_disk.lock();
        let acked = by_disk.get_mut(disk)?;
        let mut lost = None;
        acked.retain(|a| {
            if a.last > mark {
                // Acknowledged while the flush was on its way: the next flush decides.
                return true;
            }
            // Another owner's writes were never covered; the same owner's, unless it does not
            // say its host boot.
            if a.node != node || (host_boot != 0 && a.host_boot != host_boot) {
                lost = Some((a.node.clone(), a.host_boot));
            }
            false
        });
        if acked.is_empty() {
            by_disk.remove(disk);
        }
        lost
    }
}

/// How long a member that failed a block fetch is not asked for blocks: each block it would
/// have been asked for goes to its next source, the owner at last. Without it a member that
/// takes the calls and never answers cost every cold read it claimed its timeout, once as a
/// holder and once as a home.
pub const SUSPECT_FOR: Duration = Duration::from_secs(30);

/// Counts one fetch in flight to a member while it lives.
struct InFlight(Arc<AtomicU64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Peers {
    /// Calls over `service`, with `timeout` on every call but writes, which get
    /// `write_timeout`, both counted on `clock`.
    pub fn new(
        service: Arc<dyn PeerService>,
        clock: Arc<dyn Clock>,
        timeout: Duration,
        write_timeout: Duration,
    ) -> Self {
        Peers {
            service,
            clock,
            timeout,
            write_timeout,
            inflight: crate::hashing::dash_map(),
            suspects: crate::hashing::dash_map(),
            unflushed: Unflushed::default(),
        }
    }

    /// `node` failed a block fetch: not asked for blocks for [`SUSPECT_FOR`].
    pub fn suspect(&self, node: &str) {
        let until = self.clock.now() + SUSPECT_FOR;
        if self.suspects.insert(node.to_string(), until).is_none() {
            tracing::info!(member = %node, seconds = SUSPECT_FOR.as_secs(), "a member failed a block fetch; its blocks come from other sources for a while");
        }
    }

    /// Whether `node` failed a block fetch in the last [`SUSPECT_FOR`].
    pub fn is_suspect(&self, node: &str) -> bool {
        if self.suspects.is_empty() {
            return false;
        }
        let now = self.clock.now();
        self.suspects.remove_if(node, |_, until| *until <= now);
        self.suspects.contains_key(node)
    }

    /// Runs one call with a deadline (a stream that stalls after its first answer is the
    /// caller's to bound).
    async fn deadline<T>(
        &self,
        node: &str,
        disk: &str,
        limit: Duration,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match crate::clock::timeout(&*self.clock, limit, call).await {
            Ok(r) => r,
            Err(_) => Err(Error::Peer {
                node: node.to_string(),
                cause: format!(
                    "no answer within {} ms{}",
                    limit.as_millis(),
                    if disk.is_empty() {
                        String::new()
                    } else {
                        format!(" (disk {disk:?})")
                    }
                ),
            }),
        }
    }

    /// Forgets a member (it left the cluster).
    pub fn forget(&self, node: &str) {
        self.service.forget(node);
        self.inflight.remove(node);
        self.suspects.remove(node);
    }

    /// Block fetches in flight to `node` now.
    pub fn load(&self, node: &str) -> u64 {
        self.inflight
            .get(node)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Subscribes to `node`'s block map of (disk, generation, epoch). The deadline covers the
    /// subscription; the stream lives as long as the map does.
    pub async fn subscribe_block_map(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        version: Version,
    ) -> Result<BlockMapStream> {
        let to = To { node, addr };
        self.deadline(
            node,
            disk,
            self.timeout,
            self.service.subscribe_block_map(to, disk, version),
        )
        .await
    }

    /// The disks `node` owns and its registry version.
    pub async fn owned_disks(&self, node: &str, addr: SocketAddr) -> Result<(Vec<DiskInfo>, u64)> {
        let to = To { node, addr };
        self.deadline(node, "", self.timeout, self.service.owned_disks(to))
            .await
    }

    /// Asks `node` (the owner) for a lease on (disk, generation, epoch) for this node's
    /// incarnation `boot`: the term granted.
    pub async fn lease(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        version: Version,
        boot: u64,
    ) -> Result<Duration> {
        let to = To { node, addr };
        self.deadline(
            node,
            disk,
            self.timeout,
            self.service.lease(to, disk, version, boot),
        )
        .await
    }

    /// Tells incarnation `boot` of lease holder `node` to stop serving (disk, generation); Ok
    /// once it has.
    pub async fn revoke(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        generation: u64,
        boot: u64,
    ) -> Result<()> {
        let to = To { node, addr };
        self.deadline(
            node,
            disk,
            self.timeout,
            self.service.revoke(to, disk, generation, boot),
        )
        .await
    }

    /// Who answers at `addr`, and the live incarnation of this node's id it knows other than
    /// `boot`.
    pub async fn hello(&self, addr: SocketAddr, boot: u64) -> Result<Hello> {
        let to = To { node: "", addr };
        self.deadline("", "", self.timeout, self.service.hello(to, boot))
            .await
    }

    /// Reads through the owner; with a generation (not 0) in `version` the owner refuses
    /// unless the disk is at that version. With the bytes, the owner's disk registry version
    /// when it answered (0 if it did not say).
    pub async fn read(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        (offset, length): (u64, u64),
        version: Version,
    ) -> Result<(Bytes, u64)> {
        let to = To { node, addr };
        let (data, disks_version) = self
            .deadline(
                node,
                disk,
                self.timeout,
                self.service.read(to, disk, offset, length, version),
            )
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
        Ok((data, disks_version))
    }

    /// Writes through the owner, with the longer deadline.
    pub async fn write(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<()> {
        let to = To { node, addr };
        match crate::clock::timeout(
            &*self.clock,
            self.write_timeout,
            // Half the wait for the owner to start it: the other half covers clocks that differ
            // and the trip back, so the owner never applies a write this node gave up on.
            self.service
                .write(to, disk, offset, data, self.write_timeout / 2),
        )
        .await
        {
            Ok(Ok(host_boot)) => {
                self.unflushed.acked(disk, node, host_boot);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
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
        Version {
            generation: Generation(generation),
            epoch: Epoch(epoch),
        }: Version,
        first: u64,
        count: u32,
        block_bytes: u64,
    ) -> Result<Vec<(u64, BlockRef)>> {
        let to = To { node, addr };
        let r = self
            .deadline(
                node,
                disk,
                self.timeout,
                self.service
                    .content_map(to, disk, Version::new(generation, epoch), first, count),
            )
            .await?;
        if r.block_bytes != block_bytes || r.generation != generation {
            return Err(Error::Peer {
                node: node.to_string(),
                cause: format!(
                    "content map of {disk:?} is for block size {} generation {}, not {block_bytes} and {generation}",
                    r.block_bytes, r.generation
                ),
            });
        }
        Ok(r.entries)
    }

    /// Blocks of `disk` from `node`: (index, bytes) for each block it sent, bytes `None` where
    /// it had none. Nothing here is verified: the caller checks every block.
    pub async fn fetch_blocks(
        &self,
        node: &str,
        addr: SocketAddr,
        disk: &str,
        version: Version,
        indices: &[u64],
        cached_only: bool,
    ) -> Result<Vec<(u64, Option<Bytes>)>> {
        let to = To { node, addr };
        let counter = self.inflight.entry(node.to_string()).or_default().clone();
        counter.fetch_add(1, Ordering::Relaxed);
        let _inflight = InFlight(counter);
        let got = self
            .deadline(
                node,
                disk,
                self.timeout,
                self.service
                    .fetch_blocks(to, disk, version, indices, cached_only),
            )
            .await?;
        if got.len() > indices.len() {
            return Err(Error::Peer {
                node: node.to_string(),
                cause: "sent more blocks than asked for".into(),
            });
        }
        Ok(got)
    }

    /// Flushes through the owner. An error when a write acknowledged before it, by another
    /// owner or under another host boot of this one, cannot have been covered (reported once).
    pub async fn flush(&self, node: &str, addr: SocketAddr, disk: &str) -> Result<()> {
        let to = To { node, addr };
        let mark = self.unflushed.mark();
        let host_boot = self
            .deadline(node, disk, self.timeout, self.service.flush(to, disk))
            .await?;
        match self.unflushed.flushed(disk, node, host_boot, mark) {
            None => Ok(()),
            Some((by, boot)) => {
                metrics::counter!(crate::telemetry::UNFLUSHED_LOST).increment(1);
                let why = if by == node {
                    format!(
                        "the host of owner {node} restarted (boot {boot:016x}, now {host_boot:016x}) after acknowledging writes of {disk:?} that no flush had covered; they may be lost"
                    )
                } else {
                    format!(
                        "writes of {disk:?} acknowledged by {by}, its owner then, were not covered by this flush at {node}; they may be lost"
                    )
                };
                tracing::error!(disk, owner = node, "{why}");
                Err(Error::LostWrites(why))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_covers_what_its_owner_acknowledged_before_it_under_its_host_boot() {
        let u = Unflushed::default();
        // Same owner, same host boot: covered.
        u.acked("d", "a", 7);
        let m = u.mark();
        assert_eq!(u.flushed("d", "a", 7, m), None);
        // Another host boot: reported once, then forgotten.
        u.acked("d", "a", 7);
        let m = u.mark();
        assert_eq!(u.flushed("d", "a", 8, m), Some(("a".into(), 7)));
        assert_eq!(u.flushed("d", "a", 8, u.mark()), None);
        // Another owner (the disk moved): its writes were not flushed here.
        u.acked("d", "a", 8);
        assert_eq!(u.flushed("d", "b", 3, u.mark()), Some(("a".into(), 8)));
        // A write acknowledged while the flush was on its way waits for the next flush, which
        // covers it under its own host boot; other disks are not touched.
        let m = u.mark();
        u.acked("d", "a", 9);
        u.acked("e", "a", 1);
        assert_eq!(u.flushed("d", "a", 10, m), None);
        assert_eq!(u.flushed("d", "a", 9, u.mark()), None);
        assert_eq!(u.flushed("e", "a", 2, u.mark()), Some(("a".into(), 1)));
        // An owner that does not say (0) is not compared with itself; another owner's writes
        // are still not its own.
        u.acked("d", "a", 0);
        u.acked("d", "a", 5);
        assert_eq!(u.flushed("d", "a", 0, u.mark()), None);
        u.acked("d", "b", 5);
        assert_eq!(u.flushed("d", "a", 0, u.mark()), Some(("b".into(), 5)));
        assert!(u.by_disk.lock().is_empty(), "nothing left once flushed");
    }
}

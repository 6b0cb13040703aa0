//! A sealed or detected disk owned by another member, seen as an origin of blocks for this
//! node's cache.
//!
//! A node caches such a disk by serving it through its own read path over this origin. A block
//! this node misses is asked first of members whose block map shows it (see
//! [`crate::cluster::blockmap`]): the less loaded of two picked at random, then the others, at
//! most [`MAX_HOLDERS_TRIED`], each answering from its cache only. Then it is fetched from the
//! block's *home*: the member chosen by rendezvous hashing
//! of (disk, block) over the live members other than the owner. The home fetches the block from
//! the owner once (its own single flight), keeps it, and answers every member that asks, so in a
//! boot storm each block leaves the owner about once. Bytes from a home are verified against the
//! owner's fingerprint (fetched from the owner's content map, the only trusted source); a home
//! that fails, lacks the block or sends bytes that do not verify is counted and skipped, and the
//! block is read from the owner instead. A block this node is itself the home of, and every read
//! made while serving another member (`serving_peer`), goes to the owner directly, so a request
//! never travels more than two hops.
//!
//! Architecture invariant: no byte from a non-owner reaches the cache unless it hashes to the
//! owner's fingerprint for that block at this disk's generation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::watch;

use super::{Origin, OriginError, OriginFuture, Source};
use crate::cache::fingerprint::is_zero;
use crate::cluster::blockmap::RemoteMaps;
use crate::cluster::{Member, Peers};

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
use crate::disk::BlockRef;
use crate::telemetry;

/// Blocks per content-map chunk asked of the owner.
pub const MAP_CHUNK_BLOCKS: u64 = 4096;
/// Holders from block maps asked for one block before its home and the owner.
pub const MAX_HOLDERS_TRIED: usize = 3;

tokio::task_local! {
    static SERVING_PEER: bool;
}

/// Runs `f` as the service of another member's request: reads in it go to owners only.
pub async fn serving_peer<F: std::future::Future>(f: F) -> F::Output {
    SERVING_PEER.scope(true, f).await
}

fn is_serving_peer() -> bool {
    SERVING_PEER.try_with(|v| *v).unwrap_or(false)
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The home of block `index` of `disk` among `members` (the owner excluded): highest random
/// weight, the same answer on every member that sees the same live set.
pub fn home<'a>(members: &'a [Member], owner: &str, disk: &str, index: u64) -> Option<&'a Member> {
    let key = mix64(fnv(disk) ^ mix64(index));
    members
        .iter()
        .filter(|m| m.id != owner)
        .max_by_key(|m| (mix64(fnv(&m.id) ^ key), m.id.as_str()))
}

/// A remote owner's sealed disk.
#[derive(Debug)]
pub struct PeerOrigin {
    peers: Arc<Peers>,
    me: String,
    members: watch::Receiver<Vec<Member>>,
    owner: String,
    addr: SocketAddr,
    disk: String,
    size: u64,
    generation: u64,
    epoch: u64,
    describe: String,
    /// The owner's fingerprints, by chunk of [`MAP_CHUNK_BLOCKS`].
    owner_map: DashMap<u64, HashMap<u64, BlockRef>>,
    peer_fetch: bool,
    /// Other members' block maps of this disk.
    maps: Option<Arc<RemoteMaps>>,
}

impl PeerOrigin {
    /// Disk `disk` of `size` bytes at `generation` and `epoch`, owned by `owner` at `addr`; `me` and
    /// `members` are this node and the live set, for choosing homes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        peers: Arc<Peers>,
        me: &str,
        members: watch::Receiver<Vec<Member>>,
        owner: &str,
        addr: SocketAddr,
        disk: &str,
        size: u64,
        generation: u64,
        epoch: u64,
    ) -> Self {
        PeerOrigin {
            epoch,
            peers,
            me: me.to_string(),
            members,
            owner: owner.to_string(),
            addr,
            describe: format!("peer://{owner}/{disk}"),
            disk: disk.to_string(),
            size,
            generation,
            owner_map: DashMap::new(),
            peer_fetch: true,
            maps: None,
        }
    }

    /// Asks holders found in these block maps before the block's home.
    pub fn with_block_maps(mut self, maps: Arc<RemoteMaps>) -> Self {
        self.maps = Some(maps);
        self
    }

    /// Members whose block map shows `index`, live and neither this node nor the owner, in the
    /// order to ask them: the less loaded of two picked at random first, then by load.
    fn holders(&self, index: u64, members: &[Member]) -> Vec<Member> {
        let Some(maps) = &self.maps else {
            return Vec::new();
        };
        let mut hs: Vec<(u64, Member)> = maps
            .holders(index)
            .into_iter()
            .filter(|h| *h != self.me && *h != self.owner)
            .filter_map(|h| members.iter().find(|m| m.id == h).cloned())
            .map(|m| (self.peers.load(&m.id), m))
            .collect();
        if hs.len() >= 2 {
            // Two random choices: spread equal loads, prefer the lighter of the two.
            let r =
                mix64(index ^ NEXT.fetch_add(0x9E37_79B9, std::sync::atomic::Ordering::Relaxed));
            let i = (r % hs.len() as u64) as usize;
            let j = ((r >> 32) % (hs.len() as u64 - 1)) as usize;
            let j = if j >= i { j + 1 } else { j };
            let first = if hs[j].0 < hs[i].0 { j } else { i };
            hs.swap(0, first);
            hs[1..].sort_by_key(|(l, _)| *l);
        }
        hs.into_iter()
            .take(MAX_HOLDERS_TRIED)
            .map(|(_, m)| m)
            .collect()
    }

    /// Whether missed blocks may come from their home member (true by default); false reads
    /// every miss from the owner.
    pub fn with_peer_fetch(mut self, on: bool) -> Self {
        self.peer_fetch = on;
        self
    }

    /// The owner's fingerprint of block `index`: from the chunk fetched before, else asked anew
    /// (the whole chunk the first time, the one entry after that).
    async fn owner_fingerprint(&self, index: u64, block_bytes: u64) -> Option<BlockRef> {
        let chunk = index / MAP_CHUNK_BLOCKS;
        let known = self.owner_map.get(&chunk).map(|m| m.get(&index).copied());
        match known {
            Some(Some(r)) => return Some(r),
            Some(None) => {}
            None => {
                let entries = self
                    .peers
                    .content_map(
                        &self.owner,
                        self.addr,
                        &self.disk,
                        (self.generation, self.epoch),
                        chunk * MAP_CHUNK_BLOCKS,
                        MAP_CHUNK_BLOCKS as u32,
                        block_bytes,
                    )
                    .await
                    .ok()?;
                self.owner_map.entry(chunk).or_default().extend(entries);
                if let Some(r) = self
                    .owner_map
                    .get(&chunk)
                    .and_then(|m| m.get(&index).copied())
                {
                    return Some(r);
                }
            }
        }
        let entries = self
            .peers
            .content_map(
                &self.owner,
                self.addr,
                &self.disk,
                (self.generation, self.epoch),
                index,
                1,
                block_bytes,
            )
            .await
            .ok()?;
        let r = entries.iter().find(|(i, _)| *i == index).map(|(_, r)| *r);
        self.owner_map.entry(chunk).or_default().extend(entries);
        r
    }

    /// Block `index` from member `home` (its home, or with `cached_only` a holder from the
    /// block maps), verified against the owner's fingerprint; on failure, why.
    async fn fetch_from(
        &self,
        home: &Member,
        index: u64,
        block_bytes: u64,
        len: usize,
        cached_only: bool,
    ) -> Result<Bytes, &'static str> {
        let got = self
            .peers
            .fetch_blocks(
                &home.id,
                home.peer_addr,
                &self.disk,
                (self.generation, self.epoch),
                &[index],
                cached_only,
            )
            .await
            .map_err(|_| "error")?;
        let Some(bytes) = got
            .into_iter()
            .find(|(i, _)| *i == index)
            .and_then(|(_, b)| b)
        else {
            if let Some(m) = &self.maps {
                m.not_held(&home.id, index);
            }
            return Err("missing");
        };
        let expected = self
            .owner_fingerprint(index, block_bytes)
            .await
            .ok_or("no_fingerprint")?;
        let verified = bytes.len() == len
            && match expected {
                BlockRef::Zero => is_zero(&bytes),
                BlockRef::Data(fp) => fp.matches(&bytes),
            };
        if !verified {
            tracing::warn!(peer = %home.id, disk = %self.disk, block = index, "a peer sent bytes that do not match the owner's fingerprint; reading from the owner");
            return Err("bad_bytes");
        }
        Ok(bytes)
    }

    fn error(&self, op: &'static str, offset: u64, cause: String) -> OriginError {
        OriginError::Io {
            origin: self.describe.clone(),
            op,
            offset,
            cause,
        }
    }
}

impl Origin for PeerOrigin {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> OriginFuture<'_, Bytes> {
        Box::pin(async move {
            let b = self
                .peers
                .read(
                    &self.owner,
                    self.addr,
                    &self.disk,
                    offset,
                    len as u64,
                    self.generation,
                    self.epoch,
                )
                .await
                .map_err(|e| self.error("read", offset, e.to_string()))?;
            if b.len() != len {
                return Err(OriginError::Short {
                    origin: self.describe.clone(),
                    offset,
                    len: len as u64,
                });
            }
            Ok(b)
        })
    }

    fn write_at(&self, offset: u64, _data: Bytes) -> OriginFuture<'_, ()> {
        Box::pin(async move {
            Err(self.error(
                "write",
                offset,
                "a shadow of a remote disk takes no writes".into(),
            ))
        })
    }

    fn flush(&self) -> OriginFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn identity(&self) -> Option<String> {
        None
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn read_block(
        &self,
        index: u64,
        block_bytes: u64,
        len: usize,
    ) -> OriginFuture<'_, (Bytes, Source)> {
        Box::pin(async move {
            if self.peer_fetch && !is_serving_peer() {
                let members = self.members.borrow().clone();
                let holders = self.holders(index, &members);
                for h in &holders {
                    match self.fetch_from(h, index, block_bytes, len, true).await {
                        Ok(b) => {
                            metrics::counter!(telemetry::PEER_FETCHES, "via" => "holder")
                                .increment(1);
                            return Ok((b, Source::Peer));
                        }
                        Err(reason) => {
                            metrics::counter!(telemetry::PEER_FETCH_FAILURES, "reason" => reason)
                                .increment(1);
                        }
                    }
                }
                if let Some(h) = home(&members, &self.owner, &self.disk, index)
                    && h.id != self.me
                {
                    match self.fetch_from(h, index, block_bytes, len, false).await {
                        Ok(b) => {
                            metrics::counter!(telemetry::PEER_FETCHES, "via" => "home")
                                .increment(1);
                            return Ok((b, Source::Peer));
                        }
                        Err(reason) => {
                            metrics::counter!(telemetry::PEER_FETCH_FAILURES, "reason" => reason)
                                .increment(1);
                        }
                    }
                }
            }
            let b = self.read_at(index * block_bytes, len).await?;
            Ok((b, Source::Owner))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str) -> Member {
        Member {
            id: id.into(),
            peer_addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            disks_version: 0,
            boot: 1,
        }
    }

    #[test]
    fn homes_spread_over_members_but_never_the_owner_and_move_little_when_one_leaves() {
        let all = vec![m("a"), m("b"), m("c"), m("d")];
        let mut count: HashMap<&str, u32> = HashMap::new();
        for i in 0..4000 {
            let h = home(&all, "a", "disk", i).expect("home");
            assert_ne!(h.id, "a");
            *count.entry(h.id.as_str()).or_default() += 1;
        }
        for id in ["b", "c", "d"] {
            let n = count[id];
            assert!(
                (1100..1600).contains(&n),
                "{id} is home of {n} of 4000 blocks"
            );
        }
        // d leaves: only d's blocks move.
        let three = vec![m("a"), m("b"), m("c")];
        for i in 0..4000 {
            let before = home(&all, "a", "disk", i).expect("home").id.clone();
            let after = home(&three, "a", "disk", i).expect("home").id.clone();
            if before != "d" {
                assert_eq!(before, after, "block {i} moved although its home stayed");
            }
        }
        assert!(home(&[m("a")], "a", "disk", 1).is_none());
    }
}

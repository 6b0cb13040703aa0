//! Fetching a disk another member owns: its owner's content map, then block bytes from
//! holders, homes and the owner, every block verified.
//!
//! A [`Remote`] stands for one (disk, generation, epoch) owned elsewhere. The read path asks it
//! for two things, in this order:
//!
//! 1. [`Remote::fill_map`]: the owner's fingerprints of the blocks about to be read, fetched
//!    for those blocks only (one `Peer.ContentMap` request a contiguous range; the owner reads
//!    the blocks of the range it has not read, so asking more than is read would cost it
//!    reads) into the shadow's bounded copy of the owner's map, chunks of up to
//!    [`MAP_CHUNK_BLOCKS`] entries, with the next entries and chunks asked ahead of a reader
//!    moving through the disk. With a fingerprint in hand
//!    the read path finds a block cached under any disk or generation, and a zero block never
//!    crosses the network.
//! 2. [`Remote::fetch`]: the bytes of the blocks the cache lacks, in few requests (up to
//!    [`FETCH_PART_BLOCKS`] blocks each, the parts to one source sent at once; `Peer.FetchBlocks`
//!    takes up to [`MAX_BLOCKS_PER_REQUEST`] indices): first
//!    from members whose block map shows them (the less loaded of two picked at random, then
//!    the next, at most [`HOLDER_ROUNDS`] rounds), then from each block's *home* (rendezvous
//!    hashing of its fingerprint over the live members but the owner: one content has one
//!    home, whatever disk holds it), which reads it from the owner once for
//!    everyone, and last from the owner. With [`Route::OwnerOnly`] (this node serving another
//!    member as a home) only the owner is asked, so a request never travels more than two hops.
//!
//! Architecture invariant: no byte is returned unless it hashes to the owner's fingerprint for
//! that block at this disk's generation; the one exception is a block whose fingerprint the
//! owner could not give, which only the owner itself is asked for. This module never touches
//! the cache; the read path admits what it returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::hashing::DashMap;
use bytes::Bytes;
use tokio::sync::{OnceCell, watch};

use super::blockmap::RemoteMaps;
use super::{Member, Peers};
use crate::cache::Fingerprint;
use crate::disk::ContentMap;
use crate::error::{Error, Result};
use crate::origin::{Origin, OriginError, OriginFuture};
use crate::telemetry;

/// Entries of the owner's content map asked for in one request (fewer for large blocks: a
/// chunk never stands for more than [`MAP_CHUNK_BYTES`] of disk).
pub const MAP_CHUNK_BLOCKS: u64 = 1024;
/// Disk bytes one chunk of the owner's map stands for, at most: the owner reads that much to
/// fingerprint blocks it has not read yet.
pub const MAP_CHUNK_BYTES: u64 = 64 << 20;
/// Entries of an owner's map a member keeps per disk, at most (about 36 bytes each).
pub const OWNER_MAP_MAX_BLOCKS: u64 = 1 << 20;
/// Block indices in one `Peer.FetchBlocks` request (the Peer service's own limit).
pub const MAX_BLOCKS_PER_REQUEST: usize = 64;
/// Block indices this node puts in one `Peer.FetchBlocks` request. A read that wants more from
/// one source sends its parts at once (over the member's connections in turn): the source
/// reads and sends them on several cores, and this node verifies one part while the next
/// arrives. A cold 1 GiB read at a member over NBD (1 MiB reads, 64 blocks of 16 KiB each)
/// on 16 cores went from 1,642 to 1,783 MB/s on average of five runs each, in turns, against
/// one request of 64; on 2 cores (CPU-bound) it made no difference (docs/measurements.md).
pub const FETCH_PART_BLOCKS: usize = 16;
const _: () = assert!(FETCH_PART_BLOCKS >= 1 && FETCH_PART_BLOCKS <= MAX_BLOCKS_PER_REQUEST);
/// Chunks of the owner's map asked ahead of a sequential reader: enough that the owner
/// fingerprints the next chunk while the reader is still one chunk away from it.
pub const MAP_READ_AHEAD_CHUNKS: u64 = 2;
/// Entries asked ahead of a reader that holds this many entries before its read, in its first
/// chunk (and needed before it, to count as moving through the disk).
pub const MAP_WINDOW_BLOCKS: u64 = 64;
/// Rounds of asking holders found in block maps before homes and the owner.
pub const HOLDER_ROUNDS: usize = 2;

/// Where the read path may get a missed block from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Holders, then the block's home, then the owner: a read of this node's own clients.
    Any,
    /// The owner only: this node serves another member (as a home), which already tried the
    /// others.
    OwnerOnly,
    /// A read of this node's own disk for another member (its content map, or the blocks it
    /// fetches): cached blocks are served without being touched, missed ones read from the
    /// origin and not admitted. The member
    /// caches its own copy; this node's cache (and its SSD tier) stays its own clients', rather
    /// than filling with, and demoting, every block members read through it.
    Member,
}

/// Who sent a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The disk's owner.
    Owner,
    /// Another member, verified against the owner's fingerprint.
    Peer,
}

/// One block the read path wants.
#[derive(Debug, Clone, Copy)]
pub struct Want {
    /// Block index.
    pub index: u64,
    /// The owner's fingerprint; `None` when the owner gave none (only the owner is asked).
    pub expected: Option<Fingerprint>,
    /// The block's length (shorter at the end of the disk).
    pub len: usize,
}

type MapFlight = Arc<OnceCell<Result<()>>>;

/// Receives each fetched block (its position in the wants) once, as soon as it is settled.
pub type Done<'a> = dyn Fn(usize, Result<(Bytes, Source)>) + Send + Sync + 'a;

/// One disk another member owns, at one generation and epoch.
#[derive(Debug)]
pub struct Remote {
    peers: Arc<Peers>,
    me: String,
    members: watch::Receiver<Vec<Member>>,
    owner: String,
    addr: SocketAddr,
    disk: String,
    size: u64,
    generation: u64,
    epoch: u64,
    block_bytes: u64,
    peer_fetch: bool,
    maps: Arc<RemoteMaps>,
    /// Ranges (first block, count) of the owner's map being fetched.
    map_flights: DashMap<(u64, u64), MapFlight>,
    /// Mixed into the random choice between two holders.
    picks: AtomicU64,
    describe: String,
    /// The sequential readers of this disk, for read-ahead.
    ahead: super::ahead::Ahead,
}

/// What [`Remote::new`] needs to know about the disk and its owner.
#[derive(Debug, Clone)]
pub struct RemoteDiskRef {
    /// The owner's node id.
    pub owner: String,
    /// The owner's Peer address.
    pub addr: SocketAddr,
    /// The disk's id.
    pub disk: String,
    /// Size in bytes.
    pub size: u64,
    /// Generation.
    pub generation: u64,
    /// Epoch.
    pub epoch: u64,
}

impl Remote {
    /// The disk `r` as this node `me` reaches it: over `peers`, choosing among the live
    /// `members`, asking holders found in `maps` when `peer_fetch` is on.
    pub fn new(
        peers: Arc<Peers>,
        me: &str,
        members: watch::Receiver<Vec<Member>>,
        r: RemoteDiskRef,
        block_bytes: u64,
        peer_fetch: bool,
        maps: Arc<RemoteMaps>,
    ) -> Self {
        Remote {
            describe: format!("peer://{}/{}", r.owner, r.disk),
            picks: AtomicU64::new(r.epoch ^ r.generation),
            peers,
            me: me.to_string(),
            members,
            owner: r.owner,
            addr: r.addr,
            disk: r.disk,
            size: r.size,
            generation: r.generation,
            epoch: r.epoch,
            block_bytes,
            peer_fetch,
            maps,
            map_flights: crate::hashing::dash_map(),
            ahead: Default::default(),
        }
    }

    /// The sequential readers of this disk, and what they asked to fetch ahead (see
    /// [`super::ahead`]).
    pub fn ahead(&self) -> &super::ahead::Ahead {
        &self.ahead
    }

    /// Entries of the owner's map per chunk for this block size.
    pub fn chunk_blocks(block_bytes: u64) -> u64 {
        MAP_CHUNK_BLOCKS
            .min(MAP_CHUNK_BYTES / block_bytes.max(1))
            .max(1)
    }

    /// An empty copy of the owner's map, as [`Remote::fill_map`] fills it.
    pub fn empty_map(block_bytes: u64) -> ContentMap {
        ContentMap::owner_copy(Self::chunk_blocks(block_bytes), OWNER_MAP_MAX_BLOCKS)
    }

    /// The disk's epoch at its owner.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The disk's size in blocks.
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block_bytes)
    }

    /// Makes `map` hold the owner's entries of every block in `indices` (sorted), fetching
    /// those it lacks in contiguous ranges (one request a range, one request at a time per
    /// range), and asks ahead of a reader moving through the disk.
    pub async fn fill_map(self: &Arc<Self>, map: &Arc<ContentMap>, indices: &[u64]) -> Result<()> {
        let per = map.chunk_blocks().unwrap_or(MAP_CHUNK_BLOCKS);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for &i in indices {
            if map.has_block(i) {
                continue;
            }
            match ranges.last_mut() {
                Some((first, count)) if *first + *count == i && i % per != 0 => *count += 1,
                _ => ranges.push((i, 1)),
            }
        }
        if !ranges.is_empty() {
            let got = futures::future::join_all(
                ranges
                    .iter()
                    .map(|&(first, count)| self.map_range(map, first, count)),
            )
            .await;
            for r in got {
                r?;
            }
        }
        // Read-ahead, for a reader moving through the disk: what comes after this read is
        // asked now, so the owner fingerprints it while this read is served. A reader that
        // holds the whole chunk before this one gets the rest of this chunk and the next
        // chunks; one that holds the window of blocks before this read, the next window. Any
        // other reader asks for nothing ahead: each entry costs the owner a read of a block
        // it has not read.
        if let (Some(&first), Some(&last)) = (indices.first(), indices.last()) {
            let total = self.blocks();
            let chunk = first / per;
            // Ranges asked ahead are aligned (whole chunks, whole windows), so that one in
            // flight is found by its key and not asked again by the next read.
            let whole = |c: u64| (c * per, per.min(total.saturating_sub(c * per)));
            let mut ahead: Vec<(u64, u64)> = Vec::new();
            if chunk > 0 && map.has_chunk(chunk - 1) {
                for c in last / per..last / per + 1 + MAP_READ_AHEAD_CHUNKS {
                    if c * per < total && !map.has_chunk(c) {
                        ahead.push(whole(c));
                    }
                }
            } else if first >= MAP_WINDOW_BLOCKS
                && map.has_block(first - 1)
                && map.has_block(first - MAP_WINDOW_BLOCKS)
                // Every one of the window before: a boot's scattered reads often hold both
                // ends of it, and asking ahead for them read 2.6x the working set at the owner.
                && (first - MAP_WINDOW_BLOCKS..first).all(|i| map.has_block(i))
                && last + 1 < total
                && !map.has_block(last + 1)
            {
                let w = (last + 1) / MAP_WINDOW_BLOCKS * MAP_WINDOW_BLOCKS;
                let end = (w + MAP_WINDOW_BLOCKS).min(total).min(w / per * per + per);
                ahead.push((w, end - w));
            }
            for (first, count) in ahead {
                if self.map_flights.contains_key(&(first, count)) {
                    continue;
                }
                let (this, map) = (self.clone(), map.clone());
                tokio::spawn(async move {
                    let _ = this.map_range(&map, first, count).await;
                });
            }
        }
        Ok(())
    }

    /// Entries [first, first + count) (inside one chunk) of the owner's map into `map`, once
    /// however many readers want the same range at once.
    async fn map_range(&self, map: &ContentMap, first: u64, count: u64) -> Result<()> {
        /// Takes the flight out of the map when its caller is done or went away (a cancelled
        /// read): keys are ranges, and one left behind would stay for the shadow's life.
        struct Seat<'a> {
            flights: &'a DashMap<(u64, u64), MapFlight>,
            key: (u64, u64),
            cell: MapFlight,
        }
        impl Drop for Seat<'_> {
            fn drop(&mut self) {
                self.flights
                    .remove_if(&self.key, |_, c| Arc::ptr_eq(c, &self.cell));
            }
        }
        let key = (first, count);
        let cell = self.map_flights.entry(key).or_default().clone();
        let seat = Seat {
            flights: &self.map_flights,
            key,
            cell: cell.clone(),
        };
        let r = cell
            .get_or_init(|| self.load_range(map, first, count))
            .await
            .clone();
        drop(seat);
        r
    }

    async fn load_range(&self, map: &ContentMap, first: u64, count: u64) -> Result<()> {
        if (first..first + count).all(|i| map.has_block(i)) {
            return Ok(());
        }
        let per = map.chunk_blocks().unwrap_or(MAP_CHUNK_BLOCKS);
        let total = self.blocks();
        let count = count.min(total.saturating_sub(first));
        if count == 0 {
            return Ok(());
        }
        let chunk = first / per;
        let chunk_first = chunk * per;
        let count = count.min(chunk_first + per - first);
        let entries = self
            .peers
            .content_map(
                &self.owner,
                self.addr,
                &self.disk,
                crate::ids::Version::new(self.generation, self.epoch),
                first,
                count as u32,
                self.block_bytes,
            )
            .await?;
        let mut v = vec![None; count as usize];
        for (i, r) in entries {
            if let Some(slot) = i.checked_sub(first).and_then(|k| v.get_mut(k as usize)) {
                *slot = Some(r);
            }
        }
        map.insert_entries(
            chunk,
            per.min(total - chunk_first) as usize,
            (first - chunk_first) as usize,
            &v,
        );
        Ok(())
    }

    /// Members whose block map shows `index`, live and neither this node nor the owner, in the
    /// order to ask them: the less loaded of two picked at random first, then by load.
    fn holders(&self, index: u64, members: &[Member]) -> Vec<Member> {
        let mut hs: Vec<(u64, Member)> = self
            .maps
            .holders(index)
            .into_iter()
            .filter(|(h, _)| *h != self.me && *h != self.owner && !self.peers.is_suspect(h))
            // Only the incarnation whose map it is: a restarted member holds nothing yet.
            .filter_map(|(h, boot)| {
                members
                    .iter()
                    .find(|m| m.id == h && m.boot == boot)
                    .cloned()
            })
            .map(|m| (self.peers.load(&m.id), m))
            .collect();
        if hs.len() >= 2 {
            let r = mix64(index ^ self.picks.fetch_add(0x9E37_79B9, Ordering::Relaxed));
            let i = (r % hs.len() as u64) as usize;
            let j = ((r >> 32) % (hs.len() as u64 - 1)) as usize;
            let j = if j >= i { j + 1 } else { j };
            let first = if hs[j].0 < hs[i].0 { j } else { i };
            hs.swap(0, first);
            hs[1..].sort_by_key(|(l, _)| *l);
        }
        hs.into_iter().take(HOLDER_ROUNDS).map(|(_, m)| m).collect()
    }

    /// The bytes of `wants`: `done(k, ..)` is called once for each `wants[k]`, as soon as
    /// that block verified or every source failed, so that a block waits for no other block's
    /// source. Blocks with a home go to it while those without go to the owner, at once: a
    /// member's own loads never wait behind another member's (two homes asking each other for
    /// blocks cannot wait on each other).
    pub async fn fetch(&self, wants: &[Want], route: Route, done: &Done<'_>) {
        let mut pending: Vec<usize> = (0..wants.len()).collect();
        let mut homes: Vec<(Member, usize)> = Vec::new();
        if route == Route::Any && self.peer_fetch {
            let members = self.members.borrow().clone();
            let candidates: Vec<Vec<Member>> = wants
                .iter()
                .map(|w| {
                    if w.expected.is_some() {
                        self.holders(w.index, &members)
                    } else {
                        Vec::new()
                    }
                })
                .collect();
            for round in 0..HOLDER_ROUNDS {
                let plan: Vec<(Member, usize)> = pending
                    .iter()
                    .filter_map(|&k| candidates[k].get(round).map(|m| (m.clone(), k)))
                    .collect();
                if plan.is_empty() {
                    break;
                }
                pending = self.ask(plan, &pending, wants, true, "holder", done).await;
            }
            pending.retain(|&k| {
                let w = &wants[k];
                let h = w.expected.and_then(|fp| {
                    home(&members, &self.owner, content_key(&fp))
                        .filter(|h| h.id != self.me && !self.peers.is_suspect(&h.id))
                });
                match h {
                    Some(h) => {
                        homes.push((h.clone(), k));
                        false
                    }
                    None => true,
                }
            });
        }
        let owner = Member {
            id: self.owner.clone(),
            peer_addr: self.addr,
            disks_version: 0,
            boot: 0,
        };
        let via_homes = async {
            let at_homes: Vec<usize> = homes.iter().map(|(_, k)| *k).collect();
            let left = self.ask(homes, &at_homes, wants, false, "home", done).await;
            self.ask_owner(&owner, &left, wants, done).await;
        };
        futures::join!(via_homes, self.ask_owner(&owner, &pending, wants, done));
    }

    /// `blocks` from the owner; each one that does not come is its error.
    async fn ask_owner(&self, owner: &Member, blocks: &[usize], wants: &[Want], done: &Done<'_>) {
        if blocks.is_empty() {
            return;
        }
        let plan: Vec<(Member, usize)> = blocks.iter().map(|&k| (owner.clone(), k)).collect();
        for k in self.ask(plan, blocks, wants, false, "owner", done).await {
            done(
                k,
                Err(Error::Peer {
                    node: self.owner.clone(),
                    cause: format!(
                        "owner did not send block {} of {:?}",
                        wants[k].index, self.disk
                    ),
                }),
            );
        }
    }

    /// Asks each member of `plan` for its blocks (grouped, [`FETCH_PART_BLOCKS`] a request,
    /// the requests at once), hands each block that verified to `done`, and returns
    /// the `pending` blocks still without bytes. Asking the owner, an error is final: it goes
    /// to `done` too.
    async fn ask(
        &self,
        plan: Vec<(Member, usize)>,
        pending: &[usize],
        wants: &[Want],
        cached_only: bool,
        via: &'static str,
        done: &Done<'_>,
    ) -> Vec<usize> {
        let groups = parts(plan);
        let answered: Vec<Vec<usize>> =
            futures::future::join_all(groups.iter().map(|(m, ks)| async move {
                let indices: Vec<u64> = ks.iter().map(|&k| wants[k].index).collect();
                let answer = self
                    .peers
                    .fetch_blocks(
                        &m.id,
                        m.peer_addr,
                        &self.disk,
                        crate::ids::Version::new(self.generation, self.epoch),
                        &indices,
                        cached_only,
                    )
                    .await;
                self.take(m, ks, answer, wants, cached_only, via, done)
            }))
            .await;
        let answered: crate::hashing::HashSet<usize> = answered.into_iter().flatten().collect();
        pending
            .iter()
            .copied()
            .filter(|k| !answered.contains(k))
            .collect()
    }

    /// What member `m` answered for blocks `ks`: the ones handed to `done`.
    #[allow(clippy::too_many_arguments)]
    fn take(
        &self,
        m: &Member,
        ks: &[usize],
        answer: Result<Vec<(u64, Option<Bytes>)>>,
        wants: &[Want],
        cached_only: bool,
        via: &'static str,
        done: &Done<'_>,
    ) -> Vec<usize> {
        let is_owner = via == "owner";
        let got = match answer {
            Ok(got) => got,
            Err(e) => {
                metrics::counter!(telemetry::PEER_FETCH_FAILURES, "reason" => "error")
                    .increment(ks.len() as u64);
                tracing::debug!(member = %m.id, disk = %self.disk, error = %e, via, "block fetch failed");
                if is_owner {
                    for &k in ks {
                        done(k, Err(e.clone()));
                    }
                    return ks.to_vec();
                }
                self.peers.suspect(&m.id);
                return Vec::new();
            }
        };
        let mut handed = Vec::with_capacity(ks.len());
        for &k in ks {
            let w = &wants[k];
            let bytes = got
                .iter()
                .find(|(i, _)| *i == w.index)
                .and_then(|(_, b)| b.clone());
            let Some(bytes) = bytes else {
                if cached_only {
                    self.maps.not_held(&m.id, m.boot, w.index);
                }
                metrics::counter!(telemetry::PEER_FETCH_FAILURES, "reason" => "missing")
                    .increment(1);
                continue;
            };
            let verified = bytes.len() == w.len
                && match w.expected {
                    Some(fp) => fp.matches(&bytes),
                    None => is_owner,
                };
            if !verified {
                metrics::counter!(telemetry::PEER_FETCH_FAILURES, "reason" => "bad_bytes")
                    .increment(1);
                tracing::warn!(member = %m.id, disk = %self.disk, block = w.index, via, "a member sent bytes that do not match the owner's fingerprint; asking the next source");
                if !is_owner {
                    self.peers.suspect(&m.id);
                }
                if is_owner {
                    done(
                        k,
                        Err(Error::Peer {
                            node: m.id.clone(),
                            cause: format!(
                                "block {} of {:?} does not match the owner's own content map",
                                w.index, self.disk
                            ),
                        }),
                    );
                    handed.push(k);
                }
                continue;
            }
            let source = if is_owner {
                Source::Owner
            } else {
                metrics::counter!(telemetry::PEER_FETCHES, "via" => via).increment(1);
                Source::Peer
            };
            done(k, Ok((bytes, source)));
            handed.push(k);
        }
        handed
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

/// A remote disk as an origin: its size and name, and reads straight from the owner at this
/// generation (the read path fetches blocks through [`Remote::fetch`] instead).
impl Origin for Remote {
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
                    (offset, len as u64),
                    crate::ids::Version::new(self.generation, self.epoch),
                )
                .await
                .map(|(b, _)| b)
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

/// The rendezvous key of a block's content: its home is the same whatever disk or block holds
/// that content, so a home's own load of it never waits on another home (two homes cannot
/// wait on each other for one fingerprint), and one content leaves the owner once.
pub fn content_key(fp: &Fingerprint) -> u64 {
    u64::from_le_bytes([
        fp.0[0], fp.0[1], fp.0[2], fp.0[3], fp.0[4], fp.0[5], fp.0[6], fp.0[7],
    ])
}

/// The home of the content with rendezvous `key` among `members` (the owner excluded):
/// highest random weight, the same answer on every member that sees the same live set.
pub fn home<'a>(members: &'a [Member], owner: &str, key: u64) -> Option<&'a Member> {
    let key = mix64(key);
    members
        .iter()
        .filter(|m| m.id != owner)
        .max_by_key(|m| (mix64(fnv(&m.id) ^ key), m.id.as_str()))
}

/// `plan`'s blocks by member, at most [`FETCH_PART_BLOCKS`] a part, in the plan's order.
fn parts(plan: Vec<(Member, usize)>) -> Vec<(Member, Vec<usize>)> {
    let mut groups: Vec<(Member, Vec<usize>)> = Vec::new();
    for (m, k) in plan {
        match groups
            .iter_mut()
            .find(|(g, ks)| g.id == m.id && ks.len() < FETCH_PART_BLOCKS)
        {
            Some((_, ks)) => ks.push(k),
            None => groups.push((m, vec![k])),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

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
    fn a_read_asks_each_source_in_parts_of_at_most_fetch_part_blocks() {
        // 65 blocks from the owner and 4 from a holder, interleaved: the owner's in parts of
        // 16 in the read's order, the holder's in one.
        let plan: Vec<(Member, usize)> = (0..69)
            .map(|k| (if k % 14 == 13 { m("b") } else { m("a") }, k))
            .collect();
        let got = parts(plan);
        let sizes: Vec<(&str, usize)> = got
            .iter()
            .map(|(g, ks)| (g.id.as_str(), ks.len()))
            .collect();
        assert_eq!(
            sizes,
            [
                ("a", 16),
                ("b", 4),
                ("a", 16),
                ("a", 16),
                ("a", 16),
                ("a", 1)
            ],
            "{got:?}"
        );
        let a: Vec<usize> = got
            .iter()
            .filter(|(g, _)| g.id == "a")
            .flat_map(|(_, ks)| ks.iter().copied())
            .collect();
        assert_eq!(a, (0..69).filter(|k| k % 14 != 13).collect::<Vec<_>>());
    }

    #[test]
    fn homes_spread_over_members_but_never_the_owner_and_move_little_when_one_leaves() {
        let all = vec![m("a"), m("b"), m("c"), m("d")];
        let mut count: HashMap<&str, u32> = HashMap::new();
        for i in 0..4000 {
            let h = home(&all, "a", mix64(i)).expect("home");
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
            let before = home(&all, "a", mix64(i)).expect("home").id.clone();
            let after = home(&three, "a", mix64(i)).expect("home").id.clone();
            if before != "d" {
                assert_eq!(before, after, "block {i} moved although its home stayed");
            }
        }
        assert!(home(&[m("a")], "a", 1).is_none());
    }

    #[test]
    fn a_chunk_of_the_owners_map_never_stands_for_more_than_its_byte_limit() {
        assert_eq!(Remote::chunk_blocks(16 << 10), MAP_CHUNK_BLOCKS);
        assert_eq!(Remote::chunk_blocks(1 << 20), 64);
        assert_eq!(Remote::chunk_blocks(4 << 10), MAP_CHUNK_BLOCKS);
    }
}

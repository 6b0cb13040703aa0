//! The read path of DESIGN.md, in one place.
//!
//! For disk D, range [offset, offset + len):
//!
//! 1. Unknown disk, a range past the end, or a request above the per-request limit: an error,
//!    nothing else touched. A zero-length range at or before the end reads nothing.
//! 2. D is mutable (or being sealed): read the origin directly; nothing is cached.
//! 3. D is immutable (sealed, detected, or the shadow of such a disk another member owns):
//!    split the range into blocks, then for the blocks all together:
//!    - fingerprint: D's content map. For a shadow, the missing chunks of the owner's map are
//!      fetched first ([`crate::cluster::fetch::Remote::fill_map`]), so the fingerprint is
//!      known before any byte is fetched;
//!    - cache: a hit on the fingerprint serves the block, whatever disk or generation put it
//!      there; a zero block is the shared zero block;
//!    - single flight: one load per fingerprint (per block while the fingerprint is unknown)
//!      however many readers want it;
//!    - fetch: D's own origin, contiguous misses in one read each; for a shadow, every miss
//!      of the read in as few requests as the sources allow (holders, homes, the owner),
//!      verified against the owner's fingerprints ([`crate::cluster::fetch::Remote::fetch`]);
//!    - admit to the cache, record in the map, announce in D's block map.
//! 4. A range inside one block is a slice of that block's `Bytes` (no copy); a range spanning
//!    blocks comes back as the blocks' slices ([`ReadPath::read_pieces`]), or assembled into one
//!    buffer (one copy).
//!
//! Architecture invariant: a byte reaches a reader only from this node's origin, from the
//! disk's owner, or from a cache entry or member whose bytes hash to the fingerprint the
//! (owner's) content map holds for that block. An error reaches every waiter of the load that
//! failed and leaves nothing behind in the cache or the map.

use std::sync::Arc;

use crate::hashing::DashMap;
use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use crate::cache::fingerprint::is_zero;
use crate::cache::{ContentCache, Fingerprint, Tier};
use crate::cluster::fetch::{Remote, Route, Source, Want};
use crate::disk::{BlockRef, ContentMap, Disk};
use crate::error::{Error, Result};
use crate::telemetry::{self, Count};

/// Largest range one request may read or write (the gRPC client splits larger ones).
pub const MAX_IO_BYTES: u64 = shadowcache_proto::MAX_IO_BYTES;

/// Counters of the read path (the cache keeps its own).
#[derive(Debug)]
pub struct ReadStats {
    /// Reads sent to origins.
    pub origin_reads: Count,
    /// Bytes read from origins.
    pub origin_read_bytes: Count,
    /// Origin reads that failed.
    pub origin_errors: Count,
    /// Reads of remote sealed disks sent to their owner.
    pub owner_reads: Count,
    /// Bytes read from owners.
    pub owner_read_bytes: Count,
    /// Blocks of remote sealed disks fetched from members other than the owner.
    pub peer_reads: Count,
    /// Bytes fetched from such members.
    pub peer_read_bytes: Count,
    /// Cold block reads that joined a read already in flight.
    pub single_flight_joins: Count,
    /// Blocks answered by the shared zero block.
    pub zero_block_hits: Count,
    /// Block bytes served from RAM.
    pub ram_bytes: Count,
    /// Block bytes served from the SSD tier.
    pub ssd_bytes: Count,
    /// Blocks served from those read lately for members (see [`ReadPath`]'s staging) instead
    /// of the origin.
    pub staged_hits: Count,
    /// Blocks asked for ahead of sequential readers (some cached or in flight already).
    pub read_ahead_asked: Count,
    /// Blocks of disks other members own fetched ahead of a sequential reader.
    pub read_ahead_blocks: Count,
    /// Blocks fetched ahead that a client's read then took.
    pub read_ahead_used: Count,
}

impl ReadStats {
    fn new() -> Self {
        use telemetry::*;
        ReadStats {
            origin_reads: Count::new(ORIGIN_READS, &[]),
            origin_read_bytes: Count::new(ORIGIN_READ_BYTES, &[]),
            origin_errors: Count::new(ORIGIN_ERRORS, &[]),
            owner_reads: Count::new(OWNER_READS, &[]),
            owner_read_bytes: Count::new(OWNER_READ_BYTES, &[]),
            peer_reads: Count::new(PEER_READS, &[]),
            peer_read_bytes: Count::new(PEER_READ_BYTES, &[]),
            single_flight_joins: Count::new(SINGLE_FLIGHT_JOINS, &[]),
            zero_block_hits: Count::new(ZERO_BLOCK_HITS, &[]),
            ram_bytes: Count::new(HIT_BYTES, &[("tier", "ram")]),
            ssd_bytes: Count::new(HIT_BYTES, &[("tier", "ssd")]),
            staged_hits: Count::new(STAGED_HITS, &[]),
            read_ahead_asked: Count::new(READ_AHEAD_ASKED, &[]),
            read_ahead_blocks: Count::new(READ_AHEAD_BLOCKS, &[]),
            read_ahead_used: Count::new(READ_AHEAD_USED, &[]),
        }
    }
}

/// What one block of a read found before any load.
enum Found {
    Block(Bytes),
    /// Not cached: its fingerprint if the map knows it.
    Missing(Option<Fingerprint>),
}

/// What a single flight is for: the content (its fingerprint known), or one block of one
/// content map (one generation) of one disk object while its fingerprint is unknown (a shadow
/// replaced by a newer one, or a new generation of a disk, never joins a load of the old one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FlightKey {
    Content(Fingerprint),
    Block {
        instance: u64,
        /// The content map being served (its address): one per generation, and alive while
        /// any flight that uses it is.
        map: usize,
        index: u64,
        /// A load for a member ([`Route::Member`]) admits nothing: a client read must not join
        /// it (its block would never be cached), nor a member's read a client's.
        member: bool,
    },
}

/// A load in flight, as its waiters see it: `Some` once loaded or failed; closed without a value
/// when the read that led it went away. The leader holds the sending side from the moment the
/// flight is in the map, so a joiner can never start a second load while the first is running.
type Flight = watch::Receiver<Option<Result<Bytes>>>;

/// A place in a flight; leaving it removes the flight once it is done, or once its leader is
/// gone (an entry left behind would live on, keyed by a disk that may never come back).
struct Seat<'a> {
    flights: &'a DashMap<FlightKey, Flight>,
    key: FlightKey,
    flight: Flight,
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        self.flights.remove_if(&self.key, |_, f| {
            f.same_channel(&self.flight) && (f.borrow().is_some() || f.has_changed().is_err())
        });
    }
}

/// Bytes of blocks read from an own origin for members, kept a little while (see
/// [`ReadPath`]).
pub const STAGED_BYTES: u64 = 32 << 20;
/// How long a block read for members is kept.
pub const STAGED_FOR: std::time::Duration = std::time::Duration::from_secs(10);
/// Bytes of blocks fetched ahead of sequential readers held at once, at least (four times
/// `cluster.read_ahead` when that is more).
pub const AHEAD_BYTES: u64 = 64 << 20;
/// How long a block fetched ahead waits for the read it was fetched for.
pub const AHEAD_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves reads of every disk of a node.
///
/// Blocks of its own disks that it reads from the origin for members (to fingerprint them
/// for a content map, or for a `FetchBlocks`) do not enter its cache (see
/// [`Route::Member`]), but are *staged*: kept by fingerprint for [`STAGED_FOR`], at most
/// [`STAGED_BYTES`]. A member that asks for a window of the map fetches the blocks it needs
/// from it moments later, and a storage-bound owner must not read them from its origin twice.
///
/// Blocks of other members' disks fetched ahead of a sequential reader
/// ([`ReadPath::read_ahead`]) wait in a buffer of their own, by fingerprint, for the client's
/// read that admits them (at most [`AHEAD_BYTES`], each for [`AHEAD_FOR`]).
#[derive(Debug)]
pub struct ReadPath {
    cache: ContentCache,
    block_bytes: u64,
    flights: DashMap<FlightKey, Flight>,
    staged: moka::sync::Cache<Fingerprint, Bytes>,
    ahead: moka::sync::Cache<Fingerprint, Bytes>,
    /// The read-ahead buffer's blocks, less those being fetched ahead now.
    ahead_permits: Arc<tokio::sync::Semaphore>,
    stats: ReadStats,
}

/// A short-lived buffer of blocks by fingerprint: each is put once and taken at most once
/// soon after, so the oldest goes first (moka's default admission would refuse new entries
/// once full, none having been read twice).
fn buffer(bytes: u64, ttl: std::time::Duration) -> moka::sync::Cache<Fingerprint, Bytes> {
    moka::sync::Cache::builder()
        .max_capacity(bytes)
        .weigher(|_, b: &Bytes| b.len().max(1) as u32)
        .time_to_live(ttl)
        .eviction_policy(moka::policy::EvictionPolicy::lru())
        .build()
}

/// The pieces as one buffer: the piece itself when there is one (no copy), else one copy.
pub fn join(mut pieces: Vec<Bytes>) -> Bytes {
    match pieces.len() {
        0 => Bytes::new(),
        1 => pieces.pop().unwrap_or_default(),
        _ => {
            let mut out = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
            for p in &pieces {
                out.extend_from_slice(p);
            }
            out.freeze()
        }
    }
}

/// Checks that [offset, offset + len) lies inside the disk and within the per-request limit.
pub fn check_range(disk: &Disk, offset: u64, len: u64) -> Result<()> {
    check_span(disk.id.as_str(), disk.size, offset, len)
}

/// [`check_range`] for a disk known by id and size only (one owned by another member).
pub fn check_span(disk: &str, size: u64, offset: u64, len: u64) -> Result<()> {
    let end = offset.checked_add(len);
    if end.is_none_or(|e| e > size) {
        return Err(Error::OutOfRange {
            disk: disk.to_string(),
            offset,
            len,
            size,
        });
    }
    if len > MAX_IO_BYTES {
        return Err(Error::TooLarge {
            len,
            max: MAX_IO_BYTES,
        });
    }
    Ok(())
}

impl ReadPath {
    /// A read path over `cache`, whose block size it uses, that fetches up to `read_ahead`
    /// bytes ahead of a sequential reader of another member's disk.
    pub fn new(cache: ContentCache, read_ahead: u64) -> Self {
        let block_bytes = u64::from(cache.config().block_bytes);
        let ahead_bytes = AHEAD_BYTES.max(read_ahead.saturating_mul(4));
        ReadPath {
            block_bytes,
            cache,
            flights: crate::hashing::dash_map(),
            staged: buffer(STAGED_BYTES, STAGED_FOR),
            ahead: buffer(ahead_bytes, AHEAD_FOR),
            ahead_permits: Arc::new(tokio::sync::Semaphore::new(
                (ahead_bytes / block_bytes.max(1)) as usize,
            )),
            stats: ReadStats::new(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    /// Loads in flight now, one per content (or block while its fingerprint is unknown).
    pub fn flights(&self) -> usize {
        self.flights.len()
    }

    /// Reads `len` bytes at `offset` of `disk`.
    pub async fn read(&self, disk: &Disk, offset: u64, len: u64, route: Route) -> Result<Bytes> {
        Ok(join(self.read_pieces(disk, offset, len, route).await?))
    }

    /// [`ReadPath::read`] as the slices of the cached blocks, in order, without assembling
    /// them (a writer that can send several buffers at once copies nothing). `route` says
    /// where a shadow's missed blocks may come from.
    pub async fn read_pieces(
        &self,
        disk: &Disk,
        offset: u64,
        len: u64,
        route: Route,
    ) -> Result<Vec<Bytes>> {
        check_range(disk, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let Some(map) = disk.serving_map() else {
            return Ok(vec![self.origin_read(disk, offset, len as usize).await?]);
        };
        let bs = self.block_bytes;
        let first = offset / bs;
        let last = (offset + len - 1) / bs;
        let head = (offset - first * bs) as usize;
        // The common small read: one block whose fingerprint is known. No batch to build, no
        // map to fill; a hit allocates nothing here.
        if first == last
            && let Some(known) = map.get(first)
        {
            let block = match self.lookup_known(disk, first, Some(known), true).await {
                Found::Block(b) => b,
                Found::Missing(fp) => {
                    let mut one = self.fill(disk, &map, &[(0, first, fp)], route).await;
                    let b = one.pop().unwrap_or_else(|| {
                        Err(Error::State("block neither read nor failed".into()))
                    })?;
                    disk.held.insert(first);
                    b
                }
            };
            return Ok(vec![block.slice(head..head + len as usize)]);
        }
        let indices: Vec<u64> = (first..=last).collect();
        let blocks = self.blocks(disk, &map, &indices, route).await;
        let mut out = Vec::with_capacity(blocks.len());
        let mut remaining = len as usize;
        for (n, block) in blocks.into_iter().enumerate() {
            let block = block?;
            let from = if n == 0 { head } else { 0 };
            let take = (block.len() - from).min(remaining);
            out.push(block.slice(from..from + take));
            remaining -= take;
        }
        Ok(out)
    }

    /// Whole blocks `indices` (sorted, inside the disk) of an immutable disk, each read as the
    /// module's rules say, in order. A block that could not be read is its error.
    pub async fn blocks(
        &self,
        disk: &Disk,
        map: &Arc<ContentMap>,
        indices: &[u64],
        route: Route,
    ) -> Vec<Result<Bytes>> {
        if let Some(remote) = &disk.remote
            && let Err(e) = remote.fill_map(map, indices).await
        {
            tracing::debug!(disk = %disk.id, error = %e, "owner's content map unavailable; blocks are read from the owner");
        }
        let found =
            futures::future::join_all(indices.iter().map(|&i| self.lookup(disk, map, i, route)))
                .await;
        let mut out: Vec<Option<Result<Bytes>>> = Vec::with_capacity(indices.len());
        let mut missing: Vec<(usize, u64, Option<Fingerprint>)> = Vec::new();
        for (k, (f, &i)) in found.into_iter().zip(indices).enumerate() {
            match f {
                Found::Block(b) => out.push(Some(Ok(b))),
                Found::Missing(fp) => {
                    out.push(None);
                    missing.push((k, i, fp));
                }
            }
        }
        if !missing.is_empty() {
            let loaded = self.fill(disk, map, &missing, route).await;
            for ((k, i, _), r) in missing.iter().zip(loaded) {
                if r.is_ok() && route != Route::Member {
                    // Also when another disk's flight brought the content: this disk holds it.
                    disk.held.insert(*i);
                }
                out[*k] = Some(r);
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::State("block neither read nor failed".into()))))
            .collect()
    }

    fn block_len(&self, disk: &Disk, index: u64) -> usize {
        (disk.size - index * self.block_bytes).min(self.block_bytes) as usize
    }

    /// The map and the cache, nothing else.
    async fn lookup(&self, disk: &Disk, map: &ContentMap, index: u64, route: Route) -> Found {
        if route == Route::Member {
            // Not this node's clients: no touch, no hit or miss counted.
            return match map.get(index) {
                Some(BlockRef::Zero) => Found::Block(self.cache.zero(self.block_len(disk, index))),
                Some(BlockRef::Data(fp)) => match self.cache.peek(&fp) {
                    Some(b) => Found::Block(b),
                    None => Found::Missing(Some(fp)),
                },
                None => Found::Missing(None),
            };
        }
        self.lookup_known(disk, index, map.get(index), false).await
    }

    /// The cache for block `index`, whose map entry is `known`; `alone`: the read wants this
    /// block only (see [`crate::cache::ContentCache::get_alone`]).
    async fn lookup_known(
        &self,
        disk: &Disk,
        index: u64,
        known: Option<BlockRef>,
        alone: bool,
    ) -> Found {
        match known {
            Some(BlockRef::Zero) => {
                self.stats.zero_block_hits.inc();
                Found::Block(self.cache.zero(self.block_len(disk, index)))
            }
            Some(BlockRef::Data(fp)) => match if alone {
                self.cache.get_alone(&fp).await
            } else {
                self.cache.get(&fp).await
            } {
                Some((bytes, tier)) => {
                    match tier {
                        Tier::Ssd => &self.stats.ssd_bytes,
                        _ => &self.stats.ram_bytes,
                    }
                    .add(bytes.len() as u64);
                    Found::Block(bytes)
                }
                None => Found::Missing(Some(fp)),
            },
            None => {
                self.cache.record_miss();
                Found::Missing(None)
            }
        }
    }

    /// Loads the `missing` blocks (position in the read, index, fingerprint if known), one
    /// flight per content however many readers want it. Blocks whose flight this read starts
    /// are loaded together (one batch), each handed to its waiters as soon as it is loaded;
    /// those another read is loading are waited for, and loaded alone should that read go
    /// away first.
    async fn fill(
        &self,
        disk: &Disk,
        map: &ContentMap,
        missing: &[(usize, u64, Option<Fingerprint>)],
        route: Route,
    ) -> Vec<Result<Bytes>> {
        // The map this read serves, not the disk's generation now: a read that took the map
        // of a generation a write has just ended must not join a load of the next one.
        let map_id = std::ptr::from_ref(map) as usize;
        let mut seats = Vec::with_capacity(missing.len());
        let mut lead = Vec::new();
        for (n, &(_, index, fp)) in missing.iter().enumerate() {
            let key = match (fp, &disk.remote) {
                // Remote bytes are verified against the fingerprint, so any disk's flight of
                // that content serves this one. Own origins are read block by block: bytes
                // from one disk's origin are not checked against another disk's map.
                (Some(fp), Some(_)) => FlightKey::Content(fp),
                _ => FlightKey::Block {
                    instance: disk.instance,
                    map: map_id,
                    index,
                    member: route == Route::Member,
                },
            };
            let flight = match self.flights.entry(key) {
                dashmap::Entry::Occupied(e) => {
                    self.stats.single_flight_joins.inc();
                    e.get().clone()
                }
                dashmap::Entry::Vacant(v) => {
                    let (tx, rx) = watch::channel(None);
                    lead.push((n, tx));
                    v.insert(rx).clone()
                }
            };
            seats.push(Seat {
                flights: &self.flights,
                key,
                flight,
            });
        }
        let led: Vec<(u64, Option<Fingerprint>)> = lead
            .iter()
            .map(|(n, _)| (missing[*n].1, missing[*n].2))
            .collect();
        let led_here: Vec<bool> = {
            let mut v = vec![false; missing.len()];
            for (n, _) in &lead {
                v[*n] = true;
            }
            v
        };
        // The batch hands each block over as it comes; the senders go with it, so a block it
        // never handed over fails its waiters (the channel closes) instead of leaving them
        // waiting.
        let senders: Vec<watch::Sender<Option<Result<Bytes>>>> =
            lead.into_iter().map(|(_, tx)| tx).collect();
        let batch = async move {
            let deliver = |k: usize, r: Result<Bytes>| {
                if let Some(tx) = senders.get(k) {
                    tx.send_replace(Some(r));
                }
            };
            self.load(disk, map, &led, route, &deliver).await;
        };
        let waits = seats.iter().enumerate().map(|(n, seat)| {
            let (index, fp) = (missing[n].1, missing[n].2);
            let mine = led_here[n];
            async move {
                let mut flight = seat.flight.clone();
                let got = flight
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|v| v.clone());
                match got {
                    Some(r) if mine => r,
                    // A read-ahead's flight left its block in the read-ahead buffer and
                    // admitted nothing: the first read to take it admits it, as does one
                    // that finds it gone from there and not cached. Only a flight keyed by
                    // content has bytes checked against `fp`. A flight keyed by block read
                    // an origin, whose block may have been written since this read took its
                    // map: its leader admitted the bytes under their own fingerprint, and
                    // admitting them under `fp` would serve them for any disk's `fp`.
                    Some(Ok(b)) if route != Route::Member => match seat.key {
                        FlightKey::Content(fp)
                            if self.take_ahead(&fp).is_some()
                                || self.cache.tier_of(&fp).is_none() =>
                        {
                            Ok(self.admit(disk, map, index, b, Some(fp)))
                        }
                        _ => Ok(b),
                    },
                    Some(Ok(b)) => Ok(b),
                    // A joined flight that failed may have been another disk's, another
                    // generation's or a home's: its failure is not this read's. One whose
                    // leader went away left nothing. Either way: load it here.
                    _ if !mine => {
                        let got = parking_lot::Mutex::new(None);
                        self.load(disk, map, &[(index, fp)], route, &|_, r| {
                            *got.lock() = Some(r);
                        })
                        .await;
                        got.into_inner().unwrap_or_else(|| {
                            Err(Error::State("a block load ended without it".into()))
                        })
                    }
                    _ => Err(Error::State("a block load ended without it".into())),
                }
            }
        });
        let ((), out) = futures::join!(batch, futures::future::join_all(waits));
        out
    }

    /// Loads `blocks` (index, fingerprint if known) from where they come from, handing each
    /// to `done` (with its position in `blocks`) as soon as it is loaded or failed.
    async fn load(
        &self,
        disk: &Disk,
        map: &ContentMap,
        blocks: &[(u64, Option<Fingerprint>)],
        route: Route,
        done: &(dyn Fn(usize, Result<Bytes>) + Send + Sync),
    ) {
        // A flight that finished just before ours began may have filled a block already. This
        // read's miss is counted already: a late hit is not a second lookup.
        // A block whose fingerprint was unknown at this read's lookup may be in the map now
        // (that flight admitted it and left before ours began): look again, or the origin is
        // read twice for it.
        let mut todo = Vec::with_capacity(blocks.len());
        for (k, &(index, fp)) in blocks.iter().enumerate() {
            let hit = match fp.map(BlockRef::Data).or_else(|| map.get(index)) {
                Some(BlockRef::Zero) => Some(self.cache.zero(self.block_len(disk, index))),
                Some(BlockRef::Data(fp)) if route == Route::Member => self
                    .cache
                    .peek(&fp)
                    .or_else(|| self.staged_block(&fp))
                    // A home asked for a block fetched ahead here: left for the read it
                    // was fetched for.
                    .or_else(|| self.ahead.get(&fp)),
                Some(BlockRef::Data(fp)) => {
                    self.cache
                        .get_ram_uncounted(&fp)
                        .map(|(b, _)| b)
                        .or_else(|| {
                            // Keyed by its fingerprint: admitted as verified.
                            self.staged_block(&fp)
                                .or_else(|| self.take_ahead(&fp))
                                .map(|b| self.admit(disk, map, index, b, Some(fp)))
                        })
                }
                None => None,
            };
            match hit {
                Some(b) => done(k, Ok(b)),
                None => todo.push(k),
            }
        }
        if todo.is_empty() {
            return;
        }
        match &disk.remote {
            Some(remote) => {
                self.load_remote(disk, remote, map, blocks, &todo, route, done)
                    .await
            }
            None => {
                self.load_origin(disk, map, blocks, &todo, route, done)
                    .await
            }
        }
    }

    /// Blocks of a shadow from members or the owner, verified there; admitted here.
    #[allow(clippy::too_many_arguments)]
    async fn load_remote(
        &self,
        disk: &Disk,
        remote: &Remote,
        map: &ContentMap,
        blocks: &[(u64, Option<Fingerprint>)],
        todo: &[usize],
        route: Route,
        done: &(dyn Fn(usize, Result<Bytes>) + Send + Sync),
    ) {
        let wants: Vec<Want> = todo
            .iter()
            .map(|&k| Want {
                index: blocks[k].0,
                expected: blocks[k].1,
                len: self.block_len(disk, blocks[k].0),
            })
            .collect();
        let each = |n: usize, r: Result<(Bytes, Source)>| {
            let w = &wants[n];
            let r = match r {
                Ok((bytes, source)) => {
                    self.count_fetched(&bytes, source);
                    Ok(self.admit(disk, map, w.index, bytes, w.expected))
                }
                Err(e) => {
                    self.stats.origin_errors.inc();
                    tracing::warn!(disk = %disk.id, block = w.index, error = %e, "block fetch failed");
                    Err(e)
                }
            };
            done(todo[n], r);
        };
        remote.fetch(&wants, route, &each).await;
    }

    fn count_fetched(&self, bytes: &Bytes, source: Source) {
        let (reads, bytes_read) = match source {
            Source::Owner => (&self.stats.owner_reads, &self.stats.owner_read_bytes),
            Source::Peer => (&self.stats.peer_reads, &self.stats.peer_read_bytes),
        };
        reads.inc();
        bytes_read.add(bytes.len() as u64);
    }

    /// A permit for a read-ahead of `blocks` blocks, if they fit in the read-ahead buffer
    /// beside what it holds and what is in flight; `None`: skip this read-ahead (it never
    /// waits). A buffer full of blocks no read has taken yet would evict them for new ones.
    pub fn ahead_permit(&self, blocks: u64) -> Option<tokio::sync::OwnedSemaphorePermit> {
        // The permits are the buffer's blocks less those in flight.
        let held = self.ahead.weighted_size().div_ceil(self.block_bytes.max(1));
        if held + blocks > self.ahead_permits.available_permits() as u64 {
            return None;
        }
        let p = self
            .ahead_permits
            .clone()
            .try_acquire_many_owned(u32::try_from(blocks).ok()?)
            .ok()?;
        self.stats.read_ahead_asked.add(blocks);
        Some(p)
    }

    /// Fetches blocks `range` of a disk another member owns ahead of a sequential reader
    /// (see [`crate::cluster::ahead`]): the blocks its owner's map knows as data that neither
    /// the cache, the read-ahead buffer nor a load in flight has, from the sources and
    /// verified as a client's read's would be. Each waits in the read-ahead buffer, not the
    /// cache, until a client's read takes and admits it; a read that comes while it is in
    /// flight joins its flight. Returns how many blocks it fetched.
    pub async fn read_ahead(&self, disk: &Disk, range: std::ops::Range<u64>) -> u64 {
        let (Some(remote), Some(map)) = (&disk.remote, disk.serving_map()) else {
            return 0;
        };
        let indices: Vec<u64> = range.filter(|&i| i < remote.blocks()).collect();
        if let Err(e) = remote.fill_map(&map, &indices).await {
            tracing::debug!(disk = %disk.id, error = %e, "owner's content map unavailable; nothing read ahead");
            return 0;
        }
        let here =
            |fp: &Fingerprint| self.cache.tier_of(fp).is_some() || self.ahead.contains_key(fp);
        let mut seats = Vec::new();
        let mut lead = Vec::new();
        let mut wants = Vec::new();
        for index in indices {
            let Some(BlockRef::Data(fp)) = map.get(index) else {
                continue;
            };
            if here(&fp) {
                continue;
            }
            let key = FlightKey::Content(fp);
            let dashmap::Entry::Vacant(v) = self.flights.entry(key) else {
                continue;
            };
            let (tx, rx) = watch::channel(None);
            let flight = v.insert(rx).clone();
            let seat = Seat {
                flights: &self.flights,
                key,
                flight,
            };
            // A read's flight may have admitted it and ended since the look above: the
            // flight just begun ends unsent (its seat takes it out).
            if here(&fp) {
                drop(tx);
                continue;
            }
            seats.push(seat);
            lead.push((fp, tx));
            wants.push(Want {
                index,
                expected: Some(fp),
                len: self.block_len(disk, index),
            });
        }
        if wants.is_empty() {
            return 0;
        }
        let fetched = std::sync::atomic::AtomicU64::new(0);
        remote
            .fetch(&wants, Route::Any, &|n, r| {
                let (fp, tx) = &lead[n];
                let r = r.map(|(bytes, source)| {
                    self.count_fetched(&bytes, source);
                    // In the buffer before the flight ends: a read that comes after it
                    // finds the block there.
                    self.ahead.insert(*fp, bytes.clone());
                    fetched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    bytes
                });
                if let Err(e) = &r {
                    tracing::debug!(disk = %disk.id, block = wants[n].index, error = %e, "block fetch ahead failed");
                }
                tx.send_replace(Some(r));
            })
            .await;
        drop(seats);
        let n = fetched.into_inner();
        self.stats.read_ahead_blocks.add(n);
        n
    }

    /// A block fetched ahead, out of the read-ahead buffer (the caller admits it).
    fn take_ahead(&self, fp: &Fingerprint) -> Option<Bytes> {
        let b = self.ahead.remove(fp)?;
        self.stats.read_ahead_used.inc();
        Some(b)
    }

    /// Blocks of this node's own disk from its origin: each run of adjacent blocks in one read.
    /// For a member ([`Route::Member`]) they are not admitted.
    async fn load_origin(
        &self,
        disk: &Disk,
        map: &ContentMap,
        blocks: &[(u64, Option<Fingerprint>)],
        todo: &[usize],
        route: Route,
        done: &(dyn Fn(usize, Result<Bytes>) + Send + Sync),
    ) {
        let mut runs: Vec<&[usize]> = Vec::new();
        let mut start = 0;
        for n in 1..=todo.len() {
            let split = n == todo.len()
                || blocks[todo[n]].0 != blocks[todo[n - 1]].0 + 1
                || (n - start) as u64 * self.block_bytes >= MAX_IO_BYTES;
            if split {
                runs.push(&todo[start..n]);
                start = n;
            }
        }
        futures::future::join_all(runs.into_iter().map(|run| async move {
            let first = blocks[run[0]].0;
            let offset = first * self.block_bytes;
            let len = (run.len() as u64 * self.block_bytes).min(disk.size - offset) as usize;
            match self.origin_read(disk, offset, len).await {
                Ok(bytes) => {
                    for &k in run {
                        let i = blocks[k].0;
                        let from = ((i - first) * self.block_bytes) as usize;
                        let block = bytes.slice(from..from + self.block_len(disk, i));
                        let block = if route == Route::Member {
                            self.note(map, i, block)
                        } else {
                            self.admit(disk, map, i, block, None)
                        };
                        done(k, Ok(block));
                    }
                }
                Err(e) => {
                    for &k in run {
                        done(k, Err(e.clone()));
                    }
                }
            }
        }))
        .await;
    }

    /// A loaded block into the map and the cache (`verified`: its fingerprint, checked
    /// already); the zero block for zeroes.
    fn admit(
        &self,
        disk: &Disk,
        map: &ContentMap,
        index: u64,
        bytes: Bytes,
        verified: Option<Fingerprint>,
    ) -> Bytes {
        if verified.is_none() && is_zero(&bytes) {
            map.insert(index, BlockRef::Zero);
            return self.cache.zero(bytes.len());
        }
        let fp = verified.unwrap_or_else(|| Fingerprint::of(&bytes));
        // The cache first: a reader that finds the map entry then finds the bytes.
        self.cache.admit(fp, bytes.clone());
        match map.get(index) {
            Some(BlockRef::Data(known)) if known == fp => {}
            known => {
                if known.is_some() {
                    tracing::warn!(disk = %disk.id, block = index, "the origin of an immutable disk changed; serving what it holds now");
                }
                map.insert(index, BlockRef::Data(fp));
            }
        }
        bytes
    }

    /// A block read from this node's origin for a member: into the map if the map does not
    /// know it yet (hashed only then), not into the cache but staged. The member verifies
    /// every block against the map, so one whose origin changed under a sealed disk fails
    /// there.
    fn note(&self, map: &ContentMap, index: u64, bytes: Bytes) -> Bytes {
        // Staged only when hashed here, under the fingerprint it was hashed to.
        let fp = match map.get(index) {
            Some(_) => return bytes,
            None if is_zero(&bytes) => {
                map.insert(index, BlockRef::Zero);
                return self.cache.zero(bytes.len());
            }
            None => Fingerprint::of(&bytes),
        };
        map.insert(index, BlockRef::Data(fp));
        // A copy: the block is a slice of the whole run read, which a staged slice would keep
        // alive beyond what the weigher counts.
        self.staged.insert(fp, Bytes::copy_from_slice(&bytes));
        bytes
    }

    /// Forgets the blocks read for members lately (tests: what [`STAGED_FOR`] does in time).
    pub fn drop_staged(&self) {
        self.staged.invalidate_all();
    }

    /// A block read for members lately, by its fingerprint.
    fn staged_block(&self, fp: &Fingerprint) -> Option<Bytes> {
        let b = self.staged.get(fp)?;
        self.stats.staged_hits.inc();
        Some(b)
    }

    /// Block `index` of an immutable disk if this node's cache holds it now; never reads an
    /// origin or a member.
    pub async fn cached_block(&self, disk: &Disk, index: u64) -> Option<Bytes> {
        let map = disk.serving_map()?;
        if index.checked_mul(self.block_bytes)? >= disk.size {
            return None;
        }
        match map.get(index)? {
            BlockRef::Zero => Some(self.cache.zero(self.block_len(disk, index))),
            BlockRef::Data(fp) => self.cache.get(&fp).await.map(|(b, _)| b),
        }
    }

    async fn origin_read(&self, disk: &Disk, offset: u64, len: usize) -> Result<Bytes> {
        let (reads, bytes_read) = if disk.remote.is_some() {
            (&self.stats.owner_reads, &self.stats.owner_read_bytes)
        } else {
            (&self.stats.origin_reads, &self.stats.origin_read_bytes)
        };
        reads.inc();
        match disk.origin.read_at(offset, len).await {
            Ok(bytes) => {
                bytes_read.add(len as u64);
                Ok(bytes)
            }
            Err(e) => {
                self.stats.origin_errors.inc();
                tracing::warn!(disk = %disk.id, error = %e, "origin read failed");
                Err(e.into())
            }
        }
    }
}

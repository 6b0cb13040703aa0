//! The read path of DESIGN.md, in one place.
//!
//! For disk D, range [offset, offset + len):
//!
//! 1. Unknown disk, a range past the end, or a request above the per-request limit: an error,
//!    nothing else touched. A zero-length range at or before the end reads nothing.
//! 2. D is mutable (or being sealed): read the origin directly; nothing is cached.
//! 3. D is sealed: split the range into blocks. For each block, the content map gives its
//!    fingerprint (or says it is all zero); a cache hit serves it. Otherwise the block is read
//!    from the origin once however many readers want it (single flight per disk block), hashed,
//!    recorded in the content map, admitted to the cache, and handed to every waiter.
//! 4. A range inside one block is a slice of that block's `Bytes` (no copy); a range spanning
//!    blocks is assembled into one buffer (one copy).
//!
//! Architecture invariant: a byte reaches a reader only from the origin or from a cache entry
//! whose fingerprint the content map recorded when that block was read from the origin. An
//! origin error reaches every waiter and leaves nothing behind in the cache or the map.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use tokio::sync::OnceCell;

use crate::cache::fingerprint::is_zero;
use crate::cache::{ContentCache, Fingerprint, Tier};
use crate::disk::{BlockRef, ContentMap, Disk};
use crate::error::{Error, Result};
use crate::origin::Source;
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
        }
    }
}

type Flight = Arc<OnceCell<Result<Bytes>>>;

struct FlightDone<'a> {
    flights: &'a DashMap<(u64, u64, u64), Flight>,
    key: (u64, u64, u64),
    cell: Flight,
}

impl Drop for FlightDone<'_> {
    fn drop(&mut self) {
        // Finished: out. Cancelled: out only if no other waiter still holds the cell (the
        // map's reference, the waiter's own and this guard's make three).
        self.flights.remove_if(&self.key, |_, c| {
            Arc::ptr_eq(c, &self.cell)
                && (self.cell.initialized() || Arc::strong_count(&self.cell) <= 3)
        });
    }
}

/// Serves reads of every disk of a node.
#[derive(Debug)]
pub struct ReadPath {
    cache: ContentCache,
    block_bytes: u64,
    /// In-flight block loads by (disk instance, generation, block): a shadow replaced by a
    /// newer one, or a new generation of a disk, never joins a load of the old one.
    flights: DashMap<(u64, u64, u64), Flight>,
    stats: ReadStats,
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
    /// A read path over `cache`, whose block size it uses.
    pub fn new(cache: ContentCache) -> Self {
        ReadPath {
            block_bytes: u64::from(cache.config().block_bytes),
            cache,
            flights: DashMap::new(),
            stats: ReadStats::new(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    /// Reads `len` bytes at `offset` of `disk`.
    pub async fn read(&self, disk: &Disk, offset: u64, len: u64) -> Result<Bytes> {
        Ok(join(self.read_pieces(disk, offset, len).await?))
    }

    /// [`ReadPath::read`] as the slices of the cached blocks, in order, without assembling
    /// them (a writer that can send several buffers at once copies nothing).
    pub async fn read_pieces(&self, disk: &Disk, offset: u64, len: u64) -> Result<Vec<Bytes>> {
        check_range(disk, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let Some(map) = disk.serving_map() else {
            return Ok(vec![self.origin_read(disk, offset, len as usize).await?]);
        };
        let map = &*map;
        let bs = self.block_bytes;
        let first = offset / bs;
        let last = (offset + len - 1) / bs;
        let head = (offset - first * bs) as usize;
        if first == last {
            let block = self.block(disk, map, first).await?;
            return Ok(vec![block.slice(head..head + len as usize)]);
        }
        let blocks =
            futures::future::join_all((first..=last).map(|i| self.block(disk, map, i))).await;
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

    fn block_len(&self, disk: &Disk, index: u64) -> usize {
        (disk.size - index * self.block_bytes).min(self.block_bytes) as usize
    }

    async fn block(&self, disk: &Disk, map: &ContentMap, index: u64) -> Result<Bytes> {
        match map.get(index) {
            Some(BlockRef::Zero) => {
                self.stats.zero_block_hits.inc();
                return Ok(self.cache.zero(self.block_len(disk, index)));
            }
            Some(BlockRef::Data(fp)) => {
                if let Some((bytes, tier)) = self.cache.get(&fp).await {
                    match tier {
                        Tier::Ssd => &self.stats.ssd_bytes,
                        _ => &self.stats.ram_bytes,
                    }
                    .add(bytes.len() as u64);
                    return Ok(bytes);
                }
            }
            None => self.cache.record_miss(),
        }
        self.fill(disk, map, index).await
    }

    /// Reads a block from the origin, once for all concurrent readers of it.
    async fn fill(&self, disk: &Disk, map: &ContentMap, index: u64) -> Result<Bytes> {
        let key = (disk.instance, disk.generation(), index);
        let cell = match self.flights.entry(key) {
            dashmap::Entry::Occupied(e) => {
                self.stats.single_flight_joins.inc();
                e.get().clone()
            }
            dashmap::Entry::Vacant(v) => v.insert(Arc::new(OnceCell::new())).clone(),
        };
        // Removes the entry however this ends, also when every waiter is cancelled (an entry
        // left behind would live on, keyed by a disk instance that may never come back).
        let _done = FlightDone {
            flights: &self.flights,
            key,
            cell: cell.clone(),
        };
        cell.get_or_init(|| self.load(disk, map, index))
            .await
            .clone()
    }

    async fn load(&self, disk: &Disk, map: &ContentMap, index: u64) -> Result<Bytes> {
        let len = self.block_len(disk, index);
        // A flight that finished just before ours began may have filled the block already.
        match map.get(index) {
            Some(BlockRef::Zero) => return Ok(self.cache.zero(len)),
            Some(BlockRef::Data(fp)) => {
                // This request's miss is counted already: a late hit is not a second lookup.
                if let Some((bytes, _)) = self.cache.get_ram_uncounted(&fp) {
                    return Ok(bytes);
                }
            }
            None => {}
        }
        let bytes = self.block_read(disk, index, len).await?;
        if is_zero(&bytes) {
            map.insert(index, BlockRef::Zero);
            disk.held.insert(index);
            return Ok(self.cache.zero(len));
        }
        let fp = Fingerprint::of(&bytes);
        if let Some(BlockRef::Data(old)) = map.get(index)
            && old != fp
        {
            tracing::warn!(disk = %disk.id, block = index, "the origin of a sealed disk changed; serving what it holds now");
        }
        self.cache.admit(fp, bytes.clone());
        map.insert(index, BlockRef::Data(fp));
        disk.held.insert(index);
        Ok(bytes)
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

    /// One block for the cache, counted by where it came from.
    async fn block_read(&self, disk: &Disk, index: u64, len: usize) -> Result<Bytes> {
        match disk.origin.read_block(index, self.block_bytes, len).await {
            Ok((bytes, source)) => {
                let (reads, bytes_read) = match source {
                    Source::Origin => (&self.stats.origin_reads, &self.stats.origin_read_bytes),
                    Source::Owner => (&self.stats.owner_reads, &self.stats.owner_read_bytes),
                    Source::Peer => (&self.stats.peer_reads, &self.stats.peer_read_bytes),
                };
                reads.inc();
                bytes_read.add(len as u64);
                Ok(bytes)
            }
            Err(e) => {
                self.stats.origin_errors.inc();
                tracing::warn!(disk = %disk.id, block = index, error = %e, "block read failed");
                Err(e.into())
            }
        }
    }

    async fn origin_read(&self, disk: &Disk, offset: u64, len: usize) -> Result<Bytes> {
        let (reads, bytes_read) = if disk.origin.is_remote() {
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

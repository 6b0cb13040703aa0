//! The content cache: one per node, shared by every disk, keyed by fingerprint.
//!
//! Three places an entry can live:
//!
//! ```text
//!   admit (first read) ──► RAM single-touch ──(evicted)──► dropped
//!                               │ second read (metadata only: the Bytes are shared)
//!                               ▼
//!                          RAM multi-touch ──(evicted, proven)──► demotion queue ──► SSD ──(evicted)──► dropped
//!                               ▲    └──(evicted, not proven)──► dropped           │
//!                               └──────── SSD hit number ssd_promote_hits ◄────────┘ (earlier hits:
//!                                          (its slot kept as a copy)                  served, stays)
//! ```
//!
//! The SSD takes only entries whose reuse has reached past RAM ([`SsdAdmission::Proven`]):
//! one that a second read brought to multi-touch while it was still in single-touch is
//! dropped when RAM lets it go, and comes back proven (from the multi-touch ghost) if it is
//! read again soon after.
//!
//! An entry lives in one place. An SSD hit serves the entry from SSD, and moves it to the top
//! of the SSD's order; its `ssd_promote_hits`-th (5 by default) moves it back to the top of RAM
//! multi-touch, and its slot stays as a copy at the least recent end: the first slot reused,
//! not counted as stored, and the entry's home again, with nothing written, if RAM lets it go
//! before then. (Moving every hit back made each hit cost a rewrite later; keeping every copy
//! counted hot blocks twice against capacity.)
//!
//! Demotions are written by one writer thread that drains a bounded queue; until written, a
//! demoted entry stays readable from a small pending map. The cache knows nothing about disks or
//! peers; all-zero blocks never reach it (the read path answers them with [`ContentCache::zero`]).
//!
//! Architecture invariant: no lookup returns bytes that do not hash to the fingerprint asked
//! for. RAM entries are only admitted by callers that hashed the bytes; SSD reads are verified.

pub mod fingerprint;
pub mod pool;
pub mod ram;
pub mod shards;
pub mod ssd;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use bytes::Bytes;
use dashmap::DashMap;

pub use fingerprint::{Fingerprint, FingerprintHashing, mix64};
use pool::Pools;
pub use pool::{Cached, Eviction, PolicyCounters, PolicyState, PoolConfig, Segment};
use ram::{Entry, Value};
use shards::ShardedPools;
pub use ssd::{Recovery, SsdConfig, SsdError, SsdTier};

use crate::telemetry::{self, Count, Tally};

/// SSD hits before an entry moves back to RAM, by default. Before the SSD admission filter,
/// on the P2 tier replay (8,192 RAM + 24,576 SSD pages), 1 wrote 1.05 bytes per byte SSD hits
/// served, 2 wrote 0.64 and 3 wrote 0.47, at 27.29%, 27.31% and 26.86% hits. With it
/// ([`SsdAdmission::Proven`]), OLTP at 2,000 RAM + 3,000 SSD pages wrote 0.50 with 4 and
/// 0.44 with 5, at the same hit ratio (docs/measurements.md).
pub const DEFAULT_SSD_PROMOTE_HITS: u8 = 5;

/// Settings of the content cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Block size in bytes: the largest entry and the SSD slot size. Default: 16 KiB.
    pub block_bytes: u32,
    /// RAM for both pools, in payload bytes. Default: 256 MiB.
    pub ram_bytes: u64,
    /// Fraction of `ram_bytes` the single-touch pool aims at, at start. Default: 0.01.
    pub single_touch_share: f64,
    /// Whether reads of recently evicted keys move the single-touch target. Default: true.
    pub adaptive: bool,
    /// The single-touch target's lower limit, as a fraction of `ram_bytes`. Default: 0.01.
    pub single_touch_min: f64,
    /// The single-touch target's upper limit, as a fraction of `ram_bytes`. Default: 0.5.
    pub single_touch_max: f64,
    /// Evicted keys each ghost remembers, per block a full RAM budget holds. Default: 1.0.
    pub ghost_ratio: f64,
    /// Whether multi-touch entries re-read in RAM get second chances at eviction. Default: true.
    pub second_chances: bool,
    /// Eviction rules to keep, or none to let the pools pick them online by replaying a
    /// sample of the keys under each ([`pool::Variant`]). Default: none.
    pub policy_rules: Option<pool::Variant>,
    /// Shards the RAM pools are split into, each behind its own lock, or 0 to pick by the
    /// capacity and the cores ([`shards::auto_shards`]). Default: 0.
    pub shards: usize,
    /// The SSD tier, or none for a RAM-only cache. Default: none.
    pub ssd: Option<SsdConfig>,
    /// Demotions that may wait for the SSD writer before new ones are dropped. Default: 1024.
    pub demotion_queue: usize,
    /// SSD hits an entry takes, since it was written there, before the next one moves it back
    /// to RAM (1: every SSD hit does). An entry served from SSD stays there and costs no write;
    /// one moved back to RAM is written again when RAM lets it go, unless the copy it left is
    /// still there. Default: 5.
    pub ssd_promote_hits: u8,
    /// Which entries that RAM multi-touch lets go are written to SSD. Default:
    /// [`SsdAdmission::Proven`].
    pub ssd_admission: SsdAdmission,
    /// When the SSD tier's index is read at start. Default: [`SsdLoad::Auto`].
    pub ssd_load: SsdLoad,
}

/// When the SSD tier's index is read at start: reading it takes about 400 ns an entry it
/// recovers (a full 4 TiB tier of 16 KiB blocks, 256 Mi entries, about 100 s on 2 cores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SsdLoad {
    /// Before the node serves for a tier of at most [`SSD_LOAD_BACKGROUND_SLOTS`] slots (at
    /// most about 1.7 s full), in the background for a larger one.
    #[default]
    Auto,
    /// Before the node serves, whatever it takes: the node starts with its SSD's content.
    Wait,
    /// In the background: the node serves at once, its SSD tier holding nothing until the
    /// index is read (reads it would have answered go to origins and peers, and what RAM lets
    /// go meanwhile is dropped, not written).
    Background,
}

/// Slots above which [`SsdLoad::Auto`] reads the SSD index in the background: 4 Mi, a 64 GiB
/// tier of 16 KiB blocks.
pub const SSD_LOAD_BACKGROUND_SLOTS: u32 = 1 << 22;

impl SsdLoad {
    /// The name in the config file.
    pub fn name(self) -> &'static str {
        match self {
            SsdLoad::Auto => "auto",
            SsdLoad::Wait => "wait",
            SsdLoad::Background => "background",
        }
    }

    /// The setting named `name` ([`Self::name`]).
    pub fn from_name(name: &str) -> Option<SsdLoad> {
        [SsdLoad::Auto, SsdLoad::Wait, SsdLoad::Background]
            .into_iter()
            .find(|a| a.name() == name)
    }

    /// Whether a tier of `slots` slots is read in the background.
    pub fn in_background(self, slots: u32) -> bool {
        match self {
            SsdLoad::Auto => slots > SSD_LOAD_BACKGROUND_SLOTS,
            SsdLoad::Wait => false,
            SsdLoad::Background => true,
        }
    }
}

/// Which entries that RAM multi-touch lets go the SSD tier takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SsdAdmission {
    /// Only proven entries ([`pool::Eviction::proven`]): back from SSD, read again after the
    /// pools had let them go (from a ghost), or read four times in RAM. An entry that came to
    /// multi-touch by a second read while still in single-touch, and was read at most once
    /// more, is dropped and leaves its key in the multi-touch ghost: read again while the ghost
    /// remembers it, it comes back proven and is written when RAM next lets it go. With ghosts
    /// off (`ghost_ratio` 0) nothing could come back that way, so every entry is taken.
    ///
    /// Most entries that only a short re-read brought to multi-touch are never read from SSD:
    /// in the OLTP tier replay at 2,000 RAM + 3,000 SSD pages, 82% of them were not. Taking
    /// every entry wrote 1.13 bytes a byte SSD hits served there; this rule writes 0.44, and
    /// hits more on P2 and OLTP, since the SSD keeps what is read again
    /// (docs/measurements.md).
    #[default]
    Proven,
    /// Every entry multi-touch lets go (the rule before the admission filter).
    All,
}

impl SsdAdmission {
    /// The name in the config file.
    pub fn name(self) -> &'static str {
        match self {
            SsdAdmission::Proven => "proven",
            SsdAdmission::All => "all",
        }
    }

    /// The admission named `name` ([`Self::name`]).
    pub fn from_name(name: &str) -> Option<SsdAdmission> {
        [SsdAdmission::Proven, SsdAdmission::All]
            .into_iter()
            .find(|a| a.name() == name)
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            block_bytes: 16 * 1024,
            ram_bytes: 256 * 1024 * 1024,
            single_touch_share: pool::DEFAULT_SINGLE_SHARE,
            adaptive: true,
            single_touch_min: pool::DEFAULT_SHARE_MIN,
            single_touch_max: pool::DEFAULT_SHARE_MAX,
            ghost_ratio: pool::DEFAULT_GHOST_RATIO,
            second_chances: true,
            policy_rules: None,
            shards: 0,
            ssd: None,
            demotion_queue: 1024,
            ssd_promote_hits: DEFAULT_SSD_PROMOTE_HITS,
            ssd_admission: SsdAdmission::Proven,
            ssd_load: SsdLoad::Auto,
        }
    }
}

impl CacheConfig {
    /// The shards the RAM pools are split into: [`Self::shards`], or picked by the capacity
    /// when that is 0.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            return self.shards;
        }
        shards::auto_shards(
            self.ram_bytes / u64::from(self.block_bytes.max(1)),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        )
    }

    /// The RAM pools' settings.
    pub fn pool_config(&self) -> PoolConfig {
        PoolConfig {
            capacity_bytes: self.ram_bytes,
            block_bytes: self.block_bytes,
            single_share: self.single_touch_share,
            adaptive: self.adaptive,
            share_min: self.single_touch_min,
            share_max: self.single_touch_max,
            ghost_ratio: self.ghost_ratio,
            second_chances: self.second_chances,
            fixed_rules: self.policy_rules,
        }
    }
}

/// Where a lookup was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// RAM single-touch pool (the entry is promoted by this hit).
    RamSingle,
    /// RAM multi-touch pool.
    RamMulti,
    /// SSD tier (the entry is copied back to RAM multi-touch by this hit).
    Ssd,
}

impl Tier {
    /// The metric label and status name.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::RamSingle => "ram_single",
            Tier::RamMulti => "ram_multi",
            Tier::Ssd => "ssd",
        }
    }
}

/// Counters of the cache, kept locally and exported as metrics.
#[derive(Debug)]
pub struct CacheStats {
    /// Hits in RAM single-touch.
    pub hits_ram_single: Tally,
    /// Hits in RAM multi-touch.
    pub hits_ram_multi: Tally,
    /// Hits in SSD.
    pub hits_ssd: Count,
    /// Lookups nothing answered.
    pub misses: Count,
    /// Single -> multi moves.
    pub promotions: Tally,
    /// RAM multi -> SSD moves.
    pub demotions: Count,
    /// Drops from single-touch.
    pub evictions_ram_single: Count,
    /// Drops from RAM multi-touch (no SSD tier, not admitted to it, or demotion queue full).
    pub evictions_ram_multi: Count,
    /// Drops from SSD.
    pub evictions_ssd: Count,
    /// SSD slots that failed verification.
    pub ssd_verify_failures: Count,
    /// SSD writes that failed (a full or failing device); the entry was dropped.
    pub ssd_write_failures: Count,
    /// Payload bytes written to SSD slots.
    pub ssd_written_bytes: Count,
    /// Payload bytes SSD hits served.
    pub ssd_served_bytes: Count,
    /// Demotions that wrote nothing: the SSD still kept a copy of the entry from the hit that
    /// took it back to RAM.
    pub ssd_writes_saved: Count,
    /// Entries RAM multi-touch let go that the SSD did not take ([`SsdAdmission::Proven`]).
    pub ssd_admissions_refused: Count,
    /// Admissions of keys the single-touch ghost remembered.
    pub ghost_hits_single: Count,
    /// Admissions of keys the multi-touch ghost remembered.
    pub ghost_hits_multi: Count,
    /// Bytes the cached entries stand for (see [`ram::Entry::logical_bytes`]).
    pub logical_bytes: AtomicU64,
}

impl CacheStats {
    fn new() -> Self {
        use telemetry::*;
        CacheStats {
            hits_ram_single: Tally::new(CACHE_HITS, &[("tier", "ram_single")]),
            hits_ram_multi: Tally::new(CACHE_HITS, &[("tier", "ram_multi")]),
            hits_ssd: Count::new(CACHE_HITS, &[("tier", "ssd")]),
            misses: Count::new(CACHE_MISSES, &[]),
            promotions: Tally::new(PROMOTIONS, &[]),
            demotions: Count::new(DEMOTIONS, &[]),
            evictions_ram_single: Count::new(EVICTIONS, &[("pool", "ram_single")]),
            evictions_ram_multi: Count::new(EVICTIONS, &[("pool", "ram_multi")]),
            evictions_ssd: Count::new(EVICTIONS, &[("pool", "ssd")]),
            ssd_verify_failures: Count::new(SSD_VERIFY_FAILURES, &[]),
            ssd_write_failures: Count::new(SSD_WRITE_FAILURES, &[]),
            ssd_written_bytes: Count::new(SSD_WRITTEN_BYTES, &[]),
            ssd_served_bytes: Count::new(SSD_SERVED_BYTES, &[]),
            ssd_writes_saved: Count::new(SSD_WRITES_SAVED, &[]),
            ssd_admissions_refused: Count::new(SSD_ADMISSIONS_REFUSED, &[]),
            ghost_hits_single: Count::new(GHOST_HITS, &[("ghost", "single")]),
            ghost_hits_multi: Count::new(GHOST_HITS, &[("ghost", "multi")]),
            logical_bytes: AtomicU64::new(0),
        }
    }

    /// Lookups made: hits in every tier plus misses.
    pub fn lookups(&self) -> u64 {
        self.hits_ram_single.get()
            + self.hits_ram_multi.get()
            + self.hits_ssd.get()
            + self.misses.get()
    }

    /// Sets the exported counters of the hot path from their tallies.
    fn publish(&self) {
        self.hits_ram_single.publish();
        self.hits_ram_multi.publish();
        self.promotions.publish();
    }

    fn add_logical(&self, n: u64) {
        self.logical_bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn sub_logical(&self, n: u64) {
        // Saturating: accounting races (an entry dropped while re-admitted) must never wrap.
        let _ = self
            .logical_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    fn ghost_hit(&self, ghost: Option<Segment>) {
        match ghost {
            Some(Segment::Single) => self.ghost_hits_single.inc(),
            Some(Segment::Multi) => self.ghost_hits_multi.inc(),
            None => {}
        }
    }

    fn hit(&self, tier: Tier) {
        match tier {
            Tier::RamSingle => self.hits_ram_single.inc(),
            Tier::RamMulti => self.hits_ram_multi.inc(),
            Tier::Ssd => self.hits_ssd.inc(),
        }
    }
}

/// One tier's occupancy.
#[derive(Debug, Clone, PartialEq)]
pub struct TierUsage {
    /// The tier.
    pub tier: Tier,
    /// Entries held.
    pub entries: u64,
    /// Payload bytes held.
    pub bytes: u64,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Lookups answered here.
    pub hits: u64,
    /// The SSD tier's index is still being read at start ([`SsdLoad`]): the tier holds and
    /// answers nothing until then.
    pub loading: bool,
}

enum WriterMsg {
    Demote(Fingerprint),
    Flush(mpsc::SyncSender<()>),
    Stop,
}

struct Inner {
    config: CacheConfig,
    pools: Arc<ShardedPools>,
    ssd: Option<Arc<SsdTier>>,
    pending: Arc<DashMap<Fingerprint, Value, FingerprintHashing>>,
    writer: Option<mpsc::SyncSender<WriterMsg>>,
    writer_thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    stats: Arc<CacheStats>,
    zero: Bytes,
    /// Whether the SSD takes every entry multi-touch lets go, not only proven ones.
    ssd_takes_all: bool,
}

/// The content cache. Cheap to clone; all clones share one cache.
#[derive(Clone)]
pub struct ContentCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ContentCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentCache")
            .field("config", &self.inner.config)
            .finish()
    }
}

/// Why the cache could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The SSD tier could not be opened.
    #[error(transparent)]
    Ssd(#[from] SsdError),
    /// The writer thread could not be started.
    #[error("could not start an ssd thread (writer or index reader): {0}")]
    Thread(std::io::Error),
}

impl ContentCache {
    /// Builds the cache, opening (and recovering) the SSD tier if one is configured. What the
    /// recovery found, unless there is no SSD tier or its index is read in the background
    /// ([`CacheConfig::ssd_load`]; the log says what it found then).
    pub fn open(config: CacheConfig) -> Result<(ContentCache, Option<Recovery>), CacheError> {
        let stats = Arc::new(CacheStats::new());
        let pools = Arc::new(ShardedPools::new(
            &config.pool_config(),
            config.shard_count(),
        ));
        // Without ghosts nothing could come back proven: the SSD would starve.
        let ssd_takes_all =
            config.ssd_admission == SsdAdmission::All || pools.state().ghost_capacity == 0;

        let (ssd, to_load) = match &config.ssd {
            Some(c) => {
                let (tier, to_load) = SsdTier::open_deferred(c.clone())?;
                (Some(Arc::new(tier)), Some(to_load))
            }
            None => (None, None),
        };
        let pending: Arc<DashMap<Fingerprint, Value, FingerprintHashing>> =
            Arc::new(DashMap::with_hasher(FingerprintHashing::default()));
        let (tx, rx) = mpsc::sync_channel::<WriterMsg>(config.demotion_queue.max(1));
        let writer = ssd.as_ref().map(|_| tx.clone());

        let mut recovery = None;
        if let (Some(tier), Some(to_load)) = (&ssd, to_load) {
            if config.ssd_load.in_background(tier.slot_count()) {
                // Half the cores check headers, so that the node serves meanwhile.
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let load = {
                    let (tier, stats) = (tier.clone(), stats.clone());
                    move || load_ssd(&tier, to_load.on_threads(cores / 2), &stats)
                };
                tracing::info!(
                    slots = tier.slot_count(),
                    "reading the ssd index in the background; the ssd tier holds nothing until then"
                );
                std::thread::Builder::new()
                    .name("shadowcache-ssd-load".into())
                    .spawn(load)
                    .map_err(CacheError::Thread)?;
            } else {
                recovery = Some(load_ssd(tier, to_load, &stats));
            }
        }

        let writer_thread = match (&ssd, writer.is_some()) {
            (Some(tier), true) => {
                let w = Writer {
                    ssd: tier.clone(),
                    pending: pending.clone(),
                    stats: stats.clone(),
                };
                Some(
                    std::thread::Builder::new()
                        .name("shadowcache-ssd-writer".into())
                        .spawn(move || w.run(rx))
                        .map_err(CacheError::Thread)?,
                )
            }
            _ => None,
        };

        let zero = Bytes::from(vec![0u8; config.block_bytes as usize]);
        Ok((
            ContentCache {
                inner: Arc::new(Inner {
                    config,
                    pools,
                    ssd,
                    pending,
                    writer,
                    writer_thread: parking_lot::Mutex::new(writer_thread),
                    stats,
                    zero,
                    ssd_takes_all,
                }),
            },
            recovery,
        ))
    }

    /// The settings the cache was built with.
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// The counters.
    pub fn stats(&self) -> &CacheStats {
        &self.inner.stats
    }

    /// `len` zero bytes, shared: all-zero blocks are answered from here and never stored.
    ///
    /// `len` is at most the block size.
    pub fn zero(&self, len: usize) -> Bytes {
        self.inner.zero.slice(..len.min(self.inner.zero.len()))
    }

    /// Looks `fp` up in RAM only; never blocks. A single-touch hit promotes the entry.
    ///
    /// Counts a hit when found and nothing when not (the caller goes on to [`Self::get`] or
    /// counts a miss), so that one lookup is never counted twice.
    #[inline]
    pub fn get_ram(&self, fp: &Fingerprint) -> Option<(Bytes, Tier)> {
        let hit = self.lookup_ram(fp, true);
        if let Some((_, tier)) = &hit {
            self.inner.stats.hit(*tier);
        }
        hit
    }

    /// The bytes of `fp` if RAM (or the demotion queue) holds them, without touching the entry
    /// or counting a hit: a read that is not this node's clients' (a member fetching through
    /// the owner) says nothing of what this node's clients use.
    #[inline]
    pub fn peek(&self, fp: &Fingerprint) -> Option<Bytes> {
        let inner = &*self.inner;
        if let Some(v) = inner.pools.shard(fp).peek(fp) {
            return Some(v.bytes.clone());
        }
        inner.pending.get(fp).map(|v| v.bytes.clone())
    }

    /// [`Self::get_ram`] without counting the hit, for a second look within one request
    /// whose miss is already counted (a single flight that found the block filled).
    #[inline]
    pub fn get_ram_uncounted(&self, fp: &Fingerprint) -> Option<(Bytes, Tier)> {
        self.lookup_ram(fp, false)
    }

    /// `first`: the request's first look (the pools' duel counts it as an access).
    #[inline]
    fn lookup_ram(&self, fp: &Fingerprint, first: bool) -> Option<(Bytes, Tier)> {
        let inner = &*self.inner;
        let mut shard = inner.pools.shard(fp);
        if first {
            shard.observe(fp);
        }
        let found = shard.get(fp).map(|(v, seg)| (v.bytes.clone(), seg));
        drop(shard);
        if let Some((bytes, seg)) = found {
            let tier = match seg {
                Segment::Multi => Tier::RamMulti,
                Segment::Single => {
                    inner.stats.promotions.inc();
                    Tier::RamSingle
                }
            };
            return Some((bytes, tier));
        }
        if let Some((_, v)) = inner.pending.remove(fp) {
            // Demoted but not yet written: back to the top of multi-touch.
            let bytes = v.bytes.clone();
            inner.insert(*fp, cached(&v, 0), true);
            return Some((bytes, Tier::RamMulti));
        }
        None
    }

    /// Looks `fp` up in every tier. An SSD hit is read on the blocking pool and verified; its
    /// `ssd_promote_hits`-th moves it back to RAM multi-touch. Counts one hit or one miss.
    pub async fn get(&self, fp: &Fingerprint) -> Option<(Bytes, Tier)> {
        self.get_with(fp, false).await
    }

    /// [`Self::get`] for a caller that waits for this block alone (a read of one block): an
    /// SSD hit is read on this thread, which the runtime gives up for the read
    /// (`block_in_place`, on a multi-threaded runtime), rather than on the blocking pool: the
    /// hop there and back cost about a quarter of SSD-hit throughput at queue depth 16 on 2
    /// cores. Blocks that a read joins must use [`Self::get`]: this one would read them one
    /// after another.
    pub async fn get_alone(&self, fp: &Fingerprint) -> Option<(Bytes, Tier)> {
        self.get_with(fp, true).await
    }

    async fn get_with(&self, fp: &Fingerprint, alone: bool) -> Option<(Bytes, Tier)> {
        if let Some(hit) = self.get_ram(fp) {
            return Some(hit);
        }
        let inner = &*self.inner;
        if let Some(ssd) = &inner.ssd
            && let Some(at) = ssd.lookup(fp)
        {
            let read = if alone
                && matches!(
                    tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()),
                    Ok(tokio::runtime::RuntimeFlavor::MultiThread)
                ) {
                Ok(tokio::task::block_in_place(|| ssd.read(fp, at)))
            } else {
                let tier = ssd.clone();
                let key = *fp;
                crate::blocking::run(move || tier.read(&key, at)).await
            };
            match read {
                Ok(ssd::SlotRead::Hit(bytes))
                    if ssd.count_hit(at).saturating_add(1) < inner.config.ssd_promote_hits =>
                {
                    // Served from SSD; the entry stays there (it moves to the top of the
                    // SSD's order), so this hit costs no write later.
                    inner.stats.ssd_served_bytes.add(bytes.len() as u64);
                    inner.stats.hit(Tier::Ssd);
                    return Some((bytes, Tier::Ssd));
                }
                Ok(ssd::SlotRead::Hit(bytes)) => {
                    // Read often enough on SSD: back to RAM. The slot stays as a copy, first in
                    // line for reuse, so that a demotion before then writes nothing.
                    ssd.keep_copy(at);
                    inner.stats.ssd_served_bytes.add(bytes.len() as u64);
                    // Exactly the payload: an O_DIRECT read's buffer is a page larger, and RAM
                    // is counted by payload bytes.
                    let c = Cached {
                        bytes: Bytes::copy_from_slice(&bytes),
                        refs: at.refs.max(1),
                    };
                    inner.insert(*fp, c, true);
                    inner.stats.hit(Tier::Ssd);
                    return Some((bytes, Tier::Ssd));
                }
                Ok(ssd::SlotRead::Corrupt) => {
                    inner.stats.ssd_verify_failures.inc();
                    inner.stats.evictions_ssd.inc();
                    inner.stats.sub_logical(u64::from(at.refs) * at.len());
                }
                Ok(ssd::SlotRead::Reassigned) | Err(_) => {}
            }
        }
        self.record_miss();
        None
    }

    /// Counts a miss that never reached a lookup (the caller did not know the fingerprint).
    pub fn record_miss(&self) {
        self.inner.stats.misses.inc();
    }

    /// Admits `bytes`, read from a trusted source, that hash to `fp`. Never called with an
    /// all-zero block.
    ///
    /// A fingerprint the cache does not hold lands in single-touch. One it holds is being read
    /// again through another disk block (dedup): the entry gains a reference and, being read a
    /// second time, moves to multi-touch.
    pub fn admit(&self, fp: Fingerprint, bytes: Bytes) {
        let inner = &*self.inner;
        inner.stats.add_logical(bytes.len() as u64);
        if inner.add_reference(&mut inner.pools.shard(&fp), &fp) {
            return;
        }
        if let Some((_, v)) = inner.pending.remove(&fp) {
            inner.insert(fp, cached(&v, 1), true);
            return;
        }
        if let Some(ssd) = &inner.ssd
            && let Some(at) = ssd.lookup(&fp)
        {
            // Read again through another disk block: back to RAM multi-touch; the slot stays
            // as a copy.
            ssd.keep_copy(at);
            let refs = at.refs.max(1).saturating_add(1);
            inner.insert(fp, Cached { bytes, refs }, true);
            return;
        }
        // Two readers may admit the same new block at once: the second finds the first's
        // entry (the pools touch it and keep it) and adds its reference to it, so the bytes
        // are counted once per reference.
        let mut pools = inner.pools.shard(&fp);
        if inner.add_reference(&mut pools, &fp) {
            return;
        }
        let placed = pools.insert(fp, Cached { bytes, refs: 1 }, false, &mut |f, v, from| {
            inner.evicted(f, v, from)
        });
        drop(pools);
        inner.stats.ghost_hit(placed.ghost);
    }

    /// Which tier holds `fp` now, without touching anything or counting a lookup (tests,
    /// diagnostics, and read-ahead deciding what to fetch).
    pub fn tier_of(&self, fp: &Fingerprint) -> Option<Tier> {
        let inner = &*self.inner;
        match inner.pools.shard(fp).segment_of(fp) {
            Some(Segment::Multi) => return Some(Tier::RamMulti),
            Some(Segment::Single) => return Some(Tier::RamSingle),
            None => {}
        }
        if inner.pending.contains_key(fp) {
            Some(Tier::RamMulti)
        } else if inner.ssd.as_ref().is_some_and(|s| s.contains(fp)) {
            Some(Tier::Ssd)
        } else {
            None
        }
    }

    /// The RAM pools' policy state: the single-touch target, ghosts, and what adapted.
    pub fn policy(&self) -> PolicyState {
        let st = self.inner.pools.state();
        publish_policy(&st);
        st
    }

    /// Waits until the SSD writer has written every demotion queued so far. Tests and
    /// benchmarks call it to see a settled cache. (The RAM pools evict in the call that
    /// overfills them; there is no deferred work.)
    pub fn settle(&self) {
        self.flush_writer();
    }

    fn flush_writer(&self) {
        if let Some(w) = &self.inner.writer {
            let (tx, rx) = mpsc::sync_channel(1);
            if w.send(WriterMsg::Flush(tx)).is_ok() {
                let _ = rx.recv();
            }
        }
    }

    /// Occupancy and hits of each tier: ram_single, ram_multi, ssd (if configured).
    pub fn usage(&self) -> Vec<TierUsage> {
        let inner = &*self.inner;
        let st = self.policy();
        let (pending_n, pending_bytes) = inner.pending.iter().fold((0u64, 0u64), |(n, b), e| {
            (n + 1, b + e.value().payload_bytes())
        });
        let mut out = vec![
            TierUsage {
                tier: Tier::RamSingle,
                entries: st.single_entries,
                bytes: st.single_bytes,
                capacity_bytes: st.single_target_bytes,
                hits: inner.stats.hits_ram_single.get(),
                loading: false,
            },
            TierUsage {
                tier: Tier::RamMulti,
                entries: st.multi_entries + pending_n,
                bytes: st.multi_bytes + pending_bytes,
                capacity_bytes: st.capacity_bytes.saturating_sub(st.single_target_bytes),
                hits: inner.stats.hits_ram_multi.get(),
                loading: false,
            },
        ];
        if let Some(ssd) = &inner.ssd {
            let (entries, bytes) = ssd.usage();
            out.push(TierUsage {
                tier: Tier::Ssd,
                entries,
                bytes,
                capacity_bytes: ssd.capacity_bytes(),
                hits: inner.stats.hits_ssd.get(),
                loading: !ssd.is_loaded(),
            });
        }
        for t in &out {
            metrics::gauge!(telemetry::STORED_BYTES, "tier" => t.tier.as_str()).set(t.bytes as f64);
            metrics::gauge!(telemetry::ENTRIES, "tier" => t.tier.as_str()).set(t.entries as f64);
            if t.tier == Tier::Ssd {
                metrics::gauge!(telemetry::SSD_LOADING).set(f64::from(u8::from(t.loading)));
            }
        }
        inner.stats.publish();
        metrics::gauge!(telemetry::LOGICAL_BYTES)
            .set(inner.stats.logical_bytes.load(Ordering::Relaxed) as f64);
        out
    }

    /// Payload bytes held by all tiers together.
    pub fn stored_bytes(&self) -> u64 {
        self.usage().iter().map(|t| t.bytes).sum()
    }

    /// Writes the RAM multi-touch entries to SSD (so that a restart finds them warm), waits for
    /// the writer, makes the SSD files durable and stops the writer. Blocks; idempotent. The
    /// SSD admission does not apply here: this is one write of what RAM holds, which a
    /// restart would otherwise lose whole.
    pub fn shutdown(&self) {
        let inner = &*self.inner;
        if let (Some(ssd), Some(w)) = (&inner.ssd, &inner.writer) {
            let multi = inner.pools.multi_entries();
            for (fp, v) in multi {
                if !ssd.contains(&fp) {
                    inner.pending.insert(fp, Entry::new(v.bytes, v.refs));
                    if w.send(WriterMsg::Demote(fp)).is_err() {
                        break;
                    }
                }
            }
            self.flush_writer();
            if let Err(e) = ssd.sync() {
                tracing::warn!(error = %e, "could not sync the ssd tier at shutdown");
            }
            let _ = w.send(WriterMsg::Stop);
        }
        if let Some(t) = inner.writer_thread.lock().take() {
            let _ = t.join();
        }
    }

    /// The SSD tier, if configured (tests and diagnostics).
    pub fn ssd(&self) -> Option<&SsdTier> {
        self.inner.ssd.as_deref()
    }

    /// Where the SSD tier keeps its slots.
    pub fn ssd_path(&self) -> Option<PathBuf> {
        self.inner.ssd.as_ref().map(|s| s.data_path().to_path_buf())
    }
}

impl Inner {
    /// If the RAM pools hold `fp`: another disk block maps to it (one more reference) and it
    /// is read again (touched, promoted from single-touch). Whether they held it.
    fn add_reference(&self, pools: &mut Pools, fp: &Fingerprint) -> bool {
        let Some((v, seg)) = pools.get(fp) else {
            return false;
        };
        v.refs = v.refs.saturating_add(1);
        if seg == Segment::Single {
            self.stats.promotions.inc();
        }
        true
    }

    /// Puts an entry that was read before (back from SSD or the demotion queue) into the RAM
    /// pools.
    fn insert(&self, fp: Fingerprint, v: Cached, known: bool) {
        let placed = self
            .pools
            .shard(&fp)
            .insert(fp, v, known, &mut |f, v, from| self.evicted(f, v, from));
        self.stats.ghost_hit(placed.ghost);
    }

    /// Handles an entry the pools evicted. Runs under a shard's lock, so it never blocks,
    /// does no I/O and never takes a shard's lock. Lock order: a shard, then `pending`;
    /// nothing takes a shard's lock while holding a `pending` guard.
    fn evicted(&self, fp: Fingerprint, v: Cached, ev: Eviction) {
        match (ev.from, &self.writer) {
            (Segment::Single, _) => {
                self.stats.evictions_ram_single.inc();
                self.stats.sub_logical(v.logical_bytes());
            }
            (Segment::Multi, None) => {
                self.stats.evictions_ram_multi.inc();
                self.stats.sub_logical(v.logical_bytes());
            }
            (Segment::Multi, Some(_))
                if self.ssd.as_ref().is_some_and(|s| s.adopt(&fp, v.refs)) =>
            {
                // The SSD kept a copy since the hit that brought the entry to RAM: it is the
                // entry's home again, and nothing is written.
                self.stats.demotions.inc();
                self.stats.ssd_writes_saved.inc();
            }
            (Segment::Multi, Some(_)) if !ev.proven && !self.ssd_takes_all => {
                // Not written: its reuse has not reached past RAM (its key stays in the
                // multi-touch ghost, and a read while there brings it back proven).
                self.stats.ssd_admissions_refused.inc();
                self.stats.evictions_ram_multi.inc();
                self.stats.sub_logical(v.logical_bytes());
            }
            (Segment::Multi, Some(w)) => {
                // The demotion queue's entries are shared with the writer thread.
                let logical = v.logical_bytes();
                self.pending.insert(fp, Entry::new(v.bytes, v.refs));
                if w.try_send(WriterMsg::Demote(fp)).is_err() {
                    // The SSD writer is behind: drop rather than block the reader.
                    self.pending.remove(&fp);
                    self.stats.evictions_ram_multi.inc();
                    self.stats.sub_logical(logical);
                }
            }
        }
    }
}

/// A demoted entry back in the pools' form, with `more` references added.
fn cached(v: &Value, more: u32) -> Cached {
    Cached {
        bytes: v.bytes.clone(),
        refs: v.refs.load(Ordering::Relaxed).saturating_add(more),
    }
}

/// Reads the SSD index [`SsdTier::open_deferred`] left, logs what it found, and counts the
/// recovered entries' bytes: they stand for at least their own bytes (their dedup references
/// were saved at the last clean shutdown). A block read while the index was being read is in
/// RAM as well, an entry of its own on both tiers, until RAM lets it go
/// ([`ssd::Reserve::Stored`]).
fn load_ssd(tier: &SsdTier, pending: ssd::PendingLoad, stats: &CacheStats) -> Recovery {
    let started = std::time::Instant::now();
    // Counted before the entries can be found: an eviction of one then subtracts what was
    // added.
    let rec = tier.load(pending, |bytes| stats.add_logical(bytes));
    let slots = tier.slot_count();
    tracing::info!(
        slots,
        direct = tier.is_direct(),
        index_ram_mib = ssd::index_ram_bytes(u64::from(slots)) >> 20,
        recovered = rec.recovered,
        load_ms = started.elapsed().as_millis() as u64,
        "ssd tier open"
    );
    rec
}

/// Sets the policy gauges from a snapshot.
fn publish_policy(st: &PolicyState) {
    metrics::gauge!(telemetry::SINGLE_TOUCH_TARGET).set(st.single_share());
    metrics::gauge!(telemetry::GHOST_KEYS, "ghost" => "single").set(st.ghost_single as f64);
    metrics::gauge!(telemetry::GHOST_KEYS, "ghost" => "multi").set(st.ghost_multi as f64);
    metrics::counter!(telemetry::SINGLE_TOUCH_TARGET_MOVES, "direction" => "grew")
        .absolute(st.counters.target_grew);
    metrics::counter!(telemetry::SINGLE_TOUCH_TARGET_MOVES, "direction" => "shrank")
        .absolute(st.counters.target_shrank);
    for v in pool::Variant::ALL {
        metrics::gauge!(telemetry::POLICY_RULES, "rules" => v.name())
            .set(f64::from(u8::from(v == st.variant)));
    }
    metrics::counter!(telemetry::POLICY_SWITCHES).absolute(st.counters.variant_switches);
    metrics::gauge!(telemetry::POOL_SHARDS).set(f64::from(st.shards));
}

/// The SSD writer: drains demotions off the read path.
struct Writer {
    ssd: Arc<SsdTier>,
    pending: Arc<DashMap<Fingerprint, Value, FingerprintHashing>>,
    stats: Arc<CacheStats>,
}

impl Writer {
    fn run(self, rx: mpsc::Receiver<WriterMsg>) {
        while let Ok(msg) = rx.recv() {
            match msg {
                WriterMsg::Demote(fp) => self.demote(fp),
                WriterMsg::Flush(done) => {
                    let _ = done.send(());
                }
                WriterMsg::Stop => break,
            }
        }
    }

    fn demote(&self, fp: Fingerprint) {
        // A reader may have taken the entry back to RAM meanwhile: then there is nothing to do.
        let Some(v) = self.pending.get(&fp).map(|e| e.value().clone()) else {
            return;
        };
        let refs = v.refs.load(Ordering::Relaxed);
        let r = match self.ssd.reserve(&fp, refs) {
            ssd::Reserve::Slot(r) => Some(r),
            ssd::Reserve::Stored { held } => {
                // Refreshed, nothing written. A copy kept since an SSD hit was not counted;
                // an entry of its own was, and the two become one with the larger count of
                // references: what they stood for together less the smaller.
                if let Some(held) = held {
                    let len = v.bytes.len() as u64;
                    self.stats.sub_logical(len * u64::from(held.min(refs)));
                }
                self.stats.ssd_writes_saved.inc();
                self.stats.demotions.inc();
                None
            }
            ssd::Reserve::Full => {
                // No slot could be had (every slot is being written, or the index is still
                // being read): the entry is dropped.
                self.stats.evictions_ram_multi.inc();
                self.stats.sub_logical(v.logical_bytes());
                None
            }
        };
        if let Some(r) = r {
            if let Some((elen, erefs)) = r.evicted {
                // A slot evicted for reuse held an entry that lives nowhere else: an entry back
                // in RAM keeps only a copy here, and reusing a copy evicts nothing.
                self.stats.evictions_ssd.inc();
                self.stats.sub_logical(u64::from(elen) * u64::from(erefs));
            }
            if let Err(e) = self.ssd.write(r, fp, &v.bytes, refs) {
                self.stats.ssd_write_failures.inc();
                // A full device fails every write: say so at the 1st, 2nd, 4th, 8th... failure.
                let n = self.stats.ssd_write_failures.get();
                if n.is_power_of_two() {
                    tracing::warn!(error = %e, failures = n, slots_set_aside = self.ssd.retired_slots(), "ssd write failed; entry dropped, and its slot set aside until the next start");
                }
                self.stats.evictions_ram_multi.inc();
                self.stats.sub_logical(v.logical_bytes());
                self.pending.remove_if(&fp, |_, p| Arc::ptr_eq(p, &v));
                return;
            }
            self.stats.ssd_written_bytes.add(v.bytes.len() as u64);
            self.stats.demotions.inc();
        }
        if self
            .pending
            .remove_if(&fp, |_, p| Arc::ptr_eq(p, &v))
            .is_none()
        {
            // A reader took the entry back to RAM while it was being written: the slot is
            // only a copy now.
            if let Some(at) = self.ssd.lookup(&fp) {
                self.ssd.keep_copy(at);
            }
        }
    }
}

#[cfg(test)]
mod tests;

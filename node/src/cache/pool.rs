//! The RAM pools: an LRU single-touch pool and an LRU multi-touch pool sharing one budget, with
//! a ghost of the keys each has recently evicted, and a split between them that adapts online.
//!
//! ```text
//!   first read ──► single-touch (LRU) ──evicted──► ghost S (keys only) ──read again──┐
//!                      │ read again                                                   │
//!                      ▼                                                              ▼
//!                  multi-touch (LRU) ──evicted──► ghost M (keys only) ──read again──► multi-touch
//!                      (to SSD when the cache has one)
//! ```
//!
//! The policy is ARC's idea (Megiddo and Modha, FAST 2003) in the shape of our two pools. The
//! single-touch pool has a target size `p`; when the pools together are over budget, the
//! single-touch pool gives up its least recent entry if it is over `p` (or multi-touch is
//! empty), and the multi-touch pool gives up its least recent entry otherwise. A key read again
//! while in ghost S means single-touch was too small: `p` grows. A key read again while in ghost
//! M means multi-touch was too small: `p` shrinks. `p` stays between configured limits, so a
//! first read always has a single-touch pool to land in and a scan can never take more than the
//! upper limit from multi-touch. A key found in either ghost is admitted straight to
//! multi-touch. The ghosts' sizes follow ARC's bounds, scaled by the ghost ratio.
//!
//! Multi-touch adds a little frequency to recency: a hit there counts a re-read (2 bits), and
//! eviction passes over a least recent entry that has re-reads, spending one (a bounded number
//! of times per eviction). On the ARC paper's traces this is what puts the hit ratio above
//! ARC's (docs/ARCHITECTURE.md has the figures).
//!
//! Those are the tuned rules, one of four [`Variant`]s. No single set of rules holds on every
//! workload family (ARC's and ours lose to LRU on recency patterns and everything LRU-like gets
//! nothing from a loop longer than the cache), so unless the config fixes one, the pools pick
//! the rules online: a duel ([`super::shards`]) of small key-only copies replays a sample of the accesses under
//! each variant and the pools switch to the one that would have hit most, when a sign test
//! says the difference is not noise (docs/cache.md; figures in docs/measurements.md).
//!
//! Why not moka (which served the pools before): moka cannot resize a cache at run time, which
//! the adaptive split needs; its eviction is deferred, so pool sizes overshoot until maintenance
//! runs; and it spends about 300 bytes an entry. This pool keeps one slab of 88-byte slots that hold
//! the entries themselves (bytes, references, u32 links), a table of u32 slot numbers (about 6
//! bytes an entry), and does all its work in the call that causes it. The cache splits the keys over shards of these pools, each behind its own mutex
//! ([`super::shards`]); nothing inside allocates on a hit.
//!
//! Ghosts are lists of 32-bit partial fingerprints: 12-byte nodes (key and u32 links) in a
//! recycled slab, and a table of node numbers; 22 bytes a key measured with the table's load
//! factor. A false match (two fingerprints sharing 32 bits) only sends a block to multi-touch a
//! read early.
//!
//! Architecture invariant: everything happens under one lock in the call that causes it, with no
//! I/O and no allocation on a hit; an evicted entry goes to a closure that never blocks.

use hashbrown::HashTable;

use super::fingerprint::{Fingerprint, FingerprintHashing, mix64};
use bytes::Bytes;
use std::hash::BuildHasher;

const NIL: u32 = u32::MAX;

/// One of the two RAM pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// Read once since it was admitted.
    Single = 0,
    /// Read at least twice (or found in a ghost, or back from SSD).
    Multi = 1,
}

/// Settings of the pools.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Payload bytes both pools may hold together.
    pub capacity_bytes: u64,
    /// The block size: a full cache holds `capacity_bytes / block_bytes` entries, and each ghost
    /// remembers `ghost_ratio` times that many keys.
    pub block_bytes: u32,
    /// The single-touch target at start, as a share of the capacity.
    pub single_share: f64,
    /// Whether ghost hits move the single-touch target.
    pub adaptive: bool,
    /// The lowest single-touch target, as a share of the capacity.
    pub share_min: f64,
    /// The highest single-touch target, as a share of the capacity.
    pub share_max: f64,
    /// Keys each ghost remembers, per entry of a full cache. 0 turns ghosts off.
    pub ghost_ratio: f64,
    /// Whether re-reads in multi-touch earn second chances at eviction.
    pub second_chances: bool,
    /// Eviction rules to keep, or none (the default) to pick them online among the
    /// [`Variant`]s, by replaying a sample of the keys through a small copy of the pools under
    /// each (see [`super::shards`]).
    pub fixed_rules: Option<Variant>,
}

impl PoolConfig {
    /// The defaults for a cache of `capacity_bytes` in blocks of `block_bytes`.
    pub fn new(capacity_bytes: u64, block_bytes: u32) -> Self {
        PoolConfig {
            capacity_bytes,
            block_bytes,
            single_share: DEFAULT_SINGLE_SHARE,
            adaptive: true,
            share_min: DEFAULT_SHARE_MIN,
            share_max: DEFAULT_SHARE_MAX,
            ghost_ratio: DEFAULT_GHOST_RATIO,
            second_chances: true,
            fixed_rules: None,
        }
    }
}

/// Re-reads a multi-touch entry remembers (a 2-bit counter). Each second chance halves the
/// count (rounding down), so one re-read buys one more trip through multi-touch, two or three
/// buy two.
///
/// Spending one re-read a chance (three trips) let entries read often long ago outlive a move
/// of the working set: a shifting working set at 10,000 pages stayed 0.80 points below LRU and
/// P3 at 134,800 pages 1.40 below ARC (halving: 0.57 at 2,500 pages, 1.01). A single chance
/// (0.41, 0.96) cost P2 too much: 0.59 points below LRU at 228,337 pages, 1.2 of its 2.4
/// points over ARC at 32,768 (docs/measurements.md).
pub const MAX_REREADS: u8 = 3;
/// Reads in multi-touch that prove an entry that came up from single-touch
/// ([`Eviction::proven`]). With 1, the OLTP tier replay at 2,000 RAM + 3,000 SSD pages wrote
/// 0.56 bytes a byte SSD hits served (`ssd_promote_hits` 4) and 0.51 (5); with 2, 0.50 and
/// 0.44, at 0.5 points more hits.
pub const PROVING_READS: u8 = 2;
/// Second chances one eviction may give before it takes the least recent entry anyway.
pub const MAX_SECOND_CHANCES: u32 = 64;
/// Default single-touch target at start: the lower limit, as ARC's target starts at zero.
pub const DEFAULT_SINGLE_SHARE: f64 = 0.01;
/// Default lower limit of the single-touch target.
pub const DEFAULT_SHARE_MIN: f64 = 0.01;
/// Default upper limit of the single-touch target.
pub const DEFAULT_SHARE_MAX: f64 = 0.5;
/// The largest ghost ratio the pools accept (larger values are taken as this).
pub const MAX_GHOST_RATIO: f64 = 16.0;
/// Default ghost size per entry of a full cache: ARC's own bound. With 0.9, a loop of between
/// 1.9 and 2 times the cache was never found in a ghost (the LIRS paper's gli trace lost 19.8
/// points to LRU at 894 pages).
pub const DEFAULT_GHOST_RATIO: f64 = 1.0;

/// The eviction rules the pools can run under. Unless [`PoolConfig::fixed_rules`] names one,
/// the pools pick one online by the hits each would have had on a sample of the keys
/// ([`super::shards`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The configured rules: ARC's adaptive split within the configured limits, with second
    /// chances if configured.
    Tuned = 0,
    /// ARC as published: the split free over the whole cache, no second chances.
    Arc = 1,
    /// Plain LRU over both pools: evict whichever pool's least recent entry is older.
    Lru = 2,
    /// For loops longer than the cache: the tuned rules, but a new admission goes to the least
    /// recent end of its pool, except one in [`LOOP_HEAD_EVERY`] to the most recent end
    /// (bimodal insertion, Qureshi et al., ISCA 2007). The pools then keep a stable part of
    /// the loop instead of cycling every block of it out before its turn comes again.
    Loop = 3,
}

impl Variant {
    /// Every variant, in the order of their numbers.
    pub const ALL: [Variant; 4] = [Variant::Tuned, Variant::Arc, Variant::Lru, Variant::Loop];

    /// The name in status, metrics and the bench.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Tuned => "tuned",
            Variant::Arc => "arc",
            Variant::Lru => "lru",
            Variant::Loop => "loop",
        }
    }

    /// The variant named `name` ([`Self::name`]).
    pub fn from_name(name: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// Under [`Variant::Loop`], one admission in this many goes to the most recent end.
pub const LOOP_HEAD_EVERY: u32 = 32;
/// Bytes of one pool slot (the entry's index record, payload not included).
pub const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

/// A cached block as the pools hold it, in the slot itself (no allocation of its own).
#[derive(Debug, Clone)]
pub struct Cached {
    /// The block's bytes; cloning shares them.
    pub bytes: Bytes,
    /// Disk blocks that mapped to this entry while it was cached (dedup accounting).
    pub refs: u32,
}

impl Cached {
    /// Bytes this entry stands for: references times length.
    pub fn logical_bytes(&self) -> u64 {
        u64::from(self.refs) * self.bytes.len() as u64
    }
}

impl Slot {
    /// Bytes the entry counts for in its pool (its length: every linked slot holds a value).
    #[inline]
    fn weight(&self) -> u64 {
        self.value.as_ref().map_or(0, |v| v.bytes.len() as u64)
    }
}

#[derive(Clone)]
struct Slot {
    fp: Fingerprint,
    value: Option<Cached>,
    prev: u32,
    next: u32,
    seg: Segment,
    /// Re-reads while in multi-touch, up to [`MAX_REREADS`], each worth one second chance.
    rereads: u8,
    /// Reads while in multi-touch, up to [`PROVING_READS`], which an entry that came to
    /// multi-touch from a ghost or as `known` starts at ([`Eviction::proven`]).
    proof: u8,
    /// The pools' access count at the entry's last access (wrapping): [`Variant::Lru`] evicts
    /// the older of the two pools' least recent entries. An entry idle for more than 2^32
    /// accesses may look recent; that only sways which pool gives up an entry.
    stamp: u32,
}

#[derive(Debug, Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
    bytes: u64,
    len: u32,
}

const EMPTY: List = List {
    head: NIL,
    tail: NIL,
    bytes: 0,
    len: 0,
};

/// An entry the pools let go, as the closure given to [`Pools::insert`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eviction {
    /// The pool it left.
    pub from: Segment,
    /// Whether it has shown a reuse worth an SSD write: it came to multi-touch from a ghost
    /// (read again after the pools had let it go) or `known` (back from SSD or the demotion
    /// queue), or it was read [`PROVING_READS`] more times while in multi-touch (four reads in
    /// RAM in all: several clients reading one block, as in a boot storm), each after some
    /// other access to its shard (a read right after the entry's last one is the same reader
    /// going on through the block in smaller reads, and proves nothing). An entry that a
    /// second read brought up from single-touch and that was read at most once more has
    /// shown only a reuse that the pools already hold; the cache's SSD admission refuses it.
    pub proven: bool,
}

/// Where [`Pools::insert`] put an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The pool the entry went to.
    pub segment: Segment,
    /// The ghost that remembered its key, if one did.
    pub ghost: Option<Segment>,
}

/// What the pools did since they were built (monotonic counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    /// Admissions whose key was in the single-touch ghost.
    pub ghost_hits_single: u64,
    /// Admissions whose key was in the multi-touch ghost.
    pub ghost_hits_multi: u64,
    /// Times the single-touch target grew.
    pub target_grew: u64,
    /// Times the single-touch target shrank.
    pub target_shrank: u64,
    /// Times the duel changed the running [`Variant`].
    pub variant_switches: u64,
}

/// A snapshot of the pools' state, for status, metrics and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyState {
    /// The single-touch target in bytes.
    pub single_target_bytes: u64,
    /// Its limits.
    pub single_min_bytes: u64,
    /// Its limits.
    pub single_max_bytes: u64,
    /// Capacity of both pools.
    pub capacity_bytes: u64,
    /// Entries and bytes in single-touch.
    pub single_entries: u64,
    /// Bytes in single-touch.
    pub single_bytes: u64,
    /// Entries in multi-touch.
    pub multi_entries: u64,
    /// Bytes in multi-touch.
    pub multi_bytes: u64,
    /// Keys in the single-touch ghost.
    pub ghost_single: u64,
    /// Keys in the multi-touch ghost.
    pub ghost_multi: u64,
    /// Keys each ghost may hold.
    pub ghost_capacity: u64,
    /// Whether the target adapts.
    pub adaptive: bool,
    /// The eviction rules running now.
    pub variant: Variant,
    /// Whether the duel picks them (else they stay fixed).
    pub duel: bool,
    /// Shards the pools are split into (each holds `capacity_bytes / shards`).
    pub shards: u32,
    /// The counters.
    pub counters: PolicyCounters,
}

impl PolicyState {
    /// The single-touch target as a share of the capacity.
    pub fn single_share(&self) -> f64 {
        if self.capacity_bytes == 0 {
            0.0
        } else {
            self.single_target_bytes as f64 / self.capacity_bytes as f64
        }
    }
}

/// The bytes all shards hold together, against the whole cache's capacity: a shard may hold
/// more than its share (up to [`Budget::slack`] more) while the whole is within capacity, so
/// that a working set that just fits the cache fits its shards too, though the keys never
/// split evenly. (With hard shares, a loop of exactly the cache's size missed 3 points in 4
/// shards: the shards that drew more than a quarter of its keys cycled.) A shard evicts for
/// the whole only while it is above its share (letting shards below it evict too cost a loop
/// of twice the cache 3 to 5 points in 2 shards under the duel), so the whole may be over by a block a shard until
/// the next admission in a shard above its share.
#[derive(Debug)]
pub struct Budget {
    /// The whole cache's capacity in bytes.
    pub capacity: u64,
    /// Bytes held by all shards.
    pub used: std::sync::atomic::AtomicU64,
}

impl Budget {
    /// A shard holds at most its share plus this fraction of it.
    pub const fn slack() -> f64 {
        0.0625
    }
}

/// The two pools of one shard. Not synchronised: the cache keeps each shard behind a mutex.
pub struct Pools {
    slots: Vec<Slot>,
    free: u32,
    table: HashTable<u32>,
    hashing: FingerprintHashing,
    lists: [List; 2],
    capacity: u64,
    target: u64,
    target_min: u64,
    target_max: u64,
    adaptive: bool,
    ghosts: [Ghost; 2],
    /// Entries a full cache holds (capacity over block size).
    entries: usize,
    /// Keys each ghost may hold.
    ghost_capacity: usize,
    second_chances: bool,
    counters: PolicyCounters,
    /// The configured upper limit of the single-touch target and second-chance setting,
    /// which [`Variant::Tuned`] and [`Variant::Loop`] use.
    tuned_max: u64,
    tuned_second_chances: bool,
    variant: Variant,
    /// Accesses so far (wrapping): the entries' stamps.
    clock: u32,
    /// Admissions under [`Variant::Loop`], for its one-in-[`LOOP_HEAD_EVERY`].
    loop_admissions: u32,
    /// The whole cache's budget when these pools are one shard of several, and the most this
    /// shard may hold then (its share plus the slack); `capacity` otherwise.
    budget: Option<std::sync::Arc<Budget>>,
    hard_capacity: u64,
}

/// A clone stands alone: it holds what the original holds, under the same rules, but shares
/// no budget (its bytes would count in the original's). The duel's trial is one
/// ([`super::shards`]).
impl Clone for Pools {
    fn clone(&self) -> Self {
        Pools {
            slots: self.slots.clone(),
            free: self.free,
            table: self.table.clone(),
            hashing: self.hashing,
            lists: self.lists,
            capacity: self.capacity,
            target: self.target,
            target_min: self.target_min,
            target_max: self.target_max,
            adaptive: self.adaptive,
            ghosts: self.ghosts.clone(),
            entries: self.entries,
            ghost_capacity: self.ghost_capacity,
            second_chances: self.second_chances,
            counters: self.counters,
            tuned_max: self.tuned_max,
            tuned_second_chances: self.tuned_second_chances,
            variant: self.variant,
            clock: self.clock,
            loop_admissions: self.loop_admissions,
            budget: None,
            hard_capacity: self.capacity,
        }
    }
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools")
            .field("state", &self.state())
            .finish()
    }
}

fn clamp_share(x: f64) -> f64 {
    if x.is_finite() {
        x.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

impl Pools {
    /// Empty pools.
    pub fn new(config: &PoolConfig) -> Self {
        let cap = config.capacity_bytes;
        // f64 rounding may land a share of a huge capacity just above it.
        let of = |share: f64| ((cap as f64 * clamp_share(share)) as u64).min(cap);
        let target_min = of(config.share_min);
        let target_max = of(config.share_max).max(target_min);
        let target = of(config.single_share).clamp(target_min, target_max);
        let entries = cap / u64::from(config.block_bytes.max(1));
        let ratio = if config.ghost_ratio.is_finite() {
            config.ghost_ratio.clamp(0.0, MAX_GHOST_RATIO)
        } else {
            0.0
        };
        let ghost_keys = (entries as f64 * ratio) as usize;
        let hashing = FingerprintHashing::default();
        let seed = hashing.hash_one(0x6057_u64);
        let mut pools = Pools {
            slots: Vec::new(),
            free: NIL,
            table: HashTable::new(),
            hashing,
            lists: [EMPTY; 2],
            capacity: cap,
            target,
            target_min,
            target_max,
            adaptive: config.adaptive,
            ghosts: [Ghost::new(ghost_keys, seed), Ghost::new(ghost_keys, seed)],
            entries: entries as usize,
            ghost_capacity: ghost_keys,
            second_chances: config.second_chances,
            counters: PolicyCounters::default(),
            tuned_max: target_max,
            tuned_second_chances: config.second_chances,
            variant: Variant::Tuned,
            clock: 0,
            loop_admissions: 0,
            budget: None,
            hard_capacity: cap,
        };
        pools.set_variant(config.fixed_rules.unwrap_or(Variant::Tuned));
        pools
    }

    /// Makes these pools one shard of several sharing `budget`: they may hold up to their
    /// capacity plus [`Budget::slack`] of it while all shards together are within the budget.
    pub fn share(&mut self, budget: std::sync::Arc<Budget>) {
        let extra = (self.capacity as f64 * Budget::slack()) as u64;
        self.hard_capacity = self.capacity.saturating_add(extra);
        self.budget = Some(budget);
    }

    /// Whether eviction must go on: over this shard's own bound, or the whole cache over its
    /// budget while this shard holds something besides the entry being admitted (`incoming`
    /// bytes).
    #[inline]
    fn over(&self, incoming: u64) -> bool {
        let own = self.lists[0].bytes + self.lists[1].bytes;
        if own > self.hard_capacity {
            return true;
        }
        match &self.budget {
            Some(b) => {
                own > self.capacity
                    && own > incoming
                    && b.used.load(std::sync::atomic::Ordering::Relaxed) > b.capacity
            }
            None => false,
        }
    }

    /// Counts `bytes` in (positive) or out of the shared budget.
    #[inline]
    fn account(&self, bytes: u64, added: bool) {
        if let Some(b) = &self.budget {
            if added {
                b.used
                    .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
            } else {
                b.used
                    .fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// The rules running now.
    #[inline]
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Runs the pools under `variant` from now on (what they hold stays).
    ///
    /// A switch to [`Variant::Lru`] puts each pool back in the order of its entries' last
    /// accesses: LRU compares the two pools' least recent entries by their access stamps, which
    /// is LRU only while each pool is in stamp order, and second chances (moved to the top
    /// without an access) and the loop rules (new entries at the least recent end) leave pools
    /// that are not. One sort per pool per switch, under the shard's lock; switches are rare
    /// (each doubles the duel's margin).
    pub fn set_variant(&mut self, variant: Variant) {
        let was = self.variant;
        self.variant = variant;
        if was != variant && variant == Variant::Lru {
            self.restore_recency(Segment::Single);
            self.restore_recency(Segment::Multi);
        }
        let (max, chances) = match variant {
            Variant::Tuned | Variant::Loop => (self.tuned_max, self.tuned_second_chances),
            Variant::Arc | Variant::Lru => (self.capacity, false),
        };
        self.target_max = max.max(self.target_min);
        self.target = self.target.min(self.target_max);
        self.second_chances = chances;
    }

    #[inline]
    fn hash(&self, fp: &Fingerprint) -> u64 {
        self.hashing.hash_one(fp)
    }

    #[inline]
    fn find(&self, fp: &Fingerprint) -> Option<u32> {
        self.find_hashed(fp, self.hash(fp))
    }

    #[inline]
    fn find_hashed(&self, fp: &Fingerprint, h: u64) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(h, |&i| slots[i as usize].fp == *fp)
            .copied()
    }

    /// Looks `fp` up. A hit moves the entry to the top of multi-touch (a single-touch hit is a
    /// promotion) and returns the pool it was found in.
    #[inline]
    pub fn get(&mut self, fp: &Fingerprint) -> Option<(&mut Cached, Segment)> {
        let h = self.hash(fp);
        self.touch(fp, h)
    }

    #[inline]
    fn touch(&mut self, fp: &Fingerprint, h: u64) -> Option<(&mut Cached, Segment)> {
        let i = self.find_hashed(fp, h)?;
        self.touch_at(i)
    }

    #[inline]
    fn touch_at(&mut self, i: u32) -> Option<(&mut Cached, Segment)> {
        self.clock = self.clock.wrapping_add(1);
        let last = std::mem::replace(&mut self.slots[i as usize].stamp, self.clock);
        let seg = self.slots[i as usize].seg;
        if seg == Segment::Multi {
            let s = &mut self.slots[i as usize];
            // A read right after the entry's last one, with no other access to this shard in
            // between, is the same reader going on (smaller reads within one block): it
            // proves nothing.
            if self.clock.wrapping_sub(last) > 1 {
                s.proof = (s.proof + 1).min(PROVING_READS);
            }
            if self.second_chances {
                s.rereads = (s.rereads + 1).min(MAX_REREADS);
            }
        }
        if !(seg == Segment::Multi && self.lists[1].head == i) {
            self.unlink(i);
            self.push_front(Segment::Multi, i);
        }
        let v = self.slots[i as usize].value.as_mut()?;
        Some((v, seg))
    }

    /// The entry of `fp`, without touching it.
    #[inline]
    pub fn peek(&self, fp: &Fingerprint) -> Option<&Cached> {
        let i = self.find(fp)?;
        self.slots[i as usize].value.as_ref()
    }

    /// Which pool holds `fp`, without touching it.
    pub fn segment_of(&self, fp: &Fingerprint) -> Option<Segment> {
        self.find(fp).map(|i| self.slots[i as usize].seg)
    }

    /// Whether a ghost remembers `fp`.
    pub fn in_ghost(&self, fp: &Fingerprint) -> Option<Segment> {
        let k = ghost_key(fp);
        if self.ghosts[0].contains(k) {
            Some(Segment::Single)
        } else if self.ghosts[1].contains(k) {
            Some(Segment::Multi)
        } else {
            None
        }
    }

    /// Admits `fp` (which the pools do not hold) and evicts what the budget requires, handing
    /// each evicted entry to `evicted` with the pool it left.
    ///
    /// The entry goes to multi-touch when `known` (it was read before: a dedup hit, or back
    /// from SSD or the demotion queue) or when a ghost remembers it; otherwise to single-touch.
    /// A ghost hit moves the single-touch target. Returns where the entry went and which ghost
    /// remembered it. If the pools already hold `fp`, the entry is touched as by [`Self::get`]
    /// and `value` dropped.
    pub fn insert(
        &mut self,
        fp: Fingerprint,
        value: Cached,
        known: bool,
        evicted: &mut impl FnMut(Fingerprint, Cached, Eviction),
    ) -> Placement {
        let weight = u32::try_from(value.bytes.len()).unwrap_or(u32::MAX);
        let h = self.hash(&fp);
        if let Some(i) = self.find_hashed(&fp, h) {
            // Another reader put it back first: keep one entry, and the references of both
            // (and what `known` proves).
            if known {
                self.slots[i as usize].proof = PROVING_READS;
            }
            if let Some((existing, _)) = self.touch_at(i) {
                existing.refs = existing.refs.saturating_add(value.refs);
            }
            return Placement {
                segment: Segment::Multi,
                ghost: None,
            };
        }
        let key = ghost_key(&fp);
        let ghost = if self.ghosts[0].remove(key) {
            self.counters.ghost_hits_single += 1;
            self.adapt(Segment::Single, weight);
            Some(Segment::Single)
        } else if self.ghosts[1].remove(key) {
            self.counters.ghost_hits_multi += 1;
            self.adapt(Segment::Multi, weight);
            Some(Segment::Multi)
        } else {
            None
        };
        let seg = if known || ghost.is_some() {
            Segment::Multi
        } else {
            Segment::Single
        };
        let proof = if seg == Segment::Multi {
            PROVING_READS
        } else {
            0
        };
        let i = self.alloc(fp, value, seg, proof);
        let slots = &self.slots;
        let hashing = &self.hashing;
        self.table
            .insert_unique(h, i, |&j| hashing.hash_one(slots[j as usize].fp));
        let at_least_recent_end = self.variant == Variant::Loop && !known && {
            self.loop_admissions = self.loop_admissions.wrapping_add(1);
            !self.loop_admissions.is_multiple_of(LOOP_HEAD_EVERY)
        };
        if at_least_recent_end {
            self.push_back(seg, i);
        } else {
            self.push_front(seg, i);
        }
        // As in ARC, the choice of victim looks at single-touch without the entry just
        // admitted, and a re-read from the multi-touch ghost breaks a tie at the target in
        // multi-touch's favour.
        self.account(u64::from(weight), true);
        self.evict(
            (i, weight),
            seg == Segment::Single,
            ghost == Some(Segment::Multi),
            evicted,
        );
        Placement {
            segment: seg,
            ghost,
        }
    }

    /// ARC's adaptation: a ghost hit in `ghost` moves the target towards that pool, by the
    /// entry's weight times the ratio of the other ghost's size to this one's (at least 1).
    fn adapt(&mut self, ghost: Segment, weight: u32) {
        if !self.adaptive {
            return;
        }
        let (this, other) = match ghost {
            Segment::Single => (self.ghosts[0].len, self.ghosts[1].len),
            Segment::Multi => (self.ghosts[1].len, self.ghosts[0].len),
        };
        // `this` no longer counts the key just hit; ARC's ratio does.
        let ratio = (other / (this + 1)).max(1) as u64;
        let step = u64::from(weight).saturating_mul(ratio);
        match ghost {
            Segment::Single => {
                let t = self.target.saturating_add(step).min(self.target_max);
                if t != self.target {
                    self.counters.target_grew += 1;
                }
                self.target = t;
            }
            Segment::Multi => {
                let t = self.target.saturating_sub(step).max(self.target_min);
                if t != self.target {
                    self.counters.target_shrank += 1;
                }
                self.target = t;
            }
        }
    }

    /// Evicts while [`Self::over`]. `incoming` is the entry just admitted (slot and weight):
    /// eviction stops rather than take it for the shared budget, and, when it went to
    /// single-touch (`single`), the choice of pool looks at single-touch without it.
    fn evict(
        &mut self,
        incoming: (u32, u32),
        single: bool,
        from_multi_ghost: bool,
        evicted: &mut impl FnMut(Fingerprint, Cached, Eviction),
    ) {
        loop {
            let (i, w) = incoming;
            // The entry being admitted, while it is still there.
            let held = if self.slots[i as usize].value.is_some() {
                u64::from(w)
            } else {
                0
            };
            if !self.over(held) {
                break;
            }
            // Single-touch without the entry being admitted.
            let t1 = if single {
                self.lists[0].bytes.saturating_sub(held)
            } else {
                self.lists[0].bytes
            };
            let (s_tail, m_tail) = (self.lists[0].tail, self.lists[1].tail);
            let from = if self.variant == Variant::Lru && s_tail != NIL && m_tail != NIL {
                // Plain LRU: the older of the two least recent entries.
                let age = |i: u32| self.clock.wrapping_sub(self.slots[i as usize].stamp);
                if age(s_tail) >= age(m_tail) {
                    Segment::Single
                } else {
                    Segment::Multi
                }
            } else if self.lists[0].len > 0
                && (t1 > self.target
                    || (from_multi_ghost && t1 == self.target)
                    || self.lists[1].len == 0)
            {
                Segment::Single
            } else {
                Segment::Multi
            };
            let mut i = self.lists[from as usize].tail;
            if i == NIL {
                break;
            }
            if from == Segment::Multi {
                // Second chances: a least recent entry that was re-read while in multi-touch
                // keeps half its re-reads, rounded down, and goes back to the top
                // ([`MAX_REREADS`]). Bounded per eviction, so one eviction never walks the
                // whole pool under the lock.
                //
                // Entries keep the re-reads banked under rules that give chances. The ARC
                // rules spend them (they bank none, so they run out; dropping them instead
                // cost P6 at 17,098 pages 0.7 points, its duel switching 15 times). The LRU
                // rules must not: a chance moves an entry read long ago above entries read
                // since, and LRU would let those go first (docs/measurements.md).
                let spend = self.variant != Variant::Lru;
                let mut chances = 0;
                while spend && self.slots[i as usize].rereads > 0 && chances < MAX_SECOND_CHANCES {
                    self.slots[i as usize].rereads /= 2;
                    self.unlink(i);
                    self.push_front(Segment::Multi, i);
                    i = self.lists[1].tail;
                    chances += 1;
                }
            }
            let proven = self.slots[i as usize].proof >= PROVING_READS;
            let (fp, v) = self.remove_slot(i);
            self.ghosts[from as usize].insert(ghost_key(&fp));
            if let Some(v) = v {
                evicted(fp, v, Eviction { from, proven });
            }
        }
        // ARC's directory bounds, in entries of a full cache (c) times the ghost ratio (g):
        // single-touch and its ghost together hold at most g*c keys, and all four at most
        // (1+g)*c. So the multi-touch ghost is large only while single-touch is large, and
        // the two ghosts' sizes say which pool is starved.
        let c = self.ghost_capacity;
        let t1 = self.lists[0].len as usize;
        let t2 = self.lists[1].len as usize;
        self.ghosts[0].trim(c.saturating_sub(t1));
        let b1 = self.ghosts[0].len;
        self.ghosts[1].trim(c.saturating_add(self.entries).saturating_sub(t1 + t2 + b1));
    }

    fn remove_slot(&mut self, i: u32) -> (Fingerprint, Option<Cached>) {
        self.account(self.slots[i as usize].weight(), false);
        self.unlink(i);
        let fp = self.slots[i as usize].fp;
        let h = self.hash(&fp);
        if let Ok(e) = self.table.find_entry(h, |&j| j == i) {
            e.remove();
        }
        let s = &mut self.slots[i as usize];
        let v = s.value.take();
        s.next = self.free;
        self.free = i;
        (fp, v)
    }

    /// The multi-touch entries, most recent first (for a shutdown that writes them to SSD).
    pub fn multi_entries(&self) -> Vec<(Fingerprint, Cached)> {
        let mut out = Vec::with_capacity(self.lists[1].len as usize);
        let mut i = self.lists[1].head;
        while i != NIL {
            let s = &self.slots[i as usize];
            if let Some(v) = &s.value {
                out.push((s.fp, v.clone()));
            }
            i = s.next;
        }
        out
    }

    /// The pools' state.
    pub fn state(&self) -> PolicyState {
        PolicyState {
            single_target_bytes: self.target,
            single_min_bytes: self.target_min,
            single_max_bytes: self.target_max,
            capacity_bytes: self.capacity,
            single_entries: u64::from(self.lists[0].len),
            single_bytes: self.lists[0].bytes,
            multi_entries: u64::from(self.lists[1].len),
            multi_bytes: self.lists[1].bytes,
            ghost_single: self.ghosts[0].len as u64,
            ghost_multi: self.ghosts[1].len as u64,
            ghost_capacity: self.ghosts[0].capacity as u64,
            adaptive: self.adaptive,
            variant: self.variant,
            duel: false,
            shards: 1,
            counters: self.counters,
        }
    }

    fn alloc(&mut self, fp: Fingerprint, value: Cached, seg: Segment, proof: u8) -> u32 {
        self.clock = self.clock.wrapping_add(1);
        let slot = Slot {
            stamp: self.clock,
            fp,
            value: Some(value),
            prev: NIL,
            next: NIL,
            seg,
            rereads: 0,
            proof,
        };
        if self.free != NIL {
            let i = self.free;
            self.free = self.slots[i as usize].next;
            self.slots[i as usize] = slot;
            i
        } else {
            // Slot numbers are u32: four billion entries is far beyond any RAM budget.
            let i = self.slots.len() as u32;
            self.slots.push(slot);
            i
        }
    }

    #[inline]
    fn unlink(&mut self, i: u32) {
        let (prev, next, seg, w) = {
            let s = &self.slots[i as usize];
            (s.prev, s.next, s.seg, s.weight())
        };
        let l = &mut self.lists[seg as usize];
        if prev == NIL {
            l.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            l.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
        l.len -= 1;
        l.bytes -= w;
    }

    /// Puts `seg`'s entries in the order of their last accesses, the least recent at the
    /// tail (stamps compared as ages from the clock, so a wrapped clock orders them right).
    fn restore_recency(&mut self, seg: Segment) {
        let mut order = Vec::with_capacity(self.lists[seg as usize].len as usize);
        let mut i = self.lists[seg as usize].head;
        while i != NIL {
            order.push(i);
            i = self.slots[i as usize].next;
        }
        let clock = self.clock;
        let slots = &self.slots;
        // The oldest first: each goes to the front, so the newest ends at the head.
        order.sort_by_key(|&i| std::cmp::Reverse(clock.wrapping_sub(slots[i as usize].stamp)));
        self.lists[seg as usize] = EMPTY;
        for i in order {
            self.push_front(seg, i);
        }
    }

    #[inline]
    fn push_back(&mut self, seg: Segment, i: u32) {
        let l = &mut self.lists[seg as usize];
        let old = l.tail;
        {
            let s = &mut self.slots[i as usize];
            s.prev = old;
            s.next = NIL;
            s.seg = seg;
        }
        if old == NIL {
            l.head = i;
        } else {
            self.slots[old as usize].next = i;
        }
        l.tail = i;
        l.len += 1;
        l.bytes += self.slots[i as usize].weight();
    }

    #[inline]
    fn push_front(&mut self, seg: Segment, i: u32) {
        let l = &mut self.lists[seg as usize];
        let old = l.head;
        {
            let s = &mut self.slots[i as usize];
            s.prev = NIL;
            s.next = old;
            s.seg = seg;
        }
        if old == NIL {
            l.tail = i;
        } else {
            self.slots[old as usize].prev = i;
        }
        l.head = i;
        l.len += 1;
        l.bytes += self.slots[i as usize].weight();
    }
}

#[inline]
fn ghost_key(fp: &Fingerprint) -> u32 {
    let b = &fp.0;
    u32::from_le_bytes([b[8], b[9], b[10], b[11]])
}

/// A keyed mix: ghost keys come from block contents, which a guest controls.
#[inline]
fn ghost_hash(seed: u64, key: u32) -> u64 {
    mix64(u64::from(key) ^ seed)
}

/// A bounded set of recently evicted keys in eviction order: a slab of 12-byte nodes (key and
/// u32 links) forming a list from newest to oldest, and a table of node numbers by key. A hit
/// unlinks its key; inserting beyond the bound, or trimming, forgets the oldest keys.
#[derive(Clone)]
struct Ghost {
    nodes: Vec<GhostNode>,
    table: HashTable<u32>,
    free: u32,
    newest: u32,
    oldest: u32,
    len: usize,
    capacity: usize,
    seed: u64,
}

#[derive(Clone, Copy)]
struct GhostNode {
    key: u32,
    newer: u32,
    older: u32,
}

/// Bytes of one ghost node (the table adds about 5 more, over its load factor).
pub const GHOST_NODE_BYTES: usize = std::mem::size_of::<GhostNode>();

impl Ghost {
    fn new(capacity: usize, seed: u64) -> Self {
        Ghost {
            nodes: Vec::new(),
            table: HashTable::new(),
            free: NIL,
            newest: NIL,
            oldest: NIL,
            len: 0,
            capacity,
            seed,
        }
    }

    #[inline]
    fn hash(&self, key: u32) -> u64 {
        ghost_hash(self.seed, key)
    }

    fn contains(&self, key: u32) -> bool {
        let nodes = &self.nodes;
        self.table
            .find(self.hash(key), |&i| nodes[i as usize].key == key)
            .is_some()
    }

    fn unlink(&mut self, i: u32) {
        let GhostNode { newer, older, .. } = self.nodes[i as usize];
        if newer == NIL {
            self.newest = older;
        } else {
            self.nodes[newer as usize].older = older;
        }
        if older == NIL {
            self.oldest = newer;
        } else {
            self.nodes[older as usize].newer = newer;
        }
        self.nodes[i as usize].older = self.free;
        self.free = i;
        self.len -= 1;
    }

    /// Forgets `key`; true if it was remembered.
    fn remove(&mut self, key: u32) -> bool {
        if self.len == 0 {
            return false;
        }
        let h = self.hash(key);
        let nodes = &self.nodes;
        match self.table.find_entry(h, |&i| nodes[i as usize].key == key) {
            Ok(e) => {
                let (i, _) = e.remove();
                self.unlink(i);
                true
            }
            Err(_) => false,
        }
    }

    /// Forgets the oldest key.
    fn pop_oldest(&mut self) {
        let i = self.oldest;
        if i == NIL {
            return;
        }
        let h = self.hash(self.nodes[i as usize].key);
        if let Ok(e) = self.table.find_entry(h, |&j| j == i) {
            e.remove();
        }
        self.unlink(i);
    }

    /// Forgets the oldest keys until at most `n` remain.
    fn trim(&mut self, n: usize) {
        while self.len > n {
            self.pop_oldest();
        }
    }

    fn insert(&mut self, key: u32) {
        if self.capacity == 0 {
            return;
        }
        // A 32-bit key can repeat (two fingerprints sharing those bits): keep one, the newest.
        self.remove(key);
        if self.len >= self.capacity {
            self.pop_oldest();
        }
        let node = GhostNode {
            key,
            newer: NIL,
            older: self.newest,
        };
        let i = if self.free != NIL {
            let i = self.free;
            self.free = self.nodes[i as usize].older;
            self.nodes[i as usize] = node;
            i
        } else {
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        };
        if self.newest == NIL {
            self.oldest = i;
        } else {
            self.nodes[self.newest as usize].newer = i;
        }
        self.newest = i;
        self.len += 1;
        let h = self.hash(key);
        let (nodes, seed) = (&self.nodes, self.seed);
        self.table
            .insert_unique(h, i, |&j| ghost_hash(seed, nodes[j as usize].key));
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    const B: u32 = 4096;

    /// Key `n`: the fingerprint of its number's bytes (the pools never see those bytes).
    fn fp(n: u64) -> Fingerprint {
        Fingerprint::of(&n.to_le_bytes())
    }

    /// Pools under the tuned rules (most tests here are of those rules; the duel's tests are
    /// in [`super::super::shards`]).
    fn pools(blocks: u64) -> Pools {
        Pools::new(&PoolConfig {
            fixed_rules: Some(Variant::Tuned),
            ..PoolConfig::new(blocks * u64::from(B), B)
        })
    }

    /// Hits of `keys` read in order through `p`.
    fn hits(p: &mut Pools, keys: impl IntoIterator<Item = u64>) -> u64 {
        keys.into_iter()
            .map(|k| u64::from(read(p, k).is_some()))
            .sum()
    }

    #[test]
    fn lru_rules_evict_the_least_recent_entry_of_either_pool() {
        let mut p = Pools::new(&PoolConfig {
            fixed_rules: Some(Variant::Lru),
            ..PoolConfig::new(3 * u64::from(B), B)
        });
        // a, b land in single-touch; a read again goes to multi-touch; c fills the cache.
        for k in [1, 2, 1, 3] {
            read(&mut p, k);
        }
        // d: the least recent entry is b (single-touch), not a.
        read(&mut p, 4);
        assert_eq!(p.segment_of(&fp(2)), None);
        assert_eq!(p.segment_of(&fp(1)), Some(Segment::Multi));
        // e: now a (multi-touch, last read before c and d) is the least recent: LRU takes it
        // though it was read twice, where the tuned rules would take c from single-touch.
        read(&mut p, 5);
        assert_eq!(p.segment_of(&fp(1)), None);
        assert!(p.segment_of(&fp(3)).is_some() && p.segment_of(&fp(4)).is_some());
    }

    #[test]
    fn after_a_switch_from_rules_with_chances_the_lru_rules_are_exactly_lru() {
        use rand::{Rng, SeedableRng};
        let c = 32u64;
        for from in [Variant::Tuned, Variant::Loop] {
            let mut p = Pools::new(&PoolConfig {
                fixed_rules: Some(from),
                ..PoolConfig::new(c * u64::from(B), B)
            });
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            // Re-reads of 48 keys in a cache of 32: entries bank re-reads and chances move
            // entries read long ago to the top of multi-touch (the loop rules also admit at
            // the least recent end), so neither pool is in the order of last accesses.
            for _ in 0..3000 {
                read(&mut p, rng.random_range(0..48));
            }
            assert!(
                p.lists[1].len > 0
                    && (0..48).any(|k| p
                        .find(&fp(k))
                        .is_some_and(|i| p.slots[i as usize].rereads > 0))
            );
            p.set_variant(Variant::Lru);
            // Then a working set that moves by half: LRU holds exactly the `c` keys read
            // last, once `c` distinct keys have been read since the switch.
            let mut last: Vec<u64> = Vec::new();
            let mut checked = 0;
            let mut evictions = 0;
            for n in 0..400 {
                let k = rng.random_range(24..72);
                // Each eviction takes the entry read least recently of all held.
                let oldest = (0..72)
                    .filter_map(|j| {
                        p.find(&fp(j))
                            .map(|i| (p.clock.wrapping_sub(p.slots[i as usize].stamp), j))
                    })
                    .max()
                    .map(|(_, j)| fp(j));
                if p.get(&fp(k)).is_none() {
                    let mut gone = Vec::new();
                    p.insert(fp(k), entry(B as usize, 1), false, &mut |f, _, _| {
                        gone.push(f)
                    });
                    assert!(gone.len() <= 1);
                    if let Some(f) = gone.first() {
                        evictions += 1;
                        assert_eq!(
                            Some(*f),
                            oldest,
                            "from {from:?}, read {n}: LRU lets the least recent entry go"
                        );
                    }
                }
                check(&p);
                last.retain(|&x| x != k);
                last.push(k);
                if last.len() >= c as usize {
                    checked += 1;
                    let recent = &last[last.len().saturating_sub(c as usize)..];
                    let held = recent.iter().filter(|&&k| p.find(&fp(k)).is_some()).count();
                    assert_eq!(
                        held,
                        recent.len(),
                        "from {from:?}, read {n}: LRU keeps the keys read last"
                    );
                }
            }
            assert!(checked > 300 && evictions > 50, "{checked} {evictions}");
        }
    }

    #[test]
    fn loop_rules_keep_part_of_a_loop_longer_than_the_cache() {
        let fixed = |v| {
            Pools::new(&PoolConfig {
                fixed_rules: Some(v),
                ..PoolConfig::new(1000 * u64::from(B), B)
            })
        };
        let (mut tuned, mut looped) = (fixed(Variant::Tuned), fixed(Variant::Loop));
        let pass = || 0..1100u64;
        for _ in 0..5 {
            hits(&mut tuned, pass());
            hits(&mut looped, pass());
        }
        // Belady's optimum keeps 999 of the 1,100 blocks; LRU-like rules keep none in reach.
        let t = hits(&mut tuned, pass());
        let l = hits(&mut looped, pass());
        assert_eq!(t, 0, "the tuned rules cycle the whole loop out");
        assert!(l >= 800, "loop rules kept {l} of 1,100 hits a pass");
    }

    /// Reads `n` as the cache's read path does: a lookup, and on a miss an admission.
    fn read(p: &mut Pools, n: u64) -> Option<Segment> {
        let f = fp(n);
        if let Some((_, seg)) = p.get(&f) {
            return Some(seg);
        }
        p.insert(f, entry(B as usize, 1), false, &mut |_, _, _| {});
        None
    }

    /// The invariants every state must keep.
    fn check(p: &Pools) {
        let st = p.state();
        assert!(
            st.single_bytes + st.multi_bytes <= st.capacity_bytes,
            "over budget: {st:?}"
        );
        assert!(
            (st.single_min_bytes..=st.single_max_bytes).contains(&st.single_target_bytes),
            "target outside its limits: {st:?}"
        );
        for g in &p.ghosts {
            assert!(g.len <= g.capacity, "ghost over its bound: {st:?}");
            assert!(g.table.len() == g.len, "ghost table and list disagree");
            // Nodes are recycled: the slab never outgrows the bound.
            assert!(
                g.nodes.len() <= g.capacity,
                "ghost slab grew past its bound"
            );
        }
        // ARC's directory bounds (ghost ratio 0.9 of a full cache).
        let c = p.ghost_capacity;
        assert!(st.single_entries as usize + p.ghosts[0].len <= c.max(st.single_entries as usize));
        assert!(p.table.len() as u64 == st.single_entries + st.multi_entries);
    }

    #[test]
    fn a_scan_of_blocks_read_once_does_not_evict_multi_touch() {
        let mut p = pools(100);
        for n in 0..60 {
            read(&mut p, n);
            assert_eq!(read(&mut p, n), Some(Segment::Single));
        }
        // A scan ten times the cache, every block read once.
        for n in 1000..2000 {
            assert_eq!(read(&mut p, n), None);
            check(&p);
        }
        for n in 0..60 {
            assert_eq!(
                p.segment_of(&fp(n)),
                Some(Segment::Multi),
                "block {n} read twice was evicted by a scan"
            );
        }
        assert!(p.state().single_entries <= 40);
    }

    #[test]
    fn a_block_read_again_after_its_single_touch_eviction_lands_in_multi_touch() {
        let mut p = pools(10);
        // Multi-touch holds six; single-touch keeps close to its target (one block) and its
        // ghost may remember the rest of a cache's worth (ARC's bound: |single| + |ghost|).
        for n in 0..6 {
            read(&mut p, n);
            read(&mut p, n);
        }
        read(&mut p, 1000);
        for n in 100..105 {
            read(&mut p, n);
        }
        assert_eq!(
            p.segment_of(&fp(1000)),
            None,
            "1000 should have been evicted"
        );
        assert_eq!(p.in_ghost(&fp(1000)), Some(Segment::Single));
        let target = p.state().single_target_bytes;
        let placed = p.insert(fp(1000), entry(B as usize, 1), false, &mut |_, _, _| {});
        assert_eq!(
            placed,
            Placement {
                segment: Segment::Multi,
                ghost: Some(Segment::Single)
            }
        );
        assert_eq!(p.segment_of(&fp(1000)), Some(Segment::Multi));
        assert_eq!(p.in_ghost(&fp(1000)), None, "a ghost hit forgets the key");
        for n in 0..6 {
            assert_eq!(p.segment_of(&fp(n)), Some(Segment::Multi));
        }
        assert!(
            p.state().single_target_bytes > target,
            "the target did not grow"
        );
        assert_eq!(p.state().counters.ghost_hits_single, 1);

        // Without ghosts the same re-read is a first read again.
        let mut plain = Pools::new(&PoolConfig {
            ghost_ratio: 0.0,
            ..PoolConfig::new(10 * u64::from(B), B)
        });
        for n in 0..6 {
            read(&mut plain, n);
            read(&mut plain, n);
        }
        read(&mut plain, 1000);
        for n in 100..105 {
            read(&mut plain, n);
        }
        assert_eq!(plain.segment_of(&fp(1000)), None);
        read(&mut plain, 1000);
        assert_eq!(plain.segment_of(&fp(1000)), Some(Segment::Single));
    }

    #[test]
    fn the_ghosts_never_exceed_their_bound() {
        // A random mix of hot and cold keys with many evictions and ghost hits.
        let mut p = pools(64);
        let bound = p.state().ghost_capacity;
        assert_eq!(bound, (64.0 * DEFAULT_GHOST_RATIO) as u64);
        let mut x = 12345u64;
        let mut peak = (0, 0);
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = if x.is_multiple_of(3) {
                x % 80
            } else {
                x % 5000
            };
            read(&mut p, n);
            check(&p);
            let st = p.state();
            assert!(st.ghost_single <= bound && st.ghost_multi <= bound);
            peak = (peak.0.max(st.ghost_single), peak.1.max(st.ghost_multi));
        }
        let st = p.state();
        assert!(st.counters.ghost_hits_single > 0 && st.counters.ghost_hits_multi > 0);
        assert!(
            peak.0 > bound / 2 && peak.1 > 0,
            "ghosts never filled: {peak:?}"
        );
    }

    #[test]
    fn the_adaptive_split_stays_within_its_limits_under_an_adversarial_pattern() {
        let config = PoolConfig {
            share_min: 0.1,
            share_max: 0.6,
            fixed_rules: Some(Variant::Tuned),
            ..PoolConfig::new(100 * u64::from(B), B)
        };
        let mut p = Pools::new(&config);
        let (lo, hi) = (10 * u64::from(B), 60 * u64::from(B));
        let mut seen = (u64::MAX, 0u64);
        let mut record = |p: &Pools| {
            check(p);
            let t = p.state().single_target_bytes;
            seen = (seen.0.min(t), seen.1.max(t));
        };
        // A hot set in multi-touch, so that single-touch has a ghost to fill.
        for n in 0..50 {
            read(&mut p, n);
            read(&mut p, n);
        }
        let mut next = 1_000_000u64;
        let mut fresh = || {
            next += 1;
            next
        };
        for _ in 0..6 {
            // Push up: each key is read again just after single-touch evicts it.
            for _ in 0..120 {
                let x = fresh();
                read(&mut p, x);
                for _ in 0..p.state().single_entries + 3 {
                    read(&mut p, fresh());
                }
                read(&mut p, x);
                record(&p);
            }
            // Push down: each key is read again just after multi-touch evicts it.
            for _ in 0..120 {
                let y = fresh();
                read(&mut p, y);
                read(&mut p, y);
                for _ in 0..p.state().multi_entries + 3 {
                    let z = fresh();
                    read(&mut p, z);
                    read(&mut p, z);
                }
                read(&mut p, y);
                record(&p);
            }
        }
        assert_eq!(
            seen,
            (lo, hi),
            "the target should reach both limits and no further"
        );
        let st = p.state();
        assert!(st.counters.target_grew > 0 && st.counters.target_shrank > 0);
    }

    #[test]
    fn re_reads_in_multi_touch_earn_second_chances() {
        for chances in [true, false] {
            let mut p = Pools::new(&PoolConfig {
                adaptive: false,
                ghost_ratio: 0.0,
                single_share: 0.1,
                share_min: 0.1,
                second_chances: chances,
                ..PoolConfig::new(10 * u64::from(B), B)
            });
            // 0..9 in multi-touch; 0 re-read there (so it is the most recent, with a chance).
            for n in 0..9 {
                read(&mut p, n);
                read(&mut p, n);
            }
            assert_eq!(read(&mut p, 0), Some(Segment::Multi));
            // Ten blocks promoted in turn fill the tenth place and push nine least recent
            // entries out: 1..8, then 0, unless its re-read earns it another round (and 50
            // goes instead).
            for n in 50..60 {
                read(&mut p, n);
                read(&mut p, n);
                check(&p);
            }
            for n in 1..9 {
                assert_eq!(p.segment_of(&fp(n)), None, "{n} should be gone");
            }
            if chances {
                assert_eq!(p.segment_of(&fp(0)), Some(Segment::Multi));
                assert_eq!(p.segment_of(&fp(50)), None);
            } else {
                assert_eq!(p.segment_of(&fp(0)), None);
                assert_eq!(p.segment_of(&fp(50)), Some(Segment::Multi));
            }
        }
    }

    #[test]
    fn a_second_chance_spends_half_the_re_reads() {
        // How many blocks promoted after it push out an entry re-read `rereads` times in
        // multi-touch.
        let gone_after = |rereads: u64| {
            let mut p = Pools::new(&PoolConfig {
                adaptive: false,
                ghost_ratio: 0.0,
                single_share: 0.1,
                share_min: 0.1,
                ..PoolConfig::new(10 * u64::from(B), B)
            });
            for _ in 0..2 + rereads {
                read(&mut p, 0);
            }
            (1..200u64)
                .find(|&n| {
                    read(&mut p, 1000 + n);
                    read(&mut p, 1000 + n);
                    p.segment_of(&fp(0)).is_none()
                })
                .expect("the entry never left")
        };
        assert_eq!(MAX_REREADS, 3, "this test banks up to three re-reads");
        let [none, one, two, three] = [0, 1, 2, 3].map(gone_after);
        let trip = one - none;
        assert!(trip > 0, "a re-read bought no chance");
        // One re-read buys one more trip; two or three buy two (spending one a chance, three
        // bought three).
        assert_eq!(
            two,
            one + trip,
            "two re-reads did not buy exactly two chances"
        );
        assert_eq!(three, two, "three re-reads bought more than two chances");
    }

    fn entry(len: usize, refs: u32) -> Cached {
        Cached {
            bytes: Bytes::from(vec![7u8; len]),
            refs,
        }
    }

    #[test]
    fn odd_settings_and_sizes_never_panic_or_overfill() {
        let cases = [
            (0u64, 4096u32, 0.9, 0.01, 0.99),
            (10_000, 0, f64::INFINITY, f64::NAN, 1.0),
            ((1 << 54) - 1, 4096, 1e300, 0.0, 1.0),
            (50_000, 4096, 16.0, 0.5, 0.2),
            (9_000, 512, -3.0, -1.0, f64::NEG_INFINITY),
        ];
        for (cap, block, ratio, lo, hi) in cases {
            let mut p = Pools::new(&PoolConfig {
                capacity_bytes: cap,
                block_bytes: block,
                ghost_ratio: ratio,
                share_min: lo,
                share_max: hi,
                ..PoolConfig::new(cap, 4096)
            });
            for n in 0..400u64 {
                let len = ((n * 997) % 9000) as usize;
                p.insert(fp(n % 150), entry(len, 1), n % 7 == 0, &mut |_, _, _| {});
                let _ = p.get(&fp((n * 31) % 150));
                check(&p);
            }
        }
    }

    #[test]
    fn an_admission_never_evicts_itself_to_make_room_for_itself() {
        let mut p = Pools::new(&PoolConfig {
            adaptive: false,
            single_share: 0.5,
            share_min: 0.5,
            ..PoolConfig::new(10_000, 4096)
        });
        // Multi-touch: a 100-byte entry (least recent) and a 4000-byte one.
        for (n, len) in [(1, 100), (2, 4000)] {
            p.insert(fp(n), entry(len, 1), false, &mut |_, _, _| {});
            let _ = p.get(&fp(n));
        }
        let mut gone = Vec::new();
        p.insert(fp(3), entry(6050, 1), false, &mut |f, _, _| gone.push(f));
        assert_eq!(gone, vec![fp(1), fp(2)]);
        assert_eq!(p.segment_of(&fp(3)), Some(Segment::Single));
        check(&p);
    }

    #[test]
    fn a_second_insert_of_a_held_key_keeps_both_references() {
        let mut p = pools(10);
        p.insert(fp(1), entry(4096, 1), false, &mut |_, _, _| {});
        let placed = p.insert(fp(1), entry(4096, 3), true, &mut |_, _, _| {});
        assert_eq!(placed.segment, Segment::Multi);
        let (v, _) = p.get(&fp(1)).expect("held");
        assert_eq!(v.refs, 4);
        assert_eq!(p.state().multi_entries + p.state().single_entries, 1);
    }

    #[test]
    fn with_the_target_at_its_ceiling_a_scan_leaves_multi_touch_the_rest() {
        let mut p = pools(100);
        for n in 0..80 {
            read(&mut p, n);
            read(&mut p, n);
        }
        // Push the target up: keys read again just after single-touch evicts them.
        let mut next = 1_000_000u64;
        for _ in 0..400 {
            let x = next;
            read(&mut p, x);
            for _ in 0..p.state().single_entries + 3 {
                next += 1;
                read(&mut p, next);
            }
            read(&mut p, x);
            next += 1;
        }
        let st = p.state();
        assert_eq!(st.single_target_bytes, st.single_max_bytes, "{st:?}");
        // Then a long scan of blocks read once.
        for n in 5_000_000..5_010_000 {
            read(&mut p, n);
            let st = p.state();
            assert!(
                st.multi_bytes + u64::from(B) >= st.capacity_bytes - st.single_max_bytes,
                "a scan pushed multi-touch below the ceiling's rest: {st:?}"
            );
        }
    }

    #[test]
    fn the_memory_per_entry_and_per_ghost_key_is_what_the_docs_say() {
        // docs/ARCHITECTURE.md and the note quote these: a change must update them.
        assert_eq!(SLOT_BYTES, 88);
        assert_eq!(GHOST_NODE_BYTES, 12);
    }
}

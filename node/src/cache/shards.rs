//! The RAM pools split by fingerprint into shards, each a [`Pools`] behind its own lock, and
//! the duel that picks the eviction rules for all of them.
//!
//! One lock over all the pools made two threads doing only RAM hits run at 0.6x of one thread
//! (0.41x on 16 cores). A key's shard is fixed by a keyed hash of its fingerprint, so each
//! shard is an independent cache of `capacity / shards` with its own split, ghosts and lists;
//! with enough entries a shard (at least [`SHARD_MIN_ENTRIES`]), the keys spread evenly and
//! the whole behaves as one cache of the full capacity (docs/measurements.md has the
//! replays side by side).
//!
//! The duel ([`Copies`], [`Score`]) is one for the whole cache: it replays a sample of the
//! keys through four small key-only copies of the pools, one per [`Variant`], and publishes
//! the rules to run in an atomic each shard reads when it is locked. The copies are split by
//! shard as the pools are, over the first [`DUEL_SHARDS`] shards at most (only their keys are
//! sampled): a shard replays its own sampled keys under its own lock, and adds
//! its hit counts to the one score every few dozen samples. (A first version kept one set of
//! copies behind one lock: replaying a quarter of all lookups there, at the default size, made
//! two threads no faster than one.)
//!
//! Architecture invariant: a shard's lock is never held while taking another shard's lock
//! (the score's lock is taken under a shard's, never the other way), and nothing here does
//! I/O or allocates on a hit, except that the first sampled access to a shard after a duel
//! trial begins clones that shard's copy of the running variant (a few thousand keys at most,
//! once per trial).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};

use super::fingerprint::{Fingerprint, mix64};
use super::pool::{Budget, Cached, PolicyState, PoolConfig, Pools, Variant};

/// A shard holds at least this many entries of a full cache when the count is picked for it
/// (fewer shards otherwise): at the ARC paper's capacities the sharded replays stay within
/// 0.1 points of one shard's (docs/measurements.md, "Sharded pools").
pub const SHARD_MIN_ENTRIES: u64 = 4096;
/// The most shards a cache is split into.
pub const MAX_SHARDS: usize = 1024;
/// Shards a cache is split into by default per core (a power of two), and never fewer than
/// [`DUEL_SHARDS`]: see [`auto_shards`].
pub const SHARDS_PER_CORE: usize = 8;
/// The most shards that hold a part of the duel's copies (the first ones); a key is sampled
/// for the duel only if its shard is one of them. Beyond this count a shard's part of a copy
/// (4,096 entries in all) would be too small to behave as the whole copy does, so more shards
/// leave the duel exactly as it is at this count.
pub const DUEL_SHARDS: usize = 64;

/// Each of the duel's copies holds at most this many entries; a larger cache replays one key
/// in `entries / DUEL_ENTRIES` (rounded up) through them, which keeps reuse distances in
/// proportion (sampling by key, as SHARDS does: Waldspurger et al., FAST 2015).
pub const DUEL_ENTRIES: u64 = 4096;
/// Sampled accesses a duel window spans at least (and at least twice a copy's entries).
pub const DUEL_WINDOW_MIN: u32 = 256;
/// A variant takes over only when its decayed hits beat the running one's by this share, and
/// by [`DUEL_DEVIATIONS`] times the square root of the accesses where exactly one of the two
/// hit (a sign test: on the accesses where they agree, neither is better): noise alone does
/// not flip the rules back and forth. It was 2% while a switch to the LRU rules still
/// spent second chances and so cost more than it should: a shifting working set at 10,000
/// pages, where the LRU copy leads by 0.6% of hits, never switched (-0.56 points from
/// max(LRU, ARC); -0.20 at 1%).
pub const DUEL_MARGIN: f64 = 0.01;
/// What a window's counts weigh one window later: the duel judges on about
/// `1 / (1 - DUEL_DECAY)` windows, so one window's luck does not switch the rules (each switch
/// costs hits while the pools' contents catch up with the new rules).
pub const DUEL_DECAY: f64 = 0.75;
/// Each switch multiplies the margin (both terms) by 2, up to [`DUEL_BACKOFF_MAX`], and each
/// window without one takes back a tenth of the excess: where variants take turns being best
/// (phases shorter than the pools take to settle after a switch), the rules stop following
/// every turn. Without it, a zigzag at half its footprint switched 17 times and hit 35% where
/// every variant alone hits 48 to 50%.
pub const DUEL_BACKOFF_MAX: f64 = 64.0;
/// See [`DUEL_MARGIN`].
pub const DUEL_DEVIATIONS: f64 = 2.0;
/// Windows the duel only scores, switching nothing: the copies start empty, and while they
/// fill, what hits in them says more about how each variant fills than how it keeps. On P3
/// at 47,659 pages the duel switched to the loop rules at its first window (the trace opens
/// with a scan) and lost two points to fixed rules before it came back.
pub const DUEL_WARMUP_WINDOWS: u64 = 2;
/// Windows a switch to [`Variant::Loop`] runs as a trial first. The loop rules keep what the
/// pools hold (a new entry goes to the least recent end), so their copy's lead comes from
/// contents it chose long ago, and the pools, switched, can take many windows to turn theirs
/// over: on the LIRS paper's cs trace at 88 pages that cost 0.6 points to LRU, a zigzag at half
/// its footprint lost 1.5, and P6 at 17,098 pages switched 24 times to lose 1.5. So the
/// trial clones the running variant's copy (the pools' contents, sampled), runs it under the
/// loop rules beside the running copy, and the pools switch only if it hits more within the
/// trial, by the same margin. The other variants keep the pools' order and evict what does not
/// suit them at once: they switch without a trial (a trial of one window could not see their
/// gains, which build up over many).
pub const DUEL_TRIAL_WINDOWS: u64 = 1;
/// Windows after a lost trial in which the loop copy's lead counts for nothing: the best of
/// the other variants may switch meanwhile, and the loop copy's score, which did not pay, is
/// not tried again every other window.
pub const DUEL_TRIAL_REST: u64 = 4;

/// The number of shards for a cache of `entries` entries on a machine of `cores` cores: as
/// many as leave each shard at least [`SHARD_MIN_ENTRIES`], a power of two, at most
/// [`SHARDS_PER_CORE`] a core (rounded up to a power of two) but no fewer than
/// [`DUEL_SHARDS`], and at most [`MAX_SHARDS`].
///
/// Threads meet on one lock about once in `shards / threads` lookups, and a meeting costs far
/// more than a lookup (the lock's line and the shard's lists move between cores; the waiter
/// spins, then yields to the kernel), so the count follows the threads that can run at once,
/// which the cores bound. Measured (docs/measurements.md, "Sharded pools"): on 2 cores, 2
/// threads ran at 1.57x one thread with 8 shards and 1.82x with 64; on 16 cores, 16 threads
/// did 25.5 M lookups/s with 64 shards and 31.7 M/s with 128. On up to 8 cores the count is
/// the same on every machine (64 at most), so a replay there does the same everywhere.
pub fn auto_shards(entries: u64, cores: usize) -> usize {
    let mut n = shard_cap(cores);
    while n > 1 && entries / (n as u64) < SHARD_MIN_ENTRIES {
        n /= 2;
    }
    n
}

/// The most shards [`auto_shards`] picks on `cores` cores.
pub fn shard_cap(cores: usize) -> usize {
    cores
        .max(1)
        .checked_next_power_of_two()
        .and_then(|c| c.checked_mul(SHARDS_PER_CORE))
        .unwrap_or(MAX_SHARDS)
        .clamp(DUEL_SHARDS, MAX_SHARDS)
}

/// One shard: its pools and its part of the duel's copies, on cache lines of its own so that
/// two shards' locks never share one.
#[repr(align(128))]
struct Shard(Mutex<ShardState>);

struct ShardState {
    pools: Pools,
    /// This shard's part of the duel's copies (the sampled keys whose shard this is).
    copies: Option<Box<Copies>>,
}

/// The pools of the whole cache.
pub struct ShardedPools {
    shards: Box<[Shard]>,
    /// Shard number mask (the count is a power of two).
    mask: u64,
    /// Key of the hash that picks a key's shard and the duel's sample.
    seed: u64,
    /// The rules every shard runs: a [`Variant`]'s number.
    variant: AtomicU8,
    /// A key is sampled for the duel when the top 32 bits of its hash are below this (0: no
    /// duel).
    threshold: u64,
    /// Sampled accesses a shard replays before it adds its counts to the score.
    flush_every: u32,
    score: Option<Mutex<Score>>,
    switches: AtomicU64,
    /// The trial running ([`DUEL_TRIAL_WINDOWS`]), as [`Score::trial_word`] writes it: 0 for
    /// none.
    trial: AtomicU64,
}

/// A locked shard, seen as its pools.
pub struct ShardGuard<'a> {
    owner: &'a ShardedPools,
    state: MutexGuard<'a, ShardState>,
    h: u64,
}

impl std::ops::Deref for ShardGuard<'_> {
    type Target = Pools;
    fn deref(&self) -> &Pools {
        &self.state.pools
    }
}

impl std::ops::DerefMut for ShardGuard<'_> {
    fn deref_mut(&mut self) -> &mut Pools {
        &mut self.state.pools
    }
}

impl ShardGuard<'_> {
    /// Counts a request's first look at `fp` (the key this shard was locked for): the duel's
    /// copies replay it if its key is sampled. A second look within one request (the admission
    /// of a block just missed) must not come here: it would make every miss a hit in the
    /// copies.
    #[inline]
    pub fn observe(&mut self, fp: &Fingerprint) {
        if (self.h >> 32) >= self.owner.threshold {
            return;
        }
        let state = &mut *self.state;
        let Some(copies) = state.copies.as_deref_mut() else {
            return;
        };
        let running = state.pools.variant();
        copies.follow_trial(self.owner.trial.load(Ordering::Relaxed));
        copies.replay(fp, running);
        if copies.seen >= self.owner.flush_every {
            self.owner.flush(copies);
            let v = self.owner.variant();
            if state.pools.variant() != v {
                state.pools.set_variant(v);
            }
        }
    }
}

impl std::fmt::Debug for ShardedPools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedPools")
            .field("shards", &self.shards.len())
            .field("state", &self.state())
            .finish()
    }
}

impl ShardedPools {
    /// Empty pools of `config`'s capacity in `shards` shards (rounded up to a power of two,
    /// at most [`MAX_SHARDS`]; 0 means one).
    pub fn new(config: &PoolConfig, shards: usize) -> Self {
        let n = shards
            .clamp(1, MAX_SHARDS)
            .next_power_of_two()
            .min(MAX_SHARDS);
        let shard_config = PoolConfig {
            capacity_bytes: config.capacity_bytes / n as u64,
            ..config.clone()
        };
        let entries = config.capacity_bytes / u64::from(config.block_bytes.max(1));
        // The duel's copies live in the first `duelling` shards; the others sample nothing.
        let duelling = n.min(DUEL_SHARDS);
        let duel = match config.fixed_rules {
            None if entries >= 2 => Some(Plan::new(entries, n, duelling)),
            _ => None,
        };
        let start = config.fixed_rules.unwrap_or(Variant::Tuned);
        let budget = (n > 1).then(|| {
            Arc::new(Budget {
                capacity: config.capacity_bytes,
                used: AtomicU64::new(0),
            })
        });
        ShardedPools {
            shards: (0..n)
                .map(|i| {
                    let mut pools = Pools::new(&shard_config);
                    pools.set_variant(start);
                    if let Some(b) = &budget {
                        pools.share(b.clone());
                    }
                    let copies = duel
                        .as_ref()
                        .filter(|_| i < duelling)
                        .map(|plan| Box::new(Copies::new(config, plan.copy_entries)));
                    Shard(Mutex::new(ShardState { pools, copies }))
                })
                .collect(),
            mask: n as u64 - 1,
            seed: crate::hashing::key(0x5_4a2d),
            variant: AtomicU8::new(start as u8),
            // Only the keys of the first `duelling` shards can be sampled, so those are sampled
            // `n / duelling` times as often: the duel still sees one key in `rate` of all (the
            // shard takes the hash's low bits, the sample its top 32: independent).
            threshold: duel
                .as_ref()
                .map_or(0, |p| (1u64 << 32) / p.rate * (n / duelling) as u64),
            flush_every: duel.as_ref().map_or(1, |p| p.flush_every),
            score: duel.map(|p| Mutex::new(Score::new(p.window))),
            switches: AtomicU64::new(0),
            trial: AtomicU64::new(0),
        }
    }

    /// How many shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    #[inline]
    fn hash(&self, fp: &Fingerprint) -> u64 {
        let b = &fp.0;
        let w = u64::from_le_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]);
        mix64(w ^ self.seed)
    }

    /// The rules running now.
    pub fn variant(&self) -> Variant {
        Variant::ALL[usize::from(self.variant.load(Ordering::Relaxed)) & 3]
    }

    /// Locks the shard of `fp`, with the rules the duel picked last.
    #[inline]
    pub fn shard(&self, fp: &Fingerprint) -> ShardGuard<'_> {
        let h = self.hash(fp);
        let mut state = self.shards[(h & self.mask) as usize].0.lock();
        let v = self.variant();
        if state.pools.variant() != v {
            state.pools.set_variant(v);
        }
        ShardGuard {
            owner: self,
            state,
            h,
        }
    }

    /// Adds a shard's counts to the score; at the end of a window, picks the rules. Called
    /// with that shard locked (lock order: a shard, then the score).
    fn flush(&self, copies: &mut Copies) {
        let Some(score) = &self.score else {
            return;
        };
        let mut s = score.lock();
        s.add(copies);
        if s.seen >= s.window {
            let now = self.variant();
            let next = s.pick(now);
            if next != now {
                self.variant.store(next as u8, Ordering::Relaxed);
                self.switches.fetch_add(1, Ordering::Relaxed);
            }
            self.trial.store(s.trial_word(), Ordering::Relaxed);
        }
    }

    /// The pools' state: every shard's summed, with the rules and the duel's counters.
    pub fn state(&self) -> PolicyState {
        let mut sum: Option<PolicyState> = None;
        for s in self.shards.iter() {
            let st = s.0.lock().pools.state();
            sum = Some(match sum {
                None => st,
                Some(mut a) => {
                    a.single_target_bytes += st.single_target_bytes;
                    a.single_min_bytes += st.single_min_bytes;
                    a.single_max_bytes += st.single_max_bytes;
                    a.capacity_bytes += st.capacity_bytes;
                    a.single_entries += st.single_entries;
                    a.single_bytes += st.single_bytes;
                    a.multi_entries += st.multi_entries;
                    a.multi_bytes += st.multi_bytes;
                    a.ghost_single += st.ghost_single;
                    a.ghost_multi += st.ghost_multi;
                    a.ghost_capacity += st.ghost_capacity;
                    let (c, d) = (&mut a.counters, st.counters);
                    c.ghost_hits_single += d.ghost_hits_single;
                    c.ghost_hits_multi += d.ghost_hits_multi;
                    c.target_grew += d.target_grew;
                    c.target_shrank += d.target_shrank;
                    a
                }
            });
        }
        let mut st = sum.expect("at least one shard");
        st.variant = self.variant();
        st.duel = self.score.is_some();
        st.shards = self.shards.len() as u32;
        st.counters.variant_switches = self.switches.load(Ordering::Relaxed);
        st
    }

    /// Every multi-touch entry of every shard (for the shutdown's write to SSD).
    pub fn multi_entries(&self) -> Vec<(Fingerprint, Cached)> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            out.extend(s.0.lock().pools.multi_entries());
        }
        out
    }
}

/// The duel's sizes for a cache of `entries` entries in `shards` shards.
struct Plan {
    /// One key in `rate` is sampled.
    rate: u64,
    /// Entries of each shard's copy under each variant.
    copy_entries: u64,
    /// Sampled accesses a window spans.
    window: u64,
    /// See [`ShardedPools::flush_every`].
    flush_every: u32,
}

impl Plan {
    /// `shards` in all, the first `duelling` of them holding the copies: only one key in
    /// `shards / duelling` can be sampled, so the rate is never below that, whatever the size.
    fn new(entries: u64, shards: usize, duelling: usize) -> Plan {
        let rate = entries
            .div_ceil(DUEL_ENTRIES)
            .max((shards / duelling) as u64)
            .max(1);
        let copy_total = (entries / rate).max(1);
        let window = copy_total.saturating_mul(2).max(u64::from(DUEL_WINDOW_MIN));
        Plan {
            rate,
            copy_entries: (copy_total / duelling as u64).max(1),
            window,
            flush_every: u32::try_from(window / (4 * duelling as u64))
                .unwrap_or(u32::MAX)
                .clamp(1, 64),
        }
    }
}

/// The duel: one small copy of the pools per [`Variant`], holding keys only, each running
/// under its variant on the same sample of the accesses (every access while the cache holds
/// at most [`DUEL_ENTRIES`] entries, one key in `rate` beyond). The copies are split by shard
/// as the pools are (each shard replays its own sampled keys under its own lock, so the duel
/// adds no lock that every thread shares), and their hits meet in one [`Score`]. At the end of
/// each window the hits, decayed by [`DUEL_DECAY`] a window so that the recent past counts
/// most, say which variant the pools should run: the one that would have hit most, by at
/// least [`DUEL_MARGIN`].
///
/// The copies are exact replays, not estimates, for the sampled keys: a loop, a shifting
/// working set or a scan shows in them as it does in the pools. They cost about 100 bytes an
/// entry (4 x 4,096 entries at most, over all shards) plus their ghosts, and four lookups per
/// sampled access; while a trial runs ([`DUEL_TRIAL_WINDOWS`]), a fifth copy and a fifth
/// lookup.
struct Copies {
    minis: Vec<Pools>,
    /// The trial ([`DUEL_TRIAL_WINDOWS`]): the running variant's copy when the trial began,
    /// run since under the challenger's rules.
    trial: Option<Pools>,
    /// The running variant when the trial began (its copy is the one the trial is against).
    trial_from: Variant,
    /// The trial word ([`ShardedPools::trial`]) `trial` follows.
    trial_word: u64,
    /// Since `trial` was cloned.
    trial_counts: TrialCounts<u32>,
    hits: [u32; 4],
    /// Sampled accesses where copy `k` and the running variant's copy disagreed (one hit).
    split: [u32; 4],
    seen: u32,
}

/// One access to a key-only copy: whether it hit; a miss admits the key.
fn replay_key(copy: &mut Pools, fp: &Fingerprint) -> bool {
    if copy.get(fp).is_some() {
        return true;
    }
    // One byte of a static buffer: each key weighs 1 in a copy sized in keys.
    let key = Cached {
        bytes: Bytes::from_static(&[0]),
        refs: 0,
    };
    copy.insert(*fp, key, false, &mut |_, _, _| {});
    false
}

impl Copies {
    fn new(config: &PoolConfig, entries: u64) -> Copies {
        let minis = Variant::ALL
            .iter()
            .map(|&v| {
                let mut p = Pools::new(&PoolConfig {
                    capacity_bytes: entries,
                    block_bytes: 1,
                    fixed_rules: Some(v),
                    ..config.clone()
                });
                p.set_variant(v);
                p
            })
            .collect();
        Copies {
            minis,
            trial: None,
            trial_from: Variant::Tuned,
            trial_word: 0,
            trial_counts: TrialCounts::default(),
            hits: [0; 4],
            split: [0; 4],
            seen: 0,
        }
    }

    /// Replays one sampled access through every copy.
    fn replay(&mut self, fp: &Fingerprint, running: Variant) {
        let mut hit = [false; 4];
        for (k, m) in self.minis.iter_mut().enumerate() {
            hit[k] = replay_key(m, fp);
            self.hits[k] += u32::from(hit[k]);
        }
        for (split, h) in self.split.iter_mut().zip(hit) {
            *split += u32::from(h != hit[running as usize]);
        }
        self.seen += 1;
        if let Some(t) = &mut self.trial {
            let tried = replay_key(t, fp);
            let ran = hit[self.trial_from as usize];
            let c = &mut self.trial_counts;
            c.running += u32::from(ran);
            c.tried += u32::from(tried);
            c.split += u32::from(ran != tried);
        }
    }

    /// Follows the trial word: a new trial clones the copy of the variant running when it
    /// began and runs it under the challenger's rules; an ended one is dropped.
    fn follow_trial(&mut self, word: u64) {
        if word == self.trial_word {
            return;
        }
        self.trial_word = word;
        self.trial_counts = TrialCounts::default();
        self.trial = trial_variants(word).map(|(from, to)| {
            self.trial_from = from;
            let mut t = self.minis[from as usize].clone();
            t.set_variant(to);
            t
        });
    }
}

/// The duel's judgement over all shards' copies.
struct Score {
    hits: [u64; 4],
    split: [u64; 4],
    seen: u64,
    window: u64,
    score: [f64; 4],
    split_score: [f64; 4],
    /// The margin's multiplier ([`DUEL_BACKOFF_MAX`]).
    backoff: f64,
    /// Windows ended ([`DUEL_WARMUP_WINDOWS`]).
    windows: u64,
    /// The trial running ([`DUEL_TRIAL_WINDOWS`]).
    trial: Option<Trial>,
    /// Windows left in which the loop copy's lead is ignored ([`DUEL_TRIAL_REST`]).
    loop_rest: u64,
    /// Trials begun (each trial's word is new, so a shard's copies tell a new trial from the
    /// last).
    trials: u64,
    /// The trial's counts, over all shards.
    trial_counts: TrialCounts<u64>,
}

/// A trial's counts since it began: the running copy's hits, the trial copy's, and the
/// accesses where exactly one of the two hit.
#[derive(Debug, Clone, Copy, Default)]
struct TrialCounts<T> {
    running: T,
    tried: T,
    split: T,
}

/// A trial: the variant running when it began, the challenger, and the windows it has run.
#[derive(Debug, Clone, Copy)]
struct Trial {
    from: Variant,
    to: Variant,
    ran: u64,
}

/// The variants a trial word names, running and challenger (`None`: no trial).
fn trial_variants(word: u64) -> Option<(Variant, Variant)> {
    (word != 0).then(|| {
        (
            Variant::ALL[(word >> 3 & 3) as usize],
            Variant::ALL[(word & 3) as usize],
        )
    })
}

/// Whether `challenger`'s hits beat `running`'s by the margin ([`DUEL_MARGIN`]), both terms
/// times `backoff`, given `split` accesses on which exactly one of them hit.
fn beats(challenger: f64, running: f64, split: f64, backoff: f64) -> bool {
    let noise = DUEL_DEVIATIONS * split.sqrt();
    challenger > running * (1.0 + DUEL_MARGIN * backoff) + backoff * noise.max(1.0)
}

impl Score {
    fn new(window: u64) -> Score {
        Score {
            hits: [0; 4],
            split: [0; 4],
            seen: 0,
            window,
            score: [0.0; 4],
            split_score: [0.0; 4],
            backoff: 1.0,
            windows: 0,
            trial: None,
            loop_rest: 0,
            trials: 0,
            trial_counts: TrialCounts::default(),
        }
    }

    /// What the shards' copies follow ([`ShardedPools::trial`]): 0 for no trial, else the
    /// trial's number from bit 8 up, the running variant's number in bits 3 and 4, bit 2 set,
    /// and the challenger's number in bits 0 and 1.
    fn trial_word(&self) -> u64 {
        match self.trial {
            Some(t) => self.trials << 8 | (t.from as u64) << 3 | 4 | t.to as u64,
            None => 0,
        }
    }

    /// Bookkeeping of a switch: the split counts were against the old variant, and the margin
    /// doubles ([`DUEL_BACKOFF_MAX`]).
    fn switched(&mut self) {
        self.split_score = [0.0; 4];
        self.backoff = (self.backoff * 2.0).min(DUEL_BACKOFF_MAX);
    }

    /// Takes a shard's counts.
    fn add(&mut self, c: &mut Copies) {
        // A shard's trial counts are this trial's only if it follows this trial's word.
        if self.trial.is_some() && c.trial_word == self.trial_word() {
            let (a, b) = (&mut self.trial_counts, c.trial_counts);
            a.running += u64::from(b.running);
            a.tried += u64::from(b.tried);
            a.split += u64::from(b.split);
        }
        c.trial_counts = TrialCounts::default();
        for k in 0..4 {
            self.hits[k] += u64::from(c.hits[k]);
            self.split[k] += u64::from(c.split[k]);
        }
        self.seen += u64::from(c.seen);
        c.hits = [0; 4];
        c.split = [0; 4];
        c.seen = 0;
    }

    /// Ends a window: the variant to run next, given the one running.
    fn pick(&mut self, running: Variant) -> Variant {
        self.seen = 0;
        for (score, hits) in self.score.iter_mut().zip(self.hits.iter_mut()) {
            *score = *score * DUEL_DECAY + *hits as f64;
            *hits = 0;
        }
        for (score, split) in self.split_score.iter_mut().zip(self.split.iter_mut()) {
            *score = *score * DUEL_DECAY + *split as f64;
            *split = 0;
        }
        self.windows += 1;
        if self.windows <= DUEL_WARMUP_WINDOWS {
            return running;
        }
        if let Some(t) = self.trial {
            if t.ran + 1 < DUEL_TRIAL_WINDOWS {
                self.trial = Some(Trial {
                    ran: t.ran + 1,
                    ..t
                });
                return running;
            }
            // The trial's verdict, by the same margin; the back-off applied when it began.
            self.trial = None;
            let c = std::mem::take(&mut self.trial_counts);
            let won = beats(c.tried as f64, c.running as f64, c.split as f64, 1.0);
            if !won {
                self.loop_rest = DUEL_TRIAL_REST;
                return running;
            }
            self.switched();
            return t.to;
        }
        let resting = self.loop_rest > 0;
        self.loop_rest = self.loop_rest.saturating_sub(1);
        let running = running as usize;
        let mut best = running;
        for k in 0..self.score.len() {
            let rests = resting && Variant::ALL[k] == Variant::Loop;
            if !rests && self.score[k] > self.score[best] {
                best = k;
            }
        }
        let b = self.backoff;
        let ahead = beats(
            self.score[best],
            self.score[running],
            self.split_score[best],
            b,
        );
        if ahead && Variant::ALL[best] == Variant::Loop {
            self.trial = Some(Trial {
                from: Variant::ALL[running],
                to: Variant::Loop,
                ran: 0,
            });
            self.trials += 1;
            self.trial_counts = TrialCounts::default();
            Variant::ALL[running]
        } else if ahead {
            self.switched();
            Variant::ALL[best]
        } else {
            self.backoff = 1.0 + (b - 1.0) * 0.9;
            Variant::ALL[running]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::pool::Segment;

    const B: u32 = 4096;

    fn fp(n: u64) -> Fingerprint {
        Fingerprint::of(&n.to_le_bytes())
    }

    /// Pools of `blocks` blocks in `shards` shards, the rules picked by the duel.
    fn duelling(blocks: u64, shards: usize) -> ShardedPools {
        ShardedPools::new(&PoolConfig::new(blocks * u64::from(B), B), shards)
    }

    /// Reads `n` as the cache's read path does: a first look (counted by the duel), and on a
    /// miss an admission.
    fn read(p: &ShardedPools, n: u64) -> Option<Segment> {
        let f = fp(n);
        let mut g = p.shard(&f);
        g.observe(&f);
        let found = g.get(&f).map(|(_, seg)| seg);
        drop(g);
        if found.is_none() {
            let c = Cached {
                bytes: Bytes::from(vec![0u8; B as usize]),
                refs: 1,
            };
            p.shard(&f).insert(f, c, false, &mut |_, _, _| {});
        }
        found
    }

    fn hits(p: &ShardedPools, keys: impl IntoIterator<Item = u64>) -> u64 {
        keys.into_iter()
            .map(|k| u64::from(read(p, k).is_some()))
            .sum()
    }

    #[test]
    fn the_duel_picks_loop_rules_for_a_loop_and_lru_for_a_recency_pattern() {
        // A loop of 1.1 times the cache.
        let p = duelling(2000, 1);
        for _ in 0..10 {
            hits(&p, 0..2200);
        }
        let h = hits(&p, 0..2200);
        assert_eq!(p.state().variant, Variant::Loop);
        assert!(h >= 1500, "{h} hits of 2,200 in the loop's last pass");

        // Windows of 600 blocks read forward then backward: the backward read finds the most
        // recent blocks first, which LRU keeps and the tuned rules' half-size single-touch pool
        // cannot (a block read twice in a window never returns).
        let p = duelling(500, 1);
        let mut next = 10_000u64;
        let mut total = 0;
        for _ in 0..60 {
            let w: Vec<u64> = (next..next + 600).collect();
            next += 600;
            hits(&p, w.iter().copied());
            total += hits(&p, w.iter().rev().copied());
        }
        let st = p.state();
        assert!(
            matches!(st.variant, Variant::Lru | Variant::Arc),
            "picked {:?}",
            st.variant
        );
        // LRU would hit 500 of each backward read.
        assert!(total >= 60 * 400, "{total} hits");
    }

    #[test]
    fn beyond_64_shards_the_duel_keeps_its_copies_in_the_first_64_and_picks_as_64_do() {
        // 2^17 entries of 64 bytes in 256 shards: the copies are where 64 shards put them (64
        // entries a shard), and a loop of 1.1 times the cache gets the loop rules in every
        // shard, at the same pass and with the same hits as in 64 shards.
        const SMALL: u32 = 64;
        const ENTRIES: u64 = 1 << 17;
        let looped = ENTRIES * 11 / 10;
        let run = |shards: usize| {
            let p = ShardedPools::new(&PoolConfig::new(ENTRIES * u64::from(SMALL), SMALL), shards);
            assert_eq!(p.shard_count(), shards);
            let with_copies: Vec<usize> = p
                .shards
                .iter()
                .enumerate()
                .filter(|(_, s)| s.0.lock().copies.is_some())
                .map(|(i, _)| i)
                .collect();
            assert_eq!(
                with_copies,
                (0..shards.min(DUEL_SHARDS)).collect::<Vec<_>>()
            );
            let read = |n: u64| {
                let f = fp(n);
                let mut g = p.shard(&f);
                g.observe(&f);
                let hit = g.get(&f).is_some();
                if !hit {
                    let c = Cached {
                        bytes: Bytes::from_static(&[0; SMALL as usize]),
                        refs: 1,
                    };
                    g.insert(f, c, false, &mut |_, _, _| {});
                }
                hit
            };
            let mut passes = Vec::new();
            for _ in 0..10 {
                passes.push((0..looped).filter(|&n| read(n)).count() as u64);
            }
            assert_eq!(p.variant(), Variant::Loop);
            for s in p.shards.iter() {
                assert_eq!(s.0.lock().pools.variant(), Variant::Loop);
            }
            // The sample reached every shard that holds copies: each holds about its share.
            for s in &p.shards[..DUEL_SHARDS] {
                let st = s.0.lock();
                let lru = &st.copies.as_ref().expect("copies").minis[Variant::Lru as usize];
                let st = lru.state();
                let held = st.single_entries + st.multi_entries;
                assert!(
                    (40..=64).contains(&held),
                    "an LRU copy holds {held} keys of 64"
                );
            }
            passes
        };
        let (at_64, at_256) = (run(64), run(256));
        let switched = |p: &[u64]| p.iter().position(|&h| h > looped / 10);
        assert_eq!(switched(&at_64), switched(&at_256), "{at_64:?} {at_256:?}");
        for p in [&at_64, &at_256] {
            assert!(
                p[9] >= looped * 85 / 100,
                "{} hits of {looped} in the loop's last pass",
                p[9]
            );
        }
    }

    /// One window's counts from the copies, over 1,000 sampled accesses: each variant's hits,
    /// and the accesses where it and the running variant disagreed.
    fn feed(s: &mut Score, hits: [u64; 4], split: [u64; 4]) {
        s.hits = hits;
        s.split = split;
        s.seen = 1000;
    }

    /// Ends a window of a trial against the tuned rules with these counts: the rules to run.
    fn end_trial(s: &mut Score, running: u64, tried: u64, split: u64) -> Variant {
        s.trial_counts = TrialCounts {
            running,
            tried,
            split,
        };
        s.pick(Variant::Tuned)
    }

    #[test]
    fn the_duel_switches_nothing_while_its_copies_fill() {
        let mut s = Score::new(256);
        // LRU's copy hits on every sampled access, the running rules' on none.
        let window = |s: &mut Score| {
            feed(s, [0, 0, 1000, 0], [0, 0, 1000, 0]);
            s.pick(Variant::Tuned)
        };
        // Without the warm-up, the first window would switch.
        assert_eq!(window(&mut s), Variant::Tuned, "the first window switched");
        for w in 1..DUEL_WARMUP_WINDOWS {
            assert_eq!(window(&mut s), Variant::Tuned, "window {w} switched");
        }
        assert_eq!(window(&mut s), Variant::Lru);
    }

    #[test]
    fn a_switch_to_the_loop_rules_waits_for_a_trial_that_pays() {
        assert_eq!(
            DUEL_TRIAL_WINDOWS, 1,
            "this test ends each trial after one window"
        );
        let mut s = Score::new(256);
        // Loop's copy hits on most sampled accesses, the running rules' on few.
        let lead = |s: &mut Score| {
            feed(s, [100, 100, 100, 900], [0, 0, 0, 800]);
        };
        for _ in 0..DUEL_WARMUP_WINDOWS {
            lead(&mut s);
            s.pick(Variant::Tuned);
        }
        // Past the warm-up the lead begins a trial; the pools keep their rules meanwhile.
        lead(&mut s);
        assert_eq!(
            s.pick(Variant::Tuned),
            Variant::Tuned,
            "switched with no trial"
        );
        let first = s.trial_word();
        assert_eq!(trial_variants(first), Some((Variant::Tuned, Variant::Loop)));
        // Run from the running copy's contents, the loop rules hit no more than it: no
        // switch, and the trial ends.
        lead(&mut s);
        assert_eq!(
            end_trial(&mut s, 100, 105, 20),
            Variant::Tuned,
            "a trial that lost switched"
        );
        assert_eq!(s.trial_word(), 0, "the trial did not end");
        // For a rest the loop copy's lead counts for nothing: no trial every other window.
        for w in 0..DUEL_TRIAL_REST {
            lead(&mut s);
            assert_eq!(s.pick(Variant::Tuned), Variant::Tuned);
            assert_eq!(s.trial_word(), 0, "window {w} of the rest began a trial");
        }
        // Then the copies, still saying loop, begin another trial, under a new word (so a
        // shard's copies clone afresh), and this one pays.
        lead(&mut s);
        assert_eq!(s.pick(Variant::Tuned), Variant::Tuned);
        assert_ne!(s.trial_word(), 0);
        assert_ne!(s.trial_word(), first);
        lead(&mut s);
        assert_eq!(
            end_trial(&mut s, 100, 600, 500),
            Variant::Loop,
            "a trial that paid did not switch"
        );
        // Other challengers need no trial.
        let mut s = Score::new(256);
        let mut next = Variant::Tuned;
        for _ in 0..=DUEL_WARMUP_WINDOWS {
            feed(&mut s, [100, 900, 100, 100], [0, 800, 0, 0]);
            next = s.pick(Variant::Tuned);
        }
        assert_eq!(next, Variant::Arc);
    }

    #[test]
    fn after_a_lost_trial_the_next_best_variant_may_switch() {
        let mut s = Score::new(256);
        // Loop's copy leads, ARC's beats the running rules' too.
        let lead = |s: &mut Score| {
            feed(s, [100, 500, 100, 900], [0, 400, 0, 800]);
        };
        for _ in 0..=DUEL_WARMUP_WINDOWS {
            lead(&mut s);
            assert_eq!(s.pick(Variant::Tuned), Variant::Tuned);
        }
        assert_ne!(s.trial_word(), 0, "no trial began");
        lead(&mut s);
        assert_eq!(
            end_trial(&mut s, 100, 100, 0),
            Variant::Tuned,
            "a lost trial switched"
        );
        // Without the rest, loop's lead would begin another trial and hold ARC off.
        lead(&mut s);
        assert_eq!(s.pick(Variant::Tuned), Variant::Arc);
    }

    #[test]
    fn trial_counts_reach_the_score_only_from_copies_that_follow_its_trial() {
        let config = PoolConfig::new(64 * u64::from(B), B);
        let mut s = Score::new(256);
        s.trials = 2;
        s.trial = Some(Trial {
            from: Variant::Tuned,
            to: Variant::Loop,
            ran: 0,
        });
        let word = s.trial_word();
        let mut fresh = Copies::new(&config, 16);
        fresh.follow_trial(word);
        // A shard that saw only the trial before this one.
        let mut stale = Copies::new(&config, 16);
        stale.follow_trial(word - (1 << 8));
        assert!(fresh.trial.is_some() && stale.trial.is_some());
        // Ten keys in turn, ten times, through copies of 16 entries: the running copy and
        // the trial (both start empty) miss each key once and hit the other 90 reads.
        for n in 0..100 {
            let f = fp(n % 10);
            fresh.replay(&f, Variant::Tuned);
            stale.replay(&f, Variant::Tuned);
        }
        s.add(&mut fresh);
        s.add(&mut stale);
        let c = s.trial_counts;
        assert_eq!((c.running, c.tried, c.split), (90, 90, 0), "{c:?}");
        assert_eq!(
            fresh.trial_counts.running, 0,
            "a shard's counts were kept after adding"
        );
        // The trial's end drops the clone.
        fresh.follow_trial(0);
        assert!(fresh.trial.is_none());
    }

    #[test]
    fn on_uniform_random_reads_the_duel_does_not_flap() {
        // Every variant hits about half on uniform reads over twice the cache: a switch is
        // noise, and the margin must hold it off.
        let p = duelling(1000, 1);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..200_000 {
            x = mix64(x);
            read(&p, x % 2000);
        }
        let st = p.state();
        assert!(
            st.counters.variant_switches <= 3,
            "{} switches",
            st.counters.variant_switches
        );
    }

    #[test]
    fn the_shard_count_keeps_shards_large() {
        // As many as leave each shard SHARD_MIN_ENTRIES, a power of two, at most 64 on up to
        // 8 cores.
        for cores in [1, 2, 3, 8] {
            assert_eq!(auto_shards(1 << 30, cores), 64);
            assert_eq!(auto_shards(64 * 4096, cores), 64);
            assert_eq!(auto_shards(64 * 4096 - 1, cores), 32);
            assert_eq!(auto_shards(32_768, cores), 8);
            assert_eq!(auto_shards(16_384, cores), 4);
            assert_eq!(auto_shards(8_191, cores), 1);
            assert_eq!(auto_shards(0, cores), 1);
        }
        // Eight a core beyond that, while the shards stay large, and at most MAX_SHARDS.
        assert_eq!(auto_shards(1 << 30, 16), 128);
        assert_eq!(auto_shards(1 << 30, 12), 128);
        assert_eq!(auto_shards(64 * 4096, 16), 64);
        assert_eq!(auto_shards(1 << 30, 64), 512);
        assert_eq!(auto_shards(1 << 30, 1000), MAX_SHARDS);
        assert_eq!(auto_shards(1 << 30, usize::MAX), MAX_SHARDS);
        assert_eq!(auto_shards(0, 0), 1);
        // An asked-for count is rounded up to a power of two and capped.
        assert_eq!(duelling(100, 3).shard_count(), 4);
        assert_eq!(duelling(100, 1000).shard_count(), MAX_SHARDS);
        assert_eq!(duelling(100, 0).shard_count(), 1);
    }

    #[test]
    fn shards_split_the_capacity_and_the_keys_evenly() {
        let p = duelling(8 * 1024, 8);
        for n in 0..100_000u64 {
            read(&p, n);
        }
        let st = p.state();
        assert_eq!(st.shards, 8);
        assert_eq!(st.capacity_bytes, 8 * 1024 * u64::from(B));
        let held = st.single_bytes + st.multi_bytes;
        assert!(held <= st.capacity_bytes, "{held} bytes held");
        // Every shard is about full: the keys reach all of them, none holds more than its
        // share and the slack.
        for s in p.shards.iter() {
            let s = s.0.lock().pools.state();
            let most = s.capacity_bytes + (s.capacity_bytes as f64 * Budget::slack()) as u64;
            assert!(s.single_bytes + s.multi_bytes <= most);
            assert!(
                s.single_entries + s.multi_entries >= 900,
                "a shard holds {} entries of 1,024",
                s.single_entries + s.multi_entries
            );
        }
    }

    #[test]
    fn with_enough_entries_a_shard_sharded_pools_hit_as_one() {
        // Skewed reads (a hot quarter read 3 times as often) over twice the cache: the hit
        // count of 8 shards of 4,096 entries stays within 1% of one pool's.
        let run = |shards| {
            let p = ShardedPools::new(
                &PoolConfig {
                    fixed_rules: Some(Variant::Tuned),
                    ..PoolConfig::new(32_768 * u64::from(B), B)
                },
                shards,
            );
            let mut x = 0x2545_F491_4F6C_DD1Du64;
            let mut h = 0;
            for i in 0..400_000u64 {
                x = mix64(x);
                let k = if x.is_multiple_of(4) {
                    x % 65_536
                } else {
                    x % 16_384
                };
                let hit = read(&p, k).is_some();
                if i >= 100_000 {
                    h += u64::from(hit);
                }
            }
            h as f64
        };
        let (one, eight) = (run(1), run(8));
        assert!(
            (eight - one).abs() <= one * 0.01,
            "one pool {one} hits, 8 shards {eight}"
        );
    }

    #[test]
    fn the_duels_rules_reach_every_shard() {
        // A loop of 1.1 times a cache split in 4: every shard runs the loop rules.
        let p = duelling(2000, 4);
        for _ in 0..10 {
            hits(&p, 0..2200);
        }
        let h = hits(&p, 0..2200);
        assert_eq!(p.variant(), Variant::Loop);
        for n in 0..2200 {
            assert_eq!(p.shard(&fp(n)).variant(), Variant::Loop);
        }
        assert!(h >= 1400, "{h} hits of 2,200 in the loop's last pass");
    }

    #[test]
    fn threads_reading_at_once_find_every_held_key_and_feed_one_duel() {
        let p = duelling(4096, 8);
        for n in 0..2048 {
            read(&p, n);
        }
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let p = &p;
                s.spawn(move || {
                    for i in 0..20_000u64 {
                        let f = fp((i * 7 + t) % 2048);
                        let mut g = p.shard(&f);
                        g.observe(&f);
                        assert!(g.get(&f).is_some(), "a held key missed");
                    }
                });
            }
        });
        let st = p.state();
        assert_eq!(st.single_entries + st.multi_entries, 2048);
        assert!(st.duel);
        // Every look was sampled (4,096 entries), and each shard's copies hold its keys: all
        // 2,048 under every variant.
        let held = (0..4)
            .map(|k| {
                p.shards
                    .iter()
                    .map(|s| {
                        let st = s.0.lock().copies.as_ref().expect("copies").minis[k].state();
                        st.single_entries + st.multi_entries
                    })
                    .sum::<u64>()
            })
            .min()
            .unwrap_or(0);
        assert_eq!(held, 2048, "the copies hold {held} keys");
    }

    #[test]
    fn a_working_set_that_fits_the_cache_fits_its_shards() {
        // A loop over exactly the cache's blocks: the keys never split evenly over 4 shards,
        // but after the first pass every read hits, as in one pool (hard shares missed
        // wherever a shard drew more than a quarter of the keys).
        let p = ShardedPools::new(
            &PoolConfig {
                fixed_rules: Some(Variant::Lru),
                ..PoolConfig::new(20_000 * u64::from(B), B)
            },
            4,
        );
        hits(&p, 0..20_000);
        assert_eq!(hits(&p, 0..20_000), 20_000);
        // More blocks than fit: the cache stays within its capacity, give or take a block a
        // shard (a shard below its share does not evict for the whole; one above does at its
        // next admission).
        hits(&p, 20_000..30_000);
        let st = p.state();
        assert!(st.single_bytes + st.multi_bytes <= st.capacity_bytes + 4 * u64::from(B));
    }

    #[test]
    fn the_most_shards_asked_for_on_a_small_cache_hold_their_capacity_and_keep_a_duel() {
        // `cache.shards = 1024` on a cache of 2,048 blocks: 2 blocks a shard. The cache stays
        // within its capacity (a block a shard of slack), finds what it holds, and the duel
        // still has its copies and samples keys.
        let p = duelling(2048, MAX_SHARDS);
        assert_eq!(p.shard_count(), MAX_SHARDS);
        for _ in 0..3 {
            hits(&p, 0..6_000);
        }
        let st = p.state();
        let most = st.capacity_bytes + MAX_SHARDS as u64 * u64::from(B);
        assert!(st.single_bytes + st.multi_bytes <= most, "{st:?}");
        assert!(st.single_entries + st.multi_entries > 0);
        let held: Vec<u64> = (0..6_000)
            .filter(|&n| p.shard(&fp(n)).peek(&fp(n)).is_some())
            .collect();
        assert!(!held.is_empty());
        assert_eq!(hits(&p, held.iter().copied()), held.len() as u64);
        let copies = p
            .shards
            .iter()
            .filter(|s| s.0.lock().copies.is_some())
            .count();
        assert_eq!(copies, DUEL_SHARDS);
        let seen: u64 = p.shards[..DUEL_SHARDS]
            .iter()
            .map(|s| {
                let st = s.0.lock();
                let lru = &st.copies.as_ref().expect("copies").minis[Variant::Lru as usize];
                let st = lru.state();
                st.single_entries + st.multi_entries
            })
            .sum();
        assert!(seen > 0, "the duel sampled nothing");
    }
}

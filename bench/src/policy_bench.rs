//! `policy`: a block trace replayed page by page through the node's real RAM pools, beside a
//! plain LRU and ARC written for the bench ([`crate::policy_ref`]), on the same requests.
//!
//! The replay follows the rules of the ARC paper (Megiddo and Modha, FAST 2003): each request
//! expands into single-page requests, a page is 512 bytes unless `--page-size` says otherwise,
//! every request is a read, and the hit ratio is hits over page requests. Each page is a cache
//! block whose fingerprint is a fixed function of its page number, so the node's cache
//! ([`ContentCache`]) is driven exactly as the read path drives it: a RAM lookup, and on a miss
//! an admission.
//!
//! The source is a trace file (any format [`trace`] reads; LIRS traces, one 4 KiB block a
//! line, replay one block a page) or a synthetic family ([`crate::families`]).
//!
//! Six lines per capacity:
//! - `OPT`: Belady's offline optimum, the ceiling;
//! - `LRU`: the plain LRU reference (it reproduces the paper's LRU column to the second decimal);
//! - `ARC`: the ARC reference (Figure 4 of the paper);
//! - `LIRS`: LIRS as published (Jiang and Zhang, SIGMETRICS 2002);
//! - `SLRU`: the node's pools with the policy switched off: a fixed 25/75 split, no ghosts, no
//!   second chances (the foundation's segmented LRU);
//! - `shadowcache`: the node's pools as configured by default.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shadowcache_node::cache::fingerprint::mix64;
use shadowcache_node::cache::{
    CacheConfig, ContentCache, Fingerprint, FingerprintHashing, SsdConfig, Tier,
};

use crate::families;
use crate::plot;
use crate::policy_ref;
use crate::trace;

/// Prints a `--segments` table: hit % per segment, with the best line of each segment marked.
fn print_segments(t: &SegmentTable, requests: u64) {
    println!(
        "hit % in each {} requests at {} pages (* the best; rules: what the shadowcache line ran at the segment's end):",
        t.requests_per_segment, t.capacity_pages
    );
    print!("{:>8} {:>10}", "segment", "requests");
    for p in &t.policies {
        print!(" {p:>12}");
    }
    println!(" {:>7}", "rules");
    for (i, (hits, rules)) in t.hits.iter().zip(&t.rules).enumerate() {
        let start = i as u64 * t.requests_per_segment;
        let len = t.requests_per_segment.min(requests - start);
        let best = hits.iter().copied().max().unwrap_or(0);
        print!("{:>8} {:>10}", i + 1, start);
        for &h in hits {
            let mark = if h == best { "*" } else { " " };
            print!(" {:>11.2}{mark}", 100.0 * h as f64 / len.max(1) as f64);
        }
        println!(" {rules:>7}");
    }
}

/// The published table (Megiddo and Modha, FAST 2003), as in `shared/reference/cache.md`:
/// trace, capacity in pages, LRU %, ARC %.
pub const PUBLISHED: &[(&str, u64, f64, f64)] = &[
    ("P2", 32768, 18.47, 27.38),
    ("P3", 32768, 3.57, 17.12),
    ("P6", 32768, 4.24, 23.84),
    ("OLTP", 1000, 32.83, 38.93),
    ("OLTP", 5000, 53.65, 55.25),
    ("OLTP", 15000, 64.63, 65.40),
];

/// Where the page requests come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A trace (any format of [`trace::Format`]; its reads are replayed), read so.
    Trace(PathBuf, trace::Options),
    /// A synthetic family.
    Synthetic(families::Spec),
}

impl Source {
    /// The short name reports and plots use: `P2` for `P2.lis.zst`, `zigzag` for a family.
    pub fn name(&self) -> String {
        match self {
            Source::Trace(path, _) => trace_name(path),
            Source::Synthetic(spec) => spec.family.name().to_string(),
        }
    }
}

/// What to replay.
#[derive(Debug, Clone)]
pub struct Options {
    /// The page requests.
    pub source: Source,
    /// Capacities in pages.
    pub capacities: Vec<u64>,
    /// Bytes per page (`None`: 4 KiB for LIRS traces and synthetic families, one block a page;
    /// 512 for the others, the ARC paper's rule).
    pub page_bytes: Option<u64>,
    /// Replace `capacities` by a sweep from 1/64 of the footprint to all of it.
    pub sweep: bool,
    /// Write PNG and SVG plots with this path prefix (sweeps).
    pub plot: Option<PathBuf>,
    /// The tiered replay: RAM pages, the rest of each capacity on SSD.
    pub ram_pages: Option<u64>,
    /// Where the tiered replay keeps its SSD files (default: a temporary directory).
    pub scratch: Option<PathBuf>,
    /// Seconds per RAM-hit lookup measurement (0: skip).
    pub lookup_seconds: f64,
    /// Policy settings for the `shadowcache` line (defaults: the node's).
    pub tuning: Tuning,
    /// Also replay each capacity counting hits in every this many requests, for LRU, ARC,
    /// the `shadowcache` line and each set of the pools' rules kept fixed: where in a trace
    /// which rules win.
    pub segments: Option<u64>,
}

/// The node's policy settings to replay with, where they differ from its defaults (the
/// `[cache]` keys of the same names).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tuning {
    /// `single_touch_share`: the target at start.
    pub single_touch_share: Option<f64>,
    /// `single_touch_min`.
    pub single_touch_min: Option<f64>,
    /// `single_touch_max`.
    pub single_touch_max: Option<f64>,
    /// `ghost_ratio`.
    pub ghost_ratio: Option<f64>,
    /// `adaptive_split`.
    pub adaptive: Option<bool>,
    /// `second_chances`.
    pub second_chances: Option<bool>,
    /// `policy`: `Some(None)` lets the duel pick, `Some(Some(v))` keeps `v`.
    pub policy_rules: Option<Option<shadowcache_node::cache::pool::Variant>>,
    /// `shards` (0: picked by the cores and the capacity, as the node does).
    pub shards: Option<usize>,
    /// `ssd_admission` (the tiered replay).
    pub ssd_admission: Option<shadowcache_node::cache::SsdAdmission>,
    /// `ssd_promote_hits` (the tiered replay).
    pub ssd_promote_hits: Option<u8>,
}

impl Tuning {
    /// `config` with these settings applied.
    pub fn apply(&self, mut config: CacheConfig) -> CacheConfig {
        let t = *self;
        config.single_touch_share = t.single_touch_share.unwrap_or(config.single_touch_share);
        config.single_touch_min = t.single_touch_min.unwrap_or(config.single_touch_min);
        config.single_touch_max = t.single_touch_max.unwrap_or(config.single_touch_max);
        config.ghost_ratio = t.ghost_ratio.unwrap_or(config.ghost_ratio);
        config.adaptive = t.adaptive.unwrap_or(config.adaptive);
        config.second_chances = t.second_chances.unwrap_or(config.second_chances);
        config.policy_rules = t.policy_rules.unwrap_or(config.policy_rules);
        config.shards = t.shards.unwrap_or(config.shards);
        config.ssd_admission = t.ssd_admission.unwrap_or(config.ssd_admission);
        config.ssd_promote_hits = t.ssd_promote_hits.unwrap_or(config.ssd_promote_hits);
        config
    }
}

/// Hit ratio of one policy at one capacity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyHits {
    /// The policy.
    pub policy: String,
    /// Hits.
    pub hits: u64,
    /// Hits over page requests, in percent.
    pub hit_percent: f64,
}

/// What the node's pools did in one replay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolReport {
    /// Single-touch target at the end, as a share of the capacity.
    pub single_share_end: f64,
    /// Lowest and highest single-touch target seen (sampled every 4096 requests).
    pub single_share_range: (f64, f64),
    /// Admissions found in the single-touch ghost.
    pub ghost_hits_single: u64,
    /// Admissions found in the multi-touch ghost.
    pub ghost_hits_multi: u64,
    /// Largest ghost sizes seen (single, multi) and the bound of each.
    pub ghost_keys_max: (u64, u64),
    /// The ghosts' bound in keys.
    pub ghost_capacity: u64,
    /// Promotions (single -> multi).
    pub promotions: u64,
    /// The eviction rules the pools ran at the end (the duel's pick).
    #[serde(default)]
    pub rules_end: String,
    /// Times the duel changed the rules.
    #[serde(default)]
    pub rule_switches: u64,
    /// Shards the pools were split into.
    #[serde(default)]
    pub shards: u32,
    /// The same replay in one shard, in percent, when the pools had more than one: what
    /// sharding cost.
    #[serde(default)]
    pub unsharded_percent: Option<f64>,
}

/// One capacity of the replay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Cache capacity in pages.
    pub capacity_pages: u64,
    /// Every policy's result.
    pub policies: Vec<PolicyHits>,
    /// The node's pools, as configured by default.
    pub shadowcache: PoolReport,
}

impl Row {
    /// The higher of LRU's and ARC's hit ratios, in percent.
    pub fn best_online(&self) -> f64 {
        self.percent("LRU").max(self.percent("ARC"))
    }

    /// The node's pools minus [`Row::best_online`], in points.
    pub fn margin(&self) -> f64 {
        self.percent("shadowcache") - self.best_online()
    }

    /// One policy's hit ratio in percent (NaN when the row has none of that name).
    pub fn percent(&self, name: &str) -> f64 {
        self.policies
            .iter()
            .find(|p| p.policy == name)
            .map_or(f64::NAN, |p| p.hit_percent)
    }
}

/// A published row beside the replay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    /// Capacity in pages.
    pub capacity_pages: u64,
    /// The paper's LRU figure.
    pub lru_published: f64,
    /// Our LRU reference.
    pub lru_measured: f64,
    /// Whether they agree to the second decimal.
    pub lru_reproduced: bool,
    /// The paper's ARC figure.
    pub arc_published: f64,
    /// Our ARC reference.
    pub arc_measured: f64,
    /// The node's pools.
    pub shadowcache: f64,
    /// The node's pools minus the paper's ARC, in points.
    pub shadowcache_minus_arc: f64,
}

/// The tiered replay at one capacity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TierRow {
    /// Total capacity in pages (RAM plus SSD).
    pub capacity_pages: u64,
    /// RAM pages.
    pub ram_pages: u64,
    /// SSD pages.
    pub ssd_pages: u64,
    /// Hits in RAM single-touch.
    pub hits_ram_single: u64,
    /// Hits in RAM multi-touch.
    pub hits_ram_multi: u64,
    /// Hits on SSD.
    pub hits_ssd: u64,
    /// Misses.
    pub misses: u64,
    /// Entries written from RAM multi-touch to SSD.
    pub demotions: u64,
    /// Entries dropped from SSD.
    pub ssd_evictions: u64,
    /// Demotions dropped because the SSD writer was behind.
    pub demotions_dropped: u64,
    /// Entries RAM multi-touch let go that the SSD's admission refused.
    #[serde(default)]
    pub ssd_admissions_refused: u64,
    /// SSD reads that failed verification (must be 0).
    pub ssd_verify_failures: u64,
    /// Payload bytes written to SSD slots.
    #[serde(default)]
    pub ssd_written_bytes: u64,
    /// Payload bytes SSD hits served.
    #[serde(default)]
    pub ssd_served_bytes: u64,
    /// Demotions that wrote nothing (the SSD kept a copy since the entry's last SSD hit).
    #[serde(default)]
    pub ssd_writes_saved: u64,
    /// All hits over page requests, in percent.
    pub hit_percent: f64,
    /// The same capacity all in RAM, in percent (for comparison).
    pub all_ram_hit_percent: f64,
}

/// In-process RAM-hit lookups per second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LookupRate {
    /// The pools measured.
    pub pools: String,
    /// Threads looking up at once.
    pub threads: usize,
    /// Cores of the machine that measured it.
    #[serde(default)]
    pub cores: usize,
    /// Lookups per second, all threads together.
    pub per_second: f64,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Output {
    /// Trace file name, or the synthetic family's.
    pub trace: String,
    /// The synthetic family's parameters, in words (none for a trace).
    #[serde(default)]
    pub synthetic: Option<String>,
    /// Page requests replayed.
    pub requests: u64,
    /// Distinct pages.
    pub footprint_pages: u64,
    /// Bytes per page.
    pub page_bytes: u64,
    /// One row per capacity.
    pub rows: Vec<Row>,
    /// Rows of the published table for this trace.
    pub published: Vec<Published>,
    /// The tiered replay, if asked for.
    pub tiers: Vec<TierRow>,
    /// RAM-hit lookup rates.
    pub lookups: Vec<LookupRate>,
    /// Bytes of memory per ghost key (node and table).
    pub ghost_bytes_per_key: Option<f64>,
    /// The seed of the cache's hash keys (`--hash-seed` repeats the run).
    #[serde(default)]
    pub hash_seed: Option<u64>,
    /// Hits per segment of the requests, if asked for (`--segments`).
    #[serde(default)]
    pub segments: Vec<SegmentTable>,
}

/// Hits in each segment of the requests at one capacity (`--segments`): the same requests
/// through LRU, ARC, the pools as configured, and the pools under each set of rules kept
/// fixed, side by side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentTable {
    /// Cache capacity in pages.
    pub capacity_pages: u64,
    /// Requests in each segment (the last may hold fewer).
    pub requests_per_segment: u64,
    /// The policies, in the order of each segment's hits: `LRU`, `ARC`, `shadowcache`, then
    /// `tuned`, `arc`, `lru` and `loop` (the pools with those rules kept fixed).
    pub policies: Vec<String>,
    /// Hits of each policy in each segment: `hits[segment][policy]`.
    pub hits: Vec<Vec<u64>>,
    /// The rules the `shadowcache` line's pools ran at the end of each segment.
    pub rules: Vec<String>,
}

/// The fingerprint page `page` is cached under: a fixed mix of the page number filling all
/// 32 bytes (the cache hashes some bytes and keys its ghosts by others).
pub fn page_fingerprint(page: u64) -> Fingerprint {
    let mut b = [0u8; 32];
    for (k, chunk) in b.chunks_exact_mut(8).enumerate() {
        let x = mix64(page.wrapping_add(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(k as u64 + 1)));
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    Fingerprint(b)
}

/// The node's cache settings for a replay of `capacity_pages` pages of `page_bytes`.
pub fn cache_config(capacity_pages: u64, page_bytes: u64) -> CacheConfig {
    CacheConfig {
        block_bytes: page_bytes as u32,
        ram_bytes: capacity_pages * page_bytes,
        demotion_queue: 1 << 16,
        ..CacheConfig::default()
    }
}

/// The foundation's segmented LRU in the same pools: fixed 25/75 split, nothing else.
pub fn slru_config(capacity_pages: u64, page_bytes: u64) -> CacheConfig {
    CacheConfig {
        single_touch_share: 0.25,
        adaptive: false,
        ghost_ratio: 0.0,
        second_chances: false,
        policy_rules: Some(shadowcache_node::cache::pool::Variant::Tuned),
        ..cache_config(capacity_pages, page_bytes)
    }
}

/// One request of a replay through the node's cache (RAM only): a hit, or a miss and the
/// admission of `payload`.
fn replay_one(cache: &ContentCache, page: u64, payload: &Bytes) -> bool {
    let fp = page_fingerprint(page);
    if cache.get_ram(&fp).is_some() {
        true
    } else {
        cache.record_miss();
        cache.admit(fp, payload.clone());
        false
    }
}

/// Replays `pages` through the node's cache (RAM only): hits and what the pools did.
pub fn replay_cache(pages: &[u64], config: CacheConfig) -> anyhow::Result<(u64, PoolReport)> {
    let payload = Bytes::from(vec![0xA5u8; config.block_bytes as usize]);
    let (cache, _) = ContentCache::open(config).context("open the cache")?;
    let mut hits = 0u64;
    let mut lo = f64::MAX;
    let mut hi = 0f64;
    let mut ghost_max = (0u64, 0u64);
    for (n, &p) in pages.iter().enumerate() {
        hits += u64::from(replay_one(&cache, p, &payload));
        if n % 4096 == 0 {
            let st = cache.policy();
            lo = lo.min(st.single_share());
            hi = hi.max(st.single_share());
            ghost_max = (
                ghost_max.0.max(st.ghost_single),
                ghost_max.1.max(st.ghost_multi),
            );
        }
    }
    let st = cache.policy();
    Ok((
        hits,
        PoolReport {
            single_share_end: st.single_share(),
            single_share_range: (lo.min(st.single_share()), hi.max(st.single_share())),
            ghost_hits_single: st.counters.ghost_hits_single,
            ghost_hits_multi: st.counters.ghost_hits_multi,
            ghost_keys_max: (
                ghost_max.0.max(st.ghost_single),
                ghost_max.1.max(st.ghost_multi),
            ),
            ghost_capacity: st.ghost_capacity,
            promotions: cache.stats().promotions.get(),
            rules_end: st.variant.name().to_string(),
            rule_switches: st.counters.variant_switches,
            shards: st.shards,
            unsharded_percent: None,
        },
    ))
}

/// Replays `pages` through the node's cache (RAM only): the hits in each `every` requests,
/// and the rules the pools ran at the end of each.
pub fn segment_hits_cache(
    pages: &[u64],
    config: CacheConfig,
    every: usize,
) -> anyhow::Result<(Vec<u64>, Vec<String>)> {
    let payload = Bytes::from(vec![0xA5u8; config.block_bytes as usize]);
    let (cache, _) = ContentCache::open(config).context("open the cache")?;
    Ok(pages
        .chunks(every.max(1))
        .map(|seg| {
            let hits: u64 = seg
                .iter()
                .map(|&p| u64::from(replay_one(&cache, p, &payload)))
                .sum();
            (hits, cache.policy().variant.name().to_string())
        })
        .unzip())
}

/// The `--segments` table at one capacity: LRU, ARC, the pools as `tuning` sets them, and the
/// pools under each set of rules kept fixed (on as many threads as there are lines).
fn segment_table(
    pages: &[u64],
    capacity: u64,
    page_bytes: u64,
    tuning: Tuning,
    every: u64,
) -> anyhow::Result<SegmentTable> {
    use shadowcache_node::cache::pool::Variant;
    let cap = usize::try_from(capacity).context("capacity")?;
    let n = usize::try_from(every).context("--segments")?;
    let fixed = |v: Variant| {
        Tuning {
            policy_rules: Some(Some(v)),
            ..tuning
        }
        .apply(cache_config(capacity, page_bytes))
    };
    let (lru, arc, ours, variants) = std::thread::scope(|s| {
        let lru =
            s.spawn(move || policy_ref::segment_hits(&mut policy_ref::Lru::new(cap), pages, n));
        let arc =
            s.spawn(move || policy_ref::segment_hits(&mut policy_ref::Arc::new(cap), pages, n));
        let variants: Vec<_> = Variant::ALL
            .iter()
            .map(|&v| {
                let config = fixed(v);
                s.spawn(move || segment_hits_cache(pages, config, n))
            })
            .collect();
        let ours = segment_hits_cache(pages, tuning.apply(cache_config(capacity, page_bytes)), n);
        let joined: Vec<_> = variants.into_iter().map(|h| h.join()).collect();
        (lru.join(), arc.join(), ours, joined)
    });
    let panicked = |_| anyhow::anyhow!("a segment replay panicked");
    let (lru, arc) = (lru.map_err(panicked)?, arc.map_err(panicked)?);
    let (ours, rules) = ours?;
    let mut columns = vec![lru, arc, ours];
    for v in variants {
        columns.push(v.map_err(panicked)??.0);
    }
    let segments = columns[0].len();
    Ok(SegmentTable {
        capacity_pages: capacity,
        requests_per_segment: every,
        policies: ["LRU", "ARC", "shadowcache"]
            .into_iter()
            .chain(Variant::ALL.iter().map(|v| v.name()))
            .map(str::to_string)
            .collect(),
        hits: (0..segments)
            .map(|i| columns.iter().map(|c| c[i]).collect())
            .collect(),
        rules,
    })
}

fn percent(hits: u64, n: usize) -> f64 {
    if n == 0 {
        0.0
    } else {
        100.0 * hits as f64 / n as f64
    }
}

/// Runs the six policies at one capacity (on three threads).
fn row(pages: &[u64], capacity: u64, page_bytes: u64, tuning: Tuning) -> anyhow::Result<Row> {
    let cap = usize::try_from(capacity).context("capacity")?;
    let (refs, more, ours, slru) = std::thread::scope(|s| {
        let refs = s.spawn(move || {
            let lru = policy_ref::replay(&mut policy_ref::Lru::new(cap), pages).hits;
            let arc = policy_ref::replay(&mut policy_ref::Arc::new(cap), pages).hits;
            (lru, arc)
        });
        let more = s.spawn(move || {
            let lirs = policy_ref::replay(&mut policy_ref::Lirs::new(cap), pages).hits;
            let opt = policy_ref::replay(&mut policy_ref::Opt::new(cap, pages), pages).hits;
            (lirs, opt)
        });
        let slru = s.spawn(move || replay_cache(pages, slru_config(capacity, page_bytes)));
        let config = tuning.apply(cache_config(capacity, page_bytes));
        let unsharded = (config.shard_count() > 1).then(|| {
            let one = CacheConfig {
                shards: 1,
                ..config.clone()
            };
            s.spawn(move || replay_cache(pages, one).map(|r| r.0))
        });
        let ours = replay_cache(pages, config).and_then(|(hits, mut report)| {
            if let Some(u) = unsharded {
                let one = u
                    .join()
                    .map_err(|_| anyhow::anyhow!("unsharded replay panicked"))??;
                report.unsharded_percent = Some(percent(one, pages.len()));
            }
            Ok((hits, report))
        });
        (refs.join(), more.join(), ours, slru.join())
    });
    let (lru, arc) = refs.map_err(|_| anyhow::anyhow!("reference replay panicked"))?;
    let (lirs, opt) = more.map_err(|_| anyhow::anyhow!("LIRS or OPT replay panicked"))?;
    let (ours, report) = ours?;
    let (slru, _) = slru.map_err(|_| anyhow::anyhow!("SLRU replay panicked"))??;
    let n = pages.len();
    let hits = |policy: &str, hits: u64| PolicyHits {
        policy: policy.to_string(),
        hits,
        hit_percent: percent(hits, n),
    };
    Ok(Row {
        capacity_pages: capacity,
        policies: vec![
            hits("OPT", opt),
            hits("LRU", lru),
            hits("ARC", arc),
            hits("LIRS", lirs),
            hits("SLRU", slru),
            hits("shadowcache", ours),
        ],
        shadowcache: report,
    })
}

/// The tiered replay: `ram_pages` of RAM and the rest of `capacity` on SSD, through the node's
/// cache as the read path drives it (RAM, then SSD, then an admission).
fn tier_row(
    pages: &[u64],
    capacity: u64,
    ram_pages: u64,
    page_bytes: u64,
    dir: &Path,
    all_ram: f64,
    tuning: Tuning,
) -> anyhow::Result<TierRow> {
    if ram_pages == 0 || ram_pages >= capacity {
        bail!("--ram must be between 1 and the capacity ({capacity} pages), not {ram_pages}");
    }
    let ssd_pages = capacity - ram_pages;
    let sub = dir.join(format!("c{capacity}"));
    std::fs::create_dir_all(&sub)?;
    let config = CacheConfig {
        ssd: Some(SsdConfig {
            data_path: sub.join("slots"),
            index_path: sub.join("index"),
            capacity_bytes: ssd_pages * page_bytes,
            slot_bytes: page_bytes as u32,
            // A replay of millions of reads measures the policy, not the device.
            direct: false,
        }),
        ..tuning.apply(cache_config(ram_pages, page_bytes))
    };
    // The SSD tier verifies every read against the fingerprint, so here each page has real
    // content (its number, repeated) and the fingerprint is that content's BLAKE3.
    let mut buf = vec![0u8; page_bytes as usize];
    let (cache, _) = ContentCache::open(config).context("open the tiered cache")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut ram_single, mut ram_multi, mut ssd, mut misses) = (0u64, 0u64, 0u64, 0u64);
    for (n, &p) in pages.iter().enumerate() {
        for chunk in buf.chunks_exact_mut(8) {
            chunk.copy_from_slice(&p.to_le_bytes());
        }
        let fp = Fingerprint::of(&buf);
        let hit = match cache.get_ram(&fp) {
            Some(h) => Some(h),
            None => rt.block_on(cache.get(&fp)),
        };
        match hit.map(|h| h.1) {
            Some(Tier::RamSingle) => ram_single += 1,
            Some(Tier::RamMulti) => ram_multi += 1,
            Some(Tier::Ssd) => ssd += 1,
            None => {
                misses += 1;
                cache.admit(fp, Bytes::copy_from_slice(&buf));
            }
        }
        // Let the SSD writer keep up, as a real device's queue would, so that demotions
        // are dropped only when the queue itself overflows.
        if n % 8192 == 8191 {
            cache.settle();
        }
    }
    cache.settle();
    let s = cache.stats();
    let hits = ram_single + ram_multi + ssd;
    Ok(TierRow {
        capacity_pages: capacity,
        ram_pages,
        ssd_pages,
        hits_ram_single: ram_single,
        hits_ram_multi: ram_multi,
        hits_ssd: ssd,
        misses,
        demotions: s.demotions.get(),
        ssd_evictions: s.evictions_ssd.get(),
        demotions_dropped: s
            .evictions_ram_multi
            .get()
            .saturating_sub(s.ssd_admissions_refused.get()),
        ssd_admissions_refused: s.ssd_admissions_refused.get(),
        ssd_verify_failures: s.ssd_verify_failures.get(),
        ssd_written_bytes: s.ssd_written_bytes.get(),
        ssd_served_bytes: s.ssd_served_bytes.get(),
        ssd_writes_saved: s.ssd_writes_saved.get(),
        hit_percent: percent(hits, pages.len()),
        all_ram_hit_percent: all_ram,
    })
}

/// Capacities of a sweep: 1/64 of the footprint to all of it, two points an octave, and
/// 1/20, 1/10 and 1/1.1 of it (a loop over the footprint is then 1.1 x the cache).
pub fn sweep_capacities(footprint: u64) -> Vec<u64> {
    let mut out: Vec<u64> = (0..=12)
        .map(|k| footprint as f64 * 2f64.powf(-6.0 + f64::from(k) / 2.0))
        .chain([
            footprint as f64 / 20.0,
            footprint as f64 / 10.0,
            footprint as f64 / 1.1,
        ])
        .map(|c| (c.round() as u64).max(1))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The trace's short name: `P2` for `P2.lis.zst`.
pub fn trace_name(path: &Path) -> String {
    let f = path
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    f.split('.').next().unwrap_or_default().to_string()
}

/// Runs the replay and prints a table.
pub fn run(opts: Options) -> anyhow::Result<Output> {
    if let Some(b) = opts.page_bytes
        && (!(512..=1 << 20).contains(&b) || !b.is_power_of_two())
    {
        bail!("--page-size {b} is not a power of two from 512 to 1MiB");
    }
    let name = opts.source.name();
    let (pages, page_bytes, synthetic) = match &opts.source {
        Source::Trace(path, trace_opts) => {
            let (reqs, format) = trace::read_requests_and_format(path, trace_opts)?;
            let page_bytes = opts.page_bytes.unwrap_or(match format {
                trace::Format::Lirs => trace::LIRS_BLOCK,
                _ => trace::LIS_SECTOR,
            });
            let mut pages = Vec::new();
            policy_ref::for_each_page(&reqs, page_bytes, |p| pages.push(p));
            (pages, page_bytes, None)
        }
        Source::Synthetic(spec) => {
            let d = spec.describe();
            println!("{d}");
            (spec.generate()?, opts.page_bytes.unwrap_or(4096), Some(d))
        }
    };
    let footprint = {
        let mut sorted = pages.clone();
        sorted.sort_unstable();
        sorted.dedup();
        sorted.len() as u64
    };
    eprintln!(
        "{name}: {} page requests of {page_bytes} bytes, footprint {footprint} pages",
        pages.len(),
    );
    let capacities = if opts.sweep {
        sweep_capacities(footprint)
    } else {
        opts.capacities.clone()
    };
    if capacities.is_empty() {
        bail!("give --capacity PAGES (one or more) or --sweep");
    }
    if let Some(&c) = capacities.iter().find(|&&c| c == 0 || c > 1 << 30) {
        bail!("capacity {c} pages is out of range (1 to 2^30)");
    }

    println!(
        "{:>10} {:>7} {:>7} {:>7} {:>7} {:>7} {:>13} {:>8} {:>8} {:>13} {:>11} {:>11} {:>14}",
        "pages",
        "OPT %",
        "LRU %",
        "ARC %",
        "LIRS %",
        "SLRU %",
        "shadowcache %",
        "-best",
        "/OPT",
        "single share",
        "ghost hits",
        "rules/flips",
        "shards (-1)"
    );
    let mut rows = Vec::new();
    for &c in &capacities {
        let r = row(&pages, c, page_bytes, opts.tuning)?;
        let ours = r.percent("shadowcache");
        let opt = r.percent("OPT");
        println!(
            "{:>10} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>13.2} {:>+8.2} {:>8.3} {:>6.3}..{:<5.3} {:>11} {:>11} {:>14}",
            c,
            opt,
            r.percent("LRU"),
            r.percent("ARC"),
            r.percent("LIRS"),
            r.percent("SLRU"),
            ours,
            ours - r.best_online(),
            if opt > 0.0 { ours / opt } else { f64::NAN },
            r.shadowcache.single_share_range.0,
            r.shadowcache.single_share_range.1,
            r.shadowcache.ghost_hits_single + r.shadowcache.ghost_hits_multi,
            format!(
                "{}/{}",
                r.shadowcache.rules_end, r.shadowcache.rule_switches
            ),
            match r.shadowcache.unsharded_percent {
                Some(one) => format!("{} ({:+.2})", r.shadowcache.shards, ours - one),
                None => r.shadowcache.shards.to_string(),
            }
        );
        rows.push(r);
    }
    if let Some(worst) = rows.iter().min_by(|a, b| a.margin().total_cmp(&b.margin())) {
        println!(
            "worst point: {} pages, shadowcache {:+.2} points from max(LRU, ARC) (target: -0.50 or better)",
            worst.capacity_pages,
            worst.margin()
        );
    }

    let mut published = Vec::new();
    if page_bytes == 512 && synthetic.is_none() {
        for &(t, c, lru_p, arc_p) in PUBLISHED.iter().filter(|p| p.0 == name) {
            let Some(r) = rows.iter().find(|r| r.capacity_pages == c) else {
                continue;
            };
            let lru = r.percent("LRU");
            let ours = r.percent("shadowcache");
            let p = Published {
                capacity_pages: c,
                lru_published: lru_p,
                lru_measured: lru,
                lru_reproduced: format!("{lru:.2}") == format!("{lru_p:.2}"),
                arc_published: arc_p,
                arc_measured: r.percent("ARC"),
                shadowcache: ours,
                shadowcache_minus_arc: ours - arc_p,
            };
            println!(
                "published {t} c={c}: LRU {lru_p:.2} (ours {lru:.2}, {}), ARC {arc_p:.2} (ours {:.2}); shadowcache {ours:.2} = ARC {:+.2}",
                if p.lru_reproduced {
                    "reproduced"
                } else {
                    "NOT REPRODUCED"
                },
                p.arc_measured,
                p.shadowcache_minus_arc
            );
            published.push(p);
        }
    }

    let mut tiers = Vec::new();
    if let Some(ram) = opts.ram_pages {
        let tmp;
        let dir = match &opts.scratch {
            Some(d) => d.clone(),
            None => {
                tmp = tempfile::tempdir()?;
                tmp.path().to_path_buf()
            }
        };
        println!(
            "{:>10} {:>8} {:>8} {:>11} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>7} {:>9} {:>12}",
            "pages",
            "RAM",
            "SSD",
            "RAM single",
            "RAM multi",
            "SSD hits",
            "misses",
            "demoted",
            "refused",
            "hit %",
            "all-RAM",
            "dropped",
            "ssd w/served"
        );
        for r in &rows {
            let t = tier_row(
                &pages,
                r.capacity_pages,
                ram.min(r.capacity_pages.saturating_sub(1)).max(1),
                page_bytes,
                &dir,
                r.percent("shadowcache"),
                opts.tuning,
            )?;
            println!(
                "{:>10} {:>8} {:>8} {:>11} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9.2} {:>7.2} {:>9} {:>12.3}",
                t.capacity_pages,
                t.ram_pages,
                t.ssd_pages,
                t.hits_ram_single,
                t.hits_ram_multi,
                t.hits_ssd,
                t.misses,
                t.demotions,
                t.ssd_admissions_refused,
                t.hit_percent,
                t.all_ram_hit_percent,
                t.demotions_dropped,
                t.ssd_written_bytes as f64 / t.ssd_served_bytes.max(1) as f64
            );
            tiers.push(t);
        }
    }

    let mut segments = Vec::new();
    if let Some(every) = opts.segments {
        if every == 0 {
            bail!("--segments must be at least 1 request");
        }
        for r in &rows {
            let t = segment_table(&pages, r.capacity_pages, page_bytes, opts.tuning, every)?;
            print_segments(&t, pages.len() as u64);
            segments.push(t);
        }
    }

    let lookups = if opts.lookup_seconds > 0.0 {
        lookup_rates(opts.lookup_seconds)?
    } else {
        Vec::new()
    };

    let out = Output {
        trace: name.clone(),
        synthetic,
        requests: pages.len() as u64,
        footprint_pages: footprint,
        page_bytes,
        rows,
        published,
        tiers,
        lookups,
        ghost_bytes_per_key: ghost_bytes_per_key(),
        // The caller fixed the keys, and records the seed.
        hash_seed: None,
        segments,
    };
    match out.ghost_bytes_per_key {
        Some(b) => println!(
            "memory per ghost key: {b:.1} bytes (list node and table, measured with the counting allocator)"
        ),
        None => {
            println!("memory per ghost key: not measured (no counting allocator in this binary)")
        }
    }
    if let Some(prefix) = &opts.plot {
        draw(&out, prefix)?;
    }
    Ok(out)
}

/// Hit ratio against capacity, one line per policy, as `prefix.png` and `prefix.svg`.
pub fn draw(out: &Output, prefix: &Path) -> anyhow::Result<()> {
    let names = ["OPT", "LRU", "ARC", "LIRS", "SLRU", "shadowcache"];
    let series: Vec<plot::Series> = names
        .iter()
        .map(|n| plot::Series {
            name: (*n).to_string(),
            points: out
                .rows
                .iter()
                .map(|r| (r.capacity_pages as f64, r.percent(n)))
                .collect(),
        })
        .collect();
    let png = prefix.with_extension("png");
    let svg = prefix.with_extension("svg");
    plot::line_chart(
        &format!(
            "{}: hit ratio against cache size ({} B pages)",
            out.trace, out.page_bytes
        ),
        "cache size (pages)",
        "hit ratio (%)",
        true,
        &series,
        &png,
        &svg,
    )?;
    eprintln!("plot written to {} and {}", png.display(), svg.display());
    Ok(())
}

/// Measured bytes per ghost key: the live heap of pools with ghosts, minus that of the same
/// pools without, after the same once-read workload, over the keys the ghosts hold. (Needs the
/// bench binary's counting allocator; none without it.)
pub fn ghost_bytes_per_key() -> Option<f64> {
    use shadowcache_node::cache::pool::{PoolConfig, Pools};
    let keys = 1u64 << 16;
    let payload = Bytes::from_static(&[1u8; 512]);
    let held = |ghost_ratio: f64| {
        let before = crate::alloc::live_bytes();
        let mut pools = Pools::new(&PoolConfig {
            ghost_ratio,
            ..PoolConfig::new(keys * 512, 512)
        });
        // A cache-full read twice (multi-touch), then two cache-fulls read once: the
        // single-touch ghost fills, and no key is read again after its eviction.
        for p in 0..3 * keys {
            let fp = page_fingerprint(p);
            let c = shadowcache_node::cache::Cached {
                bytes: payload.clone(),
                refs: 1,
            };
            pools.insert(fp, c, false, &mut |_, _, _| {});
            if p < keys {
                let _ = pools.get(&fp);
            }
        }
        let st = pools.state();
        let bytes = crate::alloc::live_bytes() - before;
        drop(pools);
        (bytes, st.ghost_single + st.ghost_multi)
    };
    let (without, _) = held(0.0);
    let (with, ghosts) = held(1.0);
    (ghosts > 0 && with > without).then(|| (with - without) as f64 / ghosts as f64)
}

/// A lookup under measurement.
type Lookup<'a> = dyn Fn(&Fingerprint) -> Option<Bytes> + Sync + 'a;

/// Threads the lookup rates are measured on.
pub const LOOKUP_THREADS: [usize; 5] = [1, 2, 4, 8, 16];
/// Tries of each lookup-rate point (the best is kept).
pub const LOOKUP_ROUNDS: usize = 3;

/// In-process RAM-hit lookups per second for the node's pools (sharded as the node shards
/// them, and in one shard), the same pools with the policy off, and the
/// foundation's moka pools, on 1, 2, 4, 8 and 16 threads. The keys (2^18 of them, a cache
/// twice that) are about what a host's RAM tier holds, so that lookups miss the CPU caches as
/// they do there, and each has its own bytes (a hit clones them: one shared buffer would put
/// every thread on one reference count).
pub fn lookup_rates(seconds: f64) -> anyhow::Result<Vec<LookupRate>> {
    const BLOCK: u64 = 512;
    const KEYS: u64 = 1 << 18;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let fps: Vec<Fingerprint> = (0..KEYS).map(page_fingerprint).collect();
    let payloads: Vec<Bytes> = (0..KEYS)
        .map(|k| Bytes::from(vec![k as u8; BLOCK as usize]))
        .collect();
    let mut out = Vec::new();
    let ours = |config: CacheConfig| -> anyhow::Result<ContentCache> {
        let (c, _) = ContentCache::open(config)?;
        for (fp, b) in fps.iter().zip(&payloads) {
            c.admit(*fp, b.clone());
            let _ = c.get_ram(fp);
        }
        Ok(c)
    };
    let shadow = ours(cache_config(2 * KEYS, BLOCK))?;
    let shards = shadow.policy().shards;
    let one = ours(CacheConfig {
        shards: 1,
        ..cache_config(2 * KEYS, BLOCK)
    })?;
    let slru = ours(slru_config(2 * KEYS, BLOCK))?;
    let moka = MokaSlru::new(2 * KEYS * BLOCK);
    for (fp, b) in fps.iter().zip(&payloads) {
        moka.admit(*fp, b.clone());
        let _ = moka.get(fp);
    }
    // The ceiling: a read-only table of the same keys and bytes, no lock and no policy: what
    // the machine gives lookups that share nothing but memory.
    let ceiling: std::collections::HashMap<Fingerprint, Bytes, FingerprintHashing> =
        fps.iter().copied().zip(payloads.iter().cloned()).collect();
    let sharded_name = format!("shadowcache ({shards} shards)");
    println!("RAM-hit lookups on {cores} cores ({} keys held):", KEYS);
    let pools: [(&str, &Lookup<'_>); 5] = [
        (sharded_name.as_str(), &|fp: &Fingerprint| {
            shadow.get_ram(fp).map(|h| h.0)
        }),
        ("shadowcache (1 shard)", &|fp: &Fingerprint| {
            one.get_ram(fp).map(|h| h.0)
        }),
        ("SLRU (same pools, policy off)", &|fp: &Fingerprint| {
            slru.get_ram(fp).map(|h| h.0)
        }),
        ("SLRU on moka (foundation)", &|fp: &Fingerprint| {
            moka.get(fp)
        }),
        (
            "read-only table (no lock, no policy: the ceiling)",
            &|fp: &Fingerprint| ceiling.get(fp).cloned(),
        ),
    ];
    // Each point is the best of LOOKUP_ROUNDS, taken in turns (every pool at every thread
    // count, then again), so that a neighbour's burst on a shared machine lowers one try of
    // one point rather than a whole column; a warm-up pass goes first.
    let mut best = vec![0f64; LOOKUP_THREADS.len() * pools.len()];
    let _ = measure(&fps, 1, seconds / LOOKUP_ROUNDS as f64, pools[0].1);
    for _ in 0..LOOKUP_ROUNDS {
        for (t, &threads) in LOOKUP_THREADS.iter().enumerate() {
            for (p, (_, f)) in pools.iter().enumerate() {
                let rate = measure(&fps, threads, seconds / LOOKUP_ROUNDS as f64, *f);
                let b = &mut best[t * pools.len() + p];
                *b = b.max(rate);
            }
        }
    }
    for (t, &threads) in LOOKUP_THREADS.iter().enumerate() {
        for (p, (name, _)) in pools.iter().enumerate() {
            let rate = best[t * pools.len() + p];
            println!(
                "  {name}, {threads} thread(s) on {cores} cores: {:.2} M/s",
                rate / 1e6
            );
            out.push(LookupRate {
                pools: name.to_string(),
                threads,
                cores,
                per_second: rate,
            });
        }
    }
    let get = |p: &str, threads: usize| {
        out.iter()
            .find(|r| r.pools.starts_with(p) && r.threads == threads)
            .map_or(f64::NAN, |r| r.per_second)
    };
    for threads in LOOKUP_THREADS {
        println!(
            "{threads} thread(s) / 1 thread on {cores} cores: sharded {:.2}x, 1 shard {:.2}x, moka {:.2}x, read-only table {:.2}x; sharded / moka = {:.3}",
            get("shadowcache (", threads) / get("shadowcache (", 1),
            get("shadowcache (1 shard", threads) / get("shadowcache (1 shard", 1),
            get("SLRU on moka", threads) / get("SLRU on moka", 1),
            get("read-only", threads) / get("read-only", 1),
            get("shadowcache (", threads) / get("SLRU on moka", threads),
        );
    }
    Ok(out)
}

fn measure(fps: &[Fingerprint], threads: usize, seconds: f64, get: &Lookup) -> f64 {
    let stop = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, total) = (&stop, &total);
            s.spawn(move || {
                let mut i = t * 7919;
                let mut n = 0u64;
                let mut missing = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..1024 {
                        // A stride that is prime to the key count visits every key.
                        i = (i + 4099) % fps.len();
                        if get(&fps[i]).is_none() {
                            missing += 1;
                        }
                    }
                    n += 1024;
                }
                assert_eq!(missing, 0, "a lookup of a cached key missed");
                total.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
    });
    total.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// The foundation's RAM pools, kept here as a reference for the lookup rate: two moka caches
/// with LRU eviction, single-touch a quarter of the budget.
struct MokaSlru {
    single: moka::sync::Cache<Fingerprint, Bytes, FingerprintHashing>,
    multi: moka::sync::Cache<Fingerprint, Bytes, FingerprintHashing>,
}

impl MokaSlru {
    fn new(bytes: u64) -> Self {
        let pool = |cap: u64| {
            moka::sync::Cache::builder()
                .max_capacity(cap)
                .weigher(|_k: &Fingerprint, v: &Bytes| v.len() as u32)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build_with_hasher(FingerprintHashing::default())
        };
        MokaSlru {
            single: pool(bytes / 4),
            multi: pool(bytes - bytes / 4),
        }
    }

    fn get(&self, fp: &Fingerprint) -> Option<Bytes> {
        if let Some(b) = self.multi.get(fp) {
            return Some(b);
        }
        let b = self.single.remove(fp)?;
        self.multi.insert(*fp, b.clone());
        Some(b)
    }

    fn admit(&self, fp: Fingerprint, b: Bytes) {
        self.single.insert(fp, b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::shipped;

    /// Options to replay the shipped OLTP trace at `capacities`, nothing else.
    fn oltp(capacities: Vec<u64>) -> Options {
        Options {
            source: Source::Trace(shipped("OLTP.lis.zst"), trace::Options::default()),
            capacities,
            page_bytes: Some(512),
            sweep: false,
            plot: None,
            ram_pages: None,
            scratch: None,
            lookup_seconds: 0.0,
            tuning: Tuning::default(),
            segments: None,
        }
    }

    #[test]
    fn oltp_reproduces_the_published_lru_rows_and_the_node_pools_beat_arc() {
        let out = run(oltp(vec![1000, 5000, 15000])).expect("replay");
        assert_eq!(out.requests, 914_145);
        assert_eq!(out.published.len(), 3);
        for p in &out.published {
            assert!(p.lru_reproduced, "LRU row not reproduced: {p:?}");
            assert!(
                (p.arc_measured - p.arc_published).abs() < 0.05,
                "ARC reference drifted: {p:?}"
            );
            assert!(
                p.shadowcache >= p.arc_published,
                "the node's pools fell below ARC: {p:?}"
            );
        }
        for r in &out.rows {
            assert!(
                r.percent("shadowcache") >= r.percent("LRU") - 0.5,
                "more than half a point below LRU: {r:?}"
            );
            assert!(r.shadowcache.ghost_keys_max.0 <= r.shadowcache.ghost_capacity);
            assert!(r.shadowcache.ghost_keys_max.1 <= r.shadowcache.ghost_capacity);
        }
    }

    #[test]
    fn the_tiered_replay_counts_every_request_once_and_ssd_adds_hits() {
        let reqs = trace::read_trace(&shipped("OLTP.lis.zst")).expect("trace");
        let mut pages = Vec::new();
        policy_ref::for_each_page(&reqs[..200_000], 512, |p| pages.push(p));
        let dir = tempfile::tempdir().expect("tempdir");
        let (ram_only, _) = replay_cache(&pages, cache_config(500, 512)).expect("ram");
        let t = tier_row(
            &pages,
            2000,
            500,
            512,
            dir.path(),
            f64::NAN,
            Tuning::default(),
        )
        .expect("tiers");
        assert_eq!(
            t.hits_ram_single + t.hits_ram_multi + t.hits_ssd + t.misses,
            pages.len() as u64
        );
        assert!(t.demotions > 0 && t.hits_ssd > 0, "{t:?}");
        assert_eq!(t.ssd_verify_failures, 0, "{t:?}");
        assert!(
            t.hits_ram_single + t.hits_ram_multi + t.hits_ssd > ram_only,
            "SSD added no hits over RAM alone: {t:?} vs {ram_only}"
        );
        assert!(tier_row(&pages, 100, 100, 512, dir.path(), 0.0, Tuning::default()).is_err());
    }

    /// `--segments`: each line's segments add up to the same replay's row, the fixed rules'
    /// to a run with those rules kept, and the table is in the JSON.
    #[test]
    fn segments_add_up_to_the_rows_and_the_fixed_rules_to_their_own_runs() {
        let spec = families::Spec {
            family: families::Family::parse("shifting").expect("family"),
            footprint: 2_000,
            requests: 30_000,
            ..families::Spec::default()
        };
        let base = Options {
            source: Source::Synthetic(spec),
            page_bytes: None,
            capacities: vec![300],
            segments: Some(7_000),
            ..oltp(vec![])
        };
        let out = run(base.clone()).expect("replay");
        let [t] = &out.segments[..] else {
            panic!("one table a capacity: {:?}", out.segments)
        };
        assert_eq!(t.capacity_pages, 300);
        assert_eq!(t.hits.len(), 5, "30,000 requests in segments of 7,000");
        assert_eq!(t.rules.len(), 5);
        let column = |name: &str| {
            let k = t.policies.iter().position(|p| p == name).expect(name);
            t.hits.iter().map(|h| h[k]).sum::<u64>()
        };
        let row = &out.rows[0];
        for name in ["LRU", "ARC", "shadowcache"] {
            let hits = row
                .policies
                .iter()
                .find(|p| p.policy == name)
                .expect(name)
                .hits;
            assert_eq!(column(name), hits, "{name}");
        }
        let fixed = run(Options {
            segments: None,
            tuning: Tuning {
                policy_rules: Some(Some(shadowcache_node::cache::pool::Variant::Lru)),
                ..Tuning::default()
            },
            ..base.clone()
        })
        .expect("fixed lru");
        let lru_rules = fixed.rows[0]
            .policies
            .iter()
            .find(|p| p.policy == "shadowcache")
            .expect("line")
            .hits;
        assert_eq!(column("lru"), lru_rules);
        // A shifting working set is where the rules differ: not every column is the same.
        let totals: Vec<u64> = t.policies.iter().map(|p| column(p)).collect();
        assert!(totals.iter().any(|&h| h != totals[0]), "{totals:?}");
        let e = run(Options {
            segments: Some(0),
            ..base
        })
        .expect_err("zero");
        assert!(e.to_string().contains("--segments"), "{e}");
    }

    #[test]
    fn bad_options_are_errors() {
        let base = oltp(vec![]);
        let e = run(base.clone()).expect_err("no capacity");
        assert!(e.to_string().contains("--capacity"), "{e}");
        let e = run(Options {
            page_bytes: Some(1000),
            ..base.clone()
        })
        .expect_err("page size");
        assert!(e.to_string().contains("--page-size"), "{e}");
        let e = run(Options {
            source: Source::Trace(
                PathBuf::from("/no/such/trace.lis"),
                trace::Options::default(),
            ),
            capacities: vec![10],
            ..base.clone()
        })
        .expect_err("missing trace");
        assert!(format!("{e:#}").contains("/no/such/trace.lis"), "{e:#}");
        let e = run(Options {
            source: Source::Synthetic(families::Spec {
                footprint: 5,
                ..families::Spec::default()
            }),
            capacities: vec![10],
            ..base
        })
        .expect_err("tiny footprint");
        assert!(format!("{e:#}").contains("--footprint"), "{e:#}");
    }

    /// A LIRS trace replays one 4 KiB block a page by default, and every line of the table
    /// keeps its order: no online policy above OPT.
    #[test]
    fn a_lirs_trace_replays_a_block_a_page_with_opt_above_every_policy() {
        let out = run(Options {
            source: Source::Trace(shipped("lirs/cpp.trace.gz"), trace::Options::default()),
            page_bytes: None,
            capacities: vec![100, 400],
            ..oltp(vec![])
        })
        .expect("replay");
        assert_eq!(out.page_bytes, 4096);
        assert_eq!(out.requests, 9_047);
        assert_eq!(out.footprint_pages, 1_223);
        for r in &out.rows {
            let opt = r.percent("OPT");
            for p in ["LRU", "ARC", "LIRS", "SLRU", "shadowcache"] {
                assert!(r.percent(p) <= opt, "{p} above OPT: {r:?}");
            }
        }
    }

    #[test]
    fn a_synthetic_loop_sweeps_to_one_point_one_times_the_cache() {
        let out = run(Options {
            source: Source::Synthetic(families::Spec {
                footprint: 1100,
                requests: 22_000,
                ..families::Spec::default()
            }),
            page_bytes: None,
            sweep: true,
            ..oltp(vec![])
        })
        .expect("replay");
        assert!(out.synthetic.as_deref().is_some_and(|d| d.contains("loop")));
        let r = out
            .rows
            .iter()
            .find(|r| r.capacity_pages == 1000)
            .expect("a point at 1/1.1 of the footprint");
        // LRU and ARC hit nothing in a loop longer than the cache; OPT keeps most of it.
        assert_eq!(r.percent("LRU"), 0.0);
        assert_eq!(r.percent("ARC"), 0.0);
        assert!(r.percent("OPT") > 80.0, "{r:?}");
    }

    #[test]
    fn tuning_reaches_the_node_line_and_a_saved_run_replots() {
        // The node's pools tuned to the policy-off settings are the SLRU line, hit for hit.
        let out = run(Options {
            tuning: Tuning {
                single_touch_share: Some(0.25),
                adaptive: Some(false),
                ghost_ratio: Some(0.0),
                second_chances: Some(false),
                policy_rules: Some(Some(shadowcache_node::cache::pool::Variant::Tuned)),
                ..Tuning::default()
            },
            ..oltp(vec![1000, 5000])
        })
        .expect("replay");
        for r in &out.rows {
            let hits = |p: &str| r.policies.iter().find(|x| x.policy == p).map(|x| x.hits);
            assert_eq!(hits("shadowcache"), hits("SLRU"), "{r:?}");
            assert_eq!(
                r.shadowcache.ghost_hits_single + r.shadowcache.ghost_hits_multi,
                0
            );
        }
        // What --json saves, --replot draws.
        let saved: Output =
            serde_json::from_str(&serde_json::to_string(&out).expect("json")).expect("parse");
        let dir = tempfile::tempdir().expect("tempdir");
        draw(&saved, &dir.path().join("oltp")).expect("draw");
        let svg = std::fs::read_to_string(dir.path().join("oltp.svg")).expect("svg");
        assert!(svg.contains("shadowcache") && svg.contains("ARC"), "{svg}");
        assert!(dir.path().join("oltp.png").metadata().expect("png").len() > 4096);
    }

    #[test]
    fn the_committed_figures_parse_as_what_replot_reads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/figures");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("docs/figures") {
            let p = e.expect("entry").path();
            let name = p.file_name().map(|f| f.to_string_lossy().to_string());
            if name.is_some_and(|f| f.starts_with("policy-") && f.ends_with(".json")) {
                let text = std::fs::read_to_string(&p).expect("read");
                let out: Output =
                    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(!out.rows.is_empty(), "{}", p.display());
                n += 1;
            }
        }
        assert!(n >= 5, "expected the policy figures in {}", dir.display());
    }

    #[test]
    fn sweeps_span_a_64th_of_the_footprint_to_all_of_it() {
        let c = sweep_capacities(64_000);
        assert_eq!(c.first(), Some(&1000));
        assert_eq!(c.last(), Some(&64_000));
        assert!(c.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sweep_capacities(10).first(), Some(&1));
    }
}

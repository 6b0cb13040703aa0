//! `shadowcache-bench cache`: what a cache hit, an SSD hit and a miss cost, in process and
//! through the real gRPC Unix-socket path, per block size; the RAM the index costs; and, with
//! `--trace`, hit and dedup ratios of a real address trace replayed through one node.
//!
//! Every figure comes from one run on this machine, side by side; nothing here is asserted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};
use shadowcache_node::cache::{CacheConfig, ContentCache, Fingerprint};
use shadowcache_node::disk::{BlockRef, ContentMap};
use shadowcache_node::{Config, DiskMode, RunningNode};

use crate::synthetic::{Mix, SyntheticOrigin};
use crate::trace;

/// Options of the cache benchmark.
#[derive(Debug, Clone)]
pub struct Options {
    /// Block sizes to measure.
    pub block_sizes: Vec<u32>,
    /// Time budget of each measurement.
    pub seconds: f64,
    /// Size of the image file whose blocks are read (the miss measurements need fresh blocks).
    pub image_bytes: u64,
    /// Scratch directory (a temporary one by default).
    pub scratch: Option<PathBuf>,
    /// Size of the SSD tier whose index is measured (RAM a slot, time to open); 0 skips it.
    pub ssd_index_bytes: u64,
    /// Entries written into that tier before it is opened again.
    pub ssd_index_fill: u64,
}

/// Throughput and latency of one kind of operation.
#[derive(Debug, Clone)]
pub struct Figures {
    /// Operations timed.
    pub ops: u64,
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
}

impl Figures {
    fn from(h: &Histogram<u64>, elapsed: Duration) -> Figures {
        Figures {
            ops: h.len(),
            ops_per_sec: h.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            p50_us: h.value_at_quantile(0.5) as f64 / 1000.0,
            p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
        }
    }

    fn json(&self) -> Value {
        json!({
            "ops": self.ops,
            "ops_per_sec": round(self.ops_per_sec, 0),
            "p50_us": round(self.p50_us, 2),
            "p99_us": round(self.p99_us, 2),
        })
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

fn histogram() -> Histogram<u64> {
    // 1 ns to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).expect("histogram"))
}

/// Runs `op(i)` for i = 0.. until `budget` passes or `max_ops` ran, timing each.
async fn measure<F, Fut>(budget: Duration, max_ops: u64, mut op: F) -> anyhow::Result<Figures>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut h = histogram();
    let start = Instant::now();
    let mut i = 0;
    while i < max_ops && start.elapsed() < budget {
        let t = Instant::now();
        op(i).await?;
        h.record(t.elapsed().as_nanos().max(1) as u64)?;
        i += 1;
    }
    Ok(Figures::from(&h, start.elapsed()))
}

/// In-process RAM-hit lookups of the content cache alone: `ContentCache::get_ram` on one
/// thread over a shuffled set of multi-touch entries. Throughput is measured untimed per op;
/// latency in a second, timed pass.
fn ram_lookups(block_bytes: u32, budget: Duration) -> anyhow::Result<Figures> {
    let entries = ((64u64 << 20) / u64::from(block_bytes)).max(1024);
    let (cache, _) = ContentCache::open(CacheConfig {
        block_bytes,
        ram_bytes: entries * u64::from(block_bytes) * 4,
        single_touch_share: 0.25,
        ssd: None,
        demotion_queue: 16,
        ..CacheConfig::default()
    })?;
    let payload = Bytes::from(vec![7u8; block_bytes as usize]);
    let mut fps: Vec<Fingerprint> = (0..entries)
        .map(|i| {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&i.to_le_bytes());
            k[8] = 1;
            Fingerprint(*blake3::hash(&k).as_bytes())
        })
        .collect();
    for fp in &fps {
        // Admitted twice: the second admit promotes to multi-touch, where hits stay.
        cache.admit(*fp, payload.clone());
        cache.admit(*fp, payload.clone());
    }
    cache.settle();
    fps.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));
    let n = fps.len();
    // Throughput: no clock reads inside the loop.
    let start = Instant::now();
    let mut ops = 0u64;
    let mut found = 0u64;
    while start.elapsed() < budget {
        for fp in &fps {
            if cache.get_ram(fp).is_some() {
                found += 1;
            }
        }
        ops += n as u64;
    }
    let elapsed = start.elapsed();
    anyhow::ensure!(found == ops, "lookups missed: {found} of {ops}");
    // Latency: a timed pass.
    let mut h = histogram();
    for fp in fps.iter().cycle().take(200_000) {
        let t = Instant::now();
        std::hint::black_box(cache.get_ram(fp));
        h.record(t.elapsed().as_nanos().max(1) as u64)?;
    }
    let mut f = Figures::from(&h, elapsed);
    f.ops = ops;
    f.ops_per_sec = ops as f64 / elapsed.as_secs_f64();
    Ok(f)
}

/// Allocated bytes per GiB cached: the RAM pools' index (pool slots, table, Arc headers) and,
/// separately, the content map entry each cached block also has.
fn index_overhead(block_bytes: u32) -> anyhow::Result<Value> {
    let entries: u64 = 16_384;
    let payload_bytes = entries * u64::from(block_bytes);
    let fps: Vec<Fingerprint> = (0..entries)
        .map(|i| Fingerprint(*blake3::hash(&i.to_le_bytes()).as_bytes()))
        .collect();
    let payloads: Vec<Bytes> = (0..entries)
        .map(|_| Bytes::from(vec![1u8; block_bytes as usize]))
        .collect();
    let before = crate::alloc::live_bytes();
    let (cache, _) = ContentCache::open(CacheConfig {
        block_bytes,
        ram_bytes: payload_bytes * 2,
        single_touch_share: 0.5,
        ssd: None,
        demotion_queue: 16,
        ..CacheConfig::default()
    })?;
    for (fp, b) in fps.iter().zip(&payloads) {
        cache.admit(*fp, b.clone());
        cache.admit(*fp, b.clone());
    }
    cache.settle();
    let cache_overhead = crate::alloc::live_bytes() - before;
    let before_map = crate::alloc::live_bytes();
    let map = ContentMap::in_memory();
    for (i, fp) in fps.iter().enumerate() {
        map.insert(i as u64, BlockRef::Data(*fp));
    }
    let map_overhead = crate::alloc::live_bytes() - before_map;
    let per_gib = |bytes: i64| bytes as f64 / payload_bytes as f64 * (1u64 << 30) as f64;
    drop(map);
    drop(cache);
    Ok(json!({
        "entries": entries,
        "cache_bytes_per_entry": round(cache_overhead as f64 / entries as f64, 1),
        "content_map_bytes_per_entry": round(map_overhead as f64 / entries as f64, 1),
        "cache_mib_per_gib": round(per_gib(cache_overhead) / (1u64 << 20) as f64, 3),
        "with_content_map_mib_per_gib": round(per_gib(cache_overhead + map_overhead) / (1u64 << 20) as f64, 3),
    }))
}

/// The SSD tier's index at `tier_bytes` of 16 KiB slots (sparse files): allocated bytes a slot
/// by the counting allocator, the time to open it new, and the time to open it again once the
/// headers of `fill` entries are in its index file (written directly, without payloads:
/// opening reads headers, never payloads).
fn ssd_index(scratch: &Path, tier_bytes: u64, fill: u64) -> anyhow::Result<Value> {
    use shadowcache_node::cache::ssd::{encode_header, header_offset};
    use shadowcache_node::cache::{SsdConfig, SsdTier};
    use std::os::unix::fs::FileExt;
    let dir = scratch.join("ssd-index");
    std::fs::create_dir_all(&dir)?;
    let slot_bytes = 16 << 10;
    let config = SsdConfig {
        data_path: dir.join("cache.slots"),
        index_path: dir.join("cache.index"),
        capacity_bytes: tier_bytes,
        slot_bytes,
        direct: true,
    };
    let before = crate::alloc::live_bytes();
    let t0 = Instant::now();
    let (tier, _) = SsdTier::open(config.clone())?;
    let open_new = t0.elapsed();
    let allocated = crate::alloc::live_bytes() - before;
    let slots = tier.slot_count();
    drop(tier);
    let fill = fill.min(u64::from(slots)) as u32;
    // Headers for slots 0..fill, 1 MiB at a time, made on every core: synthetic fingerprints,
    // sequence numbers in a shuffled order (a tier that has churned), full payloads.
    let t1 = Instant::now();
    let index = std::fs::OpenOptions::new()
        .write(true)
        .open(&config.index_path)?;
    let per_chunk: u32 = 16_384;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    std::thread::scope(|sc| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let index = &index;
                sc.spawn(move || -> std::io::Result<()> {
                    let mut buf = Vec::with_capacity(per_chunk as usize * 64);
                    let mut first = t * per_chunk;
                    while first < fill {
                        buf.clear();
                        for s in first..(first + per_chunk).min(fill) {
                            let mut fp = [0u8; 32];
                            for (k, w) in fp.chunks_exact_mut(8).enumerate() {
                                let x = shadowcache_node::cache::mix64(
                                    u64::from(s) ^ ((k as u64) << 40),
                                );
                                w.copy_from_slice(&x.to_le_bytes());
                            }
                            let seq = shadowcache_node::cache::mix64(u64::from(s)) >> 20;
                            buf.extend_from_slice(&encode_header(
                                &Fingerprint(fp),
                                slot_bytes,
                                seq,
                                1,
                            ));
                        }
                        index.write_all_at(&buf, header_offset(first))?;
                        first += threads * per_chunk;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a header writer panicked"))??;
        }
        Ok(())
    })?;
    index.sync_data()?;
    drop(index);
    let fill_time = t1.elapsed();
    let before_reopen = crate::alloc::live_bytes();
    crate::alloc::reset_peak();
    let t2 = Instant::now();
    // Split as `cache.ssd_load = "background"` runs it: the node serves once the files are
    // open, and the headers are read after.
    let (tier, pending) = SsdTier::open_deferred(config)?;
    let ready = t2.elapsed();
    let rec = tier.load(pending, |_| {});
    let reopen = t2.elapsed();
    let allocated_filled = crate::alloc::live_bytes() - before_reopen;
    let peak_open = crate::alloc::peak_bytes() - before_reopen;
    anyhow::ensure!(
        rec.recovered == u64::from(fill),
        "reopened with {} of {fill} entries ({rec:?})",
        rec.recovered
    );
    drop(tier);
    std::fs::remove_dir_all(&dir)?;
    let per_entry = reopen.saturating_sub(open_new).as_secs_f64() / f64::from(fill.max(1));
    Ok(json!({
        "tier_bytes": tier_bytes,
        "slot_bytes": slot_bytes,
        "slots": slots,
        "bytes_per_slot": round(allocated as f64 / f64::from(slots), 2),
        "bytes_per_slot_filled": round(allocated_filled as f64 / f64::from(slots), 2),
        "peak_bytes_per_slot_while_opening_filled": round(peak_open as f64 / f64::from(slots), 2),
        "index_ram_mib": allocated >> 20,
        "open_new_ms": round(open_new.as_secs_f64() * 1e3, 1),
        "fill_entries": fill,
        "fill_ms": round(fill_time.as_secs_f64() * 1e3, 1),
        "reopen_filled_ms": round(reopen.as_secs_f64() * 1e3, 1),
        "reopen_filled_serving_in_background_ms": round(ready.as_secs_f64() * 1e3, 2),
        "reopen_ns_per_entry": round(per_entry * 1e9, 1),
    }))
}

async fn start_node(
    dir: &Path,
    image: &Path,
    block_bytes: u32,
    ram: u64,
    ssd: u64,
) -> anyhow::Result<RunningNode> {
    let mut c = Config::for_data_dir(dir);
    c.block_bytes = block_bytes;
    c.ram_bytes = ram;
    c.ssd_bytes = ssd;
    // The SSD tier takes every block RAM lets go: this bench reads each block twice to put
    // it there, and measures hits, not which blocks earn a write.
    c.ssd_admission = shadowcache_node::cache::SsdAdmission::All;
    c.disks = vec![shadowcache_node::config::DiskSpec {
        id: "img".into(),
        origin: image.to_path_buf(),
        mode: DiskMode::Sealed,
    }];
    shadowcache_node::start(c).await
}

/// SSD hits against the device: `depth` readers at once, each reading whole blocks of an
/// SSD-resident working set in random order through `Node::read` (every block verified), then
/// fio reading the slot file itself with the same block size, pattern (random over the slots
/// the working set holds) and queue depth (libaio, O_DIRECT when the tier uses it): the limit
/// of the device under the tier.
async fn ssd_vs_device(
    scratch: &Path,
    bs: u32,
    image_bytes: u64,
    depths: &[usize],
    budget: Duration,
) -> anyhow::Result<Value> {
    let dir = scratch.join(format!("dev-{bs}"));
    // Its own image of distinct blocks (no zero or shared ones, which need no read).
    let blocks = (image_bytes / u64::from(bs)).min((256 << 20) / u64::from(bs));
    std::fs::create_dir_all(&dir)?;
    let image = scratch.join(format!("distinct-{bs}.raw"));
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&image)?);
        let mut block = vec![0u8; bs as usize];
        for i in 0..blocks {
            for (k, w) in block.chunks_exact_mut(8).enumerate() {
                let x = shadowcache_node::cache::mix64(i << 24 | k as u64);
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block)?;
        }
        f.flush()?;
    }
    let mut c = Config::for_data_dir(&dir);
    c.block_bytes = bs;
    c.ram_bytes = 16 * u64::from(bs);
    c.ssd_bytes = 1 << 30;
    // Hits stay on SSD for the whole measurement (no promotion back to RAM, no writes), and
    // every block read twice is written there (this measures the device path, not admission).
    c.ssd_promote_hits = u8::MAX;
    c.ssd_admission = shadowcache_node::cache::SsdAdmission::All;
    c.disks = vec![shadowcache_node::config::DiskSpec {
        id: "img".into(),
        origin: image.clone(),
        mode: DiskMode::Sealed,
    }];
    let running = shadowcache_node::start(c).await?;
    let node = running.node().clone();
    let at = |i: u64| i * u64::from(bs);
    // Each block read twice: promoted to multi-touch, then demoted to SSD by the next ones;
    // in batches the SSD writer keeps up with (it drops demotions it is too far behind on).
    for i in 0..blocks {
        node.read("img", at(i), u64::from(bs)).await?;
        node.read("img", at(i), u64::from(bs)).await?;
        if i % 256 == 255 {
            node.cache().settle();
        }
    }
    node.cache().settle();
    let ssd = node.cache().ssd().context("the node has an ssd tier")?;
    let direct = ssd.is_direct();
    let slot_file = ssd.data_path().to_path_buf();
    let (used, _) = ssd.usage();
    // The tier alone at queue depth 1, on one thread: lookup, read, verify.
    let tier_qd1 = {
        let node = node.clone();
        let image = image.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
            let ssd = node.cache().ssd().context("ssd")?;
            let content = std::fs::read(&image)?;
            let fps: Vec<Fingerprint> = content
                .chunks_exact(bs as usize)
                .map(Fingerprint::of)
                .collect();
            let mut rng = rand::rngs::StdRng::seed_from_u64(99);
            let (mut n, start) = (0u64, Instant::now());
            while start.elapsed() < budget {
                let fp = &fps[rand::Rng::random_range(&mut rng, 0..fps.len())];
                if let Some(at) = ssd.lookup(fp)
                    && let shadowcache_node::cache::ssd::SlotRead::Hit(_) = ssd.read(fp, at)
                {
                    n += 1;
                }
            }
            Ok(n as f64 * f64::from(bs) / start.elapsed().as_secs_f64() / 1e6)
        })
        .await??
    };
    // This virtual disk moves by 20 to 40% between runs, so at each depth SSD hits and fio
    // take turns, ROUNDS times, each round's pair compared, and the median ratio reported.
    let slice = (budget / ROUNDS as u32).max(Duration::from_millis(200));
    let mut rows = Vec::new();
    for &depth in depths {
        let hits_before = node.cache().stats().hits_ssd.get();
        let misses_before = node.cache().stats().misses.get();
        let (mut reads, mut rounds, mut fio_failed) = (0u64, Vec::new(), false);
        for round in 0..ROUNDS {
            let (n, ours) = random_block_reads(&node, depth, blocks, bs, slice, round).await?;
            reads += n;
            let fio = if fio_failed {
                None
            } else {
                match fio_randread(&slot_file, bs, used * u64::from(bs), depth, direct, slice) {
                    Ok(mbs) => Some(mbs),
                    Err(e) => {
                        eprintln!("fio on the slot file: {e:#}");
                        fio_failed = true;
                        None
                    }
                }
            };
            rounds.push((ours, fio));
        }
        let hits = node.cache().stats().hits_ssd.get() - hits_before;
        let misses = node.cache().stats().misses.get() - misses_before;
        let ours = median(rounds.iter().map(|r| r.0).collect());
        let fios: Vec<f64> = rounds.iter().filter_map(|r| r.1).collect();
        let ratios: Vec<f64> = rounds
            .iter()
            .filter_map(|&(o, f)| f.map(|f| o / f.max(1e-9)))
            .collect();
        let (fio_mbs, ratio) = if fio_failed || fios.is_empty() {
            (Value::Null, Value::Null)
        } else {
            (
                json!(round(median(fios), 1)),
                json!(round(median(ratios.clone()), 3)),
            )
        };
        rows.push(json!({
            "queue_depth": depth,
            "ssd_hit_mb_per_s": round(ours, 1),
            "ssd_hit_fraction": round(hits as f64 / reads.max(1) as f64, 4),
            "misses": misses,
            "fio_mb_per_s": fio_mbs,
            "ssd_hit_over_fio": ratio,
            "rounds": rounds
                .iter()
                .map(|&(o, f)| json!({"ssd_hit_mb_per_s": round(o, 1), "fio_mb_per_s": f.map(|f| round(f, 1))}))
                .collect::<Vec<_>>(),
            "ratio_range": if ratios.is_empty() {
                Value::Null
            } else {
                json!([
                    round(ratios.iter().copied().fold(f64::MAX, f64::min), 3),
                    round(ratios.iter().copied().fold(f64::MIN, f64::max), 3),
                ])
            },
        }));
    }
    running.shutdown().await?;
    Ok(json!({
        "block_size": bs,
        "direct": direct,
        "tier_alone_qd1_mb_per_s": round(tier_qd1, 1),
        "working_set_blocks": blocks,
        "slots_read": used,
        "depths": rows,
    }))
}

/// Rounds of SSD hits and fio, in turn, at each queue depth of [`ssd_vs_device`].
const ROUNDS: usize = 3;

/// The median of `v` (the mean of the middle two for an even count; 0 for none).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// `depth` readers reading whole blocks of the first `blocks` at random through `Node::read`
/// for `time` (seeded by `round`): reads done and MB/s.
async fn random_block_reads(
    node: &Arc<shadowcache_node::Node>,
    depth: usize,
    blocks: u64,
    bs: u32,
    time: Duration,
    round: usize,
) -> anyhow::Result<(u64, f64)> {
    let ops = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..depth)
        .map(|t| {
            let node = node.clone();
            let ops = ops.clone();
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64((round * 1024 + t) as u64);
                while start.elapsed() < time {
                    let i = rand::Rng::random_range(&mut rng, 0..blocks);
                    node.read("img", i * u64::from(bs), u64::from(bs)).await?;
                    ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let n = ops.load(std::sync::atomic::Ordering::Relaxed);
    Ok((
        n,
        n as f64 * f64::from(bs) / start.elapsed().as_secs_f64() / 1e6,
    ))
}

/// fio reading `bytes` of `file` in random blocks of `bs` at `depth`: MB/s.
fn fio_randread(
    file: &Path,
    bs: u32,
    bytes: u64,
    depth: usize,
    direct: bool,
    budget: Duration,
) -> anyhow::Result<f64> {
    let out = std::process::Command::new("fio")
        .args([
            "--name=slots",
            "--rw=randread",
            "--ioengine=libaio",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--bs={bs}"))
        .arg(format!("--size={}", bytes.max(u64::from(bs))))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--direct={}", u8::from(direct)))
        .arg(format!("--runtime={}ms", budget.as_millis().max(1)))
        .output()
        .context("run fio (apt-get install fio)")?;
    anyhow::ensure!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).context("fio's json")?;
    let bw = v["jobs"][0]["read"]["bw_bytes"]
        .as_f64()
        .context("fio's json has no read bandwidth")?;
    Ok(bw / 1e6)
}

const READ: u64 = 4096;

/// Times in-process `Node::read`s of READ bytes at the start of `blocks[n % len]`, cycling.
async fn inproc_reads(
    node: &Arc<shadowcache_node::Node>,
    blocks: &[u64],
    bs: u32,
    budget: Duration,
    max_ops: u64,
) -> anyhow::Result<Figures> {
    measure(budget, max_ops, |n| {
        let node = node.clone();
        let at = blocks[(n % blocks.len() as u64) as usize] * u64::from(bs);
        async move {
            node.read("img", at, READ)
                .await
                .map(|_| ())
                .map_err(Into::into)
        }
    })
    .await
}

/// The same through the gRPC client.
async fn grpc_reads(
    disk: &shadowcache_client::Disk,
    blocks: &[u64],
    bs: u32,
    budget: Duration,
    max_ops: u64,
) -> anyhow::Result<Figures> {
    measure(budget, max_ops, |n| {
        let disk = disk.clone();
        let at = blocks[(n % blocks.len() as u64) as usize] * u64::from(bs);
        async move { disk.read_at(at, READ).await.map(|_| ()).map_err(Into::into) }
    })
    .await
}

/// One block size: RAM hits, SSD hits and misses, in process and over gRPC; the empty round trip.
async fn per_block_size(
    opts: &Options,
    scratch: &Path,
    image: &Path,
    bs: u32,
) -> anyhow::Result<Value> {
    let budget = Duration::from_secs_f64(opts.seconds);
    let blocks = opts.image_bytes / u64::from(bs);
    let at = |i: u64| i * u64::from(bs);

    // Node A: RAM only, roomy. RAM hits and misses.
    let dir_a = scratch.join(format!("a-{bs}"));
    let a = start_node(&dir_a, image, bs, 512 << 20, 0).await?;
    let node = a.node().clone();
    let client = shadowcache_client::Client::connect_unix(a.unix_socket()).await?;
    let disk = client.disk("img");
    let hot: Vec<u64> = (0..blocks.min(1024)).collect();
    for _ in 0..2 {
        for &i in &hot {
            node.read("img", at(i), READ).await?;
        }
    }
    let ram_inproc = inproc_reads(&node, &hot, bs, budget, u64::MAX).await?;
    let ram_grpc = grpc_reads(&disk, &hot, bs, budget, u64::MAX).await?;
    let empty = measure(budget, u64::MAX, |_| {
        let disk = disk.clone();
        async move { disk.stat().await.map(|_| ()).map_err(Into::into) }
    })
    .await?;
    // Misses: blocks nobody read yet; the in-process half first, then the gRPC half.
    let cold_start = hot.len() as u64;
    let half = (blocks - cold_start) / 2;
    let cold_a: Vec<u64> = (cold_start..cold_start + half).collect();
    let cold_b: Vec<u64> = (cold_start + half..cold_start + 2 * half).collect();
    let miss_inproc = inproc_reads(&node, &cold_a, bs, budget, half).await?;
    let miss_grpc = grpc_reads(&disk, &cold_b, bs, budget, half).await?;
    drop(client);
    a.shutdown().await?;

    // Node B: two blocks of RAM... a little more, and an SSD tier. A working set many times
    // RAM, each block read twice (promoted, then demoted by the next), then cycled: every read
    // is an SSD hit that moves its block back to RAM and demotes another.
    let dir_b = scratch.join(format!("b-{bs}"));
    let ram_b = 16 * u64::from(bs);
    let b = start_node(&dir_b, image, bs, ram_b, 1 << 30).await?;
    let node = b.node().clone();
    let client = shadowcache_client::Client::connect_unix(b.unix_socket()).await?;
    let disk = client.disk("img");
    let ws: Vec<u64> = (0..blocks.min(2048)).collect();
    for &i in &ws {
        node.read("img", at(i), READ).await?;
        node.read("img", at(i), READ).await?;
    }
    node.cache().settle();
    let hits_before = node.cache().stats().hits_ssd.get();
    let lookups_before = node.cache().stats().lookups();
    let ssd_inproc = inproc_reads(&node, &ws, bs, budget, u64::MAX).await?;
    let ssd_grpc = grpc_reads(&disk, &ws, bs, budget, u64::MAX).await?;
    let ssd_hits = node.cache().stats().hits_ssd.get() - hits_before;
    let lookups = node.cache().stats().lookups() - lookups_before;
    drop(client);
    b.shutdown().await?;

    let device = ssd_vs_device(scratch, bs, opts.image_bytes, &[1, 16], budget).await?;
    let lookups_fig = tokio::task::spawn_blocking(move || ram_lookups(bs, budget)).await??;
    let overhead = index_overhead(bs)?;

    Ok(json!({
        "block_size": bs,
        "read_bytes": READ,
        "in_process": {
            "cache_ram_lookup": lookups_fig.json(),
            "ram_hit": ram_inproc.json(),
            "ssd_hit": ssd_inproc.json(),
            "miss": miss_inproc.json(),
        },
        "grpc_unix": {
            "empty_round_trip": empty.json(),
            "ram_hit": ram_grpc.json(),
            "ssd_hit": ssd_grpc.json(),
            "miss": miss_grpc.json(),
            "ram_hit_p50_over_empty_p50": round(ram_grpc.p50_us / empty.p50_us.max(1e-9), 3),
            "ram_hit_ops_ratio_to_empty": round(ram_grpc.ops_per_sec / empty.ops_per_sec.max(1e-9), 3),
        },
        "ssd_phase_hit_fraction": round(ssd_hits as f64 / lookups.max(1) as f64, 4),
        "index_overhead": overhead,
        "ssd_vs_device": device,
    }))
}

/// Writes an image of `bytes` synthetic bytes (unique pages, a few zero and shared ones).
fn write_image(path: &Path, bytes: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mix = Mix::default();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let chunk = 1u64 << 20;
    let mut at = 0;
    while at < bytes {
        let n = chunk.min(bytes - at);
        f.write_all(&mix.read(at, n as usize))?;
        at += n;
    }
    f.flush()?;
    Ok(())
}

/// Runs the per-block-size measurements and prints a table.
pub async fn run(opts: Options) -> anyhow::Result<Value> {
    let tmp;
    let scratch = match &opts.scratch {
        Some(p) => p.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&scratch)?;
    let image = scratch.join("image.raw");
    write_image(&image, opts.image_bytes).context("write the benchmark image")?;
    let mut rows = Vec::new();
    for &bs in &opts.block_sizes {
        eprintln!("measuring block size {} KiB ...", bs / 1024);
        rows.push(per_block_size(&opts, &scratch, &image, bs).await?);
    }
    print_table(&rows);
    let index = if opts.ssd_index_bytes > 0 {
        eprintln!(
            "measuring the ssd index of a {} GiB tier ...",
            opts.ssd_index_bytes >> 30
        );
        let i = ssd_index(&scratch, opts.ssd_index_bytes, opts.ssd_index_fill)?;
        println!(
            "ssd index, {} GiB of 16K slots: {} B/slot allocated ({} MiB), {} B/slot with {} entries (at most {} while opening); open new {} ms, with {} entries {} ms ({} ns an entry; serving after {} ms with the index read in the background)",
            opts.ssd_index_bytes >> 30,
            i["bytes_per_slot"],
            i["index_ram_mib"],
            i["bytes_per_slot_filled"],
            i["fill_entries"],
            i["peak_bytes_per_slot_while_opening_filled"],
            i["open_new_ms"],
            i["fill_entries"],
            i["reopen_filled_ms"],
            i["reopen_ns_per_entry"],
            i["reopen_filled_serving_in_background_ms"],
        );
        i
    } else {
        Value::Null
    };
    Ok(json!({
        "benchmark": "cache",
        "seconds_per_measurement": opts.seconds,
        "image_bytes": opts.image_bytes,
        "results": rows,
        "ssd_index": index,
    }))
}

fn print_table(rows: &[Value]) {
    println!();
    println!(
        "{:>6}  {:<22} {:>12} {:>9} {:>9}",
        "block", "measurement", "ops/s", "p50 µs", "p99 µs"
    );
    for r in rows {
        let bs = r["block_size"].as_u64().unwrap_or(0) / 1024;
        for (group, key) in [
            ("in_process", "cache_ram_lookup"),
            ("in_process", "ram_hit"),
            ("in_process", "ssd_hit"),
            ("in_process", "miss"),
            ("grpc_unix", "empty_round_trip"),
            ("grpc_unix", "ram_hit"),
            ("grpc_unix", "ssd_hit"),
            ("grpc_unix", "miss"),
        ] {
            let f = &r[group][key];
            let label = format!("{}{}", if group == "grpc_unix" { "grpc " } else { "" }, key);
            println!(
                "{:>4}K  {:<22} {:>12} {:>9} {:>9}",
                bs, label, f["ops_per_sec"], f["p50_us"], f["p99_us"]
            );
        }
        println!(
            "{:>4}K  grpc RAM hit / empty round trip: p50 {}x, ops {}x; ssd phase hit fraction {}",
            bs,
            r["grpc_unix"]["ram_hit_p50_over_empty_p50"],
            r["grpc_unix"]["ram_hit_ops_ratio_to_empty"],
            r["ssd_phase_hit_fraction"]
        );
        let d = &r["ssd_vs_device"];
        for q in d["depths"].as_array().into_iter().flatten() {
            println!(
                "{:>4}K  ssd hits at queue depth {}: {} MB/s (hit fraction {}); fio on the slot file (direct {}): {} MB/s; ratio {} (median of {ROUNDS} rounds in turn, range {}); the tier alone at depth 1: {} MB/s",
                bs,
                q["queue_depth"],
                q["ssd_hit_mb_per_s"],
                q["ssd_hit_fraction"],
                d["direct"],
                q["fio_mb_per_s"],
                q["ssd_hit_over_fio"],
                q["ratio_range"],
                d["tier_alone_qd1_mb_per_s"]
            );
        }
        let o = &r["index_overhead"];
        println!(
            "{:>4}K  index: {} B/entry in the RAM pools ({} MiB per GiB cached), {} B/entry content map ({} MiB per GiB with it)",
            bs,
            o["cache_bytes_per_entry"],
            o["cache_mib_per_gib"],
            o["content_map_bytes_per_entry"],
            o["with_content_map_mib_per_gib"]
        );
    }
}

/// Options of the trace replay.
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// The trace (any format of [`trace::Format`]; its reads are replayed).
    pub trace: PathBuf,
    /// How to read it.
    pub trace_opts: trace::Options,
    /// Block sizes.
    pub block_sizes: Vec<u32>,
    /// RAM sizes, bytes.
    pub ram_sizes: Vec<u64>,
}

/// Replays a `.lis` trace through one node per (block size, RAM size) over synthetic content
/// (the trace has addresses, not data): hit ratio by block lookups and by bytes, origin bytes,
/// dedup ratio.
pub async fn replay(opts: TraceOptions) -> anyhow::Result<Value> {
    let reqs = trace::read_requests(&opts.trace, &opts.trace_opts)?;
    let end = reqs.iter().map(|r| r.offset + r.len).max().unwrap_or(0);
    let requested: u64 = reqs.iter().map(|r| r.len).sum();
    eprintln!(
        "{}: {} requests, {:.1} MiB requested, address span {:.1} MiB",
        opts.trace.display(),
        reqs.len(),
        requested as f64 / (1 << 20) as f64,
        end as f64 / (1 << 20) as f64
    );
    let mut rows = Vec::new();
    println!();
    println!(
        "{:>6} {:>9} {:>10} {:>10} {:>12} {:>10} {:>9} {:>8}",
        "block", "RAM MiB", "hit %", "zero %", "origin MiB", "origin/req", "dedup", "secs"
    );
    for &bs in &opts.block_sizes {
        for &ram in &opts.ram_sizes {
            let dir = tempfile::tempdir()?;
            let mut c = Config::for_data_dir(dir.path());
            c.block_bytes = bs;
            c.ram_bytes = ram;
            c.ssd_bytes = 0;
            let node = shadowcache_node::Node::open(c).await?;
            let size = end.div_ceil(u64::from(bs)) * u64::from(bs);
            node.registry()
                .register_origin(
                    "trace",
                    Arc::new(SyntheticOrigin::new(Mix::default(), size)),
                    DiskMode::Sealed,
                )
                .await?;
            let t = Instant::now();
            for r in &reqs {
                node.read("trace", r.offset, r.len).await?;
            }
            node.cache().settle();
            let secs = t.elapsed().as_secs_f64();
            let s = node.status();
            let c = &s.counters;
            let hits = c.lookups - c.misses;
            let all = c.lookups + c.zero_block_hits;
            let row = json!({
                "block_size": bs,
                "ram_bytes": ram,
                "hit_ratio": round(hits as f64 / c.lookups.max(1) as f64, 4),
                "zero_block_fraction": round(c.zero_block_hits as f64 / all.max(1) as f64, 4),
                "origin_read_bytes": c.origin_read_bytes,
                "requested_bytes": requested,
                "dedup_ratio": round(c.logical_bytes as f64 / c.stored_bytes.max(1) as f64, 3),
                "seconds": round(secs, 2),
            });
            println!(
                "{:>5}K {:>9} {:>9.2}% {:>9.2}% {:>12.1} {:>10.3} {:>9.3} {:>8.1}",
                bs / 1024,
                ram >> 20,
                100.0 * row["hit_ratio"].as_f64().unwrap_or(0.0),
                100.0 * row["zero_block_fraction"].as_f64().unwrap_or(0.0),
                c.origin_read_bytes as f64 / (1 << 20) as f64,
                c.origin_read_bytes as f64 / requested.max(1) as f64,
                row["dedup_ratio"].as_f64().unwrap_or(0.0),
                secs
            );
            rows.push(row);
        }
    }
    Ok(json!({
        "benchmark": "cache-trace",
        "trace": opts.trace.display().to_string(),
        "requests": reqs.len(),
        "requested_bytes": requested,
        "content": "synthetic: 10% zero pages, 15% pages shared from a pool of 4096, the rest unique (the trace carries addresses only)",
        "results": rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_takes_the_middle_one_or_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![0.9]), 0.9);
        assert_eq!(median(vec![1.2, 0.5, 0.8]), 0.8);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}

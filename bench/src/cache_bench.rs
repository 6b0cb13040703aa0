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
    c.disks = vec![shadowcache_node::config::DiskSpec {
        id: "img".into(),
        origin: image.to_path_buf(),
        mode: DiskMode::Sealed,
    }];
    shadowcache_node::start(c).await
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
    Ok(json!({
        "benchmark": "cache",
        "seconds_per_measurement": opts.seconds,
        "image_bytes": opts.image_bytes,
        "results": rows,
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

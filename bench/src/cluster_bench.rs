//! `shadowcache-bench cluster`: a boot storm on a real cluster of node processes on loopback.
//!
//! Node 0 owns a generated replica image (sealed). Every node then has `readers` clients read
//! the whole image at once, each in its own random order. The run is repeated in three modes,
//! side by side: `peer` (shadow clones: homes fetch from the owner once and serve the others),
//! `alone` (every node caches, but each misses to the owner: CBRC-like), and `nocache` (every
//! read forwarded to the owner). Reported: owner egress ÷ working set (the target is at most
//! 1.05 with peer fetch; the limit is 1.0, caching alone gives about N - 1), total bytes
//! between nodes, and read latency percentiles. Prints figures; asserts nothing.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};
use shadowcache_testkit::{NodeProcess, free_peer_port, free_port, http_get, metric};

use crate::synthetic::Mix;

/// Options of the cluster benchmark.
#[derive(Debug, Clone)]
pub struct Options {
    /// Node processes, the owner included.
    pub nodes: usize,
    /// Concurrent readers on each node (default: as many as nodes).
    pub readers: usize,
    /// Working set (replica) size, bytes.
    pub working_set: u64,
    /// Bytes per read.
    pub read_bytes: u64,
    /// The owner's origin as shared storage: its reads paced by the owner node's
    /// `[origin_limit]` (none by default: an origin in the page cache).
    pub origin_limit: shadowcache_node::origin::OriginLimit,
    /// Each node's `--read-ahead` (`None`: the node's default).
    pub read_ahead: Option<u64>,
}

const PEER_RPCS: [&str; 3] = ["peer_read", "peer_fetch_blocks", "peer_content_map"];

fn served_bytes(body: &str) -> u64 {
    PEER_RPCS
        .iter()
        .map(|rpc| {
            metric(
                body,
                &format!("shadowcache_rpc_bytes_total{{rpc=\"{rpc}\"}}"),
            )
            .unwrap_or(0.0) as u64
        })
        .sum()
}

struct Running {
    nodes: Vec<(NodeProcess, u16)>,
}

async fn start_cluster(
    dir: &Path,
    image: &Path,
    opts: &Options,
    mode: &str,
) -> anyhow::Result<Running> {
    let mut nodes = Vec::new();
    let mut seed = String::new();
    for n in 0..opts.nodes {
        let peer = free_peer_port();
        let metrics = free_port();
        let data = dir.join(format!("{mode}-n{n}"));
        std::fs::create_dir_all(&data)?;
        let config = data.join("node.toml");
        std::fs::write(
            &config,
            format!(
                "[cluster]\ngossip_interval_ms = 200\ncache_remote = {}\npeer_fetch = {}\n",
                mode != "nocache",
                mode == "peer"
            ),
        )?;
        let mut args = vec![
            format!("--config={}", config.display()),
            format!("--node-id=n{n}"),
            format!("--peer-listen=127.0.0.1:{peer}"),
            format!("--metrics=127.0.0.1:{metrics}"),
            format!("--ram-cache={}", (opts.working_set * 2).max(64 << 20)),
            "--ssd-cache=0".to_string(),
        ];
        if let Some(r) = opts.read_ahead {
            args.push(format!("--read-ahead={r}"));
        }
        if n == 0 {
            args.push(format!("--disk=replica={},sealed", image.display()));
            args.extend(crate::storm::launch::origin_limit_args(&opts.origin_limit));
            seed = format!("127.0.0.1:{peer}");
        } else {
            args.push(format!("--seed={seed}"));
        }
        nodes.push((NodeProcess::start(&data, &args), metrics));
    }
    // Wait until every node sees every member and the replica.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (p, _) in &nodes {
        let c = shadowcache_client::Client::connect_unix(&p.socket).await?;
        loop {
            let s = c.status().await?;
            if s.members.len() == opts.nodes && s.disks.iter().any(|d| d.id == "replica") {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "cluster did not form in 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(Running { nodes })
}

async fn run_mode(dir: &Path, image: &Path, opts: &Options, mode: &str) -> anyhow::Result<Value> {
    let cluster = start_cluster(dir, image, opts, mode).await?;
    let reads_per_reader = opts.working_set / opts.read_bytes;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, (p, _)) in cluster.nodes.iter().enumerate() {
        let client = shadowcache_client::Client::connect_unix(&p.socket).await?;
        for r in 0..opts.readers {
            let disk = client.disk("replica");
            let mut order: Vec<u64> = (0..reads_per_reader).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
                (n * 1000 + r) as u64,
            ));
            let read_bytes = opts.read_bytes;
            tasks.push(tokio::spawn(async move {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
                for i in order {
                    let t = Instant::now();
                    disk.read_at(i * read_bytes, read_bytes).await?;
                    h.record(t.elapsed().as_nanos().max(1) as u64)?;
                }
                Ok::<_, anyhow::Error>(h)
            }));
        }
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for t in tasks {
        all.add(t.await.context("reader task")??)?;
    }
    let secs = started.elapsed().as_secs_f64();
    // Block maps settle a few hundred ms after the last read; their cost is part of the bill.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut per_node = Vec::new();
    let mut total = 0;
    let mut map_traffic = 0u64;
    let mut map_bytes = 0u64;
    let mut owner_origin = (0u64, 0u64);
    for (i, (_, metrics)) in cluster.nodes.iter().enumerate() {
        let body = http_get(*metrics, "/metrics").context("metrics")?;
        if i == 0 {
            owner_origin = (
                metric(&body, "shadowcache_origin_read_bytes_total").unwrap_or(0.0) as u64,
                metric(&body, "shadowcache_origin_limit_wait_microseconds_total").unwrap_or(0.0)
                    as u64,
            );
        }
        let b = served_bytes(&body);
        per_node.push(b);
        total += b;
        map_traffic +=
            metric(&body, "shadowcache_block_map_traffic_bytes_total").unwrap_or(0.0) as u64;
        map_bytes += metric(&body, "shadowcache_block_map_bytes").unwrap_or(0.0) as u64;
    }
    total += map_traffic;
    let ws = opts.working_set as f64;
    let read_total = all.len() * opts.read_bytes;
    drop(cluster);
    Ok(json!({
        "mode": mode,
        "owner_egress_bytes": per_node[0],
        "owner_egress_over_working_set": (per_node[0] as f64 / ws * 1000.0).round() / 1000.0,
        "network_bytes": total,
        "network_over_working_set": (total as f64 / ws * 1000.0).round() / 1000.0,
        "owner_origin_read_bytes": owner_origin.0,
        "owner_origin_limit_wait_ms": owner_origin.1 / 1000,
        "block_map_traffic_bytes": map_traffic,
        "block_map_bytes_held": map_bytes,
        "reads": all.len(),
        "read_bytes": read_total,
        "seconds": (secs * 100.0).round() / 100.0,
        "p50_us": all.value_at_quantile(0.5) as f64 / 1000.0,
        "p99_us": all.value_at_quantile(0.99) as f64 / 1000.0,
    }))
}

/// Runs the three modes and prints a table.
pub async fn run(opts: Options) -> anyhow::Result<Value> {
    anyhow::ensure!(opts.nodes >= 2, "--nodes must be at least 2");
    anyhow::ensure!(
        opts.read_bytes > 0 && opts.working_set >= opts.read_bytes,
        "the working set must hold at least one read"
    );
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("replica.raw");
    {
        use std::io::Write;
        let mix = Mix {
            zero_fraction: 0.0,
            dup_fraction: 0.0,
            ..Mix::default()
        };
        let mut f = std::io::BufWriter::new(std::fs::File::create(&image)?);
        let mut at = 0;
        while at < opts.working_set {
            let n = (1u64 << 20).min(opts.working_set - at);
            f.write_all(&mix.read(at, n as usize))?;
            at += n;
        }
        f.flush()?;
    }
    eprintln!(
        "cluster boot storm: {} nodes, {} readers each, {} MiB working set, {} KiB reads",
        opts.nodes,
        opts.readers,
        opts.working_set >> 20,
        opts.read_bytes >> 10
    );
    let mut rows = Vec::new();
    for mode in ["peer", "alone", "nocache"] {
        eprintln!("running mode {mode} ...");
        rows.push(run_mode(dir.path(), &image, &opts, mode).await?);
    }
    println!();
    println!(
        "{:<8} {:>22} {:>22} {:>10} {:>10} {:>8} {:>16}",
        "mode", "owner egress / set", "network / set", "p50 µs", "p99 µs", "secs", "origin wait ms"
    );
    let maps = |r: &Value| r["block_map_traffic_bytes"].as_u64().unwrap_or(0);
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        println!(
            "{:<8} {:>22.3} {:>22.3} {:>10.0} {:>10.0} {:>8.2} {:>16}",
            r["mode"].as_str().unwrap_or(""),
            f("owner_egress_over_working_set"),
            f("network_over_working_set"),
            f("p50_us"),
            f("p99_us"),
            f("seconds"),
            r["owner_origin_limit_wait_ms"].as_u64().unwrap_or(0)
        );
    }
    if let Some(peer) = rows.first() {
        println!(
            "block maps (mode peer): {} bytes received in all, {} bytes held in all",
            maps(peer),
            peer["block_map_bytes_held"].as_u64().unwrap_or(0)
        );
    }
    Ok(json!({
        "benchmark": "cluster",
        "nodes": opts.nodes,
        "readers_per_node": opts.readers,
        "working_set_bytes": opts.working_set,
        "read_bytes": opts.read_bytes,
        "origin_read_bytes_per_s": opts.origin_limit.read_bytes_per_s,
        "origin_read_iops": opts.origin_limit.read_iops,
        "origin_read_latency_ms": opts.origin_limit.read_latency_ms,
        "results": rows,
    }))
}

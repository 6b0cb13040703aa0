//! `shadowcache-bench demo`: the main job on an embedded default. A node starts on a generated
//! replica image, desktops "boot" one after another by reading the replica's boot set through
//! the gRPC client, and the hit ratios and origin traffic are printed as they go.
//!
//! Everything runs on this machine: a real node (in this process, serving its real Unix
//! socket) and real gRPC reads. Later work turns this into a multi-node boot storm.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use shadowcache_node::{Config, DiskMode};

use crate::synthetic::Mix;

/// Demo options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Desktops to boot.
    pub desktops: usize,
    /// Replica size, bytes.
    pub replica_bytes: u64,
    /// Desktops booting at once.
    pub concurrent: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            desktops: 8,
            replica_bytes: 256 << 20,
            concurrent: 2,
        }
    }
}

/// The reads one desktop makes while booting: a fixed boot set (the same files in every
/// desktop: mostly small reads, some large ones) in a per-desktop order, plus a few reads of
/// its own.
fn boot_reads(replica_bytes: u64, desktop: u64) -> Vec<(u64, u64)> {
    let mut set = rand::rngs::StdRng::seed_from_u64(42);
    let span = replica_bytes * 3 / 4;
    let mut reads: Vec<(u64, u64)> = (0..4000)
        .map(|_| {
            let len = match set.random_range(0..100) {
                0..=59 => 4096,
                60..=84 => 16 * 1024,
                85..=96 => 64 * 1024,
                _ => 256 * 1024,
            };
            let off = set.random_range(0..span / 4096) * 4096;
            (off, len.min(replica_bytes - off))
        })
        .collect();
    let mut own = rand::rngs::StdRng::seed_from_u64(1000 + desktop);
    // Boots differ in order a little: swap neighbours.
    for i in (1..reads.len()).step_by(3) {
        if own.random_bool(0.5) {
            reads.swap(i - 1, i);
        }
    }
    for _ in 0..200 {
        let off = own.random_range(0..replica_bytes / 4096) * 4096;
        reads.push((off, 4096.min(replica_bytes - off)));
    }
    reads
}

/// Runs the demo and prints what happens.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("replica.raw");
    println!(
        "shadowcache demo: generating a {} MiB replica image (zero, shared and unique pages) ...",
        opts.replica_bytes >> 20
    );
    {
        use std::io::Write;
        let mix = Mix::default();
        let mut f = std::io::BufWriter::new(std::fs::File::create(&image)?);
        let mut at = 0;
        while at < opts.replica_bytes {
            let n = (1u64 << 20).min(opts.replica_bytes - at);
            f.write_all(&mix.read(at, n as usize))?;
            at += n;
        }
        f.flush()?;
    }
    let mut config = Config::for_data_dir(&dir.path().join("node"));
    config.ram_bytes = 64 << 20;
    config.ssd_bytes = 512 << 20;
    config.disks = vec![shadowcache_node::config::DiskSpec {
        id: "replica".into(),
        origin: image.clone(),
        mode: DiskMode::Sealed,
    }];
    let block_kib = config.block_bytes / 1024;
    let running = shadowcache_node::start(config).await?;
    let socket = running.unix_socket().to_path_buf();
    println!(
        "node serving on {} (block size {block_kib} KiB, RAM 64 MiB, SSD 512 MiB); replica sealed",
        socket.display()
    );
    let client = shadowcache_client::Client::connect_unix(&socket).await?;
    println!();
    println!(
        "{:>8} {:>8} {:>10} {:>12} {:>10} {:>11}",
        "desktop", "reads", "read MiB", "origin MiB", "hit ratio", "boot secs"
    );
    let started = Instant::now();
    let mut next = 0usize;
    while next < opts.desktops {
        let wave: Vec<usize> = (next..(next + opts.concurrent).min(opts.desktops)).collect();
        next += wave.len();
        let before = client.status().await?.counters.unwrap_or_default();
        let t = Instant::now();
        let boots = wave.iter().map(|&d| {
            let disk = client.disk("replica");
            let reads = boot_reads(opts.replica_bytes, d as u64);
            async move {
                let mut bytes = 0u64;
                for (off, len) in &reads {
                    bytes += disk.read_at(*off, *len).await?.len() as u64;
                }
                Ok::<_, shadowcache_client::ClientError>((reads.len(), bytes))
            }
        });
        let results = futures::future::try_join_all(boots).await?;
        let secs = t.elapsed().as_secs_f64();
        let after = client.status().await?.counters.unwrap_or_default();
        let lookups = after.lookups - before.lookups;
        let hits = lookups - (after.misses - before.misses);
        let origin = after.origin_read_bytes - before.origin_read_bytes;
        for (&d, (reads, bytes)) in wave.iter().zip(&results) {
            println!(
                "{:>8} {:>8} {:>10.1} {:>12.1} {:>9.1}% {:>11.2}",
                d + 1,
                reads,
                *bytes as f64 / (1 << 20) as f64,
                origin as f64 / wave.len() as f64 / (1 << 20) as f64,
                100.0 * hits as f64 / lookups.max(1) as f64,
                secs
            );
        }
    }
    let s = client.status().await?;
    let c = s.counters.unwrap_or_default();
    println!();
    println!(
        "after {} desktops in {:.1} s:",
        opts.desktops,
        started.elapsed().as_secs_f64()
    );
    for t in &s.tiers {
        println!(
            "  {:<10} {:>7} entries {:>9.1} MiB  {:>9} hits ({:.1}% of lookups)",
            t.name,
            t.entries,
            t.bytes as f64 / (1 << 20) as f64,
            t.hits,
            100.0 * t.hits as f64 / c.lookups.max(1) as f64
        );
    }
    println!(
        "  misses {} ({:.1}%), zero-block answers {}, dedup ratio {:.2}, origin read {:.1} MiB in {} reads",
        c.misses,
        100.0 * c.misses as f64 / c.lookups.max(1) as f64,
        c.zero_block_hits,
        c.logical_bytes as f64 / c.stored_bytes.max(1) as f64,
        c.origin_read_bytes as f64 / (1 << 20) as f64,
        c.origin_reads
    );
    println!(
        "(`shadowcache --socket {} status` shows the same while a node runs)",
        socket.display()
    );
    drop(client);
    running.shutdown().await?;
    Ok(())
}

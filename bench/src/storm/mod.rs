//! `shadowcache-bench bootstorm`: a VDI boot storm on a cluster of real node processes, in
//! four modes side by side on the same workload and seed, with reports and plots.
//!
//! - `launch.rs`: the cluster launcher (processes, namespaces, links, teardown);
//! - `workload.rs`: desktops' I/O cut from a real trace, the replica image, calibration;
//! - `replay.rs`: the replay engine (NBD or gRPC, open or closed loop);
//! - `report.rs`: the JSON report, the Markdown summary and the plots.
//!
//! The modes (the baselines of the issue):
//! - `nocache`: no cache; every replica read of a member goes to the owner;
//! - `cbrc`: every host caches the replica but misses go to the owner (per-host caches that
//!   never fetch from peers, as VMware's CBRC);
//! - `detect`: shadowcache; the replica is an ordinary mutable disk that the owner detects as
//!   read-only and shared;
//! - `sealed`: shadowcache with the replica sealed by hand.
//!
//! Host 0 owns the replica (its origin paced as shared storage by `[origin_limit]`) and runs
//! desktops too, or with `dedicated_owner` is a node of its own beside the `hosts` that run
//! desktops; every desktop's delta disk is a mutable disk owned by its own host.

pub mod launch;
pub mod replay;
pub mod report;
pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use launch::{Cluster, Network, NodeSpec};
use replay::{Desktop, Live, Pace, Transport};
use workload::Workload;

/// One way of running the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// (a) No cache: every read of a member goes to the owner.
    Nocache,
    /// (b) Per-host caches that never fetch from peers (VMware CBRC).
    Cbrc,
    /// (c) shadowcache, the replica detected as read-only and shared.
    Detect,
    /// (d) shadowcache, the replica sealed by hand.
    Sealed,
}

impl Mode {
    /// All four, in report order.
    pub const ALL: [Mode; 4] = [Mode::Nocache, Mode::Cbrc, Mode::Detect, Mode::Sealed];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Nocache => "nocache",
            Mode::Cbrc => "cbrc",
            Mode::Detect => "detect",
            Mode::Sealed => "sealed",
        }
    }

    /// What it is, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Mode::Nocache => "(a) no cache: every read to the owner",
            Mode::Cbrc => "(b) per-host caches, no peer fetch (CBRC)",
            Mode::Detect => "(c) shadowcache, replica detected",
            Mode::Sealed => "(d) shadowcache, replica sealed by hand",
        }
    }

    fn config(self) -> String {
        let cache = self != Mode::Nocache;
        let peer = matches!(self, Mode::Detect | Mode::Sealed);
        // Detection as a deployment would have it, but a 2 s quiet period: a real replica has
        // been quiet for days before a storm, and a fresh cluster should not wait 10 s.
        format!(
            "[cluster]\ngossip_interval_ms = 200\ncache_remote = {cache}\npeer_fetch = {peer}\n\n\
             [detection]\nenabled = {}\nmin_readers = 2\nmin_reads = 16\nquiet_period_ms = 2000\nwindow_ms = 10000\n",
            self == Mode::Detect
        )
    }
}

/// Options of a storm.
#[derive(Debug, Clone)]
pub struct Options {
    /// Hosts (node processes); host 0 owns the replica.
    pub hosts: usize,
    /// Desktops on each host.
    pub desktops_per_host: usize,
    /// The trace the workload comes from, and its format (detected if `None`).
    pub trace: PathBuf,
    /// The trace's format, detected if `None`.
    pub format: Option<crate::trace::Format>,
    /// One boot replayed by every desktop (`false`: one desktop per trace volume).
    pub boot: bool,
    /// Boot shape (bytes, write share, pacing, seed).
    pub shape: workload::BootShape,
    /// Volumes mode: I/Os per desktop at most, and the speed factor on trace times.
    pub max_ios: usize,
    /// Speed factor on a trace's own times (volumes mode).
    pub speed: f64,
    /// Open or closed loop.
    pub pace: Pace,
    /// NBD or gRPC.
    pub transport: Transport,
    /// Desktops start at seeded random times over this window.
    pub login_window: Duration,
    /// The owner's origin as shared storage.
    pub origin_limit: shadowcache_node::origin::OriginLimit,
    /// Loopback or namespaces, link rate.
    pub network: Network,
    /// RAM and SSD cache of each host, bytes.
    pub ram_cache: u64,
    /// SSD cache of each host, bytes (0: none).
    pub ssd_cache: u64,
    /// RAM cache of the owner (host 0), if not `ram_cache`: the cache in front of the shared
    /// storage, which a storage array does not size to hold every replica for every host.
    pub owner_ram_cache: Option<u64>,
    /// Modes to run, in order.
    pub modes: Vec<Mode>,
    /// Also boot one desktop alone on an idle cluster (mode detect), the reference of boot
    /// times.
    pub alone: bool,
    /// Each mode ends by this long at most (desktops still running are cut short and counted).
    pub time_limit: Duration,
    /// Where node directories go (a temporary directory if `None`).
    pub work_dir: Option<PathBuf>,
    /// No progress bars.
    pub quiet: bool,
    /// Run the hosts as nodes in this process (the many-hosts mode) instead of processes.
    pub in_process: bool,
    /// The owner reads the replica once before the storm (its content map built, as on an
    /// owner that served it before).
    pub warm_owner: bool,
    /// The owner is a node of its own that runs no desktop (the shared storage), besides the
    /// `hosts` that do.
    pub dedicated_owner: bool,
}

/// One sample of the cluster while a mode runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Seconds since the storm started.
    pub t: f64,
    /// Owner's bytes served to other members so far.
    pub owner_egress_bytes: u64,
    /// Owner's bytes read from its origin so far.
    pub owner_origin_bytes: u64,
    /// Sums over every host so far: cache lookups, RAM hits, SSD hits, blocks fetched from
    /// peers, blocks read from the owner.
    pub lookups: u64,
    /// RAM hits.
    pub ram_hits: u64,
    /// SSD hits.
    pub ssd_hits: u64,
    /// Blocks fetched from peers.
    pub peer_blocks: u64,
    /// Blocks read from the owner.
    pub owner_blocks: u64,
    /// I/Os completed, all desktops.
    pub ios: u64,
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th.
    pub p99_ms: f64,
    /// 99.9th.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |q: f64| (h.value_at_quantile(q) as f64 / 1e6 * 1000.0).round() / 1000.0;
        Percentiles {
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: (h.max() as f64 / 1e6 * 1000.0).round() / 1000.0,
        }
    }
}

/// Per host at the end of a mode.
#[derive(Debug, Clone, Serialize)]
pub struct HostFigures {
    /// Node id.
    pub id: String,
    /// Bytes this host served to other members.
    pub served_bytes: u64,
    /// Bytes of block maps it received, and holds.
    pub block_map_received_bytes: u64,
    /// Bytes of block maps it holds.
    pub block_map_held_bytes: u64,
    /// Bytes read from its origins.
    pub origin_read_bytes: u64,
}

/// The result of one mode.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    /// Mode name.
    pub mode: Mode,
    /// What the mode is.
    pub describe: &'static str,
    /// Desktops run.
    pub desktops: usize,
    /// Seconds from the first desktop's start to the last one's end.
    pub completion_seconds: f64,
    /// Each desktop's boot time, seconds, sorted.
    pub boot_seconds: Vec<f64>,
    /// Boot time percentiles, seconds.
    pub boot_p50_s: f64,
    /// 99th percentile boot time, seconds.
    pub boot_p99_s: f64,
    /// Read latency.
    pub read_latency: Percentiles,
    /// Write latency.
    pub write_latency: Percentiles,
    /// Reads, writes, bytes.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Writes.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Reads whose bytes were checked against the replica and matched.
    pub verified_reads: u64,
    /// Reads whose bytes did not match (must be 0).
    pub wrong_reads: u64,
    /// Requests that failed, and the first error.
    pub failed: u64,
    /// The first error.
    pub first_error: Option<String>,
    /// Desktops cut short by the time limit.
    pub cut_short: u64,
    /// The owner's bytes served to other members.
    pub owner_egress_bytes: u64,
    /// Owner egress ÷ unique working set.
    pub owner_egress_over_working_set: f64,
    /// The owner's bytes read from its origin.
    pub owner_origin_bytes: u64,
    /// Mean block-map bytes received per host.
    pub block_map_received_per_host: f64,
    /// Hit ratio by tier over the whole run, percent of lookups: RAM, SSD, peers, owner.
    pub tier_percent: TierPercent,
    /// Per host.
    pub hosts: Vec<HostFigures>,
    /// The samples.
    pub samples: Vec<Sample>,
}

/// Where block lookups were answered, percent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierPercent {
    /// Lookups (cache lookups, all hosts).
    pub lookups: u64,
    /// RAM hits.
    pub ram: f64,
    /// SSD hits.
    pub ssd: f64,
    /// Fetched from a peer.
    pub peer: f64,
    /// Read from the owner.
    pub owner: f64,
}

/// What a sample needs of one host's status.
#[derive(Debug, Clone, Copy, Default)]
struct HostStat {
    served: u64,
    origin_read_bytes: u64,
    lookups: u64,
    ram_hits: u64,
    ssd_hits: u64,
    peer_reads: u64,
    owner_reads: u64,
    uptime_ms: u64,
    block_map_traffic: u64,
    block_map_bytes: u64,
}

/// The hosts of a run: node processes (reached through their sockets) or nodes in this
/// process (the many-hosts mode, over the in-process membership and Peer service).
enum Hosts {
    Processes {
        clients: Vec<shadowcache_client::Client>,
        // Dropped last: tears the processes down.
        cluster: Cluster,
    },
    InProcess {
        nodes: Vec<shadowcache_node::RunningNode>,
        _net: shadowcache_node::inprocess::InProcessNet,
    },
}

impl Hosts {
    fn len(&self) -> usize {
        match self {
            Hosts::Processes { clients, .. } => clients.len(),
            Hosts::InProcess { nodes, .. } => nodes.len(),
        }
    }

    fn id(&self, i: usize) -> String {
        match self {
            Hosts::Processes { cluster, .. } => cluster.nodes[i].id.clone(),
            Hosts::InProcess { nodes, .. } => nodes[i].node().config().node_id.clone(),
        }
    }

    async fn stats(&self) -> Vec<HostStat> {
        let mut out = Vec::with_capacity(self.len());
        match self {
            Hosts::Processes { clients, .. } => {
                for c in clients {
                    let Ok(st) = c.status().await else {
                        out.push(HostStat::default());
                        continue;
                    };
                    let k = st.counters.unwrap_or_default();
                    let l = st.leases.unwrap_or_default();
                    let tier = |ssd: bool| {
                        st.tiers
                            .iter()
                            .filter(|t| (t.name == "ssd") == ssd)
                            .map(|t| t.hits)
                            .sum()
                    };
                    out.push(HostStat {
                        served: l.peer_served_bytes,
                        origin_read_bytes: k.origin_read_bytes,
                        lookups: k.lookups,
                        ram_hits: tier(false),
                        ssd_hits: tier(true),
                        peer_reads: k.peer_reads,
                        owner_reads: k.owner_reads,
                        uptime_ms: st.uptime_ms,
                        block_map_traffic: l.block_map_traffic_bytes,
                        block_map_bytes: l.block_map_bytes,
                    });
                }
            }
            Hosts::InProcess { nodes, .. } => {
                for n in nodes {
                    let st = n.node().status();
                    let tier = |ssd: bool| {
                        st.tiers
                            .iter()
                            .filter(|t| (t.tier == shadowcache_node::cache::Tier::Ssd) == ssd)
                            .map(|t| t.hits)
                            .sum()
                    };
                    out.push(HostStat {
                        served: st.leases.peer_served_bytes,
                        origin_read_bytes: st.counters.origin_read_bytes,
                        lookups: st.counters.lookups,
                        ram_hits: tier(false),
                        ssd_hits: tier(true),
                        peer_reads: st.counters.peer_reads,
                        owner_reads: st.counters.owner_reads,
                        uptime_ms: st.uptime_ms,
                        block_map_traffic: st.leases.block_map_traffic_bytes,
                        block_map_bytes: st.leases.block_map_bytes,
                    });
                }
            }
        }
        out
    }

    /// The owner reads the whole replica once, as an owner that has served it before has: its
    /// content map is built (and its cache holds what fits) before the storm.
    async fn warm_owner(&self, size: u64) -> anyhow::Result<()> {
        const PIECE: u64 = 1 << 20;
        let pieces: Vec<u64> = (0..size.div_ceil(PIECE)).map(|i| i * PIECE).collect();
        for group in pieces.chunks(4) {
            let reads = group.iter().map(|&off| {
                let len = PIECE.min(size - off);
                async move {
                    match self {
                        Hosts::Processes { clients, .. } => clients[0]
                            .disk("replica")
                            .read_at(off, len)
                            .await
                            .map(|_| ())
                            .map_err(anyhow::Error::from),
                        Hosts::InProcess { nodes, .. } => nodes[0]
                            .node()
                            .read("replica", off, len)
                            .await
                            .map(|_| ())
                            .map_err(anyhow::Error::from),
                    }
                }
            });
            futures::future::try_join_all(reads)
                .await
                .context("the owner reading the replica before the storm")?;
        }
        Ok(())
    }

    async fn shutdown(self) {
        match self {
            Hosts::Processes { clients, cluster } => {
                drop(clients);
                drop(cluster);
            }
            Hosts::InProcess { nodes, .. } => {
                for n in nodes {
                    let _ = n.shutdown().await;
                }
            }
        }
    }
}

async fn sample(hosts: &Hosts, t: f64, live: &Live) -> Sample {
    let mut s = Sample {
        t,
        ios: live.ios.load(Ordering::Relaxed),
        ..Default::default()
    };
    for (i, h) in hosts.stats().await.iter().enumerate() {
        if i == 0 {
            s.owner_egress_bytes = h.served;
            s.owner_origin_bytes = h.origin_read_bytes;
        }
        s.lookups += h.lookups;
        s.peer_blocks += h.peer_reads;
        s.owner_blocks += h.owner_reads;
        s.ram_hits += h.ram_hits;
        s.ssd_hits += h.ssd_hits;
    }
    s
}

/// The progress display: one bar per mode.
pub fn progress(quiet: bool, total: u64, label: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>8} [{elapsed_precise}] {bar:32} {pos}/{len} I/Os {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_prefix(label.to_string());
    pb
}

/// Runs `mode` on a fresh cluster with `desktops` (the first `n` of the workload).
#[allow(clippy::too_many_arguments)]
async fn run_mode(
    dir: &Path,
    opts: &Options,
    work: &Workload,
    hashes: &Arc<Vec<blake3::Hash>>,
    image: &Path,
    mode: Mode,
    (desktops, first_host): (usize, usize),
    label: &str,
) -> anyhow::Result<ModeResult> {
    let dir = dir.join(label);
    std::fs::create_dir_all(&dir)?;
    let hosts = opts.hosts;
    // With a dedicated owner, node 0 is the replica's storage and runs no desktop.
    let skip = usize::from(opts.dedicated_owner);
    // Desktop i runs on host (first_host + i) % hosts.
    let host_of = |i: usize| skip + (first_host + i) % hosts;
    let mut specs = Vec::new();
    for h in 0..hosts + skip {
        let ram = if h == 0 {
            opts.owner_ram_cache.unwrap_or(opts.ram_cache)
        } else {
            opts.ram_cache
        };
        let mut args = vec![
            format!("--ram-cache={ram}"),
            format!("--ssd-cache={}", opts.ssd_cache),
        ];
        if h == 0 {
            let m = if mode == Mode::Detect {
                "mutable"
            } else {
                "sealed"
            };
            args.push(format!("--disk=replica={},{m}", image.display()));
            args.extend(launch::origin_limit_args(&opts.origin_limit));
        }
        let deltas = dir.join(format!("h{h}-deltas"));
        std::fs::create_dir_all(&deltas)?;
        for d in (0..desktops).filter(|&d| host_of(d) == h) {
            let path = deltas.join(format!("d{d}.raw"));
            std::fs::File::create(&path)?.set_len(work.delta_bytes)?;
            args.push(format!("--disk=delta{d}={},mutable", path.display()));
        }
        specs.push(NodeSpec {
            id: format!("h{h}"),
            config: mode.config(),
            args,
        });
    }
    let hosts_run = if opts.in_process {
        start_in_process(&dir, &specs).await?
    } else {
        let cluster = Cluster::launch(
            &dir,
            &specs,
            &opts.network,
            "replica",
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("starting the cluster for mode {}", mode.name()))?;
        let mut clients = Vec::new();
        for n in &cluster.nodes {
            clients.push(shadowcache_client::Client::connect_unix(&n.socket).await?);
        }
        Hosts::Processes { clients, cluster }
    };
    if opts.warm_owner {
        hosts_run.warm_owner(work.replica_bytes).await?;
    }
    let before = settle(&hosts_run, mode).await?;
    let total: u64 = work.desktops[..desktops]
        .iter()
        .map(|d| d.len() as u64)
        .sum();
    let pb = progress(opts.quiet, total, label);
    let live = Arc::new(Live::default());
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.shape.seed);
    let t0 = Instant::now() + Duration::from_millis(200);
    let deadline = t0 + opts.time_limit;
    let window = opts.login_window.as_secs_f64();
    let mut tasks = Vec::new();
    // Desktops stop when the run is dropped (Ctrl-C, an error): their NBD connections close,
    // so the nodes shut down at once rather than waiting for clients.
    let mut abort = AbortOnDrop(Vec::new());
    for (d, ios) in work.desktops[..desktops].iter().enumerate() {
        let h = host_of(d);
        let offset = if desktops > 1 && window > 0.0 {
            rng.random_range(0.0..window)
        } else {
            0.0
        };
        let desk = Desktop {
            ios: Arc::new(ios.clone()),
            replica: "replica".into(),
            delta: format!("delta{d}"),
            sockets: match &hosts_run {
                Hosts::Processes { cluster, .. } => (
                    cluster.nodes[h].nbd_socket.clone(),
                    cluster.nodes[h].socket.clone(),
                ),
                Hosts::InProcess { .. } => Default::default(),
            },
            start: t0 + Duration::from_secs_f64(offset),
            node: match &hosts_run {
                Hosts::InProcess { nodes, .. } => Some(nodes[h].node().clone()),
                Hosts::Processes { .. } => None,
            },
        };
        tasks.push(tokio::spawn(replay::run_desktop(
            desk,
            hashes.clone(),
            opts.pace,
            opts.transport,
            live.clone(),
            deadline,
        )));
    }
    // Sample every 250 ms until every desktop is done.
    let mut samples = Vec::new();
    abort.0 = tasks.iter().map(|t| t.abort_handle()).collect();
    let all_done = || tasks.iter().all(|t| t.is_finished());
    while !all_done() {
        let t = t0.elapsed().as_secs_f64();
        samples.push(sample(&hosts_run, t.max(0.0), &live).await);
        pb.set_position(live.ios.load(Ordering::Relaxed));
        pb.set_message(format!(
            "{} of {desktops} desktops booted",
            live.booted.load(Ordering::Relaxed)
        ));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let completion = t0.elapsed().as_secs_f64();
    pb.set_position(live.ios.load(Ordering::Relaxed));
    pb.finish_and_clear();
    let mut runs = Vec::new();
    for t in tasks {
        runs.push(t.await.context("a desktop's task")??);
    }
    // Block maps settle a little after the last read; their cost is part of the bill.
    tokio::time::sleep(Duration::from_millis(600)).await;
    samples.push(sample(&hosts_run, t0.elapsed().as_secs_f64(), &live).await);
    let mut hosts_fig = Vec::new();
    for (i, st) in hosts_run.stats().await.into_iter().enumerate() {
        hosts_fig.push(HostFigures {
            id: hosts_run.id(i),
            served_bytes: st.served,
            block_map_received_bytes: st.block_map_traffic,
            block_map_held_bytes: st.block_map_bytes,
            origin_read_bytes: st.origin_read_bytes,
        });
    }
    hosts_run.shutdown().await;
    let mut rl = replay::histogram();
    let mut wl = replay::histogram();
    let mut boots: Vec<f64> = Vec::new();
    let mut r = ModeResult {
        mode,
        describe: mode.describe(),
        desktops,
        completion_seconds: round3(completion),
        boot_seconds: Vec::new(),
        boot_p50_s: 0.0,
        boot_p99_s: 0.0,
        read_latency: Percentiles::of(&rl),
        write_latency: Percentiles::of(&wl),
        reads: 0,
        read_bytes: 0,
        writes: 0,
        write_bytes: 0,
        verified_reads: 0,
        wrong_reads: 0,
        failed: 0,
        first_error: None,
        cut_short: 0,
        owner_egress_bytes: 0,
        owner_egress_over_working_set: 0.0,
        owner_origin_bytes: 0,
        block_map_received_per_host: 0.0,
        tier_percent: TierPercent::default(),
        hosts: hosts_fig,
        samples,
    };
    for run in runs {
        rl.add(&run.read_latency)?;
        wl.add(&run.write_latency)?;
        boots.push(run.boot_seconds);
        r.reads += run.reads;
        r.read_bytes += run.read_bytes;
        r.writes += run.writes;
        r.write_bytes += run.write_bytes;
        r.verified_reads += run.verified;
        r.wrong_reads += run.wrong;
        r.failed += run.failed;
        r.cut_short += u64::from(run.cut_short);
        if r.first_error.is_none() {
            r.first_error = run.first_error;
        }
    }
    boots.sort_by(f64::total_cmp);
    let q = |p: f64| -> f64 {
        if boots.is_empty() {
            return 0.0;
        }
        let i = ((p * boots.len() as f64).ceil() as usize).clamp(1, boots.len()) - 1;
        round3(boots[i])
    };
    r.boot_p50_s = q(0.5);
    r.boot_p99_s = q(0.99);
    r.boot_seconds = boots.iter().map(|b| round3(*b)).collect();
    r.read_latency = Percentiles::of(&rl);
    r.write_latency = Percentiles::of(&wl);
    // Counters count from the storm's start: what the cluster did before (the owner hashing
    // the replica for its content map) is not the storm's.
    for s in &mut r.samples {
        s.owner_egress_bytes = s
            .owner_egress_bytes
            .saturating_sub(before.owner_egress_bytes);
        s.owner_origin_bytes = s
            .owner_origin_bytes
            .saturating_sub(before.owner_origin_bytes);
        s.lookups = s.lookups.saturating_sub(before.lookups);
        s.ram_hits = s.ram_hits.saturating_sub(before.ram_hits);
        s.ssd_hits = s.ssd_hits.saturating_sub(before.ssd_hits);
        s.peer_blocks = s.peer_blocks.saturating_sub(before.peer_blocks);
        s.owner_blocks = s.owner_blocks.saturating_sub(before.owner_blocks);
    }
    let last = r.samples.last().cloned().unwrap_or_default();
    r.owner_egress_bytes = last.owner_egress_bytes;
    r.owner_origin_bytes = last.owner_origin_bytes;
    let ws = work.working_set(16 << 10).max(1) as f64;
    r.owner_egress_over_working_set = round3(last.owner_egress_bytes as f64 / ws);
    r.block_map_received_per_host = (r
        .hosts
        .iter()
        .map(|h| h.block_map_received_bytes as f64)
        .sum::<f64>()
        / r.hosts.len().max(1) as f64)
        .round();
    let lk = last.lookups.max(1) as f64;
    r.tier_percent = TierPercent {
        lookups: last.lookups,
        ram: round3(100.0 * last.ram_hits as f64 / lk),
        ssd: round3(100.0 * last.ssd_hits as f64 / lk),
        peer: round3(100.0 * last.peer_blocks as f64 / lk),
        owner: round3(100.0 * last.owner_blocks as f64 / lk),
    };
    Ok(r)
}

/// Waits until the cluster is idle: the owner has stopped reading its origin (the content map
/// of the replica is built) and, with detection, the replica has been quiet for the quiet
/// period (a real replica is quiet for days before a storm). Returns the counters then.
async fn settle(hosts: &Hosts, mode: Mode) -> anyhow::Result<Sample> {
    let live = Live::default();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = None;
    let mut still = 0;
    loop {
        let s = sample(hosts, 0.0, &live).await;
        let uptime = hosts.stats().await.first().map_or(0, |h| h.uptime_ms);
        let quiet = mode != Mode::Detect || uptime >= 2_500;
        if last == Some(s.owner_origin_bytes) {
            still += 1;
        } else {
            still = 0;
        }
        if still >= 3 && quiet {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("the owner did not settle (it kept reading its origin) in 120 s");
        }
        last = Some(s.owner_origin_bytes);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `specs` as nodes in this process over the in-process membership and Peer service
/// (the same node code; calls between members are function calls, not TCP).
async fn start_in_process(dir: &Path, specs: &[NodeSpec]) -> anyhow::Result<Hosts> {
    use clap::Parser;
    let net = shadowcache_node::inprocess::InProcessNet::new();
    let clock = shadowcache_node::clock::system();
    let mut nodes = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let data_dir = dir.join(&spec.id);
        std::fs::create_dir_all(&data_dir)?;
        let config_path = data_dir.join("node.toml");
        std::fs::write(&config_path, &spec.config)?;
        let mut args = vec![
            "shadowcache-node".to_string(),
            format!("--data-dir={}", data_dir.display()),
            format!("--config={}", config_path.display()),
            format!("--node-id={}", spec.id),
            format!("--nbd-unix={}", data_dir.join("nbd.sock").display()),
        ];
        args.extend(spec.args.iter().cloned());
        let flags = shadowcache_node::Flags::try_parse_from(&args)
            .map_err(|e| anyhow::anyhow!("node {}: {e}", spec.id))?;
        let config = shadowcache_node::Config::from_flags(&flags)
            .map_err(|e| anyhow::anyhow!("node {}: {e}", spec.id))?;
        let env = net.environment(&spec.id, 1, clock.clone(), 1 + i as u64);
        let running = shadowcache_node::start_in(config, env)
            .await
            .with_context(|| format!("starting in-process node {}", spec.id))?;
        net.attach(&spec.id, running.node());
        nodes.push(running);
    }
    let want = nodes.len();
    let deadline = Instant::now() + Duration::from_secs(120);
    for n in &nodes {
        loop {
            let st = n.node().status();
            if st.members.len() == want && st.disks.iter().any(|d| d.id == "replica") {
                break;
            }
            if Instant::now() > deadline {
                bail!("the in-process cluster did not form in 120 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(Hosts::InProcess { nodes, _net: net })
}

/// Aborts the tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Runs the storm: every mode on a fresh cluster, then the report.
pub async fn run(opts: Options) -> anyhow::Result<report::Report> {
    if opts.hosts < 2 {
        bail!("--hosts must be at least 2 (host 0 owns the replica, the others read it)");
    }
    if opts.desktops_per_host == 0 {
        bail!("--desktops-per-host must be at least 1");
    }
    if opts.modes.is_empty() {
        bail!("--modes names no mode");
    }
    let desktops = opts.hosts * opts.desktops_per_host;
    let work = if opts.boot {
        Workload::boot(&opts.trace, opts.format, desktops, &opts.shape)?
    } else {
        Workload::volumes(
            &opts.trace,
            opts.format,
            desktops,
            opts.max_ios,
            opts.speed,
            opts.shape.iops,
        )?
    };
    let desktops = work.desktops.len();
    let tmp;
    let dir: PathBuf = match &opts.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .with_context(|| format!("creating the work directory {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let image = dir.join("replica.raw");
    let hashes = Arc::new(work.write_replica(&image)?);
    let calibration = work.calibration();
    let working_set = work.working_set(16 << 10);
    if !opts.quiet {
        eprintln!(
            "boot storm: {} hosts x {} desktops, workload {}; replica {} MiB, unique working set {:.1} MiB",
            opts.hosts,
            opts.desktops_per_host,
            work.source,
            work.replica_bytes >> 20,
            working_set as f64 / (1 << 20) as f64
        );
    }
    let mut results = Vec::new();
    let mut alone = None;
    if opts.alone {
        // One desktop on a non-owner host of an idle cluster: the reference boot time.
        let mut one = opts.clone();
        one.login_window = Duration::ZERO;
        let r = run_mode(
            &dir,
            &one,
            &work,
            &hashes,
            &image,
            Mode::Detect,
            (1, 1),
            "alone",
        )
        .await?;
        alone = Some(r);
    }
    for &mode in &opts.modes {
        results.push(
            run_mode(
                &dir,
                &opts,
                &work,
                &hashes,
                &image,
                mode,
                (desktops, 0),
                mode.name(),
            )
            .await?,
        );
    }
    Ok(report::Report::new(
        &opts,
        &work,
        calibration,
        working_set,
        alone,
        results,
    ))
}

#[cfg(test)]
mod tests;

//! `shadowcache-bench`: prints figures; asserts nothing.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use shadowcache_bench::{alloc, cache_bench, cluster_bench, nbd_bench, policy_bench, storm, trace};
use shadowcache_node::config::Size;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

#[derive(Debug, Parser)]
#[command(
    name = "shadowcache-bench",
    version,
    about = "shadowcache benchmarks, trace replay and demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct FaultArgs {
    /// Seeds with every guard in place (0: no simulation).
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// The first seed (a failing seed replays with --first-seed N --seeds 1).
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Seeds run with each guard removed.
    #[arg(long, default_value_t = 400)]
    guard_seeds: u64,
    /// Seeds run twice, to count how many replay exactly.
    #[arg(long, default_value_t = 100)]
    replays: u64,
    /// Threads for the simulation (default: one a core).
    #[arg(long)]
    jobs: Option<usize>,
    /// Campaign scenarios to run, comma-separated: `all`, `none`, or names (`--campaign help`
    /// lists them).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    campaign: Vec<String>,
    /// Seconds each timed phase of a campaign scenario lasts.
    #[arg(long, default_value_t = 3.0)]
    phase_seconds: f64,
    /// Run the campaign's nodes with this guard of the lease protocol removed (its fail point,
    /// in a node built with `--features shadowcache-node/failpoints`): the scenarios' checkers
    /// must then fail.
    #[arg(long)]
    remove_guard: Option<String>,
    /// Keep the campaign's node directories (logs, data) here instead of a temporary one.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Options of `bootstorm`.
#[derive(Debug, Clone, clap::Args)]
struct StormArgs {
    /// Hosts (node processes); host 0 owns the replica and runs desktops too.
    #[arg(long, default_value_t = 8)]
    hosts: usize,
    /// Desktops on each host.
    #[arg(long, default_value_t = 16)]
    desktops_per_host: usize,
    /// The trace desktops replay (default: the first 20,000 requests of the ARC set's P2,
    /// Windows NT workstation reads, embedded in this binary).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// The trace's format (default: detected from its content).
    #[arg(long, value_enum)]
    format: Option<trace::Format>,
    /// One desktop per volume of the trace, at the trace's own times (instead of one boot
    /// replayed by every desktop).
    #[arg(long)]
    per_volume: bool,
    /// With --per-volume: I/Os per desktop at most.
    #[arg(long, default_value_t = 5000)]
    max_ios: usize,
    /// With --per-volume: the trace's times run this many times faster.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Bytes one desktop reads while booting (the trace slice ends there; published: 420-600
    /// MB, scaled down to fit a small machine).
    #[arg(long, default_value = "16MiB")]
    boot_size: Size,
    /// Bytes written per byte read (published: about 1/20).
    #[arg(long, default_value_t = 0.05)]
    write_share: f64,
    /// I/Os a second of one desktop in the open loop (published: about 190).
    #[arg(long, default_value_t = 190.0)]
    iops: f64,
    /// Closed loop at this queue depth instead of the open loop.
    #[arg(long)]
    queue_depth: Option<usize>,
    /// How desktops reach their node.
    #[arg(long, value_enum, default_value = "nbd")]
    transport: storm::replay::Transport,
    /// Desktops start at random times over this many seconds.
    #[arg(long, default_value_t = 10.0)]
    login_window: f64,
    #[command(flatten)]
    origin: OriginArgs,
    /// Run each node in its own network namespace, joined to a bridge by a veth pair (root).
    #[arg(long)]
    netns: bool,
    /// Limit each host's link to this many bytes a second, both ways (tc tbf; with --netns).
    #[arg(long)]
    link_rate: Option<Size>,
    /// RAM cache of each host.
    #[arg(long, default_value = "256MiB")]
    ram_cache: Size,
    /// SSD cache of each host (0: none).
    #[arg(long, default_value = "0")]
    ssd_cache: Size,
    /// RAM cache of the owner (host 0), in front of the shared storage (default: --ram-cache).
    #[arg(long)]
    owner_ram_cache: Option<Size>,
    /// Modes to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "nocache,cbrc,detect,sealed"
    )]
    modes: Vec<storm::Mode>,
    /// Skip the reference boot of one desktop alone on an idle cluster.
    #[arg(long)]
    no_alone: bool,
    /// Each mode stops after this many seconds (desktops still booting are cut short).
    #[arg(long, default_value_t = 600.0)]
    time_limit: f64,
    /// Seed of the desktops' orders, writes and start times.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the report and plots go.
    #[arg(long, default_value = "shadowcache-report")]
    out: PathBuf,
    /// Keep the nodes' directories (logs, data) here instead of a temporary directory.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// Run the hosts as nodes in this process, over the in-process membership and Peer
    /// service, instead of node processes (for host counts processes cannot reach here;
    /// desktops call the node instead of attaching over NBD).
    #[arg(long)]
    in_process: bool,
    /// Start with a cold owner: it has not read the replica before the storm, so members'
    /// content-map requests make it fingerprint the replica during the storm (by default the
    /// owner reads it once first, as an owner that served it before has).
    #[arg(long)]
    cold_owner: bool,
    /// The owner is a node of its own, the shared storage, running no desktop (one more
    /// process than --hosts); by default host 0 owns the replica and runs desktops too.
    #[arg(long)]
    dedicated_owner: bool,
}

/// `bootstorm`'s defaults, for the demo to start from.
#[derive(Debug, Parser)]
struct StormDefaults {
    #[command(flatten)]
    storm: StormArgs,
}

/// The first 20,000 requests of P2 (bench/fixtures/traces/PROVENANCE.md).
const P2_HEAD: &[u8] = include_bytes!("../fixtures/traces/P2-head.lis.zst");

impl StormArgs {
    fn options(&self, embedded: &std::path::Path) -> anyhow::Result<storm::Options> {
        let mut origin_limit = self.origin.limit()?;
        if self.origin.origin_rate.is_none() {
            // Shared storage by default: 200 MiB/s at the owner.
            origin_limit.read_bytes_per_s = Some(200 << 20);
        }
        anyhow::ensure!(
            self.login_window >= 0.0 && self.login_window.is_finite(),
            "--login-window must be a number of seconds"
        );
        anyhow::ensure!(
            self.time_limit > 0.0 && self.time_limit.is_finite(),
            "--time-limit must be a positive number of seconds"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.write_share),
            "--write-share must be between 0 and 1"
        );
        Ok(storm::Options {
            hosts: self.hosts,
            desktops_per_host: self.desktops_per_host,
            trace: self.trace.clone().unwrap_or_else(|| embedded.to_path_buf()),
            format: self.format,
            boot: !self.per_volume,
            shape: storm::workload::BootShape {
                read_bytes: self.boot_size.0,
                write_share: self.write_share,
                iops: self.iops,
                seed: self.seed,
            },
            max_ios: self.max_ios,
            speed: self.speed,
            pace: match self.queue_depth {
                Some(q) => storm::replay::Pace::Closed(q.max(1)),
                None => storm::replay::Pace::Open,
            },
            transport: self.transport,
            login_window: std::time::Duration::from_secs_f64(self.login_window),
            origin_limit,
            network: storm::launch::Network {
                netns: self.netns,
                link_rate: self.link_rate.map(|s| s.0),
            },
            ram_cache: self.ram_cache.0,
            ssd_cache: self.ssd_cache.0,
            owner_ram_cache: self.owner_ram_cache.map(|s| s.0),
            modes: self.modes.clone(),
            alone: !self.no_alone,
            time_limit: std::time::Duration::from_secs_f64(self.time_limit),
            work_dir: self.work_dir.clone(),
            quiet: self.quiet,
            in_process: self.in_process,
            warm_owner: !self.cold_owner,
            dedicated_owner: self.dedicated_owner,
        })
    }
}

/// Runs a storm, tearing the cluster down on Ctrl-C or SIGTERM; prints and writes the report.
async fn storm_main(args: StormArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let embedded = tmp.path().join("P2-head.lis.zst");
    std::fs::write(&embedded, P2_HEAD)?;
    let opts = args.options(&embedded)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let report = tokio::select! {
        r = storm::run(opts) => r?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted: the cluster was torn down"),
        _ = term.recv() => anyhow::bail!("terminated: the cluster was torn down"),
    };
    report.print();
    let files = report.write(&args.out)?;
    println!(
        "report and plots in {}/ ({} files)",
        args.out.display(),
        files.len()
    );
    Ok(())
}

/// Runs the scale curve and writes `scale.json`, `scale.md` and `scale.{png,svg}`.
async fn scale_main(
    args: StormArgs,
    mode: storm::Mode,
    process_hosts: &[usize],
    in_process_hosts: &[usize],
) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let embedded = tmp.path().join("P2-head.lis.zst");
    std::fs::write(&embedded, P2_HEAD)?;
    let mut runs = Vec::new();
    for (hosts, in_process) in process_hosts
        .iter()
        .map(|h| (*h, false))
        .chain(in_process_hosts.iter().map(|h| (*h, true)))
    {
        let mut a = args.clone();
        a.hosts = hosts;
        a.in_process = in_process;
        a.no_alone = true;
        a.modes = vec![mode];
        if let Some(w) = &args.work_dir {
            a.work_dir = Some(w.join(format!(
                "{hosts}{}",
                if in_process { "-inproc" } else { "" }
            )));
        }
        let opts = a.options(&embedded)?;
        eprintln!(
            "scale: {hosts} hosts ({}) ...",
            if in_process {
                "in one process"
            } else {
                "processes"
            }
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let report = tokio::select! {
            r = storm::run(opts) => r?,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted: the cluster was torn down"),
            _ = term.recv() => anyhow::bail!("terminated: the cluster was torn down"),
        };
        runs.push((hosts, in_process, report));
    }
    let rows = storm::report::scale_rows(&runs);
    let md = storm::report::scale_markdown(&rows, mode);
    println!("{md}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("scale.md"), &md)?;
    std::fs::write(
        args.out.join("scale.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "schema": 1,
            "benchmark": "scale",
            "mode": mode,
            "rows": rows,
        }))?,
    )?;
    storm::report::scale_plot(&rows, &args.out)?;
    println!(
        "scale curve in {}/ (scale.md, scale.json, scale.{{png,svg}}, scale_egress.{{png,svg}})",
        args.out.display()
    );
    Ok(())
}

/// The owner's origin as shared storage: its node paces its reads of it (`[origin_limit]`).
#[derive(Debug, Clone, clap::Args)]
struct OriginArgs {
    /// Bytes a second the owner may read from its origin (e.g. 200MiB; default: no limit).
    #[arg(long)]
    origin_rate: Option<Size>,
    /// Reads a second the owner may start at its origin.
    #[arg(long)]
    origin_iops: Option<u32>,
    /// Milliseconds added to each of the owner's origin reads.
    #[arg(long, default_value_t = 0.0)]
    origin_latency_ms: f64,
}

impl OriginArgs {
    fn limit(&self) -> anyhow::Result<shadowcache_node::origin::OriginLimit> {
        let l = shadowcache_node::origin::OriginLimit {
            read_bytes_per_s: self.origin_rate.map(|s| s.0),
            read_iops: self.origin_iops,
            read_latency_ms: self.origin_latency_ms,
        };
        l.validate().map_err(|(key, why)| {
            anyhow::anyhow!(
                "--{}: {why}",
                key.replace("origin_limit.read_", "origin-")
                    .replace('_', "-")
            )
        })?;
        Ok(l)
    }
}

/// How a trace is read (every command that takes one).
#[derive(Debug, Clone, clap::Args)]
struct TraceReadArgs {
    /// The trace's format (default: told from its content).
    #[arg(long, value_enum)]
    format: Option<trace::Format>,
    /// Skip rows that cannot be read (counted and reported) instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
    /// Sort records by time within this many rows (0: never; default: only SYSTOR'17
    /// traces, within 65,536 rows).
    #[arg(long)]
    reorder_window: Option<usize>,
}

impl TraceReadArgs {
    fn options(&self) -> trace::Options {
        trace::Options {
            format: self.format,
            skip_bad: self.skip_bad,
            reorder_window: self.reorder_window,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Reads block traces and prints what they hold (format, reads and writes, bytes, volumes,
    /// time span, bad rows): MSR Cambridge, SYSTOR'17, Alibaba, Tencent CBS, SPC/UMass, blkparse,
    /// fio iolog v2/v3, vscsiStats v1/v2, ARC `.lis`, LIRS; plain, zstd or gzip.
    Trace {
        /// Trace files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        read: TraceReadArgs,
        /// Write the summaries here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The main job: a boot storm on 3 local node processes in every mode (no cache, CBRC,
    /// shadowcache detected and sealed); prints the summary and writes the report and plots.
    Demo {
        /// Where the report and plots go.
        #[arg(long, default_value = "shadowcache-report")]
        out: PathBuf,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
    },
    /// A VDI boot storm on a cluster of node processes: desktops replay a boot from a real
    /// trace over a shared replica, writing to their own delta disks, in four modes side by
    /// side (no cache, per-host caches, shadowcache detected, shadowcache sealed); writes a
    /// JSON report, a Markdown summary and plots.
    Bootstorm(StormArgs),
    /// The boot storm's scale curve: one mode at several host counts, as node processes and
    /// (for counts processes cannot reach here) as nodes in one process; owner egress / working
    /// set, p99 boot time and block-map bytes per host against the host count.
    Scale {
        /// Host counts run as node processes.
        #[arg(long, value_delimiter = ',', default_value = "3,8,16")]
        process_hosts: Vec<usize>,
        /// Host counts run as nodes in this process.
        #[arg(long, value_delimiter = ',', default_value = "64,256")]
        in_process_hosts: Vec<usize>,
        /// The mode.
        #[arg(long, value_enum, default_value = "detect")]
        mode: storm::Mode,
        #[command(flatten)]
        storm: StormArgs,
    },
    /// A boot storm on N node processes: owner egress with peer fetch, alone, and uncached.
    Cluster {
        /// Node processes, the owner included (3 to 8 is the intended range).
        #[arg(long, default_value_t = 4)]
        nodes: usize,
        /// Readers on each node (default: as many as nodes).
        #[arg(long)]
        readers: Option<usize>,
        /// Working set (the replica's size).
        #[arg(long, default_value = "32MiB")]
        working_set: Size,
        /// Bytes per read.
        #[arg(long, default_value = "64KiB")]
        read_size: Size,
        #[command(flatten)]
        origin: OriginArgs,
        /// Each node's read-ahead (`--read-ahead`; default: the node's default).
        #[arg(long)]
        read_ahead: Option<Size>,
        /// Write the figures here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// fio over NBD: qemu-nbd, nbdkit file, nbdkit memory and shadowcache (RAM hits, SSD hits,
    /// cold) on the same image; needs fio, qemu-nbd, nbdkit and nbdcopy.
    Nbd {
        /// Image size.
        #[arg(long, default_value = "256MiB")]
        image: Size,
        /// Seconds per measured run.
        #[arg(long, default_value_t = 6)]
        seconds: u64,
        /// Only the cold read at a member (owner and member node processes) beside qemu-nbd.
        #[arg(long)]
        cold_member_only: bool,
        /// The cold member's read-ahead (`--read-ahead`), comma-separated: one fresh member
        /// per setting, in turn, side by side in one run (default: the node's default).
        #[arg(long, value_delimiter = ',')]
        member_read_ahead: Vec<Size>,
        /// Write the figures here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// A trace replayed page by page through the node's RAM pools, beside plain LRU and ARC
    /// (the ARC paper's rules: single-page reads of 512 bytes), with hit ratios per capacity.
    Policy {
        /// The trace, in any format `trace` reads (its reads are replayed).
        #[arg(long, required_unless_present_any = ["replot", "synthetic"], conflicts_with = "synthetic")]
        trace: Option<PathBuf>,
        /// Replay a synthetic family instead of a trace: loop, zigzag, scan-hot, shifting or
        /// multi (seeded; its parameters are printed).
        #[arg(long)]
        synthetic: Option<String>,
        /// The synthetic family's footprint in pages.
        #[arg(long, default_value_t = 20_000, requires = "synthetic")]
        footprint: u64,
        /// The synthetic family's page reads.
        #[arg(long, default_value_t = 400_000, requires = "synthetic")]
        requests: u64,
        /// zigzag's largest window / scan-hot's scan length in pages (default: a twentieth /
        /// a quarter of the footprint).
        #[arg(long, requires = "synthetic")]
        window: Option<u64>,
        /// The synthetic family's seed.
        #[arg(long, default_value_t = 1, requires = "synthetic")]
        seed: u64,
        #[command(flatten)]
        read: TraceReadArgs,
        /// Redraw the plot of a sweep saved with --json instead of replaying (with --plot).
        #[arg(long)]
        replot: Option<PathBuf>,
        /// Cache capacities in pages (comma-separated).
        #[arg(long, value_delimiter = ',')]
        capacity: Vec<u64>,
        /// Bytes per page (default: 4096 for LIRS traces and synthetic families, one block a
        /// page; 512 for other traces, the ARC paper's rule).
        #[arg(long)]
        page_size: Option<u64>,
        /// Sweep capacities from 1/64 of the trace's footprint to all of it (and 1/20, 1/10,
        /// 1/1.1 of it), and plot them.
        #[arg(long)]
        sweep: bool,
        /// Write the figures here as JSON (a sweep also writes a PNG and an SVG beside it).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Plot path prefix (default: the JSON path, or policy-TRACE in the current directory).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Also replay with this many pages of RAM and the rest of each capacity on SSD,
        /// reporting hits by tier and demotions.
        #[arg(long)]
        ram: Option<u64>,
        /// Directory for the SSD files of --ram (default: a temporary directory).
        #[arg(long)]
        scratch: Option<PathBuf>,
        /// Seconds per RAM-hit lookup-rate measurement (0 skips them).
        #[arg(long, default_value_t = 1.0)]
        lookup_seconds: f64,
        /// Also print the hit ratio in every this many requests at each capacity, for LRU, ARC,
        /// the pools, and the pools under each of their sets of rules kept fixed (tuned, arc,
        /// lru, loop): where in a trace which rules win, and what the duel ran
        #[arg(long)]
        segments: Option<u64>,
        /// The node's `cache.single_touch_share` for the replay (default: the node's).
        #[arg(long)]
        single_touch_share: Option<f64>,
        /// The node's `cache.single_touch_min`.
        #[arg(long)]
        single_touch_min: Option<f64>,
        /// The node's `cache.single_touch_max`.
        #[arg(long)]
        single_touch_max: Option<f64>,
        /// The node's `cache.ghost_ratio`.
        #[arg(long)]
        ghost_ratio: Option<f64>,
        /// The node's `cache.adaptive_split`.
        #[arg(long)]
        adaptive_split: Option<bool>,
        /// The node's `cache.second_chances`.
        #[arg(long)]
        second_chances: Option<bool>,
        /// The node's `cache.policy`: duel (pick online), or keep tuned, arc, lru or loop.
        #[arg(long)]
        policy_rules: Option<String>,
        /// The node's `cache.shards`: the RAM pools' shards (0, the default: picked by the
        /// capacity, as the node does). Each row with more than one shard also
        /// replays one, and prints the difference.
        #[arg(long)]
        shards: Option<usize>,
        /// The node's `cache.ssd_admission` for the tiered replay (--ram): proven (the
        /// default) or all.
        #[arg(long)]
        ssd_admission: Option<String>,
        /// The node's `cache.ssd_promote_hits` for the tiered replay (--ram).
        #[arg(long)]
        ssd_promote_hits: Option<u8>,
        /// Key the cache's hashes (the duel's sample, the shards' split) with this seed, so
        /// that the run repeats exactly (default: a random one, printed, as the node's keys
        /// are random per process).
        #[arg(long)]
        hash_seed: Option<u64>,
    },
    /// Under faults: the seeded simulation of a cluster (three nodes in one process, faults
    /// drawn from each seed, every history checked; each guard of the lease protocol removed
    /// in turn; needs a build with `--features faults`), then the real-process campaign (node
    /// processes killed, stopped, cut off, their SSD files corrupted, their disks filled, their
    /// origins failing). One report.
    Faults(FaultArgs),
    /// Cache costs per block size (RAM hit, SSD hit, miss; in process and over gRPC), or with
    /// --trace, hit and dedup ratios of a trace replayed through one node.
    Cache {
        /// Write the figures here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Replay this trace's reads instead (any format `trace` reads).
        #[arg(long)]
        trace: Option<PathBuf>,
        #[command(flatten)]
        read: TraceReadArgs,
        /// Block sizes.
        #[arg(long, value_delimiter = ',', default_value = "4KiB,16KiB,64KiB")]
        block_sizes: Vec<Size>,
        /// RAM sizes for --trace.
        #[arg(long, value_delimiter = ',', default_value = "32MiB,128MiB,512MiB")]
        ram_sizes: Vec<Size>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Image size for the miss measurements.
        #[arg(long, default_value = "512MiB")]
        image: Size,
        /// SSD tier whose index is measured (RAM a slot, open time; sparse files); 0 skips.
        #[arg(long, default_value = "4TiB")]
        ssd_index: Size,
        /// Entries whose headers are written into that tier's index before it is opened
        /// again (at most its slots; 268435456 fills 4 TiB).
        #[arg(long, default_value_t = 1 << 24)]
        ssd_index_fill: u64,
    },
}

/// `faults`: outside any runtime (each seed runs on a runtime of its own).
#[cfg(feature = "faults")]
fn simulation(a: &FaultArgs) -> anyhow::Result<Option<serde_json::Value>> {
    if a.seeds == 0 {
        return Ok(None);
    }
    let jobs = a
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let report = shadowcache_bench::faults::run(&shadowcache_bench::faults::Options {
        seeds: a.seeds,
        first_seed: a.first_seed,
        guard_seeds: a.guard_seeds,
        jobs,
        replays: a.replays,
    })?;
    println!(
        "simulation: {} seeds in {:.0} s: {} reads and {} acknowledged writes checked, {} violations, {} errors",
        report.seeds,
        report.seconds,
        report.reads_checked,
        report.writes_acked,
        report.violations.len(),
        report.errors.len()
    );
    for g in &report.guards {
        println!(
            "{:32} caught by {:4} of {} seeds; first {:?}; replayed {}/3{}",
            g.guard,
            g.caught,
            g.seeds,
            g.first_caught,
            g.replayed,
            if g.must_catch {
                ""
            } else {
                " (defence in depth)"
            }
        );
    }
    println!(
        "replay: {} of {} seeds gave the same results twice; {} the whole history",
        report.replay.same_results, report.replay.seeds, report.replay.identical
    );
    let missed: Vec<&str> = report
        .guards
        .iter()
        .filter(|g| g.must_catch && g.caught == 0)
        .map(|g| g.guard.as_str())
        .collect();
    if !(report.violations.is_empty() && report.errors.is_empty() && missed.is_empty()) {
        eprintln!(
            "simulation FAILED: violations {}, errors {}, guard removals not caught: {missed:?}",
            report.violations.len(),
            report.errors.len()
        );
    }
    let mut v = serde_json::to_value(&report)?;
    v["passed"] =
        (report.violations.is_empty() && report.errors.is_empty() && missed.is_empty()).into();
    Ok(Some(v))
}

#[cfg(not(feature = "faults"))]
fn simulation(a: &FaultArgs) -> anyhow::Result<Option<serde_json::Value>> {
    anyhow::ensure!(
        a.seeds == 0,
        "this shadowcache-bench was built without the simulation; run it as\n  cargo run --release -p shadowcache-bench --features faults -- faults ...\nor pass --seeds 0 for the campaign alone"
    );
    Ok(None)
}

fn faults(a: FaultArgs) -> anyhow::Result<()> {
    use shadowcache_bench::campaign;
    let names: Vec<&str> = campaign::scenarios().iter().map(|s| s.name).collect();
    if a.campaign.iter().any(|c| c == "help") {
        for s in campaign::scenarios() {
            println!("{:24} {}", s.name, s.guarantee);
        }
        return Ok(());
    }
    let only: Vec<String> = if a.campaign.iter().any(|c| c == "none") {
        Vec::new()
    } else if a.campaign.iter().any(|c| c == "all") {
        names.iter().map(|n| n.to_string()).collect()
    } else {
        a.campaign.clone()
    };
    for n in &only {
        anyhow::ensure!(
            names.contains(&n.as_str()),
            "--campaign: no scenario {n:?}; the scenarios are: {}",
            names.join(", ")
        );
    }
    let sim = simulation(&a)?;
    let mut outcomes = Vec::new();
    if !only.is_empty() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        outcomes = rt.block_on(campaign::run(&campaign::Options {
            only,
            phase_seconds: a.phase_seconds,
            work_dir: a.work_dir.clone(),
            node_env: a
                .remove_guard
                .iter()
                .map(|g| ("FAILPOINTS".to_string(), format!("{g}=return")))
                .collect(),
        }))?;
        println!();
        println!("{:24} {:>8} {:>8}  figures", "scenario", "result", "secs");
        for o in &outcomes {
            println!(
                "{:24} {:>8} {:>8.1}  {}",
                o.name,
                match (&o.skipped, o.passed) {
                    (Some(_), _) => "skipped",
                    (None, true) => "passed",
                    (None, false) => "FAILED",
                },
                o.seconds,
                serde_json::Value::Object(o.figures.clone())
            );
            if let Some(why) = &o.skipped {
                println!("{:24} skipped: {why}", "");
            }
            for v in &o.violations {
                println!("{:24} violation: {v}", "");
            }
        }
    }
    let sim_passed = sim.as_ref().is_none_or(|s| s["passed"] == true);
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.name.as_str())
        .collect();
    if let Some(path) = &a.json {
        let report = serde_json::json!({
            "simulation": sim,
            "campaign": outcomes,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("report written to {}", path.display());
    }
    anyhow::ensure!(
        sim_passed && failed.is_empty(),
        "the simulation {}; campaign scenarios not passed (failed or skipped): {failed:?}",
        match (&sim, sim_passed) {
            (None, _) => "did not run",
            (Some(_), true) => "passed",
            (Some(_), false) => "FAILED",
        }
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    // `shadowcache-bench node ARGS`: the node daemon itself (what the launcher runs when no
    // `shadowcache-node` binary sits beside this one).
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == "node") {
        return shadowcache_node::cli::main_from(
            std::iter::once(std::ffi::OsString::from("shadowcache-node")).chain(args),
        );
    }
    match bench_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn bench_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Faults(a) = cli.command {
        return faults(a);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Demo { out, quiet } => {
                let mut args = StormDefaults::parse_from(["demo"]).storm;
                args.hosts = 3;
                args.desktops_per_host = 4;
                args.boot_size = Size(8 << 20);
                args.iops = 400.0;
                args.login_window = 3.0;
                args.ram_cache = Size(128 << 20);
                args.out = out;
                args.quiet = quiet;
                storm_main(args).await
            }
            Command::Bootstorm(args) => storm_main(args).await,
            Command::Scale {
                process_hosts,
                in_process_hosts,
                mode,
                storm,
            } => scale_main(storm, mode, &process_hosts, &in_process_hosts).await,
            Command::Cluster {
                nodes,
                readers,
                working_set,
                read_size,
                origin,
                read_ahead,
                json,
            } => {
                let out = cluster_bench::run(cluster_bench::Options {
                    read_ahead: read_ahead.map(|s| s.0),
                    origin_limit: origin.limit()?,
                    nodes,
                    readers: readers.unwrap_or(nodes).max(1),
                    working_set: working_set.0,
                    read_bytes: read_size.0,
                })
                .await?;
                if let Some(path) = json {
                    std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
                    eprintln!("figures written to {}", path.display());
                }
                Ok(())
            }
            Command::Nbd {
                image,
                seconds,
                cold_member_only,
                member_read_ahead,
                json,
            } => {
                let out = nbd_bench::run_bench(nbd_bench::Options {
                    image_bytes: image.0,
                    seconds: seconds.max(1),
                    cold_member_only,
                    member_read_aheads: if member_read_ahead.is_empty() {
                        vec![None]
                    } else {
                        member_read_ahead.iter().map(|s| Some(s.0)).collect()
                    },
                })
                .await?;
                if let Some(path) = json {
                    std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
                    eprintln!("figures written to {}", path.display());
                }
                Ok(())
            }
            Command::Trace { files, read, json } => {
                let opts = read.options();
                let mut out = Vec::new();
                for f in &files {
                    let s = tokio::task::block_in_place(|| trace::summarize(f, &opts))?;
                    println!("{s}");
                    out.push(s);
                }
                if let Some(path) = json {
                    std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
                    eprintln!("summaries written to {}", path.display());
                }
                Ok(())
            }
            Command::Policy {
                trace,
                synthetic,
                footprint,
                requests,
                window,
                seed,
                read,
                capacity,
                page_size,
                sweep,
                json,
                plot,
                ram,
                scratch,
                lookup_seconds,
                segments,
                replot,
                single_touch_share,
                single_touch_min,
                single_touch_max,
                ghost_ratio,
                adaptive_split,
                second_chances,
                policy_rules,
                shards,
                ssd_admission,
                ssd_promote_hits,
                hash_seed,
            } => {
                if let Some(saved) = replot {
                    let text = std::fs::read_to_string(&saved)?;
                    let out: policy_bench::Output = serde_json::from_str(&text)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", saved.display()))?;
                    let prefix = plot.unwrap_or_else(|| saved.with_extension(""));
                    return policy_bench::draw(&out, &prefix);
                }
                let key_seed = hash_seed.unwrap_or_else(rand::random);
                anyhow::ensure!(
                    shadowcache_node::hashing::fix_keys(key_seed),
                    "the cache's hash keys were fixed before --hash-seed {key_seed}"
                );
                println!("hash seed {key_seed} (--hash-seed {key_seed} repeats this run)");
                let source = match (trace, synthetic) {
                    (Some(trace), None) => policy_bench::Source::Trace(trace, read.options()),
                    (None, Some(family)) => {
                        policy_bench::Source::Synthetic(shadowcache_bench::families::Spec {
                            family: shadowcache_bench::families::Family::parse(&family)?,
                            footprint,
                            requests,
                            window: window.unwrap_or(0),
                            seed,
                        })
                    }
                    _ => anyhow::bail!("give --trace FILE or --synthetic FAMILY"),
                };
                let plot = plot.or_else(|| {
                    sweep.then(|| match &json {
                        Some(j) => j.with_extension(""),
                        None => PathBuf::from(format!("policy-{}", source.name())),
                    })
                });
                let mut out = tokio::task::block_in_place(|| {
                    policy_bench::run(policy_bench::Options {
                        source,
                        capacities: capacity,
                        page_bytes: page_size,
                        sweep,
                        plot,
                        ram_pages: ram,
                        scratch,
                        lookup_seconds,
                        tuning: policy_bench::Tuning {
                            single_touch_share,
                            single_touch_min,
                            single_touch_max,
                            ghost_ratio,
                            adaptive: adaptive_split,
                            second_chances,
                            policy_rules: match policy_rules.as_deref() {
                                None => None,
                                Some("duel") => Some(None),
                                Some(name) => Some(Some(
                                    shadowcache_node::cache::pool::Variant::from_name(name)
                                        .ok_or_else(|| anyhow::anyhow!(
                                            "--policy-rules {name:?}: expected duel, tuned, arc, lru or loop"
                                        ))?,
                                )),
                            },
                            shards,
                            ssd_admission: match ssd_admission.as_deref() {
                                None => None,
                                Some(name) => Some(
                                    shadowcache_node::cache::SsdAdmission::from_name(name)
                                        .ok_or_else(|| {
                                            anyhow::anyhow!(
                                                "--ssd-admission {name:?}: expected proven or all"
                                            )
                                        })?,
                                ),
                            },
                            ssd_promote_hits,
                        },
                        segments,
                    })
                })?;
                out.hash_seed = Some(key_seed);
                if let Some(path) = json {
                    std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
                    eprintln!("figures written to {}", path.display());
                }
                Ok(())
            }
            // Run before the runtime was built.
            Command::Faults { .. } => Ok(()),
            Command::Cache {
                json,
                trace,
                read,
                block_sizes,
                ram_sizes,
                seconds,
                image,
                ssd_index,
                ssd_index_fill,
            } => {
                let block_sizes: Vec<u32> = block_sizes.iter().map(|s| s.0 as u32).collect();
                let out = match trace {
                    Some(trace) => {
                        cache_bench::replay(cache_bench::TraceOptions {
                            trace,
                            trace_opts: read.options(),
                            block_sizes,
                            ram_sizes: ram_sizes.iter().map(|s| s.0).collect(),
                        })
                        .await?
                    }
                    None => {
                        cache_bench::run(cache_bench::Options {
                            block_sizes,
                            seconds,
                            image_bytes: image.0,
                            scratch: None,
                            ssd_index_bytes: ssd_index.0,
                            ssd_index_fill,
                        })
                        .await?
                    }
                };
                if let Some(path) = json {
                    std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
                    eprintln!("figures written to {}", path.display());
                }
                Ok(())
            }
        }
    })
}

//! The storm's report: JSON (schema in docs/bootstorm.md), a Markdown summary with ratios
//! against the baselines, and plots (PNG and SVG).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use super::workload::{Calibration, Workload, published};
use super::{Mode, ModeResult, Options};
use crate::plot::{Series, line_chart};

/// Version of the JSON report's layout.
pub const SCHEMA: u32 = 1;

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Layout version ([`SCHEMA`]).
    pub schema: u32,
    /// `"bootstorm"`.
    pub benchmark: &'static str,
    /// The set-up.
    pub setup: Setup,
    /// The workload beside the published boot figures.
    pub calibration: CalibrationReport,
    /// Unique working set: distinct 16 KiB blocks of the replica read, bytes.
    pub working_set_bytes: u64,
    /// One desktop booting alone on an idle cluster (mode detect), if run.
    pub alone: Option<ModeResult>,
    /// Each mode.
    pub modes: Vec<ModeResult>,
    /// Ratios against the baselines.
    pub ratios: Ratios,
}

/// The set-up of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// Hosts.
    pub hosts: usize,
    /// Desktops per host.
    pub desktops_per_host: usize,
    /// The workload's source.
    pub workload: String,
    /// Trace requests read to build it.
    pub trace_requests: u64,
    /// Replica size, bytes.
    pub replica_bytes: u64,
    /// Open loop, or closed loop at this queue depth.
    pub pace: String,
    /// NBD or gRPC.
    pub transport: super::replay::Transport,
    /// Login window, seconds.
    pub login_window_s: f64,
    /// The owner's origin limit.
    pub origin_rate_bytes_per_s: Option<u64>,
    /// The owner's origin IOPS limit.
    pub origin_iops: Option<u32>,
    /// Latency added to each origin read, ms.
    pub origin_latency_ms: f64,
    /// Network namespaces.
    pub netns: bool,
    /// Link rate, bytes/s.
    pub link_rate_bytes_per_s: Option<u64>,
    /// RAM cache per host, bytes.
    pub ram_cache_bytes: u64,
    /// SSD cache per host, bytes.
    pub ssd_cache_bytes: u64,
    /// The owner's RAM cache, bytes.
    pub owner_ram_cache_bytes: u64,
    /// The owner read the replica once before the storm.
    pub warm_owner: bool,
    /// The owner is a node of its own that runs no desktop.
    pub dedicated_owner: bool,
    /// The seed.
    pub seed: u64,
}

/// The workload beside the published figures.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationReport {
    /// This run's desktops.
    pub run: Calibration,
    /// Published figures (low, high) of one Windows 7 boot.
    pub published: Published,
}

/// Published figures of one boot.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    /// Bytes read.
    pub read_bytes: (f64, f64),
    /// Bytes written.
    pub write_bytes: (f64, f64),
    /// I/Os.
    pub ios: (f64, f64),
    /// Seconds.
    pub seconds: (f64, f64),
    /// IOPS.
    pub iops: f64,
    /// Mean transfer, bytes.
    pub mean_transfer: f64,
    /// Read:write by bytes.
    pub read_write_bytes: f64,
}

/// Ratios of the run (absent where a mode did not run).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    /// Owner egress of detect ÷ nocache.
    pub egress_detect_over_nocache: Option<f64>,
    /// Owner egress of sealed ÷ nocache.
    pub egress_sealed_over_nocache: Option<f64>,
    /// Owner egress of cbrc ÷ nocache.
    pub egress_cbrc_over_nocache: Option<f64>,
    /// Storm completion of detect ÷ cbrc (target at most 0.25).
    pub completion_detect_over_cbrc: Option<f64>,
    /// p99 boot of detect ÷ one desktop alone (target at most 1.3).
    pub p99_boot_detect_over_alone: Option<f64>,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some((a / b * 1000.0).round() / 1000.0),
        _ => None,
    }
}

impl Report {
    /// Builds the report.
    pub fn new(
        opts: &Options,
        work: &Workload,
        calibration: Calibration,
        working_set: u64,
        alone: Option<ModeResult>,
        modes: Vec<ModeResult>,
    ) -> Report {
        let get = |m: Mode| modes.iter().find(|r| r.mode == m);
        let egress = |m: Mode| get(m).map(|r| r.owner_egress_bytes as f64);
        let ratios = Ratios {
            egress_detect_over_nocache: ratio(egress(Mode::Detect), egress(Mode::Nocache)),
            egress_sealed_over_nocache: ratio(egress(Mode::Sealed), egress(Mode::Nocache)),
            egress_cbrc_over_nocache: ratio(egress(Mode::Cbrc), egress(Mode::Nocache)),
            completion_detect_over_cbrc: ratio(
                get(Mode::Detect).map(|r| r.completion_seconds),
                get(Mode::Cbrc).map(|r| r.completion_seconds),
            ),
            p99_boot_detect_over_alone: ratio(
                get(Mode::Detect).map(|r| r.boot_p99_s),
                alone.as_ref().map(|r| r.boot_p99_s),
            ),
        };
        Report {
            schema: SCHEMA,
            benchmark: "bootstorm",
            setup: Setup {
                hosts: opts.hosts,
                desktops_per_host: opts.desktops_per_host,
                workload: work.source.clone(),
                trace_requests: work.trace_requests,
                replica_bytes: work.replica_bytes,
                pace: match opts.pace {
                    super::Pace::Open => "open".into(),
                    super::Pace::Closed(q) => format!("closed, queue depth {q}"),
                },
                transport: opts.transport,
                login_window_s: opts.login_window.as_secs_f64(),
                origin_rate_bytes_per_s: opts.origin_limit.read_bytes_per_s,
                origin_iops: opts.origin_limit.read_iops,
                origin_latency_ms: opts.origin_limit.read_latency_ms,
                netns: opts.network.netns,
                link_rate_bytes_per_s: opts.network.link_rate,
                ram_cache_bytes: opts.ram_cache,
                ssd_cache_bytes: opts.ssd_cache,
                owner_ram_cache_bytes: opts.owner_ram_cache.unwrap_or(opts.ram_cache),
                warm_owner: opts.warm_owner,
                dedicated_owner: opts.dedicated_owner,
                seed: opts.shape.seed,
            },
            calibration: CalibrationReport {
                run: calibration,
                published: Published {
                    read_bytes: published::READ_BYTES,
                    write_bytes: published::WRITE_BYTES,
                    ios: published::IOS,
                    seconds: published::SECONDS,
                    iops: published::IOPS,
                    mean_transfer: published::MEAN_TRANSFER,
                    read_write_bytes: published::READ_WRITE_BYTES,
                },
            },
            working_set_bytes: working_set,
            alone,
            modes,
            ratios,
        }
    }

    /// The Markdown summary.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let st = &self.setup;
        let _ = writeln!(
            s,
            "# Boot storm: {} hosts x {} desktops{}\n",
            st.hosts,
            st.desktops_per_host,
            if st.dedicated_owner {
                ", and the owner on a node of its own"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "Workload: {}. Replica {:.0} MiB, unique working set {:.1} MiB. Pace: {}, over {}; login window {:.1} s. Owner origin: {}{}, owner RAM cache {} MiB{}, hosts' {} MiB. Network: {}.\n",
            st.workload,
            st.replica_bytes as f64 / 1048576.0,
            self.working_set_bytes as f64 / 1048576.0,
            st.pace,
            match st.transport {
                super::replay::Transport::Nbd => "NBD",
                super::replay::Transport::Grpc => "gRPC",
            },
            st.login_window_s,
            st.origin_rate_bytes_per_s
                .map_or("no rate limit".into(), |r| format!(
                    "{:.0} MiB/s",
                    r as f64 / 1048576.0
                )),
            st.origin_iops
                .map_or(String::new(), |i| format!(", {i} IOPS")),
            st.owner_ram_cache_bytes >> 20,
            if st.warm_owner {
                ", warm (it read the replica once before)"
            } else {
                ", cold"
            },
            st.ram_cache_bytes >> 20,
            if st.netns {
                format!(
                    "network namespaces{}",
                    st.link_rate_bytes_per_s.map_or(String::new(), |r| format!(
                        ", links at {:.0} MiB/s",
                        r as f64 / 1048576.0
                    ))
                )
            } else {
                "loopback".into()
            }
        );
        let c = &self.calibration.run;
        let p = &self.calibration.published;
        let _ = writeln!(s, "## Calibration (one desktop)\n");
        let _ = writeln!(
            s,
            "| | this run | published (Windows 7 boot) |\n| --- | --- | --- |"
        );
        let _ = writeln!(
            s,
            "| bytes read | {:.1} MB | {:.0}-{:.0} MB |",
            c.read_bytes / 1e6,
            p.read_bytes.0 / 1e6,
            p.read_bytes.1 / 1e6
        );
        let _ = writeln!(
            s,
            "| bytes written | {:.2} MB | {:.0}-{:.0} MB |",
            c.write_bytes / 1e6,
            p.write_bytes.0 / 1e6,
            p.write_bytes.1 / 1e6
        );
        let _ = writeln!(
            s,
            "| I/Os | {:.0} | {:.0}-{:.0} |",
            c.reads + c.writes,
            p.ios.0,
            p.ios.1
        );
        let _ = writeln!(
            s,
            "| mean transfer | {:.1} KB | {:.0} KB |",
            c.mean_transfer / 1e3,
            p.mean_transfer / 1e3
        );
        let _ = writeln!(
            s,
            "| reads of 6 KB or less | {:.0}% | most |",
            100.0 * c.small_read_share
        );
        let _ = writeln!(
            s,
            "| read:write by bytes | {:.1}:1 | {:.0}:1 |",
            c.read_write_bytes, p.read_write_bytes
        );
        let _ = writeln!(
            s,
            "| IOPS, duration | {:.0}, {:.1} s | {:.0}, {:.0}-{:.0} s |",
            c.iops, c.schedule_seconds, p.iops, p.seconds.0, p.seconds.1
        );
        let _ = writeln!(
            s,
            "\nThis boot is {:.3} of a published boot by bytes read (scaled to fit the machine).\n",
            c.scale
        );
        let _ = writeln!(s, "## Results\n");
        let _ = writeln!(
            s,
            "| mode | owner egress / working set | owner origin MiB | completion s | boot p50 s | boot p99 s | read p99 ms | RAM % | SSD % | peer % | owner % | verified reads | wrong | failed |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        let rows = self
            .alone
            .iter()
            .map(|r| ("one desktop alone (detect)", r))
            .chain(self.modes.iter().map(|r| (r.describe, r)));
        for (name, r) in rows {
            let _ = writeln!(
                s,
                "| {} | {:.3} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
                name,
                r.owner_egress_over_working_set,
                r.owner_origin_bytes as f64 / 1048576.0,
                r.completion_seconds,
                r.boot_p50_s,
                r.boot_p99_s,
                r.read_latency.p99_ms,
                r.tier_percent.ram,
                r.tier_percent.ssd,
                r.tier_percent.peer,
                r.tier_percent.owner,
                r.verified_reads,
                r.wrong_reads,
                r.failed
            );
        }
        let q = &self.ratios;
        let f = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.3}"));
        let _ = writeln!(s, "\n## Ratios\n");
        let _ = writeln!(
            s,
            "- owner egress, detect / no cache: {}; sealed / no cache: {}; CBRC / no cache: {}",
            f(q.egress_detect_over_nocache),
            f(q.egress_sealed_over_nocache),
            f(q.egress_cbrc_over_nocache)
        );
        let _ = writeln!(
            s,
            "- storm completion, detect / CBRC: {} (target at most 0.25)",
            f(q.completion_detect_over_cbrc)
        );
        let _ = writeln!(
            s,
            "- p99 boot, detect / one desktop alone: {} (target at most 1.3)",
            f(q.p99_boot_detect_over_alone)
        );
        let _ = writeln!(s, "\n## Block maps\n");
        for r in &self.modes {
            let _ = writeln!(
                s,
                "- {}: {:.0} bytes received per host (mean)",
                r.mode.name(),
                r.block_map_received_per_host
            );
        }
        s
    }

    /// Writes `report.json`, `summary.md` and the plots to `dir`; returns the files written.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut files = Vec::new();
        let json = dir.join("report.json");
        std::fs::write(&json, serde_json::to_string_pretty(self)?)?;
        files.push(json);
        let md = dir.join("summary.md");
        std::fs::write(&md, self.markdown())?;
        files.push(md);
        let mut chart = |name: &str, title: &str, x: &str, y: &str, series: Vec<Series>| {
            let series: Vec<Series> = series
                .into_iter()
                .filter(|s| !s.points.is_empty())
                .collect();
            if series.is_empty() {
                return Ok::<_, anyhow::Error>(());
            }
            let png = dir.join(format!("{name}.png"));
            let svg = dir.join(format!("{name}.svg"));
            line_chart(title, x, y, false, &series, &png, &svg)?;
            files.push(png);
            files.push(svg);
            Ok(())
        };
        // Owner egress over time, MB/s per sample interval.
        chart(
            "owner_egress",
            "Owner egress over time",
            "seconds since the storm began",
            "MB/s",
            self.modes
                .iter()
                .map(|r| Series {
                    name: r.mode.name().into(),
                    points: r
                        .samples
                        .windows(2)
                        .filter(|w| w[1].t > w[0].t)
                        .map(|w| {
                            (
                                w[1].t,
                                w[1].owner_egress_bytes
                                    .saturating_sub(w[0].owner_egress_bytes)
                                    as f64
                                    / 1e6
                                    / (w[1].t - w[0].t),
                            )
                        })
                        .collect(),
                })
                .collect(),
        )?;
        // Boot time CDF.
        chart(
            "boot_cdf",
            "Desktop boot time, CDF",
            "boot time, seconds",
            "percent of desktops booted",
            self.modes
                .iter()
                .map(|r| (r.mode.name(), r))
                .chain(self.alone.iter().map(|r| ("alone", r)))
                .map(|(name, r)| Series {
                    name: name.into(),
                    points: r
                        .boot_seconds
                        .iter()
                        .enumerate()
                        .map(|(i, b)| (*b, 100.0 * (i + 1) as f64 / r.boot_seconds.len() as f64))
                        .collect(),
                })
                .collect(),
        )?;
        // Where lookups were answered over time, for each shadowcache mode.
        for r in self.modes.iter().filter(|r| r.mode != Mode::Nocache) {
            let pts = |f: &dyn Fn(&super::Sample) -> u64| -> Vec<(f64, f64)> {
                r.samples
                    .windows(2)
                    .filter(|w| w[1].lookups > w[0].lookups)
                    .map(|w| {
                        let l = (w[1].lookups - w[0].lookups) as f64;
                        (w[1].t, 100.0 * f(&w[1]).saturating_sub(f(&w[0])) as f64 / l)
                    })
                    .collect()
            };
            chart(
                &format!("tiers_{}", r.mode.name()),
                &format!("Where lookups were answered, mode {}", r.mode.name()),
                "seconds since the storm began",
                "percent of lookups",
                vec![
                    Series {
                        name: "RAM".into(),
                        points: pts(&|s| s.ram_hits),
                    },
                    Series {
                        name: "SSD".into(),
                        points: pts(&|s| s.ssd_hits),
                    },
                    Series {
                        name: "peer".into(),
                        points: pts(&|s| s.peer_blocks),
                    },
                    Series {
                        name: "owner".into(),
                        points: pts(&|s| s.owner_blocks),
                    },
                ],
            )?;
        }
        // Read latency percentiles.
        chart(
            "read_latency",
            "Read latency percentiles",
            "percentile: 1 = p90, 2 = p99, 3 = p99.9 (0.3 = p50)",
            "milliseconds",
            self.modes
                .iter()
                .map(|r| Series {
                    name: r.mode.name().into(),
                    points: vec![
                        (0.301, r.read_latency.p50_ms),
                        (1.0, r.read_latency.p90_ms),
                        (2.0, r.read_latency.p99_ms),
                        (3.0, r.read_latency.p999_ms),
                    ],
                })
                .collect(),
        )?;
        // Block-map bytes received per host.
        chart(
            "block_maps",
            "Block-map bytes received per host",
            "host",
            "KiB received",
            self.modes
                .iter()
                .map(|r| Series {
                    name: r.mode.name().into(),
                    points: r
                        .hosts
                        .iter()
                        .enumerate()
                        .map(|(i, h)| (i as f64, h.block_map_received_bytes as f64 / 1024.0))
                        .collect(),
                })
                .collect(),
        )?;
        Ok(files)
    }

    /// The summary table on standard output.
    pub fn print(&self) {
        println!("{}", self.markdown());
    }
}

/// One host count of the scale curve.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    /// Hosts.
    pub hosts: usize,
    /// Nodes in one process (true) or node processes.
    pub in_process: bool,
    /// Desktops in all.
    pub desktops: usize,
    /// Owner egress ÷ unique working set.
    pub owner_egress_over_working_set: f64,
    /// p99 desktop boot time, seconds.
    pub boot_p99_s: f64,
    /// Storm completion, seconds.
    pub completion_seconds: f64,
    /// Mean block-map bytes received per host.
    pub block_map_received_per_host: f64,
    /// Mean block-map bytes held per host.
    pub block_map_held_per_host: f64,
    /// Reads verified, wrong, failed.
    pub verified_reads: u64,
    /// Reads with wrong bytes.
    pub wrong_reads: u64,
    /// Failed requests.
    pub failed: u64,
}

/// The scale curve's rows from each run's report (its first mode).
pub fn scale_rows(runs: &[(usize, bool, Report)]) -> Vec<ScaleRow> {
    runs.iter()
        .filter_map(|(hosts, in_process, r)| {
            let m = r.modes.first()?;
            Some(ScaleRow {
                hosts: *hosts,
                in_process: *in_process,
                desktops: m.desktops,
                owner_egress_over_working_set: m.owner_egress_over_working_set,
                boot_p99_s: m.boot_p99_s,
                completion_seconds: m.completion_seconds,
                block_map_received_per_host: m.block_map_received_per_host,
                block_map_held_per_host: (m
                    .hosts
                    .iter()
                    .map(|h| h.block_map_held_bytes as f64)
                    .sum::<f64>()
                    / m.hosts.len().max(1) as f64)
                    .round(),
                verified_reads: m.verified_reads,
                wrong_reads: m.wrong_reads,
                failed: m.failed,
            })
        })
        .collect()
}

/// The scale curve as a Markdown table.
pub fn scale_markdown(rows: &[ScaleRow], mode: Mode) -> String {
    let mut s = format!(
        "# Scale curve, mode {}\n\n| hosts | run as | desktops | owner egress / working set | p99 boot s | completion s | block-map bytes received per host | held per host | verified reads | wrong | failed |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        mode.name()
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {:.2} | {:.2} | {:.0} | {:.0} | {} | {} | {} |",
            r.hosts,
            if r.in_process {
                "one process"
            } else {
                "processes"
            },
            r.desktops,
            r.owner_egress_over_working_set,
            r.boot_p99_s,
            r.completion_seconds,
            r.block_map_received_per_host,
            r.block_map_held_per_host,
            r.verified_reads,
            r.wrong_reads,
            r.failed
        );
    }
    s
}

/// The scale curve's plots: `scale.{png,svg}`, block-map KiB received per host against the
/// host count, and `scale_egress.{png,svg}`, owner egress / working set and p99 boot seconds.
pub fn scale_plot(rows: &[ScaleRow], dir: &Path) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let pts = |f: &dyn Fn(&ScaleRow) -> f64| rows.iter().map(|r| (r.hosts as f64, f(r))).collect();
    line_chart(
        "Block-map bytes received per host against the host count",
        "hosts (log scale)",
        "KiB received per host",
        true,
        &[
            Series {
                name: "received".into(),
                points: pts(&|r| r.block_map_received_per_host / 1024.0),
            },
            Series {
                name: "held".into(),
                points: pts(&|r| r.block_map_held_per_host / 1024.0),
            },
        ],
        &dir.join("scale.png"),
        &dir.join("scale.svg"),
    )?;
    line_chart(
        "Owner egress and p99 boot against the host count",
        "hosts (log scale)",
        "ratio, seconds",
        true,
        &[
            Series {
                name: "owner egress / working set".into(),
                points: pts(&|r| r.owner_egress_over_working_set),
            },
            Series {
                name: "p99 boot, s".into(),
                points: pts(&|r| r.boot_p99_s),
            },
        ],
        &dir.join("scale_egress.png"),
        &dir.join("scale_egress.svg"),
    )
}

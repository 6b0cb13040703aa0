//! The replay engine: one desktop's I/Os sent to its host's node over NBD (the way qemu or the
//! kernel attach a disk; gRPC as an option), open loop at the schedule's times or closed loop
//! at a queue depth. Reads go to the shared replica and are checked against the replica's
//! bytes; writes go to the desktop's own delta disk. Latencies go into an hdrhistogram.
//!
//! In the open loop a request's latency counts from when it was due, not from when it went
//! out, so a node that falls behind shows in the figures (no coordinated omission); at most
//! [`MAX_OUTSTANDING`] requests of one desktop are in flight.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use shadowcache_node::origin::{NbdOrigin, Origin};

use super::workload::Io;
use crate::trace::Op;

/// Requests of one desktop in flight at most in the open loop.
pub const MAX_OUTSTANDING: usize = 64;

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// At the schedule's times.
    Open,
    /// This many requests in flight, each sent when one completes.
    Closed(usize),
}

/// How the desktop reaches its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// NBD over the node's Unix socket.
    Nbd,
    /// The node's gRPC API over its Unix socket.
    Grpc,
}

/// Counters the progress bars and samplers read while desktops run.
#[derive(Debug, Default)]
pub struct Live {
    /// I/Os completed, all desktops.
    pub ios: AtomicU64,
    /// Desktops that finished.
    pub booted: AtomicU64,
}

/// What one desktop did.
#[derive(Debug)]
pub struct DesktopRun {
    /// Seconds from its start to its last completion.
    pub boot_seconds: f64,
    /// Reads, and their bytes.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Writes.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Reads whose bytes matched the replica.
    pub verified: u64,
    /// Reads whose bytes did not match.
    pub wrong: u64,
    /// Failed requests, and the first error.
    pub failed: u64,
    /// The first error, for the report.
    pub first_error: Option<String>,
    /// Read latency, nanoseconds.
    pub read_latency: Histogram<u64>,
    /// Write latency, nanoseconds.
    pub write_latency: Histogram<u64>,
    /// Whether it ran out of time before its last I/O.
    pub cut_short: bool,
}

/// A desktop's two disks on its host's node (one value per desktop: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Disks {
    Nbd {
        replica: Box<NbdOrigin>,
        delta: Box<NbdOrigin>,
    },
    Grpc {
        replica: shadowcache_client::Disk,
        delta: shadowcache_client::Disk,
    },
    /// A node in this process (the many-hosts mode): its read and write paths, called.
    InProcess {
        node: Arc<shadowcache_node::Node>,
        replica: String,
        delta: String,
    },
}

impl Disks {
    async fn open(
        transport: Transport,
        nbd_socket: &Path,
        grpc_socket: &Path,
        replica: &str,
        delta: &str,
        node: Option<Arc<shadowcache_node::Node>>,
    ) -> anyhow::Result<Disks> {
        if let Some(node) = node {
            return Ok(Disks::InProcess {
                node,
                replica: replica.into(),
                delta: delta.into(),
            });
        }
        Ok(match transport {
            Transport::Nbd => {
                let uri = |e: &str| format!("nbd+unix:///{e}?socket={}", nbd_socket.display());
                Disks::Nbd {
                    replica: Box::new(
                        NbdOrigin::open(&uri(replica), false)
                            .await
                            .with_context(|| format!("attaching {replica} over NBD"))?,
                    ),
                    delta: Box::new(
                        NbdOrigin::open(&uri(delta), true)
                            .await
                            .with_context(|| format!("attaching {delta} over NBD"))?,
                    ),
                }
            }
            Transport::Grpc => {
                let c = shadowcache_client::Client::connect_unix(grpc_socket).await?;
                Disks::Grpc {
                    replica: c.disk(replica),
                    delta: c.disk(delta),
                }
            }
        })
    }

    async fn read(&self, offset: u64, len: u32) -> anyhow::Result<Bytes> {
        Ok(match self {
            Disks::Nbd { replica, .. } => replica.read_at(offset, len as usize).await?,
            Disks::Grpc { replica, .. } => replica.read_at(offset, len as u64).await?,
            Disks::InProcess { node, replica, .. } => {
                node.read(replica, offset, len as u64).await?
            }
        })
    }

    async fn write(&self, offset: u64, data: Bytes) -> anyhow::Result<()> {
        match self {
            Disks::Nbd { delta, .. } => delta.write_at(offset, data).await?,
            Disks::Grpc { delta, .. } => delta.write_at(offset, data).await?,
            Disks::InProcess { node, delta, .. } => node.write(delta, offset, data).await?,
        }
        Ok(())
    }
}

/// One desktop to run.
#[derive(Debug, Clone)]
pub struct Desktop {
    /// Its I/Os.
    pub ios: Arc<Vec<Io>>,
    /// The replica's disk id.
    pub replica: String,
    /// Its delta disk's id on its host.
    pub delta: String,
    /// Its host's NBD socket and gRPC socket.
    pub sockets: (std::path::PathBuf, std::path::PathBuf),
    /// When it starts.
    pub start: Instant,
    /// Its host's node when the host runs in this process (the transport is then a call).
    pub node: Option<Arc<shadowcache_node::Node>>,
}

/// A latency histogram in nanoseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Runs one desktop to its end or to `deadline`.
pub async fn run_desktop(
    d: Desktop,
    expected: Arc<Vec<blake3::Hash>>,
    pace: Pace,
    transport: Transport,
    live: Arc<Live>,
    deadline: Instant,
) -> anyhow::Result<DesktopRun> {
    tokio::time::sleep_until(d.start.into()).await;
    let disks = Disks::open(
        transport,
        &d.sockets.0,
        &d.sockets.1,
        &d.replica,
        &d.delta,
        d.node.clone(),
    )
    .await?;
    let start = Instant::now();
    let mut run = DesktopRun {
        boot_seconds: 0.0,
        reads: 0,
        read_bytes: 0,
        writes: 0,
        write_bytes: 0,
        verified: 0,
        wrong: 0,
        failed: 0,
        first_error: None,
        read_latency: histogram(),
        write_latency: histogram(),
        cut_short: false,
    };
    // The written bytes: one buffer, sliced (no per-write allocation).
    let max_write = d
        .ios
        .iter()
        .filter(|io| io.op == Op::Write)
        .map(|io| io.len)
        .max()
        .unwrap_or(0);
    let pattern = Bytes::from(
        (0..max_write)
            .map(|i| (i as u8).wrapping_mul(31) ^ 0x5a)
            .collect::<Vec<u8>>(),
    );
    let disks = &disks;
    let expected = &expected;
    let one = |io: Io, due: Instant| {
        let pattern = pattern.clone();
        async move {
            let r = match io.op {
                Op::Read => disks.read(io.offset, io.len).await.map(|b| {
                    Some(
                        expected
                            .get(io.read as usize)
                            .is_some_and(|h| blake3::hash(&b) == *h),
                    )
                }),
                Op::Write => disks
                    .write(io.offset, pattern.slice(..io.len as usize))
                    .await
                    .map(|()| None),
            };
            (io, due.elapsed(), r)
        }
    };
    let mut inflight = FuturesUnordered::new();
    let mut next = 0usize;
    let record = |run: &mut DesktopRun,
                  (io, took, r): (Io, Duration, anyhow::Result<Option<bool>>)| {
        live.ios.fetch_add(1, Ordering::Relaxed);
        let ns = (took.as_nanos() as u64).clamp(1_000, 600_000_000_000);
        match r {
            Ok(Some(ok)) => {
                run.reads += 1;
                run.read_bytes += io.len as u64;
                if ok {
                    run.verified += 1;
                } else {
                    run.wrong += 1;
                }
                let _ = run.read_latency.record(ns);
            }
            Ok(None) => {
                run.writes += 1;
                run.write_bytes += io.len as u64;
                let _ = run.write_latency.record(ns);
            }
            Err(e) => {
                run.failed += 1;
                if run.first_error.is_none() {
                    run.first_error = Some(format!("{e:#}"));
                }
            }
        }
    };
    loop {
        if Instant::now() > deadline {
            run.cut_short = next < d.ios.len() || !inflight.is_empty();
            break;
        }
        let room = match pace {
            Pace::Open => MAX_OUTSTANDING,
            Pace::Closed(q) => q.max(1),
        };
        if next < d.ios.len() && inflight.len() < room {
            let io = d.ios[next];
            let due = match pace {
                Pace::Open => start + Duration::from_nanos(io.at_ns),
                Pace::Closed(_) => Instant::now(),
            };
            if due > Instant::now() {
                // Wait for the due time or a completion, whichever is first.
                tokio::select! {
                    biased;
                    Some(done) = inflight.next() => record(&mut run, done),
                    () = tokio::time::sleep_until(due.into()) => {}
                }
                continue;
            }
            inflight.push(one(io, due));
            next += 1;
            continue;
        }
        match tokio::time::timeout_at(deadline.into(), inflight.next()).await {
            Ok(Some(done)) => record(&mut run, done),
            Ok(None) => break,
            Err(_) => {}
        }
    }
    run.boot_seconds = start.elapsed().as_secs_f64();
    live.booted.fetch_add(1, Ordering::Relaxed);
    Ok(run)
}

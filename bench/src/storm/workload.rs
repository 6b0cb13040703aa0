//! What the desktops of a storm do: read sequences over the shared replica taken from a real
//! trace, writes to each desktop's own delta disk, and the replica image they read.
//!
//! Two ways to map a trace onto desktops:
//! - **boot** (the default): the first requests of the trace, up to a boot's worth of bytes,
//!   are one desktop's boot; every desktop replays it (desktops of one pool boot the same
//!   image), each in a slightly different order, with writes to its delta disk at the boot's
//!   write share. Timestamps come from the pacing (`--iops`), since boot traces such as the
//!   ARC set carry none.
//! - **volumes**: each volume of the trace is one desktop; reads go to the replica, writes to
//!   the desktop's delta disk, at the trace's own times when it has them.
//!
//! The replica holds only what is read: the touched 1 MiB chunks of the trace's address space,
//! packed in address order (offsets within a chunk, sizes and order are kept; the distance
//! between untouched regions is not, so a 4 GiB trace needs a replica of its footprint only).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::trace::{self, Op};

/// Chunk of the trace's address space kept together in the replica.
const CHUNK: u64 = 1 << 20;

/// One I/O of a desktop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Io {
    /// Read (of the replica) or write (of the desktop's delta disk).
    pub op: Op,
    /// Offset in the replica (reads) or the delta disk (writes).
    pub offset: u64,
    /// Bytes.
    pub len: u32,
    /// When to issue it, nanoseconds after the desktop starts (open loop).
    pub at_ns: u64,
    /// Reads: the index of its expected content among [`Workload::reads`].
    pub read: u32,
}

/// The published figures of one Windows 7 desktop boot (../shared/traces/PROVENANCE.md).
pub mod published {
    /// Bytes read per boot, low and high.
    pub const READ_BYTES: (f64, f64) = (420e6, 600e6);
    /// Bytes written per boot.
    pub const WRITE_BYTES: (f64, f64) = (20e6, 30e6);
    /// I/Os per boot.
    pub const IOS: (f64, f64) = (20_000.0, 70_000.0);
    /// Boot duration, seconds.
    pub const SECONDS: (f64, f64) = (120.0, 300.0);
    /// I/Os a second.
    pub const IOPS: f64 = 190.0;
    /// Mean transfer, bytes.
    pub const MEAN_TRANSFER: f64 = 19e3;
    /// Read bytes per written byte.
    pub const READ_WRITE_BYTES: f64 = 20.0;
}

/// Everything the desktops do, and the replica they read.
#[derive(Debug)]
pub struct Workload {
    /// Where it came from.
    pub source: String,
    /// Each desktop's I/Os in issue order.
    pub desktops: Vec<Vec<Io>>,
    /// The distinct reads `(replica offset, len)`; [`Io::read`] indexes them.
    pub reads: Vec<(u64, u32)>,
    /// Replica size, bytes.
    pub replica_bytes: u64,
    /// Each desktop's delta disk size, bytes.
    pub delta_bytes: u64,
    /// Trace requests the workload was cut from.
    pub trace_requests: u64,
}

/// Per-desktop figures beside the published ones.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// Reads per desktop (mean).
    pub reads: f64,
    /// Writes per desktop (mean).
    pub writes: f64,
    /// Bytes read per desktop (mean).
    pub read_bytes: f64,
    /// Bytes written per desktop (mean).
    pub write_bytes: f64,
    /// Mean transfer, bytes.
    pub mean_transfer: f64,
    /// Share of reads of at most 6 KB.
    pub small_read_share: f64,
    /// Read bytes per written byte.
    pub read_write_bytes: f64,
    /// Seconds of one desktop's schedule (open loop).
    pub schedule_seconds: f64,
    /// I/Os a second of one desktop (open loop).
    pub iops: f64,
    /// This boot's bytes read ÷ the published mean (510 MB): how scaled down it is.
    pub scale: f64,
}

/// How the boot workload is cut and paced.
#[derive(Debug, Clone)]
pub struct BootShape {
    /// Bytes read per boot (the trace slice ends once this much is read).
    pub read_bytes: u64,
    /// Bytes written per byte read (published: 1/20).
    pub write_share: f64,
    /// I/Os a second per desktop (published: about 190).
    pub iops: f64,
    /// Seed of each desktop's order and writes.
    pub seed: u64,
}

/// Maps trace offsets to packed replica offsets.
struct Packer {
    chunks: BTreeMap<u64, u64>,
}

impl Packer {
    fn new<'a>(extents: impl Iterator<Item = &'a (u64, u64)>) -> Packer {
        let mut chunks = BTreeMap::new();
        for &(off, len) in extents {
            for c in off / CHUNK..=(off + len - 1) / CHUNK {
                chunks.insert(c, 0);
            }
        }
        for (i, v) in chunks.values_mut().enumerate() {
            *v = i as u64;
        }
        Packer { chunks }
    }

    fn bytes(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK
    }

    /// The packed offset of a read (which must not cross into an untouched chunk; reads
    /// crossing chunk boundaries touch both, and consecutive touched chunks stay adjacent only
    /// if both were touched, so a crossing read is cut at the boundary).
    fn map(&self, off: u64, len: u64) -> (u64, u64) {
        let c = off / CHUNK;
        let base = self.chunks.get(&c).copied().unwrap_or(0) * CHUNK;
        let mut len = len;
        // Keep it in chunks that are adjacent in the packed image too.
        let mut end_chunk = c;
        while end_chunk < (off + len - 1) / CHUNK {
            let next = self.chunks.get(&(end_chunk + 1));
            let here = self.chunks.get(&end_chunk);
            match (here, next) {
                (Some(h), Some(n)) if *n == h + 1 => end_chunk += 1,
                _ => {
                    len = (end_chunk + 1) * CHUNK - off;
                    break;
                }
            }
        }
        (base + off % CHUNK, len)
    }
}

impl Workload {
    /// The boot storm's workload: `desktops` boots cut from the reads of `path`.
    pub fn boot(
        path: &Path,
        format: Option<trace::Format>,
        desktops: usize,
        shape: &BootShape,
    ) -> anyhow::Result<Workload> {
        if desktops == 0 {
            bail!("a storm needs at least one desktop");
        }
        if !(shape.iops > 0.0 && shape.iops.is_finite()) {
            bail!("--iops must be a positive number");
        }
        let opts = trace::Options {
            format,
            ..Default::default()
        };
        let mut reader = trace::open(path, &opts)?;
        let mut slice: Vec<(u64, u64)> = Vec::new();
        let mut bytes = 0u64;
        let mut requests = 0u64;
        for r in reader.by_ref() {
            let r = r?;
            requests += 1;
            if r.op != Op::Read {
                continue;
            }
            // Reads longer than 1 MiB are cut: NBD clients split them too.
            let len = r.len.min(CHUNK);
            slice.push((r.offset, len));
            bytes += len;
            if bytes >= shape.read_bytes {
                break;
            }
        }
        if slice.is_empty() {
            bail!("{}: no reads to boot from", path.display());
        }
        let packer = Packer::new(slice.iter());
        let mut reads = Vec::with_capacity(slice.len());
        for &(off, len) in &slice {
            let (o, l) = packer.map(off, len);
            reads.push((o, l as u32));
        }
        let write_bytes = (bytes as f64 * shape.write_share) as u64;
        let delta_bytes = (write_bytes.next_multiple_of(CHUNK)).max(4 * CHUNK);
        let step_ns = 1e9 / shape.iops;
        let mut out = Vec::with_capacity(desktops);
        for d in 0..desktops {
            let mut rng = rand::rngs::StdRng::seed_from_u64(shape.seed ^ ((d as u64 + 1) * 0x9E37));
            let mut order: Vec<u32> = (0..reads.len() as u32).collect();
            // Boots of one image differ a little in order: neighbours swap.
            for i in (1..order.len()).step_by(2) {
                if rng.random_bool(0.3) {
                    order.swap(i - 1, i);
                }
            }
            let mut ios = Vec::with_capacity(order.len() + order.len() / 8);
            let mut credit = 0f64;
            let mut woff = 0u64;
            for idx in order {
                let (offset, len) = reads[idx as usize];
                ios.push(Io {
                    op: Op::Read,
                    offset,
                    len,
                    at_ns: 0,
                    read: idx,
                });
                credit += len as f64 * shape.write_share;
                // Writes of 4 to 64 KiB, as the credit allows.
                let wlen = 4096u64 << rng.random_range(0..=4);
                if credit >= wlen as f64 {
                    credit -= wlen as f64;
                    if woff + wlen > delta_bytes {
                        woff = 0;
                    }
                    ios.push(Io {
                        op: Op::Write,
                        offset: woff,
                        len: wlen as u32,
                        at_ns: 0,
                        read: 0,
                    });
                    woff += wlen;
                }
            }
            for (i, io) in ios.iter_mut().enumerate() {
                io.at_ns = (i as f64 * step_ns) as u64;
            }
            out.push(ios);
        }
        Ok(Workload {
            source: format!("{} (first {} reads, boot)", path.display(), slice.len()),
            desktops: out,
            reads,
            replica_bytes: packer.bytes(),
            delta_bytes,
            trace_requests: requests,
        })
    }

    /// One desktop per volume of `path` (at most `desktops`, at most `max_ios` I/Os each):
    /// reads of the replica, writes to the delta disk, at the trace's times (`speed` times
    /// faster) or, without times, at `iops`.
    pub fn volumes(
        path: &Path,
        format: Option<trace::Format>,
        desktops: usize,
        max_ios: usize,
        speed: f64,
        iops: f64,
    ) -> anyhow::Result<Workload> {
        if !(speed > 0.0 && speed.is_finite() && iops > 0.0 && iops.is_finite()) {
            bail!("--speed and --iops must be positive numbers");
        }
        let opts = trace::Options {
            format,
            reorder_window: None,
            ..Default::default()
        };
        let reader = trace::open(path, &opts)?;
        let mut per: Vec<Vec<trace::Record>> = Vec::new();
        let mut requests = 0u64;
        let mut vol_index: BTreeMap<u32, usize> = BTreeMap::new();
        for r in reader {
            let r = r?;
            requests += 1;
            // The first `desktops` volumes seen become desktops; later ones are left out.
            let d = match vol_index.get(&r.volume) {
                Some(&d) => d,
                None if per.len() < desktops => {
                    vol_index.insert(r.volume, per.len());
                    per.push(Vec::new());
                    per.len() - 1
                }
                None => continue,
            };
            if per[d].len() < max_ios {
                per[d].push(r);
            }
            if per.len() == desktops && per.iter().all(|p| p.len() >= max_ios) {
                break;
            }
        }
        if per.is_empty() {
            bail!("{}: no I/O", path.display());
        }
        let extents: Vec<(u64, u64)> = per
            .iter()
            .flatten()
            .filter(|r| r.op == Op::Read)
            .map(|r| (r.offset, r.len.min(CHUNK)))
            .collect();
        if extents.is_empty() {
            bail!("{}: no reads", path.display());
        }
        let packer = Packer::new(extents.iter());
        let mut read_ids: std::collections::HashMap<(u64, u32), u32> = Default::default();
        let mut reads = Vec::new();
        let max_write = per
            .iter()
            .flatten()
            .filter(|r| r.op == Op::Write)
            .map(|r| r.len.min(CHUNK))
            .max()
            .unwrap_or(0);
        let delta_bytes = (64 * CHUNK).max(max_write.next_multiple_of(CHUNK));
        let step_ns = 1e9 / iops;
        let desktops = per
            .into_iter()
            .map(|recs| {
                let t0 = recs.iter().filter_map(|r| r.time_ns).min();
                recs.iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let at_ns = match (r.time_ns, t0) {
                            (Some(t), Some(t0)) => ((t - t0) as f64 / speed) as u64,
                            _ => (i as f64 * step_ns) as u64,
                        };
                        let len = r.len.min(CHUNK);
                        match r.op {
                            Op::Read => {
                                let (o, l) = packer.map(r.offset, len);
                                let key = (o, l as u32);
                                let n = reads.len() as u32;
                                let id = *read_ids.entry(key).or_insert_with(|| {
                                    reads.push(key);
                                    n
                                });
                                Io {
                                    op: Op::Read,
                                    offset: o,
                                    len: l as u32,
                                    at_ns,
                                    read: id,
                                }
                            }
                            Op::Write => Io {
                                op: Op::Write,
                                offset: (r.offset % delta_bytes).min(delta_bytes - len) & !511,
                                len: len as u32,
                                at_ns,
                                read: 0,
                            },
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        Ok(Workload {
            source: format!(
                "{} ({} volumes as desktops)",
                path.display(),
                desktops.len()
            ),
            desktops,
            reads,
            replica_bytes: packer.bytes(),
            delta_bytes,
            trace_requests: requests,
        })
    }

    /// Distinct `block`-byte blocks of the replica that some desktop reads: the unique working
    /// set, in bytes.
    pub fn working_set(&self, block: u64) -> u64 {
        let mut blocks = roaring::RoaringTreemap::new();
        for &(o, l) in &self.reads {
            blocks.insert_range(o / block..=(o + l as u64 - 1) / block);
        }
        blocks.len() * block
    }

    /// Per-desktop figures beside the published ones.
    pub fn calibration(&self) -> Calibration {
        let n = self.desktops.len().max(1) as f64;
        let (mut reads, mut writes, mut rb, mut wb, mut small) = (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut span = 0u64;
        for d in &self.desktops {
            for io in d {
                match io.op {
                    Op::Read => {
                        reads += 1;
                        rb += io.len as u64;
                        small += u64::from(io.len <= 6000);
                    }
                    Op::Write => {
                        writes += 1;
                        wb += io.len as u64;
                    }
                }
            }
            span += d.last().map_or(0, |io| io.at_ns);
        }
        let ios = (reads + writes).max(1) as f64;
        let secs = span as f64 / n / 1e9;
        Calibration {
            reads: reads as f64 / n,
            writes: writes as f64 / n,
            read_bytes: rb as f64 / n,
            write_bytes: wb as f64 / n,
            mean_transfer: (rb + wb) as f64 / ios,
            small_read_share: small as f64 / reads.max(1) as f64,
            read_write_bytes: if wb == 0 {
                f64::INFINITY
            } else {
                rb as f64 / wb as f64
            },
            schedule_seconds: secs,
            // I/Os spaced 1/iops apart span (count - 1) intervals.
            iops: if secs > 0.0 {
                (ios / n - 1.0) / secs
            } else {
                0.0
            },
            scale: rb as f64 / n / 510e6,
        }
    }

    /// Writes the replica image to `path`: synthetic content for every chunk (no zero or
    /// shared pages, so that owner egress ÷ working set means what it says).
    /// Returns the BLAKE3 hash of each of [`Workload::reads`]' expected bytes.
    pub fn write_replica(&self, path: &Path) -> anyhow::Result<Vec<blake3::Hash>> {
        use std::io::Write;
        use std::os::unix::fs::FileExt;
        let mix = crate::synthetic::Mix {
            zero_fraction: 0.0,
            dup_fraction: 0.0,
            ..Default::default()
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("creating the replica {}", path.display()))?;
        {
            let mut w = std::io::BufWriter::new(&f);
            let mut at = 0;
            while at < self.replica_bytes {
                w.write_all(&mix.read(at, CHUNK as usize))?;
                at += CHUNK;
            }
            w.flush()?;
        }
        let mut hashes = Vec::with_capacity(self.reads.len());
        let mut buf = vec![0u8; CHUNK as usize];
        for &(o, l) in &self.reads {
            let b = &mut buf[..l as usize];
            f.read_exact_at(b, o)
                .with_context(|| format!("reading back {}", path.display()))?;
            hashes.push(blake3::hash(b));
        }
        Ok(hashes)
    }
}

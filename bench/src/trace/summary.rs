//! `shadowcache-bench trace`: what a trace holds, read once with bounded memory.

use std::path::Path;

use super::{Format, Op, Options, Stats, open};

/// One trace, summed up.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// The file.
    pub file: String,
    /// Its format (given or told from the content).
    pub format: Format,
    /// Reads.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Mean bytes per I/O.
    pub mean_transfer_bytes: f64,
    /// Reads of at most 8 KiB, as a share of reads.
    pub small_read_share: f64,
    /// The end of the highest byte range.
    pub highest_byte: u64,
    /// Volumes named.
    pub volumes: usize,
    /// Seconds from the first timestamp to the last (`None` without timestamps).
    pub span_seconds: Option<f64>,
    /// What the reader counted (ignored rows, bad rows skipped, out of order).
    pub stats: Stats,
}

/// Reads `path` through and sums it up.
pub fn summarize(path: &Path, opts: &Options) -> anyhow::Result<Summary> {
    let mut reader = open(path, opts)?;
    let (mut reads, mut writes, mut read_bytes, mut write_bytes, mut small) = (0, 0, 0u64, 0u64, 0);
    let mut highest = 0u64;
    let (mut first, mut last) = (None::<u64>, None::<u64>);
    for r in reader.by_ref() {
        let r = r?;
        match r.op {
            Op::Read => {
                reads += 1;
                read_bytes = read_bytes.saturating_add(r.len);
                if r.len <= 8192 {
                    small += 1;
                }
            }
            Op::Write => {
                writes += 1;
                write_bytes = write_bytes.saturating_add(r.len);
            }
        }
        highest = highest.max(r.offset + r.len);
        if let Some(t) = r.time_ns {
            first = Some(first.map_or(t, |f| f.min(t)));
            last = Some(last.map_or(t, |l| l.max(t)));
        }
    }
    let ios = reads + writes;
    Ok(Summary {
        file: path.display().to_string(),
        format: reader.format(),
        reads,
        writes,
        read_bytes,
        write_bytes,
        mean_transfer_bytes: if ios == 0 {
            0.0
        } else {
            (read_bytes as f64 + write_bytes as f64) / ios as f64
        },
        small_read_share: if reads == 0 {
            0.0
        } else {
            small as f64 / reads as f64
        },
        highest_byte: highest,
        volumes: reader.volumes().len(),
        span_seconds: first.zip(last).map(|(f, l)| (l - f) as f64 / 1e9),
        stats: reader.stats().clone(),
    })
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        writeln!(f, "{} ({})", self.file, self.format)?;
        writeln!(
            f,
            "  {} reads ({:.1} MiB), {} writes ({:.1} MiB); reads are {:.1}% of I/Os, {:.1}% of bytes",
            self.reads,
            mib(self.read_bytes),
            self.writes,
            mib(self.write_bytes),
            100.0 * self.reads as f64 / (self.reads + self.writes).max(1) as f64,
            100.0 * self.read_bytes as f64 / (self.read_bytes + self.write_bytes).max(1) as f64,
        )?;
        writeln!(
            f,
            "  mean transfer {:.0} bytes; {:.1}% of reads are 8 KiB or less",
            self.mean_transfer_bytes,
            100.0 * self.small_read_share
        )?;
        write!(
            f,
            "  {} volume(s), highest byte {:.1} MiB, ",
            self.volumes,
            mib(self.highest_byte)
        )?;
        match self.span_seconds {
            Some(s) => writeln!(f, "{s:.3} s from first to last timestamp")?,
            None => writeln!(f, "no timestamps")?,
        }
        write!(
            f,
            "  {} rows ignored (no read or write), {} bad rows skipped, {} records out of time order",
            self.stats.ignored, self.stats.skipped_bad, self.stats.out_of_order
        )?;
        if let Some(b) = &self.stats.first_bad {
            write!(f, "\n  first bad row: {b}")?;
        }
        Ok(())
    }
}

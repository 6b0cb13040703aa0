//! Block trace parsers. For now the ARC `.lis` format (optionally zstd-compressed): one request
//! a line, `start_block nblocks ignored request_no`, blocks of 512 bytes, every request a read.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{Context, bail};

/// One read request, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// Bytes per `.lis` block (the ARC paper's page).
pub const LIS_SECTOR: u64 = 512;

/// Reads a `.lis` trace; `.zst` files are decompressed on the fly.
pub fn read_lis(path: &Path) -> anyhow::Result<Vec<Request>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("open trace {}", path.display()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "zst") {
        Box::new(zstd::Decoder::new(file).context("zstd")?)
    } else {
        Box::new(file)
    };
    parse_lis(BufReader::new(reader)).with_context(|| format!("trace {}", path.display()))
}

/// Reads a trace by its name: `*.vscsi` is VMware vscsiStats (reads only), anything else is
/// `.lis` (optionally `.zst`).
pub fn read_trace(path: &Path) -> anyhow::Result<Vec<Request>> {
    if path.extension().is_some_and(|e| e == "vscsi") {
        let bytes =
            std::fs::read(path).with_context(|| format!("open trace {}", path.display()))?;
        parse_vscsi(&bytes).with_context(|| format!("trace {}", path.display()))
    } else {
        read_lis(path)
    }
}

/// Bytes of one vscsiStats version 1 record.
pub const VSCSI_RECORD: usize = 32;

/// Parses a VMware vscsiStats version 1 trace and keeps its reads (SCSI READ(6), READ(10),
/// READ(12), READ(16)): 32-byte little-endian records `u32 serial, u32 len_bytes, u32 nSG,
/// u16 scsi_cmd, u16 version (0x0100), u64 lbn (512-byte sectors), u64 ts_us`.
pub fn parse_vscsi(b: &[u8]) -> anyhow::Result<Vec<Request>> {
    if !b.len().is_multiple_of(VSCSI_RECORD) {
        bail!(
            "{} bytes is not a whole number of {VSCSI_RECORD}-byte vscsi records",
            b.len()
        );
    }
    let mut out = Vec::new();
    for (n, r) in b.chunks_exact(VSCSI_RECORD).enumerate() {
        let u16_at = |i: usize| u16::from_le_bytes([r[i], r[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&r[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let version = u16_at(14);
        if version != 0x0100 {
            bail!("record {n}: version {version:#06x}, expected 0x0100 (vscsiStats version 1)");
        }
        let len = u64::from(u32_at(4));
        let cmd = u16_at(12);
        if len == 0 || !matches!(cmd, 0x08 | 0x28 | 0xa8 | 0x88) {
            continue;
        }
        let offset = u64_at(16)
            .checked_mul(LIS_SECTOR)
            .filter(|o| o.checked_add(len).is_some())
            .with_context(|| format!("record {n}: sector out of range"))?;
        out.push(Request { offset, len });
    }
    Ok(out)
}

/// Parses `.lis` lines.
pub fn parse_lis(r: impl BufRead) -> anyhow::Result<Vec<Request>> {
    let mut out = Vec::new();
    for (n, line) in r.lines().enumerate() {
        let line = line?;
        let mut f = line.split_ascii_whitespace();
        let (Some(start), Some(count)) = (f.next(), f.next()) else {
            if line.trim().is_empty() {
                continue;
            }
            bail!("line {}: expected `start count ...`, got {line:?}", n + 1);
        };
        let start: u64 = start
            .parse()
            .with_context(|| format!("line {}: start {start:?}", n + 1))?;
        let count: u64 = count
            .parse()
            .with_context(|| format!("line {}: count {count:?}", n + 1))?;
        if count == 0 {
            continue;
        }
        // Ranges whose end does not fit in 64 bits are no disk's.
        let range = start
            .checked_mul(LIS_SECTOR)
            .zip(count.checked_mul(LIS_SECTOR));
        let Some((offset, len)) = range.filter(|(o, l)| o.checked_add(*l).is_some()) else {
            bail!("line {}: sectors {start}+{count} out of range", n + 1);
        };
        out.push(Request { offset, len });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_past_64_bits_are_errors_not_panics() {
        for t in [
            "18446744073709551615 1\n",
            "1 18446744073709551615\n",
            "36028797018963967 1\n",
        ] {
            let e = parse_lis(t.as_bytes()).expect_err(t);
            assert!(e.to_string().contains("out of range"), "{t}: {e}");
        }
        let mut rec = [0u8; VSCSI_RECORD];
        rec[4..8].copy_from_slice(&4096u32.to_le_bytes());
        rec[12..14].copy_from_slice(&0x28u16.to_le_bytes());
        rec[14..16].copy_from_slice(&0x0100u16.to_le_bytes());
        rec[16..24].copy_from_slice(&(u64::MAX / 512).to_le_bytes());
        let e = parse_vscsi(&rec).expect_err("end past 2^64");
        assert!(e.to_string().contains("out of range"), "{e}");
    }

    #[test]
    fn lis_lines_become_byte_ranges() {
        let t = "10 8 0 1\n\n3 1 0 2\n";
        let r = parse_lis(t.as_bytes()).expect("parse");
        assert_eq!(
            r,
            vec![
                Request {
                    offset: 5120,
                    len: 4096
                },
                Request {
                    offset: 1536,
                    len: 512
                }
            ]
        );
        assert!(parse_lis("x 1 0 0\n".as_bytes()).is_err());
    }

    #[test]
    fn vscsi_records_keep_reads_and_reject_other_versions() {
        let rec = |len: u32, cmd: u16, version: u16, lbn: u64| {
            let mut r = Vec::new();
            r.extend_from_slice(&7u32.to_le_bytes());
            r.extend_from_slice(&len.to_le_bytes());
            r.extend_from_slice(&1u32.to_le_bytes());
            r.extend_from_slice(&cmd.to_le_bytes());
            r.extend_from_slice(&version.to_le_bytes());
            r.extend_from_slice(&lbn.to_le_bytes());
            r.extend_from_slice(&99u64.to_le_bytes());
            r
        };
        let mut t = rec(4096, 0x28, 0x0100, 10);
        t.extend(rec(8192, 0x2a, 0x0100, 20));
        let r = parse_vscsi(&t).expect("parse");
        assert_eq!(
            r,
            vec![Request {
                offset: 5120,
                len: 4096
            }]
        );
        assert!(parse_vscsi(&t[..31]).is_err());
        assert!(parse_vscsi(&rec(4096, 0x28, 0x0200, 1)).is_err());
        let shipped =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces/cloudPhysicsIO.vscsi");
        let all = read_trace(&shipped).expect("the shipped vscsi trace");
        // 113,872 requests, 41% of them reads.
        assert!((40_000..60_000).contains(&all.len()), "{}", all.len());
    }

    #[test]
    fn the_shipped_p2_trace_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces/P2.lis.zst");
        if !p.exists() {
            panic!(
                "{} is missing: the shared traces must sit beside the checkout",
                p.display()
            );
        }
        let r = read_lis(&p).expect("P2");
        assert_eq!(r.len(), 666_176);
    }
}

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
        out.push(Request {
            offset: start * LIS_SECTOR,
            len: count * LIS_SECTOR,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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

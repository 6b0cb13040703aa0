//! The cache papers' address traces: the ARC paper's `.lis` (`start_block nblocks 0
//! request_no`, 512-byte blocks) and the LIRS paper's block numbers (one a line, 4 KiB
//! blocks, `*` a checkpoint marker). Reads only, no timestamps, one volume.

use super::{Bad, LIRS_BLOCK, LIS_SECTOR, LineParser, Op, Record, Row, Volumes, range, uint};

fn read(offset: u64, len: u64) -> Row {
    Row::Io(Record {
        time_ns: None,
        volume: 0,
        op: Op::Read,
        offset,
        len,
    })
}

/// The volume every record of a one-volume trace goes to.
fn only_volume(vols: &mut Volumes) -> Result<u32, Bad> {
    vols.id("0")
}

/// ARC `.lis`.
pub(crate) struct Lis;

impl LineParser for Lis {
    fn parse(&mut self, line: &str, _: u64, vols: &mut Volumes) -> Result<Row, Bad> {
        let mut f = line.split_ascii_whitespace();
        let Some(start) = f.next() else {
            return Ok(Row::Nothing);
        };
        let count = f
            .next()
            .ok_or_else(|| Bad::new("nblocks", "missing (expected `start_block nblocks ...`)"))?;
        let start = uint("start_block", start)?;
        let count = uint("nblocks", count)?;
        only_volume(vols)?;
        Ok(match range(start, count, LIS_SECTOR)? {
            Some((offset, len)) => read(offset, len),
            None => Row::Other,
        })
    }
}

/// LIRS block numbers.
pub(crate) struct Lirs;

impl LineParser for Lirs {
    fn parse(&mut self, line: &str, _: u64, vols: &mut Volumes) -> Result<Row, Bad> {
        let t = line.trim();
        if t.is_empty() || t == "*" {
            return Ok(Row::Nothing);
        }
        let block = uint("block", t)?;
        only_volume(vols)?;
        let (offset, len) = range(block, 1, LIRS_BLOCK)?.unwrap_or_default();
        Ok(read(offset, len))
    }
}

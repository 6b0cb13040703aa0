//! VMware vscsiStats binary traces (the layouts libCacheSim reads), little-endian records:
//!
//! - version 1, 32 bytes: `u32 serial, u32 len_bytes, u32 nSG, u16 scsi_cmd, u16 version,
//!   u64 lbn, u64 ts_us`;
//! - version 2, 40 bytes: `u16 scsi_cmd, u16 version, u32 serial, u32 len_bytes, u32 nSG,
//!   u64 lbn, u64 ts_us, u64 response_us`.
//!
//! `version >> 8` is the version; the first records tell which layout a file has. `lbn` counts
//! 512-byte sectors. SCSI READ(6/10/12/16) are reads, WRITE(6/10/12/16) writes; other
//! commands are ignored. One volume.

use std::io::{BufRead, Read};

use super::{Bad, LIS_SECTOR, Op, Pos, Record, Row, Source, Volumes, scaled_ns};

/// Bytes of a version 1 record.
pub const V1_RECORD: usize = 32;
/// Bytes of a version 2 record.
pub const V2_RECORD: usize = 40;

fn u16_at(r: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([r[i], r[i + 1]])
}
fn u32_at(r: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]])
}
fn u64_at(r: &[u8], i: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&r[i..i + 8]);
    u64::from_le_bytes(x)
}

/// The version (1 or 2) of a vscsiStats trace from its first bytes: the first one or two
/// whole records must all carry it. Version 2 is tried first, as libCacheSim does.
pub fn version_of(head: &[u8]) -> Option<u8> {
    let all = |size: usize, at: usize, v: u16| {
        let n = (head.len() / size).min(2);
        n > 0 && (0..n).all(|i| u16_at(head, i * size + at) >> 8 == v)
    };
    if all(V2_RECORD, 2, 2) {
        Some(2)
    } else if all(V1_RECORD, 14, 1) {
        Some(1)
    } else {
        None
    }
}

/// Records of one version.
pub(crate) struct Vscsi {
    r: Box<dyn BufRead + Send>,
    version: u8,
    index: u64,
    done: bool,
}

impl Vscsi {
    pub(crate) fn new(r: Box<dyn BufRead + Send>, version: u8) -> Self {
        Vscsi {
            r,
            version,
            index: 0,
            done: false,
        }
    }

    fn size(&self) -> usize {
        if self.version == 2 {
            V2_RECORD
        } else {
            V1_RECORD
        }
    }

    fn parse(&self, rec: &[u8], vols: &mut Volumes) -> Result<Row, Bad> {
        let (cmd, ver, len) = if self.version == 2 {
            (u16_at(rec, 0), u16_at(rec, 2), u32_at(rec, 8))
        } else {
            (u16_at(rec, 12), u16_at(rec, 14), u32_at(rec, 4))
        };
        if ver >> 8 != u16::from(self.version) {
            return Err(Bad::new(
                "version",
                format!("{ver:#06x} in a version {} trace", self.version),
            ));
        }
        let op = match cmd {
            0x08 | 0x28 | 0xa8 | 0x88 => Op::Read,
            0x0a | 0x2a | 0xaa | 0x8a => Op::Write,
            _ => return Ok(Row::Other),
        };
        let time = scaled_ns("ts", u64_at(rec, 24), 1_000)?;
        let volume = vols.id("0")?;
        let len = u64::from(len);
        if len == 0 {
            return Ok(Row::Other);
        }
        let sector = u64_at(rec, 16);
        let offset = sector
            .checked_mul(LIS_SECTOR)
            .filter(|o| o.checked_add(len).is_some())
            .ok_or_else(|| Bad::new("lbn", format!("sector {sector} out of range")))?;
        Ok(Row::Io(Record {
            time_ns: Some(time),
            volume,
            op,
            offset,
            len,
        }))
    }
}

impl Source for Vscsi {
    fn next_row(&mut self, vols: &mut Volumes) -> anyhow::Result<Option<(Result<Row, Bad>, Pos)>> {
        if self.done {
            return Ok(None);
        }
        let size = self.size();
        let mut rec = [0u8; V2_RECORD];
        let mut got = 0;
        while got < size {
            match self.r.read(&mut rec[got..size]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let pos = Pos::Record {
            index: self.index,
            byte: self.index * size as u64,
        };
        self.index += 1;
        if got == 0 {
            self.done = true;
            return Ok(None);
        }
        if got < size {
            self.done = true;
            return Ok(Some((
                Err(Bad::new(
                    "record",
                    format!("{got} trailing bytes, not a whole {size}-byte record"),
                )),
                pos,
            )));
        }
        Ok(Some((self.parse(&rec[..size], vols), pos)))
    }
}

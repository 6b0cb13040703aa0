//! The comma-separated formats: MSR Cambridge / SNIA IOTTA, SYSTOR'17 VDI, Alibaba 2020,
//! Tencent CBS and SPC / UMass. One row a line; a first line whose first field is not a number
//! is a header and skipped, as are blank lines and `#` comments. Fields past the last one a
//! format uses are ignored.
//!
//! Architecture invariant: no allocation per row (volume names are interned once).

use super::{
    Bad, LIS_SECTOR, LineParser, Op, Record, Row, Volumes, range, scaled_ns, seconds_ns, uint,
};

/// The next field, or an error naming the missing one.
fn field<'a>(f: &mut std::str::Split<'a, char>, name: &'static str) -> Result<&'a str, Bad> {
    f.next()
        .map(str::trim)
        .ok_or_else(|| Bad::new(name, "missing (too few fields)"))
}

/// `None` for lines that hold no row: blank, a comment, or a header on line 1.
fn row_of(line: &str, line_no: u64) -> Option<std::str::Split<'_, char>> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    if line_no == 1 && !t.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(line.split(','))
}

/// One I/O, or `Other` for an empty one.
fn io(time_ns: u64, volume: u32, op: Op, span: Option<(u64, u64)>) -> Row {
    match span {
        Some((offset, len)) => Row::Io(Record {
            time_ns: Some(time_ns),
            volume,
            op,
            offset,
            len,
        }),
        None => Row::Other,
    }
}

/// MSR Cambridge / SNIA: `Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime`;
/// Windows FILETIME (100 ns ticks since 1601), bytes, `Read`/`Write`. A volume is
/// `Hostname_DiskNumber` (the traces' own file names: `hm_0`).
#[derive(Default)]
pub(crate) struct Msr {
    key: String,
}

impl LineParser for Msr {
    fn parse(&mut self, line: &str, line_no: u64, vols: &mut Volumes) -> Result<Row, Bad> {
        let Some(mut f) = row_of(line, line_no) else {
            return Ok(Row::Nothing);
        };
        let time = scaled_ns(
            "timestamp",
            uint("timestamp", field(&mut f, "timestamp")?)?,
            100,
        )?;
        let host = field(&mut f, "hostname")?;
        let disk = field(&mut f, "disknumber")?;
        let op = match field(&mut f, "type")? {
            t if t.eq_ignore_ascii_case("read") => Op::Read,
            t if t.eq_ignore_ascii_case("write") => Op::Write,
            t => return Err(Bad::new("type", format!("{t:?} is neither Read nor Write"))),
        };
        let offset = uint("offset", field(&mut f, "offset")?)?;
        let size = uint("size", field(&mut f, "size")?)?;
        self.key.clear();
        self.key.push_str(host);
        self.key.push('_');
        self.key.push_str(disk);
        let volume = vols.id(&self.key)?;
        Ok(io(time, volume, op, range(offset, size, 1)?))
    }
}

/// SYSTOR'17 VDI: `Timestamp,Response,IOType,LUN,Offset,Size`; Unix seconds with a fraction,
/// `R`/`W` (blank: neither, ignored), bytes. The volume is the LUN.
pub(crate) struct Systor;

impl LineParser for Systor {
    fn parse(&mut self, line: &str, line_no: u64, vols: &mut Volumes) -> Result<Row, Bad> {
        let Some(mut f) = row_of(line, line_no) else {
            return Ok(Row::Nothing);
        };
        let time = seconds_ns("timestamp", field(&mut f, "timestamp")?)?;
        field(&mut f, "response")?;
        let op = match field(&mut f, "iotype")? {
            t if t.eq_ignore_ascii_case("r") => Some(Op::Read),
            t if t.eq_ignore_ascii_case("w") => Some(Op::Write),
            "" => None,
            t => {
                return Err(Bad::new(
                    "iotype",
                    format!("{t:?} is neither R, W nor blank"),
                ));
            }
        };
        let volume = vols.id(field(&mut f, "lun")?)?;
        let offset = uint("offset", field(&mut f, "offset")?)?;
        let size = uint("size", field(&mut f, "size")?)?;
        let span = range(offset, size, 1)?;
        Ok(match op {
            Some(op) => io(time, volume, op, span),
            None => Row::Other,
        })
    }
}

/// Alibaba block traces 2020: `device_id,opcode,offset,length,timestamp`; `R`/`W`, bytes, µs.
pub(crate) struct Alibaba;

impl LineParser for Alibaba {
    fn parse(&mut self, line: &str, line_no: u64, vols: &mut Volumes) -> Result<Row, Bad> {
        let Some(mut f) = row_of(line, line_no) else {
            return Ok(Row::Nothing);
        };
        let device = field(&mut f, "device_id")?;
        uint("device_id", device)?;
        let op = match field(&mut f, "opcode")? {
            t if t.eq_ignore_ascii_case("r") => Op::Read,
            t if t.eq_ignore_ascii_case("w") => Op::Write,
            t => return Err(Bad::new("opcode", format!("{t:?} is neither R nor W"))),
        };
        let offset = uint("offset", field(&mut f, "offset")?)?;
        let length = uint("length", field(&mut f, "length")?)?;
        let time = scaled_ns(
            "timestamp",
            uint("timestamp", field(&mut f, "timestamp")?)?,
            1_000,
        )?;
        let volume = vols.id(device)?;
        Ok(io(time, volume, op, range(offset, length, 1)?))
    }
}

/// Tencent CBS: `Timestamp,Offset,Size,IOType,VolumeID`; Unix seconds, 512-byte sectors for
/// offset and size, 0 = read, 1 = write.
pub(crate) struct Tencent;

impl LineParser for Tencent {
    fn parse(&mut self, line: &str, line_no: u64, vols: &mut Volumes) -> Result<Row, Bad> {
        let Some(mut f) = row_of(line, line_no) else {
            return Ok(Row::Nothing);
        };
        let time = scaled_ns(
            "timestamp",
            uint("timestamp", field(&mut f, "timestamp")?)?,
            1_000_000_000,
        )?;
        let offset = uint("offset", field(&mut f, "offset")?)?;
        let size = uint("size", field(&mut f, "size")?)?;
        let op = match field(&mut f, "iotype")? {
            "0" => Op::Read,
            "1" => Op::Write,
            t => {
                return Err(Bad::new(
                    "iotype",
                    format!("{t:?} is neither 0 (read) nor 1 (write)"),
                ));
            }
        };
        let volume = field(&mut f, "volumeid")?;
        uint("volumeid", volume)?;
        let volume = vols.id(volume)?;
        Ok(io(time, volume, op, range(offset, size, LIS_SECTOR)?))
    }
}

/// SPC / UMass (Financial, WebSearch): `ASU,LBA,Size,Opcode,Timestamp`; 512-byte LBA, bytes,
/// `r`/`w`, seconds with a fraction. The volume is the ASU.
pub(crate) struct Spc;

impl LineParser for Spc {
    fn parse(&mut self, line: &str, line_no: u64, vols: &mut Volumes) -> Result<Row, Bad> {
        let Some(mut f) = row_of(line, line_no) else {
            return Ok(Row::Nothing);
        };
        let asu = field(&mut f, "asu")?;
        uint("asu", asu)?;
        let lba = uint("lba", field(&mut f, "lba")?)?;
        let size = uint("size", field(&mut f, "size")?)?;
        let op = match field(&mut f, "opcode")? {
            t if t.eq_ignore_ascii_case("r") => Op::Read,
            t if t.eq_ignore_ascii_case("w") => Op::Write,
            t => return Err(Bad::new("opcode", format!("{t:?} is neither r nor w"))),
        };
        let time = seconds_ns("timestamp", field(&mut f, "timestamp")?)?;
        let volume = vols.id(asu)?;
        let offset = lba
            .checked_mul(LIS_SECTOR)
            .ok_or_else(|| Bad::new("lba", format!("{lba} out of range")))?;
        Ok(io(time, volume, op, range(offset, size, 1)?))
    }
}

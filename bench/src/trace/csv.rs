//! The comma-separated formats: MSR Cambridge / SNIA IOTTA, SYSTOR'17 VDI, Alibaba 2020,
//! Tencent CBS and SPC / UMass. One row a line; a first line whose first field is not a number
//! is a header and skipped, as are blank lines and `#` comments. Fields past the last one a
//! format uses are ignored.
//!
//! Architecture invariant: no allocation per row (volume names are interned once).

use super::{
    Bad, LIS_SECTOR, LineParser, Op, Row, Volumes, range, scaled_ns, seconds_ns, timed_io, uint,
};

/// The next field, or an error naming the missing one.
fn field<'a>(f: &mut std::str::Split<'a, char>, name: &'static str) -> Result<&'a str, Bad> {
    f.next()
        .map(str::trim)
        .ok_or_else(|| Bad::new(name, "missing (too few fields)"))
}

/// The operation a field names: `read` or `write` (either case), anything else a bad row.
fn op_field(name: &'static str, v: &str, read: &str, write: &str) -> Result<Op, Bad> {
    if v.eq_ignore_ascii_case(read) {
        Ok(Op::Read)
    } else if v.eq_ignore_ascii_case(write) {
        Ok(Op::Write)
    } else {
        Err(Bad::new(
            name,
            format!("{v:?} is neither {read} nor {write}"),
        ))
    }
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
        let op = op_field("type", field(&mut f, "type")?, "Read", "Write")?;
        let offset = uint("offset", field(&mut f, "offset")?)?;
        let size = uint("size", field(&mut f, "size")?)?;
        self.key.clear();
        self.key.push_str(host);
        self.key.push('_');
        self.key.push_str(disk);
        let volume = vols.id(&self.key)?;
        Ok(timed_io(time, volume, op, range(offset, size, 1)?))
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
            "" => None,
            t => Some(op_field("iotype", t, "R", "W")?),
        };
        let volume = vols.id(field(&mut f, "lun")?)?;
        let offset = uint("offset", field(&mut f, "offset")?)?;
        let size = uint("size", field(&mut f, "size")?)?;
        let span = range(offset, size, 1)?;
        Ok(match op {
            Some(op) => timed_io(time, volume, op, span),
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
        let op = op_field("opcode", field(&mut f, "opcode")?, "R", "W")?;
        let offset = uint("offset", field(&mut f, "offset")?)?;
        let length = uint("length", field(&mut f, "length")?)?;
        let time = scaled_ns(
            "timestamp",
            uint("timestamp", field(&mut f, "timestamp")?)?,
            1_000,
        )?;
        let volume = vols.id(device)?;
        Ok(timed_io(time, volume, op, range(offset, length, 1)?))
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
        let op = op_field("iotype", field(&mut f, "iotype")?, "0", "1")?;
        let volume = field(&mut f, "volumeid")?;
        uint("volumeid", volume)?;
        let volume = vols.id(volume)?;
        Ok(timed_io(time, volume, op, range(offset, size, LIS_SECTOR)?))
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
        let op = op_field("opcode", field(&mut f, "opcode")?, "r", "w")?;
        let time = seconds_ns("timestamp", field(&mut f, "timestamp")?)?;
        let volume = vols.id(asu)?;
        let offset = lba
            .checked_mul(LIS_SECTOR)
            .ok_or_else(|| Bad::new("lba", format!("{lba} out of range")))?;
        Ok(timed_io(time, volume, op, range(offset, size, 1)?))
    }
}

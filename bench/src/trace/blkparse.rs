//! blkparse's default text output (`blkparse -i TRACE`), one event a line:
//!
//! ```text
//!   8,0    3        7     0.000013248   697  D   W 223490 + 8 [kjournald]
//! ```
//!
//! device (major,minor), CPU, sequence number, seconds since the trace began, PID, action,
//! RWBS, start sector + sectors (512 bytes), process. Only `D` events (issued to the device)
//! are I/Os; their RWBS says read (`R`), write (`W`), discard (`D`) or none (`N`, a flush),
//! after an optional `F` (preflush). Other events are ignored. Lines that do not start with a
//! device (the per-CPU and total summaries blkparse prints at the end) hold no event.

use super::{Bad, LIS_SECTOR, LineParser, Op, Row, Volumes, range, seconds_ns, timed_io, uint};

/// blkparse text.
pub(crate) struct Blkparse;

fn is_device(t: &str) -> bool {
    t.split_once(',').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.bytes().all(|c| c.is_ascii_digit())
    })
}

impl LineParser for Blkparse {
    fn parse(&mut self, line: &str, _: u64, vols: &mut Volumes) -> Result<Row, Bad> {
        let mut f = line.split_ascii_whitespace();
        let Some(dev) = f.next() else {
            return Ok(Row::Nothing);
        };
        if !is_device(dev) {
            return Ok(Row::Nothing);
        }
        let mut next = |name: &'static str| f.next().ok_or_else(|| Bad::new(name, "missing"));
        uint("cpu", next("cpu")?)?;
        uint("sequence", next("sequence")?)?;
        let time = seconds_ns("time", next("time")?)?;
        uint("pid", next("pid")?)?;
        let action = next("action")?;
        if action != "D" {
            return Ok(Row::Other);
        }
        let rwbs = next("rwbs")?;
        let kind = rwbs.strip_prefix('F').unwrap_or(rwbs).bytes().next();
        let op = match kind {
            Some(b'R') => Op::Read,
            Some(b'W') => Op::Write,
            Some(b'D' | b'N' | b'E') => return Ok(Row::Other),
            _ => {
                return Err(Bad::new(
                    "rwbs",
                    format!("{:?} names no operation", super::cut(rwbs)),
                ));
            }
        };
        let sector = uint("sector", next("sector")?)?;
        if next("+")? != "+" {
            return Err(Bad::new("+", "expected `sector + sectors`"));
        }
        let count = uint("sectors", next("sectors")?)?;
        let volume = vols.id(dev)?;
        Ok(timed_io(
            time,
            volume,
            op,
            range(sector, count, LIS_SECTOR)?,
        ))
    }
}

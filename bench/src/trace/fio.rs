//! fio's iolog (`write_iolog=`), versions 2 and 3 (`man fio`, TRACE FILE FORMAT). The first
//! line is `fio version 2 iolog` or `fio version 3 iolog`; then file actions
//! (`[timestamp] filename add|open|close`) and I/O actions (`[timestamp] filename action offset
//! length`, bytes), version 3 with a timestamp in microseconds since the run began. In
//! version 2, `wait` actions give the time: microseconds since the previous `wait`. Reads and
//! writes are I/Os; `trim`, `sync`, `datasync` and file actions are ignored. The volume is the
//! file name.

use super::{Bad, LineParser, Op, Row, Volumes, range, scaled_ns, timed_io, uint};

/// fio iolog, either version.
#[derive(Default)]
pub(crate) struct Fio {
    /// 2 or 3, from the first line.
    version: u8,
    /// Version 2: microseconds of `wait` so far.
    waited_us: u64,
}

impl LineParser for Fio {
    fn parse(&mut self, line: &str, line_no: u64, vols: &mut Volumes) -> Result<Row, Bad> {
        let t = line.trim();
        if line_no == 1 {
            self.version = match t {
                "fio version 2 iolog" => 2,
                "fio version 3 iolog" => 3,
                _ => {
                    return Err(Bad::new(
                        "header",
                        format!(
                            "{:?}: expected `fio version 2 iolog` or `fio version 3 iolog`",
                            super::cut(t)
                        ),
                    ));
                }
            };
            return Ok(Row::Nothing);
        }
        if self.version == 0 {
            return Err(Bad::new("header", "no valid header on line 1"));
        }
        let mut f = t.split_ascii_whitespace();
        let time_us = if self.version == 3 {
            match f.next() {
                Some(ts) => Some(uint("timestamp", ts)?),
                None => return Ok(Row::Nothing),
            }
        } else {
            None
        };
        let Some(file) = f.next() else {
            return match time_us {
                Some(_) => Err(Bad::new("filename", "missing")),
                None => Ok(Row::Nothing),
            };
        };
        let action = f.next().ok_or_else(|| Bad::new("action", "missing"))?;
        let op = match action {
            "add" | "open" | "close" | "trim" | "sync" | "datasync" => return Ok(Row::Other),
            "read" => Op::Read,
            "write" => Op::Write,
            "wait" if self.version == 2 => {
                // `wait` carries its microseconds in the offset field.
                let us = uint(
                    "offset",
                    f.next().ok_or_else(|| Bad::new("offset", "missing"))?,
                )?;
                self.waited_us = self.waited_us.saturating_add(us);
                return Ok(Row::Other);
            }
            _ => {
                return Err(Bad::new(
                    "action",
                    format!("{:?} is no iolog action", super::cut(action)),
                ));
            }
        };
        let offset = uint(
            "offset",
            f.next().ok_or_else(|| Bad::new("offset", "missing"))?,
        )?;
        let length = uint(
            "length",
            f.next().ok_or_else(|| Bad::new("length", "missing"))?,
        )?;
        let time = scaled_ns("timestamp", time_us.unwrap_or(self.waited_us), 1_000)?;
        let volume = vols.id(file)?;
        Ok(timed_io(time, volume, op, range(offset, length, 1)?))
    }
}

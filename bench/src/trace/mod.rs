//! Block trace readers: one module per published format, all streaming with bounded memory.
//!
//! A [`Reader`] yields [`Record`]s (time, volume, read or write, byte range) from a file in any
//! of [`Format`]'s formats, plain, zstd- or gzip-compressed (told by the magic bytes, not the
//! name). The format comes from the caller or is told from the first lines ([`detect`]). A row
//! that cannot be read is an error naming the file, the line (or record) and the field, or,
//! with [`Options::skip_bad`], is skipped and counted in [`Stats`]. Rows that are no read or
//! write (trims, syncs, file actions, blkparse events other than `D`) are counted as ignored.
//! Formats whose rows come out of time order (SYSTOR'17) are sorted within a bounded window.
//!
//! Field layouts: `../shared/traces/PROVENANCE.md` and each module's `//!`.
//!
//! Architecture invariant: memory is bounded whatever the input: one line buffer of at most
//! [`MAX_LINE`] bytes, at most [`MAX_VOLUMES`] volume names, at most the reorder window of
//! records held back. No reader collects a whole trace; [`read_requests`] does, for the benches
//! that replay a trace many times.

use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{Context, bail};

mod blkparse;
mod csv;
mod fio;
mod lis;
mod summary;
mod vscsi;

pub use summary::{Summary, summarize};

/// Bytes per `.lis` block (the ARC paper's page), and per sector in every format that counts
/// in sectors (vscsiStats, blkparse, Tencent CBS, SPC).
pub const LIS_SECTOR: u64 = 512;
/// Bytes per block of the LIRS paper's traces (which give block numbers only).
pub const LIRS_BLOCK: u64 = 4096;
/// The longest line a text reader accepts; a longer one is a bad row.
pub const MAX_LINE: usize = 64 * 1024;
/// The most distinct volumes (disks, LUNs, files) one trace may name.
pub const MAX_VOLUMES: usize = 1 << 16;
/// Rows a SYSTOR'17 trace is sorted within by default (its rows are a little out of order).
pub const SYSTOR_REORDER_WINDOW: usize = 1 << 16;

/// One read request, in bytes (what the cache and policy benches replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A read.
    Read,
    /// A write.
    Write,
}

/// One I/O of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// When it was issued, in nanoseconds since the format's epoch (see [`Format::epoch`]);
    /// `None` for formats without timestamps.
    pub time_ns: Option<u64>,
    /// The volume (disk, LUN, device, file) it went to: an index into [`Reader::volumes`].
    pub volume: u32,
    /// Read or write.
    pub op: Op,
    /// First byte. `offset + len` fits in 64 bits.
    pub offset: u64,
    /// Bytes, at least one.
    pub len: u64,
}

/// The trace formats read here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// ARC paper `.lis`: `start_block nblocks 0 request_no`, 512-byte blocks, reads only.
    Lis,
    /// LIRS paper traces: one block number a line (4 KiB blocks), reads only; `*` skipped.
    Lirs,
    /// VMware vscsiStats binary, version 1 (32-byte records) or 2 (40-byte records).
    Vscsi,
    /// MSR Cambridge / SNIA IOTTA CSV:
    /// `Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime` (FILETIME, bytes).
    Msr,
    /// SYSTOR'17 VDI CSV: `Timestamp,Response,IOType,LUN,Offset,Size` (Unix s, bytes).
    Systor,
    /// Alibaba block traces 2020: `device_id,opcode,offset,length,timestamp` (bytes, µs).
    Alibaba,
    /// Tencent CBS: `Timestamp,Offset,Size,IOType,VolumeID` (Unix s, sectors, 0 = read).
    Tencent,
    /// SPC / UMass: `ASU,LBA,Size,Opcode,Timestamp` (sectors, bytes, r/w, s).
    Spc,
    /// blkparse default text output; `D` (issued) events.
    Blkparse,
    /// fio iolog version 2 or 3.
    Fio,
}

impl Format {
    /// Every format.
    pub const ALL: [Format; 10] = [
        Format::Fio,
        Format::Vscsi,
        Format::Systor,
        Format::Msr,
        Format::Alibaba,
        Format::Spc,
        Format::Tencent,
        Format::Blkparse,
        Format::Lirs,
        Format::Lis,
    ];

    /// The name `--format` takes.
    pub fn name(self) -> &'static str {
        match self {
            Format::Lis => "lis",
            Format::Lirs => "lirs",
            Format::Vscsi => "vscsi",
            Format::Msr => "msr",
            Format::Systor => "systor",
            Format::Alibaba => "alibaba",
            Format::Tencent => "tencent",
            Format::Spc => "spc",
            Format::Blkparse => "blkparse",
            Format::Fio => "fio",
        }
    }

    /// What [`Record::time_ns`] counts from.
    pub fn epoch(self) -> &'static str {
        match self {
            Format::Lis | Format::Lirs => "none (no timestamps)",
            Format::Vscsi => "the tracer's clock (µs)",
            Format::Msr => "1601-01-01 (Windows FILETIME)",
            Format::Systor | Format::Alibaba | Format::Tencent => "the Unix epoch",
            Format::Spc | Format::Blkparse => "the start of the trace",
            Format::Fio => "the start of the run (v3 timestamps, v2 waits)",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How to read a trace.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The format; `None` tells it from the content.
    pub format: Option<Format>,
    /// Skip and count rows that cannot be read instead of failing on the first.
    pub skip_bad: bool,
    /// Sort records by time within this many rows (`Some(0)`: never). Default: only SYSTOR'17
    /// traces, within [`SYSTOR_REORDER_WINDOW`] rows.
    pub reorder_window: Option<usize>,
}

/// What a reader has seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Records returned.
    pub records: u64,
    /// Rows that are no read or write (trims, syncs, file actions, other blkparse events).
    pub ignored: u64,
    /// Bad rows skipped (only with [`Options::skip_bad`]).
    pub skipped_bad: u64,
    /// The first bad row skipped, as its error.
    pub first_bad: Option<String>,
    /// Records older than one already returned, even after the reorder window (returned anyway).
    pub out_of_order: u64,
}

/// Why one row could not be read: which field, and what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bad {
    pub field: &'static str,
    pub msg: String,
}

impl Bad {
    pub(crate) fn new(field: &'static str, msg: impl Into<String>) -> Self {
        Bad {
            field,
            msg: msg.into(),
        }
    }
}

/// What one row holds.
pub(crate) enum Row {
    /// An I/O.
    Io(Record),
    /// A row that is no read or write (counted as ignored).
    Other,
    /// A blank line, header or comment (not counted).
    Nothing,
}

/// A timed I/O over `span` (`offset, len`), or `Other` for an empty one.
pub(crate) fn timed_io(time_ns: u64, volume: u32, op: Op, span: Option<(u64, u64)>) -> Row {
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

/// Volume names, interned: a record carries the index.
#[derive(Debug, Default)]
pub(crate) struct Volumes {
    names: Vec<Box<str>>,
    ids: HashMap<Box<str>, u32>,
}

impl Volumes {
    /// The index of `name`, added on first sight.
    pub(crate) fn id(&mut self, name: &str) -> Result<u32, Bad> {
        if let Some(&id) = self.ids.get(name) {
            return Ok(id);
        }
        if self.names.len() >= MAX_VOLUMES {
            return Err(Bad::new(
                "volume",
                format!("more than {MAX_VOLUMES} distinct volumes"),
            ));
        }
        let id = self.names.len() as u32;
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        Ok(id)
    }
}

/// A format's row parser for line-based text.
pub(crate) trait LineParser: Send {
    /// Parses one line (without its end of line); `line_no` counts from 1.
    fn parse(&mut self, line: &str, line_no: u64, vols: &mut Volumes) -> Result<Row, Bad>;
}

/// Where records come from: text lines through a [`LineParser`], or binary records.
trait Source: Send {
    /// The next row, with its position for errors ("line 7", "record 3").
    fn next_row(&mut self, vols: &mut Volumes) -> anyhow::Result<Option<(Result<Row, Bad>, Pos)>>;
}

/// A row's position in its file.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pos {
    Line(u64),
    Record { index: u64, byte: u64 },
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pos::Line(n) => write!(f, "line {n}"),
            Pos::Record { index, byte } => write!(f, "record {index} (byte {byte})"),
        }
    }
}

/// Lines of text, each at most [`MAX_LINE`] bytes, through a [`LineParser`].
struct Lines {
    r: Box<dyn BufRead + Send>,
    buf: Vec<u8>,
    line_no: u64,
    parser: Box<dyn LineParser>,
}

impl Source for Lines {
    fn next_row(&mut self, vols: &mut Volumes) -> anyhow::Result<Option<(Result<Row, Bad>, Pos)>> {
        let Some(too_long) = read_line_bounded(&mut self.r, &mut self.buf, MAX_LINE)? else {
            return Ok(None);
        };
        self.line_no += 1;
        let pos = Pos::Line(self.line_no);
        if too_long {
            return Ok(Some((
                Err(Bad::new("line", format!("longer than {MAX_LINE} bytes"))),
                pos,
            )));
        }
        let row = match std::str::from_utf8(&self.buf) {
            Ok(line) => {
                let line = line.trim_end_matches(['\n', '\r']);
                self.parser.parse(line, self.line_no, vols)
            }
            Err(e) => Err(Bad::new("line", format!("not UTF-8 text ({e})"))),
        };
        Ok(Some((row, pos)))
    }
}

/// Reads one line into `buf` (end of line included), keeping at most `limit` bytes of it and
/// discarding the rest. `None` at the end of input; `Some(true)` if the line was longer.
pub(crate) fn read_line_bounded(
    r: &mut dyn BufRead,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<Option<bool>> {
    buf.clear();
    let mut seen = 0usize;
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok((seen > 0).then_some(seen > limit));
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = limit.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..take.min(room)]);
        seen = seen.saturating_add(take);
        r.consume(take);
        if done {
            return Ok(Some(seen > limit));
        }
    }
}

/// A reader of one trace: an iterator of records.
pub struct Reader {
    name: String,
    format: Format,
    source: Box<dyn Source>,
    vols: Volumes,
    skip_bad: bool,
    stats: Stats,
    reorder: Option<Reorder>,
    failed: bool,
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Opens a trace file.
pub fn open(path: &Path, opts: &Options) -> anyhow::Result<Reader> {
    let file =
        std::fs::File::open(path).with_context(|| format!("open trace {}", path.display()))?;
    from_reader(&path.display().to_string(), Box::new(file), opts)
}

/// Reads a trace from any byte stream; `name` is used in errors.
pub fn from_reader(name: &str, r: Box<dyn Read + Send>, opts: &Options) -> anyhow::Result<Reader> {
    let r = decompress(r).with_context(|| format!("{name}: decompress"))?;
    let (head, r) = peek(r, 16 * 1024).with_context(|| format!("{name}: read"))?;
    let format = match opts.format {
        Some(f) => f,
        None => detect(&head).with_context(|| format!("{name}: which trace format"))?,
    };
    let vscsi_version = vscsi::version_of(&head);
    let head_len = head.len();
    let body: Box<dyn Read + Send> = Box::new(std::io::Cursor::new(head).chain(r));
    let source: Box<dyn Source> = match format {
        Format::Lis => lines(body, Box::new(lis::Lis)),
        Format::Lirs => lines(body, Box::new(lis::Lirs)),
        Format::Msr => lines(body, Box::new(csv::Msr::default())),
        Format::Systor => lines(body, Box::new(csv::Systor)),
        Format::Alibaba => lines(body, Box::new(csv::Alibaba)),
        Format::Tencent => lines(body, Box::new(csv::Tencent)),
        Format::Spc => lines(body, Box::new(csv::Spc)),
        Format::Blkparse => lines(body, Box::new(blkparse::Blkparse)),
        Format::Fio => lines(body, Box::new(fio::Fio::default())),
        Format::Vscsi => {
            // Too short to tell: read it as version 1 and let the reader say what is wrong.
            let version = vscsi_version.or((head_len < vscsi::V1_RECORD).then_some(1));
            let Some(version) = version else {
                bail!(
                    "{name}: no vscsiStats trace: its first records are of neither version 1 nor 2"
                );
            };
            Box::new(vscsi::Vscsi::new(
                Box::new(BufReader::with_capacity(64 * 1024, body)),
                version,
            ))
        }
    };
    let window = opts.reorder_window.unwrap_or(match format {
        Format::Systor => SYSTOR_REORDER_WINDOW,
        _ => 0,
    });
    Ok(Reader {
        name: name.to_string(),
        format,
        source,
        vols: Volumes::default(),
        skip_bad: opts.skip_bad,
        stats: Stats::default(),
        reorder: (window > 0).then(|| Reorder::new(window)),
        failed: false,
    })
}

/// Text lines of `body` through `parser`.
fn lines(body: Box<dyn Read + Send>, parser: Box<dyn LineParser>) -> Box<dyn Source> {
    Box::new(Lines {
        r: Box::new(BufReader::with_capacity(64 * 1024, body)),
        buf: Vec::with_capacity(256),
        line_no: 0,
        parser,
    })
}

impl Reader {
    /// The format being read.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The volume names seen so far; [`Record::volume`] indexes them.
    pub fn volumes(&self) -> impl ExactSizeIterator<Item = &str> {
        self.vols.names.iter().map(|n| &**n)
    }

    /// What has been read so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The next record from the file (before reordering).
    fn next_raw(&mut self) -> anyhow::Result<Option<Record>> {
        loop {
            let Some((row, pos)) = self
                .source
                .next_row(&mut self.vols)
                .with_context(|| format!("{}: read", self.name))?
            else {
                return Ok(None);
            };
            match row {
                Ok(Row::Io(r)) => return Ok(Some(r)),
                Ok(Row::Other) => self.stats.ignored += 1,
                Ok(Row::Nothing) => {}
                Err(b) => {
                    let msg = format!(
                        "{}:{pos}: field `{}`: {} (as {})",
                        self.name, b.field, b.msg, self.format
                    );
                    if !self.skip_bad {
                        bail!("{msg}");
                    }
                    self.stats.skipped_bad += 1;
                    self.stats.first_bad.get_or_insert(msg);
                }
            }
        }
    }

    fn next_record(&mut self) -> anyhow::Result<Option<Record>> {
        let Some(mut reorder) = self.reorder.take() else {
            return self.next_raw();
        };
        let out = loop {
            if reorder.full() {
                break reorder.pop(&mut self.stats);
            }
            match self.next_raw() {
                Ok(Some(r)) => match r.time_ns {
                    Some(_) => reorder.push(r),
                    // Untimed records cannot be sorted: they pass in file order.
                    None => break Some(r),
                },
                Ok(None) => break reorder.pop(&mut self.stats),
                Err(e) => {
                    self.reorder = Some(reorder);
                    return Err(e);
                }
            }
        };
        self.reorder = Some(reorder);
        Ok(out)
    }
}

impl Iterator for Reader {
    type Item = anyhow::Result<Record>;

    /// The next record; after an error, `None`.
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_record() {
            Ok(Some(r)) => {
                self.stats.records += 1;
                Some(Ok(r))
            }
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Records held back to be sorted by time: a min-heap of at most `window` records.
struct Reorder {
    heap: BinaryHeap<std::cmp::Reverse<Held>>,
    window: usize,
    seq: u64,
    last: Option<u64>,
}

/// A held record, ordered by time, then by file order.
struct Held(u64, u64, Record);

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(o.0, o.1))
    }
}

impl Reorder {
    fn new(window: usize) -> Self {
        Reorder {
            heap: BinaryHeap::with_capacity(window.min(1 << 16)),
            window,
            seq: 0,
            last: None,
        }
    }

    fn full(&self) -> bool {
        self.heap.len() >= self.window
    }

    fn push(&mut self, r: Record) {
        self.seq += 1;
        let t = r.time_ns.unwrap_or(0);
        self.heap.push(std::cmp::Reverse(Held(t, self.seq, r)));
    }

    fn pop(&mut self, stats: &mut Stats) -> Option<Record> {
        let std::cmp::Reverse(Held(t, _, r)) = self.heap.pop()?;
        if self.last.is_some_and(|l| t < l) {
            stats.out_of_order += 1;
        } else {
            self.last = Some(t);
        }
        Some(r)
    }
}

/// Unwraps zstd and gzip, told by their magic bytes.
fn decompress(r: Box<dyn Read + Send>) -> std::io::Result<Box<dyn Read + Send>> {
    let (head, r) = peek(r, 4)?;
    let r: Box<dyn Read + Send> = Box::new(std::io::Cursor::new(head.clone()).chain(r));
    Ok(match head.as_slice() {
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Box::new(zstd::Decoder::new(r)?),
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(r)),
        _ => r,
    })
}

/// Reads up to `n` bytes (fewer only at the end of input) and hands back the rest.
fn peek(mut r: Box<dyn Read + Send>, n: usize) -> std::io::Result<(Vec<u8>, Box<dyn Read + Send>)> {
    let mut head = Vec::with_capacity(n);
    (&mut r).take(n as u64).read_to_end(&mut head)?;
    Ok((head, r))
}

/// Tells a trace's format from its first bytes (decompressed).
pub fn detect(head: &[u8]) -> anyhow::Result<Format> {
    if head.is_empty() {
        bail!("the trace is empty; give --format to read an empty trace");
    }
    if head.starts_with(b"fio version 2 iolog") || head.starts_with(b"fio version 3 iolog") {
        return Ok(Format::Fio);
    }
    let text_end = head.len().min(4096);
    let binary = head[..text_end]
        .iter()
        .any(|&b| b == 0 || (b < 0x20 && !matches!(b, b'\n' | b'\r' | b'\t')));
    if binary {
        if vscsi::version_of(head).is_some() {
            return Ok(Format::Vscsi);
        }
        bail!(
            "binary data that is no vscsiStats trace (version 1 or 2); give --format if it is one"
        );
    }
    // The first lines that hold data; a last line may be cut off by the peek.
    let text = String::from_utf8_lossy(head);
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let Some(first) = lines.next() else {
        bail!("only blank lines at the start");
    };
    let csv_header = first.contains(',') && !starts_with_number(first);
    if csv_header
        && first
            .to_ascii_lowercase()
            .starts_with("timestamp,response,iotype")
    {
        return Ok(Format::Systor);
    }
    // blkparse: `maj,min cpu seq time pid action ...`, whitespace-separated.
    let mut words = first.split_ascii_whitespace();
    if let Some((maj, min)) = words.next().and_then(|t| t.split_once(','))
        && is_digits(maj)
        && is_digits(min)
        && words.count() >= 5
    {
        return Ok(Format::Blkparse);
    }
    let data = if csv_header {
        lines.next().unwrap_or(first)
    } else {
        first
    };
    if data.contains(',') {
        let f: Vec<&str> = data.split(',').map(str::trim).collect();
        let is = |i: usize, set: &[&str]| {
            f.get(i)
                .is_some_and(|v| set.iter().any(|s| v.eq_ignore_ascii_case(s)))
        };
        if f.len() == 7 && is(3, &["read", "write"]) {
            return Ok(Format::Msr);
        }
        if f.len() == 6 && is(2, &["r", "w", ""]) {
            return Ok(Format::Systor);
        }
        if f.len() >= 5 && is(1, &["r", "w"]) {
            return Ok(Format::Alibaba);
        }
        if f.len() >= 5 && is(3, &["r", "w"]) {
            return Ok(Format::Spc);
        }
        if f.len() == 5 && is(3, &["0", "1"]) {
            return Ok(Format::Tencent);
        }
        bail!(
            "a CSV row of {} fields that matches no known layout: {:?}; give --format",
            f.len(),
            cut(data)
        );
    }
    let mut tokens = data.split_ascii_whitespace();
    let t0 = tokens.next().unwrap_or_default();
    let rest: Vec<&str> = tokens.collect();
    if t0 == "*" || (is_digits(t0) && rest.is_empty()) {
        return Ok(Format::Lirs);
    }
    if is_digits(t0) && rest.first().is_some_and(|t| is_digits(t)) {
        return Ok(Format::Lis);
    }
    bail!(
        "a first line that matches no known format: {:?}; give --format",
        cut(data)
    )
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn starts_with_number(line: &str) -> bool {
    line.trim_start()
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_digit())
}

/// A line shortened for an error message.
pub(crate) fn cut(line: &str) -> &str {
    let mut end = line.len().min(120);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

/// Parses an unsigned decimal integer field.
pub(crate) fn uint(field: &'static str, s: &str) -> Result<u64, Bad> {
    let s = s.trim();
    s.parse::<u64>().map_err(|e| {
        Bad::new(
            field,
            format!("{:?} is not an unsigned integer ({e})", cut(s)),
        )
    })
}

/// Parses seconds with an optional decimal fraction (`1485970860.121622`) into nanoseconds,
/// exactly (digits past the ninth are dropped).
pub(crate) fn seconds_ns(field: &'static str, s: &str) -> Result<u64, Bad> {
    let s = s.trim();
    let bad = |why: &str| {
        Bad::new(
            field,
            format!("{:?} is not a time in seconds ({why})", cut(s)),
        )
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad("digits and one point expected"));
    }
    let whole: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad("too large"))?
    };
    let mut ns = 0u64;
    for i in 0..9 {
        let d = frac.as_bytes().get(i).map_or(0, |b| u64::from(b - b'0'));
        ns = ns * 10 + d;
    }
    whole
        .checked_mul(1_000_000_000)
        .and_then(|w| w.checked_add(ns))
        .ok_or_else(|| bad("too large"))
}

/// Scales a count to nanoseconds, or says it does not fit.
pub(crate) fn scaled_ns(field: &'static str, v: u64, ns_per_unit: u64) -> Result<u64, Bad> {
    v.checked_mul(ns_per_unit)
        .ok_or_else(|| Bad::new(field, format!("{v} is too large a time")))
}

/// A byte range from a start and a length in `unit`-byte units; `Ok(None)` for an empty one.
pub(crate) fn range(start: u64, count: u64, unit: u64) -> Result<Option<(u64, u64)>, Bad> {
    if count == 0 {
        return Ok(None);
    }
    let oob = || {
        Bad::new(
            "offset",
            format!("{start}+{count} (x{unit} bytes) out of range"),
        )
    };
    let offset = start.checked_mul(unit).ok_or_else(oob)?;
    let len = count.checked_mul(unit).ok_or_else(oob)?;
    offset.checked_add(len).ok_or_else(oob)?;
    Ok(Some((offset, len)))
}

/// Reads every read of a trace into memory, as byte ranges (the cache and policy benches,
/// which replay one trace many times). Writes are left out; the count of each is printed.
pub fn read_requests(path: &Path, opts: &Options) -> anyhow::Result<Vec<Request>> {
    read_requests_and_format(path, opts).map(|(reqs, _)| reqs)
}

/// [`read_requests`], and the format the trace was read as.
pub fn read_requests_and_format(
    path: &Path,
    opts: &Options,
) -> anyhow::Result<(Vec<Request>, Format)> {
    let mut reader = open(path, opts)?;
    let mut out = Vec::new();
    let mut writes = 0u64;
    for r in reader.by_ref() {
        let r = r?;
        match r.op {
            Op::Read => out.push(Request {
                offset: r.offset,
                len: r.len,
            }),
            Op::Write => writes += 1,
        }
    }
    if writes > 0 || reader.stats().skipped_bad > 0 {
        eprintln!(
            "{}: {} format, {} reads kept, {writes} writes left out, {} bad rows skipped",
            path.display(),
            reader.format(),
            out.len(),
            reader.stats().skipped_bad
        );
    }
    Ok((out, reader.format()))
}

/// Reads a trace's reads, telling the format from the content.
pub fn read_trace(path: &Path) -> anyhow::Result<Vec<Request>> {
    read_requests(path, &Options::default())
}

/// A trace of `../shared/traces` (tests); fails loudly when the shared traces are missing.
#[cfg(test)]
pub(crate) fn shipped(name: &str) -> std::path::PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/traces")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: the shared traces must sit beside the checkout",
        p.display()
    );
    p
}

#[cfg(test)]
mod tests;

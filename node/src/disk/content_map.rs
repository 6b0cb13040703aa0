//! A sealed disk's content map: block index -> what the block holds (a fingerprint, or zero).
//!
//! Filled when a block is first read from the origin, so later reads never hash again. For a
//! sealed disk the map is also appended to a log file under the data directory, so that a node
//! restarted on the same data directory knows the fingerprints at once and serves SSD hits
//! without touching the origin.
//!
//! Log format: a header (magic with version, block size, the origin's identity string, an 8-byte
//! checksum), then 48-byte records: u64 block index, one kind byte (0 zero, 1 data), 32 bytes of
//! fingerprint, 3 zero bytes, and 4 bytes of BLAKE3 over the 44 before them. Loading stops at the first record whose checksum
//! fails (a torn tail after a crash) and truncates there. A header that does not match the disk
//! (another block size, an origin changed while the node was down) discards the whole log:
//! a wrong map entry could serve a wrong byte, a missing one only costs an origin read.
//!
//! A member's copy of an owner's map ([`ContentMap::owner_copy`]) is not persisted and is
//! bounded: it holds chunks of the owner's map in a moka cache weighted by blocks, and forgets
//! the least recently used chunks beyond its limit (a forgotten chunk costs more `ContentMap`
//! requests, never a wrong byte). A chunk is filled by ranges, as readers need them: the owner
//! reads every block of a range it is asked for that it has not read yet, so a reader that
//! needs a few blocks must not make it read a chunk. Each block of a chunk has a bit: fetched
//! or not (an entry fetched can still be `None`: a block the owner could not read).
//!
//! Architecture invariant: appends never block the read path; they go through a bounded queue
//! to one writer thread, and are dropped (costing a later origin read) when it is full.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use std::sync::Arc;

use crate::hashing::DashMap;

use crate::cache::Fingerprint;

const MAGIC: &[u8; 8] = b"SHDWMAP1";
const RECORD_BYTES: usize = 48;
const APPEND_QUEUE: usize = 65_536;

/// What one block of a disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRef {
    /// Every byte is zero; answered by the shared zero block, never stored.
    Zero,
    /// Bytes with this fingerprint.
    Data(Fingerprint),
}

enum LogMsg {
    Append(u64, BlockRef),
    Sync(mpsc::SyncSender<()>),
}

/// Block index -> [`BlockRef`] for one sealed disk, optionally persisted.
#[derive(Debug)]
pub struct ContentMap {
    entries: DashMap<u64, BlockRef>,
    log: Option<mpsc::SyncSender<LogMsg>>,
    /// For a member's copy of an owner's map: the chunks fetched, bounded (`entries` unused).
    chunks: Option<Chunks>,
}

/// Chunks of an owner's content map, the least recently used forgotten first.
#[derive(Debug)]
struct Chunks {
    blocks_per_chunk: u64,
    cache: moka::sync::Cache<u64, Arc<ChunkCopy>>,
}

/// One chunk of an owner's map as far as it was fetched: a bit per block fetched, and the
/// entries (`None` for a block not fetched, or that the owner could not read).
#[derive(Debug)]
struct ChunkCopy {
    fetched: Box<[std::sync::atomic::AtomicU64]>,
    entries: parking_lot::RwLock<Box<[Option<BlockRef>]>>,
}

impl ChunkCopy {
    fn new(blocks: usize) -> Self {
        ChunkCopy {
            fetched: (0..blocks.div_ceil(64))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            entries: parking_lot::RwLock::new(vec![None; blocks].into_boxed_slice()),
        }
    }

    fn len(&self) -> usize {
        self.entries.read().len()
    }

    fn has(&self, k: usize) -> bool {
        self.fetched
            .get(k / 64)
            .is_some_and(|w| w.load(std::sync::atomic::Ordering::Acquire) & (1 << (k % 64)) != 0)
    }

    fn whole(&self) -> bool {
        let len = self.len();
        self.fetched.iter().enumerate().all(|(n, w)| {
            let bits = (len - n * 64).min(64);
            let all = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            w.load(std::sync::atomic::Ordering::Acquire) & all == all
        })
    }
}

fn encode_record(index: u64, r: BlockRef) -> [u8; RECORD_BYTES] {
    let mut b = [0u8; RECORD_BYTES];
    b[0..8].copy_from_slice(&index.to_le_bytes());
    if let BlockRef::Data(fp) = r {
        b[8] = 1;
        b[9..41].copy_from_slice(&fp.0);
    }
    let c = blake3::hash(&b[0..44]);
    b[44..48].copy_from_slice(&c.as_bytes()[0..4]);
    b
}

fn decode_record(b: &[u8]) -> Option<(u64, BlockRef)> {
    if b[44..48] != blake3::hash(&b[0..44]).as_bytes()[0..4] {
        return None;
    }
    let index = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    match b[8] {
        0 => Some((index, BlockRef::Zero)),
        1 => {
            let mut fp = [0u8; 32];
            fp.copy_from_slice(&b[9..41]);
            Some((index, BlockRef::Data(Fingerprint(fp))))
        }
        _ => None,
    }
}

/// Reads up to one record; returns how many bytes it got (0 at a clean end).
fn read_record(r: &mut impl Read, rec: &mut [u8; RECORD_BYTES]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < RECORD_BYTES {
        match r.read(&mut rec[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn encode_header(block_bytes: u32, identity: &str) -> Vec<u8> {
    let mut h = Vec::with_capacity(64 + identity.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&block_bytes.to_le_bytes());
    h.extend_from_slice(&(identity.len() as u32).to_le_bytes());
    h.extend_from_slice(identity.as_bytes());
    let c = blake3::hash(&h);
    h.extend_from_slice(&c.as_bytes()[0..8]);
    h
}

impl ContentMap {
    /// An empty map kept in memory only.
    pub fn in_memory() -> Self {
        ContentMap {
            entries: crate::hashing::dash_map(),
            log: None,
            chunks: None,
        }
    }

    /// A member's copy of an owner's map: chunks of `blocks_per_chunk` entries, at most about
    /// `max_blocks` entries held (never fewer than one chunk).
    pub fn owner_copy(blocks_per_chunk: u64, max_blocks: u64) -> Self {
        let blocks_per_chunk = blocks_per_chunk.max(1);
        ContentMap {
            entries: crate::hashing::dash_map(),
            log: None,
            chunks: Some(Chunks {
                blocks_per_chunk,
                // LRU: TinyLFU would refuse a new chunk once the copy is full, and the reader
                // in a new region of the disk is exactly the one that needs it.
                cache: moka::sync::Cache::builder()
                    .eviction_policy(moka::policy::EvictionPolicy::lru())
                    .max_capacity(max_blocks.max(blocks_per_chunk))
                    .weigher(|_, v: &Arc<ChunkCopy>| v.len().max(1) as u32)
                    .build(),
            }),
        }
    }

    /// Blocks per chunk of an owner's copy (`None` for a map of this node's own disk).
    pub fn chunk_blocks(&self) -> Option<u64> {
        self.chunks.as_ref().map(|c| c.blocks_per_chunk)
    }

    /// Whether chunk `chunk` of an owner's copy is held whole (every block of it fetched).
    pub fn has_chunk(&self, chunk: u64) -> bool {
        self.chunks
            .as_ref()
            .and_then(|c| c.cache.get(&chunk))
            .is_some_and(|copy| copy.whole())
    }

    /// Whether the owner's entry of block `index` was fetched into this owner's copy (it may
    /// still be `None`: a block the owner could not read).
    pub fn has_block(&self, index: u64) -> bool {
        let Some(c) = &self.chunks else {
            return false;
        };
        c.cache
            .get(&(index / c.blocks_per_chunk))
            .is_some_and(|copy| copy.has((index % c.blocks_per_chunk) as usize))
    }

    /// Records entries of chunk `chunk` (of `chunk_len` blocks in all) of an owner's map from
    /// block `at` of the chunk on. Those given (`Some`) count as fetched; a `None` (the owner
    /// could not read the block: maybe for a moment) stays unfetched and is asked again. Ignored
    /// by a map of this node's own disk.
    pub fn insert_entries(
        &self,
        chunk: u64,
        chunk_len: usize,
        at: usize,
        entries: &[Option<BlockRef>],
    ) {
        let Some(c) = &self.chunks else {
            return;
        };
        let chunk_len = chunk_len.min(c.blocks_per_chunk as usize);
        let copy = c
            .cache
            .get_with(chunk, || Arc::new(ChunkCopy::new(chunk_len)));
        let end = at.saturating_add(entries.len()).min(copy.len());
        if at >= end {
            return;
        }
        {
            let mut e = copy.entries.write();
            for (k, r) in (at..end).zip(entries) {
                if r.is_some() {
                    e[k] = *r;
                }
            }
        }
        for (k, r) in (at..end).zip(entries) {
            if r.is_some() {
                copy.fetched[k / 64].fetch_or(1 << (k % 64), std::sync::atomic::Ordering::AcqRel);
            }
        }
    }

    /// Opens (or starts) the persisted map at `path`, trusting it only if it was written for
    /// the same block size and the same origin identity. Never fails: a log that cannot be
    /// used is discarded with a warning, a log that cannot be written leaves the map in memory.
    pub fn open(path: &Path, block_bytes: u32, identity: Option<&str>) -> Self {
        let map = crate::hashing::dash_map();
        let Some(identity) = identity else {
            return ContentMap {
                entries: map,
                log: None,
                chunks: None,
            };
        };
        let header = encode_header(block_bytes, identity);
        let loaded = Self::load(path, &header, &map);
        let file = match Self::prepare(path, &header, loaded) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "content map log unavailable; keeping the map in memory only");
                return ContentMap {
                    entries: map,
                    log: None,
                    chunks: None,
                };
            }
        };
        if !map.is_empty() {
            tracing::info!(path = %path.display(), blocks = map.len(), "content map loaded");
        }
        let (tx, rx) = mpsc::sync_channel(APPEND_QUEUE);
        let path_buf = path.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("shadowcache-map-log".into())
            .spawn(move || log_writer(file, rx, path_buf));
        ContentMap {
            entries: map,
            log: spawned.ok().map(|_| tx),
            chunks: None,
        }
    }

    /// Reads a log; returns the byte length of its valid prefix, or None if it is unusable.
    fn load(path: &Path, header: &[u8], map: &DashMap<u64, BlockRef>) -> Option<u64> {
        // Streamed record by record: a large disk's log is not held in memory beside its map.
        let mut r = std::io::BufReader::with_capacity(1 << 20, File::open(path).ok()?);
        let mut head = vec![0u8; header.len()];
        if r.read_exact(&mut head).is_err() || head != header {
            tracing::warn!(path = %path.display(), "content map log belongs to another origin state or block size; discarded");
            return None;
        }
        let mut good = 0u64;
        let mut rec = [0u8; RECORD_BYTES];
        loop {
            match read_record(&mut r, &mut rec) {
                Ok(0) => break,
                Ok(n) if n == RECORD_BYTES => {}
                Ok(_) => {
                    tracing::warn!(path = %path.display(), valid_records = good, "content map log has a torn tail; truncated there");
                    break;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, valid_records = good, "content map log unreadable past this point; truncated there");
                    break;
                }
            }
            let Some((i, b)) = decode_record(&rec) else {
                tracing::warn!(path = %path.display(), valid_records = good, "content map log has a damaged record; truncated there");
                break;
            };
            map.insert(i, b);
            good += 1;
        }
        Some(header.len() as u64 + good * RECORD_BYTES as u64)
    }

    fn prepare(path: &Path, header: &[u8], valid_len: Option<u64>) -> std::io::Result<File> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        match valid_len {
            Some(len) => {
                f.set_len(len)?;
                f.seek(std::io::SeekFrom::End(0))?;
            }
            None => {
                f.set_len(0)?;
                f.write_all(header)?;
            }
        }
        Ok(f)
    }

    /// What block `index` holds, if known.
    #[inline]
    pub fn get(&self, index: u64) -> Option<BlockRef> {
        if let Some(c) = &self.chunks {
            let chunk = c.cache.get(&(index / c.blocks_per_chunk))?;
            return chunk
                .entries
                .read()
                .get((index % c.blocks_per_chunk) as usize)
                .copied()
                .flatten();
        }
        self.entries.get(&index).map(|r| *r)
    }

    /// Records what block `index` holds.
    pub fn insert(&self, index: u64, r: BlockRef) {
        if let Some(c) = &self.chunks {
            // Rare in an owner's copy (bytes from the owner that disagree with its map): only
            // into a chunk held (a block not fetched stays unfetched).
            let n = index / c.blocks_per_chunk;
            let k = (index % c.blocks_per_chunk) as usize;
            // Only over an entry the owner gave: a slot never fetched stays the owner's to fill.
            if let Some(copy) = c.cache.get(&n)
                && copy.has(k)
                && let Some(slot) = copy.entries.write().get_mut(k)
            {
                *slot = Some(r);
            }
            return;
        }
        let previous = self.entries.insert(index, r);
        if previous == Some(r) {
            return;
        }
        if let Some(log) = &self.log {
            // A full queue drops the record: the block is simply read from the origin again
            // after a restart.
            let _ = log.try_send(LogMsg::Append(index, r));
        }
    }

    /// Blocks mapped so far.
    pub fn len(&self) -> usize {
        if let Some(c) = &self.chunks {
            return c
                .cache
                .iter()
                .map(|(_, v)| v.entries.read().iter().filter(|e| e.is_some()).count())
                .sum();
        }
        self.entries.len()
    }

    /// True when nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until every queued record is written and synced. Blocks.
    pub fn sync(&self) {
        if let Some(log) = &self.log {
            let (tx, rx) = mpsc::sync_channel(1);
            if log.send(LogMsg::Sync(tx)).is_ok() {
                let _ = rx.recv();
            }
        }
    }
}

fn log_writer(file: File, rx: mpsc::Receiver<LogMsg>, path: PathBuf) {
    let mut w = BufWriter::with_capacity(64 * 1024, file);
    let mut failed = false;
    while let Ok(msg) = rx.recv() {
        match msg {
            LogMsg::Append(i, r) => {
                if !failed && let Err(e) = w.write_all(&encode_record(i, r)) {
                    tracing::warn!(path = %path.display(), error = %e, "content map log write failed; further records dropped");
                    failed = true;
                }
            }
            LogMsg::Sync(done) => {
                if !failed {
                    let res = w.flush().and_then(|()| w.get_ref().sync_data());
                    if let Err(e) = res {
                        tracing::warn!(path = %path.display(), error = %e, "content map log sync failed");
                    }
                }
                let _ = done.send(());
            }
        }
    }
    let _ = w.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(n: u8) -> BlockRef {
        BlockRef::Data(Fingerprint([n; 32]))
    }

    #[test]
    fn an_owner_copy_holds_whole_chunks_and_forgets_the_least_recent_beyond_its_bound() {
        // Chunks of 4 entries, room for 8 entries: two chunks.
        let m = ContentMap::owner_copy(4, 8);
        assert_eq!(m.chunk_blocks(), Some(4));
        m.insert_entries(
            0,
            4,
            0,
            &[Some(fp(1)), Some(fp(2)), Some(BlockRef::Zero), Some(fp(4))],
        );
        assert!(m.has_chunk(0) && !m.has_chunk(1));
        assert_eq!(m.get(0), Some(fp(1)));
        assert_eq!(m.get(1), Some(fp(2)));
        assert_eq!(m.get(2), Some(BlockRef::Zero));
        assert_eq!(m.get(5), None, "a chunk not fetched is unknown");
        // An entry changed in place (bytes from the owner that disagree with its map).
        m.insert(1, fp(9));
        assert_eq!(m.get(1), Some(fp(9)));
        assert_eq!(m.len(), 4);
        // moka keeps its recency order in buffers; each step is applied before the next.
        let settle = || {
            if let Some(c) = &m.chunks {
                c.cache.run_pending_tasks();
            }
        };
        m.insert_entries(1, 4, 0, &[Some(fp(5)); 4]);
        settle();
        assert_eq!(m.get(0), Some(fp(1)), "chunk 0 read last");
        settle();
        m.insert_entries(2, 4, 0, &[Some(fp(6)); 4]);
        settle();
        assert!(m.has_chunk(0) && m.has_chunk(2));
        assert!(
            !m.has_chunk(1),
            "the least recently used chunk stayed beyond the bound"
        );
        // A map of this node's own disk has no chunks.
        let own = ContentMap::in_memory();
        own.insert_entries(0, 1, 0, &[Some(fp(1))]);
        assert_eq!((own.chunk_blocks(), own.get(0)), (None, None));
    }

    #[test]
    fn an_owner_copy_is_fetched_by_ranges_a_bit_per_block() {
        // Chunks of 256 blocks; chunk 1 is the disk's last, 200 blocks long.
        let m = ContentMap::owner_copy(256, 1 << 20);
        m.insert_entries(1, 200, 70, &[Some(fp(7)); 3]);
        assert!(m.has_block(256 + 70) && m.has_block(256 + 72));
        assert!(!m.has_block(256 + 69) && !m.has_block(256 + 73) && !m.has_block(70));
        assert_eq!(m.get(256 + 71), Some(fp(7)));
        assert_eq!(m.get(256 + 73), None, "a block not fetched is unknown");
        assert!(!m.has_chunk(1));
        // An entry the owner did not give (it could not read the block, maybe for a moment)
        // stays unfetched: it is asked again.
        let mut all = vec![Some(fp(9)); 200];
        all[3] = None;
        all[70] = Some(fp(7));
        m.insert_entries(1, 200, 0, &all[..100]);
        m.insert_entries(1, 200, 100, &all[100..]);
        assert!(!m.has_block(256 + 3) && !m.has_chunk(1));
        assert_eq!((m.get(256 + 3), m.get(256 + 4)), (None, Some(fp(9))));
        // A change in place only over an entry the owner gave.
        m.insert(256 + 3, fp(5));
        assert_eq!(m.get(256 + 3), None);
        m.insert_entries(1, 200, 3, &[Some(fp(8))]);
        assert!(m.has_chunk(1), "every block fetched");
        assert_eq!(m.get(256 + 199), Some(fp(9)));
        assert_eq!(m.len(), 200);
        // Entries past the chunk's end are cut.
        m.insert_entries(0, 256, 250, &[Some(fp(2)); 100]);
        assert!(m.has_block(255) && m.get(255) == Some(fp(2)) && m.get(256) == Some(fp(9)));
        assert!(!m.has_chunk(0));
    }

    #[test]
    fn a_saved_map_is_reloaded_for_the_same_origin_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("d.map");
        {
            let m = ContentMap::open(&p, 4096, Some("origin-a"));
            m.insert(3, fp(1));
            m.insert(9, BlockRef::Zero);
            m.sync();
        }
        let m = ContentMap::open(&p, 4096, Some("origin-a"));
        assert_eq!(m.get(3), Some(fp(1)));
        assert_eq!(m.get(9), Some(BlockRef::Zero));
        drop(m);
        let other = ContentMap::open(&p, 4096, Some("origin-b"));
        assert!(
            other.is_empty(),
            "a map of a changed origin must not be trusted"
        );
        let resized = ContentMap::open(&p, 8192, Some("origin-b"));
        assert!(resized.is_empty());
    }

    #[test]
    fn a_torn_tail_keeps_the_records_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("d.map");
        {
            let m = ContentMap::open(&p, 4096, Some("o"));
            for i in 0..10 {
                m.insert(i, fp(i as u8 + 1));
            }
            m.sync();
        }
        let len = std::fs::metadata(&p).expect("meta").len();
        // Tear the last record and damage the eighth.
        let f = OpenOptions::new().write(true).open(&p).expect("open");
        f.set_len(len - 5).expect("truncate");
        use std::os::unix::fs::FileExt;
        let header = encode_header(4096, "o").len() as u64;
        f.write_all_at(&[0xEE], header + 7 * RECORD_BYTES as u64 + 20)
            .expect("damage");
        let m = ContentMap::open(&p, 4096, Some("o"));
        assert_eq!(m.len(), 7);
        assert_eq!(m.get(6), Some(fp(7)));
        assert_eq!(m.get(7), None);
        // The log goes on from the valid prefix.
        m.insert(42, fp(9));
        m.sync();
        drop(m);
        let m = ContentMap::open(&p, 4096, Some("o"));
        assert_eq!((m.len(), m.get(42)), (8, Some(fp(9))));
    }
}

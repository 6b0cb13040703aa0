//! The SSD tier: a slot file of fixed-size slots and an index file of slot headers.
//!
//! Layout. The slot file (a regular file or a block device) holds `slot_count` slots of
//! `slot_bytes` each, payload only. The index file starts with a 4 KiB superblock (magic,
//! version, slot size, slot count, checksum), then one 64-byte header per slot: magic, payload
//! length, write sequence number, the full BLAKE3 fingerprint, a reference count (for dedup
//! accounting) and a checksum of the header.
//!
//! In memory the index keeps about 31 bytes a slot: a 24-byte record (a 64-bit partial key,
//! u32 LRU links, length, state, copy mark and hit count packed in a u32, dedup references) and
//! an open-addressing table of u32 slot numbers at most 3/5 full. The full fingerprint is only
//! on disk: a false match of partial keys (about one in 2^64 a probe) fails the BLAKE3 check
//! every read makes, and the slot's header tells it from damage. Records are allocated for the
//! whole tier but filled from the low end, and a sparse index file's holes are skipped at open,
//! so a new tier costs neither RAM pages nor reads until it fills.
//!
//! The slot file is read and written with O_DIRECT when configured (the default) and the
//! filesystem allows: aligned buffers, lengths rounded up to 4 KiB within the slot.
//!
//! Crash safety comes from verification, not from ordering: every payload read is hashed and
//! compared with the fingerprint its header claims, so a torn write, a flipped bit, a truncated
//! file or a header that points at someone else's bytes is detected on read, counted, the slot
//! freed, and the caller reads the block again from its source. Recovery on open keeps every
//! header whose checksum holds and whose slot lies inside the slot file; duplicates keep the
//! highest sequence number; LRU order is rebuilt from the sequence numbers.
//!
//! Architecture invariant: nothing here returns bytes that do not hash to the fingerprint asked
//! for. All methods block (pread/pwrite); callers run them on a blocking pool, the writer
//! thread, or a runtime thread they have given up for it (`block_in_place`), never on a
//! runtime thread as is. The index lock is never held across I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use super::fingerprint::Fingerprint;

const SUPERBLOCK_BYTES: u64 = 4096;
const HEADER_BYTES: u64 = 64;
const SUPER_MAGIC: &[u8; 8] = b"SHDWIDX1";
const SLOT_MAGIC: &[u8; 4] = b"SCSL";
const FORMAT_VERSION: u32 = 1;
const NIL: u32 = u32::MAX;
/// Most slots a tier can have: slot numbers are `u32`, and `NIL` is not one.
pub const MAX_SLOTS: u32 = u32::MAX - 1;

/// Where and how big the SSD tier is.
#[derive(Debug, Clone)]
pub struct SsdConfig {
    /// The slot file or block device.
    pub data_path: PathBuf,
    /// The index file of slot headers.
    pub index_path: PathBuf,
    /// Bytes of slots; rounded down to whole slots.
    pub capacity_bytes: u64,
    /// Bytes per slot: the cache block size.
    pub slot_bytes: u32,
    /// Read and write slots with O_DIRECT, past the kernel's page cache: the RAM tier is the
    /// cache, and a host's RAM belongs to its VMs, not to a second copy of the SSD. Where the
    /// filesystem refuses it (tmpfs), the page cache is used and a warning says so.
    pub direct: bool,
}

/// Alignment of O_DIRECT buffers, offsets and lengths (the largest logical block size in use).
const DIRECT_ALIGN: usize = 4096;

/// A write failure injected at `slot` (fail point `ssd-slot-write`, its argument the slot):
/// tests of what a slot that cannot be written costs.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn injected_write_failure(slot: u32) -> io::Result<()> {
    fail::fail_point!(
        "ssd-slot-write",
        |arg| match arg.and_then(|a| a.parse::<u32>().ok()) {
            Some(s) if s == slot => Err(io::Error::other("injected ssd write failure")),
            _ => Ok(()),
        }
    );
    Ok(())
}

/// A zeroed buffer of `len` bytes (rounded up to [`DIRECT_ALIGN`]) at an aligned address: the
/// vector and where the aligned part starts. Safe code cannot ask the allocator for alignment,
/// so it allocates one alignment more and starts inside it.
fn aligned(len: usize) -> (Vec<u8>, usize, usize) {
    let padded = len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    let v = vec![0u8; padded + DIRECT_ALIGN];
    let start = (DIRECT_ALIGN - v.as_ptr().addr() % DIRECT_ALIGN) % DIRECT_ALIGN;
    (v, start, padded)
}

/// Why the SSD tier could not be opened at all (a damaged cache is salvaged, not an error).
#[derive(Debug, thiserror::Error)]
pub enum SsdError {
    /// The files could not be created, opened or sized.
    #[error("ssd tier {path}: {error}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error (in the message, not a separate cause: printed once).
        error: io::Error,
    },
    /// The files are not this tier's to use: another process holds them, or the slot file
    /// and the index are one file.
    #[error("ssd tier {path}: {why}")]
    Refused {
        /// The file involved.
        path: PathBuf,
        /// Why, in words.
        why: String,
    },
    /// The capacity holds no slot, or more than the index can address.
    #[error(
        "ssd tier capacity of {capacity_bytes} bytes is not 1..{max} slots of {slot_bytes} bytes"
    )]
    Capacity {
        /// Requested bytes.
        capacity_bytes: u64,
        /// Slot size.
        slot_bytes: u32,
        /// Largest slot count.
        max: u32,
    },
}

/// What `open` found on disk, for the log and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Entries recovered and served.
    pub recovered: u64,
    /// Headers whose checksum, magic or length did not hold.
    pub corrupt_headers: u64,
    /// Headers whose slot lies past the end of a truncated slot file.
    pub truncated: u64,
    /// Older copies of a fingerprint stored twice.
    pub duplicates: u64,
    /// The index was missing, unreadable or of another geometry, and the tier started empty.
    pub reset: bool,
}

/// A slot holding a fingerprint, as seen at lookup time.
#[derive(Debug, Clone, Copy)]
pub struct SlotRef {
    slot: u32,
    key: u64,
    len: u32,
    /// Dedup references recorded for the entry.
    pub refs: u32,
}

impl SlotRef {
    /// Payload length in bytes.
    pub fn len(&self) -> u64 {
        u64::from(self.len)
    }

    /// True for an empty payload (never stored; present for clippy's sake).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The result of reading a slot.
#[derive(Debug)]
pub enum SlotRead {
    /// The payload, verified against the fingerprint.
    Hit(Bytes),
    /// The payload did not verify; the slot has been freed and the failure counted.
    Corrupt,
    /// The slot was reused for another block while it was being read; a plain miss.
    Reassigned,
}

/// What [`SsdTier::reserve`] did with an entry RAM lets go.
#[derive(Debug)]
pub enum Reserve {
    /// A slot to write it to.
    Slot(Reservation),
    /// The tier already held it, and it is now the most recent entry there: as a copy kept
    /// since an SSD hit (`held` is `None`: only RAM's entry was counted), or as an entry of its
    /// own, with `held` references before (both tiers held it, as when a block was read
    /// while the index was still being read at start). Nothing to write.
    Stored {
        /// The references of the entry it held, when it was not a copy.
        held: Option<u32>,
    },
    /// No slot could be had: every slot is being written, or the index is still being read.
    Full,
}

impl Reserve {
    /// The slot, if one was given.
    pub fn slot(self) -> Option<Reservation> {
        match self {
            Reserve::Slot(r) => Some(r),
            _ => None,
        }
    }
}

/// A slot reserved for a block that the writer is about to write.
#[derive(Debug)]
pub struct Reservation {
    slot: u32,
    seq: u64,
    /// The entry evicted to make room, if any: (length, refs). Its fingerprint is not known
    /// in RAM (the index keeps partial keys), and nothing needs it: the entry lives nowhere
    /// else.
    pub evicted: Option<(u32, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free = 0,
    Writing = 1,
    Live = 2,
}

/// Largest payload a slot record can say (the config's largest block, 1 MiB, fits).
const LEN_MASK: u32 = (1 << 21) - 1;
const STATE_SHIFT: u32 = 21;
const COPY_BIT: u32 = 1 << 23;
const HITS_SHIFT: u32 = 24;

/// One slot's record in RAM: 24 bytes. The entry is named by a partial key (a keyed 64-bit hash
/// of its fingerprint); the full fingerprint lives only in the slot's header on disk. A false
/// match is caught by the BLAKE3 check on every read, and told from damage by that header.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    key: u64,
    prev: u32,
    next: u32,
    /// Payload length (bits 0..21), state (21..23), the copy mark (23) and the SSD hits served
    /// since the slot was written (24..32, saturating). The copy mark: the entry is back in
    /// RAM and this slot only keeps a copy of it, at the least recent end, the first slot
    /// reused, and a write saved if the entry is demoted before then.
    word: u32,
    refs: u32,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 24);

impl Slot {
    fn live(key: u64, len: u32, refs: u32) -> Self {
        debug_assert!(len <= LEN_MASK);
        Slot {
            key,
            prev: NIL,
            next: NIL,
            word: (len & LEN_MASK) | ((SlotState::Live as u32) << STATE_SHIFT),
            refs,
        }
    }

    fn writing() -> Self {
        Slot {
            word: (SlotState::Writing as u32) << STATE_SHIFT,
            ..Slot::default()
        }
    }

    fn len(&self) -> u32 {
        self.word & LEN_MASK
    }

    fn state(&self) -> SlotState {
        match (self.word >> STATE_SHIFT) & 3 {
            1 => SlotState::Writing,
            2 => SlotState::Live,
            _ => SlotState::Free,
        }
    }

    fn copy(&self) -> bool {
        self.word & COPY_BIT != 0
    }

    fn hits(&self) -> u8 {
        (self.word >> HITS_SHIFT) as u8
    }

    fn set_hits(&mut self, h: u8) {
        self.word = (self.word & !(0xFF << HITS_SHIFT)) | (u32::from(h) << HITS_SHIFT);
    }
}

/// Bytes of RAM the index of a tier of `slots` slots takes: its slot records and its table.
pub fn index_ram_bytes(slots: u64) -> u64 {
    slots * std::mem::size_of::<Slot>() as u64 + Table::cells(slots) * 4
}

/// The map from partial key to slot: open addressing with linear probing over slot numbers
/// (plus one; 0 is an empty cell), the keys read from the slot records, and backward-shift
/// deletion (no tombstones to pile up under a cache's churn). At most 3 cells in 5 are used,
/// so a miss probes about 3 cells: 4 bytes a cell, 6.7 bytes a slot.
struct Table {
    cells: Vec<u32>,
}

impl Table {
    fn new(slots: u32) -> Self {
        Table {
            cells: vec![0; Self::cells(u64::from(slots)) as usize],
        }
    }

    fn cells(slots: u64) -> u64 {
        slots * 5 / 3 + 1
    }

    fn home(&self, key: u64) -> usize {
        ((u128::from(key) * self.cells.len() as u128) >> 64) as usize
    }

    fn step(&self, i: usize) -> usize {
        if i + 1 == self.cells.len() { 0 } else { i + 1 }
    }

    fn find(&self, slots: &[Slot], key: u64) -> Option<u32> {
        let mut i = self.home(key);
        loop {
            let c = self.cells[i];
            if c == 0 {
                return None;
            }
            if slots[(c - 1) as usize].key == key {
                return Some(c - 1);
            }
            i = self.step(i);
        }
    }

    /// Adds slot `s` under `key` unless a slot with that key is there (then that slot): one
    /// probe where [`Self::find`] and [`Self::insert`] would take two.
    fn insert_or_find(&mut self, slots: &[Slot], key: u64, s: u32) -> Option<u32> {
        let mut i = self.home(key);
        loop {
            match self.cells[i] {
                0 => {
                    self.cells[i] = s + 1;
                    return None;
                }
                c if slots[(c - 1) as usize].key == key => return Some(c - 1),
                _ => i = self.step(i),
            }
        }
    }

    /// Puts slot `by` in the cell of slot `s` (the same key, so the same place).
    fn replace(&mut self, slots: &[Slot], s: u32, by: u32) {
        let mut i = self.home(slots[s as usize].key);
        while self.cells[i] != 0 {
            if self.cells[i] == s + 1 {
                self.cells[i] = by + 1;
                return;
            }
            i = self.step(i);
        }
        debug_assert!(false, "slot {s} is not in the table");
    }

    /// Removes slot `s`, whose record still holds its key.
    fn remove(&mut self, slots: &[Slot], s: u32) {
        let mut i = self.home(slots[s as usize].key);
        loop {
            match self.cells[i] {
                0 => {
                    debug_assert!(false, "slot {s} is not in the table");
                    return;
                }
                c if c == s + 1 => break,
                _ => i = self.step(i),
            }
        }
        // Backward shift: move later cells of the run into the hole when their home allows.
        let mut hole = i;
        let mut j = self.step(i);
        loop {
            let c = self.cells[j];
            if c == 0 {
                break;
            }
            let h = self.home(slots[(c - 1) as usize].key);
            // The cell at j may move to the hole if its home is not cyclically in (hole, j].
            let stays = if hole <= j {
                hole < h && h <= j
            } else {
                hole < h || h <= j
            };
            if !stays {
                self.cells[hole] = c;
                hole = j;
            }
            j = self.step(j);
        }
        self.cells[hole] = 0;
    }
}

/// The in-memory index: partial key -> slot, and the LRU list (head = most recent).
///
/// RAM: 24 bytes a slot record plus 6.7 bytes of table, about 31 bytes a slot. Records are
/// allocated (not touched) for the whole tier at open and filled from the low end: a new or
/// sparse tier costs RAM as it fills. Freed slots form a list through their `next` links.
struct Index {
    slots: Vec<Slot>,
    table: Table,
    head: u32,
    tail: u32,
    /// Freed slots, linked through `next`; slots from `slots.len()` on were never used.
    free: u32,
    capacity: u32,
    live: u64,
    live_bytes: u64,
    /// Live slots that only keep a copy of an entry back in RAM, and their bytes.
    copies: u64,
    copy_bytes: u64,
    next_seq: u64,
    /// Keys of the partial-key map: keyed so that chosen block contents cannot aim at one run
    /// of cells, and masked in tests to force false matches.
    salt: u64,
    key_mask: u64,
    /// Slots set aside after a failed write, until the next start.
    retired: u64,
}

/// The partial key of `fp`: fingerprint bytes 8..16 and 16..24 (the RAM tables use 0..8),
/// each mixed with a per-process key.
fn partial_key(fp: &Fingerprint, salt: u64, mask: u64) -> u64 {
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&fp.0[at..at + 8]);
        u64::from_le_bytes(w)
    };
    // Two words, each mixed under the key: of one word, two fingerprints whose bytes 8..16
    // were equal shared a key whatever the salt, and such a pair of block contents takes
    // about 2^32 hashes to find (found in review). Now a pair found without the key needs
    // 128 equal bits.
    let mix = super::fingerprint::mix64;
    (mix(word(8) ^ salt) ^ mix(word(16) ^ salt.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15)) & mask
}

impl Index {
    fn new(capacity: u32) -> Self {
        Index {
            slots: Vec::with_capacity(capacity as usize),
            table: Table::new(capacity),
            head: NIL,
            tail: NIL,
            free: NIL,
            capacity,
            live: 0,
            live_bytes: 0,
            copies: 0,
            copy_bytes: 0,
            next_seq: 0,
            salt: crate::hashing::key(0x55d_1d8),
            key_mask: u64::MAX,
            retired: 0,
        }
    }

    fn key(&self, fp: &Fingerprint) -> u64 {
        partial_key(fp, self.salt, self.key_mask)
    }

    /// Bytes the live entries stand for: each entry's length times its dedup references.
    fn logical_bytes(&self) -> u64 {
        self.slots
            .iter()
            .filter(|m| m.state() == SlotState::Live)
            .map(|m| u64::from(m.len()) * u64::from(m.refs))
            .fold(0u64, u64::saturating_add)
    }

    fn find(&self, fp: &Fingerprint) -> Option<u32> {
        self.table.find(&self.slots, self.key(fp))
    }

    fn slot(&mut self, s: u32) -> &mut Slot {
        &mut self.slots[s as usize]
    }

    fn unlink(&mut self, s: u32) {
        let (prev, next) = (self.slots[s as usize].prev, self.slots[s as usize].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.slot(prev).next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slot(next).prev = prev;
        }
        self.slot(s).prev = NIL;
        self.slot(s).next = NIL;
    }

    fn push_front(&mut self, s: u32) {
        let head = self.head;
        self.slot(s).prev = NIL;
        self.slot(s).next = head;
        if head != NIL {
            self.slot(head).prev = s;
        }
        self.head = s;
        if self.tail == NIL {
            self.tail = s;
        }
    }

    fn touch(&mut self, s: u32) {
        if self.head != s {
            self.unlink(s);
            self.push_front(s);
        }
    }

    fn push_back(&mut self, s: u32) {
        let tail = self.tail;
        self.slot(s).next = NIL;
        self.slot(s).prev = tail;
        if tail != NIL {
            self.slot(tail).next = s;
        }
        self.tail = s;
        if self.head == NIL {
            self.head = s;
        }
    }

    /// Sets or clears a live slot's copy mark, keeping the counts.
    fn mark_copy(&mut self, s: u32, copy: bool) {
        let m = self.slot(s);
        if m.copy() == copy {
            return;
        }
        m.word ^= COPY_BIT;
        let len = u64::from(m.len());
        if copy {
            self.copies += 1;
            self.copy_bytes += len;
        } else {
            self.copies -= 1;
            self.copy_bytes -= len;
        }
    }

    /// Whether slot `at` still holds the entry it held when `at` was looked up (not freed, not
    /// reused for another entry meanwhile).
    fn names(&self, at: SlotRef) -> bool {
        let m = &self.slots[at.slot as usize];
        m.state() == SlotState::Live && m.key == at.key
    }

    /// Makes slot `s` live for an entry: in the table and at the head of the list. False,
    /// and nothing changed, when the table already has an entry of that key.
    fn publish(&mut self, s: u32, slot: Slot) -> bool {
        if self
            .table
            .insert_or_find(&self.slots, slot.key, s)
            .is_some()
        {
            return false;
        }
        self.live += 1;
        self.live_bytes += u64::from(slot.len());
        self.slots[s as usize] = slot;
        self.push_front(s);
        true
    }

    /// Takes a free slot: a freed one, or the next never used. None when every slot is in use.
    fn take_free(&mut self) -> Option<u32> {
        if self.free != NIL {
            let s = self.free;
            self.free = self.slots[s as usize].next;
            return Some(s);
        }
        let n = self.slots.len();
        if n < self.capacity as usize {
            self.slots.push(Slot::default());
            return Some(n as u32);
        }
        None
    }

    /// Returns a slot that is not live (being written, or taken) to the free list.
    fn give_back(&mut self, s: u32) {
        let free = self.free;
        self.slots[s as usize] = Slot {
            next: free,
            ..Slot::default()
        };
        self.free = s;
    }

    /// Removes a live slot from table and list and returns it to the free list.
    fn release(&mut self, s: u32) {
        if self.slots[s as usize].state() == SlotState::Live {
            self.mark_copy(s, false);
            self.live -= 1;
            self.live_bytes -= u64::from(self.slots[s as usize].len());
            self.table.remove(&self.slots, s);
            self.unlink(s);
        }
        self.give_back(s);
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }
}

/// Opens (or creates) the slot file, with O_DIRECT when asked and the filesystem takes it.
/// Whether it did.
fn open_data(path: &Path, direct: bool) -> Result<(File, bool), SsdError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true).truncate(false);
    if direct {
        match o.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(path = %path.display(), "the filesystem of the ssd slot file refuses O_DIRECT; its reads and writes go through the page cache");
            }
            Err(e) => return Err(io_err(path)(e)),
        }
    }
    Ok((o.open(path).map_err(io_err(path))?, false))
}

/// The SSD tier. See the module docs for the layout and its guarantees.
pub struct SsdTier {
    data: File,
    /// The slot file is open with O_DIRECT: buffers, offsets and lengths are aligned.
    direct: bool,
    index_file: File,
    config: SsdConfig,
    slot_count: u32,
    index: Mutex<Index>,
    /// The index holds what the files held at open ([`SsdTier::load`]); until then it is
    /// empty and has no slot to give.
    loaded: AtomicBool,
}

/// What [`SsdTier::open_deferred`] leaves for [`SsdTier::load`]: the index's headers to read.
#[derive(Debug)]
pub struct PendingLoad {
    /// Header bytes of the index file to read; `None` when there is nothing to recover.
    have: Option<u64>,
    /// The slot file's length at open (a header past it is of a truncated slot).
    data_len: u64,
    /// Threads that read and check the headers.
    threads: usize,
    recovery: Recovery,
}

impl PendingLoad {
    /// Reads the headers on `threads` threads (every core by default, at most 16): fewer
    /// leave cores to a node that serves meanwhile.
    pub fn on_threads(mut self, threads: usize) -> PendingLoad {
        self.threads = threads.max(1);
        self
    }
}

impl std::fmt::Debug for SsdTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SsdTier")
            .field("data_path", &self.config.data_path)
            .field("slot_count", &self.slot_count)
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SsdError + '_ {
    move |error| SsdError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn check8(bytes: &[u8]) -> [u8; 8] {
    let h = blake3::hash(bytes);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.as_bytes()[..8]);
    out
}

fn encode_super(slot_bytes: u32, slot_count: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..8].copy_from_slice(SUPER_MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&slot_bytes.to_le_bytes());
    b[16..20].copy_from_slice(&slot_count.to_le_bytes());
    let c = check8(&b[0..20]);
    b[20..28].copy_from_slice(&c);
    b
}

/// Where slot `slot`'s header lies in the index file.
pub fn header_offset(slot: u32) -> u64 {
    SUPERBLOCK_BYTES + u64::from(slot) * HEADER_BYTES
}

/// The on-disk header of a slot holding `len` bytes of `fp`, written `seq`-th, with `refs`
/// dedup references: 64 bytes at [`header_offset`]. Public for tools and benchmarks that
/// build an index without writing payloads.
pub fn encode_header(
    fp: &Fingerprint,
    len: u32,
    seq: u64,
    refs: u32,
) -> [u8; HEADER_BYTES as usize] {
    let mut b = [0u8; HEADER_BYTES as usize];
    b[0..4].copy_from_slice(SLOT_MAGIC);
    b[4..8].copy_from_slice(&len.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..48].copy_from_slice(&fp.0);
    b[48..52].copy_from_slice(&refs.to_le_bytes());
    let c = check8(&b[0..56]);
    b[56..64].copy_from_slice(&c);
    b
}

enum Header {
    Empty,
    Corrupt,
    Valid {
        fp: Fingerprint,
        len: u32,
        seq: u64,
        refs: u32,
    },
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// The highest write sequence number a header may carry.
const MAX_SEQ: u64 = 1 << 62;

fn decode_header(b: &[u8], slot_bytes: u32) -> Header {
    if b.iter().all(|x| *x == 0) {
        return Header::Empty;
    }
    if &b[0..4] != SLOT_MAGIC || b[56..64] != check8(&b[0..56]) {
        return Header::Corrupt;
    }
    let len = le32(&b[4..8]);
    let seq = le64(&b[8..16]);
    // A sequence number no tier reaches (one write a nanosecond for 146 years): a forged or
    // damaged header, which would otherwise number every later write and wrap.
    if len == 0 || len > slot_bytes || seq > MAX_SEQ {
        return Header::Corrupt;
    }
    let mut fp = [0u8; 32];
    fp.copy_from_slice(&b[16..48]);
    Header::Valid {
        fp: Fingerprint(fp),
        len,
        seq,
        refs: le32(&b[48..52]).max(1),
    }
}

/// The byte ranges of `file` (from `from` to `end`) that may hold data: a sparse index's holes
/// read as zeros (empty slots), so they are skipped without reading. Where the filesystem
/// cannot say, the whole range.
fn data_ranges(file: &File, from: u64, end: u64) -> Vec<(u64, u64)> {
    use rustix::fs::{SeekFrom, seek};
    let mut out = Vec::new();
    let mut at = from;
    while at < end {
        let start = match seek(file, SeekFrom::Data(at)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => {
                out.push((at, end));
                break;
            }
        };
        if start >= end {
            break;
        }
        let stop = seek(file, SeekFrom::Hole(start)).unwrap_or(end).min(end);
        if stop <= start {
            // A filesystem that answers a hole where it just said data: read the rest.
            out.push((start, end));
            break;
        }
        out.push((start, stop));
        at = stop;
    }
    out
}

/// Slots whose headers one piece of the parallel read covers (64 MiB of headers).
const PIECE_SLOTS: usize = 1 << 20;

/// What one thread of the header read found.
#[derive(Default)]
struct Found {
    corrupt: u64,
    truncated: u64,
    /// The slots of those headers, to clear.
    truncated_slots: Vec<u32>,
    /// Lowest and highest write sequence numbers of the entries recovered.
    lo: u64,
    hi: u64,
    /// Highest write sequence number of any valid header.
    top: u64,
    live: u64,
    unreadable: bool,
}

/// Reads every header of the index file into the slot records (the sequence number of each
/// recovered slot kept in its not yet used list links), on `threads` threads (at most 16): checking a header is a
/// BLAKE3 hash, and a 4 TiB tier has 256 Mi of them. Where the file has holes (a sparse index)
/// nothing is read. Returns the lowest and highest sequence numbers of the entries recovered,
/// and the highest of any valid header.
fn read_headers(
    file: &File,
    index: &mut Index,
    slot_bytes: u32,
    data_len: u64,
    have: u64,
    threads: usize,
    rec: &mut Recovery,
) -> (u64, u64, u64) {
    let end = SUPERBLOCK_BYTES + have / HEADER_BYTES * HEADER_BYTES;
    let ranges = data_ranges(file, SUPERBLOCK_BYTES, end);
    let Some(&(_, last)) = ranges.last() else {
        return (u64::MAX, 0, 0);
    };
    let top = (last.min(end) - SUPERBLOCK_BYTES).div_ceil(HEADER_BYTES) as usize;
    index.slots.resize(top, Slot::default());
    let threads = threads.clamp(1, 16);
    let mut work: Vec<Vec<(usize, &mut [Slot])>> = (0..threads).map(|_| Vec::new()).collect();
    for (k, piece) in index.slots.chunks_mut(PIECE_SLOTS).enumerate() {
        work[k % threads].push((k * PIECE_SLOTS, piece));
    }
    let (salt, mask) = (index.salt, index.key_mask);
    let ranges = &ranges;
    let found: Vec<Found> = std::thread::scope(|sc| {
        let handles: Vec<_> = work
            .into_iter()
            .map(|pieces| {
                sc.spawn(move || {
                    let mut f = Found {
                        lo: u64::MAX,
                        ..Found::default()
                    };
                    let mut buf = vec![0u8; 1 << 20];
                    for (first, piece) in pieces {
                        read_piece(
                            file,
                            ranges,
                            first,
                            piece,
                            &mut buf,
                            slot_bytes,
                            data_len,
                            (salt, mask),
                            &mut f,
                        );
                    }
                    f
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or(Found {
                    lo: u64::MAX,
                    unreadable: true,
                    ..Found::default()
                })
            })
            .collect()
    });
    let (mut lo, mut hi, mut top) = (u64::MAX, 0, 0);
    for f in found {
        rec.corrupt_headers += f.corrupt;
        rec.truncated += f.truncated;
        // The slot file is sized again at open: cleared, these headers would name zeros as
        // live entries at the next start (found in review).
        for slot in f.truncated_slots {
            if let Err(e) = file.write_all_at(&[0u8; HEADER_BYTES as usize], header_offset(slot)) {
                tracing::warn!(error = %e, slot, "could not clear the header of a truncated slot");
            }
        }
        top = top.max(f.top);
        if f.live > 0 {
            lo = lo.min(f.lo);
            hi = hi.max(f.hi);
        }
        if f.unreadable {
            tracing::warn!("parts of the ssd index could not be read; their slots count as empty");
        }
    }
    (lo, hi, top)
}

/// Reads the headers of the slots `first..first + piece.len()` that lie in `ranges`.
#[allow(clippy::too_many_arguments)]
fn read_piece(
    file: &File,
    ranges: &[(u64, u64)],
    first: usize,
    piece: &mut [Slot],
    buf: &mut [u8],
    slot_bytes: u32,
    data_len: u64,
    (salt, mask): (u64, u64),
    f: &mut Found,
) {
    let lo = header_offset(first as u32);
    let hi = lo + piece.len() as u64 * HEADER_BYTES;
    // Read up to here: a chunk may run past the end of its range into the next.
    let mut done = lo;
    for &(start, stop) in ranges {
        // Whole headers only: ranges are page-aligned, headers 64 bytes.
        let mut at = start.max(done);
        at -= (at - SUPERBLOCK_BYTES) % HEADER_BYTES;
        at = at.max(done);
        let stop = stop.min(hi);
        while at < stop {
            let n = (buf.len() as u64).min(hi - at);
            let chunk = &mut buf[..n as usize];
            if let Err(e) = file.read_exact_at(chunk, at) {
                tracing::warn!(error = %e, offset = at, "ssd index unreadable here");
                f.unreadable = true;
                return;
            }
            let from = ((at - lo) / HEADER_BYTES) as usize;
            for (k, h) in chunk.chunks_exact(HEADER_BYTES as usize).enumerate() {
                let i = from + k;
                let slot = (first + i) as u64;
                match decode_header(h, slot_bytes) {
                    Header::Empty => {}
                    Header::Corrupt => f.corrupt += 1,
                    Header::Valid { fp, len, seq, refs } => {
                        // Every valid header's number counts, dropped or not: a later write
                        // must be numbered after it, or a stale header could win a restart.
                        f.top = f.top.max(seq);
                        if slot * u64::from(slot_bytes) + u64::from(len) > data_len {
                            f.truncated += 1;
                            f.truncated_slots.push(slot as u32);
                            continue;
                        }
                        let mut m = Slot::live(partial_key(&fp, salt, mask), len, refs);
                        // Until the list is built, the links hold the sequence number.
                        m.prev = seq as u32;
                        m.next = (seq >> 32) as u32;
                        piece[i] = m;
                        f.live += 1;
                        f.lo = f.lo.min(seq);
                        f.hi = f.hi.max(seq);
                    }
                }
            }
            at += n;
            done = at;
        }
    }
}

/// Puts recovered slots in the list by write order (the oldest at the tail) and in the table;
/// of two slots with one fingerprint the later write wins.
///
/// RAM while it runs: 8 bytes more per recovered entry (the sort order), on top of the index.
fn rebuild(index: &mut Index, (lo, hi, top): (u64, u64, u64), rec: &mut Recovery) {
    let seq = |m: &Slot| u64::from(m.prev) | (u64::from(m.next) << 32);
    index.next_seq = hi.max(top);
    // Sort by sequence number packed with the slot in one u64: exact while the live entries
    // span fewer than 2^32 writes, in steps of 2^shift writes beyond (then two copies of one
    // fingerprint are told apart below by their whole numbers).
    let shift = (64 - hi.saturating_sub(lo).leading_zeros()).saturating_sub(32);
    let mut order: Vec<u64> = index
        .slots
        .iter()
        .enumerate()
        .filter(|(_, m)| m.state() == SlotState::Live)
        .map(|(s, m)| ((seq(m).saturating_sub(lo) >> shift) << 32) | s as u64)
        .collect();
    order.sort_unstable();
    // The table first, while every record still holds its whole sequence number: of two
    // copies, the one written later stays.
    for packed in order.iter().rev() {
        let s = *packed as u32;
        let key = index.slots[s as usize].key;
        if let Some(other) = index.table.insert_or_find(&index.slots, key, s) {
            rec.duplicates += 1;
            let older = if seq(&index.slots[other as usize]) < seq(&index.slots[s as usize]) {
                index.table.replace(&index.slots, other, s);
                other
            } else {
                s
            };
            index.slots[older as usize] = Slot::default();
        }
    }
    // Then the list, newest at the head.
    for packed in order.iter().rev() {
        let s = *packed as u32;
        if index.slots[s as usize].state() != SlotState::Live {
            continue;
        }
        let m = &mut index.slots[s as usize];
        m.prev = NIL;
        m.next = NIL;
        index.live += 1;
        index.live_bytes += u64::from(m.len());
        index.push_back(s);
    }
    drop(order);
    // Free slots below the highest used one, lowest first out.
    for s in (0..index.slots.len() as u32).rev() {
        if index.slots[s as usize].state() == SlotState::Free {
            index.give_back(s);
        }
    }
}

impl SsdTier {
    /// Opens the tier, recovering what the files hold, or creates it empty.
    ///
    /// A missing, truncated or corrupted index or slot file never fails the open: what can be
    /// trusted is kept, the rest is dropped with a warning in the returned `Recovery`.
    pub fn open(config: SsdConfig) -> Result<(SsdTier, Recovery), SsdError> {
        let (tier, pending) = Self::open_deferred(config)?;
        let recovery = tier.load(pending, |_| {});
        Ok((tier, recovery))
    }

    /// Opens the files as [`Self::open`] does, but leaves reading the index's headers to
    /// [`Self::load`], which another thread may run while this tier is in use: until it
    /// returns, the tier holds nothing, finds nothing and takes nothing (a demotion is
    /// refused), so no write can land on a slot whose entry is still being recovered.
    pub fn open_deferred(config: SsdConfig) -> Result<(SsdTier, PendingLoad), SsdError> {
        let slot_bytes = u64::from(config.slot_bytes);
        let max_slots = MAX_SLOTS;
        let slots = config.capacity_bytes / slot_bytes.max(1);
        if slots == 0 || slots > u64::from(max_slots) || config.slot_bytes > LEN_MASK {
            return Err(SsdError::Capacity {
                capacity_bytes: config.capacity_bytes,
                slot_bytes: config.slot_bytes,
                max: max_slots,
            });
        }
        let mut slot_count = slots as u32;
        for p in [&config.data_path, &config.index_path] {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
        }
        // O_DIRECT needs slots on 4 KiB boundaries (the config's block sizes all are).
        let aligned_slots = (config.slot_bytes as usize).is_multiple_of(DIRECT_ALIGN);
        let (data, direct) = open_data(&config.data_path, config.direct && aligned_slots)?;
        let index_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&config.index_path)
            .map_err(io_err(&config.index_path))?;
        let data_meta = data.metadata().map_err(io_err(&config.data_path))?;
        {
            use std::os::unix::fs::MetadataExt;
            let index_meta = index_file.metadata().map_err(io_err(&config.index_path))?;
            if (data_meta.dev(), data_meta.ino()) == (index_meta.dev(), index_meta.ino()) {
                return Err(SsdError::Refused {
                    path: config.index_path.clone(),
                    why: format!(
                        "the index and the slot file ({}) are one file",
                        config.data_path.display()
                    ),
                });
            }
        }
        // Two processes writing one tier's slots would each serve what the other overwrote
        // as its own (caught by verification, but never freed) and reset each other's index.
        for (file, path) in [
            (&index_file, &config.index_path),
            (&data, &config.data_path),
        ] {
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(SsdError::Refused {
                        path: path.clone(),
                        why: "in use by another process (it holds the lock on it); two nodes \
                              cannot share an ssd tier"
                            .into(),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err(path)(e)),
            }
        }
        let is_regular = !data_meta.file_type().is_block_device();
        let data_len = if is_regular {
            data_meta.len()
        } else {
            // A block device: its size is where a seek to the end lands.
            use std::io::Seek;
            (&data)
                .seek(io::SeekFrom::End(0))
                .map_err(io_err(&config.data_path))?
        };
        if !is_regular {
            // A block device cannot grow: the tier is at most the device.
            let fits = (data_len / slot_bytes).min(u64::from(max_slots)) as u32;
            if fits < slot_count {
                tracing::warn!(device = %config.data_path.display(), slots = fits, "ssd device is smaller than the configured ssd size; using the whole device");
                slot_count = fits;
            }
            if slot_count == 0 {
                return Err(SsdError::Capacity {
                    capacity_bytes: data_len,
                    slot_bytes: config.slot_bytes,
                    max: max_slots,
                });
            }
        }
        let index_len = index_file
            .metadata()
            .map_err(io_err(&config.index_path))?
            .len();

        let mut recovery = Recovery::default();
        let expected_super = encode_super(config.slot_bytes, slot_count);
        let mut super_buf = [0u8; 28];
        let super_ok = index_len >= SUPERBLOCK_BYTES
            && index_file.read_exact_at(&mut super_buf, 0).is_ok()
            && super_buf == expected_super;

        let mut have = None;
        if !super_ok {
            if index_len > 0 {
                tracing::warn!(
                    index = %config.index_path.display(),
                    "ssd index is missing, corrupt or of another geometry (slot size or capacity changed); starting with an empty ssd tier"
                );
                recovery.reset = true;
            }
            index_file.set_len(0).map_err(io_err(&config.index_path))?;
            index_file
                .write_all_at(&expected_super, 0)
                .map_err(io_err(&config.index_path))?;
        } else {
            let want = u64::from(slot_count) * HEADER_BYTES;
            let got = index_len.saturating_sub(SUPERBLOCK_BYTES).min(want);
            if got < want {
                tracing::warn!(
                    index = %config.index_path.display(),
                    have = got, want, "ssd index is truncated; the missing headers count as empty slots"
                );
            }
            have = Some(got);
        }
        // Sized before the headers are read: a header past `data_len` (the length at open) is
        // of a truncated slot whatever the file's length now, and headers past `have` are not
        // read.
        if is_regular && data_len != u64::from(slot_count) * slot_bytes {
            data.set_len(u64::from(slot_count) * slot_bytes)
                .map_err(io_err(&config.data_path))?;
        }
        index_file
            .set_len(SUPERBLOCK_BYTES + u64::from(slot_count) * HEADER_BYTES)
            .map_err(io_err(&config.index_path))?;
        // While headers wait to be read, an index of no slots: nothing found, nothing taken.
        let index = Index::new(if have.is_some() { 0 } else { slot_count });
        Ok((
            SsdTier {
                data,
                direct,
                index_file,
                config,
                slot_count,
                index: Mutex::new(index),
                loaded: AtomicBool::new(have.is_none()),
            },
            PendingLoad {
                have,
                data_len,
                threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
                recovery,
            },
        ))
    }

    /// Reads the index's headers that [`Self::open_deferred`] left, and from then on serves
    /// what they recover. Blocks for as long as that takes (seconds for millions of entries).
    /// `counted` is given the bytes the recovered entries stand for (each one's length times
    /// its references) just before they become visible, so that a caller keeping a total
    /// counts them before any of them can be evicted. What was recovered and what was
    /// dropped.
    pub fn load(&self, pending: PendingLoad, counted: impl FnOnce(u64)) -> Recovery {
        /// Marks the index read when `load` ends, by a panic too: then with an empty index of
        /// every slot, so that the tier starts empty instead of holding nothing for ever.
        struct End<'a>(&'a SsdTier);
        impl Drop for End<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    tracing::error!(
                        "reading the ssd index failed (a bug: the panic is above); the ssd tier starts empty"
                    );
                    *self.0.index.lock() = Index::new(self.0.slot_count);
                }
                self.0.loaded.store(true, Ordering::Release);
            }
        }
        let _end = End(self);
        let PendingLoad {
            have,
            data_len,
            threads,
            mut recovery,
        } = pending;
        if let Some(have) = have {
            let mut index = Index::new(self.slot_count);
            let seqs = read_headers(
                &self.index_file,
                &mut index,
                self.config.slot_bytes,
                data_len,
                have,
                threads,
                &mut recovery,
            );
            rebuild(&mut index, seqs, &mut recovery);
            if recovery.corrupt_headers + recovery.truncated > 0 {
                tracing::warn!(
                    corrupt_headers = recovery.corrupt_headers,
                    truncated = recovery.truncated,
                    "ssd tier partly salvaged; damaged entries dropped"
                );
            }
            recovery.recovered = index.live;
            fail::fail_point!("ssd-load-before-swap");
            counted(index.logical_bytes());
            *self.index.lock() = index;
        } else {
            counted(0);
        }
        recovery
    }

    /// Whether the index holds what the files held at open ([`Self::load`] has run).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Slots in the tier.
    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }

    /// Capacity in bytes (whole slots).
    pub fn capacity_bytes(&self) -> u64 {
        u64::from(self.slot_count) * u64::from(self.config.slot_bytes)
    }

    /// Entries and payload bytes held now.
    ///
    /// Slots that only keep a copy of an entry back in RAM are not counted: the entry lives in
    /// RAM, and the slot is the first one reused.
    pub fn usage(&self) -> (u64, u64) {
        let ix = self.index.lock();
        (ix.live - ix.copies, ix.live_bytes - ix.copy_bytes)
    }

    /// Counts an SSD hit on the slot `at` names; the hits it had before this one.
    pub fn count_hit(&self, at: SlotRef) -> u8 {
        let mut ix = self.index.lock();
        if ix.names(at) {
            let m = ix.slot(at.slot);
            let h = m.hits();
            m.set_hits(h.saturating_add(1));
            h
        } else {
            0
        }
    }

    /// Keeps the slot `at` names as a copy of an entry that an SSD hit took back to RAM: it
    /// moves to the least recent end, so it is the first slot reused, and if the entry is
    /// demoted again before that, [`Self::reserve`] finds it and nothing is written. Whether
    /// the slot was still the one `at` names.
    pub fn keep_copy(&self, at: SlotRef) -> bool {
        let mut ix = self.index.lock();
        if ix.names(at) {
            // At the least recent end: kept at its place, or at the top, a copy holds a slot
            // another entry could use (on P2's tier replay that cost 2.1 and 3.2 points).
            ix.unlink(at.slot);
            ix.push_back(at.slot);
            ix.mark_copy(at.slot, true);
            true
        } else {
            false
        }
    }

    /// If a slot keeps a copy of `fp`, makes it the entry's home again (most recently used):
    /// the entry is leaving RAM, and its bytes are already here. Whether there was one.
    pub fn adopt(&self, fp: &Fingerprint, refs: u32) -> bool {
        let mut ix = self.index.lock();
        let Some(s) = ix.find(fp) else {
            return false;
        };
        if !ix.slots[s as usize].copy() {
            return false;
        }
        ix.mark_copy(s, false);
        ix.touch(s);
        let m = ix.slot(s);
        m.refs = refs.max(m.refs);
        true
    }

    /// Bytes the live entries stand for: each entry's length times its dedup references
    /// (tests: it walks every slot under the index lock).
    #[cfg(test)]
    fn logical_bytes(&self) -> u64 {
        self.index.lock().logical_bytes()
    }

    /// True when the fingerprint has a live slot (by partial key: a false match, about one in
    /// 2^64 per look, answers yes).
    pub fn contains(&self, fp: &Fingerprint) -> bool {
        self.index.lock().find(fp).is_some()
    }

    /// Finds the slot of `fp` and makes it the most recently used.
    pub fn lookup(&self, fp: &Fingerprint) -> Option<SlotRef> {
        let mut ix = self.index.lock();
        let s = ix.find(fp)?;
        ix.touch(s);
        let m = &ix.slots[s as usize];
        Some(SlotRef {
            slot: s,
            key: m.key,
            len: m.len(),
            refs: m.refs,
        })
    }

    /// Reads and verifies a slot found by `lookup`. Blocks.
    ///
    /// With O_DIRECT the bytes come in an aligned buffer one alignment (4 KiB) larger than the
    /// payload, which the returned `Bytes` keeps: callers that hold a hit for long (in RAM)
    /// copy it first.
    pub fn read(&self, fp: &Fingerprint, at: SlotRef) -> SlotRead {
        let len = at.len as usize;
        let (mut buf, start, padded) = if self.direct {
            aligned(len)
        } else {
            (vec![0u8; len], 0, len)
        };
        let offset = u64::from(at.slot) * u64::from(self.config.slot_bytes);
        let read_ok = match self
            .data
            .read_exact_at(&mut buf[start..start + padded], offset)
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(slot = at.slot, error = %e, "ssd slot read failed");
                false
            }
        };
        if read_ok && fp.matches(&buf[start..start + len]) {
            return SlotRead::Hit(Bytes::from(buf).slice(start..start + len));
        }
        // Tell a damaged slot from one reused while we read it, and from another entry whose
        // partial key is the same (its header, written with its payload, names it).
        if !self.index.lock().names(at) {
            return SlotRead::Reassigned;
        }
        if let Some(other) = self.header_names_other(at.slot, fp) {
            tracing::debug!(slot = at.slot, fingerprint = %fp, holder = %other, "ssd partial key matched another entry");
            return SlotRead::Reassigned;
        }
        let mut ix = self.index.lock();
        if !ix.names(at) {
            return SlotRead::Reassigned;
        }
        ix.release(at.slot);
        drop(ix);
        // The header is left alone: clearing it here could race with the writer reusing the
        // slot, and a stale header is harmless (verification catches it again after a restart).
        tracing::warn!(slot = at.slot, fingerprint = %fp, "ssd slot failed verification; dropped");
        SlotRead::Corrupt
    }

    /// The fingerprint a slot's header names, when it is valid and not `fp`.
    fn header_names_other(&self, slot: u32, fp: &Fingerprint) -> Option<Fingerprint> {
        let mut h = [0u8; HEADER_BYTES as usize];
        self.index_file
            .read_exact_at(&mut h, header_offset(slot))
            .ok()?;
        match decode_header(&h, self.config.slot_bytes) {
            Header::Valid { fp: other, .. } if other != *fp => Some(other),
            _ => None,
        }
    }

    /// Reserves a slot for a new entry: a free one, or the least recently used one, evicted
    /// ([`Reserve::Slot`]). [`Reserve::Stored`] when `fp` is already stored (it is touched
    /// instead), [`Reserve::Full`] when no slot can be had.
    pub fn reserve(&self, fp: &Fingerprint, refs: u32) -> Reserve {
        let mut ix = self.index.lock();
        if let Some(s) = ix.find(fp) {
            let was_copy = ix.slots[s as usize].copy();
            ix.mark_copy(s, false);
            ix.touch(s);
            let m = ix.slot(s);
            let held = (!was_copy).then_some(m.refs);
            m.refs = refs.max(m.refs);
            return Reserve::Stored { held };
        }
        let mut evicted = None;
        let slot = match ix.take_free() {
            Some(s) => s,
            None => {
                let victim = ix.tail;
                if victim == NIL {
                    // Every slot is being written right now (or the index is still being
                    // read and has none); nothing to evict.
                    return Reserve::Full;
                }
                let m = ix.slots[victim as usize];
                // A copy's entry lives in RAM: reusing its slot evicts nothing.
                if !m.copy() {
                    evicted = Some((m.len(), m.refs));
                }
                ix.release(victim);
                let taken = ix.take_free();
                debug_assert_eq!(taken, Some(victim));
                victim
            }
        };
        let seq = ix.seq();
        *ix.slot(slot) = Slot::writing();
        Reserve::Slot(Reservation { slot, seq, evicted })
    }

    /// Writes `bytes` (which must hash to `fp`) into a reserved slot, then publishes it. Blocks.
    pub fn write(
        &self,
        r: Reservation,
        fp: Fingerprint,
        bytes: &[u8],
        refs: u32,
    ) -> io::Result<()> {
        if bytes.is_empty() || bytes.len() > self.config.slot_bytes as usize {
            self.index.lock().give_back(r.slot);
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a payload of {} bytes does not fit a slot of {}",
                    bytes.len(),
                    self.config.slot_bytes
                ),
            ));
        }
        let len = bytes.len() as u32;
        let offset = u64::from(r.slot) * u64::from(self.config.slot_bytes);
        let written = if self.direct {
            // The payload into an aligned buffer, zeros after it to the alignment.
            let (mut buf, start, padded) = aligned(bytes.len());
            buf[start..start + bytes.len()].copy_from_slice(bytes);
            self.data.write_all_at(&buf[start..start + padded], offset)
        } else {
            self.data.write_all_at(bytes, offset)
        };
        let res = written
            .and_then(|()| injected_write_failure(r.slot))
            .and_then(|()| {
                self.index_file
                    .write_all_at(&encode_header(&fp, len, r.seq, refs), header_offset(r.slot))
            });
        let mut ix = self.index.lock();
        if let Err(e) = res {
            // Set aside until the next start, not handed out again: the free list gives the
            // slot freed last first, so a slot that cannot be written (a bad sector, a sparse
            // file's hole on a full filesystem) failed every later demotion.
            ix.retired += 1;
            return Err(e);
        }
        let key = ix.key(&fp);
        if !ix.publish(r.slot, Slot::live(key, len, refs)) {
            // Another writer stored the same block meanwhile; keep theirs.
            ix.give_back(r.slot);
        }
        Ok(())
    }

    /// Slots set aside after a failed write, until the next start.
    pub fn retired_slots(&self) -> u64 {
        self.index.lock().retired
    }

    /// Makes the slot and index files durable (clean shutdown). Headers were written with
    /// their payloads; dedup references gained later are not saved (they only feed accounting).
    pub fn sync(&self) -> io::Result<()> {
        self.data.sync_data()?;
        self.index_file.sync_data()
    }

    /// Fingerprints in LRU order, most recent first (tests and diagnostics). RAM holds only
    /// partial keys: the fingerprints are read from the slots' headers.
    pub fn lru_order(&self) -> io::Result<Vec<Fingerprint>> {
        let slots = {
            let ix = self.index.lock();
            let mut out = Vec::with_capacity(ix.live as usize);
            let mut s = ix.head;
            while s != NIL {
                out.push(s);
                s = ix.slots[s as usize].next;
            }
            out
        };
        let mut out = Vec::with_capacity(slots.len());
        for s in slots {
            let mut h = [0u8; HEADER_BYTES as usize];
            self.index_file.read_exact_at(&mut h, header_offset(s))?;
            match decode_header(&h, self.config.slot_bytes) {
                Header::Valid { fp, .. } => out.push(fp),
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the header of live slot {s} does not hold"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Whether slots are read and written with O_DIRECT (past the page cache).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The slot file's path.
    pub fn data_path(&self) -> &Path {
        &self.config.data_path
    }

    /// Byte offset of the payload of `fp` in the slot file (tests that damage it).
    pub fn payload_offset(&self, fp: &Fingerprint) -> Option<u64> {
        let ix = self.index.lock();
        ix.find(fp)
            .map(|s| u64::from(s) * u64::from(self.config.slot_bytes))
    }

    /// The slot that holds `fp` (tests that damage its header).
    #[cfg(test)]
    fn slot_of(&self, fp: &Fingerprint) -> Option<u32> {
        self.index.lock().find(fp)
    }

    /// Keeps only `bits` of every partial key, so that tests meet false matches.
    #[cfg(test)]
    fn shorten_keys(&self, bits: u32) {
        let mut ix = self.index.lock();
        assert_eq!(ix.live, 0, "keys are shortened on an empty tier");
        ix.key_mask = (1u64 << bits) - 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, slots: u64) -> SsdConfig {
        SsdConfig {
            data_path: dir.join("cache.slots"),
            index_path: dir.join("cache.index"),
            capacity_bytes: slots * 4096,
            slot_bytes: 4096,
            direct: true,
        }
    }

    fn block(tag: u8) -> Vec<u8> {
        vec![tag; 4096]
    }

    fn put(t: &SsdTier, bytes: &[u8]) -> Fingerprint {
        let fp = Fingerprint::of(bytes);
        if let Some(r) = t.reserve(&fp, 1).slot() {
            t.write(r, fp, bytes, 1).expect("write");
        }
        fp
    }

    fn get(t: &SsdTier, fp: &Fingerprint) -> Option<Bytes> {
        let at = t.lookup(fp)?;
        match t.read(fp, at) {
            SlotRead::Hit(b) => Some(b),
            _ => None,
        }
    }

    /// Blocks 1 and 2 written, in that order, to a tier of 4 slots in `dir`, made durable, and
    /// the tier closed: their fingerprints.
    fn two_stored(dir: &Path) -> (Fingerprint, Fingerprint) {
        let (t, _) = SsdTier::open(cfg(dir, 4)).expect("open");
        let a = put(&t, &block(1));
        let b = put(&t, &block(2));
        t.sync().expect("sync");
        (a, b)
    }

    /// Found in review: a slot whose write failed went back to the head of the free list, so
    /// the next demotion took it and failed too, and so on: one bad slot stopped every SSD
    /// write until a restart. Now it is set aside.
    #[cfg(feature = "failpoints")]
    #[test]
    fn a_slot_that_cannot_be_written_is_set_aside_and_the_others_are_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, _) = SsdTier::open(cfg(dir.path(), 4)).expect("open");
        fail::cfg("ssd-slot-write", "return(0)").expect("fail point");
        let a = Fingerprint::of(&block(1));
        let r = t.reserve(&a, 1).slot().expect("a slot");
        assert!(t.write(r, a, &block(1), 1).is_err(), "slot 0 fails");
        let stored: Vec<Fingerprint> = (2..=4).map(|tag| put(&t, &block(tag))).collect();
        fail::cfg("ssd-slot-write", "off").expect("fail point");
        for (fp, tag) in stored.iter().zip(2..) {
            assert_eq!(get(&t, fp).as_deref(), Some(&block(tag)[..]), "block {tag}");
        }
        assert!(!t.contains(&a));
        assert_eq!(t.retired_slots(), 1);
        assert_eq!(
            t.usage(),
            (3, 3 * 4096),
            "three slots of four in use, one set aside"
        );
    }

    /// Found in review: fingerprints equal in bytes 8..16 had one partial key whatever the
    /// salt, and block contents giving such a pair take about 2^32 hashes to find.
    #[test]
    fn fingerprints_equal_in_one_word_have_different_partial_keys() {
        let a = Fingerprint([1u8; 32]);
        let mut b = a;
        b.0[20] ^= 1;
        for salt in [0, 1, 0xdead_beef, u64::MAX] {
            assert_ne!(
                partial_key(&a, salt, u64::MAX),
                partial_key(&b, salt, u64::MAX)
            );
        }
        let mut c = a;
        c.0[0] ^= 1;
        assert_eq!(
            partial_key(&a, 7, u64::MAX),
            partial_key(&c, 7, u64::MAX),
            "bytes 0..8 are the RAM tables'"
        );
    }

    /// Found in review: a header's sequence number near 2^64 (forged: the checksum is not
    /// keyed) numbered every later write, which then wrapped. Such a header is corrupt.
    #[test]
    fn a_header_with_an_impossible_sequence_number_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = two_stored(dir.path());
        {
            let (t, _) = SsdTier::open(cfg(dir.path(), 4)).expect("open");
            let slot = t.lookup(&b).expect("b").slot;
            let f = OpenOptions::new()
                .write(true)
                .open(dir.path().join("cache.index"))
                .expect("index");
            f.write_all_at(
                &encode_header(&b, 4096, u64::MAX - 1, 1),
                header_offset(slot),
            )
            .expect("forge");
        }
        let (t, rec) = SsdTier::open(cfg(dir.path(), 4)).expect("reopen");
        assert_eq!((rec.recovered, rec.corrupt_headers), (1, 1));
        assert!(get(&t, &a).is_some() && !t.contains(&b));
        let c = put(&t, &block(3));
        drop(t);
        let (t, rec) = SsdTier::open(cfg(dir.path(), 4)).expect("reopen again");
        assert_eq!(rec.recovered, 2);
        // Written after a, numbered after it: the most recent.
        assert_eq!(t.lru_order().expect("lru")[0], c);
    }

    #[test]
    fn a_full_tier_evicts_its_least_recently_used_slot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, _) = SsdTier::open(cfg(dir.path(), 3)).expect("open");
        let a = put(&t, &block(1));
        let b = put(&t, &block(2));
        let c = put(&t, &block(3));
        assert!(get(&t, &a).is_some()); // a is now the most recent; b is the oldest
        let d = put(&t, &block(4));
        assert!(!t.contains(&b));
        assert_eq!(t.lru_order().expect("lru"), vec![d, a, c]);
        assert_eq!(t.usage(), (3, 3 * 4096));
    }

    #[test]
    fn a_deferred_open_holds_and_takes_nothing_until_its_index_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = two_stored(dir.path());
        let (t, pending) = SsdTier::open_deferred(cfg(dir.path(), 4)).expect("reopen");
        assert!(!t.is_loaded());
        // Nothing found, nothing counted, and a demotion refused: a write now could land on
        // a slot whose entry is still to be recovered.
        assert!(t.lookup(&a).is_none() && !t.contains(&b));
        assert_eq!(t.usage(), (0, 0));
        assert_eq!(t.logical_bytes(), 0);
        let c = Fingerprint::of(&block(3));
        assert!(
            matches!(t.reserve(&c, 1), Reserve::Full),
            "a slot was given while loading"
        );
        assert!(!t.adopt(&a, 1));
        let mut counted = None;
        let rec = t.load(pending, |b| counted = Some(b));
        assert_eq!(counted, Some(2 * 4096), "the recovered entries' bytes");
        assert!(t.is_loaded());
        assert_eq!(rec.recovered, 2);
        assert_eq!(get(&t, &a).as_deref(), Some(&block(1)[..]));
        assert_eq!(get(&t, &b).as_deref(), Some(&block(2)[..]));
        assert_eq!(t.usage(), (2, 2 * 4096));
        // And it takes writes again, beside what it recovered.
        let c = put(&t, &block(3));
        assert_eq!(get(&t, &c).as_deref(), Some(&block(3)[..]));
        assert_eq!(t.lru_order().expect("lru"), vec![c, b, a]);

        // A tier with nothing to recover is ready at once.
        let fresh = tempfile::tempdir().expect("tempdir");
        let (t, pending) = SsdTier::open_deferred(cfg(fresh.path(), 4)).expect("open");
        assert!(t.is_loaded());
        let d = put(&t, &block(4));
        assert_eq!(t.load(pending, |_| {}).recovered, 0);
        assert_eq!(get(&t, &d).as_deref(), Some(&block(4)[..]));
    }

    #[test]
    fn entries_survive_a_reopen_in_write_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = two_stored(dir.path());
        let (t, rec) = SsdTier::open(cfg(dir.path(), 4)).expect("reopen");
        assert_eq!(rec.recovered, 2);
        assert_eq!(get(&t, &a).as_deref(), Some(&block(1)[..]));
        assert_eq!(t.lru_order().expect("lru"), vec![a, b]);
    }

    #[test]
    fn a_flipped_payload_byte_is_caught_and_the_slot_freed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, _) = SsdTier::open(cfg(dir.path(), 4)).expect("open");
        let a = put(&t, &block(7));
        let off = t.payload_offset(&a).expect("offset");
        let f = OpenOptions::new()
            .write(true)
            .open(t.data_path())
            .expect("open slots");
        f.write_all_at(&[8], off + 100).expect("flip");
        let at = t.lookup(&a).expect("lookup");
        assert!(matches!(t.read(&a, at), SlotRead::Corrupt));
        assert!(!t.contains(&a));
        assert_eq!(t.usage(), (0, 0));
    }

    #[test]
    fn a_truncated_slot_file_keeps_only_what_it_still_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (t, _) = SsdTier::open(cfg(dir.path(), 4)).expect("open");
            for tag in 1..=4 {
                put(&t, &block(tag));
            }
            t.sync().expect("sync");
        }
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("cache.slots"))
            .expect("open");
        f.set_len(2 * 4096 + 10).expect("truncate");
        let (t, rec) = SsdTier::open(cfg(dir.path(), 4)).expect("reopen");
        assert_eq!(rec.recovered, 2);
        assert_eq!(rec.truncated, 2);
        for fp in t.lru_order().expect("lru") {
            assert!(get(&t, &fp).is_some());
        }
        // Found in review: the open sized the slot file again, so at the next start the
        // truncated slots' headers named zeros as live entries. They were cleared.
        drop(t);
        let (t, rec) = SsdTier::open(cfg(dir.path(), 4)).expect("reopen again");
        assert_eq!((rec.recovered, rec.truncated), (2, 0));
        assert_eq!(t.usage(), (2, 2 * 4096));
        for fp in t.lru_order().expect("lru") {
            assert!(get(&t, &fp).is_some());
        }
    }

    #[test]
    fn garbage_in_the_index_gives_a_clean_or_salvaged_tier() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = {
            let (t, _) = SsdTier::open(cfg(dir.path(), 4)).expect("open");
            let a = put(&t, &block(1));
            put(&t, &block(2));
            t.sync().expect("sync");
            a
        };
        // Damage the second header only: the first entry is salvaged.
        let idx = OpenOptions::new()
            .write(true)
            .open(dir.path().join("cache.index"))
            .expect("open");
        let second = {
            let (t, _) = SsdTier::open(cfg(dir.path(), 4)).expect("open");
            t.slot_of(&Fingerprint::of(&block(2))).expect("2 is stored")
        };
        idx.write_all_at(
            &[0xAB; 20],
            SUPERBLOCK_BYTES + u64::from(second) * HEADER_BYTES + 10,
        )
        .expect("damage");
        let (t, rec) = SsdTier::open(cfg(dir.path(), 4)).expect("reopen");
        assert_eq!((rec.recovered, rec.corrupt_headers), (1, 1));
        assert!(get(&t, &a).is_some());
        drop(t);
        // Destroy the superblock: the tier starts clean.
        idx.write_all_at(&[0xFF; 64], 0).expect("damage");
        let (t, rec) = SsdTier::open(cfg(dir.path(), 4)).expect("reopen");
        assert!(rec.reset);
        assert_eq!(t.usage(), (0, 0));
    }

    #[test]
    fn a_header_pointing_at_other_bytes_is_never_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, _) = SsdTier::open(cfg(dir.path(), 2)).expect("open");
        let a = put(&t, &block(1));
        let b = put(&t, &block(2));
        // Swap the payloads behind the index's back.
        let f = OpenOptions::new()
            .write(true)
            .open(t.data_path())
            .expect("open");
        f.write_all_at(&block(2), t.payload_offset(&a).expect("a"))
            .expect("w");
        f.write_all_at(&block(1), t.payload_offset(&b).expect("b"))
            .expect("w");
        assert!(get(&t, &a).is_none());
        assert!(get(&t, &b).is_none());
    }

    #[test]
    fn partial_keys_that_collide_give_misses_never_wrong_bytes_or_lost_neighbours() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, _) = SsdTier::open(cfg(dir.path(), 16)).expect("open");
        // Two key bits: 4 keys for 12 blocks, so most lookups meet another entry's slot.
        t.shorten_keys(2);
        let fps: Vec<Fingerprint> = (1..=12).map(|tag| put(&t, &block(tag))).collect();
        let mut hits = 0;
        for (i, fp) in fps.iter().enumerate() {
            let Some(at) = t.lookup(fp) else { continue };
            match t.read(fp, at) {
                SlotRead::Hit(b) => {
                    assert_eq!(&b[..], &block(i as u8 + 1)[..], "block {i}");
                    hits += 1;
                }
                SlotRead::Reassigned => {}
                SlotRead::Corrupt => panic!("a false match was taken for damage (block {i})"),
            }
        }
        // One entry per key was stored (a second one with the same key counted as stored), and
        // every entry stored is still read: no false match freed its slot.
        let (entries, _) = t.usage();
        assert_eq!(hits, entries as usize);
        assert!((1..=4).contains(&entries), "{entries}");
        for fp in t.lru_order().expect("lru") {
            assert!(get(&t, &fp).is_some());
        }
    }

    #[test]
    fn a_sparse_index_is_read_where_it_holds_data_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        // 1 Mi slots of 4 KiB (a 4 GiB sparse slot file, a 64 MiB sparse index).
        let slots = 1 << 20;
        let far = slots - 3;
        let a = {
            let (t, rec) = SsdTier::open(cfg(dir.path(), slots)).expect("open");
            assert_eq!(rec, Recovery::default());
            let a = put(&t, &block(1));
            put(&t, &block(2));
            t.sync().expect("sync");
            a
        };
        // Move a's header and payload to a slot far past a hole (a later write of it).
        let idx = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("cache.index"))
            .expect("index");
        let mut h = [0u8; HEADER_BYTES as usize];
        idx.read_exact_at(&mut h, SUPERBLOCK_BYTES).expect("header");
        let Header::Valid { fp, len, seq, refs } = decode_header(&h, 4096) else {
            panic!("slot 0 holds a");
        };
        assert_eq!(fp, a);
        idx.write_all_at(
            &encode_header(&fp, len, seq + 10, refs),
            SUPERBLOCK_BYTES + far * HEADER_BYTES,
        )
        .expect("far header");
        let data = OpenOptions::new()
            .write(true)
            .open(dir.path().join("cache.slots"))
            .expect("slots");
        data.write_all_at(&block(1), far * 4096)
            .expect("far payload");
        drop((idx, data));
        let ranges = data_ranges(
            &File::open(dir.path().join("cache.index")).expect("index"),
            SUPERBLOCK_BYTES,
            SUPERBLOCK_BYTES + slots * HEADER_BYTES,
        );
        let covered: u64 = ranges.iter().map(|(a, b)| b - a).sum();
        assert!(
            covered < 1 << 20,
            "a 64 MiB index with two pages of data was read for {covered} bytes: {ranges:?}"
        );
        let (t, rec) = SsdTier::open(cfg(dir.path(), slots)).expect("reopen");
        assert_eq!((rec.recovered, rec.duplicates), (2, 1));
        assert_eq!(
            t.payload_offset(&a),
            Some(far * 4096),
            "the later write wins"
        );
        assert_eq!(get(&t, &a).as_deref(), Some(&block(1)[..]));
        assert_eq!(
            t.lru_order().expect("lru")[0],
            a,
            "the later write is the most recent"
        );
        // The slot the older copy held is free again, and the first one reused.
        let c = put(&t, &block(3));
        assert_eq!(t.payload_offset(&c), Some(0));
    }

    #[test]
    fn payloads_of_any_length_round_trip_past_the_page_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = cfg(dir.path(), 4);
        c.slot_bytes = 8192;
        c.capacity_bytes = 4 * 8192;
        let (t, _) = SsdTier::open(c.clone()).expect("open");
        // O_DIRECT needs aligned buffers, offsets and lengths: lengths that are not a multiple
        // of 4 KiB, and one of a whole slot.
        let payloads: Vec<Vec<u8>> = [1usize, 5000, 4096, 8192]
            .iter()
            .map(|n| (0..*n).map(|i| (i % 251) as u8 + 1).collect())
            .collect();
        let fps: Vec<Fingerprint> = payloads.iter().map(|p| put(&t, p)).collect();
        for (fp, p) in fps.iter().zip(&payloads) {
            assert_eq!(get(&t, fp).as_deref(), Some(&p[..]), "{} bytes", p.len());
        }
        t.sync().expect("sync");
        let direct = t.is_direct();
        drop(t);
        let (t, rec) = SsdTier::open(c).expect("reopen");
        assert_eq!(rec.recovered, 4);
        for (fp, p) in fps.iter().zip(&payloads) {
            assert_eq!(get(&t, fp).as_deref(), Some(&p[..]), "{} bytes", p.len());
        }
        // A filesystem without O_DIRECT (tmpfs) falls back to the page cache; say which ran.
        eprintln!("slot file opened with O_DIRECT: {direct}");
        let mut buffered = cfg(dir.path(), 4);
        buffered.direct = false;
        buffered.data_path = dir.path().join("buffered.slots");
        buffered.index_path = dir.path().join("buffered.index");
        let (b, _) = SsdTier::open(buffered).expect("open buffered");
        assert!(!b.is_direct());
        let fp = put(&b, &payloads[1][..4000]);
        assert_eq!(get(&b, &fp).as_deref(), Some(&payloads[1][..4000]));
    }

    #[test]
    fn a_payload_larger_than_a_slot_is_refused_and_its_slot_given_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, _) = SsdTier::open(cfg(dir.path(), 1)).expect("open");
        let big = vec![7u8; 4097];
        let fp = Fingerprint::of(&big);
        let r = t.reserve(&fp, 1).slot().expect("a slot");
        let e = t.write(r, fp, &big, 1).expect_err("too large");
        assert!(e.to_string().contains("4097"), "{e}");
        // The one slot is free again, and nothing of the refused payload is indexed.
        assert!(!t.contains(&fp));
        let a = put(&t, &block(1));
        assert_eq!(get(&t, &a).as_deref(), Some(&block(1)[..]));
    }

    #[test]
    fn recovery_reads_headers_across_pieces_and_keeps_the_later_copy_of_a_duplicate() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Three pieces and a bit: the header read is split among threads by piece.
        let slots = (3 * PIECE_SLOTS + 5) as u64;
        drop(SsdTier::open(cfg(dir.path(), slots)).expect("open"));
        let idx = OpenOptions::new()
            .write(true)
            .open(dir.path().join("cache.index"))
            .expect("index");
        let data = OpenOptions::new()
            .write(true)
            .open(dir.path().join("cache.slots"))
            .expect("slots");
        let put_at = |slot: u64, tag: u8, seq: u64| {
            let b = block(tag);
            let fp = Fingerprint::of(&b);
            data.write_all_at(&b, slot * 4096).expect("payload");
            idx.write_all_at(
                &encode_header(&fp, 4096, seq, 1),
                header_offset(slot as u32),
            )
            .expect("header");
            fp
        };
        let p = PIECE_SLOTS as u64;
        // Write numbers more than 2^32 apart, so that the sort rounds them.
        let edges = [0, p - 1, p, p + 1, 2 * p - 1, 2 * p, slots - 1];
        let mut fps = Vec::new();
        for (k, slot) in edges.iter().enumerate() {
            fps.push(put_at(*slot, k as u8 + 1, 1 + k as u64 * (1 << 33)));
        }
        // One block stored twice, the later write at the lower slot; both round alike.
        let dup = put_at(p + 7, 100, (1 << 40) + 1);
        put_at(p + 3, 100, (1 << 40) + 2);
        drop((idx, data));
        let (t, rec) = SsdTier::open(cfg(dir.path(), slots)).expect("reopen");
        assert_eq!((rec.recovered, rec.duplicates), (8, 1), "{rec:?}");
        assert_eq!(
            t.payload_offset(&dup),
            Some((p + 3) * 4096),
            "the later copy"
        );
        let order = t.lru_order().expect("lru");
        assert_eq!(order[0], dup);
        let mut oldest_first: Vec<Fingerprint> = order[1..].to_vec();
        oldest_first.reverse();
        assert_eq!(oldest_first, fps, "write order across pieces");
        for fp in &fps {
            assert!(get(&t, fp).is_some());
        }
        // The next write is numbered after every header read.
        assert!(t.index.lock().next_seq >= (1 << 40) + 2);
    }

    #[test]
    fn of_two_writers_of_one_block_the_first_keeps_it_and_the_second_slot_is_free_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, _) = SsdTier::open(cfg(dir.path(), 2)).expect("open");
        let b = block(1);
        let fp = Fingerprint::of(&b);
        let (r1, r2) = (
            t.reserve(&fp, 1).slot().expect("a slot"),
            t.reserve(&fp, 1).slot().expect("another"),
        );
        t.write(r1, fp, &b, 1).expect("write");
        t.write(r2, fp, &b, 1).expect("write");
        assert_eq!(t.usage(), (1, 4096));
        assert_eq!(t.payload_offset(&fp), Some(0), "the first writer's slot");
        // The second slot went back: a new block takes it without evicting the first.
        let c = put(&t, &block(2));
        assert_eq!(t.payload_offset(&c), Some(4096));
        assert_eq!(get(&t, &fp).as_deref(), Some(&b[..]));
    }

    #[test]
    fn the_ram_index_costs_at_most_32_bytes_a_slot() {
        let slots: u32 = 1 << 16;
        let ix = Index::new(slots);
        let bytes = ix.slots.capacity() * std::mem::size_of::<Slot>()
            + ix.table.cells.capacity() * std::mem::size_of::<u32>();
        assert_eq!(bytes as u64, index_ram_bytes(u64::from(slots)));
        let per_slot = bytes as f64 / f64::from(slots);
        assert!(per_slot <= 32.0, "{per_slot} bytes a slot");
    }

    #[test]
    fn a_tier_too_large_for_slot_numbers_is_refused_with_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = cfg(dir.path(), 1);
        c.capacity_bytes = (u64::from(MAX_SLOTS) + 1) * 4096;
        let e = SsdTier::open(c).expect_err("too many slots");
        assert!(e.to_string().contains(&MAX_SLOTS.to_string()), "{e}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Put(u8),
            Get(u8),
            Reopen,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0u8..12).prop_map(Op::Put),
                4 => (0u8..12).prop_map(Op::Get),
                1 => Just(Op::Reopen),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]
            /// The probing table finds exactly what was put in and not removed, whatever the
            /// keys' homes (few distinct keys pile entries into long runs that wrap around).
            #[test]
            fn the_table_agrees_with_a_map(ops in proptest::collection::vec((any::<bool>(), 0u32..24, 0u64..6), 1..200)) {
                let n = 24u32;
                let mut slots = vec![Slot::default(); n as usize];
                let mut table = Table::new(n);
                let mut model = std::collections::HashMap::new();
                for (add, s, key) in ops {
                    // Six homes (the high bits), a distinct key per slot (the low bits).
                    let key = (key.wrapping_mul(0x2AAA_AAAA_AAAA_AAAB) & !0xFF) | u64::from(s);
                    if add && !model.contains_key(&s) {
                        slots[s as usize] = Slot::live(key, 1, 1);
                        prop_assert_eq!(table.insert_or_find(&slots, key, s), None);
                        model.insert(s, key);
                    } else if !add && let Some(k) = model.remove(&s) {
                        prop_assert_eq!(slots[s as usize].key, k);
                        table.remove(&slots, s);
                        slots[s as usize] = Slot::default();
                    }
                    for (s, k) in &model {
                        prop_assert_eq!(table.find(&slots, *k), Some(*s));
                    }
                    let used = table.cells.iter().filter(|c| **c != 0).count();
                    prop_assert_eq!(used, model.len());
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(40))]
            /// The index agrees with the slot file: every indexed entry reads back verified, the
            /// LRU list and the map hold the same entries, usage never exceeds capacity, and a
            /// reopen recovers exactly what was live.
            #[test]
            fn the_index_agrees_with_the_slot_file(ops in proptest::collection::vec(op(), 1..60)) {
                let dir = tempfile::tempdir().expect("tempdir");
                let (mut t, _) = SsdTier::open(cfg(dir.path(), 5)).expect("open");
                for op in ops {
                    match op {
                        Op::Put(tag) => { put(&t, &block(tag)); }
                        Op::Get(tag) => {
                            let fp = Fingerprint::of(&block(tag));
                            if t.contains(&fp) {
                                let got = get(&t, &fp);
                                prop_assert_eq!(got.as_deref(), Some(&block(tag)[..]));
                            }
                        }
                        Op::Reopen => {
                            t.sync().expect("sync");
                            let mut live = t.lru_order().expect("lru");
                            drop(t);
                            let (reopened, rec) = SsdTier::open(cfg(dir.path(), 5)).expect("reopen");
                            let mut back = reopened.lru_order().expect("lru");
                            live.sort();
                            back.sort();
                            prop_assert_eq!(back, live);
                            prop_assert_eq!(rec.corrupt_headers, 0);
                            t = reopened;
                        }
                    }
                    let (entries, bytes) = t.usage();
                    prop_assert!(entries <= 5 && bytes <= 5 * 4096);
                    prop_assert_eq!(t.lru_order().expect("lru").len() as u64, entries);
                    for fp in t.lru_order().expect("lru") {
                        prop_assert!(get(&t, &fp).is_some(), "an indexed entry did not verify");
                    }
                }
            }
        }
    }

    #[test]
    fn a_geometry_change_starts_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (t, _) = SsdTier::open(cfg(dir.path(), 4)).expect("open");
            put(&t, &block(1));
        }
        let (t, rec) = SsdTier::open(cfg(dir.path(), 8)).expect("reopen");
        assert!(rec.reset);
        assert_eq!(t.usage().0, 0);
    }
}

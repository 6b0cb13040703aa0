//! Read-ahead of a disk another member owns, for a client reading it sequentially.
//!
//! A cold member fetches every block a client reads from other members or the owner, so a
//! reader moving through the disk waits a network round trip per read, where a server of a
//! local file (qemu-nbd, say) has the kernel's read-ahead. This module decides when and what
//! to fetch ahead, per shadow (one disk at one generation and epoch).
//!
//! It follows up to [`STREAMS`] *streams*, the least recently used giving way to a new one. A
//! read continues a stream when it begins where the stream's last read ended, a little
//! before (reads in flight together arrive out of order: up to [`OUT_OF_ORDER_READS`] of the
//! stream's read length) or at most one read length after; any other read starts a stream. Blocks a
//! stream skipped do not count as read. The disk is cut in *windows* of half the configured
//! read-ahead. Once a stream has made two reads and read half a window, its reads ask for the
//! windows after the one they end in, at most two, whole windows only, and only as far as
//! the stream has read so far (a stream of 5 MiB gets at most 5 MiB ahead of it): a stream
//! that stops right there has cost the owner at most what it read again. Each stream asks
//! for a window once; scattered reads, however dense, ask for nothing.
//!
//! What it asks for is fetched and verified as any read's blocks are, then waits in a buffer,
//! not the cache ([`crate::read::ReadPath::read_ahead`]): the client's read that comes for it
//! admits it as its first touch, so a scan read ahead enters the cache as a scan, never as
//! blocks read twice.
//!
//! Architecture invariant: only decides which blocks to ask for; never fetches, never touches
//! the cache; its state is bounded by [`STREAMS`] per shadow.

use std::ops::Range;

/// Default `cluster.read_ahead`: bytes fetched ahead of a sequential reader.
pub const DEFAULT_READ_AHEAD: u64 = 16 << 20;
/// The most `cluster.read_ahead` may be.
pub const MAX_READ_AHEAD: u64 = 256 << 20;
/// Streams followed per shadow (the readers of one base disk on one host, say).
pub const STREAMS: usize = 32;
/// A read continues a stream if it begins up to this many of the stream's read lengths before
/// where the stream's last read ended.
pub const OUT_OF_ORDER_READS: u64 = 4;

#[derive(Debug, Clone, Copy)]
struct Stream {
    /// The block after the stream's furthest read.
    next: u64,
    /// Blocks it has read (those it skipped not counted).
    run: u64,
    /// Reads that moved it on.
    reads: u32,
    /// The length of its last read that moved it on: how far before or after its end a
    /// read may begin and still continue it.
    len: u64,
    /// The end of what it has asked for (a window's end, or the disk's).
    asked_to: u64,
    /// When it was last read, in reads of the shadow.
    used: u64,
}

#[derive(Debug, Default)]
struct State {
    streams: Vec<Stream>,
    tick: u64,
}

/// The streams of one shadow.
#[derive(Debug, Default)]
pub struct Ahead {
    state: parking_lot::Mutex<State>,
}

impl Ahead {
    /// Notes a client's read of blocks `first..=last` of a disk of `total` blocks and returns
    /// the blocks to fetch ahead of it, for windows of `window` blocks, with what `permit`
    /// gave for their count. `None`: nothing to fetch (a stream too short, windows past the
    /// end or asked for already, another read being noted at this moment, or `permit` gave
    /// nothing: then the windows stay unasked).
    pub fn after<P>(
        &self,
        (first, last): (u64, u64),
        total: u64,
        window: u64,
        permit: impl FnOnce(u64) -> Option<P>,
    ) -> Option<(Range<u64>, P)> {
        if window == 0 || last < first {
            return None;
        }
        let len = last - first + 1;
        // Every client read of the shadow comes here, RAM hits too: one that finds another
        // read noting itself passes unnoted rather than wait (a stream then sees a gap of
        // one read, which it allows).
        let mut st = self.state.try_lock()?;
        st.tick += 1;
        let tick = st.tick;
        let found = st.streams.iter().position(|s| {
            first.saturating_add(s.len.saturating_mul(OUT_OF_ORDER_READS)) >= s.next
                && first <= s.next.saturating_add(s.len)
        });
        let s = match found {
            Some(n) => {
                let s = &mut st.streams[n];
                s.used = tick;
                if last + 1 > s.next {
                    s.run += last + 1 - s.next.max(first);
                    s.next = last + 1;
                    s.reads += 1;
                    s.len = len;
                }
                s
            }
            None => {
                let s = Stream {
                    next: last + 1,
                    run: len,
                    reads: 1,
                    len,
                    asked_to: 0,
                    used: tick,
                };
                let n = if st.streams.len() < STREAMS {
                    st.streams.push(s);
                    st.streams.len() - 1
                } else {
                    let (n, _) = st.streams.iter().enumerate().min_by_key(|(_, s)| s.used)?;
                    st.streams[n] = s;
                    n
                };
                &mut st.streams[n]
            }
        };
        if s.reads < 2 || s.run < window.div_ceil(2) {
            return None;
        }
        let k = last / window;
        let lo = k.saturating_add(1).saturating_mul(window).max(s.asked_to);
        let limit = s
            .next
            .saturating_add(s.run)
            .min(k.saturating_add(3).saturating_mul(window));
        let hi = if total <= limit {
            total
        } else {
            limit / window * window
        };
        if hi <= lo {
            return None;
        }
        let p = permit(hi - lo)?;
        s.asked_to = hi;
        Some((lo..hi, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(a: &Ahead, first: u64, last: u64, total: u64, w: u64) -> Option<Range<u64>> {
        a.after((first, last), total, w, |_| Some(()))
            .map(|(r, ())| r)
    }

    /// Reads `first..end` in reads of `per` blocks; what each asked for, in order.
    fn read(a: &Ahead, first: u64, end: u64, per: u64, total: u64, w: u64) -> Vec<Range<u64>> {
        (first..end)
            .step_by(per as usize)
            .filter_map(|f| ask(a, f, (f + per).min(end) - 1, total, w))
            .collect()
    }

    #[test]
    fn a_sequential_reader_gets_whole_windows_no_further_ahead_than_it_has_read() {
        let a = Ahead::default();
        // Windows of 8 blocks, reads of 2.
        assert_eq!(ask(&a, 0, 1, 1000, 8), None, "one read is no stream");
        assert_eq!(
            ask(&a, 2, 3, 1000, 8),
            None,
            "half a window, but 8..16 ends past 8"
        );
        assert_eq!(ask(&a, 4, 5, 1000, 8), None);
        assert_eq!(ask(&a, 6, 7, 1000, 8), Some(8..16), "8 read: 8 ahead");
        assert_eq!(ask(&a, 8, 9, 1000, 8), None);
        assert_eq!(ask(&a, 10, 11, 1000, 8), Some(16..24));
        // On through the disk: contiguous windows, each once, never past two windows after
        // the read nor further than the stream has read.
        let asked = read(&a, 12, 200, 2, 1000, 8);
        let mut end = 24;
        for r in &asked {
            assert_eq!(r.start, end, "{asked:?}");
            assert_eq!(r.start % 8, 0);
            end = r.end;
        }
        assert_eq!(end, 216, "two windows past the one of the last read");
    }

    #[test]
    fn scattered_reads_ask_for_nothing_however_dense() {
        let a = Ahead::default();
        // Every block of 0..4096 read once, in a scattered order (4 blocks a read).
        for f in (0..1024).map(|i| (i * 397) % 1024 * 4) {
            assert_eq!(ask(&a, f, f + 3, 4096, 64), None, "read at {f}");
        }
        // Reads of a whole window each, three lengths apart or more: no stream either.
        let b = Ahead::default();
        for f in (0..16).map(|i| (i * 7) % 16 * 256) {
            assert_eq!(ask(&b, f, f + 63, 4096, 64), None, "read at {f}");
        }
    }

    #[test]
    fn a_reader_that_skips_more_than_it_reads_is_no_stream() {
        let a = Ahead::default();
        // 32 blocks read, 118 skipped, again and again.
        for i in 0..64 {
            assert_eq!(ask(&a, i * 150, i * 150 + 31, 100_000, 64), None);
        }
        // A small skip (a quarter of a read) continues the stream; the skipped blocks do not
        // count as read.
        let b = Ahead::default();
        let asked: Vec<_> = (0..64)
            .filter_map(|i| ask(&b, i * 40, i * 40 + 31, 100_000, 64))
            .collect();
        assert!(!asked.is_empty());
        assert!(asked.iter().all(|r| r.end <= 64 * 40 + 64 * 32));
    }

    #[test]
    fn reads_that_arrive_a_little_out_of_order_are_one_stream() {
        let a = Ahead::default();
        // Reads of 4 blocks, each pair swapped, as two in flight together may arrive.
        let mut asked = Vec::new();
        for pair in (0..256).step_by(8) {
            for f in [pair + 4, pair] {
                asked.extend(ask(&a, f, f + 3, 1000, 16));
            }
        }
        assert!(!asked.is_empty(), "the stream was followed");
        assert!(asked.iter().all(|r| r.start % 16 == 0 && r.start >= 16));
    }

    #[test]
    fn a_stream_survives_scattered_reads_between_its_own_and_the_least_recent_gives_way() {
        let a = Ahead::default();
        // A sequential reader with a scattered read after each of its own.
        let mut asked = Vec::new();
        for i in 0..64 {
            asked.extend(ask(&a, i * 4, i * 4 + 3, 1 << 20, 16));
            let far = 100_000 + (i * 7919) % 500_000;
            assert_eq!(ask(&a, far, far, 1 << 20, 16), None);
        }
        assert!(asked.iter().any(|r| r.start == 16), "{asked:?}");
        // STREAMS + 1 readers in turn: each new one takes the least recently used slot, the
        // one that comes next, so none gets two reads in.
        let b = Ahead::default();
        for round in 0..8u64 {
            for r in 0..=STREAMS as u64 {
                let f = r * 10_000 + round * 4;
                assert_eq!(ask(&b, f, f + 3, 1 << 20, 16), None);
            }
        }
    }

    #[test]
    fn a_refused_permit_leaves_the_windows_for_the_next_read() {
        let a = Ahead::default();
        read(&a, 0, 6, 2, 1000, 8);
        assert_eq!(a.after((6, 7), 1000, 8, |_| None::<()>), None);
        // The same read again (a retry), with a permit this time: the window is still due.
        let (r, n) = a.after((6, 7), 1000, 8, Some).expect("asked");
        assert_eq!((r, n), (8..16, 8), "the permit is asked for the blocks");
    }

    #[test]
    fn a_read_never_waits_while_another_is_noted() {
        let a = Ahead::default();
        read(&a, 0, 6, 2, 1000, 8);
        let held = a.state.lock();
        // It would ask for 8..16; it passes unnoted instead of waiting.
        assert_eq!(ask(&a, 6, 7, 1000, 8), None);
        drop(held);
        assert_eq!(
            ask(&a, 6, 7, 1000, 8),
            Some(8..16),
            "the stream is as it was"
        );
    }

    #[test]
    fn nothing_past_the_end_of_the_disk_and_nothing_when_off() {
        let a = Ahead::default();
        // 36 blocks, windows of 8: window 4 (32..36) is the last and short.
        let asked = read(&a, 0, 36, 2, 36, 8);
        assert_eq!(asked.last().map(|r| r.end), Some(36));
        assert!(asked.iter().all(|r| r.end <= 36));
        assert_eq!(
            ask(&Ahead::default(), 0, 100, 1000, 0),
            None,
            "no windows: off"
        );
    }
}

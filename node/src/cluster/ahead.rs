//! Read-ahead of a disk another member owns, for a client reading it sequentially.
//!
//! A cold member fetches every block a client reads from other members or the owner, so a
//! reader moving through the disk waits a network round trip per read, where a server of a
//! local file (qemu-nbd, say) has the kernel's read-ahead. This module decides when and what
//! to fetch ahead, per shadow (one disk at one generation and epoch).
//!
//! It follows up to [`STREAMS`] *streams*: a read that begins where a recent read ended (within
//! a few reads' length: reads in flight together arrive out of order) continues that read's
//! stream, any other read starts one. The disk is cut in *windows* of half the configured
//! read-ahead. Once a stream has read half a window without a gap, each of its reads asks
//! for the next two windows after the one it ends in, as far as the stream has read so far
//! (a stream of 4 MiB gets at most 4 MiB ahead of it), each window once in the shadow's
//! life. Scattered reads, however dense, ask for nothing: a fetched block nobody reads is
//! owner egress for nothing.
//!
//! What it asks for is fetched and verified as any read's blocks are, then waits in a buffer,
//! not the cache ([`crate::read::ReadPath::read_ahead`]): the client's read that comes for it
//! admits it as its first touch, so a scan read ahead enters the cache as a scan, never as
//! blocks read twice.
//!
//! Architecture invariant: only decides which blocks to ask for; never fetches, never touches
//! the cache, and asks for a window at most once per shadow.

use std::ops::Range;

use roaring::RoaringBitmap;

/// Default `cluster.read_ahead`: bytes fetched ahead of a sequential reader.
pub const DEFAULT_READ_AHEAD: u64 = 16 << 20;
/// The most `cluster.read_ahead` may be.
pub const MAX_READ_AHEAD: u64 = 256 << 20;
/// Streams followed per shadow (the readers of one base disk on one host, say).
pub const STREAMS: usize = 32;
/// A read continues a stream if it begins within this many of its own lengths of where the
/// stream's last read ended.
const OUT_OF_ORDER_READS: u64 = 4;

#[derive(Debug, Default, Clone, Copy)]
struct Stream {
    /// The block after the stream's furthest read.
    next: u64,
    /// Blocks it has read without a gap.
    run: u64,
}

#[derive(Debug, Default)]
struct State {
    asked: RoaringBitmap,
    streams: Vec<Stream>,
    /// The slot the next new stream takes once all are in use.
    turn: usize,
}

/// The streams of one shadow and the windows asked for already.
#[derive(Debug, Default)]
pub struct Ahead {
    state: parking_lot::Mutex<State>,
}

impl Ahead {
    /// Notes a client's read of blocks `first..=last` of a disk of `total` blocks and returns
    /// the blocks to fetch ahead of it, for windows of `window` blocks. `None`: nothing (a
    /// stream too short, windows past the end, or asked for already). The windows returned
    /// count as asked for.
    pub fn after(&self, first: u64, last: u64, total: u64, window: u64) -> Option<Range<u64>> {
        if window == 0 || last < first {
            return None;
        }
        let len = last - first + 1;
        let gap = len.saturating_mul(OUT_OF_ORDER_READS);
        let mut st = self.state.lock();
        let found = st.streams.iter().position(|s| {
            first <= s.next.saturating_add(gap) && first.saturating_add(gap) >= s.next
        });
        let stream = match found {
            Some(n) => {
                let s = &mut st.streams[n];
                if last + 1 > s.next {
                    s.run += last + 1 - s.next.max(first);
                    s.next = last + 1;
                }
                *s
            }
            None => {
                let s = Stream {
                    next: last + 1,
                    run: len,
                };
                if st.streams.len() < STREAMS {
                    st.streams.push(s);
                } else {
                    let t = st.turn;
                    st.streams[t] = s;
                    st.turn = (t + 1) % STREAMS;
                }
                s
            }
        };
        if stream.run < window.div_ceil(2) {
            return None;
        }
        let k = last / window;
        let reach = stream.next.saturating_add(stream.run).min(total);
        let mut out: Option<Range<u64>> = None;
        for j in k + 1..=k + 2 {
            let start = j.saturating_mul(window);
            let Ok(j32) = u32::try_from(j) else { break };
            if start >= reach {
                break;
            }
            if !st.asked.insert(j32) {
                continue;
            }
            let end = start.saturating_add(window).min(total);
            out = Some(match out {
                Some(r) if r.end == start => r.start..end,
                Some(r) => r,
                None => start..end,
            });
        }
        out
    }

    /// Windows asked for so far.
    pub fn asked(&self) -> u64 {
        self.state.lock().asked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `first..end` in reads of `per` blocks; what each asked for, in order.
    fn read(a: &Ahead, first: u64, end: u64, per: u64, total: u64, w: u64) -> Vec<Range<u64>> {
        (first..end)
            .step_by(per as usize)
            .filter_map(|f| a.after(f, (f + per).min(end) - 1, total, w))
            .collect()
    }

    #[test]
    fn a_sequential_reader_gets_windows_ahead_once_it_has_read_half_a_window() {
        let a = Ahead::default();
        // Windows of 8 blocks, reads of 2: the stream reaches 4 blocks at the read of 2..=3,
        // and may then get as far ahead as it has read.
        assert_eq!(a.after(0, 1, 1000, 8), None);
        // next 4, run 4: window 1 (8..16) starts at 8, not below 4 + 4.
        assert_eq!(a.after(2, 3, 1000, 8), None);
        // next 6, run 6: window 1 starts below 12.
        assert_eq!(a.after(4, 5, 1000, 8), Some(8..16));
        assert_eq!(a.after(6, 7, 1000, 8), None);
        // Into window 1 (next 10, run 10): window 2 starts at 16, below 20.
        assert_eq!(a.after(8, 9, 1000, 8), Some(16..24));
        // Further on, both windows after the current one.
        let asked = read(&a, 10, 64, 2, 1000, 8);
        assert_eq!(asked.first(), Some(&(24..32)));
        assert_eq!(asked.last(), Some(&(72..80)));
        assert_eq!(a.asked(), 9, "windows 1 to 9, each once");
    }

    #[test]
    fn scattered_reads_ask_for_nothing_however_dense() {
        let a = Ahead::default();
        // Every block of 0..4096 read once, in a scattered order (4 blocks a read).
        let mut order: Vec<u64> = (0..1024).map(|i| (i * 397) % 1024 * 4).collect();
        order.dedup();
        for f in order {
            assert_eq!(a.after(f, f + 3, 4096, 64), None, "read at {f}");
        }
        assert_eq!(a.asked(), 0);
    }

    #[test]
    fn reads_that_arrive_a_little_out_of_order_are_one_stream() {
        let a = Ahead::default();
        // Reads of 4 blocks, each pair swapped, as two in flight together may arrive.
        let mut asked = Vec::new();
        for pair in (0..128).step_by(8) {
            for f in [pair + 4, pair] {
                asked.extend(a.after(f, f + 3, 1000, 16));
            }
        }
        assert!(!asked.is_empty(), "the stream was followed");
        assert!(asked.iter().all(|r| r.start >= 16 && r.start % 16 == 0));
    }

    #[test]
    fn streams_are_followed_apart_and_the_oldest_makes_room() {
        let a = Ahead::default();
        // Two readers interleaved, far apart: each is a stream of its own.
        let mut asked = Vec::new();
        for step in 0..16 {
            asked.extend(a.after(step * 4, step * 4 + 3, 100_000, 16));
            asked.extend(a.after(50_000 + step * 4, 50_000 + step * 4 + 3, 100_000, 16));
        }
        assert!(asked.iter().any(|r| r.start < 100));
        assert!(asked.iter().any(|r| r.start > 50_000));
        // STREAMS + 1 readers in turn, one read each round: each new one takes the oldest's
        // slot, so the one whose slot was taken starts over.
        let b = Ahead::default();
        for round in 0..8u64 {
            for r in 0..=STREAMS as u64 {
                assert_eq!(
                    b.after(
                        r * 10_000 + round * 4,
                        r * 10_000 + round * 4 + 3,
                        1 << 20,
                        16
                    ),
                    None
                );
            }
        }
    }

    #[test]
    fn nothing_past_the_end_of_the_disk_and_nothing_when_off() {
        let a = Ahead::default();
        // 36 blocks, windows of 8: window 4 (32..36) is the last and short.
        let asked = read(&a, 0, 36, 4, 36, 8);
        assert_eq!(asked.last(), Some(&(32..36)));
        assert!(asked.iter().all(|r| r.end <= 36));
        assert_eq!(
            Ahead::default().after(0, 100, 1000, 0),
            None,
            "no windows: off"
        );
    }
}

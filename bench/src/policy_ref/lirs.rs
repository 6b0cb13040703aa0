//! LIRS as published: S. Jiang and X. Zhang, "LIRS: An Efficient Low Inter-reference Recency
//! Set Replacement Policy to Improve Buffer Cache Performance", ACM SIGMETRICS 2002, section 3.
//!
//! Blocks with a low inter-reference recency (IRR) are LIR and always resident; the others are
//! HIR, of which only `Lhirs` (1 % of the cache, as in the paper) are resident. The stack `S`
//! holds LIR blocks and HIR blocks (resident or not) in recency order, pruned so that its
//! bottom is always an LIR block; the list `Q` holds the resident HIR blocks, and its front is
//! what a miss evicts. An HIR block accessed while it is still in `S` has a smaller IRR than
//! the LIR block at the bottom of `S`: it becomes LIR and that one becomes HIR.
//!
//! As in the paper, the non-resident HIR entries of `S` are not bounded (its memory is the
//! trace's footprint at most); this is a reference for the bench, not a cache to ship.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use super::{Lists, NIL, PageHasher, PagePolicy};

const S: usize = 0;
const Q: usize = 1;

#[derive(Clone, Copy)]
struct Entry {
    /// The node in `S`, or NIL.
    s: u32,
    /// The node in `Q`, or NIL (only resident HIR blocks are in `Q`).
    q: u32,
    lir: bool,
    resident: bool,
}

/// LIRS with `Lhirs` = 1 % of the cache (at least one page) and `Llirs` the rest.
pub struct Lirs {
    lhirs: usize,
    llirs: usize,
    lir_count: usize,
    map: HashMap<u64, Entry, BuildHasherDefault<PageHasher>>,
    lists: Lists<2>,
}

impl Lirs {
    /// An empty LIRS cache of `capacity_pages` pages; `Lhirs` is 1 % of it, at least 1.
    pub fn new(capacity_pages: usize) -> Self {
        Self::with_hir_share(capacity_pages, 0.01)
    }

    /// An empty LIRS cache with `Lhirs` = `hir_share` of the cache (at least 1 page, at most
    /// all of it).
    pub fn with_hir_share(capacity_pages: usize, hir_share: f64) -> Self {
        let cap = capacity_pages.min(super::MAX_CAPACITY_PAGES);
        let lhirs = if cap == 0 {
            0
        } else {
            ((cap as f64 * hir_share).round() as usize).clamp(1, cap)
        };
        Self {
            lhirs,
            llirs: cap - lhirs,
            lir_count: 0,
            map: HashMap::with_capacity_and_hasher(cap * 2, BuildHasherDefault::default()),
            lists: Lists::with_capacity(cap * 2),
        }
    }

    /// Removes HIR blocks from the bottom of `S` until an LIR block is there; a non-resident
    /// one is forgotten.
    fn prune(&mut self) {
        while let Some(slot) = self.lists.lru(S) {
            let page = self.lists.page(slot);
            let e = self.map.get_mut(&page).expect("a page in S is in the map");
            if e.lir {
                break;
            }
            e.s = NIL;
            let forget = !e.resident;
            self.lists.release(slot);
            if forget {
                self.map.remove(&page);
            }
        }
    }

    /// A cache of one page has no LIR block (Llirs = 0): `S` is kept empty, so that nothing
    /// is ever promoted and the one frame is `Q`'s.
    fn prune_without_lir(&mut self) {
        if self.llirs == 0 {
            self.prune();
        }
    }

    /// `page`, in `S` at `s` and resident now, becomes LIR at the top of `S`; the LIR block at
    /// the bottom of `S` becomes HIR in its place, and `S` is pruned.
    fn promote(&mut self, page: u64, s: u32) {
        self.lists.move_front(S, s);
        let m = self.map.get_mut(&page).expect("a page in S is in the map");
        m.lir = true;
        m.resident = true;
        self.lir_count += 1;
        self.demote_bottom_lir();
        self.prune();
    }

    /// The LIR block at the bottom of `S` becomes a resident HIR block at the end of `Q`.
    fn demote_bottom_lir(&mut self) {
        let Some(slot) = self.lists.lru(S) else {
            return;
        };
        let page = self.lists.page(slot);
        self.lists.release(slot);
        let q = self.lists.push_new(Q, page);
        let e = self.map.get_mut(&page).expect("a page in S is in the map");
        debug_assert!(e.lir, "the bottom of S is LIR after pruning");
        e.s = NIL;
        e.q = q;
        e.lir = false;
        self.lir_count -= 1;
    }

    /// Blocks resident now: (LIR, resident HIR).
    pub fn resident(&self) -> (usize, usize) {
        (self.lir_count, self.lists.len[Q])
    }

    /// Entries in `S` (LIR and HIR, resident or not).
    pub fn stack_len(&self) -> usize {
        self.lists.len[S]
    }

    /// Whether `page` is resident and LIR (`Some(true)`), resident and HIR (`Some(false)`), or
    /// not resident (`None`).
    pub fn state(&self, page: u64) -> Option<bool> {
        self.map.get(&page).filter(|e| e.resident).map(|e| e.lir)
    }
}

impl PagePolicy for Lirs {
    fn name(&self) -> &'static str {
        "LIRS"
    }

    fn access(&mut self, page: u64) -> bool {
        if self.lhirs == 0 {
            return false;
        }
        let found = self.map.get(&page).copied();
        match found {
            // An LIR block: to the top of S; if it was the bottom, prune.
            Some(e) if e.lir => {
                let was_bottom = self.lists.lru(S) == Some(e.s);
                self.lists.move_front(S, e.s);
                if was_bottom {
                    self.prune();
                }
                true
            }
            // A resident HIR block.
            Some(e) if e.resident => {
                if e.s != NIL {
                    // Its IRR is below the bottom LIR block's recency: it becomes LIR.
                    self.lists.release(e.q);
                    self.map.get_mut(&page).expect("present").q = NIL;
                    self.promote(page, e.s);
                } else {
                    // Not in S: stays HIR, goes to the top of S and the end of Q.
                    let s = self.lists.push_new(S, page);
                    self.lists.move_front(Q, e.q);
                    self.map.get_mut(&page).expect("present").s = s;
                    self.prune_without_lir();
                }
                true
            }
            // A miss: a block not in S, or a non-resident HIR block still in S.
            _ => {
                if self.lir_count < self.llirs {
                    // Warming up: the first Llirs distinct blocks are LIR.
                    match found {
                        Some(e) => {
                            self.lists.move_front(S, e.s);
                            let m = self.map.get_mut(&page).expect("present");
                            m.lir = true;
                            m.resident = true;
                        }
                        None => {
                            let s = self.lists.push_new(S, page);
                            self.map.insert(
                                page,
                                Entry {
                                    s,
                                    q: NIL,
                                    lir: true,
                                    resident: true,
                                },
                            );
                        }
                    }
                    self.lir_count += 1;
                    return false;
                }
                if self.lists.len[Q] >= self.lhirs {
                    // Free a frame: the resident HIR block at the front of Q.
                    let slot = self.lists.lru(Q).expect("Q holds Lhirs blocks");
                    let victim = self.lists.page(slot);
                    self.lists.release(slot);
                    let v = self
                        .map
                        .get_mut(&victim)
                        .expect("a page in Q is in the map");
                    v.q = NIL;
                    v.resident = false;
                    if v.s == NIL {
                        self.map.remove(&victim);
                    }
                }
                match found {
                    Some(e) => {
                        // In S: its IRR is small: it becomes LIR.
                        self.promote(page, e.s);
                    }
                    None => {
                        let s = self.lists.push_new(S, page);
                        let q = self.lists.push_new(Q, page);
                        self.map.insert(
                            page,
                            Entry {
                                s,
                                q,
                                lir: false,
                                resident: true,
                            },
                        );
                        self.prune_without_lir();
                    }
                }
                false
            }
        }
    }

    fn len(&self) -> usize {
        self.lir_count + self.lists.len[Q]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_ref::{Lru, Opt, replay};

    /// Worked by hand with the paper's rules, 3 pages (Llirs 2, Lhirs 1):
    ///
    /// | access | result | S (top first) | Q | LIR |
    /// | --- | --- | --- | --- | --- |
    /// | 1 | miss | 1 | | 1 |
    /// | 2 | miss | 2 1 | | 1 2 |
    /// | 3 | miss | 3 2 1 | 3 | 1 2 |
    /// | 4 | miss, 3 out | 4 3 2 1 | 4 | 1 2 |
    /// | 3 | miss, 4 out; 3 in S: LIR, 1 to Q | 3 4 2 | 1 | 2 3 |
    /// | 1 | hit (HIR, not in S) | 1 3 4 2 | 1 | 2 3 |
    /// | 4 | miss, 1 out; 4 in S: LIR, 2 to Q | 4 1 3 | 2 | 3 4 |
    /// | 2 | hit (HIR, not in S) | 2 4 1 3 | 2 | 3 4 |
    /// | 5 | miss, 2 out | 5 2 4 1 3 | 5 | 3 4 |
    /// | 3 | hit (LIR at the bottom); prune drops 1 | 3 5 2 4 | 5 | 3 4 |
    #[test]
    fn a_sequence_worked_by_hand() {
        let mut l = Lirs::new(3);
        let seq = [1, 2, 3, 4, 3, 1, 4, 2, 5, 3];
        let want = [
            false, false, false, false, false, true, false, true, false, true,
        ];
        for (i, (&p, &w)) in seq.iter().zip(&want).enumerate() {
            assert_eq!(l.access(p), w, "access {i} (page {p})");
            assert!(l.len() <= 3, "access {i}: {} pages resident", l.len());
        }
        assert_eq!(l.resident(), (2, 1));
        assert_eq!(l.state(3), Some(true));
        assert_eq!(l.state(4), Some(true));
        assert_eq!(l.state(5), Some(false));
        assert_eq!(l.state(1), None);
        assert_eq!(l.state(2), None);
        assert_eq!(l.stack_len(), 4, "S is 3 5 2 4 after pruning");
    }

    /// A loop one page longer than the cache: LRU misses every access; LIRS keeps its LIR
    /// blocks and hits them every round, as the paper shows for looping patterns.
    #[test]
    fn a_loop_longer_than_the_cache_keeps_most_of_it() {
        let cap = 100;
        let pages: Vec<u64> = (0..50).flat_map(|_| 0..(cap as u64 + 10)).collect();
        let lru = replay(&mut Lru::new(cap), &pages);
        let lirs = replay(&mut Lirs::new(cap), &pages);
        let opt = replay(&mut Opt::new(cap, &pages), &pages);
        assert_eq!(lru.hits, 0);
        // Llirs = 99 pages are hit every round after the first.
        assert!(lirs.hit_percent() > 80.0, "LIRS {}", lirs.hit_percent());
        assert!(
            opt.hits >= lirs.hits,
            "OPT {} < LIRS {}",
            opt.hits,
            lirs.hits
        );
    }

    #[test]
    fn never_holds_more_than_its_capacity_and_no_more_lir_than_llirs() {
        let mut x = 0x1234_5678_9abc_def1u64;
        for cap in [1usize, 2, 3, 10, 64] {
            let mut l = Lirs::new(cap);
            for _ in 0..20_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Mostly a small hot set, sometimes a wide one.
                let p = if x.is_multiple_of(4) {
                    x % 1000
                } else {
                    x % (cap as u64 * 2)
                };
                l.access(p);
                assert!(l.len() <= cap, "cap {cap}: {} resident", l.len());
                assert!(l.resident().0 <= l.llirs, "cap {cap}");
                assert!(
                    l.state(p).is_some(),
                    "cap {cap}: the page just read is resident"
                );
            }
        }
    }

    #[test]
    fn zero_pages_caches_nothing() {
        let mut l = Lirs::new(0);
        assert!(!l.access(1));
        assert!(!l.access(1));
        assert_eq!(l.len(), 0);
    }
}

//! Belady's optimal replacement (MIN; L. A. Belady, "A study of replacement algorithms for a
//! virtual-storage computer", IBM Systems Journal 5(2), 1966): on a miss in a full cache, the
//! page evicted is the one whose next access lies furthest in the future (never again counts
//! as furthest). Offline: it is built from the whole sequence of pages and must then be given
//! exactly that sequence. Demand paging, as in the paper and the LIRS paper's OPT: every missed
//! page enters the cache. It is the ceiling no online policy passes.

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasherDefault;

use super::{PageHasher, PagePolicy};

/// Belady's MIN over a known sequence.
pub struct Opt {
    cap: usize,
    /// For each position, the position of the same page's next access (`u64::MAX`: none).
    next: Vec<u64>,
    pos: usize,
    /// Resident pages and the position of their next access.
    resident: HashMap<u64, u64, BuildHasherDefault<PageHasher>>,
    /// (next access, page) of every resident page: the last is the victim.
    order: BTreeSet<(u64, u64)>,
}

impl Opt {
    /// MIN with `capacity_pages` pages for exactly the accesses `pages`, in that order.
    pub fn new(capacity_pages: usize, pages: &[u64]) -> Self {
        let mut next = vec![u64::MAX; pages.len()];
        let mut last: HashMap<u64, u64, BuildHasherDefault<PageHasher>> =
            HashMap::with_capacity_and_hasher(1024, BuildHasherDefault::default());
        for (i, &p) in pages.iter().enumerate().rev() {
            if let Some(&n) = last.get(&p) {
                next[i] = n;
            }
            last.insert(p, i as u64);
        }
        let cap = capacity_pages.min(super::MAX_CAPACITY_PAGES);
        Self {
            cap,
            next,
            pos: 0,
            resident: HashMap::with_capacity_and_hasher(cap, BuildHasherDefault::default()),
            order: BTreeSet::new(),
        }
    }
}

impl PagePolicy for Opt {
    fn name(&self) -> &'static str {
        "OPT"
    }

    /// # Panics
    ///
    /// When called more times than the sequence it was built from has pages.
    fn access(&mut self, page: u64) -> bool {
        let next = *self
            .next
            .get(self.pos)
            .expect("OPT replayed past the sequence it was built from");
        self.pos += 1;
        if self.cap == 0 {
            return false;
        }
        if let Some(n) = self.resident.get_mut(&page) {
            self.order.remove(&(*n, page));
            *n = next;
            self.order.insert((next, page));
            return true;
        }
        if self.resident.len() >= self.cap
            && let Some((_, victim)) = self.order.pop_last()
        {
            self.resident.remove(&victim);
        }
        self.resident.insert(page, next);
        self.order.insert((next, page));
        false
    }

    fn len(&self) -> usize {
        self.resident.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_ref::{Arc, Lirs, Lru, replay};

    /// 1 2 3 1 2 3 with 2 pages: on 3's miss, 2 is read again last, so it goes (1 stays);
    /// 1 hits; on 2's miss 1 is never read again, so it goes; 3 hits. LRU hits nothing.
    #[test]
    fn a_sequence_worked_by_hand() {
        let seq = [1, 2, 3, 1, 2, 3];
        let mut o = Opt::new(2, &seq);
        let got: Vec<bool> = seq.iter().map(|&p| o.access(p)).collect();
        assert_eq!(got, [false, false, false, true, false, true]);
        assert_eq!(replay(&mut Lru::new(2), &seq).hits, 0);
    }

    /// A loop of n pages through c < n pages: MIN hits (c - 1) of every n - 1 accesses once
    /// warm; on 1.1 x the cache that is about 90 %.
    #[test]
    fn a_loop_of_one_point_one_times_the_cache() {
        let c = 1000usize;
        let n = 1100u64;
        let pages: Vec<u64> = (0..20).flat_map(|_| 0..n).collect();
        let opt = replay(&mut Opt::new(c, &pages), &pages).hit_percent();
        assert!((85.0..92.0).contains(&opt), "OPT {opt}");
    }

    #[test]
    fn no_policy_beats_it() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let pages: Vec<u64> = (0..30_000)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 3 == 0 { (i / 3) % 700 } else { x % 400 }
            })
            .collect();
        for cap in [1usize, 16, 100, 350, 800] {
            let opt = replay(&mut Opt::new(cap, &pages), &pages).hits;
            for (name, hits) in [
                ("LRU", replay(&mut Lru::new(cap), &pages).hits),
                ("ARC", replay(&mut Arc::new(cap), &pages).hits),
                ("LIRS", replay(&mut Lirs::new(cap), &pages).hits),
            ] {
                assert!(opt >= hits, "cap {cap}: OPT {opt} < {name} {hits}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "past the sequence")]
    fn replaying_past_its_sequence_is_a_bug() {
        let mut o = Opt::new(1, &[1]);
        o.access(1);
        o.access(1);
    }
}

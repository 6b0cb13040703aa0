//! Synthetic access families for the policy bench (`policy --synthetic FAMILY`): page
//! sequences of the kinds where replacement policies part ways, each seeded and with its
//! parameters printed, so that a family is measured even where no trace of it ships here.
//!
//! Every family draws from a footprint of `footprint` pages (page numbers `0..footprint`) and
//! makes `requests` page reads:
//!
//! - `loop`: the pages in order, again and again (a loop longer than the cache defeats LRU and
//!   ARC; LIRS and OPT keep most of it).
//! - `zigzag`: windows of `window/2..=window` pages read forward and at once backward, window
//!   after window through the footprint, wrapping around: each page is read again soon, in
//!   reverse order (LRU-friendly; a policy that holds first reads briefly loses the re-reads).
//! - `scan-hot`: bursts of uniform reads of a hot set (a tenth of the footprint) between
//!   sequential scans of `window` cold pages each (scan resistance).
//! - `shifting`: uniform reads of a working set of an eighth of the footprint that moves on by
//!   half its size every four working sets' worth of reads (adapting to a new working set).
//! - `multi`: three pools interleaved read by read: a hot set of a twentieth of the footprint
//!   read uniformly (40 %), a loop over a quarter of it (30 %) and the rest read uniformly
//!   (30 %), as the LIRS paper's multi traces mix patterns of different reuse distances.

use std::fmt;

use anyhow::bail;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A family of synthetic page sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// A loop over the footprint.
    Loop,
    /// Windows read forward then backward.
    Zigzag,
    /// A hot set between sequential scans.
    ScanHot,
    /// A working set that moves.
    Shifting,
    /// Pools of different reuse distances interleaved.
    Multi,
}

impl Family {
    /// Every family.
    pub const ALL: [Family; 5] = [
        Family::Loop,
        Family::Zigzag,
        Family::ScanHot,
        Family::Shifting,
        Family::Multi,
    ];

    /// The name `--synthetic` takes.
    pub fn name(self) -> &'static str {
        match self {
            Family::Loop => "loop",
            Family::Zigzag => "zigzag",
            Family::ScanHot => "scan-hot",
            Family::Shifting => "shifting",
            Family::Multi => "multi",
        }
    }

    /// The family named `name`.
    pub fn parse(name: &str) -> anyhow::Result<Family> {
        match Family::ALL.iter().find(|f| f.name() == name) {
            Some(&f) => Ok(f),
            None => bail!(
                "no synthetic family {name:?}; one of: {}",
                Family::ALL.map(Family::name).join(", ")
            ),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One synthetic sequence: the family and its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    /// The family.
    pub family: Family,
    /// Distinct pages the sequence draws from.
    pub footprint: u64,
    /// Page reads.
    pub requests: u64,
    /// `zigzag`'s largest window and `scan-hot`'s scan length, in pages (0: a twentieth of
    /// the footprint for `zigzag`, a quarter for `scan-hot`).
    pub window: u64,
    /// The random generator's seed.
    pub seed: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            family: Family::Loop,
            footprint: 20_000,
            requests: 400_000,
            window: 0,
            seed: 1,
        }
    }
}

impl Spec {
    fn window_pages(&self) -> u64 {
        if self.window > 0 {
            return self.window;
        }
        match self.family {
            Family::Zigzag => self.footprint / 20,
            Family::ScanHot => self.footprint / 4,
            _ => 0,
        }
        .max(2)
    }

    /// The parameters in words (printed with the results).
    pub fn describe(&self) -> String {
        let f = self.footprint;
        let detail = match self.family {
            Family::Loop => format!("a loop over {f} pages"),
            Family::Zigzag => {
                let w = self.window_pages();
                format!(
                    "windows of {}..={w} pages forward then backward",
                    (w / 2).max(1)
                )
            }
            Family::ScanHot => format!(
                "hot set {} pages, scans of {} cold pages",
                (f / 10).max(1),
                self.window_pages()
            ),
            Family::Shifting => {
                let w = (f / 8).max(1);
                format!(
                    "working set {w} pages, moved by {} every {} reads",
                    (w / 2).max(1),
                    4 * w
                )
            }
            Family::Multi => format!(
                "hot {} pages 40%, loop {} pages 30%, uniform {} pages 30%",
                (f / 20).max(1),
                (f / 4).max(1),
                f - (f / 20).max(1) - (f / 4).max(1)
            ),
        };
        format!(
            "synthetic {}: footprint {f} pages, {} requests, seed {}; {detail}",
            self.family, self.requests, self.seed
        )
    }

    /// The page sequence.
    pub fn generate(&self) -> anyhow::Result<Vec<u64>> {
        let f = self.footprint;
        let n = usize::try_from(self.requests)?;
        if f < 40 {
            bail!("--footprint {f} is too small for a synthetic family (at least 40 pages)");
        }
        if n == 0 || n > 1 << 31 {
            bail!("--requests {n} is out of range (1 to 2^31)");
        }
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut out = Vec::with_capacity(n);
        match self.family {
            Family::Loop => out.extend((0..f).cycle().take(n)),
            Family::Zigzag => {
                let w = self.window_pages().min(f);
                let mut start = 0u64;
                while out.len() < n {
                    let len = rng.random_range((w / 2).max(1)..=w);
                    let pages: Vec<u64> = (start..start + len).map(|p| p % f).collect();
                    out.extend(pages.iter().copied());
                    out.extend(pages.iter().rev().copied());
                    start = (start + len) % f;
                }
            }
            Family::ScanHot => {
                let hot = (f / 10).max(1);
                let cold = f - hot;
                let scan = self.window_pages().min(cold);
                let mut cursor = 0u64;
                while out.len() < n {
                    for _ in 0..2 * hot {
                        out.push(rng.random_range(0..hot));
                    }
                    for _ in 0..scan {
                        out.push(hot + cursor);
                        cursor = (cursor + 1) % cold;
                    }
                }
            }
            Family::Shifting => {
                let w = (f / 8).max(1);
                let mut base = 0u64;
                while out.len() < n {
                    for _ in 0..4 * w {
                        out.push((base + rng.random_range(0..w)) % f);
                    }
                    base = (base + (w / 2).max(1)) % f;
                }
            }
            Family::Multi => {
                let hot = (f / 20).max(1);
                let looped = (f / 4).max(1);
                let rest = f - hot - looped;
                let mut cursor = 0u64;
                while out.len() < n {
                    let x: f64 = rng.random();
                    out.push(if x < 0.4 {
                        rng.random_range(0..hot)
                    } else if x < 0.7 {
                        cursor = (cursor + 1) % looped;
                        hot + cursor
                    } else {
                        hot + looped + rng.random_range(0..rest)
                    });
                }
            }
        }
        out.truncate(n);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_ref::{Lru, replay};

    fn spec(family: Family) -> Spec {
        Spec {
            family,
            footprint: 1000,
            requests: 20_000,
            ..Spec::default()
        }
    }

    #[test]
    fn every_family_is_seeded_and_stays_in_its_footprint() {
        for f in Family::ALL {
            let a = spec(f).generate().expect("generate");
            let b = spec(f).generate().expect("generate");
            assert_eq!(a.len(), 20_000, "{f}");
            assert_eq!(a, b, "{f}: the same seed gives the same sequence");
            assert!(a.iter().all(|&p| p < 1000), "{f}");
            let distinct: std::collections::HashSet<u64> = a.iter().copied().collect();
            assert!(
                distinct.len() > 500,
                "{f}: only {} distinct pages",
                distinct.len()
            );
            assert_eq!(Family::parse(f.name()).expect("parse"), f);
            assert!(spec(f).describe().contains(f.name()));
        }
        let other = Spec {
            seed: 2,
            ..spec(Family::Multi)
        };
        assert_ne!(
            other.generate().expect("generate"),
            spec(Family::Multi).generate().expect("generate")
        );
        assert!(Family::parse("zig").is_err());
    }

    #[test]
    fn each_family_has_its_shape() {
        // loop: LRU below the footprint hits nothing.
        let l = spec(Family::Loop).generate().expect("generate");
        assert_eq!(&l[..3], &[0, 1, 2]);
        assert_eq!(l[1000], 0);
        assert_eq!(replay(&mut Lru::new(900), &l).hits, 0);
        // zigzag: every window is read back in reverse right away, so an LRU of one window
        // hits about half of the reads.
        let z = spec(Family::Zigzag).generate().expect("generate");
        let lru = replay(&mut Lru::new(50), &z).hit_percent();
        assert!((45.0..=50.0).contains(&lru), "zigzag LRU(50) {lru}");
        // scan-hot: a cache of the hot set plus a little keeps the hot set only if it resists
        // scans; LRU of the hot set alone loses it at every scan.
        let s = spec(Family::ScanHot).generate().expect("generate");
        assert!(s[..200].iter().all(|&p| p < 100));
        assert!(s[200..450].windows(2).all(|w| w[1] == w[0] + 1));
        // shifting: the first phase stays within its working set.
        let h = spec(Family::Shifting).generate().expect("generate");
        assert!(h[..500].iter().all(|&p| p < 125));
        // multi: all three pools are read.
        let m = spec(Family::Multi).generate().expect("generate");
        assert!(m.iter().any(|&p| p < 50));
        assert!(m.iter().any(|&p| (50..300).contains(&p)));
        assert!(m.iter().any(|&p| p >= 300));
    }

    #[test]
    fn bad_parameters_are_refused() {
        let small = Spec {
            footprint: 10,
            ..spec(Family::Loop)
        };
        assert!(small.generate().is_err());
        let none = Spec {
            requests: 0,
            ..spec(Family::Loop)
        };
        assert!(none.generate().is_err());
    }
}

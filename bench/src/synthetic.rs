//! A synthetic disk whose bytes are computed, not stored: the content behind real address
//! traces (which carry no data) and behind the demo's generated image.
//!
//! The disk is cut into extents of `extent_bytes` (like files or unallocated runs of a file
//! system). Each extent is one of three kinds, chosen by a hash of its index: all zero
//! (`zero_fraction`), a copy of one of `common_extents` shared extents (`dup_fraction`: content
//! that appears many times), or unique pseudo-random bytes. The content is
//! deterministic in (seed, page index), so two disks with the same seed share everything and
//! a re-read returns the same bytes.

use bytes::Bytes;
use shadowcache_node::origin::{Origin, OriginFuture};

/// The mix of a synthetic disk's pages.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// Bytes per extent (a power of two, at least 8).
    pub extent_bytes: u64,
    /// Fraction of extents that are all zero.
    pub zero_fraction: f64,
    /// Fraction of extents that copy one of `common_extents` shared extents.
    pub dup_fraction: f64,
    /// How many distinct shared extents there are.
    pub common_extents: u64,
    /// Seed of the unique pages.
    pub seed: u64,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            extent_bytes: 64 * 1024,
            zero_fraction: 0.10,
            dup_fraction: 0.15,
            common_extents: 256,
            seed: 1,
        }
    }
}

fn mix64(mut x: u64) -> u64 {
    // splitmix64 finaliser: a cheap, well-spread hash.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Mix {
    /// Fills `out` (one extent, or part of one) with extent `page`'s bytes from `from` on.
    fn fill_page(&self, page: u64, from: usize, out: &mut [u8]) {
        let h = mix64(page ^ self.seed.rotate_left(17));
        let u = (h >> 11) as f64 / (1u64 << 53) as f64;
        if u < self.zero_fraction {
            out.fill(0);
            return;
        }
        let key = if u < self.zero_fraction + self.dup_fraction {
            // Shared pages do not depend on the seed: every disk has them.
            (mix64(h) % self.common_extents.max(1)) | (1 << 63)
        } else {
            page ^ self.seed << 40
        };
        let mut state = mix64(key);
        let start_word = from / 8;
        for _ in 0..start_word {
            state = mix64(state);
        }
        let mut i = 0;
        let skip = from % 8;
        let mut first = true;
        while i < out.len() {
            state = mix64(state);
            let word = state.to_le_bytes();
            let lo = if first { skip } else { 0 };
            first = false;
            let n = (8 - lo).min(out.len() - i);
            out[i..i + n].copy_from_slice(&word[lo..lo + n]);
            i += n;
        }
    }

    /// The bytes of [offset, offset + len).
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let mut at = 0usize;
        while at < len {
            let pos = offset + at as u64;
            let ext = self.extent_bytes.max(8);
            let page = pos / ext;
            let from = (pos % ext) as usize;
            let n = (ext as usize - from).min(len - at);
            self.fill_page(page, from, &mut out[at..at + n]);
            at += n;
        }
        out
    }
}

/// An origin serving a [`Mix`].
#[derive(Debug)]
pub struct SyntheticOrigin {
    mix: Mix,
    size: u64,
    name: String,
}

impl SyntheticOrigin {
    /// A disk of `size` bytes.
    pub fn new(mix: Mix, size: u64) -> Self {
        SyntheticOrigin {
            mix,
            size,
            name: format!("synthetic(seed={}, {} bytes)", mix.seed, size),
        }
    }
}

impl Origin for SyntheticOrigin {
    fn describe(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> OriginFuture<'_, Bytes> {
        let b = Bytes::from(self.mix.read(offset, len));
        Box::pin(async move { Ok(b) })
    }

    fn write_at(&self, _offset: u64, _data: Bytes) -> OriginFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn flush(&self) -> OriginFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn identity(&self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_range_reads_the_same_bytes_as_whole_pages() {
        let m = Mix::default();
        let whole = m.read(0, 512 * 1024);
        for (off, len) in [(1u64, 10usize), (4095, 2), (65_530, 9000), (13, 400_000)] {
            assert_eq!(m.read(off, len), whole[off as usize..off as usize + len]);
        }
    }

    #[test]
    fn the_mix_has_zero_shared_and_unique_extents() {
        let m = Mix::default();
        let e = m.extent_bytes;
        let pages: Vec<Vec<u8>> = (0..2000).map(|p| m.read(p * e, e as usize)).collect();
        let zero = pages.iter().filter(|p| p.iter().all(|b| *b == 0)).count();
        let distinct: std::collections::HashSet<&Vec<u8>> = pages.iter().collect();
        assert!((100..300).contains(&zero), "zero pages: {zero}");
        assert!(distinct.len() < 2000 - zero, "no shared pages");
        // Another seed's disk holds the common extents too (elsewhere), but none of the unique ones.
        let other = Mix { seed: 2, ..m };
        let seen: std::collections::HashSet<Vec<u8>> = pages
            .iter()
            .filter(|p| p.iter().any(|b| *b != 0))
            .cloned()
            .collect();
        let shared = (0..2000)
            .map(|p| other.read(p * e, e as usize))
            .filter(|x| x.iter().any(|b| *b != 0) && seen.contains(x))
            .count();
        assert!(
            (150..500).contains(&shared),
            "extents shared with another seed: {shared}"
        );
    }
}

//! Fingerprints: the BLAKE3-256 digest of a block's bytes, the content cache's key.
//!
//! Architecture invariant: a fingerprint is only ever computed from the bytes it names; nothing
//! here trusts a fingerprint it is handed.

use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};

/// BLAKE3-256 of a block's bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

/// A fingerprint is already a uniform hash: tables hash its first eight bytes, not all 32.
impl Hash for Fingerprint {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.short());
    }
}

/// Hasher for tables keyed by [`Fingerprint`]: one keyed 64-bit mix of the fingerprint's first
/// eight bytes instead of SipHash over 32. The per-process random key keeps an attacker who
/// controls block contents from aiming many fingerprints at one bucket.
#[derive(Debug, Clone, Copy)]
pub struct FingerprintHashing {
    key: u64,
}

impl Default for FingerprintHashing {
    fn default() -> Self {
        FingerprintHashing {
            key: crate::hashing::key(0x5eed_u64),
        }
    }
}

impl BuildHasher for FingerprintHashing {
    type Hasher = FingerprintHasher;

    fn build_hasher(&self) -> FingerprintHasher {
        FingerprintHasher {
            key: self.key,
            state: self.key,
        }
    }
}

/// See [`FingerprintHashing`].
#[derive(Debug, Clone, Copy)]
pub struct FingerprintHasher {
    key: u64,
    state: u64,
}

/// SplitMix64's finaliser: a bijective 64-bit mix (the tables' hashes and the cache policy's
/// ghost keys use it, keyed with a per-process random value).
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Hasher for FingerprintHasher {
    fn write_u64(&mut self, x: u64) {
        self.state = mix64(self.state ^ x ^ self.key.rotate_left(32));
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached by keys other than fingerprints; correct, if slower.
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

impl Fingerprint {
    /// Hashes `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Fingerprint(*blake3::hash(bytes).as_bytes())
    }

    /// True when `bytes` hash to this fingerprint.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        // blake3::Hash compares in constant time; speed, not secrecy, is what matters here,
        // but the comparison is as cheap either way.
        blake3::hash(bytes) == blake3::Hash::from_bytes(self.0)
    }

    /// The first eight bytes as an integer: a well-mixed partial key for hash tables.
    pub fn short(&self) -> u64 {
        u64::from_le_bytes([
            self.0[0], self.0[1], self.0[2], self.0[3], self.0[4], self.0[5], self.0[6], self.0[7],
        ])
    }

    /// Lower-case hex, as in logs and the CLI.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// True when every byte of `bytes` is zero. Such blocks are never stored.
pub fn is_zero(bytes: &[u8]) -> bool {
    // Eight bytes at a time, then the unaligned tail byte by byte.
    let mut words = bytes.chunks_exact(8);
    words
        .by_ref()
        .all(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) == 0)
        && words.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_matches_its_bytes_and_nothing_else() {
        let fp = Fingerprint::of(b"hello");
        assert!(fp.matches(b"hello"));
        assert!(!fp.matches(b"hellp"));
        assert_eq!(fp.to_hex().len(), 64);
    }

    #[test]
    fn zero_detection_checks_every_byte() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4099]));
        for at in [0, 7, 8, 4095, 4098] {
            let mut b = vec![0u8; 4099];
            b[at] = 1;
            assert!(!is_zero(&b), "a one at {at} was missed");
        }
    }
}

//! The node's hash maps and sets, and the hasher behind them.
//!
//! In production a map's hasher is keyed at random per process, as the standard library's
//! (an attacker who picks keys cannot make a map slow). In a test build (`failpoints`), every
//! map hashes with a fixed key, so that a map iterates in the same order in every run: the
//! seeded simulation ([`crate::sim`]) sends revocations, refreshes members and subscriptions
//! in map order, and a seed would otherwise not replay the same history.
//!
//! Determinism in a test build also depends on the toolchain: `DefaultHasher`'s algorithm may
//! change between Rust versions (a seed replays on the build that ran it).
//!
//! Architecture invariant: a map the node iterates is one of these types, a `DashMap` built
//! with [`dash_map`].

/// The hasher of the node's maps: random keys in production, fixed keys in a test build.
#[cfg(not(feature = "failpoints"))]
pub type State = std::collections::hash_map::RandomState;

/// The hasher of the node's maps: random keys in production, fixed keys in a test build.
#[cfg(feature = "failpoints")]
pub type State = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// A standard hash map with the node's hasher (build it with `default()`).
pub type HashMap<K, V> = std::collections::HashMap<K, V, State>;

/// A standard hash set with the node's hasher (build it with `default()`).
pub type HashSet<K> = std::collections::HashSet<K, State>;

/// A concurrent map with the node's hasher (build it with `default()`).
pub type DashMap<K, V> = dashmap::DashMap<K, V, State>;

/// An empty [`DashMap`]. In a test build its number of shards is fixed: a map iterates shard
/// by shard, and the default number follows the machine's cores, so that a seed would not
/// replay the same on a machine with another count.
pub fn dash_map<K: Eq + std::hash::Hash, V>() -> DashMap<K, V> {
    #[cfg(feature = "failpoints")]
    {
        dashmap::DashMap::with_hasher_and_shard_amount(State::default(), 16)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        DashMap::default()
    }
}

/// Keys fixed by a benchmark ([`fix_keys`]), if one did.
static FIXED_KEYS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Makes [`key`] return keys derived from `seed` in this process from now on, so that a
/// benchmark's run repeats exactly: the cache policy's duel samples keys, and the pools'
/// shards split them, by these keys (random per process, they move P3 and P6 sweep points by
/// about 2 between runs). Call it before the first cache is built. Only benchmarks call it:
/// whoever knows the seed could aim block contents at one bucket. Returns false when keys were
/// fixed before with another seed (they stay as they were).
pub fn fix_keys(seed: u64) -> bool {
    *FIXED_KEYS.get_or_init(|| seed) == seed
}

/// A 64-bit key for hashers of our own: random per process in production, fixed in a test
/// build or by [`fix_keys`].
pub fn key(salt: u64) -> u64 {
    use std::hash::BuildHasher;
    if let Some(&seed) = FIXED_KEYS.get() {
        return crate::cache::mix64(crate::cache::mix64(seed) ^ salt);
    }
    State::default().hash_one(salt)
}

#[cfg(test)]
mod tests {
    #[test]
    fn maps_build_with_default_and_hold_what_is_put_in() {
        let mut m = super::HashMap::default();
        m.insert("a", 1);
        let d = super::dash_map();
        d.insert("b", 2);
        assert_eq!((m["a"], *d.get("b").expect("b")), (1, 2));
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn a_test_build_hashes_the_same_in_every_map() {
        let fill = || {
            let mut s = super::HashSet::default();
            s.extend((0..64).map(|i| format!("member-{i}")));
            s.into_iter().collect::<Vec<_>>()
        };
        assert_eq!(fill(), fill());
        assert_eq!(super::key(7), super::key(7));
    }
}

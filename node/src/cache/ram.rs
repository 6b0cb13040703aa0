//! The RAM pools: single-touch and the RAM part of multi-touch, both moka caches with LRU
//! eviction, weighed in payload bytes.
//!
//! moka's default TinyLFU policy may refuse to admit a new key, which would break "a first read
//! always lands in single-touch"; the LRU policy never refuses. Eviction in moka is lazy (it runs
//! on later calls or in `run_pending_tasks`), so sizes may overshoot briefly.
//!
//! Architecture invariant: listeners never do I/O. An eviction from multi-touch becomes a
//! demotion handed to a bounded queue (see `mod.rs`); when the queue is full the entry is
//! dropped rather than blocking the reader that triggered maintenance.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use super::fingerprint::{Fingerprint, FingerprintHashing};

/// One cached block: its bytes and how many disk blocks have mapped to it (dedup accounting).
#[derive(Debug)]
pub struct Entry {
    /// The block's bytes; cloning shares them.
    pub bytes: Bytes,
    /// Disk blocks that mapped to this entry while it was cached.
    pub refs: AtomicU32,
}

impl Entry {
    /// A new entry with one reference.
    pub fn new(bytes: Bytes, refs: u32) -> Arc<Self> {
        Arc::new(Entry {
            bytes,
            refs: AtomicU32::new(refs.max(1)),
        })
    }

    /// Payload length in bytes.
    pub fn payload_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Bytes this entry stands for: references times length.
    pub fn logical_bytes(&self) -> u64 {
        u64::from(self.refs.load(Ordering::Relaxed)) * self.payload_bytes()
    }
}

/// A pool's value type.
pub type Value = Arc<Entry>;

/// A pool: a moka cache of fingerprint -> entry.
pub type Pool = Cache<Fingerprint, Value, FingerprintHashing>;

/// Builds a pool of `capacity_bytes` whose listener sees every removal caused by size.
pub fn pool(
    name: &'static str,
    capacity_bytes: u64,
    on_evict: impl Fn(Fingerprint, Value) + Send + Sync + 'static,
) -> Pool {
    Cache::builder()
        .name(name)
        .max_capacity(capacity_bytes)
        .weigher(|_k: &Fingerprint, v: &Value| u32::try_from(v.bytes.len()).unwrap_or(u32::MAX))
        .eviction_policy(EvictionPolicy::lru())
        .eviction_listener(move |k: Arc<Fingerprint>, v: Value, cause| {
            // Explicit removals are promotions, replacements are re-inserts: the entry lives on.
            if cause == RemovalCause::Size {
                on_evict(*k, v);
            }
        })
        .build_with_hasher(FingerprintHashing::default())
}

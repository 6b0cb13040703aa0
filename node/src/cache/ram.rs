//! A cached block as the demotion queue and the SSD writer hold it (shared between threads).
//! The RAM pools keep theirs inline ([`super::pool::Cached`]).
//!
//! Architecture invariant: bytes and dedup references only; no policy here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;

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

//! Leaf identifiers shared by the cluster modules.
//!
//! A node id names a host's role in the cluster (by default its host name), and can outlive any
//! one process: a restart, or by accident a cloned host, brings another process with the same
//! id. An [`Incarnation`] names one process: the id and its boot (the gossip generation it
//! joined with, different after every start). Leases are granted to an incarnation and only
//! that incarnation's acknowledgement ends one, so a second process with a reused id can never
//! stand in for the holder.
//!
//! Architecture invariant: plain values only; nothing here reads a clock, the network or a file.

use std::fmt;
use std::sync::Arc;

/// One process of a node id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Incarnation {
    /// The node id.
    pub id: Arc<str>,
    /// Its boot: the gossip generation this process joined with.
    pub boot: u64,
}

impl Incarnation {
    /// Incarnation `boot` of node `id`.
    pub fn new(id: &str, boot: u64) -> Self {
        Incarnation {
            id: Arc::from(id),
            boot,
        }
    }
}

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (incarnation {})", self.id, self.boot)
    }
}

/// A boot id for a process starting now: milliseconds since the Unix epoch in the high bits
/// (so a later start compares greater, as gossip expects), `random` in the low 12 bits (so two
/// processes started in the same millisecond still differ).
pub fn boot_id(unix_ms: u64, random: u64) -> u64 {
    (unix_ms << 12) | (random & 0xfff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_starts_compare_greater_and_same_millisecond_starts_differ() {
        assert!(boot_id(1001, 0) > boot_id(1000, 0xfff));
        assert_ne!(boot_id(1000, 1), boot_id(1000, 2));
        assert_eq!(Incarnation::new("b", 7).to_string(), "b (incarnation 7)");
    }
}

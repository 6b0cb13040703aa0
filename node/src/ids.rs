//! Leaf identifiers shared by every module: disk ids, member incarnations, and the generation
//! and epoch that name one version of a disk between members.
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

/// A disk's id: 1 to 128 characters of `[A-Za-z0-9._-]`, not starting with '.'.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskId(Arc<str>);

/// A string that is not a disk id (it becomes [`crate::error::Error::InvalidDiskId`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid disk id {0:?}")]
pub struct InvalidDiskId(pub String);

impl DiskId {
    /// Checks and wraps an id.
    pub fn parse(s: &str) -> Result<Self, InvalidDiskId> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if ok {
            Ok(DiskId(s.into()))
        } else {
            Err(InvalidDiskId(s.chars().take(160).collect()))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for DiskId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A generation of a disk: its owner starts a new one at every write that ends a detection, so
/// content maps, leases and cached blocks of one generation are never served for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Generation(pub u64);

/// An epoch of a disk: random per registration at its owner, so a disk registered again (or an
/// owner's registry restored from elsewhere) never matches what members knew of the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Epoch(pub u64);

/// One version of a disk as members name it to its owner: (generation, epoch). A request for
/// another version than the owner's is refused, never answered from the wrong one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Version {
    /// The generation.
    pub generation: Generation,
    /// The epoch.
    pub epoch: Epoch,
}

impl Version {
    /// Generation `generation` of epoch `epoch`.
    pub fn new(generation: u64, epoch: u64) -> Self {
        Version {
            generation: Generation(generation),
            epoch: Epoch(epoch),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "generation {} of epoch {}",
            self.generation.0, self.epoch.0
        )
    }
}

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

/// The environment variable that gives the kernel's boot id where `/proc/sys` is hidden (the
/// systemd unit's `ProcSubset=pid`; it sets it from `%b`).
pub const HOST_BOOT_ENV: &str = "SHADOWCACHE_HOST_BOOT";

/// This host's boot: the first 8 bytes of a BLAKE3 hash of the kernel's boot id (from
/// [`HOST_BOOT_ENV`], else `/proc/sys/kernel/random/boot_id`), which changes only when the
/// host restarts (and with it every page cache). 0 when neither can be read: then nobody
/// compares it.
pub fn host_boot() -> u64 {
    let env = std::env::var(HOST_BOOT_ENV).ok();
    let proc = || std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok();
    env.filter(|v| !v.trim().is_empty())
        .or_else(proc)
        .map_or(0, |id| boot_hash(&id))
}

/// The hash of a boot id, however it is written: as the kernel writes it (lowercase, dashed
/// 8-4-4-4-12), which systemd's `%b` (32 digits) is turned into first. The same as the release
/// before `%b` was read, so an owner upgraded on a host that did not restart keeps its value.
fn boot_hash(id: &str) -> u64 {
    let mut id = id.trim().to_ascii_lowercase();
    if id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()) {
        id = format!(
            "{}-{}-{}-{}-{}",
            &id[..8],
            &id[8..12],
            &id[12..16],
            &id[16..20],
            &id[20..]
        );
    }
    let h = blake3::hash(id.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8])).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_boot_is_read_once_the_same() {
        let b = host_boot();
        assert_ne!(b, 0, "no /proc/sys/kernel/random/boot_id on a Linux host?");
        assert_eq!(host_boot(), b);
        // systemd's %b is the same id without dashes; the value is the one the kernel's form
        // had before (the hash of the trimmed file).
        let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
        assert_eq!(boot_hash(&id.replace('-', "").to_uppercase()), b);
        let old = blake3::hash(id.trim().as_bytes());
        assert_eq!(
            u64::from_le_bytes(old.as_bytes()[..8].try_into().expect("8")).max(1),
            b
        );
    }

    #[test]
    fn later_starts_compare_greater_and_same_millisecond_starts_differ() {
        assert!(boot_id(1001, 0) > boot_id(1000, 0xfff));
        assert_ne!(boot_id(1000, 1), boot_id(1000, 2));
        assert_eq!(Incarnation::new("b", 7).to_string(), "b (incarnation 7)");
    }
}

//! Block maps: which blocks of an immutable disk each member holds.
//!
//! Every member keeps, for each immutable disk it serves through its cache, a roaring bitmap of
//! the blocks it has loaded ([`HeldBlocks`], in the disk object). Other members subscribe to it
//! over gRPC (`Peer.SubscribeBlockMap`): a snapshot first, then the changes, batched every
//! [`DELTA_INTERVAL`]. A subscriber keeps one bitmap per member and disk ([`RemoteMaps`]); a
//! miss asks a member whose map shows the block, the less loaded of two picked at random, before
//! the block's home and the owner. A map of another generation or epoch, or of a member that
//! left, is dropped. Maps name a member incarnation (id and boot): a member that restarts, or
//! another process with its id, starts from an empty map, and a holder is asked only while
//! membership shows the incarnation whose map it was. A bit can outlive its block in the holder's cache (evictions are not
//! tracked); such a holder answers "missing", clears the bit, and the asker moves on.
//!
//! Architecture invariant: block maps only say where to *ask*; every block from a member is
//! still verified against the owner's fingerprint.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::hashing::DashMap;
use bytes::Bytes;
use roaring::RoaringBitmap;

/// How often changes of a map are sent to subscribers.
pub const DELTA_INTERVAL: Duration = Duration::from_millis(250);

/// A subscriber that takes no message for this long is dropped.
pub const STALLED_SUBSCRIBER: Duration = Duration::from_secs(30);
/// Largest bitmap payload in one message.
const MAX_BITS_BYTES: usize = 4 << 20;

/// One message of a block map stream: `Peer.SubscribeBlockMap`'s `BlockMapUpdate` without
/// the wire.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Update {
    /// The generation the map is of.
    pub generation: u64,
    /// Forget what was known of this map before this message.
    pub reset: bool,
    /// Blocks held, as a roaring bitmap (portable serialization).
    pub bits: Bytes,
    /// Blocks no longer held.
    pub removed: Vec<u32>,
}

#[derive(Debug, Default)]
struct Held {
    bits: RoaringBitmap,
    version: u64,
}

/// The blocks of one disk this node holds.
#[derive(Debug, Default)]
pub struct HeldBlocks {
    inner: parking_lot::Mutex<Held>,
}

impl HeldBlocks {
    /// Block `index` is held now.
    pub fn insert(&self, index: u64) {
        let Ok(i) = u32::try_from(index) else {
            return;
        };
        let mut h = self.inner.lock();
        if h.bits.insert(i) {
            h.version += 1;
        }
    }

    /// Block `index` is not held (found missing when asked for).
    pub fn remove(&self, index: u64) {
        let Ok(i) = u32::try_from(index) else {
            return;
        };
        let mut h = self.inner.lock();
        if h.bits.remove(i) {
            h.version += 1;
        }
    }

    /// The version (changes with every change) and, if it differs from `known`, a copy.
    fn snapshot_if_changed(&self, known: Option<u64>) -> Option<(u64, RoaringBitmap)> {
        let h = self.inner.lock();
        (known != Some(h.version)).then(|| (h.version, h.bits.clone()))
    }
}

fn serialize(bits: &RoaringBitmap) -> Bytes {
    let mut v = Vec::with_capacity(bits.serialized_size());
    // Writing to a Vec cannot fail.
    let _ = bits.serialize_into(&mut v);
    Bytes::from(v)
}

/// `bits` as messages of at most [`MAX_BITS_BYTES`], the first one with `reset`.
fn snapshot_messages(generation: u64, bits: &RoaringBitmap) -> Vec<Update> {
    if bits.serialized_size() <= MAX_BITS_BYTES {
        return vec![Update {
            generation,
            reset: true,
            bits: serialize(bits),
            removed: Vec::new(),
        }];
    }
    // Split by value: a chunk of 2^20 values serializes to at most about 2.1 MiB.
    let mut out = Vec::new();
    let mut part = RoaringBitmap::new();
    for v in bits.iter() {
        part.insert(v);
        if part.len() >= 1 << 20 {
            out.push(std::mem::take(&mut part));
        }
    }
    if !part.is_empty() || out.is_empty() {
        out.push(part);
    }
    out.iter()
        .enumerate()
        .map(|(n, p)| Update {
            generation,
            reset: n == 0,
            bits: serialize(p),
            removed: Vec::new(),
        })
        .collect()
}

/// Streams `held` to a subscriber until `alive` says the disk's generation is over or the
/// subscriber goes: a snapshot, then the changes every [`DELTA_INTERVAL`].
pub fn serve(
    held: Arc<dyn AsHeld>,
    generation: u64,
    alive: impl Fn() -> bool + Send + 'static,
) -> tokio::sync::mpsc::Receiver<Update> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut sent = RoaringBitmap::new();
        let mut version = None;
        let mut tick = tokio::time::interval(DELTA_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !alive() || tx.is_closed() {
                break;
            }
            let Some((v, now)) = held.held().snapshot_if_changed(version) else {
                continue;
            };
            let msgs = if version.is_none() {
                snapshot_messages(generation, &now)
            } else {
                let added = &now - &sent;
                let removed: Vec<u32> = (&sent - &now).iter().collect();
                let mut msgs = if added.is_empty() {
                    Vec::new()
                } else {
                    let mut m = snapshot_messages(generation, &added);
                    for u in &mut m {
                        u.reset = false;
                    }
                    m
                };
                if !removed.is_empty() {
                    msgs.push(Update {
                        generation,
                        reset: false,
                        bits: Bytes::new(),
                        removed,
                    });
                }
                msgs
            };
            for m in msgs {
                // A subscriber that takes nothing does not keep this task, or the messages
                // it holds, past the disk's generation or shutdown (`alive`), nor for more
                // than [`STALLED_SUBSCRIBER`] (found in review: a subscriber that stopped
                // reading and subscribed again left this task blocked here for good).
                let deadline = tokio::time::Instant::now() + STALLED_SUBSCRIBER;
                let send = tx.send(m);
                tokio::pin!(send);
                loop {
                    tokio::select! {
                        r = &mut send => {
                            if r.is_err() {
                                return;
                            }
                            break;
                        }
                        _ = tick.tick() => {
                            if !alive() || tokio::time::Instant::now() >= deadline {
                                return;
                            }
                        }
                    }
                }
            }
            version = Some(v);
            sent = now;
        }
    });
    rx
}

/// Something that holds a [`HeldBlocks`] (a disk).
pub trait AsHeld: Send + Sync {
    /// Its block map.
    fn held(&self) -> &HeldBlocks;
}

/// One member incarnation's map.
#[derive(Debug, Default)]
struct MemberMap {
    boot: u64,
    bits: RoaringBitmap,
}

/// The block maps of one disk (at one generation and epoch) of every other member, by member
/// id, each of one incarnation (boot) of that member.
#[derive(Debug)]
pub struct RemoteMaps {
    /// The generation these maps are for.
    pub generation: u64,
    /// The epoch.
    pub epoch: u64,
    /// The disk's blocks: a member's map shows none past them.
    blocks: u64,
    maps: DashMap<String, MemberMap>,
    bytes: AtomicU64,
}

impl RemoteMaps {
    /// No maps yet, of a disk of `blocks` blocks.
    pub fn new(generation: u64, epoch: u64, blocks: u64) -> Self {
        RemoteMaps {
            generation,
            epoch,
            blocks,
            maps: crate::hashing::dash_map(),
            bytes: AtomicU64::new(0),
        }
    }

    /// Member incarnations (id, boot) whose map shows block `index`.
    pub fn holders(&self, index: u64) -> Vec<(String, u64)> {
        let Ok(i) = u32::try_from(index) else {
            return Vec::new();
        };
        self.maps
            .iter()
            .filter(|m| m.value().bits.contains(i))
            .map(|m| (m.key().clone(), m.value().boot))
            .collect()
    }

    /// Blocks each member holds, by member.
    pub fn coverage(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .maps
            .iter()
            .map(|m| (m.key().clone(), m.value().bits.len()))
            .collect();
        v.sort();
        v
    }

    /// Applies one update from incarnation `boot` of `member`; an update that does not decode
    /// drops its map, one of a newer incarnation than the map's starts a new map, and one of
    /// an older incarnation is refused. Returns the bytes it carried.
    pub fn apply(&self, member: &str, boot: u64, u: &Update) -> Result<u64, String> {
        if let Some(m) = self.maps.get(member)
            && m.boot > boot
        {
            return Err(format!(
                "map of incarnation {boot} of {member:?}, which is at {} now",
                m.boot
            ));
        }
        if u.generation != self.generation {
            return Err(format!(
                "map of generation {} for generation {}",
                u.generation, self.generation
            ));
        }
        let mut bits = if u.bits.is_empty() {
            RoaringBitmap::new()
        } else {
            RoaringBitmap::deserialize_from(&u.bits[..]).map_err(|e| {
                self.forget(member, boot);
                format!("undecodable block map: {e}")
            })?
        };
        // Blocks past the disk's end are no one's: a member that claims them (up to 2^32 bits)
        // would make this map as large as it likes, whatever the disk's size.
        if bits.max().is_some_and(|b| u64::from(b) >= self.blocks) {
            tracing::debug!(%member, blocks = self.blocks, "a block map showed blocks past the disk's end; dropped");
            bits.remove_range(u32::try_from(self.blocks).unwrap_or(u32::MAX)..);
        }
        let mut fresh = false;
        let mut m = self.maps.entry(member.to_string()).or_insert_with(|| {
            fresh = true;
            MemberMap {
                boot,
                bits: RoaringBitmap::new(),
            }
        });
        let before = if fresh {
            0
        } else {
            m.bits.serialized_size() as u64
        };
        if u.reset || m.boot < boot {
            // Another incarnation's map says nothing of what this one holds.
            m.boot = boot;
            m.bits = bits;
        } else {
            m.bits |= bits;
        }
        for r in &u.removed {
            m.bits.remove(*r);
        }
        let after = m.bits.serialized_size() as u64;
        drop(m);
        self.bytes.fetch_add(after, Ordering::Relaxed);
        self.bytes.fetch_sub(before, Ordering::Relaxed);
        Ok(u.bits.len() as u64 + 4 * u.removed.len() as u64 + 16)
    }

    /// Notes that incarnation `boot` of `member` does not hold block `index` after all.
    pub fn not_held(&self, member: &str, boot: u64, index: u64) {
        if let (Ok(i), Some(mut m)) = (u32::try_from(index), self.maps.get_mut(member))
            && m.boot == boot
        {
            let before = m.bits.serialized_size() as u64;
            if m.bits.remove(i) {
                let after = m.bits.serialized_size() as u64;
                self.bytes.fetch_add(after, Ordering::Relaxed);
                self.bytes.fetch_sub(before, Ordering::Relaxed);
            }
        }
    }

    /// Drops the map of incarnation `boot` of `member` (a newer incarnation's stays).
    pub fn forget(&self, member: &str, boot: u64) {
        if let Some((_, m)) = self.maps.remove_if(member, |_, m| m.boot == boot) {
            self.bytes
                .fetch_sub(m.bits.serialized_size() as u64, Ordering::Relaxed);
        }
    }

    /// Serialized bytes of the maps held.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct D(HeldBlocks);
    impl AsHeld for D {
        fn held(&self) -> &HeldBlocks {
            &self.0
        }
    }

    /// Found in review: a subscriber that stopped reading left the serving task blocked on a
    /// full channel for good, past its disk's generation and past shutdown. It ends once the
    /// generation is over, and after [`STALLED_SUBSCRIBER`] in any case.
    #[tokio::test(start_paused = true)]
    async fn a_subscriber_that_takes_nothing_does_not_keep_its_stream() {
        for end_alive in [false, true] {
            let d = Arc::new(D(HeldBlocks::default()));
            d.0.insert(0);
            let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let a = alive.clone();
            let rx = serve(d.clone(), 7, move || a.load(Ordering::SeqCst));
            // A change every tick: a message each, more than the channel holds.
            for i in 1..8 {
                tokio::time::sleep(DELTA_INTERVAL).await;
                d.0.insert(i);
            }
            tokio::time::sleep(DELTA_INTERVAL * 2).await;
            assert_eq!(rx.len(), 4, "the channel is full");
            assert_eq!(
                rx.sender_strong_count(),
                1,
                "serving, blocked on the full channel"
            );
            let wait = if end_alive {
                STALLED_SUBSCRIBER + DELTA_INTERVAL * 4
            } else {
                alive.store(false, Ordering::SeqCst);
                DELTA_INTERVAL * 4
            };
            tokio::time::sleep(wait).await;
            assert_eq!(
                rx.sender_strong_count(),
                0,
                "the stream still served (alive kept: {end_alive})"
            );
        }
    }

    #[tokio::test]
    async fn a_subscriber_sees_the_snapshot_then_the_changes() {
        let d = Arc::new(D(HeldBlocks::default()));
        for i in [1u64, 5, 9] {
            d.0.insert(i);
        }
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let a = alive.clone();
        let mut rx = serve(d.clone(), 7, move || a.load(Ordering::SeqCst));
        let remote = RemoteMaps::new(7, 1, 1 << 20);
        let first = rx.recv().await.expect("snapshot");
        assert!(first.reset);
        remote.apply("m", 1, &first).expect("apply");
        assert_eq!(remote.holders(5), vec![("m".to_string(), 1)]);
        assert!(remote.holders(6).is_empty());
        d.0.insert(6);
        d.0.remove(1);
        let mut seen = 0;
        while seen < 2 {
            let u = rx.recv().await.expect("delta");
            assert!(!u.reset);
            remote.apply("m", 1, &u).expect("apply");
            seen = usize::from(!remote.holders(6).is_empty())
                + usize::from(remote.holders(1).is_empty());
        }
        assert_eq!(remote.coverage(), vec![("m".to_string(), 3)]);
        assert!(remote.bytes() > 0);
        // Another generation's update is refused; a garbled one drops the map.
        let mut stale = first.clone();
        stale.generation = 6;
        assert!(remote.apply("m", 1, &stale).is_err());
        let garbled = Update {
            generation: 7,
            reset: true,
            bits: Bytes::from_static(b"not a bitmap"),
            removed: vec![],
        };
        assert!(remote.apply("m", 1, &garbled).is_err());
        assert!(remote.holders(5).is_empty());
        assert_eq!(remote.bytes(), 0);
        // A map names an incarnation: the next one's first update replaces it, even one that
        // is not a reset, and the older incarnation can neither change nor drop the newer map.
        let mut first = first.clone();
        first.bits = serialize(&[1u32, 5, 9].into_iter().collect());
        remote.apply("m", 1, &first).expect("apply");
        let delta = Update {
            generation: 7,
            reset: false,
            bits: serialize(&[2u32].into_iter().collect()),
            removed: vec![],
        };
        remote.apply("m", 2, &delta).expect("apply");
        assert_eq!(remote.holders(2), vec![("m".to_string(), 2)]);
        assert!(remote.holders(5).is_empty(), "the old incarnation's blocks");
        assert!(remote.apply("m", 1, &first).is_err(), "the old incarnation");
        assert_eq!(remote.holders(2), vec![("m".to_string(), 2)]);
        assert!(remote.holders(5).is_empty(), "the old incarnation's update");
        remote.not_held("m", 1, 2);
        remote.forget("m", 1);
        assert_eq!(remote.holders(2), vec![("m".to_string(), 2)]);
        remote.not_held("m", 2, 2);
        assert!(remote.holders(2).is_empty());
        remote.forget("m", 2);
        assert_eq!(remote.bytes(), 0);
        alive.store(false, Ordering::SeqCst);
        while rx.recv().await.is_some() {}
    }

    /// Found in review: a member's map was merged whatever indices it showed, so one member
    /// could make a subscriber hold 2^32 bits for a disk of a few blocks.
    #[test]
    fn blocks_past_the_disks_end_are_dropped_from_a_members_map() {
        let r = RemoteMaps::new(1, 1, 100);
        let mut bits = RoaringBitmap::new();
        bits.insert_range(50..u32::MAX);
        let mut buf = Vec::new();
        bits.serialize_into(&mut buf).expect("serialize");
        let u = Update {
            generation: 1,
            reset: true,
            bits: Bytes::from(buf),
            removed: Vec::new(),
        };
        r.apply("liar", 1, &u).expect("apply");
        assert_eq!(r.coverage(), vec![("liar".to_string(), 50)]);
        assert_eq!(r.holders(99), vec![("liar".to_string(), 1)]);
        assert!(r.holders(100).is_empty());
        assert!(r.bytes() < 1024, "{} bytes held", r.bytes());
    }

    #[test]
    fn a_large_map_is_split_into_bounded_messages() {
        let mut bits = RoaringBitmap::new();
        // Every other block of 40M: about 5 MiB serialized as bitmaps.
        for i in (0..40_000_000u32).step_by(2) {
            bits.insert(i);
        }
        let msgs = snapshot_messages(1, &bits);
        assert!(msgs.len() > 1);
        assert!(msgs[0].reset && msgs[1..].iter().all(|m| !m.reset));
        assert!(msgs.iter().all(|m| m.bits.len() <= MAX_BITS_BYTES));
        let r = RemoteMaps::new(1, 1, 40_000_000);
        for m in &msgs {
            r.apply("x", 1, m).expect("apply");
        }
        assert_eq!(r.coverage(), vec![("x".to_string(), 20_000_000)]);
    }
}

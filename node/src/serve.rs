//! What this node answers other members (the Peer service's rules): content maps and blocks
//! of the disks it owns or shadows, its block maps, reads, writes and flushes of the disks it
//! owns on their behalf, lease grants (as an owner) and revocations (as a holder).
//!
//! Architecture invariant: nothing here forwards a request again (a request cannot loop
//! between members), and nothing here is answered for a generation or epoch other than the
//! one asked for.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use crate::disk::DiskState;
use crate::error::{Error, Result};
use crate::ids::{Epoch, Generation, Incarnation, Version};
use crate::{Node, Route, cluster, disk};

/// Parts of a content map chunk (64 blocks each) read and fingerprinted at once.
const MAP_FILL_PARTS: usize = 4;

impl Node {
    /// Checks that a request about `d` names its current generation and epoch (0: any).
    pub(crate) fn check_generation(d: &disk::Disk, generation: u64, epoch: u64) -> Result<()> {
        if crate::guard_removed("guard-generation-check") {
            return Ok(());
        }
        if (generation != 0 && d.generation() != generation) || (epoch != 0 && d.epoch != epoch) {
            return Err(Error::StaleGeneration {
                disk: d.id.to_string(),
                asked: generation,
                current: d.generation(),
            });
        }
        Ok(())
    }

    /// Entries of the content map of a sealed or detected disk this node owns, in [first,
    /// first + count) (at most 4096), for `Peer.ContentMap`. Blocks not read yet are read
    /// (through the cache) and fingerprinted first, so that the answer covers the whole range:
    /// a member learns every fingerprint before it fetches a byte. A block that cannot be read
    /// is left out (the member then asks the owner for its bytes).
    pub async fn content_map_chunk(
        &self,
        disk: &str,
        Version {
            generation: Generation(generation),
            epoch: Epoch(epoch),
        }: Version,
        first: u64,
        count: u32,
    ) -> Result<Vec<(u64, disk::BlockRef)>> {
        let d = self.registry.get(disk)?;
        let map = d
            .serving_map()
            .ok_or_else(|| Error::Invalid(format!("disk {disk:?} is not immutable")))?;
        // Checked after the map was taken: a generation that ended before cannot slip by.
        Self::check_generation(&d, generation.max(1), epoch)?;
        let bs = u64::from(self.config.block_bytes);
        let blocks = d.size.div_ceil(bs);
        let end = first
            .saturating_add(u64::from(count.min(4096)))
            .min(blocks)
            .min(
                first
                    .saturating_add(cluster::fetch::MAP_CHUNK_BYTES / bs)
                    .max(first.saturating_add(1)),
            );
        let unknown: Vec<u64> = (first..end).filter(|&i| map.get(i).is_none()).collect();
        // A few parts at once: the origin reads of one overlap the hashing of another.
        let mut parts = Vec::new();
        for part in unknown.chunks(cluster::fetch::MAX_BLOCKS_PER_REQUEST) {
            parts.push(self.fingerprint_part(disk, &d, &map, part.to_vec()));
        }
        let done: Vec<Result<()>> = futures::stream::iter(parts)
            .buffer_unordered(MAP_FILL_PARTS)
            .collect()
            .await;
        done.into_iter().collect::<Result<()>>()?;
        // Checked again: entries of a generation that ended meanwhile must not reach a member.
        Self::check_generation(&d, generation.max(1), epoch)?;
        Ok((first..end)
            .filter_map(|i| map.get(i).map(|r| (i, r)))
            .collect())
    }

    /// Reads (past the cache: blocks it holds are not touched, those it reads not admitted)
    /// and fingerprints blocks `part` of `d` for a member's content map, within the budget of
    /// blocks gathered for members.
    async fn fingerprint_part(
        &self,
        disk: &str,
        d: &Arc<disk::Disk>,
        map: &Arc<disk::ContentMap>,
        part: Vec<u64>,
    ) -> Result<()> {
        // Many members asking at once cannot pin more than the budget.
        let _room = self
            .peer_serving
            .acquire_many(part.len() as u32)
            .await
            .map_err(|_| Error::State("the node is shutting down".into()))?;
        // Past this node's cache (see `Route::Member`): the member fetches these blocks next
        // and caches them itself.
        for r in self.reads.blocks(d, map, &part, Route::Member).await {
            if let Err(e) = r {
                tracing::warn!(disk, error = %e, "a block could not be fingerprinted for a member's content map");
            }
        }
        Ok(())
    }

    /// Blocks of a sealed disk, for another member (`Peer.FetchBlocks`): this node's own disk,
    /// or the shadow of another member's, read through this node's cache; reads it causes go
    /// to owners only. `None` for a block it could not provide. At most 64 blocks.
    pub async fn blocks_for_peer(
        &self,
        disk: &str,
        Version {
            generation: Generation(generation),
            epoch: Epoch(epoch),
        }: Version,
        indices: &[u64],
        cached_only: bool,
    ) -> Result<Vec<(u64, Option<Bytes>)>> {
        if indices.len() > cluster::fetch::MAX_BLOCKS_PER_REQUEST {
            return Err(Error::Invalid(format!(
                "{} blocks asked for; at most {} per request",
                indices.len(),
                cluster::fetch::MAX_BLOCKS_PER_REQUEST
            )));
        }
        let d = match self.registry.get(disk) {
            Ok(d) if d.serving_map().is_some() => {
                Self::check_generation(&d, generation.max(1), epoch)?;
                d
            }
            Ok(_) => return Err(Error::Invalid(format!("disk {disk:?} is not immutable"))),
            Err(Error::UnknownDisk(_)) => {
                let sh = self
                    .cluster
                    .shadow(disk)
                    .ok_or_else(|| Error::UnknownDisk(disk.chars().take(160).collect()))?;
                // The epoch of every shadow, sealed ones too: after the owner restarts, a
                // sealed shadow of the old epoch sent bytes the asker's check refused, and the
                // asker then skipped this node for a while (found in review).
                let stale = sh.disk.generation() != generation
                    || sh.epoch != epoch
                    || sh.lease.as_ref().is_some_and(|l| l.epoch != epoch);
                // Serving a detected disk to a member from this cache needs a lease too.
                if stale || !self.cluster.lease_ok(&sh).await {
                    // Not serving that generation from the cache here: the asker reads it
                    // from the owner.
                    return Ok(indices.iter().map(|&i| (i, None)).collect());
                }
                sh.disk.clone()
            }
            Err(e) => return Err(e),
        };
        let Some(map) = d.serving_map() else {
            return Ok(indices.iter().map(|&i| (i, None)).collect());
        };
        let _room = self
            .peer_serving
            .acquire_many(indices.len() as u32)
            .await
            .map_err(|_| Error::State("the node is shutting down".into()))?;
        let bs = u64::from(self.config.block_bytes);
        let inside = |i: u64| i.checked_mul(bs).is_some_and(|at| at < d.size);
        // Checked again after the read, as `read_local` does: bytes of a generation that ended
        // meanwhile (a write applied) must not reach a member, verified or not.
        let current = || match self.registry.get(disk) {
            Ok(own) => {
                Arc::ptr_eq(&own, &d)
                    && Self::check_generation(&d, generation.max(1), epoch).is_ok()
            }
            Err(_) => self.cluster.shadow(disk).is_some_and(|sh| {
                Arc::ptr_eq(&sh.disk, &d) && sh.lease.as_ref().is_none_or(|l| !l.revoked())
            }),
        };
        if cached_only {
            // Asked as a holder from this node's block map: the cache or nothing.
            let mut out = Vec::with_capacity(indices.len());
            for &i in indices {
                let got = if inside(i) {
                    self.reads.cached_block(&d, i).await
                } else {
                    None
                };
                if got.is_none() {
                    d.held.remove(i);
                }
                out.push((i, got));
            }
            // The same check as below (found in review: the cache's answer skipped it).
            if !current() {
                return Ok(indices.iter().map(|&i| (i, None)).collect());
            }
            return Ok(out);
        }
        let mut wanted: Vec<u64> = indices.iter().copied().filter(|&i| inside(i)).collect();
        wanted.sort_unstable();
        wanted.dedup();
        // This node's own disk: past its cache (see `Route::Member`). A shadow: read as the
        // block's home, whatever this node lacks from the owner only, so a request never
        // travels more than two hops.
        let route = if d.remote.is_none() {
            Route::Member
        } else {
            Route::OwnerOnly
        };
        let got = self.reads.blocks(&d, &map, &wanted, route).await;
        if !current() {
            return Ok(indices.iter().map(|&i| (i, None)).collect());
        }
        Ok(indices
            .iter()
            .map(|&i| {
                let b = wanted
                    .binary_search(&i)
                    .ok()
                    .and_then(|k| got.get(k))
                    .and_then(|r| r.as_ref().ok().cloned());
                (i, b)
            })
            .collect())
    }

    /// This node's block map of an immutable disk at (generation, epoch), streamed to member
    /// `from` (`Peer.SubscribeBlockMap`) until that generation is over here. One stream per
    /// (member, disk): a new one ends the old; at most [`MAX_SUBSCRIPTIONS_PER_MEMBER`] per
    /// member.
    pub fn block_map_stream(
        &self,
        disk: &str,
        Version {
            generation: Generation(generation),
            epoch: Epoch(epoch),
        }: Version,
        from: &str,
    ) -> Result<tokio::sync::mpsc::Receiver<cluster::blockmap::Update>> {
        let sub = self.subscriptions.open(from, disk)?;
        match self.registry.get(disk) {
            Ok(d) => {
                if d.serving_map().is_none() {
                    return Err(Error::Invalid(format!("disk {disk:?} is not immutable")));
                }
                Self::check_generation(&d, generation.max(1), epoch)?;
                let alive = d.clone();
                Ok(cluster::blockmap::serve(d, generation, move || {
                    sub.open() && alive.serving_map().is_some() && alive.generation() == generation
                }))
            }
            Err(Error::UnknownDisk(_)) => {
                let sh = self
                    .cluster
                    .shadow(disk)
                    .ok_or_else(|| Error::UnknownDisk(disk.chars().take(160).collect()))?;
                if sh.disk.generation() != generation || sh.maps.epoch != epoch {
                    return Err(Error::StaleGeneration {
                        disk: disk.to_string(),
                        asked: generation,
                        current: sh.disk.generation(),
                    });
                }
                let cluster = self.cluster.clone();
                let alive = sh.clone();
                Ok(cluster::blockmap::serve(
                    sh.disk.clone(),
                    generation,
                    move || {
                        sub.open()
                            && cluster
                                .shadow(alive.disk.id.as_str())
                                .is_some_and(|s| Arc::ptr_eq(&s, &alive))
                            && alive.lease.as_ref().is_none_or(|l| !l.revoked())
                    },
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// Reads a disk this node owns for member `from` (the Peer service: never forwarded
    /// again). With a `generation` (not 0), only at that generation and `epoch`. Only reads by
    /// live members count towards detection.
    pub async fn read_local(
        &self,
        disk: &str,
        offset: u64,
        len: u64,
        from: &str,
        Version {
            generation: Generation(generation),
            epoch: Epoch(epoch),
        }: Version,
    ) -> Result<Bytes> {
        let d = self.registry.get(disk)?;
        Self::check_generation(&d, generation, epoch)?;
        if self.cluster.live_member(from) {
            self.note_read(&d, from);
        }
        let b = self.reads.read(&d, offset, len, Route::Any).await?;
        // Checked again after the read: bytes of a generation that ended meanwhile must not
        // reach a shadow of it.
        Self::check_generation(&d, generation, epoch)?;
        Ok(b)
    }

    /// Writes a disk this node owns (for the Peer service); with `within`, only if the write
    /// takes its place in the disk's write order within that long from now.
    pub async fn write_local(
        &self,
        disk: &str,
        offset: u64,
        data: Bytes,
        within: Option<std::time::Duration>,
    ) -> Result<()> {
        let d = self.registry.get(disk)?;
        let by = within.map(|w| self.clock.now() + w);
        self.write_owned(&d, offset, data, by).await
    }

    /// Flushes a disk this node owns (for the Peer service).
    pub async fn flush_local(&self, disk: &str) -> Result<()> {
        let d = self.registry.get(disk)?;
        crate::write::flush(&d).await
    }

    /// Grants (or renews) incarnation `from_boot` of member `from` a lease on (disk,
    /// generation, epoch), for `Peer.Lease`. Only the incarnation of that id this node sees
    /// live gets one: a lease names one process, and only that process's acknowledgement of a
    /// revocation ends it.
    pub fn grant_lease(
        &self,
        disk: &str,
        Version {
            generation: Generation(generation),
            epoch: Epoch(epoch),
        }: Version,
        (from, from_boot): (&str, u64),
    ) -> Result<Duration> {
        let d = self.registry.get(disk)?;
        let term = Duration::from_millis(self.config.lease.term_ms);
        let margin = if crate::guard_removed("guard-drift-margin") {
            Duration::ZERO
        } else {
            Duration::from_millis(self.config.lease.drift_margin_ms)
        };
        if from == self.config.node_id {
            return Err(Error::NoLease {
                disk: disk.to_string(),
                why: format!("{from:?} is this node's own id"),
            });
        }
        if !self.cluster.live_incarnation(from, from_boot)
            && !crate::guard_removed("guard-incarnation")
        {
            return Err(Error::NoLease {
                disk: disk.to_string(),
                why: format!(
                    "{} is not the live member of that id in the cluster",
                    Incarnation::new(from, from_boot)
                ),
            });
        }
        let mut leases = d.owner.leases.lock();
        // Under the lease lock: a revocation that starts after this sees the grant. No grant
        // while a detection is still deciding (it may step back).
        if d.state() != DiskState::Detected
            || d.owner.detecting.load(std::sync::atomic::Ordering::SeqCst)
            || d.generation() != generation
            || (epoch != 0 && d.epoch != epoch)
        {
            return Err(Error::NoLease {
                disk: disk.to_string(),
                why: format!(
                    "it is {} at generation {} (asked {generation})",
                    d.mode().as_str(),
                    d.generation()
                ),
            });
        }
        let now = self.clock.now();
        let renewal = leases
            .insert(Incarnation::new(from, from_boot), now + term + margin)
            .is_some_and(|e| e > now);
        drop(leases);
        if renewal {
            self.cluster.stats.renewals.inc();
        } else {
            self.cluster.stats.grants.inc();
            tracing::debug!(disk, holder = from, generation, "lease granted");
        }
        Ok(term)
    }

    /// The owner revoked (disk, generation) here (`Peer.Revoke`) from incarnation `to_boot`
    /// of this node's id: returns once this node no longer serves it from its cache. A
    /// revocation meant for another process with this id is refused, so the owner cannot
    /// count it as that process's acknowledgement.
    pub fn revoke_held(&self, disk: &str, generation: u64, from: &str, to_boot: u64) -> Result<()> {
        let me = self.cluster.me();
        if to_boot != me.boot && !crate::guard_removed("guard-incarnation") {
            self.cluster.stats.foreign_revocations.inc();
            return Err(Error::Invalid(format!(
                "revocation of disk {:?} from {from:?} is for {}, but this process is {}: not acknowledged",
                disk.chars().take(160).collect::<String>(),
                Incarnation::new(&me.id, to_boot),
                Incarnation::new(&me.id, me.boot),
            )));
        }
        match self.cluster.remote(disk) {
            Some(r) if r.owner == from => {
                // No further than the generation this node knows the owner at: a revocation
                // of generation 2^64-1 (the caller's word, which only the cluster key or
                // certificate vouches for) ruled out every later shadow of the disk until the
                // owner's epoch changed, so this node forwarded every read of it for good
                // (found in review). Stopping what it holds is all a revocation needs.
                let generation = generation.min(r.info.generation);
                if crate::guard_removed("guard-holder-stops-before-ack") {
                    // Acknowledged first, stopped a moment later.
                    let (cluster, clock, disk) =
                        (self.cluster.clone(), self.clock.clone(), disk.to_string());
                    tokio::spawn(async move {
                        clock.sleep(Duration::from_millis(200)).await;
                        cluster.revoke_local(&disk, generation);
                    });
                } else {
                    self.cluster.revoke_local(disk, generation);
                }
                Ok(())
            }
            // No route to `from` any more (a dispute, or a refresh that is under way), but a
            // shadow of its disk may still be held: it stops before the acknowledgement.
            _ if self
                .cluster
                .shadow(disk)
                .is_some_and(|sh| sh.owner() == from) =>
            {
                let held = self
                    .cluster
                    .shadow(disk)
                    .map_or(0, |sh| sh.disk.generation());
                self.cluster.revoke_local(disk, generation.min(held));
                Ok(())
            }
            // A disk this node no longer knows holds no lease here: nothing to stop.
            None if self.registry.get(disk).is_err() => Ok(()),
            _ => Err(Error::Invalid(format!(
                "{from:?} does not own disk {:?}: revocation refused",
                disk.chars().take(160).collect::<String>()
            ))),
        }
    }

    /// Who this node is, and the live incarnation of `from`'s id it knows other than
    /// `from_boot` (`Peer.Hello`): a starting node asks its seeds this before it joins.
    pub fn hello(&self, from: &str, from_boot: u64) -> cluster::peers::Hello {
        let me = self.cluster.me();
        let same_id = self
            .cluster
            .members()
            .into_iter()
            .find(|m| m.id == from && m.boot != from_boot)
            .map(|m| (m.peer_addr, m.boot));
        cluster::peers::Hello {
            node: me.id.clone(),
            boot: me.boot,
            same_id,
        }
    }
}

/// Block map subscriptions a member may hold here at once.
pub const MAX_SUBSCRIPTIONS_PER_MEMBER: usize = 1024;

/// The block map streams this node serves, one per (member, disk).
#[derive(Debug, Default)]
pub struct Subscriptions {
    open: crate::hashing::DashMap<(String, String), Arc<std::sync::atomic::AtomicBool>>,
    /// Set by [`Subscriptions::close_all`].
    closed: std::sync::atomic::AtomicBool,
}

/// One subscription's place: [`Subscription::open`] until a newer one for the same member and
/// disk replaces it; dropping it (the stream ended) frees the place.
#[derive(Debug)]
pub struct Subscription {
    subs: Arc<Subscriptions>,
    key: (String, String),
    flag: Arc<std::sync::atomic::AtomicBool>,
}

impl Subscriptions {
    /// A place for `from`'s stream of `disk`; the one it had ends.
    pub fn open(self: &Arc<Self>, from: &str, disk: &str) -> Result<Subscription> {
        use std::sync::atomic::Ordering;
        let key = (from.to_string(), disk.to_string());
        if !self.open.contains_key(&key) {
            let held = self.open.iter().filter(|e| e.key().0 == from).count();
            if held >= MAX_SUBSCRIPTIONS_PER_MEMBER {
                return Err(Error::Invalid(format!(
                    "member {from:?} holds {held} block map subscriptions here, at most {MAX_SUBSCRIPTIONS_PER_MEMBER}"
                )));
            }
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Peer {
                node: "this node".into(),
                cause: "shutting down: no block map streams".into(),
            });
        }
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(true));
        if let Some(old) = self.open.insert(key.clone(), flag.clone()) {
            old.store(false, Ordering::SeqCst);
        }
        Ok(Subscription {
            subs: self.clone(),
            key,
            flag,
        })
    }

    /// Streams being served.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Ends every stream being served (at its next tick) and every one opened later: the node
    /// is shutting down, and a member's stream that never ends would keep the Peer server
    /// from stopping (each member of a cluster stopped at once waiting on the others).
    pub fn close_all(&self) {
        use std::sync::atomic::Ordering;
        self.closed.store(true, Ordering::SeqCst);
        for e in self.open.iter() {
            e.value().store(false, Ordering::SeqCst);
        }
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

impl Subscription {
    /// Whether no newer stream replaced this one.
    pub fn open(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.subs
            .open
            .remove_if(&self.key, |_, f| Arc::ptr_eq(f, &self.flag));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_holds_one_stream_per_disk_and_a_bounded_number_in_all() {
        let subs = Arc::new(Subscriptions::default());
        let first = subs.open("m", "d").expect("first");
        assert!(first.open());
        let second = subs.open("m", "d").expect("second");
        assert!(
            !first.open(),
            "a newer stream of the same disk ends the older"
        );
        assert!(second.open());
        drop(first);
        assert_eq!(
            subs.len(),
            1,
            "dropping the ended stream must not free the newer one's place"
        );
        let mut held = vec![second];
        for i in 1..MAX_SUBSCRIPTIONS_PER_MEMBER {
            held.push(subs.open("m", &format!("d{i}")).expect("within the bound"));
        }
        let e = subs.open("m", "one-too-many").expect_err("over the bound");
        assert!(e.to_string().contains("at most"), "{e}");
        // Another member is not held back, and a place freed is a place again.
        subs.open("other", "d").expect("another member");
        held.pop();
        subs.open("m", "one-too-many").expect("a freed place");
    }
}

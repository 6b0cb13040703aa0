//! Shadows: the local copies of the sealed and detected disks other members own, one per
//! disk at its owner's current generation and epoch, with the block map subscriptions that
//! tell where else their blocks are.
//!
//! Architecture invariant: a shadow of a revoked generation is never made again, and a shadow
//! whose owner, address, epoch, generation, mode or size changed is dropped, never patched.

use crate::hashing::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{Cluster, HolderLease, Member, Shadow, Subscription, blockmap, fetch};
use crate::disk::{Disk, DiskId, DiskMode};

impl Cluster {
    /// The owner revoked (disk, generation): this node stops serving it from its cache before
    /// it answers. Any shadow of that generation or older goes.
    pub fn revoke_local(&self, disk: &str, generation: u64) {
        let now = self.clock.now();
        let epoch = match self.remote.get(disk) {
            Some(r) => r.info.epoch,
            None => self.shadows.get(disk).map_or(0, |sh| sh.epoch),
        };
        self.revoked
            .entry(disk.to_string())
            .and_modify(|(e, g)| {
                if *e == epoch {
                    *g = (*g).max(generation);
                } else {
                    (*e, *g) = (epoch, generation);
                }
            })
            .or_insert((epoch, generation));
        if let Some((_, sh)) = self
            .shadows
            .remove_if(disk, |_, sh| sh.disk.generation() <= generation)
        {
            if let Some(l) = &sh.lease {
                l.revoke(now);
            }
            tracing::info!(
                disk,
                generation,
                "lease revoked by the owner; the disk is read through its owner now"
            );
        }
    }

    /// The local shadow of a sealed or detected disk another member owns.
    #[inline]
    pub fn shadow(&self, disk: &str) -> Option<Arc<Shadow>> {
        self.shadows.get(disk).map(|d| d.clone())
    }

    /// Makes the shadows match the remote sealed and detected disks: one per disk, rebuilt
    /// when its owner, address, epoch, generation, mode or size changes, dropped when the disk
    /// goes.
    pub(super) fn sync_shadows(&self) {
        let now = self.clock.now();
        let cached = |mode: DiskMode| mode == DiskMode::Sealed || mode == DiskMode::Detected;
        self.shadows.retain(|id, sh| {
            let keep = self.remote.get(id).is_some_and(|r| {
                cached(r.info.mode)
                    && r.info.generation == sh.disk.generation()
                    && r.info.size_bytes == sh.disk.size
                    && r.info.epoch == sh.epoch
                    && r.owner == sh.owner
                    && r.addr == sh.addr
                    && (r.info.mode == DiskMode::Detected) == sh.lease.is_some()
            });
            if !keep && let Some(l) = &sh.lease {
                l.revoke(now);
            }
            keep
        });
        for r in self.remote.iter() {
            if !self.cache_remote || !cached(r.info.mode) || self.shadows.contains_key(r.key()) {
                continue;
            }
            let detected = r.info.mode == DiskMode::Detected;
            if detected
                && self
                    .revoked
                    .get(r.key())
                    .is_some_and(|v| v.0 == r.info.epoch && v.1 >= r.info.generation)
            {
                continue;
            }
            let Ok(id) = DiskId::parse(&r.info.id) else {
                continue;
            };
            let maps = Arc::new(blockmap::RemoteMaps::new(
                r.info.generation,
                r.info.epoch,
                r.info.size_bytes.div_ceil(self.block_bytes.max(1)),
            ));
            let remote = Arc::new(fetch::Remote::new(
                self.peers.clone(),
                &self.me,
                self.members.clone(),
                fetch::RemoteDiskRef {
                    owner: r.owner.clone(),
                    addr: r.addr,
                    disk: r.info.id.clone(),
                    size: r.info.size_bytes,
                    generation: r.info.generation,
                    epoch: r.info.epoch,
                },
                self.block_bytes,
                self.peer_fetch,
                maps.clone(),
            ));
            let lease = detected.then(|| {
                Arc::new(HolderLease::new(
                    &r.info.id,
                    r.info.generation,
                    r.info.epoch,
                    &r.owner,
                    r.addr,
                ))
            });
            self.shadows.insert(
                r.key().clone(),
                Arc::new(Shadow {
                    disk: Disk::shadow(id, remote, r.info.generation, self.block_bytes),
                    lease,
                    maps,
                    owner: r.owner.clone(),
                    addr: r.addr,
                    epoch: r.info.epoch,
                }),
            );
            tracing::info!(disk = %r.key(), owner = %r.owner, generation = r.info.generation, mode = if detected { "detected" } else { "sealed" }, "caching a disk of another member");
        }
    }

    /// One block map subscription per (shadow, other live member but the owner); those whose
    /// shadow or member went are stopped and their maps dropped.
    pub(super) fn sync_subscriptions(self: &Arc<Self>, live: &HashMap<String, Member>) {
        self.subs.retain(|(disk, member), sub| {
            let keep = self.peer_fetch
                && live.get(member).is_some_and(|m| m.boot == sub.boot)
                && self
                    .shadows
                    .get(disk)
                    .is_some_and(|s| Arc::ptr_eq(&s.maps, &sub.maps));
            if !keep {
                sub.task.abort();
                sub.maps.forget(member, sub.boot);
            }
            keep
        });
        if !self.peer_fetch {
            // Each node caching alone asks nobody: the maps would be read for nothing.
            return;
        }
        let shadows: Vec<Arc<Shadow>> = self.shadows.iter().map(|s| s.value().clone()).collect();
        for sh in shadows {
            for m in live.values() {
                if m.id == sh.owner || m.id == self.me {
                    continue;
                }
                let key = (sh.disk.id.to_string(), m.id.clone());
                if self.subs.contains_key(&key) {
                    continue;
                }
                let this = self.clone();
                let (maps, member, addr, boot) =
                    (sh.maps.clone(), m.id.clone(), m.peer_addr, m.boot);
                let disk = sh.disk.id.to_string();
                let task = tokio::spawn(async move {
                    this.follow_block_map(&disk, (&member, boot), addr, &maps)
                        .await;
                });
                self.subs.insert(
                    key,
                    Subscription {
                        boot: m.boot,
                        maps: sh.maps.clone(),
                        task,
                    },
                );
            }
        }
    }

    /// Keeps `maps` current with the block map of incarnation `boot` of `member` until
    /// aborted; reconnects after errors (the member may not serve the disk yet).
    async fn follow_block_map(
        &self,
        disk: &str,
        (member, boot): (&str, u64),
        addr: SocketAddr,
        maps: &blockmap::RemoteMaps,
    ) {
        use futures::StreamExt;
        loop {
            match self
                .peers
                .subscribe_block_map(
                    member,
                    addr,
                    disk,
                    crate::ids::Version::new(maps.generation, maps.epoch),
                )
                .await
            {
                Ok(mut stream) => {
                    while let Some(Ok(u)) = stream.next().await {
                        match maps.apply(member, boot, &u) {
                            Ok(bytes) => self.stats.block_map_traffic.add(bytes),
                            Err(e) => {
                                tracing::warn!(disk, member, error = %e, "bad block map update; map dropped");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(disk, member, error = %e, "block map not available yet"),
            }
            maps.forget(member, boot);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Serialized bytes of every block map held of other members.
    pub fn block_map_bytes(&self) -> u64 {
        self.shadows.iter().map(|s| s.maps.bytes()).sum()
    }
}

//! The cluster: membership, the other members' disks, and calls to their Peer services.
//!
//! Every member owns the disks whose origins it holds. Each advertises a `disks_version` in
//! gossip; when a member's version changes (or it joins), the others fetch its disk list over
//! gRPC (`Peer.OwnedDisks`). When a member leaves or dies, its disks are dropped from every
//! other member's view at once. A client on any node can then use any disk by id: reads and
//! writes of a disk owned elsewhere are forwarded to its owner (`Peer.Read`, `Write`, `Flush`)
//! and nothing of them is cached here.
//!
//! Architecture invariant: this module never decides what a disk's bytes are; it only knows
//! who owns which disk and how to reach them. A disk id known locally always wins over a
//! remote one; between two remote owners of one id, the lower node id wins (and a warning says
//! so), so every node resolves a conflict the same way.

pub mod membership;
pub mod peers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use shadowcache_proto as pb;
use tokio::sync::watch;

pub use membership::{GossipConfig, Member, Membership};
pub use peers::Peers;

use crate::config::Config;
use crate::disk::{Disk, DiskId};
use crate::origin::PeerOrigin;

/// A disk owned by another member.
#[derive(Debug, Clone)]
pub struct RemoteDisk {
    /// The owner's node id.
    pub owner: String,
    /// The owner's Peer address.
    pub addr: SocketAddr,
    /// The disk as its owner describes it.
    pub info: pb::DiskInfo,
}

/// This node's view of the cluster.
#[derive(Debug)]
pub struct Cluster {
    me: String,
    membership: Membership,
    members: watch::Receiver<Vec<Member>>,
    /// Clients of the other members' Peer services.
    pub peers: Arc<Peers>,
    remote: DashMap<String, RemoteDisk>,
    /// Local shadows of the sealed disks other members own: served through this node's cache.
    shadows: DashMap<String, Arc<Disk>>,
    fetched: DashMap<String, u64>,
    disks_version: AtomicU64,
    cache_remote: bool,
    peer_fetch: bool,
}

impl Cluster {
    /// Joins the cluster the config describes, or makes a cluster of one.
    pub async fn start(config: &Config) -> anyhow::Result<Arc<Cluster>> {
        let c = &config.cluster;
        let membership = match c.peer_listen {
            Some(listen) => {
                Membership::join(GossipConfig {
                    node_id: config.node_id.clone(),
                    cluster_id: c.cluster_id.clone(),
                    listen,
                    advertise: c.advertise.unwrap_or(listen),
                    seeds: c.seeds.clone(),
                    gossip_interval: Duration::from_millis(c.gossip_interval_ms),
                    phi_threshold: c.phi_threshold,
                })
                .await?
            }
            None => Membership::single(&config.node_id, SocketAddr::from(([127, 0, 0, 1], 0))),
        };
        Ok(Arc::new(Cluster {
            me: config.node_id.clone(),
            members: membership.watch(),
            membership,
            peers: Arc::new(Peers::new(
                &config.node_id,
                Duration::from_millis(c.rpc_timeout_ms),
            )),
            remote: DashMap::new(),
            shadows: DashMap::new(),
            fetched: DashMap::new(),
            disks_version: AtomicU64::new(0),
            cache_remote: c.cache_remote,
            peer_fetch: c.peer_fetch,
        }))
    }

    /// The live members, this node included, by id.
    pub fn members(&self) -> Vec<Member> {
        self.members.borrow().clone()
    }

    /// The member that owns `disk`, if another member does.
    pub fn remote(&self, disk: &str) -> Option<RemoteDisk> {
        self.remote.get(disk).map(|r| r.clone())
    }

    /// The local shadow of a sealed disk another member owns.
    #[inline]
    pub fn shadow(&self, disk: &str) -> Option<Arc<Disk>> {
        self.shadows.get(disk).map(|d| d.clone())
    }

    /// Makes the shadows match the remote sealed disks: one per disk, rebuilt when its owner,
    /// generation or size changes, dropped when the disk goes.
    fn sync_shadows(&self) {
        self.shadows.retain(|id, d| {
            self.remote.get(id).is_some_and(|r| {
                r.info.mode == pb::DiskMode::Sealed as i32
                    && r.info.generation == d.generation()
                    && r.info.size_bytes == d.size
                    && d.origin.describe() == format!("peer://{}/{}", r.owner, r.info.id)
            })
        });
        for r in self.remote.iter() {
            if !self.cache_remote
                || r.info.mode != pb::DiskMode::Sealed as i32
                || self.shadows.contains_key(r.key())
            {
                continue;
            }
            let Ok(id) = DiskId::parse(&r.info.id) else {
                continue;
            };
            let origin = PeerOrigin::new(
                self.peers.clone(),
                &self.me,
                self.members.clone(),
                &r.owner,
                r.addr,
                &r.info.id,
                r.info.size_bytes,
                r.info.generation,
            )
            .with_peer_fetch(self.peer_fetch);
            self.shadows.insert(
                r.key().clone(),
                Disk::shadow(id, Arc::new(origin), r.info.generation),
            );
            tracing::info!(disk = %r.key(), owner = %r.owner, "caching a sealed disk of another member");
        }
    }

    /// Every disk other members own, by id.
    pub fn remote_disks(&self) -> Vec<RemoteDisk> {
        let mut v: Vec<RemoteDisk> = self.remote.iter().map(|r| r.value().clone()).collect();
        v.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        v
    }

    /// The version of this node's disk registry, as advertised.
    pub fn disks_version(&self) -> u64 {
        self.disks_version.load(Ordering::SeqCst)
    }

    /// Tells the other members that this node's disks changed.
    pub async fn disks_changed(&self) {
        let v = self.disks_version.fetch_add(1, Ordering::SeqCst) + 1;
        self.membership.set_disks_version(v).await;
    }

    /// Keeps the view of other members' disks current until `stopped` turns true: on every
    /// membership change and every `poll` besides.
    pub fn spawn_refresher(
        self: &Arc<Self>,
        mut stopped: watch::Receiver<bool>,
        local: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) {
        let this = self.clone();
        let mut members = self.members.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                this.refresh(&local).await;
                tokio::select! {
                    r = members.changed() => if r.is_err() { break },
                    _ = tick.tick() => {},
                    _ = stopped.changed() => break,
                }
            }
        });
    }

    /// One refresh: drop the disks of members that left, fetch the lists that changed.
    async fn refresh(&self, local: &(impl Fn(&str) -> bool + Send + Sync)) {
        let live: HashMap<String, Member> = self
            .members()
            .into_iter()
            .filter(|m| m.id != self.me)
            .map(|m| (m.id.clone(), m))
            .collect();
        // Members that are gone: everything they contributed goes.
        let gone: Vec<String> = self
            .fetched
            .iter()
            .map(|e| e.key().clone())
            .filter(|id| !live.contains_key(id))
            .collect();
        for id in gone {
            self.fetched.remove(&id);
            self.peers.forget(&id);
            let before = self.remote.len();
            self.remote.retain(|_, r| r.owner != id);
            tracing::info!(member = %id, disks = before - self.remote.len(), "member left; its disks are no longer served here");
        }
        for m in live.values() {
            if self
                .fetched
                .get(&m.id)
                .is_some_and(|v| *v == m.disks_version)
            {
                continue;
            }
            match self.peers.owned_disks(&m.id, m.peer_addr).await {
                Ok(list) => {
                    self.remote.retain(|_, r| r.owner != m.id);
                    for d in list.disks {
                        if local(&d.id) {
                            tracing::warn!(disk = %d.id, owner = %m.id, "a disk of this id is local here; the remote one is ignored");
                            continue;
                        }
                        let keep_existing = self.remote.get(&d.id).is_some_and(|r| r.owner < m.id);
                        if keep_existing {
                            tracing::warn!(disk = %d.id, owner = %m.id, "two members own a disk of this id; the lower node id wins");
                            continue;
                        }
                        self.remote.insert(
                            d.id.clone(),
                            RemoteDisk {
                                owner: m.id.clone(),
                                addr: m.peer_addr,
                                info: d,
                            },
                        );
                    }
                    self.fetched
                        .insert(m.id.clone(), list.disks_version.max(m.disks_version));
                }
                Err(e) => {
                    tracing::warn!(member = %m.id, error = %e, "could not fetch a member's disks; retrying");
                }
            }
        }
        self.sync_shadows();
    }

    /// Leaves the cluster.
    pub async fn shutdown(&self) {
        self.membership.shutdown().await;
    }
}

//! The cluster: membership, the other members' disks, and calls to their Peer services.
//!
//! Every member owns the disks whose origins it holds. Each advertises a `disks_version` in
//! gossip; when a member's version changes (or it joins), the others fetch its disk list over
//! gRPC (`Peer.OwnedDisks`). When a member leaves or dies, its disks are dropped from every
//! other member's view at once. A client on any node can then use any disk by id: reads and
//! writes of a disk owned elsewhere are forwarded to its owner (`Peer.Read`, `Write`, `Flush`)
//! and nothing of them is cached here.
//!
//! Sealed and detected disks of other members are served through local *shadows* (a disk
//! object over a [`fetch::Remote`], with a bounded copy of the owner's content map). A shadow of a detected disk
//! serves from the cache only while this node holds a valid lease on it ([`HolderLease`]);
//! leases are asked for at the first read, renewed at a third of their term while reads keep
//! wanting them, and revoked by the owner (`Peer.Revoke`) before it applies a write.
//!
//! Architecture invariant: this module never decides what a disk's bytes are; it only knows
//! who owns which disk and how to reach them. A disk id known locally always wins over a
//! remote one; between two remote owners of one id, the lower node id wins (and a warning says
//! so), so every node resolves a conflict the same way.

pub mod blockmap;
pub mod fetch;
pub mod lease;
pub mod membership;
pub mod peers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::watch;

pub use lease::HolderLease;
pub use membership::{GossipConfig, Member, Membership};
pub use peers::{PeerService, Peers};

use crate::admin::DiskInfo;
use crate::clock::Clock;
use crate::config::Config;
use crate::disk::{Disk, DiskId, DiskMode};
use crate::telemetry::LeaseStats;

/// How long a refused (or failed) lease request is believed before another is sent.
const REFUSAL_HOLD: Duration = Duration::from_millis(200);

/// A running block map subscription.
#[derive(Debug)]
struct Subscription {
    boot: u64,
    maps: Arc<blockmap::RemoteMaps>,
    task: tokio::task::JoinHandle<()>,
}

/// The local shadow of a sealed or detected disk another member owns.
#[derive(Debug)]
pub struct Shadow {
    /// The disk served through this node's cache.
    pub disk: Arc<Disk>,
    /// For a detected disk: the lease this node needs to serve it from the cache.
    pub lease: Option<Arc<HolderLease>>,
    /// Other members' block maps of it.
    pub maps: Arc<blockmap::RemoteMaps>,
    owner: String,
    addr: SocketAddr,
    epoch: u64,
}

/// A disk owned by another member.
#[derive(Debug, Clone)]
pub struct RemoteDisk {
    /// The owner's node id.
    pub owner: String,
    /// The owner's Peer address.
    pub addr: SocketAddr,
    /// The disk as its owner describes it.
    pub info: DiskInfo,
}

/// This node's view of the cluster.
#[derive(Debug)]
pub struct Cluster {
    me: String,
    membership: Arc<dyn Membership>,
    members: watch::Receiver<Vec<Member>>,
    /// Clients of the other members' Peer services.
    pub peers: Arc<Peers>,
    remote: DashMap<String, RemoteDisk>,
    /// Local shadows of the sealed and detected disks other members own.
    shadows: DashMap<String, Arc<Shadow>>,
    /// Per member: the (boot, disks_version) whose disk list is in `remote`.
    fetched: DashMap<String, (u64, u64)>,
    /// Per disk: the epoch and highest generation revoked here; no shadow of them is made
    /// again (a disk registered anew, with another epoch, is not held back).
    revoked: DashMap<String, (u64, u64)>,
    /// Block map subscriptions by (disk, member): the shadow and member boot they are for.
    subs: DashMap<(String, String), Subscription>,
    disks_version: AtomicU64,
    cache_remote: bool,
    peer_fetch: bool,
    block_bytes: u64,
    clock: Arc<dyn Clock>,
    rpc_timeout: Duration,
    lease_term: Duration,
    drift_margin: Duration,
    /// Lease and detection counters of this node.
    pub stats: LeaseStats,
}

impl Cluster {
    /// This node's view of the cluster `membership` keeps, calling members over `service`.
    pub fn start(
        config: &Config,
        clock: Arc<dyn Clock>,
        membership: Arc<dyn Membership>,
        service: Arc<dyn PeerService>,
    ) -> Arc<Cluster> {
        let c = &config.cluster;
        Arc::new(Cluster {
            me: config.node_id.clone(),
            members: membership.watch(),
            membership,
            peers: Arc::new(Peers::new(
                service,
                clock.clone(),
                Duration::from_millis(c.rpc_timeout_ms),
                Duration::from_millis(
                    c.rpc_timeout_ms + config.lease.term_ms + config.lease.drift_margin_ms,
                ) * 2,
            )),
            remote: DashMap::new(),
            shadows: DashMap::new(),
            fetched: DashMap::new(),
            revoked: DashMap::new(),
            subs: DashMap::new(),
            disks_version: AtomicU64::new(0),
            cache_remote: c.cache_remote,
            peer_fetch: c.peer_fetch,
            block_bytes: u64::from(config.block_bytes),
            clock,
            rpc_timeout: Duration::from_millis(c.rpc_timeout_ms),
            lease_term: Duration::from_millis(config.lease.term_ms),
            drift_margin: Duration::from_millis(config.lease.drift_margin_ms),
            stats: LeaseStats::new(),
        })
    }

    /// Whether `id` is a live member now (this node included).
    pub fn live_member(&self, id: &str) -> bool {
        self.members.borrow().iter().any(|m| m.id == id)
    }

    /// Whether this node may serve `shadow` from its cache now: always for a sealed disk; for
    /// a detected one, while it holds a valid lease (asked for here if it has none).
    pub async fn lease_ok(&self, shadow: &Shadow) -> bool {
        let Some(lease) = &shadow.lease else {
            return true;
        };
        let now = self.clock.now();
        lease.touch(now);
        if lease.valid(now) {
            return true;
        }
        self.acquire(lease).await
    }

    /// Asks the owner for `lease` (or its renewal); true if it is valid afterwards. One
    /// request at a time: callers that queued behind one take its answer, and a refusal is
    /// believed for [`REFUSAL_HOLD`], so an unreachable owner costs one deadline, not one per
    /// reader.
    async fn acquire(&self, lease: &HolderLease) -> bool {
        let arrived = self.clock.now();
        let _one = lease.acquiring.lock().await;
        if lease.revoked() {
            return false;
        }
        let sent = self.clock.now();
        // A renewal that is not due yet was done by whoever held the lock before us.
        if lease.remaining(sent) > self.lease_term * 2 / 3 {
            return true;
        }
        if let Some((at, ok)) = lease.last_attempt()
            && (at >= arrived || (!ok && sent.saturating_sub(at) < REFUSAL_HOLD))
        {
            return ok && lease.valid(sent);
        }
        let granted = self.request_lease(lease, sent).await;
        lease.attempted(self.clock.now(), granted);
        granted
    }

    async fn request_lease(&self, lease: &HolderLease, sent: Duration) -> bool {
        let asked = self.peers.lease(
            &lease.owner,
            lease.addr,
            &lease.disk,
            lease.generation,
            lease.epoch,
        );
        match crate::clock::timeout(&*self.clock, self.rpc_timeout, asked).await {
            Ok(Ok(term)) => {
                let term = term.min(self.lease_term * 10);
                lease.granted(sent, term, self.drift_margin) && lease.valid(self.clock.now())
            }
            Ok(Err(e)) => {
                tracing::debug!(disk = %lease.disk, owner = %lease.owner, error = %e, "lease refused");
                false
            }
            Err(_) => {
                tracing::warn!(disk = %lease.disk, owner = %lease.owner, "lease request timed out");
                false
            }
        }
    }

    /// The owner revoked (disk, generation): this node stops serving it from its cache before
    /// it answers. Any shadow of that generation or older goes.
    pub fn revoke_local(&self, disk: &str, generation: u64) {
        let now = self.clock.now();
        let epoch = self.remote.get(disk).map_or(0, |r| r.info.epoch);
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

    /// Revokes `holder`'s lease on (disk, generation), which runs until `expiry` on this
    /// node's clock: true when the holder acknowledged, false when the lease ran out first.
    pub async fn revoke_holder(
        &self,
        holder: &str,
        disk: &str,
        generation: u64,
        expiry: Duration,
    ) -> bool {
        loop {
            let now = self.clock.now();
            if now >= expiry {
                return false;
            }
            let left = expiry - now;
            let addr = self
                .members()
                .into_iter()
                .find(|m| m.id == holder)
                .map(|m| m.peer_addr);
            if let Some(addr) = addr {
                let call = self.peers.revoke(holder, addr, disk, generation);
                if let Ok(Ok(())) =
                    crate::clock::timeout(&*self.clock, left.min(self.rpc_timeout), call).await
                {
                    return true;
                }
            }
            // Unreachable or not a member any more: try again until the lease is surely over.
            let left = expiry.saturating_sub(self.clock.now());
            self.clock.sleep(left.min(Duration::from_millis(100))).await;
        }
    }

    /// Renews the leases reads still want, and counts the ones that lapsed.
    async fn renew_leases(self: &Arc<Self>) {
        let now = self.clock.now();
        let leases: Vec<Arc<HolderLease>> = self
            .shadows
            .iter()
            .filter_map(|s| s.lease.clone())
            .collect();
        for l in leases {
            if l.take_lapse(now) {
                self.stats.holder_expiries.inc();
                tracing::info!(disk = %l.disk, "lease ran out before it was renewed; reads go to the owner");
            }
            let wanted = now.saturating_sub(l.last_used()) < self.lease_term * 2;
            let due = l.remaining(now) < self.lease_term * 2 / 3;
            // Skip a lease whose request is still running (an unreachable owner).
            if wanted && due && !l.revoked() && l.acquiring.try_lock().is_ok() {
                let this = self.clone();
                tokio::spawn(async move { this.acquire(&l).await });
            }
        }
    }

    /// The live members, this node included, by id.
    pub fn members(&self) -> Vec<Member> {
        self.members.borrow().clone()
    }

    /// The member that owns `disk`, if another member does.
    pub fn remote(&self, disk: &str) -> Option<RemoteDisk> {
        self.remote.get(disk).map(|r| r.clone())
    }

    /// The local shadow of a sealed or detected disk another member owns.
    #[inline]
    pub fn shadow(&self, disk: &str) -> Option<Arc<Shadow>> {
        self.shadows.get(disk).map(|d| d.clone())
    }

    /// Makes the shadows match the remote sealed and detected disks: one per disk, rebuilt
    /// when its owner, address, epoch, generation, mode or size changes, dropped when the disk
    /// goes.
    fn sync_shadows(&self) {
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
            let maps = Arc::new(blockmap::RemoteMaps::new(r.info.generation, r.info.epoch));
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
        let mut stop_renewing = stopped.clone();
        let renewer = self.clone();
        tokio::spawn(async move {
            // Renewals are lease timing: they wait on the node's clock.
            loop {
                renewer.renew_leases().await;
                tokio::select! {
                    () = renewer.clock.sleep(renewer.lease_term / 6) => {},
                    _ = stop_renewing.changed() => break,
                }
            }
        });
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
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
    async fn refresh(self: &Arc<Self>, local: &(impl Fn(&str) -> bool + Send + Sync)) {
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
        for id in &gone {
            self.fetched.remove(id);
            self.peers.forget(id);
            let before = self.remote.len();
            self.remote.retain(|_, r| &r.owner != id);
            tracing::info!(member = %id, disks = before - self.remote.len(), "member left; its disks are no longer served here");
        }
        if !gone.is_empty() {
            // A disk id two members own is kept from the lower id; when that one leaves, the
            // other's list must be read again for its disk to show.
            self.fetched.clear();
            // Their shadows go now, before the lists of the others are fetched.
            self.sync_shadows();
        }
        for m in live.values() {
            if self
                .fetched
                .get(&m.id)
                .is_some_and(|v| v.0 == m.boot && v.1 >= m.disks_version)
            {
                continue;
            }
            match self.peers.owned_disks(&m.id, m.peer_addr).await {
                Ok((disks, disks_version)) => {
                    if self.fetched.get(&m.id).is_some_and(|v| v.0 != m.boot) {
                        tracing::info!(member = %m.id, "member restarted; its disks are read anew");
                    }
                    // Entries are replaced in place and the member's vanished disks removed
                    // after: a concurrent read never sees a disk of this member missing.
                    let ids: std::collections::HashSet<String> =
                        disks.iter().map(|d| d.id.clone()).collect();
                    self.remote
                        .retain(|id, r| r.owner != m.id || ids.contains(id));
                    for d in disks {
                        if local(&d.id) {
                            tracing::warn!(disk = %d.id, owner = %m.id, "a disk of this id is local here; the remote one is ignored");
                            continue;
                        }
                        let keep_existing = self
                            .remote
                            .get(&d.id)
                            .is_some_and(|r| r.owner < m.id && self.live_member(&r.owner));
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
                    self.fetched.insert(m.id.clone(), (m.boot, disks_version));
                }
                Err(e) => {
                    tracing::warn!(member = %m.id, error = %e, "could not fetch a member's disks; retrying");
                }
            }
        }
        self.sync_shadows();
        self.sync_subscriptions(&live);
    }

    /// One block map subscription per (shadow, other live member but the owner); those whose
    /// shadow or member went are stopped and their maps dropped.
    fn sync_subscriptions(self: &Arc<Self>, live: &HashMap<String, Member>) {
        self.subs.retain(|(disk, member), sub| {
            let keep = self.peer_fetch
                && live.get(member).is_some_and(|m| m.boot == sub.boot)
                && self
                    .shadows
                    .get(disk)
                    .is_some_and(|s| Arc::ptr_eq(&s.maps, &sub.maps));
            if !keep {
                sub.task.abort();
                sub.maps.forget(member);
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
                let (maps, member, addr) = (sh.maps.clone(), m.id.clone(), m.peer_addr);
                let disk = sh.disk.id.to_string();
                let task = tokio::spawn(async move {
                    this.follow_block_map(&disk, &member, addr, &maps).await;
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

    /// Keeps `maps` current with `member`'s block map until aborted; reconnects after errors
    /// (the member may not serve the disk yet).
    async fn follow_block_map(
        &self,
        disk: &str,
        member: &str,
        addr: SocketAddr,
        maps: &blockmap::RemoteMaps,
    ) {
        use futures::StreamExt;
        loop {
            match self
                .peers
                .subscribe_block_map(member, addr, disk, maps.generation, maps.epoch)
                .await
            {
                Ok(mut stream) => {
                    while let Some(Ok(u)) = stream.next().await {
                        match maps.apply(member, &u) {
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
            maps.forget(member);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Serialized bytes of every block map held of other members.
    pub fn block_map_bytes(&self) -> u64 {
        self.shadows.iter().map(|s| s.maps.bytes()).sum()
    }

    /// Leaves the cluster.
    pub async fn shutdown(&self) {
        self.membership.shutdown().await;
    }
}

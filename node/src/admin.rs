//! What operators and clients see of a node: disks (registered here or owned by other
//! members), registration, and the status snapshot with its counters.
//!
//! Architecture invariant: reads state only, except `register`, which saves the registry and
//! tells the cluster.

use std::path::Path;
use std::sync::atomic::Ordering;

use crate::cache::TierUsage;
use crate::disk::DiskMode;
use crate::error::{Error, Result};
use crate::{Node, cache, cluster, disk};

pub use crate::disk::DiskInfo;

/// Counters since start, for `Status`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Block lookups (hits plus misses).
    pub lookups: u64,
    /// Misses.
    pub misses: u64,
    /// Zero-block answers.
    pub zero_block_hits: u64,
    /// Origin reads.
    pub origin_reads: u64,
    /// Origin bytes read.
    pub origin_read_bytes: u64,
    /// Promotions.
    pub promotions: u64,
    /// Demotions.
    pub demotions: u64,
    /// Evictions from every pool.
    pub evictions: u64,
    /// SSD verification failures.
    pub ssd_verify_failures: u64,
    /// Blocks the SSD tier could not store.
    pub ssd_write_failures: u64,
    /// Payload bytes written to SSD.
    pub ssd_written_bytes: u64,
    /// Payload bytes SSD hits served.
    pub ssd_served_bytes: u64,
    /// Demotions that wrote nothing (a copy was kept).
    pub ssd_writes_saved: u64,
    /// Entries RAM let go that the SSD's admission refused.
    pub ssd_admissions_refused: u64,
    /// Bytes the cached entries stand for.
    pub logical_bytes: u64,
    /// Bytes stored by all tiers.
    pub stored_bytes: u64,
    /// Single-flight joins.
    pub single_flight_joins: u64,
    /// Reads sent to remote owners of sealed disks.
    pub owner_reads: u64,
    /// Bytes read from remote owners.
    pub owner_read_bytes: u64,
    /// Blocks fetched from other members.
    pub peer_reads: u64,
    /// Bytes fetched from other members.
    pub peer_read_bytes: u64,
    /// Blocks of disks other members own fetched ahead of a sequential reader.
    pub read_ahead_blocks: u64,
    /// Blocks fetched ahead that a client's read took.
    pub read_ahead_used: u64,
}

/// A snapshot of the node for `Status`.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// Node id.
    pub node_id: String,
    /// Cache block size.
    pub block_bytes: u32,
    /// Single-touch share of RAM.
    pub single_touch_share: f64,
    /// Each tier.
    pub tiers: Vec<TierUsage>,
    /// Counters.
    pub counters: Counters,
    /// Disks: this node's, then other members'.
    pub disks: Vec<DiskInfo>,
    /// Time since start.
    pub uptime_ms: u64,
    /// Live members, this node included.
    pub members: Vec<cluster::Member>,
    /// Lease and detection counters.
    pub leases: LeaseCounters,
    /// The RAM pools' policy state.
    pub policy: cache::PolicyState,
    /// The certificates this node presents.
    pub certificates: Vec<crate::certs::CertificateInfo>,
    /// Disk ids several other members own (served by none), with those members.
    pub disputed: Vec<(String, Vec<String>)>,
}

/// Lease and detection counters since start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeaseCounters {
    /// Leases granted (owner).
    pub grants: u64,
    /// Leases renewed (owner).
    pub renewals: u64,
    /// Leases that ran out: waited out by a revocation (owner) or lapsed in use (holder).
    pub expiries: u64,
    /// Revocations (acknowledged or waited out).
    pub revocations: u64,
    /// Milliseconds writes waited for revocations.
    pub revocation_wait_ms: u64,
    /// Disks detected here.
    pub detections: u64,
    /// Bytes sent to other members.
    pub peer_served_bytes: u64,
    /// Serialized bytes of other members' block maps held.
    pub block_map_bytes: u64,
    /// Bytes of block maps received.
    pub block_map_traffic_bytes: u64,
    /// Revocations refused: meant for another process with this node's id.
    pub foreign_revocations: u64,
}

impl Node {
    pub(crate) fn total_blocks(&self, size: u64) -> u64 {
        size.div_ceil(u64::from(self.config.block_bytes))
    }

    pub(crate) fn info(&self, d: &disk::Disk) -> DiskInfo {
        let now = self.clock.now();
        DiskInfo {
            id: d.id.to_string(),
            size_bytes: d.size,
            mode: d.mode(),
            generation: d.generation(),
            origin: d.origin.describe().to_string(),
            owner: self.config.node_id.clone(),
            epoch: d.epoch,
            pinned: d.owner.pinned(),
            readers: d.owner.activity(now, &self.config.detection).readers,
            lease_holders: d.owner.holders(now),
            known_blocks: d.serving_map().map_or(0, |m| m.len() as u64),
            total_blocks: self.total_blocks(d.size),
            lease_valid: false,
            coverage: Vec::new(),
        }
    }

    pub(crate) fn remote_info(&self, r: cluster::RemoteDisk) -> DiskInfo {
        let shadow = self.cluster.shadow(&r.info.id);
        let now = self.clock.now();
        DiskInfo {
            mode: r.info.mode,
            known_blocks: shadow
                .as_ref()
                .and_then(|s| s.disk.serving_map())
                .map_or(0, |m| m.len() as u64),
            total_blocks: self.total_blocks(r.info.size_bytes),
            lease_valid: shadow
                .as_ref()
                .and_then(|s| s.lease.as_ref())
                .is_some_and(|l| l.valid(now)),
            coverage: shadow
                .as_ref()
                .map(|s| s.maps.coverage())
                .unwrap_or_default(),
            id: r.info.id,
            size_bytes: r.info.size_bytes,
            generation: r.info.generation,
            origin: r.info.origin,
            owner: r.owner,
            epoch: r.info.epoch,
            pinned: r.info.pinned,
            readers: r.info.readers,
            lease_holders: r.info.lease_holders,
        }
    }

    /// One disk, wherever it is owned.
    pub fn stat(&self, disk: &str) -> Result<DiskInfo> {
        match self.registry.get(disk) {
            Ok(d) => Ok(self.info(&d)),
            Err(Error::UnknownDisk(_)) => self.remote(disk).map(|r| self.remote_info(r)),
            Err(e) => Err(e),
        }
    }

    /// The disks this node owns, by id.
    pub fn local_disks(&self) -> Vec<DiskInfo> {
        self.registry.list().iter().map(|d| self.info(d)).collect()
    }

    /// Every disk of the cluster: this node's, then other members', each by id.
    pub fn disks(&self) -> Vec<DiskInfo> {
        let mut v = self.local_disks();
        v.extend(
            self.cluster
                .remote_disks()
                .into_iter()
                .filter(|r| self.registry.get(&r.info.id).is_err())
                .map(|r| self.remote_info(r)),
        );
        v
    }

    /// Forgets `member` as a claimant of `disk` that left the cluster (an operator's call):
    /// the members that claim it now.
    pub fn forget_claimant(&self, disk: &str, member: &str) -> Result<Vec<String>> {
        crate::ids::DiskId::parse(disk)?;
        self.cluster
            .forget_claimant(disk, member)
            .map_err(Error::Invalid)
    }

    /// Registers a disk and saves it, so that it is still there after a restart.
    pub async fn register(&self, id: &str, origin: &Path, mode: DiskMode) -> Result<DiskInfo> {
        if let Some(r) = self.cluster.remote(id) {
            tracing::warn!(disk = id, owner = %r.owner, "register refused: another member owns this id");
            return Err(Error::DiskExists(id.to_string()));
        }
        let owners = self.cluster.claimed_by(id);
        if !owners.is_empty() {
            tracing::warn!(
                disk = id,
                ?owners,
                "register refused: other members own this id"
            );
            return Err(Error::DiskExists(id.to_string()));
        }
        let d = self.registry.register(id, origin, mode).await?;
        if let Err(e) = self.registry.save().await {
            tracing::warn!(disk = id, error = %e, "registration not saved; taken back");
            self.registry.unregister_unsaved(id);
            return Err(e);
        }
        self.cluster.disks_changed().await;
        Ok(self.info(&d))
    }

    /// A snapshot of the cache, its counters and the disks.
    pub fn status(&self) -> NodeStatus {
        let tiers = self.cache.usage();
        let policy = self.cache.policy();
        let c = self.cache.stats();
        let r = self.reads.stats();
        NodeStatus {
            node_id: self.config.node_id.clone(),
            block_bytes: self.config.block_bytes,
            single_touch_share: policy.single_share(),
            policy,
            counters: Counters {
                lookups: c.lookups(),
                misses: c.misses.get(),
                zero_block_hits: r.zero_block_hits.get(),
                origin_reads: r.origin_reads.get(),
                origin_read_bytes: r.origin_read_bytes.get(),
                promotions: c.promotions.get(),
                demotions: c.demotions.get(),
                evictions: c.evictions_ram_single.get()
                    + c.evictions_ram_multi.get()
                    + c.evictions_ssd.get(),
                ssd_verify_failures: c.ssd_verify_failures.get(),
                ssd_write_failures: c.ssd_write_failures.get(),
                ssd_written_bytes: c.ssd_written_bytes.get(),
                ssd_served_bytes: c.ssd_served_bytes.get(),
                ssd_writes_saved: c.ssd_writes_saved.get(),
                ssd_admissions_refused: c.ssd_admissions_refused.get(),
                logical_bytes: c.logical_bytes.load(Ordering::Relaxed),
                stored_bytes: tiers.iter().map(|t| t.bytes).sum(),
                single_flight_joins: r.single_flight_joins.get(),
                owner_reads: r.owner_reads.get(),
                owner_read_bytes: r.owner_read_bytes.get(),
                peer_reads: r.peer_reads.get(),
                peer_read_bytes: r.peer_read_bytes.get(),
                read_ahead_blocks: r.read_ahead_blocks.get(),
                read_ahead_used: r.read_ahead_used.get(),
            },
            tiers,
            certificates: self.certificates.clone(),
            disputed: (self.cluster.disputed_disks().into_iter())
                .filter_map(|d| self.cluster.disputed(&d).map(|owners| (d, owners)))
                .collect(),
            disks: self.disks(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            members: self.cluster.members(),
            leases: {
                let l = &self.cluster.stats;
                LeaseCounters {
                    grants: l.grants.get(),
                    renewals: l.renewals.get(),
                    expiries: l.owner_expiries.get() + l.holder_expiries.get(),
                    revocations: l.revocations_acked.get() + l.revocations_expired.get(),
                    revocation_wait_ms: l.revocation_wait_ms.get(),
                    detections: l.detections.get(),
                    peer_served_bytes: l.peer_served_bytes.get(),
                    block_map_bytes: self.cluster.block_map_bytes(),
                    block_map_traffic_bytes: l.block_map_traffic.get(),
                    foreign_revocations: l.foreign_revocations.get(),
                }
            },
        }
    }

    /// Leaves the cache warm: RAM multi-touch written to SSD, SSD and content maps synced.
    /// Blocks; call it from a blocking context.
    pub fn close(&self) {
        self.ahead_tasks.lock().abort_all();
        // Maps first: they are small and what a warm restart needs most.
        self.registry.sync_maps();
        self.cache.shutdown();
    }
}

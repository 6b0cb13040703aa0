//! shadowcache-node: the daemon that runs on every hypervisor host.
//!
//! # Layout
//!
//! - `config.rs`: the TOML file and the flags, validated with the key at fault in every error.
//! - `disk/`: the registry of this node's disks, each disk's mode (mutable -> sealed), and a
//!   sealed disk's content map (block index -> fingerprint), persisted under the data directory.
//! - `origin/`: where a disk's authoritative bytes live (a raw file or a block device).
//! - `cache/`: the content cache: fingerprints, the RAM single- and multi-touch pools (an
//!   adaptive split with ghosts), the SSD slot store with its index. It knows nothing about disks.
//! - `read.rs` and `write.rs`: the rules of DESIGN.md's read and write paths.
//! - `frontend/`: protocols only: gRPC Block and Admin on a Unix socket and optionally TCP.
//! - `telemetry.rs`: metric names and handles, tracing setup.
//!
//! [`start`] builds a [`Node`] from a [`Config`] and serves it; [`RunningNode::shutdown`] stops
//! the servers, writes the RAM multi-touch entries to the SSD tier and syncs it, so that a node
//! restarted on the same data directory is warm.

pub mod cache;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod detect;
pub mod disk;
pub mod error;
pub mod frontend;
pub mod nbd;
pub mod origin;
pub mod read;
pub mod telemetry;
pub mod write;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;

pub use cache::{ContentCache, Fingerprint, Tier, TierUsage};
pub use cluster::fetch::Route;
pub use config::{Config, Flags};
pub use disk::{DiskMode, DiskState, Registry};
pub use error::{Error, Result};
pub use read::ReadPath;

/// What a client sees of a disk.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskInfo {
    /// Disk id.
    pub id: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Mode.
    pub mode: DiskMode,
    /// Generation.
    pub generation: u64,
    /// Origin as registered.
    pub origin: String,
    /// Owner node id.
    pub owner: String,
    /// Random per registration at the owner.
    pub epoch: u64,
    /// Detection pinned off (owner only).
    pub pinned: bool,
    /// Members that read it in the detection window (owner only).
    pub readers: Vec<String>,
    /// Members holding a lease on it (owner only).
    pub lease_holders: Vec<String>,
    /// Blocks whose content this node knows (its coverage of an immutable disk).
    pub known_blocks: u64,
    /// Blocks of the disk.
    pub total_blocks: u64,
    /// This node holds a valid lease on it (a detected disk another member owns).
    pub lease_valid: bool,
    /// Blocks other members hold, from their block maps: (member, blocks).
    pub coverage: Vec<(String, u64)>,
}

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
}

/// One node: its disks, its cache and its read path. Frontends call these methods.
#[derive(Debug)]
pub struct Node {
    config: Config,
    registry: Registry,
    cache: ContentCache,
    reads: ReadPath,
    cluster: Arc<cluster::Cluster>,
    clock: Arc<dyn clock::Clock>,
    /// This node, for the tasks it spawns (revocations run to the end without their caller).
    me: Weak<Node>,
    /// Blocks being gathered for other members (`FetchBlocks`), in blocks: bounds the memory
    /// that many members asking at once can pin (256 MiB of blocks at most).
    peer_serving: tokio::sync::Semaphore,
    started: Instant,
    /// An exclusive lock on `DATA_DIR/lock`, held while the node lives: two nodes on one data
    /// directory would tear each other's SSD tier and content maps.
    _lock: std::fs::File,
}

impl Node {
    /// Opens the data directory and the cache, and registers the configured and saved disks.
    pub async fn open(config: Config) -> anyhow::Result<Arc<Node>> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
        let lock_path = config.data_dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            anyhow::bail!(
                "data_dir {} is in use by another shadowcache-node (it holds {})",
                config.data_dir.display(),
                lock_path.display()
            );
        }
        let cache_config = config.cache_config();
        let (cache, _recovery) =
            tokio::task::spawn_blocking(move || ContentCache::open(cache_config))
                .await
                .context("cache open task")?
                .context("cannot open the content cache")?;
        let registry = Registry::new(
            &config.data_dir,
            config.block_bytes,
            Duration::from_millis(config.lease.term_ms + config.lease.drift_margin_ms),
        );
        for d in &config.disks {
            registry
                .register(&d.id, &d.origin, d.mode)
                .await
                .with_context(|| format!("disk {:?} from the configuration", d.id))?;
        }
        registry
            .load_saved()
            .await
            .context("cannot load saved disks")?;
        let reads = ReadPath::new(cache.clone());
        let clock = clock::system();
        let cluster = cluster::Cluster::start(&config, clock.clone())
            .await
            .context("cannot join the cluster")?;
        let serving_blocks = ((256usize << 20) / config.block_bytes as usize).max(64);
        Ok(Arc::new_cyclic(|me| Node {
            config,
            registry,
            cache,
            reads,
            cluster,
            peer_serving: tokio::sync::Semaphore::new(serving_blocks),
            clock,
            me: me.clone(),
            started: Instant::now(),
            _lock: lock,
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The content cache.
    pub fn cache(&self) -> &ContentCache {
        &self.cache
    }

    /// The disk registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The read path (its counters).
    pub fn reads(&self) -> &ReadPath {
        &self.reads
    }

    /// The cluster view.
    pub fn cluster(&self) -> &Arc<cluster::Cluster> {
        &self.cluster
    }

    /// The owner of `disk` if another member owns it, or an error if nobody does.
    fn remote(&self, disk: &str) -> Result<cluster::RemoteDisk> {
        self.cluster
            .remote(disk)
            .ok_or_else(|| Error::UnknownDisk(disk.chars().take(160).collect()))
    }

    /// Reads `len` bytes at `offset` of disk `disk`, wherever it is owned.
    pub async fn read(&self, disk: &str, offset: u64, len: u64) -> Result<Bytes> {
        Ok(read::join(self.read_pieces(disk, offset, len).await?))
    }

    /// [`Node::read`] as the slices of the blocks read, in order (see
    /// [`ReadPath::read_pieces`]).
    pub async fn read_pieces(&self, disk: &str, offset: u64, len: u64) -> Result<Vec<Bytes>> {
        match self.registry.get(disk) {
            Ok(d) => {
                self.note_read(&d, &self.config.node_id);
                self.reads.read_pieces(&d, offset, len, Route::Any).await
            }
            Err(Error::UnknownDisk(_)) if let Some(shadow) = self.cluster.shadow(disk) => {
                // A sealed disk of another member, or a detected one under a valid lease:
                // served through this node's cache.
                read::check_range(&shadow.disk, offset, len)?;
                if self.cluster.lease_ok(&shadow).await {
                    match self
                        .reads
                        .read_pieces(&shadow.disk, offset, len, Route::Any)
                        .await
                    {
                        Ok(b) => return Ok(b),
                        Err(e) if shadow.lease.is_none() => return Err(e),
                        Err(e) => {
                            // The owner may have refused this generation (a write is being
                            // applied; the revocation is on its way): read through it.
                            tracing::debug!(disk, error = %e, "shadow of a detected disk failed; reading through the owner");
                        }
                    }
                } else {
                    self.cluster.stats.leaseless_reads.inc();
                }
                self.forward_read(disk, offset, len).await.map(|b| vec![b])
            }
            Err(Error::UnknownDisk(_)) => {
                self.forward_read(disk, offset, len).await.map(|b| vec![b])
            }
            Err(e) => Err(e),
        }
    }

    /// Reads a disk another member owns at the owner, caching nothing.
    async fn forward_read(&self, disk: &str, offset: u64, len: u64) -> Result<Bytes> {
        let r = self.remote(disk)?;
        read::check_span(disk, r.info.size_bytes, offset, len)?;
        metrics::counter!(telemetry::FORWARDED, "rpc" => "read").increment(1);
        self.cluster
            .peers
            .read(&r.owner, r.addr, disk, offset, len, 0, 0)
            .await
    }

    /// Counts a read of an owned mutable disk by member `from` towards its detection.
    #[inline]
    fn note_read(&self, d: &disk::Disk, from: &str) {
        if self.config.detection.enabled && d.state() == DiskState::Mutable {
            d.owner
                .record_read(from, self.clock.now(), &self.config.detection);
        }
    }

    /// Writes `data` at `offset` of disk `disk`; a disk owned elsewhere is written at its owner.
    pub async fn write(&self, disk: &str, offset: u64, data: Bytes) -> Result<()> {
        match self.registry.get(disk) {
            Ok(d) => self.write_owned(&d, offset, data).await,
            Err(Error::UnknownDisk(_)) => {
                let r = self.remote(disk)?;
                read::check_span(disk, r.info.size_bytes, offset, data.len() as u64)?;
                metrics::counter!(telemetry::FORWARDED, "rpc" => "write").increment(1);
                self.cluster
                    .peers
                    .write(&r.owner, r.addr, disk, offset, data)
                    .await
            }
            Err(e) => Err(e),
        }
    }

    /// Makes the acknowledged writes of `disk` durable, at its owner.
    pub async fn flush(&self, disk: &str) -> Result<()> {
        match self.registry.get(disk) {
            Ok(d) => write::flush(&d).await,
            Err(Error::UnknownDisk(_)) => {
                let r = self.remote(disk)?;
                metrics::counter!(telemetry::FORWARDED, "rpc" => "flush").increment(1);
                self.cluster.peers.flush(&r.owner, r.addr, disk).await
            }
            Err(e) => Err(e),
        }
    }

    /// A write of a disk this node owns: waits out a post-restart fence, ends a detection
    /// (revoking every lease) when it finds one, then writes.
    async fn write_owned(&self, d: &Arc<disk::Disk>, offset: u64, data: Bytes) -> Result<()> {
        read::check_range(d, offset, data.len() as u64)?;
        if data.is_empty() {
            // Nothing to write: no reason to end a detection for it.
            return match d.state() {
                DiskState::Sealed | DiskState::Sealing => Err(Error::Sealed(d.id.to_string())),
                _ => Ok(()),
            };
        }
        loop {
            let fenced = d.owner.fenced_for(self.clock.now());
            if !fenced.is_zero() {
                tracing::info!(disk = %d.id, wait_ms = fenced.as_millis() as u64, "write waits until leases granted before the restart are over");
                tokio::time::sleep(fenced).await;
                continue;
            }
            d.owner.record_write(self.clock.now());
            match write::write(d, offset, data.clone()).await {
                Err(Error::Detected(_)) => self.end_detection(d, "write").await?,
                r => return r,
            }
        }
    }

    /// Checks that a request about `d` names its current generation and epoch (0: any).
    fn check_generation(d: &disk::Disk, generation: u64, epoch: u64) -> Result<()> {
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
        (generation, epoch): (u64, u64),
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
                    .max(first + 1),
            );
        let unknown: Vec<u64> = (first..end).filter(|&i| map.get(i).is_none()).collect();
        for part in unknown.chunks(cluster::fetch::MAX_BLOCKS_PER_REQUEST) {
            // The same budget as blocks gathered for members: many members asking at once
            // cannot pin more than it.
            let _room = self
                .peer_serving
                .acquire_many(part.len() as u32)
                .await
                .map_err(|_| Error::State("the node is shutting down".into()))?;
            for r in self.reads.blocks(&d, &map, part, Route::Any).await {
                if let Err(e) = r {
                    tracing::warn!(disk, error = %e, "a block could not be fingerprinted for a member's content map");
                }
            }
        }
        // Checked again: entries of a generation that ended meanwhile must not reach a member.
        Self::check_generation(&d, generation.max(1), epoch)?;
        Ok((first..end)
            .filter_map(|i| map.get(i).map(|r| (i, r)))
            .collect())
    }

    /// Blocks of a sealed disk, for another member (`Peer.FetchBlocks`): this node's own disk,
    /// or the shadow of another member's, read through this node's cache; reads it causes go
    /// to owners only. `None` for a block it could not provide. At most 64 blocks.
    pub async fn blocks_for_peer(
        &self,
        disk: &str,
        (generation, epoch): (u64, u64),
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
                let stale = sh.disk.generation() != generation
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
            return Ok(out);
        }
        let mut wanted: Vec<u64> = indices.iter().copied().filter(|&i| inside(i)).collect();
        wanted.sort_unstable();
        wanted.dedup();
        // Read as the block's home: whatever this node lacks comes from the owner only, so a
        // request never travels more than two hops.
        let got = self.reads.blocks(&d, &map, &wanted, Route::OwnerOnly).await;
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

    /// This node's block map of an immutable disk at (generation, epoch), streamed to another
    /// member (`Peer.SubscribeBlockMap`) until that generation is over here.
    pub fn block_map_stream(
        &self,
        disk: &str,
        generation: u64,
        epoch: u64,
    ) -> Result<
        tokio::sync::mpsc::Receiver<
            std::result::Result<shadowcache_proto::BlockMapUpdate, tonic::Status>,
        >,
    > {
        match self.registry.get(disk) {
            Ok(d) => {
                if d.serving_map().is_none() {
                    return Err(Error::Invalid(format!("disk {disk:?} is not immutable")));
                }
                Self::check_generation(&d, generation.max(1), epoch)?;
                let alive = d.clone();
                Ok(cluster::blockmap::serve(d, generation, move || {
                    alive.serving_map().is_some() && alive.generation() == generation
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
                        cluster
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
        (generation, epoch): (u64, u64),
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

    /// Writes a disk this node owns (for the Peer service).
    pub async fn write_local(&self, disk: &str, offset: u64, data: Bytes) -> Result<()> {
        let d = self.registry.get(disk)?;
        self.write_owned(&d, offset, data).await
    }

    /// `base:allocation` extents of [offset, offset + len) of `disk` for NBD BLOCK_STATUS:
    /// (length, flags), all-zero blocks an immutable disk's content map knows of reported as
    /// holes that read as zeroes, everything else as data. With `one`, the first extent only.
    pub fn allocation(&self, disk: &str, offset: u64, len: u64, one: bool) -> Vec<(u32, u32)> {
        let map = match self.registry.get(disk) {
            Ok(d) => d.serving_map(),
            Err(_) => self.cluster.shadow(disk).and_then(|s| s.disk.serving_map()),
        };
        let Some(map) = map else {
            return vec![(len as u32, 0)];
        };
        let bs = u64::from(self.config.block_bytes);
        let end = offset + len;
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut at = offset;
        while at < end {
            let i = at / bs;
            let upto = ((i + 1) * bs).min(end);
            let flags = match map.get(i) {
                Some(disk::BlockRef::Zero) => nbd::proto::STATE_HOLE | nbd::proto::STATE_ZERO,
                _ => 0,
            };
            let n = (upto - at) as u32;
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += n,
                _ => {
                    if one && !out.is_empty() {
                        break;
                    }
                    out.push((n, flags));
                }
            }
            at = upto;
        }
        out
    }

    /// Grants (or renews) `from` a lease on (disk, generation, epoch), for `Peer.Lease`.
    pub fn grant_lease(
        &self,
        disk: &str,
        generation: u64,
        epoch: u64,
        from: &str,
    ) -> Result<Duration> {
        let d = self.registry.get(disk)?;
        let term = Duration::from_millis(self.config.lease.term_ms);
        let margin = Duration::from_millis(self.config.lease.drift_margin_ms);
        if !self.cluster.live_member(from) || from == self.config.node_id {
            return Err(Error::NoLease {
                disk: disk.to_string(),
                why: format!("{from:?} is not a live member of the cluster"),
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
            .insert(Arc::from(from), now + term + margin)
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

    /// The owner revoked (disk, generation) here (`Peer.Revoke`): returns once this node no
    /// longer serves it from its cache.
    pub fn revoke_held(&self, disk: &str, generation: u64, from: &str) -> Result<()> {
        match self.cluster.remote(disk) {
            Some(r) if r.owner == from => {
                self.cluster.revoke_local(disk, generation);
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

    /// Ends the detection of a disk this node owns: no new leases, a new generation saved,
    /// every holder revoked (acknowledged, or its lease run out), then mutable again. Runs in a
    /// task of its own, so a caller that goes away cannot leave the disk half way.
    pub async fn end_detection(&self, d: &Arc<disk::Disk>, reason: &'static str) -> Result<()> {
        let node = self
            .me
            .upgrade()
            .ok_or_else(|| Error::State("the node is shutting down".into()))?;
        let d = d.clone();
        tokio::spawn(async move { node.end_detection_to_the_end(&d, reason).await })
            .await
            .map_err(|e| Error::State(format!("revocation task: {e}")))?
    }

    async fn end_detection_to_the_end(
        &self,
        d: &Arc<disk::Disk>,
        reason: &'static str,
    ) -> Result<()> {
        let _one = d.owner.revoking.lock().await;
        let holders: Vec<(Arc<str>, Duration)> = {
            let mut leases = d.owner.leases.lock();
            if !d.begin_revoking() {
                if d.state() == DiskState::Revoking {
                    // A revocation task that did not finish (it cannot be cancelled, so it
                    // panicked): its holders were taken; wait them out in full.
                    let until = self.clock.now()
                        + Duration::from_millis(
                            self.config.lease.term_ms + self.config.lease.drift_margin_ms,
                        );
                    d.owner.fence(until);
                    d.end_revoking();
                }
                return Ok(());
            }
            leases.drain().collect()
        };
        let old = d.generation() - 1;
        let started = self.clock.now();
        if let Err(e) = self.registry.save().await {
            tracing::warn!(disk = %d.id, error = %e, "could not save the new generation; a restart will wait a lease term before writes");
        }
        self.cluster.disks_changed().await;
        let live: Vec<(Arc<str>, Duration)> =
            holders.into_iter().filter(|(_, e)| *e > started).collect();
        let outcomes = futures::future::join_all(
            live.iter()
                .map(|(h, expiry)| self.cluster.revoke_holder(h, d.id.as_str(), old, *expiry)),
        )
        .await;
        let stats = &self.cluster.stats;
        for acked in &outcomes {
            if *acked {
                stats.revocations_acked.inc();
            } else {
                stats.revocations_expired.inc();
                stats.owner_expiries.inc();
            }
        }
        let waited = self.clock.now().saturating_sub(started);
        stats.revocation_wait.record(waited.as_secs_f64());
        stats.revocation_wait_ms.add(waited.as_millis() as u64);
        d.owner.reset(self.clock.now());
        d.end_revoking();
        stats.undetections.inc();
        if let Err(e) = self.registry.save().await {
            tracing::warn!(disk = %d.id, error = %e, "could not save that the disk is mutable again");
        }
        self.cluster.disks_changed().await;
        tracing::info!(
            disk = %d.id,
            reason,
            generation = d.generation(),
            holders = live.len(),
            acked = outcomes.iter().filter(|a| **a).count(),
            waited_ms = waited.as_millis() as u64,
            "disk mutable again: every lease revoked"
        );
        Ok(())
    }

    /// Makes `d` detected-immutable if it qualifies now. One transition at a time per disk.
    async fn detect(&self, d: &Arc<disk::Disk>) {
        let now = self.clock.now();
        let Some(activity) = d.owner.qualifies(now, &self.config.detection) else {
            return;
        };
        if d.state() != DiskState::Mutable
            || d.owner
                .detecting
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let generation = d.generation() + 1;
        let last_write = d.owner.last_write();
        // The generation is saved (as detected) before any lease on it can be granted.
        d.restore_generation(generation);
        let saved = self.registry.save().await;
        let mut ok = saved.is_ok() && d.begin_detected(generation);
        // A write that came and went during the save, or a pin, undoes it (no lease can have
        // been granted: grants wait for `detecting` to clear).
        if ok && (d.owner.last_write() != last_write || d.owner.pinned()) {
            d.abort_detected();
            ok = false;
        }
        d.owner
            .detecting
            .store(false, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = saved {
            tracing::warn!(disk = %d.id, error = %e, "could not save the detected generation; the disk stays mutable");
            return;
        }
        if !ok {
            tracing::debug!(disk = %d.id, "a write came in while detecting; the disk stays mutable");
            return;
        }
        self.cluster.stats.detections.inc();
        self.cluster.disks_changed().await;
        tracing::info!(
            disk = %d.id,
            generation,
            readers = ?activity.readers,
            reads = activity.reads,
            quiet_ms = self.config.detection.quiet_period_ms,
            reason = "read by enough members with no write",
            "disk detected-immutable"
        );
    }

    /// Looks at every mutable disk this node owns and detects those that qualify.
    pub async fn detect_all(&self) {
        if !self.config.detection.enabled {
            return;
        }
        for d in self.registry.list() {
            if d.state() == DiskState::Mutable {
                self.detect(&d).await;
            }
        }
    }

    /// An operator's detection control of a disk this node owns.
    pub async fn set_detection(&self, disk: &str, action: DetectionAction) -> Result<DiskInfo> {
        let d = match self.registry.get(disk) {
            Ok(d) => d,
            Err(Error::UnknownDisk(_)) if self.cluster.remote(disk).is_some() => {
                let owner = self.remote(disk)?.owner;
                return Err(Error::Invalid(format!(
                    "disk {disk:?} is owned by member {owner}: change its detection there"
                )));
            }
            Err(e) => return Err(e),
        };
        if d.state() == DiskState::Sealed {
            return Err(Error::Invalid(format!(
                "disk {disk:?} is sealed: it is immutable for ever, detection does not apply"
            )));
        }
        match action {
            DetectionAction::Pin => {
                d.owner.set_pinned(true);
                self.end_detection(&d, "operator pinned it mutable").await?;
                tracing::info!(disk, "detection pinned off by an operator");
            }
            DetectionAction::Unpin => {
                d.owner.set_pinned(false);
                tracing::info!(disk, "detection unpinned by an operator");
            }
            DetectionAction::DropShadows => {
                self.end_detection(&d, "operator dropped its shadow clones")
                    .await?;
            }
        }
        self.registry.save().await?;
        Ok(self.info(&d))
    }

    /// Flushes a disk this node owns (for the Peer service).
    pub async fn flush_local(&self, disk: &str) -> Result<()> {
        let d = self.registry.get(disk)?;
        write::flush(&d).await
    }

    fn total_blocks(&self, size: u64) -> u64 {
        size.div_ceil(u64::from(self.config.block_bytes))
    }

    fn info(&self, d: &disk::Disk) -> DiskInfo {
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

    fn remote_info(&self, r: cluster::RemoteDisk) -> DiskInfo {
        use shadowcache_proto::DiskMode as Pb;
        let shadow = self.cluster.shadow(&r.info.id);
        let now = self.clock.now();
        DiskInfo {
            mode: match Pb::try_from(r.info.mode) {
                Ok(Pb::Sealed) => DiskMode::Sealed,
                Ok(Pb::Detected) => DiskMode::Detected,
                _ => DiskMode::Mutable,
            },
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

    /// Registers a disk and saves it, so that it is still there after a restart.
    pub async fn register(&self, id: &str, origin: &Path, mode: DiskMode) -> Result<DiskInfo> {
        if let Some(r) = self.cluster.remote(id) {
            tracing::warn!(disk = id, owner = %r.owner, "register refused: another member owns this id");
            return Err(Error::DiskExists(id.to_string()));
        }
        let d = self.registry.register(id, origin, mode).await?;
        self.registry.save().await?;
        self.cluster.disks_changed().await;
        Ok(self.info(&d))
    }

    /// Changes a disk's mode; only mutable -> sealed exists.
    pub async fn set_mode(&self, disk: &str, mode: DiskMode) -> Result<DiskInfo> {
        let d = match self.registry.get(disk) {
            Ok(d) => d,
            Err(Error::UnknownDisk(_)) if self.cluster.remote(disk).is_some() => {
                let owner = self.remote(disk)?.owner;
                return Err(Error::Invalid(format!(
                    "disk {disk:?} is owned by member {owner}: change its mode there"
                )));
            }
            Err(e) => return Err(e),
        };
        match (d.mode(), mode) {
            (_, DiskMode::Detected) => {
                return Err(Error::Invalid(
                    "a disk becomes detected by detection, not by an operator: seal it, or leave it mutable".into(),
                ));
            }
            (DiskMode::Detected, DiskMode::Sealed) => {
                // Sealing makes it immutable for ever: its leases go first.
                self.end_detection(&d, "operator sealed it").await?;
                self.registry.seal(disk).await?;
            }
            (_, DiskMode::Sealed) => {
                self.registry.seal(disk).await?;
            }
            (DiskMode::Mutable | DiskMode::Detected, DiskMode::Mutable) => {}
            (DiskMode::Sealed, DiskMode::Mutable) => return Err(Error::Unseal(disk.to_string())),
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
                lookups: c.lookups.load(Ordering::Relaxed),
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
                logical_bytes: c.logical_bytes.load(Ordering::Relaxed),
                stored_bytes: tiers.iter().map(|t| t.bytes).sum(),
                single_flight_joins: r.single_flight_joins.get(),
                owner_reads: r.owner_reads.get(),
                owner_read_bytes: r.owner_read_bytes.get(),
                peer_reads: r.peer_reads.get(),
                peer_read_bytes: r.peer_read_bytes.get(),
            },
            tiers,
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
                }
            },
        }
    }

    /// Leaves the cache warm: RAM multi-touch written to SSD, SSD and content maps synced.
    /// Blocks; call it from a blocking context.
    pub fn close(&self) {
        // Maps first: they are small and what a warm restart needs most.
        self.registry.sync_maps();
        self.cache.shutdown();
    }
}

/// What an operator does to a disk's detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectionAction {
    /// Never detect it (a detected disk goes back to mutable first).
    Pin,
    /// Let detection run again.
    Unpin,
    /// A detected disk goes back to mutable; detection starts over.
    DropShadows,
}

/// A node serving its frontends.
#[derive(Debug)]
pub struct RunningNode {
    node: Arc<Node>,
    stop: tokio::sync::watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Opens the node and starts its frontends: gRPC on the Unix socket, and on TCP if configured.
pub async fn start(config: Config) -> anyhow::Result<RunningNode> {
    let node = Node::open(config).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    let unix = frontend::grpc::bind_unix(&node.config.listen_unix)?;
    servers.push(tokio::spawn(frontend::grpc::serve_unix(
        node.clone(),
        unix,
        stopped.clone(),
    )));
    if let Some(addr) = node.config.listen_tcp {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on listen_tcp {addr}"))?;
        servers.push(tokio::spawn(frontend::grpc::serve_tcp(
            node.clone(),
            tcp,
            stopped.clone(),
        )));
    }
    if let Some(path) = &node.config.nbd_unix {
        let l = frontend::grpc::bind_unix(path)?;
        servers.push(tokio::spawn(nbd::serve_unix(
            node.clone(),
            l,
            stopped.clone(),
        )));
    }
    if let Some(addr) = node.config.nbd_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on nbd_listen {addr}"))?;
        servers.push(tokio::spawn(nbd::serve_tcp(
            node.clone(),
            l,
            stopped.clone(),
        )));
    }
    if let Some(addr) = node.config.cluster.peer_listen {
        let peer = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on peer_listen {addr}"))?;
        servers.push(tokio::spawn(frontend::grpc::serve_peer(
            node.clone(),
            peer,
            stopped.clone(),
        )));
        let n = node.clone();
        node.cluster
            .spawn_refresher(stopped.clone(), move |id| n.registry.get(id).is_ok());
    }
    // Detection looks at every owned mutable disk four times a second.
    if node.config.detection.enabled {
        let node = node.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => node.detect_all().await,
                    _ = stopped.changed() => break,
                }
            }
        });
    }
    // Gauges (bytes and entries per tier) are refreshed from the cache once a second.
    {
        let node = node.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        node.cache.usage();
                        metrics::gauge!(telemetry::BLOCK_MAP_BYTES)
                            .set(node.cluster.block_map_bytes() as f64);
                    }
                    _ = stopped.changed() => break,
                }
            }
        });
    }
    tracing::info!(
        node_id = %node.config.node_id,
        socket = %node.config.listen_unix.display(),
        tcp = ?node.config.listen_tcp,
        block_size = node.config.block_bytes,
        disks = node.registry.list().len(),
        "shadowcache node serving"
    );
    Ok(RunningNode {
        node,
        stop,
        servers,
    })
}

impl RunningNode {
    /// The node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The Unix socket the gRPC services listen on.
    pub fn unix_socket(&self) -> &Path {
        &self.node.config.listen_unix
    }

    /// Stops the frontends (in-flight requests finish), then leaves the cache warm.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        // In-flight requests get a grace period; a client that keeps a connection busy longer
        // does not keep the cache from being saved.
        let grace = Duration::from_secs(10);
        for s in self.servers {
            match tokio::time::timeout(grace, s).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "frontend stopped with an error"),
                Ok(Err(e)) => tracing::warn!(error = %e, "frontend task failed"),
                Err(_) => tracing::warn!("frontend still busy after {grace:?}; closing anyway"),
            }
        }
        self.node.cluster.shutdown().await;
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || node.close())
            .await
            .context("shutdown task")?;
        let _ = std::fs::remove_file(&self.node.config.listen_unix);
        tracing::info!("shadowcache node stopped; cache left warm");
        Ok(())
    }
}

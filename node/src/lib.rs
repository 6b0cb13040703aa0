//! shadowcache-node: the daemon that runs on every hypervisor host.
//!
//! # Layout
//!
//! - `config.rs`: the TOML file and the flags, validated with the key at fault in every error.
//! - `disk/`: the registry of this node's disks, each disk's mode (mutable -> sealed), and a
//!   sealed disk's content map (block index -> fingerprint), persisted under the data directory.
//! - `origin/`: where a disk's authoritative bytes live (a raw file or a block device).
//! - `cache/`: the content cache: fingerprints, the RAM single- and multi-touch pools (moka),
//!   the SSD slot store with its index. It knows nothing about disks.
//! - `read.rs` and `write.rs`: the rules of DESIGN.md's read and write paths.
//! - `frontend/`: protocols only: gRPC Block and Admin on a Unix socket and optionally TCP.
//! - `telemetry.rs`: metric names and handles, tracing setup.
//!
//! [`start`] builds a [`Node`] from a [`Config`] and serves it; [`RunningNode::shutdown`] stops
//! the servers, writes the RAM multi-touch entries to the SSD tier and syncs it, so that a node
//! restarted on the same data directory is warm.

pub mod cache;
pub mod cluster;
pub mod config;
pub mod disk;
pub mod error;
pub mod frontend;
pub mod origin;
pub mod read;
pub mod telemetry;
pub mod write;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;

pub use cache::{ContentCache, Fingerprint, Tier, TierUsage};
pub use config::{Config, Flags};
pub use disk::{DiskMode, Registry};
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
}

/// One node: its disks, its cache and its read path. Frontends call these methods.
#[derive(Debug)]
pub struct Node {
    config: Config,
    registry: Registry,
    cache: ContentCache,
    reads: ReadPath,
    cluster: Arc<cluster::Cluster>,
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
        let registry = Registry::new(&config.data_dir, config.block_bytes);
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
        let cluster = cluster::Cluster::start(&config)
            .await
            .context("cannot join the cluster")?;
        Ok(Arc::new(Node {
            config,
            registry,
            cache,
            reads,
            cluster,
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
        match self.registry.get(disk) {
            Ok(d) => self.reads.read(&d, offset, len).await,
            Err(Error::UnknownDisk(_)) if let Some(shadow) = self.cluster.shadow(disk) => {
                // A sealed disk of another member: served through this node's cache.
                self.reads.read(&shadow, offset, len).await
            }
            Err(Error::UnknownDisk(_)) => {
                let r = self.remote(disk)?;
                read::check_span(disk, r.info.size_bytes, offset, len)?;
                metrics::counter!(telemetry::FORWARDED, "rpc" => "read").increment(1);
                self.cluster
                    .peers
                    .read(&r.owner, r.addr, disk, offset, len)
                    .await
            }
            Err(e) => Err(e),
        }
    }

    /// Writes `data` at `offset` of disk `disk`; a disk owned elsewhere is written at its owner.
    pub async fn write(&self, disk: &str, offset: u64, data: Bytes) -> Result<()> {
        match self.registry.get(disk) {
            Ok(d) => write::write(&d, offset, data).await,
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

    /// Entries of the content map of a sealed disk this node owns, in [first, first + count)
    /// (at most 4096), for `Peer.ContentMap`.
    pub fn content_map_chunk(
        &self,
        disk: &str,
        generation: u64,
        first: u64,
        count: u32,
    ) -> Result<Vec<(u64, disk::BlockRef)>> {
        let d = self.registry.get(disk)?;
        if d.generation() != generation {
            return Err(Error::StaleGeneration {
                disk: disk.to_string(),
                asked: generation,
                current: d.generation(),
            });
        }
        let map = d
            .sealed_map()
            .ok_or_else(|| Error::Invalid(format!("disk {disk:?} is not sealed")))?;
        let blocks = d.size.div_ceil(u64::from(self.config.block_bytes));
        let end = first.saturating_add(u64::from(count.min(4096))).min(blocks);
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
        generation: u64,
        indices: &[u64],
    ) -> Result<Vec<(u64, Option<Bytes>)>> {
        if indices.len() > 64 {
            return Err(Error::Invalid(format!(
                "{} blocks asked for; at most 64 per request",
                indices.len()
            )));
        }
        let d = match self.registry.get(disk) {
            Ok(d) if d.sealed_map().is_some() => d,
            Ok(_) => return Err(Error::Invalid(format!("disk {disk:?} is not sealed"))),
            Err(Error::UnknownDisk(_)) => self
                .cluster
                .shadow(disk)
                .ok_or_else(|| Error::UnknownDisk(disk.chars().take(160).collect()))?,
            Err(e) => return Err(e),
        };
        if d.generation() != generation {
            return Err(Error::StaleGeneration {
                disk: disk.to_string(),
                asked: generation,
                current: d.generation(),
            });
        }
        let bs = u64::from(self.config.block_bytes);
        let mut out = Vec::with_capacity(indices.len());
        for &i in indices {
            let at = i.saturating_mul(bs);
            if at >= d.size {
                out.push((i, None));
                continue;
            }
            let len = bs.min(d.size - at);
            let got = origin::peer::serving_peer(self.reads.read(&d, at, len)).await;
            out.push((i, got.ok()));
        }
        Ok(out)
    }

    /// Reads a disk this node owns (for the Peer service: never forwarded again).
    pub async fn read_local(&self, disk: &str, offset: u64, len: u64) -> Result<Bytes> {
        let d = self.registry.get(disk)?;
        self.reads.read(&d, offset, len).await
    }

    /// Writes a disk this node owns (for the Peer service).
    pub async fn write_local(&self, disk: &str, offset: u64, data: Bytes) -> Result<()> {
        let d = self.registry.get(disk)?;
        write::write(&d, offset, data).await
    }

    /// Flushes a disk this node owns (for the Peer service).
    pub async fn flush_local(&self, disk: &str) -> Result<()> {
        let d = self.registry.get(disk)?;
        write::flush(&d).await
    }

    fn info(&self, d: &disk::Disk) -> DiskInfo {
        DiskInfo {
            id: d.id.to_string(),
            size_bytes: d.size,
            mode: d.mode(),
            generation: d.generation(),
            origin: d.origin.describe().to_string(),
            owner: self.config.node_id.clone(),
        }
    }

    fn remote_info(r: cluster::RemoteDisk) -> DiskInfo {
        use shadowcache_proto::DiskMode as Pb;
        DiskInfo {
            mode: match Pb::try_from(r.info.mode) {
                Ok(Pb::Sealed) => DiskMode::Sealed,
                _ => DiskMode::Mutable,
            },
            id: r.info.id,
            size_bytes: r.info.size_bytes,
            generation: r.info.generation,
            origin: r.info.origin,
            owner: r.owner,
        }
    }

    /// One disk, wherever it is owned.
    pub fn stat(&self, disk: &str) -> Result<DiskInfo> {
        match self.registry.get(disk) {
            Ok(d) => Ok(self.info(&d)),
            Err(Error::UnknownDisk(_)) => self.remote(disk).map(Self::remote_info),
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
                .map(Self::remote_info),
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
            (_, DiskMode::Sealed) => {
                self.registry.seal(disk).await?;
            }
            (DiskMode::Mutable, DiskMode::Mutable) => {}
            (DiskMode::Sealed, DiskMode::Mutable) => return Err(Error::Unseal(disk.to_string())),
        }
        self.cluster.disks_changed().await;
        Ok(self.info(&d))
    }

    /// A snapshot of the cache, its counters and the disks.
    pub fn status(&self) -> NodeStatus {
        let tiers = self.cache.usage();
        let c = self.cache.stats();
        let r = self.reads.stats();
        NodeStatus {
            node_id: self.config.node_id.clone(),
            block_bytes: self.config.block_bytes,
            single_touch_share: self.config.single_touch_share,
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
    // Gauges (bytes and entries per tier) are refreshed from the cache once a second.
    {
        let node = node.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => { node.cache.usage(); }
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

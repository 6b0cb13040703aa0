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
//! - `lib.rs` (here): [`Node`] and its routing: a disk this node owns, the shadow of one another
//!   member owns (served from the cache), or forwarded to its owner.
//! - `read.rs` and `write.rs`: the rules of DESIGN.md's read and write paths (the write path
//!   with its revocation of leases).
//! - `mode.rs`: detection and the operator's seal, pin and drop-shadows.
//! - `serve.rs`: what this node answers other members (the Peer service's rules).
//! - `admin.rs`: disks and status as clients see them; registration.
//! - `server.rs`: listeners, background loops, shutdown.
//! - `cluster/`: membership, other members' disks and shadows, leases, block maps, and
//!   `fetch.rs` (owners' content maps, blocks from holders, homes and owners, verified).
//! - `frontend/`: protocols only: gRPC Block and Admin on a Unix socket and optionally TCP, the
//!   Peer service, and the one map between errors and gRPC statuses.
//! - `telemetry.rs`: metric names and handles, tracing setup.
//!
//! [`start`] builds a [`Node`] from a [`Config`] and serves it; [`RunningNode::shutdown`] stops
//! the servers, writes the RAM multi-touch entries to the SSD tier and syncs it, so that a node
//! restarted on the same data directory is warm.
//!
//! Architecture invariant: routing only (owned, shadow, forwarded); the rules live in `read.rs`,
//! `write.rs`, `mode.rs` and `serve.rs`.

pub mod admin;
pub mod blocking;
pub mod cache;
pub mod certs;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod disk;
pub mod error;
pub mod frontend;
pub mod hashing;
pub mod ids;
pub mod inprocess;
pub mod mode;
pub mod nbd;
pub mod origin;
pub mod read;
pub mod serve;
#[cfg(feature = "failpoints")]
pub mod sim;

/// Whether a test build switched off the protocol guard `name` (fail point `name` set to
/// `return`): the simulation's proof that its checker catches the removal of each guard
/// (`docs/reliability.md` lists them). Always false without the `failpoints` feature.
#[inline]
pub(crate) fn guard_removed(name: &str) -> bool {
    #[cfg(feature = "failpoints")]
    {
        fail::eval(name, |_| ()).is_some()
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        false
    }
}
pub mod server;
pub mod telemetry;
pub mod write;

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;

pub use admin::{Counters, DiskInfo, LeaseCounters, NodeStatus};
pub use cache::{ContentCache, Fingerprint, Tier, TierUsage};
pub use cluster::fetch::Route;
pub use config::{Config, Flags};
pub use disk::{DiskMode, DiskState, Registry};
pub use error::{Error, Result};
pub use mode::DetectionAction;
pub use read::ReadPath;
pub use server::{RunningNode, start, start_in};

/// Every source of nondeterminism a node reads, handed in at start: its clock, the seed of its
/// random choices (disk epochs), who is in the cluster, and how other members are called. In
/// production: `CLOCK_BOOTTIME`, entropy, gossip and gRPC ([`server::environment`]); in a test:
/// a [`clock::ManualClock`], a fixed seed, and the in-process membership and Peer service
/// (`inprocess.rs`), so that a test drives time and message delivery step by step.
#[derive(Debug, Clone)]
pub struct Environment {
    /// Time for leases, detection and the waits that decide them.
    pub clock: Arc<dyn clock::Clock>,
    /// Seed of the node's random generator.
    pub seed: u64,
    /// Who is in the cluster and alive; `None`: from the config (gossip when `peer_listen` is
    /// set, a cluster of one otherwise), joined once the node holds its data directory.
    pub membership: Option<Arc<dyn cluster::Membership>>,
    /// Calls to other members.
    pub peers: Arc<dyn cluster::PeerService>,
    /// What to put in front of every origin (`None` in production).
    pub origin_wrap: Option<origin::OriginWrap>,
    /// This host's boot ([`ids::host_boot`]; a test's own number for a host that restarted).
    pub host_boot: u64,
}

/// One node: its disks, its cache and its read path. Frontends call these methods.
#[derive(Debug)]
pub struct Node {
    /// This host's boot ([`ids::host_boot`]), in answers to writes and flushes.
    host_boot: u64,
    config: Config,
    registry: Registry,
    cache: ContentCache,
    reads: Arc<ReadPath>,
    /// Fetches ahead of sequential readers under way (aborted when the node closes).
    ahead_tasks: parking_lot::Mutex<tokio::task::JoinSet<()>>,
    cluster: Arc<cluster::Cluster>,
    clock: Arc<dyn clock::Clock>,
    /// This node, for the tasks it spawns (revocations run to the end without their caller).
    me: Weak<Node>,
    /// Blocks being gathered for other members (`FetchBlocks`), in blocks: bounds the memory
    /// that many members asking at once can pin (256 MiB of blocks at most).
    peer_serving: tokio::sync::Semaphore,
    /// Block map streams served to members.
    subscriptions: Arc<serve::Subscriptions>,
    /// Wakes detection before its next tick for the disks in `detect_queue`: a member's read
    /// brought a new reader of an owned mutable disk, or its reads reached the threshold.
    detect_soon: tokio::sync::Notify,
    /// The disks to look at when `detect_soon` wakes (bounded by the disks this node owns).
    detect_queue: parking_lot::Mutex<crate::hashing::HashSet<String>>,
    started: Instant,
    /// The certificates this node presents, read at start.
    certificates: Vec<certs::CertificateInfo>,
    /// Set by [`Node::halt`]: writes no longer reach the origins.
    halted: Arc<std::sync::atomic::AtomicBool>,
    /// An exclusive lock on `DATA_DIR/lock`, held while the node lives: two nodes on one data
    /// directory would tear each other's SSD tier and content maps.
    _lock: std::fs::File,
}

/// The SSD tier's files are sized and overwritten when it opens: neither may be a file the
/// node reads or keeps (a disk's origin, configured or saved; the data directory's lock, its
/// saved disk list or content maps). A typo in `cache.ssd_path` or `cache.ssd_index_path`
/// naming such a file is refused here, before anything is written to it (found in review: the
/// origin guard refused such an origin only after the cache had cut it to size).
fn check_ssd_paths(config: &Config) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let mut kept: Vec<(String, std::path::PathBuf)> = config
        .disks
        .iter()
        .map(|d| (format!("the origin of disk {:?}", d.id), d.origin.clone()))
        .collect();
    kept.extend(
        disk::saved_origins(&config.data_dir)
            .into_iter()
            .map(|(id, o)| (format!("the origin of saved disk {id:?}"), o)),
    );
    kept.push(("the data_dir's lock".into(), config.data_dir.join("lock")));
    kept.push((
        "the saved disk list".into(),
        disk::saved_disks_path(&config.data_dir),
    ));
    if let Ok(maps) = std::fs::read_dir(config.data_dir.join("maps")) {
        kept.extend(
            maps.flatten()
                .map(|e| ("a saved content map".to_string(), e.path())),
        );
    }
    for (key, path) in [
        ("cache.ssd_path", &config.ssd_path),
        ("cache.ssd_index_path", &config.ssd_index_path),
    ] {
        let Some(mine) = id(path) else {
            continue;
        };
        if let Some((what, _)) = kept.iter().find(|(_, p)| id(p) == Some(mine)) {
            anyhow::bail!(
                "{key} {} is {what}: the ssd tier would overwrite it; refusing to start (point \
                 {key} at a file of its own)",
                path.display()
            );
        }
    }
    Ok(())
}

impl Node {
    /// Opens the data directory and the cache, and registers the configured and saved disks.
    pub async fn open(config: Config) -> anyhow::Result<Arc<Node>> {
        let env = server::environment(&config)?;
        Self::open_in(config, env).await
    }

    /// [`Node::open`] with the sources of nondeterminism of `env`.
    pub async fn open_in(config: Config, env: Environment) -> anyhow::Result<Arc<Node>> {
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
        if cache_config.ssd.is_some() {
            check_ssd_paths(&config)?;
        }
        let opened = crate::blocking::run(move || ContentCache::open(cache_config))
            .await
            .context("cache open task")?;
        let (cache, _recovery) = match opened {
            // A full filesystem is a condition of the moment, not a mistake in the config:
            // serve without the SSD tier (RAM and origins) rather than not at all.
            Err(crate::cache::CacheError::Ssd(crate::cache::SsdError::Io { path, error }))
                if matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
            {
                tracing::error!(
                    path = %path.display(),
                    error = %error,
                    "the ssd tier's filesystem is full; serving without the ssd tier until the \
                     next start (free space, then restart the node)"
                );
                let mut without = config.cache_config();
                without.ssd = None;
                crate::blocking::run(move || ContentCache::open(without))
                    .await
                    .context("cache open task")?
                    .context("cannot open the content cache")?
            }
            other => other.context("cannot open the content cache")?,
        };
        let registry = Registry::new(
            &config.data_dir,
            config.block_bytes,
            Duration::from_millis(config.lease.term_ms + config.lease.drift_margin_ms),
            env.clock.clone(),
            env.seed,
        );
        // `[origin_limit]` paces every origin of this node together; an injected wrap (tests,
        // the simulation) goes in front of it.
        let limiter = config
            .origin_limit
            .is_active()
            .then(|| origin::Limiter::new(config.origin_limit));
        match (limiter, env.origin_wrap.clone()) {
            (None, None) => {}
            (None, Some(w)) => registry.set_origin_wrap(w),
            (Some(l), outer) => registry.set_origin_wrap(origin::OriginWrap(Arc::new(
                move |id: &str, o: Arc<dyn origin::Origin>| {
                    let limited = l.wrap(o);
                    match &outer {
                        Some(w) => (w.0)(id, limited),
                        None => limited,
                    }
                },
            ))),
        }
        registry
            .set_origin_guard(disk::OriginGuard {
                roots: config.origin_roots.clone(),
                own_files: vec![config.ssd_path.clone(), config.ssd_index_path.clone()],
            })
            .context("admin.origin_roots")?;
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
        let reads = Arc::new(ReadPath::new(cache.clone(), config.cluster.read_ahead));
        let clock = env.clock.clone();
        // Joined only now: a node that cannot hold its data directory, or is still opening its
        // cache, must not look like a live member to the others.
        let membership = match env.membership {
            Some(m) => m,
            None => cluster::membership::from_config(
                &config.node_id,
                &config.cluster,
                &*env.peers,
                &*env.clock,
                {
                    use rand::{Rng, SeedableRng};
                    // Its own stream: the registry's epochs come from the same seed.
                    rand::rngs::StdRng::seed_from_u64(env.seed ^ 0xb007_1d5e_ed00_0001).random()
                },
            )
            .await
            .context("cannot join the cluster")?,
        };
        let cluster = cluster::Cluster::start(
            (
                &config.node_id,
                &config.cluster,
                &config.lease,
                config.block_bytes,
            ),
            clock.clone(),
            membership,
            env.peers,
        );
        let serving_blocks = ((256usize << 20) / config.block_bytes as usize).max(64);
        let certificates = certs::of_config(&config);
        let host_boot = env.host_boot;
        Ok(Arc::new_cyclic(|me| Node {
            host_boot,
            config,
            registry,
            cache,
            reads,
            ahead_tasks: Default::default(),
            cluster,
            peer_serving: tokio::sync::Semaphore::new(serving_blocks),
            subscriptions: Arc::default(),
            detect_soon: tokio::sync::Notify::new(),
            detect_queue: parking_lot::Mutex::new(Default::default()),
            clock,
            me: me.clone(),
            started: Instant::now(),
            halted: Arc::default(),
            certificates,
            _lock: lock,
        }))
    }

    /// Stops this node's writes from reaching its origins from now on (they fail): what a
    /// killed process leaves undone. For a simulation, which runs many nodes in one process
    /// and cannot kill one node's tasks; a node restarted there starts after its predecessor
    /// halted, as a real one starts after its predecessor died.
    pub fn halt(&self) {
        self.halted.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This host's boot: acknowledged writes of this node's disks that no flush has covered
    /// survive until it changes.
    pub fn host_boot(&self) -> u64 {
        self.host_boot
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

    /// The owner of `disk` if another member owns it, or an error if nobody does: the disk is
    /// disputed when several members own it, the owner unavailable when it left the cluster
    /// lately, the disk unknown otherwise.
    pub(crate) fn remote(&self, disk: &str) -> Result<cluster::RemoteDisk> {
        self.cluster.remote(disk).ok_or_else(|| {
            let id: String = disk.chars().take(160).collect();
            if let Some(owners) = self.cluster.disputed(disk) {
                return Error::Disputed { disk: id, owners };
            }
            if let Some(owner) = self.cluster.pending(disk) {
                return Error::Peer {
                    node: owner,
                    cause: format!(
                        "disk {id:?} is served once this node has read every member's disk \
                         list (a member that claimed the same id would be a dispute)"
                    ),
                };
            }
            match self.cluster.departed(disk) {
                Some((owner, ago)) => Error::Peer {
                    node: owner,
                    cause: format!(
                        "it left the cluster {} s ago (stopped, cut off or dead); disk {id:?} is \
                         served again once it is back",
                        ago.as_secs()
                    ),
                },
                None => Error::UnknownDisk(id),
            }
        })
    }

    /// Reads `len` bytes at `offset` of disk `disk`, wherever it is owned.
    ///
    /// A read of one block that the SSD tier serves reads it on this task's thread (on a
    /// multi-threaded runtime, which moves its other tasks elsewhere meanwhile). Reads joined
    /// in one task therefore wait for each other's SSD reads: ask for neighbouring blocks in
    /// one read, or run reads as tasks of their own.
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
                    self.read_ahead(&shadow.disk, offset, len);
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

    /// As a client's read of `len` bytes at `offset` of a shadow begins: fetches ahead of it,
    /// in a task of its own, if it continues a sequential stream (see [`cluster::ahead`]),
    /// unless as many blocks as the read-ahead buffer holds are being fetched ahead already.
    fn read_ahead(&self, disk: &Arc<disk::Disk>, offset: u64, len: u64) {
        let bs = u64::from(self.config.block_bytes);
        let window = self.config.cluster.read_ahead / 2 / bs;
        let Some(remote) = &disk.remote else {
            return;
        };
        if window == 0 || len == 0 {
            return;
        }
        let Some((range, permit)) = remote.ahead().after(
            (offset / bs, (offset + len - 1) / bs),
            remote.blocks(),
            window,
            |blocks| self.reads.ahead_permit(blocks),
        ) else {
            return;
        };
        // The read path and the disk, not the node: a fetch ahead that outlives the node's
        // close is aborted, and never holds its data directory.
        let (reads, disk) = (self.reads.clone(), disk.clone());
        let mut tasks = self.ahead_tasks.lock();
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            reads.read_ahead(&disk, range).await;
            drop(permit);
        });
    }

    /// Reads a disk another member owns at the owner, caching nothing. The answer says when
    /// the owner's disks changed (it detected this one, say): the directory is read again
    /// then, without waiting for gossip to bring the news.
    async fn forward_read(&self, disk: &str, offset: u64, len: u64) -> Result<Bytes> {
        let r = self.remote(disk)?;
        read::check_span(disk, r.info.size_bytes, offset, len)?;
        metrics::counter!(telemetry::FORWARDED, "rpc" => "read").increment(1);
        let (bytes, disks_version) = self
            .cluster
            .peers
            // Any version: a forwarded read is of whatever the owner holds now.
            .read(
                &r.owner,
                r.addr,
                disk,
                (offset, len),
                ids::Version::default(),
            )
            .await?;
        self.cluster.hint_disks_version(&r.owner, disks_version);
        Ok(bytes)
    }

    /// Ends the block map streams this node serves, and refuses new ones (shutdown).
    pub(crate) fn close_subscriptions(&self) {
        self.subscriptions.close_all();
    }

    /// Counts a read of an owned mutable disk by member `from` towards its detection.
    #[inline]
    pub(crate) fn note_read(&self, d: &disk::Disk, from: &str) {
        if self.config.detection.enabled
            && d.state() == DiskState::Mutable
            && d.owner
                .record_read(from, self.clock.now(), &self.config.detection)
            // The owner's own reads wait for the tick: only a member's can be the reader that
            // makes members forward and cache nothing meanwhile.
            && from != self.config.node_id
        {
            let fresh = self.detect_queue.lock().insert(d.id.to_string());
            if fresh {
                self.detect_soon.notify_one();
            }
        }
    }

    /// `base:allocation` extents of [offset, offset + len) of `disk` for NBD BLOCK_STATUS:
    /// (length, flags), all-zero blocks an immutable disk's content map knows of reported as
    /// holes that read as zeroes, everything else as data; at most `max_extents` of them (the first).
    pub fn allocation(
        &self,
        disk: &str,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Vec<(u32, u32)> {
        let map = match self.registry.get(disk) {
            Ok(d) => d.serving_map(),
            // A detected disk's shadow speaks for the owner's map only under a valid lease:
            // without one the owner may have written where the map says hole, so every
            // block is reported as data (always a true answer).
            Err(_) => self
                .cluster
                .shadow(disk)
                .filter(|s| s.lease.as_ref().is_none_or(|l| l.valid(self.clock.now())))
                .and_then(|s| s.disk.serving_map()),
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
                    if out.len() >= max_extents.max(1) {
                        break;
                    }
                    out.push((n, flags));
                }
            }
            at = upto;
        }
        out
    }
}

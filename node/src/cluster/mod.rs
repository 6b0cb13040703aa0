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
//! The pieces: `membership.rs` (who is alive), `directory.rs` (other members' disks),
//! `shadows.rs` (local shadows and their block map subscriptions), `detect.rs` (the owner's
//! detection window and lease table), `lease.rs` and `leases.rs` (a lease as its holder sees
//! it; asking, renewing, revoking), `blockmap.rs`, `fetch.rs` (fingerprints and blocks of a
//! disk owned elsewhere), `peers.rs` (calls to members, behind `PeerService`).
//!
//! Architecture invariant: this module never decides what a disk's bytes are; it only knows
//! who owns which disk and how to reach them. A disk id known locally always wins over a
//! remote one; a disk id two other members both own is disputed and goes to neither (every
//! request for it fails with the claimants' names, and a warning says so), so a member cannot
//! take another's disk, its writes or its readers by naming the same id.

pub mod ahead;
pub mod blockmap;
pub mod detect;
mod directory;
pub mod fetch;
pub mod gossip_auth;
pub mod lease;
mod leases;
pub mod membership;
pub mod peers;
mod shadows;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::hashing::DashMap;
use tokio::sync::watch;

pub use ahead::{DEFAULT_READ_AHEAD, MAX_READ_AHEAD};
pub use lease::HolderLease;
pub use membership::{GossipConfig, Member, Membership};
pub use peers::{PeerService, Peers};

use crate::clock::Clock;
use crate::disk::Disk;
use crate::disk::DiskInfo;
use crate::telemetry::LeaseStats;

/// Cluster settings; `peer_listen` unset means a cluster of one.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Gossip (UDP) and Peer gRPC (TCP) address.
    pub peer_listen: Option<SocketAddr>,
    /// Address advertised to other members.
    pub advertise: Option<SocketAddr>,
    /// Peer gRPC address advertised to other members when it differs from `advertise` (a
    /// proxy in front of this node, as the partition tests use).
    pub advertise_rpc: Option<SocketAddr>,
    /// Members to join through: `IP:PORT`, or `HOST:PORT` (every address the name resolves
    /// to, looked up again as gossip goes on: a headless Service's name in Kubernetes).
    pub seeds: Vec<String>,
    /// Cluster name; gossip from other clusters is ignored.
    pub cluster_id: String,
    /// Gossip round interval.
    pub gossip_interval_ms: u64,
    /// Failure detector threshold: at 8, a silent member is declared dead about 5 gossip
    /// intervals after it stopped (measured on loopback).
    pub phi_threshold: f64,
    /// Deadline of every node-to-node call.
    pub rpc_timeout_ms: u64,
    /// Cache sealed disks other members own (default true). False forwards every read of them
    /// to the owner: the "no cache" baseline of the cluster benchmark.
    pub cache_remote: bool,
    /// Fetch missed blocks from their home member (default true). False reads every miss from
    /// the owner: each node caching alone, the CBRC-like baseline.
    pub peer_fetch: bool,
    /// Bytes of a disk another member owns fetched ahead of a client reading it sequentially
    /// (see [`ahead`]); 0: none.
    pub read_ahead: u64,
    /// Mutual TLS on the Peer service: only holders of a certificate signed by the cluster's
    /// CA may call it, and members only talk to such holders. Without `secret_file`, gossip is
    /// signed with the same key and certificate.
    pub tls: Option<TlsConfig>,
    /// `cluster.secret_file`: a file of at least 16 secret bytes every member shares; every
    /// gossip datagram is sealed with a MAC under a key derived from it.
    pub secret_file: Option<std::path::PathBuf>,
}

/// `[cluster.tls]`: PEM files for mutual TLS between members.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// The cluster CA's certificate: every member's certificate must be signed by it.
    pub ca: std::path::PathBuf,
    /// This member's certificate (signed by the CA; its names must include `server_name`).
    pub cert: std::path::PathBuf,
    /// This member's private key.
    pub key: std::path::PathBuf,
    /// The name every member's certificate carries (default "shadowcache").
    pub server_name: String,
    /// A certificate that names no role (issued before roles) gets no right beyond a client's
    /// (the Block service), instead of every right (default false, so that clusters whose
    /// certificates predate roles keep working until they reissue them).
    pub require_roles: bool,
}

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
    pub(crate) epoch: u64,
}

impl Shadow {
    /// The member that owns the disk.
    pub fn owner(&self) -> &str {
        &self.owner
    }
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
    /// Per disk id: the one other member that owns it.
    remote: DashMap<String, RemoteDisk>,
    /// Per disk id: every live member whose list names it (not the ids this node owns). An id
    /// with one claimant is in `remote`; one with more is disputed and served by none.
    claims: DashMap<String, std::collections::BTreeMap<String, RemoteDisk>>,
    /// Per disk id: claimants of a dispute that left the cluster, and when. Until each is back
    /// (its list read again) or an hour has passed, the id stays disputed: an owner's restart
    /// must not hand its disk to the member that claimed it too.
    contested: DashMap<String, std::collections::BTreeMap<String, std::time::Instant>>,
    /// Disk ids disputed now (for the log's transitions and the gauge).
    disputes: DashMap<String, ()>,
    /// Per live member: the boot whose disk list could not be read, since when, and whether
    /// the log said it stopped holding routes back (cleared once it is read).
    unreadable: DashMap<String, (u64, std::time::Instant, bool)>,
    /// Local shadows of the sealed and detected disks other members own.
    shadows: DashMap<String, Arc<Shadow>>,
    /// Per member: the (boot, disks_version) whose disk list is in `remote`.
    fetched: DashMap<String, (u64, u64)>,
    /// Per member: a disks_version newer than `fetched` that an answer of its carried, and
    /// when; the directory reads its list again without waiting for gossip. Forgotten after
    /// a few seconds (an answer of an incarnation that is gone cannot hold a refresh open).
    hinted: DashMap<String, (u64, std::time::Instant)>,
    /// Wakes the directory's refresher for a hint.
    refresh_now: tokio::sync::Notify,
    /// Disks whose owner left the cluster (dead, stopped or cut off): its id and when, for an
    /// error that says so instead of "unknown disk". Bounded, and forgotten after an hour.
    departed: moka::sync::Cache<String, (String, std::time::Instant)>,
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
    /// The view of the cluster `membership` keeps for node `me` (with `c`, its leases as
    /// `lease` says, blocks of `block_bytes`), calling members over `service`.
    pub fn start(
        (me, c, lease, block_bytes): (&str, &ClusterConfig, &lease::LeaseConfig, u32),
        clock: Arc<dyn Clock>,
        membership: Arc<dyn Membership>,
        service: Arc<dyn PeerService>,
    ) -> Arc<Cluster> {
        Arc::new(Cluster {
            me: me.to_string(),
            members: membership.watch(),
            membership,
            peers: Arc::new(Peers::new(
                service,
                clock.clone(),
                Duration::from_millis(c.rpc_timeout_ms),
                Duration::from_millis(c.rpc_timeout_ms + lease.term_ms + lease.drift_margin_ms) * 2,
            )),
            remote: crate::hashing::dash_map(),
            claims: crate::hashing::dash_map(),
            contested: crate::hashing::dash_map(),
            disputes: crate::hashing::dash_map(),
            unreadable: crate::hashing::dash_map(),
            shadows: crate::hashing::dash_map(),
            fetched: crate::hashing::dash_map(),
            hinted: crate::hashing::dash_map(),
            refresh_now: tokio::sync::Notify::new(),
            departed: moka::sync::Cache::builder()
                .max_capacity(65_536)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            revoked: crate::hashing::dash_map(),
            subs: crate::hashing::dash_map(),
            disks_version: AtomicU64::new(0),
            cache_remote: c.cache_remote,
            peer_fetch: c.peer_fetch,
            block_bytes: u64::from(block_bytes),
            clock,
            rpc_timeout: Duration::from_millis(c.rpc_timeout_ms),
            lease_term: Duration::from_millis(lease.term_ms),
            drift_margin: Duration::from_millis(lease.drift_margin_ms),
            stats: LeaseStats::new(),
        })
    }

    /// Whether `id` is a live member now (this node included).
    pub fn live_member(&self, id: &str) -> bool {
        self.members.borrow().iter().any(|m| m.id == id)
    }

    /// Whether incarnation `boot` of `id` is the live member of that id now.
    pub fn live_incarnation(&self, id: &str, boot: u64) -> bool {
        self.members
            .borrow()
            .iter()
            .any(|m| m.id == id && m.boot == boot)
    }

    /// This process: its node id and boot.
    pub fn me(&self) -> &Member {
        self.membership.me()
    }

    /// The live members, this node included, by id.
    pub fn members(&self) -> Vec<Member> {
        self.members.borrow().clone()
    }

    /// Leaves the cluster.
    pub async fn shutdown(&self) {
        self.membership.shutdown().await;
    }
}

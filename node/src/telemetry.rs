//! Metric names, their handles, and tracing setup: every metric the node exports is named here.
//!
//! Names follow Prometheus conventions with the `shadowcache_` prefix; labels come from small
//! fixed sets (`tier`, `pool`, `rpc`). Each counter is kept twice: a local atomic that
//! `Status` reads, and a `metrics` handle registered once at construction, so the hot path never
//! looks a metric up by name. Handles made before a recorder is installed are no-ops, which is
//! what the in-process benchmarks want.
//!
//! Architecture invariant: every metric name is defined here and nowhere else.

use std::sync::atomic::{AtomicU64, Ordering};

/// Block lookups answered by a cache tier, by `tier` = ram_single | ram_multi | ssd.
pub const CACHE_HITS: &str = "shadowcache_cache_hits_total";
/// Block lookups that no tier could answer.
pub const CACHE_MISSES: &str = "shadowcache_cache_misses_total";
/// Block bytes served from the cache, by `tier` = ram | ssd (with the origin, owner and peer
/// byte counters: bytes by source).
pub const HIT_BYTES: &str = "shadowcache_cache_hit_bytes_total";
/// Lookups answered by the shared zero block.
pub const ZERO_BLOCK_HITS: &str = "shadowcache_zero_block_hits_total";
/// Entries moved from the single-touch to the multi-touch pool by a second read.
pub const PROMOTIONS: &str = "shadowcache_cache_promotions_total";
/// Entries moved from RAM multi-touch to the SSD tier.
pub const DEMOTIONS: &str = "shadowcache_cache_demotions_total";
/// Entries dropped from the cache, by `pool` = ram_single | ram_multi | ssd.
pub const EVICTIONS: &str = "shadowcache_cache_evictions_total";
/// SSD slots whose bytes did not hash to their fingerprint.
pub const SSD_VERIFY_FAILURES: &str = "shadowcache_ssd_verify_failures_total";
/// SSD writes that failed (a full or failing device); the entry was dropped, not cached.
pub const SSD_WRITE_FAILURES: &str = "shadowcache_ssd_write_failures_total";
/// Payload bytes written to SSD slots.
pub const SSD_WRITTEN_BYTES: &str = "shadowcache_ssd_written_bytes_total";
/// Payload bytes SSD hits served.
pub const SSD_SERVED_BYTES: &str = "shadowcache_ssd_served_bytes_total";
/// Demotions that wrote nothing (the SSD kept a copy since the entry's last SSD hit).
pub const SSD_WRITES_SAVED: &str = "shadowcache_ssd_writes_saved_total";
/// Entries RAM multi-touch let go that the SSD's admission refused (`cache.ssd_admission`).
pub const SSD_ADMISSIONS_REFUSED: &str = "shadowcache_ssd_admissions_refused_total";
/// The RAM single-touch pool's target, as a share of the RAM budget (it adapts to ghost hits).
pub const SINGLE_TOUCH_TARGET: &str = "shadowcache_cache_single_touch_target_ratio";
/// Keys each ghost remembers, by `ghost` = single | multi.
pub const GHOST_KEYS: &str = "shadowcache_cache_ghost_keys";
/// 1 while the SSD tier's index is read at start (`cache.ssd_load`), 0 after.
pub const SSD_LOADING: &str = "shadowcache_ssd_loading";
/// Admissions of a key a ghost remembered (a re-read soon after eviction), by `ghost`.
pub const GHOST_HITS: &str = "shadowcache_cache_ghost_hits_total";
/// Moves of the single-touch target, by `direction` = grew | shrank.
pub const SINGLE_TOUCH_TARGET_MOVES: &str = "shadowcache_cache_single_touch_target_moves_total";
/// 1 for the eviction rules the RAM pools run now and 0 for the others, by `rules` =
/// tuned | arc | lru | loop.
pub const POLICY_RULES: &str = "shadowcache_cache_policy_rules";
/// Times the duel changed the RAM pools' eviction rules.
pub const POLICY_SWITCHES: &str = "shadowcache_cache_policy_switches_total";
/// Shards the RAM pools are split into.
pub const POOL_SHARDS: &str = "shadowcache_cache_shards";
/// Bytes of disk blocks the cached entries stand for (before dedup).
pub const LOGICAL_BYTES: &str = "shadowcache_cache_logical_bytes";
/// Bytes held by the cache tiers, by `tier`.
pub const STORED_BYTES: &str = "shadowcache_cache_stored_bytes";
/// Entries held by the cache tiers, by `tier`.
pub const ENTRIES: &str = "shadowcache_cache_entries";
/// Reads sent to a disk's origin.
pub const ORIGIN_READS: &str = "shadowcache_origin_reads_total";
/// Bytes read from origins.
pub const ORIGIN_READ_BYTES: &str = "shadowcache_origin_read_bytes_total";
/// Block reads of sealed disks owned by another member, sent to that owner.
pub const OWNER_READS: &str = "shadowcache_owner_reads_total";
/// Bytes read from other members that own the disks.
pub const OWNER_READ_BYTES: &str = "shadowcache_owner_read_bytes_total";
/// Blocks of remote sealed disks fetched from members other than the owner.
pub const PEER_READS: &str = "shadowcache_peer_reads_total";
/// Bytes fetched from such members.
pub const PEER_READ_BYTES: &str = "shadowcache_peer_read_bytes_total";
/// Bytes of owners' content maps received (`Peer.ContentMap` answers, as encoded): what dedup
/// on the wire costs a member.
pub const OWNER_MAP_BYTES: &str = "shadowcache_owner_map_bytes_total";
/// Peer block fetches that did not give a verified block, by `reason` = error | missing |
/// bad_bytes.
pub const PEER_FETCH_FAILURES: &str = "shadowcache_peer_fetch_failures_total";
/// Verified blocks fetched from other members, by `via` = holder (found in its block map) |
/// home (the block's rendezvous home). Blocks from the owner count in `OWNER_READS`.
pub const PEER_FETCHES: &str = "shadowcache_peer_fetches_total";
/// Blocks served to other members by FetchBlocks.
pub const PEER_SERVED_BLOCKS: &str = "shadowcache_peer_served_blocks_total";
/// Origin reads or writes that failed.
pub const ORIGIN_ERRORS: &str = "shadowcache_origin_errors_total";
/// Microseconds origin reads waited for `[origin_limit]` beyond the origin's own time.
pub const ORIGIN_LIMIT_WAIT_US: &str = "shadowcache_origin_limit_wait_microseconds_total";
/// Cold reads of a block that joined another reader's origin read.
pub const SINGLE_FLIGHT_JOINS: &str = "shadowcache_single_flight_joins_total";
/// Expiry of each certificate the node presents (`role` = cluster, nbd), seconds since the
/// Unix epoch.
pub const CERT_EXPIRY: &str = "shadowcache_certificate_expiry_timestamp_seconds";
/// Blocks an owner served from those it had just read for members' content maps, instead of
/// reading its origin again.
pub const STAGED_HITS: &str = "shadowcache_staged_hits_total";
/// Blocks asked for ahead of sequential readers (those cached or in flight already included).
pub const READ_AHEAD_ASKED: &str = "shadowcache_read_ahead_asked_total";
/// Blocks of disks other members own fetched ahead of a sequential reader.
pub const READ_AHEAD_BLOCKS: &str = "shadowcache_read_ahead_blocks_total";
/// Blocks fetched ahead that a client's read took.
pub const READ_AHEAD_USED: &str = "shadowcache_read_ahead_used_total";
/// Live cluster members, this node included.
pub const MEMBERS_ALIVE: &str = "shadowcache_members_alive";
/// Requests forwarded to a disk's owner, by `rpc`.
pub const FORWARDED: &str = "shadowcache_forwarded_requests_total";
/// Forwarded writes refused because they reached this owner after their sender's deadline.
pub const LATE_WRITES: &str = "shadowcache_late_writes_total";
/// gRPC requests, by `rpc`.
pub const RPC_REQUESTS: &str = "shadowcache_rpc_requests_total";
/// gRPC requests that ended in an error, by `rpc` and `code`.
pub const RPC_ERRORS: &str = "shadowcache_rpc_errors_total";
/// Leases granted by this node as an owner (first grants, not renewals).
pub const LEASE_GRANTS: &str = "shadowcache_lease_grants_total";
/// Leases renewed by this node as an owner.
pub const LEASE_RENEWALS: &str = "shadowcache_lease_renewals_total";
/// Leases that ran out, by `side` = owner (a revocation waited for it) | holder (in use,
/// not renewed in time).
pub const LEASE_EXPIRIES: &str = "shadowcache_lease_expiries_total";
/// Leases revoked, by `outcome` = acked | expired.
pub const LEASE_REVOCATIONS: &str = "shadowcache_lease_revocations_total";
/// Time a write (or an operator's drop) waited for every lease of a disk to be revoked.
pub const REVOCATION_WAIT_SECONDS: &str = "shadowcache_lease_revocation_wait_seconds";
/// Detection transitions, by `to` = detected | mutable and `reason`.
pub const DETECTION_TRANSITIONS: &str = "shadowcache_detection_transitions_total";
/// Bytes this node sent to other members (Peer.Read and FetchBlocks): an owner's egress.
pub const PEER_SERVED_BYTES: &str = "shadowcache_peer_served_bytes_total";
/// Reads of a detected disk another member owns that went to the owner because this node
/// held no valid lease.
pub const LEASELESS_READS: &str = "shadowcache_leaseless_reads_total";
/// Counter: revocations refused because they were meant for another process with this node's
/// id.
pub const FOREIGN_REVOCATIONS: &str = "shadowcache_foreign_revocations_total";
/// Counter: times this node saw another live process gossiping with its node id.
pub const DUPLICATE_NODE_ID: &str = "shadowcache_duplicate_node_id_total";

/// Bytes of other members' block maps received (snapshots and changes).
pub const BLOCK_MAP_TRAFFIC_BYTES: &str = "shadowcache_block_map_traffic_bytes_total";
/// Serialized bytes of the block maps of other members this node holds.
pub const BLOCK_MAP_BYTES: &str = "shadowcache_block_map_bytes";

/// NBD requests, by `cmd` = read | write | flush | write_zeroes | block_status | other.
pub const NBD_REQUESTS: &str = "shadowcache_nbd_requests_total";
/// NBD requests answered with an error, by `cmd`.
pub const NBD_ERRORS: &str = "shadowcache_nbd_errors_total";
/// Bytes read, written or zeroed over NBD, by `cmd`.
pub const NBD_BYTES: &str = "shadowcache_nbd_bytes_total";
/// NBD request latency, by `cmd`.
pub const NBD_SECONDS: &str = "shadowcache_nbd_duration_seconds";
/// NBD connections that reached transmission.
pub const NBD_CONNECTIONS: &str = "shadowcache_nbd_connections_total";
/// Counter by reason: NBD connections closed by the node (`connection_cap`,
/// `negotiation_timeout`, `stalled_reader`, `stalled_writer`).
pub const NBD_REFUSED: &str = "shadowcache_nbd_refused_connections_total";
/// Counter by rpc: calls refused because the caller's certificate has another role (Admin
/// over TLS without `admin`, the Peer service without `member`).
pub const ROLE_REFUSED: &str = "shadowcache_role_refused_total";
/// Counter: forwarded flushes answered with an error because writes an owner acknowledged
/// before them were not covered (its host restarted, or the disk moved to another owner).
pub const UNFLUSHED_LOST: &str = "shadowcache_unflushed_writes_lost_total";
/// Gauge: disk ids several members own, served by none of them (`cluster/directory.rs`).
pub const DISPUTED_DISKS: &str = "shadowcache_disputed_disks";
/// Counter by kind (`unix`, `tcp`, `peer`) and reason: gRPC connections closed by the node
/// (`answer_not_taken`, `stalled_socket`, `idle_at_cap`, `source_cap`).
pub const GRPC_CLOSED: &str = "shadowcache_grpc_closed_connections_total";
/// Counter by reason: Peer calls refused for want of a valid cluster key signature.
pub const PEER_CALLS_REFUSED: &str = "shadowcache_peer_calls_refused_total";
/// Counter by reason: gossip datagrams dropped (`bad_tag`, `stale`, `replay`, `malformed`).
pub const GOSSIP_REJECTED: &str = "shadowcache_gossip_rejected_total";
/// Counter by rpc: gRPC requests refused on TCP without TLS (writes, Admin, reads of mutable
/// disks).
pub const UNTRUSTED_REFUSED: &str = "shadowcache_untrusted_refused_total";

/// Payload bytes moved by gRPC requests, by `rpc`.
pub const RPC_BYTES: &str = "shadowcache_rpc_bytes_total";
/// gRPC request latency, by `rpc`.
pub const RPC_SECONDS: &str = "shadowcache_rpc_duration_seconds";

/// The exported counter `name` with static `labels`.
fn counter(name: &'static str, labels: &[(&'static str, &'static str)]) -> metrics::Counter {
    let labels: Vec<metrics::Label> = labels
        .iter()
        .map(|(k, v)| metrics::Label::from_static_parts(k, v))
        .collect();
    metrics::counter!(name, labels)
}

/// A counter kept locally (for `Status`) and exported (for Prometheus).
#[derive(Debug)]
pub struct Count {
    local: AtomicU64,
    exported: metrics::Counter,
}

impl Count {
    /// A counter named `name` with the given labels.
    pub fn new(name: &'static str, labels: &[(&'static str, &'static str)]) -> Self {
        Count {
            local: AtomicU64::new(0),
            exported: counter(name, labels),
        }
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.local.fetch_add(n, Ordering::Relaxed);
        self.exported.increment(n);
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// The local value.
    pub fn get(&self) -> u64 {
        self.local.load(Ordering::Relaxed)
    }
}

/// Stripes of a [`Tally`]: enough that threads on different cores rarely share one.
const TALLY_STRIPES: usize = 32;

/// One stripe of a [`Tally`], on its own cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

/// A counter for the hottest paths (a RAM hit): each thread adds to its own stripe, so that
/// threads on different cores never contend for one cache line, as they do on a [`Count`]'s
/// single atomic and the exporter's. The exported counter is set from the sum by
/// [`Tally::publish`] (the cache does it once a second and at each status), not at each add.
#[derive(Debug)]
pub struct Tally {
    stripes: Box<[Stripe]>,
    exported: metrics::Counter,
}

thread_local! {
    /// This thread's stripe of every [`Tally`].
    static STRIPE: usize = {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) as usize % TALLY_STRIPES
    };
}

impl Tally {
    /// A tally exported as the counter `name` with the given labels.
    pub fn new(name: &'static str, labels: &[(&'static str, &'static str)]) -> Self {
        Tally {
            stripes: (0..TALLY_STRIPES).map(|_| Stripe::default()).collect(),
            exported: counter(name, labels),
        }
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        let i = STRIPE.with(|s| *s);
        self.stripes[i].0.fetch_add(1, Ordering::Relaxed);
    }

    /// The sum of the stripes.
    pub fn get(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add)
    }

    /// Sets the exported counter to [`Self::get`].
    pub fn publish(&self) {
        self.exported.absolute(self.get());
    }
}

/// Lease and detection counters of one node, for `Status` and Prometheus.
#[derive(Debug)]
pub struct LeaseStats {
    /// Leases granted (as an owner).
    pub grants: Count,
    /// Leases renewed (as an owner).
    pub renewals: Count,
    /// Leases a revocation had to wait out (as an owner).
    pub owner_expiries: Count,
    /// Leases that ran out while in use (as a holder).
    pub holder_expiries: Count,
    /// Revocations acknowledged by the holder.
    pub revocations_acked: Count,
    /// Revocations that ended by the lease running out.
    pub revocations_expired: Count,
    /// Milliseconds writes waited for revocations.
    pub revocation_wait_ms: Count,
    /// Disks this node detected.
    pub detections: Count,
    /// Detections ended (by a write or an operator).
    pub undetections: Count,
    /// Bytes sent to other members.
    pub peer_served_bytes: Count,
    /// Reads forwarded to an owner for want of a lease.
    pub leaseless_reads: Count,
    /// Revocations refused: meant for another process with this node's id.
    pub foreign_revocations: Count,
    /// Revocation wait histogram.
    pub revocation_wait: metrics::Histogram,
    /// Bytes of block map snapshots and changes received.
    pub block_map_traffic: Count,
}

impl LeaseStats {
    /// Registered counters.
    pub fn new() -> Self {
        LeaseStats {
            grants: Count::new(LEASE_GRANTS, &[]),
            renewals: Count::new(LEASE_RENEWALS, &[]),
            owner_expiries: Count::new(LEASE_EXPIRIES, &[("side", "owner")]),
            holder_expiries: Count::new(LEASE_EXPIRIES, &[("side", "holder")]),
            revocations_acked: Count::new(LEASE_REVOCATIONS, &[("outcome", "acked")]),
            revocations_expired: Count::new(LEASE_REVOCATIONS, &[("outcome", "expired")]),
            revocation_wait_ms: Count::new("shadowcache_lease_revocation_wait_ms_total", &[]),
            detections: Count::new(DETECTION_TRANSITIONS, &[("to", "detected")]),
            undetections: Count::new(DETECTION_TRANSITIONS, &[("to", "mutable")]),
            peer_served_bytes: Count::new(PEER_SERVED_BYTES, &[]),
            leaseless_reads: Count::new(LEASELESS_READS, &[]),
            foreign_revocations: Count::new(FOREIGN_REVOCATIONS, &[]),
            revocation_wait: metrics::histogram!(REVOCATION_WAIT_SECONDS),
            block_map_traffic: Count::new(BLOCK_MAP_TRAFFIC_BYTES, &[]),
        }
    }
}

impl Default for LeaseStats {
    fn default() -> Self {
        Self::new()
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the tracing subscriber: `RUST_LOG` (default `info`) filters, output on stderr.
pub fn init_tracing(format: LogFormat, filter: Option<&str>) -> Option<LogFilter> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, reload};
    let env = EnvFilter::try_from_default_env();
    // RUST_LOG holds the filter only when it is set and parses.
    let from_env = env.is_ok();
    let initial = match (env, filter) {
        (Ok(f), _) => f,
        (Err(_), Some(f)) => EnvFilter::try_new(f).unwrap_or_else(|_| EnvFilter::new("info")),
        (Err(_), None) => EnvFilter::new("info"),
    };
    let (filter_layer, handle) = reload::Layer::new(initial);
    // A log that cannot be written (stderr to a file on a full disk) loses lines; it must not
    // stop the node: tracing-subscriber would report the failure with `eprintln!`, which
    // panics when stderr cannot be written either.
    // Colours only on a terminal: journald, `docker logs` and files get plain text (and
    // NO_COLOR turns them off on a terminal too).
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(log_colours(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
        ))
        .log_internal_errors(false);
    let registry = tracing_subscriber::registry().with(filter_layer);
    // A second init (tests that start several nodes in one process) is not an error.
    let installed = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json()).try_init(),
    };
    installed.ok().map(|()| LogFilter { handle, from_env })
}

/// Whether text log lines carry ANSI colours: on a terminal, unless `NO_COLOR` is set
/// (<https://no-color.org>).
fn log_colours(stderr_is_terminal: bool, no_color: bool) -> bool {
    stderr_is_terminal && !no_color
}

/// The log filter of the running process, changed on SIGHUP from the config file's
/// `log_filter` (unless `RUST_LOG` set it).
#[derive(Debug)]
pub struct LogFilter {
    handle: tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >,
    from_env: bool,
}

impl LogFilter {
    /// Applies `filter` (or `info` when `None`); `Ok(false)` when `RUST_LOG` holds the filter.
    pub fn set(&self, filter: Option<&str>) -> Result<bool, String> {
        if self.from_env {
            return Ok(false);
        }
        let f = tracing_subscriber::EnvFilter::try_new(filter.unwrap_or("info"))
            .map_err(|e| e.to_string())?;
        self.handle.reload(f).map_err(|e| e.to_string())?;
        Ok(true)
    }
}

/// Installs the Prometheus recorder and its HTTP listener (`GET /metrics`) on `addr`.
///
/// Must run before the node is built so that the node's metric handles are live.
pub fn install_prometheus(addr: std::net::SocketAddr) -> Result<(), String> {
    let latency_buckets = [
        0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
        0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(RPC_SECONDS.to_string()),
            &latency_buckets,
        )
        .map_err(|e| e.to_string())?
        // Buckets, not a summary: percentiles across nodes (histogram_quantile over a sum)
        // cannot be had from per-node quantiles (deploy/grafana/shadowcache.json).
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(NBD_SECONDS.to_string()),
            &latency_buckets,
        )
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
    describe();
    Ok(())
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(CACHE_HITS, "Block lookups answered by a cache tier");
    describe_counter!(
        SSD_WRITTEN_BYTES,
        Unit::Bytes,
        "Payload bytes written to SSD slots"
    );
    describe_counter!(
        SSD_SERVED_BYTES,
        Unit::Bytes,
        "Payload bytes SSD hits served"
    );
    describe_counter!(
        SSD_WRITES_SAVED,
        "Demotions that wrote nothing: the SSD kept a copy since the entry's last SSD hit"
    );
    describe_counter!(
        SSD_ADMISSIONS_REFUSED,
        "Entries RAM multi-touch let go that the SSD did not take: only a short re-read had brought them there"
    );
    describe_counter!(
        SSD_WRITE_FAILURES,
        "SSD writes that failed (full or failing device); entries dropped"
    );
    describe_counter!(CACHE_MISSES, "Block lookups no tier could answer");
    describe_counter!(ZERO_BLOCK_HITS, "Lookups answered by the shared zero block");
    describe_counter!(PROMOTIONS, "Single-touch entries promoted to multi-touch");
    describe_counter!(DEMOTIONS, "Multi-touch entries demoted from RAM to SSD");
    describe_counter!(EVICTIONS, "Entries dropped from the cache, by pool");
    describe_counter!(SSD_VERIFY_FAILURES, "SSD slots that failed verification");
    describe_gauge!(
        SINGLE_TOUCH_TARGET,
        "RAM single-touch target as a share of the RAM budget"
    );
    describe_gauge!(GHOST_KEYS, "Evicted keys each ghost remembers");
    describe_gauge!(
        DISPUTED_DISKS,
        "Disk ids several other members own, served by none of them"
    );
    describe_gauge!(
        SSD_LOADING,
        "1 while the SSD tier's index is read at start (the tier holds nothing until then), 0 after"
    );
    describe_counter!(
        GHOST_HITS,
        "Admissions of keys a ghost remembered, which go to multi-touch"
    );
    describe_counter!(
        SINGLE_TOUCH_TARGET_MOVES,
        "Moves of the single-touch target by ghost hits"
    );
    describe_gauge!(
        POLICY_RULES,
        "1 for the eviction rules the RAM pools run now (by rules), 0 for the others"
    );
    describe_counter!(
        POLICY_SWITCHES,
        "Times the duel changed the RAM pools' eviction rules"
    );
    describe_gauge!(
        POOL_SHARDS,
        "Shards the RAM pools are split into, each with its own lock"
    );
    describe_gauge!(
        LOGICAL_BYTES,
        Unit::Bytes,
        "Disk bytes the cached entries stand for"
    );
    describe_gauge!(STORED_BYTES, Unit::Bytes, "Bytes held by each cache tier");
    describe_gauge!(ENTRIES, "Entries held by each cache tier");
    describe_counter!(ORIGIN_READS, "Reads sent to origins");
    describe_counter!(ORIGIN_READ_BYTES, Unit::Bytes, "Bytes read from origins");
    describe_counter!(ORIGIN_ERRORS, "Origin I/O errors");
    describe_counter!(
        ORIGIN_LIMIT_WAIT_US,
        "Microseconds origin reads waited for the node's origin_limit"
    );
    describe_counter!(
        PEER_READS,
        "Blocks fetched from members other than the owner"
    );
    describe_counter!(
        PEER_READ_BYTES,
        Unit::Bytes,
        "Bytes fetched from members other than the owner"
    );
    describe_counter!(
        PEER_FETCH_FAILURES,
        "Peer block fetches without a verified block, by reason"
    );
    describe_counter!(PEER_SERVED_BLOCKS, "Blocks served to other members");
    describe_counter!(
        OWNER_MAP_BYTES,
        Unit::Bytes,
        "Bytes of owners' content maps received"
    );
    describe_counter!(
        OWNER_READS,
        "Reads of remote sealed disks sent to their owner"
    );
    describe_counter!(
        OWNER_READ_BYTES,
        Unit::Bytes,
        "Bytes read from remote owners"
    );
    describe_counter!(
        SINGLE_FLIGHT_JOINS,
        "Cold reads that joined an in-flight origin read"
    );
    describe_gauge!(
        CERT_EXPIRY,
        "Expiry of each certificate the node presents (role = cluster, nbd), Unix seconds"
    );
    describe_counter!(
        STAGED_HITS,
        "Blocks served from those just read for members' content maps, not the origin again"
    );
    describe_counter!(
        READ_AHEAD_ASKED,
        "Blocks asked for ahead of sequential readers, those cached or in flight included"
    );
    describe_counter!(
        READ_AHEAD_BLOCKS,
        "Blocks of disks other members own fetched ahead of a sequential reader"
    );
    describe_counter!(
        READ_AHEAD_USED,
        "Blocks fetched ahead that a client's read took (the rest expired unread)"
    );
    describe_gauge!(MEMBERS_ALIVE, "Live cluster members, this node included");
    describe_counter!(FORWARDED, "Requests forwarded to a disk's owner, by rpc");
    describe_counter!(
        LATE_WRITES,
        "Forwarded writes refused (never applied) because they reached the owner after their sender's deadline"
    );
    describe_counter!(RPC_REQUESTS, "gRPC requests by rpc");
    describe_counter!(RPC_ERRORS, "gRPC requests that failed, by rpc and code");
    describe_counter!(RPC_BYTES, Unit::Bytes, "Payload bytes by rpc");
    describe_histogram!(RPC_SECONDS, Unit::Seconds, "gRPC request latency by rpc");
}

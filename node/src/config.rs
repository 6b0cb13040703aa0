//! Configuration: one TOML file, the common keys also as command-line flags (flags win).
//!
//! Every key is documented in `deploy/node.example.toml` and README.md. Unknown keys and bad
//! values stop the start with a message that names the key.
//!
//! Architecture invariant: a configuration that loads is valid; nothing downstream validates it
//! again or panics on a value.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::disk::DiskMode;
use crate::telemetry::LogFormat;

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the key and the line.
        message: String,
    },
    /// A value that parses but cannot be used.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// The key, e.g. `cache.block_size` or `--block-size`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A setting that is one of a few words: what `parse` makes of `value`, `default` when it is
/// absent, or an error naming `key` that says `value` is not `what` and which words to use.
fn named<T>(
    key: &str,
    value: Option<&str>,
    parse: impl Fn(&str) -> Option<T>,
    default: T,
    what: &str,
    choices: &str,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(default),
        Some(name) => parse(name)
            .ok_or_else(|| invalid(key, format!("{name:?} is not {what}: use {choices}"))),
    }
}

/// A size in bytes, written as an integer or a string such as `64KiB`, `1.5GiB`, `512`, `4k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl std::str::FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size (examples: 4096, 64KiB, 1GiB)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {s:?} (use B, KiB, MiB, GiB, TiB)"
                ));
            }
        };
        let bytes = n * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("{s:?} is out of range"));
        }
        Ok(Size(bytes as u64))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `[cache]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCache {
    block_size: Option<Size>,
    ram: Option<Size>,
    single_touch_share: Option<f64>,
    adaptive_split: Option<bool>,
    single_touch_min: Option<f64>,
    single_touch_max: Option<f64>,
    ghost_ratio: Option<f64>,
    second_chances: Option<bool>,
    policy: Option<String>,
    shards: Option<u64>,
    ssd_promote_hits: Option<u8>,
    ssd_admission: Option<String>,
    ssd_direct: Option<bool>,
    ssd_load: Option<String>,
    ssd: Option<Size>,
    ssd_path: Option<PathBuf>,
    ssd_index_path: Option<PathBuf>,
}

/// `[cluster]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    peer_listen: Option<SocketAddr>,
    advertise: Option<SocketAddr>,
    advertise_rpc: Option<SocketAddr>,
    #[serde(default)]
    seeds: Vec<String>,
    cluster_id: Option<String>,
    gossip_interval_ms: Option<u64>,
    phi_threshold: Option<f64>,
    rpc_timeout_ms: Option<u64>,
    cache_remote: Option<bool>,
    peer_fetch: Option<bool>,
    read_ahead: Option<Size>,
    secret_file: Option<PathBuf>,
    tls: Option<FileTls>,
}

/// `[cluster.tls]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    server_name: Option<String>,
    require_roles: Option<bool>,
}

/// `[detection]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDetection {
    enabled: Option<bool>,
    window_ms: Option<u64>,
    min_readers: Option<u32>,
    min_reads: Option<u64>,
    quiet_period_ms: Option<u64>,
}

/// `[lease]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLease {
    term_ms: Option<u64>,
    drift_margin_ms: Option<u64>,
}

/// `[nbd_tls]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNbdTls {
    cert: PathBuf,
    key: PathBuf,
    require: Option<bool>,
}

/// `[admin]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    origin_roots: Option<Vec<PathBuf>>,
}

/// `[origin_limit]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOriginLimit {
    read_rate: Option<Size>,
    read_iops: Option<u32>,
    read_latency_ms: Option<f64>,
}

/// `[[disk]]` in the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDisk {
    id: String,
    origin: PathBuf,
    #[serde(default)]
    mode: Option<DiskMode>,
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<String>,
    data_dir: Option<PathBuf>,
    listen_unix: Option<PathBuf>,
    listen_tcp: Option<SocketAddr>,
    nbd_listen: Option<SocketAddr>,
    nbd_unix: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    log_format: Option<LogFormat>,
    log_filter: Option<String>,
    #[serde(default)]
    cache: FileCache,
    #[serde(default)]
    cluster: FileCluster,
    #[serde(default)]
    detection: FileDetection,
    #[serde(default)]
    lease: FileLease,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    origin_limit: FileOriginLimit,
    nbd_tls: Option<FileNbdTls>,
    #[serde(default)]
    disk: Vec<FileDisk>,
}

/// Command-line flags of `shadowcache-node`; each overrides the config file's key.
#[derive(Debug, Default, Clone, clap::Parser)]
#[command(
    name = "shadowcache-node",
    version,
    about = "The shadowcache node: a distributed read cache for virtual disks"
)]
pub struct Flags {
    /// TOML config file (see deploy/node.example.toml).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's id (default: the host name).
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// Directory for the socket, the SSD tier, content maps and saved disks.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Unix socket for the gRPC Block and Admin services (default: DATA_DIR/shadowcache.sock).
    #[arg(long, value_name = "PATH")]
    pub listen_unix: Option<PathBuf>,
    /// Also serve gRPC on this TCP address.
    #[arg(long, value_name = "ADDR")]
    pub listen_tcp: Option<SocketAddr>,
    /// Serve NBD on this TCP address (off by default; keep it on loopback or a trusted network).
    #[arg(long, value_name = "ADDR")]
    pub nbd_listen: Option<SocketAddr>,
    /// NBD Unix socket (default: DATA_DIR/nbd.sock).
    #[arg(long, value_name = "PATH")]
    pub nbd_unix: Option<PathBuf>,
    /// A disk, `ID=PATH[,sealed|,mutable]` (default mutable); repeatable.
    #[arg(long = "disk", value_name = "ID=PATH[,MODE]")]
    pub disks: Vec<String>,
    /// Cache block size, a power of two from 4KiB to 1MiB (default 16KiB).
    #[arg(long, value_name = "SIZE")]
    pub block_size: Option<Size>,
    /// RAM for the cache's two pools (default 256MiB).
    #[arg(long, value_name = "SIZE")]
    pub ram_cache: Option<Size>,
    /// SSD tier size; 0 disables it (default 1GiB).
    #[arg(long, value_name = "SIZE")]
    pub ssd_cache: Option<Size>,
    /// SSD tier slot file or block device (default DATA_DIR/cache.slots).
    #[arg(long, value_name = "PATH")]
    pub ssd_path: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Join a cluster: gossip (UDP) and the Peer service (TCP) on this address.
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<SocketAddr>,
    /// The address other members use to reach this node (default: --peer-listen).
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<SocketAddr>,
    /// The Peer gRPC address other members dial, when it is not --advertise (a proxy).
    #[arg(long, value_name = "ADDR")]
    pub advertise_rpc: Option<SocketAddr>,
    /// Another member's peer address to join through, `IP:PORT` or `HOST:PORT` (a name that
    /// resolves to members, e.g. a headless Service); repeatable.
    #[arg(long = "seed", value_name = "ADDR")]
    pub seeds: Vec<String>,
    /// Limit this node's reads of its origins to this many bytes a second, all together
    /// (`origin_limit.read_rate`).
    #[arg(long, value_name = "SIZE")]
    pub origin_read_rate: Option<Size>,
    /// Limit this node's reads of its origins to this many a second (`origin_limit.read_iops`).
    #[arg(long, value_name = "N")]
    pub origin_read_iops: Option<u32>,
    /// Add this many milliseconds to each read of an origin (`origin_limit.read_latency_ms`).
    #[arg(long, value_name = "MS")]
    pub origin_read_latency_ms: Option<f64>,
    /// Blocks of a disk another member owns fetched ahead of a sequential reader; 0 turns
    /// read-ahead off (`cluster.read_ahead`, default 16MiB).
    #[arg(long, value_name = "SIZE")]
    pub read_ahead: Option<Size>,
    /// Check the configuration (the file, the flags, and the files they name: origins,
    /// certificates, keys, the cluster key), print what it amounts to, and exit: 0 when it
    /// would start, 2 when not. Starts nothing, writes nothing.
    #[arg(long)]
    pub check_config: bool,
}

pub use crate::cluster::detect::DetectionConfig;
pub use crate::cluster::{ClusterConfig, TlsConfig};
pub use crate::disk::DiskSpec;
pub use crate::nbd::NbdTlsConfig;

pub use crate::cluster::lease::LeaseConfig;
pub use crate::origin::OriginLimit;

/// The node's validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id.
    pub node_id: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Unix socket path for gRPC.
    pub listen_unix: PathBuf,
    /// Optional TCP address for gRPC.
    pub listen_tcp: Option<SocketAddr>,
    /// Optional TCP address for NBD.
    pub nbd_listen: Option<SocketAddr>,
    /// NBD Unix socket.
    pub nbd_unix: Option<PathBuf>,
    /// Optional Prometheus address.
    pub metrics: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// Which log lines are written (`RUST_LOG` syntax, e.g. `info,shadowcache_node::cluster=debug`);
    /// `RUST_LOG` wins when set. Re-read from the config file on SIGHUP.
    pub log_filter: Option<String>,
    /// Cache block size in bytes.
    pub block_bytes: u32,
    /// RAM for both pools.
    pub ram_bytes: u64,
    /// Single-touch share of RAM at start.
    pub single_touch_share: f64,
    /// Whether ghost hits move the single-touch share.
    pub adaptive_split: bool,
    /// Lowest single-touch share.
    pub single_touch_min: f64,
    /// Highest single-touch share.
    pub single_touch_max: f64,
    /// Keys each ghost remembers per block of a full RAM budget.
    pub ghost_ratio: f64,
    /// Whether re-reads in multi-touch earn second chances.
    pub second_chances: bool,
    /// Eviction rules to keep, or none: the pools pick them online (the duel).
    pub policy_rules: Option<crate::cache::pool::Variant>,
    /// Shards of the RAM pools, each behind its own lock (0: picked by the RAM).
    pub cache_shards: u64,
    /// SSD hits before an entry moves back to RAM.
    pub ssd_promote_hits: u8,
    /// Which entries RAM multi-touch lets go the SSD takes.
    pub ssd_admission: crate::cache::SsdAdmission,
    /// SSD slots read and written with O_DIRECT (past the page cache).
    pub ssd_direct: bool,
    /// When the SSD index is read at start.
    pub ssd_load: crate::cache::SsdLoad,
    /// SSD tier bytes (0: none).
    pub ssd_bytes: u64,
    /// SSD slot file.
    pub ssd_path: PathBuf,
    /// SSD index file.
    pub ssd_index_path: PathBuf,
    /// Disks to register at start.
    pub disks: Vec<DiskSpec>,
    /// Cluster membership and node-to-node settings.
    pub cluster: ClusterConfig,
    /// Detection of read-only multi-reader disks.
    pub detection: DetectionConfig,
    /// Leases on detected disks.
    pub lease: LeaseConfig,
    /// `admin.origin_roots`: directories file origins must lie in (empty: anywhere the node's
    /// user can open; the Admin socket is then root-equivalent for that user).
    pub origin_roots: Vec<PathBuf>,
    /// `[nbd_tls]`: NBD_OPT_STARTTLS with this certificate; `None`: no TLS on NBD.
    pub nbd_tls: Option<NbdTlsConfig>,
    /// `[origin_limit]`: what this node's reads of its origins may take (none by default).
    pub origin_limit: OriginLimit,
}

/// Most SSD slots a node will index: slot numbers are 32-bit (64 TiB at 16 KiB blocks). Each
/// costs about 31 bytes of RAM ([`crate::cache::ssd::index_ram_bytes`]): 8 GiB for 4 TiB.
pub const MAX_SSD_SLOTS: u64 = crate::cache::ssd::MAX_SLOTS as u64;
/// Default block size: see docs/ARCHITECTURE.md for the measurements behind it.
pub const DEFAULT_BLOCK_BYTES: u32 = 16 * 1024;
/// Default RAM for the cache.
pub const DEFAULT_RAM_BYTES: u64 = 256 << 20;
/// Default SSD tier size.
pub const DEFAULT_SSD_BYTES: u64 = 1 << 30;
/// Default single-touch share of RAM.
pub const DEFAULT_SINGLE_TOUCH_SHARE: f64 = crate::cache::pool::DEFAULT_SINGLE_SHARE;

/// Parses `ID=PATH[,sealed|,mutable]`.
pub fn parse_disk_flag(s: &str) -> Result<DiskSpec, ConfigError> {
    let key = "--disk";
    let (id, rest) = s
        .split_once('=')
        .ok_or_else(|| invalid(key, format!("{s:?} is not ID=PATH[,sealed|,mutable]")))?;
    let (path, mode) = match rest.rsplit_once(',') {
        Some((p, "sealed")) => (p, DiskMode::Sealed),
        Some((p, "mutable")) => (p, DiskMode::Mutable),
        // A path holding a comma must end with an explicit mode.
        Some((_, m)) => {
            return Err(invalid(
                key,
                format!(
                    "unknown mode {m:?} in {s:?} (sealed or mutable; a path with a comma needs an explicit mode)"
                ),
            ));
        }
        None => (rest, DiskMode::Mutable),
    };
    if id.is_empty() || path.is_empty() {
        return Err(invalid(
            key,
            format!("{s:?} is not ID=PATH[,sealed|,mutable]"),
        ));
    }
    Ok(DiskSpec {
        id: id.to_string(),
        origin: PathBuf::from(path),
        mode,
    })
}

fn default_node_id() -> String {
    // uname(2), not /proc/sys/kernel/hostname: a hardened unit (ProcSubset=pid) hides /proc/sys,
    // and every host would then be "node".
    Some(rustix::system::uname())
        .map(|u| u.nodename().to_string_lossy().trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

impl Config {
    /// Builds the configuration from flags and the file they name (if any).
    pub fn from_flags(flags: &Flags) -> Result<Config, ConfigError> {
        let file = match &flags.config {
            Some(path) => Self::read_file(path)?,
            None => FileConfig::default(),
        };
        let data_dir = flags
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/shadowcache"));
        let mut disks: Vec<DiskSpec> = file
            .disk
            .into_iter()
            .map(|d| DiskSpec {
                id: d.id,
                origin: d.origin,
                mode: d.mode.unwrap_or(DiskMode::Mutable),
            })
            .collect();
        for d in &flags.disks {
            let spec = parse_disk_flag(d)?;
            // A flag replaces the file's disk of the same id.
            disks.retain(|x| x.id != spec.id);
            disks.push(spec);
        }
        let cfg = Config {
            node_id: flags
                .node_id
                .clone()
                .or(file.node_id)
                .unwrap_or_else(default_node_id),
            listen_unix: flags
                .listen_unix
                .clone()
                .or(file.listen_unix)
                .unwrap_or_else(|| data_dir.join("shadowcache.sock")),
            listen_tcp: flags.listen_tcp.or(file.listen_tcp),
            nbd_listen: flags.nbd_listen.or(file.nbd_listen),
            nbd_unix: Some(
                flags
                    .nbd_unix
                    .clone()
                    .or(file.nbd_unix)
                    .unwrap_or_else(|| data_dir.join("nbd.sock")),
            ),
            metrics: flags.metrics.or(file.metrics),
            log_format: flags.log_format.or(file.log_format).unwrap_or_default(),
            log_filter: file.log_filter,
            block_bytes: flags
                .block_size
                .or(file.cache.block_size)
                .map(|s| s.0)
                .unwrap_or(u64::from(DEFAULT_BLOCK_BYTES))
                .try_into()
                .map_err(|_| {
                    invalid(
                        "cache.block_size",
                        "must be a power of two from 4KiB to 1MiB",
                    )
                })?,
            ram_bytes: flags
                .ram_cache
                .or(file.cache.ram)
                .map_or(DEFAULT_RAM_BYTES, |s| s.0),
            single_touch_share: file
                .cache
                .single_touch_share
                .unwrap_or(DEFAULT_SINGLE_TOUCH_SHARE),
            adaptive_split: file.cache.adaptive_split.unwrap_or(true),
            single_touch_min: file
                .cache
                .single_touch_min
                .unwrap_or(crate::cache::pool::DEFAULT_SHARE_MIN),
            single_touch_max: file
                .cache
                .single_touch_max
                .unwrap_or(crate::cache::pool::DEFAULT_SHARE_MAX),
            ghost_ratio: file
                .cache
                .ghost_ratio
                .unwrap_or(crate::cache::pool::DEFAULT_GHOST_RATIO),
            second_chances: file.cache.second_chances.unwrap_or(true),
            policy_rules: named(
                "cache.policy",
                file.cache.policy.as_deref(),
                |n| match n {
                    "duel" => Some(None),
                    n => crate::cache::pool::Variant::from_name(n).map(Some),
                },
                None,
                "a policy",
                "duel (the default), tuned, arc, lru or loop",
            )?,
            cache_shards: file.cache.shards.unwrap_or(0),
            ssd_promote_hits: file
                .cache
                .ssd_promote_hits
                .unwrap_or(crate::cache::DEFAULT_SSD_PROMOTE_HITS),
            ssd_admission: named(
                "cache.ssd_admission",
                file.cache.ssd_admission.as_deref(),
                crate::cache::SsdAdmission::from_name,
                crate::cache::SsdAdmission::default(),
                "an SSD admission",
                "proven (the default: only entries read again after RAM let them go) or all",
            )?,
            ssd_direct: file.cache.ssd_direct.unwrap_or(true),
            ssd_load: named(
                "cache.ssd_load",
                file.cache.ssd_load.as_deref(),
                crate::cache::SsdLoad::from_name,
                crate::cache::SsdLoad::default(),
                "a way to read the SSD index at start",
                "auto (the default: before serving up to 4 Mi slots, in the background above), \
                 wait or background",
            )?,
            ssd_bytes: flags
                .ssd_cache
                .or(file.cache.ssd)
                .map_or(DEFAULT_SSD_BYTES, |s| s.0),
            ssd_path: flags
                .ssd_path
                .clone()
                .or(file.cache.ssd_path)
                .unwrap_or_else(|| data_dir.join("cache.slots")),
            ssd_index_path: file
                .cache
                .ssd_index_path
                .unwrap_or_else(|| data_dir.join("cache.index")),
            data_dir,
            disks,
            cluster: ClusterConfig {
                peer_listen: flags.peer_listen.or(file.cluster.peer_listen),
                advertise: flags.advertise.or(file.cluster.advertise),
                advertise_rpc: flags.advertise_rpc.or(file.cluster.advertise_rpc),
                seeds: if flags.seeds.is_empty() {
                    file.cluster.seeds
                } else {
                    flags.seeds.clone()
                },
                cluster_id: file
                    .cluster
                    .cluster_id
                    .unwrap_or_else(|| "shadowcache".to_string()),
                gossip_interval_ms: file.cluster.gossip_interval_ms.unwrap_or(500),
                phi_threshold: file.cluster.phi_threshold.unwrap_or(8.0),
                rpc_timeout_ms: file.cluster.rpc_timeout_ms.unwrap_or(5000),
                cache_remote: file.cluster.cache_remote.unwrap_or(true),
                peer_fetch: file.cluster.peer_fetch.unwrap_or(true),
                read_ahead: flags
                    .read_ahead
                    .or(file.cluster.read_ahead)
                    .map_or(crate::cluster::DEFAULT_READ_AHEAD, |s| s.0),
                secret_file: file.cluster.secret_file,
                tls: file.cluster.tls.map(|t| TlsConfig {
                    ca: t.ca,
                    cert: t.cert,
                    key: t.key,
                    server_name: t.server_name.unwrap_or_else(|| "shadowcache".to_string()),
                    require_roles: t.require_roles.unwrap_or(false),
                }),
            },
            detection: {
                let d = DetectionConfig::default();
                DetectionConfig {
                    enabled: file.detection.enabled.unwrap_or(d.enabled),
                    window_ms: file.detection.window_ms.unwrap_or(d.window_ms),
                    min_readers: file.detection.min_readers.unwrap_or(d.min_readers),
                    min_reads: file.detection.min_reads.unwrap_or(d.min_reads),
                    quiet_period_ms: file.detection.quiet_period_ms.unwrap_or(d.quiet_period_ms),
                }
            },
            lease: {
                let d = LeaseConfig::default();
                LeaseConfig {
                    term_ms: file.lease.term_ms.unwrap_or(d.term_ms),
                    drift_margin_ms: file.lease.drift_margin_ms.unwrap_or(d.drift_margin_ms),
                }
            },
            origin_roots: file.admin.origin_roots.unwrap_or_default(),
            origin_limit: OriginLimit {
                read_bytes_per_s: flags
                    .origin_read_rate
                    .or(file.origin_limit.read_rate)
                    .map(|s| s.0),
                read_iops: flags.origin_read_iops.or(file.origin_limit.read_iops),
                read_latency_ms: flags
                    .origin_read_latency_ms
                    .or(file.origin_limit.read_latency_ms)
                    .unwrap_or(0.0),
            },
            nbd_tls: file.nbd_tls.map(|t| NbdTlsConfig {
                cert: t.cert,
                key: t.key,
                require: t.require.unwrap_or(true),
            }),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_file(path, &text)
    }

    fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Checks values that parse but cannot be used.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (n, s) in self.cluster.seeds.iter().enumerate() {
            if s.parse::<SocketAddr>().is_ok() {
                continue;
            }
            let ok = s.rsplit_once(':').is_some_and(|(host, port)| {
                port.parse::<u16>().is_ok_and(|p| p > 0)
                    && !host.is_empty()
                    && host.len() <= 253
                    && host.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    })
            });
            if !ok {
                return Err(invalid(
                    format!("cluster.seeds[{n}]"),
                    format!("{s:?} is neither IP:PORT nor HOST:PORT"),
                ));
            }
        }
        if let Some(f) = &self.log_filter
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(f)
        {
            return Err(invalid("log_filter", format!("{f:?}: {e}")));
        }
        self.origin_limit
            .validate()
            .map_err(|(key, message)| invalid(key, message))?;
        let bs = self.block_bytes;
        if !bs.is_power_of_two() || !(4096..=1 << 20).contains(&bs) {
            return Err(invalid(
                "cache.block_size",
                format!("{bs} is not a power of two from 4KiB (4096) to 1MiB (1048576)"),
            ));
        }
        let share = self.single_touch_share;
        if !(share > 0.0 && share < 1.0) {
            return Err(invalid(
                "cache.single_touch_share",
                format!("{share} is not a fraction strictly between 0 and 1"),
            ));
        }
        let (lo, hi) = (self.single_touch_min, self.single_touch_max);
        if !(lo > 0.0 && lo <= share && share <= hi && hi < 1.0) {
            return Err(invalid(
                "cache.single_touch_min",
                format!(
                    "single_touch_min {lo}, single_touch_share {share} and single_touch_max {hi} \
                     must satisfy 0 < min <= share <= max < 1"
                ),
            ));
        }
        if self.ssd_promote_hits == 0 {
            return Err(invalid(
                "cache.ssd_promote_hits",
                "0 is not a number of hits: 1 moves an entry back to RAM at its first SSD hit"
                    .to_string(),
            ));
        }
        let max_shards = crate::cache::shards::MAX_SHARDS as u64;
        if self.cache_shards > max_shards
            || !self.cache_shards.is_power_of_two() && self.cache_shards != 0
        {
            return Err(invalid(
                "cache.shards",
                format!(
                    "{} is not a power of two up to {max_shards} (or 0: picked by the RAM)",
                    self.cache_shards
                ),
            ));
        }
        let g = self.ghost_ratio;
        if !(0.0..=16.0).contains(&g) {
            return Err(invalid(
                "cache.ghost_ratio",
                format!("{g} is not between 0 and 16 (keys remembered per block of RAM)"),
            ));
        }
        if self.ram_bytes < 2 * u64::from(bs) {
            return Err(invalid(
                "cache.ram",
                format!("{} bytes is less than two blocks of {bs}", self.ram_bytes),
            ));
        }
        if self.ssd_bytes != 0 && self.ssd_bytes < u64::from(bs) {
            return Err(invalid(
                "cache.ssd",
                format!(
                    "{} bytes holds no block of {bs}; use 0 to disable the ssd tier",
                    self.ssd_bytes
                ),
            ));
        }
        let slots = self.ssd_bytes / u64::from(bs);
        if slots > MAX_SSD_SLOTS {
            return Err(invalid(
                "cache.ssd",
                format!(
                    "{} bytes in blocks of {bs} is {slots} slots, more than the {MAX_SSD_SLOTS} an ssd index can number (it would take {} GiB of RAM); use a larger cache.block_size",
                    self.ssd_bytes,
                    crate::cache::ssd::index_ram_bytes(slots) >> 30
                ),
            ));
        }
        let c = &self.cluster;
        if !(10..=60_000).contains(&c.gossip_interval_ms) {
            return Err(invalid(
                "cluster.gossip_interval_ms",
                format!("{} is not 10 to 60000", c.gossip_interval_ms),
            ));
        }
        if !(c.phi_threshold >= 1.0 && c.phi_threshold <= 100.0) {
            return Err(invalid(
                "cluster.phi_threshold",
                format!("{} is not 1 to 100", c.phi_threshold),
            ));
        }
        if c.read_ahead > crate::cluster::MAX_READ_AHEAD {
            return Err(invalid(
                "cluster.read_ahead",
                format!(
                    "{} bytes is more than the most, {} (256MiB)",
                    c.read_ahead,
                    crate::cluster::MAX_READ_AHEAD
                ),
            ));
        }
        if !(10..=600_000).contains(&c.rpc_timeout_ms) {
            return Err(invalid(
                "cluster.rpc_timeout_ms",
                format!("{} is not 10 to 600000", c.rpc_timeout_ms),
            ));
        }
        if c.peer_listen.is_none()
            && (!c.seeds.is_empty() || c.advertise.is_some() || c.advertise_rpc.is_some())
        {
            return Err(invalid(
                "cluster.peer_listen",
                "seeds or advertise are set but peer_listen is not",
            ));
        }
        if let (Some(l), None) = (c.peer_listen, c.advertise)
            && l.ip().is_unspecified()
        {
            return Err(invalid(
                "cluster.advertise",
                format!("peer_listen {l} is a wildcard: set the address other members should use"),
            ));
        }
        if let Some(t) = &c.tls {
            for (key, path) in [
                ("cluster.tls.ca", &t.ca),
                ("cluster.tls.cert", &t.cert),
                ("cluster.tls.key", &t.key),
            ] {
                if let Err(e) = std::fs::metadata(path) {
                    return Err(invalid(key, format!("{}: {e}", path.display())));
                }
            }
            if t.server_name.is_empty() {
                return Err(invalid("cluster.tls.server_name", "must not be empty"));
            }
        }
        let d = &self.detection;
        if !(100..=86_400_000).contains(&d.window_ms) {
            return Err(invalid(
                "detection.window_ms",
                format!("{} is not 100 to 86400000", d.window_ms),
            ));
        }
        if d.min_readers < 1 {
            return Err(invalid("detection.min_readers", "must be at least 1"));
        }
        if d.quiet_period_ms > 86_400_000 {
            return Err(invalid(
                "detection.quiet_period_ms",
                format!("{} is more than a day", d.quiet_period_ms),
            ));
        }
        let l = &self.lease;
        if !(100..=3_600_000).contains(&l.term_ms) {
            return Err(invalid(
                "lease.term_ms",
                format!("{} is not 100 to 3600000", l.term_ms),
            ));
        }
        if l.drift_margin_ms.saturating_mul(3) >= l.term_ms {
            return Err(invalid(
                "lease.drift_margin_ms",
                format!(
                    "{} must be less than a third of lease.term_ms ({})",
                    l.drift_margin_ms, l.term_ms
                ),
            ));
        }
        if self.node_id.is_empty() {
            return Err(invalid("node_id", "must not be empty"));
        }
        let mut seen = std::collections::HashSet::new();
        for (n, d) in self.disks.iter().enumerate() {
            if let Err(e) = crate::disk::DiskId::parse(&d.id) {
                return Err(invalid(
                    format!("disk[{n}].id"),
                    crate::error::Error::from(e).to_string(),
                ));
            }
            if !seen.insert(d.id.as_str()) {
                return Err(invalid(
                    format!("disk[{n}].id"),
                    format!("disk {:?} is listed twice", d.id),
                ));
            }
        }
        Ok(())
    }

    /// The cache settings this configuration describes.
    pub fn cache_config(&self) -> crate::cache::CacheConfig {
        crate::cache::CacheConfig {
            block_bytes: self.block_bytes,
            ram_bytes: self.ram_bytes,
            single_touch_share: self.single_touch_share,
            adaptive: self.adaptive_split,
            single_touch_min: self.single_touch_min,
            single_touch_max: self.single_touch_max,
            ghost_ratio: self.ghost_ratio,
            second_chances: self.second_chances,
            policy_rules: self.policy_rules,
            shards: self.cache_shards as usize,
            ssd: (self.ssd_bytes > 0).then(|| crate::cache::SsdConfig {
                data_path: self.ssd_path.clone(),
                index_path: self.ssd_index_path.clone(),
                capacity_bytes: self.ssd_bytes,
                slot_bytes: self.block_bytes,
                direct: self.ssd_direct,
            }),
            demotion_queue: 1024,
            ssd_promote_hits: self.ssd_promote_hits,
            ssd_admission: self.ssd_admission,
            ssd_load: self.ssd_load,
        }
    }

    /// A configuration for tests and the demo: everything under `data_dir`, defaults otherwise.
    pub fn for_data_dir(data_dir: &Path) -> Config {
        let flags = Flags {
            data_dir: Some(data_dir.to_path_buf()),
            node_id: Some("local".into()),
            ..Flags::default()
        };
        // Defaults always validate.
        match Config::from_flags(&flags) {
            Ok(c) => c,
            Err(e) => unreachable!("default configuration is invalid: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).expect("write");
        Config::from_flags(&Flags {
            config: Some(path),
            ..Flags::default()
        })
    }

    fn message(r: Result<Config, ConfigError>) -> String {
        match r {
            Ok(_) => panic!("config was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_example_config_in_the_repository_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node.example.toml");
        let text = std::fs::read_to_string(&path).expect("deploy/node.example.toml");
        let file = Config::parse_file(&path, &text).expect("example parses");
        assert_eq!(file.disk.len(), 2);
        assert_eq!(file.cluster.seeds.len(), 2);
        let c = parse(&text).expect("example validates");
        assert_eq!(c.block_bytes, DEFAULT_BLOCK_BYTES);
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!("64KiB".parse::<Size>(), Ok(Size(65536)));
        assert_eq!("1.5GiB".parse::<Size>(), Ok(Size(1610612736)));
        assert_eq!("4k".parse::<Size>(), Ok(Size(4096)));
        assert_eq!("512".parse::<Size>(), Ok(Size(512)));
        assert!("12XB".parse::<Size>().is_err());
        assert!("MiB".parse::<Size>().is_err());
    }

    #[test]
    fn the_origin_limit_comes_from_the_file_and_its_flags_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        let text =
            "[origin_limit]\nread_rate = \"200MiB\"\nread_iops = 5000\nread_latency_ms = 2.5\n";
        std::fs::write(&path, text).expect("write");
        let flags = Flags {
            config: Some(path),
            ..Flags::default()
        };
        let c = Config::from_flags(&flags).expect("valid");
        assert_eq!(
            c.origin_limit,
            OriginLimit {
                read_bytes_per_s: Some(200 << 20),
                read_iops: Some(5000),
                read_latency_ms: 2.5,
            }
        );
        let c = Config::from_flags(&Flags {
            origin_read_rate: Some(Size(1 << 20)),
            origin_read_latency_ms: Some(0.0),
            ..flags
        })
        .expect("valid");
        assert_eq!(c.origin_limit.read_bytes_per_s, Some(1 << 20));
        assert_eq!(c.origin_limit.read_iops, Some(5000));
        assert_eq!(c.origin_limit.read_latency_ms, 0.0);
    }

    #[test]
    fn a_full_file_parses() {
        let c = parse(
            r#"
            node_id = "h1"
            data_dir = "/tmp/x"
            listen_tcp = "127.0.0.1:7000"
            metrics = "127.0.0.1:9100"
            log_format = "json"
            [cache]
            block_size = "16KiB"
            ram = "1GiB"
            single_touch_share = 0.3
            ssd = 0
            [[disk]]
            id = "replica"
            origin = "/img/replica.raw"
            mode = "sealed"
            "#,
        )
        .expect("valid");
        assert_eq!(c.block_bytes, 16384);
        assert_eq!(c.ram_bytes, 1 << 30);
        assert!(!c.origin_limit.is_active(), "no [origin_limit]: no limit");
        assert_eq!(c.ssd_bytes, 0);
        assert_eq!(c.listen_unix, PathBuf::from("/tmp/x/shadowcache.sock"));
        assert_eq!(c.disks[0].mode, DiskMode::Sealed);
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn an_unknown_key_is_named() {
        let m = message(parse("[cache]\nrma = \"1GiB\"\n"));
        assert!(m.contains("rma"), "{m}");
        let m = message(parse("nodeid = \"x\"\n"));
        assert!(m.contains("nodeid"), "{m}");
    }

    #[test]
    fn read_ahead_is_a_size_with_a_ceiling_and_its_flag_wins() {
        let c = parse("").expect("defaults");
        assert_eq!(c.cluster.read_ahead, crate::cluster::DEFAULT_READ_AHEAD);
        let c = parse("[cluster]\nread_ahead = \"4MiB\"\n").expect("4MiB");
        assert_eq!(c.cluster.read_ahead, 4 << 20);
        let c = parse("[cluster]\nread_ahead = 0\n").expect("off");
        assert_eq!(c.cluster.read_ahead, 0);
        let m = message(parse("[cluster]\nread_ahead = \"1GiB\"\n"));
        assert!(
            m.contains("cluster.read_ahead") && m.contains("256MiB"),
            "{m}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "[cluster]\nread_ahead = \"4MiB\"\n").expect("write");
        let c = Config::from_flags(&Flags {
            config: Some(path),
            read_ahead: Some(Size(0)),
            ..Flags::default()
        })
        .expect("valid");
        assert_eq!(c.cluster.read_ahead, 0, "the flag wins");
    }

    #[test]
    fn bad_values_are_named() {
        let m = message(parse("[cache]\nblock_size = \"3000\"\n"));
        assert!(m.contains("cache.block_size"), "{m}");
        let m = message(parse("[cache]\nblock_size = \"2MiB\"\n"));
        assert!(m.contains("cache.block_size"), "{m}");
        let m = message(parse("[cache]\nram = \"lots\"\n"));
        assert!(m.contains("ram"), "{m}");
        let m = message(parse("[cache]\npolicy = \"belady\"\n"));
        assert!(m.contains("cache.policy") && m.contains("duel"), "{m}");
        let lru = parse("[cache]\npolicy = \"lru\"\n").expect("policy lru");
        assert_eq!(lru.policy_rules, Some(crate::cache::pool::Variant::Lru));
        let duel = parse("[cache]\npolicy = \"duel\"\n").expect("policy duel");
        assert_eq!(duel.policy_rules, None);
        for bad in ["3", "2048"] {
            let m = message(parse(&format!("[cache]\nshards = {bad}\n")));
            assert!(
                m.contains("cache.shards") && m.contains("power of two"),
                "{m}"
            );
        }
        let m = message(parse("[cache]\nssd_promote_hits = 0\n"));
        assert!(m.contains("cache.ssd_promote_hits"), "{m}");
        let m = message(parse("[cache]\nssd_promote_hits = 300\n"));
        assert!(m.contains("ssd_promote_hits"), "{m}");
        let m = message(parse("[cache]\nssd_admission = \"some\"\n"));
        assert!(
            m.contains("cache.ssd_admission") && m.contains("proven"),
            "{m}"
        );
        let all = parse("[cache]\nssd_admission = \"all\"\n").expect("ssd_admission all");
        assert_eq!(all.ssd_admission, crate::cache::SsdAdmission::All);
        let dflt = parse("").expect("defaults");
        assert_eq!(dflt.ssd_admission, crate::cache::SsdAdmission::Proven);
        assert_eq!(
            dflt.cache_config().ssd_admission,
            crate::cache::SsdAdmission::Proven
        );
        let m = message(parse("[cache]\nssd_load = \"later\"\n"));
        assert!(
            m.contains("cache.ssd_load") && m.contains("background"),
            "{m}"
        );
        let bg = parse("[cache]\nssd_load = \"background\"\n").expect("ssd_load background");
        assert_eq!(
            bg.cache_config().ssd_load,
            crate::cache::SsdLoad::Background
        );
        let wait = parse("[cache]\nssd_load = \"wait\"\n").expect("ssd_load wait");
        assert_eq!(wait.ssd_load, crate::cache::SsdLoad::Wait);
        assert_eq!(dflt.ssd_load, crate::cache::SsdLoad::Auto);
        let eight = parse("[cache]\nshards = 8\n").expect("8 shards");
        assert_eq!(eight.cache_config().shard_count(), 8);
        let most = parse("[cache]\nshards = 1024\n").expect("1024 shards");
        assert_eq!(most.cache_config().shard_count(), 1024);
        assert_eq!(duel.cache_shards, 0);
        let m = message(parse("[cache]\nsingle_touch_share = 1.5\n"));
        assert!(m.contains("single_touch_share"), "{m}");
        // A 4 TiB tier of 16 KiB blocks fits (an 8 GiB index); 32 TiB of 4 KiB blocks does
        // not (8 Gi slots).
        let big = parse("[cache]\nssd = \"4TiB\"\n").expect("a 4 TiB ssd tier");
        assert_eq!(big.ssd_bytes, 4 << 40);
        assert!(
            big.cache_config().ssd.expect("ssd").direct,
            "O_DIRECT by default"
        );
        let paged = parse("[cache]\nssd_direct = false\n").expect("ssd_direct");
        assert!(!paged.cache_config().ssd.expect("ssd").direct);
        let m = message(parse("[cache]\nblock_size = \"4KiB\"\nssd = \"32TiB\"\n"));
        assert!(
            m.contains("cache.ssd")
                && m.contains("larger cache.block_size")
                && m.contains("GiB of RAM"),
            "{m}"
        );
        let m = message(parse("[cluster]\nseeds = [\"127.0.0.1:7000\"]\n"));
        assert!(m.contains("cluster.peer_listen"), "{m}");
        let m = message(parse("[cluster]\npeer_listen = \"0.0.0.0:7000\"\n"));
        assert!(m.contains("cluster.advertise"), "{m}");
        let m = message(parse("log_filter = \"info,[[\"\n"));
        assert!(m.contains("log_filter"), "{m}");
        assert!(parse("log_filter = \"warn,shadowcache_node::cluster=debug\"\n").is_ok());
        // Seeds by name (a headless Service) are taken; junk is refused, naming the seed.
        let ok = parse(
            "[cluster]\npeer_listen = \"127.0.0.1:7000\"\nseeds = [\"10.0.0.1:7946\", \"[::1]:7946\", \"shadowcache-peers.shadowcache.svc.cluster.local:7946\"]\n",
        )
        .expect("seeds by name");
        assert_eq!(ok.cluster.seeds.len(), 3);
        for bad in [
            "no-port",
            "host:0",
            "host:99999",
            "bad host:7946",
            ":7946",
            "a..b:1",
        ] {
            let m = message(parse(&format!(
                "[cluster]\npeer_listen = \"127.0.0.1:7000\"\nseeds = [{bad:?}]\n"
            )));
            assert!(
                m.contains("cluster.seeds[0]") && m.contains("HOST:PORT"),
                "{bad}: {m}"
            );
        }
        let m = message(parse(
            "[cluster]\npeer_listen = \"127.0.0.1:7000\"\nphi_threshold = 0.5\n",
        ));
        assert!(m.contains("cluster.phi_threshold"), "{m}");
        let m = message(parse(
            "[cluster]\npeer_listen = \"127.0.0.1:7000\"\n[cluster.tls]\nca = \"/no/ca.pem\"\ncert = \"/no/c.pem\"\nkey = \"/no/k.pem\"\n",
        ));
        assert!(
            m.contains("cluster.tls.ca") && m.contains("/no/ca.pem"),
            "{m}"
        );
        let m = message(parse("[origin_limit]\nread_rate = 0\n"));
        assert!(m.contains("origin_limit.read_rate"), "{m}");
        let m = message(parse("[origin_limit]\nread_iops = 0\n"));
        assert!(m.contains("origin_limit.read_iops"), "{m}");
        let m = message(parse("[origin_limit]\nread_latency_ms = -3.0\n"));
        assert!(m.contains("origin_limit.read_latency_ms"), "{m}");
        let m = message(parse("[origin_limit]\nread_rat = \"1MiB\"\n"));
        assert!(m.contains("read_rat"), "{m}");
        let m = message(parse("[cluster.tls]\nca = \"x\"\n"));
        assert!(m.contains("cert"), "{m}");
        let m = message(parse("[lease]\nterm_ms = 1000\ndrift_margin_ms = 400\n"));
        assert!(m.contains("lease.drift_margin_ms"), "{m}");
        let m = message(parse("[detection]\nmin_readers = 0\n"));
        assert!(m.contains("detection.min_readers"), "{m}");
        let m = message(parse("[detection]\nwindow = 5\n"));
        assert!(m.contains("window"), "{m}");
        let m = message(parse("[cluster]\ngossip_interval_ms = 1\n"));
        assert!(m.contains("cluster.gossip_interval_ms"), "{m}");
        let m = message(parse("[cluster]\nseed = []\n"));
        assert!(m.contains("seed"), "{m}");
        let m = message(parse("listen_tcp = \"nowhere\"\n"));
        assert!(m.contains("listen_tcp"), "{m}");
        let m = message(parse("[[disk]]\nid = \"a b\"\norigin = \"/x\"\n"));
        assert!(m.contains("disk[0].id"), "{m}");
        let m = message(parse(
            "[[disk]]\nid = \"a\"\norigin = \"/x\"\nmode = \"frozen\"\n",
        ));
        assert!(m.contains("frozen"), "{m}");
    }

    #[test]
    fn disk_flags_parse() {
        let d = parse_disk_flag("base=/img/a.raw,sealed").expect("ok");
        assert_eq!((d.id.as_str(), d.mode), ("base", DiskMode::Sealed));
        assert!(parse_disk_flag("w=/img/a,b.raw").is_err());
        let d = parse_disk_flag("w=/img/a,b.raw,mutable").expect("a comma in a path is kept");
        assert_eq!(d.origin, PathBuf::from("/img/a,b.raw"));
        assert!(parse_disk_flag("noequals").is_err());
        assert!(parse_disk_flag("x=/a,frozen").is_err());
    }
}

//! gRPC frontend: the Block and Admin services of `shadowcache.v1`, on a Unix socket and
//! optionally TCP.
//!
//! This file translates between protobuf messages and [`Node`] calls, maps [`Error`] to
//! `tonic::Code` in one place ([`status`]), and records per-RPC metrics. It holds no cache or
//! disk logic.
//!
//! Architecture invariant: protocol translation only: no cache, disk or cluster logic; errors
//! become statuses only through `status.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use shadowcache_proto as pb;
use tokio::net::{TcpListener, UnixListener};
use tonic::{Code, Request, Response, Status};

use crate::disk::DiskMode;
use crate::error::Error;
use crate::telemetry;
use crate::{DiskInfo, Node, NodeStatus};

pub use super::status::status;

fn mode_to_pb(m: DiskMode) -> pb::DiskMode {
    match m {
        DiskMode::Mutable => pb::DiskMode::Mutable,
        DiskMode::Sealed => pb::DiskMode::Sealed,
        DiskMode::Detected => pb::DiskMode::Detected,
    }
}

fn mode_from_pb(m: i32) -> Result<DiskMode, Error> {
    match pb::DiskMode::try_from(m) {
        Ok(pb::DiskMode::Mutable) => Ok(DiskMode::Mutable),
        Ok(pb::DiskMode::Sealed) => Ok(DiskMode::Sealed),
        _ => Err(Error::Invalid(format!(
            "disk mode {m} is not DISK_MODE_MUTABLE or DISK_MODE_SEALED"
        ))),
    }
}

/// A disk as the protocol describes it.
pub fn info_to_pb(d: DiskInfo) -> pb::DiskInfo {
    pb::DiskInfo {
        id: d.id,
        size_bytes: d.size_bytes,
        mode: mode_to_pb(d.mode) as i32,
        generation: d.generation,
        origin: d.origin,
        owner: d.owner,
        epoch: d.epoch,
        pinned: d.pinned,
        readers: d.readers,
        lease_holders: d.lease_holders,
        known_blocks: d.known_blocks,
        total_blocks: d.total_blocks,
        lease_valid: d.lease_valid,
        coverage: d
            .coverage
            .into_iter()
            .map(|(member, blocks)| pb::MemberCoverage { member, blocks })
            .collect(),
    }
}

/// A disk as another member described it. An unknown mode is mutable: never cached.
pub fn info_from_pb(d: pb::DiskInfo) -> DiskInfo {
    DiskInfo {
        mode: match pb::DiskMode::try_from(d.mode) {
            Ok(pb::DiskMode::Sealed) => DiskMode::Sealed,
            Ok(pb::DiskMode::Detected) => DiskMode::Detected,
            _ => DiskMode::Mutable,
        },
        id: d.id,
        size_bytes: d.size_bytes,
        generation: d.generation,
        origin: d.origin,
        owner: d.owner,
        epoch: d.epoch,
        pinned: d.pinned,
        readers: d.readers,
        lease_holders: d.lease_holders,
        known_blocks: d.known_blocks,
        total_blocks: d.total_blocks,
        lease_valid: d.lease_valid,
        coverage: d
            .coverage
            .into_iter()
            .map(|c| (c.member, c.blocks))
            .collect(),
    }
}

fn status_to_pb(s: NodeStatus) -> pb::StatusResponse {
    let c = &s.counters;
    pb::StatusResponse {
        node_id: s.node_id,
        version: env!("CARGO_PKG_VERSION").to_string(),
        block_size: s.block_bytes,
        tiers: s
            .tiers
            .iter()
            .map(|t| pb::TierStatus {
                name: t.tier.as_str().to_string(),
                entries: t.entries,
                bytes: t.bytes,
                capacity_bytes: t.capacity_bytes,
                hits: t.hits,
                loading: t.loading,
            })
            .collect(),
        counters: Some(pb::CacheCounters {
            lookups: c.lookups,
            misses: c.misses,
            zero_block_hits: c.zero_block_hits,
            origin_reads: c.origin_reads,
            origin_read_bytes: c.origin_read_bytes,
            promotions: c.promotions,
            demotions: c.demotions,
            evictions: c.evictions,
            ssd_verify_failures: c.ssd_verify_failures,
            ssd_write_failures: c.ssd_write_failures,
            ssd_written_bytes: c.ssd_written_bytes,
            ssd_served_bytes: c.ssd_served_bytes,
            ssd_writes_saved: c.ssd_writes_saved,
            ssd_admissions_refused: c.ssd_admissions_refused,
            logical_bytes: c.logical_bytes,
            stored_bytes: c.stored_bytes,
            single_flight_joins: c.single_flight_joins,
            owner_reads: c.owner_reads,
            owner_read_bytes: c.owner_read_bytes,
            peer_reads: c.peer_reads,
            peer_read_bytes: c.peer_read_bytes,
            read_ahead_blocks: c.read_ahead_blocks,
            read_ahead_used: c.read_ahead_used,
        }),
        disks: s.disks.into_iter().map(info_to_pb).collect(),
        uptime_ms: s.uptime_ms,
        single_touch_share: s.single_touch_share,
        members: s
            .members
            .into_iter()
            .map(|m| pb::MemberInfo {
                id: m.id,
                peer_addr: m.peer_addr.to_string(),
                boot: m.boot,
            })
            .collect(),
        leases: Some(pb::LeaseCounters {
            grants: s.leases.grants,
            renewals: s.leases.renewals,
            expiries: s.leases.expiries,
            revocations: s.leases.revocations,
            revocation_wait_ms: s.leases.revocation_wait_ms,
            detections: s.leases.detections,
            peer_served_bytes: s.leases.peer_served_bytes,
            block_map_bytes: s.leases.block_map_bytes,
            block_map_traffic_bytes: s.leases.block_map_traffic_bytes,
            foreign_revocations: s.leases.foreign_revocations,
        }),
        policy: Some(policy_to_pb(&s.policy)),
        certificates: s
            .certificates
            .into_iter()
            .map(|c| pb::CertificateInfo {
                role: c.role,
                path: c.path.display().to_string(),
                subject: c.subject,
                not_after_unix: c.not_after_unix,
            })
            .collect(),
        disputed: s
            .disputed
            .into_iter()
            .map(|(disk, owners)| pb::DisputedDisk { disk, owners })
            .collect(),
    }
}

fn policy_to_pb(p: &crate::cache::PolicyState) -> pb::CachePolicy {
    let share = |b: u64| {
        if p.capacity_bytes == 0 {
            0.0
        } else {
            b as f64 / p.capacity_bytes as f64
        }
    };
    pb::CachePolicy {
        single_touch_target: p.single_share(),
        single_touch_min: share(p.single_min_bytes),
        single_touch_max: share(p.single_max_bytes),
        adaptive: p.adaptive,
        ghost_single_keys: p.ghost_single,
        ghost_multi_keys: p.ghost_multi,
        ghost_capacity: p.ghost_capacity,
        ghost_hits_single: p.counters.ghost_hits_single,
        ghost_hits_multi: p.counters.ghost_hits_multi,
        target_grew: p.counters.target_grew,
        target_shrank: p.counters.target_shrank,
        rules: p.variant.name().to_string(),
        rules_duel: p.duel,
        rules_switches: p.counters.variant_switches,
        shards: p.shards,
    }
}

/// Records one RPC: count, latency, payload bytes, and the error code if any.
pub fn observe<T>(rpc: &'static str, started: Instant, bytes: u64, r: &Result<T, Error>) {
    metrics::counter!(telemetry::RPC_REQUESTS, "rpc" => rpc).increment(1);
    metrics::histogram!(telemetry::RPC_SECONDS, "rpc" => rpc)
        .record(started.elapsed().as_secs_f64());
    match r {
        Ok(_) => {
            if bytes > 0 {
                metrics::counter!(telemetry::RPC_BYTES, "rpc" => rpc).increment(bytes);
            }
        }
        Err(e) => {
            let code = status(e).code();
            metrics::counter!(telemetry::RPC_ERRORS, "rpc" => rpc, "code" => code_label(code))
                .increment(1);
        }
    }
}

fn code_label(c: Code) -> &'static str {
    match c {
        Code::NotFound => "not_found",
        Code::InvalidArgument => "invalid_argument",
        Code::AlreadyExists => "already_exists",
        Code::OutOfRange => "out_of_range",
        Code::FailedPrecondition => "failed_precondition",
        Code::Unavailable => "unavailable",
        _ => "other",
    }
}

/// The Block and Admin services over one node.
#[derive(Debug, Clone)]
pub struct GrpcFrontend {
    node: Arc<Node>,
    /// Who may connect is decided elsewhere (the Unix socket's file mode): everything is
    /// served. Otherwise (TCP without TLS) only reads and stats of immutable disks are.
    trusted: bool,
}

/// Why TCP without TLS refuses a request.
const UNTRUSTED: &str = "gRPC over TCP without TLS serves reads of sealed and detected disks only; writes, reads of mutable disks and the Admin service are on the node's Unix socket";

impl GrpcFrontend {
    /// Serves `node`; `trusted`: everything, else reads of immutable disks only.
    pub fn new(node: Arc<Node>, trusted: bool) -> Self {
        GrpcFrontend { node, trusted }
    }

    fn trusted_only(&self, what: &str) -> Result<(), Status> {
        if self.trusted {
            return Ok(());
        }
        metrics::counter!(crate::telemetry::UNTRUSTED_REFUSED, "rpc" => what.to_string())
            .increment(1);
        Err(Status::permission_denied(format!("{what}: {UNTRUSTED}")))
    }

    /// An Admin call: on a trusted listener, and over TLS only with a certificate whose roles
    /// allow it (`admin`, or none named): a member's certificate that a host lost must not
    /// register paths or seal disks on every other node.
    fn admin_only<T>(&self, request: &Request<T>, what: &str) -> Result<(), Status> {
        self.trusted_only(what)?;
        let require = (self.node.config().cluster.tls.as_ref()).is_some_and(|t| t.require_roles);
        match super::conn::roles(request).map(|r| r.under(require)) {
            Some(roles) if !roles.may_admin() => {
                metrics::counter!(crate::telemetry::ROLE_REFUSED, "rpc" => what.to_string())
                    .increment(1);
                Err(Status::permission_denied(format!(
                    "{what}: this certificate's role is {}; the Admin service needs one issued with `shadowcache certs issue --role admin`",
                    roles.describe()
                )))
            }
            _ => Ok(()),
        }
    }

    /// An untrusted reader may read a disk only while it is immutable here.
    fn immutable_only(&self, disk: &str) -> Result<(), Status> {
        if self.trusted {
            return Ok(());
        }
        match self.node.stat(disk) {
            Ok(d) if matches!(d.mode, crate::DiskMode::Sealed | crate::DiskMode::Detected) => {
                Ok(())
            }
            Ok(_) => self.trusted_only("read of a mutable disk"),
            Err(e) => Err(status(&e)),
        }
    }
}

#[tonic::async_trait]
impl pb::block_server::Block for GrpcFrontend {
    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let t = Instant::now();
        self.immutable_only(&request.get_ref().disk)?;
        // The answer's bytes, held until the client has taken them (`conn.rs`); a length past
        // the per-call limit is refused below, so no more is ever held.
        let held = super::conn::hold(
            request.extensions(),
            request.get_ref().length.min(crate::read::MAX_IO_BYTES),
        )
        .await;
        let r = request.into_inner();
        let res = self.node.read(&r.disk, r.offset, r.length).await;
        observe("read", t, r.length, &res);
        res.map(|data| {
            super::conn::attach(
                Response::new(pb::ReadResponse {
                    data,
                    disks_version: 0,
                }),
                held,
            )
        })
        .map_err(|e| status(&e))
    }

    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.trusted_only("write")?;
        let t = Instant::now();
        let r = request.into_inner();
        let len = r.data.len() as u64;
        let res = self.node.write(&r.disk, r.offset, r.data).await;
        observe("write", t, len, &res);
        res.map(|()| {
            Response::new(pb::WriteResponse {
                host_boot: self.node.host_boot(),
            })
        })
        .map_err(|e| status(&e))
    }

    async fn flush(
        &self,
        request: Request<pb::FlushRequest>,
    ) -> Result<Response<pb::FlushResponse>, Status> {
        self.trusted_only("flush")?;
        let t = Instant::now();
        let r = request.into_inner();
        let res = self.node.flush(&r.disk).await;
        observe("flush", t, 0, &res);
        res.map(|()| {
            Response::new(pb::FlushResponse {
                host_boot: self.node.host_boot(),
            })
        })
        .map_err(|e| status(&e))
    }

    async fn stat(
        &self,
        request: Request<pb::StatRequest>,
    ) -> Result<Response<pb::StatResponse>, Status> {
        let t = Instant::now();
        let disk = request.into_inner().disk;
        // Untrusted TCP: stats of immutable disks only, as its reads (a mutable disk's stat
        // names its origin path, readers and lease holders; found in review).
        self.immutable_only(&disk)?;
        let res = self.node.stat(&disk);
        observe("stat", t, 0, &res);
        res.map(|d| {
            Response::new(pb::StatResponse {
                disk: Some(info_to_pb(d)),
            })
        })
        .map_err(|e| status(&e))
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for GrpcFrontend {
    async fn list_disks(
        &self,
        request: Request<pb::ListDisksRequest>,
    ) -> Result<Response<pb::ListDisksResponse>, Status> {
        self.admin_only(&request, "admin list_disks")?;
        let t = Instant::now();
        let disks = self.node.disks();
        observe::<()>("list_disks", t, 0, &Ok(()));
        Ok(Response::new(pb::ListDisksResponse {
            disks: disks.into_iter().map(info_to_pb).collect(),
        }))
    }

    async fn register_disk(
        &self,
        request: Request<pb::RegisterDiskRequest>,
    ) -> Result<Response<pb::RegisterDiskResponse>, Status> {
        self.admin_only(&request, "admin register_disk")?;
        let t = Instant::now();
        let r = request.into_inner();
        let res = async {
            let mode = if r.mode == pb::DiskMode::Unspecified as i32 {
                DiskMode::Mutable
            } else {
                mode_from_pb(r.mode)?
            };
            if r.origin.is_empty() {
                return Err(Error::Invalid("origin is empty".into()));
            }
            self.node.register(&r.id, Path::new(&r.origin), mode).await
        }
        .await;
        observe("register_disk", t, 0, &res);
        res.map(|d| {
            Response::new(pb::RegisterDiskResponse {
                disk: Some(info_to_pb(d)),
            })
        })
        .map_err(|e| status(&e))
    }

    async fn set_disk_mode(
        &self,
        request: Request<pb::SetDiskModeRequest>,
    ) -> Result<Response<pb::SetDiskModeResponse>, Status> {
        self.admin_only(&request, "admin set_disk_mode")?;
        let t = Instant::now();
        let r = request.into_inner();
        let res = async {
            let mode = mode_from_pb(r.mode)?;
            self.node.set_mode(&r.disk, mode).await
        }
        .await;
        observe("set_disk_mode", t, 0, &res);
        res.map(|d| {
            Response::new(pb::SetDiskModeResponse {
                disk: Some(info_to_pb(d)),
            })
        })
        .map_err(|e| status(&e))
    }

    async fn forget_claimant(
        &self,
        request: Request<pb::ForgetClaimantRequest>,
    ) -> Result<Response<pb::ForgetClaimantResponse>, Status> {
        self.admin_only(&request, "admin forget_claimant")?;
        let t = Instant::now();
        let r = request.into_inner();
        let res = self.node.forget_claimant(&r.disk, &r.member);
        observe("forget_claimant", t, 0, &res);
        res.map(|owners| Response::new(pb::ForgetClaimantResponse { owners }))
            .map_err(|e| status(&e))
    }

    async fn set_detection(
        &self,
        request: Request<pb::SetDetectionRequest>,
    ) -> Result<Response<pb::SetDetectionResponse>, Status> {
        self.admin_only(&request, "admin set_detection")?;
        let t = Instant::now();
        let r = request.into_inner();
        let res = async {
            let action = match pb::DetectionAction::try_from(r.action) {
                Ok(pb::DetectionAction::Pin) => crate::DetectionAction::Pin,
                Ok(pb::DetectionAction::Unpin) => crate::DetectionAction::Unpin,
                Ok(pb::DetectionAction::DropShadows) => crate::DetectionAction::DropShadows,
                _ => {
                    return Err(Error::Invalid(format!(
                        "detection action {} is not PIN, UNPIN or DROP_SHADOWS",
                        r.action
                    )));
                }
            };
            self.node.set_detection(&r.disk, action).await
        }
        .await;
        observe("set_detection", t, 0, &res);
        res.map(|d| {
            Response::new(pb::SetDetectionResponse {
                disk: Some(info_to_pb(d)),
            })
        })
        .map_err(|e| status(&e))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.admin_only(&request, "admin status")?;
        let t = Instant::now();
        let s = self.node.status();
        observe::<()>("status", t, 0, &Ok(()));
        Ok(Response::new(status_to_pb(s)))
    }
}

/// The services on one listener. Admin (which opens host paths as origins) is served where
/// `trusted` says: the Unix socket, whose file mode limits who may connect, and TCP over
/// mutual TLS (any certificate of the cluster's CA). TCP without TLS refuses it.
/// HTTP/2 streams a client connection may have open at once.
pub const CLIENT_STREAMS: u32 = 256;
/// Requests of one client connection handled at once (the rest wait their turn).
pub const CLIENT_REQUESTS: usize = 32;

/// The services of a client listener, each answer under `conn.rs`'s limits.
type Routed = tonic::transport::server::Router<
    tower::layer::util::Stack<super::conn::AnswersLayer, tower::layer::util::Identity>,
>;

pub(crate) fn router(node: Arc<Node>, trusted: bool) -> Routed {
    match router_with(node, trusted, None) {
        Ok(r) => r,
        Err(e) => unreachable!("no TLS, no TLS error: {e}"),
    }
}

fn router_with(
    node: Arc<Node>,
    trusted: bool,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> anyhow::Result<Routed> {
    let fe = GrpcFrontend::new(node, trusted);
    let max = pb::MAX_MESSAGE_BYTES;
    // Served on TCP too, where every call is refused with the reason (not UNIMPLEMENTED with
    // no message).
    let admin = pb::admin_server::AdminServer::new(fe.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("tcp tls configuration")?;
    }
    Ok(builder
        .layer(super::conn::AnswersLayer)
        .http2_keepalive_interval(Some(super::conn::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(super::conn::KEEPALIVE_TIMEOUT))
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        // Bounded per connection: streams open, and requests handled at once (a request is
        // read only once it is handled, so at most this many messages of up to 16 MiB are held
        // per connection; HTTP/2 flow control holds the rest back at the client).
        .max_concurrent_streams(Some(CLIENT_STREAMS))
        .concurrency_limit_per_connection(CLIENT_REQUESTS)
        .add_service(
            pb::block_server::BlockServer::new(fe)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(admin))
}

/// Binds the Unix socket: creates its directory, replaces a stale socket file (refusing if a
/// live node answers on it), and sets mode 0660.
pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the socket directory {}", dir.display()))?;
    }
    // symlink_metadata: a link at the path is not followed, and is not a socket.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket: refusing to replace it (a typo in the socket path?)",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{}: another process is serving on this socket",
                path.display()
            );
        }
        // A socket nobody serves: left by a node that stopped without removing it.
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    // Bound under a name of its own, given its mode, and only then moved to `path`: a socket
    // bound at `path` is open to connections before a chmod could narrow it (with the
    // process's umask, to anyone for a moment). The move never replaces a file: a process
    // that bound `path` meanwhile keeps it.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "socket".into());
    let staged = dir.join(format!(
        ".{name}.{}.{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let l = UnixListener::bind(&staged)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    let placed = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set mode 0660 on {}", path.display()))
        .and_then(|()| {
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                &staged,
                rustix::fs::CWD,
                path,
                rustix::fs::RenameFlags::NOREPLACE,
            )
            .map_err(|e| {
                if e == rustix::io::Errno::EXIST {
                    anyhow::anyhow!(
                        "{}: another process bound this socket while this node started",
                        path.display()
                    )
                } else {
                    anyhow::anyhow!("cannot place the socket at {}: {e}", path.display())
                }
            })
        });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    Ok(l)
}

pub(crate) async fn until_stopped(mut stopped: tokio::sync::watch::Receiver<bool>) {
    while !*stopped.borrow() {
        if stopped.changed().await.is_err() {
            return;
        }
    }
}

/// Serves gRPC on a bound Unix socket until `stopped` turns true.
pub async fn serve_unix(
    node: Arc<Node>,
    listener: UnixListener,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let incoming = super::conn::Limits::unix().incoming(listener);
    router(node, true)
        .serve_with_incoming_shutdown(incoming, until_stopped(stopped))
        .await
        .context("grpc server on the unix socket")
}

/// Serves gRPC on a bound TCP listener until `stopped` turns true. With `tls` (the cluster's,
/// `[cluster.tls]`), only clients with a certificate the cluster's CA signed get in, and they
/// are served everything; without, reads of immutable disks only.
pub async fn serve_tcp(
    node: Arc<Node>,
    listener: TcpListener,
    tls: Option<super::tls::PeerTls>,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener_addr = listener.local_addr().ok();
    let incoming = super::conn::Limits::tcp().incoming(listener);
    if let Some(tls) = tls {
        tracing::info!(addr = ?listener_addr, "gRPC on TCP over mutual TLS (clients need a certificate from the cluster's CA)");
        return router_with(node, true, Some(tls.server))?
            .serve_with_incoming_shutdown(incoming, until_stopped(stopped))
            .await
            .context("grpc server on tcp (tls)");
    }
    tracing::warn!(
        addr = ?listener_addr,
        "gRPC on TCP without TLS: only reads of sealed and detected disks are served there"
    );
    router(node, false)
        .serve_with_incoming_shutdown(incoming, until_stopped(stopped))
        .await
        .context("grpc server on tcp")
}

/// The default socket path for a data directory.
pub fn default_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("shadowcache.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket is bound under another name and moved into place with its mode set: at its
    /// path it never had another mode, nothing is left beside it, and a second node on the
    /// same path is refused while the first serves.
    #[tokio::test]
    async fn the_socket_appears_at_its_path_with_mode_0660_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run").join("node.sock");
        let listener = bind_unix(&path).expect("bind");
        let mode = std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o660);
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("read dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["node.sock"], "something left beside the socket");
        // It serves at its path.
        let connect = tokio::net::UnixStream::connect(&path);
        let (accepted, connected) = tokio::join!(listener.accept(), connect);
        accepted.expect("accept");
        connected.expect("connect");
        let err = bind_unix(&path).expect_err("a second node on a live socket");
        assert!(err.to_string().contains("another process"), "{err}");
        assert_eq!(
            std::fs::read_dir(path.parent().expect("dir"))
                .expect("read dir")
                .count(),
            1
        );
    }
}

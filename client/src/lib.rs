//! Rust client for a shadowcache node's Block and Admin services.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shadowcache_client::ClientError> {
//! let client = shadowcache_client::Client::connect_unix("/var/lib/shadowcache/shadowcache.sock").await?;
//! let disk = client.disk("replica");
//! let bytes = disk.read_at(4096, 512).await?;
//! # Ok(()) }
//! ```
//!
//! Ranges of any size and alignment are accepted: requests above the protocol's per-request
//! limit (16 MiB) are split and sent concurrently, and the pieces joined. Errors keep the
//! node's gRPC code ([`ClientError::code`]), e.g. `NotFound` for an unknown disk.

use std::path::{Path, PathBuf};

pub mod certs;

use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use shadowcache_proto as pb;
use tonic::transport::{Channel, Endpoint, Uri};

pub use pb::{
    CacheCounters, CertificateInfo, DetectionAction, DiskInfo, DiskMode, LeaseCounters, MemberInfo,
    StatusResponse, TierStatus,
};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node could not be reached.
    #[error("cannot connect to shadowcache node at {target}: {source}")]
    Connect {
        /// The socket path or address.
        target: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The node answered with an error.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    /// A TLS file could not be read.
    #[error("tls: {0}")]
    Tls(String),
}

/// PEM files for TLS to a node's TCP listener: the cluster's CA, a certificate it signed (the
/// node requires one) with its key, and the name the node's certificate carries.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The cluster's CA certificate.
    pub ca: PathBuf,
    /// This client's certificate, signed by that CA.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The name in the node's certificate (`cluster.tls.server_name`).
    pub server_name: String,
}

// Not `#[from]`: that would make the status the error's source, and every report would print
// tonic's own rendering of it after ours.
impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status(s)
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    match c {
        tonic::Code::NotFound => "not found",
        tonic::Code::OutOfRange => "out of range",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::Unavailable => "unavailable",
        _ => "error",
    }
}

impl ClientError {
    /// The gRPC code: `Unavailable` for connection failures.
    pub fn code(&self) -> tonic::Code {
        match self {
            ClientError::Connect { .. } => tonic::Code::Unavailable,
            ClientError::Status(s) => s.code(),
            ClientError::Tls(_) => tonic::Code::InvalidArgument,
        }
    }
}

/// Shorthand.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A connection to one node. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    block: pb::block_client::BlockClient<Channel>,
    admin: pb::admin_client::AdminClient<Channel>,
}

impl Client {
    fn from_channel(channel: Channel) -> Client {
        let max = pb::MAX_MESSAGE_BYTES;
        Client {
            block: pb::block_client::BlockClient::new(channel.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            admin: pb::admin_client::AdminClient::new(channel)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        }
    }

    fn endpoint(uri: &'static str) -> Endpoint {
        Endpoint::from_static(uri)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .tcp_nodelay(true)
    }

    /// Connects to a node's Unix socket.
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Client> {
        let path: PathBuf = path.as_ref().to_path_buf();
        let target = path.display().to_string();
        // The URI is required by the API but unused: the connector dials the socket.
        let channel = Self::endpoint("http://shadowcache.local")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(s))
                }
            }))
            .await
            .map_err(|source| ClientError::Connect { target, source })?;
        Ok(Self::from_channel(channel))
    }

    /// Connects to a node's TCP address (`host:port` or `http://host:port`). Without TLS a
    /// node serves reads of sealed and detected disks only there.
    pub async fn connect_tcp(addr: &str) -> Result<Client> {
        Self::connect_tcp_with(addr, None).await
    }

    /// Connects to a node's TCP address over mutual TLS (a node with `[cluster.tls]` requires
    /// it, and then serves everything there).
    pub async fn connect_tcp_tls(addr: &str, tls: &TlsFiles) -> Result<Client> {
        Self::connect_tcp_with(addr, Some(tls)).await
    }

    async fn connect_tcp_with(addr: &str, tls: Option<&TlsFiles>) -> Result<Client> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        // An https address asks for TLS: without it the connection would go in plaintext.
        if tls.is_none() && addr.starts_with("https://") {
            return Err(ClientError::Tls(format!(
                "{addr}: an https address needs TLS files (connect_tcp_tls)"
            )));
        }
        let uri = match addr.split_once("://") {
            Some((_, rest)) => format!("{scheme}://{rest}"),
            None => format!("{scheme}://{addr}"),
        };
        let mut endpoint = Endpoint::from_shared(uri).map_err(|source| ClientError::Connect {
            target: addr.to_string(),
            source,
        })?;
        if let Some(t) = tls {
            let read = |p: &Path| {
                std::fs::read(p).map_err(|e| ClientError::Tls(format!("{}: {e}", p.display())))
            };
            let config = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(&t.ca)?))
                .identity(tonic::transport::Identity::from_pem(
                    read(&t.cert)?,
                    read(&t.key)?,
                ))
                .domain_name(t.server_name.clone());
            endpoint = endpoint
                .tls_config(config)
                .map_err(|source| ClientError::Connect {
                    target: addr.to_string(),
                    source,
                })?;
        }
        let channel = endpoint
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                target: addr.to_string(),
                source,
            })?;
        Ok(Self::from_channel(channel))
    }

    /// A handle on one disk.
    pub fn disk(&self, id: &str) -> Disk {
        Disk {
            client: self.clone(),
            id: id.to_string(),
        }
    }

    /// Every disk of the node.
    pub async fn list_disks(&self) -> Result<Vec<DiskInfo>> {
        let r = self
            .admin
            .clone()
            .list_disks(pb::ListDisksRequest {})
            .await?;
        Ok(r.into_inner().disks)
    }

    /// Registers a disk whose origin is a file or block device on the node's host.
    pub async fn register_disk(&self, id: &str, origin: &str, mode: DiskMode) -> Result<DiskInfo> {
        let r = self
            .admin
            .clone()
            .register_disk(pb::RegisterDiskRequest {
                id: id.to_string(),
                origin: origin.to_string(),
                mode: mode as i32,
            })
            .await?;
        Ok(r.into_inner().disk.unwrap_or_default())
    }

    /// Changes a disk's mode (mutable -> sealed).
    pub async fn set_disk_mode(&self, id: &str, mode: DiskMode) -> Result<DiskInfo> {
        let r = self
            .admin
            .clone()
            .set_disk_mode(pb::SetDiskModeRequest {
                disk: id.to_string(),
                mode: mode as i32,
            })
            .await?;
        Ok(r.into_inner().disk.unwrap_or_default())
    }

    /// Pins a disk this node owns mutable, unpins it, or drops its shadow clones.
    pub async fn set_detection(&self, id: &str, action: DetectionAction) -> Result<DiskInfo> {
        let r = self
            .admin
            .clone()
            .set_detection(pb::SetDetectionRequest {
                disk: id.to_string(),
                action: action as i32,
            })
            .await?;
        Ok(r.into_inner().disk.unwrap_or_default())
    }

    /// Ends the node's memory of `member` as a claimant of `disk` that left the cluster: the
    /// members that claim the disk there now.
    pub async fn forget_claimant(&self, disk: &str, member: &str) -> Result<Vec<String>> {
        let r = self
            .admin
            .clone()
            .forget_claimant(pb::ForgetClaimantRequest {
                disk: disk.to_string(),
                member: member.to_string(),
            })
            .await?;
        Ok(r.into_inner().owners)
    }

    /// The node's cache tiers, counters and disks.
    pub async fn status(&self) -> Result<StatusResponse> {
        Ok(self
            .admin
            .clone()
            .status(pb::StatusRequest {})
            .await?
            .into_inner())
    }
}

/// Pieces of one long read or write in flight at once.
pub const PIECES_IN_FLIGHT: usize = 8;

/// A range whose end does not fit in 64 bits: refused before anything is sent (the sums of
/// offsets and lengths below then cannot wrap).
fn check_range(offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(_) => Ok(()),
        None => Err(ClientError::Status(tonic::Status::out_of_range(format!(
            "offset {offset} + length {len} is past 2^64"
        )))),
    }
}

/// One disk of a node.
#[derive(Debug, Clone)]
pub struct Disk {
    client: Client,
    id: String,
}

impl Disk {
    /// The disk's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Reads `len` bytes at `offset`: a range past 2^64 is OUT_OF_RANGE before anything is
    /// sent; a long one goes in pieces of at most [`pb::MAX_IO_BYTES`], [`PIECES_IN_FLIGHT`]
    /// at a time (a range past the disk's end fails at its first piece past it, having held
    /// no more than that).
    pub async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        use futures::{StreamExt, TryStreamExt};
        check_range(offset, len)?;
        let max = pb::MAX_IO_BYTES;
        if len <= max {
            return self.read_one(offset, len).await;
        }
        let pieces = futures::stream::iter(0..len.div_ceil(max))
            .map(|n| {
                let at = n * max;
                self.read_one(offset + at, max.min(len - at))
            })
            .buffered(PIECES_IN_FLIGHT);
        let out = pieces
            .try_fold(BytesMut::new(), |mut out, p| async move {
                out.extend_from_slice(&p);
                Ok(out)
            })
            .await?;
        Ok(out.freeze())
    }

    async fn read_one(&self, offset: u64, length: u64) -> Result<Bytes> {
        let r = self
            .client
            .block
            .clone()
            .read(pb::ReadRequest {
                disk: self.id.clone(),
                offset,
                length,
            })
            .await?;
        Ok(r.into_inner().data)
    }

    /// Writes `data` at `offset`. Durable once [`Disk::flush`] returns. A long write goes in
    /// pieces, [`PIECES_IN_FLIGHT`] at a time.
    pub async fn write_at(&self, offset: u64, data: impl Into<Bytes>) -> Result<()> {
        use futures::{StreamExt, TryStreamExt};
        let data: Bytes = data.into();
        check_range(offset, data.len() as u64)?;
        let max = pb::MAX_IO_BYTES as usize;
        if data.len() <= max {
            return self.write_one(offset, data).await;
        }
        futures::stream::iter(0..data.len().div_ceil(max))
            .map(|n| {
                let at = n * max;
                self.write_one(offset + at as u64, data.slice(at..data.len().min(at + max)))
            })
            .buffer_unordered(PIECES_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    async fn write_one(&self, offset: u64, data: Bytes) -> Result<()> {
        self.client
            .block
            .clone()
            .write(pb::WriteRequest {
                disk: self.id.clone(),
                offset,
                data,
            })
            .await?;
        Ok(())
    }

    /// Makes every acknowledged write durable.
    pub async fn flush(&self) -> Result<()> {
        self.client
            .block
            .clone()
            .flush(pb::FlushRequest {
                disk: self.id.clone(),
            })
            .await?;
        Ok(())
    }

    /// Size, mode and generation.
    pub async fn stat(&self) -> Result<DiskInfo> {
        let r = self
            .client
            .block
            .clone()
            .stat(pb::StatRequest {
                disk: self.id.clone(),
            })
            .await?;
        Ok(r.into_inner().disk.unwrap_or_default())
    }
}

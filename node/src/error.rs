//! The node's error type: what failed and with which input. Converted to a `tonic::Status` only
//! in the frontend (`frontend/grpc.rs`), with one code per kind, documented in the proto file.

use crate::origin::OriginError;

/// Everything a request to the node can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No disk has this id.
    #[error("unknown disk {0:?}")]
    UnknownDisk(String),
    /// A disk id that is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error(
        "invalid disk id {0:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ - (not starting with '.')"
    )]
    InvalidDiskId(String),
    /// Registering an id that is taken.
    #[error("disk {0:?} is already registered")]
    DiskExists(String),
    /// A range that ends past the end of the disk.
    #[error("range {offset}+{len} is past the end of disk {disk:?} ({size} bytes)")]
    OutOfRange {
        /// The disk.
        disk: String,
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The disk's size.
        size: u64,
    },
    /// One request larger than the protocol allows.
    #[error("request of {len} bytes exceeds the limit of {max} bytes per request")]
    TooLarge {
        /// Bytes asked for.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A write to a sealed (or sealing) disk.
    #[error("disk is sealed: {0:?} is read-only")]
    Sealed(String),
    /// Unsealing a sealed disk.
    #[error("disk {0:?} is sealed for ever and cannot become mutable")]
    Unseal(String),
    /// A request that makes no sense (an unspecified mode, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The origin failed; nothing read from it was cached.
    #[error(transparent)]
    Origin(#[from] OriginError),
    /// A request named a generation of a disk that is not its current one.
    #[error("stale generation for disk {disk:?}: asked {asked}, current {current}")]
    StaleGeneration {
        /// The disk.
        disk: String,
        /// The generation asked for.
        asked: u64,
        /// The current generation.
        current: u64,
    },
    /// A disk's owner could not be reached or could not serve the request.
    #[error("owner {node} is unavailable: {cause}")]
    Peer {
        /// The owner's node id.
        node: String,
        /// What went wrong.
        cause: String,
    },
    /// A write found the disk detected-immutable: its leases must be revoked first. Handled
    /// inside the node (never sent to a client).
    #[error("disk {0:?} is detected-immutable; its leases are being revoked")]
    Detected(String),
    /// A lease on a disk that is not detected at the generation asked for.
    #[error("no lease on disk {disk:?}: {why}")]
    NoLease {
        /// The disk.
        disk: String,
        /// Why.
        why: String,
    },
    /// The node's own state (data directory) could not be written.
    #[error("node state: {0}")]
    State(String),
}

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;

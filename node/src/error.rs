//! The node's error type: what failed and with which input.
//!
//! Every error has a [`ErrorKind`] (which variant) and a [`Code`] (the protocol's status code,
//! documented in the proto file). `frontend/status.rs` turns them into a `tonic::Status` and
//! back, in one map used in both directions: an error a member answered comes back as
//! [`Error::Remote`] with the same kind, code and message, never as another kind.
//!
//! Architecture invariant: no protocol type here; the frontends translate.

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
    /// A forwarded write that reached the owner after the time its sender waits for it: it
    /// was not applied (the sender has told its client it failed).
    #[error(
        "write of disk {disk:?} reached its owner {late_ms} ms after its deadline and was not applied"
    )]
    Late {
        /// The disk.
        disk: String,
        /// How late it was.
        late_ms: u64,
    },
    /// Several members own a disk of this id: it is served by none of them until all but one
    /// drop it, so that no member can take another's disk by naming the same id.
    #[error(
        "disk {disk:?} is owned by several members ({}): it is served by none of them until all but one drop it (restart the wrong ones without it)",
        owners.join(", ")
    )]
    Disputed {
        /// The disk.
        disk: String,
        /// The members that own it.
        owners: Vec<String>,
    },
    /// Writes an owner acknowledged may be lost: a flush could not cover them (the owner's
    /// host restarted since, or the disk moved to another owner). Not worth retrying.
    #[error("{0}")]
    LostWrites(String),
    /// An error another member answered, kept as it was sent: its kind and message.
    #[error("{message}")]
    Remote {
        /// The member that answered.
        node: String,
        /// The kind of error it reported.
        kind: ErrorKind,
        /// Its message.
        message: String,
    },
}

impl From<crate::ids::InvalidDiskId> for Error {
    fn from(e: crate::ids::InvalidDiskId) -> Self {
        Error::InvalidDiskId(e.0)
    }
}

/// Which [`Error`] variant an error is, as carried between members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// [`Error::UnknownDisk`].
    UnknownDisk,
    /// [`Error::InvalidDiskId`].
    InvalidDiskId,
    /// [`Error::DiskExists`].
    DiskExists,
    /// [`Error::OutOfRange`].
    OutOfRange,
    /// [`Error::TooLarge`].
    TooLarge,
    /// [`Error::Sealed`].
    Sealed,
    /// [`Error::Unseal`].
    Unseal,
    /// [`Error::Invalid`].
    Invalid,
    /// [`Error::Origin`].
    Origin,
    /// [`Error::StaleGeneration`].
    StaleGeneration,
    /// [`Error::Peer`].
    Peer,
    /// [`Error::NoLease`].
    NoLease,
    /// [`Error::State`].
    State,
    /// [`Error::Late`].
    Late,
    /// [`Error::LostWrites`].
    LostWrites,
    /// [`Error::Disputed`].
    Disputed,
}

/// The protocol's status codes for errors (gRPC's names and meanings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// No such disk.
    NotFound,
    /// The request is malformed.
    InvalidArgument,
    /// The id is taken.
    AlreadyExists,
    /// Past the end of the disk.
    OutOfRange,
    /// The disk's state refuses it (sealed, no lease).
    FailedPrecondition,
    /// Retry: an origin or member could not serve it now.
    Unavailable,
    /// The node's own state failed.
    Internal,
    /// A generation that is over.
    Aborted,
    /// Acknowledged data may be lost.
    DataLoss,
}

impl ErrorKind {
    /// Every kind, for the round-trip tests of the maps.
    pub const ALL: [ErrorKind; 16] = [
        ErrorKind::UnknownDisk,
        ErrorKind::InvalidDiskId,
        ErrorKind::DiskExists,
        ErrorKind::OutOfRange,
        ErrorKind::TooLarge,
        ErrorKind::Sealed,
        ErrorKind::Unseal,
        ErrorKind::Invalid,
        ErrorKind::Origin,
        ErrorKind::StaleGeneration,
        ErrorKind::Peer,
        ErrorKind::NoLease,
        ErrorKind::State,
        ErrorKind::Late,
        ErrorKind::LostWrites,
        ErrorKind::Disputed,
    ];

    /// The kind's name on the wire (lowercase, stable).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::UnknownDisk => "unknown_disk",
            ErrorKind::InvalidDiskId => "invalid_disk_id",
            ErrorKind::DiskExists => "disk_exists",
            ErrorKind::OutOfRange => "out_of_range",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Sealed => "sealed",
            ErrorKind::Unseal => "unseal",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Origin => "origin",
            ErrorKind::StaleGeneration => "stale_generation",
            ErrorKind::Peer => "peer",
            ErrorKind::NoLease => "no_lease",
            ErrorKind::State => "state",
            ErrorKind::Late => "late",
            ErrorKind::LostWrites => "lost_writes",
            ErrorKind::Disputed => "disputed",
        }
    }

    /// The kind named `s` on the wire.
    pub fn parse(s: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The status code of this kind: the one place it is decided.
    pub fn code(self) -> Code {
        match self {
            ErrorKind::UnknownDisk => Code::NotFound,
            ErrorKind::InvalidDiskId | ErrorKind::Invalid | ErrorKind::TooLarge => {
                Code::InvalidArgument
            }
            ErrorKind::DiskExists => Code::AlreadyExists,
            ErrorKind::OutOfRange => Code::OutOfRange,
            ErrorKind::Sealed | ErrorKind::Unseal | ErrorKind::NoLease | ErrorKind::Disputed => {
                Code::FailedPrecondition
            }
            ErrorKind::Origin | ErrorKind::Peer | ErrorKind::Late => Code::Unavailable,
            ErrorKind::State => Code::Internal,
            ErrorKind::StaleGeneration => Code::Aborted,
            ErrorKind::LostWrites => Code::DataLoss,
        }
    }
}

impl Error {
    /// Which variant this is (for a [`Error::Remote`], the kind the member reported).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::UnknownDisk(_) => ErrorKind::UnknownDisk,
            Error::InvalidDiskId(_) => ErrorKind::InvalidDiskId,
            Error::DiskExists(_) => ErrorKind::DiskExists,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::TooLarge { .. } => ErrorKind::TooLarge,
            Error::Sealed(_) => ErrorKind::Sealed,
            Error::Unseal(_) => ErrorKind::Unseal,
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::Origin(_) => ErrorKind::Origin,
            Error::StaleGeneration { .. } => ErrorKind::StaleGeneration,
            Error::Peer { .. } => ErrorKind::Peer,
            Error::NoLease { .. } => ErrorKind::NoLease,
            Error::State(_) => ErrorKind::State,
            Error::Late { .. } => ErrorKind::Late,
            Error::LostWrites(_) => ErrorKind::LostWrites,
            Error::Disputed { .. } => ErrorKind::Disputed,
            Error::Remote { kind, .. } => *kind,
        }
    }

    /// The status code clients see.
    pub fn code(&self) -> Code {
        self.kind().code()
    }
}

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! Origins: where a disk's authoritative bytes live.
//!
//! `Origin` is the one interface the read and write paths use; `file.rs` implements it for a raw
//! image file or a block device, `nbd.rs` for an NBD export. (A disk another member owns is
//! fetched by `cluster/fetch.rs`, which the read path calls itself.) `limit.rs` paces a node's
//! reads of its origins (`[origin_limit]`). Methods are async and
//! return boxed futures so that an origin can be a file on a blocking pool or a network export.
//!
//! Architecture invariant: an origin returns exactly the bytes asked for or an error; a short
//! read is an error, never a short buffer, so nothing partial can be cached.

pub mod file;
pub mod limit;
pub mod nbd;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

pub use file::FileOrigin;
pub use limit::{Limiter, OriginLimit};
pub use nbd::NbdOrigin;

/// A boxed future returned by origin methods.
pub type OriginFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, OriginError>> + Send + 'a>>;

/// Why an origin could not serve a request. Always reported as UNAVAILABLE with the cause.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OriginError {
    /// The origin could not be opened or sized.
    #[error("cannot open origin {origin}: {cause}")]
    Open {
        /// The origin as registered.
        origin: String,
        /// What the system said.
        cause: String,
    },
    /// A read, write or flush failed (EIO, a vanished device, ...).
    #[error("origin {origin}: {op} at offset {offset} failed: {cause}")]
    Io {
        /// The origin as registered.
        origin: String,
        /// read, write or flush.
        op: &'static str,
        /// Byte offset of the request.
        offset: u64,
        /// What the system said.
        cause: String,
    },
    /// The origin ended before the requested range did (it shrank behind our back).
    #[error(
        "origin {origin} is shorter than its registered size: read of {len} bytes at {offset} came back short"
    )]
    Short {
        /// The origin as registered.
        origin: String,
        /// Byte offset of the request.
        offset: u64,
        /// Bytes asked for.
        len: u64,
    },
}

/// Puts something in front of every origin a disk is registered with, given the disk's id
/// (tests and the simulation: an origin that fails or is slow on demand).
#[derive(Clone)]
pub struct OriginWrap(pub Arc<WrapFn>);

/// What an [`OriginWrap`] calls: the disk's id and its origin in, the origin to use out.
pub type WrapFn = dyn Fn(&str, Arc<dyn Origin>) -> Arc<dyn Origin> + Send + Sync;

impl std::fmt::Debug for OriginWrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OriginWrap")
    }
}

/// The authoritative bytes of one disk.
pub trait Origin: Send + Sync + std::fmt::Debug + 'static {
    /// The origin as registered, for messages.
    fn describe(&self) -> &str;

    /// Size in bytes, fixed at open.
    fn size(&self) -> u64;

    /// Reads exactly `len` bytes at `offset`.
    fn read_at(&self, offset: u64, len: usize) -> OriginFuture<'_, Bytes>;

    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: Bytes) -> OriginFuture<'_, ()>;

    /// Makes every completed write durable.
    fn flush(&self) -> OriginFuture<'_, ()>;

    /// A string that changes whenever the origin may have been changed while we were not
    /// looking (device, inode, size, modification time). Used to trust a saved content map.
    fn identity(&self) -> Option<String>;
}

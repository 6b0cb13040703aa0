//! A disk owned by another member, seen as an origin: reads go to the owner's Peer service.
//!
//! A node caches a sealed disk that another member owns by serving it through its own read path
//! over this origin: the bytes come straight from the owner (who reads them through its own
//! cache), and this node's content map and cache take them from there. Writes are refused here
//! (a sealed disk takes none; mutable remote disks are forwarded, never cached).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

use super::{Origin, OriginError, OriginFuture};
use crate::cluster::Peers;

/// A remote owner's disk.
#[derive(Debug)]
pub struct PeerOrigin {
    peers: Arc<Peers>,
    owner: String,
    addr: SocketAddr,
    disk: String,
    size: u64,
    describe: String,
}

impl PeerOrigin {
    /// Disk `disk` of `size` bytes, owned by `owner` at `addr`.
    pub fn new(peers: Arc<Peers>, owner: &str, addr: SocketAddr, disk: &str, size: u64) -> Self {
        PeerOrigin {
            peers,
            owner: owner.to_string(),
            addr,
            describe: format!("peer://{owner}/{disk}"),
            disk: disk.to_string(),
            size,
        }
    }

    fn error(&self, op: &'static str, offset: u64, cause: String) -> OriginError {
        OriginError::Io {
            origin: self.describe.clone(),
            op,
            offset,
            cause,
        }
    }
}

impl Origin for PeerOrigin {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> OriginFuture<'_, Bytes> {
        Box::pin(async move {
            let b = self
                .peers
                .read(&self.owner, self.addr, &self.disk, offset, len as u64)
                .await
                .map_err(|e| self.error("read", offset, e.to_string()))?;
            if b.len() != len {
                return Err(OriginError::Short {
                    origin: self.describe.clone(),
                    offset,
                    len: len as u64,
                });
            }
            Ok(b)
        })
    }

    fn write_at(&self, offset: u64, _data: Bytes) -> OriginFuture<'_, ()> {
        Box::pin(async move {
            Err(self.error(
                "write",
                offset,
                "a shadow of a remote disk takes no writes".into(),
            ))
        })
    }

    fn flush(&self) -> OriginFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn identity(&self) -> Option<String> {
        None
    }

    fn is_remote(&self) -> bool {
        true
    }
}

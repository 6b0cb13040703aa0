//! The write path: writes and flushes of mutable disks, which this node owns.
//!
//! A sealed disk (or one being sealed) refuses writes with "disk is sealed". A write to a
//! mutable disk goes straight to the origin; it is durable once a later flush returns. Mutable
//! disks are never cached, so a write invalidates nothing. A write that finds the disk
//! detected-immutable (or its leases being revoked) comes back as [`Error::Detected`]: the node
//! ends the detection (every lease revoked, see `Node::end_detection`) and tries again.
//!
//! Architecture invariant: every write holds the disk's in-flight guard for its whole duration,
//! so a seal never completes while a write it did not refuse is still running.

use std::sync::Arc;

use bytes::Bytes;

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::read::check_range;

/// Writes `data` at `offset` of `disk`.
///
/// The write runs in a task of its own that holds the disk's write guard until the origin has
/// the bytes: a caller that goes away (a cancelled RPC) cannot let a seal slip in before a write
/// that is still landing.
pub async fn write(disk: &Arc<Disk>, offset: u64, data: Bytes) -> Result<()> {
    check_range(disk, offset, data.len() as u64)?;
    let Some(guard) = disk.begin_write()? else {
        return Err(Error::Detected(disk.id.to_string()));
    };
    if data.is_empty() {
        return Ok(());
    }
    let d = disk.clone();
    let landed = tokio::spawn(async move {
        let _held = guard;
        d.origin.write_at(offset, data).await
    })
    .await
    .map_err(|e| Error::State(format!("write task: {e}")))?;
    landed.map_err(|e| {
        tracing::warn!(disk = %disk.id, error = %e, "origin write failed");
        e.into()
    })
}

/// Makes every acknowledged write of `disk` durable. A sealed disk was flushed when sealed.
pub async fn flush(disk: &Disk) -> Result<()> {
    // Only a fully sealed disk can skip the flush: one still sealing may hold writes that
    // its seal has not flushed yet.
    if disk.state() == crate::disk::DiskState::Sealed {
        return Ok(());
    }
    disk.origin.flush().await.map_err(Into::into)
}

//! The write path: writes and flushes of mutable disks, which this node owns.
//!
//! A sealed disk (or one being sealed) refuses writes with "disk is sealed". A write to a
//! mutable disk goes straight to the origin; it is durable once a later flush returns. Mutable
//! disks are never cached, so a write invalidates nothing. (Detected-immutable disks, leases and
//! revocation come with the cluster work and will live here too.)
//!
//! Architecture invariant: every write holds the disk's in-flight guard for its whole duration,
//! so a seal never completes while a write it did not refuse is still running.

use bytes::Bytes;

use crate::disk::Disk;
use crate::error::Result;
use crate::read::check_range;

/// Writes `data` at `offset` of `disk`.
pub async fn write(disk: &Disk, offset: u64, data: Bytes) -> Result<()> {
    check_range(disk, offset, data.len() as u64)?;
    let _guard = disk.begin_write()?;
    if data.is_empty() {
        return Ok(());
    }
    disk.origin.write_at(offset, data).await.map_err(|e| {
        tracing::warn!(disk = %disk.id, error = %e, "origin write failed");
        e.into()
    })
}

/// Makes every acknowledged write of `disk` durable. A sealed disk was flushed when sealed.
pub async fn flush(disk: &Disk) -> Result<()> {
    // Only a fully sealed disk can skip the flush: one still sealing may hold writes that
    // its seal has not flushed yet.
    if disk.sealed_map().is_some() {
        return Ok(());
    }
    disk.origin.flush().await.map_err(Into::into)
}

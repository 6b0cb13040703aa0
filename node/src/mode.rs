//! A disk's mode as its owner changes it: detection (mutable -> detected), the operator's
//! seal, pin and drop-shadows.
//!
//! Architecture invariant: a detection saves the new generation before any lease on it can
//! be granted; every way back to mutable goes through the write path's revocation
//! (`Node::end_detection`).

use std::sync::Arc;

use crate::admin::DiskInfo;
use crate::disk::{DiskMode, DiskState};
use crate::error::{Error, Result};
use crate::{Node, disk};

/// What an operator does to a disk's detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectionAction {
    /// Never detect it (a detected disk goes back to mutable first).
    Pin,
    /// Let detection run again.
    Unpin,
    /// A detected disk goes back to mutable; detection starts over.
    DropShadows,
}

impl Node {
    /// Makes `d` detected-immutable if it qualifies now. One transition at a time per disk.
    async fn detect(&self, d: &Arc<disk::Disk>) {
        let now = self.clock.now();
        let Some(activity) = d.owner.qualifies(now, &self.config.detection) else {
            return;
        };
        if d.state() != DiskState::Mutable
            || d.owner
                .detecting
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let generation = d.generation() + 1;
        let last_write = d.owner.last_write();
        // The generation is saved (as detected) before any lease on it can be granted.
        d.restore_generation(generation);
        let saved = self.registry.save().await;
        let mut ok = saved.is_ok() && d.begin_detected(generation);
        // A write that came and went during the save, or a pin, undoes it (no lease can have
        // been granted: grants wait for `detecting` to clear).
        if ok && (d.owner.last_write() != last_write || d.owner.pinned()) {
            d.abort_detected();
            ok = false;
        }
        d.owner
            .detecting
            .store(false, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = saved {
            tracing::warn!(disk = %d.id, error = %e, "could not save the detected generation; the disk stays mutable");
            return;
        }
        if !ok {
            tracing::debug!(disk = %d.id, "a write came in while detecting; the disk stays mutable");
            return;
        }
        self.cluster.stats.detections.inc();
        self.cluster.disks_changed().await;
        tracing::info!(
            disk = %d.id,
            generation,
            readers = ?activity.readers,
            reads = activity.reads,
            quiet_ms = self.config.detection.quiet_period_ms,
            reason = "read by enough members with no write",
            "disk detected-immutable"
        );
    }

    /// Looks at the disks reads asked detection to look at (see `Node::note_read`).
    pub async fn detect_queued(&self) {
        let queued: Vec<String> = self.detect_queue.lock().drain().collect();
        for id in queued {
            if let Ok(d) = self.registry.get(&id)
                && d.state() == DiskState::Mutable
            {
                self.detect(&d).await;
            }
        }
    }

    /// Looks at every mutable disk this node owns and detects those that qualify.
    pub async fn detect_all(&self) {
        if !self.config.detection.enabled {
            return;
        }
        for d in self.registry.list() {
            if d.state() == DiskState::Mutable {
                self.detect(&d).await;
            }
        }
    }

    /// An operator's detection control of a disk this node owns.
    pub async fn set_detection(&self, disk: &str, action: DetectionAction) -> Result<DiskInfo> {
        let d = match self.registry.get(disk) {
            Ok(d) => d,
            Err(Error::UnknownDisk(_)) => {
                // Owned elsewhere (or by a member that left: that error says so).
                let owner = self.remote(disk)?.owner;
                return Err(Error::Invalid(format!(
                    "disk {disk:?} is owned by member {owner}: change its detection there"
                )));
            }
            Err(e) => return Err(e),
        };
        if d.state() == DiskState::Sealed {
            return Err(Error::Invalid(format!(
                "disk {disk:?} is sealed: it is immutable for ever, detection does not apply"
            )));
        }
        match action {
            DetectionAction::Pin => {
                d.owner.set_pinned(true);
                self.end_detection(&d, "operator pinned it mutable").await?;
                tracing::info!(disk, "detection pinned off by an operator");
            }
            DetectionAction::Unpin => {
                d.owner.set_pinned(false);
                tracing::info!(disk, "detection unpinned by an operator");
            }
            DetectionAction::DropShadows => {
                self.end_detection(&d, "operator dropped its shadow clones")
                    .await?;
            }
        }
        self.registry.save().await?;
        Ok(self.info(&d))
    }

    /// Changes a disk's mode: mutable or detected -> sealed, detected -> mutable (ending the
    /// detection); sealed stays sealed.
    pub async fn set_mode(&self, disk: &str, mode: DiskMode) -> Result<DiskInfo> {
        let d = match self.registry.get(disk) {
            Ok(d) => d,
            Err(Error::UnknownDisk(_)) => {
                // Owned elsewhere (or by a member that left: that error says so).
                let owner = self.remote(disk)?.owner;
                return Err(Error::Invalid(format!(
                    "disk {disk:?} is owned by member {owner}: change its mode there"
                )));
            }
            Err(e) => return Err(e),
        };
        match (d.mode(), mode) {
            (_, DiskMode::Detected) => {
                return Err(Error::Invalid(
                    "a disk becomes detected by detection, not by an operator: seal it, or leave it mutable".into(),
                ));
            }
            (DiskMode::Detected, DiskMode::Sealed) => {
                // Sealing makes it immutable for ever: its leases go first.
                self.end_detection(&d, "operator sealed it").await?;
                self.registry.seal(disk).await?;
            }
            (_, DiskMode::Sealed) => {
                self.registry.seal(disk).await?;
            }
            // Mutable now, as asked (it answered OK and stayed detected; found in review):
            // the detection ends as a write would end it, its leases revoked first. Reads may
            // detect it again later; `pin` keeps it mutable.
            (DiskMode::Detected, DiskMode::Mutable) => {
                self.end_detection(&d, "operator made it mutable").await?;
            }
            (DiskMode::Mutable, DiskMode::Mutable) => {}
            (DiskMode::Sealed, DiskMode::Mutable) => return Err(Error::Unseal(disk.to_string())),
        }
        self.cluster.disks_changed().await;
        Ok(self.info(&d))
    }
}

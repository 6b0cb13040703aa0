//! The write path, revocation included.
//!
//! Every write goes to the disk's owner: a disk another member owns is written there. At the
//! owner, a sealed disk (or one being sealed) refuses writes with "disk is sealed". A write to a
//! mutable disk goes straight to the origin; it is durable once a later flush returns. Mutable
//! disks are never cached, so a write invalidates nothing. A write that finds the disk
//! detected-immutable (or its leases being revoked) first ends the detection
//! ([`Node::end_detection`]: no new leases, a new generation saved, every holder revoked or
//! waited out), then writes. An owner restarted while a disk was detected holds writes to it
//! for a lease term.
//!
//! Architecture invariant: every write holds the disk's in-flight guard for its whole duration,
//! so a seal never completes while a write it did not refuse is still running.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::clock::Clock;
use crate::disk::{Disk, DiskState, WriteGuard};
use crate::error::{Error, Result};
use crate::ids::Incarnation;
use crate::{Node, disk, read, telemetry};

/// The point on the node's clock after which a forwarded write is no longer sent to the origin:
/// its sender stops waiting for it later (twice as long after sending it), and tells its client
/// it failed.
struct Deadline {
    clock: Arc<dyn Clock>,
    by: Duration,
}

impl Deadline {
    /// Refuses the write if the deadline has passed.
    fn check(&self, disk: &Disk) -> Result<()> {
        let now = self.clock.now();
        if now < self.by {
            return Ok(());
        }
        let late_ms = (now - self.by).as_millis() as u64;
        metrics::counter!(telemetry::LATE_WRITES).increment(1);
        tracing::warn!(disk = %disk.id, late_ms, "a forwarded write reached the origin's turn after its deadline; not applied");
        Err(Error::Late {
            disk: disk.id.to_string(),
            late_ms,
        })
    }
}

/// Writes `data` at `offset` of `disk` under its write `guard`.
///
/// The write takes its place in the disk's write order now, and runs in a task of its own that
/// holds the guard until the origin has the bytes: a caller that goes away (a cancelled RPC, a
/// client that timed out) cannot let a seal slip in before a write that is still landing, and
/// a later write of the same range (that client's retry) waits for this one to finish, so it
/// can never be overwritten by it. With a `deadline`, the write is dropped rather than sent to
/// the origin if its turn comes after it.
async fn land(
    disk: &Arc<Disk>,
    guard: WriteGuard,
    offset: u64,
    data: Bytes,
    deadline: Option<Deadline>,
    halted: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let mut place = disk.writes.arrive(offset, data.len() as u64);
    let d = disk.clone();
    let halted = halted.clone();
    tokio::spawn(async move {
        let _held = guard;
        place.ready().await;
        if let Some(deadline) = &deadline {
            // Waited behind an earlier write of the range: its sender may be gone by now.
            deadline.check(&d)?;
        }
        #[cfg(feature = "failpoints")]
        if let Some(ms) = fail::eval("origin-write-stall", |arg| {
            arg.and_then(|a| a.parse::<u64>().ok()).unwrap_or(1000)
        }) {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        if halted.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::State("the node halted".into()));
        }
        let r = d.origin.write_at(offset, data).await;
        drop(place);
        if halted.load(std::sync::atomic::Ordering::SeqCst) {
            // Killed while the bytes were on their way: a dead process acknowledges nothing.
            return Err(Error::State("the node halted".into()));
        }
        r.map_err(|e| {
            tracing::warn!(disk = %d.id, error = %e, "origin write failed");
            Error::from(e)
        })
    })
    .await
    .map_err(|e| Error::State(format!("write task: {e}")))?
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

impl Node {
    /// Writes `data` at `offset` of disk `disk`; a disk owned elsewhere is written at its owner.
    pub async fn write(&self, disk: &str, offset: u64, data: Bytes) -> Result<()> {
        match self.registry.get(disk) {
            Ok(d) => self.write_owned(&d, offset, data, None).await,
            Err(Error::UnknownDisk(_)) => {
                let r = self.remote(disk)?;
                read::check_span(disk, r.info.size_bytes, offset, data.len() as u64)?;
                metrics::counter!(telemetry::FORWARDED, "rpc" => "write").increment(1);
                self.cluster
                    .peers
                    .write(&r.owner, r.addr, disk, offset, data)
                    .await
            }
            Err(e) => Err(e),
        }
    }

    /// Makes the acknowledged writes of `disk` durable, at its owner.
    pub async fn flush(&self, disk: &str) -> Result<()> {
        match self.registry.get(disk) {
            Ok(d) => flush(&d).await,
            Err(Error::UnknownDisk(_)) => {
                let r = self.remote(disk)?;
                metrics::counter!(telemetry::FORWARDED, "rpc" => "flush").increment(1);
                self.cluster.peers.flush(&r.owner, r.addr, disk).await
            }
            Err(e) => Err(e),
        }
    }

    /// A write of a disk this node owns: waits out a post-restart fence, ends a detection
    /// (revoking every lease) when it finds one, then writes. With `by` (a point on the node's
    /// clock: a forwarded write's deadline), a write whose turn at the origin comes later is
    /// refused and never sent there: its sender gives up on it soon after, and a retry may be
    /// acknowledged then. (A write sent to the origin in time may still complete after; a retry
    /// of its range waits for it in the write order.)
    pub(crate) async fn write_owned(
        &self,
        d: &Arc<disk::Disk>,
        offset: u64,
        data: Bytes,
        by: Option<Duration>,
    ) -> Result<()> {
        read::check_range(d, offset, data.len() as u64)?;
        if data.is_empty() {
            // Nothing to write: no reason to end a detection for it.
            return match d.state() {
                DiskState::Sealed | DiskState::Sealing => Err(Error::Sealed(d.id.to_string())),
                _ => Ok(()),
            };
        }
        let deadline = by.map(|by| Deadline {
            clock: self.clock.clone(),
            by,
        });
        loop {
            if let Some(deadline) = &deadline {
                // Before the waits and the end of a detection: a late write costs nothing.
                deadline.check(d)?;
            }
            let fenced = d.owner.fenced_for(self.clock.now());
            if !fenced.is_zero() {
                tracing::info!(disk = %d.id, wait_ms = fenced.as_millis() as u64, "write waits until leases granted before the restart are over");
                self.clock.sleep(fenced).await;
                continue;
            }
            d.owner.record_write(self.clock.now());
            match d.begin_write()? {
                Some(guard) => {
                    if let Some(deadline) = &deadline {
                        deadline.check(d)?;
                    }
                    return land(d, guard, offset, data, deadline, &self.halted).await;
                }
                // Detected, or its leases being revoked: end that first, then write.
                None => self.end_detection(d, "write").await?,
            }
        }
    }

    /// Ends the detection of a disk this node owns: no new leases, a new generation saved,
    /// every holder revoked (acknowledged, or its lease run out), then mutable again. Runs in a
    /// task of its own, so a caller that goes away cannot leave the disk half way.
    pub async fn end_detection(&self, d: &Arc<disk::Disk>, reason: &'static str) -> Result<()> {
        let node = self
            .me
            .upgrade()
            .ok_or_else(|| Error::State("the node is shutting down".into()))?;
        let d = d.clone();
        tokio::spawn(async move { node.end_detection_to_the_end(&d, reason).await })
            .await
            .map_err(|e| Error::State(format!("revocation task: {e}")))?
    }

    async fn end_detection_to_the_end(
        &self,
        d: &Arc<disk::Disk>,
        reason: &'static str,
    ) -> Result<()> {
        let _one = d.owner.revoking.lock().await;
        let holders: Vec<(Incarnation, Duration)> = {
            let mut leases = d.owner.leases.lock();
            if !d.begin_revoking() {
                if d.state() == DiskState::Revoking {
                    // A revocation task that did not finish (it cannot be cancelled, so it
                    // panicked): its holders were taken; wait them out in full.
                    let until = self.clock.now()
                        + Duration::from_millis(
                            self.config.lease.term_ms + self.config.lease.drift_margin_ms,
                        );
                    d.owner.fence(until);
                    d.end_revoking();
                }
                return Ok(());
            }
            leases.drain().collect()
        };
        let old = d.generation() - 1;
        let started = self.clock.now();
        if let Err(e) = self.registry.save().await {
            tracing::warn!(disk = %d.id, error = %e, "could not save the new generation; a restart will wait a lease term before writes");
        }
        self.cluster.disks_changed().await;
        let mut live: Vec<(Incarnation, Duration)> =
            holders.into_iter().filter(|(_, e)| *e > started).collect();
        if crate::guard_removed("guard-owner-waits-for-holders") {
            live.clear();
        }
        let outcomes = futures::future::join_all(
            live.iter()
                .map(|(h, expiry)| self.cluster.revoke_holder(h, d.id.as_str(), old, *expiry)),
        )
        .await;
        let stats = &self.cluster.stats;
        for acked in &outcomes {
            if *acked {
                stats.revocations_acked.inc();
            } else {
                stats.revocations_expired.inc();
                stats.owner_expiries.inc();
            }
        }
        let waited = self.clock.now().saturating_sub(started);
        stats.revocation_wait.record(waited.as_secs_f64());
        stats.revocation_wait_ms.add(waited.as_millis() as u64);
        d.owner.reset(self.clock.now());
        d.end_revoking();
        stats.undetections.inc();
        if let Err(e) = self.registry.save().await {
            tracing::warn!(disk = %d.id, error = %e, "could not save that the disk is mutable again");
        }
        self.cluster.disks_changed().await;
        tracing::info!(
            disk = %d.id,
            reason,
            generation = d.generation(),
            holders = live.len(),
            acked = outcomes.iter().filter(|a| **a).count(),
            waited_ms = waited.as_millis() as u64,
            "disk mutable again: every lease revoked"
        );
        Ok(())
    }
}

//! Leases: the holder's side (ask at the first read, renew at a third of the term while reads
//! want it, give up on revocation) and the owner's revocation of holders (acknowledged, or
//! waited out until the lease is surely over). The owner's lease table lives with its
//! detection state (`detect.rs`); the lease as a holder sees it in `lease.rs`.
//!
//! Architecture invariant: every wait here is on the node's clock, and a holder stops serving
//! before it acknowledges a revocation.

use std::sync::Arc;
use std::time::Duration;

use super::{Cluster, HolderLease, REFUSAL_HOLD, Shadow};
use crate::ids::Incarnation;

impl Cluster {
    /// Whether this node may serve `shadow` from its cache now: always for a sealed disk; for
    /// a detected one, while it holds a valid lease (asked for here if it has none).
    pub async fn lease_ok(&self, shadow: &Shadow) -> bool {
        let Some(lease) = &shadow.lease else {
            return true;
        };
        let now = self.clock.now();
        lease.touch(now);
        if lease.valid(now) {
            return true;
        }
        self.acquire(lease).await
    }

    /// Asks the owner for `lease` (or its renewal); true if it is valid afterwards. One
    /// request at a time: callers that queued behind one take its answer, and a refusal is
    /// believed for [`REFUSAL_HOLD`], so an unreachable owner costs one deadline, not one per
    /// reader.
    async fn acquire(&self, lease: &HolderLease) -> bool {
        let arrived = self.clock.now();
        let _one = lease.acquiring.lock().await;
        if lease.revoked() {
            return false;
        }
        let sent = self.clock.now();
        // A renewal that is not due yet was done by whoever held the lock before us.
        if lease.remaining(sent) > self.lease_term * 2 / 3 {
            return true;
        }
        if let Some((at, ok)) = lease.last_attempt()
            && (at >= arrived || (!ok && sent.saturating_sub(at) < REFUSAL_HOLD))
        {
            return ok && lease.valid(sent);
        }
        let granted = self.request_lease(lease, sent).await;
        lease.attempted(self.clock.now(), granted);
        granted
    }

    async fn request_lease(&self, lease: &HolderLease, sent: Duration) -> bool {
        let asked = self.peers.lease(
            &lease.owner,
            lease.addr,
            &lease.disk,
            crate::ids::Version::new(lease.generation, lease.epoch),
            self.membership.me().boot,
        );
        // `Peers` puts the deadline on the request.
        match asked.await {
            Ok(term) => {
                let term = term.min(self.lease_term * 10);
                let margin = if crate::guard_removed("guard-drift-margin") {
                    Duration::ZERO
                } else {
                    self.drift_margin
                };
                lease.granted(sent, term, margin) && lease.valid(self.clock.now())
            }
            Err(e) if e.kind() == crate::error::ErrorKind::Peer => {
                tracing::warn!(disk = %lease.disk, owner = %lease.owner, error = %e, "lease request failed: the owner did not answer");
                false
            }
            Err(e) => {
                tracing::debug!(disk = %lease.disk, owner = %lease.owner, error = %e, "lease refused");
                false
            }
        }
    }

    /// Revokes `holder`'s lease on (disk, generation), which runs until `expiry` on this
    /// node's clock: true when that process acknowledged, false when the lease ran out first.
    /// Only the holder's own incarnation is asked: while gossip shows another process under
    /// its id, the lease is waited out.
    pub async fn revoke_holder(
        &self,
        holder: &Incarnation,
        disk: &str,
        generation: u64,
        expiry: Duration,
    ) -> bool {
        loop {
            let now = self.clock.now();
            if now >= expiry {
                return false;
            }
            let left = expiry - now;
            let addr = self
                .members()
                .into_iter()
                .find(|m| *m.id == *holder.id && m.boot == holder.boot)
                .map(|m| m.peer_addr);
            if let Some(addr) = addr {
                let call = self
                    .peers
                    .revoke(&holder.id, addr, disk, generation, holder.boot);
                if let Ok(Ok(())) =
                    crate::clock::timeout(&*self.clock, left.min(self.rpc_timeout), call).await
                {
                    return true;
                }
            }
            // Unreachable or not a member any more: try again until the lease is surely over.
            let left = expiry.saturating_sub(self.clock.now());
            self.clock.sleep(left.min(Duration::from_millis(100))).await;
        }
    }

    /// Renews the leases reads still want, and counts the ones that lapsed.
    pub(super) async fn renew_leases(self: &Arc<Self>) {
        let now = self.clock.now();
        let leases: Vec<Arc<HolderLease>> = self
            .shadows
            .iter()
            .filter_map(|s| s.lease.clone())
            .collect();
        for l in leases {
            if l.take_lapse(now) {
                self.stats.holder_expiries.inc();
                tracing::info!(disk = %l.disk, "lease ran out before it was renewed; reads go to the owner");
            }
            let wanted = now.saturating_sub(l.last_used()) < self.lease_term * 2;
            let due = l.remaining(now) < self.lease_term * 2 / 3;
            // Skip a lease whose request is still running (an unreachable owner).
            if wanted && due && !l.revoked() && l.acquiring.try_lock().is_ok() {
                let this = self.clone();
                tokio::spawn(async move { this.acquire(&l).await });
            }
        }
    }
}

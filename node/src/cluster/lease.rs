//! A lease as its holder sees it: permission to serve a detected disk from this node's cache.
//!
//! The holder counts the term from the moment it *sent* the request (the owner counts from the
//! grant, later) and gives the lease up a drift margin early; the owner treats it as alive a
//! drift margin late. Times are on the boot clock (see [`crate::clock`]). A revocation marks the
//! lease revoked for good: a grant that arrives after it (the two can cross on the network) is
//! ignored, so a revoked generation is never served again from this node's cache.
//!
//! Architecture invariant: no I/O; time comes in as arguments.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// `[lease]`: the terms on which members serve a detected disk from their caches.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// How long a lease lasts (default 10 s); renewed at a third of it.
    pub term_ms: u64,
    /// Clock drift allowed between members (default 500 ms): a holder gives a lease up this
    /// much early, the owner counts it this much late.
    pub drift_margin_ms: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            term_ms: 10_000,
            drift_margin_ms: 500,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    valid_until: Duration,
    revoked: bool,
}

/// This node's lease on one (disk, generation, epoch).
#[derive(Debug)]
pub struct HolderLease {
    /// The disk.
    pub disk: String,
    /// The generation the lease is on.
    pub generation: u64,
    /// The disk's epoch.
    pub epoch: u64,
    /// The owner.
    pub owner: String,
    /// The owner's Peer address.
    pub addr: SocketAddr,
    state: parking_lot::Mutex<State>,
    /// One request for the lease at a time.
    pub(crate) acquiring: tokio::sync::Mutex<()>,
    /// Nanoseconds (boot clock) of the last read that wanted the lease.
    last_used: AtomicU64,
    /// The lease was valid at least once and has not been counted as expired since.
    held: AtomicBool,
    /// When the last request for it ended (nanoseconds, boot clock; 0: never) and whether it
    /// was granted: readers that queued behind a request take its answer instead of asking
    /// again, and a refusal is believed for a moment.
    last_attempt: AtomicU64,
    last_ok: AtomicBool,
}

impl HolderLease {
    /// No lease yet on `disk` at `generation` and `epoch`, owned by `owner` at `addr`.
    pub fn new(disk: &str, generation: u64, epoch: u64, owner: &str, addr: SocketAddr) -> Self {
        HolderLease {
            disk: disk.to_string(),
            generation,
            epoch,
            owner: owner.to_string(),
            addr,
            state: parking_lot::Mutex::new(State::default()),
            acquiring: tokio::sync::Mutex::new(()),
            last_used: AtomicU64::new(0),
            held: AtomicBool::new(false),
            last_attempt: AtomicU64::new(0),
            last_ok: AtomicBool::new(false),
        }
    }

    /// Records the end of a request for the lease at `now`.
    pub fn attempted(&self, now: Duration, ok: bool) {
        self.last_ok.store(ok, Ordering::SeqCst);
        self.last_attempt
            .store(now.as_nanos().max(1) as u64, Ordering::SeqCst);
    }

    /// When the last request ended and whether it was granted.
    pub fn last_attempt(&self) -> Option<(Duration, bool)> {
        let at = self.last_attempt.load(Ordering::SeqCst);
        (at != 0).then(|| {
            (
                Duration::from_nanos(at),
                self.last_ok.load(Ordering::SeqCst),
            )
        })
    }

    /// Whether this node may serve the disk from its cache at `now`.
    #[inline]
    pub fn valid(&self, now: Duration) -> bool {
        let s = self.state.lock();
        !s.revoked && now < s.valid_until
    }

    /// Time left at `now` (zero when over or revoked).
    pub fn remaining(&self, now: Duration) -> Duration {
        let s = self.state.lock();
        if s.revoked {
            Duration::ZERO
        } else {
            s.valid_until.saturating_sub(now)
        }
    }

    /// Records a grant for a request sent at `sent`: valid until `sent + term - margin`.
    /// Ignored (false) once revoked.
    pub fn granted(&self, sent: Duration, term: Duration, margin: Duration) -> bool {
        let mut s = self.state.lock();
        if s.revoked {
            return false;
        }
        s.valid_until = s.valid_until.max((sent + term).saturating_sub(margin));
        self.held.store(true, Ordering::SeqCst);
        true
    }

    /// Stops serving for good. Returns whether the lease was valid at `now`.
    pub fn revoke(&self, now: Duration) -> bool {
        let mut s = self.state.lock();
        let was = !s.revoked && now < s.valid_until;
        s.revoked = true;
        self.held.store(false, Ordering::SeqCst);
        was
    }

    /// Whether it was revoked.
    pub fn revoked(&self) -> bool {
        self.state.lock().revoked
    }

    /// Notes that a read wanted the lease at `now`.
    #[inline]
    pub fn touch(&self, now: Duration) {
        self.last_used
            .fetch_max(now.as_nanos() as u64, Ordering::Relaxed);
    }

    /// When a read last wanted it.
    pub fn last_used(&self) -> Duration {
        Duration::from_nanos(self.last_used.load(Ordering::Relaxed))
    }

    /// True once per lapse: the lease had been valid and ran out without a revocation.
    pub fn take_lapse(&self, now: Duration) -> bool {
        !self.valid(now) && !self.revoked() && self.held.swap(false, Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn counted_from_the_request_and_given_up_a_margin_early() {
        let l = HolderLease::new("d", 3, 9, "o", SocketAddr::from(([127, 0, 0, 1], 1)));
        assert!(!l.valid(ms(0)));
        assert!(l.granted(ms(1_000), ms(10_000), ms(500)));
        assert!(l.valid(ms(10_499)));
        assert!(!l.valid(ms(10_500)));
        assert!(l.take_lapse(ms(10_600)));
        assert!(!l.take_lapse(ms(10_700)), "a lapse is counted once");
    }

    #[test]
    fn a_grant_after_a_revocation_is_ignored() {
        let l = HolderLease::new("d", 3, 9, "o", SocketAddr::from(([127, 0, 0, 1], 1)));
        assert!(l.granted(ms(0), ms(10_000), ms(500)));
        assert!(l.revoke(ms(100)));
        assert!(!l.valid(ms(200)));
        assert!(!l.granted(ms(150), ms(10_000), ms(500)), "late grant");
        assert!(!l.valid(ms(300)));
        assert!(!l.take_lapse(ms(20_000)), "a revocation is not a lapse");
    }
}

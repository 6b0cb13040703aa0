//! Time for leases: a monotonic clock that keeps counting while the host is suspended.
//!
//! `std::time::Instant` and tokio's clock use `CLOCK_MONOTONIC`, which stops during suspend: a
//! holder suspended in the middle of its lease would wake up believing the lease still runs
//! while the owner, which did not sleep, has already let it lapse and applied a write. Lease
//! times are therefore read from `CLOCK_BOOTTIME` on Linux, behind [`Clock`] so that tests can
//! drive time by hand.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A monotonic clock, as a time since some fixed point.
pub trait Clock: Send + Sync + Debug {
    /// Now.
    fn now(&self) -> Duration;
}

/// `CLOCK_BOOTTIME`: monotonic, counts suspend.
#[derive(Debug, Default, Clone, Copy)]
pub struct BootClock;

impl Clock for BootClock {
    fn now(&self) -> Duration {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    }
}

/// A clock moved by hand (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// Moves the clock forward.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

/// `CLOCK_BOOTTIME` now.
pub fn boot_now() -> Duration {
    BootClock.now()
}

/// The clock the node uses.
pub fn system() -> Arc<dyn Clock> {
    Arc::new(BootClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_clock_moves_forward_with_real_time() {
        let c = BootClock;
        let a = c.now();
        std::thread::sleep(Duration::from_millis(20));
        let b = c.now();
        assert!(b >= a + Duration::from_millis(20), "{a:?} -> {b:?}");
        assert!(b < a + Duration::from_secs(5), "{a:?} -> {b:?}");
    }
}

//! Time for leases: a monotonic clock that keeps counting while the host is suspended.
//!
//! `std::time::Instant` and tokio's clock use `CLOCK_MONOTONIC`, which stops during suspend: a
//! holder suspended in the middle of its lease would wake up believing the lease still runs
//! while the owner, which did not sleep, has already let it lapse and applied a write. Lease
//! times are therefore read from `CLOCK_BOOTTIME` on Linux, behind [`Clock`]. (The time
//! arithmetic of detection and leases takes `now` as an argument and is unit-tested with
//! plain durations: `detect.rs`, `cluster/lease.rs`.)

use std::fmt::Debug;
use std::sync::Arc;
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

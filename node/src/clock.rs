//! Time for leases: a monotonic clock that keeps counting while the host is suspended.
//!
//! `std::time::Instant` and tokio's clock use `CLOCK_MONOTONIC`, which stops during suspend: a
//! holder suspended in the middle of its lease would wake up believing the lease still runs
//! while the owner, which did not sleep, has already let it lapse and applied a write. Lease
//! times are therefore read from `CLOCK_BOOTTIME` on Linux, behind [`Clock`]. (The time
//! arithmetic of detection and leases takes `now` as an argument and is unit-tested with
//! plain durations: `cluster/detect.rs`, `cluster/lease.rs`.)
//!
//! Waits that decide lease and revocation timing (a write's post-restart fence, waiting out an
//! unreachable holder, renewing, the deadline of a lease request) sleep through the same
//! [`Clock`], so a test with a [`ManualClock`] moves time, and every such wait, step by step.
//! (`BootClock::sleep` is tokio's, which stops during suspend: every such wait therefore
//! checks [`Clock::now`] again when it wakes, and a long sleep only ever delays, never
//! shortens, what it guards.)
//!
//! Architecture invariant: nothing that decides a lease reads time anywhere else.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

/// A monotonic clock, as a time since some fixed point.
pub trait Clock: Send + Sync + Debug {
    /// Now.
    fn now(&self) -> Duration;

    /// Completes once `d` has passed on this clock.
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()>;
}

/// Why [`timeout`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline passed")]
pub struct Elapsed;

/// `fut`, unless `d` passes on `clock` first.
pub async fn timeout<T>(
    clock: &dyn Clock,
    d: Duration,
    fut: impl Future<Output = T>,
) -> Result<T, Elapsed> {
    let sleep = clock.sleep(d);
    // Biased (the future first, then the deadline) rather than a random first branch: a seed
    // of the simulation replays the same choices.
    tokio::select! {
        biased;
        v = fut => Ok(v),
        () = sleep => Err(Elapsed),
    }
}

/// `CLOCK_BOOTTIME`: monotonic, counts suspend.
#[derive(Debug, Default, Clone, Copy)]
pub struct BootClock;

impl Clock for BootClock {
    fn now(&self) -> Duration {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// A clock that moves only when told to: for tests that drive leases and revocations step by
/// step. Sleeps end when [`ManualClock::advance`] moves time past their deadline.
#[derive(Debug)]
pub struct ManualClock {
    now: tokio::sync::watch::Sender<Duration>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Duration) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            now: tokio::sync::watch::Sender::new(start),
        })
    }

    /// Moves time forward by `d`, waking every sleep that ends by then.
    pub fn advance(&self, d: Duration) {
        self.now.send_modify(|t| *t += d);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        *self.now.borrow()
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        let mut rx = self.now.subscribe();
        let until = *rx.borrow() + d;
        Box::pin(async move {
            while *rx.borrow_and_update() < until {
                if rx.changed().await.is_err() {
                    // The clock is gone: time stands still for ever.
                    std::future::pending::<()>().await;
                }
            }
        })
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

    #[tokio::test]
    async fn a_manual_clock_wakes_a_sleep_only_once_time_is_advanced_past_it() {
        let c = ManualClock::new(Duration::from_secs(100));
        let mut sleep = c.sleep(Duration::from_millis(500));
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        c.advance(Duration::from_millis(499));
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        c.advance(Duration::from_millis(1));
        sleep.await;
        assert_eq!(c.now(), Duration::from_millis(100_500));
        let r = timeout(&*c, Duration::from_secs(1), std::future::pending::<()>());
        let c2 = c.clone();
        let (r, ()) = tokio::join!(r, async move {
            tokio::task::yield_now().await;
            c2.advance(Duration::from_secs(1));
        });
        assert_eq!(r, Err(Elapsed));
    }
}

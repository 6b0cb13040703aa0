//! A limit on a node's reads of the origins it owns: bytes per second, reads per second and a
//! latency added to each read, shared by every origin of the node (one storage array behind
//! them all).
//!
//! Two uses. In production, a cap that keeps a boot storm from saturating the shared storage
//! that also serves the desktops' own writes (`[origin_limit]` in the config). In load tests,
//! a model of that storage (`shadowcache-bench` starts the owner with it), so that a cluster
//! on one machine has the bottleneck a real one has.
//!
//! The limit is paced, not bursty: a read's bytes occupy the storage from the moment the
//! previous reads' bytes are done (at `read_rate`), its start takes the next read slot (at
//! `read_iops`), and it completes `read_latency_ms` after both. Idle time earns no credit. The
//! read itself is sent at once; only its completion waits, so the origin's own time overlaps
//! the modelled time.
//!
//! Architecture invariant: no lock is held across an `.await`; writes and flushes pass through
//! untouched.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{Origin, OriginFuture};

/// `[origin_limit]`: what a node's reads of its origins may take. Every field unset (the
/// default): no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OriginLimit {
    /// Bytes per second read from all origins together.
    pub read_bytes_per_s: Option<u64>,
    /// Reads per second started at all origins together.
    pub read_iops: Option<u32>,
    /// Milliseconds added to each read.
    pub read_latency_ms: f64,
}

impl OriginLimit {
    /// Whether any limit is set.
    pub fn is_active(&self) -> bool {
        self.read_bytes_per_s.is_some() || self.read_iops.is_some() || self.read_latency_ms > 0.0
    }

    /// Checks the values (the config's keys are named in the error).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.read_bytes_per_s == Some(0) {
            return Err((
                "origin_limit.read_rate",
                "0 bytes/s would never finish a read; leave the key out for no limit".into(),
            ));
        }
        if let Some(iops) = self.read_iops
            && !(1..=10_000_000).contains(&iops)
        {
            return Err((
                "origin_limit.read_iops",
                format!("{iops} is not 1 to 10000000"),
            ));
        }
        let l = self.read_latency_ms;
        if !(0.0..=60_000.0).contains(&l) {
            return Err((
                "origin_limit.read_latency_ms",
                format!("{l} is not 0 to 60000"),
            ));
        }
        Ok(())
    }
}

/// The booking of every origin of one node.
#[derive(Debug)]
pub struct Limiter {
    limit: OriginLimit,
    next: parking_lot::Mutex<Next>,
}

/// When the storage is next free.
#[derive(Debug, Default)]
struct Next {
    /// The end of the last booked read's bytes.
    bytes_done: Option<Instant>,
    /// The start of the next free read slot.
    slot: Option<Instant>,
}

impl Limiter {
    /// A limiter for `limit`.
    pub fn new(limit: OriginLimit) -> Arc<Self> {
        Arc::new(Limiter {
            limit,
            next: parking_lot::Mutex::new(Next::default()),
        })
    }

    /// Books a read of `len` bytes sent at `now`; returns when it may complete.
    fn book(&self, now: Instant, len: u64) -> Instant {
        // Validated limits give finite, non-negative durations; anything else adds nothing.
        let secs = |s: f64| Duration::try_from_secs_f64(s).unwrap_or_default();
        let mut n = self.next.lock();
        let mut done = now;
        if let Some(rate) = self.limit.read_bytes_per_s {
            let start = n.bytes_done.map_or(now, |t| t.max(now));
            let end = start + secs(len as f64 / rate as f64);
            n.bytes_done = Some(end);
            done = done.max(end);
        }
        if let Some(iops) = self.limit.read_iops {
            let start = n.slot.map_or(now, |t| t.max(now));
            n.slot = Some(start + secs(1.0 / f64::from(iops)));
            done = done.max(start);
        }
        done + secs(self.limit.read_latency_ms / 1000.0)
    }

    /// `inner` behind this limiter.
    pub fn wrap(self: &Arc<Self>, inner: Arc<dyn Origin>) -> Arc<dyn Origin> {
        Arc::new(Limited {
            inner,
            limiter: self.clone(),
        })
    }
}

/// An origin whose reads complete no sooner than its node's [`Limiter`] allows.
#[derive(Debug)]
struct Limited {
    inner: Arc<dyn Origin>,
    limiter: Arc<Limiter>,
}

impl Origin for Limited {
    fn describe(&self) -> &str {
        self.inner.describe()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, offset: u64, len: usize) -> OriginFuture<'_, Bytes> {
        Box::pin(async move {
            let sent = Instant::now();
            let done = self.limiter.book(sent, len as u64);
            let bytes = self.inner.read_at(offset, len).await?;
            let now = Instant::now();
            if done > now {
                metrics::counter!(crate::telemetry::ORIGIN_LIMIT_WAIT_US)
                    .increment((done - now).as_micros() as u64);
                tokio::time::sleep_until(done).await;
            }
            Ok(bytes)
        })
    }

    fn write_at(&self, offset: u64, data: Bytes) -> OriginFuture<'_, ()> {
        self.inner.write_at(offset, data)
    }

    fn flush(&self) -> OriginFuture<'_, ()> {
        self.inner.flush()
    }

    fn identity(&self) -> Option<String> {
        self.inner.identity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An origin of zeros that answers at once.
    #[derive(Debug)]
    struct Zeros;

    impl Origin for Zeros {
        fn describe(&self) -> &str {
            "zeros"
        }
        fn size(&self) -> u64 {
            1 << 40
        }
        fn read_at(&self, _: u64, len: usize) -> OriginFuture<'_, Bytes> {
            Box::pin(async move { Ok(Bytes::from(vec![0u8; len])) })
        }
        fn write_at(&self, _: u64, _: Bytes) -> OriginFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn flush(&self) -> OriginFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn identity(&self) -> Option<String> {
            None
        }
    }

    /// Sends `n` reads of `len` bytes at once over `origins` in turn; returns the virtual time
    /// until the last completes.
    async fn burst(limit: OriginLimit, origins: usize, n: usize, len: usize) -> Duration {
        let l = Limiter::new(limit);
        let os: Vec<_> = (0..origins).map(|_| l.wrap(Arc::new(Zeros))).collect();
        let start = Instant::now();
        let reads = (0..n).map(|i| {
            let o = os[i % origins].clone();
            async move { o.read_at(0, len).await.map(|b| b.len()) }
        });
        for r in futures::future::join_all(reads).await {
            assert_eq!(r.expect("read"), len);
        }
        start.elapsed()
    }

    fn about(d: Duration, ms: f64) -> bool {
        (d.as_secs_f64() * 1000.0 - ms).abs() < 1.0
    }

    #[tokio::test(start_paused = true)]
    async fn a_byte_rate_paces_reads_across_every_origin_of_the_node() {
        // 64 reads of 64 KiB = 4 MiB at 16 MiB/s: 250 ms, over one origin or four.
        let limit = OriginLimit {
            read_bytes_per_s: Some(16 << 20),
            ..OriginLimit::default()
        };
        for origins in [1, 4] {
            let d = burst(limit, origins, 64, 64 << 10).await;
            assert!(about(d, 250.0), "{origins} origins: {d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn iops_and_latency_bound_small_reads() {
        // 100 reads at 1000 IOPS start over 99 ms and each takes 5 ms more: 104 ms.
        let limit = OriginLimit {
            read_iops: Some(1000),
            read_latency_ms: 5.0,
            ..OriginLimit::default()
        };
        let d = burst(limit, 2, 100, 4096).await;
        assert!(about(d, 104.0), "{d:?}");
        // Latency alone does not serialize: 100 reads at once take 5 ms.
        let limit = OriginLimit {
            read_latency_ms: 5.0,
            ..OriginLimit::default()
        };
        let d = burst(limit, 1, 100, 4096).await;
        assert!(about(d, 5.0), "{d:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_earns_no_burst() {
        let l = Limiter::new(OriginLimit {
            read_bytes_per_s: Some(1 << 20),
            ..OriginLimit::default()
        });
        let o = l.wrap(Arc::new(Zeros));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let start = Instant::now();
        o.read_at(0, 512 << 10).await.expect("read");
        o.read_at(0, 512 << 10).await.expect("read");
        assert!(about(start.elapsed(), 1000.0), "{:?}", start.elapsed());
    }

    #[test]
    fn limits_that_cannot_work_are_refused_with_their_key() {
        for (l, key) in [
            (
                OriginLimit {
                    read_bytes_per_s: Some(0),
                    ..OriginLimit::default()
                },
                "origin_limit.read_rate",
            ),
            (
                OriginLimit {
                    read_iops: Some(0),
                    ..OriginLimit::default()
                },
                "origin_limit.read_iops",
            ),
            (
                OriginLimit {
                    read_latency_ms: f64::NAN,
                    ..OriginLimit::default()
                },
                "origin_limit.read_latency_ms",
            ),
            (
                OriginLimit {
                    read_latency_ms: -1.0,
                    ..OriginLimit::default()
                },
                "origin_limit.read_latency_ms",
            ),
        ] {
            assert_eq!(l.validate().expect_err(key).0, key);
        }
        assert!(!OriginLimit::default().is_active());
        assert!(OriginLimit::default().validate().is_ok());
    }
}

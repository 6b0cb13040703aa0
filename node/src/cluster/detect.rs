//! Detection and leases at a disk's owner.
//!
//! The owner of a mutable disk counts, over a sliding window, the reads of the disk and the
//! distinct members that made them (itself included), and remembers when the last write came.
//! When at least `min_readers` members read it, at least `min_reads` reads arrived and no write
//! came for `quiet_period`, the disk becomes detected-immutable at a fresh generation (saved
//! before any lease is granted on it) and every member learns it through the disk registry.
//!
//! While a disk is detected, members serve it from their caches under leases that the owner
//! grants here: (holder, expiry) per disk, the expiry counted on the owner's boot clock from the
//! grant *plus* the drift margin. A write (or an operator's drop) ends the detection: under the
//! same lock that grants, the disk turns to revoking (no more grants), the holders are taken,
//! and the write path revokes each one (an acknowledgement, or the lease running out) before
//! the write is applied.
//!
//! Architecture invariant: granting and the switch to revoking take the same mutex, so a lease
//! is either among the holders a revocation waits for, or was never granted.

use std::collections::VecDeque;

use crate::hashing::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::ids::Incarnation;

/// `[detection]`: when the owner of a mutable disk finds it read-only and read by several
/// members, and makes it immutable under leases.
#[derive(Debug, Clone)]
pub struct DetectionConfig {
    /// Detection runs at all (default true).
    pub enabled: bool,
    /// The sliding window over which reads and readers are counted.
    pub window_ms: u64,
    /// Distinct members (the owner counts) that read the disk in the window (default 2).
    pub min_readers: u32,
    /// Reads in the window (default 64).
    pub min_reads: u64,
    /// Time without any write (default 10 s).
    pub quiet_period_ms: u64,
}

impl Default for DetectionConfig {
    fn default() -> Self {
        DetectionConfig {
            enabled: true,
            window_ms: 30_000,
            min_readers: 2,
            min_reads: 64,
            quiet_period_ms: 10_000,
        }
    }
}

/// Buckets per window: the window slides in steps of a eighth of its length.
const BUCKETS: u32 = 8;

#[derive(Debug)]
struct Bucket {
    start: Duration,
    reads: u64,
    readers: Vec<Arc<str>>,
}

/// Reads and readers of one disk over a sliding window.
#[derive(Debug, Default)]
struct Window {
    buckets: VecDeque<Bucket>,
}

impl Window {
    fn prune(&mut self, now: Duration, span: Duration) {
        let step = span / BUCKETS;
        while let Some(b) = self.buckets.front() {
            if b.start + step + span <= now {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }
}

/// What the window holds now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    /// Reads in the window.
    pub reads: u64,
    /// Distinct members that read, sorted.
    pub readers: Vec<String>,
}

/// The owner's detection and lease state of one disk.
#[derive(Debug)]
pub struct OwnerState {
    window: parking_lot::Mutex<Window>,
    /// Nanoseconds on the boot clock of the last write (or of registration).
    last_write: AtomicU64,
    pinned: AtomicBool,
    /// A detection transition is running (one at a time).
    pub(crate) detecting: AtomicBool,
    /// Holder (one process: id and boot) -> expiry on the owner's clock (grant time + term +
    /// drift margin).
    pub(crate) leases: parking_lot::Mutex<HashMap<Incarnation, Duration>>,
    /// One revocation at a time; writes that find the disk revoking wait on it.
    pub(crate) revoking: tokio::sync::Mutex<()>,
    /// Writes wait until this time (nanoseconds on the boot clock): set after a restart of an
    /// owner whose disk was detected, since leases granted before the crash may still run.
    fence_until: AtomicU64,
}

impl OwnerState {
    /// Fresh state at `now`.
    pub fn new(now: Duration) -> Self {
        OwnerState {
            window: parking_lot::Mutex::new(Window::default()),
            last_write: AtomicU64::new(now.as_nanos() as u64),
            pinned: AtomicBool::new(false),
            detecting: AtomicBool::new(false),
            leases: parking_lot::Mutex::new(HashMap::default()),
            revoking: tokio::sync::Mutex::new(()),
            fence_until: AtomicU64::new(0),
        }
    }

    /// Counts one read by member `node`. True when this read may have made the disk qualify:
    /// the first read of a reader in this step of the window, or the read that brought the
    /// window's reads to `min_reads` (a look at the whole window is worth it then, not on every
    /// read).
    pub fn record_read(&self, node: &str, now: Duration, cfg: &DetectionConfig) -> bool {
        let span = Duration::from_millis(cfg.window_ms);
        let step = span / BUCKETS;
        let mut w = self.window.lock();
        let fresh = w.buckets.back().is_none_or(|b| b.start + step <= now);
        if fresh {
            w.prune(now, span);
            w.buckets.push_back(Bucket {
                start: now,
                reads: 0,
                readers: Vec::new(),
            });
        }
        let Some(b) = w.buckets.back_mut() else {
            return false;
        };
        b.reads += 1;
        let new_reader = !b.readers.iter().any(|r| &**r == node);
        if new_reader {
            b.readers.push(Arc::from(node));
        }
        // The window's reads (at most eight steps to add), as `qualifies` counts them.
        new_reader || w.buckets.iter().map(|b| b.reads).sum::<u64>() == cfg.min_reads
    }

    /// Records a write: detection starts over.
    pub fn record_write(&self, now: Duration) {
        self.last_write
            .fetch_max(now.as_nanos() as u64, Ordering::SeqCst);
    }

    /// The last write's time (nanoseconds on the boot clock).
    pub fn last_write(&self) -> u64 {
        self.last_write.load(Ordering::SeqCst)
    }

    /// Forgets the window (after a detection ends) and counts quiet from `now`.
    pub fn reset(&self, now: Duration) {
        self.window.lock().buckets.clear();
        self.last_write
            .store(now.as_nanos() as u64, Ordering::SeqCst);
    }

    /// Reads and readers in the window ending at `now`.
    pub fn activity(&self, now: Duration, cfg: &DetectionConfig) -> Activity {
        let span = Duration::from_millis(cfg.window_ms);
        let mut w = self.window.lock();
        w.prune(now, span);
        let mut readers: Vec<String> = Vec::new();
        let mut reads = 0;
        for b in &w.buckets {
            reads += b.reads;
            for r in &b.readers {
                if !readers.iter().any(|x| x == &**r) {
                    readers.push(r.to_string());
                }
            }
        }
        readers.sort();
        Activity { reads, readers }
    }

    /// Whether the disk qualifies for detection at `now`, and the activity that makes it.
    pub fn qualifies(&self, now: Duration, cfg: &DetectionConfig) -> Option<Activity> {
        if !cfg.enabled || self.pinned() {
            return None;
        }
        let quiet = Duration::from_millis(cfg.quiet_period_ms).as_nanos() as u64;
        if (now.as_nanos() as u64).saturating_sub(self.last_write.load(Ordering::SeqCst)) < quiet {
            return None;
        }
        let a = self.activity(now, cfg);
        (a.readers.len() as u64 >= u64::from(cfg.min_readers) && a.reads >= cfg.min_reads)
            .then_some(a)
    }

    /// Whether an operator pinned the disk mutable.
    pub fn pinned(&self) -> bool {
        self.pinned.load(Ordering::SeqCst)
    }

    /// Pins or unpins.
    pub fn set_pinned(&self, on: bool) {
        self.pinned.store(on, Ordering::SeqCst);
    }

    /// Holds writes until `until` (boot clock).
    pub fn fence(&self, until: Duration) {
        self.fence_until
            .fetch_max(until.as_nanos() as u64, Ordering::SeqCst);
    }

    /// How long writes must still wait at `now`.
    pub fn fenced_for(&self, now: Duration) -> Duration {
        if crate::guard_removed("guard-restart-fence") {
            return Duration::ZERO;
        }
        Duration::from_nanos(
            self.fence_until
                .load(Ordering::SeqCst)
                .saturating_sub(now.as_nanos() as u64),
        )
    }

    /// The members whose lease has not run out at `now` (on the owner's count), sorted.
    pub fn holders(&self, now: Duration) -> Vec<String> {
        let mut v: Vec<String> = self
            .leases
            .lock()
            .iter()
            .filter(|(_, e)| **e > now)
            .map(|(h, _)| h.id.to_string())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DetectionConfig {
        DetectionConfig {
            enabled: true,
            window_ms: 8_000,
            min_readers: 2,
            min_reads: 10,
            quiet_period_ms: 1_000,
        }
    }

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn needs_enough_readers_reads_and_quiet() {
        let c = cfg();
        let o = OwnerState::new(s(0.0));
        for _ in 0..20 {
            o.record_read("a", s(2.0), &c);
        }
        assert_eq!(o.qualifies(s(2.0), &c), None, "one reader is not enough");
        o.record_read("b", s(2.5), &c);
        let a = o
            .qualifies(s(2.5), &c)
            .expect("two readers, 21 reads, quiet");
        assert_eq!(a.readers, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(a.reads, 21);
        o.record_write(s(3.0));
        assert_eq!(o.qualifies(s(3.5), &c), None, "a write 0.5 s ago");
        assert!(o.qualifies(s(4.1), &c).is_some(), "quiet again");
        o.set_pinned(true);
        assert_eq!(o.qualifies(s(4.2), &c), None, "pinned");
    }

    #[test]
    fn a_read_asks_for_a_look_only_when_it_may_have_made_the_disk_qualify() {
        let c = cfg();
        let o = OwnerState::new(s(0.0));
        // The first read of a reader in a step of the window: a look.
        assert!(o.record_read("a", s(2.0), &c));
        // More of the same reader: no look until the step's reads reach min_reads (10).
        let looks: Vec<bool> = (0..9).map(|_| o.record_read("a", s(2.0), &c)).collect();
        assert_eq!(
            looks,
            [false, false, false, false, false, false, false, false, true]
        );
        assert!(!o.record_read("a", s(2.1), &c));
        // A second reader: a look, and the disk qualifies at that moment.
        assert!(o.record_read("b", s(2.2), &c));
        assert!(o.qualifies(s(2.2), &c).is_some());
        // A new step of the window (8 s / 8): each reader's first read there is a look again.
        assert!(o.record_read("a", s(3.3), &c));
        assert!(!o.record_read("a", s(3.3), &c));
        // Reads spread over steps, two a step: the second of each step is a look only when it
        // brings the window (not the step) to min_reads, the tenth read.
        let o = OwnerState::new(s(0.0));
        let mut second = Vec::new();
        for i in 0..5 {
            let at = s(2.0 + f64::from(i) * 1.1);
            assert!(o.record_read("a", at, &c), "the step's first read");
            second.push(o.record_read("a", at, &c));
        }
        assert_eq!(second, [false, false, false, false, true]);
        assert_eq!(o.activity(s(6.5), &c).reads, 10);
    }

    #[test]
    fn old_reads_slide_out_of_the_window() {
        let c = cfg();
        let o = OwnerState::new(s(0.0));
        for i in 0..10 {
            o.record_read("a", s(1.0 + f64::from(i) * 0.01), &c);
        }
        o.record_read("b", s(5.0), &c);
        assert!(o.qualifies(s(5.0), &c).is_some());
        // Nine seconds later a's reads are out of the 8 s window.
        assert_eq!(o.activity(s(10.5), &c).readers, vec!["b".to_string()]);
        assert_eq!(o.qualifies(s(10.5), &c), None);
        o.reset(s(11.0));
        assert_eq!(o.activity(s(11.0), &c), Activity::default());
    }

    #[test]
    fn holders_are_those_whose_lease_still_runs() {
        let o = OwnerState::new(s(0.0));
        o.leases.lock().insert(Incarnation::new("x", 1), s(10.0));
        o.leases.lock().insert(Incarnation::new("y", 1), s(5.0));
        assert_eq!(o.holders(s(4.0)), vec!["x".to_string(), "y".to_string()]);
        assert_eq!(o.holders(s(6.0)), vec!["x".to_string()]);
        o.fence(s(3.0));
        assert_eq!(o.fenced_for(s(1.0)), s(2.0));
        assert_eq!(o.fenced_for(s(4.0)), Duration::ZERO);
    }
}

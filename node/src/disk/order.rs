//! The order in which writes of one disk reach its origin.
//!
//! Writes that overlap are applied in the order they arrived here: a write waits until every
//! earlier write it overlaps has finished (landed or failed) before it is sent to the origin.
//! A client that gave up on a stalled write and wrote the same range again cannot have the
//! stalled write land over its acknowledged retry: the retry arrived later, so it lands later.
//! Writes to ranges that do not overlap go on side by side.
//!
//! Architecture invariant: a write's place is taken when it arrives, before anything awaits;
//! nothing here touches the origin.

use std::sync::Arc;

use tokio::sync::watch;

/// Writes of one disk in flight, in arrival order.
#[derive(Debug, Default)]
pub struct WriteOrder {
    inflight: Arc<parking_lot::Mutex<Vec<Entry>>>,
    next: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    start: u64,
    end: u64,
    done: watch::Receiver<bool>,
}

/// A write's place in the order: [`Ticket::ready`] waits for the earlier writes it overlaps;
/// dropping it lets the later ones go.
#[derive(Debug)]
pub struct Ticket {
    inflight: Arc<parking_lot::Mutex<Vec<Entry>>>,
    id: u64,
    earlier: Vec<watch::Receiver<bool>>,
    done: watch::Sender<bool>,
}

impl WriteOrder {
    /// Takes the place of a write of [offset, offset + len) now.
    pub fn arrive(&self, offset: u64, len: u64) -> Ticket {
        let (done, rx) = watch::channel(false);
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let end = offset.saturating_add(len);
        let mut inflight = self.inflight.lock();
        let earlier = inflight
            .iter()
            .filter(|e| e.start < end && offset < e.end)
            .map(|e| e.done.clone())
            .collect();
        inflight.push(Entry {
            id,
            start: offset,
            end,
            done: rx,
        });
        drop(inflight);
        Ticket {
            inflight: self.inflight.clone(),
            id,
            earlier,
            done,
        }
    }

    /// Writes in flight (for tests and status).
    pub fn len(&self) -> usize {
        self.inflight.lock().len()
    }

    /// Whether no write is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ticket {
    /// Returns once every earlier overlapping write has finished.
    pub async fn ready(&mut self) {
        for mut e in self.earlier.drain(..) {
            // An error means the earlier ticket is gone: finished too.
            let _ = e.wait_for(|d| *d).await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.inflight.lock().retain(|e| e.id != self.id);
        let _ = self.done.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlapping_writes_wait_for_earlier_ones_and_others_do_not() {
        let o = WriteOrder::default();
        let first = o.arrive(0, 100);
        let mut overlapping = o.arrive(50, 100);
        let mut apart = o.arrive(100, 10);
        let mut after_both = o.arrive(0, 200);
        assert_eq!(o.len(), 4);
        // [100, 110) does not overlap the first write, but it does overlap [50, 150).
        let quick = tokio::time::timeout(std::time::Duration::from_millis(20), apart.ready());
        assert!(
            quick.await.is_err(),
            "[100,110) went before [50,150) finished"
        );
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(20), overlapping.ready());
        assert!(waiting.await.is_err(), "went before the write it overlaps");
        drop(first);
        overlapping.ready().await;
        drop(overlapping);
        apart.ready().await;
        let still = tokio::time::timeout(std::time::Duration::from_millis(20), after_both.ready());
        assert!(still.await.is_err(), "went before [100,110) finished");
        drop(apart);
        after_both.ready().await;
        drop(after_both);
        assert!(o.is_empty());
        // A write that overlaps nothing in flight is ready at once.
        let mut alone = o.arrive(1000, 1);
        alone.ready().await;
    }
}

//! Blocking work (file reads, writes and syncs, hashing a disk) off the async threads.
//!
//! In production every call runs on tokio's blocking pool. The seeded simulation
//! ([`crate::sim`], `failpoints` feature only) runs it inline on its one thread instead
//! ([`Inline`]): a blocking call that completes on a real thread at a moment of real time
//! decides which of the nodes' tasks runs next, and a seed would not replay the same
//! interleaving. The simulation's origin splits every read and write in two with a yield
//! between, so that overlapping reads and writes (the real threads' torn reads) still happen,
//! at points the seed decides.
//!
//! Architecture invariant: the only place the node starts blocking work.

use tokio::task::JoinError;

/// Runs `f` where blocking is allowed and returns its result; `Err` if it panicked.
pub async fn run<F, T>(f: F) -> Result<T, JoinError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    #[cfg(feature = "failpoints")]
    if INLINE.with(std::cell::Cell::get) {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await
}

#[cfg(feature = "failpoints")]
thread_local! {
    static INLINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, [`run`] on this thread runs its work inline (the simulation's current-thread
/// runtime); dropped, the thread goes back to the blocking pool.
#[cfg(feature = "failpoints")]
#[derive(Debug)]
pub struct Inline {
    before: bool,
}

#[cfg(feature = "failpoints")]
impl Inline {
    /// Blocking work on this thread runs inline until the value is dropped.
    pub fn on_this_thread() -> Inline {
        Inline {
            before: INLINE.with(|c| c.replace(true)),
        }
    }
}

#[cfg(feature = "failpoints")]
impl Drop for Inline {
    fn drop(&mut self) {
        INLINE.with(|c| c.set(self.before));
    }
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inline_runs_on_the_calling_thread_and_ends_with_the_guard() {
        let me = std::thread::current().id();
        {
            let _inline = Inline::on_this_thread();
            let there = run(|| std::thread::current().id()).await.expect("ran");
            assert_eq!(there, me);
        }
        let there = run(|| std::thread::current().id()).await.expect("ran");
        assert_ne!(
            there, me,
            "without the guard the work goes to the blocking pool"
        );
    }
}

//! The seeded simulation (`shadowcache_node::sim`): three nodes in one process on a simulated
//! clock and network, faults and operations drawn from each seed, every history checked.
//!
//! `SIM_SEEDS` (default 256) seeds from `SIM_FIRST_SEED` (default 1) run here; a failure names
//! its seed, which `SIM_FIRST_SEED=N SIM_SEEDS=1` runs again, the very same history (checked
//! here on `SIM_REPLAY_SEEDS`, default 24, each run twice). Needs the `failpoints` feature and,
//! for the exact replay, `--cfg tokio_unstable` (`scripts/test.sh` turns both on); without them
//! the tests fail and say so.

mod common;

/// The fail points are one process's: the two tests here take turns (plain `cargo test` runs
/// tests of a binary side by side).
#[cfg(feature = "failpoints")]
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// This test's turn on the fail points (a test that failed before does not block the other).
#[cfg(feature = "failpoints")]
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A guard removed until dropped, even when the test fails with it removed.
#[cfg(feature = "failpoints")]
struct Removed(&'static str);

#[cfg(feature = "failpoints")]
impl Removed {
    fn new(guard: &'static str) -> Self {
        fail::cfg(guard, "return").expect("fail point");
        Removed(guard)
    }
}

#[cfg(feature = "failpoints")]
impl Drop for Removed {
    fn drop(&mut self) {
        fail::remove(self.0);
    }
}

#[cfg(feature = "failpoints")]
fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn seeded_histories_keep_the_promise_under_partitions_drift_and_restarts() {
    common::needs_failpoints();
    #[cfg(feature = "failpoints")]
    {
        use shadowcache_node::sim;
        let _one = one_at_a_time();
        let first = env_u64("SIM_FIRST_SEED", 1);
        let seeds = env_u64("SIM_SEEDS", 256);
        let cfg = sim::SimConfig::default();
        let (mut reads, mut writes, mut generations) = (0, 0, 0);
        for seed in first..first + seeds {
            let dir = tempfile::tempdir().expect("tempdir");
            let out =
                sim::run(seed, &cfg, dir.path()).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert!(out.violations.is_empty(), "{}", out.report());
            reads += out.reads_ok;
            writes += out.writes_acked;
            generations += out.generations;
        }
        eprintln!(
            "{seeds} seeds from {first}: {reads} reads and {writes} acknowledged writes checked, {generations} generations"
        );
        // The runs did what they are for: reads served, writes acknowledged, the disk detected
        // (a generation past the first) in most of them.
        assert!(
            reads as u64 >= seeds * 10,
            "only {reads} reads returned data"
        );
        assert!(
            writes as u64 >= seeds * 2,
            "only {writes} writes acknowledged"
        );
        assert!(
            generations >= seeds * 2,
            "the disk was hardly ever detected: {generations} generations"
        );
    }
}

/// Each guard of the lease protocol, switched off through its fail point: the simulation must
/// catch every removal. Prints the seeds run until the first violation for each.
#[test]
fn the_simulation_catches_the_removal_of_each_guard() {
    common::needs_failpoints();
    #[cfg(feature = "failpoints")]
    {
        use shadowcache_node::sim;
        let _one = one_at_a_time();
        let budget = env_u64("SIM_GUARD_SEEDS", 400);
        let only = std::env::var("SIM_GUARD").ok();
        // SIM_GUARD_ALL=1: every seed of the budget, to measure how often each removal shows.
        let all = std::env::var("SIM_GUARD_ALL").is_ok();
        let cfg = sim::SimConfig::default();
        let mut missed = Vec::new();
        for guard in sim::GUARDS {
            if only.as_deref().is_some_and(|o| o != *guard) {
                continue;
            }
            let removed = Removed::new(guard);
            let mut caught = None;
            let mut catches = 0;
            for seed in 1..=budget {
                let dir = tempfile::tempdir().expect("tempdir");
                let out =
                    sim::run(seed, &cfg, dir.path()).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                if !out.violations.is_empty() {
                    catches += 1;
                    if caught.is_none() {
                        eprintln!("{guard}: caught by seed {seed}\n{}", out.report());
                        caught = Some(seed);
                    }
                    if !all {
                        break;
                    }
                }
            }
            if all {
                eprintln!("{guard}: {catches} of {budget} seeds caught it");
            }
            drop(removed);
            match caught {
                Some(seed) => eprintln!("{guard}: first caught after {seed} seeds"),
                None => missed.push(*guard),
            }
        }
        assert!(
            missed.is_empty(),
            "removals not caught in {budget} seeds: {missed:?}"
        );
    }
}

/// A seed replays exactly: run twice, it draws the same faults and operations, and the nodes'
/// tasks interleave the same way, so that every operation starts and ends at the same event
/// with the same result. What a failing seed showed, its replay shows again.
#[test]
fn a_seed_replays_its_history_exactly() {
    common::needs_failpoints();
    #[cfg(feature = "failpoints")]
    {
        use shadowcache_node::sim;
        assert!(
            sim::exact_replay(),
            "built without `--cfg tokio_unstable`: the simulation cannot seed tokio's random \
             choices, so a seed does not replay exactly. Run scripts/test.sh, or set \
             RUSTFLAGS=\"--cfg tokio_unstable\""
        );
        let _one = one_at_a_time();
        let first = env_u64("SIM_FIRST_SEED", 1);
        let seeds = env_u64("SIM_REPLAY_SEEDS", 24);
        let cfg = sim::SimConfig::default();
        let run = |seed| {
            let dir = tempfile::tempdir().expect("tempdir");
            sim::run(seed, &cfg, dir.path()).unwrap_or_else(|e| panic!("seed {seed}: {e}"))
        };
        assert!(seeds > 0, "SIM_REPLAY_SEEDS=0: nothing to compare");
        let mut differ = Vec::new();
        let (mut ops, mut reads, mut writes) = (0, 0, 0);
        for seed in first..first + seeds {
            let (a, b) = (run(seed), run(seed));
            ops += a.history.len();
            reads += a.reads_ok;
            writes += a.writes_acked;
            if let Some(d) = sim::first_difference(&a, &b) {
                differ.push(format!("seed {seed}: {d}"));
            }
        }
        // Not vacuous: the histories compared hold reads that returned data and acknowledged
        // writes, not only failures.
        assert!(
            ops as u64 >= seeds * 20 && reads as u64 >= seeds * 10 && writes as u64 >= seeds,
            "only {ops} operations, {reads} reads with data, {writes} acknowledged writes"
        );
        assert!(
            differ.is_empty(),
            "{} of {seeds} seeds did not replay:\n{}",
            differ.len(),
            differ.join("\n")
        );
    }
}

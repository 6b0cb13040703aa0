//! `faults`: the seeded simulation of `shadowcache_node::sim`, run for a budget of seeds on
//! every core, with every guard in place and then with each guard removed; one JSON report.
//!
//! Built only with the `faults` feature (it turns on the node's fail points, which a
//! production build never has): `cargo run --release -p shadowcache-bench --features faults
//! -- faults --seeds 100000 --json faults.json`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;
use shadowcache_node::sim;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seeds with every guard in place.
    pub seeds: u64,
    /// The first seed.
    pub first_seed: u64,
    /// Seeds run with each guard removed (every one of them: the report counts the catches).
    pub guard_seeds: u64,
    /// Threads.
    pub jobs: usize,
    /// Seeds run twice to see whether a seed replays exactly (the same faults, operations and
    /// results, in the same order).
    pub replays: u64,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Seeds run with every guard in place.
    pub seeds: u64,
    /// The first of them.
    pub first_seed: u64,
    /// Wall-clock seconds for them.
    pub seconds: f64,
    /// Reads that returned data, checked.
    pub reads_checked: u64,
    /// Writes acknowledged.
    pub writes_acked: u64,
    /// Generations the disk moved through, summed over seeds.
    pub generations: u64,
    /// Seeds whose history broke the promise (each with its report).
    pub violations: Vec<String>,
    /// Seeds that could not run (set-up errors).
    pub errors: Vec<String>,
    /// Each guard removed in turn.
    pub guards: Vec<GuardReport>,
    /// Seeds run twice, compared.
    pub replay: ReplayReport,
}

/// Seeds run twice: how many gave the same history both times.
#[derive(Debug, Serialize)]
pub struct ReplayReport {
    /// Seeds run twice.
    pub seeds: u64,
    /// Of them, the same faults, operations and results both times (each operation sent at
    /// the same simulated time, returning the same versions or error).
    pub same_results: u64,
    /// Of them, also the same order in which operations ended (event numbers): the whole
    /// history identical.
    pub identical: u64,
    /// The lowest seed whose results differed.
    pub first_different: Option<u64>,
    /// Whether this build can replay exactly (the node built with `--cfg tokio_unstable`,
    /// which lets the simulation seed tokio's random choices).
    pub exact_build: bool,
    /// Where the two runs of the lowest seed that was not identical parted.
    pub first_difference: Option<String>,
}

/// Whether two runs recorded the same faults and each operation the same kind, send time and
/// result (the order in which operations ended may differ).
fn same_results(a: &sim::Outcome, b: &sim::Outcome) -> bool {
    let results = |o: &sim::Outcome| -> Vec<String> {
        o.history
            .iter()
            .map(|op| format!("{:?} {} {:?} {:?}", op.kind, op.at_ms, op.result, op.mixed))
            .collect()
    };
    format!("{:?}", a.faults) == format!("{:?}", b.faults) && results(a) == results(b)
}

/// Runs each of seeds `1..=n` twice, back to back, and compares the two histories with
/// [`sim::first_difference`] (the one definition of "the same history" that the tests use).
fn replay(n: u64, jobs: usize) -> ReplayReport {
    let cfg = sim::SimConfig::default();
    let compared = parking_lot::Mutex::new(std::collections::BTreeMap::new());
    run_seeds(1, n, jobs, &|seed, first| {
        let again = tempfile::tempdir()
            .map_err(|e| e.to_string())
            .and_then(|dir| sim::run(seed, &cfg, dir.path()));
        let verdict = match (first, again) {
            (Ok(a), Ok(b)) => (
                same_results(&a, &b),
                sim::first_difference(&a, &b).map(|d| format!("seed {seed}: {d}")),
            ),
            (Err(e), _) | (_, Err(e)) => (false, Some(format!("seed {seed}: {e}"))),
        };
        compared.lock().insert(seed, verdict);
    });
    let compared = compared.into_inner();
    ReplayReport {
        seeds: n,
        same_results: compared.values().filter(|v| v.0).count() as u64,
        identical: compared.values().filter(|v| v.1.is_none()).count() as u64,
        first_different: compared.iter().find(|(_, v)| !v.0).map(|(s, _)| *s),
        exact_build: sim::exact_replay(),
        first_difference: compared.values().find_map(|v| v.1.clone()),
    }
}

/// One guard removed.
#[derive(Debug, Serialize)]
pub struct GuardReport {
    /// Its fail point.
    pub guard: String,
    /// Whether the simulation is expected to catch its removal.
    pub must_catch: bool,
    /// Seeds run.
    pub seeds: u64,
    /// Seeds whose history showed a violation.
    pub caught: u64,
    /// The lowest such seed (the seeds run until the first failure, counting from 1).
    pub first_caught: Option<u64>,
    /// That seed run four more times: of the last three, how many broke the promise again with
    /// the very same history as the first.
    pub replayed: u32,
    /// The first seed's report.
    pub example: Option<String>,
}

/// What the seeds with every guard in place added up to.
#[derive(Debug, Default)]
struct Totals {
    reads: u64,
    writes: u64,
    generations: u64,
    violations: Vec<String>,
    errors: Vec<String>,
}

/// Runs seeds `first..first + n` on `jobs` threads; `f` sees every outcome.
fn run_seeds(
    first: u64,
    n: u64,
    jobs: usize,
    f: &(dyn Fn(u64, Result<sim::Outcome, String>) + Sync),
) {
    let next = AtomicU64::new(first);
    let cfg = sim::SimConfig::default();
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= first + n {
                        break;
                    }
                    let r = tempfile::tempdir()
                        .map_err(|e| e.to_string())
                        .and_then(|dir| sim::run(seed, &cfg, dir.path()));
                    f(seed, r);
                }
            });
        }
    });
}

/// Runs the simulation; prints progress to stderr.
pub fn run(o: &Options) -> anyhow::Result<Report> {
    let started = Instant::now();
    let totals = parking_lot::Mutex::new(Totals::default());
    let done = AtomicU64::new(0);
    run_seeds(o.first_seed, o.seeds, o.jobs, &|seed, r| {
        let mut t = totals.lock();
        match r {
            Ok(out) => {
                t.reads += out.reads_ok as u64;
                t.writes += out.writes_acked as u64;
                t.generations += out.generations;
                if !out.violations.is_empty() {
                    eprintln!("VIOLATION\n{}", out.report());
                    t.violations.push(out.report());
                }
            }
            Err(e) => t.errors.push(format!("seed {seed}: {e}")),
        }
        let n = done.fetch_add(1, Ordering::SeqCst) + 1;
        if n.is_multiple_of(1000) || n == o.seeds {
            eprintln!(
                "{n}/{} seeds, {} violations, {:.0} s",
                o.seeds,
                t.violations.len(),
                started.elapsed().as_secs_f64()
            );
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let t = totals.into_inner();
    let mut guards = Vec::new();
    let removals = sim::GUARDS
        .iter()
        .map(|g| (*g, true))
        .chain(sim::DEFENCE_IN_DEPTH.iter().map(|g| (*g, false)));
    for (guard, must_catch) in removals {
        fail::cfg(guard, "return").map_err(|e| anyhow::anyhow!("fail point {guard}: {e}"))?;
        let caught = parking_lot::Mutex::new(Vec::new());
        run_seeds(1, o.guard_seeds, o.jobs, &|seed, r| {
            if let Ok(out) = r
                && !out.violations.is_empty()
            {
                caught.lock().push((seed, out.report()));
            }
        });
        let mut caught = caught.into_inner();
        caught.sort_by_key(|c| c.0);
        let first = caught.first().cloned();
        // The first catch run again three times: each must break the promise again with the
        // very same history (the first of the four runs is the reference).
        let mut replayed = 0;
        if let Some((seed, _)) = &first {
            let run = || -> anyhow::Result<sim::Outcome> {
                let dir = tempfile::tempdir()?;
                sim::run(*seed, &sim::SimConfig::default(), dir.path()).map_err(anyhow::Error::msg)
            };
            let reference = run()?;
            for _ in 0..3 {
                let again = run()?;
                if !again.violations.is_empty()
                    && sim::first_difference(&reference, &again).is_none()
                {
                    replayed += 1;
                }
            }
        }
        fail::remove(guard);
        eprintln!(
            "{guard} removed: {} of {} seeds caught it, first seed {:?}, replayed {replayed}/3",
            caught.len(),
            o.guard_seeds,
            first.as_ref().map(|f| f.0)
        );
        guards.push(GuardReport {
            guard: guard.to_string(),
            must_catch,
            seeds: o.guard_seeds,
            caught: caught.len() as u64,
            first_caught: first.as_ref().map(|f| f.0),
            replayed,
            example: first.map(|f| f.1),
        });
    }
    let replay = replay(o.replays, o.jobs);
    eprintln!(
        "replay: {} of {} seeds gave the same results twice, {} the same history to the order \
         operations ended in (first that differed in results: {:?})",
        replay.same_results, replay.seeds, replay.identical, replay.first_different
    );
    if let Some(d) = &replay.first_difference {
        eprintln!("replay: {}", d.chars().take(400).collect::<String>());
    }
    if !replay.exact_build {
        eprintln!(
            "WARNING: built without --cfg tokio_unstable: waiters may wake in another order, so \
             seeds do not replay exactly (RUSTFLAGS=\"--cfg tokio_unstable\")"
        );
    }
    Ok(Report {
        replay,
        seeds: o.seeds,
        first_seed: o.first_seed,
        seconds,
        reads_checked: t.reads,
        writes_acked: t.writes,
        generations: t.generations,
        violations: t.violations,
        errors: t.errors,
        guards,
    })
}

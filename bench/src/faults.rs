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
    /// That seed run three more times: how often it failed again.
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
        let mut replayed = 0;
        if let Some((seed, _)) = &first {
            for _ in 0..3 {
                let dir = tempfile::tempdir()?;
                let again = sim::run(*seed, &sim::SimConfig::default(), dir.path());
                if again.is_ok_and(|a| !a.violations.is_empty()) {
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
    Ok(Report {
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

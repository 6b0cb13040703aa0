//! The real-process fault campaign: `shadowcache-node` processes (the release or debug build
//! beside this binary) under the faults an operator meets, each scenario with its own checker
//! and figures.
//!
//! - `storm.rs`: a boot storm with a reader killed (SIGKILL), a block's home stopped
//!   (SIGSTOP) and the owner killed and restarted;
//! - `storage.rs`: the SSD tier's slot file corrupted at random offsets while serving, the
//!   share of SSD-resident blocks that hit after a restart (clean and SIGKILL), and the data
//!   directory on a small filesystem that fills up;
//! - `origin.rs`: an NBD origin (`nbdkit` with its `error` and `delay` filters) that fails,
//!   stalls, is slow, and goes away and comes back;
//! - `partition.rs`: a lease holder cut off in both directions by taking down its veth link
//!   (each node in its own network namespace), and the owner restarted while its disk is
//!   detected.
//!
//! Every reader checks every byte against the image it read. A scenario that needs root (a
//! namespace, a mount) or a tool that is missing is reported as skipped with the reason,
//! never as passed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Map, Value};
use shadowcache_client::{Client, StatusResponse};
use shadowcache_testkit::{NodeProcess, free_peer_port, write_file};

mod origin;
mod partition;
mod storage;
mod storm;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Scenario names (empty: all of them).
    pub only: Vec<String>,
    /// Seconds each timed phase of a scenario lasts (the CI run uses the smallest).
    pub phase_seconds: f64,
    /// Where the scenarios put their nodes (a temporary directory by default).
    pub work_dir: Option<PathBuf>,
    /// Environment for every node process, e.g. `FAILPOINTS` to remove a guard in a node
    /// built with fail points (the proof that a scenario's checker can fail).
    pub node_env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            only: Vec::new(),
            phase_seconds: 2.0,
            work_dir: None,
            node_env: Vec::new(),
        }
    }
}

/// One scenario's result.
#[derive(Debug, Serialize)]
pub struct Outcome {
    /// Its name (`--scenario`).
    pub name: String,
    /// The guarantee it checks.
    pub guarantee: String,
    /// Whether every check held (false also when it could not run to the end).
    pub passed: bool,
    /// Why it did not run (root or a tool missing); a skipped scenario has not passed.
    pub skipped: Option<String>,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Its figures.
    pub figures: Map<String, Value>,
    /// The checks that failed, each with what was seen.
    pub violations: Vec<String>,
}

/// What a scenario reports as it runs: figures and checks.
#[derive(Debug, Default)]
pub struct Checks {
    figures: Map<String, Value>,
    violations: Vec<String>,
    skipped: Option<String>,
}

impl Checks {
    /// Records figure `name`.
    pub fn figure(&mut self, name: &str, v: impl Into<Value>) {
        self.figures.insert(name.to_string(), v.into());
    }

    /// Records a violation unless `ok`.
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let w = what();
            eprintln!("  VIOLATION: {w}");
            self.violations.push(w);
        }
    }

    /// Marks the scenario as not run, with the reason.
    pub fn skip(&mut self, why: impl Into<String>) {
        self.skipped = Some(why.into());
    }
}

/// What a scenario's run function returns.
pub type Fut<'a> = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

type Run = for<'a> fn(&'a Ctx, &'a mut Checks) -> Fut<'a>;

/// A scenario: its name, the guarantee it checks, and how to run it.
pub struct Scenario {
    /// Its name.
    pub name: &'static str,
    /// What it shows.
    pub guarantee: &'static str,
    run: Run,
}

/// Every scenario, in the order they run.
pub fn scenarios() -> Vec<Scenario> {
    let mut v = storm::scenarios();
    v.extend(storage::scenarios());
    v.extend(origin::scenarios());
    v.extend(partition::scenarios());
    v
}

/// What a scenario runs in.
pub struct Ctx {
    /// Its own directory.
    pub dir: PathBuf,
    /// Seconds each timed phase lasts.
    pub phase: Duration,
    /// Environment for every node process.
    pub env: Vec<(String, String)>,
}

/// Runs the scenarios chosen; prints progress to stderr.
pub async fn run(o: &Options) -> anyhow::Result<Vec<Outcome>> {
    let all = scenarios();
    for name in &o.only {
        anyhow::ensure!(
            all.iter().any(|s| s.name == name),
            "no scenario {name:?}; the scenarios are: {}",
            all.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        );
    }
    let tmp;
    let base = match &o.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut out = Vec::new();
    for s in all
        .into_iter()
        .filter(|s| o.only.is_empty() || o.only.iter().any(|n| n == s.name))
    {
        eprintln!("scenario {}: {}", s.name, s.guarantee);
        let ctx = Ctx {
            dir: base.join(s.name),
            phase: Duration::from_secs_f64(o.phase_seconds.max(0.5)),
            env: o.node_env.clone(),
        };
        // A work directory used before must not lend this run its disks, maps or SSD files.
        if ctx.dir.exists() {
            std::fs::remove_dir_all(&ctx.dir)
                .with_context(|| format!("clearing {}", ctx.dir.display()))?;
        }
        std::fs::create_dir_all(&ctx.dir)?;
        let started = Instant::now();
        let run = s.run;
        // A panic (a node that would not start) ends the scenario, not the campaign.
        let result = tokio::spawn(async move {
            let mut checks = Checks::default();
            let r = run(&ctx, &mut checks).await;
            (checks, r)
        })
        .await;
        let (mut checks, error) = match result {
            Ok((c, r)) => (c, r.err().map(|e| format!("{e:#}"))),
            Err(e) => (
                Checks::default(),
                Some(format!("the scenario panicked: {e}")),
            ),
        };
        if let Some(mut e) = error {
            // A node's panic carries its whole log: keep its end.
            if e.len() > 3000 {
                let mut cut = e.len() - 3000;
                while !e.is_char_boundary(cut) {
                    cut += 1;
                }
                e = format!("...{}", &e[cut..]);
            }
            eprintln!("  ERROR: {e}");
            checks
                .violations
                .push(format!("could not run to the end: {e}"));
        }
        let outcome = Outcome {
            name: s.name.to_string(),
            guarantee: s.guarantee.to_string(),
            passed: checks.violations.is_empty() && checks.skipped.is_none(),
            skipped: checks.skipped,
            seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            figures: checks.figures,
            violations: checks.violations,
        };
        eprintln!(
            "  {} in {:.1} s {}",
            match (&outcome.skipped, outcome.passed) {
                (Some(_), _) => "SKIPPED",
                (None, true) => "passed",
                (None, false) => "FAILED",
            },
            outcome.seconds,
            Value::Object(outcome.figures.clone())
        );
        out.push(outcome);
    }
    Ok(out)
}

/// Settings of the nodes' config file.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `cluster.gossip_interval_ms`.
    pub gossip_ms: u64,
    /// `cluster.phi_threshold`.
    pub phi: f64,
    /// `cluster.rpc_timeout_ms`.
    pub rpc_timeout_ms: u64,
    /// `detection.enabled`.
    pub detection: bool,
    /// `lease.term_ms`.
    pub lease_ms: u64,
    /// `lease.drift_margin_ms`.
    pub margin_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            gossip_ms: 200,
            phi: 10.0,
            rpc_timeout_ms: 1000,
            detection: false,
            lease_ms: 2000,
            margin_ms: 200,
        }
    }
}

impl Settings {
    /// The failure-detection bound these settings promise: chitchat declares a member dead
    /// once the silence since its last heartbeat exceeds `phi` mean heartbeat intervals (one
    /// gossip interval here); one more interval for the check to run and one for the news.
    pub fn detection_bound(&self) -> Duration {
        Duration::from_millis(((self.phi + 2.0) * self.gossip_ms as f64) as u64)
    }

    fn write(&self, path: &Path) {
        let text = format!(
            "[cluster]\nphi_threshold = {}\ngossip_interval_ms = {}\nrpc_timeout_ms = {}\n\n\
             [detection]\nenabled = {}\nwindow_ms = 10000\nmin_readers = 2\nmin_reads = 4\nquiet_period_ms = 400\n\n\
             [lease]\nterm_ms = {}\ndrift_margin_ms = {}\n",
            self.phi,
            self.gossip_ms,
            self.rpc_timeout_ms,
            self.detection,
            self.lease_ms,
            self.margin_ms
        );
        write_file(path, text.as_bytes());
    }
}

/// One node process of a scenario.
pub struct Host {
    /// Its node id.
    pub id: String,
    /// The process.
    pub process: NodeProcess,
    /// Its peer address (gossip and the Peer service).
    pub addr: String,
}

impl Host {
    /// Starts node `id` in `dir/id` with `settings`, joining `seed`, with `extra` flags and
    /// the scenario's environment plus `env` (see [`NodeProcess::start_with_env`]); `addr` is
    /// its peer address.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        ctx: &Ctx,
        dir: &Path,
        id: &str,
        addr: String,
        settings: Settings,
        seed: Option<&str>,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Host {
        // The config beside the scenario, not in `dir`: that may be a filesystem made full.
        let config = ctx.dir.join(format!("{id}.toml"));
        settings.write(&config);
        let mut args = vec![
            format!("--node-id={id}"),
            format!("--peer-listen={addr}"),
            format!("--config={}", config.display()),
        ];
        if let Some(s) = seed {
            args.push(format!("--seed={s}"));
        }
        args.extend_from_slice(extra);
        let mut all: Vec<(&str, &str)> = ctx
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        all.extend_from_slice(env);
        Host {
            id: id.to_string(),
            process: NodeProcess::start_with_env(&dir.join(id), &args, &all),
            addr,
        }
    }

    /// [`Host::start`] in the scenario's directory, on loopback with a free port.
    pub fn local(
        ctx: &Ctx,
        id: &str,
        settings: Settings,
        seed: Option<&str>,
        extra: &[String],
    ) -> Host {
        Host::local_in(ctx, &ctx.dir, id, settings, seed, extra)
    }

    /// [`Host::local`] with its data directory under `dir`.
    pub fn local_in(
        ctx: &Ctx,
        dir: &Path,
        id: &str,
        settings: Settings,
        seed: Option<&str>,
        extra: &[String],
    ) -> Host {
        let addr = format!("127.0.0.1:{}", free_peer_port());
        Host::start(ctx, dir, id, addr, settings, seed, extra, &[])
    }

    /// A client on its Unix socket.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Client::connect_unix(&self.process.socket)
            .await
            .with_context(|| format!("connecting to {}", self.id))
    }

    /// Its status (within 10 s).
    pub async fn status(&self) -> anyhow::Result<StatusResponse> {
        let c = self.client().await?;
        within(Duration::from_secs(10), "status", c.status()).await
    }

    /// Sends `signal` (STOP, CONT, KILL...) to the process.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.process.pid().context("the node is not running")?;
        let ok = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?
            .success();
        anyhow::ensure!(ok, "kill -{signal} {pid} failed");
        Ok(())
    }
}

/// The client has no deadline of its own: every call a scenario awaits goes through this, so
/// that a node that never answers fails the scenario instead of hanging it.
pub async fn within<T, E: std::fmt::Display>(
    limit: Duration,
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow::anyhow!("{what}: {e}")),
        Err(_) => Err(anyhow::anyhow!("{what}: no answer in {limit:?}")),
    }
}

/// Polls `ok` on `h`'s status every 50 ms until it holds; fails after `timeout`.
pub async fn until(
    h: &Host,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&StatusResponse) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = h.status().await
            && ok(&s)
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{}: timed out after {timeout:?} waiting for {what}",
            h.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether status `s` shows `n` members and disk `disk` owned by `owner`.
pub fn formed(s: &StatusResponse, n: usize, disk: &str, owner: &str) -> bool {
    s.members.len() == n && s.disks.iter().any(|d| d.id == disk && d.owner == owner)
}

/// An image of seeded random bytes at `path`, also kept in memory to check reads against.
pub fn image(path: &Path, bytes: usize, seed: u64) -> Arc<Vec<u8>> {
    Arc::new(shadowcache_testkit::random_image(path, bytes, seed))
}

/// How one read ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// The image's bytes.
    Ok,
    /// Bytes that are not the image's.
    Wrong,
    /// An error: its gRPC code and message.
    Failed(String),
}

/// One read, timed from the scenario's start.
#[derive(Debug, Clone)]
pub struct ReadOp {
    /// The reader's host (index into the scenario's hosts).
    pub host: usize,
    /// When it began.
    pub start: Duration,
    /// When it ended.
    pub end: Duration,
    /// How it ended.
    pub read: Read,
}

/// Readers of one disk at one host until `stop` is set (or `max_reads` each): random
/// `read_bytes`-aligned ranges, each checked against `image`.
pub struct Readers {
    tasks: Vec<tokio::task::JoinHandle<Vec<ReadOp>>>,
}

impl Drop for Readers {
    fn drop(&mut self) {
        // Readers of a scenario that failed stop with it.
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Where and what readers read.
#[derive(Clone)]
pub struct ReadPlan {
    /// The disk.
    pub disk: String,
    /// Its bytes.
    pub image: Arc<Vec<u8>>,
    /// Bytes per read.
    pub read_bytes: u64,
    /// Readers at the host.
    pub readers: usize,
    /// Reads per reader at most.
    pub max_reads: usize,
    /// A pause between reads (none: back to back).
    pub pause: Duration,
}

impl Readers {
    /// Starts `plan.readers` readers at `host` (index `idx`).
    pub async fn start(
        host: &Host,
        idx: usize,
        plan: &ReadPlan,
        t0: Instant,
        stop: Arc<AtomicBool>,
        seed: u64,
    ) -> anyhow::Result<Readers> {
        let mut tasks = Vec::new();
        for r in 0..plan.readers {
            let client = host.client().await?;
            let plan = plan.clone();
            let stop = stop.clone();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1000 + r as u64);
            tasks.push(tokio::spawn(async move {
                let disk = client.disk(&plan.disk);
                let pieces = plan.image.len() as u64 / plan.read_bytes;
                let mut ops = Vec::new();
                while !stop.load(Ordering::Relaxed) && ops.len() < plan.max_reads {
                    let off = rng.random_range(0..pieces) * plan.read_bytes;
                    let start = t0.elapsed();
                    let got = tokio::time::timeout(
                        Duration::from_secs(30),
                        disk.read_at(off, plan.read_bytes),
                    )
                    .await;
                    let read = match got {
                        Ok(Ok(b)) => {
                            let want = &plan.image[off as usize..(off + plan.read_bytes) as usize];
                            if b[..] == *want {
                                Read::Ok
                            } else {
                                Read::Wrong
                            }
                        }
                        Ok(Err(e)) => Read::Failed(failure(&e)),
                        Err(_) => Read::Failed("no answer in 30 s".into()),
                    };
                    let failed = matches!(read, Read::Failed(_));
                    ops.push(ReadOp {
                        host: idx,
                        start,
                        end: t0.elapsed(),
                        read,
                    });
                    if failed {
                        // A node that fails at once must not be spun on.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    } else if !plan.pause.is_zero() {
                        tokio::time::sleep(plan.pause).await;
                    }
                }
                ops
            }));
        }
        Ok(Readers { tasks })
    }

    /// Waits for every reader (set `stop` first).
    pub async fn finish(mut self) -> anyhow::Result<Vec<ReadOp>> {
        let mut all = Vec::new();
        for t in std::mem::take(&mut self.tasks) {
            all.extend(t.await.context("reader task")?);
        }
        Ok(all)
    }
}

/// Reads `[from, to)` of `disk` in pieces of `piece` bytes, each given 30 s and checked
/// against `image`: (right pieces, wrong pieces, failures).
pub async fn read_span(
    c: &Client,
    disk: &str,
    image: &[u8],
    (from, to): (u64, u64),
    piece: u64,
) -> (u64, u64, Vec<String>) {
    let d = c.disk(disk);
    let (mut right, mut wrong, mut failed) = (0, 0, Vec::new());
    let mut at = from;
    while at < to {
        let n = piece.min(to - at);
        match tokio::time::timeout(Duration::from_secs(30), d.read_at(at, n)).await {
            Ok(Ok(b)) if b[..] == image[at as usize..(at + n) as usize] => right += 1,
            Ok(Ok(_)) => wrong += 1,
            Ok(Err(e)) => failed.push(failure(&e)),
            Err(_) => failed.push(format!("read at {at}: no answer in 30 s")),
        }
        at += n;
    }
    (right, wrong, failed)
}

/// A client error as "Code: message".
pub fn failure(e: &shadowcache_client::ClientError) -> String {
    match e {
        shadowcache_client::ClientError::Status(s) => format!("{:?}: {}", s.code(), s.message()),
        other => format!("{other}"),
    }
}

/// Counts of reads by how they ended.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Tally {
    /// Reads.
    pub reads: u64,
    /// Of them, ended with an error.
    pub failed: u64,
    /// Of them, returned bytes that are not the image's.
    pub wrong: u64,
    /// The slowest, in milliseconds.
    pub max_ms: f64,
    /// The 99th percentile, in milliseconds.
    pub p99_ms: f64,
}

/// Tallies `ops` that pass `keep`.
pub fn tally<'a>(ops: impl IntoIterator<Item = &'a ReadOp>) -> Tally {
    let mut t = Tally::default();
    let mut lat: Vec<f64> = Vec::new();
    for op in ops {
        t.reads += 1;
        match op.read {
            Read::Ok => {}
            Read::Wrong => t.wrong += 1,
            Read::Failed(_) => t.failed += 1,
        }
        lat.push((op.end - op.start).as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    if let Some(m) = lat.last() {
        t.max_ms = round(*m);
        t.p99_ms = round(lat[((lat.len() as f64 * 0.99) as usize).min(lat.len() - 1)]);
    }
    t
}

/// Distinct failure messages among `ops` (at most `n`).
pub fn messages<'a>(ops: impl IntoIterator<Item = &'a ReadOp>, n: usize) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for op in ops {
        if let Read::Failed(m) = &op.read
            && !v.contains(m)
            && v.len() < n
        {
            v.push(m.clone());
        }
    }
    v
}

/// `x` to one decimal.
pub fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Milliseconds of `d`, to one decimal.
pub fn ms(d: Duration) -> f64 {
    round(d.as_secs_f64() * 1000.0)
}

/// Whether this process runs as root (namespaces, mounts).
pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file()))
}

/// Runs a command, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

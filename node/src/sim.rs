//! A seeded simulation of a cluster: three nodes running the real node code (detection, leases,
//! revocation, content maps, peer fetch, the read and write paths) in one process, over the
//! in-process network and a simulated clock, with every fault and every client operation drawn
//! from one seed; and a checker of the history it records.
//!
//! How it is built, and why not turmoil: the node already runs over seams for everything
//! nondeterministic ([`crate::Environment`]: clock, seed, membership, Peer service), and the
//! in-process implementations of those ([`crate::inprocess`]) call the other nodes' own
//! handlers. So a simulation needs no simulated TCP (turmoil's offer) underneath tonic: one
//! tokio current-thread runtime with paused time runs every node, a [`ManualClock`] that only
//! the simulator moves decides every lease and revocation (each node sees it through its own
//! drift), and the simulator decides what every link does with a call.
//!
//! Each seed draws: the nodes' clock drifts (within the configured margin), then a sequence of
//! steps: reads at any process (old incarnations included), versioned writes at the owner or
//! forwarded by a member, clock moves, links cut, held (a call waits: delay and reordering),
//! losing replies (the callee acted, the caller gets an error), delivering calls twice (a
//! retry) or healed in one direction, the owner's origin failing every call or slow, a member
//! or the owner restarted on its data directory (a new incarnation), and a second process
//! started under a member's id while the first one keeps running. Then every link heals, time moves until every operation has ended, and every
//! process reads every block once more.
//!
//! The checker ([`check`]) holds the history to DESIGN.md's promise: a read that began after a
//! write of its block was acknowledged returns that write's version or a later one; every read
//! returns a version some write produced, whole (no torn or foreign bytes).
//!
//! Replay: a seed runs the same way every time, down to the order the nodes' tasks run in,
//! in a build with `--cfg tokio_unstable` ([`exact_replay`]; `scripts/test.sh` sets it). What
//! it takes: one current-thread runtime on paused time; tokio's own random choices (which of a
//! watch channel's waiters wakes first, `select!` branches) seeded from the seed through
//! `Builder::rng_seed`, which only that cfg offers; blocking work run inline
//! ([`crate::blocking`]) rather than on real threads, the origin's reads and writes split in
//! two with a yield between so that they still overlap; the node's selects biased; and its
//! hash maps keyed the same in every run ([`crate::hashing`]). Without the cfg a seed replays
//! the same faults and operations, but waiters may wake in another order.
//!
//! Architecture invariant: test support only (built with the `failpoints` feature); nothing in
//! the node depends on it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::clock::{Clock, ManualClock};
use crate::config::Config;
use crate::inprocess::{InProcessNet, Link, member_config};
use crate::server::{RunningNode, start_in};

/// The protocol's guards, each removable in a test build through the fail point of its name,
/// and each one that the simulation catches when it is removed: the owner waits for every
/// holder (or its lease's end) before it applies a write; a holder stops serving before it
/// acknowledges a revocation; the drift margin on both sides; the fence of an owner restarted
/// while a disk was detected; the incarnation checks on grants and revocations.
pub const GUARDS: &[&str] = &[
    "guard-owner-waits-for-holders",
    "guard-holder-stops-before-ack",
    "guard-drift-margin",
    "guard-restart-fence",
    "guard-incarnation",
];

/// Guards whose removal no history can show, in this model: the generation and epoch checks
/// on ContentMap, FetchBlocks, Read and block maps. A member serves a disk's old generation
/// only under its lease, which the owner revokes or waits out before the generation ends, and
/// bytes fetched for a generation are checked against its fingerprints: an answer for another
/// generation is newer content or fails that check. The simulation never registers a second
/// disk under the same id, the case the epoch check keeps apart. (`docs/reliability.md` says
/// more; the faults report runs them anyway.)
pub const DEFENCE_IN_DEPTH: &[&str] = &["guard-generation-check"];

/// Whether this build replays a seed exactly (built with `--cfg tokio_unstable`, which lets
/// the simulation seed tokio's random choices).
pub fn exact_replay() -> bool {
    cfg!(tokio_unstable)
}

/// The disk every simulation reads and writes.
pub const DISK: &str = "vdi";
const IDS: [&str; 3] = ["a", "b", "c"];

/// What a simulation runs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Steps of the workload before everything heals.
    pub steps: usize,
    /// Blocks of the disk.
    pub blocks: u64,
    /// Bytes a block.
    pub block_bytes: u64,
    /// Lease term.
    pub term_ms: u64,
    /// Drift margin.
    pub margin_ms: u64,
    /// Largest clock drift of a node, in parts per million (both ways).
    pub drift_ppm: u64,
    /// Restarts and second incarnations (off: reads, writes, clock and links only).
    pub restarts: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            steps: 80,
            blocks: 4,
            block_bytes: 4096,
            term_ms: 2_000,
            margin_ms: 200,
            // 5%: 100 ms over a 2 s term, within the 200 ms margin.
            drift_ppm: 50_000,
            restarts: true,
        }
    }
}

/// A client operation and what came of it.
#[derive(Debug, Clone)]
pub struct Op {
    /// Read or write, where, of what.
    pub kind: OpKind,
    /// Event number when it was sent.
    pub start: u64,
    /// Event number when it ended (`None`: it never did).
    pub end: Option<u64>,
    /// The simulated time it was sent at (ms since the start).
    pub at_ms: u64,
    /// The versions read (one a block; [`MIXED`] for a block that was not one whole version),
    /// or the error.
    pub result: Option<std::result::Result<Vec<u64>, String>>,
    /// The bytes of each block read that was not one whole version.
    pub mixed: Vec<(u64, Bytes)>,
}

/// The version recorded for a block read that was not one whole version of it.
pub const MIXED: u64 = u64::MAX;

/// What an [`Op`] was.
#[derive(Debug, Clone)]
pub enum OpKind {
    /// Blocks `first..first + count` read at process `at`.
    Read {
        /// Node id and incarnation.
        at: String,
        /// First block.
        first: u64,
        /// Blocks.
        count: u64,
    },
    /// Version `version` of block `block` written through process `at`.
    Write {
        /// Node id and incarnation.
        at: String,
        /// Block.
        block: u64,
        /// Version written.
        version: u64,
    },
}

/// A broken promise found in a history.
#[derive(Debug, Clone)]
pub struct Violation {
    /// What was wrong.
    pub what: String,
    /// The block.
    pub block: u64,
    /// The read (an index into the history).
    pub op: usize,
}

/// One seed's run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Every operation.
    pub history: Vec<Op>,
    /// What the checker found.
    pub violations: Vec<Violation>,
    /// Reads that returned data.
    pub reads_ok: usize,
    /// Writes acknowledged.
    pub writes_acked: usize,
    /// Times the owner detected the disk (generations it moved through).
    pub generations: u64,
    /// The faults of the run, in words, in order.
    pub faults: Vec<String>,
}

impl Outcome {
    /// The seed and, for the first violation, the operations on its block: enough to read
    /// what happened and to replay it.
    pub fn report(&self) -> String {
        let mut s = format!(
            "seed {}: {} violation(s)\n",
            self.seed,
            self.violations.len()
        );
        let Some(v) = self.violations.first() else {
            return s;
        };
        let _ = writeln!(s, "first: {} (op {})", v.what, v.op);
        let _ = writeln!(s, "faults: {}", self.faults.join("; "));
        let _ = writeln!(s, "operations on block {}:", v.block);
        for (n, op) in self.history.iter().enumerate() {
            let touches = match &op.kind {
                OpKind::Read { first, count, .. } => (*first..first + count).contains(&v.block),
                OpKind::Write { block, .. } => *block == v.block,
            };
            if touches {
                let _ = writeln!(
                    s,
                    "  #{n} [{}..{}] t={}ms {:?} -> {:?}",
                    op.start,
                    op.end.map_or("-".to_string(), |e| e.to_string()),
                    op.at_ms,
                    op.kind,
                    op.result
                );
            }
        }
        s
    }
}

/// Where two runs of one seed parted (`None`: the same faults and the very same history, down
/// to the order operations ended in): the replay check of `node/tests/sim.rs` and
/// `shadowcache-bench faults --replays`.
pub fn first_difference(a: &Outcome, b: &Outcome) -> Option<String> {
    if let Some(i) =
        (0..a.faults.len().max(b.faults.len())).find(|i| a.faults.get(*i) != b.faults.get(*i))
    {
        return Some(format!(
            "fault {i}: {:?} then {:?}",
            a.faults.get(i),
            b.faults.get(i)
        ));
    }
    // The bytes of a torn block by their hash: a history's difference fits on a line.
    let show = |o: Option<&Op>| {
        o.map(|o| {
            let mixed: Vec<_> = o
                .mixed
                .iter()
                .map(|(b, bytes)| (b, blake3::hash(bytes).to_hex()[..16].to_string()))
                .collect();
            format!(
                "{:?} [{}..{:?}] t={}ms -> {:?} {mixed:?}",
                o.kind, o.start, o.end, o.at_ms, o.result
            )
        })
    };
    (0..a.history.len().max(b.history.len()))
        .map(|i| (i, show(a.history.get(i)), show(b.history.get(i))))
        .find(|(_, x, y)| x != y)
        .map(|(i, x, y)| format!("operation {i}: {x:?} then {y:?}"))
}

/// Block `i` of version `v`: its index and version repeated, so a read shows both.
pub fn block(i: u64, v: u64, bytes: u64) -> Vec<u8> {
    let mut rec = [0u8; 16];
    rec[..8].copy_from_slice(&i.to_le_bytes());
    rec[8..].copy_from_slice(&v.to_le_bytes());
    rec.iter().copied().cycle().take(bytes as usize).collect()
}

/// The version block `i` holds in `b`, if `b` is one whole version of block `i`.
fn version_of(i: u64, b: &[u8]) -> Option<u64> {
    let v = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
    (b == block(i, v, b.len() as u64)).then_some(v)
}

/// A clock that runs at its own rate against the simulator's: a node's drift.
#[derive(Debug)]
struct Drifting {
    base: Arc<ManualClock>,
    origin: Duration,
    /// Parts per million faster (positive) or slower than the base.
    ppm: i64,
}

impl Drifting {
    fn scale(&self, d: Duration) -> Duration {
        let ns = d.as_nanos() as i128;
        Duration::from_nanos((ns + ns * self.ppm as i128 / 1_000_000).max(0) as u64)
    }
}

impl Clock for Drifting {
    fn now(&self) -> Duration {
        self.origin + self.scale(self.base.now().saturating_sub(self.origin))
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        // `d` on this clock is d / rate on the base; rounded up, so it never ends early.
        let ns = d.as_nanos();
        let rate = (1_000_000 + self.ppm).max(1) as u128;
        let base = (ns * 1_000_000).div_ceil(rate) + 1;
        self.base.sleep(Duration::from_nanos(base as u64))
    }
}

#[derive(Debug, Default)]
struct History {
    seq: u64,
    ops: Vec<Op>,
}

/// Numbers the start of operation `n`: called in its task right before it calls the node, so
/// that nothing that ends before can look concurrent with it.
fn started(history: &Shared, n: usize) {
    let mut h = history.lock();
    h.seq += 1;
    h.ops[n].start = h.seq;
}

type Shared = Arc<parking_lot::Mutex<History>>;

/// A running process of the simulation.
struct Proc {
    id: &'static str,
    boot: u64,
    dir: PathBuf,
    running: RunningNode,
}

impl Proc {
    fn name(&self) -> String {
        format!("{}#{}", self.id, self.boot)
    }
}

struct Sim {
    cfg: SimConfig,
    dir: PathBuf,
    image: PathBuf,
    net: InProcessNet,
    base: Arc<ManualClock>,
    start: Duration,
    drift: BTreeMap<&'static str, i64>,
    procs: Vec<Proc>,
    /// The processes that are their ids' live incarnations (index into `procs`), by id.
    current: BTreeMap<&'static str, usize>,
    boots: u64,
    history: Shared,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Next version of each block; whether a write of it is outstanding.
    next: Vec<u64>,
    writing: Vec<Arc<std::sync::atomic::AtomicBool>>,
    faults: Vec<String>,
    rng: StdRng,
    /// Processes killed by a restart (their tasks still exist in this process).
    dead: Vec<Proc>,
    /// The node last cut off from the others: half of the random reads go to it.
    isolated: Option<&'static str>,
    /// What the owner's origin does now.
    origin: Arc<OriginFaults>,
}

impl Sim {
    fn config(&self, id: &str, dir: &Path) -> Config {
        let owns = (id == "a").then_some((DISK, self.image.as_path()));
        let lease = (self.cfg.term_ms, self.cfg.margin_ms);
        let mut c = member_config(dir, id, self.cfg.block_bytes as u32, lease, owns);
        c.ram_bytes = 1 << 20;
        c
    }

    /// Starts a new incarnation of `id` in `dir`; it becomes the id's live process.
    async fn start(&mut self, id: &'static str, dir: PathBuf, seed: u64) -> Result<(), String> {
        self.boots += 1;
        let boot = self.boots;
        let clock: Arc<dyn Clock> = Arc::new(Drifting {
            base: self.base.clone(),
            origin: self.start,
            ppm: self.drift[id],
        });
        let mut env = self.net.environment(id, boot, clock.clone(), seed);
        let faults = self.origin.clone();
        env.origin_wrap = Some(crate::origin::OriginWrap(Arc::new(move |_, inner| {
            Arc::new(FaultyOrigin {
                inner,
                faults: faults.clone(),
                clock: clock.clone(),
            })
        })));
        let running = start_in(self.config(id, &dir), env)
            .await
            .map_err(|e| format!("{e:#}"))?;
        self.net.attach(id, running.node());
        self.procs.push(Proc {
            id,
            boot,
            dir,
            running,
        });
        self.current.insert(id, self.procs.len() - 1);
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        (self.base.now() - self.start).as_millis() as u64
    }

    /// Lets every task run until none can without time moving.
    async fn settle(&self) {
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
    }

    /// Moves time by `ms`, in steps of at most a fortieth of a term (timers fire close to
    /// when they are due); with `reading`, a read at a random process after each step with
    /// probability one half, so that reads fall into every window a guard closes.
    async fn advance(&mut self, ms: u64, reading: bool) {
        let mut left = ms;
        while left > 0 {
            let d = left.min(self.cfg.term_ms / 40).max(1);
            self.base.advance(Duration::from_millis(d));
            left -= d;
            if self.rng.random_bool(0.3) {
                self.net.gossip_round();
            }
            self.settle().await;
            if reading && self.rng.random_bool(0.5) {
                self.random_read();
            }
        }
    }

    fn random_read(&mut self) {
        let blocks = self.cfg.blocks;
        // Mostly at members (the owner's own reads cannot be stale): any process, old
        // incarnations included, but the owner's current one only one time in four.
        let mut p = self.rng.random_range(0..self.procs.len());
        if self.current.get("a") == Some(&p) && self.rng.random_bool(0.75) {
            p = self.rng.random_range(0..self.procs.len());
        }
        if let Some(id) = self.isolated
            && self.rng.random_bool(0.5)
            && let Some(c) = self.current.get(id)
        {
            p = *c;
        }
        let first = self.rng.random_range(0..blocks);
        let count = self.rng.random_range(1..=(blocks - first).min(3));
        self.read(p, first, count);
    }

    /// Records operation `kind`; its start is numbered by [`started`] when its task runs.
    fn begin(&self, kind: OpKind) -> usize {
        let at_ms = self.now_ms();
        let mut h = self.history.lock();
        h.ops.push(Op {
            kind,
            start: 0,
            end: None,
            at_ms,
            result: None,
            mixed: Vec::new(),
        });
        h.ops.len() - 1
    }

    fn read(&mut self, p: usize, first: u64, count: u64) {
        let node = self.procs[p].running.node().clone();
        let n = self.begin(OpKind::Read {
            at: self.procs[p].name(),
            first,
            count,
        });
        let (history, bs) = (self.history.clone(), self.cfg.block_bytes);
        self.tasks.push(tokio::spawn(async move {
            started(&history, n);
            tracing::trace!(op = n, "read starts");
            let r = node.read(DISK, first * bs, count * bs).await;
            tracing::trace!(op = n, ok = r.is_ok(), "read ends");
            let mut mixed = Vec::new();
            let r = r.map_err(|e| e.to_string()).and_then(|b| {
                if b.len() as u64 != count * bs {
                    return Err(format!("{} bytes read, {} asked", b.len(), count * bs));
                }
                Ok((0..count)
                    .map(|k| {
                        let at = (k * bs) as usize;
                        let bytes = b.slice(at..at + bs as usize);
                        version_of(first + k, &bytes).unwrap_or_else(|| {
                            mixed.push((first + k, bytes));
                            MIXED
                        })
                    })
                    .collect())
            });
            let mut h = history.lock();
            h.seq += 1;
            let end = h.seq;
            h.ops[n].end = Some(end);
            h.ops[n].result = Some(r);
            h.ops[n].mixed = mixed;
        }));
    }

    fn write(&mut self, p: usize, i: u64) {
        let busy = self.writing[i as usize].clone();
        if busy.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let v = self.next[i as usize];
        self.next[i as usize] += 1;
        let node = self.procs[p].running.node().clone();
        let n = self.begin(OpKind::Write {
            at: self.procs[p].name(),
            block: i,
            version: v,
        });
        let (history, bs) = (self.history.clone(), self.cfg.block_bytes);
        self.tasks.push(tokio::spawn(async move {
            started(&history, n);
            let r = node
                .write(DISK, i * bs, Bytes::from(block(i, v, bs)))
                .await
                .map(|()| vec![v])
                .map_err(|e| e.to_string());
            let mut h = history.lock();
            h.seq += 1;
            let end = h.seq;
            h.ops[n].end = Some(end);
            h.ops[n].result = Some(r);
            busy.store(false, std::sync::atomic::Ordering::SeqCst);
        }));
    }

    fn isolate(&mut self, id: &'static str, link: Link) {
        self.faults
            .push(format!("t={} isolate {id} {link:?}", self.now_ms()));
        for other in IDS.iter().filter(|o| **o != id) {
            self.net.set_link(id, other, link);
            self.net.set_link(other, id, link);
        }
        self.isolated = Some(id);
    }

    /// Holder `id` cut off from the others; a write at the owner of a block it read last;
    /// that block read at the holder every 50 ms until a while after the write ended (a
    /// lease term at most); then the links heal.
    async fn cut_off_holder(&mut self, id: &'static str, link: Link) {
        let (Some(&p), Some(&owner)) = (self.current.get(id), self.current.get("a")) else {
            return;
        };
        self.isolate(id, link);
        self.write_watched_at(owner, p).await;
        self.faults.push(format!("t={} heal", self.now_ms()));
        self.heal();
        self.isolated = None;
    }

    /// A second process under holder `id`'s id (a cloned host) joins; then a write at the
    /// owner of a block the first process read last, read there every 50 ms until a while
    /// after the write ended: only the first process's own acknowledgement, or its lease's
    /// end, may let the write land.
    async fn clone_holder(&mut self, id: &'static str, seed: u64) -> Result<(), String> {
        let (Some(&p), Some(&owner)) = (self.current.get(id), self.current.get("a")) else {
            return Ok(());
        };
        self.faults
            .push(format!("t={} clone of holder {id}", self.now_ms()));
        let d = self.dir.join(format!("{id}-{}", self.boots + 1));
        self.start(id, d, seed).await?;
        self.write_watched_at(owner, p).await;
        Ok(())
    }

    /// A write at process `writer` of the block process `p` read last, then that block read
    /// at `p` every 50 ms until half a lease term after the write ended (two terms at most).
    async fn write_watched_at(&mut self, writer: usize, p: usize) {
        let name = self.procs[p].name();
        let last = self
            .history
            .lock()
            .ops
            .iter()
            .rev()
            .find_map(|o| match (&o.kind, &o.result) {
                (OpKind::Read { at, first, .. }, Some(Ok(_))) if *at == name => Some(*first),
                _ => None,
            });
        let i = last.unwrap_or_else(|| self.rng.random_range(0..self.cfg.blocks));
        let busy = self.writing[i as usize].clone();
        self.write(writer, i);
        let step = 50;
        let mut after_ms = 0;
        for _ in 0..2 * (self.cfg.term_ms + self.cfg.margin_ms) / step {
            self.advance(step, false).await;
            self.read(p, i, 1);
            if !busy.load(std::sync::atomic::Ordering::SeqCst) {
                after_ms += step;
                if after_ms > self.cfg.term_ms / 2 {
                    break;
                }
            }
        }
    }

    fn heal(&self) {
        self.origin.set(OriginMode::Well);
        for from in IDS {
            for to in IDS {
                if from != to {
                    self.net.set_link(from, to, Link::Open);
                }
            }
        }
    }

    /// Restarts the live process of `id` on its data directory: a new incarnation.
    async fn restart(&mut self, id: &'static str, seed: u64) -> Result<(), String> {
        let Some(p) = self.current.remove(id) else {
            return Ok(());
        };
        let proc = self.procs.remove(p);
        for c in self.current.values_mut() {
            if *c > p {
                *c -= 1;
            }
        }
        // Killed: none of its writes reaches the origin any more, no call reaches it, and it
        // does not leave the cluster: the others learn of its successor by gossip.
        proc.running.node().halt();
        self.net.detach(id);
        self.settle().await;
        // What it saved, in a directory of its own: the old process's tasks keep its data
        // directory's lock, where a killed process's would not.
        let dir = self.dir.join(format!("{id}-{}", self.boots + 1));
        copy_saved(&proc.dir, &dir).map_err(|e| format!("copy {}: {e}", proc.dir.display()))?;
        self.dead.push(proc);
        self.start(id, dir, seed).await
    }
}

/// Copies the regular files of data directory `from` (but its lock) to `to`.
fn copy_saved(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let t = e.file_type()?;
        let target = to.join(e.file_name());
        if t.is_dir() {
            copy_saved(&e.path(), &target)?;
        } else if t.is_file() && e.file_name() != "lock" {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

/// What the owner's origin does, as the simulation sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OriginMode {
    Well,
    /// Every read, write and flush fails (EIO).
    Failing,
    /// Every call takes this many milliseconds (of tokio's time) more.
    Slow(u64),
}

#[derive(Debug)]
struct OriginFaults(parking_lot::Mutex<OriginMode>);

impl Default for OriginFaults {
    fn default() -> Self {
        OriginFaults(parking_lot::Mutex::new(OriginMode::Well))
    }
}

impl OriginFaults {
    fn set(&self, m: OriginMode) {
        *self.0.lock() = m;
    }
}

/// An origin that fails or is slow when the simulation says so.
#[derive(Debug)]
struct FaultyOrigin {
    inner: Arc<dyn crate::origin::Origin>,
    faults: Arc<OriginFaults>,
    /// The node's clock: a slow call takes its time on the simulation's clock, which moves
    /// the leases, not on tokio's.
    clock: Arc<dyn Clock>,
}

impl FaultyOrigin {
    async fn gate(&self, op: &'static str, offset: u64) -> Result<(), crate::origin::OriginError> {
        let mode = *self.faults.0.lock();
        match mode {
            OriginMode::Well => Ok(()),
            OriginMode::Failing => Err(crate::origin::OriginError::Io {
                origin: self.inner.describe().to_string(),
                op,
                offset,
                cause: "simulated EIO".into(),
            }),
            OriginMode::Slow(ms) => {
                self.clock.sleep(Duration::from_millis(ms)).await;
                Ok(())
            }
        }
    }
}

/// Where a read or write of `len` bytes is split in two (0: not split): half way, on a
/// 512-byte boundary.
fn split(len: usize) -> usize {
    (len / 2) & !511
}

impl crate::origin::Origin for FaultyOrigin {
    fn describe(&self) -> &str {
        self.inner.describe()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, offset: u64, len: usize) -> crate::origin::OriginFuture<'_, Bytes> {
        Box::pin(async move {
            self.gate("read", offset).await?;
            // In two halves with a yield between, as a read on a real thread overlaps a write
            // on another: a write that lands between them tears the read, unless the node
            // keeps them apart.
            let half = split(len);
            if half == 0 {
                return self.inner.read_at(offset, len).await;
            }
            let first = self.inner.read_at(offset, half).await?;
            tokio::task::yield_now().await;
            let second = self.inner.read_at(offset + half as u64, len - half).await?;
            let mut whole = Vec::with_capacity(len);
            whole.extend_from_slice(&first);
            whole.extend_from_slice(&second);
            Ok(Bytes::from(whole))
        })
    }

    fn write_at(&self, offset: u64, data: Bytes) -> crate::origin::OriginFuture<'_, ()> {
        Box::pin(async move {
            self.gate("write", offset).await?;
            let half = split(data.len());
            if half == 0 {
                return self.inner.write_at(offset, data).await;
            }
            self.inner.write_at(offset, data.slice(..half)).await?;
            tokio::task::yield_now().await;
            self.inner
                .write_at(offset + half as u64, data.slice(half..))
                .await
        })
    }

    fn flush(&self) -> crate::origin::OriginFuture<'_, ()> {
        Box::pin(async move {
            self.gate("flush", 0).await?;
            self.inner.flush().await
        })
    }

    fn identity(&self) -> Option<String> {
        self.inner.identity()
    }
}

/// Runs seed `seed` of `cfg` in `dir` (a fresh directory) and checks its history.
pub fn run(seed: u64, cfg: &SimConfig, dir: &Path) -> Result<Outcome, String> {
    // File reads and writes complete where the seed decides (see `FaultyOrigin`), not when a
    // real thread of the blocking pool gets to them.
    let _inline = crate::blocking::Inline::on_this_thread();
    let mut b = tokio::runtime::Builder::new_current_thread();
    b.enable_all().start_paused(true);
    // Which of a watch channel's waiters wakes first is tokio's random choice: seeded, it is
    // the same in every run of the seed.
    #[cfg(tokio_unstable)]
    b.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
    let rt = b.build().map_err(|e| e.to_string())?;
    let mut out = rt.block_on(simulate(seed, cfg.clone(), dir.to_path_buf()))?;
    // Errors name the run's directory: written `<dir>`, a replay elsewhere reads the same.
    let at = dir.display().to_string();
    for op in &mut out.history {
        if let Some(Err(e)) = &mut op.result {
            *e = e.replace(&at, "<dir>");
        }
    }
    Ok(out)
}

async fn simulate(seed: u64, cfg: SimConfig, dir: PathBuf) -> Result<Outcome, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let image = dir.join("vdi.raw");
    let mut data = Vec::new();
    for i in 0..cfg.blocks {
        data.extend(block(i, 1, cfg.block_bytes));
    }
    std::fs::write(&image, &data).map_err(|e| e.to_string())?;
    let base = ManualClock::new(Duration::from_secs(1_000));
    let drift = IDS
        .iter()
        .map(|id| {
            let d = cfg.drift_ppm as i64;
            // Half of the time at the end of the range that a margin must cover: an owner
            // fast, a member slow (it counts its lease longer than the owner does).
            let worst = if *id == "a" { d } else { -d };
            let ppm = match rng.random_range(0..4) {
                _ if d == 0 => 0,
                0 | 1 => worst,
                _ => rng.random_range(-d..=d),
            };
            (*id, ppm)
        })
        .collect();
    let mut sim = Sim {
        start: base.now(),
        base,
        dir: dir.clone(),
        image,
        net: InProcessNet::new(),
        drift,
        procs: Vec::new(),
        current: BTreeMap::new(),
        boots: 0,
        history: Shared::default(),
        tasks: Vec::new(),
        next: vec![2; cfg.blocks as usize],
        writing: (0..cfg.blocks).map(|_| Arc::default()).collect(),
        faults: Vec::new(),
        rng: StdRng::seed_from_u64(rng.random()),
        dead: Vec::new(),
        isolated: None,
        origin: Arc::default(),
        cfg,
    };
    for id in IDS {
        let d = sim.dir.join(format!("{id}-1"));
        sim.start(id, d, rng.random()).await?;
    }
    // Members learn the owner's disk over the in-process membership; from then on gossip
    // spreads in rounds as time moves (a round every 170 ms on average).
    for _ in 0..200 {
        let seen = sim
            .current
            .values()
            .all(|p| sim.procs[*p].running.node().stat(DISK).is_ok());
        if seen {
            break;
        }
        sim.settle().await;
    }
    sim.net.gossip_in_rounds();
    let blocks = sim.cfg.blocks;
    for _ in 0..sim.cfg.steps {
        let roll = rng.random_range(0..102u32);
        tracing::trace!(roll, t = sim.now_ms(), "simulation step");
        match roll {
            // Reads: at any process, old incarnations included.
            0..40 => sim.random_read(),
            // Writes: at the owner, or forwarded by a member.
            40..50 => {
                let at = if rng.random_bool(0.7) {
                    "a"
                } else {
                    IDS[rng.random_range(1..3)]
                };
                let i = rng.random_range(0..blocks);
                if let Some(p) = sim.current.get(at).copied() {
                    sim.write(p, i);
                }
            }
            50..76 => {
                let ms = rng.random_range(1..=sim.cfg.term_ms / 4);
                sim.advance(ms, true).await;
            }
            76..78 => {
                // The owner's origin fails every call, or is slow, or is well again.
                let mode = match rng.random_range(0..3) {
                    0 => OriginMode::Failing,
                    1 => OriginMode::Slow(rng.random_range(1..=sim.cfg.term_ms / 4)),
                    _ => OriginMode::Well,
                };
                sim.faults
                    .push(format!("t={} origin {mode:?}", sim.now_ms()));
                sim.origin.set(mode);
            }
            78..90 => {
                let from = IDS[rng.random_range(0..3)];
                let to = IDS[(IDS.iter().position(|x| *x == from).unwrap_or(0)
                    + rng.random_range(1..3))
                    % 3];
                let link = match rng.random_range(0..5) {
                    0 => Link::Cut,
                    1 => Link::Held,
                    2 => Link::LoseReply,
                    3 => Link::Twice,
                    _ => Link::Open,
                };
                sim.faults
                    .push(format!("t={} {from}->{to} {link:?}", sim.now_ms()));
                sim.net.set_link(from, to, link);
            }
            90..92 => {
                sim.faults.push(format!("t={} heal", sim.now_ms()));
                sim.heal();
                sim.isolated = None;
            }
            92 => {
                // One node cut off from the others, both ways (calls and gossip).
                let id = IDS[rng.random_range(0..3)];
                let link = if rng.random_bool(0.5) {
                    Link::Cut
                } else {
                    Link::Held
                };
                sim.isolate(id, link);
            }
            98..101 => {
                // A lease holder cut off, then a write at the owner: the write must wait for
                // its lease, and the holder must stop serving by then on its own clock.
                let holders: Vec<&'static str> = IDS[1..]
                    .iter()
                    .copied()
                    .filter(|id| {
                        sim.current.get(id).is_some_and(|p| {
                            let n = sim.procs[*p].running.node();
                            n.stat(DISK).is_ok_and(|d| d.lease_valid)
                        })
                    })
                    .collect();
                if holders.is_empty() {
                    sim.advance(sim.cfg.term_ms / 4, true).await;
                } else {
                    let id = holders[rng.random_range(0..holders.len())];
                    if roll == 100 && sim.cfg.restarts && sim.procs.len() < 6 {
                        let s = rng.random();
                        sim.clone_holder(id, s).await?;
                    } else {
                        let link = if rng.random_bool(0.5) {
                            Link::Cut
                        } else {
                            Link::Held
                        };
                        sim.cut_off_holder(id, link).await;
                    }
                }
            }
            93..96 if sim.cfg.restarts => {
                // A member (or, less often, the owner) restarted on its data directory.
                let id = if rng.random_bool(0.5) {
                    "a"
                } else {
                    IDS[rng.random_range(1..3)]
                };
                sim.faults.push(format!("t={} restart {id}", sim.now_ms()));
                let s = rng.random();
                sim.restart(id, s).await?;
                if id == "a" && rng.random_bool(0.5) {
                    // A write soon after an owner's restart: before members renew their leases
                    // with the new process, only its fence holds it.
                    let i = rng.random_range(0..blocks);
                    if let Some(p) = sim.current.get("a").copied() {
                        sim.write(p, i);
                    }
                }
            }
            96..98 if sim.cfg.restarts && sim.procs.len() < 6 => {
                // A second process under a member's id (a cloned host); the first keeps
                // running and serving its own clients.
                let id = IDS[rng.random_range(1..3)];
                sim.faults.push(format!("t={} second {id}", sim.now_ms()));
                let d = sim.dir.join(format!("{id}-{}", sim.boots + 1));
                let s = rng.random();
                sim.start(id, d, s).await?;
            }
            _ => {
                let ms = sim.cfg.term_ms + sim.cfg.margin_ms;
                sim.advance(ms, true).await;
            }
        }
        sim.settle().await;
    }
    // Heal, then let time run until every operation has ended.
    sim.heal();
    sim.faults.push(format!("t={} heal (end)", sim.now_ms()));
    let mut rounds = 0;
    while sim.tasks.iter().any(|t| !t.is_finished()) && rounds < 200 {
        sim.advance(sim.cfg.term_ms / 4, false).await;
        rounds += 1;
    }
    // A last read of every block at every process.
    for p in 0..sim.procs.len() {
        sim.read(p, 0, blocks);
    }
    rounds = 0;
    while sim.tasks.iter().any(|t| !t.is_finished()) && rounds < 200 {
        sim.advance(sim.cfg.term_ms / 4, false).await;
        rounds += 1;
    }
    let generations = sim
        .current
        .get("a")
        .and_then(|p| sim.procs[*p].running.node().stat(DISK).ok())
        .map_or(0, |d| d.generation);
    for t in sim.tasks.drain(..) {
        t.abort();
    }
    for p in sim.procs.drain(..).chain(sim.dead.drain(..)) {
        let _ = p.running.shutdown().await;
    }
    let history = std::mem::take(&mut sim.history.lock().ops);
    let mut violations = check(&history);
    for (n, op) in history.iter().enumerate() {
        if op.end.is_none() {
            let block = match op.kind {
                OpKind::Read { first, .. } => first,
                OpKind::Write { block, .. } => block,
            };
            violations.push(Violation {
                what: "never ended, though every link healed and time ran on".into(),
                block,
                op: n,
            });
        }
    }
    Ok(Outcome {
        seed,
        reads_ok: history
            .iter()
            .filter(|o| matches!(o.kind, OpKind::Read { .. }) && matches!(o.result, Some(Ok(_))))
            .count(),
        writes_acked: history
            .iter()
            .filter(|o| matches!(o.kind, OpKind::Write { .. }) && matches!(o.result, Some(Ok(_))))
            .count(),
        history,
        violations,
        generations,
        faults: sim.faults,
    })
}

/// A write as the checker sees it: version, start, end (if it ended), acknowledged.
type WriteSpan = (u64, u64, Option<u64>, bool);

/// Checks a history: every read that began after a write of its block was acknowledged returns
/// that write's version or a later one; every read returns the image's version (1) or one a
/// write sent before the read ended produced, whole, unless a write of the block ran while it
/// did: then, as on a disk, each byte may come from any version it could return.
pub fn check(history: &[Op]) -> Vec<Violation> {
    // Per block, every write: (version, start, end, acknowledged). A write that failed may
    // have landed while it ran (its bytes reached the origin before the error), never after:
    // a forwarded write past its deadline is dropped, not sent.
    let mut writes: BTreeMap<u64, Vec<WriteSpan>> = BTreeMap::new();
    for op in history {
        if let OpKind::Write { block, version, .. } = op.kind {
            let acked = matches!(op.result, Some(Ok(_)));
            writes
                .entry(block)
                .or_default()
                .push((version, op.start, op.end, acked));
        }
    }
    let block_bytes = history
        .iter()
        .flat_map(|o| o.mixed.iter())
        .map(|(_, b)| b.len() as u64)
        .next()
        .unwrap_or(0);
    let mut out = Vec::new();
    for (n, op) in history.iter().enumerate() {
        let (OpKind::Read { first, .. }, Some(Ok(versions)), Some(end)) =
            (&op.kind, &op.result, op.end)
        else {
            continue;
        };
        for (k, &v) in versions.iter().enumerate() {
            let b = first + k as u64;
            let ws = writes.get(&b).map(Vec::as_slice).unwrap_or(&[]);
            let must = ws
                .iter()
                .filter(|(_, _, e, acked)| *acked && e.is_some_and(|e| e < op.start))
                .map(|(v, ..)| *v)
                .max()
                .unwrap_or(1);
            if v == MIXED {
                // A write of the block that ran while the read did.
                let overlapped = ws
                    .iter()
                    .any(|(_, s, e, _)| *s < end && e.is_none_or(|e| e > op.start));
                let possible: Vec<Vec<u8>> = std::iter::once(1)
                    .chain(ws.iter().filter(|(_, s, ..)| *s < end).map(|(w, ..)| *w))
                    .filter(|w| *w >= must)
                    .map(|w| block(b, w, block_bytes))
                    .collect();
                let bytes = op.mixed.iter().find(|(i, _)| *i == b).map(|(_, x)| x);
                let explained = overlapped
                    && bytes.is_some_and(|x| {
                        x.iter()
                            .enumerate()
                            .all(|(i, c)| possible.iter().any(|p| p.get(i) == Some(c)))
                    });
                if !explained {
                    out.push(Violation {
                        what: format!(
                            "block {b} read torn or foreign bytes{}",
                            if overlapped {
                                " (bytes no version it could return has)"
                            } else {
                                " (no write of it ran meanwhile)"
                            }
                        ),
                        block: b,
                        op: n,
                    });
                }
                continue;
            }
            if v < must {
                out.push(Violation {
                    what: format!(
                        "block {b} read version {v} after version {must} was acknowledged (stale)"
                    ),
                    block: b,
                    op: n,
                });
            }
            if v != 1 && !ws.iter().any(|(w, s, ..)| *w == v && *s < end) {
                out.push(Violation {
                    what: format!("block {b} read version {v}, which no write had sent"),
                    block: b,
                    op: n,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, start: u64, end: u64, result: Vec<u64>) -> Op {
        Op {
            kind,
            start,
            end: Some(end),
            at_ms: 0,
            result: Some(Ok(result)),
            mixed: Vec::new(),
        }
    }

    fn read(first: u64, vs: Vec<u64>, start: u64, end: u64) -> Op {
        op(
            OpKind::Read {
                at: "b#2".into(),
                first,
                count: vs.len() as u64,
            },
            start,
            end,
            vs,
        )
    }

    fn write(block: u64, version: u64, start: u64, end: u64) -> Op {
        op(
            OpKind::Write {
                at: "a#1".into(),
                block,
                version,
            },
            start,
            end,
            vec![version],
        )
    }

    #[test]
    fn the_checker_finds_stale_foreign_and_torn_reads_and_passes_the_rest() {
        // Write v2 of block 0 acknowledged at 3; a read from 4 on must see 2.
        let ok = vec![
            write(0, 2, 1, 3),
            read(0, vec![1], 2, 5), // overlaps the write: either version
            read(0, vec![2], 2, 5),
            read(0, vec![2, 1], 4, 6),
        ];
        assert!(check(&ok).is_empty(), "{:?}", check(&ok));
        let stale = vec![write(0, 2, 1, 3), read(0, vec![1], 4, 6)];
        let v = check(&stale);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].what.contains("stale"), "{v:?}");
        // Version 3 was never sent before the read ended.
        let foreign = vec![read(0, vec![3], 1, 2), write(0, 3, 4, 5)];
        assert!(check(&foreign)[0].what.contains("no write had sent"));
        let mut torn = read(1, vec![MIXED], 4, 6);
        let mut half = block(1, 1, 64);
        half[32..].copy_from_slice(&block(1, 2, 64)[32..]);
        torn.mixed = vec![(1, Bytes::from(half.clone()))];
        // No write of block 1 ran meanwhile: a torn block is a violation.
        assert!(check(std::slice::from_ref(&torn))[0].what.contains("torn"));
        // Version 2 written while the read ran: old and new bytes mixed, as on a disk.
        assert!(check(&[write(1, 2, 5, 7), torn.clone()]).is_empty());
        // ... but not once version 2 was acknowledged before the read began.
        assert!(!check(&[write(1, 2, 1, 3), torn.clone()]).is_empty());
        // ... nor after a failed write of version 2 ended before the read began.
        let mut failed2 = write(1, 2, 1, 3);
        failed2.result = Some(Err("late".into()));
        assert!(!check(&[failed2, torn.clone()]).is_empty());
        // ... nor bytes no version has.
        half[40] ^= 0xff;
        torn.mixed = vec![(1, Bytes::from(half))];
        assert!(!check(&[write(1, 2, 5, 7), torn]).is_empty());
        // A failed write's version may be read (it may have landed), but requires nothing.
        let mut failed = write(0, 2, 1, 3);
        failed.result = Some(Err("unavailable".into()));
        assert!(check(&[failed.clone(), read(0, vec![1], 4, 5)]).is_empty());
        assert!(check(&[failed, read(0, vec![2], 4, 5)]).is_empty());
    }

    #[test]
    fn a_drifting_clock_runs_at_its_rate_and_its_sleeps_never_end_early() {
        let base = ManualClock::new(Duration::from_secs(10));
        let fast = Drifting {
            base: base.clone(),
            origin: base.now(),
            ppm: 50_000,
        };
        base.advance(Duration::from_secs(2));
        assert_eq!(fast.now(), Duration::from_millis(12_100));
        let slow = Drifting {
            base: base.clone(),
            origin: base.now(),
            ppm: -50_000,
        };
        let mut sleep = slow.sleep(Duration::from_millis(950));
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        base.advance(Duration::from_millis(999));
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        base.advance(Duration::from_millis(2));
        assert!(sleep.as_mut().poll(&mut cx).is_ready());
    }
}

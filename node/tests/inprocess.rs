//! Three nodes in one process over the in-process membership and Peer service, on one manual
//! clock that only the test moves: detection, leases, revocation and a cut-off holder, driven
//! step by step with no real waiting for leases to run out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shadowcache_node::clock::{Clock, ManualClock};
use shadowcache_node::inprocess::{InProcessNet, Link, member_config};
use shadowcache_node::{Config, DiskMode, RunningNode, start_in};

const BS: u64 = 16 << 10;
const BLOCKS: u64 = 64;
const TERM_MS: u64 = 2_000;
const MARGIN_MS: u64 = 200;

/// Block `i` of version `v`: its index and version repeated, so a read shows both.
fn block(i: u64, v: u64) -> Vec<u8> {
    let mut rec = [0u8; 16];
    rec[..8].copy_from_slice(&i.to_le_bytes());
    rec[8..].copy_from_slice(&v.to_le_bytes());
    rec.iter().copied().cycle().take(BS as usize).collect()
}

fn version_of(i: u64, b: &[u8]) -> u64 {
    let v = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    assert_eq!(b, &block(i, v)[..], "block {i} is not one whole version");
    v
}

struct Cluster {
    net: InProcessNet,
    clock: Arc<ManualClock>,
    nodes: Vec<RunningNode>,
}

impl Cluster {
    fn node(&self, id: &str) -> &Arc<shadowcache_node::Node> {
        let n = ["a", "b", "c"].iter().position(|x| *x == id).expect("id");
        self.nodes[n].node()
    }

    /// Moves the clock by `ms`, then lets the nodes' tasks run on it.
    async fn step(&self, ms: u64) {
        self.clock.advance(Duration::from_millis(ms));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    /// Writes version `new` of block `i` at the owner while `reader` reads it after every
    /// clock step: until the write is acknowledged the reader may serve `old` or `new` (once the
    /// owner applied it), never anything else. Returns how long the write took on the clock.
    async fn write_while_read(
        &self,
        reader: &Arc<shadowcache_node::Node>,
        i: u64,
        (old, new): (u64, u64),
    ) -> Duration {
        let started = self.clock.now();
        let writer = {
            let a = self.node("a").clone();
            tokio::spawn(async move { a.write("vdi", i * BS, Bytes::from(block(i, new))).await })
        };
        let mut waited_ms = 0;
        while !writer.is_finished() {
            let got = reader
                .read("vdi", i * BS, BS)
                .await
                .expect("a reader reads");
            let v = version_of(i, &got);
            assert!(v == old || v == new, "served version {v} of block {i}");
            self.step(100).await;
            waited_ms += 100;
            assert!(waited_ms <= 10 * TERM_MS, "the write never landed");
        }
        writer.await.expect("task").expect("write");
        self.clock.now() - started
    }

    fn mode_at(&self, at: &str) -> Option<(DiskMode, u64)> {
        self.node(at)
            .stat("vdi")
            .ok()
            .map(|d| (d.mode, d.generation))
    }

    /// Reads at b and c (counted by the owner) and moves the clock until the owner detects
    /// the disk past generation `after`, and b and c see it.
    async fn detect(&self, after: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for m in ["b", "c"] {
                let n = self.node(m);
                n.read("vdi", 0, 4096).await.expect("read");
            }
            self.step(150).await;
            if let Some((DiskMode::Detected, g)) = self.mode_at("a")
                && g > after
                && ["b", "c"]
                    .iter()
                    .all(|m| self.mode_at(m) == Some((DiskMode::Detected, g)))
            {
                return g;
            }
            assert!(Instant::now() < deadline, "vdi not detected past {after}");
        }
    }
}

/// The configuration of member `id` of the test cluster (the owner `a` registers the image;
/// `b2` is a second process with id `b`, in a directory of its own).
fn config(dir: &std::path::Path, id: &str, image: &std::path::Path) -> Config {
    let owns = (id == "a").then_some(("vdi", image));
    let node_id = id.trim_end_matches(char::is_numeric);
    member_config(
        &dir.join(id),
        node_id,
        BS as u32,
        (TERM_MS, MARGIN_MS),
        owns,
    )
}

async fn cluster(dir: &std::path::Path) -> Cluster {
    let net = InProcessNet::new();
    let clock = ManualClock::new(Duration::from_secs(1_000));
    let image = dir.join("vdi.raw");
    let mut data = Vec::new();
    for i in 0..BLOCKS {
        data.extend(block(i, 1));
    }
    std::fs::write(&image, &data).expect("image");
    let mut nodes = Vec::new();
    for (n, id) in ["a", "b", "c"].into_iter().enumerate() {
        let c = config(dir, id, &image);
        let env = net.environment(id, 1, clock.clone(), 7 + n as u64);
        let running = start_in(c, env).await.expect("start");
        net.attach(id, running.node());
        nodes.push(running);
    }
    let c = Cluster { net, clock, nodes };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !["b", "c"].iter().all(|m| c.mode_at(m).is_some()) {
        assert!(Instant::now() < deadline, "b and c never saw a's disk");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detection_leases_and_revocation_run_in_one_process_on_a_manual_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cluster(dir.path()).await;
    let (a, b, cc) = (c.node("a"), c.node("b"), c.node("c"));

    // Reads by two members, then a quiet period on the manual clock: detected.
    let g1 = c.detect(0).await;
    assert!(g1 >= 2);

    // b and c read the whole disk under leases, from their caches after the first pass.
    for n in [b, cc] {
        for _ in 0..2 {
            let got = n.read("vdi", 0, BS * BLOCKS).await.expect("read");
            for i in 0..BLOCKS {
                let at = (i * BS) as usize;
                assert_eq!(version_of(i, &got[at..at + BS as usize]), 1);
            }
        }
    }
    let holders = a.stat("vdi").expect("stat").lease_holders;
    assert_eq!(holders, vec!["b".to_string(), "c".to_string()]);
    let before = b.status().counters;
    b.read("vdi", 0, BS * BLOCKS).await.expect("read");
    let after = b.status().counters;
    assert_eq!(
        (after.owner_read_bytes, after.peer_read_bytes),
        (before.owner_read_bytes, before.peer_read_bytes),
        "b's third pass left its cache"
    );

    // A write at the owner: both holders acknowledge the revocation, then it lands; no member
    // serves the old block after.
    a.write("vdi", 3 * BS, Bytes::from(block(3, 2)))
        .await
        .expect("write");
    for n in [a, b, cc] {
        let got = n
            .read("vdi", 3 * BS, BS)
            .await
            .expect("read after the write");
        assert_eq!(version_of(3, &got), 2, "a member served the replaced block");
    }
    assert_eq!(c.mode_at("a").map(|m| m.0), Some(DiskMode::Mutable));

    // Detected again; c holds a lease, then the owner cannot reach c.
    let g2 = c.detect(g1).await;
    cc.read("vdi", 5 * BS, BS)
        .await
        .expect("c reads under a lease");
    b.read("vdi", 5 * BS, BS)
        .await
        .expect("b reads under a lease");
    assert!(
        a.stat("vdi")
            .expect("stat")
            .lease_holders
            .contains(&"c".to_string())
    );
    c.net.set_link("a", "c", Link::Cut);
    // The write waits for c's lease to run out on the owner's count: a term and a margin.
    let waited = c.write_while_read(cc, 5, (1, 3)).await;
    assert!(
        waited >= Duration::from_millis(TERM_MS / 2),
        "the write landed after {waited:?} of a {TERM_MS} ms lease held by a member it could not reach"
    );
    // Once acknowledged, c (cut off, its lease over by its own count) reads the new block.
    for n in [a, b, cc] {
        let got = n
            .read("vdi", 5 * BS, BS)
            .await
            .expect("read after the write");
        assert_eq!(version_of(5, &got), 3, "a member served the replaced block");
    }
    assert!(g2 > g1);
    for n in c.nodes {
        n.shutdown().await.expect("shutdown");
    }
}

/// Issue 18: the owner detects a disk on the read that makes it qualify, not at its next tick,
/// and a member that forwards reads learns it from the owner's answer, not from gossip. Here
/// the clock stands still once the quiet period is over (no tick of detection runs after the
/// reads) and gossip is held (no member's advertised disk list changes): b still comes to
/// serve the disk as detected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detection_happens_on_the_read_and_reaches_the_reader_with_its_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cluster(dir.path()).await;
    let (a, b, cc) = (c.node("a"), c.node("b"), c.node("c"));
    c.step(1_000).await;
    c.net.gossip_in_rounds();
    assert_eq!(c.mode_at("a").map(|m| m.0), Some(DiskMode::Mutable));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for n in [b, cc] {
            let got = n.read("vdi", 2 * BS, BS).await.expect("read");
            assert_eq!(version_of(2, &got), 1);
        }
        if c.mode_at("b").map(|m| m.0) == Some(DiskMode::Detected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b never learned of the detection (a: {:?}, b: {:?})",
            c.mode_at("a"),
            c.mode_at("b")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.mode_at("a").map(|m| m.0), Some(DiskMode::Detected));
    // b serves it from its cache under a lease from now on, once the lease is granted: on a
    // loaded machine the grant can trail b's first reads (the full suite failed here once).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.stat("vdi").expect("stat").lease_valid {
        b.read("vdi", 0, BS * BLOCKS).await.expect("read");
        assert!(Instant::now() < deadline, "b never got a lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.read("vdi", 0, BS * BLOCKS).await.expect("read");
    let before = b.status().counters;
    b.read("vdi", 0, BS * BLOCKS).await.expect("read");
    let after = b.status().counters;
    assert_eq!(after.owner_read_bytes, before.owner_read_bytes);
    assert!(
        a.stat("vdi")
            .expect("stat")
            .lease_holders
            .contains(&"b".to_string())
    );
    for n in c.nodes {
        n.shutdown().await.expect("shutdown");
    }
}

/// Issue 16, item 1: a second process started with a member's node id (a cloned host) takes
/// that id's place in membership and answers its calls. The owner's revocation for the first
/// process's lease reaches the second, which must not acknowledge it: the owner waits the
/// lease out, and the first process never serves the replaced block after the write is
/// acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_a_members_id_cannot_acknowledge_its_revocation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path()).await;
    let a = c.node("a").clone();
    let b1 = c.node("b").clone();
    let g1 = c.detect(0).await;
    let got = b1.read("vdi", 3 * BS, BS).await.expect("b reads");
    assert_eq!(version_of(3, &got), 1);
    assert!(
        b1.stat("vdi").expect("stat").lease_valid,
        "b holds no lease"
    );

    // B2: node id "b", another boot, in its own data directory. It replaces B1 in the live set
    // and receives every call addressed to "b".
    let image = dir.path().join("vdi.raw");
    let env = c.net.environment("b", 2, c.clock.clone(), 99);
    let b2 = start_in(config(dir.path(), "b2", &image), env)
        .await
        .expect("b2 starts");
    c.net.attach("b", b2.node());
    let deadline = Instant::now() + Duration::from_secs(30);
    while b2.node().stat("vdi").is_err() {
        assert!(Instant::now() < deadline, "b2 never saw a's disk");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let waited = c.write_while_read(&b1, 3, (1, 2)).await;
    assert!(
        waited >= Duration::from_millis(TERM_MS / 2),
        "the write landed after {waited:?}: another process's acknowledgement ended b1's {TERM_MS} ms lease"
    );
    for n in [&a, &b1, b2.node()] {
        let got = n.read("vdi", 3 * BS, BS).await.expect("read after");
        assert_eq!(version_of(3, &got), 2, "a member served the replaced block");
    }
    // The owner waited b1's lease out: b1 is no live incarnation any more, and b2's word does
    // not count for it.
    assert!(a.status().leases.expiries >= 1, "no lease was waited out");
    assert!(g1 >= 2);
    b2.shutdown().await.expect("shutdown b2");
    for n in c.nodes.drain(..) {
        n.shutdown().await.expect("shutdown");
    }
}

/// Issue 16, item 3: NBD BLOCK_STATUS at a member answers from the owner's map only while the
/// member holds a lease; once the lease is over (the owner unreachable), a hole the map knew of
/// is reported as data, since the owner may have written there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_at_a_member_needs_its_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path()).await;
    let (a, b) = (c.node("a").clone(), c.node("b").clone());
    // Block 7 all zeroes, while the disk is mutable.
    a.write("vdi", 7 * BS, Bytes::from(vec![0u8; BS as usize]))
        .await
        .expect("zero block 7");
    c.detect(0).await;
    b.read("vdi", 0, BS * BLOCKS).await.expect("b reads it all");
    assert!(b.stat("vdi").expect("stat").lease_valid, "b holds no lease");
    let hole = shadowcache_node::nbd::proto::STATE_HOLE | shadowcache_node::nbd::proto::STATE_ZERO;
    assert_eq!(
        b.allocation("vdi", 7 * BS, BS, 64),
        vec![(BS as u32, hole)],
        "under a lease, the owner's hole"
    );
    // The owner becomes unreachable; b's lease runs out on its own count.
    c.net.set_link("b", "a", Link::Cut);
    c.net.set_link("a", "b", Link::Cut);
    for _ in 0..(TERM_MS / 100 + 5) {
        c.step(100).await;
    }
    assert!(
        !b.stat("vdi").expect("stat").lease_valid,
        "b's lease did not run out"
    );
    assert_eq!(
        b.allocation("vdi", 7 * BS, BS, 64),
        vec![(BS as u32, 0)],
        "without a lease, a hole the owner may have written is reported"
    );
    for n in c.nodes.drain(..) {
        n.shutdown().await.expect("shutdown");
    }
}

/// Issue 16 item 2, the forwarded case: a write that b forwarded, held on the way to the owner
/// until b gave up on it, must never land over the retry that c had acknowledged meanwhile.
/// The owner refuses it: it arrived after the deadline b sent with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_held_until_its_sender_gave_up_never_lands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path()).await;
    let (a, b, cc) = (
        c.node("a").clone(),
        c.node("b").clone(),
        c.node("c").clone(),
    );
    c.net.set_link("b", "a", Link::Held);
    let first = {
        let b = b.clone();
        tokio::spawn(async move { b.write("vdi", 3 * BS, Bytes::from(block(3, 2))).await })
    };
    // b waits twice the time the owner has to take the write; move the clock past it.
    let mut waited_ms = 0;
    while !first.is_finished() {
        c.step(500).await;
        waited_ms += 500;
        assert!(waited_ms <= 120_000, "b never gave up on its write");
    }
    let err = first
        .await
        .expect("task")
        .expect_err("a write held on its way until b gave up");
    assert!(err.to_string().contains("not acknowledged"), "{err}");
    // The client retries through c: acknowledged.
    cc.write("vdi", 3 * BS, Bytes::from(block(3, 3)))
        .await
        .expect("the retry through c");
    // Now the first write reaches the owner, late.
    c.net.set_link("b", "a", Link::Open);
    let settled = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settled {
        let got = a.read("vdi", 3 * BS, BS).await.expect("read at a");
        assert_eq!(
            version_of(3, &got),
            3,
            "the write b gave up on landed over the acknowledged retry"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let origin = std::fs::read(dir.path().join("vdi.raw")).expect("origin");
    assert_eq!(
        version_of(3, &origin[(3 * BS) as usize..(4 * BS) as usize]),
        3
    );
    // A forwarded write that is not late still lands.
    b.write("vdi", 4 * BS, Bytes::from(block(4, 5)))
        .await
        .expect("a timely forwarded write");
    assert_eq!(
        version_of(4, &a.read("vdi", 4 * BS, BS).await.expect("read")),
        5
    );
    for n in c.nodes.drain(..) {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_whose_owner_left_is_unavailable_and_says_why_not_unknown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cluster(dir.path()).await;
    let b = c.node("b").clone();
    b.read("vdi", 0, BS).await.expect("read while a is there");
    // a leaves the cluster (dead to everyone); b drops its disks.
    c.net.kill("a");
    let deadline = Instant::now() + Duration::from_secs(30);
    let err = loop {
        match b.read("vdi", 0, BS).await {
            Err(e)
                if e.kind() == shadowcache_node::error::ErrorKind::Peer
                    && e.to_string().contains("left the cluster") =>
            {
                break e;
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "b never said that the owner left: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let msg = err.to_string();
    assert!(msg.contains("owner a") && msg.contains("\"vdi\""), "{msg}");
    assert_eq!(
        err.code(),
        shadowcache_node::error::Code::Unavailable,
        "{msg}"
    );
    // A disk nobody ever owned is still unknown.
    let unknown = b.read("nope", 0, BS).await.expect_err("unknown disk");
    assert_eq!(unknown.code(), shadowcache_node::error::Code::NotFound);
}

/// Issue 18: a member that needs one block of a sealed disk makes the owner read that block
/// for its map, not the chunk of the map around it (1,024 blocks); the block the owner read
/// for the map is the one the member then fetches, and the owner does not read it from its
/// origin twice. A member reading the whole disk makes the owner read each block once.
/// Owner `a` with a sealed disk "big" of `blocks` blocks, and member `b` (64 MiB of RAM,
/// `read_ahead` bytes of read-ahead) that sees it sealed; the net must outlive them.
async fn owner_and_member(
    dir: &std::path::Path,
    blocks: u64,
    read_ahead: u64,
) -> (InProcessNet, Vec<RunningNode>) {
    let net = InProcessNet::new();
    let clock = ManualClock::new(Duration::from_secs(1_000));
    let image = dir.join("big.raw");
    let mut data = Vec::new();
    for i in 0..blocks {
        data.extend(block(i, 1));
    }
    std::fs::write(&image, &data).expect("image");
    let mut nodes = Vec::new();
    for (n, id) in ["a", "b"].into_iter().enumerate() {
        let owns = (id == "a").then_some(("big", image.as_path()));
        let mut c = member_config(&dir.join(id), id, BS as u32, (TERM_MS, MARGIN_MS), owns);
        c.ram_bytes = 64 << 20;
        c.cluster.read_ahead = read_ahead;
        let env = net.environment(id, 1, clock.clone(), 40 + n as u64);
        let running = start_in(c, env).await.expect("start");
        net.attach(id, running.node());
        nodes.push(running);
    }
    let (a, b) = (nodes[0].node(), nodes[1].node());
    a.set_mode("big", DiskMode::Sealed).await.expect("seal");
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.stat("big").ok().map(|d| d.mode) != Some(DiskMode::Sealed) {
        assert!(Instant::now() < deadline, "b never saw big sealed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (net, nodes)
}

/// Reads blocks `blocks` of "big" at `node`, `per` blocks a read, front to back, and checks
/// each.
async fn read_through(node: &shadowcache_node::Node, blocks: std::ops::Range<u64>, per: u64) {
    for first in blocks.clone().step_by(per as usize) {
        let n = per.min(blocks.end - first);
        let got = node.read("big", first * BS, n * BS).await.expect("read");
        for i in 0..n {
            let at = (i * BS) as usize;
            assert_eq!(version_of(first + i, &got[at..at + BS as usize]), 1);
        }
    }
}

/// Waits until `f` holds (real time: read-ahead runs in tasks of its own).
async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_costs_the_owner_a_window_of_reads_and_each_block_once() {
    const BIG: u64 = 2048;
    let dir = tempfile::tempdir().expect("tempdir");
    // The default read-ahead (16 MiB): the sequential pass below is read ahead of.
    let (_net, nodes) = owner_and_member(
        dir.path(),
        BIG,
        shadowcache_node::cluster::DEFAULT_READ_AHEAD,
    )
    .await;
    let (a, b) = (nodes[0].node().clone(), nodes[1].node().clone());
    let origin = || a.status().counters.origin_read_bytes;
    let before = origin();
    let got = b.read("big", 1000 * BS, BS).await.expect("read");
    assert_eq!(version_of(1000, &got), 1);
    assert_eq!(
        origin() - before,
        BS,
        "one block at a member: the owner reads it, once"
    );
    let got = b.read("big", 1200 * BS, 3 * BS).await.expect("read");
    assert_eq!(version_of(1202, &got[2 * BS as usize..]), 1);
    assert_eq!(origin() - before, 4 * BS, "three more blocks, read once");
    // In 1 MiB reads, front to back: the reads after the first chunk ask ahead, for the map
    // and for blocks.
    read_through(&b, 0..BIG, 64).await;
    assert_eq!(
        origin() - before,
        BIG * BS,
        "the whole disk at a member: the owner reads each block once"
    );
    assert!(
        b.status().counters.read_ahead_blocks > 0,
        "a sequential pass is read ahead of"
    );
    for n in nodes {
        n.shutdown().await.expect("shutdown");
    }
}

/// The read-ahead tests' disk, in blocks.
const AHEAD_DISK_BLOCKS: u64 = 1024;
/// Their read-ahead window, in blocks (1 MiB; the read-ahead is two windows).
const WINDOW: u64 = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_reader_at_a_member_finds_its_next_blocks_fetched_ahead_a_random_one_does_not()
{
    const BLOCKS: u64 = AHEAD_DISK_BLOCKS;
    let dir = tempfile::tempdir().expect("tempdir");
    let (net, nodes) = owner_and_member(dir.path(), BLOCKS, 2 * WINDOW * BS).await;
    let b = nodes[1].node().clone();
    // What b fetched: all from the owner, the only other member.
    let fetched = || b.status().counters.owner_read_bytes / BS;

    // Scattered reads in the second half: nothing is fetched ahead of them.
    for i in (0..48).map(|i| BLOCKS / 2 + (i * 397) % (BLOCKS / 2)) {
        let got = b.read("big", i * BS, BS).await.expect("read");
        assert_eq!(version_of(i, &got), 1);
    }
    let asked = || b.reads().stats().read_ahead_asked.get();
    assert_eq!(asked(), 0, "no read asked for anything ahead");
    assert_eq!(fetched(), 48, "b fetched what was read, nothing more");

    // A sequential reader, 4 blocks a read, through the first two windows. It asks for each
    // window once its end is no further ahead than the reader has read: window 1 at block 64
    // (which it then reads itself, joining or taking what was fetched of it), window 2 at 96,
    // window 3 at 128; no read asks for more.
    read_through(&b, 0..2 * WINDOW, 4).await;
    assert_eq!(asked(), 3 * WINDOW, "windows 1 to 3");
    until("windows 0 to 3 are at b, each block fetched once", || {
        fetched() == 48 + 4 * WINDOW
    })
    .await;
    until("windows 2 and 3 are fetched ahead", || {
        b.status().counters.read_ahead_blocks >= 2 * WINDOW
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fetched(), 48 + 4 * WINDOW, "nothing past window 3");

    // Windows 2 and 3 are at b: read with b cut off from the owner, they come from b's
    // read-ahead buffer. Each is a miss of the cache, admitted by the read as its first touch:
    // a scan read ahead enters the cache as a scan, not as blocks read twice.
    net.set_link("b", "a", Link::Cut);
    let c0 = b.status().counters;
    read_through(&b, 2 * WINDOW..4 * WINDOW, 4).await;
    let c1 = b.status().counters;
    assert_eq!(c1.read_ahead_used - c0.read_ahead_used, 2 * WINDOW);
    assert_eq!(
        c1.owner_read_bytes, c0.owner_read_bytes,
        "nothing fetched for them"
    );
    assert_eq!(c1.misses - c0.misses, 2 * WINDOW);
    assert_eq!(c1.promotions, 0, "no block was read twice");
    for i in 2 * WINDOW..4 * WINDOW {
        let fp = shadowcache_node::Fingerprint::of(&block(i, 1));
        assert!(
            b.cache().tier_of(&fp).is_some(),
            "block {i} is cached once read"
        );
    }
    net.set_link("b", "a", Link::Open);
    for n in nodes {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_joins_a_fetch_ahead_in_flight_gets_its_blocks_and_caches_them() {
    const BLOCKS: u64 = AHEAD_DISK_BLOCKS;
    let dir = tempfile::tempdir().expect("tempdir");
    let (net, nodes) = owner_and_member(dir.path(), BLOCKS, 2 * WINDOW * BS).await;
    let b = nodes[1].node().clone();
    let fetched = || b.status().counters.owner_read_bytes / BS;
    read_through(&b, 0..2 * WINDOW, 4).await;
    until("windows 0 to 3 are at b", || fetched() == 4 * WINDOW).await;
    until("windows 2 and 3 are fetched ahead", || {
        b.status().counters.read_ahead_blocks >= 2 * WINDOW
    })
    .await;
    // The owner's map of window 4 is here (asked ahead of the read-ahead of window 3), so the
    // read-ahead of window 4 needs the link only for its blocks.
    until("b knows the owner's map up to window 4", || {
        b.stat("big").is_ok_and(|d| d.known_blocks >= 5 * WINDOW)
    })
    .await;
    // The owner's replies are held: the reads of blocks 128 to 160 come from the read-ahead
    // buffer, and the last asks for window 4, whose fetch waits on the link; a read of its
    // first blocks then finds that fetch in flight and waits for it.
    net.set_link("b", "a", Link::Held);
    let c0 = b.status().counters;
    read_through(&b, 2 * WINDOW..2 * WINDOW + 32, 4).await;
    until("window 4's fetch is in flight", || {
        b.reads().flights() >= WINDOW as usize
    })
    .await;
    let reader = {
        let b = b.clone();
        tokio::spawn(async move { read_through(&b, 4 * WINDOW..4 * WINDOW + 4, 4).await })
    };
    until("the reader waits for the fetch ahead in flight", || {
        b.status().counters.single_flight_joins - c0.single_flight_joins == 4
    })
    .await;
    net.set_link("b", "a", Link::Open);
    reader.await.expect("reader");
    until("window 4 is at b", || fetched() == 5 * WINDOW).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c2 = b.status().counters;
    assert_eq!(
        c2.owner_read_bytes - c0.owner_read_bytes,
        WINDOW * BS,
        "window 4 crossed the network once"
    );
    for i in 4 * WINDOW..4 * WINDOW + 4 {
        let fp = shadowcache_node::Fingerprint::of(&block(i, 1));
        assert!(
            b.cache().tier_of(&fp).is_some(),
            "block {i} is cached once read"
        );
    }
    assert_eq!(c2.read_ahead_used - c0.read_ahead_used, 32 + 4);
    assert_eq!(b.reads().flights(), 0, "no flight left behind");
    for n in nodes {
        n.shutdown().await.expect("shutdown");
    }
}

/// Found in review: a member that takes block fetches and never answers cost every cold read
/// of a block its map claimed the fetch timeout (once as a holder, once as the block's home),
/// and was asked again for the next one. Now a member that fails a fetch is not asked for
/// blocks for a while (`SUSPECT_FOR`): the first read pays one timeout, the next go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_never_answers_costs_one_timeout_not_one_a_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = InProcessNet::new();
    let image = dir.path().join("vdi.raw");
    let data: Vec<u8> = (0..BS * BLOCKS)
        .map(|i| (i / BS * 7 + i % 251) as u8)
        .collect();
    std::fs::write(&image, &data).expect("image");
    let mut nodes = Vec::new();
    for (n, id) in ["a", "b", "c"].into_iter().enumerate() {
        let owns = (id == "a").then_some(("vdi", image.as_path()));
        let mut c = member_config(
            &dir.path().join(id),
            id,
            BS as u32,
            (TERM_MS, MARGIN_MS),
            owns,
        );
        for d in &mut c.disks {
            d.mode = DiskMode::Sealed;
        }
        c.detection.enabled = false;
        c.cluster.rpc_timeout_ms = 1_000;
        c.cluster.read_ahead = 0;
        let env = net.environment(
            id,
            1,
            Arc::new(shadowcache_node::clock::BootClock),
            7 + n as u64,
        );
        let running = start_in(c, env).await.expect("start");
        net.attach(id, running.node());
        nodes.push(running);
    }
    let (b, c) = (nodes[1].node().clone(), nodes[2].node().clone());
    until("both members see the disk", || {
        b.stat("vdi").is_ok() && c.stat("vdi").is_ok()
    })
    .await;
    // b holds every block, and c learns b's block map.
    assert_eq!(
        &b.read("vdi", 0, BS * BLOCKS).await.expect("b reads")[..],
        &data[..]
    );
    c.read("vdi", 0, BS).await.expect("c reads block 0");
    until("c learns b's map", || {
        c.stat("vdi")
            .expect("stat")
            .coverage
            .iter()
            .any(|(m, n)| m == "b" && *n == BLOCKS)
    })
    .await;
    // From now on b takes c's calls and never answers.
    net.set_link("c", "b", Link::Held);
    let first = Instant::now();
    let got = c.read("vdi", BS, BS).await.expect("c reads block 1");
    assert_eq!(&got[..], &data[BS as usize..2 * BS as usize]);
    assert!(
        first.elapsed() < Duration::from_millis(2_900),
        "the first read paid more than one timeout and a bit: {:?}",
        first.elapsed()
    );
    let rest = Instant::now();
    for i in 2..BLOCKS {
        let got = c.read("vdi", i * BS, BS).await.expect("c reads");
        assert_eq!(&got[..], &data[(i * BS) as usize..((i + 1) * BS) as usize]);
    }
    // 62 reads: each of them paid a second or two before.
    assert!(
        rest.elapsed() < Duration::from_secs(10),
        "the later reads still waited for b: {:?}",
        rest.elapsed()
    );
    net.set_link("c", "b", Link::Open);
    for n in nodes {
        n.shutdown().await.expect("shutdown");
    }
}

/// The three-node cluster with "vdi" detected and b holding a lease on it (b has read it):
/// the cluster and the detected generation.
async fn detected_with_b_holding_a_lease(dir: &std::path::Path) -> (Cluster, u64) {
    let c = cluster(dir).await;
    let g = c.detect(0).await;
    c.node("b")
        .read("vdi", 0, BS)
        .await
        .expect("b reads under a lease");
    let holders = c.node("a").stat("vdi").expect("stat").lease_holders;
    assert!(holders.contains(&"b".to_string()), "{holders:?}");
    (c, g)
}

/// Found in review: a revocation from the owner's id carried any generation, and one of
/// 2^64-1 made the member rule out every later shadow of the disk (until the owner's epoch
/// changed), so it forwarded every read of it for good. A revocation now reaches no further
/// than the generation the member knows; the next detection is served from its cache again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_of_a_future_generation_does_not_stop_later_shadows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, g1) = detected_with_b_holding_a_lease(dir.path()).await;
    let (a, b) = (c.node("a"), c.node("b"));
    let boot = b.cluster().me().boot;
    b.revoke_held("vdi", u64::MAX, "a", boot)
        .expect("a revocation from the owner's id");
    // The owner writes (its own revocation of g1), then the disk is detected again.
    a.write("vdi", 3 * BS, Bytes::from(block(3, 2)))
        .await
        .expect("write");
    let g2 = c.detect(g1).await;
    assert!(g2 > g1);
    b.read("vdi", 5 * BS, BS).await.expect("b reads");
    assert!(
        a.stat("vdi")
            .expect("stat")
            .lease_holders
            .contains(&"b".to_string()),
        "b took no lease on generation {g2}: it no longer caches the disk"
    );
    for n in c.nodes {
        n.shutdown().await.expect("shutdown");
    }
}

/// Found in review: a home answered a member's fetch from a sealed shadow whatever epoch it
/// was asked for (only a detected shadow's lease was compared), so after the owner restarted
/// with a new epoch it sent the old epoch's bytes, which the asker refused. A shadow of
/// another epoch, or another generation, answers nothing; of its own, the blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_serves_a_sealed_shadow_only_at_its_own_generation_and_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_net, nodes) = owner_and_member(dir.path(), 16, 0).await;
    let b = nodes[1].node();
    let got = b.read("big", 0, 4 * BS).await.expect("b reads");
    assert_eq!(version_of(0, &got[..BS as usize]), 1);
    let (generation, epoch) = {
        let s = b.stat("big").expect("stat");
        (s.generation, s.epoch)
    };
    let ask = |g: u64, e: u64| {
        b.blocks_for_peer(
            "big",
            shadowcache_node::ids::Version::new(g, e),
            &[0, 1],
            true,
        )
    };
    let held = ask(generation, epoch).await.expect("own epoch");
    assert!(
        held.iter().all(|(_, b)| b.is_some()),
        "its own epoch: the blocks"
    );
    for (g, e) in [(generation, epoch + 1), (generation + 1, epoch)] {
        let other = ask(g, e).await.expect("another version");
        assert!(
            other.iter().all(|(_, b)| b.is_none()),
            "generation {g}, epoch {e}: answered from a shadow of {generation}, {epoch}"
        );
    }
    for n in nodes {
        n.shutdown().await.expect("shutdown");
    }
}

/// Found in review: SetDiskMode(MUTABLE) on a detected disk answered OK and left it detected.
/// It ends the detection (leases revoked first), as asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_a_detected_disk_mutable_ends_its_detection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, _) = detected_with_b_holding_a_lease(dir.path()).await;
    let a = c.node("a");
    let info = a
        .set_mode("vdi", DiskMode::Mutable)
        .await
        .expect("set mutable");
    assert_eq!(info.mode, DiskMode::Mutable);
    let s = a.stat("vdi").expect("stat");
    assert_eq!(s.mode, DiskMode::Mutable);
    assert!(s.lease_holders.is_empty(), "{:?}", s.lease_holders);
    for n in c.nodes {
        n.shutdown().await.expect("shutdown");
    }
}

/// Review of the gRPC frontends: a flush forwarded to an owner whose host restarted since it
/// acknowledged writes answered OK, for writes its page cache may have lost. Now the owner's
/// answers carry its host boot, and such a flush reports the writes as possibly lost (once);
/// writes acknowledged under the host boot that flushed are covered as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_after_the_owners_host_restarted_reports_the_writes_it_cannot_cover() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path()).await;
    let b = c.node("b").clone();
    // Written and flushed under one host boot: covered.
    b.write("vdi", 2 * BS, Bytes::from(block(2, 2)))
        .await
        .expect("write through the owner");
    b.flush("vdi").await.expect("a flush that covers the write");

    // Acknowledged, then the owner's host restarts before any flush.
    b.write("vdi", 3 * BS, Bytes::from(block(3, 2)))
        .await
        .expect("write through the owner");
    let a = c.nodes.remove(0);
    assert_eq!(a.node().config().node_id, "a");
    a.shutdown().await.expect("shutdown a");
    let image = dir.path().join("vdi.raw");
    let mut env = c.net.environment("a", 2, c.clock.clone(), 123);
    env.host_boot = 2;
    let a2 = start_in(config(dir.path(), "a", &image), env)
        .await
        .expect("a starts again");
    c.net.attach("a", a2.node());
    // Until b sees the new incarnation its flush may fail to reach it (retried); an OK flush
    // is the bug.
    let deadline = Instant::now() + Duration::from_secs(30);
    let err = loop {
        let e = b
            .flush("vdi")
            .await
            .expect_err("a flush at the restarted owner answered OK for a write it cannot cover");
        if e.to_string().contains("may be lost") {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "no flush reached the restarted owner: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(err.to_string().contains("restarted"), "{err}");
    assert_eq!(
        err.kind(),
        shadowcache_node::error::ErrorKind::LostWrites,
        "DATA_LOSS over gRPC, EIO over NBD: {err}"
    );
    // Reported once: the next flush answers for what came after.
    b.flush("vdi").await.expect("the flush after the report");
    b.write("vdi", 4 * BS, Bytes::from(block(4, 3)))
        .await
        .expect("write through the restarted owner");
    b.flush("vdi")
        .await
        .expect("a flush under the host boot that acknowledged the write");
    a2.shutdown().await.expect("shutdown a2");
    for n in c.nodes.drain(..) {
        n.shutdown().await.expect("shutdown");
    }
}

/// Review of the cluster directory: a disk id two members owned went to the lower node id, so
/// a member with a valid certificate and a lower id could take another's disk, its forwarded
/// writes and its readers, by registering the same id. Now such an id is disputed: served by
/// neither, every request failing with both names. The owner's restart does not hand the disk
/// to the other claimant; the dispute ends when that claimant is back without the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_id_two_members_own_is_served_by_neither_until_one_drops_it() {
    use shadowcache_node::error::ErrorKind;
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cluster(dir.path()).await;
    let (a, b) = (c.node("a").clone(), c.node("b").clone());
    assert_eq!(version_of(0, &b.read("vdi", 0, BS).await.expect("read")), 1);
    let evil = claimant(&c, dir.path(), 1).await;
    let err = until_disputed(&b).await;
    let msg = err.to_string();
    assert!(msg.contains("\"vdi\"") && msg.contains("0evil, a"), "{msg}");
    assert_eq!(
        err.code(),
        shadowcache_node::error::Code::FailedPrecondition,
        "{msg}"
    );
    assert_eq!(b.cluster().disputed_disks(), vec!["vdi".to_string()]);
    assert_eq!(
        b.status().disputed,
        vec![(
            "vdi".to_string(),
            vec!["0evil".to_string(), "a".to_string()]
        )]
    );
    // A write at b reaches neither.
    let w = b
        .write("vdi", 0, Bytes::from(vec![5u8; BS as usize]))
        .await
        .expect_err("a write of a disputed disk");
    assert_eq!(w.kind(), ErrorKind::Disputed, "{w}");
    assert_eq!(version_of(0, &a.read("vdi", 0, BS).await.expect("a")), 1);
    assert_eq!(
        &evil.node().read("vdi", 0, BS).await.expect("0evil")[..],
        &vec![9u8; BS as usize][..]
    );
    // Nor can b register the id for itself meanwhile.
    let mine = dir.path().join("mine.raw");
    std::fs::write(&mine, vec![1u8; BS as usize]).expect("mine");
    let r = b
        .register("vdi", &mine, DiskMode::Mutable)
        .await
        .expect_err("registering a disputed id");
    assert_eq!(r.kind(), ErrorKind::DiskExists);

    // The owner leaves (a restart): the disk does not go to the other claimant.
    c.net.kill("a");
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        match b.read("vdi", 0, BS).await {
            Ok(got) => panic!("b read byte {} of vdi while its owner was away", got[0]),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Disputed, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It is back: still disputed.
    let image = dir.path().join("vdi.raw");
    let a2 = join(
        &c,
        &dir.path().join("a-again"),
        ("a", 2),
        Some(("vdi", &image)),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    match b.read("vdi", 0, BS).await {
        Ok(got) => panic!("b read byte {} of vdi, still disputed", got[0]),
        Err(e) => assert_eq!(e.kind(), ErrorKind::Disputed, "{e}"),
    }
    // The other claimant restarts without the id: a's disk is served again.
    c.net.kill("0evil");
    drop(evil);
    let evil = join(&c, &dir.path().join("0evil-again"), ("0evil", 2), None).await;
    assert_eq!(version_of(0, &until_served(&b, "vdi").await), 1);
    assert!(b.cluster().disputed_disks().is_empty());
    assert!(b.status().disputed.is_empty());
    drop((evil, a2));
}

/// Same review: a member routed an id to its only claimant as soon as that claimant's list
/// was read, even while the owner's list was not (a node's first refresh, or an owner it could
/// not reach). A member that cannot read the owner's list does not route its disk to another
/// member that claims the id; once it can, it sees the dispute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_has_not_read_the_owners_list_does_not_route_its_disk_to_another_claimant() {
    use shadowcache_node::error::ErrorKind;
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cluster(dir.path()).await;
    let evil = claimant(&c, dir.path(), 1).await;
    until_disputed(c.node("b")).await;
    // d cannot call a.
    c.net.set_link("d", "a", Link::Cut);
    let d = join(&c, &dir.path().join("d"), ("d", 1), None).await;
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        if let Ok(got) = d.node().read("vdi", 0, BS).await {
            panic!("d read vdi without a's list: byte {}", got[0]);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.net.set_link("d", "a", Link::Open);
    let e = until_disputed(d.node()).await;
    assert_eq!(e.kind(), ErrorKind::Disputed);
    drop((evil, d));
}

/// A member "0evil" (its id sorts before "a") that registers its own image, all 9s, as "vdi",
/// the disk "a" owns.
async fn claimant(c: &Cluster, dir: &std::path::Path, boot: u64) -> RunningNode {
    let fake = dir.join("fake.raw");
    std::fs::write(&fake, vec![9u8; (BLOCKS * BS) as usize]).expect("fake");
    join(
        c,
        &dir.join(format!("0evil-{boot}")),
        ("0evil", boot),
        Some(("vdi", &fake)),
    )
    .await
}

/// Starts incarnation `boot` of member `id` in `data_dir` on `c`'s network and clock, owning
/// `owns` if given.
async fn join(
    c: &Cluster,
    data_dir: &std::path::Path,
    (id, boot): (&str, u64),
    owns: Option<(&str, &std::path::Path)>,
) -> RunningNode {
    let cfg = member_config(data_dir, id, BS as u32, (TERM_MS, MARGIN_MS), owns);
    let env = c.net.environment(id, boot, c.clock.clone(), 90 + boot);
    let node = start_in(cfg, env)
        .await
        .unwrap_or_else(|e| panic!("start {id}: {e}"));
    c.net.attach(id, node.node());
    node
}

/// Reads block 0 of `disk` at `node` until it is served (30 s at most).
async fn until_served(node: &shadowcache_node::Node, disk: &str) -> Bytes {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match node.read(disk, 0, BS).await {
            Ok(got) => return got,
            Err(e) => {
                assert!(Instant::now() < deadline, "{disk} never served: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads "vdi" at `node` until it says the id is disputed; never the other claimant's bytes.
async fn until_disputed(node: &shadowcache_node::Node) -> shadowcache_node::error::Error {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match node.read("vdi", 0, BS).await {
            Err(e) if e.kind() == shadowcache_node::error::ErrorKind::Disputed => return e,
            Ok(got) => assert_ne!(got[0], 9, "the other member's bytes for a's disk"),
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "the dispute was never seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Second review of the disputes: an owner out of the cluster before anyone claimed its id
/// was forgotten, so a member that claimed the id then got the disk. The owner that left is
/// remembered as a claimant for an hour (unless it is back): the new claim is a dispute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_made_while_the_owner_is_away_is_a_dispute_not_a_takeover() {
    use shadowcache_node::error::ErrorKind;
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cluster(dir.path()).await;
    let b = c.node("b").clone();
    b.read("vdi", 0, BS).await.expect("read while a is there");
    c.net.kill("a");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match b.read("vdi", 0, BS).await {
            Err(e) if e.to_string().contains("left the cluster") => break,
            other => {
                assert!(Instant::now() < deadline, "a never left: {:?}", other.err());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let evil = claimant(&c, dir.path(), 1).await;
    let e = until_disputed(&b).await;
    assert!(e.to_string().contains("0evil, a"), "{e}");
    let watch_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < watch_until {
        match b.read("vdi", 0, BS).await {
            Ok(got) => panic!("b read byte {} of vdi from the claimant", got[0]),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Disputed, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(evil);
}

/// Same review: a claim whose route waited for a member's list was not counted, so a second
/// member could register the id and start a dispute over the first one's disk. A waiting
/// route answers UNAVAILABLE (it is served soon), not NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_route_waits_is_unavailable_and_its_id_cannot_be_registered() {
    use shadowcache_node::error::{Code, ErrorKind};
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cluster(dir.path()).await;
    let (b, cn) = (c.node("b").clone(), c.node("c").clone());
    // c cannot read x's list: no new route at c for a minute.
    c.net.set_link("c", "x", Link::Cut);
    let x = join(&c, &dir.path().join("x"), ("x", 1), None).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while cn.cluster().members().iter().all(|m| m.id != "x") {
        assert!(Instant::now() < deadline, "c never saw x");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let w = dir.path().join("w.raw");
    std::fs::write(&w, vec![3u8; (4 * BS) as usize]).expect("w");
    b.register("w", &w, DiskMode::Mutable)
        .await
        .expect("b registers w");
    let deadline = Instant::now() + Duration::from_secs(30);
    let e = loop {
        match cn.read("w", 0, BS).await {
            Err(e) if e.kind() == ErrorKind::Peer => break e,
            Err(e) if e.kind() == ErrorKind::UnknownDisk => {}
            Ok(_) => panic!("c routed w while it could not read x's list"),
            Err(e) => panic!("c: {e}"),
        }
        assert!(Instant::now() < deadline, "c never learned b's claim");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.to_string().contains("owner b"), "{e}");
    let mine = dir.path().join("mine.raw");
    std::fs::write(&mine, vec![1u8; BS as usize]).expect("mine");
    let r = cn
        .register("w", &mine, DiskMode::Mutable)
        .await
        .expect_err("c registered an id b claims");
    assert_eq!(r.kind(), ErrorKind::DiskExists);
    // Once c reads x's list, the route is made.
    c.net.set_link("c", "x", Link::Open);
    assert_eq!(until_served(&cn, "w").await[0], 3);
    drop(x);
}

/// A claimant that left keeps its ids disputed for an hour; an operator who knows it is gone
/// for good (or was the wrong one) ends that at a node with `forget_claimant`, and the id goes
/// to the claimant left. A live claimant, or a member never seen claiming, cannot be forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_forgets_a_claimant_that_left_and_the_owner_left_serves_the_disk() {
    use shadowcache_node::error::ErrorKind;
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cluster(dir.path()).await;
    let b = c.node("b").clone();
    let evil = claimant(&c, dir.path(), 1).await;
    until_disputed(&b).await;
    let e = b
        .forget_claimant("vdi", "0evil")
        .expect_err("forgetting a live claimant");
    assert!(e.to_string().contains("is live"), "{e}");
    c.net.kill("0evil");
    drop(evil);
    tokio::time::sleep(Duration::from_secs(2)).await;
    match b.read("vdi", 0, BS).await {
        Ok(got) => panic!("b read byte {} while 0evil is remembered", got[0]),
        Err(e) => assert_eq!(e.kind(), ErrorKind::Disputed, "{e}"),
    }
    let e = b
        .forget_claimant("vdi", "nobody")
        .expect_err("forgetting a member never seen");
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    let e = b
        .forget_claimant("../vdi", "0evil")
        .expect_err("a malformed disk id");
    assert_eq!(e.kind(), ErrorKind::InvalidDiskId, "{e}");
    assert_eq!(
        b.forget_claimant("vdi", "0evil").expect("forget 0evil"),
        vec!["a".to_string()]
    );
    assert_eq!(version_of(0, &until_served(&b, "vdi").await), 1);
    assert!(b.status().disputed.is_empty());
}

//! Detection and leases with real `shadowcache-node` processes on loopback: a disk several
//! members only read becomes detected-immutable (and not before), is then served from the
//! members' caches and peers, and a write to it is applied only once no member can serve the
//! bytes it replaces: not while readers on every member read in a loop, not with a reader cut
//! off by a fault-injecting proxy, not with a reader killed.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Member, Settings, client, config_flag, counters, member, member_on, until};
use rand::{Rng, SeedableRng};
use shadowcache_client::{DiskMode, StatusResponse};
use shadowcache_testkit::{Proxy, free_peer_port, random_image, write_file};

const BS: u64 = 16 << 10;

fn mode_at(s: &StatusResponse, disk: &str) -> Option<DiskMode> {
    s.disks
        .iter()
        .find(|d| d.id == disk)
        .and_then(|d| DiskMode::try_from(d.mode).ok())
}

fn disk_info<'a>(s: &'a StatusResponse, disk: &str) -> &'a shadowcache_client::DiskInfo {
    s.disks
        .iter()
        .find(|d| d.id == disk)
        .unwrap_or_else(|| panic!("no disk {disk} in {:?}", s.disks))
}

async fn status(m: &Member) -> StatusResponse {
    client(m).await.status().await.expect("status")
}

/// Block `index` at `version`: 16-byte records (index, version) repeated, so that a read shows
/// which version it saw and whether it is whole.
fn versioned(index: u64, version: u64) -> Vec<u8> {
    let mut rec = [0u8; 16];
    rec[..8].copy_from_slice(&index.to_le_bytes());
    rec[8..].copy_from_slice(&version.to_le_bytes());
    rec.iter().copied().cycle().take(BS as usize).collect()
}

/// The version a block read holds, checking that it is one whole version of that block.
fn version_of(index: u64, bytes: &[u8]) -> u64 {
    assert_eq!(bytes.len() as u64, BS);
    let v = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    assert!(
        bytes == versioned(index, v),
        "block {index} is not one whole version (starts as version {v})"
    );
    v
}

#[derive(Debug, Clone)]
struct ReadRec {
    node: &'static str,
    block: u64,
    start: Instant,
    version: u64,
}

#[derive(Debug, Clone)]
struct WriteRec {
    block: u64,
    version: u64,
    ack: Instant,
}

/// Fails on any read that returned a version older than a write acknowledged before the read
/// began. Returns how many reads began after some acknowledged write of their block.
fn check(reads: &[ReadRec], writes: &[WriteRec]) -> usize {
    let mut constrained = 0;
    for r in reads {
        let newest_acked = writes
            .iter()
            .filter(|w| w.block == r.block && w.ack < r.start)
            .map(|w| w.version)
            .max();
        if let Some(v) = newest_acked {
            constrained += 1;
            assert!(
                r.version >= v,
                "stale read at {}: block {} version {} after version {v} was acknowledged ({:?} before the read began)",
                r.node,
                r.block,
                r.version,
                r.start
                    - writes
                        .iter()
                        .find(|w| w.block == r.block && w.version == v)
                        .map(|w| w.ack)
                        .expect("write")
            );
        }
    }
    constrained
}

/// Reader tasks: `per_node` loops on each member reading random whole blocks of `disk` until
/// `stop`, recording every read. A failed read fails the test, except with `tolerate_errors`
/// (a member restarting), where it is skipped.
fn spawn_readers(
    members: &[(&'static str, &Member)],
    per_node: usize,
    blocks: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
    log: Arc<parking_lot::Mutex<Vec<ReadRec>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    spawn_readers_with(members, per_node, blocks, stop, log, false)
}

fn spawn_readers_with(
    members: &[(&'static str, &Member)],
    per_node: usize,
    blocks: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
    log: Arc<parking_lot::Mutex<Vec<ReadRec>>>,
    tolerate_errors: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (n, (name, m)) in members.iter().enumerate() {
        for t in 0..per_node {
            let socket = m.process.socket.clone();
            let stop = stop.clone();
            let log = log.clone();
            let name: &'static str = name;
            tasks.push(tokio::spawn(async move {
                let c = shadowcache_client::Client::connect_unix(&socket)
                    .await
                    .expect("connect");
                let d = c.disk("vdi");
                let mut rng = rand::rngs::StdRng::seed_from_u64((n * 100 + t) as u64);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let block = rng.random_range(0..blocks);
                    let start = Instant::now();
                    let got = match d.read_at(block * BS, BS).await {
                        Ok(got) => got,
                        Err(e) if tolerate_errors => {
                            eprintln!("read at {name} failed (tolerated): {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        Err(e) => panic!("read at {name}: {e}"),
                    };
                    let version = version_of(block, &got);
                    log.lock().push(ReadRec {
                        node: name,
                        block,
                        start,
                        version,
                    });
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            }));
        }
    }
    tasks
}

fn image(dir: &std::path::Path, blocks: u64) -> std::path::PathBuf {
    let path = dir.join("vdi.raw");
    let mut data = Vec::with_capacity((blocks * BS) as usize);
    for i in 0..blocks {
        data.extend(versioned(i, 1));
    }
    write_file(&path, &data);
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_read_by_two_members_is_detected_and_then_served_by_peers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vdi.raw");
    let size: u64 = 2 << 20;
    let data = random_image(&path, size as usize, 11);
    let b_metrics = shadowcache_testkit::free_port();
    let (a, b, c) = common::vdi_cluster(
        dir.path(),
        &path,
        Settings::default(),
        &[format!("--metrics=127.0.0.1:{b_metrics}")],
    )
    .await;
    let (bc, cc) = (client(&b).await, client(&c).await);

    // Reads from b alone, for well over the quiet period: not detected.
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_millis(1500) {
        let off = (n * 7919 * 4096) % (size - 4096);
        let got = bc.disk("vdi").read_at(off, 4096).await.expect("read at b");
        assert!(got[..] == data[off as usize..off as usize + 4096]);
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = status(&a).await;
    assert_eq!(mode_at(&s, "vdi"), Some(DiskMode::Mutable), "{s:?}");
    assert_eq!(disk_info(&s, "vdi").readers, vec!["b".to_string()]);
    assert_eq!(s.leases.expect("leases").detections, 0);

    // A second member reads: detected. (The owner's egress is counted from here: the reads
    // after the detection may already fetch blocks under it.)
    let before = status(&a).await.leases.expect("leases").peer_served_bytes;
    for i in 0..5u64 {
        cc.disk("vdi")
            .read_at(i * 4096, 4096)
            .await
            .expect("read at c");
    }
    until(&a, "the owner to detect vdi", |s| {
        mode_at(s, "vdi") == Some(DiskMode::Detected)
    })
    .await;
    let s = status(&a).await;
    let info = disk_info(&s, "vdi").clone();
    assert!(
        info.readers.contains(&"b".to_string()) && info.readers.contains(&"c".to_string()),
        "{info:?}"
    );
    assert!(info.generation >= 2, "a detection starts a new generation");
    for m in [&b, &c] {
        until(m, "vdi detected everywhere", |s| {
            mode_at(s, "vdi") == Some(DiskMode::Detected)
        })
        .await;
    }

    // Both read the whole disk: each block leaves the owner about once.
    let got = cc
        .disk("vdi")
        .read_at(0, size)
        .await
        .expect("whole disk at c");
    assert!(got[..] == data[..], "a detected disk read wrong bytes");
    // b learns from c's block map that c holds every block, and asks c for them.
    let blocks = size / BS;
    until(&b, "c's block map at b", |s| {
        disk_info(s, "vdi")
            .coverage
            .iter()
            .any(|m| m.member == "c" && m.blocks == blocks)
    })
    .await;
    let got = bc
        .disk("vdi")
        .read_at(0, size)
        .await
        .expect("whole disk at b");
    assert!(got[..] == data[..], "a detected disk read wrong bytes");
    let body = shadowcache_testkit::http_get(b_metrics, "/metrics").expect("metrics");
    let via_holder =
        shadowcache_testkit::metric(&body, "shadowcache_peer_fetches_total{via=\"holder\"}")
            .unwrap_or(0.0);
    assert!(
        via_holder as u64 >= blocks / 4,
        "b fetched only {via_holder} blocks from holders in block maps"
    );
    let l = status(&b).await.leases.expect("leases");
    assert!(
        l.block_map_bytes > 0 && l.block_map_traffic_bytes > 0,
        "{l:?}"
    );
    eprintln!(
        "block maps at b: {} bytes held, {} bytes received, for a disk of {blocks} blocks",
        l.block_map_bytes, l.block_map_traffic_bytes
    );
    let s = status(&a).await;
    let egress = s.leases.expect("leases").peer_served_bytes - before;
    eprintln!(
        "owner egress for two whole-disk reads of a detected disk: {:.3} x its size",
        egress as f64 / size as f64
    );
    assert!(
        egress >= size && egress as f64 <= 1.1 * size as f64,
        "owner sent {egress} bytes for a {size}-byte disk read by two members"
    );
    let holders = &disk_info(&s, "vdi").lease_holders;
    assert_eq!(holders, &vec!["b".to_string(), "c".to_string()]);
    let peer = counters(&b).await.peer_read_bytes + counters(&c).await.peer_read_bytes;
    assert!(peer > 0, "no block came from a peer");
    let sb = status(&b).await;
    assert!(disk_info(&sb, "vdi").lease_valid, "b holds no lease");
    // Bad requests do not cost b its shadow: a read past the end, an empty write (which ends
    // no detection), and Peer calls from someone who is not a member.
    assert_eq!(
        common::code(bc.disk("vdi").read_at(size, 1).await),
        tonic::Code::OutOfRange
    );
    bc.disk("vdi")
        .write_at(0, Vec::<u8>::new())
        .await
        .expect("an empty write");
    let mut peer_a =
        shadowcache_proto::peer_client::PeerClient::connect(format!("http://{}", a.addr))
            .await
            .expect("peer client");
    let refused = peer_a
        .lease(shadowcache_proto::LeaseRequest {
            disk: "vdi".into(),
            generation: info.generation,
            epoch: info.epoch,
            from_node: "mallory".into(),
            from_boot: 1,
        })
        .await
        .expect_err("a lease for a non-member");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let mut peer_b =
        shadowcache_proto::peer_client::PeerClient::connect(format!("http://{}", b.addr))
            .await
            .expect("peer client");
    let b_boot = peer_b
        .hello(shadowcache_proto::HelloRequest {
            from_node: "mallory".into(),
            from_boot: 1,
        })
        .await
        .expect("hello")
        .into_inner();
    assert_eq!(b_boot.node, "b");
    let refused = peer_b
        .revoke(shadowcache_proto::RevokeRequest {
            disk: "vdi".into(),
            generation: u64::MAX,
            from_node: "mallory".into(),
            to_boot: b_boot.boot,
        })
        .await
        .expect_err("a revocation by a non-owner");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    // The owner's name, but meant for another process with b's id: not b's to acknowledge.
    let refused = peer_b
        .revoke(shadowcache_proto::RevokeRequest {
            disk: "vdi".into(),
            generation: info.generation,
            from_node: "a".into(),
            to_boot: b_boot.boot + 1,
        })
        .await
        .expect_err("a revocation for another incarnation");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("incarnation"),
        "{}",
        refused.message()
    );
    let s = status(&a).await;
    assert_eq!(mode_at(&s, "vdi"), Some(DiskMode::Detected));
    assert_eq!(s.leases.expect("leases").detections, 1);
    assert!(disk_info(&status(&b).await, "vdi").lease_valid);
    // Cached now: another pass costs the owner nothing.
    let got = bc.disk("vdi").read_at(0, size).await.expect("again");
    assert!(got[..] == data[..]);
    let again = status(&a).await.leases.expect("leases").peer_served_bytes;
    assert_eq!(again - before, egress, "a cached pass went to the owner");

    // An operator drops the shadow clones: mutable again, every lease revoked.
    let ac = client(&a).await;
    let d = ac
        .set_detection("vdi", shadowcache_client::DetectionAction::Pin)
        .await
        .expect("pin");
    assert_eq!(DiskMode::try_from(d.mode), Ok(DiskMode::Mutable));
    assert!(d.pinned);
    let l = status(&a).await.leases.expect("leases");
    assert!(l.revocations >= 2, "{l:?}");
    // Pinned: reads from everyone do not detect it again.
    for _ in 0..10 {
        bc.disk("vdi").read_at(0, 4096).await.expect("read");
        cc.disk("vdi").read_at(0, 4096).await.expect("read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        mode_at(&status(&a).await, "vdi"),
        Some(DiskMode::Mutable),
        "a pinned disk was detected"
    );

    // Unpinned (through the CLI, as an operator would): reads detect it again; then
    // drop-shadows ends that detection, revoking the leases taken meanwhile.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(shadowcache_testkit::binary("shadowcache"))
            .arg("--socket")
            .arg(&a.process.socket)
            .args(args)
            .output()
            .expect("shadowcache cli");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(cli(&["unpin", "vdi"]).contains("unpinned"));
    assert!(!disk_info(&status(&a).await, "vdi").pinned);
    let deadline = Instant::now() + Duration::from_secs(20);
    while mode_at(&status(&a).await, "vdi") != Some(DiskMode::Detected) {
        assert!(
            Instant::now() < deadline,
            "an unpinned disk was not detected again"
        );
        bc.disk("vdi").read_at(0, 4096).await.expect("read");
        cc.disk("vdi").read_at(0, 4096).await.expect("read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // b and c take leases on the new generation once they learn of it; then drop the shadows.
    while disk_info(&status(&a).await, "vdi").lease_holders.len() < 2 {
        assert!(Instant::now() < deadline, "no leases on the new generation");
        bc.disk("vdi").read_at(0, 4096).await.expect("read");
        cc.disk("vdi").read_at(0, 4096).await.expect("read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = status(&a).await.leases.expect("leases");
    assert_eq!(before.detections, 2);
    let out = cli(&["drop-shadows", "vdi"]);
    assert!(out.contains("shadow clones dropped"), "{out}");
    let s = status(&a).await;
    assert_eq!(mode_at(&s, "vdi"), Some(DiskMode::Mutable));
    let after = s.leases.expect("leases");
    assert!(
        after.revocations >= before.revocations + 2,
        "drop-shadows revoked {} leases",
        after.revocations - before.revocations
    );
    // A sealed disk has no detection to pin, and an unknown one is named.
    let out = std::process::Command::new(shadowcache_testkit::binary("shadowcache"))
        .arg("--socket")
        .arg(&a.process.socket)
        .args(["pin", "nope"])
        .output()
        .expect("cli");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_returns_bytes_older_than_an_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocks = 12u64;
    let path = image(dir.path(), blocks);
    let (a, b, c) = common::vdi_cluster(dir.path(), &path, Settings::default(), &[]).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reads = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let readers = spawn_readers(
        &[("a", &a), ("b", &b), ("c", &c)],
        2,
        blocks,
        stop.clone(),
        reads.clone(),
    );

    // Each round: wait until the disk is detected and leased, then write a new version of a
    // block, alternately at the owner and through another member.
    let mut writes = Vec::new();
    let mut version = vec![1u64; blocks as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let rounds = 5;
    for round in 0..rounds {
        until(&a, "vdi detected with lease holders", |s| {
            mode_at(s, "vdi") == Some(DiskMode::Detected)
                && disk_info(s, "vdi").lease_holders.len() >= 2
        })
        .await;
        // Let the holders serve from their caches for a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let block = rng.random_range(0..blocks);
        version[block as usize] += 1;
        let v = version[block as usize];
        let via = if round % 2 == 0 { &a } else { &b };
        let cl = client(via).await;
        cl.disk("vdi")
            .write_at(block * BS, versioned(block, v))
            .await
            .expect("write");
        let ack = Instant::now();
        writes.push(WriteRec {
            block,
            version: v,
            ack,
        });
    }
    // Readers go on for a while after the last write.
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in readers {
        t.await.expect("reader");
    }
    let reads = reads.lock().clone();
    let constrained = check(&reads, &writes);
    let per_node = |n: &str| reads.iter().filter(|r| r.node == n).count();
    eprintln!(
        "{} reads ({} at a, {} at b, {} at c), {} of them after a write of their block; {} writes",
        reads.len(),
        per_node("a"),
        per_node("b"),
        per_node("c"),
        constrained,
        writes.len()
    );
    assert!(constrained > 50, "too few reads followed a write");
    for n in ["a", "b", "c"] {
        assert!(per_node(n) > 100, "{n} read too little");
    }
    let l = status(&a).await.leases.expect("leases");
    assert!(
        l.detections >= rounds && l.revocations >= 2 * rounds,
        "every write should have ended a detection with leases: {l:?}"
    );
    // The members did serve from their caches in between.
    let hits = |c: shadowcache_client::CacheCounters| c.lookups - c.misses;
    assert!(hits(counters(&b).await) > 0 && hits(counters(&c).await) > 0);
    // And the origin holds every acknowledged write.
    let origin = std::fs::read(&path).expect("origin");
    for i in 0..blocks {
        let at = (i * BS) as usize;
        assert_eq!(
            version_of(i, &origin[at..at + BS as usize]),
            version[i as usize]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waits_out_the_lease_of_a_cut_off_reader_and_of_a_killed_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocks = 8u64;
    let path = image(dir.path(), blocks);
    let settings = Settings {
        lease_ms: 3_000,
        margin_ms: 200,
        ..Settings::default()
    };
    let cfg = config_flag(dir.path(), settings);
    let a = member(
        dir.path(),
        "a",
        None,
        &[
            format!("--disk=vdi={},mutable", path.display()),
            cfg.clone(),
        ],
    );
    // b's Peer service is reached through a proxy that the test cuts: the owner cannot revoke
    // b's lease, and must wait until it has surely run out.
    let b_port = free_peer_port();
    let proxy = Proxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], b_port)));
    let b = member_on(
        dir.path(),
        "b",
        b_port,
        Some(&a.addr),
        &[cfg.clone(), format!("--advertise-rpc={}", proxy.addr)],
        &[],
    );
    let mut c = member(dir.path(), "c", Some(&a.addr), std::slice::from_ref(&cfg));
    let d = member(dir.path(), "d", Some(&a.addr), &[cfg]);
    for m in [&a, &b, &c, &d] {
        until(m, "four members and the disk", |s| {
            s.members.len() == 4 && common::has_disk(s, "vdi", "a")
        })
        .await;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reads = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut readers = spawn_readers(
        &[("b", &b), ("d", &d)],
        2,
        blocks,
        stop.clone(),
        reads.clone(),
    );
    let stop_c = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let c_readers = spawn_readers(&[("c", &c)], 1, blocks, stop_c.clone(), reads.clone());
    until(&a, "vdi detected and leased by b, c and d", |s| {
        mode_at(s, "vdi") == Some(DiskMode::Detected)
            && disk_info(s, "vdi").lease_holders == ["b", "c", "d"]
    })
    .await;
    stop_c.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in c_readers {
        t.await.expect("c reader");
    }
    // c dies; b is cut off. A write through d must wait for both leases to run out.
    c.process.kill();
    proxy.set_cut(true);
    let cut = Instant::now();
    let block = 3;
    client(&d)
        .await
        .disk("vdi")
        .write_at(block * BS, versioned(block, 2))
        .await
        .expect("write through d");
    let ack = Instant::now();
    let waited = ack - cut;
    eprintln!("a write waited {waited:?} for the leases of a cut-off and a killed reader");
    // b renewed its lease at most a third of a term before the cut; the owner counts it a
    // drift margin late.
    assert!(
        waited >= Duration::from_millis(1_800),
        "the write did not wait for the leases: {waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    let writes = vec![WriteRec {
        block,
        version: 2,
        ack,
    }];
    // b and d keep reading (b through the owner now); then b's link heals.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    proxy.set_cut(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in readers.drain(..) {
        t.await.expect("reader");
    }
    let reads = reads.lock().clone();
    let constrained = check(&reads, &writes);
    let after_at = |n: &str| {
        reads
            .iter()
            .filter(|r| r.node == n && r.block == block && r.start > ack)
            .count()
    };
    eprintln!(
        "{} reads, {constrained} after the write (b {}, d {} of its block)",
        reads.len(),
        after_at("b"),
        after_at("d")
    );
    assert!(
        after_at("b") > 0 && after_at("d") > 0,
        "too few reads after the write"
    );
    let l = status(&a).await.leases.expect("leases");
    assert!(
        l.expiries >= 2,
        "the owner should have waited out two leases: {l:?}"
    );
    assert!(l.revocations >= 3, "{l:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_restarted_while_its_disk_was_detected_holds_writes_for_a_lease_term() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocks = 8u64;
    let path = image(dir.path(), blocks);
    let settings = Settings {
        lease_ms: 3_000,
        ..Settings::default()
    };
    let (mut a, b, c) = common::vdi_cluster(dir.path(), &path, settings, &[]).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reads = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let readers = spawn_readers_with(
        &[("b", &b), ("c", &c)],
        1,
        blocks,
        stop.clone(),
        reads.clone(),
        true,
    );
    until(&a, "vdi detected and leased", |s| {
        mode_at(s, "vdi") == Some(DiskMode::Detected)
            && disk_info(s, "vdi").lease_holders.len() == 2
    })
    .await;
    let before = disk_info(&status(&a).await, "vdi").clone();
    // The owner restarts: it cannot know which leases it granted, so a write waits them out.
    a.process.restart();
    let restarted = Instant::now();
    let s = status(&a).await;
    let after = disk_info(&s, "vdi");
    assert_eq!(DiskMode::try_from(after.mode), Ok(DiskMode::Mutable));
    assert!(
        after.generation > before.generation,
        "the generation went from {} to {} over the restart",
        before.generation,
        after.generation
    );
    assert_ne!(
        after.epoch, before.epoch,
        "a restart gives the disk a new epoch"
    );
    let block = 5;
    client(&a)
        .await
        .disk("vdi")
        .write_at(block * BS, versioned(block, 2))
        .await
        .expect("write after restart");
    let ack = Instant::now();
    let waited = ack - restarted;
    eprintln!("a write right after the owner's restart waited {waited:?}");
    assert!(
        waited >= Duration::from_millis(2_500),
        "a write after the restart did not wait for old leases: {waited:?}"
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in readers {
        t.await.expect("reader");
    }
    let reads = reads.lock().clone();
    let writes = vec![WriteRec {
        block,
        version: 2,
        ack,
    }];
    let constrained = check(&reads, &writes);
    assert!(
        reads.iter().any(|r| r.block == block && r.start > ack),
        "no read after the write ({constrained} constrained)"
    );
}

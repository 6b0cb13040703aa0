//! The read path in process, over origins that count and fail on demand: single flight,
//! EIO handling, zero blocks, content-map reuse.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use shadowcache_node::ids::Version;
use shadowcache_node::origin::{Origin, OriginError, OriginFuture};
use shadowcache_node::{Config, DiskMode, Error, Node};

/// An in-memory origin that counts reads, can be slowed down, and fails with EIO on demand.
#[derive(Debug)]
struct TestOrigin {
    data: Bytes,
    reads: AtomicU64,
    /// Bytes read, all reads together.
    read_bytes: AtomicU64,
    delay_ms: u64,
    fail: AtomicBool,
    /// Flushes fail while set.
    flush_fails: AtomicBool,
    /// Writes that reached the origin, in order.
    written: parking_lot::Mutex<Vec<(u64, Vec<u8>)>>,
    write_delay_ms: AtomicU64,
}

impl TestOrigin {
    fn new(data: Vec<u8>, delay_ms: u64) -> Arc<Self> {
        Arc::new(TestOrigin {
            data: Bytes::from(data),
            reads: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            delay_ms,
            fail: AtomicBool::new(false),
            flush_fails: AtomicBool::new(false),
            written: parking_lot::Mutex::new(Vec::new()),
            write_delay_ms: AtomicU64::new(0),
        })
    }
}

impl Origin for TestOrigin {
    fn describe(&self) -> &str {
        "test-origin"
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, offset: u64, len: usize) -> OriginFuture<'_, Bytes> {
        Box::pin(async move {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.read_bytes.fetch_add(len as u64, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(self.delay_ms)).await;
            if self.fail.load(Ordering::SeqCst) {
                return Err(OriginError::Io {
                    origin: "test-origin".into(),
                    op: "read",
                    offset,
                    cause: "Input/output error (os error 5)".into(),
                });
            }
            let o = offset as usize;
            Ok(Bytes::copy_from_slice(&self.data[o..o + len]))
        })
    }

    fn write_at(&self, offset: u64, data: Bytes) -> OriginFuture<'_, ()> {
        Box::pin(async move {
            let ms = self.write_delay_ms.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            self.written.lock().push((offset, data.to_vec()));
            Ok(())
        })
    }

    fn flush(&self) -> OriginFuture<'_, ()> {
        Box::pin(async {
            if self.flush_fails.load(Ordering::SeqCst) {
                return Err(OriginError::Io {
                    origin: "test-origin".into(),
                    op: "flush",
                    offset: 0,
                    cause: "Input/output error (os error 5)".into(),
                });
            }
            Ok(())
        })
    }

    fn identity(&self) -> Option<String> {
        None
    }
}

async fn node(dir: &std::path::Path, block_bytes: u32) -> Arc<Node> {
    let mut c = Config::for_data_dir(dir);
    c.block_bytes = block_bytes;
    c.ram_bytes = 16 << 20;
    c.ssd_bytes = 0;
    Node::open(c).await.expect("node")
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8 + 1).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_readers_of_one_cold_block_cause_one_origin_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = node(dir.path(), 4096).await;
    let origin = TestOrigin::new(pattern(64 * 1024), 100);
    node.registry()
        .register_origin("d", origin.clone(), DiskMode::Sealed)
        .await
        .expect("register");
    let mut tasks = Vec::new();
    for n in 0..64u64 {
        let node = node.clone();
        // Different ranges inside block 2.
        tasks.push(tokio::spawn(async move {
            node.read("d", 8192 + n * 7, 100).await
        }));
    }
    let expected = pattern(64 * 1024);
    for (n, t) in tasks.into_iter().enumerate() {
        let got = t.await.expect("task").expect("read");
        let at = 8192 + n * 7;
        assert_eq!(&got[..], &expected[at..at + 100]);
    }
    assert_eq!(
        origin.reads.load(Ordering::SeqCst),
        1,
        "single flight failed"
    );
    assert!(node.reads().stats().single_flight_joins.get() >= 1);
    // Later reads are hits: the content map knows the block, the cache has it.
    node.read("d", 8192, 4096).await.expect("read");
    assert_eq!(origin.reads.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_fails_with_eio_is_unavailable_and_caches_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = node(dir.path(), 4096).await;
    let origin = TestOrigin::new(pattern(32 * 1024), 20);
    origin.fail.store(true, Ordering::SeqCst);
    node.registry()
        .register_origin("d", origin.clone(), DiskMode::Sealed)
        .await
        .expect("register");
    // Concurrent readers of the failing block all get the error.
    let (a, b) = tokio::join!(node.read("d", 0, 10), node.read("d", 5, 10));
    for r in [a, b] {
        match r {
            Err(Error::Origin(e)) => assert!(e.to_string().contains("os error 5"), "{e}"),
            other => panic!("expected an origin error, got {other:?}"),
        }
    }
    node.cache().settle();
    assert_eq!(
        node.cache().stored_bytes(),
        0,
        "bytes were cached from a failing origin"
    );
    // Once the origin recovers, the same block is read again and served right.
    origin.fail.store(false, Ordering::SeqCst);
    let got = node.read("d", 0, 4096).await.expect("read after recovery");
    assert_eq!(&got[..], &pattern(32 * 1024)[..4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_blocks_are_served_without_being_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = node(dir.path(), 4096).await;
    let mut data = vec![0u8; 40 * 1024];
    data[20 * 1024..24 * 1024].copy_from_slice(&pattern(4096));
    let origin = TestOrigin::new(data.clone(), 0);
    node.registry()
        .register_origin("d", origin.clone(), DiskMode::Sealed)
        .await
        .expect("register");
    for _ in 0..2 {
        let got = node.read("d", 0, data.len() as u64).await.expect("read");
        assert_eq!(&got[..], &data[..]);
    }
    node.cache().settle();
    assert_eq!(
        node.cache().stored_bytes(),
        4096,
        "only the one non-zero block is stored"
    );
    assert_eq!(
        node.reads().stats().zero_block_hits.get(),
        9,
        "second pass: nine zero blocks"
    );
    // Adjacent misses are read in one origin read: the bytes say each block came once.
    assert_eq!(
        origin.read_bytes.load(Ordering::SeqCst),
        data.len() as u64,
        "each block read from the origin once"
    );
    assert_eq!(
        origin.reads.load(Ordering::SeqCst),
        1,
        "ten adjacent missed blocks were not read in one origin read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_block_read_is_a_slice_of_the_cached_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = node(dir.path(), 4096).await;
    let origin = TestOrigin::new(pattern(16 * 1024), 0);
    node.registry()
        .register_origin("d", origin, DiskMode::Sealed)
        .await
        .expect("register");
    let a = node.read("d", 4096 + 10, 100).await.expect("read");
    let b = node.read("d", 4096 + 200, 100).await.expect("read");
    // Both are views of one cached buffer: no copy was made for either.
    assert_eq!(b.as_ptr() as usize - a.as_ptr() as usize, 190);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_at_and_past_the_end_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = node(dir.path(), 4096).await;
    let size = 10_000u64;
    let origin = TestOrigin::new(pattern(size as usize), 0);
    node.registry()
        .register_origin("d", origin, DiskMode::Sealed)
        .await
        .expect("register");
    assert_eq!(
        node.read("d", size, 0).await.expect("empty at end").len(),
        0
    );
    assert_eq!(
        node.read("d", size - 1, 1).await.expect("last byte")[0],
        pattern(10_000)[9_999]
    );
    for (off, len) in [
        (size, 1),
        (size - 1, 2),
        (size + 1, 0),
        (u64::MAX, 2),
        (0, size + 1),
    ] {
        assert!(
            matches!(
                node.read("d", off, len).await,
                Err(Error::OutOfRange { .. })
            ),
            "{off}+{len}"
        );
    }
    assert!(matches!(
        node.read("nope", 0, 1).await,
        Err(Error::UnknownDisk(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_write_still_lands_before_a_seal_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = node(dir.path(), 4096).await;
    let origin = TestOrigin::new(pattern(16 * 1024), 0);
    origin.write_delay_ms.store(300, Ordering::SeqCst);
    node.registry()
        .register_origin("d", origin.clone(), DiskMode::Mutable)
        .await
        .expect("register");
    // The client gives up on its write long before the origin has it.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(30),
        node.write("d", 100, Bytes::from_static(b"late")),
    )
    .await;
    assert!(gave_up.is_err(), "the write should still have been running");
    // Sealing now must wait for that write: once sealed, the origin has it.
    node.set_mode("d", DiskMode::Sealed).await.expect("seal");
    assert_eq!(
        origin.written.lock().as_slice(),
        &[(100u64, b"late".to_vec())]
    );
    assert!(matches!(
        node.write("d", 0, Bytes::from_static(b"x")).await,
        Err(Error::Sealed(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_seal_still_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = node(dir.path(), 4096).await;
    let origin = TestOrigin::new(pattern(16 * 1024), 0);
    origin.write_delay_ms.store(200, Ordering::SeqCst);
    node.registry()
        .register_origin("d", origin.clone(), DiskMode::Mutable)
        .await
        .expect("register");
    let writer = {
        let node = node.clone();
        tokio::spawn(async move { node.write("d", 0, Bytes::from_static(b"w")).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The seal waits for the write; its caller gives up meanwhile.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(30),
        node.set_mode("d", DiskMode::Sealed),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the seal should have been waiting for the write"
    );
    writer.await.expect("task").expect("write");
    // The seal went on without its caller.
    let disk = node.registry().get("d").expect("disk");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while disk.sealed_map().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the disk was left half sealed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // And reads are now served through the cache.
    node.read("d", 0, 4096).await.expect("read");
    node.read("d", 0, 4096).await.expect("read");
    assert!(node.cache().stats().hits_ram_single.get() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_members_ask_of_an_owner_is_checked_before_anything_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = node(dir.path(), 4096).await;
    let origin = TestOrigin::new(pattern(40 * 1024), 0);
    node.registry()
        .register_origin("d", origin.clone(), DiskMode::Sealed)
        .await
        .expect("register");
    let mutable = TestOrigin::new(pattern(8192), 0);
    node.registry()
        .register_origin("m", mutable, DiskMode::Mutable)
        .await
        .expect("register");
    let g = node.stat("d").expect("stat").generation;
    // A range past the end, even at the last index there is, answers nothing and reads
    // nothing; a chunk inside answers every block, fingerprinted once.
    for first in [10, 11, u64::MAX] {
        let got = node
            .content_map_chunk("d", Version::new(g, 0), first, 4096)
            .await
            .expect("content map");
        assert!(got.is_empty(), "{first}: {got:?}");
    }
    assert_eq!(origin.reads.load(Ordering::SeqCst), 0);
    let got = node
        .content_map_chunk("d", Version::new(g, 0), 0, u32::MAX)
        .await
        .expect("content map");
    assert_eq!(
        got.iter().map(|e| e.0).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    assert_eq!(origin.read_bytes.load(Ordering::SeqCst), 40 * 1024);
    assert!(matches!(
        node.content_map_chunk("d", Version::new(g + 1, 0), 0, 1)
            .await,
        Err(Error::StaleGeneration { .. })
    ));
    assert!(matches!(
        node.content_map_chunk("nope", Version::new(g, 0), 0, 1)
            .await,
        Err(Error::UnknownDisk(_))
    ));
    assert!(matches!(
        node.content_map_chunk("m", Version::new(1, 0), 0, 1).await,
        Err(Error::Invalid(_))
    ));
    // Blocks: at most 64 a request; indices past the end come back missing.
    let many: Vec<u64> = (0..65).collect();
    assert!(matches!(
        node.blocks_for_peer("d", Version::new(g, 0), &many, false)
            .await,
        Err(Error::Invalid(_))
    ));
    let got = node
        .blocks_for_peer("d", Version::new(g, 0), &[3, 10, u64::MAX], false)
        .await
        .expect("blocks");
    assert_eq!(got.len(), 3);
    assert_eq!(
        got[0].1.as_deref(),
        Some(&pattern(40 * 1024)[3 * 4096..4 * 4096])
    );
    assert!(got[1].1.is_none() && got[2].1.is_none(), "{got:?}");
}

/// Issue 16, item 3: a seal whose flush fails does not seal (the disk stays mutable and takes
/// writes); the next seal, with the flush working, does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seal_whose_flush_fails_leaves_the_disk_mutable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = node(dir.path(), 4096).await;
    let origin = TestOrigin::new(pattern(64 * 1024), 0);
    node.registry()
        .register_origin("d", origin.clone(), DiskMode::Mutable)
        .await
        .expect("register");
    node.write("d", 0, Bytes::from(vec![9u8; 4096]))
        .await
        .expect("write");
    origin.flush_fails.store(true, Ordering::SeqCst);
    let e = node
        .set_mode("d", DiskMode::Sealed)
        .await
        .expect_err("a seal whose flush failed");
    assert!(e.to_string().contains("flush failed"), "{e}");
    assert_eq!(node.stat("d").expect("stat").mode, DiskMode::Mutable);
    node.write("d", 4096, Bytes::from(vec![8u8; 4096]))
        .await
        .expect("still takes writes");
    origin.flush_fails.store(false, Ordering::SeqCst);
    node.set_mode("d", DiskMode::Sealed).await.expect("seal");
    assert_eq!(node.stat("d").expect("stat").mode, DiskMode::Sealed);
}

/// A node (4 KiB blocks) owning sealed disk "d" over `data` (reads delayed `delay_ms`): the
/// node, the origin and the disk's generation.
async fn sealed_owner(
    dir: &std::path::Path,
    data: &[u8],
    delay_ms: u64,
) -> (Arc<Node>, Arc<TestOrigin>, u64) {
    let node = node(dir, 4096).await;
    let origin = TestOrigin::new(data.to_vec(), delay_ms);
    node.registry()
        .register_origin("d", origin.clone(), DiskMode::Sealed)
        .await
        .expect("register");
    let g = node.stat("d").expect("stat").generation;
    (node, origin, g)
}

/// Entries in RAM: in `tier`, or in both RAM pools.
fn ram_entries(node: &Node, tier: Option<shadowcache_node::cache::Tier>) -> u64 {
    use shadowcache_node::cache::Tier;
    node.cache()
        .usage()
        .into_iter()
        .filter(|u| tier.map_or(u.tier != Tier::Ssd, |t| u.tier == t))
        .map(|u| u.entries)
        .sum()
}

/// What members fetch through an owner from its own disk does not fill the owner's cache, nor
/// touch what its own clients cached there: the member caches its copy, and the owner's RAM
/// (and SSD tier) stays its clients'. Blocks its clients cached are still served from RAM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_fetch_neither_fills_nor_touches_the_owners_cache() {
    use shadowcache_node::cache::Tier;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = pattern(64 * 1024);
    let (node, origin, g) = sealed_owner(dir.path(), &data, 0).await;
    let entries = |tier: Tier| ram_entries(&node, Some(tier));
    // The owner's own client reads block 0: cached, single-touch.
    node.read("d", 0, 4096).await.expect("client read");
    assert_eq!(entries(Tier::RamSingle), 1);
    let hits_before = node.cache().stats().hits_ram_single.get();
    // A member asks for the content map first, as it does before it fetches: the owner reads
    // and fingerprints the blocks, and admits none of them.
    let map = node
        .content_map_chunk("d", Version::new(g, 0), 0, 16)
        .await
        .expect("content map");
    assert_eq!(map.len(), 16);
    assert_eq!(entries(Tier::RamSingle), 1, "map blocks admitted");
    let reads_before = origin.reads.load(Ordering::SeqCst);
    // A member fetches blocks 0..8: right bytes, block 0 from RAM, the rest from the blocks
    // the map just read (staged, not cached): no origin read.
    let got = node
        .blocks_for_peer("d", Version::new(g, 0), &(0..8).collect::<Vec<_>>(), false)
        .await
        .expect("fetch");
    for (i, b) in &got {
        let b = b.as_ref().expect("block");
        let at = (*i * 4096) as usize;
        assert_eq!(&b[..], &data[at..at + 4096], "block {i}");
    }
    assert_eq!(
        origin.reads.load(Ordering::SeqCst) - reads_before,
        0,
        "blocks 1..8 read again from the origin right after the map read them"
    );
    // Past the staging: blocks 8..16, read for the map, staged, then dropped (as they are
    // after a few seconds), are read from the origin in one read.
    node.reads().drop_staged();
    let got = node
        .blocks_for_peer("d", Version::new(g, 0), &(8..16).collect::<Vec<_>>(), false)
        .await
        .expect("fetch");
    assert_eq!(got.len(), 8);
    for (i, b) in &got {
        let at = (*i * 4096) as usize;
        assert_eq!(b.as_deref(), Some(&data[at..at + 4096]), "block {i}");
    }
    assert_eq!(
        origin.reads.load(Ordering::SeqCst) - reads_before,
        1,
        "blocks 8..16 in one origin read"
    );
    // Nothing admitted, nothing promoted, no hit counted for the owner's clients.
    assert_eq!(entries(Tier::RamSingle), 1, "member blocks admitted");
    assert_eq!(entries(Tier::RamMulti), 0, "the client's block promoted");
    assert_eq!(node.cache().stats().hits_ram_single.get(), hits_before);
    // The map learned the fingerprints: a member's later fetch of the same blocks reads the
    // origin again rather than the cache, and still gets the right bytes.
    let again = node
        .blocks_for_peer("d", Version::new(g, 0), &[5], false)
        .await
        .expect("fetch");
    assert_eq!(
        again[0].1.as_deref(),
        Some(&data[5 * 4096..6 * 4096]),
        "block 5 again"
    );
    assert_eq!(entries(Tier::RamSingle) + entries(Tier::RamMulti), 1);
}

/// A client read of the owner's own disk never joins a member's load of the same block (that
/// load admits nothing, so the client's block would never be cached), and is cached as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_read_does_not_join_a_members_load_and_is_cached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = pattern(16 * 1024);
    let (node, origin, g) = sealed_owner(dir.path(), &data, 200).await;
    let member = {
        let node = node.clone();
        tokio::spawn(async move {
            node.blocks_for_peer("d", Version::new(g, 0), &[0, 1], false)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let got = node.read("d", 0, 8192).await.expect("client read");
    assert_eq!(&got[..], &data[..8192]);
    let fetched = member.await.expect("task").expect("member fetch");
    assert!(fetched.iter().all(|(_, b)| b.is_some()));
    assert_eq!(
        ram_entries(&node, None),
        2,
        "the client's blocks are cached"
    );
    let reads = origin.reads.load(Ordering::SeqCst);
    node.read("d", 0, 8192).await.expect("client read again");
    assert_eq!(
        origin.reads.load(Ordering::SeqCst),
        reads,
        "served from the cache"
    );
}

/// An origin whose bytes change with writes, and whose reads can be held at a gate.
#[derive(Debug)]
struct GatedOrigin {
    data: parking_lot::Mutex<Vec<u8>>,
    hold: AtomicBool,
    gate: tokio::sync::Notify,
    entered: tokio::sync::Notify,
}

impl GatedOrigin {
    fn new(data: Vec<u8>) -> Arc<Self> {
        Arc::new(GatedOrigin {
            data: parking_lot::Mutex::new(data),
            hold: AtomicBool::new(false),
            gate: tokio::sync::Notify::new(),
            entered: tokio::sync::Notify::new(),
        })
    }
}

impl Origin for GatedOrigin {
    fn describe(&self) -> &str {
        "gated-origin"
    }

    fn size(&self) -> u64 {
        self.data.lock().len() as u64
    }

    fn read_at(&self, offset: u64, len: usize) -> OriginFuture<'_, Bytes> {
        Box::pin(async move {
            if self.hold.load(Ordering::SeqCst) {
                let opened = self.gate.notified();
                self.entered.notify_one();
                opened.await;
            }
            let d = self.data.lock();
            let o = offset as usize;
            Ok(Bytes::copy_from_slice(&d[o..o + len]))
        })
    }

    fn write_at(&self, offset: u64, data: Bytes) -> OriginFuture<'_, ()> {
        Box::pin(async move {
            let o = offset as usize;
            self.data.lock()[o..o + data.len()].copy_from_slice(&data);
            Ok(())
        })
    }

    fn flush(&self) -> OriginFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn identity(&self) -> Option<String> {
        None
    }
}

/// Found in review: two reads of a detected disk's block whose fingerprint the map knows but
/// the cache does not hold; the first leads the origin read, the second joins it expecting
/// that fingerprint; a write lands before the origin is read. The joiner must not admit the
/// new bytes under the old fingerprint: another disk of that content (or this one, detected
/// again) would then be served the written bytes from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_during_a_joined_origin_read_leaves_no_bytes_under_the_old_fingerprint() {
    const BS: usize = 4096;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Config::for_data_dir(dir.path());
    c.block_bytes = BS as u32;
    c.ram_bytes = 16 << 20;
    c.ssd_bytes = 0;
    c.detection.min_readers = 1;
    c.detection.min_reads = 1;
    c.detection.quiet_period_ms = 0;
    let node = Node::open(c).await.expect("node");
    let old = vec![0xAAu8; BS];
    let new = vec![0xBBu8; BS];
    let d_origin = GatedOrigin::new([old.clone(), vec![1u8; BS]].concat());
    let d = node
        .registry()
        .register_origin("d", d_origin.clone(), DiskMode::Mutable)
        .await
        .expect("register d");
    node.read("d", BS as u64, BS as u64).await.expect("read");
    for _ in 0..100 {
        node.detect_all().await;
        if d.state() == shadowcache_node::DiskState::Detected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(d.state(), shadowcache_node::DiskState::Detected);
    // A member's map request teaches the map block 0's fingerprint; what it staged goes.
    node.content_map_chunk("d", Version::new(d.generation(), d.epoch), 0, 1)
        .await
        .expect("content map");
    node.reads().drop_staged();

    d_origin.hold.store(true, Ordering::SeqCst);
    let entered = d_origin.entered.notified();
    let leader = tokio::spawn({
        let node = node.clone();
        async move { node.read("d", 0, BS as u64).await }
    });
    entered.await;
    let joins = node.reads().stats().single_flight_joins.get();
    let joiner = tokio::spawn({
        let node = node.clone();
        async move { node.read("d", 0, BS as u64).await }
    });
    for _ in 0..500 {
        if node.reads().stats().single_flight_joins.get() > joins {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        node.reads().stats().single_flight_joins.get() > joins,
        "the second read joined the first's flight"
    );
    node.write("d", 0, Bytes::from(new.clone()))
        .await
        .expect("write acknowledged");
    d_origin.hold.store(false, Ordering::SeqCst);
    d_origin.gate.notify_waiters();
    // Both reads were in flight when the write was acknowledged: either content will do.
    for r in [leader, joiner] {
        let got = r.await.expect("task").expect("read");
        assert!(got[..] == new[..] || got[..] == old[..]);
    }
    // A sealed disk holding the old content at block 0: served the old content, first from
    // its origin and then from the cache.
    let e_origin = GatedOrigin::new([old.clone(), vec![2u8; BS]].concat());
    node.registry()
        .register_origin("e", e_origin, DiskMode::Sealed)
        .await
        .expect("register e");
    for pass in 0..2 {
        let got = node.read("e", 0, BS as u64).await.expect("read e");
        assert!(
            got[..] == old[..],
            "pass {pass}: disk e served the written bytes"
        );
    }
    // And disk d now reads what was written.
    assert_eq!(
        &node.read("d", 0, BS as u64).await.expect("read d")[..],
        &new[..]
    );
}

//! Behaviour of the three pools together: promotion, demotion, eviction order, dedup accounting,
//! a warm restart and a damaged SSD slot.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::*;

const BS: u32 = 4096;

/// RAM of four blocks with a fixed single-touch target of two (no adaptation, no ghosts, no
/// second chances: the tiers' mechanics alone), and `ssd_slots` on SSD.
fn cache(dir: &Path, ssd_slots: u64) -> ContentCache {
    open(dir, ssd_slots, false)
}

fn open(dir: &Path, ssd_slots: u64, policy: bool) -> ContentCache {
    let (c, _) = ContentCache::open(settings(dir, ssd_slots, policy)).expect("open cache");
    c
}

/// The settings of [`open`].
fn settings(dir: &Path, ssd_slots: u64, policy: bool) -> CacheConfig {
    CacheConfig {
        block_bytes: BS,
        ram_bytes: 4 * u64::from(BS),
        single_touch_share: 0.5,
        adaptive: policy,
        ghost_ratio: if policy { 1.0 } else { 0.0 },
        second_chances: policy,
        ssd: (ssd_slots > 0).then(|| SsdConfig {
            data_path: dir.join("slots"),
            index_path: dir.join("index"),
            capacity_bytes: ssd_slots * u64::from(BS),
            slot_bytes: BS,
            direct: true,
        }),
        demotion_queue: 64,
        // Every SSD hit moves the entry back to RAM: the tiers' mechanics alone (the
        // default's own test is `an_entry_stays_on_ssd_for_its_first_hits_...`).
        ssd_promote_hits: 1,
        ..CacheConfig::default()
    }
}

#[test]
fn an_entry_stays_on_ssd_for_its_first_hits_and_its_copy_saves_the_next_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = fixed(dir.path(), 0.0, SsdAdmission::default(), 3);
    // 1 to 5 read twice (multi-touch, 4 blocks of RAM): 1 is demoted to SSD, one write.
    read_each_twice(&c, 1..=5);
    assert_eq!(tier(&c, 1), Some(Tier::Ssd));
    let written = c.stats().ssd_written_bytes.get();
    assert_eq!(written, u64::from(BS));
    // Its first two SSD hits are served from SSD, where it stays.
    assert_eq!(read(&c, 1), Some(Tier::Ssd));
    assert_eq!(read(&c, 1), Some(Tier::Ssd));
    assert_eq!(tier(&c, 1), Some(Tier::Ssd));
    // The third moves it to RAM; the slot stays as a copy (not counted as stored there).
    assert_eq!(read(&c, 1), Some(Tier::Ssd));
    assert_eq!(tier(&c, 1), Some(Tier::RamMulti));
    assert_eq!(c.stats().ssd_served_bytes.get(), 3 * u64::from(BS));
    let ssd_usage = |c: &ContentCache| {
        c.usage()
            .into_iter()
            .find(|t| t.tier == Tier::Ssd)
            .map(|t| t.entries)
    };
    // Bringing 1 back pushed the least recent multi-touch entry, 2, to SSD: a write.
    assert_eq!(tier(&c, 2), Some(Tier::Ssd));
    assert_eq!(ssd_usage(&c), Some(1));
    let written = c.stats().ssd_written_bytes.get();
    let demotions = c.stats().demotions.get();
    // Four new blocks read twice push 1 out of RAM again: its copy is its home again, and
    // nothing is written for it (the others' demotions are).
    read_each_twice(&c, 6..=9);
    assert_eq!(tier(&c, 1), Some(Tier::Ssd));
    assert!(c.stats().ssd_writes_saved.get() >= 1);
    let more = c.stats().ssd_written_bytes.get() - written;
    let demoted_since = u64::from(BS) * (c.stats().demotions.get() - demotions);
    assert_eq!(
        more + u64::from(BS),
        demoted_since,
        "1's demotion wrote nothing"
    );
    assert_eq!(c.stats().ssd_verify_failures.get(), 0);
}

/// RAM of four blocks (single-touch target two, ghosts of `ghost_ratio` times four keys, fixed
/// rules, no second chances) and eight SSD slots, with `admission` and `promote_hits`.
fn fixed(dir: &Path, ghost_ratio: f64, admission: SsdAdmission, promote_hits: u8) -> ContentCache {
    let (c, _) = ContentCache::open(CacheConfig {
        block_bytes: BS,
        ram_bytes: 4 * u64::from(BS),
        single_touch_share: 0.5,
        adaptive: false,
        ghost_ratio,
        second_chances: false,
        policy_rules: Some(pool::Variant::Tuned),
        ssd: Some(SsdConfig {
            data_path: dir.join("slots"),
            index_path: dir.join("index"),
            capacity_bytes: 8 * u64::from(BS),
            slot_bytes: BS,
            direct: true,
        }),
        demotion_queue: 64,
        ssd_admission: admission,
        ssd_promote_hits: promote_hits,
        ..CacheConfig::default()
    })
    .expect("open cache");
    c
}

/// [`fixed`] with ghosts of four keys and the default SSD hits before promotion.
fn admitting(dir: &Path, admission: SsdAdmission) -> ContentCache {
    fixed(dir, 1.0, admission, DEFAULT_SSD_PROMOTE_HITS)
}

#[test]
fn the_ssd_refuses_an_entry_read_twice_and_takes_it_once_read_again_from_the_ghost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = admitting(dir.path(), SsdAdmission::default());
    // 1 to 4 read twice fill RAM multi-touch; 5's first read makes RAM let 1 go. A second read
    // while in single-touch is all 1 has shown: not written, its key left in the ghost.
    read_each_twice(&c, 1..=4);
    read(&c, 5);
    assert_eq!(tier(&c, 1), None);
    assert_eq!(c.stats().ssd_admissions_refused.get(), 1);
    assert_eq!(c.stats().ssd_written_bytes.get(), 0);
    assert_eq!(c.stats().demotions.get(), 0);
    // Read again while the ghost remembers it: a miss, and straight to multi-touch, proven
    // (RAM lets 2 go for it, refused too).
    assert_eq!(read(&c, 1), None);
    assert_eq!(tier(&c, 1), Some(Tier::RamMulti));
    assert_eq!(c.stats().ghost_hits_multi.get(), 1);
    assert_eq!(c.stats().ssd_admissions_refused.get(), 2);
    // Pushed out of RAM now, it is written to SSD, and served from there.
    read_each_twice(&c, 6..=9);
    assert_eq!(tier(&c, 1), Some(Tier::Ssd));
    assert_eq!(c.stats().ssd_written_bytes.get(), u64::from(BS));
    assert_eq!(c.stats().demotions.get(), 1);
    assert_eq!(read(&c, 1), Some(Tier::Ssd));
    assert_eq!(c.stats().ssd_served_bytes.get(), u64::from(BS));
    logical_matches_contents(&c);
}

#[test]
fn the_ssd_takes_an_entry_read_four_times_in_ram_and_every_entry_under_admission_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = admitting(dir.path(), SsdAdmission::default());
    // 1 read four times and 2 three times, in turn, as clients booting from one image read:
    // 1's third and fourth reads, in multi-touch, prove it; three reads are not enough.
    for k in 0..4 {
        read(&c, 1);
        if k < 3 {
            read(&c, 2);
        }
    }
    // 3 read four times in a row, nothing between: one reader going through the block in
    // smaller reads proves nothing.
    for _ in 0..4 {
        read(&c, 3);
    }
    read_each_twice(&c, 4..=7);
    assert_eq!(tier(&c, 1), Some(Tier::Ssd));
    assert_eq!(tier(&c, 2), None);
    assert_eq!(tier(&c, 3), None);
    assert_eq!(c.stats().ssd_written_bytes.get(), u64::from(BS));
    assert!(c.stats().ssd_admissions_refused.get() >= 2);

    // Admission `all`: what a second read brought to multi-touch is written when RAM lets it
    // go, and nothing is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let c = admitting(dir.path(), SsdAdmission::All);
    read_each_twice(&c, 1..=5);
    assert_eq!(tier(&c, 1), Some(Tier::Ssd));
    assert_eq!(c.stats().ssd_written_bytes.get(), u64::from(BS));
    assert_eq!(c.stats().ssd_admissions_refused.get(), 0);
}

#[test]
fn with_ghosts_off_the_ssd_takes_every_entry_multi_touch_lets_go() {
    // Nothing could come back proven from a ghost, so the rule would starve the SSD.
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache(dir.path(), 8);
    assert_eq!(c.config().ssd_admission, SsdAdmission::Proven);
    read_each_twice(&c, 1..=5);
    assert_eq!(tier(&c, 1), Some(Tier::Ssd));
    assert_eq!(c.stats().ssd_admissions_refused.get(), 0);
}

fn block(tag: u8) -> (Fingerprint, Bytes) {
    let b = Bytes::from(vec![tag; BS as usize]);
    (Fingerprint::of(&b), b)
}

/// Reads as the read path does: a lookup, and on a miss an admit of the block's bytes.
fn read(c: &ContentCache, tag: u8) -> Option<Tier> {
    let (fp, b) = block(tag);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let hit = rt.block_on(c.get(&fp));
    if hit.is_none() {
        c.admit(fp, b);
    }
    c.settle();
    hit.map(|(bytes, tier)| {
        assert_eq!(Fingerprint::of(&bytes), fp, "a hit returned other bytes");
        tier
    })
}

/// Reads each block of `tags` twice: a miss, then a hit that promotes it to multi-touch.
fn read_each_twice(c: &ContentCache, tags: std::ops::RangeInclusive<u8>) {
    for tag in tags {
        read(c, tag);
        read(c, tag);
    }
}

fn tier(c: &ContentCache, tag: u8) -> Option<Tier> {
    c.tier_of(&block(tag).0)
}

/// Without dedup (every block distinct), the bytes the entries stand for are the bytes stored.
fn logical_matches_contents(c: &ContentCache) {
    c.settle();
    let stored: u64 = c.usage().iter().map(|t| t.bytes).sum();
    let logical = c.stats().logical_bytes.load(Ordering::Relaxed);
    assert_eq!(
        logical, stored,
        "dedup accounting drifted from the contents"
    );
}

#[test]
fn a_first_read_lands_in_single_touch_and_a_second_promotes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache(dir.path(), 4);
    assert_eq!(read(&c, 1), None);
    assert_eq!(tier(&c, 1), Some(Tier::RamSingle));
    assert_eq!(read(&c, 1), Some(Tier::RamSingle));
    assert_eq!(tier(&c, 1), Some(Tier::RamMulti));
    assert_eq!(read(&c, 1), Some(Tier::RamMulti));
    assert_eq!(c.stats().promotions.get(), 1);
}

#[test]
fn single_touch_evicts_its_least_recent_entry_and_drops_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache(dir.path(), 4);
    // With multi-touch empty, single-touch may use the whole budget of four...
    for tag in 1..=4 {
        read(&c, tag);
    }
    assert_eq!(c.stats().evictions_ram_single.get(), 0);
    // ...and the fifth makes it give up its least recent entry.
    read(&c, 5);
    assert_eq!(
        tier(&c, 1),
        None,
        "a single-touch eviction must not reach SSD"
    );
    for tag in 2..=5 {
        assert_eq!(tier(&c, tag), Some(Tier::RamSingle));
    }
    assert_eq!(c.stats().evictions_ram_single.get(), 1);
    assert_eq!(c.ssd().map(|s| s.usage().0), Some(0));
}

#[test]
fn multi_touch_demotes_to_ssd_and_ssd_evicts_in_lru_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache(dir.path(), 2);
    // Promote 1 to 5 in turn; RAM holds four, so 1 is demoted.
    read_each_twice(&c, 1..=5);
    assert_eq!(tier(&c, 1), Some(Tier::Ssd));
    for tag in 2..=5 {
        assert_eq!(tier(&c, tag), Some(Tier::RamMulti));
    }
    assert_eq!(c.stats().demotions.get(), 1);
    // Two more promotions demote 2 and 3; the SSD (two slots) then drops its oldest, 1.
    read_each_twice(&c, 6..=7);
    assert_eq!(tier(&c, 1), None);
    assert_eq!(tier(&c, 2), Some(Tier::Ssd));
    assert_eq!(tier(&c, 3), Some(Tier::Ssd));
    assert_eq!(c.stats().evictions_ssd.get(), 1);
    logical_matches_contents(&c);
}

#[test]
fn an_ssd_hit_returns_the_entry_to_the_top_of_ram_multi_touch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache(dir.path(), 4);
    read_each_twice(&c, 1..=5);
    assert_eq!(tier(&c, 1), Some(Tier::Ssd));
    // 1 comes back to the top of multi-touch, which pushes the least recent, 2, to SSD.
    assert_eq!(read(&c, 1), Some(Tier::Ssd));
    assert_eq!(tier(&c, 1), Some(Tier::RamMulti));
    assert_eq!(tier(&c, 2), Some(Tier::Ssd));
    // The next demotion takes 3, not 1.
    read(&c, 6);
    read(&c, 6);
    assert_eq!(tier(&c, 1), Some(Tier::RamMulti));
    assert_eq!(tier(&c, 3), Some(Tier::Ssd));
    assert_eq!(c.stats().hits_ssd.get(), 1);
}

#[test]
fn without_an_ssd_tier_multi_touch_evictions_are_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache(dir.path(), 0);
    read_each_twice(&c, 1..=5);
    assert_eq!(tier(&c, 1), None);
    assert_eq!(c.stats().evictions_ram_multi.get(), 1);
}

#[test]
fn identical_blocks_are_stored_once_and_counted_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache(dir.path(), 4);
    let (fp, b) = block(9);
    // Two disks' blocks with the same content, each read from its origin once.
    c.admit(fp, b.clone());
    c.admit(fp, Bytes::from(b.to_vec()));
    c.settle();
    assert_eq!(c.stored_bytes(), u64::from(BS));
    assert_eq!(
        c.stats().logical_bytes.load(Ordering::Relaxed),
        2 * u64::from(BS)
    );
    // Read through the second disk's block too: it is the content's second read.
    assert_eq!(tier(&c, 9), Some(Tier::RamMulti));
}

/// A data directory whose SSD tier holds blocks 1 to 3, written by a cache shut down cleanly.
fn warm_ssd() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache(dir.path(), 8);
    read_each_twice(&c, 1..=3);
    c.shutdown();
    dir
}

/// The cache of `dir` opened again, its SSD index read in the background.
fn open_in_background(dir: &tempfile::TempDir) -> (ContentCache, Option<Recovery>) {
    ContentCache::open(CacheConfig {
        ssd_load: SsdLoad::Background,
        ..settings(dir.path(), 8, false)
    })
    .expect("open cache")
}

#[test]
fn a_restarted_cache_serves_ssd_hits_at_once() {
    let dir = warm_ssd();
    let c = cache(dir.path(), 8);
    for tag in 1..=3 {
        assert_eq!(read(&c, tag), Some(Tier::Ssd), "block {tag} was not warm");
    }
    assert_eq!(c.stats().misses.get(), 0);
}

/// The SSD tier's line of the cache's usage.
fn ssd(c: &ContentCache) -> TierUsage {
    c.usage()
        .into_iter()
        .find(|t| t.tier == Tier::Ssd)
        .expect("an ssd tier")
}

/// Waits (at most 30 s) until the SSD index has been read.
fn wait_loaded(c: &ContentCache) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ssd(c).loading {
        assert!(
            std::time::Instant::now() < deadline,
            "the ssd index was still loading after 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn a_cache_that_reads_its_ssd_index_in_the_background_serves_it_once_read() {
    let dir = warm_ssd();
    let (c, recovery) = open_in_background(&dir);
    // Found in the log, not returned: the open does not wait for it.
    assert!(recovery.is_none());
    wait_loaded(&c);
    assert_eq!(ssd(&c).entries, 3);
    for tag in 1..=3 {
        assert_eq!(read(&c, tag), Some(Tier::Ssd), "block {tag} was not warm");
    }
    assert_eq!(c.stats().misses.get(), 0);
    logical_matches_contents(&c);
}

/// A panic while the index is read in the background (a bug) leaves the tier empty and
/// working, not loading for ever: blocks RAM lets go are stored and served from it.
#[cfg(feature = "failpoints")]
#[test]
fn a_panic_while_the_ssd_index_loads_leaves_the_tier_empty_and_working() {
    let dir = warm_ssd();
    fail::cfg("ssd-load-before-swap", "panic").expect("fail point");
    let (c, _) = open_in_background(&dir);
    wait_loaded(&c);
    fail::cfg("ssd-load-before-swap", "off").expect("fail point");
    assert_eq!(ssd(&c).entries, 0, "nothing recovered");
    assert_eq!(read(&c, 1), None, "block 1 comes from its origin again");
    // Blocks read twice, then pushed out of RAM, go to the SSD and are served from it.
    read_each_twice(&c, 1..=3);
    read_each_twice(&c, 10..=13);
    for tag in 20..=22 {
        read(&c, tag);
    }
    c.settle();
    assert!(ssd(&c).entries > 0, "the tier took nothing");
    assert_eq!(read(&c, 1), Some(Tier::Ssd));
    logical_matches_contents(&c);
}

/// Held at the fail point before the index is swapped in, the tier is seen loading, and
/// blocks read meanwhile come from their origins into RAM. Once loaded, the tier holds the
/// same blocks too: each is an entry of its own on both tiers until RAM lets it go, and the
/// bytes the entries stand for stay the bytes stored throughout.
#[cfg(feature = "failpoints")]
#[test]
fn blocks_read_while_the_ssd_index_loads_are_counted_once_when_ram_lets_them_go() {
    let dir = warm_ssd();
    fail::cfg("ssd-load-before-swap", "pause").expect("fail point");
    let (c, _) = open_in_background(&dir);
    assert!(
        ssd(&c).loading,
        "the tier was not loading at the fail point"
    );
    assert_eq!(ssd(&c).entries, 0);
    // Read while loading: misses, then RAM hits.
    assert_eq!(read(&c, 1), None);
    assert_eq!(read(&c, 1), Some(Tier::RamSingle));
    assert_eq!(read(&c, 2), None);
    assert_eq!(c.stats().misses.get(), 2);
    fail::cfg("ssd-load-before-swap", "off").expect("fail point");
    wait_loaded(&c);
    assert_eq!(ssd(&c).entries, 3);
    logical_matches_contents(&c);
    // New blocks push 1 and 2 out of RAM: 1 (multi-touch) is demoted onto the entry the SSD
    // already holds, 2 (single-touch) is dropped. Each is then held once, and counted once.
    read_each_twice(&c, 10..=13);
    for tag in 20..=22 {
        read(&c, tag);
    }
    assert_eq!(tier(&c, 1), Some(Tier::Ssd));
    assert_eq!(tier(&c, 2), Some(Tier::Ssd));
    logical_matches_contents(&c);
    assert_eq!(read(&c, 3), Some(Tier::Ssd));
}

#[test]
fn the_ssd_index_is_read_before_serving_up_to_a_size_and_in_the_background_above() {
    assert!(!SsdLoad::Auto.in_background(SSD_LOAD_BACKGROUND_SLOTS));
    assert!(SsdLoad::Auto.in_background(SSD_LOAD_BACKGROUND_SLOTS + 1));
    assert!(!SsdLoad::Wait.in_background(u32::MAX));
    assert!(SsdLoad::Background.in_background(1));
    // A small tier under the default opens loaded.
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache(dir.path(), 8);
    assert_eq!(c.config().ssd_load, SsdLoad::Auto);
    assert!(c.usage().iter().all(|t| !t.loading));
}

#[test]
fn a_flipped_byte_in_the_ssd_file_is_detected_and_never_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache(dir.path(), 4);
    read_each_twice(&c, 1..=5);
    let (fp1, _) = block(1);
    let ssd = c.ssd().expect("ssd");
    let off = ssd.payload_offset(&fp1).expect("1 is on ssd");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(ssd.data_path())
        .expect("open slots");
    f.write_all_at(&[0xFF], off + 17).expect("flip");
    // The lookup misses (read() asserts that any hit verifies), and is counted.
    assert_eq!(read(&c, 1), None);
    assert_eq!(c.stats().ssd_verify_failures.get(), 1);
    // The reader's admit put the good bytes back in single-touch; the bad slot is gone.
    assert_eq!(tier(&c, 1), Some(Tier::RamSingle));
}

#[test]
fn a_second_look_within_one_request_is_not_counted_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache(dir.path(), 0);
    let (fp, b) = block(3);
    c.record_miss();
    c.admit(fp, b.clone());
    let before = (c.stats().lookups(), c.stats().hits_ram_single.get());
    let got = c.get_ram_uncounted(&fp).expect("held");
    assert_eq!(got, (b, Tier::RamSingle));
    assert_eq!(
        (c.stats().lookups(), c.stats().hits_ram_single.get()),
        before
    );
    // It is still a read: the entry was promoted.
    assert_eq!(tier(&c, 3), Some(Tier::RamMulti));
}

#[test]
fn zero_bytes_come_from_one_shared_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache(dir.path(), 0);
    let z = c.zero(100);
    assert_eq!(z.len(), 100);
    assert!(z.iter().all(|b| *b == 0));
    assert_eq!(
        c.zero(BS as usize).as_ptr(),
        z.as_ptr(),
        "zero blocks must share one buffer"
    );
    assert_eq!(c.stored_bytes(), 0);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Whatever the order of reads: pools stay within capacity, an entry lives in one RAM
        /// pool at most, and every hit returns the bytes of the fingerprint asked for.
        #[test]
        fn pools_stay_within_capacity_and_hits_are_exact(
            reads in proptest::collection::vec(1u8..24, 1..120),
            policy: bool,
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let c = open(dir.path(), 6, policy);
            for tag in reads {
                read(&c, tag); // asserts hit bytes
                let st = c.policy();
                prop_assert!(
                    st.single_bytes + st.multi_bytes <= st.capacity_bytes,
                    "RAM over budget: {:?}", st
                );
                prop_assert!(st.single_target_bytes >= st.single_min_bytes);
                prop_assert!(st.single_target_bytes <= st.single_max_bytes);
                prop_assert!(st.ghost_single <= st.ghost_capacity);
                prop_assert!(st.ghost_multi <= st.ghost_capacity);
                for t in c.usage() {
                    if t.tier == Tier::Ssd {
                        prop_assert!(t.bytes <= t.capacity_bytes, "{:?} over capacity", t);
                    }
                }
            }
            logical_matches_contents(&c);
        }
    }
}

/// A read of one block reads its SSD hit on its own thread (`block_in_place` on a
/// multi-threaded runtime; the blocking pool on a current-thread one, where that would panic):
/// the same verified bytes and counts either way, and a damaged slot is still a counted miss.
#[test]
fn a_lone_ssd_hit_is_verified_and_counted_on_either_runtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache(dir.path(), 4);
    read_each_twice(&c, 1..=7);
    for tag in 1..=3 {
        assert_eq!(tier(&c, tag), Some(Tier::Ssd), "block {tag}");
    }
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    // On a worker thread of its own task, as the read path calls it.
    let on_worker = |fp: Fingerprint| {
        let c = c.clone();
        multi
            .block_on(async move { tokio::spawn(async move { c.get_alone(&fp).await }).await })
            .expect("task")
    };
    let (fp1, b1) = block(1);
    assert_eq!(on_worker(fp1), Some((b1, Tier::Ssd)));
    assert_eq!(c.stats().hits_ssd.get(), 1);
    // Slot 2 damaged: a miss on the worker thread too, counted, the slot freed.
    let (fp2, _) = block(2);
    let ssd = c.ssd().expect("ssd");
    let off = ssd.payload_offset(&fp2).expect("2 is on ssd");
    std::fs::OpenOptions::new()
        .write(true)
        .open(ssd.data_path())
        .expect("open slots")
        .write_all_at(&[0xEE], off + 5)
        .expect("flip");
    assert!(on_worker(fp2).is_none());
    assert_eq!(c.stats().ssd_verify_failures.get(), 1);
    assert_eq!(tier(&c, 2), None);
    // On a current-thread runtime the same call goes to the blocking pool.
    let (fp3, b3) = block(3);
    let single = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    assert_eq!(single.block_on(c.get_alone(&fp3)), Some((b3, Tier::Ssd)));
    assert_eq!(c.stats().hits_ssd.get(), 2);
}

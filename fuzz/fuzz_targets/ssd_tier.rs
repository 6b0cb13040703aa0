//! The SSD tier's files after damage (a crash, a bad disk, a full filesystem): a valid tier of
//! twelve blocks, then the input's byte edits of its index and slot files and a possible
//! truncation of the slot file, then opened again. Never a panic; every block it serves is
//! the block stored under that fingerprint, or a reported corruption.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shadowcache_node::Fingerprint;
use shadowcache_node::cache::ssd::{SlotRead, SsdConfig, SsdTier};

const SLOT: u32 = 4096;
const BLOCKS: usize = 12;

fn config(dir: &Path) -> SsdConfig {
    SsdConfig {
        data_path: dir.join("ssd.data"),
        index_path: dir.join("ssd.index"),
        capacity_bytes: 16 * u64::from(SLOT),
        slot_bytes: SLOT,
        // Payloads of every length pass through the aligned O_DIRECT buffers.
        direct: true,
    }
}

fn block(i: usize) -> Vec<u8> {
    (0..SLOT as usize - i * 100)
        .map(|k| (k * 31 + i * 7) as u8)
        .collect()
}

/// The files of a tier holding `BLOCKS` blocks, written once per process.
fn files() -> &'static (Vec<u8>, Vec<u8>) {
    static F: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tier, _) = SsdTier::open(config(dir.path())).expect("open");
        for i in 0..BLOCKS {
            let b = block(i);
            let fp = Fingerprint::of(&b);
            let r = tier.reserve(&fp, 1).slot().expect("a slot");
            tier.write(r, fp, &b, 1).expect("write");
        }
        tier.sync().expect("sync");
        drop(tier);
        let c = config(dir.path());
        (
            std::fs::read(&c.index_path).expect("index"),
            std::fs::read(&c.data_path).expect("data"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let (index, slots) = files();
    let (mut index, mut slots) = (index.clone(), slots.clone());
    let (truncate, edits) = data.split_first().map_or((0, &[][..]), |(t, e)| (*t, e));
    // Edits of 5 bytes: file (index or slots), offset (3 bytes, wrapped), value to xor.
    for e in edits.chunks_exact(5) {
        let f = if e[0] & 1 == 0 {
            &mut index
        } else {
            &mut slots
        };
        if f.is_empty() {
            continue;
        }
        let at = (usize::from(e[1]) << 16 | usize::from(e[2]) << 8 | usize::from(e[3])) % f.len();
        f[at] ^= e[4];
    }
    if truncate & 0x80 != 0 {
        let keep = slots.len() * usize::from(truncate & 0x7f) / 127;
        slots.truncate(keep);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let c = config(dir.path());
    std::fs::write(&c.index_path, &index).expect("index");
    std::fs::write(&c.data_path, &slots).expect("data");
    let untouched = edits.len() < 5 && truncate & 0x80 == 0;
    let opened = SsdTier::open(c);
    if untouched {
        // No damage: the tier reopens with every block.
        let (_, recovery) = opened.as_ref().expect("an undamaged tier opens");
        assert_eq!(recovery.recovered, BLOCKS as u64, "{recovery:?}");
    }
    let Ok((tier, _recovery)) = opened else {
        return;
    };
    for i in 0..BLOCKS {
        let b = block(i);
        let fp = Fingerprint::of(&b);
        if let Some(at) = tier.lookup(&fp) {
            match tier.read(&fp, at) {
                SlotRead::Hit(got) => assert!(got[..] == b[..], "block {i} served wrong bytes"),
                SlotRead::Corrupt | SlotRead::Reassigned => {}
            }
        }
    }
    for fp in tier.lru_order().unwrap_or_default() {
        if let Some(at) = tier.lookup(&fp)
            && let SlotRead::Hit(got) = tier.read(&fp, at)
        {
            assert_eq!(
                Fingerprint::of(&got),
                fp,
                "a block served under another fingerprint"
            );
        }
    }
});

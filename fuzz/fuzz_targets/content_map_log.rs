//! A content map log with a valid header and any bytes after it (a crash, a bad disk, an
//! attacker with the data directory): loaded up to its first bad record, never a panic, and
//! what was loaded is what the log says.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shadowcache_node::disk::content_map::ContentMap;

const IDENTITY: &str = "fuzz-origin";
const BLOCK: u32 = 4096;

/// The header an empty log starts with, as the node writes it.
fn header() -> &'static [u8] {
    static H: OnceLock<Vec<u8>> = OnceLock::new();
    H.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("map.log");
        let m = ContentMap::open(&path, BLOCK, Some(IDENTITY));
        m.sync();
        drop(m);
        std::fs::read(&path).expect("the log")
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("map.log");
    let mut file = header().to_vec();
    file.extend_from_slice(data);
    std::fs::write(&path, &file).expect("write");
    let m = ContentMap::open(&path, BLOCK, Some(IDENTITY));
    let n = m.len();
    // Every record the loader kept is at most one per index; reading them back is safe.
    assert!(n as u64 <= data.len() as u64);
    for i in 0..64 {
        let _ = m.get(i);
    }
    m.sync();
    drop(m);
    // What it left on disk loads again to the same map.
    let again = ContentMap::open(&path, BLOCK, Some(IDENTITY));
    assert_eq!(
        again.len(),
        n,
        "a log that loaded once loads the same again"
    );
});

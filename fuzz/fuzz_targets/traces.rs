//! The trace readers (`shadowcache-bench`'s `.vscsi` and `.lis` parsers) on any bytes: an
//! error or requests, never a panic; every request they return is well formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shadowcache_bench::trace;

fuzz_target!(|data: &[u8]| {
    for r in [
        trace::parse_vscsi(data),
        trace::parse_lis(std::io::Cursor::new(data)),
    ]
    .into_iter()
    .flatten()
    {
        for q in r {
            assert!(q.len > 0, "a request of no bytes: {q:?}");
            assert!(
                q.offset.checked_add(q.len).is_some(),
                "a range past 2^64: {q:?}"
            );
        }
    }
});

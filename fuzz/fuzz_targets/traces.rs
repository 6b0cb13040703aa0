//! The trace readers (`shadowcache-bench`'s `trace` module: every format, told from the content
//! or given, plain or compressed) on any bytes: records or an error naming the row, never a
//! panic; every record they return is well formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shadowcache_bench::trace::{self, Format, Options};

/// More records than this from one input (a decompression bomb) are not read.
const MAX_RECORDS: usize = 200_000;

fuzz_target!(|data: &[u8]| {
    let formats = std::iter::once(None).chain(Format::ALL.into_iter().map(Some));
    for format in formats {
        for skip_bad in [false, true] {
            let opts = Options {
                format,
                skip_bad,
                reorder_window: Some(if skip_bad { 3 } else { 0 }),
            };
            let Ok(mut r) =
                trace::from_reader("fuzz", Box::new(std::io::Cursor::new(data.to_vec())), &opts)
            else {
                continue;
            };
            if let Some(f) = format {
                assert_eq!(r.format(), f);
            }
            let mut n = 0;
            while let Some(rec) = r.next() {
                let Ok(rec) = rec else {
                    assert!(r.next().is_none(), "records after an error");
                    break;
                };
                assert!(rec.len > 0, "a record of no bytes: {rec:?}");
                assert!(
                    rec.offset.checked_add(rec.len).is_some(),
                    "a range past 2^64: {rec:?}"
                );
                assert!(
                    (rec.volume as usize) < r.volumes().len(),
                    "an unnamed volume: {rec:?}"
                );
                n += 1;
                if n >= MAX_RECORDS {
                    break;
                }
            }
            assert!(n >= MAX_RECORDS || r.stats().records as usize == n);
        }
    }
});

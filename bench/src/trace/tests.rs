use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/traces")
        .join(name)
}

/// A record as a test writes it: (time ns, volume name, op, offset, len).
type Want = (Option<u64>, &'static str, Op, u64, u64);

/// A record read, with its volume's name.
type Got = (Option<u64>, String, Op, u64, u64);

/// Reads a whole trace; returns its records with volume names, and the reader.
fn read_all(path: &Path, opts: &Options) -> (Vec<Got>, Reader) {
    let mut r = open(path, opts).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    let mut recs = Vec::new();
    for x in r.by_ref() {
        let x = x.unwrap_or_else(|e| panic!("{e:#}"));
        recs.push(x);
    }
    let names: Vec<String> = r.volumes().map(str::to_string).collect();
    let out = recs
        .into_iter()
        .map(|x| {
            (
                x.time_ns,
                names[x.volume as usize].clone(),
                x.op,
                x.offset,
                x.len,
            )
        })
        .collect();
    (out, r)
}

fn check(file: &str, format: Format, want: &[Want], ignored: u64) {
    let path = fixture(file);
    let head = std::fs::read(&path).expect("fixture");
    assert_eq!(detect(&head).expect("detect"), format, "{file}");
    for opts in [
        Options::default(),
        Options {
            format: Some(format),
            ..Options::default()
        },
    ] {
        let (got, r) = read_all(&path, &opts);
        let want: Vec<_> = want
            .iter()
            .map(|&(t, v, op, o, l)| (t, v.to_string(), op, o, l))
            .collect();
        assert_eq!(got, want, "{file}");
        assert_eq!(r.format(), format);
        assert_eq!(r.stats().records, want.len() as u64, "{file}");
        assert_eq!(r.stats().ignored, ignored, "{file}: ignored rows");
        assert_eq!(r.stats().skipped_bad, 0, "{file}");
    }
}

const R: Op = Op::Read;
const W: Op = Op::Write;

#[test]
fn msr_rows_carry_filetime_host_and_disk() {
    check(
        "msr.csv",
        Format::Msr,
        &[
            (Some(128166372003061629 * 100), "hm_1", R, 3654225920, 4096),
            (Some(128166372016382155 * 100), "hm_1", W, 3571101696, 8192),
            (Some(128166372026382245 * 100), "src1_0", R, 0, 512),
        ],
        0,
    );
}

#[test]
fn systor_rows_are_sorted_by_time_and_blank_types_ignored() {
    check(
        "systor.csv",
        Format::Systor,
        &[
            (Some(1_485_970_860_120_000_000), "1", R, 4096, 8192),
            (Some(1_485_970_860_121_622_000), "1", W, 7265468416, 4096),
            (Some(1_485_970_860_125_000_000), "2", R, 512, 512),
        ],
        1,
    );
}

#[test]
fn alibaba_rows_carry_microseconds_and_devices() {
    check(
        "alibaba.csv",
        Format::Alibaba,
        &[
            (Some(1577808000000125000), "0", R, 126703644672, 4096),
            (Some(1577808000000200000), "0", W, 126703648768, 8192),
            (Some(1577808000000300000), "3", R, 0, 4096),
        ],
        0,
    );
}

#[test]
fn tencent_rows_count_sectors() {
    check(
        "tencent.csv",
        Format::Tencent,
        &[
            (
                Some(1_538_323_200_000_000_000),
                "1283",
                R,
                12910952 * 512,
                8 * 512,
            ),
            (
                Some(1_538_323_200_000_000_000),
                "1283",
                W,
                2048 * 512,
                16 * 512,
            ),
            (Some(1_538_323_201_000_000_000), "7", R, 0, 512),
        ],
        0,
    );
}

#[test]
fn spc_rows_have_sector_addresses_and_byte_sizes() {
    check(
        "spc.csv",
        Format::Spc,
        &[
            (Some(0), "0", W, 303567 * 512, 3584),
            (Some(0), "1", R, 55590 * 512, 3072),
            (Some(26_214_000), "0", W, 303574 * 512, 3584),
        ],
        0,
    );
}

#[test]
fn blkparse_keeps_issued_reads_and_writes() {
    check(
        "blkparse.txt",
        Format::Blkparse,
        &[
            (Some(13_248), "8,0", W, 223490 * 512, 4096),
            (Some(1_000_000), "8,16", R, 1024 * 512, 256 * 512),
            (Some(4_000_000), "8,0", W, 77 * 512, 4096),
        ],
        // Q, G, C, a flush and a discard.
        5,
    );
}

#[test]
fn fio_v2_times_come_from_waits() {
    check(
        "fio-v2.iolog",
        Format::Fio,
        &[
            (Some(0), "/dev/nbd0", R, 0, 4096),
            (Some(2_000_000), "/dev/nbd0", W, 8192, 16384),
        ],
        // add, open, wait, trim, sync, close
        6,
    );
}

#[test]
fn fio_v3_lines_carry_microseconds() {
    check(
        "fio-v3.iolog",
        Format::Fio,
        &[
            (Some(322_000), "/tmp/fiot", R, 61440, 4096),
            (Some(477_000), "/tmp/fiot", W, 774144, 4096),
            (Some(900_000), "/tmp/other", R, 0, 65536),
        ],
        3,
    );
}

#[test]
fn arc_lis_and_lirs_lines_become_reads() {
    check(
        "arc.lis",
        Format::Lis,
        &[(None, "0", R, 5120, 4096), (None, "0", R, 1536, 512)],
        0,
    );
    check(
        "lirs.trace",
        Format::Lirs,
        &[
            (None, "0", R, 5 * 4096, 4096),
            (None, "0", R, 7 * 4096, 4096),
            (None, "0", R, 5 * 4096, 4096),
        ],
        0,
    );
}

/// A vscsiStats record of either version.
fn vscsi_record(version: u8, cmd: u16, len: u32, lbn: u64, ts: u64) -> Vec<u8> {
    let mut r = Vec::new();
    if version == 1 {
        r.extend_from_slice(&7u32.to_le_bytes());
        r.extend_from_slice(&len.to_le_bytes());
        r.extend_from_slice(&1u32.to_le_bytes());
        r.extend_from_slice(&cmd.to_le_bytes());
        r.extend_from_slice(&0x0100u16.to_le_bytes());
        r.extend_from_slice(&lbn.to_le_bytes());
        r.extend_from_slice(&ts.to_le_bytes());
    } else {
        r.extend_from_slice(&cmd.to_le_bytes());
        r.extend_from_slice(&0x0200u16.to_le_bytes());
        r.extend_from_slice(&7u32.to_le_bytes());
        r.extend_from_slice(&len.to_le_bytes());
        r.extend_from_slice(&1u32.to_le_bytes());
        r.extend_from_slice(&lbn.to_le_bytes());
        r.extend_from_slice(&ts.to_le_bytes());
        r.extend_from_slice(&55u64.to_le_bytes());
    }
    r
}

fn read_bytes(bytes: Vec<u8>, opts: &Options) -> (anyhow::Result<Vec<Record>>, Stats) {
    let mut r = match from_reader("mem", Box::new(std::io::Cursor::new(bytes)), opts) {
        Ok(r) => r,
        Err(e) => return (Err(e), Stats::default()),
    };
    let out = r.by_ref().collect::<anyhow::Result<Vec<_>>>();
    (out, r.stats().clone())
}

#[test]
fn vscsi_versions_one_and_two_are_told_apart_and_read() {
    for version in [1u8, 2] {
        let mut t = vscsi_record(version, 0x28, 4096, 10, 1_000);
        t.extend(vscsi_record(version, 0x2a, 8192, 20, 2_000));
        t.extend(vscsi_record(version, 0x35, 0, 0, 3_000)); // SYNCHRONIZE CACHE
        assert_eq!(detect(&t).expect("detect"), Format::Vscsi);
        let (recs, stats) = read_bytes(t.clone(), &Options::default());
        let recs = recs.expect("read");
        assert_eq!(
            recs,
            vec![
                Record {
                    time_ns: Some(1_000_000),
                    volume: 0,
                    op: R,
                    offset: 5120,
                    len: 4096
                },
                Record {
                    time_ns: Some(2_000_000),
                    volume: 0,
                    op: W,
                    offset: 10240,
                    len: 8192
                },
            ],
            "version {version}"
        );
        assert_eq!(stats.ignored, 1);
        // A cut-off last record is a bad row, named by its record number and byte.
        let cut = t[..t.len() - 3].to_vec();
        let e = read_bytes(cut, &Options::default()).0.expect_err("cut");
        assert!(
            e.to_string().contains("record 2 (byte") && e.to_string().contains("trailing"),
            "{e}"
        );
    }
    // A record of the other version inside a file is a bad row.
    let mut t = vscsi_record(1, 0x28, 4096, 10, 1);
    t.extend(vscsi_record(1, 0x28, 4096, 10, 1));
    t.extend(vscsi_record(1, 0x28, 4096, 10, 1));
    t[64 + 14..64 + 16].copy_from_slice(&0x0300u16.to_le_bytes());
    let e = read_bytes(t, &Options::default()).0.expect_err("version");
    assert!(e.to_string().contains("field `version`"), "{e}");
}

#[test]
fn the_shipped_vscsi_trace_reads_and_writes() {
    let (recs, r) = read_all(&shipped("cloudPhysicsIO.vscsi"), &Options::default());
    assert_eq!(r.format(), Format::Vscsi);
    let reads = recs.iter().filter(|r| r.2 == R).count();
    let writes = recs.iter().filter(|r| r.2 == W).count();
    // 113,872 requests, 41% of them reads (PROVENANCE.md).
    assert_eq!(reads + writes + r.stats().ignored as usize, 113_872);
    let share = reads as f64 / 113_872.0;
    assert!((0.40..0.42).contains(&share), "read share {share}");
    assert!(recs.iter().all(|r| r.0.is_some() && r.4 > 0));
    // Two hours of a disk of some 32 GiB.
    let times: Vec<u64> = recs.iter().filter_map(|r| r.0).collect();
    let span = (times.iter().max().unwrap_or(&0) - times.iter().min().unwrap_or(&0)) / 1_000_000;
    assert!((7_100_000..7_300_000).contains(&span), "{span} ms");
    let end = recs.iter().map(|r| r.3 + r.4).max().unwrap_or(0);
    assert!((16 << 30..=64 << 30).contains(&end), "highest byte {end}");
}

#[test]
fn the_shipped_arc_traces_read_whole() {
    for (name, n, first) in [
        ("P2.lis.zst", 666_176, None),
        ("P3.lis.zst", 238_578, None),
        ("P6.lis.zst", 519_711, Some((110765 * 512, 64 * 512))),
        ("OLTP.lis.zst", 914_145, None),
    ] {
        let r = open(&shipped(name), &Options::default()).expect("open");
        assert_eq!(r.format(), Format::Lis, "{name}");
        let mut count = 0u64;
        for x in r {
            let x = x.expect("record");
            if count == 0
                && let Some((o, l)) = first
            {
                assert_eq!((x.offset, x.len), (o, l), "{name}: first record");
            }
            assert_eq!((x.op, x.time_ns, x.volume), (R, None, 0), "{name}");
            assert!(x.len > 0 && x.len % 512 == 0, "{name}: {x:?}");
            if name == "OLTP.lis.zst" {
                assert_eq!(x.len, 512, "OLTP requests are of 512 B");
            }
            count += 1;
        }
        assert_eq!(count, n, "{name}");
    }
}

#[test]
fn the_shipped_lirs_traces_read_whole() {
    for (name, n) in [
        ("2_pools.trace.gz", 100_000),
        ("cpp.trace.gz", 9_047),
        ("cs.trace.gz", 6_781),
        // The file ends in a blank line, which holds no reference.
        ("gli.trace.gz", 6_015),
        ("multi1.trace.gz", 15_858),
        ("ps.trace.gz", 10_448),
        ("sprite.trace.gz", 133_996),
    ] {
        let (recs, r) = read_all(&shipped(&format!("lirs/{name}")), &Options::default());
        assert_eq!(r.format(), Format::Lirs, "{name}");
        assert_eq!(recs.len(), n, "{name}");
        assert!(
            recs.iter()
                .all(|x| x.2 == R && x.4 == LIRS_BLOCK && x.3 % LIRS_BLOCK == 0)
        );
    }
}

#[test]
fn a_bad_row_names_file_line_and_field_or_is_skipped_and_counted() {
    for (format, good, bad, field) in [
        (
            Format::Msr,
            "128166372003061629,hm,1,Read,0,4096,1",
            "128166372003061629,hm,1,Raed,0,4096,1",
            "type",
        ),
        (
            Format::Systor,
            "1485970860.1,0.1,R,1,0,4096",
            "1485970860.1,0.1,R,1,-5,4096",
            "offset",
        ),
        (Format::Alibaba, "0,R,0,4096,1", "0,R,0,4096", "timestamp"),
        (Format::Tencent, "1,0,8,0,1", "1,0,8,2,1", "iotype"),
        (Format::Spc, "0,1,512,r,0.5", "0,1,512,r,0.5e3", "timestamp"),
        (
            Format::Blkparse,
            "8,0 0 1 0.5 1 D R 8 + 8 [x]",
            "8,0 0 1 0.5 1 D R 8 - 8 [x]",
            "+",
        ),
        (Format::Lis, "1 1 0 0", "1 x 0 0", "nblocks"),
        (Format::Lirs, "12", "12a", "block"),
    ] {
        let text = format!("{good}\n{bad}\n{good}\n");
        let opts = Options {
            format: Some(format),
            ..Options::default()
        };
        let (got, _) = read_bytes(text.clone().into_bytes(), &opts);
        let e = got.expect_err(bad).to_string();
        assert!(
            e.contains("mem:line 2:") && e.contains(&format!("field `{field}`")),
            "{format}: {e}"
        );
        let (got, stats) = read_bytes(
            text.into_bytes(),
            &Options {
                skip_bad: true,
                ..opts
            },
        );
        assert_eq!(got.expect("skipped").len(), 2, "{format}");
        assert_eq!(stats.skipped_bad, 1, "{format}");
        assert!(
            stats
                .first_bad
                .as_deref()
                .is_some_and(|b| b.contains("line 2")),
            "{format}: {stats:?}"
        );
    }
    // fio: a bad action, and a file without its header.
    let (got, _) = read_bytes(
        b"fio version 3 iolog\n1 f read 0 1\n2 f explode 0 1\n".to_vec(),
        &Options::default(),
    );
    let e = got.expect_err("action").to_string();
    assert!(e.contains("line 3") && e.contains("field `action`"), "{e}");
    let (got, _) = read_bytes(
        b"f read 0 1\n".to_vec(),
        &Options {
            format: Some(Format::Fio),
            ..Options::default()
        },
    );
    assert!(
        got.expect_err("header")
            .to_string()
            .contains("field `header`")
    );
}

#[test]
fn ranges_past_64_bits_are_bad_rows_not_panics() {
    for (format, row) in [
        (Format::Lis, "18446744073709551615 1"),
        (Format::Lis, "36028797018963967 1"),
        (Format::Tencent, "1,36028797018963967,1,0,1"),
        (Format::Alibaba, "0,R,18446744073709551615,1,1"),
        (Format::Msr, "18446744073709551615,h,1,Read,0,1,1"),
        (Format::Lirs, "18446744073709551615"),
    ] {
        let (got, _) = read_bytes(
            row.as_bytes().to_vec(),
            &Options {
                format: Some(format),
                ..Options::default()
            },
        );
        let e = got.expect_err(row).to_string();
        assert!(e.contains("line 1"), "{format} {row}: {e}");
    }
    let t = vscsi_record(1, 0x28, 4096, u64::MAX / 512, 1);
    let e = read_bytes(t, &Options::default()).0.expect_err("vscsi");
    assert!(e.to_string().contains("out of range"), "{e}");
}

#[test]
fn a_line_longer_than_the_limit_is_a_bad_row_held_in_bounded_memory() {
    let mut t = vec![b'7'; 3 * MAX_LINE];
    t.extend_from_slice(b"\n10 8 0 1\n");
    let opts = Options {
        format: Some(Format::Lis),
        skip_bad: true,
        ..Options::default()
    };
    let (got, stats) = read_bytes(t, &opts);
    assert_eq!(got.expect("read").len(), 1);
    assert_eq!(stats.skipped_bad, 1);
    assert!(
        stats
            .first_bad
            .as_deref()
            .is_some_and(|b| b.contains("longer than")),
        "{stats:?}"
    );
    let mut buf = Vec::new();
    let mut r = std::io::Cursor::new(vec![b'x'; 1 << 20]);
    assert_eq!(
        read_line_bounded(&mut r, &mut buf, 100).expect("read"),
        Some(true)
    );
    assert_eq!(buf.len(), 100, "the buffer keeps only the limit");
    assert_eq!(
        read_line_bounded(&mut r, &mut buf, 100).expect("read"),
        None
    );
}

#[test]
fn the_reorder_window_sorts_what_it_holds_and_counts_what_it_cannot() {
    let rows = "5,0.1,R,1,0,1\n1,0.1,R,1,0,1\n3,0.1,R,1,0,1\n2,0.1,R,1,0,1\n";
    let times = |window| {
        let (got, stats) = read_bytes(
            rows.as_bytes().to_vec(),
            &Options {
                format: Some(Format::Systor),
                reorder_window: Some(window),
                ..Options::default()
            },
        );
        let t: Vec<u64> = got
            .expect("read")
            .iter()
            .map(|r| r.time_ns.unwrap_or(0) / 1_000_000_000)
            .collect();
        (t, stats.out_of_order)
    };
    assert_eq!(times(0), (vec![5, 1, 3, 2], 0), "no window: file order");
    assert_eq!(times(16), (vec![1, 2, 3, 5], 0), "a window over all");
    assert_eq!(times(2), (vec![1, 3, 2, 5], 1), "a window of 2");
}

#[test]
fn compressed_traces_read_as_plain_ones() {
    let plain = std::fs::read(fixture("msr.csv")).expect("fixture");
    let zst = zstd::encode_all(&plain[..], 3).expect("zstd");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let (want, _) = read_bytes(plain, &Options::default());
    let want = want.expect("plain");
    assert_eq!(want.len(), 3);
    for c in [zst, gz] {
        let (got, _) = read_bytes(c, &Options::default());
        assert_eq!(got.expect("compressed"), want);
    }
}

#[test]
fn content_that_is_no_trace_is_refused_with_a_reason() {
    for (bytes, why) in [
        (&b""[..], "empty"),
        (b"\n\n\n", "blank"),
        (b"a,b,c\n1,2,3\n", "no known layout"),
        (b"hello world\n", "no known format"),
        (&[0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9][..], "binary"),
    ] {
        let e = detect(bytes).expect_err(why);
        assert!(format!("{e:#}").contains(why), "{why}: {e:#}");
    }
    // An empty trace reads as no records when its format is given.
    for f in Format::ALL {
        let (got, _) = read_bytes(
            Vec::new(),
            &Options {
                format: Some(f),
                ..Options::default()
            },
        );
        assert_eq!(got.expect("empty").len(), 0, "{f}");
    }
}

#[test]
fn the_summary_adds_up_a_trace() {
    let s = summarize(&fixture("systor.csv"), &Options::default()).expect("summary");
    assert_eq!((s.reads, s.writes), (2, 1));
    assert_eq!((s.read_bytes, s.write_bytes), (8192 + 512, 4096));
    assert_eq!(s.volumes, 2);
    assert_eq!(s.highest_byte, 7265468416 + 4096);
    let span = s.span_seconds.expect("timed");
    assert!((span - 0.005).abs() < 1e-9, "{span}");
    assert_eq!(s.stats.ignored, 1);
    assert!(s.to_string().contains("2 reads"), "{s}");
}

/// The path of a tool the test needs; fails loudly when it is missing.
fn tool(name: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: this test needs it. Run ./scripts/test.sh, which \
                 installs {package} (apt-get install {package}), or install it by hand."
            )
        })
}

#[test]
fn an_iolog_written_by_fio_reads_back_every_io() {
    let fio = tool("fio", "fio");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("job.iolog");
    let status = std::process::Command::new(fio)
        .current_dir(dir.path())
        .args([
            "--name=t",
            "--filename=data",
            "--size=1M",
            "--bs=4k",
            "--rw=randrw",
            "--rwmixread=70",
            "--io_size=256k",
            "--ioengine=psync",
            "--randseed=7",
        ])
        .arg(format!("--write_iolog={}", log.display()))
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run fio");
    assert!(status.success(), "fio failed");
    let (recs, r) = read_all(&log, &Options::default());
    assert_eq!(r.format(), Format::Fio);
    // 256 KiB of 4 KiB I/Os.
    assert_eq!(recs.len(), 64, "{recs:?}");
    assert!(
        recs.iter()
            .all(|x| x.4 == 4096 && x.3 % 4096 == 0 && x.3 < 1 << 20)
    );
    let reads = recs.iter().filter(|x| x.2 == R).count();
    assert!((20..64).contains(&reads), "{reads} reads of 64 at 70%");
    let times: Vec<u64> = recs.iter().map(|x| x.0.expect("v3 is timed")).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
}

#[test]
fn a_trace_naming_too_many_volumes_or_a_huge_field_gets_a_short_clear_error() {
    let mut t = String::new();
    for v in 0..=MAX_VOLUMES {
        t.push_str(&format!("{v},R,0,4096,1\n"));
    }
    let (got, _) = read_bytes(t.into_bytes(), &Options::default());
    let e = got.expect_err("too many volumes").to_string();
    assert!(
        e.contains(&format!("line {}:", MAX_VOLUMES + 1)) && e.contains("field `volume`"),
        "{e}"
    );
    // A bad field of 60,000 bytes is named, not copied whole into the message.
    let row = format!("0,R,{},4096,1\n", "9x".repeat(30_000));
    let alibaba = Options {
        format: Some(Format::Alibaba),
        ..Options::default()
    };
    let (got, _) = read_bytes(row.into_bytes(), &alibaba);
    let e = got.expect_err("bad offset").to_string();
    assert!(
        e.contains("field `offset`") && e.len() < 1024,
        "{} bytes",
        e.len()
    );
}

//! The storm's workload, and a storm of nodes in this process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::workload::{BootShape, Workload};
use super::*;
use crate::trace::Op;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/traces")
        .join(name)
}

fn shape(read_bytes: u64) -> BootShape {
    BootShape {
        read_bytes,
        write_share: 0.05,
        iops: 200.0,
        seed: 7,
    }
}

#[test]
fn a_boot_is_the_traces_first_reads_with_writes_at_the_share_asked() {
    let w = Workload::boot(&fixture("P2-head.lis.zst"), None, 3, &shape(2 << 20))
        .expect("boot workload");
    assert_eq!(w.desktops.len(), 3);
    let read_bytes: u64 = w.reads.iter().map(|r| r.1 as u64).sum();
    assert!(
        (2 << 20..(2 << 20) + (1 << 20)).contains(&read_bytes),
        "the slice ends once a boot's bytes are read: {read_bytes}"
    );
    for d in &w.desktops {
        // Every read of the boot, once, in a desktop's own order.
        let mut reads: Vec<u32> = d
            .iter()
            .filter(|io| io.op == Op::Read)
            .map(|io| io.read)
            .collect();
        reads.sort_unstable();
        assert_eq!(reads, (0..w.reads.len() as u32).collect::<Vec<_>>());
        let written: u64 = d
            .iter()
            .filter(|io| io.op == Op::Write)
            .map(|io| io.len as u64)
            .sum();
        let share = written as f64 / read_bytes as f64;
        assert!((0.04..=0.05).contains(&share), "write share {share}");
        for io in d.iter().filter(|io| io.op == Op::Write) {
            assert!(
                io.offset + io.len as u64 <= w.delta_bytes,
                "writes stay in the delta disk"
            );
        }
        // Paced at 200 IOPS: I/O i is due at i / 200 s.
        assert_eq!(d[1].at_ns, 5_000_000);
    }
    assert_ne!(
        w.desktops[0], w.desktops[1],
        "desktops boot in slightly different orders"
    );
    for &(off, len) in &w.reads {
        assert!(
            off + len as u64 <= w.replica_bytes,
            "reads stay in the replica"
        );
    }
    let c = w.calibration();
    assert_eq!(c.reads as usize, w.reads.len());
    assert!((c.iops - 200.0).abs() < 1.0, "iops {}", c.iops);
    assert!((19.0..=25.0).contains(&c.read_write_bytes));
}

#[test]
fn the_replica_packs_the_touched_chunks_and_hashes_what_each_read_must_return() {
    let w = Workload::boot(&fixture("P2-head.lis.zst"), None, 1, &shape(1 << 20))
        .expect("boot workload");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("replica.raw");
    let hashes = w.write_replica(&image).expect("replica");
    assert_eq!(
        std::fs::metadata(&image).expect("image").len(),
        w.replica_bytes
    );
    // P2's first reads span 2.4 GiB of disk; the replica holds only the touched MiBs.
    assert!(w.replica_bytes < 256 << 20, "{}", w.replica_bytes);
    let bytes = std::fs::read(&image).expect("read image");
    for (&(off, len), h) in w.reads.iter().zip(&hashes) {
        assert_eq!(
            blake3::hash(&bytes[off as usize..off as usize + len as usize]),
            *h
        );
    }
    assert!(w.working_set(16 << 10) <= w.replica_bytes);
    assert!(w.working_set(16 << 10) >= 1 << 20);
}

#[test]
fn each_volume_of_a_trace_becomes_a_desktop_at_the_traces_times() {
    let w =
        Workload::volumes(&fixture("msr.csv"), None, 8, 100, 2.0, 100.0).expect("volumes workload");
    assert!(w.desktops.len() >= 2, "the fixture has several volumes");
    let ios: usize = w.desktops.iter().map(Vec::len).sum();
    assert!(ios >= 3);
    // Times relative to each desktop's first I/O, twice as fast.
    for d in &w.desktops {
        assert_eq!(d[0].at_ns, 0);
        assert!(d.windows(2).all(|p| p[0].at_ns <= p[1].at_ns));
    }
    assert!(
        w.desktops.iter().flatten().any(|io| io.op == Op::Write),
        "writes kept for the delta disks"
    );
}

#[test]
fn bad_workloads_are_refused_with_a_reason() {
    let p2 = fixture("P2-head.lis.zst");
    let e = Workload::boot(&p2, None, 0, &shape(1 << 20)).expect_err("no desktop");
    assert!(e.to_string().contains("at least one desktop"), "{e}");
    let mut s = shape(1 << 20);
    s.iops = 0.0;
    let e = Workload::boot(&p2, None, 1, &s).expect_err("zero iops");
    assert!(e.to_string().contains("--iops"), "{e}");
    let e = Workload::volumes(&p2, None, 1, 10, f64::NAN, 1.0).expect_err("NaN speed");
    assert!(e.to_string().contains("--speed"), "{e}");
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("writes.csv");
    std::fs::write(
        &empty,
        "128166372016382155,hm,1,Write,3571101696,8192,1358\n",
    )
    .expect("w");
    let e = Workload::boot(&empty, None, 1, &shape(1 << 20)).expect_err("no reads");
    assert!(e.to_string().contains("no reads"), "{e}");
}

/// The many-hosts mode: nodes in this process over the in-process membership and Peer
/// service, desktops calling their node: every read verified, block maps exchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_nodes_in_one_process_verifies_every_read() {
    let opts = Options {
        hosts: 4,
        desktops_per_host: 1,
        trace: fixture("P2-head.lis.zst"),
        format: None,
        boot: true,
        shape: shape(1 << 20),
        max_ios: 0,
        speed: 1.0,
        pace: Pace::Closed(4),
        transport: Transport::Nbd,
        login_window: Duration::from_millis(200),
        origin_limit: Default::default(),
        network: Network::default(),
        ram_cache: 64 << 20,
        ssd_cache: 0,
        owner_ram_cache: None,
        modes: vec![Mode::Sealed],
        alone: false,
        time_limit: Duration::from_secs(120),
        work_dir: None,
        quiet: true,
        in_process: true,
        warm_owner: true,
        dedicated_owner: false,
    };
    let r = run(opts).await.expect("storm");
    let m = &r.modes[0];
    assert_eq!(m.desktops, 4);
    assert_eq!(m.failed, 0, "{:?}", m.first_error);
    assert_eq!(m.wrong_reads, 0);
    assert!(m.reads > 0 && m.verified_reads == m.reads);
    assert!(m.owner_egress_bytes > 0, "members fetched from the owner");
    assert!(
        m.owner_egress_over_working_set < 3.0,
        "peer fetch: the owner does not send every block to every member ({})",
        m.owner_egress_over_working_set
    );
    assert!(
        m.hosts
            .iter()
            .skip(1)
            .all(|h| h.block_map_received_bytes > 0),
        "every member received block maps: {:?}",
        m.hosts
    );
}

//! Dedup on the wire, with real `shadowcache-node` processes on loopback: a member learns a
//! block's fingerprint from the owner's content map before it fetches a byte, so content it
//! already holds, under another disk or another generation, never crosses the network again.

mod common;

use std::time::Duration;

use common::{Member, Settings, client, counters, has_disk, member, until};
use shadowcache_client::{DiskMode, StatusResponse};
use shadowcache_testkit::{free_port, http_get, metric, random_image, write_file};

const BS: u64 = 16 << 10;

fn mode_at(s: &StatusResponse, disk: &str) -> Option<(DiskMode, u64)> {
    s.disks
        .iter()
        .find(|d| d.id == disk)
        .and_then(|d| DiskMode::try_from(d.mode).ok().map(|m| (m, d.generation)))
}

/// Bytes of the owner's content maps `port`'s node received.
fn map_bytes(port: u16) -> u64 {
    let body = http_get(port, "/metrics").expect("metrics");
    metric(&body, "shadowcache_owner_map_bytes_total").unwrap_or(0.0) as u64
}

/// Block bytes a member received from the owner and from other members, and map bytes.
async fn wire(m: &Member, metrics_port: u16) -> (u64, u64, u64) {
    let c = counters(m).await;
    (
        c.owner_read_bytes,
        c.peer_read_bytes,
        map_bytes(metrics_port),
    )
}

/// Block bytes member `m` sent to other members.
async fn served(m: &Member) -> u64 {
    client(m)
        .await
        .status()
        .await
        .expect("status")
        .leases
        .expect("leases")
        .peer_served_bytes
}

async fn read_whole(m: &Member, disk: &str, size: u64) -> Vec<u8> {
    let c = client(m).await;
    let d = c.disk(disk);
    let mut out = Vec::with_capacity(size as usize);
    let mut at = 0;
    while at < size {
        let n = (1u64 << 20).min(size - at);
        out.extend_from_slice(&d.read_at(at, n).await.expect("read"));
        at += n;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_disk_of_identical_content_is_served_from_the_members_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size: u64 = 16 << 20;
    let x = dir.path().join("x.raw");
    let mut data = random_image(&x, size as usize, 21);
    // Some zero blocks too: they never cross the network, for either disk.
    for i in (0..size / BS).step_by(7) {
        let at = (i * BS) as usize;
        data[at..at + BS as usize].fill(0);
    }
    write_file(&x, &data);
    let y = dir.path().join("y.raw");
    write_file(&y, &data);
    let a = member(
        dir.path(),
        "a",
        None,
        &[
            format!("--disk=x={},sealed", x.display()),
            format!("--disk=y={},sealed", y.display()),
        ],
    );
    let b_metrics = free_port();
    let b = member(
        dir.path(),
        "b",
        Some(&a.addr),
        &[
            format!("--metrics=127.0.0.1:{b_metrics}"),
            "--ram-cache=64MiB".into(),
        ],
    );
    for m in [&a, &b] {
        until(m, "two members and a's disks", |s| {
            s.members.len() == 2 && has_disk(s, "x", "a") && has_disk(s, "y", "a")
        })
        .await;
    }

    let got = read_whole(&b, "x", size).await;
    assert!(got == data, "x read wrong bytes at b");
    let (owner_x, peer_x, map_x) = wire(&b, b_metrics).await;
    let zero_blocks = (size / BS).div_ceil(7);
    assert_eq!(
        owner_x + peer_x,
        size - zero_blocks * BS,
        "b fetched x's data blocks once each, and no zero block"
    );
    assert!(map_x > 0, "b never asked a for x's content map");

    let served_before = served(&a).await;
    let got = read_whole(&b, "y", size).await;
    assert!(got == data, "y read wrong bytes at b");
    let (owner_y, peer_y, map_y) = wire(&b, b_metrics).await;
    let fetched = (owner_y + peer_y) - (owner_x + peer_x);
    let map = map_y - map_x;
    eprintln!(
        "identical second disk: {fetched} block bytes and {map} map bytes over the network for a {size}-byte disk ({:.3}%)",
        100.0 * (fetched + map) as f64 / size as f64
    );
    assert_eq!(fetched, 0, "b fetched blocks of y it held as blocks of x");
    assert!(
        map > 0 && map * 100 <= size,
        "y's content map cost {map} bytes, over 1% of the disk"
    );
    let served_after = served(&a).await;
    assert_eq!(
        served_after, served_before,
        "the owner sent block bytes for y"
    );
    let body = http_get(b_metrics, "/metrics").expect("metrics");
    let hit = metric(&body, "shadowcache_cache_hit_bytes_total{tier=\"ram\"}").unwrap_or(0.0)
        + metric(&body, "shadowcache_cache_hit_bytes_total{tier=\"ssd\"}").unwrap_or(0.0);
    assert!(
        hit as u64 >= size - zero_blocks * BS,
        "only {hit} bytes of y were cache hits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_rereads_only_the_changed_blocks_of_a_disk_detected_again_after_a_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size: u64 = 4 << 20;
    let path = dir.path().join("vdi.raw");
    let mut data = random_image(&path, size as usize, 31);
    let b_metrics = free_port();
    let settings = Settings {
        quiet_ms: 300,
        ..Settings::default()
    };
    let (a, b, c) = common::vdi_cluster(
        dir.path(),
        &path,
        settings,
        &[format!("--metrics=127.0.0.1:{b_metrics}")],
    )
    .await;
    let (ac, bc, cc) = (client(&a).await, client(&b).await, client(&c).await);

    // Reads at b and c until the disk is detected at a generation b serves.
    async fn detect(
        a: &Member,
        b: &Member,
        bc: &shadowcache_client::Client,
        cc: &shadowcache_client::Client,
        after: u64,
    ) -> u64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            for i in 0..3u64 {
                bc.disk("vdi")
                    .read_at(i * 4096, 4096)
                    .await
                    .expect("read at b");
                cc.disk("vdi")
                    .read_at(i * 4096, 4096)
                    .await
                    .expect("read at c");
            }
            let s = client(a).await.status().await.expect("status");
            if let Some((DiskMode::Detected, g)) = mode_at(&s, "vdi")
                && g > after
            {
                until(b, "b to see the detection", |s| {
                    mode_at(s, "vdi") == Some((DiskMode::Detected, g))
                })
                .await;
                return g;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "vdi was not detected past generation {after}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let g1 = detect(&a, &b, &bc, &cc, 0).await;
    let got = read_whole(&b, "vdi", size).await;
    assert!(got == data, "first whole read at b");
    let (o1, p1, m1) = wire(&b, b_metrics).await;
    assert!(
        o1 + p1 >= size - 3 * BS,
        "b did not fetch the disk: {o1} + {p1}"
    );

    // One write, inside one block: the owner revokes, applies, and detection starts over.
    let at = 5 * BS + 100;
    ac.disk("vdi")
        .write_at(at, b"changed".to_vec())
        .await
        .expect("write at a");
    data[at as usize..at as usize + 7].copy_from_slice(b"changed");
    let g2 = detect(&a, &b, &bc, &cc, g1).await;
    assert!(g2 > g1);

    let got = read_whole(&b, "vdi", size).await;
    assert!(
        got == data,
        "b's re-read after the write is not the written disk"
    );
    let (o2, p2, m2) = wire(&b, b_metrics).await;
    let fetched = (o2 + p2) - (o1 + p1);
    let map = m2 - m1;
    eprintln!(
        "re-read of a disk detected again after a one-block write: {fetched} block bytes and {map} map bytes"
    );
    assert!(
        fetched <= BS,
        "b fetched {fetched} bytes again, more than the one changed block"
    );
    assert!(
        map * 100 <= size,
        "the map cost {map} bytes, over 1% of the disk"
    );
}

//! Fault tests: real `shadowcache-node` processes with fail points switched on through the
//! `FAILPOINTS` environment variable. The node must be built with `--features failpoints`
//! (`scripts/test.sh` does); without it these tests fail and say so.

mod common;

use common::{client, counters, has_disk, member, member_with_env, needs_failpoints, until};
use shadowcache_testkit::random_image;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_never_gets_its_bytes_to_a_reader() {
    needs_failpoints();
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let size: u64 = 2 << 20;
    let data = random_image(&base, size as usize, 8);
    let a = member(
        dir.path(),
        "a",
        None,
        &[format!("--disk=base={},sealed", base.display())],
    );
    let liar = member_with_env(
        dir.path(),
        "b",
        Some(&a.addr),
        &[],
        &[("FAILPOINTS", "peer-serve-corrupt=return")],
    );
    let metrics_port = shadowcache_testkit::free_port();
    let c = member(
        dir.path(),
        "c",
        Some(&a.addr),
        &[format!("--metrics=127.0.0.1:{metrics_port}")],
    );
    for m in [&a, &liar, &c] {
        until(m, "three members and the disk", |s| {
            s.members.len() == 3 && has_disk(s, "base", "a")
        })
        .await;
    }
    // The liar holds every block first, so that it is asked for those it is home of.
    let lc = client(&liar).await;
    assert!(lc.disk("base").read_at(0, size).await.expect("liar reads")[..] == data[..]);
    let cc = client(&c).await;
    for _ in 0..2 {
        let got = cc.disk("base").read_at(0, size).await.expect("read at c");
        assert!(got[..] == data[..], "a lying peer's bytes reached a reader");
    }
    let cnt = counters(&c).await;
    assert_eq!(
        cnt.peer_reads, 0,
        "a block from the liar was accepted: {cnt:?}"
    );
    assert_eq!(
        cnt.owner_read_bytes, size,
        "every block came from the owner instead"
    );
    // And c did ask the liar, and caught it every time.
    let body = shadowcache_testkit::http_get(metrics_port, "/metrics").expect("metrics");
    let caught = shadowcache_testkit::metric(
        &body,
        "shadowcache_peer_fetch_failures_total{reason=\"bad_bytes\"}",
    )
    .unwrap_or(0.0);
    assert!(
        caught >= 16.0,
        "the liar was asked for {caught} blocks only:\n{body}"
    );
}

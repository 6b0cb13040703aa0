//! Attacks on real `shadowcache-node` processes, one test per item of the hardening issue
//! (issue 16), each feeding the attack and asserting the defence. Bounded in time: every wait
//! has a deadline.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Settings, client, config_flag, member, member_on, member_with_env, until};
use shadowcache_testkit::{binary, free_peer_port, write_file};

/// Fails loudly when the node binary cannot honour fail points.
fn needs_failpoints() {
    #[cfg(not(feature = "failpoints"))]
    panic!(
        "this test needs the node built with fail points: run ./scripts/test.sh, or \
         cargo test -p shadowcache-node --features failpoints"
    );
}

/// Item 1: a second live process with a member's node id (a cloned host) does not join; the
/// operator reads why. A restart after a crash, whose old incarnation gossip still lists as
/// alive, is not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_live_process_with_a_members_id_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = member(dir.path(), "a", None, &[]);
    let b_port = free_peer_port();
    let mut b = member_on(dir.path(), "b", b_port, Some(&a.addr), &[], &[]);
    until(&a, "b to join", |s| s.members.iter().any(|m| m.id == "b")).await;
    let b1_boot = client(&b)
        .await
        .status()
        .await
        .expect("status")
        .members
        .iter()
        .find(|m| m.id == "b")
        .expect("b sees itself")
        .boot;

    let b2_dir = dir.path().join("b2");
    std::fs::create_dir_all(&b2_dir).expect("b2 dir");
    let mut b2 = Command::new(binary("shadowcache-node"))
        .arg("--data-dir")
        .arg(&b2_dir)
        .args([
            "--node-id=b".to_string(),
            format!("--peer-listen=127.0.0.1:{}", free_peer_port()),
            format!("--seed={}", a.addr),
            config_flag(dir.path(), Settings::default()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn b2");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = b2.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = b2.kill();
            panic!("a second process with node id b was still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut b2.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(!status.success(), "b2 exited with {status}");
    assert!(
        err.contains("already used by a live process") && err.contains(&b_port.to_string()),
        "b2's message does not say who holds the id: {err}"
    );
    // The cluster still has the first b, and only it.
    let s = client(&a).await.status().await.expect("status");
    let bs: Vec<u64> = s
        .members
        .iter()
        .filter(|m| m.id == "b")
        .map(|m| m.boot)
        .collect();
    assert_eq!(bs, vec![b1_boot], "membership after b2 was refused");

    // b crashes and starts again at once on its data directory and port: gossip still lists
    // the dead incarnation, which does not answer, so the restart goes on.
    b.process.kill();
    let b = member_on(dir.path(), "b", b_port, Some(&a.addr), &[], &[]);
    until(&a, "b's new incarnation to join", |s| {
        s.members.iter().any(|m| m.id == "b" && m.boot != b1_boot)
    })
    .await;
    drop(b);
}

/// Item 2: a client gives up on a write whose origin stalls, writes the same range again and
/// is acknowledged; the stalled write must not land over the acknowledged one afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_given_up_on_never_lands_over_a_later_acknowledged_one() {
    needs_failpoints();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("rw.raw");
    write_file(&image, &vec![0u8; 1 << 20]);
    let stall_ms = 3_000;
    let a = member_with_env(
        dir.path(),
        "a",
        None,
        &[format!("--disk=rw={},mutable", image.display())],
        &[(
            "FAILPOINTS",
            &format!("origin-write-stall=1*return({stall_ms})"),
        )],
    );
    let c = client(&a).await;
    let d = c.disk("rw");
    let started = Instant::now();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        d.write_at(4096, vec![1u8; 8192]),
    )
    .await;
    assert!(gave_up.is_err(), "the stalled write returned: {gave_up:?}");
    // The retry overlaps the stalled write; it is acknowledged once the first has finished.
    d.write_at(0, vec![2u8; 16384]).await.expect("the retry");
    let acked = started.elapsed();
    // Whatever the stalled write still does, it has done it well before this.
    let settle = Duration::from_millis(stall_ms + 1_000).saturating_sub(started.elapsed());
    tokio::time::sleep(settle).await;
    let got = d.read_at(0, 16384).await.expect("read");
    assert!(
        got.iter().all(|&b| b == 2),
        "the write given up on landed over the retry acknowledged after {acked:?}"
    );
    let file = std::fs::read(&image).expect("image");
    assert!(
        file[..16384].iter().all(|&b| b == 2),
        "the origin file holds the stalled write"
    );
    assert!(
        acked >= Duration::from_millis(stall_ms / 2),
        "the retry was acknowledged after {acked:?}, before the stalled write finished"
    );
}

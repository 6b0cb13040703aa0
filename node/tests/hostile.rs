//! Attacks on real `shadowcache-node` processes, one test per item of the hardening issue
//! (issue 16), each feeding the attack and asserting the defence. Bounded in time: every wait
//! has a deadline.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Settings, client, config_flag, member, member_on, until};
use shadowcache_testkit::{binary, free_peer_port};

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

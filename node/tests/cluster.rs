//! Several real `shadowcache-node` processes on loopback, joined by gossip: every disk is
//! usable from every node, reads and writes reach the owner, and a killed member's disks go.

mod common;

use std::time::{Duration, Instant};

use common::{Member, client, code, counters, has_disk, member, until};
use rand::{Rng, SeedableRng};
use shadowcache_client::{ClientError, DiskMode};
use shadowcache_testkit::random_image;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_disk_is_usable_from_every_member_and_a_killed_member_takes_its_disks_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let rw = dir.path().join("rw.raw");
    let base_data = random_image(&base, 3 << 20, 1);
    random_image(&rw, 1 << 20, 2);
    let a = member(
        dir.path(),
        "a",
        None,
        &[
            format!("--disk=base={},sealed", base.display()),
            format!("--disk=rw={},mutable", rw.display()),
        ],
    );
    let b = member(dir.path(), "b", Some(&a.addr), &[]);
    let c = member(dir.path(), "c", Some(&a.addr), &[]);
    for m in [&a, &b, &c] {
        until(m, "three members and a's disks", |s| {
            s.members.len() == 3 && has_disk(s, "base", "a") && has_disk(s, "rw", "a")
        })
        .await;
    }

    // Reads of a's sealed disk at c are a's bytes.
    let cc = client(&c).await;
    let disk = cc.disk("base");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for _ in 0..200 {
        let off = rng.random_range(0..(3u64 << 20));
        let len = rng.random_range(0..200_000u64).min((3 << 20) - off);
        let got = disk.read_at(off, len).await.expect("read at c");
        assert!(
            got[..] == base_data[off as usize..(off + len) as usize],
            "{off}+{len}"
        );
    }
    // c caches a's sealed disk: a second whole pass costs a nothing.
    let whole = disk.read_at(0, 3 << 20).await.expect("whole disk at c");
    assert!(whole[..] == base_data[..]);
    let before = cc
        .status()
        .await
        .expect("status")
        .counters
        .expect("counters");
    assert!(
        before.owner_reads > 0 && before.origin_reads == 0,
        "{before:?}"
    );
    let again = disk.read_at(0, 3 << 20).await.expect("again");
    assert!(again[..] == base_data[..]);
    let after = cc
        .status()
        .await
        .expect("status")
        .counters
        .expect("counters");
    assert_eq!(
        after.owner_reads, before.owner_reads,
        "the second pass went to the owner"
    );
    assert!(after.lookups - after.misses > before.lookups - before.misses);
    assert_eq!(code(disk.read_at(3 << 20, 1).await), Code::OutOfRange);
    assert_eq!(code(cc.disk("nope").read_at(0, 1).await), Code::NotFound);
    match cc.disk("base").write_at(0, vec![1u8]).await {
        Err(ClientError::Status(s)) => {
            assert_eq!(s.code(), Code::FailedPrecondition);
            assert!(s.message().contains("disk is sealed"), "{}", s.message());
        }
        other => panic!("write to a sealed disk through c: {other:?}"),
    }

    // A write at b lands at a's origin and is read back at c.
    let bc = client(&b).await;
    bc.disk("rw")
        .write_at(4097, b"written at b".to_vec())
        .await
        .expect("write at b");
    bc.disk("rw").flush().await.expect("flush at b");
    assert_eq!(
        &cc.disk("rw").read_at(4097, 12).await.expect("read at c")[..],
        b"written at b"
    );
    assert_eq!(
        &std::fs::read(&rw).expect("origin")[4097..4109],
        b"written at b"
    );

    // A disk registered at b becomes visible everywhere; its id cannot be taken again elsewhere.
    let bdisk = dir.path().join("bdisk.raw");
    random_image(&bdisk, 64 << 10, 4);
    bc.register_disk("bdisk", &bdisk.display().to_string(), DiskMode::Sealed)
        .await
        .expect("register at b");
    for m in [&a, &c] {
        until(m, "b's new disk", |s| has_disk(s, "bdisk", "b")).await;
    }
    let other = dir.path().join("other.raw");
    random_image(&other, 4096, 5);
    assert_eq!(
        code(
            cc.register_disk("bdisk", &other.display().to_string(), DiskMode::Sealed)
                .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code(cc.set_disk_mode("rw", DiskMode::Sealed).await),
        Code::InvalidArgument
    );

    // a dies without a word: b and c drop it, and its disks, within the failure detector's bound.
    let mut a = a;
    let killed = Instant::now();
    a.process.kill();
    for m in [&b, &c] {
        until(m, "a to be declared dead", |s| {
            s.members.len() == 2 && !has_disk(s, "base", "a") && !has_disk(s, "rw", "a")
        })
        .await;
    }
    let detect = killed.elapsed();
    eprintln!("a killed member was dropped by the others after {detect:?}");
    assert!(
        detect < Duration::from_secs(20),
        "detection took {detect:?}"
    );
    // Its disks are unavailable, and the error says that their owner left.
    match cc.disk("base").read_at(0, 1).await {
        Err(ClientError::Status(s)) => {
            assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
            assert!(
                s.message().contains("owner a") && s.message().contains("left the cluster"),
                "{}",
                s.message()
            );
        }
        other => panic!("a read of a dead member's disk: {other:?}"),
    }
    // What b owns is still served at c.
    assert_eq!(
        cc.disk("bdisk")
            .read_at(0, 10)
            .await
            .expect("bdisk at c")
            .len(),
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_boot_storm_each_block_leaves_the_owner_about_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let size: u64 = 4 << 20;
    let data = random_image(&base, size as usize, 7);
    let a = member(
        dir.path(),
        "a",
        None,
        &[format!("--disk=base={},sealed", base.display())],
    );
    let readers: Vec<Member> = ["b", "c", "d"]
        .iter()
        .map(|id| member(dir.path(), id, Some(&a.addr), &[]))
        .collect();
    for m in std::iter::once(&a).chain(&readers) {
        until(m, "four members and the disk", |s| {
            s.members.len() == 4 && has_disk(s, "base", "a")
        })
        .await;
    }
    // Every reader reads the whole disk at the same moment, 64 KiB at a time, 4 streams each.
    let mut tasks = Vec::new();
    for m in &readers {
        let c = client(m).await;
        for stream in 0..4u64 {
            let disk = c.disk("base");
            let data = data.clone();
            tasks.push(tokio::spawn(async move {
                let mut at = stream * (64 << 10);
                while at < size {
                    let got = disk.read_at(at, 64 << 10).await.expect("read");
                    assert!(
                        got[..] == data[at as usize..at as usize + (64 << 10)],
                        "bytes differ at {at}"
                    );
                    at += 4 * (64 << 10);
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("reader");
    }
    let mut owner_bytes = 0;
    let mut peer_bytes = 0;
    for m in &readers {
        let c = counters(m).await;
        owner_bytes += c.owner_read_bytes;
        peer_bytes += c.peer_read_bytes;
    }
    let egress = owner_bytes as f64 / size as f64;
    eprintln!(
        "owner egress / disk size = {egress:.3} (peers served {:.3} of it)",
        peer_bytes as f64 / size as f64
    );
    // Every reader got every block; a rare single-flight race may fetch one twice.
    let got = owner_bytes + peer_bytes;
    assert!(
        got >= 3 * size && got as f64 <= 3.05 * size as f64,
        "readers fetched {got} bytes"
    );
    assert!(
        egress <= 1.05,
        "blocks left the owner {egress:.3} times on average"
    );
    assert!(peer_bytes >= size, "peers served too little: {peer_bytes}");
}

/// Reads disk `base` whole at `m` (checking it against `data`) until `m` has fetched blocks
/// from the owner: until `m` has built its shadow of the disk, its reads are forwarded to the
/// owner whole; once it has, blocks come from the owner into its cache.
async fn read_until_fetched_from_the_owner(m: &Member, data: &[u8], never: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = client(m)
            .await
            .disk("base")
            .read_at(0, data.len() as u64)
            .await
            .expect("read");
        assert!(got[..] == data[..]);
        if counters(m).await.owner_read_bytes > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{never}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A config file for member `name` with mutual TLS from `pki` (phi 14, detection off).
fn tls_config(dir: &std::path::Path, pki: &shadowcache_testkit::TestPki, name: &str) -> String {
    let path = dir.join(format!("{name}-tls.toml"));
    let text = format!(
        "[cluster]\nphi_threshold = 14\ngossip_interval_ms = 250\nrpc_timeout_ms = 2000\n\n{}\n\
         [detection]\nenabled = false\n",
        pki.cluster_tls_section(name)
    );
    shadowcache_testkit::write_file(&path, text.as_bytes());
    format!("--config={}", path.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_only_members_with_the_clusters_certificates_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let size: u64 = 1 << 20;
    let data = random_image(&base, size as usize, 21);
    let pki = shadowcache_testkit::TestPki::new(&dir.path().join("pki"));
    let rogue_pki = shadowcache_testkit::TestPki::new(&dir.path().join("rogue-pki"));
    let a = member(
        dir.path(),
        "a",
        None,
        &[
            format!("--disk=base={},sealed", base.display()),
            tls_config(dir.path(), &pki, "a"),
        ],
    );
    let b = member(
        dir.path(),
        "b",
        Some(&a.addr),
        &[tls_config(dir.path(), &pki, "b")],
    );
    // Same gossip, certificates from another CA.
    let rogue = member(
        dir.path(),
        "rogue",
        Some(&a.addr),
        &[tls_config(dir.path(), &rogue_pki, "rogue")],
    );
    until(&b, "a's disk at b over TLS", |s| {
        s.members.len() == 2 && has_disk(s, "base", "a")
    })
    .await;
    // Until b has built its shadow of the disk, its reads are forwarded to the owner whole
    // (also over the Peer channel); once it has, blocks come from the owner into b's cache.
    // Either way every byte crossed mutual TLS; read until the cached route shows.
    read_until_fetched_from_the_owner(&b, &data, "b never read a block from the owner over TLS")
        .await;
    // The rogue's gossip is signed under a certificate of another CA: it never joins, so it
    // learns nothing and reads nothing, and the members never list it.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let s = client(&rogue).await.status().await.expect("status");
    assert_eq!(s.members.len(), 1, "the rogue joined: {:?}", s.members);
    let at_b = client(&b).await.status().await.expect("status");
    assert!(
        at_b.members.iter().all(|m| m.id != "rogue"),
        "the rogue is listed: {:?}",
        at_b.members
    );
    assert!(
        !has_disk(&s, "base", "a"),
        "a member without the cluster's certificate learned a's disks: {:?}",
        s.disks
    );
    assert_eq!(
        code(client(&rogue).await.disk("base").read_at(0, 1).await),
        Code::NotFound
    );
    // A caller that trusts the CA but shows no certificate of its own is refused.
    let anonymous = tonic::transport::Endpoint::from_shared(format!("https://{}", a.addr))
        .expect("endpoint")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(
                    std::fs::read(&pki.ca).expect("ca"),
                ))
                .domain_name("shadowcache"),
        )
        .expect("tls config");
    if let Ok(channel) = anonymous.connect().await {
        let mut p = shadowcache_proto::peer_client::PeerClient::new(channel);
        assert!(
            p.owned_disks(shadowcache_proto::OwnedDisksRequest {})
                .await
                .is_err(),
            "the Peer service answered a caller without a client certificate"
        );
    }
    // A plain-text caller gets no answer from the Peer service.
    let plain =
        shadowcache_proto::peer_client::PeerClient::connect(format!("http://{}", a.addr)).await;
    if let Ok(mut p) = plain {
        assert!(
            p.owned_disks(shadowcache_proto::OwnedDisksRequest {})
                .await
                .is_err(),
            "the Peer service answered a caller without a certificate"
        );
    }
}

/// Issue 19, item 4: a CA, a cluster key and members' certificates made by `shadowcache
/// certs` (the library behind it) make a working cluster with sealed gossip and Peer calls
/// and mutual TLS, and each member's status shows its certificate's expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_on_the_ca_key_and_certificates_that_shadowcache_certs_makes() {
    use shadowcache_client::certs;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let size: u64 = 1 << 20;
    let data = random_image(&base, size as usize, 23);
    let pki = dir.path().join("pki");
    let ca = certs::init(&pki, "test", 30).expect("certs init");
    let config = |name: &str| {
        let m = certs::issue(&pki, name, &["127.0.0.1".into()], &pki, 20, "member")
            .expect("certs issue");
        let path = dir.path().join(format!("{name}.toml"));
        let text = format!(
            "[cluster]\nphi_threshold = 14\ngossip_interval_ms = 250\nsecret_file = {:?}\n\n\
             [cluster.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\n[detection]\nenabled = false\n",
            ca.cluster_key.display().to_string(),
            ca.ca_cert.display().to_string(),
            m.cert.display().to_string(),
            m.key.display().to_string()
        );
        shadowcache_testkit::write_file(&path, text.as_bytes());
        format!("--config={}", path.display())
    };
    let a = member(
        dir.path(),
        "a",
        None,
        &[
            format!("--disk=base={},sealed", base.display()),
            config("a"),
        ],
    );
    let b = member(dir.path(), "b", Some(&a.addr), &[config("b")]);
    until(&b, "a's disk at b", |s| {
        s.members.len() == 2 && has_disk(s, "base", "a")
    })
    .await;
    read_until_fetched_from_the_owner(&b, &data, "b never fetched from a").await;
    let s = client(&b).await.status().await.expect("status");
    assert_eq!(s.certificates.len(), 1, "{:?}", s.certificates);
    let c = &s.certificates[0];
    assert_eq!(c.role, "cluster");
    assert!(c.subject.contains("CN=b"), "{}", c.subject);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let days = (c.not_after_unix - now) / 86_400;
    assert!((19..=20).contains(&days), "expires in {days} days");
}

/// Issue 19, item 3: a seed given by name (as a Kubernetes headless Service names the
/// members) is resolved, and the member joins through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_through_a_seed_given_by_host_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let data = random_image(&base, 1 << 20, 29);
    let a = member(
        dir.path(),
        "a",
        None,
        &[format!("--disk=base={},sealed", base.display())],
    );
    let port = a.addr.rsplit_once(':').expect("port").1;
    let b = member(dir.path(), "b", Some(&format!("localhost:{port}")), &[]);
    until(&b, "a's disk at b, joined through localhost", |s| {
        s.members.len() == 2 && has_disk(s, "base", "a")
    })
    .await;
    let got = client(&b)
        .await
        .disk("base")
        .read_at(0, 4096)
        .await
        .expect("read at b");
    assert_eq!(&got[..], &data[..4096]);
}

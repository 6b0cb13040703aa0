//! A broken configuration stops `shadowcache-node` at start, with a message naming the key.

use std::process::Command;

use shadowcache_testkit::binary;

/// Runs the node with `args` until it exits; one still running after 30 s (it started, where
/// the test expected a refusal) is killed, and reads as exit code -1.
fn start(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(binary("shadowcache-node"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run shadowcache-node");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code().unwrap_or(-1);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break -1;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    (code, err)
}

#[test]
fn bad_flags_and_files_name_the_key_and_stop_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--block-size".into(), "3000".into()],
            "cache.block_size",
        ),
        (
            vec!["--block-size".into(), "2MiB".into()],
            "cache.block_size",
        ),
        (vec!["--ram-cache".into(), "lots".into()], "--ram-cache"),
        (vec!["--disk".into(), "noequals".into()], "--disk"),
        (vec!["--disk".into(), "a b=/x".into()], "disk[0].id"),
    ];
    for (args, key) in cases {
        let mut all = vec!["--data-dir".to_string(), d.clone()];
        all.extend(args.clone());
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let (code, err) = start(&refs);
        assert_ne!(code, 0, "{args:?} was accepted");
        assert!(err.contains(key), "{args:?}: {err}");
    }
    let files = [
        ("[cache]\nrma = \"1GiB\"\n", "rma"),
        ("listen_tcp = 17\n", "listen_tcp"),
        (
            "[cache]\nsingle_touch_share = 2.0\n",
            "cache.single_touch_share",
        ),
        (
            "[cache]\nsingle_touch_share = 0.25\nsingle_touch_min = 0.5\n",
            "cache.single_touch_min",
        ),
        ("[cache]\nghost_ratio = -1.0\n", "cache.ghost_ratio"),
        ("[cache]\nadaptive_split = \"yes\"\n", "adaptive_split"),
        ("[[disk]]\nid = \"x\"\n", "origin"),
        ("not toml at all [", "TOML"),
    ];
    for (text, key) in files {
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).expect("write config");
        let (code, err) = start(&["--config", &path.display().to_string(), "--data-dir", &d]);
        assert_eq!(code, 2, "{text:?} was accepted: {err}");
        assert!(err.contains(key), "{text:?}: {err}");
    }
    let (code, err) = start(&["--config", "/no/such/node.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/no/such/node.toml"), "{err}");
}

#[test]
fn a_disk_whose_origin_is_missing_stops_the_start_with_its_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, err) = start(&[
        "--data-dir",
        &dir.path().display().to_string(),
        "--disk",
        "base=/no/such/image.raw,sealed",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("\"base\"") && err.contains("/no/such/image.raw"),
        "{err}"
    );
}

#[test]
fn a_corrupt_saved_disk_list_stops_the_start_and_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("disks.toml"), "[[disk]]\nid = 3\n").expect("write");
    let (code, err) = start(&["--data-dir", &dir.path().display().to_string()]);
    assert_ne!(
        code, 0,
        "a node must not start without knowing which disks were sealed"
    );
    assert!(err.contains("disks.toml"), "{err}");
}

#[test]
fn a_data_dir_that_cannot_be_created_is_named() {
    let (code, err) = start(&["--data-dir", "/proc/no-such-dir/x"]);
    assert_ne!(code, 0);
    assert!(err.contains("/proc/no-such-dir/x"), "{err}");
}

#[test]
fn a_second_node_on_a_data_dir_in_use_is_refused_before_it_joins_the_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = shadowcache_testkit::free_peer_port();
    let listen = format!("--peer-listen=127.0.0.1:{port}");
    let first = shadowcache_testkit::NodeProcess::start(
        &dir.path().join("d"),
        &["--node-id=first".into(), listen.clone()],
    );
    // Same data directory and the same gossip port: the data directory is what it is told
    // about, not the port (it never got as far as joining).
    let d = first.data_dir.display().to_string();
    let (code, err) = start(&["--data-dir", &d, "--node-id=second", &listen]);
    assert_ne!(code, 0);
    assert!(
        err.contains("is in use by another shadowcache-node"),
        "{err}"
    );
    drop(first);
}

/// Issue 19, item 7: `--check-config` says what a configuration amounts to and exits 0 when
/// the node would start; it names each problem with the files it names (an origin it cannot
/// read, a cluster key too short, an expired certificate) and exits 2; it starts nothing and
/// creates no data directory.
#[test]
fn check_config_reports_what_would_run_and_each_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let data = d.join("data");
    let image = d.join("base.raw");
    std::fs::write(&image, vec![1u8; 1 << 16]).expect("image");
    let pki = d.join("pki");
    let ca = shadowcache_client::certs::init(&pki, "t", 30).expect("init");
    let m = shadowcache_client::certs::issue(&pki, "n1", &[], &pki, 10, "member").expect("issue");
    let config = d.join("node.toml");
    let good = format!(
        "node_id = \"n1\"\n[cluster]\npeer_listen = \"127.0.0.1:7999\"\nsecret_file = {:?}\n\
         [cluster.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        ca.cluster_key.display().to_string(),
        ca.ca_cert.display().to_string(),
        m.cert.display().to_string(),
        m.key.display().to_string()
    );
    std::fs::write(&config, &good).expect("config");
    let run = |extra: &[String]| {
        let mut args = vec![
            "--check-config".to_string(),
            format!("--config={}", config.display()),
            format!("--data-dir={}", data.display()),
        ];
        args.extend_from_slice(extra);
        let out = Command::new(binary("shadowcache-node"))
            .args(&args)
            .output()
            .expect("run shadowcache-node");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&[format!("--disk=base={},sealed", image.display())]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("configuration OK"), "{out}");
    assert!(out.contains("cluster key and mutual TLS"), "{out}");
    assert!(
        out.contains("certificate  cluster") && out.contains("CN=n1"),
        "{out}"
    );
    assert!(
        out.contains(&format!("disk         base = {} (sealed)", image.display())),
        "{out}"
    );
    assert!(!data.exists(), "--check-config created the data directory");
    // An origin on another NBD server is reached at start, not opened as a file here.
    let (code, out, err) = run(&["--disk=far=nbd+unix:///far?socket=/nonexistent.sock".into()]);
    assert_eq!(code, 0, "{out}\n{err}");

    // An origin that cannot be read and a cluster key that is too short.
    std::fs::write(&ca.cluster_key, "short\n").expect("key");
    let (code, out, err) = run(&[format!("--disk=gone={}", d.join("missing.raw").display())]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("origin") || err.contains("missing.raw"),
        "{err}"
    );
    let (code, _, err) = run(&[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cluster.secret_file") && err.contains("at least 16"),
        "{err}"
    );

    // A member's certificate issued for another node id, and a client's as a member's: the
    // configuration names them in place of n1's, and --check-config refuses each.
    std::fs::write(&ca.cluster_key, "0123456789abcdef0123456789abcdef\n").expect("key");
    let config_naming = |name: &str, role: &str| {
        let f = shadowcache_client::certs::issue(&pki, name, &[], &pki, 10, role).expect("issue");
        let text = good
            .replace(&m.cert.display().to_string(), &f.cert.display().to_string())
            .replace(&m.key.display().to_string(), &f.key.display().to_string());
        std::fs::write(&config, text).expect("config");
    };
    config_naming("n2", "member");
    let (code, _, err) = run(&[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("speaks for node [\"n2\"] only") && err.contains("\"n1\""),
        "{err}"
    );
    config_naming("app", "client");
    let (code, _, err) = run(&[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("is not a member's certificate (its role is client)"),
        "{err}"
    );
    // `require_roles`: a member's certificate still starts; one issued before roles (it names
    // none) starts without it, and is refused with it (other members would refuse it too).
    std::fs::write(&config, format!("{good}require_roles = true\n")).expect("config");
    let (code, out, err) = run(&[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let old = shadowcache_testkit::TestPki::new(&d.join("old-pki"));
    let (cert, key) = old.member("n1", "shadowcache");
    let legacy = good
        .replace(
            &ca.ca_cert.display().to_string(),
            &old.ca.display().to_string(),
        )
        .replace(&m.cert.display().to_string(), &cert.display().to_string())
        .replace(&m.key.display().to_string(), &key.display().to_string());
    std::fs::write(&config, &legacy).expect("config");
    let (code, out, err) = run(&[]);
    assert_eq!(code, 0, "{out}\n{err}");
    std::fs::write(&config, format!("{legacy}require_roles = true\n")).expect("config");
    let (code, _, err) = run(&[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("is not a member's certificate") && err.contains("require_roles"),
        "{err}"
    );
    std::fs::write(&config, &good).expect("config");

    // An expired certificate.
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["shadowcache".to_string()]).expect("p");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    std::fs::write(&m.cert, params.self_signed(&key).expect("cert").pem()).expect("write");
    let (code, _, err) = run(&[]);
    assert_eq!(code, 2);
    assert!(err.contains("has expired"), "{err}");
    assert!(!data.exists());
}

/// Found in review: the SSD tier sized and overwrote whatever its paths named before anything
/// checked them, so a typo naming a disk's origin cut the image to the cache's size (the origin
/// guard refused the disk only afterwards); the index and the slot file could be one file; and
/// two nodes with different data directories could share one tier. Each is refused at start,
/// and the file named is left as it was.
#[test]
fn ssd_paths_that_name_an_origin_each_other_or_a_tier_in_use_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("base.raw");
    let content: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 253) as u8).collect();
    std::fs::write(&image, &content).expect("image");
    let img = image.display().to_string();
    let disk = format!("--disk=base={img},sealed");
    let data = |n: &str| dir.path().join(n).display().to_string();
    // The slot file named as the origin.
    let (code, err) = start(&[
        "--data-dir",
        &data("d1"),
        &disk,
        "--ssd-path",
        &img,
        "--ssd-cache",
        "64MiB",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cache.ssd_path") && err.contains("the origin of disk \"base\""),
        "{err}"
    );
    // The index named as the origin.
    let config = dir.path().join("index.toml");
    std::fs::write(&config, format!("[cache]\nssd_index_path = {img:?}\n")).expect("config");
    let (code, err) = start(&[
        "--data-dir",
        &data("d2"),
        &disk,
        "--config",
        &config.display().to_string(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("cache.ssd_index_path"), "{err}");
    assert!(
        std::fs::read(&image).expect("image") == content,
        "the origin was written"
    );
    // The index and the slot file one file.
    let one = dir.path().join("one");
    std::fs::write(
        &config,
        format!(
            "[cache]\nssd_index_path = {:?}\n",
            one.display().to_string()
        ),
    )
    .expect("config");
    let (code, err) = start(&[
        "--data-dir",
        &data("d3"),
        "--ssd-path",
        &one.display().to_string(),
        "--config",
        &config.display().to_string(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("are one file"), "{err}");
    // Two nodes, two data directories, one tier: the second is refused, the first serves.
    let slots = dir.path().join("shared.slots");
    let index = dir.path().join("shared.index");
    std::fs::write(
        &config,
        format!(
            "[cache]\nssd_index_path = {:?}\n",
            index.display().to_string()
        ),
    )
    .expect("config");
    let shared = [
        "--ssd-path".to_string(),
        slots.display().to_string(),
        "--config".to_string(),
        config.display().to_string(),
    ];
    let first = shadowcache_testkit::NodeProcess::start(
        &dir.path().join("first"),
        &[shared.to_vec(), vec![disk.clone()]].concat(),
    );
    let (code, err) = start(
        &[
            vec!["--data-dir".to_string(), data("second")],
            shared.to_vec(),
        ]
        .concat()
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert!(
        code > 0,
        "the second node was not refused (code {code}): {err}"
    );
    assert!(err.contains("in use by another process"), "{err}");
    drop(first);
}

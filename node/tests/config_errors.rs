//! A broken configuration stops `shadowcache-node` at start, with a message naming the key.

use std::process::Command;

use shadowcache_testkit::binary;

fn start(args: &[&str]) -> (i32, String) {
    let out = Command::new(binary("shadowcache-node"))
        .args(args)
        .output()
        .expect("run shadowcache-node");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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

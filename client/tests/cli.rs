//! The `shadowcache` CLI end to end, against a real `shadowcache-node`.

use std::path::Path;
use std::process::{Command, Output};

use shadowcache_testkit::{NodeProcess, binary, random_image};

fn cli(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shadowcache"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run shadowcache")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).expect("json output")
}

#[test]
fn the_cli_lists_reads_writes_seals_and_reports_status() {
    assert!(binary("shadowcache-node").exists());
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let rw = dir.path().join("rw.raw");
    let base_data = random_image(&base, 200_000, 1);
    random_image(&rw, 100_000, 2);
    let node = NodeProcess::start(
        &dir.path().join("node"),
        &[
            format!("--disk=base={},sealed", base.display()),
            format!("--disk=rw={}", rw.display()),
            "--block-size=4KiB".into(),
        ],
    );
    let s = node.socket.as_path();

    // disks, as a table and as JSON
    let table = ok(cli(s, &["disks"]));
    assert!(
        table.contains("base") && table.contains("sealed") && table.contains("mutable"),
        "{table}"
    );
    let disks = json(cli(s, &["--json", "disks"]));
    assert_eq!(disks.as_array().map(Vec::len), Some(2));
    assert_eq!(disks[0]["id"], "base");
    assert_eq!(disks[0]["size_bytes"], 200_000);
    assert_eq!(disks[1]["mode"], "mutable");

    // stat
    let st = json(cli(s, &["stat", "rw", "--json"]));
    assert_eq!(st["size_bytes"], 100_000);

    // read to a file and to stdout
    let out = dir.path().join("out.bin");
    ok(cli(
        s,
        &[
            "read",
            "base",
            "--offset",
            "1234",
            "--length",
            "50000",
            "-o",
            out.to_str().expect("path"),
        ],
    ));
    assert!(std::fs::read(&out).expect("out")[..] == base_data[1234..51234]);
    let stdout = cli(s, &["read", "base", "--offset", "199990", "--length", "10"]);
    assert!(stdout.status.success());
    assert_eq!(stdout.stdout, base_data[199_990..]);

    // write from a file, read it back
    let input = dir.path().join("in.bin");
    std::fs::write(&input, b"shadowcache").expect("input");
    ok(cli(
        s,
        &[
            "write",
            "rw",
            "--offset",
            "777",
            "-i",
            input.to_str().expect("path"),
        ],
    ));
    let back = cli(s, &["read", "rw", "--offset", "777", "--length", "11"]);
    assert_eq!(back.stdout, b"shadowcache");
    assert_eq!(
        &std::fs::read(&rw).expect("origin")[777..788],
        b"shadowcache"
    );

    // seal: later writes are refused with the documented message
    let sealed = json(cli(s, &["--json", "seal", "rw"]));
    assert_eq!(sealed["mode"], "sealed");
    let refused = cli(
        s,
        &[
            "write",
            "rw",
            "--offset",
            "0",
            "-i",
            input.to_str().expect("path"),
        ],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("disk is sealed"));

    // errors are reported, not panicked
    let unknown = cli(s, &["stat", "nope"]);
    assert!(!unknown.status.success());
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(err.contains("not found") && err.contains("nope"), "{err}");
    let past = cli(s, &["read", "base", "--offset", "199999", "--length", "2"]);
    assert!(String::from_utf8_lossy(&past.stderr).contains("out of range"));

    // status: tiers, hit ratios, dedup ratio
    for _ in 0..2 {
        ok(cli(
            s,
            &[
                "read",
                "base",
                "--offset",
                "0",
                "--length",
                "4096",
                "-o",
                "/dev/null",
            ],
        ));
    }
    let st = json(cli(s, &["--json", "status"]));
    let tiers: Vec<&str> = st["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(tiers, ["ram_single", "ram_multi", "ssd"]);
    assert!(st["hit_ratio"].as_f64().expect("hit ratio") > 0.0);
    assert!(st["dedup_ratio"].as_f64().expect("dedup ratio") >= 1.0);
    assert!(
        st["counters"]["origin_reads"]
            .as_u64()
            .expect("origin reads")
            > 0
    );
    // The SSD tier's wear against what it earns: both counted, nothing served that was not
    // written first.
    let served = st["counters"]["ssd_served_bytes"].as_u64().expect("served");
    let written = st["counters"]["ssd_written_bytes"]
        .as_u64()
        .expect("written");
    assert!(served == 0 || written > 0, "{st}");
    let policy = &st["policy"];
    assert_eq!(policy["adaptive"].as_bool(), Some(true), "{st}");
    let target = policy["single_touch_target"].as_f64().expect("target");
    assert!(
        policy["single_touch_min"].as_f64().expect("min") <= target
            && target <= policy["single_touch_max"].as_f64().expect("max"),
        "{st}"
    );
    assert!(policy["ghost_capacity"].as_u64().expect("ghost bound") > 0);
    assert_eq!(policy["rules_duel"].as_bool(), Some(true), "{st}");
    assert!(
        ["tuned", "arc", "lru", "loop"].contains(&policy["rules"].as_str().expect("rules")),
        "{st}"
    );
    let shards = policy["shards"].as_u64().expect("shards");
    assert!(shards.is_power_of_two() && shards <= 64, "{st}");
    let text = ok(cli(s, &["status"]));
    assert!(
        text.contains("hit ratio") && text.contains("dedup ratio") && text.contains("ram_multi"),
        "{text}"
    );
    assert!(
        text.contains("single-touch target")
            && text.contains("ghost hits")
            && text.contains("eviction rules:")
            && text.contains("picked by the duel")
            && text.contains(&format!("shards: {shards}"))
            && text.contains("ssd written"),
        "{text}"
    );

    // register a new disk through Admin; it survives a restart
    let extra = dir.path().join("extra.raw");
    random_image(&extra, 8192, 3);
    ok(cli(
        s,
        &[
            "register",
            "extra",
            extra.to_str().expect("path"),
            "--mode",
            "sealed",
        ],
    ));
    drop(node);
    let node = NodeProcess::start(
        &dir.path().join("node"),
        &[format!("--disk=base={},sealed", base.display())],
    );
    let disks = json(cli(&node.socket, &["--json", "disks"]));
    let ids: Vec<&str> = disks
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        ["base", "extra", "rw"],
        "registered and sealed disks must survive a restart"
    );
    assert_eq!(
        disks[2]["mode"], "sealed",
        "a sealed disk came back mutable"
    );
}

#[test]
fn a_missing_socket_is_a_clear_error() {
    let out = cli(Path::new("/nonexistent/shadowcache.sock"), &["disks"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect") && err.contains("/nonexistent/shadowcache.sock"),
        "{err}"
    );
}

/// Found in review: `--tcp` with `--cert` and `--key` but no `--ca` connected in plaintext,
/// and an `https://` address without them was quietly rewritten to http. Both are refused
/// before any connection, saying what is missing.
#[test]
fn tls_flags_without_their_partners_and_https_without_tls_are_refused() {
    let sock = Path::new("/nonexistent/shadowcache.sock");
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "--tcp",
                "127.0.0.1:1",
                "--cert",
                "c.pem",
                "--key",
                "k.pem",
                "disks",
            ],
            "--ca",
        ),
        (&["--tcp", "127.0.0.1:1", "--key", "k.pem", "disks"], "--ca"),
        (&["--tcp", "https://127.0.0.1:1", "disks"], "https"),
    ];
    for (args, says) in cases {
        let out = cli(sock, args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            !err.contains("cannot connect"),
            "{args:?} tried to connect: {err}"
        );
    }
}

/// The library too: an https address without TLS files is an error, not plaintext.
#[test]
fn the_library_refuses_an_https_address_without_tls() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(shadowcache_client::Client::connect_tcp(
        "https://127.0.0.1:1",
    )) {
        Err(shadowcache_client::ClientError::Tls(why)) => assert!(why.contains("https"), "{why}"),
        other => panic!("an https address without TLS: {other:?}"),
    }
}

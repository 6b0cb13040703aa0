//! `shadowcache-bench policy --hash-seed`: the cache's hash keys (the duel's sample, the
//! shards' split) are random per process, which moves sweep points between runs; a seed
//! repeats a run exactly, and the seed of a run without one is printed and saved.

use std::path::Path;
use std::process::Command;

use shadowcache_testkit::binary;

/// The bench on a small synthetic family in 4 shards: the JSON it saved and its stdout.
fn run(dir: &Path, seed: Option<u64>, name: &str) -> (serde_json::Value, String) {
    let json = dir.join(format!("{name}.json"));
    let mut c = Command::new(binary("shadowcache-bench"));
    c.args([
        "policy",
        "--synthetic",
        "multi",
        "--footprint",
        "2000",
        "--requests",
        "50000",
        "--capacity",
        "200,500",
        "--shards",
        "4",
        "--lookup-seconds",
        "0",
        "--json",
    ])
    .arg(&json);
    if let Some(s) = seed {
        c.arg(format!("--hash-seed={s}"));
    }
    let out = c.output().expect("run shadowcache-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
    (v, stdout)
}

/// Hits of `policy` at each capacity.
fn hits(v: &serde_json::Value, policy: &str) -> Vec<u64> {
    v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            r["policies"]
                .as_array()
                .expect("policies")
                .iter()
                .find(|p| p["policy"] == policy)
                .and_then(|p| p["hits"].as_u64())
                .expect("hits")
        })
        .collect()
}

#[test]
fn a_hash_seed_repeats_a_run_and_the_seed_of_a_run_without_one_is_saved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, out) = run(dir.path(), Some(1), "a");
    assert!(out.contains("hash seed 1 "), "{out}");
    assert_eq!(a["hash_seed"].as_u64(), Some(1));
    let (b, _) = run(dir.path(), Some(1), "b");
    assert_eq!(hits(&a, "shadowcache"), hits(&b, "shadowcache"));
    assert_eq!(a["rows"], b["rows"], "one seed, two different runs");
    // The seed is what moved: other seeds give other hits (the references stay the same:
    // they hash nothing).
    let others: Vec<_> = (2..=4)
        .map(|s| run(dir.path(), Some(s), &format!("s{s}")).0)
        .collect();
    assert!(
        others
            .iter()
            .any(|o| hits(o, "shadowcache") != hits(&a, "shadowcache")),
        "the hash seed changed nothing"
    );
    for o in &others {
        assert_eq!(hits(o, "LRU"), hits(&a, "LRU"));
    }
    // Without one, a random seed is drawn, printed and saved: it repeats that run.
    let (c, out) = run(dir.path(), None, "c");
    let seed = c["hash_seed"].as_u64().expect("a seed saved");
    assert!(
        out.contains(&format!("--hash-seed {seed} repeats")),
        "{out}"
    );
    let (d, _) = run(dir.path(), Some(seed), "d");
    assert_eq!(c["rows"], d["rows"]);
}

//! Helpers shared by the multi-node tests: members as real `shadowcache-node` processes on
//! loopback, clients, and polling the status with a deadline.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use shadowcache_client::{Client, ClientError, StatusResponse};
use shadowcache_testkit::{NodeProcess, free_peer_port, write_file};
use tonic::Code;

/// One member of a test cluster.
pub struct Member {
    pub process: NodeProcess,
    /// Its peer address (gossip and Peer gRPC).
    pub addr: String,
}

/// Settings for a test cluster's config file.
#[derive(Clone, Copy)]
pub struct Settings {
    /// Failure detector threshold: high in tests that do not measure detection, so that a
    /// loaded 2-core CI machine does not declare live members dead.
    pub phi: f64,
    pub quiet_ms: u64,
    pub min_reads: u64,
    pub lease_ms: u64,
    pub margin_ms: u64,
    pub detection: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            phi: 14.0,
            quiet_ms: 400,
            min_reads: 4,
            lease_ms: 2_000,
            margin_ms: 200,
            detection: true,
        }
    }
}

/// Writes the config file for `settings` in `dir` and returns the flag that loads it.
pub fn config_flag(dir: &Path, s: Settings) -> String {
    let path = dir.join(format!(
        "cluster-{}-{}-{}-{}.toml",
        s.detection, s.quiet_ms, s.lease_ms, s.phi
    ));
    let text = format!(
        "[cluster]\nphi_threshold = {}\ngossip_interval_ms = 250\nrpc_timeout_ms = 2000\n\n\
         [detection]\nenabled = {}\nwindow_ms = 10000\nmin_readers = 2\nmin_reads = {}\nquiet_period_ms = {}\n\n\
         [lease]\nterm_ms = {}\ndrift_margin_ms = {}\n",
        s.phi, s.detection, s.min_reads, s.quiet_ms, s.lease_ms, s.margin_ms
    );
    write_file(&path, text.as_bytes());
    format!("--config={}", path.display())
}

pub fn member(dir: &Path, id: &str, seed: Option<&str>, extra: &[String]) -> Member {
    member_with_env(dir, id, seed, extra, &[])
}

pub fn member_with_env(
    dir: &Path,
    id: &str,
    seed: Option<&str>,
    extra: &[String],
    env: &[(&str, &str)],
) -> Member {
    member_on(dir, id, free_peer_port(), seed, extra, env)
}

/// A member listening on `port` (pick it with `free_peer_port`, e.g. to put a proxy before it).
pub fn member_on(
    dir: &Path,
    id: &str,
    port: u16,
    seed: Option<&str>,
    extra: &[String],
    env: &[(&str, &str)],
) -> Member {
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec![format!("--node-id={id}"), format!("--peer-listen={addr}")];
    if let Some(s) = seed {
        args.push(format!("--seed={s}"));
    }
    args.extend_from_slice(extra);
    if !extra.iter().any(|a| a.starts_with("--config")) {
        args.push(config_flag(
            dir,
            Settings {
                detection: false,
                ..Settings::default()
            },
        ));
    }
    Member {
        process: NodeProcess::start_with_env(&dir.join(id), &args, env),
        addr,
    }
}

pub async fn client(m: &Member) -> Client {
    Client::connect_unix(&m.process.socket)
        .await
        .expect("connect")
}

/// Polls `status` at `m` until `ok` holds (gossip takes a few rounds), or fails after 30 s.
pub async fn until(m: &Member, what: &str, ok: impl Fn(&StatusResponse) -> bool) {
    let c = client(m).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.status().await.expect("status");
        if ok(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last status: members {:?}, disks {:?}",
            s.members,
            s.disks
                .iter()
                .map(|d| (&d.id, &d.owner, d.mode, d.generation))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn has_disk(s: &StatusResponse, id: &str, owner: &str) -> bool {
    s.disks.iter().any(|d| d.id == id && d.owner == owner)
}

pub fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

pub async fn counters(m: &Member) -> shadowcache_client::CacheCounters {
    client(m)
        .await
        .status()
        .await
        .expect("status")
        .counters
        .expect("counters")
}

/// Three members: `a` owns disk `vdi` (mutable, origin `path`), `b` (with `b_extra` flags) and
/// `c` join through it; returns once every member sees all three and the disk.
pub async fn vdi_cluster(
    dir: &Path,
    path: &Path,
    settings: Settings,
    b_extra: &[String],
) -> (Member, Member, Member) {
    let cfg = config_flag(dir, settings);
    let a = member(
        dir,
        "a",
        None,
        &[
            format!("--disk=vdi={},mutable", path.display()),
            cfg.clone(),
        ],
    );
    let mut b_args = vec![cfg.clone()];
    b_args.extend_from_slice(b_extra);
    let b = member(dir, "b", Some(&a.addr), &b_args);
    let c = member(dir, "c", Some(&a.addr), &[cfg]);
    for m in [&a, &b, &c] {
        until(m, "three members and the disk", |s| {
            s.members.len() == 3 && has_disk(s, "vdi", "a")
        })
        .await;
    }
    (a, b, c)
}

/// The path of external tool `tool`; panics, naming its package, when it is not installed.
pub fn tool(tool: &str, package: &str) -> std::path::PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{tool} is not installed: this test needs it. Run ./scripts/test.sh, which installs \
             {package} (apt-get install {package}), or install it by hand."
        )
    })
}

/// Fails loudly when the node binary cannot honour fail points.
pub fn needs_failpoints() {
    #[cfg(not(feature = "failpoints"))]
    panic!(
        "this test needs the node built with fail points: run ./scripts/test.sh, or \
         cargo test -p shadowcache-node --features failpoints"
    );
}

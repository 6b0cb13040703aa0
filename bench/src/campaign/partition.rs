//! `partition-holder`: three nodes, each in its own network namespace joined to a bridge by a
//! veth pair, so that gossip (UDP) and the Peer service (TCP) cross a real link. Owner `a`
//! has a mutable disk that `b` and `c` read until it is detected and both hold leases. Then
//! `b`'s link goes down (both directions at once) and a write of a block `b` holds comes to
//! the owner. The owner cannot revoke `b`'s lease: it must wait the lease out, and `b` must
//! stop serving the block by the end of its lease, never after the write was acknowledged.
//! Needs root (`ip netns`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use shadowcache_client::{DiskMode, StatusResponse};

use super::{Checks, Ctx, Fut, Host, Scenario, Settings, failure, ms, sh};

fn holder<'a>(c: &'a Ctx, k: &'a mut Checks) -> Fut<'a> {
    Box::pin(partition_holder(c, k))
}

fn owner_restart<'a>(c: &'a Ctx, k: &'a mut Checks) -> Fut<'a> {
    Box::pin(owner_restart_detected(c, k))
}

pub(super) fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "owner-restart-detected",
            guarantee: "an owner killed and started again while its disk is detected holds \
                        writes until the leases its old process granted have run out: no \
                        member returns the old bytes after the write was acknowledged",
            run: owner_restart,
        },
        Scenario {
            name: "partition-holder",
            guarantee: "a lease holder cut off in both directions (its link down) stops serving \
                    a detected disk by the end of its lease; a write at the owner waits at \
                    most that long, and no read after its acknowledgement returns the old bytes",
            run: holder,
        },
    ]
}

/// Network namespaces on a bridge, one per node; all removed when dropped.
pub struct Net {
    prefix: String,
    bridge: String,
    /// The iptables rule that lets this bridge's frames through, when one was needed.
    forward_rule: Option<Vec<String>>,
    subnet: String,
    hosts: Vec<String>,
}

impl Net {
    /// A bridge and `n` namespaces `<prefix><i>`, each with address `<subnet>.<i + 1>`.
    pub fn new(n: usize) -> anyhow::Result<Net> {
        Net::sweep();
        Net::sweep_links();
        Net::sweep_rules();
        let pid = std::process::id();
        let prefix = format!("scf{pid}n");
        let mut net = Net {
            forward_rule: None,
            bridge: format!("scf{pid}br"),
            subnet: format!("10.231.{}", pid % 250),
            prefix,
            hosts: Vec::new(),
        };
        sh("ip", &["link", "add", &net.bridge, "type", "bridge"])?;
        // Bridged frames must not meet the host's iptables (br_netfilter with a FORWARD policy
        // of DROP, as Docker leaves it, would cut every link before the scenario does); this
        // bridge's own switch is off.
        let _ = sh(
            "ip",
            &[
                "link",
                "set",
                &net.bridge,
                "type",
                "bridge",
                "nf_call_iptables",
                "0",
            ],
        );
        // That switch is not enough where br_netfilter's global one is on (crate::netfilter).
        net.forward_rule = crate::netfilter::let_through(&net.bridge)?;
        sh("ip", &["link", "set", &net.bridge, "up"])?;
        for i in 0..n {
            let ns = format!("{}{i}", net.prefix);
            let outside = format!("{ns}h");
            let inside = format!("{ns}v");
            sh("ip", &["netns", "add", &ns])?;
            net.hosts.push(ns.clone());
            sh(
                "ip",
                &[
                    "link", "add", &outside, "type", "veth", "peer", "name", &inside,
                ],
            )?;
            sh("ip", &["link", "set", &inside, "netns", &ns])?;
            sh("ip", &["link", "set", &outside, "master", &net.bridge])?;
            sh("ip", &["link", "set", &outside, "up"])?;
            let addr = format!("{}/24", net.addr(i));
            sh(
                "ip",
                &[
                    "netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", &inside,
                ],
            )?;
            sh(
                "ip",
                &["netns", "exec", &ns, "ip", "link", "set", &inside, "up"],
            )?;
            sh(
                "ip",
                &["netns", "exec", &ns, "ip", "link", "set", "lo", "up"],
            )?;
        }
        Ok(net)
    }

    /// Removes what an earlier run that was killed left behind (its process is gone).
    fn sweep() {
        let Ok(out) = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
        else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let Some(rest) = name.strip_prefix("scf") else {
                continue;
            };
            let Some(pid) = rest.split('n').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = sh("ip", &["link", "del", &format!("{name}h")]);
                let _ = sh("ip", &["netns", "del", name]);
                let _ = sh("ip", &["link", "del", &format!("scf{pid}br")]);
            }
        }
    }

    /// FORWARD rules of runs that were killed (their bridge's pid is gone).
    fn sweep_rules() {
        for bridge in crate::netfilter::bridges_with_rules() {
            let Some(rest) = bridge.strip_prefix("scf") else {
                continue;
            };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
                crate::netfilter::delete(&crate::netfilter::accept_rule(&bridge));
            }
        }
    }

    /// Host-side veth ends of runs that were killed: `scf<pid>n<i>h` with `<pid>` gone.
    fn sweep_links() {
        let Ok(out) = std::process::Command::new("ip")
            .args(["-o", "link"])
            .output()
        else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line
                .split(':')
                .nth(1)
                .map(|n| n.trim().split('@').next().unwrap_or(""))
            else {
                continue;
            };
            let Some(rest) = name.strip_prefix("scf") else {
                continue;
            };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = sh("ip", &["link", "del", name]);
            }
        }
    }

    /// Node `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    /// Node `i`'s namespace.
    pub fn ns(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// Takes node `i`'s link down (`up` false) or up again.
    pub fn link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        let outside = format!("{}h", self.hosts[i]);
        sh(
            "ip",
            &["link", "set", &outside, if up { "up" } else { "down" }],
        )
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.hosts {
            // The pair goes with either end; the namespace may outlive its name a while.
            let _ = sh("ip", &["link", "del", &format!("{ns}h")]);
            let _ = sh("ip", &["netns", "del", ns]);
        }
        let _ = sh("ip", &["link", "del", &self.bridge]);
        if let Some(rule) = &self.forward_rule {
            crate::netfilter::delete(rule);
        }
    }
}

/// `b` and `c` read `vdi` until its owner `a` has detected it and both hold leases.
async fn detect(a: &Host, b: &Host, c: &Host) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for h in [b, c] {
        let client = h.client().await?;
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let d = client.disk("vdi");
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let _ = d.read_at((i % BLOCKS) * BS, BS).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let r = super::until(
        a,
        "vdi detected, leased by b and c",
        Duration::from_secs(30),
        |s| {
            disk_at(s, "vdi").is_some_and(|d| {
                DiskMode::try_from(d.mode) == Ok(DiskMode::Detected)
                    && d.lease_holders.iter().any(|h| h == "b")
                    && d.lease_holders.iter().any(|h| h == "c")
            })
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in readers {
        t.await?;
    }
    r
}

/// One read of `block` (start, end, and "old", "new", "foreign" or the error), since `t0`.
type Watched = (Duration, Duration, String);

/// Reads `block` every 10 ms until `stop`, classifying each answer.
fn watch(
    d: shadowcache_client::Disk,
    block: u64,
    old: &[u8],
    new: &[u8],
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Watched>> {
    let (old, new) = (old.to_vec(), new.to_vec());
    tokio::spawn(async move {
        let mut ops = Vec::new();
        while !stop.load(Ordering::Relaxed) && ops.len() < 100_000 {
            let s = t0.elapsed();
            let r = tokio::time::timeout(Duration::from_secs(10), d.read_at(block * BS, BS)).await;
            let what = match r {
                Ok(Ok(b)) if b[..] == old[..] => "old".to_string(),
                Ok(Ok(b)) if b[..] == new[..] => "new".to_string(),
                Ok(Ok(_)) => "foreign".to_string(),
                Ok(Err(e)) => failure(&e),
                Err(_) => "timed out after 10 s".to_string(),
            };
            ops.push((s, t0.elapsed(), what));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ops
    })
}

/// Polls `vdi`'s `lease_valid` at a member every 20 ms until `stop`: (when, valid).
fn lease_poller(
    c: shadowcache_client::Client,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Duration, bool)>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) && seen.len() < 100_000 {
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), c.status()).await {
                let valid = disk_at(&s, "vdi").is_some_and(|d| d.lease_valid);
                seen.push((t0.elapsed(), valid));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    })
}

/// The first time after `from` that the poll saw no lease.
fn lease_end(polls: &[(Duration, bool)], from: Duration) -> Option<Duration> {
    polls
        .iter()
        .find(|(t, v)| *t > from && !*v)
        .map(|(t, _)| *t)
}

/// Waits until all three nodes see each other and `a`'s disk, then until the disk is
/// detected with `b` and `c` holding leases.
async fn formed_and_detected(a: &Host, b: &Host, c: &Host) -> anyhow::Result<()> {
    for h in [a, b, c] {
        super::until(
            h,
            "three members and the disk",
            Duration::from_secs(30),
            |s| super::formed(s, 3, "vdi", "a"),
        )
        .await?;
    }
    detect(a, b, c).await
}

/// Block `block` of `vdi` read at `b` every 10 ms and `b`'s lease polled, from `t0` on.
struct BlockWatch {
    bc: shadowcache_client::Client,
    block: u64,
    new: Vec<u8>,
    t0: Instant,
    stop: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<Vec<Watched>>,
    polls: tokio::task::JoinHandle<Vec<(Duration, bool)>>,
}

impl BlockWatch {
    /// Checks that `b` reads the image's bytes of `block`, then starts watching; `seed`
    /// draws the new bytes a write will bring.
    async fn start(b: &Host, image: &[u8], block: u64, seed: u64) -> anyhow::Result<Self> {
        let old = image[(block * BS) as usize..((block + 1) * BS) as usize].to_vec();
        let mut new = vec![0u8; BS as usize];
        rand::rngs::StdRng::seed_from_u64(seed).fill(&mut new[..]);
        let bc = b.client().await?;
        anyhow::ensure!(
            bc.disk("vdi").read_at(block * BS, BS).await?[..] == old[..],
            "b's first read"
        );
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = watch(bc.disk("vdi"), block, &old, &new, t0, stop.clone());
        let polls = lease_poller(b.client().await?, t0, stop.clone());
        Ok(BlockWatch {
            bc,
            block,
            new,
            t0,
            stop,
            reader,
            polls,
        })
    }

    /// Waits (30 s at most) until `b` reads the new bytes.
    async fn until_new(&self, after: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.bc.disk("vdi").read_at(self.block * BS, BS).await;
            if got.as_ref().is_ok_and(|b| b[..] == self.new[..]) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "b did not read the new bytes in 30 s {after}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops watching: every read, and every poll of the lease.
    async fn finish(self) -> anyhow::Result<(Vec<Watched>, Vec<(Duration, bool)>)> {
        self.stop.store(true, Ordering::Relaxed);
        Ok((self.reader.await?, self.polls.await?))
    }
}

/// Holds the reads at `b` to the promise: none that began after the write was acknowledged
/// (at `acked`) returned the old bytes, and none returned bytes of no version. Returns when
/// the last read that returned the old bytes began.
fn check_reads(k: &mut Checks, ops: &[Watched], acked: Duration) -> Option<Duration> {
    let stale: Vec<Duration> = ops
        .iter()
        .filter(|(s, _, w)| *s > acked && w == "old")
        .map(|(s, _, _)| *s)
        .collect();
    let foreign = ops.iter().filter(|(_, _, w)| w == "foreign").count();
    k.figure("b_reads", ops.len() as u64);
    k.check(stale.is_empty(), || {
        format!(
            "{} reads at b that began after the write was acknowledged returned the old bytes \
             (first at {:?}, ack at {acked:?})",
            stale.len(),
            stale[0]
        )
    });
    k.check(foreign == 0, || {
        format!("{foreign} reads returned bytes of no version")
    });
    ops.iter()
        .filter(|(_, _, w)| w == "old")
        .map(|(s, _, _)| *s)
        .max()
}

fn disk_at<'a>(s: &'a StatusResponse, id: &str) -> Option<&'a shadowcache_client::DiskInfo> {
    s.disks.iter().find(|d| d.id == id)
}

const BS: u64 = 16 << 10;
const BLOCKS: u64 = 64;

async fn partition_holder(ctx: &Ctx, k: &mut Checks) -> anyhow::Result<()> {
    if !super::is_root() {
        k.skip("needs root for network namespaces (ip netns)");
        return Ok(());
    }
    let settings = Settings {
        detection: true,
        lease_ms: 2000,
        margin_ms: 200,
        ..Settings::default()
    };
    let path = ctx.dir.join("vdi.raw");
    let image = super::image(&path, (BLOCKS * BS) as usize, 51);
    // Declared first: dropped last, after the nodes in it.
    let net = Net::new(3)?;
    let start = |i: usize, id: &str, seed: Option<&str>, extra: &[String]| {
        let addr = format!("{}:7411", net.addr(i));
        Host::start(
            ctx,
            &ctx.dir,
            id,
            addr,
            settings,
            seed,
            extra,
            &[(shadowcache_testkit::NETNS, net.ns(i))],
        )
    };
    let a = start(
        0,
        "a",
        None,
        &[format!("--disk=vdi={},mutable", path.display())],
    );
    let b = start(1, "b", Some(&a.addr), &[]);
    let c = start(2, "c", Some(&a.addr), &[]);
    let t = Instant::now();
    formed_and_detected(&a, &b, &c).await?;
    k.figure("detected_after_ms", ms(t.elapsed()));
    // b holds block 5 and reads it every 10 ms from now on.
    let w = BlockWatch::start(&b, &image, 5, 52).await?;
    let (block, t0) = (w.block, w.t0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Cut b off, then write the block at the owner.
    net.link(1, false)?;
    let cut = t0.elapsed();
    let ac = a.client().await?;
    let wrote = super::within(
        Duration::from_secs(30),
        "the write at the owner",
        ac.disk("vdi").write_at(block * BS, w.new.clone()),
    )
    .await;
    let acked = t0.elapsed();
    k.check(wrote.is_ok(), || {
        format!("the write at the owner failed: {:?}", wrote.err())
    });
    let waited = acked - cut;
    k.figure("lease_term_ms", settings.lease_ms);
    k.figure("drift_margin_ms", settings.margin_ms);
    k.figure("write_waited_ms", ms(waited));
    // b is cut off for a lease term more, then its link comes back.
    tokio::time::sleep(Duration::from_millis(settings.lease_ms) + ctx.phase / 2).await;
    net.link(1, true)?;
    let healed = t0.elapsed();
    w.until_new("after the heal").await?;
    k.figure("b_reads_new_bytes_after_heal_ms", ms(t0.elapsed() - healed));
    let (ops, polls) = w.finish().await?;
    let b_lease_end = lease_end(&polls, cut);
    k.figure(
        "b_lease_ended_after_cut_ms",
        b_lease_end.map_or(-1.0, |e| ms(e.saturating_sub(cut))),
    );
    let last_old = check_reads(k, &ops, acked);
    let served_after_cut = last_old.map_or(Duration::ZERO, |l| l.saturating_sub(cut));
    let errors: Vec<&String> = ops
        .iter()
        .filter(|(s, _, w)| *s > cut && *s < healed && w != "old" && w != "new")
        .map(|(_, _, w)| w)
        .collect();
    k.figure("b_served_old_bytes_after_cut_ms", ms(served_after_cut));
    k.figure("b_errors_while_cut", errors.len() as u64);
    let mut distinct: Vec<&String> = errors.clone();
    distinct.sort();
    distinct.dedup();
    distinct.truncate(3);
    k.figure(
        "b_error_examples",
        distinct.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    );
    let term = Duration::from_millis(settings.lease_ms);
    k.check(served_after_cut <= term, || {
        format!(
            "b served the old bytes {} ms after it was cut off (term {} ms)",
            ms(served_after_cut),
            settings.lease_ms
        )
    });
    // The owner waits for b's lease: at most a term and a margin from b's last renewal
    // (before the cut), with a second for a loaded machine.
    let limit = Duration::from_millis(settings.lease_ms + settings.margin_ms + 1000);
    k.check(waited <= limit, || {
        format!(
            "the write waited {} ms (limit {} ms)",
            ms(waited),
            ms(limit)
        )
    });
    // Not vacuous: b served the old bytes under its lease after it was cut off, and the
    // write waited at least until b itself saw that lease end (b gives it up a margin early;
    // the owner counts it a margin late); b served nothing after it (polls 20 ms apart).
    let slack = Duration::from_millis(60);
    k.check(last_old.is_some_and(|l| l > cut), || {
        "b stopped serving at the cut: the scenario tested nothing".into()
    });
    match b_lease_end {
        None => k.check(false, || {
            "b's lease never ended while it was cut off".into()
        }),
        Some(end) => {
            k.check(acked + slack >= end, || {
                format!(
                    "the write was acknowledged at {} ms, before b's lease ended at {} ms",
                    ms(acked),
                    ms(end)
                )
            });
            k.check(last_old.is_none_or(|l| l <= end + slack), || {
                format!(
                    "b served the old bytes at {:?}, after its lease ended at {} ms",
                    last_old,
                    ms(end)
                )
            });
        }
    }
    Ok(())
}

async fn owner_restart_detected(ctx: &Ctx, k: &mut Checks) -> anyhow::Result<()> {
    let settings = Settings {
        detection: true,
        lease_ms: 6000,
        margin_ms: 200,
        ..Settings::default()
    };
    let path = ctx.dir.join("vdi.raw");
    let image = super::image(&path, (BLOCKS * BS) as usize, 61);
    let mut a = Host::local(
        ctx,
        "a",
        settings,
        None,
        &[format!("--disk=vdi={},mutable", path.display())],
    );
    let b = Host::local(ctx, "b", settings, Some(&a.addr), &[]);
    let c = Host::local(ctx, "c", settings, Some(&a.addr), &[]);
    formed_and_detected(&a, &b, &c).await?;
    let w = BlockWatch::start(&b, &image, 9, 62).await?;
    let (block, t0) = (w.block, w.t0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SIGKILL, then the same data directory again; the write comes as soon as it answers.
    let killed = t0.elapsed();
    a.process.start_again();
    let up = t0.elapsed();
    let ac = a.client().await?;
    let wrote = super::within(
        Duration::from_secs(30),
        "the write after the restart",
        ac.disk("vdi").write_at(block * BS, w.new.clone()),
    )
    .await;
    let acked = t0.elapsed();
    k.check(wrote.is_ok(), || {
        format!("the write after the restart failed: {:?}", wrote.err())
    });
    k.figure("restart_ms", ms(up - killed));
    k.figure("write_held_after_restart_ms", ms(acked - up));
    k.figure("write_acked_after_kill_ms", ms(acked - killed));
    w.until_new("after the acknowledgement").await?;
    k.figure("b_reads_new_bytes_after_ack_ms", ms(t0.elapsed() - acked));
    let (ops, polls) = w.finish().await?;
    let held_at_up = polls
        .iter()
        .find(|(t, _)| *t >= up)
        .is_some_and(|(_, v)| *v);
    let last_old = check_reads(k, &ops, acked);
    k.figure(
        "b_served_old_bytes_after_kill_ms",
        ms(last_old.map_or(Duration::ZERO, |l| l.saturating_sub(killed))),
    );
    // Not vacuous: b still held the old process's lease when the new one came up, and
    // served the old bytes after that; the fence kept the write back until it stopped.
    k.check(held_at_up, || {
        "b held no lease when the new owner came up: the scenario tested nothing".into()
    });
    k.check(last_old.is_some_and(|l| l > up), || {
        "b served nothing after the new owner came up: the scenario tested nothing".into()
    });
    Ok(())
}

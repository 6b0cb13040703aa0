//! The node's own storage under faults, one node process each:
//!
//! - `ssd-corruption`: the SSD tier's slot file overwritten at random offsets while readers
//!   hit it; every read must still be the image's bytes, and the damage must be detected;
//! - `ssd-restart`: the share of SSD-resident blocks that hit again after a restart on the
//!   same data directory, after a clean stop and after SIGKILL;
//! - `full-disk`: the data directory, the SSD tier and a mutable disk's origin on a small
//!   filesystem (tmpfs, mounted here; needs root) that fills up, then has room again.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use shadowcache_client::{Client, DiskMode};

use super::{Checks, Ctx, Fut, Host, ReadPlan, Readers, Scenario, Settings, failure, ms, tally};

fn corruption<'a>(c: &'a Ctx, k: &'a mut Checks) -> Fut<'a> {
    Box::pin(ssd_corruption(c, k))
}
fn restart<'a>(c: &'a Ctx, k: &'a mut Checks) -> Fut<'a> {
    Box::pin(ssd_restart(c, k))
}
fn full<'a>(c: &'a Ctx, k: &'a mut Checks) -> Fut<'a> {
    Box::pin(full_disk(c, k))
}

pub(super) fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "ssd-corruption",
            guarantee: "bytes of the SSD tier's slot file overwritten while readers hit it are \
                        detected and never served; the block is read again from its source",
            run: corruption,
        },
        Scenario {
            name: "ssd-restart",
            guarantee: "at least 99% of the SSD-resident blocks hit again after a restart on \
                        the same data directory, after a clean stop and after SIGKILL",
            run: restart,
        },
        Scenario {
            name: "full-disk",
            guarantee: "with the data directory's filesystem full, reads are served and \
                        right, writes fail with a clear error, nothing bad is cached, and \
                        service is whole again once there is room",
            run: full,
        },
    ]
}

const DISK: &str = "img";
const SIZE: usize = 24 << 20;

fn node_flags(image: &Path) -> Vec<String> {
    vec![
        format!("--disk={DISK}={},sealed", image.display()),
        "--ram-cache=2MiB".into(),
        "--ssd-cache=64MiB".into(),
    ]
}

/// Reads the whole disk in 1 MiB pieces; returns (wrong pieces, failures).
async fn read_all(c: &Client, disk: &str, image: &[u8]) -> (u64, Vec<String>) {
    let (_, wrong, failed) =
        super::read_span(c, disk, image, (0, image.len() as u64), 1 << 20).await;
    (wrong, failed)
}

/// Reads every 256 KiB piece four times in a row: its blocks become multi-touch in RAM, proven
/// by the reads there, and RAM (smaller than the disk) demotes them to the SSD tier, which
/// takes only multi-touch blocks whose reuse reached past RAM or that RAM read four times.
async fn warm(c: &Client, disk: &str, image: &[u8]) -> anyhow::Result<()> {
    let d = c.disk(disk);
    for at in (0..image.len()).step_by(256 << 10) {
        let n = (256usize << 10).min(image.len() - at);
        for _ in 0..4 {
            let b = super::within(
                Duration::from_secs(30),
                "warm-up read",
                d.read_at(at as u64, n as u64),
            )
            .await?;
            anyhow::ensure!(b[..] == image[at..at + n], "warm-up read at {at} differs");
        }
    }
    Ok(())
}

fn ssd_tier(s: &shadowcache_client::StatusResponse) -> (u64, u64) {
    s.tiers
        .iter()
        .find(|t| t.name == "ssd")
        .map_or((0, 0), |t| (t.entries, t.hits))
}

async fn ssd_corruption(ctx: &Ctx, k: &mut Checks) -> anyhow::Result<()> {
    let path = ctx.dir.join("img.raw");
    let image = super::image(&path, SIZE, 31);
    let node = Host::local(ctx, "s", Settings::default(), None, &node_flags(&path));
    let c = node.client().await?;
    warm(&c, DISK, &image).await?;
    let (resident, _) = ssd_tier(&c.status().await?);
    k.figure("ssd_resident_blocks", resident);
    anyhow::ensure!(
        resident > 100,
        "only {resident} blocks reached the SSD tier"
    );
    let slots = node.process.data_dir.join("cache.slots");
    // Slots are taken from the start of the file: the resident blocks fill the first ones.
    let used = (resident * 16 * 1024).min(std::fs::metadata(&slots)?.len());
    // Readers hit the SSD tier while the corrupter overwrites 16 bytes every 5 ms.
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let plan = ReadPlan {
        disk: DISK.into(),
        image: image.clone(),
        read_bytes: 16 << 10,
        readers: 2,
        max_reads: 1_000_000,
        pause: Duration::ZERO,
    };
    let readers = Readers::start(&node, 0, &plan, t0, stop.clone(), 7).await?;
    let file = std::fs::OpenOptions::new().write(true).open(&slots)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut injected = 0u64;
    let mut slots_hit = std::collections::BTreeSet::new();
    let deadline = Instant::now() + ctx.phase * 2;
    while Instant::now() < deadline {
        let at = rng.random_range(0..used - 16);
        let junk: [u8; 16] = rng.random();
        file.write_at(&junk, at)?;
        injected += 1;
        slots_hit.insert(at / (16 * 1024));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let ops = readers.finish().await?;
    let during = tally(ops.iter());
    let s = c.status().await?;
    let detected_during = s.counters.as_ref().map_or(0, |c| c.ssd_verify_failures);
    // Every block once more: what is still damaged is found now.
    let (wrong, failed) = read_all(&c, DISK, &image).await;
    let s = c.status().await?;
    let cnt = s.counters.unwrap_or_default();
    k.figure("injections", injected);
    k.figure("slots_overwritten", slots_hit.len() as u64);
    k.figure("reads_during", serde_json::to_value(during)?);
    k.figure("ssd_hits", ssd_tier(&s).1);
    k.figure("detected_during", detected_during);
    k.figure("detected_after_sweep", cnt.ssd_verify_failures);
    k.figure("served_bad", during.wrong + wrong);
    k.check(during.wrong == 0 && wrong == 0, || {
        format!(
            "corrupted bytes served: {} reads, {wrong} sweep pieces",
            during.wrong
        )
    });
    k.check(during.failed == 0 && failed.is_empty(), || {
        format!("reads failed instead of going to the origin: {during:?} {failed:?}")
    });
    k.check(cnt.ssd_verify_failures > 0, || {
        format!("{injected} injections and none detected")
    });
    // A slot damaged, detected, stored again and damaged again counts twice; a write across
    // two slots damages both: the injections bound the detections, not the slots.
    k.check(cnt.ssd_verify_failures <= 2 * injected, || {
        format!(
            "{} detections for {injected} injections",
            cnt.ssd_verify_failures
        )
    });
    Ok(())
}

async fn ssd_restart(ctx: &Ctx, k: &mut Checks) -> anyhow::Result<()> {
    let path = ctx.dir.join("img.raw");
    let image = super::image(&path, SIZE, 32);
    let mut node = Host::local(ctx, "s", Settings::default(), None, &node_flags(&path));
    for (how, kill) in [("clean", false), ("sigkill", true)] {
        let c = node.client().await?;
        warm(&c, DISK, &image).await?;
        let (resident, _) = ssd_tier(&c.status().await?);
        drop(c);
        let t = Instant::now();
        if kill {
            node.process.start_again();
        } else {
            node.process.restart();
        }
        let restarted = t.elapsed();
        let c = node.client().await?;
        // What the tier holds as it opens: the resident blocks, and after a clean stop also
        // what RAM held (written down at shutdown).
        let (reopened, _) = ssd_tier(&c.status().await?);
        let (wrong, failed) = read_all(&c, DISK, &image).await;
        let s = c.status().await?;
        let (_, hits) = ssd_tier(&s);
        // Hits of blocks that were SSD-resident before the stop: every hit, less at most the
        // blocks added at shutdown. Not capped: a lost block shows.
        let added = reopened.saturating_sub(resident);
        let share = if resident == 0 {
            0.0
        } else {
            hits.saturating_sub(added) as f64 / resident as f64
        };
        k.figure(&format!("{how}_ssd_entries_at_reopen"), reopened);
        k.figure(&format!("{how}_ssd_resident_before"), resident);
        k.figure(&format!("{how}_ssd_hits_after"), hits);
        k.figure(
            &format!("{how}_hit_share"),
            (share * 10000.0).round() / 10000.0,
        );
        k.figure(&format!("{how}_restart_ms"), ms(restarted));
        k.check(wrong == 0 && failed.is_empty(), || {
            format!("after a {how} restart: {wrong} wrong, {failed:?}")
        });
        k.check(resident > 100 && share >= 0.99, || {
            format!("after a {how} restart {hits} of {resident} SSD-resident blocks hit")
        });
    }
    Ok(())
}

/// A tmpfs mounted for the scenario, unmounted when dropped.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem of `path` (a file created there) until it refuses more.
fn fill(path: &Path) -> anyhow::Result<u64> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0xa5u8; 64 << 10];
    let mut n = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(w) => n += w as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => return Err(e.into()),
        }
    }
    // Smaller pieces down to the last page.
    for _ in 0..64 {
        match f.write(&chunk[..4096]) {
            Ok(w) if w > 0 => n += w as u64,
            _ => break,
        }
    }
    Ok(n)
}

async fn full_disk(ctx: &Ctx, k: &mut Checks) -> anyhow::Result<()> {
    if !super::is_root() {
        k.skip("needs root to mount a small tmpfs");
        return Ok(());
    }
    let small = ctx.dir.join("small");
    std::fs::create_dir_all(&small)?;
    super::sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=16m",
            "tmpfs",
            &small.display().to_string(),
        ],
    )?;
    let _mount = Mount(small.clone());
    let path = ctx.dir.join("img.raw");
    let image = super::image(&path, SIZE, 33);
    // The mutable disk's origin on the small filesystem, sparse: writes need room.
    let rw = small.join("rw.raw");
    std::fs::File::create(&rw)?.set_len(8 << 20)?;
    let mut flags = node_flags(&path);
    flags.push(format!("--disk=rw={},mutable", rw.display()));
    let mut node = Host::local_in(ctx, &small, "s", Settings::default(), None, &flags);
    let c = node.client().await?;
    let filler = small.join("filler");
    let filled = fill(&filler)?;
    k.figure("filler_bytes", filled);
    // Reads of the sealed disk: right, although the SSD tier cannot store them.
    let mut wrong = 0;
    let mut failed = Vec::new();
    for _ in 0..2 {
        let (w, f) = read_all(&c, DISK, &image).await;
        wrong += w;
        failed.extend(f);
    }
    k.figure("full_read_failures", failed.len() as u64);
    k.check(wrong == 0 && failed.is_empty(), || {
        format!("reads on a full disk: {wrong} wrong, {failed:?}")
    });
    // Blocks read four times are multi-touch and proven: RAM lets them go to the SSD tier, which cannot store
    // them now. Still served right, and the blocks it could not store counted for the operator
    // (the tier's writer works behind the reads: polled for a while).
    let warmed = warm(&c, DISK, &image).await;
    k.check(warmed.is_ok(), || {
        format!("reads of multi-touch blocks on a full disk: {warmed:?}")
    });
    let mut unstored = 0;
    for _ in 0..50 {
        unstored = c
            .status()
            .await?
            .counters
            .map_or(0, |c| c.ssd_write_failures);
        if unstored > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    k.figure("ssd_write_failures_when_full", unstored);
    k.check(unstored > 0, || {
        "the SSD tier's failed writes on a full disk were not counted".into()
    });
    // A write that needs room fails, and says why.
    let payload: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
    let r = c.disk("rw").write_at(1 << 20, payload.clone()).await;
    let r = match r {
        Ok(()) => c.disk("rw").flush().await,
        Err(e) => Err(e),
    };
    let msg = match &r {
        Ok(()) => "accepted".to_string(),
        Err(e) => failure(e),
    };
    k.figure("write_when_full", msg.clone());
    // Nothing of the failed write is served: the range still reads as it was (a hole).
    let kept = super::within(
        Duration::from_secs(30),
        "read back",
        c.disk("rw").read_at(1 << 20, payload.len() as u64),
    )
    .await?;
    k.check(kept.iter().all(|b| *b == 0), || {
        "the range of the failed write does not read as before".into()
    });
    k.check(
        r.is_err() && (msg.contains("space") || msg.contains("os error 28")),
        || format!("a write to a full filesystem: {msg}"),
    );
    // Registering a disk must save the disk list: a clear error, or success if it fit.
    let late = ctx.dir.join("late.raw");
    shadowcache_testkit::random_image(&late, 1 << 20, 34);
    let reg = c
        .register_disk("late", &late.display().to_string(), DiskMode::Sealed)
        .await;
    let reg_msg = match &reg {
        Ok(_) => "registered".to_string(),
        Err(e) => failure(e),
    };
    k.figure("register_when_full", reg_msg.clone());
    k.check(
        reg.is_err() && (reg_msg.contains("space") || reg_msg.contains("os error 28")),
        || format!("registering a disk on a full filesystem: {reg_msg}"),
    );
    // A registration that could not be saved is taken back whole: not half there.
    let listed = c.list_disks().await?.iter().any(|d| d.id == "late");
    k.check(reg.is_ok() == listed, || {
        format!("register answered {reg_msg:?} and the disk is listed: {listed}")
    });
    let alive = c.status().await.is_ok();
    k.check(alive, || "the node stopped answering on a full disk".into());
    // Room again: writes land, the SSD tier stores again.
    std::fs::remove_file(&filler)?;
    let t = Instant::now();
    c.disk("rw").write_at(1 << 20, payload.clone()).await?;
    c.disk("rw").flush().await?;
    let back = c.disk("rw").read_at(1 << 20, payload.len() as u64).await?;
    k.check(back[..] == payload[..], || {
        "the write after room came back differs".into()
    });
    if reg.is_err() {
        let again = c
            .register_disk("late", &late.display().to_string(), DiskMode::Sealed)
            .await;
        k.check(again.is_ok(), || {
            format!(
                "registering again once there was room: {:?}",
                again.err().map(|e| failure(&e))
            )
        });
    }
    let (w, f) = read_all(&c, DISK, &image).await;
    let w2 = u64::from(warm(&c, DISK, &image).await.is_err());
    let (resident, _) = ssd_tier(&c.status().await?);
    k.figure("recovered_ms", ms(t.elapsed()));
    k.figure("ssd_resident_after_room", resident);
    k.check(w + w2 == 0 && f.is_empty(), || {
        format!("reads after room: {} wrong, {f:?}", w + w2)
    });
    k.check(resident > 0, || {
        "the SSD tier stored nothing once there was room".into()
    });
    // A start on a full filesystem: the node serves (without an SSD tier it cannot open),
    // and what was stored while full (torn slots, a short index) is checked as it is read.
    drop(c);
    node.process.stop();
    fill(&filler)?;
    node.process.start_again();
    let c = node.client().await?;
    let (w, f) = read_all(&c, DISK, &image).await;
    let s = c.status().await?;
    let cnt = s.counters.unwrap_or_default();
    k.figure("verify_failures_after_restart", cnt.ssd_verify_failures);
    k.figure(
        "ssd_capacity_after_full_start",
        s.tiers
            .iter()
            .find(|t| t.name == "ssd")
            .map_or(0, |t| t.capacity_bytes),
    );
    k.check(w == 0 && f.is_empty(), || {
        format!("reads after the restart: {w} wrong, {f:?}")
    });
    // A new node on the full filesystem cannot even create its SSD files: it serves without
    // the tier (and says so) rather than not at all.
    fill(&filler)?;
    let fresh = Host::local_in(
        ctx,
        &small,
        "t",
        Settings::default(),
        None,
        &node_flags(&path),
    );
    let fc = fresh.client().await?;
    let (fw, ff) = read_all(&fc, DISK, &image).await;
    let fs = fc.status().await?;
    let fresh_ssd = fs
        .tiers
        .iter()
        .find(|t| t.name == "ssd")
        .map_or(0, |t| t.capacity_bytes);
    k.figure("fresh_node_on_full_disk_ssd_capacity", fresh_ssd);
    k.check(fw == 0 && ff.is_empty() && fresh_ssd == 0, || {
        format!("a node started on a full disk: {fw} wrong, {ff:?}, SSD tier of {fresh_ssd} bytes")
    });
    drop(fc);
    drop(fresh);
    let on_disk = std::fs::read(&rw).context("origin")?;
    k.check(
        on_disk[1 << 20..(1 << 20) + payload.len()] == payload[..],
        || "the origin does not hold the write".into(),
    );
    drop(c);
    drop(node);
    Ok(())
}

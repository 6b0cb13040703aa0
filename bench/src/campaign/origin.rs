//! `nbd-origin`: a node whose disks are NBD exports served by `nbdkit` (the real server, with
//! its `error` and `delay` filters), while the origin fails (EIO on every read while a trigger
//! file exists), stalls (nbdkit stopped with SIGSTOP), goes away (killed) and comes back, and is
//! slow (40 ms a read). A disk on a local file beside it shows that one bad origin holds up no
//! other.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use shadowcache_client::Client;

use super::{Checks, Ctx, Fut, Host, Scenario, Settings, failure, ms};

fn nbd<'a>(c: &'a Ctx, k: &'a mut Checks) -> Fut<'a> {
    Box::pin(nbd_origin(c, k))
}

pub(super) fn scenarios() -> Vec<Scenario> {
    vec![Scenario {
        name: "nbd-origin",
        guarantee: "an NBD origin that fails, stalls, goes away or is slow gets clients clear \
                    errors or late right bytes, never wrong ones; nothing from a failed read \
                    is cached; other disks are served meanwhile; service is back when the \
                    origin is",
        run: nbd,
    }]
}

/// An `nbdkit` process serving one file on a Unix socket; killed when dropped.
struct Kit {
    args: Vec<String>,
    socket: PathBuf,
    child: Option<Child>,
}

impl Kit {
    fn start(socket: &Path, args: &[String]) -> anyhow::Result<Kit> {
        let mut k = Kit {
            args: args.to_vec(),
            socket: socket.to_path_buf(),
            child: None,
        };
        k.spawn()?;
        Ok(k)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&self.socket)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nbdkit")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "nbdkit did not listen in 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.child.as_ref().context("nbdkit not running")?.id();
        super::sh("kill", &[&format!("-{sig}"), &pid.to_string()])
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Kit {
    fn drop(&mut self) {
        self.kill();
    }
}

const MIB: u64 = 1 << 20;

/// Reads `[from, to)` of `disk` in 64 KiB pieces: (right, wrong, failures).
async fn read_range(
    c: &Client,
    disk: &str,
    image: &[u8],
    from: u64,
    to: u64,
) -> (u64, u64, Vec<String>) {
    super::read_span(c, disk, image, (from, to), 64 << 10).await
}

async fn nbd_origin(ctx: &Ctx, k: &mut Checks) -> anyhow::Result<()> {
    if !super::have("nbdkit") {
        k.skip("nbdkit is not installed (apt-get install nbdkit)");
        return Ok(());
    }
    let img = ctx.dir.join("img.raw");
    let image = super::image(&img, 16 << 20, 41);
    let local = ctx.dir.join("local.raw");
    let local_image = super::image(&local, 4 << 20, 42);
    let trigger = ctx.dir.join("fail-now");
    let fsock = ctx.dir.join("failing.sock");
    let mut failing = Kit::start(
        &fsock,
        &[
            "--filter=error".into(),
            "file".into(),
            img.display().to_string(),
            "error=EIO".into(),
            "error-pread-rate=100%".into(),
            format!("error-pread-file={}", trigger.display()),
        ],
    )?;
    let ssock = ctx.dir.join("slow.sock");
    let _slow = Kit::start(
        &ssock,
        &[
            "--filter=delay".into(),
            "file".into(),
            img.display().to_string(),
            "delay-read=40ms".into(),
        ],
    )?;
    let node = Host::local(
        ctx,
        "s",
        Settings::default(),
        None,
        &[
            format!("--disk=nbd=nbd+unix:///?socket={},sealed", fsock.display()),
            format!("--disk=slow=nbd+unix:///?socket={},sealed", ssock.display()),
            format!("--disk=local={},sealed", local.display()),
            "--ram-cache=64MiB".into(),
            "--ssd-cache=0".into(),
        ],
    );
    let c = node.client().await?;
    // Region 0-4 MiB: read while the origin is well; cached.
    let (right, wrong, failed) = read_range(&c, "nbd", &image, 0, 4 * MIB).await;
    anyhow::ensure!(
        wrong == 0 && failed.is_empty() && right > 0,
        "warm-up failed: {failed:?}"
    );

    // Fails: every read of the origin returns EIO while the trigger exists.
    std::fs::write(&trigger, b"")?;
    let (r_fail, w_fail, f_fail) = read_range(&c, "nbd", &image, 4 * MIB, 8 * MIB).await;
    let (r_cached, w_cached, f_cached) = read_range(&c, "nbd", &image, 0, 4 * MIB).await;
    std::fs::remove_file(&trigger)?;
    let (r_back, w_back, f_back) = read_range(&c, "nbd", &image, 4 * MIB, 8 * MIB).await;
    k.figure("failing_reads_failed", f_fail.len() as u64);
    k.figure("failing_reads_served", r_fail);
    k.figure("failing_error", f_fail.first().cloned().unwrap_or_default());
    k.figure("cached_reads_while_failing", r_cached);
    k.check(w_fail + w_cached + w_back == 0, || {
        format!("wrong bytes: {w_fail} failing, {w_cached} cached, {w_back} after")
    });
    k.check(
        r_fail == 0
            && f_fail.iter().all(|m| {
                m.starts_with("Unavailable:") && m.contains("origin") && m.contains("EIO")
            }),
        || {
            format!(
                "reads of a failing origin: {r_fail} served, errors {:?}",
                &f_fail[..f_fail.len().min(3)]
            )
        },
    );
    k.check(f_cached.is_empty(), || {
        format!("cached blocks failed with the origin: {f_cached:?}")
    });
    k.check(f_back.is_empty() && r_back == 64, || {
        format!("after the origin recovered: {r_back} right, {f_back:?}")
    });

    // Stalls: nbdkit stopped; a cold read waits; cached and other disks do not. The same
    // reads are timed first with the origin well, as the baseline.
    let _ = read_range(&c, "local", &local_image, 0, 4 * MIB).await;
    let t = Instant::now();
    let _ = read_range(&c, "local", &local_image, 0, 4 * MIB).await;
    let _ = read_range(&c, "nbd", &image, 0, 4 * MIB).await;
    let baseline_ms = ms(t.elapsed());
    failing.signal("STOP")?;
    let stalled_at = Instant::now();
    let cold = {
        let c = node.client().await?;
        let want = image[(8 * MIB) as usize..(8 * MIB + 65536) as usize].to_vec();
        tokio::spawn(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(90),
                c.disk("nbd").read_at(8 * MIB, 65536),
            )
            .await;
            let r = match r {
                Ok(r) => r.map(|b| b[..] == want[..]).map_err(|e| failure(&e)),
                Err(_) => Err("no answer in 90 s".to_string()),
            };
            (Instant::now(), r)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let (r_other, w_other, f_other) = read_range(&c, "local", &local_image, 0, 4 * MIB).await;
    let (r_hot, w_hot, f_hot) = read_range(&c, "nbd", &image, 0, 4 * MIB).await;
    let others_ms = ms(t.elapsed());
    tokio::time::sleep(ctx.phase.saturating_sub(stalled_at.elapsed())).await;
    let cont_at = Instant::now();
    failing.signal("CONT")?;
    let (done_at, cold_result) = cold.await?;
    k.figure("stall_ms", ms(cont_at - stalled_at));
    k.figure("stalled_read_ms", ms(done_at - stalled_at));
    k.figure("other_reads_during_stall_ms", others_ms);
    k.figure("other_reads_before_stall_ms", baseline_ms);
    k.check(cold_result == Ok(true), || {
        format!("the read held by the stall: {cold_result:?}")
    });
    k.check(
        w_other + w_hot == 0 && f_other.is_empty() && f_hot.is_empty() && r_other + r_hot == 128,
        || {
            format!(
                "reads of other disks and cached blocks during the stall: {f_other:?} {f_hot:?}"
            )
        },
    );
    k.check(others_ms <= 5.0 * baseline_ms + 250.0, || {
        format!(
            "128 reads of other disks and cached blocks took {others_ms} ms during a stall, \
             {baseline_ms} ms before it"
        )
    });

    // Goes away and comes back: nbdkit killed, then started again on the same socket.
    failing.kill();
    let (r_gone, w_gone, f_gone) = read_range(&c, "nbd", &image, 12 * MIB, 13 * MIB).await;
    k.figure("gone_error", f_gone.first().cloned().unwrap_or_default());
    k.check(r_gone == 0 && w_gone == 0 && f_gone.len() == 16, || {
        format!("reads with the origin gone: {r_gone} right, {w_gone} wrong, {f_gone:?}")
    });
    let restarted = Instant::now();
    failing.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let back_ms;
    loop {
        let (r, w, f) = read_range(&c, "nbd", &image, 12 * MIB, 12 * MIB + 65536).await;
        k.check(w == 0, || "wrong bytes once the origin came back".into());
        if r == 1 && f.is_empty() {
            back_ms = ms(restarted.elapsed());
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the origin was not used again in 30 s: {f:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    k.figure("back_after_origin_restart_ms", back_ms);
    let (r_all, w_all, f_all) = read_range(&c, "nbd", &image, 0, 16 * MIB).await;
    k.check(w_all == 0 && f_all.is_empty() && r_all == 256, || {
        format!("the whole disk once back: {r_all} right, {w_all} wrong, {f_all:?}")
    });

    // Slow: 40 ms a read at the origin; cold reads pay it once, then hit.
    let t = Instant::now();
    let (r_slow, w_slow, f_slow) = read_range(&c, "slow", &image, 0, 2 * MIB).await;
    let cold_ms = ms(t.elapsed()) / 32.0;
    let t = Instant::now();
    let (r_warm, w_warm, f_warm) = read_range(&c, "slow", &image, 0, 2 * MIB).await;
    let warm_ms = ms(t.elapsed()) / 32.0;
    k.figure("slow_origin_cold_read_ms", super::round(cold_ms));
    k.figure("slow_origin_cached_read_ms", super::round(warm_ms));
    k.check(
        w_slow + w_warm == 0 && f_slow.is_empty() && f_warm.is_empty() && r_slow + r_warm == 64,
        || format!("a slow origin: {f_slow:?} {f_warm:?}"),
    );
    k.check(cold_ms >= 40.0 && warm_ms < cold_ms / 4.0, || {
        format!("a slow origin: cold {cold_ms} ms, cached {warm_ms} ms a read")
    });
    Ok(())
}

//! A boot storm on four node processes (owner `o` of the sealed replica, members `m1` to
//! `m3`, two readers each, RAM caches smaller than the replica so that reads keep missing and
//! blocks keep moving between members), with one fault in the middle of it:
//!
//! - `storm-kill-reader`: `m3` is killed (SIGKILL);
//! - `storm-stop-home`: `m3`, home of about a third of the blocks, is stopped (SIGSTOP) past
//!   the failure-detection bound, then continued;
//! - `storm-kill-owner`: the owner is killed, then started again on its data directory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{
    Checks, Ctx, Fut, Host, ReadPlan, Readers, Scenario, Settings, formed, messages, ms, tally,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    KillMember,
    StopMember,
    KillOwner,
    StopOwner,
}

fn kill_reader<'a>(c: &'a Ctx, k: &'a mut Checks) -> Fut<'a> {
    Box::pin(storm(c, k, Victim::KillMember))
}
fn stop_home<'a>(c: &'a Ctx, k: &'a mut Checks) -> Fut<'a> {
    Box::pin(storm(c, k, Victim::StopMember))
}
fn kill_owner<'a>(c: &'a Ctx, k: &'a mut Checks) -> Fut<'a> {
    Box::pin(storm(c, k, Victim::KillOwner))
}
fn stop_owner<'a>(c: &'a Ctx, k: &'a mut Checks) -> Fut<'a> {
    Box::pin(storm(c, k, Victim::StopOwner))
}

pub(super) fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "storm-kill-reader",
            guarantee: "a member killed in a boot storm costs the others no failed read, and \
                        leaves every block map within the failure-detection bound",
            run: kill_reader,
        },
        Scenario {
            name: "storm-stop-home",
            guarantee: "a block's home stopped (SIGSTOP) in a boot storm costs the others no \
                        failed read, only time up to the RPC deadline, and leaves every block \
                        map within the failure-detection bound; continued, it serves again",
            run: stop_home,
        },
        Scenario {
            name: "storm-kill-owner",
            guarantee: "with the owner killed, members answer with clear errors and never a \
                        wrong byte; started again, the owner serves every member again",
            run: kill_owner,
        },
        Scenario {
            name: "storm-stop-owner",
            guarantee: "with the owner stopped (SIGSTOP), members answer with their cached \
                        blocks, clear errors or late right bytes, never a wrong byte; \
                        continued, it serves every member again",
            run: stop_owner,
        },
    ]
}

const DISK: &str = "replica";

async fn storm(ctx: &Ctx, k: &mut Checks, victim: Victim) -> anyhow::Result<()> {
    let settings = Settings::default();
    let bound = settings.detection_bound();
    let size = 32usize << 20;
    let path = ctx.dir.join("replica.raw");
    let image = super::image(&path, size, 17);
    let mut o = Host::local(
        ctx,
        "o",
        settings,
        None,
        &[
            format!("--disk={DISK}={},sealed", path.display()),
            "--ram-cache=64MiB".into(),
            "--ssd-cache=0".into(),
        ],
    );
    let small = ["--ram-cache=8MiB".to_string(), "--ssd-cache=0".to_string()];
    let members: Vec<Host> = ["m1", "m2", "m3"]
        .iter()
        .map(|id| Host::local(ctx, id, settings, Some(&o.addr), &small))
        .collect();
    for h in std::iter::once(&o).chain(&members) {
        super::until(
            h,
            "four members and the replica",
            Duration::from_secs(30),
            |s| formed(s, 4, DISK, "o"),
        )
        .await?;
    }
    let plan = ReadPlan {
        disk: DISK.into(),
        image: image.clone(),
        read_bytes: 64 << 10,
        readers: 2,
        max_reads: 200_000,
        pause: Duration::ZERO,
    };
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for (i, m) in members.iter().enumerate() {
        readers.push(Readers::start(m, i, &plan, t0, stop.clone(), i as u64 + 1).await?);
    }
    // The storm runs a phase; then m3 must be in the block maps the others hold.
    tokio::time::sleep(ctx.phase).await;
    // (The owner holds no block maps: members ask it for what no member holds.)
    let owner_fault = matches!(victim, Victim::KillOwner | Victim::StopOwner);
    if !owner_fault {
        for h in [&members[0], &members[1]] {
            super::until(h, "a block map of m3", Duration::from_secs(20), |s| {
                covers(s, "m3")
            })
            .await?;
        }
    }
    let old_boot = members[0]
        .status()
        .await?
        .members
        .iter()
        .find(|m| m.id == "o")
        .map(|m| m.boot);
    let fault_at = t0.elapsed();
    match victim {
        Victim::KillMember => members[2].signal("KILL")?,
        Victim::StopMember => members[2].signal("STOP")?,
        Victim::KillOwner => o.process.kill(),
        Victim::StopOwner => o.signal("STOP")?,
    }
    k.figure("fault_at_ms", ms(fault_at));
    k.figure("detection_bound_ms", ms(bound));
    let survivors_end;
    if owner_fault {
        // The members answer without the owner for a phase; then it starts again (or goes
        // on, after SIGCONT).
        tokio::time::sleep(ctx.phase).await;
        let restart_at = t0.elapsed();
        if victim == Victim::KillOwner {
            o.process.start_again();
        } else {
            o.signal("CONT")?;
        }
        k.figure("owner_back_at_ms", ms(restart_at));
        // Back when every member lists the owner (a new incarnation after a kill) and the
        // replica; the readers go on a while more.
        let back_deadline = Instant::now() + Duration::from_secs(30);
        for m in &members {
            super::until(
                m,
                "the owner and its replica back",
                Duration::from_secs(30),
                |s| {
                    formed(s, 4, DISK, "o")
                        && (victim == Victim::StopOwner
                            || s.members
                                .iter()
                                .any(|x| x.id == "o" && Some(x.boot) != old_boot))
                },
            )
            .await?;
        }
        let back_at = t0.elapsed();
        k.figure(
            "owner_back_in_every_members_view_ms",
            ms(back_at - restart_at),
        );
        k.check(Instant::now() < back_deadline, || {
            "the owner was not back in 30 s".into()
        });
        tokio::time::sleep(ctx.phase * 2).await;
        stop.store(true, Ordering::Relaxed);
        let mut ops = Vec::new();
        for r in readers {
            ops.extend(r.finish().await?);
        }
        let before = tally(ops.iter().filter(|op| op.end < fault_at));
        let without = tally(
            ops.iter()
                .filter(|op| op.start > fault_at && op.start < restart_at),
        );
        // Reads that began once every member saw the owner again, a second after.
        let settled = back_at + Duration::from_secs(1);
        let after = tally(ops.iter().filter(|op| op.start > settled));
        let wrong = tally(ops.iter()).wrong;
        k.figure("reads_before_kill", serde_json::to_value(before)?);
        k.figure("reads_without_owner", serde_json::to_value(without)?);
        k.figure("reads_after_owner_back", serde_json::to_value(after)?);
        let msgs = messages(ops.iter(), 6);
        k.figure("errors_seen", msgs.clone());
        k.check(wrong == 0, || format!("{wrong} reads returned wrong bytes"));
        k.check(before.failed == 0 && before.reads > 0, || {
            format!("reads failed while the owner lived: {before:?}")
        });
        k.check(after.failed == 0 && after.reads > 0, || {
            format!("reads failed after the owner was back: {after:?}")
        });
        k.check(
            msgs.iter().all(|m| {
                ["Unavailable:", "NotFound:", "DeadlineExceeded:"]
                    .iter()
                    .any(|c| m.starts_with(c))
                    && m.len() > 20
            }),
            || format!("unclear errors without the owner: {msgs:?}"),
        );
        survivors_end = t0.elapsed();
    } else {
        // How long until m3 is out of the members and block maps of every other node (all
        // three watched at once).
        let watch = |h: &'static str, c: shadowcache_client::Client| async move {
            let deadline = Instant::now() + bound * 4 + Duration::from_secs(5);
            loop {
                let s = super::within(Duration::from_secs(10), "status", c.status()).await?;
                if !s.members.iter().any(|m| m.id == "m3") && !covers(&s, "m3") {
                    return Ok::<_, anyhow::Error>((h.to_string(), t0.elapsed() - fault_at));
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{h} still lists m3 {:?} after the fault",
                    t0.elapsed() - fault_at
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        };
        let gone = futures::future::try_join_all([
            watch("o", o.client().await?),
            watch("m1", members[0].client().await?),
            watch("m2", members[1].client().await?),
        ])
        .await?;
        let worst = gone.iter().map(|g| g.1).max().unwrap_or_default();
        k.figure(
            "out_of_block_maps_ms",
            gone.iter()
                .map(|(id, d)| (id.clone(), ms(*d).into()))
                .collect::<serde_json::Map<_, _>>(),
        );
        // A second of slack: heartbeats arrive later than the gossip interval on a loaded
        // machine, and chitchat measures the mean interval it saw.
        k.check(worst <= bound + Duration::from_secs(1), || {
            format!(
                "m3 stayed in a block map {} ms, past the bound of {} ms and a second",
                ms(worst),
                ms(bound)
            )
        });
        tokio::time::sleep(ctx.phase).await;
        if victim == Victim::StopMember {
            let cont_at = t0.elapsed();
            members[2].signal("CONT")?;
            for h in [&o, &members[0], &members[1]] {
                super::until(h, "m3 back", Duration::from_secs(30), |s| {
                    s.members.iter().any(|m| m.id == "m3")
                })
                .await?;
            }
            k.figure("m3_back_after_cont_ms", ms(t0.elapsed() - cont_at));
            tokio::time::sleep(ctx.phase).await;
            stop.store(true, Ordering::Relaxed);
            let mut ops = Vec::new();
            for r in readers {
                ops.extend(r.finish().await?);
            }
            let m3 = tally(ops.iter().filter(|op| op.host == 2 && op.start > cont_at));
            k.figure("m3_reads_after_cont", serde_json::to_value(m3)?);
            k.check(m3.wrong == 0 && m3.reads > 0, || {
                format!("m3 after SIGCONT: {m3:?}")
            });
            survivors(k, &ops, fault_at, &settings);
        } else {
            stop.store(true, Ordering::Relaxed);
            let mut ops = Vec::new();
            for r in readers {
                ops.extend(r.finish().await?);
            }
            survivors(k, &ops, fault_at, &settings);
        }
        survivors_end = t0.elapsed();
    }
    k.figure("run_ms", ms(survivors_end));
    Ok(())
}

/// The checks on m1 and m2's reads around a fault of m3.
fn survivors(k: &mut Checks, ops: &[super::ReadOp], fault_at: Duration, s: &Settings) {
    let before = tally(ops.iter().filter(|op| op.host < 2 && op.end < fault_at));
    let after = tally(ops.iter().filter(|op| op.host < 2 && op.end >= fault_at));
    k.figure(
        "survivor_reads_before_fault",
        serde_json::to_value(before).unwrap_or_default(),
    );
    k.figure(
        "survivor_reads_after_fault",
        serde_json::to_value(after).unwrap_or_default(),
    );
    k.figure(
        "survivor_errors",
        messages(ops.iter().filter(|op| op.host < 2), 4),
    );
    for (what, t) in [("before", before), ("after", after)] {
        k.check(t.reads > 0 && t.failed == 0 && t.wrong == 0, || {
            format!("reads at m1 and m2 {what} the fault: {t:?}")
        });
    }
    // A read waits at most one RPC deadline for the lost member, then goes elsewhere; two
    // deadlines of slack for a loaded machine.
    let limit = (3 * s.rpc_timeout_ms) as f64 + 1000.0;
    k.check(after.max_ms <= limit, || {
        format!(
            "a read at m1 or m2 took {} ms after the fault (limit {limit} ms)",
            after.max_ms
        )
    });
}

fn covers(s: &shadowcache_client::StatusResponse, member: &str) -> bool {
    s.disks.iter().filter(|d| d.id == DISK).any(|d| {
        d.coverage
            .iter()
            .any(|c| c.member == member && c.blocks > 0)
    })
}

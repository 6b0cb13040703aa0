//! `shadowcache-bench nbd`: fio's nbd engine against, in one run and on the same bytes:
//! (a) `qemu-nbd` serving the raw image, (b) `nbdkit file` on it, (c) `nbdkit memory` holding
//! the same bytes, and shadowcache serving the image (d) from RAM hits, (e) from SSD hits, (f)
//! cold, every read from the origin. For 4 KiB random reads at QD 1 and 32 with one and two
//! connections, and 1 MiB sequential reads. Prints IOPS, bandwidth, p50/p99 latency, and for
//! (d), (e), (f) each figure as a ratio to (c) and to (a). Then a cold read at a member: one
//! pass of 1 MiB sequential reads over a sealed disk that only its owner (another node
//! process) holds, side by side with one pass over qemu-nbd. Asserts nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use shadowcache_testkit::{NodeProcess, wait_for};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Image size.
    pub image_bytes: u64,
    /// Seconds per measured run (each after a warm pass of a third of it).
    pub seconds: u64,
    /// Only the cold read at a member, beside qemu-nbd.
    pub cold_member_only: bool,
    /// The cold member's `--read-ahead`, one member per setting (`None`: the node's default).
    pub member_read_aheads: Vec<Option<u64>>,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One server under test: its NBD URI and whatever keeps it alive.
struct Server {
    name: &'static str,
    uri: String,
    _child: Option<Killed>,
    _node: Option<NodeProcess>,
}

fn need(tool: &str, package: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(tool))
                .find(|p| p.is_file())
        })
        .with_context(|| format!("{tool} is not installed (apt-get install {package})"))
}

fn wait_socket(path: &Path) {
    wait_for("an nbd socket", Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(path).ok()
    });
}

fn spawn(cmd: &mut Command) -> anyhow::Result<Killed> {
    Ok(Killed(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("{cmd:?}"))?,
    ))
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A workload: name, fio arguments.
fn workloads() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        (
            "4k rand QD1 1c",
            vec!["--rw=randread", "--bs=4k", "--iodepth=1", "--numjobs=1"],
        ),
        (
            "4k rand QD1 2c",
            vec!["--rw=randread", "--bs=4k", "--iodepth=1", "--numjobs=2"],
        ),
        (
            "4k rand QD32 1c",
            vec!["--rw=randread", "--bs=4k", "--iodepth=32", "--numjobs=1"],
        ),
        (
            "4k rand QD32 2c",
            vec!["--rw=randread", "--bs=4k", "--iodepth=32", "--numjobs=2"],
        ),
        (
            "1M seq QD8 1c",
            vec!["--rw=read", "--bs=1m", "--iodepth=8", "--numjobs=1"],
        ),
    ]
}

fn fio(fio: &Path, uri: &str, size: u64, args: &[&str], seconds: u64) -> anyhow::Result<Value> {
    fio_in(fio, uri, size, args, seconds, None)
}

/// [`fio`] with `HOME` set to `home`: libnbd takes TLS certificates from `$HOME/.pki/libnbd`
/// (fio does not let a URI name a certificate directory).
fn fio_in(
    fio: &Path,
    uri: &str,
    size: u64,
    args: &[&str],
    seconds: u64,
    home: Option<&Path>,
) -> anyhow::Result<Value> {
    let mut cmd = Command::new(fio);
    if let Some(h) = home {
        cmd.env("HOME", h);
    }
    let out = run(cmd
        .arg("--name=b")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg(format!("--size={size}"))
        .args(args)
        .arg("--group_reporting")
        .arg("--time_based")
        .arg(format!("--runtime={seconds}"))
        .arg("--lat_percentiles=1")
        .arg("--output-format=json"))?;
    let v: Value = serde_json::from_str(&out[out.find('{').context("fio printed no JSON")?..])?;
    let r = &v["jobs"][0]["read"];
    let pct = |p: &str| {
        r["lat_ns"]["percentile"][p]
            .as_f64()
            .or_else(|| r["clat_ns"]["percentile"][p].as_f64())
            .unwrap_or(0.0)
            / 1000.0
    };
    Ok(json!({
        "iops": r["iops"].as_f64().unwrap_or(0.0).round(),
        "mb_s": (r["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6 * 10.0).round() / 10.0,
        "p50_us": pct("50.000000"),
        "p99_us": pct("99.000000"),
    }))
}

/// NBD over TLS on TCP, side by side: `nbdkit --tls=require` serving the image file, and a node
/// with `[nbd_tls]` serving it from RAM (warmed over its Unix socket, where TLS is offered but
/// not required). Both with the same certificate, both read by fio through `nbds://` URIs.
fn tls_rows(
    dir: &Path,
    image: &Path,
    size: u64,
    fio_bin: &Path,
    nbdkit: &Path,
    nbdcopy: &Path,
    seconds: u64,
) -> anyhow::Result<Value> {
    let pki = shadowcache_testkit::TestPki::new(&dir.join("tls"));
    let (cert, key) = pki.member("server", "localhost");
    let certs = dir.join("tls-certs");
    std::fs::create_dir_all(&certs)?;
    std::fs::copy(&pki.ca, certs.join("ca-cert.pem"))?;
    std::fs::copy(&cert, certs.join("server-cert.pem"))?;
    std::fs::copy(&key, certs.join("server-key.pem"))?;
    let kit_port = shadowcache_testkit::free_port();
    let _kit = spawn(
        Command::new(nbdkit)
            .args(["-f", "-r", "--tls=require"])
            .arg(format!("--tls-certificates={}", certs.display()))
            .args(["-i", "127.0.0.1", "-p"])
            .arg(kit_port.to_string())
            .arg("file")
            .arg(image),
    )?;
    let node_port = shadowcache_testkit::free_port();
    let config = dir.join("tls-node.toml");
    std::fs::write(
        &config,
        format!(
            "[nbd_tls]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )?;
    let data = dir.join("tls-node");
    let _node = NodeProcess::start(
        &data,
        &[
            "--node-id=tls".into(),
            format!("--config={}", config.display()),
            format!("--nbd-listen=127.0.0.1:{node_port}"),
            format!("--ram-cache={}", size * 3),
            "--ssd-cache=0".into(),
            format!("--disk=img={},sealed", image.display()),
        ],
    );
    wait_for("the TLS listeners", Duration::from_secs(30), || {
        [kit_port, node_port]
            .iter()
            .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
            .then_some(())
    });
    let plain = format!("nbd+unix:///img?socket={}", data.join("nbd.sock").display());
    for _ in 0..2 {
        run(Command::new(nbdcopy).arg(&plain).arg("null:"))?;
    }
    let home = dir.join("tls-home");
    std::fs::create_dir_all(home.join(".pki/libnbd"))?;
    std::fs::copy(&pki.ca, home.join(".pki/libnbd/ca-cert.pem"))?;
    let servers = [
        ("nbdkit file (TLS)", format!("nbds://localhost:{kit_port}/")),
        (
            "shadowcache RAM hits (TLS)",
            format!("nbds://localhost:{node_port}/img"),
        ),
    ];
    let mut rows = Vec::new();
    println!();
    println!("NBD over TLS on TCP (both with the same certificate)");
    for (w, args) in workloads()
        .into_iter()
        .filter(|(w, _)| *w == "4k rand QD32 1c" || *w == "1M seq QD8 1c")
    {
        let mut row = serde_json::Map::new();
        for (name, uri) in &servers {
            eprintln!("{w}: {name} ...");
            fio_in(fio_bin, uri, size, &args, (seconds / 3).max(1), Some(&home))?;
            row.insert(
                name.to_string(),
                fio_in(fio_bin, uri, size, &args, seconds, Some(&home))?,
            );
        }
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
        let (kit, ours) = (&row[servers[0].0], &row[servers[1].0]);
        println!(
            "  {w:<16} nbdkit {:>9.0} IOPS {:>8.1} MB/s   shadowcache {:>9.0} IOPS {:>8.1} MB/s   ratio {:.2}x IOPS",
            f(kit, "iops"),
            f(kit, "mb_s"),
            f(ours, "iops"),
            f(ours, "mb_s"),
            f(ours, "iops") / f(kit, "iops").max(1e-9)
        );
        rows.push(json!({"workload": w, "servers": row}));
    }
    Ok(Value::Array(rows))
}

/// One pass of 1 MiB sequential reads over the whole export at QD 8 (not time-based): for a
/// cold member each block is read once, so this is its cold read rate.
fn fio_pass(fio: &Path, uri: &str, size: u64) -> anyhow::Result<Value> {
    let t = std::time::Instant::now();
    let out = run(Command::new(fio)
        .arg("--name=b")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg(format!("--size={size}"))
        .args(["--rw=read", "--bs=1m", "--iodepth=8", "--numjobs=1"])
        .arg("--lat_percentiles=1")
        .arg("--output-format=json"))?;
    let secs = t.elapsed().as_secs_f64();
    let v: Value = serde_json::from_str(&out[out.find('{').context("fio printed no JSON")?..])?;
    let r = &v["jobs"][0]["read"];
    let pct = |p: &str| r["lat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(json!({
        "mb_s": (r["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6 * 10.0).round() / 10.0,
        "p50_us": pct("50.000000"),
        "p99_us": pct("99.000000"),
        "wall_s": (secs * 100.0).round() / 100.0,
    }))
}

/// A cold member: an owner node with the image sealed, a member node that has read nothing
/// of it; one pass at the member right after one pass at qemu-nbd, and the member's rates
/// divided by that pass's (qemu-nbd's own rate moves by 2x between passes on a shared
/// machine, so each member is compared with its own pair). With several `read_aheads`, one
/// fresh member per setting (`--read-ahead`; `None`: the node's default), in turn against the
/// same owner, each after a qemu-nbd pass of its own. Each member then reads the image a
/// second time, from its RAM: the rate a read-ahead that kept ahead of the reader would give.
fn cold_member(
    dir: &Path,
    image: &Path,
    size: u64,
    fio_bin: &Path,
    qemu_uri: &str,
    read_aheads: &[Option<u64>],
) -> anyhow::Result<Value> {
    let nbdinfo = need("nbdinfo", "libnbd-bin")?;
    let owner_port = shadowcache_testkit::free_peer_port();
    let owner_node = NodeProcess::start(
        &dir.join("owner"),
        &[
            "--node-id=owner".into(),
            format!("--peer-listen=127.0.0.1:{owner_port}"),
            format!("--disk=img={},sealed", image.display()),
        ],
    );
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let mut members = Vec::new();
    let mut qemu_passes = Vec::new();
    for (n, &read_ahead) in read_aheads.iter().enumerate() {
        eprintln!("cold member: qemu-nbd pass {} ...", n + 1);
        qemu_passes.push(fio_pass(fio_bin, qemu_uri, size)?);
        members.push(member_pass(
            &dir.join(format!("member-{n}")),
            n,
            read_ahead,
            (&owner_node, owner_port),
            (&nbdinfo, fio_bin),
            size,
        )?);
    }
    let qemu = qemu_passes.first().cloned().unwrap_or(Value::Null);
    println!();
    println!(
        "cold read at a member, 1 MiB sequential QD8, one pass over {} MiB",
        size >> 20
    );
    println!(
        "  {:<44} {:>9} {:>9} {:>9} {:>8} {:>9}",
        "server", "MB/s", "p50 µs", "p99 µs", "wall s", "÷ its qemu"
    );
    let row = |name: &str, v: &Value, q: &Value| {
        println!(
            "  {:<44} {:>9.1} {:>9.1} {:>9.1} {:>8.2} {:>8.2}x",
            name,
            f(v, "mb_s"),
            f(v, "p50_us"),
            f(v, "p99_us"),
            f(v, "wall_s"),
            f(v, "mb_s") / f(q, "mb_s").max(1e-9)
        )
    };
    for (m, q) in members.iter().zip(&qemu_passes) {
        row("qemu-nbd (origin file)", q, q);
        row(
            &format!("shadowcache member, cold ({})", m.label),
            &m.cold,
            q,
        );
        row(
            &format!("  the same member again, RAM ({})", m.label),
            &m.warm,
            q,
        );
    }
    let ratio_of = |v: &Value, q: &Value| f(v, "mb_s") / f(q, "mb_s").max(1e-9);
    let mut labels: Vec<&str> = members.iter().map(|m| m.label.as_str()).collect();
    labels.sort_unstable();
    labels.dedup();
    for label in labels {
        let mut r: Vec<f64> = members
            .iter()
            .zip(&qemu_passes)
            .filter(|(m, _)| m.label == label)
            .map(|(m, q)| ratio_of(&m.cold, q))
            .collect();
        r.sort_by(f64::total_cmp);
        println!(
            "  cold ÷ qemu-nbd, each against its own pass ({label}): median {:.2}x, {:.2}x to {:.2}x over {} pair(s)",
            r[r.len() / 2],
            r[0],
            r[r.len() - 1],
            r.len()
        );
    }
    for m in &members {
        for l in &m.lines {
            println!("{l}");
        }
    }
    let ratio = |v: &Value, q: &Value| (ratio_of(v, q) * 100.0).round() / 100.0;
    let first = members.first();
    Ok(json!({
        "qemu-nbd": qemu,
        // The first member's figures, as this bench gave them before it compared settings.
        "member_cold": first.map(|m| &m.cold),
        "ratio_mb_s": first.map(|m| ratio(&m.cold, &qemu)),
        "cpu_s_in_member_pass": first.map(|m| &m.cpu),
        "members": members.iter().zip(&qemu_passes).map(|(m, q)| json!({
            "setting": m.label,
            "read_ahead_bytes": m.read_ahead,
            "qemu-nbd": q,
            "cold": m.cold,
            "warm": m.warm,
            "cold_ratio_mb_s": ratio(&m.cold, q),
            "warm_ratio_mb_s": ratio(&m.warm, q),
            "cpu_s_in_cold_pass": m.cpu,
            "fetched_in_cold_pass": m.fetched,
        })).collect::<Vec<_>>(),
    }))
}

/// One member's passes of [`cold_member`].
struct MemberPass {
    label: String,
    read_ahead: Option<u64>,
    /// Its first pass, every block fetched.
    cold: Value,
    /// Its second pass, from its RAM.
    warm: Value,
    /// CPU of the owner and the member in the cold pass.
    cpu: serde_json::Map<String, Value>,
    /// What crossed the network in the cold pass, and what was read ahead.
    fetched: Value,
    /// The same, printed.
    lines: Vec<String>,
}

/// Starts member `n` (`--read-ahead` as given) against the owner, reads the image through it
/// twice, and stops it.
fn member_pass(
    member_dir: &Path,
    n: usize,
    read_ahead: Option<u64>,
    (owner_node, owner_port): (&NodeProcess, u16),
    (nbdinfo, fio_bin): (&Path, &Path),
    size: u64,
) -> anyhow::Result<MemberPass> {
    let member_port = shadowcache_testkit::free_peer_port();
    let metrics_port = shadowcache_testkit::free_peer_port();
    let mut args = vec![
        format!("--node-id=member-{n}"),
        format!("--peer-listen=127.0.0.1:{member_port}"),
        format!("--metrics=127.0.0.1:{metrics_port}"),
        format!("--seed=127.0.0.1:{owner_port}"),
        format!("--ram-cache={}", size * 2),
    ];
    if let Some(r) = read_ahead {
        args.push(format!("--read-ahead={r}"));
    }
    let member_node = NodeProcess::start(member_dir, &args);
    let uri = format!(
        "nbd+unix:///img?socket={}",
        member_dir.join("nbd.sock").display()
    );
    wait_for(
        "the member to serve the owner's disk",
        Duration::from_secs(60),
        || {
            Command::new(nbdinfo)
                .arg("--size")
                .arg(&uri)
                .output()
                .ok()
                .filter(|o| o.status.success())
        },
    );
    let label = match read_ahead {
        Some(r) => format!("read-ahead {} MiB", r >> 20),
        None => "default read-ahead".to_string(),
    };
    eprintln!("cold member: shadowcache member pass ({label}) ...");
    let nodes = [owner_node, &member_node];
    let before = nodes.map(|n| ThreadCpu::of(n.pid()));
    let cold = fio_pass(fio_bin, &uri, size)?;
    let after = nodes.map(|n| ThreadCpu::of(n.pid()));
    let body = shadowcache_testkit::http_get(metrics_port, "/metrics").unwrap_or_default();
    let m = |name: &str| shadowcache_testkit::metric(&body, name).unwrap_or(0.0);
    let fetched = json!({
        "owner_read_bytes": m("shadowcache_owner_read_bytes_total"),
        "peer_read_bytes": m("shadowcache_peer_read_bytes_total"),
        "read_ahead_blocks": m("shadowcache_read_ahead_blocks_total"),
        "read_ahead_used": m("shadowcache_read_ahead_used_total"),
    });
    let mut lines = vec![format!(
        "  member ({label}) fetched {:.0} MiB from the owner; {:.0} blocks read ahead, {:.0} of them taken by reads",
        m("shadowcache_owner_read_bytes_total") / 1048576.0,
        m("shadowcache_read_ahead_blocks_total"),
        m("shadowcache_read_ahead_used_total"),
    )];
    eprintln!("cold member: the same member again, from its RAM ...");
    let warm = fio_pass(fio_bin, &uri, size)?;
    let mut cpu = serde_json::Map::new();
    for (name, (b, a)) in ["owner", "member"].iter().zip(before.iter().zip(&after)) {
        let (Some(b), Some(a)) = (b, a) else {
            lines.push(format!("  {name} CPU: not readable (no /proc here)"));
            continue;
        };
        let d = a.since(b);
        lines.push(format!(
            "  {name} CPU in the cold pass ({label}): {:.2} s; busiest thread {:.2} s; by thread name: {}",
            d.total_s,
            d.busiest_s,
            d.by_name
                .iter()
                .map(|(n, (secs, threads))| format!("{n} {secs:.2} s over {threads}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        cpu.insert(name.to_string(), d.json());
    }
    Ok(MemberPass {
        label,
        read_ahead,
        cold,
        warm,
        cpu,
        fetched,
        lines,
    })
}

/// CPU seconds each thread of a process has used, from `/proc` (`schedstat`, which counts
/// nanoseconds; `stat`'s ticks at 100 a second where it is missing).
struct ThreadCpu(std::collections::HashMap<u32, (String, f64)>);

/// What a process used between two [`ThreadCpu`] readings.
struct CpuDelta {
    total_s: f64,
    busiest_s: f64,
    /// Seconds and threads by thread name, most first.
    by_name: Vec<(String, (f64, usize))>,
}

impl ThreadCpu {
    fn of(pid: Option<u32>) -> Option<ThreadCpu> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", pid?)).ok()?;
        let mut out = std::collections::HashMap::new();
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let dir = t.path();
            let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let secs = std::fs::read_to_string(dir.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
                .map(|ns| ns / 1e9)
                .or_else(|| {
                    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                    // Fields after the parenthesised name: utime and stime are the 12th and
                    // 13th.
                    let rest = &stat[stat.rfind(')')? + 1..];
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
                    Some(ticks / 100.0)
                });
            if let Some(secs) = secs {
                out.insert(tid, (name.trim().to_string(), secs));
            }
        }
        Some(ThreadCpu(out))
    }

    fn since(&self, before: &ThreadCpu) -> CpuDelta {
        let mut by_name: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
        let (mut total_s, mut busiest_s) = (0.0, 0.0f64);
        for (tid, (name, secs)) in &self.0 {
            let d = secs - before.0.get(tid).map_or(0.0, |b| b.1);
            if d <= 0.0 {
                continue;
            }
            total_s += d;
            busiest_s = busiest_s.max(d);
            let e = by_name.entry(name.clone()).or_default();
            e.0 += d;
            e.1 += 1;
        }
        let mut by_name: Vec<_> = by_name.into_iter().collect();
        by_name.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
        CpuDelta {
            total_s,
            busiest_s,
            by_name,
        }
    }
}

impl CpuDelta {
    fn json(&self) -> Value {
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        json!({
            "total": r(self.total_s),
            "busiest_thread": r(self.busiest_s),
            "by_thread_name": self.by_name.iter().map(|(n, (s, t))| json!({"name": n, "seconds": r(*s), "threads": t})).collect::<Vec<_>>(),
        })
    }
}

fn node(dir: &Path, image: &Path, name: &str, args: &[String]) -> anyhow::Result<Server> {
    let data = dir.join(name);
    let mut all = vec![format!("--node-id={name}")];
    all.extend_from_slice(args);
    let sealed = !args.iter().any(|a| a == "--cold");
    all.retain(|a| a != "--cold");
    all.push(format!(
        "--disk=img={}{}",
        image.display(),
        if sealed { ",sealed" } else { ",mutable" }
    ));
    let p = NodeProcess::start(&data, &all);
    let sock = data.join("nbd.sock");
    wait_socket(&sock);
    Ok(Server {
        name: match name {
            "ram" => "shadowcache RAM hits",
            "ssd" => "shadowcache SSD hits",
            _ => "shadowcache cold (origin)",
        },
        uri: format!("nbd+unix:///img?socket={}", sock.display()),
        _child: None,
        _node: Some(p),
    })
}

/// Runs every server and workload; prints the table; returns the figures.
pub async fn run_bench(opts: Options) -> anyhow::Result<Value> {
    let fio_bin = need("fio", "fio")?;
    let qemu_nbd = need("qemu-nbd", "qemu-utils")?;
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("image.raw");
    {
        use std::io::Write;
        let mix = crate::synthetic::Mix::default();
        let mut f = std::io::BufWriter::new(std::fs::File::create(&image)?);
        let mut at = 0;
        while at < opts.image_bytes {
            let n = (1u64 << 20).min(opts.image_bytes - at);
            f.write_all(&mix.read(at, n as usize))?;
            at += n;
        }
        f.flush()?;
    }
    let size = opts.image_bytes;
    let mut servers = Vec::new();
    // (a) qemu-nbd, (b) nbdkit file, (c) nbdkit memory filled with the same bytes.
    let qs = dir.path().join("qemu.sock");
    let q = spawn(
        Command::new(&qemu_nbd)
            .args(["-r", "-t", "-f", "raw", "-e", "4", "-k"])
            .arg(&qs)
            .arg(&image),
    )?;
    wait_socket(&qs);
    servers.push(Server {
        name: "qemu-nbd",
        uri: format!("nbd+unix:///?socket={}", qs.display()),
        _child: Some(q),
        _node: None,
    });
    // The cold member against qemu-nbd: alone with `--cold-member-only`, else after the rest.
    let qemu_uri = servers[0].uri.clone();
    let cold = || {
        cold_member(
            dir.path(),
            &image,
            size,
            &fio_bin,
            &qemu_uri,
            &opts.member_read_aheads,
        )
    };
    if opts.cold_member_only {
        return Ok(json!({"benchmark": "nbd", "image_bytes": size, "cold_member": cold()?}));
    }
    let nbdkit = need("nbdkit", "nbdkit")?;
    let nbdcopy = need("nbdcopy", "libnbd-bin")?;
    let fs = dir.path().join("file.sock");
    let k = spawn(
        Command::new(&nbdkit)
            .args(["-f", "-r", "-U"])
            .arg(&fs)
            .arg("file")
            .arg(&image),
    )?;
    wait_socket(&fs);
    servers.push(Server {
        name: "nbdkit file",
        uri: format!("nbd+unix:///?socket={}", fs.display()),
        _child: Some(k),
        _node: None,
    });
    let ms = dir.path().join("mem.sock");
    let m = spawn(
        Command::new(&nbdkit)
            .args(["-f", "-U"])
            .arg(&ms)
            .arg("memory")
            .arg(size.to_string()),
    )?;
    wait_socket(&ms);
    let mem_uri = format!("nbd+unix:///?socket={}", ms.display());
    run(Command::new(&nbdcopy).arg(&image).arg(&mem_uri))?;
    servers.push(Server {
        name: "nbdkit memory",
        uri: mem_uri,
        _child: Some(m),
        _node: None,
    });
    // (d) RAM hits: RAM for twice the image (a second read moves blocks to multi-touch).
    let ram = format!("--ram-cache={}", size * 3);
    servers.push(node(
        dir.path(),
        &image,
        "ram",
        &[ram, "--ssd-cache=0".into()],
    )?);
    // (e) SSD hits: 8 MiB of RAM, the image on the SSD tier, which takes every block RAM lets
    // go (this measures SSD hits, not which blocks earn a write).
    let all = dir.path().join("ssd-admission-all.toml");
    std::fs::write(&all, "[cache]\nssd_admission = \"all\"\n")?;
    servers.push(node(
        dir.path(),
        &image,
        "ssd",
        &[
            format!("--config={}", all.display()),
            "--ram-cache=8MiB".into(),
            format!("--ssd-cache={}", size * 3),
        ],
    )?);
    // (f) cold: a mutable disk is read from its origin every time.
    servers.push(node(dir.path(), &image, "cold", &["--cold".into()])?);
    // Warm the shadowcache tiers: two whole passes promote every block, and with 8 MiB of
    // RAM push them on to the SSD tier.
    for s in &servers[3..5] {
        for _ in 0..2 {
            run(Command::new(&nbdcopy)
                .arg("--connections=4")
                .arg(&s.uri)
                .arg("null:"))?;
        }
    }
    let mut table = Vec::new();
    for (w, args) in workloads() {
        let mut row = serde_json::Map::new();
        for s in &servers {
            eprintln!("{w}: {} ...", s.name);
            // One warm pass (a third of the run), then the measured run.
            fio(&fio_bin, &s.uri, size, &args, (opts.seconds / 3).max(1))?;
            row.insert(
                s.name.to_string(),
                fio(&fio_bin, &s.uri, size, &args, opts.seconds)?,
            );
        }
        table.push((w, row));
    }
    print_table(&table, &servers);
    let tls = tls_rows(
        dir.path(),
        &image,
        size,
        &fio_bin,
        &nbdkit,
        &nbdcopy,
        opts.seconds,
    )?;
    let cold = cold()?;
    let results: Vec<Value> = table
        .iter()
        .map(|(w, row)| json!({"workload": w, "servers": row}))
        .collect();
    Ok(json!({
        "benchmark": "nbd",
        "image_bytes": size,
        "seconds": opts.seconds,
        "results": results,
        "tls": tls,
        "cold_member": cold,
    }))
}

fn print_table(table: &[(&str, serde_json::Map<String, Value>)], servers: &[Server]) {
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    println!();
    for (w, row) in table {
        println!("{w}");
        println!(
            "  {:<28} {:>10} {:>9} {:>9} {:>9}   {:>27}   {:>27}",
            "server",
            "IOPS",
            "MB/s",
            "p50 µs",
            "p99 µs",
            "÷ nbdkit memory (IOPS MB/s p50)",
            "÷ qemu-nbd (IOPS MB/s p50)"
        );
        let mem = &row["nbdkit memory"];
        let qemu = &row["qemu-nbd"];
        for s in servers {
            let v = &row[s.name];
            let ratios = |base: &Value| {
                if s.name.starts_with("shadowcache") {
                    format!(
                        "{:>8.2} {:>8.2} {:>8.2}",
                        f(v, "iops") / f(base, "iops").max(1e-9),
                        f(v, "mb_s") / f(base, "mb_s").max(1e-9),
                        f(v, "p50_us") / f(base, "p50_us").max(1e-9)
                    )
                } else {
                    String::new()
                }
            };
            println!(
                "  {:<28} {:>10.0} {:>9.1} {:>9.1} {:>9.1}   {:>27}   {:>27}",
                s.name,
                f(v, "iops"),
                f(v, "mb_s"),
                f(v, "p50_us"),
                f(v, "p99_us"),
                ratios(mem),
                ratios(qemu)
            );
        }
    }
}

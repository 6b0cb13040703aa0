//! A cluster launcher: real `shadowcache-node` processes, each with its own data directory,
//! cache sizes and config, on loopback or (as root, `--netns`) each in its own network
//! namespace joined to a bridge by a veth pair, its link optionally limited with `tc ... tbf`.
//!
//! Teardown always happens:
//! - on drop (a normal end, an error, a panic): nodes get SIGTERM (SIGKILL after 10 s), the
//!   namespaces and the bridge are deleted, and the FORWARD rule that lets the bridge's frames
//!   through where Docker's br_netfilter would drop them ([`crate::netfilter`]);
//! - when the bench is killed outright (SIGKILL), a reaper process cleans up: a small `sh`
//!   in its own process group that the launcher tells, line by line, of every node process,
//!   namespace, link and FORWARD rule it creates, and that acts when its standard input reaches end of file,
//!   which happens when the last holder of the pipe (this process) is gone, however it died.
//!   Being in its own process group, a Ctrl-C at the terminal does not stop it before it acts.
//!
//! Nodes talk to the bench through Unix sockets in their data directories (the gRPC and the NBD
//! socket), which work across namespaces; metrics are scraped over HTTP at each node's address.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How the hosts are connected.
#[derive(Debug, Clone, Default)]
pub struct Network {
    /// Each node in its own network namespace behind a veth pair on a bridge (root only).
    pub netns: bool,
    /// Each host's link limited to this many bytes a second, both ways (`tc tbf`; needs
    /// `netns`).
    pub link_rate: Option<u64>,
}

/// One node to launch.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Node id (and host name in reports).
    pub id: String,
    /// The node's config file contents (TOML).
    pub config: String,
    /// Command-line arguments besides the data dir, node id, addresses and seed.
    pub args: Vec<String>,
}

/// A launched node.
#[derive(Debug)]
pub struct Launched {
    /// Node id.
    pub id: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its gRPC Unix socket.
    pub socket: PathBuf,
    /// Its NBD Unix socket.
    pub nbd_socket: PathBuf,
    /// Its Prometheus endpoint.
    pub metrics: SocketAddr,
    /// Its Peer address.
    pub peer: SocketAddr,
    child: Option<Child>,
}

impl Launched {
    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The node's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("node.log")).unwrap_or_default()
    }
}

/// A running cluster; dropping it tears everything down.
#[derive(Debug)]
pub struct Cluster {
    /// The nodes, in launch order.
    pub nodes: Vec<Launched>,
    namespaces: Vec<String>,
    links: Vec<String>,
    /// FORWARD rules letting the bridge's frames through (crate::netfilter), if it needed one.
    forward_rules: Vec<Vec<String>>,
    reaper: Option<(Child, ChildStdin)>,
}

/// The reaper: records what to remove, removes it when its input ends (see the module docs).
/// `done` means a clean teardown already removed everything.
/// What a node's log says when a port it was given is taken (the OS's text for EADDRINUSE).
const ADDR_IN_USE: &str = "Address already in use";

const REAPER: &str = r#"
pids=""; nss=""; links=""; fwds=""
while read -r kind arg; do
  case "$kind" in
    pid) pids="$pids $arg" ;;
    ns) nss="$nss $arg" ;;
    link) links="$links $arg" ;;
    fwd) fwds="$fwds $arg" ;;
    done) exit 0 ;;
  esac
done
for p in $pids; do kill -9 "$p" 2>/dev/null; done
sleep 0.2
for n in $nss; do ip netns delete "$n" 2>/dev/null; done
for l in $links; do ip link delete "$l" 2>/dev/null; done
for b in $fwds; do
  iptables -D FORWARD -i "$b" -o "$b" -m comment --comment "shadowcache-bench $b" -j ACCEPT 2>/dev/null
done
exit 0
"#;

/// The node program and the arguments before its flags: `SHADOWCACHE_NODE` if set, else the
/// `shadowcache-node` binary beside this executable (one directory up for a test binary in
/// `deps/`), else this executable's own `node` subcommand (`shadowcache-bench node`, the same
/// daemon: `cargo run -p shadowcache-bench` builds only the bench).
pub fn node_command() -> anyhow::Result<(PathBuf, Vec<String>)> {
    if let Some(p) = std::env::var_os("SHADOWCACHE_NODE") {
        return Ok((PathBuf::from(p), Vec::new()));
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join("shadowcache-node");
    if p.exists() {
        return Ok((p, Vec::new()));
    }
    let bench = dir.join("shadowcache-bench");
    if bench.exists() {
        return Ok((bench, vec!["node".into()]));
    }
    bail!(
        "{} is missing: build it first (cargo build --release -p shadowcache-node), or set SHADOWCACHE_NODE",
        p.display()
    )
}

/// The node flags that set `[origin_limit]` to `l`.
pub fn origin_limit_args(l: &shadowcache_node::origin::OriginLimit) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(rate) = l.read_bytes_per_s {
        args.push(format!("--origin-read-rate={rate}"));
    }
    if let Some(iops) = l.read_iops {
        args.push(format!("--origin-read-iops={iops}"));
    }
    if l.read_latency_ms > 0.0 {
        args.push(format!("--origin-read-latency-ms={}", l.read_latency_ms));
    }
    args
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args))
}

/// A short tag unique to this process, for namespace and link names (at most 15 bytes).
fn tag() -> String {
    format!("sc{:05}", std::process::id() % 100_000)
}

/// A 10.K.0.0/16 (K in 100..=199) that no route of this host uses yet, starting from one this
/// process's id picks, so that two storms at once (two tests) do not share a subnet.
fn free_subnet() -> u8 {
    let routes = Command::new("ip")
        .args(["-4", "route", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let start = std::process::id() % 100;
    (0..100)
        .map(|i| 100 + ((start + i) % 100) as u8)
        .find(|k| !routes.contains(&format!("10.{k}.")))
        .unwrap_or(100 + start as u8)
}

/// The name prefix of every namespace and link this process creates (for leak checks).
pub fn name_prefix() -> String {
    tag()
}

impl Cluster {
    fn reaper() -> anyhow::Result<(Child, ChildStdin)> {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(REAPER)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the cleanup process (sh)")?;
        let stdin = child.stdin.take().context("the reaper's stdin")?;
        Ok((child, stdin))
    }

    fn tell(&mut self, line: &str) {
        if let Some((_, stdin)) = &mut self.reaper {
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }

    /// Launches `specs` (the first is the seed every other joins) in `dir`, and waits until
    /// every node sees all members and `disk` (at most `timeout`).
    ///
    /// On loopback the ports are picked free and released before a node binds them, so another
    /// process can take one in between (seen with tests in parallel): a node that exits with
    /// "Address already in use" makes the whole cluster start again on fresh ports, up to three
    /// times in all.
    pub async fn launch(
        dir: &Path,
        specs: &[NodeSpec],
        net: &Network,
        disk: &str,
        timeout: Duration,
    ) -> anyhow::Result<Cluster> {
        let mut attempt = 1;
        loop {
            match Self::launch_once(dir, specs, net, disk, timeout).await {
                Err(e) if !net.netns && attempt < 3 && format!("{e:#}").contains(ADDR_IN_USE) => {
                    eprintln!(
                        "a port was taken before a node bound it (attempt {attempt} of 3); starting the cluster again on fresh ports"
                    );
                    for spec in specs {
                        let _ = std::fs::remove_dir_all(dir.join(&spec.id));
                    }
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    async fn launch_once(
        dir: &Path,
        specs: &[NodeSpec],
        net: &Network,
        disk: &str,
        timeout: Duration,
    ) -> anyhow::Result<Cluster> {
        if net.link_rate.is_some() && !net.netns {
            bail!("--link-rate limits each host's own link, so it needs --netns");
        }
        if net.netns {
            // Namespaces, veth pairs and bridges need root.
            let uid = Command::new("id").arg("-u").output().ok();
            let root = uid.is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
            if !root {
                bail!("--netns creates network namespaces, veth pairs and a bridge: run as root");
            }
        }
        let (binary, pre_args) = node_command()?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            namespaces: Vec::new(),
            links: Vec::new(),
            forward_rules: Vec::new(),
            reaper: Some(Self::reaper()?),
        };
        let subnet = if net.netns { free_subnet() } else { 0 };
        let addr_of = |i: usize| -> Ipv4Addr {
            Ipv4Addr::new(10, subnet, (i / 250) as u8, (i % 250 + 1) as u8)
        };
        let t = tag();
        if net.netns {
            let bridge = format!("{t}br");
            cluster.tell(&format!("link {bridge}"));
            cluster.links.push(bridge.clone());
            ip(&["link", "add", &bridge, "type", "bridge"])?;
            ip(&[
                "addr",
                "add",
                &format!("10.{subnet}.255.254/16"),
                "dev",
                &bridge,
            ])?;
            // Docker's br_netfilter would drop the frames between the namespaces.
            cluster.tell(&format!("fwd {bridge}"));
            if let Some(rule) = crate::netfilter::let_through(&bridge)? {
                cluster.forward_rules.push(rule);
            }
            ip(&["link", "set", &bridge, "up"])?;
        }
        let mut seed: Option<SocketAddr> = None;
        for (i, spec) in specs.iter().enumerate() {
            let data_dir = dir.join(&spec.id);
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            let config = data_dir.join("node.toml");
            std::fs::write(&config, &spec.config)?;
            let (peer, metrics, ns) = if net.netns {
                let ns = format!("{t}h{i}");
                let host_side = format!("{t}v{i}");
                let ns_side = format!("{t}p{i}");
                cluster.tell(&format!("ns {ns}"));
                cluster.namespaces.push(ns.clone());
                ip(&["netns", "add", &ns])?;
                ip(&[
                    "link", "add", &host_side, "type", "veth", "peer", "name", &ns_side,
                ])?;
                ip(&["link", "set", &ns_side, "netns", &ns])?;
                ip(&["link", "set", &host_side, "master", &format!("{t}br"), "up"])?;
                let a = addr_of(i);
                ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{a}/16"),
                    "dev",
                    &ns_side,
                ])?;
                ip(&["-n", &ns, "link", "set", &ns_side, "up"])?;
                ip(&["-n", &ns, "link", "set", "lo", "up"])?;
                if let Some(rate) = net.link_rate {
                    // Both directions of the host's link: into the namespace on the bridge
                    // side, out of it on the namespace side. The bucket holds 10 ms of rate
                    // (at least 64 KiB), so bursts stay short.
                    let burst = (rate / 100).max(64 << 10).to_string();
                    let rate_s = format!("{}bit", rate.saturating_mul(8));
                    let tbf = |dev: &str| -> Vec<String> {
                        [
                            "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate_s, "burst",
                            &burst, "latency", "100ms",
                        ]
                        .iter()
                        .map(|s| s.to_string())
                        .collect()
                    };
                    run(Command::new("tc").args(tbf(&host_side)))
                        .context("limiting the link (tc tbf; apt-get install iproute2)")?;
                    run(Command::new("ip")
                        .args(["netns", "exec", &ns, "tc"])
                        .args(tbf(&ns_side)))?;
                }
                (
                    SocketAddr::new(IpAddr::V4(a), 7400),
                    SocketAddr::new(IpAddr::V4(a), 9400),
                    Some(ns),
                )
            } else {
                (
                    SocketAddr::from(([127, 0, 0, 1], shadowcache_testkit::free_peer_port())),
                    SocketAddr::from(([127, 0, 0, 1], shadowcache_testkit::free_port())),
                    None,
                )
            };
            let mut cmd = match &ns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns]).arg(&binary);
                    c
                }
                None => Command::new(&binary),
            };
            cmd.args(&pre_args)
                .arg("--data-dir")
                .arg(&data_dir)
                .arg(format!("--config={}", config.display()))
                .arg(format!("--node-id={}", spec.id))
                .arg(format!("--peer-listen={peer}"))
                .arg(format!("--metrics={metrics}"))
                .args(&spec.args);
            if let Some(s) = seed {
                cmd.arg(format!("--seed={s}"));
            }
            let log = std::fs::File::create(data_dir.join("node.log"))?;
            {
                use std::os::unix::process::CommandExt;
                // Its own process group: a Ctrl-C reaches the bench, which stops the nodes in
                // order, rather than every node at once.
                cmd.process_group(0);
            }
            let child = cmd
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or("info".into()),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            cluster.tell(&format!("pid {}", child.id()));
            seed.get_or_insert(peer);
            cluster.nodes.push(Launched {
                id: spec.id.clone(),
                socket: data_dir.join("shadowcache.sock"),
                nbd_socket: data_dir.join("nbd.sock"),
                data_dir,
                metrics,
                peer,
                child: Some(child),
            });
        }
        cluster.wait_healthy(disk, timeout).await?;
        Ok(cluster)
    }

    /// Waits until every node answers on its socket and sees every member and `disk`.
    async fn wait_healthy(&mut self, disk: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let want = self.nodes.len();
        for i in 0..self.nodes.len() {
            loop {
                let n = &mut self.nodes[i];
                if let Some(status) = n.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    bail!(
                        "node {} exited with {status} at start; its log:\n{}",
                        n.id,
                        n.log()
                    );
                }
                let socket = n.socket.clone();
                let ok = async {
                    let c = shadowcache_client::Client::connect_unix(&socket)
                        .await
                        .ok()?;
                    let s = c.status().await.ok()?;
                    Some(s.members.len() == want && s.disks.iter().any(|d| d.id == disk))
                }
                .await;
                if ok == Some(true) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "the cluster was not healthy after {:?}: node {} does not see {want} members and disk {disk:?}; its log ends:\n{}",
                        timeout,
                        n.id,
                        tail(&n.log(), 2000)
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Stops every node (SIGTERM, then SIGKILL after 10 s) and removes namespaces and links.
    pub fn teardown(&mut self) {
        for n in &mut self.nodes {
            if let Some(c) = &n.child {
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                loop {
                    if c.try_wait().ok().flatten().is_some() {
                        break;
                    }
                    if Instant::now() > deadline {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        for ns in std::mem::take(&mut self.namespaces) {
            let _ = ip(&["netns", "delete", &ns]);
        }
        for l in std::mem::take(&mut self.links) {
            let _ = ip(&["link", "delete", &l]);
        }
        for rule in std::mem::take(&mut self.forward_rules) {
            crate::netfilter::delete(&rule);
        }
        self.tell("done");
        if let Some((mut child, stdin)) = self.reaper.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut at = s.len().saturating_sub(n);
    while !s.is_char_boundary(at) {
        at += 1;
    }
    &s[at..]
}

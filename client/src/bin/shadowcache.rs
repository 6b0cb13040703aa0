//! `shadowcache`: the operator's CLI for a node's Block and Admin services.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use shadowcache_client::{Client, DetectionAction, DiskInfo, DiskMode, StatusResponse};

#[derive(Debug, Parser)]
#[command(name = "shadowcache", version, about = "Talk to a shadowcache node")]
struct Cli {
    /// The node's Unix socket.
    #[arg(
        long,
        global = true,
        env = "SHADOWCACHE_SOCKET",
        default_value = "/var/lib/shadowcache/shadowcache.sock"
    )]
    socket: PathBuf,
    /// Use the node's TCP address instead of its socket.
    #[arg(long, global = true, value_name = "ADDR")]
    tcp: Option<String>,
    /// With --tcp: mutual TLS, trusting this CA certificate (PEM; the cluster's CA).
    #[arg(long, global = true, value_name = "FILE", requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
    /// With --ca: this client's certificate (PEM), signed by the CA.
    #[arg(long, global = true, value_name = "FILE", requires_all = ["ca", "key"])]
    cert: Option<PathBuf>,
    /// With --ca: this client's key (PEM).
    #[arg(long, global = true, value_name = "FILE", requires_all = ["ca", "cert"])]
    key: Option<PathBuf>,
    /// With --ca: the name in the node's certificate.
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        default_value = "shadowcache"
    )]
    server_name: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the node's disks.
    Disks,
    /// Show one disk.
    Stat {
        /// Disk id.
        disk: String,
    },
    /// Read a range of a disk to a file or stdout.
    Read {
        /// Disk id.
        disk: String,
        /// First byte.
        #[arg(long)]
        offset: u64,
        /// Bytes to read.
        #[arg(long)]
        length: u64,
        /// Write here instead of stdout.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Write a file or stdin to a disk at an offset, then flush.
    Write {
        /// Disk id.
        disk: String,
        /// First byte.
        #[arg(long)]
        offset: u64,
        /// Read from here instead of stdin.
        #[arg(short = 'i', long)]
        input: Option<PathBuf>,
    },
    /// Seal a disk: read-only for ever, served through the cache.
    Seal {
        /// Disk id.
        disk: String,
    },
    /// Never detect a disk (a detected one goes back to mutable first); kept across restarts.
    Pin {
        /// Disk id (owned by this node).
        disk: String,
    },
    /// Let detection run again on a pinned disk.
    Unpin {
        /// Disk id (owned by this node).
        disk: String,
    },
    /// Forget a member that claimed a disk id and left the cluster (remembered an hour, which
    /// keeps the id disputed); this node only: run it against each node.
    ForgetClaimant {
        /// Disk id.
        disk: String,
        /// The member's node id.
        member: String,
    },
    /// A detected disk goes back to mutable: every lease is revoked, caches stop serving it,
    /// and detection starts over.
    DropShadows {
        /// Disk id (owned by this node).
        disk: String,
    },
    /// Register a disk whose origin is a file or block device on the node's host.
    Register {
        /// Disk id.
        disk: String,
        /// Origin path on the node's host.
        origin: String,
        /// Mode.
        #[arg(long, value_parser = ["mutable", "sealed"], default_value = "mutable")]
        mode: String,
    },
    /// Cache tiers, hit ratios, dedup, certificates and disks.
    Status,
    /// Make the cluster's CA, cluster key and members' certificates (no node is contacted).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// A new cluster CA (`ca.pem`, `ca.key`) and cluster key (`cluster.key`, for
    /// `cluster.secret_file`) in DIR; private files 0600. Refuses to replace any of them.
    Init {
        /// Directory for the CA (created 0700).
        dir: PathBuf,
        /// The cluster's name, in the CA's subject.
        #[arg(long, default_value = "shadowcache")]
        cluster: String,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// A certificate and key (`NAME.pem`, `NAME.key`), signed by the CA in --ca: a member's
    /// for `[cluster.tls]` and `[nbd_tls]`, or a client's or an operator's for the TCP gRPC
    /// listener (--role).
    Issue {
        /// The CA's directory (from `certs init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The member's name (its node id); the certificate's CN and a DNS name in it.
        name: String,
        /// Another name it is valid for: a DNS name or an IP address (repeatable).
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// Where to write the files (default: the CA's directory).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 397)]
        days: u32,
        /// What it may do: `member` (a node: the Peer service, gossip, and other nodes' Block
        /// service), `client` (the Block service over `listen_tcp`) or `admin` (the Block and
        /// Admin services over `listen_tcp`).
        #[arg(long, default_value = "member", value_parser = shadowcache_proto::role::ALL)]
        role: String,
        /// A member's certificate that any node may present (one Secret for a DaemonSet's
        /// pods): without it, NAME must be the node id of the one member that presents it, and
        /// other members refuse its calls in another member's name.
        #[arg(long)]
        any_node: bool,
    },
}

fn unix_date(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map_or_else(|_| format!("@{secs}"), |t| t.date().to_string())
}

fn expiry_text(not_after_unix: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let left = not_after_unix - now;
    if left <= 0 {
        format!("EXPIRED {}", unix_date(not_after_unix))
    } else {
        format!(
            "{} ({} days left)",
            unix_date(not_after_unix),
            left / 86_400
        )
    }
}

fn certs(cmd: CertsCommand, json: bool) -> anyhow::Result<()> {
    use shadowcache_client::certs;
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    };
    match cmd {
        CertsCommand::Init { dir, cluster, days } => {
            let f = certs::init(&dir, &cluster, days)?;
            if json {
                println!(
                    "{}",
                    json!({"ca_cert": f.ca_cert, "ca_key": f.ca_key, "cluster_key": f.cluster_key, "not_after_unix": secs(f.not_after)})
                );
            } else {
                println!("CA certificate  {}", f.ca_cert.display());
                println!(
                    "CA key          {} (0600: keep it off the hosts)",
                    f.ca_key.display()
                );
                println!(
                    "cluster key     {} (0600: cluster.secret_file on every member)",
                    f.cluster_key.display()
                );
                println!("expires         {}", expiry_text(secs(f.not_after)));
            }
        }
        CertsCommand::Issue {
            ca,
            name,
            sans,
            out,
            days,
            role,
            any_node,
        } => {
            let out = out.unwrap_or_else(|| ca.clone());
            let f = certs::issue_for(&ca, &name, &sans, &out, days, &role, !any_node)?;
            if json {
                println!(
                    "{}",
                    json!({"cert": f.cert, "key": f.key, "names": f.names, "role": role, "not_after_unix": secs(f.not_after)})
                );
            } else {
                println!("certificate  {}", f.cert.display());
                println!("key          {} (0600)", f.key.display());
                println!("names        {}", f.names.join(", "));
                println!("role         {role}");
                println!("expires      {}", expiry_text(secs(f.not_after)));
            }
        }
    }
    Ok(())
}

fn mode_name(m: i32) -> &'static str {
    match DiskMode::try_from(m) {
        Ok(DiskMode::Mutable) => "mutable",
        Ok(DiskMode::Sealed) => "sealed",
        Ok(DiskMode::Detected) => "detected",
        _ => "unknown",
    }
}

fn disk_json(d: &DiskInfo) -> serde_json::Value {
    json!({
        "id": d.id,
        "size_bytes": d.size_bytes,
        "mode": mode_name(d.mode),
        "generation": d.generation,
        "origin": d.origin,
        "owner": d.owner,
        "epoch": d.epoch,
        "pinned": d.pinned,
        "readers": d.readers,
        "lease_holders": d.lease_holders,
        "known_blocks": d.known_blocks,
        "total_blocks": d.total_blocks,
        "coverage": ratio(d.known_blocks, d.total_blocks),
        "lease_valid": d.lease_valid,
        "member_coverage": d.coverage.iter().map(|c| json!({
            "member": c.member,
            "blocks": c.blocks,
            "coverage": ratio(c.blocks, d.total_blocks),
        })).collect::<Vec<_>>(),
    })
}

fn print_disks(disks: &[DiskInfo]) {
    println!(
        "{:<24} {:>16} {:<8} {:>4}  {:<16} {:>8}  ORIGIN",
        "DISK", "SIZE", "MODE", "GEN", "OWNER", "COVERAGE"
    );
    for d in disks {
        let mode = if d.pinned {
            format!("{}*", mode_name(d.mode))
        } else {
            mode_name(d.mode).to_string()
        };
        println!(
            "{:<24} {:>16} {:<8} {:>4}  {:<16} {:>7.1}%  {}",
            d.id,
            d.size_bytes,
            mode,
            d.generation,
            d.owner,
            100.0 * ratio(d.known_blocks, d.total_blocks),
            d.origin
        );
        if !d.readers.is_empty() {
            println!("{:<26}readers in window: {}", "", d.readers.join(", "));
        }
        if !d.lease_holders.is_empty() {
            println!("{:<26}lease holders: {}", "", d.lease_holders.join(", "));
        }
        if d.lease_valid {
            println!("{:<26}this node holds a lease", "");
        }
        if !d.coverage.is_empty() {
            let c: Vec<String> = d
                .coverage
                .iter()
                .map(|c| {
                    format!(
                        "{} {:.1}%",
                        c.member,
                        100.0 * ratio(c.blocks, d.total_blocks)
                    )
                })
                .collect();
            println!("{:<26}held by members: {}", "", c.join(", "));
        }
    }
}

fn ratio(n: u64, d: u64) -> f64 {
    if d == 0 { 0.0 } else { n as f64 / d as f64 }
}

fn status_json(s: &StatusResponse) -> serde_json::Value {
    let c = s.counters.unwrap_or_default();
    let l = s.leases.unwrap_or_default();
    let p = s.policy.clone().unwrap_or_default();
    let lookups = c.lookups;
    json!({
        "node_id": s.node_id,
        "version": s.version,
        "block_size": s.block_size,
        "uptime_ms": s.uptime_ms,
        "single_touch_share": s.single_touch_share,
        "disputed": s.disputed.iter().map(|d| json!({
            "disk": d.disk,
            "owners": d.owners,
        })).collect::<Vec<_>>(),
        "certificates": s.certificates.iter().map(|c| json!({
            "role": c.role,
            "path": c.path,
            "subject": c.subject,
            "not_after_unix": c.not_after_unix,
        })).collect::<Vec<_>>(),
        "policy": {
            "single_touch_target": p.single_touch_target,
            "single_touch_min": p.single_touch_min,
            "single_touch_max": p.single_touch_max,
            "adaptive": p.adaptive,
            "ghost_single_keys": p.ghost_single_keys,
            "ghost_multi_keys": p.ghost_multi_keys,
            "ghost_capacity": p.ghost_capacity,
            "ghost_hits_single": p.ghost_hits_single,
            "ghost_hits_multi": p.ghost_hits_multi,
            "target_grew": p.target_grew,
            "target_shrank": p.target_shrank,
            "rules": p.rules,
            "rules_duel": p.rules_duel,
            "rules_switches": p.rules_switches,
            "shards": p.shards,
        },
        "tiers": s.tiers.iter().map(|t| json!({
            "name": t.name,
            "entries": t.entries,
            "bytes": t.bytes,
            "capacity_bytes": t.capacity_bytes,
            "hits": t.hits,
            "hit_ratio": ratio(t.hits, lookups),
            "loading": t.loading,
        })).collect::<Vec<_>>(),
        "hit_ratio": ratio(lookups - c.misses.min(lookups), lookups),
        "dedup_ratio": ratio(c.logical_bytes, c.stored_bytes),
        "counters": {
            "lookups": c.lookups,
            "misses": c.misses,
            "zero_block_hits": c.zero_block_hits,
            "origin_reads": c.origin_reads,
            "origin_read_bytes": c.origin_read_bytes,
            "promotions": c.promotions,
            "demotions": c.demotions,
            "evictions": c.evictions,
            "ssd_verify_failures": c.ssd_verify_failures,
            "ssd_write_failures": c.ssd_write_failures,
            "ssd_written_bytes": c.ssd_written_bytes,
            "ssd_served_bytes": c.ssd_served_bytes,
            "ssd_writes_saved": c.ssd_writes_saved,
            "ssd_admissions_refused": c.ssd_admissions_refused,
            "logical_bytes": c.logical_bytes,
            "stored_bytes": c.stored_bytes,
            "single_flight_joins": c.single_flight_joins,
            "owner_reads": c.owner_reads,
            "owner_read_bytes": c.owner_read_bytes,
            "peer_reads": c.peer_reads,
            "peer_read_bytes": c.peer_read_bytes,
            "read_ahead_blocks": c.read_ahead_blocks,
            "read_ahead_used": c.read_ahead_used,
        },
        "disks": s.disks.iter().map(disk_json).collect::<Vec<_>>(),
        "members": s.members.iter().map(|m| json!({"id": m.id, "peer_addr": m.peer_addr})).collect::<Vec<_>>(),
        "leases": {
            "grants": l.grants,
            "renewals": l.renewals,
            "expiries": l.expiries,
            "revocations": l.revocations,
            "revocation_wait_ms": l.revocation_wait_ms,
            "detections": l.detections,
            "peer_served_bytes": l.peer_served_bytes,
            "block_map_bytes": l.block_map_bytes,
            "block_map_traffic_bytes": l.block_map_traffic_bytes,
            "foreign_revocations": l.foreign_revocations,
        },
    })
}

fn print_status(s: &StatusResponse) {
    let c = s.counters.unwrap_or_default();
    println!(
        "node {}  version {}  block size {}  up {:.1}s",
        s.node_id,
        s.version,
        s.block_size,
        s.uptime_ms as f64 / 1000.0
    );
    println!();
    println!(
        "{:<11} {:>10} {:>14} {:>14} {:>12} {:>9}",
        "TIER", "ENTRIES", "BYTES", "CAPACITY", "HITS", "HIT%"
    );
    for t in &s.tiers {
        println!(
            "{:<11} {:>10} {:>14} {:>14} {:>12} {:>8.2}%{}",
            t.name,
            t.entries,
            t.bytes,
            t.capacity_bytes,
            t.hits,
            100.0 * ratio(t.hits, c.lookups),
            if t.loading {
                "  (reading its index; holds nothing until then)"
            } else {
                ""
            }
        );
    }
    println!(
        "{:<11} {:>10} {:>14} {:>14} {:>12} {:>8.2}%",
        "miss",
        "",
        "",
        "",
        c.misses,
        100.0 * ratio(c.misses, c.lookups)
    );
    println!();
    println!(
        "hit ratio {:.2}%  lookups {}  zero-block hits {}  single-flight joins {}",
        100.0 * ratio(c.lookups - c.misses.min(c.lookups), c.lookups),
        c.lookups,
        c.zero_block_hits,
        c.single_flight_joins
    );
    let p = s.policy.clone().unwrap_or_default();
    println!(
        "single-touch target {:.1}% of RAM ({}, limits {:.1}%..{:.1}%, moved up {} down {})",
        100.0 * p.single_touch_target,
        if p.adaptive { "adaptive" } else { "fixed" },
        100.0 * p.single_touch_min,
        100.0 * p.single_touch_max,
        p.target_grew,
        p.target_shrank
    );
    println!(
        "eviction rules: {} ({}, {} switches)  shards: {}",
        p.rules,
        if p.rules_duel {
            "picked by the duel"
        } else {
            "fixed by cache.policy"
        },
        p.rules_switches,
        p.shards
    );
    println!(
        "ghosts: single {} multi {} keys (bound {} each)  ghost hits: single {} multi {}",
        p.ghost_single_keys,
        p.ghost_multi_keys,
        p.ghost_capacity,
        p.ghost_hits_single,
        p.ghost_hits_multi
    );
    println!(
        "ssd written {} bytes, served {} bytes (written / served {:.2}), {} demotions wrote nothing (copy kept), {} not admitted",
        c.ssd_written_bytes,
        c.ssd_served_bytes,
        ratio(c.ssd_written_bytes, c.ssd_served_bytes),
        c.ssd_writes_saved,
        c.ssd_admissions_refused
    );
    println!(
        "dedup ratio {:.2}  (logical {} bytes / stored {} bytes)",
        ratio(c.logical_bytes, c.stored_bytes),
        c.logical_bytes,
        c.stored_bytes
    );
    println!(
        "origin reads {} ({} bytes)  owner reads {} ({} bytes)  peer reads {} ({} bytes)  promotions {}  demotions {}  evictions {}  ssd verify failures {}  ssd write failures {}",
        c.origin_reads,
        c.origin_read_bytes,
        c.owner_reads,
        c.owner_read_bytes,
        c.peer_reads,
        c.peer_read_bytes,
        c.promotions,
        c.demotions,
        c.evictions,
        c.ssd_verify_failures,
        c.ssd_write_failures
    );
    println!(
        "read-ahead {} blocks fetched, {} taken by reads",
        c.read_ahead_blocks, c.read_ahead_used
    );
    let l = s.leases.unwrap_or_default();
    println!(
        "block maps held {} bytes, received {} bytes",
        l.block_map_bytes, l.block_map_traffic_bytes
    );
    println!(
        "detections {}  lease grants {}  renewals {}  expiries {}  revocations {} (waited {} ms)  bytes served to members {}",
        l.detections,
        l.grants,
        l.renewals,
        l.expiries,
        l.revocations,
        l.revocation_wait_ms,
        l.peer_served_bytes
    );
    println!();
    println!("members ({}):", s.members.len());
    for m in &s.members {
        println!("  {:<24} {}", m.id, m.peer_addr);
    }
    if !s.certificates.is_empty() {
        println!();
        println!("certificates:");
        for c in &s.certificates {
            println!(
                "  {:<8} {}  {}  expires {}",
                c.role,
                c.path,
                c.subject,
                expiry_text(c.not_after_unix)
            );
        }
    }
    if !s.disputed.is_empty() {
        println!();
        println!("disputed disk ids (served by none of their owners until all but one drop them):");
        for d in &s.disputed {
            println!("  {:<24} owned by {}", d.disk, d.owners.join(", "));
        }
    }
    println!();
    print_disks(&s.disks);
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Certs { command } = cli.command {
        return certs(command, cli.json);
    }
    let client = match (&cli.tcp, &cli.ca, &cli.cert, &cli.key) {
        (Some(addr), Some(ca), Some(cert), Some(key)) => {
            let tls = shadowcache_client::TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                server_name: cli.server_name.clone(),
            };
            Client::connect_tcp_tls(addr, &tls).await?
        }
        // An https address asks for TLS: without --ca/--cert/--key it would go in plaintext.
        (Some(addr), ..) if addr.starts_with("https://") => {
            anyhow::bail!("{addr}: an https address needs --ca, --cert and --key (mutual TLS)")
        }
        (Some(addr), ..) => Client::connect_tcp(addr).await?,
        (None, Some(_), ..) | (None, _, Some(_), _) | (None, .., Some(_)) => {
            anyhow::bail!("--ca, --cert and --key go with --tcp")
        }
        (None, ..) => Client::connect_unix(&cli.socket).await?,
    };
    match cli.command {
        Command::Disks => {
            let disks = client.list_disks().await?;
            if cli.json {
                println!("{}", json!(disks.iter().map(disk_json).collect::<Vec<_>>()));
            } else {
                print_disks(&disks);
            }
        }
        Command::Stat { disk } => {
            let d = client.disk(&disk).stat().await?;
            if cli.json {
                println!("{}", disk_json(&d));
            } else {
                print_disks(&[d]);
            }
        }
        Command::Read {
            disk,
            offset,
            length,
            output,
        } => {
            let data = client.disk(&disk).read_at(offset, length).await?;
            match &output {
                Some(path) => std::fs::write(path, &data)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&data)?;
                    out.flush()?;
                }
            }
            if cli.json && output.is_some() {
                println!(
                    "{}",
                    json!({"disk": disk, "offset": offset, "length": data.len()})
                );
            }
        }
        Command::Write {
            disk,
            offset,
            input,
        } => {
            let data = match &input {
                Some(path) => std::fs::read(path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
                None => {
                    let mut v = Vec::new();
                    std::io::stdin().read_to_end(&mut v)?;
                    v
                }
            };
            let len = data.len();
            let d = client.disk(&disk);
            d.write_at(offset, data).await?;
            d.flush().await?;
            if cli.json {
                println!("{}", json!({"disk": disk, "offset": offset, "length": len}));
            } else {
                eprintln!("wrote {len} bytes to {disk} at {offset} (flushed)");
            }
        }
        Command::Seal { disk } => {
            let d = client.set_disk_mode(&disk, DiskMode::Sealed).await?;
            if cli.json {
                println!("{}", disk_json(&d));
            } else {
                println!("{} is sealed (generation {})", d.id, d.generation);
            }
        }
        Command::Pin { ref disk }
        | Command::Unpin { ref disk }
        | Command::DropShadows { ref disk } => {
            let (action, done) = match &cli.command {
                Command::Pin { .. } => (DetectionAction::Pin, "pinned mutable"),
                Command::Unpin { .. } => (DetectionAction::Unpin, "unpinned"),
                _ => (
                    DetectionAction::DropShadows,
                    "mutable, its shadow clones dropped",
                ),
            };
            let disk = disk.clone();
            let d = client.set_detection(&disk, action).await?;
            if cli.json {
                println!("{}", disk_json(&d));
            } else {
                println!("{} is {done} (generation {})", d.id, d.generation);
            }
        }
        Command::ForgetClaimant { disk, member } => {
            let owners = client.forget_claimant(&disk, &member).await?;
            if cli.json {
                println!("{}", json!({ "disk": disk, "owners": owners }));
            } else {
                match owners.as_slice() {
                    [] => println!("{disk}: no member claims it here now"),
                    [one] => println!(
                        "{disk}: claimed by {one} only (served from there once every member's list is read)"
                    ),
                    more => println!("{disk}: still disputed by {}", more.join(", ")),
                }
            }
        }
        Command::Register { disk, origin, mode } => {
            let mode = if mode == "sealed" {
                DiskMode::Sealed
            } else {
                DiskMode::Mutable
            };
            let d = client.register_disk(&disk, &origin, mode).await?;
            if cli.json {
                println!("{}", disk_json(&d));
            } else {
                print_disks(&[d]);
            }
        }
        Command::Certs { command } => return certs(command, cli.json),
        Command::Status => {
            let s = client.status().await?;
            if cli.json {
                println!("{}", status_json(&s));
            } else {
                print_status(&s);
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shadowcache: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shadowcache: {e:#}");
            ExitCode::FAILURE
        }
    }
}

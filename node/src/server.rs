//! The running node: its listeners (gRPC on the Unix socket and TCP, NBD, the Peer service),
//! its background loops (detection, lease renewal, gauges) and a clean shutdown.
//!
//! Architecture invariant: the only place that binds sockets or spawns the node's loops.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::{Config, Node, frontend, nbd, telemetry};

/// A node serving its frontends.
#[derive(Debug)]
pub struct RunningNode {
    node: Arc<Node>,
    stop: tokio::sync::watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Opens the node and starts its frontends: gRPC on the Unix socket, and on TCP if configured.
pub async fn start(config: Config) -> anyhow::Result<RunningNode> {
    // The PEM files are read once: the same identity for the client and the server side.
    let tls = load_tls(&config)?;
    let env = environment_with(&config, tls.as_ref());
    serve(config, env, tls).await
}

fn load_tls(config: &Config) -> anyhow::Result<Option<frontend::tls::PeerTls>> {
    let Some(tls) = config.cluster.tls.as_ref() else {
        return Ok(None);
    };
    certificate_speaks_for_this_node(config)?;
    frontend::tls::PeerTls::load(tls).map(Some)
}

/// This node's `[cluster.tls]` certificate must be a member's (other members refuse any other
/// on the Peer service), and one that names its node speaks for that node only (other members
/// check it on every call that names its sender): with either wrong, every call would be
/// refused, so the node does not start.
pub(crate) fn certificate_speaks_for_this_node(config: &Config) -> anyhow::Result<()> {
    let Some(tls) = config.cluster.tls.as_ref() else {
        return Ok(());
    };
    if let Ok(pem) = std::fs::read(&tls.cert)
        && let Ok((_, block)) = x509_parser::pem::parse_x509_pem(&pem)
    {
        let id = crate::certs::identity_of(&block.contents);
        let roles = id.roles.under(tls.require_roles);
        // The Peer service and gossip of other members take a member's certificate only (in
        // either gossip mode: with a cluster key, gossip does not read certificates).
        anyhow::ensure!(
            roles.may_peer(),
            "cluster.tls.cert: {} is not a member's certificate (its role is {}): issue one with `shadowcache certs issue --role member`",
            tls.cert.display(),
            roles.describe()
        );
        anyhow::ensure!(
            id.speaks_for(&config.node_id),
            "cluster.tls.cert: {} speaks for node {:?} only, not for this node's id {:?}: issue one with `shadowcache certs issue --ca DIR {}`",
            tls.cert.display(),
            id.nodes,
            config.node_id,
            config.node_id
        );
    }
    Ok(())
}

/// The production [`crate::Environment`] for `config`: `CLOCK_BOOTTIME`, a seed from the
/// system's entropy, gossip when `peer_listen` is set (a cluster of one otherwise; joined once
/// the node holds its data directory), and the gRPC Peer client (over mutual TLS when
/// `[cluster.tls]` is set).
pub fn environment(config: &Config) -> anyhow::Result<crate::Environment> {
    let tls = load_tls(config)?;
    Ok(environment_with(config, tls.as_ref()))
}

fn environment_with(config: &Config, tls: Option<&frontend::tls::PeerTls>) -> crate::Environment {
    // A bad secret file stops the start when membership is joined, with the file named.
    let key = config
        .cluster
        .secret_file
        .as_deref()
        .and_then(|p| crate::cluster::gossip_auth::ClusterKey::from_file(p).ok());
    let peers = Arc::new(frontend::peer_client::TonicPeers::new(
        &config.node_id,
        Duration::from_millis(config.cluster.rpc_timeout_ms),
        tls.map(|t| t.client.clone()),
        key.as_ref(),
    ));
    let host_boot = crate::ids::host_boot();
    if host_boot == 0 {
        tracing::warn!(
            "the host's boot id cannot be read (neither {} nor /proc/sys/kernel/random/boot_id): flushes forwarded to owners cannot tell writes lost with an owner's host restart",
            crate::ids::HOST_BOOT_ENV
        );
    }
    crate::Environment {
        clock: crate::clock::system(),
        seed: rand::random(),
        membership: None,
        peers,
        origin_wrap: None,
        host_boot,
    }
}

/// [`start`] with the sources of nondeterminism of `env`.
pub async fn start_in(config: Config, env: crate::Environment) -> anyhow::Result<RunningNode> {
    let tls = load_tls(&config)?;
    serve(config, env, tls).await
}

async fn serve(
    config: Config,
    env: crate::Environment,
    tls: Option<frontend::tls::PeerTls>,
) -> anyhow::Result<RunningNode> {
    let nbd_tls = match &config.nbd_tls {
        Some(t) => Some(nbd::NbdTls::load(t)?),
        None => None,
    };
    let node = Node::open_in(config, env).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    let unix = frontend::grpc::bind_unix(&node.config.listen_unix)?;
    servers.push(tokio::spawn(frontend::grpc::serve_unix(
        node.clone(),
        unix,
        stopped.clone(),
    )));
    if let Some(addr) = node.config.listen_tcp {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on listen_tcp {addr}"))?;
        servers.push(tokio::spawn(frontend::grpc::serve_tcp(
            node.clone(),
            tcp,
            tls.clone(),
            stopped.clone(),
        )));
    }
    if let Some(path) = &node.config.nbd_unix {
        let l = frontend::grpc::bind_unix(path)?;
        servers.push(tokio::spawn(nbd::serve_unix(
            node.clone(),
            l,
            nbd_tls.as_ref().map(nbd::NbdTls::offered),
            stopped.clone(),
        )));
    }
    if let Some(addr) = node.config.nbd_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on nbd_listen {addr}"))?;
        if nbd_tls.is_none() {
            tracing::warn!(%addr, "NBD on TCP without TLS: anyone who reaches it reads and writes the disks; set [nbd_tls]");
        }
        servers.push(tokio::spawn(nbd::serve_tcp(
            node.clone(),
            l,
            nbd_tls.clone(),
            stopped.clone(),
        )));
    }
    if let Some(addr) = node.config.cluster.peer_listen {
        let peer = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on peer_listen {addr}"))?;
        servers.push(tokio::spawn(frontend::peer::serve_peer(
            node.clone(),
            peer,
            tls,
            stopped.clone(),
        )));
    }
    // Other members' disks, shadows, leases and block maps are kept current whatever carries
    // the calls (a node alone has nobody to ask and pays a look at an empty list a second).
    {
        let n = node.clone();
        node.cluster
            .spawn_refresher(stopped.clone(), move |id| n.registry.get(id).is_ok());
    }
    // Detection looks at every owned mutable disk four times a second, and at once when a read
    // may have made one qualify (a new reader, or enough reads): the members that read it stop
    // forwarding (and caching nothing) that much sooner.
    if node.config.detection.enabled {
        let node = node.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            // On the node's clock: detection decides when leases can be granted.
            loop {
                // Biased, the stop first: no random choice (a simulation's seed replays).
                tokio::select! {
                    biased;
                    _ = stopped.changed() => break,
                    () = node.detect_soon.notified() => node.detect_queued().await,
                    () = node.clock.sleep(Duration::from_millis(250)) => node.detect_all().await,
                }
            }
        });
    }
    // Gauges (bytes and entries per tier) are refreshed from the cache once a second.
    {
        let node = node.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    biased;
                    _ = stopped.changed() => break,
                    _ = tick.tick() => {
                        node.cache.usage();
                        metrics::gauge!(telemetry::BLOCK_MAP_BYTES)
                            .set(node.cluster.block_map_bytes() as f64);
                    }
                }
            }
        });
    }
    tracing::info!(
        node_id = %node.config.node_id,
        socket = %node.config.listen_unix.display(),
        tcp = ?node.config.listen_tcp,
        block_size = node.config.block_bytes,
        disks = node.registry.list().len(),
        "shadowcache node serving"
    );
    Ok(RunningNode {
        node,
        stop,
        servers,
    })
}

impl RunningNode {
    /// The node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The Unix socket the gRPC services listen on.
    pub fn unix_socket(&self) -> &Path {
        &self.node.config.listen_unix
    }

    /// Stops the frontends (in-flight requests finish), then leaves the cache warm.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        // Block map streams never end by themselves: end them, or every member of a cluster
        // stopped at once waits out the grace period on the others' streams.
        self.node.close_subscriptions();
        // In-flight requests get a grace period; a client that keeps a connection busy longer
        // does not keep the cache from being saved.
        let grace = Duration::from_secs(10);
        for s in self.servers {
            match tokio::time::timeout(grace, s).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "frontend stopped with an error"),
                Ok(Err(e)) => tracing::warn!(error = %e, "frontend task failed"),
                Err(_) => tracing::warn!("frontend still busy after {grace:?}; closing anyway"),
            }
        }
        self.node.cluster.shutdown().await;
        let node = self.node.clone();
        crate::blocking::run(move || node.close())
            .await
            .context("shutdown task")?;
        let _ = std::fs::remove_file(&self.node.config.listen_unix);
        tracing::info!("shadowcache node stopped; cache left warm");
        Ok(())
    }
}

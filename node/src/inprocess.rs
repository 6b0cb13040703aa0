//! Several nodes in one process: an in-process cluster (membership and Peer service) for tests
//! that drive a cluster step by step, with a [`crate::clock::ManualClock`].
//!
//! [`InProcessNet`] is the network: who is alive ([`InProcess`] membership) and, for every call
//! between two members, whether the link delivers it, fails it (a cut), or holds it until the
//! test opens the link again. A call is delivered by calling the other node's own handlers
//! (`serve.rs`, `admin.rs`), the same the gRPC Peer service calls; errors cross the link as a
//! member's errors cross the wire (kind and message, as [`Error::Remote`]).
//!
//! Architecture invariant: test support only; nothing in the node depends on it.

use crate::hashing::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::admin::DiskInfo;
use crate::clock::Clock;
use crate::cluster::membership::InProcess;
use crate::cluster::peers::{BlockMapStream, FetchedBlocks, Hello, MapChunk, PeerService, To};
use crate::error::{Error, Result};
use crate::ids::Version;
use crate::{Environment, Node};

/// The configuration of member `node_id` of an in-process test cluster, its data in
/// `data_dir`: 16 MiB of RAM, no SSD tier, no NBD socket, detection that a few reads by two
/// members and a 400 ms quiet period trigger, leases of `term_ms` with a `margin_ms` drift
/// margin; `owns` registers a mutable disk (id, image) there.
pub fn member_config(
    data_dir: &std::path::Path,
    node_id: &str,
    block_bytes: u32,
    (term_ms, margin_ms): (u64, u64),
    owns: Option<(&str, &std::path::Path)>,
) -> crate::Config {
    let mut c = crate::Config::for_data_dir(data_dir);
    c.node_id = node_id.into();
    c.block_bytes = block_bytes;
    c.ram_bytes = 16 << 20;
    c.ssd_bytes = 0;
    c.nbd_unix = None;
    c.detection.enabled = true;
    c.detection.min_readers = 2;
    c.detection.min_reads = 4;
    c.detection.quiet_period_ms = 400;
    c.detection.window_ms = 10_000;
    c.lease.term_ms = term_ms;
    c.lease.drift_margin_ms = margin_ms;
    if let Some((id, image)) = owns {
        c.disks.push(crate::config::DiskSpec {
            id: id.into(),
            origin: image.to_path_buf(),
            mode: crate::DiskMode::Mutable,
        });
    }
    c
}

/// What a link from one member to another does with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Delivers it.
    Open,
    /// Fails it at once, as an unreachable member.
    Cut,
    /// Holds it until the link is opened (or cut) again.
    Held,
    /// Delivers it, and loses the reply: the callee acted, the caller gets an error.
    LoseReply,
    /// Delivers it twice, one after the other (a retry of a call that had arrived); the
    /// caller gets the second reply.
    Twice,
}

impl Link {
    /// Whether the link carries anything (calls and gossip get through).
    fn carries(self) -> bool {
        !matches!(self, Link::Cut | Link::Held)
    }
}

/// The network of an in-process cluster.
#[derive(Debug, Clone)]
pub struct InProcessNet {
    members: InProcess,
    nodes: Arc<parking_lot::Mutex<HashMap<String, Weak<Node>>>>,
    links: Arc<watch::Sender<HashMap<(String, String), Link>>>,
    /// Incarnations given an address so far.
    names: Arc<std::sync::atomic::AtomicU16>,
}

impl Default for InProcessNet {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcessNet {
    /// A network with nobody on it.
    pub fn new() -> Self {
        InProcessNet {
            members: InProcess::new(),
            nodes: Arc::new(parking_lot::Mutex::new(HashMap::default())),
            links: Arc::new(watch::Sender::new(HashMap::default())),
            names: Arc::default(),
        }
    }

    /// The environment of member `id` (its incarnation `boot`): `clock`, `seed`, this
    /// network's membership and Peer service. Attach the node with [`InProcessNet::attach`]
    /// once it is open.
    pub fn environment(
        &self,
        id: &str,
        boot: u64,
        clock: Arc<dyn Clock>,
        seed: u64,
    ) -> Environment {
        // A name only: nothing listens there. Distinct per incarnation, for messages.
        let n = self.names.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let addr = SocketAddr::from(([127, 0, 0, 1], 1 + n));
        Environment {
            clock: clock.clone(),
            seed,
            membership: Some(self.members.join(id, addr, boot)),
            peers: Arc::new(InProcessPeers {
                me: id.to_string(),
                net: self.clone(),
                clock: clock.clone(),
            }),
            origin_wrap: None,
            // One host for every incarnation: a test that restarts the host sets another.
            host_boot: 1,
        }
    }

    /// Calls to member `id` reach `node` from now on.
    pub fn attach(&self, id: &str, node: &Arc<Node>) {
        self.nodes
            .lock()
            .insert(id.to_string(), Arc::downgrade(node));
    }

    /// From now on, membership changes spread only in [`InProcessNet::gossip_round`]s.
    pub fn gossip_in_rounds(&self) {
        self.members.gossip_in_rounds();
    }

    /// One round of gossip: every member's view catches up with what reaches it.
    pub fn gossip_round(&self) {
        self.members.gossip_round();
    }

    /// Calls to member `id` fail from now on; membership is left as it is (a killed process
    /// that has not been noticed yet).
    pub fn detach(&self, id: &str) {
        self.nodes.lock().remove(id);
    }

    /// Member `id` is dead to everyone (it leaves the live set; calls to it fail).
    pub fn kill(&self, id: &str) {
        self.members.remove(id);
        self.nodes.lock().remove(id);
    }

    /// Sets what the link from `from` to `to` does with calls (one direction). Gossip takes
    /// the same links: a link that is not open carries none (see [`InProcess`]).
    pub fn set_link(&self, from: &str, to: &str, link: Link) {
        self.links.send_modify(|l| {
            l.insert((from.to_string(), to.to_string()), link);
        });
        let blocked = self
            .links
            .borrow()
            .iter()
            .filter(|(_, l)| !l.carries())
            .map(|(k, _)| k.clone())
            .collect();
        self.members.set_gossip(blocked);
    }

    /// Waits until the link lets a call through; the node it reaches and what the link does
    /// with the call, or why it does not get through.
    async fn deliver(&self, from: &str, to: &str) -> Result<(Arc<Node>, Link)> {
        let key = (from.to_string(), to.to_string());
        let mut rx = self.links.subscribe();
        let how = loop {
            let link = rx
                .borrow_and_update()
                .get(&key)
                .copied()
                .unwrap_or(Link::Open);
            match link {
                Link::Open | Link::LoseReply | Link::Twice => break link,
                Link::Cut => {
                    return Err(Error::Peer {
                        node: to.to_string(),
                        cause: format!("link {from} -> {to} is cut"),
                    });
                }
                Link::Held => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
        let node = self
            .nodes
            .lock()
            .get(to)
            .and_then(Weak::upgrade)
            .ok_or_else(|| Error::Peer {
                node: to.to_string(),
                cause: "no such member in this process".into(),
            })?;
        Ok((node, how))
    }

    /// Delivers a call from `from` to `to` and runs it there (`f`) as the link says: once;
    /// twice, the second reply counting; or once with the reply lost.
    async fn exchange<T, F, Fut>(&self, from: &str, to: &str, f: F) -> Result<T>
    where
        F: Fn(Arc<Node>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        tracing::trace!(
            from,
            to,
            call = std::any::type_name::<T>(),
            "in-process call"
        );
        let (node, how) = self.deliver(from, to).await?;
        match how {
            Link::Twice => {
                let _ = f(node).await;
                // The duplicate crosses the link again: a link held (or cut) meanwhile holds
                // (or drops) it, so that it can arrive late, after other calls.
                let (again, _) = self.deliver(from, to).await?;
                f(again).await
            }
            Link::LoseReply => {
                let _ = f(node).await;
                Err(Error::Peer {
                    node: to.to_string(),
                    cause: format!("the reply from {to} to {from} was lost"),
                })
            }
            _ => f(node).await,
        }
    }
}

/// A member's errors as they reach the caller over the wire: kind and message kept.
fn crossed<T>(node: &str, r: Result<T>) -> Result<T> {
    r.map_err(|e| match e {
        Error::Remote { .. } => e,
        e => Error::Remote {
            node: node.to_string(),
            kind: e.kind(),
            message: e.to_string(),
        },
    })
}

/// The Peer service of an in-process cluster, as member `me` calls it.
#[derive(Debug)]
struct InProcessPeers {
    me: String,
    net: InProcessNet,
    clock: Arc<dyn Clock>,
}

impl PeerService for InProcessPeers {
    fn owned_disks<'a>(&'a self, to: To<'a>) -> BoxFuture<'a, Result<(Vec<DiskInfo>, u64)>> {
        Box::pin(async move {
            self.net
                .exchange(&self.me, to.node, |n| async move {
                    Ok((n.local_disks(), n.cluster().disks_version()))
                })
                .await
        })
    }

    fn lease<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        version: Version,
        boot: u64,
    ) -> BoxFuture<'a, Result<Duration>> {
        Box::pin(async move {
            self.net
                .exchange(&self.me, to.node, |n| async move {
                    crossed(to.node, n.grant_lease(disk, version, (&self.me, boot)))
                })
                .await
        })
    }

    fn revoke<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        generation: u64,
        boot: u64,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.net
                .exchange(&self.me, to.node, |n| async move {
                    crossed(to.node, n.revoke_held(disk, generation, &self.me, boot))
                })
                .await
        })
    }

    fn hello<'a>(&'a self, to: To<'a>, boot: u64) -> BoxFuture<'a, Result<Hello>> {
        Box::pin(async move {
            self.net
                .exchange(
                    &self.me,
                    to.node,
                    |n| async move { Ok(n.hello(&self.me, boot)) },
                )
                .await
        })
    }

    fn read<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        offset: u64,
        length: u64,
        version: Version,
    ) -> BoxFuture<'a, Result<(Bytes, u64)>> {
        Box::pin(async move {
            self.net
                .exchange(&self.me, to.node, |n| async move {
                    let r = n
                        .read_local(disk, offset, length, &self.me, version)
                        .await
                        .map(|b| (b, n.cluster().disks_version()));
                    crossed(to.node, r)
                })
                .await
        })
    }

    fn write<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        offset: u64,
        data: Bytes,
        within: Duration,
    ) -> BoxFuture<'a, Result<u64>> {
        // A write once sent is on its way whether or not its sender still waits (as on a real
        // network): it goes in a task of its own, which a caller that gives up does not stop.
        let (net, me, node, disk) = (
            self.net.clone(),
            self.me.clone(),
            to.node.to_string(),
            disk.to_string(),
        );
        let clock = self.clock.clone();
        let sent = clock.now();
        let call = tokio::spawn(async move {
            net.exchange(&me, &node, |n| {
                let (disk, data, node, clock) = (&disk, data.clone(), &node, &clock);
                async move {
                    // A call held on its link spent that time on the way.
                    let left = within.saturating_sub(clock.now().saturating_sub(sent));
                    let r = n.write_local(disk, offset, data, Some(left)).await;
                    crossed(node, r.map(|()| n.host_boot()))
                }
            })
            .await
        });
        Box::pin(async move {
            call.await
                .map_err(|e| Error::State(format!("in-process write: {e}")))?
        })
    }

    fn flush<'a>(&'a self, to: To<'a>, disk: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            self.net
                .exchange(&self.me, to.node, |n| async move {
                    let r = n.flush_local(disk).await;
                    crossed(to.node, r.map(|()| n.host_boot()))
                })
                .await
        })
    }

    fn content_map<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        version: Version,
        first: u64,
        count: u32,
    ) -> BoxFuture<'a, Result<MapChunk>> {
        Box::pin(async move {
            self.net
                .exchange(&self.me, to.node, |n| async move {
                    let entries = n.content_map_chunk(disk, version, first, count).await;
                    Ok(MapChunk {
                        generation: version.generation.0,
                        block_bytes: u64::from(n.config().block_bytes),
                        entries: crossed(to.node, entries)?,
                    })
                })
                .await
        })
    }

    fn fetch_blocks<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        version: Version,
        indices: &'a [u64],
        cached_only: bool,
    ) -> BoxFuture<'a, Result<FetchedBlocks>> {
        Box::pin(async move {
            self.net
                .exchange(&self.me, to.node, |n| async move {
                    let got = n.blocks_for_peer(disk, version, indices, cached_only).await;
                    let got = crossed(to.node, got)?;
                    let bytes: u64 = got
                        .iter()
                        .map(|(_, b)| b.as_ref().map_or(0, |b| b.len() as u64))
                        .sum();
                    n.cluster().stats.peer_served_bytes.add(bytes);
                    Ok(got)
                })
                .await
        })
    }

    fn subscribe_block_map<'a>(
        &'a self,
        to: To<'a>,
        disk: &'a str,
        version: Version,
    ) -> BoxFuture<'a, Result<BlockMapStream>> {
        Box::pin(async move {
            self.net
                .exchange(&self.me, to.node, |n| async move {
                    let rx = crossed(to.node, n.block_map_stream(disk, version, &self.me))?;
                    Ok(
                        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok))
                            as BlockMapStream,
                    )
                })
                .await
        })
    }

    fn forget(&self, _node: &str) {}
}

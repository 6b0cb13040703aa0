//! Membership: who is in the cluster and alive, and the small facts each member advertises.
//!
//! Behind the [`Membership`] trait: real clusters use [`Gossip`] (chitchat: scuttlebutt gossip
//! over UDP with a phi-accrual failure detector; it is what Quickwit runs on); a node without
//! peers runs a [`Static`] membership of one; tests run several nodes in one process over
//! [`InProcess`], whose live set the test changes itself.
//! Each member advertises, as gossip key-values, its Peer gRPC address and a `disks_version`
//! counter that changes whenever its disk registry does; bulk state (disk lists, later block
//! maps) travels over gRPC, never in gossip datagrams.
//!
//! Ordering guarantees: [`Membership::watch`] yields the full live set (self included) after
//! every change; a member that stops gossiping leaves the set once the failure detector's phi
//! passes its threshold: measured on loopback, about 5 gossip intervals after it stopped at
//! phi 8 (2.6 s with the default 500 ms; `node/tests/cluster.rs` prints it). Nothing else is
//! promised: two nodes may briefly disagree.
//!
//! Architecture invariant: gossip carries small facts only; disk lists and block maps travel over
//! the Peer service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::transport::UdpTransport;
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, spawn_chitchat};
use futures::future::BoxFuture;
use tokio::sync::watch;

use super::peers::{PeerService, To};
use crate::clock::Clock;

/// Who is in the cluster and alive. See the module doc for the guarantees.
pub trait Membership: Send + Sync + std::fmt::Debug {
    /// This node.
    fn me(&self) -> &Member;
    /// A receiver that sees every change of the live set (this node included, sorted by id).
    fn watch(&self) -> watch::Receiver<Vec<Member>>;
    /// Advertises a new disk registry version.
    fn set_disks_version(&self, version: u64) -> BoxFuture<'_, ()>;
    /// Leaves the cluster. Idempotent.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

const KEY_PEER_ADDR: &str = "peer_addr";
const KEY_DISKS_VERSION: &str = "disks_version";

/// One live member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its node id.
    pub id: String,
    /// Where its Peer gRPC service listens.
    pub peer_addr: SocketAddr,
    /// Changes whenever its disk registry changes.
    pub disks_version: u64,
    /// Its gossip generation: different after every restart.
    pub boot: u64,
}

/// How to join a cluster.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// This node's id.
    pub node_id: String,
    /// This process's incarnation ([`crate::ids::boot_id`]): the gossip generation.
    pub boot: u64,
    /// Cluster name: gossip from another cluster is ignored.
    pub cluster_id: String,
    /// UDP gossip and Peer gRPC (TCP) address: the same host and port.
    pub listen: SocketAddr,
    /// The address peers use to reach this node (default: `listen`).
    pub advertise: SocketAddr,
    /// The Peer gRPC address advertised (default: `advertise`).
    pub advertise_rpc: SocketAddr,
    /// Other members' addresses to join through.
    pub seeds: Vec<String>,
    /// Gossip round interval.
    pub gossip_interval: Duration,
    /// Phi above which a silent member is declared dead.
    pub phi_threshold: f64,
    /// How every datagram is sealed and checked: under the cluster key, or signed with the
    /// member's TLS key. `None`: open gossip.
    pub auth: Option<super::gossip_auth::GossipAuth>,
}

/// Why joining failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// Gossip could not start.
    #[error("cannot start gossip on {listen}: {cause}")]
    Gossip {
        /// The gossip address.
        listen: SocketAddr,
        /// Why.
        cause: String,
    },
    /// Another live process already has this node id.
    #[error(
        "node id {id:?} is already used by a live process at {addr} ({other}); this process does not join. Give every host its own node_id (--node-id), or stop the other process first"
    )]
    DuplicateId {
        /// The node id.
        id: String,
        /// Where the other process answers.
        addr: SocketAddr,
        /// The other process.
        other: crate::ids::Incarnation,
    },
}

/// The live members of a cluster joined by gossip, kept current.
pub struct Gossip {
    me: Member,
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    handle: parking_lot::Mutex<Option<ChitchatHandle>>,
    members: watch::Receiver<Vec<Member>>,
}

impl std::fmt::Debug for Gossip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gossip").field("me", &self.me).finish()
    }
}

/// A cluster of this node alone.
#[derive(Debug)]
pub struct Static {
    me: Member,
    members: watch::Sender<Vec<Member>>,
}

impl Static {
    /// This node alone.
    pub fn single(node_id: &str, peer_addr: SocketAddr) -> Static {
        let me = Member {
            id: node_id.to_string(),
            peer_addr,
            disks_version: 0,
            boot: 0,
        };
        Static {
            members: watch::Sender::new(vec![me.clone()]),
            me,
        }
    }
}

impl Membership for Static {
    fn me(&self) -> &Member {
        &self.me
    }

    fn watch(&self) -> watch::Receiver<Vec<Member>> {
        self.members.subscribe()
    }

    fn set_disks_version(&self, _version: u64) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Members of one process that see each other: the test decides who is alive
/// ([`InProcess::remove`]) and which way gossip flows ([`InProcess::set_gossip`]). A member
/// sees a change of another member (a join, a new incarnation, a new disks version) once gossip
/// can reach it from that member over open links, directly or through a third member; until
/// then it keeps what it saw last. A member that is gone leaves every view at once (as a
/// failure detector would decide, only sooner).
#[derive(Debug, Clone, Default)]
pub struct InProcess {
    inner: Arc<parking_lot::Mutex<Views>>,
}

#[derive(Debug, Default)]
struct Views {
    /// Every live member, as it advertises itself.
    truth: Vec<Member>,
    /// What each member process (id, boot) sees.
    views: Vec<(String, u64, watch::Sender<Vec<Member>>)>,
    /// (from, to): gossip from `from` does not reach `to` directly.
    blocked: crate::hashing::HashSet<(String, String)>,
    /// Changes spread only in rounds the test runs ([`InProcess::gossip_round`]).
    in_rounds: bool,
}

impl Views {
    /// Whether gossip from `from` reaches `to`, over unblocked links between live ids.
    /// (`to` need not be live: an old incarnation still hears gossip like any other id.)
    fn reaches(&self, from: &str, to: &str) -> bool {
        let open = |a: &str, b: &str| !self.blocked.contains(&(a.to_string(), b.to_string()));
        let mut seen = vec![from];
        let mut next = vec![from];
        while let Some(at) = next.pop() {
            if at == to || open(at, to) {
                return true;
            }
            for m in &self.truth {
                if !seen.contains(&m.id.as_str()) && open(at, &m.id) {
                    seen.push(&m.id);
                    next.push(&m.id);
                }
            }
        }
        false
    }

    /// Takes the members `gone` picks out of the live set and out of every view at once.
    fn forget(&mut self, gone: impl Fn(&Member) -> bool) {
        self.truth.retain(|m| !gone(m));
        for (_, _, view) in &self.views {
            view.send_if_modified(|v| {
                let before = v.len();
                v.retain(|m| !gone(m));
                v.len() != before
            });
        }
    }

    /// Brings every view up to date with what gossip can carry to it, unless changes wait
    /// for the test's gossip rounds.
    fn changed(&self) {
        if !self.in_rounds {
            self.spread();
        }
    }

    /// Brings every view up to date with what gossip can carry to it.
    fn spread(&self) {
        for (id, boot, _) in &self.views {
            self.spread_to(id, *boot);
        }
    }

    /// Brings the view of process (`id`, `boot`) up to date with what gossip can carry to it.
    fn spread_to(&self, id: &str, boot: u64) {
        for (_, _, view) in self.views.iter().filter(|(i, b, _)| i == id && *b == boot) {
            view.send_if_modified(|v| {
                let mut next: Vec<Member> = Vec::with_capacity(self.truth.len());
                for m in &self.truth {
                    if self.reaches(&m.id, id) {
                        next.push(m.clone());
                    } else if let Some(old) = v.iter().find(|o| o.id == m.id) {
                        next.push(old.clone());
                    }
                }
                next.sort_by(|a, b| a.id.cmp(&b.id));
                let changed = *v != next;
                *v = next;
                changed
            });
        }
    }
}

/// One member of an [`InProcess`] cluster.
#[derive(Debug)]
pub struct InProcessMember {
    me: Member,
    view: watch::Receiver<Vec<Member>>,
    cluster: InProcess,
}

impl InProcess {
    /// An empty cluster.
    pub fn new() -> Self {
        InProcess::default()
    }

    /// `id` joins (a later incarnation of an id replaces the earlier one), reachable at
    /// `peer_addr` (only a name here: nothing listens on it).
    pub fn join(&self, id: &str, peer_addr: SocketAddr, boot: u64) -> Arc<InProcessMember> {
        let me = Member {
            id: id.to_string(),
            peer_addr,
            disks_version: 0,
            boot,
        };
        let mut g = self.inner.lock();
        g.truth.retain(|m| m.id != id);
        g.truth.push(me.clone());
        g.truth.sort_by(|a, b| a.id.cmp(&b.id));
        // A new process learns the live set from its seeds before it joins: its own view starts
        // with what reaches it now, rounds or not.
        let (tx, view) = watch::channel(Vec::new());
        g.views.push((id.to_string(), boot, tx));
        g.spread_to(id, boot);
        g.changed();
        Arc::new(InProcessMember {
            me,
            view,
            cluster: self.clone(),
        })
    }

    /// `id` is dead to everyone.
    pub fn remove(&self, id: &str) {
        let mut g = self.inner.lock();
        g.forget(|m| m.id == id);
        g.changed();
    }

    /// From now on, changes reach other members only in the rounds of gossip the test runs
    /// with [`InProcess::gossip_round`] (a removal still reaches everyone at once): for a
    /// simulation that delays gossip as a network does.
    pub fn gossip_in_rounds(&self) {
        self.inner.lock().in_rounds = true;
    }

    /// One round of gossip: every view catches up with what reaches it.
    pub fn gossip_round(&self) {
        self.inner.lock().spread();
    }

    /// Which way gossip flows: `blocked` holds the (from, to) pairs of members whose gossip
    /// does not reach the other directly. Views catch up with whatever now reaches them.
    pub fn set_gossip(&self, blocked: crate::hashing::HashSet<(String, String)>) {
        let mut g = self.inner.lock();
        g.blocked = blocked;
        g.changed();
    }
}

impl Membership for InProcessMember {
    fn me(&self) -> &Member {
        &self.me
    }

    fn watch(&self) -> watch::Receiver<Vec<Member>> {
        self.view.clone()
    }

    fn set_disks_version(&self, version: u64) -> BoxFuture<'_, ()> {
        let mut g = self.cluster.inner.lock();
        for m in g
            .truth
            .iter_mut()
            .filter(|m| m.id == self.me.id && m.boot == self.me.boot)
        {
            m.disks_version = version;
        }
        g.changed();
        Box::pin(async {})
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        let (id, boot) = (self.me.id.clone(), self.me.boot);
        let mut g = self.cluster.inner.lock();
        g.views.retain(|(i, b, _)| !(*i == id && *b == boot));
        g.forget(|m| m.id == id && m.boot == boot);
        g.changed();
        Box::pin(async {})
    }
}

fn parse_member(id: &ChitchatId, state: &chitchat::NodeState) -> Option<Member> {
    Some(Member {
        id: id.node_id.clone(),
        peer_addr: state.get(KEY_PEER_ADDR)?.parse().ok()?,
        disks_version: state
            .get(KEY_DISKS_VERSION)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        boot: id.generation_id,
    })
}

impl Gossip {
    /// Joins (or founds) a cluster by gossip.
    pub async fn join(cfg: GossipConfig) -> Result<Gossip, MembershipError> {
        let generation = cfg.boot;
        let chitchat_id = ChitchatId::new(cfg.node_id.clone(), generation, cfg.advertise);
        let failure = FailureDetectorConfig {
            phi_threshold: cfg.phi_threshold,
            initial_interval: cfg.gossip_interval,
            max_interval: cfg.gossip_interval * 10,
            // Dead members are forgotten after a minute (they are out of `members` at once).
            dead_node_grace_period: Duration::from_secs(60),
            ..FailureDetectorConfig::default()
        };
        let config = ChitchatConfig {
            chitchat_id,
            cluster_id: cfg.cluster_id.clone(),
            gossip_interval: cfg.gossip_interval,
            listen_addr: cfg.listen,
            // Host names are resolved again every few rounds (chitchat): a Kubernetes headless
            // Service names every member.
            seed_nodes: cfg.seeds.clone(),
            failure_detector_config: failure,
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let initial = vec![
            (KEY_PEER_ADDR.to_string(), cfg.advertise_rpc.to_string()),
            (KEY_DISKS_VERSION.to_string(), "0".to_string()),
        ];
        let spawned = match &cfg.auth {
            Some(auth) => {
                spawn_chitchat(
                    config,
                    initial,
                    &super::gossip_auth::AuthTransport::new(auth.clone()),
                )
                .await
            }
            None => spawn_chitchat(config, initial, &UdpTransport).await,
        };
        let handle = spawned.map_err(|e| MembershipError::Gossip {
            listen: cfg.listen,
            cause: format!("{e:#}"),
        })?;
        let me = Member {
            id: cfg.node_id.clone(),
            peer_addr: cfg.advertise_rpc,
            disks_version: 0,
            boot: generation,
        };
        let mut live = handle.chitchat().lock().await.live_nodes_watcher();
        let (tx, rx) = watch::channel(vec![me.clone()]);
        let myself = me.clone();
        let mut warned = None;
        tokio::spawn(async move {
            loop {
                let members: Vec<Member> = {
                    let states = live.borrow_and_update();
                    let mut v: Vec<Member> = states
                        .iter()
                        .filter_map(|(id, s)| parse_member(id, s))
                        .collect();
                    // Another live process with this node's id got past the check at its
                    // start (no seed answered it): loudly, once per such process. Leases name
                    // incarnations, so it cannot acknowledge a revocation for this one.
                    if let Some(other) = v
                        .iter()
                        .find(|m| m.id == myself.id && m.boot != myself.boot)
                        && warned != Some(other.boot)
                    {
                        warned = Some(other.boot);
                        metrics::counter!(crate::telemetry::DUPLICATE_NODE_ID).increment(1);
                        tracing::error!(
                            node_id = %myself.id,
                            other = %crate::ids::Incarnation::new(&other.id, other.boot),
                            other_addr = %other.peer_addr,
                            "another live process gossips with this node's id; members route this id to the newest one: give every host its own node_id"
                        );
                    }
                    // Two incarnations of one id (a restart the failure detector has not
                    // seen yet): the newest wins.
                    v.sort_by(|a, b| a.id.cmp(&b.id).then(b.boot.cmp(&a.boot)));
                    v.dedup_by(|a, b| a.id == b.id);
                    v
                };
                tx.send_if_modified(|cur| {
                    if *cur != members {
                        tracing::info!(members = ?members.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), "cluster membership changed");
                        metrics::gauge!(crate::telemetry::MEMBERS_ALIVE).set(members.len() as f64);
                        *cur = members;
                        true
                    } else {
                        false
                    }
                });
                if live.changed().await.is_err() {
                    break;
                }
            }
        });
        Ok(Gossip {
            me,
            chitchat: handle.chitchat(),
            handle: parking_lot::Mutex::new(Some(handle)),
            members: rx,
        })
    }
}

impl Membership for Gossip {
    fn me(&self) -> &Member {
        &self.me
    }

    fn watch(&self) -> watch::Receiver<Vec<Member>> {
        self.members.clone()
    }

    fn set_disks_version(&self, version: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.chitchat
                .lock()
                .await
                .self_node_state()
                .set(KEY_DISKS_VERSION, version);
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let handle = self.handle.lock().take();
            if let Some(h) = handle
                && let Err(e) = h.shutdown().await
            {
                tracing::warn!(error = %e, "gossip shutdown");
            }
        })
    }
}

/// Refuses to join when a seed is, or knows, another live process with this node's id: each
/// seed is asked who it is and which incarnation of the id it sees live, and that incarnation
/// is asked itself (a crashed one does not answer, and a restart goes on). Seeds that do not
/// answer are skipped: gossip tries them again, and the running node reports a duplicate it
/// sees later.
pub async fn refuse_duplicate(
    peers: &dyn PeerService,
    clock: &dyn Clock,
    node_id: &str,
    boot: u64,
    seeds: &[String],
    deadline: Duration,
) -> Result<(), MembershipError> {
    // A seed is asked as whoever it is; an answer that this id lives elsewhere is believed
    // only from a hello made to this id (over TLS, only a server whose certificate speaks for
    // it answers one: found in review, any member at a seed address could stop a start).
    let hello = |node: &'static str, addr: SocketAddr| {
        crate::clock::timeout(clock, deadline, peers.hello(To { node, addr }, boot))
    };
    let to_me = |addr: SocketAddr| {
        crate::clock::timeout(
            clock,
            deadline,
            peers.hello(
                To {
                    node: node_id,
                    addr,
                },
                boot,
            ),
        )
    };
    let addrs = resolve_seeds(clock, seeds, deadline).await;
    let answers = futures::future::join_all(
        addrs
            .iter()
            .map(|&s| async move { (s, hello("", s).await) }),
    )
    .await;
    for (seed, answer) in answers {
        let Ok(Ok(h)) = answer else {
            continue;
        };
        if h.node == node_id
            && h.boot != boot
            && let Ok(Ok(h)) = to_me(seed).await
            && h.node == node_id
            && h.boot != boot
        {
            return Err(MembershipError::DuplicateId {
                id: node_id.to_string(),
                addr: seed,
                other: crate::ids::Incarnation::new(&h.node, h.boot),
            });
        }
        if let Some((addr, other)) = h.same_id
            && let Ok(Ok(h)) = to_me(addr).await
            && h.node == node_id
            && h.boot == other
        {
            return Err(MembershipError::DuplicateId {
                id: node_id.to_string(),
                addr,
                other: crate::ids::Incarnation::new(&h.node, h.boot),
            });
        }
    }
    Ok(())
}

/// The addresses of `seeds` (`IP:PORT`, or `HOST:PORT` looked up in DNS within `deadline`);
/// a name that does not resolve is skipped with a warning (gossip keeps trying it).
pub async fn resolve_seeds(
    clock: &dyn Clock,
    seeds: &[String],
    deadline: Duration,
) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for s in seeds {
        if let Ok(a) = s.parse::<SocketAddr>() {
            out.push(a);
            continue;
        }
        match crate::clock::timeout(clock, deadline, tokio::net::lookup_host(s.as_str())).await {
            Ok(Ok(found)) => out.extend(found),
            Ok(Err(e)) => {
                tracing::warn!(seed = %s, error = %e, "seed name does not resolve (yet); gossip keeps trying it")
            }
            Err(_) => {
                tracing::warn!(seed = %s, "seed name lookup timed out; gossip keeps trying it")
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The membership of node `node_id` that `c` asks for: gossip when `peer_listen` is set
/// (after [`refuse_duplicate`] asked the seeds over `peers`), this node alone otherwise.
/// `random` goes into the boot id.
pub async fn from_config(
    node_id: &str,
    c: &super::ClusterConfig,
    peers: &dyn PeerService,
    clock: &dyn Clock,
    random: u64,
) -> Result<Arc<dyn Membership>, MembershipError> {
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let boot = crate::ids::boot_id(unix_ms, random);
    use super::gossip_auth::{ClusterKey, GossipAuth, TlsIdentity};
    let failed = |cause: String| MembershipError::Gossip {
        listen: c.peer_listen.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
        cause,
    };
    // The key when there is one (a MAC is cheaper than a signature); else the TLS identity.
    let auth = match (&c.secret_file, &c.tls) {
        (Some(path), _) => Some(GossipAuth::Key(
            ClusterKey::from_file(path)
                .map_err(|cause| failed(format!("cluster.secret_file: {cause}")))?,
        )),
        (None, Some(tls)) if c.peer_listen.is_some() => Some(GossipAuth::Tls(Arc::new(
            TlsIdentity::load(tls).map_err(failed)?,
        ))),
        (None, _) => None,
    };
    if c.peer_listen.is_some() && auth.is_none() {
        tracing::warn!(
            "the cluster is open: neither cluster.secret_file nor [cluster.tls] is set, so anyone who can reach peer_listen can join, claim a member's id and call the Peer service; see docs/security.md"
        );
    }
    if c.peer_listen.is_some() {
        refuse_duplicate(
            peers,
            clock,
            node_id,
            boot,
            &c.seeds,
            Duration::from_millis(c.rpc_timeout_ms.min(3000)),
        )
        .await?;
    }
    Ok(match c.peer_listen {
        Some(listen) => Arc::new(
            Gossip::join(GossipConfig {
                node_id: node_id.to_string(),
                boot,
                cluster_id: c.cluster_id.clone(),
                listen,
                advertise: c.advertise.unwrap_or(listen),
                advertise_rpc: c.advertise_rpc.or(c.advertise).unwrap_or(listen),
                seeds: c.seeds.clone(),
                gossip_interval: Duration::from_millis(c.gossip_interval_ms),
                phi_threshold: c.phi_threshold,
                auth,
            })
            .await?,
        ),
        None => Arc::new(Static::single(
            node_id,
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[Member]) -> Vec<(String, u64, u64)> {
        v.iter()
            .map(|m| (m.id.clone(), m.boot, m.disks_version))
            .collect()
    }

    #[test]
    fn in_process_gossip_reaches_a_member_only_over_open_links() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let c = InProcess::new();
        let a = c.join("a", addr, 1);
        let b = c.join("b", addr, 1);
        let cc = c.join("c", addr, 1);
        assert_eq!(ids(&b.watch().borrow()).len(), 3);
        let blocked = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(f, t)| (f.to_string(), t.to_string()))
                .collect()
        };
        // a's gossip does not reach b directly, but c relays it.
        c.set_gossip(blocked(&[("a", "b")]));
        drop(a.set_disks_version(5));
        assert_eq!(
            ids(&b.watch().borrow())[0],
            ("a".into(), 1, 5),
            "relayed by c"
        );
        // b hears nobody: a restarts, c sees the new incarnation, b keeps the old one.
        c.set_gossip(blocked(&[("a", "b"), ("c", "b")]));
        let a2 = c.join("a", addr, 2);
        assert_eq!(ids(&b.watch().borrow())[0], ("a".into(), 1, 5));
        assert_eq!(ids(&cc.watch().borrow())[0], ("a".into(), 2, 0));
        c.set_gossip(Default::default());
        assert_eq!(
            ids(&b.watch().borrow())[0].1,
            2,
            "b caught up once a path opened"
        );
        // In rounds: nothing spreads until a round runs; a joining process sees the set at once.
        c.gossip_in_rounds();
        drop(a2.set_disks_version(9));
        assert_eq!(ids(&b.watch().borrow())[0].2, 0);
        let d = c.join("d", addr, 1);
        assert_eq!(ids(&d.watch().borrow()).len(), 4);
        c.gossip_round();
        assert_eq!(ids(&b.watch().borrow())[0].2, 9);
        // A member that is gone leaves every view at once, rounds or not.
        c.remove("c");
        assert!(ids(&b.watch().borrow()).iter().all(|m| m.0 != "c"));
    }
}

//! The directory of other members' disks: fetched over `Peer.OwnedDisks` when a member's
//! advertised registry version (or boot) changes, dropped when it leaves. A disk id known
//! locally is never taken from a member; one that two other members own is disputed: it is
//! routed to neither until one of them drops it (or leaves).
//!
//! Architecture invariant: a disk id known locally always wins over a remote one, and a disk
//! id is routed to a member only while no other member claims it.

use crate::hashing::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use super::{Cluster, Member, RemoteDisk};

/// How long a member's answer can hold the directory to a disk list newer than the one read.
const HINT_HOLD: Duration = Duration::from_secs(5);
/// How long a claimant of a dispute, or the owner of a routed disk, that left the cluster is
/// still counted as a claimant of the id (unless it comes back first, or an operator forgets
/// it): as long as an owner that left is remembered ([`Cluster::departed`]).
const DISPUTE_HOLD: Duration = Duration::from_secs(3600);
/// How long new routes wait for a live member whose disk list cannot be read: one member whose
/// Peer service fails must not keep a starting node from every other member's disks for
/// ever. A member that claims another's disk id gets it only if the owner's list stays
/// unreadable here for this long while the owner is live in gossip.
const LIST_WAIT: Duration = Duration::from_secs(60);

impl Cluster {
    /// The member that owns `disk`, if another member does (and no other claims it).
    pub fn remote(&self, disk: &str) -> Option<RemoteDisk> {
        self.remote.get(disk).map(|r| r.clone())
    }

    /// The members that all claim `disk`, if more than one does (or did, and left within the
    /// hour): it is served by none.
    pub fn disputed(&self, disk: &str) -> Option<Vec<String>> {
        let owners = self.claimed_by(disk);
        (owners.len() > 1).then_some(owners)
    }

    /// The one member that claims `disk` while its route waits for every member's list
    /// ([`Self::settle`]): the disk is served once they are read.
    pub fn pending(&self, disk: &str) -> Option<String> {
        if self.remote.contains_key(disk) {
            return None;
        }
        let (present, absent) = self.claimants(disk);
        match (present.as_slice(), absent.is_empty()) {
            ([one], true) => Some(one.owner.clone()),
            _ => None,
        }
    }

    /// Every member that claims `disk` or did and left within [`DISPUTE_HOLD`] (routed,
    /// disputed, pending or away), sorted: another member may not register the id meanwhile.
    pub fn claimed_by(&self, disk: &str) -> Vec<String> {
        let (present, absent) = self.claimants(disk);
        let mut owners: Vec<String> = present.into_iter().map(|r| r.owner).collect();
        owners.extend(absent);
        owners.sort();
        owners
    }

    /// Forgets `member` as a claimant of `disk` that left the cluster ([`DISPUTE_HOLD`]),
    /// and routes the id by the claims left: the members that claim it now.
    pub fn forget_claimant(&self, disk: &str, member: &str) -> Result<Vec<String>, String> {
        if self
            .claims
            .get(disk)
            .is_some_and(|c| c.contains_key(member))
        {
            return Err(format!(
                "member {member:?} is live and lists disk {disk:?}: restart it without the disk"
            ));
        }
        let forgot = self
            .contested
            .get_mut(disk)
            .is_some_and(|mut c| c.remove(member).is_some());
        if !forgot {
            return Err(format!(
                "member {member:?} is not remembered here as a claimant of disk {disk:?} that left"
            ));
        }
        tracing::warn!(
            disk,
            member,
            "an operator ended this node's memory of a claimant that left"
        );
        // A route to the claimant left, if there is one, waits for every member's list as
        // any new route does: the refresher settles it at once.
        self.settle(disk, false);
        self.refresh_now.notify_one();
        Ok(self.claimed_by(disk))
    }

    /// The disk ids disputed now, sorted.
    pub fn disputed_disks(&self) -> Vec<String> {
        let mut v: Vec<String> = self.disputes.iter().map(|e| e.key().clone()).collect();
        v.sort();
        v
    }

    /// The live members that claim `disk`, and the claimants of a dispute over it that left
    /// within [`DISPUTE_HOLD`] and are not back.
    fn claimants(&self, disk: &str) -> (Vec<RemoteDisk>, Vec<String>) {
        let present: Vec<RemoteDisk> = match self.claims.get(disk) {
            Some(c) => c.values().cloned().collect(),
            None => Vec::new(),
        };
        let absent: Vec<String> = match self.contested.get(disk) {
            Some(c) => c
                .iter()
                .filter(|(id, at)| {
                    at.elapsed() < DISPUTE_HOLD && !present.iter().any(|r| &r.owner == *id)
                })
                .map(|(id, _)| id.clone())
                .collect(),
            None => Vec::new(),
        };
        (present, absent)
    }

    /// Routes every disk id by its claims ([`Self::settle`]).
    fn settle_all(&self, complete: bool) {
        let mut ids: Vec<String> = self
            .claims
            .iter()
            .map(|c| c.key().clone())
            .chain(self.remote.iter().map(|r| r.key().clone()))
            .chain(self.contested.iter().map(|c| c.key().clone()))
            .collect();
        ids.sort();
        ids.dedup();
        for id in &ids {
            self.settle(id, complete);
        }
        metrics::gauge!(crate::telemetry::DISPUTED_DISKS).set(self.disputes.len() as f64);
    }

    /// Routes `disk` by its claims: to its one claimant, or to nobody while several claim it.
    /// A new route (none, or another owner before) is made only when the list of every live
    /// member has been read (`complete`): until then the owner's list may be the one missing,
    /// and a member that claims the same id would get its disk.
    fn settle(&self, disk: &str, complete: bool) {
        let (present, absent) = self.claimants(disk);
        if present.len() + absent.len() > 1 {
            self.remote.remove(disk);
            if self.disputes.insert(disk.to_string(), ()).is_none() {
                let mut owners: Vec<&str> = present.iter().map(|r| r.owner.as_str()).collect();
                owners.extend(absent.iter().map(String::as_str));
                tracing::warn!(
                    disk,
                    ?owners,
                    "several members own a disk of this id; it is served by none of them until all but one drop it"
                );
            }
            return;
        }
        if absent.is_empty() {
            self.contested.remove(disk);
        }
        if self.disputes.remove(disk).is_some() {
            tracing::info!(
                disk,
                "the dispute over this disk id is over: one owner is left"
            );
        }
        let Some(one) = present.into_iter().next() else {
            self.claims.remove_if(disk, |_, c| c.is_empty());
            self.remote.remove(disk);
            return;
        };
        let same = self.remote.get(disk).is_some_and(|r| r.owner == one.owner);
        if !same && !complete {
            return;
        }
        if let Some(before) = self.remote.insert(disk.to_string(), one.clone())
            && before.owner != one.owner
        {
            tracing::info!(disk, owner = %one.owner, before = %before.owner, "disk moved to another member");
        }
    }

    /// The owner of `disk` and how long ago it left, if the disk is not served because its
    /// owner left the cluster (within the last hour) and is not back (back without the disk,
    /// the disk is unknown).
    pub fn departed(&self, disk: &str) -> Option<(String, Duration)> {
        self.departed
            .get(disk)
            .filter(|(owner, _)| !self.live_member(owner))
            .map(|(owner, at)| (owner, at.elapsed()))
    }

    /// Every disk other members own, by id.
    pub fn remote_disks(&self) -> Vec<RemoteDisk> {
        let mut v: Vec<RemoteDisk> = self.remote.iter().map(|r| r.value().clone()).collect();
        v.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        v
    }

    /// The version of this node's disk registry, as advertised.
    pub fn disks_version(&self) -> u64 {
        self.disks_version.load(Ordering::SeqCst)
    }

    /// Member `owner` answered with its disk registry at `version`: if that is newer than the
    /// list this node holds, the list is read again now (a detection reaches the members that
    /// read the disk in one round trip, not in a few gossip rounds).
    pub fn hint_disks_version(&self, owner: &str, version: u64) {
        if version == 0 || self.fetched.get(owner).is_some_and(|v| v.1 >= version) {
            return;
        }
        let newer = match self.hinted.entry(owner.to_string()) {
            dashmap::Entry::Occupied(mut e) if e.get().0 < version => {
                e.insert((version, std::time::Instant::now()));
                true
            }
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(v) => {
                v.insert((version, std::time::Instant::now()));
                true
            }
        };
        if newer {
            self.refresh_now.notify_one();
        }
    }

    /// Tells the other members that this node's disks changed.
    pub async fn disks_changed(&self) {
        let v = self.disks_version.fetch_add(1, Ordering::SeqCst) + 1;
        self.membership.set_disks_version(v).await;
    }

    /// Keeps the view of other members' disks current until `stopped` turns true: on every
    /// membership change and every `poll` besides.
    pub fn spawn_refresher(
        self: &Arc<Self>,
        mut stopped: watch::Receiver<bool>,
        local: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) {
        let this = self.clone();
        let mut members = self.members.clone();
        let mut stop_renewing = stopped.clone();
        let renewer = self.clone();
        tokio::spawn(async move {
            // Renewals are lease timing: they wait on the node's clock.
            loop {
                renewer.renew_leases().await;
                // Biased, the stop first: no random choice (a simulation's seed replays).
                tokio::select! {
                    biased;
                    _ = stop_renewing.changed() => break,
                    () = renewer.clock.sleep(renewer.lease_term / 6) => {},
                }
            }
        });
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                this.refresh(&local).await;
                tokio::select! {
                    biased;
                    _ = stopped.changed() => break,
                    r = members.changed() => if r.is_err() { break },
                    () = this.refresh_now.notified() => {},
                    _ = tick.tick() => {},
                }
            }
        });
    }

    /// One refresh: drop the disks of members that left, fetch the lists that changed.
    async fn refresh(self: &Arc<Self>, local: &(impl Fn(&str) -> bool + Send + Sync)) {
        let live: HashMap<String, Member> = self
            .members()
            .into_iter()
            .filter(|m| m.id != self.me)
            .map(|m| (m.id.clone(), m))
            .collect();
        // Members that are gone: everything they contributed goes. Owners of disks in `remote`
        // and claimants count too, whatever `fetched` says.
        let mut gone: Vec<String> = self
            .fetched
            .iter()
            .map(|e| e.key().clone())
            .chain(self.remote.iter().map(|r| r.value().owner.clone()))
            .chain(
                self.claims
                    .iter()
                    .flat_map(|c| c.keys().cloned().collect::<Vec<_>>()),
            )
            .chain(self.unreadable.iter().map(|e| e.key().clone()))
            .filter(|id| !live.contains_key(id))
            .collect();
        gone.sort();
        gone.dedup();
        for id in &gone {
            self.fetched.remove(id);
            self.unreadable.remove(id);
            self.peers.forget(id);
            let before = self.remote.len();
            let now = std::time::Instant::now();
            // Its disks, and the disputes it was part of, keep it as a claimant until it is
            // back (its list read) or an hour has passed: another member that claims one of
            // those ids meanwhile meets a dispute, not an empty place.
            let mut left_disputes = Vec::new();
            self.remote.retain(|disk, r| {
                if &r.owner == id {
                    self.departed.insert(disk.clone(), (id.clone(), now));
                    left_disputes.push(disk.clone());
                    return false;
                }
                true
            });
            for mut c in self.claims.iter_mut() {
                let disputed = c.value().len() > 1 || self.contested.contains_key(c.key());
                if c.value_mut().remove(id).is_some() && disputed {
                    left_disputes.push(c.key().clone());
                }
            }
            for disk in left_disputes {
                self.contested
                    .entry(disk)
                    .or_default()
                    .insert(id.clone(), now);
            }
            tracing::info!(member = %id, disks = before - self.remote.len(), "member left; its disks are no longer served here");
        }
        if !gone.is_empty() {
            // Their shadows go now, before the lists of the others are fetched.
            self.settle_all(false);
            self.sync_shadows();
        }
        self.hinted.retain(|_, (_, at)| at.elapsed() < HINT_HOLD);
        for m in live.values() {
            let advertised = self
                .hinted
                .get(&m.id)
                .map_or(m.disks_version, |h| h.0.max(m.disks_version));
            if self
                .fetched
                .get(&m.id)
                .is_some_and(|v| v.0 == m.boot && v.1 >= advertised)
            {
                continue;
            }
            match self.peers.owned_disks(&m.id, m.peer_addr).await {
                Ok((disks, disks_version)) => {
                    if self.fetched.get(&m.id).is_some_and(|v| v.0 != m.boot) {
                        tracing::info!(member = %m.id, "member restarted; its disks are read anew");
                    }
                    // The member's claims; routes change once every list of this pass is in
                    // (`settle_all` below), in place: a concurrent read never sees a disk
                    // missing while it is refetched.
                    let ids: crate::hashing::HashSet<String> =
                        disks.iter().map(|d| d.id.clone()).collect();
                    for d in disks {
                        if local(&d.id) {
                            tracing::warn!(disk = %d.id, owner = %m.id, "a disk of this id is local here; the remote one is ignored");
                            continue;
                        }
                        self.departed.invalidate(&d.id);
                        self.claims.entry(d.id.clone()).or_default().insert(
                            m.id.clone(),
                            RemoteDisk {
                                owner: m.id.clone(),
                                addr: m.peer_addr,
                                info: d,
                            },
                        );
                    }
                    for mut c in self.claims.iter_mut() {
                        if !ids.contains(c.key()) {
                            c.value_mut().remove(&m.id);
                        }
                    }
                    // Back: what it claims now is in `claims`.
                    for mut c in self.contested.iter_mut() {
                        c.value_mut().remove(&m.id);
                    }
                    self.fetched.insert(m.id.clone(), (m.boot, disks_version));
                    self.unreadable.remove(&m.id);
                    self.hinted.remove_if(&m.id, |_, h| h.0 <= disks_version);
                }
                Err(e) => {
                    tracing::warn!(member = %m.id, error = %e, "could not fetch a member's disks; retrying");
                    let warn = {
                        let now = std::time::Instant::now();
                        let mut e = self
                            .unreadable
                            .entry(m.id.clone())
                            .or_insert((m.boot, now, false));
                        if e.0 != m.boot {
                            *e = (m.boot, now, false);
                        }
                        let warn = !e.2 && e.1.elapsed() >= LIST_WAIT;
                        e.2 |= warn;
                        warn
                    };
                    if warn {
                        tracing::warn!(member = %m.id, "this member's disk list has been unreadable for {LIST_WAIT:?}: new routes to other members' disks no longer wait for it");
                    }
                }
            }
        }
        // New routes only once every live member's list is read at its current boot, or could
        // not be read for [`LIST_WAIT`].
        let complete = live.values().all(|m| {
            self.fetched.get(&m.id).is_some_and(|v| v.0 == m.boot)
                || self
                    .unreadable
                    .get(&m.id)
                    .is_some_and(|t| t.0 == m.boot && t.1.elapsed() >= LIST_WAIT)
        });
        self.settle_all(complete);
        self.sync_shadows();
        self.sync_subscriptions(&live);
    }
}

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

impl Cluster {
    /// The member that owns `disk`, if another member does (and no other claims it).
    pub fn remote(&self, disk: &str) -> Option<RemoteDisk> {
        self.remote.get(disk).map(|r| r.clone())
    }

    /// The members that all claim `disk`, if more than one does: it is served by none.
    pub fn disputed(&self, disk: &str) -> Option<Vec<String>> {
        self.claims
            .get(disk)
            .filter(|c| c.len() > 1)
            .map(|c| c.keys().cloned().collect())
    }

    /// Routes `disk` by its claims: to its one claimant, or to nobody.
    fn settle(&self, disk: &str) {
        let claimants: Vec<RemoteDisk> = match self.claims.get(disk) {
            Some(c) => c.values().cloned().collect(),
            None => Vec::new(),
        };
        match claimants.as_slice() {
            [] => {
                self.claims.remove_if(disk, |_, c| c.is_empty());
                self.remote.remove(disk);
            }
            [one] => {
                if let Some(before) = self.remote.insert(disk.to_string(), one.clone())
                    && before.owner != one.owner
                {
                    tracing::info!(disk, owner = %one.owner, before = %before.owner, "disk moved to another member");
                }
            }
            more => {
                self.remote.remove(disk);
                let owners: Vec<&str> = more.iter().map(|r| r.owner.as_str()).collect();
                tracing::warn!(
                    disk,
                    ?owners,
                    "several members own a disk of this id; it is served by none of them until all but one drop it"
                );
            }
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
        // count too: one whose list was not fetched again (a refetch that failed after
        // `fetched` was cleared) must not leave its disks behind.
        let mut gone: Vec<String> = self
            .fetched
            .iter()
            .map(|e| e.key().clone())
            .chain(self.remote.iter().map(|r| r.value().owner.clone()))
            .filter(|id| !live.contains_key(id))
            .collect();
        gone.sort();
        gone.dedup();
        for id in &gone {
            self.fetched.remove(id);
            self.peers.forget(id);
            let before = self.remote.len();
            let now = std::time::Instant::now();
            self.remote.retain(|disk, r| {
                if &r.owner == id {
                    self.departed.insert(disk.clone(), (id.clone(), now));
                    return false;
                }
                true
            });
            let mut settle = Vec::new();
            for mut c in self.claims.iter_mut() {
                if c.value_mut().remove(id).is_some() {
                    settle.push(c.key().clone());
                }
            }
            for disk in &settle {
                // A dispute it was part of may end: the other claimant's disk shows.
                self.settle(disk);
            }
            tracing::info!(member = %id, disks = before - self.remote.len(), "member left; its disks are no longer served here");
        }
        if !gone.is_empty() {
            // Their shadows go now, before the lists of the others are fetched.
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
                    // Entries are replaced in place and the member's vanished disks removed
                    // after: a concurrent read never sees a disk of this member missing.
                    let ids: crate::hashing::HashSet<String> =
                        disks.iter().map(|d| d.id.clone()).collect();
                    for d in disks {
                        if local(&d.id) {
                            tracing::warn!(disk = %d.id, owner = %m.id, "a disk of this id is local here; the remote one is ignored");
                            continue;
                        }
                        self.departed.invalidate(&d.id);
                        let id = d.id.clone();
                        self.claims.entry(id.clone()).or_default().insert(
                            m.id.clone(),
                            RemoteDisk {
                                owner: m.id.clone(),
                                addr: m.peer_addr,
                                info: d,
                            },
                        );
                        self.settle(&id);
                    }
                    let mut dropped = Vec::new();
                    for mut c in self.claims.iter_mut() {
                        if !ids.contains(c.key()) && c.value_mut().remove(&m.id).is_some() {
                            dropped.push(c.key().clone());
                        }
                    }
                    for disk in &dropped {
                        self.settle(disk);
                    }
                    self.fetched.insert(m.id.clone(), (m.boot, disks_version));
                    self.hinted.remove_if(&m.id, |_, h| h.0 <= disks_version);
                }
                Err(e) => {
                    tracing::warn!(member = %m.id, error = %e, "could not fetch a member's disks; retrying");
                }
            }
        }
        self.sync_shadows();
        self.sync_subscriptions(&live);
    }
}

//! The disk registry and each disk's state machine.
//!
//! A disk is registered from the config file or through Admin: an id, an origin on this node
//! (this node is its owner), a mode. The states:
//!
//! ```text
//!   mutable ──seal──► sealing (new writes refused; in-flight writes drain; origin flushed) ──► sealed
//!      ▲ │
//!      │ └─detect (no write in flight; new generation saved)──► detected (served from caches
//!      │                                                          under leases)
//!      └──── revoking (no new leases; holders revoked; reads from the origin) ◄──write/drop─┘
//! ```
//!
//! Sealed is for ever. Detected lasts until a write or an operator ends it; the generation is
//! bumped when it starts (and saved before any lease is granted) and again when it ends, so a
//! cache tagged with a generation can never outlive the bytes it describes.
//!
//! A sealed disk is read-only for ever and served through the content cache; its content map
//! lives here. Disks registered through Admin, and every seal, are saved in `disks.toml` in the
//! data directory, so that a restart keeps them (a sealed disk must never become writable again
//! because a config file still says `mutable`).
//!
//! Architecture invariant: no lock is held across an await; the seal waits for writes with an
//! in-flight counter and a `Notify`.

pub mod content_map;
pub mod identity;
pub mod order;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::hashing::DashMap;
use serde::{Deserialize, Serialize};

pub use content_map::{BlockRef, ContentMap};

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::origin::{FileOrigin, Origin};

/// A disk to register at start.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSpec {
    /// Disk id.
    pub id: String,
    /// Origin path (raw image or block device).
    pub origin: PathBuf,
    /// Mode.
    pub mode: DiskMode,
}

/// What a client sees of a disk.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskInfo {
    /// Disk id.
    pub id: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Mode.
    pub mode: DiskMode,
    /// Generation.
    pub generation: u64,
    /// Origin as registered.
    pub origin: String,
    /// Owner node id.
    pub owner: String,
    /// Random per registration at the owner.
    pub epoch: u64,
    /// Detection pinned off (owner only).
    pub pinned: bool,
    /// Members that read it in the detection window (owner only).
    pub readers: Vec<String>,
    /// Members holding a lease on it (owner only).
    pub lease_holders: Vec<String>,
    /// Blocks whose content this node knows (its coverage of an immutable disk).
    pub known_blocks: u64,
    /// Blocks of the disk.
    pub total_blocks: u64,
    /// This node holds a valid lease on it (a detected disk another member owns).
    pub lease_valid: bool,
    /// Blocks other members hold, from their block maps: (member, blocks).
    pub coverage: Vec<(String, u64)>,
}

pub use crate::ids::DiskId;

/// How a disk is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskMode {
    /// Reads and writes go to the origin; nothing is cached.
    Mutable,
    /// Read-only for ever; served through the content cache.
    Sealed,
    /// Found read-only by several members; immutable under leases until a write. Reported
    /// only: never a mode to register a disk with.
    Detected,
}

impl DiskMode {
    /// The config and CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskMode::Mutable => "mutable",
            DiskMode::Sealed => "sealed",
            DiskMode::Detected => "detected",
        }
    }
}

const MUTABLE: u8 = 0;
const SEALING: u8 = 1;
const SEALED: u8 = 2;
const DETECTED: u8 = 3;
const REVOKING: u8 = 4;

static INSTANCES: AtomicU64 = AtomicU64::new(1);

/// One registered disk.
#[derive(Debug)]
pub struct Disk {
    /// Its id.
    pub id: DiskId,
    /// Its origin (this node owns every disk it registers).
    pub origin: Arc<dyn Origin>,
    /// Size in bytes, from the origin.
    pub size: u64,
    /// Unique among the disk objects of this process (keys single flights).
    pub instance: u64,
    /// Random per registration: tells members that a disk of the same id and generation was
    /// registered again (an owner restart, an image replaced) and their caches of it must go.
    pub epoch: u64,
    /// Detection and leases (used at the owner only).
    pub owner: crate::cluster::detect::OwnerState,
    /// The blocks of it this node holds (its block map, for other members).
    pub held: crate::cluster::blockmap::HeldBlocks,
    /// Writes in flight, in arrival order: overlapping ones reach the origin in that order.
    pub writes: order::WriteOrder,
    /// For the shadow of a disk another member owns: how its fingerprints and blocks are
    /// fetched. `None` for a disk this node owns.
    pub remote: Option<Arc<crate::cluster::fetch::Remote>>,
    state: AtomicU8,
    generation: AtomicU64,
    writes_in_flight: AtomicU64,
    writes_drained: tokio::sync::Notify,
    sealed: tokio::sync::Notify,
    map: OnceLock<Arc<ContentMap>>,
    /// The content map of the current detected generation.
    detected_map: parking_lot::RwLock<Option<Arc<ContentMap>>>,
}

impl crate::cluster::blockmap::AsHeld for Disk {
    fn held(&self) -> &crate::cluster::blockmap::HeldBlocks {
        &self.held
    }
}

/// Where a disk stands, as its owner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskState {
    /// Reads and writes go to the origin.
    Mutable,
    /// A seal is draining writes.
    Sealing,
    /// Read-only for ever.
    Sealed,
    /// Immutable under leases.
    Detected,
    /// Leases being revoked before a write.
    Revoking,
}

/// Holds a write's place in the in-flight count; dropping it lets a pending seal go on.
///
/// It owns its disk so that it can move into the task that performs the write: a write whose
/// caller went away still holds off a seal until the bytes have reached the origin.
#[derive(Debug)]
pub struct WriteGuard(Arc<Disk>);

impl Drop for WriteGuard {
    fn drop(&mut self) {
        if self.0.writes_in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.writes_drained.notify_waiters();
        }
    }
}

impl Disk {
    fn new(id: DiskId, origin: Arc<dyn Origin>, epoch: u64, now: Duration) -> Self {
        let instance = INSTANCES.fetch_add(1, Ordering::Relaxed);
        Disk {
            size: origin.size(),
            id,
            origin,
            instance,
            epoch: epoch.max(1),
            owner: crate::cluster::detect::OwnerState::new(now),
            held: Default::default(),
            writes: Default::default(),
            remote: None,
            state: AtomicU8::new(MUTABLE),
            generation: AtomicU64::new(1),
            writes_in_flight: AtomicU64::new(0),
            writes_drained: tokio::sync::Notify::new(),
            sealed: tokio::sync::Notify::new(),
            map: OnceLock::new(),
            detected_map: parking_lot::RwLock::new(None),
        }
    }

    /// The local shadow of a sealed or detected disk another member owns, served through the
    /// cache with a bounded copy of the owner's content map, filled as it is read.
    pub fn shadow(
        id: DiskId,
        remote: Arc<crate::cluster::fetch::Remote>,
        generation: u64,
        block_bytes: u64,
    ) -> Arc<Disk> {
        // A shadow's epoch and clock are its owner's business: they are not used here.
        let epoch = remote.epoch();
        let mut d = Disk::new(id, remote.clone(), epoch, Duration::ZERO);
        d.remote = Some(remote);
        d.state.store(SEALED, Ordering::SeqCst);
        d.generation.store(generation, Ordering::SeqCst);
        let _ = d.map.set(Arc::new(crate::cluster::fetch::Remote::empty_map(
            block_bytes,
        )));
        Arc::new(d)
    }

    /// The state now.
    pub fn state(&self) -> DiskState {
        match self.state.load(Ordering::SeqCst) {
            MUTABLE => DiskState::Mutable,
            SEALING => DiskState::Sealing,
            SEALED => DiskState::Sealed,
            DETECTED => DiskState::Detected,
            _ => DiskState::Revoking,
        }
    }

    /// The mode clients see: sealed once the seal is complete, detected while detected;
    /// mutable otherwise (a disk being sealed already refuses writes, but members must not
    /// cache it before its seal is complete).
    pub fn mode(&self) -> DiskMode {
        match self.state.load(Ordering::SeqCst) {
            SEALED => DiskMode::Sealed,
            DETECTED => DiskMode::Detected,
            _ => DiskMode::Mutable,
        }
    }

    /// The map reads are served through: the saved one of a sealed disk, the one of the
    /// current generation of a detected disk; `None` (read the origin) otherwise.
    #[inline]
    pub fn serving_map(&self) -> Option<Arc<ContentMap>> {
        match self.state.load(Ordering::Acquire) {
            SEALED => self.map.get().cloned(),
            DETECTED => self.detected_map.read().clone(),
            _ => None,
        }
    }

    /// The content map, once the disk is sealed.
    #[inline]
    pub fn sealed_map(&self) -> Option<&ContentMap> {
        if self.state.load(Ordering::Acquire) == SEALED {
            self.map.get().map(|m| &**m)
        } else {
            None
        }
    }

    /// Makes a mutable disk detected-immutable at `generation` (already saved). Refused
    /// (false) when the disk is not mutable or a write is in flight.
    pub fn begin_detected(&self, generation: u64) -> bool {
        if self.state.load(Ordering::SeqCst) != MUTABLE {
            return false;
        }
        self.generation.fetch_max(generation, Ordering::SeqCst);
        *self.detected_map.write() = Some(Arc::new(ContentMap::in_memory()));
        if self
            .state
            .compare_exchange(MUTABLE, DETECTED, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            *self.detected_map.write() = None;
            return false;
        }
        // A writer bumps the in-flight count before it looks at the state; one that looked
        // before our switch is still counted here, and we step back.
        if self.writes_in_flight.load(Ordering::SeqCst) > 0 {
            let _ =
                self.state
                    .compare_exchange(DETECTED, MUTABLE, Ordering::SeqCst, Ordering::SeqCst);
            *self.detected_map.write() = None;
            return false;
        }
        true
    }

    /// Detected -> mutable, right after [`Disk::begin_detected`] and before any lease could be
    /// granted (a write or a pin came in meanwhile).
    pub fn abort_detected(&self) {
        if self
            .state
            .compare_exchange(DETECTED, MUTABLE, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            *self.detected_map.write() = None;
        }
    }

    /// Detected -> revoking, with a new generation: no read is served from a cache of the old
    /// one from now on at this node, and members asking for it are refused. Call with the
    /// owner's lease table locked. False if the disk was not detected.
    pub fn begin_revoking(&self) -> bool {
        if self
            .state
            .compare_exchange(DETECTED, REVOKING, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return false;
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        *self.detected_map.write() = None;
        true
    }

    /// Revoking -> mutable: every lease is over.
    pub fn end_revoking(&self) {
        let _ = self
            .state
            .compare_exchange(REVOKING, MUTABLE, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Sets the generation restored from saved state (never lowers it).
    pub fn restore_generation(&self, generation: u64) {
        self.generation.fetch_max(generation, Ordering::SeqCst);
    }

    /// The generation: bumped whenever the disk's contents or mode may change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Admits one write: `Ok(Some)` to go on, `Ok(None)` when the disk is detected or
    /// revoking (end that first, then try again), or "disk is sealed".
    pub fn begin_write(self: &Arc<Self>) -> Result<Option<WriteGuard>> {
        self.writes_in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = WriteGuard(self.clone());
        match self.state.load(Ordering::SeqCst) {
            MUTABLE => Ok(Some(guard)),
            DETECTED | REVOKING => Ok(None),
            _ => Err(Error::Sealed(self.id.to_string())),
        }
    }

    /// Seals the disk: refuses new writes, waits for in-flight writes, flushes the origin,
    /// then serves reads through the cache with the map `map` builds (on the blocking pool: it
    /// may read a saved map). Idempotent; concurrent calls all return once the disk is sealed.
    ///
    /// The transition runs in a task of its own, so a caller that goes away (a cancelled RPC)
    /// cannot leave the disk half sealed.
    pub async fn seal(
        self: &Arc<Self>,
        map: impl FnOnce() -> ContentMap + Send + 'static,
    ) -> Result<()> {
        let disk = self.clone();
        tokio::spawn(async move { disk.seal_to_the_end(map).await })
            .await
            .map_err(|e| Error::State(format!("seal task: {e}")))?
    }

    async fn seal_to_the_end(
        &self,
        map: impl FnOnce() -> ContentMap + Send + 'static,
    ) -> Result<()> {
        match self
            .state
            .compare_exchange(MUTABLE, SEALING, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => {}
            Err(SEALED) => return Ok(()),
            Err(DETECTED | REVOKING) => {
                return Err(Error::Invalid(format!(
                    "disk {:?} is detected-immutable: drop its shadow clones first",
                    self.id.as_str()
                )));
            }
            Err(_) => loop {
                let notified = self.sealed.notified();
                match self.state.load(Ordering::SeqCst) {
                    SEALED => return Ok(()),
                    MUTABLE => {
                        return Err(Error::State(format!(
                            "the seal of disk {:?} running at the same time failed; it is still mutable",
                            self.id.as_str()
                        )));
                    }
                    _ => notified.await,
                }
            },
        }
        loop {
            let drained = self.writes_drained.notified();
            if self.writes_in_flight.load(Ordering::SeqCst) == 0 {
                break;
            }
            drained.await;
        }
        // Acknowledged writes must be durable before the disk claims to be immutable: a seal
        // whose flush failed leaves the disk mutable (and says so), so that the failure is not
        // hidden behind the success a sealed disk's flushes report.
        if let Err(e) = self.origin.flush().await {
            tracing::warn!(disk = %self.id, error = %e, "flush before seal failed; the disk stays mutable");
            self.state.store(MUTABLE, Ordering::SeqCst);
            self.sealed.notify_waiters();
            return Err(Error::State(format!(
                "disk {:?} not sealed: its origin's flush failed: {e}",
                self.id.as_str()
            )));
        }
        let map = crate::blocking::run(map)
            .await
            .map_err(|e| Error::State(format!("content map task: {e}")))?;
        let _ = self.map.set(Arc::new(map));
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.state.store(SEALED, Ordering::Release);
        self.sealed.notify_waiters();
        tracing::info!(disk = %self.id, reason = "operator", "disk sealed");
        Ok(())
    }
}

/// A disk as saved in `disks.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SavedDisk {
    /// Disk id.
    pub id: String,
    /// Origin path.
    pub origin: PathBuf,
    /// Mode (mutable or sealed; a detected disk is saved as mutable with `detected`).
    pub mode: DiskMode,
    /// The generation when saved (0: not saved by this version).
    #[serde(default)]
    pub generation: u64,
    /// It was detected-immutable: leases may have been granted before a crash.
    #[serde(default)]
    pub detected: bool,
    /// Detection pinned off by an operator.
    #[serde(default)]
    pub pinned: bool,
    /// With `detected`: the lease term plus drift margin leases were granted with, in ms
    /// (a restart with a shorter term still waits this long).
    #[serde(default)]
    pub lease_fence_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedState {
    #[serde(default)]
    disk: Vec<SavedDisk>,
}

/// Where the registry saves its disks.
pub fn saved_disks_path(data_dir: &Path) -> PathBuf {
    data_dir.join("disks.toml")
}

/// The (id, origin) of every disk saved in `data_dir`, as far as the file can be read (nothing
/// when it is missing or damaged: the registry says so when it loads it).
pub fn saved_origins(data_dir: &Path) -> Vec<(String, PathBuf)> {
    std::fs::read_to_string(saved_disks_path(data_dir))
        .ok()
        .and_then(|t| toml::from_str::<SavedState>(&t).ok())
        .map(|s| s.disk.into_iter().map(|d| (d.id, d.origin)).collect())
        .unwrap_or_default()
}

/// Every disk of this node, by id.
#[derive(Debug)]
pub struct Registry {
    disks: DashMap<DiskId, Arc<Disk>>,
    origins: DashMap<DiskId, PathBuf>,
    /// (device, inode) of every file origin: one origin under two ids would let a sealed alias
    /// serve bytes that writes through the other id replaced.
    /// What each registered origin is beneath its name: one origin backs one disk at most.
    origin_ids: parking_lot::Mutex<Vec<(identity::Identity, DiskId)>>,
    /// Put in front of every origin registered (tests).
    wrap: parking_lot::RwLock<Option<crate::origin::OriginWrap>>,
    /// Saved disks that could not be registered again at start (an origin not mounted yet):
    /// kept in `disks.toml` so that their seal is not forgotten.
    unrestored: parking_lot::Mutex<Vec<SavedDisk>>,
    block_bytes: u32,
    data_dir: PathBuf,
    save_lock: tokio::sync::Mutex<()>,
    /// How long writes to a disk that was detected before a restart wait (a lease term plus
    /// the drift margin).
    lease_fence: Duration,
    clock: Arc<dyn Clock>,
    /// Epochs: a new random one for every registration.
    rng: parking_lot::Mutex<rand::rngs::StdRng>,
    /// Where file origins may come from, and the node's own files outside the data directory.
    guard: parking_lot::RwLock<OriginGuard>,
}

/// What a file origin may not be: outside the allowed roots, or a file the node owns.
#[derive(Debug, Default, Clone)]
pub struct OriginGuard {
    /// Directories origins must lie in (canonical); empty: anywhere.
    pub roots: Vec<PathBuf>,
    /// The node's files outside its data directory (the SSD tier's slot and index files).
    pub own_files: Vec<PathBuf>,
}

impl OriginGuard {
    /// Refuses `path` (opened as `id`: device and inode) when it lies outside the roots, or is
    /// one of the node's own files, under any name (a hard link or a symlink included).
    fn check(&self, path: &Path, id: Option<(u64, u64)>, data_dir: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if !self.roots.is_empty() && !self.roots.iter().any(|r| canonical.starts_with(r)) {
            return Err(Error::Invalid(format!(
                "origin {} is outside admin.origin_roots ({})",
                path.display(),
                self.roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let Some(id) = id else {
            return Ok(());
        };
        let same = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .is_some_and(|m| (m.dev(), m.ino()) == id)
        };
        let mut mine: Vec<PathBuf> = self.own_files.clone();
        // The data directory, three levels down (maps/, the cache's files): every file in it.
        let mut dirs = vec![(data_dir.to_path_buf(), 0)];
        while let Some((dir, depth)) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                match e.file_type() {
                    Ok(t) if t.is_dir() && depth < 3 => dirs.push((e.path(), depth + 1)),
                    Ok(t) if t.is_file() => mine.push(e.path()),
                    _ => {}
                }
            }
        }
        if let Some(p) = mine.iter().find(|p| same(p)) {
            return Err(Error::Invalid(format!(
                "origin {} is the node's own file {}",
                path.display(),
                p.display()
            )));
        }
        Ok(())
    }
}

impl Registry {
    /// An empty registry keeping its state under `data_dir`, reading time from `clock` and
    /// drawing epochs from a generator seeded with `seed`.
    pub fn new(
        data_dir: &Path,
        block_bytes: u32,
        lease_fence: Duration,
        clock: Arc<dyn Clock>,
        seed: u64,
    ) -> Self {
        use rand::SeedableRng;
        Registry {
            clock,
            rng: parking_lot::Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            disks: crate::hashing::dash_map(),
            origins: crate::hashing::dash_map(),
            origin_ids: parking_lot::Mutex::new(Vec::new()),
            wrap: parking_lot::RwLock::new(None),
            unrestored: parking_lot::Mutex::new(Vec::new()),
            block_bytes,
            data_dir: data_dir.to_path_buf(),
            save_lock: tokio::sync::Mutex::new(()),
            lease_fence,
            guard: parking_lot::RwLock::new(OriginGuard::default()),
        }
    }

    /// Sets where file origins may come from and which files outside the data directory are
    /// the node's own. Roots are made canonical; a root that does not exist is an error.
    pub fn set_origin_guard(&self, mut guard: OriginGuard) -> Result<()> {
        for r in &mut guard.roots {
            *r = r
                .canonicalize()
                .map_err(|e| Error::Invalid(format!("admin.origin_roots: {}: {e}", r.display())))?;
        }
        *self.guard.write() = guard;
        Ok(())
    }

    /// Puts `w` in front of every origin registered from now on.
    pub fn set_origin_wrap(&self, w: crate::origin::OriginWrap) {
        *self.wrap.write() = Some(w);
    }

    fn wrapped(&self, id: &str, o: Arc<dyn Origin>) -> Arc<dyn Origin> {
        match &*self.wrap.read() {
            Some(w) => (w.0)(id, o),
            None => o,
        }
    }

    fn state_path(&self) -> PathBuf {
        saved_disks_path(&self.data_dir)
    }

    fn map_path(&self, id: &DiskId) -> PathBuf {
        self.data_dir.join("maps").join(format!("{id}.map"))
    }

    /// The disk with this id.
    #[inline]
    pub fn get(&self, id: &str) -> Result<Arc<Disk>> {
        // DiskId borrows as str (same hash), so the hot path allocates nothing.
        self.disks
            .get(id)
            .map(|d| d.value().clone())
            .ok_or_else(|| Error::UnknownDisk(id.chars().take(160).collect()))
    }

    /// Every disk, sorted by id.
    pub fn list(&self) -> Vec<Arc<Disk>> {
        let mut v: Vec<Arc<Disk>> = self.disks.iter().map(|d| d.value().clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// The origin path a disk was registered with.
    pub fn origin_path(&self, id: &DiskId) -> Option<PathBuf> {
        self.origins.get(id).map(|p| p.clone())
    }

    /// Registers a disk whose origin is the file or block device at `origin`, and remembers the
    /// path so that [`Registry::save`] can write it down.
    pub async fn register(&self, id: &str, origin: &Path, mode: DiskMode) -> Result<Arc<Disk>> {
        let parsed = DiskId::parse(id)?;
        if self.disks.contains_key(&parsed) {
            return Err(Error::DiskExists(id.to_string()));
        }
        let writable = mode == DiskMode::Mutable;
        if let Some(uri) = origin
            .to_str()
            .filter(|s| crate::origin::nbd::is_nbd_uri(s))
        {
            let parsed_uri = crate::origin::nbd::NbdUri::parse(uri).map_err(|cause| {
                Error::Origin(crate::origin::OriginError::Open {
                    origin: uri.to_string(),
                    cause,
                })
            })?;
            let ident = crate::blocking::run(move || identity::of_nbd(&parsed_uri))
                .await
                .map_err(|e| Error::State(e.to_string()))?;
            // Opened first: what the export itself refuses (a read-only export for a mutable
            // disk) is said before that it is taken.
            let o = crate::origin::NbdOrigin::open(uri, writable).await?;
            self.claim(origin, ident.clone(), &parsed)?;
            let registered = self
                .register_origin(id, self.wrapped(id, Arc::new(o)), mode)
                .await;
            let disk = match registered {
                Ok(d) => d,
                Err(e) => {
                    self.release(&ident);
                    return Err(e);
                }
            };
            self.origins.insert(disk.id.clone(), origin.to_path_buf());
            self.restore_unrestored(&disk).await?;
            return Ok(disk);
        }
        let path = origin.to_path_buf();
        let data_dir = self.data_dir.clone();
        let guard = self.guard.read().clone();
        let file = crate::blocking::run(move || {
            // The node's own files (slot file, index, maps) are never a disk.
            if let (Ok(o), Ok(d)) = (path.canonicalize(), data_dir.canonicalize())
                && o.starts_with(&d)
            {
                return Err(Error::Invalid(format!(
                    "origin {} lies inside the node's data directory {}",
                    path.display(),
                    data_dir.display()
                )));
            }
            // Roots first: a path outside them is not even opened.
            guard.check(&path, None, &data_dir)?;
            let file = FileOrigin::open(&path, writable).map_err(Error::from)?;
            guard.check(&path, file.file_id(), &data_dir)?;
            let ident = identity::of_path(&path)
                .map_err(|e| Error::Invalid(format!("origin {}: {e}", path.display())))?;
            Ok((file, ident))
        })
        .await
        .map_err(|e| Error::State(e.to_string()))??;
        let (file, ident) = file;
        self.claim(origin, ident.clone(), &parsed)?;
        match self
            .register_origin(id, self.wrapped(id, Arc::new(file)), mode)
            .await
        {
            Ok(disk) => {
                self.origins.insert(disk.id.clone(), origin.to_path_buf());
                self.restore_unrestored(&disk).await?;
                Ok(disk)
            }
            Err(e) => {
                self.release(&ident);
                Err(e)
            }
        }
    }

    /// Takes `ident` for disk `id`, unless a registered origin is (part of) the same storage:
    /// the same file under another name, a partition of a registered disk or the disk of a
    /// registered partition, a loop device over a registered file, one NBD export named twice.
    fn claim(&self, origin: &Path, ident: identity::Identity, id: &DiskId) -> Result<()> {
        let mut all = self.origin_ids.lock();
        if let Some((_, other)) = all.iter().find(|(i, _)| i.overlaps(&ident)) {
            return Err(Error::Invalid(format!(
                "origin {} names storage that is already the origin of disk {:?} (the same file, device or NBD export, or part of it)",
                origin.display(),
                other.as_str()
            )));
        }
        all.push((ident, id.clone()));
        Ok(())
    }

    fn release(&self, ident: &identity::Identity) {
        self.origin_ids.lock().retain(|(i, _)| i != ident);
    }

    /// Takes back a registration that could not be saved (a full data directory): the disk,
    /// its origin path and its claim on the origin's storage go, so that the client's error
    /// is the whole truth and a retry can succeed once there is room. What `disks.toml` held
    /// of the disk stays (see `restore_unrestored`). A save that failed after its rename (only
    /// the directory's sync failed) leaves the disk in the file: it comes back at the next start.
    pub fn unregister_unsaved(&self, id: &str) {
        let Ok(id) = DiskId::parse(id) else {
            return;
        };
        self.disks.remove(&id);
        self.origins.remove(&id);
        self.origin_ids.lock().retain(|(_, d)| d != &id);
    }

    /// Registers a disk over any origin (tests use counting and failing ones). Not saved.
    pub async fn register_origin(
        &self,
        id: &str,
        origin: Arc<dyn Origin>,
        mode: DiskMode,
    ) -> Result<Arc<Disk>> {
        let id = DiskId::parse(id)?;
        if self.disks.contains_key(&id) {
            return Err(Error::DiskExists(id.to_string()));
        }
        let epoch = rand::Rng::random::<u64>(&mut *self.rng.lock());
        let disk = Arc::new(Disk::new(id.clone(), origin, epoch, self.clock.now()));
        // Claim the id first, so that two concurrent registrations never both seal (and both
        // append to one saved content map). Until the seal completes, reads go to the origin.
        match self.disks.entry(id.clone()) {
            dashmap::Entry::Occupied(_) => return Err(Error::DiskExists(id.to_string())),
            dashmap::Entry::Vacant(v) => {
                v.insert(disk.clone());
            }
        }
        if mode == DiskMode::Sealed
            && let Err(e) = self.seal_disk(&disk).await
        {
            self.disks.remove(&id);
            return Err(e);
        }
        tracing::info!(disk = %id, origin = disk.origin.describe(), size = disk.size, mode = mode.as_str(), "disk registered");
        Ok(disk)
    }

    async fn seal_disk(&self, disk: &Arc<Disk>) -> Result<()> {
        let path = self.map_path(&disk.id);
        let block_bytes = self.block_bytes;
        let origin = disk.origin.clone();
        // The identity is read after the flush inside seal(), so that our own last writes
        // do not make the saved map look stale.
        disk.seal(move || {
            let identity = origin.identity();
            ContentMap::open(&path, block_bytes, identity.as_deref())
        })
        .await
    }

    /// Seals a disk and saves that it is sealed.
    pub async fn seal(&self, id: &str) -> Result<Arc<Disk>> {
        let disk = self.get(id)?;
        self.seal_disk(&disk).await?;
        self.save().await?;
        Ok(disk)
    }

    /// Loads `disks.toml` and registers (or seals) what it names. A disk the config already
    /// registered keeps its config origin; a saved seal always wins.
    pub async fn load_saved(&self) -> Result<()> {
        let path = self.state_path();
        let read = path.clone();
        let text = match crate::blocking::run(move || std::fs::read_to_string(read))
            .await
            .map_err(|e| Error::State(format!("{}: {e}", path.display())))?
        {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::State(format!("{}: {e}", path.display()))),
        };
        let saved: SavedState =
            toml::from_str(&text).map_err(|e| Error::State(format!("{}: {e}", path.display())))?;
        for d in saved.disk {
            let disk = match self.get(&d.id) {
                Ok(disk) => disk,
                Err(_) => match self.register(&d.id, &d.origin, d.mode).await {
                    Ok(disk) => disk,
                    Err(e) => {
                        tracing::warn!(disk = %d.id, error = %e, "saved disk could not be registered again; it stays in disks.toml");
                        self.unrestored.lock().push(d);
                        continue;
                    }
                },
            };
            self.apply_saved(&disk, &d).await?;
        }
        Ok(())
    }

    /// A saved disk that could not come back at start (its origin was not there) and is
    /// registered now keeps what was saved of it: its seal, generation, pin, and the wait for
    /// leases granted before the restart.
    async fn restore_unrestored(&self, disk: &Arc<Disk>) -> Result<()> {
        // The entry stays: `save` writes the registered disk in its place, and a registration
        // taken back ([`Registry::unregister_unsaved`]) must not lose what was saved of it.
        let saved = {
            let u = self.unrestored.lock();
            u.iter().find(|d| d.id == disk.id.as_str()).cloned()
        };
        if let Some(saved) = saved {
            self.apply_saved(disk, &saved).await?;
        }
        Ok(())
    }

    /// Gives a disk what was saved of it: a seal always wins; the generation never goes back;
    /// a pin stays; a disk that was detected holds writes until leases granted before the
    /// restart are surely over, at a generation above theirs.
    async fn apply_saved(&self, disk: &Arc<Disk>, d: &SavedDisk) -> Result<()> {
        if d.mode == DiskMode::Sealed && disk.mode() == DiskMode::Mutable {
            tracing::info!(disk = %d.id, "disk was sealed before the restart; sealing it again");
            self.seal_disk(disk).await?;
        }
        disk.restore_generation(d.generation);
        disk.owner.set_pinned(d.pinned);
        if d.detected {
            let fence = self
                .lease_fence
                .max(Duration::from_millis(d.lease_fence_ms.min(86_400_000)));
            disk.restore_generation(d.generation + 1);
            disk.owner.fence(self.clock.now() + fence);
            tracing::info!(disk = %d.id, fence_ms = fence.as_millis() as u64, "disk was detected-immutable before the restart; writes wait until its leases are surely over");
        }
        Ok(())
    }

    /// Writes `disks.toml` durably: a temporary file, synced, renamed over the old one, and the
    /// directory synced, so that a power cut leaves the old list or the new one, never neither.
    pub async fn save(&self) -> Result<()> {
        let _held = self.save_lock.lock().await;
        let mut disk: Vec<SavedDisk> = self
            .list()
            .iter()
            .filter_map(|d| {
                let state = d.state();
                Some(SavedDisk {
                    id: d.id.to_string(),
                    origin: self.origin_path(&d.id)?,
                    mode: if state == DiskState::Sealed {
                        DiskMode::Sealed
                    } else {
                        DiskMode::Mutable
                    },
                    generation: d.generation(),
                    detected: matches!(state, DiskState::Detected | DiskState::Revoking)
                        || d.owner.detecting.load(Ordering::SeqCst),
                    pinned: d.owner.pinned(),
                    lease_fence_ms: self.lease_fence.as_millis() as u64,
                })
            })
            .collect();
        for d in self.unrestored.lock().iter() {
            if !disk.iter().any(|x| x.id == d.id) {
                disk.push(d.clone());
            }
        }
        let text =
            toml::to_string(&SavedState { disk }).map_err(|e| Error::State(e.to_string()))?;
        let path = self.state_path();
        let dir = self.data_dir.clone();
        crate::blocking::run(move || -> std::io::Result<()> {
            use std::io::Write;
            let tmp = path.with_extension("toml.tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| Error::State(e.to_string()))?
        .map_err(|e| Error::State(format!("{}: {e}", self.state_path().display())))
    }

    /// Makes every sealed disk's content map durable (clean shutdown). Blocks.
    pub fn sync_maps(&self) {
        for d in self.list() {
            if let Some(m) = d.map.get() {
                m.sync();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_ids_are_checked() {
        for ok in ["replica", "w7-base.v2", "A_1"] {
            assert!(DiskId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "sp ace", &"x".repeat(129)] {
            assert!(
                matches!(
                    DiskId::parse(bad).map_err(Error::from),
                    Err(Error::InvalidDiskId(_))
                ),
                "{bad}"
            );
        }
    }
}

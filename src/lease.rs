//! One writer per replica: the lease a replicator holds before it writes.
//!
//! Two replicators shipping one replica interleave their segments and break
//! its history (a rolling deploy with two pods for a minute is enough), and
//! two databases given one replica path mix their generations. So before it
//! writes anything, a replicator takes the replica's lease, `lease.json` at
//! its root, which names the holder (host, process, database) and an epoch
//! that grows with every new holder:
//!
//! * In a directory, the lease file is locked with `flock` for as long as
//!   the process lives; the kernel lets go when it exits, however it exits.
//!   Local filesystems only: `flock` over NFS is not to be trusted.
//! * In S3, the lease object is created with `If-None-Match: *` and renewed
//!   with `If-Match: <etag>` every third of its `ttl`. Another process takes
//!   it over only after seeing it unchanged for a whole `ttl` by its own
//!   monotonic clock (so no clock has to agree with another), or at once
//!   when the holder released it. A holder that has not renewed within
//!   `ttl` minus a margin stops writing (`valid` is false), before anyone
//!   may take over; one whose renewal finds the object changed has lost it
//!   and writes nothing more.
//!
//! A lease held by the same database path elsewhere (the old pod of a
//! rolling deploy) is waited for, or refused at once with `wait: false`; one
//! held for another database is always refused: those are two databases
//! sharing a replica by mistake. Storage that ignores conditional writes is
//! found at start with one test write and refused unless the lease is
//! configured `required: false`.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::shutdown::Shutdown;
use crate::storage::{Conditional, DynStorage, ReplicaTarget, StorageError, Version};

/// The lease's key at the replica's root.
pub const KEY: &str = "lease.json";

/// Who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    pub database: String,
}

impl Holder {
    /// This process, replicating `database`.
    pub fn me(database: &str) -> Holder {
        Holder {
            host: hostname(),
            pid: std::process::id(),
            database: database.to_string(),
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "database {} (process {} on {})",
            self.database, self.pid, self.host
        )
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `lease.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    holder: Holder,
    epoch: u64,
    ttl_ms: u64,
    /// Set by a holder that stopped cleanly: the next may take it at once.
    #[serde(default)]
    released: bool,
    /// The generation the holder writes (once it has begun or resumed one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    generation: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseOptions {
    pub ttl: Duration,
    /// Wait for a lease held by another process (else fail at once).
    pub wait: bool,
    /// Refuse storage that cannot do conditional writes (else run without
    /// a lease, with a warning).
    pub required: bool,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            ttl: crate::defaults::LEASE_TTL,
            wait: true,
            required: true,
        }
    }
}

enum Held {
    Not,
    /// A directory's lease file, locked while this stays open, and the
    /// epoch written in it.
    Lock(std::fs::File, u64),
    Object {
        version: Version,
        epoch: u64,
        /// When the last renewal was sent (it succeeded).
        renewed: Instant,
    },
    /// `required: false` on storage without conditional writes.
    Unleased,
}

/// A replica's lease, held by this process once `acquire` returned.
pub struct Lease {
    storage: DynStorage,
    location: String,
    /// A directory replica's root (flock), `None` for object storage.
    dir: Option<PathBuf>,
    holder: Holder,
    opts: LeaseOptions,
    held: Mutex<Held>,
    /// The generation this holder writes, named in the lease record.
    generation: Mutex<Option<String>>,
    /// Why this process lost the lease, once it has: for good.
    lost: tokio::sync::watch::Sender<Option<String>>,
    acquired: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// The lease of the replica at `target` (`storage` opens it), for
    /// `holder`. Nothing is contacted yet.
    pub fn new(
        storage: DynStorage,
        target: &ReplicaTarget,
        holder: Holder,
        opts: LeaseOptions,
    ) -> Arc<Lease> {
        let dir = match target {
            ReplicaTarget::File { path } => Some(path.clone()),
            ReplicaTarget::S3(_) => None,
        };
        Arc::new(Lease {
            location: storage.location(),
            storage,
            dir,
            holder,
            opts,
            held: Mutex::new(Held::Not),
            generation: Mutex::new(None),
            lost: tokio::sync::watch::Sender::new(None),
            acquired: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Whether this process may write the replica now.
    pub fn valid(&self) -> bool {
        if self.lost.borrow().is_some() {
            return false;
        }
        match &*self.held.lock().unwrap() {
            Held::Not => false,
            Held::Lock(..) | Held::Unleased => true,
            Held::Object { renewed, .. } => renewed.elapsed() < self.opts.ttl - self.margin(),
        }
    }

    /// The epoch this process holds the lease under (`None`: not held, or a
    /// directory or unleased replica).
    pub fn epoch(&self) -> Option<u64> {
        match &*self.held.lock().unwrap() {
            Held::Object { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// Whether every object is to be created only where none is (a lease
    /// is held, by lock file or object): a process that lost its lease
    /// then cannot overwrite what the next holder wrote, however late it
    /// wakes up.
    fn exclusive(&self) -> bool {
        matches!(
            &*self.held.lock().unwrap(),
            Held::Lock(..) | Held::Object { .. }
        )
    }

    /// Names `generation` in the lease record as the one this holder
    /// writes: at once in a directory's lease file, with the next renewal
    /// in S3.
    pub fn note_generation(&self, generation: &str) {
        let changed = {
            let mut g = self.generation.lock().unwrap();
            let changed = g.as_deref() != Some(generation);
            *g = Some(generation.to_string());
            changed
        };
        let Some(dir) = &self.dir else { return };
        let held = self.held.lock().unwrap();
        if let (true, Held::Lock(_, epoch)) = (changed, &*held) {
            let record = Record {
                holder: self.holder.clone(),
                epoch: *epoch,
                ttl_ms: 0,
                released: false,
                generation: Some(generation.to_string()),
            };
            let path = dir.join(KEY);
            if let Err(e) = std::fs::write(&path, encode(&record)) {
                tracing::warn!(path = %path.display(), error = %e, "cannot update the lease file");
            }
        }
    }

    /// Gives the lease up for good: another process holds it (`why` says
    /// how this one knows). Nothing more is written under it.
    pub fn lose(&self, why: String) {
        let first = self.lost.send_if_modified(|lost| {
            if lost.is_some() {
                return false;
            }
            *lost = Some(why.clone());
            true
        });
        if first {
            tracing::error!(replica = %self.location, reason = %why, "lost the replica's lease: writing nothing more to this replica");
        }
    }

    /// Resolves, with the reason, once the lease is lost.
    pub async fn lost(&self) -> String {
        let mut rx = self.lost.subscribe();
        let why = rx.wait_for(|l| l.is_some()).await.ok().map(|l| l.clone());
        match why.flatten() {
            Some(why) => why,
            // The lease is gone with its sender: never lost.
            None => std::future::pending().await,
        }
    }

    /// Resolves once the lease is held.
    pub async fn held(&self) {
        let mut rx = self.acquired.subscribe();
        let _ = rx.wait_for(|h| *h).await;
    }

    /// Time kept between a renewal that may not have arrived and the
    /// moment another process may take the lease over.
    fn margin(&self) -> Duration {
        self.opts.ttl / 6
    }

    /// Takes the lease, waiting for another holder (of the same database)
    /// to let go or lapse unless `wait` is off. Ends early, with an error,
    /// when `stop` begins.
    pub async fn acquire(self: &Arc<Self>, stop: &Shutdown) -> Result<()> {
        let mut announced = false;
        let mut seen: Option<(Version, Instant)> = None;
        loop {
            let outcome = match self.dir.clone() {
                Some(dir) => {
                    let me = self.clone();
                    tokio::task::spawn_blocking(move || me.try_lock(&dir))
                        .await
                        .map_err(|e| Error::Invalid(format!("lease task failed: {e}")))??
                }
                None => self.try_object(&mut seen).await?,
            };
            let other = match outcome {
                None => {
                    self.acquired.send_replace(true);
                    return Ok(());
                }
                Some(other) => other,
            };
            if other.database != self.holder.database && !self.successor() {
                return Err(Error::Invalid(format!(
                    "replica {} is written by {other}; {} needs a replica of its own (two databases must not share one)",
                    self.location, self.holder.database
                )));
            }
            if !self.opts.wait {
                return Err(Error::Invalid(format!(
                    "replica {} is held by {other} (lease wait: false)",
                    self.location
                )));
            }
            if !announced {
                tracing::warn!(replica = %self.location, holder = %other, "waiting for the replica's lease: another process replicates this database to it");
                announced = true;
            }
            let pause =
                (self.opts.ttl / 6).clamp(Duration::from_millis(100), Duration::from_secs(5));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.begun() => {
                    return Err(Error::Invalid(format!("stopped while waiting for the lease of replica {}", self.location)));
                }
            }
        }
    }

    /// Whether this database continues the replica's history under another
    /// path (a restored or promoted copy: it has a lineage record for the
    /// replica, or a follower's position file), so another database's
    /// lease on it is waited for rather than refused.
    fn successor(&self) -> bool {
        let db = std::path::Path::new(&self.holder.database);
        matches!(crate::lineage::mark(db, &self.location), Ok(Some(_)))
            || matches!(crate::follow::read_follow_file(db), Ok(Some(_)))
    }

    /// One attempt at a directory's lock. `None`: taken.
    fn try_lock(&self, dir: &std::path::Path) -> Result<Option<Holder>> {
        std::fs::create_dir_all(dir).io_ctx("create", dir)?;
        let path = dir.join(KEY);
        // Locked through a read-only descriptor: one open for writing for
        // the process's life would keep the replica's filesystem from being
        // remounted read-only. The record is written through another,
        // short-lived one, in place (a rename would put a new, unlocked
        // file at the path).
        if !path.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .io_ctx("create", &path)?;
        }
        let mut f = std::fs::File::open(&path).io_ctx("open", &path)?;
        // SAFETY: flock on a descriptor this function owns.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        let mut text = String::new();
        let _ = f.read_to_string(&mut text);
        let previous: Option<Record> = serde_json::from_str(&text).ok();
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e).io_ctx("lock", &path);
            }
            return Ok(Some(previous.map(|p| p.holder).unwrap_or_else(|| Holder {
                host: "unknown".into(),
                pid: 0,
                database: self.holder.database.clone(),
            })));
        }
        let record = Record {
            holder: self.holder.clone(),
            epoch: previous.map_or(1, |p| p.epoch + 1),
            ttl_ms: 0,
            released: false,
            generation: None,
        };
        std::fs::write(&path, encode(&record)).io_ctx("write", &path)?;
        tracing::info!(replica = %self.location, epoch = record.epoch, "holding the replica's lease (lock file)");
        *self.held.lock().unwrap() = Held::Lock(f, record.epoch);
        Ok(None)
    }

    /// One attempt at an object lease. `None`: taken (and renewed from now
    /// on); `Some(holder)`: someone else holds it.
    async fn try_object(
        self: &Arc<Self>,
        seen: &mut Option<(Version, Instant)>,
    ) -> Result<Option<Holder>> {
        if !self.conditional_writes().await? {
            if self.opts.required {
                return Err(Error::Invalid(format!(
                    "replica {} ignores conditional writes (If-None-Match), so walstream cannot make sure it is the only writer; set `lease: {{required: false}}` on this replica to run without a lease",
                    self.location
                )));
            }
            tracing::warn!(replica = %self.location, "storage ignores conditional writes: replicating without a lease (lease required: false); two writers would corrupt this replica");
            *self.held.lock().unwrap() = Held::Unleased;
            return Ok(None);
        }
        let mut record = Record {
            holder: self.holder.clone(),
            epoch: 1,
            ttl_ms: self.opts.ttl.as_millis() as u64,
            released: false,
            generation: None,
        };
        let sent = Instant::now();
        let outcome = match self.storage.get_versioned(KEY).await {
            Err(e) if e.is_not_found() => self.storage.create_new(KEY, encode(&record)).await?,
            Err(e) => return Err(e.into()),
            Ok((data, version)) => {
                let current: Record = serde_json::from_slice(&data).map_err(|e| {
                    Error::Invalid(format!(
                        "object {KEY} in {} is not a walstream lease: {e}",
                        self.location
                    ))
                })?;
                // Unchanged for a whole ttl by this process's clock: lapsed.
                let lapsed = match seen {
                    Some((v, since)) if *v == version => {
                        since.elapsed() >= Duration::from_millis(current.ttl_ms)
                    }
                    _ => {
                        *seen = Some((version.clone(), Instant::now()));
                        false
                    }
                };
                // Held by another process: wait or refuse (see `acquire`).
                // Once free, whose replica it is is the lineage check's
                // question (see `lineage`), as in a directory.
                if !current.released && !lapsed && current.holder != self.holder {
                    return Ok(Some(current.holder));
                }
                record.epoch = current.epoch + 1;
                if lapsed {
                    tracing::warn!(replica = %self.location, previous = %current.holder, "taking over the replica's lease: its holder did not renew it within its ttl");
                }
                self.storage
                    .replace_if(KEY, encode(&record), &version)
                    .await?
            }
        };
        match outcome {
            Conditional::Conflict => {
                *seen = None;
                Ok(Some(self.holder_now().await))
            }
            Conditional::Done(version) => {
                tracing::info!(replica = %self.location, epoch = record.epoch, "holding the replica's lease");
                *self.held.lock().unwrap() = Held::Object {
                    version,
                    epoch: record.epoch,
                    renewed: sent,
                };
                let me = self.clone();
                tokio::spawn(async move { me.renew(record).await });
                Ok(None)
            }
        }
    }

    /// Who holds the lease now (after losing a race for it).
    async fn holder_now(&self) -> Holder {
        match self.storage.get(KEY).await {
            Ok(data) => serde_json::from_slice::<Record>(&data)
                .map(|r| r.holder)
                .unwrap_or_else(|_| self.holder.clone()),
            Err(_) => self.holder.clone(),
        }
    }

    /// Whether the storage refuses a second `If-None-Match: *` create of
    /// one key (one test write, then its removal).
    async fn conditional_writes(&self) -> Result<bool> {
        let key = format!(
            "{KEY}.probe-{}-{}",
            std::process::id(),
            crate::generation::new_id()
        );
        let first = match self.storage.create_new(&key, b"probe".to_vec()).await {
            Ok(c) => c,
            Err(StorageError::Unsupported { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let second = self.storage.create_new(&key, b"probe".to_vec()).await;
        let _ = self.storage.delete(&key).await;
        Ok(matches!(first, Conditional::Done(_)) && matches!(second?, Conditional::Conflict))
    }

    /// Renews every third of the ttl until the lease is released or lost.
    async fn renew(self: Arc<Self>, mut record: Record) {
        let every = self.opts.ttl / 3;
        loop {
            tokio::time::sleep(every).await;
            let version = match &*self.held.lock().unwrap() {
                Held::Object { version, .. } => version.clone(),
                _ => return,
            };
            record.released = false;
            record.generation = self.generation.lock().unwrap().clone();
            let sent = Instant::now();
            match self
                .storage
                .replace_if(KEY, encode(&record), &version)
                .await
            {
                Ok(Conditional::Done(v)) => {
                    if let Held::Object {
                        version, renewed, ..
                    } = &mut *self.held.lock().unwrap()
                    {
                        *version = v;
                        *renewed = sent;
                    }
                }
                Ok(Conditional::Conflict) if self.still_mine(&record, sent).await => {}
                Ok(Conditional::Conflict) => {
                    let now = self.holder_now().await;
                    self.lose(format!("{now} took it over"));
                    return;
                }
                Err(e) => {
                    tracing::warn!(replica = %self.location, error = %e, "renewing the replica's lease failed, will retry");
                    if !self.valid() {
                        tracing::error!(replica = %self.location, "the replica's lease was not renewed within its ttl: writing nothing until it is");
                    }
                }
            }
        }
    }

    /// After a renewal answered "changed": whether the change is this
    /// process's own renewal (a retried request whose first attempt
    /// arrived). Then its version is adopted.
    async fn still_mine(&self, record: &Record, sent: Instant) -> bool {
        let Ok((data, version)) = self.storage.get_versioned(KEY).await else {
            return false;
        };
        let Ok(now) = serde_json::from_slice::<Record>(&data) else {
            return false;
        };
        if now.holder != self.holder || now.epoch != record.epoch || now.released {
            return false;
        }
        if let Held::Object {
            version: v,
            renewed,
            ..
        } = &mut *self.held.lock().unwrap()
        {
            *v = version;
            *renewed = sent;
        }
        true
    }

    /// Lets the lease go (a clean stop): the next holder may take it at once.
    pub async fn release(&self) {
        let held = std::mem::replace(&mut *self.held.lock().unwrap(), Held::Not);
        match held {
            Held::Object { version, epoch, .. } if self.lost.borrow().is_none() => {
                let record = Record {
                    holder: self.holder.clone(),
                    epoch,
                    ttl_ms: self.opts.ttl.as_millis() as u64,
                    released: true,
                    generation: self.generation.lock().unwrap().clone(),
                };
                match self
                    .storage
                    .replace_if(KEY, encode(&record), &version)
                    .await
                {
                    Ok(_) => {
                        tracing::info!(replica = %self.location, "released the replica's lease")
                    }
                    Err(e) => {
                        tracing::warn!(replica = %self.location, error = %e, "releasing the replica's lease failed; the next holder waits for its ttl")
                    }
                }
            }
            // Closing the file lets the lock go.
            Held::Lock(f, _) => drop(f),
            _ => {}
        }
    }
}

fn encode(r: &Record) -> Vec<u8> {
    serde_json::to_vec_pretty(r).expect("record serializes")
}

/// A storage that refuses every write and delete while `lease` is not
/// valid: whatever path a write takes (shipping, compaction, retention), a
/// process that lost its replica's lease cannot change the replica.
#[derive(Debug)]
pub struct Leased {
    inner: DynStorage,
    lease: Arc<Lease>,
}

impl Leased {
    pub fn wrap(inner: DynStorage, lease: Arc<Lease>) -> DynStorage {
        Arc::new(Leased { inner, lease })
    }

    fn check(&self, op: &'static str, key: &str) -> Result<(), StorageError> {
        if self.lease.valid() {
            return Ok(());
        }
        Err(StorageError::Backend {
            op,
            location: self.inner.location(),
            key: key.to_string(),
            message: "this process does not hold the replica's lease (not yet, lapsed or taken over): not written".into(),
        })
    }

    /// An exclusive create found an object at `key`. The same bytes are
    /// this process's own earlier attempt (a retried request whose first
    /// try arrived); anything else was written by another process, so this
    /// one no longer owns the replica.
    async fn found(&self, key: &str, digest: (u64, [u8; 32])) -> Result<(), StorageError> {
        // Into a file: the object may be a snapshot of any size.
        let tmp = tempfile::NamedTempFile::new().map_err(|source| StorageError::Io {
            op: "make a temporary file to compare",
            location: self.inner.location(),
            key: key.to_string(),
            source,
        })?;
        self.inner.get_file(key, tmp.path()).await?;
        let p = tmp.path().to_path_buf();
        let there = tokio::task::spawn_blocking(move || sha_file(&p))
            .await
            .expect("hash task");
        if there.is_ok_and(|t| t == digest) {
            return Ok(());
        }
        self.lease
            .lose(format!("object {key} was written by another process"));
        Err(StorageError::Backend {
            op: "create",
            location: self.inner.location(),
            key: key.to_string(),
            message: "another process wrote this object: this process lost the replica's lease and writes nothing more".into(),
        })
    }
}

fn sha(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

fn sha_file(path: &std::path::Path) -> std::io::Result<(u64, [u8; 32])> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let n = std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
    Ok((n, h.finalize().into()))
}

#[async_trait::async_trait]
impl crate::storage::Storage for Leased {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StorageError> {
        self.check("put", key)?;
        if !self.lease.exclusive() {
            return self.inner.put(key, data).await;
        }
        let digest = (data.len() as u64, sha(&data));
        match self.inner.create_new(key, data).await? {
            Conditional::Done(_) => {}
            Conditional::Conflict => self.found(key, digest).await?,
        }
        // A generation begun (its manifest) or continued (a segment): the
        // lease names it from now on.
        if key.ends_with("/generation.json") || key.contains("/segments/") {
            if let Some(g) = crate::generation::layout::generation_of(key) {
                self.lease.note_generation(g);
            }
        }
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<crate::storage::ObjectMeta>, StorageError> {
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.check("delete", key)?;
        self.inner.delete(key).await
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    async fn put_file(&self, key: &str, path: &std::path::Path) -> Result<(), StorageError> {
        self.check("put", key)?;
        if !self.lease.exclusive() {
            return self.inner.put_file(key, path).await;
        }
        match self.inner.create_new_file(key, path).await? {
            Conditional::Done(_) => Ok(()),
            Conditional::Conflict => {
                let p = path.to_path_buf();
                let digest = tokio::task::spawn_blocking(move || sha_file(&p))
                    .await
                    .expect("hash task")
                    .map_err(|source| StorageError::Io {
                        op: "read upload source for",
                        location: self.inner.location(),
                        key: key.to_string(),
                        source,
                    })?;
                self.found(key, digest).await
            }
        }
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.inner.local_path(key)
    }

    fn keys(&self) -> Option<std::sync::Arc<crate::encryption::Keys>> {
        self.inner.keys()
    }

    async fn get_file(&self, key: &str, path: &std::path::Path) -> Result<u64, StorageError> {
        self.inner.get_file(key, path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    fn lease(storage: &DynStorage, db: &str, pid: u32, ttl_ms: u64, wait: bool) -> Arc<Lease> {
        let target = ReplicaTarget::parse_url("s3://bucket/x").unwrap();
        let mut holder = Holder::me(db);
        holder.pid = pid;
        Lease::new(
            storage.clone(),
            &target,
            holder,
            LeaseOptions {
                ttl: Duration::from_millis(ttl_ms),
                wait,
                required: true,
            },
        )
    }

    #[tokio::test]
    async fn one_holder_then_the_next_after_release_or_lapse() {
        let storage: DynStorage = Arc::new(MemoryStorage::new());
        let stop = Shutdown::new();
        let a = lease(&storage, "/data/app.db", 1, 600, true);
        a.acquire(&stop).await.unwrap();
        assert!(a.valid());
        assert_eq!(a.epoch(), Some(1));
        // Same database elsewhere, not waiting: refused, naming the holder.
        let b = lease(&storage, "/data/app.db", 2, 600, false);
        let e = b.acquire(&stop).await.unwrap_err().to_string();
        assert!(e.contains("process 1") && e.contains("wait: false"), "{e}");
        // Another database: refused even when waiting.
        let c = lease(&storage, "/data/other.db", 3, 600, true);
        let e = c.acquire(&stop).await.unwrap_err().to_string();
        assert!(e.contains("two databases must not share"), "{e}");
        // Released: the next takes it at once, with a higher epoch.
        a.release().await;
        assert!(!a.valid());
        let b = lease(&storage, "/data/app.db", 2, 600, true);
        tokio::time::timeout(Duration::from_secs(2), b.acquire(&stop))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.epoch(), Some(2));
        // b goes silent (as a frozen process: its renewals stop): a waiter
        // takes over only after the lease stayed unchanged for a ttl.
        *b.held.lock().unwrap() = Held::Not;
        let d = lease(&storage, "/data/app.db", 4, 600, true);
        let t = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), d.acquire(&stop))
            .await
            .unwrap()
            .unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(550),
            "{:?}",
            t.elapsed()
        );
        assert!(
            !b.valid(),
            "the silent holder stopped writing before the takeover"
        );
        assert_eq!(d.epoch(), Some(3));
        // Writes through a lapsed holder's storage are refused.
        let gated = Leased::wrap(storage.clone(), b.clone());
        assert!(gated.put("generations/x", vec![1]).await.is_err());
        let ok = Leased::wrap(storage.clone(), d.clone());
        ok.put("generations/x", vec![1]).await.unwrap();
    }

    /// Storage that takes `If-None-Match` and ignores it (older MinIO, some
    /// S3 clones): every create succeeds, overwriting.
    #[derive(Debug, Default)]
    struct Careless(MemoryStorage);

    #[async_trait::async_trait]
    impl crate::storage::Storage for Careless {
        async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StorageError> {
            self.0.put(key, data).await
        }
        async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
            self.0.get(key).await
        }
        async fn list(
            &self,
            prefix: &str,
        ) -> Result<Vec<crate::storage::ObjectMeta>, StorageError> {
            self.0.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<(), StorageError> {
            self.0.delete(key).await
        }
        fn location(&self) -> String {
            "s3://careless/x".into()
        }
        async fn create_new(&self, key: &str, data: Vec<u8>) -> Result<Conditional, StorageError> {
            self.0.put(key, data).await?;
            Ok(Conditional::Done("v".into()))
        }
    }

    #[tokio::test]
    async fn storage_that_ignores_conditional_writes_is_refused_unless_not_required() {
        let storage: DynStorage = Arc::new(Careless::default());
        let stop = Shutdown::new();
        let e = lease(&storage, "/data/app.db", 1, 600, true)
            .acquire(&stop)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ignores conditional writes") && e.contains("required: false"),
            "{e}"
        );
        let target = ReplicaTarget::parse_url("s3://bucket/x").unwrap();
        let relaxed = Lease::new(
            storage.clone(),
            &target,
            Holder::me("/data/app.db"),
            LeaseOptions {
                required: false,
                ..LeaseOptions::default()
            },
        );
        relaxed.acquire(&stop).await.unwrap();
        assert!(relaxed.valid() && !relaxed.exclusive());
        // Writes go through as plain puts.
        let gated = Leased::wrap(storage.clone(), relaxed.clone());
        gated.put("generations/x", vec![1]).await.unwrap();
        gated.put("generations/x", vec![2]).await.unwrap();
        // The probe left nothing behind.
        let left = storage.list("").await.unwrap();
        assert!(left.iter().all(|o| !o.key.contains("probe")), "{left:?}");
    }

    /// A lease holder finding another's object where it meant to create one
    /// has lost the replica: it writes nothing more. Its own retried write
    /// (the same bytes) is not a loss.
    #[tokio::test]
    async fn finding_another_writers_object_loses_the_lease() {
        let storage: DynStorage = Arc::new(MemoryStorage::new());
        let stop = Shutdown::new();
        let a = lease(&storage, "/data/app.db", 1, 60_000, true);
        a.acquire(&stop).await.unwrap();
        let gated = Leased::wrap(storage.clone(), a.clone());
        gated
            .put("generations/g/segments/1", vec![7; 10])
            .await
            .unwrap();
        // The same bytes again (a retried request whose first try landed).
        gated
            .put("generations/g/segments/1", vec![7; 10])
            .await
            .unwrap();
        assert!(a.valid());
        // Someone else's object at the next key.
        storage
            .put("generations/g/segments/2", vec![9])
            .await
            .unwrap();
        let e = gated
            .put("generations/g/segments/2", vec![8])
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("another process wrote this object"), "{e}");
        assert!(!a.valid());
        assert_eq!(
            storage.get("generations/g/segments/2").await.unwrap(),
            vec![9]
        );
        assert!(gated
            .put("generations/g/segments/3", vec![1])
            .await
            .is_err());
        tokio::time::timeout(Duration::from_secs(1), a.lost())
            .await
            .expect("lost() resolves");
    }
}

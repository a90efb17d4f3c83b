//! Following a replica: a live, readable copy of the database on another
//! node (`walstream restore --follow`).
//!
//! The follower restores as usual, then keeps applying what the primary
//! ships. Any SQLite client may have the copy open all along, so every step
//! must take it from one state the primary had to the next as one atomic
//! step with respect to SQLite's own locking. Each object is applied as one
//! write transaction through the bundled SQLite's `sqlite_dbpage` virtual
//! table (compiled in by `.cargo/config.toml`): the copy stays in WAL mode,
//! a reader's snapshot is the whole state before or after the step, and
//! readers and the follower never wait for each other. (Writing the file
//! directly under an exclusive lock, as a rollback-journal writer does,
//! would make readers fail with SQLITE_BUSY during every step and would rely
//! on every reader using the rollback protocol on a WAL database.) A new
//! generation is applied the same way: the pages of its snapshot that differ
//! from the copy are written in one transaction, so readers never see a
//! half-restored file.
//!
//! Where the follower stands lives in a small JSON file beside the copy
//! (`PATH-walstream-follow`, see [`FollowFile`]), never in the database: the
//! generation, the next segment and a digest of the copy's content there.
//! It is written before each step with the state before and after it, so
//! after a kill at any instant the restarted follower finds the copy at one
//! of the two, proves which by recomputing the digest, and resumes without
//! downloading the snapshot again. A copy that matches neither was changed
//! by someone else; the follower refuses to touch it.
//!
//! Polling asks for the next segment by its key (one GET that is "not
//! found" until the primary ships it). Only when it has not appeared for
//! `discover_interval` does one LIST look for what replaced it: a new
//! generation, a merged object (compaction), or a newer snapshot when
//! retention deleted what the follower needed.

use std::borrow::Cow;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, IoContext, Result, SqlContext};
use crate::generation::{layout, Lineage};
use crate::metrics::FollowStatus;
use crate::replica::{Compacted, GenerationListing, Replica};
use crate::restore::{self, RestoreOptions, RestoreOutcome};
use crate::segment::SegmentHeader;
use crate::shutdown::Shutdown;

#[derive(Debug, Clone)]
pub struct FollowOptions {
    pub output: PathBuf,
    /// How often storage is asked for the next segment.
    pub interval: Duration,
    /// How long the next segment may be missing before one LIST looks for
    /// what replaced it.
    pub discover_interval: Duration,
    /// A directory to watch (a `file://` replica's root): a change there
    /// polls at once instead of waiting for `interval`.
    pub watch: Option<PathBuf>,
    /// Parallel downloads for the first restore.
    pub concurrency: usize,
    pub status: Arc<FollowStatus>,
    pub stop: Arc<Shutdown>,
}

/// The follower's position file: the state of the copy, and the state it
/// is being moved to while a step runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FollowFile {
    /// Format of this file (1).
    pub version: u32,
    /// The follower process that wrote it (promotion refuses while it runs).
    pub pid: u32,
    pub at: Point,
    /// Written before a step commits: the copy is at `at` or at `next`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Point>,
}

/// One state of the copy: a segment boundary of a generation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Point {
    pub generation: String,
    /// The first segment not applied.
    pub next_index: u64,
    pub position: u64,
    /// Commit time on the primary of the newest transaction applied.
    pub timestamp_ms: i64,
    pub page_size: u32,
    /// [`Digest`] of the copy's pages, 32 hex digits.
    pub digest: String,
}

/// The position file of the copy at `output`.
pub fn follow_file_path(output: &Path) -> PathBuf {
    let mut p = output.as_os_str().to_owned();
    p.push("-walstream-follow");
    PathBuf::from(p)
}

/// Reads the position file of the copy at `output`, `None` if there is none.
pub fn read_follow_file(output: &Path) -> Result<Option<FollowFile>> {
    let path = follow_file_path(output);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).io_ctx("read", &path),
    };
    let file: FollowFile = serde_json::from_slice(&data).map_err(|e| {
        Error::Invalid(format!(
            "follower position file {} is not valid: {e}",
            path.display()
        ))
    })?;
    if file.version != 1 {
        return Err(Error::Invalid(format!(
            "follower position file {} has version {}, this walstream reads 1",
            path.display(),
            file.version
        )));
    }
    Ok(Some(file))
}

/// The lineage a new generation of `db` records when `db` is a follower's
/// copy (its position file is beside it): the generation and point it
/// followed to. `None` for any other database.
pub fn lineage(db: &Path) -> Option<Lineage> {
    match read_follow_file(db) {
        Ok(Some(f)) => Some(Lineage {
            generation: f.at.generation,
            next_index: f.at.next_index,
            position: f.at.position,
        }),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(db = %db.display(), error = %e, "cannot read the follower position file beside the database; its lineage is not recorded");
            None
        }
    }
}

/// Called once the first generation of a promoted copy is stored: the
/// position file has served and is removed, so later generations do not
/// claim the lineage again.
pub fn promoted(db: &Path, generation: &str) {
    if let Some(l) = lineage(db) {
        tracing::info!(db = %db.display(), follows = %l, %generation, "promoted a follower's copy: its new generation continues the one it followed");
    }
    let path = follow_file_path(db);
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove the follower position file of a promoted database");
    }
}

/// An error while a follower (another live process) still writes `db`:
/// promoting a copy means stopping its follower first.
pub fn check_not_followed(db: &Path) -> Result<()> {
    let Ok(Some(f)) = read_follow_file(db) else {
        return Ok(());
    };
    if f.pid == std::process::id() || f.pid == 0 {
        return Ok(());
    }
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let alive = unsafe { libc::kill(f.pid as libc::pid_t, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if alive {
        return Err(Error::Database {
            path: db.to_path_buf(),
            message: format!(
                "a follower (process {}, `walstream restore --follow`) still applies the primary's changes to it; stop it before replicating this copy as the new primary",
                f.pid
            ),
        });
    }
    Ok(())
}

fn write_follow_file(output: &Path, file: &FollowFile) -> Result<()> {
    let path = follow_file_path(output);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let data = serde_json::to_vec_pretty(file).expect("position serializes");
    std::fs::write(&tmp, data).io_ctx("write", &tmp)?;
    // Not synced: after a power loss the copy may be older than this file,
    // which the digest then reveals, and the follower starts over.
    std::fs::rename(&tmp, &path).io_ctx("rename into place", &path)
}

/// A digest of a database's content that a step updates from the pages it
/// changes alone: the sum (mod 2^128) of a hash of every page with its
/// number. Recomputed from the whole file only when a follower restarts.
///
/// Page 1's change counter, version-valid-for number and SQLite version
/// (header bytes 24..28 and 92..100) are left out: SQLite rewrites them in
/// every transaction that writes page 1, from its own count of such
/// transactions, so the copy's differ from the primary's and from what the
/// step wrote. Nothing else in the file is rewritten.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest(u128);

impl Digest {
    fn page(pgno: u32, data: &[u8]) -> u128 {
        let mut h = Sha256::new();
        h.update(pgno.to_be_bytes());
        if pgno == 1 && data.len() >= 100 {
            h.update(&data[..24]);
            h.update(&data[28..92]);
            h.update(&data[100..]);
        } else {
            h.update(data);
        }
        u128::from_be_bytes(h.finalize()[..16].try_into().expect("16 bytes"))
    }

    fn add(&mut self, pgno: u32, data: &[u8]) {
        self.0 = self.0.wrapping_add(Self::page(pgno, data));
    }

    fn remove(&mut self, pgno: u32, data: &[u8]) {
        self.0 = self.0.wrapping_sub(Self::page(pgno, data));
    }

    pub fn hex(&self) -> String {
        format!("{:032x}", self.0)
    }
}

/// The follower's one connection to the copy, through which every step is
/// written.
struct Applier {
    conn: Connection,
    path: PathBuf,
    page_size: u32,
    digest: Digest,
}

impl Applier {
    fn open(path: &Path) -> Result<Applier> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .db_ctx(path)?;
        // Another writer on a follower's copy is a mistake; wait for it a
        // while rather than fail the step at once.
        conn.busy_timeout(Duration::from_secs(10)).db_ctx(path)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .db_ctx(path)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Database {
                path: path.to_path_buf(),
                message: format!("journal mode is {mode}; a follower's copy must stay in WAL mode"),
            });
        }
        // A step is durable in the copy's WAL at the next checkpoint; a
        // power loss before it is noticed by the digest on restart.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .db_ctx(path)?;
        let page_size: u32 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .db_ctx(path)?;
        conn.prepare("SELECT pgno FROM sqlite_dbpage WHERE pgno = 1")
            .map_err(|e| Error::Database {
                path: path.to_path_buf(),
                message: format!(
                    "this walstream's SQLite lacks the sqlite_dbpage table a follower writes through ({e}); build it with .cargo/config.toml"
                ),
            })?;
        let mut me = Applier {
            conn,
            path: path.to_path_buf(),
            page_size,
            digest: Digest::default(),
        };
        me.digest = me.scan()?;
        Ok(me)
    }

    /// The digest of the whole copy, read in one read transaction.
    fn scan(&mut self) -> Result<Digest> {
        let path = self.path.clone();
        let tx = self.conn.transaction().db_ctx(&path)?;
        let mut d = Digest::default();
        {
            let mut stmt = tx
                .prepare("SELECT pgno, data FROM sqlite_dbpage")
                .db_ctx(&path)?;
            let mut rows = stmt.query([]).db_ctx(&path)?;
            while let Some(row) = rows.next().db_ctx(&path)? {
                let pgno: u32 = row.get(0).db_ctx(&path)?;
                let data = row.get_ref(1).db_ctx(&path)?;
                d.add(pgno, data.as_blob().unwrap_or_default());
            }
        }
        tx.commit().db_ctx(&path)?;
        Ok(d)
    }

    /// Applies one step in one write transaction: cuts the copy to `cut`
    /// pages (if it is longer), writes `pages` (ascending, numbers up to
    /// `size`, a missing one between the cut and `size` is zero, as FORMAT.md
    /// defines for merged objects), then sets the size to `size` pages.
    /// `before_commit` gets the digest the copy will have, and may veto.
    fn step<'a>(
        &mut self,
        cut: Option<u32>,
        pages: &mut dyn Iterator<Item = Result<(u32, Cow<'a, [u8]>)>>,
        size: u32,
        before_commit: &mut dyn FnMut(Digest) -> Result<()>,
    ) -> Result<Digest> {
        let path = self.path.clone();
        let ps = self.page_size as usize;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .db_ctx(&path)?;
        let mut digest = self.digest;
        let mut len: u32 = tx
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .db_ctx(&path)?;
        {
            let mut read = tx
                .prepare_cached("SELECT data FROM sqlite_dbpage WHERE pgno = ?1")
                .db_ctx(&path)?;
            let mut write = tx
                .prepare_cached("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)")
                .db_ctx(&path)?;
            let mut old = |pgno: u32| -> Result<Vec<u8>> {
                read.query_row([pgno], |r| r.get::<_, Vec<u8>>(0))
                    .db_ctx(&path)
            };
            let truncate_to = |n: u32,
                               len: &mut u32,
                               digest: &mut Digest,
                               old: &mut dyn FnMut(u32) -> Result<Vec<u8>>,
                               write: &mut rusqlite::CachedStatement<'_>|
             -> Result<()> {
                if n >= *len {
                    return Ok(());
                }
                for p in n + 1..=*len {
                    digest.remove(p, &old(p)?);
                }
                // A NULL page at n+1 cuts the database to n pages.
                write
                    .execute(params![n + 1, rusqlite::types::Null])
                    .db_ctx(&path)?;
                *len = n;
                Ok(())
            };
            if let Some(cut) = cut {
                truncate_to(cut, &mut len, &mut digest, &mut old, &mut write)?;
            }
            let zero = vec![0u8; ps];
            for item in pages {
                let (pgno, data) = item?;
                if pgno > size {
                    break;
                }
                if data.len() != ps {
                    return Err(Error::Invalid(format!(
                        "page {pgno} has {} bytes, the copy's pages have {ps}",
                        data.len()
                    )));
                }
                while len + 1 < pgno {
                    len += 1;
                    write.execute(params![len, &zero]).db_ctx(&path)?;
                    digest.add(len, &zero);
                }
                if pgno <= len {
                    let before = old(pgno)?;
                    if before == *data {
                        continue;
                    }
                    digest.remove(pgno, &before);
                }
                write.execute(params![pgno, &*data]).db_ctx(&path)?;
                digest.add(pgno, &data);
                len = len.max(pgno);
            }
            while len < size {
                len += 1;
                write.execute(params![len, &zero]).db_ctx(&path)?;
                digest.add(len, &zero);
            }
            truncate_to(size, &mut len, &mut digest, &mut old, &mut write)?;
        }
        before_commit(digest)?;
        tx.commit().db_ctx(&path)?;
        self.digest = digest;
        Ok(digest)
    }
}

/// Opens the copy (reading it whole for its digest) off the runtime.
async fn open_applier(output: &Path) -> Result<Applier> {
    let out = output.to_path_buf();
    tokio::task::spawn_blocking(move || Applier::open(&out))
        .await
        .map_err(|e| Error::Invalid(format!("follower task failed: {e}")))?
}

/// What is followed and where the copy stands.
struct Follower<'r> {
    replica: &'r Replica,
    opts: &'r FollowOptions,
    applier: Option<Applier>,
    at: Point,
}

/// Restores (or resumes) the copy at `opts.output`, then applies what the
/// primary ships until `opts.stop` is requested. Transient storage errors
/// are retried (counted in the status); an error returned means the copy
/// cannot be followed (it was changed by someone else, or cannot be
/// written).
pub async fn follow(replica: &Replica, opts: &FollowOptions) -> Result<()> {
    let mut f = Follower::start(replica, opts).await?;
    let wake = Arc::new(tokio::sync::Notify::new());
    // New objects of a `file://` replica wake the next poll at once.
    let _watch = opts.watch.as_deref().and_then(|d| {
        let wake = wake.clone();
        crate::watch::watch_dirs(&[(d, true)], move |ev| {
            if matches!(
                ev.kind,
                notify::EventKind::Create(_) | notify::EventKind::Modify(_)
            ) {
                wake.notify_one();
            }
        })
    });
    let mut missing_since: Option<Instant> = None;
    let mut listed_at = Instant::now();
    loop {
        if opts.stop.requested() {
            break;
        }
        let polled_at = Utc::now().timestamp_millis();
        match f.poll_next().await {
            Ok(true) => {
                missing_since = None;
                // Behind: fetch the next one at once. Caught up with what
                // the primary ships: the next one is at least a sync away,
                // so asking now would only be "not found".
                let age = polled_at.saturating_sub(f.at.timestamp_ms);
                if age > opts.interval.as_millis() as i64 {
                    continue;
                }
                opts.status.caught_up(polled_at);
            }
            Ok(false) => {
                let since = *missing_since.get_or_insert_with(Instant::now);
                let due = since.elapsed() >= opts.discover_interval
                    && listed_at.elapsed() >= opts.discover_interval;
                if due {
                    listed_at = Instant::now();
                    match f.discover().await {
                        Ok(true) => {
                            missing_since = None;
                            continue;
                        }
                        Ok(false) => opts.status.caught_up(polled_at),
                        Err(e) if fatal(&e) => return Err(e),
                        Err(e) => {
                            opts.status.error();
                            tracing::warn!(replica = %replica.location(), error = %e, "follow: looking for new objects failed, will retry");
                        }
                    }
                } else {
                    opts.status.caught_up(polled_at);
                }
            }
            Err(e) if fatal(&e) => return Err(e),
            Err(e) => {
                opts.status.error();
                // Look around at the next poll: what was expected may have
                // been replaced.
                missing_since = Some(Instant::now() - opts.discover_interval);
                tracing::warn!(replica = %replica.location(), error = %e, "follow: applying the next object failed, will retry");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(opts.interval) => {}
            _ = wake.notified() => {}
            _ = opts.stop.begun() => {}
        }
    }
    // Settled: nothing in flight, so the file says exactly where the copy
    // is (what promotion records as its lineage, see `lineage`).
    write_follow_file(&opts.output, &file_at(&f.at, None))?;
    tracing::info!(output = %opts.output.display(), generation = %f.at.generation, next_index = f.at.next_index, position = f.at.position, "follow stopped");
    Ok(())
}

/// Errors that retrying cannot cure: the copy itself is at fault.
fn fatal(e: &Error) -> bool {
    matches!(
        e,
        Error::Database { .. } | Error::Sqlite { .. } | Error::Io { .. }
    )
}

impl<'r> Follower<'r> {
    /// Resumes from the position file if the copy exists, else restores it.
    async fn start(replica: &'r Replica, opts: &'r FollowOptions) -> Result<Follower<'r>> {
        let output = &opts.output;
        if output.exists() {
            return Follower::resume(replica, opts).await;
        }
        let outcome = restore::restore(
            replica,
            &RestoreOptions {
                output: output.clone(),
                concurrency: opts.concurrency,
                ..Default::default()
            },
        )
        .await?;
        let RestoreOutcome::Restored {
            generation,
            position,
            next_index,
            timestamp_ms,
            ..
        } = outcome
        else {
            return Err(Error::NoGeneration {
                location: replica.location(),
            });
        };
        let applier = open_applier(output).await?;
        let at = Point {
            generation,
            next_index,
            position,
            timestamp_ms,
            page_size: applier.page_size,
            digest: applier.digest.hex(),
        };
        Follower::begin(replica, opts, applier, at, "restored; following")
    }

    async fn resume(replica: &'r Replica, opts: &'r FollowOptions) -> Result<Follower<'r>> {
        let output = &opts.output;
        let Some(file) = read_follow_file(output)? else {
            return Err(Error::Invalid(format!(
                "output file {} already exists and has no follower position file ({}); refusing to overwrite it",
                output.display(),
                follow_file_path(output).display()
            )));
        };
        let applier = open_applier(output).await?;
        let digest = applier.digest.hex();
        let at = if digest == file.at.digest {
            file.at
        } else if file.next.as_ref().is_some_and(|n| n.digest == digest) {
            file.next.expect("checked")
        } else {
            return Err(Error::Database {
                path: output.clone(),
                message: format!(
                    "its content is not the state the follower left it in (generation {} before segment {}); it was changed by something else, so walstream will not follow into it: move it away (and {}) and follow again",
                    file.at.generation,
                    file.at.next_index,
                    follow_file_path(output).display()
                ),
            });
        };
        if at.page_size != applier.page_size {
            return Err(Error::Database {
                path: output.clone(),
                message: "its page size differs from the follower's position file".into(),
            });
        }
        Follower::begin(
            replica,
            opts,
            applier,
            at,
            "resuming follow where it stopped",
        )
    }

    /// Records the copy at `at` (and nothing in flight) and says so.
    fn begin(
        replica: &'r Replica,
        opts: &'r FollowOptions,
        applier: Applier,
        at: Point,
        what: &str,
    ) -> Result<Follower<'r>> {
        write_follow_file(&opts.output, &file_at(&at, None))?;
        tracing::info!(output = %opts.output.display(), generation = %at.generation, next_index = at.next_index, position = at.position, "{what}");
        opts.status
            .applied(&at.generation, at.position, at.timestamp_ms);
        Ok(Follower {
            replica,
            opts,
            applier: Some(applier),
            at,
        })
    }

    /// Fetches and applies the next segment. `Ok(false)`: it does not
    /// exist (yet).
    async fn poll_next(&mut self) -> Result<bool> {
        let (generation, index) = (self.at.generation.clone(), self.at.next_index);
        let key = layout::segment(&generation, index);
        let download = restore::download_path(&self.opts.output);
        let opened = self
            .replica
            .open_segment_file(&key, &download, |h| {
                h.generation == generation && h.index == index && h.level == 0
            })
            .await;
        let result = match opened {
            Ok(None) => Ok(false),
            Ok(Some((header, _))) if header.first_position != self.at.position => {
                Err(self.replica.bad(
                    &key,
                    &format!(
                        "starts at position {} but the follower's copy is at {}",
                        header.first_position, self.at.position
                    ),
                ))
            }
            Ok(Some((header, body))) => self.apply_segment(header, body, &key).await.map(|_| true),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&download);
        result
    }

    /// Applies a segment or merged object that starts at or before the
    /// copy's position and ends after it (see `discover`), streaming its
    /// pages from `body`: memory stays bounded whatever its size.
    async fn apply_segment(
        &mut self,
        h: SegmentHeader,
        body: Box<dyn Read + Send>,
        key: &str,
    ) -> Result<()> {
        if h.page_size != self.at.page_size {
            return Err(self.replica.bad(key, "page size differs from the copy's"));
        }
        let next = Point {
            generation: h.generation.clone(),
            next_index: h.last_index() + 1,
            position: h.last_position,
            timestamp_ms: h.timestamp_ms,
            page_size: h.page_size,
            digest: String::new(),
        };
        let pages = Records {
            body,
            page_size: h.page_size as usize,
            left: h.page_count,
            previous: 0,
            location: self.replica.location(),
            key: key.to_string(),
        };
        self.run_step(next, Some(h.min_db_pages()), h.db_pages, pages)
            .await?;
        tracing::debug!(key, position = self.at.position, "applied");
        Ok(())
    }

    /// Moves the copy to `next` in one step (see `Applier::step`), off the
    /// runtime: the position file first says the copy is at the current
    /// point or at `next`, then the step commits.
    async fn run_step(
        &mut self,
        mut next: Point,
        cut: Option<u32>,
        size: u32,
        mut pages: impl Iterator<Item = Result<(u32, Cow<'static, [u8]>)>> + Send + 'static,
    ) -> Result<()> {
        let at = self.at.clone();
        let output = self.opts.output.clone();
        let mut applier = self.applier.take().expect("applier present between steps");
        let (applier, result) = tokio::task::spawn_blocking(move || {
            let r = applier.step(cut, &mut pages, size, &mut |d| {
                next.digest = d.hex();
                write_follow_file(&output, &file_at(&at, Some(next.clone())))
            });
            let r = r.map(|d| {
                next.digest = d.hex();
                next
            });
            (applier, r)
        })
        .await
        .map_err(|e| Error::Invalid(format!("follower task failed: {e}")))?;
        self.applier = Some(applier);
        let next = result?;
        self.opts
            .status
            .applied(&next.generation, next.position, next.timestamp_ms);
        self.at = next;
        Ok(())
    }

    /// Applies a snapshot of the current or a newer generation over the
    /// copy, in one transaction that writes only the pages that differ.
    async fn apply_snapshot(&mut self, g: &GenerationListing, snap: (u64, i64)) -> Result<()> {
        let download = restore::download_path(&self.opts.output);
        let result = self.apply_snapshot_via(g, snap, &download).await;
        let _ = std::fs::remove_file(&download);
        result
    }

    async fn apply_snapshot_via(
        &mut self,
        g: &GenerationListing,
        (index, ms): (u64, i64),
        download: &Path,
    ) -> Result<()> {
        let key = layout::snapshot(&g.id, index, ms);
        let (header, image) = self
            .replica
            .get_snapshot_file(&g.id, index, ms, download)
            .await?;
        if header.page_size != self.at.page_size {
            return Err(Error::Database {
                path: self.opts.output.clone(),
                message: format!(
                    "the primary's page size changed from {} to {} (generation {}); a follower's copy cannot change page size in place: stop, move it away and follow again",
                    self.at.page_size, header.page_size, g.id
                ),
            });
        }
        let next = Point {
            generation: g.id.clone(),
            next_index: header.index,
            position: header.position,
            timestamp_ms: header.timestamp_ms,
            page_size: header.page_size,
            digest: String::new(),
        };
        let location = self.replica.location();
        let ps = header.page_size as usize;
        let mut image = image.take(header.db_pages as u64 * ps as u64);
        let mut n = 0u32;
        let mut failed = false;
        let pages = std::iter::from_fn(move || {
            if failed || n >= header.db_pages {
                return None;
            }
            let mut buf = vec![0u8; ps];
            n += 1;
            match image.read_exact(&mut buf) {
                Ok(()) => Some(Ok((n, Cow::Owned(buf)))),
                Err(e) => {
                    failed = true;
                    Some(Err(Error::BadObject {
                        location: location.clone(),
                        key: key.clone(),
                        message: format!("image ends early: {e}"),
                    }))
                }
            }
        });
        self.run_step(next, None, header.db_pages, pages).await
    }

    async fn apply_compacted(
        &mut self,
        generation: &str,
        c: &Compacted,
        key: &str,
        download: &Path,
    ) -> Result<()> {
        let opened = self
            .replica
            .open_segment_file(key, download, |h| {
                h.generation == generation
                    && h.level == c.level
                    && h.index == c.first
                    && h.last_index() == c.last
            })
            .await?;
        let Some((h, body)) = opened else {
            return Err(Error::Missing {
                location: self.replica.location(),
                key: key.to_string(),
                message: "listed but not found".into(),
            });
        };
        if h.first_position > self.at.position || h.last_position < self.at.position {
            return Err(self.replica.bad(
                key,
                &format!(
                    "covers positions {}..{}, which do not include the copy's {}",
                    h.first_position, h.last_position, self.at.position
                ),
            ));
        }
        self.apply_segment(h, body, key).await
    }

    /// One LIST: finds what the next segment was replaced by, and applies
    /// it. `Ok(false)`: nothing new (the primary is idle).
    async fn discover(&mut self) -> Result<bool> {
        let gens = self.replica.generations().await?;
        let next = self.at.next_index;
        let current = gens.iter().find(|g| g.id == self.at.generation);
        if let Some(g) = current {
            if g.segments.iter().any(|s| s.0 == next) {
                return Ok(true);
            }
            // Compaction merged the next segment (and maybe some applied
            // ones) into one object. Applying it from any state inside its
            // range gives the state after it: pages are whole, and the cut
            // to its smallest size zeroes exactly what it would have.
            if let Some(c) = covering(g, next) {
                let key = layout::compacted(&g.id, c.level, c.first, c.last, c.timestamp_ms);
                let download = restore::download_path(&self.opts.output);
                let result = self.apply_compacted(&g.id, c, &key, &download).await;
                let _ = std::fs::remove_file(&download);
                result?;
                return Ok(true);
            }
            // Retention deleted what the copy needs (it fell far behind):
            // start again from the generation's newest snapshot.
            // (A snapshot after the position is a state the primary had
            // after everything the copy holds, whatever else is missing.)
            if let Some(&(index, ms, _)) = g.snapshots.iter().rev().find(|s| s.0 > next) {
                tracing::warn!(generation = %g.id, missing = next, snapshot = index, "follow: the objects after the copy's position are gone (retention or compaction); applying the generation's newest snapshot");
                self.apply_snapshot(g, (index, ms)).await?;
                return Ok(true);
            }
            let beyond =
                g.segments.iter().any(|s| s.0 > next) || g.compacted.iter().any(|c| c.first > next);
            if beyond {
                return Err(Error::Missing {
                    location: self.replica.location(),
                    key: layout::segment(&g.id, next),
                    message: format!(
                        "generation {} has later objects but none at segment {next} and no snapshot after it",
                        g.id
                    ),
                });
            }
        }
        // The followed generation ends here (or was deleted): move to the
        // newest generation with a snapshot, if that is another one.
        let Some(newest) = gens.iter().rev().find(|g| !g.snapshots.is_empty()) else {
            return Ok(false);
        };
        if newest.id == self.at.generation || (current.is_some() && newest.id < self.at.generation)
        {
            return Ok(false);
        }
        let &(index, ms, _) = newest.snapshots.last().expect("has snapshots");
        let from = self.at.generation.clone();
        self.apply_snapshot(newest, (index, ms)).await?;
        self.opts.status.switched();
        tracing::info!(from = %from, to = %newest.id, snapshot = index, "follow: the primary started a new generation; now following it");
        Ok(true)
    }
}

/// The page records of a segment-format body, read one at a time, checked
/// to be in ascending order without repeats (as `segment::decode_body`
/// checks a body in memory).
struct Records {
    body: Box<dyn Read + Send>,
    page_size: usize,
    left: u64,
    previous: u32,
    location: String,
    key: String,
}

impl Iterator for Records {
    type Item = Result<(u32, Cow<'static, [u8]>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let bad = |message: String| Error::BadObject {
            location: self.location.clone(),
            key: self.key.clone(),
            message,
        };
        let mut number = [0u8; 4];
        let mut page = vec![0u8; self.page_size];
        if let Err(e) = self
            .body
            .read_exact(&mut number)
            .and_then(|_| self.body.read_exact(&mut page))
        {
            self.left = 0;
            return Some(Err(bad(format!("body ends early: {e}"))));
        }
        let pgno = u32::from_be_bytes(number);
        if pgno <= self.previous {
            self.left = 0;
            return Some(Err(bad(format!(
                "page {pgno} comes after page {} (records must ascend)",
                self.previous
            ))));
        }
        self.previous = pgno;
        Some(Ok((pgno, Cow::Owned(page))))
    }
}

/// The merged object of `g` that covers segment `index` and reaches
/// furthest.
fn covering(g: &GenerationListing, index: u64) -> Option<&Compacted> {
    g.compacted
        .iter()
        .filter(|c| c.first <= index && index <= c.last)
        .max_by_key(|c| (c.last, c.level))
}

fn file_at(at: &Point, next: Option<Point>) -> FollowFile {
    FollowFile {
        version: 1,
        pid: std::process::id(),
        at: at.clone(),
        next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (page number, digest) of every page, for short failure messages.
    fn summary(pages: &[(u32, Vec<u8>)]) -> Vec<(u32, String)> {
        pages
            .iter()
            .map(|(n, p)| (*n, format!("{:x}", Digest::page(*n, p))))
            .collect()
    }

    /// Every page of the database at `path`, read through SQLite.
    fn pages_of(path: &Path) -> Vec<(u32, Vec<u8>)> {
        let c = Connection::open(path).unwrap();
        let mut stmt = c.prepare("SELECT pgno, data FROM sqlite_dbpage").unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        rows
    }

    /// Steps change the copy to exactly the source's pages, and the digest
    /// kept from the changed pages alone equals one computed from the whole
    /// file, through growth, shrinking (VACUUM) and unchanged pages.
    #[test]
    fn steps_copy_pages_and_keep_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.db");
        let copy = dir.path().join("copy.db");
        let s = Connection::open(&src).unwrap();
        s.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (randomblob(5000));",
        )
        .unwrap();
        s.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        std::fs::copy(&src, &copy).unwrap();
        let mut a = Applier::open(&copy).unwrap();
        let check = |a: &mut Applier| {
            let want = pages_of(&src);
            let size = want.len() as u32;
            let mut it = want.iter().map(|(n, p)| Ok((*n, Cow::Borrowed(&p[..]))));
            let mut seen = None;
            let d = a
                .step(Some(size), &mut it, size, &mut |d| {
                    seen = Some(d);
                    Ok(())
                })
                .unwrap();
            assert_eq!(seen, Some(d));
            assert_eq!(summary(&pages_of(&copy)), summary(&want));
            assert_eq!(
                a.scan().unwrap(),
                d,
                "incremental digest equals a full scan"
            );
        };
        for _ in 0..3 {
            s.execute_batch("INSERT INTO t SELECT randomblob(3000) FROM t LIMIT 20")
                .unwrap();
            check(&mut a);
        }
        s.execute_batch("DELETE FROM t WHERE rowid > 2; VACUUM;")
            .unwrap();
        check(&mut a);
        check(&mut a);
        drop(a);
        let a = Applier::open(&copy).unwrap();
        assert_eq!(summary(&pages_of(&copy)), summary(&pages_of(&src)));
        assert_eq!(
            a.digest,
            pages_of(&src)
                .iter()
                .fold(Digest::default(), |mut d, (n, p)| {
                    d.add(*n, p);
                    d
                })
        );
    }
}

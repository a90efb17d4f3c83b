//! The source: one per replicated database, whatever the number of replicas.
//!
//! It owns everything walstream holds on the database: the one descriptor
//! (see [`crate::db::DbFile`]), the two connections and the read lock that
//! keeps SQLite from checkpointing or rewinding the WAL past what was read,
//! the position in the WAL up to which everything was read, and the
//! checkpoints walstream runs on the application's behalf. It reads each
//! committed transaction once and hands it, as a shared [`Batch`], to a sink
//! (the worker gives it to every replica's [`crate::shipper::Shipper`]).
//!
//! The lock dance: a read transaction on one connection is always open. To
//! move it forward, a read transaction begins on the idle connection, every
//! whole transaction up to the end of the WAL is read and handed to the sink,
//! and only then does the older read transaction end. So there is never a
//! moment with no reader, and nothing is checkpointed or rewound away before
//! it was read. Whether it was *stored* is the shippers' business: they hold
//! in memory what they have not stored (see the shipper's module doc).
//!
//! Continuity is decided from the WAL header: the same salts mean the same
//! WAL; a rewind (new salts, read from the start again) can only happen after
//! every frame of the old WAL was read, because the lock rules out any other.
//! A WAL file with another inode, or corruption reported by walstream's own
//! connections, means the lock was lost: `Error::ContinuityLost`.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::checkpoint::{CheckpointPolicy, Checkpointer, Outcome};
use crate::db::{self, DbConn, DbFile, FileId, ImagePlan};
use crate::defaults;
use crate::error::{Error, IoContext, Result, SqlContext};
use crate::shipper::{Batch, MAX_SEGMENT_BYTES};
use crate::wal::{self, WalCursor};

/// How often the read lock moves forward at most (see `Source::lock_due`).
const LOCK_ADVANCE_EVERY: Duration = Duration::from_secs(1);
/// How often a rewind under the write lock may be tried while the WAL is
/// over `max-checkpoint-page-count` (each try fails at once when the
/// application holds the lock).
pub const GATED_REWIND_EVERY: Duration = Duration::from_millis(10);
/// How long a rewind waits for the application's current write transaction
/// to end before giving up until the next try.
const GATE_WAIT: Duration = Duration::from_millis(20);

/// Tunables of one database (replicas have their own, see `ShipperOptions`).
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub db: PathBuf,
    /// Polling fallback when file notifications are missed.
    pub monitor_interval: Duration,
    pub checkpoint_interval: Duration,
    pub min_checkpoint_page_count: u64,
    pub max_checkpoint_page_count: u64,
    pub busy_timeout: Duration,
}

impl SourceOptions {
    pub fn new(db: impl Into<PathBuf>) -> SourceOptions {
        SourceOptions {
            db: db.into(),
            monitor_interval: defaults::MONITOR_INTERVAL,
            checkpoint_interval: defaults::CHECKPOINT_INTERVAL,
            min_checkpoint_page_count: defaults::MIN_CHECKPOINT_PAGE_COUNT,
            max_checkpoint_page_count: defaults::MAX_CHECKPOINT_PAGE_COUNT,
            busy_timeout: defaults::BUSY_TIMEOUT,
        }
    }
}

/// What a database closed while idle left (see `Source::close_idle`).
#[derive(Debug, Clone)]
pub struct Closed {
    /// Where reading had got to in the WAL (`None`: it was empty).
    cursor: Option<WalCursor>,
    /// The SHA-256 of the database file, which held exactly what was read.
    digest: [u8; 32],
    page_size: u32,
    /// The database's and WAL's stamps as closed (see `changed_since`).
    files: Option<(crate::replicate::FileStamp, crate::replicate::FileStamp)>,
}

impl Closed {
    /// Whether the database or its WAL changed since it was closed (or
    /// cannot be looked at).
    pub fn changed(&self, db: &Path) -> bool {
        let now = crate::replicate::file_stamps(db);
        now.is_none() || now != self.files
    }
}

/// Where batches read from the WAL go.
pub type Sink<'a> = &'a mut dyn FnMut(Arc<Batch>);

pub struct Source {
    opts: SourceOptions,
    db: PathBuf,
    wal: PathBuf,
    /// The database file: every page read (snapshots) goes through it, and
    /// both connections keep it open.
    file: DbFile,
    conns: [DbConn; 2],
    /// Index of the connection holding the read transaction.
    active: usize,
    page_size: u32,
    /// Where reading the WAL goes on: every whole transaction before it was
    /// handed to the sink. `None` while the WAL is empty.
    cursor: Option<WalCursor>,
    /// WAL length seen by the last read.
    wal_len: u64,
    /// (device, inode) of the WAL file last read. While walstream's
    /// connections are open SQLite never deletes the WAL, so another inode
    /// means continuity is lost (see `open_wal`).
    wal_id: Option<FileId>,
    checkpointer: Checkpointer,
    /// When the read lock last moved forward, and the read frame count then.
    locked_at: Instant,
    locked_frames: u64,
    /// When a rewind of the WAL was last attempted (see `maintain`).
    rewind_tried: Instant,
    /// When a rewind under the write lock was last attempted, and when one
    /// last succeeded.
    gated_rewind_tried: Instant,
    gated_rewound: Instant,
    /// Checkpoints run since `take_checkpoints`, by mode (for metrics).
    checkpoints: Vec<&'static str>,
}

impl Source {
    /// Opens the database (which must exist: the worker waits for it to be
    /// created) and puts it in WAL mode if it is not.
    pub fn open(opts: SourceOptions) -> Result<Source> {
        db::check_directory(&opts.db)?;
        match std::fs::metadata(&opts.db) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(Error::Database {
                    path: opts.db.clone(),
                    message: "not a regular file".into(),
                })
            }
            Err(e) => return Err(e).io_ctx("stat", &opts.db),
        }
        let db = canonical(&opts.db)?;
        let wal = db::wal_path(&db);
        let file = DbFile::open(&db)?;
        let c0 = file.connect(opts.busy_timeout)?;
        let page_size = db::ensure_wal(&c0, &db)?;
        let c1 = file.connect(opts.busy_timeout)?;
        let checkpointer = Checkpointer::new(CheckpointPolicy {
            min_pages: opts.min_checkpoint_page_count,
            max_pages: opts.max_checkpoint_page_count,
            interval: opts.checkpoint_interval,
            busy_timeout: opts.busy_timeout,
        });
        Ok(Source {
            opts,
            db,
            wal,
            file,
            conns: [c0, c1],
            active: 0,
            page_size,
            cursor: None,
            wal_len: 0,
            wal_id: None,
            checkpointer,
            locked_at: Instant::now(),
            locked_frames: 0,
            rewind_tried: Instant::now(),
            gated_rewind_tried: Instant::now(),
            gated_rewound: Instant::now(),
            checkpoints: Vec::new(),
        })
    }

    pub fn db(&self) -> &Path {
        &self.db
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    pub fn wal_len(&self) -> u64 {
        self.wal_len
    }

    pub fn cursor(&self) -> Option<WalCursor> {
        self.cursor
    }

    pub fn options(&self) -> &SourceOptions {
        &self.opts
    }

    /// Takes the first read lock.
    pub fn lock(&mut self) -> Result<()> {
        db::begin_read(&self.conns[self.active], &self.db).map_err(|e| self.lost_if_corrupt(e))
    }

    /// Ends walstream's read transactions (before the connections close).
    pub fn release(&mut self) {
        for c in &self.conns {
            let _ = db::end_read(c, &self.db);
        }
    }

    /// Where the WAL's committed transactions end now (or `None` without a
    /// WAL): where a new generation's first snapshot is taken when no
    /// replica resumes. Sets the read position there.
    pub fn start_at_end(&mut self) -> Result<Option<WalCursor>> {
        let cursor = match self.open_wal()? {
            Some((mut f, _)) => match wal::read_header(&mut f).io_ctx("read", &self.wal)? {
                Some(h) if h.page_size == self.page_size => Some(
                    wal::read_committed(&mut f, &h.start(), None)
                        .io_ctx("read", &self.wal)?
                        .1,
                ),
                _ => None,
            },
            None => None,
        };
        self.cursor = cursor;
        self.mark_locked();
        Ok(cursor)
    }

    /// Sets the read position at `cursor`, which `continues` proved.
    pub fn start_at(&mut self, cursor: WalCursor) {
        self.cursor = Some(cursor);
        self.mark_locked();
    }

    /// Whether the WAL on disk holds every frame up to `cursor`, unchanged:
    /// a generation that ends there can be continued.
    pub fn continues(&mut self, cursor: &WalCursor) -> Result<bool> {
        let Some((mut file, _)) = self.open_wal()? else {
            return Ok(false);
        };
        wal::verify_prefix(&mut file, cursor).io_ctx("read", &self.wal)
    }

    /// The whole transactions from `from` up to `to` (both proved by
    /// `continues`), in batches of at most one segment.
    pub fn read_range(&mut self, from: WalCursor, to: WalCursor) -> Result<Vec<Arc<Batch>>> {
        let Some((mut file, _)) = self.open_wal()? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut at = from;
        while at.offset < to.offset {
            let (committed, end) =
                wal::read_batch(&mut file, &at, Some(to.offset), MAX_SEGMENT_BYTES)
                    .io_ctx("read", &self.wal)?;
            if committed.transactions == 0 {
                break;
            }
            out.push(Arc::new(Batch { committed, end }));
            at = end;
        }
        if at != to {
            return Err(Error::ContinuityLost {
                path: self.db.clone(),
                reason: format!(
                    "the WAL no longer holds the frames between two replicas' positions (read up to offset {}, expected {})",
                    at.offset, to.offset
                ),
            });
        }
        Ok(out)
    }

    /// Whether the read lock is due to move forward: at most once per
    /// `LOCK_ADVANCE_EVERY`, or when `min-checkpoint-page-count` frames were
    /// read past it. The lock does not have to move for reading: frames
    /// after it are safe while it is held (with a read mark above 0 no
    /// writer can rewind the WAL; with mark 0 no checkpoint can copy
    /// anything, so at most one rewind, of a WAL that was entirely read, can
    /// happen). It moves so that checkpoints can progress; moving it on
    /// every commit let the application's own auto-checkpoint copy and fsync
    /// a few frames on nearly every commit, halving its write rate.
    pub fn lock_due(&self) -> bool {
        let read = self.cursor.map_or(0, |c| c.frame_index());
        self.locked_at.elapsed() >= LOCK_ADVANCE_EVERY
            || read < self.locked_frames
            || read - self.locked_frames >= self.opts.min_checkpoint_page_count
    }

    /// Reads every whole transaction after the read position into the sink,
    /// moving the read lock to the end of the WAL first when it is due.
    pub fn read(&mut self, sink: Sink) -> Result<()> {
        let r = if self.lock_due() {
            self.move_lock(sink)
        } else {
            self.pump(None, sink).map(|_| ())
        };
        r.map_err(|e| self.lost_if_corrupt(e))
    }

    /// Reads whole transactions after the read position into the sink, in
    /// batches of at most one segment, up to the end of the WAL as it was
    /// when it was opened, or until `budget` page bytes were read. Returns
    /// whether it reached the end.
    fn pump(&mut self, budget: Option<u64>, sink: Sink) -> Result<bool> {
        self.check_same_file()?;
        let Some((mut file, len)) = self.open_wal()? else {
            self.wal_len = 0;
            return Ok(true);
        };
        self.wal_len = len;
        let header = wal::read_header(&mut file).io_ctx("read", &self.wal)?;
        let mut at = match (header, self.cursor) {
            (None, _) => {
                if len < wal::WAL_HEADER_SIZE {
                    // Truncated by a checkpoint while the lock was held:
                    // everything in it was read.
                    self.cursor = None;
                }
                return Ok(true);
            }
            (Some(h), _) if h.page_size != self.page_size => {
                return Err(Error::ContinuityLost {
                    path: self.db.clone(),
                    reason: format!(
                        "the WAL's page size is {}, the database's {}",
                        h.page_size, self.page_size
                    ),
                });
            }
            (Some(h), Some(c)) if h.salt1 == c.salt1 && h.salt2 == c.salt2 => c,
            // The WAL was rewound or truncated and rewritten. While the lock
            // is held that can only happen once between two reads, and only
            // after every frame of the old WAL was read: a rewind needs all
            // readers off the WAL (a reader that started on a fully
            // checkpointed WAL), and such a reader blocks every checkpoint of
            // the new frames, so no second rewind can follow. The new salts
            // are not predictable (a connection that never restarted the WAL
            // itself picks random ones), so they are not checked.
            (Some(h), _) => {
                tracing::debug!(db = %self.db.display(), "WAL reset observed");
                h.start()
            }
        };
        let mut left = budget.unwrap_or(u64::MAX);
        loop {
            let max = MAX_SEGMENT_BYTES.min(left);
            if max == 0 {
                self.cursor = Some(at);
                return Ok(false);
            }
            let (committed, end) =
                wal::read_batch(&mut file, &at, Some(len), max).io_ctx("read", &self.wal)?;
            if committed.transactions == 0 {
                self.cursor = Some(at);
                return Ok(true);
            }
            // Frames read after the database was replaced by another file (a
            // new inode under the same name, with its own WAL) belong to that
            // other database: checking after the read means nothing read
            // from it is ever handed on.
            self.check_same_file()?;
            // Only a batch cut for size is followed by another: the file's
            // length is no limit in a rewound WAL, whose stale space a busy
            // writer refills as fast as it is read.
            let cut = committed.page_bytes() >= max;
            left = left.saturating_sub(committed.page_bytes());
            self.cursor = Some(end);
            sink(Arc::new(Batch { committed, end }));
            if !cut {
                return Ok(true);
            }
            at = end;
        }
    }

    /// Begins a read transaction on the idle connection, reads everything
    /// committed into the sink, and only then ends the older read
    /// transaction. On failure the older one is kept.
    fn move_lock(&mut self, sink: Sink) -> Result<()> {
        let next = 1 - self.active;
        db::begin_read(&self.conns[next], &self.db)?;
        if let Err(e) = self.pump(None, sink) {
            let _ = db::end_read(&self.conns[next], &self.db);
            return Err(e);
        }
        db::end_read(&self.conns[self.active], &self.db)?;
        self.active = next;
        self.mark_locked();
        Ok(())
    }

    /// Records that the read lock just moved to the read position.
    fn mark_locked(&mut self) {
        self.locked_at = Instant::now();
        self.locked_frames = self.cursor.map_or(0, |c| c.frame_index());
    }

    /// Checkpoints, after a read. `spaced`: some replica batches uploads by
    /// a sync-interval (then the lock often lands behind the application's
    /// next commit, and rewinds under the write lock are needed more).
    pub fn maintain(&mut self, spaced: bool, sink: Sink) -> Result<()> {
        self.maintain_inner(spaced, sink)
            .map_err(|e| self.lost_if_corrupt(e))
    }

    fn maintain_inner(&mut self, spaced: bool, sink: Sink) -> Result<()> {
        let (read_frames, file_frames) = self.wal_frames();
        let idle = &self.conns[1 - self.active];
        let mut outcome = self
            .checkpointer
            .run(idle, &self.db, read_frames, file_frames)?;
        self.count_checkpoint(outcome);
        if outcome == (Outcome::Passive { complete: false })
            && self.rewind_tried.elapsed() >= LOCK_ADVANCE_EVERY
        {
            // Under a steady load the checkpoint never catches up with a
            // lock that moves once a second, so the WAL is never rewound and
            // grows without bound. Move the lock to the end now and copy the
            // few frames since: if no commit lands in between, the WAL is
            // fully checkpointed.
            self.rewind_tried = Instant::now();
            self.move_lock(sink)?;
            let (read_frames, file_frames) = self.wal_frames();
            outcome = self.checkpointer.passive(
                &self.conns[1 - self.active],
                &self.db,
                read_frames,
                file_frames,
            )?;
            self.count_checkpoint(outcome);
        }
        if outcome == (Outcome::Passive { complete: true }) && !self.checkpointer.truncate_due() {
            // Sit on the fully checkpointed WAL: the new read transaction gets
            // read mark 0, which does not stand in the way of the
            // application's next write rewinding the WAL to its start.
            self.move_lock(sink)?;
        }
        if self.checkpointer.truncate_due() {
            // Move the read lock onto the now fully checkpointed WAL (SQLite
            // then gives it read mark 0, which does not stand in the way of a
            // TRUNCATE), reading anything new first, and truncate at once.
            self.move_lock(sink)?;
            let outcome = self
                .checkpointer
                .truncate(&self.conns[1 - self.active], &self.db)?;
            self.count_checkpoint(outcome);
            return Ok(());
        }
        // With a sync-interval, whatever the outcome: a checkpoint that
        // completes often ends in a lock that landed behind the application's
        // next commit, and then the WAL is not rewound either.
        if (outcome == (Outcome::Passive { complete: false }) || spaced)
            // The WAL's content, not its file: a rewound WAL keeps its size.
            && self.wal_frames().0 >= self.opts.max_checkpoint_page_count
            && self.gated_rewind_tried.elapsed() >= GATED_REWIND_EVERY
        {
            self.gated_rewind_tried = Instant::now();
            self.gated_rewind(spaced, sink)?;
        }
        Ok(())
    }

    /// Whether, with a sync-interval, the WAL has grown past
    /// `max-checkpoint-page-count` since it was last rewound: rewinds under
    /// the write lock are then also tried between rounds, with at most one
    /// success a second (each holds up the application's writers briefly).
    pub fn rewind_wanted(&self) -> bool {
        self.gated_rewound.elapsed() >= LOCK_ADVANCE_EVERY
            && self.wal_frames().0 >= self.opts.max_checkpoint_page_count
    }

    /// A rewind tried between two rounds (see `rewind_wanted`), at most once
    /// per `GATED_REWIND_EVERY`.
    pub fn rewind_between_rounds(&mut self, sink: Sink) {
        if self.gated_rewind_tried.elapsed() < GATED_REWIND_EVERY {
            return;
        }
        self.gated_rewind_tried = Instant::now();
        if let Err(e) = self.gated_rewind(true, sink) {
            tracing::debug!(db = %self.db.display(), error = %e, "rewind between rounds failed");
        }
    }

    /// Rewinds a WAL that a write load with no pauses keeps growing past
    /// `max-checkpoint-page-count`: without a moment in which no commit
    /// lands, no checkpoint can ever catch up with the end of the WAL, and
    /// SQLite rewinds only a fully checkpointed WAL.
    ///
    /// walstream takes the write lock for that moment, waiting at most
    /// `GATE_WAIT` for it (so it never queues behind a long transaction, and
    /// nothing queues behind it for long), and holds it only to read the few
    /// frames after the read position and to copy the frames since the last
    /// checkpoint. While it holds the lock, its own write transaction's read
    /// mark protects the WAL, so the older read lock can go; the new one then
    /// starts on the fully checkpointed WAL (read mark 0), and the
    /// application's next write rewinds it.
    fn gated_rewind(&mut self, spaced: bool, sink: Sink) -> Result<()> {
        // Read and copy nearly everything first, without the write lock, so
        // that little is left to do while holding it.
        self.move_lock(sink)?;
        let r = db::checkpoint(&self.conns[1 - self.active], &self.db, "PASSIVE")?;
        if !r.busy && r.log_frames >= 0 && r.log_frames == r.checkpointed && !spaced {
            // Caught up without the lock after all. (With a sync-interval
            // the gate is taken anyway: moving the lock without it lands
            // behind the application's next commit more often than not, and
            // then nothing is rewound.)
            return self.move_lock(sink);
        }
        if !self.take_gate()? {
            tracing::debug!(db = %self.db.display(), "write lock busy, rewind later");
            return Ok(());
        }
        let result = self.under_gate(sink);
        let _ = self.conns[1 - self.active].execute_batch("ROLLBACK");
        let rewound = result?;
        if rewound {
            self.gated_rewound = Instant::now();
        }
        self.checkpoints.push("gated");
        tracing::debug!(db = %self.db.display(), rewound, "checkpoint under the write lock");
        Ok(())
    }

    /// Takes the write lock on the idle connection, waiting at most
    /// `GATE_WAIT` (so walstream never queues behind a long transaction,
    /// and nothing queues behind it for long). `false`: the application
    /// holds it.
    fn take_gate(&self) -> Result<bool> {
        let gate = &self.conns[1 - self.active];
        gate.busy_timeout(GATE_WAIT).db_ctx(&self.db)?;
        let began = gate.execute_batch("BEGIN IMMEDIATE");
        gate.busy_timeout(self.opts.busy_timeout).db_ctx(&self.db)?;
        match began {
            Ok(()) => Ok(true),
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e).db_ctx(&self.db),
        }
    }

    /// The part of `gated_rewind` done while holding the write lock. Returns
    /// whether the WAL was fully checkpointed. On any error the older read
    /// lock is still (or again) held.
    fn under_gate(&mut self, sink: Sink) -> Result<bool> {
        // Nothing can be appended now: read up to the end, unless that is
        // more than one segment (then give up; the next round reads it).
        if !self.pump(Some(MAX_SEGMENT_BYTES), sink)? {
            return Ok(false);
        }
        // The gate's read mark protects every frame now; let the old lock go
        // and copy the rest.
        let lock = &self.conns[self.active];
        db::end_read(lock, &self.db)?;
        let r = db::checkpoint(lock, &self.db, "PASSIVE");
        // Back to holding a read lock before the gate opens: on the fully
        // checkpointed WAL this one takes read mark 0.
        db::begin_read(lock, &self.db)?;
        let r = r?;
        self.mark_locked();
        Ok(!r.busy && r.log_frames >= 0 && r.log_frames == r.checkpointed)
    }

    /// Whether the WAL file has grown past `max-checkpoint-page-count`, so a
    /// TRUNCATE is owed: rounds must go on (the checkpointer needs one to
    /// see the WAL fully copied and another to truncate it) even when
    /// nothing is written.
    pub fn truncate_owed(&self) -> bool {
        self.wal_frames().1 >= self.opts.max_checkpoint_page_count
    }

    /// Gets an idle database ready to be closed (for want of descriptors,
    /// see `fdlimit`): returns what proves, when it is opened again, that
    /// nothing committed in between was missed; `None` when it cannot close
    /// now (the application holds the write lock, or committed since the
    /// last read: what it committed goes to the sink, for the next round).
    ///
    /// Under the write lock, held for at most `GATE_WAIT` plus one PASSIVE
    /// checkpoint of frames already read, everything read is copied into
    /// the database file, and a read transaction begins on the fully
    /// checkpointed WAL (read mark 0, which keeps any checkpoint from
    /// copying anything into the file). After the lock is let go, the
    /// database file, which now holds exactly what was read (and shipped,
    /// which the caller checked), is hashed. The caller then drops the
    /// source: its connections close without checkpointing.
    pub fn close_idle(&mut self, sink: Sink) -> Result<Option<Closed>> {
        if !self.take_gate()? {
            return Ok(None);
        }
        let mut handed = false;
        let mut track = |b: Arc<Batch>| {
            handed = true;
            sink(b)
        };
        let result = match self.pump(None, &mut track) {
            Ok(_) => self.under_gate(&mut track),
            Err(e) => Err(e),
        };
        // Taken while no one else can write: any commit after the lock is
        // let go changes them, so the closed database notices it.
        let files = crate::replicate::file_stamps(&self.db);
        let _ = self.conns[1 - self.active].execute_batch("ROLLBACK");
        let complete = result.map_err(|e| self.lost_if_corrupt(e))?;
        if handed || !complete {
            return Ok(None);
        }
        let digest = self.digest()?;
        Ok(Some(Closed {
            cursor: self.cursor,
            digest,
            page_size: self.page_size,
            files,
        }))
    }

    /// Opens a database that `close_idle` closed and takes the read lock.
    /// Returns the source and whether it continues where it was closed:
    /// the WAL it left still holds every frame it had read (then reading
    /// goes on from there), or the WAL was rewound or removed and the
    /// database file is still exactly what it left (then everything in the
    /// WAL now is new, and reading starts at its beginning). Otherwise
    /// something was checkpointed into the file unseen, and the caller
    /// starts new generations.
    pub fn reopen(opts: SourceOptions, closed: &Closed) -> Result<(Source, bool)> {
        let mut s = Source::open(opts)?;
        s.lock()?;
        if s.page_size != closed.page_size {
            return Ok((s, false));
        }
        if let Some(c) = closed.cursor {
            if s.continues(&c)? {
                s.start_at(c);
                return Ok((s, true));
            }
            // The same WAL (same salts) that no longer holds what was read:
            // nothing to prove continuity with.
            if let Some((mut f, _)) = s.open_wal()? {
                if let Some(h) = wal::read_header(&mut f).io_ctx("read", &s.wal)? {
                    if (h.salt1, h.salt2) == (c.salt1, c.salt2) {
                        return Ok((s, false));
                    }
                }
            }
        }
        if s.digest()? != closed.digest {
            return Ok((s, false));
        }
        s.cursor = None;
        s.wal_len = 0;
        s.mark_locked();
        Ok((s, true))
    }

    /// The SHA-256 of the whole database file.
    fn digest(&self) -> Result<[u8; 32]> {
        use sha2::{Digest, Sha256};
        let len = self.file.file_len().io_ctx("stat", &self.db)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            self.file
                .read_exact_at(&mut buf[..n], at)
                .io_ctx("read", &self.db)?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(h.finalize().into())
    }

    /// The database file's size.
    pub fn file_len(&self) -> u64 {
        self.file.file_len().unwrap_or(u64::MAX)
    }

    /// Frames read from the current WAL, and the WAL file's size in frames.
    fn wal_frames(&self) -> (u64, u64) {
        let read = self.cursor.map_or(0, |c| c.frame_index());
        let frame_size = wal::FRAME_HEADER_SIZE + self.page_size as u64;
        let file_frames = std::fs::metadata(&self.wal)
            .map(|m| m.len().saturating_sub(wal::WAL_HEADER_SIZE) / frame_size)
            .unwrap_or(0);
        (read, file_frames)
    }

    fn count_checkpoint(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Passive { .. } => self.checkpoints.push("passive"),
            Outcome::Truncated => self.checkpoints.push("truncate"),
            Outcome::TruncateBusy => self.checkpoints.push("truncate_busy"),
            Outcome::Skipped => {}
        }
    }

    /// The checkpoints run since the last call, by mode.
    pub fn take_checkpoints(&mut self) -> Vec<&'static str> {
        std::mem::take(&mut self.checkpoints)
    }

    /// Plans an image of the database at the read position (for a snapshot
    /// there). The read lock is at or before it, so the checkpointer cannot
    /// change any page read from the database file.
    pub fn image(&self) -> Result<ImagePlan> {
        db::image_plan(&self.file, self.page_size, self.cursor.as_ref())
    }

    pub fn file(&self) -> &DbFile {
        &self.file
    }

    /// Opens the WAL and returns it with its length, after checking that it
    /// is the same file as the last time: SQLite deletes and re-creates the
    /// WAL only after taking the EXCLUSIVE lock on the database, which
    /// walstream's open connections rule out. Another file means that lock
    /// was lost and frames walstream never read may have been checkpointed
    /// and discarded, so nothing more may go into this generation.
    fn open_wal(&mut self) -> Result<Option<(File, u64)>> {
        let file = match File::open(&self.wal) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).io_ctx("open", &self.wal),
        };
        let m = file.metadata().io_ctx("stat", &self.wal)?;
        let id = {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        };
        match self.wal_id.replace(id) {
            Some(old) if old != id => Err(Error::ContinuityLost {
                path: self.db.clone(),
                reason: "the WAL file was deleted and re-created while walstream held its lock (another process checkpointed the database as if no one else had it open)".into(),
            }),
            _ => Ok(Some((file, m.len()))),
        }
    }

    /// Errors when the database's name now points at another file; the
    /// worker then starts over, which opens the new file and starts a new
    /// generation.
    pub fn check_same_file(&self) -> Result<()> {
        match db::file_id(&self.db) {
            Ok(id) if id == self.file.id() => Ok(()),
            Ok(_) => Err(Error::Replaced {
                path: self.db.clone(),
            }),
            Err(e) => Err(e),
        }
    }

    /// walstream's own connection reporting a corrupt database means that
    /// what it reads no longer provably matches what SQLite wrote (the usual
    /// cause: a lock was lost and the WAL or the database changed under its
    /// read transaction). Nothing more may be shipped into the generation.
    pub fn lost_if_corrupt(&self, e: Error) -> Error {
        lost_if_corrupt(e, &self.db)
    }
}

pub(crate) fn lost_if_corrupt(e: Error, db: &Path) -> Error {
    match &e {
        Error::Sqlite { source, .. }
            if matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
            ) =>
        {
            Error::ContinuityLost {
                path: db.to_path_buf(),
                reason: format!("walstream's own connection reports: {source}"),
            }
        }
        _ => e,
    }
}

fn canonical(db: &Path) -> Result<PathBuf> {
    let name = db.file_name().ok_or_else(|| Error::Database {
        path: db.to_path_buf(),
        message: "not a file path".into(),
    })?;
    let dir = match db.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Ok(std::fs::canonicalize(dir)
        .io_ctx("resolve", dir)?
        .join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite_error(code: std::ffi::c_int) -> Error {
        Error::Sqlite {
            path: PathBuf::from("app.db"),
            source: rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None),
        }
    }

    #[test]
    fn corruption_reported_by_walstreams_connection_loses_continuity() {
        for code in [rusqlite::ffi::SQLITE_CORRUPT, rusqlite::ffi::SQLITE_NOTADB] {
            let e = lost_if_corrupt(sqlite_error(code), Path::new("app.db"));
            assert!(matches!(e, Error::ContinuityLost { .. }), "{e}");
            assert!(e
                .to_string()
                .starts_with("database app.db: continuity lost"));
        }
        // A busy database or a storage error is retried, not a new generation.
        let e = lost_if_corrupt(
            sqlite_error(rusqlite::ffi::SQLITE_BUSY),
            Path::new("app.db"),
        );
        assert!(matches!(e, Error::Sqlite { .. }), "{e}");
    }
}

//! The replication engine for one database and one replica.
//!
//! It runs on its own thread, because everything it does to the database is
//! blocking (SQLite calls, reading the WAL), and reaches the replica through
//! the async storage trait on the shared runtime.
//!
//! The loop: wake on a file notification for the WAL (or the polling
//! fallback), then run one *tick*:
//!
//! 1. when the read lock is due to move (see `Replicator::tick`), begin a read
//!    transaction on the idle connection (the other one still holds the
//!    previous read transaction, so there is never a moment with no reader,
//!    and the WAL can never be rewound over unread frames);
//! 2. read every whole, checksum-valid transaction after the shipped position
//!    and ship them as one segment (group commit: whatever committed while the
//!    previous upload was in flight goes into the next segment, with no timer);
//! 3. only after the segment is stored, end the older read transaction;
//! 4. checkpoint if due, snapshot if due.
//!
//! If the upload fails the older read transaction is kept, the newer one is
//! dropped, and the tick is retried: nothing unshipped can be checkpointed
//! away. Continuity is decided from the WAL header: the same salts mean the
//! same WAL; a reset walstream observed (SQLite increments salt-1) continues the
//! generation from the new WAL's first frame; anything else starts a new
//! generation with a fresh snapshot.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::runtime::Handle;

use crate::checkpoint::{CheckpointPolicy, Checkpointer, Outcome};
use crate::db::{self, DbConn, DbFile, FileId};
use crate::error::{Error, IoContext, Result, SqlContext};
use crate::generation::{self, Manifest};
use crate::metrics::{ReplicaStatus, State};
use crate::replica::Replica;
use crate::segment::{SegmentHeader, WalPoint};
use crate::shutdown::Shutdown;
use crate::snapshot::{self, SnapshotHeader};
use crate::wal::{self, WalCursor};
use crate::watch::Watcher;

/// Distinct page bytes read into one segment before it is cut (at a commit
/// boundary): bounds memory when the application outpaces uploads.
const MAX_SEGMENT_BYTES: u64 = 4 << 20;

/// How often the read lock moves forward at most (see `Replicator::tick`).
const LOCK_ADVANCE_EVERY: Duration = Duration::from_secs(1);
/// How often a rewind under the write lock may be tried while the WAL is
/// over `max-checkpoint-page-count` (each try fails at once when the
/// application holds the lock).
const GATED_REWIND_EVERY: Duration = Duration::from_millis(10);
/// How long a rewind waits for the application's current write transaction
/// to end before giving up until the next try.
const GATE_WAIT: Duration = Duration::from_millis(20);

/// Tunables of one replicated database.
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    pub db: PathBuf,
    /// Polling fallback when file notifications are missed.
    pub monitor_interval: Duration,
    pub checkpoint_interval: Duration,
    pub min_checkpoint_page_count: u64,
    pub max_checkpoint_page_count: u64,
    pub snapshot_interval: Duration,
    pub busy_timeout: Duration,
    /// Minimum time between two uploads. The first commit after a quiet
    /// period ships at once; under steady load uploads are spaced by this, so
    /// request counts stay bounded (3600 PUTs an hour at 1s; moving the lock
    /// for a WAL rewind holds what it must read instead, see `relock`).
    pub sync_interval: Duration,
}

impl ReplicateOptions {
    pub fn new(db: impl Into<PathBuf>) -> ReplicateOptions {
        ReplicateOptions {
            db: db.into(),
            monitor_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(60),
            min_checkpoint_page_count: 1000,
            max_checkpoint_page_count: 10_000,
            snapshot_interval: Duration::from_secs(24 * 3600),
            busy_timeout: Duration::from_secs(5),
            sync_interval: Duration::ZERO,
        }
    }
}

/// Messages to a running replicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Something changed on disk (or a test wants a tick now).
    Wake,
    /// Ship what is committed, then stop.
    Shutdown,
}

/// Where shipping stands, kept in memory so the hot path never lists.
#[derive(Debug, Clone)]
struct Shipping {
    generation: String,
    next_index: u64,
    position: u64,
    /// Position in the current WAL up to which everything is shipped; `None`
    /// while the WAL is empty (truncated, or not yet written).
    cursor: Option<WalCursor>,
    last_snapshot_ms: i64,
    /// Position of the last snapshot this process stored, if any.
    snapshot_position: Option<u64>,
}

pub struct Replicator {
    opts: ReplicateOptions,
    db: PathBuf,
    wal: PathBuf,
    replica: Replica,
    rt: Handle,
    /// walstream's two connections (see the module doc). Each keeps `file`
    /// open, so the process never loses its locks on the database.
    conns: [DbConn; 2],
    /// The database file: every page read (snapshots) goes through it.
    file: DbFile,
    /// Index of the connection holding the read transaction.
    active: usize,
    page_size: u32,
    state: Option<Shipping>,
    checkpointer: Checkpointer,
    last_upload: Option<Instant>,
    /// WAL length read by the last round.
    wal_len: u64,
    /// (device, inode) of the WAL file last read. While walstream's
    /// connections are open SQLite never deletes the WAL, so another inode
    /// means continuity is lost (see `check_wal_file`).
    wal_id: Option<FileId>,
    /// When the read lock last moved forward, and the shipped frame count
    /// then.
    locked_at: Instant,
    locked_frames: u64,
    /// When a rewind of the WAL was last attempted (see `maintain`).
    rewind_tried: Instant,
    /// When a rewind under the write lock was last attempted, and when one
    /// last succeeded.
    gated_rewind_tried: Instant,
    gated_rewound: Instant,
    /// Transactions read ahead of the shipped position and not yet stored,
    /// with the WAL position after them: read under the write lock (see
    /// `gated_rewind`), or, with a sync-interval, read so that the read lock
    /// could move without an upload of its own (see `relock`). The WAL may
    /// have been rewound since, so this can be their only copy outside the
    /// database file: they go up first, in the next segment.
    pending: Option<(wal::Committed, WalCursor)>,
    /// Set by `force_new_generation`: `start` begins a new generation for
    /// this reason instead of resuming.
    forced: Option<String>,
    status: Arc<ReplicaStatus>,
}

impl Replicator {
    /// Opens the database, waiting for it to be created if needed. Returns
    /// `Ok(None)` if a shutdown arrived while waiting.
    pub fn open(
        opts: ReplicateOptions,
        replica: Replica,
        rt: Handle,
        control: &Receiver<Control>,
        status: Arc<ReplicaStatus>,
    ) -> Result<Option<Replicator>> {
        db::check_directory(&opts.db)?;
        let mut waited = false;
        loop {
            match std::fs::metadata(&opts.db) {
                Ok(m) if m.is_file() => break,
                Ok(_) => {
                    return Err(Error::Database {
                        path: opts.db.clone(),
                        message: "not a regular file".into(),
                    })
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    if !waited {
                        tracing::info!(db = %opts.db.display(), "waiting for database to be created");
                        status.set_state(State::Waiting);
                        waited = true;
                    }
                    match control.recv_timeout(opts.monitor_interval.min(Duration::from_secs(1))) {
                        Ok(Control::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                            return Ok(None)
                        }
                        _ => continue,
                    }
                }
                Err(e) => return Err(e).io_ctx("stat", &opts.db),
            }
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
        Ok(Some(Replicator {
            opts,
            db,
            wal,
            replica,
            rt,
            conns: [c0, c1],
            file,
            active: 0,
            page_size,
            state: None,
            checkpointer,
            last_upload: None,
            wal_len: 0,
            wal_id: None,
            locked_at: Instant::now(),
            locked_frames: 0,
            rewind_tried: Instant::now(),
            gated_rewind_tried: Instant::now(),
            gated_rewound: Instant::now(),
            pending: None,
            forced: None,
            status,
        }))
    }

    /// Resumes the replica's newest generation if the WAL on disk provably
    /// continues it, or starts a new generation. Takes the first read lock.
    pub fn start(&mut self) -> Result<()> {
        self.start_inner().map_err(|e| lost_if_corrupt(e, &self.db))
    }

    /// Makes `start` begin a new generation, whatever the replica holds:
    /// after continuity was lost, the newest generation may already hold
    /// pages the database never had together.
    pub fn force_new_generation(&mut self, reason: String) {
        self.forced = Some(reason);
    }

    fn start_inner(&mut self) -> Result<()> {
        db::begin_read(&self.conns[self.active], &self.db)?;
        if let Some(reason) = self.forced.take() {
            return self.new_generation(&reason);
        }
        match self.resume()? {
            Ok(state) => {
                tracing::info!(
                    db = %self.db.display(),
                    replica = %self.replica.location(),
                    generation = %state.generation,
                    position = state.position,
                    "resuming generation"
                );
                self.state = Some(state);
                Ok(())
            }
            Err(reason) => self.new_generation(&reason),
        }
    }

    /// Runs until a stop: `stop` has begun (a sticky state, checked before
    /// every wait) or the control channel says `Control::Shutdown` (which
    /// only wakes it) or is dropped. Then makes the last shipment (see
    /// `finish`) and returns its outcome.
    pub fn run(
        mut self,
        control: &Receiver<Control>,
        wake: Sender<Control>,
        watcher: &Arc<Watcher>,
        stop: &Shutdown,
    ) -> Result<()> {
        // Notifications only help when uploads may follow commits faster than
        // the monitor interval polls; otherwise they would only cost a wake-up
        // per commit. `armed` lets one write wake one round, no more.
        let armed = Arc::new(AtomicBool::new(true));
        let mut watch = if self.opts.sync_interval < self.opts.monitor_interval {
            watcher.watch(&self.wal, wake, armed.clone())
        } else {
            None
        };
        if self.state.is_none() {
            self.start()?;
        }
        let mut backoff = self.opts.monitor_interval;
        let mut timeout = self.opts.monitor_interval;
        loop {
            let mut shutdown = stop.requested()
                || match control.recv_timeout(timeout) {
                    Ok(Control::Shutdown) | Err(RecvTimeoutError::Disconnected) => true,
                    Ok(Control::Wake) | Err(RecvTimeoutError::Timeout) => false,
                };
            while let Ok(m) = control.try_recv() {
                shutdown |= m == Control::Shutdown;
            }
            shutdown |= stop.requested();
            // Space uploads by sync-interval (but never delay a shutdown).
            if !shutdown {
                if let Some(wait) = self
                    .last_upload
                    .map(|t| self.opts.sync_interval.saturating_sub(t.elapsed()))
                    .filter(|w| !w.is_zero())
                {
                    timeout = wait;
                    if self.rewind_wanted() {
                        if self.gated_rewind_tried.elapsed() >= GATED_REWIND_EVERY {
                            self.gated_rewind_tried = Instant::now();
                            if let Err(e) = self.gated_rewind(true) {
                                tracing::debug!(db = %self.db.display(), error = %e, "rewind between rounds failed");
                            }
                        }
                        timeout = wait.min(GATED_REWIND_EVERY);
                    }
                    continue;
                }
            }
            if shutdown {
                let result = self.finish(stop);
                self.release();
                return result;
            }
            // Any write after this point wakes the next round; writes before
            // it are read by this one.
            armed.store(true, Ordering::SeqCst);
            let began = Utc::now().timestamp_millis();
            let uploaded_before = self.last_upload;
            let result = self.tick();
            self.note_shipped();
            match result {
                Ok(()) => {
                    backoff = self.opts.monitor_interval;
                    timeout = self.opts.monitor_interval;
                    self.synced(began);
                    // With a sync-interval, notifications only end idle
                    // spells: while commits keep coming, the next round is
                    // due a sync-interval after this one anyway, and polling
                    // then costs less than the notifications in between.
                    if let Some(w) = watch.as_mut().filter(|_| self.spaced()) {
                        if self.last_upload != uploaded_before {
                            w.set_active(false);
                            timeout = self.opts.sync_interval;
                        } else if !w.is_active() && w.set_active(true) {
                            // Look once more: a commit that landed before the
                            // watch was back raised no notification.
                            timeout = Duration::ZERO;
                        }
                    }
                    if self.rewind_wanted() {
                        timeout = timeout.min(GATED_REWIND_EVERY);
                    }
                }
                Err(e) if matches!(e, Error::Replaced { .. } | Error::ContinuityLost { .. }) => {
                    self.release();
                    return Err(e);
                }
                Err(e) => {
                    self.status.set_state(State::Failing);
                    tracing::warn!(error = %e, retry_in = ?backoff, "replication failed, will retry");
                    timeout = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// The last shipment before stopping: everything committed now, with no
    /// sync-interval spacing and no checkpoint or snapshot after it. A
    /// failure is retried with back-off until `stop`'s deadline (storage
    /// calls themselves end by it too), except one that ends this
    /// replicator at once (`Error::Replaced`, `Error::ContinuityLost`).
    fn finish(&mut self, stop: &Shutdown) -> Result<()> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let began = Utc::now().timestamp_millis();
            let result = self.sync().map_err(|e| lost_if_corrupt(e, &self.db));
            self.note_shipped();
            let e = match result {
                Ok(()) => {
                    self.synced(began);
                    tracing::info!("shipped everything committed, stopping");
                    return Ok(());
                }
                Err(e) => e,
            };
            let left = stop.remaining().unwrap_or(Duration::ZERO);
            if matches!(e, Error::Replaced { .. } | Error::ContinuityLost { .. }) || left.is_zero()
            {
                return Err(e);
            }
            self.status.set_state(State::Failing);
            let wait = backoff.min(left);
            tracing::warn!(error = %e, retry_in = ?wait, left = ?left, "final shipment failed, retrying until the shutdown deadline");
            std::thread::sleep(wait);
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Tells the status how far the current generation is shipped (also
    /// after a failed round, which may have shipped part of what it read).
    fn note_shipped(&self) {
        if let Some(st) = &self.state {
            self.status.set_shipped(&st.generation, st.position);
        }
    }

    /// Records a round that shipped everything committed before `began`.
    fn synced(&self, began: i64) {
        let position = self.state.as_ref().map_or(0, |s| s.position);
        self.status.set_state(State::Replicating);
        self.status.synced(began, self.wal_len, position);
    }

    fn release(&mut self) {
        for c in &self.conns {
            let _ = db::end_read(c, &self.db);
        }
    }

    /// One round: ship (moving the read lock forward when due), then
    /// maintenance.
    ///
    /// The read lock does not have to move for shipping: frames after it are
    /// safe while it is held (with a read mark above 0 no writer can rewind
    /// the WAL; with mark 0 no checkpoint can copy anything, so at most one
    /// rewind, of a WAL that was entirely shipped, can happen). It moves so
    /// that checkpoints can progress: at most once per `LOCK_ADVANCE_EVERY`,
    /// or when `min-checkpoint-page-count` frames were shipped past it. Moving
    /// it on every commit let the application's own auto-checkpoint copy and
    /// fsync a few frames on nearly every commit, halving its write rate.
    pub fn tick(&mut self) -> Result<()> {
        self.round().map_err(|e| lost_if_corrupt(e, &self.db))
    }

    fn round(&mut self) -> Result<()> {
        let shipped = self
            .state
            .as_ref()
            .and_then(|s| s.cursor)
            .map_or(0, |c| c.frame_index());
        let due = self.locked_at.elapsed() >= LOCK_ADVANCE_EVERY
            || shipped < self.locked_frames
            || shipped - self.locked_frames >= self.opts.min_checkpoint_page_count;
        if due {
            self.advance()?;
        } else {
            self.sync()?;
        }
        self.maintain()
    }

    /// Begins a read transaction on the idle connection, ships everything
    /// committed, and only then ends the older read transaction. If shipping
    /// fails the older one is kept: it still protects every unshipped frame.
    fn advance(&mut self) -> Result<()> {
        self.move_lock(false)
    }

    /// Moves the read lock to the end of the WAL for a checkpoint's sake.
    /// Without a sync-interval this is `advance`. With one, the transactions
    /// after the shipped position are read into `pending` instead of being
    /// uploaded, and go up with the next regular upload: checkpoints need the
    /// lock moved about once a second, and an upload for each move broke
    /// the one-upload-per-interval promise. Only what fits in one segment is
    /// held; a longer tail is shipped at once, as `advance` does.
    ///
    /// Once the lock sits on read mark 0 the held frames are protected by
    /// nothing, and after the application rewinds the WAL they exist only
    /// here until the next upload. That costs no safety: a walstream
    /// restarted after any rewind since its last upload starts a new
    /// generation anyway (the WAL no longer continues that upload's
    /// position), whether the frames went up first or not; nothing
    /// acknowledged is lost either way (the kill -9 soak with a
    /// sync-interval: 19 and 29 new generations in 100 rounds, with and
    /// without holding; most come from the application's own checkpoints
    /// while walstream is down).
    fn relock(&mut self) -> Result<()> {
        self.move_lock(self.spaced())
    }

    fn move_lock(&mut self, hold: bool) -> Result<()> {
        if !(hold && self.move_lock_holding()?) {
            self.move_lock_with(|r| r.sync().map(|()| true))?;
        }
        Ok(())
    }

    /// Moves the read lock to the end of the WAL if the transactions after
    /// the shipped position fit in `pending`, without any upload. Returns
    /// whether it moved.
    fn move_lock_holding(&mut self) -> Result<bool> {
        self.move_lock_with(Self::read_ahead)
    }

    /// Begins a read transaction on the idle connection, runs `catch_up`
    /// (which must leave nothing after the read position unshipped or
    /// unheld when it returns true), and only then ends the older one.
    fn move_lock_with(&mut self, catch_up: fn(&mut Self) -> Result<bool>) -> Result<bool> {
        let next = 1 - self.active;
        db::begin_read(&self.conns[next], &self.db)?;
        match catch_up(self) {
            Ok(true) => {}
            other => {
                let _ = db::end_read(&self.conns[next], &self.db);
                return other;
            }
        }
        db::end_read(&self.conns[self.active], &self.db)?;
        self.active = next;
        self.mark_locked();
        Ok(true)
    }

    /// Whether uploads are spaced by a sync-interval (and lock moves hold
    /// what they read rather than uploading it).
    fn spaced(&self) -> bool {
        !self.opts.sync_interval.is_zero()
    }

    /// Records that the read lock just moved to the read position.
    fn mark_locked(&mut self) {
        self.locked_at = Instant::now();
        self.locked_frames = self.read_cursor().map_or(0, |c| c.frame_index());
    }

    /// Page bytes held in `pending`.
    fn held_bytes(&self) -> u64 {
        self.pending.as_ref().map_or(0, |(c, _)| c.page_bytes())
    }

    /// Where reading the WAL goes on from: after what is held, else after
    /// what is shipped.
    fn read_cursor(&self) -> Option<WalCursor> {
        match &self.pending {
            Some((_, end)) => Some(*end),
            None => self.state.as_ref().and_then(|s| s.cursor),
        }
    }

    /// Reads the whole transactions after `read_cursor` into `pending`, as
    /// long as what is held stays within one segment. Returns whether it
    /// reached the end of the WAL (`false`: the caller must ship instead;
    /// what was read stays held, and goes up first). While this runs a read
    /// lock at or before `read_cursor` must be held.
    fn read_ahead(&mut self) -> Result<bool> {
        let Some((mut file, _)) = self.open_wal()? else {
            return Ok(true);
        };
        let (Some(header), Some(mut at)) = (
            wal::read_header(&mut file).io_ctx("read", &self.wal)?,
            self.read_cursor(),
        ) else {
            return Ok(false); // nothing read yet, or no WAL: sync() knows
        };
        if header.page_size != self.page_size {
            return Ok(false); // sync() starts a new generation
        }
        if header.salt1 != at.salt1 || header.salt2 != at.salt2 {
            // Rewound since; as in `sync`, everything before was read.
            tracing::debug!(db = %self.db.display(), "WAL reset observed");
            at = header.start();
        }
        loop {
            let held = self.held_bytes();
            if held >= MAX_SEGMENT_BYTES {
                return Ok(false);
            }
            let (more, end) = wal::read_batch(&mut file, &at, None, MAX_SEGMENT_BYTES - held)
                .io_ctx("read", &self.wal)?;
            if more.transactions == 0 {
                return Ok(true);
            }
            // A batch not cut for size ended where the WAL ended when it was
            // read, which is past the new lock's snapshot: enough. (Reading
            // on would chase a writer that fills a rewound WAL's stale space
            // as fast as it is read.)
            let whole = more.page_bytes() < MAX_SEGMENT_BYTES - held;
            // Frames read after the database was replaced belong to another
            // database (see `ship`).
            self.check_same_file()?;
            match &mut self.pending {
                Some((c, e)) => {
                    c.append(more);
                    *e = end;
                }
                None => self.pending = Some((more, end)),
            }
            if whole {
                return Ok(true);
            }
            at = end;
        }
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

    /// Ships every whole transaction after the shipped position: what is held
    /// in `pending` first, in one segment with what follows it.
    fn sync(&mut self) -> Result<()> {
        self.check_same_file()?;
        let Some((mut file, len)) = self.open_wal()? else {
            self.wal_len = 0;
            return self.ship_pending();
        };
        let header = wal::read_header(&mut file).io_ctx("read", &self.wal)?;
        self.wal_len = len;
        let start = match (header, self.read_cursor()) {
            (None, Some(_)) => {
                self.ship_pending()?;
                if len < wal::WAL_HEADER_SIZE {
                    // Truncated by a checkpoint while we held a read lock:
                    // everything in it was shipped.
                    self.state.as_mut().expect("started").cursor = None;
                }
                return Ok(());
            }
            (None, None) => return Ok(()),
            (Some(h), _) if h.page_size != self.page_size => {
                return self.new_generation("page size of WAL changed");
            }
            (Some(h), Some(c)) if h.salt1 == c.salt1 && h.salt2 == c.salt2 => c,
            // The WAL was rewound or truncated and rewritten. While walstream
            // holds a read transaction that can only happen once between two
            // ticks, and only after every frame of the old WAL was read: a
            // rewind needs all readers off the WAL (a reader that started on a
            // fully checkpointed WAL), and such a reader blocks every
            // checkpoint of the new frames, so no second rewind can follow.
            // The new salts are not predictable (a connection that never
            // restarted the WAL itself picks random ones), so they are not
            // checked.
            (Some(h), Some(_)) | (Some(h), None) => {
                tracing::debug!(db = %self.db.display(), "WAL reset observed");
                h.start()
            }
        };
        // Read only what was committed when the tick began: commits arriving
        // during the upload wait for the next tick (and its sync-interval).
        let limit = Some(len);
        let mut start = start;
        loop {
            let held = self.held_bytes();
            let max = MAX_SEGMENT_BYTES.saturating_sub(held);
            let (committed, end) =
                wal::read_batch(&mut file, &start, limit, max).io_ctx("read", &self.wal)?;
            // Only a batch cut for size is followed by another: the file's
            // length is no limit in a rewound WAL, whose stale space a busy
            // writer refills as fast as it is read.
            let cut = committed.transactions > 0 && committed.page_bytes() >= max;
            // (With nothing new read, `end` is `start`: after a rewind, the
            // new WAL's beginning, which is where the held frames leave off.)
            let batch = match self.pending.take() {
                Some((mut held, _)) => {
                    held.append(committed);
                    held
                }
                None => committed,
            };
            if batch.transactions == 0 {
                let st = self.state.as_mut().expect("started");
                if st.cursor != Some(start) {
                    st.cursor = Some(start);
                }
                return Ok(());
            }
            if let Err(e) = self.ship(&batch, end) {
                self.pending = Some((batch, end));
                return Err(e);
            }
            if !cut {
                return Ok(());
            }
            start = end;
        }
    }

    /// Uploads one segment and advances the shipped position.
    fn ship(&mut self, committed: &wal::Committed, end: WalCursor) -> Result<()> {
        // Frames read after the database was replaced by another file (a new
        // inode under the same name, with its own WAL) belong to that other
        // database: checking after the read means nothing read from it is
        // ever shipped as this generation.
        self.check_same_file()?;
        let st = self.state.as_ref().expect("started");
        let header = SegmentHeader {
            generation: st.generation.clone(),
            index: st.next_index,
            first_position: st.position,
            last_position: st.position + committed.frames,
            page_size: self.page_size,
            db_pages: committed.db_pages,
            timestamp_ms: Utc::now().timestamp_millis(),
            transactions: committed.transactions,
            page_count: committed.pages.len() as u64,
            wal: WalPoint::from_cursor(&end),
            level: 0,
            last_index: None,
            // A commit inside the segment shrank the database: pages above
            // that size must be cut before the body is applied.
            min_db_pages: (committed.min_db_pages < committed.db_pages)
                .then_some(committed.min_db_pages),
            first_timestamp_ms: None,
        };
        let started = Instant::now();
        self.last_upload = Some(started);
        let bytes = self
            .rt
            .block_on(self.replica.put_segment(&header, &committed.pages))?;
        self.status.shipped_segment(bytes);
        tracing::debug!(
            db = %self.db.display(),
            generation = %header.generation,
            index = header.index,
            position = header.last_position,
            transactions = header.transactions,
            pages = header.page_count,
            bytes,
            millis = started.elapsed().as_millis() as u64,
            "shipped segment"
        );
        let st = self.state.as_mut().expect("started");
        st.cursor = Some(end);
        st.position = header.last_position;
        st.next_index += 1;
        Ok(())
    }

    /// Checkpoint and periodic snapshot, after the read lock moved forward.
    fn maintain(&mut self) -> Result<()> {
        let st = self.state.as_ref().expect("started");
        let now = Utc::now().timestamp_millis();
        // A snapshot is an image at the shipped position: not while
        // transactions after it are held (the database file may hold them).
        if now - st.last_snapshot_ms >= self.opts.snapshot_interval.as_millis() as i64
            && self.pending.is_none()
        {
            if st.snapshot_position == Some(st.position) {
                // Nothing shipped since the last snapshot: it is still the
                // newest state, and a copy would only cost storage.
                self.state.as_mut().expect("started").last_snapshot_ms = now;
            } else {
                self.snapshot()?;
            }
        }
        let (shipped_frames, file_frames) = self.wal_frames();
        let idle = &self.conns[1 - self.active];
        let mut outcome = self
            .checkpointer
            .run(idle, &self.db, shipped_frames, file_frames)?;
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
            self.relock()?;
            let (shipped_frames, file_frames) = self.wal_frames();
            outcome = self.checkpointer.passive(
                &self.conns[1 - self.active],
                &self.db,
                shipped_frames,
                file_frames,
            )?;
            self.count_checkpoint(outcome);
        }
        if outcome == (Outcome::Passive { complete: true }) && !self.checkpointer.truncate_due() {
            // Sit on the fully checkpointed WAL: the new read transaction gets
            // read mark 0, which does not stand in the way of the
            // application's next write rewinding the WAL to its start.
            self.relock()?;
        }
        if self.checkpointer.truncate_due() {
            // Move the read lock onto the now fully checkpointed WAL (SQLite
            // then gives it read mark 0, which does not stand in the way of a
            // TRUNCATE), shipping (or holding) anything new first, and
            // truncate at once.
            self.relock()?;
            let outcome = self
                .checkpointer
                .truncate(&self.conns[1 - self.active], &self.db)?;
            self.count_checkpoint(outcome);
            return Ok(());
        }
        // With a sync-interval, whatever the outcome: a checkpoint that
        // completes often ends in a lock that landed behind the application's
        // next commit, and then the WAL is not rewound either.
        if (outcome == (Outcome::Passive { complete: false })
            || self.spaced())
            // The WAL's content, not its file: a rewound WAL keeps its size.
            && self.wal_frames().0 >= self.opts.max_checkpoint_page_count
            && self.gated_rewind_tried.elapsed() >= GATED_REWIND_EVERY
        {
            self.gated_rewind_tried = Instant::now();
            self.gated_rewind(false)?;
        }
        Ok(())
    }

    /// Whether, with a sync-interval, the WAL has grown past
    /// `max-checkpoint-page-count` since it was last rewound: rewinds under
    /// the write lock are then also tried between rounds, with at most one
    /// success a second (each holds up the application's writers briefly).
    fn rewind_wanted(&self) -> bool {
        self.spaced()
            && self.state.is_some()
            && self.gated_rewound.elapsed() >= LOCK_ADVANCE_EVERY
            && self.wal_frames().0 >= self.opts.max_checkpoint_page_count
    }

    /// Rewinds a WAL that a write load with no pauses keeps growing past
    /// `max-checkpoint-page-count`: without a moment in which no commit
    /// lands, no checkpoint can ever catch up with the end of the WAL, and
    /// SQLite rewinds only a fully checkpointed WAL.
    ///
    /// walstream takes the write lock for that moment, waiting at most
    /// `GATE_WAIT` for it (so it never queues behind a long transaction, and
    /// nothing queues behind it for long), and holds it only to
    /// read the few frames after the shipped position into memory and to copy
    /// the frames since the last checkpoint: the upload happens after the
    /// lock is released. While it holds the lock, its own write transaction's
    /// read mark protects the WAL, so the older read lock can go; the new one
    /// then starts on the fully checkpointed WAL (read mark 0), and the
    /// application's next write rewinds it.
    ///
    /// `between` is set for the tries made between two rounds with a
    /// sync-interval (a round tries once, and a writer that never pauses
    /// often holds the lock just then): those never upload, and give up if
    /// the unshipped tail does not fit in memory.
    fn gated_rewind(&mut self, between: bool) -> Result<()> {
        // Copy nearly everything first, without the lock, so that little is
        // left to copy while holding it.
        if between {
            if !self.move_lock_holding()? {
                return Ok(());
            }
        } else {
            self.relock()?;
        }
        let r = db::checkpoint(&self.conns[1 - self.active], &self.db, "PASSIVE")?;
        if !r.busy && r.log_frames >= 0 && r.log_frames == r.checkpointed && !self.spaced() {
            // Caught up without the lock after all. (With a sync-interval
            // the gate is taken anyway: moving the lock without it lands
            // behind the application's next commit more often than not, and
            // then nothing is rewound.)
            return self.advance();
        }
        let gate = &self.conns[1 - self.active];
        gate.busy_timeout(GATE_WAIT).db_ctx(&self.db)?;
        let began = gate.execute_batch("BEGIN IMMEDIATE");
        gate.busy_timeout(self.opts.busy_timeout).db_ctx(&self.db)?;
        if let Err(e) = began {
            if matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ) {
                tracing::debug!(db = %self.db.display(), "write lock busy, rewind later");
                return Ok(());
            }
            return Err(e).db_ctx(&self.db);
        }
        let result = self.under_gate();
        let _ = self.conns[1 - self.active].execute_batch("ROLLBACK");
        let rewound = result?;
        if rewound {
            self.gated_rewound = Instant::now();
        }
        self.status.checkpoint("gated");
        let held = self.pending.as_ref().map_or(0, |(c, _)| c.transactions);
        tracing::debug!(db = %self.db.display(), rewound, held, "checkpoint under the write lock");
        if !self.spaced() {
            self.ship_pending()?;
        }
        Ok(())
    }

    /// The part of `gated_rewind` done while holding the write lock. Returns
    /// whether the WAL was fully checkpointed. On any error the older read
    /// lock is still (or again) held.
    fn under_gate(&mut self) -> Result<bool> {
        // Nothing can be appended now: read up to the end into memory,
        // unless that is more than one segment (what was read stays held;
        // the rest is shipped normally first).
        if !self.read_ahead()? {
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

    /// Ships the transactions held in `pending`, if any.
    fn ship_pending(&mut self) -> Result<()> {
        if let Some((committed, end)) = self.pending.take() {
            if let Err(e) = self.ship(&committed, end) {
                self.pending = Some((committed, end));
                return Err(e);
            }
        }
        Ok(())
    }

    /// Frames read (shipped or held) from the current WAL, and the WAL file's
    /// size in frames.
    fn wal_frames(&self) -> (u64, u64) {
        let shipped_frames = self.read_cursor().map_or(0, |c| c.frame_index());
        let frame_size = wal::FRAME_HEADER_SIZE + self.page_size as u64;
        let file_frames = std::fs::metadata(&self.wal)
            .map(|m| m.len().saturating_sub(wal::WAL_HEADER_SIZE) / frame_size)
            .unwrap_or(0);
        (shipped_frames, file_frames)
    }

    fn count_checkpoint(&self, outcome: Outcome) {
        match outcome {
            Outcome::Passive { .. } => self.status.checkpoint("passive"),
            Outcome::Truncated => self.status.checkpoint("truncate"),
            Outcome::TruncateBusy => self.status.checkpoint("truncate_busy"),
            Outcome::Skipped => {}
        }
    }

    /// Takes a snapshot at the shipped position. The object is streamed
    /// through a temporary file (in `TMPDIR`), so memory use does not grow
    /// with the database.
    fn snapshot(&mut self) -> Result<()> {
        let st = self.state.as_ref().expect("started").clone();
        let plan = db::image_plan(&self.file, self.page_size, st.cursor.as_ref())?;
        let header = SnapshotHeader {
            generation: st.generation.clone(),
            index: st.next_index,
            position: st.position,
            page_size: self.page_size,
            db_pages: plan.db_pages,
            timestamp_ms: Utc::now().timestamp_millis(),
            wal: st.cursor.as_ref().map(WalPoint::from_cursor),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".walstream-snapshot-")
            .tempfile()
            .io_ctx("create temporary file for", &self.db)?;
        snapshot::write_file(&header, tmp.path(), |w| plan.write_to(&self.file, w))
            .io_ctx("write snapshot of", &self.db)?;
        let bytes = self
            .rt
            .block_on(self.replica.put_snapshot_file(&header, tmp.path()))?;
        self.status.shipped_snapshot(bytes);
        tracing::info!(
            db = %self.db.display(),
            generation = %header.generation,
            index = header.index,
            db_pages = header.db_pages,
            bytes,
            "stored snapshot"
        );
        let st = self.state.as_mut().expect("started");
        st.last_snapshot_ms = header.timestamp_ms;
        st.snapshot_position = Some(header.position);
        Ok(())
    }

    /// Starts a new generation with a snapshot of the current committed state.
    fn new_generation(&mut self, reason: &str) -> Result<()> {
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
        let id = generation::new_id();
        let manifest = Manifest {
            generation: id.clone(),
            started_at: Utc::now(),
            reason: reason.to_string(),
            page_size: self.page_size,
            database: self.db.display().to_string(),
            hostname: std::env::var("HOSTNAME").ok(),
            walstream_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        self.rt.block_on(self.replica.put_manifest(&manifest))?;
        tracing::info!(db = %self.db.display(), replica = %self.replica.location(), generation = %id, reason, "starting new generation");
        // Held transactions belong to the old generation; the new one starts
        // from a snapshot of the database, which has them.
        self.pending = None;
        self.state = Some(Shipping {
            generation: id,
            next_index: 0,
            position: 0,
            cursor,
            last_snapshot_ms: 0,
            snapshot_position: None,
        });
        self.snapshot()
    }

    /// Finds the newest generation and checks that the WAL on disk continues
    /// exactly where it ends. `Ok(Err(reason))` when it does not.
    fn resume(&mut self) -> Result<std::result::Result<Shipping, String>> {
        let gens = self.rt.block_on(self.replica.generations())?;
        let Some(g) = gens.iter().rev().find(|g| !g.snapshots.is_empty()) else {
            return Ok(Err("no generation in replica".into()));
        };
        let &(snap_index, snap_ms, _) = g.snapshots.last().expect("non-empty");
        // The newest object after the snapshot: a plain segment, or a merged
        // object once compaction has replaced the plain ones.
        let last_plain = g.segments.last().map(|&(i, _)| i);
        let last_merged = g
            .compacted
            .iter()
            .max_by_key(|c| (c.last, c.level))
            .copied();
        let newest = match (last_plain, last_merged) {
            (Some(i), Some(c)) if c.last > i => Some(Err(c)),
            (Some(i), _) => Some(Ok(i)),
            (None, Some(c)) => Some(Err(c)),
            (None, None) => None,
        }
        .filter(|n| {
            let last = match n {
                Ok(i) => *i,
                Err(c) => c.last,
            };
            last + 1 >= snap_index
        });
        let (point, page_size, position, next_index) = match newest {
            Some(n) => {
                let got = match n {
                    Ok(i) => self.rt.block_on(self.replica.get_segment(&g.id, i)),
                    Err(c) => self.rt.block_on(self.replica.get_compacted(&g.id, &c)),
                };
                let seg = match got {
                    Ok(seg) => seg,
                    // A torn or foreign newest object proves nothing about
                    // where the replica ends: start over rather than
                    // continue after it.
                    Err(e @ (Error::Corrupt { .. } | Error::BadObject { .. })) => {
                        tracing::warn!(error = %e, "newest object of the replica is unreadable");
                        return Ok(Err(format!("newest object is unreadable: {e}")));
                    }
                    Err(e) => return Err(e),
                };
                (
                    Some(seg.header.wal),
                    seg.header.page_size,
                    seg.header.last_position,
                    seg.header.last_index() + 1,
                )
            }
            None => {
                let tmp =
                    tempfile::NamedTempFile::new().io_ctx("create temporary file for", &self.db)?;
                let (h, _) = self.rt.block_on(self.replica.get_snapshot_file(
                    &g.id,
                    snap_index,
                    snap_ms,
                    tmp.path(),
                ))?;
                (h.wal, h.page_size, h.position, snap_index)
            }
        };
        if page_size != self.page_size {
            return Ok(Err(format!(
                "page size changed from {page_size} to {}",
                self.page_size
            )));
        }
        let Some(point) = point else {
            return Ok(Err(format!(
                "generation {} ends before any WAL was written",
                g.id
            )));
        };
        let cursor = point.to_cursor(page_size);
        let Some((mut file, _)) = self.open_wal()? else {
            return Ok(Err("WAL file is gone (database changed or was checkpointed while walstream was not running)".into()));
        };
        if !wal::verify_prefix(&mut file, &cursor).io_ctx("read", &self.wal)? {
            return Ok(Err(format!(
                "WAL does not continue generation {} (database changed while walstream was not running)",
                g.id
            )));
        }
        Ok(Ok(Shipping {
            generation: g.id.clone(),
            next_index,
            position,
            cursor: Some(cursor),
            last_snapshot_ms: snap_ms,
            snapshot_position: None,
        }))
    }
}

/// Errors when the database's name now points at another file; the worker
/// then starts over, which opens the new file and starts a new generation.
impl Replicator {
    fn check_same_file(&self) -> Result<()> {
        match db::file_id(&self.db) {
            Ok(id) if id == self.file.id() => Ok(()),
            Ok(_) => Err(Error::Replaced {
                path: self.db.clone(),
            }),
            Err(e) => Err(e),
        }
    }
}

/// walstream's own connection reporting a corrupt database means that what
/// it reads no longer provably matches what SQLite wrote (the usual cause: a
/// lock was lost and the WAL or the database changed under its read
/// transaction). Nothing more may be shipped into the generation.
fn lost_if_corrupt(e: Error, db: &Path) -> Error {
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

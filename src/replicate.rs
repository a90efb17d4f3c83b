//! The worker of one database: one [`Source`] feeding one [`Shipper`] per
//! replica.
//!
//! It runs on its own thread, because everything the source does is blocking
//! (SQLite calls, reading the WAL), and reaches the replicas through the
//! async storage trait on the shared runtime; the uploads of different
//! replicas run concurrently.
//!
//! The loop: wake on a file notification for the WAL (or the polling
//! fallback, or when a replica's sync-interval or retry comes due), then run
//! one *round*:
//!
//! 1. the source reads every whole transaction committed since the last
//!    round, once, moving its read lock forward when due, and each batch
//!    goes to every attached shipper;
//! 2. a replica that has no generation yet, or was detached (it fell more
//!    than `max-pending` behind while its storage failed), starts a new one
//!    from a snapshot of the database at the read position;
//! 3. every replica whose sync-interval has passed uploads what it holds
//!    (group commit: whatever committed while the previous upload was in
//!    flight goes into the next segment, with no timer);
//! 4. periodic snapshots, then the source's checkpoints.
//!
//! A replica whose uploads fail backs off on its own while the others keep
//! shipping: it holds what it has not stored, so the source never waits for
//! it, and its memory is bounded by `max-pending`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::runtime::Handle;

use crate::error::{Error, IoContext, Result};
use crate::generation::{self, Manifest};
use crate::metrics::State;
use crate::segment::WalPoint;
use crate::shipper::{Batch, Shipper};
use crate::shutdown::Shutdown;
use crate::snapshot::{self, SnapshotHeader};
use crate::source::{Source, GATED_REWIND_EVERY};
pub use crate::watch::Control;
use crate::watch::Watcher;

/// How many times an image is planned again when the WAL was rewound under
/// a read lock on read mark 0 in between (the database file then holds
/// everything read, and reading the new WAL puts the image back in step).
const IMAGE_TRIES: usize = 3;

/// A failure to start, and the replica it concerns (`None`: the database).
#[derive(Debug)]
pub struct StartError {
    pub replica: Option<usize>,
    pub error: Error,
}

impl From<Error> for StartError {
    fn from(error: Error) -> Self {
        StartError {
            replica: None,
            error,
        }
    }
}

pub struct Replicator {
    source: Source,
    shippers: Vec<Shipper>,
    rt: Handle,
}

impl Replicator {
    pub fn new(source: Source, shippers: Vec<Shipper>, rt: Handle) -> Replicator {
        Replicator {
            source,
            shippers,
            rt,
        }
    }

    pub fn shippers(&self) -> &[Shipper] {
        &self.shippers
    }

    /// Takes the first read lock, resumes each replica's newest generation
    /// if the WAL on disk provably continues it, and starts a new generation
    /// for every other replica. All or nothing: the first replica that
    /// cannot start fails the whole start.
    pub fn start(&mut self) -> std::result::Result<(), StartError> {
        self.source.lock()?;
        let page_size = self.source.page_size();
        let mut resumable = Vec::new();
        for i in 0..self.shippers.len() {
            let found = self
                .rt
                .block_on(self.shippers[i].find_resume(page_size))
                .map_err(|error| StartError {
                    replica: Some(i),
                    error,
                })?;
            let reason = match found {
                Ok(state) => {
                    let cursor = state
                        .cursor
                        .expect("a resumable generation has a WAL point");
                    if self.source.continues(&cursor)? {
                        resumable.push((i, state, cursor));
                        continue;
                    }
                    format!(
                        "WAL does not continue generation {} (database changed or was checkpointed while walstream was not running)",
                        state.generation
                    )
                }
                Err(reason) => reason,
            };
            self.shippers[i].force_new_generation(reason);
        }
        // Reading goes on from the furthest position any replica reached;
        // the others hold the transactions in between.
        let furthest = resumable.iter().map(|r| r.2).max_by_key(|c| c.offset);
        match furthest {
            Some(to) => self.source.start_at(to),
            None => {
                self.source.start_at_end()?;
            }
        }
        for (i, state, from) in resumable {
            let to = furthest.expect("some replica resumes");
            if (from.salt1, from.salt2) != (to.salt1, to.salt2) {
                self.shippers[i]
                    .force_new_generation("the WAL was rewound since its generation ended".into());
                continue;
            }
            let gap = self.source.read_range(from, to)?;
            self.shippers[i].resume(state, gap);
        }
        let failures = self.start_generations(true)?;
        if let Some((i, error)) = failures.into_iter().next() {
            return Err(StartError {
                replica: Some(i),
                error,
            });
        }
        for s in &self.shippers {
            s.status().set_state(State::Replicating);
        }
        Ok(())
    }

    /// Runs until a stop: `stop` has begun (a sticky state, checked before
    /// every wait) or the control channel says `Control::Shutdown` (which
    /// only wakes it) or is dropped. Then makes the last shipment (see
    /// `finish`) and returns each replica's outcome. An error of the
    /// database itself (`Error::Replaced`, `Error::ContinuityLost`, or any
    /// during the last shipment) ends it at once, as `Err`.
    pub fn run(
        mut self,
        control: &Receiver<Control>,
        wake: Sender<Control>,
        watcher: &Arc<Watcher>,
        stop: &Shutdown,
    ) -> Result<Vec<Result<()>>> {
        let min_sync = self
            .shippers
            .iter()
            .map(|s| s.options().sync_interval)
            .min()
            .unwrap_or_default();
        let monitor = self.source.options().monitor_interval;
        // Notifications only help when uploads may follow commits faster than
        // the monitor interval polls; otherwise they would only cost a wake-up
        // per commit. `armed` lets one write wake one round, no more.
        let armed = Arc::new(AtomicBool::new(true));
        let wal = crate::db::wal_path(self.source.db());
        let mut watch = if min_sync < monitor {
            watcher.watch(&wal, wake, armed.clone())
        } else {
            None
        };
        let mut backoff = monitor;
        let mut timeout = monitor;
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
            if shutdown {
                let result = self.finish(stop);
                self.source.release();
                return result;
            }
            // Space uploads by sync-interval: no round until some replica
            // may upload (or must retry or restart).
            let now = Instant::now();
            let wait = self
                .shippers
                .iter()
                .map(|s| s.spacing_left(now))
                .min()
                .unwrap_or_default();
            if !wait.is_zero() {
                timeout = wait;
                if self.spaced() && self.source.rewind_wanted() {
                    let shippers = &mut self.shippers;
                    self.source
                        .rewind_between_rounds(&mut |b| hand(shippers, b));
                    timeout = wait.min(GATED_REWIND_EVERY);
                }
                continue;
            }
            // Any write after this point wakes the next round; writes before
            // it are read by this one.
            armed.store(true, Ordering::SeqCst);
            match self.round() {
                Ok(uploaded) => {
                    backoff = monitor;
                    timeout = monitor;
                    let now = Instant::now();
                    for s in &self.shippers {
                        if let Some(w) = s.wants_round_in(now) {
                            timeout = timeout.min(w.max(Duration::from_millis(1)));
                        }
                    }
                    // With a sync-interval, notifications only end idle
                    // spells: while commits keep coming, the next round is
                    // due a sync-interval after this one anyway, and polling
                    // then costs less than the notifications in between.
                    if let Some(w) = watch.as_mut().filter(|_| !min_sync.is_zero()) {
                        if uploaded {
                            w.set_active(false);
                            timeout = timeout.min(min_sync);
                        } else if !w.is_active() && w.set_active(true) {
                            // Look once more: a commit that landed before the
                            // watch was back raised no notification.
                            timeout = Duration::ZERO;
                        }
                    }
                    if self.spaced() && self.source.rewind_wanted() {
                        timeout = timeout.min(GATED_REWIND_EVERY);
                    }
                }
                Err(e) if matches!(e, Error::Replaced { .. } | Error::ContinuityLost { .. }) => {
                    self.source.release();
                    return Err(e);
                }
                Err(e) => {
                    for s in &self.shippers {
                        s.status().set_state(State::Failing);
                    }
                    tracing::warn!(db = %self.source.db().display(), error = %e, retry_in = ?backoff, "replication failed, will retry");
                    timeout = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Whether some replica spaces its uploads by a sync-interval.
    fn spaced(&self) -> bool {
        self.shippers
            .iter()
            .any(|s| !s.options().sync_interval.is_zero())
    }

    /// One round (see the module doc). Returns whether anything was
    /// uploaded. Errors are the database's; a replica's own failures are
    /// its own (it backs off and retries).
    pub fn round(&mut self) -> Result<bool> {
        let began = Utc::now().timestamp_millis();
        let shippers = &mut self.shippers;
        self.source.read(&mut |b| hand(shippers, b))?;
        self.caught_up();
        self.start_generations(false)?;
        let (uploaded, _) = self.upload(false);
        self.note_checkpoints();
        for s in &self.shippers {
            s.synced(began, self.source.wal_len());
        }
        self.snapshots()?;
        let shippers = &mut self.shippers;
        self.source.maintain(
            shippers
                .iter()
                .any(|s| !s.options().sync_interval.is_zero()),
            &mut |b| hand(shippers, b),
        )?;
        self.caught_up();
        self.note_checkpoints();
        Ok(uploaded)
    }

    fn caught_up(&mut self) {
        let cursor = self.source.cursor();
        for s in &mut self.shippers {
            s.caught_up(cursor);
        }
    }

    fn note_checkpoints(&mut self) {
        for mode in self.source.take_checkpoints() {
            for s in &self.shippers {
                s.status().checkpoint(mode);
            }
        }
    }

    /// Uploads what each replica holds, if due (`force`: everything, now),
    /// the replicas concurrently. Returns whether anything was uploaded, and
    /// the replicas whose upload failed (each backs off on its own).
    fn upload(&mut self, force: bool) -> (bool, Vec<(usize, Error)>) {
        let now = Instant::now();
        let page_size = self.source.page_size();
        let plans: Vec<_> = self
            .shippers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.plan(page_size, now, force).map(|u| (i, u)))
            .collect();
        if plans.is_empty() {
            return (false, Vec::new());
        }
        let done = self.rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (i, u) in plans {
                set.spawn(async move {
                    let out = u.run().await;
                    (i, u, out)
                });
            }
            let mut done = Vec::new();
            while let Some(r) = set.join_next().await {
                if let Ok(r) = r {
                    done.push(r);
                }
            }
            done
        });
        let mut failed = Vec::new();
        for (i, u, out) in done {
            if let Some(e) = self.shippers[i].uploaded(u, out) {
                failed.push((i, e));
            }
        }
        (true, failed)
    }

    /// Starts a new generation for every replica that has none or was
    /// detached (`all`: whatever their back-off says), from one snapshot
    /// image at the read position, stored under one generation id. Returns
    /// the replicas that failed to start, with their errors (each backs off).
    fn start_generations(&mut self, all: bool) -> Result<Vec<(usize, Error)>> {
        let now = Instant::now();
        let want: Vec<usize> = (0..self.shippers.len())
            .filter(|&i| {
                let s = &self.shippers[i];
                !s.attached() && (all || s.may_try(now))
            })
            .collect();
        if want.is_empty() {
            return Ok(Vec::new());
        }
        let plan = self.image()?;
        let id = generation::new_id();
        let ts = Utc::now().timestamp_millis();
        let cursor = self.source.cursor();
        let header = SnapshotHeader {
            generation: id.clone(),
            index: 0,
            position: 0,
            page_size: self.source.page_size(),
            db_pages: plan.db_pages,
            timestamp_ms: ts,
            wal: cursor.as_ref().map(WalPoint::from_cursor),
        };
        let tmp = self.snapshot_file(&header, &plan)?;
        let mut failures = Vec::new();
        for i in want {
            let s = &mut self.shippers[i];
            let manifest = Manifest {
                generation: id.clone(),
                started_at: Utc::now(),
                reason: s
                    .restart_reason()
                    .unwrap_or("no generation in replica")
                    .to_string(),
                page_size: header.page_size,
                database: self.source.db().display().to_string(),
                hostname: std::env::var("HOSTNAME").ok(),
                walstream_version: env!("CARGO_PKG_VERSION").to_string(),
            };
            if let Err(e) =
                self.rt
                    .block_on(s.begin_generation(&manifest, &header, tmp.path(), cursor))
            {
                s.failed(&e, "starting a new generation failed");
                failures.push((i, e));
            }
        }
        Ok(failures)
    }

    /// Periodic snapshots of every replica due one, from one image.
    fn snapshots(&mut self) -> Result<()> {
        let now_ms = Utc::now().timestamp_millis();
        let due: Vec<usize> = (0..self.shippers.len())
            .filter(|&i| self.shippers[i].snapshot_due(now_ms))
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let plan = self.image()?;
        for i in due {
            // Reading the WAL again (see `image`) may have handed it more.
            if self.shippers[i].holds_anything() {
                continue;
            }
            let header =
                self.shippers[i].snapshot_header(self.source.page_size(), plan.db_pages, now_ms);
            let tmp = self.snapshot_file(&header, &plan)?;
            let s = &mut self.shippers[i];
            match self.rt.block_on(s.put_snapshot(&header, tmp.path())) {
                Ok(bytes) => s.snapshot_stored(&header, bytes),
                Err(e) => s.failed(&e, "snapshot failed"),
            }
        }
        Ok(())
    }

    /// Plans an image at the read position. A read lock on read mark 0 lets
    /// the application rewind the WAL at any moment; the database file then
    /// holds everything read so far and the new frames are not in it yet,
    /// so reading the new WAL and planning again gives a consistent image.
    fn image(&mut self) -> Result<crate::db::ImagePlan> {
        let mut tries = 0;
        loop {
            match self.source.image() {
                Err(Error::ContinuityLost { .. }) if tries + 1 < IMAGE_TRIES => {
                    tries += 1;
                    let shippers = &mut self.shippers;
                    self.source.read(&mut |b| hand(shippers, b))?;
                    self.caught_up();
                }
                other => return other,
            }
        }
    }

    /// Writes a snapshot object for `header` into a temporary file (in
    /// `TMPDIR`), streaming the image, so memory does not grow with the
    /// database.
    fn snapshot_file(
        &self,
        header: &SnapshotHeader,
        plan: &crate::db::ImagePlan,
    ) -> Result<tempfile::NamedTempFile> {
        let db = self.source.db();
        let tmp = tempfile::Builder::new()
            .prefix(".walstream-snapshot-")
            .tempfile()
            .io_ctx("create temporary file for", db)?;
        snapshot::write_file(header, tmp.path(), |w| plan.write_to(self.source.file(), w))
            .io_ctx("write snapshot of", db)?;
        Ok(tmp)
    }

    /// The last shipment before stopping: everything committed now, to
    /// every replica, with no sync-interval spacing and no checkpoint or
    /// snapshot after it. Failures are retried with back-off until `stop`'s
    /// deadline (storage calls themselves end by it too). Returns each
    /// replica's outcome; an error of the database itself ends it as `Err`.
    fn finish(&mut self, stop: &Shutdown) -> Result<Vec<Result<()>>> {
        let mut backoff = Duration::from_millis(100);
        let mut errors: Vec<Option<Error>> = self.shippers.iter().map(|_| None).collect();
        loop {
            let began = Utc::now().timestamp_millis();
            let shippers = &mut self.shippers;
            let read = self.source.read(&mut |b| hand(shippers, b));
            self.caught_up();
            let db_error = match read {
                Ok(()) => match self.start_generations(true) {
                    Ok(failed) => {
                        for (i, e) in failed {
                            errors[i] = Some(e);
                        }
                        None
                    }
                    Err(e) => Some(e),
                },
                Err(e) => Some(e),
            };
            if let Some(e) = db_error {
                let left = stop.remaining().unwrap_or(Duration::ZERO);
                if matches!(e, Error::Replaced { .. } | Error::ContinuityLost { .. })
                    || left.is_zero()
                {
                    return Err(e);
                }
                tracing::warn!(error = %e, retry_in = ?backoff.min(left), left = ?left, "final shipment failed, retrying until the shutdown deadline");
                std::thread::sleep(backoff.min(left));
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            for (i, e) in self.upload(true).1 {
                errors[i] = Some(e);
            }
            for s in &self.shippers {
                s.synced(began, self.source.wal_len());
            }
            let complete = |s: &Shipper| s.attached() && !s.holds_anything();
            if self.shippers.iter().all(complete) {
                tracing::info!(db = %self.source.db().display(), "shipped everything committed, stopping");
                return Ok(self.shippers.iter().map(|_| Ok(())).collect());
            }
            let left = stop.remaining().unwrap_or(Duration::ZERO);
            if left.is_zero() {
                return Ok(self
                    .shippers
                    .iter()
                    .zip(errors)
                    .map(|(s, e)| {
                        if complete(s) {
                            Ok(())
                        } else {
                            Err(e.unwrap_or_else(|| {
                                Error::Invalid(
                                    "shutdown-timeout ran out before the last upload".into(),
                                )
                            }))
                        }
                    })
                    .collect());
            }
            for s in self.shippers.iter().filter(|s| !complete(s)) {
                s.status().set_state(State::Failing);
            }
            let wait = backoff.min(left);
            tracing::warn!(retry_in = ?wait, left = ?left, "final shipment incomplete, retrying until the shutdown deadline");
            std::thread::sleep(wait);
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// Hands a batch read from the WAL to every attached replica.
fn hand(shippers: &mut [Shipper], batch: Arc<Batch>) {
    for s in shippers.iter_mut() {
        s.hold(batch.clone());
    }
}

//! The worker of one database: one [`Source`] feeding one [`Shipper`] per
//! replica.
//!
//! It is an async task: it waits for notifications and timers without a
//! thread of its own, runs what the source does (SQLite calls, reading the
//! WAL: all blocking) on a bounded blocking pool, and awaits the replicas'
//! storage calls outside it, the uploads of different replicas
//! concurrently. So the threads of a process do not grow with the number
//! of databases, and a slow replica holds up no other database.
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

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::runtime::Handle;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::Semaphore;

use crate::error::{Error, IoContext, Result};
use crate::fdlimit::{Claim, FdBudget};
use crate::generation::{self, Manifest};
use crate::metrics::State;
use crate::segment::WalPoint;
use crate::shipper::{Batch, Shipper};
use crate::shutdown::Shutdown;
use crate::snapshot::{self, SnapshotHeader};
use crate::source::{Closed, Source, GATED_REWIND_EVERY};
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

/// The largest database that closes when idle for want of descriptors:
/// closing and reopening hash the whole file (see `Source::close_idle`).
pub const CLOSE_MAX_BYTES: u64 = 64 << 20;

/// How a worker's run ended.
pub enum RunEnd {
    /// Stopped (a shutdown): each replica's outcome.
    Stopped(Vec<Result<()>>),
    /// Closed while idle to give its descriptors to a database waiting for
    /// them: everything read was shipped. The replicas' state, for
    /// `Replicator::reopened`.
    Closed {
        shippers: Vec<Shipper>,
        closed: Closed,
        claim: Claim,
    },
}

pub struct Replicator {
    source: Source,
    shippers: Vec<Shipper>,
    rt: Handle,
    /// Where the database stands in each replica (see `lineage`).
    lineage: crate::lineage::Recorder,
    /// Start new generations even where the database is behind its
    /// replica (`--takeover`).
    takeover: bool,
    /// Each replica's lease epoch, recorded in new generations.
    epochs: Vec<Option<u64>>,
    /// Upload everything held in the next round, whatever the
    /// sync-interval says (`Control::Force`: a `sync` with `force`).
    force_upload: bool,
}

impl Replicator {
    pub fn new(source: Source, shippers: Vec<Shipper>, rt: Handle) -> Replicator {
        let lineage = crate::lineage::Recorder::open(source.db());
        Replicator {
            source,
            shippers,
            rt,
            lineage,
            takeover: false,
            epochs: Vec::new(),
            force_upload: false,
        }
    }

    /// `takeover`: this database is the replicas' new state even where it
    /// is behind them; `epochs`: each replica's lease epoch.
    pub fn with_lineage(mut self, takeover: bool, epochs: Vec<Option<u64>>) -> Replicator {
        self.takeover = takeover;
        self.epochs = epochs;
        self
    }

    /// Records that the database holds replica `i`'s history up to `mark`.
    /// A failure to write the record is logged, not fatal: at worst a later
    /// start asks for `--takeover`.
    fn record(&mut self, i: usize, mark: crate::lineage::Mark) {
        let location = self.shippers[i].replica().location();
        if let Err(e) = self.lineage.record(&location, mark) {
            tracing::warn!(error = %e, "cannot record the database's lineage");
        }
    }

    /// Refuses to start a new generation in replica `i` from a database
    /// that does not hold everything the replica holds (see `lineage`).
    fn check_lineage(&mut self, i: usize) -> Result<()> {
        let Some(tip) = self.shippers[i].tip().cloned() else {
            return Ok(());
        };
        let replica = self.shippers[i].replica().clone();
        let manifest = self
            .rt
            .block_on(replica.get_manifest(&tip.generation))
            .unwrap_or(None);
        crate::lineage::check(
            self.source.db(),
            &replica.location(),
            &tip,
            manifest.as_ref(),
            crate::follow::lineage(self.source.db()).as_ref(),
            self.takeover,
        )
    }

    pub fn shippers(&self) -> &[Shipper] {
        &self.shippers
    }

    /// Picks up a database that was closed while idle (see
    /// `Source::reopen`): the replicas go on in their generations when the
    /// source continues where it was closed, and start new ones from a
    /// snapshot otherwise.
    pub fn reopened(&mut self, continues: bool) -> std::result::Result<(), StartError> {
        if continues {
            self.caught_up();
        } else {
            self.begin_after_change()?;
        }
        for s in &self.shippers {
            s.status().set_state(State::Replicating);
        }
        Ok(())
    }

    /// New generations for every replica of a reopened database that does
    /// not continue.
    fn begin_after_change(&mut self) -> std::result::Result<(), StartError> {
        for s in &mut self.shippers {
            s.force_new_generation(
                "the database changed while walstream had it closed (checkpointed unseen)".into(),
            );
        }
        self.source.start_at_end()?;
        self.caught_up();
        self.begin_new_generations()?;
        Ok(())
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
            self.check_lineage(i).map_err(|error| StartError {
                replica: Some(i),
                error,
            })?;
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
            self.record(
                i,
                crate::lineage::Mark {
                    generation: state.generation.clone(),
                    next_index: state.next_index,
                    position: state.position,
                },
            );
            self.shippers[i].resume(state, gap);
        }
        self.begin_new_generations()?;
        for s in &self.shippers {
            s.status().set_state(State::Replicating);
        }
        Ok(())
    }

    /// Starts a generation for every replica that has none (at start-up,
    /// or when a reopened database does not continue): the first replica
    /// that cannot start fails the whole start.
    fn begin_new_generations(&mut self) -> std::result::Result<(), StartError> {
        let failures = match self.prepare_generations(true)? {
            Some(g) => self.rt.clone().block_on(self.begin_generations(g)),
            None => Vec::new(),
        };
        match failures.into_iter().next() {
            Some((i, error)) => Err(StartError {
                replica: Some(i),
                error,
            }),
            None => Ok(()),
        }
    }

    /// Runs until a stop: `stop` has begun (a sticky state, checked before
    /// every wait) or the control channel says `Control::Shutdown` (which
    /// only wakes it) or is closed. Then makes the last shipment (see
    /// `finish`) and returns each replica's outcome. An error of the
    /// database itself (`Error::Replaced`, `Error::ContinuityLost`, or any
    /// during the last shipment) ends it at once, as `Err`.
    ///
    /// Waiting is async; every round runs on the bounded blocking pool (see
    /// `blocking`), so a process with thousands of databases has a few
    /// threads, not one per database.
    pub async fn run(
        mut self,
        control: &mut UnboundedReceiver<Control>,
        wake: UnboundedSender<Control>,
        watcher: &Arc<Watcher>,
        stop: &Arc<Shutdown>,
        budget: &Arc<FdBudget>,
    ) -> Result<RunEnd> {
        let min_sync = self
            .shippers
            .iter()
            .map(|s| s.options().sync_interval)
            .min()
            .unwrap_or_default();
        let monitor = self.source.options().monitor_interval;
        // `armed` lets one write wake one round, no more.
        let armed = Arc::new(AtomicBool::new(true));
        let wal = crate::db::wal_path(self.source.db());
        let mut watch = watcher.watch(&wal, wake, armed.clone());
        let mut backoff = monitor;
        // The first round at once: a reopened database was woken by a change
        // that raised no message for this loop.
        let mut timeout = Duration::ZERO;
        // What the files looked like after the last round (see `Quiet`).
        let mut quiet = Quiet::default();
        let mut look_again = false;
        // Whether the last pass found the database idle: only then does a
        // database waiting for descriptors wake it (see `fdlimit`).
        let mut idle = false;
        loop {
            let mut shutdown = stop.requested();
            let mut woken = false;
            if !shutdown {
                let waited = tokio::select! {
                    r = tokio::time::timeout(timeout, control.recv()) => Some(r),
                    () = budget.pressure(), if idle => None,
                };
                match waited {
                    Some(Ok(Some(Control::Wake | Control::Sync))) => woken = true,
                    Some(Ok(Some(Control::Force))) => {
                        woken = true;
                        self.force_upload = true;
                    }
                    Some(Ok(Some(Control::Shutdown))) | Some(Ok(None)) => shutdown = true,
                    Some(Err(_)) | None => {}
                }
            }
            idle = false;
            while let Ok(m) = control.try_recv() {
                shutdown |= m == Control::Shutdown;
                woken |= m != Control::Shutdown;
                self.force_upload |= m == Control::Force;
            }
            shutdown |= stop.requested();
            if shutdown {
                let stop = stop.clone();
                return blocking(move || {
                    let result = self.finish(&stop);
                    self.source.release();
                    result
                })
                .await?
                .map(RunEnd::Stopped);
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
            if !wait.is_zero() && !self.force_upload {
                timeout = wait;
                if self.spaced() && self.source.rewind_wanted() {
                    self = blocking(move || {
                        let shippers = &mut self.shippers;
                        self.source
                            .rewind_between_rounds(&mut |b| hand(shippers, b));
                        self
                    })
                    .await?;
                    timeout = wait.min(GATED_REWIND_EVERY);
                }
                continue;
            }
            // A database nobody wrote to since the last round, with nothing
            // held, retried or due: no round at all, only two `stat`s.
            if !woken && !look_again && self.quiet_since(&quiet) {
                // Notifications end idle spells: back on if a busy spell
                // turned them off, then one more round (a commit that landed
                // before they were back raised none).
                if let Some(w) = watch.as_mut().filter(|w| !w.is_active()) {
                    if w.set_active(true) {
                        look_again = true;
                        timeout = Duration::ZERO;
                        continue;
                    }
                }
                let watched = watch.as_ref().is_some_and(|w| w.is_active());
                let idle_poll = if watched {
                    monitor * IDLE_POLL_FACTOR
                } else {
                    monitor
                };
                // Everything committed is still shipped: the replicas are in
                // sync as of now, and stay so until the next write.
                let now_ms = Utc::now().timestamp_millis();
                let now_mono = crate::metrics::mono_us();
                for s in &self.shippers {
                    s.synced(now_ms, now_mono, self.source.wal_len());
                    s.status().set_state(State::Idle);
                }
                // Another database waits for descriptors: close this one
                // (it reopens on its next change) if it is small enough to
                // prove continuity by its contents.
                if budget.wanted() && self.source.file_len() <= CLOSE_MAX_BYTES {
                    if let Some(claim) = budget.claim() {
                        match self.close_idle(claim).await? {
                            Ok(end) => return Ok(end),
                            Err(me) => {
                                self = *me;
                                look_again = true;
                                timeout = Duration::ZERO;
                                continue;
                            }
                        }
                    }
                }
                idle = true;
                timeout = idle_poll;
                continue;
            }
            // Any write after this point wakes the next round; writes before
            // it are read by this one.
            armed.store(true, Ordering::SeqCst);
            look_again = false;
            // Taken before the round reads anything: a write during the
            // round changes the files after this, so it is never taken for
            // quiet.
            let before = Quiet::now(self.source.db(), &wal);
            let (me, result) = self.round_async().await?;
            self = me;
            match result {
                Ok(uploaded) => {
                    backoff = monitor;
                    timeout = monitor;
                    quiet = before;
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
                    blocking(move || self.source.release()).await?;
                    return Err(e);
                }
                Err(e) => {
                    quiet = Quiet::default();
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

    /// Closes the idle database for a waiter of `claim` (see
    /// `Source::close_idle`). `Ok`: closed, its connections gone; `Err`:
    /// not now (a commit came in, handed to the replicas, or the write lock
    /// was busy), the replicator back.
    async fn close_idle(mut self, claim: Claim) -> Result<std::result::Result<RunEnd, Box<Self>>> {
        blocking(move || {
            let shippers = &mut self.shippers;
            let closed = match self.source.close_idle(&mut |b| hand(shippers, b)) {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(db = %self.source.db().display(), error = %e, "closing an idle database failed");
                    None
                }
            };
            let complete = self
                .shippers
                .iter()
                .all(|s| s.attached() && !s.holds_anything());
            match closed {
                Some(closed) if complete => {
                    tracing::debug!(db = %self.source.db().display(), "closed while idle, for a database waiting for descriptors");
                    self.source.release();
                    let Replicator {
                        source, shippers, ..
                    } = self;
                    drop(source);
                    Ok(RunEnd::Closed {
                        shippers,
                        closed,
                        claim,
                    })
                }
                _ => Err(Box::new(self)),
            }
        })
        .await
    }

    /// Whether nothing happened since the round that recorded `quiet` began:
    /// the database and WAL files look the same, no replica holds, retries or
    /// restarts anything, and nothing of the source's is pending (its WAL
    /// is empty, or a round ran within the checkpoint interval, and no
    /// TRUNCATE is owed).
    fn quiet_since(&self, quiet: &Quiet) -> bool {
        let Some(at) = quiet.at else {
            return false;
        };
        let now = Instant::now();
        let wal = crate::db::wal_path(self.source.db());
        quiet.files.is_some()
            && Quiet::files(self.source.db(), &wal) == quiet.files
            && self
                .shippers
                .iter()
                .all(|s| s.wants_round_in(now).is_none())
            && (self.source.wal_len() == 0
                || at.elapsed() < self.source.options().checkpoint_interval)
            && !self.source.truncate_owed()
    }

    /// Whether some replica spaces its uploads by a sync-interval.
    fn spaced(&self) -> bool {
        self.shippers
            .iter()
            .any(|s| !s.options().sync_interval.is_zero())
    }

    /// One round (see the module doc), as the async worker runs it: the
    /// work on the database on the blocking pool, the storage calls awaited
    /// outside it, so a replica whose storage is slow never holds a blocking
    /// thread (or up the other databases). Returns the replicator and
    /// whether anything was uploaded; errors are the database's (a
    /// replica's own failures are its own: it backs off and retries).
    async fn round_async(self) -> Result<(Self, Result<bool>)> {
        let began = Utc::now().timestamp_millis();
        let began_mono = crate::metrics::mono_us();
        let (mut me, prepared) = blocking(move || {
            let mut me = self;
            let r = me.read_and_prepare_generations(false);
            (me, r)
        })
        .await?;
        let generations = match prepared {
            Ok(g) => g,
            Err(e) => return Ok((me, Err(e))),
        };
        if let Some(g) = generations {
            me.begin_generations(g).await;
        }
        let force = std::mem::take(&mut me.force_upload);
        let (uploaded, _) = me.upload(force).await;
        for s in &me.shippers {
            s.synced(began, began_mono, me.source.wal_len());
        }
        let (mut me, prepared) = blocking(move || {
            let mut me = me;
            let r = me.prepare_snapshots_and_maintain();
            (me, r)
        })
        .await?;
        match prepared {
            Ok(snapshots) => {
                me.put_snapshots(snapshots).await;
                Ok((me, Ok(uploaded)))
            }
            Err(e) => Ok((me, Err(e))),
        }
    }

    /// The first part of a round: read what was committed, hand it out, and
    /// write the snapshot for replicas that need a new generation.
    fn read_and_prepare_generations(&mut self, all: bool) -> Result<Option<NewGeneration>> {
        let shippers = &mut self.shippers;
        self.source.read(&mut |b| hand(shippers, b))?;
        self.caught_up();
        let r = self.prepare_generations(all);
        self.note_checkpoints();
        r
    }

    /// The last part of a round: periodic snapshot files, then checkpoints.
    fn prepare_snapshots_and_maintain(
        &mut self,
    ) -> Result<Vec<(usize, SnapshotHeader, tempfile::NamedTempFile)>> {
        let snapshots = self.prepare_snapshots()?;
        let shippers = &mut self.shippers;
        self.source.maintain(
            shippers
                .iter()
                .any(|s| !s.options().sync_interval.is_zero()),
            &mut |b| hand(shippers, b),
        )?;
        self.caught_up();
        self.note_checkpoints();
        Ok(snapshots)
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
    async fn upload(&mut self, force: bool) -> (bool, Vec<(usize, Error)>) {
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
        // Before the upload: the database holds these frames already.
        for (i, u) in &plans {
            if let Some(mark) = u.reaches() {
                self.record(*i, mark);
            }
        }
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
        let mut failed = Vec::new();
        for (i, u, out) in done {
            if let Some(e) = self.shippers[i].uploaded(u, out) {
                failed.push((i, e));
            }
        }
        (true, failed)
    }

    /// Writes the first snapshot of a new generation for every replica that
    /// has none or was detached (`all`: whatever their back-off says): one
    /// image at the read position, under one generation id for all of them.
    fn prepare_generations(&mut self, all: bool) -> Result<Option<NewGeneration>> {
        let now = Instant::now();
        let want: Vec<usize> = (0..self.shippers.len())
            .filter(|&i| {
                let s = &self.shippers[i];
                !s.attached() && (all || s.may_try(now))
            })
            .collect();
        if want.is_empty() {
            return Ok(None);
        }
        let plan = self.image()?;
        let cursor = self.source.cursor();
        let newest = want
            .iter()
            .filter_map(|&i| self.shippers[i].newest_seen())
            .max()
            .map(str::to_string);
        let header = SnapshotHeader {
            generation: generation::new_id_after(newest.as_deref()),
            index: 0,
            position: 0,
            page_size: self.source.page_size(),
            db_pages: plan.db_pages,
            timestamp_ms: Utc::now().timestamp_millis(),
            wal: cursor.as_ref().map(WalPoint::from_cursor),
        };
        let file = self.snapshot_file(&header, &plan)?;
        Ok(Some(NewGeneration {
            replicas: want,
            header,
            file,
            cursor,
        }))
    }

    /// Stores a prepared new generation in each of its replicas. Returns the
    /// replicas that failed to start, with their errors (each backs off).
    async fn begin_generations(&mut self, g: NewGeneration) -> Vec<(usize, Error)> {
        let mut failures = Vec::new();
        let database = self.source.db().display().to_string();
        let follows = crate::follow::lineage(self.source.db());
        let promoted = !g.replicas.is_empty() && follows.is_some();
        for i in g.replicas {
            self.record(
                i,
                crate::lineage::Mark {
                    generation: g.header.generation.clone(),
                    next_index: 0,
                    position: 0,
                },
            );
            let s = &self.shippers[i];
            // What this generation continues: the one this shipper shipped
            // last, else the replica's newest as found at start.
            let previous = s
                .state()
                .map(|st| generation::Lineage {
                    generation: st.generation.clone(),
                    next_index: st.next_index,
                    position: st.position,
                })
                .or_else(|| {
                    s.tip().map(|t| generation::Lineage {
                        generation: t.generation.clone(),
                        next_index: t.next_index,
                        position: t.position,
                    })
                });
            let epoch = self.epochs.get(i).copied().flatten();
            let s = &mut self.shippers[i];
            let manifest = Manifest {
                generation: g.header.generation.clone(),
                started_at: Utc::now(),
                reason: s
                    .restart_reason()
                    .unwrap_or("no generation in replica")
                    .to_string(),
                page_size: g.header.page_size,
                database: database.clone(),
                hostname: std::env::var("HOSTNAME").ok(),
                walstream_version: env!("CARGO_PKG_VERSION").to_string(),
                follows: follows.clone(),
                previous,
                epoch,
                encrypted: s.replica().encrypts(),
            };
            if let Err(e) = s
                .begin_generation(&manifest, &g.header, g.file.path(), g.cursor)
                .await
            {
                s.failed(&e, "starting a new generation failed");
                failures.push((i, e));
            }
        }
        if promoted && failures.is_empty() {
            crate::follow::promoted(self.source.db(), &g.header.generation);
        }
        failures
    }

    /// Writes periodic snapshots for every replica due one, from one image.
    fn prepare_snapshots(
        &mut self,
    ) -> Result<Vec<(usize, SnapshotHeader, tempfile::NamedTempFile)>> {
        let now_ms = Utc::now().timestamp_millis();
        let due: Vec<usize> = (0..self.shippers.len())
            .filter(|&i| self.shippers[i].snapshot_due(now_ms))
            .collect();
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let plan = self.image()?;
        let mut out = Vec::new();
        for i in due {
            // Reading the WAL again (see `image`) may have handed it more.
            if self.shippers[i].holds_anything() {
                continue;
            }
            let header =
                self.shippers[i].snapshot_header(self.source.page_size(), plan.db_pages, now_ms);
            let file = self.snapshot_file(&header, &plan)?;
            out.push((i, header, file));
        }
        Ok(out)
    }

    /// Stores the snapshots `prepare_snapshots` wrote.
    async fn put_snapshots(
        &mut self,
        snapshots: Vec<(usize, SnapshotHeader, tempfile::NamedTempFile)>,
    ) {
        for (i, header, file) in snapshots {
            let s = &mut self.shippers[i];
            match s.put_snapshot(&header, file.path()).await {
                Ok(bytes) => s.snapshot_stored(&header, bytes),
                Err(e) => s.failed(&e, "snapshot failed"),
            }
        }
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
    pub fn finish(&mut self, stop: &Shutdown) -> Result<Vec<Result<()>>> {
        let mut backoff = Duration::from_millis(100);
        let mut errors: Vec<Option<Error>> = self.shippers.iter().map(|_| None).collect();
        loop {
            let began = Utc::now().timestamp_millis();
            let began_mono = crate::metrics::mono_us();
            let shippers = &mut self.shippers;
            let read = self.source.read(&mut |b| hand(shippers, b));
            self.caught_up();
            let db_error = match read {
                Ok(()) => match self.prepare_generations(true) {
                    Ok(prepared) => {
                        if let Some(g) = prepared {
                            for (i, e) in self.rt.clone().block_on(self.begin_generations(g)) {
                                errors[i] = Some(e);
                            }
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
            for (i, e) in self.rt.clone().block_on(self.upload(true)).1 {
                errors[i] = Some(e);
            }
            for s in &self.shippers {
                s.synced(began, began_mono, self.source.wal_len());
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

/// The first snapshot of a new generation, written and ready to store in
/// `replicas`.
struct NewGeneration {
    replicas: Vec<usize>,
    header: SnapshotHeader,
    file: tempfile::NamedTempFile,
    cursor: Option<crate::wal::WalCursor>,
}

/// Hands a batch read from the WAL to every attached replica.
fn hand(shippers: &mut [Shipper], batch: Arc<Batch>) {
    for s in shippers.iter_mut() {
        s.hold(batch.clone());
    }
}

/// The database's and its WAL's stamps (see `FileStamp`), to tell whether
/// a closed database changed.
pub(crate) fn file_stamps(db: &Path) -> Option<(FileStamp, FileStamp)> {
    Quiet::files(db, &crate::db::wal_path(db))
}

/// A file as far as change detection goes: identity, length and
/// modification time (`None`: the file does not exist).
pub(crate) type FileStamp = Option<(u64, u64, u64, i64, i64)>;

/// What the database and its WAL looked like after a round, to tell an idle
/// database (nothing to do) without a round.
#[derive(Debug, Default)]
struct Quiet {
    at: Option<Instant>,
    files: Option<(FileStamp, FileStamp)>,
}

impl Quiet {
    fn now(db: &Path, wal: &Path) -> Quiet {
        Quiet {
            at: Some(Instant::now()),
            files: Quiet::files(db, wal),
        }
    }

    fn files(db: &Path, wal: &Path) -> Option<(FileStamp, FileStamp)> {
        Some((stamp(db)?, stamp(wal)?))
    }
}

/// `None` when the file cannot be looked at (then nothing counts as quiet).
fn stamp(p: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p) {
        Ok(m) => Some(Some((m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(None),
        Err(_) => None,
    }
}

/// With file notifications working, an idle database is still looked at
/// every `monitor-interval` times this, in case one was missed: with
/// thousands of databases these looks are most of the idle CPU.
pub const IDLE_POLL_FACTOR: u32 = 60;

/// How many database rounds run at once, whatever the number of databases:
/// the threads of a process are bounded by this (and the runtime's blocking
/// pool, which storage calls share), not by the databases it replicates.
pub const MAX_CONCURRENT_ROUNDS: usize = 8;

static ROUNDS: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(MAX_CONCURRENT_ROUNDS));

/// Runs blocking work of a database worker (SQLite calls, reading the WAL,
/// storage calls through `Handle::block_on`) on the runtime's blocking
/// pool, at most `MAX_CONCURRENT_ROUNDS` at a time.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let _permit = ROUNDS.acquire().await.expect("never closed");
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Invalid(format!("replication worker failed: {e}")))
}

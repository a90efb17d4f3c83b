//! The `replicate` process: many databases, many replicas, one application.
//!
//! Each database is one worker (an async task): one source (one read lock,
//! the WAL read once, checkpoints) feeding one shipper per replica (see
//! `replicate`). A replica that fails (storage down, disk full) retries on
//! its own back-off while the others keep shipping. Only start-up is all or
//! nothing: if any database or replica cannot start (bad database,
//! unreachable storage), nothing is left running, no application is
//! started, and the exit is non-zero, so a misconfiguration is seen at once
//! rather than as a replica that silently never worked.
//!
//! `dir:` entries are rescanned when a file is created in them (file
//! notifications; every monitor interval without them); new databases get
//! workers as they appear.
//!
//! With `exec`, the application starts once every pair has started, receives
//! SIGINT, SIGTERM and SIGHUP as walstream does, and when it exits walstream
//! ships what is committed and exits with the application's code.
//!
//! Stopping is bounded by `shutdown-timeout` whatever state a worker is in:
//! the stop is a sticky [`Shutdown`] state every wait checks, storage calls
//! end by its deadline ([`crate::shutdown::Bounded`]), and the daemon waits
//! for its workers only until then. Every replica that did not receive
//! everything committed is named in one error line, and the exit is then
//! non-zero.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::config::{DbSettings, DirSettings, ReplicaSettings, Settings};
use crate::error::{Error, IoContext, Result};
use crate::exec::App;
use crate::fdlimit::FdBudget;
use crate::lease::{Holder, Lease, Leased};
use crate::metrics::{Metrics, ReplicaStatus, State};
use crate::replica::Replica;
use crate::replicate::{blocking, Control, Replicator, RunEnd, StartError};
use crate::shipper::{Shipper, ShipperOptions};
use crate::shutdown::{Bounded, Shutdown};
use crate::source::{Closed, Source, SourceOptions};
use crate::storage::{self, Metered};
use crate::watch::Watcher;

/// The tunables of one database's source.
pub fn source_options(db: &DbSettings) -> SourceOptions {
    SourceOptions {
        db: db.path.clone(),
        monitor_interval: db.monitor_interval,
        checkpoint_interval: db.checkpoint_interval,
        min_checkpoint_page_count: db.min_checkpoint_page_count,
        max_checkpoint_page_count: db.max_checkpoint_page_count,
        busy_timeout: db.busy_timeout,
    }
}

/// The tunables of one replica's shipper.
pub fn shipper_options(db: &DbSettings, replica: &ReplicaSettings) -> ShipperOptions {
    ShipperOptions {
        sync_interval: replica.sync_interval,
        snapshot_interval: replica.snapshot_interval,
        max_pending: replica.max_pending,
        retry_after: db.monitor_interval.max(Duration::from_millis(100)),
    }
}

/// How long past the shutdown deadline the daemon waits for a worker whose
/// storage call was just cut at the deadline to say so, before it reports
/// the worker as still busy.
/// How often a database that does not exist yet is announced again.
const WAITING_ANNOUNCE_EVERY: Duration = Duration::from_secs(60);

const REPORT_GRACE: Duration = Duration::from_millis(200);

struct Worker {
    /// The database (as configured or registered).
    db: PathBuf,
    /// One per replica, in the order of the worker's outcomes.
    statuses: Vec<Arc<ReplicaStatus>>,
    control: UnboundedSender<Control>,
    /// The worker's outcome for each replica, sent when it ends (a dropped
    /// sender means it panicked). The worker is never awaited otherwise: one
    /// stuck in a blocking call must not hold up the exit.
    done: oneshot::Receiver<Vec<Result<()>>>,
    /// Compaction, retention and validation of each replica.
    maintenance: Vec<tokio::task::JoinHandle<()>>,
}

/// Everything running in the process.
pub struct Daemon {
    settings: Settings,
    metrics: Arc<Metrics>,
    watcher: Arc<Watcher>,
    workers: Vec<Worker>,
    /// Databases already being replicated (canonical paths).
    known: HashSet<PathBuf>,
    /// SIGINT, SIGTERM and SIGHUP, caught from the moment the daemon exists
    /// (a signal during start-up must not kill it before it ships).
    signals: tokio::sync::mpsc::UnboundedReceiver<i32>,
    /// A signal that arrived while `start` waited for the workers to start.
    stop_signal: Option<i32>,
    /// The stop, shared with every worker and storage.
    stop: Arc<Shutdown>,
    /// Open files: a database opens only with a permit from here.
    fds: Arc<FdBudget>,
    /// Paths `dir:` scans found (started, or refused for want of
    /// descriptors): later scans do not open them again.
    scanned: HashSet<PathBuf>,
    /// The periodic log lines (see `report`), ended with the daemon.
    reporter: Option<tokio::task::JoinHandle<()>>,
    /// Workers that lost a replica's lease say so here (see `Job::run`).
    lease_lost: (UnboundedSender<String>, UnboundedReceiver<String>),
    /// The control API (see `control`) and the changes it asks for.
    control: Option<(
        Arc<crate::control::Api>,
        UnboundedReceiver<crate::control::Change>,
    )>,
}

impl Daemon {
    /// Must be called on the runtime; installs the signal handlers.
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Result<Daemon> {
        let (tx, signals) = tokio::sync::mpsc::unbounded_channel();
        for (kind, num) in [
            (SignalKind::interrupt(), libc::SIGINT),
            (SignalKind::terminate(), libc::SIGTERM),
            (SignalKind::hangup(), libc::SIGHUP),
        ] {
            let mut stream = signal(kind).map_err(sig_err)?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if tx.send(num).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Daemon {
            settings,
            metrics,
            watcher: Watcher::new(),
            workers: Vec::new(),
            known: HashSet::new(),
            signals,
            stop_signal: None,
            stop: Shutdown::new(),
            fds: FdBudget::raised(),
            scanned: HashSet::new(),
            reporter: None,
            lease_lost: mpsc::unbounded_channel(),
            control: None,
        })
    }

    /// Answers the control API: every database is registered with `api`,
    /// and `changes` are carried out by `run`.
    pub fn with_control(
        mut self,
        api: Arc<crate::control::Api>,
        changes: UnboundedReceiver<crate::control::Change>,
    ) -> Daemon {
        self.control = Some((api, changes));
        self
    }

    /// Starts replicating a database registered through the control API.
    async fn register(&mut self, db: DbSettings) -> std::result::Result<(), String> {
        let started = self.spawn_db(&db, true).await.map_err(|e| e.to_string())?;
        for (name, rx) in started {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err((who, e))) => {
                    let _ = self.unregister(&db.path).await;
                    return Err(format!("{}: {e}", who.unwrap_or(name)));
                }
                Err(_) => {
                    let _ = self.unregister(&db.path).await;
                    return Err(format!("{name}: worker ended"));
                }
            }
        }
        tracing::info!(db = %db.path.display(), "registered through the control API");
        Ok(())
    }

    /// Stops replicating a database (shipping what is committed first,
    /// within `shutdown-timeout`) and forgets it.
    async fn unregister(&mut self, db: &Path) -> std::result::Result<(), String> {
        let key = crate::control::key(db);
        let Some(i) = self
            .workers
            .iter()
            .position(|w| crate::control::key(&w.db) == key)
        else {
            return Err(format!("database {} is not replicated", db.display()));
        };
        let w = self.workers.remove(i);
        self.known.remove(&key);
        if let Some((api, _)) = &self.control {
            api.remove(&w.db);
        }
        for m in &w.maintenance {
            m.abort();
        }
        let _ = w.control.send(Control::Shutdown);
        let limit = self.settings.shutdown_timeout + REPORT_GRACE;
        let outcomes = match tokio::time::timeout(limit, w.done).await {
            Ok(Ok(o)) => o,
            Ok(Err(_)) => return Err("the worker panicked".into()),
            Err(_) => {
                return Err(format!(
                    "still shipping after {}",
                    humantime::format_duration(limit)
                ))
            }
        };
        let failed: Vec<String> = w
            .statuses
            .iter()
            .zip(outcomes)
            .filter_map(|(s, o)| o.err().map(|e| format!("{}: {e}", s.replica)))
            .collect();
        tracing::info!(db = %db.display(), "unregistered through the control API");
        if failed.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "not everything committed was shipped: {}",
                failed.join("; ")
            ))
        }
    }

    /// Starts every configured pair; fails (and stops what started) if any
    /// cannot start.
    pub async fn start(&mut self) -> Result<()> {
        self.reporter = Some(tokio::spawn(crate::report::run(
            self.metrics.clone(),
            self.settings.summary_interval,
        )));
        let mut dbs = self.settings.dbs.clone();
        for d in &self.settings.dirs {
            if !d.dir.is_dir() {
                return Err(Error::Invalid(format!(
                    "dir {} does not exist or is not a directory",
                    d.dir.display()
                )));
            }
            let found = scan(d)?;
            self.scanned.extend(found.iter().map(|db| db.path.clone()));
            dbs.extend(found);
        }
        let mut pending = Vec::new();
        for db in &dbs {
            match self.spawn_db(db, true).await {
                Ok(started) => pending.extend(started),
                Err(e) => {
                    let _ = self.stop().await;
                    return Err(e);
                }
            }
        }
        let mut failure = None;
        let mut pending = pending.into_iter();
        while let Some((name, mut rx)) = pending.next() {
            // A signal ends the wait (starting can take as long as storage
            // takes to answer); `run` then stops at once, and a worker still
            // starting counts as not shipped. One that already failed to
            // start is still a start-up failure.
            let started = tokio::select! {
                r = &mut rx => r,
                Some(sig) = self.signals.recv() => {
                    tracing::info!(signal = sig, "signal while starting");
                    self.stop_signal = Some(sig);
                    for (name, mut rx) in std::iter::once((name, rx)).chain(pending.by_ref()) {
                        if let Ok(Err((who, e))) = rx.try_recv() {
                            failure.get_or_insert(Error::Invalid(format!("{}: {e}", who.unwrap_or(name))));
                        }
                    }
                    break;
                }
            };
            match started {
                Ok(Ok(())) => {}
                Ok(Err((who, e))) => {
                    failure.get_or_insert(Error::Invalid(format!("{}: {e}", who.unwrap_or(name))));
                }
                Err(_) => {
                    failure.get_or_insert(Error::Invalid(format!("{name}: worker ended")));
                }
            }
        }
        if let Some(e) = failure {
            let _ = self.stop().await;
            return Err(e);
        }
        Ok(())
    }

    /// Starts the worker of `db` unless it already has one. With `report`,
    /// returns a receiver that says when it has started (or which replica
    /// could not).
    async fn spawn_db(
        &mut self,
        db: &DbSettings,
        report: bool,
    ) -> Result<Vec<(String, oneshot::Receiver<StartOutcome>)>> {
        let key = std::fs::canonicalize(&db.path).unwrap_or_else(|_| absolute(&db.path));
        if self.known.contains(&key) {
            return Ok(Vec::new());
        }
        self.known.insert(key);
        let mut replicas = Vec::new();
        let mut statuses = Vec::new();
        let mut maintenance = Vec::new();
        let mut leases = Vec::new();
        for rs in &db.replicas {
            let max_lag = rs.sync_interval + db.monitor_interval + self.settings.ready_lag;
            let status = self.metrics.replica(
                &db.path.display().to_string(),
                &rs.target.to_string(),
                max_lag,
            );
            let bounded = Bounded::wrap(storage::open(&rs.target).await, self.stop.clone());
            let holder = Holder::me(&absolute(&db.path).display().to_string());
            let lease = Lease::new(bounded.clone(), &rs.target, holder, rs.lease.clone());
            let sealed = crate::encryption::Encrypted::wrap(bounded, rs.age.as_ref())
                .map_err(|e| Error::Invalid(format!("replica {}: age: {e}", rs.target)))?;
            let storage = Metered::wrap(Leased::wrap(sealed, lease.clone()), status.clone());
            let replica = Replica::new(storage);
            leases.push(lease.clone());
            maintenance.push(tokio::spawn(
                maintain(
                    lease,
                    replica.clone(),
                    status.clone(),
                    db.path.clone(),
                    rs.clone(),
                    self.settings.levels.clone(),
                )
                .instrument(tracing::info_span!(
                    "maintain",
                    db = %db.path.display(),
                    replica = %rs.target
                )),
            ));
            replicas.push((
                replica,
                status.clone(),
                shipper_options(db, rs),
                rs.target.to_string(),
            ));
            statuses.push(status);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let job = Job {
            opts: source_options(db),
            replicas,
            rt: Handle::current(),
            watcher: self.watcher.clone(),
            wake: tx.clone(),
            started: report.then_some(ready_tx),
            force_new: None,
            db: db.path.display().to_string(),
            stop: self.stop.clone(),
            budget: self.fds.clone(),
            permit: None,
            closed: None,
            leases,
            lease_lost: self.lease_lost.0.clone(),
            takeover: db.takeover,
        };
        let (done_tx, done) = oneshot::channel();
        let span = tracing::info_span!("replicate", db = %db.path.display());
        tokio::spawn(
            async move {
                let _ = done_tx.send(job.run(rx).await);
            }
            .instrument(span),
        );
        if let Some((api, _)) = &self.control {
            api.add(crate::control::Handle {
                db: db.path.clone(),
                control: tx.clone(),
                statuses: statuses.clone(),
            });
        }
        self.workers.push(Worker {
            db: db.path.clone(),
            statuses,
            control: tx,
            done,
            maintenance,
        });
        Ok(if report {
            vec![(db.path.display().to_string(), ready_rx)]
        } else {
            Vec::new()
        })
    }

    /// Picks up databases that appeared in `dir:` entries since the last
    /// call. Returns whether a file matched a pattern but was not a
    /// database (yet: an application creating one writes its header a
    /// moment after the file appears), so the next scan should come soon.
    pub async fn rescan(&mut self) -> bool {
        let mut pending = false;
        for d in self.settings.dirs.clone() {
            let seen = std::mem::take(&mut self.scanned);
            let found = scan_new(&d, &|p: &Path| seen.contains(p), &mut pending);
            self.scanned = seen;
            match found {
                Ok(dbs) => {
                    for db in dbs {
                        self.scanned.insert(db.path.clone());
                        if let Err(e) = self.spawn_db(&db, false).await {
                            tracing::warn!(db = %db.path.display(), error = %e, "cannot start replicating");
                        }
                    }
                }
                Err(e) => tracing::warn!(dir = %d.dir.display(), error = %e, "cannot scan"),
            }
        }
        pending
    }

    /// Begins the stop: every worker ships what is committed, within
    /// `shutdown-timeout`. Waits for the workers until that deadline (and
    /// `REPORT_GRACE`), logs one error line for each replica that did not
    /// receive everything committed (database, replica, and the position
    /// after which nothing was shipped), and then fails with
    /// `Error::NotShipped`. Workers still busy are left behind; the process
    /// is about to exit.
    pub async fn stop(&mut self) -> Result<()> {
        let timeout = self.settings.shutdown_timeout;
        let deadline = self.stop.begin(timeout);
        let total: usize = self.workers.iter().map(|w| w.statuses.len()).sum();
        if total > 0 {
            tracing::info!(replicas = total, shutdown_timeout = ?timeout, "shipping what is committed, then stopping");
        }
        for w in &self.workers {
            for m in &w.maintenance {
                m.abort();
            }
            let _ = w.control.send(Control::Shutdown);
        }
        let wait_until = tokio::time::Instant::from_std(deadline + REPORT_GRACE);
        let mut count = 0;
        for w in self.workers.drain(..) {
            let outcomes: Vec<Result<()>> = match tokio::time::timeout_at(wait_until, w.done).await
            {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => w
                    .statuses
                    .iter()
                    .map(|_| Err(Error::Invalid("the worker panicked".into())))
                    .collect(),
                Err(_) => w
                    .statuses
                    .iter()
                    .map(|_| {
                        Err(Error::Invalid(format!(
                            "still shipping when shutdown-timeout ({}) ran out",
                            humantime::format_duration(timeout)
                        )))
                    })
                    .collect(),
            };
            for (status, outcome) in w.statuses.iter().zip(outcomes) {
                if let Err(e) = outcome {
                    count += 1;
                    report_unshipped(status, &e);
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tracing::debug!(left = ?left, unshipped = count, "stopped");
        if count > 0 {
            return Err(Error::NotShipped { count, total });
        }
        Ok(())
    }

    /// Runs until a signal (or, with `exec`, until the application exits),
    /// then ships and stops. Returns the process exit code.
    pub async fn run(mut self) -> Result<u8> {
        if let Some(sig) = self
            .stop_signal
            .take()
            .or_else(|| self.signals.try_recv().ok())
        {
            // Asked to stop while starting: do not start the application.
            tracing::info!(signal = sig, "shipping and stopping");
            return self.stop().await.map(|()| 0);
        }
        let mut app = match &self.settings.exec {
            Some(cmd) => match App::spawn(cmd) {
                Ok(app) => {
                    tracing::info!(
                        pid = app.pid(),
                        program = app.program(),
                        "started application"
                    );
                    Some(app)
                }
                Err(e) => {
                    let _ = self.stop().await;
                    return Err(e);
                }
            },
            None => None,
        };
        let scan_every = self
            .settings
            .dirs
            .iter()
            .map(|d| d.template.monitor_interval)
            .min()
            .unwrap_or(Duration::from_secs(3600));
        // A listing of a directory of thousands of databases costs
        // milliseconds: rescan when a file is created there (within
        // `scan_every`, so a burst of new files costs one listing), else
        // only as rarely as an idle database is looked at.
        let (created_tx, mut created) = tokio::sync::mpsc::unbounded_channel();
        let watched: Vec<(&Path, bool)> = self
            .settings
            .dirs
            .iter()
            .map(|d| (d.dir.as_path(), d.recursive))
            .collect();
        let dir_watch = (!watched.is_empty())
            .then(|| {
                crate::watch::watch_dirs(&watched, move |ev| {
                    let renamed = matches!(
                        ev.kind,
                        notify::EventKind::Modify(notify::event::ModifyKind::Name(_))
                    );
                    if matches!(ev.kind, notify::EventKind::Create(_))
                        || renamed
                        || ev.need_rescan()
                    {
                        let _ = created_tx.send(());
                    }
                })
            })
            .flatten();
        let fallback = match &dir_watch {
            Some(_) => scan_every * crate::replicate::IDLE_POLL_FACTOR,
            None => scan_every,
        };
        let mut next_scan = tokio::time::Instant::now() + scan_every;
        let code = loop {
            let forwarded = tokio::select! {
                Some(sig) = self.signals.recv() => Some(sig),
                code = wait_app(&mut app) => {
                    let code = code?;
                    tracing::info!(code, "application exited, shipping and stopping");
                    break code;
                }
                _ = tokio::time::sleep_until(next_scan), if !self.settings.dirs.is_empty() => {
                    let pending = self.rescan().await;
                    next_scan = tokio::time::Instant::now()
                        + if pending { scan_every } else { fallback };
                    None
                }
                Some(()) = created.recv() => {
                    next_scan = next_scan.min(tokio::time::Instant::now() + scan_every);
                    None
                }
                Some(change) = next_change(&mut self.control) => {
                    match change {
                        crate::control::Change::Register { db, reply } => {
                            let _ = reply.send(self.register(*db).await);
                        }
                        crate::control::Change::Unregister { path, reply } => {
                            let _ = reply.send(self.unregister(&path).await);
                        }
                    }
                    None
                }
                Some(why) = self.lease_lost.1.recv() => {
                    // Another process replicates the database now. A daemon
                    // of that one database and no application has nothing
                    // left to do; one with an application, or other
                    // databases, stays (that database not ready) for their
                    // sake.
                    let only = self.settings.dirs.is_empty() && self.workers.len() <= 1;
                    if app.is_none() && only {
                        tracing::error!(error = %why, "stopping: another process holds a replica's lease");
                        break 1;
                    }
                    None
                }
            };
            if let Some(sig) = forwarded {
                match &app {
                    Some(a) => {
                        tracing::info!(signal = sig, "forwarding signal to application");
                        a.signal(sig);
                    }
                    None => {
                        tracing::info!(signal = sig, "shipping and stopping");
                        break 0;
                    }
                }
            }
        };
        match self.stop().await {
            // The application's failure is the more useful code; a clean
            // exit with unshipped commits must still not look like success.
            Err(e) if code == 0 => Err(e),
            _ => Ok(code),
        }
    }
}

/// The next change the control API asks for (never, without one).
async fn next_change(
    control: &mut Option<(
        Arc<crate::control::Api>,
        UnboundedReceiver<crate::control::Change>,
    )>,
) -> Option<crate::control::Change> {
    match control {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Compaction (every `levels[0]`), retention (every retention-check-interval)
/// and validation (every validation-interval) of one replica, off the
/// worker so they never delay shipping. Each is crash-safe on
/// its own (see `compact`, `retention`), so being cut off at shutdown is fine.
async fn maintain(
    lease: Arc<Lease>,
    replica: Replica,
    status: Arc<ReplicaStatus>,
    db: PathBuf,
    rs: ReplicaSettings,
    levels: Vec<Duration>,
) {
    // Nothing is compacted or pruned by a process that does not hold the
    // replica's lease.
    lease.held().await;
    let compact_every = levels.first().copied();
    let every = [
        compact_every,
        Some(rs.retention_check_interval),
        rs.validation_interval,
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(rs.retention_check_interval);
    // Compaction and validation read object bodies: with encryption and
    // no identity at hand they cannot, so they do not run (retention
    // needs only keys and goes on).
    let blind = replica.encrypts() && !replica.decrypts();
    if blind {
        tracing::info!("the replica is encrypted and this process holds no age identity: no compaction or validation here (give `age: identities` to enable them)");
    }
    let compact_every = compact_every.filter(|_| !blind);
    let validation_interval = rs.validation_interval.filter(|_| !blind);
    let start = tokio::time::Instant::now();
    let (mut compacted, mut pruned, mut validated) = (start, start, start);
    let mut clock = crate::retention::ClockWatch::default();
    loop {
        tokio::time::sleep(every).await;
        let now_ms = chrono::Utc::now().timestamp_millis();
        if let Some(jump) = clock.jumped(rs.retention) {
            tracing::warn!(
                jump_s = jump / 1000,
                retention = %humantime::format_duration(rs.retention),
                "the system clock jumped by more than the retention window: retention goes by the storage's clock and is not misled, but times in new object keys (and so --timestamp restores) follow this host's clock"
            );
        }
        if compact_every.is_some_and(|c| compacted.elapsed() >= c) {
            compacted = tokio::time::Instant::now();
            match crate::compact::compact(&replica, &levels, now_ms).await {
                Ok(r) => status.compacted(r.created.iter().sum::<usize>() as u64, r.deleted as u64),
                Err(e) => tracing::warn!(error = %e, "compaction failed, will retry"),
            }
        }
        if pruned.elapsed() >= rs.retention_check_interval {
            pruned = tokio::time::Instant::now();
            match crate::retention::prune(&replica, rs.retention, now_ms).await {
                Ok(n) => status.pruned(n as u64),
                Err(e) => tracing::warn!(error = %e, "retention failed, will retry"),
            }
        }
        if validation_interval.is_some_and(|v| validated.elapsed() >= v) {
            validated = tokio::time::Instant::now();
            let tmp = match tempfile::tempdir() {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "validation: no temporary directory");
                    continue;
                }
            };
            let live = db.exists().then_some(db.as_path());
            match crate::verify::verify(&replica, live, tmp.path()).await {
                Ok(report) => {
                    status.validated(report.faults.is_empty());
                    for f in &report.faults {
                        tracing::error!(fault = %f, "validation fault");
                    }
                    if let Some(m) = &report.not_compared {
                        tracing::info!(reason = %m, "validation: live content not compared");
                    }
                    if report.faults.is_empty() {
                        tracing::info!(objects = report.objects, compared_at = ?report.compared_at, "validation ok");
                    }
                }
                Err(e) => {
                    status.validated(false);
                    tracing::warn!(error = %e, "validation could not run");
                }
            }
        }
    }
}

/// The one line that says a replica misses commits: database, replica, and
/// the position after which nothing committed reached it.
fn report_unshipped(status: &ReplicaStatus, e: &Error) {
    match status.shipped() {
        Some((generation, position)) => tracing::error!(
            db = %status.db,
            replica = %status.replica,
            %generation,
            position,
            error = %e,
            "not shipped: {} -> {} holds generation {generation} up to position {position}; what was committed after it is not there",
            status.db,
            status.replica
        ),
        None => tracing::error!(
            db = %status.db,
            replica = %status.replica,
            error = %e,
            "not shipped: {} -> {}: no position of this run was shipped (no generation was started or resumed)",
            status.db,
            status.replica
        ),
    }
}

async fn wait_app(app: &mut Option<App>) -> Result<u8> {
    match app {
        Some(a) => a.wait().await,
        None => std::future::pending().await,
    }
}

fn sig_err(e: std::io::Error) -> Error {
    Error::Invalid(format!("cannot install signal handler: {e}"))
}

fn absolute(p: &Path) -> PathBuf {
    std::env::current_dir()
        .map(|d| d.join(p))
        .unwrap_or_else(|_| p.to_path_buf())
}

/// The databases in a `dir:` entry: files matching the pattern that start
/// with SQLite's header. WAL, shared-memory and journal files, and hidden
/// files (walstream's own restore temporaries among them), are skipped.
pub fn scan(d: &DirSettings) -> Result<Vec<DbSettings>> {
    scan_new(d, &|_: &Path| false, &mut false)
}

/// `scan`, leaving out the paths `seen` says were looked at before (a
/// rescan must cost a directory listing, not a header read per database).
/// Sets `pending` when a file matches the pattern but is not a database.
fn scan_new(
    d: &DirSettings,
    seen: &dyn Fn(&Path) -> bool,
    pending: &mut bool,
) -> Result<Vec<DbSettings>> {
    let mut found = Vec::new();
    let mut stack = vec![d.dir.clone()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).io_ctx("list", &dir)?;
        for e in entries {
            let e = e.io_ctx("list", &dir)?;
            let path = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                if d.recursive {
                    stack.push(path);
                }
                continue;
            }
            if !ft.is_file()
                || ["-wal", "-shm", "-journal"]
                    .iter()
                    .any(|s| name.ends_with(s))
                || !d.pattern.matches(&name)
                || seen(&path)
            {
                continue;
            }
            if !is_sqlite(&path) {
                *pending = true;
                continue;
            }
            found.extend(d.for_db(&path));
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(found)
}

/// Whether `path` starts with SQLite's header. Read through `DbFile`: a
/// database the process replicates is not opened again, and a scan racing a
/// replicator that starts on the same file cannot close a descriptor its
/// locks depend on.
fn is_sqlite(path: &Path) -> bool {
    let mut magic = [0u8; 16];
    crate::db::DbFile::open(path)
        .and_then(|f| f.read_exact_at(&mut magic, 0).io_ctx("read", path))
        .is_ok_and(|_| &magic == b"SQLite format 3\0")
}

/// How a worker's first start went: `Err` names the replica at fault (or
/// none, when the database is).
type StartOutcome = std::result::Result<(), (Option<String>, Error)>;

/// One database's worker.
struct Job {
    opts: SourceOptions,
    /// Each replica: its storage, status, tunables and name.
    replicas: Vec<(Replica, Arc<ReplicaStatus>, ShipperOptions, String)>,
    rt: Handle,
    watcher: Arc<Watcher>,
    wake: UnboundedSender<Control>,
    /// Present until the first start is reported (start-up databases only).
    started: Option<oneshot::Sender<StartOutcome>>,
    /// Why the next start must begin new generations (continuity was lost).
    force_new: Option<String>,
    db: String,
    stop: Arc<Shutdown>,
    budget: Arc<FdBudget>,
    /// Held while the database is open (see `fdlimit`).
    permit: Option<crate::fdlimit::Permit>,
    /// The replicas' state and the proof of what was read, while the
    /// database is closed for want of descriptors.
    closed: Option<(Vec<Shipper>, Closed)>,
    /// Each replica's lease, taken before anything is written to it and
    /// released when the worker ends.
    leases: Vec<Arc<Lease>>,
    /// Told when a lease is lost (the worker has ended then).
    lease_lost: UnboundedSender<String>,
    /// `--takeover` (see `lineage`).
    takeover: bool,
}

impl Job {
    /// Replicates until shut down; after a failure of the database itself,
    /// starts over (reopening the database and resuming each replica's
    /// generation if the WAL still continues it) with back-off. A failure
    /// before the first start is reported and ends the worker. Returns each
    /// replica's outcome.
    ///
    /// Once the stop has begun no back-off is waited out: a worker that was
    /// failing makes one last attempt (which ships what is committed, see
    /// `Replicator::run`) and returns its outcome, so a failure can never
    /// lead to another round of "will restart".
    async fn run(mut self, control: UnboundedReceiver<Control>) -> Vec<Result<()>> {
        for (i, lease) in self.leases.clone().iter().enumerate() {
            if let Err(e) = lease.acquire(&self.stop).await {
                let who = Some(self.replicas[i].3.clone());
                if let Some(tx) = self.started.take() {
                    return match tx.send(Err((who, e))) {
                        Err(Err((_, e))) => self.all_err(&e),
                        _ => self.all(|| Ok(())),
                    };
                }
                tracing::error!(error = %e, "cannot replicate this database");
                return self.all_err(&e);
            }
        }
        // A lost lease ends the worker at once: its database is closed
        // (no read lock, no checkpoints of its own) and nothing more is
        // written (its storage refuses already, see `Leased`).
        let (lost_tx, mut lost_rx) = mpsc::unbounded_channel();
        let watches: Vec<_> = self
            .leases
            .iter()
            .enumerate()
            .map(|(i, lease)| {
                let (lease, tx) = (lease.clone(), lost_tx.clone());
                tokio::spawn(async move {
                    let why = lease.lost().await;
                    let _ = tx.send((i, why));
                })
            })
            .collect();
        let leases = self.leases.clone();
        let statuses: Vec<_> = self.replicas.iter().map(|r| r.1.clone()).collect();
        let names: Vec<_> = self.replicas.iter().map(|r| r.3.clone()).collect();
        let lease_lost = self.lease_lost.clone();
        let outcome = tokio::select! {
            outcome = self.replicate(control) => outcome,
            Some((i, why)) = lost_rx.recv() => {
                for (j, status) in statuses.iter().enumerate() {
                    status.set_state(if j == i { State::LeaseLost } else { State::Failing });
                }
                let e = Error::Invalid(format!(
                    "lost the lease of replica {}: {why}; this process stopped replicating the database",
                    names[i]
                ));
                tracing::error!(error = %e, "stopped replicating this database");
                let _ = lease_lost.send(e.to_string());
                statuses.iter().map(|_| Err(Error::Invalid(e.to_string()))).collect()
            }
        };
        for w in watches {
            w.abort();
        }
        for lease in leases {
            lease.release().await;
        }
        outcome
    }

    async fn replicate(mut self, mut control: UnboundedReceiver<Control>) -> Vec<Result<()>> {
        let mut backoff = self.opts.monitor_interval.max(Duration::from_millis(100));
        loop {
            let last = self.stop.requested();
            if last {
                // Whatever consumed the stop's message, the waits inside the
                // attempt (for the database to appear) must see one.
                let _ = self.wake.send(Control::Shutdown);
            }
            let (who, e) = match self.attempt(&mut control).await {
                Ok(RunEnd::Stopped(outcomes)) => return outcomes,
                Ok(RunEnd::Closed {
                    shippers,
                    closed,
                    claim,
                }) => {
                    // Its descriptors go to the database that waits for them.
                    self.permit = None;
                    drop(claim);
                    self.closed = Some((shippers, closed));
                    if self.wait_for_change(&mut control).await {
                        continue;
                    }
                    // Stopped while closed: everything read was shipped, and
                    // nothing changed since.
                    return self.all(|| Ok(()));
                }
                Err(failure) => failure,
            };
            if let Some(tx) = self.started.take() {
                // Reported as a start-up failure, unless nobody waits for
                // that any more (a signal ended the start-up): then it is
                // this worker's outcome.
                return match tx.send(Err((who, e))) {
                    Ok(()) => self.all(|| Ok(())),
                    Err(Err((_, e))) => self.all_err(&e),
                    Err(Ok(())) => self.all(|| Ok(())),
                };
            }
            let lost = matches!(e, Error::ContinuityLost { .. });
            if let Error::ContinuityLost { reason, .. } = &e {
                for (_, status, _, _) in &self.replicas {
                    status.continuity_lost();
                }
                tracing::error!(error = %e, "nothing more goes into this generation; starting a new one from a fresh snapshot");
                self.force_new = Some(format!("continuity lost: {reason}"));
            }
            if last || self.stop.expired() {
                return self.all_err(&e);
            }
            if self.stop.requested() {
                tracing::warn!(error = %e, "replication failed while stopping, one last attempt");
                continue;
            }
            for (_, status, _, _) in &self.replicas {
                status.set_state(State::Failing);
            }
            if !lost {
                let at = who.map(|w| format!(" ({w})")).unwrap_or_default();
                tracing::warn!(error = %e, retry_in = ?backoff, "replication failed{at}, will restart");
            }
            self.pause(&mut control, backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    fn all(&self, f: impl Fn() -> Result<()>) -> Vec<Result<()>> {
        self.replicas.iter().map(|_| f()).collect()
    }

    /// The same failure for every replica (the error is not `Clone`).
    fn all_err(&self, e: &Error) -> Vec<Result<()>> {
        self.all(|| Err(Error::Invalid(e.to_string())))
    }

    /// Waits `d`, or less if the stop begins.
    async fn pause(&self, control: &mut UnboundedReceiver<Control>, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        while !self.stop.requested() {
            match tokio::time::timeout_at(until, control.recv()).await {
                Ok(Some(Control::Wake | Control::Sync | Control::Force)) => {}
                Ok(Some(Control::Shutdown)) | Ok(None) | Err(_) => return,
            }
        }
    }

    /// Waits until the database exists. Returns `false` if the stop came
    /// first (then nothing is committed, and nothing is to ship).
    async fn wait_for_database(&self, control: &mut UnboundedReceiver<Control>) -> bool {
        let mut announced: Option<Instant> = None;
        let since = Instant::now();
        loop {
            if self.opts.db.exists() || self.stop.requested() {
                return !self.stop.requested() || self.opts.db.exists();
            }
            // Said again every minute: a mistyped path must not look like
            // a quiet application forever.
            if announced.is_none_or(|t| t.elapsed() >= WAITING_ANNOUNCE_EVERY) {
                let db =
                    std::path::absolute(&self.opts.db).unwrap_or_else(|_| self.opts.db.clone());
                let waited = since.elapsed().as_secs();
                tracing::info!(db = %db.display(), waited_s = waited, "waiting for database to be created");
                for (_, status, _, _) in &self.replicas {
                    status.set_state(State::Waiting);
                }
                announced = Some(Instant::now());
            }
            let poll = self.opts.monitor_interval.min(Duration::from_secs(1));
            let asked = crate::metrics::mono_us();
            match tokio::time::timeout(poll, control.recv()).await {
                Ok(Some(Control::Shutdown)) | Ok(None) => return false,
                // A wait for durability: with no database, nothing is
                // committed, so everything committed is shipped.
                Ok(Some(Control::Sync | Control::Force)) if !self.opts.db.exists() => {
                    for (_, status, _, _) in &self.replicas {
                        status.synced_mono(asked);
                    }
                }
                _ => {}
            }
        }
    }

    async fn attempt(
        &mut self,
        control: &mut UnboundedReceiver<Control>,
    ) -> std::result::Result<RunEnd, (Option<String>, Error)> {
        crate::db::check_directory(&self.opts.db).map_err(|e| (None, e))?;
        crate::follow::check_not_followed(&self.opts.db).map_err(|e| (None, e))?;
        if !self.opts.db.exists() {
            // The application will create it; that counts as started.
            for (_, status, _, _) in &self.replicas {
                status.set_state(State::Waiting);
            }
            if let Some(tx) = self.started.take() {
                let _ = tx.send(Ok(()));
            }
            if !self.wait_for_database(control).await {
                // Stopped while waiting for the database: nothing is committed.
                return Ok(RunEnd::Stopped(self.all(|| Ok(()))));
            }
        }
        if self.permit.is_none() {
            let db = self.opts.db.clone();
            let budget = self.budget.clone();
            tokio::select! {
                p = budget.acquire(&db) => self.permit = Some(p),
                () = self.stopped(control) => {
                    return Err((None, Error::Invalid(
                        "stopped while waiting for open-file descriptors: not replicated".into(),
                    )));
                }
            }
        }
        let (opts, rt) = (self.opts.clone(), self.rt.clone());
        let takeover = self.takeover;
        let epochs: Vec<Option<u64>> = self.leases.iter().map(|l| l.epoch()).collect();
        let started = match self.closed.take() {
            // Closed while idle: the replicas go on from their state.
            Some((shippers, closed)) => {
                blocking(move || {
                    let (source, continues) = Source::reopen(opts, &closed)?;
                    let mut r =
                        Replicator::new(source, shippers, rt).with_lineage(takeover, epochs);
                    r.reopened(continues).map(|()| r)
                })
                .await
            }
            None => {
                let shippers: Vec<Shipper> = self
                    .replicas
                    .iter()
                    .map(|(replica, status, opts, _)| {
                        let mut s = Shipper::new(replica.clone(), status.clone(), opts.clone());
                        if let Some(reason) = &self.force_new {
                            s.force_new_generation(reason.clone());
                        }
                        s
                    })
                    .collect();
                blocking(move || {
                    let source = Source::open(opts)?;
                    let mut r =
                        Replicator::new(source, shippers, rt).with_lineage(takeover, epochs);
                    r.start().map(|()| r)
                })
                .await
            }
        }
        .map_err(|e| (None, e))?;
        let r = started.map_err(|StartError { replica, error }| {
            let who = replica.map(|i| format!("{} -> {}", self.db, self.replicas[i].3));
            (who, error)
        })?;
        self.force_new = None;
        if let Some(tx) = self.started.take() {
            let _ = tx.send(Ok(()));
        }
        r.run(
            control,
            self.wake.clone(),
            &self.watcher,
            &self.stop,
            &self.budget,
        )
        .await
        .map_err(|e| (None, e))
    }

    /// Resolves once a stop has begun (messages other than `Shutdown` are
    /// dropped meanwhile).
    async fn stopped(&self, control: &mut UnboundedReceiver<Control>) {
        while !self.stop.requested() {
            match tokio::time::timeout(Duration::from_secs(1), control.recv()).await {
                Ok(Some(Control::Shutdown)) | Ok(None) => return,
                _ => {}
            }
        }
    }

    /// While the database is closed: waits until its files change (a
    /// notification, or polling as an idle open database does). Returns
    /// `false` if a stop came first.
    async fn wait_for_change(&self, control: &mut UnboundedReceiver<Control>) -> bool {
        let db = self.opts.db.clone();
        for (_, status, _, _) in &self.replicas {
            status.set_state(State::Idle);
        }
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let watches: Vec<_> = [crate::db::wal_path(&db), db.clone()]
            .iter()
            .map(|f| self.watcher.watch(f, self.wake.clone(), armed.clone()))
            .collect();
        let poll = if watches.iter().all(|w| w.is_some()) {
            self.opts.monitor_interval * crate::replicate::IDLE_POLL_FACTOR
        } else {
            self.opts.monitor_interval
        };
        let mut asked = false;
        loop {
            if self.stop.requested() {
                return false;
            }
            let now = crate::metrics::mono_us();
            // Looked at before every wait: a commit between the close and
            // the watches above raised no notification.
            if self.closed.as_ref().is_none_or(|(_, c)| c.changed(&db)) {
                return true;
            }
            // Unchanged since everything read was shipped: a wait for
            // durability is answered without opening the database.
            if std::mem::take(&mut asked) {
                for (_, status, _, _) in &self.replicas {
                    status.synced_mono(now);
                }
            }
            match tokio::time::timeout(poll, control.recv()).await {
                Ok(Some(Control::Shutdown)) | Ok(None) => return false,
                Ok(Some(Control::Wake)) => armed.store(true, std::sync::atomic::Ordering::SeqCst),
                Ok(Some(Control::Sync | Control::Force)) => asked = true,
                Err(_) => {}
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(r) = self.reporter.take() {
            r.abort();
        }
    }
}

//! What an operator can watch: Prometheus metrics, liveness and readiness.
//!
//! Every (database, replica) pair gets a [`ReplicaStatus`], a bundle of
//! handles into one process-wide registry that the replicator updates as it
//! works. The registry is rendered on `/metrics`; readiness is decided from
//! the same statuses, so what `/readyz` says and what the graphs show cannot
//! disagree.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    db: String,
    replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    db: String,
    replica: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    db: String,
    replica: String,
    kind: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The process-wide registry.
pub struct Metrics {
    registry: Registry,
    wal_size: Family<ReplicaLabels, Gauge>,
    position: Family<ReplicaLabels, Gauge>,
    lag: Family<ReplicaLabels, FloatGauge>,
    last_sync: Family<ReplicaLabels, FloatGauge>,
    up: Family<ReplicaLabels, Gauge>,
    shipped_bytes: Family<ReplicaLabels, Counter>,
    segments: Family<ReplicaLabels, Counter>,
    snapshots: Family<ReplicaLabels, Counter>,
    errors: Family<ReplicaLabels, Counter>,
    continuity_lost: Family<ReplicaLabels, Counter>,
    checkpoints: Family<ModeLabels, Counter>,
    requests: Family<KindLabels, Counter>,
    request_errors: Family<KindLabels, Counter>,
    compacted: Family<ReplicaLabels, Counter>,
    pruned: Family<ReplicaLabels, Counter>,
    validation_ok: Family<ReplicaLabels, Gauge>,
    validation_time: Family<ReplicaLabels, FloatGauge>,
    replicas: Mutex<Vec<Arc<ReplicaStatus>>>,
    follow_position: Family<ReplicaLabels, Gauge>,
    follow_lag: Family<ReplicaLabels, FloatGauge>,
    follow_applied: Family<ReplicaLabels, Counter>,
    follow_errors: Family<ReplicaLabels, Counter>,
    follow_switches: Family<ReplicaLabels, Counter>,
    followers: Mutex<Vec<Arc<FollowStatus>>>,
}

/// Where a replicator stands, for readiness and the `up` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Starting = 0,
    /// The database does not exist yet: nothing is committed, nothing to ship.
    Waiting = 1,
    Replicating = 2,
    /// The last attempt failed; retrying.
    Failing = 3,
    /// Everything committed is shipped and nothing was written since: the
    /// next write wakes it (the lag is zero until then).
    Idle = 4,
    /// Another process took the replica's lease: this one writes nothing
    /// more to it (see `lease`).
    LeaseLost = 5,
}

/// One (database, replica) pair's metrics and state.
pub struct ReplicaStatus {
    pub db: String,
    pub replica: String,
    /// Readiness allows this much time since the last complete sync.
    max_lag: Duration,
    state: AtomicU8,
    /// Start of the last round after which everything committed before it
    /// was shipped (ms since the epoch; 0 = never).
    synced_at_ms: AtomicI64,
    /// The same instant on the monotonic clock ([`mono_us`]), watched by
    /// waits for durability (see `control`).
    synced_mono: tokio::sync::watch::Sender<u64>,
    /// WAL frames read and held, not yet on the replica.
    pending_frames: std::sync::atomic::AtomicU64,
    /// The last failure, until the next complete sync.
    last_error: Mutex<Option<String>>,
    /// The generation being shipped and the position in it up to which
    /// everything is on the replica (`None` before the first shipment).
    shipped: Mutex<Option<(String, u64)>>,
    wal_size: Gauge,
    position: Gauge,
    lag: FloatGauge,
    last_sync: FloatGauge,
    up: Gauge,
    shipped_bytes: Counter,
    segments: Counter,
    snapshots: Counter,
    errors: Counter,
    continuity_lost: Counter,
    compacted: Counter,
    pruned: Counter,
    validation_ok: Gauge,
    validation_time: FloatGauge,
    checkpoints: Family<ModeLabels, Counter>,
    requests: Family<KindLabels, Counter>,
    request_errors: Family<KindLabels, Counter>,
}

impl std::fmt::Debug for ReplicaStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaStatus")
            .field("db", &self.db)
            .field("replica", &self.replica)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("walstream");
        let m = Metrics {
            registry: Registry::default(),
            wal_size: Family::default(),
            position: Family::default(),
            lag: Family::default(),
            last_sync: Family::default(),
            up: Family::default(),
            shipped_bytes: Family::default(),
            segments: Family::default(),
            snapshots: Family::default(),
            errors: Family::default(),
            continuity_lost: Family::default(),
            checkpoints: Family::default(),
            requests: Family::default(),
            request_errors: Family::default(),
            compacted: Family::default(),
            pruned: Family::default(),
            validation_ok: Family::default(),
            validation_time: Family::default(),
            replicas: Mutex::default(),
            follow_position: Family::default(),
            follow_lag: Family::default(),
            follow_applied: Family::default(),
            follow_errors: Family::default(),
            follow_switches: Family::default(),
            followers: Mutex::default(),
        };
        registry.register(
            "follow_position",
            "Position (WAL frames of the generation) a follower has applied",
            m.follow_position.clone(),
        );
        registry.register_with_unit(
            "follow_lag",
            "Time since the newest transaction a follower has applied was committed on the primary",
            Unit::Seconds,
            m.follow_lag.clone(),
        );
        registry.register(
            "follow_applied_objects",
            "Segments, merged objects and snapshots a follower has applied",
            m.follow_applied.clone(),
        );
        registry.register(
            "follow_apply_errors",
            "Failed follower polls or applies (retried)",
            m.follow_errors.clone(),
        );
        registry.register(
            "follow_generation_switches",
            "Times a follower moved to a new generation of the primary",
            m.follow_switches.clone(),
        );
        registry.register(
            "compacted_objects",
            "Merged objects written by compaction",
            m.compacted.clone(),
        );
        registry.register(
            "pruned_objects",
            "Objects deleted by retention and compaction",
            m.pruned.clone(),
        );
        registry.register(
            "validation_ok",
            "1 if the last validation found no fault, 0 otherwise",
            m.validation_ok.clone(),
        );
        registry.register_with_unit(
            "validation_timestamp",
            "Unix time of the last validation",
            Unit::Seconds,
            m.validation_time.clone(),
        );
        registry.register_with_unit(
            "wal_size",
            "Size of the database's WAL file",
            Unit::Bytes,
            m.wal_size.clone(),
        );
        registry.register(
            "shipped_position",
            "Frames of the current generation shipped to the replica",
            m.position.clone(),
        );
        registry.register_with_unit(
            "replication_lag",
            "Time since the replica last held everything committed",
            Unit::Seconds,
            m.lag.clone(),
        );
        registry.register_with_unit(
            "last_sync_timestamp",
            "Unix time of the last complete sync",
            Unit::Seconds,
            m.last_sync.clone(),
        );
        registry.register(
            "replica_up",
            "1 while replicating (or waiting for the database to appear), 0 while failing",
            m.up.clone(),
        );
        registry.register_with_unit(
            "shipped",
            "Bytes of segments and snapshots written to the replica",
            Unit::Bytes,
            m.shipped_bytes.clone(),
        );
        registry.register(
            "segments",
            "Segments written to the replica",
            m.segments.clone(),
        );
        registry.register(
            "snapshots",
            "Snapshots written to the replica",
            m.snapshots.clone(),
        );
        registry.register(
            "sync_errors",
            "Failed replication rounds (retried)",
            m.errors.clone(),
        );
        registry.register(
            "continuity_lost",
            "Times what walstream read no longer provably matched the database (its own connection reported corruption, or the WAL changed under its lock) and a new generation was started",
            m.continuity_lost.clone(),
        );
        registry.register(
            "checkpoints",
            "Checkpoints run by walstream, by mode",
            m.checkpoints.clone(),
        );
        registry.register(
            "storage_requests",
            "Storage requests, by kind",
            m.requests.clone(),
        );
        registry.register(
            "storage_request_errors",
            "Failed storage requests, by kind",
            m.request_errors.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Registers a (database, replica) pair. `max_lag` is how long after its
    /// last complete sync it still counts as ready.
    pub fn replica(&self, db: &str, replica: &str, max_lag: Duration) -> Arc<ReplicaStatus> {
        let l = ReplicaLabels {
            db: db.to_string(),
            replica: replica.to_string(),
        };
        let status = Arc::new(ReplicaStatus {
            db: l.db.clone(),
            replica: l.replica.clone(),
            max_lag,
            state: AtomicU8::new(State::Starting as u8),
            synced_at_ms: AtomicI64::new(0),
            synced_mono: tokio::sync::watch::Sender::new(0),
            pending_frames: Default::default(),
            last_error: Mutex::new(None),
            shipped: Mutex::new(None),
            wal_size: self.wal_size.get_or_create(&l).clone(),
            position: self.position.get_or_create(&l).clone(),
            lag: self.lag.get_or_create(&l).clone(),
            last_sync: self.last_sync.get_or_create(&l).clone(),
            up: self.up.get_or_create(&l).clone(),
            shipped_bytes: self.shipped_bytes.get_or_create(&l).clone(),
            segments: self.segments.get_or_create(&l).clone(),
            snapshots: self.snapshots.get_or_create(&l).clone(),
            errors: self.errors.get_or_create(&l).clone(),
            continuity_lost: self.continuity_lost.get_or_create(&l).clone(),
            compacted: self.compacted.get_or_create(&l).clone(),
            pruned: self.pruned.get_or_create(&l).clone(),
            validation_ok: self.validation_ok.get_or_create(&l).clone(),
            validation_time: self.validation_time.get_or_create(&l).clone(),
            checkpoints: self.checkpoints.clone(),
            requests: self.requests.clone(),
            request_errors: self.request_errors.clone(),
        });
        self.replicas.lock().unwrap().push(status.clone());
        status
    }

    /// Registers a follower of `replica` into the database at `db`;
    /// `ready_lag` is how long after it last caught up it still counts as
    /// ready.
    pub fn follower(&self, db: &str, replica: &str, ready_lag: Duration) -> Arc<FollowStatus> {
        let l = ReplicaLabels {
            db: db.to_string(),
            replica: replica.to_string(),
        };
        let status = Arc::new(FollowStatus {
            db: db.to_string(),
            replica: replica.to_string(),
            ready_lag,
            caught_up_at_ms: AtomicI64::new(0),
            applied_ms: AtomicI64::new(0),
            generation: Mutex::default(),
            position: self.follow_position.get_or_create(&l).clone(),
            lag: self.follow_lag.get_or_create(&l).clone(),
            applied: self.follow_applied.get_or_create(&l).clone(),
            errors: self.follow_errors.get_or_create(&l).clone(),
            switches: self.follow_switches.get_or_create(&l).clone(),
        });
        self.followers.lock().unwrap().push(status.clone());
        status
    }

    /// The registry in Prometheus/OpenMetrics text format.
    pub fn render(&self) -> String {
        let now = Utc::now().timestamp_millis();
        for r in self.replicas.lock().unwrap().iter() {
            r.lag.set(r.lag_at(now).as_secs_f64());
        }
        for f in self.followers.lock().unwrap().iter() {
            f.lag.set(f.lag_at(now).as_secs_f64());
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Every registered replica, in registration order.
    pub fn replicas(&self) -> Vec<Arc<ReplicaStatus>> {
        self.replicas.lock().unwrap().clone()
    }

    /// A table of every replica (database, replica, state, generation,
    /// position, segments and bytes shipped, errors, lag): what `walstream
    /// status` prints.
    pub fn status_text(&self) -> String {
        let now = Utc::now().timestamp_millis();
        let mut out = format!(
            "{:<40} {:<40} {:<11} {:<22} {:>9} {:>8} {:>12} {:>6} {:>8}\n",
            "database",
            "replica",
            "state",
            "generation",
            "position",
            "segments",
            "bytes",
            "errors",
            "lag"
        );
        for r in self.replicas() {
            let s = r.summary(now);
            out.push_str(&format!(
                "{:<40} {:<40} {:<11} {:<22} {:>9} {:>8} {:>12} {:>6} {:>7.1}s\n",
                r.db,
                r.replica,
                s.state.as_str(),
                s.generation.as_deref().unwrap_or("-"),
                s.position.map_or("-".into(), |p| p.to_string()),
                s.segments,
                s.bytes,
                s.errors,
                s.lag.as_secs_f64()
            ));
        }
        out
    }

    /// `Ok` when every replica is ready; otherwise one line per replica that
    /// is not, saying why.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let now = Utc::now().timestamp_millis();
        let faults: Vec<String> = self
            .replicas
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| r.not_ready(now))
            .chain(
                self.followers
                    .lock()
                    .unwrap()
                    .iter()
                    .filter_map(|f| f.not_ready(now)),
            )
            .collect();
        if faults.is_empty() {
            Ok(())
        } else {
            Err(faults)
        }
    }
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Waiting => "waiting",
            State::Replicating => "replicating",
            State::Failing => "failing",
            State::Idle => "idle",
            State::LeaseLost => "lease lost",
        }
    }
}

/// A replica's running totals, for `walstream status` and the daemon's
/// periodic summary line.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub state: State,
    pub generation: Option<String>,
    pub position: Option<u64>,
    pub segments: u64,
    pub snapshots: u64,
    pub bytes: u64,
    pub errors: u64,
    pub lag: Duration,
}

impl ReplicaStatus {
    pub fn summary(&self, now_ms: i64) -> Summary {
        let shipped = self.shipped();
        Summary {
            state: self.state(),
            position: shipped.as_ref().map(|s| s.1),
            generation: shipped.map(|s| s.0),
            segments: self.segments.get(),
            snapshots: self.snapshots.get(),
            bytes: self.shipped_bytes.get(),
            errors: self.errors.get(),
            lag: self.lag_at(now_ms),
        }
    }

    /// A status that belongs to no registry (library use and tests).
    pub fn detached(db: &str, replica: &str) -> Arc<ReplicaStatus> {
        Metrics::new().replica(db, replica, Duration::from_secs(10))
    }

    pub fn state(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            1 => State::Waiting,
            2 => State::Replicating,
            3 => State::Failing,
            4 => State::Idle,
            5 => State::LeaseLost,
            _ => State::Starting,
        }
    }

    pub fn set_state(&self, s: State) {
        self.state.store(s as u8, Ordering::Relaxed);
        self.up
            .set(matches!(s, State::Waiting | State::Replicating | State::Idle) as i64);
        if s == State::Failing {
            self.errors.inc();
        }
    }

    /// Everything committed at `at_ms` is on the replica.
    pub fn synced(&self, at_ms: i64, wal_size: u64, position: u64) {
        self.synced_at_ms.store(at_ms, Ordering::Relaxed);
        self.last_sync.set(at_ms as f64 / 1000.0);
        self.wal_size.set(wal_size as i64);
        self.position.set(position as i64);
    }

    /// Continuity with the database was lost; a new generation follows.
    pub fn continuity_lost(&self) {
        self.continuity_lost.inc();
    }

    /// Everything up to `position` of `generation` is on the replica.
    /// Everything committed before the round that began at `began_mono`
    /// (see [`mono_us`]) is on the replica.
    pub fn synced_mono(&self, began_mono: u64) {
        self.synced_mono.send_if_modified(|s| {
            let newer = began_mono > *s;
            if newer {
                *s = began_mono;
            }
            newer
        });
        *self.last_error.lock().unwrap() = None;
    }

    /// Watches the start ([`mono_us`]) of the last round after which
    /// everything committed was on the replica.
    pub fn watch_synced(&self) -> tokio::sync::watch::Receiver<u64> {
        self.synced_mono.subscribe()
    }

    pub fn set_pending(&self, frames: u64) {
        self.pending_frames.store(frames, Ordering::Relaxed);
    }

    /// WAL frames read and not yet on the replica.
    pub fn pending(&self) -> u64 {
        self.pending_frames.load(Ordering::Relaxed)
    }

    pub fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap() = Some(e);
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap().clone()
    }

    /// The WAL's size at the last sync.
    pub fn wal_size(&self) -> u64 {
        self.wal_size.get().max(0) as u64
    }

    /// When the last complete sync began (ms since the epoch; 0: never).
    pub fn synced_at_ms(&self) -> i64 {
        self.synced_at_ms.load(Ordering::Relaxed)
    }

    /// How long since the last complete sync.
    pub fn lag(&self) -> Duration {
        self.lag_at(Utc::now().timestamp_millis())
    }

    pub fn set_shipped(&self, generation: &str, position: u64) {
        let mut s = self.shipped.lock().unwrap();
        match s.as_mut() {
            Some((g, p)) if g == generation => *p = position,
            _ => *s = Some((generation.to_string(), position)),
        }
    }

    /// The generation being shipped and the position in it up to which
    /// everything is on the replica, if anything was shipped.
    pub fn shipped(&self) -> Option<(String, u64)> {
        self.shipped.lock().unwrap().clone()
    }

    pub fn shipped_segment(&self, bytes: u64) {
        self.segments.inc();
        self.shipped_bytes.inc_by(bytes);
    }

    pub fn shipped_snapshot(&self, bytes: u64) {
        self.snapshots.inc();
        self.shipped_bytes.inc_by(bytes);
    }

    pub fn compacted(&self, created: u64, deleted: u64) {
        self.compacted.inc_by(created);
        self.pruned.inc_by(deleted);
    }

    pub fn pruned(&self, deleted: u64) {
        self.pruned.inc_by(deleted);
    }

    pub fn validated(&self, ok: bool) {
        self.validation_ok.set(ok as i64);
        self.validation_time
            .set(Utc::now().timestamp_millis() as f64 / 1000.0);
    }

    pub fn checkpoint(&self, mode: &str) {
        let l = ModeLabels {
            db: self.db.clone(),
            replica: self.replica.clone(),
            mode: mode.to_string(),
        };
        self.checkpoints.get_or_create(&l).inc();
    }

    /// One storage request of `kind` (put, get, list, delete).
    pub fn request(&self, kind: &str, ok: bool) {
        let l = self.kind(kind);
        self.requests.get_or_create(&l).inc();
        if !ok {
            self.request_errors.get_or_create(&l).inc();
        }
    }

    fn kind(&self, kind: &str) -> KindLabels {
        KindLabels {
            db: self.db.clone(),
            replica: self.replica.clone(),
            kind: kind.to_string(),
        }
    }

    fn lag_at(&self, now_ms: i64) -> Duration {
        match self.state() {
            State::Waiting | State::Idle => Duration::ZERO,
            _ => match self.synced_at_ms.load(Ordering::Relaxed) {
                0 => Duration::ZERO,
                t => Duration::from_millis(now_ms.saturating_sub(t).max(0) as u64),
            },
        }
    }

    pub fn not_ready(&self, now_ms: i64) -> Option<String> {
        let who = format!("{} -> {}", self.db, self.replica);
        match self.state() {
            State::Waiting | State::Idle => None,
            State::LeaseLost => Some(format!(
                "{who}: lost the replica's lease to another process; writing nothing more"
            )),
            State::Starting if self.synced_at_ms.load(Ordering::Relaxed) == 0 => {
                Some(format!("{who}: starting"))
            }
            _ if self.synced_at_ms.load(Ordering::Relaxed) == 0 => {
                Some(format!("{who}: never synced"))
            }
            _ => {
                let lag = self.lag_at(now_ms);
                (lag > self.max_lag).then(|| {
                    format!(
                        "{who}: last complete sync {:.1}s ago (allowed {:.1}s){}",
                        lag.as_secs_f64(),
                        self.max_lag.as_secs_f64(),
                        if self.state() == State::Failing {
                            ", failing"
                        } else {
                            ""
                        }
                    )
                })
            }
        }
    }
}

/// A follower's state (`restore --follow`), for `/metrics` and `/readyz`.
pub struct FollowStatus {
    pub db: String,
    pub replica: String,
    ready_lag: Duration,
    /// When a poll last found nothing newer to apply (ms since the epoch; 0
    /// = not yet): everything shipped before it is applied.
    caught_up_at_ms: AtomicI64,
    /// Commit time on the primary of the newest state applied.
    applied_ms: AtomicI64,
    generation: Mutex<Option<String>>,
    position: Gauge,
    lag: FloatGauge,
    applied: Counter,
    errors: Counter,
    switches: Counter,
}

impl std::fmt::Debug for FollowStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowStatus")
            .field("db", &self.db)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl FollowStatus {
    /// A status registered nowhere (tests, library use without metrics).
    pub fn detached(db: &str, replica: &str) -> Arc<FollowStatus> {
        Metrics::new().follower(db, replica, Duration::from_secs(10))
    }

    /// The state after applying an object: its generation, position and the
    /// primary's commit time.
    pub fn applied(&self, generation: &str, position: u64, timestamp_ms: i64) {
        let mut g = self.generation.lock().unwrap();
        if g.as_deref() != Some(generation) {
            *g = Some(generation.to_string());
        }
        self.position.set(position as i64);
        self.applied_ms.store(timestamp_ms, Ordering::Relaxed);
        self.applied.inc();
    }

    pub fn switched(&self) {
        self.switches.inc();
    }

    pub fn caught_up(&self, at_ms: i64) {
        self.caught_up_at_ms.store(at_ms, Ordering::Relaxed);
    }

    pub fn error(&self) {
        self.errors.inc();
    }

    pub fn errors(&self) -> u64 {
        self.errors.get()
    }

    pub fn generation(&self) -> Option<String> {
        self.generation.lock().unwrap().clone()
    }

    /// Now minus the commit time of the newest transaction applied.
    pub fn lag_at(&self, now_ms: i64) -> Duration {
        match self.applied_ms.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            t => Duration::from_millis(now_ms.saturating_sub(t).max(0) as u64),
        }
    }

    pub fn not_ready(&self, now_ms: i64) -> Option<String> {
        let who = format!("{} <- {}", self.db, self.replica);
        match self.caught_up_at_ms.load(Ordering::Relaxed) {
            0 => Some(format!("{who}: not caught up yet")),
            t => {
                let since = Duration::from_millis(now_ms.saturating_sub(t).max(0) as u64);
                (since > self.ready_lag).then(|| {
                    format!(
                        "{who}: last caught up {:.1}s ago (allowed {:.1}s)",
                        since.as_secs_f64(),
                        self.ready_lag.as_secs_f64()
                    )
                })
            }
        }
    }
}

/// Microseconds on the monotonic clock since the first call: the order of
/// rounds and requests within this process, whatever the wall clock does.
pub fn mono_us() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_judges_readiness() {
        let m = Metrics::new();
        let r = m.replica("/data/app.db", "file:///backup", Duration::from_secs(5));
        assert!(m.readiness().is_err(), "not ready before the first sync");
        r.set_state(State::Replicating);
        let now = Utc::now().timestamp_millis();
        r.synced(now, 4096, 12);
        r.shipped_segment(100);
        r.checkpoint("passive");
        r.request("put", true);
        r.request("put", false);
        assert!(m.readiness().is_ok());
        let text = m.render();
        for needle in [
            "walstream_segments_total{db=\"/data/app.db\",replica=\"file:///backup\"} 1",
            "walstream_wal_size_bytes{",
            "walstream_shipped_position{",
            "walstream_checkpoints_total{db=\"/data/app.db\",replica=\"file:///backup\",mode=\"passive\"} 1",
            "walstream_storage_request_errors_total{db=\"/data/app.db\",replica=\"file:///backup\",kind=\"put\"} 1",
            "walstream_storage_requests_total{db=\"/data/app.db\",replica=\"file:///backup\",kind=\"put\"} 2",
            "walstream_replication_lag_seconds{",
        ] {
            assert!(text.contains(needle), "{needle} not in\n{text}");
        }
        r.synced(now - 6000, 4096, 12);
        let faults = m.readiness().unwrap_err();
        assert!(faults[0].contains("file:///backup"), "{faults:?}");
        r.set_state(State::Waiting);
        assert!(m.readiness().is_ok(), "a database not yet created is ready");
    }
}

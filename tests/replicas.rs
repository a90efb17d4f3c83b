//! Several replicas of one database (issue 17): one source reads the WAL once
//! and holds one read lock, so a second or third replica must not let the WAL
//! grow past the one-replica bound, and a replica whose storage is down must
//! not hold back the others or the WAL.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Inserts rows (ids 1, 2, ...) as fast as it can, or with `pause` between
/// commits, and tracks the largest WAL file it has seen.
struct Writer {
    committed: Arc<AtomicI64>,
    wal_peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(db: &Path, pause: Duration) -> Writer {
        let committed = Arc::new(AtomicI64::new(0));
        let wal_peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, p2, s2, db) = (
            committed.clone(),
            wal_peak.clone(),
            stop.clone(),
            db.to_path_buf(),
        );
        let wal = PathBuf::from(format!("{}-wal", db.display()));
        let thread = std::thread::spawn(move || {
            let c = app(&db);
            let mut id: i64 = c
                .query_row("SELECT coalesce(max(id), 0) FROM t", [], |r| r.get(0))
                .unwrap();
            let mut rng = Rng::new(id as u64 + 1);
            while !s2.load(Ordering::Relaxed) {
                id += 1;
                let size = if rng.below(20) == 0 { 9000 } else { 200 };
                c.execute(
                    "INSERT INTO t VALUES (?1, ?2)",
                    rusqlite::params![id, rng.bytes(size)],
                )
                .unwrap();
                c2.store(id, Ordering::SeqCst);
                let len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
                p2.fetch_max(len, Ordering::Relaxed);
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
        });
        Writer {
            committed,
            wal_peak,
            stop,
            thread: Some(thread),
        }
    }

    fn committed(&self) -> i64 {
        self.committed.load(Ordering::SeqCst)
    }

    fn wal_peak(&self) -> u64 {
        self.wal_peak.load(Ordering::Relaxed)
    }

    fn finish(mut self) -> (i64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        (self.committed(), self.wal_peak())
    }
}

/// A database with table `t`, and a config replicating it to `names`
/// directory replicas (`replica_extra` lines, indented by 8, for each) with
/// the small WAL bounds of the replication tests.
fn setup(names: &[&str], replica_extra: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let c = app(&db);
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    drop(c);
    let mut cfg = format!(
        "dbs:\n  - path: {}\n    monitor-interval: 100ms\n    min-checkpoint-page-count: 100\n    max-checkpoint-page-count: 400\n    replicas:\n",
        db.display()
    );
    for n in names {
        cfg.push_str(&format!(
            "      - url: file://{}\n{replica_extra}",
            dir.path().join(n).display()
        ));
    }
    let path = dir.path().join("w.yml");
    std::fs::write(&path, cfg).unwrap();
    (dir, db, path)
}

/// Restores `replica` and checks it is a state the source had (ids 1..n)
/// with at least `at_least` rows; returns n.
fn restored_rows(replica: &Path, out: &Path, at_least: i64) -> i64 {
    let _ = std::fs::remove_file(out);
    restore_ok(replica, out, &[]);
    let c = rusqlite::Connection::open(out).unwrap();
    let (n, max): (i64, i64) = c
        .query_row("SELECT count(*), coalesce(max(id), 0) FROM t", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(n, max, "{}: restored ids have a gap", replica.display());
    assert!(
        n >= at_least,
        "{}: restored {n} rows, expected at least {at_least}",
        replica.display()
    );
    n
}

/// The WAL bound `wal_stays_bounded_under_steady_load` holds one replica to
/// (3 x max-checkpoint-page-count frames of 4 KiB pages).
const ONE_REPLICA_BOUND: u64 = 3 * 400 * 4120;

fn several_replicas_under_a_steady_writer(n: usize) {
    let names: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
    let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let (dir, db, cfg) = setup(&names, "");
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    // The steady load of the one-replica test (a commit every 3 ms, as
    // fast as the machine allows in between).
    let writer = Writer::start(&db, Duration::from_millis(3));
    std::thread::sleep(Duration::from_secs(8));
    let (committed, peak) = writer.finish();
    w.wait_quiet();
    let log = w.stop();
    eprintln!("{n} replicas: {committed} transactions, WAL peak {peak} bytes");
    assert!(
        peak < ONE_REPLICA_BOUND,
        "with {n} replicas the WAL grew to {peak} bytes (one-replica bound {ONE_REPLICA_BOUND})"
    );
    assert_eq!(
        log.matches("starting new generation").count(),
        n,
        "one generation per replica:\n{log}"
    );
    for name in names {
        let out = dir.path().join(format!("{name}.db"));
        assert_eq!(
            restored_rows(&dir.path().join(name), &out, committed),
            committed
        );
        assert_same(&db, &out);
    }
}

#[test]
fn two_replicas_keep_the_wal_within_the_one_replica_bound() {
    several_replicas_under_a_steady_writer(2);
}

#[test]
fn three_replicas_keep_the_wal_within_the_one_replica_bound() {
    several_replicas_under_a_steady_writer(3);
}

/// Makes a directory replica unusable (a file where its directory was) and
/// returns a closure that puts it back.
fn break_replica(replica: &Path) -> impl FnOnce() {
    let saved = replica.with_extension("saved");
    std::fs::rename(replica, &saved).unwrap();
    std::fs::write(replica, "in the way").unwrap();
    let replica = replica.to_path_buf();
    move || {
        std::fs::remove_file(&replica).unwrap();
        std::fs::rename(&saved, &replica).unwrap();
    }
}

/// Waits until `replica` restores at least `rows` rows.
fn wait_restorable(replica: &Path, out: &Path, rows: i64, timeout: Duration) -> i64 {
    let deadline = Instant::now() + timeout;
    loop {
        let n = restored_rows(replica, out, 0);
        if n >= rows {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{} stayed at {n} rows, expected {rows}",
            replica.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One replica's storage goes down while the application writes: the other
/// keeps its usual lag, the WAL stays within the one-replica bound, and the
/// broken one catches up once its storage is back.
fn one_replica_down(extra: &str) -> String {
    let (dir, db, cfg) = setup(&["good", "bad"], extra);
    let (good, bad) = (dir.path().join("good"), dir.path().join("bad"));
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    let writer = Writer::start(&db, Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(500));
    let repair = break_replica(&bad);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(700));
        // Everything committed now reaches the healthy replica within its
        // sync-interval plus a round or two.
        let committed = writer.committed();
        wait_restorable(
            &good,
            &dir.path().join("good-during.db"),
            committed,
            Duration::from_secs(3),
        );
    }
    w.wait_for("will retry", Duration::from_secs(5));
    repair();
    // It catches up while the application goes on writing.
    let committed = writer.committed();
    wait_restorable(
        &bad,
        &dir.path().join("bad-after.db"),
        committed,
        Duration::from_secs(40),
    );
    let (committed, peak) = writer.finish();
    w.wait_quiet();
    let log = w.stop();
    assert!(
        peak < ONE_REPLICA_BOUND,
        "with one replica down the WAL grew to {peak} bytes (one-replica bound {ONE_REPLICA_BOUND})"
    );
    for (name, replica) in [("good", &good), ("bad", &bad)] {
        let out = dir.path().join(format!("{name}.db"));
        assert_eq!(restored_rows(replica, &out, committed), committed, "{name}");
        assert_same(&db, &out);
    }
    log
}

#[test]
fn one_replica_down_does_not_hold_back_the_other_or_the_wal() {
    let log = one_replica_down("");
    // The outage was short: the broken replica kept what it had not stored
    // and continued its generation.
    assert_eq!(log.matches("starting new generation").count(), 2, "{log}");
}

#[test]
fn a_replica_down_past_max_pending_starts_over_when_back() {
    let log = one_replica_down("        max-pending: 64KiB\n");
    assert!(log.contains("max-pending"), "{log}");
    let restarted = log
        .lines()
        .filter(|l| l.contains("starting new generation") && l.contains("max-pending"))
        .count();
    assert!(
        restarted >= 1,
        "no new generation after max-pending:\n{log}"
    );
}

//! Reliability: crashes of walstream and of the application, under load.
//!
//! CI runs a few iterations of each loop; the soak mode runs many:
//! `WALSTREAM_SOAK_ITERATIONS=50 cargo test --release --test reliability -- --nocapture`.
//! Every iteration restores and checks that the result is a state the source
//! really had (each transaction inserts exactly the next id, so a real state
//! is a prefix 1..m with no gaps) and contains every transaction acknowledged
//! as shipped before the kill.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn iterations(ci: usize) -> usize {
    std::env::var("WALSTREAM_SOAK_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci)
}

/// A writer thread committing one row per transaction, as fast as `pause`
/// allows; `committed` is the highest id committed.
struct Writer {
    committed: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(db: &Path, pause: Duration) -> Writer {
        let committed = Arc::new(AtomicI64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, s2, db) = (committed.clone(), stop.clone(), db.to_path_buf());
        let thread = std::thread::spawn(move || {
            let c = app(&db);
            c.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)")
                .unwrap();
            let mut id: i64 = c
                .query_row("SELECT coalesce(max(id), 0) FROM t", [], |r| r.get(0))
                .unwrap();
            let mut rng = Rng::new(id as u64 + 1);
            while !s2.load(Ordering::Relaxed) {
                id += 1;
                let size = if rng.below(20) == 0 { 9000 } else { 100 };
                c.execute(
                    "INSERT INTO t VALUES (?1, ?2)",
                    rusqlite::params![id, rng.bytes(size as usize)],
                )
                .unwrap();
                c2.store(id, Ordering::SeqCst);
                std::thread::sleep(pause);
            }
        });
        Writer {
            committed,
            stop,
            thread: Some(thread),
        }
    }

    fn committed(&self) -> i64 {
        self.committed.load(Ordering::SeqCst)
    }

    fn finish(mut self) -> i64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.committed()
    }
}

/// Restores `replica` and checks the result is a real state (ids 1..m, no
/// gap) with at least `acked` rows; returns m.
fn check_restore(replica: &Path, out: &Path, acked: i64) -> i64 {
    restore_ok(replica, out, &[]);
    let c = rusqlite::Connection::open(out).unwrap();
    let (n, max): (i64, i64) = c
        .query_row("SELECT count(*), coalesce(max(id), 0) FROM t", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(
        n, max,
        "restored ids have a gap: not a state the source had"
    );
    assert!(
        n >= acked,
        "lost acknowledged transactions: restored {n}, acknowledged {acked}"
    );
    n
}

/// Waits until everything committed now is reported shipped: two new
/// "shipped segment" lines; the second comes from a round that began after
/// this call, and a round ships everything committed before it began.
fn ack(w: &Replicating, committed: i64) -> i64 {
    let before = w.count("shipped segment");
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.count("shipped segment") < before + 2 {
        assert!(Instant::now() < deadline, "nothing shipped:\n{}", w.log());
        std::thread::sleep(Duration::from_millis(2));
    }
    committed
}

/// The soak's configuration, with `extra` settings for the replica (lines
/// indented by 8).
fn config_with(dir: &Path, db: &Path, replica: &Path, extra: &str) -> PathBuf {
    let cfg = dir.join("walstream.yml");
    std::fs::write(
        &cfg,
        format!(
            "dbs:\n  - path: {}\n    monitor-interval: 200ms\n    min-checkpoint-page-count: 100\n    max-checkpoint-page-count: 400\n    replicas:\n      - path: {}\n        snapshot-interval: 2s\n{extra}",
            db.display(),
            replica.display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn kill_9_loop_under_load_loses_nothing_acknowledged() {
    kill_9_loop("", 6);
}

/// With a sync-interval, transactions read so that the read lock could move
/// are held in memory until the next upload, and the WAL may be rewound
/// meanwhile: a kill then must cost a new generation, never a transaction.
#[test]
fn kill_9_loop_with_a_sync_interval_loses_nothing_acknowledged() {
    kill_9_loop("        sync-interval: 150ms\n", 4);
}

fn kill_9_loop(extra: &str, ci_rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let cfg = config_with(dir.path(), &db, &replica, extra);
    let writer = Writer::start(&db, Duration::from_millis(2));
    let mut rng = Rng::new(42);
    let n = iterations(ci_rounds);
    let (mut generations, mut checked) = (0, 0);
    let started = Instant::now();
    for i in 0..n {
        let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
        if w.count("starting new generation") > 0 {
            generations += 1;
        }
        std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        let acked = ack(&w, writer.committed());
        // Kill at a random point: mid-upload, mid-checkpoint, mid-snapshot.
        std::thread::sleep(Duration::from_micros(rng.below(30_000)));
        w.kill();
        let out = dir.path().join(format!("round{i}.db"));
        let m = check_restore(&replica, &out, acked);
        checked += m;
        std::fs::remove_file(&out).unwrap();
    }
    let last = writer.finish();
    // Finally everything committed arrives.
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    w.wait_quiet();
    w.stop();
    let out = dir.path().join("final.db");
    assert_eq!(check_restore(&replica, &out, last), last);
    assert_same(&db, &out);
    eprintln!(
        "soak: {n} kill -9 rounds in {:.0}s, {generations} new generations, {last} transactions committed, {checked} rows checked across restores, lost: 0",
        started.elapsed().as_secs_f64()
    );
}

/// The application is killed in the middle of a transaction large enough to
/// spill uncommitted frames into the WAL: none of it may reach a restore.
#[test]
fn application_killed_mid_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    {
        let c = app(&db);
        c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        c.execute("INSERT INTO t VALUES (1, x'00')", []).unwrap();
    }
    let w = Replicating::db(&db, &replica);
    for round in 0..iterations(3) {
        let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "helper_uncommitted_writer",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("WALSTREAM_HELPER_DB", &db)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait until it has spilled uncommitted pages into the WAL.
        let mut out = std::io::BufReader::new(helper.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("SPILLED") {
            line.clear();
            assert!(
                std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
                "helper died"
            );
        }
        std::thread::sleep(Duration::from_millis(300));
        helper.kill().unwrap();
        helper.wait().unwrap();
        // A later committed transaction from another connection.
        let c = app(&db);
        c.execute("INSERT INTO t VALUES (?1, x'01')", [2 + round as i64])
            .unwrap();
        drop(c);
        w.wait_quiet();
        let out = dir.path().join(format!("restored{round}.db"));
        restore_ok(&replica, &out, &[]);
        assert_same(&db, &out);
        let n: i64 = rusqlite::Connection::open(&out)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2 + round as i64, "uncommitted rows were restored");
    }
    w.stop();
}

/// Not a test on its own: the application process that
/// `application_killed_mid_transaction` starts and kills.
#[test]
#[ignore]
fn helper_uncommitted_writer() {
    let Ok(db) = std::env::var("WALSTREAM_HELPER_DB") else {
        return;
    };
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    // A tiny page cache makes SQLite write dirty pages of the open
    // transaction into the WAL before commit.
    c.pragma_update(None, "cache_size", 10).unwrap();
    c.execute_batch("BEGIN IMMEDIATE").unwrap();
    for i in 0..2000 {
        c.execute("INSERT INTO t VALUES (?1, zeroblob(2000))", [1_000_000 + i])
            .unwrap();
    }
    println!("SPILLED");
    std::thread::sleep(Duration::from_secs(60));
}

/// A crash of a store that is not atomic (or a torn disk write) can leave the
/// newest object half written. walstream must not trust it: it starts a new
/// generation instead of continuing after garbage, and restores stay exact.
#[test]
fn a_torn_newest_object_starts_a_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let mut c = app(&db);
    create_items(&c);
    let mut rng = Rng::new(5);
    let w = Replicating::db(&db, &replica);
    for _ in 0..20 {
        random_txn(&mut c, &mut rng);
    }
    w.wait_quiet();
    w.stop();
    // Tear the newest segment in place, as a crash mid-write would.
    let mut segs: Vec<PathBuf> = std::fs::read_dir(
        std::fs::read_dir(replica.join("generations"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("segments"),
    )
    .unwrap()
    .map(|e| e.unwrap().path())
    .collect();
    segs.sort();
    let newest = segs.pop().unwrap();
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    // Also a temporary object of an interrupted write.
    std::fs::write(
        newest.with_file_name(".0000000000000099.segment.tmp"),
        b"half",
    )
    .unwrap();
    let w = Replicating::db(&db, &replica);
    for _ in 0..5 {
        random_txn(&mut c, &mut rng);
    }
    w.wait_quiet();
    let log = w.stop();
    assert!(log.contains("starting new generation"), "{log}");
    let out = dir.path().join("out.db");
    restore_ok(&replica, &out, &[]);
    assert_same(&db, &out);
}

/// Every kind of storage fault at once, a quarter of all requests, while
/// the application writes and snapshots are taken; then restores through
/// the same faults. Nothing is lost and the result is exact.
#[test]
fn storage_faults_of_every_kind_lose_nothing() {
    use common::faultproxy::FaultProxy;
    use common::s3server::{S3Server, AK, BUCKET, SK};
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let cfg = dir.path().join("s3.yml");
    let per_mille: u32 = std::env::var("WALSTREAM_FAULT_PER_MILLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    std::fs::write(
        &cfg,
        format!(
            "dbs:\n  - path: {}\n    monitor-interval: 200ms\n    replicas:\n      - type: s3\n        bucket: {BUCKET}\n        path: faults\n        endpoint: http://{}\n        region: us-east-1\n        force-path-style: true\n        access-key-id: {AK}\n        secret-access-key: {SK}\n        sync-interval: 100ms\n        snapshot-interval: 500ms\n",
            db.display(),
            proxy.addr
        ),
    )
    .unwrap();
    let mut c = app(&db);
    create_items(&c);
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    proxy.rates.set_all(per_mille);
    let mut rng = Rng::new(99);
    let rounds = iterations(1) * 300;
    for _ in 0..rounds {
        random_txn(&mut c, &mut rng);
        std::thread::sleep(Duration::from_millis(10));
    }
    // Catch up with faults still on, then stop.
    w.wait_quiet();
    std::thread::sleep(Duration::from_millis(500));
    w.wait_quiet();
    let log = w.stop();
    let injected = proxy.injected.summary();
    assert!(proxy.injected.faults() > 5, "{injected}\n{log}");
    // Restore through the faults too (bodies cut short, 503s, resets).
    let out = dir.path().join("restored.db");
    let o = walstream(&[
        "restore",
        "--config",
        cfg.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        db.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "{}\n{injected}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_same(&db, &out);
    let verify = walstream(&[
        "verify",
        "--config",
        cfg.to_str().unwrap(),
        db.to_str().unwrap(),
    ]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let i = &proxy.injected;
    for (kind, n) in [
        ("InternalError", &i.internal_error),
        ("SlowDown", &i.slow_down),
        ("reset", &i.reset),
        ("delay", &i.delay),
        ("cut body", &i.cut_body),
    ] {
        assert!(
            n.load(std::sync::atomic::Ordering::SeqCst) > 0,
            "no {kind}: {}",
            i.summary()
        );
    }
    eprintln!("soak: storage faults: {}", proxy.injected.summary());
}

//! `walstream restore --follow` (issue 19): a follower's copy is readable by
//! any SQLite client at every instant and always holds a state the primary
//! had; it survives generation switches, compaction, retention, storage
//! faults and its own kill -9; and it can be promoted to primary.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A running `walstream restore --follow`, its stderr in a file.
struct Follower {
    child: Child,
    log: PathBuf,
}

impl Follower {
    fn start(out: &Path, replica: &str, extra: &[&str], log: &Path) -> Follower {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(bin())
            .args(["restore", "--follow", "-o"])
            .arg(out)
            .args(extra)
            .arg(replica)
            .env("RUST_LOG", "walstream=debug")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let f = Follower {
            child,
            log: log.to_path_buf(),
        };
        f.wait_for("following|resuming follow", Duration::from_secs(30));
        f
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for(&self, alternatives: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !alternatives.split('|').any(|a| self.log().contains(a)) {
            assert!(
                Instant::now() < deadline,
                "follower never logged {alternatives:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) -> String {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = wait_timeout(&mut self.child, Duration::from_secs(10));
        assert!(st.success(), "follower exited with {st:?}:\n{}", self.log());
        self.log()
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python() -> PathBuf {
    std::env::var_os("WALSTREAM_SYSTEM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/python3"))
}

/// A ledger kept by the system python3's sqlite3 module with a connection
/// per transaction: ten accounts whose balances always sum to zero, and a
/// journal with one row per transfer whose count `meta.n` always equals.
const WRITER: &str = r#"
import os, random, sqlite3, sys, time
db, stop = sys.argv[1], sys.argv[2]
c = sqlite3.connect(db, timeout=30, isolation_level=None)
c.execute("PRAGMA journal_mode=WAL")
c.execute("CREATE TABLE IF NOT EXISTS account(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
c.execute("CREATE TABLE IF NOT EXISTS journal(id INTEGER PRIMARY KEY, amount INTEGER, note BLOB)")
c.execute("CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, n INTEGER)")
c.execute("BEGIN")
if c.execute("SELECT count(*) FROM account").fetchone()[0] == 0:
    c.executemany("INSERT INTO account VALUES (?, 0)", [(i,) for i in range(10)])
    c.execute("INSERT INTO meta VALUES ('n', 0)")
c.execute("COMMIT")
c.close()
rng = random.Random(int(sys.argv[3]))
done = 0
while not os.path.exists(stop):
    c = sqlite3.connect(db, timeout=30, isolation_level=None)
    c.execute("BEGIN IMMEDIATE")
    a, b = rng.sample(range(10), 2)
    amount = rng.randint(1, 1000)
    c.execute("UPDATE account SET balance = balance - ? WHERE id = ?", (amount, a))
    c.execute("UPDATE account SET balance = balance + ? WHERE id = ?", (amount, b))
    c.execute("INSERT INTO journal(amount, note) VALUES (?, randomblob(?))", (amount, rng.randint(10, 3000)))
    c.execute("UPDATE meta SET n = n + 1 WHERE k = 'n'")
    c.execute("COMMIT")
    c.close()
    done += 1
    time.sleep(0.002)
print(done)
"#;

/// Reads the follower's copy over and over (read-only, a connection per
/// read and one long-lived), checking the ledger's invariants inside each
/// read transaction; prints "checks violations errors first_error".
const READER: &str = r#"
import os, sqlite3, sys
db, stop = sys.argv[1], sys.argv[2]
checks = violations = errors = 0
first = ""
long = None
i = 0
while not os.path.exists(stop):
    i += 1
    try:
        if i % 2 == 0:
            if long is None:
                long = sqlite3.connect("file:%s?mode=ro" % db, uri=True, timeout=30, isolation_level=None)
            c = long
        else:
            c = sqlite3.connect("file:%s?mode=ro" % db, uri=True, timeout=30, isolation_level=None)
        c.execute("BEGIN")
        total, accounts = c.execute("SELECT sum(balance), count(*) FROM account").fetchone()
        n = c.execute("SELECT n FROM meta WHERE k = 'n'").fetchone()[0]
        rows = c.execute("SELECT count(*) FROM journal").fetchone()[0]
        if i % 50 == 0:
            ok = c.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                violations += 1
                first = first or ("quick_check: %s" % ok)
        c.execute("COMMIT")
        if c is not long:
            c.close()
        checks += 1
        if total != 0 or accounts != 10 or rows != n:
            violations += 1
            first = first or ("sum %s accounts %s journal %s n %s" % (total, accounts, rows, n))
    except Exception as e:
        errors += 1
        first = first or ("%s: %s" % (type(e).__name__, e))
        long = None
print(checks, violations, errors, repr(first))
"#;

fn spawn_py(script: &str, args: &[&Path], seed: u64) -> Child {
    Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .arg(seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3")
}

fn finish_py(child: Child) -> String {
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The journal's row count, read as any reader would.
fn journal_rows(db: &Path) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.query_row("SELECT count(*) FROM journal", [], |r| r.get(0))
        .unwrap()
}

/// Waits until the follower's copy holds as many journal rows as the
/// primary (everything shipped has been applied).
fn wait_caught_up(primary: &Path, copy: &Path, follower: &Follower) {
    let want = journal_rows(primary);
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal_rows(copy) != want {
        assert!(
            Instant::now() < deadline,
            "follower stuck at {} of {want} rows:\n{}",
            journal_rows(copy),
            follower.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn has_python() -> bool {
    let ok = python().exists();
    if !ok {
        assert!(
            std::env::var_os("WALSTREAM_REQUIRE_REAL_CLIENTS").is_none(),
            "no {} but real clients are required",
            python().display()
        );
        eprintln!("skipped: no {}", python().display());
    }
    ok
}

/// Readers hammer the copy through thousands of applied segments, a
/// generation switch on the primary (a checkpoint while walstream was down)
/// and a kill -9 of the follower: never an error, never a broken invariant,
/// and the copy ends equal to the primary.
#[test]
fn readers_see_only_whole_states_through_switches_and_kills() {
    if !has_python() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let replica = dir.path().join("replica");
    let copy = dir.path().join("copy.db");
    let stop_writer = dir.path().join("stop-writer");
    let stop_reader = dir.path().join("stop-reader");
    let flog = dir.path().join("follower.log");
    let url = format!("file://{}", replica.display());

    let writer = spawn_py(WRITER, &[&db, &stop_writer], 1);
    while !db.exists()
        || rusqlite::Connection::open(&db)
            .and_then(|c| c.query_row("SELECT count(*) FROM meta", [], |r| r.get::<_, i64>(0)))
            .map_or(true, |n| n == 0)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every commit its own segment: thousands of steps for the readers.
    let cfg = dir.path().join("primary.yml");
    std::fs::write(
        &cfg,
        format!(
            "dbs:\n  - path: {}\n    replicas:\n      - path: {}\n        sync-interval: 0s\n",
            db.display(),
            replica.display()
        ),
    )
    .unwrap();
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(300));
    let f = Follower::start(&copy, &url, &["--follow-interval", "200ms"], &flog);
    let readers = [
        spawn_py(READER, &[&copy, &stop_reader], 0),
        spawn_py(READER, &[&copy, &stop_reader], 0),
    ];
    std::thread::sleep(Duration::from_secs(3));

    // kill -9 the follower mid-stream; it resumes from its position file.
    f.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let f = Follower::start(&copy, &url, &["--follow-interval", "200ms"], &flog);
    f.wait_for("resuming follow", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(2));

    // The primary's walstream stops, the application checkpoints the WAL
    // away: the next walstream starts a new generation.
    w.stop();
    std::thread::sleep(Duration::from_millis(500));
    {
        let c = app(&db);
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    f.wait_for("now following it", Duration::from_secs(30));
    // Thousands of steps under the readers, however fast this machine is.
    let deadline = Instant::now() + Duration::from_secs(90);
    while f.log().matches("applied").count() < 1500 {
        assert!(Instant::now() < deadline, "too few steps:\n{}", f.log());
        std::thread::sleep(Duration::from_millis(200));
    }

    std::fs::write(&stop_writer, "").unwrap();
    let transfers: u64 = finish_py(writer).parse().unwrap();
    w.wait_quiet();
    wait_caught_up(&db, &copy, &f);
    std::fs::write(&stop_reader, "").unwrap();
    for r in readers {
        let out = finish_py(r);
        let parts: Vec<&str> = out.splitn(4, ' ').collect();
        let (checks, violations, errors): (u64, u64, u64) = (
            parts[0].parse().unwrap(),
            parts[1].parse().unwrap(),
            parts[2].parse().unwrap(),
        );
        assert_eq!(
            (violations, errors),
            (0, 0),
            "reader saw {out} ({checks} checks)\n{}",
            f.log()
        );
        assert!(checks > 100, "reader ran only {checks} checks");
    }
    let log = f.stop();
    w.stop();
    assert!(transfers > 500, "writer made only {transfers} transfers");
    assert_same(&db, &copy);
    integrity_ok(&copy);
    let applied = log.matches("applied").count();
    assert!(applied > 1000, "only {applied} objects applied:\n{log}");
}

/// A copy changed behind the follower's back (here: a row written to it
/// while the follower was stopped) is refused with an error naming it, and
/// left as it is.
#[test]
fn a_copy_changed_while_stopped_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let copy = dir.path().join("copy.db");
    let flog = dir.path().join("follower.log");
    let url = format!("file://{}", replica.display());
    let mut c = app(&db);
    create_items(&c);
    let w = Replicating::db(&db, &replica);
    let mut rng = Rng::new(5);
    for _ in 0..10 {
        random_txn(&mut c, &mut rng);
    }
    w.wait_quiet();
    Follower::start(&copy, &url, &[], &flog).stop();
    app(&copy)
        .execute_batch("CREATE TABLE intruder(x); INSERT INTO intruder VALUES (1);")
        .unwrap();
    let before = dump(&copy);
    let o = Command::new(bin())
        .args(["restore", "--follow", "-o"])
        .arg(&copy)
        .arg(&url)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(copy.to_str().unwrap()) && err.contains("changed by something else"),
        "{err}"
    );
    assert_eq!(dump(&copy), before, "the copy was left alone");
    w.stop();
}

/// Whatever replaced the segment a stopped follower needs (compaction
/// merged it, retention deleted it) it catches up to the primary's state.
#[test]
fn a_follower_behind_compaction_and_retention_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let copy = dir.path().join("copy.db");
    let flog = dir.path().join("follower.log");
    let cfg = dir.path().join("walstream.yml");
    std::fs::write(
        &cfg,
        format!(
            "levels:\n  - interval: 1s\ndbs:\n  - path: {}\n    replicas:\n      - path: {}\n        retention: 3s\n        retention-check-interval: 300ms\n        snapshot-interval: 1s\n",
            db.display(),
            replica.display()
        ),
    )
    .unwrap();
    let mut c = app(&db);
    create_items(&c);
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    let url = format!("file://{}", replica.display());
    let mut rng = Rng::new(7);
    for _ in 0..20 {
        random_txn(&mut c, &mut rng);
    }
    w.wait_quiet();
    let f = Follower::start(&copy, &url, &[], &flog);
    f.stop();
    // The follower is down while the primary writes for longer than the
    // compaction interval and the retention window.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        random_txn(&mut c, &mut rng);
        std::thread::sleep(Duration::from_millis(20));
    }
    w.wait_quiet();
    let addr = free_addr();
    let f = Follower::start(&copy, &url, &["--addr", &addr], &flog);
    let deadline = Instant::now() + Duration::from_secs(30);
    while dump(&copy) != dump(&db) {
        assert!(Instant::now() < deadline, "never caught up:\n{}", f.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Caught up: ready, and the metrics say where it stands.
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(&addr, "/readyz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            http_get(&addr, "/readyz")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, metrics) = http_get(&addr, "/metrics");
    for needle in [
        "walstream_follow_position{",
        "walstream_follow_lag_seconds{",
        "walstream_follow_apply_errors_total{",
        "walstream_follow_applied_objects_total{",
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }
    let log = f.stop();
    w.stop();
    integrity_ok(&copy);
    assert!(
        log.contains("applying the generation's newest snapshot") || log.contains("/compacted/"),
        "{log}"
    );
}

/// Through S3 with a fault proxy injecting errors, resets, delays and cut
/// bodies into the follower's requests, the copy still ends exact.
#[test]
fn following_through_s3_faults_ends_exact() {
    use common::faultproxy::FaultProxy;
    use common::s3server::{S3Server, AK, BUCKET, SK};
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let copy = dir.path().join("copy.db");
    let flog = dir.path().join("follower.log");
    let cfg = dir.path().join("primary.yml");
    std::fs::write(
        &cfg,
        format!(
            "dbs:\n  - path: {}\n    replicas:\n      - type: s3\n        bucket: {BUCKET}\n        path: follow\n        endpoint: http://{}\n        region: us-east-1\n        force-path-style: true\n        access-key-id: {AK}\n        secret-access-key: {SK}\n        sync-interval: 100ms\n",
            db.display(),
            server.addr
        ),
    )
    .unwrap();
    let follower_cfg = dir.path().join("follower.yml");
    std::fs::write(
        &follower_cfg,
        format!(
            "dbs:\n  - path: {}\n    replicas:\n      - type: s3\n        bucket: {BUCKET}\n        path: follow\n        endpoint: http://{}\n        region: us-east-1\n        force-path-style: true\n        access-key-id: {AK}\n        secret-access-key: {SK}\n",
            db.display(),
            proxy.addr
        ),
    )
    .unwrap();
    let mut c = app(&db);
    create_items(&c);
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    w.wait_quiet();
    let f = Follower::start(
        &copy,
        db.to_str().unwrap(),
        &[
            "--config",
            follower_cfg.to_str().unwrap(),
            "--follow-interval",
            "100ms",
        ],
        &flog,
    );
    proxy.rates.set_all(100);
    let mut rng = Rng::new(11);
    for _ in 0..200 {
        random_txn(&mut c, &mut rng);
        std::thread::sleep(Duration::from_millis(10));
    }
    w.wait_quiet();
    let deadline = Instant::now() + Duration::from_secs(60);
    while dump(&copy) != dump(&db) {
        assert!(Instant::now() < deadline, "never caught up:\n{}", f.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(proxy.injected.faults() > 0, "{}", proxy.injected.summary());
    f.stop();
    w.stop();
    integrity_ok(&copy);
}

/// The primary is gone: the follower stops, its copy is replicated as the
/// new primary into the same replica (a new generation recording the one
/// it followed), new writes ship, and a third node restores them.
#[test]
fn a_promoted_follower_continues_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let copy = dir.path().join("copy.db");
    let flog = dir.path().join("follower.log");
    let url = format!("file://{}", replica.display());
    let mut c = app(&db);
    create_items(&c);
    let w = Replicating::db(&db, &replica);
    let f = Follower::start(&copy, &url, &[], &flog);
    let mut rng = Rng::new(3);
    for _ in 0..50 {
        random_txn(&mut c, &mut rng);
    }
    w.wait_quiet();
    std::thread::sleep(Duration::from_millis(1500));
    assert_same(&db, &copy);
    // The primary's node dies.
    w.kill();
    drop(c);
    let old_gen = std::fs::read_dir(replica.join("generations"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .to_string_lossy()
        .into_owned();

    // Promoting while the follower still runs is refused, naming it.
    let early = Command::new(bin())
        .args(["replicate"])
        .arg(&copy)
        .arg(&replica)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    unsafe { libc::kill(early.id() as i32, libc::SIGTERM) };
    let out = early.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stop it before replicating"), "{err}");

    f.stop();
    let p = Replicating::db(&copy, &replica);
    let mut c2 = app(&copy);
    for _ in 0..30 {
        random_txn(&mut c2, &mut rng);
    }
    p.wait_quiet();
    let third = dir.path().join("third.db");
    restore_ok(&replica, &third, &[]);
    assert_same(&copy, &third);
    let log = p.stop();
    assert!(log.contains("promoted a follower's copy"), "{log}");
    assert!(!copy.with_file_name("copy.db-walstream-follow").exists());
    let o = walstream(&["generations", replica.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    let newest = text.lines().last().unwrap();
    assert!(
        newest.contains(&format!("{old_gen}@")),
        "the new generation records the one it followed:\n{text}"
    );
}

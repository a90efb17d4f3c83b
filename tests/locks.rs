//! walstream must keep SQLite's POSIX locks on the database for as long as it
//! runs. POSIX advisory locks belong to the process: closing any descriptor
//! of the database file drops every lock the process holds on it, including
//! the SHARED lock of walstream's own connections. Without it, another
//! process's SQLite takes the EXCLUSIVE lock when its last connection
//! closes, checkpoints and deletes the WAL under walstream's read
//! transaction, and the replica is corrupt.
//!
//! Each test drives walstream through the paths that read the database file
//! (the snapshot at start, periodic snapshots, `dir:` rescans, validation
//! against the live database), then checks from another process that the
//! lock is still there: that process must not get a write lock on SQLite's
//! SHARED byte range, and an application's last close must leave the WAL.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Python program run as another process: tries to take a write lock on
/// SQLite's SHARED byte range (SHARED_FIRST = 0x40000002, 510 bytes), which
/// succeeds only when no process holds a SHARED lock on the database.
const TRY_EXCLUSIVE: &str = r#"
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 510, 0x40000002, 0)
    print("acquired")
except OSError:
    print("refused")
"#;

/// Python program run as another process: the system SQLite's connection
/// commits a row and closes. If it is the last connection holding a lock it
/// checkpoints and deletes the WAL.
const COMMIT_AND_CLOSE: &str = r#"
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA busy_timeout=5000")
c.execute("INSERT INTO t(v) VALUES (randomblob(500))")
c.close()
"#;

fn python(program: &str, db: &Path) -> String {
    let out = Command::new("python3")
        .args(["-c", program, db.to_str().unwrap()])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn create(db: &Path) {
    let c = app(db);
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
        .unwrap();
    for _ in 0..50 {
        c.execute("INSERT INTO t(v) VALUES (randomblob(500))", [])
            .unwrap();
    }
}

/// Asserts that walstream still holds its lock on `db`, first by asking for
/// the lock, then by what an application's last close does to the WAL.
fn assert_locked(db: &Path, r: &Replicating) {
    assert_eq!(
        python(TRY_EXCLUSIVE, db),
        "refused",
        "another process got an exclusive lock while walstream runs\n{}",
        r.log()
    );
    python(COMMIT_AND_CLOSE, db);
    assert!(
        db::wal_path(db).exists(),
        "an application's last close deleted the WAL under walstream\n{}",
        r.log()
    );
}

use walstream::db;

#[test]
fn locks_survive_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    create(&db);
    let config = dir.path().join("walstream.yml");
    std::fs::write(
        &config,
        format!(
            "dbs:\n  - path: {}\n    monitor-interval: 100ms\n    snapshot-interval: 200ms\n    replicas:\n      - path: {}\n",
            db.display(),
            replica.display()
        ),
    )
    .unwrap();
    let r = Replicating::start(&["--config", config.to_str().unwrap()]);
    // The snapshot of the new generation has been taken; let a few periodic
    // ones follow.
    for _ in 0..3 {
        python(COMMIT_AND_CLOSE, &db);
        std::thread::sleep(Duration::from_millis(300));
    }
    r.wait_for("stored snapshot", Duration::from_secs(10));
    assert!(r.count("stored snapshot") >= 2, "{}", r.log());
    assert_locked(&db, &r);
    r.stop();
    restore_and_compare(&db, &replica, dir.path());
}

#[test]
fn locks_survive_dir_scans_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let db = data.join("app.db");
    let replica = dir.path().join("replica");
    create(&db);
    let config = dir.path().join("walstream.yml");
    std::fs::write(
        &config,
        format!(
            "dbs:\n  - dir: {}\n    pattern: \"*.db\"\n    monitor-interval: 100ms\n    replicas:\n      - path: {}\n        validation-interval: 300ms\n",
            data.display(),
            replica.display()
        ),
    )
    .unwrap();
    let r = Replicating::start(&["--config", config.to_str().unwrap()]);
    python(COMMIT_AND_CLOSE, &db);
    // Several rescans of the directory (every 100 ms) and validations
    // comparing with the live database.
    r.wait_for("validation ok", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    assert_locked(&db, &r);
    r.stop();
    restore_and_compare(&db, &replica.join("app.db"), dir.path());
}

fn restore_and_compare(db: &Path, replica: &Path, dir: &Path) {
    let out = dir.join("restored.db");
    restore_ok(replica, &out, &[]);
    assert_same(db, &out);
}

/// Continuity lost for real: the WAL is deleted under walstream (as another
/// process's SQLite does once walstream's lock is gone) while it holds
/// shipped frames that were never checkpointed, and the application goes on
/// in a new WAL. Continuing the generation would give a replica holding
/// frames the database no longer has; walstream must refuse, say so, count
/// it, and start a new generation that restores exactly.
#[test]
fn lost_continuity_starts_a_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    create(&db);
    let addr = free_addr();
    let config = dir.path().join("walstream.yml");
    std::fs::write(
        &config,
        format!(
            "addr: {addr}\ndbs:\n  - path: {}\n    monitor-interval: 100ms\n    replicas:\n      - path: {}\n        sync-interval: 0s\n",
            db.display(),
            replica.display()
        ),
    )
    .unwrap();
    let r = Replicating::start(&["--config", config.to_str().unwrap()]);
    // Shipped, and left in the WAL (walstream's lock keeps the application's
    // close from checkpointing it).
    python(COMMIT_AND_CLOSE, &db);
    python(COMMIT_AND_CLOSE, &db);
    r.wait_quiet();
    assert!(r.count("shipped segment") > 0, "{}", r.log());
    let lost_before = r.count("continuity lost");
    std::fs::remove_file(db::wal_path(&db)).unwrap();
    let mut shm = db.as_os_str().to_owned();
    shm.push("-shm");
    std::fs::remove_file(&shm).unwrap();
    for _ in 0..3 {
        python(COMMIT_AND_CLOSE, &db);
    }
    r.wait_for("continuity lost", Duration::from_secs(10));
    assert!(r.count("continuity lost") > lost_before);
    // A new generation, from a fresh snapshot.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while r.count("starting new generation") < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", r.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    python(COMMIT_AND_CLOSE, &db);
    r.wait_quiet();
    let (_, metrics) = http_get(&addr, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("walstream_continuity_lost_total{") && l.ends_with(" 1")),
        "{metrics}"
    );
    let log = r.stop();
    // Nothing was shipped into the old generation after the loss was seen.
    let old = log
        .lines()
        .find(|l| l.contains("starting new generation"))
        .and_then(|l| l.split("generation=").nth(1))
        .and_then(|g| g.split_whitespace().next())
        .unwrap()
        .to_string();
    let lost_at = log.find("continuity lost").unwrap();
    assert!(
        !log[lost_at..]
            .lines()
            .any(|l| l.contains("shipped segment") && l.contains(&old)),
        "{log}"
    );
    restore_and_compare(&db, &replica, dir.path());
    let v = walstream(&[
        "verify",
        "--config",
        config.to_str().unwrap(),
        db.to_str().unwrap(),
    ]);
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
}

/// The issue's "tx2" replica, built by hand: the application commits tx1
/// (shipped), then tx2, then a checkpoint empties the WAL, then tx3 starts
/// a new one; a replica that went on from tx1 straight to tx3 misses tx2.
/// `verify` against the live database must fail, naming the generation and
/// the position it compared.
#[test]
fn verify_fails_on_a_replica_that_misses_a_transaction() {
    use walstream::replica::Replica;
    use walstream::segment::{SegmentHeader, WalPoint};
    use walstream::storage::FileStorage;

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    // The application keeps one connection open throughout, so nothing is
    // checkpointed on close.
    let c = app(&db);
    c.execute_batch(
        "CREATE TABLE a(id INTEGER PRIMARY KEY, v TEXT);
         CREATE TABLE b(id INTEGER PRIMARY KEY, v TEXT);
         INSERT INTO a(v) VALUES ('tx0');
         INSERT INTO b(v) VALUES ('tx0');",
    )
    .unwrap();
    let r = Replicating::db(&db, &replica);
    c.execute("UPDATE a SET v = 'tx1'", []).unwrap();
    r.wait_quiet();
    r.stop();
    c.execute("UPDATE b SET v = 'tx2'", []).unwrap();
    let busy: i64 = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .unwrap();
    assert_eq!(busy, 0);
    c.execute("INSERT INTO a(v) VALUES ('tx3')", []).unwrap();

    // tx3's frames, shipped as if they followed tx1.
    let wal_path = db::wal_path(&db);
    let mut wal = std::fs::File::open(&wal_path).unwrap();
    let header = walstream::wal::read_header(&mut wal).unwrap().unwrap();
    let (tx3, end) = walstream::wal::read_committed(&mut wal, &header.start(), None).unwrap();
    assert_eq!(tx3.transactions, 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Replica::new(std::sync::Arc::new(FileStorage::new(replica.clone())));
    let (generation, position) = rt.block_on(async {
        let g = store.generations().await.unwrap().pop().unwrap();
        let &(index, _) = g.segments.last().unwrap();
        let last = store.get_segment(&g.id, index).await.unwrap().header;
        let h = SegmentHeader {
            index: index + 1,
            first_position: last.last_position,
            last_position: last.last_position + tx3.frames,
            db_pages: tx3.db_pages,
            transactions: 1,
            page_count: tx3.pages.len() as u64,
            wal: WalPoint::from_cursor(&end),
            ..last
        };
        store.put_segment(&h, &tx3.pages).await.unwrap();
        (g.id, h.last_position)
    });

    let config = dir.path().join("walstream.yml");
    std::fs::write(
        &config,
        format!(
            "dbs:\n  - path: {}\n    replicas:\n      - path: {}\n",
            db.display(),
            replica.display()
        ),
    )
    .unwrap();
    let v = walstream(&[
        "verify",
        "--config",
        config.to_str().unwrap(),
        db.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&v.stdout).to_string();
    assert!(!v.status.success(), "{out}");
    assert!(out.contains("FAILED"), "{out}");
    let fault = out.lines().find(|l| l.starts_with("fault:")).unwrap_or("");
    assert!(
        fault.contains(&generation) && fault.contains(&format!("position {position}")),
        "the fault names neither generation {generation} nor position {position}:\n{out}"
    );
}

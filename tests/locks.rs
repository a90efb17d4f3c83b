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
    let mut r = Replicating::start(&["--config", config.to_str().unwrap()]);
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
    let mut r = Replicating::start(&["--config", config.to_str().unwrap()]);
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

//! Bad input gets a one-line error naming the thing at fault, a non-zero
//! exit, and no output file.

mod common;

use std::path::Path;

use common::*;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_fails(o: &std::process::Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

/// A replica with several segments, and the database it came from.
fn replica_with_segments(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let db = dir.join("app.db");
    let replica = dir.join("replica");
    let mut c = app(&db);
    create_items(&c);
    let w = Replicating::db(&db, &replica);
    let mut rng = Rng::new(11);
    for _ in 0..4 {
        for _ in 0..5 {
            random_txn(&mut c, &mut rng);
        }
        w.wait_quiet();
    }
    w.stop();
    (db, replica)
}

fn segment_files(replica: &Path) -> Vec<std::path::PathBuf> {
    let gens = replica.join("generations");
    let gen = std::fs::read_dir(&gens)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut segs: Vec<_> = std::fs::read_dir(gen.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    segs
}

#[test]
fn database_in_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let o = walstream(&[
        "replicate",
        "/nonexistent-walstream-dir/app.db",
        dir.path().join("r").to_str().unwrap(),
    ]);
    assert_fails(&o, &["/nonexistent-walstream-dir", "does not exist"]);
}

#[test]
fn database_that_cannot_switch_to_wal() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("locked.db");
    let holder = rusqlite::Connection::open(&db).unwrap();
    holder.execute_batch("PRAGMA journal_mode=DELETE; CREATE TABLE t(x); BEGIN EXCLUSIVE; INSERT INTO t VALUES (1);").unwrap();
    let cfg = dir.path().join("w.yml");
    std::fs::write(
        &cfg,
        format!(
            "dbs:\n  - path: {}\n    busy-timeout: 200ms\n    replica:\n      path: {}\n",
            db.display(),
            dir.path().join("r").display()
        ),
    )
    .unwrap();
    let o = walstream(&["replicate", "--config", cfg.to_str().unwrap()]);
    assert_fails(&o, &["locked.db", "WAL"]);
    drop(holder);
    let mode: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete", "database must be left as it was");
}

#[test]
fn file_that_is_not_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("junk.db");
    std::fs::write(&db, vec![7u8; 8192]).unwrap();
    let o = walstream(&[
        "replicate",
        db.to_str().unwrap(),
        dir.path().join("r").to_str().unwrap(),
    ]);
    assert_fails(&o, &["junk.db", "not a database"]);
    assert_eq!(std::fs::read(&db).unwrap(), vec![7u8; 8192]);
}

#[test]
fn replica_path_that_is_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    create_items(&app(&db));
    let bogus = dir.path().join("replica-file");
    std::fs::write(&bogus, b"not a directory").unwrap();
    let o = walstream(&["replicate", db.to_str().unwrap(), bogus.to_str().unwrap()]);
    assert_fails(&o, &["replica-file"]);
    let out = dir.path().join("out.db");
    let o = walstream(&[
        "restore",
        "-o",
        out.to_str().unwrap(),
        bogus.to_str().unwrap(),
    ]);
    assert_fails(&o, &["replica-file"]);
    assert!(!out.exists());
}

#[test]
fn config_with_unknown_key_or_bad_duration() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yml");
    std::fs::write(&cfg, "dbs:\n  - path: /tmp/x.db\n    replicas:\n      - url: file:///tmp/r\n        bogus-key: 1\n").unwrap();
    let o = walstream(&["replicate", "--config", cfg.to_str().unwrap()]);
    assert_fails(&o, &["bad.yml", "bogus-key", "line 5"]);
    assert_eq!(
        stderr(&o).trim().lines().count(),
        1,
        "one line: {}",
        stderr(&o)
    );

    std::fs::write(&cfg, "dbs:\n  - path: /tmp/x.db\n    checkpoint-interval: soon\n    replica:\n      url: file:///tmp/r\n").unwrap();
    let o = walstream(&["replicate", "--config", cfg.to_str().unwrap()]);
    assert_fails(&o, &["bad.yml", "soon", "line 3"]);

    let o = walstream(&[
        "replicate",
        "--config",
        dir.path().join("missing.yml").to_str().unwrap(),
    ]);
    assert_fails(&o, &["missing.yml"]);
}

#[test]
fn corrupted_segment_fails_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, replica) = replica_with_segments(dir.path());
    let segs = segment_files(&replica);
    assert!(segs.len() >= 3, "{segs:?}");
    let victim = &segs[1];
    let mut bytes = std::fs::read(victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(victim, bytes).unwrap();
    let out = dir.path().join("out.db");
    let o = walstream(&[
        "restore",
        "-o",
        out.to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert_fails(&o, &[name, "corrupt"]);
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("walstream-restore"))
            .count(),
        0
    );
}

#[test]
fn missing_segment_fails_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, replica) = replica_with_segments(dir.path());
    let segs = segment_files(&replica);
    let victim = &segs[1];
    std::fs::remove_file(victim).unwrap();
    let out = dir.path().join("out.db");
    let o = walstream(&[
        "restore",
        "-o",
        out.to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert_fails(&o, &[name, "missing"]);
    assert!(!out.exists());
}

#[test]
fn existing_output_and_empty_replica() {
    let dir = tempfile::tempdir().unwrap();
    let (db, replica) = replica_with_segments(dir.path());
    // Never overwrite an existing file...
    let before = std::fs::read(&db).unwrap();
    let o = walstream(&[
        "restore",
        "-o",
        db.to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    assert_fails(&o, &["app.db", "exists"]);
    // ...unless asked to skip quietly.
    let o = walstream(&[
        "restore",
        "--if-db-not-exists",
        "-o",
        db.to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&db).unwrap(), before);

    let empty = dir.path().join("empty-replica");
    let out = dir.path().join("out.db");
    let o = walstream(&[
        "restore",
        "-o",
        out.to_str().unwrap(),
        empty.to_str().unwrap(),
    ]);
    assert_fails(&o, &["no generations", "empty-replica"]);
    let o = walstream(&[
        "restore",
        "--if-replica-exists",
        "-o",
        out.to_str().unwrap(),
        empty.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!out.exists());

    let o = walstream(&[
        "restore",
        "--timestamp",
        "yesterday",
        "-o",
        out.to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    assert_fails(&o, &["yesterday"]);
    let o = walstream(&[
        "restore",
        "--generation",
        "0123456789abcdef0123",
        "-o",
        out.to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    assert_fails(&o, &["0123456789abcdef0123", "not found"]);
    assert!(!out.exists());
}

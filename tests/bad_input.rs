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

    // A replica directory that does not exist says so; an empty one has no
    // generations.
    let empty = dir.path().join("empty-replica");
    let out = dir.path().join("out.db");
    let o = walstream(&[
        "restore",
        "-o",
        out.to_str().unwrap(),
        empty.to_str().unwrap(),
    ]);
    assert_fails(&o, &["does not exist", "empty-replica"]);
    std::fs::create_dir(&empty).unwrap();
    let o = walstream(&[
        "restore",
        "-o",
        out.to_str().unwrap(),
        empty.to_str().unwrap(),
    ]);
    assert_fails(&o, &["no generations", "empty-replica"]);
    std::fs::remove_dir(&empty).unwrap();
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

/// Re-seals an object after its bytes were changed (a valid SHA-256 trailer),
/// so that only the intended change is wrong.
fn reseal(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    use sha2::Digest;
    let mut b = std::fs::read(path).unwrap();
    b.truncate(b.len() - 32);
    edit(&mut b);
    let sum = sha2::Sha256::digest(&b);
    b.extend_from_slice(&sum);
    std::fs::write(path, b).unwrap();
}

#[test]
fn objects_from_a_newer_format_version_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, replica) = replica_with_segments(dir.path());
    let segs = segment_files(&replica);
    let victim = &segs[1];
    reseal(victim, |b| b[8..12].copy_from_slice(&2u32.to_be_bytes()));
    let out = dir.path().join("out.db");
    let o = walstream(&[
        "restore",
        "-o",
        out.to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    let name = victim.file_name().unwrap().to_string_lossy().to_string();
    assert_fails(&o, &[&name, "version 2"]);
    assert!(!out.exists());
}

#[test]
fn a_segment_with_another_page_size_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, replica) = replica_with_segments(dir.path());
    let segs = segment_files(&replica);
    let victim = &segs[2];
    // Rewrite the JSON header's page size (same length: 4096 -> 8192).
    reseal(victim, |b| {
        let hlen = u32::from_be_bytes(b[12..16].try_into().unwrap()) as usize;
        let header = String::from_utf8(b[16..16 + hlen].to_vec()).unwrap();
        let changed = header.replace("\"page_size\":4096", "\"page_size\":8192");
        assert_ne!(header, changed);
        b.splice(16..16 + hlen, changed.into_bytes());
    });
    let out = dir.path().join("out.db");
    let o = walstream(&[
        "restore",
        "-o",
        out.to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    let name = victim.file_name().unwrap().to_string_lossy().to_string();
    assert_fails(&o, &[&name]);
    assert!(!out.exists());
}

/// A snapshot whose (checksummed) header admits fewer pages than its image
/// holds: restore and verify refuse it by name, and restore stops reading at
/// the admitted size rather than trusting the stream.
#[test]
fn a_snapshot_longer_than_its_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, replica) = replica_with_segments(dir.path());
    let gen = segment_files(&replica)[0]
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let snap = std::fs::read_dir(gen.join("snapshots"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    reseal(&snap, |b| {
        let hlen = u32::from_be_bytes(b[12..16].try_into().unwrap()) as usize;
        let mut header: serde_json::Value = serde_json::from_slice(&b[16..16 + hlen]).unwrap();
        assert!(header["db_pages"].as_u64().unwrap() > 1);
        header["db_pages"] = 1.into();
        let changed = serde_json::to_vec(&header).unwrap();
        b.splice(12..16, (changed.len() as u32).to_be_bytes());
        b.splice(16..16 + hlen, changed);
    });
    let name = snap.file_name().unwrap().to_string_lossy().to_string();
    let out = dir.path().join("out.db");
    let o = walstream(&[
        "restore",
        "-o",
        out.to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    assert_fails(&o, &[&name, "longer than the 1 pages its header admits"]);
    assert!(!out.exists());
    let o = walstream(&["verify", replica.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success());
    assert!(
        report.contains(&format!("{name}: image is longer than the 1 pages")),
        "{report}"
    );
}

/// Another database moved over the replicated one (a new file under the same
/// name, with its own WAL): nothing of it may be shipped as the old
/// database's history; walstream starts a new generation for it.
#[test]
fn a_database_replaced_under_walstream() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let mut c = app(&db);
    create_items(&c);
    let mut rng = Rng::new(3);
    let w = Replicating::db(&db, &replica);
    for _ in 0..10 {
        random_txn(&mut c, &mut rng);
    }
    w.wait_quiet();
    let old_rows = dump(&db);
    drop(c);
    // A different database, fully checkpointed, moved into place.
    let other = dir.path().join("other.db");
    {
        let mut o = app(&other);
        o.execute_batch("CREATE TABLE replaced(x INTEGER PRIMARY KEY, y TEXT)")
            .unwrap();
        let tx = o.transaction().unwrap();
        for i in 0..50 {
            tx.execute("INSERT INTO replaced VALUES (?1, 'new')", [i])
                .unwrap();
        }
        tx.commit().unwrap();
    }
    for suffix in ["-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(std::path::PathBuf::from(p));
    }
    std::fs::rename(&other, &db).unwrap();
    let c = app(&db);
    for i in 50..80 {
        c.execute("INSERT INTO replaced VALUES (?1, 'after')", [i])
            .unwrap();
    }
    w.wait_for("replaced", std::time::Duration::from_secs(20));
    w.wait_for(
        "starting new generation",
        std::time::Duration::from_secs(20),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while w.count("starting new generation") < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no new generation:\n{}",
            w.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    w.wait_quiet();
    let log = w.stop();
    // The newest generation is the new database; the old one is intact.
    let out = dir.path().join("new.db");
    restore_ok(&replica, &out, &[]);
    assert_same(&db, &out);
    let gens = walstream(&["generations", replica.to_str().unwrap()]);
    let listing = String::from_utf8_lossy(&gens.stdout).to_string();
    let first = listing
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let old = dir.path().join("old.db");
    restore_ok(&replica, &old, &["--generation", first]);
    assert_eq!(dump(&old), old_rows, "{log}");
}

/// Keys in a listing come from storage, which may be hostile: a key that
/// climbs out of the replica must never be read or written, and a restore
/// writes nothing outside its output.
#[test]
fn hostile_object_keys_never_escape() {
    use walstream::storage::{FileStorage, MemoryStorage, Storage};
    let dir = tempfile::tempdir().unwrap();
    let (db, replica) = replica_with_segments(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The file backend refuses keys that leave its root.
    let fs = FileStorage::new(replica.clone());
    for key in [
        "../escape",
        "generations/../../escape",
        "/etc/passwd",
        "a/./b",
        ".hidden",
    ] {
        assert!(rt.block_on(fs.put(key, b"x".to_vec())).is_err(), "{key}");
        assert!(rt.block_on(fs.get(key)).is_err(), "{key}");
    }
    assert!(!dir.path().join("escape").exists());
    // A store whose listing holds hostile keys next to a real replica.
    let mem = std::sync::Arc::new(MemoryStorage::new());
    rt.block_on(async {
        for o in fs.list("").await.unwrap() {
            mem.put(&o.key, fs.get(&o.key).await.unwrap())
                .await
                .unwrap();
        }
        let gen = fs.list("generations/").await.unwrap()[0]
            .key
            .split('/')
            .nth(1)
            .unwrap()
            .to_string();
        for k in [
            format!("generations/{gen}/segments/../../../../escape.segment"),
            format!("generations/{gen}/snapshots/../../../escape-1.snapshot"),
            "generations/../../escape".to_string(),
            format!("generations/{gen}/segments/ffffffffffffffff.segment/../../x"),
        ] {
            mem.put(&k, b"hostile".to_vec()).await.unwrap();
        }
    });
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let replica_view = walstream::replica::Replica::new(mem);
    let opts = walstream::restore::RestoreOptions {
        output: out_dir.join("restored.db"),
        concurrency: 2,
        ..Default::default()
    };
    rt.block_on(walstream::restore::restore(&replica_view, &opts))
        .unwrap();
    assert_same(&db, &out_dir.join("restored.db"));
    let mut created: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    created.sort();
    assert_eq!(created, ["restored.db"]);
    assert!(!dir.path().join("escape").exists() && !dir.path().join("x").exists());
}

#[test]
fn malformed_config_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    for (text, needles) in [
        ("dbs:\n  - path: a.db\n    replica: [unclosed\n", vec!["line"]),
        ("dbs:\n  - path: a.db\n    min-checkpoint-page-count: lots\n    replica:\n      path: /r\n", vec!["min-checkpoint-page-count", "line 3"]),
        ("dbs: {path: a.db}\n", vec!["dbs", "line 1"]),
        ("levels:\n  - interval: 1m\n  - interval: 90s\ndbs:\n  - path: a.db\n    replica:\n      path: /r\n", vec!["levels[1]"]),
    ] {
        let cfg = dir.path().join("bad.yml");
        std::fs::write(&cfg, text).unwrap();
        let o = walstream(&["replicate", "--config", cfg.to_str().unwrap()]);
        let mut all = needles.clone();
        all.push("bad.yml");
        assert_fails(&o, &all);
        assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    }
}

/// `walstream segments URL | head -1`: a reader that goes away ends a
/// listing quietly with success, never a panic on the broken pipe.
#[test]
fn listings_end_quietly_when_the_reader_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let (_, replica) = replica_with_segments(dir.path());
    for cmd in ["segments", "snapshots", "generations", "version"] {
        let (reader, writer) = std::io::pipe().unwrap();
        // The read end is closed before walstream writes anything.
        drop(reader);
        let mut args = vec![cmd];
        if cmd != "version" {
            args.push(replica.to_str().unwrap());
        }
        let o = std::process::Command::new(bin())
            .args(&args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(o.status.success(), "{cmd}: {:?}\n{err}", o.status);
        assert!(!err.contains("panicked"), "{cmd}: {err}");
    }
}

/// `--dry-run` does what `WALSTREAM_DRY_RUN=1` does: prints the plan and
/// touches nothing (the database is not even created).
#[test]
fn dry_run_flag_prints_the_plan_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let o = walstream(&[
        "replicate",
        "--dry-run",
        db.to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("would replicate"), "{out}");
    assert!(!db.exists() && !replica.exists());
    let o = walstream(&[
        "restore",
        "--dry-run",
        "-o",
        dir.path().join("out.db").to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("would restore"));
    assert!(!dir.path().join("out.db").exists());
}

//! Retention, compaction and verification on real replicas, with windows of
//! seconds instead of hours.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::*;

fn config(dir: &Path, db: &Path, replica: &Path, extra_top: &str, extra_replica: &str) -> PathBuf {
    let cfg = dir.join("walstream.yml");
    std::fs::write(
        &cfg,
        format!(
            "{extra_top}dbs:\n  - path: {}\n    monitor-interval: 100ms\n    replicas:\n      - path: {}\n{extra_replica}",
            db.display(),
            replica.display()
        ),
    )
    .unwrap();
    cfg
}

fn count_rows(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

fn files_under(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Commits `n` single-row transactions a few milliseconds apart and records
/// (time, rows) marks after the replica has them.
fn write_with_marks(
    db: &Path,
    w: &Replicating,
    from: i64,
    n: i64,
    pause: Duration,
) -> Vec<(DateTime<Utc>, i64)> {
    let c = app(db);
    let mut marks = Vec::new();
    for i in from..from + n {
        c.execute("INSERT INTO t(id, v) VALUES (?1, randomblob(200))", [i + 1])
            .unwrap();
        std::thread::sleep(pause);
        if i % 10 == 9 {
            w.wait_quiet_brief();
            marks.push((Utc::now(), i + 1));
            // Restore times are milliseconds: keep the next commit out of
            // this mark's millisecond.
            std::thread::sleep(Duration::from_millis(3));
        }
    }
    marks
}

trait Brief {
    fn wait_quiet_brief(&self);
}

impl Brief for Replicating {
    /// Waits until the newest commit is surely shipped (directory replica,
    /// shipped within milliseconds): a short pause past the last log line.
    fn wait_quiet_brief(&self) {
        let before = self.count("shipped segment");
        let t = Instant::now();
        while self.count("shipped segment") == before && t.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

fn restore_at(replica: &Path, out: &Path, t: &DateTime<Utc>) -> std::process::Output {
    let ts = t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    walstream(&[
        "restore",
        "-o",
        out.to_str().unwrap(),
        "--timestamp",
        &ts,
        replica.to_str().unwrap(),
    ])
}

#[test]
fn retention_prunes_old_objects_and_keeps_the_window_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    app(&db)
        .execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    let cfg = config(
        dir.path(),
        &db,
        &replica,
        "levels: []\n",
        "        retention: 4s\n        retention-check-interval: 300ms\n        snapshot-interval: 1s\n",
    );
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    let start = Utc::now();
    let mut marks = Vec::new();
    for round in 0..8 {
        marks.extend(write_with_marks(
            &db,
            &w,
            round * 20,
            20,
            Duration::from_millis(30),
        ));
    }
    w.wait_quiet();
    std::thread::sleep(Duration::from_millis(400));
    let now = Utc::now();
    let log = w.stop();
    assert!(log.contains("retention pruned"), "{log}");
    // Old objects are gone: the oldest remaining snapshot is from inside the
    // window (or the newest before it), and early segments were deleted.
    let snaps = files_under(&replica, "snapshot");
    let segs = files_under(&replica, "segment");
    assert!(
        !segs.iter().any(|p| p.ends_with("0000000000000000.segment")),
        "first segment kept"
    );
    let elapsed = (now - start).num_milliseconds();
    assert!(elapsed > 5000, "test ran too fast to prune: {elapsed} ms");
    assert!(snaps.len() <= 6, "{} snapshots left", snaps.len());
    // Every mark inside the window restores exactly.
    let window_start = now - chrono::Duration::milliseconds(4000 - 500);
    let mut checked = 0;
    for (i, (t, rows)) in marks.iter().enumerate() {
        if *t < window_start {
            continue;
        }
        let out = dir.path().join(format!("pit{i}.db"));
        let o = restore_at(&replica, &out, t);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        integrity_ok(&out);
        assert_eq!(count_rows(&out), *rows, "rows at {t}");
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} marks in the window");
    assert!(
        checked < marks.len(),
        "the window held every mark: nothing was tested"
    );
    let out = dir.path().join("latest.db");
    restore_ok(&replica, &out, &[]);
    assert_same(&db, &out);
}

#[test]
fn an_interrupted_prune_leaves_a_restorable_replica() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let mut c = app(&db);
    create_items(&c);
    // Two generations (changes while stopped start a new one), several
    // snapshots each.
    let cfg = config(
        dir.path(),
        &db,
        &replica,
        "levels: []\n",
        "        snapshot-interval: 400ms\n        retention: 1h\n",
    );
    let mut rng = Rng::new(7);
    for round in 0..2 {
        let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
        for _ in 0..4 {
            for _ in 0..10 {
                random_txn(&mut c, &mut rng);
            }
            std::thread::sleep(Duration::from_millis(450));
        }
        w.wait_quiet();
        w.stop();
        if round == 0 {
            c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
            random_txn(&mut c, &mut rng);
        }
    }
    // Plan a prune with a zero-length window far in the future: everything
    // but the newest chain goes.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let storage: walstream::storage::DynStorage =
        std::sync::Arc::new(walstream::storage::FileStorage::new(replica.clone()));
    let r = walstream::replica::Replica::new(storage);
    let gens = rt.block_on(r.generations()).unwrap();
    assert!(gens.len() >= 2, "expected two generations");
    let now = Utc::now().timestamp_millis() + 3_600_000;
    let plan =
        walstream::retention::plan(&gens, Duration::from_millis(1), now, &Default::default());
    assert!(plan.len() > 10, "{plan:?}");
    // Stop the prune after every possible number of deletions: what is left
    // verifies (every remaining snapshot's chain is whole) and restores.
    let steps: std::collections::BTreeSet<usize> = (0..=plan.len())
        .step_by((plan.len() / 12).max(1))
        .chain([1, plan.len() - 1, plan.len()])
        .collect();
    for k in steps {
        let copy = dir.path().join(format!("copy{k}"));
        copy_dir(&replica, &copy);
        for key in &plan[..k] {
            std::fs::remove_file(copy.join(key)).unwrap();
        }
        let o = walstream(&["verify", copy.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "after {k} of {} deletions:\n{}",
            plan.len(),
            String::from_utf8_lossy(&o.stdout)
        );
        let out = dir.path().join(format!("restored{k}.db"));
        restore_ok(&copy, &out, &[]);
        assert_same(&db, &out);
        std::fs::remove_dir_all(&copy).unwrap();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::create_dir_all(to).unwrap();
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

#[test]
fn compaction_cuts_the_objects_a_restore_reads() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let mut c = app(&db);
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    create_items(&c);
    let cfg = config(
        dir.path(),
        &db,
        &replica,
        "levels:\n  - interval: 1s\n  - interval: 3s\n",
        "        retention: 1h\n",
    );
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    let mut rng = Rng::new(11);
    let mut marks = Vec::new();
    for round in 0..6 {
        marks.extend(write_with_marks(
            &db,
            &w,
            round * 40,
            40,
            Duration::from_millis(15),
        ));
        // Deletes and a VACUUM inside a bucket: merged objects must replay
        // the shrink exactly.
        for _ in 0..5 {
            random_txn(&mut c, &mut rng);
        }
        if round % 2 == 1 {
            c.execute("DELETE FROM items WHERE id % 3 = 0", []).unwrap();
            c.execute_batch("VACUUM").unwrap();
        }
    }
    w.wait_quiet();
    let shipped = w.count("shipped segment");
    // Wait for the coarse level to cover the early history.
    let deadline = Instant::now() + Duration::from_secs(20);
    while files_under(&replica.join("generations"), "segment")
        .iter()
        .filter(|p| p.to_string_lossy().contains("/compacted/2/"))
        .count()
        < 1
    {
        assert!(Instant::now() < deadline, "no level-2 object:\n{}", w.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let log = w.stop();
    let plain = files_under(&replica, "segment")
        .iter()
        .filter(|p| p.to_string_lossy().contains("/segments/"))
        .count();
    assert!(
        plain < shipped / 2,
        "{plain} of {shipped} segments still kept:\n{log}"
    );
    // The restore reads a handful of objects instead of hundreds and equals
    // the source.
    let out = dir.path().join("latest.db");
    let o = walstream(&[
        "restore",
        "-o",
        out.to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let objects: u64 = err
        .split("segments=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no segment count in {err}"));
    assert!(
        objects * 5 < shipped as u64,
        "restore read {objects} objects of {shipped} shipped"
    );
    integrity_ok(&out);
    assert_same(&db, &out);
    // Points in time: exact in the newest second, a real earlier state (a
    // prefix of the commits, never a mix) further back.
    for (i, (t, rows)) in marks.iter().enumerate().step_by(3) {
        let out = dir.path().join(format!("pit{i}.db"));
        let o = restore_at(&replica, &out, t);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        integrity_ok(&out);
        let c = rusqlite::Connection::open(&out).unwrap();
        let (n, max): (i64, i64) = c
            .query_row("SELECT count(*), coalesce(max(id), 0) FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(n, max, "rows at {t} are not a prefix of the commits");
        assert!(
            n <= *rows,
            "restored {n} rows at {t}, only {rows} committed by then"
        );
    }
    let (t, rows) = marks.last().unwrap();
    let out = dir.path().join("pit-last.db");
    assert!(restore_at(&replica, &out, t).status.success());
    assert!(count_rows(&out) <= *rows);

    // Idle until no plain segment is left, then restart: walstream must
    // continue after the newest merged object, not reuse its indexes.
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while files_under(&replica, "segment")
        .iter()
        .any(|p| p.to_string_lossy().contains("/segments/"))
    {
        assert!(
            Instant::now() < deadline,
            "plain segments never compacted away:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = w.stop();
    for _ in 0..10 {
        random_txn(&mut c, &mut rng);
    }
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    for _ in 0..10 {
        random_txn(&mut c, &mut rng);
    }
    w.wait_quiet();
    let log2 = w.stop();
    assert!(log2.contains("resuming generation"), "{log}\n{log2}");
    let out = dir.path().join("after-restart.db");
    restore_ok(&replica, &out, &[]);
    assert_same(&db, &out);
}

/// Replicates a small database and returns (dir, db, replica).
fn small_replica(name: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join(format!("{name}.db"));
    let replica = dir.path().join(format!("{name}-replica"));
    let mut c = app(&db);
    create_items(&c);
    let w = Replicating::db(&db, &replica);
    let mut rng = Rng::new(name.len() as u64);
    // Pauses past the directory default sync-interval (25ms), so that the
    // replica holds several segments for the fault cases to break.
    for i in 0..30 {
        random_txn(&mut c, &mut rng);
        if i % 5 == 4 {
            std::thread::sleep(Duration::from_millis(40));
        }
    }
    w.wait_quiet();
    w.stop();
    (dir, db, replica)
}

fn verify_output(args: &[&str]) -> (bool, String) {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    let o = walstream(&all);
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn verify_passes_a_good_replica_and_names_each_fault() {
    let (dir, db, replica) = small_replica("good");
    let (ok, out) = verify_output(&[replica.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("integrity ok"), "{out}");
    // With the live database (named through a config): content compared.
    let cfg = dir.path().join("c.yml");
    std::fs::write(
        &cfg,
        format!(
            "dbs:\n  - path: {}\n    replica:\n      path: {}\n",
            db.display(),
            replica.display()
        ),
    )
    .unwrap();
    let (ok, out) = verify_output(&["--config", cfg.to_str().unwrap(), db.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("content equals"), "{out}");
    // The live database moves on without walstream: not caught up.
    app(&db)
        .execute("INSERT INTO items(k) VALUES (1)", [])
        .unwrap();
    let (ok, out) = verify_output(&["--config", cfg.to_str().unwrap(), db.to_str().unwrap()]);
    assert!(!ok && out.contains("not caught up"), "{out}");

    let segs = files_under(&replica, "segment");
    assert!(segs.len() >= 5);
    let broken = |name: &str, f: &dyn Fn(&Path)| -> String {
        let copy = dir.path().join(name);
        copy_dir(&replica, &copy);
        f(&copy);
        let (ok, out) = verify_output(&[copy.to_str().unwrap()]);
        assert!(!ok, "{name}: verify passed:\n{out}");
        out
    };
    let rel = |p: &Path| p.strip_prefix(&replica).unwrap().to_path_buf();
    let victim = rel(&segs[segs.len() / 2]);
    let key = victim.to_string_lossy().to_string();

    let out = broken("flipped", &|c| {
        let p = c.join(&victim);
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len() / 2;
        b[n] ^= 0x40;
        std::fs::write(&p, b).unwrap();
    });
    assert!(out.contains(&key) && out.contains("fault"), "{out}");

    let out = broken("truncated", &|c| {
        let p = c.join(&victim);
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 40]).unwrap();
    });
    assert!(out.contains(&key), "{out}");

    let out = broken("missing", &|c| {
        std::fs::remove_file(c.join(&victim)).unwrap()
    });
    assert!(out.contains("missing") && out.contains(&key), "{out}");

    // A snapshot of another database, put where this replica's newest
    // snapshot would be found.
    let (_other_dir, _other_db, other) = small_replica("other");
    let other_snap = files_under(&other, "snapshot").pop().unwrap();
    let own_snap = rel(&files_under(&replica, "snapshot").pop().unwrap());
    let out = broken("foreign", &|c| {
        let name = own_snap.file_name().unwrap().to_string_lossy().to_string();
        // Same generation directory, a later index and time: the newest.
        let later = format!(
            "{:016x}-{}",
            u64::from_str_radix(&name[..16], 16).unwrap() + 1,
            &name[17..]
        );
        std::fs::copy(&other_snap, c.join(own_snap.parent().unwrap()).join(later)).unwrap();
    });
    assert!(out.contains("does not match its key"), "{out}");
}

#[test]
fn the_daemon_validates_on_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    app(&db)
        .execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    let cfg = config(
        dir.path(),
        &db,
        &replica,
        "",
        "        validation-interval: 500ms\n",
    );
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    write_with_marks(&db, &w, 0, 20, Duration::from_millis(5));
    w.wait_for("validation ok", Duration::from_secs(20));
    // Corrupt a shipped segment: the next validation reports it.
    let seg = files_under(&replica, "segment").pop().unwrap();
    let mut b = std::fs::read(&seg).unwrap();
    let n = b.len() - 40;
    b[n] ^= 1;
    std::fs::write(&seg, b).unwrap();
    w.wait_for("validation fault", Duration::from_secs(20));
    let log = w.log();
    let key = seg.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        log.lines()
            .any(|l| l.contains("validation fault") && l.contains(&key)),
        "{log}"
    );
}

//! Stale disks and clocks (issue 20): a copy of the database older than its
//! replica's newest state is refused (and accepted with `--takeover`, which
//! then restores by lineage); a writer whose clock is hours behind still
//! makes the newest generation; one whose clock is hours ahead cannot make
//! retention delete what a restore inside the window needs.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn rows(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

/// Adds `n` rows, one transaction each, then closes the connection (the
/// last connection's close checkpoints the WAL, as applications do).
fn add(db: &Path, n: usize) {
    let c = app(db);
    c.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    for i in 0..n {
        c.execute("INSERT INTO t(v) VALUES (?1)", [format!("row {i}")])
            .unwrap();
    }
}

fn replica_url(replica: &Path) -> String {
    format!("file://{}", replica.display())
}

/// Replicates `db` until everything committed is shipped, then stops it.
fn replicate_once(db: &Path, replica: &Path, log: &Path, prefix: &[&str], extra: &[&str]) {
    let url = replica_url(replica);
    let mut args = vec![db.to_str().unwrap(), url.as_str()];
    args.extend_from_slice(extra);
    let p = Proc::start_with(prefix, &args, log);
    p.wait_for(
        "starting new generation|resuming generation",
        Duration::from_secs(30),
    );
    p.stop();
}

fn copy_files(db: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for suffix in ["", "-wal", "-walstream-lineage"] {
        let from = PathBuf::from(format!("{}{suffix}", db.display()));
        if from.exists() {
            std::fs::copy(&from, to.join(from.file_name().unwrap())).unwrap();
        }
    }
}

fn restored_rows(replica: &Path, out: &Path, extra: &[&str]) -> i64 {
    let _ = std::fs::remove_file(out);
    restore_ok(replica, out, extra);
    rows(out)
}

/// A node started from an old image of its disk (200 rows) while the
/// replica holds 500: refused, naming both states, and nothing written;
/// another database given the replica is refused too. With `--takeover`
/// the old copy becomes the newest state, and restore returns it (by
/// lineage, though the replica also holds a later-dated generation).
#[test]
fn a_stale_copy_is_refused_unless_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node");
    std::fs::create_dir(&node).unwrap();
    let db = node.join("app.db");
    let replica = dir.path().join("replica");
    let image = dir.path().join("image");
    add(&db, 200);
    replicate_once(&db, &replica, &dir.path().join("1.log"), &[], &[]);
    copy_files(&db, &image);
    add(&db, 300);
    replicate_once(&db, &replica, &dir.path().join("2.log"), &[], &[]);
    let out = dir.path().join("out.db");
    assert_eq!(restored_rows(&replica, &out, &[]), 500);

    // The disk comes back from the image.
    for f in std::fs::read_dir(&node).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    for f in std::fs::read_dir(&image).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, node.join(f.file_name().unwrap())).unwrap();
    }
    assert_eq!(rows(&db), 200);
    let before = std::fs::read_dir(replica.join("generations"))
        .unwrap()
        .count();
    let o = walstream(&["replicate", db.to_str().unwrap(), &replica_url(&replica)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a stale copy was accepted:\n{err}");
    assert!(
        err.contains("is not the newest state") && err.contains("--takeover"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(replica.join("generations"))
            .unwrap()
            .count(),
        before,
        "the refused copy wrote a generation"
    );
    assert_eq!(restored_rows(&replica, &out, &[]), 500);

    // Another database given this replica by mistake.
    let other = dir.path().join("other.db");
    add(&other, 7);
    let o = walstream(&["replicate", other.to_str().unwrap(), &replica_url(&replica)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "another database was accepted:\n{err}");
    assert!(
        err.contains("belongs to database") && err.contains(db.to_str().unwrap()),
        "{err}"
    );

    // Taken over: the old copy is the replica's newest state.
    replicate_once(
        &db,
        &replica,
        &dir.path().join("3.log"),
        &[],
        &["--takeover"],
    );
    assert_eq!(restored_rows(&replica, &out, &[]), 200);
    let v = walstream(&["verify", replica.to_str().unwrap()]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

/// A prefix that runs a program with its clock shifted by `offset` (e.g.
/// `-2h`): libfaketime (Debian package faketime) preloaded through `env`,
/// which execs, so signals reach the program itself. `None`: not installed
/// (a skip, unless CI requires it).
fn faketime(offset: &str) -> Option<Vec<String>> {
    faketime_env(&[format!("FAKETIME={offset}")])
}

/// As `faketime`, with libfaketime's settings given as `NAME=value`.
fn faketime_env(settings: &[String]) -> Option<Vec<String>> {
    let lib = ["/usr/lib/faketime"]
        .into_iter()
        .map(PathBuf::from)
        .chain(
            std::fs::read_dir("/usr/lib")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join("faketime")),
        )
        .map(|d| d.join("libfaketimeMT.so.1"))
        .find(|p| p.exists());
    let Some(lib) = lib else {
        assert!(
            std::env::var_os("WALSTREAM_REQUIRE_REAL_CLIENTS").is_none(),
            "libfaketime is required (Debian package faketime)"
        );
        eprintln!("skipped: faketime not installed");
        return None;
    };
    let mut prefix = vec![
        "env".into(),
        format!("LD_PRELOAD={}", lib.display()),
        "FAKETIME_DONT_FAKE_MONOTONIC=1".into(),
    ];
    prefix.extend_from_slice(settings);
    Some(prefix)
}

/// Node A (a correct clock) replicates; node B restores it, writes more and
/// replicates under a clock two hours behind. Restore latest returns B's
/// state: B's generation is the newest by lineage, not by B's clock.
#[test]
fn a_writer_with_its_clock_behind_still_makes_the_newest_generation() {
    let Some(behind) = faketime("-2h") else {
        return;
    };
    let behind: Vec<&str> = behind.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.db");
    let b = dir.path().join("b.db");
    let replica = dir.path().join("replica");
    add(&a, 100);
    replicate_once(&a, &replica, &dir.path().join("a.log"), &[], &[]);
    restore_ok(&replica, &b, &[]);
    add(&b, 50);
    let log = dir.path().join("b.log");
    replicate_once(&b, &replica, &log, &behind, &[]);
    let out = dir.path().join("out.db");
    assert_eq!(restored_rows(&replica, &out, &[]), 150);
    // Its generation records the one it continues.
    let mut gens: Vec<_> = std::fs::read_dir(replica.join("generations"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    gens.sort();
    assert_eq!(gens.len(), 2, "{gens:?}");
    let manifest = std::fs::read_to_string(
        replica
            .join("generations")
            .join(&gens[1])
            .join("generation.json"),
    )
    .unwrap();
    assert!(
        manifest.contains("\"previous\"") && manifest.contains(&gens[0]),
        "{manifest}"
    );
}

/// A database replicated with a correct clock, with snapshots every second,
/// then resumed by a process whose clock is two hours ahead, with a one
/// hour retention checked every 300 ms. By its clock everything before the
/// newest snapshot is older than the window; by the storage's, none of it
/// is: a restore to a point in the middle of the first run still works.
#[test]
fn a_writer_with_its_clock_ahead_cannot_prune_the_window() {
    let Some(ahead) = faketime("+2h") else {
        return;
    };
    let ahead: Vec<&str> = ahead.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let cfg = replicate_config(
        dir.path(),
        "w.yml",
        &db,
        &format!(
            "path: {}\n        retention: 1h\n        retention-check-interval: 300ms\n        snapshot-interval: 1s",
            replica.display()
        ),
        "",
    );
    add(&db, 10);
    let p = Proc::start(
        &["--config", cfg.to_str().unwrap()],
        &dir.path().join("1.log"),
    );
    p.wait_for("starting new generation", Duration::from_secs(30));
    let c = app(&db);
    let insert = |n: usize| {
        for _ in 0..n {
            c.execute("INSERT INTO t(v) VALUES ('x')", []).unwrap();
        }
    };
    insert(20);
    std::thread::sleep(Duration::from_millis(1500));
    let mid = chrono::Utc::now();
    let mid_rows = rows(&db);
    std::thread::sleep(Duration::from_millis(1500));
    insert(20);
    std::thread::sleep(Duration::from_millis(1500));
    insert(20);
    std::thread::sleep(Duration::from_millis(500));
    p.stop();
    drop(c);

    let p = Proc::start_with(
        &ahead,
        &["--config", cfg.to_str().unwrap()],
        &dir.path().join("2.log"),
    );
    p.wait_for(
        "starting new generation|resuming generation",
        Duration::from_secs(30),
    );
    add(&db, 5);
    std::thread::sleep(Duration::from_secs(3));
    let log = p.stop();
    let out = dir.path().join("out.db");
    let at = mid.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    assert_eq!(
        restored_rows(&replica, &out, &["--timestamp", &at]),
        mid_rows,
        "{log}"
    );
    assert_eq!(restored_rows(&replica, &out, &[]), rows(&db));
}

/// The system clock jumps three hours forward under a running replicator
/// with a one hour retention: it says so.
#[test]
fn a_clock_jump_past_the_retention_window_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let Some(prefix) = faketime_env(&[
        format!("FAKETIME_TIMESTAMP_FILE={}", offset.display()),
        "FAKETIME_CACHE_DURATION=1".into(),
    ]) else {
        return;
    };
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let cfg = replicate_config(
        dir.path(),
        "w.yml",
        &db,
        &format!(
            "path: {}\n        retention: 1h\n        retention-check-interval: 300ms",
            replica.display()
        ),
        "",
    );
    add(&db, 3);
    let p = Proc::start_with(
        &prefix,
        &["--config", cfg.to_str().unwrap()],
        &dir.path().join("1.log"),
    );
    p.wait_for("starting new generation", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    assert!(!p.log().contains("clock jumped"), "{}", p.log());
    std::fs::write(&offset, "+3h\n").unwrap();
    p.wait_for("the system clock jumped", Duration::from_secs(20));
    p.stop();
}

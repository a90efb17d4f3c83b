//! A restore never hands SQLite a file it will misread: it refuses to write
//! a database beside a stale `-wal`, `-shm` or `-journal` (SQLite would read
//! them together with the restored file), and it cleans up the temporary
//! files of earlier restores that were killed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn side(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

fn restore(replica: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["restore", "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push(replica.to_str().unwrap());
    walstream(&args)
}

/// Names in `dir`, sorted.
/// The files in `dir`, but the lineage records a successful restore leaves
/// beside its output (see `walstream::lineage`).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with("-walstream-lineage"))
        .collect();
    v.sort();
    v
}

/// Asserts that the restore refused with one line naming `stale`, wrote no
/// output and left `stale` as it was.
fn assert_refused(o: &Output, out: &Path, stale: &Path, stale_bytes: &[u8]) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected a refusal, got success: {err}"
    );
    assert!(
        err.contains(&stale.display().to_string()),
        "stderr does not name {}:\n{err}",
        stale.display()
    );
    assert!(err.contains("move it away"), "no advice:\n{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{err}");
    assert!(!out.exists(), "{} was written", out.display());
    assert_eq!(
        std::fs::read(stale).unwrap(),
        stale_bytes,
        "stale file changed"
    );
    let dir = out.parent().unwrap();
    assert!(
        !names(dir).iter().any(|n| n.contains("walstream-")),
        "temporary files left: {:?}",
        names(dir)
    );
}

/// Replicates a database with a few segments. Returns the database, the
/// replica, and a copy of the database's `-wal` as it was after the first
/// batch of transactions (an old WAL of the same database).
fn replicated(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let db = dir.join("app.db");
    let replica = dir.join("replica");
    let mut c = app(&db);
    create_items(&c);
    let w = Replicating::db(&db, &replica);
    let mut rng = Rng::new(16);
    let mut old_wal = Vec::new();
    for round in 0..4 {
        for _ in 0..8 {
            random_txn(&mut c, &mut rng);
        }
        if round == 0 {
            old_wal = std::fs::read(side(&db, "-wal")).unwrap();
        }
        w.wait_quiet();
    }
    w.stop();
    assert!(old_wal.len() > 32, "the old WAL holds frames");
    (db, replica, old_wal)
}

/// The hazard itself: with the same database's old WAL beside it, SQLite
/// does not read the restored file as it was restored.
fn misread_by_sqlite(restored: &Path, source: &Path, wal: &[u8]) -> bool {
    std::fs::write(side(restored, "-wal"), wal).unwrap();
    let c = rusqlite::Connection::open(restored).unwrap();
    let ok = c
        .query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
        .map(|r| r == "ok")
        .unwrap_or(false);
    drop(c);
    !ok || std::panic::catch_unwind(|| dump(restored) != dump(source)).unwrap_or(true)
}

#[test]
fn the_same_databases_old_wal_beside_the_output_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (db, replica, old_wal) = replicated(dir.path());
    // The scenario is real: a plain restore plus that WAL is misread.
    let probe = dir.path().join("probe");
    std::fs::create_dir(&probe).unwrap();
    restore_ok(&replica, &probe.join("p.db"), &[]);
    assert_same(&db, &probe.join("p.db"));
    assert!(
        misread_by_sqlite(&probe.join("p.db"), &db, &old_wal),
        "the old WAL did not change what SQLite reads; the test proves nothing"
    );

    let outdir = dir.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("restored.db");
    let stale = side(&out, "-wal");
    std::fs::write(&stale, &old_wal).unwrap();
    let o = restore(&replica, &out, &[]);
    assert_refused(&o, &out, &stale, &old_wal);
    assert!(stderr(&o).contains("write-ahead log"), "{}", stderr(&o));

    // --if-db-not-exists: the database is missing, but restoring would hand
    // SQLite the same misread file, so it refuses too.
    let o = restore(&replica, &out, &["--if-db-not-exists"]);
    assert_refused(&o, &out, &stale, &old_wal);

    // Once the stale file is moved away, the restore goes through.
    std::fs::rename(&stale, outdir.join("moved-away")).unwrap();
    restore_ok(&replica, &out, &[]);
    assert_same(&db, &out);
}

#[test]
fn an_unrelated_databases_wal_beside_the_output_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (db, replica, _) = replicated(dir.path());
    // Another database with committed rows still in its WAL.
    let other = dir.path().join("other.db");
    let c = app(&other);
    c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    c.execute_batch("CREATE TABLE other_rows(x INTEGER PRIMARY KEY, y TEXT)")
        .unwrap();
    for i in 0..200 {
        c.execute("INSERT INTO other_rows VALUES (?1, 'not yours')", [i])
            .unwrap();
    }
    let wal = std::fs::read(side(&other, "-wal")).unwrap();
    drop(c);

    let probe = dir.path().join("probe");
    std::fs::create_dir(&probe).unwrap();
    restore_ok(&replica, &probe.join("p.db"), &[]);
    assert!(
        misread_by_sqlite(&probe.join("p.db"), &db, &wal),
        "the unrelated WAL did not change what SQLite reads; the test proves nothing"
    );

    let outdir = dir.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("restored.db");
    let stale = side(&out, "-wal");
    std::fs::write(&stale, &wal).unwrap();
    let o = restore(&replica, &out, &[]);
    assert_refused(&o, &out, &stale, &wal);
}

#[test]
fn a_stale_shm_or_journal_alone_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (db, replica, _) = replicated(dir.path());
    // A real -shm: the source's, copied while a connection holds it.
    let shm = {
        let _c = app(&db);
        std::fs::read(side(&db, "-shm")).unwrap()
    };
    assert!(!shm.is_empty());
    let outdir = dir.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("restored.db");

    let stale = side(&out, "-shm");
    std::fs::write(&stale, &shm).unwrap();
    let o = restore(&replica, &out, &[]);
    assert_refused(&o, &out, &stale, &shm);
    std::fs::remove_file(&stale).unwrap();

    // A hot rollback journal of another database would be rolled back into
    // the restored file.
    let journal = b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7 not really a journal".to_vec();
    let stale = side(&out, "-journal");
    std::fs::write(&stale, &journal).unwrap();
    let o = restore(&replica, &out, &["--if-db-not-exists"]);
    assert_refused(&o, &out, &stale, &journal);
    assert!(stderr(&o).contains("rollback journal"), "{}", stderr(&o));
    std::fs::remove_file(&stale).unwrap();

    restore_ok(&replica, &out, &[]);
    assert_same(&db, &out);
}

/// The pid of a process that has exited.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn temporary_files_of_a_dead_restore_are_removed_and_a_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (db, replica, _) = replicated(dir.path());
    let outdir = dir.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("restored.db");
    let dead = dead_pid();
    let live = std::process::id();
    let dead_files = [
        (
            format!(".restored.db.walstream-restore.{dead}"),
            123_456usize,
        ),
        (format!(".restored.db.walstream-restore.{dead}-wal"), 4_128),
        (format!(".restored.db.walstream-snapshot.{dead}"), 77_000),
    ];
    let kept_files = [
        // A restore that is still running (this test's own process).
        format!(".restored.db.walstream-restore.{live}"),
        // A dead restore of another output in the same directory.
        format!(".other.db.walstream-restore.{dead}"),
    ];
    for (name, size) in &dead_files {
        std::fs::write(outdir.join(name), vec![0x5a; *size]).unwrap();
    }
    for name in &kept_files {
        std::fs::write(outdir.join(name), b"in use").unwrap();
    }

    let o = restore(&replica, &out, &[]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    integrity_ok(&out);
    assert_same(&db, &out);
    for (name, size) in &dead_files {
        let path = outdir.join(name);
        assert!(!path.exists(), "{name} is still there");
        let line = err
            .lines()
            .find(|l| l.contains(&format!("path={} ", path.display())))
            .unwrap_or_else(|| panic!("stderr does not mention {name}:\n{err}"));
        assert!(line.contains(&size.to_string()), "no size in {line:?}");
        assert!(line.contains("removed"), "{line:?}");
    }
    for name in &kept_files {
        assert_eq!(
            std::fs::read(outdir.join(name)).unwrap(),
            b"in use",
            "{name} was touched"
        );
        assert!(!err.contains(name.as_str()), "{name} mentioned:\n{err}");
    }
    let mut expected = vec!["restored.db".to_string()];
    expected.extend(kept_files.iter().cloned());
    expected.sort();
    assert_eq!(names(&outdir), expected);
}

/// A leftover named with the restoring process's own id (in a container a
/// restore often runs as PID 1 every time) is from an earlier, killed
/// restore: it must not block this one.
#[test]
fn a_leftover_with_the_restorers_own_pid_does_not_block_it() {
    let dir = tempfile::tempdir().unwrap();
    let (db, replica, _) = replicated(dir.path());
    let outdir = dir.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("restored.db");
    let own = std::process::id();
    for kind in ["restore", "snapshot"] {
        std::fs::write(
            outdir.join(format!(".restored.db.walstream-{kind}.{own}")),
            vec![1u8; 5000],
        )
        .unwrap();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = walstream::restore::RestoreOptions {
        output: out.clone(),
        concurrency: 2,
        ..Default::default()
    };
    let storage = std::sync::Arc::new(walstream::storage::FileStorage::new(replica));
    rt.block_on(walstream::restore::restore(
        &walstream::replica::Replica::new(storage),
        &opts,
    ))
    .unwrap();
    assert_same(&db, &out);
    assert_eq!(names(&outdir), ["restored.db"]);
}

/// A replica of a ~32 MB database, large enough that a restore of it can be
/// caught halfway. Returns the database and the replica.
fn big_replica(dir: &Path) -> (PathBuf, PathBuf) {
    let db = dir.join("big.db");
    let replica = dir.join("replica");
    let c = app(&db);
    c.execute_batch("CREATE TABLE big(id INTEGER PRIMARY KEY, b BLOB)")
        .unwrap();
    let w = Replicating::db(&db, &replica);
    let mut rng = Rng::new(5);
    for _ in 0..8 {
        let tx = c.unchecked_transaction().unwrap();
        for _ in 0..40 {
            tx.execute("INSERT INTO big(b) VALUES (?1)", [rng.bytes(100_000)])
                .unwrap();
        }
        tx.commit().unwrap();
    }
    w.wait_quiet();
    w.stop();
    (db, replica)
}

/// Starts restores of `replica` into `out` until one is caught halfway (its
/// temporary file has data in it) and `act` has run while it was stopped
/// there (SIGSTOP);
/// `act` gets its pid and says whether to keep that attempt. After an
/// attempt that is not kept, `outdir` is emptied. Returns the pid and the
/// restore's output.
fn catch_a_restore_halfway(
    replica: &Path,
    outdir: &Path,
    out: &Path,
    mut act: impl FnMut(&mut std::process::Child) -> bool,
    mut keep: impl FnMut(&Output) -> bool,
) -> (u32, Output) {
    let mut last = String::new();
    for _ in 0..10 {
        let mut child = std::process::Command::new(bin())
            .args([
                "restore",
                "-o",
                out.to_str().unwrap(),
                replica.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let name = out.file_name().unwrap().to_string_lossy().into_owned();
        let tmp = outdir.join(format!(".{name}.walstream-restore.{pid}"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut acted = false;
        loop {
            if std::fs::metadata(&tmp).is_ok_and(|m| m.len() > 0) {
                // Hold it still, and act only if it has not renamed yet.
                unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
                if tmp.exists() {
                    acted = act(&mut child);
                }
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
                break;
            }
            if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let o = child.wait_with_output().unwrap();
        if acted && keep(&o) {
            return (pid, o);
        }
        last = format!(
            "caught halfway: {acted}, exit: {}, stderr: {}",
            o.status,
            stderr(&o)
        );
        for n in names(outdir) {
            std::fs::remove_file(outdir.join(n)).unwrap();
        }
    }
    panic!("no restore caught halfway ended as expected in 10 attempts; the last: {last}");
}

/// The real thing: a restore killed with SIGKILL halfway leaves its
/// temporary file, and the next restore removes it and says so.
#[test]
fn a_restore_killed_with_sigkill_is_cleaned_up_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let (db, replica) = big_replica(dir.path());
    let outdir = dir.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("restored.db");
    let (pid, _) = catch_a_restore_halfway(
        &replica,
        &outdir,
        &out,
        |child| {
            child.kill().unwrap();
            true
        },
        |_| !out.exists(),
    );
    let left: Vec<String> = names(&outdir)
        .into_iter()
        .filter(|n| n.starts_with(".restored.db.walstream-") && n.contains(&pid.to_string()))
        .collect();
    assert!(
        !left.is_empty(),
        "SIGKILL left nothing: {:?}",
        names(&outdir)
    );

    let o = restore(&replica, &out, &[]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_same(&db, &out);
    for n in &left {
        assert!(err.contains(n.as_str()), "{n} not mentioned:\n{err}");
    }
    assert_eq!(names(&outdir), ["restored.db"]);
}

/// A stale WAL that appears while the restore runs is caught by the check
/// just before the rename: refused, nothing written.
#[test]
fn a_wal_appearing_during_the_restore_is_refused_before_the_rename() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, replica) = big_replica(dir.path());
    let outdir = dir.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("restored.db");
    let stale = side(&out, "-wal");
    let wal = b"appeared meanwhile".to_vec();
    let (_, o) = catch_a_restore_halfway(
        &replica,
        &outdir,
        &out,
        |_| {
            std::fs::write(&stale, &wal).unwrap();
            true
        },
        // A restore already past its last check may still succeed.
        |o| !o.status.success(),
    );
    assert_refused(&o, &out, &stale, &wal);
}

/// A file that appears at the output while the restore runs is never
/// replaced.
#[test]
fn an_output_appearing_during_the_restore_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, replica) = big_replica(dir.path());
    let outdir = dir.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("restored.db");
    let theirs = b"someone else's file".to_vec();
    let (_, o) = catch_a_restore_halfway(
        &replica,
        &outdir,
        &out,
        |_| {
            std::fs::write(&out, &theirs).unwrap();
            true
        },
        // A restore already past its rename has replaced nothing.
        |o| !o.status.success(),
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("appeared during the restore"), "{err}");
    assert!(err.contains(&out.display().to_string()), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), theirs);
    assert_eq!(names(&outdir), ["restored.db"]);
}

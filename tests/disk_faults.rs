//! Full and read-only disks, made real with a small tmpfs mounted in a
//! private mount namespace (`unshare -rm`, no privileges needed where user
//! namespaces are enabled; the tests say so and skip where they are not).

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// Runs `script` with `sh` in a private mount namespace; `None` when the
/// machine does not allow one.
fn in_namespace(script: &str) -> Option<Output> {
    let probe = Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: no private mount namespace here (unshare -rm)");
        return None;
    }
    Some(
        Command::new("unshare")
            .args(["-rm", "sh", "-c", script])
            .env("RUST_LOG", "walstream=info")
            .output()
            .unwrap(),
    )
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn replica_of_a_large_database(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let db = dir.join("big.db");
    let replica = dir.join("replica");
    let c = app(&db);
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    for i in 0..200 {
        c.execute("INSERT INTO t VALUES (?1, randomblob(4000))", [i])
            .unwrap();
    }
    let w = Replicating::db(&db, &replica);
    w.wait_quiet();
    w.stop();
    (db, replica)
}

#[test]
fn restore_onto_a_full_or_read_only_disk_fails_clearly_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, replica) = replica_of_a_large_database(dir.path());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let bin = bin();
    // A disk with room for a small precious file but not the database.
    let script = format!(
        "set -e; mount -t tmpfs -o size=300k tmpfs {m}; echo precious > {m}/keep.db; \
         if {b} restore -o {m}/big.db {r}; then echo RESTORE-SUCCEEDED; fi; \
         echo LISTING; ls -A {m}; echo CONTENT; cat {m}/keep.db; \
         mount -o remount,ro {m}; \
         if {b} restore -o {m}/other.db {r}; then echo RO-SUCCEEDED; fi; echo RO-LISTING; ls -A {m}",
        m = mnt.display(),
        b = bin.display(),
        r = replica.display()
    );
    let Some(o) = in_namespace(&script) else {
        return;
    };
    let out = text(&o);
    assert!(!out.contains("RESTORE-SUCCEEDED"), "{out}");
    assert!(out.contains("No space left on device"), "{out}");
    assert!(
        out.contains(&mnt.display().to_string()),
        "the error names the path: {out}"
    );
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        !stdout.contains("walstream: error"),
        "errors belong on stderr"
    );
    let listing = stdout.split("LISTING").nth(1).unwrap();
    let files: Vec<&str> = listing
        .split("CONTENT")
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(files, ["keep.db"], "a partial file was left: {out}");
    assert!(stdout.contains("CONTENT\nprecious"), "{out}");
    assert_eq!(
        String::from_utf8_lossy(&o.stderr)
            .matches("No space left on device")
            .count(),
        1,
        "one clear line: {out}"
    );
    assert!(!out.contains("RO-SUCCEEDED"), "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    let ro: Vec<&str> = stdout
        .split("RO-LISTING")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(ro, ["keep.db"], "{out}");
}

/// The replica's disk fills up while the application writes: walstream
/// keeps the unshipped frames (the application never notices), reports the
/// error, and once space is freed catches up; nothing partial is visible.
#[test]
fn a_full_replica_disk_delays_but_loses_nothing() {
    replica_disk_fault(
        "dd if=/dev/zero of={m}/filler bs=1k count=2000 2>/dev/null",
        "rm {m}/filler",
        "No space left on device",
    );
}

#[test]
fn a_read_only_replica_disk_delays_but_loses_nothing() {
    replica_disk_fault(
        "mount -o remount,ro {m}",
        "mount -o remount,rw {m}",
        "Read-only file system",
    );
}

/// walstream replicates to a small tmpfs; `fault` breaks it while the
/// application keeps writing, `repair` mends it. The error is reported (naming
/// the OS error `expect`), the application is never held up, and once
/// repaired the replica catches up and restores exactly. (`{m}` in the
/// commands is the mount point.)
fn replica_disk_fault(fault: &str, repair: &str, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let mnt = dir.path().join("mnt");
    let copy = dir.path().join("replica-copy");
    let (free, stop) = (dir.path().join("free-now"), dir.path().join("stop-now"));
    std::fs::create_dir(&mnt).unwrap();
    let mut c = app(&db);
    create_items(&c);
    let log = dir.path().join("walstream.log");
    let script = format!(
        "mount -t tmpfs -o size=1m tmpfs {m}; mkdir {m}/replica; \
         {b} replicate {db} {m}/replica 2> {log} & pid=$!; \
         sleep 1; {fault}; \
         while [ ! -e {free} ]; do sleep 0.05; done; {repair}; \
         while [ ! -e {stop} ]; do sleep 0.05; done; kill -TERM $pid; wait $pid; echo EXIT=$?; \
         cp -r {m}/replica {copy}",
        m = mnt.display(),
        b = bin().display(),
        db = db.display(),
        log = log.display(),
        free = free.display(),
        stop = stop.display(),
        copy = copy.display(),
        fault = fault.replace("{m}", &mnt.display().to_string()),
        repair = repair.replace("{m}", &mnt.display().to_string()),
    );
    let probe = Command::new("unshare")
        .args(["-rm", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !probe {
        eprintln!("skipped: no private mount namespace here (unshare -rm)");
        return;
    }
    let mut child = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .env("RUST_LOG", "walstream=debug")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // The disk is broken now; the application writes on regardless.
    let mut rng = Rng::new(8);
    let t = Instant::now();
    for _ in 0..60 {
        random_txn(&mut c, &mut rng);
        std::thread::sleep(Duration::from_millis(10));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains(expect)
    {
        assert!(
            Instant::now() < deadline,
            "no {expect:?} reported:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the application was held up"
    );
    std::fs::write(&free, "").unwrap();
    for _ in 0..10 {
        random_txn(&mut c, &mut rng);
    }
    // Catch up: wait until the log shows shipping after the error.
    std::thread::sleep(Duration::from_secs(3));
    std::fs::write(&stop, "").unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    child.wait().unwrap();
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(out.contains("EXIT=0"), "{out}\n{log_text}");
    assert!(log_text.contains("will retry"), "{log_text}");
    // The error names the object it could not write and the replica.
    let line = log_text.lines().find(|l| l.contains(expect)).unwrap();
    assert!(
        line.contains("put generations/")
            && line.contains(&format!("in file://{}/replica", mnt.display())),
        "{line}"
    );
    let restored = dir.path().join("restored.db");
    restore_ok(&copy, &restored, &[]);
    assert_same(&db, &restored);
}

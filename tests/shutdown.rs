//! SIGTERM ends `walstream replicate` within `shutdown-timeout` (+ 1 s) in
//! every state: healthy, storage gone mid-run (hanging or failing every
//! request), failing and restarting, waiting for the database, starting up,
//! and with `--exec`. The exit is 0 only when everything committed reached
//! every replica; otherwise each replica that misses commits is named, with
//! its database and the position after which nothing was shipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::faultproxy::FaultProxy;
use common::s3server::{S3Server, AK, BUCKET, SK};
use common::*;

/// The timeout every test runs with, and the slack the bound allows.
const TIMEOUT: Duration = Duration::from_secs(2);
const SLACK: Duration = Duration::from_secs(1);

fn insert_rows(db: &Path, from: i64, to: i64) {
    let mut c = app(db);
    c.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    let tx = c.transaction().unwrap();
    for i in from..to {
        tx.execute(
            "INSERT INTO t VALUES (?1, ?2)",
            rusqlite::params![i, format!("row {i}")],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

fn rows(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

/// A config with one S3 replica at `addr` (explicit endpoint, region and
/// credentials, as the other S3 tests give them), under the database's
/// name (see `s3_name`).
fn s3_config(dir: &Path, db: &Path, addr: std::net::SocketAddr, extra_top: &str) -> PathBuf {
    let stem = db.file_stem().unwrap().to_str().unwrap();
    let cfg = dir.join(format!("s3-{stem}-{}.yml", addr.port()));
    std::fs::write(
        &cfg,
        format!(
            "{extra_top}dbs:\n  - path: {}\n    monitor-interval: 100ms\n    replicas:\n      - type: s3\n        bucket: {BUCKET}\n        path: {stem}\n        endpoint: http://{addr}\n        region: us-east-1\n        force-path-style: true\n        access-key-id: {AK}\n        secret-access-key: {SK}\n        sync-interval: 100ms\n",
            db.display()
        ),
    )
    .unwrap();
    cfg
}

fn sigterm(child: &Child) -> Instant {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    Instant::now()
}

/// Waits for the exit and asserts it came within the bound.
fn exit_within_bound(child: &mut Child, since: Instant, lines: &Lines) -> ExitStatus {
    let status = wait_timeout(child, TIMEOUT + Duration::from_secs(20));
    let took = since.elapsed();
    assert!(
        took <= TIMEOUT + SLACK,
        "exited {took:?} after SIGTERM (shutdown-timeout {TIMEOUT:?}):\n{}",
        lines.lock().unwrap().join("\n")
    );
    status
}

/// How the S3 replica of `db` is named.
fn s3_name(db: &Path) -> String {
    format!(
        "s3://{BUCKET}/{}",
        db.file_stem().unwrap().to_str().unwrap()
    )
}

/// The error line that names `db`, `replica` and a position.
fn assert_named(log: &str, db: &Path, replica: &str) {
    let line = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("not shipped"))
        .unwrap_or_else(|| panic!("no 'not shipped' line:\n{log}"));
    assert!(
        line.contains(&db.display().to_string()) && line.contains(replica),
        "{line}"
    );
    assert!(line.contains("position"), "{line}");
}

#[test]
fn healthy_replicas_exit_zero_at_once_with_everything_restorable() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let file_replica = dir.path().join("replica");
    insert_rows(&db, 0, 10);
    // Both kinds of replica; a sync-interval of an hour on the directory so
    // its last rows only go up with the final shipment.
    let cfg = s3_config(dir.path(), &db, server.addr, "shutdown-timeout: 2s\n");
    let text = std::fs::read_to_string(&cfg).unwrap()
        + &format!(
            "      - path: {}\n        sync-interval: 1h\n",
            file_replica.display()
        );
    std::fs::write(&cfg, text).unwrap();
    let mut w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    insert_rows(&db, 10, 400);
    let t = sigterm(&w.child);
    let status = wait_timeout(&mut w.child, Duration::from_secs(20));
    let took = t.elapsed();
    assert!(status.success(), "{status:?}:\n{}", w.log());
    assert!(took < TIMEOUT, "a healthy stop took {took:?}:\n{}", w.log());
    assert!(!w.log().contains("not shipped"), "{}", w.log());
    let out = dir.path().join("file.db");
    restore_ok(&file_replica, &out, &[]);
    assert_same(&db, &out);
    let out = dir.path().join("s3.db");
    let o = walstream(&[
        "restore",
        "--config",
        cfg.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        db.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&db, &out);
}

/// S3 stops answering mid-run (every request hangs): the stop still ends on
/// time, non-zero, naming what was not shipped; what was shipped before
/// restores.
#[test]
fn storage_that_hangs_mid_run() {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    insert_rows(&db, 0, 100);
    let cfg = s3_config(dir.path(), &db, proxy.addr, "");
    let mut w = Replicating::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "--shutdown-timeout",
        "2s",
    ]);
    insert_rows(&db, 100, 200);
    w.wait_quiet();
    proxy.rates.hang.store(true, Ordering::SeqCst);
    insert_rows(&db, 200, 300);
    std::thread::sleep(Duration::from_millis(500));
    let t = sigterm(&w.child);
    let status = exit_within_bound(&mut w.child, t, &w.lines);
    let log = w.log();
    assert!(!status.success(), "{log}");
    assert_named(&log, &db, &s3_name(&db));
    // What went up before the outage restores (directly from the server).
    let direct = s3_config(dir.path(), &db, server.addr, "");
    let out = dir.path().join("out.db");
    let o = walstream(&[
        "restore",
        "--config",
        direct.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        db.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    integrity_ok(&out);
    let n = rows(&out);
    assert!((200..300).contains(&n), "restored {n} rows");
}

/// S3 answers every request with 500 (the SDK retries each, walstream
/// retries each round): SIGTERM in that failing-and-retrying state.
#[test]
fn storage_that_fails_every_request_mid_run() {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    insert_rows(&db, 0, 100);
    let cfg = s3_config(dir.path(), &db, proxy.addr, "shutdown-timeout: 2s\n");
    let mut w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    w.wait_quiet();
    proxy.rates.internal_error.store(1000, Ordering::SeqCst);
    insert_rows(&db, 100, 200);
    w.wait_for("will retry", Duration::from_secs(30));
    let t = sigterm(&w.child);
    let status = exit_within_bound(&mut w.child, t, &w.lines);
    let log = w.log();
    assert!(!status.success(), "{log}");
    assert_named(&log, &db, &s3_name(&db));
}

/// A worker that failed and keeps restarting (the database was replaced and
/// the replica cannot take a new generation): SIGTERM ends it on time, where
/// it used to wait out its back-off and start over for ever.
#[test]
fn sigterm_while_restarting_after_failures() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    insert_rows(&db, 0, 50);
    let mut w = Replicating::start(&[
        "--shutdown-timeout",
        "2s",
        db.to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    w.wait_quiet();
    // Nothing more can be stored: the generations directory becomes a file.
    let gens = replica.join("generations");
    std::fs::rename(&gens, replica.join("generations.saved")).unwrap();
    std::fs::write(&gens, "in the way").unwrap();
    // And the database is replaced by another file: the worker starts over,
    // and every start fails.
    let other = dir.path().join("other.db");
    insert_rows(&other, 0, 70);
    std::fs::rename(&other, &db).unwrap();
    let _ = std::fs::remove_file(dir.path().join("app.db-wal"));
    let _ = std::fs::remove_file(dir.path().join("app.db-shm"));
    w.wait_for("will restart", Duration::from_secs(30));
    let t = sigterm(&w.child);
    let status = exit_within_bound(&mut w.child, t, &w.lines);
    let log = w.log();
    assert!(!status.success(), "{log}");
    assert_named(&log, &db, &replica.display().to_string());
}

/// Waiting for the application to create the database: nothing is
/// committed, so the stop is immediate and clean.
#[test]
fn sigterm_while_waiting_for_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("not-yet.db");
    let mut c = Command::new(bin())
        .args([
            "replicate",
            "--shutdown-timeout",
            "2s",
            db.to_str().unwrap(),
            dir.path().join("replica").to_str().unwrap(),
        ])
        .env("RUST_LOG", "walstream=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = collect(&mut c);
    wait_line(&lines, "waiting for database to be created");
    let t = sigterm(&c);
    let status = exit_within_bound(&mut c, t, &lines);
    assert!(
        status.success(),
        "{status:?}:\n{}",
        lines.lock().unwrap().join("\n")
    );
    assert!(
        t.elapsed() < TIMEOUT,
        "{}",
        lines.lock().unwrap().join("\n")
    );
}

/// Storage that never answers from the start: start-up waits on it, and a
/// SIGTERM then still ends the process on time, naming the replica.
#[test]
fn sigterm_while_starting_against_hanging_storage() {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr);
    proxy.rates.hang.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    insert_rows(&db, 0, 10);
    let cfg = s3_config(dir.path(), &db, proxy.addr, "shutdown-timeout: 2s\n");
    let mut c = Command::new(bin())
        .args(["replicate", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "walstream=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = collect(&mut c);
    while proxy.injected.requests.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = sigterm(&c);
    let status = exit_within_bound(&mut c, t, &lines);
    let log = lines.lock().unwrap().join("\n");
    assert!(!status.success(), "{log}");
    assert_named(&log, &db, &s3_name(&db));
}

/// `--exec`: the application's non-zero code wins over a failed shipment;
/// an application that exits 0 while a replica cannot ship gives a non-zero
/// exit; either way the stop is bounded from the application's exit.
#[test]
fn exec_codes_when_a_replica_cannot_ship() {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr);
    let dir = tempfile::tempdir().unwrap();
    for (app_code, want) in [(5, 5), (0, 1)] {
        let db = dir.path().join(format!("app{app_code}.db"));
        insert_rows(&db, 0, 10);
        proxy.rates.hang.store(false, Ordering::SeqCst);
        let cfg = s3_config(dir.path(), &db, proxy.addr, "shutdown-timeout: 2s\n");
        let go = dir.path().join(format!("go{app_code}"));
        let done = dir.path().join(format!("done{app_code}"));
        // The application waits for `go`, marks its exit, and exits.
        let exec = format!(
            "sh -c 'while [ ! -e {} ]; do sleep 0.02; done; touch {}; exit {app_code}'",
            go.display(),
            done.display()
        );
        let mut w = Replicating::start(&["--config", cfg.to_str().unwrap(), "--exec", &exec]);
        w.wait_for("started application", Duration::from_secs(20));
        w.wait_quiet();
        proxy.rates.hang.store(true, Ordering::SeqCst);
        insert_rows(&db, 10, 100);
        std::fs::write(&go, "").unwrap();
        while !done.exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = Instant::now();
        let status = exit_within_bound(&mut w.child, t, &w.lines);
        let log = w.log();
        assert_eq!(status.code(), Some(want), "{log}");
        assert_named(&log, &db, &s3_name(&db));
    }
    // And with a healthy replica the application's code passes through.
    proxy.rates.hang.store(false, Ordering::SeqCst);
    let db = dir.path().join("ok.db");
    insert_rows(&db, 0, 10);
    let cfg = s3_config(dir.path(), &db, proxy.addr, "shutdown-timeout: 2s\n");
    let mut w = Replicating::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "--exec",
        "sh -c 'exit 0'",
    ]);
    let status = wait_timeout(&mut w.child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", w.log());
}

type Lines = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

fn collect(c: &mut Child) -> Lines {
    use std::io::BufRead;
    let lines: Lines = Default::default();
    let sink = lines.clone();
    let stderr = c.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

fn wait_line(lines: &Lines, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lines.lock().unwrap().iter().any(|l| l.contains(needle)) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?}:\n{}",
            lines.lock().unwrap().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

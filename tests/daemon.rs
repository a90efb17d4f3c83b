//! Running walstream in production: `--exec`, many databases and replicas,
//! `dir:` discovery, metrics and health endpoints, JSON logs.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A metric's value for the series whose line contains every needle.
fn metric(text: &str, name: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let cfg = dir.join("walstream.yml");
    std::fs::write(&cfg, body).unwrap();
    cfg
}

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

fn restored_count(replica: &Path, out: &Path) -> i64 {
    restore_ok(replica, out, &[]);
    rusqlite::Connection::open(out)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

fn spawn(args: &[&str]) -> std::process::Child {
    Command::new(bin())
        .args(args)
        .env("RUST_LOG", "walstream=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn stderr_of(child: &mut std::process::Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

#[test]
fn exec_exit_code_passes_through_after_final_shipment() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    insert_rows(&db, 0, 10);
    // A sync-interval of an hour: rows committed while the app runs reach the
    // replica only through the shipment after the app exits.
    let cfg = write_config(
        dir.path(),
        &format!(
            "dbs:\n  - path: {}\n    replicas:\n      - path: {}\n        sync-interval: 1h\n",
            db.display(),
            replica.display()
        ),
    );
    let stop = dir.path().join("stop");
    // `exec:` in the config this time (the other tests use --exec).
    let exec = format!(
        "exec: \"sh -c 'while [ ! -e {} ]; do sleep 0.05; done; exit 4'\"\n",
        stop.display()
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, exec + &text).unwrap();
    let mut r = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    r.wait_for("started application", Duration::from_secs(20));
    insert_rows(&db, 10, 500);
    std::fs::write(&stop, "").unwrap();
    let status = wait_timeout(&mut r.child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(4), "{}", r.log());
    assert_eq!(restored_count(&replica, &dir.path().join("out.db")), 500);
}

#[test]
fn exec_forwards_sigterm_and_reports_death_by_signal() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    insert_rows(&db, 0, 1);
    let mark = dir.path().join("got-term");
    // The app traps TERM, leaves a mark and exits 42.
    let exec = format!(
        "sh -c \"trap 'touch {}; exit 42' TERM; while :; do sleep 0.05; done\"",
        mark.display()
    );
    let cfg = write_config(
        dir.path(),
        &format!(
            "dbs:\n  - path: {}\n    replicas:\n      - path: {}\n        sync-interval: 1h\n",
            db.display(),
            replica.display()
        ),
    );
    let mut r = Replicating::start(&["--config", cfg.to_str().unwrap(), "--exec", &exec]);
    r.wait_for("started application", Duration::from_secs(20));
    insert_rows(&db, 1, 300);
    unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
    let status = wait_timeout(&mut r.child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(42), "{}", r.log());
    assert!(mark.exists(), "the application did not receive SIGTERM");
    assert_eq!(restored_count(&replica, &dir.path().join("out.db")), 300);

    // Killed by a signal: 128 + 9, like a shell reports it.
    let db2 = dir.path().join("b.db");
    insert_rows(&db2, 0, 1);
    let mut c = spawn(&[
        "replicate",
        db2.to_str().unwrap(),
        dir.path().join("replica2").to_str().unwrap(),
        "--exec",
        "sh -c 'kill -KILL $$'",
    ]);
    assert_eq!(
        wait_timeout(&mut c, Duration::from_secs(30)).code(),
        Some(137)
    );
}

#[test]
fn exec_is_not_started_when_replication_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("app-ran");
    let exec = format!("touch {}", mark.display());
    // The database's directory does not exist.
    let mut c = spawn(&[
        "replicate",
        dir.path().join("missing/app.db").to_str().unwrap(),
        dir.path().join("replica").to_str().unwrap(),
        "--exec",
        &exec,
    ]);
    let status = wait_timeout(&mut c, Duration::from_secs(30));
    let err = stderr_of(&mut c);
    assert!(!status.success());
    assert!(err.contains("missing"), "{err}");
    assert!(
        !mark.exists(),
        "the application ran although replication did not start"
    );

    // A replica path that is a file.
    let db = dir.path().join("a.db");
    insert_rows(&db, 0, 1);
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let mut c = spawn(&[
        "replicate",
        db.to_str().unwrap(),
        file.to_str().unwrap(),
        "--exec",
        &exec,
    ]);
    assert!(!wait_timeout(&mut c, Duration::from_secs(30)).success());
    assert!(!mark.exists());

    // An application that cannot be started at all: named in the error.
    let mut c = spawn(&[
        "replicate",
        db.to_str().unwrap(),
        dir.path().join("replica").to_str().unwrap(),
        "--exec",
        "/nonexistent/app --serve",
    ]);
    let status = wait_timeout(&mut c, Duration::from_secs(30));
    let err = stderr_of(&mut c);
    assert!(!status.success());
    assert!(err.contains("/nonexistent/app"), "{err}");

    // An application that fails at once: its code, promptly.
    let mut c = spawn(&[
        "replicate",
        db.to_str().unwrap(),
        dir.path().join("replica").to_str().unwrap(),
        "--exec",
        "sh -c 'exit 3'",
    ]);
    assert_eq!(
        wait_timeout(&mut c, Duration::from_secs(30)).code(),
        Some(3)
    );
}

/// Two databases with two replicas each; one replica breaks mid-run and the
/// other three keep shipping; metrics move and readiness follows.
#[test]
fn replicas_fail_independently_and_readiness_follows() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    insert_rows(&a, 0, 1);
    insert_rows(&b, 0, 1);
    let r = |n: &str| dir.path().join(n);
    let addr = free_addr();
    let cfg = write_config(
        dir.path(),
        &format!(
            "addr: {addr}\nready-lag: 1s\ndbs:\n  - path: {}\n    monitor-interval: 200ms\n    replicas:\n      - path: {}\n      - path: {}\n  - path: {}\n    monitor-interval: 200ms\n    replicas:\n      - path: {}\n      - url: file://{}\n",
            a.display(),
            r("a1").display(),
            r("a2").display(),
            b.display(),
            r("b1").display(),
            r("b2").display()
        ),
    );
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    wait_until("readiness", Duration::from_secs(20), || {
        http_get(&addr, "/readyz").0 == 200
    });
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    let before = http_get(&addr, "/metrics").1;
    insert_rows(&a, 1, 100);
    insert_rows(&b, 1, 100);
    wait_until("segments counted", Duration::from_secs(20), || {
        let m = http_get(&addr, "/metrics").1;
        metric(&m, "walstream_segments_total", &["a.db", "a2"])
            > metric(&before, "walstream_segments_total", &["a.db", "a2"])
            && metric(
                &m,
                "walstream_storage_requests_total",
                &["b.db", "b2", "put"],
            ) > 0.0
    });
    let m = http_get(&addr, "/metrics").1;
    for name in [
        "walstream_wal_size_bytes",
        "walstream_shipped_position",
        "walstream_replication_lag_seconds",
        "walstream_last_sync_timestamp_seconds",
        "walstream_shipped_bytes_total",
        "walstream_snapshots_total",
    ] {
        assert!(m.contains(name), "{name} missing:\n{m}");
    }

    // Break a2: its generation's segments directory becomes a file.
    let gen_dir = std::fs::read_dir(r("a2").join("generations"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let segs = gen_dir.join("segments");
    let saved = gen_dir.join("segments.saved");
    std::fs::rename(&segs, &saved).unwrap();
    std::fs::write(&segs, "in the way").unwrap();
    insert_rows(&a, 100, 400);
    insert_rows(&b, 100, 400);
    wait_until("a2 not ready", Duration::from_secs(20), || {
        let (code, body) = http_get(&addr, "/readyz");
        code == 503 && body.contains("a2")
    });
    // The other replicas have everything.
    std::thread::sleep(Duration::from_millis(500));
    for (name, n) in [("a1", 400), ("b1", 400), ("b2", 400)] {
        assert_eq!(
            restored_count(&r(name), &dir.path().join(format!("{name}.db"))),
            n,
            "replica {name}"
        );
    }
    let m = http_get(&addr, "/metrics").1;
    assert!(
        metric(&m, "walstream_storage_request_errors_total", &["a2", "put"]) > 0.0,
        "{m}"
    );
    // Repair: a2 catches up and readiness returns.
    std::fs::remove_file(&segs).unwrap();
    std::fs::rename(&saved, &segs).unwrap();
    wait_until("a2 ready again", Duration::from_secs(40), || {
        http_get(&addr, "/readyz").0 == 200
    });
    w.wait_quiet();
    let log = w.stop();
    assert_eq!(
        restored_count(&r("a2"), &dir.path().join("a2.db")),
        400,
        "{log}"
    );
}

#[test]
fn dir_entries_pick_up_new_databases() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    let replica = dir.path().join("replica");
    insert_rows(&data.join("one.db"), 0, 10);
    insert_rows(&data.join("sub/deep.db"), 0, 5);
    std::fs::write(data.join("notes.db"), "not a database").unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "logging:\n  type: json\ndbs:\n  - dir: {}\n    pattern: \"*.db\"\n    recursive: true\n    monitor-interval: 200ms\n    replica:\n      path: {}\n",
            data.display(),
            replica.display()
        ),
    );
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    insert_rows(&data.join("two.db"), 0, 20);
    w.wait_for("two.db", Duration::from_secs(20));
    insert_rows(&data.join("two.db"), 20, 30);
    std::thread::sleep(Duration::from_millis(500));
    w.wait_quiet();
    let log = w.stop();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    assert_eq!(
        restored_count(&replica.join("one.db"), &out.join("1.db")),
        10
    );
    assert_eq!(
        restored_count(&replica.join("sub/deep.db"), &out.join("2.db")),
        5
    );
    assert_eq!(
        restored_count(&replica.join("two.db"), &out.join("3.db")),
        30
    );
    assert!(
        !replica.join("notes.db").exists(),
        "a non-database was replicated"
    );
    // JSON logs with the pair as structured fields.
    let line = log
        .lines()
        .find(|l| l.contains("shipped segment") && l.contains("two.db"))
        .unwrap_or_else(|| panic!("no shipped segment for two.db:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert!(v["db"].as_str().unwrap().ends_with("two.db"), "{line}");
    assert!(v["span"]["replica"].as_str().is_some(), "{line}");
    assert!(v["generation"].as_str().is_some(), "{line}");
}

#[test]
fn restore_is_quiet_when_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    let replica = dir.path().join("r");
    insert_rows(&db, 0, 50);
    let w = Replicating::db(&db, &replica);
    w.wait_quiet();
    w.stop();
    let o = Command::new(bin())
        .args(["restore", "-o"])
        .arg(dir.path().join("out.db"))
        .arg(&replica)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn restore_shows_progress_on_a_terminal() {
    // util-linux `script` gives the restore a pseudo-terminal.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no `script` command to provide a terminal");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    let replica = dir.path().join("r");
    insert_rows(&db, 0, 50);
    let w = Replicating::db(&db, &replica);
    insert_rows(&db, 50, 100);
    w.wait_quiet();
    w.stop();
    let out = dir.path().join("out.db");
    let cmd = format!(
        "{} restore -o {} {}",
        bin().display(),
        out.display(),
        replica.display()
    );
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("segments") || text.contains("checking integrity"),
        "{text}"
    );
    assert!(text.contains("applied; checking integrity"), "{text}");
    integrity_ok(&out);
}

/// Runs a python3 program (the system SQLite: an application walstream did
/// not write) in `dir`.
fn python(dir: &Path, program: &str) -> std::process::Child {
    Command::new("python3")
        .current_dir(dir)
        .args(["-c", program])
        .spawn()
        .expect("python3")
}

/// More databases than the open-file limit lets walstream keep open: the
/// wait is reported once (with the limit, the count in use and what to
/// raise), idle databases close their connections to make room, and every
/// database is replicated. While most are closed, the system's python3
/// writes to each (a connection per transaction, whose last close
/// checkpoints and deletes the WAL, and one long-lived connection), and
/// every database restores exactly; the one whose WAL was never checkpointed
/// behind walstream's back stays in its first generation. SIGTERM ends it.
#[test]
fn more_databases_than_descriptors_close_when_idle_and_all_replicate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let n = 40;
    let names: Vec<String> = (0..n).map(|i| format!("d{i:02}.db")).collect();
    let create = format!(
        "import sqlite3\nfor name in {names:?}:\n    c = sqlite3.connect(name)\n    c.execute('PRAGMA journal_mode=WAL')\n    c.execute('CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)')\n    c.execute(\"INSERT INTO t(v) VALUES ('first')\")\n    c.commit()\n    c.close()\n"
    );
    assert!(python(&data, &create).wait().unwrap().success());
    let replica = dir.path().join("replica");
    let cfg = write_config(
        dir.path(),
        &format!(
            "dbs:\n  - dir: {}\n    pattern: \"*.db\"\n    monitor-interval: 100ms\n    replica:\n      path: {}\n",
            data.display(),
            replica.display()
        ),
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 250 && exec {} replicate --config {}",
            bin().display(),
            cfg.display()
        ))
        .env("RUST_LOG", "walstream=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = |replica: &Path| std::fs::read_dir(replica).map(|d| d.count()).unwrap_or(0);
    wait_until("every database started", Duration::from_secs(60), || {
        started(&replica) == n
    });
    // A long-lived connection: its commits rewind the WAL walstream
    // closed on, but never checkpoint it behind walstream's back.
    let steady = python(
        &data,
        "import sqlite3, time\nc = sqlite3.connect('d00.db', isolation_level=None)\nfor i in range(5):\n    c.execute(\"INSERT INTO t(v) VALUES ('steady')\")\n    time.sleep(0.3)\ntime.sleep(1)\n",
    );
    // A connection per transaction, three to every database.
    let per_tx = format!(
        "import sqlite3\nfor r in range(3):\n    for name in {names:?}[1:]:\n        c = sqlite3.connect(name, isolation_level=None)\n        c.execute('PRAGMA busy_timeout=5000')\n        c.execute(\"INSERT INTO t(v) VALUES ('per-tx')\")\n        c.close()\n"
    );
    assert!(python(&data, &per_tx).wait().unwrap().success());
    let mut steady = steady;
    assert!(steady.wait().unwrap().success());
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "walstream exited");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_timeout(&mut child, Duration::from_secs(20));
    let log = stderr_of(&mut child);
    assert!(status.success(), "{status:?}\n{log}");
    let reports: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("open file limit reached"))
        .collect();
    assert_eq!(reports.len(), 1, "reported once:\n{log}");
    for needle in [
        "of 250 descriptors",
        "ulimit -n",
        "wait until an idle one closes",
    ] {
        assert!(reports[0].contains(needle), "{needle}: {}", reports[0]);
    }
    assert!(!log.contains("Too many open files"), "{log}");
    for name in &names {
        let out = dir.path().join(format!("restored-{name}"));
        restore_ok(&replica.join(name), &out, &[]);
        assert_eq!(dump(&out), dump(&data.join(name)), "{name}");
    }
    assert_eq!(dump(&data.join("d00.db")).len(), 6);
    assert_eq!(dump(&data.join("d01.db")).len(), 4);
    let generations = std::fs::read_dir(replica.join("d00.db").join("generations"))
        .unwrap()
        .count();
    assert_eq!(generations, 1, "d00.db continued its generation:\n{log}");
}

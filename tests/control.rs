//! The control API (issue 21): `sync --wait` means durable (kill -9 right
//! after loses nothing), waits cost no extra uploads, a wait on a failing
//! replica times out clearly without holding up other databases, bad
//! requests get clear errors, and databases come and go while others ship.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// One HTTP request over the daemon's Unix socket: status and body.
fn call(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    http_exchange(s, method, path, "", body)
}

fn sync_body(db: &Path, extra: &str) -> String {
    format!("{{\"db\": \"{}\"{extra}}}", db.display())
}

/// A config with a socket and one database per (path, replica YAML).
fn config(dir: &Path, dbs: &[(&Path, String)], extra: &str) -> (PathBuf, PathBuf) {
    let socket = dir.join("ctl.sock");
    let mut text = format!("socket: {}\n{extra}dbs:\n", socket.display());
    for (db, replica) in dbs {
        text.push_str(&format!(
            "  - path: {}\n    monitor-interval: 50ms\n    replicas:\n      - {replica}\n",
            db.display()
        ));
    }
    let cfg = dir.join("w.yml");
    std::fs::write(&cfg, text).unwrap();
    (cfg, socket)
}

fn wait_for_socket(socket: &Path) {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count(db: &Path, v: i64) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row("SELECT count(*) FROM t WHERE v = ?1", [v], |r| r.get(0))
        .unwrap()
}

/// Commit, `sync --wait` (CLI), SIGKILL at once, restore: the commit is
/// there, every time, with and without `--force`, with a sync-interval of
/// a second (so the wait really waits for the scheduled upload).
#[test]
fn a_commit_synced_then_killed_is_in_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let (cfg, socket) = config(
        dir.path(),
        &[(
            &db,
            format!("path: {}\n        sync-interval: 1s", replica.display()),
        )],
        "",
    );
    let c = app(&db);
    c.execute_batch("CREATE TABLE IF NOT EXISTS t(v INTEGER)")
        .unwrap();
    for round in 0..6i64 {
        let mut p = Proc::start(
            &["--config", cfg.to_str().unwrap()],
            &dir.path().join(format!("{round}.log")),
        );
        p.wait_for(
            "starting new generation|resuming generation",
            Duration::from_secs(30),
        );
        wait_for_socket(&socket);
        c.execute("INSERT INTO t(v) VALUES (?1)", [round]).unwrap();
        let mut args = vec!["sync", "--wait", "--config", cfg.to_str().unwrap()];
        if round % 2 == 1 {
            args.push("--force");
        }
        args.push(db.to_str().unwrap());
        let o = walstream(&args);
        p.child.kill().unwrap();
        p.child.wait().unwrap();
        assert!(
            o.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&o.stderr),
            p.log()
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("durable:"),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        let out = dir.path().join(format!("out{round}.db"));
        restore_ok(&replica, &out, &[]);
        assert_eq!(
            count(&out, round),
            1,
            "round {round}: the synced commit is missing"
        );
    }
}

/// 50 clients waiting in a loop while the application commits: the S3
/// server sees no more PUTs than without them (each wait rides the next
/// scheduled upload), and each wait returns within about a sync-interval.
#[test]
fn waits_ride_the_scheduled_uploads() {
    use common::s3server::{S3Server, AK, BUCKET, SK};
    let interval = Duration::from_millis(500);
    let run = |waiters: usize| -> (u64, Duration) {
        let server = S3Server::start();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        let replica = format!(
            "type: s3\n        bucket: {BUCKET}\n        path: waits\n        endpoint: http://{}\n        region: us-east-1\n        force-path-style: true\n        access-key-id: {AK}\n        secret-access-key: {SK}\n        sync-interval: {}ms\n        snapshot-interval: 1h",
            server.addr,
            interval.as_millis()
        );
        let (cfg, socket) = config(dir.path(), &[(&db, replica)], "");
        let c = app(&db);
        c.execute_batch("CREATE TABLE IF NOT EXISTS t(v INTEGER)")
            .unwrap();
        let p = Proc::start(
            &["--config", cfg.to_str().unwrap()],
            &dir.path().join("w.log"),
        );
        p.wait_for("starting new generation", Duration::from_secs(30));
        wait_for_socket(&socket);
        std::thread::sleep(interval * 2);
        server.counts.reset();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let slowest = std::sync::Arc::new(std::sync::Mutex::new(Duration::ZERO));
        let clients: Vec<_> = (0..waiters)
            .map(|_| {
                let (stop, slowest, socket, db) =
                    (stop.clone(), slowest.clone(), socket.clone(), db.clone());
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let t = Instant::now();
                        let (status, body) = call(
                            &socket,
                            "POST",
                            "/sync",
                            &sync_body(&db, ", \"timeout\": \"10s\""),
                        );
                        assert_eq!(status, 200, "{body}");
                        let mut s = slowest.lock().unwrap();
                        *s = (*s).max(t.elapsed());
                    }
                })
            })
            .collect();
        let t = Instant::now();
        let mut i = 0;
        while t.elapsed() < Duration::from_secs(4) {
            c.execute("INSERT INTO t(v) VALUES (?1)", [i]).unwrap();
            i += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for cl in clients {
            cl.join().unwrap();
        }
        let puts = server.counts.get("PutObject");
        p.stop();
        let slowest = *slowest.lock().unwrap();
        (puts, slowest)
    };
    let (without, _) = run(0);
    let (with, slowest) = run(50);
    eprintln!(
        "PUTs without waits {without}, with 50 waiting clients {with}; slowest wait {slowest:?}"
    );
    assert!(
        with <= without + without / 2 + 3,
        "PUTs with 50 waiting clients: {with}, without: {without}"
    );
    assert!(
        slowest < interval * 2 + Duration::from_secs(2),
        "slowest wait {slowest:?} with a sync-interval of {interval:?}"
    );
}

/// A database whose only replica fails (every request answered 500): a
/// wait times out with a body naming the replica and its position, and a
/// wait on a healthy database in the same daemon is answered meanwhile.
#[test]
fn a_wait_on_a_failing_replica_times_out_clearly() {
    use common::faultproxy::FaultProxy;
    use common::s3server::{S3Server, AK, BUCKET, SK};
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr);
    let dir = tempfile::tempdir().unwrap();
    let sick = dir.path().join("sick.db");
    let well = dir.path().join("well.db");
    let s3 = format!(
        "type: s3\n        bucket: {BUCKET}\n        path: sick\n        endpoint: http://{}\n        region: us-east-1\n        force-path-style: true\n        access-key-id: {AK}\n        secret-access-key: {SK}\n        sync-interval: 100ms\n        lease: {{required: false}}",
        proxy.addr
    );
    let (cfg, socket) = config(
        dir.path(),
        &[
            (&sick, s3),
            (&well, format!("path: {}", dir.path().join("r2").display())),
        ],
        "",
    );
    for db in [&sick, &well] {
        app(db)
            .execute_batch("CREATE TABLE IF NOT EXISTS t(v INTEGER)")
            .unwrap();
    }
    let p = Proc::start(
        &["--config", cfg.to_str().unwrap()],
        &dir.path().join("w.log"),
    );
    p.wait_for("starting new generation", Duration::from_secs(30));
    wait_for_socket(&socket);
    std::thread::sleep(Duration::from_secs(1));
    proxy
        .rates
        .internal_error
        .store(1000, std::sync::atomic::Ordering::SeqCst);
    app(&sick).execute("INSERT INTO t VALUES (1)", []).unwrap();
    app(&well).execute("INSERT INTO t VALUES (1)", []).unwrap();
    let sick_wait = {
        let (socket, sick) = (socket.clone(), sick.clone());
        std::thread::spawn(move || {
            call(
                &socket,
                "POST",
                "/sync",
                &sync_body(&sick, ", \"timeout\": \"3s\""),
            )
        })
    };
    let t = Instant::now();
    let (status, body) = call(&socket, "POST", "/sync", &sync_body(&well, ""));
    assert_eq!(status, 200, "{body}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let (status, body) = sick_wait.join().unwrap();
    assert_eq!(status, 504, "{body}");
    assert!(
        body.contains("not durable within 3s")
            && body.contains("s3://")
            && body.contains("shipped_position"),
        "{body}"
    );
    // The CLI says the same in one line, and fails.
    let o = walstream(&[
        "sync",
        "--wait",
        "--timeout",
        "1s",
        "--config",
        cfg.to_str().unwrap(),
        sick.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("not durable within 1s"), "{err}");
    proxy
        .rates
        .internal_error
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = call(
        &socket,
        "POST",
        "/sync",
        &sync_body(&sick, ", \"timeout\": \"20s\""),
    );
    assert_eq!(status, 200, "recovered: {body}");
    p.stop();
}

/// Unknown database, bad JSON, wrong method; the socket is its owner's
/// only; over TCP the control routes need the token.
#[test]
fn bad_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let addr = free_addr();
    let (cfg, socket) = config(
        dir.path(),
        &[(&db, format!("path: {}", dir.path().join("r").display()))],
        &format!("addr: {addr}\ncontrol-token: s3cret-token-0123456789\n"),
    );
    app(&db)
        .execute_batch("CREATE TABLE IF NOT EXISTS t(v INTEGER)")
        .unwrap();
    let p = Proc::start(
        &["--config", cfg.to_str().unwrap()],
        &dir.path().join("w.log"),
    );
    p.wait_for("starting new generation", Duration::from_secs(30));
    wait_for_socket(&socket);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    let other = dir.path().join("other.db");
    let (status, body) = call(&socket, "POST", "/sync", &sync_body(&other, ""));
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("is not replicated by this daemon") && body.contains("other.db"),
        "{body}"
    );
    let (status, body) = call(&socket, "POST", "/sync", "{not json");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not the JSON"), "{body}");
    let (status, body) = call(&socket, "POST", "/sync", &sync_body(&db, ", \"colour\": 1"));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("colour"), "{body}");
    let (status, body) = call(&socket, "GET", "/sync", "");
    assert_eq!(status, 405, "{body}");
    let (status, body) = call(
        &socket,
        "POST",
        "/sync",
        &sync_body(&db, ", \"timeout\": \"soon\""),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("timeout"), "{body}");
    let (status, body) = call(
        &socket,
        "GET",
        &format!("/position?db={}", db.display()),
        "",
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("committed_position"), "{body}");

    // TCP: without the token, refused; with it, answered.
    let tcp = |auth: Option<&str>| -> (u16, String) {
        let s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let auth = auth
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        http_exchange(s, "POST", "/sync", &auth, &sync_body(&db, ""))
    };
    assert_eq!(tcp(None).0, 401);
    let (status, text) = tcp(Some("wrong-token-0123456789"));
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("bearer token"), "{text}");
    let (status, text) = tcp(Some("s3cret-token-0123456789"));
    assert_eq!(status, 200, "{text}");
    // Metrics stay open.
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    p.stop();

    // No token: the TCP address serves no control routes.
    let (cfg2, socket2) = {
        let d = dir.path().join("two");
        std::fs::create_dir(&d).unwrap();
        let addr2 = free_addr();
        let r = config(
            &d,
            &[(&db, format!("path: {}", dir.path().join("r").display()))],
            &format!("addr: {addr2}\n"),
        );
        (r, addr2)
    };
    let p = Proc::start(
        &["--config", cfg2.0.to_str().unwrap()],
        &dir.path().join("w2.log"),
    );
    p.wait_for(
        "starting new generation|resuming generation",
        Duration::from_secs(30),
    );
    let (status, _) = http_get(&socket2, "/position");
    assert_eq!(status, 404);
    p.stop();
}

/// `register` and `unregister` while another database keeps shipping:
/// each restores exactly.
#[test]
fn databases_come_and_go_while_others_ship() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.db");
    let two = dir.path().join("two.db");
    let r1 = dir.path().join("r1");
    let r2 = dir.path().join("r2");
    let (cfg, socket) = config(dir.path(), &[(&one, format!("path: {}", r1.display()))], "");
    let cfg_s = cfg.to_str().unwrap().to_string();
    let mut c1 = app(&one);
    create_items(&c1);
    let mut c2 = app(&two);
    create_items(&c2);
    let p = Proc::start(&["--config", &cfg_s], &dir.path().join("w.log"));
    p.wait_for("starting new generation", Duration::from_secs(30));
    wait_for_socket(&socket);
    let mut rng = Rng::new(7);
    let o = walstream(&[
        "register",
        "--config",
        &cfg_s,
        two.to_str().unwrap(),
        &format!("file://{}", r2.display()),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Registered twice: refused.
    let o = walstream(&[
        "register",
        "--config",
        &cfg_s,
        two.to_str().unwrap(),
        &format!("file://{}", r2.display()),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already replicated"));
    for _ in 0..40 {
        random_txn(&mut c1, &mut rng);
        random_txn(&mut c2, &mut rng);
    }
    for db in [&one, &two] {
        let o = walstream(&["sync", "--wait", "--config", &cfg_s, db.to_str().unwrap()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let out = dir.path().join("two-out.db");
    restore_ok(&r2, &out, &[]);
    assert_same(&two, &out);
    let o = walstream(&["unregister", "--config", &cfg_s, two.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = walstream(&["unregister", "--config", &cfg_s, two.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not replicated"));
    let (status, body) = call(&socket, "GET", "/status", "");
    assert_eq!(status, 200);
    assert!(
        body.contains("one.db") && !body.contains("two.db"),
        "{body}"
    );
    for _ in 0..40 {
        random_txn(&mut c1, &mut rng);
    }
    let o = walstream(&["sync", "--wait", "--config", &cfg_s, one.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    p.stop();
    let out = dir.path().join("one-out.db");
    restore_ok(&r1, &out, &[]);
    assert_same(&one, &out);
}

/// `--json` on `generations`, `snapshots`, `segments` and `verify`: what
/// the tables say, parseable.
#[test]
fn listings_and_verify_speak_json() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let mut c = app(&db);
    create_items(&c);
    let w = Replicating::db(&db, &replica);
    let mut rng = Rng::new(3);
    for _ in 0..20 {
        random_txn(&mut c, &mut rng);
    }
    w.wait_quiet();
    w.stop();
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--json", replica.to_str().unwrap()]);
        let o = walstream(&all);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&o.stdout)))
    };
    let gens = json(&["generations"]);
    assert_eq!(gens.as_array().unwrap().len(), 1, "{gens}");
    let id = gens[0]["generation"].as_str().unwrap().to_string();
    assert!(gens[0]["last_position"].as_u64().unwrap() > 0, "{gens}");
    let snaps = json(&["snapshots"]);
    assert_eq!(snaps[0]["generation"], id.as_str());
    let segs = json(&["segments"]);
    assert!(!segs.as_array().unwrap().is_empty(), "{segs}");
    assert!(segs
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["generation"] == id.as_str()));
    let v = json(&["verify"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["restored"]["generation"], id.as_str());
}

/// The README's Python client, run as written (paths swapped for the
/// test's) with the system python3: it commits, waits, and the commit is
/// in the replica.
#[test]
fn the_readme_python_client_waits_for_durability() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("```python\n")
        .find(|b| b.contains("def durable("))
        .and_then(|b| b.split("```").next())
        .expect("README has the Python client");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let (cfg, socket) = config(
        dir.path(),
        &[(
            &db,
            format!("path: {}\n        sync-interval: 1s", replica.display()),
        )],
        "",
    );
    app(&db)
        .execute_batch("CREATE TABLE payments(id INTEGER PRIMARY KEY, amount INTEGER)")
        .unwrap();
    let p = Proc::start(
        &["--config", cfg.to_str().unwrap()],
        &dir.path().join("w.log"),
    );
    p.wait_for("starting new generation", Duration::from_secs(30));
    wait_for_socket(&socket);
    let script = block
        .replace("/var/run/walstream.sock", socket.to_str().unwrap())
        .replace("/data/app.db", db.to_str().unwrap())
        + "\nprint('acknowledged')\n";
    let o = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("acknowledged"),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let mut p = p;
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    let out = dir.path().join("out.db");
    restore_ok(&replica, &out, &[]);
    let n: i64 = rusqlite::Connection::open(&out)
        .unwrap()
        .query_row("SELECT count(*) FROM payments WHERE id = 42", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(n, 1);
}

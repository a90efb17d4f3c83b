//! Memory and threads of one walstream process replicating many databases.
//!
//! Creates `WALSTREAM_BENCH_DBS` (default 200) small databases in one
//! directory, replicates them all with one `dir:` entry to a directory
//! replica, writes a transaction to each, waits until every one is shipped,
//! and reports resident memory (total and per database), threads and open
//! files. Then restores a sample and checks it.
//! Run with `cargo bench --bench many_databases`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn segments_in(dir: &std::path::Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "segment") {
                n += 1;
            }
        }
    }
    n
}

fn main() {
    let n: usize = std::env::var("WALSTREAM_BENCH_DBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let replica = dir.path().join("replica");
    std::fs::create_dir(&data).unwrap();
    for i in 0..n {
        let c = rusqlite::Connection::open(data.join(format!("tenant{i:04}.db"))).unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
        c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
    }
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
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_walstream"))
        .args(["replicate", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Every database gets a generation with a snapshot.
    let snapshots = |d: &std::path::Path| -> usize {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("generations").is_dir())
            .count()
    };
    while snapshots(&replica) < n {
        assert!(t0.elapsed() < Duration::from_secs(120), "start-up too slow");
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = t0.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let t1 = Instant::now();
    for i in 0..n {
        let c = rusqlite::Connection::open(data.join(format!("tenant{i:04}.db"))).unwrap();
        c.execute("INSERT INTO t(v) VALUES ('hello')", []).unwrap();
    }
    while segments_in(&replica) < n {
        assert!(t1.elapsed() < Duration::from_secs(60), "shipping too slow");
        std::thread::sleep(Duration::from_millis(20));
    }
    let shipped = t1.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let rss_kib = status(pid, "VmRSS:");
    let hwm_kib = status(pid, "VmHWM:");
    let threads = status(pid, "Threads:");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success());
    for i in [0, n / 2, n - 1] {
        let out = dir.path().join(format!("restored{i}.db"));
        let ok = Command::new(env!("CARGO_BIN_EXE_walstream"))
            .args(["restore", "-o"])
            .arg(&out)
            .arg(replica.join(format!("tenant{i:04}.db")))
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let rows: i64 = rusqlite::Connection::open(&out)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
    }
    println!("| databases | start-up s | ship one commit to each s | RSS MiB | peak RSS MiB | RSS per db KiB | threads | open files |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {n} | {:.1} | {:.2} | {:.1} | {:.1} | {} | {threads} | {fds} |",
        started.as_secs_f64(),
        shipped.as_secs_f64(),
        rss_kib as f64 / 1024.0,
        hwm_kib as f64 / 1024.0,
        rss_kib / n as u64
    );
}

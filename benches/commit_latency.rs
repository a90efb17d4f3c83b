//! How long after a commit is it durable on a directory replica?
//!
//! Runs the real binary against a real database, commits one small
//! transaction at a time (50 ms apart, past the directory default
//! `sync-interval` of 25 ms, so each is the first commit after a quiet
//! spell and ships on its own at once) and measures the time from `COMMIT`
//! returning to the segment file appearing in the replica. Run with
//! `cargo bench --bench commit_latency`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn segments(replica: &Path) -> usize {
    let Ok(gens) = std::fs::read_dir(replica.join("generations")) else {
        return 0;
    };
    gens.filter_map(|g| std::fs::read_dir(g.ok()?.path().join("segments")).ok())
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.'))
            })
            .count()
        })
        .sum()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bench.db");
    let replica = dir.path().join("replica");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_walstream"))
        .args(["replicate", db.to_str().unwrap(), replica.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while segments(&replica) == 0 && std::fs::read_dir(replica.join("generations")).is_err() {
        assert!(Instant::now() < deadline, "walstream did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut samples = Vec::new();
    for i in 0..200 {
        let before = segments(&replica);
        c.execute("INSERT INTO t(v) VALUES (?1)", [format!("row {i}")])
            .unwrap();
        let t0 = Instant::now();
        while segments(&replica) == before {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "commit never shipped"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        samples.push(t0.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize];
    println!(
        "commit -> durable on directory replica ({} commits): p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        samples.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        samples.last().unwrap()
    );
}

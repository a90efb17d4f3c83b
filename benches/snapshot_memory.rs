//! Peak memory of walstream while it snapshots a large database.
//!
//! Builds a database of incompressible blobs (256 MiB by default, or
//! `WALSTREAM_BENCH_MB`), starts `walstream replicate` against a directory
//! replica, waits for the first snapshot and reports the process's peak
//! resident set size (VmHWM) next to the database size.
//! Run with `cargo bench --bench snapshot_memory`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let mb: usize = std::env::var("WALSTREAM_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("big.db");
    let replica = dir.path().join("replica");
    {
        let mut c = rusqlite::Connection::open(&db).unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
        c.execute_batch("CREATE TABLE t(b BLOB)").unwrap();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..mb {
            let tx = c.transaction().unwrap();
            for _ in 0..16 {
                let blob: Vec<u8> = (0..65536)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                tx.execute("INSERT INTO t VALUES (?1)", [blob]).unwrap();
            }
            tx.commit().unwrap();
        }
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }
    let db_size = std::fs::metadata(&db).unwrap().len();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_walstream"))
        .args(["replicate", db.to_str().unwrap(), replica.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let snapshots = replica.join("generations");
    let done = || {
        std::fs::read_dir(&snapshots)
            .ok()
            .and_then(|mut g| g.next())
            .and_then(|g| {
                let dir = g.ok()?.path().join("snapshots");
                std::fs::read_dir(dir).ok()?.find(|e| {
                    e.as_ref()
                        .is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.'))
                })
            })
            .is_some()
    };
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(600), "no snapshot");
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("VmHWM: ?")
        .to_string();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    println!(
        "snapshot of a {} MiB database: {:.1} s, walstream peak {}",
        db_size >> 20,
        elapsed.as_secs_f64(),
        hwm.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
    );
}

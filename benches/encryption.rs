//! What client-side encryption costs: `cargo bench --bench encryption`.
//!
//! The same workload with a directory replica, without `age:` and with one
//! recipient (the restore with its identity): a database is replicated
//! while an application bulk-loads `WALSTREAM_BENCH_MIB` (default 64) MiB
//! of rows (half random bytes, half repetitive text), in transactions of
//! about 1 MiB; then the replica is restored. Reported: the replicator's
//! CPU seconds per MiB of database shipped and its peak RSS, the restore's
//! wall time, CPU and peak RSS, each with the ratio to the unencrypted run.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn env_num(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Waits for `child`; its CPU seconds (user + system) and peak RSS (MiB).
fn reap(child: Child) -> (f64, f64) {
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        secs(usage.ru_utime) + secs(usage.ru_stime),
        usage.ru_maxrss as f64 / 1024.0,
    )
}

/// A reported figure: its name and how to read it from a run.
type Metric<'a> = (&'a str, &'a dyn Fn(&Row) -> f64);

struct Row {
    mode: &'static str,
    ship_cpu_per_mib: f64,
    ship_rss: f64,
    restore_s: f64,
    restore_cpu: f64,
    restore_rss: f64,
}

fn one(dir: &Path, age: Option<(&Path, &str)>) -> Row {
    let db = dir.join("app.db");
    let replica = dir.join("replica");
    let age_yaml = age
        .map(|(_, public)| format!("        age:\n          recipients: [{public}]\n"))
        .unwrap_or_default();
    let cfg = dir.join("w.yml");
    std::fs::write(
        &cfg,
        format!(
            "dbs:\n  - path: {}\n    replicas:\n      - path: {}\n        snapshot-interval: 24h\n{age_yaml}levels: []\n",
            db.display(),
            replica.display()
        ),
    )
    .unwrap();
    let c = rusqlite::Connection::open(&db).unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, r BLOB, s TEXT)")
        .unwrap();
    let bin = env!("CARGO_BIN_EXE_walstream");
    let log = std::fs::File::create(dir.join("w.log")).unwrap();
    let daemon = Command::new(bin)
        .args(["replicate", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mib = env_num("WALSTREAM_BENCH_MIB", 64);
    let text = "walstream encryption benchmark row ".repeat(15);
    for _ in 0..mib {
        let tx = c.unchecked_transaction().unwrap();
        for _ in 0..1024 {
            tx.execute(
                "INSERT INTO t(r, s) VALUES (randomblob(500), ?1)",
                [&text[..500]],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    drop(c);
    // Shipped: the replica stops growing.
    let size = |p: &Path| -> u64 {
        let mut total = 0;
        let mut stack = vec![p.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let m = e.metadata().unwrap();
                if m.is_dir() {
                    stack.push(e.path());
                } else {
                    total += m.len();
                }
            }
        }
        total
    };
    let mut last = 0;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = size(&replica);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let (ship_cpu, ship_rss) = reap(daemon);
    let db_mib = std::fs::metadata(&db).unwrap().len() as f64 / (1 << 20) as f64;
    let out = dir.join("restored.db");
    let mut restore = Command::new(bin);
    restore.args(["restore", "-o"]).arg(&out);
    if let Some((key, _)) = age {
        restore.arg("--age-identity").arg(key);
    }
    restore
        .arg(format!("file://{}", replica.display()))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let t = Instant::now();
    let child = restore.spawn().unwrap();
    let (restore_cpu, restore_rss) = reap(child);
    let restore_s = t.elapsed().as_secs_f64();
    assert!(out.exists(), "restore failed");
    Row {
        mode: if age.is_some() { "age" } else { "plain" },
        ship_cpu_per_mib: ship_cpu / db_mib,
        ship_rss,
        restore_s,
        restore_cpu,
        restore_rss,
    }
}

fn main() {
    let base = tempfile::tempdir().unwrap();
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    let key = base.path().join("key.txt");
    std::fs::write(&key, format!("{}\n", id.to_string().expose_secret())).unwrap();
    let public = id.to_public().to_string();
    let mut rows = Vec::new();
    for round in 0..2 {
        for age in [None, Some((key.as_path(), public.as_str()))] {
            let dir = base.path().join(format!(
                "{round}-{}",
                if age.is_some() { "age" } else { "plain" }
            ));
            std::fs::create_dir_all(&dir).unwrap();
            rows.push(one(&dir, age));
            eprintln!("round {round} {}: done", rows.last().unwrap().mode);
        }
    }
    // The better of two rounds of each: the machine is shared.
    let best = |mode: &str, f: &dyn Fn(&Row) -> f64| {
        rows.iter()
            .filter(|r| r.mode == mode)
            .map(f)
            .fold(f64::INFINITY, f64::min)
    };
    println!("| | plain | age | age / plain |");
    println!("|---|---|---|---|");
    let metrics: [Metric; 5] = [
        ("replicator CPU s per MiB shipped", &|r| r.ship_cpu_per_mib),
        ("replicator peak RSS MiB", &|r| r.ship_rss),
        ("restore wall s", &|r| r.restore_s),
        ("restore CPU s", &|r| r.restore_cpu),
        ("restore peak RSS MiB", &|r| r.restore_rss),
    ];
    for (name, f) in metrics {
        let (p, a) = (best("plain", f), best("age", f));
        println!("| {name} | {p:.3} | {a:.3} | {:.2} |", a / p);
    }
}

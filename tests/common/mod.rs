//! Shared helpers for the integration tests: run the real `walstream`
//! binary, write to real SQLite files, compare databases by content.
#![allow(dead_code)]

pub mod conformance;
pub mod faultproxy;
pub mod moto;
pub mod s3server;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// A loopback address with a port nobody listens on (yet).
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A plain HTTP/1.1 GET; returns the status code and body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    http_exchange(s, "GET", path, "", "")
}

/// One HTTP/1.1 request over `s` (TCP, or a Unix socket), with extra
/// `headers` (each ending in CRLF) and `body`; returns the status code and
/// the response body.
pub fn http_exchange<S: std::io::Read + std::io::Write>(
    mut s: S,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: walstream\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (status, body)
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walstream"))
}

pub fn walstream(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("RUST_LOG", "walstream=debug")
        .output()
        .expect("run walstream")
}

/// A running `walstream replicate` whose stderr is collected.
pub struct Replicating {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Replicating {
    pub fn start(args: &[&str]) -> Replicating {
        let mut child = Command::new(bin())
            .arg("replicate")
            .args(args)
            .env("RUST_LOG", "walstream=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn walstream");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var("WALSTREAM_TEST_ECHO").is_ok() {
                    eprintln!("[walstream] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        let r = Replicating { child, lines };
        r.wait_for(
            "starting new generation|resuming generation",
            Duration::from_secs(20),
        );
        r
    }

    pub fn db(db: &Path, replica: &Path) -> Replicating {
        Replicating::start(&[db.to_str().unwrap(), replica.to_str().unwrap()])
    }

    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until a line matching any `|`-separated alternative appears.
    pub fn wait_for(&self, alternatives: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if alternatives.split('|').any(|a| self.count(a) > 0) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {alternatives:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until shipping has been quiet for a while (everything committed
    /// before the call has been reported shipped).
    pub fn wait_quiet(&self) {
        let mut last = self.count("shipped segment");
        let mut stable_since = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(30);
        while stable_since.elapsed() < Duration::from_millis(700) {
            assert!(
                Instant::now() < deadline,
                "never went quiet:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
            let now = self.count("shipped segment");
            if now != last {
                last = now;
                stable_since = Instant::now();
            }
        }
    }

    /// SIGTERM, then expect a clean exit.
    pub fn stop(mut self) -> String {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = wait_timeout(&mut self.child, Duration::from_secs(30));
        let log = self.log();
        assert!(status.success(), "walstream exited with {status:?}:\n{log}");
        log
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Replicating {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An application connection: WAL mode, a busy timeout, like a real app.
pub fn app(path: &Path) -> Connection {
    let c = Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c
}

pub fn app_with_page_size(path: &Path, page_size: u32) -> Connection {
    let c = Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.pragma_update(None, "page_size", page_size).unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c
}

/// Every row of every table, as text, ordered by table and rowid.
pub fn dump(path: &Path) -> Vec<String> {
    let c = Connection::open(path).unwrap();
    let mut out = Vec::new();
    let tables: Vec<String> = c
        .prepare("SELECT name FROM sqlite_schema WHERE type='table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    for t in tables {
        let mut stmt = c
            .prepare(&format!("SELECT * FROM \"{t}\" ORDER BY rowid"))
            .unwrap();
        let n = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            let mut s = format!("{t}:");
            for i in 0..n {
                let v: rusqlite::types::Value = row.get(i).unwrap();
                match v {
                    rusqlite::types::Value::Blob(b) => {
                        use std::hash::{Hash, Hasher};
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        b.hash(&mut h);
                        s.push_str(&format!("|blob{}:{:x}", b.len(), h.finish()))
                    }
                    other => s.push_str(&format!("|{other:?}")),
                }
            }
            out.push(s);
        }
    }
    out
}

pub fn integrity_ok(path: &Path) {
    let c = Connection::open(path).unwrap();
    let r: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(r, "ok", "integrity_check of {}", path.display());
}

/// Restores `replica` into `out`, asserting success.
pub fn restore_ok(replica: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["restore", "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push(replica.to_str().unwrap());
    let o = walstream(&args);
    assert!(
        o.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    integrity_ok(out);
}

/// Asserts the restored database equals the source, row for row.
pub fn assert_same(source: &Path, restored: &Path) {
    let a = dump(source);
    let b = dump(restored);
    assert_eq!(a.len(), b.len(), "row count differs");
    assert!(a == b, "content differs");
    let ps = |p: &Path| -> u32 {
        Connection::open(p)
            .unwrap()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(ps(source), ps(restored), "page size differs");
    let mode: String = Connection::open(restored)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

/// A small deterministic PRNG so workloads are random but reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One random transaction: inserts, updates, deletes, some large blobs.
pub fn random_txn(c: &mut Connection, rng: &mut Rng) {
    let tx = c.transaction().unwrap();
    for _ in 0..(1 + rng.below(20)) {
        match rng.below(10) {
            0..=4 => {
                let size = if rng.below(10) == 0 {
                    5000 + rng.below(20_000)
                } else {
                    rng.below(200)
                };
                tx.execute(
                    "INSERT INTO items(k, v, b) VALUES (?1, ?2, ?3)",
                    rusqlite::params![
                        rng.below(1000) as i64,
                        format!("v{}", rng.next()),
                        rng.bytes(size as usize)
                    ],
                )
                .unwrap();
            }
            5..=7 => {
                tx.execute(
                    "UPDATE items SET v = ?1 WHERE id % 17 = ?2",
                    rusqlite::params![format!("u{}", rng.next()), rng.below(17) as i64],
                )
                .unwrap();
            }
            _ => {
                tx.execute(
                    "DELETE FROM items WHERE id % 29 = ?1",
                    [rng.below(29) as i64],
                )
                .unwrap();
            }
        }
    }
    tx.commit().unwrap();
}

pub fn create_items(c: &Connection) {
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, k INTEGER, v TEXT, b BLOB);
         CREATE INDEX IF NOT EXISTS items_k ON items(k);",
    )
    .unwrap();
}

/// A `replicate` whose stderr goes to a file (it may be waiting, not
/// started).
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// `walstream replicate ARGS`.
    pub fn start(args: &[&str], log: &Path) -> Proc {
        Proc::start_with(&[], args, log)
    }

    /// `PREFIX... walstream replicate ARGS` (e.g. under `faketime`).
    pub fn start_with(prefix: &[&str], args: &[&str], log: &Path) -> Proc {
        let file = std::fs::File::create(log).unwrap();
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let child = cmd
            .arg("replicate")
            .args(args)
            .env("RUST_LOG", "walstream=debug")
            .env_remove("AWS_CA_BUNDLE")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Proc {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !needle.split('|').any(|n| self.log().contains(n)) {
            assert!(
                Instant::now() < deadline,
                "never logged {needle:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        let st = wait_timeout(&mut self.child, Duration::from_secs(30));
        assert!(st.success(), "exited with {st:?}:\n{}", self.log());
        self.log()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config for one database and one replica (`replica`: the YAML of its
/// entry, `extra`: more top-level YAML).
pub fn replicate_config(dir: &Path, name: &str, db: &Path, replica: &str, extra: &str) -> PathBuf {
    let cfg = dir.join(name);
    std::fs::write(
        &cfg,
        format!(
            "dbs:\n  - path: {}\n    monitor-interval: 100ms\n    replicas:\n      - {replica}\n{extra}",
            db.display()
        ),
    )
    .unwrap();
    cfg
}

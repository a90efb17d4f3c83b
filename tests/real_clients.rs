//! Real clients: the application in these tests is not walstream's bundled
//! SQLite but SQLite as applications ship it (issue 16): the system SQLite
//! through `/usr/bin/python3`'s `sqlite3` module, the `sqlite3` shell, and the
//! newest SQLite from PyPI `pysqlite3-binary` in `target/ci-venv`. Each runs
//! the workloads of `tests/clients/app.py` (a connection per transaction,
//! concurrent writer processes, a reader pool, VACUUM, app-run checkpoints, a
//! page-size change, writer processes that exit, the issue's reproduction)
//! as separate processes against `walstream replicate app.db <dir>`; then
//! walstream is stopped (SIGTERM, or kill -9 once it has shipped), and the
//! run must hold: `walstream verify` against the live database passes, the
//! restore passes `integrity_check` and equals the source row for row.
//!
//! A missing client is a skip with a message, unless
//! `WALSTREAM_REQUIRE_REAL_CLIENTS=1` (set by `.ci/run`) makes it a failure.
//! Clients are found at: `WALSTREAM_SYSTEM_PYTHON` or `/usr/bin/python3`;
//! `WALSTREAM_NEW_SQLITE_PYTHON` or `target/ci-venv/bin/python`;
//! `WALSTREAM_SQLITE3_SHELL` or `/usr/bin/sqlite3` or `sqlite3` on `PATH`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

/// How long walstream may take to exit after SIGTERM (issue 16 asks for
/// `shutdown-timeout`, default 10s, plus a second).
const STOP_WITHIN: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug)]
enum Client {
    /// `/usr/bin/python3` and its `sqlite3` module: the distribution's SQLite.
    System,
    /// PyPI `pysqlite3-binary`: the newest SQLite packaged for Python.
    Newest,
    /// The `sqlite3` command-line shell, one process per connection.
    Shell,
}

/// How to run `tests/clients/app.py` as a given client.
#[derive(Clone, Debug)]
struct App {
    python: PathBuf,
    backend: String,
    version: String,
}

fn required() -> bool {
    std::env::var("WALSTREAM_REQUIRE_REAL_CLIENTS").is_ok_and(|v| v == "1")
}

fn driver() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/app.py")
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn system_python() -> Option<PathBuf> {
    match std::env::var_os("WALSTREAM_SYSTEM_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None => [PathBuf::from("/usr/bin/python3")]
            .into_iter()
            .find(|p| p.is_file())
            .or_else(|| on_path("python3")),
    }
}

/// Finds a client and asks it for its version; `Err` says what is missing.
fn locate(client: Client) -> Result<App, String> {
    let (python, backend) = match client {
        Client::System => (
            system_python().ok_or("no /usr/bin/python3 (nor python3 on PATH)")?,
            "module:sqlite3".to_string(),
        ),
        Client::Newest => {
            let python = std::env::var_os("WALSTREAM_NEW_SQLITE_PYTHON")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/bin/python")
                });
            if !python.is_file() {
                return Err(format!(
                    "no {} (WALSTREAM_NEW_SQLITE_PYTHON: a Python with PyPI pysqlite3-binary)",
                    python.display()
                ));
            }
            (python, "module:pysqlite3".to_string())
        }
        Client::Shell => {
            let shell = std::env::var_os("WALSTREAM_SQLITE3_SHELL")
                .map(PathBuf::from)
                .or_else(|| {
                    [PathBuf::from("/usr/bin/sqlite3")]
                        .into_iter()
                        .find(|p| p.is_file())
                })
                .or_else(|| on_path("sqlite3"))
                .ok_or("no sqlite3 shell (Debian package sqlite3)")?;
            if !shell.is_file() {
                return Err(format!("no sqlite3 shell at {}", shell.display()));
            }
            (
                system_python().ok_or("no python3 to drive the sqlite3 shell")?,
                format!("shell:{}", shell.display()),
            )
        }
    };
    let o = Command::new(&python)
        .arg(driver())
        .args([&backend, "/nonexistent", "version"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !o.status.success() {
        return Err(format!(
            "{} {backend} does not work: {}",
            python.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let version = String::from_utf8_lossy(&o.stdout).trim().to_string();
    Ok(App {
        python,
        backend,
        version,
    })
}

fn client(client: Client) -> Result<App, String> {
    static CLIENTS: OnceLock<[Result<App, String>; 3]> = OnceLock::new();
    CLIENTS.get_or_init(|| {
        [
            locate(Client::System),
            locate(Client::Newest),
            locate(Client::Shell),
        ]
    })[client as usize]
        .clone()
}

/// One run of one workload: a database, a directory replica, a walstream.
struct Run {
    name: String,
    app: App,
    _dir: tempfile::TempDir,
    db: PathBuf,
    replica: PathBuf,
    cfg: PathBuf,
    walstream: Option<Replicating>,
    /// Everything walstream logged, across restarts.
    log: String,
    /// What went wrong; the run fails at the end, naming all of it.
    problems: Vec<String>,
    started: Instant,
}

impl Run {
    /// Sets up the run, or returns `None` after printing why it is skipped.
    fn new(name: &str, which: Client, sync_interval: Option<&str>) -> Option<Run> {
        let app = match client(which) {
            Ok(app) => app,
            Err(why) if required() => {
                panic!(
                    "{name}: {which:?} client missing and WALSTREAM_REQUIRE_REAL_CLIENTS=1: {why}"
                )
            }
            Err(why) => {
                eprintln!(
                    "SKIPPED real_clients::{name}: {which:?} client missing: {why}. \
                     .ci/run installs it (WALSTREAM_REQUIRE_REAL_CLIENTS=1 makes this a failure)"
                );
                return None;
            }
        };
        eprintln!("{name}: client {}", app.version);
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        let replica = dir.path().join("replica");
        let cfg = dir.path().join("walstream.yml");
        let interval = sync_interval
            .map(|i| format!("        sync-interval: {i}\n"))
            .unwrap_or_default();
        std::fs::write(
            &cfg,
            format!(
                "dbs:\n  - path: {}\n    replicas:\n      - path: {}\n{interval}",
                db.display(),
                replica.display()
            ),
        )
        .unwrap();
        let mut run = Run {
            name: name.to_string(),
            app,
            _dir: dir,
            db,
            replica,
            cfg,
            walstream: None,
            log: String::new(),
            problems: Vec::new(),
            started: Instant::now(),
        };
        run.app(&["init"]);
        Some(run)
    }

    /// Runs one command of the application, as its own process; returns
    /// what it printed.
    fn app(&mut self, args: &[&str]) -> String {
        let t = Instant::now();
        let o = Command::new(&self.app.python)
            .arg(driver())
            .arg(&self.app.backend)
            .arg(&self.db)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run the application");
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            eprintln!("{}: app {line}", self.name);
        }
        eprintln!(
            "{}: app {} took {:.2}s",
            self.name,
            args.join(" "),
            t.elapsed().as_secs_f64()
        );
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            let tail: Vec<&str> = err.lines().rev().take(6).collect();
            self.problems.push(format!(
                "the application failed ({} {}, {}): {}",
                self.app.backend,
                args.join(" "),
                o.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            ));
        }
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Starts `walstream replicate app.db <replica dir>`, or with the config
    /// when the run has a sync-interval.
    fn start(&mut self) {
        assert!(self.walstream.is_none());
        let cfg = std::fs::read_to_string(&self.cfg).unwrap();
        self.walstream = Some(if cfg.contains("sync-interval") {
            Replicating::start(&["--config", self.cfg.to_str().unwrap()])
        } else {
            Replicating::db(&self.db, &self.replica)
        });
    }

    /// SIGTERM, which ships everything committed; it must exit 0, in time.
    fn stop(&mut self) {
        let mut w = self.walstream.take().expect("walstream running");
        unsafe { libc::kill(w.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_WITHIN;
        let status = loop {
            if let Some(s) = w.child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        match status {
            Some(s) if s.success() => {}
            Some(s) => self
                .problems
                .push(format!("walstream exited with {s} after SIGTERM")),
            None => self.problems.push(format!(
                "walstream still running {}s after SIGTERM (killed)",
                STOP_WITHIN.as_secs()
            )),
        }
        std::thread::sleep(Duration::from_millis(50)); // the log reader's last lines
        self.log.push_str(&w.log());
        self.log.push('\n');
        drop(w); // kills it if still running
    }

    /// Waits until walstream has shipped what was committed, then kill -9.
    fn kill9(&mut self) {
        let w = self.walstream.take().expect("walstream running");
        w.wait_quiet();
        self.log.push_str(&w.log());
        self.log.push('\n');
        w.kill();
    }

    /// The end of every run: verify against the live database, restore,
    /// integrity_check, and every row equal to the source.
    fn check(mut self) {
        assert!(self.walstream.is_none(), "stop walstream first");
        let verify = walstream(&[
            "verify",
            "--config",
            self.cfg.to_str().unwrap(),
            self.db.to_str().unwrap(),
        ]);
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
        if !verify.status.success() || !out.contains("content equals") {
            let faults: Vec<&str> = out
                .lines()
                .filter(|l| {
                    !l.contains(" DEBUG ") && !l.contains(" INFO ") && !l.contains(" TRACE ")
                })
                .take(8)
                .collect();
            self.problems.push(format!(
                "walstream verify against the live database: {} ({})",
                verify.status,
                faults.join(" / ")
            ));
        }

        let restored = self._dir.path().join("restored.db");
        let o = walstream(&[
            "restore",
            "-o",
            restored.to_str().unwrap(),
            self.replica.to_str().unwrap(),
        ]);
        if !o.status.success() {
            self.problems.push(format!(
                "restore failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        } else {
            match integrity(&restored) {
                Ok(()) => {}
                Err(e) => self.problems.push(format!("restored database: {e}")),
            }
            if let Err(e) = same(&self.db, &restored) {
                self.problems.push(e);
            }
        }
        // The application's own database must be sound: otherwise the
        // client's SQLite, not walstream, broke it.
        if let Err(e) = integrity(&self.db) {
            self.problems.push(format!("the SOURCE database: {e}"));
        }

        // A replicator that met a corrupt database mid-run may still end
        // with a good restore (from a new generation's snapshot); the
        // database never was corrupt, so seeing one is a failure by itself.
        let corrupt: Vec<&str> = self
            .log
            .lines()
            .filter(|l| {
                let l = l.to_lowercase();
                l.contains("malformed") || l.contains("corrupt")
            })
            .collect();
        if let Some(first) = corrupt.first() {
            self.problems.push(format!(
                "walstream read a corrupt database mid-run ({} log lines), first: {}",
                corrupt.len(),
                first.trim()
            ));
        }

        let elapsed = self.started.elapsed().as_secs_f64();
        if self.problems.is_empty() {
            eprintln!("{}: ok in {elapsed:.1}s", self.name);
            return;
        }
        let complaints: Vec<&str> = self
            .log
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .collect();
        let shown = &complaints[complaints.len().saturating_sub(10)..];
        panic!(
            "{} ({}) failed after {elapsed:.1}s:\n  - {}\nwalstream's last errors and warnings ({} in all):\n{}",
            self.name,
            self.app.version,
            self.problems.join("\n  - "),
            complaints.len(),
            shown.join("\n")
        );
    }
}

fn integrity(path: &Path) -> Result<(), String> {
    let c = rusqlite::Connection::open(path).map_err(|e| e.to_string())?;
    let rows: Vec<String> = c
        .prepare("PRAGMA integrity_check")
        .and_then(|mut s| {
            s.query_map([], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()
        })
        .map_err(|e| format!("integrity_check failed to run: {e}"))?;
    if rows == ["ok"] {
        Ok(())
    } else {
        let shown: Vec<&str> = rows.iter().take(3).map(String::as_str).collect();
        Err(format!(
            "integrity_check: {} ({} lines)",
            shown.join(" / "),
            rows.len()
        ))
    }
}

/// The restore equals the source: every row (common::dump), the page size,
/// and it is in WAL mode (as common::assert_same checks).
fn same(source: &Path, restored: &Path) -> Result<(), String> {
    let dump = |p: &Path| {
        std::panic::catch_unwind(|| common::dump(p)).map_err(|_| p.display().to_string())
    };
    let a = dump(source).map_err(|p| format!("could not read every row of {p}"))?;
    let b = dump(restored).map_err(|p| format!("could not read every row of {p}"))?;
    if a != b {
        let first = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()));
        let missing = a.iter().filter(|r| !b.contains(r)).count();
        let extra = b.iter().filter(|r| !a.contains(r)).count();
        return Err(format!(
            "restore differs from the source: {} rows vs {} ({missing} missing, {extra} not in the source); \
             first difference at row {first}: {:?} vs {:?}",
            a.len(),
            b.len(),
            a.get(first),
            b.get(first)
        ));
    }
    let page_size = |p: &Path| -> Result<u32, String> {
        rusqlite::Connection::open(p)
            .and_then(|c| c.query_row("PRAGMA page_size", [], |r| r.get(0)))
            .map_err(|e| e.to_string())
    };
    let (ps, pr) = (page_size(source)?, page_size(restored)?);
    if ps != pr {
        return Err(format!("page size {pr} in the restore, {ps} in the source"));
    }
    let mode: String = rusqlite::Connection::open(restored)
        .and_then(|c| c.query_row("PRAGMA journal_mode", [], |r| r.get(0)))
        .map_err(|e| e.to_string())?;
    if mode != "wal" {
        return Err(format!("the restore is in journal_mode {mode}, not wal"));
    }
    Ok(())
}

// ------------------------------------------------------------ workloads

/// 1 (5 for the shell): a connection (a shell process) per transaction.
fn per_transaction(name: &str, c: Client, n: &str) {
    let Some(mut run) = Run::new(name, c, None) else {
        return;
    };
    run.start();
    run.app(&["per_txn", n]);
    run.stop();
    run.check();
}

/// 2: three writer processes at once (one a connection per transaction, two
/// long-lived), busy_timeout 10s, BEGIN and BEGIN IMMEDIATE.
fn three_writers(name: &str, c: Client, n: &str) {
    let Some(mut run) = Run::new(name, c, None) else {
        return;
    };
    run.start();
    run.app(&["three_writers", n]);
    run.stop();
    run.check();
}

/// 3: one writer plus four query_only readers, synchronous=NORMAL; twice,
/// as an application restarted while walstream runs.
fn reader_pool(name: &str, c: Client, n: &str) {
    let Some(mut run) = Run::new(name, c, None) else {
        return;
    };
    run.start();
    run.app(&["pool", n]);
    run.app(&["pool", n]);
    run.stop();
    run.check();
}

/// 4: deletes, auto_vacuum switched to INCREMENTAL by VACUUM,
/// incremental_vacuum, VACUUM.
fn vacuum(name: &str, c: Client) {
    let Some(mut run) = Run::new(name, c, None) else {
        return;
    };
    run.start();
    run.app(&["vacuum", "12"]);
    run.stop();
    run.check();
}

/// 6: app-run PRAGMA wal_checkpoint(PASSIVE), (RESTART), (TRUNCATE).
fn checkpoints(name: &str, c: Client) {
    let Some(mut run) = Run::new(name, c, None) else {
        return;
    };
    run.start();
    run.app(&["checkpoints", "120"]);
    run.stop();
    run.check();
}

/// 7: a page-size change. SQLite changes a WAL database's page size only
/// outside WAL mode (journal_mode=DELETE, page_size, VACUUM, back to WAL),
/// which needs the only connection: attempted while walstream runs (it must
/// be refused, or replicated right if it happens), then done while walstream
/// is stopped, and walstream restarted on the changed database.
fn page_size(name: &str, c: Client) {
    let Some(mut run) = Run::new(name, c, None) else {
        return;
    };
    run.start();
    run.app(&["per_txn", "20"]);
    let online = run.app(&["page_size_online", "8192"]);
    if online.contains("walstream runs: delete") {
        run.problems.push(
            "the application left WAL mode while walstream ran: walstream held no lock on the database"
                .to_string(),
        );
    }
    run.app(&["per_txn", "20", "3"]);
    run.stop();
    run.app(&["page_size_offline", "16384"]);
    run.start();
    run.app(&["per_txn", "20", "4"]);
    run.stop();
    run.check();
}

/// 8: writer processes that exit while walstream runs (their SQLite
/// checkpoints and deletes the WAL on the last close if it can take the
/// EXCLUSIVE lock), each followed by a new one. With a sync-interval, so
/// that an exit can fall between a commit and its upload (the issue's
/// silently lost transaction).
fn writer_exits(name: &str, c: Client) {
    let Some(mut run) = Run::new(name, c, Some("500ms")) else {
        return;
    };
    run.start();
    let out = run.app(&["short_lived", "12"]);
    if !out.contains("WAL deleted after 0 of them") {
        run.problems.push(format!(
            "the application's last close deleted the WAL while walstream ran (walstream held no lock): {}",
            out.trim()
        ));
    }
    run.stop();
    run.check();
}

/// Issue 16's smallest reproduction: three connections in sequence, 300
/// autocommit inserts each, then kill -9 once shipped, then restore.
fn issue16_reproduction(name: &str, c: Client) {
    let Some(mut run) = Run::new(name, c, None) else {
        return;
    };
    run.start();
    run.app(&["issue16"]);
    run.kill9();
    run.check();
}

/// One test per client and workload, named `<client>_<workload>`.
macro_rules! matrix {
    ($client:ident, $c:expr, per_txn: $per_txn:ident($n:expr)) => {
        mod $client {
            use super::*;
            #[test]
            fn $per_txn() {
                per_transaction(
                    concat!(stringify!($client), "::", stringify!($per_txn)),
                    $c,
                    $n,
                );
            }
            #[test]
            fn three_writer_processes() {
                three_writers(
                    concat!(stringify!($client), "::three_writer_processes"),
                    $c,
                    "60",
                );
            }
            #[test]
            fn writer_and_four_query_only_readers() {
                reader_pool(
                    concat!(stringify!($client), "::writer_and_four_query_only_readers"),
                    $c,
                    "120",
                );
            }
            #[test]
            fn deletes_vacuum_incremental_vacuum() {
                vacuum(
                    concat!(stringify!($client), "::deletes_vacuum_incremental_vacuum"),
                    $c,
                );
            }
            #[test]
            fn app_checkpoints_passive_restart_truncate() {
                checkpoints(
                    concat!(
                        stringify!($client),
                        "::app_checkpoints_passive_restart_truncate"
                    ),
                    $c,
                );
            }
            #[test]
            fn page_size_change_through_vacuum() {
                page_size(
                    concat!(stringify!($client), "::page_size_change_through_vacuum"),
                    $c,
                );
            }
            #[test]
            fn writer_processes_exit_while_replicating() {
                writer_exits(
                    concat!(
                        stringify!($client),
                        "::writer_processes_exit_while_replicating"
                    ),
                    $c,
                );
            }
            #[test]
            fn issue16_three_connections_then_kill9() {
                issue16_reproduction(
                    concat!(
                        stringify!($client),
                        "::issue16_three_connections_then_kill9"
                    ),
                    $c,
                );
            }
        }
    };
}

matrix!(system_sqlite, Client::System, per_txn: connection_per_transaction("300"));
matrix!(newest_sqlite, Client::Newest, per_txn: connection_per_transaction("300"));
matrix!(sqlite3_shell, Client::Shell, per_txn: shell_process_per_batch("150"));

/// Prints the clients and their SQLite versions (the README states them).
#[test]
fn client_versions() {
    for c in [Client::System, Client::Newest, Client::Shell] {
        match client(c) {
            Ok(app) => eprintln!("real client {c:?}: {}", app.version),
            Err(why) if required() => panic!("{c:?} client missing: {why}"),
            Err(why) => eprintln!("SKIPPED real client {c:?}: {why}"),
        }
    }
}

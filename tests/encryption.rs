//! Client-side encryption (issue 22): no byte of any object holds a row's
//! plaintext; restore, point-in-time restore, verify, follow and compaction
//! work with the keys; a missing or wrong key, or altered or truncated
//! ciphertext, fails clearly and leaves nothing behind; keys rotate; a
//! replica holding plain and encrypted generations restores both.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const MARKER: &str = "MARKER-4f1c-SECRET-ROW";

/// A fresh age key pair: the identity file (as `age-keygen` writes it) and
/// the recipient.
fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    let public = id.to_public().to_string();
    let file = dir.join(format!("{name}.txt"));
    std::fs::write(
        &file,
        format!(
            "# created: 2026-12-08T00:00:00Z\n# public key: {public}\n{}\n",
            id.to_string().expose_secret()
        ),
    )
    .unwrap();
    (file, public)
}

fn config(dir: &Path, db: &Path, replica: &Path, age: &str, extra: &str) -> PathBuf {
    let cfg = dir.join(format!("w{}.yml", rand_suffix()));
    std::fs::write(
        &cfg,
        format!(
            "{extra}dbs:\n  - path: {}\n    monitor-interval: 50ms\n    replicas:\n      - path: {}\n        age:\n{age}",
            db.display(),
            replica.display()
        ),
    )
    .unwrap();
    cfg
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

fn recipients(rs: &[&str]) -> String {
    format!("          recipients: [{}]\n", rs.join(", "))
}

/// Every file under `dir`, and whether any holds `needle`.
fn any_holds(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                found.push(p);
            }
        }
    }
    found
}

fn write_rows(db: &Path, n: usize) {
    let c = app(db);
    c.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB)")
        .unwrap();
    for _ in 0..n {
        c.execute(
            "INSERT INTO t(v, pad) VALUES (?1, randomblob(300))",
            [MARKER],
        )
        .unwrap();
    }
}

fn replicate_once(cfg: &Path, log: &Path) -> String {
    let p = Proc::start(&["--config", cfg.to_str().unwrap()], log);
    p.wait_for(
        "starting new generation|resuming generation",
        Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_millis(300));
    p.stop()
}

fn restore(args: &[&str]) -> std::process::Output {
    walstream(&[&["restore"], args].concat())
}

/// The replicating host holds only the recipient: nothing in the replica
/// shows the rows; without a key restore and verify fail in one line naming
/// the replica and write nothing; with it, restore and point-in-time
/// restore and verify work; a wrong key, a flipped byte and a cut object
/// each fail clearly.
#[test]
fn an_encrypted_replica_reveals_nothing_and_restores_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let (key, public) = keypair(dir.path(), "key");
    let (other, _) = keypair(dir.path(), "other");
    let cfg = config(dir.path(), &db, &replica, &recipients(&[&public]), "");
    write_rows(&db, 50);
    let p = Proc::start(
        &["--config", cfg.to_str().unwrap()],
        &dir.path().join("1.log"),
    );
    p.wait_for("starting new generation", Duration::from_secs(30));
    write_rows(&db, 50);
    std::thread::sleep(Duration::from_millis(1500));
    let mid = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mid_rows = 100;
    std::thread::sleep(Duration::from_millis(500));
    write_rows(&db, 50);
    std::thread::sleep(Duration::from_millis(500));
    p.stop();
    assert!(
        any_holds(&replica, MARKER.as_bytes()).is_empty(),
        "plaintext in {:?}",
        any_holds(&replica, MARKER.as_bytes())
    );
    let url = format!("file://{}", replica.display());

    // No key: one line, naming the replica, nothing written.
    let out = dir.path().join("out.db");
    let o = restore(&["-o", out.to_str().unwrap(), &url]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("is encrypted with age") && err.contains(&url),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!out.exists());
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("walstream-restore")));

    // A key that is not the replica's: said so.
    let o = restore(&[
        "-o",
        out.to_str().unwrap(),
        "--age-identity",
        other.to_str().unwrap(),
        &url,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("none of the given age identities"), "{err}");
    assert!(!out.exists());

    // The key: latest, and a point in time.
    restore_ok(&replica, &out, &["--age-identity", key.to_str().unwrap()]);
    assert_same(&db, &out);
    let pit = dir.path().join("pit.db");
    restore_ok(
        &replica,
        &pit,
        &["--age-identity", key.to_str().unwrap(), "--timestamp", &mid],
    );
    let n: i64 = rusqlite::Connection::open(&pit)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, mid_rows);
    let v = walstream(&["verify", "--age-identity", key.to_str().unwrap(), &url]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));

    // Altered and cut ciphertext: refused, by key.
    let seg = std::fs::read_dir(
        std::fs::read_dir(replica.join("generations"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("segments"),
    )
    .unwrap()
    .next()
    .unwrap()
    .unwrap()
    .path();
    let good = std::fs::read(&seg).unwrap();
    for bad in [
        {
            let mut b = good.clone();
            let at = b.len() - 60;
            b[at] ^= 1;
            b
        },
        good[..good.len() - 50].to_vec(),
    ] {
        std::fs::write(&seg, &bad).unwrap();
        let _ = std::fs::remove_file(&out);
        let o = restore(&[
            "-o",
            out.to_str().unwrap(),
            "--age-identity",
            key.to_str().unwrap(),
            &url,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "a damaged object restored");
        let name = seg.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            err.contains(&name) || err.contains("corrupt") || err.contains("truncated"),
            "{err}"
        );
        assert!(!out.exists());
    }
    std::fs::write(&seg, &good).unwrap();
}

/// Keys rotate: a recipient added later takes effect for new objects;
/// restore tries each identity given; verify names the objects no given
/// identity opens. And a replica whose history is plain, then encrypted,
/// then plain again restores each part (with the key where needed).
#[test]
fn keys_rotate_and_mixed_histories_restore() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let url = format!("file://{}", replica.display());
    let (a, a_pub) = keypair(dir.path(), "a");
    let (b, b_pub) = keypair(dir.path(), "b");
    // Plain first.
    write_rows(&db, 10);
    let plain = dir.path().join("plain.yml");
    std::fs::write(
        &plain,
        format!(
            "dbs:\n  - path: {}\n    replicas:\n      - path: {}\n",
            db.display(),
            replica.display()
        ),
    )
    .unwrap();
    replicate_once(&plain, &dir.path().join("0.log"));
    let plain_time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    std::thread::sleep(Duration::from_millis(300));
    // Encrypted to A: a new generation.
    write_rows(&db, 10);
    let log = replicate_once(
        &config(dir.path(), &db, &replica, &recipients(&[&a_pub]), ""),
        &dir.path().join("1.log"),
    );
    assert!(log.contains("encryption was turned on"), "{log}");
    // Then to A and B (rotation): new objects to both (here in a new
    // generation: the application's last close checkpointed the WAL).
    write_rows(&db, 10);
    replicate_once(
        &config(
            dir.path(),
            &db,
            &replica,
            &recipients(&[&a_pub, &b_pub]),
            "",
        ),
        &dir.path().join("2.log"),
    );
    let latest_b = dir.path().join("latest-b.db");
    restore_ok(
        &replica,
        &latest_b,
        &["--age-identity", b.to_str().unwrap()],
    );
    assert_same(&db, &latest_b);
    // B alone opens the new objects, not the older ones.
    let v = walstream(&["verify", "--age-identity", b.to_str().unwrap(), &url]);
    let text = String::from_utf8_lossy(&v.stdout);
    assert!(!v.status.success(), "{text}");
    assert!(
        text.contains("none of the given age identities") || text.contains("encrypted"),
        "{text}"
    );
    // A and B together: everything.
    let out = dir.path().join("out.db");
    restore_ok(
        &replica,
        &out,
        &[
            "--age-identity",
            b.to_str().unwrap(),
            "--age-identity",
            a.to_str().unwrap(),
        ],
    );
    assert_same(&db, &out);
    // The plain generation restores without a key.
    let p = dir.path().join("plain.db");
    restore_ok(&replica, &p, &["--timestamp", &plain_time]);
    let n: i64 = rusqlite::Connection::open(&p)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 10);
}

/// With identities beside the recipients, the daemon compacts an encrypted
/// replica (its merged objects encrypted too), a follower with the key
/// follows it, and everything restores.
#[test]
fn compaction_and_follow_work_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let url = format!("file://{}", replica.display());
    let (key, public) = keypair(dir.path(), "key");
    let age = format!(
        "{}          identities: [{}]\n",
        recipients(&[&public]),
        key.display()
    );
    let cfg = config(
        dir.path(),
        &db,
        &replica,
        &age,
        "levels:\n  - interval: 1s\n",
    );
    write_rows(&db, 5);
    let p = Proc::start(
        &["--config", cfg.to_str().unwrap()],
        &dir.path().join("1.log"),
    );
    p.wait_for("starting new generation", Duration::from_secs(30));
    let copy = dir.path().join("copy.db");
    let mut f = std::process::Command::new(bin())
        .args([
            "restore",
            "--follow",
            "--age-identity",
            key.to_str().unwrap(),
            "-o",
        ])
        .arg(&copy)
        .arg(&url)
        .stderr(std::fs::File::create(dir.path().join("f.log")).unwrap())
        .spawn()
        .unwrap();
    for _ in 0..8 {
        write_rows(&db, 5);
        std::thread::sleep(Duration::from_millis(400));
    }
    std::thread::sleep(Duration::from_secs(3));
    p.stop();
    let compacted = replica.join("generations");
    let merged: Vec<_> = walk(&compacted)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/compacted/"))
        .collect();
    assert!(!merged.is_empty(), "nothing was compacted");
    assert!(any_holds(&replica, MARKER.as_bytes()).is_empty());
    // The follower caught up.
    let t = std::time::Instant::now();
    loop {
        let n: i64 = rusqlite::Connection::open_with_flags(
            &copy,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)))
        .unwrap_or(0);
        if n == 45 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the follower has {n} rows:\n{}",
            std::fs::read_to_string(dir.path().join("f.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe { libc::kill(f.id() as i32, libc::SIGTERM) };
    f.wait().unwrap();
    let out = dir.path().join("out.db");
    restore_ok(&replica, &out, &["--age-identity", key.to_str().unwrap()]);
    assert_same(&db, &out);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

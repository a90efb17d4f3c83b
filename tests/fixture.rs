//! The on-storage format is a public contract (FORMAT.md): a replica written
//! by walstream format version 1 is committed under tests/fixtures and must
//! keep restoring to exactly the same rows.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/replica-v1")
}

/// The rows the fixture database held (see `regenerate_fixture`).
fn expected_rows() -> Vec<(i64, String)> {
    (1..=40)
        .filter(|i| i % 7 != 0)
        .map(|i| (i, format!("row {i} v{}", if i > 30 { 2 } else { 1 })))
        .collect()
}

fn rows(db: &Path) -> Vec<(i64, String)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut s = c.prepare("SELECT id, v FROM fixture ORDER BY id").unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

#[test]
fn committed_fixture_still_restores() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fixture.db");
    restore_ok(&fixture(), &out, &[]);
    assert_eq!(rows(&out), expected_rows());
    // The fixture has a snapshot and several segments; the segments matter.
    let segs = walstream(&["segments", fixture().to_str().unwrap()]);
    let listing = String::from_utf8_lossy(&segs.stdout);
    assert!(listing.lines().count() >= 3, "{listing}");
}

/// Rewrites the fixture: `cargo test --test fixture -- --ignored`.
#[test]
#[ignore]
fn regenerate_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fixture.db");
    let c = app_with_page_size(&db, 1024);
    c.execute_batch("CREATE TABLE fixture(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    let _ = std::fs::remove_dir_all(fixture());
    let w = Replicating::db(&db, &fixture());
    for i in 1..=40 {
        c.execute(
            "INSERT INTO fixture VALUES (?1, ?2)",
            rusqlite::params![i, format!("row {i} v1")],
        )
        .unwrap();
        if i % 10 == 0 {
            w.wait_quiet();
        }
    }
    c.execute_batch("DELETE FROM fixture WHERE id % 7 = 0; UPDATE fixture SET v = replace(v, 'v1', 'v2') WHERE id > 30;")
        .unwrap();
    w.stop();
    let out = dir.path().join("check.db");
    restore_ok(&fixture(), &out, &[]);
    assert_eq!(rows(&out), expected_rows());
}

fn compacted_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/replica-v1-compacted")
}

/// The same history after compaction (FORMAT.md, "Compaction"): merged
/// objects only, which must keep restoring to the same rows.
#[test]
fn committed_compacted_fixture_still_restores() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fixture.db");
    let o = walstream(&[
        "restore",
        "-o",
        out.to_str().unwrap(),
        compacted_fixture().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("segments=1 "),
        "one merged object expected: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    integrity_ok(&out);
    assert_eq!(rows(&out), expected_rows());
    let v = walstream(&["verify", compacted_fixture().to_str().unwrap()]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

/// After compaction the listings show the merged object (with its level
/// and range) and the position the generation really ends at, the same as
/// before compaction and as a restore reaches (issue 18: they showed
/// `last_pos 0` and no segments).
#[test]
fn listings_show_merged_objects_and_the_true_end() {
    let last_pos = |replica: &Path| -> String {
        let o = walstream(&["generations", replica.to_str().unwrap()]);
        assert!(o.status.success());
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let row = text.lines().nth(1).expect("one generation").to_string();
        row.split_whitespace().nth(2).unwrap().to_string()
    };
    assert_eq!(last_pos(&compacted_fixture()), last_pos(&fixture()));
    assert_eq!(last_pos(&compacted_fixture()), "42");
    let o = walstream(&["segments", compacted_fixture().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 1, "{text}");
    // generation, first index, last index, level
    assert_eq!(&rows[0][1..4], ["0", "21", "2"], "{text}");
}

/// Rewrites the compacted fixture from `replica-v1`:
/// `cargo test --test fixture -- --ignored`.
#[test]
#[ignore]
fn regenerate_compacted_fixture() {
    let _ = std::fs::remove_dir_all(compacted_fixture());
    let copy = |from: &Path, to: &Path| {
        for e in walk(from) {
            let dest = to.join(e.strip_prefix(from).unwrap());
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(&e, dest).unwrap();
        }
    };
    copy(&fixture(), &compacted_fixture());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let storage: walstream::storage::DynStorage =
        std::sync::Arc::new(walstream::storage::FileStorage::new(compacted_fixture()));
    let replica = walstream::replica::Replica::new(storage);
    // Far in the future: every bucket is closed and old.
    let now = chrono::Utc::now().timestamp_millis() + 48 * 3_600_000;
    let levels = [
        std::time::Duration::from_secs(24 * 3600),
        std::time::Duration::from_secs(48 * 3600),
    ];
    let report = rt
        .block_on(walstream::compact::compact(&replica, &levels, now))
        .unwrap();
    assert!(report.created[0] >= 1, "{report:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The encrypted form (FORMAT.md, "Encrypted objects"): a replica written
/// with `age:` to the test key in tests/fixtures/age-test-key.txt, from the
/// same rows as the plain fixture, restores with the key, refuses without
/// it, and holds no row in the clear.
#[test]
fn committed_encrypted_fixture_still_restores() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let replica = root.join("replica-age-v1");
    let key = root.join("age-test-key.txt");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fixture.db");
    restore_ok(&replica, &out, &["--age-identity", key.to_str().unwrap()]);
    assert_eq!(rows(&out), expected_rows());
    let bare = dir.path().join("bare.db");
    let o = walstream(&[
        "restore",
        "-o",
        bare.to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("encrypted with age"));
    assert!(!bare.exists());
    let mut stack = vec![replica];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                let data = std::fs::read(e.path()).unwrap();
                assert!(
                    !data.windows(8).any(|w| w == b"row 1 v1"),
                    "{} holds a row in the clear",
                    e.path().display()
                );
            }
        }
    }
}

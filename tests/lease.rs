//! One writer per replica (issue 20): a second `replicate` of the same
//! database waits for the first's lease and takes over with no gap, or is
//! refused with `wait: false`; another database pointed at the same replica
//! is refused; a holder frozen past its ttl is taken over and writes nothing
//! when it wakes.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// A rolling deploy: the new process waits for the old one's lease while
/// the application writes, takes over when it stops, and the replica
/// restores exactly, with no gap.
#[test]
fn a_second_replicator_waits_then_takes_over_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = dir.path().join("replica");
    let cfg = replicate_config(
        dir.path(),
        "w.yml",
        &db,
        &format!("path: {}", replica.display()),
        "",
    );
    let mut c = app(&db);
    create_items(&c);
    let mut rng = Rng::new(1);
    let first = Proc::start(
        &["--config", cfg.to_str().unwrap()],
        &dir.path().join("1.log"),
    );
    first.wait_for("starting new generation", Duration::from_secs(20));
    let second = Proc::start(
        &["--config", cfg.to_str().unwrap()],
        &dir.path().join("2.log"),
    );
    second.wait_for("waiting for the replica's lease", Duration::from_secs(20));
    for _ in 0..100 {
        random_txn(&mut c, &mut rng);
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = first.stop();
    assert!(log.contains("holding the replica's lease"), "{log}");
    second.wait_for("holding the replica's lease", Duration::from_secs(20));
    for _ in 0..100 {
        random_txn(&mut c, &mut rng);
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(500));
    let log2 = second.stop();
    assert!(
        !log2.contains("starting new generation"),
        "the second continued the generation:\n{log2}"
    );
    let out = dir.path().join("restored.db");
    restore_ok(&replica, &out, &[]);
    assert_same(&db, &out);
    let v = walstream(&["verify", replica.to_str().unwrap()]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

/// `lease: {wait: false}`: the second exits at once, naming the holder;
/// and a second database given the same replica path is refused even when
/// waiting, naming the first.
#[test]
fn a_held_replica_is_refused_with_wait_false_or_for_another_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let other = dir.path().join("other.db");
    let replica = dir.path().join("replica");
    create_items(&app(&db));
    create_items(&app(&other));
    let cfg = replicate_config(
        dir.path(),
        "w.yml",
        &db,
        &format!("path: {}", replica.display()),
        "",
    );
    let first = Proc::start(
        &["--config", cfg.to_str().unwrap()],
        &dir.path().join("1.log"),
    );
    first.wait_for("starting new generation", Duration::from_secs(20));
    let pid = first.child.id().to_string();

    let nowait = replicate_config(
        dir.path(),
        "nowait.yml",
        &db,
        &format!(
            "path: {}\n        lease: {{wait: false}}",
            replica.display()
        ),
        "",
    );
    let o = Command::new(bin())
        .args(["replicate", "--config", nowait.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("wait: false") && err.contains(&pid), "{err}");

    let shared = replicate_config(
        dir.path(),
        "shared.yml",
        &other,
        &format!("path: {}", replica.display()),
        "",
    );
    let o = Command::new(bin())
        .args(["replicate", "--config", shared.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("two databases must not share") && err.contains(db.to_str().unwrap()),
        "{err}"
    );
    first.stop();
    let out = dir.path().join("restored.db");
    restore_ok(&replica, &out, &[]);
    assert_same(&db, &out);
}

/// On S3: a holder frozen (SIGSTOP) past its ttl is taken over by a second
/// replicator; resumed, it writes nothing more (its lease is gone), and the
/// replica restores exactly the new holder's state.
#[test]
fn a_frozen_holder_is_taken_over_and_writes_nothing_after() {
    use common::s3server::{S3Server, AK, BUCKET, SK};
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica = format!(
        "type: s3\n        bucket: {BUCKET}\n        path: leased\n        endpoint: http://{}\n        region: us-east-1\n        force-path-style: true\n        access-key-id: {AK}\n        secret-access-key: {SK}\n        sync-interval: 100ms\n        lease: {{ttl: 2s}}",
        server.addr
    );
    let cfg = replicate_config(dir.path(), "w.yml", &db, &replica, "");
    let mut c = app(&db);
    create_items(&c);
    let mut rng = Rng::new(2);
    let first = Proc::start(
        &["--config", cfg.to_str().unwrap()],
        &dir.path().join("1.log"),
    );
    first.wait_for("starting new generation", Duration::from_secs(20));
    for _ in 0..30 {
        random_txn(&mut c, &mut rng);
    }
    std::thread::sleep(Duration::from_millis(500));
    first.signal(libc::SIGSTOP);
    let second = Proc::start(
        &["--config", cfg.to_str().unwrap()],
        &dir.path().join("2.log"),
    );
    second.wait_for("taking over the replica's lease", Duration::from_secs(30));
    second.wait_for(
        "starting new generation|resuming generation",
        Duration::from_secs(20),
    );
    for _ in 0..30 {
        random_txn(&mut c, &mut rng);
    }
    first.signal(libc::SIGCONT);
    for _ in 0..30 {
        random_txn(&mut c, &mut rng);
        std::thread::sleep(Duration::from_millis(20));
    }
    first.wait_for(
        "lost the replica's lease|not renewed within its ttl|does not hold the replica's lease",
        Duration::from_secs(10),
    );
    // With no application to keep running, it exits, not ready and
    // failing, and leaves the replica to its new holder.
    let mut first = first;
    let st = wait_timeout(&mut first.child, Duration::from_secs(30));
    assert!(
        !st.success(),
        "a holder that lost its lease exited 0:\n{}",
        first.log()
    );
    let log2 = second.stop();
    let out = dir.path().join("restored.db");
    let url = format!(
        "s3://{BUCKET}/leased?endpoint=http://{}&region=us-east-1&forcePathStyle=true",
        server.addr
    );
    let o = Command::new(bin())
        .args(["restore", "-o", out.to_str().unwrap(), &url])
        .env("AWS_ACCESS_KEY_ID", AK)
        .env("AWS_SECRET_ACCESS_KEY", SK)
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}\n{log2}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_same(&db, &out);
    let log1 = first.log();
    let after_resume = log1
        .rsplit("lost the replica's lease")
        .next()
        .unwrap_or_default();
    assert!(
        !after_resume.contains("shipped segment"),
        "the old holder shipped after losing its lease:\n{log1}"
    );
}

//! The S3 backend against real S3 protocol servers on loopback: s3s-fs,
//! in-process, checking SigV4 signatures, and moto, an independent
//! implementation run as a child process (see `common/moto.rs`). A small TCP
//! proxy in front of s3s-fs injects faults (dropped connections, outages).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use walstream::config::S3Target;
use walstream::storage::{S3Storage, Storage};

use common::moto::MotoServer;
use common::s3server::{S3Server, AK, BUCKET, SK};

/// Proxy modes.
const PASS: u32 = 0;
const DOWN: u32 = 1;
const FLAKY: u32 = 2;

/// A TCP proxy that can drop a share of connections or all of them.
struct Proxy {
    addr: SocketAddr,
    mode: Arc<AtomicU32>,
    dropped: Arc<AtomicU64>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let mode = Arc::new(AtomicU32::new(PASS));
        let dropped = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let (m, d) = (mode.clone(), dropped.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let mut n = 0u64;
                loop {
                    let (mut client, _) = listener.accept().await.unwrap();
                    n += 1;
                    let mode = m.load(Ordering::SeqCst);
                    if mode == DOWN || (mode == FLAKY && n % 3 == 0) {
                        d.fetch_add(1, Ordering::SeqCst);
                        drop(client);
                        continue;
                    }
                    let stall = mode == FLAKY && n % 5 == 0;
                    let (m2, d2) = (m.clone(), d.clone());
                    tokio::spawn(async move {
                        if stall {
                            tokio::time::sleep(Duration::from_millis(1500)).await;
                        }
                        let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                            return;
                        };
                        let started = std::time::Instant::now();
                        let lifetime = Duration::from_millis(100 + (n % 4) * 100);
                        let cut = async {
                            // Pooled connections are cut too: all of them when
                            // storage is down, after a short life when flaky.
                            loop {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                match m2.load(Ordering::SeqCst) {
                                    DOWN => break,
                                    FLAKY if started.elapsed() > lifetime => break,
                                    _ => {}
                                }
                            }
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut => { d2.fetch_add(1, Ordering::SeqCst); }
                        }
                    });
                }
            });
        });
        Proxy {
            addr: rx.recv().unwrap(),
            mode,
            dropped,
        }
    }
}

fn target(addr: SocketAddr, prefix: &str, secret: &str) -> S3Target {
    let mut t = S3Target::new(BUCKET, prefix);
    t.endpoint = Some(format!("http://{addr}"));
    t.region = Some("us-east-1".into());
    t.force_path_style = true;
    t.access_key_id = Some(AK.into());
    t.secret_access_key = Some(secret.into());
    t
}

fn config(
    dir: &Path,
    db: &Path,
    addr: SocketAddr,
    prefix: &str,
    secret: &str,
) -> std::path::PathBuf {
    let cfg = dir.join(format!(
        "s3-{}-{}.yml",
        prefix.replace('/', "-"),
        addr.port()
    ));
    std::fs::write(
        &cfg,
        format!(
            "dbs:\n  - path: {}\n    replicas:\n      - type: s3\n        bucket: {BUCKET}\n        path: {prefix}\n        endpoint: http://{addr}\n        region: us-east-1\n        force-path-style: true\n        access-key-id: {AK}\n        secret-access-key: {secret}\n",
            db.display()
        ),
    )
    .unwrap();
    cfg
}

fn restore_cfg(cfg: &Path, db: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "restore",
        "--config",
        cfg.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.push(db.to_str().unwrap());
    walstream(&args)
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_conforms_to_the_storage_contract() {
    let server = S3Server::start();
    let s = S3Storage::new(&target(server.addr, "conformance/prefix", SK)).await;
    common::conformance::run(&s).await;
    let (put, get, list, _delete) = s.counts().snapshot();
    assert!(
        put >= 1100 && get >= 3 && list >= 2,
        "requests counted: {:?}",
        s.counts().snapshot()
    );
}

/// The same contract against moto: list pagination past 1000 keys,
/// idempotent deletes and multipart upload (`put_file` of 12 MB) as a second
/// implementation understands them.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(moto),
    ignore = "skipped: needs moto's S3 server, set WALSTREAM_MOTO_SERVER (.ci/run installs it)"
)]
async fn moto_conforms_to_the_storage_contract() {
    let Some(server) = tokio::task::spawn_blocking(|| MotoServer::start(&[BUCKET]))
        .await
        .unwrap()
    else {
        return;
    };
    let s = S3Storage::new(&target(server.addr, "conformance/prefix", SK)).await;
    common::conformance::run(&s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn large_objects_use_multipart_upload() {
    let server = S3Server::start();
    let mut t = target(server.addr, "multipart", SK);
    t.part_size = Some(5 << 20);
    let s = S3Storage::new(&t).await;
    let data: Vec<u8> = (0..(12u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    s.put("big/object", data.clone()).await.unwrap();
    // create + 3 parts + complete
    assert_eq!(s.counts().snapshot().0, 5);
    assert_eq!(s.get("big/object").await.unwrap(), data);
}

#[test]
fn replicate_and_restore_through_s3() {
    let server = S3Server::start();
    replicate_and_restore_through(server.addr);
}

#[test]
#[cfg_attr(
    not(moto),
    ignore = "skipped: needs moto's S3 server, set WALSTREAM_MOTO_SERVER (.ci/run installs it)"
)]
fn replicate_and_restore_through_moto() {
    if let Some(server) = MotoServer::start(&[BUCKET]) {
        replicate_and_restore_through(server.addr);
    }
}

/// Replicate, restore the latest state and a point in time, restart into a
/// new generation whose snapshot goes up in parts, and list, all through the
/// S3 server at `addr`.
fn replicate_and_restore_through(addr: SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let cfg = config(dir.path(), &db, addr, "prod/app", SK);
    // Ship each commit at once, so the point-in-time marks below are exact.
    let text = std::fs::read_to_string(&cfg).unwrap() + "        sync-interval: 0s\n";
    std::fs::write(&cfg, text).unwrap();
    let mut c = app(&db);
    create_items(&c);
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    let mut rng = Rng::new(21);
    // Incompressible data so the snapshot below spans several parts.
    let tx = c.transaction().unwrap();
    for _ in 0..40 {
        tx.execute(
            "INSERT INTO items(k, b) VALUES (0, ?1)",
            [rng.bytes(300_000)],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    for _ in 0..100 {
        random_txn(&mut c, &mut rng);
    }
    w.wait_quiet();
    let mark = chrono::Utc::now();
    let rows_at_mark = dump(&db);
    std::thread::sleep(Duration::from_millis(50));
    for _ in 0..50 {
        random_txn(&mut c, &mut rng);
    }
    w.stop();
    let out = dir.path().join("restored.db");
    let o = restore_cfg(&cfg, &db, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    integrity_ok(&out);
    assert_same(&db, &out);
    let pit = dir.path().join("pit.db");
    let ts = mark.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let o = restore_cfg(&cfg, &db, &pit, &["--timestamp", &ts]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = dump(&pit);
    assert!(
        got == rows_at_mark,
        "point-in-time content differs: {} rows vs {} at mark",
        got.len(),
        rows_at_mark.len()
    );

    // A change while walstream is down forces a new generation on restart,
    // whose 12 MB snapshot streams up as a multipart upload.
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    random_txn(&mut c, &mut rng);
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    random_txn(&mut c, &mut rng);
    let log = w.stop();
    assert!(log.contains("starting new generation"), "{log}");
    let snap_line = log
        .lines()
        .rev()
        .find(|l| l.contains("stored snapshot"))
        .unwrap()
        .to_string();
    let out = dir.path().join("restored2.db");
    let o = restore_cfg(&cfg, &db, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&db, &out);
    assert!(
        snap_line.contains("bytes=1"),
        "snapshot should be large: {snap_line}"
    );
    let url = format!(
        "s3://{BUCKET}/prod/app?endpoint=http://{addr}&region=us-east-1&forcePathStyle=true"
    );
    let o = std::process::Command::new(bin())
        .args(["generations", &url])
        .env("AWS_ACCESS_KEY_ID", AK)
        .env("AWS_SECRET_ACCESS_KEY", SK)
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listing = String::from_utf8_lossy(&o.stdout);
    assert_eq!(listing.lines().count(), 3, "{listing}");
}

#[test]
fn wrong_credentials_fail_clearly_and_lose_nothing() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let mut c = app(&db);
    create_items(&c);
    let mut rng = Rng::new(22);
    for _ in 0..20 {
        random_txn(&mut c, &mut rng);
    }
    let bad = config(dir.path(), &db, server.addr, "creds", "wrong-secret");
    let o = walstream(&["replicate", "--config", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("SignatureDoesNotMatch") || err.contains("AccessDenied"),
        "{err}"
    );
    assert!(!err.contains("wrong-secret"), "secret leaked: {err}");
    // Fixed credentials: everything committed meanwhile is shipped.
    for _ in 0..20 {
        random_txn(&mut c, &mut rng);
    }
    let good = config(dir.path(), &db, server.addr, "creds", SK);
    let w = Replicating::start(&["--config", good.to_str().unwrap()]);
    for _ in 0..10 {
        random_txn(&mut c, &mut rng);
    }
    w.stop();
    let out = dir.path().join("restored.db");
    let o = restore_cfg(&good, &db, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&db, &out);
}

#[test]
fn flaky_storage_and_outage_lose_nothing() {
    let server = S3Server::start();
    let proxy = Proxy::start(server.addr);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let via_proxy = config(dir.path(), &db, proxy.addr, "flaky", SK);
    let direct = config(dir.path(), &db, server.addr, "flaky", SK);
    let mut c = app(&db);
    create_items(&c);
    let w = Replicating::start(&["--config", via_proxy.to_str().unwrap()]);
    let mut rng = Rng::new(23);

    // A third of connections dropped, some stalled.
    proxy.mode.store(FLAKY, Ordering::SeqCst);
    for _ in 0..60 {
        random_txn(&mut c, &mut rng);
        std::thread::sleep(Duration::from_millis(5));
    }
    // Storage down for a while: writes go on, frames stay pinned in the WAL.
    proxy.mode.store(DOWN, Ordering::SeqCst);
    for _ in 0..60 {
        random_txn(&mut c, &mut rng);
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(3));
    proxy.mode.store(PASS, Ordering::SeqCst);
    for _ in 0..10 {
        random_txn(&mut c, &mut rng);
    }
    w.wait_quiet();
    let log = w.stop();
    assert!(proxy.dropped.load(Ordering::SeqCst) > 0);
    assert!(
        log.contains("will retry"),
        "outage should be logged:\n{log}"
    );
    let out = dir.path().join("restored.db");
    let o = restore_cfg(&direct, &db, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&db, &out);
}

#[test]
fn steady_load_is_batched_by_sync_interval() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let cfg = config(dir.path(), &db, server.addr, "batched", SK);
    let text = std::fs::read_to_string(&cfg).unwrap() + "        sync-interval: 500ms\n";
    std::fs::write(&cfg, text).unwrap();
    let c = app(&db);
    create_items(&c);
    let w = Replicating::start(&["--config", cfg.to_str().unwrap()]);
    let started = std::time::Instant::now();
    let mut commits = 0;
    while started.elapsed() < Duration::from_secs(2) {
        c.execute(
            "INSERT INTO items(k, v) VALUES (?1, 'small row')",
            [commits],
        )
        .unwrap();
        commits += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    let log = w.stop();
    let segments = log.matches("shipped segment").count();
    // 2 s at one upload per 500 ms, plus the first and the final one.
    assert!(
        commits > 50 && segments <= 7,
        "{commits} commits went up as {segments} segments"
    );
    let out = dir.path().join("restored.db");
    let o = restore_cfg(&cfg, &db, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&db, &out);
}

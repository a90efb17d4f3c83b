//! An S3 protocol server on loopback for tests and benchmarks: s3s-fs,
//! in-process on its own runtime, checking SigV4 signatures and counting
//! requests by operation.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub const AK: &str = "walstream-test-key";
pub const SK: &str = "walstream-test-secret";
pub const BUCKET: &str = "walstream-bucket";

/// Requests seen, by S3 operation name.
#[derive(Clone, Default)]
pub struct Counts(pub Arc<Mutex<BTreeMap<String, u64>>>);

impl Counts {
    pub fn total(&self) -> u64 {
        self.0.lock().unwrap().values().sum()
    }
    pub fn get(&self, op: &str) -> u64 {
        self.0.lock().unwrap().get(op).copied().unwrap_or(0)
    }
    pub fn reset(&self) {
        self.0.lock().unwrap().clear();
    }
}

struct Counting(Counts);

#[async_trait::async_trait]
impl s3s::access::S3Access for Counting {
    async fn check(&self, cx: &mut s3s::access::S3AccessContext<'_>) -> s3s::S3Result<()> {
        if cx.credentials().is_none() {
            return Err(s3s::s3_error!(AccessDenied));
        }
        *self
            .0
             .0
            .lock()
            .unwrap()
            .entry(cx.s3_op().name().to_string())
            .or_default() += 1;
        Ok(())
    }
}

pub struct S3Server {
    pub addr: SocketAddr,
    pub counts: Counts,
    _root: tempfile::TempDir,
}

impl S3Server {
    pub fn start() -> S3Server {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let path = root.path().to_path_buf();
        let counts = Counts::default();
        let c = counts.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let fs = s3s_fs::FileSystem::new(&path).unwrap();
                let mut b = s3s::service::S3ServiceBuilder::new(fs);
                b.set_auth(s3s::auth::SimpleAuth::from_single(AK, SK));
                b.set_access(Counting(c));
                let service = b.build();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let http = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                loop {
                    let (socket, _) = listener.accept().await.unwrap();
                    let conn = http
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone())
                        .into_owned();
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
            });
        });
        S3Server {
            addr: rx.recv().unwrap(),
            counts,
            _root: root,
        }
    }
}

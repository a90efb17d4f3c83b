//! A second S3 implementation on loopback: moto's server (PyPI
//! `moto[server]`), started by the test itself as a child process.
//!
//! s3s-fs shares its protocol code with no other server, so a quirk of the
//! AWS SDK that s3s-fs happens to accept (the aws-chunked checksums that broke
//! Litestream on R2 and B2) would pass unnoticed with it alone. moto is an
//! independent implementation written against real S3's behaviour.
//!
//! The server binary is `$WALSTREAM_MOTO_SERVER`, or the one `.ci/run`
//! installs into `target/ci-venv`.
//! `.ci/run` installs it into a virtual environment and sets
//! `WALSTREAM_REQUIRE_MOTO=1`, which turns a missing server into a failure
//! instead of a skip.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct MotoServer {
    pub addr: SocketAddr,
    child: Child,
}

fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WALSTREAM_MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    // The version `.ci/run` pins, if it ran here. Not whatever `moto_server`
    // is on PATH: moto 5.2.1 answers CompleteMultipartUpload with a response
    // the AWS SDK rejects (5.2.5 does not), and an old one on a developer's
    // machine would fail the suite for moto's bug.
    let pinned = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/bin/moto_server");
    pinned.is_file().then_some(pinned)
}

/// One plain HTTP/1.1 request (moto runs without authentication); returns
/// the status code.
fn request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {reply:?}")))
}

impl MotoServer {
    /// Starts moto on a free loopback port with the given buckets created, or
    /// returns `None` (after saying so) when moto is not installed and not
    /// required.
    pub fn start(buckets: &[&str]) -> Option<MotoServer> {
        let Some(bin) = binary() else {
            assert!(
                std::env::var_os("WALSTREAM_REQUIRE_MOTO").is_none(),
                "WALSTREAM_REQUIRE_MOTO is set but moto_server was not found \
                 (set WALSTREAM_MOTO_SERVER)"
            );
            eprintln!("skipped: moto_server not found (run .ci/run, or set WALSTREAM_MOTO_SERVER)");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let server = MotoServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while request(server.addr, "GET", "/").is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on {} within 60 s",
                server.addr
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for b in buckets {
            let code = request(server.addr, "PUT", &format!("/{b}")).unwrap();
            assert_eq!(code, 200, "moto: creating bucket {b}");
        }
        Some(server)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

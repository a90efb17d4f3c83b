//! An HTTP/1.1 proxy in front of the loopback S3 server that injects the
//! faults real object stores produce: 500 InternalError, 503 SlowDown,
//! connection resets, slow responses, and bodies cut short. Rates are per
//! mille per request and can change while it runs. `hang` makes every
//! request from then on go unanswered, as a server that died mid-run would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
pub struct Rates {
    pub internal_error: AtomicU32,
    pub slow_down: AtomicU32,
    pub reset: AtomicU32,
    pub delay: AtomicU32,
    pub cut_body: AtomicU32,
    /// Every request is read and never answered (the connection stays open).
    pub hang: AtomicBool,
}

impl Rates {
    pub fn set_all(&self, per_mille: u32) {
        for r in [
            &self.internal_error,
            &self.slow_down,
            &self.reset,
            &self.delay,
            &self.cut_body,
        ] {
            r.store(per_mille, Ordering::SeqCst);
        }
    }
}

#[derive(Default, Debug)]
pub struct Injected {
    pub requests: AtomicU64,
    pub internal_error: AtomicU64,
    pub slow_down: AtomicU64,
    pub reset: AtomicU64,
    pub delay: AtomicU64,
    pub cut_body: AtomicU64,
}

impl Injected {
    pub fn faults(&self) -> u64 {
        [
            &self.internal_error,
            &self.slow_down,
            &self.reset,
            &self.delay,
            &self.cut_body,
        ]
        .iter()
        .map(|c| c.load(Ordering::SeqCst))
        .sum()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} requests: {} InternalError, {} SlowDown, {} resets, {} delays, {} cut bodies",
            self.requests.load(Ordering::SeqCst),
            self.internal_error.load(Ordering::SeqCst),
            self.slow_down.load(Ordering::SeqCst),
            self.reset.load(Ordering::SeqCst),
            self.delay.load(Ordering::SeqCst),
            self.cut_body.load(Ordering::SeqCst)
        )
    }
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    pub rates: Arc<Rates>,
    pub injected: Arc<Injected>,
}

#[derive(Clone, Copy)]
enum Fault {
    None,
    InternalError,
    SlowDown,
    Reset,
    Delay,
    CutBody,
}

impl FaultProxy {
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let rates = Arc::new(Rates::default());
        let injected = Arc::new(Injected::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let (r, inj) = (rates.clone(), injected.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let seed = Arc::new(AtomicU64::new(1));
                loop {
                    let (client, _) = listener.accept().await.unwrap();
                    let (r, inj, seed) = (r.clone(), inj.clone(), seed.clone());
                    tokio::spawn(async move {
                        let _ = serve(client, upstream, &r, &inj, &seed).await;
                    });
                }
            });
        });
        FaultProxy {
            addr: rx.recv().unwrap(),
            rates,
            injected,
        }
    }
}

/// Faults are spread evenly rather than drawn at random, so every kind is
/// injected in a short run: request `n` is faulted when `n` falls on the
/// period the summed rates give, and faulted requests take turns among the
/// kinds whose rate is not zero.
fn pick(rates: &Rates, seed: &AtomicU64) -> Fault {
    let n = seed.fetch_add(1, Ordering::SeqCst);
    let kinds = [
        (
            rates.internal_error.load(Ordering::SeqCst),
            Fault::InternalError,
        ),
        (rates.slow_down.load(Ordering::SeqCst), Fault::SlowDown),
        (rates.reset.load(Ordering::SeqCst), Fault::Reset),
        (rates.delay.load(Ordering::SeqCst), Fault::Delay),
        (rates.cut_body.load(Ordering::SeqCst), Fault::CutBody),
    ];
    let total: u64 = kinds.iter().map(|k| k.0 as u64).sum();
    if total == 0 {
        return Fault::None;
    }
    let period = (1000 / total).max(1);
    if n % period != 0 {
        return Fault::None;
    }
    let on: Vec<Fault> = kinds.iter().filter(|k| k.0 > 0).map(|k| k.1).collect();
    on[((n / period) as usize) % on.len()]
}

/// Reads one HTTP message head (through the blank line).
async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Vec<u8>>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = buf[..end + 4].to_vec();
            buf.drain(..end + 4);
            return Ok(Some(head));
        }
        let mut chunk = [0u8; 8192];
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head).lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Reads exactly `n` body bytes (some may already be in `buf`).
async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    n: usize,
) -> std::io::Result<Vec<u8>> {
    while buf.len() < n {
        let mut chunk = [0u8; 65536];
        let k = r.read(&mut chunk).await?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..k]);
    }
    Ok(buf.drain(..n).collect())
}

/// Reads a chunked body, returning its raw bytes (chunk framing included).
async fn read_chunked<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    loop {
        let line = loop {
            if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
                break buf.drain(..end + 2).collect::<Vec<u8>>();
            }
            let mut chunk = [0u8; 8192];
            let k = r.read(&mut chunk).await?;
            if k == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..k]);
        };
        raw.extend_from_slice(&line);
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&line)
                .trim()
                .split(';')
                .next()
                .unwrap_or("0"),
            16,
        )
        .unwrap_or(0);
        let data = read_body(r, buf, size + 2).await?;
        raw.extend_from_slice(&data);
        if size == 0 {
            return Ok(raw);
        }
    }
}

fn error_response(status: &str, code: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected</Message></Error>"
    );
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    rates: &Rates,
    inj: &Injected,
    seed: &AtomicU64,
) -> std::io::Result<()> {
    let mut cbuf = Vec::new();
    loop {
        let Some(head) = read_head(&mut client, &mut cbuf).await? else {
            return Ok(());
        };
        let len: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if header(&head, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let body = read_body(&mut client, &mut cbuf, len).await?;
        let is_head = head.starts_with(b"HEAD ");
        inj.requests.fetch_add(1, Ordering::SeqCst);
        if rates.hang.load(Ordering::SeqCst) {
            return std::future::pending().await;
        }
        let fault = pick(rates, seed);
        match fault {
            Fault::InternalError => {
                inj.internal_error.fetch_add(1, Ordering::SeqCst);
                client
                    .write_all(&error_response(
                        "500 Internal Server Error",
                        "InternalError",
                    ))
                    .await?;
                return Ok(());
            }
            Fault::SlowDown => {
                inj.slow_down.fetch_add(1, Ordering::SeqCst);
                client
                    .write_all(&error_response("503 Slow Down", "SlowDown"))
                    .await?;
                return Ok(());
            }
            Fault::Reset => {
                inj.reset.fetch_add(1, Ordering::SeqCst);
                return Ok(()); // dropped without a response
            }
            Fault::Delay => {
                inj.delay.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(
                    400 + seed.load(Ordering::SeqCst) % 7 * 100,
                ))
                .await;
            }
            _ => {}
        }
        let mut server = TcpStream::connect(upstream).await?;
        server.write_all(&head).await?;
        server.write_all(&body).await?;
        let mut sbuf = Vec::new();
        let (rhead, status) = loop {
            let Some(rhead) = read_head(&mut server, &mut sbuf).await? else {
                return Ok(());
            };
            let status: u32 = String::from_utf8_lossy(&rhead)
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            // The client already had its 100 Continue from us.
            if status != 100 {
                break (rhead, status);
            }
        };
        let no_body = is_head || status == 204 || status == 304;
        let rbody = if no_body {
            Vec::new()
        } else if let Some(n) = header(&rhead, "content-length").and_then(|v| v.parse().ok()) {
            read_body(&mut server, &mut sbuf, n).await?
        } else if header(&rhead, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            read_chunked(&mut server, &mut sbuf).await?
        } else {
            let mut rest = sbuf.clone();
            server.read_to_end(&mut rest).await?;
            rest
        };
        if let Fault::CutBody = fault {
            if rbody.len() > 1 {
                inj.cut_body.fetch_add(1, Ordering::SeqCst);
                client.write_all(&rhead).await?;
                client.write_all(&rbody[..rbody.len() / 2]).await?;
                return Ok(()); // closed mid-body
            }
        }
        client.write_all(&rhead).await?;
        client.write_all(&rbody).await?;
    }
}

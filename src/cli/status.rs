//! `walstream status`: what a running daemon is doing, asked over its
//! control socket (see `control`), or its HTTP endpoint (`addr` in the
//! config), one line per database and replica.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use super::out::outln;
use super::target::{absolute, config_path, load_settings, DEFAULT_CONFIGS};

pub async fn run(
    config: Option<PathBuf>,
    addr: Option<String>,
    db: Option<PathBuf>,
    json: bool,
) -> Result<ExitCode> {
    // The control socket, unless --addr says otherwise or the config names
    // an HTTP address and no socket (as configs did before the socket).
    let http_configured = config_path(config.as_deref(), &DEFAULT_CONFIGS)
        .and_then(|(cfg, _)| load_settings(&cfg).ok())
        .is_some_and(|s| s.socket.is_none() && s.addr.is_some());
    if addr.is_none() && !http_configured {
        match super::control::find_socket(config.as_deref()).await {
            Ok(socket) => return super::control::status(&socket, db.as_deref(), json).await,
            Err(e) if json => return Err(e),
            Err(_) => {}
        }
    }
    let addr = match addr {
        Some(a) => a,
        None => {
            let (cfg, _) = config_path(config.as_deref(), &DEFAULT_CONFIGS).ok_or_else(|| {
                anyhow!("no daemon to ask: status reads a running `walstream replicate` over HTTP; give --addr HOST:PORT, or --config FILE with `addr:` set")
            })?;
            let settings = load_settings(&cfg)?;
            settings.addr.ok_or_else(|| {
                anyhow!(
                    "{} has no `addr:`: status reads a running daemon over HTTP; add `addr: 127.0.0.1:9090` and (re)start `walstream replicate --config {}`",
                    cfg.display(),
                    cfg.display()
                )
            })?
        }
    };
    let mut sock = walstream::server::parse_addr(&addr)?;
    if sock.ip().is_unspecified() {
        sock.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let stream = tokio::net::TcpStream::connect(sock).await.map_err(|e| {
        anyhow!("no walstream daemon answers on {sock} ({e}); start one with `walstream replicate --config FILE` (with `addr: {addr}`)")
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP to {sock}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/status")
        .header("host", sock.to_string())
        .body(Empty::<Bytes>::new())?;
    let res = sender
        .send_request(req)
        .await
        .with_context(|| format!("GET http://{sock}/status"))?;
    if !res.status().is_success() {
        bail!(
            "http://{sock}/status answered {} (is it a walstream daemon of this version?)",
            res.status()
        );
    }
    let body = res
        .into_body()
        .collect()
        .await
        .with_context(|| format!("GET http://{sock}/status"))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    let wanted = db.as_deref().map(|p| absolute(p).display().to_string());
    let mut shown = 0;
    for (i, line) in text.lines().enumerate() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if i == 0 || wanted.as_deref().is_none_or(|w| w == first) {
            outln!("{line}");
            shown += 1;
        }
    }
    if let (Some(w), 1) = (&wanted, shown) {
        bail!("the daemon on {sock} does not replicate {w}");
    }
    Ok(ExitCode::SUCCESS)
}

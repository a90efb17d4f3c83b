//! `walstream sync`, `register` and `unregister`, and `status` over the
//! control socket: a client of the running daemon's control API (see
//! `walstream::control`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use super::out::outln;
use super::target::{absolute, config_path, load_settings, DEFAULT_CONFIGS};

/// The running daemon's control socket: from `--config FILE`'s `socket:`
/// (or the default config's), else the first default place a daemon
/// answers on.
pub async fn find_socket(config: Option<&Path>) -> Result<PathBuf> {
    let (configured, dir) = match config_path(config, &DEFAULT_CONFIGS) {
        Some((cfg, _)) => {
            let s = load_settings(&cfg)?;
            (s.socket, s.config_dir)
        }
        None => (None, None),
    };
    let candidates = walstream::control::socket_candidates(configured.as_deref(), dir.as_deref());
    for c in &candidates {
        if tokio::net::UnixStream::connect(c).await.is_ok() {
            return Ok(c.clone());
        }
    }
    bail!(
        "no walstream daemon answers on {}: start `walstream replicate` (its `socket:` sets the path), or give --config FILE",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    )
}

/// One request to the daemon at `socket`; the status and the JSON body.
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("control socket {}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("control socket {}", socket.display()))?;
    tokio::spawn(conn);
    let data = body.map(|b| b.to_string()).unwrap_or_default();
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "walstream")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(data)))?;
    let res = sender
        .send_request(req)
        .await
        .with_context(|| format!("{path} on control socket {}", socket.display()))?;
    let status = res.status();
    let bytes = res
        .into_body()
        .collect()
        .await
        .with_context(|| format!("{path} on control socket {}", socket.display()))?
        .to_bytes();
    let value = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow!(
            "{path} on control socket {} answered {status} with a body that is not JSON ({e}): is it a walstream daemon of this version?",
            socket.display()
        )
    })?;
    Ok((status, value))
}

fn error_of(v: &Value) -> String {
    v.get("error")
        .and_then(Value::as_str)
        .unwrap_or("request failed")
        .to_string()
}

/// `walstream sync [--wait] [--timeout T] [--force] DB`.
pub async fn sync(
    config: Option<PathBuf>,
    db: PathBuf,
    wait: bool,
    timeout: Option<Duration>,
    force: bool,
    as_json: bool,
) -> Result<ExitCode> {
    let socket = find_socket(config.as_deref()).await?;
    let db = absolute(&db);
    let mut body = json!({"db": db, "wait": wait, "force": force});
    if let Some(t) = timeout {
        body["timeout"] = json!(t.as_secs_f64());
    }
    let (status, v) = call(&socket, Method::POST, "/sync", Some(body)).await?;
    if as_json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
    }
    match status {
        StatusCode::OK => {
            if !as_json {
                outln!(
                    "durable: {} in {} ms ({})",
                    db.display(),
                    v["waited_ms"].as_u64().unwrap_or(0),
                    positions(&v)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        StatusCode::ACCEPTED => {
            if !as_json {
                outln!("sync of {} asked for ({})", db.display(), positions(&v));
            }
            Ok(ExitCode::SUCCESS)
        }
        _ => bail!("{}", error_of(&v)),
    }
}

fn positions(v: &Value) -> String {
    v["replicas"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    format!(
                        "{}: generation {} position {}",
                        r["replica"].as_str().unwrap_or("?"),
                        r["generation"].as_str().unwrap_or("-"),
                        r["shipped_position"]
                            .as_u64()
                            .map_or("-".into(), |p| p.to_string())
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

/// `walstream register DB URL...`.
pub async fn register(config: Option<PathBuf>, db: PathBuf, urls: Vec<String>) -> Result<ExitCode> {
    if urls.is_empty() {
        bail!(
            "no replica given for {}: add a replica URL such as file:///var/backups/app",
            db.display()
        );
    }
    let socket = find_socket(config.as_deref()).await?;
    let db = absolute(&db);
    let body = json!({"path": db, "replicas": urls});
    let (status, v) = call(&socket, Method::POST, "/databases", Some(body)).await?;
    if status != StatusCode::CREATED {
        bail!("{}", error_of(&v));
    }
    outln!("replicating {}", db.display());
    Ok(ExitCode::SUCCESS)
}

/// `walstream unregister DB`.
pub async fn unregister(config: Option<PathBuf>, db: PathBuf) -> Result<ExitCode> {
    let socket = find_socket(config.as_deref()).await?;
    let db = absolute(&db);
    let path = format!("/databases?path={}", encode(&db.display().to_string()));
    let (status, v) = call(&socket, Method::DELETE, &path, None).await?;
    if status != StatusCode::OK {
        bail!("{}", error_of(&v));
    }
    outln!(
        "stopped replicating {} (everything committed was shipped)",
        db.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `walstream status` from the socket: a table, or the JSON as is.
pub async fn status(socket: &Path, db: Option<&Path>, as_json: bool) -> Result<ExitCode> {
    let (status, v) = call(socket, Method::GET, "/status", None).await?;
    if status != StatusCode::OK {
        bail!("{}", error_of(&v));
    }
    let wanted = db.map(walstream::control::key);
    let dbs: Vec<&Value> = v["databases"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|d| {
                    wanted.as_ref().is_none_or(|w| {
                        walstream::control::key(Path::new(d["db"].as_str().unwrap_or(""))) == *w
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    if let (Some(p), true) = (db, dbs.is_empty()) {
        bail!("the daemon does not replicate {}", p.display());
    }
    if as_json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({"databases": dbs}))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<40} {:<40} {:<12} {:<22} {:>9} {:>9} {:>8}  last error",
        "database",
        "replica",
        "state",
        "generation",
        "shipped",
        "pending",
        "lag"
    );
    for d in dbs {
        for r in d["replicas"].as_array().into_iter().flatten() {
            let shipped = r["shipped_position"].as_u64();
            let committed = r["committed_position"].as_u64();
            outln!(
                "{:<40} {:<40} {:<12} {:<22} {:>9} {:>9} {:>8}  {}",
                d["db"].as_str().unwrap_or("?"),
                r["replica"].as_str().unwrap_or("?"),
                r["state"].as_str().unwrap_or("?"),
                r["generation"].as_str().unwrap_or("-"),
                shipped.map_or("-".into(), |p| p.to_string()),
                committed
                    .zip(shipped)
                    .map_or("-".into(), |(c, s)| (c - s).to_string()),
                r["lag_ms"]
                    .as_u64()
                    .map_or("-".into(), |l| format!("{:.1}s", l as f64 / 1000.0)),
                r["last_error"].as_str().unwrap_or("-"),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

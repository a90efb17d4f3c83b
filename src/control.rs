//! The control API: what applications and operators ask a running daemon.
//!
//! An application that must not acknowledge a payment before it is off the
//! machine asks `POST /sync` and gets an answer once every transaction
//! committed before the request is on every replica of its database.
//! Operators ask `GET /status`, and add or remove databases without a
//! restart (`POST /databases`, `DELETE /databases`).
//!
//! It is served on a Unix socket (`socket:`, owner-only), and on the HTTP
//! `addr:` too when a `control-token:` is configured (Bearer auth; without
//! one, the TCP address serves only metrics and health, see `server`).
//! JSON in and out.
//!
//! A wait costs no request to storage: the database's worker is asked for a
//! round (`Control::Sync`), which happens when its sync-interval allows, and
//! the answer comes when each replica's last complete sync began after the
//! request (`ReplicaStatus::watch_synced`, on the monotonic clock). Only
//! `force` makes the round upload at once (`Control::Force`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::config::DbSettings;
use crate::error::{Error, Result};
use crate::metrics::ReplicaStatus;
use crate::watch::Control;

/// The default control socket.
pub const DEFAULT_SOCKET: &str = "/var/run/walstream.sock";

/// A replicated database as the API sees it.
#[derive(Clone)]
pub struct Handle {
    pub db: PathBuf,
    pub control: mpsc::UnboundedSender<Control>,
    pub statuses: Vec<Arc<ReplicaStatus>>,
}

/// Asks the daemon to change what it replicates (its run loop answers).
pub enum Change {
    Register {
        db: Box<DbSettings>,
        reply: oneshot::Sender<std::result::Result<(), String>>,
    },
    Unregister {
        path: PathBuf,
        reply: oneshot::Sender<std::result::Result<(), String>>,
    },
}

/// The state every connection shares.
pub struct Api {
    /// The databases replicated, by canonical path.
    databases: Mutex<HashMap<PathBuf, Handle>>,
    requests: mpsc::UnboundedSender<Change>,
    /// Bearer token for the TCP address (`control-token:`).
    token: Option<String>,
}

/// Where a daemon's control socket is looked for, in order: the configured
/// one, else the default (`/var/run/walstream.sock`),
/// `$XDG_RUNTIME_DIR/walstream.sock`, and `walstream.sock` in the config
/// file's directory.
pub fn socket_candidates(configured: Option<&Path>, config_dir: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = configured {
        return vec![p.to_path_buf()];
    }
    let mut out = vec![PathBuf::from(DEFAULT_SOCKET)];
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        out.push(PathBuf::from(d).join("walstream.sock"));
    }
    if let Some(d) = config_dir {
        out.push(d.join("walstream.sock"));
    }
    out
}

/// The key a database is known by: its canonical path (or its absolute
/// path while it does not exist yet).
pub fn key(db: &Path) -> PathBuf {
    std::fs::canonicalize(db)
        .or_else(|_| std::path::absolute(db))
        .unwrap_or_else(|_| db.to_path_buf())
}

impl Api {
    pub fn new(token: Option<String>) -> (Arc<Api>, mpsc::UnboundedReceiver<Change>) {
        let (requests, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Api {
                databases: Mutex::default(),
                requests,
                token,
            }),
            rx,
        )
    }

    pub fn add(&self, handle: Handle) {
        self.databases
            .lock()
            .unwrap()
            .insert(key(&handle.db), handle);
    }

    pub fn remove(&self, db: &Path) {
        self.databases.lock().unwrap().remove(&key(db));
    }

    fn find(&self, db: &str) -> std::result::Result<Handle, Reply> {
        if db.is_empty() {
            return Err(Reply::error(
                StatusCode::BAD_REQUEST,
                "missing \"db\": the database's path",
            ));
        }
        self.databases
            .lock()
            .unwrap()
            .get(&key(Path::new(db)))
            .cloned()
            .ok_or_else(|| {
                Reply::error(
                    StatusCode::NOT_FOUND,
                    &format!("database {db} is not replicated by this daemon"),
                )
            })
    }

    /// Serves the configured socket (an error if it cannot), or else the
    /// first of the default places that works (see `socket_candidates`);
    /// none working is a warning, not an error: the daemon's job is
    /// replication. Returns the socket served.
    pub async fn serve(
        self: &Arc<Self>,
        configured: Option<&Path>,
        config_dir: Option<&Path>,
    ) -> Result<Option<PathBuf>> {
        if let Some(p) = configured {
            self.serve_socket(p).await?;
            return Ok(Some(p.to_path_buf()));
        }
        let mut tried = Vec::new();
        for p in socket_candidates(None, config_dir) {
            match self.serve_socket(&p).await {
                Ok(()) => return Ok(Some(p)),
                Err(e) => tried.push(e.to_string()),
            }
        }
        tracing::warn!(tried = %tried.join("; "), "no control socket: `walstream sync` and `status` cannot reach this daemon; set `socket:` in the config");
        Ok(None)
    }

    /// Serves `socket` (owner-only) until the process ends. A stale socket
    /// file (no daemon answers on it) is replaced; a live one is an error.
    pub async fn serve_socket(self: &Arc<Self>, socket: &Path) -> Result<()> {
        if socket.exists() {
            if tokio::net::UnixStream::connect(socket).await.is_ok() {
                return Err(Error::Invalid(format!(
                    "control socket {} is in use by another walstream daemon; set `socket:` to another path",
                    socket.display()
                )));
            }
            let _ = std::fs::remove_file(socket);
        }
        let listener = tokio::net::UnixListener::bind(socket).map_err(|e| {
            Error::Invalid(format!(
                "control socket {}: cannot listen: {e}",
                socket.display()
            ))
        })?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            Error::Invalid(format!(
                "control socket {}: cannot restrict to its owner: {e}",
                socket.display()
            ))
        })?;
        tracing::info!(socket = %socket.display(), "serving the control API");
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let api = api.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.respond(req, true).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(())
    }

    /// Whether the TCP address serves the control routes (a token is set).
    pub fn on_tcp(&self) -> bool {
        self.token.is_some()
    }

    /// Answers one request. `trusted`: it came through the owner-only
    /// socket (else it needs the bearer token).
    pub async fn respond(&self, req: HttpRequest, trusted: bool) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        if !trusted {
            let ok = self.token.as_deref().is_some_and(|t| {
                req.headers()
                    .get(hyper::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .is_some_and(|given| constant_time_eq(given.as_bytes(), t.as_bytes()))
            });
            if !ok {
                return Reply::error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token (control-token)",
                )
                .into_response();
            }
        }
        let reply = match (req.method().clone(), path.as_str()) {
            (Method::POST, "/sync") => self.sync(req).await,
            (Method::GET, "/position") => self.position(&req),
            (Method::GET, "/status") => Ok(self.status()),
            (Method::POST, "/databases") => self.register(req).await,
            (Method::DELETE, "/databases") => self.unregister(&req).await,
            (Method::GET, "/healthz") => Ok(Reply::json(StatusCode::OK, json!({"ok": true}))),
            (_, "/sync" | "/position" | "/status" | "/databases") => Err(Reply::error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!(
                    "{} {path} is not an operation (see the README)",
                    req.method()
                ),
            )),
            _ => Err(Reply::error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint: {path}"),
            )),
        };
        match reply {
            Ok(r) | Err(r) => r.into_response(),
        }
    }

    async fn sync(&self, req: HttpRequest) -> std::result::Result<Reply, Reply> {
        let body: SyncRequest = read_json(req).await?;
        let handle = self.find(&body.db)?;
        let timeout = match &body.timeout {
            None => crate::defaults::SYNC_WAIT_TIMEOUT,
            Some(t) => t.duration()?,
        };
        let asked = crate::metrics::mono_us();
        let started = Instant::now();
        let mut watches: Vec<_> = handle.statuses.iter().map(|s| s.watch_synced()).collect();
        let msg = if body.force {
            Control::Force
        } else {
            Control::Sync
        };
        if handle.control.send(msg).is_err() {
            return Err(Reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("database {} is no longer replicated", handle.db.display()),
            ));
        }
        let positions = |h: &Handle| -> Vec<serde_json::Value> {
            h.statuses.iter().map(replica_json).collect()
        };
        if !body.wait {
            return Ok(Reply::json(
                StatusCode::ACCEPTED,
                json!({"db": handle.db, "durable": false, "replicas": positions(&handle)}),
            ));
        }
        let all = async {
            for w in &mut watches {
                let _ = w.wait_for(|&began| began > asked).await;
            }
        };
        match tokio::time::timeout(timeout, all).await {
            Ok(()) => {
                let waited = started.elapsed().as_millis() as u64;
                // Litestream's `sync` client reads path, txid and
                // replicated_txid: positions stand in for its transaction
                // ids.
                let first = handle.statuses.first();
                let shipped = first.and_then(|s| s.shipped()).map(|s| s.1);
                Ok(Reply::json(
                    StatusCode::OK,
                    json!({
                        "db": handle.db,
                        "durable": true,
                        "waited_ms": waited,
                        "replicas": positions(&handle),
                        "status": "synced",
                        "path": handle.db,
                        "txid": shipped.map(|p| p + first.map_or(0, |s| s.pending())),
                        "replicated_txid": shipped,
                    }),
                ))
            }
            Err(_) => {
                let behind: Vec<String> = handle
                    .statuses
                    .iter()
                    .filter(|s| *s.watch_synced().borrow() <= asked)
                    .map(|s| s.replica.clone())
                    .collect();
                Err(Reply::json(
                    StatusCode::GATEWAY_TIMEOUT,
                    json!({
                        "db": handle.db,
                        "durable": false,
                        "error": format!(
                            "not durable within {}: replica {} has not shipped everything committed before the request",
                            humantime::format_duration(timeout),
                            behind.join(", ")
                        ),
                        "waited_ms": started.elapsed().as_millis() as u64,
                        "replicas": positions(&handle),
                    }),
                ))
            }
        }
    }

    fn position(&self, req: &HttpRequest) -> std::result::Result<Reply, Reply> {
        let db = query(req, "db").unwrap_or_default();
        let handle = self.find(&db)?;
        Ok(Reply::json(
            StatusCode::OK,
            json!({"db": handle.db, "replicas": handle.statuses.iter().map(replica_json).collect::<Vec<_>>()}),
        ))
    }

    fn status(&self) -> Reply {
        let mut dbs: Vec<Handle> = self.databases.lock().unwrap().values().cloned().collect();
        dbs.sort_by(|a, b| a.db.cmp(&b.db));
        Reply::json(
            StatusCode::OK,
            json!({
                "databases": dbs.iter().map(|h| json!({
                    "db": h.db,
                    "replicas": h.statuses.iter().map(replica_json).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
        )
    }

    async fn register(&self, req: HttpRequest) -> std::result::Result<Reply, Reply> {
        let body: RegisterRequest = read_json(req).await?;
        let db = body
            .settings()
            .map_err(|e| Reply::error(StatusCode::BAD_REQUEST, &e))?;
        let path = db.path.clone();
        if self.databases.lock().unwrap().contains_key(&key(&path)) {
            return Err(Reply::error(
                StatusCode::CONFLICT,
                &format!("database {} is already replicated", path.display()),
            ));
        }
        let (reply, rx) = oneshot::channel();
        self.ask(Change::Register {
            db: Box::new(db),
            reply,
        })?;
        match rx.await {
            Ok(Ok(())) => Ok(Reply::json(
                StatusCode::CREATED,
                json!({"db": path, "registered": true}),
            )),
            Ok(Err(e)) => Err(Reply::error(StatusCode::UNPROCESSABLE_ENTITY, &e)),
            Err(_) => Err(Reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the daemon is stopping",
            )),
        }
    }

    async fn unregister(&self, req: &HttpRequest) -> std::result::Result<Reply, Reply> {
        let path = query(req, "path").unwrap_or_default();
        let handle = self.find(&path)?;
        let (reply, rx) = oneshot::channel();
        self.ask(Change::Unregister {
            path: handle.db.clone(),
            reply,
        })?;
        match rx.await {
            Ok(Ok(())) => Ok(Reply::json(
                StatusCode::OK,
                json!({"db": handle.db, "unregistered": true}),
            )),
            Ok(Err(e)) => Err(Reply::error(StatusCode::INTERNAL_SERVER_ERROR, &e)),
            Err(_) => Err(Reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the daemon is stopping",
            )),
        }
    }

    fn ask(&self, r: Change) -> std::result::Result<(), Reply> {
        self.requests
            .send(r)
            .map_err(|_| Reply::error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping"))
    }
}

type HttpRequest = Request<Incoming>;

fn replica_json(s: &Arc<ReplicaStatus>) -> serde_json::Value {
    let shipped = s.shipped();
    let position = shipped.as_ref().map(|x| x.1);
    let synced = s.synced_at_ms();
    json!({
        "replica": s.replica,
        "state": s.state().as_str(),
        "generation": shipped.as_ref().map(|x| x.0.clone()),
        "shipped_position": position,
        "committed_position": position.map(|p| p + s.pending()),
        "last_sync": (synced > 0).then(|| chrono::DateTime::from_timestamp_millis(synced)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))).flatten(),
        "lag_ms": (synced > 0).then(|| s.lag().as_millis() as u64),
        "last_error": s.last_error(),
        "wal_size": s.wal_size(),
    })
}

/// The reply to a request, as JSON.
struct Reply {
    status: StatusCode,
    body: serde_json::Value,
}

impl Reply {
    fn json(status: StatusCode, body: serde_json::Value) -> Reply {
        Reply { status, body }
    }

    fn error(status: StatusCode, message: &str) -> Reply {
        Reply {
            status,
            body: json!({ "error": message }),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut text = serde_json::to_vec_pretty(&self.body).expect("json serializes");
        text.push(b'\n');
        Response::builder()
            .status(self.status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(text)))
            .expect("static response parts are valid")
    }
}

async fn read_json<T: for<'de> Deserialize<'de>>(
    req: HttpRequest,
) -> std::result::Result<T, Reply> {
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| Reply::error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        Reply::error(
            StatusCode::BAD_REQUEST,
            &format!("the body is not the JSON this endpoint takes: {e}"),
        )
    })
}

fn query(req: &HttpRequest, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = s
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /sync`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// The database (`path` as Litestream's `sync` sends it).
    #[serde(alias = "path")]
    pub db: String,
    #[serde(default = "yes")]
    pub wait: bool,
    #[serde(default)]
    pub timeout: Option<Timeout>,
    #[serde(default)]
    pub force: bool,
}

fn yes() -> bool {
    true
}

/// `"5s"` (humantime) or a number of seconds.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Timeout {
    Text(String),
    Seconds(f64),
}

impl Timeout {
    fn duration(&self) -> std::result::Result<Duration, Reply> {
        let bad = |m: String| Reply::error(StatusCode::BAD_REQUEST, &m);
        match self {
            Timeout::Text(t) => humantime::parse_duration(t)
                .map_err(|e| bad(format!("timeout {t:?} is not a duration like \"5s\": {e}"))),
            Timeout::Seconds(s) if s.is_finite() && *s >= 0.0 => Ok(Duration::from_secs_f64(*s)),
            Timeout::Seconds(s) => Err(bad(format!("timeout {s} is not a duration"))),
        }
    }
}

/// `POST /databases`: a database entry as in the config (`path`,
/// `replicas` as URLs or replica entries, and the same optional keys).
#[derive(Debug, Deserialize)]
pub struct RegisterRequest {
    #[serde(flatten)]
    entry: serde_json::Value,
}

impl RegisterRequest {
    /// Validated as a config file's entry is (see `config`).
    fn settings(&self) -> std::result::Result<DbSettings, String> {
        let mut entry = self.entry.clone();
        // Replica URLs as plain strings.
        if let Some(rs) = entry.get_mut("replicas").and_then(|r| r.as_array_mut()) {
            for r in rs.iter_mut() {
                if let Some(url) = r.as_str() {
                    *r = json!({ "url": url });
                }
            }
        }
        if entry.get("path").and_then(|p| p.as_str()).is_none() {
            return Err("missing \"path\": the database's path".into());
        }
        let config: crate::config::Config = serde_json::from_value(json!({ "dbs": [entry] }))
            .map_err(|e| format!("not a database entry: {e}"))?;
        let settings = config
            .settings(&std::env::current_dir().unwrap_or_default().join("request"))
            .map_err(|e| e.to_string())?;
        let mut dbs = settings.dbs;
        if !settings.dirs.is_empty() || dbs.len() != 1 {
            return Err("give one database's path (dir: entries are for the config file)".into());
        }
        Ok(dbs.remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_tokens() {
        assert_eq!(percent_decode("%2Fdata%2Fapp.db"), "/data/app.db");
        assert_eq!(percent_decode("a+b%zz"), "a b%zz");
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secre"));
    }

    #[test]
    fn register_requests_are_validated_like_the_config() {
        let r: RegisterRequest = serde_json::from_str(
            r#"{"path": "/data/app.db", "replicas": ["file:///backups/app"]}"#,
        )
        .unwrap();
        let db = r.settings().unwrap();
        assert_eq!(db.path, PathBuf::from("/data/app.db"));
        assert_eq!(db.replicas.len(), 1);
        let r: RegisterRequest =
            serde_json::from_str(r#"{"path": "/data/app.db", "replicas": []}"#).unwrap();
        assert!(r.settings().unwrap_err().contains("no replica"));
        let r: RegisterRequest = serde_json::from_str(
            r#"{"path": "/data/app.db", "replicas": ["file:///b"], "bogus": 1}"#,
        )
        .unwrap();
        assert!(r.settings().unwrap_err().contains("bogus"));
    }
}

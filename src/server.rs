//! The HTTP endpoint for operators (`addr:` in the config).
//!
//! `/metrics` for Prometheus, `/healthz` for liveness (the process answers),
//! `/readyz` for readiness (every replica has shipped everything committed as
//! of its last sync, within its allowed lag). HTTP/1.1 only: scrapers and
//! kubelet probes need nothing more. With a `control-token:`, the control
//! API (`control`) is served here too, behind Bearer auth.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Accepts `:9090` (all interfaces), `host:port` and `[v6]:port`.
pub fn parse_addr(addr: &str) -> Result<SocketAddr> {
    let full = if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_string()
    };
    full.parse()
        .map_err(|e| Error::Invalid(format!("addr {addr:?} is not host:port: {e}")))
}

/// Binds `addr` and serves until the runtime shuts down. Returns the bound
/// address (useful with port 0).
pub async fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
    control: Option<Arc<crate::control::Api>>,
) -> Result<SocketAddr> {
    let control = control.filter(|c| c.on_tcp());
    let sock = parse_addr(addr)?;
    let listener = TcpListener::bind(sock)
        .await
        .map_err(|e| Error::Invalid(format!("addr {addr}: cannot listen: {e}")))?;
    let bound = listener.local_addr().unwrap_or(sock);
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            let control = control.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let metrics = metrics.clone();
                    let control = control.clone();
                    async move {
                        let wants_json = req
                            .headers()
                            .get(hyper::header::ACCEPT)
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.contains("application/json"));
                        let controlled =
                            matches!(req.uri().path(), "/sync" | "/position" | "/databases")
                                || (req.uri().path() == "/status" && wants_json);
                        Ok::<_, Infallible>(match control {
                            Some(c) if controlled => c.respond(req, false).await,
                            _ => respond(&metrics, &req),
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "use GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/status" => text(StatusCode::OK, PLAIN, metrics.status_text()),
        "/readyz" => match metrics.readiness() {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(faults) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready\n{}\n", faults.join("\n")),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_addr(":9090").unwrap(),
            "0.0.0.0:9090".parse().unwrap()
        );
        assert_eq!(
            parse_addr("127.0.0.1:80").unwrap(),
            "127.0.0.1:80".parse().unwrap()
        );
        assert!(parse_addr("localhost").is_err());
    }
}

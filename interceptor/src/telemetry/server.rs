//! The node's HTTP listener (`observability.listen`, default `127.0.0.1:15020`): `/metrics`,
//! `/healthz`, `/readyz`, `/debug/flows`, `/debug/config`. GET only, small answers, bounded
//! connections and header time, because anything on the node that reaches the address can
//! call it. It listens in the agent's own (the node's) network namespace; a pod's loopback is
//! the pod's, so pods do not reach it at `127.0.0.1`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{error, info, warn};

use super::Telemetry;
use crate::health::Readiness;

/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 32;
/// A client must send its request head within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` once it is free (retrying every second while it is in use) and serves.
pub async fn serve_when_free(
    addr: SocketAddr,
    telemetry: Arc<Telemetry>,
    readiness: Arc<Readiness>,
) {
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                info!(%addr, "metrics, health and debug on http://{addr}");
                return serve(listener, telemetry, readiness).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                error!(%addr, "observability.listen: {e}; no metrics or probes");
                return;
            }
        }
    }
}

/// Serves until the runtime stops or the agent retires: a successor started with
/// `--takeover` waits for this address (see [`serve_when_free`]), so a retired agent closes it
/// instead of holding it for its whole drain.
pub async fn serve(listener: TcpListener, telemetry: Arc<Telemetry>, readiness: Arc<Readiness>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let signal = Arc::clone(&readiness);
    let retired = signal.retired();
    tokio::pin!(retired);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut retired => {
                info!("retired: metrics and probes are the successor's now");
                return;
            }
            accepted = async {
                let permit = Arc::clone(&slots).acquire_owned().await.ok()?;
                Some((permit, listener.accept().await))
            } => accepted,
        };
        let Some((permit, accepted)) = accepted else {
            return;
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "observability listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let telemetry = Arc::clone(&telemetry);
        let readiness = Arc::clone(&readiness);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let answer = route(&req, &telemetry, &readiness);
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers one request.
pub fn route<B>(
    req: &Request<B>,
    telemetry: &Telemetry,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let query = req.uri().query().unwrap_or("");
    match req.uri().path() {
        "/metrics" => {
            // Prometheus asks for OpenMetrics first; promtool and curl get the classic text.
            let openmetrics = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            match telemetry.encode(openmetrics) {
                Ok(text) if openmetrics => reply(StatusCode::OK, OPENMETRICS, text),
                Ok(text) => reply(
                    StatusCode::OK,
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    text,
                ),
                Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, "encoding failed\n"),
            }
        }
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" => {
            let missing = readiness.missing();
            if missing.is_empty() {
                reply(StatusCode::OK, TEXT, "ready\n")
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready: {}\n", missing.join(", ")),
                )
            }
        }
        "/debug/flows" => match telemetry.observed() {
            Some(agent) => {
                let all = query
                    .split('&')
                    .any(|kv| kv == "all" || kv == "all=1" || kv == "all=true");
                reply(StatusCode::OK, JSON, pretty(&agent.flows(all)))
            }
            None => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "starting\n"),
        },
        "/debug/config" => match telemetry.observed() {
            Some(agent) => reply(StatusCode::OK, JSON, pretty(&agent.config())),
            None => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "starting\n"),
        },
        "/" => reply(
            StatusCode::OK,
            TEXT,
            "/metrics /healthz /readyz /debug/flows[?all] /debug/config\n",
        ),
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n"),
    }
}

fn pretty(v: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".to_owned());
    s.push('\n');
    s
}

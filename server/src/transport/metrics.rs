//! The `/metrics` HTTP endpoint: serves [`Metrics::render`] in the
//! OpenMetrics text format on `metrics.listen`, behind the same tokens as the
//! gRPC API (`auth.open_metrics` opens it). Each scrape first refreshes the
//! state gauges from the components' snapshots, bounded in time, and two
//! scrapes never interleave their clear-and-set of the gauges.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::AuthLayer;
use crate::metrics::{METRICS_PATH, Metrics};

/// The content type of a rendered exposition (OpenMetrics 1.0 text).
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The longest a scrape waits for the caller's `refresh`; after it the
/// previous state values are rendered.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long open connections may finish their request at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// The pause after a failed `accept` (e.g. out of file descriptors).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a scrape needs: the metrics, the caller's refresh and a lock that
/// keeps two scrapes from interleaving their clear-and-set of the gauges.
struct Scraper<F> {
    metrics: Metrics,
    refresh: F,
    auth: AuthLayer,
    lock: Mutex<()>,
}

impl<F> fmt::Debug for Scraper<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scraper").finish_non_exhaustive()
    }
}

impl<F, Fut> Scraper<F>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    /// Refreshes the state gauges (bounded by [`REFRESH_TIMEOUT`]) and renders.
    async fn scrape(&self) -> String {
        let _guard = self.lock.lock().await;
        if tokio::time::timeout(REFRESH_TIMEOUT, (self.refresh)())
            .await
            .is_err()
        {
            tracing::warn!(
                timeout_ms = REFRESH_TIMEOUT.as_millis() as u64,
                "metrics refresh timed out; serving the previous state"
            );
        }
        self.metrics.render()
    }

    /// Answers one HTTP request.
    async fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() != METRICS_PATH {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: metrics are at /metrics\n",
            );
        }
        if let Err(status) = self.auth.check(req) {
            let (code, text) = match status.code() {
                tonic::Code::PermissionDenied => (
                    StatusCode::FORBIDDEN,
                    "forbidden: /metrics needs a read or admin token\n",
                ),
                _ => (
                    StatusCode::UNAUTHORIZED,
                    "unauthorized: send `authorization: Bearer <read token>`\n",
                ),
            };
            let mut resp = plain(code, text);
            if code == StatusCode::UNAUTHORIZED {
                resp.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            return resp;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut resp = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        let body = self.scrape().await;
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS),
        );
        resp
    }
}

/// A plain-text response with `status`.
fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled: each
/// scrape first awaits `refresh()` (which sets the state gauges from the
/// components' snapshots, at most [`REFRESH_TIMEOUT`]), then renders. Other
/// paths get 404. Returns once every open connection has finished or
/// [`SHUTDOWN_GRACE`] has passed.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    metrics: Metrics,
    refresh: F,
    auth: AuthLayer,
    shutdown: CancellationToken,
) where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let scraper = Arc::new(Scraper {
        metrics,
        refresh,
        auth,
        lock: Mutex::new(()),
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, path = METRICS_PATH, "serving metrics");
    }
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, "cannot accept a metrics connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let scraper = Arc::clone(&scraper);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let scraper = Arc::clone(&scraper);
                async move { Ok::<_, std::convert::Infallible>(scraper.respond(&req).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await {
                        Ok(result) => result,
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "metrics connection ended with an error");
            }
        });
    }
    drop(listener);
    // Connections were told to shut down gracefully; bound the wait anyway.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
    }
    tracing::info!("metrics endpoint stopped");
}

//! `/healthz`, `/readyz` and Prometheus `/metrics`, served by every binary on
//! `--metrics-listen` (axum).
//!
//! Metrics are recorded with the `metrics` facade anywhere in the process; the first call to
//! [`recorder`] installs the Prometheus recorder that `/metrics` renders.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use. `None` if another recorder
/// was installed first (then metrics go there).
pub fn recorder() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                        120.0,
                    ],
                )
                .ok()?
                .install_recorder()
                .ok()
        })
        .as_ref()
}

/// Whether the process is ready for work: the binary flips it, and any stage that cannot
/// make progress (a write that keeps failing) holds it unready with a [`Stall`].
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<ReadinessState>);

#[derive(Debug, Default)]
struct ReadinessState {
    ready: AtomicBool,
    stalled: AtomicUsize,
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.ready.store(ready, Ordering::Relaxed);
    }

    #[must_use]
    pub fn get(&self) -> bool {
        self.0.ready.load(Ordering::Relaxed) && self.0.stalled.load(Ordering::Relaxed) == 0
    }

    /// Unready until the returned guard is dropped.
    #[must_use]
    pub fn stall(&self) -> Stall {
        self.0.stalled.fetch_add(1, Ordering::Relaxed);
        Stall(Arc::clone(&self.0))
    }
}

/// A stage that cannot make progress; dropping it ends the stall.
#[derive(Debug)]
pub struct Stall(Arc<ReadinessState>);

impl Drop for Stall {
    fn drop(&mut self) {
        self.0.stalled.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints could not be served.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {listen}: {source}; pass --metrics-listen with a free port")]
pub struct ServeError {
    listen: SocketAddr,
    source: std::io::Error,
}

/// Serves the endpoints until `shutdown`. Returns the bound address (for port 0).
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(
    listen: SocketAddr,
    ready: Readiness,
    shutdown: CancellationToken,
) -> Result<SocketAddr, ServeError> {
    let failed = |source| ServeError { listen, source };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(failed)?;
    let addr = listener.local_addr().map_err(failed)?;
    recorder();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.get();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(|| async { recorder().map(PrometheusHandle::render).unwrap_or_default() }),
        );
    tracing::info!("serving /healthz, /readyz and /metrics on http://{addr}");
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!("the metrics endpoint failed: {e}");
        }
    });
    Ok(addr)
}

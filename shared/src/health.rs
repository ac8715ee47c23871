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
                .inspect(|_| describe())
        })
        .as_ref()
}

/// What this build is: `llmq_build_info{version,commit}`, always 1.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit this build was made from (`LLMQ_COMMIT` at build time), else `unknown`.
pub const COMMIT: &str = match option_env!("LLMQ_COMMIT") {
    Some(c) if !c.is_empty() => c,
    _ => "unknown",
};

/// Every metric llmq exports, described (the HELP line `/metrics` gives each), and the build
/// info set. A metric named here and never recorded by a process is not rendered by it.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "llmq_build_info",
        "The llmq build: its version and commit; always 1."
    );
    metrics::gauge!("llmq_build_info", "version" => VERSION, "commit" => COMMIT).set(1.0);
    describe_counter!(
        "llmq_tasks_total",
        "Tasks a worker ended, by queue and outcome (succeeded, failed, dead, retried, cancelled, ...)."
    );
    describe_counter!(
        "llmq_provider_calls_total",
        "Provider calls made, by provider, model and outcome (ok or the error's class)."
    );
    describe_histogram!(
        "llmq_provider_call_seconds",
        Unit::Seconds,
        "How long a provider call took, by provider and model."
    );
    describe_counter!(
        "llmq_tokens_total",
        "Tokens of provider calls, by provider and kind (input, output, cached)."
    );
    describe_counter!(
        "llmq_cost_microdollars_total",
        "What provider calls cost, in millionths of a US dollar, by provider (an integer counter: rate() of it divided by 1e6 is dollars a second)."
    );
    describe_histogram!(
        "llmq_task_wait_seconds",
        Unit::Seconds,
        "From a task's enqueue to the start of its last attempt (retries' waits included), by queue, task type and priority."
    );
    describe_histogram!(
        "llmq_task_latency_seconds",
        Unit::Seconds,
        "From a task's enqueue to its result, by queue, task type and priority."
    );
    describe_counter!(
        "llmq_takeovers_total",
        "Tasks taken over after their claim lapsed, by queue and whether the worker that held them still beat (alive) or not (silent)."
    );
    describe_counter!(
        "llmq_duplicates_total",
        "Copies of keyed tasks answered with the first's answer, by queue."
    );
    describe_counter!(
        "llmq_answer_cache_total",
        "Answer cache lookups, by queue and result (hit, miss, ...)."
    );
    describe_counter!(
        "llmq_tasks_waiting_on_outage_total",
        "Tasks put back because no provider could be called (an outage), by queue."
    );
    describe_counter!(
        "llmq_tasks_cancelled_total",
        "Tasks ended by a cancel mark, by queue."
    );
    describe_counter!(
        "llmq_ledger_rows_rejected_total",
        "Ledger rows Postgres refused (a value it cannot hold) and left out."
    );
    describe_counter!(
        "llmq_tenant_budget_thresholds_total",
        "A tenant's budget crossing 80 % or 100 % of a limit, by tenant, limit and percent."
    );
    describe_counter!(
        "llmq_tenant_limited_total",
        "Calls a tenant's limit held back, by tenant and limit."
    );
    describe_gauges();
}

/// The gauges and the front door's metrics, described (the rest of [`describe`]).
fn describe_gauges() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "llmq_quota_used_ratio",
        "The share of a provider's quota used, 0 to 1, by provider and quota."
    );
    describe_counter!(
        "llmq_scheduler_duty_runs_total",
        "Runs of the scheduler's duties, by duty and whether the run succeeded (ok)."
    );
    describe_gauge!(
        "llmq_queue_ready",
        "Tasks ready in a queue (in its stream and its room), by queue; published by the scheduler holding the lease."
    );
    describe_gauge!("llmq_queue_in_flight", "Tasks a worker holds, by queue.");
    describe_gauge!(
        "llmq_queue_delayed",
        "Tasks waiting for their run_at or a retry, by queue."
    );
    describe_gauge!("llmq_queue_dead", "Dead letters, by queue.");
    describe_gauge!(
        "llmq_queue_backlog",
        "Tasks ready and in flight (what an autoscaler reads), by queue."
    );
    describe_gauge!(
        "llmq_queue_workers",
        "Workers of a queue that beat within 15 s, by queue."
    );
    describe_gauge!(
        "llmq_scheduler_is_leader",
        "1 on the scheduler that holds the lease (and publishes the queue gauges), 0 on the others."
    );
    describe_gauge!(
        "llmq_circuit_open",
        "1 while a provider's or a model's circuit is open (every worker skips it), by provider and model."
    );
    describe_gauge!(
        "llmq_queue_ready_in_room",
        "Tasks waiting their turn in the room, by queue and priority."
    );
    describe_gauge!(
        "llmq_queue_oldest_ready_age_seconds",
        Unit::Seconds,
        "How long the oldest task ready in a queue's stream has waited (0 with none), by queue."
    );
    describe_counter!(
        "llmq_serve_requests_total",
        "Requests to llmq serve, by route and status."
    );
    describe_gauge!(
        "llmq_serve_open_requests",
        "Requests to llmq serve waiting for their task."
    );
    describe_histogram!(
        "llmq_serve_wait_seconds",
        Unit::Seconds,
        "How long a request to llmq serve waited for its task."
    );
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

//! `llmq serve`: the API every LLM client already speaks, in front of the queue. A request
//! to `POST /v1/chat/completions` (OpenAI's shape) or `POST /v1/messages` (Anthropic's)
//! becomes a task, waits in the queue like any task (a provider's limit, an outage or a
//! cool-down makes it wait, never a provider's 429 passed on), and its result comes back in
//! the shape the caller's SDK reads, streamed when it asks.
//!
//! Callers present a key (`Authorization: Bearer`, or Anthropic's `x-api-key`) that the keys
//! file holds hashed ([`keys`]); the key names the tenant. Without a keys file the server
//! binds loopback only, and says so. Every error a caller can cause comes in the provider's
//! error shape with the status its SDK maps to an exception, and nothing is enqueued.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use llmq_shared::config::Config;
use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::Client;
use tokio_util::sync::CancellationToken;

mod anthropic;
mod batches;
mod files;
pub mod keys;
mod openai;
mod stream;
mod task;
mod wait;

/// What `llmq serve` is started with.
pub struct ServeState {
    pub redis: Client,
    /// The queue requests become tasks in.
    pub queue: String,
    /// The callers' keys; `None`: no keys, loopback only, every caller without a tenant.
    pub keys: Option<keys::KeyFile>,
    /// The provider file (read without its secrets): the models `GET /v1/models` lists and
    /// a request may name.
    pub config: Option<Config>,
    /// How long a request waits for its task when the caller does not say.
    pub wait: Duration,
    /// Postgres, where files and batches are kept; `None`: the Files and Batch APIs answer
    /// 404, saying so.
    pub database: Option<sqlx::PgPool>,
    /// How long a batch's lease holds without being kept: a replica that died gives its
    /// batches up to another after this ([`BATCH_LEASE`]).
    pub batch_lease: Duration,
}

pub use batches::LEASE as BATCH_LEASE;

/// The server's state, shared by every request.
struct App {
    serve: ServeState,
    keys: QueueKeys,
    /// Cancelled when the server stops: open waits end (their tasks go on), so a stop is
    /// not held by a request that would wait minutes.
    stop: CancellationToken,
    waiter: Arc<wait::Waiter>,
    files: Option<files::Files>,
    /// Woken when a batch is made or cancelled: the driver takes it up at once.
    batches: tokio::sync::Notify,
}

type AppState = axum::extract::State<Arc<App>>;

/// The largest request body read; an envelope over the worker's limit is refused after.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Serves on `listener` until `shutdown`.
///
/// # Errors
/// The listener fails, or a non-loopback address without keys.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ServeState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if state.keys.is_none() && !listener.local_addr()?.ip().is_loopback() {
        return Err(std::io::Error::other(
            "without --keys llmq serve answers anyone who reaches it, so it listens on \
             loopback only; give --keys (made with `llmq keys create`) to listen on another \
             address",
        ));
    }
    // Installed before the first request records anything.
    let _ = llmq_shared::health::recorder();
    let keys = QueueKeys::new(&state.queue);
    state
        .redis
        .ensure_group(&keys)
        .await
        .map_err(|e| std::io::Error::other(format!("cannot reach Redis: {e}")))?;
    let waiter = wait::Waiter::start(state.redis.clone(), keys.clone(), shutdown.clone());
    let files = state.database.clone().map(|pool| files::Files { pool });
    let app = Arc::new(App {
        serve: state,
        keys,
        stop: shutdown.clone(),
        waiter,
        files,
        batches: tokio::sync::Notify::new(),
    });
    let driver = tokio::spawn(batches::drive(Arc::clone(&app)));
    let served = axum::serve(listener, router(app))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    // The batches give their leases back: another replica takes them up at once.
    let _ = driver.await;
    served
}

/// Binds `listen` and serves until SIGTERM or ctrl-c.
///
/// # Errors
/// The address cannot be bound, or the server fails.
pub async fn run(state: ServeState, listen: SocketAddr) -> crate::Result<u8> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| crate::Error::Usage(format!("cannot listen on {listen}: {e}")))?;
    let mode = if state.keys.is_some() {
        "callers present a key of --keys"
    } else {
        "no --keys: loopback only, callers need no key"
    };
    eprintln!(
        "llmq serve: OpenAI and Anthropic APIs on http://{listen}/v1 for queue {} ({mode})",
        state.queue
    );
    serve(listener, state, llmq_shared::shutdown::on_signal())
        .await
        .map_err(|e| crate::Error::Usage(format!("llmq serve failed: {e}")))?;
    Ok(crate::EXIT_OK)
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/models", get(models))
        .route(
            "/v1/files",
            post(files::upload)
                .layer(axum::extract::DefaultBodyLimit::max(files::MAX_FILE))
                .get(files::list),
        )
        .route("/v1/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{id}", get(batches::retrieve))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route(
            "/v1/messages/batches",
            post(batches::create_messages).get(batches::list),
        )
        .route("/v1/messages/batches/{id}", get(batches::retrieve))
        .route("/v1/messages/batches/{id}/cancel", post(batches::cancel))
        .route("/v1/messages/batches/{id}/results", get(batches::results))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(task::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

/// `GET /metrics`: requests by route and status (`llmq_serve_requests_total`), requests
/// waiting for their task (`llmq_serve_open_requests`), and how long they waited
/// (`llmq_serve_wait_seconds`), with the process's other metrics.
async fn metrics() -> String {
    llmq_shared::health::recorder().map_or_else(String::new, |h| h.render())
}

/// `GET /v1/models`: the models of the provider file and the routing name, in Anthropic's
/// shape when the caller sends `anthropic-version` (its SDK does), else OpenAI's.
async fn models(
    axum::extract::State(app): AppState,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    let dialect = if headers.contains_key("anthropic-version") {
        task::Dialect::Anthropic
    } else {
        task::Dialect::OpenAi
    };
    if let Err(e) = task::caller(&app, &headers) {
        return e.into_response(dialect);
    }
    let mut ids: Vec<(String, String)> = vec![(task::AUTO.to_owned(), "llmq".to_owned())];
    for p in app.serve.config.iter().flat_map(|c| &c.providers) {
        for m in &p.models {
            ids.push((m.id.to_string(), p.name.to_string()));
            ids.push((format!("{}/{}", p.name, m.id), p.name.to_string()));
        }
    }
    let body = match dialect {
        task::Dialect::OpenAi => serde_json::json!({
            "object": "list",
            "data": ids.iter().map(|(id, by)| serde_json::json!({
                "id": id, "object": "model", "created": 0, "owned_by": by,
            })).collect::<Vec<_>>(),
        }),
        task::Dialect::Anthropic => serde_json::json!({
            "data": ids.iter().map(|(id, _)| serde_json::json!({
                "type": "model", "id": id, "display_name": id,
                "created_at": "1970-01-01T00:00:00Z",
            })).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": ids.first().map(|i| i.0.clone()),
            "last_id": ids.last().map(|i| i.0.clone()),
        }),
    };
    axum::Json(body).into_response()
}

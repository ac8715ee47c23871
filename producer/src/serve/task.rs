//! What both APIs share: who calls ([`caller`]), a request made a task ([`Ask`]), waiting
//! for it, and errors in each provider's shape ([`ApiError`]).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use llmq_shared::envelope::{Envelope, TaskType};
use llmq_shared::ids::TaskId;
use llmq_shared::outcome::{ErrorClass, Status, TaskRecord};
use serde_json::{Map, Value, json};

use super::App;
use super::keys::Key;
use super::stream::Piece;
use crate::batch_file::BatchTask;
use axum::response::sse::Event;
use tokio::sync::mpsc::{Receiver, Sender};

/// The model name that leaves the choice to routing (by task type and learned stats).
pub const AUTO: &str = "llmq/auto";

/// Which provider's API a request came in by: its errors and answers take that shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

/// An error a caller sees, in its API's shape, with the status its SDK maps to an
/// exception class.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `code` (`invalid_api_key`, `model_not_found`, ...).
    pub code: Option<&'static str>,
    /// The request field at fault (OpenAI's `param`).
    pub param: Option<String>,
    pub message: String,
    /// The task this concerns, when one was enqueued.
    pub task_id: Option<TaskId>,
    /// Whether the caller's SDK may send the request again on its own: not when a task ran
    /// or waits (another request would be another task), unless an `Idempotency-Key` makes
    /// the retry the same task.
    pub retry: bool,
    /// Seconds the caller should wait before sending it again (`retry-after`).
    pub retry_after: Option<i64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code: None,
            param: None,
            message: message.into(),
            task_id: None,
            retry: false,
            retry_after: None,
        }
    }

    pub fn bad(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            param: param.map(Into::into),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The error's body in `dialect`'s shape, as a response carries it and as a stream's
    /// error event does.
    pub fn body(&self, dialect: Dialect) -> Value {
        let s = self.status.as_u16();
        match dialect {
            Dialect::OpenAi => {
                let kind = match s {
                    400 | 404 | 413 | 422 => "invalid_request_error",
                    401 => "authentication_error",
                    403 => "permission_error",
                    429 => "rate_limit_error",
                    504 => "timeout",
                    _ => "server_error",
                };
                json!({"error": {"message": self.message, "type": kind, "param": self.param,
                    "code": self.code}})
            }
            Dialect::Anthropic => {
                let kind = match s {
                    400 | 422 => "invalid_request_error",
                    401 => "authentication_error",
                    403 => "permission_error",
                    404 => "not_found_error",
                    413 => "request_too_large",
                    429 => "rate_limit_error",
                    503 | 529 => "overloaded_error",
                    504 => "timeout_error",
                    _ => "api_error",
                };
                json!({"type": "error", "error": {"type": kind, "message": self.message}})
            }
        }
    }

    pub fn into_response(self, dialect: Dialect) -> Response {
        let body = self.body(dialect);
        let mut r = (self.status, axum::Json(body)).into_response();
        let h = r.headers_mut();
        h.insert(
            "x-should-retry",
            HeaderValue::from_static(if self.retry { "true" } else { "false" }),
        );
        if let Some(id) = self
            .task_id
            .and_then(|i| HeaderValue::from_str(&i.to_string()).ok())
        {
            h.insert("llmq-task-id", id);
        }
        if let Some(s) = self.retry_after {
            h.insert(axum::http::header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Any other path: 404 in OpenAI's shape (the more common client).
pub async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "llmq serve has no route {}; it answers POST /v1/chat/completions, POST \
             /v1/messages and GET /v1/models",
            llmq_shared::text::excerpt(uri.path(), 80)
        ),
    )
    .into_response(Dialect::OpenAi)
}

/// The caller's key, from `Authorization: Bearer` or `x-api-key`; `None` without a keys
/// file (loopback only).
///
/// # Errors
/// 401 for a missing or unknown key.
pub fn caller(app: &App, headers: &HeaderMap) -> Result<Option<Key>, ApiError> {
    let Some(keys) = &app.serve.keys else {
        return Ok(None);
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    let unknown = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided; give a key made by `llmq keys create` as \
             `Authorization: Bearer <key>` or `x-api-key`",
        )
        .code("invalid_api_key")
    };
    let given = given
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(unknown)?;
    keys.find(given).map(Some).ok_or_else(unknown)
}

/// Counts a request that makes work (a task, a file, a batch) against `key`'s own limit
/// (`requests_per_minute`, each clock minute, shared by every replica through Redis).
///
/// # Errors
/// 429 with `retry-after` (the seconds to the next minute) past the limit: the one 429 the
/// server gives, which the caller's SDK waits out and sends again; 503 when Redis fails.
pub async fn admit(app: &App, key: Option<&Key>) -> Result<(), ApiError> {
    let Some((key, limit)) = key.and_then(|k| Some((k, k.requests_per_minute?))) else {
        return Ok(());
    };
    let now = chrono::Utc::now().timestamp();
    let counter = app.keys.kept(&format!("serve-rpm:{}:{}", key.id, now / 60));
    let n = app
        .serve
        .redis
        .tally(&counter, Duration::from_secs(120))
        .await
        .map_err(|e| queue_down(&e))?;
    if n <= u64::from(limit) {
        return Ok(());
    }
    let wait = 60 - now % 60;
    Err(ApiError {
        retry: true,
        retry_after: Some(wait),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("This key may make {limit} requests a minute; try again in {wait} s"),
        )
        .code("rate_limit_exceeded")
    })
}

/// A request made a task: its envelope, and what the response needs of the request.
pub struct Ask {
    pub env: Envelope,
    /// The model the caller named, for a stream's first chunks (the record names the one
    /// that answered).
    pub model: String,
    /// `Idempotency-Key` was given: a retry of the request is the same task.
    pub keyed: bool,
}

/// The task for `t`, a request read by the batch reader, with the caller's key and headers:
/// its model (a pin, `provider/model`, or [`AUTO`]), the tenant of the key, the priority and
/// task type of `llmq-priority` and `llmq-task-type`, `Idempotency-Key`; refused here, in the
/// worker's words, if a worker would refuse it.
///
/// # Errors
/// The request names a model or priority the key may not use, or a worker would refuse it.
pub fn ask(app: &App, key: Option<&Key>, h: &HeaderMap, t: BatchTask) -> Result<Ask, ApiError> {
    let model = t.model.clone().unwrap_or_default();
    if model.is_empty() {
        return Err(ApiError::bad(
            Some("model"),
            format!(
                "`model` is required: a model of the provider file, `provider/model`, or {AUTO}"
            ),
        ));
    }
    let mut env = Envelope::new(t.prompt);
    if model != AUTO {
        let (provider, id) = match model.split_once('/') {
            Some((p, m)) => (Some(p), m),
            None => (None, model.as_str()),
        };
        if let Some(config) = &app.serve.config {
            let served = config.providers.iter().any(|p| {
                provider.is_none_or(|n| *p.name == *n) && p.models.iter().any(|m| *m.id == *id)
            });
            if !served {
                return Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    ..ApiError::bad(
                        Some("model"),
                        format!(
                            "The model {} is not served here; GET /v1/models lists those that are",
                            serde_json::Value::from(llmq_shared::text::excerpt(&model, 80))
                        ),
                    )
                }
                .code("model_not_found"));
            }
        }
        env.provider = provider.map(Into::into);
        env.model = Some(id.into());
    }
    if let Some(k) = key
        && !k.models.is_empty()
        && !k.models.contains(&model)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "This key may not use the model {}; it may use {}",
                serde_json::Value::from(llmq_shared::text::excerpt(&model, 80)),
                k.models.join(", ")
            ),
        ));
    }
    let header = |name: &str| -> Result<Option<&str>, ApiError> {
        h.get(name)
            .map(|v| {
                v.to_str()
                    .map_err(|_| ApiError::bad(None, format!("The header {name} is not text")))
            })
            .transpose()
    };
    let priority = match header("llmq-priority")? {
        Some(p) => Some(p.trim().parse::<i64>().map_err(|_| {
            ApiError::bad(
                None,
                "The header llmq-priority must be a whole number, 0 (most urgent) to 9",
            )
        })?),
        None => key.and_then(|k| k.highest_priority).map(i64::from),
    };
    if let (Some(p), Some(highest)) = (priority, key.and_then(|k| k.highest_priority))
        && p < i64::from(highest)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "This key may ask for priority {highest} at most (0 is the most urgent), not {p}"
            ),
        ));
    }
    if let Some(ty) = header("llmq-task-type")? {
        ty.parse::<TaskType>()
            .map_err(|e| ApiError::bad(None, format!("The header llmq-task-type: {e}")))?;
        env.task_type = Some(ty.into());
    }
    let idempotency = header("idempotency-key")?.filter(|k| !k.is_empty());
    // Workers scope the key to the task's tenant, the key's: another tenant sending the same
    // key gets its own task, never this one's answer.
    env.idempotency_key = idempotency.map(Into::into);
    env.priority = priority;
    env.tenant = key.map(|k| k.tenant.as_str().into());
    env.tags = key.map(|k| k.tags.clone()).unwrap_or_default();
    env.metadata = t.metadata.map(Box::new);
    env.system = t.system.map(Into::into);
    env.max_tokens = t.max_tokens;
    env.temperature = t.temperature;
    env.messages = t.messages;
    env.tools = t.tools;
    env.tool_choice = t.tool_choice.map(Box::new);
    env.response_format = t.response_format.map(Box::new);
    env.enqueued_at = Some(chrono::Utc::now());
    env.traceparent = trace(&env, header("traceparent")?).map(Into::into);
    Ok(Ask {
        env,
        model,
        keyed: idempotency.is_some(),
    })
}

/// Runs `ask` as a task and answers it: whole, as `whole` shapes a record, or with
/// `stream` as the server-sent `events` make of its pieces.
///
/// # Errors
/// The task cannot be enqueued, fails, or outlives the caller's wait.
pub async fn answer<F>(
    app: std::sync::Arc<App>,
    headers: &HeaderMap,
    mut ask: Ask,
    stream: bool,
    whole: fn(&str, &TaskRecord) -> Value,
    events: impl FnOnce(Receiver<Piece>, Sender<Event>, String, String) -> F,
) -> Result<Response, ApiError>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    // A task with tools is not streamed by the worker: its answer comes whole at the end.
    let live = stream && ask.env.tools.is_empty();
    if live {
        ask.env.stream = Some(true);
    }
    let id = enqueue(&app, &ask).await?;
    let wait = wait_of(&app, headers);
    if stream {
        let pieces = super::stream::follow(std::sync::Arc::clone(&app), id, wait, ask.keyed, live);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(events(pieces, tx, id.to_string(), ask.model));
        return Ok(super::stream::respond(id, rx));
    }
    let r = finished(&app, id, wait, ask.keyed).await?;
    if r.status != Status::Succeeded {
        return Err(failure(&r, ask.keyed));
    }
    let mut response = axum::Json(whole(&id.to_string(), &r)).into_response();
    describe(&mut response, &r);
    Ok(response)
}

/// The task's W3C `traceparent`: with traces exported, a span of the front door's, in the
/// caller's trace when its request carried one, so the task's spans join it; without, the
/// caller's own, passed on when well formed (a malformed one is ignored, as the W3C says).
fn trace(env: &Envelope, given: Option<&str>) -> Option<String> {
    let given = given.map(str::trim).filter(|t| well_formed_traceparent(t));
    let span = tracing::trace_span!(
        target: llmq_shared::telemetry::TARGET,
        "llmq.serve",
        llmq.task.id = env.id.map(tracing::field::display),
    );
    if let Some(t) = given {
        llmq_shared::telemetry::join_trace(&span, t);
    }
    llmq_shared::telemetry::traceparent(&span).or_else(|| given.map(Into::into))
}

/// `00-<32 hex>-<16 hex>-<2 hex>`, neither id all zeros.
fn well_formed_traceparent(t: &str) -> bool {
    let parts: Vec<&str> = t.split('-').collect();
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
}

/// Checks `ask`'s envelope as a worker would, and enqueues it.
///
/// # Errors
/// 400 naming the field a worker would refuse, 413 for a task over the worker's size
/// limit, 503 when Redis cannot take it.
pub async fn enqueue(app: &App, ask: &Ask) -> Result<TaskId, ApiError> {
    check(&ask.env)?;
    app.serve
        .redis
        .enqueue(&app.keys, &ask.env)
        .await
        .map_err(|e| queue_down(&e))?;
    // `ask` named it (`Envelope::new` gives every task its id).
    ask.env
        .id
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the task has no id"))
}

/// 503: Redis cannot take the request now.
fn queue_down(e: &dyn std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("The queue cannot take the request now ({e}); try again"),
    )
}

/// Checks `env` as a worker would.
///
/// # Errors
/// 400 naming the field a worker would refuse, 413 for a task over the worker's size limit.
pub fn check(env: &Envelope) -> Result<(), ApiError> {
    let max = llmq_shared::envelope::DEFAULT_MAX_PAYLOAD_BYTES;
    let raw = serde_json::to_vec(env).unwrap_or_default();
    match Envelope::parse(&raw, max) {
        Ok(_) => {}
        Err(llmq_shared::envelope::Error::TooLarge { size, limit }) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "The request makes a task of {size} bytes; a task may be {limit} bytes at most"
                ),
            ));
        }
        Err(e) => return Err(ApiError::bad(None, e.to_string())),
    }
    Ok(())
}

/// How long the caller lets a request wait: `llmq-timeout` (seconds), else what its SDK says
/// it waits (`x-stainless-timeout`), else the server's `--wait`.
pub fn wait_of(app: &App, h: &HeaderMap) -> Duration {
    ["llmq-timeout", "x-stainless-timeout"]
        .iter()
        .find_map(|n| h.get(*n)?.to_str().ok()?.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(app.serve.wait, |s| Duration::from_secs_f64(s.min(86_400.0)))
}

/// Waits for task `id`'s final record until `wait` passes.
///
/// # Errors
/// 504 when the task is not done by then (it goes on; `llmq result <id>` shows it), 503
/// when Redis fails.
pub async fn finished(
    app: &App,
    id: TaskId,
    wait: Duration,
    keyed: bool,
) -> Result<TaskRecord, ApiError> {
    let done = app.waiter.wait(id);
    let _open = OpenWait::new();
    // Dropped here only when the caller leaves: then its task is taken back.
    let left = Abandon::new(app, id, keyed);
    let started = std::time::Instant::now();
    tokio::select! {
        r = done => {
            left.keep();
            metrics::histogram!("llmq_serve_wait_seconds").record(started.elapsed().as_secs_f64());
            return r.map_err(|_| stopping(id, keyed));
        }
        () = tokio::time::sleep(wait) => left.keep(),
        () = app.stop.cancelled() => {
            left.keep();
            return Err(stopping(id, keyed));
        }
    }
    Err(ApiError {
        task_id: Some(id),
        retry: keyed,
        ..ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "The task {id} had not finished after {} s in the queue; it goes on \
                 (`llmq result {id}` shows it), and a retry with the same Idempotency-Key \
                 waits for the same task",
                wait.as_secs()
            ),
        )
    })
}

/// The answer of `route`, an error in `dialect`'s shape, counted by its status
/// (`llmq_serve_requests_total`).
pub fn respond(
    route: &'static str,
    dialect: Dialect,
    answer: Result<Response, ApiError>,
) -> Response {
    let r = answer.unwrap_or_else(|e| e.into_response(dialect));
    metrics::counter!("llmq_serve_requests_total", "route" => route,
        "status" => r.status().as_u16().to_string())
    .increment(1);
    r
}

/// Takes a request's task back when its caller leaves before the answer: a `queued:` cancel
/// mark, by which a worker that meets the task before it started ends it (one already
/// running finishes, its answer kept). Not a keyed request's: its caller's retry waits for
/// the same task.
struct Abandon {
    redis: llmq_shared::queue::Client,
    keys: llmq_shared::keys::QueueKeys,
    id: Option<TaskId>,
}

impl Abandon {
    fn new(app: &App, id: TaskId, keyed: bool) -> Self {
        Self {
            redis: app.serve.redis.clone(),
            keys: app.keys.clone(),
            id: (!keyed).then_some(id),
        }
    }

    /// The wait ended with the caller there: its task goes on.
    fn keep(mut self) {
        self.id = None;
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        let (Some(id), Ok(rt)) = (self.id.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let (redis, keys) = (self.redis.clone(), self.keys.clone());
        rt.spawn(async move {
            let target = [llmq_shared::queue::Target::Queued(id)];
            match redis.cancel(&keys, &target).await {
                Ok(_) => tracing::debug!(task = %id, "the caller left; its task is taken back unless it started"),
                Err(e) => tracing::warn!(task = %id, "the caller left, but its task could not be taken back: {e}"),
            }
        });
    }
}

/// A request waiting for its task, counted in `llmq_serve_open_requests` while it lives.
struct OpenWait;

impl OpenWait {
    fn new() -> Self {
        metrics::gauge!("llmq_serve_open_requests").increment(1.0);
        Self
    }
}

impl Drop for OpenWait {
    fn drop(&mut self) {
        metrics::gauge!("llmq_serve_open_requests").decrement(1.0);
    }
}

/// The answer to a request open when the server stops: its task goes on.
pub fn stopping(id: TaskId, keyed: bool) -> ApiError {
    ApiError {
        task_id: Some(id.to_owned()),
        retry: keyed,
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "This llmq serve is stopping; the task {id} goes on in the queue \
                 (`llmq result {id}` shows it), and a retry with the same Idempotency-Key \
                 waits for it"
            ),
        )
    }
}

/// A record that did not succeed, as the error a provider would give for it.
pub fn failure(r: &TaskRecord, keyed: bool) -> ApiError {
    let message = r.error.clone().unwrap_or_else(|| match r.status {
        Status::Cancelled => "The task was cancelled before it ran".to_owned(),
        _ => "The task failed".to_owned(),
    });
    let (status, code) = match r.error_class {
        Some(ErrorClass::Fatal | ErrorClass::Invalid) => (StatusCode::BAD_REQUEST, None),
        // 429 is a caller's own limit, which its SDK waits out and sends again; a provider's
        // limit or budget that ended the task is the fleet's.
        Some(ErrorClass::RateLimited) => {
            (StatusCode::SERVICE_UNAVAILABLE, Some("rate_limit_exceeded"))
        }
        Some(ErrorClass::QuotaExhausted) => {
            (StatusCode::SERVICE_UNAVAILABLE, Some("insufficient_quota"))
        }
        Some(ErrorClass::Unavailable) => (StatusCode::SERVICE_UNAVAILABLE, None),
        _ => (StatusCode::BAD_GATEWAY, None),
    };
    ApiError {
        code,
        task_id: Some(r.task_id),
        retry: keyed,
        ..ApiError::new(status, message)
    }
}

/// The headers every answer carries: the task, its cost, who answered.
pub fn describe(response: &mut Response, r: &TaskRecord) {
    let h = response.headers_mut();
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    set("llmq-task-id", r.task_id.to_string());
    set("x-request-id", r.task_id.to_string());
    set("request-id", r.task_id.to_string());
    set("llmq-cost-usd", format!("{:.6}", r.cost_usd));
    if let Some(p) = &r.provider {
        set("llmq-provider", p.clone());
    }
    if let Some(m) = &r.model {
        set("llmq-model", m.clone());
    }
}

/// The request's JSON object.
///
/// # Errors
/// 413 for a body over the limit, 400 for one that is not a JSON object.
pub fn body(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|e| {
        ApiError::new(
            e.status(),
            format!("Cannot read the request body: {}", e.body_text()),
        )
    })?;
    // serde_json refuses nesting deeper than 128, so a hostile depth is a 400 like any.
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad(
            None,
            "The request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad(
            None,
            format!("The request body is not JSON ({e})"),
        )),
    }
}

/// Takes boolean field `name` out of `m` (absent or null: false).
///
/// # Errors
/// 400 when it is not a boolean.
pub fn take_bool(m: &mut Map<String, Value>, name: &str) -> Result<bool, ApiError> {
    match m.remove(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(b),
        Some(_) => Err(ApiError::bad(
            Some(name),
            format!("`{name}` must be true or false"),
        )),
    }
}

//! `llmq-mock`: a mock LLM server that speaks OpenAI's chat-completions wire format over real
//! HTTP, so the worker's real HTTP adapter can be tested without the internet.
//!
//! Routes: `POST /v1/chat/completions` (and `POST /chat/completions`), `GET /v1/models`
//! (and `GET /models`), `GET /healthz`. Every chat request needs `Authorization: Bearer <key>`;
//! any non-empty key is accepted.
//!
//! What a request does is chosen by its model name (see [`MAGIC_MODELS`]), or by a marker
//! `[[mock:<name>]]` in the last user message, which wins over the model:
//!
//! | name | behaviour |
//! |---|---|
//! | anything else (`mock-fast`, `gpt-4o-mini`, ...) | 200 after [`MockOptions::latency`] |
//! | `slow`, `slow-<ms>` | 200 after 2 s, or after `<ms>` milliseconds (plus the latency) |
//! | `timeout` | no answer for 10 minutes (ends early when the server shuts down) |
//! | `fail-500`, `fail-503`, `fail-400`, `fail-401`, `fail-404`, `fail-<status>` | that status with an OpenAI error body |
//! | `rate-limit` | 429 with `Retry-After: 1` |
//! | `rate-limit-ms` | 429 with `retry-after-ms: 200` |
//! | `rate-limit-date` | 429 with an HTTP-date `Retry-After` 2 s in the future |
//! | `flaky`, `flaky-<n>` | per conversation, the first 2 (or `n`) requests get 500, later ones 200 |
//! | `context-too-long` | 400 with code `context_length_exceeded` |
//!
//! A successful answer is deterministic: the content is `mock answer from <model>: ` followed
//! by the first 60 characters of the last user message, and the usage is computed from the
//! message lengths (see [`MockServer`]).

use std::collections::HashMap;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The model names with a special behaviour, as listed by `GET /v1/models`. `slow-<ms>`,
/// `flaky-<n>` and `fail-<status>` also work with other numbers than the ones listed.
pub const MAGIC_MODELS: &[&str] = &[
    "mock-fast",
    "mock-smart",
    "mock-reason",
    "slow",
    "slow-300",
    "timeout",
    "fail-500",
    "fail-503",
    "fail-400",
    "fail-401",
    "fail-404",
    "rate-limit",
    "rate-limit-ms",
    "rate-limit-date",
    "flaky",
    "flaky-1",
    "context-too-long",
];

/// How long `slow` waits.
const SLOW_DEFAULT: Duration = Duration::from_secs(2);
/// How long `timeout` waits.
const TIMEOUT_SLEEP: Duration = Duration::from_secs(600);
/// How many requests `flaky` fails per conversation.
const FLAKY_DEFAULT: u64 = 2;
/// Characters of the last user message echoed in the answer.
const ECHO_CHARS: usize = 60;
/// System messages at least this long report half the prompt as cached.
const CACHE_MIN_SYSTEM_CHARS: usize = 400;
/// The context size claimed by `context-too-long`.
const CONTEXT_LIMIT: u64 = 128_000;
/// Request bodies larger than this get a 413.
const BODY_LIMIT: usize = 64 << 20;

/// Options of a mock server.
#[derive(Debug, Clone, Default)]
pub struct MockOptions {
    /// Added to every successful response.
    pub latency: Duration,
}

/// What the server shares between requests.
struct Shared {
    opts: MockOptions,
    shutdown: CancellationToken,
    total: AtomicU64,
    per_model: Mutex<HashMap<String, u64>>,
    /// Requests seen per conversation hash, for `flaky`.
    flaky: Mutex<HashMap<u64, u64>>,
}

impl Shared {
    fn new(opts: MockOptions, shutdown: CancellationToken) -> Self {
        Self {
            opts,
            shutdown,
            total: AtomicU64::new(0),
            per_model: Mutex::new(HashMap::new()),
            flaky: Mutex::new(HashMap::new()),
        }
    }

    fn count(&self, model: &str) {
        let mut map = self
            .per_model
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *map.entry(model.to_owned()).or_insert(0) += 1;
    }

    fn calls(&self, model: &str) -> u64 {
        let map = self
            .per_model
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(model).copied().unwrap_or(0)
    }

    /// Counts one more request for the conversation and returns how many there have been.
    fn flaky_attempt(&self, conversation: u64) -> u64 {
        let mut map = self.flaky.lock().unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(conversation).or_insert(0);
        *n += 1;
        *n
    }

    /// Sleeps for `d`; false when the server shut down first.
    async fn sleep(&self, d: Duration) -> bool {
        if d.is_zero() {
            return !self.shutdown.is_cancelled();
        }
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            () = self.shutdown.cancelled() => false,
        }
    }
}

/// A mock server on `127.0.0.1`, serving in the background until dropped or shut down.
///
/// Successful answers have `prompt_tokens` = the sum over messages of ceil(chars/4) + 3,
/// `completion_tokens` = ceil(content chars/4) (capped by `max_tokens` /
/// `max_completion_tokens`, which truncates the content and gives `finish_reason: "length"`),
/// `cached_tokens` = prompt_tokens/2 when a system message has at least 400 characters (else 0)
/// and `reasoning_tokens` = completion_tokens/2 for models whose name contains `reason`.
pub struct MockServer {
    addr: SocketAddr,
    state: Arc<Shared>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl MockServer {
    /// Binds `127.0.0.1:0` and serves in the background until dropped or shut down.
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub async fn start(opts: MockOptions) -> io::Result<MockServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Shared::new(opts, CancellationToken::new()));
        let task = tokio::spawn(serve_shared(listener, Arc::clone(&state)));
        Ok(MockServer {
            addr,
            state,
            task: Some(task),
        })
    }

    /// The base URL, `http://127.0.0.1:PORT` (no trailing slash, no `/v1`).
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the server listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Chat-completion requests received for `model` (whatever their outcome, including 401s;
    /// requests whose body names no model are counted only in [`MockServer::total_calls`]).
    #[must_use]
    pub fn calls(&self, model: &str) -> u64 {
        self.state.calls(model)
    }

    /// All chat-completion requests received.
    #[must_use]
    pub fn total_calls(&self) -> u64 {
        self.state.total.load(Ordering::SeqCst)
    }

    /// Stops the server and waits (at most 5 s) for open connections to finish; requests
    /// still sleeping (`slow`, `timeout`) are answered with 503 at once.
    pub async fn shutdown(mut self) {
        self.state.shutdown.cancel();
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.state.shutdown.cancel();
    }
}

impl fmt::Debug for MockServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockServer")
            .field("url", &self.url())
            .field("total_calls", &self.total_calls())
            .finish_non_exhaustive()
    }
}

/// Serves on an existing listener until `shutdown` is cancelled (used by the binary).
///
/// # Errors
/// When the server fails; accept errors are retried, not returned.
pub async fn serve(
    listener: TcpListener,
    opts: MockOptions,
    shutdown: CancellationToken,
) -> io::Result<()> {
    serve_shared(listener, Arc::new(Shared::new(opts, shutdown))).await
}

async fn serve_shared(listener: TcpListener, state: Arc<Shared>) -> io::Result<()> {
    let stop = state.shutdown.clone().cancelled_owned();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(stop)
        .await
}

fn router(state: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(unknown_url)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::map_response(add_request_id))
        .with_state(state)
}

/// Every response gets a fresh `x-request-id`, as OpenAI's do.
async fn add_request_id(mut response: Response) -> Response {
    let id = uuid::Uuid::new_v4().to_string();
    if let Ok(value) = HeaderValue::from_str(&id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-request-id"), value);
    }
    response
}

async fn models() -> Json<Value> {
    let data: Vec<Value> = MAGIC_MODELS
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "llmq-mock"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn unknown_url(method: Method, uri: Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
        format!("Invalid URL ({method} {})", uri.path()),
    )
    .into_response()
}

/// An OpenAI error response: `{"error":{"message","type","param","code"}}` plus headers.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    param: Option<&'static str>,
    message: String,
    headers: Vec<(&'static str, String)>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status,
            kind,
            code,
            param: None,
            message,
            headers: Vec::new(),
        }
    }

    fn invalid(code: &'static str, param: Option<&'static str>, message: String) -> Self {
        Self {
            param,
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                code,
                message,
            )
        }
    }

    fn header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    fn server_error(status: StatusCode) -> Self {
        let (code, message) = match status.as_u16() {
            503 => (
                "service_unavailable",
                "The server is overloaded or not ready yet.".to_owned(),
            ),
            502 => ("bad_gateway", "Bad gateway.".to_owned()),
            504 => ("gateway_timeout", "Gateway timeout.".to_owned()),
            _ => (
                "server_error",
                "The server had an error while processing your request. Sorry about that!"
                    .to_owned(),
            ),
        };
        Self::new(status, "server_error", code, message)
    }

    fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "service_unavailable",
            "llmq-mock is shutting down.".to_owned(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut response = (self.status, Json(body)).into_response();
        for (name, value) in self.headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static(name), value);
            }
        }
        response
    }
}

/// Which `Retry-After` flavour a 429 carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RetryHeader {
    Seconds,
    Millis,
    Date,
}

/// What a request does, chosen by its model or a `[[mock:...]]` marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Normal,
    Slow(Duration),
    Timeout,
    Fail(StatusCode),
    RateLimit(RetryHeader),
    Flaky(u64),
    ContextTooLong,
}

/// The behaviour of a magic name; `None` for ordinary model names.
fn magic(name: &str) -> Option<Behaviour> {
    let name = name.trim();
    let behaviour = match name {
        "slow" => Behaviour::Slow(SLOW_DEFAULT),
        "timeout" => Behaviour::Timeout,
        "rate-limit" => Behaviour::RateLimit(RetryHeader::Seconds),
        "rate-limit-ms" => Behaviour::RateLimit(RetryHeader::Millis),
        "rate-limit-date" => Behaviour::RateLimit(RetryHeader::Date),
        "flaky" => Behaviour::Flaky(FLAKY_DEFAULT),
        "context-too-long" => Behaviour::ContextTooLong,
        _ => {
            if let Some(ms) = number_after(name, "slow-") {
                Behaviour::Slow(Duration::from_millis(ms))
            } else if let Some(n) = number_after(name, "flaky-") {
                Behaviour::Flaky(n)
            } else if let Some(code) = number_after(name, "fail-")
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| (400..=599).contains(c))
                .and_then(|c| StatusCode::from_u16(c).ok())
            {
                Behaviour::Fail(code)
            } else {
                return None;
            }
        }
    };
    Some(behaviour)
}

fn number_after(name: &str, prefix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The first `[[mock:<name>]]` marker with a magic name in `text`.
fn marker(text: &str) -> Option<Behaviour> {
    const OPEN: &str = "[[mock:";
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        rest = &rest[start + OPEN.len()..];
        if let Some(end) = rest.find("]]")
            && let Some(b) = magic(&rest[..end])
        {
            return Some(b);
        }
    }
    None
}

#[derive(Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Value>,
}

impl ChatMessage {
    /// The message's text: a string, or the `text` parts of a content array.
    fn text(&self) -> String {
        match &self.content {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            _ => String::new(),
        }
    }
}

/// A validated request, reduced to what the mock uses.
struct Conversation {
    model: String,
    /// (role, text) per message.
    messages: Vec<(String, String)>,
    max_tokens: Option<u64>,
}

impl Conversation {
    fn last_user(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|(role, _)| role == "user")
            .map_or("", |(_, text)| text.as_str())
    }

    fn prompt_tokens(&self) -> u64 {
        self.messages.iter().map(|(_, text)| tokens(text) + 3).sum()
    }

    fn hash(&self) -> u64 {
        let mut h = DefaultHasher::new();
        for (_, text) in &self.messages {
            text.hash(&mut h);
        }
        h.finish()
    }
}

/// ceil(chars / 4).
fn tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

fn validate(body: &[u8]) -> Result<Conversation, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| {
        ApiError::invalid(
            "invalid_json",
            None,
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, \
             but what was sent was not valid JSON.)"
                .to_owned(),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            "invalid_type",
            None,
            "Invalid request body: expected a JSON object.".to_owned(),
        ));
    }
    let req: ChatRequest = serde_json::from_value(value).map_err(|e| {
        ApiError::invalid("invalid_type", None, format!("Invalid request body: {e}."))
    })?;
    let model = req.model.filter(|m| !m.trim().is_empty()).ok_or_else(|| {
        ApiError::invalid(
            "missing_required_parameter",
            Some("model"),
            "you must provide a model parameter".to_owned(),
        )
    })?;
    let messages = req.messages.ok_or_else(|| {
        ApiError::invalid(
            "missing_required_parameter",
            Some("messages"),
            "Missing required parameter: 'messages'.".to_owned(),
        )
    })?;
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "empty_array",
            Some("messages"),
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got \
             an empty array instead."
                .to_owned(),
        ));
    }
    if let Some(t) = req.temperature
        && !(0.0..=2.0).contains(&t)
    {
        let (code, bound) = if t < 0.0 {
            (
                "decimal_below_min_value",
                "below minimum value. Expected a value >= 0",
            )
        } else {
            (
                "decimal_above_max_value",
                "above maximum value. Expected a value <= 2",
            )
        };
        return Err(ApiError::invalid(
            code,
            Some("temperature"),
            format!("Invalid 'temperature': decimal {bound}, but got {t} instead."),
        ));
    }
    let max_tokens = match (req.max_tokens, req.max_completion_tokens) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(Conversation {
        model,
        messages: messages
            .iter()
            .map(|m| (m.role.clone(), m.text()))
            .collect(),
        max_tokens,
    })
}

/// True when `Authorization: Bearer <non-empty key>` is present.
fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            (scheme.eq_ignore_ascii_case("bearer") && !key.trim().is_empty()).then_some(())
        })
        .is_some()
}

async fn chat_completions(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    state.total.fetch_add(1, Ordering::SeqCst);
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            return ApiError::new(
                rejection.status(),
                "invalid_request_error",
                "invalid_body",
                rejection.body_text(),
            )
            .into_response();
        }
    };
    if let Ok(value) = serde_json::from_slice::<Value>(&body)
        && let Some(model) = value.get("model").and_then(Value::as_str)
    {
        state.count(model);
    }
    if !authorized(&headers) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "You didn't provide an API key. You need to provide your API key in an \
             Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                .to_owned(),
        )
        .into_response();
    }
    match validate(&body) {
        Ok(conv) => respond(&state, &conv).await,
        Err(e) => e.into_response(),
    }
}

async fn respond(state: &Shared, conv: &Conversation) -> Response {
    let behaviour = marker(conv.last_user())
        .or_else(|| magic(&conv.model))
        .unwrap_or(Behaviour::Normal);
    let extra = match behaviour {
        Behaviour::Normal => Duration::ZERO,
        Behaviour::Slow(d) => d,
        Behaviour::Timeout => TIMEOUT_SLEEP,
        Behaviour::Fail(status) => return failure(status, &conv.model).into_response(),
        Behaviour::RateLimit(kind) => return rate_limited(kind, &conv.model).into_response(),
        Behaviour::ContextTooLong => {
            return ApiError::invalid(
                "context_length_exceeded",
                Some("messages"),
                format!(
                    "This model's maximum context length is {CONTEXT_LIMIT} tokens. However, \
                     your messages resulted in {} tokens. Please reduce the length of the \
                     messages.",
                    conv.prompt_tokens().max(CONTEXT_LIMIT + 1)
                ),
            )
            .into_response();
        }
        Behaviour::Flaky(n) => {
            if state.flaky_attempt(conv.hash()) <= n {
                return ApiError::server_error(StatusCode::INTERNAL_SERVER_ERROR).into_response();
            }
            Duration::ZERO
        }
    };
    if !state.sleep(state.opts.latency + extra).await {
        return ApiError::shutting_down().into_response();
    }
    Json(completion(conv)).into_response()
}

fn failure(status: StatusCode, model: &str) -> ApiError {
    match status.as_u16() {
        400 => ApiError::invalid(
            "invalid_value",
            Some("messages"),
            "Invalid value for 'messages': the request was rejected (llmq-mock fail-400)."
                .to_owned(),
        ),
        401 => ApiError::new(
            status,
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided: sk-mock****. You can find your API key at \
             https://platform.openai.com/account/api-keys."
                .to_owned(),
        ),
        404 => ApiError::new(
            status,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{model}` does not exist or you do not have access to it."),
        ),
        500..=599 => ApiError::server_error(status),
        _ => ApiError::new(
            status,
            "invalid_request_error",
            "mock_failure",
            format!("llmq-mock answered {status} as asked."),
        ),
    }
}

fn rate_limited(kind: RetryHeader, model: &str) -> ApiError {
    let (wait, header, value) = match kind {
        RetryHeader::Seconds => ("1s", "retry-after", "1".to_owned()),
        RetryHeader::Millis => ("200ms", "retry-after-ms", "200".to_owned()),
        RetryHeader::Date => ("2s", "retry-after", http_date_in(2)),
    };
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_exceeded",
        "rate_limit_exceeded",
        format!(
            "Rate limit reached for {model} in organization org-llmq-mock on requests per min \
             (RPM): Limit 3, Used 3, Requested 1. Please try again in {wait}."
        ),
    )
    .header(header, value)
}

/// An HTTP-date (RFC 7231 IMF-fixdate) at least `secs` seconds from now.
fn http_date_in(secs: i64) -> String {
    let when = chrono::Utc::now() + chrono::Duration::seconds(secs);
    let whole = when.timestamp() + i64::from(when.timestamp_subsec_nanos() > 0);
    chrono::DateTime::from_timestamp(whole, 0)
        .map(|t| t.format("%a, %d %b %Y %H:%M:%S GMT").to_string())
        .unwrap_or_else(|| secs.to_string())
}

/// The deterministic chat.completion body for a successful request.
fn completion(conv: &Conversation) -> Value {
    let echo: String = conv.last_user().chars().take(ECHO_CHARS).collect();
    let mut content = format!("mock answer from {}: {echo}", conv.model);
    let mut completion_tokens = tokens(&content);
    let mut finish_reason = "stop";
    if let Some(max) = conv.max_tokens
        && max < completion_tokens
    {
        let keep = usize::try_from(max.saturating_mul(4)).unwrap_or(usize::MAX);
        content = content.chars().take(keep).collect();
        completion_tokens = max;
        finish_reason = "length";
    }
    let prompt_tokens = conv.prompt_tokens();
    let long_system = conv.messages.iter().any(|(role, text)| {
        (role == "system" || role == "developer") && text.chars().count() >= CACHE_MIN_SYSTEM_CHARS
    });
    let cached_tokens = if long_system { prompt_tokens / 2 } else { 0 };
    let reasoning_tokens = if conv.model.contains("reason") {
        completion_tokens / 2
    } else {
        0
    };
    json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": conv.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        },
        "system_fingerprint": "fp_llmq_mock",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const KEY: &str = "Bearer sk-test";

    #[derive(Debug)]
    struct HttpResponse {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl HttpResponse {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn json(&self) -> Value {
            serde_json::from_str(&self.body)
                .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
        }
    }

    /// One raw HTTP/1.1 request with `Connection: close`.
    async fn http(
        server: &MockServer,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<&str>,
    ) -> HttpResponse {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            server.addr()
        );
        if let Some(auth) = auth {
            req.push_str(&format!("Authorization: {auth}\r\n"));
        }
        let body = body.unwrap_or("");
        if method == "POST" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
        let body = if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        };
        HttpResponse {
            status,
            headers,
            body,
        }
    }

    fn dechunk(mut body: &str) -> String {
        let mut out = String::new();
        loop {
            let (size, rest) = body.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                return out;
            }
            out.push_str(&rest[..size]);
            body = &rest[size + 2..];
        }
    }

    async fn chat(server: &MockServer, body: &Value) -> HttpResponse {
        http(
            server,
            "POST",
            "/v1/chat/completions",
            Some(KEY),
            Some(&body.to_string()),
        )
        .await
    }

    fn ask(model: &str, prompt: &str) -> Value {
        json!({"model": model, "messages": [{"role": "user", "content": prompt}]})
    }

    async fn server() -> MockServer {
        MockServer::start(MockOptions::default()).await.unwrap()
    }

    fn assert_error(resp: &HttpResponse, status: u16, kind: &str, code: &str) {
        assert_eq!(resp.status, status, "{}", resp.body);
        let v = resp.json();
        let e = &v["error"];
        assert_eq!(e["type"], kind, "{v}");
        assert_eq!(e["code"], code, "{v}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e.get("param").is_some(), "param must be present: {v}");
        assert_eq!(e.as_object().unwrap().len(), 4, "{v}");
    }

    #[tokio::test]
    async fn success_has_openai_shape_and_deterministic_usage() {
        let s = server().await;
        let system = "You are terse."; // 14 chars -> 4 tokens
        let prompt = "Summarise the following text in one sentence, please, thanks!!! extra"; // 69
        let resp = chat(
            &s,
            &json!({
                "model": "mock-fast",
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": prompt},
                ],
                "temperature": 0.2,
            }),
        )
        .await;
        assert_eq!(resp.status, 200, "{}", resp.body);
        let rid = resp.header("x-request-id").unwrap();
        uuid::Uuid::parse_str(rid).unwrap();
        let v = resp.json();
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "mock-fast");
        assert!(v["created"].as_i64().unwrap() > 1_600_000_000);
        let choice = &v["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["message"]["role"], "assistant");
        let expected: String = format!(
            "mock answer from mock-fast: {}",
            prompt.chars().take(60).collect::<String>()
        );
        assert_eq!(choice["message"]["content"], expected.as_str());
        assert_eq!(choice["finish_reason"], "stop");
        let u = &v["usage"];
        let prompt_tokens = (4 + 3) + (69_u64.div_ceil(4) + 3);
        assert_eq!(u["prompt_tokens"], prompt_tokens);
        let completion_tokens = (expected.chars().count() as u64).div_ceil(4);
        assert_eq!(u["completion_tokens"], completion_tokens);
        assert_eq!(u["total_tokens"], prompt_tokens + completion_tokens);
        assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], 0);
        // x-request-id is fresh per response.
        let again = chat(&s, &ask("mock-fast", "hi")).await;
        assert_ne!(again.header("x-request-id").unwrap(), rid);
    }

    #[tokio::test]
    async fn max_tokens_truncates_with_finish_reason_length() {
        let s = server().await;
        for field in ["max_tokens", "max_completion_tokens"] {
            let mut body = ask(
                "mock-fast",
                "a fairly long prompt that produces many tokens",
            );
            body[field] = json!(3);
            let v = chat(&s, &body).await.json();
            assert_eq!(v["choices"][0]["finish_reason"], "length", "{field}");
            assert_eq!(
                v["choices"][0]["message"]["content"], "mock answer ",
                "{field}"
            );
            assert_eq!(v["usage"]["completion_tokens"], 3, "{field}");
        }
        // A generous limit changes nothing.
        let mut body = ask("mock-fast", "x");
        body["max_tokens"] = json!(1000);
        let v = chat(&s, &body).await.json();
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    #[tokio::test]
    async fn cached_and_reasoning_tokens() {
        let s = server().await;
        let system = "s".repeat(400);
        let v = chat(
            &s,
            &json!({"model": "mock-reason", "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": "why?"},
            ]}),
        )
        .await
        .json();
        let u = &v["usage"];
        let prompt = 100 + 3 + 1 + 3;
        assert_eq!(u["prompt_tokens"], prompt);
        assert_eq!(u["prompt_tokens_details"]["cached_tokens"], prompt / 2);
        let completion = u["completion_tokens"].as_u64().unwrap();
        assert!(completion > 1);
        assert_eq!(
            u["completion_tokens_details"]["reasoning_tokens"],
            completion / 2
        );

        // 399 characters of system prompt: nothing cached.
        let v = chat(
            &s,
            &json!({"model": "mock-fast", "messages": [
                {"role": "system", "content": "s".repeat(399)},
                {"role": "user", "content": "why?"},
            ]}),
        )
        .await
        .json();
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    }

    #[tokio::test]
    async fn content_arrays_are_read_as_text() {
        let s = server().await;
        let v = chat(
            &s,
            &json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hello "},
                {"type": "text", "text": "world"},
            ]}]}),
        )
        .await
        .json();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "mock answer from m: hello world"
        );
    }

    #[tokio::test]
    async fn fail_models_give_openai_error_bodies() {
        let s = server().await;
        let resp = chat(&s, &ask("fail-500", "hi")).await;
        assert_error(&resp, 500, "server_error", "server_error");
        assert_eq!(resp.json()["error"]["param"], Value::Null);
        assert!(resp.header("x-request-id").is_some());
        assert!(resp.header("retry-after").is_none());

        assert_error(
            &chat(&s, &ask("fail-503", "hi")).await,
            503,
            "server_error",
            "service_unavailable",
        );
        assert_error(
            &chat(&s, &ask("fail-400", "hi")).await,
            400,
            "invalid_request_error",
            "invalid_value",
        );
        assert_error(
            &chat(&s, &ask("fail-401", "hi")).await,
            401,
            "invalid_request_error",
            "invalid_api_key",
        );
        let resp = chat(&s, &ask("fail-404", "hi")).await;
        assert_error(&resp, 404, "invalid_request_error", "model_not_found");
        assert!(
            resp.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("fail-404")
        );
        assert_error(
            &chat(&s, &ask("fail-502", "hi")).await,
            502,
            "server_error",
            "bad_gateway",
        );
    }

    #[tokio::test]
    async fn context_too_long() {
        let s = server().await;
        let resp = chat(&s, &ask("context-too-long", "hi")).await;
        assert_error(
            &resp,
            400,
            "invalid_request_error",
            "context_length_exceeded",
        );
        let msg = resp.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(
            msg.starts_with("This model's maximum context length is 128000 tokens"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn rate_limits_carry_retry_after() {
        let s = server().await;
        let resp = chat(&s, &ask("rate-limit", "hi")).await;
        assert_error(&resp, 429, "rate_limit_exceeded", "rate_limit_exceeded");
        assert_eq!(resp.header("retry-after"), Some("1"));
        assert!(resp.header("retry-after-ms").is_none());

        let resp = chat(&s, &ask("rate-limit-ms", "hi")).await;
        assert_error(&resp, 429, "rate_limit_exceeded", "rate_limit_exceeded");
        assert_eq!(resp.header("retry-after-ms"), Some("200"));
        assert!(resp.header("retry-after").is_none());

        let resp = chat(&s, &ask("rate-limit-date", "hi")).await;
        assert_error(&resp, 429, "rate_limit_exceeded", "rate_limit_exceeded");
        let date = resp.header("retry-after").unwrap();
        assert!(date.ends_with(" GMT"), "{date}");
        let when = chrono::DateTime::parse_from_rfc2822(date).unwrap();
        let wait = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
        assert!(
            wait > chrono::Duration::milliseconds(1500) && wait <= chrono::Duration::seconds(3),
            "{wait}"
        );
    }

    #[tokio::test]
    async fn flaky_fails_exactly_twice_per_conversation() {
        let s = server().await;
        let statuses = |n| {
            let s = &s;
            async move {
                let mut out = Vec::new();
                for _ in 0..n {
                    out.push(chat(s, &ask("flaky", "conversation A")).await.status);
                }
                out
            }
        };
        assert_eq!(statuses(4).await, [500, 500, 200, 200]);
        // Another conversation has its own count.
        assert_eq!(chat(&s, &ask("flaky", "conversation B")).await.status, 500);
        let resp = chat(&s, &ask("flaky-1", "conversation C")).await;
        assert_error(&resp, 500, "server_error", "server_error");
        assert_eq!(
            chat(&s, &ask("flaky-1", "conversation C")).await.status,
            200
        );
        assert_eq!(
            chat(&s, &ask("flaky-0", "conversation D")).await.status,
            200
        );
    }

    #[tokio::test]
    async fn marker_in_last_user_message_wins_over_model() {
        let s = server().await;
        let resp = chat(&s, &ask("mock-fast", "task 7 [[mock:fail-500]]")).await;
        assert_error(&resp, 500, "server_error", "server_error");
        assert_eq!(chat(&s, &ask("mock-fast", "task 8")).await.status, 200);
        // An unknown marker is ignored.
        assert_eq!(
            chat(&s, &ask("mock-fast", "[[mock:nonsense]]"))
                .await
                .status,
            200
        );
        // Flaky by marker.
        let p = "[[mock:flaky-1]] hello";
        assert_eq!(chat(&s, &ask("mock-fast", p)).await.status, 500);
        assert_eq!(chat(&s, &ask("mock-fast", p)).await.status, 200);
        // Only the last user message counts.
        let body = json!({"model": "mock-fast", "messages": [
            {"role": "user", "content": "[[mock:fail-500]]"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "fine now"},
        ]});
        assert_eq!(chat(&s, &body).await.status, 200);
        // A marker overrides a failing model too.
        let resp = chat(&s, &ask("fail-500", "[[mock:rate-limit]]")).await;
        assert_eq!(resp.status, 429);
        // Slow by marker.
        let start = Instant::now();
        let resp = chat(&s, &ask("mock-fast", "[[mock:slow-200]] wait")).await;
        assert_eq!(resp.status, 200);
        assert!(start.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn slow_models_and_latency_delay_the_answer() {
        let s = server().await;
        let start = Instant::now();
        assert_eq!(chat(&s, &ask("slow-300", "hi")).await.status, 200);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");

        let s = MockServer::start(MockOptions {
            latency: Duration::from_millis(150),
        })
        .await
        .unwrap();
        let start = Instant::now();
        assert_eq!(chat(&s, &ask("mock-fast", "hi")).await.status, 200);
        assert!(start.elapsed() >= Duration::from_millis(150));
        // Errors are not delayed.
        let start = Instant::now();
        assert_eq!(chat(&s, &ask("fail-500", "hi")).await.status, 500);
        assert!(start.elapsed() < Duration::from_millis(150));
    }

    #[tokio::test]
    async fn missing_or_empty_auth_is_401() {
        let s = server().await;
        let body = ask("mock-fast", "hi").to_string();
        for auth in [None, Some("Bearer "), Some("Basic abc"), Some("sk-test")] {
            let resp = http(&s, "POST", "/v1/chat/completions", auth, Some(&body)).await;
            assert_error(&resp, 401, "invalid_request_error", "invalid_api_key");
        }
        let resp = http(
            &s,
            "POST",
            "/v1/chat/completions",
            Some("bearer k"),
            Some(&body),
        )
        .await;
        assert_eq!(resp.status, 200);
    }

    #[tokio::test]
    async fn malformed_requests_are_400() {
        let s = server().await;
        let post = |body: &'static str| {
            let s = &s;
            async move { http(s, "POST", "/v1/chat/completions", Some(KEY), Some(body)).await }
        };
        let resp = post("{not json").await;
        assert_error(&resp, 400, "invalid_request_error", "invalid_json");
        let resp = post("").await;
        assert_error(&resp, 400, "invalid_request_error", "invalid_json");
        let resp = post("[1,2]").await;
        assert_error(&resp, 400, "invalid_request_error", "invalid_type");
        let resp = post(r#"{"model":"m"}"#).await;
        assert_error(
            &resp,
            400,
            "invalid_request_error",
            "missing_required_parameter",
        );
        assert_eq!(resp.json()["error"]["param"], "messages");
        let resp = post(r#"{"messages":[{"role":"user","content":"hi"}]}"#).await;
        assert_error(
            &resp,
            400,
            "invalid_request_error",
            "missing_required_parameter",
        );
        assert_eq!(resp.json()["error"]["param"], "model");
        let resp = post(r#"{"model":"m","messages":[]}"#).await;
        assert_error(&resp, 400, "invalid_request_error", "empty_array");
        let resp = post(r#"{"model":"m","messages":"hi"}"#).await;
        assert_error(&resp, 400, "invalid_request_error", "invalid_type");
        let resp =
            post(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#)
                .await;
        assert_error(
            &resp,
            400,
            "invalid_request_error",
            "decimal_above_max_value",
        );
        // The server is still fine afterwards.
        assert_eq!(chat(&s, &ask("m", "hi")).await.status, 200);
    }

    #[tokio::test]
    async fn calls_are_counted_per_model_whatever_the_outcome() {
        let s = server().await;
        assert_eq!(s.calls("mock-fast"), 0);
        assert_eq!(s.total_calls(), 0);
        chat(&s, &ask("mock-fast", "a")).await;
        chat(&s, &ask("mock-fast", "b")).await;
        chat(&s, &ask("fail-500", "c")).await;
        chat(&s, &ask("flaky", "d")).await;
        let body = ask("mock-fast", "no key").to_string();
        http(&s, "POST", "/v1/chat/completions", None, Some(&body)).await;
        http(&s, "POST", "/v1/chat/completions", Some(KEY), Some("{oops")).await;
        // Without /v1 too.
        let resp = http(&s, "POST", "/chat/completions", Some(KEY), Some(&body)).await;
        assert_eq!(resp.status, 200);
        // Other routes are not chat calls.
        http(&s, "GET", "/v1/models", Some(KEY), None).await;
        assert_eq!(s.calls("mock-fast"), 4);
        assert_eq!(s.calls("fail-500"), 1);
        assert_eq!(s.calls("flaky"), 1);
        assert_eq!(s.calls("mock-smart"), 0);
        assert_eq!(s.total_calls(), 7);
    }

    #[tokio::test]
    async fn models_healthz_and_unknown_urls() {
        let s = server().await;
        assert!(s.url().starts_with("http://127.0.0.1:"));
        assert!(!s.url().ends_with('/'));
        let resp = http(&s, "GET", "/healthz", None, None).await;
        assert_eq!((resp.status, resp.body.as_str()), (200, "ok"));
        let v = http(&s, "GET", "/v1/models", Some(KEY), None).await.json();
        assert_eq!(v["object"], "list");
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, MAGIC_MODELS);
        assert_eq!(v["data"][0]["object"], "model");
        let resp = http(&s, "GET", "/v2/nothing", None, None).await;
        assert_error(&resp, 404, "invalid_request_error", "unknown_url");
    }

    #[tokio::test]
    async fn shutdown_ends_a_hanging_timeout_request() {
        let s = server().await;
        let addr = s.addr();
        let body = ask("timeout", "hang").to_string();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Authorization: {KEY}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(req.as_bytes()).await.unwrap();
            let mut raw = String::new();
            stream.read_to_string(&mut raw).await.unwrap();
            raw
        });
        // Wait until the request has arrived.
        let start = Instant::now();
        while s.calls("timeout") == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "request never arrived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!client.is_finished(), "timeout must not answer on its own");
        tokio::time::timeout(Duration::from_secs(3), s.shutdown())
            .await
            .unwrap();
        let raw = tokio::time::timeout(Duration::from_secs(3), client)
            .await
            .unwrap()
            .unwrap();
        assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
        // The port no longer accepts connections.
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn dropping_the_server_stops_it() {
        let s = server().await;
        let addr = s.addr();
        assert_eq!(http(&s, "GET", "/healthz", None, None).await.status, 200);
        drop(s);
        let start = Instant::now();
        while TcpStream::connect(addr).await.is_ok() {
            assert!(start.elapsed() < Duration::from_secs(5), "still listening");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn magic_names_parse() {
        assert_eq!(magic("slow"), Some(Behaviour::Slow(Duration::from_secs(2))));
        assert_eq!(
            magic("slow-300"),
            Some(Behaviour::Slow(Duration::from_millis(300)))
        );
        assert_eq!(magic("flaky-5"), Some(Behaviour::Flaky(5)));
        assert_eq!(
            magic("fail-503"),
            Some(Behaviour::Fail(StatusCode::SERVICE_UNAVAILABLE))
        );
        assert_eq!(magic("fail-200"), None);
        assert_eq!(magic("slow-x"), None);
        assert_eq!(magic("mock-fast"), None);
        assert_eq!(magic("gpt-4o-mini"), None);
        assert_eq!(
            marker("a [[mock:x]] b [[mock:timeout]]"),
            Some(Behaviour::Timeout)
        );
        assert_eq!(marker("[[mock:slow-20"), None);
    }
}

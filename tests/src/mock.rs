//! `llmq-mock`: a mock LLM server that speaks the OpenAI, Anthropic, Gemini and Ollama wire
//! formats over real HTTP, so the worker's real HTTP adapters can be tested without the
//! internet.
//!
//! Routes:
//!
//! | route | format | auth |
//! |---|---|---|
//! | `POST /v1/chat/completions`, `POST /chat/completions` | OpenAI chat completions | `Authorization: Bearer <key>` |
//! | `POST /v1/messages` | Anthropic Messages (`max_tokens` required, unknown fields rejected) | `x-api-key` and `anthropic-version` |
//! | `POST /v1beta/models/{model}:generateContent` (also `/v1/...`) | Gemini | `x-goog-api-key` or `?key=` |
//! | `POST /api/chat` | Ollama (streams NDJSON unless `"stream": false`) | none |
//! | `GET /v1/models`, `GET /models`, `GET /healthz` | | none |
//!
//! Any non-empty key is accepted; a missing one gets 401 (Gemini: 403 `PERMISSION_DENIED`) in
//! the route's error shape. Every route counts its requests in [`MockServer::calls`].
//!
//! What a request does is chosen by its model name (see [`MAGIC_MODELS`]), or by a marker
//! `[[mock:<name>]]` in the last user message, which wins over the model. Errors come in each
//! route's own shape: OpenAI `{"error":{"message","type","param","code"}}`, Anthropic
//! `{"type":"error","error":{"type","message"}}` (`error.type` follows the status:
//! `api_error`, `overloaded_error` for 529, `rate_limit_error`, ...), Google
//! `{"error":{"code","message","status"}}` (`INTERNAL`, `UNAVAILABLE`, `RESOURCE_EXHAUSTED`,
//! ...), Ollama `{"error":"..."}`.
//!
//! | name | behaviour |
//! |---|---|
//! | anything else (`mock-fast`, `gpt-4o-mini`, ...) | 200 after [`MockOptions::latency`] |
//! | `slow`, `slow-<ms>` | 200 after 2 s, or after `<ms>` milliseconds (plus the latency) |
//! | `timeout` | no answer for 10 minutes (ends early when the server shuts down) |
//! | `fail-500`, `fail-503`, `fail-529`, `fail-400`, `fail-401`, `fail-404`, `fail-<status>` | that status with the route's error body |
//! | `rate-limit` | 429 with `Retry-After: 1` (Gemini: no header, a `RetryInfo` detail `retryDelay: "1s"`) |
//! | `rate-limit-ms` | 429 with `retry-after-ms: 200` (Gemini: `retryDelay: "0.200s"`, no header) |
//! | `rate-limit-date` | 429 with an HTTP-date `Retry-After` 2 s in the future (Gemini: that header and `retryDelay: "2s"`) |
//! | `flaky`, `flaky-<n>` | per conversation, the first 2 (or `n`) requests get 500, later ones 200 |
//! | `context-too-long` | 400: OpenAI `context_length_exceeded`; Anthropic `prompt is too long: 250000 tokens > 200000 maximum`; Gemini `The input token count (N) exceeds the maximum number of tokens allowed (1048576).`; Ollama `the input length exceeds the context length` |
//! | `blocked` (Gemini only) | 200 with `promptFeedback.blockReason: "SAFETY"` and no candidates |
//! | `missing` (Ollama only) | 404 `model "missing" not found, try pulling it first` |
//!
//! A successful answer is deterministic: the content is `mock answer from <model>: ` followed
//! by the first 60 characters of the last user message, and the usage is computed from the
//! message lengths (see [`MockServer`]); every route reports the same counts in its own
//! fields.

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
use axum::extract::{DefaultBodyLimit, Path, State};
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
    "fail-529",
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
///
/// The other routes report the same numbers in their own fields: Anthropic
/// `input_tokens` = prompt − cached, `cache_read_input_tokens` = cached,
/// `cache_creation_input_tokens` = 0, `output_tokens` = completion, plus a `thinking` block
/// for `reason` models; Gemini `promptTokenCount` = prompt, `cachedContentTokenCount` =
/// cached, `thoughtsTokenCount` = reasoning and `candidatesTokenCount` = completion −
/// reasoning (zero counts left out); Ollama `prompt_eval_count` = prompt, `eval_count` =
/// completion (no cached count; `message.thinking` for `reason` models).
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
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], 0)), opts).await
    }

    /// Binds `addr` (e.g. the port of a provider that was down) and serves in the background.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start_at(addr: SocketAddr, opts: MockOptions) -> io::Result<MockServer> {
        let listener = TcpListener::bind(addr).await?;
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
        .route("/v1/messages", post(anthropic_messages))
        .route("/v1beta/models/{*rest}", post(gemini_generate))
        .route("/v1/models/{*rest}", post(gemini_generate))
        .route("/api/chat", post(ollama_chat))
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
            insert_header(&mut response, name, &value);
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

    /// True when the model is `name` or the last user message has a `[[mock:name]]` marker
    /// (for the route-specific names `blocked` and `missing`).
    fn named(&self, name: &str) -> bool {
        self.model == name || self.last_user().contains(&format!("[[mock:{name}]]"))
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
    count_body_model(&state, &body);
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

/// Counts a request under the `model` its JSON body names, if any.
fn count_body_model(state: &Shared, body: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<Value>(body)
        && let Some(model) = value.get("model").and_then(Value::as_str)
    {
        state.count(model);
    }
}

/// What a valid request gets, before it is put in a wire format.
#[derive(Debug)]
enum Outcome {
    Answer(Answer),
    /// `fail-<status>`, or a `flaky` failure (500).
    Fail(StatusCode),
    RateLimit(RetryHeader),
    ContextTooLong,
    /// The server shut down while the request was waiting.
    ShuttingDown,
}

/// Applies the request's behaviour: sleeps for the slow ones, counts the flaky ones.
async fn decide(state: &Shared, conv: &Conversation) -> Outcome {
    let behaviour = marker(conv.last_user())
        .or_else(|| magic(&conv.model))
        .unwrap_or(Behaviour::Normal);
    let extra = match behaviour {
        Behaviour::Normal => Duration::ZERO,
        Behaviour::Slow(d) => d,
        Behaviour::Timeout => TIMEOUT_SLEEP,
        Behaviour::Fail(status) => return Outcome::Fail(status),
        Behaviour::RateLimit(kind) => return Outcome::RateLimit(kind),
        Behaviour::ContextTooLong => return Outcome::ContextTooLong,
        Behaviour::Flaky(n) => {
            if state.flaky_attempt(conv.hash()) <= n {
                return Outcome::Fail(StatusCode::INTERNAL_SERVER_ERROR);
            }
            Duration::ZERO
        }
    };
    if !state.sleep(state.opts.latency + extra).await {
        return Outcome::ShuttingDown;
    }
    Outcome::Answer(Answer::new(conv))
}

async fn respond(state: &Shared, conv: &Conversation) -> Response {
    match decide(state, conv).await {
        Outcome::Answer(answer) => Json(completion(conv, &answer)).into_response(),
        Outcome::Fail(status) => failure(status, &conv.model).into_response(),
        Outcome::RateLimit(kind) => rate_limited(kind, &conv.model).into_response(),
        Outcome::ContextTooLong => ApiError::invalid(
            "context_length_exceeded",
            Some("messages"),
            format!(
                "This model's maximum context length is {CONTEXT_LIMIT} tokens. However, your \
                 messages resulted in {} tokens. Please reduce the length of the messages.",
                conv.prompt_tokens().max(CONTEXT_LIMIT + 1)
            ),
        )
        .into_response(),
        Outcome::ShuttingDown => ApiError::shutting_down().into_response(),
    }
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
    let (wait, header, value) = retry_header(kind);
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

/// The wait a 429 asks for: (as said in the message, header name, header value).
fn retry_header(kind: RetryHeader) -> (&'static str, &'static str, String) {
    match kind {
        RetryHeader::Seconds => ("1s", "retry-after", "1".to_owned()),
        RetryHeader::Millis => ("200ms", "retry-after-ms", "200".to_owned()),
        RetryHeader::Date => ("2s", "retry-after", http_date_in(2)),
    }
}

/// An HTTP-date (RFC 7231 IMF-fixdate) at least `secs` seconds from now.
fn http_date_in(secs: i64) -> String {
    let when = chrono::Utc::now() + chrono::Duration::seconds(secs);
    let whole = when.timestamp() + i64::from(when.timestamp_subsec_nanos() > 0);
    chrono::DateTime::from_timestamp(whole, 0)
        .map(|t| t.format("%a, %d %b %Y %H:%M:%S GMT").to_string())
        .unwrap_or_else(|| secs.to_string())
}

/// A successful answer, the same whatever the wire format: the content is
/// `mock answer from <model>: ` and the first 60 characters of the last user message, cut to
/// `max_tokens`; the token counts follow from the message lengths.
#[derive(Debug)]
struct Answer {
    content: String,
    /// Cut short by the output limit.
    truncated: bool,
    /// All prompt tokens, cached ones included.
    prompt_tokens: u64,
    /// All output tokens, reasoning ones included.
    completion_tokens: u64,
    cached_tokens: u64,
    reasoning_tokens: u64,
}

impl Answer {
    fn new(conv: &Conversation) -> Self {
        let echo: String = conv.last_user().chars().take(ECHO_CHARS).collect();
        let mut content = format!("mock answer from {}: {echo}", conv.model);
        let mut completion_tokens = tokens(&content);
        let mut truncated = false;
        if let Some(max) = conv.max_tokens
            && max < completion_tokens
        {
            let keep = usize::try_from(max.saturating_mul(4)).unwrap_or(usize::MAX);
            content = content.chars().take(keep).collect();
            completion_tokens = max;
            truncated = true;
        }
        let prompt_tokens = conv.prompt_tokens();
        let long_system = conv.messages.iter().any(|(role, text)| {
            (role == "system" || role == "developer")
                && text.chars().count() >= CACHE_MIN_SYSTEM_CHARS
        });
        let cached_tokens = if long_system { prompt_tokens / 2 } else { 0 };
        let reasoning_tokens = if conv.model.contains("reason") {
            completion_tokens / 2
        } else {
            0
        };
        Self {
            content,
            truncated,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            reasoning_tokens,
        }
    }
}

/// The chat.completion body for a successful request.
fn completion(conv: &Conversation, answer: &Answer) -> Value {
    let Answer {
        content,
        truncated,
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        reasoning_tokens,
    } = answer;
    let finish_reason = if *truncated { "length" } else { "stop" };
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

/// Sets a header on a response; values that are not valid header text are left out.
fn insert_header(response: &mut Response, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(name), value);
    }
}

/// The text of a message's content: a string, or the `text` of each block of an array.
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(blocks) => Some(
            blocks
                .iter()
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect(),
        ),
        _ => None,
    }
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

// ---- Anthropic: POST /v1/messages ---------------------------------------------------------

/// The context size claimed by `context-too-long` on the Anthropic route.
const ANTHROPIC_CONTEXT_LIMIT: u64 = 200_000;
/// The smallest prompt size `context-too-long` reports on the Anthropic route.
const ANTHROPIC_TOO_LONG: u64 = 250_000;
/// Top-level fields the Messages API knows; any other gets a 400, as from the real API.
const ANTHROPIC_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "stream",
    "metadata",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
    "container",
    "mcp_servers",
];

/// Anthropic's `error.type` for a status.
fn anthropic_kind(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

/// `{"type":"error","error":{"type","message"},"request_id"}` with a `request-id` header.
fn anthropic_error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let id = format!("req_mock{}", short_id());
    let body = json!({
        "type": "error",
        "error": {"type": kind, "message": message.into()},
        "request_id": id,
    });
    let mut response = (status, Json(body)).into_response();
    insert_header(&mut response, "request-id", &id);
    response
}

fn anthropic_failure(status: StatusCode, model: &str) -> Response {
    let code = status.as_u16();
    let message = match code {
        400 => "llmq-mock fail-400: the request was rejected.".to_owned(),
        401 => "invalid x-api-key".to_owned(),
        403 => "Your API key does not have permission to use the specified resource.".to_owned(),
        404 => format!("model: {model}"),
        500 => "Internal server error".to_owned(),
        529 => "Overloaded".to_owned(),
        _ => format!("llmq-mock answered {code} as asked."),
    };
    anthropic_error(status, anthropic_kind(code), message)
}

fn anthropic_rate_limited(kind: RetryHeader) -> Response {
    let (wait, header, value) = retry_header(kind);
    let mut response = anthropic_error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        format!(
            "This request would exceed the rate limit for your organization (llmq-mock) of 3 \
             requests per minute. Please try again in {wait}."
        ),
    );
    insert_header(&mut response, header, &value);
    insert_header(&mut response, "anthropic-ratelimit-requests-limit", "3");
    insert_header(&mut response, "anthropic-ratelimit-requests-remaining", "0");
    response
}

/// What is wrong with the request's credentials, if anything.
fn anthropic_auth_problem(headers: &HeaderMap) -> Option<&'static str> {
    let present = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| !v.trim().is_empty())
    };
    if !present("x-api-key") {
        Some("x-api-key header is required")
    } else if !present("anthropic-version") {
        Some("anthropic-version: header is required")
    } else {
        None
    }
}

fn validate_anthropic(body: &[u8]) -> Result<Conversation, String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("There was an error parsing the body of your request: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("Input should be a valid dictionary".to_owned());
    };
    if let Some(extra) = obj.keys().find(|k| !ANTHROPIC_FIELDS.contains(&k.as_str())) {
        return Err(format!("{extra}: Extra inputs are not permitted"));
    }
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.trim().is_empty())
        .ok_or("model: Field required")?;
    let max_tokens = match obj.get("max_tokens") {
        None | Some(Value::Null) => return Err("max_tokens: Field required".to_owned()),
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .ok_or("max_tokens: Input should be a valid integer greater than or equal to 1")?,
    };
    let list = obj
        .get("messages")
        .ok_or("messages: Field required")?
        .as_array()
        .ok_or("messages: Input should be a valid list")?;
    if list.is_empty() {
        return Err("messages: at least one message is required".to_owned());
    }
    let mut messages = Vec::with_capacity(list.len() + 1);
    if let Some(system) = obj.get("system").filter(|s| !s.is_null()) {
        let text = content_text(system)
            .ok_or("system: Input should be a valid string or a list of text blocks")?;
        messages.push(("system".to_owned(), text));
    }
    for (i, m) in list.iter().enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some(role @ ("user" | "assistant")) => role,
            _ => {
                return Err(format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant'"
                ));
            }
        };
        let text = m
            .get("content")
            .and_then(content_text)
            .ok_or_else(|| format!("messages.{i}.content: Field required"))?;
        messages.push((role.to_owned(), text));
    }
    if let Some(t) = obj.get("temperature").filter(|t| !t.is_null()) {
        let t = t
            .as_f64()
            .ok_or("temperature: Input should be a valid number")?;
        if t < 0.0 {
            return Err("temperature: Input should be greater than or equal to 0".to_owned());
        }
        if t > 1.0 {
            return Err("temperature: Input should be less than or equal to 1".to_owned());
        }
    }
    Ok(Conversation {
        model: model.to_owned(),
        messages,
        max_tokens: Some(max_tokens),
    })
}

/// The Messages API body for a successful request: Anthropic's `input_tokens` leaves out the
/// cached ones, and reasoning models answer with a thinking block before the text.
fn anthropic_message(conv: &Conversation, answer: &Answer) -> Value {
    let mut content = Vec::with_capacity(2);
    if answer.reasoning_tokens > 0 {
        content.push(json!({
            "type": "thinking",
            "thinking": "llmq-mock is thinking.",
            "signature": "llmq-mock-signature",
        }));
    }
    content.push(json!({"type": "text", "text": answer.content}));
    json!({
        "id": format!("msg_mock{}", short_id()),
        "type": "message",
        "role": "assistant",
        "model": conv.model,
        "content": content,
        "stop_reason": if answer.truncated { "max_tokens" } else { "end_turn" },
        "stop_sequence": null,
        "usage": {
            "input_tokens": answer.prompt_tokens - answer.cached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": answer.cached_tokens,
            "output_tokens": answer.completion_tokens,
            "service_tier": "standard",
        },
    })
}

async fn anthropic_messages(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    state.total.fetch_add(1, Ordering::SeqCst);
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            let status = rejection.status();
            return anthropic_error(
                status,
                anthropic_kind(status.as_u16()),
                rejection.body_text(),
            );
        }
    };
    count_body_model(&state, &body);
    if let Some(problem) = anthropic_auth_problem(&headers) {
        return anthropic_error(StatusCode::UNAUTHORIZED, "authentication_error", problem);
    }
    let conv = match validate_anthropic(&body) {
        Ok(conv) => conv,
        Err(message) => {
            return anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        }
    };
    match decide(&state, &conv).await {
        Outcome::Answer(answer) => Json(anthropic_message(&conv, &answer)).into_response(),
        Outcome::Fail(status) => anthropic_failure(status, &conv.model),
        Outcome::RateLimit(kind) => anthropic_rate_limited(kind),
        Outcome::ContextTooLong => anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!(
                "prompt is too long: {} tokens > {ANTHROPIC_CONTEXT_LIMIT} maximum",
                conv.prompt_tokens().max(ANTHROPIC_TOO_LONG)
            ),
        ),
        Outcome::ShuttingDown => anthropic_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "llmq-mock is shutting down.",
        ),
    }
}

// ---- Gemini: POST /v1beta/models/{model}:generateContent ----------------------------------

/// The context size claimed by `context-too-long` on the Gemini route.
const GEMINI_CONTEXT_LIMIT: u64 = 1_048_576;
/// Top-level fields of a `generateContent` request (proto JSON also takes them in snake_case).
const GEMINI_FIELDS: &[&str] = &[
    "contents",
    "systemInstruction",
    "generationConfig",
    "safetySettings",
    "tools",
    "toolConfig",
    "cachedContent",
    "labels",
];
/// Fields of `generationConfig`.
const GEMINI_CONFIG_FIELDS: &[&str] = &[
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "candidateCount",
    "stopSequences",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "responseModalities",
    "responseLogprobs",
    "logprobs",
    "thinkingConfig",
    "mediaResolution",
    "speechConfig",
];

/// `system_instruction` → `systemInstruction`: proto JSON accepts both spellings.
fn camel(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The object's fields under their camelCase names; the first unknown one is an error.
fn proto_fields(
    obj: serde_json::Map<String, Value>,
    known: &[&str],
    at: &str,
) -> Result<serde_json::Map<String, Value>, String> {
    let mut out = serde_json::Map::with_capacity(obj.len());
    for (key, value) in obj {
        let name = camel(&key);
        if !known.contains(&name.as_str()) {
            return Err(format!(
                "Invalid JSON payload received. Unknown name \"{key}\"{at}: Cannot find field."
            ));
        }
        out.insert(name, value);
    }
    Ok(out)
}

/// Google's canonical status for an HTTP status.
fn google_status(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        500 => "INTERNAL",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        402..=498 => "FAILED_PRECONDITION",
        _ => "UNKNOWN",
    }
}

/// `{"error":{"code","message","status","details"?}}`.
fn google_error(status: StatusCode, message: impl Into<String>, details: Vec<Value>) -> Response {
    let mut error = json!({
        "code": status.as_u16(),
        "message": message.into(),
        "status": google_status(status.as_u16()),
    });
    if !details.is_empty() {
        error["details"] = Value::Array(details);
    }
    (status, Json(json!({ "error": error }))).into_response()
}

fn gemini_failure(status: StatusCode, model: &str) -> Response {
    let code = status.as_u16();
    let message = match code {
        400 => "Request contains an invalid argument.".to_owned(),
        401 => "Request had invalid authentication credentials.".to_owned(),
        403 => "The caller does not have permission".to_owned(),
        404 => format!(
            "models/{model} is not found for API version v1beta, or is not supported for \
             generateContent. Call ListModels to see the list of available models and their \
             supported methods."
        ),
        500 => "An internal error has occurred. Please retry or report in \
                https://developers.generativeai.google/guide/troubleshooting"
            .to_owned(),
        503 => "The model is overloaded. Please try again later.".to_owned(),
        504 => "The request timed out. Please try again.".to_owned(),
        _ => format!("llmq-mock answered {code} as asked."),
    };
    google_error(status, message, Vec::new())
}

/// 429 RESOURCE_EXHAUSTED with the wait in a `RetryInfo` detail, as Gemini sends it; only
/// `rate-limit-date` also has a `Retry-After` header.
fn gemini_rate_limited(kind: RetryHeader, model: &str) -> Response {
    let (wait, header, value) = retry_header(kind);
    let delay = match kind {
        RetryHeader::Seconds => "1s",
        RetryHeader::Millis => "0.200s",
        RetryHeader::Date => "2s",
    };
    let details = vec![
        json!({
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                "quotaDimensions": {"location": "global", "model": model},
                "quotaValue": "3",
            }],
        }),
        json!({
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [{
                "description": "Learn more about Gemini API quotas",
                "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
            }],
        }),
        json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}),
    ];
    let mut response = google_error(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "You exceeded your current quota, please check your plan and billing details. \
             (llmq-mock: 3 requests per minute for {model}.) Please retry in {wait}."
        ),
        details,
    );
    if kind == RetryHeader::Date {
        insert_header(&mut response, header, &value);
    }
    response
}

/// True when a non-empty key comes in `x-goog-api-key` or `?key=`.
fn gemini_authorized(headers: &HeaderMap, uri: &Uri) -> bool {
    let in_header = headers
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().is_empty());
    let in_query = uri.query().is_some_and(|q| {
        q.split('&')
            .filter_map(|pair| pair.split_once('='))
            .any(|(name, value)| name == "key" && !value.is_empty())
    });
    in_header || in_query
}

/// The text of a `Content`'s parts; `None` when it has none.
fn parts_text(content: &Value) -> Option<String> {
    let parts = content.get("parts")?.as_array().filter(|p| !p.is_empty())?;
    Some(
        parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
    )
}

fn validate_gemini(model: &str, body: &[u8]) -> Result<Conversation, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("Invalid JSON payload received. {e}"))?;
    let Value::Object(obj) = value else {
        return Err("Invalid JSON payload received. Expected an object.".to_owned());
    };
    let obj = proto_fields(obj, GEMINI_FIELDS, "")?;
    let contents = obj
        .get("contents")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or("* GenerateContentRequest.contents: contents is not specified\n")?;
    let mut messages = Vec::with_capacity(contents.len() + 1);
    if let Some(system) = obj.get("systemInstruction") {
        let text = parts_text(system).ok_or(
            "* GenerateContentRequest.system_instruction.parts: contents.parts must not be \
             empty.\n",
        )?;
        messages.push(("system".to_owned(), text));
    }
    for (i, content) in contents.iter().enumerate() {
        let role = match content.get("role").and_then(Value::as_str) {
            None | Some("" | "user") => "user",
            Some("model") => "assistant",
            Some(_) => return Err("Please use a valid role: user, model.".to_owned()),
        };
        let text = parts_text(content).ok_or_else(|| {
            format!(
                "* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.\n"
            )
        })?;
        messages.push((role.to_owned(), text));
    }
    let mut max_tokens = None;
    if let Some(config) = obj.get("generationConfig").filter(|c| !c.is_null()) {
        let Value::Object(config) = config.clone() else {
            return Err(
                "Invalid JSON payload received. 'generation_config' must be an object.".to_owned(),
            );
        };
        let config = proto_fields(config, GEMINI_CONFIG_FIELDS, " at 'generation_config'")?;
        if let Some(t) = config.get("temperature").filter(|t| !t.is_null())
            && !t.as_f64().is_some_and(|t| (0.0..=2.0).contains(&t))
        {
            return Err(
                "* GenerateContentRequest.generation_config.temperature: must be in the range \
                 [0.0, 2.0]\n"
                    .to_owned(),
            );
        }
        if let Some(max) = config.get("maxOutputTokens").filter(|m| !m.is_null()) {
            let max = max
                .as_u64()
                .or_else(|| max.as_str().and_then(|s| s.parse().ok()))
                .filter(|m| *m >= 1)
                .ok_or(
                    "* GenerateContentRequest.generation_config.max_output_tokens: must be a \
                     positive integer\n",
                )?;
            max_tokens = Some(max);
        }
    }
    Ok(Conversation {
        model: model.to_owned(),
        messages,
        max_tokens,
    })
}

/// `usageMetadata` leaves out zero counts; `candidatesTokenCount` excludes thoughts.
fn gemini_response(conv: &Conversation, answer: &Answer) -> Value {
    let thoughts = answer.reasoning_tokens;
    let mut usage = json!({
        "promptTokenCount": answer.prompt_tokens,
        "candidatesTokenCount": answer.completion_tokens - thoughts,
        "totalTokenCount": answer.prompt_tokens + answer.completion_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": answer.prompt_tokens}],
    });
    if answer.cached_tokens > 0 {
        usage["cachedContentTokenCount"] = json!(answer.cached_tokens);
    }
    if thoughts > 0 {
        usage["thoughtsTokenCount"] = json!(thoughts);
    }
    json!({
        "candidates": [{
            "content": {"parts": [{"text": answer.content}], "role": "model"},
            "finishReason": if answer.truncated { "MAX_TOKENS" } else { "STOP" },
            "index": 0,
        }],
        "usageMetadata": usage,
        "modelVersion": conv.model,
        "responseId": short_id(),
    })
}

/// A prompt refused by the safety filters: no candidates at all.
fn gemini_blocked(conv: &Conversation) -> Value {
    let prompt_tokens = conv.prompt_tokens();
    json!({
        "promptFeedback": {
            "blockReason": "SAFETY",
            "safetyRatings": [{
                "category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                "probability": "HIGH",
                "blocked": true,
            }],
        },
        "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
        "modelVersion": conv.model,
        "responseId": short_id(),
    })
}

async fn gemini_generate(
    State(state): State<Arc<Shared>>,
    Path(rest): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    state.total.fetch_add(1, Ordering::SeqCst);
    let (model, method) = rest.split_once(':').unwrap_or((rest.as_str(), ""));
    if !model.is_empty() {
        state.count(model);
    }
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            return google_error(rejection.status(), rejection.body_text(), Vec::new());
        }
    };
    if !gemini_authorized(&headers, &uri) {
        return google_error(
            StatusCode::FORBIDDEN,
            "Method doesn't allow unregistered callers (callers without established identity). \
             Please use API Key or other form of API consumer identity to call this API.",
            Vec::new(),
        );
    }
    if method != "generateContent" || model.is_empty() {
        return google_error(
            StatusCode::NOT_FOUND,
            format!(
                "llmq-mock serves only models/<model>:generateContent, not {}",
                uri.path()
            ),
            Vec::new(),
        );
    }
    let conv = match validate_gemini(model, &body) {
        Ok(conv) => conv,
        Err(message) => return google_error(StatusCode::BAD_REQUEST, message, Vec::new()),
    };
    if conv.named("blocked") {
        return Json(gemini_blocked(&conv)).into_response();
    }
    match decide(&state, &conv).await {
        Outcome::Answer(answer) => Json(gemini_response(&conv, &answer)).into_response(),
        Outcome::Fail(status) => gemini_failure(status, &conv.model),
        Outcome::RateLimit(kind) => gemini_rate_limited(kind, &conv.model),
        Outcome::ContextTooLong => google_error(
            StatusCode::BAD_REQUEST,
            format!(
                "The input token count ({}) exceeds the maximum number of tokens allowed \
                 ({GEMINI_CONTEXT_LIMIT}).",
                conv.prompt_tokens().max(GEMINI_CONTEXT_LIMIT + 1)
            ),
            Vec::new(),
        ),
        Outcome::ShuttingDown => google_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "llmq-mock is shutting down.",
            Vec::new(),
        ),
    }
}

// ---- Ollama: POST /api/chat ---------------------------------------------------------------

/// `{"error": "..."}`.
fn ollama_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn ollama_not_found(model: &str) -> Response {
    ollama_error(
        StatusCode::NOT_FOUND,
        format!("model \"{model}\" not found, try pulling it first"),
    )
}

fn ollama_failure(status: StatusCode, model: &str) -> Response {
    let code = status.as_u16();
    if code == 404 {
        return ollama_not_found(model);
    }
    let message = match code {
        400 => "llmq-mock fail-400: invalid request".to_owned(),
        401 => "unauthorized".to_owned(),
        500 => "llama runner process has terminated: exit status 2".to_owned(),
        503 => "server busy, please try again.  maximum pending requests exceeded".to_owned(),
        _ => format!("llmq-mock answered {code} as asked."),
    };
    ollama_error(status, message)
}

fn ollama_rate_limited(kind: RetryHeader) -> Response {
    let (wait, header, value) = retry_header(kind);
    let mut response = ollama_error(
        StatusCode::TOO_MANY_REQUESTS,
        format!("too many requests, please retry in {wait}"),
    );
    insert_header(&mut response, header, &value);
    response
}

/// The conversation and whether to stream (Ollama streams unless told `"stream": false`).
fn validate_ollama(body: &[u8]) -> Result<(Conversation, bool), String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("json: cannot unmarshal into Go value of type api.ChatRequest".to_owned());
    };
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.trim().is_empty())
        .ok_or("model is required")?;
    let list = match obj.get("messages") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.clone(),
        Some(_) => {
            return Err(
                "json: cannot unmarshal into Go struct field ChatRequest.messages".to_owned(),
            );
        }
    };
    let mut messages = Vec::with_capacity(list.len());
    for m in &list {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        if !matches!(role, "system" | "user" | "assistant" | "tool") {
            return Err(format!("invalid role: {role:?}"));
        }
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(
                    "json: cannot unmarshal into Go struct field Message.messages.content of \
                     type string"
                        .to_owned(),
                );
            }
        };
        messages.push((role.to_owned(), content));
    }
    let mut max_tokens = None;
    match obj.get("options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(options)) => {
            if let Some(n) = options.get("num_predict").and_then(Value::as_i64) {
                max_tokens = u64::try_from(n).ok();
            }
        }
        Some(_) => {
            return Err(
                "json: cannot unmarshal into Go struct field ChatRequest.options".to_owned(),
            );
        }
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(
                "json: cannot unmarshal into Go struct field ChatRequest.stream".to_owned(),
            );
        }
    };
    Ok((
        Conversation {
            model: model.to_owned(),
            messages,
            max_tokens,
        },
        stream,
    ))
}

/// The final chat object: Ollama has no cached-token count; a thinking model's thoughts come
/// in `message.thinking`.
fn ollama_done(conv: &Conversation, answer: &Answer, content: &str) -> Value {
    let mut message = json!({"role": "assistant", "content": content});
    if answer.reasoning_tokens > 0 {
        message["thinking"] = json!("llmq-mock is thinking.");
    }
    json!({
        "model": conv.model,
        "created_at": chrono::Utc::now().to_rfc3339(),
        "message": message,
        "done_reason": if answer.truncated { "length" } else { "stop" },
        "done": true,
        "total_duration": 1_000_000,
        "load_duration": 100_000,
        "prompt_eval_count": answer.prompt_tokens,
        "prompt_eval_duration": 200_000,
        "eval_count": answer.completion_tokens,
        "eval_duration": 700_000,
    })
}

/// A streamed answer: one NDJSON chunk with the content, then the final object.
fn ollama_stream(conv: &Conversation, answer: &Answer) -> Response {
    let chunk = json!({
        "model": conv.model,
        "created_at": chrono::Utc::now().to_rfc3339(),
        "message": {"role": "assistant", "content": answer.content},
        "done": false,
    });
    let body = format!("{chunk}\n{}\n", ollama_done(conv, answer, ""));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

async fn ollama_chat(
    State(state): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    state.total.fetch_add(1, Ordering::SeqCst);
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return ollama_error(rejection.status(), rejection.body_text()),
    };
    count_body_model(&state, &body);
    let (conv, stream) = match validate_ollama(&body) {
        Ok(parsed) => parsed,
        Err(message) => return ollama_error(StatusCode::BAD_REQUEST, message),
    };
    if conv.named("missing") {
        return ollama_not_found(&conv.model);
    }
    if conv.messages.is_empty() {
        // No messages only loads the model.
        return Json(json!({
            "model": conv.model,
            "created_at": chrono::Utc::now().to_rfc3339(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": "load",
            "done": true,
        }))
        .into_response();
    }
    match decide(&state, &conv).await {
        Outcome::Answer(answer) if stream => ollama_stream(&conv, &answer),
        Outcome::Answer(answer) => {
            Json(ollama_done(&conv, &answer, &answer.content)).into_response()
        }
        Outcome::Fail(status) => ollama_failure(status, &conv.model),
        Outcome::RateLimit(kind) => ollama_rate_limited(kind),
        Outcome::ContextTooLong => ollama_error(
            StatusCode::BAD_REQUEST,
            "the input length exceeds the context length",
        ),
        Outcome::ShuttingDown => ollama_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "llmq-mock is shutting down",
        ),
    }
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
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        http_with(server, method, path, &headers, body).await
    }

    /// One raw HTTP/1.1 request with these headers and `Connection: close`.
    async fn http_with(
        server: &MockServer,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> HttpResponse {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            server.addr()
        );
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
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

    // ---- Anthropic route ----

    type Headers<'a> = &'a [(&'a str, &'a str)];

    const ANTHROPIC_HEADERS: &[(&str, &str)] = &[
        ("x-api-key", "sk-ant-test"),
        ("anthropic-version", "2023-06-01"),
    ];

    async fn messages(server: &MockServer, body: &Value) -> HttpResponse {
        http_with(
            server,
            "POST",
            "/v1/messages",
            ANTHROPIC_HEADERS,
            Some(&body.to_string()),
        )
        .await
    }

    fn ask_anthropic(model: &str, prompt: &str) -> Value {
        json!({"model": model, "max_tokens": 1024,
               "messages": [{"role": "user", "content": prompt}]})
    }

    fn assert_anthropic_error(resp: &HttpResponse, status: u16, kind: &str) -> String {
        assert_eq!(resp.status, status, "{}", resp.body);
        let v = resp.json();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert!(resp.header("request-id").is_some());
        let message = v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(!message.is_empty(), "{v}");
        message
    }

    #[tokio::test]
    async fn anthropic_success_has_messages_shape_and_usage() {
        let s = server().await;
        let system = "s".repeat(400); // 100 tokens
        let resp = messages(
            &s,
            &json!({"model": "claude-reason", "max_tokens": 1024, "system": system,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}),
        )
        .await;
        assert_eq!(resp.status, 200, "{}", resp.body);
        let v = resp.json();
        assert_eq!(v["type"], "message");
        assert_eq!(v["role"], "assistant");
        assert_eq!(v["stop_reason"], "end_turn");
        // The thinking block comes first; the text is the usual answer.
        assert_eq!(v["content"][0]["type"], "thinking");
        assert_eq!(v["content"][1]["type"], "text");
        let text = "mock answer from claude-reason: hello";
        assert_eq!(v["content"][1]["text"], text);
        // prompt = (100 + 3) + (2 + 3) = 108, half cached; input_tokens leaves them out.
        let u = &v["usage"];
        assert_eq!(u["cache_read_input_tokens"], 54);
        assert_eq!(u["input_tokens"], 54);
        assert_eq!(u["cache_creation_input_tokens"], 0);
        assert_eq!(u["output_tokens"], tokens(text));

        let mut body = ask_anthropic("claude-x", "a fairly long prompt to cut");
        body["max_tokens"] = json!(2);
        let v = messages(&s, &body).await.json();
        assert_eq!(v["stop_reason"], "max_tokens");
        assert_eq!(v["content"].as_array().map(Vec::len), Some(1));
        assert_eq!(v["content"][0]["text"], "mock ans");
        assert_eq!(v["usage"]["output_tokens"], 2);
        assert_eq!(v["usage"]["cache_read_input_tokens"], 0);
    }

    #[tokio::test]
    async fn anthropic_needs_a_key_and_a_version() {
        let s = server().await;
        let body = ask_anthropic("claude-x", "hi").to_string();
        for headers in [
            &[][..],
            &[("anthropic-version", "2023-06-01")][..],
            &[("x-api-key", " "), ("anthropic-version", "2023-06-01")][..],
            &[("x-api-key", "sk-ant")][..],
            // A bearer token is not Anthropic's auth.
            &[
                ("Authorization", "Bearer sk"),
                ("anthropic-version", "2023-06-01"),
            ][..],
        ] {
            let resp = http_with(&s, "POST", "/v1/messages", headers, Some(&body)).await;
            assert_anthropic_error(&resp, 401, "authentication_error");
        }
    }

    #[tokio::test]
    async fn anthropic_errors_have_anthropic_shape() {
        let s = server().await;
        for (model, status, kind) in [
            ("fail-500", 500, "api_error"),
            ("fail-529", 529, "overloaded_error"),
            ("fail-503", 503, "api_error"),
            ("fail-400", 400, "invalid_request_error"),
            ("fail-401", 401, "authentication_error"),
            ("fail-403", 403, "permission_error"),
            ("fail-404", 404, "not_found_error"),
        ] {
            let resp = messages(&s, &ask_anthropic(model, "hi")).await;
            assert_anthropic_error(&resp, status, kind);
        }
        let resp = messages(&s, &ask_anthropic("context-too-long", "hi")).await;
        let msg = assert_anthropic_error(&resp, 400, "invalid_request_error");
        assert_eq!(msg, "prompt is too long: 250000 tokens > 200000 maximum");

        let resp = messages(&s, &ask_anthropic("rate-limit", "hi")).await;
        assert_anthropic_error(&resp, 429, "rate_limit_error");
        assert_eq!(resp.header("retry-after"), Some("1"));
        assert_eq!(
            resp.header("anthropic-ratelimit-requests-remaining"),
            Some("0")
        );
        let resp = messages(&s, &ask_anthropic("rate-limit-ms", "hi")).await;
        assert_eq!(resp.header("retry-after-ms"), Some("200"));

        // Markers and flaky work here too.
        let resp = messages(&s, &ask_anthropic("claude-x", "x [[mock:fail-529]]")).await;
        assert_eq!(resp.status, 529);
        let statuses = [
            messages(&s, &ask_anthropic("flaky-1", "conv")).await.status,
            messages(&s, &ask_anthropic("flaky-1", "conv")).await.status,
        ];
        assert_eq!(statuses, [500, 200]);
    }

    #[tokio::test]
    async fn anthropic_requests_are_validated() {
        let s = server().await;
        let cases = [
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
                "max_tokens: Field required",
            ),
            (
                json!({"model": "m", "max_tokens": 5}),
                "messages: Field required",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": []}),
                "messages: at least one message is required",
            ),
            (
                json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
                "model: Field required",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "max_completion_tokens": 5,
                    "messages": [{"role": "user", "content": "x"}]}),
                "max_completion_tokens: Extra inputs are not permitted",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "temperature": 1.5,
                    "messages": [{"role": "user", "content": "x"}]}),
                "temperature: Input should be less than or equal to 1",
            ),
            (
                json!({"model": "m", "max_tokens": 5,
                    "messages": [{"role": "system", "content": "x"}]}),
                "messages.0.role: Input should be 'user' or 'assistant'",
            ),
        ];
        for (body, want) in cases {
            let resp = messages(&s, &body).await;
            let msg = assert_anthropic_error(&resp, 400, "invalid_request_error");
            assert_eq!(msg, want, "{body}");
        }
        let resp = http_with(&s, "POST", "/v1/messages", ANTHROPIC_HEADERS, Some("{nope")).await;
        assert_anthropic_error(&resp, 400, "invalid_request_error");
    }

    // ---- Gemini route ----

    async fn generate(server: &MockServer, model: &str, body: &Value) -> HttpResponse {
        http_with(
            server,
            "POST",
            &format!("/v1beta/models/{model}:generateContent"),
            &[("x-goog-api-key", "AIza-test")],
            Some(&body.to_string()),
        )
        .await
    }

    fn ask_gemini(prompt: &str) -> Value {
        json!({"contents": [{"role": "user", "parts": [{"text": prompt}]}]})
    }

    fn assert_google_error(resp: &HttpResponse, code: u16, status: &str) -> Value {
        assert_eq!(resp.status, code, "{}", resp.body);
        let v = resp.json();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert_eq!(v["error"]["status"], status, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        v["error"].clone()
    }

    #[tokio::test]
    async fn gemini_success_has_generate_content_shape_and_usage() {
        let s = server().await;
        let system = "s".repeat(400);
        let body = json!({
            "systemInstruction": {"parts": [{"text": system}]},
            "contents": [{"role": "user", "parts": [{"text": "hel"}, {"text": "lo"}]}],
            "generationConfig": {"temperature": 0.2},
        });
        let v = generate(&s, "gemini-reason", &body).await.json();
        let text = "mock answer from gemini-reason: hello";
        assert_eq!(v["candidates"][0]["content"]["parts"][0]["text"], text);
        assert_eq!(v["candidates"][0]["content"]["role"], "model");
        assert_eq!(v["candidates"][0]["finishReason"], "STOP");
        let u = &v["usageMetadata"];
        let out = tokens(text);
        assert_eq!(u["promptTokenCount"], 108);
        assert_eq!(u["cachedContentTokenCount"], 54);
        assert_eq!(u["thoughtsTokenCount"], out / 2);
        assert_eq!(u["candidatesTokenCount"], out - out / 2);
        assert_eq!(u["totalTokenCount"], 108 + out);

        // Zero counts are left out, as Gemini does; snake_case fields are accepted.
        let body = json!({"contents": [{"parts": [{"text": "a long enough prompt"}]}],
                          "generation_config": {"max_output_tokens": 2}});
        let v = generate(&s, "gemini-2.5-flash", &body).await.json();
        assert_eq!(v["candidates"][0]["finishReason"], "MAX_TOKENS");
        assert_eq!(
            v["candidates"][0]["content"]["parts"][0]["text"],
            "mock ans"
        );
        let u = v["usageMetadata"].as_object().unwrap();
        assert_eq!(u["candidatesTokenCount"], 2);
        assert!(
            !u.contains_key("cachedContentTokenCount") && !u.contains_key("thoughtsTokenCount")
        );
        // The v1 path works too.
        let resp = http_with(
            &s,
            "POST",
            "/v1/models/g:generateContent?key=k",
            &[],
            Some(&ask_gemini("x").to_string()),
        )
        .await;
        assert_eq!(resp.status, 200, "{}", resp.body);
    }

    #[tokio::test]
    async fn gemini_takes_the_key_from_header_or_query() {
        let s = server().await;
        let body = ask_gemini("hi").to_string();
        let path = "/v1beta/models/g:generateContent";
        let resp = http_with(&s, "POST", path, &[], Some(&body)).await;
        assert_google_error(&resp, 403, "PERMISSION_DENIED");
        let resp = http_with(&s, "POST", &format!("{path}?key="), &[], Some(&body)).await;
        assert_google_error(&resp, 403, "PERMISSION_DENIED");
        let resp = http_with(
            &s,
            "POST",
            &format!("{path}?alt=json&key=AIza"),
            &[],
            Some(&body),
        )
        .await;
        assert_eq!(resp.status, 200, "{}", resp.body);
        let resp = http_with(&s, "POST", path, &[("x-goog-api-key", "AIza")], Some(&body)).await;
        assert_eq!(resp.status, 200, "{}", resp.body);
    }

    #[tokio::test]
    async fn gemini_errors_have_google_shape() {
        let s = server().await;
        for (model, code, status) in [
            ("fail-500", 500, "INTERNAL"),
            ("fail-503", 503, "UNAVAILABLE"),
            ("fail-400", 400, "INVALID_ARGUMENT"),
            ("fail-401", 401, "UNAUTHENTICATED"),
            ("fail-404", 404, "NOT_FOUND"),
        ] {
            let resp = generate(&s, model, &ask_gemini("hi")).await;
            assert_google_error(&resp, code, status);
        }
        let resp = generate(&s, "context-too-long", &ask_gemini("hi")).await;
        let e = assert_google_error(&resp, 400, "INVALID_ARGUMENT");
        assert_eq!(
            e["message"],
            "The input token count (1048577) exceeds the maximum number of tokens allowed (1048576)."
        );
        // Rate limits: the wait is in a RetryInfo detail, without Retry-After.
        for (model, delay) in [
            ("rate-limit", "1s"),
            ("rate-limit-ms", "0.200s"),
            ("rate-limit-date", "2s"),
        ] {
            let resp = generate(&s, model, &ask_gemini("hi")).await;
            let e = assert_google_error(&resp, 429, "RESOURCE_EXHAUSTED");
            let info = e["details"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo")
                .unwrap();
            assert_eq!(info["retryDelay"], delay);
            assert!(resp.header("retry-after-ms").is_none());
            assert_eq!(
                resp.header("retry-after").is_some(),
                model == "rate-limit-date",
                "{model}"
            );
        }
        // Blocked: 200 with promptFeedback and no candidates, by model or marker.
        for (model, prompt) in [("blocked", "hi"), ("gemini-x", "[[mock:blocked]] hi")] {
            let v = generate(&s, model, &ask_gemini(prompt)).await.json();
            assert_eq!(v["promptFeedback"]["blockReason"], "SAFETY", "{v}");
            assert!(v.get("candidates").is_none(), "{v}");
        }
    }

    #[tokio::test]
    async fn gemini_requests_are_validated() {
        let s = server().await;
        for body in [
            json!({}),
            json!({"contents": []}),
            json!({"contents": [{"role": "user", "parts": []}]}),
            json!({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}),
            json!({"contents": [{"parts": [{"text": "x"}]}], "max_tokens": 5}),
            json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"max_tokens": 5}}),
            json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"temperature": 2.5}}),
        ] {
            let resp = generate(&s, "g", &body).await;
            assert_google_error(&resp, 400, "INVALID_ARGUMENT");
        }
        let resp = http_with(
            &s,
            "POST",
            "/v1beta/models/g:streamGenerateContent",
            &[("x-goog-api-key", "k")],
            Some("{}"),
        )
        .await;
        assert_google_error(&resp, 404, "NOT_FOUND");
    }

    // ---- Ollama route ----

    async fn ollama(server: &MockServer, body: &Value) -> HttpResponse {
        http_with(server, "POST", "/api/chat", &[], Some(&body.to_string())).await
    }

    fn ask_ollama(model: &str, prompt: &str) -> Value {
        json!({"model": model, "stream": false,
               "messages": [{"role": "user", "content": prompt}]})
    }

    fn assert_ollama_error(resp: &HttpResponse, status: u16) -> String {
        assert_eq!(resp.status, status, "{}", resp.body);
        let v = resp.json();
        assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
        v["error"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn ollama_success_has_chat_shape_and_counts() {
        let s = server().await;
        let body = json!({"model": "qwen-reason", "stream": false, "messages": [
            {"role": "system", "content": "s".repeat(400)},
            {"role": "user", "content": "hello"}]});
        let v = ollama(&s, &body).await.json();
        let text = "mock answer from qwen-reason: hello";
        assert_eq!(v["message"]["role"], "assistant");
        assert_eq!(v["message"]["content"], text);
        assert!(v["message"]["thinking"].is_string());
        assert_eq!(v["done"], true);
        assert_eq!(v["done_reason"], "stop");
        assert_eq!(v["prompt_eval_count"], 108);
        assert_eq!(v["eval_count"], tokens(text));

        let mut body = ask_ollama("llama3", "a long enough prompt");
        body["options"] = json!({"num_predict": 2, "temperature": 0.1});
        let v = ollama(&s, &body).await.json();
        assert_eq!(v["done_reason"], "length");
        assert_eq!(v["message"]["content"], "mock ans");
        assert_eq!(v["eval_count"], 2);
        assert!(v["message"].get("thinking").is_none());
    }

    #[tokio::test]
    async fn ollama_streams_unless_told_not_to() {
        let s = server().await;
        let body = json!({"model": "llama3", "messages": [{"role": "user", "content": "hi"}]});
        let resp = ollama(&s, &body).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-type"), Some("application/x-ndjson"));
        let lines: Vec<Value> = resp
            .body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["done"], false);
        assert_eq!(
            lines[0]["message"]["content"],
            "mock answer from llama3: hi"
        );
        assert_eq!(lines[1]["done"], true);
        assert!(lines[1]["eval_count"].as_u64().is_some());
        // No messages only loads the model.
        let v = ollama(&s, &json!({"model": "llama3", "stream": false}))
            .await
            .json();
        assert_eq!(v["done_reason"], "load");
    }

    #[tokio::test]
    async fn ollama_errors_are_plain_strings() {
        let s = server().await;
        let msg = assert_ollama_error(&ollama(&s, &ask_ollama("missing", "hi")).await, 404);
        assert_eq!(msg, "model \"missing\" not found, try pulling it first");
        let msg = assert_ollama_error(&ollama(&s, &ask_ollama("fail-404", "hi")).await, 404);
        assert_eq!(msg, "model \"fail-404\" not found, try pulling it first");
        for (model, status) in [
            ("fail-500", 500),
            ("fail-503", 503),
            ("fail-400", 400),
            ("fail-401", 401),
        ] {
            assert_ollama_error(&ollama(&s, &ask_ollama(model, "hi")).await, status);
        }
        let msg = assert_ollama_error(
            &ollama(&s, &ask_ollama("context-too-long", "hi")).await,
            400,
        );
        assert_eq!(msg, "the input length exceeds the context length");
        let resp = ollama(&s, &ask_ollama("rate-limit", "hi")).await;
        assert_ollama_error(&resp, 429);
        assert_eq!(resp.header("retry-after"), Some("1"));
        let msg = assert_ollama_error(&ollama(&s, &json!({"messages": []})).await, 400);
        assert_eq!(msg, "model is required");
        assert_ollama_error(
            &http_with(&s, "POST", "/api/chat", &[], Some("nope")).await,
            400,
        );
    }

    #[tokio::test]
    async fn calls_are_counted_on_every_route() {
        let s = server().await;
        chat(&s, &ask("m", "a")).await;
        messages(&s, &ask_anthropic("m", "b")).await;
        generate(&s, "m", &ask_gemini("c")).await;
        ollama(&s, &ask_ollama("m", "d")).await;
        // Failures and unauthenticated requests count too.
        http_with(
            &s,
            "POST",
            "/v1/messages",
            &[],
            Some(&ask_anthropic("m", "e").to_string()),
        )
        .await;
        http_with(
            &s,
            "POST",
            "/v1beta/models/m:generateContent",
            &[],
            Some("{}"),
        )
        .await;
        ollama(&s, &ask_ollama("fail-500", "f")).await;
        assert_eq!(s.calls("m"), 6);
        assert_eq!(s.calls("fail-500"), 1);
        assert_eq!(s.total_calls(), 7);
    }

    #[tokio::test]
    async fn shutdown_ends_hanging_requests_on_every_route() {
        let s = server().await;
        let hanging: [(&str, Headers<'_>, Value); 3] = [
            (
                "/v1/messages",
                ANTHROPIC_HEADERS,
                ask_anthropic("timeout", "a"),
            ),
            (
                "/v1beta/models/timeout:generateContent",
                &[("x-goog-api-key", "k")],
                ask_gemini("b"),
            ),
            ("/api/chat", &[], ask_ollama("timeout", "c")),
        ];
        let addr = s.addr();
        let mut clients = Vec::new();
        for (path, headers, body) in hanging {
            let mut req = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
            for (n, v) in headers {
                req.push_str(&format!("{n}: {v}\r\n"));
            }
            let body = body.to_string();
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
            clients.push(tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream.write_all(req.as_bytes()).await.unwrap();
                let mut raw = String::new();
                stream.read_to_string(&mut raw).await.unwrap();
                raw
            }));
        }
        let start = Instant::now();
        while s.calls("timeout") < 3 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "requests never arrived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        tokio::time::timeout(Duration::from_secs(3), s.shutdown())
            .await
            .unwrap();
        for client in clients {
            let raw = tokio::time::timeout(Duration::from_secs(3), client)
                .await
                .unwrap()
                .unwrap();
            assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
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
        assert_eq!(camel("system_instruction"), "systemInstruction");
        assert_eq!(camel("generationConfig"), "generationConfig");
    }
}

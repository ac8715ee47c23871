//! `llmq-mock`: a mock LLM server that speaks the OpenAI, Anthropic, Gemini and Ollama wire
//! formats over real HTTP, so the worker's real HTTP adapters can be tested without the
//! internet.
//!
//! Layout: this module holds the server, the magic models and the counters; `openai`,
//! `anthropic`, `gemini` and `ollama` are one route's wire format each, with the batch API of
//! the first three in their `batch` submodule; `batch` is what those share; `tests` checks
//! each format's shapes.
//!
//! Routes:
//!
//! | route | format | auth |
//! |---|---|---|
//! | `POST /v1/chat/completions`, `POST /chat/completions` | OpenAI chat completions | `Authorization: Bearer <key>` |
//! | `POST /v1/messages` | Anthropic Messages (`max_tokens` required, unknown fields rejected) | `x-api-key` and `anthropic-version` |
//! | `POST /v1beta/models/{model}:generateContent` (also `/v1/...`) | Gemini | `x-goog-api-key` or `?key=` |
//! | `POST /api/chat` | Ollama (streams NDJSON unless `"stream": false`) | none |
//! | `POST /v1/files` (multipart, `purpose=batch`, a JSONL `file`), `GET /v1/files/{id}`, `GET /v1/files/{id}/content` | OpenAI files: a batch's input, output and error files | `Authorization: Bearer <key>` |
//! | `POST /v1/batches`, `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel` | OpenAI Batch API (endpoint `/v1/chat/completions`, window `24h`) | `Authorization: Bearer <key>` |
//! | `POST /v1/messages/batches`, `GET /v1/messages/batches/{id}`, `POST /v1/messages/batches/{id}/cancel`, `GET /v1/messages/batches/{id}/results` (JSONL) | Anthropic Message Batches | `x-api-key` and `anthropic-version` |
//! | `POST /v1beta/models/{model}:batchGenerateContent` (inlined requests), `GET /v1beta/batches/{id}`, `POST /v1beta/batches/{id}:cancel` | Gemini Batch API (a long-running operation) | `x-goog-api-key` or `?key=` |
//! | `GET /v1/models`, `GET /models`, `GET /healthz`, `GET /stats` (calls answered, per model, HTTP/2 requests, batches and batch items per model) | | none |
//!
//! Any non-empty key is accepted; a missing one gets 401 (Gemini: 403 `PERMISSION_DENIED`) in
//! the route's error shape. Every route counts its requests in [`MockServer::calls`].
//!
//! Batches: a batch is created in progress; the first poll (GET) of it always answers in
//! progress, a later one answers it ended once [`MockOptions::batch_delay`] has passed since
//! its creation and all its items are answered. Each item is answered by its format's own
//! route handler, called in-process, a few at a time, so it behaves (magic models, markers,
//! schemas, tools, usage) and counts ([`MockServer::calls`], [`MockServer::total_calls`],
//! [`MockServer::calls_with_prompt`]) as a single request does, and also in
//! [`MockServer::batch_items`]; an item asking to stream is refused with the format's
//! invalid-request error. The batch's model (OpenAI: the lines' `body.model`; Anthropic: the
//! first request's `params.model`; Gemini: the URL's) can be one of the `batch-*` names below
//! for the batch as a whole; [`MockServer::batches`] counts batches per that model.
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
//! | `unavailable-<s>` | 503 with `Retry-After: <s>` (in the route's error shape) |
//! | `rate-limit` | 429 with `Retry-After: 1` (Gemini: no header, a `RetryInfo` detail `retryDelay: "1s"`) |
//! | `rate-limit-ms` | 429 with `retry-after-ms: 200` (Gemini: `retryDelay: "0.200s"`, no header) |
//! | `rate-limit-date` | 429 with an HTTP-date `Retry-After` 2 s in the future (Gemini: that header and `retryDelay: "2s"`) |
//! | `flaky`, `flaky-<n>` | per conversation, the first 2 (or `n`) requests get 500, later ones 200 |
//! | `strict-<n>` | a provider that judges its clients: every `n`th request of the model gets 429 with `retry-after-ms: 200`, and the model's key is held that long; a request arriving while the hold stands (100 ms after it began or later, so requests already on their way are forgiven) gets another 429 and counts in [`MockServer::retry_after_ignored`]; others get 200 after 20 ms |
//! | `judge-first`, `judge-last` | 200 answering `1`, or the highest `[n]` in the prompt (a chain's judge) |
//! | `review-approve`, `review-reject` | 200 answering `{"verdict": "approve"\|"reject", "findings": [...]}` |
//! | `review-reject-once` | rejects the first review of a piece of work (by its `## Work to review` line), approves the next |
//! | `review-reject-draft` | rejects work that was not redone (no `## Findings of review` in it), approves work that was |
//! | a model in [`MockOptions::quality`] | 200 whose answer ends with `[[verdict:good]]` or `[[verdict:bad]]`, good with the model's share for the prompt's `[[type:...]]` |
//! | `context-too-long` | 400: OpenAI `context_length_exceeded`; Anthropic `prompt is too long: 250000 tokens > 200000 maximum`; Gemini `The input token count (N) exceeds the maximum number of tokens allowed (1048576).`; Ollama `the input length exceeds the context length` |
//! | `blocked` (Gemini only) | 200 with `promptFeedback.blockReason: "SAFETY"` and no candidates |
//! | `quota-daily` (Gemini only) | 429 `RESOURCE_EXHAUSTED` for the per-day quota `GenerateRequestsPerDayPerProjectPerModel-FreeTier`, with a `RetryInfo` of `16s` |
//! | `missing` (Ollama only) | 404 `model "missing" not found, try pulling it first` |
//! | `tool-caller` | calls the first tool offered (arguments made from its schema) until the last turn is a tool's answer, then answers `the tool said: <answer>` |
//! | `transcript` | answers `[[role, text], ...]`: the conversation as the route read it (`system`, `user`, `assistant`, `tool`) |
//! | `stream-slow`, `stream-gap-<ms>`, `stream-break-once` | streamed: 300 ms (or `<ms>`) between the pieces of the answer; the first request of a conversation ends its stream halfway |
//! | `json-bad-once`, `json-wrong` | with a schema asked for: not JSON on the first request of a conversation, then JSON made from the schema; JSON that does not fit, always |
//! | `batch-expire` (a batch's model) | the batch ends expired, no item answered: OpenAI status `expired` with every request in the error file as `batch_expired`; Anthropic every result `expired`; Gemini `BATCH_STATE_EXPIRED`, done, no responses |
//! | `batch-fail` (a batch's model) | the batch fails, no item answered: OpenAI status `failed` with `errors.data[0].code` `invalid_request`; Anthropic every result `errored` with an `api_error`; Gemini `BATCH_STATE_FAILED` with an operation `error` |
//! | `batch-stuck` (a batch's model) | the batch never ends until cancelled |
//!
//! With a schema asked for (each format's native field), every other model answers JSON made
//! from the schema (`const`, first `enum`, every property, `"x"`, the minimum or 1).
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
use std::time::{Duration, Instant};

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

mod anthropic;
mod batch;
mod gemini;
mod ollama;
mod openai;
#[cfg(test)]
mod tests;

use anthropic::anthropic_messages;
use gemini::{gemini_generate, gemini_models};
use ollama::{ollama_chat, ollama_tags};
use openai::{ApiError, chat_completions};

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
    "strict-10",
    "context-too-long",
    "judge-first",
    "judge-last",
    "review-approve",
    "review-reject",
    "review-reject-once",
    "review-reject-draft",
    "batch-expire",
    "batch-fail",
    "batch-stuck",
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
    /// Models whose work is good only some of the time, by task type: a simulation of
    /// answer quality for learned routing (`bench=routing_savings`).
    pub quality: Vec<Quality>,
    /// How long a batch (any format) stays in progress after its creation before its items
    /// are answered and it can end. Whatever the delay, the first poll of a batch sees it in
    /// progress; with zero, the next poll sees it ended (once its items are answered).
    pub batch_delay: Duration,
    /// How long a request creating a batch waits for its answer after the batch is made (a
    /// client that dies meanwhile leaves a batch it has no id of).
    /// OpenAI's `POST /v1/batches` only.
    pub batch_create_delay: Duration,
    /// How long the first `POST /v1/files` waits for its answer after the file is stored (a
    /// client that dies meanwhile has made no batch); later uploads answer at once.
    /// OpenAI's files only.
    pub first_upload_delay: Duration,
}

/// How often a model's answers are good, per task type: an answer to a prompt carrying
/// `[[type:<task type>]]` ends with `[[verdict:good]]` with that probability (drawn from a
/// hash of the conversation and the model, so the same task gets the same answer), else
/// `[[verdict:bad]]`; a check or review that reads the marker then judges the work.
#[derive(Debug, Clone, PartialEq)]
pub struct Quality {
    pub model: String,
    /// Task type and the share of good answers; a type not listed is always good.
    pub by_type: Vec<(String, f64)>,
}

/// How many arrival times the server keeps (the oldest go first).
pub const ARRIVALS_KEPT: usize = 100_000;

/// What the server shares between requests.
struct Shared {
    opts: MockOptions,
    shutdown: CancellationToken,
    total: AtomicU64,
    /// Requests that came over HTTP/2 (h2c), any route.
    http2: AtomicU64,
    per_model: Mutex<HashMap<String, u64>>,
    /// Valid chat requests per last user message, so a test can match calls to tasks.
    per_prompt: Mutex<HashMap<String, u64>>,
    /// When the first chat request with each last user message arrived (ms since the epoch).
    first_seen: Mutex<HashMap<String, i64>>,
    /// Per model: valid chat requests being answered now, and the most there were at once.
    open: Mutex<HashMap<String, (u64, u64)>>,
    /// Requests seen per conversation hash, for `flaky`.
    flaky: Mutex<HashMap<u64, u64>>,
    /// Per `strict-<n>` model: requests counted, and the hold it asked for.
    strict: Mutex<HashMap<String, (u64, Option<StrictHold>)>>,
    /// Requests that came while a wait the mock asked for stood.
    retry_after_ignored: AtomicU64,
    /// When each POST request arrived (ms since the epoch), as a provider counting requests
    /// in a window sees them: the last [`ARRIVALS_KEPT`].
    arrivals: Kept<i64>,
    /// The tokens (prompt and completion) of the chat requests answered.
    answered_tokens: AtomicU64,
    /// When each of the last [`ARRIVALS_KEPT`] chat requests was answered (ms since the
    /// epoch) and its tokens, as a provider counting `tpm` in a window sees them.
    answers: Kept<(i64, u64)>,
    /// The batches and files of the batch APIs.
    batch: batch::Batches,
    /// Anthropic's prompt cache: per marked prefix (model and content), when it expires, its
    /// tokens, and when it was first written.
    prompt_cache: Mutex<HashMap<u64, (Instant, u64, Instant)>>,
    /// What the Messages API billed, in tokens: fresh input, cache reads, cache writes,
    /// output.
    anthropic_billed: Mutex<[u64; 4]>,
    /// The address the server listens on (for URLs it hands out).
    addr: std::sync::OnceLock<SocketAddr>,
}

/// A wait a `strict-<n>` model asked for: since when, until when.
type StrictHold = (Instant, Instant);

/// The last [`ARRIVALS_KEPT`] of something the mock notes, oldest first.
#[derive(Default)]
struct Kept<T>(Mutex<std::collections::VecDeque<T>>);

impl<T: Copy> Kept<T> {
    fn push(&self, item: T) {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() >= ARRIVALS_KEPT {
            kept.pop_front();
        }
        kept.push_back(item);
    }

    fn all(&self) -> Vec<T> {
        let kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        kept.iter().copied().collect()
    }
}

impl Shared {
    fn new(opts: MockOptions, shutdown: CancellationToken) -> Self {
        Self {
            opts,
            shutdown,
            total: AtomicU64::new(0),
            http2: AtomicU64::new(0),
            per_model: Mutex::new(HashMap::new()),
            per_prompt: Mutex::new(HashMap::new()),
            first_seen: Mutex::new(HashMap::new()),
            open: Mutex::new(HashMap::new()),
            flaky: Mutex::new(HashMap::new()),
            strict: Mutex::new(HashMap::new()),
            retry_after_ignored: AtomicU64::new(0),
            arrivals: Kept::default(),
            answered_tokens: AtomicU64::new(0),
            answers: Kept::default(),
            batch: batch::Batches::default(),
            prompt_cache: Mutex::new(HashMap::new()),
            anthropic_billed: Mutex::new([0; 4]),
            addr: std::sync::OnceLock::new(),
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
    /// Whether a `strict-<n>` request is refused with a 429: while a hold stands (counted
    /// as ignoring it, once past the grace for requests already on their way), or as the
    /// `n`th, which begins a hold of 200 ms (what `retry-after-ms` then says).
    fn strict_refuses(&self, model: &str, n: u64) -> bool {
        const HOLD: Duration = Duration::from_millis(200);
        // A request a worker sent before another one's 429 reached Redis can take this long
        // to arrive on a loaded machine (50 ms was seen exceeded twice in a clean-clone CI run
        // of the whole suite on 2 cores); one arriving in the hold's second half is counted.
        const IN_FLIGHT: Duration = Duration::from_millis(100);
        let now = Instant::now();
        let mut map = self.strict.lock().unwrap_or_else(PoisonError::into_inner);
        let (count, hold) = map.entry(model.to_owned()).or_default();
        if let Some((since, until)) = *hold
            && now < until
        {
            if now >= since + IN_FLIGHT {
                self.retry_after_ignored.fetch_add(1, Ordering::SeqCst);
            }
            return true;
        }
        *count += 1;
        if (*count).is_multiple_of(n) {
            *hold = Some((now, now + HOLD));
            return true;
        }
        false
    }

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

    /// Valid chat requests received whose last user message is `prompt`, whatever their
    /// outcome (a request whose client went away before the answer is counted too: a real
    /// provider bills it).
    #[must_use]
    pub fn calls_with_prompt(&self, prompt: &str) -> u64 {
        let map = self
            .state
            .per_prompt
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(prompt).copied().unwrap_or(0)
    }

    /// What the Messages API billed, in tokens: fresh input, cache reads, cache writes,
    /// output (`/stats`' `anthropic_billed_tokens`).
    #[must_use]
    pub fn anthropic_billed(&self) -> [u64; 4] {
        *self
            .state
            .anthropic_billed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The most chat requests for `model` that were being answered at the same moment.
    #[must_use]
    pub fn max_open_calls(&self, model: &str) -> u64 {
        let map = self
            .state
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(model).map_or(0, |(_, max)| *max)
    }

    /// Batches created (any format) whose model is `model`: OpenAI's lines' `body.model`,
    /// Anthropic's first request's `params.model`, Gemini's URL model.
    #[must_use]
    pub fn batches(&self, model: &str) -> u64 {
        self.state.batch.created(model)
    }

    /// Files the server holds (OpenAI's): batch input files uploaded, whether or not a batch
    /// was made of them, and the output and error files of ended batches.
    #[must_use]
    pub fn files(&self) -> usize {
        self.state.batch.files()
    }

    /// Batch items for `model` (each item's own model) that were answered, whatever the
    /// answer; items not run (the batch expired, failed or was cancelled first) are not
    /// counted.
    #[must_use]
    pub fn batch_items(&self, model: &str) -> u64 {
        self.state.batch.answered(model)
    }

    /// Requests received over HTTP/2 (h2c), any route.
    #[must_use]
    pub fn http2_requests(&self) -> u64 {
        self.state.http2.load(Ordering::SeqCst)
    }

    /// All chat-completion requests received.
    #[must_use]
    pub fn total_calls(&self) -> u64 {
        self.state.total.load(Ordering::SeqCst)
    }

    /// When the first valid chat request whose last user message is each prompt arrived (ms
    /// since the epoch), by prompt.
    #[must_use]
    pub fn first_seen(&self) -> HashMap<String, i64> {
        self.state
            .first_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The last user messages of the chat requests received, each once.
    #[must_use]
    pub fn prompts(&self) -> Vec<String> {
        let map = self
            .state
            .per_prompt
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.keys().cloned().collect()
    }

    /// Requests to a `strict-<n>` model that arrived while a wait it had asked for stood.
    #[must_use]
    pub fn retry_after_ignored(&self) -> u64 {
        self.state.retry_after_ignored.load(Ordering::SeqCst)
    }

    /// When each of the last [`ARRIVALS_KEPT`] POST requests arrived (ms since the epoch),
    /// in order of arrival.
    #[must_use]
    pub fn arrivals(&self) -> Vec<i64> {
        self.state.arrivals.all()
    }

    /// The tokens (prompt and completion) of the chat requests answered so far, as a provider
    /// counting `tpm` would count them.
    #[must_use]
    pub fn answered_tokens(&self) -> u64 {
        self.state
            .answered_tokens
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// When each of the last [`ARRIVALS_KEPT`] chat requests was answered (ms since the
    /// epoch), with its tokens (prompt and completion).
    #[must_use]
    pub fn answers(&self) -> Vec<(i64, u64)> {
        self.state.answers.all()
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
    if let Ok(addr) = listener.local_addr() {
        let _ = state.addr.set(addr);
    }
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
        .route("/v1/files", post(openai::upload_file))
        .route("/v1/files/{id}", get(openai::file_info))
        .route("/v1/files/{id}/content", get(openai::file_content))
        .route(
            "/v1/batches",
            post(openai::create_batch).get(openai::list_batches),
        )
        .route("/v1beta/batches", get(gemini::list_batches))
        .route("/v1/batches/{id}", get(openai::get_batch))
        .route("/v1/batches/{id}/cancel", post(openai::cancel_batch))
        .route("/v1/messages/batches", post(anthropic::create_batch))
        .route("/v1/messages/batches/{id}", get(anthropic::get_batch))
        .route(
            "/v1/messages/batches/{id}/cancel",
            post(anthropic::cancel_batch),
        )
        .route(
            "/v1/messages/batches/{id}/results",
            get(anthropic::batch_results),
        )
        .route(
            "/v1beta/batches/{id}",
            get(gemini::get_batch).post(gemini::cancel_batch),
        )
        .route("/api/chat", post(ollama_chat))
        .route("/api/tags", get(ollama_tags))
        .route("/v1beta/models", get(gemini_models))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/stats", get(stats))
        .fallback(unknown_url)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::map_response(add_request_id))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            count_version,
        ))
        .with_state(state)
}

/// Counts the requests that came over HTTP/2 and notes when each POST arrived.
async fn count_version(
    State(state): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.version() == axum::http::Version::HTTP_2 {
        state.http2.fetch_add(1, Ordering::SeqCst);
    }
    if req.method() == Method::POST {
        state.arrivals.push(chrono::Utc::now().timestamp_millis());
    }
    next.run(req).await
}

/// `GET /stats`: the chat requests answered so far, in all and per model, how many
/// requests came over HTTP/2, and the batches created and batch items answered per model.
async fn stats(State(state): State<Arc<Shared>>) -> Json<Value> {
    let per_model = state
        .per_model
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let [input, cache_read, cache_write, output] = *state
        .anthropic_billed
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    Json(json!({
        "calls": state.total.load(Ordering::SeqCst),
        "calls_by_model": per_model,
        "http2_requests": state.http2.load(Ordering::SeqCst),
        "batches_by_model": state.batch.created_by_model(),
        "batch_items_by_model": state.batch.answered_by_model(),
        "anthropic_billed_tokens": {"input": input, "cache_read": cache_read,
            "cache_write": cache_write, "output": output},
    }))
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
    /// 503 with `Retry-After: <seconds>`.
    Unavailable(u64),
    RateLimit(RetryHeader),
    Flaky(u64),
    /// `strict-<n>`: every `n`th request rate-limited, and a wait it asked for enforced.
    Strict(u64),
    ContextTooLong,
    /// A judge or a reviewer: a fixed kind of answer.
    Scripted(Script),
}

/// Answers that chain steps read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    /// Picks candidate 1.
    JudgeFirst,
    /// Picks the last candidate (the highest `[n]` in the prompt).
    JudgeLast,
    ReviewApprove,
    ReviewReject,
    /// Rejects the first review of a piece of work, approves the next.
    ReviewRejectOnce,
    /// Rejects work that has not been redone yet (no findings in it), approves the rest.
    ReviewRejectDraft,
}

impl Script {
    fn answer(self, state: &Shared, prompt: &str) -> String {
        const APPROVE: &str = r#"{"verdict": "approve", "findings": []}"#;
        const REJECT: &str =
            r#"{"verdict": "reject", "findings": ["llmq-mock rejects this work"]}"#;
        match self {
            Script::JudgeFirst => "1".into(),
            Script::JudgeLast => {
                let last = prompt
                    .match_indices('[')
                    .filter_map(|(i, _)| {
                        let rest = &prompt[i + 1..];
                        let end = rest.find(']')?;
                        rest[..end].parse::<u32>().ok()
                    })
                    .max()
                    .unwrap_or(1);
                last.to_string()
            }
            Script::ReviewApprove => APPROVE.into(),
            Script::ReviewReject => REJECT.into(),
            Script::ReviewRejectDraft => {
                let work = prompt.split("## Work to review").nth(1).unwrap_or(prompt);
                if work.contains("## Findings of review") {
                    APPROVE.into()
                } else {
                    REJECT.into()
                }
            }
            Script::ReviewRejectOnce => {
                // The work under review names its step; the first look at it rejects.
                let work = prompt.split("## Work to review").nth(1).unwrap_or(prompt);
                let mut h = DefaultHasher::new();
                work.lines().next().unwrap_or_default().hash(&mut h);
                if state.flaky_attempt(h.finish()) <= 1 {
                    REJECT.into()
                } else {
                    APPROVE.into()
                }
            }
        }
    }
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
        "judge-first" => Behaviour::Scripted(Script::JudgeFirst),
        "judge-last" => Behaviour::Scripted(Script::JudgeLast),
        "review-approve" => Behaviour::Scripted(Script::ReviewApprove),
        "review-reject" => Behaviour::Scripted(Script::ReviewReject),
        "review-reject-once" => Behaviour::Scripted(Script::ReviewRejectOnce),
        "review-reject-draft" => Behaviour::Scripted(Script::ReviewRejectDraft),
        _ => {
            if let Some(ms) = number_after(name, "slow-") {
                Behaviour::Slow(Duration::from_millis(ms))
            } else if let Some(secs) = number_after(name, "unavailable-") {
                Behaviour::Unavailable(secs)
            } else if let Some(n) = number_after(name, "flaky-") {
                Behaviour::Flaky(n)
            } else if let Some(n) = number_after(name, "strict-").filter(|n| *n > 0) {
                Behaviour::Strict(n)
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

/// A validated request, reduced to what the mock uses.
#[derive(Default)]
struct Conversation {
    model: String,
    /// (role, text) per message: `system`, `user`, `assistant` or `tool` (a tool's answer,
    /// whatever the format's own shape); an assistant turn that called tools reads
    /// `calls <name>, ...`.
    messages: Vec<(String, String)>,
    max_tokens: Option<u64>,
    /// The tools offered: (name, parameters schema).
    tools: Vec<(String, Value)>,
    /// The JSON the answer must be: a schema (`{"type": "object"}` for any JSON object).
    schema: Option<Value>,
    /// The answer is asked for as a stream (each route's own streaming form).
    stream: bool,
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

/// A streamed answer's text in pieces: up to four, split after spaces, in order.
fn pieces(content: &str) -> Vec<String> {
    let words: Vec<&str> = content.split_inclusive(' ').collect();
    let per = words.len().div_ceil(4).max(1);
    words.chunks(per).map(|c| c.concat()).collect()
}

/// A streamed body: `events` one after another; for `stream-slow` (the model or a marker)
/// [`STREAM_GAP`] apart, so a reader can watch the answer being written.
fn streamed(
    conv: &Conversation,
    answer: &Answer,
    content_type: &'static str,
    mut events: Vec<String>,
) -> Response {
    if answer.cut {
        // The connection ends halfway, before the answer is complete.
        events.truncate(
            events
                .len()
                .div_ceil(2)
                .min(events.len().saturating_sub(2))
                .max(1),
        );
    }
    let gap = if conv.named("stream-slow") {
        STREAM_GAP
    } else if let Some(ms) = number_after(&conv.model, "stream-gap-") {
        Duration::from_millis(ms)
    } else {
        Duration::ZERO
    };
    let body = futures_util::stream::unfold(
        (events.into_iter(), true),
        move |(mut rest, first)| async move {
            let event = rest.next()?;
            if !first && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            Some((
                Ok::<_, std::convert::Infallible>(Bytes::from(event)),
                (rest, false),
            ))
        },
    );
    (
        [(header::CONTENT_TYPE, content_type)],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// Server-Sent Events: each payload as a `data:` event, with its `event:` name when given.
fn sse(
    conv: &Conversation,
    answer: &Answer,
    events: Vec<(Option<&str>, Value)>,
    done: bool,
) -> Response {
    let mut out: Vec<String> = events
        .into_iter()
        .map(|(name, data)| match name {
            Some(name) => format!("event: {name}\ndata: {data}\n\n"),
            None => format!("data: {data}\n\n"),
        })
        .collect();
    if done {
        out.push("data: [DONE]\n\n".to_owned());
    }
    streamed(conv, answer, "text/event-stream", out)
}

/// The pause between the pieces of a `stream-slow` answer.
const STREAM_GAP: Duration = Duration::from_millis(300);

/// ceil(chars / 4).
fn tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
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
    /// `unavailable-<secs>`: a 503 asking to come back in that many seconds.
    Unavailable(u64),
    RateLimit(RetryHeader),
    ContextTooLong,
    /// The server shut down while the request was waiting.
    ShuttingDown,
}

/// Applies the request's behaviour: sleeps for the slow ones, counts the flaky ones.
/// Counts a request as open, under its model, while it is being answered (its client may go
/// away meanwhile, which ends it too).
struct Open<'a>(&'a Shared, &'a str);

impl<'a> Open<'a> {
    fn new(state: &'a Shared, model: &'a str) -> Self {
        let mut map = state.open.lock().unwrap_or_else(PoisonError::into_inner);
        let (now, max) = map.entry(model.to_owned()).or_default();
        *now += 1;
        *max = (*max).max(*now);
        Self(state, model)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        let mut map = self.0.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((now, _)) = map.get_mut(self.1) {
            *now -= 1;
        }
    }
}

async fn decide(state: &Shared, conv: &Conversation) -> Outcome {
    let _open = Open::new(state, &conv.model);
    *state
        .per_prompt
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(conv.last_user().to_owned())
        .or_insert(0) += 1;
    state
        .first_seen
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(conv.last_user().to_owned())
        .or_insert_with(|| chrono::Utc::now().timestamp_millis());
    let behaviour = marker(conv.last_user())
        .or_else(|| magic(&conv.model))
        .unwrap_or(Behaviour::Normal);
    let mut scripted = None;
    let extra = match behaviour {
        Behaviour::Normal => Duration::ZERO,
        Behaviour::Scripted(s) => {
            scripted = Some(s.answer(state, conv.last_user()));
            Duration::ZERO
        }
        Behaviour::Slow(d) => d,
        Behaviour::Timeout => TIMEOUT_SLEEP,
        Behaviour::Fail(status) => return Outcome::Fail(status),
        Behaviour::Unavailable(secs) => return Outcome::Unavailable(secs),
        Behaviour::RateLimit(kind) => return Outcome::RateLimit(kind),
        Behaviour::ContextTooLong => return Outcome::ContextTooLong,
        Behaviour::Flaky(n) => {
            if state.flaky_attempt(conv.hash()) <= n {
                return Outcome::Fail(StatusCode::INTERNAL_SERVER_ERROR);
            }
            Duration::ZERO
        }
        Behaviour::Strict(n) => {
            if state.strict_refuses(&conv.model, n) {
                return Outcome::RateLimit(RetryHeader::Millis);
            }
            Duration::from_millis(20)
        }
    };
    if !state.sleep(state.opts.latency + extra).await {
        return Outcome::ShuttingDown;
    }
    let mut answer = Answer::new(conv);
    if let Some(text) = scripted {
        answer.completion_tokens = tokens(&text);
        answer.content = text;
    }
    shape(state, conv, &mut answer);
    let used = answer.prompt_tokens + answer.completion_tokens;
    state.answered_tokens.fetch_add(used, Ordering::Relaxed);
    state
        .answers
        .push((chrono::Utc::now().timestamp_millis(), used));
    answer.cut = conv.stream
        && conv.named("stream-break-once")
        && state.flaky_attempt(conv.hash() ^ 0x0063_7574) == 1;
    if let Some(q) = state.opts.quality.iter().find(|q| q.model == conv.model) {
        let good = quality_of(q, conv.last_user()) > draw(conv.hash(), &conv.model);
        answer.content.push_str(if good {
            " [[verdict:good]]"
        } else {
            " [[verdict:bad]]"
        });
    }
    Outcome::Answer(answer)
}

/// Answers in the shape the request asks for: `tool-caller` calls the first tool offered
/// (with arguments made from its schema) until a tool has answered, then says what it said;
/// `transcript` answers the conversation as it arrived, `[[role, text], ...]`; with a schema,
/// the answer is JSON made from it, except `json-bad-once`'s first answer per conversation
/// and every answer of `json-wrong`, which do not fit.
fn shape(state: &Shared, conv: &Conversation, answer: &mut Answer) {
    let named = |name: &str| conv.named(name);
    let last = conv
        .messages
        .last()
        .map(|(role, text)| (role.as_str(), text.as_str()));
    if named("tool-caller") {
        match last {
            Some(("tool", said)) => answer.content = format!("the tool said: {said}"),
            _ => {
                if let Some((name, parameters)) = conv.tools.first() {
                    answer.content.clear();
                    answer.tool_calls = vec![(
                        format!("call_mock{}", short_id()),
                        name.clone(),
                        example(parameters),
                    )];
                }
            }
        }
    } else if named("transcript") {
        let turns: Vec<[&str; 2]> = conv
            .messages
            .iter()
            .map(|(role, text)| [role.as_str(), text.as_str()])
            .collect();
        answer.content = json!(turns).to_string();
    } else if let Some(schema) = &conv.schema {
        let first = state.flaky_attempt(conv.hash() ^ 0x6a73_6f6e) == 1;
        answer.content = if named("json-wrong") || (named("json-bad-once") && first) {
            // Not JSON at all the first time; JSON of the wrong shape for `json-wrong`.
            if named("json-wrong") {
                "[\"not\", \"what was asked\"]".to_owned()
            } else {
                "Sure! Here is the JSON you asked for.".to_owned()
            }
        } else {
            example(schema).to_string()
        };
    }
    answer.completion_tokens = tokens(&answer.content) + 8 * answer.tool_calls.len() as u64;
}

/// A value that fits `schema`: its `const`, its first `enum` value, the first of `anyOf` or
/// `oneOf`, every property of an object, one item of an array, `"x"`, its minimum or 1.
fn example(schema: &Value) -> Value {
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(first) = schema
            .get(key)
            .and_then(Value::as_array)
            .and_then(|e| e.first())
        {
            return example(first);
        }
    }
    let ty = match schema.get("type") {
        Some(Value::Array(types)) => types.first().and_then(Value::as_str).unwrap_or("object"),
        Some(Value::String(t)) => t.as_str(),
        _ => "object",
    };
    match ty {
        "string" => json!("x"),
        "integer" => schema.get("minimum").cloned().unwrap_or(json!(1)),
        "number" => schema.get("minimum").cloned().unwrap_or(json!(1.5)),
        "boolean" => json!(true),
        "null" => Value::Null,
        "array" => {
            let item = schema.get("items").map_or(json!("x"), example);
            let n = schema
                .get("minItems")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .max(1);
            Value::Array(vec![item; usize::try_from(n.min(8)).unwrap_or(1)])
        }
        _ => Value::Object(
            schema
                .get("properties")
                .and_then(Value::as_object)
                .map(|props| props.iter().map(|(k, v)| (k.clone(), example(v))).collect())
                .unwrap_or_default(),
        ),
    }
}

/// The share of good answers `q` gives a prompt, by its `[[type:...]]` marker.
fn quality_of(q: &Quality, prompt: &str) -> f64 {
    let ty = prompt
        .split("[[type:")
        .nth(1)
        .and_then(|rest| rest.split("]]").next());
    ty.and_then(|t| q.by_type.iter().find(|(name, _)| name == t))
        .map_or(1.0, |(_, share)| *share)
}

/// A number in [0, 1) fixed by the conversation and the model.
fn draw(conversation: u64, model: &str) -> f64 {
    let mut h = DefaultHasher::new();
    conversation.hash(&mut h);
    model.hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
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
    /// Tool calls instead of (or with) the content: (id, name, arguments).
    tool_calls: Vec<(String, String, Value)>,
    /// Streamed, the connection ends halfway (`stream-break-once`, its first request).
    cut: bool,
    /// Cut short by the output limit.
    truncated: bool,
    /// All prompt tokens, cached ones included.
    prompt_tokens: u64,
    /// All output tokens, reasoning ones included.
    completion_tokens: u64,
    cached_tokens: u64,
    /// Prompt tokens written to the cache (Anthropic's `cache_creation_input_tokens`).
    cache_write_tokens: u64,
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
            tool_calls: Vec::new(),
            cut: false,
            truncated,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            cache_write_tokens: 0,
            reasoning_tokens,
        }
    }
}

/// A 503 with `Retry-After: secs`, in the route's error shape (`failure` builds it).
fn unavailable(failure: Response, secs: u64) -> Response {
    let mut r = failure;
    insert_header(&mut r, "retry-after", &secs.to_string());
    r
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
                .filter_map(|b| match b["type"].as_str() {
                    // Anthropic's image block: base64 data or a URL.
                    Some("image") => Some(match b["source"]["type"].as_str() {
                        Some("base64") => format!(
                            "[image {}]",
                            b["source"]["media_type"].as_str().unwrap_or("?")
                        ),
                        _ => openai::image_mark(b["source"]["url"].as_str()),
                    }),
                    _ => b.get("text").and_then(Value::as_str).map(str::to_owned),
                })
                .collect(),
        ),
        _ => None,
    }
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Established TCP connections from this machine to local port `port`, from
/// `/proc/net/tcp` and `/proc/net/tcp6` (0 where they cannot be read).
pub fn connections_to(port: u16) -> u64 {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|text| {
            text.lines()
                .skip(1)
                .filter(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    // remote address, state 01 = ESTABLISHED
                    cols.get(2).is_some_and(|r| r.ends_with(&want)) && cols.get(3) == Some(&"01")
                })
                .count() as u64
        })
        .sum()
}

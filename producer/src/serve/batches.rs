//! OpenAI's Batch API (`/v1/batches`) and Anthropic's Message Batches
//! (`/v1/messages/batches`) over the queue: each request of a batch is a task routed on its
//! own, whose deadline is the batch's completion window, so the workers send it to a
//! provider's batch API at half price where that is cheaper and call it at once where not.
//!
//! A batch lives in Postgres (`serve_batches`) and is driven by whichever replica of
//! `llmq serve` holds its lease: it checks the input (OpenAI's `validating`), enqueues its
//! tasks in chunks (each chunk's progress marked in Redis with it, and each task's id and
//! idempotency key made of the batch's id and the request's `custom_id`, so a replica that
//! takes over after a crash enqueues the rest and nothing twice), waits for them, and writes
//! the output and error files a part at a time. A server that stops gives its leases back;
//! one that dies loses them after [`LEASE`], and another takes its batches over.
//!
//! Cancelling stops the enqueuing: requests not yet enqueued end cancelled; those enqueued
//! run to their end (a queued task cannot be taken back yet).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use llmq_shared::envelope::Envelope;
use llmq_shared::ids::TaskId;
use llmq_shared::outcome::{Status, TaskRecord};
use llmq_shared::queue::PROGRESS_TTL;
use serde_json::{Value, json};

use super::files::{self, Files};
use super::keys::Key;
use super::task::{self, ApiError, Dialect};
use super::{App, AppState};
use crate::batch_file::{self, Reader, Shape};

/// How long a batch's lease holds without being kept, unless the server is told otherwise.
pub const LEASE: Duration = Duration::from_secs(30);
/// How often a driving server keeps its leases and writes its batches' progress, and looks
/// for batches to take up.
const KEEP: Duration = Duration::from_secs(1);
/// The most errors a failed batch lists.
const MAX_ERRORS: usize = 100;
/// Results read from Redis per round trip while the output is written.
const CHUNK: usize = 1000;
/// The largest Message Batches body taken (Anthropic's limit).
pub const MAX_ANTHROPIC_BODY: usize = 256 * 1024 * 1024;
/// The most requests a batch holds (Anthropic's limit; OpenAI's is 50,000): what a driving
/// server keeps of each (its task's id and `custom_id`) stays a few MB.
const MAX_REQUESTS: usize = 100_000;
/// The longest `custom_id` (Anthropic's limit is 64).
const MAX_CUSTOM_ID: usize = 512;

/// A batch as its row holds it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BatchRow {
    pub id: String,
    pub tenant: Option<String>,
    pub key_id: Option<String>,
    pub dialect: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub metadata: Option<Value>,
    pub status: String,
    pub errors: Option<Value>,
    pub total: i32,
    pub completed: i32,
    pub failed: i32,
    pub cancelled: i32,
    pub expired: i32,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub in_progress_at: Option<DateTime<Utc>>,
    pub finalizing_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub cancelling_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
    pub expired_at: Option<DateTime<Utc>>,
    /// Runs of it that failed, and why the last one did.
    pub failed_runs: i32,
    pub last_run_error: Option<String>,
}

const COLUMNS: &str = "id, tenant, key_id, dialect, endpoint, input_file_id, completion_window, \
    metadata, status, errors, total, completed, failed, cancelled, expired, output_file_id, \
    error_file_id, created_at, expires_at, in_progress_at, finalizing_at, completed_at, \
    failed_at, cancelling_at, cancelled_at, expired_at, failed_runs, last_run_error";

/// A batch whose runs failed this many times fails, with the last run's reason. The n-th
/// failed run holds the batch for 2^(n-1) leases (an hour at most) before the next: with
/// the default lease, an outage of an hour fails no batch.
const MAX_FAILED_RUNS: i32 = 8;

fn secs(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| t.timestamp().into())
}

fn rfc3339(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| {
        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true).into()
    })
}

impl BatchRow {
    fn dialect(&self) -> Dialect {
        if self.dialect == "anthropic" {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        }
    }

    fn shape(&self) -> Shape {
        match self.dialect() {
            Dialect::Anthropic => Shape::Anthropic,
            Dialect::OpenAi => Shape::OpenAi,
        }
    }

    fn open(&self) -> bool {
        matches!(
            self.status.as_str(),
            "validating" | "in_progress" | "finalizing" | "cancelling"
        )
    }

    /// OpenAI's batch object.
    pub fn openai(&self) -> Value {
        // While it runs, `completed` counts every finished request (the split is exact at
        // the end).
        json!({
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": self.errors.as_ref().map(|e| json!({"object": "list", "data": e})),
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at.timestamp(),
            "in_progress_at": secs(self.in_progress_at),
            "expires_at": self.expires_at.timestamp(),
            "finalizing_at": secs(self.finalizing_at),
            "completed_at": secs(self.completed_at),
            "failed_at": secs(self.failed_at),
            "expired_at": secs(self.expired_at),
            "cancelling_at": secs(self.cancelling_at),
            "cancelled_at": secs(self.cancelled_at),
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed + self.cancelled + self.expired,
            },
            "metadata": self.metadata,
        })
    }

    /// Anthropic's message batch object.
    pub fn anthropic(&self) -> Value {
        let status = match self.status.as_str() {
            "cancelling" => "canceling",
            s if self.open() && s != "cancelling" => "in_progress",
            _ => "ended",
        };
        let ended = self
            .completed_at
            .or(self.cancelled_at)
            .or(self.expired_at)
            .or(self.failed_at);
        let (succeeded, errored) = if self.open() {
            (0, 0)
        } else {
            (self.completed, self.failed)
        };
        json!({
            "id": self.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": {
                // As Anthropic counts: a request leaves `processing` when the batch ends.
                "processing": if self.open() { self.total } else { 0 },
                "succeeded": succeeded,
                "errored": errored,
                "canceled": self.cancelled,
                "expired": self.expired,
            },
            "ended_at": rfc3339(ended),
            "created_at": rfc3339(Some(self.created_at)),
            "expires_at": rfc3339(Some(self.expires_at)),
            "archived_at": null,
            "cancel_initiated_at": rfc3339(self.cancelling_at),
            "results_url": self.output_file_id.as_ref().map(|_| {
                format!("/v1/messages/batches/{}/results", self.id)
            }),
        })
    }

    fn object(&self) -> Value {
        match self.dialect() {
            Dialect::OpenAi => self.openai(),
            Dialect::Anthropic => self.anthropic(),
        }
    }
}

fn no_batch(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "No such batch: {}",
            Value::from(llmq_shared::text::excerpt(id, 80))
        ),
    )
}

async fn find(
    app: &App,
    dialect: &str,
    tenant: Option<&str>,
    id: &str,
) -> Result<BatchRow, ApiError> {
    let files = files::of(app)?;
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM serve_batches
         WHERE id = $1 AND dialect = $2 AND tenant IS NOT DISTINCT FROM $3 AND queue = $4"
    ))
    .bind(id)
    .bind(dialect)
    .bind(tenant)
    .bind(&app.serve.queue)
    .fetch_optional(&files.pool)
    .await
    .map_err(|e| files::stored(&e))?
    .ok_or_else(|| no_batch(id))
}

/// The completion window as a duration: OpenAI's `24h` (the one it takes), or a longer span
/// a task's deadline may be (24h, what a provider's batch API may take), up to 7 days: a
/// batch's progress mark in Redis ([`PROGRESS_TTL`]) and the workers' results (their
/// `LLMQ_RESULT_TTL`, 7 days by default) live that long, and a longer batch taken over
/// later would enqueue its requests again and find its first results gone.
fn window_of(w: &str) -> Result<Duration, ApiError> {
    use llmq_shared::envelope::{MAX_DEADLINE, MIN_DEADLINE};
    humantime::parse_duration(w)
        .ok()
        .filter(|d| (MIN_DEADLINE..=MAX_DEADLINE.min(PROGRESS_TTL)).contains(d))
        .ok_or_else(|| {
            ApiError::bad(
                Some("completion_window"),
                format!(
                    "`completion_window` must be \"24h\" (or a span from 24h to 7d), not {}",
                    Value::from(llmq_shared::text::excerpt(w, 40))
                ),
            )
        })
}

/// A new batch's id in `dialect`'s form.
fn new_id(dialect: &str) -> String {
    let prefix = if dialect == "anthropic" {
        "msgbatch_"
    } else {
        "batch_"
    };
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

async fn insert(
    app: &App,
    key: Option<&Key>,
    (id, dialect): (&str, &str),
    (file_id, total): (&str, usize),
    window: &str,
    metadata: Option<Value>,
) -> Result<BatchRow, ApiError> {
    let files = files::of(app)?;
    let expires = Utc::now()
        + chrono::Duration::from_std(window_of(window)?).unwrap_or(chrono::Duration::hours(24));
    let row: BatchRow = sqlx::query_as(&format!(
        "INSERT INTO serve_batches (id, tenant, key_id, dialect, endpoint, input_file_id,
             completion_window, metadata, status, expires_at, queue, total, in_progress_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $12, $9, $10, $11,
             CASE WHEN $12 = 'in_progress' THEN now() END)
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(key.map(|k| k.tenant.as_str()))
    .bind(key.map(|k| k.id.as_str()))
    .bind(dialect)
    .bind(if dialect == "anthropic" {
        "/v1/messages"
    } else {
        batch_file::OPENAI_CHAT
    })
    .bind(file_id)
    .bind(window)
    .bind(metadata)
    .bind(expires)
    .bind(&app.serve.queue)
    .bind(i32::try_from(total).unwrap_or(i32::MAX))
    // A Message Batch's body was checked whole as it came: no `validating` reads it again.
    .bind(if dialect == "anthropic" {
        "in_progress"
    } else {
        "validating"
    })
    .fetch_one(&files.pool)
    .await
    .map_err(|e| files::stored(&e))?;
    app.batches.notify_one();
    Ok(row)
}

/// OpenAI's limits on `metadata`: 16 pairs, keys of 64 characters, string values of 512.
fn fits_metadata(m: &serde_json::Map<String, Value>) -> bool {
    m.len() <= 16
        && m.iter().all(|(k, v)| {
            k.chars().count() <= 64 && v.as_str().is_some_and(|v| v.chars().count() <= 512)
        })
}

/// `POST /v1/batches`: `{input_file_id, endpoint, completion_window, metadata}`.
pub async fn create(
    State(app): AppState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = async {
        let key = task::caller(&app, &headers)?;
        task::admit(&app, key.as_ref()).await?;
        let mut body = task::body(body)?;
        let text = |body: &mut serde_json::Map<String, Value>, name: &str| match body.remove(name) {
            Some(Value::String(s)) => Ok(s),
            _ => Err(ApiError::bad(
                Some(name),
                format!("`{name}` is required, a string"),
            )),
        };
        let file_id = text(&mut body, "input_file_id")?;
        let endpoint = text(&mut body, "endpoint")?;
        if endpoint != batch_file::OPENAI_CHAT {
            return Err(ApiError::bad(
                Some("endpoint"),
                format!(
                    "llmq runs batches of {} only, not {}",
                    batch_file::OPENAI_CHAT,
                    Value::from(llmq_shared::text::excerpt(&endpoint, 60))
                ),
            ));
        }
        let window = text(&mut body, "completion_window")?;
        let metadata = match body.remove("metadata") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) if fits_metadata(&m) => Some(Value::Object(m)),
            Some(_) => {
                return Err(ApiError::bad(
                    Some("metadata"),
                    "`metadata` must be an object of up to 16 strings, each key up to 64 \
                     characters and each value up to 512",
                ));
            }
        };
        let tenant = key.as_ref().map(|k| k.tenant.as_str());
        let file = files::of(&app)?
            .get(tenant, &file_id)
            .await
            .map_err(|e| files::stored(&e))?
            .ok_or_else(|| {
                ApiError::bad(
                    Some("input_file_id"),
                    format!(
                        "No such File object: {}",
                        Value::from(llmq_shared::text::excerpt(&file_id, 80))
                    ),
                )
            })?;
        if file.purpose != "batch" {
            return Err(ApiError::bad(
                Some("input_file_id"),
                "The file was not uploaded with purpose \"batch\"",
            ));
        }
        let id = new_id("openai");
        let row = insert(
            &app,
            key.as_ref(),
            (&id, "openai"),
            (&file.id, 0),
            &window,
            metadata,
        )
        .await?;
        Ok(axum::Json(row.openai()).into_response())
    }
    .await;
    task::respond("/v1/batches", Dialect::OpenAi, answer)
}

/// `POST /v1/messages/batches`: `{"requests": [{custom_id, params}, ...]}`, streamed into a
/// file and checked whole before anything is enqueued (a bad request refuses the batch,
/// naming it).
pub async fn create_messages(
    State(app): AppState,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let answer = async {
        let key = task::caller(&app, &headers)?;
        task::admit(&app, key.as_ref()).await?;
        let files = files::of(&app)?;
        let tenant = key.as_ref().map(|k| k.tenant.as_str());
        let mut w = files
            .create(tenant, "message_batch", "requests.json")
            .await
            .map_err(|e| files::stored(&e))?;
        let mut stream = body.into_data_stream();
        let mut size = 0usize;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    w.abandon().await;
                    return Err(ApiError::bad(None, format!("The body was cut short: {e}")));
                }
            };
            size += chunk.len();
            if size > MAX_ANTHROPIC_BODY {
                w.abandon().await;
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "The body is over {} MB, the most a batch may be",
                        MAX_ANTHROPIC_BODY / 1024 / 1024
                    ),
                ));
            }
            w.write(&chunk).await.map_err(|e| files::stored(&e))?;
        }
        // Not yet whole (a caller gone while it is checked leaves it to the sweep).
        let file = w.close().await.map_err(|e| files::stored(&e))?;
        let id = new_id("anthropic");
        let checked = read(
            &app,
            files,
            &file.id,
            "the body",
            Shape::Anthropic,
            key.as_ref(),
            (&id, "24h"),
        )
        .count()
        .await;
        let total = match checked {
            Ok(n) => n,
            Err(e) => {
                let _ = files.delete_any(&file.id).await;
                return Err(e);
            }
        };
        files
            .make_whole(&file.id)
            .await
            .map_err(|e| files::stored(&e))?;
        let row = insert(
            &app,
            key.as_ref(),
            (&id, "anthropic"),
            (&file.id, total),
            "24h",
            None,
        )
        .await?;
        Ok(axum::Json(row.anthropic()).into_response())
    }
    .await;
    task::respond("/v1/messages/batches", Dialect::Anthropic, answer)
}

/// `GET /v1/batches/{id}` and `GET /v1/messages/batches/{id}`.
pub async fn retrieve(
    State(app): AppState,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Path(id): Path<String>,
) -> Response {
    let dialect = dialect_of(&uri);
    let answer = async {
        let key = task::caller(&app, &headers)?;
        let tenant = key.as_ref().map(|k| k.tenant.as_str());
        let row = find(&app, name(dialect), tenant, &id).await?;
        Ok(axum::Json(row.object()).into_response())
    }
    .await;
    task::respond("/v1/batches/{id}", dialect, answer)
}

/// Whose API a batch route is: Anthropic's under `/v1/messages/`.
fn dialect_of(uri: &axum::http::Uri) -> Dialect {
    if uri.path().starts_with("/v1/messages/") {
        Dialect::Anthropic
    } else {
        Dialect::OpenAi
    }
}

fn name(d: Dialect) -> &'static str {
    match d {
        Dialect::OpenAi => "openai",
        Dialect::Anthropic => "anthropic",
    }
}

/// `POST /v1/batches/{id}/cancel` and `POST /v1/messages/batches/{id}/cancel`.
pub async fn cancel(
    State(app): AppState,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Path(id): Path<String>,
) -> Response {
    let dialect = dialect_of(&uri);
    let answer = async {
        let key = task::caller(&app, &headers)?;
        let tenant = key.as_ref().map(|k| k.tenant.as_str());
        let files = files::of(&app)?;
        let row = find(&app, name(dialect), tenant, &id).await?;
        if !row.open() {
            return Err(ApiError::bad(
                None,
                format!(
                    "The batch has ended ({}); there is nothing to cancel",
                    row.status
                ),
            ));
        }
        let row: BatchRow = sqlx::query_as(&format!(
            "UPDATE serve_batches SET status = 'cancelling', cancelling_at = now()
             WHERE id = $1 AND status IN ('validating', 'in_progress', 'finalizing',
                 'cancelling')
             RETURNING {COLUMNS}"
        ))
        .bind(&id)
        .fetch_optional(&files.pool)
        .await
        .map_err(|e| files::stored(&e))?
        .unwrap_or(row);
        // Its queued tasks never run, its calls in flight are dropped: the driver then
        // finds them ended and ends the batch.
        mark_cancelled(&app, &id).await;
        app.batches.notify_one();
        Ok(axum::Json(row.object()).into_response())
    }
    .await;
    task::respond("/v1/batches/{id}/cancel", dialect, answer)
}

/// Sets batch `id`'s cancel mark; a failure is logged (the driver sets it again).
async fn mark_cancelled(app: &App, id: &str) {
    let target = [llmq_shared::queue::Target::Batch(id.to_owned())];
    if let Err(e) = app.serve.redis.cancel(&app.keys, &target).await {
        tracing::warn!(batch = id, "cannot mark the batch's tasks cancelled: {e}");
    }
}

#[derive(serde::Deserialize)]
pub struct Paging {
    after: Option<String>,
    after_id: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/batches` (OpenAI's cursor, `after`) and `GET /v1/messages/batches`
/// (Anthropic's, `after_id`): the caller's batches, newest first.
pub async fn list(
    State(app): AppState,
    headers: HeaderMap,
    uri: axum::http::Uri,
    q: Query<Paging>,
) -> Response {
    let dialect = dialect_of(&uri);
    let answer = async {
        let key = task::caller(&app, &headers)?;
        let tenant = key.as_ref().map(|k| k.tenant.as_str());
        let limit = q.limit.unwrap_or(20).clamp(1, 100);
        let after = q.after.as_deref().or(q.after_id.as_deref());
        let rows: Vec<BatchRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM serve_batches
             WHERE tenant IS NOT DISTINCT FROM $1 AND dialect = $2 AND queue = $5
               AND ($3::text IS NULL OR (created_at, id) < (
                   SELECT created_at, id FROM serve_batches
                   WHERE id = $3 AND tenant IS NOT DISTINCT FROM $1))
             ORDER BY created_at DESC, id DESC LIMIT $4"
        ))
        .bind(tenant)
        .bind(name(dialect))
        .bind(after)
        .bind(limit + 1)
        .bind(&app.serve.queue)
        .fetch_all(&files::of(&app)?.pool)
        .await
        .map_err(|e| files::stored(&e))?;
        let data: Vec<Value> = rows.iter().map(BatchRow::object).collect();
        let body = match dialect {
            Dialect::OpenAi => files::page(data, limit),
            Dialect::Anthropic => {
                let mut p = files::page(data, limit);
                json!({"data": p["data"].take(), "has_more": p["has_more"],
                    "first_id": p["first_id"], "last_id": p["last_id"]})
            }
        };
        Ok(axum::Json(body).into_response())
    }
    .await;
    task::respond("/v1/batches", dialect, answer)
}

/// `GET /v1/messages/batches/{id}/results`: the results as JSON Lines, once it has ended.
pub async fn results(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let answer = async {
        let key = task::caller(&app, &headers)?;
        let tenant = key.as_ref().map(|k| k.tenant.as_str());
        let files = files::of(&app)?;
        let row = find(&app, "anthropic", tenant, &id).await?;
        let Some(out) = &row.output_file_id else {
            return Err(ApiError::bad(
                None,
                "The batch is still processing; its results come when it has ended",
            ));
        };
        let file = files
            .get(tenant, out)
            .await
            .map_err(|e| files::stored(&e))?
            .ok_or_else(|| no_batch(&id))?;
        Ok(files::download(files.clone(), file.id, file.bytes))
    }
    .await;
    task::respond(
        "/v1/messages/batches/{id}/results",
        Dialect::Anthropic,
        answer,
    )
}

/// A batch's requests read from its input file, each made the task a worker takes.
struct Lines<'a> {
    app: &'a App,
    rx: tokio::sync::mpsc::Receiver<
        Result<(crate::batch_input::At, batch_file::BatchTask), String>,
    >,
    key: Option<&'a Key>,
    batch_id: &'a str,
    window: &'a str,
    /// The tasks' ids so far (each made of its `custom_id`): a repeated one is refused.
    seen: HashSet<uuid::Uuid>,
}

/// One request of a batch: its `custom_id` and its task, or why it cannot run.
type Line = (String, Result<Envelope, String>);

fn read<'a>(
    app: &'a App,
    files: &Files,
    file_id: &str,
    what: &str,
    shape: Shape,
    key: Option<&'a Key>,
    batch: (&'a str, &'a str),
) -> Lines<'a> {
    let mut reader = Reader::quiet();
    let rx = crate::batch_input::read_from(
        what.to_owned(),
        files.reader(file_id),
        move |record: Value| {
            // As Anthropic's own API (and /v1/messages) requires it.
            if shape == Shape::Anthropic
                && record
                    .pointer("/params/max_tokens")
                    .is_none_or(Value::is_null)
            {
                return Err("`params.max_tokens`: Field required".into());
            }
            let t = reader.task(record)?;
            if reader.shape() != shape {
                return Err(match shape {
                    Shape::Anthropic => "each request must be `{custom_id, params}`".into(),
                    _ => "each line must be `{custom_id, method, url, body}`".into(),
                });
            }
            Ok(t)
        },
    );
    Lines {
        app,
        rx,
        key,
        batch_id: batch.0,
        window: batch.1,
        seen: HashSet::new(),
    }
}

impl Lines<'_> {
    /// The next request; `Err` when the file cannot be read on (a sentence naming where).
    async fn next(&mut self) -> Option<Result<Line, String>> {
        let (at, t) = match self.rx.recv().await? {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        let custom = t.custom_id.clone().unwrap_or_else(|| at.key());
        if self.seen.len() == MAX_REQUESTS {
            return Some(Err(format!(
                "{at}: a batch holds {MAX_REQUESTS} requests at most; split the file"
            )));
        }
        if custom.len() > MAX_CUSTOM_ID {
            return Some(Ok((
                llmq_shared::text::excerpt(&custom, 40),
                Err(format!(
                    "{at}: the custom_id is over {MAX_CUSTOM_ID} bytes; give a shorter one"
                )),
            )));
        }
        let id = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!(
                "llmq-serve-batch:{}:{}:{custom}",
                self.app.serve.queue, self.batch_id
            )
            .as_bytes(),
        );
        if !self.seen.insert(id) {
            return Some(Ok((
                custom,
                Err(format!(
                    "{at}: the custom_id is used by an earlier request; each must be unique"
                )),
            )));
        }
        let env = task::ask(self.app, self.key, &HeaderMap::new(), t)
            .and_then(|ask| {
                let mut env = ask.env;
                env.id = Some(TaskId::from_uuid(id));
                env.idempotency_key = Some(format!("{}:{custom}", self.batch_id).into());
                env.batch_id = Some(self.batch_id.into());
                env.deadline = Some(self.window.into());
                env.traceparent = None;
                task::check(&env)?;
                Ok(env)
            })
            .map_err(|e| format!("{at}: {}", e.message));
        Some(Ok((custom, env)))
    }

    /// Reads them all: how many, or the first fault as an error naming it.
    async fn count(mut self) -> Result<usize, ApiError> {
        let mut n = 0;
        while let Some(line) = self.next().await {
            let (_, env) = line.map_err(|e| ApiError::bad(Some("requests"), e))?;
            env.map_err(|e| ApiError::bad(Some("requests"), e))?;
            n += 1;
        }
        if n == 0 {
            return Err(ApiError::bad(
                Some("requests"),
                "The batch holds no requests",
            ));
        }
        Ok(n)
    }
}

/// The most batches one replica reads at once (checking and enqueuing their requests), and
/// the most it drives in all (most of them waiting on their tasks, which costs a Postgres
/// update a second each); others wait for a replica with room.
const MAX_READING: usize = 4;
const MAX_DRIVEN: usize = 64;

/// Drives the batches of every replica: takes each open batch whose lease is free (up to
/// [`MAX_DRIVEN`] at once, [`MAX_READING`] of them reading their input, so that a batch
/// waiting hours on its tasks keeps no other from starting) and runs it on a task of its
/// own, until `stop`, when each gives
/// its lease back. A run that fails keeps its lease for twice as long each time, so the
/// batch is tried again later (by any replica), not in a loop, and fails after
/// [`MAX_FAILED_RUNS`] such runs.
pub async fn drive(app: Arc<App>) {
    let Some(files) = app.files.clone() else {
        return;
    };
    let me = format!("serve-{}", uuid::Uuid::new_v4().simple());
    let mut swept = std::time::Instant::now();
    let _ = files.sweep().await;
    let mut running: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
    let running_ids = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let reading = Arc::new(tokio::sync::Semaphore::new(MAX_READING));
    loop {
        while running.try_join_next().is_some() {}
        while running.len() < MAX_DRIVEN {
            let Ok(permit) = Arc::clone(&reading).try_acquire_owned() else {
                break;
            };
            let b = match claim(&app, &files, &me).await {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("cannot read the batches: {e}");
                    break;
                }
            };
            let ids = Arc::clone(&running_ids);
            if !lock(&ids).insert(b.id.clone()) {
                // Its lease lapsed while this replica still runs it: leave it be.
                continue;
            }
            let (app, files, me) = (Arc::clone(&app), files.clone(), me.clone());
            running.spawn(async move {
                let id = b.id.clone();
                // Forgets the batch however its run ends, a panic included.
                let _forget = Forget(ids, id.clone());
                let outcome = tokio::select! {
                    r = run(&app, &files, &me, b, permit) => r,
                    () = app.stop.cancelled() => Err(STOPPING.into()),
                };
                match outcome {
                    Ok(()) => release(&files, &id, &me).await,
                    Err(e) if e == STOPPING => release(&files, &id, &me).await,
                    Err(e) => {
                        tracing::warn!(
                            batch = id,
                            "the batch stopped: {e}; it is tried again later"
                        );
                        failed_run(&app, &files, &id, &me, &e).await;
                    }
                }
            });
        }
        if swept.elapsed() > Duration::from_secs(600) {
            swept = std::time::Instant::now();
            let _ = files.sweep().await;
        }
        tokio::select! {
            () = app.stop.cancelled() => break,
            () = app.batches.notified() => {}
            () = tokio::time::sleep(KEEP) => {}
        }
    }
    // Each run gives its lease back as it stops.
    while running.join_next().await.is_some() {}
}

const STOPPING: &str = "the server is stopping";

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes a batch out of the replica's running set when dropped.
struct Forget(Arc<std::sync::Mutex<HashSet<String>>>, String);

impl Drop for Forget {
    fn drop(&mut self) {
        lock(&self.0).remove(&self.1);
    }
}

/// Takes the oldest open batch of `app`'s queue whose lease is free.
async fn claim(app: &App, files: &Files, me: &str) -> sqlx::Result<Option<BatchRow>> {
    sqlx::query_as(&format!(
        "UPDATE serve_batches SET holder = $1, held_until = now() + $2 * interval '1 second'
         WHERE id = (
             SELECT id FROM serve_batches
             WHERE queue = $3
               AND status IN ('validating', 'in_progress', 'finalizing', 'cancelling')
               AND (held_until IS NULL OR held_until < now())
             ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING {COLUMNS}"
    ))
    .bind(me)
    .bind(app.serve.batch_lease.as_secs_f64())
    .bind(&app.serve.queue)
    .fetch_optional(&files.pool)
    .await
}

/// Counts a failed run of batch `id`, and why, and holds the batch twice as long as the
/// last time (the lease the first time, an hour at most) before it is tried again.
async fn failed_run(app: &App, files: &Files, id: &str, me: &str, error: &str) {
    let _ = sqlx::query(
        "UPDATE serve_batches SET failed_runs = failed_runs + 1, last_run_error = $3,
             held_until = now() + least($4 * power(2, failed_runs), 3600) * interval '1 second'
         WHERE id = $1 AND holder = $2",
    )
    .bind(id)
    .bind(me)
    .bind(error)
    .bind(app.serve.batch_lease.as_secs_f64())
    .execute(&files.pool)
    .await;
}

async fn release(files: &Files, id: &str, me: &str) {
    let _ = sqlx::query(
        "UPDATE serve_batches SET holder = NULL, held_until = NULL WHERE id = $1 AND holder = $2",
    )
    .bind(id)
    .bind(me)
    .execute(&files.pool)
    .await;
}

/// A batch being driven by this server, which holds its lease.
struct Driver<'a> {
    app: &'a App,
    files: &'a Files,
    /// This server's name as a lease holder.
    me: &'a str,
    b: BatchRow,
    /// The key that made it, whose models and priority its requests are held to.
    key: Option<Key>,
}

/// What a batch's run knows of its requests: each one's task id and `custom_id`, in order;
/// how many went into the queue; whether it was cancelled, or expired before all went in
/// (the rest never go: they end expired).
struct Plan {
    ids: Vec<TaskId>,
    customs: Vec<String>,
    enqueued: usize,
    cancelled: bool,
    expired: bool,
}

const LOST: &str = "its lease was taken over";

/// Runs batch `b` from where it stands to its end.
/// `reading` is held while it reads its input, and let go before it waits on its tasks.
async fn run(
    app: &App,
    files: &Files,
    me: &str,
    b: BatchRow,
    reading: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), String> {
    let key = match (&b.key_id, &app.serve.keys) {
        (Some(id), Some(keys)) => match keys.by_id(id) {
            Some(k) => Some(k),
            None => {
                let e = json!([{"code": "invalid_api_key", "message":
                    "The key that made this batch was revoked", "param": null, "line": null}]);
                let d = Driver {
                    app,
                    files,
                    me,
                    b,
                    key: None,
                };
                return d.fail(e).await;
            }
        },
        _ => None,
    };
    let mut d = Driver {
        app,
        files,
        me,
        b,
        key,
    };
    if d.b.failed_runs >= MAX_FAILED_RUNS {
        let why = d.b.last_run_error.as_deref().unwrap_or("unknown");
        let message = format!(
            "The batch was given up after {} runs that failed; the last one: {why}. Requests \
             it had already queued may still run.",
            d.b.failed_runs
        );
        return d
            .fail(
                json!([{"code": "batch_failed", "message": message, "param": null, "line": null}]),
            )
            .await;
    }
    // A file gone would read as empty: fail, rather than end the batch with no requests.
    let tenant = d.b.tenant.as_deref();
    if files
        .get(tenant, &d.b.input_file_id)
        .await
        .map_err(|e| e.to_string())?
        .is_none()
    {
        let message = format!("The input file {} is gone", d.b.input_file_id);
        return d
            .fail(
                json!([{"code": "file_gone", "message": message, "param": "input_file_id",
                "line": null}]),
            )
            .await;
    }
    if d.b.status == "cancelling" && d.b.in_progress_at.is_none() {
        // Cancelled before its requests were read: none ran.
        return d.end_unread().await;
    }
    if d.b.status == "validating" && !d.validate().await? {
        return Ok(());
    }
    let mut plan = d.enqueue().await?;
    drop(reading);
    d.wait(&mut plan).await?;
    d.finish(&plan).await
}

impl Driver<'_> {
    fn queue(&self) -> llmq_shared::keys::QueueKeys {
        llmq_shared::keys::QueueKeys::new(&self.app.serve.queue)
    }

    /// The batch's requests, read from its input file.
    fn lines(&self) -> Lines<'_> {
        read(
            self.app,
            self.files,
            &self.b.input_file_id,
            "the input file",
            self.b.shape(),
            self.key.as_ref(),
            (&self.b.id, &self.b.completion_window),
        )
    }

    /// Keeps the lease and writes `finished` as the progress; the batch's status now.
    ///
    /// # Errors
    /// The lease was lost, or Postgres failed.
    async fn keep(&self, finished: u64) -> Result<String, String> {
        sqlx::query_scalar(
            "UPDATE serve_batches SET held_until = now() + $3 * interval '1 second',
                 completed = GREATEST(completed, $4::int)
             WHERE id = $1 AND holder = $2 RETURNING status",
        )
        .bind(&self.b.id)
        .bind(self.me)
        .bind(self.app.serve.batch_lease.as_secs_f64())
        .bind(i32::try_from(finished).unwrap_or(i32::MAX))
        .fetch_optional(&self.files.pool)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| LOST.to_owned())
    }

    /// OpenAI's `validating`: reads every request; any that cannot run fails the batch,
    /// naming each (up to [`MAX_ERRORS`]). Whether the batch goes on.
    async fn validate(&mut self) -> Result<bool, String> {
        let mut lines = self.lines();
        let (mut errors, mut total) = (Vec::new(), 0);
        while let Some(line) = lines.next().await {
            if (total + errors.len()) % CHUNK == CHUNK - 1 {
                self.keep(0).await?;
            }
            match line {
                Ok((_, Ok(_))) => total += 1,
                Ok((_, Err(e))) | Err(e) => {
                    // Each sentence names where: `line <n>: ...`.
                    let line = e
                        .split_once("line ")
                        .and_then(|(_, r)| r.split(':').next())
                        .and_then(|n| n.parse::<u64>().ok());
                    errors.push(json!({"code": "invalid_request", "message": e,
                        "param": null, "line": line}));
                    if errors.len() >= MAX_ERRORS {
                        break;
                    }
                }
            }
        }
        drop(lines);
        if total == 0 && errors.is_empty() {
            errors.push(json!({"code": "empty_file",
                "message": "The input file holds no requests", "param": null, "line": null}));
        }
        if !errors.is_empty() {
            self.fail(Value::from(errors)).await?;
            return Ok(false);
        }
        let moved = sqlx::query(
            "UPDATE serve_batches SET status = 'in_progress', in_progress_at = now(), total = $3
             WHERE id = $1 AND holder = $2 AND status = 'validating'",
        )
        .bind(&self.b.id)
        .bind(self.me)
        .bind(i32::try_from(total).unwrap_or(i32::MAX))
        .execute(&self.files.pool)
        .await
        .map_err(|e| e.to_string())?
        .rows_affected()
            == 1;
        if !moved {
            // Cancelled while it was read (nothing enqueued yet), or the lease was lost.
            return match self.keep(0).await?.as_str() {
                "cancelling" => self.end_unread().await.map(|()| false),
                _ => Err(LOST.into()),
            };
        }
        self.b.status = "in_progress".into();
        Ok(true)
    }

    /// Reads the requests again and enqueues those not yet in (an earlier run's are, as its
    /// progress mark says), a chunk at a time, unless the batch is cancelled or expired.
    /// Keeps the lease every chunk of lines read, enqueued or not.
    async fn enqueue(&self) -> Result<Plan, String> {
        let (redis, queue, id) = (&self.app.serve.redis, self.queue(), &self.b.id);
        let skip = redis
            .batch_progress(&queue, id)
            .await
            .map_err(|e| e.to_string())?;
        let mut lines = self.lines();
        let mut plan = Plan {
            ids: Vec::new(),
            customs: Vec::new(),
            enqueued: 0,
            cancelled: self.b.status == "cancelling",
            expired: Utc::now() >= self.b.expires_at,
        };
        let (mut chunk, mut enqueued) = (Vec::new(), skip);
        let flush = |chunk, enqueued| {
            crate::submit::flush(redis.clone(), queue.clone(), id.clone(), enqueued, chunk)
        };
        while let Some(line) = lines.next().await {
            let (custom, env) = line?;
            let env = env?;
            // Each line's id is set from its custom_id as it is read.
            plan.ids.extend(env.id);
            plan.customs.push(custom);
            if (plan.ids.len() as u64) > skip && !plan.cancelled && !plan.expired {
                chunk.push(env);
            }
            if plan.ids.len().is_multiple_of(CHUNK) {
                if !chunk.is_empty() {
                    enqueued = flush(std::mem::take(&mut chunk), enqueued)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                plan.cancelled = self.keep(0).await? == "cancelling";
                plan.expired = Utc::now() >= self.b.expires_at;
            }
        }
        if !plan.cancelled && !plan.expired {
            enqueued = flush(chunk, enqueued).await.map_err(|e| e.to_string())?;
        }
        plan.enqueued = usize::try_from(enqueued)
            .unwrap_or(usize::MAX)
            .min(plan.ids.len());
        Ok(plan)
    }

    /// Waits for the enqueued tasks to end, or the batch to expire, keeping the lease and
    /// writing the progress meanwhile.
    async fn wait(&self, plan: &mut Plan) -> Result<(), String> {
        let left = (self.b.expires_at - Utc::now())
            .to_std()
            .unwrap_or_default();
        let (tx, mut rx) = tokio::sync::watch::channel(0u64);
        let queue = self.queue();
        let waiting = crate::submit::wait_batch(
            &self.app.serve.redis,
            &queue,
            &self.b.id,
            &plan.ids[..plan.enqueued],
            Some(left),
            move |n| {
                let _ = tx.send(n);
            },
        );
        tokio::pin!(waiting);
        let mut marked = false;
        loop {
            tokio::select! {
                done = &mut waiting => return done.map_err(|e| e.to_string()),
                () = tokio::time::sleep(KEEP) => {
                    let n = *rx.borrow_and_update();
                    plan.cancelled |= self.keep(n).await? == "cancelling";
                    // Cancelled while this replica waits: its tasks are ended (set again,
                    // for the replica that took the cancel may have failed to).
                    if plan.cancelled && !marked {
                        mark_cancelled(self.app, &self.b.id).await;
                        marked = true;
                    }
                }
                () = self.app.stop.cancelled() => return Err(STOPPING.into()),
            }
        }
    }

    async fn end_unread(&self) -> Result<(), String> {
        sqlx::query(
            "UPDATE serve_batches SET status = 'cancelled', cancelled_at = now(),
                 cancelled = total
             WHERE id = $1 AND holder = $2",
        )
        .bind(&self.b.id)
        .bind(self.me)
        .execute(&self.files.pool)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
    }

    async fn fail(&self, errors: Value) -> Result<(), String> {
        sqlx::query(
            "UPDATE serve_batches SET status = 'failed', failed_at = now(), errors = $3
             WHERE id = $1 AND holder = $2",
        )
        .bind(&self.b.id)
        .bind(self.me)
        .bind(errors)
        .execute(&self.files.pool)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
    }

    /// Writes the output and error files (Anthropic's: one results file) and ends the
    /// batch: `completed`, `expired` (a request unfinished) or `cancelled`.
    async fn finish(&self, plan: &Plan) -> Result<(), String> {
        let (b, files) = (&self.b, self.files);
        let db = |e: sqlx::Error| e.to_string();
        sqlx::query(
            "UPDATE serve_batches SET status = CASE WHEN status = 'cancelling' THEN status
                 ELSE 'finalizing' END, finalizing_at = now() WHERE id = $1 AND holder = $2",
        )
        .bind(&b.id)
        .bind(self.me)
        .execute(&files.pool)
        .await
        .map_err(db)?;
        let tenant = b.tenant.as_deref();
        let named = |end: &str| format!("{}_{end}.jsonl", b.id);
        let mut out = files
            .create(tenant, "batch_output", &named("output"))
            .await
            .map_err(db)?;
        let mut err = files
            .create(tenant, "batch_output", &named("error"))
            .await
            .map_err(db)?;
        let anthropic = b.shape() == Shape::Anthropic;
        let (mut ok, mut failed, mut gone, mut expired) = (0i32, 0i32, 0i32, 0i32);
        for (n, chunk) in plan.ids.chunks(CHUNK).enumerate() {
            if n > 0 {
                self.keep(0).await?;
            }
            let records = self
                .app
                .serve
                .redis
                .results(&self.queue(), chunk)
                .await
                .map_err(|e| e.to_string())?;
            for (i, (record, &id)) in records.into_iter().zip(chunk).enumerate() {
                let at = n * CHUNK + i;
                let r = record.unwrap_or_else(|| {
                    // Never enqueued: cancelled, unless the batch expired first.
                    let never_in = at >= plan.enqueued;
                    let s = if never_in && plan.cancelled {
                        Status::Cancelled
                    } else {
                        Status::Queued
                    };
                    TaskRecord::pending(id, &self.app.serve.queue, s)
                });
                match r.status {
                    Status::Succeeded => ok += 1,
                    Status::Cancelled => gone += 1,
                    s if !s.is_final() => expired += 1,
                    _ => failed += 1,
                }
                let line = batch_file::result_line(b.shape(), &plan.customs[at], &r);
                let to = if r.status == Status::Succeeded || anthropic {
                    &mut out
                } else {
                    &mut err
                };
                to.write(format!("{line}\n").as_bytes()).await.map_err(db)?;
            }
        }
        let all_ok = usize::try_from(ok).unwrap_or(0) == plan.ids.len();
        let out_any = ok > 0 || (anthropic && !plan.ids.is_empty());
        let err_any = !anthropic && !all_ok;
        let status = if plan.cancelled {
            "cancelled"
        } else if expired > 0 {
            "expired"
        } else {
            "completed"
        };
        // The files are whole and the batch ends in one transaction, only while this server
        // holds the lease: one that lost it leaves nothing behind.
        let (out, err) = (
            out.close().await.map_err(db)?,
            err.close().await.map_err(db)?,
        );
        let mut tx = files.pool.begin().await.map_err(db)?;
        let ended = sqlx::query(&format!(
            "UPDATE serve_batches SET status = $3, output_file_id = $4, error_file_id = $5,
                 completed = $6, failed = $7, cancelled = $8, expired = $9, {status}_at = now(),
                 total = GREATEST(total, $10)
             WHERE id = $1 AND holder = $2"
        ))
        .bind(&b.id)
        .bind(self.me)
        .bind(status)
        .bind(out_any.then_some(&out.id))
        .bind(err_any.then_some(&err.id))
        .bind(ok)
        .bind(failed)
        .bind(gone)
        .bind(expired)
        .bind(i32::try_from(plan.ids.len()).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected()
            == 1;
        for (f, any) in [(&out, out_any), (&err, err_any)] {
            let q = if ended && any {
                "UPDATE serve_files SET complete = true WHERE id = $1"
            } else {
                "DELETE FROM serve_files WHERE id = $1"
            };
            sqlx::query(q)
                .bind(&f.id)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        if !ended {
            return Err(LOST.into());
        }
        Ok(())
    }
}

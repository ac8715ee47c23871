//! OpenAI's Files API (`POST /v1/files`, `GET /v1/files`, `GET /v1/files/{id}`,
//! `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`), over files kept in Postgres where
//! every replica of `llmq serve` reads them and a restart keeps them. A file is written and
//! read a part (1 MiB) at a time: an upload streams from the request into parts, a download
//! from parts into the response, and a batch reads its input the same way, so a 200 MB file
//! never sits whole in memory. A file belongs to the tenant of the key that made it; another
//! tenant's is not found.

use std::io::Read;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;

use super::task::{self, ApiError, Dialect};
use super::{App, AppState};

/// The bytes of one stored part.
pub const PART: usize = 1 << 20;
/// The largest file taken (OpenAI's limit for a batch's input).
pub const MAX_FILE: usize = 200 * 1024 * 1024;

/// A file as its row holds it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FileRow {
    pub id: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    pub created_at: DateTime<Utc>,
}

impl FileRow {
    /// OpenAI's file object.
    pub fn object(&self) -> Value {
        json!({
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at.timestamp(),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": null,
            "expires_at": null,
        })
    }
}

/// The files table, as the server and the batches read and write it.
#[derive(Debug, Clone)]
pub struct Files {
    pub pool: PgPool,
}

/// A file being written, a part at a time; not listed or found until [`Writer::finish`].
pub struct Writer {
    files: Files,
    pub id: String,
    buf: Vec<u8>,
    seq: i32,
    bytes: i64,
}

impl Writer {
    /// Adds `data`, storing each part as it fills.
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn write(&mut self, mut data: &[u8]) -> sqlx::Result<()> {
        while !data.is_empty() {
            let room = PART - self.buf.len();
            let (now, rest) = data.split_at(room.min(data.len()));
            self.buf.extend_from_slice(now);
            data = rest;
            if self.buf.len() == PART {
                self.store().await?;
            }
        }
        Ok(())
    }

    async fn store(&mut self) -> sqlx::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        sqlx::query("INSERT INTO serve_file_parts (file_id, seq, data) VALUES ($1, $2, $3)")
            .bind(&self.id)
            .bind(self.seq)
            .bind(&self.buf)
            .execute(&self.files.pool)
            .await?;
        self.seq += 1;
        self.bytes += self.buf.len() as i64;
        self.buf.clear();
        Ok(())
    }

    /// Stores the last part and makes the file visible, with `purpose` (known only now
    /// when the upload names it after the file).
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn finish(mut self, purpose: &str) -> sqlx::Result<FileRow> {
        self.store().await?;
        sqlx::query_as(
            "UPDATE serve_files SET complete = true, bytes = $2, purpose = $3 WHERE id = $1
             RETURNING id, purpose, filename, bytes, created_at",
        )
        .bind(&self.id)
        .bind(self.bytes)
        .bind(purpose)
        .fetch_one(&self.files.pool)
        .await
    }

    /// Stores the last part and sizes the file, leaving it unfinished (not listed or
    /// found): the caller makes it whole (`complete`) in a transaction of its own.
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn close(mut self) -> sqlx::Result<Closed> {
        self.store().await?;
        sqlx::query("UPDATE serve_files SET bytes = $2 WHERE id = $1")
            .bind(&self.id)
            .bind(self.bytes)
            .execute(&self.files.pool)
            .await?;
        Ok(Closed { id: self.id })
    }

    /// Drops what was written.
    pub async fn abandon(self) {
        let _ = self.files.delete_any(&self.id).await;
    }
}

/// A file written whole but not yet visible.
pub struct Closed {
    pub id: String,
}

impl Files {
    /// Starts file `filename` for `tenant`.
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn create(
        &self,
        tenant: Option<&str>,
        purpose: &str,
        filename: &str,
    ) -> sqlx::Result<Writer> {
        let id = format!("file-{}", uuid::Uuid::new_v4().simple());
        sqlx::query(
            "INSERT INTO serve_files (id, tenant, purpose, filename) VALUES ($1, $2, $3, $4)",
        )
        .bind(&id)
        .bind(tenant)
        .bind(purpose)
        .bind(filename)
        .execute(&self.pool)
        .await?;
        Ok(Writer {
            files: self.clone(),
            id,
            buf: Vec::with_capacity(PART),
            seq: 0,
            bytes: 0,
        })
    }

    /// File `id` of `tenant`, if it is whole.
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn get(&self, tenant: Option<&str>, id: &str) -> sqlx::Result<Option<FileRow>> {
        sqlx::query_as(
            "SELECT id, purpose, filename, bytes, created_at FROM serve_files
             WHERE id = $1 AND tenant IS NOT DISTINCT FROM $2 AND complete",
        )
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await
    }

    /// `tenant`'s files, newest first, after `after` (a file id), `limit` of them.
    async fn list(
        &self,
        tenant: Option<&str>,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> sqlx::Result<Vec<FileRow>> {
        sqlx::query_as(
            "SELECT id, purpose, filename, bytes, created_at FROM serve_files f
             WHERE tenant IS NOT DISTINCT FROM $1 AND complete
               AND ($2::text IS NULL OR purpose = $2)
               AND ($3::text IS NULL OR (created_at, id) < (
                   SELECT created_at, id FROM serve_files
                   WHERE id = $3 AND tenant IS NOT DISTINCT FROM $1))
             ORDER BY created_at DESC, id DESC LIMIT $4",
        )
        .bind(tenant)
        .bind(purpose)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    /// Deletes file `id` of `tenant`; whether there was one.
    /// Deletes `tenant`'s file `id`, unless a batch not yet ended reads it (which reads its
    /// input again when another replica takes it over). Whether it was deleted, and the
    /// batch that reads it (only of `tenant`'s own file).
    async fn delete(&self, tenant: Option<&str>, id: &str) -> sqlx::Result<(bool, Option<String>)> {
        let (gone, busy): (Option<String>, Option<String>) = sqlx::query_as(
            "WITH busy AS (
                 SELECT b.id FROM serve_batches b JOIN serve_files f ON f.id = b.input_file_id
                 WHERE b.input_file_id = $1 AND f.tenant IS NOT DISTINCT FROM $2 AND f.complete
                   AND b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')
                 LIMIT 1),
             gone AS (
                 DELETE FROM serve_files
                 WHERE id = $1 AND tenant IS NOT DISTINCT FROM $2 AND complete
                   AND NOT EXISTS (SELECT 1 FROM busy)
                 RETURNING id)
             SELECT (SELECT id FROM gone), (SELECT id FROM busy)",
        )
        .bind(id)
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?;
        Ok((gone.is_some(), busy))
    }

    /// Makes closed file `id` whole: listed and found.
    ///
    /// # Errors
    /// Postgres fails.
    pub(super) async fn make_whole(&self, id: &str) -> sqlx::Result<()> {
        sqlx::query("UPDATE serve_files SET complete = true WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map(drop)
    }

    /// Deletes file `id`, whoever's it is and whether or not it is whole.
    ///
    /// # Errors
    /// Postgres fails.
    pub(super) async fn delete_any(&self, id: &str) -> sqlx::Result<()> {
        sqlx::query("DELETE FROM serve_files WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map(drop)
    }

    /// Part `seq` of file `id`, `None` past its end.
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn part(&self, id: &str, seq: i32) -> sqlx::Result<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT data FROM serve_file_parts WHERE file_id = $1 AND seq = $2")
            .bind(id)
            .bind(seq)
            .fetch_optional(&self.pool)
            .await
    }

    /// File `id` read as a blocking [`Read`] (for the batch reader's thread), its parts
    /// fetched one ahead by a task of this runtime.
    pub fn reader(&self, id: &str) -> impl Read + Send + 'static {
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(1);
        let (files, id) = (self.clone(), id.to_owned());
        tokio::spawn(async move {
            for seq in 0.. {
                let part = match files.part(&id, seq).await {
                    Ok(Some(p)) => Ok(p),
                    Ok(None) => return,
                    Err(e) => Err(std::io::Error::other(e)),
                };
                let failed = part.is_err();
                if tx.send(part).await.is_err() || failed {
                    return;
                }
            }
        });
        PartsReader {
            rx,
            part: Vec::new(),
            at: 0,
        }
    }

    /// Deletes files left unfinished an hour ago (an upload or a batch's output whose
    /// server died while it wrote).
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn sweep(&self) -> sqlx::Result<()> {
        sqlx::query(
            "DELETE FROM serve_files WHERE NOT complete AND created_at < now() - interval '1 hour'",
        )
        .execute(&self.pool)
        .await
        .map(drop)
    }
}

struct PartsReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    part: Vec<u8>,
    at: usize,
}

impl Read for PartsReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.part.len() {
            match self.rx.blocking_recv() {
                Some(part) => (self.part, self.at) = (part?, 0),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.part.len() - self.at);
        buf[..n].copy_from_slice(&self.part[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The server's files, or 404 when it keeps none (no `--database-url`).
pub fn of(app: &App) -> Result<&Files, ApiError> {
    app.files.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "This server keeps no files or batches: start llmq serve with --database-url \
             (or DATABASE_URL)",
        )
    })
}

pub fn stored(e: &sqlx::Error) -> ApiError {
    tracing::warn!("the files table failed: {e}");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "The file store cannot answer now; try again",
    )
}

fn no_file(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "No such File object: {}",
            Value::from(llmq_shared::text::excerpt(id, 80))
        ),
    )
}

/// `POST /v1/files`: a multipart upload of `file` with its `purpose` (`batch`).
pub async fn upload(State(app): AppState, headers: HeaderMap, form: Multipart) -> Response {
    let answer = upload_file(&app, &headers, form).await;
    task::respond("/v1/files", Dialect::OpenAi, answer)
}

async fn upload_file(
    app: &Arc<App>,
    headers: &HeaderMap,
    mut form: Multipart,
) -> Result<Response, ApiError> {
    let key = task::caller(app, headers)?;
    task::admit(app, key.as_ref()).await?;
    let files = of(app)?;
    let tenant = key.as_ref().map(|k| k.tenant.as_str());
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "The file is over {} MB, the most a file may be",
                MAX_FILE / 1024 / 1024
            ),
        )
    };
    let unreadable = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_big()
        } else {
            ApiError::bad(None, format!("The upload is not a readable form: {e}"))
        }
    };
    let (mut purpose, mut written) = (None, None);
    let result = async {
        while let Some(mut field) = form.next_field().await.map_err(unreadable)? {
            match field.name() {
                Some("purpose") => {
                    let mut text = Vec::new();
                    while let Some(chunk) = field.chunk().await.map_err(unreadable)? {
                        text.extend_from_slice(&chunk);
                        if text.len() > 64 {
                            return Err(ApiError::bad(Some("purpose"), "`purpose` is \"batch\""));
                        }
                    }
                    purpose = Some(String::from_utf8_lossy(&text).into_owned());
                }
                Some("file") => {
                    let name = field.file_name().unwrap_or("upload.jsonl").to_owned();
                    let w = written.insert(
                        files
                            .create(tenant, "batch", &llmq_shared::text::excerpt(&name, 255))
                            .await
                            .map_err(|e| stored(&e))?,
                    );
                    while let Some(chunk) = field.chunk().await.map_err(unreadable)? {
                        w.write(&chunk).await.map_err(|e| stored(&e))?;
                    }
                }
                _ => {}
            }
        }
        Ok::<_, ApiError>(())
    }
    .await;
    let check = result.and_then(|()| match purpose.as_deref() {
        Some("batch") => Ok(()),
        Some(p) => Err(ApiError::bad(
            Some("purpose"),
            format!(
                "llmq keeps files for batches: `purpose` must be \"batch\", not {}",
                Value::from(llmq_shared::text::excerpt(p, 40))
            ),
        )),
        None => Err(ApiError::bad(
            Some("purpose"),
            "`purpose` is required: \"batch\"",
        )),
    });
    let Some(w) = written else {
        check?;
        return Err(ApiError::bad(
            Some("file"),
            "`file` is required: the batch's JSON Lines",
        ));
    };
    if let Err(e) = check {
        w.abandon().await;
        return Err(e);
    }
    let row = w.finish("batch").await.map_err(|e| stored(&e))?;
    Ok(axum::Json(row.object()).into_response())
}

#[derive(serde::Deserialize)]
pub struct Paging {
    after: Option<String>,
    limit: Option<i64>,
    purpose: Option<String>,
}

/// `GET /v1/files`: the caller's files, newest first, paged by `after` and `limit`.
pub async fn list(State(app): AppState, headers: HeaderMap, q: Query<Paging>) -> Response {
    let answer = async {
        let key = task::caller(&app, &headers)?;
        let tenant = key.as_ref().map(|k| k.tenant.as_str());
        let limit = q.limit.unwrap_or(10_000).clamp(1, 10_000);
        let rows = of(&app)?
            .list(tenant, q.purpose.as_deref(), q.after.as_deref(), limit + 1)
            .await
            .map_err(|e| stored(&e))?;
        Ok(axum::Json(page(rows.iter().map(FileRow::object).collect(), limit)).into_response())
    }
    .await;
    task::respond("/v1/files", Dialect::OpenAi, answer)
}

/// A list page of `limit` of `data` (which holds one more when there are more).
pub fn page(mut data: Vec<Value>, limit: i64) -> Value {
    let has_more = data.len() as i64 > limit;
    data.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    json!({
        "object": "list",
        "first_id": data.first().map(|o| o["id"].clone()),
        "last_id": data.last().map(|o| o["id"].clone()),
        "has_more": has_more,
        "data": data,
    })
}

/// `GET /v1/files/{id}`.
pub async fn retrieve(
    State(app): AppState,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let answer = async {
        let key = task::caller(&app, &headers)?;
        let tenant = key.as_ref().map(|k| k.tenant.as_str());
        let row = of(&app)?
            .get(tenant, &id)
            .await
            .map_err(|e| stored(&e))?
            .ok_or_else(|| no_file(&id))?;
        Ok(axum::Json(row.object()).into_response())
    }
    .await;
    task::respond("/v1/files/{id}", Dialect::OpenAi, answer)
}

/// `DELETE /v1/files/{id}`.
pub async fn delete(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let answer = async {
        let key = task::caller(&app, &headers)?;
        let tenant = key.as_ref().map(|k| k.tenant.as_str());
        match of(&app)?
            .delete(tenant, &id)
            .await
            .map_err(|e| stored(&e))?
        {
            (true, _) => {}
            (false, Some(batch)) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "The file {} is the input of batch {batch}, which has not ended: \
                         cancel the batch or wait for its end before deleting the file",
                        Value::from(llmq_shared::text::excerpt(&id, 80))
                    ),
                ));
            }
            (false, _) => return Err(no_file(&id)),
        }
        Ok(axum::Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
    }
    .await;
    task::respond("/v1/files/{id}", Dialect::OpenAi, answer)
}

/// `GET /v1/files/{id}/content`: the file's bytes, streamed a part at a time.
pub async fn content(State(app): AppState, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let answer = async {
        let key = task::caller(&app, &headers)?;
        let tenant = key.as_ref().map(|k| k.tenant.as_str());
        let files = of(&app)?.clone();
        let row = files
            .get(tenant, &id)
            .await
            .map_err(|e| stored(&e))?
            .ok_or_else(|| no_file(&id))?;
        Ok(download(files, row.id, row.bytes))
    }
    .await;
    task::respond("/v1/files/{id}/content", Dialect::OpenAi, answer)
}

/// File `id`'s bytes as a response body, read a part at a time.
pub fn download(files: Files, id: String, bytes: i64) -> Response {
    let parts = futures_util::stream::unfold((files, id, 0), |(files, id, seq)| async move {
        match files.part(&id, seq).await {
            Ok(Some(p)) => Some((Ok(Bytes::from(p)), (files, id, seq + 1))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e)), (files, id, i32::MAX))),
        }
    });
    let mut r = Body::from_stream(parts).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/jsonl"),
    );
    h.insert(header::CONTENT_LENGTH, header::HeaderValue::from(bytes));
    r
}

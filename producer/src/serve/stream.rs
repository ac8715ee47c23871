//! Following one task for a streamed answer, whatever the API: the live answer's text as the
//! worker writes it, then the final record. Each API turns the [`Piece`]s into its own
//! server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use llmq_shared::ids::TaskId;
use llmq_shared::outcome::{Status, TaskRecord};
use llmq_shared::queue::{Client, OutEntry};
use tokio::sync::mpsc;

use super::App;
use super::task::{self, ApiError};

/// What a streamed task gives, in order: text, then its end.
pub enum Piece {
    Text(String),
    /// It succeeded; `streamed`: its text came as [`Piece::Text`] (else the record's output
    /// is the text, not yet sent).
    End {
        record: Box<TaskRecord>,
        streamed: bool,
    },
    /// It failed, did not finish in time, or its call failed after text was sent.
    Fail(ApiError),
}

/// Follows task `id` for `wait`: its live answer when `live` (the task streams), then its
/// record. Ends when the receiver is dropped (the caller went away).
pub fn follow(
    app: Arc<App>,
    id: TaskId,
    wait: Duration,
    keyed: bool,
    live: bool,
) -> mpsc::Receiver<Piece> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let started = Instant::now();
        let streamed = if live {
            match text(&app, id, wait, &tx).await {
                Ok(streamed) => streamed,
                Err(e) => {
                    let _ = tx.send(Piece::Fail(e)).await;
                    return;
                }
            }
        } else {
            false
        };
        let left = wait.saturating_sub(started.elapsed());
        // A caller that went away waits no more (its task goes on).
        let finished = tokio::select! {
            f = task::finished(&app, id, left, keyed) => f,
            () = tx.closed() => return,
        };
        let piece = match finished {
            Ok(r) if r.status == Status::Succeeded => Piece::End {
                record: Box::new(r),
                streamed,
            },
            Ok(r) => Piece::Fail(task::failure(&r, keyed)),
            Err(e) => Piece::Fail(e),
        };
        let _ = tx.send(piece).await;
    });
    rx
}

/// Sends the live answer's text until it is complete or the task ends; whether any was sent.
async fn text(
    app: &App,
    id: TaskId,
    wait: Duration,
    tx: &mpsc::Sender<Piece>,
) -> Result<bool, ApiError> {
    let away = |e: &dyn std::fmt::Display| {
        ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("Cannot read the task's answer ({e})"),
        )
    };
    let started = Instant::now();
    let mut conn = app
        .serve
        .redis
        .blocking_conn()
        .await
        .map_err(|e| away(&e))?;
    let mut after = "0".to_owned();
    let mut sent = false;
    loop {
        let entries = Client::read_out(&mut conn, &app.keys, id, &after, Duration::from_secs(1))
            .await
            .map_err(|e| away(&e))?;
        for (entry_id, entry) in entries {
            after = entry_id;
            match entry {
                OutEntry::Text(t) => {
                    sent = true;
                    if tx.send(Piece::Text(t)).await.is_err() {
                        return Ok(sent);
                    }
                }
                // The call failed halfway and is retried: text already sent is void, and
                // a stream cannot take it back.
                OutEntry::Restart(why) if sent => {
                    return Err(ApiError {
                        task_id: Some(id),
                        ..ApiError::new(
                            axum::http::StatusCode::BAD_GATEWAY,
                            format!(
                                "The provider's answer broke off ({why}); the task is retried, \
                                 and `llmq result {id}` shows its answer"
                            ),
                        )
                    });
                }
                OutEntry::Restart(_) => {}
                OutEntry::Done => return Ok(sent),
            }
        }
        let ids = [id];
        let ended = app
            .serve
            .redis
            .results(&app.keys, &ids)
            .await
            .map_err(|e| away(&e))?[0]
            .as_ref()
            .is_some_and(|r| r.status.is_final());
        if app.stop.is_cancelled() {
            return Err(task::stopping(id, false));
        }
        if ended || started.elapsed() >= wait || tx.is_closed() {
            return Ok(sent);
        }
    }
}

/// A server-sent event stream of what `events` sends, with the task's id in a header.
pub fn respond(id: TaskId, events: mpsc::Receiver<Event>) -> Response {
    let stream = futures_util::stream::unfold(events, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&id.to_string()) {
        r.headers_mut().insert("llmq-task-id", v);
    }
    r
}

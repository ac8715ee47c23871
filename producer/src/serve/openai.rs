//! `POST /v1/chat/completions` in OpenAI's shape, answered whole or as `chat.completion.chunk`
//! events ending with `data: [DONE]`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::response::sse::Event;
use llmq_shared::outcome::TaskRecord;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::stream::Piece;
use super::task::{self, ApiError, Dialect};
use super::{App, AppState};
use crate::batch_file::Reader;

pub async fn chat_completions(
    State(app): AppState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = chat(app, &headers, body).await;
    task::respond("/v1/chat/completions", Dialect::OpenAi, answer)
}

async fn chat(
    app: Arc<App>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let key = task::caller(&app, headers)?;
    task::admit(&app, key.as_ref()).await?;
    let mut body = task::body(body)?;
    let stream = task::take_bool(&mut body, "stream")?;
    let include_usage = match body.remove("stream_options") {
        Some(Value::Object(o)) => o
            .get("include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        None | Some(Value::Null) => false,
        Some(_) => {
            return Err(ApiError::bad(
                Some("stream_options"),
                "`stream_options` must be an object",
            ));
        }
    };
    match body.remove("n") {
        None | Some(Value::Null) => {}
        Some(n) if n == json!(1) => {}
        Some(_) => {
            return Err(ApiError::bad(
                Some("n"),
                "llmq answers one choice a request; `n` must be 1",
            ));
        }
    }
    let user = body.remove("user");
    let mut t = Reader::quiet()
        .openai_body(body)
        .map_err(|e| ApiError::bad(None, e))?;
    if let Some(user) = user.filter(|u| !u.is_null()) {
        let mut meta = t.metadata.take().unwrap_or_else(|| json!({}));
        if let Some(m) = meta.as_object_mut() {
            m.insert("user".into(), user);
        }
        t.metadata = Some(meta);
    }
    let ask = task::ask(&app, key.as_ref(), headers, t)?;
    let events = move |pieces, tx, id, model| chunks(pieces, tx, id, model, include_usage);
    task::answer(
        app,
        headers,
        ask,
        stream,
        crate::batch_file::chat_completion,
        events,
    )
    .await
}

/// The task's pieces as `chat.completion.chunk` events.
async fn chunks(
    mut pieces: mpsc::Receiver<Piece>,
    tx: mpsc::Sender<Event>,
    id: String,
    model: String,
    include_usage: bool,
) {
    let created = chrono::Utc::now().timestamp();
    let chunk = |model: &str, choices: Value, usage: Option<Value>| {
        let mut c = json!({
            "id": format!("chatcmpl-{id}"),
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        Event::default().data(c.to_string())
    };
    let delta = |model: &str, delta: Value, finish: Option<&str>| {
        chunk(
            model,
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]),
            None,
        )
    };
    let first = delta(
        &model,
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
    );
    if tx.send(first).await.is_err() {
        return;
    }
    while let Some(piece) = pieces.recv().await {
        let events = match piece {
            Piece::Text(t) => vec![delta(&model, json!({"content": t}), None)],
            Piece::End { record, streamed } => {
                end(&record, streamed, include_usage, &delta, &chunk)
            }
            Piece::Fail(e) => vec![Event::default().data(e.body(Dialect::OpenAi).to_string())],
        };
        for e in events {
            if tx.send(e).await.is_err() {
                return;
            }
        }
    }
}

/// The last chunks of a task that succeeded: its text if not streamed, its tool calls, the
/// finish reason, the usage (when asked) and `[DONE]`.
fn end(
    r: &TaskRecord,
    streamed: bool,
    include_usage: bool,
    delta: &dyn Fn(&str, Value, Option<&str>) -> Event,
    chunk: &dyn Fn(&str, Value, Option<Value>) -> Event,
) -> Vec<Event> {
    let model = r.model.clone().unwrap_or_default();
    let mut events = Vec::new();
    if let Some(text) = r.output.as_deref().filter(|t| !streamed && !t.is_empty()) {
        events.push(delta(&model, json!({"content": text}), None));
    }
    if !r.tool_calls.is_empty() {
        let calls: Vec<Value> = r
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({"index": i, "id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": c.arguments_object().to_string()}})
            })
            .collect();
        events.push(delta(&model, json!({"tool_calls": calls}), None));
    }
    let finish = crate::batch_file::finish_reason(r);
    events.push(delta(&model, json!({}), Some(finish)));
    if include_usage {
        let usage = crate::batch_file::chat_completion("", r)["usage"].clone();
        events.push(chunk(&model, json!([]), Some(usage)));
    }
    events.push(Event::default().data("[DONE]"));
    events
}

//! `POST /v1/messages` in Anthropic's shape, answered whole or as the Messages API's
//! server-sent events (`message_start` ... `message_stop`).

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

pub async fn messages(
    State(app): AppState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = message(app, &headers, body).await;
    task::respond("/v1/messages", Dialect::Anthropic, answer)
}

async fn message(
    app: Arc<App>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let key = task::caller(&app, headers)?;
    task::admit(&app, key.as_ref()).await?;
    let mut body = task::body(body)?;
    let stream = task::take_bool(&mut body, "stream")?;
    if body.get("max_tokens").is_none_or(Value::is_null) {
        return Err(ApiError::bad(
            Some("max_tokens"),
            "max_tokens: Field required",
        ));
    }
    let t = Reader::quiet()
        .anthropic_params(body)
        .map_err(|e| ApiError::bad(None, e))?;
    let ask = task::ask(&app, key.as_ref(), headers, t)?;
    task::answer(
        app,
        headers,
        ask,
        stream,
        crate::batch_file::anthropic_reply,
        events,
    )
    .await
}

/// An event named as its data's `type`, as Anthropic sends them.
fn event(data: &Value) -> Event {
    let name = data["type"].as_str().unwrap_or("message");
    Event::default().event(name).data(data.to_string())
}

/// The task's pieces as the Messages API's events.
async fn events(
    mut pieces: mpsc::Receiver<Piece>,
    tx: mpsc::Sender<Event>,
    id: String,
    model: String,
) {
    let start = json!({"type": "message_start", "message": {
        "id": format!("msg_{id}"), "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": 0, "output_tokens": 0}}});
    if tx.send(event(&start)).await.is_err() {
        return;
    }
    // Whether the text block (index 0) was opened by streamed text.
    let mut open = false;
    while let Some(piece) = pieces.recv().await {
        let mut out = Vec::new();
        match piece {
            Piece::Text(t) => {
                if !open {
                    open = true;
                    out.push(json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}));
                }
                out.push(json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": t}}));
            }
            Piece::End { record, streamed } => out.extend(end(&record, streamed, open)),
            Piece::Fail(e) => out.push(e.body(Dialect::Anthropic)),
        }
        for data in &out {
            if tx.send(event(data)).await.is_err() {
                return;
            }
        }
    }
}

/// The last events of a task that succeeded: its text if not streamed, its tool uses, the
/// stop reason and usage, `message_stop`.
fn end(r: &TaskRecord, streamed: bool, open: bool) -> Vec<Value> {
    let mut out = Vec::new();
    let mut index = 0;
    if let Some(text) = r.output.as_deref().filter(|t| !streamed && !t.is_empty()) {
        out.push(json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}));
        out.push(json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": text}}));
        out.push(json!({"type": "content_block_stop", "index": 0}));
        index = 1;
    } else if open {
        out.push(json!({"type": "content_block_stop", "index": 0}));
        index = 1;
    }
    for c in &r.tool_calls {
        out.push(json!({"type": "content_block_start", "index": index,
            "content_block": {"type": "tool_use", "id": c.id, "name": c.name, "input": {}}}));
        out.push(json!({"type": "content_block_delta", "index": index,
            "delta": {"type": "input_json_delta",
                "partial_json": c.arguments_object().to_string()}}));
        out.push(json!({"type": "content_block_stop", "index": index}));
        index += 1;
    }
    let message = crate::batch_file::anthropic_reply("", r);
    out.push(json!({"type": "message_delta",
        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": null},
        "usage": message["usage"]}));
    out.push(json!({"type": "message_stop"}));
    out
}

//! Anthropic Message Batches: `POST /v1/messages/batches`, `GET /v1/messages/batches/{id}`,
//! `POST /v1/messages/batches/{id}/cancel`, `GET /v1/messages/batches/{id}/results`.

use super::*;

use crate::mock::batch::{self, Batch, End, Format, Item, lock};

/// The most requests a batch may hold, as on the real API.
const MAX_REQUESTS: usize = 100_000;

/// `^[a-zA-Z0-9_-]{1,64}$`.
pub(in crate::mock) fn valid_custom_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn invalid(message: impl Into<String>) -> Response {
    anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn not_found(id: &str) -> Response {
    anthropic_error(
        StatusCode::NOT_FOUND,
        "not_found_error",
        format!("message batch {id} not found"),
    )
}

/// The requests of a create body; the error is the 400's message.
fn requests(body: &[u8]) -> Result<Vec<Item>, String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("There was an error parsing the body of your request: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("Input should be a valid dictionary".to_owned());
    };
    if let Some(extra) = obj.keys().find(|k| *k != "requests") {
        return Err(format!("{extra}: Extra inputs are not permitted"));
    }
    let list = obj
        .get("requests")
        .ok_or("requests: Field required")?
        .as_array()
        .ok_or("requests: Input should be a valid list")?;
    if list.is_empty() {
        return Err("requests: List should have at least 1 item after validation, not 0".into());
    }
    if list.len() > MAX_REQUESTS {
        return Err(format!(
            "requests: List should have at most {MAX_REQUESTS} items after validation, not {}",
            list.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut items = Vec::with_capacity(list.len());
    for (i, r) in list.iter().enumerate() {
        let Some(r) = r.as_object() else {
            return Err(format!("requests.{i}: Input should be a valid dictionary"));
        };
        if let Some(extra) = r
            .keys()
            .find(|k| !matches!(k.as_str(), "custom_id" | "params"))
        {
            return Err(format!(
                "requests.{i}.{extra}: Extra inputs are not permitted"
            ));
        }
        let custom_id = r
            .get("custom_id")
            .ok_or_else(|| format!("requests.{i}.custom_id: Field required"))?
            .as_str()
            .ok_or_else(|| format!("requests.{i}.custom_id: Input should be a valid string"))?;
        if !valid_custom_id(custom_id) {
            return Err(format!(
                "requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
            ));
        }
        if !seen.insert(custom_id) {
            return Err(format!(
                "requests.{i}.custom_id: Duplicate custom_id '{custom_id}': each request in a \
                 batch must have a unique custom_id"
            ));
        }
        let params = r
            .get("params")
            .ok_or_else(|| format!("requests.{i}.params: Field required"))?;
        if !params.is_object() {
            return Err(format!(
                "requests.{i}.params: Input should be a valid dictionary"
            ));
        }
        items.push(Item {
            key: custom_id.to_owned(),
            model: params["model"].as_str().unwrap_or_default().to_owned(),
            body: params.clone(),
            metadata: Value::Null,
        });
    }
    Ok(items)
}

/// `POST /v1/messages/batches`. The params of each request are checked when it is run, as
/// by the real API: a bad one ends `errored`.
pub(in crate::mock) async fn create_batch(
    State(state): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
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
    if let Some(problem) = anthropic_auth_problem(&headers) {
        return anthropic_error(StatusCode::UNAUTHORIZED, "authentication_error", problem);
    }
    let items = match requests(&body) {
        Ok(items) => items,
        Err(message) => return invalid(message),
    };
    let id = format!("msgbatch_{}", batch::new_id());
    let model = items.first().map(|i| i.model.clone()).unwrap_or_default();
    let b = Batch::new(&state, Format::Anthropic, model, items, Value::Null);
    let object = batch_object(&state, &uri, &headers, &id, &b);
    batch::start(&state, &id, b);
    Json(object).into_response()
}

/// The Message Batch object. The counts stay at `processing` until the batch ends, as on the
/// real API.
fn batch_object(state: &Shared, uri: &Uri, headers: &HeaderMap, id: &str, b: &Batch) -> Value {
    let n = b.items.len() as u64;
    let ended = b.end_kind();
    let (ok, err, pending) = b.counts();
    let counts = match ended {
        None => json!({"processing": n, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}),
        Some(end) => {
            let (errored, canceled, expired) = match end {
                End::Failed => (n, 0, 0),
                End::Cancelled => (err, pending, 0),
                End::Expired => (err, 0, pending),
                End::Completed => (err + pending, 0, 0),
            };
            let succeeded = if end == End::Failed { 0 } else { ok };
            json!({"processing": 0, "succeeded": succeeded, "errored": errored,
                   "canceled": canceled, "expired": expired})
        }
    };
    let status = match (ended, b.cancel_at) {
        (Some(_), _) => "ended",
        (None, Some(_)) => "canceling",
        (None, None) => "in_progress",
    };
    let results_url = ended.map(|_| {
        format!(
            "{}/v1/messages/batches/{id}/results",
            batch::base_url(state, uri, headers)
        )
    });
    json!({
        "id": id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": counts,
        "ended_at": b.ended.map(|(_, t)| batch::rfc3339(t)),
        "created_at": batch::rfc3339(b.created),
        "expires_at": batch::rfc3339(b.created + batch::BATCH_WINDOW),
        "cancel_initiated_at": b.cancel_at.map(batch::rfc3339),
        "archived_at": null,
        "results_url": results_url,
    })
}

/// `GET /v1/messages/batches/{id}`.
pub(in crate::mock) async fn get_batch(
    State(state): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(problem) = anthropic_auth_problem(&headers) {
        return anthropic_error(StatusCode::UNAUTHORIZED, "authentication_error", problem);
    }
    let delay = state.opts.batch_delay;
    let object = state.batch.with(&id, Format::Anthropic, |b| {
        b.poll(delay);
        batch_object(&state, &uri, &headers, &id, b)
    });
    match object {
        Some(object) => Json(object).into_response(),
        None => not_found(&id),
    }
}

/// `POST /v1/messages/batches/{id}/cancel`: `canceling` now, ended on a later GET with the
/// requests not yet run `canceled`. An ended batch is answered as it is.
pub(in crate::mock) async fn cancel_batch(
    State(state): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(problem) = anthropic_auth_problem(&headers) {
        return anthropic_error(StatusCode::UNAUTHORIZED, "authentication_error", problem);
    }
    let object = state.batch.with(&id, Format::Anthropic, |b| {
        b.cancel();
        batch_object(&state, &uri, &headers, &id, b)
    });
    match object {
        Some(object) => Json(object).into_response(),
        None => not_found(&id),
    }
}

/// `GET /v1/messages/batches/{id}/results`: a JSONL line per request, in the order sent;
/// 404 until the batch has ended.
pub(in crate::mock) async fn batch_results(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(problem) = anthropic_auth_problem(&headers) {
        return anthropic_error(StatusCode::UNAUTHORIZED, "authentication_error", problem);
    }
    let lines = {
        let all = lock(&state.batch.all);
        let Some(b) = all.get(&id).filter(|b| b.format == Format::Anthropic) else {
            return not_found(&id);
        };
        let Some(end) = b.end_kind() else {
            return anthropic_error(
                StatusCode::NOT_FOUND,
                "not_found_error",
                format!("message batch {id} has not ended yet: its results are not available"),
            );
        };
        let mut lines = String::new();
        for (item, reply) in b.items.iter().zip(&b.replies) {
            let result = match (reply, end) {
                (_, End::Failed) => errored(
                    "api_error",
                    json!("llmq-mock batch-fail: the batch failed as its model asked."),
                ),
                (Some(r), _) if r.ok() => json!({"type": "succeeded", "message": r.body}),
                (Some(r), _) => errored(
                    r.body["error"]["type"].as_str().unwrap_or("api_error"),
                    r.body["error"]["message"].clone(),
                ),
                (None, End::Cancelled) => json!({"type": "canceled"}),
                (None, End::Expired) => json!({"type": "expired"}),
                (None, End::Completed) => {
                    errored("api_error", json!("llmq-mock did not answer this request."))
                }
            };
            lines.push_str(&json!({"custom_id": item.key, "result": result}).to_string());
            lines.push('\n');
        }
        lines
    };
    ([(header::CONTENT_TYPE, "application/x-jsonl")], lines).into_response()
}

/// An `errored` result: `{"type":"errored","error":{"type":"error","error":{type,message}}}`.
fn errored(kind: &str, message: Value) -> Value {
    json!({"type": "errored", "error": {"type": "error",
           "error": {"type": kind, "message": message}}})
}

/// One request of a batch, answered by the Messages route (a streamed one is refused).
pub(in crate::mock) async fn batch_item(state: &Arc<Shared>, item: &Item) -> Response {
    if item.body["stream"] == true {
        return invalid("stream: Message Batches do not support streaming");
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-api-key",
        HeaderValue::from_static("sk-ant-llmq-mock-batch"),
    );
    headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
    anthropic_messages(
        State(Arc::clone(state)),
        headers,
        Ok(Bytes::from(item.body.to_string())),
    )
    .await
}

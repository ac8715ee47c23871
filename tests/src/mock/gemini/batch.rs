//! The Gemini Batch API with inlined requests: `POST /v1beta/models/{model}:batchGenerateContent`
//! (a long-running operation), `GET /v1beta/batches/{id}`, `POST /v1beta/batches/{id}:cancel`.

use super::*;

use crate::mock::batch::{self, Batch, End, Format, Item};

const BATCH_TYPE: &str =
    "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch";
const OUTPUT_TYPE: &str =
    "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput";

fn unregistered() -> Response {
    google_error(
        StatusCode::FORBIDDEN,
        "Method doesn't allow unregistered callers (callers without established identity). \
         Please use API Key or other form of API consumer identity to call this API.",
        Vec::new(),
    )
}

fn not_found(id: &str) -> Response {
    google_error(
        StatusCode::NOT_FOUND,
        format!("Batch batches/{id} not found."),
        Vec::new(),
    )
}

/// A JSON object's fields under their camelCase names (proto JSON takes both spellings);
/// `at` names where it is, for the error.
fn object(
    value: &Value,
    known: &[&str],
    at: &str,
) -> Result<serde_json::Map<String, Value>, String> {
    let Value::Object(obj) = value else {
        return Err(format!(
            "Invalid JSON payload received. '{at}' must be an object."
        ));
    };
    proto_fields(obj.clone(), known, &format!(" at '{at}'"))
}

/// The display name and requests of a `batchGenerateContent` body; the error is the 400's
/// message.
fn requests(model: &str, body: &[u8]) -> Result<(String, Vec<Item>), String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("Invalid JSON payload received. {e}"))?;
    let top = object(&value, &["batch"], "request")?;
    let b = object(
        top.get("batch")
            .ok_or("* BatchGenerateContentRequest.batch: batch is required\n")?,
        &["displayName", "inputConfig", "model", "name", "priority"],
        "batch",
    )?;
    let display_name = b
        .get("displayName")
        .and_then(Value::as_str)
        .filter(|n| !n.trim().is_empty())
        .ok_or("* BatchGenerateContentRequest.batch.display_name: display_name is required\n")?;
    let input = object(
        b.get("inputConfig").ok_or(
            "* BatchGenerateContentRequest.batch.input_config: input_config is required\n",
        )?,
        &["requests", "fileName"],
        "batch.input_config",
    )?;
    if input.contains_key("fileName") {
        return Err(
            "llmq-mock takes inlined requests only (batch.input_config.requests), not a file_name"
                .to_owned(),
        );
    }
    let list = object(
        input
            .get("requests")
            .ok_or("* BatchGenerateContentRequest.batch.input_config: requests is required\n")?,
        &["requests"],
        "batch.input_config.requests",
    )?;
    let list = list
        .get("requests")
        .and_then(Value::as_array)
        .filter(|l| !l.is_empty())
        .ok_or(
            "* BatchGenerateContentRequest.batch.input_config.requests.requests: requests must \
             not be empty\n",
        )?;
    let mut items = Vec::with_capacity(list.len());
    for (i, r) in list.iter().enumerate() {
        let at = format!("batch.input_config.requests.requests[{i}]");
        let r = object(r, &["request", "metadata"], &at)?;
        let mut request = r
            .get("request")
            .filter(|q| q.is_object())
            .cloned()
            .ok_or_else(|| format!("* {at}.request: request is required\n"))?;
        // The request's own `model` is the batch's.
        if let Some(q) = request.as_object_mut() {
            q.remove("model");
        }
        let metadata = r.get("metadata").cloned().unwrap_or(Value::Null);
        if !(metadata.is_null() || metadata.is_object()) {
            return Err(format!(
                "Invalid JSON payload received. '{at}.metadata' must be an object."
            ));
        }
        items.push(Item {
            key: metadata["key"]
                .as_str()
                .map_or_else(|| i.to_string(), str::to_owned),
            model: model.to_owned(),
            body: request,
            metadata,
        });
    }
    Ok((display_name.to_owned(), items))
}

/// `POST /v1beta/models/{model}:batchGenerateContent` (from [`gemini_generate`]): a batch of
/// inlined requests, answered as an Operation.
pub(in crate::mock) fn create_batch(
    state: &Arc<Shared>,
    model: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            return google_error(rejection.status(), rejection.body_text(), Vec::new());
        }
    };
    if !gemini_authorized(headers, uri) {
        return unregistered();
    }
    if model.is_empty() {
        return google_error(
            StatusCode::NOT_FOUND,
            "models/ is not a model: use models/<model>:batchGenerateContent",
            Vec::new(),
        );
    }
    let (display_name, items) = match requests(model, &body) {
        Ok(r) => r,
        Err(message) => return google_error(StatusCode::BAD_REQUEST, message, Vec::new()),
    };
    let id = batch::new_id();
    let b = Batch::new(
        state,
        Format::Gemini,
        model.to_owned(),
        items,
        json!({ "displayName": display_name }),
    );
    let op = operation(&id, &b);
    batch::start(state, &id, b);
    Json(op).into_response()
}

/// The Operation of a batch: its `GenerateContentBatch` metadata, and once done its
/// responses (succeeded) or its error (failed).
fn operation(id: &str, b: &Batch) -> Value {
    let name = format!("batches/{id}");
    let ended = b.end_kind();
    let state = match ended {
        None if b.started.is_some() => "BATCH_STATE_RUNNING",
        None => "BATCH_STATE_PENDING",
        Some(End::Completed) => "BATCH_STATE_SUCCEEDED",
        Some(End::Failed) => "BATCH_STATE_FAILED",
        Some(End::Cancelled) => "BATCH_STATE_CANCELLED",
        Some(End::Expired) => "BATCH_STATE_EXPIRED",
    };
    let (ok, err, pending) = b.counts();
    let mut stats = json!({
        "requestCount": b.items.len().to_string(),
        "pendingRequestCount": pending.to_string(),
    });
    if ended.is_some() || ok + err > 0 {
        stats["successfulRequestCount"] = json!(ok.to_string());
        stats["failedRequestCount"] = json!(err.to_string());
    }
    let mut metadata = json!({
        "@type": BATCH_TYPE,
        "model": format!("models/{}", b.model),
        "displayName": b.extra["displayName"],
        "createTime": batch::rfc3339(b.created),
        "updateTime": batch::rfc3339(b.updated()),
        "batchStats": stats,
        "state": state,
        "name": name,
    });
    let mut op = json!({"name": name});
    if let Some((end, at)) = b.ended {
        metadata["endTime"] = json!(batch::rfc3339(at));
        op["done"] = json!(true);
        match end {
            End::Completed => {
                let responses: Vec<Value> = b
                    .items
                    .iter()
                    .zip(&b.replies)
                    .map(|(item, reply)| {
                        let mut out = match reply {
                            Some(r) if r.ok() => json!({"response": r.body}),
                            Some(r) => json!({"error": r.body["error"]}),
                            None => json!({"error": {"code": 500, "status": "INTERNAL",
                                "message": "llmq-mock did not answer this request."}}),
                        };
                        if !item.metadata.is_null() {
                            out["metadata"] = item.metadata.clone();
                        }
                        out
                    })
                    .collect();
                op["response"] = json!({
                    "@type": OUTPUT_TYPE,
                    "inlinedResponses": {"inlinedResponses": responses},
                });
            }
            End::Failed => {
                op["error"] = json!({
                    "code": 500,
                    "message": "llmq-mock batch-fail: the batch failed as its model asked.",
                    "status": "INTERNAL",
                });
            }
            End::Cancelled | End::Expired => {}
        }
    }
    op["metadata"] = metadata;
    op
}

/// `GET /v1beta/batches?pageSize=&pageToken=`: the newest batches' Operations first, in
/// pages; `nextPageToken` names the page after (the last name of this one).
pub(in crate::mock) async fn list_batches(
    State(state): State<Arc<Shared>>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if !gemini_authorized(&headers, &uri) {
        return unregistered();
    }
    let size = q
        .get("pageSize")
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(50)
        .min(1000);
    let after = q.get("pageToken").map(|t| t.trim_start_matches("batches/"));
    let (page, more) = state.batch.page(Format::Gemini, size, after, operation);
    let mut out = json!({});
    if let Some((id, _)) = page.last().filter(|_| more) {
        out["nextPageToken"] = json!(format!("batches/{id}"));
    }
    if !page.is_empty() {
        out["operations"] = json!(page.into_iter().map(|(_, op)| op).collect::<Vec<_>>());
    }
    Json(out).into_response()
}

/// `GET /v1beta/batches/{id}`: the Operation.
pub(in crate::mock) async fn get_batch(
    State(state): State<Arc<Shared>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if !gemini_authorized(&headers, &uri) {
        return unregistered();
    }
    let delay = state.opts.batch_delay;
    match state.batch.with(&id, Format::Gemini, |b| {
        b.poll(delay);
        operation(&id, b)
    }) {
        Some(op) => Json(op).into_response(),
        None => not_found(&id),
    }
}

/// `POST /v1beta/batches/{id}:cancel`: `{}`; the batch ends `BATCH_STATE_CANCELLED` on the
/// next GET, without responses. An ended batch stays as it is.
pub(in crate::mock) async fn cancel_batch(
    State(state): State<Arc<Shared>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if !gemini_authorized(&headers, &uri) {
        return unregistered();
    }
    let Some(id) = id.strip_suffix(":cancel") else {
        return google_error(
            StatusCode::NOT_FOUND,
            format!(
                "llmq-mock serves only batches/<id>:cancel here, not {}",
                uri.path()
            ),
            Vec::new(),
        );
    };
    match state.batch.with(id, Format::Gemini, Batch::cancel) {
        Some(_) => Json(json!({})).into_response(),
        None => not_found(id),
    }
}

/// One inlined request, answered by the generateContent route (one asking to stream is
/// refused).
pub(in crate::mock) async fn batch_item(state: &Arc<Shared>, model: &str, item: &Item) -> Response {
    if item.body.get("stream").is_some() {
        return google_error(
            StatusCode::BAD_REQUEST,
            "Invalid JSON payload received. Unknown name \"stream\": batch requests cannot \
             stream.",
            Vec::new(),
        );
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-goog-api-key",
        HeaderValue::from_static("llmq-mock-batch"),
    );
    gemini_generate(
        State(Arc::clone(state)),
        Path(format!("{model}:generateContent")),
        Uri::from_static("/v1beta/models/batch-item:generateContent"),
        headers,
        Ok(Bytes::from(item.body.to_string())),
    )
    .await
}

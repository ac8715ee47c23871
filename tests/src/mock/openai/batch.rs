//! The OpenAI Batch API: `POST /v1/files` (a JSONL file of requests, `purpose=batch`),
//! `POST /v1/batches`, `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`,
//! `GET /v1/files/{id}` and `GET /v1/files/{id}/content` (the input, output and error files).

use super::*;

use crate::mock::batch::{self, Batch, End, Fate, Format, Item, StoredFile, lock};

/// The one endpoint the mock batches.
const ENDPOINT: &str = "/v1/chat/completions";

fn unauthorized() -> Response {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "invalid_api_key",
        "You didn't provide an API key. You need to provide your API key in an Authorization \
         header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            .to_owned(),
    )
    .into_response()
}

fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Response {
    ApiError::invalid("invalid_value", param, message.into()).into_response()
}

fn not_found(what: &str, id: &str) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        format!("No such {what}: '{id}'"),
    )
    .into_response()
}

/// One part of a `multipart/form-data` body.
struct Part {
    name: String,
    filename: Option<String>,
    data: Bytes,
}

/// The `boundary` of a `multipart/form-data` Content-Type.
fn boundary(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mut params = ct.split(';');
    if !params
        .next()?
        .trim()
        .eq_ignore_ascii_case("multipart/form-data")
    {
        return None;
    }
    params.find_map(|p| {
        let (name, value) = p.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_owned())
            .filter(|b| !b.is_empty())
    })
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

/// A parameter (`name="..."`) of a Content-Disposition header.
fn disposition_param(disposition: &str, param: &str) -> Option<String> {
    disposition.split(';').find_map(|p| {
        let (name, value) = p.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case(param)
            .then(|| value.trim().trim_matches('"').to_owned())
    })
}

/// The parts of a `multipart/form-data` body (RFC 7578); `None` when it is not well formed.
fn multipart(body: &Bytes, boundary: &str) -> Option<Vec<Part>> {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut at = find(body, delimiter, 0)? + delimiter.len();
    let mut parts = Vec::new();
    loop {
        if body.get(at..at + 2) == Some(b"--") {
            return Some(parts);
        }
        // The rest of the delimiter line.
        at = find(body, b"\r\n", at)? + 2;
        let head_end = find(body, b"\r\n\r\n", at)?;
        let head = std::str::from_utf8(&body[at..head_end]).ok()?;
        let data_start = head_end + 4;
        let mut next = Vec::with_capacity(delimiter.len() + 2);
        next.extend_from_slice(b"\r\n");
        next.extend_from_slice(delimiter);
        let data_end = find(body, &next, data_start)?;
        let disposition = head.split("\r\n").find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-disposition")
                .then(|| value.trim().to_owned())
        })?;
        parts.push(Part {
            name: disposition_param(&disposition, "name")?,
            filename: disposition_param(&disposition, "filename"),
            data: body.slice(data_start..data_end),
        });
        at = data_end + next.len();
    }
}

/// The requests of a batch input file, one JSON object a line; the error is the 400's
/// message.
fn batch_lines(data: &[u8]) -> Result<Vec<Item>, String> {
    let text = std::str::from_utf8(data).map_err(|_| "The file is not UTF-8 text.".to_owned())?;
    let mut items: Vec<Item> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| format!("Line {n} of the file is not a JSON object."))?;
        let custom_id = value["custom_id"]
            .as_str()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| format!("Line {n}: missing required parameter 'custom_id'."))?;
        if let Some(first) = seen.insert(custom_id.to_owned(), n) {
            return Err(format!(
                "Line {n}: the custom_id '{custom_id}' is a duplicate of line {first}; each \
                 request needs its own custom_id."
            ));
        }
        if value["method"] != "POST" {
            return Err(format!("Line {n}: 'method' must be 'POST'."));
        }
        if value["url"] != ENDPOINT {
            return Err(format!(
                "Line {n}: the url {} is not supported; llmq-mock batches only {ENDPOINT}.",
                value["url"]
            ));
        }
        let body = value.get("body").filter(|b| b.is_object()).ok_or_else(|| {
            format!("Line {n}: missing required parameter 'body' (a JSON object).")
        })?;
        let model = body["model"]
            .as_str()
            .filter(|m| !m.trim().is_empty())
            .ok_or_else(|| format!("Line {n}: missing required parameter 'body.model'."))?;
        if let Some(first) = items.first()
            && first.model != model
        {
            return Err(format!(
                "Line {n}: the model '{model}' differs from '{}' of the lines before; a batch \
                 file must use one model.",
                first.model
            ));
        }
        items.push(Item {
            key: custom_id.to_owned(),
            model: model.to_owned(),
            body: body.clone(),
            metadata: Value::Null,
        });
    }
    if items.is_empty() {
        return Err("The file holds no requests.".to_owned());
    }
    Ok(items)
}

fn file_object(id: &str, bytes: usize, filename: &str, purpose: &str) -> Value {
    json!({
        "id": id,
        "object": "file",
        "bytes": bytes,
        "created_at": chrono::Utc::now().timestamp(),
        "filename": filename,
        "purpose": purpose,
    })
}

/// `POST /v1/files`: a batch input file, read and checked line by line.
pub(in crate::mock) async fn upload_file(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
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
    if !authorized(&headers) {
        return unauthorized();
    }
    let Some(parts) = boundary(&headers).and_then(|b| multipart(&body, &b)) else {
        return invalid(
            None,
            "Invalid request: the body must be multipart/form-data with the fields 'purpose' \
             and 'file'.",
        );
    };
    let field = |name: &str| parts.iter().find(|p| p.name == name);
    let Some(purpose) = field("purpose") else {
        return ApiError::invalid(
            "missing_required_parameter",
            Some("purpose"),
            "Missing required parameter: 'purpose'.".to_owned(),
        )
        .into_response();
    };
    let purpose = String::from_utf8_lossy(&purpose.data).trim().to_owned();
    if purpose != "batch" {
        return invalid(
            Some("purpose"),
            format!("llmq-mock takes files for the purpose 'batch' only, not '{purpose}'."),
        );
    }
    let Some(file) = field("file") else {
        return ApiError::invalid(
            "missing_required_parameter",
            Some("file"),
            "Missing required parameter: 'file'.".to_owned(),
        )
        .into_response();
    };
    let items = match batch_lines(&file.data) {
        Ok(items) => items,
        Err(message) => return invalid(Some("file"), message),
    };
    let id = format!("file-{}", batch::new_id());
    let filename = file
        .filename
        .clone()
        .unwrap_or_else(|| "batch.jsonl".into());
    let object = file_object(&id, file.data.len(), &filename, "batch");
    let first = {
        let mut files = lock(&state.batch.files);
        files.insert(
            id,
            StoredFile {
                object: object.clone(),
                bytes: file.data.clone(),
                items,
            },
        );
        files.len() == 1
    };
    if first {
        tokio::time::sleep(state.opts.first_upload_delay).await;
    }
    Json(object).into_response()
}

/// `GET /v1/files/{id}`: the File object.
pub(in crate::mock) async fn file_info(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !authorized(&headers) {
        return unauthorized();
    }
    match lock(&state.batch.files).get(&id) {
        Some(f) => Json(f.object.clone()).into_response(),
        None => not_found("File", &id),
    }
}

/// `GET /v1/files/{id}/content`: the file's bytes.
pub(in crate::mock) async fn file_content(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !authorized(&headers) {
        return unauthorized();
    }
    match lock(&state.batch.files).get(&id) {
        Some(f) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            f.bytes.clone(),
        )
            .into_response(),
        None => not_found("File", &id),
    }
}

/// `POST /v1/batches`: a batch of the requests of an uploaded file.
pub(in crate::mock) async fn create_batch(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Ok(body) = body else {
        return invalid(None, "We could not read the body of your request.");
    };
    if !authorized(&headers) {
        return unauthorized();
    }
    let Some(req) = serde_json::from_slice::<Value>(&body)
        .ok()
        .filter(Value::is_object)
    else {
        return ApiError::invalid(
            "invalid_json",
            None,
            "We could not parse the JSON body of your request.".to_owned(),
        )
        .into_response();
    };
    let Some(input_file_id) = req["input_file_id"].as_str() else {
        return ApiError::invalid(
            "missing_required_parameter",
            Some("input_file_id"),
            "Missing required parameter: 'input_file_id'.".to_owned(),
        )
        .into_response();
    };
    if req["endpoint"] != ENDPOINT {
        return invalid(
            Some("endpoint"),
            format!(
                "Invalid value for 'endpoint': {}; llmq-mock batches only {ENDPOINT}.",
                req["endpoint"]
            ),
        );
    }
    if req["completion_window"] != "24h" {
        return invalid(
            Some("completion_window"),
            format!(
                "Invalid value for 'completion_window': {}. Supported values are: '24h'.",
                req["completion_window"]
            ),
        );
    }
    let metadata = req.get("metadata").cloned().unwrap_or(Value::Null);
    if !(metadata.is_null() || metadata.is_object()) {
        return invalid(
            Some("metadata"),
            "Invalid type for 'metadata': expected an object.",
        );
    }
    let items = match lock(&state.batch.files).get(input_file_id) {
        None => return not_found("File", input_file_id),
        Some(f) if f.object["purpose"] != "batch" => {
            return invalid(
                Some("input_file_id"),
                format!("The file {input_file_id} was not uploaded for the purpose 'batch'."),
            );
        }
        Some(f) => f.items.clone(),
    };
    let id = format!("batch_{}", batch::new_id());
    let model = items.first().map(|i| i.model.clone()).unwrap_or_default();
    let extra = json!({
        "input_file_id": input_file_id,
        "completion_window": "24h",
        "metadata": metadata,
        "output_file_id": null,
        "error_file_id": null,
    });
    let b = Batch::new(&state, Format::OpenAi, model, items, extra);
    let object = batch_object(&id, &b);
    batch::start(&state, &id, b);
    tokio::time::sleep(state.opts.batch_create_delay).await;
    Json(object).into_response()
}

/// The Batch object.
fn batch_object(id: &str, b: &Batch) -> Value {
    let ended = b.end_kind();
    let status = match ended {
        Some(End::Completed) => "completed",
        Some(End::Expired) => "expired",
        Some(End::Failed) => "failed",
        Some(End::Cancelled) => "cancelled",
        None if b.cancel_at.is_some() => "cancelling",
        None if b.started.is_some() && b.fate != Fate::Fail => "in_progress",
        None => "validating",
    };
    let (ok, err, pending) = b.counts();
    let failed = match ended {
        Some(End::Expired | End::Cancelled) => err + pending,
        _ => err,
    };
    let ts = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.timestamp());
    let at = |kind: End| ts(b.ended.filter(|(e, _)| *e == kind).map(|(_, t)| t));
    let errors = if ended == Some(End::Failed) {
        json!({"object": "list", "data": [{
            "code": "invalid_request",
            "message": "llmq-mock batch-fail: the batch failed as its model asked.",
            "line": null,
            "param": null,
        }]})
    } else {
        Value::Null
    };
    json!({
        "id": id,
        "object": "batch",
        "endpoint": ENDPOINT,
        "model": b.model,
        "errors": errors,
        "input_file_id": b.extra["input_file_id"],
        "completion_window": b.extra["completion_window"],
        "status": status,
        "output_file_id": b.extra["output_file_id"],
        "error_file_id": b.extra["error_file_id"],
        "created_at": b.created.timestamp(),
        "in_progress_at": if b.fate == Fate::Fail { None } else { ts(b.started) },
        "expires_at": (b.created + batch::BATCH_WINDOW).timestamp(),
        "finalizing_at": at(End::Completed),
        "completed_at": at(End::Completed),
        "failed_at": at(End::Failed),
        "expired_at": at(End::Expired),
        "cancelling_at": ts(b.cancel_at),
        "cancelled_at": at(End::Cancelled),
        "request_counts": {
            "total": b.items.len(),
            "completed": ok,
            "failed": failed,
        },
        "metadata": b.extra["metadata"],
    })
}

/// Writes the output and error files of a batch that just ended.
fn write_files(state: &Shared, id: &str, b: &mut Batch) {
    let mut output = String::new();
    let mut errors = String::new();
    let not_run = match b.end_kind() {
        Some(End::Expired) => Some((
            "batch_expired",
            "This request could not be executed before the completion window expired.",
        )),
        Some(End::Cancelled) => Some((
            "batch_cancelled",
            "This request was not executed because the batch was cancelled.",
        )),
        _ => None,
    };
    for (item, reply) in b.items.iter().zip(&b.replies) {
        let line_id = format!("batch_req_{}", batch::new_id());
        match reply {
            Some(r) => {
                let line = json!({
                    "id": line_id,
                    "custom_id": item.key,
                    "response": {
                        "status_code": r.status,
                        "request_id": format!("req_{}", batch::new_id()),
                        "body": r.body,
                    },
                    "error": null,
                });
                let out = if r.ok() { &mut output } else { &mut errors };
                out.push_str(&line.to_string());
                out.push('\n');
            }
            None => {
                if let Some((code, message)) = not_run {
                    let line = json!({
                        "id": line_id,
                        "custom_id": item.key,
                        "response": null,
                        "error": {"code": code, "message": message},
                    });
                    errors.push_str(&line.to_string());
                    errors.push('\n');
                }
            }
        }
    }
    let mut files = lock(&state.batch.files);
    for (text, kind, field) in [
        (output, "output", "output_file_id"),
        (errors, "error", "error_file_id"),
    ] {
        if text.is_empty() {
            continue;
        }
        let file_id = format!("file-{}", batch::new_id());
        let object = file_object(
            &file_id,
            text.len(),
            &format!("{id}_{kind}.jsonl"),
            "batch_output",
        );
        files.insert(
            file_id.clone(),
            StoredFile {
                object,
                bytes: Bytes::from(text),
                items: Vec::new(),
            },
        );
        b.extra[field] = json!(file_id);
    }
}

/// `GET /v1/batches/{id}`.
pub(in crate::mock) async fn get_batch(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !authorized(&headers) {
        return unauthorized();
    }
    let delay = state.opts.batch_delay;
    let object = state.batch.with(&id, Format::OpenAi, |b| {
        if b.poll(delay) {
            write_files(&state, &id, b);
        }
        batch_object(&id, b)
    });
    match object {
        Some(object) => Json(object).into_response(),
        None => not_found("batch", &id),
    }
}

/// `GET /v1/batches?limit=&after=`: the newest batches first, in pages.
pub(in crate::mock) async fn list_batches(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&headers) {
        return unauthorized();
    }
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 20,
        Some(Ok(n)) if (1..=100).contains(&n) => n,
        Some(_) => {
            return invalid(
                Some("limit"),
                "Invalid 'limit': integer below minimum value or above maximum value (1 to 100).",
            );
        }
    };
    let (page, has_more) = state.batch.page(
        Format::OpenAi,
        limit,
        q.get("after").map(String::as_str),
        batch_object,
    );
    let data: Vec<Value> = page.into_iter().map(|(_, o)| o).collect();
    Json(json!({
        "object": "list",
        "first_id": data.first().map(|b| b["id"].clone()),
        "last_id": data.last().map(|b| b["id"].clone()),
        "has_more": has_more,
        "data": data,
    }))
    .into_response()
}

/// `POST /v1/batches/{id}/cancel`: `cancelling` now, `cancelled` on the next GET.
pub(in crate::mock) async fn cancel_batch(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !authorized(&headers) {
        return unauthorized();
    }
    let answer = state.batch.with(&id, Format::OpenAi, |b| {
        let status = batch_object(&id, b)["status"].clone();
        b.cancel().then(|| batch_object(&id, b)).ok_or(status)
    });
    match answer {
        Some(Ok(object)) => Json(object).into_response(),
        Some(Err(status)) => invalid(None, format!("Cannot cancel a batch with status {status}.")),
        None => not_found("batch", &id),
    }
}

/// One line of a batch, answered by the chat-completions route (a streamed one is refused).
pub(in crate::mock) async fn batch_item(state: &Arc<Shared>, item: &Item) -> Response {
    if item.body["stream"] == true {
        return ApiError::invalid(
            "invalid_value",
            Some("stream"),
            "Streaming is not supported in the Batch API: 'stream' must be false.".to_owned(),
        )
        .into_response();
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer sk-llmq-mock-batch"),
    );
    chat_completions(
        State(Arc::clone(state)),
        headers,
        Ok(Bytes::from(item.body.to_string())),
    )
    .await
}

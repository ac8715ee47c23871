//! The Anthropic Messages wire format: `POST /v1/messages`; its Message Batches are in
//! `batch`.

use super::*;

mod batch;

#[cfg(test)]
pub(super) use batch::valid_custom_id;
pub(super) use batch::{batch_item, batch_results, cancel_batch, create_batch, get_batch};

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
    "output_config",
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
    let mut uses: Vec<String> = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some(role @ ("user" | "assistant")) => role,
            _ => {
                return Err(format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant'"
                ));
            }
        };
        let content = m
            .get("content")
            .ok_or_else(|| format!("messages.{i}.content: Field required"))?;
        let blocks = content.as_array().map(Vec::as_slice).unwrap_or_default();
        // A user turn of tool_result blocks answers tool_use blocks of the turn before.
        let results: Vec<&Value> = blocks
            .iter()
            .filter(|b| b["type"] == "tool_result")
            .collect();
        if !results.is_empty() {
            // As the API: the tool_result blocks answer every tool_use of the message before.
            if results.len() != uses.len() {
                return Err(format!(
                    "messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: the message before has {} tool_use blocks and this one {} tool_result blocks",
                    uses.len(),
                    results.len()
                ));
            }
            for (j, r) in results.iter().enumerate() {
                let id = r["tool_use_id"].as_str().unwrap_or_default();
                if !uses.iter().any(|u| u == id) {
                    return Err(format!(
                        "messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: {id}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                    ));
                }
                let said = r.get("content").and_then(content_text).unwrap_or_default();
                messages.push(("tool".to_owned(), said));
            }
            continue;
        }
        // Only the message right before a tool_result turn can hold what it answers.
        uses.clear();
        let calls: Vec<&str> = blocks
            .iter()
            .filter(|b| b["type"] == "tool_use")
            .map(|b| {
                uses.extend(b["id"].as_str().map(str::to_owned));
                b["name"].as_str().unwrap_or_default()
            })
            .collect();
        let mut text = content_text(content).ok_or_else(|| {
            format!("messages.{i}.content: Input should be a valid string or list")
        })?;
        if !calls.is_empty() {
            text = format!("calls {}{text}", calls.join(", "));
        }
        messages.push((role.to_owned(), text));
    }
    let mut tools = Vec::new();
    if let Some(list) = obj.get("tools").and_then(Value::as_array) {
        for (i, t) in list.iter().enumerate() {
            let name = t["name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| format!("tools.{i}.custom.name: Field required"))?;
            let schema = t
                .get("input_schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| format!("tools.{i}.custom.input_schema: Field required"))?;
            tools.push((name.to_owned(), schema.clone()));
        }
    }
    let schema = match obj.get("output_config").map(|c| &c["format"]) {
        None => None,
        Some(f) if f["type"] == "json_schema" && f["schema"].is_object() => {
            Some(f["schema"].clone())
        }
        Some(_) => {
            return Err(
                "output_config.format: expected {\"type\": \"json_schema\", \"schema\": {...}}"
                    .to_owned(),
            );
        }
    };
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
        tools,
        schema,
        stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
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
    if !answer.content.is_empty() || answer.tool_calls.is_empty() {
        content.push(json!({"type": "text", "text": answer.content}));
    }
    for (id, name, input) in &answer.tool_calls {
        content.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    let stop = match (answer.truncated, answer.tool_calls.is_empty()) {
        (true, _) => "max_tokens",
        (false, false) => "tool_use",
        (false, true) => "end_turn",
    };
    json!({
        "id": format!("msg_mock{}", short_id()),
        "type": "message",
        "role": "assistant",
        "model": conv.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": {
            "input_tokens": answer.prompt_tokens - answer.cached_tokens - answer.cache_write_tokens,
            "cache_creation_input_tokens": answer.cache_write_tokens,
            "cache_read_input_tokens": answer.cached_tokens,
            "output_tokens": answer.completion_tokens,
            "service_tier": "standard",
        },
    })
}

/// A streamed message: `message_start` with the input usage, a text block's start, a
/// `text_delta` per piece and its stop, `message_delta` with the output tokens, `message_stop`.
fn anthropic_stream(conv: &Conversation, answer: &Answer) -> Response {
    let mut message = anthropic_message(conv, answer);
    message["content"] = json!([]);
    message["stop_reason"] = Value::Null;
    message["usage"]["output_tokens"] = json!(1);
    let stop = message["stop_reason"].clone();
    let mut events = vec![
        (
            Some("message_start"),
            json!({"type": "message_start", "message": message}),
        ),
        (
            Some("content_block_start"),
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    for p in pieces(&answer.content) {
        events.push((
            Some("content_block_delta"),
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": p}}),
        ));
    }
    let _ = stop;
    events.push((
        Some("content_block_stop"),
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push((Some("message_delta"), json!({"type": "message_delta",
        "delta": {"stop_reason": if answer.truncated { "max_tokens" } else { "end_turn" }, "stop_sequence": null},
        "usage": {"output_tokens": answer.completion_tokens}})));
    events.push((Some("message_stop"), json!({"type": "message_stop"})));
    sse(conv, answer, events, false)
}

pub(super) async fn anthropic_messages(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
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
        Outcome::Answer(mut answer) => {
            prompt_cache(&state, &body, &conv, arrived, &mut answer);
            if conv.stream {
                anthropic_stream(&conv, &answer)
            } else {
                Json(anthropic_message(&conv, &answer)).into_response()
            }
        }
        Outcome::Fail(status) => anthropic_failure(status, &conv.model),
        Outcome::Unavailable(s) => unavailable(
            anthropic_failure(StatusCode::SERVICE_UNAVAILABLE, &conv.model),
            s,
        ),
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

/// Anthropic's prompt cache, as its docs describe it: a block with `cache_control` marks the
/// prompt up to and including its message (tools, system, then the messages, in that order)
/// for caching. The longest marked prefix seen within its TTL (five minutes, `"ttl": "1h"`
/// an hour) is read; each longer marked prefix at least the model's minimum long is written;
/// the rest of the prompt is plain input. An entry serves only requests that arrived after
/// the answer that wrote it (Anthropic: a cache entry is available once the first response
/// begins), so requests sent at once all write. Replaces the other routes' made-up cached
/// tokens. Counted per message, as [`Conversation::prompt_tokens`] counts the prompt.
fn prompt_cache(
    state: &Shared,
    body: &[u8],
    conv: &Conversation,
    arrived: Instant,
    answer: &mut Answer,
) {
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let marked = |v: &Value| {
        v.as_array().into_iter().flatten().find_map(|b| {
            b.get("cache_control").filter(|c| c.is_object()).map(|c| {
                if c["ttl"] == "1h" {
                    Duration::from_secs(3600)
                } else {
                    Duration::from_secs(300)
                }
            })
        })
    };
    // (tokens of the prefix, its key, its TTL) at each marked point.
    let mut points: Vec<(u64, u64, Duration)> = Vec::new();
    let mut seen = vec![strip_cache_control(&body["tools"])];
    let mut upto = 0;
    if let Some(ttl) = marked(&body["tools"]) {
        points.push((upto, key_of(&conv.model, &seen), ttl));
    }
    let system = body.get("system").filter(|s| !s.is_null());
    let mut counted = conv.messages.iter().map(|(_, text)| tokens(text) + 3);
    if let Some(system) = system {
        upto += counted.next().unwrap_or(0);
        seen.push(strip_cache_control(system));
        if let Some(ttl) = marked(system) {
            points.push((upto, key_of(&conv.model, &seen), ttl));
        }
    }
    for m in body["messages"].as_array().into_iter().flatten() {
        // A turn of tool results counts one message per result, as the conversation does.
        let results = m["content"].as_array().map_or(0, |b| {
            b.iter().filter(|b| b["type"] == "tool_result").count()
        });
        upto += counted.by_ref().take(results.max(1)).sum::<u64>();
        seen.push(strip_cache_control(m));
        if let Some(ttl) = marked(&m["content"]) {
            points.push((upto, key_of(&conv.model, &seen), ttl));
        }
    }
    let min = llmq_shared::provider::anthropic::min_cacheable_tokens(&conv.model);
    let now = Instant::now();
    let mut cache = state
        .prompt_cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    cache.retain(|_, (expires, _, _)| *expires > now);
    let hit = points.iter().rposition(|(_, key, _)| {
        cache
            .get(key)
            .is_some_and(|&(_, _, written_at)| written_at <= arrived)
    });
    let read = hit.map_or(0, |i| {
        let (tokens, key, ttl) = points[i];
        if let Some(entry) = cache.get_mut(&key) {
            entry.0 = now + ttl;
        }
        tokens
    });
    let mut written = read;
    for &(tokens, key, ttl) in &points[hit.map_or(0, |i| i + 1)..] {
        if tokens >= min && tokens > written {
            let at = cache.get(&key).map_or(now, |&(_, _, at)| at);
            cache.insert(key, (now + ttl, tokens, at));
            written = tokens;
        }
    }
    drop(cache);
    answer.cached_tokens = read.min(answer.prompt_tokens);
    answer.cache_write_tokens = (written - read).min(answer.prompt_tokens - answer.cached_tokens);
    let mut billed = state
        .anthropic_billed
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    billed[0] += answer.prompt_tokens - answer.cached_tokens - answer.cache_write_tokens;
    billed[1] += answer.cached_tokens;
    billed[2] += answer.cache_write_tokens;
    billed[3] += answer.completion_tokens;
}

/// `v` without its `cache_control` fields: where the marks stand is not part of the prefix.
fn strip_cache_control(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| *k != "cache_control")
                .map(|(k, v)| (k.clone(), strip_cache_control(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_cache_control).collect()),
        other => other.clone(),
    }
}

fn key_of(model: &str, prefix: &[Value]) -> u64 {
    let mut h = DefaultHasher::new();
    model.hash(&mut h);
    for v in prefix {
        v.to_string().hash(&mut h);
    }
    h.finish()
}

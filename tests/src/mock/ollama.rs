//! The Ollama wire format: `POST /api/chat`, `GET /api/tags`.

use super::*;

/// `{"error": "..."}`.
fn ollama_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn ollama_not_found(model: &str) -> Response {
    ollama_error(
        StatusCode::NOT_FOUND,
        format!("model \"{model}\" not found, try pulling it first"),
    )
}

fn ollama_failure(status: StatusCode, model: &str) -> Response {
    let code = status.as_u16();
    if code == 404 {
        return ollama_not_found(model);
    }
    let message = match code {
        400 => "llmq-mock fail-400: invalid request".to_owned(),
        401 => "unauthorized".to_owned(),
        500 => "llama runner process has terminated: exit status 2".to_owned(),
        503 => "server busy, please try again.  maximum pending requests exceeded".to_owned(),
        _ => format!("llmq-mock answered {code} as asked."),
    };
    ollama_error(status, message)
}

fn ollama_rate_limited(kind: RetryHeader) -> Response {
    let (wait, header, value) = retry_header(kind);
    let mut response = ollama_error(
        StatusCode::TOO_MANY_REQUESTS,
        format!("too many requests, please retry in {wait}"),
    );
    insert_header(&mut response, header, &value);
    response
}

/// The conversation and whether to stream (Ollama streams unless told `"stream": false`).
fn validate_ollama(body: &[u8]) -> Result<(Conversation, bool), String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("json: cannot unmarshal into Go value of type api.ChatRequest".to_owned());
    };
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.trim().is_empty())
        .ok_or("model is required")?;
    let list = match obj.get("messages") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.clone(),
        Some(_) => {
            return Err(
                "json: cannot unmarshal into Go struct field ChatRequest.messages".to_owned(),
            );
        }
    };
    let mut messages = Vec::with_capacity(list.len());
    let mut called = false;
    for m in &list {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        if !matches!(role, "system" | "user" | "assistant" | "tool") {
            return Err(format!("invalid role: {role:?}"));
        }
        if role == "tool" && !called {
            return Err(
                "a tool message must follow an assistant message with tool_calls".to_owned(),
            );
        }
        let calls: Vec<&str> = m["tool_calls"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c["function"]["name"].as_str())
            .collect();
        called |= !calls.is_empty();
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(
                    "json: cannot unmarshal into Go struct field Message.messages.content of \
                     type string"
                        .to_owned(),
                );
            }
        };
        let mut content = if calls.is_empty() {
            content
        } else {
            format!("calls {}{content}", calls.join(", "))
        };
        // Ollama's images: base64 strings beside the text; it sniffs their type.
        for _ in m["images"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            content.push_str("[image data]");
        }
        messages.push((role.to_owned(), content));
    }
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => super::openai::chat_tools(list)?,
        Some(_) => {
            return Err("json: cannot unmarshal into Go struct field ChatRequest.tools".to_owned());
        }
    };
    let schema = match obj.get("format") {
        None | Some(Value::Null) => None,
        Some(Value::String(f)) if f == "json" => Some(json!({"type": "object"})),
        Some(schema @ Value::Object(_)) => Some(schema.clone()),
        Some(_) => return Err("invalid format: must be \"json\" or a JSON schema".to_owned()),
    };
    let mut max_tokens = None;
    match obj.get("options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(options)) => {
            if let Some(n) = options.get("num_predict").and_then(Value::as_i64) {
                max_tokens = u64::try_from(n).ok();
            }
        }
        Some(_) => {
            return Err(
                "json: cannot unmarshal into Go struct field ChatRequest.options".to_owned(),
            );
        }
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(
                "json: cannot unmarshal into Go struct field ChatRequest.stream".to_owned(),
            );
        }
    };
    Ok((
        Conversation {
            model: model.to_owned(),
            messages,
            max_tokens,
            tools,
            schema,
            stream: false,
        },
        stream,
    ))
}

/// The final chat object: Ollama has no cached-token count; a thinking model's thoughts come
/// in `message.thinking`.
fn ollama_done(conv: &Conversation, answer: &Answer, content: &str) -> Value {
    let mut message = json!({"role": "assistant", "content": content});
    if !answer.tool_calls.is_empty() {
        message["tool_calls"] = answer
            .tool_calls
            .iter()
            .map(|(_, name, args)| json!({"function": {"name": name, "arguments": args}}))
            .collect();
    }
    if answer.reasoning_tokens > 0 {
        message["thinking"] = json!("llmq-mock is thinking.");
    }
    json!({
        "model": conv.model,
        "created_at": chrono::Utc::now().to_rfc3339(),
        "message": message,
        "done_reason": if answer.truncated { "length" } else { "stop" },
        "done": true,
        "total_duration": 1_000_000,
        "load_duration": 100_000,
        "prompt_eval_count": answer.prompt_tokens,
        "prompt_eval_duration": 200_000,
        "eval_count": answer.completion_tokens,
        "eval_duration": 700_000,
    })
}

/// A streamed answer: an NDJSON chunk per piece of the content, then the final object.
fn ollama_stream(conv: &Conversation, answer: &Answer) -> Response {
    let mut lines: Vec<String> = pieces(&answer.content)
        .into_iter()
        .map(|p| {
            let chunk = json!({
                "model": conv.model,
                "created_at": chrono::Utc::now().to_rfc3339(),
                "message": {"role": "assistant", "content": p},
                "done": false,
            });
            format!("{chunk}\n")
        })
        .collect();
    lines.push(format!("{}\n", ollama_done(conv, answer, "")));
    streamed(conv, answer, "application/x-ndjson", lines)
}

pub(super) async fn ollama_chat(
    State(state): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    state.total.fetch_add(1, Ordering::SeqCst);
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return ollama_error(rejection.status(), rejection.body_text()),
    };
    count_body_model(&state, &body);
    let (mut conv, stream) = match validate_ollama(&body) {
        Ok(parsed) => parsed,
        Err(message) => return ollama_error(StatusCode::BAD_REQUEST, message),
    };
    conv.stream = stream;
    if conv.named("missing") {
        return ollama_not_found(&conv.model);
    }
    if conv.messages.is_empty() {
        // No messages only loads the model.
        return Json(json!({
            "model": conv.model,
            "created_at": chrono::Utc::now().to_rfc3339(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": "load",
            "done": true,
        }))
        .into_response();
    }
    match decide(&state, &conv).await {
        Outcome::Answer(answer) if stream => ollama_stream(&conv, &answer),
        Outcome::Answer(answer) => {
            Json(ollama_done(&conv, &answer, &answer.content)).into_response()
        }
        Outcome::Fail(status) => ollama_failure(status, &conv.model),
        Outcome::Unavailable(s) => unavailable(
            ollama_failure(StatusCode::SERVICE_UNAVAILABLE, &conv.model),
            s,
        ),
        Outcome::RateLimit(kind) => ollama_rate_limited(kind),
        Outcome::ContextTooLong => ollama_error(
            StatusCode::BAD_REQUEST,
            "the input length exceeds the context length",
        ),
        Outcome::ShuttingDown => ollama_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "llmq-mock is shutting down",
        ),
    }
}

/// `GET /api/tags`: the magic names as local models.
pub(super) async fn ollama_tags() -> Json<Value> {
    let models: Vec<Value> = MAGIC_MODELS
        .iter()
        .map(|id| json!({"name": format!("{id}:latest"), "model": format!("{id}:latest"), "size": 0}))
        .collect();
    Json(json!({ "models": models }))
}

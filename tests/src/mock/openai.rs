//! The OpenAI chat-completions wire format: `POST /v1/chat/completions`; its Batch API is in
//! `batch`.

use super::*;

mod batch;

pub(super) use batch::{
    batch_item, cancel_batch, create_batch, file_content, file_info, get_batch, list_batches,
    upload_file,
};

/// An OpenAI error response: `{"error":{"message","type","param","code"}}` plus headers.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    param: Option<&'static str>,
    message: String,
    headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub(super) fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: String,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            param: None,
            message,
            headers: Vec::new(),
        }
    }

    pub(super) fn invalid(
        code: &'static str,
        param: Option<&'static str>,
        message: String,
    ) -> Self {
        Self {
            param,
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                code,
                message,
            )
        }
    }

    pub(super) fn header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    pub(super) fn server_error(status: StatusCode) -> Self {
        let (code, message) = match status.as_u16() {
            503 => (
                "service_unavailable",
                "The server is overloaded or not ready yet.".to_owned(),
            ),
            502 => ("bad_gateway", "Bad gateway.".to_owned()),
            504 => ("gateway_timeout", "Gateway timeout.".to_owned()),
            _ => (
                "server_error",
                "The server had an error while processing your request. Sorry about that!"
                    .to_owned(),
            ),
        };
        Self::new(status, "server_error", code, message)
    }

    pub(super) fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "service_unavailable",
            "llmq-mock is shutting down.".to_owned(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut response = (self.status, Json(body)).into_response();
        for (name, value) in self.headers {
            insert_header(&mut response, name, &value);
        }
        response
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    #[serde(default)]
    tools: Vec<Value>,
    response_format: Option<Value>,
    #[serde(default)]
    stream: bool,
}

#[derive(Deserialize)]
pub(super) struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Vec<Value>,
    tool_call_id: Option<String>,
}

/// How the mock writes an image it was sent into the turn's text: `[image <media type>]` for
/// data (`data:<type>;base64,...`), `[image <url>]` for a URL, `[image ?]` when neither.
pub(super) fn image_mark(url: Option<&str>) -> String {
    match url {
        Some(u) if u.starts_with("data:") => {
            let media = u[5..].split(';').next().unwrap_or_default();
            format!("[image {media}]")
        }
        Some(u) => format!("[image {u}]"),
        None => "[image ?]".to_owned(),
    }
}

/// The conversation of chat messages (OpenAI's, and Ollama's, which has the same shape):
/// tool answers must answer a call an earlier assistant turn made.
pub(super) fn turns(messages: &[ChatMessage]) -> Result<Vec<(String, String)>, String> {
    let mut calls: Vec<String> = Vec::new();
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let mut text = m.text();
        if !m.tool_calls.is_empty() {
            let mut names = Vec::new();
            for c in &m.tool_calls {
                let name = c["function"]["name"].as_str().filter(|n| !n.is_empty()).ok_or_else(
                    || format!("Missing required parameter: 'messages[{i}].tool_calls[0].function.name'."),
                )?;
                names.push(name.to_owned());
                // Ollama's calls have no id; its tool turns follow them by name.
                calls.push(c["id"].as_str().unwrap_or(name).to_owned());
            }
            text = format!("calls {}{text}", names.join(", "));
        }
        if m.role == "tool" {
            // Ollama's tool turns name no call id; they still follow a call.
            let answers = !calls.is_empty()
                && m.tool_call_id
                    .as_deref()
                    .is_none_or(|id| calls.iter().any(|c| c == id));
            if !answers {
                return Err(format!(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceding message with 'tool_calls' (messages[{i}])."
                ));
            }
        }
        turns.push((m.role.clone(), text));
    }
    Ok(turns)
}

/// Chat-completions tools: (name, parameters) each.
pub(super) fn chat_tools(tools: &[Value]) -> Result<Vec<(String, Value)>, String> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let name = t["function"]["name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    format!("Missing required parameter: 'tools[{i}].function.name'.")
                })?;
            Ok((
                name.to_owned(),
                t["function"]
                    .get("parameters")
                    .cloned()
                    .unwrap_or(json!({})),
            ))
        })
        .collect()
}

impl ChatMessage {
    /// The message's text: a string, or the `text` parts of a content array.
    pub(super) fn text(&self) -> String {
        match &self.content {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| match p["type"].as_str() {
                    Some("image_url") => Some(image_mark(p["image_url"]["url"].as_str())),
                    _ => p.get("text").and_then(Value::as_str).map(str::to_owned),
                })
                .collect::<Vec<_>>()
                .join(""),
            _ => String::new(),
        }
    }
}

pub(super) fn validate(body: &[u8]) -> Result<Conversation, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| {
        ApiError::invalid(
            "invalid_json",
            None,
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, \
             but what was sent was not valid JSON.)"
                .to_owned(),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            "invalid_type",
            None,
            "Invalid request body: expected a JSON object.".to_owned(),
        ));
    }
    let req: ChatRequest = serde_json::from_value(value).map_err(|e| {
        ApiError::invalid("invalid_type", None, format!("Invalid request body: {e}."))
    })?;
    let model = req.model.filter(|m| !m.trim().is_empty()).ok_or_else(|| {
        ApiError::invalid(
            "missing_required_parameter",
            Some("model"),
            "you must provide a model parameter".to_owned(),
        )
    })?;
    let messages = req.messages.ok_or_else(|| {
        ApiError::invalid(
            "missing_required_parameter",
            Some("messages"),
            "Missing required parameter: 'messages'.".to_owned(),
        )
    })?;
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "empty_array",
            Some("messages"),
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got \
             an empty array instead."
                .to_owned(),
        ));
    }
    if let Some(t) = req.temperature
        && !(0.0..=2.0).contains(&t)
    {
        let (code, bound) = if t < 0.0 {
            (
                "decimal_below_min_value",
                "below minimum value. Expected a value >= 0",
            )
        } else {
            (
                "decimal_above_max_value",
                "above maximum value. Expected a value <= 2",
            )
        };
        return Err(ApiError::invalid(
            code,
            Some("temperature"),
            format!("Invalid 'temperature': decimal {bound}, but got {t} instead."),
        ));
    }
    let max_tokens = match (req.max_tokens, req.max_completion_tokens) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let invalid = |param: &'static str| {
        move |message: String| ApiError::invalid("invalid_value", Some(param), message)
    };
    let schema = match &req.response_format {
        None | Some(Value::Null) => None,
        Some(f) => match f["type"].as_str() {
            Some("json_object") => Some(json!({"type": "object"})),
            Some("text") => None,
            Some("json_schema") => Some(
                f["json_schema"]
                    .get("schema")
                    .filter(|_| f["json_schema"]["name"].is_string())
                    .cloned()
                    .ok_or_else(|| {
                        invalid("response_format")(
                            "Missing required parameter: 'response_format.json_schema.name' or 'response_format.json_schema.schema'.".to_owned(),
                        )
                    })?,
            ),
            _ => {
                return Err(invalid("response_format")(
                    "Invalid value: 'response_format.type'. Supported values are: 'json_object', 'json_schema', and 'text'.".to_owned(),
                ));
            }
        },
    };
    Ok(Conversation {
        model,
        messages: turns(&messages).map_err(invalid("messages"))?,
        max_tokens,
        tools: chat_tools(&req.tools).map_err(invalid("tools"))?,
        schema,
        stream: req.stream,
    })
}

/// True when `Authorization: Bearer <non-empty key>` is present.
pub(super) fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            (scheme.eq_ignore_ascii_case("bearer") && !key.trim().is_empty()).then_some(())
        })
        .is_some()
}

pub(super) async fn chat_completions(
    State(state): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    state.total.fetch_add(1, Ordering::SeqCst);
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
    count_body_model(&state, &body);
    if !authorized(&headers) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "You didn't provide an API key. You need to provide your API key in an \
             Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                .to_owned(),
        )
        .into_response();
    }
    match validate(&body) {
        Ok(conv) => respond(&state, &conv).await,
        Err(e) => e.into_response(),
    }
}

pub(super) fn failure(status: StatusCode, model: &str) -> ApiError {
    match status.as_u16() {
        400 => ApiError::invalid(
            "invalid_value",
            Some("messages"),
            "Invalid value for 'messages': the request was rejected (llmq-mock fail-400)."
                .to_owned(),
        ),
        401 => ApiError::new(
            status,
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided: sk-mock****. You can find your API key at \
             https://platform.openai.com/account/api-keys."
                .to_owned(),
        ),
        404 => ApiError::new(
            status,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{model}` does not exist or you do not have access to it."),
        ),
        500..=599 => ApiError::server_error(status),
        _ => ApiError::new(
            status,
            "invalid_request_error",
            "mock_failure",
            format!("llmq-mock answered {status} as asked."),
        ),
    }
}

pub(super) fn rate_limited(kind: RetryHeader, model: &str) -> ApiError {
    let (wait, header, value) = retry_header(kind);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_exceeded",
        "rate_limit_exceeded",
        format!(
            "Rate limit reached for {model} in organization org-llmq-mock on requests per min \
             (RPM): Limit 3, Used 3, Requested 1. Please try again in {wait}."
        ),
    )
    .header(header, value)
}

/// The chat.completion body for a successful request.
pub(super) fn completion(conv: &Conversation, answer: &Answer) -> Value {
    let Answer {
        content,
        tool_calls,
        truncated,
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        reasoning_tokens,
        cut: _,
        cache_write_tokens: _,
    } = answer;
    let finish_reason = if *truncated { "length" } else { "stop" };
    let mut message = json!({"role": "assistant", "content": content, "refusal": null});
    let finish_reason = if tool_calls.is_empty() {
        finish_reason
    } else {
        message["content"] = Value::Null;
        message["tool_calls"] = tool_calls
            .iter()
            .map(|(id, name, args)| {
                json!({"id": id, "type": "function", "function": {"name": name, "arguments": args.to_string()}})
            })
            .collect();
        "tool_calls"
    };
    json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": conv.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        },
        "system_fingerprint": "fp_llmq_mock",
    })
}

/// A streamed chat completion: a chunk per piece, one with the finish reason, one with the
/// usage (always sent; OpenAI sends it with `stream_options.include_usage`), then `[DONE]`.
fn completion_stream(conv: &Conversation, answer: &Answer) -> Response {
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let chunk = |choices: Value, usage: Value| {
        (
            None,
            json!({"id": id, "object": "chat.completion.chunk", "model": conv.model,
            "choices": choices, "usage": usage}),
        )
    };
    let mut events: Vec<(Option<&str>, Value)> = pieces(&answer.content)
        .into_iter()
        .map(|p| {
            chunk(
                json!([{"index": 0, "delta": {"content": p}, "finish_reason": null}]),
                Value::Null,
            )
        })
        .collect();
    let finish = if answer.truncated { "length" } else { "stop" };
    events.push(chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": finish}]),
        Value::Null,
    ));
    events.push(chunk(
        json!([]),
        json!({
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": answer.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": answer.reasoning_tokens},
        }),
    ));
    sse(conv, answer, events, true)
}

pub(super) async fn respond(state: &Shared, conv: &Conversation) -> Response {
    match decide(state, conv).await {
        Outcome::Answer(answer) if conv.stream => completion_stream(conv, &answer),
        Outcome::Answer(answer) => Json(completion(conv, &answer)).into_response(),
        Outcome::Fail(status) => failure(status, &conv.model).into_response(),
        Outcome::Unavailable(s) => unavailable(
            failure(StatusCode::SERVICE_UNAVAILABLE, &conv.model).into_response(),
            s,
        ),
        Outcome::RateLimit(kind) => rate_limited(kind, &conv.model).into_response(),
        Outcome::ContextTooLong => ApiError::invalid(
            "context_length_exceeded",
            Some("messages"),
            format!(
                "This model's maximum context length is {CONTEXT_LIMIT} tokens. However, your \
                 messages resulted in {} tokens. Please reduce the length of the messages.",
                conv.prompt_tokens().max(CONTEXT_LIMIT + 1)
            ),
        )
        .into_response(),
        Outcome::ShuttingDown => ApiError::shutting_down().into_response(),
    }
}

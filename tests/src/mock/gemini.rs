//! The Gemini wire format: `POST /v1beta/models/{model}:generateContent`, `GET /v1beta/models`;
//! its Batch API is in `batch`.

use super::*;

mod batch;

pub(super) use batch::{batch_item, cancel_batch, get_batch, list_batches};

/// The context size claimed by `context-too-long` on the Gemini route.
const GEMINI_CONTEXT_LIMIT: u64 = 1_048_576;
/// Top-level fields of a `generateContent` request (proto JSON also takes them in snake_case).
const GEMINI_FIELDS: &[&str] = &[
    "contents",
    "systemInstruction",
    "generationConfig",
    "safetySettings",
    "tools",
    "toolConfig",
    "cachedContent",
    "labels",
];
/// Fields of `generationConfig`.
const GEMINI_CONFIG_FIELDS: &[&str] = &[
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "candidateCount",
    "stopSequences",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "responseModalities",
    "responseLogprobs",
    "logprobs",
    "thinkingConfig",
    "mediaResolution",
    "speechConfig",
];

/// `system_instruction` → `systemInstruction`: proto JSON accepts both spellings.
pub(super) fn camel(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The object's fields under their camelCase names; the first unknown one is an error.
fn proto_fields(
    obj: serde_json::Map<String, Value>,
    known: &[&str],
    at: &str,
) -> Result<serde_json::Map<String, Value>, String> {
    let mut out = serde_json::Map::with_capacity(obj.len());
    for (key, value) in obj {
        let name = camel(&key);
        if !known.contains(&name.as_str()) {
            return Err(format!(
                "Invalid JSON payload received. Unknown name \"{key}\"{at}: Cannot find field."
            ));
        }
        out.insert(name, value);
    }
    Ok(out)
}

/// Google's canonical status for an HTTP status.
fn google_status(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        500 => "INTERNAL",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        402..=498 => "FAILED_PRECONDITION",
        _ => "UNKNOWN",
    }
}

/// `{"error":{"code","message","status","details"?}}`.
fn google_error(status: StatusCode, message: impl Into<String>, details: Vec<Value>) -> Response {
    let mut error = json!({
        "code": status.as_u16(),
        "message": message.into(),
        "status": google_status(status.as_u16()),
    });
    if !details.is_empty() {
        error["details"] = Value::Array(details);
    }
    (status, Json(json!({ "error": error }))).into_response()
}

fn gemini_failure(status: StatusCode, model: &str) -> Response {
    let code = status.as_u16();
    let message = match code {
        400 => "Request contains an invalid argument.".to_owned(),
        401 => "Request had invalid authentication credentials.".to_owned(),
        403 => "The caller does not have permission".to_owned(),
        404 => format!(
            "models/{model} is not found for API version v1beta, or is not supported for \
             generateContent. Call ListModels to see the list of available models and their \
             supported methods."
        ),
        500 => "An internal error has occurred. Please retry or report in \
                https://developers.generativeai.google/guide/troubleshooting"
            .to_owned(),
        503 => "The model is overloaded. Please try again later.".to_owned(),
        504 => "The request timed out. Please try again.".to_owned(),
        _ => format!("llmq-mock answered {code} as asked."),
    };
    google_error(status, message, Vec::new())
}

/// 429 RESOURCE_EXHAUSTED with the wait in a `RetryInfo` detail, as Gemini sends it; only
/// `rate-limit-date` also has a `Retry-After` header.
fn gemini_rate_limited(kind: RetryHeader, model: &str) -> Response {
    let (wait, header, value) = retry_header(kind);
    let delay = match kind {
        RetryHeader::Seconds => "1s",
        RetryHeader::Millis => "0.200s",
        RetryHeader::Date => "2s",
    };
    let details = vec![
        json!({
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                "quotaDimensions": {"location": "global", "model": model},
                "quotaValue": "3",
            }],
        }),
        json!({
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [{
                "description": "Learn more about Gemini API quotas",
                "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
            }],
        }),
        json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}),
    ];
    let mut response = google_error(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "You exceeded your current quota, please check your plan and billing details. \
             (llmq-mock: 3 requests per minute for {model}.) Please retry in {wait}."
        ),
        details,
    );
    if kind == RetryHeader::Date {
        insert_header(&mut response, header, &value);
    }
    response
}

/// 429 RESOURCE_EXHAUSTED for a per-day quota, as the free tier sends it once its requests
/// for the day are used: a `QuotaFailure` naming `...PerDay...`, and a `RetryInfo` of a few
/// seconds that does not mean the quota is back then (it resets at midnight Pacific time).
fn gemini_daily_quota(model: &str) -> Response {
    let details = vec![
        json!({
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                "quotaDimensions": {"location": "global", "model": model},
                "quotaValue": "50",
            }],
        }),
        json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "16s"}),
    ];
    google_error(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "You exceeded your current quota, please check your plan and billing details. \
             (llmq-mock: 50 requests per day for {model}.) Please retry in 16s."
        ),
        details,
    )
}

/// True when a non-empty key comes in `x-goog-api-key` or `?key=`.
fn gemini_authorized(headers: &HeaderMap, uri: &Uri) -> bool {
    let in_header = headers
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().is_empty());
    let in_query = uri.query().is_some_and(|q| {
        q.split('&')
            .filter_map(|pair| pair.split_once('='))
            .any(|(name, value)| name == "key" && !value.is_empty())
    });
    in_header || in_query
}

/// The text of a `Content`'s parts; `None` when it has none.
fn parts_text(content: &Value) -> Option<String> {
    let parts = content.get("parts")?.as_array().filter(|p| !p.is_empty())?;
    Some(
        parts
            .iter()
            .filter_map(|p| {
                if let Some(d) = p.get("inlineData") {
                    return Some(format!("[image {}]", d["mimeType"].as_str().unwrap_or("?")));
                }
                if let Some(f) = p.get("fileData") {
                    return Some(format!("[image {}]", f["fileUri"].as_str().unwrap_or("?")));
                }
                p.get("text").and_then(Value::as_str).map(str::to_owned)
            })
            .collect(),
    )
}

fn validate_gemini(model: &str, body: &[u8]) -> Result<Conversation, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("Invalid JSON payload received. {e}"))?;
    let Value::Object(obj) = value else {
        return Err("Invalid JSON payload received. Expected an object.".to_owned());
    };
    let obj = proto_fields(obj, GEMINI_FIELDS, "")?;
    let contents = obj
        .get("contents")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or("* GenerateContentRequest.contents: contents is not specified\n")?;
    let mut messages = Vec::with_capacity(contents.len() + 1);
    if let Some(system) = obj.get("systemInstruction") {
        let text = parts_text(system).ok_or(
            "* GenerateContentRequest.system_instruction.parts: contents.parts must not be \
             empty.\n",
        )?;
        messages.push(("system".to_owned(), text));
    }
    let mut called: Vec<String> = Vec::new();
    for (i, content) in contents.iter().enumerate() {
        let role = match content.get("role").and_then(Value::as_str) {
            None | Some("" | "user") => "user",
            Some("model") => "assistant",
            Some(_) => return Err("Please use a valid role: user, model.".to_owned()),
        };
        let mut text = parts_text(content).ok_or_else(|| {
            format!(
                "* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.\n"
            )
        })?;
        let parts = content["parts"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let calls: Vec<&str> = parts
            .iter()
            .filter_map(|p| p["functionCall"]["name"].as_str())
            .collect();
        // As Gemini 3: a call it made comes back with the signature it gave it.
        if role == "assistant"
            && parts
                .iter()
                .any(|p| p.get("functionCall").is_some() && !p["thoughtSignature"].is_string())
        {
            return Err(format!(
                "* GenerateContentRequest.contents[{i}].parts: Function call is missing a thought_signature in functionCall parts.\n"
            ));
        }
        // As the API: the function responses of a turn answer all the calls of the turn
        // before, no more and no fewer.
        let responses = parts
            .iter()
            .filter(|p| p.get("functionResponse").is_some())
            .count();
        if responses > 0 && responses != called.len() {
            return Err(format!(
                "* GenerateContentRequest.contents[{i}]: please ensure that the number of function response parts ({responses}) is equal to the number of function call parts of the function call turn ({}).\n",
                called.len()
            ));
        }
        if responses == 0 {
            called.clear();
        }
        called.extend(calls.iter().map(|c| (*c).to_owned()));
        let mut answered = false;
        for p in parts.iter().filter(|p| p.get("functionResponse").is_some()) {
            let r = &p["functionResponse"];
            let name = r["name"].as_str().unwrap_or_default();
            if !called.iter().any(|c| c == name) || !r["response"].is_object() {
                return Err(format!(
                    "* GenerateContentRequest.contents[{i}].parts: a function_response must name an earlier function_call and carry a response object.\n"
                ));
            }
            let said = r["response"]["result"]
                .as_str()
                .map_or_else(|| r["response"].to_string(), str::to_owned);
            messages.push(("tool".to_owned(), said));
            answered = true;
        }
        if answered {
            continue;
        }
        if !calls.is_empty() {
            text = format!("calls {}{text}", calls.join(", "));
        }
        messages.push((role.to_owned(), text));
    }
    let mut tools = Vec::new();
    for t in obj
        .get("tools")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        for (i, f) in t["functionDeclarations"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let name = f["name"].as_str().filter(|n| !n.is_empty()).ok_or_else(|| {
                format!("* GenerateContentRequest.tools[0].function_declarations[{i}].name: Name cannot be empty.\n")
            })?;
            let params = f
                .get("parametersJsonSchema")
                .or_else(|| f.get("parameters"))
                .cloned()
                .unwrap_or(json!({}));
            tools.push((name.to_owned(), params));
        }
    }
    let mut schema = None;
    let mut max_tokens = None;
    if let Some(config) = obj.get("generationConfig").filter(|c| !c.is_null()) {
        let Value::Object(config) = config.clone() else {
            return Err(
                "Invalid JSON payload received. 'generation_config' must be an object.".to_owned(),
            );
        };
        let config = proto_fields(config, GEMINI_CONFIG_FIELDS, " at 'generation_config'")?;
        if let Some(t) = config.get("temperature").filter(|t| !t.is_null())
            && !t.as_f64().is_some_and(|t| (0.0..=2.0).contains(&t))
        {
            return Err(
                "* GenerateContentRequest.generation_config.temperature: must be in the range \
                 [0.0, 2.0]\n"
                    .to_owned(),
            );
        }
        if config.get("responseMimeType").and_then(Value::as_str) == Some("application/json") {
            schema = Some(
                config
                    .get("responseJsonSchema")
                    .or_else(|| config.get("responseSchema"))
                    .cloned()
                    .unwrap_or(json!({"type": "object"})),
            );
        } else if config.get("responseJsonSchema").is_some() {
            return Err(
                "* GenerateContentRequest.generation_config.response_mime_type: response_json_schema requires response_mime_type application/json\n"
                    .to_owned(),
            );
        }
        if let Some(max) = config.get("maxOutputTokens").filter(|m| !m.is_null()) {
            let max = max
                .as_u64()
                .or_else(|| max.as_str().and_then(|s| s.parse().ok()))
                .filter(|m| *m >= 1)
                .ok_or(
                    "* GenerateContentRequest.generation_config.max_output_tokens: must be a \
                     positive integer\n",
                )?;
            max_tokens = Some(max);
        }
    }
    Ok(Conversation {
        model: model.to_owned(),
        messages,
        max_tokens,
        tools,
        schema,
        stream: false,
    })
}

/// `usageMetadata` leaves out zero counts; `candidatesTokenCount` excludes thoughts.
fn gemini_response(conv: &Conversation, answer: &Answer) -> Value {
    let thoughts = answer.reasoning_tokens;
    let mut usage = json!({
        "promptTokenCount": answer.prompt_tokens,
        "candidatesTokenCount": answer.completion_tokens - thoughts,
        "totalTokenCount": answer.prompt_tokens + answer.completion_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": answer.prompt_tokens}],
    });
    if answer.cached_tokens > 0 {
        usage["cachedContentTokenCount"] = json!(answer.cached_tokens);
    }
    if thoughts > 0 {
        usage["thoughtsTokenCount"] = json!(thoughts);
    }
    // Function calls come without an id, as from most Gemini models.
    let mut parts: Vec<Value> = Vec::new();
    if !answer.content.is_empty() || answer.tool_calls.is_empty() {
        parts.push(json!({"text": answer.content}));
    }
    parts.extend(
        answer
            .tool_calls
            .iter()
            .map(|(_, name, args)| {
                json!({"functionCall": {"name": name, "args": args}, "thoughtSignature": format!("sig-{name}")})
            }),
    );
    json!({
        "candidates": [{
            "content": {"parts": parts, "role": "model"},
            "finishReason": if answer.truncated { "MAX_TOKENS" } else { "STOP" },
            "index": 0,
        }],
        "usageMetadata": usage,
        "modelVersion": conv.model,
        "responseId": short_id(),
    })
}

/// A prompt refused by the safety filters: no candidates at all.
fn gemini_blocked(conv: &Conversation) -> Value {
    let prompt_tokens = conv.prompt_tokens();
    json!({
        "promptFeedback": {
            "blockReason": "SAFETY",
            "safetyRatings": [{
                "category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                "probability": "HIGH",
                "blocked": true,
            }],
        },
        "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
        "modelVersion": conv.model,
        "responseId": short_id(),
    })
}

pub(super) async fn gemini_generate(
    State(state): State<Arc<Shared>>,
    Path(rest): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (model, method) = rest.split_once(':').unwrap_or((rest.as_str(), ""));
    if method == "batchGenerateContent" {
        return batch::create_batch(&state, model, &uri, &headers, body);
    }
    state.total.fetch_add(1, Ordering::SeqCst);
    if !model.is_empty() {
        state.count(model);
    }
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            return google_error(rejection.status(), rejection.body_text(), Vec::new());
        }
    };
    if !gemini_authorized(&headers, &uri) {
        return google_error(
            StatusCode::FORBIDDEN,
            "Method doesn't allow unregistered callers (callers without established identity). \
             Please use API Key or other form of API consumer identity to call this API.",
            Vec::new(),
        );
    }
    let stream = method == "streamGenerateContent";
    if !(method == "generateContent" || stream) || model.is_empty() {
        return google_error(
            StatusCode::NOT_FOUND,
            format!(
                "llmq-mock serves only models/<model>:generateContent, not {}",
                uri.path()
            ),
            Vec::new(),
        );
    }
    let mut conv = match validate_gemini(model, &body) {
        Ok(conv) => conv,
        Err(message) => return google_error(StatusCode::BAD_REQUEST, message, Vec::new()),
    };
    if stream
        && !uri
            .query()
            .unwrap_or_default()
            .split('&')
            .any(|q| q == "alt=sse")
    {
        return google_error(
            StatusCode::BAD_REQUEST,
            "llmq-mock streams generateContent only as Server-Sent Events: add ?alt=sse",
            Vec::new(),
        );
    }
    conv.stream = stream;
    if conv.named("blocked") {
        return Json(gemini_blocked(&conv)).into_response();
    }
    if conv.named("quota-daily") {
        return gemini_daily_quota(&conv.model);
    }
    match decide(&state, &conv).await {
        Outcome::Answer(answer) if conv.stream => {
            // A response object per piece; the usage grows; the last one has the finish reason.
            let whole = gemini_response(&conv, &answer);
            let parts = pieces(&answer.content);
            let n = parts.len();
            let events = parts
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    let mut chunk = whole.clone();
                    chunk["candidates"][0]["content"]["parts"] = json!([{"text": p}]);
                    if i + 1 < n {
                        chunk["candidates"][0]
                            .as_object_mut()
                            .map(|c| c.remove("finishReason"));
                    }
                    (None, chunk)
                })
                .collect();
            sse(&conv, &answer, events, false)
        }
        Outcome::Answer(answer) => Json(gemini_response(&conv, &answer)).into_response(),
        Outcome::Fail(status) => gemini_failure(status, &conv.model),
        Outcome::Unavailable(s) => unavailable(
            gemini_failure(StatusCode::SERVICE_UNAVAILABLE, &conv.model),
            s,
        ),
        Outcome::RateLimit(kind) => gemini_rate_limited(kind, &conv.model),
        Outcome::ContextTooLong => google_error(
            StatusCode::BAD_REQUEST,
            format!(
                "The input token count ({}) exceeds the maximum number of tokens allowed \
                 ({GEMINI_CONTEXT_LIMIT}).",
                conv.prompt_tokens().max(GEMINI_CONTEXT_LIMIT + 1)
            ),
            Vec::new(),
        ),
        Outcome::ShuttingDown => google_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "llmq-mock is shutting down.",
            Vec::new(),
        ),
    }
}

/// `GET /v1beta/models`: the magic names as Gemini model resources; needs a key like every
/// Gemini call.
pub(super) async fn gemini_models(headers: HeaderMap, uri: Uri) -> Response {
    if !gemini_authorized(&headers, &uri) {
        return google_error(
            StatusCode::FORBIDDEN,
            "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
            Vec::new(),
        );
    }
    let models: Vec<Value> = MAGIC_MODELS
        .iter()
        .map(|id| {
            json!({"name": format!("models/{id}"), "displayName": id,
                   "supportedGenerationMethods": ["generateContent"]})
        })
        .collect();
    Json(json!({ "models": models })).into_response()
}

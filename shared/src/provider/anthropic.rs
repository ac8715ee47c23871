//! Anthropic's Messages API (`POST {base_url}/v1/messages`).

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    CallFuture, Completion, Error, Format, Part, Provider, Request, ResponseFormat, Result, Role,
    Streamed, ToolCall, ToolChoice, ToolMode, Usage, excerpt, exchange,
};
use crate::conversation::made_up_call_id;
use crate::outcome::ErrorClass;

/// The API version every request names.
/// The `anthropic-version` header every request carries.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// `max_tokens` is required by the Messages API; this is sent when the request has none.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// An Anthropic Messages endpoint.
#[derive(Debug, Clone)]
pub struct Anthropic {
    name: String,
    endpoint: String,
    api_key: Option<SecretString>,
    http: reqwest::Client,
}

impl Anthropic {
    /// `base_url` is the host without the version, e.g. `https://api.anthropic.com`; a trailing
    /// `/v1` is tolerated (the endpoint is then `{base_url}/messages`).
    #[must_use]
    pub fn new(
        name: &str,
        base_url: &str,
        api_key: Option<SecretString>,
        http: reqwest::Client,
    ) -> Self {
        let base = base_url.trim_end_matches('/');
        let endpoint = if base.ends_with("/v1") {
            format!("{base}/messages")
        } else {
            format!("{base}/v1/messages")
        };
        Self {
            name: name.to_owned(),
            endpoint,
            api_key,
            http,
        }
    }

    pub(super) fn body(req: &Request<'_>) -> Value {
        // Consecutive tool answers go in one user turn, a tool_result block each: the turn
        // after the assistant's tool_use blocks answers them all.
        let mut messages: Vec<Value> = Vec::new();
        for turn in req.turns() {
            let message = match turn.role {
                Role::Tool => {
                    let result = json!({
                        "type": "tool_result",
                        "tool_use_id": turn.tool_call_id,
                        "content": turn.text,
                    });
                    if let Some(last) = messages.last_mut()
                        && last["role"] == "user"
                        && last["content"][0]["type"] == "tool_result"
                        && let Some(blocks) = last["content"].as_array_mut()
                    {
                        blocks.push(result);
                        continue;
                    }
                    json!({"role": "user", "content": [result]})
                }
                Role::Assistant if !turn.tool_calls.is_empty() => {
                    let text = (!turn.text.trim().is_empty())
                        .then(|| json!({"type": "text", "text": turn.text}));
                    let uses = turn.tool_calls.iter().map(|c| {
                        json!({"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments_object()})
                    });
                    json!({"role": "assistant", "content": text.into_iter().chain(uses).collect::<Vec<_>>()})
                }
                role => match turn.parts {
                    None => json!({"role": role.as_str(), "content": turn.text}),
                    Some(parts) => {
                        let blocks: Vec<Value> = parts
                            .iter()
                            .map(|p| match p {
                                Part::Text { text } => json!({"type": "text", "text": text}),
                                Part::Image { url: Some(url), .. } => {
                                    json!({"type": "image", "source": {"type": "url", "url": url}})
                                }
                                Part::Image { data, .. } => json!({"type": "image", "source": {
                                    "type": "base64",
                                    "media_type": p.media_type(),
                                    "data": data,
                                }}),
                            })
                            .collect();
                        json!({"role": role.as_str(), "content": blocks})
                    }
                },
            };
            messages.push(message);
        }
        let mut body = json!({
            "model": req.model,
            "max_tokens": req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            "messages": messages,
        });
        if let Some(system) = req.system_text().filter(|s| !s.is_empty()) {
            body["system"] = json!(system);
        }
        if let Some(t) = req.temperature {
            body["temperature"] = json!(t);
        }
        if !req.tools.is_empty() {
            body["tools"] = req
                .tools
                .iter()
                .map(|t| {
                    let mut tool = json!({"name": t.name, "input_schema": t.parameters});
                    if let Some(d) = &t.description {
                        tool["description"] = json!(d);
                    }
                    tool
                })
                .collect();
            if let Some(choice) = req.tool_choice {
                body["tool_choice"] = match choice {
                    ToolChoice::Mode(ToolMode::Auto) => json!({"type": "auto"}),
                    ToolChoice::Mode(ToolMode::None) => json!({"type": "none"}),
                    ToolChoice::Mode(ToolMode::Required) => json!({"type": "any"}),
                    ToolChoice::Named(n) => json!({"type": "tool", "name": n.name}),
                };
            }
        }
        // Structured outputs (`output_config.format`); "any JSON object" has no native form
        // and is checked when the answer comes.
        if let Some(ResponseFormat::JsonSchema { schema, .. }) = req.response_format {
            body["output_config"] = json!({"format": {"type": "json_schema", "schema": schema}});
        }
        if req.sink.is_some() {
            body["stream"] = json!(true);
        }
        if req.prompt_cache {
            mark_cache_breakpoints(&mut body, req);
        }
        body
    }

    async fn call(&self, req: &Request<'_>) -> Result<Completion> {
        let mut builder = self
            .http
            .post(&self.endpoint)
            .timeout(req.timeout)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&Self::body(req));
        if let Some(key) = &self.api_key {
            builder = builder.header("x-api-key", key.expose_secret());
        }
        exchange(&self.name, req, builder, &FORMAT).await
    }
}

/// The fewest prompt tokens Anthropic caches for `model` (its prompt caching docs): 2,048
/// for Haiku 3 and 3.5; 4,096 for Haiku 4.5 and Opus 4.5 and later; 1,024 for the others
/// (Sonnet, Opus 4.1 and earlier). A shorter prefix is not cached and not billed as a write.
#[must_use]
pub fn min_cacheable_tokens(model: &str) -> u64 {
    let m = model.to_ascii_lowercase();
    let minor_after = |family: &str| {
        m.find(family)
            .and_then(|at| m[at + family.len()..].chars().next())
            .and_then(|c| c.to_digit(10))
    };
    if m.contains("haiku") {
        if m.contains("claude-3") { 2048 } else { 4096 }
    } else if minor_after("opus-4-").is_some_and(|d| d >= 5) {
        4096
    } else {
        1024
    }
}

/// Marks the stable prefix for Anthropic's five-minute prompt cache: `cache_control` on the
/// last tool, on the system prompt and on the turn before the last, each where the prefix up
/// to it is long enough to be cached (three breakpoints of the four the API allows). The
/// next request with the same prefix reads it at a tenth of the input price; the first
/// writes it at 1.25 times.
fn mark_cache_breakpoints(body: &mut Value, req: &Request<'_>) {
    let min = min_cacheable_tokens(req.model);
    let prefix = req.cache_prefix();
    let ephemeral = || json!({"type": "ephemeral"});
    if prefix.tools.is_some_and(|n| n >= min)
        && let Some(last) = body["tools"].as_array_mut().and_then(|t| t.last_mut())
    {
        last["cache_control"] = ephemeral();
    }
    if prefix.system.is_some_and(|n| n >= min)
        && let Some(system) = body.get("system").and_then(Value::as_str)
    {
        body["system"] = json!([{"type": "text", "text": system, "cache_control": ephemeral()}]);
    }
    if prefix.leading.is_some_and(|n| n >= min)
        && let Some(messages) = body["messages"].as_array_mut()
        && messages.len() >= 2
    {
        let before_last = messages.len() - 2;
        let turn = &mut messages[before_last]["content"];
        if let Some(text) = turn.as_str() {
            *turn = json!([{"type": "text", "text": text}]);
        }
        if let Some(last) = turn.as_array_mut().and_then(|b| b.last_mut()) {
            last["cache_control"] = ephemeral();
        }
    }
}

/// How this format's answers read.
pub(super) const FORMAT: Format = Format {
    error_message,
    refine: refine_class,
    parse: parse_completion,
    stream: stream_event,
};

/// An event of a streamed message: `message_start` (the input usage), `content_block_delta`
/// (a `text_delta`), `message_delta` (the output tokens so far), `message_stop`, `error`.
fn stream_event(
    v: &Value,
    acc: &mut Streamed,
) -> std::result::Result<Option<String>, (ErrorClass, String)> {
    match v["type"].as_str() {
        Some("message_start") => {
            if let Ok(u) = serde_json::from_value::<MessageUsage>(v["message"]["usage"].clone()) {
                acc.usage = u.to_usage();
            }
            Ok(None)
        }
        Some("content_block_delta") if v["delta"]["type"] == "text_delta" => {
            Ok(v["delta"]["text"].as_str().map(str::to_owned))
        }
        Some("message_delta") => {
            if let Some(n) = v["usage"]["output_tokens"].as_u64() {
                acc.usage.output_tokens = n;
            }
            acc.truncated = v["delta"]["stop_reason"] == "max_tokens";
            Ok(None)
        }
        Some("message_stop") => {
            acc.done = true;
            Ok(None)
        }
        Some("error") => {
            let body = v.to_string();
            let class = match v["error"]["type"].as_str() {
                Some("rate_limit_error") => ErrorClass::RateLimited,
                Some("invalid_request_error") => ErrorClass::Fatal,
                _ => ErrorClass::Retryable,
            };
            Err((class, error_message(&body)))
        }
        _ => Ok(None),
    }
}

impl Provider for Anthropic {
    fn name(&self) -> &str {
        &self.name
    }

    fn complete<'a>(&'a self, request: &'a Request<'_>) -> CallFuture<'a> {
        Box::pin(self.call(request))
    }
}

/// `(error.type, error.message)` of Anthropic's `{"type":"error","error":{...}}` body.
fn error_fields(body: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(body).ok()?;
    let e = v.get("error")?;
    let kind = e.get("type").and_then(Value::as_str).unwrap_or_default();
    let message = e.get("message").and_then(Value::as_str).unwrap_or_default();
    Some((kind.to_owned(), message.to_owned()))
}

/// `type: message` from the error body, or an excerpt of whatever came back.
fn error_message(body: &str) -> String {
    match error_fields(body) {
        Some((kind, message)) if !kind.is_empty() => {
            format!("{kind}: {}", excerpt(&message, 300))
        }
        Some((_, message)) if !message.is_empty() => excerpt(&message, 300),
        _ => excerpt(body, 300),
    }
}

/// Error types and messages that mean more than their status.
fn refine_class(err: &mut Error, body: &str) {
    let Some((kind, message)) = error_fields(body) else {
        return;
    };
    match kind.as_str() {
        "overloaded_error" | "api_error" | "timeout_error" => err.class = ErrorClass::Retryable,
        "rate_limit_error" => err.class = ErrorClass::RateLimited,
        "billing_error" => err.class = ErrorClass::QuotaExhausted,
        _ => {}
    }
    let lower = message.to_ascii_lowercase();
    if lower.contains("credit balance is too low") {
        err.class = ErrorClass::QuotaExhausted;
    } else if lower.contains("prompt is too long") || lower.contains("exceed context limit") {
        err.class = ErrorClass::Fatal;
        err.message = format!("context too long: {}", err.message);
    }
}

#[derive(Deserialize)]
struct MessageResponse {
    content: Vec<Block>,
    stop_reason: Option<String>,
    usage: Option<MessageUsage>,
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    /// A `tool_use` block's id, name and input.
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Value,
}

#[derive(Deserialize)]
struct MessageUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

impl MessageUsage {
    /// Anthropic's `input_tokens` leaves out the cached ones; ours counts every prompt token.
    fn to_usage(&self) -> Usage {
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let written = self.cache_creation_input_tokens.unwrap_or(0);
        Usage {
            input_tokens: self.input_tokens.unwrap_or(0) + read + written,
            output_tokens: self.output_tokens.unwrap_or(0),
            cached_tokens: read,
            cache_write_tokens: written,
            reasoning_tokens: 0,
        }
    }
}

fn parse_completion(body: &str) -> std::result::Result<Completion, (ErrorClass, String)> {
    let parsed: MessageResponse = serde_json::from_str(body).map_err(|e| {
        (
            ErrorClass::Retryable,
            format!(
                "the response is not a message ({e}): {}",
                excerpt(body, 200)
            ),
        )
    })?;
    let text: String = parsed
        .content
        .iter()
        .filter(|b| b.kind == "text")
        .filter_map(|b| b.text.as_deref())
        .collect();
    if parsed.stop_reason.as_deref() == Some("refusal") && text.trim().is_empty() {
        return Err((
            ErrorClass::Fatal,
            "blocked: the model refused (stop_reason refusal)".to_owned(),
        ));
    }
    let usage = parsed
        .usage
        .as_ref()
        .map_or(Usage::default(), MessageUsage::to_usage);
    let tool_calls = parsed
        .content
        .into_iter()
        .filter(|b| b.kind == "tool_use")
        .map(|b| ToolCall {
            id: b.id.unwrap_or_else(made_up_call_id),
            name: b.name.unwrap_or_default(),
            arguments: b.input,
            signature: None,
        })
        .collect();
    Ok(Completion {
        text,
        usage,
        tool_calls,
        json: None,
        truncated: parsed.stop_reason.as_deref() == Some("max_tokens"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::classify_status;

    fn err(status: u16) -> Error {
        Error {
            class: classify_status(status),
            provider: "p".into(),
            model: "m".into(),
            status: Some(status),
            message: "x".into(),
            retry_after: None,
            transport: None,
        }
    }

    fn refined(status: u16, body: &str) -> Error {
        let mut e = err(status);
        e.message = error_message(body);
        refine_class(&mut e, body);
        e
    }

    #[test]
    fn text_blocks_are_joined_and_cached_tokens_count_as_input() {
        let body = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude",
            "content":[{"type":"thinking","thinking":"hmm","signature":"s"},
                       {"type":"text","text":"Hello, "},{"type":"tool_use","id":"t","name":"f","input":{}},
                       {"type":"text","text":"world"}],
            "stop_reason":"end_turn","stop_sequence":null,
            "usage":{"input_tokens":10,"cache_creation_input_tokens":3,"cache_read_input_tokens":20,"output_tokens":7}}"#;
        let c = parse_completion(body).unwrap();
        assert_eq!(c.text, "Hello, world");
        assert_eq!(
            c.usage,
            Usage {
                input_tokens: 33,
                output_tokens: 7,
                cached_tokens: 20,
                cache_write_tokens: 3,
                reasoning_tokens: 0
            }
        );
    }

    fn cacheable<'a>(model: &'a str, system: &'a str, on: bool) -> Request<'a> {
        Request {
            model,
            system: Some(system.into()),
            prompt: "the document".into(),
            prompt_cache: on,
            ..Request::default()
        }
    }

    #[test]
    fn a_long_stable_prefix_is_marked_for_the_cache_and_a_short_one_is_not() {
        let long = "Follow these instructions. ".repeat(200); // 5,400 characters
        let body = Anthropic::body(&cacheable("claude-sonnet-4-5", &long, true));
        assert_eq!(
            body["system"],
            json!([{"type": "text", "text": long, "cache_control": {"type": "ephemeral"}}])
        );
        // Off (the task or the provider file), or under the model's minimum: as before.
        for (model, on) in [
            ("claude-sonnet-4-5", false),
            ("claude-3-5-haiku-latest", true),
        ] {
            assert_eq!(
                Anthropic::body(&cacheable(model, &long, on))["system"],
                json!(long)
            );
        }
        let short = Anthropic::body(&cacheable("claude-sonnet-4-5", "Be brief.", true));
        assert_eq!(short["system"], "Be brief.");
        assert!(!short.to_string().contains("cache_control"));
    }

    #[test]
    fn the_tools_and_the_turns_before_the_last_are_marked_too() {
        let long = "x".repeat(5000);
        let req = Request {
            model: "claude-opus-4-1",
            messages: vec![
                serde_json::from_value(json!({"role": "user", "content": long})).unwrap(),
                serde_json::from_value(json!({"role": "assistant", "content": "noted"})).unwrap(),
            ]
            .into(),
            prompt: "and now?".into(),
            tools: vec![
                serde_json::from_value(json!({"name": "a", "parameters": {"type": "object"}}))
                    .unwrap(),
                serde_json::from_value(json!({"name": "b", "parameters": {"type": "object"}}))
                    .unwrap(),
            ]
            .into(),
            prompt_cache: true,
            ..Request::default()
        };
        let body = Anthropic::body(&req);
        // The tools alone are short: not marked. The history before the last turn is long.
        assert!(body["tools"][1].get("cache_control").is_none());
        assert_eq!(
            body["messages"][1]["content"],
            json!([{"type": "text", "text": "noted", "cache_control": {"type": "ephemeral"}}])
        );
        assert_eq!(body["messages"][2]["content"], "and now?");
        assert_eq!(body.to_string().matches("cache_control").count(), 1);
    }

    #[test]
    fn each_model_family_has_its_minimum() {
        for (model, min) in [
            ("claude-sonnet-4-5-20250929", 1024),
            ("claude-opus-4-20250514", 1024),
            ("claude-opus-4-1-20250805", 1024),
            ("claude-opus-4-5-20251101", 4096),
            ("claude-3-5-haiku-20241022", 2048),
            ("claude-haiku-4-5", 4096),
        ] {
            assert_eq!(min_cacheable_tokens(model), min, "{model}");
        }
    }

    #[test]
    fn null_or_missing_cache_fields_are_zero() {
        let body = r#"{"content":[{"type":"text","text":"x"}],
            "usage":{"input_tokens":5,"output_tokens":2,"cache_read_input_tokens":null}}"#;
        let c = parse_completion(body).unwrap();
        assert_eq!(
            c.usage,
            Usage {
                input_tokens: 5,
                output_tokens: 2,
                ..Usage::default()
            }
        );
    }

    #[test]
    fn a_refusal_is_fatal_and_garbage_is_retryable() {
        let (class, msg) =
            parse_completion(r#"{"content":[],"stop_reason":"refusal","usage":{}}"#).unwrap_err();
        assert_eq!(class, ErrorClass::Fatal);
        assert!(msg.starts_with("blocked"), "{msg}");
        let (class, _) = parse_completion("<html>bad gateway</html>").unwrap_err();
        assert_eq!(class, ErrorClass::Retryable);
    }

    #[test]
    fn errors_are_refined_by_type_and_message() {
        let e = refined(
            529,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        assert_eq!(e.class, ErrorClass::Retryable);
        assert_eq!(e.message, "overloaded_error: Overloaded");

        let e = refined(
            400,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 250000 tokens > 200000 maximum"}}"#,
        );
        assert_eq!(e.class, ErrorClass::Fatal);
        assert_eq!(
            e.message,
            "context too long: invalid_request_error: prompt is too long: 250000 tokens > 200000 maximum"
        );

        let e = refined(
            400,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API."}}"#,
        );
        assert_eq!(e.class, ErrorClass::QuotaExhausted);

        let e = refined(
            401,
            r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#,
        );
        assert_eq!(e.class, ErrorClass::Fatal);

        let e = refined(502, "<html>Bad gateway</html>");
        assert_eq!(e.class, ErrorClass::Retryable);
        assert_eq!(e.message, "<html>Bad gateway</html>");
    }

    #[test]
    fn long_error_messages_are_excerpted() {
        let long = "y".repeat(1000);
        let body =
            format!(r#"{{"type":"error","error":{{"type":"api_error","message":"{long}"}}}}"#);
        let msg = error_message(&body);
        assert_eq!(msg.chars().count(), "api_error: ".len() + 300 + 1, "{msg}");
        assert!(msg.ends_with('…'));
    }

    #[test]
    fn body_and_endpoint() {
        let req = Request {
            model: "claude-x",
            system: Some("be brief".into()),
            prompt: "hi".into(),
            max_tokens: None,
            temperature: Some(0.5),
            timeout: std::time::Duration::from_secs(1),
            ..Request::default()
        };
        let body = Anthropic::body(&req);
        assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(body["system"], "be brief");
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(body["messages"][0]["role"], "user");
        assert_eq!(body["messages"][0]["content"], "hi");
        let req = Request {
            max_tokens: Some(7),
            system: None,
            temperature: None,
            ..req
        };
        let body = Anthropic::body(&req);
        assert_eq!(body["max_tokens"], 7);
        assert!(body.get("system").is_none() && body.get("temperature").is_none());

        let http = reqwest::Client::new();
        let a = Anthropic::new("a", "https://api.anthropic.com/", None, http.clone());
        assert_eq!(a.endpoint, "https://api.anthropic.com/v1/messages");
        let b = Anthropic::new("b", "https://proxy/v1", None, http);
        assert_eq!(b.endpoint, "https://proxy/v1/messages");
    }
}

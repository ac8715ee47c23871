//! OpenAI chat completions (`POST {base_url}/chat/completions`), which also serves every
//! OpenAI-compatible server: DeepSeek, Groq, OpenRouter, vLLM, llama.cpp, Ollama's `/v1`.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    CallFuture, Completion, Error, Format, Part, Provider, Request, ResponseFormat, Result, Role,
    Streamed, Tool, ToolCall, ToolChoice, ToolMode, Usage, excerpt, exchange,
};
use crate::conversation::made_up_call_id;
use crate::outcome::ErrorClass;

/// What the server understands beyond the common chat-completions body: OpenAI's own API
/// wants `max_completion_tokens` (its reasoning models reject `max_tokens`) and takes a
/// `prompt_cache_key`; compatible servers know only `max_tokens`, and some refuse a field
/// they do not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Compatible,
}

impl Dialect {
    /// The dialect of a provider of `kind`.
    #[must_use]
    pub fn of(kind: crate::config::Kind) -> Self {
        if kind == crate::config::Kind::Openai {
            Dialect::OpenAi
        } else {
            Dialect::Compatible
        }
    }
}

/// A chat-completions endpoint.
#[derive(Debug, Clone)]
pub struct OpenAi {
    name: String,
    endpoint: String,
    api_key: Option<SecretString>,
    dialect: Dialect,
    http: reqwest::Client,
}

impl OpenAi {
    /// `base_url` is up to and including the version, e.g. `https://api.openai.com/v1`.
    #[must_use]
    pub fn new(
        name: &str,
        base_url: &str,
        api_key: Option<SecretString>,
        dialect: Dialect,
        http: reqwest::Client,
    ) -> Self {
        Self {
            name: name.to_owned(),
            endpoint: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            api_key,
            dialect,
            http,
        }
    }

    fn body(&self, req: &Request<'_>) -> Value {
        body(req, self.dialect)
    }

    async fn call(&self, req: &Request<'_>) -> Result<Completion> {
        let mut builder = self
            .http
            .post(&self.endpoint)
            .timeout(req.timeout)
            .json(&self.body(req));
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key.expose_secret());
        }
        exchange(&self.name, req, builder, &FORMAT).await
    }
}

/// The chat-completions body of `req`, in `dialect`.
pub(super) fn body(req: &Request<'_>, dialect: Dialect) -> Value {
    let mut messages = Vec::with_capacity(2 + req.messages.len());
    // OpenAI refuses `json_object` unless a message mentions JSON.
    let hint = matches!(req.response_format, Some(ResponseFormat::JsonObject))
        && !req
            .system_text()
            .is_some_and(|s| s.to_lowercase().contains("json"))
        && !req.turns().any(|t| t.text.to_lowercase().contains("json"));
    match (req.system_text(), hint) {
        (Some(system), true) => {
            messages
                .push(json!({"role": "system", "content": format!("{system}\n\nAnswer in JSON.")}));
        }
        (Some(system), false) => messages.push(json!({"role": "system", "content": system})),
        (None, true) => messages.push(json!({"role": "system", "content": "Answer in JSON."})),
        (None, false) => {}
    }
    for turn in req.turns() {
        messages.push(match turn.role {
            Role::Tool => json!({
                "role": "tool",
                "tool_call_id": turn.tool_call_id,
                "content": turn.text,
            }),
            Role::Assistant if !turn.tool_calls.is_empty() => json!({
                "role": "assistant",
                "content": (!turn.text.trim().is_empty()).then_some(&turn.text),
                "tool_calls": turn.tool_calls.iter().map(|c| json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": match &c.arguments {
                        Value::String(text) => text.clone(),
                        Value::Null => "{}".to_owned(),
                        args => args.to_string(),
                    }},
                })).collect::<Vec<_>>(),
            }),
            role => json!({"role": role.as_str(), "content": content(&turn)}),
        });
    }
    let mut body = json!({"model": req.model, "messages": messages});
    if let Some(max) = req.max_tokens {
        let field = match dialect {
            Dialect::OpenAi => "max_completion_tokens",
            Dialect::Compatible => "max_tokens",
        };
        body[field] = json!(max);
    }
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    if !req.tools.is_empty() {
        body["tools"] = tools(&req.tools);
        if let Some(choice) = &req.tool_choice {
            body["tool_choice"] = tool_choice(choice);
        }
    }
    if let Some(format) = &req.response_format {
        body["response_format"] = response_format(format);
    }
    if req.sink.is_some() {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    if req.prompt_cache
        && dialect == Dialect::OpenAi
        && req
            .cache_prefix()
            .longest(OPENAI_MIN_CACHED_TOKENS)
            .is_some()
    {
        body["prompt_cache_key"] = json!(prompt_cache_key(&body));
    }
    body
}

/// OpenAI caches prompts of at least this many tokens, by itself.
pub(crate) const OPENAI_MIN_CACHED_TOKENS: u64 = 1024;

/// A key naming the body's stable prefix (its tools and every message but the last), so
/// that OpenAI sends requests sharing it to the same cache: FNV-1a of their JSON, the same
/// from every worker and every build.
fn prompt_cache_key(body: &Value) -> String {
    let messages = body["messages"].as_array().map_or(&[][..], Vec::as_slice);
    let stable = &messages[..messages.len().saturating_sub(1)];
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in body["tools"]
        .to_string()
        .bytes()
        .chain(serde_json::to_string(stable).unwrap_or_default().bytes())
    {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("llmq-{hash:016x}")
}

/// How this format's answers read.
pub(super) const FORMAT: Format = Format {
    error_message,
    refine: refine_class,
    parse: |body| parse_completion(body).map_err(|m| (ErrorClass::Retryable, m)),
    stream: stream_event,
};

/// A chunk of a streamed chat completion: its `delta.content`; the last chunk, with
/// `stream_options.include_usage`, carries the usage.
fn stream_event(
    v: &Value,
    acc: &mut Streamed,
) -> std::result::Result<Option<String>, (ErrorClass, String)> {
    if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
        let message = e["message"]
            .as_str()
            .unwrap_or("the stream reported an error");
        return Err((ErrorClass::Retryable, excerpt(message, 300)));
    }
    if let Some(u) = v.get("usage").filter(|u| !u.is_null())
        && let Ok(u) = serde_json::from_value::<ChatUsage>(u.clone())
    {
        acc.usage = u.to_usage();
    }
    let choice = &v["choices"][0];
    if let Some(finish) = choice["finish_reason"].as_str() {
        acc.done = true;
        acc.truncated = finish == "length";
    }
    Ok(choice["delta"]["content"].as_str().map(str::to_owned))
}

impl Provider for OpenAi {
    fn name(&self) -> &str {
        &self.name
    }

    fn complete<'a>(&'a self, request: &'a Request<'_>) -> CallFuture<'a> {
        Box::pin(self.call(request))
    }
}

/// A turn's content: its text, or its parts with images as `image_url` (a URL, or the data
/// as a `data:` URL).
fn content(turn: &super::Turn<'_>) -> Value {
    let Some(parts) = turn.parts else {
        return json!(turn.text);
    };
    parts
        .iter()
        .map(|p| match p {
            Part::Text { text } => json!({"type": "text", "text": text}),
            Part::Image { url, data, .. } => {
                let url = match (url, data) {
                    (Some(url), _) => url.clone(),
                    (None, data) => format!(
                        "data:{};base64,{}",
                        p.media_type(),
                        data.as_deref().unwrap_or_default()
                    ),
                };
                json!({"type": "image_url", "image_url": {"url": url}})
            }
        })
        .collect()
}

/// Tools as chat completions (and Ollama) take them.
pub(super) fn tools(tools: &[Tool]) -> Value {
    tools
        .iter()
        .map(|t| {
            let mut function = json!({"name": t.name, "parameters": t.parameters});
            if let Some(d) = &t.description {
                function["description"] = json!(d);
            }
            json!({"type": "function", "function": function})
        })
        .collect()
}

fn tool_choice(choice: &ToolChoice) -> Value {
    match choice {
        ToolChoice::Mode(ToolMode::Auto) => json!("auto"),
        ToolChoice::Mode(ToolMode::None) => json!("none"),
        ToolChoice::Mode(ToolMode::Required) => json!("required"),
        ToolChoice::Named(n) => json!({"type": "function", "function": {"name": n.name}}),
    }
}

fn response_format(format: &ResponseFormat) -> Value {
    match format {
        ResponseFormat::JsonObject => json!({"type": "json_object"}),
        ResponseFormat::JsonSchema { schema, strict, .. } => {
            let mut spec = json!({"name": format.name(), "schema": schema});
            if let Some(strict) = strict {
                spec["strict"] = json!(strict);
            }
            json!({"type": "json_schema", "json_schema": spec})
        }
    }
}

/// OpenAI's `{"error": {"message", "code"}}` body, or an excerpt of whatever came back.
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(|m| excerpt(m, 300)))
        .unwrap_or_else(|| excerpt(body, 300))
}

/// Codes that mean more than their status: an exhausted billing quota also comes as 429, and
/// a too-long prompt as 400.
fn refine_class(err: &mut Error, body: &str) {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return;
    };
    let code = v["error"]["code"].as_str().or(v["error"]["type"].as_str());
    match code {
        Some("insufficient_quota") => err.class = ErrorClass::QuotaExhausted,
        Some("context_length_exceeded") => {
            err.class = ErrorClass::Fatal;
            err.message = format!("context too long: {}", err.message);
        }
        _ => {}
    }
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<Choice>,
    usage: Option<ChatUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<WireToolCall>,
}

#[derive(Deserialize)]
pub(super) struct WireToolCall {
    #[serde(default)]
    id: Option<String>,
    function: WireFunction,
}

#[derive(Deserialize)]
struct WireFunction {
    name: String,
    /// A JSON text (OpenAI); an object (Ollama, some compatible servers).
    #[serde(default)]
    arguments: Value,
}

/// The tool calls of an answer; a call without an id gets one made up.
pub(super) fn tool_calls(calls: Vec<WireToolCall>) -> Vec<ToolCall> {
    calls
        .into_iter()
        .map(|c| ToolCall {
            id: c.id.unwrap_or_else(made_up_call_id),
            name: c.function.name,
            arguments: match c.function.arguments {
                // Arguments that are not JSON are kept as the model wrote them.
                Value::String(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
                other => other,
            },
            signature: None,
        })
        .collect()
}

#[derive(Deserialize)]
struct ChatUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    prompt_tokens_details: Option<PromptDetails>,
    completion_tokens_details: Option<CompletionDetails>,
}

impl ChatUsage {
    fn to_usage(&self) -> Usage {
        Usage {
            input_tokens: self.prompt_tokens,
            output_tokens: self.completion_tokens,
            cached_tokens: self
                .prompt_tokens_details
                .as_ref()
                .map_or(0, |d| d.cached_tokens),
            cache_write_tokens: 0,
            reasoning_tokens: self
                .completion_tokens_details
                .as_ref()
                .map_or(0, |d| d.reasoning_tokens),
        }
    }
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: u64,
}

#[derive(Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: u64,
}

fn parse_completion(body: &str) -> std::result::Result<Completion, String> {
    let parsed: ChatResponse = serde_json::from_str(body).map_err(|e| {
        format!(
            "the response is not a chat completion ({e}): {}",
            excerpt(body, 200)
        )
    })?;
    let choice = parsed.choices.into_iter().next();
    let truncated = choice
        .as_ref()
        .is_some_and(|c| c.finish_reason.as_deref() == Some("length"));
    let message = choice.map(|c| c.message);
    let (text, calls) = match message {
        Some(Message {
            content,
            tool_calls: calls,
        }) if content.is_some() || !calls.is_empty() => {
            (content.unwrap_or_default(), tool_calls(calls))
        }
        _ => {
            return Err(format!(
                "the response has no message content: {}",
                excerpt(body, 200)
            ));
        }
    };
    let usage = parsed.usage.map_or(Usage::default(), |u| u.to_usage());
    Ok(Completion {
        text,
        usage,
        tool_calls: calls,
        json: None,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_cut_by_the_output_limit_is_truncated() {
        let body = |finish: &str| {
            format!(
                r#"{{"choices":[{{"message":{{"content":"hi"}},"finish_reason":"{finish}"}}]}}"#
            )
        };
        assert!(parse_completion(&body("length")).unwrap().truncated);
        assert!(!parse_completion(&body("stop")).unwrap().truncated);
        let mut acc = Streamed::default();
        let chunk = r#"{"choices":[{"delta":{},"finish_reason":"length"}]}"#;
        stream_event(&serde_json::from_str(chunk).unwrap(), &mut acc).unwrap();
        assert!(acc.done && acc.truncated);
    }

    #[test]
    fn usage_maps_cached_and_reasoning_tokens() {
        let body = r#"{"choices":[{"message":{"role":"assistant","content":"hi"}}],
            "usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,
            "prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":2}}}"#;
        let c = parse_completion(body).unwrap();
        assert_eq!(c.text, "hi");
        assert_eq!(
            c.usage,
            Usage {
                input_tokens: 10,
                output_tokens: 5,
                cached_tokens: 4,
                cache_write_tokens: 0,
                reasoning_tokens: 2
            }
        );
    }

    #[test]
    fn quota_and_context_errors_are_refined() {
        let mut err = Error {
            class: ErrorClass::RateLimited,
            provider: "p".into(),
            model: "m".into(),
            status: Some(429),
            message: "x".into(),
            retry_after: None,
            transport: None,
        };
        refine_class(&mut err, r#"{"error":{"code":"insufficient_quota"}}"#);
        assert_eq!(err.class, ErrorClass::QuotaExhausted);
        refine_class(&mut err, r#"{"error":{"code":"context_length_exceeded"}}"#);
        assert_eq!(err.class, ErrorClass::Fatal);
        assert!(err.message.starts_with("context too long"));
    }

    #[test]
    fn json_object_gets_the_word_json_openai_requires() {
        let http = reqwest::Client::new();
        let a = OpenAi::new("a", "http://x/v1", None, Dialect::Compatible, http);
        let json = ResponseFormat::JsonObject;
        let mut req = Request {
            model: "m",
            prompt: "list three colours".into(),
            response_format: Some(&json),
            ..Request::default()
        };
        let body = a.body(&req);
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][0]["content"], "Answer in JSON.");
        assert_eq!(body["response_format"]["type"], "json_object");
        req.system = Some("be brief".into());
        assert_eq!(
            a.body(&req)["messages"][0]["content"],
            "be brief\n\nAnswer in JSON."
        );
        // A prompt that says JSON itself needs no hint.
        req.prompt = "list three colours as JSON".into();
        assert_eq!(a.body(&req)["messages"][0]["content"], "be brief");
    }

    #[test]
    fn the_output_limit_follows_the_dialect() {
        let req = Request {
            model: "m",
            system: Some("s".into()),
            prompt: "p".into(),
            max_tokens: Some(7),
            timeout: std::time::Duration::from_secs(1),
            ..Request::default()
        };
        let http = reqwest::Client::new();
        let a = OpenAi::new("a", "http://x/v1/", None, Dialect::OpenAi, http.clone());
        assert_eq!(a.body(&req)["max_completion_tokens"], 7);
        assert_eq!(a.endpoint, "http://x/v1/chat/completions");
        let b = OpenAi::new("b", "http://x/v1", None, Dialect::Compatible, http);
        let body = b.body(&req);
        assert_eq!(body["max_tokens"], 7);
        assert_eq!(body["messages"][0]["role"], "system");
    }

    #[test]
    fn openai_gets_a_prompt_cache_key_naming_the_stable_prefix() {
        fn req<'a>(system: &'a str, prompt: &'a str, on: bool) -> Request<'a> {
            Request {
                model: "gpt-4o",
                system: Some(system.into()),
                prompt: prompt.into(),
                prompt_cache: on,
                ..Request::default()
            }
        }
        let long = "The same long instructions. ".repeat(200);
        let key = |r: &Request<'_>, dialect| body(r, dialect)["prompt_cache_key"].clone();
        let a = key(&req(&long, "document one", true), Dialect::OpenAi);
        assert!(a.as_str().is_some_and(|k| k.starts_with("llmq-")), "{a}");
        // The same prefix, another document: the same key; another prefix: another key.
        assert_eq!(key(&req(&long, "document two", true), Dialect::OpenAi), a);
        assert_ne!(
            key(
                &req(&format!("{long}!"), "document one", true),
                Dialect::OpenAi
            ),
            a
        );
        // Not to a compatible server (some refuse fields they do not know), not when off,
        // not for a prefix too short for OpenAI to cache.
        for (r, dialect) in [
            (req(&long, "d", true), Dialect::Compatible),
            (req(&long, "d", false), Dialect::OpenAi),
            (req("Be brief.", "d", true), Dialect::OpenAi),
        ] {
            assert!(body(&r, dialect).get("prompt_cache_key").is_none());
        }
    }
}

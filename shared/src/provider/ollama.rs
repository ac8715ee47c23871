//! Ollama's native chat API (`POST {base_url}/api/chat`, not streamed).
//!
//! Ollama's OpenAI-compatible `/v1` is served by the `openai` module; this one reads Ollama's
//! own token counts and error bodies.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{
    CallFuture, Completion, Error, Format, Part, Provider, Request, ResponseFormat, Result,
    Streamed, ToolChoice, ToolMode, Usage, excerpt, exchange,
};
use crate::outcome::ErrorClass;

/// An Ollama server.
#[derive(Debug, Clone)]
pub struct Ollama {
    name: String,
    endpoint: String,
    http: reqwest::Client,
}

impl Ollama {
    /// `base_url` is the server, e.g. `http://127.0.0.1:11434`.
    #[must_use]
    pub fn new(name: &str, base_url: &str, http: reqwest::Client) -> Self {
        Self {
            name: name.to_owned(),
            endpoint: format!("{}/api/chat", base_url.trim_end_matches('/')),
            http,
        }
    }

    fn body(req: &Request<'_>) -> Value {
        let mut messages = Vec::with_capacity(2 + req.messages.len());
        if let Some(system) = req.system_text().filter(|s| !s.is_empty()) {
            messages.push(json!({"role": "system", "content": system}));
        }
        for turn in req.turns() {
            // A blank text beside tool calls is no text.
            let text = if turn.text.trim().is_empty() {
                ""
            } else {
                &turn.text
            };
            let mut m = json!({"role": turn.role.as_str(), "content": text});
            // Ollama takes images as base64 only (routing sends it no image by URL).
            let images: Vec<&str> = turn
                .parts
                .unwrap_or_default()
                .iter()
                .filter_map(|p| match p {
                    Part::Image { data: Some(d), .. } => Some(d.as_str()),
                    _ => None,
                })
                .collect();
            if !images.is_empty() {
                m["images"] = json!(images);
            }
            if !turn.tool_calls.is_empty() {
                m["tool_calls"] = turn
                    .tool_calls
                    .iter()
                    .map(|c| json!({"function": {"name": c.name, "arguments": c.arguments_object()}}))
                    .collect();
            }
            if let Some(id) = turn.tool_call_id {
                // Ollama matches a tool's answer by the tool's name.
                if let Some(call) = req
                    .messages
                    .iter()
                    .flat_map(|m| &m.tool_calls)
                    .find(|c| c.id == id)
                {
                    m["tool_name"] = json!(call.name);
                }
            }
            messages.push(m);
        }
        let mut body =
            json!({"model": req.model, "messages": messages, "stream": req.sink.is_some()});
        let mut options = Map::new();
        if let Some(max) = req.max_tokens {
            options.insert("num_predict".to_owned(), json!(max));
        }
        if let Some(t) = req.temperature {
            options.insert("temperature".to_owned(), json!(t));
        }
        if !options.is_empty() {
            body["options"] = Value::Object(options);
        }
        // Ollama has no tool_choice: "none" sends no tools; a required or named tool cannot
        // be enforced, and its answer is taken as it comes.
        if !req.tools.is_empty() && req.tool_choice != Some(&ToolChoice::Mode(ToolMode::None)) {
            body["tools"] = super::openai::tools(&req.tools);
        }
        match req.response_format {
            Some(ResponseFormat::JsonSchema { schema, .. }) => body["format"] = schema.clone(),
            Some(ResponseFormat::JsonObject) => body["format"] = json!("json"),
            None => {}
        }
        body
    }

    async fn call(&self, req: &Request<'_>) -> Result<Completion> {
        let builder = self
            .http
            .post(&self.endpoint)
            .timeout(req.timeout)
            .json(&Self::body(req));
        exchange(&self.name, req, builder, &FORMAT).await
    }
}

/// How this format's answers read.
const FORMAT: Format = Format {
    error_message,
    refine: |err, _| refine_class(err),
    parse: |body| parse_completion(body).map_err(|m| (ErrorClass::Retryable, m)),
    stream: stream_event,
};

/// A line of Ollama's NDJSON stream: the next `message.content`, and with `done` the counts.
fn stream_event(
    v: &Value,
    acc: &mut Streamed,
) -> std::result::Result<Option<String>, (ErrorClass, String)> {
    if let Some(e) = v["error"].as_str() {
        return Err((ErrorClass::Retryable, excerpt(e, 300)));
    }
    if v["done"] == true {
        acc.done = true;
        acc.truncated = v["done_reason"] == "length";
        acc.usage = Usage {
            input_tokens: v["prompt_eval_count"].as_u64().unwrap_or(0),
            output_tokens: v["eval_count"].as_u64().unwrap_or(0),
            ..Usage::default()
        };
    }
    Ok(v["message"]["content"].as_str().map(str::to_owned))
}

impl Provider for Ollama {
    fn name(&self) -> &str {
        &self.name
    }

    fn complete<'a>(&'a self, request: &'a Request<'_>) -> CallFuture<'a> {
        Box::pin(self.call(request))
    }
}

/// Ollama's `{"error": "..."}` body, or an excerpt of whatever came back.
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            v.get("error")
                .and_then(Value::as_str)
                .map(|m| excerpt(m, 300))
        })
        .unwrap_or_else(|| excerpt(body, 300))
}

/// A prompt longer than the context (when Ollama is told not to truncate) is fatal whatever
/// the status.
fn refine_class(err: &mut Error) {
    let lower = err.message.to_ascii_lowercase();
    if lower.contains("exceeds the context length") || lower.contains("exceeds maximum context") {
        err.class = ErrorClass::Fatal;
        err.message = format!("context too long: {}", err.message);
    }
}

#[derive(Deserialize)]
struct ChatResponse {
    message: Option<Message>,
    error: Option<String>,
    /// Absent when the whole prompt came from Ollama's cache.
    prompt_eval_count: Option<u64>,
    eval_count: Option<u64>,
    /// `length` when `num_predict` cut the answer short.
    #[serde(default)]
    done_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: String,
    #[serde(default)]
    tool_calls: Vec<super::openai::WireToolCall>,
}

fn parse_completion(body: &str) -> std::result::Result<Completion, String> {
    let parsed: ChatResponse = serde_json::from_str(body).map_err(|e| {
        format!(
            "the response is not an Ollama chat answer ({e}): {}",
            excerpt(body, 200)
        )
    })?;
    if let Some(error) = parsed.error {
        return Err(excerpt(&error, 300));
    }
    let message = parsed
        .message
        .ok_or_else(|| format!("the response has no message: {}", excerpt(body, 200)))?;
    Ok(Completion {
        text: message.content,
        usage: Usage {
            input_tokens: parsed.prompt_eval_count.unwrap_or(0),
            output_tokens: parsed.eval_count.unwrap_or(0),
            cached_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
        },
        tool_calls: super::openai::tool_calls(message.tool_calls),
        json: None,
        truncated: parsed.done_reason.as_deref() == Some("length"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::classify_status;
    use std::time::Duration;

    #[test]
    fn counts_map_to_usage() {
        let body = r#"{"model":"llama3.2","created_at":"2025-01-01T00:00:00Z",
            "message":{"role":"assistant","content":"Hello!","thinking":"hmm"},
            "done_reason":"stop","done":true,"total_duration":1,"load_duration":1,
            "prompt_eval_count":26,"prompt_eval_duration":1,"eval_count":5,"eval_duration":1}"#;
        let c = parse_completion(body).unwrap();
        assert_eq!(c.text, "Hello!");
        assert_eq!(
            c.usage,
            Usage {
                input_tokens: 26,
                output_tokens: 5,
                ..Usage::default()
            }
        );
        // A fully cached prompt has no prompt_eval_count.
        let c = parse_completion(
            r#"{"message":{"role":"assistant","content":"x"},"done":true,"eval_count":1}"#,
        )
        .unwrap();
        assert_eq!(c.usage.input_tokens, 0);
    }

    #[test]
    fn malformed_or_streamed_answers_are_errors() {
        let streamed = "{\"message\":{\"content\":\"a\"},\"done\":false}\n{\"done\":true}\n";
        assert!(parse_completion(streamed).is_err());
        assert!(parse_completion(r#"{"done":true}"#).is_err());
        assert_eq!(parse_completion(r#"{"error":"boom"}"#).unwrap_err(), "boom");
    }

    #[test]
    fn errors_are_read_and_refined() {
        let mut e = Error {
            class: classify_status(404),
            provider: "p".into(),
            model: "m".into(),
            status: Some(404),
            message: error_message(r#"{"error":"model \"x\" not found, try pulling it first"}"#),
            retry_after: None,
            transport: None,
        };
        refine_class(&mut e);
        assert_eq!(e.class, ErrorClass::Fatal);
        assert_eq!(e.message, "model \"x\" not found, try pulling it first");
        e.class = classify_status(500);
        e.message = error_message(r#"{"error":"the input length exceeds the context length"}"#);
        refine_class(&mut e);
        assert_eq!(e.class, ErrorClass::Fatal);
        assert!(e.message.starts_with("context too long: "), "{}", e.message);
        assert_eq!(error_message("plain text 502"), "plain text 502");
    }

    #[test]
    fn body_and_endpoint() {
        let req = Request {
            model: "llama3.2",
            system: Some("be brief".into()),
            prompt: "hi".into(),
            max_tokens: Some(9),
            temperature: Some(0.5),
            timeout: Duration::from_secs(1),
            ..Request::default()
        };
        let body = Ollama::body(&req);
        assert_eq!(body["stream"], false);
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][1]["content"], "hi");
        assert_eq!(body["options"]["num_predict"], 9);
        assert_eq!(body["options"]["temperature"], 0.5);
        let bare = Ollama::body(&Request {
            system: None,
            max_tokens: None,
            temperature: None,
            ..req
        });
        assert_eq!(bare["messages"].as_array().map(Vec::len), Some(1));
        assert!(bare.get("options").is_none());
        let o = Ollama::new("o", "http://127.0.0.1:11434/", reqwest::Client::new());
        assert_eq!(o.endpoint, "http://127.0.0.1:11434/api/chat");
    }
}

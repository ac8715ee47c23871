//! Google's Gemini API (`POST {base_url}/models/{model}:generateContent`).

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{
    CallFuture, Completion, Error, Format, Provider, Request, ResponseFormat, Result, Role,
    Streamed, ToolCall, ToolChoice, ToolMode, Usage, excerpt, exchange,
};
use crate::conversation::made_up_call_id;
use crate::outcome::ErrorClass;

/// Candidate finish reasons that mean the answer was withheld.
const BLOCKING_FINISH: &[&str] = &[
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "LANGUAGE",
    "IMAGE_SAFETY",
];

/// A Gemini endpoint.
#[derive(Debug, Clone)]
pub struct Gemini {
    name: String,
    base_url: String,
    api_key: Option<SecretString>,
    http: reqwest::Client,
}

impl Gemini {
    /// `base_url` is up to and including the version, e.g.
    /// `https://generativelanguage.googleapis.com/v1beta`.
    #[must_use]
    pub fn new(
        name: &str,
        base_url: &str,
        api_key: Option<SecretString>,
        http: reqwest::Client,
    ) -> Self {
        Self {
            name: name.to_owned(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            http,
        }
    }

    /// The model may be given bare (`gemini-2.5-flash`) or as a resource (`models/...`).
    fn endpoint(&self, model: &str) -> String {
        let model = model.strip_prefix("models/").unwrap_or(model);
        format!("{}/models/{model}:generateContent", self.base_url)
    }

    fn streaming_endpoint(&self, model: &str) -> String {
        let model = model.strip_prefix("models/").unwrap_or(model);
        format!(
            "{}/models/{model}:streamGenerateContent?alt=sse",
            self.base_url
        )
    }

    pub(super) fn body(req: &Request<'_>) -> Value {
        // Consecutive tool answers go in one content, a functionResponse part each: as many
        // as the calls of the model's turn before.
        let mut contents: Vec<Value> = Vec::new();
        for turn in req.turns() {
            let content = match turn.role {
                // A tool's answer is a functionResponse part, named after the call it answers
                // (the check at the door makes sure the turn before made that call).
                Role::Tool => {
                    let id = turn.tool_call_id.unwrap_or_default();
                    let name = req
                        .messages
                        .iter()
                        .flat_map(|m| &m.tool_calls)
                        .find(|c| c.id == id)
                        .map_or(id, |c| c.name.as_str());
                    // Its response must be an object: a JSON object answer as is, else wrapped.
                    let response = serde_json::from_str::<Value>(&turn.text)
                        .ok()
                        .filter(Value::is_object)
                        .unwrap_or_else(|| json!({"result": turn.text}));
                    let part =
                        json!({"functionResponse": {"id": id, "name": name, "response": response}});
                    if let Some(last) = contents.last_mut()
                        && last["parts"][0].get("functionResponse").is_some()
                        && let Some(parts) = last["parts"].as_array_mut()
                    {
                        parts.push(part);
                        continue;
                    }
                    json!({"role": "user", "parts": [part]})
                }
                role => {
                    let text: Vec<Value> = match turn.parts {
                        None if turn.text.trim().is_empty() => Vec::new(),
                        None => vec![json!({"text": turn.text})],
                        Some(parts) => parts
                            .iter()
                            .map(|p| match p {
                                super::Part::Text { text } => json!({"text": text}),
                                super::Part::Image { url: Some(url), .. } => json!({"fileData": {
                                    "mimeType": p.media_type(), "fileUri": url,
                                }}),
                                super::Part::Image { data, .. } => json!({"inlineData": {
                                    "mimeType": p.media_type(), "data": data,
                                }}),
                            })
                            .collect(),
                    };
                    let calls = turn.tool_calls.iter().map(|c| {
                        let mut part = json!({"functionCall": {"id": c.id, "name": c.name, "args": c.arguments_object()}});
                        if let Some(sig) = &c.signature {
                            part["thoughtSignature"] = json!(sig);
                        }
                        part
                    });
                    let role = if role == Role::Assistant {
                        "model"
                    } else {
                        "user"
                    };
                    json!({"role": role, "parts": text.into_iter().chain(calls).collect::<Vec<_>>()})
                }
            };
            contents.push(content);
        }
        let mut body = json!({"contents": contents});
        if let Some(system) = req.system_text().filter(|s| !s.is_empty()) {
            body["systemInstruction"] = json!({"parts": [{"text": system}]});
        }
        let mut config = Map::new();
        if let Some(max) = req.max_tokens {
            config.insert("maxOutputTokens".to_owned(), json!(max));
        }
        if let Some(t) = req.temperature {
            config.insert("temperature".to_owned(), json!(t));
        }
        if let Some(format) = req.response_format {
            config.insert("responseMimeType".to_owned(), json!("application/json"));
            if let ResponseFormat::JsonSchema { schema, .. } = format {
                config.insert("responseJsonSchema".to_owned(), schema.clone());
            }
        }
        if !config.is_empty() {
            body["generationConfig"] = Value::Object(config);
        }
        if !req.tools.is_empty() {
            let declarations: Vec<Value> = req
                .tools
                .iter()
                .map(|t| {
                    let mut f = json!({"name": t.name, "parametersJsonSchema": t.parameters});
                    if let Some(d) = &t.description {
                        f["description"] = json!(d);
                    }
                    f
                })
                .collect();
            body["tools"] = json!([{"functionDeclarations": declarations}]);
            if let Some(choice) = req.tool_choice {
                let config = match choice {
                    ToolChoice::Mode(ToolMode::Auto) => json!({"mode": "AUTO"}),
                    ToolChoice::Mode(ToolMode::None) => json!({"mode": "NONE"}),
                    ToolChoice::Mode(ToolMode::Required) => json!({"mode": "ANY"}),
                    ToolChoice::Named(n) => {
                        json!({"mode": "ANY", "allowedFunctionNames": [n.name]})
                    }
                };
                body["toolConfig"] = json!({"functionCallingConfig": config});
            }
        }
        body
    }

    async fn call(&self, req: &Request<'_>) -> Result<Completion> {
        let mut builder = self
            .http
            .post(if req.sink.is_some() {
                self.streaming_endpoint(req.model)
            } else {
                self.endpoint(req.model)
            })
            .timeout(req.timeout)
            .json(&Self::body(req));
        if let Some(key) = &self.api_key {
            builder = builder.header("x-goog-api-key", key.expose_secret());
        }
        exchange(&self.name, req, builder, &FORMAT).await
    }
}

/// How this format's answers read.
pub(super) const FORMAT: Format = Format {
    error_message,
    refine: refine_class,
    parse: parse_completion,
    stream: stream_event,
};

/// A chunk of `streamGenerateContent?alt=sse`: a whole response object with the next text;
/// its usage is the running total, and a finish reason ends it.
fn stream_event(
    v: &Value,
    acc: &mut Streamed,
) -> std::result::Result<Option<String>, (ErrorClass, String)> {
    if let Some(reason) = v["promptFeedback"]["blockReason"].as_str() {
        return Err((ErrorClass::Fatal, format!("blocked: {reason}")));
    }
    if let Ok(u) = serde_json::from_value::<UsageMetadata>(v["usageMetadata"].clone()) {
        acc.usage = u.to_usage();
    }
    let candidate = &v["candidates"][0];
    if let Some(finish) = candidate["finishReason"].as_str() {
        if BLOCKING_FINISH.contains(&finish) && acc.text.is_empty() {
            return Err((ErrorClass::Fatal, format!("blocked: {finish}")));
        }
        acc.done = true;
        acc.truncated = finish == "MAX_TOKENS";
    }
    let text: String = candidate["content"]["parts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|p| p["thought"] != true)
        .filter_map(|p| p["text"].as_str())
        .collect();
    Ok(Some(text))
}

impl Provider for Gemini {
    fn name(&self) -> &str {
        &self.name
    }

    fn complete<'a>(&'a self, request: &'a Request<'_>) -> CallFuture<'a> {
        Box::pin(self.call(request))
    }
}

/// Google's `{"error":{"code","message","status","details"}}`, sometimes wrapped in an array.
fn error_object(body: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(body).ok()?;
    let v = match v {
        Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
        other => other,
    };
    v.get("error").filter(|e| e.is_object()).cloned()
}

/// `STATUS: message` from the error body, or an excerpt of whatever came back.
fn error_message(body: &str) -> String {
    let Some(e) = error_object(body) else {
        return excerpt(body, 300);
    };
    let message = e.get("message").and_then(Value::as_str).unwrap_or_default();
    match e.get("status").and_then(Value::as_str) {
        Some(status) if !status.is_empty() => format!("{status}: {}", excerpt(message, 300)),
        _ if !message.is_empty() => excerpt(message, 300),
        _ => excerpt(body, 300),
    }
}

/// Google statuses that mean more than the HTTP status; a too-long prompt; the wait from a
/// `RetryInfo` detail when there was no `Retry-After` header.
fn refine_class(err: &mut Error, body: &str) {
    let Some(e) = error_object(body) else {
        return;
    };
    match e.get("status").and_then(Value::as_str) {
        Some("RESOURCE_EXHAUSTED") => err.class = ErrorClass::RateLimited,
        Some("UNAVAILABLE" | "INTERNAL" | "DEADLINE_EXCEEDED") => {
            err.class = ErrorClass::Retryable;
        }
        _ => {}
    }
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_ascii_lowercase();
    if message.contains("input token count") && message.contains("exceeds the maximum") {
        err.class = ErrorClass::Fatal;
        err.message = format!("context too long: {}", err.message);
    }
    if err.class == ErrorClass::RateLimited && daily_quota(&e) {
        // A per-day quota comes back at midnight Pacific time, as Google documents, whatever
        // a `RetryInfo` says: the task waits for that (bounded by routing.max_wait like any
        // wait for a provider), after the other candidates were tried.
        let now = chrono::Utc::now();
        let reset = next_pacific_midnight(now);
        err.retry_after = (reset - now).to_std().ok();
        err.message = format!(
            "{} (a per-day quota; it resets at midnight Pacific time, {})",
            err.message,
            reset.format("%Y-%m-%d %H:%M UTC")
        );
        return;
    }
    if err.retry_after.is_none() {
        err.retry_after = retry_info(&e);
    }
}

/// The first midnight in Pacific time (America/Los_Angeles) after `now`: 08:00 UTC, or 07:00
/// UTC while daylight saving time holds (from the second Sunday of March to the first Sunday
/// of November, the US rule since 2007).
fn next_pacific_midnight(now: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    use chrono::{Datelike, NaiveDate, Weekday};
    let nth_sunday = |year: i32, month: u32, n: u8| {
        NaiveDate::from_weekday_of_month_opt(year, month, Weekday::Sun, n).unwrap_or_default()
    };
    // Midnight starts a day on daylight time from the day after DST begins (it begins at
    // 02:00) up to the day it ends (it ends at 02:00, after that day's midnight).
    let midnight = |d: NaiveDate| {
        let dst = d > nth_sunday(d.year(), 3, 2) && d <= nth_sunday(d.year(), 11, 1);
        let hours = if dst { 7 } else { 8 };
        d.and_hms_opt(hours, 0, 0).unwrap_or_default().and_utc()
    };
    // The Pacific date is at most a day behind; the next midnight is at most two days on.
    let day = (now - chrono::Duration::hours(8)).date_naive();
    day.iter_days()
        .take(3)
        .map(midnight)
        .find(|m| *m > now)
        .unwrap_or_else(|| now + chrono::Duration::days(1))
}

/// Whether a `google.rpc.QuotaFailure` detail names a per-day quota.
fn daily_quota(error: &Value) -> bool {
    error
        .get("details")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|d| d.get("violations")?.as_array())
        .flatten()
        .any(|v| {
            v.get("quotaId")
                .and_then(Value::as_str)
                .is_some_and(|q| q.contains("PerDay"))
        })
}

/// The `retryDelay` of a `google.rpc.RetryInfo` detail, e.g. `"12s"` or `"0.250s"`.
fn retry_info(error: &Value) -> Option<Duration> {
    error
        .get("details")?
        .as_array()?
        .iter()
        .filter(|d| {
            d.get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with("google.rpc.RetryInfo"))
        })
        .find_map(|d| d.get("retryDelay").and_then(Value::as_str))
        .and_then(parse_proto_duration)
}

/// A protobuf JSON duration: decimal seconds with an `s` suffix.
fn parse_proto_duration(text: &str) -> Option<Duration> {
    let secs: f64 = text.trim().strip_suffix('s')?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateResponse {
    #[serde(default)]
    candidates: Vec<Candidate>,
    prompt_feedback: Option<PromptFeedback>,
    usage_metadata: Option<UsageMetadata>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<Content>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    text: Option<String>,
    /// A thought summary, not part of the answer.
    #[serde(default)]
    thought: bool,
    function_call: Option<FunctionCall>,
    /// Gemini 3's signature of the thinking behind a call, which must come back with it.
    thought_signature: Option<String>,
}

#[derive(Deserialize)]
struct FunctionCall {
    #[serde(default)]
    id: Option<String>,
    name: String,
    #[serde(default)]
    args: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    cached_content_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
}

impl UsageMetadata {
    /// Thoughts are billed as output: ours counts them in `output_tokens` and as reasoning.
    fn to_usage(&self) -> Usage {
        Usage {
            input_tokens: self.prompt_token_count,
            output_tokens: self.candidates_token_count + self.thoughts_token_count,
            cached_tokens: self.cached_content_token_count,
            cache_write_tokens: 0,
            reasoning_tokens: self.thoughts_token_count,
        }
    }
}

fn parse_completion(body: &str) -> std::result::Result<Completion, (ErrorClass, String)> {
    let parsed: GenerateResponse = serde_json::from_str(body).map_err(|e| {
        (
            ErrorClass::Retryable,
            format!(
                "the response is not a generateContent answer ({e}): {}",
                excerpt(body, 200)
            ),
        )
    })?;
    if let Some(reason) = parsed.prompt_feedback.and_then(|f| f.block_reason) {
        return Err((ErrorClass::Fatal, format!("blocked: {reason}")));
    }
    let Some(candidate) = parsed.candidates.into_iter().next() else {
        return Err((
            ErrorClass::Fatal,
            "blocked: the response has no candidates".to_owned(),
        ));
    };
    let finish = candidate.finish_reason.unwrap_or_default();
    let has_content = candidate.content.is_some();
    let parts: Vec<Part> = candidate
        .content
        .map(|c| c.parts)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| !p.thought)
        .collect();
    let text: String = parts.iter().filter_map(|p| p.text.as_deref()).collect();
    let tool_calls: Vec<ToolCall> = parts
        .into_iter()
        .filter_map(|p| Some((p.function_call?, p.thought_signature)))
        .map(|(f, signature)| ToolCall {
            id: f.id.unwrap_or_else(made_up_call_id),
            name: f.name,
            arguments: f.args,
            signature,
        })
        .collect();
    if text.is_empty() && BLOCKING_FINISH.contains(&finish.as_str()) {
        return Err((ErrorClass::Fatal, format!("blocked: {finish}")));
    }
    if !has_content && finish != "MAX_TOKENS" {
        return Err((
            ErrorClass::Retryable,
            format!(
                "the candidate has no content (finish reason {finish:?}): {}",
                excerpt(body, 200)
            ),
        ));
    }
    let usage = parsed.usage_metadata.unwrap_or_default().to_usage();
    Ok(Completion {
        text,
        usage,
        tool_calls,
        json: None,
        truncated: finish == "MAX_TOKENS",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_per_day_quota_waits_for_midnight_pacific_not_for_its_retry_info() {
        let body = r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"quota",
            "details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[
              {"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests",
               "quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},
              {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"16s"}]}}"#;
        let before = chrono::Utc::now();
        let mut err = Error::new("g", "m", ErrorClass::RateLimited, "x".into());
        refine_class(&mut err, body);
        assert_eq!(err.class, ErrorClass::RateLimited);
        let wait = err.retry_after.unwrap();
        let reset = next_pacific_midnight(before);
        let expected = (reset - before).to_std().unwrap();
        assert!(
            wait <= expected && expected - wait < Duration::from_secs(5),
            "{wait:?}"
        );
        assert!(
            err.message.contains("resets at midnight Pacific time"),
            "{}",
            err.message
        );
        let per_minute = body.replace("PerDay", "PerMinute");
        let mut err = Error::new("g", "m", ErrorClass::RateLimited, "x".into());
        refine_class(&mut err, &per_minute);
        assert_eq!(err.class, ErrorClass::RateLimited);
        assert_eq!(err.retry_after, Some(Duration::from_secs(16)));
    }

    #[test]
    fn pacific_midnight_follows_daylight_saving_time() {
        let at = |s: &str| s.parse::<chrono::DateTime<chrono::Utc>>().unwrap();
        let next = |s: &str| next_pacific_midnight(at(s)).to_rfc3339();
        // Winter: PST, UTC-8.
        assert_eq!(next("2026-01-15T12:00:00Z"), "2026-01-16T08:00:00+00:00");
        assert_eq!(next("2026-01-16T07:59:59Z"), "2026-01-16T08:00:00+00:00");
        assert_eq!(next("2026-01-16T08:00:00Z"), "2026-01-17T08:00:00+00:00");
        // DST begins on Sunday 2026-03-08 at 02:00 PST: that day starts on PST, the next on PDT.
        assert_eq!(next("2026-03-07T09:00:00Z"), "2026-03-08T08:00:00+00:00");
        assert_eq!(next("2026-03-08T08:00:00Z"), "2026-03-09T07:00:00+00:00");
        // Summer: PDT, UTC-7.
        assert_eq!(next("2026-07-04T06:59:00Z"), "2026-07-04T07:00:00+00:00");
        assert_eq!(next("2026-07-04T07:00:00Z"), "2026-07-05T07:00:00+00:00");
        // DST ends on Sunday 2026-11-01 at 02:00 PDT: that day starts on PDT, the next on PST.
        assert_eq!(next("2026-10-31T08:00:00Z"), "2026-11-01T07:00:00+00:00");
        assert_eq!(next("2026-11-01T07:00:00Z"), "2026-11-02T08:00:00+00:00");
        // New year.
        assert_eq!(next("2026-12-31T23:00:00Z"), "2027-01-01T08:00:00+00:00");
    }
    use crate::provider::classify_status;

    fn refined(status: u16, wait: Option<Duration>, body: &str) -> Error {
        let mut e = Error {
            class: classify_status(status),
            provider: "p".into(),
            model: "m".into(),
            status: Some(status),
            message: error_message(body),
            retry_after: wait,
            transport: None,
        };
        refine_class(&mut e, body);
        e
    }

    #[test]
    fn parts_are_joined_and_thoughts_are_output() {
        let body = r#"{"candidates":[{"content":{"role":"model","parts":[
                {"text":"thinking...","thought":true},{"text":"Hello, "},{"text":"world"}]},
              "finishReason":"STOP","index":0}],
            "usageMetadata":{"promptTokenCount":100,"candidatesTokenCount":8,"totalTokenCount":138,
              "cachedContentTokenCount":40,"thoughtsTokenCount":30},
            "modelVersion":"gemini-2.5-flash","responseId":"abc"}"#;
        let c = parse_completion(body).unwrap();
        assert_eq!(c.text, "Hello, world");
        assert_eq!(
            c.usage,
            Usage {
                input_tokens: 100,
                output_tokens: 38,
                cached_tokens: 40,
                cache_write_tokens: 0,
                reasoning_tokens: 30
            }
        );
    }

    #[test]
    fn omitted_usage_fields_are_zero() {
        let body = r#"{"candidates":[{"content":{"parts":[{"text":"x"}]}}],
            "usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1}}"#;
        let c = parse_completion(body).unwrap();
        assert_eq!(
            c.usage,
            Usage {
                input_tokens: 3,
                output_tokens: 1,
                ..Usage::default()
            }
        );
    }

    #[test]
    fn blocked_answers_are_fatal() {
        let (class, msg) = parse_completion(
            r#"{"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":5}}"#,
        )
        .unwrap_err();
        assert_eq!(
            (class, msg.as_str()),
            (ErrorClass::Fatal, "blocked: SAFETY")
        );
        let (class, msg) = parse_completion(r#"{"candidates":[]}"#).unwrap_err();
        assert_eq!(class, ErrorClass::Fatal);
        assert!(msg.starts_with("blocked: "), "{msg}");
        let (class, msg) =
            parse_completion(r#"{"candidates":[{"finishReason":"RECITATION"}]}"#).unwrap_err();
        assert_eq!(
            (class, msg.as_str()),
            (ErrorClass::Fatal, "blocked: RECITATION")
        );
        // Out of output tokens while thinking: an empty answer, not an error.
        let c = parse_completion(r#"{"candidates":[{"finishReason":"MAX_TOKENS"}]}"#).unwrap();
        assert_eq!(c.text, "");
        assert!(c.truncated);
        let (class, _) =
            parse_completion(r#"{"candidates":[{"finishReason":"OTHER"}]}"#).unwrap_err();
        assert_eq!(class, ErrorClass::Retryable);
        let (class, _) = parse_completion("not json").unwrap_err();
        assert_eq!(class, ErrorClass::Retryable);
    }

    #[test]
    fn rate_limits_read_retry_info_when_there_is_no_header() {
        let body = r#"{"error":{"code":429,"message":"You exceeded your current quota.",
            "status":"RESOURCE_EXHAUSTED","details":[
              {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[]},
              {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"12s"}]}}"#;
        let e = refined(429, None, body);
        assert_eq!(e.class, ErrorClass::RateLimited);
        assert_eq!(e.retry_after, Some(Duration::from_secs(12)));
        assert_eq!(
            e.message,
            "RESOURCE_EXHAUSTED: You exceeded your current quota."
        );
        // The header wins.
        let e = refined(429, Some(Duration::from_secs(3)), body);
        assert_eq!(e.retry_after, Some(Duration::from_secs(3)));
        assert_eq!(
            parse_proto_duration("0.250s"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_proto_duration("12"), None);
        assert_eq!(parse_proto_duration("-1s"), None);
    }

    #[test]
    fn statuses_and_context_errors_are_refined() {
        let e = refined(
            400,
            None,
            r#"{"error":{"code":400,"message":"The input token count (3475108) exceeds the maximum number of tokens allowed (1048576).","status":"INVALID_ARGUMENT"}}"#,
        );
        assert_eq!(e.class, ErrorClass::Fatal);
        assert!(
            e.message
                .starts_with("context too long: INVALID_ARGUMENT: The input"),
            "{}",
            e.message
        );
        let e = refined(
            400,
            None,
            r#"[{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT"}}]"#,
        );
        assert_eq!(e.class, ErrorClass::Fatal);
        assert_eq!(e.message, "INVALID_ARGUMENT: API key not valid.");
        let e = refined(
            503,
            None,
            r#"{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}"#,
        );
        assert_eq!(e.class, ErrorClass::Retryable);
        let e = refined(502, None, "<html>bad gateway</html>");
        assert_eq!(e.class, ErrorClass::Retryable);
        assert_eq!(e.message, "<html>bad gateway</html>");
    }

    #[test]
    fn body_and_endpoint() {
        let req = Request {
            model: "models/gemini-2.5-flash",
            system: Some("be brief".into()),
            prompt: "hi".into(),
            max_tokens: Some(9),
            temperature: Some(0.5),
            timeout: Duration::from_secs(1),
            ..Request::default()
        };
        let body = Gemini::body(&req);
        assert_eq!(body["contents"][0]["role"], "user");
        assert_eq!(body["contents"][0]["parts"][0]["text"], "hi");
        assert_eq!(body["systemInstruction"]["parts"][0]["text"], "be brief");
        assert_eq!(body["generationConfig"]["maxOutputTokens"], 9);
        assert_eq!(body["generationConfig"]["temperature"], 0.5);
        let bare = Gemini::body(&Request {
            system: None,
            max_tokens: None,
            temperature: None,
            ..req.clone()
        });
        assert!(bare.get("systemInstruction").is_none());
        assert!(bare.get("generationConfig").is_none());
        let g = Gemini::new("g", "https://x/v1beta/", None, reqwest::Client::new());
        assert_eq!(
            g.endpoint(req.model),
            "https://x/v1beta/models/gemini-2.5-flash:generateContent"
        );
    }
}

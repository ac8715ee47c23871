//! The mock over real HTTP, route by route.

use super::*;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "Bearer sk-test";

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// One raw HTTP/1.1 request with `Connection: close`.
async fn http(
    server: &MockServer,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&str>,
) -> HttpResponse {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    http_with(server, method, path, &headers, body).await
}

/// One raw HTTP/1.1 request with these headers and `Connection: close`.
async fn http_with(
    server: &MockServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpResponse {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        server.addr()
    );
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = body.unwrap_or("");
    if method == "POST" {
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

async fn chat(server: &MockServer, body: &Value) -> HttpResponse {
    http(
        server,
        "POST",
        "/v1/chat/completions",
        Some(KEY),
        Some(&body.to_string()),
    )
    .await
}

fn ask(model: &str, prompt: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": prompt}]})
}

async fn server() -> MockServer {
    MockServer::start(MockOptions::default()).await.unwrap()
}

fn assert_error(resp: &HttpResponse, status: u16, kind: &str, code: &str) {
    assert_eq!(resp.status, status, "{}", resp.body);
    let v = resp.json();
    let e = &v["error"];
    assert_eq!(e["type"], kind, "{v}");
    assert_eq!(e["code"], code, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e.get("param").is_some(), "param must be present: {v}");
    assert_eq!(e.as_object().unwrap().len(), 4, "{v}");
}

#[tokio::test]
async fn success_has_openai_shape_and_deterministic_usage() {
    let s = server().await;
    let system = "You are terse."; // 14 chars -> 4 tokens
    let prompt = "Summarise the following text in one sentence, please, thanks!!! extra"; // 69
    let resp = chat(
        &s,
        &json!({
            "model": "mock-fast",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": prompt},
            ],
            "temperature": 0.2,
        }),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let rid = resp.header("x-request-id").unwrap();
    uuid::Uuid::parse_str(rid).unwrap();
    let v = resp.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "mock-fast");
    assert!(v["created"].as_i64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    let expected: String = format!(
        "mock answer from mock-fast: {}",
        prompt.chars().take(60).collect::<String>()
    );
    assert_eq!(choice["message"]["content"], expected.as_str());
    assert_eq!(choice["finish_reason"], "stop");
    let u = &v["usage"];
    let prompt_tokens = (4 + 3) + (69_u64.div_ceil(4) + 3);
    assert_eq!(u["prompt_tokens"], prompt_tokens);
    let completion_tokens = (expected.chars().count() as u64).div_ceil(4);
    assert_eq!(u["completion_tokens"], completion_tokens);
    assert_eq!(u["total_tokens"], prompt_tokens + completion_tokens);
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], 0);
    // x-request-id is fresh per response.
    let again = chat(&s, &ask("mock-fast", "hi")).await;
    assert_ne!(again.header("x-request-id").unwrap(), rid);
}

#[tokio::test]
async fn max_tokens_truncates_with_finish_reason_length() {
    let s = server().await;
    for field in ["max_tokens", "max_completion_tokens"] {
        let mut body = ask(
            "mock-fast",
            "a fairly long prompt that produces many tokens",
        );
        body[field] = json!(3);
        let v = chat(&s, &body).await.json();
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{field}");
        assert_eq!(
            v["choices"][0]["message"]["content"], "mock answer ",
            "{field}"
        );
        assert_eq!(v["usage"]["completion_tokens"], 3, "{field}");
    }
    // A generous limit changes nothing.
    let mut body = ask("mock-fast", "x");
    body["max_tokens"] = json!(1000);
    let v = chat(&s, &body).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn cached_and_reasoning_tokens() {
    let s = server().await;
    let system = "s".repeat(400);
    let v = chat(
        &s,
        &json!({"model": "mock-reason", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "why?"},
        ]}),
    )
    .await
    .json();
    let u = &v["usage"];
    let prompt = 100 + 3 + 1 + 3;
    assert_eq!(u["prompt_tokens"], prompt);
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], prompt / 2);
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!(completion > 1);
    assert_eq!(
        u["completion_tokens_details"]["reasoning_tokens"],
        completion / 2
    );

    // 399 characters of system prompt: nothing cached.
    let v = chat(
        &s,
        &json!({"model": "mock-fast", "messages": [
            {"role": "system", "content": "s".repeat(399)},
            {"role": "user", "content": "why?"},
        ]}),
    )
    .await
    .json();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
}

#[tokio::test]
async fn content_arrays_are_read_as_text() {
    let s = server().await;
    let v = chat(
        &s,
        &json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hello "},
            {"type": "text", "text": "world"},
        ]}]}),
    )
    .await
    .json();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "mock answer from m: hello world"
    );
}

#[tokio::test]
async fn fail_models_give_openai_error_bodies() {
    let s = server().await;
    let resp = chat(&s, &ask("fail-500", "hi")).await;
    assert_error(&resp, 500, "server_error", "server_error");
    assert_eq!(resp.json()["error"]["param"], Value::Null);
    assert!(resp.header("x-request-id").is_some());
    assert!(resp.header("retry-after").is_none());

    assert_error(
        &chat(&s, &ask("fail-503", "hi")).await,
        503,
        "server_error",
        "service_unavailable",
    );
    assert_error(
        &chat(&s, &ask("fail-400", "hi")).await,
        400,
        "invalid_request_error",
        "invalid_value",
    );
    assert_error(
        &chat(&s, &ask("fail-401", "hi")).await,
        401,
        "invalid_request_error",
        "invalid_api_key",
    );
    let resp = chat(&s, &ask("fail-404", "hi")).await;
    assert_error(&resp, 404, "invalid_request_error", "model_not_found");
    assert!(
        resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fail-404")
    );
    assert_error(
        &chat(&s, &ask("fail-502", "hi")).await,
        502,
        "server_error",
        "bad_gateway",
    );
}

#[tokio::test]
async fn context_too_long() {
    let s = server().await;
    let resp = chat(&s, &ask("context-too-long", "hi")).await;
    assert_error(
        &resp,
        400,
        "invalid_request_error",
        "context_length_exceeded",
    );
    let msg = resp.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        msg.starts_with("This model's maximum context length is 128000 tokens"),
        "{msg}"
    );
}

#[tokio::test]
async fn rate_limits_carry_retry_after() {
    let s = server().await;
    let resp = chat(&s, &ask("rate-limit", "hi")).await;
    assert_error(&resp, 429, "rate_limit_exceeded", "rate_limit_exceeded");
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert!(resp.header("retry-after-ms").is_none());

    let resp = chat(&s, &ask("rate-limit-ms", "hi")).await;
    assert_error(&resp, 429, "rate_limit_exceeded", "rate_limit_exceeded");
    assert_eq!(resp.header("retry-after-ms"), Some("200"));
    assert!(resp.header("retry-after").is_none());

    let resp = chat(&s, &ask("rate-limit-date", "hi")).await;
    assert_error(&resp, 429, "rate_limit_exceeded", "rate_limit_exceeded");
    let date = resp.header("retry-after").unwrap();
    assert!(date.ends_with(" GMT"), "{date}");
    let when = chrono::DateTime::parse_from_rfc2822(date).unwrap();
    let wait = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    assert!(
        wait > chrono::Duration::milliseconds(1500) && wait <= chrono::Duration::seconds(3),
        "{wait}"
    );
}

#[tokio::test]
async fn flaky_fails_exactly_twice_per_conversation() {
    let s = server().await;
    let statuses = |n| {
        let s = &s;
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(chat(s, &ask("flaky", "conversation A")).await.status);
            }
            out
        }
    };
    assert_eq!(statuses(4).await, [500, 500, 200, 200]);
    // Another conversation has its own count.
    assert_eq!(chat(&s, &ask("flaky", "conversation B")).await.status, 500);
    let resp = chat(&s, &ask("flaky-1", "conversation C")).await;
    assert_error(&resp, 500, "server_error", "server_error");
    assert_eq!(
        chat(&s, &ask("flaky-1", "conversation C")).await.status,
        200
    );
    assert_eq!(
        chat(&s, &ask("flaky-0", "conversation D")).await.status,
        200
    );
}

#[tokio::test]
async fn marker_in_last_user_message_wins_over_model() {
    let s = server().await;
    let resp = chat(&s, &ask("mock-fast", "task 7 [[mock:fail-500]]")).await;
    assert_error(&resp, 500, "server_error", "server_error");
    assert_eq!(chat(&s, &ask("mock-fast", "task 8")).await.status, 200);
    // An unknown marker is ignored.
    assert_eq!(
        chat(&s, &ask("mock-fast", "[[mock:nonsense]]"))
            .await
            .status,
        200
    );
    // Flaky by marker.
    let p = "[[mock:flaky-1]] hello";
    assert_eq!(chat(&s, &ask("mock-fast", p)).await.status, 500);
    assert_eq!(chat(&s, &ask("mock-fast", p)).await.status, 200);
    // Only the last user message counts.
    let body = json!({"model": "mock-fast", "messages": [
        {"role": "user", "content": "[[mock:fail-500]]"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "fine now"},
    ]});
    assert_eq!(chat(&s, &body).await.status, 200);
    // A marker overrides a failing model too.
    let resp = chat(&s, &ask("fail-500", "[[mock:rate-limit]]")).await;
    assert_eq!(resp.status, 429);
    // Slow by marker.
    let start = Instant::now();
    let resp = chat(&s, &ask("mock-fast", "[[mock:slow-200]] wait")).await;
    assert_eq!(resp.status, 200);
    assert!(start.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn slow_models_and_latency_delay_the_answer() {
    let s = server().await;
    let start = Instant::now();
    assert_eq!(chat(&s, &ask("slow-300", "hi")).await.status, 200);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");

    let s = MockServer::start(MockOptions {
        latency: Duration::from_millis(150),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let start = Instant::now();
    assert_eq!(chat(&s, &ask("mock-fast", "hi")).await.status, 200);
    assert!(start.elapsed() >= Duration::from_millis(150));
    // Errors are not delayed.
    let start = Instant::now();
    assert_eq!(chat(&s, &ask("fail-500", "hi")).await.status, 500);
    assert!(start.elapsed() < Duration::from_millis(150));
}

#[tokio::test]
async fn missing_or_empty_auth_is_401() {
    let s = server().await;
    let body = ask("mock-fast", "hi").to_string();
    for auth in [None, Some("Bearer "), Some("Basic abc"), Some("sk-test")] {
        let resp = http(&s, "POST", "/v1/chat/completions", auth, Some(&body)).await;
        assert_error(&resp, 401, "invalid_request_error", "invalid_api_key");
    }
    let resp = http(
        &s,
        "POST",
        "/v1/chat/completions",
        Some("bearer k"),
        Some(&body),
    )
    .await;
    assert_eq!(resp.status, 200);
}

#[tokio::test]
async fn malformed_requests_are_400() {
    let s = server().await;
    let post = |body: &'static str| {
        let s = &s;
        async move { http(s, "POST", "/v1/chat/completions", Some(KEY), Some(body)).await }
    };
    let resp = post("{not json").await;
    assert_error(&resp, 400, "invalid_request_error", "invalid_json");
    let resp = post("").await;
    assert_error(&resp, 400, "invalid_request_error", "invalid_json");
    let resp = post("[1,2]").await;
    assert_error(&resp, 400, "invalid_request_error", "invalid_type");
    let resp = post(r#"{"model":"m"}"#).await;
    assert_error(
        &resp,
        400,
        "invalid_request_error",
        "missing_required_parameter",
    );
    assert_eq!(resp.json()["error"]["param"], "messages");
    let resp = post(r#"{"messages":[{"role":"user","content":"hi"}]}"#).await;
    assert_error(
        &resp,
        400,
        "invalid_request_error",
        "missing_required_parameter",
    );
    assert_eq!(resp.json()["error"]["param"], "model");
    let resp = post(r#"{"model":"m","messages":[]}"#).await;
    assert_error(&resp, 400, "invalid_request_error", "empty_array");
    let resp = post(r#"{"model":"m","messages":"hi"}"#).await;
    assert_error(&resp, 400, "invalid_request_error", "invalid_type");
    let resp =
        post(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#).await;
    assert_error(
        &resp,
        400,
        "invalid_request_error",
        "decimal_above_max_value",
    );
    // The server is still fine afterwards.
    assert_eq!(chat(&s, &ask("m", "hi")).await.status, 200);
}

#[tokio::test]
async fn calls_are_counted_per_model_whatever_the_outcome() {
    let s = server().await;
    assert_eq!(s.calls("mock-fast"), 0);
    assert_eq!(s.total_calls(), 0);
    chat(&s, &ask("mock-fast", "a")).await;
    chat(&s, &ask("mock-fast", "b")).await;
    chat(&s, &ask("fail-500", "c")).await;
    chat(&s, &ask("flaky", "d")).await;
    let body = ask("mock-fast", "no key").to_string();
    http(&s, "POST", "/v1/chat/completions", None, Some(&body)).await;
    http(&s, "POST", "/v1/chat/completions", Some(KEY), Some("{oops")).await;
    // Without /v1 too.
    let resp = http(&s, "POST", "/chat/completions", Some(KEY), Some(&body)).await;
    assert_eq!(resp.status, 200);
    // Other routes are not chat calls.
    http(&s, "GET", "/v1/models", Some(KEY), None).await;
    assert_eq!(s.calls("mock-fast"), 4);
    assert_eq!(s.calls("fail-500"), 1);
    assert_eq!(s.calls("flaky"), 1);
    assert_eq!(s.calls("mock-smart"), 0);
    assert_eq!(s.total_calls(), 7);
}

#[tokio::test]
async fn models_healthz_and_unknown_urls() {
    let s = server().await;
    assert!(s.url().starts_with("http://127.0.0.1:"));
    assert!(!s.url().ends_with('/'));
    let resp = http(&s, "GET", "/healthz", None, None).await;
    assert_eq!((resp.status, resp.body.as_str()), (200, "ok"));
    let v = http(&s, "GET", "/v1/models", Some(KEY), None).await.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, MAGIC_MODELS);
    assert_eq!(v["data"][0]["object"], "model");
    let resp = http(&s, "GET", "/v2/nothing", None, None).await;
    assert_error(&resp, 404, "invalid_request_error", "unknown_url");
}

#[tokio::test]
async fn shutdown_ends_a_hanging_timeout_request() {
    let s = server().await;
    let addr = s.addr();
    let body = ask("timeout", "hang").to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Authorization: {KEY}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let client = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        raw
    });
    // Wait until the request has arrived.
    let start = Instant::now();
    while s.calls("timeout") == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!client.is_finished(), "timeout must not answer on its own");
    tokio::time::timeout(Duration::from_secs(3), s.shutdown())
        .await
        .unwrap();
    let raw = tokio::time::timeout(Duration::from_secs(3), client)
        .await
        .unwrap()
        .unwrap();
    assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
    // The port no longer accepts connections.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn dropping_the_server_stops_it() {
    let s = server().await;
    let addr = s.addr();
    assert_eq!(http(&s, "GET", "/healthz", None, None).await.status, 200);
    drop(s);
    let start = Instant::now();
    while TcpStream::connect(addr).await.is_ok() {
        assert!(start.elapsed() < Duration::from_secs(5), "still listening");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- Anthropic route ----

type Headers<'a> = &'a [(&'a str, &'a str)];

const ANTHROPIC_HEADERS: &[(&str, &str)] = &[
    ("x-api-key", "sk-ant-test"),
    ("anthropic-version", "2023-06-01"),
];

async fn messages(server: &MockServer, body: &Value) -> HttpResponse {
    http_with(
        server,
        "POST",
        "/v1/messages",
        ANTHROPIC_HEADERS,
        Some(&body.to_string()),
    )
    .await
}

fn ask_anthropic(model: &str, prompt: &str) -> Value {
    json!({"model": model, "max_tokens": 1024,
           "messages": [{"role": "user", "content": prompt}]})
}

fn assert_anthropic_error(resp: &HttpResponse, status: u16, kind: &str) -> String {
    assert_eq!(resp.status, status, "{}", resp.body);
    let v = resp.json();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(resp.header("request-id").is_some());
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!message.is_empty(), "{v}");
    message
}

/// Anthropic's cache: a marked prefix of at least the model's minimum is written by the first
/// request and read by the next (sent after that answer), the rest of the prompt being input;
/// a marked prefix under the minimum, or another model, is neither.
#[tokio::test]
async fn anthropic_caches_what_cache_control_marks() {
    let s = server().await;
    let marked = |model: &str, system: &str, prompt: &str| {
        json!({"model": model, "max_tokens": 64,
            "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": prompt}]})
    };
    let usage = async |model: &str, system: &str, prompt: &str| {
        let v = messages(&s, &marked(model, system, prompt)).await.json();
        [
            "input_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
        ]
        .map(|k| v["usage"][k].as_u64().unwrap())
    };
    let long = "x".repeat(8000); // 2,000 tokens + 3: over Sonnet's 1,024
    let first = usage("claude-sonnet-4-5", &long, "one").await;
    assert_eq!(first, [tokens("one") + 3, 0, 2003]);
    let second = usage("claude-sonnet-4-5", &long, "two").await;
    assert_eq!(second, [tokens("two") + 3, 2003, 0]);
    // Another model has a cache of its own; Haiku 3.5's minimum is 2,048.
    let haiku = usage("claude-3-5-haiku", &long, "one").await;
    assert_eq!(haiku, [2003 + tokens("one") + 3, 0, 0]);
    let short = usage("claude-sonnet-4-5", "brief", "one").await;
    assert_eq!(short, [tokens("brief") + 3 + tokens("one") + 3, 0, 0]);
    let billed = s.anthropic_billed();
    assert_eq!(billed[1..3], [2003, 2003]);
}

#[tokio::test]
async fn anthropic_success_has_messages_shape_and_usage() {
    let s = server().await;
    let system = "s".repeat(400); // 100 tokens
    let resp = messages(
        &s,
        &json!({"model": "claude-reason", "max_tokens": 1024, "system": system,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let v = resp.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["stop_reason"], "end_turn");
    // The thinking block comes first; the text is the usual answer.
    assert_eq!(v["content"][0]["type"], "thinking");
    assert_eq!(v["content"][1]["type"], "text");
    let text = "mock answer from claude-reason: hello";
    assert_eq!(v["content"][1]["text"], text);
    // prompt = (100 + 3) + (2 + 3) = 108; nothing marked for the cache: all of it input.
    let u = &v["usage"];
    assert_eq!(u["cache_read_input_tokens"], 0);
    assert_eq!(u["input_tokens"], 108);
    assert_eq!(u["cache_creation_input_tokens"], 0);
    assert_eq!(u["output_tokens"], tokens(text));

    let mut body = ask_anthropic("claude-x", "a fairly long prompt to cut");
    body["max_tokens"] = json!(2);
    let v = messages(&s, &body).await.json();
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["content"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["content"][0]["text"], "mock ans");
    assert_eq!(v["usage"]["output_tokens"], 2);
    assert_eq!(v["usage"]["cache_read_input_tokens"], 0);
}

#[tokio::test]
async fn anthropic_needs_a_key_and_a_version() {
    let s = server().await;
    let body = ask_anthropic("claude-x", "hi").to_string();
    for headers in [
        &[][..],
        &[("anthropic-version", "2023-06-01")][..],
        &[("x-api-key", " "), ("anthropic-version", "2023-06-01")][..],
        &[("x-api-key", "sk-ant")][..],
        // A bearer token is not Anthropic's auth.
        &[
            ("Authorization", "Bearer sk"),
            ("anthropic-version", "2023-06-01"),
        ][..],
    ] {
        let resp = http_with(&s, "POST", "/v1/messages", headers, Some(&body)).await;
        assert_anthropic_error(&resp, 401, "authentication_error");
    }
}

#[tokio::test]
async fn anthropic_errors_have_anthropic_shape() {
    let s = server().await;
    for (model, status, kind) in [
        ("fail-500", 500, "api_error"),
        ("fail-529", 529, "overloaded_error"),
        ("fail-503", 503, "api_error"),
        ("fail-400", 400, "invalid_request_error"),
        ("fail-401", 401, "authentication_error"),
        ("fail-403", 403, "permission_error"),
        ("fail-404", 404, "not_found_error"),
    ] {
        let resp = messages(&s, &ask_anthropic(model, "hi")).await;
        assert_anthropic_error(&resp, status, kind);
    }
    let resp = messages(&s, &ask_anthropic("context-too-long", "hi")).await;
    let msg = assert_anthropic_error(&resp, 400, "invalid_request_error");
    assert_eq!(msg, "prompt is too long: 250000 tokens > 200000 maximum");

    let resp = messages(&s, &ask_anthropic("rate-limit", "hi")).await;
    assert_anthropic_error(&resp, 429, "rate_limit_error");
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert_eq!(
        resp.header("anthropic-ratelimit-requests-remaining"),
        Some("0")
    );
    let resp = messages(&s, &ask_anthropic("rate-limit-ms", "hi")).await;
    assert_eq!(resp.header("retry-after-ms"), Some("200"));

    // Markers and flaky work here too.
    let resp = messages(&s, &ask_anthropic("claude-x", "x [[mock:fail-529]]")).await;
    assert_eq!(resp.status, 529);
    let statuses = [
        messages(&s, &ask_anthropic("flaky-1", "conv")).await.status,
        messages(&s, &ask_anthropic("flaky-1", "conv")).await.status,
    ];
    assert_eq!(statuses, [500, 200]);
}

#[tokio::test]
async fn anthropic_requests_are_validated() {
    let s = server().await;
    let cases = [
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
            "max_tokens: Field required",
        ),
        (
            json!({"model": "m", "max_tokens": 5}),
            "messages: Field required",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": []}),
            "messages: at least one message is required",
        ),
        (
            json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
            "model: Field required",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "max_completion_tokens": 5,
                "messages": [{"role": "user", "content": "x"}]}),
            "max_completion_tokens: Extra inputs are not permitted",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "temperature": 1.5,
                "messages": [{"role": "user", "content": "x"}]}),
            "temperature: Input should be less than or equal to 1",
        ),
        (
            json!({"model": "m", "max_tokens": 5,
                "messages": [{"role": "system", "content": "x"}]}),
            "messages.0.role: Input should be 'user' or 'assistant'",
        ),
    ];
    for (body, want) in cases {
        let resp = messages(&s, &body).await;
        let msg = assert_anthropic_error(&resp, 400, "invalid_request_error");
        assert_eq!(msg, want, "{body}");
    }
    let resp = http_with(&s, "POST", "/v1/messages", ANTHROPIC_HEADERS, Some("{nope")).await;
    assert_anthropic_error(&resp, 400, "invalid_request_error");
}

// ---- Gemini route ----

async fn generate(server: &MockServer, model: &str, body: &Value) -> HttpResponse {
    http_with(
        server,
        "POST",
        &format!("/v1beta/models/{model}:generateContent"),
        &[("x-goog-api-key", "AIza-test")],
        Some(&body.to_string()),
    )
    .await
}

fn ask_gemini(prompt: &str) -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": prompt}]}]})
}

fn assert_google_error(resp: &HttpResponse, code: u16, status: &str) -> Value {
    assert_eq!(resp.status, code, "{}", resp.body);
    let v = resp.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["status"], status, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    v["error"].clone()
}

#[tokio::test]
async fn gemini_success_has_generate_content_shape_and_usage() {
    let s = server().await;
    let system = "s".repeat(400);
    let body = json!({
        "systemInstruction": {"parts": [{"text": system}]},
        "contents": [{"role": "user", "parts": [{"text": "hel"}, {"text": "lo"}]}],
        "generationConfig": {"temperature": 0.2},
    });
    let v = generate(&s, "gemini-reason", &body).await.json();
    let text = "mock answer from gemini-reason: hello";
    assert_eq!(v["candidates"][0]["content"]["parts"][0]["text"], text);
    assert_eq!(v["candidates"][0]["content"]["role"], "model");
    assert_eq!(v["candidates"][0]["finishReason"], "STOP");
    let u = &v["usageMetadata"];
    let out = tokens(text);
    assert_eq!(u["promptTokenCount"], 108);
    assert_eq!(u["cachedContentTokenCount"], 54);
    assert_eq!(u["thoughtsTokenCount"], out / 2);
    assert_eq!(u["candidatesTokenCount"], out - out / 2);
    assert_eq!(u["totalTokenCount"], 108 + out);

    // Zero counts are left out, as Gemini does; snake_case fields are accepted.
    let body = json!({"contents": [{"parts": [{"text": "a long enough prompt"}]}],
                      "generation_config": {"max_output_tokens": 2}});
    let v = generate(&s, "gemini-2.5-flash", &body).await.json();
    assert_eq!(v["candidates"][0]["finishReason"], "MAX_TOKENS");
    assert_eq!(
        v["candidates"][0]["content"]["parts"][0]["text"],
        "mock ans"
    );
    let u = v["usageMetadata"].as_object().unwrap();
    assert_eq!(u["candidatesTokenCount"], 2);
    assert!(!u.contains_key("cachedContentTokenCount") && !u.contains_key("thoughtsTokenCount"));
    // The v1 path works too.
    let resp = http_with(
        &s,
        "POST",
        "/v1/models/g:generateContent?key=k",
        &[],
        Some(&ask_gemini("x").to_string()),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
}

#[tokio::test]
async fn gemini_takes_the_key_from_header_or_query() {
    let s = server().await;
    let body = ask_gemini("hi").to_string();
    let path = "/v1beta/models/g:generateContent";
    let resp = http_with(&s, "POST", path, &[], Some(&body)).await;
    assert_google_error(&resp, 403, "PERMISSION_DENIED");
    let resp = http_with(&s, "POST", &format!("{path}?key="), &[], Some(&body)).await;
    assert_google_error(&resp, 403, "PERMISSION_DENIED");
    let resp = http_with(
        &s,
        "POST",
        &format!("{path}?alt=json&key=AIza"),
        &[],
        Some(&body),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let resp = http_with(&s, "POST", path, &[("x-goog-api-key", "AIza")], Some(&body)).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
}

#[tokio::test]
async fn gemini_errors_have_google_shape() {
    let s = server().await;
    for (model, code, status) in [
        ("fail-500", 500, "INTERNAL"),
        ("fail-503", 503, "UNAVAILABLE"),
        ("fail-400", 400, "INVALID_ARGUMENT"),
        ("fail-401", 401, "UNAUTHENTICATED"),
        ("fail-404", 404, "NOT_FOUND"),
    ] {
        let resp = generate(&s, model, &ask_gemini("hi")).await;
        assert_google_error(&resp, code, status);
    }
    let resp = generate(&s, "context-too-long", &ask_gemini("hi")).await;
    let e = assert_google_error(&resp, 400, "INVALID_ARGUMENT");
    assert_eq!(
        e["message"],
        "The input token count (1048577) exceeds the maximum number of tokens allowed (1048576)."
    );
    // Rate limits: the wait is in a RetryInfo detail, without Retry-After.
    for (model, delay) in [
        ("rate-limit", "1s"),
        ("rate-limit-ms", "0.200s"),
        ("rate-limit-date", "2s"),
    ] {
        let resp = generate(&s, model, &ask_gemini("hi")).await;
        let e = assert_google_error(&resp, 429, "RESOURCE_EXHAUSTED");
        let info = e["details"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo")
            .unwrap();
        assert_eq!(info["retryDelay"], delay);
        assert!(resp.header("retry-after-ms").is_none());
        assert_eq!(
            resp.header("retry-after").is_some(),
            model == "rate-limit-date",
            "{model}"
        );
    }
    // Blocked: 200 with promptFeedback and no candidates, by model or marker.
    for (model, prompt) in [("blocked", "hi"), ("gemini-x", "[[mock:blocked]] hi")] {
        let v = generate(&s, model, &ask_gemini(prompt)).await.json();
        assert_eq!(v["promptFeedback"]["blockReason"], "SAFETY", "{v}");
        assert!(v.get("candidates").is_none(), "{v}");
    }
}

#[tokio::test]
async fn gemini_requests_are_validated() {
    let s = server().await;
    for body in [
        json!({}),
        json!({"contents": []}),
        json!({"contents": [{"role": "user", "parts": []}]}),
        json!({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}),
        json!({"contents": [{"parts": [{"text": "x"}]}], "max_tokens": 5}),
        json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"max_tokens": 5}}),
        json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"temperature": 2.5}}),
    ] {
        let resp = generate(&s, "g", &body).await;
        assert_google_error(&resp, 400, "INVALID_ARGUMENT");
    }
    let resp = http_with(
        &s,
        "POST",
        "/v1beta/models/g:countTokens",
        &[("x-goog-api-key", "k")],
        Some("{}"),
    )
    .await;
    assert_google_error(&resp, 404, "NOT_FOUND");
    // Streaming is served as Server-Sent Events only.
    let resp = http_with(
        &s,
        "POST",
        "/v1beta/models/g:streamGenerateContent",
        &[("x-goog-api-key", "k")],
        Some(&ask_gemini("hi").to_string()),
    )
    .await;
    assert_google_error(&resp, 400, "INVALID_ARGUMENT");
}

// ---- Ollama route ----

async fn ollama(server: &MockServer, body: &Value) -> HttpResponse {
    http_with(server, "POST", "/api/chat", &[], Some(&body.to_string())).await
}

fn ask_ollama(model: &str, prompt: &str) -> Value {
    json!({"model": model, "stream": false,
           "messages": [{"role": "user", "content": prompt}]})
}

fn assert_ollama_error(resp: &HttpResponse, status: u16) -> String {
    assert_eq!(resp.status, status, "{}", resp.body);
    let v = resp.json();
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
    v["error"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn ollama_success_has_chat_shape_and_counts() {
    let s = server().await;
    let body = json!({"model": "qwen-reason", "stream": false, "messages": [
        {"role": "system", "content": "s".repeat(400)},
        {"role": "user", "content": "hello"}]});
    let v = ollama(&s, &body).await.json();
    let text = "mock answer from qwen-reason: hello";
    assert_eq!(v["message"]["role"], "assistant");
    assert_eq!(v["message"]["content"], text);
    assert!(v["message"]["thinking"].is_string());
    assert_eq!(v["done"], true);
    assert_eq!(v["done_reason"], "stop");
    assert_eq!(v["prompt_eval_count"], 108);
    assert_eq!(v["eval_count"], tokens(text));

    let mut body = ask_ollama("llama3", "a long enough prompt");
    body["options"] = json!({"num_predict": 2, "temperature": 0.1});
    let v = ollama(&s, &body).await.json();
    assert_eq!(v["done_reason"], "length");
    assert_eq!(v["message"]["content"], "mock ans");
    assert_eq!(v["eval_count"], 2);
    assert!(v["message"].get("thinking").is_none());
}

#[tokio::test]
async fn ollama_streams_unless_told_not_to() {
    let s = server().await;
    let body = json!({"model": "llama3", "messages": [{"role": "user", "content": "hi"}]});
    let resp = ollama(&s, &body).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = resp
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // A chunk per piece of the answer, then the final object.
    let (last, chunks) = lines.split_last().unwrap();
    assert!(chunks.len() > 1, "{lines:?}");
    assert!(chunks.iter().all(|c| c["done"] == false));
    let text: String = chunks
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "mock answer from llama3: hi");
    assert_eq!(last["done"], true);
    assert!(last["eval_count"].as_u64().is_some());
    // No messages only loads the model.
    let v = ollama(&s, &json!({"model": "llama3", "stream": false}))
        .await
        .json();
    assert_eq!(v["done_reason"], "load");
}

#[tokio::test]
async fn ollama_errors_are_plain_strings() {
    let s = server().await;
    let msg = assert_ollama_error(&ollama(&s, &ask_ollama("missing", "hi")).await, 404);
    assert_eq!(msg, "model \"missing\" not found, try pulling it first");
    let msg = assert_ollama_error(&ollama(&s, &ask_ollama("fail-404", "hi")).await, 404);
    assert_eq!(msg, "model \"fail-404\" not found, try pulling it first");
    for (model, status) in [
        ("fail-500", 500),
        ("fail-503", 503),
        ("fail-400", 400),
        ("fail-401", 401),
    ] {
        assert_ollama_error(&ollama(&s, &ask_ollama(model, "hi")).await, status);
    }
    let msg = assert_ollama_error(
        &ollama(&s, &ask_ollama("context-too-long", "hi")).await,
        400,
    );
    assert_eq!(msg, "the input length exceeds the context length");
    let resp = ollama(&s, &ask_ollama("rate-limit", "hi")).await;
    assert_ollama_error(&resp, 429);
    assert_eq!(resp.header("retry-after"), Some("1"));
    let msg = assert_ollama_error(&ollama(&s, &json!({"messages": []})).await, 400);
    assert_eq!(msg, "model is required");
    assert_ollama_error(
        &http_with(&s, "POST", "/api/chat", &[], Some("nope")).await,
        400,
    );
}

#[tokio::test]
async fn calls_are_counted_on_every_route() {
    let s = server().await;
    chat(&s, &ask("m", "a")).await;
    messages(&s, &ask_anthropic("m", "b")).await;
    generate(&s, "m", &ask_gemini("c")).await;
    ollama(&s, &ask_ollama("m", "d")).await;
    // Failures and unauthenticated requests count too.
    http_with(
        &s,
        "POST",
        "/v1/messages",
        &[],
        Some(&ask_anthropic("m", "e").to_string()),
    )
    .await;
    http_with(
        &s,
        "POST",
        "/v1beta/models/m:generateContent",
        &[],
        Some("{}"),
    )
    .await;
    ollama(&s, &ask_ollama("fail-500", "f")).await;
    assert_eq!(s.calls("m"), 6);
    assert_eq!(s.calls("fail-500"), 1);
    assert_eq!(s.total_calls(), 7);
}

#[tokio::test]
async fn shutdown_ends_hanging_requests_on_every_route() {
    let s = server().await;
    let hanging: [(&str, Headers<'_>, Value); 3] = [
        (
            "/v1/messages",
            ANTHROPIC_HEADERS,
            ask_anthropic("timeout", "a"),
        ),
        (
            "/v1beta/models/timeout:generateContent",
            &[("x-goog-api-key", "k")],
            ask_gemini("b"),
        ),
        ("/api/chat", &[], ask_ollama("timeout", "c")),
    ];
    let addr = s.addr();
    let mut clients = Vec::new();
    for (path, headers, body) in hanging {
        let mut req = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        let body = body.to_string();
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        clients.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(req.as_bytes()).await.unwrap();
            let mut raw = String::new();
            stream.read_to_string(&mut raw).await.unwrap();
            raw
        }));
    }
    let start = Instant::now();
    while s.calls("timeout") < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "requests never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::time::timeout(Duration::from_secs(3), s.shutdown())
        .await
        .unwrap();
    for client in clients {
        let raw = tokio::time::timeout(Duration::from_secs(3), client)
            .await
            .unwrap()
            .unwrap();
        assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
    }
}

#[test]
fn magic_names_parse() {
    assert_eq!(magic("slow"), Some(Behaviour::Slow(Duration::from_secs(2))));
    assert_eq!(
        magic("slow-300"),
        Some(Behaviour::Slow(Duration::from_millis(300)))
    );
    assert_eq!(magic("flaky-5"), Some(Behaviour::Flaky(5)));
    assert_eq!(
        magic("fail-503"),
        Some(Behaviour::Fail(StatusCode::SERVICE_UNAVAILABLE))
    );
    assert_eq!(magic("fail-200"), None);
    assert_eq!(magic("slow-x"), None);
    assert_eq!(magic("mock-fast"), None);
    assert_eq!(magic("gpt-4o-mini"), None);
    assert_eq!(
        marker("a [[mock:x]] b [[mock:timeout]]"),
        Some(Behaviour::Timeout)
    );
    assert_eq!(marker("[[mock:slow-20"), None);
    assert_eq!(gemini::camel("system_instruction"), "systemInstruction");
    assert_eq!(gemini::camel("generationConfig"), "generationConfig");
    assert!(anthropic::valid_custom_id("req-1_B"));
    assert!(anthropic::valid_custom_id(&"x".repeat(64)));
    for bad in ["", "a b", "a/b", "é", &"x".repeat(65)] {
        assert!(!anthropic::valid_custom_id(bad), "{bad}");
    }
}

#[tokio::test]
async fn a_quality_model_is_good_at_its_share_of_a_task_type_and_the_same_for_the_same_task() {
    let s = MockServer::start(MockOptions {
        quality: vec![Quality {
            model: "cheap".into(),
            by_type: vec![("code_review".into(), 0.3), ("documentation".into(), 1.0)],
        }],
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let mut good = 0;
    for i in 0..200 {
        let r = chat(&s, &ask("cheap", &format!("[[type:code_review]] task {i}"))).await;
        let content = r.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(content.ends_with("[[verdict:good]]") || content.ends_with("[[verdict:bad]]"));
        good += usize::from(content.ends_with("[[verdict:good]]"));
        let again = chat(&s, &ask("cheap", &format!("[[type:code_review]] task {i}"))).await;
        assert_eq!(
            again.json()["choices"][0]["message"]["content"],
            content.as_str()
        );
    }
    assert!((30..90).contains(&good), "{good} of 200 good at 0.3");
    let docs = chat(&s, &ask("cheap", "[[type:documentation]] write it")).await;
    assert!(
        docs.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .ends_with("[[verdict:good]]")
    );
    let other = chat(&s, &ask("mock-fast", "[[type:code_review]] x")).await;
    assert!(
        !other.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("verdict")
    );
}

// ---- Batch APIs ----

/// GETs a batch until `done` says it ended: (the answers seen before that, the last one).
async fn poll_batch(
    s: &MockServer,
    path: &str,
    headers: Headers<'_>,
    done: impl Fn(&Value) -> bool,
) -> (Vec<Value>, Value) {
    let mut before = Vec::new();
    for _ in 0..500 {
        let resp = http_with(s, "GET", path, headers, None).await;
        assert_eq!(resp.status, 200, "{}", resp.body);
        let v = resp.json();
        if done(&v) {
            return (before, v);
        }
        before.push(v);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{path} never ended");
}

fn jsonl(body: &str) -> Vec<Value> {
    body.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

const OPENAI_HEADERS: &[(&str, &str)] = &[("Authorization", KEY)];
const BOUNDARY: &str = "llmq-mock-test-boundary";

fn openai_line(custom_id: &str, body: &Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
        .to_string()
}

/// `POST /v1/files`, multipart with `purpose` and a `file`.
async fn upload(s: &MockServer, purpose: &str, lines: &[String]) -> HttpResponse {
    let file = lines.join("\n");
    let body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{file}\r\n--{BOUNDARY}--\r\n"
    );
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    http_with(
        s,
        "POST",
        "/v1/files",
        &[("Authorization", KEY), ("Content-Type", &ct)],
        Some(&body),
    )
    .await
}

async fn openai_batch(s: &MockServer, lines: &[String]) -> Value {
    let file = upload(s, "batch", lines).await;
    assert_eq!(file.status, 200, "{}", file.body);
    let file_id = file.json()["id"].as_str().unwrap().to_owned();
    let resp = http(
        s,
        "POST",
        "/v1/batches",
        Some(KEY),
        Some(
            &json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                    "completion_window": "24h"})
            .to_string(),
        ),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    resp.json()
}

async fn file_lines(s: &MockServer, id: &Value) -> Vec<Value> {
    let resp = http(
        s,
        "GET",
        &format!("/v1/files/{}/content", id.as_str().unwrap()),
        Some(KEY),
        None,
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    jsonl(&resp.body)
}

fn ended_openai(v: &Value) -> bool {
    ["completed", "failed", "expired", "cancelled"].contains(&v["status"].as_str().unwrap())
}

#[tokio::test]
async fn openai_batch_runs_each_line_through_the_chat_route() {
    let s = server().await;
    let lines = [
        openai_line("a", &ask("mock-fast", "hello batch")),
        openai_line("b", &ask("mock-fast", "no [[mock:fail-400]]")),
        openai_line(
            "c",
            &json!({"model": "mock-fast", "stream": true,
                                 "messages": [{"role": "user", "content": "streamed"}]}),
        ),
    ];
    let file = upload(&s, "batch", &lines).await;
    assert_eq!(file.status, 200, "{}", file.body);
    let f = file.json();
    assert!(f["id"].as_str().unwrap().starts_with("file-"), "{f}");
    assert_eq!(f["object"], "file");
    assert_eq!(f["purpose"], "batch");
    assert_eq!(f["filename"], "in.jsonl");
    assert_eq!(f["bytes"], lines.join("\n").len());
    assert!(f["created_at"].as_i64().unwrap() > 1_600_000_000);
    let info = http(
        &s,
        "GET",
        &format!("/v1/files/{}", f["id"].as_str().unwrap()),
        Some(KEY),
        None,
    )
    .await;
    assert_eq!(info.json(), f);

    let resp = http(
        &s,
        "POST",
        "/v1/batches",
        Some(KEY),
        Some(
            &json!({"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                    "completion_window": "24h", "metadata": {"run": "r1"}})
            .to_string(),
        ),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let b = resp.json();
    let id = b["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("batch_"), "{b}");
    assert!(
        id.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    );
    assert_eq!(b["object"], "batch");
    assert_eq!(b["endpoint"], "/v1/chat/completions");
    assert_eq!(b["status"], "validating");
    assert_eq!(b["input_file_id"], f["id"]);
    assert_eq!(b["completion_window"], "24h");
    assert_eq!(b["errors"], Value::Null);
    assert_eq!(b["output_file_id"], Value::Null);
    assert_eq!(b["error_file_id"], Value::Null);
    assert_eq!(b["metadata"], json!({"run": "r1"}));
    assert_eq!(
        b["request_counts"],
        json!({"total": 3, "completed": 0, "failed": 0})
    );
    let created = b["created_at"].as_i64().unwrap();
    assert_eq!(b["expires_at"].as_i64().unwrap(), created + 86_400);
    assert_eq!(s.batches("mock-fast"), 1);

    let (before, done) = poll_batch(
        &s,
        &format!("/v1/batches/{id}"),
        OPENAI_HEADERS,
        ended_openai,
    )
    .await;
    assert!(!before.is_empty(), "no poll saw it in progress");
    assert_eq!(before[0]["status"], "in_progress");
    assert!(before[0]["in_progress_at"].as_i64().is_some());
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 3, "completed": 1, "failed": 2})
    );
    assert!(done["completed_at"].as_i64().is_some());
    assert_eq!(done["failed_at"], Value::Null);

    let out = file_lines(&s, &done["output_file_id"]).await;
    assert_eq!(out.len(), 1, "{out:?}");
    let line = &out[0];
    assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
    assert_eq!(line["custom_id"], "a");
    assert_eq!(line["error"], Value::Null);
    assert_eq!(line["response"]["status_code"], 200);
    assert!(line["response"]["request_id"].is_string());
    let body = &line["response"]["body"];
    assert_eq!(body["object"], "chat.completion");
    let text = "mock answer from mock-fast: hello batch";
    assert_eq!(body["choices"][0]["message"]["content"], text);
    assert_eq!(body["usage"]["prompt_tokens"], tokens("hello batch") + 3);
    assert_eq!(body["usage"]["completion_tokens"], tokens(text));

    let errors = file_lines(&s, &done["error_file_id"]).await;
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0]["custom_id"], "b");
    assert_eq!(errors[0]["response"]["status_code"], 400);
    assert_eq!(
        errors[0]["response"]["body"]["error"]["type"],
        "invalid_request_error"
    );
    assert_eq!(errors[0]["error"], Value::Null);
    assert_eq!(errors[1]["custom_id"], "c");
    assert_eq!(errors[1]["response"]["status_code"], 400);
    assert_eq!(errors[1]["response"]["body"]["error"]["param"], "stream");

    // The two lines that reached the model count as calls; the streamed one was refused first.
    assert_eq!(s.calls("mock-fast"), 2);
    assert_eq!(s.total_calls(), 2);
    assert_eq!(s.calls_with_prompt("hello batch"), 1);
    assert_eq!(s.batch_items("mock-fast"), 3);
    let stats = http(&s, "GET", "/stats", None, None).await.json();
    assert_eq!(stats["batches_by_model"], json!({"mock-fast": 1}));
    assert_eq!(stats["batch_items_by_model"], json!({"mock-fast": 3}));
    // An ended batch cannot be cancelled; it stays as it was.
    let resp = http(
        &s,
        "POST",
        &format!("/v1/batches/{id}/cancel"),
        Some(KEY),
        None,
    )
    .await;
    assert_error(&resp, 400, "invalid_request_error", "invalid_value");
    let again = http(&s, "GET", &format!("/v1/batches/{id}"), Some(KEY), None)
        .await
        .json();
    assert_eq!(again["status"], "completed");
    assert_eq!(again["output_file_id"], done["output_file_id"]);
}

#[tokio::test]
async fn a_batch_waits_for_the_batch_delay() {
    let s = MockServer::start(MockOptions {
        batch_delay: Duration::from_millis(300),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let start = Instant::now();
    let b = openai_batch(&s, &[openai_line("a", &ask("mock-fast", "x"))]).await;
    let path = format!("/v1/batches/{}", b["id"].as_str().unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.calls("mock-fast"), 0, "items ran before the delay");
    let (before, done) = poll_batch(&s, &path, OPENAI_HEADERS, ended_openai).await;
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(before.len() > 1);
    assert_eq!(done["status"], "completed");
    assert_eq!(s.calls("mock-fast"), 1);
}

#[tokio::test]
async fn openai_batch_expire_fail_and_stuck() {
    let s = server().await;
    let two = |model: &str| {
        [
            openai_line("one", &ask(model, "first")),
            openai_line("two", &ask(model, "second")),
        ]
    };
    // Expired: nothing ran; every request is in the error file as batch_expired.
    let b = openai_batch(&s, &two("batch-expire")).await;
    let path = format!("/v1/batches/{}", b["id"].as_str().unwrap());
    let (_, done) = poll_batch(&s, &path, OPENAI_HEADERS, ended_openai).await;
    assert_eq!(done["status"], "expired", "{done}");
    assert!(done["expired_at"].as_i64().is_some());
    assert_eq!(done["output_file_id"], Value::Null);
    assert_eq!(
        done["request_counts"],
        json!({"total": 2, "completed": 0, "failed": 2})
    );
    let errors = file_lines(&s, &done["error_file_id"]).await;
    assert_eq!(errors.len(), 2);
    for (line, id) in errors.iter().zip(["one", "two"]) {
        assert_eq!(line["custom_id"], id);
        assert_eq!(line["response"], Value::Null);
        assert_eq!(line["error"]["code"], "batch_expired");
        assert!(line["error"]["message"].is_string());
    }
    assert_eq!(s.calls("batch-expire"), 0);
    assert_eq!(s.batches("batch-expire"), 1);

    // Failed: validating, then failed with an error list and no files.
    let b = openai_batch(&s, &two("batch-fail")).await;
    let path = format!("/v1/batches/{}", b["id"].as_str().unwrap());
    let (before, done) = poll_batch(&s, &path, OPENAI_HEADERS, ended_openai).await;
    assert!(
        before.iter().all(|v| v["status"] == "validating"),
        "{before:?}"
    );
    assert_eq!(done["status"], "failed", "{done}");
    assert!(done["failed_at"].as_i64().is_some());
    assert_eq!(done["errors"]["object"], "list");
    let e = &done["errors"]["data"][0];
    assert_eq!(e["code"], "invalid_request");
    assert!(e["message"].is_string());
    assert_eq!(e["line"], Value::Null);
    assert_eq!(e["param"], Value::Null);
    assert_eq!(done["output_file_id"], Value::Null);
    assert_eq!(done["error_file_id"], Value::Null);

    // Stuck: in progress until cancelled; cancelling, then cancelled on the next GET.
    let b = openai_batch(&s, &two("batch-stuck")).await;
    let id = b["id"].as_str().unwrap();
    let path = format!("/v1/batches/{id}");
    for _ in 0..5 {
        let v = http(&s, "GET", &path, Some(KEY), None).await.json();
        assert_eq!(v["status"], "in_progress", "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = http(&s, "POST", &format!("{path}/cancel"), Some(KEY), None).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let v = resp.json();
    assert_eq!(v["status"], "cancelling");
    assert!(v["cancelling_at"].as_i64().is_some());
    let v = http(&s, "GET", &path, Some(KEY), None).await.json();
    assert_eq!(v["status"], "cancelled", "{v}");
    assert!(v["cancelled_at"].as_i64().is_some());
    assert_eq!(v["output_file_id"], Value::Null);
    let errors = file_lines(&s, &v["error_file_id"]).await;
    assert_eq!(errors.len(), 2);
    assert!(
        errors
            .iter()
            .all(|l| l["error"]["code"] == "batch_cancelled")
    );
    assert_eq!(s.batch_items("batch-stuck"), 0);
}

#[tokio::test]
async fn openai_batch_refusals() {
    let s = server().await;
    let good = openai_line("a", &ask("m", "x"));
    let refused = |resp: HttpResponse| {
        assert_error(&resp, 400, "invalid_request_error", "invalid_value");
        resp.json()["error"]["message"].as_str().unwrap().to_owned()
    };
    let msg = refused(upload(&s, "fine-tune", std::slice::from_ref(&good)).await);
    assert!(msg.contains("batch"), "{msg}");
    for (lines, want) in [
        (vec![good.clone(), "{not json".to_owned()], "Line 2"),
        (vec![json!({"method": "POST", "url": "/v1/chat/completions", "body": ask("m", "x")}).to_string()], "custom_id"),
        (vec![good.clone(), good.clone()], "duplicate"),
        (vec![json!({"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}).to_string()], "/v1/embeddings"),
        (vec![good.clone(), openai_line("b", &ask("other", "x"))], "one model"),
        (vec![String::new()], "no requests"),
    ] {
        let msg = refused(upload(&s, "batch", &lines).await);
        assert!(msg.contains(want), "{want}: {msg}");
    }
    let resp = http_with(&s, "POST", "/v1/files", OPENAI_HEADERS, Some("{}")).await;
    assert_error(&resp, 400, "invalid_request_error", "invalid_value");

    let file = upload(&s, "batch", &[good]).await.json();
    let create = |body: Value| {
        let s = &s;
        async move { http(s, "POST", "/v1/batches", Some(KEY), Some(&body.to_string())).await }
    };
    let resp = create(
        json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                             "completion_window": "1h"}),
    )
    .await;
    assert_error(&resp, 400, "invalid_request_error", "invalid_value");
    assert_eq!(resp.json()["error"]["param"], "completion_window");
    let resp = create(
        json!({"input_file_id": file["id"], "endpoint": "/v1/embeddings",
                             "completion_window": "24h"}),
    )
    .await;
    assert_eq!(resp.json()["error"]["param"], "endpoint");
    let resp = create(
        json!({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions",
                             "completion_window": "24h"}),
    )
    .await;
    assert_error(&resp, 404, "invalid_request_error", "not_found");
    assert_eq!(s.batches("m"), 0);

    // A key on every route; unknown ids are 404.
    for (method, path) in [
        ("POST", "/v1/files"),
        ("GET", "/v1/files/file-x/content"),
        ("POST", "/v1/batches"),
        ("GET", "/v1/batches/batch_x"),
        ("POST", "/v1/batches/batch_x/cancel"),
    ] {
        let resp = http(&s, method, path, None, Some("{}")).await;
        assert_error(&resp, 401, "invalid_request_error", "invalid_api_key");
    }
    for (method, path) in [
        ("GET", "/v1/files/file-x/content"),
        ("GET", "/v1/batches/batch_x"),
        ("POST", "/v1/batches/batch_x/cancel"),
    ] {
        let resp = http(&s, method, path, Some(KEY), None).await;
        assert_error(&resp, 404, "invalid_request_error", "not_found");
    }
    assert_eq!(s.total_calls(), 0);
}

async fn anthropic_batch(s: &MockServer, requests: &[(&str, Value)]) -> HttpResponse {
    let requests: Vec<Value> = requests
        .iter()
        .map(|(id, params)| json!({"custom_id": id, "params": params}))
        .collect();
    http_with(
        s,
        "POST",
        "/v1/messages/batches",
        ANTHROPIC_HEADERS,
        Some(&json!({ "requests": requests }).to_string()),
    )
    .await
}

fn ended_anthropic(v: &Value) -> bool {
    v["processing_status"] == "ended"
}

async fn anthropic_results(s: &MockServer, id: &str) -> Vec<Value> {
    let resp = http_with(
        s,
        "GET",
        &format!("/v1/messages/batches/{id}/results"),
        ANTHROPIC_HEADERS,
        None,
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.header("content-type"), Some("application/x-jsonl"));
    jsonl(&resp.body)
}

#[tokio::test]
async fn anthropic_batch_runs_each_request_through_the_messages_route() {
    let s = server().await;
    let mut streamed = ask_anthropic("claude-x", "streamed");
    streamed["stream"] = json!(true);
    let resp = anthropic_batch(
        &s,
        &[
            ("req-a", ask_anthropic("claude-x", "hello batch")),
            ("req_b", ask_anthropic("fail-400", "b")),
            ("c", streamed),
        ],
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let b = resp.json();
    let id = b["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("msgbatch_"), "{b}");
    assert_eq!(b["type"], "message_batch");
    assert_eq!(b["processing_status"], "in_progress");
    assert_eq!(
        b["request_counts"],
        json!({"processing": 3, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0})
    );
    for field in [
        "ended_at",
        "cancel_initiated_at",
        "archived_at",
        "results_url",
    ] {
        assert_eq!(b[field], Value::Null, "{field}");
    }
    let created = chrono::DateTime::parse_from_rfc3339(b["created_at"].as_str().unwrap()).unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(b["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires - created, chrono::TimeDelta::hours(24));
    // No results before the end.
    let resp = http_with(
        &s,
        "GET",
        &format!("/v1/messages/batches/{id}/results"),
        ANTHROPIC_HEADERS,
        None,
    )
    .await;
    assert_anthropic_error(&resp, 404, "not_found_error");

    let path = format!("/v1/messages/batches/{id}");
    let (before, done) = poll_batch(&s, &path, ANTHROPIC_HEADERS, ended_anthropic).await;
    assert!(!before.is_empty());
    assert_eq!(before[0]["request_counts"]["processing"], 3);
    assert_eq!(
        done["request_counts"],
        json!({"processing": 0, "succeeded": 1, "errored": 2, "canceled": 0, "expired": 0})
    );
    chrono::DateTime::parse_from_rfc3339(done["ended_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        done["results_url"],
        format!("{}/v1/messages/batches/{id}/results", s.url())
    );

    let results = anthropic_results(&s, &id).await;
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["custom_id"], "req-a");
    assert_eq!(results[0]["result"]["type"], "succeeded");
    let m = &results[0]["result"]["message"];
    assert_eq!(m["type"], "message");
    let text = "mock answer from claude-x: hello batch";
    assert_eq!(m["content"][0]["text"], text);
    assert_eq!(m["usage"]["input_tokens"], tokens("hello batch") + 3);
    assert_eq!(m["usage"]["output_tokens"], tokens(text));
    for (r, id) in results[1..].iter().zip(["req_b", "c"]) {
        assert_eq!(r["custom_id"], id);
        assert_eq!(r["result"]["type"], "errored");
        assert_eq!(r["result"]["error"]["type"], "error");
        assert_eq!(
            r["result"]["error"]["error"]["type"],
            "invalid_request_error"
        );
        assert!(r["result"]["error"]["error"]["message"].is_string());
    }
    assert!(
        results[2]["result"]["error"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stream")
    );

    assert_eq!(s.batches("claude-x"), 1);
    assert_eq!(s.batch_items("claude-x"), 2);
    assert_eq!(s.batch_items("fail-400"), 1);
    assert_eq!(s.calls("claude-x"), 1);
    assert_eq!(s.calls("fail-400"), 1);
    // Cancelling an ended batch changes nothing.
    let v = http_with(
        &s,
        "POST",
        &format!("{path}/cancel"),
        ANTHROPIC_HEADERS,
        None,
    )
    .await
    .json();
    assert_eq!(v["processing_status"], "ended");
    assert_eq!(v["cancel_initiated_at"], Value::Null);
}

#[tokio::test]
async fn anthropic_batch_expire_fail_and_stuck() {
    let s = server().await;
    let two = |model: &str| {
        [
            ("one", ask_anthropic(model, "a")),
            ("two", ask_anthropic(model, "b")),
        ]
    };
    for (model, counts, want) in [
        (
            "batch-expire",
            json!({"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 2}),
            "expired",
        ),
        (
            "batch-fail",
            json!({"processing": 0, "succeeded": 0, "errored": 2, "canceled": 0, "expired": 0}),
            "errored",
        ),
    ] {
        let id = anthropic_batch(&s, &two(model)).await.json()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (before, done) = poll_batch(
            &s,
            &format!("/v1/messages/batches/{id}"),
            ANTHROPIC_HEADERS,
            ended_anthropic,
        )
        .await;
        assert!(!before.is_empty());
        assert_eq!(done["request_counts"], counts, "{model}");
        let results = anthropic_results(&s, &id).await;
        assert_eq!(results.len(), 2);
        for r in &results {
            assert_eq!(r["result"]["type"], want, "{r}");
            if want == "errored" {
                assert_eq!(r["result"]["error"]["error"]["type"], "api_error");
            }
        }
        assert_eq!(s.calls(model), 0);
        assert_eq!(s.batches(model), 1);
    }

    let id = anthropic_batch(&s, &two("batch-stuck")).await.json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/messages/batches/{id}");
    for _ in 0..5 {
        let v = http_with(&s, "GET", &path, ANTHROPIC_HEADERS, None)
            .await
            .json();
        assert_eq!(v["processing_status"], "in_progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = http_with(
        &s,
        "POST",
        &format!("{path}/cancel"),
        ANTHROPIC_HEADERS,
        None,
    )
    .await
    .json();
    assert_eq!(v["processing_status"], "canceling");
    assert!(v["cancel_initiated_at"].is_string());
    let (_, done) = poll_batch(&s, &path, ANTHROPIC_HEADERS, ended_anthropic).await;
    assert_eq!(
        done["request_counts"],
        json!({"processing": 0, "succeeded": 0, "errored": 0, "canceled": 2, "expired": 0})
    );
    let results = anthropic_results(&s, &id).await;
    assert!(
        results
            .iter()
            .all(|r| r["result"] == json!({"type": "canceled"})),
        "{results:?}"
    );
}

#[tokio::test]
async fn anthropic_batch_refusals() {
    let s = server().await;
    let p = ask_anthropic("m", "x");
    let too_long = "x".repeat(65);
    for (requests, want) in [
        (vec![("a b", p.clone())], "pattern"),
        (vec![("", p.clone())], "pattern"),
        (vec![(too_long.as_str(), p.clone())], "pattern"),
        (vec![("same", p.clone()), ("same", p.clone())], "Duplicate"),
        (vec![], "at least 1"),
    ] {
        let resp = anthropic_batch(&s, &requests).await;
        let msg = assert_anthropic_error(&resp, 400, "invalid_request_error");
        assert!(msg.contains(want), "{want}: {msg}");
    }
    let resp = http_with(
        &s,
        "POST",
        "/v1/messages/batches",
        ANTHROPIC_HEADERS,
        Some(&json!({"requests": [{"custom_id": "a"}]}).to_string()),
    )
    .await;
    let msg = assert_anthropic_error(&resp, 400, "invalid_request_error");
    assert_eq!(msg, "requests.0.params: Field required");
    let resp = http_with(
        &s,
        "POST",
        "/v1/messages/batches",
        &[("x-api-key", "k")],
        Some(&json!({"requests": [{"custom_id": "a", "params": p}]}).to_string()),
    )
    .await;
    assert_anthropic_error(&resp, 401, "authentication_error");
    for (method, path) in [
        ("GET", "/v1/messages/batches/msgbatch_x"),
        ("POST", "/v1/messages/batches/msgbatch_x/cancel"),
        ("GET", "/v1/messages/batches/msgbatch_x/results"),
    ] {
        let resp = http_with(&s, method, path, ANTHROPIC_HEADERS, None).await;
        assert_anthropic_error(&resp, 404, "not_found_error");
    }
    assert_eq!(s.batches("m"), 0);
}

const GEMINI_HEADERS: &[(&str, &str)] = &[("x-goog-api-key", "AIza-test")];

async fn gemini_batch(s: &MockServer, model: &str, body: &Value) -> HttpResponse {
    http_with(
        s,
        "POST",
        &format!("/v1beta/models/{model}:batchGenerateContent"),
        GEMINI_HEADERS,
        Some(&body.to_string()),
    )
    .await
}

/// A batch body in snake_case (as Python writes it): each prompt with `metadata.key`.
fn gemini_batch_body(prompts: &[(&str, &str)]) -> Value {
    let requests: Vec<Value> = prompts
        .iter()
        .map(|(key, prompt)| json!({"request": ask_gemini(prompt), "metadata": {"key": key}}))
        .collect();
    json!({"batch": {"display_name": "test batch",
                     "input_config": {"requests": {"requests": requests}}}})
}

fn done_gemini(v: &Value) -> bool {
    v["done"] == true
}

#[tokio::test]
async fn gemini_batch_runs_each_request_through_generate_content() {
    let s = server().await;
    let resp = gemini_batch(
        &s,
        "gemini-x",
        &gemini_batch_body(&[("a", "hello batch"), ("b", "no [[mock:fail-400]]")]),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let op = resp.json();
    let name = op["name"].as_str().unwrap().to_owned();
    let id = name.strip_prefix("batches/").unwrap().to_owned();
    assert!(
        id.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    );
    assert!(op.get("done").is_none(), "{op}");
    let m = &op["metadata"];
    assert_eq!(
        m["@type"],
        "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
    );
    assert_eq!(m["model"], "models/gemini-x");
    assert_eq!(m["displayName"], "test batch");
    assert_eq!(m["state"], "BATCH_STATE_PENDING");
    assert_eq!(m["name"], name.as_str());
    assert_eq!(
        m["batchStats"],
        json!({"requestCount": "2", "pendingRequestCount": "2"})
    );
    chrono::DateTime::parse_from_rfc3339(m["createTime"].as_str().unwrap()).unwrap();
    chrono::DateTime::parse_from_rfc3339(m["updateTime"].as_str().unwrap()).unwrap();
    // Creating a batch is not a call.
    assert_eq!(s.total_calls(), 0);

    let path = format!("/v1beta/batches/{id}");
    let (before, done) = poll_batch(&s, &path, GEMINI_HEADERS, done_gemini).await;
    assert!(!before.is_empty());
    assert_eq!(before[0]["metadata"]["state"], "BATCH_STATE_RUNNING");
    assert_eq!(done["metadata"]["state"], "BATCH_STATE_SUCCEEDED", "{done}");
    assert!(done.get("error").is_none());
    let stats = &done["metadata"]["batchStats"];
    assert_eq!(stats["requestCount"], "2");
    assert_eq!(stats["successfulRequestCount"], "1");
    assert_eq!(stats["failedRequestCount"], "1");
    let r = &done["response"];
    assert_eq!(
        r["@type"],
        "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
    );
    let out = r["inlinedResponses"]["inlinedResponses"]
        .as_array()
        .unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0]["metadata"], json!({"key": "a"}));
    let text = "mock answer from gemini-x: hello batch";
    let answer = &out[0]["response"];
    assert_eq!(answer["candidates"][0]["content"]["parts"][0]["text"], text);
    assert_eq!(
        answer["usageMetadata"]["promptTokenCount"],
        tokens("hello batch") + 3
    );
    assert_eq!(
        answer["usageMetadata"]["candidatesTokenCount"],
        tokens(text)
    );
    assert_eq!(out[1]["metadata"], json!({"key": "b"}));
    assert_eq!(out[1]["error"]["code"], 400);
    assert_eq!(out[1]["error"]["status"], "INVALID_ARGUMENT");
    assert!(out[1]["error"]["message"].is_string());
    assert!(out[1].get("response").is_none());

    // camelCase fields and the key in the query work too.
    let body = json!({"batch": {"displayName": "camel", "inputConfig": {"requests": {"requests": [
        {"request": ask_gemini("camel")}]}}}});
    let resp = http_with(
        &s,
        "POST",
        "/v1beta/models/gemini-x:batchGenerateContent?key=AIza",
        &[],
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let name = resp.json()["name"].as_str().unwrap().to_owned();
    let (_, done) = poll_batch(&s, &format!("/v1beta/{name}?key=AIza"), &[], done_gemini).await;
    let out = &done["response"]["inlinedResponses"]["inlinedResponses"];
    assert_eq!(out.as_array().unwrap().len(), 1);
    assert!(out[0].get("metadata").is_none());

    assert_eq!(s.batches("gemini-x"), 2);
    assert_eq!(s.batch_items("gemini-x"), 3);
    assert_eq!(s.calls("gemini-x"), 3);
    assert_eq!(s.calls_with_prompt("hello batch"), 1);
}

#[tokio::test]
async fn gemini_batch_expire_fail_and_stuck() {
    let s = server().await;
    let body = gemini_batch_body(&[("a", "x"), ("b", "y")]);
    for (model, state) in [
        ("batch-expire", "BATCH_STATE_EXPIRED"),
        ("batch-fail", "BATCH_STATE_FAILED"),
    ] {
        let name = gemini_batch(&s, model, &body).await.json()["name"]
            .as_str()
            .unwrap()
            .to_owned();
        let (before, done) =
            poll_batch(&s, &format!("/v1beta/{name}"), GEMINI_HEADERS, done_gemini).await;
        assert!(!before.is_empty());
        assert_eq!(done["metadata"]["state"], state, "{done}");
        assert!(done.get("response").is_none(), "{done}");
        if model == "batch-fail" {
            assert!(done["error"]["message"].is_string(), "{done}");
            assert!(done["error"]["code"].is_u64(), "{done}");
        } else {
            assert!(done.get("error").is_none(), "{done}");
        }
        assert_eq!(s.calls(model), 0);
        assert_eq!(s.batches(model), 1);
    }

    let name = gemini_batch(&s, "batch-stuck", &body).await.json()["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1beta/{name}");
    for _ in 0..5 {
        let v = http_with(&s, "GET", &path, GEMINI_HEADERS, None)
            .await
            .json();
        assert!(v.get("done").is_none(), "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = http_with(
        &s,
        "POST",
        &format!("{path}:cancel"),
        GEMINI_HEADERS,
        Some(""),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.json(), json!({}));
    let (_, done) = poll_batch(&s, &path, GEMINI_HEADERS, done_gemini).await;
    assert_eq!(done["metadata"]["state"], "BATCH_STATE_CANCELLED");
    assert!(done.get("response").is_none());
}

#[tokio::test]
async fn gemini_batch_refusals() {
    let s = server().await;
    let resp = http_with(
        &s,
        "POST",
        "/v1beta/models/g:batchGenerateContent",
        &[],
        Some(&gemini_batch_body(&[("a", "x")]).to_string()),
    )
    .await;
    assert_google_error(&resp, 403, "PERMISSION_DENIED");
    let requests = json!({"requests": {"requests": [{"request": ask_gemini("x")}]}});
    for body in [
        json!({}),
        json!({"batch": {"input_config": requests}}),
        json!({"batch": {"display_name": "n"}}),
        json!({"batch": {"display_name": "n", "input_config": {"requests": {"requests": []}}}}),
        json!({"batch": {"display_name": "n", "input_config": {"file_name": "files/x"}}}),
        json!({"batch": {"display_name": "n", "input_config": requests, "colour": 1}}),
        json!({"batch": {"display_name": "n", "input_config": {"requests": {"requests": [{"metadata": {}}]}}}}),
    ] {
        let resp = gemini_batch(&s, "g", &body).await;
        assert_google_error(&resp, 400, "INVALID_ARGUMENT");
    }
    // A bad request inside a valid batch is that item's error, not the batch's.
    let body = json!({"batch": {"display_name": "n", "input_config": {"requests": {"requests": [
        {"request": {"contents": []}}]}}}});
    let name = gemini_batch(&s, "g", &body).await.json()["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, done) = poll_batch(&s, &format!("/v1beta/{name}"), GEMINI_HEADERS, done_gemini).await;
    assert_eq!(
        done["response"]["inlinedResponses"]["inlinedResponses"][0]["error"]["code"],
        400
    );
    for (method, path) in [
        ("GET", "/v1beta/batches/nope"),
        ("POST", "/v1beta/batches/nope:cancel"),
    ] {
        let resp = http_with(&s, method, path, GEMINI_HEADERS, Some("")).await;
        assert_google_error(&resp, 404, "NOT_FOUND");
    }
    assert_eq!(s.batches("g"), 1);
}

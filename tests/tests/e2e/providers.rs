#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]
//! The four HTTP provider adapters against llmq-mock over real HTTP: the answer text, every
//! usage field, every error class, Retry-After in each form, timeouts.
//!
//! Each check runs once per adapter (see `adapter_tests!` at the end), so a failure names the
//! wire format.

use std::time::{Duration, Instant};

use llmq_shared::outcome::ErrorClass;
use llmq_shared::provider::anthropic::Anthropic;
use llmq_shared::provider::gemini::Gemini;
use llmq_shared::provider::ollama::Ollama;
use llmq_shared::provider::openai::{Dialect, OpenAi};
use llmq_shared::provider::{
    Completion, Content, Error, Message, Part, Provider, Request, ResponseFormat, Role, Sink, Tool,
    ToolCall, ToolChoice, ToolMode, Usage,
};
use llmq_tests::mock::{MockOptions, MockServer};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    OpenAi,
    Anthropic,
    Gemini,
    Ollama,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::OpenAi => "openai",
            Format::Anthropic => "anthropic",
            Format::Gemini => "gemini",
            Format::Ollama => "ollama",
        }
    }

    /// The adapter pointed at `url` (the mock's base URL), with a key unless `keyless`.
    /// (`reqwest` and `secrecy` are not dependencies of this crate: the client and the key are
    /// built by inference.)
    fn adapter_with(self, url: &str, keyless: bool) -> Box<dyn Provider> {
        let key = || (!keyless).then(|| "sk-test".into());
        let name = self.name();
        match self {
            Format::OpenAi => Box::new(OpenAi::new(
                name,
                &format!("{url}/v1"),
                key(),
                Dialect::Compatible,
                Default::default(),
            )),
            Format::Anthropic => Box::new(Anthropic::new(name, url, key(), Default::default())),
            Format::Gemini => Box::new(Gemini::new(
                name,
                &format!("{url}/v1beta"),
                key(),
                Default::default(),
            )),
            Format::Ollama => Box::new(Ollama::new(name, url, Default::default())),
        }
    }

    fn adapter(self, url: &str) -> Box<dyn Provider> {
        self.adapter_with(url, false)
    }
}

async fn mock() -> MockServer {
    MockServer::start(MockOptions::default()).await.unwrap()
}

fn request<'a>(model: &'a str, prompt: &'a str) -> Request<'a> {
    Request {
        model,
        system: None,
        prompt: prompt.into(),
        max_tokens: None,
        temperature: None,
        timeout: Duration::from_secs(10),
        ..Request::default()
    }
}

async fn call(format: Format, mock: &MockServer, req: &Request<'_>) -> Result<Completion, Error> {
    format.adapter(&mock.url()).complete(req).await
}

async fn fails(format: Format, mock: &MockServer, model: &str) -> Error {
    match call(format, mock, &request(model, "hi")).await {
        Ok(c) => panic!("{format:?} {model}: expected an error, got {c:?}"),
        Err(e) => {
            assert_eq!(e.provider, format.name(), "{e}");
            assert_eq!(e.model, model, "{e}");
            e
        }
    }
}

// ---- the checks ----

/// A 400-character system prompt makes the mock report half the prompt as cached; a model
/// named `*reason*` reports half the output as reasoning, where the format has such fields.
async fn success_maps_text_and_every_usage_field(format: Format) {
    let mock = mock().await;
    let req = Request {
        system: Some("Answer briefly. ".repeat(25).into()), // 400 chars: 100 tokens
        ..request("mock-reason", "hello")
    };
    let c = call(format, &mock, &req).await.unwrap();
    let text = "mock answer from mock-reason: hello"; // 35 chars: 9 tokens
    assert_eq!(c.text, text, "{format:?}");
    // Prompt: (100 + 3) + (2 + 3) = 108, of which half cached; output 9, of which 9/2 reasoning.
    let (cached, reasoning) = match format {
        Format::OpenAi | Format::Gemini => (54, 4),
        // Anthropic caches only what the request marks (prompt_cache.rs); no separate
        // thinking count.
        Format::Anthropic => (0, 0),
        Format::Ollama => (0, 0), // neither
    };
    assert_eq!(
        c.usage,
        Usage {
            input_tokens: 108,
            output_tokens: 9,
            cached_tokens: cached,
            cache_write_tokens: 0,
            reasoning_tokens: reasoning,
        },
        "{format:?}"
    );
    assert_eq!(mock.calls("mock-reason"), 1, "{format:?}");
}

/// `max_tokens` and `temperature` reach the server in the format's own fields.
async fn max_tokens_and_temperature_are_sent(format: Format) {
    let mock = mock().await;
    let req = Request {
        max_tokens: Some(2),
        temperature: Some(0.5),
        ..request("mock-fast", "a prompt long enough to be cut")
    };
    let c = call(format, &mock, &req).await.unwrap();
    assert_eq!(c.text, "mock ans", "{format:?}");
    assert_eq!(
        c.usage,
        Usage {
            input_tokens: 8 + 3,
            output_tokens: 2,
            cached_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
        },
        "{format:?}"
    );
}

async fn server_errors_are_retryable(format: Format) {
    let mock = mock().await;
    for (model, status) in [("fail-500", 500), ("fail-503", 503)] {
        let e = fails(format, &mock, model).await;
        assert_eq!(e.class, ErrorClass::Retryable, "{e}");
        assert_eq!(e.status, Some(status), "{e}");
        assert!(e.is_retryable());
        assert!(
            !e.message.is_empty() && e.message.chars().count() <= 400,
            "{e}"
        );
    }
    if format == Format::Anthropic {
        let e = fails(format, &mock, "fail-529").await;
        assert_eq!(
            (e.class, e.status),
            (ErrorClass::Retryable, Some(529)),
            "{e}"
        );
        assert!(e.message.starts_with("overloaded_error"), "{e}");
    }
    // flaky-1: one 500, then an answer.
    let req = request("flaky-1", "flaky conversation");
    let e = call(format, &mock, &req).await.unwrap_err();
    assert_eq!(
        (e.class, e.status),
        (ErrorClass::Retryable, Some(500)),
        "{e}"
    );
    let c = call(format, &mock, &req).await.unwrap();
    assert!(c.text.starts_with("mock answer from flaky-1"), "{format:?}");
}

async fn client_errors_are_fatal(format: Format) {
    let mock = mock().await;
    for (model, status) in [("fail-400", 400), ("fail-401", 401), ("fail-404", 404)] {
        let e = fails(format, &mock, model).await;
        assert_eq!(e.class, ErrorClass::Fatal, "{e}");
        assert_eq!(e.status, Some(status), "{e}");
        assert!(!e.is_retryable());
        assert_eq!(e.retry_after, None, "{e}");
    }
}

async fn context_too_long_is_fatal(format: Format) {
    let mock = mock().await;
    let e = fails(format, &mock, "context-too-long").await;
    assert_eq!(e.class, ErrorClass::Fatal, "{e}");
    assert_eq!(e.status, Some(400), "{e}");
    assert!(e.message.starts_with("context too long"), "{e}");
    // The same by marker.
    let req = request("mock-fast", "[[mock:context-too-long]] hi");
    let e = call(format, &mock, &req).await.unwrap_err();
    assert!(e.message.starts_with("context too long"), "{e}");
}

/// Every format, every form of the wait: `Retry-After: 1`, `retry-after-ms: 200` and an
/// HTTP-date 2 s ahead (Gemini: a `RetryInfo` detail, with the date header for the last).
async fn rate_limits_carry_the_wait(format: Format) {
    let mock = mock().await;
    let e = fails(format, &mock, "rate-limit").await;
    assert_eq!(e.class, ErrorClass::RateLimited, "{e}");
    assert_eq!(e.status, Some(429), "{e}");
    assert_eq!(e.retry_after, Some(Duration::from_secs(1)), "{e}");

    let e = fails(format, &mock, "rate-limit-ms").await;
    assert_eq!(e.class, ErrorClass::RateLimited, "{e}");
    assert_eq!(e.retry_after, Some(Duration::from_millis(200)), "{e}");

    let e = fails(format, &mock, "rate-limit-date").await;
    assert_eq!(e.class, ErrorClass::RateLimited, "{e}");
    let wait = e.retry_after.unwrap();
    // A whole-second date at least 2 s ahead, read a moment later.
    assert!(
        wait >= Duration::from_millis(1500) && wait <= Duration::from_secs(3),
        "{format:?}: {wait:?}"
    );
}

async fn timeouts_are_retryable(format: Format) {
    let mock = mock().await;
    let req = Request {
        timeout: Duration::from_millis(300),
        ..request("timeout", "hang")
    };
    let start = Instant::now();
    // The mock's `timeout` hangs for 10 minutes: an adapter that ignores the timeout fails here.
    let e = tokio::time::timeout(Duration::from_secs(5), call(format, &mock, &req))
        .await
        .unwrap_or_else(|_| panic!("{format:?}: request.timeout was not applied"))
        .unwrap_err();
    let took = start.elapsed();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    assert_eq!(e.status, None, "{e}");
    assert!(e.message.contains("300ms"), "{e}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{format:?}: {took:?}"
    );
}

async fn refused_connections_are_retryable(format: Format) {
    // A port where nothing listens, nor will: below the range another test's server binds.
    let url = format!("http://127.0.0.1:{}", llmq_tests::harness::free_port());
    let e = format
        .adapter(&url)
        .complete(&request("mock-fast", "hi"))
        .await
        .unwrap_err();
    assert_eq!((e.class, e.status), (ErrorClass::Retryable, None), "{e}");
    assert!(e.message.starts_with("cannot connect"), "{e}");
}

async fn a_missing_key_is_fatal(format: Format) {
    let mock = mock().await;
    let adapter = format.adapter_with(&mock.url(), true);
    let result = adapter.complete(&request("mock-fast", "hi")).await;
    if format == Format::Ollama {
        // Ollama has no auth.
        assert!(result.is_ok(), "{result:?}");
        return;
    }
    let e = result.unwrap_err();
    assert_eq!(e.class, ErrorClass::Fatal, "{e}");
    // Gemini says 403 PERMISSION_DENIED to unidentified callers.
    let want = if format == Format::Gemini { 403 } else { 401 };
    assert_eq!(e.status, Some(want), "{e}");
}

macro_rules! adapter_tests {
    ($module:ident, $format:expr) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn success_maps_text_and_every_usage_field() {
                super::success_maps_text_and_every_usage_field($format).await;
            }

            #[tokio::test]
            async fn max_tokens_and_temperature_are_sent() {
                super::max_tokens_and_temperature_are_sent($format).await;
            }

            #[tokio::test]
            async fn server_errors_are_retryable() {
                super::server_errors_are_retryable($format).await;
            }

            #[tokio::test]
            async fn client_errors_are_fatal() {
                super::client_errors_are_fatal($format).await;
            }

            #[tokio::test]
            async fn context_too_long_is_fatal() {
                super::context_too_long_is_fatal($format).await;
            }

            #[tokio::test]
            async fn rate_limits_carry_the_wait() {
                super::rate_limits_carry_the_wait($format).await;
            }

            #[tokio::test]
            async fn timeouts_are_retryable() {
                super::timeouts_are_retryable($format).await;
            }

            #[tokio::test]
            async fn refused_connections_are_retryable() {
                super::refused_connections_are_retryable($format).await;
            }

            #[tokio::test]
            async fn a_missing_key_is_fatal() {
                super::a_missing_key_is_fatal($format).await;
            }

            #[tokio::test]
            async fn conversations_arrive_whole() {
                super::conversations_arrive_whole($format).await;
            }

            #[tokio::test]
            async fn tool_calls_come_back_and_their_answers_go_in() {
                super::tool_calls_come_back_and_their_answers_go_in($format).await;
            }

            #[tokio::test]
            async fn a_streamed_answer_arrives_in_pieces_and_adds_up() {
                super::a_streamed_answer_arrives_in_pieces_and_adds_up($format).await;
            }

            #[tokio::test]
            async fn images_arrive_in_the_formats_shape() {
                super::images_arrive_in_the_formats_shape($format).await;
            }

            #[tokio::test]
            async fn parallel_calls_are_answered_together() {
                super::parallel_calls_are_answered_together($format).await;
            }

            #[tokio::test]
            async fn schemas_go_in_the_native_field() {
                super::schemas_go_in_the_native_field($format).await;
            }
        }
    };
}

adapter_tests!(openai, Format::OpenAi);
adapter_tests!(anthropic, Format::Anthropic);
adapter_tests!(gemini, Format::Gemini);
adapter_tests!(ollama, Format::Ollama);

// ---- conversations, tools, schemas ----

fn tool() -> Tool {
    Tool {
        name: "get_weather".into(),
        description: Some("The weather in a city".into()),
        parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    }
}

/// Every turn arrives in order, in the format's own shape: the system prompt (the task's and
/// its system turns) first, the prompt last.
async fn conversations_arrive_whole(format: Format) {
    let mock = mock().await;
    let req = Request {
        system: Some("be brief".into()),
        messages: vec![
            Message::text(Role::System, "answer in English"),
            Message::text(Role::User, "what is 2+2?"),
            Message::text(Role::Assistant, "4"),
            Message::text(Role::User, "and 3+3?"),
        ]
        .into(),
        ..request("transcript", "and 4+4?")
    };
    let c = call(format, &mock, &req).await.unwrap();
    let turns: Vec<(String, String)> = serde_json::from_str(&c.text).unwrap();
    let expected = [
        ("system", "be brief\n\nanswer in English"),
        ("user", "what is 2+2?"),
        ("assistant", "4"),
        ("user", "and 3+3?"),
        ("user", "and 4+4?"),
    ];
    let turns: Vec<(&str, &str)> = turns
        .iter()
        .map(|(r, t)| (r.as_str(), t.as_str()))
        .collect();
    assert_eq!(turns, expected, "{format:?}");
}

/// In streaming mode the answer arrives in pieces that add up to the same completion, with
/// the same usage, as the call without streaming; a stream that stops halfway is a broken
/// connection, not an answer.
async fn a_streamed_answer_arrives_in_pieces_and_adds_up(format: Format) {
    let mock = mock().await;
    let prompt = "tell me a story about rivers and the sea";
    let plain = call(format, &mock, &request("mock-fast", prompt))
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let req = Request {
        sink: Some(Sink(tx)),
        ..request("mock-fast", prompt)
    };
    let streamed = call(format, &mock, &req).await.unwrap();
    drop(req);
    let mut pieces = Vec::new();
    while let Some(p) = rx.recv().await {
        pieces.push(p);
    }
    assert!(pieces.len() > 1, "{format:?}: {pieces:?}");
    assert_eq!(pieces.concat(), streamed.text, "{format:?}");
    assert_eq!(streamed.text, plain.text, "{format:?}");
    assert_eq!(streamed.usage, plain.usage, "{format:?}");

    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let cut = Request {
        sink: Some(Sink(tx)),
        ..request("stream-break-once", prompt)
    };
    let e = call(format, &mock, &cut).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{format:?}: {e}");
    assert!(e.is_outage(), "{format:?}: {e}");
    assert!(e.message.contains("before the answer was complete"), "{e}");
    call(format, &mock, &cut).await.unwrap();
}

/// Images go in each format's shape, in order with the text: by URL where the format takes
/// one, else as data.
async fn images_arrive_in_the_formats_shape(format: Format) {
    let mock = mock().await;
    let mut parts = vec![
        Part::Text {
            text: "compare ".into(),
        },
        Part::Image {
            url: None,
            data: Some("iVBORw0KGgo=".into()),
            media_type: Some("image/png".into()),
        },
    ];
    if format != Format::Ollama {
        parts.push(Part::Image {
            url: Some("https://example.com/b.webp".into()),
            data: None,
            media_type: None,
        });
    }
    let req = Request {
        messages: vec![Message {
            content: Content::Parts(parts),
            ..Message::text(Role::User, "")
        }]
        .into(),
        ..request("transcript", "")
    };
    let c = call(format, &mock, &req).await.unwrap();
    let turns: Vec<(String, String)> = serde_json::from_str(&c.text).unwrap();
    let expected = match format {
        Format::OpenAi => "compare [image image/png][image https://example.com/b.webp]",
        Format::Anthropic => "compare [image image/png][image https://example.com/b.webp]",
        Format::Gemini => "compare [image image/png][image https://example.com/b.webp]",
        Format::Ollama => "compare [image data]",
    };
    assert_eq!(
        turns,
        [("user".to_owned(), expected.to_owned())],
        "{format:?}"
    );
}

/// The model's tool calls come back with their arguments; a later request carrying the call
/// and the tool's answer reaches the model, which reads the answer.
async fn tool_calls_come_back_and_their_answers_go_in(format: Format) {
    let mock = mock().await;
    let required = ToolChoice::Mode(ToolMode::Required);
    let req = Request {
        tools: vec![tool()].into(),
        tool_choice: Some(&required),
        ..request("tool-caller", "what is the weather in Paris?")
    };
    let c = call(format, &mock, &req).await.unwrap();
    assert_eq!(c.text, "", "{format:?}");
    assert_eq!(c.tool_calls.len(), 1, "{format:?}: {c:?}");
    let made = &c.tool_calls[0];
    assert_eq!(
        (made.name.as_str(), &made.arguments),
        ("get_weather", &json!({"city": "x"}))
    );
    assert!(!made.id.is_empty());
    if format == Format::Gemini {
        // Gemini's thought signature is kept, to go back with the call.
        assert_eq!(made.signature.as_deref(), Some("sig-get_weather"));
    }
    let follow = Request {
        messages: vec![
            Message::text(Role::User, "what is the weather in Paris?"),
            Message {
                tool_calls: vec![made.clone()],
                ..Message::text(Role::Assistant, "")
            },
            Message {
                tool_call_id: Some(made.id.clone()),
                ..Message::text(Role::Tool, "sunny, 21 degrees")
            },
        ]
        .into(),
        tools: vec![tool()].into(),
        ..request("tool-caller", "")
    };
    let c = call(format, &mock, &follow).await.unwrap();
    assert_eq!(c.text, "the tool said: sunny, 21 degrees", "{format:?}");
    assert!(c.tool_calls.is_empty());
}

/// Two calls made at once are answered in one turn, as every format wants.
async fn parallel_calls_are_answered_together(format: Format) {
    let mock = mock().await;
    let made = |id: &str, city: &str| ToolCall {
        id: id.into(),
        name: "get_weather".into(),
        arguments: json!({"city": city}),
        signature: Some("sig".into()),
    };
    let answer = |id: &str, said: &str| Message {
        tool_call_id: Some(id.into()),
        ..Message::text(Role::Tool, said)
    };
    let req = Request {
        messages: vec![
            Message::text(Role::User, "weather in Paris and Oslo?"),
            Message {
                tool_calls: vec![made("c1", "Paris"), made("c2", "Oslo")],
                ..Message::text(Role::Assistant, " ")
            },
            answer("c1", "sunny"),
            answer("c2", "snow"),
        ]
        .into(),
        tools: vec![tool()].into(),
        ..request("transcript", "which is warmer?")
    };
    let c = call(format, &mock, &req).await.unwrap();
    let turns: Vec<(String, String)> = serde_json::from_str(&c.text).unwrap();
    let turns: Vec<(&str, &str)> = turns
        .iter()
        .map(|(r, t)| (r.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        turns,
        [
            ("user", "weather in Paris and Oslo?"),
            ("assistant", "calls get_weather, get_weather"),
            ("tool", "sunny"),
            ("tool", "snow"),
            ("user", "which is warmer?"),
        ],
        "{format:?}"
    );
}

/// A schema goes in the format's native field, so the model answers JSON that fits it.
async fn schemas_go_in_the_native_field(format: Format) {
    let mock = mock().await;
    let schema = json!({"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer", "minimum": 3}}, "required": ["name", "n"]});
    let asked = ResponseFormat::JsonSchema {
        schema,
        name: Some("person".into()),
        strict: None,
    };
    let req = Request {
        response_format: Some(&asked),
        ..request("mock-fast", "extract the person")
    };
    let c = call(format, &mock, &req).await.unwrap();
    assert_eq!(
        asked.read(&c.text).unwrap(),
        json!({"name": "x", "n": 3}),
        "{format:?}"
    );
}

// ---- format-specific ----

#[tokio::test]
async fn gemini_blocked_prompts_are_fatal() {
    let mock = mock().await;
    let e = fails(Format::Gemini, &mock, "blocked").await;
    assert_eq!(e.class, ErrorClass::Fatal, "{e}");
    assert_eq!(e.status, None, "{e}");
    assert_eq!(e.message, "blocked: SAFETY");
    let req = request("gemini-2.5-flash", "[[mock:blocked]] something");
    let e = call(Format::Gemini, &mock, &req).await.unwrap_err();
    assert_eq!(
        (e.class, e.message.as_str()),
        (ErrorClass::Fatal, "blocked: SAFETY")
    );
}

#[tokio::test]
async fn gemini_rate_limit_wait_comes_from_retry_info() {
    let mock = mock().await;
    // The mock sends no Retry-After for `rate-limit` on this route: the 1 s is the detail's.
    let e = fails(Format::Gemini, &mock, "rate-limit").await;
    assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
    assert!(e.message.starts_with("RESOURCE_EXHAUSTED: "), "{e}");
}

#[tokio::test]
async fn ollama_missing_model_is_fatal() {
    let mock = mock().await;
    let e = fails(Format::Ollama, &mock, "missing").await;
    assert_eq!((e.class, e.status), (ErrorClass::Fatal, Some(404)), "{e}");
    assert_eq!(
        e.message,
        "model \"missing\" not found, try pulling it first"
    );
}

#[tokio::test]
async fn the_same_request_costs_the_same_in_every_format() {
    let mock = mock().await;
    let req = Request {
        system: Some("Be terse.".into()),
        ..request("mock-smart", "What is the capital of France?")
    };
    let mut usages = Vec::new();
    for format in [
        Format::OpenAi,
        Format::Anthropic,
        Format::Gemini,
        Format::Ollama,
    ] {
        let c = call(format, &mock, &req).await.unwrap();
        assert_eq!(
            c.text, "mock answer from mock-smart: What is the capital of France?",
            "{format:?}"
        );
        usages.push(c.usage);
    }
    assert!(usages.windows(2).all(|w| w[0] == w[1]), "{usages:?}");
    assert_eq!(mock.calls("mock-smart"), 4);
}

use super::*;
use llmq_shared::outcome::ErrorClass;

fn read(records: &[Value]) -> Vec<Result<BatchTask, String>> {
    let mut reader = Reader::default();
    records.iter().map(|r| reader.task(r.clone())).collect()
}

fn one(record: Value) -> BatchTask {
    read(&[record]).pop().unwrap().unwrap()
}

fn err(record: Value) -> String {
    read(&[record]).pop().unwrap().unwrap_err()
}

#[test]
fn openai_s_documented_line_is_a_task_pinned_to_its_model() {
    // From OpenAI's Batch API guide.
    let line = json!({"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-3.5-turbo-0125", "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello world!"}], "max_tokens": 1000}});
    assert_eq!(Shape::of(&line), Shape::OpenAi);
    let t = one(line);
    assert_eq!(t.custom_id.as_deref(), Some("request-1"));
    assert_eq!(t.model.as_deref(), Some("gpt-3.5-turbo-0125"));
    assert_eq!(t.max_tokens, Some(1000));
    assert_eq!(
        t.messages,
        vec![
            Message::text(Role::System, "You are a helpful assistant."),
            Message::text(Role::User, "Hello world!")
        ]
    );
}

#[test]
fn openai_s_tools_images_formats_and_tool_turns_carry_over() {
    let t = one(
        json!({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o", "max_completion_tokens": 50, "temperature": 0.2,
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"q\": \"cat\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"}],
        "tools": [{"type": "function", "function": {"name": "look", "description": "Looks", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "look"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "pet", "strict": true, "schema": {"type": "object"}}}}}),
    );
    assert_eq!(t.max_tokens, Some(50));
    assert_eq!(t.temperature, Some(0.2));
    assert_eq!(t.messages[0].role, Role::System);
    let Content::Parts(parts) = &t.messages[1].content else {
        panic!("{:?}", t.messages[1]);
    };
    assert_eq!(parts[1].media_type(), "image/png");
    assert!(matches!(&parts[1], Part::Image { data: Some(d), .. } if d == "iVBORw0KGgo="));
    assert!(matches!(&parts[2], Part::Image { url: Some(u), .. } if u.ends_with("a.jpg")));
    assert_eq!(t.messages[2].tool_calls[0].arguments, json!({"q": "cat"}));
    assert_eq!(t.messages[3].tool_call_id.as_deref(), Some("call_1"));
    assert_eq!(t.tools[0].name, "look");
    assert_eq!(
        t.tool_choice,
        Some(ToolChoice::Named(NamedTool {
            name: "look".into()
        }))
    );
    assert_eq!(
        t.response_format,
        Some(ResponseFormat::JsonSchema {
            schema: json!({"type": "object"}),
            name: Some("pet".into()),
            strict: Some(true)
        })
    );
}

#[test]
fn anthropic_s_documented_requests_are_tasks() {
    // From Anthropic's Message Batches documentation.
    let r = json!({"custom_id": "my-first-request", "params": {"model": "claude-opus-4-1",
        "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello, world"}]}});
    assert_eq!(Shape::of(&r), Shape::Anthropic);
    let t = one(r);
    assert_eq!(t.custom_id.as_deref(), Some("my-first-request"));
    assert_eq!(t.model.as_deref(), Some("claude-opus-4-1"));
    assert_eq!(t.max_tokens, Some(1024));
    assert_eq!(t.messages, vec![Message::text(Role::User, "Hello, world")]);
}

#[test]
fn anthropic_s_system_blocks_tools_and_tool_results_carry_over() {
    let t = one(
        json!({"custom_id": "c", "params": {"model": "claude-sonnet-4-5", "max_tokens": 10,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/gif", "data": "R0lGOD=="}}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "rain"}]},
                {"type": "text", "text": "So?"}]}],
        "tools": [{"name": "weather", "description": "Weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any"},
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}}),
    );
    assert_eq!(t.system.as_deref(), Some("Be brief."));
    assert_eq!(t.messages.len(), 4, "{:?}", t.messages);
    assert_eq!(
        t.messages[1].tool_calls[0].arguments,
        json!({"city": "Oslo"})
    );
    assert_eq!(t.messages[1].content, Content::Text("Looking.".into()));
    assert_eq!(t.messages[2].role, Role::Tool);
    assert_eq!(t.messages[2].tool_call_id.as_deref(), Some("toolu_1"));
    assert_eq!(t.messages[2].content, Content::Text("rain".into()));
    assert_eq!(t.messages[3], Message::text(Role::User, "So?"));
    assert_eq!(t.tools[0].parameters, json!({"type": "object"}));
    assert_eq!(t.tool_choice, Some(ToolChoice::Mode(ToolMode::Required)));
    assert!(matches!(
        t.response_format,
        Some(ResponseFormat::JsonSchema { .. })
    ));
}

#[test]
fn what_llmq_does_not_run_is_named() {
    let line = |url: &str| {
        json!({"custom_id": "c", "method": "POST", "url": url,
            "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}})
    };
    let e = err(line("/v1/embeddings"));
    assert!(
        e.contains("\"/v1/embeddings\" is not an endpoint llmq runs"),
        "{e}"
    );
    let e = err(json!({"method": "POST", "url": OPENAI_CHAT, "body": {}}));
    assert!(e.contains("no `custom_id`"), "{e}");
    let e = err(
        json!({"custom_id": "c", "params": {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "document", "source": {}}]}]}}),
    );
    assert!(e.contains("block of type \"document\""), "{e}");
    let e = err(
        json!({"custom_id": "c", "params": {"model": "m", "messages": [],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}]}}),
    );
    assert!(e.contains("one of Anthropic's own"), "{e}");
    let e = err(json!({"custom_id": "c", "params": {"messages": []}, "extra": 1}));
    assert!(e.contains("unknown field `extra`"), "{e}");
    // One kind a file.
    let mixed = read(&[line(OPENAI_CHAT), json!({"prompt": "x", "custom_id": "n"})]);
    let e = mixed[1].as_ref().unwrap_err();
    assert!(
        e.contains("this is an llmq task but the file's first record is an OpenAI Batch line"),
        "{e}"
    );
    // Hostile text stays data in the sentence: quoted, cut short.
    let e = err(line(&format!("/v1/x\"\n{}", "y".repeat(500))));
    assert!(e.len() < 300 && !e.contains('\n'), "{e}");
}

fn record(status: Status) -> TaskRecord {
    let mut r = TaskRecord::pending(
        "0b0c0d0e-0000-4000-8000-000000000001".parse().unwrap(),
        "q",
        status,
    );
    r.provider = Some("anthropic-main".into());
    r.model = Some("claude-sonnet-4-5".into());
    r.input_tokens = 20;
    r.cached_tokens = 5;
    r.output_tokens = 7;
    r.finished_at = Some(chrono::Utc::now());
    r
}

#[test]
fn results_come_back_in_the_provider_s_output_shape() {
    let mut ok = record(Status::Succeeded);
    ok.output = Some("Hi.".into());
    let line = result_line(Shape::OpenAi, "request-1", &ok);
    assert_eq!(line["custom_id"], "request-1");
    assert_eq!(line["error"], Value::Null);
    assert_eq!(line["response"]["status_code"], 200);
    let body = &line["response"]["body"];
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], "Hi.");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["total_tokens"], 27);
    assert_eq!(line["llmq"]["provider"], "anthropic-main");
    let a = result_line(Shape::Anthropic, "request-1", &ok);
    let message = &a["result"]["message"];
    assert_eq!(a["result"]["type"], "succeeded");
    assert_eq!(message["content"][0]["text"], "Hi.");
    assert_eq!(message["usage"]["input_tokens"], 15, "cache reads apart");
    assert_eq!(message["usage"]["cache_read_input_tokens"], 5);

    // Tool calls: OpenAI's arguments are JSON text.
    ok.output = Some(String::new());
    ok.tool_calls = vec![ToolCall {
        id: "call_1".into(),
        name: "look".into(),
        arguments: json!({"q": 1}),
        signature: None,
    }];
    let line = result_line(Shape::OpenAi, "c", &ok);
    let message = &line["response"]["body"]["choices"][0]["message"];
    assert_eq!(message["content"], Value::Null);
    assert_eq!(
        message["tool_calls"][0]["function"]["arguments"],
        "{\"q\":1}"
    );
    let a = result_line(Shape::Anthropic, "c", &ok);
    assert_eq!(a["result"]["message"]["content"][0]["type"], "tool_use");
    assert_eq!(a["result"]["message"]["stop_reason"], "tool_use");

    let mut failed = record(Status::Dead);
    failed.error = Some("400 from the provider".into());
    failed.error_class = Some(ErrorClass::Fatal);
    let line = result_line(Shape::OpenAi, "c", &failed);
    assert_eq!(line["response"], Value::Null);
    assert_eq!(line["error"]["code"], "fatal");
    let a = result_line(Shape::Anthropic, "c", &failed);
    assert_eq!(
        a["result"]["error"]["error"]["type"],
        "invalid_request_error"
    );
    let waiting = record(Status::Queued);
    assert_eq!(
        result_line(Shape::OpenAi, "c", &waiting)["error"]["code"],
        "batch_expired"
    );
    assert_eq!(
        result_line(Shape::Anthropic, "c", &waiting)["result"]["type"],
        "expired"
    );
    assert_eq!(
        result_line(Shape::Anthropic, "c", &record(Status::Cancelled))["result"]["type"],
        "canceled"
    );
}

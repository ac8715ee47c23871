//! What a task can ask beyond a prompt, through a real worker, Redis, Postgres and llmq-mock:
//! JSON that must fit a schema (a failed call when it does not, retried and billed), tool
//! calls in the result record, conversations, and the dead letters of bad ones.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq_shared::config::Config;
use llmq_shared::conversation::{ResponseFormat, Tool};
use llmq_shared::envelope::Envelope;
use llmq_shared::ids::TaskId;
use llmq_shared::outcome::Status;
use llmq_shared::queue::{Client, OutEntry};
use llmq_tests::harness::{TestEnv, WorkerHandle};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn person() -> ResponseFormat {
    ResponseFormat::JsonSchema {
        schema: json!({
            "type": "object",
            "properties": {"name": {"type": "string"}, "n": {"type": "integer", "minimum": 3}},
            "required": ["name", "n"],
        }),
        name: Some("person".into()),
        strict: None,
    }
}

/// One provider per wire format, all on the test's mock; names unique to the test (circuits
/// and quotas are shared in Redis).
const FORMATS: [&str; 4] = ["openai_compatible", "anthropic", "gemini", "ollama"];

fn provider(env: &TestEnv, kind: &str) -> String {
    format!("{kind}-{}", &env.queue[2..])
}

/// A worker whose provider file has one provider per wire format.
fn worker(env: &TestEnv) -> WorkerHandle {
    let url = env.mock.url();
    let mut text = String::from("providers:\n");
    for kind in FORMATS {
        let base = match kind {
            "openai_compatible" => format!("{url}/v1"),
            "gemini" => format!("{url}/v1beta"),
            _ => url.clone(),
        };
        text.push_str(&format!(
            "  - {{name: {}, kind: {kind}, base_url: \"{base}\", api_key: k, models: [{{id: mock-fast, input_usd_per_mtok: 1, output_usd_per_mtok: 2}}]}}\n",
            provider(env, kind)
        ));
    }
    text.push_str("routing:\n  retry: {tries_per_provider: 2, backoff: [10ms, 20ms]}\n");
    let mut s = env.settings();
    s.config = Config::parse("formats.yaml", &text, &|_| None).unwrap();
    WorkerHandle::start(s)
}

/// A task for the `kind` provider whose prompt says which magic answer it gets.
fn task(env: &TestEnv, kind: &str, prompt: &str) -> Envelope {
    let mut e = Envelope::new(prompt);
    e.provider = Some(provider(env, kind).into());
    e.fallback = Some(false);
    e
}

/// Runs `e` and waits for its final record.
async fn run(env: &TestEnv, e: &Envelope) -> llmq_shared::outcome::TaskRecord {
    env.redis.enqueue(&env.keys, e).await.unwrap();
    env.wait_final(e.id.unwrap(), WAIT).await.unwrap()
}

/// (outcome, error class, error, cost) of each call of `task_id`, in order.
async fn calls_of(
    env: &TestEnv,
    task_id: uuid::Uuid,
) -> Vec<(String, Option<String>, Option<String>, f64)> {
    sqlx::query_as(
        "SELECT outcome, error_class, error, cost_usd::float8 FROM provider_calls
         WHERE task_id = $1 ORDER BY attempt, call_no",
    )
    .bind(task_id)
    .fetch_all(env.ledger.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn an_answer_that_does_not_fit_the_schema_is_a_billed_failed_call_that_retries() {
    let env = TestEnv::new().await.unwrap();
    let _w = worker(&env);
    for kind in FORMATS {
        // Its own prompt per format: the mock counts a conversation's requests by its text.
        let prompt = format!("extract the person ({kind}) [[mock:json-bad-once]]");
        let mut e = task(&env, kind, &prompt);
        e.response_format = Some(Box::new(person()));
        let r = run(&env, &e).await;
        assert_eq!(r.status, Status::Succeeded, "{kind}: {r:?}");
        assert_eq!(r.json, Some(json!({"name": "x", "n": 3})), "{kind}");
        let output: serde_json::Value = serde_json::from_str(r.output.as_deref().unwrap()).unwrap();
        assert_eq!(output, json!({"name": "x", "n": 3}));
        let id = e.id.unwrap();
        env.eventually("both calls in the ledger", WAIT, || async {
            calls_of(&env, id.uuid()).await.len() == 2
        })
        .await
        .unwrap();
        let calls = calls_of(&env, id.uuid()).await;
        let (outcome, class, error, cost) = &calls[0];
        assert_eq!(
            (outcome.as_str(), class.as_deref()),
            ("error", Some("retryable")),
            "{kind}"
        );
        assert!(
            error.as_deref().unwrap().contains("the answer is not JSON"),
            "{kind}: {error:?}"
        );
        assert!(*cost > 0.0, "{kind}: the call was made and is billed");
        assert_eq!(calls[1].0, "ok", "{kind}");
    }
}

#[tokio::test]
async fn an_answer_that_never_fits_ends_saying_why() {
    let env = TestEnv::new().await.unwrap();
    let _w = worker(&env);
    for kind in FORMATS {
        let mut e = task(&env, kind, "extract the person [[mock:json-wrong]]");
        e.response_format = Some(Box::new(person()));
        e.max_attempts = Some(1);
        let r = run(&env, &e).await;
        assert_eq!(r.status, Status::Dead, "{kind}: {r:?}");
        let error = r.error.unwrap_or_default();
        assert!(
            error.contains("the answer does not fit the schema: at /: "),
            "{kind}: {error}"
        );
        assert_eq!(r.json, None);
    }
}

#[tokio::test]
async fn the_models_tool_calls_reach_the_result_and_are_never_run() {
    let env = TestEnv::new().await.unwrap();
    let _w = worker(&env);
    for kind in FORMATS {
        let mut e = task(
            &env,
            kind,
            "what is the weather in Paris? [[mock:tool-caller]]",
        );
        e.tools = vec![Tool {
            name: "get_weather".into(),
            description: None,
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }];
        let r = run(&env, &e).await;
        assert_eq!(r.status, Status::Succeeded, "{kind}: {r:?}");
        assert_eq!(r.output.as_deref(), Some(""), "{kind}");
        assert_eq!(r.tool_calls.len(), 1, "{kind}: {r:?}");
        assert_eq!(r.tool_calls[0].name, "get_weather");
        assert_eq!(r.tool_calls[0].arguments, json!({"city": "x"}));
    }
}

#[tokio::test]
async fn a_conversation_runs_and_bad_ones_are_dead_letters_naming_the_field() {
    let env = TestEnv::new().await.unwrap();
    let _w = env.worker();
    // From any producer: one XADD of a conversation with no prompt.
    let good = json!({
        "v": 1,
        "id": uuid::Uuid::new_v4(),
        "model": "mock-fast",
        "messages": [
            {"role": "user", "content": "say hi"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": [{"type": "text", "text": "again"}]},
        ],
    });
    env.xadd("task", good.to_string().as_bytes()).await.unwrap();
    let r = env
        .wait_final(good["id"].as_str().unwrap(), WAIT)
        .await
        .unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(
        r.output.as_deref(),
        Some("mock answer from mock-fast: again")
    );

    for (task, says) in [
        (
            json!({"v": 1, "messages": [{"role": "robot", "content": "hi"}]}),
            "field `messages[0].role` is wrong",
        ),
        (
            json!({"v": 1, "messages": [{"role": "user", "content": ""}]}),
            "field `messages[0].content` is wrong: is empty",
        ),
        (
            json!({"v": 1, "prompt": "x", "tools": [{"name": "", "parameters": {"type": "object"}}]}),
            "field `tools[0].name` is wrong",
        ),
        (
            json!({"v": 1, "prompt": "x", "response_format": {"type": "json_schema", "schema": {"type": "nope"}}}),
            "field `response_format.schema` is wrong: is not a valid JSON Schema",
        ),
        (
            json!({"v": 1, "messages": [{"role": "tool", "tool_call_id": "c1", "content": "42"}]}),
            "field `messages[0].tool_call_id` is wrong: names no unanswered call",
        ),
    ] {
        env.xadd("task", task.to_string().as_bytes()).await.unwrap();
        env.dead_letter_saying(says, WAIT).await.unwrap();
    }
}

#[tokio::test]
async fn a_chain_step_hands_a_field_of_its_json_to_the_next() {
    let env = TestEnv::new().await.unwrap();
    let _w = env.worker();
    let id = format!("{}-json", env.queue);
    let chain = json!({"v": 1, "chain_id": id, "steps": [
        {"name": "extract", "prompt": "Extract the customer", "model": "mock-fast",
         "response_format": {"type": "json_schema", "schema": {"type": "object",
            "properties": {"customer": {"type": "object", "properties": {"name": {"type": "string"}}}},
            "required": ["customer"]}}},
        {"name": "greet", "after": ["extract"], "model": "mock-fast",
         "prompt": "Greet {{extract.json.customer.name}} of {{extract.json}}"},
        {"name": "missing", "after": ["greet"], "model": "mock-fast",
         "prompt": "Greet {{extract.json.customer.email}}"}]});
    env.redis.ensure_group(&env.keys).await.unwrap();
    env.xadd("chain", chain.to_string().as_bytes())
        .await
        .unwrap();
    let c = env.chain_ended(&id, WAIT).await;
    assert_eq!(c.steps["extract"].status, "succeeded", "{c:#?}");
    assert_eq!(
        env.step_output(&c, "greet").await,
        r#"mock answer from mock-fast: Greet x of {"customer":{"name":"x"}}"#
    );
    // A field the answer does not have fails the step; it never runs blind.
    assert_eq!(c.steps["missing"].status, "failed", "{c:#?}");
    let error = c.steps["missing"].error.clone().unwrap_or_default();
    assert!(
        error.contains("handoff unresolved: {{extract.json.customer.email}} has no value"),
        "{error}"
    );
}

/// Follows task `id`'s live answer from its start as any language would (XREAD BLOCK): its
/// entries up to the one that ends it, and whether text came before the task's result.
async fn follow(env: &TestEnv, id: TaskId) -> (Vec<OutEntry>, bool) {
    let mut after = "0".to_owned();
    let mut seen = Vec::new();
    let mut early = false;
    let mut conn = env.redis.blocking_conn().await.unwrap();
    loop {
        let entries = Client::read_out(&mut conn, &env.keys, id, &after, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            !entries.is_empty(),
            "nothing in the live answer within 10 s: {seen:?}"
        );
        for (entry_id, entry) in entries {
            after = entry_id;
            if matches!(entry, OutEntry::Text(_)) && !early {
                let ids = [id];
                early = env.redis.results(&env.keys, &ids).await.unwrap()[0].is_none();
            }
            let end = entry == OutEntry::Done;
            seen.push(entry);
            if end {
                return (seen, early);
            }
        }
    }
}

fn text_of(entries: &[OutEntry]) -> String {
    entries
        .iter()
        .filter_map(|e| match e {
            OutEntry::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_streamed_answer_is_read_while_it_is_written() {
    let env = TestEnv::new().await.unwrap();
    let _w = worker(&env);
    for kind in FORMATS {
        let mut e = task(
            &env,
            kind,
            &format!("tell a story ({kind}) [[mock:stream-slow]]"),
        );
        e.stream = Some(true);
        env.redis.enqueue(&env.keys, &e).await.unwrap();
        let id = e.id.unwrap();
        let (entries, early) = follow(&env, id).await;
        assert!(
            early,
            "{kind}: the first text came only after the result: {entries:?}"
        );
        assert!(entries.len() > 2, "{kind}: {entries:?}");
        let r = env.wait_final(&id, WAIT).await.unwrap();
        assert_eq!(r.status, Status::Succeeded, "{kind}: {r:?}");
        assert_eq!(
            r.output.as_deref(),
            Some(text_of(&entries).as_str()),
            "{kind}"
        );
        assert!(r.input_tokens > 0 && r.output_tokens > 0, "{kind}: {r:?}");
    }
}

#[tokio::test]
async fn a_stream_cut_halfway_says_so_and_the_retry_streams_it_whole() {
    let env = TestEnv::new().await.unwrap();
    let _w = worker(&env);
    let mut e = task(
        &env,
        "openai_compatible",
        "tell a story [[mock:stream-break-once]]",
    );
    e.stream = Some(true);
    env.redis.enqueue(&env.keys, &e).await.unwrap();
    let id = e.id.unwrap();
    let (entries, _) = follow(&env, id).await;
    let restart = entries
        .iter()
        .position(|e| matches!(e, OutEntry::Restart(_)))
        .unwrap_or_else(|| panic!("no restart: {entries:?}"));
    assert!(restart > 0, "part of the answer came first: {entries:?}");
    let r = env.wait_final(&id, WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(
        r.output.as_deref(),
        Some(text_of(&entries[restart..]).as_str()),
        "after the restart, the whole answer again"
    );
    // A command cannot stream: a hint to one is refused with the reason.
    let mut bad = Envelope::new("x");
    bad.stream = Some(true);
    bad.tools = vec![Tool {
        name: "t".into(),
        description: None,
        parameters: json!({"type": "object"}),
    }];
    env.xadd("task", bad.to_json().as_bytes()).await.unwrap();
    env.dead_letter_saying("field `stream` is wrong: cannot be used with tools", WAIT)
        .await
        .unwrap();
}

#[tokio::test]
async fn llmq_submit_stream_prints_the_answer_as_it_is_written() {
    let env = TestEnv::new().await.unwrap();
    let _w = env.worker();
    let (code, out) = env
        .cli(&[
            "submit",
            "--prompt",
            "tell a story [[mock:stream-slow]]",
            "--queue",
            &env.queue,
            "--wait",
            "--stream",
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with(
            "mock answer from mock-fast: tell a story [[mock:stream-slow]]\n\nTask ID:"
        ),
        "{out}"
    );
    assert!(out.contains("Status:    succeeded"), "{out}");
    assert!(
        !out.contains("Output:"),
        "the answer is not printed twice: {out}"
    );
}

#[tokio::test]
async fn llmq_batch_takes_conversations_and_schemas_and_refuses_a_bad_one_naming_it() {
    let env = TestEnv::new().await.unwrap();
    let _w = env.worker();
    let dir = std::env::temp_dir().join(format!("llmq-batch-{}", env.queue));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.json");
    std::fs::write(
        &good,
        json!([
            {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                          {"role": "user", "content": "again"}], "model": "mock-fast"},
            {"prompt": "extract", "model": "mock-fast",
             "response_format": {"type": "json_schema", "schema": {"type": "object",
                 "properties": {"n": {"type": "integer"}}, "required": ["n"]}}},
        ])
        .to_string(),
    )
    .unwrap();
    let (code, out) = env.batch(&good, &[]).await;
    assert_eq!(code, 0, "{out}");
    let ids: Vec<&str> = out.lines().collect();
    assert_eq!(ids.len(), 2, "{out}");
    let first = env.wait_final(ids[0], WAIT).await.unwrap();
    assert_eq!(
        first.output.as_deref(),
        Some("mock answer from mock-fast: again")
    );
    let second = env.wait_final(ids[1], WAIT).await.unwrap();
    assert_eq!(second.json, Some(json!({"n": 1})), "{second:?}");

    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        json!([{"prompt": "x", "tools": [{"name": "rm -rf", "parameters": {"type": "object"}}]}])
            .to_string(),
    )
    .unwrap();
    // As a user runs it, to read what it says on stderr.
    let run = std::process::Command::new(llmq_tests::harness::binary("llmq"))
        .args([
            "batch",
            "--input",
            bad.to_str().unwrap(),
            "--queue",
            &env.queue,
        ])
        .env("REDIS_URL", llmq_tests::harness::redis_url())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{said}");
    assert!(
        said.contains(
            "task [0]: field `tools[0].name` is wrong: `rm -rf` is not a name providers accept"
        ),
        "{said}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

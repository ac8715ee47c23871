//! Traces over OTLP: a worker process with `OTEL_EXPORTER_OTLP_ENDPOINT` set exports a span
//! per task attempt and a child per provider call with the GenAI attributes, and continues
//! the trace a producer put in the envelope's `traceparent`.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use llmq_shared::envelope::Envelope;
use llmq_shared::outcome::Status;
use llmq_tests::harness::{TestEnv, WorkerProcess};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

type Received = Arc<Mutex<Vec<Span>>>;

/// An OTLP/HTTP receiver on a free port: every span posted to `/v1/traces`.
async fn receiver() -> (String, Received) {
    let spans: Received = Arc::default();
    let app = Router::new()
        .route(
            "/v1/traces",
            post(|State(spans): State<Received>, body: Bytes| async move {
                let req = ExportTraceServiceRequest::decode(body).unwrap();
                let mut all = spans.lock().unwrap();
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        all.extend(ss.spans);
                    }
                }
                ""
            }),
        )
        .with_state(Arc::clone(&spans));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

fn attr(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone()?.value)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_worker_exports_the_task_and_provider_call_spans_inside_the_producers_trace() {
    let env = TestEnv::new().await.unwrap();
    let (endpoint, spans) = receiver().await;
    let _worker = WorkerProcess::spawn_with_vars(
        &env,
        include_str!("../../../examples/providers.mock.yaml"),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .unwrap();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut task = Envelope::new("trace me");
    task.model = Some("mock-fast".into());
    task.chain_id = Some("chain-traced".into());
    task.traceparent = Some(format!("00-{trace_id}-{parent_id}-01").into());
    env.redis
        .enqueue_many(&env.keys, &[task.clone()])
        .await
        .unwrap();
    let id = task.id.unwrap();
    let record = llmq::wait_for(
        &env.redis,
        &env.keys,
        std::slice::from_ref(&id),
        Some(Duration::from_secs(20)),
        |_| {},
    )
    .await
    .unwrap()
    .pop()
    .flatten()
    .unwrap();
    assert_eq!(record.status, Status::Succeeded);

    env.eventually("both spans exported", Duration::from_secs(20), || async {
        let spans = spans.lock().unwrap();
        spans.iter().any(|s| s.name.starts_with("task "))
            && spans.iter().any(|s| s.name == "chat mock-fast")
    })
    .await
    .unwrap();
    let spans = spans.lock().unwrap();
    let task_span = spans.iter().find(|s| s.name.starts_with("task ")).unwrap();
    assert_eq!(hex(&task_span.trace_id), trace_id, "the producer's trace");
    assert_eq!(
        hex(&task_span.parent_span_id),
        parent_id,
        "the producer's span"
    );
    assert_eq!(
        attr(task_span, "llmq.task.id"),
        Some(Value::StringValue(id.to_string()))
    );
    assert_eq!(
        attr(task_span, "llmq.queue"),
        Some(Value::StringValue(env.queue.clone()))
    );
    assert_eq!(
        attr(task_span, "llmq.chain.id"),
        Some(Value::StringValue("chain-traced".into()))
    );
    assert!(
        matches!(attr(task_span, "llmq.cost_usd"), Some(Value::DoubleValue(c)) if c > 0.0),
        "{task_span:?}"
    );

    let call = spans.iter().find(|s| s.name == "chat mock-fast").unwrap();
    assert_eq!(call.trace_id, task_span.trace_id);
    assert_eq!(
        call.parent_span_id, task_span.span_id,
        "a child of the task"
    );
    assert_eq!(
        attr(call, "gen_ai.system"),
        Some(Value::StringValue("openai".into()))
    );
    assert_eq!(
        attr(call, "gen_ai.request.model"),
        Some(Value::StringValue("mock-fast".into()))
    );
    for key in ["gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"] {
        assert!(
            matches!(attr(call, key), Some(Value::IntValue(n)) if n > 0),
            "{key} in {call:?}"
        );
    }
}

#[tokio::test]
async fn llmq_submit_exports_its_span_and_puts_its_traceparent_in_the_envelope() {
    let env = TestEnv::new().await.unwrap();
    let (endpoint, spans) = receiver().await;
    let out = tokio::process::Command::new(llmq_tests::harness::binary("llmq"))
        .args(["submit", "--prompt", "traced submit", "--queue", &env.queue])
        .env("REDIS_URL", llmq_tests::harness::redis_url())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    let task = env.stream_tasks("-", "+").await.unwrap().remove(0);
    assert_eq!(task["id"], id.as_str());
    let traceparent = task["traceparent"]
        .as_str()
        .expect("a traceparent")
        .to_owned();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");

    // The CLI flushed its span before it exited.
    let spans = spans.lock().unwrap();
    let submit = spans
        .iter()
        .find(|s| s.name == "llmq.submit")
        .expect("the submit span was exported");
    assert_eq!(hex(&submit.trace_id), parts[1]);
    assert_eq!(hex(&submit.span_id), parts[2]);
}

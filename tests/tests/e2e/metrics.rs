//! `/healthz`, `/readyz` and `/metrics` of a running worker.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq_tests::harness::{TestEnv, WorkerHandle};

#[tokio::test]
async fn a_worker_serves_health_readiness_and_prometheus_metrics() {
    let env = TestEnv::new().await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut s = env.settings();
    s.metrics_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let w = WorkerHandle::start(s);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    env.eventually("the worker ready", Duration::from_secs(10), || async {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await
    .unwrap();
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let (code, _) = env
        .cli(&[
            "submit", "--prompt", "count me", "--queue", &env.queue, "--wait",
        ])
        .await;
    assert_eq!(code, 0);
    let body = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let succeeded = format!(
        "llmq_tasks_total{{queue=\"{}\",outcome=\"succeeded\"}} 1",
        env.queue
    );
    assert!(body.contains(&succeeded), "no `{succeeded}` in\n{body}");
    assert!(body.contains("llmq_provider_call_seconds_bucket"), "{body}");
    assert!(body.contains("llmq_tokens_total"), "{body}");
    w.stop().await.unwrap();
}

//! `/healthz`, `/readyz` and `/metrics` of a running worker.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq_tests::harness::{TestEnv, WorkerHandle};

#[tokio::test]
async fn a_worker_serves_health_readiness_and_prometheus_metrics() {
    let env = TestEnv::new().await.unwrap();
    let port = llmq_tests::harness::free_port();
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

#[tokio::test]
async fn a_worker_whose_finisher_cannot_write_is_not_ready_until_it_can() {
    let env = TestEnv::new().await.unwrap();
    let (url, ledger) = env.own_ledger().await;
    let port = llmq_tests::harness::free_port();
    let mut s = env.settings();
    s.database_url = Some(url);
    s.metrics_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let w = WorkerHandle::start(s);
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let http = reqwest::Client::new();
    let status = || async {
        http.get(&readyz)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .ok()
    };
    env.eventually("the worker ready", Duration::from_secs(10), || async {
        status().await == Some(200)
    })
    .await
    .unwrap();

    // Every write of a call fails until the table is back: the worker must say so.
    sqlx::query("ALTER TABLE provider_calls RENAME TO provider_calls_away")
        .execute(ledger.pool())
        .await
        .unwrap();
    let mut task = llmq_shared::envelope::Envelope::new("wait for the ledger");
    task.model = Some("mock-fast".into());
    let id = task.id.unwrap();
    env.redis.enqueue(&env.keys, &task).await.unwrap();
    env.eventually("the worker unready", Duration::from_secs(10), || async {
        status().await == Some(503)
    })
    .await
    .unwrap();
    sqlx::query("ALTER TABLE provider_calls_away RENAME TO provider_calls")
        .execute(ledger.pool())
        .await
        .unwrap();
    let r = env.wait_final(&id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, llmq_shared::outcome::Status::Succeeded);
    env.eventually(
        "the worker ready again",
        Duration::from_secs(10),
        || async { status().await == Some(200) },
    )
    .await
    .unwrap();
    w.stop().await.unwrap();
}

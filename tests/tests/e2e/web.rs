//! `llmq web` over real HTTP against the real Redis: the overview shows what `llmq status`
//! counts, a task's page and a dead letter's show hostile text as text, every answer carries
//! headers that forbid script and framing, and bad requests or Redis away get a page that
//! says so.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq::web::{WebState, serve};
use llmq_shared::envelope::Envelope;
use llmq_shared::queue::Client;
use llmq_tests::harness::{TestEnv, redis_url};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// A web server on a free loopback port until the token is cancelled; its base URL.
async fn web(redis: Client) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let state = WebState {
        redis,
        scheduler_namespace: None,
    };
    tokio::spawn(serve(listener, state, stop.clone()));
    (base, stop)
}

async fn get(url: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

#[tokio::test]
async fn the_pages_show_the_queues_and_hostile_text_only_as_text() {
    let env = TestEnv::new().await.unwrap();
    let (base, stop) = web(Client::new(&redis_url()).unwrap()).await;
    // Three tasks waiting (no worker yet): the overview counts them as `llmq status` does.
    env.redis.ensure_group(&env.keys).await.unwrap();
    for i in 0..3 {
        env.redis
            .enqueue(&env.keys, &Envelope::new(format!("waiting {i}")))
            .await
            .unwrap();
    }
    env.redis
        .heartbeat("web-test", std::slice::from_ref(&env.keys), true)
        .await
        .unwrap();
    let counts = env.redis.counts(&env.keys).await.unwrap();
    let (status, headers, body) = get(&format!("{base}/")).await;
    assert_eq!(status, 200);
    let row = format!(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
        env.queue, counts.ready, counts.in_flight, counts.delayed
    );
    assert!(body.contains(&row), "{row} in {body}");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
    assert!(!csp.contains("script-src"), "no script is allowed: {csp}");
    assert_eq!(headers["x-frame-options"], "DENY");

    // A task whose prompt and answer carry markup; and a dead letter that does.
    let worker = env.worker();
    let mut e = Envelope::new("<img src=x onerror=alert(1)>");
    e.model = Some("mock-fast".into());
    env.redis.enqueue(&env.keys, &e).await.unwrap();
    let id = e.id.unwrap().to_string();
    env.wait_final(&id, WAIT).await.unwrap();
    env.xadd("task", br#"{"v":2,"prompt":"<script>alert(1)</script>"}"#)
        .await
        .unwrap();
    env.dead_letter_saying("version", WAIT).await.unwrap();
    let (status, _, body) = get(&format!("{base}/task?queue={}&id={id}", env.queue)).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{body}"
    );
    assert!(
        !body.contains("<img src=x"),
        "markup reached the page: {body}"
    );
    let (status, _, body) = get(&format!("{base}/dead?queue={}", env.queue)).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{body}"
    );
    assert!(
        !body.contains("<script>"),
        "a script reached the page: {body}"
    );
    worker.stop().await.unwrap();
    stop.cancel();
}

#[tokio::test]
async fn bad_requests_and_redis_away_get_a_page_that_says_so() {
    let env = TestEnv::new().await.unwrap();
    let (base, stop) = web(Client::new(&redis_url()).unwrap()).await;
    let (status, _, body) = get(&format!("{base}/task?queue={}&id=not-an-id", env.queue)).await;
    assert_eq!(status, 400);
    assert!(body.contains("A task id is a UUID"), "{body}");
    let unknown = uuid::Uuid::new_v4();
    let (status, _, body) = get(&format!("{base}/task?queue={}&id={unknown}", env.queue)).await;
    assert_eq!(status, 404);
    assert!(body.contains("has no task"), "{body}");
    let (status, _, _) = get(&format!("{base}/nowhere")).await;
    assert_eq!(status, 404);
    stop.cancel();

    // Redis away: 503 with the reason, and the server still answers.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (base, stop) = web(Client::new(&format!("redis://127.0.0.1:{port}")).unwrap()).await;
    for _ in 0..2 {
        let (status, headers, body) = get(&format!("{base}/")).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("Redis cannot be reached"), "{body}");
        assert!(headers.contains_key("content-security-policy"));
    }
    stop.cancel();
}

#[tokio::test]
async fn a_chain_is_drawn_as_its_dag_with_each_step_s_status_and_its_text_escaped() {
    let env = TestEnv::new().await.unwrap();
    let (base, stop) = web(Client::new(&redis_url()).unwrap()).await;
    env.redis.ensure_group(&env.keys).await.unwrap();
    let worker = env.worker();
    let chain_id = format!("web-{}", env.queue);
    let spec = serde_json::json!({
        "v": 1,
        "chain_id": chain_id,
        "steps": [
            {"name": "plan", "prompt": "<b>plan</b> it", "model": "mock-fast"},
            {"name": "build", "after": ["plan"], "prompt": "build {{plan.summary}}", "model": "mock-fast"},
            {"name": "check", "after": ["plan"], "prompt": "check {{plan.summary}}", "model": "mock-fast"}
        ]
    });
    env.redis
        .submit_chain(&env.keys, &spec.to_string())
        .await
        .unwrap();
    let c = env.chain_ended(&chain_id, WAIT).await;
    assert_eq!(c.state, "succeeded", "{c:?}");
    let (status, _, body) = get(&format!("{base}/chains?queue={}", env.queue)).await;
    assert_eq!(status, 200);
    assert!(body.contains(&chain_id), "{body}");
    let (status, _, body) = get(&format!("{base}/chain?queue={}&id={chain_id}", env.queue)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<svg"), "{body}");
    assert_eq!(body.matches("<rect").count(), 3, "a box per step: {body}");
    assert_eq!(
        body.matches("<line").count(),
        2,
        "an edge per parent: {body}"
    );
    assert_eq!(
        body.matches("#c8efc8").count(),
        3,
        "every step succeeded: {body}"
    );
    assert!(body.contains("&lt;b&gt;plan&lt;/b&gt;"), "{body}");
    assert!(!body.contains("<b>plan"), "markup reached the page: {body}");
    let (status, _, body) = get(&format!("{base}/chain?queue={}&id=nope", env.queue)).await;
    assert_eq!(status, 404);
    assert!(body.contains("has no chain"), "{body}");
    worker.stop().await.unwrap();
    stop.cancel();
}

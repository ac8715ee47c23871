//! Routing, fallback, quotas and cooldowns through real workers, the real Redis and
//! Postgres, and llmq-mock over HTTP.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq_shared::config::Config;
use llmq_shared::envelope::Envelope;
use llmq_shared::ids::TaskId;
use llmq_shared::outcome::{ErrorClass, Status};
use llmq_tests::harness::{AsTaskId, TestEnv, WorkerHandle};

const WAIT: Duration = Duration::from_secs(30);

/// Provider names are global in Redis (quotas, cooldowns): each test gets its own.
fn names(env: &TestEnv) -> (String, String) {
    let sfx = &env.queue[2..];
    (format!("a{sfx}"), format!("b{sfx}"))
}

/// Providers a and b on the same mock, with short backoffs; `routing` may say
/// `fallback: [b]`.
fn config(env: &TestEnv, extra_a: &str, routing: &str) -> Config {
    let url = env.mock.url();
    let (a, b) = names(env);
    let routing = routing.replace("[b]", &format!("[{b}]"));
    let text = format!(
        r#"
providers:
  - name: a
    kind: openai_compatible
    base_url: {url}/v1
    api_key: k
    {extra_a}
    models:
      - {{id: fail-500, input_usd_per_mtok: 1, output_usd_per_mtok: 2}}
      - {{id: mock-fast, input_usd_per_mtok: 1, output_usd_per_mtok: 2}}
  - name: b
    kind: openai_compatible
    base_url: {url}/v1
    api_key: k
    models:
      - {{id: mock-smart, input_usd_per_mtok: 3, output_usd_per_mtok: 15}}
routing:
  retry: {{tries_per_provider: 3, backoff: [20ms, 40ms, 80ms]}}
{routing}
"#
    );
    let text = text
        .replace("name: a\n", &format!("name: {a}\n"))
        .replace("name: b\n", &format!("name: {b}\n"));
    Config::parse("routing-test.yaml", &text, &|_| None).unwrap()
}

fn worker(env: &TestEnv, config: Config) -> WorkerHandle {
    let mut s = env.settings();
    s.config = config;
    WorkerHandle::start(s)
}

async fn run(env: &TestEnv, e: Envelope) -> llmq_shared::outcome::TaskRecord {
    env.redis.enqueue(&env.keys, &e).await.unwrap();
    env.wait_final(e.id.unwrap(), WAIT).await.unwrap()
}

#[tokio::test]
async fn a_failing_provider_is_tried_three_times_then_the_next_answers() {
    let env = TestEnv::new().await.unwrap();
    let (a, b) = names(&env);
    let w = worker(&env, config(&env, "", "  fallback: [b]"));
    let mut e = Envelope::new("fall back please");
    e.provider = Some(a.clone().into());
    e.model = Some("fail-500".into());
    let r = run(&env, e).await;
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(
        (r.provider.as_deref(), r.model.as_deref()),
        (Some(b.as_str()), Some("mock-smart"))
    );
    assert_eq!(r.attempts, 1, "fallback happens within one attempt");
    assert_eq!(r.provider_errors.len(), 3, "{:?}", r.provider_errors);
    let route = r.route.clone().unwrap_or_default();
    assert!(
        route.contains(&format!("{a} failed → {b}/mock-smart")),
        "{route}"
    );

    let calls = env.calls().await.unwrap();
    let who: Vec<&str> = calls.iter().map(|c| c.4.as_str()).collect();
    assert_eq!(who, [&*a, &*a, &*a, &*b], "the ledger shows every call");
    let b_cost = calls[3].6;
    assert!(b_cost > 0.0);
    assert!(
        (r.cost_usd - b_cost).abs() < 1e-12,
        "the task costs what b charged: {} vs {b_cost}",
        r.cost_usd
    );
    w.stop().await.unwrap();
}

/// The cheapest candidates are both of provider a (`fail-500`, then `mock-fast`, at one
/// price), then b's: once a has failed the task, its other model is not asked.
#[tokio::test]
async fn a_provider_that_failed_is_not_asked_again_for_another_model() {
    let env = TestEnv::new().await.unwrap();
    let (a, b) = names(&env);
    let w = worker(&env, config(&env, "", ""));
    let r = run(&env, Envelope::new("the cheapest first")).await;
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    let route = r.route.clone().unwrap_or_default();
    assert_eq!(
        (r.provider.as_deref(), r.model.as_deref()),
        (Some(b.as_str()), Some("mock-smart")),
        "{route}"
    );
    assert!(
        route.contains(&format!("{a} failed → {b}/mock-smart")),
        "{route}"
    );
    let calls = env.calls().await.unwrap();
    let who: Vec<(&str, &str)> = calls.iter().map(|c| (c.4.as_str(), c.5.as_str())).collect();
    let (fail, smart) = ((&*a, "fail-500"), (&*b, "mock-smart"));
    assert_eq!(
        who,
        [fail, fail, fail, smart],
        "a's mock-fast is never called"
    );
    w.stop().await.unwrap();
}

#[tokio::test]
async fn with_fallback_off_a_failing_provider_fails_the_task_naming_it() {
    let env = TestEnv::new().await.unwrap();
    let (a, b) = names(&env);
    let w = worker(&env, config(&env, "", "  fallback: [b]"));
    let pinned = |fallback: Option<bool>| {
        let mut e = Envelope::new(format!("pinned, fallback {fallback:?}"));
        e.provider = Some(a.clone().into());
        e.model = Some("fail-500".into());
        e.max_attempts = Some(1);
        e.fallback = fallback;
        e
    };

    let r = run(&env, pinned(Some(false))).await;
    assert_eq!(r.status, Status::Dead, "{r:?}");
    let error = r.error.clone().unwrap_or_default();
    assert!(error.contains(&format!("{a}/fail-500")), "{error}");
    assert!(!error.contains(&b), "never tried elsewhere: {error}");
    assert_eq!(r.provider.as_deref(), Some(a.as_str()));

    let r = run(&env, pinned(Some(true))).await;
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(r.provider.as_deref(), Some(b.as_str()), "fell back to b");
    w.stop().await.unwrap();
}

#[tokio::test]
async fn when_all_fail_the_error_names_every_provider() {
    let env = TestEnv::new().await.unwrap();
    let (a, b) = names(&env);
    let mut e = Envelope::new("[[mock:fail-500]] nobody can");
    e.provider = Some(a.clone().into());
    e.model = Some("mock-fast".into());
    e.max_attempts = Some(1);
    let w = worker(&env, config(&env, "", "  fallback: [b]"));
    let r = run(&env, e).await;
    assert_eq!(r.status, Status::Dead);
    let error = r.error.unwrap();
    let want = format!("all providers failed; last error: {b}/mock-smart: HTTP 500");
    assert!(error.contains(&want), "{error}");
    assert!(error.ends_with(&format!("tried: {a}, {b}")), "{error}");
    assert_eq!(r.provider_errors.len(), 6, "three tries on each");
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_fatal_error_skips_straight_to_the_next_provider() {
    let env = TestEnv::new().await.unwrap();
    let w = worker(&env, config(&env, "", "  fallback: [b]"));
    let (a, _) = names(&env);
    let mut e = Envelope::new("[[mock:fail-401]] bad key on a");
    e.provider = Some(a.clone().into());
    e.model = Some("mock-fast".into());
    let r = run(&env, e).await;
    // The marker makes b fail too; what matters is that a was asked once.
    let calls = env.calls().await.unwrap();
    let on_a = calls.iter().filter(|c| c.4 == a).count();
    assert_eq!(on_a, 1, "a 401 is not retried");
    assert_eq!(r.error_class, Some(ErrorClass::Fatal));
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_used_up_free_tier_falls_through_and_then_everything_waits_for_the_reset() {
    let env = TestEnv::new().await.unwrap();
    // a allows two requests a day; b is the fallback with one.
    let url = env.mock.url();
    let text = format!(
        r#"
providers:
  - name: a
    kind: openai_compatible
    cost_tier: free
    base_url: {url}/v1
    api_key: k
    quotas: {{requests_per_day: 2}}
    models: [{{id: mock-fast, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}]
  - name: b
    kind: openai_compatible
    base_url: {url}/v1
    api_key: k
    quotas: {{requests_per_day: 1}}
    models: [{{id: mock-smart, input_usd_per_mtok: 3, output_usd_per_mtok: 15}}]
"#
    );
    // Provider names are global in Redis: make them unique to this test.
    let suffix = &env.queue[2..];
    let text = text
        .replace("name: a", &format!("name: a{suffix}"))
        .replace("name: b", &format!("name: b{suffix}"));
    let config = Config::parse("t.yaml", &text, &|_| None).unwrap();
    let w = worker(&env, config);
    let mut records = Vec::new();
    for i in 0..3 {
        records.push(run(&env, Envelope::new(format!("task {i}"))).await);
    }
    let used: Vec<String> = records
        .iter()
        .map(|r| r.provider.clone().unwrap())
        .collect();
    assert_eq!(
        used,
        [
            format!("a{suffix}"),
            format!("a{suffix}"),
            format!("b{suffix}")
        ],
        "free first, then paid"
    );
    let route = records[2].route.clone().unwrap();
    assert!(route.contains("requests for today are used up"), "{route}");

    // Everything is used up: the fourth task waits in delayed until midnight, unspent.
    let e = Envelope::new("task 3");
    let id = e.id.unwrap();
    env.redis.enqueue(&env.keys, &e).await.unwrap();
    env.eventually("the task waiting for the reset", WAIT, || async {
        env.redis
            .task(&env.keys, id.tid())
            .await
            .unwrap()
            .is_some_and(|r| {
                r.status == Status::Delayed && r.error_class == Some(ErrorClass::QuotaExhausted)
            })
    })
    .await
    .unwrap();
    let r = env.redis.task(&env.keys, id.tid()).await.unwrap().unwrap();
    assert_eq!(r.attempts, 0);
    assert_eq!(
        env.calls().await.unwrap().len(),
        3,
        "no call was made for it"
    );
    assert_eq!(env.mock.total_calls(), 3);

    // Meanwhile the worker stops pulling tasks it could not run: they wait in Redis. A read
    // already waiting when the quota ran out may take what arrives with it (one enqueue,
    // which adds its tasks at once); no read follows.
    for round in 0..2 {
        let more: Vec<Envelope> = (0..3)
            .map(|i| Envelope::new(format!("later {round}.{i}")))
            .collect();
        env.redis.enqueue_many(&env.keys, &more).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert!(counts.ready >= 3 && counts.in_flight == 0, "{counts:?}");
    assert_eq!(env.mock.total_calls(), 3, "none of them was called");
    w.stop().await.unwrap();
}

#[tokio::test]
async fn three_worker_processes_never_exceed_a_shared_rate_limit() {
    let env = TestEnv::new().await.unwrap();
    let (a, _) = names(&env);
    // 5 requests per 1 s window (a minute, scaled down), across three processes.
    let text = format!(
        "providers:\n  - name: {a}\n    kind: openai_compatible\n    base_url: {}/v1\n    api_key: k\n    quotas: {{rpm: 5, window: 1s}}\n    models: [{{id: mock-fast, input_usd_per_mtok: 1, output_usd_per_mtok: 1}}]\n",
        env.mock.url()
    );
    let workers: Vec<_> = (0..3)
        .map(|_| {
            llmq_tests::harness::WorkerProcess::spawn_with(&env, &text, &["--concurrency", "4"])
                .unwrap()
        })
        .collect();
    let envs: Vec<Envelope> = (0..20)
        .map(|i| Envelope::new(format!("limited {i}")))
        .collect();
    env.redis.enqueue_many(&env.keys, &envs).await.unwrap();
    let ids: Vec<TaskId> = envs.iter().map(|e| e.id.unwrap()).collect();
    let records = llmq::wait_for(
        &env.redis,
        &env.keys,
        &ids,
        Some(Duration::from_secs(60)),
        |_| {},
    )
    .await
    .unwrap();
    assert!(
        records
            .iter()
            .all(|r| r.as_ref().is_some_and(|r| r.status == Status::Succeeded)),
        "{records:#?}"
    );

    let at: Vec<i64> = sqlx::query_scalar(
        "SELECT (extract(epoch from called_at) * 1000)::int8 FROM provider_calls WHERE queue = $1 ORDER BY called_at",
    )
    .bind(&env.queue)
    .fetch_all(env.ledger.pool())
    .await
    .unwrap();
    assert_eq!(
        at.len(),
        20,
        "one call per task: refusals wait in delayed, they are not calls"
    );
    // The limiter counts reservations; a call starts a moment after its reservation, so
    // windows are checked 200 ms short of the full second (a busy CI machine can delay a call that long after its
    // reservation); a limiter that let three processes through on their own would show 15.
    for (i, t) in at.iter().enumerate() {
        let in_window = at[i..].iter().take_while(|u| **u < t + 800).count();
        assert!(
            in_window <= 5,
            "{in_window} calls within 800 ms from {t}: {at:?}"
        );
    }
    let spread = at[at.len() - 1] - at[0];
    assert!(
        spread >= 3000,
        "20 calls at 5 per second take at least 3 s, took {spread} ms"
    );
    drop(workers);
}

#[tokio::test]
async fn an_attempt_ends_at_the_attempt_timeout_whatever_its_calls_do() {
    let env = TestEnv::new().await.unwrap();
    let mut s = env.settings();
    s.config = config(&env, "", "");
    s.attempt_timeout = Duration::from_millis(400);
    let w = WorkerHandle::start(s);
    let mut e = Envelope::new("[[mock:slow-3000]] takes too long");
    e.model = Some("mock-fast".into());
    e.max_attempts = Some(1);
    let r = run(&env, e).await;
    assert_eq!(r.status, Status::Dead);
    assert!(
        r.error
            .unwrap_or_default()
            .contains("the attempt took longer than 400ms")
    );
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_provider_set_to_http2_prior_knowledge_speaks_h2c_over_its_connections() {
    let env = TestEnv::new().await.unwrap();
    let (a, b) = names(&env);
    let url = env.mock.url();
    let text = format!(
        "providers:\n  - name: {a}\n    kind: openai_compatible\n    base_url: {url}/v1\n    api_key: k\n    http2: prior_knowledge\n    connections: 3\n    models: [{{id: mock-fast, input_usd_per_mtok: 1, output_usd_per_mtok: 1}}]\n  - name: {b}\n    kind: openai_compatible\n    base_url: {url}/v1\n    api_key: k\n    models: [{{id: mock-smart, input_usd_per_mtok: 1, output_usd_per_mtok: 1}}]\n"
    );
    let w = worker(&env, Config::parse("h2.yaml", &text, &|_| None).unwrap());
    let mut over_h2 = Vec::new();
    for i in 0..10 {
        let mut e = Envelope::new(format!("h2 {i}"));
        e.provider = Some(a.clone().into());
        over_h2.push(e);
    }
    env.redis.enqueue_many(&env.keys, &over_h2).await.unwrap();
    for e in &over_h2 {
        let r = env.wait_final(e.id.unwrap(), WAIT).await.unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
    assert_eq!(
        env.mock.http2_requests(),
        10,
        "every call to {a} came over h2c"
    );
    // Calls are spread over `connections` clients, each holding one HTTP/2 connection,
    // which stay open once made.
    assert_eq!(
        llmq_tests::mock::connections_to(env.mock.addr().port()),
        3,
        "{a}'s ten calls went over its three connections"
    );
    let mut e = Envelope::new("h1");
    e.provider = Some(b.clone().into());
    let r = run(&env, e).await;
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(env.mock.http2_requests(), 10, "{b} stays on HTTP/1.1");
    // llmq-mock says so over HTTP too.
    let stats: serde_json::Value = reqwest::get(format!("{url}/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["calls"], 11);
    assert_eq!(stats["http2_requests"], 10);
    w.stop().await.unwrap();
}

//! The answer cache (issue 36): identical requests enqueued at once make one call each (the
//! rest wait for it, fleet-wide, and read its answer), a failed call hands the request to a
//! waiting task, answers end with their TTL and stay within their bound, tenants do not share
//! answers, and the ledger counts a hit as a hit, not a call.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use llmq_shared::config::QueueCache;
use llmq_shared::envelope::{CacheAsk, CacheKeep, Envelope};
use llmq_shared::outcome::{Status, TaskRecord};
use llmq_shared::queue::{Answer, Keep};
use llmq_tests::harness::{TestEnv, WorkerHandle, rollup_mismatches};

fn task(prompt: &str) -> Envelope {
    Envelope {
        temperature: Some(0.0),
        model: Some("mock-fast".into()),
        ..Envelope::new(prompt)
    }
}

fn cached_for(ttl: &str) -> Option<Box<CacheAsk>> {
    Some(Box::new(CacheAsk::Keep(CacheKeep {
        ttl: ttl.into(),
        sampled: false,
    })))
}

/// A worker on `env`'s queue, whose provider file caches the queue's answers for 10 minutes.
fn caching_worker(env: &TestEnv, concurrency: usize) -> WorkerHandle {
    let mut settings = env.settings();
    settings.concurrency = concurrency;
    settings.config.answer_cache.queues.insert(
        env.queue.clone(),
        QueueCache {
            ttl: Duration::from_secs(600),
            sampled: false,
        },
    );
    settings
        .config
        .answer_cache
        .uncacheable_tools
        .insert("now".into());
    WorkerHandle::start(settings)
}

async fn run_all(env: &TestEnv, tasks: &[Envelope]) -> Vec<TaskRecord> {
    for t in tasks {
        env.redis.enqueue(&env.keys, t).await.unwrap();
    }
    let mut records = Vec::new();
    for t in tasks {
        let id = t.id.unwrap();
        records.push(env.wait_final(&id, Duration::from_secs(60)).await.unwrap());
    }
    records
}

#[tokio::test]
async fn identical_tasks_sent_at_once_make_one_call_each_and_the_rest_read_its_answer() {
    let env = TestEnv::new().await.unwrap();
    let worker = caching_worker(&env, 16);
    // Four requests, ten copies each, interleaved; every call takes 300 ms, so copies arrive
    // while their request's first call is on its way.
    let prompts: Vec<String> = (0..4)
        .map(|i| format!("Classify review {i} [[mock:slow-300]]"))
        .collect();
    let tasks: Vec<Envelope> = (0..10)
        .flat_map(|_| prompts.iter().map(|p| task(p)))
        .collect();
    let records = run_all(&env, &tasks).await;

    let mut by_prompt: HashMap<&str, Vec<&TaskRecord>> = HashMap::new();
    for (t, r) in tasks.iter().zip(&records) {
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        by_prompt.entry(t.prompt.as_str()).or_default().push(r);
    }
    for p in &prompts {
        assert_eq!(env.mock.calls_with_prompt(p), 1, "one call for {p}");
        let rs = &by_prompt[p.as_str()];
        let called: Vec<_> = rs.iter().filter(|r| !r.cached).collect();
        assert_eq!(called.len(), 1, "one task called for {p}");
        let leader = called[0];
        assert!(leader.cost_usd > 0.0);
        for r in rs.iter().filter(|r| r.cached) {
            assert_eq!(r.output, leader.output, "the same answer");
            assert_eq!(r.cached_from, Some(leader.task_id));
            assert_eq!(r.cost_usd, 0.0, "a hit is billed nothing");
            assert_eq!(r.model, leader.model);
        }
    }
    worker.stop().await.unwrap();

    // The ledger: four calls, 36 hits at $0, each saving what its request's call cost.
    let rows: Vec<(String, i64, f64, f64)> = sqlx::query_as(
        "SELECT outcome, count(*), sum(cost_usd)::float8, sum(coalesce(list_cost_usd, cost_usd))::float8
         FROM provider_calls WHERE queue = $1 GROUP BY 1 ORDER BY 1",
    )
    .bind(&env.queue)
    .fetch_all(env.ledger.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (hits, ok) = (&rows[0], &rows[1]);
    assert_eq!((hits.0.as_str(), hits.1, hits.2), ("cached", 36, 0.0));
    assert_eq!((ok.0.as_str(), ok.1), ("ok", 4));
    assert!((hits.3 - 9.0 * ok.2).abs() < 1e-12, "{rows:?}");
    assert_eq!(
        rollup_mismatches(env.ledger.pool()).await.unwrap(),
        Vec::<String>::new()
    );
    let calls: i64 =
        sqlx::query_scalar("SELECT sum(calls)::int8 FROM call_rollups WHERE queue = $1")
            .bind(&env.queue)
            .fetch_one(env.ledger.pool())
            .await
            .unwrap();
    assert_eq!(calls, 4, "a hit is not a call");
}

#[tokio::test]
async fn a_failed_call_hands_its_request_to_a_waiting_task() {
    let env = TestEnv::new().await.unwrap();
    let worker = caching_worker(&env, 8);
    // The first request of the conversation gets a 500, the next ones 200.
    let prompt = "Summarise the incident [[mock:flaky-1]]";
    let tasks: Vec<Envelope> = (0..6).map(|_| task(prompt)).collect();
    let records = run_all(&env, &tasks).await;
    assert!(
        records.iter().all(|r| r.status == Status::Succeeded),
        "{records:?}"
    );
    assert_eq!(
        env.mock.calls_with_prompt(prompt),
        2,
        "the failed call and one more"
    );
    assert_eq!(records.iter().filter(|r| !r.cached).count(), 1);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn answers_end_with_their_ttl_tenants_keep_their_own_and_what_cannot_be_cached_is_refused() {
    let env = TestEnv::new().await.unwrap();
    let worker = caching_worker(&env, 4);
    // The task's own TTL, on a queue the provider file also caches.
    let prompt = "What changed in release 7?";
    let one_second = || Envelope {
        cache: cached_for("1s"),
        ..task(prompt)
    };
    let first = run_all(&env, &[one_second()]).await;
    let second = run_all(&env, &[one_second()]).await;
    assert!(!first[0].cached && second[0].cached, "{second:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let third = run_all(&env, &[one_second()]).await;
    assert!(!third[0].cached, "the answer ended with its TTL");
    assert_eq!(env.mock.calls_with_prompt(prompt), 2);

    // `"cache": false` on a cached queue: called every time.
    let off = || Envelope {
        cache: Some(Box::new(CacheAsk::Use(false))),
        ..task(prompt)
    };
    let offs = run_all(&env, &[off(), off()]).await;
    assert!(offs.iter().all(|r| !r.cached));
    assert_eq!(env.mock.calls_with_prompt(prompt), 4);

    // Two tenants asking the same: each its own answer.
    let tenants = "Rate the ticket";
    let of = |tenant: &str| Envelope {
        tenant: Some(tenant.into()),
        ..task(tenants)
    };
    let rs = run_all(&env, &[of("acme"), of("globex"), of("acme")]).await;
    assert_eq!(env.mock.calls_with_prompt(tenants), 2);
    assert_eq!(
        rs.iter().map(|r| r.cached).collect::<Vec<_>>(),
        [false, false, true]
    );

    // A tool whose calls depend on the moment: the queue's cache leaves it alone, a task
    // asking for the cache with it is a dead letter that names it.
    let tool = llmq_shared::conversation::Tool {
        name: "now".into(),
        description: None,
        parameters: serde_json::json!({"type": "object", "properties": {}}),
    };
    let clock = "What time is it?";
    let with_tool = |cache| Envelope {
        tools: vec![tool.clone()],
        cache,
        ..task(clock)
    };
    let rs = run_all(&env, &[with_tool(None), with_tool(None)]).await;
    assert!(
        rs.iter()
            .all(|r| r.status == Status::Succeeded && !r.cached)
    );
    let refused = run_all(&env, &[with_tool(cached_for("1h"))]).await;
    assert_eq!(refused[0].status, Status::Dead);
    let error = refused[0].error.as_deref().unwrap();
    assert!(
        error.contains("tools[0]") && error.contains("uncacheable_tools"),
        "{error}"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn kept_answers_stay_within_their_bound_nearest_end_first() {
    let env = TestEnv::new().await.unwrap();
    let keep = |name: &str, ttl_s: u64, bytes: usize| Keep {
        name: name.into(),
        ttl_ms: ttl_s * 1000,
        answer: "x".repeat(bytes),
        counted: true,
    };
    let look = |name: &'static str| {
        let env = &env;
        async move {
            env.redis
                .take_answer(
                    &env.keys,
                    "c",
                    llmq_shared::ids::EntryId::new(0, 1),
                    name,
                    false,
                    None,
                    None,
                )
                .await
                .unwrap()
        }
    };
    // 1,000 bytes: room for two answers of 400 (each counts its name's bytes too).
    let bound = 1000;
    env.redis
        .keep_answers(&env.keys, bound, &[keep("a", 60, 400), keep("b", 30, 400)])
        .await
        .unwrap();
    assert!(matches!(look("a").await, Answer::Hit(_)));
    assert!(matches!(look("b").await, Answer::Hit(_)));
    env.redis
        .keep_answers(&env.keys, bound, &[keep("c", 90, 400)])
        .await
        .unwrap();
    assert_eq!(
        look("b").await,
        Answer::Miss,
        "b ended soonest: it made room"
    );
    assert!(matches!(look("a").await, Answer::Hit(_)));
    assert!(matches!(look("c").await, Answer::Hit(_)));
    // Larger than the whole bound: not kept, nothing dropped for it.
    env.redis
        .keep_answers(&env.keys, bound, &[keep("d", 90, 1200)])
        .await
        .unwrap();
    assert_eq!(look("d").await, Answer::Miss);
    assert!(matches!(look("a").await, Answer::Hit(_)));
    let mut c = env.redis.conn().await.unwrap();
    let bytes: i64 = redis::cmd("GET")
        .arg(format!("llmq:{{{}}}:answers:bytes", env.queue))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(bytes, 802, "a and c, with their names");
}

#[tokio::test]
async fn llmq_submit_asks_for_the_cache_and_refuses_what_the_worker_would() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let queue = env.queue.clone();
    let submit = async |extra: &[&str]| {
        let mut args = vec![
            "submit",
            "--prompt",
            "Name the release's biggest change",
            "--model",
            "mock-fast",
            "--queue",
            &queue,
            "--wait",
            "--wait-timeout",
            "30s",
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        env.cli(&args).await
    };
    // Refused before anything is enqueued (the sentences, the worker's, go to stderr): a
    // sampled request, a TTL out of range.
    for refused in [
        &["--cache", "1h"][..],
        &["--cache", "40d", "--temperature", "0"],
    ] {
        let (code, out) = submit(refused).await;
        assert_eq!((code, out.as_str()), (2, ""), "{refused:?}");
    }
    assert_eq!(env.redis.counts(&env.keys).await.unwrap().ready, 0);

    let cached = ["--cache", "1h", "--temperature", "0"];
    let (code, first) = submit(&cached).await;
    assert_eq!(code, 0, "{first}");
    let (code, second) = submit(&cached).await;
    assert_eq!(code, 0, "{second}");
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    let second: serde_json::Value = serde_json::from_str(&second).unwrap();
    assert!(first.get("cached").is_none(), "{first}");
    assert_eq!(second["cached"], true, "{second}");
    assert_eq!(second["cached_from"], first["task_id"]);
    assert_eq!(second["output"], first["output"]);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_worker_killed_during_the_call_leaves_the_flight_to_the_worker_that_takes_over() {
    let env = TestEnv::new().await.unwrap();
    let config = format!(
        "{}answer_cache:\n  queues:\n    {}: {{ttl: 10m}}\n",
        include_str!("../../../examples/providers.mock.yaml"),
        env.queue
    );
    let args = ["--concurrency", "4", "--visibility-timeout", "1s"];
    let prompt = "Summarise the outage report [[mock:slow-1500]]";
    let tasks: Vec<Envelope> = (0..10).map(|_| task(prompt)).collect();
    for t in &tasks {
        env.redis.enqueue(&env.keys, t).await.unwrap();
    }
    let first = llmq_tests::harness::WorkerProcess::spawn_with(&env, &config, &args).unwrap();
    // Killed without warning while its one call is on its way, the others parked behind it.
    env.eventually("the first call made", Duration::from_secs(20), || async {
        env.mock.calls_with_prompt(prompt) == 1
    })
    .await
    .unwrap();
    first.signal("KILL").unwrap();
    drop(first);
    let second = llmq_tests::harness::WorkerProcess::spawn_with(&env, &config, &args).unwrap();
    let mut records = Vec::new();
    for t in &tasks {
        let id = t.id.unwrap();
        records.push(env.wait_final(&id, Duration::from_secs(60)).await.unwrap());
    }
    second.signal("TERM").unwrap();
    assert!(
        records.iter().all(|r| r.status == Status::Succeeded),
        "{records:?}"
    );
    // The killed call, and the one the task's new holder made: none of the nine waiting.
    assert_eq!(env.mock.calls_with_prompt(prompt), 2);
    let called: Vec<_> = records.iter().filter(|r| !r.cached).collect();
    assert_eq!(called.len(), 1, "{records:?}");
    assert!(
        records
            .iter()
            .filter(|r| r.cached)
            .all(|r| r.cached_from == Some(called[0].task_id))
    );
}

/// The single flight's bound, over a seeded generator of workloads: however many copies of
/// each request arrive, in whatever order, on however many concurrent slots, and whether a
/// request's first call fails or not, each request is called once (twice when its first call
/// fails: once more, by one task) and every copy ends with that answer.
#[tokio::test]
async fn identical_requests_make_one_call_each_whatever_their_order_concurrency_and_failures() {
    let mut rng = llmq_tests::harness::SeededRng(0x5EED_A115_CAC4_E001);
    for case in 0..6 {
        let env = TestEnv::new().await.unwrap();
        let concurrency = 1 + rng.below(8);
        let worker = caching_worker(&env, concurrency);
        // Up to four requests, each 50 ms or 300 ms a call, or failing its first call.
        let requests: Vec<(String, u64)> = (0..1 + rng.below(4))
            .map(|i| match rng.below(3) {
                0 => (format!("Request {i} of case {case}"), 1),
                1 => (format!("Request {i} of case {case} [[mock:slow-300]]"), 1),
                _ => (format!("Request {i} of case {case} [[mock:flaky-1]]"), 2),
            })
            .collect();
        let mut tasks: Vec<Envelope> = requests
            .iter()
            .flat_map(|(prompt, _)| {
                let copies = 1 + rng.below(6);
                (0..copies).map(move |_| task(prompt))
            })
            .collect();
        // In a random order.
        rng.shuffle(&mut tasks);
        let records = run_all(&env, &tasks).await;
        worker.stop().await.unwrap();
        let what = format!("case {case}: concurrency {concurrency}, {requests:?}");
        assert!(
            records.iter().all(|r| r.status == Status::Succeeded),
            "{what}: {records:?}"
        );
        for (prompt, calls) in &requests {
            assert_eq!(
                env.mock.calls_with_prompt(prompt),
                *calls,
                "{what}: {prompt}"
            );
            let rs: Vec<_> = tasks
                .iter()
                .zip(&records)
                .filter(|(t, _)| &t.prompt == prompt)
                .map(|(_, r)| r)
                .collect();
            let called: Vec<_> = rs.iter().filter(|r| !r.cached).collect();
            assert_eq!(called.len(), 1, "{what}: {prompt}: {rs:?}");
            assert!(
                rs.iter().all(|r| r.output == called[0].output),
                "{what}: {prompt}"
            );
        }
    }
}

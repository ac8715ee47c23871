//! Tasks that can wait (`deadline`) through each provider's batch API, over real HTTP to
//! llmq-mock, with real workers, a real scheduler, Redis and Postgres: answered at the batch
//! price, billed once, and called as usual when their batch fails or expires; a worker and
//! the scheduler SIGKILLed while batches are open lose nothing.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq_shared::config::Config;
use llmq_shared::envelope::Envelope;
use llmq_shared::ids::TaskId;
use llmq_shared::outcome::Status;
use llmq_tests::harness::{AsTaskId, TestEnv, WorkerProcess, binary, database_url, redis_url};
use llmq_tests::mock::{MockOptions, MockServer};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// The batch formats: (kind, base URL suffix).
const FORMATS: [(&str, &str); 3] = [("openai", "/v1"), ("anthropic", ""), ("gemini", "/v1beta")];

fn provider(env: &TestEnv, kind: &str) -> String {
    format!("{kind}-{}", &env.queue[2..])
}

/// A provider file with one batch provider per format on the test's mock, each with
/// `models` (list price 1 and 2 USD per million tokens: the batch price is half).
fn config_text(env: &TestEnv, kinds: &[&str], models: &[&str], gather: &str) -> String {
    let url = env.mock.url();
    let mut text = String::from("providers:\n");
    for (kind, suffix) in FORMATS.iter().filter(|(k, _)| kinds.contains(k)) {
        let models: Vec<String> = models
            .iter()
            .map(|m| format!("{{id: {m}, input_usd_per_mtok: 1, output_usd_per_mtok: 2}}"))
            .collect();
        text.push_str(&format!(
            "  - {{name: {}, kind: {kind}, base_url: \"{url}{suffix}\", api_key: k, batch: {{gather: {gather}}}, models: [{}]}}\n",
            provider(env, kind),
            models.join(", ")
        ));
    }
    text.push_str("routing:\n  retry: {tries_per_provider: 2, backoff: [10ms, 20ms]}\n");
    text
}

/// A scheduler in this process, in the test's namespace, until dropped.
struct InProcessScheduler(CancellationToken);

impl Drop for InProcessScheduler {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

fn scheduler(env: &TestEnv, config: Config) -> InProcessScheduler {
    let mut s = llmq_scheduler::Settings::new(&redis_url(), &database_url(), config).unwrap();
    s.id = Some(format!("{}-scheduler", env.queue));
    s.namespace = Some(env.queue.clone());
    s.queues = vec![env.queue.clone()];
    s.tick = Duration::from_millis(50);
    s.batches_every = Duration::from_millis(100);
    let token = CancellationToken::new();
    let stop = token.clone();
    tokio::spawn(async move { llmq_scheduler::run(s, stop).await });
    InProcessScheduler(token)
}

/// Waits until a scheduler sends the test queue's batches: before that, workers call
/// tasks that could wait.
async fn batcher_up(env: &TestEnv) {
    env.eventually("a scheduler sending batches", WAIT, || async {
        let mut c = env.redis.conn().await.unwrap();
        redis::AsyncCommands::exists::<_, bool>(&mut c, env.keys.batcher())
            .await
            .unwrap()
    })
    .await
    .unwrap();
}

/// A scheduler and a worker on the test's queue with [`config_text`]'s providers, once the
/// scheduler sends batches.
async fn started(
    env: &TestEnv,
    kinds: &[&str],
    models: &[&str],
    gather: &str,
) -> (InProcessScheduler, llmq_tests::harness::WorkerHandle) {
    let text = config_text(env, kinds, models, gather);
    let config = Config::parse("batch.yaml", &text, &|_| None).unwrap();
    let s = scheduler(env, config.clone());
    let mut settings = env.settings();
    settings.config = config;
    let w = llmq_tests::harness::WorkerHandle::start(settings);
    batcher_up(env).await;
    (s, w)
}

fn waiting_task(env: &TestEnv, kind: &str, model: &str, prompt: &str) -> Envelope {
    let mut e = Envelope::new(prompt);
    e.provider = Some(provider(env, kind).into());
    e.model = Some(model.into());
    e.fallback = Some(false);
    e.deadline = Some("24h".into());
    e
}

/// (cost, list cost) of each ledger row of `task_id`.
async fn rows_of(env: &TestEnv, task_id: TaskId) -> Vec<(f64, Option<f64>)> {
    sqlx::query_as(
        "SELECT cost_usd::float8, list_cost_usd::float8 FROM provider_calls WHERE task_id = $1",
    )
    .bind(task_id)
    .fetch_all(env.ledger.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn tasks_that_can_wait_are_answered_through_each_formats_batch_api_at_the_batch_price() {
    let env = TestEnv::new().await.unwrap();
    let kinds: Vec<&str> = FORMATS.iter().map(|(k, _)| *k).collect();
    let (_s, _w) = started(&env, &kinds, &["mock-fast"], "300ms").await;
    let mut tasks = Vec::new();
    for kind in &kinds {
        for i in 0..4 {
            let e = waiting_task(&env, kind, "mock-fast", &format!("summarise {kind} {i}"));
            env.redis.enqueue(&env.keys, &e).await.unwrap();
            tasks.push((*kind, e));
        }
    }
    for (kind, e) in &tasks {
        let r = env.wait_final(e.id.unwrap(), WAIT).await.unwrap();
        assert_eq!(r.status, Status::Succeeded, "{kind}: {r:?}");
        assert!(
            r.output
                .as_deref()
                .unwrap()
                .starts_with("mock answer from mock-fast: summarise"),
            "{kind}: {r:?}"
        );
        assert!(
            r.route.as_deref().unwrap_or("").contains("batch API"),
            "{kind}: {r:?}"
        );
        // One call, billed at half the list price.
        let rows = rows_of(&env, e.id.unwrap()).await;
        assert_eq!(rows.len(), 1, "{kind}: {rows:?}");
        let (cost, list) = rows[0];
        let list = list.unwrap();
        assert!(
            cost > 0.0 && (list - 2.0 * cost).abs() < 1e-9,
            "{kind}: {rows:?}"
        );
        assert!((r.cost_usd - cost).abs() < 1e-9, "{kind}: {r:?}");
    }
    // Four tasks per provider, gathered for 300 ms: one batch each, two at most.
    let batches = env.mock.batches("mock-fast");
    assert!((3..=6).contains(&batches), "{batches} batches");
    assert_eq!(env.mock.batch_items("mock-fast"), 12);
    // `llmq costs` shows the saving against list prices.
    let (code, out) = env
        .cli(&[
            "costs",
            "--by",
            "model",
            "--format",
            "json",
            "--database-url",
            &database_url(),
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    for kind in &kinds {
        let key = format!("{}/mock-fast", provider(&env, kind));
        let line = report["breakdown"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["key"] == key.as_str())
            .unwrap_or_else(|| panic!("{key} in {out}"));
        let saved = line["saved_usd"].as_f64().unwrap();
        let cost = line["cost_usd"].as_f64().unwrap();
        assert!(saved > 0.0 && (saved - cost).abs() < 1e-9, "{line}");
    }
}

#[tokio::test]
async fn a_batch_that_expires_or_fails_and_a_request_that_fails_in_one_fall_back_to_calls() {
    let env = TestEnv::new().await.unwrap();
    let kinds: Vec<&str> = FORMATS.iter().map(|(k, _)| *k).collect();
    let (_s, _w) = started(
        &env,
        &kinds,
        &["batch-expire", "batch-fail", "mock-fast"],
        "200ms",
    )
    .await;
    batcher_up(&env).await;
    let mut tasks = Vec::new();
    for kind in &kinds {
        for model in ["batch-expire", "batch-fail"] {
            let e = waiting_task(&env, kind, model, &format!("work for {kind} {model}"));
            env.redis.enqueue(&env.keys, &e).await.unwrap();
            tasks.push((format!("{kind} {model}"), e, Status::Succeeded));
        }
        // A request that fails inside a working batch is called as usual, and fails as a
        // call of it would: a 400 is a dead letter.
        let e = waiting_task(&env, kind, "mock-fast", "broken [[mock:fail-400]]");
        env.redis.enqueue(&env.keys, &e).await.unwrap();
        tasks.push((format!("{kind} fail-400"), e, Status::Dead));
    }
    for (what, e, want) in &tasks {
        let r = env.wait_final(e.id.unwrap(), WAIT).await.unwrap();
        assert_eq!(r.status, *want, "{what}: {r:?}");
        // Called, not answered by the batch.
        assert!(
            !r.route.as_deref().unwrap_or("").contains("batch API"),
            "{what}: {r:?}"
        );
    }
    for model in ["batch-expire", "batch-fail"] {
        assert!(env.mock.batches(model) >= 3, "{model}");
    }
}

#[tokio::test]
async fn a_deadline_shorter_than_a_batch_window_or_with_stream_is_a_dead_letter() {
    let env = TestEnv::new().await.unwrap();
    let _w = env.worker();
    for (payload, says) in [
        (
            r#"{"v":1,"prompt":"p","deadline":"2h"}"#,
            "field `deadline` is wrong: 2h is shorter than the 24h a provider may take to run a batch",
        ),
        (
            r#"{"v":1,"prompt":"p","deadline":"soon"}"#,
            "field `deadline` is wrong: `soon` is not a duration",
        ),
        (
            r#"{"v":1,"prompt":"p","deadline":"24h","stream":true}"#,
            "field `deadline` is wrong: cannot be used with stream",
        ),
    ] {
        env.xadd("task", payload.as_bytes()).await.unwrap();
        env.dead_letter_saying(says, WAIT).await.unwrap();
    }
}

/// Spawns `llmq-scheduler` on the test's queue with the provider file `config`.
fn scheduler_process(
    env: &TestEnv,
    config: &std::path::Path,
    id: &str,
    extra: &[&str],
) -> WorkerProcess {
    let child = std::process::Command::new(binary("llmq-scheduler"))
        .env("REDIS_URL", redis_url())
        .env("DATABASE_URL", database_url())
        .env("LLMQ_CONFIG", config)
        .env("LLMQ_SCHEDULER_NAMESPACE", &env.queue)
        .env("RUST_LOG", "warn")
        .args([
            "--id",
            id,
            "--tick",
            "50ms",
            "--batches-every",
            "200ms",
            "--queue",
            &env.queue,
        ])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    WorkerProcess { child }
}

#[tokio::test]
async fn batches_survive_a_worker_and_the_scheduler_killed_while_they_are_open() {
    let mut env = TestEnv::new().await.unwrap();
    env.mock = MockServer::start(MockOptions {
        batch_delay: Duration::from_secs(2),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let text = config_text(&env, &["openai", "anthropic"], &["mock-fast"], "1s");
    let config = std::env::temp_dir().join(format!("llmq-batch-{}.yaml", env.queue));
    std::fs::write(&config, &text).unwrap();
    let worker = WorkerProcess::spawn_with(&env, &text, &[]).unwrap();
    let sched = scheduler_process(&env, &config, "first", &[]);
    batcher_up(&env).await;
    let mut ids = Vec::new();
    for kind in ["openai", "anthropic"] {
        for i in 0..100 {
            let e = waiting_task(&env, kind, "mock-fast", &format!("item {kind} {i}"));
            env.redis.enqueue(&env.keys, &e).await.unwrap();
            ids.push(e.id.unwrap());
        }
    }
    // Both killed while batches are open at the providers.
    env.eventually("open batches", WAIT, || async {
        let open = env.redis.open_batches(&env.keys).await.unwrap();
        open.iter().filter(|b| b.remote.is_some()).count() >= 2
    })
    .await
    .unwrap();
    worker.signal("KILL").unwrap();
    sched.signal("KILL").unwrap();
    let _worker = WorkerProcess::spawn_with(&env, &text, &[]).unwrap();
    let _sched = scheduler_process(&env, &config, "second", &[]);
    for id in &ids {
        let r = env.wait_final(&id.to_string(), WAIT).await.unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        assert!(
            r.route.as_deref().unwrap_or("").contains("batch API"),
            "{r:?}"
        );
        let rows = rows_of(&env, *id).await;
        assert_eq!(rows.len(), 1, "{id}: {rows:?}");
        assert!(rows[0].1.is_some(), "billed at the batch price: {rows:?}");
    }
    // Every task answered once; two providers, two batches each at most.
    assert_eq!(env.mock.batch_items("mock-fast"), 200);
    assert!(env.mock.batches("mock-fast") <= 4);
    assert_eq!(env.mock.calls("mock-fast"), 200, "no task was also called");
}

#[tokio::test]
async fn a_batch_still_open_an_hour_before_the_deadline_is_cancelled_and_its_tasks_called() {
    let env = TestEnv::new().await.unwrap();
    let (_s, _w) = started(&env, &["openai"], &["batch-stuck"], "100ms").await;
    let e = waiting_task(
        &env,
        "openai",
        "batch-stuck",
        "a task in a batch that never ends",
    );
    env.redis.enqueue(&env.keys, &e).await.unwrap();
    env.eventually("the batch open at the provider", WAIT, || async {
        let open = env.redis.open_batches(&env.keys).await.unwrap();
        open.iter().any(|b| b.remote.is_some())
    })
    .await
    .unwrap();
    // An hour before the deadline, as far as the batch knows: 23 hours pass in one write.
    let open = env.redis.open_batches(&env.keys).await.unwrap();
    let mut c = env.redis.conn().await.unwrap();
    let _: () = redis::AsyncCommands::hset(&mut c, env.keys.batch(&open[0].id), "fallback", 0)
        .await
        .unwrap();
    let r = env.wait_final(e.id.unwrap(), WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert!(
        !r.route.as_deref().unwrap_or("").contains("batch API"),
        "{r:?}"
    );
    // Cancelled at the provider, read to its end (nothing of it ran, so nothing is billed),
    // and forgotten.
    env.eventually("the cancelled batch closed", WAIT, || async {
        env.redis.open_batches(&env.keys).await.unwrap().is_empty()
    })
    .await
    .unwrap();
    assert_eq!(env.mock.batch_items("batch-stuck"), 0);
    assert_eq!(env.mock.calls("batch-stuck"), 1);
    assert_eq!(rows_of(&env, e.id.unwrap()).await.len(), 1, "the call only");
}

/// A task cancelled while its provider batch is open is taken out of it: every task of the
/// batch cancelled, the provider's batch is cancelled too, and the task ends `cancelled`,
/// never called; one cancelled in a batch with another task waits for the batch's end, which
/// bills what it answered, and ends cancelled then, while the other is answered.
#[tokio::test]
async fn a_cancelled_task_is_taken_out_of_its_batch_and_a_batch_of_none_left_is_cancelled() {
    let env = TestEnv::new().await.unwrap();
    let (_s, _w) = started(&env, &["openai"], &["batch-stuck"], "100ms").await;
    let e = waiting_task(
        &env,
        "openai",
        "batch-stuck",
        "a task cancelled in its batch",
    );
    env.redis.enqueue(&env.keys, &e).await.unwrap();
    env.eventually("the batch open at the provider", WAIT, || async {
        let open = env.redis.open_batches(&env.keys).await.unwrap();
        open.iter().any(|b| b.remote.is_some())
    })
    .await
    .unwrap();
    let id = e.id.unwrap().to_string();
    let (code, out) = env.cli(&["cancel", "--queue", &env.queue, &id]).await;
    assert_eq!(code, 0, "{out}");
    let r = env.wait_final(&id, WAIT).await.unwrap();
    assert_eq!(r.status, Status::Cancelled, "{r:?}");
    env.eventually("the cancelled batch closed", WAIT, || async {
        env.redis.open_batches(&env.keys).await.unwrap().is_empty()
    })
    .await
    .unwrap();
    assert_eq!(env.mock.calls("batch-stuck"), 0, "never called");
    assert_eq!(
        env.mock.batch_items("batch-stuck"),
        0,
        "nothing of the batch ran"
    );
}

/// With no scheduler sending the queue's batches, a task that can wait is called in its first
/// delivery: not parked, latched `fallback` and put back in the stream to be read again.
#[tokio::test]
async fn a_task_that_can_wait_is_called_at_once_when_no_scheduler_sends_batches() {
    let env = TestEnv::new().await.unwrap();
    let text = config_text(&env, &["openai"], &["batch-direct"], "100ms");
    let mut settings = env.settings();
    settings.config = Config::parse("batch.yaml", &text, &|_| None).unwrap();
    let w = llmq_tests::harness::WorkerHandle::start(settings);
    let task = waiting_task(&env, "openai", "batch-direct", "no scheduler");
    let id = task.id.unwrap();
    env.redis.enqueue(&env.keys, &task).await.unwrap();
    let r = env.wait_final(&id, WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    let mut c = env.redis.conn().await.unwrap();
    let latched: bool = redis::AsyncCommands::exists(&mut c, env.keys.batch_task(id))
        .await
        .unwrap();
    assert!(
        !latched,
        "the task was parked and sent back instead of called"
    );
    assert_eq!(env.mock.calls("batch-direct"), 1);
    w.stop().await.unwrap();
}

/// The commands Redis runs (scripts' included) that name `needle`, from now until the
/// returned task is aborted: `MONITOR`, which sees every client's commands, filtered to keys
/// of this test's own.
async fn watch(
    needle: String,
) -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use futures_util::StreamExt;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let client = redis::Client::open(redis_url()).unwrap();
    let mut lines = client
        .get_async_monitor()
        .await
        .unwrap()
        .into_on_message::<String>();
    let into = std::sync::Arc::clone(&seen);
    let watching = tokio::spawn(async move {
        while let Some(line) = lines.next().await {
            if line.contains(&needle) {
                into.lock().unwrap().push(line);
            }
        }
    });
    (watching, seen)
}

/// A task that can wait reads its batch latch only when its plan has a provider with a
/// batch API: one whose providers have none is called with no read of batch state, as a
/// task with no deadline is. (The first task, to a provider with a batch API, shows that the
/// read is seen when it happens.)
#[tokio::test]
async fn a_task_that_can_wait_reads_no_batch_state_when_its_providers_have_no_batch_api() {
    let env = TestEnv::new().await.unwrap();
    let mut text = config_text(&env, &["openai"], &["batch-read"], "100ms");
    let plain = format!("plain-{}", &env.queue[2..]);
    text = text.replace(
        "routing:",
        &format!(
            "  - {{name: {plain}, kind: openai, base_url: \"{}/v1\", api_key: k, models: [{{id: no-batch-api, input_usd_per_mtok: 1, output_usd_per_mtok: 2}}]}}\nrouting:",
            env.mock.url()
        ),
    );
    let mut settings = env.settings();
    settings.config = Config::parse("batch.yaml", &text, &|_| None).unwrap();
    let batch_keys = env.keys.batcher().trim_end_matches("batcher").to_owned();
    let (watching, seen) = watch(batch_keys).await;
    let w = llmq_tests::harness::WorkerHandle::start(settings);

    let batchable = waiting_task(&env, "openai", "batch-read", "a provider with a batch API");
    let mut unbatchable = waiting_task(&env, "openai", "no-batch-api", "a provider with none");
    unbatchable.provider = Some(plain.clone().into());
    for task in [&batchable, &unbatchable] {
        let id = task.id.unwrap();
        env.redis.enqueue(&env.keys, task).await.unwrap();
        let r = env.wait_final(&id, WAIT).await.unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
    w.stop().await.unwrap();
    watching.abort();
    let seen = seen.lock().unwrap().clone();
    let read = |task: &Envelope| {
        let key = env.keys.batch_task(task.id.unwrap());
        seen.iter().filter(|l| l.contains(&key)).count()
    };
    assert_eq!(
        read(&batchable),
        1,
        "the batchable task's read was not seen: {seen:#?}"
    );
    assert_eq!(read(&unbatchable), 0, "{seen:#?}");
    assert_eq!(env.mock.calls("batch-read"), 1);
    assert_eq!(env.mock.calls("no-batch-api"), 1);
}

#[tokio::test]
async fn tasks_whose_batches_no_scheduler_follows_go_to_calls_before_their_deadline() {
    let env = TestEnv::new().await.unwrap();
    let (sched, _w) = started(&env, &["anthropic"], &["batch-stuck"], "100ms").await;
    // One task in a batch at the provider, then the scheduler goes for good.
    let sent = waiting_task(&env, "anthropic", "batch-stuck", "sent, then forgotten");
    env.redis.enqueue(&env.keys, &sent).await.unwrap();
    env.eventually("the batch open at the provider", WAIT, || async {
        let open = env.redis.open_batches(&env.keys).await.unwrap();
        open.iter().any(|b| b.remote.is_some())
    })
    .await
    .unwrap();
    drop(sched);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = env.redis.conn().await.unwrap();
    let task_key = env.keys.batch_task(sent.id.unwrap());
    // While a scheduler sends batches, or while the deadline is far, nothing moves.
    let rescued = env
        .redis
        .rescue_batched(
            &env.keys,
            llmq_shared::queue::FALLBACK_MARGIN,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(rescued, 0, "the batcher key still stands");
    // The batcher's key expires; the deadline comes within the hour (as 23 hours would).
    let _: () = redis::AsyncCommands::del(&mut c, env.keys.batcher())
        .await
        .unwrap();
    assert_eq!(
        env.redis
            .rescue_batched(
                &env.keys,
                llmq_shared::queue::FALLBACK_MARGIN,
                Duration::from_secs(60)
            )
            .await
            .unwrap(),
        0,
        "its deadline is a day away"
    );
    let near = llmq_shared::queue::now_ms() + 60_000;
    let _: () = redis::AsyncCommands::hset(&mut c, &task_key, "deadline", near)
        .await
        .unwrap();
    let rescued = env
        .redis
        .rescue_batched(
            &env.keys,
            llmq_shared::queue::FALLBACK_MARGIN,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(rescued, 1);
    let r = env.wait_final(sent.id.unwrap(), WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert!(
        !r.route.as_deref().unwrap_or("").contains("batch API"),
        "{r:?}"
    );
    assert_eq!(env.mock.calls("batch-stuck"), 1);
}

/// Where a task is, as Redis holds it: every task id must be in exactly one place.
async fn places(env: &TestEnv) -> std::collections::HashMap<TaskId, Vec<&'static str>> {
    use redis::AsyncCommands;
    let mut c = env.redis.conn().await.unwrap();
    let mut at: std::collections::HashMap<TaskId, Vec<&'static str>> = Default::default();
    let entries: redis::streams::StreamRangeReply = c.xrange_all(env.keys.stream()).await.unwrap();
    for e in entries.ids {
        let task: String = e.get("task").unwrap();
        let env_: Envelope = serde_json::from_str(&task).unwrap();
        at.entry(env_.id.unwrap()).or_default().push("stream");
    }
    let groups: Vec<String> = c.smembers(env.keys.batch_groups()).await.unwrap();
    for g in groups {
        let ids: Vec<String> = c.zrange(env.keys.batch_waiting(&g), 0, -1).await.unwrap();
        for id in ids {
            let state: Option<String> = c
                .hget(env.keys.batch_task(id.tid()), "state")
                .await
                .unwrap();
            assert_eq!(
                state.as_deref(),
                Some("waiting"),
                "{id} in {g}'s waiting set"
            );
            at.entry(id.tid()).or_default().push("waiting");
        }
    }
    for b in env.redis.open_batches(&env.keys).await.unwrap() {
        for t in env.redis.batch_tasks(&env.keys, &b, false).await.unwrap() {
            if t.state == "sent" {
                at.entry(t.taken.task_id).or_default().push("in a batch");
            }
        }
    }
    at
}

#[tokio::test]
async fn no_interleaving_of_parking_batching_settling_rescue_and_crashes_loses_or_doubles_a_task() {
    use llmq_shared::queue::{BatchAnswer, BatchState, Fence, Settle, Write};
    use llmq_tests::harness::SeededRng;
    use redis::AsyncCommands;
    for seed in [7_u64, 1_234_567, 0xdead_beef] {
        let env = TestEnv::new().await.unwrap();
        let mut rng = SeededRng(seed);
        let mut c = env.redis.conn().await.unwrap();
        let fence = Fence {
            holder: "holder",
            token: 1,
        };
        env.redis.ensure_group(&env.keys).await.unwrap();
        let mut reader = env.redis.blocking_conn().await.unwrap();
        let mut enqueued = std::collections::HashSet::new();
        let mut done = std::collections::HashSet::new();
        let mut answered = 0;
        for step in 0..300 {
            let _: () = c.set_ex(env.keys.batcher(), "holder", 60).await.unwrap();
            match rng.below(8) {
                // A producer enqueues a task that can wait.
                0 | 1 => {
                    let mut e = Envelope::new(format!("task {step}"));
                    e.deadline = Some("24h".into());
                    enqueued.insert(e.id.unwrap());
                    env.redis.enqueue(&env.keys, &e).await.unwrap();
                }
                // A worker reads one (or takes over one a dead worker held) and parks it,
                // finishes it (back from a batch), or dies holding it.
                2 | 3 => {
                    let mut got = env
                        .redis
                        .read(&mut reader, &env.keys, "w", 1, None)
                        .await
                        .unwrap();
                    if got.is_empty() {
                        got = env
                            .redis
                            .reclaim(&env.keys, "w", Duration::ZERO, 1, 1_000, WAIT)
                            .await
                            .unwrap()
                            .tasks;
                    }
                    for d in got {
                        let e = Envelope::parse(d.payload.as_deref().unwrap(), 1 << 20).unwrap();
                        let id = e.id.unwrap();
                        match env.redis.batch_state(&env.keys, id, false).await.unwrap().0 {
                            BatchState::None | BatchState::Pending if rng.below(4) > 0 => {
                                // Now and then the scheduler is gone as the task is parked:
                                // it goes back to the stream instead.
                                if rng.below(6) == 0 {
                                    let _: () = c.del(env.keys.batcher()).await.unwrap();
                                }
                                let group = ["p/m1", "p/m2"][rng.below(2)];
                                let park = Write::Park {
                                    entry_id: d.entry_id,
                                    task_id: id,
                                    park: Box::new(llmq_shared::queue::BatchPark {
                                        group: group.into(),
                                        envelope: e.to_json(),
                                        body: "{}".into(),
                                        deadline_ms: llmq_shared::queue::now_ms() + 86_400_000,
                                        generation: "0:0".into(),
                                    }),
                                };
                                env.redis
                                    .write(&env.keys, "w", WAIT, &[park])
                                    .await
                                    .unwrap();
                            }
                            BatchState::None | BatchState::Pending => {} // died holding it
                            state @ (BatchState::Answered { .. }
                            | BatchState::Call
                            | BatchState::Cancelled(_)) => {
                                if matches!(state, BatchState::Answered { .. }) {
                                    answered += 1;
                                }
                                let _: () = redis::pipe()
                                    .xack(env.keys.stream(), "workers", &[&d.entry_id])
                                    .xdel(env.keys.stream(), &[&d.entry_id])
                                    .query_async(&mut c)
                                    .await
                                    .unwrap();
                                assert!(done.insert(id), "{id} finished twice");
                            }
                        }
                    }
                }
                // The scheduler takes waiting tasks into a batch, and records it sent (or
                // dies before it does).
                4 => {
                    let group = ["p/m1", "p/m2"][rng.below(2)];
                    let batch = uuid::Uuid::new_v4().to_string();
                    let taken = env
                        .redis
                        .take_batch(
                            fence,
                            &env.keys,
                            group,
                            "p",
                            "m",
                            &batch,
                            1 + rng.below(4),
                            1 << 20,
                        )
                        .await
                        .unwrap()
                        .unwrap();
                    if !taken.is_empty() && rng.below(4) > 0 {
                        env.redis
                            .batch_sent(&env.keys, &batch, "remote", i64::MAX)
                            .await
                            .unwrap();
                    }
                }
                // A batch is over for some or all of its tasks: answers and fallbacks.
                5 | 6 => {
                    let open = env.redis.open_batches(&env.keys).await.unwrap();
                    if open.is_empty() {
                        continue;
                    }
                    let b = &open[rng.below(open.len())];
                    let sent: Vec<TaskId> = env
                        .redis
                        .batch_tasks(&env.keys, b, false)
                        .await
                        .unwrap()
                        .into_iter()
                        .filter(|t| t.state == "sent")
                        .map(|t| t.taken.task_id)
                        .collect();
                    let all = rng.below(2) == 0;
                    let mut chosen: Vec<(TaskId, Settle)> = Vec::new();
                    for id in &sent {
                        if !all && rng.below(2) == 0 {
                            continue;
                        }
                        let settle = if rng.below(2) == 0 {
                            Settle::Fallback("failed".into())
                        } else {
                            Settle::Answered(Box::new(BatchAnswer {
                                provider: "p".into(),
                                model: "m".into(),
                                text: "answer".into(),
                                tool_calls: Vec::new(),
                                input_tokens: 1,
                                output_tokens: 1,
                                cached_tokens: 0,
                                reasoning_tokens: 0,
                                cost_usd: 0.0,
                                batch: b.id.clone(),
                            }))
                        };
                        chosen.push((*id, settle));
                    }
                    let end = if all {
                        ["close", "abandon"][rng.below(2)]
                    } else {
                        ""
                    };
                    env.redis
                        .settle_batch(fence, &env.keys, &b.id, &chosen, end)
                        .await
                        .unwrap()
                        .unwrap();
                }
                // No scheduler any more, and a deadline near: workers send tasks back.
                _ => {
                    let _: () = c.del(env.keys.batcher()).await.unwrap();
                    let ids: Vec<TaskId> = enqueued.iter().copied().collect();
                    if let Some(id) = ids.get(rng.below(ids.len().max(1)))
                        && c.exists::<_, bool>(env.keys.batch_task(*id)).await.unwrap()
                    {
                        let key = env.keys.batch_task(*id);
                        let _: () = c
                            .hset(&key, "deadline", llmq_shared::queue::now_ms())
                            .await
                            .unwrap();
                    }
                    env.redis
                        .rescue_batched(&env.keys, llmq_shared::queue::FALLBACK_MARGIN, WAIT)
                        .await
                        .unwrap();
                }
            }
            let at = places(&env).await;
            for id in &enqueued {
                let mut here = at.get(id).cloned().unwrap_or_default();
                if done.contains(id) {
                    here.push("done");
                }
                assert_eq!(
                    here.len(),
                    1,
                    "seed {seed} step {step}: task {id} is in {here:?}"
                );
            }
        }
        // The run went the whole way: tasks came back from batches with answers, and ended.
        assert!(
            answered > 0 && done.len() > 10,
            "seed {seed}: {answered} answered, {} done",
            done.len()
        );
    }
}

#[tokio::test]
async fn a_batch_is_found_at_its_provider_by_the_label_llmq_gave_it() {
    use llmq_shared::provider::batch::{BatchClient, Item};
    let env = TestEnv::new().await.unwrap();
    let text = config_text(
        &env,
        &["openai", "anthropic", "gemini"],
        &["mock-fast"],
        "1s",
    );
    let config = Config::parse("batch.yaml", &text, &|_| None).unwrap();
    let http = reqwest::Client::new();
    for (kind, _) in FORMATS {
        let p = config.provider(&provider(&env, kind)).unwrap();
        let client = BatchClient::new(p, http.clone()).unwrap();
        let req = llmq_shared::provider::Request {
            model: "mock-fast",
            prompt: "hi".into(),
            ..Default::default()
        };
        let body = llmq_shared::provider::batch::item_body(p, &req).unwrap();
        let item = |id: &str| Item {
            custom_id: id.into(),
            body: body.clone(),
        };
        // Three batches, the one looked for among them.
        let label = uuid::Uuid::new_v4().to_string();
        let mut made = String::new();
        for i in 0..3 {
            let l = if i == 1 {
                label.clone()
            } else {
                uuid::Uuid::new_v4().to_string()
            };
            let id = client.submit("mock-fast", &l, &[item("a")]).await.unwrap();
            if i == 1 {
                made = id;
            }
        }
        let found = client.find("mock-fast", &label).await.unwrap();
        let missing = client.find("mock-fast", "no-such-label").await.unwrap();
        if kind == "anthropic" {
            assert_eq!(
                (found, missing),
                (None, None),
                "Message Batches carry no label"
            );
        } else {
            assert_eq!(found.as_deref(), Some(made.as_str()), "{kind}");
            assert_eq!(missing, None, "{kind}");
        }
    }
}

/// Five tasks that can wait go to a batch, and the scheduler sending it is killed once
/// `sent_so_far` holds of the provider, having made `made` batches by then; a second
/// scheduler takes the queue's batches over. Every task ends answered through a batch, and
/// the provider made one batch of them and answered each task once: none was sent twice,
/// none called instead.
async fn a_batch_whose_sender_died(
    opts: MockOptions,
    sent_so_far: (&str, fn(&MockServer) -> bool),
    made: u64,
) {
    let mut env = TestEnv::new().await.unwrap();
    env.mock = MockServer::start(opts).await.unwrap();
    let text = config_text(&env, &["openai"], &["mock-fast"], "200ms");
    let config = std::env::temp_dir().join(format!("llmq-batch-{}.yaml", env.queue));
    std::fs::write(&config, &text).unwrap();
    let _worker = WorkerProcess::spawn_with(&env, &text, &[]).unwrap();
    let first = scheduler_process(&env, &config, "first", &[]);
    batcher_up(&env).await;
    let ids: Vec<_> = (0..5)
        .map(|i| waiting_task(&env, "openai", "mock-fast", &format!("orphan {i}")))
        .collect();
    for e in &ids {
        env.redis.enqueue(&env.keys, e).await.unwrap();
    }
    let (what, held) = sent_so_far;
    env.eventually(what, WAIT, || async { held(&env.mock) })
        .await
        .unwrap();
    first.signal("KILL").unwrap();
    assert_eq!(env.mock.batches("mock-fast"), made, "{what}");
    let _second = scheduler_process(&env, &config, "second", &["--batch-resend-after", "1s"]);
    for e in &ids {
        let r = env.wait_final(e.id.unwrap(), WAIT).await.unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        assert!(
            r.route.as_deref().unwrap_or("").contains("batch API"),
            "{r:?}"
        );
    }
    assert_eq!(
        env.mock.batches("mock-fast"),
        1,
        "one batch made of the tasks"
    );
    assert_eq!(env.mock.batch_items("mock-fast"), 5);
    assert_eq!(env.mock.calls("mock-fast"), 5, "no task was also called");
}

/// The scheduler is killed after the provider made its batch and before it recorded the
/// batch's id: the next scheduler finds the batch by its label and follows it, instead of
/// sending (and paying for) the same requests twice.
#[tokio::test]
async fn a_batch_whose_sender_died_before_recording_it_is_followed_not_sent_again() {
    a_batch_whose_sender_died(
        MockOptions {
            batch_create_delay: Duration::from_secs(30),
            ..MockOptions::default()
        },
        // The provider made the batch; its answer (the id) has not reached the scheduler.
        ("a batch made at the provider", |m| {
            m.batches("mock-fast") == 1
        }),
        1,
    )
    .await;
}

/// The scheduler is killed after it took a batch and before the provider made it (its file
/// upload not yet answered): the next scheduler finds no batch by its label and sends the
/// batch again, each task's request read back from Redis, so the tasks are answered through
/// a batch rather than handed to calls for an unreadable request.
#[tokio::test]
async fn a_batch_whose_sender_died_before_the_provider_made_it_is_sent_again_with_its_requests() {
    a_batch_whose_sender_died(
        MockOptions {
            first_upload_delay: Duration::from_secs(30),
            ..MockOptions::default()
        },
        // The provider holds the batch's file; no batch was made of it.
        ("the batch's file uploaded", |m| m.files() == 1),
        0,
    )
    .await;
}

//! Provider outages through real workers, the real Redis and Postgres, and llmq-mock over
//! HTTP: an outage is waited out, not paid for with attempts; a task's own failures still
//! use them up.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use llmq_shared::circuit::Circuits;
use llmq_shared::config::Config;
use llmq_shared::envelope::Envelope;
use llmq_shared::ids::TaskId;
use llmq_shared::outcome::{ErrorClass, Status};
use llmq_tests::harness::{AsTaskId, TestEnv, WorkerHandle, WorkerProcess, free_port};
use llmq_tests::mock::{MockOptions, MockServer};

/// A loopback address where nothing listens (yet), nor will until the test starts a server
/// there ([`free_port`]).
fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Providers `<name><suffix>` at their urls with their models (an id, optionally followed by
/// more flow-mapping keys), and `routing` (indented by two).
fn config(env: &TestEnv, providers: &[(&str, String, &[&str])], routing: &str) -> Config {
    let sfx = &env.queue[2..];
    let mut text = String::from("providers:\n");
    for (name, url, models) in providers {
        text.push_str(&format!(
            "  - name: {name}{sfx}\n    kind: openai_compatible\n    base_url: {url}/v1\n    api_key: k\n    models:\n"
        ));
        for m in *models {
            text.push_str(&format!(
                "      - {{id: {m}, input_usd_per_mtok: 1, output_usd_per_mtok: 2}}\n"
            ));
        }
    }
    text.push_str("routing:\n");
    text.push_str(&routing.replace("{sfx}", sfx));
    Config::parse("outage-test.yaml", &text, &|_| None).unwrap()
}

fn worker(env: &TestEnv, config: Config) -> WorkerHandle {
    let mut s = env.settings();
    s.config = config;
    WorkerHandle::start(s)
}

fn pinned(prompt: String, provider: &str, model: &str) -> Envelope {
    let mut e = Envelope::new(prompt);
    e.provider = Some(provider.into());
    e.model = Some(model.into());
    e
}

#[tokio::test]
async fn the_only_provider_down_for_15_s_loses_no_task_and_no_attempt() {
    let env = TestEnv::new().await.unwrap();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let config = config(
        &env,
        &[("down", url, &["mock-fast"])],
        "  retry: {tries_per_provider: 3, backoff: [20ms, 40ms]}\n  cooldown: {after_failures: 5, for: 2s}\n",
    );
    let workers = [worker(&env, config.clone()), worker(&env, config)];
    let tasks: Vec<Envelope> = (0..300)
        .map(|i| Envelope::new(format!("outage task {i}")))
        .collect();
    env.redis.enqueue_many(&env.keys, &tasks).await.unwrap();

    // Nothing listens for 15 s: the tasks must wait, not die.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!(counts.dead, 0, "no dead letter during the outage");
    assert_eq!(
        counts.ready + counts.in_flight + counts.delayed,
        300,
        "every task still waits (in delayed, or between its waits): {counts:?}"
    );
    let mock = MockServer::start_at(addr, MockOptions::default())
        .await
        .unwrap();

    let ids: Vec<TaskId> = tasks.iter().map(|e| e.id.unwrap()).collect();
    let records = llmq::wait_for(
        &env.redis,
        &env.keys,
        &ids,
        Some(Duration::from_secs(60)),
        |_| {},
    )
    .await
    .unwrap();
    let records: Vec<_> = records.into_iter().map(Option::unwrap).collect();
    let succeeded = records
        .iter()
        .filter(|r| r.status == Status::Succeeded)
        .count();
    assert_eq!(succeeded, 300, "every task ran once the provider was back");
    let most = records.iter().map(|r| r.attempts).max().unwrap();
    assert_eq!(most, 1, "the outage used no attempt");
    assert_eq!(env.redis.counts(&env.keys).await.unwrap().dead, 0);
    assert_eq!(
        mock.total_calls(),
        300,
        "one call per task once it was back"
    );
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test]
async fn during_an_outage_tasks_fall_back_to_a_second_provider_at_once() {
    let env = TestEnv::new().await.unwrap();
    let sfx = env.queue[2..].to_owned();
    let config = config(
        &env,
        &[
            ("down", format!("http://{}", free_addr()), &["mock-fast"]),
            ("up", env.mock.url(), &["mock-smart"]),
        ],
        "  fallback: [up{sfx}]\n  retry: {tries_per_provider: 3, backoff: [1s, 2s]}\n",
    );
    let w = worker(&env, config);
    let e = pinned("fall back".into(), &format!("down{sfx}"), "mock-fast");
    let id = e.id.unwrap();
    env.redis.enqueue(&env.keys, &e).await.unwrap();
    let r = env.wait_final(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(r.provider.as_deref(), Some(format!("up{sfx}").as_str()));
    assert_eq!(r.attempts, 1);
    let down_calls = env
        .calls()
        .await
        .unwrap()
        .iter()
        .filter(|c| c.4 == format!("down{sfx}"))
        .count();
    assert_eq!(
        down_calls, 1,
        "a refused connection moves on at once: no retry on the down provider"
    );
    w.stop().await.unwrap();
}

#[tokio::test]
async fn one_failing_model_does_not_stop_the_other_models_of_its_provider() {
    let env = TestEnv::new().await.unwrap();
    let sfx = env.queue[2..].to_owned();
    let name = format!("p{sfx}");
    let config = config(
        &env,
        &[(
            "p",
            env.mock.url(),
            &["fail-500", "mock-fast, capabilities: [analysis]"],
        )],
        "  retry: {tries_per_provider: 3, backoff: [10ms, 20ms]}\n  cooldown: {after_failures: 3, for: 30s}\n",
    );
    let w = worker(&env, config);
    // Three 500s from fail-500 open its circuit; the task they came from used its attempt.
    let mut first = pinned("break it".into(), &name, "fail-500");
    first.max_attempts = Some(1);
    let first_id = first.id.unwrap();
    env.redis.enqueue(&env.keys, &first).await.unwrap();
    let r = env
        .wait_final(&first_id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Dead);
    assert!(r.error.unwrap().contains("HTTP 500"));

    // The provider's other model answers as before.
    let ok: Vec<Envelope> = (0..5)
        .map(|i| pinned(format!("fine {i}"), &name, "mock-fast"))
        .collect();
    env.redis.enqueue_many(&env.keys, &ok).await.unwrap();
    for e in &ok {
        let r = env
            .wait_final(&e.id.unwrap(), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }

    // A task only the broken model can take (code) now waits for the cooldown instead of
    // using attempts.
    let mut waiting = pinned("wait for it".into(), &name, "fail-500");
    waiting.task_type = Some("code_generation".into());
    let wid = waiting.id.unwrap();
    env.redis.enqueue(&env.keys, &waiting).await.unwrap();
    env.eventually(
        "the task waiting on the open circuit",
        Duration::from_secs(10),
        || async {
            env.redis
                .task(&env.keys, wid.tid())
                .await
                .unwrap()
                .is_some_and(|r| r.status == Status::Delayed)
        },
    )
    .await
    .unwrap();
    let r = env.redis.task(&env.keys, wid.tid()).await.unwrap().unwrap();
    assert_eq!(r.attempts, 0, "{r:?}");
    assert_eq!(r.error_class, Some(ErrorClass::Unavailable));
    let error = r.error.unwrap();
    assert!(
        error.contains(&format!("{name}/fail-500 is cooling down since")),
        "{error}"
    );
    assert_eq!(env.mock.calls("fail-500"), 3, "no call while it is open");

    // `llmq status` names the model, why and until when.
    let circuits = Circuits::new(env.redis.clone(), "test");
    let open = circuits
        .open(&[(name.clone(), vec!["fail-500".into(), "mock-fast".into()])])
        .await
        .unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].scope(), format!("{name}/fail-500"));
    let dir = std::env::temp_dir().join(format!("llmq-outage-{sfx}"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("providers.yaml");
    std::fs::write(
        &file,
        format!(
            "providers:\n  - name: {name}\n    kind: openai_compatible\n    base_url: {}/v1\n    api_key: k\n    models:\n      - {{id: fail-500, input_usd_per_mtok: 1, output_usd_per_mtok: 2}}\n      - {{id: mock-fast, input_usd_per_mtok: 1, output_usd_per_mtok: 2}}\n",
            env.mock.url()
        ),
    )
    .unwrap();
    let (code, out) = env
        .cli(&[
            "status",
            "--queue",
            &env.queue,
            "--config",
            file.to_str().unwrap(),
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Cooling down"), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains(&format!("{name}/fail-500")))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("until"), "{line}");
    assert!(line.contains("3 failures in a row"), "{line}");
    assert!(
        !out.lines()
            .any(|l| l.contains(&format!("{name}/mock-fast")) && l.contains("until")),
        "{out}"
    );
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_task_that_fails_with_500_while_the_provider_answers_others_dies_after_its_attempts() {
    let env = TestEnv::new().await.unwrap();
    let sfx = env.queue[2..].to_owned();
    let name = format!("p{sfx}");
    // A threshold the failing task cannot reach alone (3 attempts x 2 tries): what is checked
    // is that a 500 is the task's failure, not an outage to wait out.
    let config = config(
        &env,
        &[("p", env.mock.url(), &["mock-fast"])],
        "  retry: {tries_per_provider: 2, backoff: [10ms]}\n  cooldown: {after_failures: 10, for: 30s}\n",
    );
    let w = worker(&env, config);
    let others: Vec<Envelope> = (0..20)
        .map(|i| pinned(format!("[[mock:slow-100]] fine {i}"), &name, "mock-fast"))
        .collect();
    let bad = pinned("[[mock:fail-500]] always fails".into(), &name, "mock-fast");
    let bad_id = bad.id.unwrap();
    let mut all = others.clone();
    all.insert(3, bad);
    env.redis.enqueue_many(&env.keys, &all).await.unwrap();
    let r = env
        .wait_final(&bad_id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Dead, "{r:?}");
    assert_eq!(r.attempts, 3);
    assert_eq!(r.error_class, Some(ErrorClass::Retryable));
    let error = r.error.unwrap();
    assert!(
        error.starts_with("gave up after 3 attempts; last error:") && error.contains("HTTP 500"),
        "{error}"
    );
    for e in &others {
        let r = env
            .wait_final(&e.id.unwrap(), Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
    w.stop().await.unwrap();
}

#[tokio::test]
async fn max_wait_ends_a_longer_outage_with_what_it_waited_for_and_since_when() {
    let env = TestEnv::new().await.unwrap();
    let sfx = env.queue[2..].to_owned();
    let config = config(
        &env,
        &[("down", format!("http://{}", free_addr()), &["mock-fast"])],
        "  max_wait: 2s\n  cooldown: {after_failures: 2, for: 500ms}\n",
    );
    let w = worker(&env, config);
    let e = Envelope::new("nobody answers");
    let id = e.id.unwrap();
    env.redis.enqueue(&env.keys, &e).await.unwrap();
    let r = env.wait_final(&id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(r.status, Status::Dead, "{r:?}");
    assert_eq!(r.error_class, Some(ErrorClass::Unavailable));
    assert_eq!(r.attempts, 0, "waiting used no attempt");
    let error = r.error.unwrap();
    assert!(
        error.starts_with("waited ") && error.contains(" for a provider, since "),
        "{error}"
    );
    assert!(error.contains("(routing.max_wait)"), "{error}");
    assert!(
        error.contains(&format!("down{sfx}")) && error.contains("cannot connect"),
        "{error}"
    );
    let dead = env.redis.dead_letters(&env.keys, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_503_with_retry_after_is_not_called_again_sooner() {
    let env = TestEnv::new().await.unwrap();
    let sfx = env.queue[2..].to_owned();
    let config = config(
        &env,
        &[("p", env.mock.url(), &["mock-fast"])],
        "  max_wait: 3500ms\n  cooldown: {after_failures: 50, for: 30s}\n",
    );
    let w = worker(&env, config);
    let e = pinned(
        "[[mock:unavailable-1]] come back later".into(),
        &format!("p{sfx}"),
        "mock-fast",
    );
    let id = e.id.unwrap();
    env.redis.enqueue(&env.keys, &e).await.unwrap();
    let r = env.wait_final(&id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(r.status, Status::Dead);
    assert_eq!(r.error_class, Some(ErrorClass::Unavailable));
    assert_eq!(r.attempts, 0, "a 503 is the provider's, not the task's");
    let at: Vec<i64> = sqlx::query_scalar(
        "SELECT (extract(epoch from called_at) * 1000)::int8 FROM provider_calls WHERE queue = $1 ORDER BY called_at",
    )
    .bind(&env.queue)
    .fetch_all(env.ledger.pool())
    .await
    .unwrap();
    assert!(at.len() >= 2, "{at:?}");
    for pair in at.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= 1000,
            "called again {gap} ms after a 503 asked for 1 s: {at:?}"
        );
    }
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_worker_out_of_file_descriptors_uses_no_attempt_and_blames_no_provider() {
    use llmq_tests::harness::{binary, database_url, redis_url};
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let tasks: Vec<Envelope> = (0..60)
        .map(|i| {
            let mut e = Envelope::new(format!("[[mock:slow-1500]] fd {i}"));
            e.model = Some("mock-fast".into());
            e
        })
        .collect();
    env.redis.enqueue_many(&env.keys, &tasks).await.unwrap();
    let config = std::env::temp_dir().join(format!("{}-fd.yaml", env.queue));
    std::fs::write(
        &config,
        include_str!("../../../examples/providers.mock.yaml"),
    )
    .unwrap();
    // Sixty calls at once cannot fit in 48 file descriptors.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 48 && exec \"$0\" \"$@\"")
        .arg(binary("llmq-worker"))
        .args([
            "--queue",
            &env.queue,
            "--concurrency",
            "60",
            "--retry-base",
            "200ms",
        ])
        .env("REDIS_URL", redis_url())
        .env("DATABASE_URL", database_url())
        .env("LLMQ_CONFIG", &config)
        .env("LLMQ_MOCK_URL", env.mock.url())
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ids: Vec<TaskId> = tasks.iter().map(|e| e.id.unwrap()).collect();
    let records = llmq::wait_for(
        &env.redis,
        &env.keys,
        &ids,
        Some(Duration::from_secs(90)),
        |_| {},
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let records: Vec<_> = records.unwrap().into_iter().map(Option::unwrap).collect();
    assert!(
        records
            .iter()
            .all(|r| r.status == Status::Succeeded && r.attempts == 1),
        "{records:#?}"
    );
    let refused: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM provider_calls WHERE queue = $1 AND error LIKE '%out of file descriptors%'",
    )
    .bind(&env.queue)
    .fetch_one(env.ledger.pool())
    .await
    .unwrap();
    assert!(refused > 0, "the limit was reached");
    // The provider was never blamed: its circuit stayed closed.
    let open = Circuits::new(env.redis.clone(), "test")
        .open(&[("mock".into(), vec!["mock-fast".into()])])
        .await
        .unwrap();
    assert!(open.is_empty(), "{open:?}");
}

/// A Gemini provider whose one model is `model`, for `routing.max_wait`.
fn gemini_config(env: &TestEnv, name: &str, model: &str, max_wait: &str) -> Config {
    Config::parse(
        "gemini-test.yaml",
        &format!(
            "providers:\n  - {{name: {name}, kind: gemini, base_url: \"{}/v1beta\", api_key: k, \
             models: [{{id: {model}, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}]}}\n\
             routing:\n  max_wait: {max_wait}\n",
            env.mock.url()
        ),
        &|_| None,
    )
    .unwrap()
}

#[tokio::test]
async fn a_gemini_per_day_quota_waits_for_midnight_pacific_within_max_wait() {
    let env = TestEnv::new().await.unwrap();
    let name = format!("g{}", &env.queue[2..]);
    // A max_wait longer than any day: the task waits for the reset, using no attempt.
    let w = worker(&env, gemini_config(&env, &name, "quota-daily", "25h"));
    let e = pinned("one more today".into(), &name, "quota-daily");
    let id = e.id.unwrap();
    env.redis.enqueue(&env.keys, &e).await.unwrap();
    let ids = [id];
    env.eventually("the task waiting", Duration::from_secs(20), || async {
        env.redis.results(&env.keys, &ids).await.unwrap()[0]
            .as_ref()
            .is_some_and(|r| r.status == Status::Delayed)
    })
    .await
    .unwrap();
    w.stop().await.unwrap();
    let r = env.redis.results(&env.keys, &ids).await.unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(r.attempts, 0, "a quota is not the task's fault");
    assert_eq!(r.error_class, Some(ErrorClass::RateLimited));
    let error = r.error.unwrap();
    let (_, reset) = error
        .split_once("resets at midnight Pacific time, ")
        .unwrap_or_else(|| panic!("{error}"));
    let reset = chrono::NaiveDateTime::parse_from_str(&reset[..16], "%Y-%m-%d %H:%M")
        .unwrap()
        .and_utc();
    assert_eq!(reset.format("%M:%S").to_string(), "00:00", "{error}");
    assert!(
        matches!(reset.format("%H").to_string().as_str(), "07" | "08"),
        "{error}"
    );
    // Its due time is that reset, not the 16 s the RetryInfo said.
    let mut c = env.redis.conn().await.unwrap();
    let delayed: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(env.keys.delayed())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut c)
        .await
        .unwrap();
    let due = delayed
        .iter()
        .find(|(task, _)| task.contains(&id.to_string()))
        .map(|(_, due)| *due as i64)
        .unwrap();
    assert!(
        (due - reset.timestamp_millis()).abs() < 5_000,
        "{due} against {reset}"
    );
    assert!(
        env.redis
            .dead_letters(&env.keys, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // A max_wait shorter than the wait: a dead letter at once, saying why.
    let other = TestEnv::new().await.unwrap();
    let w = worker(&other, gemini_config(&other, &name, "quota-daily", "1m"));
    let e = pinned("one more today".into(), &name, "quota-daily");
    let id = e.id.unwrap();
    other.redis.enqueue(&other.keys, &e).await.unwrap();
    let r = other
        .wait_final(&id, Duration::from_secs(20))
        .await
        .unwrap();
    w.stop().await.unwrap();
    // Unless this runs within a minute of the reset.
    if reset - chrono::Utc::now() > chrono::Duration::minutes(2) {
        assert_eq!(r.status, Status::Dead, "{r:?}");
        assert_eq!(r.attempts, 0);
        let error = r.error.unwrap();
        assert!(error.contains("(routing.max_wait)"), "{error}");
        assert!(error.contains("resets at midnight Pacific time"), "{error}");
    }
}

/// A worker on a ledger of this test's own (so breaking it breaks no other test), whose
/// attempts end after 1.5 s.
async fn worker_on_own_ledger(env: &TestEnv) -> (WorkerHandle, llmq_shared::ledger::Ledger) {
    let (url, ledger) = env.own_ledger().await;
    let mut s = env.settings();
    s.database_url = Some(url);
    s.attempt_timeout = Duration::from_millis(1500);
    (WorkerHandle::start(s), ledger)
}

/// The outcomes of task `id`'s call rows in `ledger`.
async fn call_outcomes(ledger: &llmq_shared::ledger::Ledger, id: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT outcome FROM provider_calls WHERE task_id = $1::uuid")
        .bind(id)
        .fetch_all(ledger.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn postgres_down_longer_than_an_attempt_hands_the_task_back_without_using_it() {
    let env = TestEnv::new().await.unwrap();
    let (w, ledger) = worker_on_own_ledger(&env).await;
    // No call can be recorded, so none is made, for several attempts' time.
    sqlx::query("ALTER TABLE provider_calls RENAME TO provider_calls_away")
        .execute(ledger.pool())
        .await
        .unwrap();
    let mut task = Envelope::new("wait for the ledger");
    task.model = Some("mock-fast".into());
    task.max_attempts = Some(2);
    let id = task.id.unwrap();
    env.redis.enqueue(&env.keys, &task).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ids = [id];
    let meanwhile = env.redis.results(&env.keys, &ids).await.unwrap()[0].clone();
    assert!(meanwhile.is_none(), "{meanwhile:?}");
    assert_eq!(env.mock.total_calls(), 0, "no call without its ledger row");
    sqlx::query("ALTER TABLE provider_calls_away RENAME TO provider_calls")
        .execute(ledger.pool())
        .await
        .unwrap();
    let r = env.wait_final(&id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(r.attempts, 1, "the waits for Postgres used no attempt");
    // One row, for the one call made: none for the calls given up before they were made.
    let rows = call_outcomes(&ledger, &id.to_string()).await;
    assert_eq!(rows, ["ok"]);
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_slow_ledger_leaves_no_row_for_a_call_it_was_too_late_to_allow() {
    let env = TestEnv::new().await.unwrap();
    let (w, ledger) = worker_on_own_ledger(&env).await;
    // Postgres answers, slowly: the calls' rows wait on a lock for several attempts' time,
    // then commit after their callers gave up.
    let mut lock = ledger.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE provider_calls IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let mut task = Envelope::new("wait for a slow ledger");
    task.model = Some("mock-fast".into());
    let id = task.id.unwrap();
    env.redis.enqueue(&env.keys, &task).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(env.mock.total_calls(), 0, "no call without its ledger row");
    lock.rollback().await.unwrap();
    let r = env.wait_final(&id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(r.attempts, 1);
    w.stop().await.unwrap();
    // Every row stands for a call made: the one that answered.
    let rows = call_outcomes(&ledger, &id.to_string()).await;
    assert_eq!(rows, ["ok"]);
    assert_eq!(env.mock.total_calls(), 1);
}

/// Three worker processes on one API key; the provider answers every tenth request with a
/// 429 asking for 200 ms and enforces it. A Retry-After speaks to the key: no worker calls
/// before the wait another one was asked for has passed, and no task uses an attempt on it.
#[tokio::test]
async fn a_retry_after_given_to_one_worker_holds_every_worker_on_the_key() {
    let env = TestEnv::new().await.unwrap();
    let ids: Vec<TaskId> = {
        let envs: Vec<Envelope> = (0..240)
            .map(|i| {
                let mut e = Envelope::new(format!("strict {i}"));
                e.model = Some("strict-10".into());
                e
            })
            .collect();
        env.redis.enqueue_many(&env.keys, &envs).await.unwrap();
        envs.iter().map(|e| e.id.unwrap()).collect()
    };
    let workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::spawn(&env, &["--concurrency", "8"]).unwrap())
        .collect();
    let records = llmq::wait_for(
        &env.redis,
        &env.keys,
        &ids,
        Some(Duration::from_secs(90)),
        |_| {},
    )
    .await
    .unwrap();
    for r in &records {
        let r = r.as_ref().expect("every task finishes");
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        assert_eq!(r.attempts, 1, "a wait asked for uses no attempt: {r:?}");
    }
    let refused = env.mock.total_calls() - ids.len() as u64;
    assert!(refused >= 20, "the provider asked to wait {refused} times");
    assert_eq!(
        env.mock.retry_after_ignored(),
        0,
        "a worker called while a wait the provider asked of another worker stood"
    );
    drop(workers);
}

/// A cheap CLI model fails every hard code task (it runs, and exits 1 saying the tests
/// failed) and answers documentation well. Its failures are about those tasks: they fall
/// back to the premium model, and the cheap model's circuit stays closed, so documentation
/// keeps going to it.
#[tokio::test]
async fn a_model_failing_one_kind_of_task_stays_open_to_the_others() {
    let env = TestEnv::new().await.unwrap();
    let sfx = &env.queue[2..];
    let script = r#"p=$(cat); case "$p" in *HARD*) echo "3 tests failed" >&2; exit 1;; *) echo "documented";; esac"#;
    let text = format!(
        "providers:
  - name: cheap{sfx}
    kind: command
    command: {{program: sh, args: [\"-c\", {script:?}], prompt_via: stdin}}
    models: [{{id: cheap-cli, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}]
  - name: premium{sfx}
    kind: openai_compatible
    base_url: {}/v1
    api_key: k
    models: [{{id: mock-smart, input_usd_per_mtok: 3, output_usd_per_mtok: 15}}]
routing:
  strategy: cheapest
  retry: {{tries_per_provider: 1, backoff: [10ms]}}
  cooldown: {{after_failures: 3, for: 60s}}
",
        env.mock.url()
    );
    let config = Config::parse("circuit-test.yaml", &text, &|_| None).unwrap();
    let w = worker(&env, config);
    let hard: Vec<Envelope> = (0..6)
        .map(|i| {
            let mut e = Envelope::new(format!("HARD code task {i}"));
            e.task_type = Some("code_generation".into());
            e
        })
        .collect();
    for e in &hard {
        // One after another, so the cheap model fails six times in a row.
        env.redis.enqueue(&env.keys, e).await.unwrap();
        let r = env
            .wait_final(&e.id.unwrap(), Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        assert_eq!(
            r.provider.as_deref(),
            Some(format!("premium{sfx}").as_str()),
            "{r:?}"
        );
    }
    for i in 0..3 {
        let mut e = Envelope::new(format!("document module {i}"));
        e.task_type = Some("documentation".into());
        env.redis.enqueue(&env.keys, &e).await.unwrap();
        let r = env
            .wait_final(&e.id.unwrap(), Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        assert_eq!(
            r.provider.as_deref(),
            Some(format!("cheap{sfx}").as_str()),
            "documentation still goes to the cheap model: {r:?}"
        );
    }
    let open = Circuits::new(env.redis.clone(), "test")
        .open(&[(format!("cheap{sfx}"), vec!["cheap-cli".into()])])
        .await
        .unwrap();
    assert!(open.is_empty(), "{open:?}");
    w.stop().await.unwrap();
}

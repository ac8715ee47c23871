//! Idempotency keys (issue 38): envelopes written with a raw XADD that share an
//! `idempotency_key` run once while the first waits or runs (its retries included), are
//! answered with its answer within the window after it succeeded, run again once it failed or
//! went dead, and hold across a SIGKILL and a poison end. A chain submitted twice with one key
//! is one chain.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq_shared::envelope::derive_id;
use llmq_shared::idempotency::key_name;
use llmq_shared::outcome::{Status, TaskRecord};
use llmq_tests::harness::{SeededRng, TestEnv, WorkerProcess};

const WAIT: Duration = Duration::from_secs(60);

/// Sends a task with key `key` as a producer in another language would: one XADD, no id (the
/// worker derives it from the entry). Returns the task id.
async fn send(env: &TestEnv, prompt: &str, key: &str, extra: &str) -> String {
    let payload =
        serde_json::json!({"v": 1, "prompt": prompt, "model": "mock-fast", "idempotency_key": key});
    let mut json = payload.to_string();
    if !extra.is_empty() {
        json.pop();
        json.push(',');
        json.push_str(extra);
        json.push('}');
    }
    let entry = env.xadd("task", json.as_bytes()).await.unwrap();
    derive_id(&env.queue, entry.parse().unwrap()).to_string()
}

async fn finals(env: &TestEnv, ids: &[String]) -> Vec<TaskRecord> {
    let mut records = Vec::new();
    for id in ids {
        records.push(env.wait_final(id, WAIT).await.unwrap());
    }
    records
}

async fn duplicates(env: &TestEnv) -> u64 {
    env.redis.duplicates(&env.keys).await.unwrap()
}

#[tokio::test]
async fn copies_sent_while_the_first_runs_wait_for_it_and_get_its_answer_at_no_cost() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    // A producer that timed out and sent the same task twice more while the first ran.
    let prompt = "Refund order 1234 [[mock:slow-600]]";
    let mut ids = vec![send(&env, prompt, "refund-1234", "").await];
    for _ in 0..2 {
        ids.push(send(&env, prompt, "refund-1234", "").await);
    }
    let records = finals(&env, &ids).await;
    assert!(
        records.iter().all(|r| r.status == Status::Succeeded),
        "{records:?}"
    );
    assert_eq!(
        env.mock.calls_with_prompt(prompt),
        1,
        "one call for three sends"
    );
    let first: Vec<_> = records
        .iter()
        .filter(|r| r.duplicate_of.is_none())
        .collect();
    assert_eq!(first.len(), 1, "{records:?}");
    for copy in records.iter().filter(|r| r.duplicate_of.is_some()) {
        assert_eq!(copy.duplicate_of, Some(first[0].task_id));
        assert_eq!(copy.output, first[0].output);
        assert_eq!(copy.model, first[0].model);
        assert_eq!(copy.cost_usd, 0.0, "a copy is billed $0");
        assert_eq!(copy.attempts, 0);
    }
    assert!(first[0].cost_usd > 0.0);
    // The ledger has the one call, of the first task.
    let calls = env.calls().await.unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].0, first[0].task_id.uuid());
    assert_eq!(duplicates(&env).await, 2);
    // `llmq status --format json` and the page count them from the same counter.
    assert_eq!(env.redis.counts(&env.keys).await.unwrap().duplicates, 2);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn the_same_envelope_sent_again_with_its_own_id_runs_once_and_keeps_its_record() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    // A producer that sets the id and resends the very same envelope after a timeout.
    let prompt = "Issue invoice 88 [[mock:slow-600]]";
    let id = uuid::Uuid::new_v4().to_string();
    let payload = serde_json::json!({"v": 1, "id": id, "prompt": prompt, "model": "mock-fast", "idempotency_key": "invoice-88"})
        .to_string();
    for _ in 0..3 {
        env.xadd("task", payload.as_bytes()).await.unwrap();
    }
    let record = env.wait_final(&id, WAIT).await.unwrap();
    assert_eq!(record.status, Status::Succeeded);
    env.eventually("every copy acked", WAIT, || async {
        env.stream_len().await == 0
    })
    .await
    .unwrap();
    // And once more after it succeeded.
    env.xadd("task", payload.as_bytes()).await.unwrap();
    env.eventually("the late copy acked", WAIT, || async {
        env.stream_len().await == 0
    })
    .await
    .unwrap();
    assert_eq!(
        env.mock.calls_with_prompt(prompt),
        1,
        "one call for four sends"
    );
    let after = env.wait_final(&id, WAIT).await.unwrap();
    assert_eq!(after.duplicate_of, None, "its own record, not a copy's");
    assert_eq!(after.cost_usd, record.cost_usd);
    assert!(after.cost_usd > 0.0);
    assert_eq!(duplicates(&env).await, 3);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_copy_within_the_window_gets_the_answer_and_one_after_it_runs_again() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let prompt = "Send the weekly digest";
    let first = send(&env, prompt, "digest-w48", r#""idempotency_window":"2s""#).await;
    let first = env.wait_final(&first, WAIT).await.unwrap();
    assert_eq!(first.status, Status::Succeeded);
    // Sent again after it succeeded, within its window: its answer, no call.
    let copy = send(&env, prompt, "digest-w48", "").await;
    let copy = env.wait_final(&copy, WAIT).await.unwrap();
    assert_eq!(copy.duplicate_of, Some(first.task_id));
    assert_eq!(copy.output, first.output);
    assert_eq!(env.mock.calls_with_prompt(prompt), 1);
    // Another tenant's task with the same key is not a copy.
    let other = send(&env, prompt, "digest-w48", r#""tenant":"acme""#).await;
    let other = env.wait_final(&other, WAIT).await.unwrap();
    assert_eq!(other.duplicate_of, None);
    assert_eq!(env.mock.calls_with_prompt(prompt), 2);
    // Once the window is over, the key is forgotten: the next one runs.
    let mut c = env.redis.conn().await.unwrap();
    let name = env.keys.kept(&key_name(None, "digest-w48"));
    env.eventually("the window over", Duration::from_secs(10), || {
        let (name, mut c) = (name.clone(), c.clone());
        async move {
            let left: i64 = redis::cmd("EXISTS")
                .arg(&name)
                .query_async(&mut c)
                .await
                .unwrap();
            left == 0
        }
    })
    .await
    .unwrap();
    let late = send(&env, prompt, "digest-w48", "").await;
    let late = env.wait_final(&late, WAIT).await.unwrap();
    assert_eq!(late.duplicate_of, None);
    assert_eq!(env.mock.calls_with_prompt(prompt), 3);
    let _: () = redis::cmd("PING").query_async(&mut c).await.unwrap();
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_first_that_fails_holds_the_key_through_its_retries_then_frees_it_for_a_copy() {
    let env = TestEnv::new().await.unwrap();
    let mut settings = env.settings();
    // Long enough a backoff that the copies come while the first waits for its retry.
    settings.retry_base = Duration::from_millis(800);
    settings.retry_max = Duration::from_millis(800);
    let worker = llmq_tests::harness::WorkerHandle::start(settings);
    // Two attempts, both 500s: a dead letter.
    let first = send(
        &env,
        "Charge card [[mock:fail-500]]",
        "charge-77",
        r#""max_attempts":2"#,
    )
    .await;
    env.eventually("the first attempt failed", WAIT, || async {
        env.mock.calls_with_prompt("Charge card [[mock:fail-500]]") == 1
    })
    .await
    .unwrap();
    // Copies sent while it waits for its retry: they park, they do not run.
    let prompt = "Charge card";
    let mut copies = Vec::new();
    for _ in 0..4 {
        copies.push(send(&env, prompt, "charge-77", "").await);
    }
    let first = env.wait_final(&first, WAIT).await.unwrap();
    assert_eq!(first.status, Status::Dead, "{first:?}");
    // It ended dead: the key is free, one copy runs and the others get its answer.
    let records = finals(&env, &copies).await;
    assert!(
        records.iter().all(|r| r.status == Status::Succeeded),
        "{records:?}"
    );
    assert_eq!(env.mock.calls_with_prompt(prompt), 1);
    let ran: Vec<_> = records
        .iter()
        .filter(|r| r.duplicate_of.is_none())
        .collect();
    assert_eq!(ran.len(), 1, "{records:?}");
    assert!(
        records
            .iter()
            .filter(|r| r.duplicate_of.is_some())
            .all(|r| r.duplicate_of == Some(ran[0].task_id))
    );
    // Replaying the dead letter is a new run by intent: it calls, however the key stands.
    let failing = "Charge card [[mock:fail-500]]";
    let before = env.mock.calls_with_prompt(failing);
    let (code, out) = env
        .cli(&[
            "dlq",
            "replay",
            &first.task_id.to_string(),
            "--queue",
            &env.queue,
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    env.eventually("the replay called", WAIT, || async {
        env.mock.calls_with_prompt(failing) > before
    })
    .await
    .unwrap();
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_worker_killed_during_the_first_call_leaves_the_key_to_the_worker_that_takes_over() {
    let env = TestEnv::new().await.unwrap();
    let config = include_str!("../../../examples/providers.mock.yaml");
    let args = ["--concurrency", "4", "--visibility-timeout", "1s"];
    let prompt = "Book the flight [[mock:slow-1500]]";
    let first = send(&env, prompt, "booking-9", "").await;
    let worker = WorkerProcess::spawn_with(&env, config, &args).unwrap();
    env.eventually("the first call made", Duration::from_secs(20), || async {
        env.mock.calls_with_prompt(prompt) == 1
    })
    .await
    .unwrap();
    // The producer retries while the first is on its way; then its worker is killed.
    let mut copies = Vec::new();
    for _ in 0..3 {
        copies.push(send(&env, "Book the flight", "booking-9", "").await);
    }
    worker.signal("KILL").unwrap();
    drop(worker);
    let second = WorkerProcess::spawn_with(&env, config, &args).unwrap();
    let first = env.wait_final(&first, WAIT).await.unwrap();
    let records = finals(&env, &copies).await;
    second.signal("TERM").unwrap();
    assert_eq!(first.status, Status::Succeeded, "{first:?}");
    // The killed call and the takeover's; none for the copies.
    assert_eq!(env.mock.calls_with_prompt(prompt), 2);
    assert_eq!(env.mock.calls_with_prompt("Book the flight"), 0);
    assert!(
        records
            .iter()
            .all(|r| r.duplicate_of == Some(first.task_id)),
        "{records:?}"
    );
}

#[tokio::test]
async fn a_first_that_ends_as_poison_frees_the_key() {
    let env = TestEnv::new().await.unwrap();
    // The first was read by a worker that died with it holding its key: its next delivery
    // is one more than the worker allows (`max_deliveries` 1), so it ends as poison.
    let payload =
        r#"{"v":1,"prompt":"Ship the parcel","model":"mock-fast","idempotency_key":"parcel-5"}"#;
    let entry = env.xadd("task", payload.as_bytes()).await.unwrap();
    let first = derive_id(&env.queue, entry.parse().unwrap());
    let mut c = env.redis.conn().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("ghost")
        .arg("STREAMS")
        .arg(env.keys.stream())
        .arg(">")
        .query_async(&mut c)
        .await
        .unwrap();
    let name = key_name(None, "parcel-5");
    let _: () = redis::cmd("SET")
        .arg(env.keys.kept(&name))
        .arg(llmq_shared::queue::holder(first, &entry))
        .query_async(&mut c)
        .await
        .unwrap();
    // A copy, parked behind it as a worker would park it.
    let copy = send(&env, "Ship the parcel", "parcel-5", "").await;
    let mut settings = env.settings();
    settings.max_deliveries = 1;
    settings.visibility_timeout = Duration::from_millis(500);
    let worker = llmq_tests::harness::WorkerHandle::start(settings);
    let first = env.wait_final(&first, WAIT).await.unwrap();
    assert_eq!(first.status, Status::Dead, "{first:?}");
    let copy = env.wait_final(&copy, WAIT).await.unwrap();
    assert_eq!(copy.status, Status::Succeeded, "{copy:?}");
    assert_eq!(copy.duplicate_of, None, "the first never answered");
    assert_eq!(env.mock.calls_with_prompt("Ship the parcel"), 1);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn bad_keys_and_windows_are_dead_letters_naming_the_field() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    for (payload, says) in [
        (
            r#"{"v":1,"prompt":"a","idempotency_key":""}"#,
            "field `idempotency_key` is wrong: is empty",
        ),
        (
            r#"{"v":1,"prompt":"b","idempotency_window":"1h"}"#,
            "field `idempotency_window` is wrong: needs idempotency_key",
        ),
        (
            r#"{"v":1,"prompt":"c","idempotency_key":"k","idempotency_window":"90d"}"#,
            "field `idempotency_window` is wrong: 90d is not between 1s and 30d",
        ),
    ] {
        env.xadd("task", payload.as_bytes()).await.unwrap();
        env.dead_letter_saying(says, WAIT).await.unwrap();
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn llmq_submit_takes_a_key_and_a_second_submit_gets_the_first_answer() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let submit = |key: &'static str| {
        let queue = env.queue.clone();
        let env = &env;
        async move {
            env.cli(&[
                "submit",
                "--prompt",
                "Draft the release note",
                "--model",
                "mock-fast",
                "--queue",
                &queue,
                "--idempotency-key",
                key,
                "--wait",
                "--format",
                "json",
            ])
            .await
        }
    };
    let (code, out) = submit("note-3.1").await;
    assert_eq!(code, 0, "{out}");
    let first: TaskRecord = serde_json::from_str(&out).unwrap();
    let (code, out) = submit("note-3.1").await;
    assert_eq!(code, 0, "{out}");
    let second: TaskRecord = serde_json::from_str(&out).unwrap();
    assert_eq!(second.duplicate_of, Some(first.task_id));
    assert_eq!(env.mock.calls_with_prompt("Draft the release note"), 1);
    let (code, out) = env
        .cli(&[
            "submit",
            "--prompt",
            "x",
            "--queue",
            &env.queue,
            "--idempotency-key",
            "k",
            "--idempotency-window",
            "forever",
        ])
        .await;
    assert_eq!(code, 2, "{out}");
    worker.stop().await.unwrap();
}

/// The key's bound, over a seeded generator of workloads: however many copies of each keyed
/// task arrive, in whatever order, on however many concurrent slots, and whether the first
/// call of a key fails (then retried, holding the key), each key's task is called once (twice
/// when its first call fails, both by the one task) and every copy ends with that task's
/// answer.
#[tokio::test]
async fn each_key_runs_once_whatever_the_copies_order_concurrency_and_failures() {
    let mut rng = SeededRng(0x1DE3_9073_0000_0038);
    for case in 0..6 {
        let env = TestEnv::new().await.unwrap();
        let mut settings = env.settings();
        let concurrency = 1 + rng.below(8);
        settings.concurrency = concurrency;
        let worker = llmq_tests::harness::WorkerHandle::start(settings);
        let keys: Vec<(String, String, u64)> = (0..1 + rng.below(4))
            .map(|i| {
                let (prompt, calls) = match rng.below(3) {
                    0 => (format!("Task {i} of case {case}"), 1),
                    1 => (format!("Task {i} of case {case} [[mock:slow-300]]"), 1),
                    _ => (format!("Task {i} of case {case} [[mock:flaky-1]]"), 2),
                };
                (format!("key-{i}"), prompt, calls)
            })
            .collect();
        let mut sends: Vec<usize> = keys
            .iter()
            .enumerate()
            .flat_map(|(k, _)| std::iter::repeat_n(k, 1 + rng.below(6)))
            .collect();
        rng.shuffle(&mut sends);
        let mut ids = Vec::new();
        for &k in &sends {
            ids.push(send(&env, &keys[k].1, &keys[k].0, "").await);
        }
        let records = finals(&env, &ids).await;
        worker.stop().await.unwrap();
        let what = format!("case {case}: concurrency {concurrency}, {keys:?}, {sends:?}");
        assert!(
            records.iter().all(|r| r.status == Status::Succeeded),
            "{what}: {records:?}"
        );
        for (k, (_, prompt, calls)) in keys.iter().enumerate() {
            assert_eq!(
                env.mock.calls_with_prompt(prompt),
                *calls,
                "{what}: {prompt}"
            );
            let rs: Vec<_> = sends
                .iter()
                .zip(&records)
                .filter(|(s, _)| **s == k)
                .map(|(_, r)| r)
                .collect();
            let ran: Vec<_> = rs.iter().filter(|r| r.duplicate_of.is_none()).collect();
            assert_eq!(ran.len(), 1, "{what}: {prompt}: {rs:?}");
            assert!(
                rs.iter().all(|r| r.output == ran[0].output
                    && (r.duplicate_of.is_none() || r.duplicate_of == Some(ran[0].task_id))),
                "{what}: {prompt}: {rs:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_chain_submitted_twice_with_one_key_is_one_chain_and_runs_again_once_it_failed() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let chain = |key: &str, prompt: &str, then: &str| {
        serde_json::json!({"v": 1, "idempotency_key": key, "defaults": {"model": "mock-fast", "max_attempts": 1},
            "steps": [{"name": "plan", "prompt": prompt}, {"name": "write", "after": ["plan"], "prompt": then}]})
        .to_string()
    };
    // Submitted twice, as a producer that retried: one chain, named by its key.
    let spec = chain("release-42", "Plan release 42", "Write: {{plan.output}}");
    env.xadd("chain", spec.as_bytes()).await.unwrap();
    env.xadd("chain", spec.as_bytes()).await.unwrap();
    let id = llmq_shared::idempotency::chain_id(&env.queue, None, "release-42").to_string();
    let ended = env.chain_ended(&id, WAIT).await;
    assert_eq!(ended.state, "succeeded", "{ended:#?}");
    env.eventually("the stream drained", WAIT, || async {
        env.stream_len().await == 0
    })
    .await
    .unwrap();
    assert_eq!(env.mock.calls_with_prompt("Plan release 42"), 1);
    let (code, out) = env.cli(&["chain", "list", "--queue", &env.queue]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches(&id).count(), 1, "{out}");

    // A chain whose first step fails both its tries: failed, its second step cancelled.
    // Submitted again with its key, both run again (the flaky step answers the third call).
    let spec = chain(
        "release-43",
        "Plan release 43 [[mock:flaky-2]]",
        "Write the notes",
    );
    env.xadd("chain", spec.as_bytes()).await.unwrap();
    let id = llmq_shared::idempotency::chain_id(&env.queue, None, "release-43").to_string();
    let ended = env.chain_ended(&id, WAIT).await;
    assert_eq!(ended.state, "failed", "{ended:#?}");
    env.xadd("chain", spec.as_bytes()).await.unwrap();
    env.eventually("the chain ran again", WAIT, || async {
        env.redis
            .chain(&env.keys, &id)
            .await
            .unwrap()
            .is_some_and(|c| c.state == "succeeded")
    })
    .await
    .unwrap();
    assert_eq!(
        env.mock
            .calls_with_prompt("Plan release 43 [[mock:flaky-2]]"),
        3
    );
    assert_eq!(env.mock.calls_with_prompt("Write the notes"), 1);
    worker.stop().await.unwrap();
}

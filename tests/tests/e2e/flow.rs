//! The user's path end to end, against the real Redis, Postgres and llmq-mock over HTTP:
//! submit, wait, results, retries, dead letters, replay, delays, batches, status.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq_shared::outcome::{ErrorClass, Status, TaskRecord};
use llmq_tests::harness::{AsTaskId, TestEnv};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn record(json: &str) -> TaskRecord {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("not a record ({e}): {json}"))
}

/// A task's tenant and tags are kept with it and with each of its calls in the ledger, as
/// the envelope carries them; a bad tag is refused before anything is enqueued.
#[tokio::test]
async fn the_ledger_keeps_each_task_and_call_s_tenant_and_tags() {
    let env = TestEnv::new().await.unwrap();
    let _worker = env.worker();
    let (code, out) = env
        .cli(&[
            "submit",
            "--prompt",
            "Tag me",
            "--queue",
            &env.queue,
            "--tenant",
            "acme",
            "--tag",
            "team=search",
            "--tag",
            "feature=summaries",
            "--wait",
            "--format",
            "json",
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let r = record(&out);
    let want = serde_json::json!({"team": "search", "feature": "summaries"});
    let call: (Option<String>, Option<Value>) =
        sqlx::query_as("SELECT tenant, tags FROM provider_calls WHERE task_id = $1")
            .bind(r.task_id)
            .fetch_one(env.ledger.pool())
            .await
            .unwrap();
    assert_eq!(call, (Some("acme".into()), Some(want.clone())));
    env.eventually("the task's row", WAIT, || async {
        let task: Option<(Option<String>, Option<Value>)> =
            sqlx::query_as("SELECT tenant, tags FROM tasks WHERE task_id = $1")
                .bind(r.task_id)
                .fetch_optional(env.ledger.pool())
                .await
                .unwrap();
        task == Some((Some("acme".into()), Some(want.clone())))
    })
    .await
    .unwrap();
    for (tag, says) in [
        ("team search", "write it as NAME=VALUE"),
        ("team name=x", "name a tag with"),
        ("team=", "leave the tag out"),
    ] {
        let args = ["llmq", "submit", "--prompt", "x", "--tag", tag];
        let refused = <llmq::cli::Cli as clap::Parser>::try_parse_from(args)
            .unwrap_err()
            .to_string();
        assert!(refused.contains(says), "{tag}: {refused}");
    }
}

#[tokio::test]
async fn submit_wait_prints_the_result_and_bills_the_call() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let (code, out) = env
        .cli(&[
            "submit",
            "--prompt",
            "Summarise the logs",
            "--queue",
            &env.queue,
            "--type",
            "research",
            "--wait",
            "--format",
            "json",
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let r = record(&out);
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.provider.as_deref(), Some("mock"));
    assert_eq!(
        r.model.as_deref(),
        Some("mock-fast"),
        "the cheapest model is the default"
    );
    assert_eq!(
        r.output.as_deref(),
        Some("mock answer from mock-fast: Summarise the logs")
    );
    assert_eq!(r.task_type.as_deref(), Some("research"));
    assert!(r.input_tokens > 0 && r.output_tokens > 0);
    let want = (r.input_tokens as f64 * 0.15 + r.output_tokens as f64 * 0.60) / 1e6;
    assert!(
        (r.cost_usd - want).abs() < 1e-12,
        "{} vs {want}",
        r.cost_usd
    );

    let calls = env.calls().await.unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, r.task_id.uuid());
    assert!((calls[0].6 - r.cost_usd).abs() < 1e-9);

    // The text layout shows what the issue asks for.
    let (code, text) = env
        .cli(&["result", &r.task_id.to_string(), "--queue", &env.queue])
        .await;
    assert_eq!(code, 0);
    for label in [
        "Task ID:",
        "Provider:  mock",
        "Model:     mock-fast",
        "Success:   yes",
        "Duration:",
        "Tokens:",
        "Cost:",
        "Output:",
    ] {
        assert!(text.contains(label), "missing {label} in\n{text}");
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn result_json_has_the_documented_fields() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let (_, out) = env
        .cli(&[
            "submit", "--prompt", "x", "--queue", &env.queue, "--wait", "--format", "json",
        ])
        .await;
    let v: Value = serde_json::from_str(&out).unwrap();
    for field in [
        "task_id",
        "status",
        "provider",
        "model",
        "output",
        "error",
        "attempts",
        "input_tokens",
        "output_tokens",
        "cost_usd",
    ] {
        assert!(v.get(field).is_some(), "result JSON lacks `{field}`: {out}");
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_fatal_error_dies_at_once_and_exit_code_is_1() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let (code, out) = env
        .cli(&[
            "submit", "--prompt", "x", "--model", "fail-400", "--queue", &env.queue, "--wait",
            "--format", "json",
        ])
        .await;
    assert_eq!(code, 1, "{out}");
    let r = record(&out);
    assert_eq!(r.status, Status::Dead);
    assert_eq!(r.error_class, Some(ErrorClass::Fatal));
    assert_eq!(r.attempts, 1, "a 400 is not retried");
    assert!(
        r.error.as_deref().unwrap_or_default().contains("HTTP 400"),
        "{:?}",
        r.error
    );
    let (code, list) = env
        .cli(&["dlq", "list", "--queue", &env.queue, "--format", "json"])
        .await;
    assert_eq!(code, 0);
    let dead: Vec<Value> = serde_json::from_str(&list).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["task_id"], r.task_id.to_string());
    assert_eq!(dead[0]["class"], "fatal");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn retries_then_dead_letter_then_replay_succeeds() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    // flaky-4 fails the first four calls of a conversation. The mock provider file allows
    // two tries per provider, so each of the two attempts makes two calls and the task
    // dies; the replay's first call is the fifth, which succeeds.
    let (code, out) = env
        .cli(&[
            "submit",
            "--prompt",
            "retry me",
            "--model",
            "flaky-4",
            "--max-attempts",
            "2",
            "--queue",
            &env.queue,
            "--wait",
            "--format",
            "json",
        ])
        .await;
    assert_eq!(code, 1, "{out}");
    let r = record(&out);
    assert_eq!(r.status, Status::Dead);
    assert_eq!(r.attempts, 2);
    assert_eq!(r.error_class, Some(ErrorClass::Retryable));
    let error = r.error.clone().unwrap_or_default();
    assert!(error.starts_with("gave up after 2 attempts"), "{error}");
    assert_eq!(
        r.provider_errors.len(),
        2,
        "each failed call of the last attempt is kept"
    );
    assert_eq!(
        env.calls().await.unwrap().len(),
        4,
        "every call is billed, once"
    );

    let (code, _) = env
        .cli(&[
            "dlq",
            "replay",
            &r.task_id.to_string(),
            "--queue",
            &env.queue,
        ])
        .await;
    assert_eq!(code, 0);
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!(counts.dead, 0, "the dead letter is gone once re-enqueued");
    let again = env.wait_final(&r.task_id, WAIT).await.unwrap();
    assert_eq!(again.status, Status::Succeeded, "{again:?}");
    assert_eq!(again.attempts, 1, "a replay starts its attempts afresh");

    // Replays are new calls, not duplicates of the first run's.
    let calls = env.calls().await.unwrap();
    let keys: Vec<(i32, i32, i32)> = calls.iter().map(|c| (c.1, c.2, c.3)).collect();
    assert_eq!(
        keys,
        vec![(0, 1, 1), (0, 1, 2), (0, 2, 1), (0, 2, 2), (1, 1, 1)]
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_rate_limit_waits_without_using_attempts() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    // rate-limit-ms always answers 429 with `retry-after-ms: 200`.
    let (code, id) = env
        .cli(&[
            "submit",
            "--prompt",
            "limited",
            "--model",
            "rate-limit-ms",
            "--max-attempts",
            "1",
            "--queue",
            &env.queue,
        ])
        .await;
    assert_eq!(code, 0);
    let id = id.trim().to_owned();
    // With one attempt, a fatal or retryable error would kill it at once. A rate limit is
    // waited out in the worker (three Retry-Afters), then the task waits in delayed, its
    // attempt unused.
    env.eventually("the task waiting in delayed", WAIT, || async {
        // None for the instant the task moves from the stream to delayed: look again.
        env.redis
            .task(&env.keys, id.tid())
            .await
            .unwrap()
            .is_some_and(|r| r.error_class == Some(ErrorClass::RateLimited) && !r.status.is_final())
    })
    .await
    .unwrap();
    let r = env.redis.task(&env.keys, id.tid()).await.unwrap().unwrap();
    assert_eq!(r.attempts, 0, "{r:?}");
    assert!(
        env.mock.calls("rate-limit-ms") >= 4,
        "Retry-After was honoured in the worker first"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_becomes_dead_letters_and_the_tasks_behind_still_run() {
    let env = TestEnv::new().await.unwrap();
    let mut settings = env.settings();
    settings.max_payload_bytes = 4096;
    let worker = llmq_tests::harness::WorkerHandle::start(settings);
    let big = format!(r#"{{"v":1,"prompt":"{}"}}"#, "x".repeat(5000));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("task", b"this is not json".to_vec(), "not valid JSON"),
        ("task", br#"{"v":2,"prompt":"hi"}"#.to_vec(), "version 2"),
        ("task", br#"{"v":1}"#.to_vec(), "no prompt"),
        (
            "task",
            br#"{"v":1,"prompt":"hi","type":"poetry"}"#.to_vec(),
            "unknown task type `poetry`",
        ),
        (
            "task",
            br#"{"v":1,"prompt":"hi","max_attempts":"three"}"#.to_vec(),
            "field `max_attempts` is wrong",
        ),
        ("task", big.into_bytes(), "over the 4096-byte limit"),
        (
            "payload",
            br#"{"v":1,"prompt":"hi"}"#.to_vec(),
            "no `task` field",
        ),
        (
            "task",
            br#"{"v":1,"prompt":"hi","provider":"nowhere"}"#.to_vec(),
            "provider `nowhere` is not in the provider file",
        ),
    ];
    for (field, payload, _) in &cases {
        env.xadd(field, payload).await.unwrap();
    }
    let good = uuid::Uuid::new_v4().to_string();
    env.xadd(
        "task",
        format!(r#"{{"v":1,"id":"{good}","prompt":"still fine"}}"#).as_bytes(),
    )
    .await
    .unwrap();
    let r = env.wait_final(&good, WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded);
    env.eventually("every bad task dead", WAIT, || async {
        env.redis
            .counts(&env.keys)
            .await
            .map(|c| c.dead)
            .unwrap_or(0)
            == cases.len() as u64
    })
    .await
    .unwrap();
    let dead = env.redis.dead_letters(&env.keys, 100).await.unwrap();
    for (_, _, reason) in &cases {
        assert!(
            dead.iter().any(|d| d.error.contains(reason)),
            "no dead letter says `{reason}`: {dead:#?}"
        );
    }
    let invalid = dead.iter().filter(|d| d.class == "invalid").count();
    assert_eq!(
        invalid,
        cases.len() - 1,
        "all but the unroutable one are invalid input"
    );
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!(
        (counts.ready, counts.in_flight, counts.delayed),
        (0, 0, 0),
        "nothing lost or stuck"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_delayed_task_waits_then_runs_with_only_workers() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let before = chrono::Utc::now();
    let (code, id) = env
        .cli(&[
            "submit", "--prompt", "later", "--delay", "1500ms", "--queue", &env.queue,
        ])
        .await;
    assert_eq!(code, 0);
    let id = id.trim().to_owned();
    let now = env.redis.task(&env.keys, id.tid()).await.unwrap().unwrap();
    assert_eq!(now.status, Status::Delayed);
    let r = env.wait_final(&id, WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded);
    let ran_after = r.finished_at.unwrap() - before;
    assert!(
        ran_after >= chrono::Duration::milliseconds(1500),
        "ran after only {ran_after}"
    );

    // A producer that XADDs a future run_at straight into the stream is honoured too.
    let id2 = uuid::Uuid::new_v4().to_string();
    let run_at = (chrono::Utc::now() + chrono::Duration::milliseconds(1200)).to_rfc3339();
    env.xadd(
        "task",
        format!(r#"{{"v":1,"id":"{id2}","prompt":"p","run_at":"{run_at}"}}"#).as_bytes(),
    )
    .await
    .unwrap();
    let r2 = env.wait_final(&id2, WAIT).await.unwrap();
    assert!(r2.finished_at.unwrap() >= chrono::DateTime::parse_from_rfc3339(&run_at).unwrap());
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn batch_wait_writes_the_report() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let dir = std::env::temp_dir();
    let input = dir.join(format!("{}-in.json", env.queue));
    let output = dir.join(format!("{}-out.json", env.queue));
    std::fs::write(
        &input,
        r#"[
          {"prompt": "one", "type": "code_review"},
          {"prompt": "two", "model": "mock-smart", "metadata": {"ticket": 7}},
          {"prompt": "three", "platform": "mock", "timeout": 30},
          {"prompt": "broken", "model": "fail-401"}
        ]"#,
    )
    .unwrap();
    let (code, out) = env
        .batch(&input, &["--output", output.to_str().unwrap(), "--wait"])
        .await;
    assert_eq!(code, 1, "one task failed: {out}");
    assert!(
        out.contains("Succeeded:     3") && out.contains("Failed:        1"),
        "{out}"
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    assert_eq!(report["total_tasks"], 4);
    assert_eq!(report["success_count"], 3);
    assert_eq!(report["failure_count"], 1);
    assert_eq!(report["success_rate"], 75.0);
    assert_eq!(report["results"].as_array().unwrap().len(), 4);
    let ledger_total: f64 = env.calls().await.unwrap().iter().map(|c| c.6).sum();
    assert!((report["total_cost"].as_f64().unwrap() - ledger_total).abs() < 1e-9);
    assert!(report["total_duration"].as_f64().unwrap() > 0.0);

    // A bad batch file is refused whole, naming the task.
    std::fs::write(
        &input,
        r#"[{"prompt": "ok"}, {"prompt": "x", "type": "poetry"}]"#,
    )
    .unwrap();
    let (code, _) = env.batch(&input, &[]).await;
    assert_eq!(code, 2);
    assert_eq!(
        env.redis.counts(&env.keys).await.unwrap().ready,
        0,
        "nothing enqueued"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn status_shows_queue_depths_and_live_workers() {
    let env = TestEnv::new().await.unwrap();
    for i in 0..3 {
        env.cli(&[
            "submit",
            "--prompt",
            &format!("p{i}"),
            "--queue",
            &env.queue,
        ])
        .await;
    }
    env.cli(&[
        "submit", "--prompt", "later", "--delay", "1h", "--queue", &env.queue,
    ])
    .await;
    let (code, out) = env
        .cli(&["status", "--queue", &env.queue, "--format", "json"])
        .await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    let q = &v["queues"][0];
    assert_eq!(
        (
            q["ready"].as_u64(),
            q["delayed"].as_u64(),
            q["workers"].as_u64()
        ),
        (Some(3), Some(1), Some(0))
    );
    let worker = env.worker();
    env.eventually("a live worker and an empty stream", WAIT, || async {
        let (_, out) = env
            .cli(&["status", "--queue", &env.queue, "--format", "json"])
            .await;
        let v: Value = serde_json::from_str(&out).unwrap_or_default();
        v["queues"][0]["workers"] == 1
            && v["queues"][0]["ready"] == 0
            && v["queues"][0]["in_flight"] == 0
    })
    .await
    .unwrap();
    worker.stop().await.unwrap();
    let (_, out) = env
        .cli(&["status", "--queue", &env.queue, "--format", "json"])
        .await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["queues"][0]["workers"], 0, "a stopped worker deregisters");
}

#[tokio::test]
async fn dlq_purge_by_id_and_age() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let mut ids = Vec::new();
    for i in 0..3 {
        let (_, out) = env
            .cli(&[
                "submit",
                "--prompt",
                &format!("d{i}"),
                "--model",
                "fail-401",
                "--queue",
                &env.queue,
                "--wait",
                "--format",
                "json",
            ])
            .await;
        ids.push(record(&out).task_id);
    }
    let (code, out) = env
        .cli(&["dlq", "purge", &ids[0].to_string(), "--queue", &env.queue])
        .await;
    assert_eq!(
        (code, out.trim()),
        (
            0,
            format!("purged 1 dead letter(s) from queue `{}`", env.queue).as_str()
        )
    );
    let r = env
        .redis
        .task(&env.keys, ids[0].tid())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        r.status,
        Status::Failed,
        "a purged dead letter's task reads as failed"
    );
    let (code, _) = env
        .cli(&["dlq", "purge", "--older-than", "1h", "--queue", &env.queue])
        .await;
    assert_eq!(code, 0);
    assert_eq!(
        env.redis.counts(&env.keys).await.unwrap().dead,
        2,
        "younger ones are kept"
    );
    let (code, _) = env
        .cli(&["dlq", "purge", "--older-than", "0s", "--queue", &env.queue])
        .await;
    assert_eq!(code, 0);
    assert_eq!(env.redis.counts(&env.keys).await.unwrap().dead, 0);
    let (code, _) = env
        .cli(&["dlq", "replay", "no-such-id", "--queue", &env.queue])
        .await;
    assert_eq!(code, 2, "replaying an unknown id is an error");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn bad_arguments_exit_2_with_the_list_of_types() {
    use clap::Parser;
    let err =
        llmq::cli::Cli::try_parse_from(["llmq", "submit", "--prompt", "x", "--type", "poetry"])
            .unwrap_err();
    assert_eq!(err.exit_code(), 2);
    let text = err.to_string();
    for t in llmq_shared::envelope::TaskType::ALL {
        assert!(text.contains(t.as_str()), "{text}");
    }
}

#[tokio::test]
async fn a_worker_refuses_an_unmigrated_database() {
    let env = TestEnv::new().await.unwrap();
    llmq_tests::harness::create_database("llmq_test_unmigrated")
        .await
        .unwrap();
    let mut settings = env.settings();
    settings.database_url = Some(format!(
        "{}/llmq_test_unmigrated",
        llmq_tests::harness::pg_server()
    ));
    let err = llmq_worker::run(settings, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("run `llmq migrate` first"), "{err}");
}

#[tokio::test]
async fn status_checks_each_provider_and_dlq_show_prints_one_letter() {
    let env = TestEnv::new().await.unwrap();
    let path = std::env::temp_dir().join(format!("{}-status.yaml", env.queue));
    // The mock provider file, plus a provider nothing answers for, before `routing:`.
    let text = include_str!("../../../examples/providers.mock.yaml")
        .replace("${LLMQ_MOCK_URL:-http://127.0.0.1:8089}", &env.mock.url());
    let (providers, routing) = text.split_once("\n# Short waits").unwrap();
    let url = env.mock.url();
    let gone = format!(
        "  - name: gone\n    kind: openai_compatible\n    base_url: http://127.0.0.1:9/v1\n    models: [{{id: x, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}]\n\
         \x20 - {{name: claude, kind: anthropic, base_url: \"{url}\", api_key: k, models: [{{id: m, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}]}}\n\
         \x20 - {{name: google, kind: gemini, base_url: \"{url}/v1beta\", api_key: k, models: [{{id: m, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}]}}\n\
         \x20 - {{name: local, kind: ollama, base_url: \"{url}\", models: [{{id: m, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}]}}\n\
         \x20 - {{name: shell, kind: command, command: {{program: sh}}, models: [{{id: m, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}]}}\n\
         \x20 - {{name: nocli, kind: command, command: {{program: llmq-no-such-cli}}, models: [{{id: m, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}]}}\n"
    );
    std::fs::write(
        &path,
        format!("{providers}\n{gone}\n# Short waits{routing}"),
    )
    .unwrap();
    let (code, out) = env
        .cli(&[
            "status",
            "--queue",
            &env.queue,
            "--config",
            path.to_str().unwrap(),
            "--format",
            "json",
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let providers = v["providers"].as_array().unwrap();
    let find = |n: &str| providers.iter().find(|p| p["name"] == n).unwrap().clone();
    assert_eq!(find("mock")["ready"], true, "{out}");
    assert_eq!(find("gone")["ready"], false, "{out}");
    assert!(
        find("gone")["detail"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{out}"
    );
    // Each kind is asked the way it answers: Anthropic /v1/models, Gemini /models with its
    // key header, Ollama /api/tags, a CLI by looking it up on PATH.
    for ready in ["claude", "google", "local", "shell"] {
        assert_eq!(find(ready)["ready"], true, "{ready}: {out}");
    }
    assert_eq!(find("nocli")["ready"], false, "{out}");
    assert!(
        find("nocli")["detail"]
            .as_str()
            .unwrap()
            .contains("not installed or not on PATH"),
        "{out}"
    );

    let worker = env.worker();
    let (_, out) = env
        .cli(&[
            "submit", "--prompt", "show me", "--model", "fail-404", "--queue", &env.queue,
            "--wait", "--format", "json",
        ])
        .await;
    let id = record(&out).task_id;
    let (code, shown) = env
        .cli(&["dlq", "show", &id.to_string(), "--queue", &env.queue])
        .await;
    assert_eq!(code, 0);
    for want in [
        format!("Task ID:     {id}"),
        "Class:       fatal".to_owned(),
        "HTTP 404".to_owned(),
        "\"prompt\": \"show me\"".to_owned(),
    ] {
        assert!(shown.contains(&want), "no `{want}` in\n{shown}");
    }
    let (code, _) = env
        .cli(&["dlq", "show", "no-such-letter", "--queue", &env.queue])
        .await;
    assert_eq!(code, 1);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn wait_timeout_exits_1_and_batch_without_wait_lists_the_ids() {
    let env = TestEnv::new().await.unwrap();
    // No worker: nothing finishes.
    let (code, _) = env
        .cli(&[
            "submit",
            "--prompt",
            "nobody runs me",
            "--queue",
            &env.queue,
            "--wait",
            "--wait-timeout",
            "300ms",
        ])
        .await;
    assert_eq!(
        code, 1,
        "a task still queued at the wait timeout is not a success"
    );

    let input = std::env::temp_dir().join(format!("{}-ids-in.json", env.queue));
    let output = std::env::temp_dir().join(format!("{}-ids-out.txt", env.queue));
    std::fs::write(&input, r#"[{"prompt": "a"}, {"prompt": "b"}]"#).unwrap();
    let (code, out) = env
        .batch(&input, &["--output", output.to_str().unwrap()])
        .await;
    assert_eq!(code, 0);
    let ids: Vec<&str> = out.lines().collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        out,
        "--output holds the same ids"
    );
    for id in ids {
        let r = env.redis.task(&env.keys, id.tid()).await.unwrap().unwrap();
        assert_eq!(r.status, Status::Queued);
    }
}

#[tokio::test]
async fn providers_check_refuses_a_cron_expression_the_scheduler_would_refuse() {
    let env = TestEnv::new().await.unwrap();
    // The binary, as an operator runs it.
    let path = std::env::temp_dir().join(format!("{}-cron.yaml", env.queue));
    // Six fields with a seventh (a year): croner refuses it, and so must the check.
    std::fs::write(
        &path,
        "providers:\n  - {name: p, kind: ollama, models: [{id: m, input_usd_per_mtok: 0, output_usd_per_mtok: 0}]}\nscheduler:\n  recurring:\n    - {name: nightly, cron: \"0 2 * * * * 2030\", task: {prompt: Report}}\n",
    )
    .unwrap();
    let out = std::process::Command::new(llmq_tests::harness::binary("llmq"))
        .args(["providers", "check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:scheduler.recurring[0].cron: ", path.display())),
        "{stderr}"
    );
    drop(env);
}

/// Answers after a sleep that ends at one instant for every call, counting how often the
/// sleeps are polled. The instant is set once every call has started (by the last to start,
/// a second ahead), so that all of them are in flight when it comes however slowly the
/// worker takes them in: with a fixed instant, a machine slow enough to start the calls
/// after it would poll each sleep once and pass with the fix or without it.
struct AtOnce {
    calls: usize,
    started: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    at: tokio::sync::watch::Sender<Option<tokio::time::Instant>>,
    polls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl llmq_shared::provider::Provider for AtOnce {
    fn name(&self) -> &str {
        "mock"
    }

    fn complete<'a>(
        &'a self,
        _: &'a llmq_shared::provider::Request<'_>,
    ) -> llmq_shared::provider::CallFuture<'a> {
        let polls = std::sync::Arc::clone(&self.polls);
        Box::pin(async move {
            let mut at = self.at.subscribe();
            if self
                .started
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1
                == self.calls
            {
                let when = tokio::time::Instant::now() + Duration::from_secs(1);
                self.at.send_replace(Some(when));
            }
            let when = (*at
                .wait_for(Option::is_some)
                .await
                .expect("the sender lives"))
            .expect("the instant is set");
            let mut sleep = Box::pin(tokio::time::sleep_until(when));
            std::future::poll_fn(|cx| {
                polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                sleep.as_mut().poll(cx)
            })
            .await;
            Ok(llmq_shared::provider::Completion {
                text: "ok".into(),
                ..Default::default()
            })
        })
    }
}

/// A call is polled only when it can move: once to wait, and once its answer is there,
/// however many calls end at once. apalis runs every task in one tokio task, whose
/// cooperative budget the tasks would share: once a burst had spent it, each call polled
/// after it answered "not yet" and was polled again a turn later (worker/src/backend.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_end_at_once_are_polled_only_to_start_and_to_end() {
    let env = TestEnv::new().await.unwrap();
    let n = 2000;
    let polls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut s = env.settings();
    s.concurrency = n;
    s.visibility_timeout = Duration::from_secs(60);
    s.provider_overrides = vec![(
        "mock".into(),
        std::sync::Arc::new(AtOnce {
            calls: n,
            started: std::sync::Arc::default(),
            at: tokio::sync::watch::Sender::new(None),
            polls: std::sync::Arc::clone(&polls),
        }),
    )];
    let tasks: Vec<_> = (0..n)
        .map(|i| llmq_shared::envelope::Envelope::new(format!("task {i}")))
        .collect();
    env.redis.enqueue_many(&env.keys, &tasks).await.unwrap();
    let worker = llmq_tests::harness::WorkerHandle::start(s);
    for t in &tasks {
        let id = t.id.unwrap();
        let r = env.wait_final(&id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
    worker.stop().await.unwrap();
    let polls = polls.load(std::sync::atomic::Ordering::Relaxed);
    assert!(polls <= 2 * n, "{polls} polls for {n} calls");
}

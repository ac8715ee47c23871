//! Batch controls: a fleet-wide parallelism cap (`llmq batch --parallel`, i.e. a concurrency
//! key on every task of the batch), held across workers and through a worker's SIGKILL.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq_shared::envelope::Envelope;
use llmq_shared::ids::TaskId;
use llmq_shared::outcome::{Status, TaskRecord};
use llmq_tests::harness::{TestEnv, WorkerProcess};

const WAIT: Duration = Duration::from_secs(60);

async fn finish_all(env: &TestEnv, ids: &[TaskId]) -> Vec<TaskRecord> {
    llmq::wait_for(&env.redis, &env.keys, ids, Some(WAIT), |_| {})
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every task finishes"))
        .collect()
}

/// How many entries the worker process `w` holds.
async fn held_by(env: &TestEnv, w: &WorkerProcess) -> usize {
    let tag = format!("-{}-", w.child.id());
    let pending = env.pending().await.unwrap();
    pending.iter().filter(|(_, who)| who.contains(&tag)).count()
}

#[tokio::test]
async fn a_parallel_3_batch_never_has_more_than_3_calls_open_across_workers_and_a_kill() {
    let env = TestEnv::new().await.unwrap();
    let args = ["--concurrency", "16", "--visibility-timeout", "1s"];
    let mut workers = vec![
        WorkerProcess::spawn(&env, &args).unwrap(),
        WorkerProcess::spawn(&env, &args).unwrap(),
    ];
    let tasks: Vec<serde_json::Value> = (0..40)
        .map(|i| serde_json::json!({"prompt": format!("batch task {i}"), "model": "slow-300"}))
        .collect();
    let input = std::env::temp_dir().join(format!("llmq-{}-batch.json", env.queue));
    std::fs::write(&input, serde_json::to_string(&tasks).unwrap()).unwrap();
    let (code, listing) = env.batch(&input, &["--parallel", "3"]).await;
    assert_eq!(code, 0, "{listing}");
    let ids: Vec<TaskId> = listing.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(ids.len(), 40);

    // Other work of the same queue is not held up by the batch.
    let others: Vec<Envelope> = (0..6)
        .map(|i| {
            let mut e = Envelope::new(format!("other task {i}"));
            e.model = Some("mock-fast".into());
            e
        })
        .collect();
    env.redis.enqueue_many(&env.keys, &others).await.unwrap();
    let other_ids: Vec<TaskId> = others.iter().map(|e| e.id.unwrap()).collect();

    // Kill a worker while it holds batch tasks (and so slots), and start another.
    let victim = workers.remove(0);
    env.eventually("the victim holding a task", WAIT, || async {
        held_by(&env, &victim).await > 0
    })
    .await
    .unwrap();
    victim.signal("KILL").unwrap();
    drop(victim);
    workers.push(WorkerProcess::spawn(&env, &args).unwrap());

    let other_records = finish_all(&env, &other_ids).await;
    let records = finish_all(&env, &ids).await;
    assert!(
        records.iter().all(|r| r.status == Status::Succeeded),
        "{records:#?}"
    );
    assert!(other_records.iter().all(|r| r.status == Status::Succeeded));
    let last_other = other_records.iter().filter_map(|r| r.finished_at).max();
    let last_batch = records.iter().filter_map(|r| r.finished_at).max();
    assert!(
        last_other < last_batch,
        "the other tasks finished while the batch still ran"
    );

    let most = env.mock.max_open_calls("slow-300");
    assert!(
        (2..=3).contains(&most),
        "at most 3 of the batch's calls at once, and more than one: {most}"
    );
    // Nothing is left holding a slot or waiting for one.
    let mut c = env.redis.conn().await.unwrap();
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("llmq:{{{}}}:*", env.queue))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        !left
            .iter()
            .any(|k| k.contains(":held:") || k.contains(":parked")),
        "{left:?}"
    );
    let _ = std::fs::remove_file(input);
    drop(workers);
}

#[tokio::test]
async fn a_bad_concurrency_limit_is_a_dead_letter_with_a_reason() {
    let env = TestEnv::new().await.unwrap();
    let w = llmq_tests::harness::WorkerHandle::start(env.settings());
    for (payload, says) in [
        (
            r#"{"v":1,"prompt":"x","concurrency_key":"k","concurrency_limit":0}"#,
            "concurrency_limit",
        ),
        (
            r#"{"v":1,"prompt":"x","concurrency_key":"k"}"#,
            "needs a concurrency_limit",
        ),
    ] {
        env.xadd("task", payload.as_bytes()).await.unwrap();
        env.dead_letter_saying(says, WAIT).await.unwrap();
    }
    w.stop().await.unwrap();
}

/// A free tier at 85 % of its requests for the day, and a paid provider behind it.
fn quota_config(env: &TestEnv) -> (std::path::PathBuf, String, String) {
    let sfx = &env.queue[2..];
    let (free, paid) = (format!("free{sfx}"), format!("paid{sfx}"));
    let text = format!(
        r#"
providers:
  - name: {free}
    kind: openai_compatible
    base_url: {url}/v1
    api_key: k
    cost_tier: free
    quotas: {{requests_per_day: 20}}
    models:
      - {{id: mock-fast, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}
  - name: {paid}
    kind: openai_compatible
    base_url: {url}/v1
    api_key: k
    models:
      - {{id: mock-smart, input_usd_per_mtok: 3, output_usd_per_mtok: 15}}
"#,
        url = env.mock.url()
    );
    let path = std::env::temp_dir().join(format!("llmq-{}-quota.yaml", env.queue));
    std::fs::write(&path, text).unwrap();
    (path, free, paid)
}

#[tokio::test]
async fn a_batch_that_would_push_a_free_tier_past_90_percent_warns_and_without_yes_enqueues_nothing()
 {
    let env = TestEnv::new().await.unwrap();
    let (config, free, paid) = quota_config(&env);
    let day = llmq_shared::quota::day_label(chrono::Utc::now().date_naive());
    let mut c = env.redis.conn().await.unwrap();
    let used_key = llmq_shared::keys::ProviderKeys::new(&free).requests_on(&day);
    let _: () = redis::cmd("SET")
        .arg(&used_key)
        .arg(17)
        .arg("EX")
        .arg(3600)
        .query_async(&mut c)
        .await
        .unwrap();
    let tasks: Vec<serde_json::Value> = (0..5)
        .map(|i| serde_json::json!({"prompt": format!("quota task {i}"), "type": "documentation"}))
        .collect();
    let input = std::env::temp_dir().join(format!("llmq-{}-quota.json", env.queue));
    std::fs::write(&input, serde_json::to_string(&tasks).unwrap()).unwrap();
    let batch = |extra: &[&str]| {
        let mut args = vec![
            "batch",
            "--input",
            input.to_str().unwrap(),
            "--queue",
            &env.queue,
            "--config",
            config.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    // The `llmq` binary with no terminal on standard input, as in a script or CI.
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(llmq_tests::harness::binary("llmq"))
            .args(&args)
            .env("REDIS_URL", llmq_tests::harness::redis_url())
            .env_remove("LLMQ_CONFIG")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap();
        let code = out.status.code().unwrap_or(-1);
        (code, String::from_utf8_lossy(&out.stdout).into_owned())
    };

    // --dry-run: the estimate with its warnings, nothing enqueued.
    let (code, estimate) = run(batch(&["--dry-run"])).await;
    assert_eq!(code, 0, "{estimate}");
    assert!(estimate.contains(&free), "{estimate}");
    assert!(
        estimate.contains("requests_per_day would go from 85% to 110%"),
        "{estimate}"
    );
    assert!(
        estimate.contains("3 requests left today; the other 2 task(s)"),
        "{estimate}"
    );
    assert!(
        estimate.contains(&format!("fall through to {paid}")),
        "{estimate}"
    );
    assert_eq!(env.redis.counts(&env.keys).await.unwrap().ready, 0);

    // No terminal and no --yes: refused with exit 2, nothing enqueued.
    let (code, listing) = run(batch(&[])).await;
    assert_eq!(code, 2, "{listing}");
    assert!(listing.is_empty());
    assert_eq!(env.redis.counts(&env.keys).await.unwrap().ready, 0);

    // --yes: enqueued.
    let (code, listing) = run(batch(&["--yes"])).await;
    assert_eq!(code, 0);
    assert_eq!(listing.lines().count(), 5);
    assert_eq!(env.redis.counts(&env.keys).await.unwrap().ready, 5);

    let _: () = redis::cmd("DEL")
        .arg(&used_key)
        .query_async(&mut c)
        .await
        .unwrap();
    let _ = std::fs::remove_file(input);
    let _ = std::fs::remove_file(config);
}

#[tokio::test]
async fn output_to_a_directory_writes_a_timestamped_file_inside_it() {
    let env = TestEnv::new().await.unwrap();
    let dir = std::env::temp_dir().join(format!("llmq-{}-out", env.queue));
    let input = std::env::temp_dir().join(format!("llmq-{}-in.json", env.queue));
    std::fs::write(&input, r#"[{"prompt": "one"}, {"prompt": "two"}]"#).unwrap();
    let out_arg = format!("{}/", dir.display());
    let (code, listing) = env.batch(&input, &["--output", &out_arg]).await;
    assert_eq!(code, 0, "{listing}");
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].starts_with("batch_") && files[0].ends_with(".json"),
        "{files:?}"
    );
    let written = std::fs::read_to_string(dir.join(&files[0])).unwrap();
    assert_eq!(written, listing, "the file holds what was printed");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(input);
}

#[test]
fn parallel_0_is_refused_with_a_sentence() {
    use clap::Parser;
    let e =
        llmq::cli::Cli::try_parse_from(["llmq", "batch", "--input", "x.json", "--parallel", "0"])
            .unwrap_err()
            .to_string();
    assert!(e.contains("at least 1"), "{e}");
}

#[test]
fn a_batch_id_of_other_characters_is_refused_with_a_sentence() {
    use clap::Parser;
    for args in [
        ["llmq", "batch", "--input", "x.json", "--batch-id", "a b"],
        ["llmq", "costs", "--database-url", "x", "--batch", ""],
    ] {
        let e = llmq::cli::Cli::try_parse_from(args)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a batch id must be 1 to 128 letters, digits"),
            "{e}"
        );
    }
}

fn jsonl(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn task_line(i: usize) -> String {
    serde_json::json!({"custom_id": format!("req-{i}"), "prompt": format!("Summarise ticket {i}"), "model": "mock-fast"})
        .to_string()
}

/// `llmq batch --input -` fed `text` on standard input (the binary, as a shell pipe runs it).
fn batch_stdin(env: &TestEnv, text: &str, extra: &[&str]) -> (i32, String) {
    batch_binary(env, "-", text, extra)
}

/// `llmq batch --input <input>` run as a user runs it, `stdin` on its standard input: its
/// exit code and what it said on standard error.
fn batch_binary(env: &TestEnv, input: &str, stdin: &str, extra: &[&str]) -> (i32, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(llmq_tests::harness::binary("llmq"))
        .args([
            "--redis-url",
            &llmq_tests::harness::redis_url(),
            "batch",
            "--input",
            input,
        ])
        .args(["--queue", &env.queue])
        .args(extra)
        .env_remove("LLMQ_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_json_lines_file_is_checked_whole_and_a_bad_line_enqueues_nothing() {
    let env = TestEnv::new().await.unwrap();
    let path = std::env::temp_dir().join(format!("llmq-{}-tasks.jsonl", env.queue));
    let mut lines: Vec<String> = (0..5).map(task_line).collect();
    lines[3] = r#"{"custom_id": "req-3", "prompt": "x", "type": "poetry"}"#.into();
    std::fs::write(&path, jsonl(&lines)).unwrap();
    let (code, out) = env.batch(&path, &[]).await;
    assert_eq!(code, 2, "{out}");
    assert_eq!(env.stream_len().await, 0, "nothing of a bad file goes in");
    // Fixed, it goes in whole; the ids are the batch's and the custom ids'.
    lines[3] = task_line(3);
    std::fs::write(&path, jsonl(&lines)).unwrap();
    let (code, out) = env.batch(&path, &["--batch-id", "nightly-7"]).await;
    assert_eq!(code, 0, "{out}");
    let ids: Vec<TaskId> = out.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(ids.len(), 5);
    assert_eq!(env.stream_len().await, 5);
    let expected = uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("llmq-batch:{}:nightly-7:req-0", env.queue).as_bytes(),
    );
    assert_eq!(ids[0], expected.into());
    // The same batch again: nothing more goes in.
    let (code, out) = env.batch(&path, &["--batch-id", "nightly-7"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(env.stream_len().await, 5, "a rerun adds no entry twice");
    assert_eq!(out.lines().count(), 5, "it lists the batch's ids again");
}

#[tokio::test]
async fn a_stdin_batch_stopped_by_a_bad_line_resumes_with_its_batch_id_and_runs_each_task_once() {
    let env = TestEnv::new().await.unwrap();
    let mut lines: Vec<String> = (0..2500).map(task_line).collect();
    lines[1700] = "{\"prompt\": \"cut off".into();
    let (code, err) = batch_stdin(&env, &jsonl(&lines), &["--batch-id", "import-1"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("line 1701") && err.contains("1700 tasks of batch import-1 are enqueued"),
        "{err}"
    );
    assert!(err.contains("--batch-id import-1"), "{err}");
    assert_eq!(
        env.stream_len().await,
        1700,
        "everything before the bad line"
    );
    // Rerun whole, fixed: only the rest goes in.
    lines[1700] = task_line(1700);
    let (code, err) = batch_stdin(&env, &jsonl(&lines), &["--batch-id", "import-1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("the first 1700 tasks were enqueued by an earlier run"),
        "{err}"
    );
    assert_eq!(env.stream_len().await, 2500);
    let worker = env.worker();
    let ids: Vec<TaskId> = (0..2500)
        .map(|i| {
            uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_OID,
                format!("llmq-batch:{}:import-1:req-{i}", env.queue).as_bytes(),
            )
            .into()
        })
        .collect();
    let records = finish_all(&env, &ids).await;
    assert!(
        records
            .iter()
            .all(|r| r.status == Status::Succeeded && r.duplicate_of.is_none())
    );
    assert_eq!(env.mock.calls_with_prompt("Summarise ticket 1700"), 1);
    assert_eq!(env.mock.calls_with_prompt("Summarise ticket 0"), 1);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_chunk_of_large_tasks_goes_in_several_scripts_each_marking_its_progress() {
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    // 70 tasks of 512 KiB: over the 32 MiB one script carries, so two scripts.
    let big = "x".repeat(512 * 1024);
    let envs: Vec<Envelope> = (0..70)
        .map(|i| Envelope::new(format!("{i} {big}")))
        .collect();
    let mark = llmq_shared::queue::Progress {
        batch_id: "large".into(),
        enqueued: 100,
    };
    env.redis
        .enqueue_marked(&env.keys, &envs, Some(&mark))
        .await
        .unwrap();
    assert_eq!(env.stream_len().await, 70);
    assert_eq!(
        env.redis.batch_progress(&env.keys, "large").await.unwrap(),
        100,
        "the last script marks the whole chunk in"
    );
    let firsts: Vec<String> = env
        .stream_tasks("-", "+")
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            e["prompt"]
                .as_str()
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    let order: Vec<String> = (0..70).map(|i| i.to_string()).collect();
    assert_eq!(firsts, order, "in order");
}

/// A provider's results file checked by that provider's own Python SDK types
/// (tests/sdk/check_batch_results.py): what each line says.
fn sdk_checked(shape: &str, results: &std::path::Path) -> Vec<serde_json::Value> {
    let python = llmq_tests::harness::venv_python("LLMQ_SDK_VENV", "sdk-venv")
        .expect("the provider-file test needs OpenAI's and Anthropic's SDKs: run `make sdk-deps`");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/check_batch_results.py");
    let out = std::process::Command::new(python)
        .args([script, shape])
        .arg(results)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the {shape} SDK refuses llmq's results: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn openai_and_anthropic_batch_files_run_and_answer_in_their_provider_s_output_shape() {
    let env = TestEnv::new().await.unwrap();
    let url = env.mock.url();
    let mut settings = env.settings();
    // The models the providers' documentation names, served by llmq-mock in each format.
    let text = format!(
        "providers:\n  - {{name: oa, kind: openai_compatible, base_url: \"{url}/v1\", api_key: k, models: [{{id: gpt-3.5-turbo-0125, input_usd_per_mtok: 0.5, output_usd_per_mtok: 1.5}}, {{id: fail-400, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}]}}\n  - {{name: an, kind: anthropic, base_url: \"{url}\", api_key: k, models: [{{id: claude-opus-4-1, input_usd_per_mtok: 15, output_usd_per_mtok: 75}}]}}\n"
    );
    settings.config = llmq_shared::config::Config::parse("docs.yaml", &text, &|_| None).unwrap();
    let worker = llmq_tests::harness::WorkerHandle::start(settings);
    let dir = std::env::temp_dir().join(format!("llmq-{}-provider-files", env.queue));
    std::fs::create_dir_all(&dir).unwrap();

    // OpenAI's Batch guide's file, and a line the provider refuses (400; with no fallback to
    // the other provider, it fails).
    let openai = dir.join("openai.jsonl");
    std::fs::write(&openai, concat!(
        r#"{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-3.5-turbo-0125", "messages": [{"role": "system", "content": "You are a helpful assistant."},{"role": "user", "content": "Hello world!"}],"max_tokens": 1000}}"#, "\n",
        r#"{"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-3.5-turbo-0125", "messages": [{"role": "system", "content": "You are an unhelpful assistant."},{"role": "user", "content": "Hello world!"}],"max_tokens": 1000}}"#, "\n",
        r#"{"custom_id": "request-3", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "fail-400", "messages": [{"role": "user", "content": "Refused"}]}}"#, "\n",
    )).unwrap();
    let results = dir.join("results.jsonl");
    let results_arg = results.to_string_lossy().into_owned();
    let (code, summary) = env
        .batch(
            &openai,
            &[
                "--wait",
                "--output",
                &results_arg,
                "--wait-timeout",
                "60s",
                "--no-fallback",
            ],
        )
        .await;
    assert_eq!(code, 1, "one request failed: {summary}");
    let lines = sdk_checked("openai", &results);
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["request-1", "request-2", "request-3"]);
    assert_eq!(lines[0]["ok"], true);
    assert_eq!(lines[0]["model"], "gpt-3.5-turbo-0125");
    assert_eq!(
        lines[0]["text"],
        "mock answer from gpt-3.5-turbo-0125: Hello world!"
    );
    assert_eq!(lines[2]["ok"], false);
    assert_eq!(lines[2]["code"], "fatal");
    assert_eq!(env.mock.calls_with_prompt("Hello world!"), 2);

    // Anthropic's documented body (over several lines), one request pinned to a model only
    // the OpenAI-shaped provider serves: the answers come back in Anthropic's shape
    // whichever provider answered, on standard output without --output.
    let anthropic = dir.join("anthropic.json");
    std::fs::write(&anthropic, r#"{
  "requests": [
    {"custom_id": "my-first-request", "params": {"model": "claude-opus-4-1", "max_tokens": 1024, "system": "Be brief.", "messages": [{"role": "user", "content": "Hello, world"}]}},
    {"custom_id": "my-second-request", "params": {"model": "gpt-3.5-turbo-0125", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hi again, friend"}]}}
  ]
}
"#).unwrap();
    let (code, answers) = env
        .batch(&anthropic, &["--wait", "--wait-timeout", "60s"])
        .await;
    assert_eq!(code, 0, "{answers}");
    std::fs::write(&results, &answers).unwrap();
    let lines = sdk_checked("anthropic", &results);
    assert_eq!(lines.len(), 2, "{answers}");
    assert_eq!(lines[0]["custom_id"], "my-first-request");
    assert_eq!(lines[0]["model"], "claude-opus-4-1");
    assert_eq!(
        lines[0]["text"],
        "mock answer from claude-opus-4-1: Hello, world"
    );
    assert_eq!(lines[1]["model"], "gpt-3.5-turbo-0125");
    assert!(lines.iter().all(|l| l["type"] == "succeeded"), "{lines:?}");
    let provider = |i: usize| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(answers.lines().nth(i).unwrap()).unwrap()["llmq"]
            ["provider"]
            .clone()
    };
    assert_eq!((provider(0), provider(1)), ("an".into(), "oa".into()));
    worker.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_provider_line_llmq_does_not_run_is_named_and_route_lets_routing_choose() {
    let env = TestEnv::new().await.unwrap();
    let path = std::env::temp_dir().join(format!("llmq-{}-openai.jsonl", env.queue));
    let line = |custom: &str, url: &str| {
        serde_json::json!({"custom_id": custom, "method": "POST", "url": url,
            "body": {"model": "gpt-4o-mini", "input": "x", "messages": [{"role": "user", "content": "Hello"}]}})
        .to_string()
    };
    std::fs::write(
        &path,
        jsonl(&[
            line("a", "/v1/chat/completions"),
            line("b", "/v1/embeddings"),
        ]),
    )
    .unwrap();
    let file = path.to_string_lossy().into_owned();
    let (code, err) = batch_binary(&env, &file, "", &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "line 2: `url` \"/v1/embeddings\" is not an endpoint llmq runs; llmq runs /v1/chat/completions"
        ),
        "{err}"
    );
    assert_eq!(env.stream_len().await, 0, "nothing of a bad file goes in");
    std::fs::write(&path, jsonl(&[line("a", "/v1/chat/completions")])).unwrap();
    let (code, err) = batch_binary(&env, &file, "", &["--route"]);
    assert_eq!(code, 0, "{err}");
    // A field llmq does not carry is said once, though the file is read twice.
    assert_eq!(
        err.matches("`body.input` is not carried over").count(),
        1,
        "{err}"
    );
    let tasks = env.stream_tasks("-", "+").await.unwrap();
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].get("model"), None, "--route pins no model");
    assert_eq!(tasks[0]["messages"][0]["content"], "Hello");
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn llmq_costs_batch_reports_one_batch_s_tasks_calls_models_and_cost() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let path = std::env::temp_dir().join(format!("llmq-{}-costed.jsonl", env.queue));
    let batch = format!("costed-{}", env.queue);
    let mut lines: Vec<String> = (0..4).map(task_line).collect();
    lines.push(
        serde_json::json!({"custom_id": "smart", "prompt": "Think hard", "model": "mock-smart"})
            .to_string(),
    );
    std::fs::write(&path, jsonl(&lines)).unwrap();
    let (code, out) = env
        .batch(&path, &["--batch-id", &batch, "--wait", "--format", "json"])
        .await;
    assert_eq!(code, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        env.redis.batch_finished(&env.keys, &batch).await.unwrap(),
        5,
        "the workers counted each of the batch's tasks as it finished"
    );
    // Another batch's tasks are not this one's.
    std::fs::write(&path, jsonl(&[task_line(9)])).unwrap();
    let (code, out) = env.batch(&path, &["--wait"]).await;
    assert_eq!(code, 0, "{out}");
    worker.stop().await.unwrap();

    let db = llmq_tests::harness::database_url();
    let (code, out) = env
        .cli(&[
            "costs",
            "--database-url",
            &db,
            "--batch",
            &batch,
            "--by",
            "model",
            "--format",
            "json",
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let costs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(costs["tasks"], 5, "{costs}");
    assert_eq!(costs["calls"], 5, "{costs}");
    let models: Vec<&str> = costs["breakdown"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["key"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["mock/mock-smart", "mock/mock-fast"], "{costs}");
    let total = costs["total_cost_usd"].as_f64().unwrap();
    let paid = report["total_cost"].as_f64().unwrap();
    assert!(
        total > 0.0 && (total - paid).abs() < 1e-9,
        "{total} against {paid}"
    );
    let (code, text) = env
        .cli(&["costs", "--database-url", &db, "--batch", &batch])
        .await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("Costs of batch {batch}")) && text.contains("over 5 calls, 5 tasks"),
        "{text}"
    );
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn a_batch_s_copies_count_toward_its_progress_as_they_end() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let path = std::env::temp_dir().join(format!("llmq-{}-copies.jsonl", env.queue));
    let batch = format!("copies-{}", env.queue);
    let keyed = |custom: &str| {
        serde_json::json!({"custom_id": custom, "prompt": "Refund order 7", "model": "mock-fast",
            "idempotency_key": "refund-7"})
        .to_string()
    };
    std::fs::write(&path, jsonl(&[keyed("a"), keyed("b"), task_line(1)])).unwrap();
    let (code, out) = env
        .batch(&path, &["--batch-id", &batch, "--wait", "--format", "json"])
        .await;
    assert_eq!(code, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let copies = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| !r["duplicate_of"].is_null())
        .count();
    assert_eq!(copies, 1, "{report}");
    assert_eq!(env.mock.calls_with_prompt("Refund order 7"), 1);
    assert_eq!(
        env.redis.batch_finished(&env.keys, &batch).await.unwrap(),
        3,
        "the copy counted as it ended, so --wait did not wait for a read of the open tasks"
    );
    worker.stop().await.unwrap();
    let _ = std::fs::remove_file(path);
}

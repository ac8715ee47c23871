//! Batch controls: a fleet-wide parallelism cap (`llmq batch --parallel`, i.e. a concurrency
//! key on every task of the batch), held across workers and through a worker's SIGKILL.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq_shared::envelope::Envelope;
use llmq_shared::outcome::{Status, TaskRecord};
use llmq_tests::harness::{TestEnv, WorkerProcess};

const WAIT: Duration = Duration::from_secs(60);

async fn finish_all(env: &TestEnv, ids: &[String]) -> Vec<TaskRecord> {
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
    let ids: Vec<String> = listing.lines().map(str::to_owned).collect();
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
    let other_ids: Vec<String> = others.iter().map(|e| e.id.unwrap().to_string()).collect();

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

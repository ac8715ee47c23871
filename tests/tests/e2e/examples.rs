//! The Python and Node producer examples enqueue with a plain Redis client and read the
//! result a real worker wrote. `make test` installs their dependencies first.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use llmq_tests::harness::{TestEnv, redis_url};
use serde_json::Value;

async fn run_example(program: &str, script: &str, env: &TestEnv, extra: &[&str]) -> (i32, Value) {
    run_example_on(program, script, env, extra, &redis_url()).await
}

async fn run_example_on(
    program: &str,
    script: &str,
    env: &TestEnv,
    extra: &[&str],
    url: &str,
) -> (i32, Value) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Async, so the in-process worker keeps running while the example waits.
    let out = tokio::process::Command::new(program)
        .arg(root.join(script))
        .args([
            "From another language",
            "--queue",
            &env.queue,
            "--timeout-wait",
            "30",
        ])
        .args(extra)
        .env("REDIS_URL", url)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code().unwrap_or(-1);
    let record = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{script} printed no result record ({e}); exit {code}\nstdout: {stdout}\nstderr: {stderr}\n\
             (install the examples' dependencies with `make examples-deps`)"
        )
    });
    (code, record)
}

#[tokio::test]
async fn python_and_node_producers_enqueue_and_read_results() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    for (program, script) in [
        ("python3", "examples/python/enqueue.py"),
        ("node", "examples/node/enqueue.mjs"),
    ] {
        let (code, r) = run_example(program, script, &env, &[]).await;
        assert_eq!(code, 0, "{script}: {r}");
        assert_eq!(r["status"], "succeeded", "{script}: {r}");
        assert_eq!(
            r["output"], "mock answer from mock-fast: From another language",
            "{script}"
        );
        assert!(r["cost_usd"].as_f64().unwrap() > 0.0);

        let (code, r) = run_example(program, script, &env, &["--model", "fail-400"]).await;
        assert_eq!(code, 1, "{script}: {r}");
        assert_eq!(r["status"], "dead");

        // JSON that fits a schema, streamed as it is written.
        let schema = r#"{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}"#;
        let (code, r) = run_example(program, script, &env, &["--schema", schema, "--stream"]).await;
        assert_eq!(code, 0, "{script}: {r}");
        assert_eq!(r["json"], serde_json::json!({"city": "x"}), "{script}: {r}");
    }
    assert_eq!(
        env.calls().await.unwrap().len(),
        6,
        "each example's calls are in the ledger"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn python_and_node_producers_enqueue_on_a_redis_cluster() {
    let env = TestEnv::new().await.unwrap();
    let cluster = llmq_tests::cluster::RedisCluster::start();
    let mut settings = env.settings();
    settings.redis_url = cluster.url();
    let worker = llmq_tests::harness::WorkerHandle::start(settings);
    for (program, script) in [
        ("python3", "examples/python/enqueue.py"),
        ("node", "examples/node/enqueue.mjs"),
    ] {
        let (code, r) = run_example_on(program, script, &env, &["--stream"], &cluster.url()).await;
        assert_eq!(code, 0, "{script}: {r}");
        assert_eq!(
            r["output"], "mock answer from mock-fast: From another language",
            "{script}: {r}"
        );
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn python_and_node_producers_submit_a_chain_and_wait_for_it() {
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let worker = env.worker();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let file = std::env::temp_dir().join(format!("{}-example-chain.json", env.queue));
    std::fs::write(
        &file,
        r#"{"v": 1, "steps": [
            {"name": "plan", "prompt": "Plan {{input}}"},
            {"name": "impl", "after": ["plan"], "prompt": "Do {{plan.summary}}"}]}"#,
    )
    .unwrap();
    for (program, script) in [
        ("python3", "examples/python/chain.py"),
        ("node", "examples/node/chain.mjs"),
    ] {
        let out = tokio::process::Command::new(program)
            .arg(root.join(script))
            .arg(&file)
            .args([
                "--queue",
                &env.queue,
                "--var",
                "input=caching",
                "--timeout-wait",
                "30",
            ])
            .env("REDIS_URL", redis_url())
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{script}: {stdout} {stderr}");
        let v: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["state"], "succeeded", "{script}: {v}");
        assert_eq!(
            v["steps"]["plan"]["output"],
            "mock answer from mock-fast: Plan caching"
        );
        assert!(
            v["steps"]["impl"]["output"].as_str().unwrap().starts_with(
                "mock answer from mock-fast: Do mock answer from mock-fast: Plan caching"
            ),
            "{v}"
        );
    }
    worker.stop().await.unwrap();
}

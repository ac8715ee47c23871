//! The Node client (producer/clients/node) against real workers: its `node --test` suites run
//! as a subprocess, on the compiled dist/, with a worker serving a fresh queue on one Redis,
//! a Redis Cluster and Sentinel's master. `producer/clients/node/deps.sh` installs (npm ci)
//! and builds it first, each only when needed.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use llmq_shared::keys::QueueKeys;
use llmq_tests::harness::{TestEnv, WorkerHandle, redis_url};
use serde_json::Value;
use tokio::sync::OnceCell;

/// How long one `node --test` run may take before it is killed as hung.
const NODE_TESTS_WITHIN: Duration = Duration::from_secs(300);

fn package() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../producer/clients/node")
}

static DEPS: OnceCell<()> = OnceCell::const_new();

/// Installs and builds the client once per test binary (deps.sh skips what is up to date).
async fn deps() {
    DEPS.get_or_init(|| async {
        let out = tokio::process::Command::new("bash")
            .arg(package().join("deps.sh"))
            .output()
            .await
            .expect("cannot run bash");
        assert!(
            out.status.success(),
            "producer/clients/node/deps.sh failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;
}

/// Runs `program args` in the package directory with `vars`; panics with its output unless it
/// exits 0. Returns what it printed on stdout.
async fn run(program: &str, args: &[&str], vars: &[(&str, &str)]) -> String {
    deps().await;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(package())
        .env_remove("REDIS_URL")
        .envs(vars.iter().copied())
        .kill_on_drop(true);
    let out = tokio::time::timeout(NODE_TESTS_WITHIN, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`{program} {}` hung", args.join(" ")))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`{program} {}` exited {:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        args.join(" "),
        out.status.code()
    );
    stdout
}

/// `node --test` on these files of test/.
async fn node_tests(files: &[&str], vars: &[(&str, &str)]) {
    let mut args = vec!["--test", "--test-reporter=spec"];
    args.extend_from_slice(files);
    let out = run("node", &args, vars).await;
    println!("{out}");
    // Something ran, and nothing was skipped (a test that cannot run fails instead).
    assert!(out.contains("pass "), "{out}");
    assert!(out.contains("skipped 0"), "{out}");
    assert!(out.contains("todo 0"), "{out}");
}

/// What the driver leaves in the idle queue's dead letters for the client to replay: a task as
/// a worker writes it back (its counters set, no id), and a record of it.
async fn prepare_dead_letter(env: &TestEnv, idle: &QueueKeys) -> String {
    let task = serde_json::json!({
        "v": 1,
        "prompt": "Replayed by the Node client",
        "model": "mock-fast",
        "system": null,
        "temperature": 0.5,
        "max_attempts": 4,
        "enqueued_at": "2030-01-01T00:00:00Z",
        "metadata": {"ticket": "OPS-42"},
        "custom_field": {"kept": [1, 2]},
        "attempts": 4,
        "snoozes": 2,
        "replays": 1,
        "waiting_since": "2030-01-01T00:01:00Z",
        "last_error": "the provider was down",
    });
    let mut c = env.redis.conn().await.unwrap();
    let id: String = redis::cmd("XADD")
        .arg(idle.dead())
        .arg("*")
        .arg("task")
        .arg(task.to_string())
        .arg("error")
        .arg("gave up after 4 attempts")
        .arg("class")
        .arg("retryable")
        .arg("attempts")
        .arg("4")
        .arg("failed_at")
        .arg(chrono::Utc::now().timestamp_millis())
        .arg("entry_id")
        .arg("1700000000000-0")
        .query_async(&mut c)
        .await
        .unwrap();
    let task_id = env.redis.dead_letters(idle, 10).await.unwrap()[0]
        .task_id
        .clone();
    redis::cmd("SET")
        .arg(idle.result(&task_id))
        .arg(r#"{"status":"dead"}"#)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    id
}

#[tokio::test]
async fn node_client_enqueues_waits_follows_and_replays_with_a_worker() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let idle_name = format!("{}-idle", env.queue);
    let idle = QueueKeys::new(&idle_name);
    let dead_id = prepare_dead_letter(&env, &idle).await;
    // What llmq dlq replay would enqueue for it.
    let letter = env.redis.dead_letters(&idle, 10).await.unwrap().remove(0);
    let expected: Value =
        serde_json::from_str(&llmq_shared::queue::replayed_task(&letter, None)).unwrap();

    let url = redis_url();
    node_tests(
        &["test/unit.test.mjs", "test/worker.test.mjs"],
        &[
            ("REDIS_URL", &url),
            ("LLMQ_TEST_QUEUE", &env.queue),
            ("LLMQ_TEST_IDLE_QUEUE", &idle_name),
            ("LLMQ_TEST_DEAD_ID", &dead_id),
        ],
    )
    .await;

    // The client's replay enqueued exactly what llmq's own replay would have.
    let mut c = env.redis.conn().await.unwrap();
    let entries: Vec<(String, std::collections::HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(idle.stream())
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    let replayed: Vec<Value> = entries
        .iter()
        .filter_map(|(_, f)| serde_json::from_str::<Value>(f.get("task")?).ok())
        .filter(|t| t["prompt"] == "Replayed by the Node client")
        .collect();
    assert_eq!(replayed, [expected]);
    assert!(
        env.redis
            .dead_letters(&idle, 10)
            .await
            .unwrap()
            .iter()
            .all(|d| d.id != dead_id)
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn node_client_works_on_a_redis_cluster() {
    let env = TestEnv::new().await.unwrap();
    let cluster = llmq_tests::cluster::RedisCluster::start();
    let mut settings = env.settings();
    settings.redis_url = cluster.url();
    let worker = WorkerHandle::start(settings);
    node_tests(
        &["test/remote.test.mjs"],
        &[
            ("LLMQ_TEST_URL", &cluster.url()),
            ("LLMQ_TEST_QUEUE", &env.queue),
        ],
    )
    .await;
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn node_client_works_behind_redis_sentinel() {
    let env = TestEnv::new().await.unwrap();
    let sentinel = llmq_tests::cluster::RedisSentinel::start();
    let mut settings = env.settings();
    settings.redis_url = sentinel.url();
    let worker = WorkerHandle::start(settings);
    node_tests(
        &["test/remote.test.mjs"],
        &[
            ("LLMQ_TEST_URL", &sentinel.url()),
            ("LLMQ_TEST_QUEUE", &env.queue),
        ],
    )
    .await;
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn node_client_types_check_and_its_package_ships_the_replay_script() {
    // The published types, as a user's TypeScript sees them (test/types.ts).
    run(
        "node",
        &[
            "node_modules/typescript/bin/tsc",
            "--noEmit",
            "-p",
            "test/tsconfig.json",
        ],
        &[],
    )
    .await;
    // The package carries llmq's replay.lua, byte for byte, beside the code that loads it.
    let out = run(
        "npm",
        &["pack", "--dry-run", "--json", "--ignore-scripts"],
        &[],
    )
    .await;
    let packed: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let files: Vec<&str> = packed[0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    for want in [
        "dist/replay.lua",
        "dist/index.js",
        "dist/index.d.ts",
        "package.json",
    ] {
        assert!(files.contains(&want), "{want} is not packed: {files:?}");
    }
    assert!(
        files
            .iter()
            .all(|f| !f.starts_with("src/") && !f.starts_with("test/"))
    );
    let shipped = std::fs::read(package().join("dist/replay.lua")).unwrap();
    let canonical = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/src/queue/replay.lua"),
    )
    .unwrap();
    assert_eq!(shipped, canonical);
}

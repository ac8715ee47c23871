//! The Node client (producer/clients/node) against real workers: its `node --test` suites run
//! as a subprocess, on the compiled dist/, with a worker serving a fresh queue on one Redis,
//! a Redis Cluster and Sentinel's master. `producer/clients/node/deps.sh` installs (npm ci)
//! and builds it first, each only when needed. The inputs of test/vectors.json go through
//! llmq's own Rust code here, and test/rust.test.mjs checks the client answers the same.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use llmq_shared::chain::Chain;
use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::{DeadLetter, replayed_task};
use llmq_tests::harness::{TestEnv, WorkerHandle, redis_url};
use serde_json::{Value, json};
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

/// The dead letters the driver leaves in the idle queue for the client to replay, each as a
/// worker writes one back (its counters set), each awkward for a replay: one the worker's
/// `Envelope` type does not read (replayed as it came), one with a time at an offset and an id
/// in another spelling, one with a temperature no 32-bit float holds exactly, one with tools
/// and turns in serde's other shapes. Each has a record, which the replay deletes.
async fn prepare_dead_letters(env: &TestEnv, idle: &QueueKeys) -> Vec<String> {
    let id = uuid::Uuid::new_v4();
    let tasks = [
        json!({
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
        })
        .to_string(),
        r#"{"v":1,"prompt":"Replayed as it came","timeout":"soon","attempts":3,"last_error":"x"}"#
            .to_owned(),
        format!(
            r#"{{"v":1,"id":"URN:UUID:{}","prompt":"Replayed at an offset","run_at":"2030-01-02T03:04:05.5+02:00","enqueued_at":"2030-01-02 03:04:05 UTC","attempts":2}}"#,
            id.to_string().to_uppercase()
        ),
        r#"{"v":1,"prompt":"Replayed with a 32-bit temperature","temperature":0.30000000000000004,"snoozes":3,"metadata":{"b":1.0,"a":-0,"c":1e2}}"#
            .to_owned(),
        r#"{"v":1,"prompt":"Replayed with tools","tools":[{"name":"lookup"}],"tool_choice":{"name":"lookup"},"messages":[["user","earlier"]],"risk":{"low":null},"replays":2,"zz":1,"aa":{"y":2,"x":1}}"#
            .to_owned(),
    ];
    let mut c = env.redis.conn().await.unwrap();
    let mut ids = Vec::new();
    for (i, task) in tasks.iter().enumerate() {
        let dead_id: String = redis::cmd("XADD")
            .arg(idle.dead())
            .arg("*")
            .arg("task")
            .arg(task)
            .arg("error")
            .arg("gave up after 4 attempts")
            .arg("class")
            .arg("retryable")
            .arg("attempts")
            .arg("4")
            .arg("failed_at")
            .arg(chrono::Utc::now().timestamp_millis())
            .arg("entry_id")
            .arg(format!("1700000000000-{i}"))
            .query_async(&mut c)
            .await
            .unwrap();
        let letter = env
            .redis
            .dead_letters_at(idle, std::slice::from_ref(&dead_id))
            .await
            .unwrap()
            .remove(0);
        redis::cmd("SET")
            .arg(idle.result(letter.task_id))
            .arg(r#"{"status":"dead"}"#)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
        ids.push(dead_id);
    }
    ids
}

/// What llmq's own code answers for each input of test/vectors.json (`uuid::Uuid::parse_str`,
/// `humantime::parse_duration`, chrono's `DateTime<Utc>`, `replayed_task`, `Chain::parse`),
/// written to a file for test/rust.test.mjs; its path.
fn oracle(queue: &str) -> PathBuf {
    let vectors: Value = serde_json::from_str(
        &std::fs::read_to_string(package().join("test/vectors.json")).unwrap(),
    )
    .unwrap();
    let strings = |kind: &str| -> Vec<String> {
        vectors[kind]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let uuids: Vec<Value> = strings("uuids")
        .into_iter()
        .map(|s| {
            let parsed = uuid::Uuid::parse_str(&s).ok().map(|u| u.to_string());
            json!([s, parsed])
        })
        .collect();
    let durations: Vec<Value> = strings("durations")
        .into_iter()
        .map(|s| {
            let answer = match humantime::parse_duration(&s) {
                Ok(d) => json!({"secs": d.as_secs().to_string(), "nanos": d.subsec_nanos()}),
                Err(e) => json!({"error": e.to_string()}),
            };
            json!([s, answer])
        })
        .collect();
    let times: Vec<Value> = strings("times")
        .into_iter()
        .map(|s| {
            let t =
                serde_json::from_value::<chrono::DateTime<chrono::Utc>>(Value::String(s.clone()))
                    .ok();
            json!([s, t.map(|t| serde_json::to_value(t).unwrap())])
        })
        .collect();
    let letters: Vec<Value> = vectors["letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let dead = DeadLetter {
                id: "1-0".into(),
                task_id: l[1].as_str().unwrap().parse().unwrap(),
                queue: "q".into(),
                error: String::new(),
                class: String::new(),
                attempts: 0,
                failed_at: None,
                task: l[0].as_str().unwrap().into(),
            };
            json!([l[0], l[1], l[2], replayed_task(&dead, l[2].as_str())])
        })
        .collect();
    let max = usize::try_from(vectors["chain_max_bytes"].as_u64().unwrap()).unwrap();
    let chains: Vec<Value> = strings("chains")
        .into_iter()
        .map(|s| {
            let mut spec: Value = serde_json::from_str(&s).unwrap();
            spec["v"] = json!(1);
            let answer = match Chain::parse(
                spec.to_string().as_bytes(),
                max,
                "q",
                llmq_shared::ids::EntryId::new(1, 0),
            ) {
                Ok(_) => json!({"ok": true}),
                Err(e) => json!({"error": e.to_string()}),
            };
            json!([s, answer])
        })
        .collect();
    let path = std::env::temp_dir().join(format!("llmq-node-oracle-{queue}.json"));
    let answers = json!({"uuids": uuids, "durations": durations, "times": times, "letters": letters, "chains": chains});
    std::fs::write(&path, answers.to_string()).unwrap();
    path
}

#[tokio::test]
async fn node_client_enqueues_waits_follows_and_replays_with_a_worker() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let idle_name = format!("{}-idle", env.queue);
    let idle = QueueKeys::new(&idle_name);
    let dead_ids = prepare_dead_letters(&env, &idle).await;
    // What llmq dlq replay would enqueue for each: the awkward ones are not written back as
    // they came, but the one the worker's type refuses is.
    let letters = env.redis.dead_letters_at(&idle, &dead_ids).await.unwrap();
    let expected: Vec<String> = letters.iter().map(|l| replayed_task(l, None)).collect();
    assert_eq!(expected[1], letters[1].task);
    for (e, l) in expected.iter().zip(&letters).skip(2) {
        assert_ne!(*e, l.task.replace("\"replays\":2", "\"replays\":3"));
    }
    let oracle = oracle(&env.queue);

    let url = redis_url();
    node_tests(
        &[
            "test/unit.test.mjs",
            "test/rust.test.mjs",
            "test/worker.test.mjs",
        ],
        &[
            ("REDIS_URL", &url),
            ("LLMQ_TEST_QUEUE", &env.queue),
            ("LLMQ_TEST_IDLE_QUEUE", &idle_name),
            ("LLMQ_TEST_DEAD_IDS", &json!(dead_ids).to_string()),
            ("LLMQ_TEST_ORACLE", oracle.to_str().unwrap()),
        ],
    )
    .await;
    std::fs::remove_file(&oracle).unwrap();

    // The client's replays enqueued exactly what llmq's own replay would have, byte for byte.
    let mut c = env.redis.conn().await.unwrap();
    let entries: Vec<(String, std::collections::HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(idle.stream())
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    for want in &expected {
        let found = entries
            .iter()
            .filter(|(_, f)| f.get("task") == Some(want))
            .count();
        assert_eq!(found, 1, "{want} is not in {entries:?}");
    }
    let left = env.redis.dead_letters(&idle, 100).await.unwrap();
    assert!(left.iter().all(|d| !dead_ids.contains(&d.id)));
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

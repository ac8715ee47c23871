//! The Python client (`producer/clients/python`, issue 35) against real workers: its pytest
//! suite runs here, in the virtualenv `producer/clients/python/deps.sh` makes, with a worker
//! serving one queue on the local Redis, on a Redis Cluster and on a Sentinel-watched master;
//! with dead letters that `llmq dlq replay` has replayed in one queue and the client is to
//! replay, to the same envelopes, in another; and with a Redis that speaks only TLS, its
//! certificate signed by a CA made here.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use llmq_tests::cluster::{RedisCluster, RedisSentinel};
use llmq_tests::harness::{TestEnv, WorkerHandle, redis_url};

use crate::tls::{Pki, TlsRedis};

/// The pytest suite may take this long (it waits for real tasks, each bounded by itself).
const SUITE_WITHIN: Duration = Duration::from_secs(600);

/// The virtualenv's Python: `LLMQ_PYTHON_CLIENT_VENV`, else the one deps.sh makes.
fn python() -> PathBuf {
    llmq_tests::harness::venv_python("LLMQ_PYTHON_CLIENT_VENV", "python-client-venv").expect(
        "the Python client's tests need its virtualenv: run producer/clients/python/deps.sh",
    )
}

/// The counts of pytest's closing line (`12 passed, 1 skipped, 2 warnings in 3.40s`), as
/// (outcome, count).
fn outcomes(stdout: &str) -> Vec<(String, u64)> {
    let parse = |line: &str| -> Option<Vec<(String, u64)>> {
        let (counts, _) = line.trim().trim_matches('=').trim().rsplit_once(" in ")?;
        counts
            .split(", ")
            .map(|part| {
                let (n, what) = part.split_once(' ')?;
                Some((what.to_owned(), n.parse().ok()?))
            })
            .collect()
    };
    stdout.lines().rev().find_map(parse).unwrap_or_default()
}

/// A CA, and a certificate for localhost it signed, in `dir`.
/// The same dead letters, written to `queue`'s dead stream as workers write them: a full
/// envelope with every counter a replay resets, one without an id (its id derives from the
/// entry), one that does not deserialize and one that is not JSON; then what only Rust's
/// parsers decide: a time in year 1 east of UTC (year 0 in UTC, beyond Python's datetime), a
/// temperature beyond a 32-bit float and one at its edge, spellings of an id, JSON nested
/// deeper than serde_json reads, a field given twice, a lone surrogate, a number beyond a
/// float, and a key given twice where the last counts.
async fn dead_letters(env: &TestEnv, queue: &str) {
    let deep = format!(
        r#"{{"v":1,"prompt":"deep","metadata":{}{}}}"#,
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    let letters = [
        (
            "3-0",
            r#"{"v":1,"id":"5C2F1D9E-0B7A-4F3B-9C1D-2E3F4A5B6C7D","prompt":"replay me","system":null,"model":"mock-fast","attempts":3,"snoozes":2,"replays":1,"waiting_since":"2030-01-02T03:04:05Z","last_error":"HTTP 500","temperature":0.2,"run_at":"2020-01-02T05:04:05.120+02:00","stream":false,"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]},{"role":"assistant","content":"","tool_calls":[{"id":"c1","name":"look"}]},{"role":"tool","tool_call_id":"c1","content":"seen"}],"tools":[{"name":"look","description":null}],"metadata":{"a":[1,null]},"custom":{"kept":true,"gone":null}}"#.to_owned(),
        ),
        ("0-7", r#"{"v":1,"prompt":"no id","attempts":1}"#.to_owned()),
        (
            "0-8",
            r#"{"v":1,"prompt":"x","timeout":"soon","attempts":2}"#.to_owned(),
        ),
        ("0-9", "not json {".to_owned()),
        (
            "0-10",
            r#"{"v":1,"id":"URN:UUID:7D1E2F3A-4B5C-4D6E-8F70-8192A3B4C5D6","prompt":"year one","run_at":"0001-01-01T00:00:00+01:00","prompt_cache":false}"#.to_owned(),
        ),
        (
            "0-18",
            r#"{"v":1,"prompt":"beyond f32","temperature":1e39}"#.to_owned(),
        ),
        (
            "0-19",
            r#"{"v":1,"prompt":"f32 max","temperature":3.4028235e38}"#.to_owned(),
        ),
        (
            "0-11",
            r#"{"v":1,"id":"7d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d7\n","prompt":"newline id"}"#.to_owned(),
        ),
        (
            "0-12",
            r#"{"v":1,"id":"{7d1e2f3a4b5c4d6e8f708192a3b4c5d8}","prompt":"braced simple id"}"#.to_owned(),
        ),
        ("0-13", deep),
        (
            "0-14",
            r#"{"v":1,"prompt":"twice","prompt":"given"}"#.to_owned(),
        ),
        (
            "0-15",
            r#"{"v":1,"prompt":"surrogate","metadata":"\ud800"}"#.to_owned(),
        ),
        (
            "0-16",
            r#"{"v":1,"prompt":"huge","metadata":1e400}"#.to_owned(),
        ),
        (
            "0-17",
            r#"{"v":1,"prompt":"last counts","metadata":{"a":1,"a":2},"extra":{"b":1,"b":[2]}}"#.to_owned(),
        ),
        (
            "0-20",
            r#"{"v":1,"prompt":"replayed too often","replays":4294967295}"#.to_owned(),
        ),
    ];
    let keys = llmq_shared::keys::QueueKeys::new(queue);
    let mut c = env.redis.conn().await.unwrap();
    for (entry_id, task) in letters {
        let _: String = redis::cmd("XADD")
            .arg(keys.dead())
            .arg("*")
            .arg("task")
            .arg(&task)
            .arg("error")
            .arg("gave up after 3 attempts; last error: HTTP 500")
            .arg("class")
            .arg("retryable")
            .arg("attempts")
            .arg("3")
            .arg("failed_at")
            .arg(chrono::Utc::now().timestamp_millis())
            .arg("entry_id")
            .arg(entry_id)
            .query_async(&mut c)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_client_against_real_workers() {
    let python = python();
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let worker = env.worker();
    let cluster = RedisCluster::start();
    let mut on_cluster = env.settings();
    on_cluster.redis_url = cluster.url();
    let cluster_worker = WorkerHandle::start(on_cluster);
    let sentinel = RedisSentinel::start();
    let mut on_sentinel = env.settings();
    on_sentinel.redis_url = sentinel.url();
    let sentinel_worker = WorkerHandle::start(on_sentinel);

    // The same dead letters in two queues no worker serves; the CLI replays the first.
    let (by_cli, by_client) = (
        format!("{}-replay-cli", env.queue),
        format!("{}-replay-py", env.queue),
    );
    dead_letters(&env, &by_cli).await;
    dead_letters(&env, &by_client).await;
    let (code, out) = env
        .cli(&[
            "dlq",
            "replay",
            "--all",
            "--platform",
            "mock",
            "--queue",
            &by_cli,
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("replayed 15 dead letter(s)"), "{out}");

    let pki = Pki::new();
    let tls = TlsRedis::start(&pki);

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let suite = tokio::process::Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEsxX"])
        .arg("--rootdir")
        .arg(root.join("producer/clients/python"))
        .arg(root.join("producer/clients/python/tests"))
        .current_dir(&root)
        .env("REDIS_URL", redis_url())
        .env("LLMQ_QUEUE", &env.queue)
        .env("LLMQ_CLUSTER_URL", cluster.url())
        .env("LLMQ_SENTINEL_URL", sentinel.url())
        .env("LLMQ_REPLAY_CLI_QUEUE", &by_cli)
        .env("LLMQ_REPLAY_PY_QUEUE", &by_client)
        .env("LLMQ_TLS_URL", tls.url())
        .env("LLMQ_TLS_CA", pki.path("ca.pem"))
        .env("LLMQ_REPO", &root)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(SUITE_WITHIN, suite)
        .await
        .unwrap_or_else(|_| panic!("the Python client's tests ran past {SUITE_WITHIN:?}"))
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "the Python client's tests failed:\n{report}"
    );
    // Every test ran and passed: a skipped (or expected-to-fail) test is a failure here.
    let counts = outcomes(&String::from_utf8_lossy(&out.stdout));
    assert!(
        counts.iter().any(|(what, n)| what == "passed" && *n > 0),
        "no pytest summary with passed tests:\n{report}"
    );
    let others: Vec<_> = counts
        .iter()
        .filter(|(what, _)| !matches!(what.as_str(), "passed" | "warning" | "warnings"))
        .collect();
    assert!(
        others.is_empty(),
        "pytest did not run every test: {others:?}\n{report}"
    );
    for w in [worker, cluster_worker, sentinel_worker] {
        w.stop().await.unwrap();
    }
    drop(tls);
    drop(pki);
}

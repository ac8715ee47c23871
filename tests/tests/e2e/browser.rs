//! The operator page in a real headless Chromium: `tests/browser/web.py` (Playwright driving
//! Debian's chromium) against `llmq web` served here over the real Redis, Postgres and
//! llmq-mock. The overview shows the counts `llmq status` shows; a chain's DAG shows every
//! step; approving in the page moves the chain on (and the open chain page sees it without a
//! reload); replaying a dead letter from the page runs it; a prompt containing `<script>`
//! renders as text. `make browser-deps` installs what it needs; with
//! `LLMQ_WEB_SCREENSHOTS=docs/web` it takes the screenshots of docs/web.md.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use llmq::web::{WebState, serve};
use llmq_shared::envelope::Envelope;
use llmq_shared::keys::QueueKeys;
use llmq_shared::outcome::Status;
use llmq_shared::queue::Client;
use llmq_tests::harness::{TestEnv, redis_url};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "browser-test-token";

/// The Python with Playwright: `LLMQ_BROWSER_PYTHON`, else the venv `make browser-deps` makes.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("LLMQ_BROWSER_PYTHON") {
        return PathBuf::from(p);
    }
    llmq_tests::harness::venv_python("LLMQ_BROWSER_VENV", "browser-venv")
        .filter(|_| std::path::Path::new("/usr/bin/chromium").exists())
        .expect("the browser test needs Playwright in its virtualenv and Debian's chromium: run `make browser-deps`")
}

/// The suites' provider file with quotas on the mock provider, renamed `name` so that its
/// quota counters (kept in Redis by provider name, for a day) are this test's alone: 10
/// requests a day, $1 a month.
fn with_quotas(mock_url: &str, name: &str) -> llmq_shared::config::Config {
    let text = include_str!("../../../examples/providers.mock.yaml")
        .replacen("  - name: mock\n", &format!("  - name: {name}\n"), 1)
        .replacen(
            "    api_key: ${LLMQ_MOCK_API_KEY:-mock-key}\n",
            "    api_key: ${LLMQ_MOCK_API_KEY:-mock-key}\n    quotas: {requests_per_day: 10, usd_per_month: 1}\n",
            1,
        );
    assert!(
        text.contains("requests_per_day: 10") && text.contains(name),
        "the mock provider's name or api_key line moved"
    );
    let url = mock_url.to_owned();
    llmq_shared::config::Config::parse("providers.mock.yaml", &text, &move |name| {
        (name == "LLMQ_MOCK_URL").then(|| url.clone())
    })
    .unwrap()
}

/// One queue's counts as `llmq status` prints them: ready, in flight, delayed, dead.
fn status_row(status: &str, queue: &str) -> [u64; 4] {
    let cells: Vec<u64> = status
        .lines()
        .find(|l| l.split_whitespace().next() == Some(queue))
        .unwrap_or_else(|| panic!("no row for {queue} in {status}"))
        .split_whitespace()
        .skip(1)
        .map(|c| c.parse().unwrap())
        .collect();
    [cells[0], cells[1], cells[2], cells[3]]
}

#[tokio::test]
async fn an_operator_approves_replays_and_sees_hostile_text_as_text_in_chromium() {
    let python = python();
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();

    // A paused queue holding 3 tasks and a dead letter, and a live worker on it.
    let held = format!("{}-held", env.queue);
    let held_keys = QueueKeys::new(&held);
    env.redis.ensure_group(&held_keys).await.unwrap();
    env.redis
        .pause_queue(&held_keys, "browser test", "")
        .await
        .unwrap();
    for i in 0..3 {
        env.redis
            .enqueue(&held_keys, &Envelope::new(format!("held {i}")))
            .await
            .unwrap();
    }
    let mut c = env.redis.conn().await.unwrap();
    let _: String = redis::cmd("XADD")
        .arg(held_keys.dead())
        .arg("*")
        .arg("task")
        .arg(r#"{"v":2}"#)
        .arg("error")
        .arg("bad version")
        .query_async(&mut c)
        .await
        .unwrap();
    env.redis
        .heartbeat("browser-test", std::slice::from_ref(&held_keys), true)
        .await
        .unwrap();
    let (_, status) = env.cli(&["status", "--queue", &held]).await;
    let [ready, in_flight, delayed, dead] = status_row(&status, &held);
    assert_eq!((ready, dead), (3, 1), "{status}");

    // On the worker's queue: a chain waiting for approval, a dead letter whose task runs
    // when replayed, and a task whose prompt is a script. The provider has quotas, for the
    // overview's bars.
    let config = with_quotas(&env.mock.url(), &format!("mock-{}", env.queue));
    let mut settings = env.settings();
    settings.config = config.clone();
    let worker = llmq_tests::harness::WorkerHandle::start(settings);
    let chain_id = format!("{}-chain", env.queue);
    let spec = serde_json::json!({"v": 1, "chain_id": chain_id, "steps": [
        {"name": "impl", "prompt": "Write the <b>plan</b>", "model": "mock-fast"},
        {"name": "ship", "kind": "approval", "after": ["impl"], "timeout": "1h"},
        {"name": "docs", "after": ["ship"], "prompt": "Document {{ship.summary}}", "model": "mock-fast"}]});
    env.redis
        .submit_chain(&env.keys, &spec.to_string())
        .await
        .unwrap();
    let (dead_id, replayed_task) = env.replayable_dead_letter("run me again").await;
    // A chain whose one step the provider refuses: a failed task, found by a word of its
    // error, followed to its chain, replayed.
    let failing = format!("{}-failing", env.queue);
    let spec_failing = serde_json::json!({"v": 1, "chain_id": failing, "steps": [
        {"name": "refused", "prompt": "ask for too much", "model": "fail-400"}]});
    env.redis
        .submit_chain(&env.keys, &spec_failing.to_string())
        .await
        .unwrap();
    let failed = env.chain_ended(&failing, WAIT).await;
    assert_eq!(failed.state, "failed", "{failed:?}");
    let failed_task = failed.steps["refused"].task_id.unwrap();
    let failed_record = env.wait_final(&failed_task, WAIT).await.unwrap();
    let word = failed_record
        .error
        .as_deref()
        .unwrap_or_default()
        .split(|c: char| !c.is_alphanumeric())
        .find(|w| w.len() > 5 && w.chars().all(|c| c.is_ascii_alphabetic()))
        .unwrap_or_else(|| panic!("no word in {failed_record:?}"))
        .to_owned();
    // A second worker, on a queue of its own, for the page to drain.
    let drainee = format!("{}-drainee", env.queue);
    let mut drain_settings = env.settings();
    drain_settings.queues = vec![format!("{}-drain", env.queue)];
    drain_settings.worker_id = Some(drainee.clone());
    let drained_worker = llmq_tests::harness::WorkerHandle::start(drain_settings);
    let mut hostile = Envelope::new("<script>window.__llmq_pwned=1;alert('pwned')</script>");
    hostile.model = Some("mock-fast".into());
    let hostile_id = hostile.id.unwrap();
    env.redis.enqueue(&env.keys, &hostile).await.unwrap();
    env.wait_final(&hostile_id, WAIT).await.unwrap();
    env.eventually("the step awaiting approval", WAIT, || async {
        env.redis
            .chain(&env.keys, &chain_id)
            .await
            .unwrap()
            .is_some_and(|c| c.steps["ship"].status == "awaiting_approval")
    })
    .await
    .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let state = WebState {
        token: Some(TOKEN.into()),
        config: Some(config),
        ledger: Some(env.ledger.clone()),
        ..WebState::new(Client::new(&redis_url()).unwrap())
    };
    tokio::spawn(serve(listener, state, stop.clone()));

    // A relative directory is the workspace's (`docs/web`).
    let shots = std::env::var("LLMQ_WEB_SCREENSHOTS").ok().map(|d| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = root.join(d);
        std::fs::create_dir_all(&dir).unwrap();
        dir.display().to_string()
    });
    let args = serde_json::json!({
        "base": base, "token": TOKEN, "queue": env.queue, "held": held,
        "counts": {"ready": ready, "in_flight": in_flight, "delayed": delayed, "dead": dead},
        "chain": chain_id, "steps": ["impl", "ship", "docs"], "dead": dead_id,
        "hostile_task": hostile_id, "screenshots": shots,
        "failed_task": failed_task.to_string(), "failed_word": word, "failing_chain": failing,
        "drainee": drainee,
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/browser/web.py");
    let mut child = tokio::process::Command::new(&python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(args.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .expect("the browser test ends within 3 minutes")
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // What the page did happened: the chain went on past the approval, the replayed task ran.
    let c = env.chain_ended(&chain_id, WAIT).await;
    assert_eq!(c.state, "succeeded", "{c:?}");
    assert_eq!(c.steps["ship"].summary.as_deref(), Some("ship it"));
    let r = env.wait_final(&replayed_task, WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    // The page drained the second worker.
    assert!(
        env.redis
            .fleet()
            .await
            .unwrap()
            .iter()
            .any(|w| w.id == drainee && w.drain.is_some())
    );
    drained_worker.stop().await.unwrap();
    worker.stop().await.unwrap();
    stop.cancel();
}

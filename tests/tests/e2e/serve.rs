//! `llmq serve` as a new user meets it: the official `openai` and `anthropic` Python SDKs
//! (tests/sdk/serve_check.py) pointed at it with nothing changed but the base URL and the
//! key, against a real worker, Redis and the mock provider; and hostile requests, refused in
//! the provider's shape with nothing enqueued.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq::serve::keys::KeyFile;
use llmq::serve::{ServeState, serve};
use llmq_shared::outcome::Status;
use llmq_tests::harness::{TestEnv, mock_config};

const WAIT: Duration = Duration::from_secs(60);
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A server for `env`'s queue with one key for tenant `acme`: its base URL, the key, and
/// the token that stops it.
async fn server(env: &TestEnv, wait: Duration) -> (String, String, CancellationToken) {
    server_for(env, wait, mock_config(&env.mock.url())).await
}

/// [`server`] with provider file `config`.
async fn server_for(
    env: &TestEnv,
    wait: Duration,
    config: llmq_shared::config::Config,
) -> (String, String, CancellationToken) {
    let dir = std::env::temp_dir().join(format!("llmq-serve-{}", env.queue));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys.jsonl");
    let file_arg = file.to_str().unwrap().to_owned();
    let (code, printed) = env
        .cli(&[
            "keys",
            "create",
            "--file",
            &file_arg,
            "--tenant",
            "acme",
            "--tag",
            "team=search",
        ])
        .await;
    assert_eq!(code, 0, "{printed}");
    let secret = printed.lines().next().unwrap().to_owned();
    let (base, stop) = spawn(ServeState {
        keys: Some(KeyFile::open(&file).unwrap()),
        config: Some(config),
        wait,
        ..state(env)
    })
    .await;
    (base, secret, stop)
}

/// A server's state for `env`'s queue: no keys, the mock's provider file, a wait of 60 s,
/// the ledger's database, batch leases of 2 s.
fn state(env: &TestEnv) -> ServeState {
    ServeState {
        redis: env.redis.clone(),
        queue: env.queue.clone(),
        keys: None,
        config: Some(mock_config(&env.mock.url())),
        wait: Duration::from_secs(60),
        database: Some(env.ledger.pool().clone()),
        batch_lease: Duration::from_secs(2),
    }
}

/// Serves `state` on a free loopback port until the returned token is cancelled: its base
/// URL and the token.
async fn spawn(state: ServeState) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, state, stop.clone()));
    (base, stop)
}

/// A complete batch input file `file` of `n` chat requests (`r0`, `r1`, ...) written straight
/// into the server's tables, as an upload leaves it.
async fn batch_file(pool: &sqlx::PgPool, file: &str, n: usize) {
    sqlx::query(
        "INSERT INTO serve_files (id, purpose, filename, bytes, complete)
         VALUES ($1, 'batch', 'in.jsonl', 0, true)",
    )
    .bind(file)
    .execute(pool)
    .await
    .unwrap();
    let lines: String = (0..n)
        .map(|i| {
            let line = json!({"custom_id": format!("r{i}"), "method": "POST",
                "url": "/v1/chat/completions", "body": {"model": "mock-fast",
                "messages": [{"role": "user", "content": "hi"}]}});
            format!("{line}\n")
        })
        .collect();
    sqlx::query("INSERT INTO serve_file_parts (file_id, seq, data) VALUES ($1, 0, $2)")
        .bind(file)
        .bind(lines.into_bytes())
        .execute(pool)
        .await
        .unwrap();
}

/// Batch `id` of `file` on `queue`, `in_progress` until `expires` (an interval from now), of
/// `total` requests, as a server leaves one it made.
async fn open_batch(
    pool: &sqlx::PgPool,
    id: &str,
    queue: &str,
    file: &str,
    expires: &str,
    total: i32,
) {
    sqlx::query(
        "INSERT INTO serve_batches (id, queue, dialect, endpoint, input_file_id,
             completion_window, status, expires_at, in_progress_at, total)
         VALUES ($1, $2, 'openai', '/v1/chat/completions', $3, '24h', 'in_progress',
             now() + $4::interval, now(), $5)",
    )
    .bind(id)
    .bind(queue)
    .bind(file)
    .bind(expires)
    .bind(total)
    .execute(pool)
    .await
    .unwrap();
}

/// What the SDKs saw in case `case` of tests/sdk/serve_check.py.
async fn sdk(case: &str, base: &str, key: &str) -> Value {
    sdk_with(&[case], base, key).await
}

/// [`sdk`] with the case's arguments after it.
async fn sdk_with(case: &[&str], base: &str, key: &str) -> Value {
    let python = llmq_tests::harness::venv_python("LLMQ_SDK_VENV", "sdk-venv")
        .expect("the serve tests need OpenAI's and Anthropic's SDKs: run `make sdk-deps`");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/serve_check.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .args(case)
        .env("LLMQ_SERVE_URL", base)
        .env("LLMQ_SERVE_KEY", key)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "serve_check.py {case:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn the_openai_sdk_chats_streams_and_calls_tools_through_the_queue() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let (base, key, stop) = server(&env, Duration::from_secs(60)).await;

    let chat = sdk("openai_chat", &base, &key).await;
    assert!(
        chat["text"]
            .as_str()
            .unwrap()
            .starts_with("mock answer from mock-fast: say hello"),
        "{chat}"
    );
    assert_eq!(chat["model"], "mock-fast");
    assert_eq!(chat["finish_reason"], "stop");
    // An answer the output limit cut short says so, as the provider said it.
    assert_eq!(chat["short_finish_reason"], "length", "{chat}");
    assert!(chat["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(chat["provider"], "mock");
    assert!(
        chat["cost"].as_str().unwrap().parse::<f64>().unwrap() > 0.0,
        "{chat}"
    );
    assert!(
        chat["models"]
            .as_array()
            .unwrap()
            .contains(&json!("mock-fast"))
    );
    assert!(
        chat["models"]
            .as_array()
            .unwrap()
            .contains(&json!("llmq/auto"))
    );
    // It ran as a task of the key's tenant, in the queue, and its record says so; the
    // ledger keeps the key's tenant and tags with its call.
    let id = chat["task_id"].as_str().unwrap();
    let record = env.wait_final(id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(record.output.as_deref(), chat["text"].as_str());
    let kept: (Option<String>, Option<Value>) =
        sqlx::query_as("SELECT tenant, tags FROM provider_calls WHERE task_id = $1")
            .bind(record.task_id)
            .fetch_one(env.ledger.pool())
            .await
            .unwrap();
    assert_eq!(kept, (Some("acme".into()), Some(json!({"team": "search"}))));

    let streamed = sdk("openai_stream", &base, &key).await;
    assert!(
        streamed["pieces"].as_u64().unwrap() > 1,
        "streamed in pieces: {streamed}"
    );
    assert!(
        streamed["text"]
            .as_str()
            .unwrap()
            .starts_with("mock answer from mock-fast: stream this"),
        "{streamed}"
    );
    assert_eq!(streamed["finish_reason"], "stop");
    assert!(
        streamed["usage"].as_u64().unwrap() > 0,
        "the usage chunk: {streamed}"
    );

    let tools = sdk("openai_tools", &base, &key).await;
    assert_eq!(tools["name"], "get_weather", "{tools}");
    assert!(tools["args"].is_object(), "{tools}");
    assert_eq!(tools["finish_reason"], "tool_calls");
    assert_eq!(tools["streamed_calls"], json!(["get_weather"]));
    assert_eq!(tools["streamed_finish"], "tool_calls");
    stop.cancel();
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn the_anthropic_sdk_gets_messages_and_their_events() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let (base, key, stop) = server(&env, Duration::from_secs(60)).await;
    let m = sdk("anthropic_message", &base, &key).await;
    assert!(
        m["text"]
            .as_str()
            .unwrap()
            .starts_with("mock answer from mock-fast: say hello"),
        "{m}"
    );
    assert_eq!(m["stop_reason"], "end_turn");
    assert_eq!(m["short_stop_reason"], "max_tokens", "{m}");
    assert!(m["output_tokens"].as_u64().unwrap() > 0);
    let s = sdk("anthropic_stream", &base, &key).await;
    let kinds: Vec<&str> = s["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"message_start"), "{s}");
    assert_eq!(kinds.last(), Some(&"message_stop"), "{s}");
    assert!(kinds.contains(&"content_block_delta") && kinds.contains(&"message_delta"));
    assert!(
        s["text"]
            .as_str()
            .unwrap()
            .starts_with("mock answer from mock-fast: stream it")
    );
    assert_eq!(s["stop_reason"], "end_turn");
    stop.cancel();
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn sdk_errors_come_in_each_provider_s_shape_and_a_retried_key_runs_once() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let (base, key, stop) = server(&env, Duration::from_secs(60)).await;
    let e = sdk("errors", &base, &key).await;
    assert_eq!(e["openai_401"], json!([401, "invalid_api_key"]), "{e}");
    assert_eq!(
        e["anthropic_401"],
        json!([401, "authentication_error"]),
        "{e}"
    );
    assert_eq!(e["openai_404"], json!([404, "model_not_found"]), "{e}");
    assert_eq!(e["openai_n"], json!([400, "n"]), "{e}");
    // Refused by the server (400), not by the SDK before it sent anything.
    assert_eq!(e["anthropic_max_tokens"], "BadRequestError", "{e}");
    // The task that failed at the provider: 400, and the SDK is told not to send it again.
    assert_eq!(e["openai_failed_task"], json!([400, "false"]), "{e}");
    // Of all of these only that task reached the provider.
    assert_eq!(env.mock.total_calls(), 1);

    let once = sdk("idempotent", &base, &key).await;
    let answers = once["answers"].as_array().unwrap();
    // The retry is a task of its own that copies the first one's answer, billed once.
    assert_eq!(answers[0]["text"], answers[1]["text"], "{once}");
    assert!(
        answers[0]["cost"].as_str().unwrap().parse::<f64>().unwrap() > 0.0,
        "{once}"
    );
    assert_eq!(answers[1]["cost"], "0.000000", "{once}");
    let copy = env
        .wait_final(
            answers[1]["task_id"].as_str().unwrap(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(
        copy.duplicate_of.map(|t| t.to_string()).as_deref(),
        answers[0]["task_id"].as_str()
    );
    assert_eq!(env.mock.calls_with_prompt("once only please"), 1);
    stop.cancel();
    worker.stop().await.unwrap();
}

/// Hostile and broken requests over raw HTTP: each refused with the provider's error shape
/// and status, nothing enqueued; a task that outlives the caller's wait answers 504 with its
/// id, and goes on.
#[tokio::test]
async fn hostile_requests_are_refused_with_nothing_enqueued_and_a_long_task_answers_504() {
    let env = TestEnv::new().await.unwrap();
    let (base, key, stop) = server(&env, Duration::from_secs(60)).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: Vec<u8>| {
        http.post(format!("{base}{path}"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let chat = "/v1/chat/completions";
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (chat, b"{not json".to_vec(), 400),
        (chat, b"[1, 2]".to_vec(), 400),
        (
            chat,
            json!({"model": "mock-fast"}).to_string().into_bytes(),
            400,
        ),
        (
            chat,
            json!({"model": "mock-fast", "messages": "hi"})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            chat,
            json!({"model": 7, "messages": []}).to_string().into_bytes(),
            400,
        ),
        (
            chat,
            json!({"model": "mock-fast", "messages": [{"role": "user", "content": "x"}],
            "stream": "yes"})
            .to_string()
            .into_bytes(),
            400,
        ),
        (
            chat,
            json!({"model": "mock-fast", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]})
            .to_string()
            .into_bytes(),
            400,
        ),
        (
            chat,
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
            400,
        ),
        (chat, vec![b' '; 5 * 1024 * 1024], 413),
        (
            "/v1/messages",
            json!({"model": "mock-fast",
            "messages": [{"role": "user", "content": "no max_tokens"}]})
            .to_string()
            .into_bytes(),
            400,
        ),
        (
            "/v1/messages",
            json!({"model": "mock-fast", "max_tokens": 10,
            "messages": [{"role": "user", "content": [{"type": "image", "source":
                {"type": "url", "url": "ftp://x/y.png"}}]}]})
            .to_string()
            .into_bytes(),
            400,
        ),
    ];
    for (path, body, status) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        let r = post(path, body).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{shown}");
        let e: Value = r.json().await.unwrap();
        if path == chat {
            assert!(e["error"]["message"].is_string(), "OpenAI's shape: {e}");
        } else {
            assert_eq!(e["type"], "error", "Anthropic's shape: {e}");
        }
    }
    // A wrong key and an unknown route.
    let r = http
        .post(format!("{base}{chat}"))
        .bearer_auth("llmq-not-a-key")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = http.get(format!("{base}/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let c = &mut env.redis.conn().await.unwrap();
    let queued: u64 = redis::cmd("XLEN")
        .arg(env.keys.stream())
        .query_async(c)
        .await
        .unwrap();
    assert_eq!(queued, 0, "nothing refused was enqueued");

    // No worker yet: the task waits in the queue past the caller's 1 s, which gets 504 and
    // the task's id; the task runs when a worker comes.
    let caller_trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = http
        .post(format!("{base}{chat}"))
        .bearer_auth(&key)
        .header("llmq-timeout", "1")
        .header("traceparent", caller_trace)
        .json(&json!({"model": "mock-fast", "messages": [{"role": "user", "content": "later"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 504);
    let id = r.headers()["llmq-task-id"].to_str().unwrap().to_owned();
    assert_eq!(r.headers()["x-should-retry"], "false");
    // The task carries the caller's trace, so its spans join it. (A key's tenant puts it in
    // the room: its priority's list of the tenant's tasks.)
    let waiting: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("{}:0:acme", env.keys.room()))
        .arg(0)
        .arg(-1)
        .query_async(c)
        .await
        .unwrap();
    assert_eq!(waiting.len(), 1);
    let task: Value = serde_json::from_str(&waiting[0]).unwrap();
    assert!(
        task["traceparent"]
            .as_str()
            .unwrap()
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{task}"
    );
    let worker = env.worker();
    let record = env.wait_final(&id, Duration::from_secs(20)).await.unwrap();
    assert!(record.output.unwrap().contains("later"));
    // Prometheus counts the answers by route and status, and the waits.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"llmq_serve_requests_total{route="/v1/chat/completions",status="413"}"#,
        r#"llmq_serve_requests_total{route="/v1/messages",status="400"}"#,
        r#"llmq_serve_requests_total{route="/v1/chat/completions",status="504"}"#,
        "llmq_serve_open_requests",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    stop.cancel();
    worker.stop().await.unwrap();
}

/// Without keys the server takes no non-loopback address: anyone who reached it could spend.
#[tokio::test]
async fn without_keys_the_server_refuses_to_listen_beyond_loopback() {
    let env = TestEnv::new().await.unwrap();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let state = ServeState {
        config: None,
        database: None,
        ..state(&env)
    };
    let e = serve(listener, state, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("loopback only"), "{e}");
}

/// The binary: a health check for its probe, and SIGTERM with a request open (its task
/// waiting, no worker) stops it at once; the request is told, and its task stays queued.
#[tokio::test]
async fn the_binary_answers_its_health_check_and_stops_on_sigterm_with_a_request_open() {
    let env = TestEnv::new().await.unwrap();
    let port = llmq_tests::harness::free_port();
    let listen = format!("127.0.0.1:{port}");
    let llmq = llmq_tests::harness::binary("llmq");
    let check = || {
        std::process::Command::new(&llmq)
            .args(["serve", "--health-check", "--listen", &listen])
            .output()
            .unwrap()
    };
    assert_eq!(check().status.code(), Some(1));
    let mut server = std::process::Command::new(&llmq)
        .args(["serve", "--listen", &listen, "--queue", &env.queue])
        .env("REDIS_URL", llmq_tests::harness::redis_url())
        .env_remove("LLMQ_SERVE_KEYS")
        .env_remove("LLMQ_CONFIG")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut up = false;
    for _ in 0..100 {
        if check().status.success() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "llmq serve never answered its health check");
    let open = tokio::spawn(
        reqwest::Client::new()
            .post(format!("http://{listen}/v1/chat/completions"))
            .json(&json!({"model": "mock-fast", "messages": [{"role": "user", "content": "x"}]}))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(killed.unwrap().success());
    let mut status = None;
    for _ in 0..50 {
        if let Some(s) = server.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(status) = status else {
        server.kill().unwrap();
        panic!("llmq serve did not stop within 5 s of SIGTERM");
    };
    assert!(status.success(), "{status:?}");
    let r = open.await.unwrap().unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let id = r.headers()["llmq-task-id"].to_str().unwrap().to_owned();
    let c = &mut env.redis.conn().await.unwrap();
    let queued: u64 = redis::cmd("XLEN")
        .arg(env.keys.stream())
        .query_async(c)
        .await
        .unwrap();
    assert_eq!(queued, 1, "the task of {id} stays in the queue");
}

/// 200 requests at once against a provider limited to 20 calls a 2 s window (a minute's
/// limit, shortened): every one is answered 200, none 429, each called once. A proxy would
/// pass the provider's 429 on; the queue waits (that no window holds more than the limit is
/// the quota suite's).
#[tokio::test]
async fn two_hundred_requests_at_once_against_a_limited_provider_all_answer_200() {
    let env = TestEnv::new().await.unwrap();
    let text = format!(
        "providers:\n  - name: lim{sfx}\n    kind: openai_compatible\n    base_url: {url}/v1\n    \
         api_key: k\n    quotas: {{rpm: 20, window: 2s}}\n    models:\n      \
         - {{id: mock-fast, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}}\n",
        sfx = &env.queue[2..],
        url = env.mock.url()
    );
    let config = llmq_shared::config::Config::parse("limited.yaml", &text, &|_| None).unwrap();
    let mut settings =
        llmq_worker::Settings::new(&llmq_tests::harness::redis_url(), config.clone()).unwrap();
    let base = env.settings();
    settings.queues = base.queues;
    settings.concurrency = 64;
    settings.block = base.block;
    settings.promote_every = base.promote_every;
    let worker = llmq_tests::harness::WorkerHandle::start(settings);
    let (url, key, stop) = server_for(&env, Duration::from_secs(120), config).await;
    let http = reqwest::Client::new();
    let asks = (0..200).map(|i| {
        http.post(format!("{url}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "mock-fast",
                "messages": [{"role": "user", "content": format!("request {i}")}]}))
            .send()
    });
    let answers = futures_util::future::join_all(asks).await;
    let mut statuses = std::collections::BTreeMap::new();
    for a in answers {
        *statuses.entry(a.unwrap().status().as_u16()).or_insert(0) += 1;
    }
    assert_eq!(statuses, std::collections::BTreeMap::from([(200, 200)]));
    let arrived = env.mock.arrivals();
    assert_eq!(arrived.len(), 200);
    stop.cancel();
    worker.stop().await.unwrap();
}

/// An `Idempotency-Key` is the caller's tenant's: another tenant sending the same key with
/// its own request gets its own answer, never the first tenant's.
#[tokio::test]
async fn the_same_idempotency_key_from_two_tenants_makes_two_tasks() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let (base, key_a, stop) = server(&env, Duration::from_secs(60)).await;
    let key_b = another_key(&env, "globex", &[]).await;
    // The server reads the file again once a second at most.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let http = reqwest::Client::new();
    let ask = |key: String, prompt: &'static str| {
        http.post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .header("Idempotency-Key", "order-42")
            .json(&json!({"model": "mock-fast", "messages": [{"role": "user", "content": prompt}]}))
            .send()
    };
    let a: Value = ask(key_a, "acme's secret plan")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = ask(key_b, "globex's question").await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let b: Value = r.json().await.unwrap();
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(text(&a).contains("acme's secret plan"), "{a}");
    assert!(text(&b).contains("globex's question"), "{b}");
    assert_eq!(env.mock.total_calls(), 2);
    stop.cancel();
    worker.stop().await.unwrap();
}

/// Issue 70's batches: a file of OpenAI's Batch guide uploaded with `client.files`, run with
/// `client.batches` (each line a task), its output parsed by the SDK; a file with a line llmq
/// cannot run fails whole, naming the line, with nothing enqueued; Anthropic's Message
/// Batches through `client.messages.batches`.
#[tokio::test]
async fn the_sdks_run_batches_through_files_and_batches() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let (base, key, stop) = server(&env, Duration::from_secs(60)).await;

    let b = sdk("openai_batch", &base, &key).await;
    assert_eq!(b["created"], "validating", "{b}");
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(b["purpose"], "batch");
    assert!(b["bytes"].as_u64().unwrap() > 100, "{b}");
    assert_eq!(
        b["counts"],
        json!({"total": 3, "completed": 3, "failed": 0}),
        "{b}"
    );
    assert_eq!(b["metadata"], json!({"job": "nightly"}));
    assert_eq!(b["error_file"], Value::Null);
    assert_eq!(
        (&b["listed"], &b["file_listed"], &b["deleted"], &b["gone"]),
        (&json!(true), &json!(true), &json!(true), &json!(true)),
        "{b}"
    );
    let results = b["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{b}");
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["custom_id"], format!("request-{i}"));
        assert_eq!(r["status"], 200);
        assert_eq!(r["model"], "mock-fast");
        let text = r["text"].as_str().unwrap();
        assert!(
            text.starts_with(&format!(
                "mock answer from mock-fast: line {i}: hello world"
            )),
            "{text}"
        );
        assert_eq!(
            env.mock
                .calls_with_prompt(&format!("line {i}: hello world")),
            1
        );
    }

    let bad = sdk("openai_batch_bad", &base, &key).await;
    assert_eq!(bad["status"], "failed", "{bad}");
    assert_eq!(bad["output_file"], Value::Null);
    let errors = bad["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{bad}");
    assert_eq!(errors[0]["line"], 3, "{bad}");
    assert!(
        errors[0]["message"].as_str().unwrap().contains("`url`"),
        "{bad}"
    );
    assert_eq!(bad["missing"]["param"], "input_file_id", "{bad}");
    assert_eq!(bad["purpose"]["param"], "purpose", "{bad}");
    // The failed batch's good lines were never enqueued.
    assert_eq!(env.mock.calls_with_prompt("line 0: hello world"), 1);

    let m = sdk("anthropic_batch", &base, &key).await;
    assert_eq!(m["created"], "in_progress", "{m}");
    assert_eq!(m["status"], "ended", "{m}");
    assert_eq!(m["listed"], true);
    assert_eq!(m["counts"]["succeeded"], 2, "{m}");
    assert_eq!(m["counts"]["errored"], 0, "{m}");
    let results = m["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{m}");
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["custom_id"], format!("first-{i}"));
        assert_eq!(r["type"], "succeeded");
        assert!(
            r["text"]
                .as_str()
                .unwrap()
                .starts_with(&format!("mock answer from mock-fast: anthropic batch {i}")),
            "{m}"
        );
    }
    assert_eq!(m["bad"]["error"]["type"], "invalid_request_error", "{m}");
    stop.cancel();
    worker.stop().await.unwrap();
}

/// `llmq serve` SIGKILLed while its batch waits on its tasks: another replica takes the
/// batch up once the lease has lapsed, and every request is answered, each called once.
#[tokio::test]
async fn a_batch_outlives_its_server_killed_and_runs_each_request_once() {
    let env = TestEnv::new().await.unwrap();
    let llmq = llmq_tests::harness::binary("llmq");
    let start = || {
        let port = llmq_tests::harness::free_port();
        let listen = format!("127.0.0.1:{port}");
        let child = std::process::Command::new(&llmq)
            .args(["serve", "--listen", &listen, "--queue", &env.queue])
            .args(["--batch-lease", "2s"])
            .env("REDIS_URL", llmq_tests::harness::redis_url())
            .env("DATABASE_URL", llmq_tests::harness::database_url())
            .env_remove("LLMQ_SERVE_KEYS")
            .env_remove("LLMQ_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        (format!("http://{listen}"), Server(child))
    };
    let up = |base: String| async move {
        for _ in 0..100 {
            if reqwest::get(format!("{base}/healthz")).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("llmq serve never answered at {base}");
    };
    let (first, a) = start();
    up(first.clone()).await;
    let made = sdk_with(&["openai_batch_start", "40"], &first, "none").await;
    let id = made["id"].as_str().unwrap().to_owned();
    let refused = &made["delete_refused"];
    assert_eq!(refused["status"], 409, "{made}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("cancel the batch"),
        "{made}"
    );
    // No worker yet: the batch's tasks wait in the queue, the server waits on them.
    env.eventually(
        "the batch's 40 tasks enqueued",
        Duration::from_secs(30),
        || async { env.redis.batch_progress(&env.keys, &id).await.unwrap() == 40 },
    )
    .await
    .unwrap();
    drop(a);
    let worker = env.worker();
    let (second, b) = start();
    up(second.clone()).await;
    let done = sdk_with(&["openai_batch_wait", &id], &second, "none").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["counts"],
        json!({"total": 40, "completed": 40, "failed": 0}),
        "{done}"
    );
    let mut ids: Vec<&str> = done["custom_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 40, "{done}");
    for i in 0..40 {
        assert_eq!(
            env.mock
                .calls_with_prompt(&format!("kill {i}: hello world")),
            1,
            "request {i}"
        );
    }
    drop(b);
    worker.stop().await.unwrap();
}

/// A batch whose runs keep failing (here Redis refuses its progress mark, a key of the
/// wrong type) is tried again, each time later, and fails after the last try with the
/// reason: not run in a loop for ever. A batch whose input file is gone fails at once,
/// naming it, rather than reading it as empty and ending with no requests. One taken up
/// after it expired enqueues nothing and ends `expired`.
#[tokio::test]
async fn a_batch_whose_runs_keep_failing_fails_with_the_reason() {
    let env = TestEnv::new().await.unwrap();
    let pool = env.ledger.pool().clone();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let (failing, orphan, late, file) = (
        format!("batch_f{suffix}"),
        format!("batch_o{suffix}"),
        format!("batch_l{suffix}"),
        format!("file-{suffix}"),
    );
    batch_file(&pool, &file, 1).await;
    for (id, input, expires) in [
        (&failing, file.as_str(), "1 day"),
        (&orphan, "file-gone", "1 day"),
        (&late, file.as_str(), "-1 minute"),
    ] {
        open_batch(&pool, id, &env.queue, input, expires, 1).await;
    }
    let mark = env.keys.kept(&format!("enqueued:{failing}"));
    let _: () = redis::cmd("RPUSH")
        .arg(&mark)
        .arg("not a count")
        .query_async(&mut env.redis.conn().await.unwrap())
        .await
        .unwrap();
    let (_, stop) = spawn(ServeState {
        batch_lease: Duration::from_millis(50),
        ..state(&env)
    })
    .await;
    let row = |id: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, i32, Option<Value>)>(
                "SELECT status, failed_runs, errors FROM serve_batches WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    env.eventually("the batches ended", Duration::from_secs(120), || async {
        row(failing.clone()).await.0 == "failed"
            && row(orphan.clone()).await.0 == "failed"
            && row(late.clone()).await.0 == "expired"
    })
    .await
    .unwrap();
    let (_, runs, errors) = row(failing.clone()).await;
    assert_eq!(runs, 8, "{errors:?}");
    let errors = errors.unwrap();
    assert_eq!(errors[0]["code"], "batch_failed", "{errors}");
    let message = errors[0]["message"].as_str().unwrap();
    assert!(
        message.contains("after 8 runs that failed") && message.contains("WRONGTYPE"),
        "{message}"
    );
    let (_, runs, errors) = row(orphan.clone()).await;
    assert_eq!(runs, 0, "{errors:?}");
    let errors = errors.unwrap();
    assert_eq!(errors[0]["code"], "file_gone", "{errors}");
    assert!(
        errors[0]["message"].as_str().unwrap().contains("file-gone"),
        "{errors}"
    );
    let (expired, output): (i32, Option<String>) =
        sqlx::query_as("SELECT expired, error_file_id FROM serve_batches WHERE id = $1")
            .bind(&late)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(expired, 1);
    assert!(output.is_some(), "the expired request is in the error file");
    let queued: u64 = redis::cmd("XLEN")
        .arg(env.keys.stream())
        .query_async(&mut env.redis.conn().await.unwrap())
        .await
        .unwrap();
    assert_eq!(queued, 0, "the batches enqueued nothing");
    stop.cancel();
}

/// A second key for `tenant` (with `extra` flags of `llmq keys create`) in the keys file of
/// [`server`], which the server reads again when it changes.
async fn another_key(env: &TestEnv, tenant: &str, extra: &[&str]) -> String {
    let file = std::env::temp_dir()
        .join(format!("llmq-serve-{}", env.queue))
        .join("keys.jsonl");
    let mut args = vec![
        "keys",
        "create",
        "--file",
        file.to_str().unwrap(),
        "--tenant",
        tenant,
    ];
    args.extend_from_slice(extra);
    let (code, printed) = env.cli(&args).await;
    assert_eq!(code, 0, "{printed}");
    printed.lines().next().unwrap().to_owned()
}

/// A server process, SIGKILLed when dropped (a failed test leaves none behind).
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A key's own limit (`llmq keys create --requests-per-minute`), shared by every replica: past
/// it, 429 with `retry-after` (the one 429 the server gives, which the SDKs wait out and
/// send again), in the provider's shape, and nothing enqueued.
#[tokio::test]
async fn a_key_past_its_own_limit_gets_429_with_retry_after_and_nothing_runs() {
    let env = TestEnv::new().await.unwrap();
    let worker = env.worker();
    let (base, _, stop) = server(&env, Duration::from_secs(60)).await;
    // A second key, limited, in the file the server reads again when it changes.
    let limited = another_key(&env, "acme", &["--requests-per-minute", "2"]).await;
    // The limit counts clock minutes: three requests within one.
    let second = chrono::Utc::now().timestamp() % 60;
    if second > 50 {
        tokio::time::sleep(Duration::from_secs((61 - second) as u64)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let http = reqwest::Client::new();
    let ask = |i: usize| {
        http.post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&limited)
            .json(&json!({"model": "mock-fast",
                "messages": [{"role": "user", "content": format!("limited {i}")}]}))
            .send()
    };
    for i in 0..2 {
        let r = ask(i).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    }
    let r = ask(2).await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "retry-after {wait}");
    assert_eq!(r.headers()["x-should-retry"], "true");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(env.mock.calls_with_prompt("limited 2"), 0);
    assert_eq!(env.stream_len().await, 0);
    stop.cancel();
    worker.stop().await.unwrap();
}

/// A tenant's files and batches are its own: another tenant's key finds none of them (404,
/// as for one that does not exist), cannot run a batch on its file, cancel its batch, or see
/// them listed.
#[tokio::test]
async fn another_tenant_finds_none_of_a_tenant_s_files_or_batches() {
    let env = TestEnv::new().await.unwrap();
    let (base, acme, stop) = server(&env, Duration::from_secs(60)).await;
    let globex = another_key(&env, "globex", &[]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let http = reqwest::Client::new();
    let line = json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "mock-fast", "messages": [{"role": "user", "content": "mine"}]}});
    let form = format!(
        "--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n{line}\n\r\n--b--\r\n"
    );
    let made: Value = http
        .post(format!("{base}/v1/files"))
        .bearer_auth(&acme)
        .header("content-type", "multipart/form-data; boundary=b")
        .body(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let file_id = made["id"].as_str().unwrap().to_owned();
    let batch: Value = http
        .post(format!("{base}/v1/batches"))
        .bearer_auth(&acme)
        .json(
            &json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let batch_id = batch["id"].as_str().unwrap().to_owned();
    let status = |r: reqwest::Response| r.status().as_u16();
    let as_globex = |method: reqwest::Method, path: String| {
        http.request(method, format!("{base}{path}"))
            .bearer_auth(&globex)
    };
    use reqwest::Method;
    for (method, path) in [
        (Method::GET, format!("/v1/files/{file_id}")),
        (Method::GET, format!("/v1/files/{file_id}/content")),
        (Method::DELETE, format!("/v1/files/{file_id}")),
        (Method::GET, format!("/v1/batches/{batch_id}")),
        (Method::POST, format!("/v1/batches/{batch_id}/cancel")),
    ] {
        let r = as_globex(method.clone(), path.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(status(r), 404, "{method} {path}");
    }
    let r = as_globex(Method::POST, "/v1/batches".into())
        .json(
            &json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 400);
    for path in ["/v1/files", "/v1/batches"] {
        let listed = as_globex(Method::GET, path.into())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            !listed.contains(&file_id) && !listed.contains(&batch_id),
            "{path}: {listed}"
        );
    }
    // The owner still has both.
    let r = http
        .get(format!("{base}/v1/files/{file_id}"))
        .bearer_auth(&acme)
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 200);
    let r = http
        .get(format!("{base}/v1/batches/{batch_id}"))
        .bearer_auth(&acme)
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 200);
    stop.cancel();
}

/// A caller that leaves before its task started takes it back (one with an Idempotency-Key
/// does not: its retry waits for the same task); a batch cancelled with its tasks queued
/// ends with none of them run.
#[tokio::test]
async fn a_caller_that_leaves_and_a_cancelled_batch_take_their_queued_tasks_back() {
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let pool = env.ledger.pool().clone();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let (batch, file) = (format!("batch_c{suffix}"), format!("file-{suffix}"));
    batch_file(&pool, &file, 20).await;
    open_batch(&pool, &batch, &env.queue, &file, "1 day", 20).await;
    let (base, stop) = spawn(state(&env)).await;
    // No worker yet: the batch's tasks and the requests wait in the queue.
    env.eventually(
        "the batch's tasks are queued",
        Duration::from_secs(30),
        || async { env.stream_len().await >= 20 },
    )
    .await
    .unwrap();
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    let ask = json!({"model": "mock-fast", "messages": [{"role": "user", "content": "hi"}]});
    let chat = format!("{base}/v1/chat/completions");
    assert!(impatient.post(&chat).json(&ask).send().await.is_err());
    assert!(
        impatient
            .post(&chat)
            .header("idempotency-key", format!("k-{suffix}"))
            .json(&ask)
            .send()
            .await
            .is_err()
    );
    let cancelled = reqwest::Client::new()
        .post(format!("{base}/v1/batches/{batch}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    let left = env
        .eventually(
            "the caller's task is taken back",
            Duration::from_secs(30),
            || async {
                let marks = env.redis.cancel_marks(&env.keys, 0).await.unwrap();
                marks
                    .iter()
                    .filter(|(m, _)| m.starts_with("queued:"))
                    .count()
                    == 1
            },
        )
        .await;
    left.unwrap();
    let tasks = env.stream_tasks("-", "+").await.unwrap();
    let id_of = |keyed: bool| {
        tasks
            .iter()
            .find(|t| t.get("batch_id").is_none() && t.get("idempotency_key").is_some() == keyed)
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .unwrap()
    };
    let (gone, kept) = (id_of(false), id_of(true));

    let w = env.worker();
    let r = env.wait_final(&gone, WAIT).await.unwrap();
    assert_eq!(r.status, Status::Cancelled, "{r:?}");
    assert!(r.error.unwrap().contains("its caller left"));
    let r = env.wait_final(&kept, WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    env.eventually("the batch ended", Duration::from_secs(60), || async {
        let status: String = sqlx::query_scalar("SELECT status FROM serve_batches WHERE id = $1")
            .bind(&batch)
            .fetch_one(&pool)
            .await
            .unwrap();
        status == "cancelled"
    })
    .await
    .unwrap();
    let (completed, cancelled): (i32, i32) =
        sqlx::query_as("SELECT completed, cancelled FROM serve_batches WHERE id = $1")
            .bind(&batch)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((completed, cancelled), (0, 20));
    let called: i64 = sqlx::query_scalar("SELECT count(*) FROM provider_calls WHERE queue = $1")
        .bind(&env.queue)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(called, 1, "only the keyed request's task was called");
    w.stop().await.unwrap();
    stop.cancel();
}

//! Provider prompt caching (issue 36): the worker marks a long stable prefix for
//! Anthropic's cache, llmq-mock caches marked prefixes as Anthropic does (written once,
//! then read), and the ledger prices cache reads and writes at their own rates.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq_shared::config::Config;
use llmq_shared::envelope::Envelope;
use llmq_shared::outcome::Status;
use llmq_tests::harness::{TestEnv, WorkerHandle};

const INPUT: f64 = 3.0;
const OUTPUT: f64 = 15.0;
const CACHED: f64 = 0.3;

/// One Anthropic provider, named after the test's queue (the ledger is shared).
fn anthropic_only(name: &str, mock_url: &str) -> Config {
    let text = format!(
        "providers:\n  - name: {name}\n    kind: anthropic\n    base_url: \"{mock_url}\"\n    api_key: k\n    models:\n      - {{id: claude-sonnet-4-5, input_usd_per_mtok: {INPUT}, output_usd_per_mtok: {OUTPUT}, cached_input_usd_per_mtok: {CACHED}}}\n"
    );
    Config::parse("anthropic.yaml", &text, &|_| None).unwrap()
}

async fn run(env: &TestEnv, tasks: &[Envelope]) {
    for t in tasks {
        env.redis.enqueue(&env.keys, t).await.unwrap();
        // One at a time: the first call has written the prefix before the next asks.
        let r = env
            .wait_final(&t.id.unwrap(), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
}

#[tokio::test]
async fn a_shared_system_prompt_is_written_once_then_read_and_the_ledger_bills_what_the_provider_did()
 {
    let env = TestEnv::new().await.unwrap();
    let mut settings = env.settings();
    let provider = format!("claude-{}", env.queue);
    settings.config = anthropic_only(&provider, &env.mock.url());
    let worker = WorkerHandle::start(settings);
    // 6,000 characters: about 1,500 tokens, over Sonnet's 1,024-token minimum.
    let instructions = "Classify the document by its tone and topic. ".repeat(134);
    let task = |doc: &str| Envelope {
        system: Some(instructions.clone().into()),
        ..Envelope::new(format!("The document: {doc}"))
    };
    run(&env, &[task("one"), task("two"), task("three")]).await;
    let [_, read, written, _] = env.mock.anthropic_billed();
    assert!(
        written > 1024,
        "the first call writes the prefix: {written}"
    );
    assert_eq!(read, 2 * written, "the next two read what the first wrote");

    // Turned off by the task: the prefix is sent unmarked, so nothing is read or written.
    let before = env.mock.anthropic_billed();
    run(
        &env,
        &[Envelope {
            prompt_cache: Some(false),
            ..task("four")
        }],
    )
    .await;
    let after = env.mock.anthropic_billed();
    assert_eq!((after[1], after[2]), (before[1], before[2]), "{after:?}");
    assert!(after[0] > before[0] + 1024, "all of it is plain input");

    // The ledger (written by the time the worker has stopped): every token the provider
    // reported, cache reads at the cached price and writes at 1.25 times the input price.
    worker.stop().await.unwrap();
    let [fresh, read, written, output] = after;
    let want = (fresh as f64 * INPUT
        + read as f64 * CACHED
        + written as f64 * INPUT * 1.25
        + output as f64 * OUTPUT)
        / 1e6;
    let (tokens, cached, writes, cost): (i64, i64, i64, f64) = sqlx::query_as(
        "SELECT sum(input_tokens)::int8, sum(cached_tokens)::int8,
            sum(cache_write_tokens)::int8, sum(cost_usd)::float8
         FROM provider_calls WHERE queue = $1 AND outcome = 'ok'",
    )
    .bind(&env.queue)
    .fetch_one(env.ledger.pool())
    .await
    .unwrap();
    assert_eq!(tokens as u64, fresh + read + written);
    assert_eq!(cached as u64, read);
    assert_eq!(writes as u64, written);
    assert!((cost - want).abs() < 1e-9, "ledger {cost} against {want}");

    // `llmq costs` says what caching saved against list prices: each read at the input price
    // less the cached price, less each write's premium over the input price.
    let (code, out) = env
        .cli(&[
            "costs",
            "--format",
            "json",
            "--database-url",
            &llmq_tests::harness::database_url(),
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let line = report["breakdown"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["key"] == provider.as_str())
        .unwrap_or_else(|| panic!("{provider} in {out}"));
    let saved = (read as f64 * (INPUT - CACHED) - written as f64 * INPUT * 0.25) / 1e6;
    assert!(saved > 0.0);
    let reported = line["saved_usd"].as_f64().unwrap();
    assert!(
        (reported - saved).abs() < 1e-9,
        "{reported} against {saved}: {line}"
    );
}

#[tokio::test]
async fn a_batch_sharing_a_prefix_is_sent_after_one_call_has_warmed_the_cache() {
    let env = TestEnv::new().await.unwrap();
    let mut settings = env.settings();
    let provider = format!("claude-{}", env.queue);
    settings.config = anthropic_only(&provider, &env.mock.url());
    settings.concurrency = 16;
    let worker = WorkerHandle::start(settings);
    let instructions = "Classify the document by its tone and topic. ".repeat(134);
    // Sixteen tasks sharing the prefix, enqueued at once, every call taking 300 ms: without
    // the warm-up, each of the first sixteen would be sent before any answer and write it.
    let tasks: Vec<Envelope> = (0..16)
        .map(|i| Envelope {
            system: Some(instructions.clone().into()),
            ..Envelope::new(format!("The document: number {i} [[mock:slow-300]]"))
        })
        .collect();
    for t in &tasks {
        env.redis.enqueue(&env.keys, t).await.unwrap();
    }
    for t in &tasks {
        let r = env
            .wait_final(&t.id.unwrap(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
    worker.stop().await.unwrap();
    let [_, read, written, _] = env.mock.anthropic_billed();
    assert!(written > 1024, "one call wrote the prefix: {written}");
    assert_eq!(read, 15 * written, "and the fifteen others read it");
}

#[tokio::test]
async fn calls_sharing_a_warm_prefix_stay_on_the_model_whose_cache_holds_it() {
    let env = TestEnv::new().await.unwrap();
    let mut settings = env.settings();
    let provider = format!("claude-{}", env.queue);
    // Two models: routing (`cheapest`) picks haiku, but sonnet's cache is warm.
    let text = format!(
        "providers:\n  - name: {provider}\n    kind: anthropic\n    base_url: \"{}\"\n    api_key: k\n    models:\n      - {{id: claude-sonnet-4-5, input_usd_per_mtok: {INPUT}, output_usd_per_mtok: {OUTPUT}}}\n      - {{id: claude-haiku-4-5, input_usd_per_mtok: 1, output_usd_per_mtok: 5}}\n",
        env.mock.url()
    );
    settings.config = Config::parse("anthropic.yaml", &text, &|_| None).unwrap();
    let instructions = "Classify the document by its tone and topic. ".repeat(400);
    let task = |doc: &str| Envelope {
        system: Some(instructions.clone().into()),
        ..Envelope::new(format!("The document: {doc}"))
    };
    let cold = task("one");
    let config = settings.config.clone();
    let worker = WorkerHandle::start(settings);
    env.redis.enqueue(&env.keys, &cold).await.unwrap();
    let r = env
        .wait_final(&cold.id.unwrap(), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        r.model.as_deref(),
        Some("claude-haiku-4-5"),
        "the cheapest, cold"
    );

    // Sonnet's cache is warm now (as another worker's call would have left it).
    let p = config.provider(&provider).unwrap();
    let req = llmq_shared::provider::Request::of(&cold, "claude-sonnet-4-5", p);
    let hash = llmq_shared::answer_cache::warm_prefix(&req, p.kind).unwrap();
    let mut c = env.redis.conn().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(env.keys.kept(&llmq_shared::queue::warm_name(&hash)))
        .arg(format!("{provider}/claude-sonnet-4-5"))
        .arg("PX")
        .arg(60_000)
        .query_async(&mut c)
        .await
        .unwrap();
    let warm = task("two");
    env.redis.enqueue(&env.keys, &warm).await.unwrap();
    let r = env
        .wait_final(&warm.id.unwrap(), Duration::from_secs(30))
        .await
        .unwrap();
    worker.stop().await.unwrap();
    assert_eq!(
        r.model.as_deref(),
        Some("claude-sonnet-4-5"),
        "pinned to the warm cache"
    );
}

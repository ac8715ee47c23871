#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]
//! The property every chain must have, over a seeded generator of random chains (every kind
//! that needs no person, hints, `escalate`, `on_reject`, `distinct`, `min_success`,
//! `max_parallel`, fan-outs and joins) against llmq-mock models that fail in every way:
//! every chain ends, and the calls it causes stay within the bound its spec gives
//! (docs/wire-format.md, "Every step runs a bounded number of times").

use std::collections::HashMap;
use std::time::{Duration, Instant};

use llmq_shared::config::{CheckConfig, Config};
use llmq_tests::harness::{SeededRng, TestEnv, WorkerHandle};
use serde_json::{Value, json};

/// The models, each a way llmq-mock answers: fine, slowly, retryable 5xx, fatal 4xx,
/// context too long, flaky, reviews that approve or reject, a judge.
const MODELS: &[(&str, &str)] = &[
    ("mock-fast", "fast"),
    ("slow-300", "standard"),
    ("fail-500", "fast"),
    ("fail-400", "standard"),
    ("context-too-long", "fast"),
    ("flaky", "standard"),
    ("review-approve", "advanced"),
    ("review-reject", "advanced"),
    ("review-reject-once", "standard"),
    ("judge-first", "advanced"),
];
const MAX_ROUNDS: u32 = 3;
const TRIES: u32 = 2;

fn chance(rng: &mut SeededRng, percent: usize) -> bool {
    rng.below(100) < percent
}

fn pick<'a, T>(rng: &mut SeededRng, items: &'a [T]) -> &'a T {
    &items[rng.below(items.len())]
}

/// A random chain and the most calls it may cause.
fn chain(rng: &mut SeededRng, id: &str, provider: &str) -> (Value, u64) {
    let n = 1 + rng.below(6);
    let mut steps: Vec<Value> = Vec::new();
    let mut bound = 0u64;
    for i in 0..n {
        let name = format!("s{i}");
        let parents: Vec<String> = (0..i)
            .filter(|_| chance(rng, 40))
            .map(|p| format!("s{p}"))
            .collect();
        let kinds: &[&str] = match parents.len() {
            0 => &["llm"],
            1 => &["llm", "review", "check"],
            _ => &["llm", "judge", "consensus"],
        };
        let kind = *pick(rng, kinds);
        let mut step =
            json!({"name": name, "after": parents, "kind": kind, "prompt": format!("work {i}")});
        let attempts = 1 + rng.below(3) as u64;
        step["max_attempts"] = json!(attempts);
        if kind != "consensus" && kind != "check" && chance(rng, 70) {
            step["model"] = json!(pick(rng, MODELS).0);
        } else if chance(rng, 30) {
            step["provider"] = json!(provider);
        }
        if matches!(kind, "llm" | "judge" | "review") && chance(rng, 40) {
            step["escalate"] = json!(true);
        }
        if matches!(kind, "judge" | "consensus") {
            step["min_success"] = json!(1 + rng.below(parents.len()));
        }
        if matches!(kind, "review" | "judge") && chance(rng, 50) {
            step["distinct"] = json!(*pick(rng, &["model", "provider"]));
        }
        if kind == "check" {
            step["command"] = json!(*pick(rng, &["pass", "fail"]));
        }
        if matches!(kind, "review" | "check") && chance(rng, 60) {
            step["on_reject"] = json!({"rerun": parents[0], "max_rounds": 1 + rng.below(MAX_ROUNDS as usize),
                                       "escalate": chance(rng, 50)});
        }
        // Each run of the step: its attempts, each trying every model at most TRIES times.
        bound += u64::from(1 + MAX_ROUNDS) * attempts * MODELS.len() as u64 * u64::from(TRIES);
        steps.push(step);
    }
    let mut spec = json!({"v": 1, "chain_id": id, "steps": steps});
    if chance(rng, 30) {
        spec["on_failure"] = json!("fail_chain");
    }
    if chance(rng, 30) {
        spec["max_parallel"] = json!(1 + rng.below(3));
    }
    // Whoever sends work back to a step (its review, a check, an escalation, a retry), its
    // rounds are bounded by max_rounds: the bound is the sum over its steps, as
    // docs/wire-format.md states it.
    (spec, bound)
}

#[tokio::test]
async fn every_random_chain_ends_within_its_call_bound() {
    let env = TestEnv::new().await.unwrap();
    // Circuit breakers are shared by every worker on this Redis: a provider of its own.
    let provider = format!("prop-{}", env.queue);
    let models: String = MODELS
        .iter()
        .map(|(id, tier)| format!("      - {{id: {id}, tier: {tier}, input_usd_per_mtok: 1, output_usd_per_mtok: 1}}\n"))
        .collect();
    let text = format!(
        "providers:\n  - name: {provider}\n    kind: openai_compatible\n    base_url: {}/v1\n    api_key: k\n    models:\n{models}\
         routing:\n  retry: {{tries_per_provider: {TRIES}, backoff: [10ms, 20ms]}}\n  max_wait: 3s\n\
         chains: {{max_rounds: {MAX_ROUNDS}}}\n",
        env.mock.url()
    );
    let mut s = env.settings();
    s.config = Config::parse("property.yaml", &text, &|_| None).unwrap();
    s.concurrency = 64;
    s.retry_max = Duration::from_millis(100);
    for (name, program) in [("pass", "true"), ("fail", "false")] {
        s.config.checks.insert(
            name.into(),
            CheckConfig {
                program: program.into(),
                args: Vec::new(),
                env: Default::default(),
                timeout: Duration::from_secs(5),
            },
        );
    }
    let w = WorkerHandle::start(s);
    env.redis.ensure_group(&env.keys).await.unwrap();

    let mut rng = SeededRng(0x5EED_CAFE_F00D_0001);
    let cases = 200;
    let mut bounds = HashMap::new();
    for case in 0..cases {
        let id = format!("{}-p{case}", env.queue);
        let (spec, bound) = chain(&mut rng, &id, &provider);
        env.xadd("chain", spec.to_string().as_bytes())
            .await
            .unwrap();
        bounds.insert(id, (bound, spec));
    }
    // Every chain ends: expanded and finished, or refused whole as a dead letter.
    let started = Instant::now();
    loop {
        let refused: Vec<String> = env
            .redis
            .dead_letters(&env.keys, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|d| d.error.starts_with("the chain is invalid"))
            .map(|d| d.error)
            .collect();
        let mut running = Vec::new();
        for id in bounds.keys() {
            match env.redis.chain(&env.keys, id).await.unwrap() {
                Some(c) if c.state == "running" => running.push(id.clone()),
                _ => {}
            }
        }
        let expanded = {
            let mut n = 0;
            for id in bounds.keys() {
                n += usize::from(env.redis.chain(&env.keys, id).await.unwrap().is_some());
            }
            n
        };
        if running.is_empty() && expanded + refused.len() == bounds.len() {
            // Most chains must run, or the generator tests nothing.
            assert!(
                expanded >= cases * 3 / 4,
                "only {expanded} of {cases} ran: {refused:#?}"
            );
            eprintln!(
                "property: {expanded} ran, {} refused, in {:?}",
                refused.len(),
                started.elapsed()
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "chains still running after 240 s: {running:?}\n{:#}",
            bounds[&running[0]].1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.stop().await.unwrap();

    // Within its bound, by the ledger, which holds every call llmq-mock received.
    let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT chain_id, count(*) FROM provider_calls WHERE queue = $1 GROUP BY chain_id",
    )
    .bind(&env.queue)
    .fetch_all(env.ledger.pool())
    .await
    .unwrap();
    let total: i64 = rows.iter().map(|(_, n)| n).sum();
    assert_eq!(
        u64::try_from(total).unwrap(),
        env.mock.total_calls(),
        "the ledger and llmq-mock disagree"
    );
    for (chain, calls) in rows {
        let chain = chain.unwrap();
        let (bound, spec) = &bounds[&chain];
        assert!(
            u64::try_from(calls).unwrap() <= *bound,
            "chain {chain} made {calls} calls, over its bound {bound}: {spec:#}"
        );
    }
}

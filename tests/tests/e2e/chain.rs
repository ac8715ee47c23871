//! Chains through real workers, the real Redis and Postgres, and llmq-mock over HTTP:
//! submitted with one XADD, expanded once, handoffs resolved, fan-out and joins, reviews by
//! another model, failures cancelling what depends on them, and bad chains as dead letters.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use llmq_shared::chain::ChainState;
use llmq_tests::harness::{AsTaskId, TestEnv, WorkerHandle};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

async fn submit(env: &TestEnv, chain: &Value) -> String {
    env.redis.ensure_group(&env.keys).await.unwrap();
    env.xadd("chain", chain.to_string().as_bytes())
        .await
        .unwrap()
}

/// Waits until chain `id` is no longer running.
async fn finished(env: &TestEnv, id: &str) -> ChainState {
    env.chain_ended(id, WAIT).await
}

async fn output(env: &TestEnv, c: &ChainState, step: &str) -> String {
    env.step_output(c, step).await
}

fn status<'a>(c: &'a ChainState, step: &str) -> &'a str {
    c.steps[step].status.as_str()
}

#[tokio::test]
async fn a_chain_submitted_with_one_xadd_runs_in_order_with_its_handoffs() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    let chain = json!({"v": 1, "chain_id": format!("{}-linear", env.queue),
        "vars": {"input": "the billing service"},
        "steps": [
            {"name": "plan", "prompt": "Plan: {{input}}", "type": "planning"},
            {"name": "impl", "after": ["plan"], "prompt": "Implement {{plan.output}}", "model": "mock-smart"},
            {"name": "docs", "after": ["impl"], "prompt": "Document {{impl.summary}}", "type": "documentation"}]});
    submit(&env, &chain).await;
    let c = finished(&env, &format!("{}-linear", env.queue)).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    for s in ["plan", "impl", "docs"] {
        assert_eq!(status(&c, s), "succeeded");
    }
    assert_eq!(
        output(&env, &c, "plan").await,
        "mock answer from mock-fast: Plan: the billing service"
    );
    // The mock echoes the start of the prompt it got: the plan's output was inlined.
    assert_eq!(
        output(&env, &c, "impl").await,
        "mock answer from mock-smart: Implement mock answer from mock-fast: Plan: the billing serv"
    );
    assert!(
        output(&env, &c, "docs")
            .await
            .starts_with("mock answer from mock-fast: Document mock answer from mock-smart"),
    );
    assert_eq!(c.steps["impl"].model.as_deref(), Some("mock-smart"));
    assert!(c.steps["impl"].cost_usd > 0.0);
    // An ended chain's keys expire like its results (the test worker keeps them 7 days).
    let mut conn = env.redis.conn().await.unwrap();
    let linear = format!("{}-linear", env.queue);
    for key in [
        env.keys.chain(&linear),
        env.keys.chain_steps(&linear),
        env.keys.chain_tasks(&linear),
    ] {
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 3600, "{key}: {ttl}");
    }
    assert!(c.steps["plan"].summary.is_some());
    // Every step is billed under the chain.
    let (code, out) = env
        .cli(&[
            "costs",
            "--chain-id",
            &format!("{}-linear", env.queue),
            "--database-url",
            &llmq_tests::harness::database_url(),
            "--format",
            "json",
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"tasks\": 3"), "{out}");
    w.stop().await.unwrap();
}

#[tokio::test]
async fn the_same_chain_id_submitted_twice_runs_once() {
    let env = TestEnv::new().await.unwrap();
    let id = format!("{}-twice", env.queue);
    let chain = json!({"v": 1, "chain_id": id, "steps": [
        {"name": "a", "prompt": "once"},
        {"name": "b", "after": ["a"], "prompt": "then {{a.summary}}"}]});
    submit(&env, &chain).await;
    submit(&env, &chain).await;
    let w = env.worker();
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "succeeded");
    // Let a second expansion, if there were one, run its steps too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.calls().await.unwrap().len(), 2, "two steps, two calls");
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!((counts.ready, counts.in_flight, counts.dead), (0, 0, 0));
    w.stop().await.unwrap();
}

#[tokio::test]
async fn fan_out_then_a_judge_picks_and_a_consensus_counts() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    let id = format!("{}-fan", env.queue);
    let chain = json!({"v": 1, "chain_id": id, "steps": [
        {"name": "ask", "prompt": "Question"},
        {"name": "a", "after": ["ask"], "prompt": "Answer A: {{ask.summary}}", "model": "mock-fast"},
        {"name": "b", "after": ["ask"], "prompt": "Answer B: {{ask.summary}}", "model": "mock-smart"},
        {"name": "pick", "kind": "judge", "after": ["a", "b"], "model": "judge-last"},
        {"name": "same1", "after": ["ask"], "prompt": "Say yes"},
        {"name": "same2", "after": ["ask"], "prompt": "Say yes"},
        {"name": "other", "after": ["ask"], "prompt": "Say no"},
        {"name": "vote", "kind": "consensus", "after": ["same1", "same2", "other"]}]});
    submit(&env, &chain).await;
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    assert_eq!(
        output(&env, &c, "pick").await,
        output(&env, &c, "b").await,
        "judge-last picks the last candidate, b"
    );
    assert_eq!(
        output(&env, &c, "vote").await,
        output(&env, &c, "same1").await
    );
    assert_eq!(c.steps["vote"].model, None, "a consensus makes no call");
    w.stop().await.unwrap();
}

#[tokio::test]
async fn max_parallel_runs_a_chains_parallel_steps_one_at_a_time() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    let id = format!("{}-paced", env.queue);
    let chain = json!({"v": 1, "chain_id": id, "max_parallel": 1, "steps": [
        {"name": "a", "prompt": "A", "model": "slow-300"},
        {"name": "b", "prompt": "B", "model": "slow-300"},
        {"name": "c", "prompt": "C", "model": "slow-300"},
        {"name": "join", "after": ["a", "b", "c"], "prompt": "Join", "model": "slow-300"}]});
    submit(&env, &chain).await;
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    assert_eq!(
        env.mock.max_open_calls("slow-300"),
        1,
        "three steps ready at once, run one at a time"
    );
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_review_goes_to_another_model_and_a_rejection_stops_what_follows() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    let ok = format!("{}-approve", env.queue);
    submit(
        &env,
        &json!({"v": 1, "chain_id": ok, "steps": [
            {"name": "impl", "prompt": "Write it", "model": "review-approve"},
            {"name": "review", "kind": "review", "after": ["impl"], "distinct": "model",
             "model": "review-approve"}]}),
    )
    .await;
    let c = finished(&env, &ok).await;
    // The hint names the model that wrote the work: distinct moves the review elsewhere,
    // where the answer is no verdict, so it fails after its attempts; never self-review.
    assert_eq!(c.steps["impl"].model.as_deref(), Some("review-approve"));
    let reviewer = c.steps["review"].model.as_deref();
    assert!(
        reviewer.is_some() && reviewer != Some("review-approve"),
        "{c:#?}"
    );

    let good = format!("{}-good", env.queue);
    submit(
        &env,
        &json!({"v": 1, "chain_id": good, "steps": [
            {"name": "impl", "prompt": "Write it"},
            {"name": "review", "kind": "review", "after": ["impl"], "distinct": "model",
             "model": "review-approve"},
            {"name": "ship", "after": ["review"], "prompt": "Ship it"}]}),
    )
    .await;
    let c = finished(&env, &good).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    assert_eq!(c.steps["review"].model.as_deref(), Some("review-approve"));
    assert!(output(&env, &c, "review").await.contains("approve"));

    let bad = format!("{}-reject", env.queue);
    submit(
        &env,
        &json!({"v": 1, "chain_id": bad, "steps": [
            {"name": "impl", "prompt": "Write it"},
            {"name": "review", "kind": "review", "after": ["impl"], "model": "review-reject"},
            {"name": "ship", "after": ["review"], "prompt": "Ship it"},
            {"name": "aside", "prompt": "Independent work"}]}),
    )
    .await;
    let c = finished(&env, &bad).await;
    assert_eq!(c.state, "failed");
    assert_eq!(status(&c, "review"), "failed");
    assert!(
        c.steps["review"]
            .error
            .as_deref()
            .unwrap()
            .contains("the review rejected step `impl`: llmq-mock rejects this work"),
        "{c:#?}"
    );
    assert_eq!(status(&c, "ship"), "cancelled");
    assert_eq!(
        status(&c, "aside"),
        "succeeded",
        "independent branches go on"
    );
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_parent_cancels_its_descendants_but_a_join_counts_it() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    let id = format!("{}-fail", env.queue);
    submit(
        &env,
        &json!({"v": 1, "chain_id": id, "steps": [
            {"name": "bad", "prompt": "x", "model": "fail-400"},
            {"name": "good", "prompt": "y"},
            {"name": "after_bad", "after": ["bad"], "prompt": "z"},
            {"name": "deeper", "after": ["after_bad"], "prompt": "z"},
            {"name": "good2", "prompt": "w"},
            {"name": "pick", "kind": "judge", "after": ["bad", "good", "good2"], "model": "judge-first"}]}),
    )
    .await;
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "failed");
    assert_eq!(status(&c, "bad"), "failed");
    assert_eq!(status(&c, "after_bad"), "cancelled");
    assert_eq!(status(&c, "deeper"), "cancelled");
    assert_eq!(
        status(&c, "pick"),
        "succeeded",
        "the judge ran with 2 of its 3 parents"
    );
    assert_eq!(
        output(&env, &c, "pick").await,
        output(&env, &c, "good").await
    );

    let all = format!("{}-failchain", env.queue);
    submit(
        &env,
        &json!({"v": 1, "chain_id": all, "on_failure": "fail_chain", "steps": [
            {"name": "bad", "prompt": "x", "model": "fail-400"},
            {"name": "slow", "prompt": "y", "model": "slow-1500"},
            {"name": "next", "after": ["slow"], "prompt": "z"}]}),
    )
    .await;
    let c = finished(&env, &all).await;
    assert_eq!(c.state, "failed");
    assert_eq!(
        status(&c, "next"),
        "cancelled",
        "fail_chain cancels everything unfinished"
    );
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_chain_is_one_dead_letter_naming_the_step_and_nothing_runs() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    for (chain, want) in [
        (
            json!({"v": 1, "steps": [
                {"name": "a", "prompt": "x", "after": ["b"]},
                {"name": "b", "prompt": "y", "after": ["a"]}]}),
            "form a cycle",
        ),
        (
            json!({"v": 1, "steps": [{"name": "a", "prompt": "x", "after": ["ghost"]}]}),
            "step `a` is after `ghost`, which is not a step of this chain",
        ),
        (
            json!({"v": 1, "steps": [{"name": "a", "kind": "telepathy", "prompt": "x"}]}),
            "step `a`: unknown kind `telepathy`",
        ),
    ] {
        submit(&env, &chain).await;
        env.dead_letter_saying(want, WAIT).await.unwrap();
    }
    let dead = env.redis.dead_letters(&env.keys, 10).await.unwrap();
    assert_eq!(dead.len(), 3);
    assert!(
        dead.iter()
            .all(|d| d.class == "invalid" && d.error.starts_with("the chain is invalid: "))
    );
    assert!(env.calls().await.unwrap().is_empty(), "nothing ran");
    w.stop().await.unwrap();
}

#[tokio::test]
async fn two_workers_racing_to_finish_a_joins_parents_enqueue_it_once() {
    let env = TestEnv::new().await.unwrap();
    let workers = [env.worker(), env.worker()];
    let ids: Vec<String> = (0..20).map(|i| format!("{}-race-{i}", env.queue)).collect();
    for id in &ids {
        submit(
            &env,
            &json!({"v": 1, "chain_id": id, "steps": [
                {"name": "a", "prompt": "left"},
                {"name": "b", "prompt": "right"},
                {"name": "merge", "after": ["a", "b"], "prompt": "Merge"}]}),
        )
        .await;
    }
    for id in &ids {
        let c = finished(&env, id).await;
        assert_eq!(c.state, "succeeded", "{c:#?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = env.calls().await.unwrap();
    assert_eq!(calls.len(), 60, "three steps per chain, each called once");
    let merges = std::collections::HashSet::<llmq_shared::ids::TaskId>::from_iter(
        ids.iter()
            .map(|id| llmq_shared::chain::step_task_id(id, "merge", 0)),
    );
    assert_eq!(
        calls
            .iter()
            .filter(|c| merges.contains(&c.0.into()))
            .count(),
        20,
        "every join ran exactly once"
    );
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test]
async fn llmq_chain_submit_waits_and_show_and_list_report_it() {
    let env = TestEnv::new().await.unwrap();
    let w = WorkerHandle::start(env.settings());
    let path = std::env::temp_dir().join(format!("{}-chain.json", env.queue));
    std::fs::write(
        &path,
        json!({"v": 1, "steps": [
            {"name": "plan", "prompt": "Plan {{topic}}"},
            {"name": "write", "after": ["plan"], "prompt": "Write from {{plan.summary}}"}]})
        .to_string(),
    )
    .unwrap();
    let (code, out) = env
        .cli(&[
            "chain",
            "submit",
            path.to_str().unwrap(),
            "--queue",
            &env.queue,
            "--var",
            "topic=caching",
            "--wait",
            "--format",
            "json",
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "succeeded", "{out}");
    let id = v["chain_id"].as_str().unwrap().to_owned();
    assert_eq!(v["steps"][0]["name"], "plan");
    assert!(
        v["steps"][0]["summary"]
            .as_str()
            .unwrap()
            .contains("Plan caching"),
        "{out}"
    );
    for key in [
        "name", "kind", "status", "task_id", "provider", "model", "round", "cost_usd", "summary",
        "error",
    ] {
        assert!(v["steps"][1].get(key).is_some(), "no `{key}` in {out}");
    }

    let (code, out) = env
        .cli(&["chain", "show", &id, "--queue", &env.queue])
        .await;
    assert_eq!(code, 0);
    assert!(out.contains("State:    succeeded"), "{out}");
    assert!(out.contains("write"), "{out}");
    let (code, out) = env
        .cli(&[
            "chain",
            "list",
            "--queue",
            &env.queue,
            "--state",
            "succeeded",
        ])
        .await;
    assert_eq!(code, 0);
    assert!(out.contains(&id), "{out}");
    let (code, _) = env
        .cli(&["chain", "show", "no-such-chain", "--queue", &env.queue])
        .await;
    assert_eq!(code, 1);
    // A bad chain file is refused before anything is sent, naming the problem.
    std::fs::write(
        &path,
        r#"{"v": 1, "steps": [{"name": "a", "prompt": "{{nope}}"}]}"#,
    )
    .unwrap();
    let (code, _) = env
        .cli(&[
            "chain",
            "submit",
            path.to_str().unwrap(),
            "--queue",
            &env.queue,
        ])
        .await;
    assert_eq!(code, 2);
    w.stop().await.unwrap();
}

#[tokio::test]
async fn the_cross_review_template_runs_end_to_end() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    let mut chain: Value =
        serde_json::from_str(include_str!("../../../examples/chains/cross-review.json")).unwrap();
    // llmq-mock's reviewer; routing would pick a model that answers no verdict.
    for step in chain["steps"].as_array_mut().unwrap() {
        if step["kind"] == "review" {
            step["model"] = json!("review-approve");
        }
    }
    let id = format!("{}-cross", env.queue);
    chain["chain_id"] = json!(id);
    submit(&env, &chain).await;
    // A person approves the ship step.
    env.eventually("the ship step awaiting approval", WAIT, || async {
        env.redis
            .chain(&env.keys, &id)
            .await
            .unwrap()
            .is_some_and(|c| c.steps["ship"].status == "awaiting_approval")
    })
    .await
    .unwrap();
    let (code, out) = env
        .cli(&["chain", "approve", &id, "ship", "--queue", &env.queue])
        .await;
    assert_eq!(code, 0, "{out}");
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    assert_eq!(c.steps.len(), 6);
    for (name, s) in &c.steps {
        assert_eq!(s.status, "succeeded", "{name}");
    }
    // The reviews ran on a model other than the work they reviewed.
    assert_ne!(c.steps["plan_review"].model, c.steps["plan"].model);
    assert_ne!(c.steps["code_review"].model, c.steps["implement"].model);
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_chain_can_be_cancelled_and_an_ended_one_retried() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    // Cancel: the running step ends, nothing after it runs.
    let id = format!("{}-cancel", env.queue);
    submit(
        &env,
        &json!({"v": 1, "chain_id": id, "steps": [
            {"name": "slow", "prompt": "x", "model": "slow-1500"},
            {"name": "after", "after": ["slow"], "prompt": "y"}]}),
    )
    .await;
    env.eventually("the slow step running", WAIT, || async {
        env.mock.calls("slow-1500") == 1
    })
    .await
    .unwrap();
    let (code, out) = env
        .cli(&["chain", "cancel", &id, "--queue", &env.queue])
        .await;
    assert_eq!(code, 0, "{out}");
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "cancelled");
    assert_eq!(status(&c, "after"), "cancelled");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        env.calls().await.unwrap().len(),
        1,
        "the cancelled step never ran"
    );
    let (code, _) = env
        .cli(&["chain", "cancel", &id, "--queue", &env.queue])
        .await;
    assert_eq!(code, 1, "an ended chain cannot be cancelled again");

    // Retry: the first review rejects, the rerun approves; what succeeded keeps its output.
    let id = format!("{}-retry", env.queue);
    submit(
        &env,
        &json!({"v": 1, "chain_id": id, "steps": [
            {"name": "impl", "prompt": "Write it"},
            {"name": "review", "kind": "review", "after": ["impl"], "model": "review-reject-once"},
            {"name": "ship", "after": ["review"], "prompt": "Ship"}]}),
    )
    .await;
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "failed");
    let impl_task = c.steps["impl"].task_id;
    let (code, out) = env
        .cli(&["chain", "retry", &id, "--queue", &env.queue])
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("rerunning review, ship"), "{out}");
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    assert_eq!(c.steps["impl"].task_id, impl_task, "impl kept its output");
    assert_eq!(c.steps["review"].round, 1);
    assert_eq!(c.steps["ship"].round, 1);
    assert_eq!(
        c.steps["review"].task_id,
        Some(llmq_shared::chain::step_task_id(&id, "review", 1))
    );
    let (code, out) = env
        .cli(&[
            "chain", "retry", &id, "--queue", &env.queue, "--from", "ship",
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let c = finished(&env, &id).await;
    assert_eq!((c.state.as_str(), c.steps["ship"].round), ("succeeded", 2));
    w.stop().await.unwrap();
}

#[tokio::test]
async fn chains_survive_workers_killed_over_and_over() {
    use llmq_tests::harness::WorkerProcess;
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let flags = ["--concurrency", "8", "--visibility-timeout", "1s"];
    let mut workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::spawn(&env, &flags).unwrap())
        .collect();
    let ids: Vec<String> = (0..50)
        .map(|i| format!("{}-chaos-{i}", env.queue))
        .collect();
    for id in &ids {
        submit(
            &env,
            &json!({"v": 1, "chain_id": id, "steps": [
                {"name": "s1", "prompt": "[[mock:slow-300]] start"},
                {"name": "s2", "after": ["s1"], "prompt": "[[mock:slow-300]] left {{s1.summary}}"},
                {"name": "s3", "after": ["s1"], "prompt": "[[mock:slow-300]] right {{s1.summary}}"},
                {"name": "s4", "after": ["s2", "s3"], "prompt": "[[mock:slow-300]] join"},
                {"name": "s5", "after": ["s4"], "prompt": "[[mock:slow-300]] then {{s4.output}}"},
                {"name": "s6", "after": ["s5"], "prompt": "[[mock:slow-300]] end"}]}),
        )
        .await;
    }
    // Kill a worker without warning every 700 ms, six times, and start another each time.
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let victim = workers.remove(round % workers.len());
        victim.signal("KILL").unwrap();
        drop(victim);
        workers.push(WorkerProcess::spawn(&env, &flags).unwrap());
    }
    let started = Instant::now();
    for id in &ids {
        loop {
            let c = env.redis.chain(&env.keys, id).await.unwrap();
            if let Some(c) = c.filter(|c| c.state != "running") {
                assert_eq!(c.state, "succeeded", "{c:#?}");
                assert!(
                    c.steps
                        .values()
                        .all(|s| s.status == "succeeded" && s.round == 0)
                );
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "chain {id} did not finish"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Every step's task ran to one result.
    let tasks: Vec<llmq_shared::ids::TaskId> = ids
        .iter()
        .flat_map(|id| {
            (1..=6).map(move |n| llmq_shared::chain::step_task_id(id, &format!("s{n}"), 0))
        })
        .collect();
    let records = env.redis.results(&env.keys, &tasks).await.unwrap();
    assert!(records.iter().all(|r| {
        r.as_ref()
            .is_some_and(|r| r.status == llmq_shared::outcome::Status::Succeeded)
    }));
    // Nothing was enqueued twice: the stream took the 50 chains and the 300 step tasks, once
    // each, and holds nothing now.
    let mut c = env.redis.conn().await.unwrap();
    let info: std::collections::HashMap<String, redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(env.keys.stream())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(info.get("entries-added"), Some(&redis::Value::Int(350)));
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!(
        (counts.ready, counts.in_flight, counts.delayed, counts.dead),
        (0, 0, 0, 0)
    );
    drop(workers);
}

#[tokio::test]
async fn a_check_gates_the_chain_with_a_command_the_operator_named() {
    use llmq_shared::config::CheckConfig;
    let env = TestEnv::new().await.unwrap();
    let mut s = env.settings();
    let gate = |args: &[&str]| CheckConfig {
        program: "grep".into(),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        env: Default::default(),
        timeout: Duration::from_secs(10),
    };
    s.config
        .checks
        .insert("has-answer".into(), gate(&["-c", "mock answer"]));
    s.config
        .checks
        .insert("has-tests".into(), gate(&["-q", "def test_"]));
    let w = WorkerHandle::start(s);
    let chain = |id: &str, check: &str| {
        json!({"v": 1, "chain_id": id, "steps": [
            {"name": "impl", "prompt": "Write it"},
            {"name": "tests", "kind": "check", "after": ["impl"], "command": check},
            {"name": "ship", "after": ["tests"], "prompt": "Ship {{tests.output}}"}]})
    };
    let pass = format!("{}-pass", env.queue);
    submit(&env, &chain(&pass, "has-answer")).await;
    let c = finished(&env, &pass).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    assert_eq!(
        output(&env, &c, "tests").await.trim(),
        "1",
        "grep -c's output"
    );
    assert_eq!(c.steps["tests"].model, None, "a check makes no call");

    let fail = format!("{}-gate", env.queue);
    submit(&env, &chain(&fail, "has-tests")).await;
    let c = finished(&env, &fail).await;
    assert_eq!(c.state, "failed");
    assert!(
        c.steps["tests"]
            .error
            .as_deref()
            .unwrap()
            .starts_with("the check rejected the work: check `has-tests` failed (exit 1)"),
        "{c:#?}"
    );
    assert_eq!(status(&c, "ship"), "cancelled");

    // A check the provider file does not name: the chain is refused whole.
    submit(&env, &chain(&format!("{}-nope", env.queue), "rm-rf")).await;
    env.dead_letter_saying("step `tests`: check `rm-rf` is not configured", WAIT)
        .await
        .unwrap();
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_rejection_sends_the_work_back_with_the_findings_up_to_max_rounds() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    let chain = |id: &str, reviewer: &str| {
        json!({"v": 1, "chain_id": id, "steps": [
            {"name": "impl", "prompt": "W"},
            {"name": "review", "kind": "review", "after": ["impl"], "model": reviewer,
             "on_reject": {"rerun": "impl", "max_rounds": 1}},
            {"name": "ship", "after": ["review"], "prompt": "Ship"}]})
    };
    let once = format!("{}-once", env.queue);
    submit(&env, &chain(&once, "review-reject-once")).await;
    let c = finished(&env, &once).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    assert_eq!((c.steps["impl"].round, c.steps["review"].round), (1, 1));
    assert_eq!(
        c.steps["ship"].round, 0,
        "ship ran once, after the approval"
    );
    // The redone step saw the findings (the mock echoes the start of its prompt).
    let redone = output(&env, &c, "impl").await;
    assert!(
        redone.starts_with("mock answer from mock-fast: W\n\n## Findings of review `review`"),
        "{redone}"
    );
    // The first review's task records the rejection that sent the work back.
    let first = llmq_shared::chain::step_task_id(&once, "review", 0);
    let r = env
        .redis
        .task(&env.keys, first.tid())
        .await
        .unwrap()
        .unwrap();
    assert!(
        r.output
            .unwrap()
            .contains("the review rejected step `impl`"),
        "round 0 of the review"
    );

    let always = format!("{}-always", env.queue);
    submit(&env, &chain(&always, "review-reject")).await;
    let c = finished(&env, &always).await;
    assert_eq!(c.state, "failed");
    assert_eq!(c.steps["review"].round, 1, "one round back, then it fails");
    assert_eq!(status(&c, "review"), "failed");
    assert_eq!(status(&c, "ship"), "cancelled");
    w.stop().await.unwrap();
}

#[tokio::test]
async fn an_approval_waits_for_a_person_once_and_times_out_by_its_rule() {
    use llmq_scheduler::{Duty, Scheduler, Settings};
    use llmq_tests::harness::{database_url, mock_config, redis_url};
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    let chain = |id: &str, timeout: &str| {
        json!({"v": 1, "chain_id": id, "steps": [
            {"name": "impl", "prompt": "Write it"},
            {"name": "ship", "kind": "approval", "after": ["impl"], "timeout": timeout},
            {"name": "docs", "after": ["ship"], "prompt": "Document {{ship.summary}}"}]})
    };
    let id = format!("{}-approve", env.queue);
    submit(&env, &chain(&id, "1h")).await;
    env.eventually("the step awaiting approval", WAIT, || async {
        env.redis
            .chain(&env.keys, &id)
            .await
            .unwrap()
            .is_some_and(|c| c.steps["ship"].status == "awaiting_approval")
    })
    .await
    .unwrap();
    let (code, out) = env
        .cli(&[
            "chain", "pending", "--queue", &env.queue, "--format", "json",
        ])
        .await;
    assert_eq!(code, 0);
    let pending: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pending[0]["chain_id"], id.as_str(), "{out}");
    assert_eq!(pending[0]["step"], "ship");
    let (code, out) = env
        .cli(&[
            "chain", "approve", &id, "ship", "--queue", &env.queue, "--note", "LGTM",
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    assert_eq!(c.steps["ship"].summary.as_deref(), Some("LGTM"));
    assert!(output(&env, &c, "docs").await.contains("Document LGTM"));
    let (code, _) = env
        .cli(&[
            "chain", "reject", &id, "ship", "--queue", &env.queue, "--reason", "too late",
        ])
        .await;
    assert_eq!(code, 1, "a step is decided once");

    // Nobody decides: the scheduler applies on_timeout (reject by default).
    let late = format!("{}-late", env.queue);
    submit(&env, &chain(&late, "1s")).await;
    env.eventually("the step awaiting approval", WAIT, || async {
        env.redis
            .chain(&env.keys, &late)
            .await
            .unwrap()
            .is_some_and(|c| c.steps["ship"].status == "awaiting_approval")
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut s = Settings::new(&redis_url(), &database_url(), mock_config(&env.mock.url())).unwrap();
    s.namespace = Some(env.queue.clone());
    s.queues = vec![env.queue.clone()];
    let mut sched = Scheduler::connect(s).await.unwrap();
    assert!(sched.acquire().await.unwrap());
    let detail = sched.run_duty(Duty::Approvals).await.unwrap();
    assert_eq!(detail, "applied on_timeout to 1 approval(s)");
    let c = finished(&env, &late).await;
    assert_eq!(c.state, "failed");
    assert!(
        c.steps["ship"]
            .error
            .as_deref()
            .unwrap()
            .contains("on_timeout: reject"),
        "{c:#?}"
    );
    assert_eq!(status(&c, "docs"), "cancelled");
    sched.release().await.unwrap();
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_step_that_escalates_runs_again_one_tier_up_after_a_failure() {
    let env = TestEnv::new().await.unwrap();
    let mut s = env.settings();
    s.config = llmq_shared::config::Config::parse(
        "escalate.yaml",
        &format!(
            "providers:\n  - name: p\n    kind: openai_compatible\n    base_url: {}/v1\n    api_key: k\n    models:\n      - {{id: fail-400, tier: fast, input_usd_per_mtok: 0.1, output_usd_per_mtok: 0.1}}\n      - {{id: mock-smart, tier: standard, input_usd_per_mtok: 3, output_usd_per_mtok: 15}}\n",
            env.mock.url()
        ),
        &|_| None,
    )
    .unwrap();
    let w = WorkerHandle::start(s);
    let id = format!("{}-escalate", env.queue);
    submit(
        &env,
        &json!({"v": 1, "chain_id": id, "steps": [
            {"name": "work", "prompt": "Do it", "escalate": true},
            {"name": "next", "after": ["work"], "prompt": "Then {{work.summary}}", "model": "mock-smart"}]}),
    )
    .await;
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    assert_eq!(c.steps["work"].round, 1);
    assert_eq!(c.steps["work"].model.as_deref(), Some("mock-smart"));
    // The failed rung keeps its record, and says where the step went.
    let first = llmq_shared::chain::step_task_id(&id, "work", 0);
    let r = env
        .redis
        .task(&env.keys, first.tid())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, llmq_shared::outcome::Status::Failed);
    assert_eq!(r.model.as_deref(), Some("fail-400"));
    assert!(
        r.error
            .unwrap()
            .ends_with("escalating to a standard-tier model"),
    );
    // Each rung is billed: the failed call on the fast model, the answer on the standard one.
    let models: Vec<String> = env
        .calls()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.5)
        .collect();
    assert!(models.contains(&"fail-400".to_owned()) && models.contains(&"mock-smart".to_owned()));
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_check_sends_the_work_back_and_a_review_never_reviews_its_own_model() {
    use llmq_shared::config::CheckConfig;
    let env = TestEnv::new().await.unwrap();
    let mut s = env.settings();
    s.config.checks.insert(
        "mentions-findings".into(),
        CheckConfig {
            program: "grep".into(),
            args: vec!["-c".into(), "Findings".into()],
            env: Default::default(),
            timeout: Duration::from_secs(10),
        },
    );
    let w = WorkerHandle::start(s);
    let id = format!("{}-checkback", env.queue);
    submit(
        &env,
        &json!({"v": 1, "chain_id": id, "steps": [
            {"name": "impl", "prompt": "W"},
            {"name": "tests", "kind": "check", "after": ["impl"], "command": "mentions-findings",
             "on_reject": {"rerun": "impl", "max_rounds": 1}}]}),
    )
    .await;
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    assert_eq!((c.steps["impl"].round, c.steps["tests"].round), (1, 1));
    assert!(
        output(&env, &c, "impl")
            .await
            .contains("## Findings of review `tests`")
    );
    w.stop().await.unwrap();

    // With one model in the provider file, a review that must not use the model it reviews
    // has nowhere to go: it fails with that reason, it never reviews itself.
    let mut s = env.settings();
    s.config = llmq_shared::config::Config::parse(
        "one-model.yaml",
        &format!(
            "providers:\n  - name: p\n    kind: openai_compatible\n    base_url: {}/v1\n    api_key: k\n    models:\n      - {{id: review-approve, input_usd_per_mtok: 1, output_usd_per_mtok: 1}}\n",
            env.mock.url()
        ),
        &|_| None,
    )
    .unwrap();
    let w = WorkerHandle::start(s);
    let id = format!("{}-self", env.queue);
    submit(
        &env,
        &json!({"v": 1, "chain_id": id, "steps": [
            {"name": "impl", "prompt": "W"},
            {"name": "review", "kind": "review", "after": ["impl"], "distinct": "model"}]}),
    )
    .await;
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "failed");
    let error = c.steps["review"].error.clone().unwrap();
    assert!(
        error.contains("no enabled model can take this task")
            && error.contains("excluded for this step"),
        "{error}"
    );
    assert_eq!(c.steps["review"].model, None);
    w.stop().await.unwrap();
}

/// Calls the ledger holds for chain `id`.
async fn ledger_calls(env: &TestEnv, id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM provider_calls WHERE chain_id = $1")
        .bind(id)
        .fetch_one(env.ledger.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn escalation_ends_in_every_routing_combination_after_one_call_per_rung() {
    let env = TestEnv::new().await.unwrap();
    // Provider `one`: a fast model that is always too long for its context, a standard one
    // that answers. Provider `lone`: the failing fast model only. Provider `all`: a fatal
    // answer at every tier. A rule names the failing model for `research` tasks.
    let url = env.mock.url();
    let model = |id: &str, tier: &str, price: f64| {
        format!(
            "      - {{id: {id}, tier: {tier}, input_usd_per_mtok: {price}, output_usd_per_mtok: {price}}}\n"
        )
    };
    let provider = |name: &str, models: &[String]| {
        format!(
            "  - name: {name}\n    kind: openai_compatible\n    base_url: {url}/v1\n    api_key: k\n    models:\n{}",
            models.concat()
        )
    };
    let one = provider(
        "one",
        &[
            model("context-too-long", "fast", 0.1),
            model("mock-smart", "standard", 3.0),
        ],
    );
    let lone = provider("lone", &[model("context-too-long", "fast", 0.1)]);
    let all = provider(
        "all",
        &[
            model("fail-400", "fast", 0.1),
            model("fail-404", "standard", 1.0),
            model("fail-401", "advanced", 2.0),
        ],
    );
    let rule = "routing:\n  rules:\n    - {task_type: research, model: lone/context-too-long}\n";
    // (providers, step fields, the chain's end, the most calls, what the step's error says).
    // A rung tries each candidate at its tier once (a fatal answer is not retried), so the
    // most is the candidates summed over the rungs.
    let cases: Vec<(String, Value, &str, i64, &str)> = vec![
        // The reported case: a provider hint; its standard model takes the next rung.
        (one.clone(), json!({"provider": "one"}), "succeeded", 2, ""),
        // A hint with other providers beside it: the first rung tries every fast model.
        (
            format!("{one}{lone}{all}"),
            json!({"provider": "one"}),
            "succeeded",
            4,
            "",
        ),
        // Nothing at the next tier: one call, then a sentence.
        (
            lone.clone(),
            json!({"provider": "lone"}),
            "failed",
            1,
            "cannot escalate: nothing at the standard-tier can take it: no enabled model can take this task",
        ),
        // Every tier fails: one call per rung, then the top says so.
        (
            all.clone(),
            json!({"provider": "all"}),
            "failed",
            3,
            "cannot escalate: it already ran on the highest tier, advanced",
        ),
        // A rule that names a model: the next rung is routed past it.
        (
            format!("{lone}{one}{rule}"),
            json!({"type": "research"}),
            "succeeded",
            3,
            "",
        ),
        // A pinned model stays pinned.
        (
            lone.clone(),
            json!({"model": "context-too-long"}),
            "failed",
            1,
            "cannot escalate: its model is pinned (context-too-long)",
        ),
        // A hint on the chain's defaults.
        (
            one.clone(),
            json!({"defaults": {"provider": "one"}}),
            "succeeded",
            2,
            "",
        ),
    ];
    for (i, (providers, fields, end, most, says)) in cases.into_iter().enumerate() {
        let mut s = env.settings();
        s.config = llmq_shared::config::Config::parse(
            "escalate.yaml",
            &format!("providers:\n{providers}"),
            &|_| None,
        )
        .unwrap();
        let w = WorkerHandle::start(s);
        let id = format!("{}-esc{i}", env.queue);
        let mut step = json!({"name": "big", "prompt": "a long input", "escalate": true});
        let mut chain = json!({"v": 1, "chain_id": id});
        for (k, v) in fields.as_object().unwrap() {
            if k == "defaults" {
                chain[k] = v.clone();
            } else {
                step[k] = v.clone();
            }
        }
        chain["steps"] = json!([step]);
        submit(&env, &chain).await;
        let c = finished(&env, &id).await;
        assert_eq!(c.state, end, "{fields}: {c:#?}");
        let calls = ledger_calls(&env, &id).await;
        assert!(
            calls >= 1 && calls <= most,
            "{fields}: {calls} calls, at most {most}"
        );
        if !says.is_empty() {
            let error = c.steps["big"].error.clone().unwrap_or_default();
            assert!(error.contains(says), "{fields}: {error}");
        }
        w.stop().await.unwrap();
    }
}

#[tokio::test]
async fn chains_max_rounds_bounds_every_rerun_and_is_checked() {
    let env = TestEnv::new().await.unwrap();
    let mut s = env.settings();
    let text = include_str!("../../../examples/providers.mock.yaml")
        .replace("${LLMQ_MOCK_URL:-http://127.0.0.1:8089}", &env.mock.url());
    s.config = llmq_shared::config::Config::parse(
        "rounds.yaml",
        &format!("{text}\nchains: {{max_rounds: 2}}\n"),
        &|_| None,
    )
    .unwrap();
    let w = WorkerHandle::start(s);
    // A review that asks for more rounds than the provider file allows is refused whole.
    let id = format!("{}-greedy", env.queue);
    submit(
        &env,
        &json!({"v": 1, "chain_id": id, "steps": [
            {"name": "impl", "prompt": "W"},
            {"name": "review", "kind": "review", "after": ["impl"], "model": "review-reject",
             "on_reject": {"rerun": "impl", "max_rounds": 3}}]}),
    )
    .await;
    env.eventually("the greedy chain refused", WAIT, || async {
        env.redis
            .dead_letters(&env.keys, 100)
            .await
            .unwrap()
            .iter()
            .any(|d| {
                d.error
                    .contains("on_reject.max_rounds 3 is over chains.max_rounds 2")
            })
    })
    .await
    .unwrap();
    // `llmq chain retry` counts too: a step that failed twice more cannot run a fourth time.
    let id = format!("{}-retry", env.queue);
    submit(
        &env,
        &json!({"v": 1, "chain_id": id, "steps": [{"name": "bad", "prompt": "x", "model": "fail-400"}]}),
    )
    .await;
    for round in 0..=2 {
        let c = finished(&env, &id).await;
        assert_eq!((c.state.as_str(), c.steps["bad"].round), ("failed", round));
        let (code, _) = env
            .cli(&["chain", "retry", &id, "--queue", &env.queue])
            .await;
        if round < 2 {
            assert_eq!(code, 0, "round {round}");
            env.eventually("the retry running", WAIT, || async {
                env.redis
                    .chain(&env.keys, &id)
                    .await
                    .unwrap()
                    .is_some_and(|c| c.steps["bad"].round == round + 1)
            })
            .await
            .unwrap();
        } else {
            assert_ne!(code, 0, "a third rerun went through");
        }
    }
    w.stop().await.unwrap();

    // The provider file's bound is checked like every key.
    for bad in ["0", "101"] {
        let err = llmq_shared::config::Config::parse(
            "rounds.yaml",
            &format!("{text}\nchains: {{max_rounds: {bad}}}\n"),
            &|_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&format!(
                "chains.max_rounds: {bad} is not between 1 and 100"
            )),
            "{err}"
        );
    }
}

#[tokio::test]
async fn a_poison_step_ends_its_chain_and_its_replay_resumes_it() {
    use llmq_tests::harness::WorkerProcess;
    let env = TestEnv::new().await.unwrap();
    let id = format!("{}-poison", env.queue);
    submit(
        &env,
        &json!({"v": 1, "chain_id": id, "steps": [
            {"name": "slow", "prompt": "take your time", "model": "slow-1500"},
            {"name": "after", "after": ["slow"], "prompt": "then {{slow.summary}}", "model": "mock-fast"}]}),
    )
    .await;
    // A worker takes the step and dies holding it.
    let doomed = WorkerProcess::spawn(&env, &["--visibility-timeout", "60s"]).unwrap();
    // Held once the chain is expanded: before, the entry held is the chain's own.
    env.eventually("the slow step held", WAIT, || async {
        env.redis.chain(&env.keys, &id).await.unwrap().is_some()
            && !env.pending().await.unwrap().is_empty()
    })
    .await
    .unwrap();
    doomed.signal("KILL").unwrap();
    drop(doomed);
    // It died holding it often enough to be poison.
    let (entry, consumer) = env.pending().await.unwrap().remove(0);
    let mut c = env.redis.conn().await.unwrap();
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(env.keys.stream())
        .arg("workers")
        .arg(&consumer)
        .arg(0)
        .arg(&entry)
        .arg("RETRYCOUNT")
        .arg(9)
        .query_async(&mut c)
        .await
        .unwrap();
    let w = env.worker();
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "failed", "{c:#?}");
    assert_eq!(status(&c, "slow"), "failed");
    assert!(
        c.steps["slow"]
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("times without finishing"),
        "{c:#?}"
    );
    assert_eq!(status(&c, "after"), "cancelled");
    let dead = env.redis.dead_letters(&env.keys, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].class, "poison");

    // Replaying the letter runs the step and what follows again, to the end.
    let (code, out) = env
        .cli(&["dlq", "replay", &dead[0].id, "--queue", &env.queue])
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("its chain runs slow, after again"), "{out}");
    env.eventually("the chain resumed", WAIT, || async {
        env.redis
            .chain(&env.keys, &id)
            .await
            .unwrap()
            .is_some_and(|c| c.state == "succeeded")
    })
    .await
    .unwrap();
    let c = env.redis.chain(&env.keys, &id).await.unwrap().unwrap();
    assert_eq!((c.steps["slow"].round, c.steps["after"].round), (1, 1));
    assert!(
        env.redis
            .dead_letters(&env.keys, 10)
            .await
            .unwrap()
            .is_empty()
    );
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_step_task_refused_before_it_runs_still_ends_its_chain() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    let id = format!("{}-refused", env.queue);
    submit(
        &env,
        &json!({"v": 1, "chain_id": id, "steps": [
            {"name": "slow", "prompt": "take your time", "model": "slow-1500"},
            {"name": "after", "after": ["slow"], "prompt": "then", "model": "mock-fast"}]}),
    )
    .await;
    env.eventually("the slow step running", WAIT, || async {
        !env.pending().await.unwrap().is_empty()
    })
    .await
    .unwrap();
    // The step's current task, in a form no worker accepts: it is a dead letter, and its
    // step fails like any other, so the chain ends.
    let task = llmq_shared::chain::step_task_id(&id, "slow", 0).to_string();
    let refused = json!({"v": 1, "id": task, "prompt": "x", "chain_id": id, "step": "slow", "max_attempts": 0});
    env.xadd("task", refused.to_string().as_bytes())
        .await
        .unwrap();
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "failed", "{c:#?}");
    assert!(
        c.steps["slow"]
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("max_attempts"),
        "{c:#?}"
    );
    assert_eq!(status(&c, "after"), "cancelled");
    w.stop().await.unwrap();
}

/// A chain expanded by the version before step states carried their node of the graph (a
/// `graph` field and one wait set per step) still runs to its end under today's scripts:
/// successes unblock, a failure cancels what depends on it, and the wait sets expire.
#[tokio::test]
async fn a_chain_in_the_previous_layout_still_runs_to_its_end() {
    use llmq_shared::chain::Chain;
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let id = format!("{}-old", env.queue);
    let spec = json!({"v": 1, "chain_id": id, "steps": [
        {"name": "plan", "prompt": "Plan"},
        {"name": "a", "after": ["plan"], "prompt": "A {{plan.summary}}", "model": "slow-1500"},
        {"name": "b", "after": ["plan"], "prompt": "B", "model": "fail-400"},
        {"name": "merge", "after": ["a", "b"], "prompt": "Merge"}]});
    let chain = Chain::parse(
        spec.to_string().as_bytes(),
        1 << 20,
        &env.queue,
        llmq_shared::ids::EntryId::new(0, 1),
    )
    .unwrap();
    // What the previous chain_expand.lua wrote.
    let keys = &env.keys;
    let mut graph = serde_json::Map::new();
    for s in &chain.steps {
        graph.insert(
            s.name.clone(),
            json!({"children": s.children, "join": s.kind.is_join(), "min_success": s.min_success}),
        );
    }
    graph.insert(".on_failure".into(), json!("cancel_descendants"));
    let mut c = env.redis.conn().await.unwrap();
    let mut p = redis::pipe();
    p.hset_multiple(
        keys.chain(&id),
        &[
            ("spec", chain.to_json()),
            ("graph", Value::Object(graph).to_string()),
            ("state", "running".into()),
            ("created_at", "1".into()),
            ("pending", chain.steps.len().to_string()),
            ("failed", "0".into()),
            ("cancelled", "0".into()),
        ],
    );
    for s in &chain.steps {
        p.hset(keys.chain_tasks(&id), &s.name, s.task.to_json());
        p.hset(
            keys.chain(&id),
            format!("def:{}", s.name),
            serde_json::to_string(s).unwrap(),
        );
        let status = if s.after.is_empty() {
            "queued"
        } else {
            "blocked"
        };
        let task_id = s.task.id.unwrap();
        p.hset(
            keys.chain_steps(&id),
            &s.name,
            json!({"task_id": task_id, "round": 0, "ok": 0, "failed": 0, "status": status})
                .to_string(),
        );
        for parent in &s.after {
            p.sadd(keys.chain_wait(&id, &s.name), parent);
        }
    }
    p.cmd("XADD")
        .arg(keys.stream())
        .arg("*")
        .arg("task")
        .arg(chain.steps[0].task.to_json());
    p.query_async::<()>(&mut c).await.unwrap();

    let w = env.worker();
    let ended = finished(&env, &id).await;
    assert_eq!(ended.state, "failed", "{ended:#?}");
    assert_eq!(status(&ended, "plan"), "succeeded");
    assert_eq!(status(&ended, "a"), "succeeded");
    assert_eq!(status(&ended, "b"), "failed");
    assert_eq!(status(&ended, "merge"), "cancelled");
    let ttl: i64 = redis::cmd("TTL")
        .arg(keys.chain_wait(&id, "merge"))
        .query_async(&mut c)
        .await
        .unwrap();
    // `b` failed long before the slow `a` ended: `a` was still in the wait set of `merge`.
    assert!(
        ttl > 0,
        "the wait set of a step that never ran expires with its chain: {ttl}"
    );
    w.stop().await.unwrap();
}

/// A failed step's dead letter that the scheduler archived (and trimmed from Redis) resumes
/// its chain when replayed from the archive, as a letter still in Redis does.
#[tokio::test]
async fn an_archived_step_letter_replayed_resumes_its_chain() {
    use llmq_tests::harness::database_url;
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    let id = format!("{}-archived", env.queue);
    // `flaky` fails its first two requests: both tries of its one attempt; the replay succeeds.
    submit(
        &env,
        &json!({"v": 1, "chain_id": id, "steps": [
            {"name": "try", "prompt": "try it", "model": "flaky", "max_attempts": 1},
            {"name": "after", "after": ["try"], "prompt": "then {{try.summary}}"}]}),
    )
    .await;
    let c = finished(&env, &id).await;
    assert_eq!(
        (status(&c, "try"), status(&c, "after")),
        ("failed", "cancelled")
    );
    let dead = env.redis.dead_letters(&env.keys, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");

    // The scheduler archives it; then it leaves Redis.
    assert_eq!(env.archive_dead_letters().await, 1);
    let mut conn = env.redis.conn().await.unwrap();
    let _: i64 = redis::cmd("XDEL")
        .arg(env.keys.dead())
        .arg(&dead[0].id)
        .query_async(&mut conn)
        .await
        .unwrap();

    let (code, out) = env
        .cli(&[
            "dlq",
            "replay",
            &dead[0].task_id.to_string(),
            "--queue",
            &env.queue,
            "--database-url",
            &database_url(),
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("its chain runs try, after again"), "{out}");
    env.eventually("the chain resumed to its end", WAIT, || async {
        env.redis
            .chain(&env.keys, &id)
            .await
            .unwrap()
            .is_some_and(|c| c.state == "succeeded")
    })
    .await
    .unwrap();
    // Replayed, it left the archive; a second replay finds nothing.
    let left = llmq_shared::archive::take_archived(
        env.ledger.pool(),
        &env.queue,
        &[dead[0].task_id.to_string()],
    )
    .await
    .unwrap();
    assert!(left.is_empty(), "{left:?}");
    w.stop().await.unwrap();
}

/// A step's rerun (a rejection sending work back, an escalation) and an approval's wait act
/// only for the step's current task: an older round's task that finishes late settles its
/// own entry and leaves the chain alone.
#[tokio::test]
async fn a_late_task_of_an_older_round_cannot_rerun_or_park_its_step() {
    use llmq_shared::chain::Chain;
    use llmq_shared::outcome::{Status, TaskRecord};
    use llmq_shared::queue::{Finish, Write};
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let id = format!("{}-late", env.queue);
    let spec = json!({"v": 1, "chain_id": id, "steps": [
        {"name": "impl", "prompt": "Write it"},
        {"name": "after", "after": ["impl"], "prompt": "Then"}]});
    let mut conn = env.redis.blocking_conn().await.unwrap();
    let read = |n: usize| {
        let (redis, keys) = (env.redis.clone(), env.keys.clone());
        async move {
            let mut conn = redis.blocking_conn().await.unwrap();
            redis
                .read(&mut conn, &keys, "tester", n, None)
                .await
                .unwrap()
        }
    };
    env.xadd("chain", spec.to_string().as_bytes())
        .await
        .unwrap();
    let entry = read(1).await.remove(0);
    let chain = Chain::parse(
        spec.to_string().as_bytes(),
        1 << 20,
        &env.queue,
        entry.entry_id,
    )
    .unwrap();
    let ttl = Duration::from_secs(60);
    let expand = Write::Expand {
        entry_id: entry.entry_id,
        chain: Box::new(chain),
    };
    assert_eq!(
        env.redis
            .write(&env.keys, "tester", ttl, &[expand])
            .await
            .unwrap(),
        [true]
    );
    let state = env.redis.chain(&env.keys, &id).await.unwrap().unwrap();
    let reruns = state.retry(Some("impl")).unwrap();
    // Two entries held by this consumer: the step's own task, and a late one of an older
    // round (any task id but the step's current one).
    let own = read(1).await.remove(0);
    env.xadd("task", b"{\"prompt\": \"late\"}").await.unwrap();
    let late = read(1).await.remove(0);
    let stale_id = llmq_shared::ids::TaskId::random();
    let finish = |entry| {
        let record = TaskRecord::pending(stale_id, &env.queue, Status::Succeeded);
        Finish::done(entry, stale_id, record)
    };
    let writes = [
        Write::Rerun {
            finish: finish(late.entry_id),
            chain_id: id.clone(),
            step: "impl".into(),
            reruns,
        },
        Write::Await {
            finish: finish(own.entry_id),
            chain_id: id.clone(),
            step: "impl".into(),
            deadline_ms: i64::MAX,
        },
    ];
    assert_eq!(
        env.redis
            .write(&env.keys, "tester", ttl, &writes)
            .await
            .unwrap(),
        [true, true],
        "both entries are settled"
    );
    let after = env.redis.chain(&env.keys, &id).await.unwrap().unwrap();
    assert_eq!(after.steps["impl"].status, "queued", "{after:#?}");
    assert_eq!(after.steps["impl"].round, 0, "no new round: {after:#?}");
    assert!(
        env.redis
            .approvals(&env.keys, None)
            .await
            .unwrap()
            .is_empty()
    );
    let len: u64 = redis::cmd("XLEN")
        .arg(env.keys.stream())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 0, "nothing was enqueued");
}

/// A merge appends its parents' outputs after its prompt: what they add counts against
/// --max-payload-bytes before the prompt is built, so the step fails without a call instead
/// of sending more than the limit.
#[tokio::test]
async fn a_merge_whose_parents_outputs_pass_the_limit_fails_before_its_call() {
    let env = TestEnv::new().await.unwrap();
    let id = format!("{}-wide", env.queue);
    // Sixteen parents whose answers (llmq-mock echoes 60 characters of the prompt) come to
    // more than the whole spec: the limit can let the spec in and still keep the merge out.
    let names: Vec<String> = (0..16).map(|i| format!("p{i}")).collect();
    let mut steps: Vec<Value> = names
        .iter()
        .map(|n| json!({"name": n, "prompt": format!("{{{{task}}}} {n}")}))
        .collect();
    steps.push(json!({"name": "merge", "after": names, "prompt": "Merge"}));
    let task = "Write one part of the quarterly report, in sixty characters.";
    let spec = json!({"v": 1, "chain_id": id, "vars": {"task": task}, "steps": steps});
    let limit = spec.to_string().len() + 20;
    let mut s = env.settings();
    s.max_payload_bytes = limit;
    let w = WorkerHandle::start(s);
    submit(&env, &spec).await;
    let c = finished(&env, &id).await;
    assert_eq!(status(&c, "merge"), "failed", "{c:#?}");
    let error = c.steps["merge"].error.clone().unwrap_or_default();
    assert!(
        error.contains(&format!(
            "with its handoffs and its parents' outputs, over the {limit}-byte limit"
        )),
        "{error}"
    );
    let mut outputs = 0;
    for n in &names {
        outputs += output(&env, &c, n).await.len();
    }
    assert!(
        outputs > limit,
        "the parents' answers alone ({outputs} bytes) pass {limit}"
    );
    assert_eq!(env.mock.total_calls(), 16, "the parents' calls only");
    w.stop().await.unwrap();
}

#[tokio::test]
async fn two_reviews_that_reject_at_once_send_the_work_back_once_with_both_findings_folded() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    let id = format!("{}-two", env.queue);
    let review = |name: &str| {
        json!({"name": name, "kind": "review", "after": ["draft"], "reviews": "draft",
               "model": "review-reject-draft", "on_reject": {"rerun": "draft", "max_rounds": 1}})
    };
    submit(
        &env,
        &json!({"v": 1, "chain_id": id, "steps": [
            {"name": "draft", "prompt": "Write the parser"},
            review("review_a"),
            review("review_b"),
            {"name": "ship", "after": ["review_a", "review_b"], "prompt": "Ship"}]}),
    )
    .await;
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    assert_eq!(c.steps["draft"].round, 1, "one round back, not two");
    assert_eq!(
        (c.steps["review_a"].round, c.steps["review_b"].round),
        (1, 1),
        "each review looked again at the redone work"
    );
    // The redone work ran once: one call for round 1's task, none for a round 2.
    let calls: Vec<(String, i64)> = sqlx::query_as(
        "SELECT task_id::text, count(*) FROM provider_calls WHERE queue = $1 GROUP BY task_id",
    )
    .bind(&env.queue)
    .fetch_all(env.ledger.pool())
    .await
    .unwrap();
    let calls: std::collections::HashMap<String, i64> = calls.into_iter().collect();
    let round = |n| llmq_shared::chain::step_task_id(&id, "draft", n).to_string();
    assert_eq!(calls.get(&round(0)), Some(&1));
    assert_eq!(
        calls.get(&round(1)),
        Some(&1),
        "the step sent back by two rejections ran once: {calls:?}"
    );
    assert_eq!(calls.get(&round(2)), None);
    // The redone work was asked once.
    let redone: Vec<String> = env
        .mock
        .prompts()
        .into_iter()
        .filter(|p| p.starts_with("Write the parser\n\n## Findings of review"))
        .collect();
    assert_eq!(redone.len(), 1, "{redone:#?}");
    // Both rejections' findings are in it when the second came before the redone work ran
    // (the two reviews run at once, so as a rule); say which it was.
    let both = redone[0].contains("review `review_a`") && redone[0].contains("review `review_b`");
    eprintln!("both findings folded into the redone round: {both}");
    assert_eq!(
        env.redis.counts(&env.keys).await.unwrap().dead,
        0,
        "a review superseded by its sibling's rejection ends quietly"
    );
    w.stop().await.unwrap();
}

/// Reads up to `n` of the queue's entries as consumer `tester`, without blocking.
async fn read_as_tester(env: &TestEnv, n: usize) -> Vec<llmq_shared::queue::Delivery> {
    let mut conn = env.redis.blocking_conn().await.unwrap();
    env.redis
        .read(&mut conn, &env.keys, "tester", n, None)
        .await
        .unwrap()
}

/// Submits chain `spec` with one XADD and expands it as consumer `tester`, as a worker would.
async fn expand_as_tester(env: &TestEnv, spec: &Value) {
    use llmq_shared::chain::Chain;
    use llmq_shared::queue::Write;
    env.xadd("chain", spec.to_string().as_bytes())
        .await
        .unwrap();
    let entry = read_as_tester(env, 1).await.remove(0);
    let chain = Chain::parse(
        spec.to_string().as_bytes(),
        1 << 20,
        &env.queue,
        entry.entry_id,
    )
    .unwrap();
    let expand = Write::Expand {
        entry_id: entry.entry_id,
        chain: Box::new(chain),
    };
    env.redis
        .write(&env.keys, "tester", Duration::from_secs(60), &[expand])
        .await
        .unwrap();
}

/// What a worker writes when round 0 of step `name` of chain `chain_id` (its entry
/// `entry_id`) ends with `outcome`: `fields` recorded as the step's task's, and `seen`, the
/// states it read before the call, when it read them.
fn step_end(
    env: &TestEnv,
    chain_id: &str,
    name: &str,
    entry_id: llmq_shared::ids::EntryId,
    outcome: &'static str,
    fields: llmq_shared::chain::StepState,
    seen: Option<Box<llmq_shared::chain::Seen>>,
) -> llmq_shared::queue::Write {
    use llmq_shared::chain::{StepEnd, StepOutcome, StepState};
    use llmq_shared::outcome::{Status, TaskRecord};
    use llmq_shared::queue::{Finish, Write};
    let task_id = llmq_shared::chain::step_task_id(chain_id, name, 0);
    Write::Step(
        Finish::done(
            entry_id,
            task_id,
            TaskRecord::pending(task_id, &env.queue, Status::Succeeded),
        ),
        Box::new(StepOutcome {
            chain_id: chain_id.to_owned(),
            step: name.into(),
            outcome: match outcome {
                "succeeded" => StepEnd::Succeeded,
                "failed" => StepEnd::Failed,
                _ => StepEnd::Cancelled,
            },
            fields: StepState {
                task_id: Some(task_id),
                ..fields
            },
            seen,
        }),
    )
}

/// The step a delivered chain task runs.
fn step_of(d: &llmq_shared::queue::Delivery) -> String {
    let task: Value = serde_json::from_slice(d.payload.as_deref().unwrap()).unwrap();
    task["step"].as_str().unwrap().to_owned()
}

/// Two reviews' rejections of the same work written in one batch: the work goes into one
/// new round, once in the stream, carrying the second review's findings folded in; both
/// reviews wait for it.
#[tokio::test]
async fn two_rejections_in_one_batch_fold_into_one_round() {
    use llmq_shared::chain::StepState;
    use llmq_shared::outcome::{Status, TaskRecord};
    use llmq_shared::queue::{Finish, Write};
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let id = format!("{}-fold", env.queue);
    let review = |name: &str| {
        json!({"name": name, "kind": "review", "after": ["draft"], "reviews": "draft",
               "on_reject": {"rerun": "draft", "max_rounds": 2}})
    };
    let spec = json!({"v": 1, "chain_id": id, "steps": [
        {"name": "draft", "prompt": "Write it"}, review("review_a"), review("review_b")]});
    let read = |n: usize| read_as_tester(&env, n);
    let ttl = Duration::from_secs(60);
    expand_as_tester(&env, &spec).await;
    // The draft succeeds: both reviews are enqueued.
    let draft = read(1).await.remove(0);
    let done = step_end(
        &env,
        &id,
        "draft",
        draft.entry_id,
        "succeeded",
        StepState::default(),
        None,
    );
    env.redis
        .write(&env.keys, "tester", ttl, &[done])
        .await
        .unwrap();
    let reviews = read(2).await;
    assert_eq!(reviews.len(), 2);
    // Each review rejects, sending the draft and itself into round 1 with its findings.
    let state = env.redis.chain(&env.keys, &id).await.unwrap().unwrap();
    let rejection = |entry, name: &str| {
        let again = ["draft".to_owned(), name.to_owned()].into_iter().collect();
        let mut reruns = state.reruns(&again).unwrap();
        for r in &mut reruns {
            if r.step == "draft" {
                r.fold = format!("\n\n## Findings of review `{name}`\n\nfix it");
                r.task.prompt.push_str(&r.fold);
            }
        }
        let task_id = state.steps[name].task_id.unwrap();
        Write::Rerun {
            finish: Finish::done(
                entry,
                task_id,
                TaskRecord::pending(task_id, &env.queue, Status::Succeeded),
            ),
            chain_id: id.clone(),
            step: name.into(),
            reruns,
        }
    };
    let writes: Vec<Write> = reviews
        .iter()
        .map(|d| rejection(d.entry_id, &step_of(d)))
        .collect();
    assert_eq!(
        env.redis
            .write(&env.keys, "tester", ttl, &writes)
            .await
            .unwrap(),
        [true, true]
    );
    let after = env.redis.chain(&env.keys, &id).await.unwrap().unwrap();
    assert_eq!(
        (
            after.steps["draft"].round,
            after.steps["draft"].status.as_str()
        ),
        (1, "queued"),
        "{after:#?}"
    );
    assert_eq!(after.steps["draft"].folded.len(), 1, "{after:#?}");
    for r in ["review_a", "review_b"] {
        assert_eq!(
            (after.steps[r].round, after.steps[r].status.as_str()),
            (1, "blocked"),
            "{r}"
        );
    }
    let queued = read(10).await;
    assert_eq!(queued.len(), 1, "the draft is enqueued once");
    assert_eq!(step_of(&queued[0]), "draft");
}

#[tokio::test]
async fn a_step_streams_its_answer_and_another_answers_json_that_fits_its_schema() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    let id = format!("{}-live", env.queue);
    let chain = json!({"v": 1, "chain_id": id, "steps": [
        {"name": "draft", "prompt": "Draft the release note", "stream": true},
        {"name": "facts", "after": ["draft"], "prompt": "The facts of {{draft.output}}",
         "response_format": {"type": "json_schema", "schema": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]});
    submit(&env, &chain).await;
    let c = finished(&env, &id).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    // The streamed step's live answer, read as a client follows it: its pieces, then done,
    // adding up to the step's output.
    let mut conn = env.redis.blocking_conn().await.unwrap();
    let mut live = async |step: &str| {
        let task = c.steps[step].task_id.unwrap();
        let wait = Duration::from_millis(1);
        llmq_shared::queue::Client::read_out(&mut conn, &env.keys, task, "0", wait)
            .await
            .unwrap()
    };
    let entries = live("draft").await;
    let (last, pieces) = entries.split_last().expect("the step wrote a live answer");
    assert_eq!(last.1, llmq_shared::queue::OutEntry::Done);
    let text: String = pieces
        .iter()
        .map(|(_, e)| match e {
            llmq_shared::queue::OutEntry::Text(t) => t.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(text, output(&env, &c, "draft").await);
    // The unstreamed step wrote none; its answer fits its schema.
    let none = live("facts").await;
    assert!(none.is_empty(), "{none:?}");
    let record = env
        .wait_final(c.steps["facts"].task_id.unwrap(), WAIT)
        .await
        .unwrap();
    assert_eq!(record.json, Some(json!({"city": "x"})), "{record:?}");
    w.stop().await.unwrap();
}

/// What a step reads before it runs is its own state and its neighbours' (parents, the
/// steps its prompt names, children), never the whole chain's: in a wide chain, each step's
/// read stays the same size.
#[tokio::test]
async fn a_step_reads_only_its_own_state_and_its_neighbours() {
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let id = format!("{}-reads", env.queue);
    let mut steps = vec![json!({"name": "plan", "prompt": "Plan it"})];
    for i in 0..30 {
        steps.push(json!({"name": format!("s{i}"), "after": ["plan"], "prompt": "Do part"}));
    }
    steps.push(json!({"name": "merge", "after": ["s3", "s7"], "prompt": "Merge"}));
    steps.push(json!({"name": "docs", "after": ["merge"],
        "prompt": "Document {{merge.output}} as planned: {{plan.summary}}"}));
    steps.push(json!({"name": "last", "after": ["docs"], "prompt": "Ship it"}));
    let spec = json!({"v": 1, "chain_id": id, "steps": steps});
    expand_as_tester(&env, &spec).await;
    let read = |name: &'static str| {
        let (redis, keys, id) = (env.redis.clone(), env.keys.clone(), id.clone());
        async move {
            let context = redis.step_context(&keys, &id, name).await.unwrap().unwrap();
            let mut names: Vec<String> = context.states.into_keys().collect();
            names.sort();
            (names, context.seen.unwrap())
        }
    };
    let (names, seen) = read("merge").await;
    assert_eq!(names, ["docs", "merge", "s3", "s7"]);
    assert!(seen.own.contains("\"waits\""), "{seen:?}");
    assert_eq!(seen.children.len(), 1, "{seen:?}");
    assert!(seen.children[0].contains("\"merge\""), "{seen:?}");
    // The plan is named by the prompt, not a parent: read too.
    let (names, _) = read("docs").await;
    assert_eq!(names, ["docs", "last", "merge", "plan"]);
    let (names, seen) = read("plan").await;
    assert_eq!(names.len(), 31, "{names:?}");
    assert_eq!(seen.children.len(), 30);
    assert!(
        seen.children.iter().all(|c| c.contains("\"plan\"")),
        "{seen:?}"
    );
}

/// A step's end swaps in the state its worker built from the state it read before running
/// (no JSON decoded in Redis) only while the stored state is still that text: one that
/// changed meanwhile (here, the chain was cancelled) is left as it is, as when the script
/// merges the fields itself.
#[tokio::test]
async fn a_steps_state_is_swapped_in_only_while_it_is_the_one_its_worker_read() {
    use llmq_shared::chain::StepState;
    use redis::AsyncCommands;
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let id = format!("{}-swap", env.queue);
    let spec = json!({"v": 1, "chain_id": id, "steps": [
        {"name": "plan", "prompt": "Plan it"},
        {"name": "build", "after": ["plan"], "prompt": "Build it"},
        {"name": "docs", "after": ["build"], "prompt": "Document it"}]});
    let read = |n: usize| read_as_tester(&env, n);
    let ttl = Duration::from_secs(60);
    expand_as_tester(&env, &spec).await;
    // What a worker reads before it runs a step, and writes when the step ends.
    let end = |entry_id, name: &str, seen| {
        let fields = StepState {
            provider: Some("mock".into()),
            model: Some(format!("model-of-{name}")),
            cost_usd: 0.25,
            ..StepState::default()
        };
        step_end(&env, &id, name, entry_id, "succeeded", fields, seen)
    };
    let seen = |name: &'static str| {
        let (redis, keys, id) = (env.redis.clone(), env.keys.clone(), id.clone());
        async move {
            let context = redis.step_context(&keys, &id, name).await.unwrap().unwrap();
            context.seen.unwrap()
        }
    };

    // Unchanged since it was read: swapped in, and the chain moves on.
    let plan = read(1).await.remove(0);
    let plan_seen = seen("plan").await;
    assert!(plan_seen.own.contains("\"queued\""), "{plan_seen:?}");
    let applied = env
        .redis
        .write(
            &env.keys,
            "tester",
            ttl,
            &[end(plan.entry_id, "plan", Some(plan_seen))],
        )
        .await
        .unwrap();
    assert_eq!(applied, [true]);
    let state = env.redis.chain(&env.keys, &id).await.unwrap().unwrap();
    let plan_state = &state.steps["plan"];
    assert_eq!(
        (
            plan_state.status.as_str(),
            plan_state.model.as_deref(),
            plan_state.cost_usd
        ),
        ("succeeded", Some("model-of-plan"), 0.25),
        "{state:#?}"
    );
    assert_eq!(status(&state, "build"), "queued", "{state:#?}");
    let mut conn = env.redis.conn().await.unwrap();
    let steps = env.keys.chain_steps(&id);
    let plan_raw: String = conn.hget(&steps, "plan").await.unwrap();
    // Lua's encoder would have written the empty list as `{}`.
    assert!(
        plan_raw.contains(r#""waits":[]"#),
        "swapped in as its worker built it, not decoded and encoded by the script: {plan_raw}"
    );

    // Read, then the chain is cancelled before the step ends: the step stays cancelled,
    // and the chain's count of unfinished steps is not taken down a second time.
    let build = read(1).await.remove(0);
    let build_seen = seen("build").await;
    let cancelled = env.redis.cancel_chain(&env.keys, &id).await.unwrap();
    assert_eq!(cancelled, Ok(2), "build and docs are cancelled");
    let before: Option<String> = conn.hget(&steps, "build").await.unwrap();
    let applied = env
        .redis
        .write(
            &env.keys,
            "tester",
            ttl,
            &[end(build.entry_id, "build", Some(build_seen))],
        )
        .await
        .unwrap();
    assert_eq!(applied, [true], "the task's own entry is acked");
    let after: Option<String> = conn.hget(&steps, "build").await.unwrap();
    assert_eq!(
        after, before,
        "a state changed since it was read is not swapped"
    );
    let state = env.redis.chain(&env.keys, &id).await.unwrap().unwrap();
    assert_eq!(state.state, "cancelled", "{state:#?}");
    assert_eq!(status(&state, "build"), "cancelled", "{state:#?}");
    let pending: Option<i64> = conn.hget(env.keys.chain(&id), "pending").await.unwrap();
    assert_eq!(pending, Some(0));
}

/// A step's state as the swap and the script's merge must both leave it, over a seeded
/// generator of chains (a step with up to three children, some of which also wait for a
/// second root, merges and judges, either `on_failure`), outcomes and recorded fields (text
/// that JSON must escape, costs Lua's encoder rounds): the same chain is expanded twice, its
/// first step ended in one with the states its worker read (the swap, its children moved by
/// the worker) and in the other without (the script's merge), the chain's other root ending
/// or not in between (so the swap may find the states changed), and both chains must then
/// hold the same states, counts and enqueued steps. Lua writes an empty list as `{}` and a
/// number to 14 digits; nothing else may differ.
#[tokio::test]
async fn a_swapped_step_ends_as_the_scripts_merge_would_end_it() {
    use llmq_shared::chain::StepState;
    use llmq_tests::harness::SeededRng;
    use redis::AsyncCommands;
    const CASES: usize = 200;
    const PIECES: &[&str] = &[
        "plain", " ", "\"", "\\", "/", "\n", "\t", "\u{1}", "é", "💥", "{}", "[]", "null",
        "\u{2028}",
    ];
    const COSTS: &[f64] = &[0.0, 0.25, 0.1 + 0.2, 1e-9, 123_456.789_012_345, 1e300];
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let mut rng = SeededRng(0x5EED_C4A1_5A4B_0001);
    let mut conn = env.redis.conn().await.unwrap();
    let ttl = Duration::from_secs(60);

    // A chain's states with what may differ between the two paths taken out.
    fn normal(v: &Value) -> Value {
        match v {
            Value::Object(m) if m.is_empty() => json!([]),
            Value::Object(m) => m
                .iter()
                .filter(|(k, _)| *k != "task_id")
                .map(|(k, v)| (k.clone(), normal(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
            Value::Array(a) => a.iter().map(normal).collect(),
            Value::Number(n) => json!(format!("{:.12e}", n.as_f64().unwrap())),
            v => v.clone(),
        }
    }
    let text = |rng: &mut SeededRng| -> Option<String> {
        (rng.below(4) != 0).then(|| {
            (0..1 + rng.below(6))
                .map(|_| PIECES[rng.below(PIECES.len())])
                .collect()
        })
    };

    for case in 0..CASES {
        let mut steps = vec![
            json!({"name": "s", "prompt": "start"}),
            json!({"name": "o", "prompt": "other"}),
        ];
        for c in 0..rng.below(4) {
            let after = match rng.below(3) {
                0 => json!(["s"]),
                1 => json!(["s", "o"]),
                _ => json!(["o", "s"]),
            };
            let mut step = json!({"name": format!("c{c}"), "after": after, "prompt": "child"});
            if after.as_array().unwrap().len() == 2 && rng.below(2) == 0 {
                step["kind"] = json!("judge");
                step["min_success"] = json!(1 + rng.below(2));
            }
            steps.push(step);
            if c == 0 && rng.below(2) == 0 {
                steps.push(json!({"name": "g", "after": ["c0"], "prompt": "grandchild"}));
            }
        }
        let on_failure = ["cancel_descendants", "fail_chain"][rng.below(2)];
        let outcome = ["succeeded", "failed", "cancelled"][rng.below(3)];
        let (provider, model, summary, error) = (
            text(&mut rng),
            text(&mut rng),
            text(&mut rng),
            text(&mut rng),
        );
        let cost_usd = COSTS[rng.below(COSTS.len())];

        // The other root ends, or not, between the first step's read and its end.
        let other_ends = (rng.below(2) == 0).then(|| ["succeeded", "failed"][rng.below(2)]);
        let mut ends = Vec::new();
        let mut ids = Vec::new();
        for swap in [true, false] {
            let id = format!("{}-merge-{case}-{swap}", env.queue);
            let spec = json!({"v": 1, "chain_id": id, "on_failure": on_failure, "steps": steps});
            expand_as_tester(&env, &spec).await;
            let mut entries = std::collections::HashMap::new();
            for d in read_as_tester(&env, 2).await {
                entries.insert(step_of(&d), d.entry_id);
            }
            let mut contexts = Vec::new();
            for name in ["s", "o"] {
                let context = env.redis.step_context(&env.keys, &id, name).await.unwrap();
                contexts.push(context.unwrap().seen.filter(|_| swap));
            }
            let o_seen = contexts.pop().unwrap();
            let s_seen = contexts.pop().unwrap();
            let end = |name: &str, outcome, fields, seen| {
                step_end(&env, &id, name, entries[name], outcome, fields, seen)
            };
            if let Some(other) = other_ends {
                let write = [end("o", other, StepState::default(), o_seen)];
                let applied = env.redis.write(&env.keys, "tester", ttl, &write).await;
                assert_eq!(applied.unwrap(), [true], "case {case}");
            }
            let fields = StepState {
                provider: provider.clone(),
                model: model.clone(),
                summary: summary.clone(),
                error: error.clone(),
                cost_usd,
                ..StepState::default()
            };
            ends.push(end("s", outcome, fields, s_seen));
            ids.push(id);
        }
        let applied = env
            .redis
            .write(&env.keys, "tester", ttl, &ends)
            .await
            .unwrap();
        assert_eq!(applied, [true, true], "case {case}");

        // What each chain enqueued: its steps' names, in order.
        let mut enqueued: [Vec<String>; 2] = Default::default();
        for d in read_as_tester(&env, 16).await {
            let task: Value = serde_json::from_slice(d.payload.as_ref().unwrap()).unwrap();
            let chain = usize::from(task["chain_id"] == ids[1].as_str());
            enqueued[chain].push(step_of(&d));
        }
        let mut held = Vec::new();
        for id in &ids {
            let states: std::collections::HashMap<String, String> =
                conn.hgetall(env.keys.chain_steps(id)).await.unwrap();
            let chain: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(env.keys.chain(id))
                .arg(&["state", "pending", "failed", "cancelled"])
                .query_async(&mut conn)
                .await
                .unwrap();
            let s = states["s"].clone();
            let lua_wrote = states.values().any(|v| v.contains(r#""waits":{}"#));
            let states: serde_json::Map<String, Value> = states
                .iter()
                .map(|(k, v)| (k.clone(), normal(&serde_json::from_str(v).unwrap())))
                .collect();
            held.push((Value::Object(states), chain, s, lua_wrote));
        }
        // Unless the other root ended first: the first took the swap (Lua would have written
        // the empty list as `{}`), and a step that succeeded moved its children as its worker
        // built them too (the script encoded no state of the chain); the second took the
        // script's merge.
        if other_ends.is_none() {
            assert!(
                held[0].2.contains(r#""waits":[]"#),
                "case {case}: {}",
                held[0].2
            );
            assert!(
                held[1].2.contains(r#""waits":{}"#),
                "case {case}: {}",
                held[1].2
            );
            if outcome == "succeeded" {
                assert!(!held[0].3, "case {case}: {:?}", held[0].0);
            }
        }
        assert_eq!(
            (&held[0].0, &held[0].1, &enqueued[0]),
            (&held[1].0, &held[1].1, &enqueued[1]),
            "case {case}: {steps:?} ended {outcome} (the other root {other_ends:?}) with on_failure {on_failure}"
        );
    }
}

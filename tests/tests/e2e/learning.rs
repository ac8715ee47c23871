//! Learned routing through real workers, the scheduler, the real Redis and Postgres, and
//! llmq-mock over HTTP: the scheduler reads what the ledger says of each model into Redis,
//! workers route by it and say why, and reviews' verdicts reach the ledger.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chrono::Utc;
use llmq_shared::config::Strategy;
use llmq_shared::envelope::Envelope;
use llmq_shared::keys::SchedulerKeys;
use llmq_shared::ledger::{CallRow, TaskRow};
use llmq_shared::outcome::Status;
use llmq_tests::harness::{TestEnv, WorkerHandle, database_url, redis_url};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// `n` finished tasks of `env`'s queue on `model`, one call each, of which `ok` succeeded;
/// the others failed with `class`.
fn history(
    env: &TestEnv,
    model: &str,
    n: usize,
    ok: usize,
    class: &str,
) -> (Vec<CallRow>, Vec<TaskRow>) {
    (0..n)
        .map(|i| {
            let task_id = uuid::Uuid::new_v4();
            let failed = (i >= ok).then(|| class.to_owned());
            let call = CallRow {
                task_id,
                delivery: uuid::Uuid::new_v4(),
                queue: env.queue.as_str().into(),
                task_type: "code_generation".into(),
                provider: "mock".into(),
                model: model.into(),
                outcome: if failed.is_some() {
                    llmq_shared::ledger::CallOutcome::Error
                } else {
                    llmq_shared::ledger::CallOutcome::Ok
                },
                error_class: failed.clone(),
                worker: "history".into(),
                called_at: Utc::now(),
                latency_ms: 100 + i32::try_from(i).unwrap(),
                ..CallRow::default()
            };
            let task = TaskRow {
                task_id,
                queue: env.queue.as_str().into(),
                task_type: "code_generation".into(),
                status: if failed.is_some() {
                    "dead"
                } else {
                    "succeeded"
                }
                .into(),
                attempts: 1,
                provider: Some("mock".into()),
                model: Some(model.into()),
                error_class: failed,
                finished_at: Utc::now(),
                ..TaskRow::default()
            };
            (call, task)
        })
        .unzip()
}

#[tokio::test]
async fn learned_routing_goes_where_the_fleets_history_says_and_says_why() {
    let env = TestEnv::new().await.unwrap();
    // The cheap model fails code generation; the dear one does it. Its outage is not held
    // against it.
    for (model, n, ok, class) in [
        ("mock-fast", 40, 5, "fatal"),
        ("mock-smart", 40, 39, "retryable"),
        ("mock-smart", 50, 0, "unavailable"),
    ] {
        let (calls, tasks) = history(&env, model, n, ok, class);
        env.ledger.record(&calls, &tasks).await.unwrap();
    }

    let mut config = env.settings().config;
    config.routing.strategy = Strategy::Learning;
    config.routing.explore = 0.0;
    let mut settings =
        llmq_scheduler::Settings::new(&redis_url(), &database_url(), config.clone()).unwrap();
    settings.id = Some(format!("{}-router", env.queue));
    settings.queues = vec![env.queue.clone()];
    settings.namespace = Some(env.queue.clone());
    let mut scheduler = llmq_scheduler::Scheduler::connect(settings).await.unwrap();
    assert!(scheduler.acquire().await.unwrap());
    let did = scheduler.refresh_routing_stats().await.unwrap();
    assert!(
        did.ends_with("row(s) of routing stats from 1 queue(s)"),
        "{did}"
    );
    let keys = SchedulerKeys::new(Some(&env.queue));
    let stats = llmq_shared::archive::routing_stats(&env.redis, &keys)
        .await
        .unwrap()
        .unwrap();
    let smart = stats.observed("mock", "mock-smart", "code_generation", None);
    assert_eq!(
        (smart.tasks, smart.successes),
        (40, 39),
        "the outage is not counted"
    );
    // The median of the answered calls (119 ms), from a histogram whose buckets are 10 % wide.
    let latency = smart.latency_ms.unwrap();
    assert!(
        latency.abs_diff(119) * 20 <= 119,
        "the latency is the median of the answered calls to within 5 %: {latency}"
    );
    // Redis loses them (a restart without persistence): the next run writes them again.
    let mut c = env.redis.conn().await.unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(keys.routing_stats())
        .query_async(&mut c)
        .await
        .unwrap();
    scheduler.refresh_routing_stats().await.unwrap();
    let again = llmq_shared::archive::routing_stats(&env.redis, &keys)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again, stats, "rebuilt from the ledger");
    scheduler.release().await.unwrap();

    // Two workers share the view; each reads it before its first task (no wait here).
    let worker = || {
        let mut s = env.settings();
        s.config = config.clone();
        s.scheduler_namespace = Some(env.queue.clone());
        s.stats_every = Duration::from_millis(100);
        WorkerHandle::start(s)
    };
    let (w1, w2) = (worker(), worker());
    let mut ids = Vec::new();
    for i in 0..8 {
        let mut task = Envelope::new(format!("write the parser, part {i}"));
        task.task_type = Some("code_generation".into());
        ids.push(task.id.unwrap());
        env.redis.enqueue(&env.keys, &task).await.unwrap();
    }
    for id in &ids {
        let r = env.wait_final(id, WAIT).await.unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
        assert_eq!(r.model.as_deref(), Some("mock-smart"), "{r:?}");
        let route = r.route.clone().unwrap_or_default();
        assert!(
            route.starts_with(
                "learning: mock-smart for code_generation (success 0.97 over 40 calls"
            ),
            "{route}"
        );
        let learned = r.learned.clone().unwrap();
        assert!(!learned.explored);
        assert!((learned.propensity - 1.0).abs() < 1e-9, "{learned:?}");
        assert_eq!(learned.candidates[0], "mock/mock-smart");
    }
    w1.stop().await.unwrap();
    w2.stop().await.unwrap();
    let recorded: Vec<(Option<String>, Option<f64>, Option<bool>)> = sqlx::query_as(
        "SELECT strategy, propensity, explored FROM tasks WHERE task_id = ANY($1::uuid[])",
    )
    .bind(&ids)
    .fetch_all(env.ledger.pool())
    .await
    .unwrap();
    assert_eq!(recorded.len(), ids.len());
    assert!(
        recorded
            .iter()
            .all(|r| r == &(Some("learning".into()), Some(1.0), Some(false))),
        "{recorded:?}"
    );
}

#[tokio::test]
async fn a_reviews_or_checks_verdict_is_recorded_against_the_work_it_judged() {
    let env = TestEnv::new().await.unwrap();
    let mut settings = env.settings();
    for (name, program) in [("pass", "true"), ("fail", "false")] {
        settings.config.checks.insert(
            name.into(),
            llmq_shared::config::CheckConfig {
                program: program.into(),
                args: Vec::new(),
                env: Default::default(),
                timeout: Duration::from_secs(5),
            },
        );
    }
    let w = WorkerHandle::start(settings);
    env.redis.ensure_group(&env.keys).await.unwrap();
    let mut ids = Vec::new();
    let judges = [
        (
            "approve",
            json!({"kind": "review", "model": "review-approve"}),
            true,
        ),
        (
            "reject",
            json!({"kind": "review", "model": "review-reject"}),
            false,
        ),
        ("pass", json!({"kind": "check", "command": "pass"}), true),
        ("fail", json!({"kind": "check", "command": "fail"}), false),
    ];
    for (name, judge, _) in &judges {
        let id = format!("{}-{name}", env.queue);
        let mut judge = judge.clone();
        judge["name"] = json!("judge");
        judge["after"] = json!(["impl"]);
        let chain = json!({"v": 1, "chain_id": id, "steps": [
            {"name": "impl", "prompt": "Write it", "model": "mock-fast"}, judge]});
        env.xadd("chain", chain.to_string().as_bytes())
            .await
            .unwrap();
        ids.push(id);
    }
    for (id, (name, _, approved)) in ids.iter().zip(&judges) {
        let c = env.chain_ended(id, WAIT).await;
        let judged = c.steps["impl"].task_id;
        env.eventually(
            &format!("the {name} verdict in the ledger"),
            WAIT,
            || async {
                let v: Option<Option<bool>> =
                    sqlx::query_scalar("SELECT verdict FROM tasks WHERE task_id = $1::uuid")
                        .bind(judged)
                        .fetch_optional(env.ledger.pool())
                        .await
                        .unwrap();
                v == Some(Some(*approved))
            },
        )
        .await
        .unwrap();
    }
    w.stop().await.unwrap();
}

#[tokio::test]
async fn under_cheapest_the_scheduler_keeps_no_routing_stats() {
    let env = TestEnv::new().await.unwrap();
    let mut settings =
        llmq_scheduler::Settings::new(&redis_url(), &database_url(), env.settings().config)
            .unwrap();
    settings.id = Some(format!("{}-cheapest", env.queue));
    settings.queues = vec![env.queue.clone()];
    settings.namespace = Some(env.queue.clone());
    let mut scheduler = llmq_scheduler::Scheduler::connect(settings).await.unwrap();
    assert!(scheduler.acquire().await.unwrap());
    let did = scheduler.refresh_routing_stats().await.unwrap();
    assert_eq!(did, "routing.strategy is cheapest: no stats to keep");
    let keys = SchedulerKeys::new(Some(&env.queue));
    assert!(
        llmq_shared::archive::routing_stats(&env.redis, &keys)
            .await
            .unwrap()
            .is_none()
    );
    scheduler.release().await.unwrap();
}

#[tokio::test]
async fn insights_report_what_the_ledger_holds() {
    let env = TestEnv::new().await.unwrap();
    let (url, ledger) = env.own_ledger().await;
    let row = |model: &str, ty: &str, ok: bool, class: Option<&str>, cost: f64| TaskRow {
        task_id: uuid::Uuid::new_v4(),
        queue: env.queue.as_str().into(),
        task_type: ty.into(),
        status: if ok { "succeeded" } else { "dead" }.into(),
        attempts: 1,
        provider: Some("mock".into()),
        model: Some(model.into()),
        cost_usd: cost,
        error_class: class.map(str::to_owned),
        duration_ms: 100,
        finished_at: Utc::now(),
        ..TaskRow::default()
    };
    let mut rows = Vec::new();
    // Code generation: the premium model 96 of 100 at 2 cents; the cheap one 39 of 40
    // succeeded at a tenth of a cent, one of which a review rejected; and 10 outages that
    // count neither way.
    for i in 0..100 {
        rows.push(row(
            "premium",
            "code_generation",
            i < 96,
            Some("fatal"),
            0.02,
        ));
    }
    for i in 0..40 {
        rows.push(row(
            "cheap",
            "code_generation",
            i < 39,
            Some("retryable"),
            0.001,
        ));
    }
    for _ in 0..10 {
        rows.push(row(
            "cheap",
            "code_generation",
            false,
            Some("unavailable"),
            0.0,
        ));
    }
    // Review: the cheap model is no good at it.
    for i in 0..30 {
        rows.push(row("cheap", "code_review", i < 10, Some("fatal"), 0.001));
    }
    ledger.record(&[], &rows).await.unwrap();
    ledger
        .verdicts(&[llmq_shared::ledger::Verdict {
            task_id: rows[100].task_id,
            approved: false,
        }])
        .await
        .unwrap();

    let env = &env;
    let url = url.as_str();
    let insights = |args: &'static [&'static str]| async move {
        let mut all = vec!["insights"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--database-url", url, "--format", "json"]);
        let (code, out) = env.cli(&all).await;
        assert_eq!(code, 0, "{out}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let summary = insights(&["summary"]).await;
    let find = |v: &serde_json::Value, model: &str, ty: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|l| l["model"] == model && l["task_type"] == ty)
            .cloned()
            .unwrap()
    };
    let cheap = find(&summary, "cheap", "code_generation");
    assert_eq!(cheap["tasks"], 40, "outages are not counted: {cheap}");
    assert_eq!(
        cheap["successes"], 38,
        "a rejected output is no success: {cheap}"
    );
    assert!((cheap["cost_per_task_usd"].as_f64().unwrap() - 0.001).abs() < 1e-9);
    assert_eq!(
        find(&summary, "premium", "code_generation")["successes"],
        96
    );
    assert_eq!(find(&summary, "cheap", "code_review")["successes"], 10);

    let ranked = insights(&["rankings", "code_generation"]).await;
    let order: Vec<&str> = ranked
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["model"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["premium", "cheap"], "0.96 before 0.95");
    assert_eq!(
        insights(&["model", "cheap"])
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let switches = insights(&["optimize", "--tolerance", "0.02"]).await;
    let switches = switches.as_array().unwrap();
    assert_eq!(switches.len(), 1, "{switches:?}");
    assert_eq!(switches[0]["from"], "mock/premium");
    assert_eq!(switches[0]["to"], "mock/cheap");
    assert!((switches[0]["saving_per_task_usd"].as_f64().unwrap() - 0.019).abs() < 1e-9);
    // The same, in words.
    let (code, text) = env
        .cli(&["insights", "optimize", "--database-url", url])
        .await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        text,
        "code_generation: mock/premium -> mock/cheap saves $0.0190 per task ($1.9000 over its 100 tasks): success 0.95 over 40 tasks against 0.96 over 100\n"
    );
    // And the table.
    let (code, table) = env
        .cli(&[
            "insights",
            "rankings",
            "code_generation",
            "--database-url",
            url,
        ])
        .await;
    assert_eq!(code, 0, "{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("task type"), "{table}");
    assert!(
        lines[1].contains("mock/premium") && lines[1].contains("96.0%"),
        "{table}"
    );
    assert!(
        lines[2].contains("mock/cheap") && lines[2].contains("95.0%"),
        "{table}"
    );

    // Routes a learned strategy logged: six put the cheap model first (five succeeded), four
    // the premium one (all succeeded); each had an even chance.
    let logged: Vec<TaskRow> = (0..10)
        .map(|i| {
            let cheap_first = i < 6;
            let mut r = row(
                if cheap_first { "cheap" } else { "premium" },
                "data_analysis",
                i != 5,
                Some("fatal"),
                if cheap_first { 0.001 } else { 0.02 },
            );
            r.strategy = Some("learning".into());
            r.propensity = Some(0.5);
            r.explored = Some(false);
            r.candidates = Some(if cheap_first {
                vec!["mock/cheap".into(), "mock/premium".into()]
            } else {
                vec!["mock/premium".into(), "mock/cheap".into()]
            });
            r
        })
        .collect();
    ledger.record(&[], &logged).await.unwrap();
    let replay = |strategy: &'static str, file: std::path::PathBuf| async move {
        let (code, out) = env
            .cli(&[
                "insights",
                "replay",
                "--strategy",
                strategy,
                "--config",
                file.to_str().unwrap(),
                "--database-url",
                url,
                "--format",
                "json",
            ])
            .await;
        assert_eq!(code, 0, "{out}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let file = std::env::temp_dir().join(format!("{}-replay.yaml", env.queue));
    std::fs::write(
        &file,
        "providers:\n  - name: mock\n    kind: openai_compatible\n    base_url: http://127.0.0.1:1/v1\n    models:\n      - {id: cheap, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}\n      - {id: premium, input_usd_per_mtok: 3, output_usd_per_mtok: 15}\n",
    )
    .unwrap();
    // No calls in this ledger yet: every model stands at the prior, so `cost` would have
    // put the cheap one first; the six count.
    let r = replay("cost", file.clone()).await;
    assert_eq!(
        (r["routes"].as_u64(), r["matched"].as_u64()),
        (Some(10), Some(6)),
        "{r}"
    );
    assert!(
        (r["success_rate"].as_f64().unwrap() - 5.0 / 6.0).abs() < 1e-9,
        "{r}"
    );
    assert!(
        (r["cost_per_task_usd"].as_f64().unwrap() - 0.001).abs() < 1e-9,
        "{r}"
    );
    assert!(
        (r["logged_success_rate"].as_f64().unwrap() - 0.9).abs() < 1e-9,
        "{r}"
    );
    // The calls show the cheap model failing data analysis: now `cost` would have put the
    // premium model first, and the four routes that did count.
    let calls: Vec<llmq_shared::ledger::CallRow> = (0..40)
        .map(|i| llmq_shared::ledger::CallRow {
            task_id: uuid::Uuid::new_v4(),
            delivery: uuid::Uuid::new_v4(),
            queue: env.queue.as_str().into(),
            task_type: "data_analysis".into(),
            provider: "mock".into(),
            model: if i < 20 { "cheap" } else { "premium" }.into(),
            outcome: if (5..20).contains(&i) {
                llmq_shared::ledger::CallOutcome::Error
            } else {
                llmq_shared::ledger::CallOutcome::Ok
            },
            error_class: (5..20).contains(&i).then(|| "fatal".to_owned()),
            worker: "history".into(),
            called_at: Utc::now(),
            ..llmq_shared::ledger::CallRow::default()
        })
        .collect();
    ledger.record(&calls, &[]).await.unwrap();
    let r = replay("cost", file.clone()).await;
    assert_eq!(r["matched"].as_u64(), Some(4), "{r}");
    assert!(
        (r["success_rate"].as_f64().unwrap() - 1.0).abs() < 1e-9,
        "{r}"
    );
    assert!(
        (r["cost_per_task_usd"].as_f64().unwrap() - 0.02).abs() < 1e-9,
        "{r}"
    );
    let _ = std::fs::remove_file(&file);
}

/// What `routing_stats` reads for each risk, and over every risk: a task of no known risk
/// counts in the line over every risk only, and each line's latency is its own calls'.
#[tokio::test]
async fn routing_stats_has_a_line_per_risk_and_one_over_every_risk() {
    use llmq_shared::envelope::Risk;
    let env = TestEnv::new().await.unwrap();
    let mut rows = Vec::new();
    for (risk, n, ok, latency) in [
        (Some("high"), 10, 4, 1_000),
        (Some("low"), 20, 18, 100),
        (None, 5, 5, 100),
    ] {
        let (mut calls, mut tasks) = history(&env, "mock-smart", n, ok, "fatal");
        for c in &mut calls {
            c.latency_ms = latency;
        }
        for t in &mut tasks {
            t.risk = risk.map(str::to_owned);
        }
        rows.push((calls, tasks));
    }
    for (calls, tasks) in &rows {
        env.ledger.record(calls, tasks).await.unwrap();
    }
    let stats = env
        .ledger
        .routing_stats(
            std::slice::from_ref(&env.queue),
            Utc::now() - chrono::Duration::days(1),
        )
        .await
        .unwrap();
    let line = |risk| stats.observed("mock", "mock-smart", "code_generation", risk);
    let (high, low, all) = (line(Some(Risk::High)), line(Some(Risk::Low)), line(None));
    assert_eq!((high.tasks, high.successes), (10, 4));
    assert_eq!((low.tasks, low.successes), (20, 18));
    assert_eq!((all.tasks, all.successes), (35, 27));
    // Within 5 % of each line's median: 1,000 ms for high, 100 ms for low and for all.
    assert!(high.latency_ms.unwrap().abs_diff(1_000) <= 50, "{high:?}");
    assert!(low.latency_ms.unwrap().abs_diff(100) <= 5, "{low:?}");
    assert!(all.latency_ms.unwrap().abs_diff(100) <= 5, "{all:?}");
}

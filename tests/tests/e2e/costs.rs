//! `llmq costs` against sums computed directly in SQL, on a ledger of mixed providers,
//! models, task types, chains, cached tokens and free calls.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use chrono::{Duration, NaiveDate, TimeZone, Utc};
use llmq_shared::config::Prices;
use llmq_shared::ledger::CallRow;
use llmq_shared::provider::Usage;
use llmq_tests::harness::TestEnv;
use serde_json::Value;

#[tokio::test]
async fn costs_match_the_ledger_to_the_cent_for_every_grouping() {
    let env = TestEnv::new().await.unwrap();
    // A ledger of its own: the report reads by day, and a shared ledger keeps every earlier
    // run's rows, some of which would land on any day chosen.
    let (db, ledger) = env.own_ledger().await;
    let day = NaiveDate::from_ymd_opt(2040, 1, 1).unwrap();
    let start = Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).unwrap());
    let chain = format!("chain-{}", env.queue);
    let models = [
        ("openai", "gpt-4o-mini", Prices::list(0.15, 0.60, 0.075)),
        ("anthropic", "claude-sonnet", Prices::list(3.0, 15.0, 0.30)),
        ("gemini-free", "gemini-flash", Prices::default()),
    ];
    let types = ["code_generation", "research", "code_review"];
    let mut rows = Vec::new();
    for i in 0..30u32 {
        let (provider, model, prices) = &models[i as usize % 3];
        let usage = Usage {
            input_tokens: 1_000 + u64::from(i) * 137,
            output_tokens: 200 + u64::from(i) * 53,
            cached_tokens: if i % 4 == 0 { 500 } else { 0 },
            cache_write_tokens: 0,
            reasoning_tokens: 0,
        };
        rows.push(CallRow {
            task_id: uuid::Uuid::new_v4(),
            delivery: uuid::Uuid::new_v4(),
            run: 0,
            attempt: 1,
            call_no: 1,
            queue: env.queue.as_str().into(),
            chain_id: (i % 2 == 0).then(|| chain.clone()),
            task_type: types[i as usize % 3].into(),
            provider: (*provider).into(),
            model: (*model).into(),
            input_tokens: usage.input_tokens as i64,
            output_tokens: usage.output_tokens as i64,
            cached_tokens: usage.cached_tokens as i64,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            cost_usd: prices.cost(&usage),
            latency_ms: 10,
            outcome: llmq_shared::ledger::CallOutcome::Ok,
            error_class: None,
            error: None,
            worker: "test".into(),
            called_at: start + Duration::minutes(i64::from(i) * 7),
            list_cost_usd: None,
            tenant: None,
            tags: None,
        });
    }
    // A call whose attempt ended while it waited for its rate-limit window: never sent, so
    // not a call in the report.
    let mut unsent = rows[0].clone();
    unsent.task_id = uuid::Uuid::new_v4();
    unsent.delivery = uuid::Uuid::new_v4();
    (
        unsent.input_tokens,
        unsent.output_tokens,
        unsent.cached_tokens,
        unsent.cost_usd,
    ) = (0, 0, 0, 0.0);
    unsent.outcome = llmq_shared::ledger::CallOutcome::Unsent;
    unsent.chain_id = None;
    ledger
        .record(&[rows.clone(), vec![unsent]].concat(), &[])
        .await
        .unwrap();

    let date = day.to_string();
    // By chain: the chains begun that day, each whole (here all of it is that day).
    for (by, column) in [
        ("provider", "provider"),
        ("model", "provider || '/' || model"),
        ("type", "task_type"),
        ("day", "to_char(called_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')"),
        ("chain", "chain_id"),
    ] {
        let (code, out) = env
            .cli(&[
                "costs",
                "--date",
                &date,
                "--by",
                by,
                "--format",
                "json",
                "--database-url",
                &db,
            ])
            .await;
        assert_eq!(code, 0, "{out}");
        let report: Value = serde_json::from_str(&out).unwrap();
        let want: Vec<(String, i64, f64)> = sqlx::query_as(&format!(
            "SELECT {column}, count(*) FILTER (WHERE outcome NOT IN ('unsent', 'cached')), sum(cost_usd)::float8 FROM provider_calls
             WHERE called_at >= $1 AND called_at < $2 AND {column} IS NOT NULL
             GROUP BY 1 ORDER BY 1"
        ))
        .bind(start)
        .bind(start + Duration::days(1))
        .fetch_all(ledger.pool())
        .await
        .unwrap();
        let lines = report["breakdown"].as_array().unwrap();
        assert_eq!(lines.len(), want.len(), "--by {by}: {out}");
        for (key, calls, cost) in &want {
            let line = lines
                .iter()
                .find(|l| l["key"] == key.as_str())
                .unwrap_or_else(|| panic!("--by {by}: no {key}"));
            assert_eq!(line["calls"].as_i64(), Some(*calls), "--by {by} {key}");
            let got = line["cost_usd"].as_f64().unwrap();
            assert!(
                (got - cost).abs() < 0.005,
                "--by {by} {key}: {got} vs {cost}"
            );
            assert!(
                (got - cost).abs() < 1e-9,
                "exact, not only to the cent: {got} vs {cost}"
            );
        }
        let total: f64 = rows.iter().map(|r| r.cost_usd).sum();
        assert!((report["total_cost_usd"].as_f64().unwrap() - total).abs() < 1e-9);
        assert_eq!(report["calls"], 30);
    }

    // Free calls cost nothing but are counted.
    let (_, out) = env
        .cli(&[
            "costs",
            "--date",
            &date,
            "--by",
            "provider",
            "--format",
            "json",
            "--database-url",
            &db,
        ])
        .await;
    let report: Value = serde_json::from_str(&out).unwrap();
    let free = report["breakdown"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["key"] == "gemini-free")
        .unwrap()
        .clone();
    assert_eq!(
        (free["calls"].as_i64(), free["cost_usd"].as_f64()),
        (Some(10), Some(0.0))
    );

    // A chain: its tasks, each with its cost and provider, in the order they ran.
    let (code, out) = env
        .cli(&[
            "costs",
            "--date",
            &date,
            "--chain-id",
            &chain,
            "--by",
            "type",
            "--database-url",
            &db,
        ])
        .await;
    assert_eq!(code, 0);
    assert!(out.contains(&format!("Chain {chain}: 15 tasks")), "{out}");
    let first = rows.iter().find(|r| r.chain_id.is_some()).unwrap();
    assert!(
        out.contains(&first.task_id.to_string()) && out.contains("openai/gpt-4o-mini"),
        "{out}"
    );
    let chain_total: f64 = rows
        .iter()
        .filter(|r| r.chain_id.is_some())
        .map(|r| r.cost_usd)
        .sum();
    assert!(
        out.contains(&format!("Total: ${chain_total:.4}"))
            || out.contains(&format!("Total: ${chain_total:.6}")),
        "{out}"
    );

    // With no end given, a report runs to today, and says today (it once said tomorrow).
    let today = || Utc::now().date_naive().to_string();
    let before = today();
    let (code, up_to) = env.cli(&["costs", "--database-url", &db]).await;
    let (_, since) = env
        .cli(&["costs", "--since", "2026-01-01", "--database-url", &db])
        .await;
    let after = today();
    assert_eq!(code, 0, "{up_to}");
    assert!(
        [&before, &after]
            .iter()
            .any(|d| up_to.starts_with(&format!("Costs up to {d}\n"))
                && since.starts_with(&format!("Costs from 2026-01-01 to {d}\n"))),
        "{up_to}\n{since}"
    );
    // So a start after today with no end is a range that ends before it starts (the ledger's
    // rows here are in 2040).
    let (code, out) = env
        .cli(&["costs", "--since", &date, "--database-url", &db])
        .await;
    assert_eq!((code, out.as_str()), (llmq::EXIT_USAGE, ""), "{out}");

    // A range that ends before it starts is refused, as the page refuses it, not answered
    // with an empty report.
    let (code, out) = env
        .cli(&[
            "costs",
            "--since",
            "2026-11-30",
            "--until",
            "2026-11-01",
            "--database-url",
            &db,
        ])
        .await;
    assert_eq!((code, out.as_str()), (llmq::EXIT_USAGE, ""), "{out}");
}

#[tokio::test]
async fn providers_list_shows_the_price_in_use_and_where_it_came_from() {
    let env = TestEnv::new().await.unwrap();
    let path = std::env::temp_dir().join(format!("{}-prices.yaml", env.queue));
    std::fs::write(
        &path,
        "providers:\n  - name: openai\n    kind: openai\n    api_key: k\n    models:\n      - {id: gpt-4o-mini}\n      - {id: gpt-4o, input_usd_per_mtok: 2.0, output_usd_per_mtok: 8.0}\n",
    )
    .unwrap();
    let (code, out) = env
        .cli(&[
            "providers",
            "list",
            "--config",
            path.to_str().unwrap(),
            "--format",
            "json",
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let models: Vec<Value> = serde_json::from_str(&out).unwrap();
    let get = |id: &str| models.iter().find(|m| m["model"] == id).unwrap().clone();
    assert_eq!(get("gpt-4o-mini")["price_source"], "bundled table");
    assert_eq!(get("gpt-4o-mini")["input_usd_per_mtok"], 0.15);
    assert_eq!(get("gpt-4o")["price_source"], "provider file");
    assert_eq!(
        get("gpt-4o")["input_usd_per_mtok"],
        2.0,
        "the provider file overrides the table"
    );
}

/// `--by chain` lists the costliest chains begun in the range, each with its whole cost:
/// a chain begun before the range is left out though it called within it, one begun in it
/// counts its calls after it, and `--limit` keeps the costliest, in order.
#[tokio::test]
async fn costs_by_chain_lists_the_costliest_chains_begun_in_the_range() {
    let env = TestEnv::new().await.unwrap();
    // A ledger of its own, as above.
    let (db, ledger) = env.own_ledger().await;
    let first = NaiveDate::from_ymd_opt(2050, 1, 1).unwrap();
    let at = |day: i64, hour: i64| {
        Utc.from_utc_datetime(&first.and_hms_opt(0, 0, 0).unwrap())
            + Duration::days(day)
            + Duration::hours(hour)
    };
    let call = |chain: &str, called_at, cost_usd| CallRow {
        task_id: uuid::Uuid::new_v4(),
        delivery: uuid::Uuid::new_v4(),
        run: 0,
        attempt: 1,
        call_no: 1,
        queue: env.queue.as_str().into(),
        chain_id: Some(format!("{}-{chain}", env.queue)),
        task_type: "research".into(),
        provider: "openai".into(),
        model: "gpt-4o-mini".into(),
        input_tokens: 10,
        output_tokens: 5,
        cached_tokens: 0,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        cost_usd,
        latency_ms: 10,
        outcome: llmq_shared::ledger::CallOutcome::Ok,
        error_class: None,
        error: None,
        worker: "test".into(),
        called_at,
        list_cost_usd: None,
        tenant: None,
        tags: None,
    };
    // Days 1 to 3 are the range.
    let rows = [
        call("before", at(0, 23), 5.0),
        call("before", at(1, 1), 5.0),
        call("small", at(1, 2), 0.5),
        call("spans", at(2, 22), 1.0),
        call("spans", at(4, 3), 2.5),
        call("big", at(3, 12), 3.0),
        call("mid", at(2, 5), 2.0),
        call("after", at(4, 1), 9.0),
    ];
    ledger.record(&rows, &[]).await.unwrap();
    let (code, out) = env
        .cli(&[
            "costs",
            "--since",
            &(first + Duration::days(1)).to_string(),
            "--until",
            &(first + Duration::days(3)).to_string(),
            "--by",
            "chain",
            "--limit",
            "3",
            "--format",
            "json",
            "--database-url",
            &db,
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let lines: Vec<(String, f64, i64)> = report["breakdown"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["key"].as_str().unwrap().to_owned(),
                l["cost_usd"].as_f64().unwrap(),
                l["calls"].as_i64().unwrap(),
            )
        })
        .collect();
    let name = |c: &str| format!("{}-{c}", env.queue);
    assert_eq!(
        lines,
        [
            (name("spans"), 3.5, 2),
            (name("big"), 3.0, 1),
            (name("mid"), 2.0, 1)
        ],
        "{out}"
    );
    // The total is what was called in the range, chains or not.
    assert!((report["total_cost_usd"].as_f64().unwrap() - 11.5).abs() < 1e-9);

    use clap::Parser;
    let refused = llmq::cli::Cli::try_parse_from(["llmq", "costs", "--limit", "0"])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(refused.contains("--limit"), "{refused}");
}

/// Spend by tenant and by tag, read from `spend_rollups`, against the same sums over the
/// ledger's rows: every tenant, every value of a tag, one tenant's by provider, by day and
/// by tag, and `llmq insights` of one tenant; the work without a tenant or a tag is its own
/// line (`(none)`, key `""` in JSON), so the lines add up to the whole.
#[tokio::test]
async fn costs_by_tenant_and_tag_match_the_ledger_s_rows() {
    use llmq_shared::ledger::TaskRow;
    let env = TestEnv::new().await.unwrap();
    let (db, ledger) = env.own_ledger().await;
    let day = NaiveDate::from_ymd_opt(2041, 3, 1).unwrap();
    let start = Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).unwrap());
    let mut rng = llmq_tests::harness::SeededRng(0x7e4a_4701);
    let (mut calls, mut tasks) = (Vec::new(), Vec::new());
    for i in 0..120i64 {
        let tenant = [None, Some("acme"), Some("acme"), Some("globex")][rng.below(4)];
        let tags = match rng.below(4) {
            0 => None,
            1 => Some(r#"{"team":"search"}"#),
            2 => Some(r#"{"team":"ads","feature":"triage"}"#),
            _ => Some(r#"{"feature":"summary"}"#),
        };
        let (provider, model) =
            [("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet")][rng.below(2)];
        let task_id = uuid::Uuid::new_v4();
        let chain_id = (rng.below(2) == 0).then(|| format!("chain-{}", rng.below(3)));
        let at = start + Duration::minutes(i * 11);
        calls.push(CallRow {
            task_id,
            delivery: uuid::Uuid::new_v4(),
            attempt: 1,
            call_no: 1,
            queue: env.queue.as_str().into(),
            task_type: ["research", "code_review"][rng.below(2)].into(),
            provider: provider.into(),
            model: model.into(),
            input_tokens: 100 + rng.below(5000) as i64,
            output_tokens: rng.below(900) as i64,
            cost_usd: rng.below(100_000) as f64 / 1e7,
            latency_ms: 10,
            outcome: llmq_shared::ledger::CallOutcome::Ok,
            worker: "test".into(),
            called_at: at,
            chain_id: chain_id.clone(),
            tenant: tenant.map(str::to_owned),
            tags: tags.map(str::to_owned),
            ..CallRow::default()
        });
        tasks.push(TaskRow {
            task_id,
            queue: env.queue.to_string(),
            task_type: calls[calls.len() - 1].task_type.to_string(),
            status: ["succeeded", "succeeded", "failed"][rng.below(3)].into(),
            attempts: 1,
            provider: Some(provider.into()),
            model: Some(model.into()),
            cost_usd: calls[calls.len() - 1].cost_usd,
            finished_at: at + Duration::seconds(5),
            chain_id,
            duration_ms: 100 + rng.below(900) as i64,
            tenant: tenant.map(str::to_owned),
            tags: tags.map(str::to_owned),
            ..TaskRow::default()
        });
    }
    ledger.record(&calls, &tasks).await.unwrap();

    let date = day.to_string();
    for (args, key, rows) in [
        (vec!["--by", "tenant"], "coalesce(tenant, '')", "true"),
        (
            vec!["--by", "tag:team"],
            "coalesce(tags ->> 'team', '')",
            "true",
        ),
        (
            vec!["--by", "tag:feature"],
            "coalesce(tags ->> 'feature', '')",
            "true",
        ),
        (vec!["--tenant", "acme"], "provider", "tenant = 'acme'"),
        (
            vec!["--tenant", "acme", "--by", "model"],
            "provider || '/' || model",
            "tenant = 'acme'",
        ),
        (
            vec!["--tenant", "globex", "--by", "tag:team"],
            "coalesce(tags ->> 'team', '')",
            "tenant = 'globex'",
        ),
        (
            vec!["--tenant", "acme", "--by", "chain"],
            "coalesce(chain_id, '-')",
            "tenant = 'acme'",
        ),
    ] {
        let mut cli = vec![
            "costs",
            "--date",
            &date,
            "--format",
            "json",
            "--database-url",
            &db,
        ];
        cli.extend(&args);
        let (code, out) = env.cli(&cli).await;
        assert_eq!(code, 0, "{args:?}: {out}");
        let report: Value = serde_json::from_str(&out).unwrap();
        let want: Vec<(String, i64, f64, i64)> = sqlx::query_as(&format!(
            "SELECT c.key, c.calls, c.cost, coalesce(t.tasks, 0)
             FROM (SELECT {key} AS key, count(*) AS calls, sum(cost_usd)::float8 AS cost
                   FROM provider_calls WHERE {rows} GROUP BY 1) c
             LEFT JOIN (SELECT {key} AS key, count(*) AS tasks FROM tasks WHERE {rows}
                   GROUP BY 1) t USING (key)
             ORDER BY 1"
        ))
        .fetch_all(ledger.pool())
        .await
        .unwrap();
        assert!(want.len() > 1, "{args:?}: the ledger has one group only");
        let lines = report["breakdown"].as_array().unwrap();
        assert_eq!(lines.len(), want.len(), "{args:?}: {out}");
        for (key, calls, cost, tasks) in &want {
            let line = lines
                .iter()
                .find(|l| l["key"] == key.as_str())
                .unwrap_or_else(|| panic!("{args:?}: no line {key:?} in {out}"));
            assert_eq!(line["calls"].as_i64(), Some(*calls), "{args:?} {key}");
            assert_eq!(
                line["tasks"].as_i64(),
                Some(*tasks),
                "{args:?} {key:?} {out}"
            );
            let got = line["cost_usd"].as_f64().unwrap();
            assert!((got - cost).abs() < 1e-9, "{args:?} {key}: {got} vs {cost}");
        }
        let whole: f64 = want.iter().map(|w| w.2).sum();
        let got = report["total_cost_usd"].as_f64().unwrap();
        assert!(
            (got - whole).abs() < 1e-9,
            "{args:?}: total {got} vs {whole}"
        );
        let tasks: i64 = want.iter().map(|w| w.3).sum();
        assert_eq!(report["tasks"].as_i64(), Some(tasks), "{args:?}");
    }
    // As text, the work without a tenant is a line of its own.
    let (code, out) = env
        .cli(&[
            "costs",
            "--date",
            &date,
            "--by",
            "tenant",
            "--database-url",
            &db,
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("\n(none) ") && out.contains("\nacme ") && out.contains("TENANT"),
        "{out}"
    );

    // One tenant's insights: its succeeded share and cost per model.
    let (code, out) = env
        .cli(&[
            "insights",
            "summary",
            "--tenant",
            "acme",
            "--since",
            &date,
            "--format",
            "json",
            "--database-url",
            &db,
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let lines: Value = serde_json::from_str(&out).unwrap();
    let want: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT model, task_type, count(*), count(*) FILTER (WHERE status = 'succeeded')
         FROM tasks WHERE tenant = 'acme' GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(ledger.pool())
    .await
    .unwrap();
    let lines = lines.as_array().unwrap();
    assert_eq!(lines.len(), want.len(), "{out}");
    for (model, task_type, n, ok) in &want {
        let line = lines
            .iter()
            .find(|l| l["model"] == model.as_str() && l["task_type"] == task_type.as_str())
            .unwrap_or_else(|| panic!("no {model} {task_type} in {out}"));
        assert_eq!(
            (line["tasks"].as_i64(), line["successes"].as_i64()),
            (Some(*n), Some(*ok))
        );
    }

    // A grouping that is none, and a tag name that cannot be one, are refused with a sentence.
    for (by, says) in [
        ("team", "is not a grouping"),
        ("tag:te am", "name a tag with"),
    ] {
        let refused =
            <llmq::cli::Cli as clap::Parser>::try_parse_from(["llmq", "costs", "--by", by])
                .unwrap_err()
                .to_string();
        assert!(refused.contains(says), "{by}: {refused}");
    }
}

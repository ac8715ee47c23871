//! The ledger's rollups equal the rows they sum, whatever is written through the ledger and
//! in whatever order, by writers at once, with connections cut in the middle of writes (what
//! a Postgres restart does to the transactions under way) and months' partitions made (their
//! rows moved out of the default partition) meanwhile; and the migration that adds them sums
//! a ledger written before it. A Postgres of the test's own is crashed (`pg_ctl stop -m
//! immediate`) and started again while writers write: what it recovers sums exactly too.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use llmq_shared::ledger::{CallRow, Ledger, TaskRow, Verdict};
use llmq_tests::harness::{
    ScratchPostgres, SeededRng, TestEnv, calls_out_of_step, rollup_mismatches,
};
use uuid::Uuid;

/// The first midnight of a month five months from now: beyond the partitions a new ledger
/// has (three months ahead), so rows wait in the default partition until the test makes
/// their months' partitions while the writers write.
fn boundary() -> DateTime<Utc> {
    let later = Utc::now().date_naive() + chrono::Months::new(5);
    Utc.from_utc_datetime(&later.with_day(1).unwrap().and_hms_opt(0, 0, 0).unwrap())
}

/// Around a midnight that ends a month, so that rows and their updates land on both days
/// and in both months' partitions.
fn around_midnight(rng: &mut SeededRng) -> DateTime<Utc> {
    boundary() + Duration::seconds(rng.below(7200) as i64 - 3600)
        - Duration::days(rng.below(3) as i64)
}

fn pick<'a>(rng: &mut SeededRng, from: &[&'a str]) -> &'a str {
    from[rng.below(from.len())]
}

fn call(rng: &mut SeededRng, task_id: Uuid, chain: Option<&str>) -> CallRow {
    CallRow {
        task_id,
        delivery: Uuid::new_v4(),
        run: 0,
        attempt: 1,
        call_no: rng.below(3) as i32,
        queue: pick(rng, &["q-a", "q-b"]).into(),
        chain_id: chain.map(str::to_owned),
        task_type: pick(rng, &["research", "code_review"]).into(),
        provider: pick(rng, &["openai", "anthropic"]).into(),
        model: pick(rng, &["small", "large"]).into(),
        outcome: llmq_shared::ledger::CallOutcome::Started,
        worker: "w".into(),
        called_at: around_midnight(rng),
        tenant: (rng.below(3) > 0).then(|| pick(rng, &["acme", "globex"]).into()),
        tags: tags(rng),
        ..CallRow::default()
    }
}

/// None, one or two tags (spend is summed by each).
fn tags(rng: &mut SeededRng) -> Option<String> {
    match rng.below(4) {
        0 => None,
        1 => Some(format!(r#"{{"team":"{}"}}"#, pick(rng, &["search", "ads"]))),
        2 => Some(format!(
            r#"{{"team":"{}","feature":"{}"}}"#,
            pick(rng, &["search", "ads"]),
            pick(rng, &["summary", "triage"])
        )),
        _ => Some("{}".into()),
    }
}

/// The call `c` over: answered, failed or never sent, with its tokens and cost.
fn completed(rng: &mut SeededRng, c: &CallRow) -> CallRow {
    use llmq_shared::ledger::CallOutcome;
    let outcome = [
        CallOutcome::Ok,
        CallOutcome::Ok,
        CallOutcome::Error,
        CallOutcome::Unsent,
    ][rng.below(4)];
    let sent = outcome != CallOutcome::Unsent;
    CallRow {
        outcome,
        error_class: (outcome == CallOutcome::Error)
            .then(|| pick(rng, &["fatal", "rate_limited"]).into()),
        input_tokens: if sent { rng.below(5000) as i64 } else { 0 },
        output_tokens: if sent { rng.below(900) as i64 } else { 0 },
        cached_tokens: if sent { rng.below(300) as i64 } else { 0 },
        reasoning_tokens: if sent { rng.below(50) as i64 } else { 0 },
        cost_usd: if sent {
            rng.below(100_000) as f64 / 1e7
        } else {
            0.0
        },
        list_cost_usd: (rng.below(4) == 0).then(|| rng.below(200_000) as f64 / 1e7),
        latency_ms: rng.below(3000) as i32,
        ..c.clone()
    }
}

fn task(rng: &mut SeededRng, c: &CallRow) -> TaskRow {
    let status = pick(rng, &["succeeded", "succeeded", "dead", "failed"]);
    TaskRow {
        task_id: c.task_id,
        queue: c.queue.to_string(),
        chain_id: c.chain_id.clone(),
        task_type: c.task_type.to_string(),
        status: status.into(),
        attempts: 1 + rng.below(3) as i32,
        provider: (rng.below(5) > 0).then(|| c.provider.to_string()),
        model: Some(c.model.to_string()),
        cost_usd: rng.below(100_000) as f64 / 1e7,
        error_class: (status != "succeeded")
            .then(|| pick(rng, &["fatal", "retryable", "quota"]).into()),
        // After its call, up to two hours later (across the midnight its calls are around),
        // and enqueued before it when its producer said when: every row of a task is written
        // in that span (migrations/20261203000002_task_spans.sql).
        finished_at: c.called_at + Duration::seconds(rng.below(7200) as i64),
        risk: (rng.below(2) == 0).then(|| pick(rng, &["low", "high"]).into()),
        duration_ms: rng.below(10_000) as i64,
        enqueued_at: (rng.below(4) > 0)
            .then(|| c.called_at - Duration::seconds(rng.below(3600) as i64)),
        tenant: c.tenant.clone(),
        tags: c.tags.clone(),
        ..TaskRow::default()
    }
}

/// One writer of `ops` writes: see [`writer_while`].
async fn writer(ledger: Ledger, seed: u64, ops: usize) -> usize {
    let mut left = ops;
    writer_while(ledger, seed, move || {
        let go = left > 0;
        left = left.saturating_sub(1);
        go
    })
    .await
}

/// One writer, writing while `more` says so: starts calls, completes, forgets or
/// leaves them, finishes tasks, finishes some again (a new status, a new day), and judges
/// some. Errors (a cut connection) are expected and counted: whatever committed must still
/// sum exactly. Returns how many writes failed.
async fn writer_while(ledger: Ledger, seed: u64, mut more: impl FnMut() -> bool) -> usize {
    let mut rng = SeededRng(seed);
    let mut started: Vec<CallRow> = Vec::new();
    let mut finished: Vec<TaskRow> = Vec::new();
    let mut failed = 0;
    while more() {
        match rng.below(6) {
            0 | 1 => {
                let chain = format!("chain-{}", rng.below(4));
                let chain = (rng.below(2) == 0).then_some(chain.as_str());
                let rows: Vec<CallRow> = (0..1 + rng.below(6))
                    .map(|_| call(&mut rng, Uuid::new_v4(), chain))
                    .collect();
                match ledger.record(&rows, &[]).await {
                    Ok(()) => started.extend(rows),
                    Err(_) => failed += 1,
                }
            }
            2 if !started.is_empty() => {
                let n = 1 + rng.below(started.len().min(8));
                let rows: Vec<CallRow> = started.drain(..n).collect();
                let done: Vec<CallRow> = rows.iter().map(|c| completed(&mut rng, c)).collect();
                let mut tasks: Vec<TaskRow> = Vec::new();
                for c in &done {
                    if rng.below(2) == 0 {
                        tasks.push(task(&mut rng, c));
                    }
                }
                match ledger.record(&done, &tasks).await {
                    Ok(()) => finished.extend(tasks),
                    Err(_) => failed += 1,
                }
            }
            3 if !started.is_empty() => {
                let n = 1 + rng.below(started.len().min(4));
                let gone: Vec<CallRow> = started.drain(..n).collect();
                failed += usize::from(ledger.forget_started(&gone).await.is_err());
            }
            4 if !finished.is_empty() => {
                let i = rng.below(finished.len());
                let mut again = finished[i].clone();
                again.status = pick(&mut rng, &["succeeded", "dead"]).into();
                // Finished again (a replay, a delivery after a worker died past its write),
                // on another day or in another month: within a day of the first finish,
                // before it too (a worker whose clock is behind).
                again.finished_at += Duration::seconds(rng.below(22 * 3600) as i64 - 2 * 3600);
                again.risk = None;
                failed += usize::from(ledger.record(&[], &[again]).await.is_err());
            }
            5 if !finished.is_empty() => {
                let verdicts: Vec<Verdict> = (0..1 + rng.below(3))
                    .map(|_| Verdict {
                        task_id: finished[rng.below(finished.len())].task_id,
                        approved: rng.below(2) == 0,
                    })
                    .collect();
                failed += usize::from(ledger.verdicts(&verdicts).await.is_err());
            }
            _ => {}
        }
    }
    failed
}

#[tokio::test]
async fn rollups_equal_the_rows_they_sum_under_concurrent_writers_and_cut_connections() {
    let env = TestEnv::new().await.unwrap();
    let (url, admin) = env.own_ledger().await;
    let name = url.rsplit('/').next().unwrap().to_owned();
    let mut cut = 0;
    for seed in [0x5eed_0001_u64, 0x5eed_0002, 0x5eed_0003] {
        let ledger = Ledger::connect(&url, 4).await.unwrap();
        // The writers write until the cutter is done, so every cut comes while they do
        // (however fast their writes are).
        let cut_over = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let cut_over = Arc::clone(&cut_over);
                tokio::spawn(writer_while(ledger.clone(), seed * 31 + w, move || {
                    !cut_over.load(Ordering::SeqCst)
                }))
            })
            .collect();
        // The rows' months get their partitions while the writers write: what the default
        // partition holds of them moves, and no write may be lost or counted twice.
        let partitions = {
            let admin = admin.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                // Retried while the cutter cuts its connection too; 50 tries at most.
                let mut last = None;
                for _ in 0..50 {
                    match sqlx::query_scalar::<_, i32>("SELECT ledger_make_partitions($1)")
                        .bind(boundary() + Duration::days(1))
                        .fetch_one(admin.pool())
                        .await
                    {
                        Ok(_) => return,
                        Err(e) => last = Some(e),
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                panic!("the partitions were never made: {last:?}");
            })
        };
        // Chaos: cut the writers' connections while they write, as a Postgres restart cuts
        // the transactions under way.
        let cutter = {
            let admin = admin.clone();
            let name = name.clone();
            tokio::spawn(async move {
                for _ in 0..6 {
                    tokio::time::sleep(std::time::Duration::from_millis(40)).await;
                    let _ = sqlx::query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE datname = $1 AND pid <> pg_backend_pid() AND state <> 'idle'",
                    )
                    .bind(&name)
                    .execute(admin.pool())
                    .await;
                }
            })
        };
        cutter.await.unwrap();
        cut_over.store(true, Ordering::SeqCst);
        for w in writers {
            cut += w.await.unwrap();
        }
        partitions.await.unwrap();
        let waiting: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM provider_calls_default)
                + (SELECT count(*) FROM tasks_default)",
        )
        .fetch_one(admin.pool())
        .await
        .unwrap();
        assert_eq!(
            waiting, 0,
            "seed {seed:#x}: rows left in the default partitions"
        );
        let calls: i64 = sqlx::query_scalar("SELECT count(*) FROM provider_calls")
            .fetch_one(admin.pool())
            .await
            .unwrap();
        assert!(calls > 0, "seed {seed:#x}: nothing was written");
        let wrong = rollup_mismatches(admin.pool()).await.unwrap();
        assert!(wrong.is_empty(), "seed {seed:#x}:\n{}", wrong.join("\n"));
        assert_eq!(
            calls_out_of_step(admin.pool()).await.unwrap(),
            0,
            "seed {seed:#x}: every call carries its task's status, verdict and risk"
        );
    }
    assert!(cut > 0, "no write was cut: the chaos did not happen");
    eprintln!("rollups: {cut} writes cut");
}

/// Writers go on while their Postgres crashes and comes back: every write under way is cut,
/// and what the server recovers from its WAL (rows and rollups alike) must sum exactly.
#[tokio::test]
async fn rollups_equal_the_rows_after_postgres_crashes_under_writers() {
    let pg = tokio::task::spawn_blocking(|| ScratchPostgres::start(None))
        .await
        .unwrap();
    let url = pg.url("postgres");
    let ledger = Ledger::connect(&url, 4).await.unwrap();
    ledger.migrate().await.unwrap();
    // The writers write until the server is back, so the crash always comes while they do
    // (however fast their writes are).
    let back = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let back = Arc::clone(&back);
            tokio::spawn(writer_while(ledger.clone(), 0xc4a5_0000 + w, move || {
                !back.load(Ordering::SeqCst)
            }))
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let pg = tokio::task::spawn_blocking(move || {
        pg.crash_and_restart();
        pg
    })
    .await
    .unwrap();
    back.store(true, Ordering::SeqCst);
    let mut failed = 0;
    for w in writers {
        failed += w.await.unwrap();
    }
    assert!(
        failed > 0,
        "no write failed: the crash came after the writers"
    );
    eprintln!("rollups after a crash: {failed} writes failed");
    // The pool's connections died with the server: a fresh one reads what it recovered.
    let admin = Ledger::connect(&url, 1).await.unwrap();
    let calls: i64 = sqlx::query_scalar("SELECT count(*) FROM provider_calls")
        .fetch_one(admin.pool())
        .await
        .unwrap();
    assert!(calls > 0, "nothing was written before the crash");
    let wrong = rollup_mismatches(admin.pool()).await.unwrap();
    assert!(
        wrong.is_empty(),
        "after a crash ({failed} writes failed):\n{}",
        wrong.join("\n")
    );
    assert_eq!(calls_out_of_step(admin.pool()).await.unwrap(), 0);
    // And writes after it add to what it recovered.
    assert_eq!(writer(admin.clone(), 0xc4a5_1000, 60).await, 0);
    let wrong = rollup_mismatches(admin.pool()).await.unwrap();
    assert!(wrong.is_empty(), "after more writes:\n{}", wrong.join("\n"));
    drop(pg);
}

/// A call `provider` answered at `at`, of queue `q`.
fn answered(provider: &str, at: DateTime<Utc>) -> CallRow {
    CallRow {
        task_id: Uuid::new_v4(),
        delivery: Uuid::new_v4(),
        attempt: 1,
        queue: "q".into(),
        task_type: "research".into(),
        provider: provider.into(),
        model: "m".into(),
        outcome: llmq_shared::ledger::CallOutcome::Ok,
        worker: "w".into(),
        input_tokens: 10,
        called_at: at,
        ..CallRow::default()
    }
}

/// The scheduler's `ledger_rollups` duty sums what was written (the rollup tables read
/// directly, no report rolling first); a report read by a role that may not roll (a reporting
/// user with SELECT only, as on a replica) answers from what the last roll summed, instead of
/// failing.
#[tokio::test]
async fn the_scheduler_rolls_and_a_reader_that_may_not_roll_reads_what_was_rolled() {
    let env = TestEnv::new().await.unwrap();
    let (url, ledger) = env.own_ledger().await;
    let pool = ledger.pool().clone();
    let at = Utc::now();
    let summed = "SELECT coalesce(sum(calls), 0)::int8 FROM call_rollups";
    let calls = || async {
        sqlx::query_scalar::<_, i64>(summed)
            .fetch_one(&pool)
            .await
            .unwrap()
    };

    ledger.record(&[answered("p", at)], &[]).await.unwrap();
    assert_eq!(calls().await, 0, "summed after the write, not by it");
    let mut settings = llmq_scheduler::Settings::new(
        &llmq_tests::harness::redis_url(),
        &url,
        env.settings().config,
    )
    .unwrap();
    settings.id = Some(format!("{}-rollups", env.queue));
    settings.queues = vec![env.queue.clone()];
    settings.namespace = Some(env.queue.clone());
    let mut scheduler = llmq_scheduler::Scheduler::connect(settings).await.unwrap();
    assert!(scheduler.acquire().await.unwrap());
    scheduler
        .run_duty(llmq_scheduler::Duty::LedgerRollups)
        .await
        .unwrap();
    assert_eq!(calls().await, 1);
    scheduler.release().await.unwrap();

    // A second call, then a reader with SELECT only: its report's roll is refused, and the
    // report reads the one call summed.
    ledger.record(&[answered("p", at)], &[]).await.unwrap();
    let role = format!("reader_{}", env.queue.replace('-', "_"));
    for sql in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"),
    ] {
        sqlx::query(&sql).execute(&pool).await.unwrap();
    }
    let reader_url = url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(reader_url, url, "the test server's URL names its user");
    let reader = Ledger::connect(&reader_url, 1).await.unwrap();
    let by_provider = |ledger: Ledger| async move {
        calls_by_provider(&ledger, at)
            .await
            .iter()
            .map(|(_, calls)| calls)
            .sum::<i64>()
    };
    assert_eq!(by_provider(reader.clone()).await, 1);
    assert_eq!(
        by_provider(ledger.clone()).await,
        2,
        "the owner's report rolls"
    );
    reader.pool().close().await;
    for sql in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        sqlx::query(&sql).execute(&pool).await.unwrap();
    }
}

/// `llmq costs --by provider` around `at` (a report, so it rolls first): calls by provider.
async fn calls_by_provider(ledger: &Ledger, at: DateTime<Utc>) -> Vec<(String, i64)> {
    let day = at - Duration::days(1);
    let mut lines: Vec<(String, i64)> = ledger
        .costs(
            day,
            day + Duration::days(3),
            llmq_shared::ledger::Scope::All,
            llmq_shared::ledger::GroupBy::Provider,
        )
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.key, l.calls))
        .collect();
    lines.sort();
    lines
}

/// The rollups are summed after the rows are written, up to a line of transaction ids
/// (migration 20261204000001): a transaction left open (a long report, a session idle in a
/// transaction) holds back its own rows, which are summed once it commits, and no other's.
/// A report rolls before it reads, so it counts every row committed before it.
#[tokio::test]
async fn a_transaction_left_open_holds_back_only_its_own_rows() {
    let env = TestEnv::new().await.unwrap();
    let (url, ledger) = env.own_ledger().await;
    let other = sqlx::PgPool::connect(&url).await.unwrap();
    let at = Utc::now();
    let answered = |provider: &str| answered(provider, at);
    let calls_by_provider = || calls_by_provider(&ledger, at);

    // A call written in a transaction that stays open, begun before the others.
    let mut open = other.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO provider_calls (task_id, attempt, call_no, queue, task_type, provider,
            model, input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_usd,
            latency_ms, outcome, worker, called_at, delivery)
         VALUES ($1, 1, 0, 'q', 'research', 'late', 'm', 10, 0, 0, 0, 0, 0, 'ok', 'w', $2, $3)",
    )
    .bind(Uuid::new_v4())
    .bind(at)
    .bind(Uuid::new_v4())
    .execute(&mut *open)
    .await
    .unwrap();
    ledger.record(&[answered("early")], &[]).await.unwrap();
    assert_eq!(calls_by_provider().await, [("early".to_owned(), 1)]);
    ledger.record(&[answered("early")], &[]).await.unwrap();
    assert_eq!(calls_by_provider().await, [("early".to_owned(), 2)]);

    open.commit().await.unwrap();
    assert_eq!(
        calls_by_provider().await,
        [("early".to_owned(), 2), ("late".to_owned(), 1)]
    );
    let wrong = rollup_mismatches(ledger.pool()).await.unwrap();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn the_migration_sums_a_ledger_written_before_it() {
    let env = TestEnv::new().await.unwrap();
    // Every migration before the rollups.
    let (_, ledger) = env.ledger_before("pre", "20261126000001").await;
    // This version's writer also names the columns the routing rollup, the cache writes and
    // the deferred rollups and the tenant and tags add to each call, and the batch id a task's row has; they are there while it writes
    // the old ledger, and gone (as in a ledger an older version wrote) before the migration.
    let columns = |sql: &'static str| {
        let pool = ledger.pool().clone();
        async move { sqlx::query(sql).execute(&pool).await.unwrap() }
    };
    // So do its keys, which hold the time since the partitions.
    columns(
        "ALTER TABLE provider_calls ADD COLUMN task_status TEXT, ADD COLUMN task_risk TEXT,
            ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0, ADD COLUMN written BIGINT,
            ADD COLUMN tenant TEXT, ADD COLUMN tags JSONB",
    )
    .await;
    columns(
        "ALTER TABLE tasks ADD COLUMN batch_id TEXT, ADD COLUMN enqueued_at TIMESTAMPTZ,
            ADD COLUMN tenant TEXT, ADD COLUMN tags JSONB",
    )
    .await;
    // And the functions its delete of earlier finishes bounds its search with (stand-ins
    // that bound nothing).
    columns(
        "CREATE FUNCTION ledger_span_from(timestamptz, timestamptz) RETURNS timestamptz
            LANGUAGE sql AS $$ SELECT '-infinity'::timestamptz $$",
    )
    .await;
    columns(
        "CREATE FUNCTION ledger_span_until(timestamptz) RETURNS timestamptz
            LANGUAGE sql AS $$ SELECT 'infinity'::timestamptz $$",
    )
    .await;
    columns("CREATE UNIQUE INDEX old_call_key ON provider_calls (task_id, delivery, call_no, called_at)").await;
    columns("CREATE UNIQUE INDEX old_task_key ON tasks (task_id, finished_at)").await;
    assert_eq!(writer(ledger.clone(), 0x00be_f04e, 150).await, 0);
    columns(
        "ALTER TABLE tasks DROP COLUMN batch_id, DROP COLUMN enqueued_at, DROP COLUMN tenant,
            DROP COLUMN tags",
    )
    .await;
    columns("DROP FUNCTION ledger_span_from, ledger_span_until").await;
    columns(
        "ALTER TABLE provider_calls DROP COLUMN task_status, DROP COLUMN task_risk,
            DROP COLUMN cache_write_tokens, DROP COLUMN written, DROP COLUMN tenant,
            DROP COLUMN tags",
    )
    .await;
    columns("DROP INDEX old_call_key").await;
    columns("DROP INDEX old_task_key").await;
    ledger.migrate().await.unwrap();
    let wrong = rollup_mismatches(ledger.pool()).await.unwrap();
    assert!(
        wrong.is_empty(),
        "after the migration:\n{}",
        wrong.join("\n")
    );
    assert_eq!(calls_out_of_step(ledger.pool()).await.unwrap(), 0);
    // And what is written after it adds to what it summed.
    assert_eq!(writer(ledger.clone(), 0xaf7e2, 150).await, 0);
    let wrong = rollup_mismatches(ledger.pool()).await.unwrap();
    assert!(wrong.is_empty(), "after more writes:\n{}", wrong.join("\n"));
    let queues = llmq_shared::insights::queues(ledger.pool()).await.unwrap();
    assert_eq!(queues, ["q-a", "q-b"]);
}

/// A ledger of the release before rollups (`c7011cf`'s shapes) is migrated while a worker of
/// that release writes to it, and `llmq migrate` is killed partway (after the history was set
/// aside and some migrations applied) and run again: every row written before and during
/// the upgrade is there once, the rollups equal the rows, the calls carry their tasks' views,
/// and nothing of the history's tables is left.
#[tokio::test]
async fn an_old_ledger_upgraded_under_writes_and_killed_partway_loses_nothing() {
    let env = TestEnv::new().await.unwrap();
    let (url, ledger) = env.ledger_before("killed", "20261126000001").await;
    let pool = ledger.pool().clone();
    // 3,000 tasks over 60 days, two calls each and a third of them chain steps; and calls
    // of 500 tasks that never finished.
    sqlx::query(
        "INSERT INTO tasks (task_id, queue, chain_id, task_type, status, attempts, provider,
            model, cost_usd, finished_at, risk, duration_ms)
         SELECT md5('t' || g)::uuid, 'q-old', CASE WHEN g % 3 = 0 THEN 'c' || (g / 15) END,
            'research', CASE WHEN g % 5 = 0 THEN 'dead' ELSE 'succeeded' END, 1, 'openai',
            'small', g * 0.0001, now() - (g % 60) * interval '1 day', 'high', 1000
         FROM generate_series(1, 3000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO provider_calls (task_id, delivery, run, attempt, call_no, queue, chain_id,
            task_type, provider, model, input_tokens, output_tokens, cached_tokens,
            reasoning_tokens, cost_usd, latency_ms, outcome, worker, called_at)
         SELECT md5('t' || (g % 3500 + 1))::uuid, md5('d' || g)::uuid, 0, 1, g / 3500, 'q-old',
            CASE WHEN (g % 3500 + 1) % 3 = 0 THEN 'c' || ((g % 3500 + 1) / 15) END,
            'research', 'openai', 'small', 100, 20, 0, 0, 0.0001, 500, 'ok', 'w',
            now() - ((g % 3500 + 1) % 60) * interval '1 day' - interval '1 hour'
         FROM generate_series(0, 6999) g",
    )
    .execute(&pool)
    .await
    .unwrap();

    // A worker of the old release: a call and its task every few ms, in the columns every
    // release has, until the upgrade is done.
    let stop = Arc::new(AtomicBool::new(false));
    let old_worker = {
        let stop = stop.clone();
        let writes = Ledger::connect(&url, 1).await.unwrap();
        tokio::spawn(async move {
            let (mut written, mut slowest) = (0_i64, std::time::Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                let task = Uuid::new_v4();
                for sql in [
                    "INSERT INTO provider_calls (task_id, delivery, run, attempt, call_no, queue,
                        task_type, provider, model, input_tokens, output_tokens, cached_tokens,
                        reasoning_tokens, cost_usd, latency_ms, outcome, worker, called_at)
                     VALUES ($1, $1, 0, 1, 0, 'q-new', 'research', 'openai', 'small', 10, 2, 0,
                        0, 0.001, 300, 'ok', 'w', now())",
                    "INSERT INTO tasks (task_id, queue, task_type, status, attempts, provider,
                        model, cost_usd, finished_at)
                     VALUES ($1, 'q-new', 'research', 'succeeded', 1, 'openai', 'small', 0.001,
                        now())",
                ] {
                    let started = std::time::Instant::now();
                    // A write that fails (a deadlock with a migration) is written again, as
                    // the finisher does.
                    while let Err(e) = sqlx::query(sql).bind(task).execute(writes.pool()).await {
                        eprintln!("the old worker writes again: {e}");
                    }
                    slowest = slowest.max(started.elapsed());
                }
                written += 1;
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            }
            (written, slowest)
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    // Killed as the fifth migration starts: the run is dropped where it waits.
    let fifth = Arc::new(AtomicBool::new(false));
    let killed = {
        let told = fifth.clone();
        let mut say = move |step: String| {
            eprintln!("llmq migrate: {step}");
            if step.starts_with("migration 5 of") {
                told.store(true, Ordering::Relaxed);
            }
        };
        let run = ledger.migrate_telling(&mut say);
        tokio::select! {
            done = run => Some(done),
            () = async {
                while !fifth.load(Ordering::Relaxed) {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            } => None,
        }
    };
    assert!(killed.is_none(), "the first run was to be killed partway");
    // As a process killed: its connections go, and the locks they held with them.
    ledger.pool().close().await;
    let ledger = Ledger::connect(&url, 2).await.unwrap();
    let pool = ledger.pool().clone();
    // With what the old worker wrote before it was set aside.
    assert!(
        scalar_of(&pool, "SELECT count(*) FROM tasks_history").await >= 3000,
        "the history is set aside"
    );
    let mut steps = Vec::new();
    ledger
        .migrate_telling(&mut |step| steps.push(step))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    stop.store(true, Ordering::Relaxed);
    let (written, slowest) = old_worker.await.unwrap();
    eprintln!("{written} tasks written meanwhile, the slowest write {slowest:?}; {steps:#?}");
    assert!(written > 0);
    assert!(
        steps
            .iter()
            .any(|s| s == "moved the history back and summed it"),
        "{steps:#?}"
    );

    assert_eq!(
        scalar_of(&pool, "SELECT count(*) FROM tasks").await,
        3000 + written
    );
    assert_eq!(
        scalar_of(&pool, "SELECT count(*) FROM provider_calls").await,
        7000 + written
    );
    assert_eq!(
        scalar_of(
            &pool,
            "SELECT (to_regclass('tasks_history') IS NOT NULL)::int
                + (to_regclass('provider_calls_history') IS NOT NULL)::int
                + (SELECT count(*) FROM pg_namespace WHERE nspname = 'llmq_shapes')"
        )
        .await,
        0
    );
    let wrong = rollup_mismatches(&pool).await.unwrap();
    assert!(wrong.is_empty(), "after the upgrade:\n{}", wrong.join("\n"));
    assert_eq!(calls_out_of_step(&pool).await.unwrap(), 0);
    // The history's calls carry their tasks' views, the unfinished tasks' none.
    assert_eq!(
        scalar_of(
            &pool,
            "SELECT count(*) FROM provider_calls WHERE queue = 'q-old' AND task_risk = 'high'"
        )
        .await,
        6000
    );
    // Run again, it has nothing to do.
    ledger.migrate().await.unwrap();
    assert_eq!(
        scalar_of(&pool, "SELECT count(*) FROM tasks").await,
        3000 + written
    );
}

async fn scalar_of(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

//! The ledger partitioned by month: `llmq migrate` partitions a written ledger in place while
//! it is written to, losing and doubling nothing; a task finished again in another month keeps
//! one row; and `ledger.retention` drops whole months, and deletes the first partition's
//! rows of those months by their range (the rollups keep their sums), run by the
//! scheduler's `ledger_partitions` duty.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Duration, Utc};
use llmq_shared::ledger::{CallRow, Ledger, TaskRow};
use llmq_tests::harness::{TestEnv, calls_out_of_step, redis_url, rollup_mismatches};
use sqlx::PgPool;
use uuid::Uuid;

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// The table a task's row is in.
async fn home_of(pool: &PgPool, task: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT tableoid::regclass::text FROM tasks WHERE task_id = $1")
        .bind(task)
        .fetch_all(pool)
        .await
        .unwrap()
}

fn finished(task: Uuid, queue: &str, at: DateTime<Utc>, status: &str) -> TaskRow {
    TaskRow {
        task_id: task,
        queue: queue.into(),
        task_type: "research".into(),
        status: status.into(),
        attempts: 1,
        provider: Some("openai".into()),
        model: Some("small".into()),
        cost_usd: 0.25,
        finished_at: at,
        duration_ms: 900,
        ..TaskRow::default()
    }
}

fn answered(task: Uuid, queue: &str, at: DateTime<Utc>) -> CallRow {
    CallRow {
        task_id: task,
        delivery: Uuid::new_v4(),
        attempt: 1,
        call_no: 1,
        queue: queue.into(),
        task_type: "research".into(),
        provider: "openai".into(),
        model: "small".into(),
        input_tokens: 1000,
        output_tokens: 200,
        cost_usd: 0.25,
        latency_ms: 700,
        outcome: llmq_shared::ledger::CallOutcome::Ok,
        worker: "w".into(),
        called_at: at,
        ..CallRow::default()
    }
}

/// Every call, task and routing try the rollups hold, as one number.
const SUMS: &str = "SELECT ((SELECT sum(calls) FROM call_rollups) * 1000000
    + (SELECT sum(tasks) FROM task_rollups) * 1000
    + (SELECT sum(tries) FROM routing_rollups))::bigint";

/// The scheduler of the test's queue on the ledger at `url`, keeping `keep` of it, its clock
/// at `now`; it holds the lease.
async fn keeping(
    env: &TestEnv,
    url: &str,
    keep: Duration,
    now: DateTime<Utc>,
) -> llmq_scheduler::Scheduler {
    let mut config = env.settings().config;
    config.ledger.retention = Some(keep.to_std().unwrap());
    let mut settings = llmq_scheduler::Settings::new(&redis_url(), url, config).unwrap();
    settings.id = Some(format!("{}-partitions", env.queue));
    settings.queues = vec![env.queue.clone()];
    settings.namespace = Some(env.queue.clone());
    settings.clock = Arc::new(move || now);
    let mut scheduler = llmq_scheduler::Scheduler::connect(settings).await.unwrap();
    assert!(scheduler.acquire().await.unwrap());
    scheduler
}

#[tokio::test]
async fn a_written_ledger_is_partitioned_in_place_while_it_is_written() {
    let env = TestEnv::new().await.unwrap();
    // The ledger as the release before partitions left it, with 90 days of rows.
    let (url, ledger) = env.ledger_before("parts", "20261127000001").await;
    let pool = ledger.pool().clone();
    sqlx::query(
        "INSERT INTO tasks (task_id, queue, task_type, status, attempts, provider, model,
            cost_usd, finished_at, duration_ms)
         SELECT md5('t' || g)::uuid, 'q-old', 'research',
            CASE WHEN g % 5 = 0 THEN 'dead' ELSE 'succeeded' END, 1, 'openai', 'small',
            g * 0.0001, now() - (g % 90) * interval '1 day' - interval '1 hour', 1000
         FROM generate_series(1, 10000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO provider_calls (task_id, delivery, run, attempt, call_no, queue, task_type,
            provider, model, input_tokens, output_tokens, cached_tokens, reasoning_tokens,
            cost_usd, latency_ms, outcome, worker, called_at)
         SELECT md5('t' || (g % 10000 + 1))::uuid, md5('d' || g)::uuid, 0, 1, 1, 'q-old',
            'research', 'openai', 'small', 100, 20, 0, 0, 0.0001, 500, 'ok', 'w',
            now() - (g % 90) * interval '1 day' - interval '2 hours'
         FROM generate_series(1, 20000) g",
    )
    .execute(&pool)
    .await
    .unwrap();

    // A writer that never stops while the ledger is migrated: every write must land.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let writes = Ledger::connect(&url, 1).await.unwrap();
        tokio::spawn(async move {
            let (mut ok, mut failed, mut slowest) = (0_i64, Vec::new(), std::time::Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                let started = std::time::Instant::now();
                let wrote = sqlx::query(
                    "INSERT INTO provider_calls (task_id, delivery, run, attempt, call_no, queue,
                        task_type, provider, model, input_tokens, output_tokens, cached_tokens,
                        reasoning_tokens, cost_usd, latency_ms, outcome, worker, called_at)
                     VALUES ($1, $2, 0, 1, 1, 'q-new', 'research', 'openai', 'small', 10, 2, 0,
                        0, 0.001, 300, 'ok', 'w', now())",
                )
                .bind(Uuid::new_v4())
                .bind(Uuid::new_v4())
                .execute(writes.pool())
                .await;
                slowest = slowest.max(started.elapsed());
                match wrote {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            (ok, failed, slowest)
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    ledger.migrate().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    stop.store(true, Ordering::Relaxed);
    let (written, failed, slowest) = writer.await.unwrap();
    eprintln!("partitioning: {written} writes meanwhile, the slowest {slowest:?}");
    assert!(failed.is_empty(), "writes failed: {failed:?}");
    assert!(written > 0);

    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT relkind::text FROM pg_class WHERE relname IN ('tasks', 'provider_calls')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(kinds, ["p", "p"], "both tables are partitioned");
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM provider_calls").await,
        20_000 + written
    );
    assert_eq!(scalar(&pool, "SELECT count(*) FROM tasks").await, 10_000);
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM provider_calls_legacy").await,
        20_000 + written,
        "the old rows stay where they are, in the first partition"
    );
    // Nothing left of the preparation: the CHECKs go with the attach.
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM pg_constraint WHERE conname LIKE '%\\_before\\_%'"
        )
        .await,
        0
    );
    let wrong = rollup_mismatches(&pool).await.unwrap();
    assert!(
        wrong.is_empty(),
        "after the migration:\n{}",
        wrong.join("\n")
    );
    assert_eq!(calls_out_of_step(&pool).await.unwrap(), 0);
    // The batch ids' index, built a partition at a time after the migrations, covers them all.
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE c.relname = 'tasks_batch_id' AND i.indisvalid"
        )
        .await,
        1,
        "the index of a batch's tasks is valid"
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'tasks_batch_id'::regclass"
        )
        .await,
        scalar(
            &pool,
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'tasks'::regclass"
        )
        .await
    );

    // A task finished again in a later month (a replay) keeps one row, in its new month, and
    // its call made in the first month is told of the new finish: the span from its enqueue
    // to its finish covers both months.
    let task = Uuid::new_v4();
    let past = Utc::now() - Duration::days(10);
    let later = Utc::now() + Duration::days(40);
    let enqueued = Some(past - Duration::hours(1));
    ledger
        .record(
            &[answered(task, "q-new", past)],
            &[TaskRow {
                enqueued_at: enqueued,
                ..finished(task, "q-new", past, "dead")
            }],
        )
        .await
        .unwrap();
    assert_eq!(home_of(&pool, task).await, ["tasks_legacy"]);
    ledger
        .record(
            &[],
            &[TaskRow {
                enqueued_at: enqueued,
                ..finished(task, "q-new", later, "succeeded")
            }],
        )
        .await
        .unwrap();
    let home = home_of(&pool, task).await;
    assert_eq!(home.len(), 1, "one row for the task: {home:?}");
    assert!(
        home[0].starts_with("tasks_2"),
        "in its month's partition: {home:?}"
    );
    let wrong = rollup_mismatches(&pool).await.unwrap();
    assert!(
        wrong.is_empty(),
        "after a finish moved:\n{}",
        wrong.join("\n")
    );
    assert_eq!(calls_out_of_step(&pool).await.unwrap(), 0);

    // `llmq migrate` again finds nothing to do.
    ledger.migrate().await.unwrap();
}

#[tokio::test]
async fn retention_drops_whole_months_and_the_rollups_keep_their_sums() {
    let env = TestEnv::new().await.unwrap();
    let (url, ledger) = env.own_ledger().await;
    let pool = ledger.pool().clone();
    let now = Utc::now();
    let q = env.queue.as_str();
    // Rows in the first partition, in a month's, and far ahead (in the default partition
    // until its month is made).
    let (old, month, ahead) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for (task, at) in [
        (old, now - Duration::days(30)),
        (month, now + Duration::days(40)),
        (ahead, now + Duration::days(800)),
    ] {
        ledger
            .record(
                &[answered(task, q, at)],
                &[finished(task, q, at, "succeeded")],
            )
            .await
            .unwrap();
    }
    assert_eq!(home_of(&pool, ahead).await, ["tasks_default"]);
    llmq_shared::ledger::roll(&pool).await.unwrap();
    let before = scalar(&pool, SUMS).await;
    assert_eq!(before, 3_003_003);

    // The scheduler, 800 days on, keeps 400 days.
    let later = now + Duration::days(800);
    let mut scheduler = keeping(&env, &url, Duration::days(400), later).await;
    let did = scheduler
        .run_duty(llmq_scheduler::Duty::LedgerPartitions)
        .await
        .unwrap();
    eprintln!("ledger_partitions: {did}");

    for task in [old, month] {
        assert!(home_of(&pool, task).await.is_empty(), "{did}");
    }
    let home = home_of(&pool, ahead).await;
    assert!(
        home[0].starts_with("tasks_2"),
        "moved to its month: {home:?}"
    );
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM provider_calls").await,
        1,
        "{did}"
    );
    assert_eq!(
        scalar(&pool, SUMS).await,
        before,
        "the rollups keep every month's sums"
    );
    // What is left: the months from 400 days before the scheduler's now, ahead to three
    // months after it; none that ended before.
    let cutoff = later - Duration::days(400);
    let (kept, oldest): (i64, DateTime<Utc>) =
        sqlx::query_as("SELECT count(*), min(upper) FROM ledger_partitions")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        oldest > cutoff && oldest <= cutoff + Duration::days(31),
        "{oldest}"
    );
    assert!(kept >= 2 * 16, "{kept} partitions");
    let tables = scalar(
        &pool,
        "SELECT count(*) FROM pg_inherits WHERE inhparent IN ('tasks'::regclass,
            'provider_calls'::regclass)",
    )
    .await;
    assert_eq!(
        tables,
        kept + 2,
        "the bookkeeping names every partition but the defaults"
    );
    // The first partitions (everything before the migration's cutoff) went, by name.
    assert!(
        did.contains("provider_calls_legacy") && did.contains("tasks_legacy"),
        "{did}"
    );

    // A second run has nothing to do.
    let again = scheduler
        .run_duty(llmq_scheduler::Duty::LedgerPartitions)
        .await
        .unwrap();
    assert_eq!(again, "0 partition(s) made, 0 dropped");
    scheduler.release().await.unwrap();
}

/// The first partition holds every row before its cutoff (on an upgraded ledger, the whole
/// history): retention deletes its rows of each month a monthly partition would have
/// dropped, by that exact range, and the rollups keep their sums.
#[tokio::test]
async fn retention_deletes_the_first_partitions_months_by_their_range() {
    let env = TestEnv::new().await.unwrap();
    let (url, ledger) = env.own_ledger().await;
    let pool = ledger.pool().clone();
    let q = env.queue.as_str();
    let now = Utc::now();
    // Keeping 90 days, every month that ended by 90 days ago goes: the first midnight of the
    // month 90 days ago is the line.
    let keep = Duration::days(90);
    let line: DateTime<Utc> = sqlx::query_scalar(
        "SELECT date_trunc('month', $1::timestamptz AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
    )
    .bind(now - keep)
    .fetch_one(&pool)
    .await
    .unwrap();
    let (gone, kept) = (Uuid::new_v4(), Uuid::new_v4());
    for (task, at) in [(gone, line - Duration::seconds(1)), (kept, line)] {
        ledger
            .record(
                &[answered(task, q, at)],
                &[finished(task, q, at, "succeeded")],
            )
            .await
            .unwrap();
        assert_eq!(home_of(&pool, task).await, ["tasks_legacy"]);
    }
    llmq_shared::ledger::roll(&pool).await.unwrap();
    let before = scalar(&pool, SUMS).await;
    assert_eq!(before, 2_002_002);

    let mut scheduler = keeping(&env, &url, keep, now).await;
    let did = scheduler
        .run_duty(llmq_scheduler::Duty::LedgerPartitions)
        .await
        .unwrap();
    let day = line.format("%Y-%m-%d");
    assert!(
        did.contains(&format!("provider_calls_legacy: 1 rows before {day}"))
            && did.contains(&format!("tasks_legacy: 1 rows before {day}")),
        "{did}"
    );
    assert!(home_of(&pool, gone).await.is_empty(), "{did}");
    assert_eq!(home_of(&pool, kept).await, ["tasks_legacy"], "{did}");
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM provider_calls").await,
        1,
        "{did}"
    );
    assert_eq!(
        scalar(&pool, SUMS).await,
        before,
        "the rollups keep the deleted months' sums"
    );
    let again = scheduler
        .run_duty(llmq_scheduler::Duty::LedgerPartitions)
        .await
        .unwrap();
    assert_eq!(again, "0 partition(s) made, 0 dropped");
    scheduler.release().await.unwrap();
}

#[tokio::test]
async fn a_migration_that_fails_leaves_no_check_that_would_refuse_rows_later() {
    let env = TestEnv::new().await.unwrap();
    let (_, ledger) = env.ledger_before("failed", "20261127000001").await;
    let pool = ledger.pool().clone();
    // The partition migration cannot create its bookkeeping table: it fails, after the
    // preparation added its CHECKs (the first week of a month ahead) to both tables.
    sqlx::query("CREATE TABLE ledger_partitions (in_the_way int)")
        .execute(&pool)
        .await
        .unwrap();
    let checks = "SELECT count(*) FROM pg_constraint WHERE conname LIKE '%\\_before\\_%'";
    assert!(ledger.migrate().await.is_err());
    assert_eq!(
        scalar(&pool, checks).await,
        0,
        "a CHECK left would refuse every row after its date"
    );
    // Nor is the migration lock left held by a pooled connection: the next run, on another
    // connection of the pool, would wait for it for ever.
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        .await,
        0,
        "the migration lock is still held"
    );
    // Out of the way, the next run partitions the ledger.
    sqlx::query("DROP TABLE ledger_partitions")
        .execute(&pool)
        .await
        .unwrap();
    ledger.migrate().await.unwrap();
    assert_eq!(scalar(&pool, checks).await, 0);
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM pg_class WHERE relname = 'tasks' AND relkind = 'p'"
        )
        .await,
        1
    );
}

/// Sequential scans of `table` and what has been counted of its rows so far, as flushed.
async fn scans_of(pool: &PgPool, table: &str) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT seq_scan, n_tup_ins, n_tup_del FROM pg_stat_user_tables WHERE relid = $1::regclass",
    )
    .bind(table)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Flushes the statistics of the one connection of `pool` (the next time it is idle).
async fn flush_stats(pool: &PgPool) {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(pool)
        .await
        .unwrap();
}

/// A ledger of the test's own, and a connection of one to read its statistics: each read
/// sees them as they are now, not as they were when the transaction first read them.
async fn ledger_with_stats(env: &TestEnv) -> (Ledger, PgPool) {
    let (url, ledger) = env.own_ledger().await;
    let checks = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    sqlx::query("SET stats_fetch_consistency = none")
        .execute(&checks)
        .await
        .unwrap();
    (ledger, checks)
}

/// A batch finds its tasks' earlier finishes, and their calls to tell, by index in a partition
/// no `ANALYZE` has seen (a new month's for its first minute, every partition of a new
/// ledger): without statistics the planner guessed that a batch's ids match a tenth of the
/// rows and read all of them, per batch.
#[tokio::test]
async fn a_batch_finds_its_rows_by_index_in_a_partition_without_statistics() {
    let env = TestEnv::new().await.unwrap();
    let (ledger, checks) = ledger_with_stats(&env).await;
    let q = env.queue.as_str();
    let earlier = Utc::now() - Duration::hours(1);
    // No ANALYZE by autovacuum while the test runs.
    let parts: Vec<String> = sqlx::query_scalar(
        "SELECT inhrelid::regclass::text FROM pg_inherits
         WHERE inhparent IN ('tasks'::regclass, 'provider_calls'::regclass)",
    )
    .fetch_all(&checks)
    .await
    .unwrap();
    for p in &parts {
        sqlx::query(&format!("ALTER TABLE {p} SET (autovacuum_enabled = off)"))
            .execute(&checks)
            .await
            .unwrap();
    }
    // What the migration's connection counted, out of the way before the baseline.
    flush_stats(ledger.pool()).await;
    // 20,000 tasks finished an hour ago, and their calls.
    for fill in [
        "INSERT INTO tasks (task_id, queue, task_type, status, attempts, provider, model,
            cost_usd, finished_at, duration_ms)
         SELECT md5('t' || g)::uuid, $1, 'research', 'succeeded', 1, 'openai', 'small', 0.25,
            $2, 900
         FROM generate_series(1, 20000) g",
        "INSERT INTO provider_calls (task_id, attempt, call_no, queue, task_type, provider,
            model, input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_usd,
            latency_ms, outcome, worker, called_at, delivery, task_status)
         SELECT md5('t' || g)::uuid, 1, 1, $1, 'research', 'openai', 'small', 1000, 200, 0, 0,
            0.25, 700, 'ok', 'w', $2, md5('d' || g)::uuid, 'succeeded'
         FROM generate_series(1, 20000) g",
    ] {
        sqlx::query(fill)
            .bind(q)
            .bind(earlier)
            .execute(&checks)
            .await
            .unwrap();
    }
    let again: Vec<Uuid> =
        sqlx::query_scalar("SELECT md5('t' || g)::uuid FROM generate_series(1, 40) g")
            .fetch_all(&checks)
            .await
            .unwrap();
    let first = again[0];
    let tasks_home = home_of(&checks, first).await.remove(0);
    let calls_home: String = sqlx::query_scalar(
        "SELECT tableoid::regclass::text FROM provider_calls WHERE task_id = $1",
    )
    .bind(first)
    .fetch_one(&checks)
    .await
    .unwrap();
    flush_stats(&checks).await;
    let flushed = std::time::Duration::from_secs(15);
    env.eventually("the fill's statistics flushed", flushed, || async {
        scans_of(&checks, &tasks_home).await.1 >= 20_000
            && scans_of(&checks, &calls_home).await.1 >= 20_000
    })
    .await
    .unwrap();
    let tasks_before = scans_of(&checks, &tasks_home).await;
    let calls_before = scans_of(&checks, &calls_home).await;

    // Forty of them finished again (a replay): each keeps one row, the later.
    let now = Utc::now();
    let calls: Vec<CallRow> = again.iter().map(|t| answered(*t, q, now)).collect();
    let tasks: Vec<TaskRow> = again
        .iter()
        .map(|t| finished(*t, q, now, "succeeded"))
        .collect();
    ledger.record(&calls, &tasks).await.unwrap();
    flush_stats(ledger.pool()).await;
    env.eventually("the batch's statistics flushed", flushed, || async {
        scans_of(&checks, &tasks_home).await.2 >= tasks_before.2 + 40
    })
    .await
    .unwrap();
    let tasks_after = scans_of(&checks, &tasks_home).await;
    let calls_after = scans_of(&checks, &calls_home).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE queue = $1")
        .bind(q)
        .fetch_one(&checks)
        .await
        .unwrap();
    assert_eq!(rows, 20_000, "each task replayed keeps one row");
    assert_eq!(
        (tasks_after.0, calls_after.0),
        (tasks_before.0, calls_before.0),
        "sequential scans of {tasks_home} and {calls_home} by the batch's write"
    );

    // Another writer's statement (not the worker's, which sets no planner setting): the task
    // trigger still finds the calls to tell by index.
    sqlx::query(
        "INSERT INTO tasks (task_id, queue, task_type, status, attempts, provider, model,
            cost_usd, finished_at, duration_ms)
         SELECT md5('t' || g)::uuid, $1, 'research', 'succeeded', 1, 'openai', 'small', 0.25,
            now(), 900
         FROM generate_series(41, 80) g",
    )
    .bind(q)
    .execute(&checks)
    .await
    .unwrap();
    flush_stats(&checks).await;
    env.eventually("the other writer's statistics flushed", flushed, || async {
        scans_of(&checks, &tasks_home).await.1 >= tasks_after.1 + 40
    })
    .await
    .unwrap();
    assert_eq!(
        scans_of(&checks, &calls_home).await.0,
        calls_before.0,
        "sequential scans of {calls_home} by the task trigger"
    );
}

/// A batch's write looks for its tasks' rows (their earlier finishes, the calls it tells of
/// them) only in the partitions of the tasks' lives, from their enqueue to their finish: not
/// in the months kept before, those made ahead or the default partition, so that the write
/// costs the same whatever `ledger.retention` keeps.
#[tokio::test]
async fn a_batch_looks_for_its_rows_only_in_the_months_of_its_tasks_lives() {
    let env = TestEnv::new().await.unwrap();
    let (ledger, checks) = ledger_with_stats(&env).await;
    let q = env.queue.as_str();
    // The batch lives in the last month made ahead: the partitions before it (the current
    // month's among them) are its past, the default partition its future.
    let last: DateTime<Utc> =
        sqlx::query_scalar("SELECT max(upper) FROM ledger_partitions WHERE parent = 'tasks'")
            .fetch_one(&checks)
            .await
            .unwrap();
    let at = last - Duration::days(10);
    let ids: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    let calls: Vec<CallRow> = ids
        .iter()
        .map(|t| answered(*t, q, at - Duration::minutes(30)))
        .collect();
    let tasks: Vec<TaskRow> = ids
        .iter()
        .map(|t| TaskRow {
            enqueued_at: Some(at - Duration::hours(1)),
            ..finished(*t, q, at, "succeeded")
        })
        .collect();
    let index_scans = || async {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT c.relname::text, coalesce(s.idx_scan, 0)
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_stat_user_tables s ON s.relid = c.oid
             WHERE i.inhparent IN ('tasks'::regclass, 'provider_calls'::regclass)
             ORDER BY 1",
        )
        .fetch_all(&checks)
        .await
        .unwrap();
        rows
    };
    flush_stats(ledger.pool()).await;
    flush_stats(&checks).await;
    let before = index_scans().await;
    let home = |name: &str| name.ends_with(&at.format("_%Y_%m").to_string());
    assert_eq!(
        before.iter().filter(|(name, _)| home(name)).count(),
        2,
        "the batch's month has a partition of each table: {before:?}"
    );
    assert!(before.len() >= 6, "months before and after it: {before:?}");

    ledger.record(&calls, &tasks).await.unwrap();
    flush_stats(ledger.pool()).await;
    let flushed = std::time::Duration::from_secs(15);
    let calls_home = format!("provider_calls{}", at.format("_%Y_%m"));
    // The tasks' trigger found their calls by index in their month's partition.
    env.eventually("the batch's statistics flushed", flushed, || async {
        let now = index_scans().await;
        let scans = |all: &[(String, i64)]| {
            all.iter()
                .find(|(name, _)| *name == calls_home)
                .map_or(0, |(_, n)| *n)
        };
        scans(&now) > scans(&before)
    })
    .await
    .unwrap();
    let after = index_scans().await;
    let elsewhere: Vec<_> = before
        .iter()
        .zip(&after)
        .filter(|((name, was), (_, now))| !home(name) && now != was)
        .collect();
    assert!(
        elsewhere.is_empty(),
        "partitions outside the tasks' lives read by the batch's write: {elsewhere:?}"
    );
    // And in their month, four lookups per task (the call's upsert and the task's insert
    // check their keys, the delete of earlier finishes and the copy to its calls look it up),
    // not every task's lookups once per task (a nested loop over the bounded lookups).
    let looked = |all: &[(String, i64)]| {
        all.iter()
            .filter(|(name, _)| home(name))
            .map(|(_, n)| *n)
            .sum::<i64>()
    };
    let lookups = looked(&after) - looked(&before);
    assert!(
        lookups <= 4 * ids.len() as i64,
        "{lookups} index lookups in the tasks' month for {} tasks",
        ids.len()
    );
    assert_eq!(calls_out_of_step(ledger.pool()).await.unwrap(), 0);
}

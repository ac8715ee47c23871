//! The scheduler against the real Redis and Postgres, with an injected clock: quota windows
//! close at midnight UTC, one instance acts while a standby waits and takes over, a paused old
//! holder is fenced off, dead letters are archived before they are trimmed and can be replayed
//! from the archive, and recurring tasks run once per tick across a takeover.
//!
//! Each test runs its schedulers in a namespace of its own, so the tests run in parallel.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use llmq_scheduler::{Clock, Duty, Error, Scheduler, Settings};
use llmq_shared::archive::{self, RECURRING_FIELD};
use llmq_shared::config::{Config, Quotas, Recurring};
use llmq_shared::envelope::Envelope;
use llmq_shared::keys::{QueueKeys, SchedulerKeys};
use llmq_shared::outcome::Status;
use llmq_shared::queue::Client;
use llmq_shared::quota::{Decision, Limiter};
use llmq_tests::harness::{TestEnv, binary, database_url, ensure_database, mock_config, redis_url};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Each test's schedulers use the test's queue name as their namespace: their lease, fence
/// and records are their own, so the suites run in parallel.
fn sched_keys(env: &TestEnv) -> SchedulerKeys {
    SchedulerKeys::new(Some(&env.queue))
}

/// A clock the test moves by hand.
#[derive(Clone)]
struct TestClock(Arc<Mutex<DateTime<Utc>>>);

impl TestClock {
    fn at(t: DateTime<Utc>) -> Self {
        Self(Arc::new(Mutex::new(t)))
    }

    fn set(&self, t: DateTime<Utc>) {
        *self.0.lock().unwrap() = t;
    }

    fn clock(&self) -> Clock {
        let t = self.0.clone();
        Arc::new(move || *t.lock().unwrap())
    }
}

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A lease that runs out quickly, for takeovers.
const SHORT_LEASE: Duration = Duration::from_secs(1);
/// A lease no test outlives, so a test's waits do not cost it the lease.
const LONG_LEASE: Duration = Duration::from_secs(30);

/// Scheduler settings for tests: a 50 ms tick, and only `queue`'s dead letters.
fn settings(id: &str, lease: Duration, config: Config, clock: Clock, queue: &str) -> Settings {
    let mut s = Settings::new(&redis_url(), &database_url(), config).unwrap();
    s.config.scheduler.lease = lease;
    s.id = Some(id.to_owned());
    s.tick = Duration::from_millis(50);
    s.queues = vec![queue.to_owned()];
    s.namespace = Some(queue.to_owned());
    s.clock = clock;
    s
}

/// A provider file with one provider, `name`, limited by `quotas` (YAML flow map).
fn quota_config(name: &str, quotas: &str) -> Config {
    let text = format!(
        "providers:
  - name: {name}
    kind: openai_compatible
    base_url: http://127.0.0.1:9/v1
    quotas: {quotas}
    models:
      - {{id: m, input_usd_per_mtok: 1, output_usd_per_mtok: 1}}
"
    );
    Config::parse("quota.yaml", &text, &|_| None).unwrap()
}

async fn pool() -> sqlx::PgPool {
    ensure_database().await.unwrap();
    sqlx::PgPool::connect(&database_url()).await.unwrap()
}

fn granted(d: &Decision) -> bool {
    matches!(d, Decision::Granted { .. })
}

async fn used(limiter: &Limiter, p: &str, quotas: &Quotas, quota: &str, t: DateTime<Utc>) -> f64 {
    limiter
        .usage(p, quotas, t)
        .await
        .unwrap()
        .into_iter()
        .find(|l| l.quota == quota)
        .unwrap()
        .used
}

#[tokio::test]
async fn a_day_closes_at_midnight_utc_into_the_history_and_the_new_day_starts_empty() {
    let pool = pool().await;
    let p = unique("daily");
    let config = quota_config(&p, "{requests_per_day: 3}");
    let quotas = config.provider(&p).unwrap().quotas;
    let limiter = Limiter::new(Client::new(&redis_url()).unwrap());

    let evening = utc(2031, 3, 14, 23, 59, 0);
    for _ in 0..3 {
        assert!(granted(
            &limiter
                .reserve(&p, &quotas, 0, 10, 0.0, evening)
                .await
                .unwrap()
        ));
    }
    assert!(
        !granted(
            &limiter
                .reserve(&p, &quotas, 0, 10, 0.0, evening)
                .await
                .unwrap()
        ),
        "the day's three requests are used up"
    );

    let after_midnight = utc(2031, 3, 15, 0, 0, 1);
    let clock = TestClock::at(after_midnight);
    let mut s = Scheduler::connect(settings(
        "daily-a",
        LONG_LEASE,
        config.clone(),
        clock.clock(),
        &p,
    ))
    .await
    .unwrap();
    assert!(s.acquire().await.unwrap());
    let detail = s.run_duty(Duty::QuotaWindows).await.unwrap();
    assert!(detail.contains("2031-03-14"), "{detail}");

    let history = archive::quota_history(&pool, Some(&p)).await.unwrap();
    assert_eq!(history.len(), 1, "one day closed, no month: {history:?}");
    let day = &history[0];
    assert_eq!(
        (
            day.window_kind.as_str(),
            day.window_start,
            day.requests,
            day.usd
        ),
        (
            "day",
            NaiveDate::from_ymd_opt(2031, 3, 14).unwrap(),
            Some(3),
            None
        )
    );
    assert_eq!(day.closed_at, after_midnight);

    // The new day's window starts empty.
    assert_eq!(
        used(&limiter, &p, &quotas, "requests_per_day", after_midnight).await,
        0.0
    );
    assert!(granted(
        &limiter
            .reserve(&p, &quotas, 0, 10, 0.0, after_midnight)
            .await
            .unwrap()
    ));

    // A new holder records the same window again: same values, one row.
    s.release().await.unwrap();
    clock.set(utc(2031, 3, 15, 9, 0, 0));
    let mut other = Scheduler::connect(settings("daily-b", LONG_LEASE, config, clock.clock(), &p))
        .await
        .unwrap();
    assert!(other.acquire().await.unwrap());
    other.run_duty(Duty::QuotaWindows).await.unwrap();
    let again = archive::quota_history(&pool, Some(&p)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        again[0].requests,
        Some(3),
        "the 00:00:01 request is the 15th's"
    );

    // The CLI shows the same history, and llmq status the active scheduler and its duty.
    let env = TestEnv::new().await.unwrap();
    let (code, out) = env
        .cli(&[
            "quota",
            "--history",
            "--provider",
            &p,
            "--config",
            "examples/providers.mock.yaml",
            "--database-url",
            &llmq_tests::harness::database_url(),
            "--format",
            "json",
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["requests"], 3, "{out}");
    let (code, out) = env
        .cli(&[
            "status",
            "--queue",
            &env.queue,
            "--scheduler-namespace",
            &p,
            "--format",
            "json",
        ])
        .await;
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["scheduler"]["holder"], other.id(), "{out}");
    assert!(
        status["scheduler"]["duties"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "quota_windows"),
        "{out}"
    );
    other.release().await.unwrap();
}

#[tokio::test]
async fn a_month_closes_on_the_first_into_the_history_and_the_new_budget_is_whole() {
    let pool = pool().await;
    let p = unique("monthly");
    let config = quota_config(&p, "{usd_per_month: 0.01}");
    let quotas = config.provider(&p).unwrap().quotas;
    let limiter = Limiter::new(Client::new(&redis_url()).unwrap());

    let last_evening = utc(2031, 3, 31, 23, 59, 0);
    for _ in 0..2 {
        assert!(granted(
            &limiter
                .reserve(&p, &quotas, 0, 10, 0.004, last_evening)
                .await
                .unwrap()
        ));
    }
    assert!(
        !granted(
            &limiter
                .reserve(&p, &quotas, 0, 10, 0.004, last_evening)
                .await
                .unwrap()
        ),
        "a third 0.004 would overspend 0.01"
    );

    let first = utc(2031, 4, 1, 0, 0, 1);
    let clock = TestClock::at(first);
    let mut s = Scheduler::connect(settings("monthly", LONG_LEASE, config, clock.clock(), &p))
        .await
        .unwrap();
    assert!(s.acquire().await.unwrap());
    s.run_duty(Duty::QuotaWindows).await.unwrap();

    let history = archive::quota_history(&pool, Some(&p)).await.unwrap();
    let month = history
        .iter()
        .find(|w| w.window_kind == "month")
        .unwrap_or_else(|| panic!("no month row: {history:?}"));
    assert_eq!(
        month.window_start,
        NaiveDate::from_ymd_opt(2031, 3, 1).unwrap()
    );
    assert_eq!(month.requests, None);
    assert!((month.usd.unwrap() - 0.008).abs() < 1e-9, "{month:?}");
    let day = history.iter().find(|w| w.window_kind == "day").unwrap();
    assert_eq!(
        (day.window_start, day.requests),
        (NaiveDate::from_ymd_opt(2031, 3, 31).unwrap(), Some(2))
    );

    assert_eq!(
        used(&limiter, &p, &quotas, "usd_per_month", first).await,
        0.0
    );
    assert!(granted(
        &limiter
            .reserve(&p, &quotas, 0, 10, 0.004, first)
            .await
            .unwrap()
    ));
    s.release().await.unwrap();
}

/// Writes a dead letter as a worker's finish script does. Returns its task id.
async fn add_dead(redis: &Client, keys: &QueueKeys, failed_at: DateTime<Utc>) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let task = json!({"v": 1, "id": id, "prompt": "Summarise the logs", "type": "research"});
    let mut c = redis.conn().await.unwrap();
    redis::cmd("XADD")
        .arg(keys.dead())
        .arg("*")
        .arg("task")
        .arg(task.to_string())
        .arg("error")
        .arg("mock: HTTP 400 bad request")
        .arg("class")
        .arg("fatal")
        .arg("attempts")
        .arg("3")
        .arg("failed_at")
        .arg(failed_at.timestamp_millis())
        .arg("entry_id")
        .arg("1-0")
        .query_async::<String>(&mut c)
        .await
        .unwrap();
    id
}

async fn dead_in_redis(env: &TestEnv) -> Vec<String> {
    let mut ids: Vec<String> = env
        .redis
        .dead_letters(&env.keys, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.task_id.to_string())
        .collect();
    ids.sort();
    ids
}

async fn archived(env: &TestEnv) -> Vec<String> {
    let mut ids: Vec<String> = archive::list_archived(env.ledger.pool(), &env.queue, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.task_id)
        .collect();
    ids.sort();
    ids
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn dead_letters_are_archived_before_they_are_trimmed_and_replay_from_the_archive() {
    let env = TestEnv::new().await.unwrap();
    let now = Utc::now();
    let clock = TestClock::at(now);
    let old_a = add_dead(&env.redis, &env.keys, now - chrono::Duration::days(9)).await;
    let old_b = add_dead(&env.redis, &env.keys, now - chrono::Duration::days(8)).await;
    let young = add_dead(&env.redis, &env.keys, now - chrono::Duration::hours(1)).await;

    let mut config = mock_config(&env.mock.url());
    config.scheduler.dead_letters.keep_in_redis = Duration::from_secs(7 * 24 * 3600);
    let mut s = Scheduler::connect(settings(
        "archiver",
        LONG_LEASE,
        config.clone(),
        clock.clock(),
        &env.queue,
    ))
    .await
    .unwrap();
    assert!(s.acquire().await.unwrap());

    // The scheduler dies between the two steps: the letters are in both places.
    let step = s.archive_step(&env.keys, 500).await.unwrap();
    assert_eq!(
        sorted(step.iter().map(|d| d.task_id.to_string()).collect()),
        sorted(vec![old_a.clone(), old_b.clone()])
    );
    assert_eq!(
        archived(&env).await,
        sorted(vec![old_a.clone(), old_b.clone()])
    );
    assert_eq!(
        dead_in_redis(&env).await.len(),
        3,
        "nothing is trimmed before the trim step"
    );

    // The next full run archives again (a no-op) and trims them, exactly once archived.
    let detail = s.run_duty(Duty::DeadLetters).await.unwrap();
    assert!(detail.contains("trimmed 2"), "{detail}");
    assert_eq!(
        dead_in_redis(&env).await,
        vec![young.clone()],
        "the young letter stays"
    );
    assert_eq!(
        archived(&env).await,
        sorted(vec![old_a.clone(), old_b.clone()])
    );
    let rows = archive::list_archived(env.ledger.pool(), &env.queue, 10)
        .await
        .unwrap();
    assert_eq!(rows[0].task_id, old_b, "newest first");
    assert_eq!((rows[0].class.as_str(), rows[0].attempts), ("fatal", 3));
    assert!(rows[0].error.contains("HTTP 400"));
    s.release().await.unwrap();

    // Past max_in_redis, the oldest go regardless of age.
    let young_2 = add_dead(&env.redis, &env.keys, now - chrono::Duration::minutes(30)).await;
    let young_3 = add_dead(&env.redis, &env.keys, now - chrono::Duration::minutes(10)).await;
    config.scheduler.dead_letters.max_in_redis = 2;
    let mut s = Scheduler::connect(settings(
        "archiver-2",
        LONG_LEASE,
        config.clone(),
        clock.clock(),
        &env.queue,
    ))
    .await
    .unwrap();
    assert!(s.acquire().await.unwrap());
    s.run_duty(Duty::DeadLetters).await.unwrap();
    assert_eq!(
        dead_in_redis(&env).await,
        sorted(vec![young_2.clone(), young_3.clone()])
    );
    assert_eq!(
        archived(&env).await,
        sorted(vec![old_a.clone(), old_b.clone(), young.clone()])
    );

    // Replay from the archive: the task runs again, and leaves the archive once enqueued.
    let taken = archive::take_archived(env.ledger.pool(), &env.queue, std::slice::from_ref(&old_a))
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].task_id.to_string(), old_a);
    let db = llmq_tests::harness::database_url();
    let (code, listing) = env
        .cli(&[
            "dlq",
            "list",
            "--archived",
            "--queue",
            &env.queue,
            "--database-url",
            &db,
            "--format",
            "json",
        ])
        .await;
    assert_eq!(code, 0);
    assert!(
        listing.contains(&old_a),
        "llmq dlq list --archived shows it: {listing}"
    );
    let worker = env.worker();
    // llmq dlq replay looks in the archive for ids that are no longer in Redis.
    let (code, out) = env
        .cli(&[
            "dlq",
            "replay",
            &old_a,
            "--queue",
            &env.queue,
            "--database-url",
            &db,
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("replayed 1 dead letter(s)"), "{out}");
    let record = env
        .wait_final(&old_a, Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(record.status, Status::Succeeded, "{record:?}");
    worker.stop().await.unwrap();
    let calls = env.calls().await.unwrap();
    assert!(
        calls.iter().any(|c| c.0.to_string() == old_a && c.1 == 1),
        "the replay is billed as run 1: {calls:?}"
    );
    assert_eq!(archived(&env).await, sorted(vec![old_b, young]));

    // Archived letters older than keep_archived (90 days) are deleted; the two young ones,
    // old by now, are archived today.
    clock.set(now + chrono::Duration::days(91));
    s.run_duty(Duty::DeadLetters).await.unwrap();
    assert!(dead_in_redis(&env).await.is_empty());
    assert_eq!(archived(&env).await, sorted(vec![young_2, young_3]));
    s.release().await.unwrap();
}

#[tokio::test]
async fn a_paused_holder_that_lost_its_lease_cannot_write_anything() {
    let env = TestEnv::new().await.unwrap();
    let pool = env.ledger.pool().clone();
    let now = utc(2031, 6, 10, 12, 0, 0);
    let clock = TestClock::at(now);

    // Work is waiting for each duty: a closed day, old dead letters, due recurring ticks.
    let p = unique("paused");
    let mut config = quota_config(&p, "{requests_per_day: 100}");
    let quotas = config.provider(&p).unwrap().quotas;
    let limiter = Limiter::new(env.redis.clone());
    limiter
        .reserve(&p, &quotas, 0, 10, 0.0, now - chrono::Duration::days(1))
        .await
        .unwrap();
    for _ in 0..2 {
        add_dead(&env.redis, &env.keys, now - chrono::Duration::days(30)).await;
    }
    let name = unique("paused-tick");
    config.scheduler.recurring.push(Recurring {
        name: name.clone(),
        cron: "* * * * * *".into(),
        schedule: llmq_shared::config::parse_cron("* * * * * *").unwrap(),
        queue: env.queue.clone(),
        task: json!({"prompt": "tick"}).as_object().cloned().unwrap(),
    });
    let field = format!("{RECURRING_FIELD}{name}");
    let mut c = env.redis.conn().await.unwrap();
    redis::cmd("HSET")
        .arg(sched_keys(&env).duties())
        .arg(&field)
        .arg((now - chrono::Duration::seconds(5)).timestamp_millis())
        .query_async::<()>(&mut c)
        .await
        .unwrap();

    let mut old = Scheduler::connect(settings(
        "old",
        SHORT_LEASE,
        config.clone(),
        clock.clock(),
        &env.queue,
    ))
    .await
    .unwrap();
    assert!(old.acquire().await.unwrap());
    let old_fence = old.fence().unwrap();
    // Paused past its lease; another instance takes over.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut new = Scheduler::connect(settings(
        "new",
        LONG_LEASE,
        config,
        clock.clock(),
        &env.queue,
    ))
    .await
    .unwrap();
    assert!(new.acquire().await.unwrap());
    assert!(new.fence().unwrap() > old_fence);
    assert_eq!(old.fence(), Some(old_fence), "the old one has not noticed");

    // Every write of the old holder is refused, and nothing is written.
    for duty in Duty::ALL {
        let r = old.run_duty(duty).await;
        assert!(matches!(r, Err(Error::NotLeader)), "{duty:?}: {r:?}");
    }
    assert!(
        archive::quota_history(&pool, Some(&p))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(archived(&env).await.is_empty());
    assert_eq!(dead_in_redis(&env).await.len(), 2);
    let ready: u64 = redis::cmd("XLEN")
        .arg(env.keys.stream())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(ready, 0, "no recurring tick was enqueued");
    let status = archive::scheduler_status(&env.redis, &sched_keys(&env))
        .await
        .unwrap();
    assert_eq!(status.holder.as_deref(), Some("new"));
    assert!(
        status.duties.iter().all(|d| d.holder != "old"),
        "{status:?}"
    );

    // Not even the Redis half of a step whose Postgres half the new holder did.
    let letters = new.archive_step(&env.keys, 500).await.unwrap();
    assert_eq!(letters.len(), 2);
    let r = old.trim_step(&env.keys, &letters).await;
    assert!(matches!(r, Err(Error::NotLeader)), "{r:?}");
    assert_eq!(dead_in_redis(&env).await.len(), 2);

    // The holder does it all.
    assert_eq!(new.trim_step(&env.keys, &letters).await.unwrap(), 2);
    new.run_duty(Duty::QuotaWindows).await.unwrap();
    assert_eq!(
        archive::quota_history(&pool, Some(&p)).await.unwrap()[0].requests,
        Some(1)
    );
    new.run_duty(Duty::Recurring).await.unwrap();
    let ready: u64 = redis::cmd("XLEN")
        .arg(env.keys.stream())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(ready, 5, "the five ticks since the last recorded one");
    new.release().await.unwrap();
    redis::cmd("HDEL")
        .arg(sched_keys(&env).duties())
        .arg(&field)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
}

/// The recurring ticks in the stream: tick time (ms) -> how many entries.
async fn ticks_in_stream(env: &TestEnv, name: &str) -> BTreeMap<i64, usize> {
    let mut ticks = BTreeMap::new();
    for v in env.stream_tasks("-", "+").await.unwrap() {
        assert_eq!(v["metadata"]["recurring"], name);
        assert_eq!(v["v"], 1);
        let tick = DateTime::parse_from_rfc3339(v["metadata"]["recurring_tick"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        *ticks.entry(tick).or_insert(0) += 1;
    }
    ticks
}

async fn lease_holder(env: &TestEnv) -> Option<String> {
    let mut c = env.redis.conn().await.unwrap();
    redis::cmd("GET")
        .arg(sched_keys(env).lease())
        .query_async(&mut c)
        .await
        .unwrap()
}

#[tokio::test]
async fn one_instance_acts_a_standby_takes_over_and_every_tick_is_enqueued_once() {
    let env = TestEnv::new().await.unwrap();
    let name = unique("every-second");
    let mut config = mock_config(&env.mock.url());
    config.scheduler.recurring.push(Recurring {
        name: name.clone(),
        cron: "* * * * * *".into(),
        schedule: llmq_shared::config::parse_cron("* * * * * *").unwrap(),
        queue: env.queue.clone(),
        task: json!({"prompt": "tick", "metadata": {"team": "ops"}})
            .as_object()
            .cloned()
            .unwrap(),
    });
    let clock: Clock = Arc::new(Utc::now);
    let start = |id: &str| {
        let token = CancellationToken::new();
        let s = settings(id, SHORT_LEASE, config.clone(), clock.clone(), &env.queue);
        (token.clone(), tokio::spawn(llmq_scheduler::run(s, token)))
    };
    let (token_a, a) = start("sched-a");
    let (token_b, b) = start("sched-b");

    env.eventually("a holder", Duration::from_secs(5), || async {
        lease_holder(&env).await.is_some()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let holder = lease_holder(&env).await.unwrap();
    let (leader, standby, leader_task, standby_task, standby_token) = match holder.as_str() {
        "sched-a" => ("sched-a", "sched-b", a, b, token_b),
        "sched-b" => ("sched-b", "sched-a", b, a, token_a),
        other => panic!("unknown holder {other}"),
    };
    let status = archive::scheduler_status(&env.redis, &sched_keys(&env))
        .await
        .unwrap();
    assert_eq!(status.holder.as_deref(), Some(leader));
    assert!(
        status.lease_ttl_ms.is_some_and(|t| t > 0 && t <= 1000),
        "{status:?}"
    );
    for duty in ["quota_windows", "dead_letters", "recurring"] {
        let d = status
            .duties
            .iter()
            .find(|d| d.name == duty)
            .unwrap_or_else(|| panic!("{duty} never ran: {status:?}"));
        assert!(d.ok && !d.overdue && d.holder == leader, "{d:?}");
    }
    // Past three times the longest period (ledger_partitions, hourly): every duty is overdue.
    let later = archive::scheduler_status_at(
        &env.redis,
        &sched_keys(&env),
        Utc::now() + chrono::Duration::hours(4),
    )
    .await
    .unwrap();
    assert!(later.duties.iter().all(|d| d.overdue), "{later:?}");
    assert!(
        later
            .recurring
            .iter()
            .any(|r| r.name == name && r.last_tick.is_some())
    );

    // The leader crashes: no release, its lease runs out.
    leader_task.abort();
    let killed = Instant::now();
    let killed_at = Utc::now().timestamp_millis();
    env.eventually("the standby's takeover", Duration::from_secs(5), || async {
        lease_holder(&env).await.as_deref() == Some(standby)
    })
    .await
    .unwrap();
    let took = killed.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "took over after {took:?}"
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    standby_token.cancel();
    standby_task.await.unwrap().unwrap();
    assert_eq!(lease_holder(&env).await, None, "released on shutdown");

    let ticks = ticks_in_stream(&env, &name).await;
    let doubled: Vec<_> = ticks.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "enqueued twice: {doubled:?}");
    let times: Vec<i64> = ticks.keys().copied().collect();
    let gaps: Vec<_> = times.windows(2).filter(|w| w[1] - w[0] != 1000).collect();
    assert!(gaps.is_empty(), "missed ticks between {gaps:?}");
    let (first, last) = (times[0], times[times.len() - 1]);
    assert!(
        first < killed_at - 1000 && last > killed_at + 1000,
        "{times:?} around {killed_at}"
    );

    // Who enqueued which tick: the leader up to its death, the standby after; never both.
    let mut c = env.redis.conn().await.unwrap();
    let mut by = Vec::new();
    for t in &times {
        let who: Option<String> = redis::cmd("GET")
            .arg(env.keys.tick(&name, *t))
            .query_async(&mut c)
            .await
            .unwrap();
        by.push(who.unwrap());
    }
    let switch = by.iter().position(|w| w == standby).unwrap();
    assert!(switch > 0, "the leader enqueued first: {by:?}");
    assert!(
        by[..switch].iter().all(|w| w == leader) && by[switch..].iter().all(|w| w == standby),
        "{by:?}"
    );
    let unique_holders: HashSet<_> = by.iter().collect();
    assert_eq!(unique_holders.len(), 2);
    redis::cmd("HDEL")
        .arg(sched_keys(&env).duties())
        .arg(format!("{RECURRING_FIELD}{name}"))
        .query_async::<()>(&mut c)
        .await
        .unwrap();
}

/// A scheduler process, killed if the test ends early.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_binary_takes_the_lease_runs_its_duties_and_releases_the_lease_on_sigterm() {
    let env = TestEnv::new().await.unwrap();
    let config = std::env::temp_dir().join(format!("llmq-scheduler-{}.yaml", env.queue));
    std::fs::write(
        &config,
        include_str!("../../../examples/providers.mock.yaml"),
    )
    .unwrap();
    let id = unique("process");
    let port = llmq_tests::harness::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut process = Process(
        std::process::Command::new(binary("llmq-scheduler"))
            .env("REDIS_URL", redis_url())
            .env("DATABASE_URL", database_url())
            .env("LLMQ_CONFIG", &config)
            .env("LLMQ_SCHEDULER_NAMESPACE", &env.queue)
            .env("RUST_LOG", "warn")
            .args([
                "--id",
                &id,
                "--tick",
                "50ms",
                "--queue",
                &env.queue,
                "--metrics-listen",
                &listen,
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    env.eventually(
        "every duty run by the process",
        Duration::from_secs(10),
        || async {
            let status = archive::scheduler_status(&env.redis, &sched_keys(&env))
                .await
                .unwrap();
            status.holder.as_deref() == Some(id.as_str())
                && status.duties.len() >= 3
                && status.duties.iter().all(|d| d.holder == id && d.ok)
        },
    )
    .await
    .unwrap();
    // It serves health and metrics too.
    let http = reqwest::Client::new();
    let ready = http
        .get(format!("http://{listen}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = http
        .get(format!("http://{listen}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("llmq_scheduler_duty_runs_total"),
        "{metrics}"
    );

    let term = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(process.0.id().to_string())
        .status()
        .unwrap();
    assert!(term.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(status) = process.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still running after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
    assert_eq!(lease_holder(&env).await, None, "released on SIGTERM");
    let _ = std::fs::remove_file(config);
}

/// A scheduler `id` of the test's namespace, its clock stopped at now, with no provider file.
async fn instance(env: &TestEnv, id: &str) -> Scheduler {
    let clock = TestClock::at(Utc::now());
    Scheduler::connect(settings(
        id,
        LONG_LEASE,
        Config::default(),
        clock.clock(),
        &env.queue,
    ))
    .await
    .unwrap()
}

/// `queue`'s value of gauge `name` in the process's Prometheus output.
fn gauge(name: &str, queue: &str) -> Option<f64> {
    let text = llmq_shared::health::recorder().unwrap().render();
    let prefix = format!("{name}{{queue=\"{queue}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

/// What KEDA's stream-length trigger reads (`XLEN`) is tasks waiting plus running, never the
/// delayed or the dead ones; the lease holder's `llmq_queue_backlog` says the same, and a
/// scheduler that lost the lease shows 0 so a sum over pods stays right.
#[tokio::test]
async fn the_stream_length_is_waiting_plus_running_and_the_lease_holder_publishes_it() {
    let env = TestEnv::new().await.unwrap();
    llmq_shared::health::recorder().unwrap();
    let mut s = env.settings();
    s.concurrency = 1;
    let worker = llmq_tests::harness::WorkerHandle::start(s);

    // A dead letter, then one running task with three waiting behind it, and one delayed.
    let mut dead = Envelope::new("dies");
    dead.model = Some("fail-400".into());
    env.redis.enqueue_many(&env.keys, &[dead]).await.unwrap();
    env.eventually("the dead letter", Duration::from_secs(10), || async {
        env.redis.counts(&env.keys).await.unwrap().dead == 1
    })
    .await
    .unwrap();
    let mut slow = Envelope::new("runs");
    slow.model = Some("slow-5000".into());
    let mut later = Envelope::new("later");
    later.run_at = Some(Utc::now() + chrono::Duration::hours(1));
    let mut batch = vec![slow];
    batch.extend((0..3).map(|i| Envelope::new(format!("waits {i}"))));
    batch.push(later);
    env.redis.enqueue_many(&env.keys, &batch).await.unwrap();
    env.eventually("the slow task running", Duration::from_secs(10), || async {
        env.redis.counts(&env.keys).await.unwrap().in_flight == 1
    })
    .await
    .unwrap();

    let c = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!((c.ready, c.in_flight, c.delayed, c.dead), (3, 1, 1, 1));
    assert_eq!(env.stream_len().await, c.ready + c.in_flight);

    let mut holder = instance(&env, "gauges").await;
    assert!(holder.acquire().await.unwrap());
    holder.run_duty(Duty::Gauges).await.unwrap();
    assert_eq!(gauge("llmq_queue_backlog", &env.queue), Some(4.0));
    assert_eq!(gauge("llmq_queue_delayed", &env.queue), Some(1.0));
    assert_eq!(gauge("llmq_queue_dead", &env.queue), Some(1.0));

    env.eventually("the stream drained", Duration::from_secs(20), || async {
        let c = env.redis.counts(&env.keys).await.unwrap();
        c.ready + c.in_flight == 0
    })
    .await
    .unwrap();
    assert_eq!(
        env.stream_len().await,
        0,
        "delayed and dead tasks are not in the stream"
    );
    holder.run_duty(Duty::Gauges).await.unwrap();
    assert_eq!(gauge("llmq_queue_backlog", &env.queue), Some(0.0));
    assert_eq!(gauge("llmq_queue_dead", &env.queue), Some(1.0));

    // Losing the lease to another instance zeroes what this one published.
    holder.release().await.unwrap();
    let mut other = instance(&env, "gauges-b").await;
    assert!(other.acquire().await.unwrap());
    assert!(!holder.tick(&CancellationToken::new()).await);
    assert_eq!(gauge("llmq_queue_dead", &env.queue), Some(0.0));
    worker.stop().await.unwrap();
}

/// With no worker running (a pool scaled to zero), the lease holder moves a due delayed task
/// back to its stream, where the autoscaler sees it.
#[tokio::test]
async fn the_lease_holder_moves_due_delayed_tasks_to_the_stream_with_no_worker_running() {
    let env = TestEnv::new().await.unwrap();
    let mut task = Envelope::new("due soon");
    task.run_at = Some(Utc::now() + chrono::Duration::milliseconds(300));
    env.redis.enqueue_many(&env.keys, &[task]).await.unwrap();
    assert_eq!(env.stream_len().await, 0);
    assert_eq!(env.redis.counts(&env.keys).await.unwrap().delayed, 1);

    let mut s = instance(&env, "promote").await;
    assert!(s.acquire().await.unwrap());
    s.run_duty(Duty::Promote).await.unwrap();
    assert_eq!(env.stream_len().await, 0, "not due yet");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let did = s.run_duty(Duty::Promote).await.unwrap();
    assert_eq!(env.stream_len().await, 1, "{did}");
    assert_eq!(env.redis.counts(&env.keys).await.unwrap().delayed, 0);
}

#[tokio::test]
async fn a_holder_that_lost_its_lease_decides_no_approval() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let id = format!("{}-gate", env.queue);
    env.xadd(
        "chain",
        json!({"v": 1, "chain_id": id, "steps": [
            {"name": "gate", "kind": "approval", "timeout": 1, "on_timeout": "approve"}]})
        .to_string()
        .as_bytes(),
    )
    .await
    .unwrap();
    env.eventually(
        "the gate awaiting approval",
        Duration::from_secs(30),
        || async {
            env.redis
                .chain(&env.keys, &id)
                .await
                .unwrap()
                .is_some_and(|c| c.steps["gate"].status == "awaiting_approval")
        },
    )
    .await
    .unwrap();
    w.stop().await.unwrap();
    // Long past its deadline, by the schedulers' clock.
    let clock = TestClock::at(Utc::now() + chrono::Duration::days(1));
    let config = mock_config("http://127.0.0.1:9");
    let mut old = Scheduler::connect(settings(
        "old",
        SHORT_LEASE,
        config.clone(),
        clock.clock(),
        &env.queue,
    ))
    .await
    .unwrap();
    assert!(old.acquire().await.unwrap());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut new = Scheduler::connect(settings(
        "new",
        LONG_LEASE,
        config,
        clock.clock(),
        &env.queue,
    ))
    .await
    .unwrap();
    assert!(new.acquire().await.unwrap());

    let r = old.expire_approvals().await;
    assert!(matches!(r, Err(Error::NotLeader)), "{r:?}");
    let c = env.redis.chain(&env.keys, &id).await.unwrap().unwrap();
    assert_eq!(c.steps["gate"].status, "awaiting_approval");
    assert_eq!(env.redis.approvals(&env.keys, None).await.unwrap().len(), 1);

    let done = new.expire_approvals().await.unwrap();
    assert!(done.contains("applied on_timeout to 1 approval"), "{done}");
    let c = env.redis.chain(&env.keys, &id).await.unwrap().unwrap();
    assert_eq!(
        (c.state.as_str(), c.steps["gate"].status.as_str()),
        ("succeeded", "succeeded")
    );
    new.release().await.unwrap();
}

#[tokio::test]
async fn expired_chains_leave_the_chains_index_and_live_ones_stay() {
    let env = TestEnv::new().await.unwrap();
    let mut c = env.redis.conn().await.unwrap();
    // 2,500 chains in the index (more than a page), every seventh still with its keys.
    let ids: Vec<String> = (0..2500).map(|i| format!("c{i:04}")).collect();
    let mut add = redis::pipe();
    for (i, id) in ids.iter().enumerate() {
        add.zadd(env.keys.chains(), id, i).ignore();
        if i % 7 == 0 {
            add.hset(env.keys.chain(id), "state", "running").ignore();
        }
    }
    add.query_async::<()>(&mut c).await.unwrap();
    let mut s = instance(&env, "chains").await;
    assert!(s.acquire().await.unwrap());

    let did = s.run_duty(Duty::Chains).await.unwrap();
    let live: Vec<String> = ids.iter().step_by(7).cloned().collect();
    assert!(
        did.contains(&format!(
            "dropped {} expired chain(s)",
            ids.len() - live.len()
        )),
        "{did}"
    );
    let left: Vec<String> = redis::cmd("ZRANGE")
        .arg(env.keys.chains())
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(left, live);
    // Nothing more to drop until a chain expires.
    assert!(
        s.run_duty(Duty::Chains)
            .await
            .unwrap()
            .contains("dropped 0")
    );
    let _: () = redis::cmd("DEL")
        .arg(env.keys.chain(&live[3]))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        s.run_duty(Duty::Chains)
            .await
            .unwrap()
            .contains("dropped 1")
    );
    s.release().await.unwrap();
}

#[tokio::test]
async fn a_scheduler_waits_while_one_of_an_older_version_holds_the_untagged_lease() {
    let env = TestEnv::new().await.unwrap();
    let keys = sched_keys(&env);
    let mut c = env.redis.conn().await.unwrap();
    // An older scheduler's lease, under the key before the `{scheduler}` hash tag.
    let _: () = redis::cmd("SET")
        .arg(keys.untagged_lease())
        .arg("old-version")
        .arg("PX")
        .arg(30_000)
        .query_async(&mut c)
        .await
        .unwrap();
    let clock = TestClock::at(Utc::now());
    let mut s = Scheduler::connect(settings(
        &unique("new-version"),
        LONG_LEASE,
        Config::default(),
        clock.clock(),
        &env.queue,
    ))
    .await
    .unwrap();
    assert!(!s.acquire().await.unwrap(), "it stands by");
    // The older one stops (its lease expires or is released): the new one takes over.
    let _: () = redis::cmd("DEL")
        .arg(keys.untagged_lease())
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(s.acquire().await.unwrap());
    s.release().await.unwrap();
}

//! Tenant budgets and limits (issue 72), fleet-wide: racing reservers never take a tenant
//! past its budget; a worker holds a tenant at its budget in the room while other tenants
//! go on, fails its tasks where it says `on_budget: fail`, and steps down to a cheaper model
//! where it says `downgrade`; `llmq quota` shows where each tenant stands.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chrono::Utc;
use llmq_shared::config::{OnBudget, TenantLimits};
use llmq_shared::envelope::Envelope;
use llmq_shared::outcome::Status;
use llmq_shared::queue::Client;
use llmq_shared::quota::{Limiter, TenantDecision};
use llmq_tests::harness::{SeededRng, TestEnv, redis_url};

const WAIT: Duration = Duration::from_secs(60);

/// A tenant's name no other test uses.
fn tenant() -> String {
    format!(
        "tenant-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// Workers racing for one tenant's budget, each with three tasks asking at once (asked
/// together, in one script), for every seeded mix of estimates, costs, waits and worker
/// counts: what the tenant spends (each call settled at its cost, which may pass
/// its estimate by a fifth) never passes its budget by more than one call's estimate, a
/// call never sent gives its reservation back whole, and the spend counted is the sum of
/// the calls' costs exactly.
#[tokio::test]
async fn racing_workers_never_take_a_tenant_past_its_budget() {
    let limiter = Limiter::new(Client::new(&redis_url()).unwrap());
    for seed in [0x7e4a_0001_u64, 0x7e4a_0002, 0x7e4a_0003, 0x7e4a_0004] {
        let name = tenant();
        let mut rng = SeededRng(seed);
        let budget = 0.001 + rng.below(1000) as f64 / 1e6;
        let limits = TenantLimits {
            budget_usd_day: Some(budget),
            budget_usd_month: Some(budget * 3.0),
            max_in_flight: Some(1 + rng.below(4) as u64),
            ..TenantLimits::default()
        };
        let workers = 2 + rng.below(5);
        let mut set = tokio::task::JoinSet::new();
        // A limiter per worker, as each worker has its own.
        let limiters: Vec<Limiter> = (0..workers)
            .map(|_| Limiter::new(Client::new(&redis_url()).unwrap()))
            .collect();
        for w in 0..workers * 3 {
            let limiter = limiters[w / 3].clone();
            let name = name.clone();
            let mut rng = SeededRng(seed * 31 + w as u64);
            set.spawn(async move {
                let (mut spent, mut biggest) = (0.0_f64, 0.0_f64);
                for _ in 0..40 {
                    let est = (20 + rng.below(200)) as f64 / 1e6;
                    biggest = biggest.max(est);
                    let d = limiter
                        .reserve_tenant(
                            &name,
                            &limits,
                            100,
                            est,
                            Duration::from_secs(30),
                            Utc::now(),
                        )
                        .await
                        .unwrap();
                    match d {
                        TenantDecision::Granted { grant, .. } => {
                            tokio::time::sleep(Duration::from_millis(rng.below(3) as u64)).await;
                            // A call never sent (one in five) costs nothing; one sent costs
                            // up to a fifth more than its estimate.
                            let cost = if rng.below(5) == 0 {
                                0.0
                            } else {
                                est * (50 + rng.below(71)) as f64 / 100.0
                            };
                            limiter.settle_tenant(&grant, cost);
                            spent += cost;
                        }
                        TenantDecision::Refused(r) => {
                            assert!(
                                ["budget_usd_day", "max_in_flight"].contains(&r.limit.as_str()),
                                "seed {seed:#x}: {r:?}"
                            );
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                (spent, biggest)
            });
        }
        let results = set.join_all().await;
        for l in &limiters {
            l.send_settles().await.unwrap();
        }
        let spent: f64 = results.iter().map(|r| r.0).sum();
        let biggest = results.iter().map(|r| r.1).fold(0.0, f64::max);
        assert!(
            spent <= budget + biggest,
            "seed {seed:#x}: {workers} workers spent {spent} of a budget of {budget}"
        );
        let usage = limiter
            .tenant_usage(&name, &limits, Utc::now())
            .await
            .unwrap();
        let day = usage.iter().find(|l| l.quota == "budget_usd_day").unwrap();
        // Micro-dollars, each rounded up.
        assert!(
            (day.used - spent).abs() < 1e-6 * 200.0,
            "seed {seed:#x}: counted {} for calls that cost {spent}",
            day.used
        );
        let flight = usage.iter().find(|l| l.quota == "max_in_flight").unwrap();
        assert_eq!(flight.used, 0.0, "seed {seed:#x}: every call settled");
    }
}

/// The worker's settings with `limits` for `tenant`.
fn with_limits(env: &TestEnv, tenant: &str, limits: TenantLimits) -> llmq_worker::Settings {
    let mut s = env.settings();
    s.config.tenants.limits.insert(tenant.to_owned(), limits);
    s
}

/// A small task of `tenant` for `model`: its estimate is about its cost.
fn task(tenant: &str, model: &str, n: usize) -> Envelope {
    let mut e = Envelope::new(format!("Say {n}"));
    e.model = Some(model.into());
    e.max_tokens = Some(20);
    e.tenant = Some(tenant.into());
    e
}

#[tokio::test]
async fn a_tenant_at_its_budget_waits_in_the_room_while_others_go_on() {
    let env = TestEnv::new().await.unwrap();
    let (acme, globex) = (tenant(), tenant());
    // About four calls' worth.
    let budget = 0.00006;
    let worker = llmq_tests::harness::WorkerHandle::start(with_limits(
        &env,
        &acme,
        TenantLimits {
            budget_usd_day: Some(budget),
            ..TenantLimits::default()
        },
    ));
    let mut ids = Vec::new();
    for n in 0..12 {
        let a = task(&acme, "mock-fast", n);
        env.redis.enqueue(&env.keys, &a).await.unwrap();
        let g = task(&globex, "mock-fast", n);
        env.redis.enqueue(&env.keys, &g).await.unwrap();
        ids.push((a.id.unwrap(), g.id.unwrap()));
    }
    // The other tenant's tasks all run.
    for (_, g) in &ids {
        let r = env.wait_final(g, WAIT).await.unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
    // The tenant at its budget: some ran, the rest wait, none failed or dead.
    let done = || async {
        let mut n = 0;
        for (a, _) in &ids {
            let r = env.redis.task(&env.keys, *a).await.unwrap();
            n += usize::from(r.is_some_and(|r| r.status == Status::Succeeded));
        }
        n
    };
    env.eventually("the budget's calls", WAIT, || async { done().await > 0 })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ran = done().await;
    assert!(
        (1..12).contains(&ran),
        "{ran} of 12 ran on a budget of four calls"
    );
    let mut c = env.redis.conn().await.unwrap();
    let dead: u64 = redis::cmd("XLEN")
        .arg(env.keys.dead())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(dead, 0, "nothing is dead for waiting");
    let spent: f64 = sqlx::query_scalar(
        "SELECT coalesce(sum(cost_usd), 0)::float8 FROM provider_calls WHERE tenant = $1",
    )
    .bind(&acme)
    .fetch_one(env.ledger.pool())
    .await
    .unwrap();
    assert!(spent <= budget * 1.2, "spent {spent} of {budget}");
    // Held in the room until the day ends.
    let hold: Option<i64> = redis::cmd("HGET")
        .arg(format!("{}:hold", env.keys.room()))
        .arg(&acme)
        .query_async(&mut c)
        .await
        .unwrap();
    let midnight = llmq_shared::quota::next_day(Utc::now()).timestamp_millis();
    assert_eq!(hold, Some(midnight), "held until the budget resets");
    // Its tasks wait in the room, at its head, not read again and again meanwhile: the
    // room's list of them stays as it is.
    let list = format!("{}:0:{acme}", env.keys.room());
    let waiting: u64 = redis::cmd("LLEN")
        .arg(&list)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(waiting as usize, 12 - ran, "the rest wait in the room");
    let first: Vec<String> = redis::cmd("LRANGE")
        .arg(&list)
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let then: Vec<String> = redis::cmd("LRANGE")
        .arg(&list)
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(first, then, "the held tenant's tasks were read again");
    // Every tenant left in the room is held, yet another tenant's task that comes now runs
    // at once, not at the hold's end.
    let late = task(&globex, "mock-fast", 99);
    env.redis.enqueue(&env.keys, &late).await.unwrap();
    let r = env
        .wait_final(late.id.unwrap(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    worker.stop().await.unwrap();

    // `llmq quota` names the tenant and its budget, with what is used of it.
    let file = std::env::temp_dir().join(format!("{}-tenants.yaml", env.queue));
    std::fs::write(
        &file,
        format!(
            "{}\ntenants:\n  limits:\n    {acme}: {{budget_usd: {{day: {budget}}}}}\n",
            include_str!("../../../examples/providers.mock.yaml")
        ),
    )
    .unwrap();
    let (code, out) = env
        .cli(&[
            "quota",
            "--config",
            file.to_str().unwrap(),
            "--tenant",
            &globex,
        ])
        .await;
    assert_eq!(code, 0, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains(&format!("tenant {acme}")))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("budget_usd_day") && line.contains(&format!("${budget:.6}")),
        "{out}"
    );
    assert!(
        !out.contains(&globex),
        "a tenant without limits has no line: {out}"
    );
}

#[tokio::test]
async fn a_tenant_that_fails_at_its_budget_says_so_and_a_call_beyond_it_never_waits() {
    let env = TestEnv::new().await.unwrap();
    let who = tenant();
    let worker = llmq_tests::harness::WorkerHandle::start(with_limits(
        &env,
        &who,
        TenantLimits {
            budget_usd_day: Some(0.00003),
            on_budget: OnBudget::Fail,
            ..TenantLimits::default()
        },
    ));
    let tasks: Vec<Envelope> = (0..6).map(|n| task(&who, "mock-fast", n)).collect();
    for t in &tasks {
        env.redis.enqueue(&env.keys, t).await.unwrap();
    }
    let mut failed = Vec::new();
    for t in &tasks {
        let r = env.wait_final(t.id.unwrap(), WAIT).await.unwrap();
        if r.status != Status::Succeeded {
            failed.push(r.error.unwrap_or_default());
        }
    }
    assert!(!failed.is_empty() && failed.len() < 6, "{failed:?}");
    for why in &failed {
        assert!(
            why.contains(&format!("tenant {who:?}"))
                && why.contains("a day is spent until")
                && why.contains("UTC (on_budget: fail)"),
            "{why}"
        );
    }
    // A call that costs more than the whole budget fails at once, saying why.
    let mut big = task(&who, "mock-smart", 0);
    big.max_tokens = Some(4000);
    big.fallback = Some(false);
    env.redis.enqueue(&env.keys, &big).await.unwrap();
    let r = env.wait_final(big.id.unwrap(), WAIT).await.unwrap();
    let why = r.error.unwrap_or_default();
    assert!(
        why.contains("more than tenant") && why.contains("lower max_tokens"),
        "{why}"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_tenant_that_downgrades_at_its_budget_steps_down_to_a_cheaper_model() {
    let env = TestEnv::new().await.unwrap();
    let who = tenant();
    let worker = llmq_tests::harness::WorkerHandle::start(with_limits(
        &env,
        &who,
        TenantLimits {
            // Less than one call of mock-smart, many of mock-fast.
            budget_usd_day: Some(0.0002),
            on_budget: OnBudget::Downgrade,
            ..TenantLimits::default()
        },
    ));
    let t = task(&who, "mock-smart", 1);
    env.redis.enqueue(&env.keys, &t).await.unwrap();
    let r = env.wait_final(t.id.unwrap(), WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(r.model.as_deref(), Some("mock-fast"), "{r:?}");
    assert!(
        r.route
            .as_deref()
            .unwrap_or_default()
            .contains("→ a cheaper model"),
        "{r:?}"
    );
    worker.stop().await.unwrap();
}

/// A tenant's `rpm` paces its calls over the whole fleet: two workers, six tasks, 120 a
/// minute: no two calls of the tenant less than half a second apart (by the ledger's clock,
/// less a few milliseconds for the call to start), and every task answered.
#[tokio::test]
async fn a_tenant_s_rpm_spaces_its_calls_over_every_worker() {
    let env = TestEnv::new().await.unwrap();
    let who = tenant();
    let limits = TenantLimits {
        rpm: Some(120),
        ..TenantLimits::default()
    };
    let workers = [
        llmq_tests::harness::WorkerHandle::start(with_limits(&env, &who, limits)),
        llmq_tests::harness::WorkerHandle::start(with_limits(&env, &who, limits)),
    ];
    let tasks: Vec<Envelope> = (0..6).map(|n| task(&who, "mock-fast", n)).collect();
    for t in &tasks {
        env.redis.enqueue(&env.keys, t).await.unwrap();
    }
    for t in &tasks {
        let r = env.wait_final(t.id.unwrap(), WAIT).await.unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
    let at: Vec<chrono::DateTime<Utc>> = sqlx::query_scalar(
        "SELECT called_at FROM provider_calls WHERE tenant = $1 ORDER BY called_at",
    )
    .bind(&who)
    .fetch_all(env.ledger.pool())
    .await
    .unwrap();
    assert_eq!(at.len(), 6);
    for pair in at.windows(2) {
        let gap = (pair[1] - pair[0]).num_milliseconds();
        assert!(gap >= 450, "two calls {gap} ms apart: {at:?}");
    }
    for w in workers {
        w.stop().await.unwrap();
    }
}

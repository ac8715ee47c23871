//! `llmq cancel`: a cancelled task never runs, wherever it waits (the stream, the room, a
//! `run_at`); one in a call has its call dropped and ends `cancelled`, its call recorded;
//! a batch's and a tenant's work end so, the tenant's later work runs; a chain step's cancel
//! cancels what follows it; a cancel after the end changes nothing; `--dry-run` cancels
//! nothing.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq_shared::envelope::Envelope;
use llmq_shared::outcome::Status;
use llmq_tests::harness::{AsTaskId, TestEnv};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// A call that would take a minute.
const SLOW: &str = "[[mock:slow-60000]] cancel me";

fn task(model: &str) -> Envelope {
    let mut e = Envelope::new("cancel me");
    e.model = Some(model.into());
    e
}

fn slow() -> Envelope {
    let mut e = Envelope::new(SLOW);
    e.model = Some("mock-fast".into());
    e
}

async fn enqueue(env: &TestEnv, e: &Envelope) -> String {
    env.redis.enqueue(&env.keys, e).await.unwrap();
    e.id.unwrap().to_string()
}

#[tokio::test]
async fn a_cancelled_task_never_runs_and_one_in_a_call_has_it_dropped() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    // In a call that would take a minute when the cancel comes.
    let calling = enqueue(&env, &slow()).await;
    // Waiting for its run_at, as another that a dry run names.
    let run_at = Some(chrono::Utc::now() + chrono::Duration::seconds(8));
    let mut later = task("mock-fast");
    later.run_at = run_at;
    let later = enqueue(&env, &later).await;
    let mut spared = task("mock-fast");
    spared.run_at = run_at;
    let spared = enqueue(&env, &spared).await;
    let done = enqueue(&env, &task("mock-fast")).await;
    assert_eq!(
        env.wait_final(&done, WAIT).await.unwrap().status,
        Status::Succeeded
    );
    env.eventually("the slow call started", WAIT, || async {
        env.calls()
            .await
            .unwrap()
            .iter()
            .any(|c| c.0.to_string() == calling)
    })
    .await
    .unwrap();

    let (code, said) = env
        .cli(&["cancel", "--queue", &env.queue, "--dry-run", &spared])
        .await;
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("nothing was cancelled"), "{said}");
    let (code, said) = env
        .cli(&["cancel", "--queue", &env.queue, &calling, &later, &done])
        .await;
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains(&format!("task {done}: had already ended (succeeded)")),
        "{said}"
    );
    assert!(
        said.contains(&format!("task {calling}: cancelled")),
        "{said}"
    );

    let r = env.wait_final(&calling, WAIT).await.unwrap();
    assert_eq!(r.status, Status::Cancelled, "{r:?}");
    assert_eq!(r.attempts, 1, "its call went out: {r:?}");
    assert!(r.error.as_deref().unwrap().contains("llmq cancel"), "{r:?}");
    let r = env.wait_final(&later, WAIT).await.unwrap();
    assert_eq!((r.status, r.attempts), (Status::Cancelled, 0), "{r:?}");
    assert_eq!(
        env.wait_final(&spared, WAIT).await.unwrap().status,
        Status::Succeeded,
        "a dry run cancels nothing"
    );
    assert_eq!(
        env.redis
            .task(&env.keys, done.tid())
            .await
            .unwrap()
            .unwrap()
            .status,
        Status::Succeeded,
        "a cancel after the end changes nothing"
    );
    // The marks that named one task each are spent once it ended.
    env.eventually("the spent marks are dropped", WAIT, || async {
        env.redis
            .cancel_marks(&env.keys, 0)
            .await
            .unwrap()
            .is_empty()
    })
    .await
    .unwrap();
    w.stop().await.unwrap();

    // The dropped call is in the ledger, as a call the provider may bill; the task that
    // never ran made none; each cancelled task has its row.
    let calls = env.calls().await.unwrap();
    let of = |id: &str| calls.iter().filter(|c| c.0.to_string() == id).count();
    assert_eq!((of(&calling), of(&later)), (1, 0), "{calls:?}");
    let outcome: String = sqlx::query_scalar(
        "SELECT outcome FROM provider_calls WHERE task_id = $1::uuid AND queue = $2",
    )
    .bind(&calling)
    .bind(&env.queue)
    .fetch_one(env.ledger.pool())
    .await
    .unwrap();
    assert_eq!(outcome, "abandoned");
    let statuses: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM tasks WHERE queue = $1 AND task_id IN ($2::uuid, $3::uuid) ORDER BY status",
    )
    .bind(&env.queue)
    .bind(&calling)
    .bind(&later)
    .fetch_all(env.ledger.pool())
    .await
    .unwrap();
    assert_eq!(statuses, ["cancelled", "cancelled"]);
}

#[tokio::test]
async fn a_batch_and_a_tenants_queued_work_end_cancelled_and_later_work_runs() {
    let env = TestEnv::new().await.unwrap();
    // Paused: everything below waits, unread, when the cancels come.
    env.cli(&["queue", "pause", &env.queue]).await;
    let mut batch = Vec::new();
    for _ in 0..30 {
        let mut e = task("mock-fast");
        e.batch_id = Some("nightly-7".into());
        batch.push(enqueue(&env, &e).await);
    }
    let of_tenant = |tenant: &str| {
        let mut e = task("mock-fast");
        e.tenant = Some(tenant.into());
        e
    };
    let mut acme = Vec::new();
    for _ in 0..10 {
        acme.push(enqueue(&env, &of_tenant("acme")).await);
    }
    let mut other = Vec::new();
    for _ in 0..5 {
        other.push(enqueue(&env, &of_tenant("other")).await);
    }
    let (code, said) = env
        .cli(&[
            "cancel",
            "--queue",
            &env.queue,
            "--batch",
            "nightly-7",
            "--tenant",
            "acme",
        ])
        .await;
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("batch nightly-7"), "{said}");
    assert!(said.contains("tenant acme"), "{said}");
    // The tenant's work enqueued after its cancel runs.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut acme_later = Vec::new();
    for _ in 0..3 {
        acme_later.push(enqueue(&env, &of_tenant("acme")).await);
    }
    env.cli(&["queue", "resume", &env.queue]).await;
    let w = env.worker();
    for id in batch.iter().chain(&acme) {
        let r = env.wait_final(id, WAIT).await.unwrap();
        assert_eq!((r.status, r.attempts), (Status::Cancelled, 0), "{r:?}");
    }
    for id in other.iter().chain(&acme_later) {
        let r = env.wait_final(id, WAIT).await.unwrap();
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
    w.stop().await.unwrap();
    let called: i64 = sqlx::query_scalar("SELECT count(*) FROM provider_calls WHERE queue = $1")
        .bind(&env.queue)
        .fetch_one(env.ledger.pool())
        .await
        .unwrap();
    assert_eq!(
        called, 8,
        "only the other tenant's and the later tasks were called"
    );
}

#[tokio::test]
async fn a_chain_steps_cancel_cancels_what_follows_it() {
    let env = TestEnv::new().await.unwrap();
    let w = env.worker();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let id = format!("{}-c", env.queue);
    let spec = json!({"v": 1, "chain_id": id, "steps": [
        {"name": "plan", "prompt": SLOW, "model": "mock-fast"},
        {"name": "side", "prompt": "y", "model": "mock-fast"},
        {"name": "build", "after": ["plan"], "prompt": "z"},
        {"name": "test", "after": ["build"], "prompt": "z"}]});
    env.xadd("chain", spec.to_string().as_bytes())
        .await
        .unwrap();
    let plan = env
        .eventually("the plan step is in its call", WAIT, || async {
            let c = env.redis.chain(&env.keys, &id).await.unwrap();
            let step = c.and_then(|c| c.steps.get("plan").and_then(|s| s.task_id));
            match step {
                Some(t) => env.calls().await.unwrap().iter().any(|c| c.0 == t.uuid()),
                _ => false,
            }
        })
        .await;
    plan.unwrap();
    let c = env.redis.chain(&env.keys, &id).await.unwrap().unwrap();
    let plan_task = c.steps["plan"].task_id.unwrap().to_string();
    let (code, said) = env
        .cli(&["cancel", "--queue", &env.queue, &plan_task])
        .await;
    assert_eq!(code, 0, "{said}");
    let c = env.chain_ended(&id, WAIT).await;
    let status = |s: &str| c.steps[s].status;
    assert_eq!(
        [
            status("plan"),
            status("build"),
            status("test"),
            status("side")
        ],
        ["cancelled", "cancelled", "cancelled", "succeeded"],
        "{c:#?}"
    );
    assert_eq!(c.state, "failed");
    w.stop().await.unwrap();
}

//! Workers dying, being stopped and racing: delivery stays at least once, results exactly once,
//! and no call is billed twice.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use llmq_shared::envelope::Envelope;
use llmq_shared::ids::{EntryId, TaskId};
use llmq_shared::outcome::{ErrorClass, Status, TaskRecord};
use llmq_shared::queue::{Finish, FinishKind, Write};
use llmq_tests::harness::{AsTaskId, SeededRng, TestEnv, WorkerProcess};

const WAIT: Duration = Duration::from_secs(30);

async fn enqueue(env: &TestEnv, n: usize, model: &str) -> Vec<TaskId> {
    let envs: Vec<Envelope> = (0..n)
        .map(|i| {
            let mut e = Envelope::new(format!("task {i}"));
            e.model = Some(model.into());
            e
        })
        .collect();
    env.redis.enqueue_many(&env.keys, &envs).await.unwrap();
    envs.iter().map(|e| e.id.unwrap()).collect()
}

/// The task id inside each stream entry.
async fn task_ids_of(env: &TestEnv, entry_ids: &[String]) -> Vec<TaskId> {
    let mut out = Vec::new();
    for id in entry_ids {
        for task in env.stream_tasks(id, id).await.unwrap() {
            out.push(task["id"].as_str().unwrap().parse().unwrap());
        }
    }
    out
}

#[tokio::test]
async fn repeated_sigkill_loses_no_task_and_the_ledger_holds_every_call_the_mock_received() {
    let env = TestEnv::new().await.unwrap();
    let ids = enqueue(&env, 60, "slow-300").await;
    let args = ["--concurrency", "4", "--visibility-timeout", "1s"];
    let mut workers = vec![
        WorkerProcess::spawn(&env, &args).unwrap(),
        WorkerProcess::spawn(&env, &args).unwrap(),
    ];

    // Four times: wait until a worker is mid-call on some tasks, kill it without warning and
    // start another in its place. The orphans are taken over once their claims lapse.
    let mut orphaned = Vec::new();
    for round in 0..4 {
        let victim = workers.remove(0);
        let tag = format!("-{}-", victim.child.id());
        let held_by_victim = || async {
            env.pending()
                .await
                .unwrap()
                .into_iter()
                .filter(|(_, c)| c.contains(&tag))
                .map(|(id, _)| id)
                .collect::<Vec<_>>()
        };
        // Mid-call: holding tasks, one of whose calls is recorded and on its way (a row
        // `started` by this worker; a call takes 300 ms), not merely read.
        let calling = || async {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM provider_calls
                 WHERE queue = $1 AND outcome = 'started' AND worker LIKE '%' || $2 || '%'",
            )
            .bind(&env.queue)
            .bind(&tag)
            .fetch_one(env.ledger.pool())
            .await
            .unwrap();
            n > 0
        };
        let holding = env
            .eventually(
                &format!("round {round}: a worker holding tasks, mid-call"),
                WAIT,
                || async { !held_by_victim().await.is_empty() && calling().await },
            )
            .await;
        if holding.is_err() {
            // The queue ran dry before this round: nothing left to interrupt.
            workers.push(victim);
            break;
        }
        orphaned.extend(task_ids_of(&env, &held_by_victim().await).await);
        victim.signal("KILL").unwrap();
        drop(victim);
        workers.push(WorkerProcess::spawn(&env, &args).unwrap());
    }
    assert!(!orphaned.is_empty(), "no worker was killed holding a task");

    let records = llmq::wait_for(&env.redis, &env.keys, &ids, Some(WAIT), |_| {})
        .await
        .unwrap();
    let records: Vec<TaskRecord> = records
        .into_iter()
        .map(|r| r.expect("every task finishes"))
        .collect();
    assert!(
        records.iter().all(|r| r.status == Status::Succeeded),
        "{records:#?}"
    );
    for id in &orphaned {
        assert!(
            records.iter().any(|r| &r.task_id == id),
            "orphaned task {id} was taken over"
        );
    }

    // Call for call: every request the mock received is a row in the ledger, once. A row the
    // mock never received can only be a call whose worker died between recording it and
    // sending it, and it says so (`started`).
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT task_id::text, count(*), count(*) FILTER (WHERE outcome = 'started')
         FROM provider_calls WHERE queue = $1 GROUP BY task_id",
    )
    .bind(&env.queue)
    .fetch_all(env.ledger.pool())
    .await
    .unwrap();
    let rows: HashMap<TaskId, (i64, i64)> = rows
        .into_iter()
        .map(|(task, all, started)| (task.parse().unwrap(), (all, started)))
        .collect();
    let (mut ledger_total, mut started_total) = (0, 0);
    for (i, id) in ids.iter().enumerate() {
        let received = env.mock.calls_with_prompt(&format!("task {i}")) as i64;
        let (all, started) = rows.get(id).copied().unwrap_or_default();
        assert!(
            received <= all && all - started <= received,
            "task {id}: the mock received {received} calls, the ledger holds {all} ({started} started)"
        );
        ledger_total += all;
        started_total += started;
    }
    eprintln!(
        "ledger rows {ledger_total}, mock calls {}, started (cut off by a kill) {started_total}",
        env.mock.total_calls()
    );
    assert!(
        started_total > 0,
        "a worker killed mid-call leaves its calls recorded as started"
    );
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!(
        (counts.ready, counts.in_flight, counts.delayed, counts.dead),
        (0, 0, 0, 0)
    );
    drop(workers);
}

/// A worker among the queue's intact consumers writes without checking that it still holds
/// each entry. That must never apply what the check would not, whatever the takeovers (by
/// another worker or by itself), the restarts under the same id (the process before may
/// still run, with its old token), the entries written twice (in one batch or again later)
/// and the writes with no token. Seeded cases; each write's answers are compared with a
/// model of who holds what. A process writes only entries it was given, as a worker does.
#[tokio::test]
async fn writing_without_the_check_applies_exactly_what_the_check_would() {
    struct Process {
        name: &'static str,
        token: String,
        given: Vec<EntryId>,
    }
    /// A process of worker `name` joins under `token`, given nothing yet.
    async fn start(env: &TestEnv, name: &'static str, token: String) -> Process {
        env.redis
            .join_intact(&env.keys, name, &token)
            .await
            .unwrap();
        Process {
            name,
            token,
            given: Vec::new(),
        }
    }
    for seed in 1..=16_u64 {
        let env = TestEnv::new().await.unwrap();
        env.redis.ensure_group(&env.keys).await.unwrap();
        enqueue(&env, 80, "mock-fast").await;
        let mut rng = SeededRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut conn = env.redis.conn().await.unwrap();
        let mut procs: Vec<Process> = Vec::new();
        for name in ["a", "b"] {
            procs.push(start(&env, name, format!("{name}-0")).await);
        }
        // Which consumer holds each pending entry.
        let mut holder: HashMap<EntryId, &str> = HashMap::new();
        for step in 0..80 {
            let p = rng.below(procs.len());
            let name = procs[p].name;
            match rng.below(10) {
                0..=2 => {
                    let read = 1 + rng.below(6);
                    for d in env
                        .redis
                        .read(&mut conn, &env.keys, name, read, None)
                        .await
                        .unwrap()
                    {
                        holder.insert(d.entry_id, name);
                        procs[p].given.push(d.entry_id);
                    }
                }
                3 => procs.push(start(&env, name, format!("{name}-{step}")).await),
                4 => {
                    let count = 1 + rng.below(4);
                    let took = env
                        .redis
                        .reclaim(&env.keys, name, Duration::ZERO, count, 1_000, WAIT)
                        .await
                        .unwrap();
                    for d in took.tasks {
                        holder.insert(d.entry_id, name);
                        procs[p].given.push(d.entry_id);
                    }
                }
                _ => {
                    let given = &procs[p].given;
                    if given.is_empty() {
                        continue;
                    }
                    let entries: Vec<EntryId> = (0..1 + rng.below(6))
                        .map(|_| given[rng.below(given.len())])
                        .collect();
                    let run = (rng.below(4) > 0).then_some(procs[p].token.as_str());
                    let writes: Vec<Write> = entries
                        .iter()
                        .map(|e| {
                            let id = llmq_shared::envelope::derive_id(&env.queue, *e);
                            let r = TaskRecord::pending(id, &env.queue, Status::Succeeded);
                            Write::Task(Finish::done(*e, id, r))
                        })
                        .collect();
                    let applied = env
                        .redis
                        .write_as(&env.keys, name, run, WAIT, &writes)
                        .await
                        .unwrap();
                    let expected: Vec<bool> = entries
                        .iter()
                        .map(|e| holder.get(e) == Some(&name) && holder.remove(e).is_some())
                        .collect();
                    assert_eq!(
                        applied, expected,
                        "seed {seed}, step {step}: {name} ({run:?}) wrote {entries:?}"
                    );
                }
            }
        }
    }
}

/// The intact workers hold only workers that may still write: a worker that stops cleanly
/// leaves, and a heartbeat's tidying drops those no longer among the live workers (a worker
/// killed while it held nothing, which no takeover removes).
#[tokio::test]
async fn the_intact_workers_are_left_on_a_clean_stop_and_tidied_once_gone() {
    let env = TestEnv::new().await.unwrap();
    let keys = std::slice::from_ref(&env.keys);
    let mut c = env.redis.conn().await.unwrap();
    let () = redis::AsyncCommands::hset(&mut c, env.keys.intact(), "killed", "t0")
        .await
        .unwrap();
    env.redis
        .join_intact(&env.keys, "alive", "t1")
        .await
        .unwrap();
    env.redis.heartbeat("alive", keys, false).await.unwrap();
    assert_eq!(
        intact(&env).await,
        ["alive", "killed"],
        "only the tidy beat drops"
    );
    env.redis.heartbeat("alive", keys, true).await.unwrap();
    assert_eq!(intact(&env).await, ["alive"]);
    env.redis.leave("alive", keys).await.unwrap();
    assert_eq!(intact(&env).await, Vec::<String>::new());
}

/// The workers in queue `env`'s intact workers, sorted.
async fn intact(env: &TestEnv) -> Vec<String> {
    let mut c = env.redis.conn().await.unwrap();
    let mut names: Vec<String> = redis::AsyncCommands::hkeys(&mut c, env.keys.intact())
        .await
        .unwrap();
    names.sort();
    names
}

#[tokio::test]
async fn a_worker_whose_claim_was_taken_over_cannot_ack_or_write() {
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let id = enqueue(&env, 1, "mock-fast").await.remove(0);
    let mut conn = env.redis.conn().await.unwrap();
    let mine = env
        .redis
        .read(&mut conn, &env.keys, "slow-worker", 10, None)
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let theirs = env
        .redis
        .reclaim(
            &env.keys,
            "fast-worker",
            Duration::from_millis(10),
            10,
            5,
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(theirs.tasks.len(), 1, "the idle entry is taken over");
    assert_eq!(theirs.tasks[0].deliveries, 2);
    assert_eq!(
        (
            theirs.takeovers[0].from.as_str(),
            theirs.takeovers[0].from_alive
        ),
        ("slow-worker", false),
        "taken from the slow worker, which never sent a heartbeat"
    );

    let outcome = |who: &str| {
        let mut r = TaskRecord::pending(id, &env.queue, Status::Succeeded);
        r.output = Some(format!("written by {who}"));
        Write::Task(Finish::done(mine[0].entry_id, id, r))
    };
    let fast = env
        .redis
        .write(&env.keys, "fast-worker", WAIT, &[outcome("fast")])
        .await
        .unwrap();
    assert_eq!(fast, vec![true]);
    let slow = env
        .redis
        .write(&env.keys, "slow-worker", WAIT, &[outcome("slow")])
        .await
        .unwrap();
    assert_eq!(slow, vec![false], "the old owner is fenced off");
    let stored = env.redis.task(&env.keys, id.tid()).await.unwrap().unwrap();
    assert_eq!(stored.output.as_deref(), Some("written by fast"));
    // Nor may it push a retry or a dead letter.
    let Write::Task(mut retry) = outcome("slow") else {
        unreachable!()
    };
    retry.kind = FinishKind::Dead {
        error: "late".into(),
        class: ErrorClass::Fatal,
    };
    retry.envelope = "{}".into();
    assert_eq!(
        env.redis
            .write(&env.keys, "slow-worker", WAIT, &[Write::Task(retry)])
            .await
            .unwrap(),
        vec![false]
    );
    assert_eq!(env.redis.counts(&env.keys).await.unwrap().dead, 0);
    assert_eq!(
        env.redis
            .refresh(&env.keys, "slow-worker", &[mine[0].entry_id])
            .await
            .unwrap(),
        [mine[0].entry_id],
        "the slow worker's refresh finds its claim lost"
    );
}

#[tokio::test]
async fn a_worker_killed_between_spotting_a_poison_task_and_dead_lettering_it_loses_nothing() {
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let id = enqueue(&env, 1, "mock-fast").await.remove(0);
    let mut conn = env.redis.conn().await.unwrap();
    env.redis
        .read(&mut conn, &env.keys, "crashed-1", 1, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // The first step of a takeover claims the entry and sees it is poison (2 deliveries, 1
    // allowed); the worker is killed before the second step dead-letters it.
    let claimed = env
        .redis
        .claim_idle(&env.keys, "killed", Duration::from_millis(1), 1)
        .await
        .unwrap();
    assert_eq!(claimed.tasks.len(), 1);
    assert!(claimed.tasks[0].deliveries > 1);
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!(
        (counts.ready, counts.in_flight, counts.delayed, counts.dead),
        (0, 1, 0, 0),
        "exactly one place: still claimed, by the killed worker"
    );
    assert!(
        env.redis
            .results(&env.keys, std::slice::from_ref(&id))
            .await
            .unwrap()[0]
            .is_none()
    );
    // The next worker's takeover finishes it as a dead letter in one script.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let got = env
        .redis
        .reclaim(&env.keys, "next", Duration::from_millis(1), 1, 1, WAIT)
        .await
        .unwrap();
    assert!(got.tasks.is_empty());
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!(
        (counts.ready, counts.in_flight, counts.delayed, counts.dead),
        (0, 0, 0, 1)
    );
    let dead = env.redis.dead_letters(&env.keys, 10).await.unwrap();
    assert_eq!(dead[0].task_id, id);
    assert_eq!(dead[0].attempts, 3, "the delivery count");
    let r = env
        .redis
        .results(&env.keys, std::slice::from_ref(&id))
        .await
        .unwrap()[0]
        .clone()
        .unwrap();
    assert_eq!(
        (r.status, r.error_class),
        (Status::Dead, Some(ErrorClass::Poison)),
        "the record is written with the dead letter"
    );
    assert!(r.error.unwrap().contains("delivered 3 times"));
}

#[tokio::test]
async fn a_task_that_keeps_killing_workers_becomes_a_poison_dead_letter() {
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let id = enqueue(&env, 1, "mock-fast").await.remove(0);
    let mut conn = env.redis.conn().await.unwrap();
    env.redis
        .read(&mut conn, &env.keys, "crashed-1", 1, None)
        .await
        .unwrap();
    for n in 2..=3 {
        let got = env.take_over(&format!("crashed-{n}"), 1).await.unwrap();
        assert_eq!(got.tasks.len(), 1);
    }
    let got = env.take_over("next", 1).await.unwrap();
    assert!(got.tasks.is_empty(), "a fourth delivery is refused");
    let dead = env.redis.dead_letters(&env.keys, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].task_id, id);
    assert_eq!(dead[0].class, "poison");
    assert!(
        dead[0].error.contains("delivered 4 times"),
        "{}",
        dead[0].error
    );
    let r = env.redis.task(&env.keys, id.tid()).await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.error_class),
        (Status::Dead, Some(ErrorClass::Poison)),
        "its result says so too"
    );
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!((counts.ready, counts.in_flight), (0, 0));
}

#[tokio::test]
async fn sigterm_lets_the_running_task_finish_then_exits() {
    let env = TestEnv::new().await.unwrap();
    let mut worker = WorkerProcess::spawn(&env, &["--grace", "30s"]).unwrap();
    let id = enqueue(&env, 1, "slow-1500").await.remove(0);
    env.eventually("the task running", WAIT, || async {
        env.redis
            .counts(&env.keys)
            .await
            .map(|c| c.in_flight)
            .unwrap_or(0)
            == 1
    })
    .await
    .unwrap();
    worker.signal("TERM").unwrap();
    let status = worker.wait_exit(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "{status:?}");
    let r = env.redis.task(&env.keys, id.tid()).await.unwrap().unwrap();
    assert_eq!(
        r.status,
        Status::Succeeded,
        "the running task was allowed to finish"
    );
    assert_eq!(
        env.redis.counts(&env.keys).await.unwrap().workers,
        0,
        "it deregistered"
    );
}

#[tokio::test]
async fn past_the_grace_period_running_tasks_go_back_to_the_queue() {
    let env = TestEnv::new().await.unwrap();
    let mut worker = WorkerProcess::spawn(&env, &["--grace", "200ms"]).unwrap();
    let id = enqueue(&env, 1, "slow-5000").await.remove(0);
    env.eventually("the task running", WAIT, || async {
        env.redis
            .counts(&env.keys)
            .await
            .map(|c| c.in_flight)
            .unwrap_or(0)
            == 1
    })
    .await
    .unwrap();
    worker.signal("TERM").unwrap();
    let status = worker.wait_exit(Duration::from_secs(4)).await.unwrap();
    assert!(status.success(), "{status:?}");
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!(
        (counts.ready, counts.in_flight),
        (1, 0),
        "handed back at once, not left to time out"
    );
    let next = env.worker();
    let r = env.wait_final(&id, WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.attempts, 1, "a handed-back task has not used an attempt");
    next.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_provider_file_stops_the_worker_with_the_key_named() {
    let env = TestEnv::new().await.unwrap();
    let path = std::env::temp_dir().join(format!("{}-bad.yaml", env.queue));
    std::fs::write(
        &path,
        "providers:\n  - name: x\n    kind: telepathy\n    models: []\n",
    )
    .unwrap();
    let out = std::process::Command::new(llmq_tests::harness::binary("llmq-worker"))
        .env("LLMQ_CONFIG", &path)
        .env("DATABASE_URL", llmq_tests::harness::database_url())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("providers[0].kind"), "{err}");
    assert!(err.contains("telepathy"), "{err}");
}

#[tokio::test]
async fn a_long_call_keeps_its_claim_past_the_visibility_timeout() {
    let env = TestEnv::new().await.unwrap();
    let mut settings = env.settings();
    settings.visibility_timeout = Duration::from_millis(1000);
    let a = llmq_tests::harness::WorkerHandle::start(settings);
    let mut settings = env.settings();
    settings.visibility_timeout = Duration::from_millis(1000);
    let b = llmq_tests::harness::WorkerHandle::start(settings);
    // The marker makes the mock take 3 s: three visibility timeouts.
    let mut e = Envelope::new("[[mock:slow-3000]] long analysis");
    e.model = Some("mock-fast".into());
    env.redis.enqueue(&env.keys, &e).await.unwrap();
    let r = env.wait_final(e.id.unwrap(), WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(
        env.mock.calls("mock-fast"),
        1,
        "no other worker took the running task over"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// The run of issue 31, smaller: three workers of 40 under a 3 s visibility timeout, a
/// saturated queue of 2 s calls, and five SIGKILLs 1.5 s apart, each killed worker
/// replaced. Live workers never pass tasks between them: every task succeeds, none becomes
/// `poison`, and the mock answers each task at most once more than the number of times a
/// worker died holding it.
#[tokio::test]
async fn under_churn_a_task_is_held_by_one_live_worker_and_called_once_more_per_kill_at_most() {
    let env = TestEnv::new().await.unwrap();
    // Small enough that the queue runs dry while workers die: takeovers then meet an
    // empty stream, where a worker's reads block.
    let ids = enqueue(&env, 300, "slow").await;
    let args = [
        "--concurrency",
        "40",
        "--visibility-timeout",
        "3s",
        "--max-deliveries",
        "6",
    ];
    let mut workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::spawn(&env, &args).unwrap())
        .collect();
    // The entries a killed worker held, read after it died: exactly what it held then.
    let mut held_at_death: HashMap<TaskId, usize> = HashMap::new();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..5 {
        let mut victim = workers.remove(0);
        let tag = format!("-{}-", victim.child.id());
        victim.signal("KILL").unwrap();
        victim.wait_exit(WAIT).await.unwrap();
        let held: Vec<String> = env
            .pending()
            .await
            .unwrap()
            .into_iter()
            .filter(|(_, c)| c.contains(&tag))
            .map(|(id, _)| id)
            .collect();
        for task in task_ids_of(&env, &held).await {
            *held_at_death.entry(task).or_default() += 1;
        }
        drop(victim);
        workers.push(WorkerProcess::spawn(&env, &args).unwrap());
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert!(!held_at_death.is_empty(), "no worker died holding a task");

    let records = llmq::wait_for(
        &env.redis,
        &env.keys,
        &ids,
        Some(Duration::from_secs(120)),
        |_| {},
    )
    .await
    .unwrap();
    let mut not_succeeded = Vec::new();
    for (i, (id, r)) in ids.iter().zip(&records).enumerate() {
        let r = r.as_ref().expect("every task finishes");
        if r.status != Status::Succeeded {
            not_succeeded.push(format!("{id}: {:?} {:?}", r.status, r.error));
        }
        let calls = env.mock.calls_with_prompt(&format!("task {i}"));
        let kills = held_at_death.get(id).copied().unwrap_or(0) as u64;
        assert!(
            calls <= 1 + kills,
            "task {id} was called {calls} times, though only {kills} worker(s) died holding it"
        );
    }
    assert!(not_succeeded.is_empty(), "{not_succeeded:#?}");
    assert_eq!(
        env.redis.counts(&env.keys).await.unwrap().dead,
        0,
        "no poison"
    );
    // Workers SIGKILLed in the middle of their ledger writes leave rollups that equal the
    // rows they sum (read in one snapshot while other tests write).
    let wrong = llmq_tests::harness::rollup_mismatches(env.ledger.pool())
        .await
        .unwrap();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    eprintln!(
        "churn: {} tasks, {} held by a killed worker, {} calls",
        ids.len(),
        held_at_death.len(),
        env.mock.total_calls()
    );
    drop(workers);
}

#[tokio::test]
async fn a_takeover_tells_a_live_worker_that_let_a_claim_lapse_from_a_dead_one() {
    // A claim lapses after IDLE; a holder is alive when seen more than IDLE / 2 after it last
    // kept the claim. The margins are hundreds of milliseconds, so a loaded machine's delay
    // between the test's clock and Redis's does not read a dead worker as alive.
    const IDLE: Duration = Duration::from_millis(400);
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    enqueue(&env, 2, "mock-fast").await;
    let mut conn = env.redis.conn().await.unwrap();
    let read = env
        .redis
        .read(&mut conn, &env.keys, "alive", 2, None)
        .await
        .unwrap();
    assert_eq!(read.len(), 2);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The worker keeps its second claim (and so is seen alive), not its first.
    let lost = env
        .redis
        .refresh(&env.keys, "alive", &[read[1].entry_id])
        .await
        .unwrap();
    assert!(lost.is_empty());
    let taken = env
        .redis
        .reclaim(&env.keys, "other", IDLE, 10, 5, WAIT)
        .await
        .unwrap();
    assert_eq!(taken.takeovers.len(), 1, "{taken:?}");
    let t = &taken.takeovers[0];
    assert_eq!(
        (t.entry_id, t.from.as_str(), t.from_alive),
        (read[0].entry_id, "alive", true)
    );
    // The other claim lapses too, and its holder is not seen again: a dead worker.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let taken = env
        .redis
        .reclaim(&env.keys, "other", IDLE, 10, 5, WAIT)
        .await
        .unwrap();
    let t = taken
        .takeovers
        .iter()
        .find(|t| t.entry_id == read[1].entry_id)
        .unwrap();
    assert_eq!((t.from.as_str(), t.from_alive), ("alive", false));
}

/// The worker runs itself again at start for its allocator's settings (`tune_malloc`): the
/// process keeps its pid (what a supervisor signals), its arguments (its queue) and its name
/// (what `ps`, `pgrep` and the image check find it by; an `exec` of `/proc/self/exe` named it
/// `exe`).
#[tokio::test]
async fn a_worker_started_again_for_its_allocator_keeps_its_pid_arguments_and_name() {
    let env = TestEnv::new().await.unwrap();
    let mut worker = WorkerProcess::spawn(&env, &[]).unwrap();
    let id = enqueue(&env, 1, "mock-fast").await.remove(0);
    let r = env.wait_final(&id, WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    let pid = worker.child.id();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim_end(), "llmq-worker");
    worker.signal("TERM").unwrap();
    let status = worker.wait_exit(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "{status:?}");
}

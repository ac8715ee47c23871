//! llmq on a Redis Cluster: three masters started by the test from `redis-server`, three
//! queues whose hash tags sit on three different nodes, real workers, the CLI and the
//! scheduler, all through `redis+cluster://`.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use llmq_shared::envelope::Envelope;
use llmq_shared::ids::TaskId;
use llmq_shared::keys::QueueKeys;
use llmq_shared::outcome::Status;
use llmq_shared::queue::Client;
use llmq_tests::cluster::RedisCluster;
use llmq_tests::harness::{TestEnv, WorkerHandle};

const WAIT: Duration = Duration::from_secs(60);

/// The last whole second at or before `at`, in ms: the tick a per-second cron is due at.
fn later_tick(at: chrono::DateTime<chrono::Utc>) -> i64 {
    at.timestamp() * 1000
}

async fn wait_final(
    redis: &Client,
    keys: &QueueKeys,
    id: TaskId,
) -> llmq_shared::outcome::TaskRecord {
    let started = Instant::now();
    loop {
        if let Some(r) = redis.task(keys, id).await.unwrap()
            && matches!(r.status, Status::Succeeded | Status::Dead | Status::Failed)
        {
            return r;
        }
        assert!(started.elapsed() < WAIT, "task {id} did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn tasks_and_dead_letters_on_three_queues_on_three_nodes() {
    let env = TestEnv::new().await.unwrap();
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let queues = cluster.queue_per_node(&env.queue);
    let redis = Client::new(&url).unwrap();
    let mut settings = env.settings();
    settings.redis_url = url.clone();
    settings.queues = queues.clone();
    let worker = WorkerHandle::start(settings);
    let mut ids = Vec::new();
    for q in &queues {
        let keys = QueueKeys::new(q);
        redis.ensure_group(&keys).await.unwrap();
        for i in 0..10 {
            let mut e = Envelope::new(format!("task {i} on {q}"));
            e.model = Some("mock-fast".into());
            // Some wait their turn in the queue's room, whose keys the scripts name.
            if i % 2 == 1 {
                e.priority = Some(i % 4);
                e.tenant = Some(format!("tenant-{}", i % 3).into());
            }
            redis.enqueue(&keys, &e).await.unwrap();
            ids.push((keys.clone(), e.id.unwrap()));
        }
        // Several at once, all for the stream: one transaction on the queue's node.
        let many: Vec<Envelope> = (0..5)
            .map(|i| {
                let mut e = Envelope::new(format!("one of five, {i}, on {q}"));
                e.model = Some("mock-fast".into());
                e
            })
            .collect();
        redis.enqueue_many(&keys, &many).await.unwrap();
        ids.extend(many.iter().map(|e| (keys.clone(), e.id.unwrap())));
        // A task without a prompt: a dead letter on its own node.
        let mut c = redis.conn().await.unwrap();
        let _: String = redis::cmd("XADD")
            .arg(keys.stream())
            .arg("*")
            .arg("task")
            .arg(r#"{"v":1}"#)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    for (keys, id) in &ids {
        let id = *id;
        let r = wait_final(&redis, keys, id).await;
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }
    for q in &queues {
        let keys = QueueKeys::new(q);
        let started = Instant::now();
        loop {
            let dead = redis.dead_letters(&keys, 10).await.unwrap();
            if dead.len() == 1 {
                assert!(dead[0].error.contains("prompt"), "{dead:?}");
                break;
            }
            assert!(started.elapsed() < WAIT, "no dead letter on {q}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let counts = redis.counts(&keys).await.unwrap();
        assert_eq!(
            (counts.ready, counts.in_flight, counts.dead, counts.workers),
            (0, 0, 1, 1),
            "{q}"
        );
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_killed_worker_s_tasks_a_chain_and_the_scheduler_s_duties_on_three_nodes() {
    let env = TestEnv::new().await.unwrap();
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let queues = cluster.queue_per_node(&env.queue);
    let redis = Client::new(&url).unwrap();
    let vars = [("REDIS_URL", url.as_str())];
    let mut args = vec!["--visibility-timeout", "1s"];
    for q in &queues {
        args.extend(["--queue", q.as_str()]);
    }
    // A worker dies holding slow tasks on every node; another takes them over.
    let doomed = llmq_tests::harness::WorkerProcess::spawn_with_vars(
        &env,
        include_str!("../../../examples/providers.mock.yaml"),
        &args,
        &vars,
    )
    .unwrap();
    let mut slow = Vec::new();
    for q in &queues {
        let keys = QueueKeys::new(q);
        redis.ensure_group(&keys).await.unwrap();
        for i in 0..3 {
            let mut e = Envelope::new(format!("slow task {i} on {q}"));
            e.model = Some("slow-1500".into());
            redis.enqueue(&keys, &e).await.unwrap();
            slow.push((keys.clone(), e.id.unwrap()));
        }
    }
    let started = Instant::now();
    loop {
        let mut running = 0;
        for q in &queues {
            running += redis.counts(&QueueKeys::new(q)).await.unwrap().in_flight;
        }
        if running == 9 {
            break;
        }
        assert!(started.elapsed() < WAIT, "the tasks never all ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.signal("KILL").unwrap();
    let _rescuer = llmq_tests::harness::WorkerProcess::spawn_with_vars(
        &env,
        include_str!("../../../examples/providers.mock.yaml"),
        &args,
        &vars,
    )
    .unwrap();
    for (keys, id) in &slow {
        let id = *id;
        let r = wait_final(&redis, keys, id).await;
        assert_eq!(r.status, Status::Succeeded, "{r:?}");
    }

    // A chain runs to its end on its queue's node.
    let chain_queue = QueueKeys::new(&queues[2]);
    let spec = serde_json::json!({
        "v": 1,
        "chain_id": format!("cluster-{}", env.queue),
        "steps": [
            {"name": "plan", "prompt": "plan it", "model": "mock-fast"},
            {"name": "do", "after": ["plan"], "prompt": "do {{plan.summary}}", "model": "mock-fast"}
        ]
    });
    redis
        .submit_chain(&chain_queue, &spec.to_string())
        .await
        .unwrap();
    let chain_id = format!("cluster-{}", env.queue);
    let started = Instant::now();
    loop {
        if let Some(c) = redis.chain(&chain_queue, &chain_id).await.unwrap()
            && c.state != "running"
        {
            assert_eq!(c.state, "succeeded", "{c:?}");
            break;
        }
        assert!(started.elapsed() < WAIT, "the chain did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The scheduler (a month later, so every dead letter is old) archives and trims the
    // dead letters of all three queues, and enqueues a recurring task on one of them.
    for q in &queues {
        let mut c = redis.conn().await.unwrap();
        let _: String = redis::cmd("XADD")
            .arg(QueueKeys::new(q).stream())
            .arg("*")
            .arg("task")
            .arg("not json")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    for q in &queues {
        let keys = QueueKeys::new(q);
        let started = Instant::now();
        while redis.dead_letters(&keys, 10).await.unwrap().is_empty() {
            assert!(started.elapsed() < WAIT, "no dead letter on {q}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut config = llmq_tests::harness::mock_config(&env.mock.url());
    config
        .scheduler
        .recurring
        .push(llmq_shared::config::Recurring {
            name: format!("tick-{}", env.queue),
            cron: "* * * * * *".into(),
            schedule: llmq_shared::config::parse_cron("* * * * * *").unwrap(),
            queue: queues[1].clone(),
            task: serde_json::json!({"prompt": "tick", "model": "mock-fast"})
                .as_object()
                .cloned()
                .unwrap(),
        });
    let mut s =
        llmq_scheduler::Settings::new(&url, &llmq_tests::harness::database_url(), config).unwrap();
    s.id = Some(format!("{}-scheduler", env.queue));
    s.namespace = Some(env.queue.clone());
    s.queues = queues.clone();
    let later = chrono::Utc::now() + chrono::Duration::days(30);
    s.clock = std::sync::Arc::new(move || later);
    // Its last tick 3 s before the scheduler's clock: three ticks are due.
    let mut c = redis.conn().await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(llmq_shared::keys::SchedulerKeys::new(Some(&env.queue)).duties())
        .arg(format!(
            "{}tick-{}",
            llmq_shared::archive::RECURRING_FIELD,
            env.queue
        ))
        .arg((later - chrono::Duration::seconds(3)).timestamp_millis())
        .query_async(&mut c)
        .await
        .unwrap();
    let mut scheduler = llmq_scheduler::Scheduler::connect(s).await.unwrap();
    assert!(scheduler.acquire().await.unwrap());
    for duty in [
        llmq_scheduler::Duty::DeadLetters,
        llmq_scheduler::Duty::Recurring,
        llmq_scheduler::Duty::Chains,
        llmq_scheduler::Duty::Gauges,
        llmq_scheduler::Duty::Promote,
        llmq_scheduler::Duty::Batches,
    ] {
        scheduler.run_duty(duty).await.unwrap();
    }
    for q in &queues {
        let keys = QueueKeys::new(q);
        assert!(
            redis.dead_letters(&keys, 10).await.unwrap().is_empty(),
            "{q}'s dead letters trimmed"
        );
        let archived: i64 =
            sqlx::query_scalar("SELECT count(*) FROM dead_letters_archive WHERE queue = $1")
                .bind(q)
                .fetch_one(env.ledger.pool())
                .await
                .unwrap();
        assert_eq!(archived, 1, "{q}");
    }
    // The recurring task's tick went to its queue's node, where the rescuer runs it.
    let ticks: i64 = {
        let started = Instant::now();
        loop {
            let mut c = redis.conn().await.unwrap();
            let n: i64 = redis::cmd("EXISTS")
                .arg(
                    QueueKeys::new(&queues[1])
                        .tick(&format!("tick-{}", env.queue), later_tick(later)),
                )
                .query_async(&mut c)
                .await
                .unwrap();
            if n > 0 || started.elapsed() > Duration::from_secs(5) {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(ticks, 1, "the tick's marker on its queue's node");
    scheduler.release().await.unwrap();
}

/// `llmq` with `REDIS_URL` = `url`: its exit code and what it printed.
async fn cli_with(url: &str, args: &[&str]) -> (u8, String) {
    use clap::Parser;
    let mut full = vec!["llmq", "--redis-url", url];
    full.extend_from_slice(args);
    let cli = llmq::cli::Cli::try_parse_from(full).unwrap();
    let mut out = Vec::new();
    let code = llmq::run(cli, &mut out).await;
    (code, String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn a_cluster_or_sentinel_url_that_cannot_be_used_is_one_sentence_and_exit_2() {
    let plain = llmq_tests::harness::redis_url().replace("redis://", "redis+cluster://");
    let sentinel = llmq_tests::cluster::RedisSentinel::start();
    let no_such_master = sentinel.url().replace("/mymaster", "/nosuchmaster");
    // A "sentinel" that takes connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = format!(
        "redis+sentinel://127.0.0.1:{}/mymaster",
        silent.local_addr().unwrap().port()
    );
    for (url, says) in [
        (silent.as_str(), "no sentinel named a reachable master"),
        (plain.as_str(), "is not in cluster mode"),
        (
            no_such_master.as_str(),
            "the sentinels know no master named `nosuchmaster`",
        ),
        (
            "redis+sentinel://127.0.0.1:1/mymaster",
            "no sentinel named a reachable master",
        ),
        (
            "redis+sentinel://127.0.0.1:1",
            "needs the sentinels and the master's name",
        ),
        (
            "redis+cluster://127.0.0.1:1,127.0.0.1:2",
            "no seed node of the Redis Cluster answered",
        ),
        ("redis+cluster://", "needs at least one seed node"),
    ] {
        let started = Instant::now();
        let out = tokio::process::Command::new(llmq_tests::harness::binary("llmq"))
            .args(["--redis-url", url, "status"])
            .output();
        let out = tokio::time::timeout(Duration::from_secs(15), out)
            .await
            .unwrap_or_else(|_| panic!("{url}: llmq hung"))
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {err}");
        assert!(err.contains(says), "{url}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
        assert!(started.elapsed() < Duration::from_secs(15), "{url} hung");
    }
}

#[tokio::test]
async fn the_cli_submits_waits_and_shows_status_on_a_cluster() {
    let env = TestEnv::new().await.unwrap();
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let queues = cluster.queue_per_node(&env.queue);
    let mut settings = env.settings();
    settings.redis_url = url.clone();
    settings.queues = queues.clone();
    let worker = WorkerHandle::start(settings);
    for q in &queues {
        let (code, out) = cli_with(
            &url,
            &[
                "submit",
                "--prompt",
                "hello from the cli",
                "--queue",
                q,
                "--model",
                "mock-fast",
                "--wait",
            ],
        )
        .await;
        assert_eq!(code, 0, "{q}: {out}");
        assert!(out.contains("mock answer from mock-fast"), "{q}: {out}");
    }
    let mut args = vec!["status", "--format", "json"];
    for q in &queues {
        args.extend(["--queue", q.as_str()]);
    }
    let (code, out) = cli_with(&url, &args).await;
    assert_eq!(code, 0, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let shown = status["queues"].as_array().unwrap();
    assert_eq!(shown.len(), 3, "{out}");
    for q in shown {
        assert_eq!(q["workers"], 1, "{out}");
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_sentinel_failover_under_500_slow_tasks_loses_none_and_bills_every_call() {
    use llmq_tests::cluster::RedisSentinel;
    let env = TestEnv::new().await.unwrap();
    let mut sentinel = RedisSentinel::start();
    let url = sentinel.url();
    let redis = Client::new(&url).unwrap();
    let keys = env.keys.clone();
    redis.ensure_group(&keys).await.unwrap();
    let mut ids = Vec::new();
    let tasks: Vec<Envelope> = (0..500)
        .map(|i| {
            let mut e = Envelope::new(format!("slow task {i}"));
            e.model = Some("slow-300".into());
            ids.push(e.id.unwrap());
            e
        })
        .collect();
    redis.enqueue_many(&keys, &tasks).await.unwrap();
    // The producer's part of durability: the replica has the tasks before it answers.
    let mut c = redis.conn().await.unwrap();
    let replicas: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(replicas, 1);
    let workers: Vec<WorkerHandle> = (0..2)
        .map(|_| {
            let mut s = env.settings();
            s.redis_url = url.clone();
            s.concurrency = 32;
            WorkerHandle::start(s)
        })
        .collect();
    // The master dies while tasks run.
    let started = Instant::now();
    loop {
        let done = redis.results(&keys, &ids).await.unwrap();
        if done.iter().flatten().count() >= 50 {
            break;
        }
        assert!(started.elapsed() < WAIT, "the tasks did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sentinel.kill_master();
    // Every task gets a result, from the new master.
    let started = Instant::now();
    loop {
        let done = redis.results(&keys, &ids).await;
        if let Ok(done) = done
            && done
                .iter()
                .all(|r| r.as_ref().is_some_and(|r| r.status == Status::Succeeded))
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not every task finished after the failover"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for w in workers {
        w.stop().await.unwrap();
    }
    // The ledger holds every call the provider answered: a task whose finish the old
    // master lost ran again, and both calls are billed.
    let billed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM provider_calls WHERE queue = $1 AND outcome NOT IN ('unsent', 'cached')",
    )
    .bind(&env.queue)
    .fetch_one(env.ledger.pool())
    .await
    .unwrap();
    assert_eq!(billed as u64, env.mock.calls("slow-300"));
    assert!(billed >= 500);
}

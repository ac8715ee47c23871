//! `llmq queue pause|resume`: every worker stops taking a paused queue's tasks within a
//! second, even one blocked in a 5 s read; tasks in flight finish; a worker serving several
//! queues goes on with the others; on resume every waiting task runs, with no attempt spent.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq_shared::envelope::Envelope;
use llmq_shared::keys::QueueKeys;
use llmq_shared::outcome::Status;
use llmq_tests::harness::{AsTaskId, TestEnv};

const WAIT: Duration = Duration::from_secs(30);

fn task(model: &str) -> Envelope {
    let mut e = Envelope::new("pause me");
    e.model = Some(model.into());
    e
}

#[tokio::test]
async fn a_paused_queue_waits_and_runs_on_resume() {
    let env = TestEnv::new().await.unwrap();
    let other = format!("{}-other", env.queue);
    let other_keys = QueueKeys::new(&other);
    // One worker on this queue alone, blocking 5 s in each read; one on both queues.
    let mut one = env.settings();
    one.block = Duration::from_secs(5);
    let mut both = env.settings();
    both.queues = vec![env.queue.clone(), other.clone()];
    let workers = [
        llmq_tests::harness::WorkerHandle::start(one),
        llmq_tests::harness::WorkerHandle::start(both),
    ];
    // Two slow tasks in flight when the pause comes.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let e = task("slow-1500");
        env.redis.enqueue(&env.keys, &e).await.unwrap();
        slow.push(e.id.unwrap());
    }
    env.eventually("both slow tasks in flight", WAIT, || async {
        env.redis.counts(&env.keys).await.unwrap().in_flight == 2
    })
    .await
    .unwrap();

    let (code, said) = env
        .cli(&["queue", "pause", &env.queue, "--reason", "incident"])
        .await;
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("paused"), "{said}");
    let (_, again) = env.cli(&["queue", "pause", &env.queue]).await;
    assert!(again.contains("already paused"), "{again}");
    let paused = env.redis.paused(&env.keys).await.unwrap().unwrap();
    assert_eq!(paused.reason, "incident");
    // Within a second every worker knows; then tasks arrive, for both queues.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut waiting = Vec::new();
    for _ in 0..5 {
        let e = task("mock-fast");
        env.redis.enqueue(&env.keys, &e).await.unwrap();
        waiting.push(e.id.unwrap());
    }
    let e = task("mock-fast");
    env.redis.enqueue(&other_keys, &e).await.unwrap();
    let elsewhere = e.id.unwrap();

    // The tasks in flight finish; the other queue's task runs; this queue's wait.
    for id in &slow {
        assert_eq!(
            env.wait_final(id, WAIT).await.unwrap().status,
            Status::Succeeded
        );
    }
    let r = llmq::wait_for(&env.redis, &other_keys, &[elsewhere], Some(WAIT), |_| {})
        .await
        .unwrap();
    assert_eq!(r[0].as_ref().unwrap().status, Status::Succeeded);
    // Past several of the 5 s reads, and a full 200 ms read cycle of the other worker.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert!(counts.paused);
    assert_eq!((counts.ready, counts.in_flight), (5, 0), "{counts:?}");
    for id in &waiting {
        assert!(
            env.redis
                .task(&env.keys, id.tid())
                .await
                .unwrap()
                .is_none_or(|r| r.status == Status::Queued)
        );
    }
    let (_, status) = env.cli(&["status", "--queue", &env.queue]).await;
    assert!(status.contains("is paused"), "{status}");

    let (code, said) = env.cli(&["queue", "resume", &env.queue]).await;
    assert_eq!(code, 0);
    assert!(said.contains("resumed"), "{said}");
    for id in &waiting {
        let r = env.wait_final(id, WAIT).await.unwrap();
        assert_eq!((r.status, r.attempts), (Status::Succeeded, 1), "{r:?}");
    }
    let (_, said) = env.cli(&["queue", "resume", &env.queue]).await;
    assert!(said.contains("was not paused"), "{said}");
    for w in workers {
        w.stop().await.unwrap();
    }
}

/// A task a worker read from a queue paused meanwhile goes back to the stream unchanged.
#[tokio::test]
async fn what_a_worker_read_after_a_pause_goes_back_unchanged() {
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let e = task("mock-fast");
    env.redis.enqueue(&env.keys, &e).await.unwrap();
    let mut c = env
        .redis
        .reading_conn(Duration::from_secs(1))
        .await
        .unwrap();
    let read = env
        .redis
        .read(&mut c, &env.keys, "reader", 10, None)
        .await
        .unwrap();
    assert_eq!(read.len(), 1);
    let back = env
        .redis
        .unread(&env.keys, "reader", &[read[0].entry_id])
        .await
        .unwrap();
    assert_eq!(back, 1);
    // A second hand-back of the same entry does nothing: it is no longer held.
    let again = env
        .redis
        .unread(&env.keys, "reader", &[read[0].entry_id])
        .await
        .unwrap();
    assert_eq!(again, 0);
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!((counts.ready, counts.in_flight), (1, 0));
    let reread = env
        .redis
        .read(&mut c, &env.keys, "reader", 10, None)
        .await
        .unwrap();
    assert_eq!(reread[0].payload, read[0].payload);
    assert_eq!(reread[0].deliveries, 1, "a hand-back spends no delivery");
}

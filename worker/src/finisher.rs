//! Writes outcomes in batches: the ledger first (one transaction for every call in the
//! batch), then Redis (one Lua call per queue that stores results, moves retries and dead
//! letters, moves chains along and acks, whatever the outcomes are; then one that frees the
//! concurrency slots of the batch's keyed tasks). A task is acked only after its calls are
//! committed.
//!
//! The two stages run as two loops, so one batch's Redis write overlaps the next batch's
//! commit. Batches form naturally: each stage takes whatever has arrived while it was busy.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use llmq_shared::ids::EntryId;
use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::{CallRow, Ledger};
use llmq_shared::outcome::Status;
use llmq_shared::queue::{Client, FinishKind, Keep, Write};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::finished::{CallStarts, Finished, Start};
use llmq_shared::retry::RetryPolicy;

/// How a failed write of outcomes is retried: 100 ms doubling to 5 s, until it succeeds or
/// the hard stop comes.
const WRITE_RETRY: RetryPolicy =
    RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(5));

/// At most this many outcomes per batch.
pub const MAX_BATCH: usize = 512;

/// Batches written to Redis at once: while one batch's script runs, the next one is already
/// on its way instead of waiting for it.
const WRITES_IN_FLIGHT: usize = 2;

/// An outcome and who waits for it to be written. The answer is `true` when it was
/// applied, `false` when the worker had lost the task to another worker (fenced).
pub struct Pending {
    pub finished: Finished,
    pub done: oneshot::Sender<bool>,
}

/// The write path's settings.
#[derive(Clone)]
pub struct Finisher {
    pub redis: Client,
    pub ledger: Option<Ledger>,
    pub consumer: String,
    /// This process's token among each queue's intact consumers
    /// ([`Client::join_intact`](llmq_shared::queue::Client::join_intact)).
    pub run: String,
    pub result_ttl: Duration,
    /// Cancelled at the end of the shutdown grace period: a batch that still cannot be
    /// written is dropped unacked, to be redelivered.
    pub hard_stop: CancellationToken,
    /// Held unready while a write keeps failing: a worker that cannot finish tasks should
    /// take no more.
    pub readiness: llmq_shared::health::Readiness,
    /// `answer_cache.max_memory_mb`, in bytes: the most one queue's kept answers take.
    pub answer_cache_bytes: u64,
}

impl Finisher {
    /// Starts both stages; outcomes go in through the returned sender. Both loops end when
    /// every sender is dropped and what was sent is written. With a ledger, also starts the
    /// loop that records calls before they are made.
    pub fn spawn(
        self,
        tasks: &tokio_util::task::TaskTracker,
    ) -> (mpsc::UnboundedSender<Pending>, Option<CallStarts>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (acks_tx, acks_rx) = mpsc::unbounded_channel();
        let this = Arc::new(self);
        let starts = this.ledger.is_some().then(|| {
            let (starts_tx, starts_rx) = mpsc::unbounded_channel();
            tasks.spawn(Arc::clone(&this).starts_stage(starts_rx));
            CallStarts(starts_tx)
        });
        tasks.spawn(Arc::clone(&this).ledger_stage(rx, acks_tx));
        tasks.spawn(this.redis_stage(acks_rx));
        (tx, starts)
    }

    /// Commits `started` rows in batches and tells each caller when its row is in.
    async fn starts_stage(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Start>) {
        let Some(ledger) = &self.ledger else { return };
        while let Some(batch) = next_batch(&mut rx).await {
            let (rows, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            if ledger.record(&rows, &[]).await.is_ok() {
                release(ledger, rows.into_iter().zip(waiters).collect()).await;
                continue;
            }
            // Postgres is failing. A caller that stops waiting (its attempt ran out of time)
            // makes no call, so its row is left out of every later try: a `started` row must
            // stand for a call that was made.
            let pending = std::sync::Mutex::new(rows.into_iter().zip(waiters).collect::<Vec<_>>());
            let written = self
                .retry("recording calls in the ledger", || {
                    let rows: Vec<CallRow> = {
                        let mut p = pending.lock().unwrap_or_else(PoisonError::into_inner);
                        p.retain(|(_, waiter)| !waiter.is_closed());
                        p.iter().map(|(row, _)| row.clone()).collect()
                    };
                    async move { ledger.record(&rows, &[]).await }
                })
                .await
                .is_some();
            let pending = pending.into_inner().unwrap_or_else(PoisonError::into_inner);
            if written {
                release(ledger, pending).await;
            } else {
                for (_, done) in pending {
                    let _ = done.send(false);
                }
            }
        }
    }

    async fn ledger_stage(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Pending>,
        acks: mpsc::UnboundedSender<Vec<Pending>>,
    ) {
        while let Some(mut batch) = next_batch(&mut rx).await {
            if let Some(ledger) = &self.ledger {
                // The call rows are written once and not needed after: moved, not copied. The
                // task rows are made here, from the records the outcomes carry.
                let calls: Vec<_> = batch
                    .iter_mut()
                    .flat_map(|p| std::mem::take(&mut p.finished.calls))
                    .collect();
                let tasks: Vec<_> = batch
                    .iter_mut()
                    .filter_map(|p| p.finished.task_row())
                    .collect();
                let verdicts: Vec<_> = batch.iter().filter_map(|p| p.finished.verdict).collect();
                let written = self
                    .retry("writing the ledger", || async {
                        ledger.record(&calls, &tasks).await?;
                        ledger.verdicts(&verdicts).await
                    })
                    .await;
                if written.is_none() {
                    // Shutdown hard stop: leave these unacked; they will be redelivered.
                    continue;
                }
            }
            if acks.send(batch).is_err() {
                return;
            }
        }
    }

    async fn redis_stage(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Vec<Pending>>) {
        let mut running = tokio::task::JoinSet::new();
        while let Some(mut batch) = rx.recv().await {
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(more) => batch.extend(more),
                    Err(_) => break,
                }
            }
            while running.len() >= WRITES_IN_FLIGHT {
                running.join_next().await;
            }
            let this = Arc::clone(&self);
            running.spawn(async move { this.write_batch(batch).await });
            while running.try_join_next().is_some() {}
        }
        while running.join_next().await.is_some() {}
    }

    /// Writes one batch of outcomes to Redis, queue by queue.
    async fn write_batch(&self, batch: Vec<Pending>) {
        let mut by_queue: HashMap<Arc<QueueKeys>, Vec<Pending>> = HashMap::new();
        for p in batch {
            by_queue
                .entry(Arc::clone(&p.finished.queue))
                .or_default()
                .push(p);
        }
        for (keys, mut items) in by_queue {
            // Answers are kept before the outcomes are written: once a leader's entry leaves
            // the stream, its flight is stale, and an identical task arriving then must find
            // the answer. An answer whose outcome is then not applied (the task was taken
            // over) is still the model's answer to the request. Should this fail, the tasks
            // its flight wakes call the model again.
            let kept: Vec<Keep> = items
                .iter_mut()
                .filter_map(|p| p.finished.keep.take())
                .map(|k| *k)
                .collect();
            if let Err(e) = self
                .redis
                .keep_answers(&keys, self.answer_cache_bytes, &kept)
                .await
            {
                tracing::warn!(
                    queue = keys.name(),
                    "cannot keep answers in the answer cache: {e}"
                );
            }
            // The concurrency slots of the tasks whose outcomes were applied, freed in one
            // call once the queue's part of the batch is written.
            let mut freed = Vec::new();
            self.write_queue(&keys, items, &mut freed).await;
            if !freed.is_empty() {
                // Should this fail, the slots are freed as stale by the next sweep: their
                // entries have left the stream.
                if let Err(e) = self.redis.free_slots(&keys, &freed).await {
                    tracing::warn!(queue = keys.name(), "cannot free concurrency slots: {e}");
                }
            }
        }
    }

    /// Writes one queue's part of a batch in one script; adds (entry id, key) of every
    /// applied outcome that held a concurrency slot (or an answer-cache flight) to `freed`.
    async fn write_queue(
        &self,
        keys: &QueueKeys,
        items: Vec<Pending>,
        freed: &mut Vec<(EntryId, String)>,
    ) {
        let mut slots = Vec::with_capacity(items.len());
        let (writes, waiters): (Vec<Write>, Vec<_>) = items
            .into_iter()
            .map(|p| {
                slots.push(p.finished.slot);
                (p.finished.write, p.done)
            })
            .unzip();
        let applied = self
            .retry("writing outcomes to Redis", || {
                self.redis.write_as(
                    keys,
                    &self.consumer,
                    Some(&self.run),
                    self.result_ttl,
                    &writes,
                )
            })
            .await;
        let ok = applied.is_some();
        let applied = applied.unwrap_or_default();
        let mut counts = [0_u64; Written::ALL.len()];
        // Tasks that ended cancelled: the marks that named them are spent.
        let mut spent = Vec::new();
        for (i, ((write, done), slot)) in writes.iter().zip(waiters).zip(slots).enumerate() {
            let was_applied = applied.get(i).copied().unwrap_or(false);
            if was_applied && let Some(key) = slot {
                freed.push((write.entry_id(), key));
            }
            if let Some(f) = write.finish().filter(|_| was_applied)
                && f.record
                    .as_ref()
                    .is_some_and(|r| r.status == Status::Cancelled)
            {
                spent.push(f.task_id);
            }
            if ok && let Some(finish) = write.finish() {
                counts[Written::of(&finish.kind, was_applied) as usize] += 1;
            }
            if ok && !was_applied {
                tracing::warn!(
                    entry = %write.entry_id(),
                    "another worker took this entry over; its outcome here was discarded"
                );
            }
            let _ = done.send(was_applied);
        }
        count(keys, &counts);
        // Should this fail, the marks stay until their life ends; they name tasks that ended.
        if let Err(e) = self.redis.forget_cancels(keys, &spent).await {
            tracing::debug!(queue = keys.name(), "cannot drop spent cancel marks: {e}");
        }
    }

    /// Runs `op` until it succeeds, backing off up to 5 s between tries, with the worker
    /// unready meanwhile; gives up only at the hard stop (then `None`).
    async fn retry<T, F, Fut, E>(&self, what: &str, mut op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let mut waits = WRITE_RETRY.waits();
        let mut stall = None;
        loop {
            match op().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    stall.get_or_insert_with(|| self.readiness.stall());
                    let wait = waits.next().unwrap_or(WRITE_RETRY.max);
                    tracing::error!("{what} failed, retrying in {wait:?}: {e}");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.hard_stop.cancelled() => return None,
                    }
                }
            }
        }
    }
}

/// Tells each caller its `started` row is committed; the rows of callers that gave up
/// meanwhile (their attempt ran out of time: no call will be made) are deleted again.
async fn release(ledger: &Ledger, committed: Vec<Start>) {
    let gone: Vec<CallRow> = committed
        .into_iter()
        .filter_map(|(row, done)| done.send(true).is_err().then_some(row))
        .collect();
    if let Err(e) = ledger.forget_started(&gone).await {
        tracing::warn!(
            "cannot delete the `started` rows of {} call(s) never made: {e}",
            gone.len()
        );
    }
}

/// What the finisher wrote for a task: the `outcome` label of `llmq_tasks_total`. A chain
/// step's counts as a plain task's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// Not applied: the entry was no longer this worker's.
    Fenced,
    Succeeded,
    Delayed,
    Dead,
    Released,
    /// Back in its room, at its tenant's place.
    Sorted,
}

impl Written {
    const ALL: [Self; 6] = [
        Self::Fenced,
        Self::Succeeded,
        Self::Delayed,
        Self::Dead,
        Self::Released,
        Self::Sorted,
    ];

    fn of(kind: &FinishKind, applied: bool) -> Self {
        match (kind, applied) {
            (_, false) => Self::Fenced,
            (FinishKind::Done, _) => Self::Succeeded,
            (FinishKind::Retry { .. }, _) => Self::Delayed,
            (FinishKind::Dead { .. }, _) => Self::Dead,
            (FinishKind::Release, _) => Self::Released,
            (FinishKind::Room { .. }, _) => Self::Sorted,
        }
    }

    /// The label, as the metric names it.
    const fn as_str(self) -> &'static str {
        match self {
            Self::Fenced => "fenced",
            Self::Succeeded => "succeeded",
            Self::Delayed => "delayed",
            Self::Dead => "dead",
            Self::Released => "released",
            Self::Sorted => "sorted",
        }
    }
}

/// Counts a written batch's outcomes in `llmq_tasks_total` (`counts` by [`Written`], in its
/// order): one look-up per outcome the batch has, not one per task.
fn count(keys: &QueueKeys, counts: &[u64; Written::ALL.len()]) {
    for (written, &n) in Written::ALL.iter().zip(counts) {
        if n > 0 {
            metrics::counter!("llmq_tasks_total", "queue" => keys.name().to_owned(), "outcome" => written.as_str())
                .increment(n);
        }
    }
}

async fn next_batch<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut batch = Vec::with_capacity(64);
    batch.push(first);
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(p) => batch.push(p),
            Err(_) => break,
        }
    }
    Some(batch)
}

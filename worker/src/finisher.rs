//! Writes outcomes in batches: the ledger first (one transaction for every call in the
//! batch), then Redis (one Lua call per queue that stores results, moves retries and dead
//! letters, and acks; then one that frees the concurrency slots of the batch's keyed
//! tasks). A task is acked only after its calls are committed.
//!
//! The two stages run as two loops, so one batch's Redis write overlaps the next batch's
//! commit. Batches form naturally: each stage takes whatever has arrived while it was busy.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::{CallRow, Ledger};
use llmq_shared::queue::{Client, FinishKind};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::executor::{ChainWrite, Finished};
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

/// A call's row to commit before the call is made, and who waits for it.
type Start = (CallRow, oneshot::Sender<bool>);

/// Records each provider call in the ledger, outcome `started`, before it is made, so a worker
/// that dies during a call still leaves a row for a call the provider may bill. Rows are
/// committed in batches, like outcomes.
#[derive(Debug, Clone)]
pub struct CallStarts(mpsc::UnboundedSender<Start>);

impl CallStarts {
    /// Waits until `row` is committed: `true`, or `false` when it could not be before the
    /// hard stop (the call must then not be made).
    pub async fn record(&self, row: CallRow) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.0.send((row, tx)).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

/// The write path's settings.
#[derive(Clone)]
pub struct Finisher {
    pub redis: Client,
    pub ledger: Option<Ledger>,
    pub consumer: String,
    pub result_ttl: Duration,
    /// Cancelled at the end of the shutdown grace period: a batch that still cannot be
    /// written is dropped unacked, to be redelivered.
    pub hard_stop: CancellationToken,
    /// Held unready while a write keeps failing: a worker that cannot finish tasks should
    /// take no more.
    pub readiness: llmq_shared::health::Readiness,
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
                for done in waiters {
                    let _ = done.send(true);
                }
                continue;
            }
            // Postgres is failing. A caller that stops waiting (its attempt ran out of time)
            // makes no call, so its row is left out of every later try: a `started` row must
            // stand for a call that was made.
            let batch = std::sync::Mutex::new((rows, waiters));
            let written = self
                .retry("recording calls in the ledger", || {
                    let rows = {
                        let mut b = batch.lock().unwrap_or_else(PoisonError::into_inner);
                        let (rows, waiters) = &mut *b;
                        let keep: Vec<bool> = waiters.iter().map(|w| !w.is_closed()).collect();
                        let mut k = keep.iter();
                        rows.retain(|_| k.next().copied().unwrap_or(false));
                        let mut k = keep.iter();
                        waiters.retain(|_| k.next().copied().unwrap_or(false));
                        rows.clone()
                    };
                    async move { ledger.record(&rows, &[]).await }
                })
                .await
                .is_some();
            let (_, waiters) = batch.into_inner().unwrap_or_else(PoisonError::into_inner);
            for done in waiters {
                let _ = done.send(written);
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
                // The rows are written once and not needed after: move them, don't copy.
                let calls: Vec<_> = batch
                    .iter_mut()
                    .flat_map(|p| std::mem::take(&mut p.finished.calls))
                    .collect();
                let tasks: Vec<_> = batch
                    .iter_mut()
                    .filter_map(|p| p.finished.task.take())
                    .collect();
                let written = self
                    .retry("writing the ledger", || ledger.record(&calls, &tasks))
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
        for (keys, items) in by_queue {
            // The concurrency slots of the tasks whose outcomes were applied, freed in one
            // call once the queue's part of the batch is written.
            let mut freed = Vec::new();
            self.write_queue(&keys, items, &mut freed).await;
            if !freed.is_empty() {
                let held: Vec<(&str, &str)> = freed
                    .iter()
                    .map(|(e, k)| (e.as_str(), k.as_str()))
                    .collect();
                // Should this fail, the slots are freed as stale by the next sweep: their
                // entries have left the stream.
                if let Err(e) = self.redis.free_slots(&keys, &held).await {
                    tracing::warn!(queue = keys.name(), "cannot free concurrency slots: {e}");
                }
            }
        }
    }

    /// Writes one queue's part of a batch; adds (entry id, key) of every applied outcome
    /// that held a concurrency slot to `freed`.
    async fn write_queue(
        &self,
        keys: &QueueKeys,
        items: Vec<Pending>,
        freed: &mut Vec<(String, String)>,
    ) {
        let (chained, items): (Vec<_>, Vec<_>) =
            items.into_iter().partition(|p| p.finished.chain.is_some());
        let (steps, others): (Vec<_>, Vec<_>) = chained
            .into_iter()
            .partition(|p| matches!(p.finished.chain, Some(ChainWrite::Step(_))));
        self.write_steps(keys, steps, freed).await;
        for p in others {
            self.write_chain(keys, p, freed).await;
        }
        if items.is_empty() {
            return;
        }
        let mut slots = Vec::with_capacity(items.len());
        let (finishes, waiters): (Vec<_>, Vec<_>) = items
            .into_iter()
            .map(|mut p| {
                slots.push(p.finished.slot.take());
                (p.finished.finish, p.done)
            })
            .unzip();
        let applied = self
            .retry("acknowledging tasks in Redis", || {
                self.redis
                    .finish(keys, &self.consumer, self.result_ttl, &finishes)
            })
            .await;
        let ok = applied.is_some();
        let applied = applied.unwrap_or_default();
        for (i, ((finish, done), slot)) in finishes.iter().zip(waiters).zip(slots).enumerate() {
            let was_applied = applied.get(i).copied().unwrap_or(false);
            if was_applied && let Some(key) = slot {
                freed.push((finish.entry_id.clone(), key));
            }
            if ok {
                count(keys, &finish.kind, was_applied);
            }
            if ok && !was_applied {
                tracing::warn!(
                    task = %finish.task_id,
                    "another worker took this task over; its outcome here was discarded"
                );
            }
            let _ = done.send(was_applied);
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

impl Finisher {
    /// Finishes a batch of chain steps and moves their chains along, in one script.
    async fn write_steps(
        &self,
        keys: &QueueKeys,
        batch: Vec<Pending>,
        freed: &mut Vec<(String, String)>,
    ) {
        if batch.is_empty() {
            return;
        }
        let items: Vec<(
            &llmq_shared::queue::Finish,
            &llmq_shared::queue::StepOutcome,
        )> = batch
            .iter()
            .filter_map(|p| match &p.finished.chain {
                Some(ChainWrite::Step(s)) => Some((&p.finished.finish, s.as_ref())),
                _ => None,
            })
            .collect();
        let applied = self
            .retry("finishing chain steps in Redis", || {
                self.redis
                    .finish_steps(keys, &self.consumer, self.result_ttl, &items)
            })
            .await
            .unwrap_or_default();
        drop(items);
        for (i, p) in batch.into_iter().enumerate() {
            let was_applied = applied.get(i).copied().unwrap_or(false);
            if !applied.is_empty() {
                count(keys, &p.finished.finish.kind, was_applied);
            }
            if was_applied && let Some(key) = p.finished.slot {
                freed.push((p.finished.finish.entry_id.clone(), key));
            }
            if !was_applied {
                tracing::warn!(
                    task = %p.finished.finish.task_id,
                    "another worker took this chain step over; its outcome here was discarded"
                );
            }
            let _ = p.done.send(was_applied);
        }
    }

    /// Writes a chain transition (an expansion, or a step's end with what it unblocks) in
    /// its one script.
    async fn write_chain(&self, keys: &QueueKeys, p: Pending, freed: &mut Vec<(String, String)>) {
        let Pending { finished, done } = p;
        let applied = match &finished.chain {
            Some(ChainWrite::Expand(chain)) => self
                .retry("expanding a chain in Redis", || {
                    self.redis
                        .expand_chain(keys, &self.consumer, &finished.finish.entry_id, chain)
                })
                .await
                .map(|r| r.is_some()),
            Some(ChainWrite::Step(_)) => {
                return self
                    .write_steps(keys, vec![Pending { finished, done }], freed)
                    .await;
            }
            Some(ChainWrite::Await {
                chain_id,
                step,
                deadline_ms,
            }) => {
                self.retry("leaving a chain step to a person in Redis", || {
                    self.redis.await_approval(
                        keys,
                        &self.consumer,
                        self.result_ttl,
                        &finished.finish,
                        chain_id,
                        step,
                        *deadline_ms,
                    )
                })
                .await
            }
            Some(ChainWrite::Rework { chain_id, reruns }) => {
                self.retry("sending a chain's work back in Redis", || {
                    self.redis.rework_step(
                        keys,
                        &self.consumer,
                        self.result_ttl,
                        &finished.finish,
                        chain_id,
                        reruns,
                    )
                })
                .await
            }
            None => Some(false),
        };
        if applied == Some(false) {
            tracing::warn!(
                entry = %finished.finish.entry_id,
                "another worker took this chain entry over; its outcome here was discarded"
            );
        }
        if let (Some(was_applied), Some(ChainWrite::Await { .. } | ChainWrite::Rework { .. })) =
            (applied, &finished.chain)
        {
            count(keys, &finished.finish.kind, was_applied);
        }
        let applied = applied.unwrap_or(false);
        if applied && let Some(key) = finished.slot.clone() {
            freed.push((finished.finish.entry_id.clone(), key));
        }
        let _ = done.send(applied);
    }
}

/// Counts a written outcome in `llmq_tasks_total`, chain steps' as plain tasks'.
fn count(keys: &QueueKeys, kind: &FinishKind, applied: bool) {
    let outcome = match (kind, applied) {
        (_, false) => "fenced",
        (FinishKind::Done, _) => "succeeded",
        (FinishKind::Retry { .. }, _) => "delayed",
        (FinishKind::Dead { .. }, _) => "dead",
        (FinishKind::Release, _) => "released",
    };
    metrics::counter!("llmq_tasks_total", "queue" => keys.name().to_owned(), "outcome" => outcome)
        .increment(1);
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

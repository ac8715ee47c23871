//! The `batches` duty: sends the tasks that wait for a provider batch (`deadline`) in
//! batches, asks the providers about open ones, and settles each task when its batch is
//! over: its answer (billed in the ledger at the batch price) or, when its request did not
//! run or failed, a normal call. A batch still open an hour before a task's deadline is
//! cancelled and its tasks are called as usual; what the provider still answers of it is
//! billed in the ledger all the same, as a call whose answer was not used.
//!
//! Every step is safe to run again after a crash: a batch is recorded before it is sent
//! (`submitting`, sent again by the next run if the provider's id was never recorded), a
//! ledger row is keyed by the batch and the task, and settling skips tasks settled before.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use llmq_shared::config::ProviderConfig;
use llmq_shared::envelope::Envelope;
use llmq_shared::ids::TaskId;
use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::{CallOutcome, CallRow, Ledger};
use llmq_shared::provider::Usage;
use llmq_shared::provider::batch::{BatchClient, Item, Poll};
use llmq_shared::queue::{
    BatchAnswer, BatchRecord, BatchTask, FALLBACK_MARGIN, Named, Settle, Taken, now_ms, why,
};
use uuid::Uuid;

use crate::{Error, Result, Scheduler};

/// Batches made per group per run.
const MAX_BATCHES_PER_RUN: usize = 10;
/// A batch that could not be sent for this long is given up: its tasks are called.
const SEND_FOR: Duration = Duration::from_secs(3600);
/// A given-up batch is asked about for this long after, for what the provider still bills.
const ABANDONED_FOR: Duration = Duration::from_secs(2 * 24 * 3600);

/// The batch clients of the providers with a `batch:` section.
pub(crate) fn clients(config: &llmq_shared::config::Config) -> HashMap<String, BatchClient> {
    config
        .providers
        .iter()
        .filter(|p| p.enabled && p.batch.is_some())
        .filter_map(|p| {
            let http = llmq_shared::provider::clients::http_client(p, 4).ok()?;
            Some((p.name.to_string(), BatchClient::new(p, http)?))
        })
        .collect()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

impl Scheduler {
    /// Sends due batches, asks about open ones and settles those that are over, for every
    /// served queue. Returns what it did.
    ///
    /// # Errors
    /// Redis or Postgres fails, or the lease was lost.
    pub async fn run_batches(&mut self) -> Result<String> {
        let queues = self.served_queues().await?;
        let announce = (self.batches_every * 3).max(Duration::from_secs(30));
        let (mut sent, mut settled) = (0, 0);
        for queue in &queues {
            let keys = QueueKeys::new(queue);
            if !self.batch_clients.is_empty() {
                self.redis
                    .announce_batcher(&keys, self.id(), announce)
                    .await?;
            }
            sent += self.send_waiting(&keys).await?;
            for record in self.redis.open_batches(&keys).await? {
                settled += self.follow(&keys, &record).await?;
            }
        }
        Ok(format!(
            "sent {sent} batch(es); settled {settled} task(s) of {} queue(s)",
            queues.len()
        ))
    }

    /// Takes each group's waiting tasks into batches once the oldest waited its gather time
    /// or a batch is full, and sends them.
    async fn send_waiting(&self, keys: &QueueKeys) -> Result<usize> {
        let mut sent = 0;
        let marks = self.marks(keys).await?;
        for group in self.redis.batch_groups(keys).await? {
            let Some((provider, model)) = group.name.split_once('/') else {
                continue;
            };
            let config = self.config.provider(provider).filter(|p| p.enabled);
            let max_bytes = self
                .batch_clients
                .get(provider)
                .map_or(usize::MAX, BatchClient::max_bytes);
            let (gather, max) = config
                .and_then(|p| p.batch)
                .map_or((Duration::ZERO, 1000), |b| (b.gather, b.max_requests));
            let due = group.waiting >= max as u64 || now_ms() - group.oldest_ms >= ms(gather);
            // A cancelled task waiting in it is taken out now, not at the gather's end: the
            // group is taken, and sending leaves the cancelled out.
            if !due && (marks.is_empty() || !self.names_waiting(keys, &group.name, &marks).await?) {
                continue;
            }
            for _ in 0..MAX_BATCHES_PER_RUN {
                let batch_id = Uuid::new_v4().to_string();
                let taken = self
                    .redis
                    .take_batch(
                        self.lease.proof()?,
                        keys,
                        &group.name,
                        provider,
                        model,
                        &batch_id,
                        max,
                        max_bytes,
                    )
                    .await?
                    .ok_or(Error::NotLeader)?;
                if taken.is_empty() {
                    break;
                }
                let record = BatchRecord {
                    id: batch_id,
                    provider: provider.to_owned(),
                    model: model.to_owned(),
                    created_ms: now_ms(),
                    ..BatchRecord::default()
                };
                self.send(keys, &record, taken).await?;
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// Sends the batch `record` of `taken`: tasks whose deadline is too near, or that the
    /// provider can no longer batch, are handed to calls instead.
    async fn send(&self, keys: &QueueKeys, record: &BatchRecord, taken: Vec<Taken>) -> Result<()> {
        let margin = ms(FALLBACK_MARGIN);
        let now = now_ms();
        let client = self.batch_clients.get(&record.provider);
        let cancelled = {
            let mut with = record.clone();
            with.task_ids = taken.iter().map(|t| t.task_id).collect();
            self.cancelled(keys, &with).await?
        };
        let mut fallback = Vec::new();
        let mut items = Vec::new();
        let mut earliest = i64::MAX;
        for t in taken {
            let body: Option<serde_json::Value> = serde_json::from_str(&t.body).ok();
            if let Some(why) = cancelled.get(&t.task_id) {
                // Taken out of the batch: back to its stream, where a worker ends it so.
                fallback.push((t.task_id, Settle::Cancelled(why.clone())));
                continue;
            }
            let why = if client.is_none() {
                Some(format!(
                    "provider `{}` no longer has a batch section",
                    record.provider
                ))
            } else if body.is_none() {
                Some("its batch request is unreadable".to_owned())
            } else if t.deadline_ms - now < margin {
                Some("its deadline is too near for a batch".to_owned())
            } else {
                None
            };
            match (why, body) {
                (None, Some(body)) => {
                    earliest = earliest.min(t.deadline_ms - margin);
                    items.push(Item {
                        custom_id: t.task_id.to_string(),
                        body,
                    });
                }
                (why, _) => fallback.push((t.task_id, Settle::Fallback(why.unwrap_or_default()))),
            }
        }
        let end = if items.is_empty() { "close" } else { "" };
        self.settle(keys, &record.id, &fallback, end).await?;
        let Some(client) = client.filter(|_| !items.is_empty()) else {
            return Ok(());
        };
        match client.submit(&record.model, &record.id, &items).await {
            Ok(remote) => {
                tracing::info!(
                    batch = record.id,
                    remote,
                    provider = record.provider,
                    model = record.model,
                    tasks = items.len(),
                    "sent a batch"
                );
                if !self
                    .redis
                    .batch_sent(keys, &record.id, &remote, earliest)
                    .await?
                {
                    tracing::warn!(
                        batch = record.id,
                        remote,
                        "a batch was sent twice; the provider's batch {remote} is not followed"
                    );
                }
                Ok(())
            }
            Err(e) if !e.is_retryable() || now_ms() - record.created_ms > ms(SEND_FOR) => {
                tracing::warn!(
                    batch = record.id,
                    "the batch could not be sent; calling its tasks: {e}"
                );
                let why = format!("its batch could not be sent: {e}");
                let all: Vec<_> = items
                    .into_iter()
                    // Each item's custom id is its task's id, as `Taken` gave it.
                    .filter_map(|i| {
                        Some((i.custom_id.parse().ok()?, Settle::Fallback(why.clone())))
                    })
                    .collect();
                self.settle(keys, &record.id, &all, "close").await.map(drop)
            }
            Err(e) => {
                tracing::warn!(
                    batch = record.id,
                    "the batch could not be sent; trying again next run: {e}"
                );
                Ok(())
            }
        }
    }

    /// Asks about one open batch and settles it when it is over (or gives it up when a
    /// deadline is near). Returns how many tasks went back to their stream.
    async fn follow(&self, keys: &QueueKeys, record: &BatchRecord) -> Result<u64> {
        let now = now_ms();
        let Some(remote) = record.remote.as_deref() else {
            // Taken but never recorded as sent: its sender died, before the provider made
            // the batch or after. Found there by its label, it is followed; else sent again.
            if now - record.created_ms > ms(self.batch_resend_after) {
                let taken = self.sent_tasks(keys, record, true).await?;
                if !self.sent_already(keys, record, &taken).await? {
                    self.send(keys, record, taken).await?;
                }
            }
            return Ok(0);
        };
        let abandoned = record.state == "abandoned";
        let Some(client) = self.batch_clients.get(&record.provider) else {
            if abandoned {
                tracing::warn!(
                    batch = record.id,
                    remote,
                    "no longer following a batch whose provider has no batch section"
                );
                self.mark(keys, &record.id, &[]).await?;
                return Ok(0);
            }
            return self
                .give_up(keys, record, "its provider no longer has a batch section")
                .await;
        };
        // Every task it still holds cancelled: the provider's batch is cancelled, and the
        // tasks go back to their stream, where a worker ends them so. (What the provider
        // answered before it stopped is still billed, as for any batch given up.)
        if !abandoned {
            let cancelled = self.cancelled(keys, record).await?;
            if !cancelled.is_empty() {
                let open = self.sent_tasks(keys, record, false).await?;
                let all: Option<Vec<(TaskId, Settle)>> = open
                    .iter()
                    .map(|t| {
                        let why = cancelled.get(&t.task_id)?;
                        Some((t.task_id, Settle::Cancelled(why.clone())))
                    })
                    .collect();
                if let Some(all) = all.filter(|a| !a.is_empty()) {
                    if let Err(e) = client.cancel(&record.model, remote).await {
                        tracing::warn!(batch = record.id, "cannot cancel the batch: {e}");
                    }
                    tracing::info!(batch = record.id, "every task of a batch was cancelled");
                    return self.settle(keys, &record.id, &all, "abandon").await;
                }
            }
        }
        if !abandoned && record.fallback_ms.is_some_and(|f| now >= f) {
            if let Err(e) = client.cancel(&record.model, remote).await {
                tracing::warn!(batch = record.id, "cannot cancel the batch: {e}");
            }
            return self
                .give_up(
                    keys,
                    record,
                    "its batch was not over an hour before the task's deadline",
                )
                .await;
        }
        if record
            .polled_ms
            .is_some_and(|p| now - p < ms(self.batches_every))
        {
            return Ok(0);
        }
        self.mark(keys, &record.id, &[("polled", now.to_string())])
            .await?;
        let given_up_long_ago =
            abandoned && now - record.abandoned_ms.unwrap_or(record.created_ms) > ms(ABANDONED_FOR);
        match client.poll(&record.model, remote).await {
            Ok(Poll::Running) if given_up_long_ago => {
                tracing::warn!(
                    batch = record.id,
                    remote,
                    "no longer following a batch given up two days ago"
                );
                self.mark(keys, &record.id, &[]).await?;
                Ok(0)
            }
            Ok(Poll::Running) => Ok(0),
            Ok(Poll::Ended { results, unrun }) => {
                self.settle_ended(keys, record, results, &unrun).await
            }
            Err(e) if !e.is_retryable() => {
                tracing::warn!(
                    batch = record.id,
                    "the provider cannot say what became of the batch: {e}"
                );
                if abandoned {
                    self.mark(keys, &record.id, &[]).await?;
                    return Ok(0);
                }
                self.give_up(keys, record, &format!("its batch was lost: {e}"))
                    .await
            }
            Err(e) => {
                tracing::warn!(
                    batch = record.id,
                    "cannot ask about the batch; next run: {e}"
                );
                Ok(0)
            }
        }
    }

    /// The tasks of `record` it still holds (not settled), with their requests when `bodies`.
    async fn sent_tasks(
        &self,
        keys: &QueueKeys,
        record: &BatchRecord,
        bodies: bool,
    ) -> Result<Vec<Taken>> {
        Ok(self
            .redis
            .batch_tasks(keys, record, bodies)
            .await?
            .into_iter()
            .filter(|t| t.state == "sent")
            .map(|t| t.taken)
            .collect())
    }

    /// Looks for the batch `record` at its provider by the label it was sent with, and records
    /// it as sent when it is there. Returns whether it was; a provider that cannot be asked
    /// now counts as having it (asked again next run), so a batch is never sent twice on a
    /// guess.
    async fn sent_already(
        &self,
        keys: &QueueKeys,
        record: &BatchRecord,
        taken: &[Taken],
    ) -> Result<bool> {
        let Some(client) = self.batch_clients.get(&record.provider) else {
            return Ok(false);
        };
        match client.find(&record.model, &record.id).await {
            Ok(Some(remote)) => {
                let margin = ms(FALLBACK_MARGIN);
                let earliest = taken
                    .iter()
                    .map(|t| t.deadline_ms - margin)
                    .min()
                    .unwrap_or(i64::MAX);
                tracing::warn!(
                    batch = record.id,
                    remote,
                    provider = record.provider,
                    "a batch whose sender died before recording it was found at the provider; following it"
                );
                self.redis
                    .batch_sent(keys, &record.id, &remote, earliest)
                    .await?;
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) if now_ms() - record.created_ms > ms(SEND_FOR) => {
                tracing::warn!(
                    batch = record.id,
                    "cannot look the unrecorded batch up at its provider; sending it again: {e}"
                );
                Ok(false)
            }
            Err(e) => {
                tracing::warn!(
                    batch = record.id,
                    "cannot look the unrecorded batch up at its provider; asking again next run: {e}"
                );
                Ok(true)
            }
        }
    }

    /// Hands every task still in `record` to a call, keeping the record to read what the
    /// provider still bills.
    async fn give_up(&self, keys: &QueueKeys, record: &BatchRecord, why: &str) -> Result<u64> {
        let tasks: Vec<_> = self
            .sent_tasks(keys, record, false)
            .await?
            .into_iter()
            .map(|t| (t.task_id, Settle::Fallback(why.to_owned())))
            .collect();
        self.settle(keys, &record.id, &tasks, "abandon").await
    }

    /// The queue's cancel marks (most runs, none).
    async fn marks(&self, keys: &QueueKeys) -> Result<HashMap<String, i64>> {
        Ok(self
            .redis
            .cancel_marks(keys, 0)
            .await?
            .into_iter()
            .collect())
    }

    /// Whether a cancel mark names a task waiting in `group`.
    async fn names_waiting(
        &self,
        keys: &QueueKeys,
        group: &str,
        marks: &HashMap<String, i64>,
    ) -> Result<bool> {
        let mut c = self.redis.conn().await?;
        // Each task by when it was parked, which is after it was enqueued.
        let ids: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(keys.batch_waiting(group))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await
            .map_err(llmq_shared::queue::Error::from)?;
        for (id, parked) in ids {
            let Ok(task_id) = id.parse::<TaskId>() else {
                continue;
            };
            let env: Option<String> = redis::cmd("HGET")
                .arg(keys.batch_task(task_id))
                .arg("env")
                .query_async(&mut c)
                .await
                .map_err(llmq_shared::queue::Error::from)?;
            let Some(env) = env.and_then(|e| Envelope::parse(e.as_bytes(), usize::MAX).ok()) else {
                continue;
            };
            if why(marks, Named::of(task_id, &env, parked as i64, false)).is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The tasks of `record` a cancel mark names, with why: read only when the queue has
    /// marks (most runs, none). A parked task counts as enqueued by when the batch was taken.
    async fn cancelled(
        &self,
        keys: &QueueKeys,
        record: &BatchRecord,
    ) -> Result<HashMap<TaskId, String>> {
        let marks = self.marks(keys).await?;
        if marks.is_empty() {
            return Ok(HashMap::new());
        }
        let mut out = HashMap::new();
        for t in self.redis.batch_tasks(keys, record, false).await? {
            let Ok(env) = Envelope::parse(t.envelope.as_bytes(), usize::MAX) else {
                continue;
            };
            let named = Named::of(t.taken.task_id, &env, record.created_ms, false);
            if let Some(why) = why(&marks, named) {
                out.insert(t.taken.task_id, why);
            }
        }
        Ok(out)
    }

    /// Bills what an ended batch answered, then settles its tasks.
    async fn settle_ended(
        &self,
        keys: &QueueKeys,
        record: &BatchRecord,
        results: Vec<(
            String,
            llmq_shared::provider::Result<llmq_shared::provider::Completion>,
        )>,
        unrun: &str,
    ) -> Result<u64> {
        let tasks: HashMap<TaskId, BatchTask> = self
            .redis
            .batch_tasks(keys, record, false)
            .await?
            .into_iter()
            .map(|t| (t.taken.task_id, t))
            .collect();
        let prices = self
            .config
            .provider(&record.provider)
            .and_then(|p: &ProviderConfig| p.model(&record.model))
            .map(|m| m.prices)
            .unwrap_or_default();
        let rows_of = BatchRows {
            delivery: Uuid::parse_str(&record.id).unwrap_or_else(|_| Uuid::new_v4()),
            // Every row of the batch names the same queue, provider, model and scheduler.
            queue: keys.shared_name(),
            provider: record.provider.as_str().into(),
            model: record.model.as_str().into(),
            worker: self.id().into(),
            called_at: Utc
                .timestamp_millis_opt(record.created_ms)
                .single()
                .unwrap_or_else(Utc::now),
            latency_ms: i32::try_from(now_ms() - record.created_ms).unwrap_or(i32::MAX),
            prices,
        };
        let cancelled = self.cancelled(keys, record).await?;
        let mut rows = Vec::new();
        let mut settles = Vec::new();
        let mut answered = HashSet::new();
        for (custom_id, result) in results {
            // Each request was sent with its task's id; any other names no task of it.
            let Ok(task_id) = custom_id.parse::<TaskId>() else {
                continue;
            };
            let Some(t) = tasks.get(&task_id) else {
                continue;
            };
            if !answered.insert(task_id) {
                continue;
            }
            let env = Envelope::parse(t.envelope.as_bytes(), usize::MAX).ok();
            let usage = result.as_ref().map(|c| c.usage).unwrap_or_default();
            let cost = prices.batch().cost(&usage);
            let error = result.as_ref().err();
            rows.push(rows_of.row(task_id.uuid(), env.as_ref(), usage, cost, error));
            if t.state != "sent" {
                continue;
            }
            if let Some(why) = cancelled.get(&task_id) {
                // Billed above; its answer is not used: a worker ends it cancelled.
                settles.push((task_id, Settle::Cancelled(why.clone())));
                continue;
            }
            settles.push((
                task_id,
                match result {
                    Ok(c) => Settle::Answered(Box::new(BatchAnswer {
                        provider: record.provider.clone(),
                        model: record.model.clone(),
                        text: c.text,
                        tool_calls: c.tool_calls,
                        input_tokens: usage.input_tokens,
                        output_tokens: usage.output_tokens,
                        cached_tokens: usage.cached_tokens,
                        reasoning_tokens: usage.reasoning_tokens,
                        cost_usd: cost,
                        batch: record.id.clone(),
                    })),
                    Err(e) => Settle::Fallback(format!("its batch request failed: {e}")),
                },
            ));
        }
        for (id, t) in &tasks {
            if t.state == "sent" && !answered.contains(id) {
                settles.push((*id, Settle::Fallback(unrun.to_owned())));
            }
        }
        Ledger::from_pool(self.pool.clone())
            .record(&rows, &[])
            .await?;
        tracing::info!(
            batch = record.id,
            answered = rows.len(),
            tasks = tasks.len(),
            "a batch is over"
        );
        self.settle(keys, &record.id, &settles, "close").await
    }

    async fn settle(
        &self,
        keys: &QueueKeys,
        batch_id: &str,
        tasks: &[(TaskId, Settle)],
        end: &str,
    ) -> Result<u64> {
        if tasks.is_empty() && end.is_empty() {
            return Ok(0);
        }
        self.redis
            .settle_batch(self.lease.proof()?, keys, batch_id, tasks, end)
            .await?
            .ok_or(Error::NotLeader)
    }

    async fn mark(
        &self,
        keys: &QueueKeys,
        batch_id: &str,
        fields: &[(&str, String)],
    ) -> Result<()> {
        self.redis
            .mark_batch(self.lease.proof()?, keys, batch_id, fields)
            .await?
            .ok_or(Error::NotLeader)
            .map(drop)
    }
}

/// What every ledger row of one provider batch shares.
struct BatchRows {
    delivery: Uuid,
    queue: Arc<str>,
    provider: Arc<str>,
    model: Arc<str>,
    worker: Arc<str>,
    called_at: chrono::DateTime<Utc>,
    latency_ms: i32,
    prices: llmq_shared::config::Prices,
}

impl BatchRows {
    /// The row of one request the batch answered (or failed), costing `cost`.
    fn row(
        &self,
        task_id: Uuid,
        env: Option<&Envelope>,
        usage: Usage,
        cost: f64,
        error: Option<&llmq_shared::provider::Error>,
    ) -> CallRow {
        CallRow {
            task_id,
            delivery: self.delivery,
            run: env.map_or(0, |e| e.replays as i32),
            attempt: env.map_or(1, |e| e.attempts as i32 + 1),
            call_no: 1,
            queue: Arc::clone(&self.queue),
            chain_id: env.and_then(|e| e.chain_id.as_deref().map(Into::into)),
            task_type: env
                .and_then(|e| e.task_type().ok())
                .map_or("", |t| t.as_str())
                .into(),
            provider: Arc::clone(&self.provider),
            model: Arc::clone(&self.model),
            input_tokens: usage.input_tokens as i64,
            output_tokens: usage.output_tokens as i64,
            cached_tokens: usage.cached_tokens as i64,
            cache_write_tokens: usage.cache_write_tokens as i64,
            reasoning_tokens: usage.reasoning_tokens as i64,
            cost_usd: cost,
            latency_ms: self.latency_ms,
            outcome: if error.is_some() {
                CallOutcome::Error
            } else {
                CallOutcome::Ok
            },
            error_class: error.map(|e| e.class.to_string()),
            error: error.map(ToString::to_string),
            worker: Arc::clone(&self.worker),
            called_at: self.called_at,
            // At list prices and as if no prompt cache had been read or written, as a
            // call made at once keeps it.
            list_cost_usd: Some(self.prices.cost(&Usage {
                cached_tokens: 0,
                cache_write_tokens: 0,
                ..usage
            })),
            tenant: env.and_then(|e| e.tenant.as_deref().map(Into::into)),
            tags: env.and_then(Envelope::tags_json),
        }
    }
}

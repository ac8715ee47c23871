//! Tasks that go through a provider's batch API (`deadline`): a worker parks a task to wait
//! for a batch (a [`Write::Park`](super::Write::Park) among its batch of outcomes, as
//! `finish_ops.lua`'s `park` applies it); the scheduler takes waiting tasks into batches,
//! sends them and, when a batch is over, settles each task with its answer or hands it to a
//! normal call ([`Client::settle_batch`]): either way the task goes back to its stream, where
//! a worker finishes it like any task. A task is thus always in one place: the stream, the
//! pending list, waiting for a batch, in a batch, `delayed`, `dead`, or finished.
//!
//! A task's batch hash (`batch:task:<id>`) is a latch: a task that has one is never parked
//! again, so a task that fell back, or whose answer did not do, is called as usual.

use std::sync::LazyLock;

use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};

use super::{Client, Fence, NOT_HOLDER, Result};
use crate::conversation::ToolCall;
use crate::ids::TaskId;
use crate::keys::QueueKeys;
use crate::outcome::Usage;

static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/fence.lua"),
        include_str!("batch_take.lua")
    ))
});
static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/fence.lua"),
        include_str!("lua/batch_back.lua"),
        include_str!("batch_settle.lua")
    ))
});
static SENT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("batch_sent.lua")));
static RESCUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/batch_back.lua"),
        include_str!("batch_rescue.lua")
    ))
});
static MARK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/fence.lua"),
        include_str!("batch_mark.lua")
    ))
});

/// Tasks settled per script call.
const SETTLE_CHUNK: usize = 500;
/// Tasks per group, and batches, one rescue looks at.
const RESCUE_LIMIT: usize = 1000;

/// A batch not over this long before a task's deadline is given up: its tasks are called.
pub const FALLBACK_MARGIN: std::time::Duration = std::time::Duration::from_secs(3600);
/// How long a settled task's batch hash (its latch) lives past the task's deadline.
pub const LATCH_TTL: std::time::Duration = std::time::Duration::from_secs(2 * 24 * 3600);

/// What a task parked to wait for a batch of `group` (`provider/model`) is kept with: its
/// envelope, its request body, its deadline (ms) and its generation (`replays:attempts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPark {
    pub group: String,
    pub envelope: String,
    pub body: String,
    pub deadline_ms: i64,
    pub generation: String,
}

/// A task's place in the batch path, as a worker reads it when the task comes back.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchState {
    /// Never sent to a batch.
    None,
    /// Waiting for a batch or in one: this delivery is a copy.
    Pending,
    /// Answered by a batch, for the delivery whose generation (`replays:attempts`) is `gen`.
    Answered {
        answer: Box<BatchAnswer>,
        generation: String,
    },
    /// Handed to a normal call, or answered for an earlier generation.
    Call,
    /// Taken out of its batch by a cancel, with why: it ends so.
    Cancelled(String),
}

/// A batch's answer to one task, stored in its batch hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchAnswer {
    pub provider: String,
    pub model: String,
    pub text: String,
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    #[serde(default)]
    pub cached_tokens: u64,
    #[serde(default)]
    pub reasoning_tokens: u64,
    /// At the batch price.
    pub cost_usd: f64,
    /// The batch (llmq's id).
    pub batch: String,
}

impl BatchAnswer {
    #[must_use]
    pub fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cached_tokens: self.cached_tokens,
            cache_write_tokens: 0,
            reasoning_tokens: self.reasoning_tokens,
        }
    }
}

/// A task waiting for a batch of one `provider/model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub waiting: u64,
    /// When the longest-waiting task began to wait (ms).
    pub oldest_ms: i64,
}

/// A task taken into a batch, with what sending it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub task_id: TaskId,
    /// Its request; empty where it was not read ([`Client::batch_tasks`] without `bodies`).
    pub body: String,
    pub deadline_ms: i64,
}

/// A task of a batch as [`Client::batch_tasks`] reads it: its state (`sent` until settled)
/// and envelope (what settling writes to the ledger) beside what sending needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchTask {
    pub state: String,
    pub envelope: String,
    pub taken: Taken,
}

/// One batch llmq made, as its record says.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct BatchRecord {
    pub id: String,
    pub provider: String,
    pub model: String,
    /// The provider's id, once sent.
    pub remote: Option<String>,
    pub created_ms: i64,
    pub task_ids: Vec<TaskId>,
    /// `submitting`, `open` or `abandoned` (its tasks fell back; read for what is billed).
    pub state: String,
    /// When its tasks fall back to normal calls if it is not over (ms).
    pub fallback_ms: Option<i64>,
    /// When it was last asked about (ms).
    pub polled_ms: Option<i64>,
    /// When its tasks were handed to calls (ms), for an `abandoned` one.
    pub abandoned_ms: Option<i64>,
}

/// How a task of a batch ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    Answered(Box<BatchAnswer>),
    Fallback(String),
    /// A cancel named it: it ends cancelled, with why.
    Cancelled(String),
}

impl Client {
    /// Where task `task_id` stands in the batch path; with `ask_batcher`, also whether a
    /// scheduler sends this queue's batches (`None` when not asked), in the same round trip.
    ///
    /// # Errors
    /// Redis fails, or the stored answer is unreadable.
    pub async fn batch_state(
        &self,
        keys: &QueueKeys,
        task_id: TaskId,
        ask_batcher: bool,
    ) -> Result<(BatchState, Option<bool>)> {
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(keys.batch_task(task_id))
            .arg("state")
            .arg("gen")
            .arg("answer")
            .arg("reason");
        if ask_batcher {
            pipe.exists(keys.batcher());
        }
        type Latch = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let (latch, batcher): (Latch, Option<bool>) = if ask_batcher {
            let (latch, batcher): (Latch, bool) = pipe.query_async(&mut c).await?;
            (latch, Some(batcher))
        } else {
            let (latch,): (Latch,) = pipe.query_async(&mut c).await?;
            (latch, None)
        };
        let (state, generation, answer, reason) = latch;
        let state = match state.as_deref() {
            None => BatchState::None,
            Some("waiting" | "sent") => BatchState::Pending,
            Some("answered") => match answer {
                Some(a) => BatchState::Answered {
                    answer: Box::new(serde_json::from_str(&a).map_err(|e| {
                        super::Error::Protocol(format!("a stored batch answer: {e}"))
                    })?),
                    generation: generation.unwrap_or_default(),
                },
                None => BatchState::Call,
            },
            Some("cancelled") => BatchState::Cancelled(reason.unwrap_or_default()),
            Some(_) => BatchState::Call,
        };
        Ok((state, batcher))
    }

    /// Says, for `ttl`, that a scheduler sends this queue's batches.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn announce_batcher(
        &self,
        keys: &QueueKeys,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<()> {
        let mut c = self.conn().await?;
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let _: () = c.pset_ex(keys.batcher(), holder, ms).await?;
        Ok(())
    }

    /// The groups with tasks waiting for a batch.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn batch_groups(&self, keys: &QueueKeys) -> Result<Vec<Group>> {
        let mut c = self.conn().await?;
        let names: Vec<String> = c.smembers(keys.batch_groups()).await?;
        let mut groups = Vec::with_capacity(names.len());
        for name in names {
            let waiting_key = keys.batch_waiting(&name);
            let (waiting, oldest): (u64, Vec<(String, f64)>) = redis::pipe()
                .zcard(&waiting_key)
                .zrange_withscores(&waiting_key, 0, 0)
                .query_async(&mut c)
                .await?;
            groups.push(Group {
                name,
                waiting,
                oldest_ms: oldest.first().map_or(0, |(_, s)| *s as i64),
            });
        }
        Ok(groups)
    }

    /// Takes up to `max` of `group`'s waiting tasks, oldest first, and no more than
    /// `max_bytes` of their requests (one at least), into a new batch `batch_id` for
    /// `provider` and `model`; `None` when `fence` no longer holds the lease.
    ///
    /// # Errors
    /// Redis fails.
    #[allow(clippy::too_many_arguments)]
    pub async fn take_batch(
        &self,
        fence: Fence<'_>,
        keys: &QueueKeys,
        group: &str,
        provider: &str,
        model: &str,
        batch_id: &str,
        max: usize,
        max_bytes: usize,
    ) -> Result<Option<Vec<Taken>>> {
        let mut c = self.conn().await?;
        let v: redis::Value = TAKE
            .key(keys.fence())
            .key(keys.batch_waiting(group))
            .key(keys.batch_groups())
            .key(keys.batch(batch_id))
            .key(keys.batches_open())
            .arg(fence.holder)
            .arg(fence.token)
            .arg(group)
            .arg(max)
            .arg(batch_id)
            .arg(super::now_ms())
            .arg(provider)
            .arg(model)
            .arg(keys.batch_task_prefix())
            .arg(max_bytes)
            .invoke_async(&mut c)
            .await?;
        if let redis::Value::Int(NOT_HOLDER) = v {
            return Ok(None);
        }
        let flat: Vec<Option<String>> = redis::from_redis_value(v)
            .map_err(|e| super::Error::Protocol(format!("a batch's tasks: {e}")))?;
        // The ids are the ones tasks were parked under, each a task id.
        let taken = flat
            .chunks_exact(3)
            .map(|f| {
                let id = f[0].as_deref().unwrap_or_default();
                Ok(Taken {
                    task_id: id
                        .parse()
                        .map_err(|e| super::Error::Protocol(format!("a batch's tasks: {e}")))?,
                    body: f[1].clone().unwrap_or_default(),
                    deadline_ms: f[2].as_deref().and_then(|d| d.parse().ok()).unwrap_or(0),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Some(taken))
    }

    /// The tasks of batch `record` that are still its own, with their state, envelope,
    /// deadline and, with `bodies`, their requests (while sent; only a batch sent again needs
    /// them, and a request holds the whole prompt: left in Redis otherwise, the body is
    /// empty).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn batch_tasks(
        &self,
        keys: &QueueKeys,
        record: &BatchRecord,
        bodies: bool,
    ) -> Result<Vec<BatchTask>> {
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        let fields: &[&str] = if bodies {
            &["state", "batch", "env", "deadline", "body"]
        } else {
            &["state", "batch", "env", "deadline"]
        };
        for id in &record.task_ids {
            pipe.cmd("HMGET").arg(keys.batch_task(*id)).arg(fields);
        }
        let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut c).await?;
        let field =
            |f: &[Option<String>], k: usize| f.get(k).cloned().flatten().unwrap_or_default();
        Ok(record
            .task_ids
            .iter()
            .zip(rows)
            .filter(|(_, f)| f.get(1).and_then(Option::as_deref) == Some(record.id.as_str()))
            .map(|(id, f)| BatchTask {
                state: field(&f, 0),
                envelope: field(&f, 2),
                taken: Taken {
                    task_id: *id,
                    body: field(&f, 4),
                    deadline_ms: field(&f, 3).parse().unwrap_or(0),
                },
            })
            .collect())
    }

    /// Every open batch of the queue, oldest first.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn open_batches(&self, keys: &QueueKeys) -> Result<Vec<BatchRecord>> {
        let mut c = self.conn().await?;
        let ids: Vec<String> = c.zrange(keys.batches_open(), 0, -1).await?;
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            let h: std::collections::HashMap<String, String> = c.hgetall(keys.batch(&id)).await?;
            if h.is_empty() {
                continue;
            }
            let num = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok());
            records.push(BatchRecord {
                provider: h.get("provider").cloned().unwrap_or_default(),
                model: h.get("model").cloned().unwrap_or_default(),
                remote: h.get("remote").cloned(),
                created_ms: num("created").unwrap_or(0),
                task_ids: h
                    .get("tasks")
                    // Written from task ids; anything else names no task of it.
                    .map(|t| t.split(',').filter_map(|id| id.parse().ok()).collect())
                    .unwrap_or_default(),
                state: h.get("state").cloned().unwrap_or_default(),
                fallback_ms: num("fallback"),
                polled_ms: num("polled"),
                abandoned_ms: num("abandoned"),
                id,
            });
        }
        Ok(records)
    }

    /// Records that batch `batch_id` was sent: the provider's id for it, and when its tasks
    /// fall back (ms). Not fenced (see `batch_sent.lua`). Returns false when the record is
    /// gone or already has a provider id.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn batch_sent(
        &self,
        keys: &QueueKeys,
        batch_id: &str,
        remote: &str,
        fallback_ms: i64,
    ) -> Result<bool> {
        let mut c = self.conn().await?;
        let r: i64 = SENT
            .key(keys.batch(batch_id))
            .arg(remote)
            .arg(fallback_ms)
            .arg(super::now_ms())
            .invoke_async(&mut c)
            .await?;
        Ok(r == 1)
    }

    /// Sends back to the stream the tasks of `keys`' batches whose deadline is `margin` away
    /// when no scheduler sends this queue's batches (see `batch_rescue.lua`). Returns how many.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn rescue_batched(
        &self,
        keys: &QueueKeys,
        margin: std::time::Duration,
        ttl: std::time::Duration,
    ) -> Result<u64> {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut c = self.conn().await?;
        let n: i64 = RESCUE
            .key(keys.batcher())
            .key(keys.batch_groups())
            .key(keys.batches_open())
            .key(keys.stream())
            .arg(super::now_ms())
            .arg(ms(margin))
            .arg(keys.batch_task_prefix())
            .arg(keys.batch_waiting(""))
            .arg(keys.batch(""))
            .arg(ms(ttl))
            .arg(RESCUE_LIMIT)
            .invoke_async(&mut c)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Records `fields` of batch `batch_id` (none: drops the record); `None` when `fence` no
    /// longer holds the lease, `Some(false)` when there is no such batch.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn mark_batch(
        &self,
        fence: Fence<'_>,
        keys: &QueueKeys,
        batch_id: &str,
        fields: &[(&str, String)],
    ) -> Result<Option<bool>> {
        let mut c = self.conn().await?;
        let mut inv = MARK.prepare_invoke();
        inv.key(keys.fence())
            .key(keys.batch(batch_id))
            .key(keys.batches_open())
            .arg(fence.holder)
            .arg(fence.token)
            .arg(batch_id);
        for (k, v) in fields {
            inv.arg(*k).arg(v);
        }
        let r: i64 = inv.invoke_async(&mut c).await?;
        Ok((r != NOT_HOLDER).then_some(r == 1))
    }

    /// Ends `tasks` of batch `batch_id`: each goes back to the stream with its answer or to
    /// be called as usual. `end`: `close` drops the batch's record, `abandon` keeps it (to
    /// read what the provider still bills), `""` leaves it. Returns how many tasks went back,
    /// or `None` when `fence` no longer holds the lease.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn settle_batch(
        &self,
        fence: Fence<'_>,
        keys: &QueueKeys,
        batch_id: &str,
        tasks: &[(TaskId, Settle)],
        end: &str,
    ) -> Result<Option<u64>> {
        let mut c = self.conn().await?;
        let ttl_ms = u64::try_from(LATCH_TTL.as_millis()).unwrap_or(u64::MAX);
        let mut moved = 0;
        let chunks: Vec<&[(TaskId, Settle)]> = if tasks.is_empty() {
            vec![&[]]
        } else {
            tasks.chunks(SETTLE_CHUNK).collect()
        };
        let last = chunks.len() - 1;
        for (k, chunk) in chunks.into_iter().enumerate() {
            let mut inv = SETTLE.prepare_invoke();
            inv.key(keys.fence())
                .key(keys.stream())
                .key(keys.batch(batch_id))
                .key(keys.batches_open())
                .arg(fence.holder)
                .arg(fence.token)
                .arg(batch_id)
                .arg(ttl_ms)
                .arg(keys.batch_task_prefix())
                .arg(if k == last { end } else { "" })
                .arg(super::now_ms());
            for (id, settle) in chunk {
                inv.arg(id);
                match settle {
                    Settle::Answered(a) => inv
                        .arg("answered")
                        .arg(serde_json::to_string(a).unwrap_or_default()),
                    Settle::Fallback(why) => inv.arg("fallback").arg(why),
                    Settle::Cancelled(why) => inv.arg("cancelled").arg(why),
                };
            }
            let n: i64 = inv.invoke_async(&mut c).await?;
            if n == NOT_HOLDER {
                return Ok(None);
            }
            moved += u64::try_from(n).unwrap_or(0);
        }
        Ok(Some(moved))
    }
}

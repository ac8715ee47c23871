//! The Redis side of llmq: enqueueing, reading, finishing, reclaiming, dead letters.
//!
//! Every state change that touches more than one key is one Lua script, so a task is always
//! in exactly one place: the stream, the group's pending list, `delayed`, `dead`, or finished
//! with a result. Key names come from [`crate::keys`].

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use tokio::sync::OnceCell;

use crate::envelope::{self, Envelope};
use crate::keys::{GROUP, QUEUES, QueueKeys, TASK_FIELD};
use crate::outcome::{ErrorClass, Status, TaskRecord};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach Redis ({0}); start Redis or set REDIS_URL to where it runs")]
    Connect(String),
    #[error("Redis answered with an error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis answered in an unexpected shape: {0}")]
    Protocol(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A task as read from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub entry_id: String,
    /// The `task` field; `None` when the entry has no such field.
    pub payload: Option<Vec<u8>>,
    /// How many times the group has handed this entry out, this time included.
    pub deliveries: u64,
}

/// What to do with a task that a worker is done with.
#[derive(Debug, Clone, PartialEq)]
pub enum FinishKind {
    /// Store the record; the task is finished.
    Done,
    /// Put the envelope in `delayed` until `due_ms` (a retry, a rate-limit wait or a `run_at`).
    Retry { due_ms: i64 },
    /// Move the envelope to the dead letters.
    Dead { error: String, class: ErrorClass },
    /// Give the task back to the stream untouched (shutdown).
    Release,
}

/// One item of a [`Client::finish`] batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub entry_id: String,
    pub task_id: String,
    pub kind: FinishKind,
    /// The record to store at `result:<task_id>`, if any.
    pub record: Option<TaskRecord>,
    /// The envelope (or raw payload) to carry to `delayed`, `dead` or the stream.
    pub envelope: String,
}

/// Per-queue counts for `llmq status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueCounts {
    pub queue: String,
    pub ready: u64,
    pub in_flight: u64,
    pub delayed: u64,
    pub dead: u64,
    pub workers: u64,
}

/// A dead letter as `llmq dlq` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeadLetter {
    /// The entry id in the dead stream.
    pub id: String,
    pub task_id: String,
    pub queue: String,
    pub error: String,
    pub class: String,
    pub attempts: u64,
    pub failed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The envelope as it was when the task died (or the raw payload if it was not JSON).
    pub task: String,
}

/// A worker is live while its heartbeat is younger than this.
pub const WORKER_LIVENESS: Duration = Duration::from_secs(15);

struct Scripts {
    finish: Script,
    reclaim: Script,
    promote: Script,
    refresh: Script,
    replay: Script,
}

/// A Redis client speaking the llmq contract.
///
/// Commands share one multiplexed, self-reconnecting connection: Redis answers them in
/// order on one socket, so concurrent callers pipeline for free. Blocking reads get a
/// connection of their own ([`Client::blocking_conn`]).
#[derive(Clone)]
pub struct Client {
    client: redis::Client,
    shared: std::sync::Arc<OnceCell<ConnectionManager>>,
    scripts: std::sync::Arc<Scripts>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

/// How long a command may take before the connection is considered broken. Scripts that
/// finish a large batch on a loaded server can take a while; a hung server must not hang
/// a worker forever.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    /// A client for `url` (`redis://host:port/db`). Connects lazily.
    ///
    /// # Errors
    /// The URL cannot be parsed.
    pub fn new(url: &str) -> Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::Connect(format!("bad REDIS_URL `{url}`: {e}")))?;
        Ok(Self {
            client,
            shared: std::sync::Arc::new(OnceCell::new()),
            scripts: std::sync::Arc::new(Scripts {
                finish: Script::new(include_str!("finish.lua")),
                reclaim: Script::new(include_str!("reclaim.lua")),
                promote: Script::new(include_str!("promote.lua")),
                refresh: Script::new(include_str!("refresh.lua")),
                replay: Script::new(include_str!("replay.lua")),
            }),
        })
    }

    fn config(response_timeout: Option<Duration>) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(response_timeout)
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2))
    }

    /// The shared connection.
    ///
    /// # Errors
    /// Redis cannot be reached.
    pub async fn conn(&self) -> Result<ConnectionManager> {
        self.shared
            .get_or_try_init(|| {
                ConnectionManager::new_with_config(
                    self.client.clone(),
                    Self::config(Some(RESPONSE_TIMEOUT)),
                )
            })
            .await
            .cloned()
            .map_err(|e| Error::Connect(e.to_string()))
    }

    /// A connection of its own for blocking reads, which would stall everyone else's
    /// commands on the shared one.
    ///
    /// # Errors
    /// Redis cannot be reached.
    pub async fn blocking_conn(&self) -> Result<ConnectionManager> {
        ConnectionManager::new_with_config(self.client.clone(), Self::config(None))
            .await
            .map_err(|e| Error::Connect(e.to_string()))
    }

    /// Checks that Redis answers.
    ///
    /// # Errors
    /// Redis cannot be reached.
    pub async fn ping(&self) -> Result<()> {
        let mut c = self.conn().await?;
        redis::cmd("PING").query_async::<()>(&mut c).await?;
        Ok(())
    }

    /// Creates the consumer group if it does not exist (reading from the start, so tasks
    /// enqueued before any worker ran are not skipped).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn ensure_group(&self, keys: &QueueKeys) -> Result<()> {
        let mut c = self.conn().await?;
        let r: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys.stream())
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await;
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => Ok(other?),
        }
    }

    /// Enqueues one task: into the stream, or into `delayed` when its `run_at` is ahead.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn enqueue(&self, keys: &QueueKeys, env: &Envelope) -> Result<()> {
        self.enqueue_many(keys, std::slice::from_ref(env)).await
    }

    /// Enqueues many tasks in one pipelined round trip.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn enqueue_many(&self, keys: &QueueKeys, envs: &[Envelope]) -> Result<()> {
        let now = now_ms();
        let mut pipe = redis::pipe();
        for env in envs {
            let json = env.to_json();
            match env.run_at.map(|t| t.timestamp_millis()) {
                Some(due) if due > now => pipe.zadd(keys.delayed(), json, due).ignore(),
                _ => pipe
                    .cmd("XADD")
                    .arg(keys.stream())
                    .arg("*")
                    .arg(TASK_FIELD)
                    .arg(json)
                    .ignore(),
            };
        }
        let mut c = self.conn().await?;
        pipe.query_async::<()>(&mut c).await?;
        Ok(())
    }

    /// Reads up to `count` new tasks for `consumer`, waiting up to `block` for the first
    /// (`None`: not at all). A blocking read needs a [`Client::blocking_conn`].
    ///
    /// # Errors
    /// Redis fails; a missing group is created and the read retried once.
    pub async fn read(
        &self,
        conn: &mut ConnectionManager,
        keys: &QueueKeys,
        consumer: &str,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Delivery>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(block) = block {
            // BLOCK 0 would wait forever.
            cmd.arg("BLOCK").arg((block.as_millis() as u64).max(1));
        }
        cmd.arg("STREAMS").arg(keys.stream()).arg(">");
        let reply: Value = match cmd.query_async(conn).await {
            Err(e) if e.code() == Some("NOGROUP") => {
                self.ensure_group(keys).await?;
                cmd.query_async(conn).await?
            }
            other => other?,
        };
        parse_read_reply(reply)
    }

    /// Takes over up to `count` entries idle longer than `min_idle`. Entries delivered more
    /// than `max_deliveries` times go to the dead letters instead, with a `dead` record kept
    /// for `result_ttl`.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn reclaim(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        min_idle: Duration,
        count: usize,
        max_deliveries: u64,
        result_ttl: Duration,
    ) -> Result<Vec<Delivery>> {
        let mut c = self.conn().await?;
        let (claimed, poisoned): (Vec<Value>, Vec<Value>) = self
            .scripts
            .reclaim
            .key(keys.stream())
            .key(keys.dead())
            .arg(GROUP)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(count)
            .arg(max_deliveries)
            .arg(now_ms())
            .arg(POISON_REASON)
            .invoke_async(&mut c)
            .await?;
        let deliveries = claimed
            .chunks(3)
            .map(|chunk| match chunk {
                [id, deliveries, payload] => Ok(Delivery {
                    entry_id: as_string(id)?,
                    deliveries: as_u64(deliveries).max(1),
                    payload: match payload {
                        Value::BulkString(b) => Some(b.clone()),
                        _ => None,
                    },
                }),
                _ => Err(Error::Protocol("reclaim returned a partial entry".into())),
            })
            .collect::<Result<Vec<_>>>()?;
        if !poisoned.is_empty() {
            let mut pipe = redis::pipe();
            for chunk in poisoned.chunks(3) {
                let [id, deliveries, payload] = chunk else {
                    return Err(Error::Protocol(
                        "reclaim returned a partial poison entry".into(),
                    ));
                };
                let payload = match payload {
                    Value::BulkString(b) => b.as_slice(),
                    _ => &[],
                };
                let task_id =
                    envelope::task_id_of(keys.name(), &as_string(id)?, payload).to_string();
                let mut record = TaskRecord::pending(&task_id, keys.name(), Status::Dead);
                record.error = Some(poison_reason(as_u64(deliveries)));
                record.error_class = Some(ErrorClass::Poison);
                record.finished_at = Some(chrono::Utc::now());
                pipe.cmd("SET")
                    .arg(keys.result(&task_id))
                    .arg(record.to_json())
                    .arg("EX")
                    .arg(result_ttl.as_secs().max(1))
                    .ignore();
            }
            pipe.query_async::<()>(&mut c).await?;
        }
        Ok(deliveries)
    }

    /// Moves up to `limit` due delayed tasks to the stream. Returns how many moved and when
    /// the next one is due (ms since the epoch).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn promote(&self, keys: &QueueKeys, limit: usize) -> Result<(u64, Option<i64>)> {
        let mut c = self.conn().await?;
        let (moved, next): (u64, i64) = self
            .scripts
            .promote
            .key(keys.delayed())
            .key(keys.stream())
            .arg(now_ms())
            .arg(limit)
            .invoke_async(&mut c)
            .await?;
        Ok((moved, (next >= 0).then_some(next)))
    }

    /// Resets the idle time of entries `consumer` still holds. Returns how many it held.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn refresh(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        entry_ids: &[String],
    ) -> Result<u64> {
        if entry_ids.is_empty() {
            return Ok(0);
        }
        let mut c = self.conn().await?;
        let mut inv = self.scripts.refresh.key(keys.stream());
        inv.arg(GROUP).arg(consumer).arg(entry_ids);
        Ok(inv.invoke_async(&mut c).await?)
    }

    /// Applies a batch of outcomes in one script. Returns, per item, whether it was applied
    /// (`false`: the entry was no longer ours, so nothing was written).
    ///
    /// # Errors
    /// Redis fails; then nothing of the batch was applied.
    pub async fn finish(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        result_ttl: Duration,
        items: &[Finish],
    ) -> Result<Vec<bool>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.scripts.finish.key(keys.stream());
        inv.key(keys.delayed()).key(keys.dead());
        for item in items {
            inv.key(keys.result(&item.task_id));
        }
        let order = |id: &str| {
            let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
            (
                ms.parse::<u64>().unwrap_or(0),
                seq.parse::<u64>().unwrap_or(0),
            )
        };
        let lowest = items
            .iter()
            .map(|i| i.entry_id.as_str())
            .min_by_key(|id| order(id))
            .unwrap_or("-");
        let highest = items
            .iter()
            .map(|i| i.entry_id.as_str())
            .max_by_key(|id| order(id))
            .unwrap_or("+");
        inv.arg(GROUP)
            .arg(consumer)
            .arg(result_ttl.as_secs().max(1))
            .arg(now_ms())
            .arg(lowest)
            .arg(highest);
        for item in items {
            let (kind, a, b) = match &item.kind {
                FinishKind::Done => ("ok", String::new(), String::new()),
                FinishKind::Retry { due_ms } => ("retry", due_ms.to_string(), String::new()),
                FinishKind::Dead { error, class } => ("dead", error.clone(), class.to_string()),
                FinishKind::Release => ("release", String::new(), String::new()),
            };
            inv.arg(&item.entry_id)
                .arg(kind)
                .arg(
                    item.record
                        .as_ref()
                        .map(TaskRecord::to_json)
                        .unwrap_or_default(),
                )
                .arg(&item.envelope)
                .arg(a)
                .arg(b);
        }
        let mut c = self.conn().await?;
        let applied: Vec<i64> = inv.invoke_async(&mut c).await?;
        Ok(applied.into_iter().map(|a| a == 1).collect())
    }

    /// Records that `worker` serves `queues` (for `llmq status`) and drops workers silent for
    /// an hour.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn heartbeat(&self, worker: &str, queues: &[QueueKeys]) -> Result<()> {
        let now = now_ms();
        let mut pipe = redis::pipe();
        for keys in queues {
            pipe.sadd(QUEUES, keys.name()).ignore();
            pipe.zadd(keys.workers(), worker, now).ignore();
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(keys.workers())
                .arg("-inf")
                .arg(now - 3_600_000)
                .ignore();
        }
        let mut c = self.conn().await?;
        pipe.query_async::<()>(&mut c).await?;
        Ok(())
    }

    /// Removes `worker` from the live workers (on a clean shutdown).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn leave(&self, worker: &str, queues: &[QueueKeys]) -> Result<()> {
        let mut pipe = redis::pipe();
        for keys in queues {
            pipe.zrem(keys.workers(), worker).ignore();
        }
        let mut c = self.conn().await?;
        pipe.query_async::<()>(&mut c).await?;
        Ok(())
    }

    /// Every queue a worker has served.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn known_queues(&self) -> Result<Vec<String>> {
        let mut c = self.conn().await?;
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(QUEUES)
            .query_async(&mut c)
            .await?;
        names.sort();
        Ok(names)
    }

    /// Counts of one queue.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn counts(&self, keys: &QueueKeys) -> Result<QueueCounts> {
        let mut c = self.conn().await?;
        let live_since = now_ms() - WORKER_LIVENESS.as_millis() as i64;
        let (len, delayed, dead, workers): (u64, u64, u64, u64) = redis::pipe()
            .cmd("XLEN")
            .arg(keys.stream())
            .zcard(keys.delayed())
            .cmd("XLEN")
            .arg(keys.dead())
            .zcount(keys.workers(), live_since, "+inf")
            .query_async(&mut c)
            .await?;
        let pending: Value = match redis::cmd("XPENDING")
            .arg(keys.stream())
            .arg(GROUP)
            .query_async(&mut c)
            .await
        {
            Err(e) if e.code() == Some("NOGROUP") => Value::Nil,
            other => other?,
        };
        let in_flight = match pending {
            Value::Array(parts) => parts.first().map_or(0, as_u64),
            _ => 0,
        };
        // Acked entries are deleted at once, so the stream holds exactly the ready tasks and
        // the ones in flight.
        Ok(QueueCounts {
            queue: keys.name().to_owned(),
            ready: len.saturating_sub(in_flight),
            in_flight,
            delayed,
            dead,
            workers,
        })
    }

    /// The stored record of a task, or where it is now if it has none yet.
    ///
    /// Finished, delayed and dead tasks are one lookup; a task still in the stream is found
    /// by scanning it, which is fine for an operator's command.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn task(&self, keys: &QueueKeys, task_id: &str) -> Result<Option<TaskRecord>> {
        let stored = self
            .results(keys, &[task_id.to_owned()])
            .await?
            .pop()
            .flatten();
        if let Some(record) = stored.as_ref().filter(|r| r.status.is_final()) {
            return Ok(Some(record.clone()));
        }
        // A record of a retry says `delayed`; where the task is now decides, and the record
        // keeps its last error and attempts.
        let now = |status: Status| {
            let mut r = stored
                .clone()
                .unwrap_or_else(|| TaskRecord::pending(task_id, keys.name(), status));
            r.status = status;
            Ok(Some(r))
        };
        let mut c = self.conn().await?;
        // Any JSON spacing; the id itself is unique enough.
        let pattern = format!("*{task_id}*");
        let mut cursor = 0u64;
        loop {
            let (next, hits): (u64, Vec<String>) = redis::cmd("ZSCAN")
                .arg(keys.delayed())
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            if !hits.is_empty() {
                return now(Status::Delayed);
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut start = "-".to_owned();
        loop {
            let page = self.range(&mut c, &keys.stream(), &start, 1000).await?;
            for (entry_id, fields) in &page {
                if entry_matches(keys.name(), entry_id, fields, task_id) {
                    let held: Value = redis::cmd("XPENDING")
                        .arg(keys.stream())
                        .arg(GROUP)
                        .arg(entry_id)
                        .arg(entry_id)
                        .arg(1)
                        .query_async(&mut c)
                        .await
                        .unwrap_or(Value::Nil);
                    let running = matches!(held, Value::Array(ref v) if !v.is_empty());
                    let status = if running {
                        Status::Running
                    } else {
                        Status::Queued
                    };
                    return now(status);
                }
            }
            match page.last() {
                Some((last, _)) if page.len() == 1000 => start = format!("({last}"),
                _ => break,
            }
        }
        Ok(self
            .dead_letters(keys, usize::MAX)
            .await?
            .into_iter()
            .find(|d| d.task_id == task_id)
            .map(|d| {
                let mut r = TaskRecord::pending(task_id, keys.name(), Status::Dead);
                r.error = Some(d.error);
                r.error_class = d.class.parse().ok();
                r.attempts = u32::try_from(d.attempts).unwrap_or(u32::MAX);
                r
            })
            // Between two places (e.g. being promoted) while we looked: the record stands.
            .or(stored))
    }

    /// The stored records of `task_ids`, in order (`None` where there is none yet), in one
    /// round trip: what `--wait` polls.
    ///
    /// # Errors
    /// Redis fails, or a stored record is not one.
    pub async fn results(
        &self,
        keys: &QueueKeys,
        task_ids: &[String],
    ) -> Result<Vec<Option<TaskRecord>>> {
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        let mut cmd = redis::cmd("MGET");
        for id in task_ids {
            cmd.arg(keys.result(id));
        }
        let stored: Vec<Option<String>> = cmd.query_async(&mut c).await?;
        stored
            .into_iter()
            .zip(task_ids)
            .map(|(json, id)| {
                json.map(|j| {
                    serde_json::from_str(&j).map_err(|e| {
                        Error::Protocol(format!("the stored result of {id} is not a record: {e}"))
                    })
                })
                .transpose()
            })
            .collect()
    }

    /// The dead letters of a queue, newest first, at most `limit`.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn dead_letters(&self, keys: &QueueKeys, limit: usize) -> Result<Vec<DeadLetter>> {
        let mut c = self.conn().await?;
        let mut out = Vec::new();
        let mut end = "+".to_owned();
        while out.len() < limit {
            let page: Value = redis::cmd("XREVRANGE")
                .arg(keys.dead())
                .arg(&end)
                .arg("-")
                .arg("COUNT")
                .arg(500.min(limit - out.len()))
                .query_async(&mut c)
                .await?;
            let entries = parse_entries(page)?;
            let full = entries.len() == 500.min(limit - out.len());
            let Some((last, _)) = entries.last() else {
                break;
            };
            end = format!("({last}");
            out.extend(
                entries
                    .into_iter()
                    .map(|(id, f)| dead_letter(keys.name(), id, &f)),
            );
            if !full {
                break;
            }
        }
        Ok(out)
    }

    /// Up to `count` dead letters oldest first, starting after dead-entry id `after` (from
    /// the beginning when `None`).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn oldest_dead_letters(
        &self,
        keys: &QueueKeys,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<DeadLetter>> {
        let mut c = self.conn().await?;
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let page = self.range(&mut c, &keys.dead(), &start, count).await?;
        Ok(page
            .into_iter()
            .map(|(id, f)| dead_letter(keys.name(), id, &f))
            .collect())
    }

    /// Finds dead letters by dead-entry id or task id.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn find_dead(&self, keys: &QueueKeys, ids: &[String]) -> Result<Vec<DeadLetter>> {
        Ok(self
            .dead_letters(keys, usize::MAX)
            .await?
            .into_iter()
            .filter(|d| ids.iter().any(|id| *id == d.id || *id == d.task_id))
            .collect())
    }

    /// Re-enqueues a dead letter with its attempts reset (and, if given, a new provider),
    /// removing it from the dead letters in the same step. Returns false if it was gone.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn replay(
        &self,
        keys: &QueueKeys,
        dead: &DeadLetter,
        provider: Option<&str>,
    ) -> Result<bool> {
        let task = replayed_task(dead, provider);
        let mut c = self.conn().await?;
        let replayed: i64 = self
            .scripts
            .replay
            .key(keys.dead())
            .key(keys.stream())
            .key(keys.result(&dead.task_id))
            .arg(&dead.id)
            .arg(task)
            .invoke_async(&mut c)
            .await?;
        Ok(replayed == 1)
    }

    /// Deletes dead letters. Their stored records, if any, turn from `dead` to `failed`.
    /// Returns how many were deleted.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn purge(&self, keys: &QueueKeys, dead: &[DeadLetter]) -> Result<u64> {
        let mut c = self.conn().await?;
        let mut deleted = 0;
        for d in dead {
            let n: u64 = redis::cmd("XDEL")
                .arg(keys.dead())
                .arg(&d.id)
                .query_async(&mut c)
                .await?;
            deleted += n;
            let stored: Option<String> = redis::cmd("GET")
                .arg(keys.result(&d.task_id))
                .query_async(&mut c)
                .await?;
            if let Some(mut record) =
                stored.and_then(|s| serde_json::from_str::<TaskRecord>(&s).ok())
            {
                record.status = Status::Failed;
                redis::cmd("SET")
                    .arg(keys.result(&d.task_id))
                    .arg(record.to_json())
                    .arg("KEEPTTL")
                    .query_async::<()>(&mut c)
                    .await?;
            }
        }
        Ok(deleted)
    }

    async fn range(
        &self,
        c: &mut ConnectionManager,
        key: &str,
        start: &str,
        count: usize,
    ) -> Result<Vec<Entry>> {
        let page: Value = redis::cmd("XRANGE")
            .arg(key)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(c)
            .await?;
        parse_entries(page)
    }
}

/// The end of a poison task's reason; the reclaim script writes it into the dead letter.
const POISON_REASON: &str =
    " times without finishing; a worker probably crashed or was killed while running it";

fn poison_reason(deliveries: u64) -> String {
    format!("the task was delivered {deliveries}{POISON_REASON}")
}

/// What a replay enqueues: the dead letter's envelope with attempts reset, one more replay
/// and, if given, a new provider; a payload that is not an envelope as it came (e.g. to
/// replay it after raising the size limit).
#[must_use]
pub fn replayed_task(dead: &DeadLetter, provider: Option<&str>) -> String {
    match serde_json::from_str::<Envelope>(&dead.task) {
        Ok(mut env) => {
            env.attempts = 0;
            env.snoozes = 0;
            env.replays += 1;
            env.last_error = None;
            if env.id.is_none() {
                env.id = uuid::Uuid::parse_str(&dead.task_id).ok();
            }
            if let Some(p) = provider {
                env.provider = Some(p.to_owned());
            }
            env.to_json()
        }
        Err(_) => dead.task.clone(),
    }
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn entry_matches(
    queue: &str,
    entry_id: &str,
    fields: &HashMap<String, Vec<u8>>,
    task_id: &str,
) -> bool {
    let payload = fields.get(TASK_FIELD).map_or(&[][..], Vec::as_slice);
    envelope::task_id_of(queue, entry_id, payload).to_string() == task_id
}

fn dead_letter(queue: &str, id: String, f: &HashMap<String, Vec<u8>>) -> DeadLetter {
    let text = |k: &str| {
        f.get(k)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let task = text(TASK_FIELD);
    let task_id = envelope::task_id_of(queue, &text("entry_id"), task.as_bytes()).to_string();
    DeadLetter {
        task_id,
        queue: queue.to_owned(),
        error: text("error"),
        class: text("class"),
        attempts: text("attempts").parse().unwrap_or(0),
        failed_at: text("failed_at")
            .parse::<i64>()
            .ok()
            .and_then(chrono::DateTime::from_timestamp_millis),
        task,
        id,
    }
}

fn as_string(v: &Value) -> Result<String> {
    match v {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        other => Err(Error::Protocol(format!("expected a string, got {other:?}"))),
    }
}

fn as_u64(v: &Value) -> u64 {
    match v {
        Value::Int(n) => u64::try_from(*n).unwrap_or(0),
        Value::BulkString(b) => String::from_utf8_lossy(b).parse().unwrap_or(0),
        _ => 0,
    }
}

/// A stream entry: its id and fields.
type Entry = (String, HashMap<String, Vec<u8>>);

/// `[[id, [field, value, ...]], ...]` into ids and field maps.
fn parse_entries(v: Value) -> Result<Vec<Entry>> {
    let Value::Array(entries) = v else {
        return Ok(Vec::new());
    };
    entries
        .into_iter()
        .map(|e| {
            let Value::Array(mut parts) = e else {
                return Err(Error::Protocol("a stream entry is not an array".into()));
            };
            if parts.len() != 2 {
                return Err(Error::Protocol("a stream entry is not [id, fields]".into()));
            }
            let fields = parts.pop().unwrap_or(Value::Nil);
            let id = as_string(&parts[0])?;
            let mut map = HashMap::new();
            if let Value::Array(kv) = fields {
                let mut it = kv.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    if let (Ok(k), Value::BulkString(v)) = (as_string(&k), v) {
                        map.insert(k, v);
                    }
                }
            }
            Ok((id, map))
        })
        .collect()
}

/// XREADGROUP's `[[stream, entries]]` (RESP2) or `{stream: entries}` (RESP3).
fn parse_read_reply(reply: Value) -> Result<Vec<Delivery>> {
    let entries = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(mut streams) => match streams.pop() {
            Some(Value::Array(mut pair)) if pair.len() == 2 => pair.pop().unwrap_or(Value::Nil),
            _ => return Ok(Vec::new()),
        },
        Value::Map(mut streams) => streams.pop().map_or(Value::Nil, |(_, v)| v),
        other => return Err(Error::Protocol(format!("XREADGROUP returned {other:?}"))),
    };
    Ok(parse_entries(entries)?
        .into_iter()
        .map(|(entry_id, mut fields)| Delivery {
            entry_id,
            payload: fields.remove(TASK_FIELD),
            deliveries: 1,
        })
        .collect())
}

//! The fleet as operators see it: what each worker process says of itself at every heartbeat,
//! the tasks it holds now, and draining one (it takes nothing new and finishes what it holds).

use redis::Value;

use super::{Client, Paused, Result, WORKER_LIVENESS, now_ms, reply};
use crate::envelope;
use crate::ids::{EntryId, TaskId};
use crate::keys::{self, GROUP, QueueKeys};

/// How long a worker's record outlives its last heartbeat: a silent worker stays on the
/// page for this long (or until its tasks are taken over), then is forgotten.
const KEPT_MS: i64 = 3_600_000;

/// How long a drain asked of a worker stands unless resumed (a worker that never comes back
/// leaves no mark for longer).
const DRAIN_TTL_S: u64 = 7 * 86_400;

/// What a worker process says of itself at every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    pub host: String,
    pub queues: Vec<String>,
    pub version: String,
    /// Tasks it may hold at once.
    pub concurrency: u64,
    /// When it started (ms since the epoch).
    pub started_ms: i64,
    /// Tasks it holds now.
    pub busy: u64,
    /// Provider calls under way now.
    pub calls: u64,
    /// Whether it has taken note of a drain: it reads nothing new.
    pub draining: bool,
}

/// One worker as the fleet's registry holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SeenWorker {
    pub id: String,
    /// Its last heartbeat (ms since the epoch).
    pub beat_ms: i64,
    /// Beating within [`WORKER_LIVENESS`].
    pub live: bool,
    /// What it said last; `None` once that lapsed.
    pub info: Option<WorkerInfo>,
    /// The drain asked of it, if any.
    pub drain: Option<Paused>,
}

/// A task a worker holds now: its stream entry, who, for how long, how often delivered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeldTask {
    pub queue: String,
    /// The worker (consumer) holding it.
    pub worker: String,
    pub entry_id: String,
    /// `None` when the entry is gone (acknowledged meanwhile).
    pub task_id: Option<TaskId>,
    pub task_type: Option<String>,
    /// Since it was read or its claim last refreshed.
    pub idle_ms: u64,
    pub deliveries: u64,
}

impl Client {
    /// Records what `info` says of its worker, and returns the drain asked of it, if any:
    /// one round trip, a command per key, every key in the `{workers}` slot.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn announce(&self, info: &WorkerInfo) -> Result<Option<Paused>> {
        let now = now_ms();
        let json = serde_json::to_string(info).unwrap_or_default();
        let mut c = self.conn().await?;
        let (drain,): (Option<String>,) = redis::pipe()
            .cmd("SET")
            .arg(keys::worker_info(&info.id))
            .arg(json)
            .arg("PX")
            .arg(KEPT_MS)
            .ignore()
            .zadd(keys::WORKERS, &info.id, now)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(keys::WORKERS)
            .arg("-inf")
            .arg(now - KEPT_MS)
            .ignore()
            .get(keys::worker_drain(&info.id))
            .query_async(&mut c)
            .await?;
        Ok(drain.and_then(|d| serde_json::from_str(&d).ok()))
    }

    /// Takes worker `id` out of the fleet's registry (on a clean shutdown).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn forget_worker(&self, id: &str) -> Result<()> {
        let mut c = self.conn().await?;
        let () = redis::pipe()
            .zrem(keys::WORKERS, id)
            .ignore()
            .del(keys::worker_info(id))
            .ignore()
            .del(keys::worker_drain(id))
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Every worker heard from within the hour, the latest beat first (at most 1,000).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn fleet(&self) -> Result<Vec<SeenWorker>> {
        let now = now_ms();
        let live_since = now - i64::try_from(WORKER_LIVENESS.as_millis()).unwrap_or(i64::MAX);
        let mut c = self.conn().await?;
        let ids: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(keys::WORKERS)
            .arg("+inf")
            .arg(now - KEPT_MS)
            .arg("BYSCORE")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(1000)
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (id, _) in &ids {
            pipe.get(keys::worker_info(id)).get(keys::worker_drain(id));
        }
        let found: Vec<Option<String>> = pipe.query_async(&mut c).await?;
        Ok(ids
            .into_iter()
            .zip(found.chunks(2))
            .map(|((id, beat), pair)| {
                let read = |i: usize| pair.get(i).cloned().flatten();
                #[allow(clippy::cast_possible_truncation)]
                let beat_ms = beat as i64;
                SeenWorker {
                    live: beat_ms >= live_since,
                    info: read(0).and_then(|j| serde_json::from_str(&j).ok()),
                    drain: read(1).and_then(|j| serde_json::from_str(&j).ok()),
                    id,
                    beat_ms,
                }
            })
            .collect())
    }

    /// Asks worker `id` to drain (`drain`) or to take work again; `false` when no worker of
    /// that id was heard from within the hour (nothing is marked then).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn drain_worker(&self, id: &str, by: &str, drain: bool) -> Result<bool> {
        let mut c = self.conn().await?;
        let known: Option<f64> = redis::cmd("ZSCORE")
            .arg(keys::WORKERS)
            .arg(id)
            .query_async(&mut c)
            .await?;
        if known.is_none_or(|beat| (beat as i64) < now_ms() - KEPT_MS) {
            return Ok(false);
        }
        if drain {
            let record = Paused {
                by: by.to_owned(),
                at: chrono::Utc::now(),
                reason: String::new(),
            };
            let () = redis::cmd("SET")
                .arg(keys::worker_drain(id))
                .arg(serde_json::to_string(&record).unwrap_or_default())
                .arg("EX")
                .arg(DRAIN_TTL_S)
                .query_async(&mut c)
                .await?;
        } else {
            let _: u64 = redis::cmd("DEL")
                .arg(keys::worker_drain(id))
                .query_async(&mut c)
                .await?;
        }
        Ok(true)
    }

    /// The tasks held in queue `keys` (by `consumer`, or by any worker), the oldest entries
    /// first, at most `n`: one `XPENDING`, then each entry read by id.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn held(
        &self,
        keys: &QueueKeys,
        consumer: Option<&str>,
        n: usize,
    ) -> Result<Vec<HeldTask>> {
        let mut held = self.held_after(keys, consumer, None, n).await?;
        let ids: Vec<&str> = held.iter().map(|h| h.entry_id.as_str()).collect();
        let payloads = self.payloads(keys, &ids).await?;
        for (h, payload) in held.iter_mut().zip(payloads) {
            let Some(payload) = payload else { continue };
            if let Some(e) = EntryId::parse(&h.entry_id) {
                h.task_id = Some(envelope::task_id_of(keys.name(), e, &payload));
            }
            h.task_type = serde_json::from_slice::<serde_json::Value>(&payload)
                .ok()
                .and_then(|v| v.get("type")?.as_str().map(str::to_owned));
        }
        Ok(held)
    }

    /// The entries held in queue `keys` (by `consumer`, or by any worker) after entry
    /// `after`, oldest first, at most `n`: one `XPENDING`, the tasks not read.
    ///
    /// # Errors
    /// Redis fails.
    pub(super) async fn held_after(
        &self,
        keys: &QueueKeys,
        consumer: Option<&str>,
        after: Option<&str>,
        n: usize,
    ) -> Result<Vec<HeldTask>> {
        let mut c = self.conn().await?;
        let mut cmd = redis::cmd("XPENDING");
        let start = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        cmd.arg(keys.stream()).arg(GROUP).arg(start).arg("+").arg(n);
        if let Some(consumer) = consumer {
            cmd.arg(consumer);
        }
        let pending: Value = match cmd.query_async(&mut c).await {
            Err(e) if e.code() == Some("NOGROUP") => return Ok(Vec::new()),
            other => other?,
        };
        let Value::Array(rows) = pending else {
            return Ok(Vec::new());
        };
        let mut held = Vec::with_capacity(rows.len());
        for row in rows {
            let Value::Array(parts) = row else { continue };
            let [id, by, idle, deliveries] = parts.as_slice() else {
                continue;
            };
            held.push(HeldTask {
                queue: keys.name().to_owned(),
                worker: reply::as_string(by)?,
                entry_id: reply::as_string(id)?,
                task_id: None,
                task_type: None,
                idle_ms: reply::as_u64(idle),
                deliveries: reply::as_u64(deliveries),
            });
        }
        Ok(held)
    }
}

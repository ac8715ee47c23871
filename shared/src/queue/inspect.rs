//! Looking at a queue: counts, where a task is, stored results, worker heartbeats.

use redis::Value;

use super::{Client, Error, QueueCounts, Result, WORKER_LIVENESS, now_ms, reply};
use crate::ids::TaskId;
use crate::keys::{GROUP, QUEUES, QueueKeys};
use crate::outcome::{Status, TaskRecord};

static ROOM_TOP: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(concat!(
        include_str!("lua/room.lua"),
        include_str!("room_top.lua")
    ))
});
static ROOM_FIND: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(concat!(
        include_str!("lua/room.lua"),
        include_str!("room_find.lua")
    ))
});

/// Replaces delayed member ARGV[1] by ARGV[2], due at ARGV[3]; 1 when it was there.
static RUN_NOW: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then \
           redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2]) return 1 end return 0",
    )
});

/// A task as a look finds it: its record, its envelope where it is held now, and its dead
/// letter's entry id if it is dead.
#[derive(Debug, Clone, Default)]
pub struct Found {
    pub record: Option<TaskRecord>,
    /// The envelope as it is held (delayed, in the stream or the room, or dead): the member
    /// of `delayed` exactly, when delayed.
    pub request: Option<String>,
    pub dead_entry: Option<String>,
}

impl Found {
    fn of(record: Option<TaskRecord>) -> Self {
        Self {
            record,
            ..Self::default()
        }
    }
}

/// Tasks of one tenant waiting in a queue's room at one priority.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TenantBacklog {
    pub priority: u8,
    pub tenant: String,
    pub waiting: u64,
}

impl TenantBacklog {
    /// `<tenant> <waiting> (priority <p>)`, the tenant's name (the producers' text) as
    /// `show` makes it safe for where it goes: cut for a terminal, escaped for a page.
    #[must_use]
    pub fn describe(&self, show: impl Fn(&str) -> String) -> String {
        let name = if self.tenant.is_empty() {
            "(no tenant)"
        } else {
            &self.tenant
        };
        format!(
            "{} {} (priority {})",
            show(name),
            self.waiting,
            self.priority
        )
    }
}

impl QueueCounts {
    /// The room's tasks per priority, as `priority <p>: <n>, ...`.
    #[must_use]
    pub fn room_by_priority(&self) -> String {
        self.ready_by_priority
            .iter()
            .map(|(p, n)| format!("priority {p}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Client {
    /// Records that `worker` serves `queues` (for `llmq status`); with `tidy`, also lists the
    /// queues in `llmq:queues` and drops workers silent for an hour. Returns the fewest live workers any of the queues has (itself included), so
    /// duties the fleet shares can be spread over it.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn heartbeat(&self, worker: &str, queues: &[QueueKeys], tidy: bool) -> Result<u64> {
        let now = now_ms();
        let live_since = now - i64::try_from(WORKER_LIVENESS.as_millis()).unwrap_or(i64::MAX);
        let mut c = self.conn().await?;
        if tidy {
            let names: Vec<&str> = queues.iter().map(QueueKeys::name).collect();
            let _: () = redis::cmd("SADD")
                .arg(QUEUES)
                .arg(&names)
                .query_async(&mut c)
                .await?;
        }
        // One pipeline per queue: each stays in its queue's slot (Redis Cluster).
        let mut fewest = u64::MAX;
        for keys in queues {
            let mut pipe = redis::pipe();
            if tidy {
                pipe.cmd("ZREMRANGEBYSCORE")
                    .arg(keys.workers())
                    .arg("-inf")
                    .arg(now - 3_600_000)
                    .ignore();
            }
            pipe.zadd(keys.workers(), worker, now).ignore();
            pipe.zcount(keys.workers(), live_since, "+inf");
            let (live,): (u64,) = pipe.query_async(&mut c).await?;
            fewest = fewest.min(live);
            if tidy {
                forget_gone(&mut c, keys).await?;
            }
        }
        Ok(fewest.clamp(1, u64::MAX))
    }

    /// Removes `worker` from the live workers (on a clean shutdown).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn leave(&self, worker: &str, queues: &[QueueKeys]) -> Result<()> {
        let mut c = self.conn().await?;
        for keys in queues {
            let () = redis::pipe()
                .zrem(keys.workers(), worker)
                .ignore()
                .hdel(keys.intact(), worker)
                .ignore()
                .query_async(&mut c)
                .await?;
        }
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

    /// One step of a walk over the keyspace for queues' streams (`llmq:{<q>}:stream`), for
    /// queues no worker has served yet: `SCAN` from `cursor`, `calls` times at most (1,000
    /// keys each). Returns the names found and the cursor to go on from (0: the walk ended).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn discover_queues(&self, cursor: u64, calls: usize) -> Result<(Vec<String>, u64)> {
        let mut c = self.conn().await?;
        let (mut at, mut found) = (cursor, Vec::new());
        for _ in 0..calls {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(at)
                .arg("MATCH")
                .arg("llmq:{*}:stream")
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("stream")
                .query_async(&mut c)
                .await?;
            found.extend(keys.iter().filter_map(|k| {
                let name = k.strip_prefix("llmq:{")?.strip_suffix("}:stream")?;
                crate::keys::queue_name(name).ok()
            }));
            at = next;
            if at == 0 {
                break;
            }
        }
        Ok((found, at))
    }

    /// The `n` tenants with the most tasks waiting in the room (`room_top.lua`: at most 200
    /// per priority are looked at, those next in turn): priority, tenant, tasks, most
    /// first.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn busiest_tenants(&self, keys: &QueueKeys, n: usize) -> Result<Vec<TenantBacklog>> {
        let mut c = self.conn().await?;
        let flat: Vec<Value> = ROOM_TOP.key(keys.stream()).invoke_async(&mut c).await?;
        let mut top = Vec::with_capacity(flat.len() / 3);
        for chunk in flat.chunks(3) {
            let [p, tenant, waiting] = chunk else {
                return Err(Error::Protocol(
                    "the room's tenants came back partial".into(),
                ));
            };
            top.push(TenantBacklog {
                priority: u8::try_from(reply::as_u64(p)).unwrap_or(u8::MAX),
                tenant: reply::as_string(tenant)?,
                waiting: reply::as_u64(waiting),
            });
        }
        top.sort_by(|a, b| b.waiting.cmp(&a.waiting).then(a.priority.cmp(&b.priority)));
        top.truncate(n);
        Ok(top)
    }

    /// Makes delayed task `member` (its envelope as [`Found::request`] read it) due now:
    /// the next promotion moves it to the stream. `false` when it is no longer delayed.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn run_now(&self, keys: &QueueKeys, member: &str) -> Result<bool> {
        // Its `run_at` goes too, or the worker that reads it would delay it again.
        let due = match serde_json::from_str::<serde_json::Value>(member) {
            Ok(serde_json::Value::Object(mut env)) => {
                env.remove("run_at");
                serde_json::Value::Object(env).to_string()
            }
            _ => member.to_owned(),
        };
        let mut c = self.conn().await?;
        let moved: u64 = RUN_NOW
            .key(keys.delayed())
            .arg(member)
            .arg(due)
            .arg(now_ms())
            .invoke_async(&mut c)
            .await?;
        Ok(moved == 1)
    }

    /// When the oldest task ready in the queue's stream entered it (ms), `None` with none: the
    /// first entry after the group's last delivered one that holds a task (the room's beacon
    /// holds none). Tasks waiting their turn in the room are not looked at.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn oldest_ready_ms(&self, keys: &QueueKeys) -> Result<Option<i64>> {
        let mut c = self.conn().await?;
        let groups: Value = match redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(keys.stream())
            .query_async(&mut c)
            .await
        {
            // No stream yet (`ERR no such key`): nothing waits.
            Err(e) if e.code() == Some("ERR") => return Ok(None),
            other => other?,
        };
        let last =
            reply::group_field(&groups, GROUP, "last-delivered-id").unwrap_or_else(|| "0-0".into());
        let page = self
            .range(&mut c, &keys.stream(), &format!("({last}"), 2)
            .await?;
        Ok(page
            .iter()
            .find(|(_, f)| f.contains_key(crate::keys::TASK_FIELD))
            .and_then(|(id, _)| crate::ids::EntryId::parse(id))
            .map(|e| i64::try_from(e.ms()).unwrap_or(0)))
    }

    /// Counts of one queue.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn counts(&self, keys: &QueueKeys) -> Result<QueueCounts> {
        let mut c = self.conn().await?;
        let live_since = now_ms() - WORKER_LIVENESS.as_millis() as i64;
        type Depths = (u64, u64, u64, u64, bool, Vec<(String, i64)>, Option<u64>);
        let (len, delayed, dead, workers, paused, room, duplicates): Depths = redis::pipe()
            .cmd("XLEN")
            .arg(keys.stream())
            .zcard(keys.delayed())
            .cmd("XLEN")
            .arg(keys.dead())
            .zcount(keys.workers(), live_since, "+inf")
            .exists(keys.paused())
            .hgetall(keys.room_counts())
            .get(keys.duplicates())
            .query_async(&mut c)
            .await?;
        let mut ready_by_priority: Vec<(u8, u64)> = room
            .into_iter()
            .filter_map(|(p, n)| Some((p.parse().ok()?, u64::try_from(n).ok()?)))
            .filter(|(_, n)| *n > 0)
            .collect();
        ready_by_priority.sort_unstable();
        let in_room: u64 = ready_by_priority.iter().map(|(_, n)| n).sum();
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
            Value::Array(parts) => parts.first().map_or(0, reply::as_u64),
            _ => 0,
        };
        // Acked entries are deleted at once, so the stream holds exactly the ready tasks and
        // the ones in flight.
        Ok(QueueCounts {
            queue: keys.name().to_owned(),
            // While the room has tasks, one stream entry is its beacon, not a task.
            ready: len.saturating_sub(in_flight + u64::from(in_room > 0)) + in_room,
            ready_by_priority,
            in_flight,
            delayed,
            dead,
            workers,
            paused,
            duplicates: duplicates.unwrap_or(0),
        })
    }

    /// The stored record of a task, or where it is now if it has none yet.
    ///
    /// Finished tasks are one lookup; a task delayed, still in the stream or dead is found
    /// by scanning those, which is fine for an operator's command.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn task(&self, keys: &QueueKeys, task_id: TaskId) -> Result<Option<TaskRecord>> {
        self.task_within(keys, task_id, usize::MAX).await
    }

    /// [`Client::task`], looking at no more than about `scan` entries of each of `delayed`,
    /// the stream, the room and the dead letters (the newest of these): a bounded read for a
    /// page anyone may ask.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn task_within(
        &self,
        keys: &QueueKeys,
        task_id: TaskId,
        scan: usize,
    ) -> Result<Option<TaskRecord>> {
        Ok(self.find_task(keys, task_id, scan, false).await?.record)
    }

    /// [`Client::task_within`], and the task's envelope where it is held now (delayed, in
    /// the stream or the room, or dead): what it asked for.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn task_and_request(
        &self,
        keys: &QueueKeys,
        task_id: TaskId,
        scan: usize,
    ) -> Result<Found> {
        self.find_task(keys, task_id, scan, true).await
    }

    /// The task's record, and (with `request`, or where the task is held decides its
    /// record) its envelope.
    async fn find_task(
        &self,
        keys: &QueueKeys,
        task_id: TaskId,
        scan: usize,
        request: bool,
    ) -> Result<Found> {
        let stored = self.results(keys, &[task_id]).await?.pop().flatten();
        let final_record = stored.as_ref().filter(|r| r.status.is_final());
        // An ended task is one lookup; only a dead one is held anywhere still (its letter).
        if final_record.is_some_and(|r| !request || r.status != Status::Dead) {
            return Ok(Found::of(stored));
        }
        let Some((status, request, dead)) = self.locate(keys, task_id, scan).await? else {
            // Between two places (e.g. being promoted) while we looked: the record stands.
            return Ok(Found::of(stored));
        };
        let dead_entry = dead.as_ref().map(|d| d.id.clone());
        if final_record.is_some() {
            return Ok(Found {
                record: stored,
                request,
                dead_entry,
            });
        }
        // A record of a retry says `delayed`; where the task is now decides, and the record
        // keeps its last error and attempts.
        let mut r = stored.unwrap_or_else(|| TaskRecord::pending(task_id, keys.name(), status));
        r.status = status;
        if let Some(d) = dead {
            r.error = Some(d.error);
            r.error_class = d.class.parse().ok();
            r.attempts = u32::try_from(d.attempts).unwrap_or(u32::MAX);
        }
        Ok(Found {
            record: Some(r),
            request,
            dead_entry,
        })
    }

    /// Where task `task_id` is held now (looking at no more than about `scan` entries of
    /// each place), its envelope there, and its dead letter if that is where.
    async fn locate(
        &self,
        keys: &QueueKeys,
        task_id: TaskId,
        scan: usize,
    ) -> Result<Option<(Status, Option<String>, Option<super::DeadLetter>)>> {
        let mut c = self.conn().await?;
        // Any JSON spacing; the id itself is unique enough (a UUID holds no glob character).
        let pattern = format!("*{task_id}*");
        let mut cursor = 0u64;
        let mut looked = 0usize;
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
            if let Some(envelope) = hits.into_iter().next() {
                return Ok(Some((Status::Delayed, Some(envelope), None)));
            }
            looked = looked.saturating_add(1000);
            if next == 0 || looked >= scan {
                break;
            }
            cursor = next;
        }
        let mut start = "-".to_owned();
        let mut looked = 0usize;
        loop {
            let page = self.range(&mut c, &keys.stream(), &start, 1000).await?;
            for (entry_id, fields) in &page {
                if reply::entry_matches(keys.name(), entry_id, fields, task_id) {
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
                    let request = fields
                        .get(crate::keys::TASK_FIELD)
                        .map(|p| String::from_utf8_lossy(p).into_owned());
                    return Ok(Some((status, request, None)));
                }
            }
            looked = looked.saturating_add(page.len());
            match page.last() {
                Some((last, _)) if page.len() == 1000 && looked < scan => {
                    start = format!("({last}");
                }
                _ => break,
            }
        }
        // Waiting its turn in the room: queued, as in the stream.
        let in_room: Value = ROOM_FIND
            .key(keys.stream())
            .arg(task_id)
            .arg(scan.min(i64::MAX as usize))
            .invoke_async(&mut c)
            .await?;
        if let Value::BulkString(envelope) = in_room {
            let request = String::from_utf8_lossy(&envelope).into_owned();
            return Ok(Some((Status::Queued, Some(request), None)));
        }
        Ok(self
            .dead_letters(keys, scan)
            .await?
            .into_iter()
            .find(|d| d.task_id == task_id)
            .map(|d| (Status::Dead, Some(d.task.clone()), Some(d))))
    }

    /// The stored records of `task_ids`, in order (`None` where there is none yet), in one
    /// round trip: what `--wait` polls.
    ///
    /// # Errors
    /// Redis fails, or a stored record is not one.
    pub async fn results(
        &self,
        keys: &QueueKeys,
        task_ids: &[TaskId],
    ) -> Result<Vec<Option<TaskRecord>>> {
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        let mut cmd = redis::cmd("MGET");
        for id in task_ids {
            cmd.arg(keys.result(*id));
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
}

/// Drops from queue `keys`' intact consumers the workers no longer among its live workers
/// (silent for an hour, or stopped without leaving): their entries are taken over or
/// finished. Dropping a worker that still runs only makes its finishes check each entry. A
/// worker joins both at once ([`Client::join_intact`]), so none is dropped before its first
/// heartbeat.
async fn forget_gone(c: &mut super::conn::Conn, keys: &QueueKeys) -> Result<()> {
    let joined: Vec<String> = redis::cmd("HKEYS")
        .arg(keys.intact())
        .query_async(c)
        .await?;
    if joined.is_empty() {
        return Ok(());
    }
    let seen: Vec<Option<f64>> = redis::cmd("ZMSCORE")
        .arg(keys.workers())
        .arg(&joined)
        .query_async(c)
        .await?;
    let gone: Vec<&String> = joined
        .iter()
        .zip(seen)
        .filter_map(|(w, at)| at.is_none().then_some(w))
        .collect();
    if !gone.is_empty() {
        let _: u64 = redis::cmd("HDEL")
            .arg(keys.intact())
            .arg(&gone)
            .query_async(c)
            .await?;
    }
    Ok(())
}

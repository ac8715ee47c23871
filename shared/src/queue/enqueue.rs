//! Getting tasks in: the consumer group, enqueueing, and the scheduler's recurring ticks.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{Client, Fence, NOT_HOLDER, Result, now_ms};
use crate::envelope::Envelope;
use crate::keys::{CHAIN_FIELD, GROUP, QueueKeys, TASK_FIELD};

static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    // The room's functions are made only when a task goes into the room (a Lua script makes
    // every function it defines on every call; a task with no class needs none).
    Script::new(concat!(
        "local function room()\n",
        include_str!("lua/room.lua"),
        "return {push = room_push, beacon = room_beacon, of = room_of}\nend\n",
        include_str!("enqueue.lua")
    ))
});
static TICK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/fence.lua"),
        include_str!("tick.lua")
    ))
});
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/fence.lua"),
        "if not is_holder() then return -1 end\nreturn 1\n"
    ))
});

/// A batch's progress, marked with its enqueue: how many of its tasks, in order, are in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub batch_id: String,
    pub enqueued: u64,
}

/// How long a batch's progress is kept after its last enqueue: a rerun later than this starts
/// over (its tasks' idempotency keys still keep the ones that ran from running again).
pub const PROGRESS_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// About the most bytes of envelopes one enqueue script carries: Redis reads a command whole
/// (one of over `client-query-buffer-limit`, 1 GiB by default, closes the connection), so a
/// chunk of large tasks goes in several scripts.
pub const SCRIPT_BYTES: usize = 32 * 1024 * 1024;

/// Where an enqueued task goes.
enum Place<'a> {
    /// `delayed`, due then (ms).
    Delayed(i64),
    /// Straight into the room, at this priority for this tenant.
    Room(u8, &'a str),
    Stream,
}

impl<'a> Place<'a> {
    fn of(env: &'a Envelope, now_ms: i64) -> Self {
        match (env.run_at.map(|t| t.timestamp_millis()), env.class()) {
            (Some(due), _) if due > now_ms => Place::Delayed(due),
            // Only a class the worker would accept goes into the room as it is (its tenant
            // names keys and is shown to operators); any other goes by the stream, where the
            // worker makes it a dead letter that says why.
            (_, Some((priority, tenant)))
                if crate::envelope::check_class(env.priority, env.tenant.as_deref()).is_ok() =>
            {
                Place::Room(priority, tenant)
            }
            _ => Place::Stream,
        }
    }
}

/// The name (under the queue's prefix) of batch `batch_id`'s progress.
fn progress_name(batch_id: &str) -> String {
    format!("enqueued:{batch_id}")
}

/// The name (under the queue's prefix) of batch `batch_id`'s count of finished tasks,
/// which `finish.lua` counts up as each ends (kept a week, set again every 1,000th).
pub(super) fn batch_finished_name(batch_id: &str) -> String {
    format!("finished:{batch_id}")
}

/// One tick of a recurring task, as the scheduler enqueues it.
#[derive(Debug, Clone, Copy)]
pub struct Tick<'a> {
    /// The recurring task's name.
    pub name: &'a str,
    /// How long the marker of the tick is kept.
    pub marker_ttl: Duration,
    pub envelope: &'a str,
    pub tick_ms: i64,
}

impl Client {
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

    /// Enqueues many tasks at once, all or none: those with a `run_at` ahead into `delayed`,
    /// those with a class (`priority` or `tenant`) straight into the queue's room, where a
    /// worker would sort them after an `XADD`, the rest into the stream (one script,
    /// `enqueue.lua`; tasks that all go to the stream, one transaction of their `XADD`s).
    /// The queue's group must exist (the room's beacon is checked against it):
    /// [`Client::ensure_group`].
    ///
    /// # Errors
    /// Redis fails.
    pub async fn enqueue_many(&self, keys: &QueueKeys, envs: &[Envelope]) -> Result<()> {
        self.enqueue_marked(keys, envs, None).await
    }

    /// [`Client::enqueue_many`], writing `mark` (a batch's progress: how many of its tasks
    /// are in once these are) in the same script: a rerun of an interrupted batch reads it
    /// ([`Client::batch_progress`]) and skips exactly the tasks that went in. Tasks of more
    /// than [`SCRIPT_BYTES`] together go in several scripts, in order, each marking how many
    /// are in after it.
    ///
    /// Tasks that all go to the stream, with no progress to mark, go in as their `XADD`s in
    /// one transaction (`MULTI`/`EXEC`; one task, its `XADD`): all or none, as with the
    /// script, for less of Redis's time (a Lua call cost Redis about 12 µs more than the same
    /// two `XADD`s in a transaction, at 1,000 calls a second; docs/benchmarks.md).
    ///
    /// # Errors
    /// Redis fails; the scripts sent before it stay applied, and marked.
    pub async fn enqueue_marked(
        &self,
        keys: &QueueKeys,
        envs: &[Envelope],
        mark: Option<&Progress>,
    ) -> Result<()> {
        let now = now_ms();
        let stamp = chrono::DateTime::from_timestamp_millis(now).unwrap_or_default();
        let ttl_ms = u64::try_from(PROGRESS_TTL.as_millis()).unwrap_or(u64::MAX);
        let before = mark.map(|m| m.enqueued.saturating_sub(envs.len() as u64));
        let mut c = self.conn().await?;
        let places: Vec<Place<'_>> = envs.iter().map(|e| Place::of(e, now)).collect();
        let stream_only = mark.is_none() && places.iter().all(|p| matches!(p, Place::Stream));
        let mut rest = envs.iter().zip(places).enumerate().peekable();
        while rest.peek().is_some() {
            let (mut bytes, mut end) = (0, 0);
            let mut chunk = Vec::new();
            while let Some((i, (env, place))) = rest.next_if(|_| bytes < SCRIPT_BYTES) {
                // When it went in, kept through the room and `delayed`, where its entry's id
                // is not its own: what a tenant's cancel compares (`queue/cancel.rs`). A copy,
                // so the text is the fields in their order, as every other writer makes it.
                let json = if env.enqueued_at.is_none() {
                    let mut stamped = env.clone();
                    stamped.enqueued_at = Some(stamp);
                    stamped.to_json()
                } else {
                    env.to_json()
                };
                bytes += json.len();
                end = i + 1;
                chunk.push((place, json));
            }
            if stream_only {
                let stream = keys.stream();
                let mut pipe = redis::pipe();
                if chunk.len() > 1 {
                    pipe.atomic();
                }
                for (_, json) in &chunk {
                    pipe.xadd(&stream, "*", &[(TASK_FIELD, json)]).ignore();
                }
                let () = pipe.query_async(&mut c).await?;
                continue;
            }
            let mut inv = ENQUEUE.key(keys.stream());
            inv.key(keys.delayed()).arg(GROUP);
            for (place, json) in chunk {
                match place {
                    Place::Delayed(due) => inv.arg("d").arg(due).arg(""),
                    Place::Room(priority, tenant) => inv.arg("r").arg(priority).arg(tenant),
                    Place::Stream => inv.arg("s").arg("").arg(""),
                };
                inv.arg(json);
            }
            match (mark, before) {
                (Some(m), Some(before)) => inv
                    .arg(progress_name(&m.batch_id))
                    .arg(before + end as u64)
                    .arg(ttl_ms),
                _ => inv.arg("").arg(0).arg(0),
            };
            let _: u64 = inv.invoke_async(&mut c).await?;
        }
        Ok(())
    }

    /// How many tasks of batch `batch_id` went in, as its last enqueue marked it; 0 for a
    /// batch never seen (or last marked over [`PROGRESS_TTL`] ago).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn batch_progress(&self, keys: &QueueKeys, batch_id: &str) -> Result<u64> {
        self.count(keys.kept(&progress_name(batch_id))).await
    }

    /// How many of batch `batch_id`'s tasks have finished (succeeded or ended dead), as the
    /// workers count them: a task that finished twice (replayed) counts twice, one whose
    /// worker died and that went dead as poison does not count.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn batch_finished(&self, keys: &QueueKeys, batch_id: &str) -> Result<u64> {
        self.count(keys.kept(&batch_finished_name(batch_id))).await
    }

    /// Adds one to the counter `key` (made with a life of `ttl`, which a count in a clock
    /// window outlives), returning the count: one round trip.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn tally(&self, key: &str, ttl: std::time::Duration) -> Result<u64> {
        let mut c = self.conn().await?;
        let (n, _): (u64, bool) = redis::pipe()
            .atomic()
            .incr(key, 1)
            .expire(key, i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX))
            .query_async(&mut c)
            .await?;
        Ok(n)
    }

    /// The count at `key`; 0 when there is none.
    async fn count(&self, key: String) -> Result<u64> {
        let mut c = self.conn().await?;
        let n: Option<u64> = redis::cmd("GET").arg(key).query_async(&mut c).await?;
        Ok(n.unwrap_or(0))
    }

    /// Submits a chain spec as a producer in any language would: one `XADD ... chain <json>`.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn submit_chain(&self, keys: &QueueKeys, spec: &str) -> Result<String> {
        let mut c = self.conn().await?;
        Ok(redis::cmd("XADD")
            .arg(keys.stream())
            .arg("*")
            .arg(CHAIN_FIELD)
            .arg(spec)
            .query_async(&mut c)
            .await?)
    }

    /// Copies `fence`'s token into the queue's fence (see `lua/fence.lua`). Returns false
    /// when a newer holder has claimed the queue.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn claim_queue(&self, fence: Fence<'_>, keys: &QueueKeys) -> Result<bool> {
        let mut c = self.conn().await?;
        let answer: i64 = CLAIM
            .key(keys.fence())
            .arg(fence.holder)
            .arg(fence.token)
            .invoke_async(&mut c)
            .await?;
        Ok(answer != NOT_HOLDER)
    }

    /// Enqueues one tick of a recurring task unless it was enqueued before, for the lease
    /// holder only. Returns `Some(true)` when it was
    /// enqueued now, `Some(false)` when before, `None` when `fence` no longer holds the lease.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn enqueue_tick(
        &self,
        fence: Fence<'_>,
        keys: &QueueKeys,
        tick: &Tick<'_>,
    ) -> Result<Option<bool>> {
        let mut c = self.conn().await?;
        let answer: i64 = TICK
            .key(keys.fence())
            .key(keys.tick(tick.name, tick.tick_ms))
            .key(keys.stream())
            .arg(fence.holder)
            .arg(fence.token)
            .arg(u64::try_from(tick.marker_ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(tick.envelope)
            .invoke_async(&mut c)
            .await?;
        Ok((answer != NOT_HOLDER).then_some(answer == 1))
    }
}

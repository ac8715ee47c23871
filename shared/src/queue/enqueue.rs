//! Getting tasks in: the consumer group, enqueueing, and the scheduler's recurring ticks.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{Client, Fence, NOT_HOLDER, Result, now_ms};
use crate::envelope::Envelope;
use crate::keys::{CHAIN_FIELD, GROUP, QueueKeys, TASK_FIELD};

static ROOM_ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/room.lua"),
        include_str!("room_enqueue.lua")
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

    /// Enqueues many tasks: those with a `run_at` ahead into `delayed`, the rest into the
    /// stream in one pipelined round trip, except that those with a class (`priority` or
    /// `tenant`) go straight into the queue's room in one script (`room_enqueue.lua`), where
    /// a worker would sort them after an `XADD`. The queue's group must exist (the room's
    /// beacon is checked against it): [`Client::ensure_group`].
    ///
    /// # Errors
    /// Redis fails.
    pub async fn enqueue_many(&self, keys: &QueueKeys, envs: &[Envelope]) -> Result<()> {
        let now = now_ms();
        let mut pipe = redis::pipe();
        let mut room = ROOM_ENQUEUE.key(keys.stream());
        room.arg(GROUP);
        let (mut piped, mut to_room) = (false, false);
        for env in envs {
            let json = env.to_json();
            match (env.run_at.map(|t| t.timestamp_millis()), env.class()) {
                (Some(due), _) if due > now => {
                    pipe.zadd(keys.delayed(), json, due).ignore();
                    piped = true;
                }
                // Only a class the worker would accept goes into the room as it is (its
                // tenant names keys and is shown to operators); any other goes by the stream,
                // where the worker makes it a dead letter that says why.
                (_, Some((priority, tenant)))
                    if crate::envelope::check_class(env.priority, env.tenant.as_deref())
                        .is_ok() =>
                {
                    room.arg(priority).arg(tenant).arg(json);
                    to_room = true;
                }
                _ => {
                    pipe.cmd("XADD")
                        .arg(keys.stream())
                        .arg("*")
                        .arg(TASK_FIELD)
                        .arg(json)
                        .ignore();
                    piped = true;
                }
            }
        }
        let mut c = self.conn().await?;
        if piped {
            pipe.query_async::<()>(&mut c).await?;
        }
        if to_room {
            let _: u64 = room.invoke_async(&mut c).await?;
        }
        Ok(())
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

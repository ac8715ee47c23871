//! The lease that keeps one scheduler active, and the fenced writes only its holder can make.
//!
//! `llmq:{scheduler}:lease` holds the holder's id with a TTL. An instance takes it with
//! `SET NX PX`, which bumps `llmq:{scheduler}:fence` in the same script: the new holder's
//! fencing token. The holder extends the lease every third of its length with a
//! compare-and-extend. Every write a duty makes goes through this module:
//!
//! - Redis writes are Lua scripts that first check the lease still holds this id and the fence
//!   this token, and act in the same script, so an instance that was paused past its lease
//!   cannot act once another has taken over.
//! - Postgres writes run in a transaction that first raises the namespace's `scheduler_lease` row to
//!   this token, or finds a higher token there and rolls back: a stale holder's writes are
//!   refused once its successor has written, and a successor announces itself there as soon
//!   as it takes the lease.
//!
//! Writes to a queue's keys (a recurring task's tick, trimming dead letters, batches) are the
//! queue's own functions, which take this lease's [`Fence`]: its token is checked against
//! the queue's copy of the fence, in the queue's own slot, and a holder claims every queue
//! it serves as it takes the lease (see `queue/lua/fence.lua`). The scheduler's own keys
//! share a hash tag of their own, so every script stays in one slot on Redis Cluster.

use std::time::{Duration, Instant};

use redis::Script;
use sqlx::{PgPool, Postgres, Transaction};

use llmq_shared::keys::{QueueKeys, SchedulerKeys};
use llmq_shared::queue::{Client, Fence, NOT_HOLDER, Tick};

use crate::{Error, Result};

struct Scripts {
    acquire: Script,
    renew: Script,
    release: Script,
    raise: Script,
    mark: Script,
    put: Script,
}

/// The check every script on the scheduler's own keys starts with: KEYS[1] the lease,
/// KEYS[2] the fence counter, ARGV[1] the holder id, ARGV[2] its token.
const LEASE_CHECK: &str = "local function is_holder()
  return redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[2]
end
";

/// A script on the scheduler's own keys that starts with the lease check.
fn fenced(body: &str) -> Script {
    Script::new(&format!("{LEASE_CHECK}{body}"))
}

/// This instance's view of the lease.
pub(crate) struct Lease {
    id: String,
    keys: SchedulerKeys,
    ttl: Duration,
    /// Our fencing token while we believe we hold the lease.
    fence: Option<i64>,
    /// When the lease was last taken or extended.
    renewed: Option<Instant>,
    /// Postgres knows our token (or a Redis that lost its counter was moved past it).
    synced: bool,
    scripts: Scripts,
}

/// How [`Lease::mark`] writes its field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    Always,
    IfAbsent,
}

impl Lease {
    pub(crate) fn new(id: String, ttl: Duration, keys: SchedulerKeys) -> Self {
        Self {
            id,
            keys,
            ttl,
            fence: None,
            renewed: None,
            synced: false,
            scripts: Scripts {
                acquire: Script::new(include_str!("lease/acquire.lua")),
                renew: fenced(include_str!("lease/renew.lua")),
                release: fenced(include_str!("lease/release.lua")),
                raise: fenced(include_str!("lease/raise.lua")),
                mark: fenced(include_str!("lease/mark.lua")),
                put: fenced(include_str!("lease/put.lua")),
            },
        }
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn keys(&self) -> &SchedulerKeys {
        &self.keys
    }

    pub(crate) fn fence(&self) -> Option<i64> {
        self.fence
    }

    /// Whether we hold the lease as far as we know: taken, and extended within its length.
    pub(crate) fn holds(&self) -> bool {
        self.fence.is_some() && self.renewed.is_some_and(|at| at.elapsed() < self.ttl)
    }

    /// Whether a third of the lease has passed since it was last extended.
    pub(crate) fn needs_renewal(&self) -> bool {
        self.renewed.is_none_or(|at| at.elapsed() >= self.ttl / 3)
    }

    /// Forgets the lease (it was lost, or refused a write).
    pub(crate) fn drop_lease(&mut self) {
        self.fence = None;
        self.renewed = None;
        self.synced = false;
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Takes the lease if nobody holds it. Returns whether we now hold it.
    pub(crate) async fn acquire(&mut self, redis: &Client) -> Result<bool> {
        let started = Instant::now();
        let mut c = redis.conn().await?;
        // A scheduler of an older version (its lease under the key without the hash tag)
        // still acts: wait for it to stop, as a rolling upgrade does within a lease.
        let older: Option<String> = redis::cmd("GET")
            .arg(self.keys.untagged_lease())
            .query_async(&mut c)
            .await?;
        if let Some(older) = older {
            tracing::warn!(
                holder = older,
                "a scheduler of an older version holds the lease; standing by until it stops"
            );
            return Ok(false);
        }
        let fence: i64 = self
            .scripts
            .acquire
            .key(self.keys.lease())
            .key(self.keys.fence())
            .arg(&self.id)
            .arg(self.ttl_ms())
            .invoke_async(&mut c)
            .await?;
        if fence <= 0 {
            return Ok(false);
        }
        self.fence = Some(fence);
        self.renewed = Some(started);
        self.synced = false;
        Ok(true)
    }

    /// Extends the lease. Returns false (and forgets it) when it was lost.
    pub(crate) async fn renew(&mut self, redis: &Client) -> Result<bool> {
        let Some(fence) = self.fence else {
            return Ok(false);
        };
        let started = Instant::now();
        let mut c = redis.conn().await?;
        let held: i64 = self
            .scripts
            .renew
            .key(self.keys.lease())
            .key(self.keys.fence())
            .arg(&self.id)
            .arg(fence)
            .arg(self.ttl_ms())
            .invoke_async(&mut c)
            .await?;
        if held == NOT_HOLDER {
            self.drop_lease();
            return Ok(false);
        }
        self.renewed = Some(started);
        Ok(true)
    }

    /// Gives the lease up if we still hold it, so a standby takes over at once.
    pub(crate) async fn release(&mut self, redis: &Client) -> Result<()> {
        let Some(fence) = self.fence else {
            return Ok(());
        };
        self.drop_lease();
        let mut c = redis.conn().await?;
        let _: i64 = self
            .scripts
            .release
            .key(self.keys.lease())
            .key(self.keys.fence())
            .arg(&self.id)
            .arg(fence)
            .invoke_async(&mut c)
            .await?;
        Ok(())
    }

    /// Tells Postgres our token, so a stale holder's writes are refused from now on.
    pub(crate) async fn sync(&mut self, redis: &Client, pool: &PgPool) -> Result<()> {
        // Twice at most: once more after moving a Redis that lost its counter past Postgres.
        for _ in 0..2 {
            let fence = self.fence.ok_or(Error::NotLeader)?;
            if raise_in_postgres(pool, self.keys.namespace(), fence, &self.id).await? {
                self.synced = true;
                return Ok(());
            }
            let highest: i64 =
                sqlx::query_scalar("SELECT fence FROM scheduler_lease WHERE namespace = $1")
                    .bind(self.keys.namespace())
                    .fetch_one(pool)
                    .await?;
            let mut c = redis.conn().await?;
            let raised: i64 = self
                .scripts
                .raise
                .key(self.keys.lease())
                .key(self.keys.fence())
                .arg(&self.id)
                .arg(fence)
                .arg(highest)
                .invoke_async(&mut c)
                .await?;
            if raised == NOT_HOLDER {
                self.drop_lease();
                return Err(Error::NotLeader);
            }
            tracing::warn!(
                old = fence,
                new = raised,
                "Postgres has seen a higher fencing token than Redis holds (was Redis flushed?); moved past it"
            );
            self.fence = Some(raised);
        }
        Err(Error::NotLeader)
    }

    /// A transaction whose first statement proved our token is the highest Postgres has seen;
    /// it holds the `scheduler_lease` row, so a successor's writes wait for it and a stale
    /// holder's wait for the successor's and are then refused.
    ///
    /// # Errors
    /// [`Error::NotLeader`] when a newer holder has written; Postgres fails.
    pub(crate) async fn fenced_tx(
        &mut self,
        redis: &Client,
        pool: &PgPool,
    ) -> Result<Transaction<'static, Postgres>> {
        if !self.synced {
            self.sync(redis, pool).await?;
        }
        let fence = self.fence.ok_or(Error::NotLeader)?;
        let mut tx = pool.begin().await?;
        if !raise_in_postgres(&mut *tx, self.keys.namespace(), fence, &self.id).await? {
            tx.rollback().await?;
            return Err(Error::NotLeader);
        }
        Ok(tx)
    }

    fn guard<'a>(&self, script: &'a Script) -> Result<redis::ScriptInvocation<'a>> {
        let fence = self.fence.ok_or(Error::NotLeader)?;
        let mut inv = script.key(self.keys.lease());
        inv.key(self.keys.fence()).arg(&self.id).arg(fence);
        Ok(inv)
    }

    fn checked(answer: i64) -> Result<u64> {
        u64::try_from(answer).map_err(|_| Error::NotLeader)
    }

    /// Writes `field` of the duties hash. Returns whether it was written.
    pub(crate) async fn mark(
        &self,
        redis: &Client,
        field: &str,
        value: &str,
        how: Mark,
    ) -> Result<bool> {
        let mut inv = self.guard(&self.scripts.mark)?;
        inv.key(self.keys.duties())
            .arg(field)
            .arg(value)
            .arg(match how {
                Mark::Always => "always",
                Mark::IfAbsent => "if_absent",
            });
        let mut c = redis.conn().await?;
        Ok(Self::checked(inv.invoke_async(&mut c).await?)? == 1)
    }

    /// Stores the routing stats, for the workers' learned strategies.
    pub(crate) async fn put_routing_stats(&self, redis: &Client, json: &str) -> Result<()> {
        let mut inv = self.guard(&self.scripts.put)?;
        inv.key(self.keys.routing_stats()).arg(json);
        let mut c = redis.conn().await?;
        Self::checked(inv.invoke_async(&mut c).await?)?;
        Ok(())
    }

    /// Our proof of holding the lease, for the queue's fenced writes.
    pub(crate) fn proof(&self) -> Result<Fence<'_>> {
        let token = self.fence.ok_or(Error::NotLeader)?;
        Ok(Fence {
            holder: &self.id,
            token,
        })
    }

    /// Copies our token into each queue's fence, so a holder paused past its lease can no
    /// longer write to them (a queue claimed later is claimed by our first write to it).
    pub(crate) async fn claim(&self, redis: &Client, queues: &[String]) -> Result<()> {
        for q in queues {
            if !redis.claim_queue(self.proof()?, &QueueKeys::new(q)).await? {
                return Err(Error::NotLeader);
            }
        }
        Ok(())
    }

    /// Enqueues one tick of a recurring task unless it was enqueued before, and records it
    /// as its last tick. Returns whether it was enqueued now.
    pub(crate) async fn enqueue_tick(
        &self,
        redis: &Client,
        queue: &QueueKeys,
        tick: &Tick<'_>,
    ) -> Result<bool> {
        redis
            .enqueue_tick(self.proof()?, queue, tick)
            .await?
            .ok_or(Error::NotLeader)
    }

    /// Applies an approval's `on_timeout`, fenced. Returns whether it was decided now (a
    /// person's decision, or a step no longer awaiting, stands).
    pub(crate) async fn decide_approval(
        &self,
        redis: &Client,
        queue: &QueueKeys,
        chain_id: &str,
        step: &str,
        approve: bool,
        note: &str,
    ) -> Result<bool> {
        match redis
            .decide_approval(queue, chain_id, step, approve, note, Some(self.proof()?))
            .await?
        {
            Ok(()) => Ok(true),
            Err(llmq_shared::queue::Refused::NotHolder) => Err(Error::NotLeader),
            Err(_) => Ok(false),
        }
    }

    /// Deletes dead letters from `queue`'s dead stream. Returns how many were deleted.
    pub(crate) async fn trim(
        &self,
        redis: &Client,
        queue: &QueueKeys,
        ids: &[String],
    ) -> Result<u64> {
        redis
            .trim_dead(self.proof()?, queue, ids)
            .await?
            .ok_or(Error::NotLeader)
    }
}

impl Lease {
    /// Drops expired chains from `queue`'s chains index, a page from rank `first`. Returns
    /// (dropped, read).
    pub(crate) async fn trim_chains(
        &self,
        redis: &Client,
        queue: &QueueKeys,
        first: u64,
        page: u64,
    ) -> Result<(u64, u64)> {
        redis
            .trim_chains(self.proof()?, queue, first, page)
            .await?
            .ok_or(Error::NotLeader)
    }
}

/// Raises the namespace's `scheduler_lease` row to `fence` unless it holds a higher one.
async fn raise_in_postgres<'e, E>(
    executor: E,
    namespace: &str,
    fence: i64,
    holder: &str,
) -> Result<bool>
where
    E: sqlx::PgExecutor<'e>,
{
    let raised = sqlx::query(
        "INSERT INTO scheduler_lease (namespace, fence, holder, updated_at)
         VALUES ($3, $1, $2, now())
         ON CONFLICT (namespace) DO UPDATE
         SET fence = EXCLUDED.fence, holder = EXCLUDED.holder, updated_at = now()
         WHERE scheduler_lease.fence <= EXCLUDED.fence",
    )
    .bind(fence)
    .bind(holder)
    .bind(namespace)
    .execute(executor)
    .await?
    .rows_affected();
    Ok(raised == 1)
}

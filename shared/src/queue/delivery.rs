//! Getting tasks out: reading new entries, taking over idle ones, refreshing claims.

use std::sync::LazyLock;
use std::time::Duration;

use super::Conn;
use redis::{Script, Value};

use super::{Client, Delivery, Finish, Reclaimed, Result, Write, now_ms, reply};
use crate::chain::StepOutcome;
use crate::envelope;
use crate::ids::EntryId;
use crate::keys::{GROUP, QueueKeys};
use crate::outcome::{ErrorClass, Status, TaskRecord};

static RECLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("reclaim.lua")));
static REFRESH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("refresh.lua")));
static ROOM_READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/room.lua"),
        include_str!("room_read.lua")
    ))
});

impl Client {
    /// Reads up to `count` new tasks for `consumer`, waiting up to `block` for the first
    /// (`None`: not at all). A blocking read needs a [`Client::blocking_conn`].
    ///
    /// # Errors
    /// Redis fails; a missing group is created and the read retried once.
    pub async fn read(
        &self,
        conn: &mut Conn,
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
        reply::parse_read_reply(reply)
    }

    /// Reads up to `count` tasks for `consumer` without waiting: the stream's unread
    /// entries first, then the room's next tasks in their turn (`room_read.lua`), a tenant
    /// of `weights` getting that many tasks per turn. Also says whether the room still has
    /// tasks to feed (while it does, the reader keeps reading this way), and, when every
    /// tenant left in it is held at its limits, when the first hold ends (ms): the reader
    /// looks again then.
    ///
    /// # Errors
    /// Redis fails; a missing group is created and the read retried once.
    pub async fn read_room(
        &self,
        conn: &mut Conn,
        keys: &QueueKeys,
        consumer: &str,
        count: usize,
        weights: &[(String, u32)],
    ) -> Result<(Vec<Delivery>, bool, Option<i64>)> {
        let mut inv = ROOM_READ.key(keys.stream());
        inv.arg(GROUP).arg(consumer).arg(count);
        for (tenant, weight) in weights {
            inv.arg(tenant).arg(weight);
        }
        let reply: Value = match inv.invoke_async(conn).await {
            Err(e) if e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP") => {
                self.ensure_group(keys).await?;
                inv.invoke_async(conn).await?
            }
            other => other?,
        };
        let Value::Array(parts) = reply else {
            return Err(super::Error::Protocol(format!(
                "the room's read returned {reply:?}"
            )));
        };
        let mut parts = parts.into_iter();
        let more = parts.next().is_some_and(|v| reply::as_u64(&v) == 1);
        let mut read = Vec::new();
        for entries in parts.by_ref().take(2) {
            read.extend(reply::deliveries(entries)?);
        }
        let held = parts
            .next()
            .map(|v| reply::as_u64(&v))
            .filter(|&ms| ms > 0)
            .map(|ms| i64::try_from(ms).unwrap_or(i64::MAX));
        Ok((read, more, held))
    }

    /// Takes the room's beacons out of `read` (entries read or taken over) and acks and
    /// deletes them: they are no tasks. Returns their entry ids.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn drop_beacons(
        &self,
        keys: &QueueKeys,
        read: &mut Vec<Delivery>,
    ) -> Result<Vec<EntryId>> {
        let ids: Vec<EntryId> = read
            .iter()
            .filter(|d| d.is_beacon())
            .map(|d| d.entry_id)
            .collect();
        if ids.is_empty() {
            return Ok(ids);
        }
        read.retain(|d| !d.is_beacon());
        let mut c = self.conn().await?;
        let () = redis::pipe()
            .cmd("XACK")
            .arg(keys.stream())
            .arg(GROUP)
            .arg(&ids)
            .ignore()
            .cmd("XDEL")
            .arg(keys.stream())
            .arg(&ids)
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(ids)
    }

    /// The id Redis gives the connection `conn` (`CLIENT ID`), to end its blocking read with
    /// [`Client::unblock`].
    ///
    /// # Errors
    /// Redis fails.
    pub async fn client_id(conn: &mut Conn) -> Result<i64> {
        if conn.is_cluster() {
            // Its reads go to whichever node holds the queue: no one id names them.
            return Err(super::Error::Protocol(
                "a cluster connection has no single client id".into(),
            ));
        }
        Ok(redis::cmd("CLIENT").arg("ID").query_async(conn).await?)
    }

    /// Ends the blocking read of connection `id` at once, as if it had timed out (`CLIENT
    /// UNBLOCK`): entries it read before are still returned to it, none after.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn unblock(&self, id: i64) -> Result<()> {
        let mut c = self.conn().await?;
        let _: i64 = redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(id)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Takes over up to `count` entries idle longer than `min_idle`. Entries delivered more
    /// than `max_deliveries` times are poison tasks: they are finished at once as dead letters
    /// (with a `dead` record kept for `result_ttl`) instead of being returned. A worker that
    /// dies in between leaves them claimed, so the next takeover finishes them.
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
    ) -> Result<Reclaimed> {
        let mut claimed = self.claim_idle(keys, consumer, min_idle, count).await?;
        // A beacon of the room that a dead worker held: dropped, as its reader would have;
        // it is no task, so its takeover is not one either.
        let dropped = self.drop_beacons(keys, &mut claimed.tasks).await?;
        claimed.takeovers.retain(|t| !dropped.contains(&t.entry_id));
        let (poison, run): (Vec<Delivery>, Vec<Delivery>) = std::mem::take(&mut claimed.tasks)
            .into_iter()
            .partition(|d| d.deliveries > max_deliveries);
        // A chain step's poison ends its step like any failure, in the same script, so its
        // chain moves on (descendants cancelled, joins counted) and ends.
        let writes: Vec<Write> = poison
            .iter()
            .map(|d| {
                let finish = poison_finish(keys, d);
                let step = d.payload.as_deref().and_then(envelope::chain_step_of);
                match (step, finish.record.as_ref().and_then(|r| r.error.clone())) {
                    (Some((chain_id, step)), Some(error)) => {
                        let task_id = finish.task_id;
                        let outcome = StepOutcome::failed(chain_id, step, task_id, error);
                        Write::Step(finish, Box::new(outcome))
                    }
                    _ => Write::Task(finish),
                }
            })
            .collect();
        self.write(keys, consumer, result_ttl, &writes).await?;
        claimed.tasks = run;
        Ok(claimed)
    }

    /// Claims up to `count` entries idle longer than `min_idle` for `consumer`, poison or not,
    /// and says whom each was taken from.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn claim_idle(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Reclaimed> {
        let mut c = self.conn().await?;
        let claimed: Vec<Value> = RECLAIM
            .key(keys.stream())
            .key(keys.workers())
            .key(keys.intact())
            .arg(GROUP)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(count)
            .arg(now_ms())
            .invoke_async(&mut c)
            .await?;
        reply::parse_claimed(&claimed)
    }

    /// Joins `consumer` to the queue's intact consumers under its process's `run` token, and
    /// to its live workers, once as its worker starts (see [`Client::write_as`]). A token no
    /// other process has: a worker started again under the same id must not vouch for the
    /// entries of the one before.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn join_intact(&self, keys: &QueueKeys, consumer: &str, run: &str) -> Result<()> {
        let mut c = self.conn().await?;
        let () = redis::pipe()
            .atomic()
            .hset(keys.intact(), consumer, run)
            .ignore()
            .zadd(keys.workers(), consumer, now_ms())
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Resets the idle time of entries `consumer` still holds. Returns the ones it no
    /// longer holds (taken over by another worker, or finished).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn refresh(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        entry_ids: &[EntryId],
    ) -> Result<Vec<EntryId>> {
        if entry_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        let mut inv = REFRESH.key(keys.stream());
        inv.key(keys.workers())
            .arg(GROUP)
            .arg(consumer)
            .arg(now_ms())
            .arg(entry_ids);
        let lost: Vec<String> = inv.invoke_async(&mut c).await?;
        // The script answers with ids it was sent.
        Ok(lost.iter().filter_map(|id| EntryId::parse(id)).collect())
    }
}

/// The end of a poison task's reason, after "the task was delivered N".
const POISON_REASON: &str =
    " times without finishing; a worker probably crashed or was killed while running it";

/// A poison task's way to the dead letters: the payload as it came, the delivery count as
/// its attempts.
fn poison_finish(keys: &QueueKeys, d: &Delivery) -> Finish {
    let payload = d
        .payload
        .as_deref()
        .or(d.chain.as_deref())
        .unwrap_or_default();
    let task_id = envelope::task_id_of(keys.name(), d.entry_id, payload);
    let error = format!("the task was delivered {}{POISON_REASON}", d.deliveries);
    let mut record = TaskRecord::pending(task_id, keys.name(), Status::Dead);
    record.error = Some(error.clone());
    record.error_class = Some(ErrorClass::Poison);
    record.attempts = u32::try_from(d.deliveries).unwrap_or(u32::MAX);
    record.finished_at = Some(chrono::Utc::now());
    let mut finish = Finish::dead(
        d.entry_id,
        task_id,
        error,
        ErrorClass::Poison,
        record,
        String::from_utf8_lossy(payload).into_owned(),
    );
    // The key it held is free: a copy may run.
    if let Some((name, run)) = crate::idempotency::key_in(payload, d.entry_id) {
        let holder = super::holder(finish.task_id, &run);
        finish.end_key(name, holder, Duration::ZERO);
    }
    finish
}

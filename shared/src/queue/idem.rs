//! Idempotency keys in Redis (`crate::idempotency` says which tasks share one). The key
//! `idem:<hash>` holds the run that holds it ([`holder`]; then `+` once a copy parked behind
//! it), or `done:<id>` for its window once that run succeeded; copies that come while it is
//! held park under `\0idem:<hash>` (the
//! parked tasks of a concurrency key of limit 0, as an answer-cache flight's) and wake when
//! it ends (`finish_ops.lua`'s `end_key`, or the sweep once its record says it ended).

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{Client, Result};
use crate::ids::{EntryId, TaskId};
use crate::keys::{GROUP, QueueKeys};

static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/slots.lua"),
        include_str!("idem_take.lua")
    ))
});

/// What [`Client::take_key`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keyed {
    /// The task holds the key: run it.
    Run,
    /// A copy of a task that succeeded: this is that task's result record (JSON).
    Copy(String),
    /// The key is held by a task that has not ended: this one was parked until it does (its
    /// entry is acked and deleted).
    Parked,
    /// The key is held, and no envelope was given to park: call again with it.
    Busy,
    /// This consumer no longer holds the entry; nothing was done.
    Lost,
}

/// What a task's write does to its key once it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEnd {
    /// `idem:<hash>`.
    pub name: String,
    /// The run that holds it: [`holder`].
    pub holder: String,
    /// `Some`: the task succeeded, and its copies are answered with its answer this long;
    /// `None`: it did not, and the key is free.
    pub window: Option<Duration>,
}

/// The value of a key held by task `task_id`'s run `run`: the stream entry that first took
/// it, which the task carries on (`idempotency::RUN_FIELD`) through its retries, waits and
/// hand-backs, and which a takeover of that entry has too. Another entry sent with the same
/// task id is another run: a copy.
#[must_use]
pub fn holder(task_id: TaskId, run: &str) -> String {
    format!("{task_id}|{run}")
}

impl Client {
    /// Takes key `name` for the run `holder` ([`holder`]) of the entry `entry_id`, which this
    /// consumer is about to run, for `hold`, or says whose copy it is; a key held by another
    /// run parks `envelope` until that run ends (without an envelope, only tries:
    /// [`Keyed::Busy`]). A replayed task (`replay`) takes the key whoever holds it: it is a
    /// new run by intent.
    ///
    /// # Errors
    /// Redis fails.
    #[allow(clippy::too_many_arguments)]
    pub async fn take_key(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        entry_id: EntryId,
        name: &str,
        holder: &str,
        hold: Duration,
        replay: bool,
        envelope: Option<&str>,
    ) -> Result<Keyed> {
        let hold_ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut c = self.conn().await?;
        // A free key, the common case, is one plain SET.
        let mut set = redis::cmd("SET");
        set.arg(keys.kept(name)).arg(holder);
        if !replay {
            set.arg("NX");
        }
        set.arg("GET").arg("PX").arg(hold_ms);
        let was: Option<String> = set.query_async(&mut c).await?;
        // Its own (with `+` once copies parked behind it): a retry, a takeover.
        let own = |h: &str| h.strip_suffix('+').unwrap_or(h) == holder;
        if replay || was.as_deref().is_none_or(own) {
            return Ok(Keyed::Run);
        }
        let v: redis::Value = TAKE
            .key(keys.stream())
            .arg(GROUP)
            .arg(consumer)
            .arg(entry_id)
            .arg(name)
            .arg(holder)
            .arg(hold_ms)
            .arg(envelope.unwrap_or_default())
            .invoke_async(&mut c)
            .await?;
        Ok(match v {
            redis::Value::Int(1) => Keyed::Run,
            redis::Value::Int(0) => Keyed::Parked,
            redis::Value::Int(2) => Keyed::Busy,
            redis::Value::Int(_) => Keyed::Lost,
            other => Keyed::Copy(super::reply::as_string(&other)?),
        })
    }

    /// How many copies of keyed tasks queue `keys` answered with the first's answer, ever.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn duplicates(&self, keys: &QueueKeys) -> Result<u64> {
        let mut c = self.conn().await?;
        let n: Option<u64> = redis::cmd("GET")
            .arg(keys.duplicates())
            .query_async(&mut c)
            .await?;
        Ok(n.unwrap_or(0))
    }
}

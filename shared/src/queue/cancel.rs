//! Cancelling work: a mark in the queue's sorted set `cancels` ([`QueueKeys::cancels`]) names
//! a task, the tasks of a batch, or a tenant's work queued until the mark's time. Workers
//! keep the marks in memory (read again only when the set changed, a probe of two commands
//! per queue every [`CANCEL_NOTICE`]), so a task nobody cancelled costs no command; they end
//! what a mark names where they meet it: as they read it, before a call, and during a call,
//! which is dropped. A task that had already ended is left as it was.
//!
//! The raw form, for any language: `ZADD llmq:{<queue>}:cancels GT <now, ms> task:<id>`
//! (`docs/wire-format.md`).

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{Client, Result, reply};
use crate::ids::TaskId;
use crate::keys::QueueKeys;

static CANCEL: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("cancel.lua")));

/// How long a worker may go without reading a queue's new marks.
pub const CANCEL_NOTICE: Duration = Duration::from_millis(500);

/// How long a mark lives: the longest a cancelled task may still be met (a `run_at` or a
/// retry far ahead); older marks are dropped by the next cancel.
pub const MARK_LIFE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Task marks per script call.
const CHUNK: usize = 1000;

/// What a cancel names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One task, wherever it is: queued, waiting, or in a call (which is dropped).
    Task(TaskId),
    /// One task, only while it has not started: a caller that left before its task ran.
    Queued(TaskId),
    /// Every task of a batch (the envelopes' `batch_id`).
    Batch(String),
    /// A tenant's tasks enqueued until now; its later ones run.
    Tenant(String),
}

impl Target {
    /// The mark's member in the set.
    #[must_use]
    pub fn mark(&self) -> String {
        match self {
            Self::Task(id) => format!("task:{id}"),
            Self::Queued(id) => format!("queued:{id}"),
            Self::Batch(id) => format!("batch:{id}"),
            Self::Tenant(t) => format!("tenant:{t}"),
        }
    }

    fn task(&self) -> Option<TaskId> {
        match self {
            Self::Task(id) | Self::Queued(id) => Some(*id),
            Self::Batch(_) | Self::Tenant(_) => None,
        }
    }
}

/// What one cancel did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// The mark is set, at this time (ms): workers end what it names as they meet it.
    Marked(i64),
    /// The task had already ended so (`succeeded`, `failed`, `dead`, `cancelled`): nothing set.
    Ended(String),
}

/// The marks of one queue as read: each with when it was set (ms).
pub type Marks = Vec<(String, i64)>;

impl Client {
    /// Sets the marks of `targets`, in their order (task marks checked against their tasks'
    /// results, so a task that ended is left alone); a thousand tasks per script call.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn cancel(&self, keys: &QueueKeys, targets: &[Target]) -> Result<Vec<Cancelled>> {
        let (tasks, others): (Vec<&Target>, Vec<&Target>) =
            targets.iter().partition(|t| t.task().is_some());
        let mut c = self.conn().await?;
        let mut by_mark = std::collections::HashMap::new();
        for chunk in tasks.chunks(CHUNK).chain(std::iter::once(&others[..])) {
            if chunk.is_empty() {
                continue;
            }
            let mut inv = CANCEL.key(keys.cancels());
            inv.arg(MARK_LIFE.as_millis() as u64);
            for t in chunk {
                if let Some(id) = t.task() {
                    inv.key(keys.result(id));
                }
                inv.arg(t.mark());
            }
            let answers: Vec<redis::Value> = inv.invoke_async(&mut c).await?;
            for (t, a) in chunk.iter().zip(answers) {
                let a = reply::as_string(&a)?;
                let done = match a.parse::<i64>() {
                    Ok(ms) => Cancelled::Marked(ms),
                    Err(_) => Cancelled::Ended(a),
                };
                by_mark.insert(t.mark(), done);
            }
        }
        Ok(targets
            .iter()
            .map(|t| {
                by_mark
                    .get(&t.mark())
                    .cloned()
                    .unwrap_or(Cancelled::Marked(0))
            })
            .collect())
    }

    /// How many marks the queue has and the latest one's time: what a worker compares with
    /// what it last read, to read the marks again only when they changed.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn cancel_probe(&self, keys: &QueueKeys) -> Result<(u64, i64)> {
        let mut c = self.conn().await?;
        let (n, top): (u64, Vec<(String, f64)>) = redis::pipe()
            .cmd("ZCARD")
            .arg(keys.cancels())
            .cmd("ZRANGE")
            .arg(keys.cancels())
            .arg(-1)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await?;
        Ok((n, top.first().map_or(0, |(_, s)| *s as i64)))
    }

    /// Drops the marks that name tasks `task_ids` (`task:` and `queued:`), once each has ended
    /// cancelled and its outcome is written: a mark that names one task is spent then, and the
    /// set stays as small as what is still to cancel.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn forget_cancels(&self, keys: &QueueKeys, task_ids: &[TaskId]) -> Result<()> {
        if task_ids.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(keys.cancels());
        for id in task_ids {
            cmd.arg(Target::Task(*id).mark())
                .arg(Target::Queued(*id).mark());
        }
        let _: u64 = cmd.query_async(&mut c).await?;
        Ok(())
    }

    /// The queue's marks set at or after `since` (ms).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn cancel_marks(&self, keys: &QueueKeys, since: i64) -> Result<Marks> {
        let mut c = self.conn().await?;
        let marks: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(keys.cancels())
            .arg(since)
            .arg("+inf")
            .arg("BYSCORE")
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await?;
        Ok(marks.into_iter().map(|(m, s)| (m, s as i64)).collect())
    }
}

/// What a mark may name of a task.
#[derive(Debug, Clone, Copy)]
pub struct Named<'a> {
    pub task_id: TaskId,
    pub batch: Option<&'a str>,
    pub tenant: Option<&'a str>,
    /// When it was enqueued (ms): a tenant's mark ends what was enqueued until it.
    pub enqueued_ms: i64,
    /// Whether it has started (a call was made, or it is running here): a `queued:` mark
    /// no longer names it.
    pub started: bool,
}

impl<'a> Named<'a> {
    /// What of `env` (read from entry `entry_ms`) a mark may name.
    #[must_use]
    pub fn of(
        task_id: TaskId,
        env: &'a crate::envelope::Envelope,
        entry_ms: i64,
        started: bool,
    ) -> Self {
        Self {
            task_id,
            batch: env.batch_id.as_deref(),
            tenant: env.tenant.as_deref(),
            enqueued_ms: env.enqueued_at.map_or(entry_ms, |t| t.timestamp_millis()),
            started,
        }
    }
}

/// Why `task` is cancelled by one of `marks` (mark -> when set, ms), as its record says it;
/// `None` when none names it.
#[must_use]
pub fn why(marks: &std::collections::HashMap<String, i64>, task: Named<'_>) -> Option<String> {
    let at = |ms: i64| {
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms).map_or_else(String::new, |t| {
            t.format(" at %Y-%m-%dT%H:%M:%SZ").to_string()
        })
    };
    let id = task.task_id;
    let mark = |t: Target| marks.get(&t.mark()).copied();
    if let Some(ms) = mark(Target::Task(id)) {
        return Some(format!("cancelled (llmq cancel{})", at(ms)));
    }
    if !task.started && mark(Target::Queued(id)).is_some() {
        return Some("cancelled before it started: its caller left".to_owned());
    }
    if let Some(batch) = task.batch
        && let Some(ms) = mark(Target::Batch(batch.to_owned()))
    {
        return Some(format!("cancelled with its batch {batch}{}", at(ms)));
    }
    if let Some(tenant) = task.tenant
        && let Some(ms) = mark(Target::Tenant(tenant.to_owned()))
        && task.enqueued_ms <= ms
    {
        return Some(format!(
            "cancelled with the work of tenant {tenant} queued until{}",
            at(ms)
        ));
    }
    None
}

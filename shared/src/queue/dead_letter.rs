//! Dead letters: listing, finding, replaying, purging, and the scheduler's fenced trim.

use std::sync::LazyLock;

use super::Conn;
use redis::{Script, Value};

use super::{Client, DeadLetter, Fence, NOT_HOLDER, Result, reply};
use crate::envelope::Envelope;
use crate::keys::QueueKeys;
use crate::outcome::{Status, TaskRecord};

static REPLAY: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("replay.lua")));
static TRIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/fence.lua"),
        include_str!("trim.lua")
    ))
});

/// What replaying a dead letter did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// The task is back in the stream.
    Enqueued,
    /// The dead letter was no longer there.
    Gone,
    /// A chain step's: its chain runs these steps again.
    Resumed(Vec<String>),
    /// Nothing was done, for this reason.
    Refused(String),
}

impl Client {
    /// The dead letters of a queue, newest first, at most `limit`.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn dead_letters(&self, keys: &QueueKeys, limit: usize) -> Result<Vec<DeadLetter>> {
        self.dead_letters_before(keys, None, limit).await
    }

    /// The dead letters of a queue older than dead-entry id `before` (from the newest when
    /// `None`), newest first, at most `limit`: a page that starts where the last one ended.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn dead_letters_before(
        &self,
        keys: &QueueKeys,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let mut c = self.conn().await?;
        let mut out = Vec::new();
        let mut end = before.map_or_else(|| "+".to_owned(), |id| format!("({id}"));
        while out.len() < limit {
            let page: Value = redis::cmd("XREVRANGE")
                .arg(keys.dead())
                .arg(&end)
                .arg("-")
                .arg("COUNT")
                .arg(500.min(limit - out.len()))
                .query_async(&mut c)
                .await?;
            let entries = reply::parse_entries(page)?;
            let full = entries.len() == 500.min(limit - out.len());
            let Some((last, _)) = entries.last() else {
                break;
            };
            end = format!("({last}");
            out.extend(
                entries
                    .into_iter()
                    .map(|(id, f)| reply::dead_letter(keys.name(), id, &f)),
            );
            if !full {
                break;
            }
        }
        Ok(out)
    }

    /// One page of a queue's dead letters between dead-entry ids (or `-`, `+`, `(id` for
    /// an exclusive bound) `from` and `to`, at most `count`: oldest first, or newest first
    /// with `newest_first` (then `from` is the upper bound, as for `XREVRANGE`).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn dead_range(
        &self,
        keys: &QueueKeys,
        from: &str,
        to: &str,
        count: usize,
        newest_first: bool,
    ) -> Result<Vec<DeadLetter>> {
        let mut c = self.conn().await?;
        let page: Value = redis::cmd(if newest_first { "XREVRANGE" } else { "XRANGE" })
            .arg(keys.dead())
            .arg(from)
            .arg(to)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut c)
            .await?;
        Ok(reply::parse_entries(page)?
            .into_iter()
            .map(|(id, f)| reply::dead_letter(keys.name(), id, &f))
            .collect())
    }

    /// The dead letters with these dead-entry ids, one lookup each (no scan): those that
    /// exist, in the order asked.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn dead_letters_at(
        &self,
        keys: &QueueKeys,
        ids: &[String],
    ) -> Result<Vec<DeadLetter>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("XRANGE").arg(keys.dead()).arg(id).arg(id);
        }
        let pages: Vec<Value> = pipe.query_async(&mut c).await?;
        let mut out = Vec::new();
        for page in pages {
            out.extend(
                reply::parse_entries(page)?
                    .into_iter()
                    .map(|(id, f)| reply::dead_letter(keys.name(), id, &f)),
            );
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
            .map(|(id, f)| reply::dead_letter(keys.name(), id, &f))
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
            .filter(|d| {
                let task_id = d.task_id.to_string();
                ids.iter().any(|id| *id == d.id || *id == task_id)
            })
            .collect())
    }

    /// Re-enqueues a dead letter with its attempts reset (and, if given, a new provider),
    /// removing it from the dead letters in the same step. A chain step's dead letter resumes
    /// its chain instead: the step and every step after it run again in their next round,
    /// as `llmq chain retry --from STEP` runs them, and the letter is removed.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn replay(
        &self,
        keys: &QueueKeys,
        dead: &DeadLetter,
        provider: Option<&str>,
    ) -> Result<Replayed> {
        if let Some((chain_id, step)) = crate::envelope::chain_step_of(dead.task.as_bytes()) {
            return self.resume(keys, dead, &chain_id, &step).await;
        }
        let task = replayed_task(dead, provider);
        let mut c = self.conn().await?;
        let replayed: i64 = REPLAY
            .key(keys.dead())
            .key(keys.stream())
            .key(keys.result(dead.task_id))
            .arg(&dead.id)
            .arg(task)
            .invoke_async(&mut c)
            .await?;
        Ok(if replayed == 1 {
            Replayed::Enqueued
        } else {
            Replayed::Gone
        })
    }

    /// Runs step `step` of chain `chain_id` and what follows it again, for its dead letter.
    async fn resume(
        &self,
        keys: &QueueKeys,
        dead: &DeadLetter,
        chain_id: &str,
        step: &str,
    ) -> Result<Replayed> {
        let Some(state) = self.chain(keys, chain_id).await? else {
            return Ok(Replayed::Refused(format!(
                "chain {chain_id} is gone (its keys expired); step `{step}` cannot run without it"
            )));
        };
        // Only the letter of the step's current round, and only once the step has ended
        // without success: an older round's letter, or a refused copy's, resumes nothing.
        let current = state
            .steps
            .get(step)
            .is_some_and(|s| s.task_id == Some(dead.task_id) && s.status.unsucceeded());
        if !current {
            return Ok(Replayed::Refused(format!(
                "step `{step}` of chain {chain_id} is not failed in the round this letter is of; nothing to resume (purge it, or use llmq chain retry)"
            )));
        }
        let reruns = match state.retry(Some(step)) {
            Ok(r) => r,
            Err(why) => return Ok(Replayed::Refused(why)),
        };
        match self.retry_chain(keys, chain_id, &reruns).await? {
            Ok(_) => {
                let mut c = self.conn().await?;
                redis::cmd("XDEL")
                    .arg(keys.dead())
                    .arg(&dead.id)
                    .query_async::<()>(&mut c)
                    .await?;
                Ok(Replayed::Resumed(
                    reruns.into_iter().map(|r| r.step).collect(),
                ))
            }
            Err(_) => Ok(Replayed::Refused(format!(
                "chain {chain_id} is still running; replay step `{step}` once it has ended"
            ))),
        }
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
                .arg(keys.result(d.task_id))
                .query_async(&mut c)
                .await?;
            if let Some(mut record) =
                stored.and_then(|s| serde_json::from_str::<TaskRecord>(&s).ok())
            {
                record.status = Status::Failed;
                redis::cmd("SET")
                    .arg(keys.result(d.task_id))
                    .arg(record.to_json())
                    .arg("KEEPTTL")
                    .query_async::<()>(&mut c)
                    .await?;
            }
        }
        Ok(deleted)
    }

    /// Deletes archived dead letters `ids` from `keys`' dead stream, for the lease holder
    /// only. Returns how many were deleted, or `None` when `fence` no longer holds the lease.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn trim_dead(
        &self,
        fence: Fence<'_>,
        keys: &QueueKeys,
        ids: &[String],
    ) -> Result<Option<u64>> {
        let mut c = self.conn().await?;
        let answer: i64 = TRIM
            .key(keys.fence())
            .key(keys.dead())
            .arg(fence.holder)
            .arg(fence.token)
            .arg(ids)
            .invoke_async(&mut c)
            .await?;
        Ok((answer != NOT_HOLDER).then(|| u64::try_from(answer).unwrap_or(0)))
    }

    pub(super) async fn range(
        &self,
        c: &mut Conn,
        key: &str,
        start: &str,
        count: usize,
    ) -> Result<Vec<reply::Entry>> {
        let page: Value = redis::cmd("XRANGE")
            .arg(key)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(c)
            .await?;
        reply::parse_entries(page)
    }
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
            env.waiting_since = None;
            // Saturating: a letter forged with the largest count neither panics nor wraps to
            // 0, which would make the run look like the first one in the ledger.
            env.replays = env.replays.saturating_add(1);
            env.last_error = None;
            if env.id.is_none() {
                env.id = Some(dead.task_id);
            }
            if let Some(p) = provider {
                env.provider = Some(p.into());
            }
            env.to_json()
        }
        Err(_) => dead.task.clone(),
    }
}

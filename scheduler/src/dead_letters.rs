//! The `dead_letters` duty: archive to Postgres, then trim from Redis.
//!
//! Two steps, in this order, per batch of the oldest letters due to leave Redis:
//!
//! 1. [`Scheduler::archive_step`] inserts them into `dead_letters_archive` (`ON CONFLICT DO
//!    NOTHING`, keyed by queue and dead-entry id) and commits;
//! 2. [`Scheduler::trim_step`] deletes from the dead stream only the letters Postgres holds.
//!
//! A scheduler that dies between the two leaves the letters in both places; the next run
//! selects them again, the insert is a no-op and the trim deletes them. Nothing is deleted
//! before it is archived, and nothing is archived twice.
//!
//! This is also the only stream trimming llmq needs: results expire by their own TTL and
//! workers delete acked entries from the ready streams at once.

use std::collections::HashSet;

use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::DeadLetter;
use llmq_shared::text::storable;

use crate::{Result, Scheduler};

/// Letters archived and trimmed per batch.
pub(crate) const BATCH: usize = 500;
/// Batches per queue per run; the rest wait for the next run.
const MAX_BATCHES: usize = 20;

impl Scheduler {
    /// The `dead_letters` duty over every queue it serves: archive then trim each batch, then
    /// delete archived rows older than `keep_archived`. Returns what it did.
    ///
    /// # Errors
    /// Redis or Postgres fails; [`crate::Error::NotLeader`] when another instance took over.
    pub async fn archive_dead_letters(&mut self) -> Result<String> {
        let queues = self.served_queues().await?;
        let (mut archived, mut trimmed) = (0, 0);
        for queue in &queues {
            let keys = QueueKeys::new(queue);
            for _ in 0..MAX_BATCHES {
                let letters = self.archive_step(&keys, BATCH).await?;
                if letters.is_empty() {
                    break;
                }
                archived += letters.len();
                let n = self.trim_step(&keys, &letters).await?;
                trimmed += n;
                if n == 0 || letters.len() < BATCH {
                    break;
                }
            }
        }
        let purged = self.purge_archive().await?;
        Ok(format!(
            "archived {archived} and trimmed {trimmed} dead letter(s) of {} queue(s); deleted {purged} expired archived letter(s)",
            queues.len()
        ))
    }

    /// Step 1: inserts up to `limit` of the oldest dead letters of `queue` that are due to
    /// leave Redis (older than `keep_in_redis`, or beyond `max_in_redis`) into the archive,
    /// and commits. Returns them; they are still in Redis.
    ///
    /// # Errors
    /// Redis or Postgres fails; [`crate::Error::NotLeader`] when a newer holder has written
    /// to Postgres (then nothing is archived).
    pub async fn archive_step(
        &mut self,
        queue: &QueueKeys,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let now = self.now();
        let keep = chrono::Duration::from_std(self.retention.keep_in_redis)
            .unwrap_or(chrono::Duration::MAX);
        let cutoff_ms = now
            .checked_sub_signed(keep)
            .map_or(i64::MIN, |t| t.timestamp_millis());
        let mut c = self.redis.conn().await?;
        let len: u64 = redis::cmd("XLEN")
            .arg(queue.dead())
            .query_async(&mut c)
            .await?;
        let excess = len.saturating_sub(self.retention.max_in_redis);
        let mut due = Vec::new();
        let mut start = "-".to_owned();
        let mut index = 0u64;
        'pages: while due.len() < limit {
            let after = (start != "-").then_some(start.as_str());
            let page = self.redis.oldest_dead_letters(queue, after, BATCH).await?;
            let full = page.len() == BATCH;
            let last = page.last().map(|l| l.id.clone());
            for letter in page {
                // Letters are appended as tasks die, so the first young one ends the search.
                if index >= excess && age_ms(&letter) >= cutoff_ms {
                    break 'pages;
                }
                due.push(letter);
                index += 1;
                if due.len() >= limit {
                    break 'pages;
                }
            }
            match last {
                Some(last) if full => start = last,
                _ => break,
            }
        }
        if due.is_empty() {
            return Ok(due);
        }
        let mut tx = self.lease.fenced_tx(&self.redis, &self.pool).await?;
        sqlx::query(
            "INSERT INTO dead_letters_archive
                 (queue, dead_id, task_id, error, class, attempts, failed_at, task, archived_at)
             SELECT $1, l.dead_id, l.task_id, l.error, l.class, l.attempts, l.failed_at, l.task, $9
             FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::int8[],
                         $7::timestamptz[], $8::text[])
                  AS l(dead_id, task_id, error, class, attempts, failed_at, task)
             ON CONFLICT (queue, dead_id) DO NOTHING",
        )
        .bind(queue.name())
        // A dead letter's text is whatever a producer or a provider sent: NUL becomes U+FFFD,
        // or one letter would stop the duty for its whole queue.
        .bind(due.iter().map(|d| storable(&d.id)).collect::<Vec<_>>())
        .bind(
            due.iter()
                .map(|d| d.task_id.to_string())
                .collect::<Vec<_>>(),
        )
        .bind(due.iter().map(|d| storable(&d.error)).collect::<Vec<_>>())
        .bind(due.iter().map(|d| storable(&d.class)).collect::<Vec<_>>())
        .bind(
            due.iter()
                .map(|d| i64::try_from(d.attempts).unwrap_or(i64::MAX))
                .collect::<Vec<_>>(),
        )
        .bind(due.iter().map(|d| d.failed_at).collect::<Vec<_>>())
        .bind(due.iter().map(|d| storable(&d.task)).collect::<Vec<_>>())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(due)
    }

    /// Step 2: deletes `letters` from `queue`'s dead stream, but only those the archive holds
    /// (same queue, dead-entry id and task id). Returns how many were deleted.
    ///
    /// # Errors
    /// Redis or Postgres fails; [`crate::Error::NotLeader`] when the lease is no longer ours
    /// (then nothing is deleted).
    pub async fn trim_step(&mut self, queue: &QueueKeys, letters: &[DeadLetter]) -> Result<u64> {
        if letters.is_empty() {
            return Ok(0);
        }
        let archived: HashSet<String> = sqlx::query_scalar(
            "SELECT a.dead_id FROM dead_letters_archive a
             JOIN UNNEST($2::text[], $3::text[]) AS l(dead_id, task_id)
               ON a.dead_id = l.dead_id AND a.task_id = l.task_id
             WHERE a.queue = $1",
        )
        .bind(queue.name())
        .bind(letters.iter().map(|d| d.id.clone()).collect::<Vec<_>>())
        .bind(
            letters
                .iter()
                .map(|d| d.task_id.to_string())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect();
        let ids: Vec<String> = letters
            .iter()
            .filter(|d| archived.contains(&d.id))
            .map(|d| d.id.clone())
            .collect();
        if ids.len() < letters.len() {
            tracing::warn!(
                queue = queue.name(),
                missing = letters.len() - ids.len(),
                "some dead letters are not in the archive; they stay in Redis"
            );
        }
        if ids.is_empty() {
            return Ok(0);
        }
        self.lease.trim(&self.redis, queue, &ids).await
    }

    /// Deletes archived dead letters older than `keep_archived` (of the queues this instance
    /// serves, or of every queue). Returns how many.
    ///
    /// # Errors
    /// Postgres fails; [`crate::Error::NotLeader`] when a newer holder has written.
    pub async fn purge_archive(&mut self) -> Result<u64> {
        let keep = chrono::Duration::from_std(self.retention.keep_archived)
            .unwrap_or(chrono::Duration::MAX);
        let Some(cutoff) = self.now().checked_sub_signed(keep) else {
            return Ok(0);
        };
        let mut tx = self.lease.fenced_tx(&self.redis, &self.pool).await?;
        let purged = sqlx::query(
            "DELETE FROM dead_letters_archive
             WHERE archived_at < $1 AND (cardinality($2::text[]) = 0 OR queue = ANY($2))",
        )
        .bind(cutoff)
        .bind(&self.queues)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(purged)
    }
}

/// When a letter died: its `failed_at`, else the time in its entry id.
fn age_ms(letter: &DeadLetter) -> i64 {
    letter.failed_at.map_or_else(
        || {
            letter
                .id
                .split('-')
                .next()
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(0)
        },
        |t| t.timestamp_millis(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_letter_without_failed_at_is_as_old_as_its_entry_id() {
        let mut d = DeadLetter {
            id: "1700000000123-4".into(),
            task_id: llmq_shared::ids::TaskId::random(),
            queue: "q".into(),
            error: String::new(),
            class: String::new(),
            attempts: 0,
            failed_at: None,
            task: String::new(),
        };
        assert_eq!(age_ms(&d), 1_700_000_000_123);
        d.failed_at = chrono::DateTime::from_timestamp_millis(5);
        assert_eq!(age_ms(&d), 5);
    }
}

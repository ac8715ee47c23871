//! The `ledger_partitions` duty: the ledger's tables are partitioned by month
//! (`migrations/20261127000001_partitions.sql`). This makes the partitions of the next
//! [`AHEAD`] before any row needs them (a row that comes early waits in the default partition
//! and moves into its month's when that is made), and, with `ledger.retention`, drops the
//! months whose last day is older than the retention: whole tables, so no DELETE and no
//! bloat. The first partition (`*_legacy`: on an upgraded ledger, the whole history before
//! the upgrade) loses the rows of those months by an exact range, until it is dropped whole
//! in turn. The rollups are separate tables and keep those months' sums.

use std::time::Duration;

use crate::{Result, Scheduler};

/// How often the duty runs.
pub const EVERY: Duration = Duration::from_secs(3600);

/// How far ahead partitions are made.
pub const AHEAD: chrono::TimeDelta = chrono::TimeDelta::days(92);

impl Scheduler {
    /// Makes the coming months' partitions and drops those past `ledger.retention`, in one
    /// fenced transaction. Returns what it did.
    ///
    /// # Errors
    /// Postgres fails (a lock not had within 10 s: retried next period);
    /// [`crate::Error::NotLeader`] when the lease is no longer ours.
    pub async fn keep_ledger_partitions(&mut self) -> Result<String> {
        let now = self.now();
        let mut tx = self.lease.fenced_tx(&self.redis, &self.pool).await?;
        // Making or dropping a partition locks its table for a moment; never queue the
        // workers' writes behind a long wait for it.
        sqlx::query("SET LOCAL lock_timeout = '10s'")
            .execute(&mut *tx)
            .await?;
        let made: i32 = sqlx::query_scalar("SELECT ledger_make_partitions($1)")
            .bind(now + AHEAD)
            .fetch_one(&mut *tx)
            .await?;
        let dropped: Vec<String> = match self.config.ledger.retention {
            Some(keep) => {
                let before = now - chrono::TimeDelta::from_std(keep).unwrap_or_default();
                sqlx::query_scalar("SELECT ledger_drop_partitions($1)")
                    .bind(before)
                    .fetch_all(&mut *tx)
                    .await?
            }
            None => Vec::new(),
        };
        tx.commit().await?;
        // The function names each partition it dropped, and says of each first partition
        // how many of its rows it deleted by range ("tasks_legacy: 12 rows before ...").
        let (pruned, dropped): (Vec<String>, Vec<String>) =
            dropped.into_iter().partition(|d| d.contains(": "));
        if !dropped.is_empty() || !pruned.is_empty() {
            tracing::info!(partitions = ?dropped, pruned = ?pruned, "dropped ledger months past ledger.retention");
        }
        let mut did = format!(
            "{made} partition(s) made, {} dropped{}",
            dropped.len(),
            if dropped.is_empty() {
                String::new()
            } else {
                format!(" ({})", dropped.join(", "))
            }
        );
        if !pruned.is_empty() {
            did.push_str(&format!("; deleted {}", pruned.join(", ")));
        }
        Ok(did)
    }
}

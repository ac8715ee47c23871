//! The `ledger_rollups` duty: sums the ledger's rows written since the last roll into its
//! rollups (`migrations/20261204000001_deferred_rollups.sql`), so that the rows a report has
//! to sum when it rolls before it reads stay few. Postgres runs one roll at a time and each
//! is exact whoever runs it, so the duty needs no fence.

use std::time::Duration;

use crate::{Result, Scheduler};

/// How often the duty runs.
pub const EVERY: Duration = Duration::from_secs(10);

impl Scheduler {
    /// Rolls the ledger up. Returns what it did.
    ///
    /// # Errors
    /// Postgres fails (retried next period).
    pub async fn roll_ledger(&mut self) -> Result<String> {
        llmq_shared::ledger::roll(&self.pool).await?;
        Ok("rolled".to_owned())
    }
}

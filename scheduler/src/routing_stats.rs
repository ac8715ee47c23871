//! The `routing_stats` duty: with a learned `routing.strategy`, what the fleet observed of
//! each model (tasks it answered or failed on its own account, and those that succeeded
//! without a review or check rejecting their output) per task type and risk, read from the
//! ledger over the last [`WINDOW`] and written to Redis, where every worker reads one view.
//! Redis holds nothing the ledger does not: after a restart the next run writes it again.

use std::time::Duration;

use llmq_shared::config::Strategy;

use crate::{Result, Scheduler};

/// How far back the stats look.
pub const WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

impl Scheduler {
    /// Reads the routing stats of the served queues from the ledger and stores them for the
    /// workers. Returns what it did.
    ///
    /// # Errors
    /// Redis or Postgres fails; [`crate::Error::NotLeader`] when the lease is no longer ours.
    pub async fn refresh_routing_stats(&mut self) -> Result<String> {
        if self.config.routing.strategy == Strategy::Cheapest {
            return Ok("routing.strategy is cheapest: no stats to keep".into());
        }
        let queues = self.served_queues().await?;
        let since = self.now() - chrono::Duration::from_std(WINDOW).unwrap_or_default();
        let stats = llmq_shared::ledger::Ledger::from_pool(self.pool.clone())
            .routing_stats(&queues, since)
            .await?;
        let rows = stats.rows();
        let json = serde_json::to_string(&rows).unwrap_or_else(|_| "[]".into());
        self.lease.put_routing_stats(&self.redis, &json).await?;
        Ok(format!(
            "{} row(s) of routing stats from {} queue(s)",
            rows.len(),
            queues.len()
        ))
    }
}

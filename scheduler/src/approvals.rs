//! The `approvals` duty: a chain step nobody approved or rejected by its deadline gets its
//! `on_timeout` (reject unless the chain says approve), through the queue's own decision
//! script, which decides a step once (a decision an operator took first stands) and is
//! fenced: a scheduler that lost the lease decides nothing.

use llmq_shared::chain::OnTimeout;
use llmq_shared::keys::QueueKeys;

use crate::{Result, Scheduler};

impl Scheduler {
    /// Applies `on_timeout` to every approval past its deadline. Returns what it did.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn expire_approvals(&mut self) -> Result<String> {
        let now = self.now();
        let queues = self.served_queues().await?;
        let mut decided = 0usize;
        for queue in &queues {
            let keys = QueueKeys::new(queue);
            for (chain, step, deadline) in self
                .redis
                .approvals(&keys, Some(now.timestamp_millis()))
                .await?
            {
                let rule = self
                    .redis
                    .chain(&keys, &chain)
                    .await?
                    .and_then(|c| c.spec.step(&step)?.on_timeout)
                    .unwrap_or_default();
                let when = chrono::DateTime::from_timestamp_millis(deadline)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_default();
                let (approve, note) = match rule {
                    OnTimeout::Approve => (
                        true,
                        format!("nobody decided by {when}; on_timeout: approve"),
                    ),
                    OnTimeout::Reject => (
                        false,
                        format!("nobody decided by {when}; on_timeout: reject"),
                    ),
                };
                if self
                    .lease
                    .decide_approval(&self.redis, &keys, &chain, &step, approve, &note)
                    .await?
                {
                    tracing::info!(queue, chain, step, approve, "an approval timed out");
                    decided += 1;
                }
            }
        }
        Ok(format!("applied on_timeout to {decided} approval(s)"))
    }
}

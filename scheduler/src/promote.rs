//! The `promote` duty: moves due delayed tasks (retries, waits for a provider, `run_at`) to
//! their streams and wakes tasks parked on a concurrency key into free slots, as every
//! worker also does. With workers scaled to zero (KEDA's
//! `minReplicaCount: 0`) nobody else would: the task would stay in `delayed`, out of the
//! stream length the autoscaler reads, until something new arrived in its queue.

use llmq_shared::keys::QueueKeys;

use crate::{Result, Scheduler};

/// Tasks moved per script call.
const LIMIT: usize = 1000;
/// Calls per queue per run; the rest wait for the next run.
const MAX_CALLS: usize = 10;

impl Scheduler {
    /// Moves every served queue's due delayed tasks to its stream. Returns what it did.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn promote_due(&mut self) -> Result<String> {
        let queues = self.served_queues().await?;
        let mut moved = 0;
        for queue in &queues {
            let keys = QueueKeys::new(queue);
            self.redis.sweep_slots(&keys).await?;
            for _ in 0..MAX_CALLS {
                let (n, _) = self.redis.promote(&keys, LIMIT).await?;
                moved += n;
                if (n as usize) < LIMIT {
                    break;
                }
            }
        }
        Ok(format!(
            "moved {moved} due delayed task(s) of {} queue(s) to their streams",
            queues.len()
        ))
    }
}

//! The `chains` duty: a chain's keys expire with its results (the worker's `--result-ttl`
//! after it ends), but its entry in the queue's chains index (`llmq:{q}:chains`, what
//! `llmq chain list` reads) has no TTL of its own. This duty drops the entries whose chain
//! has expired, a page at a time through a fenced script, so Redis memory stays flat however
//! many chains a queue runs.

use std::collections::HashMap;

use llmq_shared::keys::QueueKeys;

use crate::{Result, Scheduler};

/// Index entries read per script call.
const PAGE: u64 = 1000;
/// Calls per queue per run; a longer index is read on from where a run stopped.
const MAX_CALLS: usize = 100;

impl Scheduler {
    /// Drops the expired chains from every served queue's chains index. Returns what it did.
    ///
    /// # Errors
    /// Redis fails; [`crate::Error::NotLeader`] when the lease is no longer ours.
    pub async fn trim_chains(&mut self) -> Result<String> {
        let queues = self.served_queues().await?;
        let mut cursors = std::mem::take(&mut self.chain_cursors);
        let mut dropped = 0;
        let outcome = async {
            for queue in &queues {
                let keys = QueueKeys::new(queue);
                let first = cursors.entry(queue.clone()).or_default();
                for _ in 0..MAX_CALLS {
                    let (gone, read) = self
                        .lease
                        .trim_chains(&self.redis, &keys, *first, PAGE)
                        .await?;
                    dropped += gone;
                    *first += read - gone;
                    if read < PAGE {
                        // The end of the index: the next run starts again from the oldest.
                        *first = 0;
                        break;
                    }
                }
            }
            Ok::<_, crate::Error>(())
        }
        .await;
        cursors.retain(|q, _| queues.contains(q));
        self.chain_cursors = cursors;
        outcome?;
        Ok(format!(
            "dropped {dropped} expired chain(s) from the chains index of {} queue(s)",
            queues.len()
        ))
    }
}

/// Where each queue's next run starts reading its index.
pub(crate) type Cursors = HashMap<String, u64>;

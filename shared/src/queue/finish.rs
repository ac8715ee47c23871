//! Finishing tasks: a batch of outcomes in one script, and promoting due delayed tasks.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{Client, Finish, Result, now_ms};
use crate::keys::{GROUP, QueueKeys};
use crate::outcome::TaskRecord;

static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/settle.lua"),
        include_str!("finish.lua")
    ))
});
static PROMOTE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("promote.lua")));

impl Client {
    /// Moves up to `limit` due delayed tasks to the stream. Returns how many moved and when
    /// the next one is due (ms since the epoch).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn promote(&self, keys: &QueueKeys, limit: usize) -> Result<(u64, Option<i64>)> {
        let mut c = self.conn().await?;
        let (moved, next): (u64, i64) = PROMOTE
            .key(keys.delayed())
            .key(keys.stream())
            .arg(now_ms())
            .arg(limit)
            .invoke_async(&mut c)
            .await?;
        Ok((moved, (next >= 0).then_some(next)))
    }

    /// Applies a batch of outcomes in one script. Returns, per item, whether it was applied
    /// (`false`: the entry was no longer ours, so nothing was written).
    ///
    /// # Errors
    /// Redis fails; then nothing of the batch was applied.
    pub async fn finish(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        result_ttl: Duration,
        items: &[Finish],
    ) -> Result<Vec<bool>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = FINISH.key(keys.stream());
        inv.key(keys.delayed()).key(keys.dead());
        for item in items {
            inv.key(keys.result(&item.task_id));
        }
        let order = |id: &str| {
            let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
            (
                ms.parse::<u64>().unwrap_or(0),
                seq.parse::<u64>().unwrap_or(0),
            )
        };
        let lowest = items
            .iter()
            .map(|i| i.entry_id.as_str())
            .min_by_key(|id| order(id))
            .unwrap_or("-");
        let highest = items
            .iter()
            .map(|i| i.entry_id.as_str())
            .max_by_key(|id| order(id))
            .unwrap_or("+");
        inv.arg(GROUP)
            .arg(consumer)
            .arg(result_ttl.as_secs().max(1))
            .arg(now_ms())
            .arg(lowest)
            .arg(highest);
        for item in items {
            let (kind, a, b) = item.kind.args();
            inv.arg(&item.entry_id)
                .arg(kind)
                .arg(
                    item.record
                        .as_ref()
                        .map(TaskRecord::to_json)
                        .unwrap_or_default(),
                )
                .arg(&item.envelope)
                .arg(a)
                .arg(b);
        }
        let mut c = self.conn().await?;
        let applied: Vec<i64> = inv.invoke_async(&mut c).await?;
        Ok(applied.into_iter().map(|a| a == 1).collect())
    }
}

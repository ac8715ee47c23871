//! Pausing a queue: while `llmq:{q}:paused` exists, workers take none of its tasks. Tasks in
//! flight finish; everything else waits in the stream, `delayed` and the dead letters as
//! before, and runs after `resume`.
//!
//! Workers read the flag at most [`PAUSE_NOTICE`] before handing a task on, and hand back
//! (with [`Client::unread`]) what they read from a queue paused meanwhile, so a pause takes
//! hold within that time without costing an idle worker a command.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{Client, Result};
use crate::ids::EntryId;
use crate::keys::{GROUP, QueueKeys};

static UNREAD: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("unread.lua")));

/// How stale a worker's knowledge of a pause may be when it hands a task on.
pub const PAUSE_NOTICE: Duration = Duration::from_millis(750);

/// Who paused a queue, when, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Paused {
    pub by: String,
    pub at: chrono::DateTime<chrono::Utc>,
    #[serde(default)]
    pub reason: String,
}

impl Client {
    /// Pauses the queue; returns false when it already was (the first pause is kept).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn pause_queue(&self, keys: &QueueKeys, by: &str, reason: &str) -> Result<bool> {
        let record = Paused {
            by: by.to_owned(),
            at: chrono::Utc::now(),
            reason: reason.to_owned(),
        };
        let json = serde_json::to_string(&record).unwrap_or_default();
        let mut c = self.conn().await?;
        let set: Option<String> = redis::cmd("SET")
            .arg(keys.paused())
            .arg(json)
            .arg("NX")
            .query_async(&mut c)
            .await?;
        Ok(set.is_some())
    }

    /// Resumes the queue; returns false when it was not paused.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn resume_queue(&self, keys: &QueueKeys) -> Result<bool> {
        let mut c = self.conn().await?;
        let n: u64 = redis::cmd("DEL")
            .arg(keys.paused())
            .query_async(&mut c)
            .await?;
        Ok(n > 0)
    }

    /// Whether the queue is paused, and by whom.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn paused(&self, keys: &QueueKeys) -> Result<Option<Paused>> {
        let mut c = self.conn().await?;
        let raw: Option<String> = redis::cmd("GET")
            .arg(keys.paused())
            .query_async(&mut c)
            .await?;
        // A flag set by hand with any value still pauses: workers test only that it exists.
        Ok(raw.map(|r| {
            serde_json::from_str(&r).unwrap_or_else(|_| Paused {
                by: "unknown".into(),
                at: chrono::Utc::now(),
                reason: r,
            })
        }))
    }

    /// Whether the queue is paused: one `EXISTS`, for workers.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn is_paused(&self, keys: &QueueKeys) -> Result<bool> {
        let mut c = self.conn().await?;
        Ok(redis::cmd("EXISTS")
            .arg(keys.paused())
            .query_async(&mut c)
            .await?)
    }

    /// Hands entries `ids`, read by `consumer` but not run, back to the stream unchanged
    /// (see `unread.lua`); returns how many went back.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn unread(&self, keys: &QueueKeys, consumer: &str, ids: &[EntryId]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut c = self.conn().await?;
        let mut inv = UNREAD.key(keys.stream());
        inv.arg(GROUP).arg(consumer);
        for id in ids {
            inv.arg(id);
        }
        Ok(inv.invoke_async(&mut c).await?)
    }
}

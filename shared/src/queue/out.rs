//! A task's live answer (`llmq:{q}:out:<task id>`): a stream a streaming call appends its
//! text to as it arrives, ended by an entry saying how it ended. Any language follows it
//! with `XREAD BLOCK`.

use std::collections::HashMap;
use std::time::Duration;

use super::Conn;

use super::{Client, Result};
use crate::ids::TaskId;
use crate::keys::QueueKeys;

/// How long a live answer is kept after its first entry (renewed by its last).
pub const OUT_TTL: Duration = Duration::from_secs(3600);

/// The most entries a live answer keeps (about; older ones go first).
const OUT_MAX_ENTRIES: u64 = 10_000;

/// One entry of a live answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutEntry {
    /// `text`: the next piece of the answer.
    Text(String),
    /// `event: restart`, `error`: the call failed after part of its answer; what was
    /// written is void, and a retry's answer follows.
    Restart(String),
    /// `event: done`: the answer is complete (the result record follows).
    Done,
}

impl OutEntry {
    fn fields(&self) -> Vec<(&'static str, &str)> {
        match self {
            Self::Text(t) => vec![("text", t)],
            Self::Restart(e) => vec![("event", "restart"), ("error", e)],
            Self::Done => vec![("event", "done")],
        }
    }

    fn from_fields(f: &HashMap<String, String>) -> Option<Self> {
        let error = || f.get("error").cloned().unwrap_or_default();
        match f.get("event").map(String::as_str) {
            None => f.get("text").map(|t| Self::Text(t.clone())),
            Some("restart") => Some(Self::Restart(error())),
            Some("done") => Some(Self::Done),
            Some(_) => None,
        }
    }
}

impl Client {
    /// Appends `entry` to task `task_id`'s live answer; with `renew`, sets its TTL too (an
    /// EXPIRE pipelined with the XADD). A writer renews on its first entry and its last, so
    /// a live answer never outlives its TTL by more than one answer's length, at two
    /// EXPIREs per answer rather than one per piece.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn append_out(
        &self,
        keys: &QueueKeys,
        task_id: TaskId,
        entry: &OutEntry,
        renew: bool,
    ) -> Result<()> {
        let key = keys.out(task_id);
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&key)
            .arg("MAXLEN")
            .arg("~")
            .arg(OUT_MAX_ENTRIES)
            .arg("*");
        for (k, v) in entry.fields() {
            xadd.arg(k).arg(v);
        }
        let mut pipe = redis::pipe();
        pipe.add_command(xadd).ignore();
        if renew {
            pipe.cmd("EXPIRE").arg(&key).arg(OUT_TTL.as_secs()).ignore();
        }
        let mut c = self.conn().await?;
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// The entries of task `task_id`'s live answer after entry id `after` (`0` for all),
    /// waiting up to `block` for one: their ids and what they say. `conn` is a
    /// [`Client::blocking_conn`]: a blocking read would stall the shared connection.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn read_out(
        conn: &mut Conn,
        keys: &QueueKeys,
        task_id: TaskId,
        after: &str,
        block: Duration,
    ) -> Result<Vec<(String, OutEntry)>> {
        let c = conn;
        type Reply = Option<Vec<(String, Vec<(String, HashMap<String, String>)>)>>;
        let reply: Reply = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg("STREAMS")
            .arg(keys.out(task_id))
            .arg(after)
            .query_async(c)
            .await?;
        Ok(reply
            .into_iter()
            .flatten()
            .flat_map(|(_, entries)| entries)
            .filter_map(|(id, f)| OutEntry::from_fields(&f).map(|e| (id, e)))
            .collect())
    }
}

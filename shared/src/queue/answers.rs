//! The answer cache: answers kept for identical requests (`crate::answer_cache` says which
//! requests are identical), and the single flight that makes concurrent identical requests
//! one call, fleet-wide. The same two serve the provider's prompt cache: which model's
//! cache holds a prompt prefix warm (kept as `warm:<hash>`), and the one call that warms it
//! while the other tasks sharing the prefix wait.
//!
//! A request's flight is a concurrency slot of limit 1 (`slots`), under a key no task's
//! `concurrency_key` can have (it starts with NUL, which envelopes refuse): the first task to
//! miss holds it and calls; the others park until it is freed, and are then all woken at
//! once (a parked key of limit 0), to find the answer stored, or, when the call failed, for
//! one of them to take the flight. A worker that dies during the call leaves the slot to the
//! entry, which the next worker to take the entry over holds again; an entry that left the
//! stream without freeing it is stale for the sweep, as any slot's.

use std::sync::LazyLock;

use redis::Script;

use super::{Client, Result};
use crate::ids::EntryId;
use crate::keys::{GROUP, QueueKeys};

static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/slots.lua"),
        include_str!("answer_take.lua")
    ))
});
static STORE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("answer_store.lua")));

/// The name (under the queue's prefix) of the answer kept for request `hash`.
#[must_use]
pub fn answer_name(hash: &str) -> String {
    format!("answer:{hash}")
}

/// The name (under the queue's prefix) of the model whose prompt cache holds prompt prefix
/// `hash`, warm.
#[must_use]
pub fn warm_name(hash: &str) -> String {
    format!("warm:{hash}")
}

/// The concurrency key of the flight of what is kept as `name`.
#[must_use]
pub fn flight_key(name: &str) -> String {
    format!("\0{name}")
}

/// What [`Client::take_answer`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The answer kept for the request (JSON of a [`crate::answer_cache::CachedAnswer`]).
    Hit(String),
    /// Not kept: call the model. With a flight asked for, this task holds it.
    Miss,
    /// Another task is calling for the same request: this one was parked until it is done
    /// (its entry is acked and deleted).
    Parked,
    /// Another task is calling, and no envelope was given to park: call again with it.
    Busy,
    /// This consumer no longer holds the entry; nothing was done.
    Lost,
}

/// One answer to keep.
#[derive(Debug, Clone, PartialEq)]
pub struct Keep {
    /// [`answer_name`] or [`warm_name`].
    pub name: String,
    pub ttl_ms: u64,
    pub answer: String,
    /// Whether it counts in the queue's bound (answers do; a warm cache's model, a few bytes
    /// whose TTL its readers extend, does not).
    pub counted: bool,
}

/// What the answer cache keeps for a request whose answer is too large to keep: call the
/// model, each task on its own (no flight to wait on).
pub const NOT_KEPT: &str = "-";

impl Client {
    /// Looks `name` ([`answer_name`], [`warm_name`]) up for the entry this consumer is about
    /// to run, extending its TTL to `refresh_ms` on a hit when given; on a miss with
    /// `flight`, takes its flight, or parks `envelope` behind it (without an envelope, only
    /// tries: [`Answer::Busy`]).
    ///
    /// # Errors
    /// Redis fails.
    #[allow(clippy::too_many_arguments)]
    pub async fn take_answer(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        entry_id: EntryId,
        name: &str,
        flight: bool,
        envelope: Option<&str>,
        refresh_ms: Option<u64>,
    ) -> Result<Answer> {
        let mut c = self.conn().await?;
        // A hit, the common case of a warm cache, is one plain GET; the script looks again.
        let mut get = match refresh_ms {
            Some(_) => redis::cmd("GETEX"),
            None => redis::cmd("GET"),
        };
        get.arg(keys.kept(name));
        if let Some(ms) = refresh_ms {
            get.arg("PX").arg(ms);
        }
        let kept: Option<String> = get.query_async(&mut c).await?;
        if let Some(answer) = kept {
            return Ok(Answer::Hit(answer));
        }
        let v: redis::Value = TAKE
            .key(keys.stream())
            .arg(GROUP)
            .arg(consumer)
            .arg(entry_id)
            .arg(name)
            .arg(if flight { "1" } else { "" })
            .arg(envelope.unwrap_or_default())
            .invoke_async(&mut c)
            .await?;
        Ok(match v {
            redis::Value::Int(1 | 3) => Answer::Miss,
            redis::Value::Int(0) => Answer::Parked,
            redis::Value::Int(2) => Answer::Busy,
            redis::Value::Int(_) => Answer::Lost,
            other => Answer::Hit(super::reply::as_string(&other)?),
        })
    }

    /// Keeps these answers, each for its TTL, within `max_bytes` for the queue: the answers
    /// nearest their end are dropped to make room; one larger than the bound is not kept.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn keep_answers(
        &self,
        keys: &QueueKeys,
        max_bytes: u64,
        answers: &[Keep],
    ) -> Result<()> {
        if answers.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        let mut inv = STORE.key(keys.stream());
        inv.arg(max_bytes);
        for a in answers {
            inv.arg(&a.name)
                .arg(a.ttl_ms)
                .arg(&a.answer)
                .arg(if a.counted { "1" } else { "" });
        }
        inv.invoke_async::<i64>(&mut c).await?;
        Ok(())
    }
}

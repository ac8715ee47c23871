//! Concurrency keys (`concurrency_key`, `concurrency_limit`): at most `limit` tasks of one key
//! run at once across every worker. The rules are in `lua/slots.lua`.

use std::sync::LazyLock;

use redis::Script;

use super::{Client, Result};
use crate::ids::EntryId;
use crate::keys::{GROUP, QueueKeys};

static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/slots.lua"),
        include_str!("slot_take.lua")
    ))
});
static FREE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/slots.lua"),
        include_str!("slot_free.lua")
    ))
});
static SWEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/slots.lua"),
        include_str!("slot_sweep.lua")
    ))
});

/// What [`Client::take_slot`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The task holds a slot: run it.
    Held,
    /// No slot was free: the task waits, parked, for one (its entry is acked and deleted).
    Parked,
    /// This consumer no longer holds the entry; nothing was done.
    Lost,
    /// No slot is free, and no envelope was given to park: call again with it.
    Full,
}

impl Client {
    /// Takes a slot of concurrency key `key` for the entry this consumer is about to run, or
    /// parks `envelope` until one frees; without an envelope, only tries ([`Slot::Full`] when
    /// none is free), so a task's envelope is sent only when it is to be parked.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn take_slot(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        entry_id: EntryId,
        key: &str,
        limit: u32,
        envelope: Option<&str>,
    ) -> Result<Slot> {
        let mut c = self.conn().await?;
        let r: i64 = TAKE
            .key(keys.stream())
            .arg(GROUP)
            .arg(consumer)
            .arg(entry_id)
            .arg(key)
            .arg(limit)
            .arg(envelope.unwrap_or_default())
            .invoke_async(&mut c)
            .await?;
        Ok(match r {
            1 => Slot::Held,
            0 => Slot::Parked,
            2 => Slot::Full,
            _ => Slot::Lost,
        })
    }

    /// Frees the slots held by these (entry id, key) pairs, whose tasks are finished, and
    /// passes them to parked tasks.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn free_slots(&self, keys: &QueueKeys, held: &[(EntryId, String)]) -> Result<()> {
        if held.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        let mut inv = FREE.key(keys.stream());
        for (entry, key) in held {
            inv.arg(entry).arg(key);
        }
        inv.invoke_async::<i64>(&mut c).await?;
        Ok(())
    }

    /// Frees stale slots and wakes parked tasks into free ones, for every key of the queue
    /// with parked tasks, at most once a second across every caller. Returns how many keys
    /// have parked tasks, or `None` when this second's sweep was done already.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn sweep_slots(&self, keys: &QueueKeys) -> Result<Option<u64>> {
        let mut c = self.conn().await?;
        let n: i64 = SWEEP.key(keys.stream()).invoke_async(&mut c).await?;
        Ok(u64::try_from(n).ok())
    }
}

//! Live tasks a page at a time, for the operator page's task search: ready (in the stream,
//! and waiting their turn in the room), in flight, delayed. Each page reads a bounded range by
//! its cursor, never a whole stream or set.

use std::collections::HashSet;

use redis::Value;

use super::{Client, Result, reply};
use crate::envelope;
use crate::ids::{EntryId, TaskId};
use crate::keys::{GROUP, QueueKeys, TASK_FIELD};

/// How many characters of a task's prompt a live row keeps.
const PROMPT_SHOWN: usize = 200;

/// A live task, as the page lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LiveTask {
    /// Its stream entry (ready, in flight), or `None` (delayed, in the room).
    pub entry_id: Option<String>,
    /// `None` for a delayed or room task whose producer left the id out (it gets one from
    /// its stream entry).
    pub task_id: Option<TaskId>,
    pub task_type: Option<String>,
    pub model: Option<String>,
    pub tenant: Option<String>,
    pub priority: Option<u64>,
    /// The start of its prompt (or of its last message).
    pub prompt: String,
    /// When it entered the stream, or when it is due (delayed), ms since the epoch.
    pub at_ms: i64,
    /// In flight: who holds it, since when its claim was last refreshed, deliveries.
    pub worker: Option<String>,
    pub idle_ms: Option<u64>,
    pub deliveries: Option<u64>,
}

impl LiveTask {
    /// A row for `payload` (the envelope's JSON; anything else shows as text).
    fn of(payload: &[u8], at_ms: i64) -> Self {
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
        let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let prompt = text("prompt")
            .filter(|p| !p.is_empty())
            .or_else(|| {
                let last = v.get("messages")?.as_array()?.last()?.get("content")?;
                last.as_str().map(str::to_owned)
            })
            .unwrap_or_else(|| {
                if v.is_null() {
                    String::from_utf8_lossy(payload).into_owned()
                } else {
                    String::new()
                }
            });
        Self {
            entry_id: None,
            task_id: text("id").and_then(|id| id.parse().ok()),
            task_type: text("type"),
            model: text("model"),
            tenant: text("tenant"),
            priority: v.get("priority").and_then(serde_json::Value::as_u64),
            prompt: prompt.chars().take(PROMPT_SHOWN).collect(),
            at_ms,
            worker: None,
            idle_ms: None,
            deliveries: None,
        }
    }

    /// The row of stream entry `id` holding `payload`.
    fn of_entry(queue: &str, id: &str, payload: &[u8]) -> Self {
        let entry = EntryId::parse(id);
        let mut t = Self::of(payload, entry.map_or(0, |e| e.ms() as i64));
        if let Some(e) = entry {
            t.task_id = Some(envelope::task_id_of(queue, e, payload));
        }
        t.entry_id = Some(id.to_owned());
        t
    }
}

impl Client {
    /// The task field of each of the stream entries `ids` (`None` for one gone), in one
    /// round trip.
    ///
    /// # Errors
    /// Redis fails.
    pub(super) async fn payloads(
        &self,
        keys: &QueueKeys,
        ids: &[&str],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("XRANGE").arg(keys.stream()).arg(id).arg(id);
        }
        let entries: Vec<Value> = pipe.query_async(&mut c).await?;
        entries
            .into_iter()
            .map(|e| {
                Ok(reply::parse_entries(e)?
                    .into_iter()
                    .next()
                    .and_then(|(_, mut f)| f.remove(TASK_FIELD)))
            })
            .collect()
    }

    /// Ready tasks in the stream (next to run first) after entry `after`, up to `n`, and
    /// where the next page starts: a range of the stream read `n` at a time, the entries in
    /// flight in that range left out (one `XPENDING` of the range) and the room's beacon too.
    /// At most `4 n` entries are read per page.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn ready_tasks(
        &self,
        keys: &QueueKeys,
        after: Option<&str>,
        n: usize,
    ) -> Result<(Vec<LiveTask>, Option<String>)> {
        let mut c = self.conn().await?;
        let mut start = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let mut out = Vec::new();
        for _ in 0..4 {
            let page = self.range(&mut c, &keys.stream(), &start, n).await?;
            let (Some((first, _)), Some((last, _))) = (page.first(), page.last()) else {
                return Ok((out, None));
            };
            let pending: Value = match redis::cmd("XPENDING")
                .arg(keys.stream())
                .arg(GROUP)
                .arg(first)
                .arg(last)
                .arg(n)
                .query_async(&mut c)
                .await
            {
                Err(e) if e.code() == Some("NOGROUP") => Value::Nil,
                other => other?,
            };
            let held: HashSet<String> = match pending {
                Value::Array(rows) => rows
                    .iter()
                    .filter_map(|r| match r {
                        Value::Array(p) => p.first().and_then(|v| reply::as_string(v).ok()),
                        _ => None,
                    })
                    .collect(),
                _ => HashSet::new(),
            };
            let full = page.len() == n;
            start = format!("({last}");
            for (id, fields) in &page {
                let Some(payload) = fields.get(TASK_FIELD) else {
                    continue; // the room's beacon, or a chain's entry
                };
                if !held.contains(id) {
                    out.push(LiveTask::of_entry(keys.name(), id, payload));
                }
            }
            if !full {
                return Ok((out, None));
            }
            if out.len() >= n {
                break;
            }
        }
        out.truncate(n);
        let next = out.last().and_then(|t| t.entry_id.clone());
        Ok((out, next))
    }

    /// Tasks in flight (oldest entry first) after entry `after`, up to `n`, with who holds
    /// each and for how long, and where the next page starts.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn in_flight_tasks(
        &self,
        keys: &QueueKeys,
        after: Option<&str>,
        n: usize,
    ) -> Result<(Vec<LiveTask>, Option<String>)> {
        let held = self.held_after(keys, None, after, n).await?;
        let ids: Vec<&str> = held.iter().map(|h| h.entry_id.as_str()).collect();
        let payloads = self.payloads(keys, &ids).await?;
        let mut out = Vec::with_capacity(held.len());
        for (h, payload) in held.iter().zip(payloads) {
            let payload = payload.unwrap_or_default();
            let mut t = LiveTask::of_entry(keys.name(), &h.entry_id, &payload);
            t.worker = Some(h.worker.clone());
            t.idle_ms = Some(h.idle_ms);
            t.deliveries = Some(h.deliveries);
            out.push(t);
        }
        let next = (out.len() == n)
            .then(|| out.last().and_then(|t| t.entry_id.clone()))
            .flatten();
        Ok((out, next))
    }

    /// Delayed tasks, soonest due first, from offset `from` (a delayed set only shrinks
    /// at its head, so an offset moves with it), up to `n`; where the next page starts.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn delayed_tasks(
        &self,
        keys: &QueueKeys,
        from: usize,
        n: usize,
    ) -> Result<(Vec<LiveTask>, Option<usize>)> {
        let mut c = self.conn().await?;
        let page: Vec<(Vec<u8>, f64)> = redis::cmd("ZRANGE")
            .arg(keys.delayed())
            .arg(from)
            .arg(from + n.saturating_sub(1))
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await?;
        let full = page.len() == n;
        #[allow(clippy::cast_possible_truncation)]
        let out: Vec<LiveTask> = page
            .iter()
            .map(|(payload, due)| LiveTask::of(payload, *due as i64))
            .collect();
        Ok((out, full.then_some(from + n)))
    }

    /// Up to `per_tenant` tasks of each of the `tenants` busiest tenants waiting their turn
    /// in the room, next first.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn room_tasks(
        &self,
        keys: &QueueKeys,
        tenants: usize,
        per_tenant: usize,
    ) -> Result<Vec<LiveTask>> {
        let busiest = self.busiest_tenants(keys, tenants).await?;
        if busiest.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        let mut pipe = redis::pipe();
        for t in &busiest {
            pipe.lrange(
                format!("{}:{}:{}", keys.room(), t.priority, t.tenant),
                0,
                per_tenant.saturating_sub(1) as isize,
            );
        }
        let lists: Vec<Vec<Vec<u8>>> = pipe.query_async(&mut c).await?;
        Ok(lists
            .iter()
            .flatten()
            .map(|payload| LiveTask::of(payload, 0))
            .collect())
    }
}

//! Reading Redis replies: stream entries, reads, dead letters. Every script's and
//! command's reply is taken apart here.

use std::collections::HashMap;

use redis::Value;

use super::{DeadLetter, Delivery, Error, Reclaimed, Result, Takeover};
use crate::envelope;
use crate::ids::{EntryId, TaskId};
use crate::keys::{CHAIN_FIELD, ROOM_FIELD, TASK_FIELD};

pub(super) fn dead_letter(queue: &str, id: String, f: &HashMap<String, Vec<u8>>) -> DeadLetter {
    let text = |k: &str| {
        f.get(k)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let task = text(TASK_FIELD);
    // The entry the task was read from; a letter that does not say is named by its own.
    let entry_id = EntryId::parse(&text("entry_id"))
        .or_else(|| EntryId::parse(&id))
        .unwrap_or_default();
    let task_id = envelope::task_id_of(queue, entry_id, task.as_bytes());
    DeadLetter {
        task_id,
        queue: queue.to_owned(),
        error: text("error"),
        class: text("class"),
        attempts: text("attempts").parse().unwrap_or(0),
        failed_at: text("failed_at")
            .parse::<i64>()
            .ok()
            .and_then(chrono::DateTime::from_timestamp_millis),
        task,
        id,
    }
}

pub(super) fn as_string(v: &Value) -> Result<String> {
    match v {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        other => Err(Error::Protocol(format!("expected a string, got {other:?}"))),
    }
}

pub(super) fn as_u64(v: &Value) -> u64 {
    match v {
        Value::Int(n) => u64::try_from(*n).unwrap_or(0),
        Value::BulkString(b) => String::from_utf8_lossy(b).parse().unwrap_or(0),
        _ => 0,
    }
}

/// A stream entry: its id and fields.
pub(super) type Entry = (String, HashMap<String, Vec<u8>>);

/// `[[id, [field, value, ...]], ...]` into ids and field maps.
pub(super) fn parse_entries(v: Value) -> Result<Vec<Entry>> {
    let Value::Array(entries) = v else {
        return Ok(Vec::new());
    };
    entries
        .into_iter()
        .map(|e| {
            let Value::Array(mut parts) = e else {
                return Err(Error::Protocol("a stream entry is not an array".into()));
            };
            if parts.len() != 2 {
                return Err(Error::Protocol("a stream entry is not [id, fields]".into()));
            }
            let fields = parts.pop().unwrap_or(Value::Nil);
            let id = as_string(&parts[0])?;
            let mut map = HashMap::new();
            if let Value::Array(kv) = fields {
                let mut it = kv.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    if let (Ok(k), Value::BulkString(v)) = (as_string(&k), v) {
                        map.insert(k, v);
                    }
                }
            }
            Ok((id, map))
        })
        .collect()
}

/// XREADGROUP's `[[stream, entries]]` (RESP2) or `{stream: entries}` (RESP3).
pub(super) fn parse_read_reply(reply: Value) -> Result<Vec<Delivery>> {
    let entries = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(mut streams) => match streams.pop() {
            Some(Value::Array(mut pair)) if pair.len() == 2 => pair.pop().unwrap_or(Value::Nil),
            _ => return Ok(Vec::new()),
        },
        Value::Map(mut streams) => streams.pop().map_or(Value::Nil, |(_, v)| v),
        other => return Err(Error::Protocol(format!("XREADGROUP returned {other:?}"))),
    };
    deliveries(entries)
}

/// Stream entries just read (`[[id, [field, value, ...]], ...]`) as deliveries.
pub(super) fn deliveries(entries: Value) -> Result<Vec<Delivery>> {
    parse_entries(entries)?
        .into_iter()
        .map(|(entry_id, mut fields)| {
            Ok(Delivery {
                entry_id: entry_id_of(&entry_id)?,
                payload: fields.remove(TASK_FIELD),
                chain: fields.remove(CHAIN_FIELD),
                deliveries: 1,
                from_room: fields.contains_key(ROOM_FIELD),
            })
        })
        .collect()
}

/// A stream entry's id as Redis gave it; any other text is Redis not speaking its protocol.
fn entry_id_of(text: &str) -> Result<EntryId> {
    EntryId::parse(text).ok_or_else(|| {
        Error::Protocol(format!(
            "`{}` is not a stream entry id",
            text.escape_debug()
        ))
    })
}

/// A flat `[id, deliveries, task or false, chain or false, holder, holder alive, had its
/// turn in the room, ...]` script reply as deliveries, and whom each was taken from.
pub(super) fn parse_claimed(flat: &[Value]) -> Result<Reclaimed> {
    let bytes = |v: &Value| match v {
        Value::BulkString(b) => Some(b.clone()),
        _ => None,
    };
    let mut out = Reclaimed::default();
    for chunk in flat.chunks(7) {
        let [id, deliveries, payload, chain, from, alive, room] = chunk else {
            return Err(Error::Protocol("a claimed entry came back partial".into()));
        };
        let delivery = Delivery {
            entry_id: entry_id_of(&as_string(id)?)?,
            deliveries: as_u64(deliveries).max(1),
            payload: bytes(payload),
            chain: bytes(chain),
            // A task fed from the room runs when taken over, so its deliveries add up on
            // one entry and a task that kills its workers ends as poison.
            from_room: as_u64(room) == 1,
        };
        out.takeovers.push(Takeover {
            entry_id: delivery.entry_id,
            from: as_string(from)?,
            from_alive: as_u64(alive) == 1,
            deliveries: delivery.deliveries,
        });
        out.tasks.push(delivery);
    }
    Ok(out)
}

/// Whether a stream entry holds task `task_id`.
pub(super) fn entry_matches(
    queue: &str,
    entry_id: &str,
    fields: &HashMap<String, Vec<u8>>,
    task_id: TaskId,
) -> bool {
    let payload = fields.get(TASK_FIELD).map_or(&[][..], Vec::as_slice);
    EntryId::parse(entry_id).is_some_and(|e| envelope::task_id_of(queue, e, payload) == task_id)
}

/// Field `field` of group `group` in an `XINFO GROUPS` reply (RESP2 flat lists or RESP3
/// maps), as text.
pub(super) fn group_field(reply: &Value, group: &str, field: &str) -> Option<String> {
    let Value::Array(groups) = reply else {
        return None;
    };
    groups.iter().find_map(|g| {
        let pairs: Vec<(String, &Value)> = match g {
            Value::Array(flat) => flat
                .chunks(2)
                .filter_map(|kv| Some((as_string(kv.first()?).ok()?, kv.get(1)?)))
                .collect(),
            Value::Map(m) => m
                .iter()
                .filter_map(|(k, v)| Some((as_string(k).ok()?, v)))
                .collect(),
            _ => return None,
        };
        let name = pairs.iter().find(|(k, _)| k == "name")?.1;
        (as_string(name).ok()? == group)
            .then(|| pairs.iter().find(|(k, _)| k == field))
            .flatten()
            .and_then(|(_, v)| as_string(v).ok())
    })
}

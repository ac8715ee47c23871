//! The two ids a task is known by: its [`TaskId`] (what producers and records name it) and
//! the [`EntryId`] of the stream entry that carries it (what the group acks and claims).
//! Each is parsed once, where it enters (an envelope read at admission, an entry read from the
//! stream), and passed on typed; only the wire (JSON, Redis arguments) spells them as text.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A task's id: a UUID, written as its hyphenated lower-case text in JSON and keys
/// (`llmq:{q}:result:<id>`), as every client writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct TaskId(Uuid);

/// Read as [`FromStr`] reads it, so a malformed id is refused with its sentence.
impl<'de> Deserialize<'de> for TaskId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl TaskId {
    /// A new random id, as a producer gives a task it names.
    #[must_use]
    pub fn random() -> Self {
        Self(Uuid::new_v4())
    }

    #[must_use]
    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    #[must_use]
    pub const fn uuid(self) -> Uuid {
        self.0
    }
}

impl From<Uuid> for TaskId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TaskId {
    type Err = BadId;

    fn from_str(s: &str) -> Result<Self, BadId> {
        // Every spelling the uuid crate reads (hyphenated, simple, braced, urn), in either
        // case, and nothing around it: what every client reads as the same task.
        s.parse().map(Self).map_err(|_| BadId {
            what: "a task id",
            shape: "a UUID such as 7f3c2a9e-1b2d-4e5f-8a9b-0c1d2e3f4a5b",
            text: s.chars().take(64).collect(),
        })
    }
}

/// Serde's `deserialize_with` for an optional task id that an older writer may have left as
/// `""`: read as none.
///
/// # Errors
/// Text that is neither empty nor a UUID.
pub fn optional<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<TaskId>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => s.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

/// A stream entry's id (`<ms>-<seq>`) as the two numbers it is: a claim's key and what a task
/// in flight holds to ack or release its entry, without a copy of the text for each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    ms: u64,
    seq: u64,
}

impl EntryId {
    #[must_use]
    pub const fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }

    /// The id Redis gave an entry; `None` for any other text (Redis never gives one),
    /// including a number written otherwise than Redis writes it, which would not read back
    /// as the same text.
    #[must_use]
    pub fn parse(id: &str) -> Option<Self> {
        fn number(s: &str) -> Option<u64> {
            let canonical = !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_digit())
                && (s == "0" || !s.starts_with('0'));
            canonical.then(|| s.parse().ok()).flatten()
        }
        let (ms, seq) = id.split_once('-')?;
        Some(Self {
            ms: number(ms)?,
            seq: number(seq)?,
        })
    }

    /// When Redis added the entry (ms since the epoch), as its id says.
    #[must_use]
    pub const fn ms(self) -> u64 {
        self.ms
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for EntryId {
    type Err = BadId;

    fn from_str(s: &str) -> Result<Self, BadId> {
        Self::parse(s).ok_or_else(|| BadId {
            what: "a stream entry id",
            shape: "<ms>-<seq> as Redis gives it, such as 1700000000000-0",
            text: s.chars().take(64).collect(),
        })
    }
}

impl redis::ToRedisArgs for EntryId {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(self);
    }
}

impl redis::ToRedisArgs for TaskId {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(self);
    }
}

// In Postgres a task id is a `uuid`, as the ledger's columns are.
impl sqlx::Type<sqlx::Postgres> for TaskId {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <Uuid as sqlx::Type<sqlx::Postgres>>::type_info()
    }
}

impl sqlx::postgres::PgHasArrayType for TaskId {
    fn array_type_info() -> sqlx::postgres::PgTypeInfo {
        <Uuid as sqlx::postgres::PgHasArrayType>::array_type_info()
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for TaskId {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <Uuid as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl sqlx::Decode<'_, sqlx::Postgres> for TaskId {
    fn decode(value: sqlx::postgres::PgValueRef<'_>) -> Result<Self, sqlx::error::BoxDynError> {
        <Uuid as sqlx::Decode<sqlx::Postgres>>::decode(value).map(Self)
    }
}

/// Text that is not the id it was given as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadId {
    what: &'static str,
    shape: &'static str,
    text: String,
}

impl fmt::Display for BadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (text, what, shape) = (self.text.escape_debug(), self.what, self.shape);
        write!(f, "`{text}` is not {what}; {what} is {shape}")
    }
}

impl std::error::Error for BadId {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_id_is_its_uuid_on_the_wire() {
        let id: TaskId = "3F2B8C1E-5D6A-4E7B-9C0D-1A2B3C4D5E6F".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"3f2b8c1e-5d6a-4e7b-9c0d-1a2b3c4d5e6f\""
        );
        let back: TaskId =
            serde_json::from_str("\"3f2b8c1e-5d6a-4e7b-9c0d-1a2b3c4d5e6f\"").unwrap();
        assert_eq!(back, id);
        let bad = "task-1".parse::<TaskId>().unwrap_err().to_string();
        assert!(bad.starts_with("`task-1` is not a task id"), "{bad}");
        let bad = serde_json::from_str::<TaskId>("\"task-1\"")
            .unwrap_err()
            .to_string();
        assert!(bad.starts_with("`task-1` is not a task id"), "{bad}");
        // Nothing around it: a client reads " <uuid>" as no id, and so does the worker.
        assert!(
            " 3f2b8c1e-5d6a-4e7b-9c0d-1a2b3c4d5e6f"
                .parse::<TaskId>()
                .is_err()
        );
    }

    #[test]
    fn an_entry_id_reads_back_as_redis_wrote_it() {
        for text in [
            "0-0",
            "1700000000123-4",
            "18446744073709551615-18446744073709551615",
        ] {
            assert_eq!(EntryId::parse(text).unwrap().to_string(), text);
        }
        for bad in [
            "",
            "1",
            "01-0",
            "1-01",
            "-1",
            "+1-0",
            "1-",
            "a-1",
            "1-2-3",
            " 1-2",
            "18446744073709551616-0",
        ] {
            assert_eq!(EntryId::parse(bad), None, "{bad}");
        }
        assert!(EntryId::new(1, 9) < EntryId::new(2, 0));
        assert!(EntryId::new(2, 0) < EntryId::new(2, 1));
    }
}

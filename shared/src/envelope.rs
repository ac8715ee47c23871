//! The task envelope: the versioned JSON every producer writes into the `task` field.
//!
//! `schema/envelope.schema.json` and `docs/wire-format.md` describe it for other languages.
//! Unknown fields are kept (and written back on retries) but otherwise ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::conversation::{self, Message, ResponseFormat, Tool, ToolChoice};
use crate::ids::{EntryId, TaskId};

/// The only envelope version this build understands.
pub const VERSION: u64 = 1;

/// Default payload limit: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Default number of attempts before a task becomes a dead letter.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Default per-attempt timeout in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;

/// The longest `timeout` accepted, in seconds (30 days): an attempt's, or how long a chain's
/// approval waits for a person. Deadlines computed from it stay far from any overflow.
pub const MAX_TIMEOUT_SECS: u64 = 30 * 24 * 3600;

/// Why an envelope was rejected. The text is what lands in the dead letter.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "the task is {size} bytes, over the {limit}-byte limit; send a shorter prompt or raise --max-payload-bytes"
    )]
    TooLarge { size: usize, limit: usize },
    #[error("the task is not valid JSON: {0}")]
    NotJson(String),
    #[error("the task must be a JSON object, not {0}")]
    NotObject(&'static str),
    #[error("the task has no \"v\" field; set \"v\": 1")]
    MissingVersion,
    #[error("the task has version {0}, but this worker understands only \"v\": 1")]
    WrongVersion(String),
    #[error("field `{field}` is wrong: {message}")]
    Field { field: String, message: String },
    #[error("the task has no prompt; set \"prompt\" to a non-empty string, or give \"messages\"")]
    MissingPrompt,
    #[error("unknown task type `{0}`; use one of: {list}", list = TaskType::names())]
    UnknownType(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The most bytes of a payload over the size limit that its dead letter keeps.
pub const DEAD_PREFIX_BYTES: usize = 4096;

/// A refused payload as its dead letter stores it: whole when it is within `max_bytes`, else
/// its first [`DEAD_PREFIX_BYTES`] and its size, so that oversized input costs Redis little.
#[must_use]
pub fn dead_payload(raw: &[u8], max_bytes: usize) -> String {
    if raw.len() <= max_bytes {
        return String::from_utf8_lossy(raw).into_owned();
    }
    let head = &raw[..DEAD_PREFIX_BYTES.min(raw.len())];
    format!(
        "{}… [{} bytes; only the first {} are kept]",
        String::from_utf8_lossy(head),
        raw.len(),
        head.len()
    )
}

/// A prompt with nothing in it, which no model can answer.
fn blank(prompt: &str) -> bool {
    prompt.trim().is_empty()
}

/// The longest concurrency key accepted.
pub const MAX_CONCURRENCY_KEY: usize = 200;

/// `concurrency_key` and `concurrency_limit` come together: a non-empty key of at most
/// [`MAX_CONCURRENCY_KEY`] characters, and a whole number of at least 1.
/// `key` and `limit` are the fields' values, `None` when absent or null.
fn check_concurrency(key: Option<&Value>, limit: Option<&Value>) -> Result<()> {
    let field = |field: &str, message: &str| Error::Field {
        field: field.into(),
        message: message.into(),
    };
    match (key, limit) {
        (None, None) => Ok(()),
        (Some(_), None) => Err(field(
            "concurrency_key",
            "needs a concurrency_limit, how many tasks of the key may run at once",
        )),
        (None, Some(_)) => Err(field(
            "concurrency_limit",
            "needs a concurrency_key, the name of the group it limits",
        )),
        (Some(k), Some(l)) => {
            match k.as_str() {
                Some(k) if !k.trim().is_empty() && k.chars().count() <= MAX_CONCURRENCY_KEY => {}
                _ => {
                    return Err(field(
                        "concurrency_key",
                        &format!(
                            "must be a non-empty string of at most {MAX_CONCURRENCY_KEY} characters"
                        ),
                    ));
                }
            }
            match l.as_u64() {
                Some(n) if n >= 1 && n <= u64::from(u32::MAX) => Ok(()),
                _ => Err(field(
                    "concurrency_limit",
                    &format!("must be a whole number of at least 1, not {l}"),
                )),
            }
        }
    }
}

/// What kind of work a task is. Routing and reporting group by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TaskType {
    CodeGeneration,
    Research,
    #[default]
    DataAnalysis,
    Refactoring,
    Documentation,
    CodeReview,
    SqlDbWork,
    Testing,
    Debugging,
    Planning,
}

impl TaskType {
    pub const ALL: [TaskType; 10] = [
        TaskType::CodeGeneration,
        TaskType::Research,
        TaskType::DataAnalysis,
        TaskType::Refactoring,
        TaskType::Documentation,
        TaskType::CodeReview,
        TaskType::SqlDbWork,
        TaskType::Testing,
        TaskType::Debugging,
        TaskType::Planning,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::CodeGeneration => "code_generation",
            TaskType::Research => "research",
            TaskType::DataAnalysis => "data_analysis",
            TaskType::Refactoring => "refactoring",
            TaskType::Documentation => "documentation",
            TaskType::CodeReview => "code_review",
            TaskType::SqlDbWork => "sql_db_work",
            TaskType::Testing => "testing",
            TaskType::Debugging => "debugging",
            TaskType::Planning => "planning",
        }
    }

    /// Every accepted name, comma-separated, for error messages.
    #[must_use]
    pub fn names() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }
}

impl fmt::Display for TaskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| Error::UnknownType(s.to_owned()))
    }
}

/// How risky a task is; risk raises the minimum model tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    Low,
    Medium,
    High,
}

impl FromStr for Risk {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [Risk::Low, Risk::Medium, Risk::High]
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not a risk; use low, medium or high"))
    }
}

impl Risk {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "low",
            Risk::Medium => "medium",
            Risk::High => "high",
        }
    }
}

/// How capable a model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Fast,
    #[default]
    Standard,
    Advanced,
}

impl Tier {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Fast => "fast",
            Tier::Standard => "standard",
            Tier::Advanced => "advanced",
        }
    }
}

impl Tier {
    /// The next tier up, if there is one.
    #[must_use]
    pub fn up(self) -> Option<Tier> {
        match self {
            Tier::Fast => Some(Tier::Standard),
            Tier::Standard => Some(Tier::Advanced),
            Tier::Advanced => None,
        }
    }
}

/// A task as producers write it and workers carry it through retries.
///
/// Every task in flight holds its envelope for the whole of its call, so the largest fields
/// most tasks leave out (`tool_choice`, `response_format`, `metadata`) are boxed: absent,
/// each costs 8 bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<TaskId>,
    /// The user's request. May be left empty when `messages` carries the conversation;
    /// otherwise it is the last user turn, after them.
    #[serde(default)]
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<Box<str>>,
    /// Earlier turns of a conversation (`docs/wire-format.md`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<Message>,
    /// Tools the model may call; their calls come back in the result, never run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Box<ToolChoice>>,
    /// JSON the answer must be: an object, or one that fits a schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Box<ResponseFormat>>,
    /// `true`: call the provider in streaming mode and append the answer's text to
    /// `llmq:{q}:out:<id>` as it arrives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// `false`: do not ask the provider to cache this task's prompt prefix. Unset: the
    /// provider file's `prompt_cache` (on unless it says false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache: Option<bool>,
    /// The answer cache (`{"ttl": "24h"}`): an identical request within the TTL is answered
    /// from Redis without a call. `false`: not even the queue's (`answer_cache.queues`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Box<CacheAsk>>,
    /// How long the task can wait for its answer (e.g. `"24h"`), from when it was enqueued:
    /// set, it may go through a provider's batch API at the batch price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Box<str>>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<Box<str>>,
    /// Provider hint (`--platform`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Box<str>>,
    /// Model hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_id: Option<Box<str>>,
    /// The step of chain `chain_id` this task runs. Set by the chain's expansion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Box<str>>,
    /// No model below this tier: set by a chain step's escalation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tier: Option<Tier>,
    /// How much a mistake would hurt: `low`, `medium` or `high`; raises the model tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<Risk>,
    /// The part of the system the task touches (e.g. `billing`), for routing rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area: Option<Box<str>>,
    /// Per-attempt timeout in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Do not run before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
    /// Tasks with the same key (on one queue, for one tenant) run once: a copy that comes
    /// while the first waits or runs, or within `idempotency_window` after it succeeded, is
    /// answered with its answer (`crate::idempotency`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<Box<str>>,
    /// How long after the first task with the key succeeded a copy is still answered with
    /// its answer (e.g. `"24h"`); unset: the queue's, from the provider file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_window: Option<Box<str>>,
    /// The batch the task came in (`llmq batch`'s id): the ledger keeps it with the task, so
    /// `llmq costs --batch` reports one batch. 1 to 128 letters, digits, `-`, `_`, `.`, `:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<Box<str>>,
    /// How urgent the task is: 0 (the default, most urgent) to [`MAX_PRIORITY`] (least). A
    /// ready task of a lower number is taken before any of a higher one, fleet-wide; a task
    /// with neither `priority` nor `tenant` is served first, straight from the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// Whose work it is (a customer, a team): within a priority, tenants with ready tasks
    /// are served in turn, so one tenant's backlog delays another's tasks by a few tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<Box<str>>,
    /// What the task is for, as `name: value` pairs (up to [`MAX_TAGS`]; e.g. `team:
    /// search`, `feature: summaries`): kept with its calls and itself in the ledger, so
    /// `llmq costs --by tag:team` reports spend by them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Box<Value>>,
    /// When the producer enqueued it; `llmq` sets it, other producers may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueued_at: Option<DateTime<Utc>>,
    /// Tasks with the same key run at most `concurrency_limit` at once across every worker;
    /// the others wait, without using attempts, for a slot. Both or neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<Box<str>>,
    /// How many tasks of `concurrency_key` may run at once (at least 1). Each task is
    /// admitted under its own limit; a freed slot goes to the oldest waiting task of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_limit: Option<u32>,
    /// `false`: the task runs on the first provider of its plan (the one it names, if it
    /// names one) or fails with that provider's error; it never falls back to another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<bool>,
    /// The producer's W3C trace context (`00-<trace id>-<span id>-<flags>`): the worker's
    /// spans for this task join that trace. A malformed value is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<Box<str>>,
    /// Attempts already used up. Set by workers; producers leave it out.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Waits so far for a provider to become callable (rate limits, outages, quotas); they
    /// do not use up attempts. Set by workers.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub snoozes: u32,
    /// Since when the task has been waiting for a provider, without a call that failed it
    /// in between; `routing.max_wait` after this it becomes a dead letter. Set by workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<DateTime<Utc>>,
    /// Times an operator replayed the task from the dead letters; part of the ledger key, so
    /// a replayed task's calls are billed as the new calls they are.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub replays: u32,
    /// The error of the last failed attempt. Set by workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<Box<str>>,
    /// Fields this version does not know, kept as they came.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The least urgent `priority`; 0 is the most urgent and the default.
pub const MAX_PRIORITY: u8 = 9;
/// The longest `tenant`, in bytes.
pub const MAX_TENANT_BYTES: usize = 128;

/// The most tags a task carries.
pub const MAX_TAGS: usize = 8;
/// The longest tag name: letters, digits, `_`, `-` and `.` (it names a report's column).
pub const MAX_TAG_NAME_BYTES: usize = 64;
/// The longest tag value.
pub const MAX_TAG_VALUE_BYTES: usize = 128;

/// Checks a task's `tags`: at most [`MAX_TAGS`], each name 1 to [`MAX_TAG_NAME_BYTES`]
/// letters, digits, `_`, `-` or `.`, each value 1 to [`MAX_TAG_VALUE_BYTES`] bytes without a
/// control character.
///
/// # Errors
/// A sentence naming the tag and the fix.
pub fn check_tags(tags: &BTreeMap<String, String>) -> Result<()> {
    let wrong = |field: String, message: String| Err(Error::Field { field, message });
    if tags.len() > MAX_TAGS {
        return wrong(
            "tags".into(),
            format!("has {} tags; a task carries at most {MAX_TAGS}", tags.len()),
        );
    }
    for (name, value) in tags {
        let name_ok = (1..=MAX_TAG_NAME_BYTES).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !name_ok {
            return wrong(
                "tags".into(),
                format!(
                    "has a tag named {:?}; name a tag with 1 to {MAX_TAG_NAME_BYTES} letters, digits, `_`, `-` or `.`",
                    crate::text::excerpt(name, MAX_TAG_NAME_BYTES)
                ),
            );
        }
        let field = format!("tags.{name}");
        if value.is_empty() {
            return wrong(
                field,
                "is empty; leave the tag out or give it a value".into(),
            );
        }
        if value.len() > MAX_TAG_VALUE_BYTES {
            return wrong(
                field,
                format!(
                    "is {} bytes long; use at most {MAX_TAG_VALUE_BYTES}",
                    value.len()
                ),
            );
        }
        if value.chars().any(char::is_control) {
            return wrong(
                field,
                "contains a control character (a newline, tab or NUL); remove it".into(),
            );
        }
    }
    Ok(())
}

/// Checks a `priority` and a `tenant`, wherever they are given (a task, a chain).
///
/// # Errors
/// A priority out of range, or a tenant that is empty, too long or holds control characters.
pub fn check_class(priority: Option<i64>, tenant: Option<&str>) -> Result<()> {
    if let Some(p) = priority
        && !(0..=i64::from(MAX_PRIORITY)).contains(&p)
    {
        return Err(Error::Field {
            field: "priority".into(),
            message: format!(
                "{p} is out of range; use 0 (the default, most urgent) to {MAX_PRIORITY} (least urgent)"
            ),
        });
    }
    if let Some(t) = tenant {
        let wrong = if t.is_empty() {
            Some("is empty; leave it out or name the tenant".to_owned())
        } else if t.len() > MAX_TENANT_BYTES {
            Some(format!(
                "is {} bytes long; use at most {MAX_TENANT_BYTES} (an id, not a description)",
                t.len()
            ))
        } else if t.chars().any(char::is_control) {
            Some("contains a control character (a newline, tab or NUL); remove it".to_owned())
        } else {
            None
        };
        if let Some(message) = wrong {
            return Err(Error::Field {
                field: "tenant".into(),
                message,
            });
        }
    }
    Ok(())
}

/// What a task asks of the answer cache (`cache`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "false, or an object such as {\"ttl\": \"24h\"} (with \"sampled\": true to keep a sampled answer)"
)]
pub enum CacheAsk {
    /// `false`: never answered from the cache, nor stored in it. `true` is refused: a TTL
    /// must be given.
    Use(bool),
    /// Answered from the cache, and stored in it for `ttl`.
    Keep(CacheKeep),
}

/// `{"ttl": "24h", "sampled": true}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheKeep {
    pub ttl: String,
    /// `true`: cache a sampled answer too (`temperature` above 0, or unset: every provider's
    /// default samples), so every identical request gets that one sample.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sampled: bool,
}

/// The shortest answer-cache TTL.
pub const MIN_CACHE_TTL: Duration = Duration::from_secs(1);
/// The longest answer-cache TTL.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// An answer-cache TTL between [`MIN_CACHE_TTL`] and [`MAX_CACHE_TTL`], or what is wrong with
/// it as a sentence's end (`... ; write ...`).
///
/// # Errors
/// The text is not a duration, or out of range.
pub fn cache_ttl(text: &str) -> std::result::Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| {
        format!(
            "`{}` is not a duration ({e}); write it as e.g. \"10m\" or \"24h\"",
            crate::text::excerpt(text, 40)
        )
    })?;
    if d < MIN_CACHE_TTL || d > MAX_CACHE_TTL {
        return Err(format!(
            "{} is not between 1s and 30d; give e.g. \"24h\"",
            crate::text::excerpt(text, 40)
        ));
    }
    Ok(d)
}

/// Whether a request samples its answer: `temperature` above 0, or unset (every provider's
/// default is 1).
#[must_use]
pub fn samples(temperature: Option<f32>) -> bool {
    temperature.is_none_or(|t| t > 0.0)
}

impl CacheAsk {
    /// The TTL asked for, when the task asks to be cached (`None` for `false`).
    #[must_use]
    pub fn ttl(&self) -> Option<Duration> {
        match self {
            Self::Use(_) => None,
            Self::Keep(k) => cache_ttl(&k.ttl).ok(),
        }
    }

    fn check(&self, env: &Envelope) -> Result<()> {
        let field = |field: &str, message: String| Error::Field {
            field: field.into(),
            message,
        };
        let keep = match self {
            Self::Use(false) => return Ok(()),
            Self::Use(true) => {
                return Err(field(
                    "cache",
                    "true needs a time to keep the answer; write {\"ttl\": \"24h\"}".into(),
                ));
            }
            Self::Keep(keep) => keep,
        };
        cache_ttl(&keep.ttl).map_err(|e| field("cache.ttl", e))?;
        if env.streams() {
            return Err(field(
                "cache",
                "cannot be used with stream: a cached answer is not streamed; drop one of them"
                    .into(),
            ));
        }
        if samples(env.temperature) && !keep.sampled {
            return Err(field(
                "cache",
                "would give every identical request one sampled answer (temperature is unset or above 0); set \"temperature\": 0, or \"sampled\": true in cache to keep one sample".into(),
            ));
        }
        Ok(())
    }
}

impl Envelope {
    /// An `idempotency_key` is not empty (every keyless producer would share it), and an
    /// `idempotency_window` comes with one and is a TTL.
    fn check_idempotency(&self) -> Result<()> {
        let field = |field: &str, message: String| Error::Field {
            field: field.into(),
            message,
        };
        if self.idempotency_key.as_deref() == Some("") {
            return Err(field(
                "idempotency_key",
                "is empty; give each task that must run once a key of its own, or leave it out"
                    .into(),
            ));
        }
        if let Some(window) = &self.idempotency_window {
            if self.idempotency_key.is_none() {
                return Err(field(
                    "idempotency_window",
                    "needs idempotency_key: it is how long a key is remembered; add the key or drop the window".into(),
                ));
            }
            cache_ttl(window).map_err(|e| field("idempotency_window", e))?;
        }
        Ok(())
    }
}

/// A batch's id names keys, task ids and ledger rows: a few safe characters.
///
/// # Errors
/// What is wrong with it, as the end of a sentence that names it.
pub fn check_batch_id(id: &str) -> std::result::Result<(), String> {
    let ok = (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err("must be 1 to 128 letters, digits, `-`, `_`, `.` or `:`".into())
    }
}

/// The shortest `deadline`: every provider's batch API may take a day (OpenAI's only
/// completion window is 24h; Anthropic and Gemini aim at a day too).
pub const MIN_DEADLINE: Duration = Duration::from_secs(24 * 3600);
/// The longest `deadline`.
pub const MAX_DEADLINE: Duration = Duration::from_secs(30 * 24 * 3600);

fn check_deadline(text: &str, streams: bool) -> Result<()> {
    let field = |message: String| Error::Field {
        field: "deadline".into(),
        message,
    };
    let d = humantime::parse_duration(text).map_err(|e| {
        field(format!(
            "`{}` is not a duration ({e}); write it as e.g. \"24h\" or \"3d\"",
            crate::text::excerpt(text, 40)
        ))
    })?;
    if d < MIN_DEADLINE {
        return Err(field(format!(
            "{text} is shorter than the 24h a provider may take to run a batch; give at least 24h, or leave deadline out to call the model now"
        )));
    }
    if d > MAX_DEADLINE {
        return Err(field(format!(
            "{text} is longer than 30 days; give at most 30d"
        )));
    }
    if streams {
        return Err(field(
            "cannot be used with stream: a batch answers all at once; drop one of them".into(),
        ));
    }
    Ok(())
}

impl Envelope {
    /// A fresh envelope with a new id and every option unset.
    #[must_use]
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            v: VERSION,
            id: Some(TaskId::random()),
            prompt: prompt.into(),
            system: None,
            messages: Vec::new(),
            tools: Vec::new(),
            tool_choice: None,
            response_format: None,
            stream: None,
            prompt_cache: None,
            cache: None,
            deadline: None,
            task_type: None,
            provider: None,
            model: None,
            chain_id: None,
            step: None,
            min_tier: None,
            risk: None,
            area: None,
            timeout: None,
            max_attempts: None,
            run_at: None,
            idempotency_key: None,
            idempotency_window: None,
            batch_id: None,
            priority: None,
            tenant: None,
            tags: BTreeMap::new(),
            max_tokens: None,
            temperature: None,
            metadata: None,
            enqueued_at: None,
            traceparent: None,
            concurrency_key: None,
            concurrency_limit: None,
            fallback: None,
            attempts: 0,
            snoozes: 0,
            waiting_since: None,
            replays: 0,
            last_error: None,
            extra: Map::new(),
        }
    }

    /// Its `tags` as the ledger keeps them: a JSON object, `None` for none.
    #[must_use]
    pub fn tags_json(&self) -> Option<String> {
        (!self.tags.is_empty()).then(|| serde_json::to_string(&self.tags).unwrap_or_default())
    }

    /// How long the task can wait for its answer, when it says so (and says it well: an
    /// envelope that parsed has a valid one).
    #[must_use]
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
            .as_deref()
            .and_then(|d| humantime::parse_duration(d).ok())
    }

    /// Parses and validates raw bytes from the stream.
    ///
    /// # Errors
    /// Every way the input can be wrong, each as a sentence for the dead letter.
    pub fn parse(raw: &[u8], max_bytes: usize) -> Result<Self> {
        if raw.len() > max_bytes {
            return Err(Error::TooLarge {
                size: raw.len(),
                limit: max_bytes,
            });
        }
        // A well-formed envelope, the common case, takes one typed pass. Whatever that pass
        // does not accept goes the long way, through a JSON value, whose checks say what is
        // wrong and how to fix it; the checks both ways share are in `Envelope::check`.
        if let Ok(env) = serde_json::from_slice::<Envelope>(raw)
            && env.v == VERSION
            && env.check().is_ok()
        {
            return Ok(env);
        }
        let value: Value =
            serde_json::from_slice(raw).map_err(|e| Error::NotJson(e.to_string()))?;
        Self::from_value(value)
    }

    /// Validates a JSON value as an envelope.
    ///
    /// # Errors
    /// As [`Envelope::parse`].
    pub fn from_value(value: Value) -> Result<Self> {
        let obj = match &value {
            Value::Object(obj) => obj,
            Value::Array(_) => return Err(Error::NotObject("an array")),
            Value::String(_) => return Err(Error::NotObject("a string")),
            Value::Number(_) => return Err(Error::NotObject("a number")),
            Value::Bool(_) => return Err(Error::NotObject("a boolean")),
            Value::Null => return Err(Error::NotObject("null")),
        };
        match obj.get("v") {
            None => return Err(Error::MissingVersion),
            Some(v) if v.as_u64() == Some(VERSION) => {}
            Some(v) => return Err(Error::WrongVersion(v.to_string())),
        }
        let field = |name| obj.get(name).filter(|v| !v.is_null());
        check_concurrency(field("concurrency_key"), field("concurrency_limit"))?;
        let no_messages = field("messages").is_none_or(|m| m.as_array().is_some_and(Vec::is_empty));
        match obj.get("prompt") {
            None | Some(Value::Null) if no_messages => return Err(Error::MissingPrompt),
            Some(Value::String(s)) if blank(s) && no_messages => return Err(Error::MissingPrompt),
            _ => {}
        }
        let env: Envelope = serde_path_to_error::deserialize(value).map_err(|e| Error::Field {
            field: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
        env.check()?;
        Ok(env)
    }

    /// The checks of a typed envelope, which both ways of parsing make.
    fn check(&self) -> Result<()> {
        if blank(&self.prompt) && self.messages.is_empty() {
            return Err(Error::MissingPrompt);
        }
        if blank(&self.prompt)
            && self
                .messages
                .iter()
                .all(|m| m.role == conversation::Role::System)
        {
            return Err(Error::Field {
                field: "messages".into(),
                message: "has only system turns and the prompt is empty; add a user turn or set \"prompt\"".into(),
            });
        }
        conversation::check(
            &self.messages,
            &self.tools,
            self.tool_choice.as_deref(),
            self.response_format.as_deref(),
        )
        .map_err(|e| Error::Field {
            field: e.field,
            message: e.message,
        })?;
        if self.streams() && !self.tools.is_empty() {
            return Err(Error::Field {
                field: "stream".into(),
                message: "cannot be used with tools yet: a streamed answer carries text only; drop one of them".into(),
            });
        }
        if let Some(text) = &self.deadline {
            check_deadline(text, self.streams())?;
        }
        if let Some(ask) = &self.cache {
            ask.check(self)?;
        }
        self.check_idempotency()?;
        if let Some(id) = &self.batch_id {
            check_batch_id(id).map_err(|message| Error::Field {
                field: "batch_id".into(),
                message,
            })?;
        }
        // NUL cannot be stored (Postgres) nor passed to a program (argv): refused where it
        // enters, so nothing downstream meets it. `last_error` is the worker's own.
        let texts = [
            ("prompt", Some(self.prompt.as_str())),
            ("system", self.system.as_deref()),
            ("type", self.task_type.as_deref()),
            ("provider", self.provider.as_deref()),
            ("model", self.model.as_deref()),
            ("chain_id", self.chain_id.as_deref()),
            ("step", self.step.as_deref()),
            ("area", self.area.as_deref()),
            ("idempotency_key", self.idempotency_key.as_deref()),
            ("concurrency_key", self.concurrency_key.as_deref()),
            ("traceparent", self.traceparent.as_deref()),
        ];
        if let Some((field, _)) = texts
            .iter()
            .find(|(_, text)| text.is_some_and(|t| t.contains('\0')))
        {
            return Err(Error::Field {
                field: (*field).into(),
                message: "contains a NUL character (\\u0000), which cannot be stored or passed on; remove it".into(),
            });
        }
        let key = self.concurrency_key.as_deref().map(Value::from);
        let limit = self.concurrency_limit.map(Value::from);
        check_concurrency(key.as_ref(), limit.as_ref())?;
        self.task_type()?;
        check_class(self.priority, self.tenant.as_deref())?;
        check_tags(&self.tags)?;
        if self.max_attempts == Some(0) {
            return Err(Error::Field {
                field: "max_attempts".into(),
                message: "must be at least 1".into(),
            });
        }
        if let Some(t) = self.timeout
            && !(1..=MAX_TIMEOUT_SECS).contains(&t)
        {
            return Err(Error::Field {
                field: "timeout".into(),
                message: format!(
                    "must be between 1 second and {MAX_TIMEOUT_SECS} seconds (30 days), not {t}"
                ),
            });
        }
        Ok(())
    }

    /// Everything the model reads besides the system prompt, as one text: the prompt alone for
    /// a plain task; with a conversation, tools or a schema, every turn, tool and schema too.
    /// For counting tokens and finding routing keywords.
    #[must_use]
    pub fn read_text(&self) -> std::borrow::Cow<'_, str> {
        if self.messages.is_empty() && self.tools.is_empty() && self.response_format.is_none() {
            return std::borrow::Cow::Borrowed(&self.prompt);
        }
        let mut text = String::new();
        for m in &self.messages {
            text.push_str(&m.content.joined());
            text.push('\n');
            for call in &m.tool_calls {
                text.push_str(&call.name);
                text.push_str(&call.arguments.to_string());
                text.push('\n');
            }
        }
        text.push_str(&self.prompt);
        for tool in &self.tools {
            text.push_str(&serde_json::to_string(tool).unwrap_or_default());
        }
        if let Some(format) = &self.response_format {
            text.push_str(&serde_json::to_string(format).unwrap_or_default());
        }
        std::borrow::Cow::Owned(text)
    }

    /// The task's class when it waits in the queue's room (`priority` or `tenant` set):
    /// its priority and tenant (`""` for none). `None`: served straight from the stream.
    #[must_use]
    pub fn class(&self) -> Option<(u8, &str)> {
        if self.priority.unwrap_or(0) == 0 && self.tenant.is_none() {
            return None;
        }
        let p = self.priority.unwrap_or(0).clamp(0, i64::from(MAX_PRIORITY));
        Some((
            u8::try_from(p).unwrap_or(0),
            self.tenant.as_deref().unwrap_or(""),
        ))
    }

    /// Whether the answer is to be streamed to `llmq:{q}:out:<id>`.
    #[must_use]
    pub fn streams(&self) -> bool {
        self.stream == Some(true)
    }

    /// The task type, `data_analysis` when unset.
    ///
    /// # Errors
    /// [`Error::UnknownType`] for a name outside the ten task types.
    pub fn task_type(&self) -> Result<TaskType> {
        self.task_type
            .as_deref()
            .map_or(Ok(TaskType::default()), TaskType::from_str)
    }

    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS)
    }

    #[must_use]
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS))
    }

    /// The task id; for a producer that left it out, one derived from where the task sits,
    /// so every redelivery of the same entry gets the same id.
    #[must_use]
    pub fn id_or_derive(&self, queue: &str, entry_id: EntryId) -> TaskId {
        self.id.unwrap_or_else(|| derive_id(queue, entry_id))
    }

    /// The envelope as the JSON stored in Redis.
    #[must_use]
    pub fn to_json(&self) -> String {
        // Serializing a struct of plain fields and a JSON map cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The task id of a raw stream payload, even one that is not a valid envelope: its `id`
/// if that is a UUID (normalised to lower case), else the id derived from where it sits.
#[must_use]
pub fn task_id_of(queue: &str, entry_id: EntryId, payload: &[u8]) -> TaskId {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v.get("id")?.as_str()?.parse::<TaskId>().ok())
        .unwrap_or_else(|| derive_id(queue, entry_id))
}

/// The chain and step a payload names, when it is JSON naming both: what a task that could
/// not be run (refused, poison, dead) says of the chain step it claims to be.
#[must_use]
pub fn chain_step_of(payload: &[u8]) -> Option<(String, String)> {
    #[derive(Deserialize)]
    struct Step {
        chain_id: Option<String>,
        step: Option<String>,
    }
    let s: Step = serde_json::from_slice(payload).ok()?;
    Some((s.chain_id?, s.step?))
}

/// The id given to a task whose producer did not set one.
#[must_use]
pub fn derive_id(queue: &str, entry_id: EntryId) -> TaskId {
    TaskId::from_uuid(Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("llmq:{queue}:{entry_id}").as_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Envelope> {
        Envelope::parse(s.as_bytes(), DEFAULT_MAX_PAYLOAD_BYTES)
    }

    #[test]
    fn minimal_envelope_parses_with_defaults() {
        let env = parse(r#"{"v":1,"prompt":"hi"}"#).unwrap();
        assert_eq!(env.prompt, "hi");
        assert_eq!(env.max_attempts(), 3);
        assert_eq!(env.task_type().unwrap(), TaskType::DataAnalysis);
        assert!(env.id.is_none());
    }

    #[test]
    fn tags_are_name_value_pairs_checked_like_every_field() {
        let env = parse(r#"{"v":1,"prompt":"hi","tags":{"team":"search","feature":"sum"}}"#);
        let env = env.unwrap();
        assert_eq!(env.tags.get("team").map(String::as_str), Some("search"));
        assert!(
            env.to_json()
                .contains(r#""tags":{"feature":"sum","team":"search"}"#)
        );
        assert!(
            !Envelope::new("x").to_json().contains("tags"),
            "none: not written"
        );
        let refused = |tags: &str| {
            parse(&format!(r#"{{"v":1,"prompt":"hi","tags":{tags}}}"#))
                .unwrap_err()
                .to_string()
        };
        let nine: Vec<String> = (0..9).map(|i| format!(r#""t{i}":"v""#)).collect();
        for (tags, says) in [
            (format!("{{{}}}", nine.join(",")), "at most 8"),
            (r#"{"team name":"x"}"#.into(), "name a tag with"),
            (r#"{"":"x"}"#.into(), "name a tag with"),
            (r#"{"team":""}"#.into(), "tags.team"),
            (r#"{"team":"a\nb"}"#.into(), "control character"),
            (
                format!(r#"{{"team":"{}"}}"#, "x".repeat(129)),
                "at most 128",
            ),
            (r#"{"team":7}"#.into(), "tags.team"),
            (r#"["team"]"#.into(), "tags"),
        ] {
            let e = refused(&tags);
            assert!(e.contains(says), "{tags}: {e}");
        }
    }

    #[test]
    fn a_malformed_id_is_refused_with_a_sentence_naming_the_field() {
        let e = parse(r#"{"v":1,"prompt":"hi","id":"order-7"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("id"), "{e}");
        assert!(
            e.contains("`order-7` is not a task id; a task id is a UUID"),
            "{e}"
        );
        let env = parse(r#"{"v":1,"prompt":"hi","id":"3F2B8C1E-5D6A-4E7B-9C0D-1A2B3C4D5E6F"}"#);
        assert_eq!(
            env.unwrap().id.map(|id| id.to_string()).as_deref(),
            Some("3f2b8c1e-5d6a-4e7b-9c0d-1a2b3c4d5e6f"),
            "read once, as its UUID"
        );
    }

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let env = parse(r#"{"v":1,"prompt":"hi","future_field":{"a":1}}"#).unwrap();
        let again = parse(&env.to_json()).unwrap();
        assert_eq!(
            again.extra.get("future_field"),
            Some(&serde_json::json!({"a":1}))
        );
    }

    #[test]
    fn each_kind_of_bad_input_has_its_own_reason() {
        let cases = [
            ("not json", "not valid JSON"),
            ("[1,2]", "JSON object, not an array"),
            (r#"{"prompt":"x"}"#, "no \"v\" field"),
            (r#"{"v":2,"prompt":"x"}"#, "version 2"),
            (r#"{"v":1}"#, "no prompt"),
            (r#"{"v":1,"prompt":"  "}"#, "no prompt"),
            (
                r#"{"v":1,"prompt":"x","type":"poetry"}"#,
                "unknown task type `poetry`",
            ),
            (
                r#"{"v":1,"prompt":"x","timeout":"soon"}"#,
                "field `timeout` is wrong",
            ),
            (r#"{"v":1,"prompt":"x","id":"nope"}"#, "field `id` is wrong"),
            (r#"{"v":1,"prompt":"x","max_attempts":0}"#, "at least 1"),
            (
                r#"{"v":1,"prompt":"x","risk":"extreme"}"#,
                "field `risk` is wrong",
            ),
        ];
        for (input, want) in cases {
            let err = parse(input).unwrap_err().to_string();
            assert!(err.contains(want), "{input}: {err}");
        }
        let big = format!(r#"{{"v":1,"prompt":"{}"}}"#, "x".repeat(100));
        let err = Envelope::parse(big.as_bytes(), 50).unwrap_err().to_string();
        assert!(err.contains("over the 50-byte limit"), "{err}");
    }

    #[test]
    fn unknown_type_lists_all_ten() {
        let err = "x".parse::<TaskType>().unwrap_err().to_string();
        for t in TaskType::ALL {
            assert!(err.contains(t.as_str()));
        }
    }

    /// The typed pass and the long way through a JSON value come to the same envelope, or
    /// the same error: the long way's.
    #[test]
    fn both_ways_of_parsing_agree() {
        let inputs = [
            r#"{"v":1,"prompt":"x"}"#,
            r#"{"v":1,"prompt":"x","type":"research","max_attempts":2,"timeout":30,"metadata":{"a":[1]},"custom":"kept"}"#,
            r#"{"v":1,"prompt":"x","concurrency_key":"k","concurrency_limit":3,"run_at":"2026-01-01T00:00:00Z"}"#,
            r#"{"v":1,"prompt":"x","prompt":"y"}"#,
            r#"{"v":2,"prompt":"x"}"#,
            r#"{"prompt":"x"}"#,
            r#"{"v":1,"prompt":"  "}"#,
            r#"{"v":1,"prompt":null}"#,
            r#"{"v":1,"prompt":"x","type":"poetry"}"#,
            r#"{"v":1,"prompt":"x","max_attempts":0}"#,
            r#"{"v":1,"prompt":"x","timeout":0}"#,
            r#"{"v":1,"prompt":"x","concurrency_key":"k"}"#,
            r#"{"v":1,"prompt":"x","concurrency_key":" ","concurrency_limit":1}"#,
            r#"{"v":1,"prompt":"x","concurrency_key":"k","concurrency_limit":0}"#,
            r#"{"v":1,"prompt":"x","max_tokens":"many"}"#,
            r#"{"v":1,"prompt":"","max_tokens":"many"}"#,
        ];
        for raw in inputs {
            let long_way = serde_json::from_str(raw)
                .map_err(|e| Error::NotJson(e.to_string()))
                .and_then(Envelope::from_value);
            assert_eq!(parse(raw), long_way, "{raw}");
        }
        // A blank prompt is named before any other problem.
        assert_eq!(
            parse(r#"{"v":1,"prompt":" ","max_tokens":"many"}"#),
            Err(Error::MissingPrompt)
        );
    }

    #[test]
    fn derived_ids_are_stable() {
        assert_eq!(
            derive_id("q", crate::ids::EntryId::new(1, 0)),
            derive_id("q", crate::ids::EntryId::new(1, 0))
        );
        assert_ne!(
            derive_id("q", crate::ids::EntryId::new(1, 0)),
            derive_id("q", crate::ids::EntryId::new(1, 1))
        );
    }

    #[test]
    fn a_concurrency_key_needs_a_whole_limit_of_at_least_one() {
        let parse = |extra: &str| {
            Envelope::parse(
                format!(r#"{{"v":1,"prompt":"x"{extra}}}"#).as_bytes(),
                1 << 20,
            )
        };
        assert!(parse(r#","concurrency_key":"k","concurrency_limit":3"#).is_ok());
        for (extra, says) in [
            (
                r#","concurrency_key":"k","concurrency_limit":0"#,
                "at least 1, not 0",
            ),
            (
                r#","concurrency_key":"k","concurrency_limit":-2"#,
                "at least 1, not -2",
            ),
            (
                r#","concurrency_key":"k","concurrency_limit":1.5"#,
                "whole number",
            ),
            (
                r#","concurrency_key":"k","concurrency_limit":"3""#,
                "whole number",
            ),
            (r#","concurrency_key":"k""#, "needs a concurrency_limit"),
            (r#","concurrency_limit":2"#, "needs a concurrency_key"),
            (
                r#","concurrency_key":"","concurrency_limit":2"#,
                "non-empty",
            ),
        ] {
            let e = parse(extra).unwrap_err().to_string();
            assert!(e.contains(says), "{extra}: {e}");
        }
    }
}

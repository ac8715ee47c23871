//! What became of a task: its status, its error class and the record stored at
//! `llmq:{q}:result:<id>`. The record's JSON is what `llmq result --format json` prints; its
//! field names are part of the documented wire format.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::TaskId;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// In the stream, not yet read by a worker.
    Queued,
    /// Waiting in `delayed` for `run_at` or a retry backoff.
    Delayed,
    /// Read by a worker and not yet finished.
    Running,
    Succeeded,
    /// Ended without success and no longer in the dead-letter queue (purged).
    Failed,
    /// In the dead-letter queue, where it can be replayed.
    Dead,
    /// A chain step that was cancelled before it ran (its chain failed or was cancelled).
    Cancelled,
}

impl Status {
    /// True once nothing more will happen to the task without an operator.
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Succeeded | Status::Failed | Status::Dead | Status::Cancelled
        )
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Delayed => "delayed",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Dead => "dead",
            Status::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an attempt failed, which decides what happens next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Worth another try: 408, 5xx, timeouts, connection resets.
    Retryable,
    /// 429: wait for Retry-After; the wait does not use up an attempt.
    RateLimited,
    /// Another try would fail the same way: 400, 401, 403, 404, 422, context too long.
    Fatal,
    /// The provider's quota or the budget is used up.
    QuotaExhausted,
    /// The task itself is malformed.
    Invalid,
    /// The task was redelivered too often: workers died while running it.
    Poison,
    /// No provider could be called for longer than `routing.max_wait`: an outage, an open
    /// circuit or a rate limit kept every candidate out of reach.
    Unavailable,
}

impl ErrorClass {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Fatal => "fatal",
            ErrorClass::QuotaExhausted => "quota_exhausted",
            ErrorClass::Invalid => "invalid",
            ErrorClass::Poison => "poison",
            ErrorClass::Unavailable => "unavailable",
        }
    }

    /// Whether another attempt may succeed.
    #[must_use]
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorClass::Retryable | ErrorClass::RateLimited)
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorClass {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [
            ErrorClass::Retryable,
            ErrorClass::RateLimited,
            ErrorClass::Fatal,
            ErrorClass::QuotaExhausted,
            ErrorClass::Invalid,
            ErrorClass::Poison,
            ErrorClass::Unavailable,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
        .ok_or_else(|| format!("unknown error class `{s}`"))
    }
}

/// Tokens by kind, as the provider reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// All prompt tokens, cached ones included.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Prompt tokens served from the provider's cache (a subset of `input_tokens`).
    pub cached_tokens: u64,
    /// Prompt tokens written to the provider's cache (a subset of `input_tokens`; Anthropic
    /// bills them above the input price).
    pub cache_write_tokens: u64,
    /// Reasoning tokens (a subset of `output_tokens`).
    pub reasoning_tokens: u64,
}

/// The stored outcome of a task (`llmq:{q}:result:<id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub task_id: TaskId,
    pub queue: String,
    pub status: Status,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub output: Option<String>,
    pub error: Option<String>,
    pub error_class: Option<ErrorClass>,
    pub attempts: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_usd: f64,
    /// Wall time of the last attempt, in milliseconds.
    pub duration_ms: u64,
    pub task_type: Option<String>,
    pub chain_id: Option<String>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Why the router chose the provider that answered (or was tried last).
    #[serde(default)]
    pub route: Option<String>,
    /// Each failed call of the last attempt, `provider/model: error`, in order.
    #[serde(default)]
    pub provider_errors: Vec<String>,
    /// When a learned strategy chose the model: the strategy, the probability it gave the
    /// model (its propensity), whether it explored, and the models it ordered, best first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned: Option<LearnedRoute>,
    /// The answer read as JSON, when the task asked for JSON (`response_format`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
    /// The tools the model called, when the task gave it tools. llmq never runs them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<crate::conversation::ToolCall>,
    /// The output limit (`max_tokens`) cut the answer short.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Answered from the answer cache, without a call.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
    /// The task whose call gave the cached answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_from: Option<TaskId>,
    /// A copy of a task with the same `idempotency_key`: that task, whose answer this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<TaskId>,
}

/// How a learned strategy chose a task's model, so the route can be judged later
/// (`llmq insights`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearnedRoute {
    pub strategy: String,
    pub propensity: f64,
    pub explored: bool,
    /// The capable models it ordered, `provider/model`, best first.
    pub candidates: Vec<String>,
}

impl TaskRecord {
    /// A record with only an id, a queue and a status: for tasks not yet finished.
    #[must_use]
    pub fn pending(task_id: TaskId, queue: &str, status: Status) -> Self {
        Self {
            task_id,
            queue: queue.to_owned(),
            status,
            provider: None,
            model: None,
            output: None,
            error: None,
            error_class: None,
            attempts: 0,
            input_tokens: 0,
            output_tokens: 0,
            cached_tokens: 0,
            reasoning_tokens: 0,
            cost_usd: 0.0,
            duration_ms: 0,
            task_type: None,
            chain_id: None,
            finished_at: None,
            route: None,
            provider_errors: Vec::new(),
            learned: None,
            json: None,
            tool_calls: Vec::new(),
            truncated: false,
            cached: false,
            cached_from: None,
            duplicate_of: None,
        }
    }

    #[must_use]
    pub fn to_json(&self) -> String {
        // Room for a typical record up front instead of growing into it.
        let mut json = Vec::with_capacity(512);
        match serde_json::to_writer(&mut json, self) {
            Ok(()) => String::from_utf8(json).unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
}

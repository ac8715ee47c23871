//! A chain's state as Redis stores it: each step's state, the chain's, and the reruns that
//! put steps into their next round (escalation, a review's send-back, `llmq chain retry`),
//! with the bound no input escapes (`chains.max_rounds`). Pure: the queue's chain scripts
//! only store and move what is built here.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Chain;
use crate::ids::TaskId;

/// What became of a chain step, as its chain records it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    /// Where the step stands; `llmq chain show` refines `queued` into `running` or
    /// `retrying` from the task.
    #[serde(default)]
    pub status: StepStatus,
    /// The task of its current round (every step has one from its chain's expansion).
    #[serde(
        default,
        deserialize_with = "crate::ids::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub task_id: Option<TaskId>,
    #[serde(default)]
    pub round: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub cost_usd: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a step awaiting approval: when its `on_timeout` applies (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<i64>,
    /// Parents that succeeded and that did not, so far.
    #[serde(default)]
    pub ok: u32,
    #[serde(default)]
    pub failed: u32,
    /// Findings of other reviews that rejected the same work at once, folded into this
    /// round rather than sending the step back again: appended to its prompt as data.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub folded: Vec<String>,
}

/// Where a chain step stands, as its state says it (the step scripts write it in Lua).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Waiting for its parents.
    #[default]
    Blocked,
    /// Its task is enqueued (or running, or waiting for a retry).
    Queued,
    /// An approval step waiting for a person.
    AwaitingApproval,
    Succeeded,
    Failed,
    Cancelled,
}

impl StepStatus {
    /// The status as Lua, the step's state and `llmq chain show` write it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Blocked => "blocked",
            Self::Queued => "queued",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The step is over: it succeeded, failed or was cancelled.
    #[must_use]
    pub const fn ended(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// It ended without success: what a retry runs again.
    #[must_use]
    pub const fn unsucceeded(self) -> bool {
        matches!(self, Self::Failed | Self::Cancelled)
    }
}

/// Compared with its text, as `http::Method` is: `status == "succeeded"`.
impl PartialEq<&str> for StepStatus {
    fn eq(&self, text: &&str) -> bool {
        self.as_str() == *text
    }
}

impl std::fmt::Display for StepStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a chain stands, as its hash's `state` says it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainStatus {
    #[default]
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl ChainStatus {
    /// The state as Lua and `llmq chain` write it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state a chain's hash holds; `None` for any other text.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// Compared with its text, as `http::Method` is: `status == "succeeded"`.
impl PartialEq<&str> for ChainStatus {
    fn eq(&self, text: &&str) -> bool {
        self.as_str() == *text
    }
}

impl std::fmt::Display for ChainStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A chain as stored: its spec, state and steps.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainState {
    pub spec: Chain,
    pub state: ChainStatus,
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub steps: HashMap<String, StepState>,
}

impl ChainState {
    /// `again` in their next round, each waiting for those of its parents that will not
    /// have succeeded (rerun too, or not succeeded), in the order of the spec.
    ///
    /// # Errors
    /// A step would wait for a parent that did not succeed and is not rerun: it would never
    /// run. The sentence names both.
    pub fn reruns(
        &self,
        again: &std::collections::HashSet<String>,
    ) -> std::result::Result<Vec<Rerun>, String> {
        let will_succeed = |p: &str| {
            !again.contains(p)
                && self
                    .steps
                    .get(p)
                    .is_some_and(|x| x.status == StepStatus::Succeeded)
        };
        let mut out = Vec::new();
        for s in self.spec.steps.iter().filter(|s| again.contains(&s.name)) {
            if let Some(p) = s
                .after
                .iter()
                .find(|p| !again.contains(*p) && !will_succeed(p))
            {
                return Err(format!(
                    "step `{}` runs after `{p}`, which did not succeed and would not run again",
                    s.name
                ));
            }
            let round = self.steps.get(&s.name).map_or(0, |x| x.round) + 1;
            // The bound no input escapes: escalations, rejections and retries together.
            if round > self.spec.max_rounds {
                return Err(format!(
                    "step `{}` has run again {} times, the most chains.max_rounds ({}) allows",
                    s.name,
                    round - 1,
                    self.spec.max_rounds
                ));
            }
            let mut task = s.task.clone();
            task.id = Some(super::step_task_id(&self.spec.id, &s.name, round));
            let (ok, waits_for): (Vec<String>, Vec<String>) =
                s.after.iter().cloned().partition(|p| will_succeed(p));
            out.push(Rerun {
                step: s.name.clone(),
                round,
                task,
                waits_for,
                ok: u32::try_from(ok.len()).unwrap_or(0),
                fold: String::new(),
            });
        }
        Ok(out)
    }

    /// What `llmq chain retry` (and a replayed step's dead letter) runs again: the failed and
    /// cancelled steps, or `from` and every step after it, each in its next round.
    ///
    /// # Errors
    /// `from` is not a step, or a step would wait for one that will not run (the sentence
    /// says which), or a step's rounds are used up.
    pub fn retry(&self, from: Option<&str>) -> std::result::Result<Vec<Rerun>, String> {
        let again: std::collections::HashSet<String> = match from {
            Some(f) if self.spec.step(f).is_none() => {
                return Err(format!("chain {} has no step `{f}`", self.spec.id));
            }
            Some(f) => self.descendants(f),
            None => self
                .spec
                .steps
                .iter()
                .filter(|s| {
                    self.steps
                        .get(&s.name)
                        .is_some_and(|x| x.status.unsucceeded())
                })
                .map(|s| s.name.clone())
                .collect(),
        };
        self.reruns(&again).map_err(|e| {
            format!("{e}; retry without --from, or --from the step that did not succeed")
        })
    }

    /// `from` and every step after it.
    #[must_use]
    pub fn descendants(&self, from: &str) -> std::collections::HashSet<String> {
        let mut out = std::collections::HashSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(n) = todo.pop() {
            if out.insert(n.clone())
                && let Some(s) = self.spec.step(&n)
            {
                todo.extend(s.children.iter().cloned());
            }
        }
        out
    }
}

/// How a chain step's task ended: its step's status as the step scripts write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepEnd {
    Succeeded,
    Failed,
    Cancelled,
}

impl From<StepEnd> for StepStatus {
    fn from(end: StepEnd) -> Self {
        match end {
            StepEnd::Succeeded => Self::Succeeded,
            StepEnd::Failed => Self::Failed,
            StepEnd::Cancelled => Self::Cancelled,
        }
    }
}

impl StepEnd {
    /// The status, as Lua, the step's state and the metrics name it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// How a chain step's task ended, for its chain.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    pub chain_id: String,
    pub step: String,
    pub outcome: StepEnd,
    pub fields: StepState,
    /// The step's state and its children's as the worker read them before running the
    /// step, when it did: the step script then swaps in the states built from them, without
    /// decoding JSON, if they are still these texts (see `queue::chain::step_swap`).
    pub seen: Option<Box<Seen>>,
}

/// A chain step's state and its children's, as its worker read them before running it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// The step's own state.
    pub own: Box<str>,
    /// Each child's state, in the order of the step's `children` (empty where a child has
    /// none).
    pub children: Box<[Box<str>]>,
}

impl StepOutcome {
    /// Step `step` of chain `chain_id` failed with `error`, as task `task_id` (its current
    /// round's task, or the step script leaves the step alone).
    #[must_use]
    pub fn failed(chain_id: String, step: String, task_id: TaskId, error: String) -> Self {
        Self {
            chain_id,
            step,
            outcome: StepEnd::Failed,
            fields: StepState {
                task_id: Some(task_id),
                error: Some(error),
                ..StepState::default()
            },
            seen: None,
        }
    }
}

/// A step to run again, as the queue's chain scripts enqueue it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rerun {
    pub step: String,
    pub round: u32,
    /// The step's task for this round (its id names the round).
    pub task: crate::envelope::Envelope,
    /// The parents it waits for (those that are not succeeded, or are rerun too).
    pub waits_for: Vec<String>,
    /// How many of its parents already succeeded.
    pub ok: u32,
    /// What a review's rejection appended to the step's prompt (its findings), for the step
    /// to redo; empty for the others. When a sibling review already sent the step into this
    /// round, this is folded into that round instead of running the step twice.
    pub fold: String,
}

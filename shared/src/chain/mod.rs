//! Chains: a small DAG of steps submitted at once, from any language, with
//! `XADD llmq:{q}:stream * chain '<json>'`. The queue's scripts store and move what is built
//! here.
//!
//! Layout:
//! - this module: the spec (the wire format), its validation, templates and handoffs;
//! - `state`: a chain and its steps as stored, and the reruns that put steps into their
//!   next round, bounded by `chains.max_rounds`;
//! - `tests`: the spec's validation, one sentence per problem.
//!
//! Every way a spec can be wrong is a sentence that names the step and the problem; the
//! worker turns it into one dead letter and runs nothing of the chain.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::conversation::{ResponseFormat, Tool, ToolChoice};
use crate::envelope::{self, Envelope, Risk, TaskType};
use crate::ids::{EntryId, TaskId};

#[cfg(test)]
mod tests;

mod state;
pub use state::{
    ChainState, ChainStatus, Rerun, Seen, StepEnd, StepOutcome, StepState, StepStatus,
};

/// The only chain version this build understands.
pub const VERSION: u64 = 1;
/// The most steps one chain may have.
pub const MAX_STEPS: usize = 64;
pub use crate::config::{DEFAULT_MAX_ROUNDS, MAX_ROUNDS_CEILING};

/// The longest `chain_id` accepted, in characters.
pub const MAX_CHAIN_ID: usize = 512;
/// `{{step.summary}}` inlines at most this many characters.
pub const SUMMARY_CHARS: usize = 500;
/// A chain's prompts, once its `vars` are filled in, may total at most this many times the
/// payload limit (`--max-payload-bytes`); each step's prompt at most the limit itself. Both
/// are checked before anything is filled in, so a small spec cannot make a large chain.
pub const EXPANSION_FACTOR: usize = 4;

/// Why a chain was rejected, as the sentence its dead letter carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Error(String);

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn err(text: impl Into<String>) -> Error {
    Error(text.into())
}

/// What a failed step does to the rest of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Its descendants are cancelled; independent branches go on (a judge or consensus join
    /// waits for its other parents and needs `min_success`).
    #[default]
    CancelDescendants,
    /// Every step not yet finished is cancelled.
    FailChain,
}

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A prompt to a model; after several parents, a merge of their outputs.
    Llm,
    /// A model picks the best of its parents' outputs; its output is the chosen one.
    Judge,
    /// No call: the majority of the parents' normalised outputs; a tie fails.
    Consensus,
    /// A model judges another step's output: `{"verdict": "approve"|"reject", "findings"}`.
    Review,
    /// A quality gate: a command from the provider file's `checks`, with its parent's output
    /// on stdin; exit 0 passes.
    Check,
    /// Waits for a person: `llmq chain approve|reject`, or `on_timeout` after `timeout`.
    Approval,
}

/// What an approval nobody decided becomes when its time is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    #[default]
    Reject,
    Approve,
}

impl Kind {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Llm => "llm",
            Kind::Judge => "judge",
            Kind::Consensus => "consensus",
            Kind::Review => "review",
            Kind::Check => "check",
            Kind::Approval => "approval",
        }
    }

    /// Joins wait for all their parents and run with `min_success` of them.
    #[must_use]
    pub fn is_join(self) -> bool {
        matches!(self, Kind::Judge | Kind::Consensus)
    }
}

/// What a review must not share with the step it reviews.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distinct {
    Model,
    Provider,
}

/// What a review's rejection does instead of failing the step: the work goes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnReject {
    /// The step to redo, with the findings in its prompt: the reviewed one or an ancestor.
    pub rerun: String,
    /// How many times the work may go back; the rejection after the last fails the step.
    #[serde(default = "one")]
    pub max_rounds: u32,
    /// The step to redo runs one model tier up (fast, standard, advanced; a pinned model stays
    /// pinned).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub escalate: bool,
}

fn one() -> u32 {
    1
}

fn default_max_rounds() -> u32 {
    DEFAULT_MAX_ROUNDS
}

/// One validated step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub kind: Kind,
    /// Parents, in the order given.
    pub after: Vec<String>,
    /// Steps that list this one in `after`.
    pub children: Vec<String>,
    /// The prompt with the chain's variables filled in; step references stay as written.
    pub prompt: String,
    pub min_success: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distinct: Option<Distinct>,
    /// The step a review reviews.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviews: Option<String>,
    /// The check a check step runs: a name under `checks:` in the provider file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// For a review or a check: what a rejection does instead of failing the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_reject: Option<OnReject>,
    /// For an approval: what it becomes when nobody decided within its `timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<OnTimeout>,
    /// After a failure the step runs again one model tier up, while there is a tier up and
    /// no model is pinned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub escalate: bool,
    /// The task each run of the step is (prompt, hints, limits), chain fields set.
    pub task: Envelope,
}

impl Step {
    /// The steps whose outputs it reads: its parents in `after` order, then the other steps
    /// its prompt names, each once.
    #[must_use]
    pub fn inputs(&self) -> Vec<String> {
        let mut inputs = self.after.clone();
        for (_, r) in references(&self.prompt) {
            if let Some(p) = r.step()
                && !inputs.iter().any(|i| i == p)
            {
                inputs.push(p.to_owned());
            }
        }
        inputs
    }
}

/// A validated chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chain {
    pub id: String,
    pub on_failure: OnFailure,
    /// How many times one step may run again after its first run: the provider file's
    /// `chains.max_rounds` when the chain was expanded, stored with it.
    #[serde(default = "default_max_rounds")]
    pub max_rounds: u32,
    /// In the order given, which is a valid order to run them in only by accident.
    pub steps: Vec<Step>,
    /// The submission's idempotency key: the chain's id when the spec names none, so a
    /// chain submitted twice with one key is one chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl Chain {
    /// Reads and validates a chain spec. `entry_id` (the stream entry) names a chain whose
    /// spec gives no `chain_id`.
    ///
    /// # Errors
    /// Every way the spec can be wrong, naming the step and the problem.
    pub fn parse(raw: &[u8], max_bytes: usize, queue: &str, entry_id: EntryId) -> Result<Self> {
        if raw.len() > max_bytes {
            return Err(err(format!(
                "the chain is {} bytes, over the {max_bytes}-byte limit; shorten its prompts or raise --max-payload-bytes",
                raw.len()
            )));
        }
        let value: Value = serde_json::from_slice(raw)
            .map_err(|e| err(format!("the chain is not valid JSON: {e}")))?;
        match value.get("v") {
            Some(v) if v.as_u64() == Some(VERSION) => {}
            Some(v) => {
                return Err(err(format!(
                    "the chain has version {v}, but this worker understands only \"v\": 1"
                )));
            }
            None => return Err(err("the chain has no \"v\" field; set \"v\": 1")),
        }
        let spec: RawChain = serde_path_to_error::deserialize(value)
            .map_err(|e| err(format!("field `{}` is wrong: {}", e.path(), e.inner())))?;
        let id = match spec.chain_id.clone() {
            Some(id) if id.trim().is_empty() => {
                return Err(err("`chain_id` is empty; leave it out or name the chain"));
            }
            // It names keys and approval entries (`<chain id>\t<step>`).
            Some(id) if id.chars().count() > MAX_CHAIN_ID || id.contains(char::is_control) => {
                return Err(err(format!(
                    "`chain_id` must be at most {MAX_CHAIN_ID} characters, none of them control characters (tab, newline, NUL, ...)"
                )));
            }
            Some(id) => id,
            None => match spec.idempotency_key.as_deref() {
                Some(key) => crate::idempotency::chain_id(queue, spec.tenant.as_deref(), key),
                None => envelope::derive_id(queue, entry_id).uuid(),
            }
            .to_string(),
        };
        if let Some(key) = &spec.idempotency_key
            && (key.is_empty() || key.contains('\0'))
        {
            return Err(err(
                "`idempotency_key` is empty or holds a NUL character; give the chain a key of its own, or leave it out",
            ));
        }
        build(id, spec, max_bytes)
    }

    /// The first check step whose command `configured` does not know, as the sentence its
    /// dead letter carries.
    #[must_use]
    pub fn unknown_check(&self, configured: impl Fn(&str) -> bool) -> Option<Error> {
        self.steps.iter().find_map(|s| {
            let c = s.command.as_deref()?;
            (!configured(c)).then(|| {
                err(format!(
                    "step `{}`: check `{c}` is not configured; add it under `checks:` in the provider file",
                    s.name
                ))
            })
        })
    }

    /// Bounds the chain by `max_rounds` (the provider file's `chains.max_rounds`): the first
    /// step whose `on_reject.max_rounds` asks for more is an error naming both.
    ///
    /// # Errors
    /// A step's `on_reject.max_rounds` is over `max_rounds`.
    pub fn bound_rounds(&mut self, max_rounds: u32) -> Result<()> {
        if let Some((s, o)) = self.steps.iter().find_map(|s| {
            Some((
                s,
                s.on_reject.as_ref().filter(|o| o.max_rounds > max_rounds)?,
            ))
        }) {
            return Err(err(format!(
                "step `{}`: on_reject.max_rounds {} is over chains.max_rounds {max_rounds} in the provider file",
                s.name, o.max_rounds
            )));
        }
        self.max_rounds = max_rounds;
        Ok(())
    }

    /// The step named `name`.
    #[must_use]
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// The spec as stored with the chain.
    #[must_use]
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The id of a step's task: the same for the same chain, step and round, so that an
/// expansion or a finish replayed after a crash names the same task.
#[must_use]
pub fn step_task_id(chain_id: &str, step: &str, round: u32) -> TaskId {
    TaskId::from_uuid(uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("llmq-chain:{chain_id}:{step}:{round}").as_bytes(),
    ))
}

/// A `{{...}}` reference in a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// `{{name}}`: a chain variable, filled in at expansion.
    Var(String),
    /// `{{step.summary}}`: at most [`SUMMARY_CHARS`] of the step's output, inlined.
    Summary(String),
    /// `{{step.output}}`: the step's whole output, read just before the call.
    Output(String),
    /// `{{step.json}}`, `{{step.json.field.0.name}}`: the step's answer read as JSON (it
    /// asked for some with `response_format`), or a value in it by object keys and array
    /// indexes; a string as is, anything else as JSON text. Read just before the call.
    Json(String, Vec<String>),
}

impl Reference {
    /// The step it reads, if it reads one.
    #[must_use]
    pub fn step(&self) -> Option<&str> {
        match self {
            Self::Var(_) => None,
            Self::Summary(p) | Self::Output(p) | Self::Json(p, _) => Some(p),
        }
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Var(v) => write!(f, "{{{{{v}}}}}"),
            Self::Summary(p) => write!(f, "{{{{{p}.summary}}}}"),
            Self::Output(p) => write!(f, "{{{{{p}.output}}}}"),
            Self::Json(p, path) if path.is_empty() => write!(f, "{{{{{p}.json}}}}"),
            Self::Json(p, path) => write!(f, "{{{{{p}.json.{}}}}}", path.join(".")),
        }
    }
}

/// The value at `path` in `json`: object keys, and indexes into arrays; a string as is,
/// anything else as JSON text.
#[must_use]
pub fn json_at(json: &Value, path: &[String]) -> Option<String> {
    let mut at = json;
    for key in path {
        at = match at {
            Value::Object(map) => map.get(key)?,
            Value::Array(items) => items.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(match at {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// Every `{{...}}` in `text`, with its byte range.
#[must_use]
pub fn references(text: &str) -> Vec<(std::ops::Range<usize>, Reference)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(start) = text[from..].find("{{").map(|i| from + i) {
        let Some(end) = text[start + 2..].find("}}").map(|i| start + 2 + i) else {
            break;
        };
        let inner = text[start + 2..end].trim();
        let json = inner.split_once('.').and_then(|(step, rest)| {
            let path = rest.strip_prefix("json")?;
            let path: Vec<String> = match path.strip_prefix('.') {
                None if path.is_empty() => Vec::new(),
                None => return None,
                Some(p) => p.split('.').map(str::to_owned).collect(),
            };
            (is_name(step) && path.iter().all(|k| !k.is_empty()))
                .then(|| Reference::Json(step.to_owned(), path))
        });
        let reference = match inner.rsplit_once('.') {
            _ if json.is_some() => json,
            Some((step, "summary")) => Some(Reference::Summary(step.to_owned())),
            Some((step, "output")) => Some(Reference::Output(step.to_owned())),
            None if is_name(inner) => Some(Reference::Var(inner.to_owned())),
            _ => None,
        };
        if let Some(r) = reference {
            out.push((start..end + 2, r));
        }
        from = end + 2;
    }
    out
}

/// Replaces each reference `fill` answers for; the rest stays as written.
#[must_use]
pub fn fill(text: &str, mut fill: impl FnMut(&Reference) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (range, r) in references(text) {
        if let Some(value) = fill(&r) {
            out.push_str(&text[last..range.start]);
            out.push_str(&value);
            last = range.end;
        }
    }
    out.push_str(&text[last..]);
    out
}

/// At most [`SUMMARY_CHARS`] characters of `output`, on a character boundary.
#[must_use]
pub fn summary(output: &str) -> String {
    crate::provider::excerpt(output, SUMMARY_CHARS)
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChain {
    #[allow(dead_code)]
    v: u64,
    chain_id: Option<String>,
    idempotency_key: Option<String>,
    #[serde(default)]
    on_failure: OnFailure,
    #[serde(default)]
    defaults: RawFields,
    #[serde(default)]
    vars: BTreeMap<String, String>,
    /// At most this many of the chain's step tasks run at once, across every worker.
    max_parallel: Option<u32>,
    /// Every step's task's `priority` and `tenant`.
    priority: Option<i64>,
    tenant: Option<String>,
    steps: Vec<RawStep>,
}

/// What a step and the chain's `defaults` may both set.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawFields {
    #[serde(rename = "type")]
    task_type: Option<String>,
    risk: Option<Risk>,
    area: Option<String>,
    provider: Option<String>,
    model: Option<String>,
    system: Option<String>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    max_attempts: Option<u32>,
    timeout: Option<Value>,
    response_format: Option<ResponseFormat>,
    tools: Option<Vec<Tool>>,
    tool_choice: Option<ToolChoice>,
    /// The step's answer is written to its task's live answer as it arrives.
    stream: Option<bool>,
    prompt_cache: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    #[serde(default)]
    after: Vec<String>,
    kind: Option<String>,
    prompt: Option<String>,
    #[serde(flatten)]
    fields: RawFields,
    distinct: Option<Distinct>,
    reviews: Option<String>,
    min_success: Option<u32>,
    on_reject: Option<Value>,
    escalate: Option<bool>,
    on_timeout: Option<String>,
    command: Option<String>,
}

fn build(id: String, spec: RawChain, max_bytes: usize) -> Result<Chain> {
    envelope::check_class(spec.priority, spec.tenant.as_deref()).map_err(|e| err(e.to_string()))?;
    if spec.steps.is_empty() {
        return Err(err(
            "the chain has no steps; list at least one under \"steps\"",
        ));
    }
    if spec.steps.len() > MAX_STEPS {
        return Err(err(format!(
            "the chain has {} steps; a chain may have at most {MAX_STEPS}",
            spec.steps.len()
        )));
    }
    let mut seen = HashSet::new();
    for s in &spec.steps {
        if !is_name(&s.name) {
            return Err(err(format!(
                "step name `{}` must be letters, digits, `_` or `-`",
                s.name
            )));
        }
        if !seen.insert(s.name.as_str()) {
            return Err(err(format!(
                "two steps are named `{}`; give every step its own name",
                s.name
            )));
        }
    }
    for s in &spec.steps {
        for p in &s.after {
            if !seen.contains(p.as_str()) {
                return Err(err(format!(
                    "step `{}` is after `{p}`, which is not a step of this chain",
                    s.name
                )));
            }
            if *p == s.name {
                return Err(err(format!("step `{}` is after itself", s.name)));
            }
        }
        // A parent named twice would be waited for twice and end only once.
        if let Some((i, p)) = s
            .after
            .iter()
            .enumerate()
            .find(|(i, p)| s.after[..*i].contains(p))
        {
            let _ = i;
            return Err(err(format!(
                "step `{}` names `{p}` twice in `after`; name each parent once",
                s.name
            )));
        }
    }
    let parents: HashMap<&str, &[String]> = spec
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.after.as_slice()))
        .collect();
    if let Some(cycle) = find_cycle(&spec.steps, &parents) {
        return Err(err(format!(
            "steps {} form a cycle; a chain must not loop",
            cycle.join(" -> ")
        )));
    }
    // Variables are text: a reference in one would be expanded where the spec did not ask.
    for (name, value) in &spec.vars {
        if !references(value).is_empty() {
            return Err(err(format!(
                "variable `{name}` contains a `{{{{...}}}}` reference; variables are text, not templates"
            )));
        }
    }
    let mut budget = max_bytes.saturating_mul(EXPANSION_FACTOR);
    let mut steps = Vec::with_capacity(spec.steps.len());
    for s in &spec.steps {
        steps.push(step(&id, &spec, s, &parents, max_bytes, &mut budget)?);
    }
    for step in &mut steps {
        step.children = spec
            .steps
            .iter()
            .filter(|c| c.after.contains(&step.name))
            .map(|c| c.name.clone())
            .collect();
    }
    Ok(Chain {
        id,
        on_failure: spec.on_failure,
        max_rounds: DEFAULT_MAX_ROUNDS,
        steps,
        idempotency_key: spec.idempotency_key,
    })
}

/// The concurrency key of a chain's steps under `max_parallel`: `chain-<chain_id>`, or, for a
/// chain id too long for a key, `chain-<a UUID derived from it>`.
fn chain_key(chain_id: &str) -> String {
    let key = format!("chain-{chain_id}");
    if key.chars().count() <= envelope::MAX_CONCURRENCY_KEY {
        key
    } else {
        format!(
            "chain-{}",
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, chain_id.as_bytes())
        )
    }
}

/// The size of `prompt` once `vars` are filled in, counted without filling them in.
fn expanded_len(prompt: &str, vars: &BTreeMap<String, String>) -> usize {
    references(prompt)
        .iter()
        .fold(prompt.len(), |n, (range, r)| match r {
            Reference::Var(v) => n
                .saturating_sub(range.len())
                .saturating_add(vars.get(v).map_or(0, String::len)),
            _ => n,
        })
}

/// Step `s` of chain `chain_id` as its spec gives it, checked: its kind's fields, its prompt
/// with the chain's variables filled in (counted against `budget`, the chain's), and its task.
fn step(
    chain_id: &str,
    spec: &RawChain,
    s: &RawStep,
    parents: &HashMap<&str, &[String]>,
    max_bytes: usize,
    budget: &mut usize,
) -> Result<Step> {
    let k = kind_fields(s, parents)?;
    let prompt = step_prompt(spec, s, k.kind, parents, max_bytes, budget)?;
    let task = step_task(chain_id, spec, s, &prompt, max_bytes)?;
    Ok(Step {
        name: s.name.clone(),
        kind: k.kind,
        after: s.after.clone(),
        children: Vec::new(),
        prompt,
        min_success: k.min_success,
        distinct: s.distinct,
        reviews: k.reviews,
        command: k.command,
        on_reject: k.on_reject,
        on_timeout: k.on_timeout,
        escalate: k.escalate,
        task,
    })
}

/// An error in step `s`.
fn at(s: &RawStep) -> impl Fn(String) -> Error + '_ {
    move |problem| err(format!("step `{}`: {problem}", s.name))
}

/// The fields of a step that depend on its kind, checked against it.
struct KindFields {
    kind: Kind,
    on_timeout: Option<OnTimeout>,
    escalate: bool,
    command: Option<String>,
    min_success: u32,
    reviews: Option<String>,
    on_reject: Option<OnReject>,
}

/// Step `s`'s kind and the fields that go with it; a field its kind does not take is an
/// error that says so.
fn kind_fields(s: &RawStep, parents: &HashMap<&str, &[String]>) -> Result<KindFields> {
    let at = at(s);
    let kind = match s.kind.as_deref().unwrap_or("llm") {
        "llm" => Kind::Llm,
        "judge" => Kind::Judge,
        "consensus" => Kind::Consensus,
        "review" => Kind::Review,
        "check" => Kind::Check,
        "approval" => Kind::Approval,
        k => {
            return Err(at(format!(
                "unknown kind `{k}`; use one of llm, judge, consensus, review, check, approval"
            )));
        }
    };
    let on_timeout = match (&s.on_timeout, kind) {
        (None, Kind::Approval) => Some(OnTimeout::Reject),
        (None, _) => None,
        (Some(t), Kind::Approval) => Some(match t.as_str() {
            "reject" => OnTimeout::Reject,
            "approve" => OnTimeout::Approve,
            other => {
                return Err(at(format!(
                    "on_timeout `{other}` is neither `reject` nor `approve`"
                )));
            }
        }),
        (Some(_), _) => return Err(at("`on_timeout` is only for approval steps".into())),
    };
    let escalate = s.escalate.unwrap_or(false);
    if escalate && !matches!(kind, Kind::Llm | Kind::Judge | Kind::Review) {
        return Err(at(
            "`escalate` is only for steps that call a model (llm, judge, review)".into(),
        ));
    }
    let command = match (kind, &s.command) {
        (Kind::Check, Some(c)) if !c.trim().is_empty() => Some(c.clone()),
        (Kind::Check, _) => {
            return Err(at(
                "a check step needs `command`: the name of a check under `checks:` in the provider file".into(),
            ));
        }
        (_, Some(_)) => return Err(at("`command` is only for check steps".into())),
        (_, None) => None,
    };
    if kind == Kind::Check && s.after.len() != 1 {
        return Err(at(
            "a check step runs after exactly one step, whose output it checks".into(),
        ));
    }
    if kind.is_join() && s.after.len() < 2 {
        return Err(at(format!(
            "a {} step needs at least two steps in `after` to choose from",
            kind.as_str()
        )));
    }
    let min_success = s.min_success.unwrap_or(1);
    if min_success == 0 || min_success as usize > s.after.len().max(1) {
        return Err(at(format!(
            "min_success {min_success} must be between 1 and the number of parents ({})",
            s.after.len()
        )));
    }
    let reviews = match (kind, &s.reviews) {
        (Kind::Review, Some(r)) if !s.after.contains(r) => {
            return Err(at(format!(
                "it reviews `{r}`, which is not in its `after`; add it there"
            )));
        }
        (Kind::Review, Some(r)) => Some(r.clone()),
        (Kind::Review, None) if s.after.len() == 1 => Some(s.after[0].clone()),
        (Kind::Review, None) => {
            return Err(at("name the step it reviews in `reviews`".into()));
        }
        (_, Some(_)) => return Err(at("`reviews` is only for review steps".into())),
        (_, None) => None,
    };
    let on_reject = match (&s.on_reject, kind) {
        (None, _) => None,
        (Some(_), k) if k != Kind::Review && k != Kind::Check => {
            return Err(at("`on_reject` is only for review and check steps".into()));
        }
        (Some(v), _) => {
            let o: OnReject = serde_json::from_value(v.clone())
                .map_err(|e| at(format!("`on_reject` is wrong: {e}")))?;
            if !(1..=MAX_ROUNDS_CEILING).contains(&o.max_rounds) {
                return Err(at(format!(
                    "on_reject.max_rounds {} must be between 1 and {MAX_ROUNDS_CEILING}",
                    o.max_rounds
                )));
            }
            if !ancestors(&s.name, parents).contains(o.rerun.as_str()) {
                return Err(at(format!(
                    "on_reject reruns `{}`, which is not a step this one runs after",
                    o.rerun
                )));
            }
            Some(o)
        }
    };
    if s.distinct.is_some() && kind != Kind::Review && kind != Kind::Judge {
        return Err(at("`distinct` is only for review and judge steps".into()));
    }
    Ok(KindFields {
        kind,
        on_timeout,
        escalate,
        command,
        min_success,
        reviews,
        on_reject,
    })
}

/// Step `s`'s prompt (its kind's default when it has none) with the chain's variables filled
/// in: it names only the chain's variables and the steps it runs after, and stays within
/// `max_bytes`, and the chain's prompts within `budget`.
fn step_prompt(
    spec: &RawChain,
    s: &RawStep,
    kind: Kind,
    parents: &HashMap<&str, &[String]>,
    max_bytes: usize,
    budget: &mut usize,
) -> Result<String> {
    let at = at(s);
    let prompt = match (&s.prompt, kind) {
        (Some(p), _) if !p.trim().is_empty() => p.clone(),
        (_, Kind::Consensus) => "The majority of its parents' outputs (no call).".into(),
        (_, Kind::Judge) => "Pick the best candidate.".into(),
        (_, Kind::Review) => "Review this work.".into(),
        (_, Kind::Check) => "Its parent's output, checked by a command (no call).".into(),
        (_, Kind::Approval) => "Approve to go on.".into(),
        _ => return Err(at("the step has no prompt; set \"prompt\"".into())),
    };
    let ancestors = ancestors(&s.name, parents);
    for (_, r) in references(&prompt) {
        match r {
            Reference::Var(v) if !spec.vars.contains_key(&v) => {
                return Err(at(format!(
                    "{{{{{v}}}}} is not a variable of the chain; give it in \"vars\" (llmq chain submit --var {v}=...)"
                )));
            }
            Reference::Summary(p) | Reference::Output(p) | Reference::Json(p, _)
                if !ancestors.contains(p.as_str()) =>
            {
                return Err(at(format!(
                    "the prompt uses `{p}`, which is not a step this one runs after"
                )));
            }
            _ => {}
        }
    }
    let size = expanded_len(&prompt, &spec.vars);
    if size > max_bytes {
        return Err(at(format!(
            "its prompt is {size} bytes once its variables are filled in, over the {max_bytes}-byte limit; shorten it or raise --max-payload-bytes"
        )));
    }
    *budget = budget.checked_sub(size).ok_or_else(|| {
        at(format!(
            "the chain's prompts come to more than {} bytes once its variables are filled in ({EXPANSION_FACTOR} times the {max_bytes}-byte limit); shorten them or the variables",
            max_bytes.saturating_mul(EXPANSION_FACTOR)
        ))
    })?;
    let filled = fill(&prompt, |r| match r {
        Reference::Var(v) => spec.vars.get(v).cloned(),
        _ => None,
    });
    // A value may still form a reference with the prompt's own text (`{{x}}.output}}` with
    // `x = "{{a"`): the handoffs after filling must be the ones the spec wrote.
    let handoffs = |text: &str| {
        references(text)
            .into_iter()
            .filter(|(_, r)| !matches!(r, Reference::Var(_)))
            .map(|(_, r)| r)
            .collect::<Vec<_>>()
    };
    if handoffs(&filled) != handoffs(&prompt) {
        return Err(at(
            "its variables, filled in, would form a `{{...}}` reference with the prompt's own text; variables are text, not templates: keep `{{` and `}}` out of their values"
                .into(),
        ));
    }
    Ok(filled)
}

/// The task the chain enqueues for step `s` (its first round), with `prompt`: one a worker
/// accepts, as any other.
fn step_task(
    chain_id: &str,
    spec: &RawChain,
    s: &RawStep,
    prompt: &str,
    max_bytes: usize,
) -> Result<Envelope> {
    let at = at(s);
    let f = merged(&spec.defaults, &s.fields);
    let mut task = Envelope::new(prompt.to_owned());
    task.id = Some(step_task_id(chain_id, &s.name, 0));
    task.chain_id = Some(chain_id.into());
    task.step = Some(s.name.as_str().into());
    if let Some(t) = &f.task_type {
        t.parse::<TaskType>().map_err(|e| at(e.to_string()))?;
    }
    task.task_type = f.task_type.map(Into::into);
    task.risk = f.risk;
    task.area = f.area.map(Into::into);
    task.provider = f.provider.map(Into::into);
    task.model = f.model.map(Into::into);
    task.system = f.system.map(Into::into);
    task.max_tokens = f.max_tokens;
    task.temperature = f.temperature;
    task.max_attempts = f.max_attempts;
    task.response_format = f.response_format.map(Box::new);
    task.tools = f.tools.unwrap_or_default();
    task.tool_choice = f.tool_choice.map(Box::new);
    task.stream = f.stream;
    task.prompt_cache = f.prompt_cache;
    task.priority = spec.priority;
    task.tenant = spec.tenant.as_deref().map(Into::into);
    if let Some(n) = spec.max_parallel {
        if n == 0 {
            return Err(err(
                "`max_parallel` must be at least 1: how many of the chain's steps may run at once",
            ));
        }
        task.concurrency_key = Some(chain_key(chain_id).into());
        task.concurrency_limit = Some(n);
    }
    task.timeout = match &f.timeout {
        None => None,
        Some(Value::Number(n)) => Some(n.as_u64().ok_or_else(|| {
            at("timeout must be whole seconds or a duration such as \"5m\"".into())
        })?),
        Some(Value::String(d)) => Some(
            humantime::parse_duration(d)
                .map_err(|e| at(format!("timeout `{d}` is not a duration ({e})")))?
                .as_secs(),
        ),
        Some(_) => {
            return Err(at(
                "timeout must be whole seconds or a duration such as \"5m\"".into(),
            ));
        }
    };
    // The task must be one a worker accepts, like any other: valid, and within the payload
    // limit as JSON (escaping can make it longer than its prompt).
    Envelope::from_value(serde_json::to_value(&task).unwrap_or_default())
        .map_err(|e| at(format!("its task is not valid: {e}")))?;
    let size = task.to_json().len();
    if size > max_bytes {
        return Err(at(format!(
            "its task is {size} bytes as JSON, over the {max_bytes}-byte limit; shorten its prompt or raise --max-payload-bytes"
        )));
    }
    Ok(task)
}

fn merged(defaults: &RawFields, own: &RawFields) -> RawFields {
    let d = defaults.clone();
    let o = own.clone();
    RawFields {
        task_type: o.task_type.or(d.task_type),
        risk: o.risk.or(d.risk),
        area: o.area.or(d.area),
        provider: o.provider.or(d.provider),
        model: o.model.or(d.model),
        system: o.system.or(d.system),
        max_tokens: o.max_tokens.or(d.max_tokens),
        temperature: o.temperature.or(d.temperature),
        max_attempts: o.max_attempts.or(d.max_attempts),
        timeout: o.timeout.or(d.timeout),
        response_format: o.response_format.or(d.response_format),
        tools: o.tools.or(d.tools),
        tool_choice: o.tool_choice.or(d.tool_choice),
        stream: o.stream.or(d.stream),
        prompt_cache: o.prompt_cache.or(d.prompt_cache),
    }
}

fn ancestors<'a>(name: &str, parents: &HashMap<&'a str, &'a [String]>) -> HashSet<&'a str> {
    let mut out = HashSet::new();
    let mut todo: Vec<&str> = parents
        .get(name)
        .map(|p| p.iter().map(String::as_str).collect())
        .unwrap_or_default();
    while let Some(p) = todo.pop() {
        if let Some((&key, more)) = parents.get_key_value(p)
            && out.insert(key)
        {
            todo.extend(more.iter().map(String::as_str));
        }
    }
    out
}

/// A cycle among `steps`, as the names along it, first repeated at the end.
fn find_cycle(steps: &[RawStep], parents: &HashMap<&str, &[String]>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit<'a>(
        n: &'a str,
        parents: &HashMap<&'a str, &'a [String]>,
        marks: &mut HashMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match marks.get(n) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = path.iter().position(|p| *p == n).unwrap_or(0);
                let mut cycle: Vec<String> = path[from..].iter().map(|s| (*s).to_owned()).collect();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(n, Mark::Open);
        path.push(n);
        for p in parents.get(n).copied().unwrap_or_default() {
            if let Some((&key, _)) = parents.get_key_value(p.as_str())
                && let Some(c) = visit(key, parents, marks, path)
            {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(n, Mark::Done);
        None
    }
    let mut marks = HashMap::new();
    for s in steps {
        if let Some(c) = visit(&s.name, parents, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

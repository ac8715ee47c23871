//! Chain steps: what a step needs from its chain before its call (handoffs, candidates, the
//! model it must not be), and what its answer means after (a judge's pick, a review's
//! verdict). A consensus step makes no call.

use std::collections::HashMap;

use llmq_shared::chain::{self, Distinct, Kind, Reference};
use llmq_shared::chain::{ChainState, Rerun, Seen, StepState};
use llmq_shared::config::Config;
use llmq_shared::envelope::Envelope;
use llmq_shared::envelope::Tier;
use llmq_shared::keys::QueueKeys;
use llmq_shared::outcome::ErrorClass;
use llmq_shared::queue::{Client, StepContext};
use llmq_shared::routing::Constraints;

use llmq_shared::provider::Completion;

use super::attempt::{AttemptError, Outcome, Rejection};
use super::decide::Stop;
use super::{Executor, Task};

/// What a chain step's preparation decided, for its attempt and after it.
#[derive(Default)]
pub(super) struct StepPlan {
    /// The prompt its handoffs made, when it calls a model.
    pub prompt: Option<String>,
    pub constraints: Constraints,
    pub reading: Option<Reading>,
    pub rework: Option<Box<Rework>>,
    pub escalation: Option<Result<Box<Rework>, String>>,
    /// Its outcome without a call (an output, a check, a fatal problem); boxed, as every
    /// task's call would otherwise carry its room.
    pub settled: Option<Box<Outcome>>,
    /// For a review or a check: the task whose output its verdict judges.
    pub judged: Option<String>,
    /// Its state and its children's as read before it ran (`StepOutcome::seen`).
    pub seen: Option<Box<Seen>>,
}

impl Executor {
    /// The step phase: a chain step's handoffs, candidates and constraints, or its outcome
    /// when it makes no call, or why it stops before one. Boxed by its caller: its futures
    /// are large and done before the step's call starts.
    pub(super) async fn step(&self, task: &Task<'_>) -> Result<StepPlan, Stop> {
        let mut step = StepPlan::default();
        match prepare(
            &self.redis,
            task.queue,
            task.env,
            &self.config,
            self.max_payload_bytes,
            &mut step.seen,
        )
        .await
        {
            Err(e) => {
                tracing::warn!(task = %task.task_id, "cannot read the task's chain: {e}");
                return Err(Stop::HandedBack);
            }
            Ok(Prepared::Cancelled(why)) => return Err(Stop::Cancelled(why)),
            Ok(Prepared::Invalid(why)) => return Err(Stop::NotItsStep(why)),
            Ok(Prepared::Await { deadline_ms }) => return Err(Stop::Awaiting(deadline_ms)),
            Ok(Prepared::Fatal(why)) => {
                step.settled = Some(Box::new(Outcome::Failed(AttemptError {
                    class: ErrorClass::Fatal,
                    message: why,
                    tried: Vec::new(),
                    retry_after: None,
                })));
            }
            Ok(Prepared::Check {
                command,
                input,
                rework,
                judged,
            }) => {
                step.rework = rework.map(Box::new);
                step.judged = judged;
                step.settled = Some(Box::new(match self.config.checks.get(&command) {
                    Some(c) => super::check::run(&command, c, &input).await,
                    None => Outcome::Failed(AttemptError {
                        class: ErrorClass::Fatal,
                        message: format!(
                            "check `{command}` is not configured; add it under `checks:` in the provider file"
                        ),
                        tried: Vec::new(),
                        retry_after: None,
                    }),
                }));
            }
            Ok(Prepared::Output(text)) => {
                step.settled = Some(Box::new(Outcome::Answered(Completion {
                    text,
                    usage: llmq_shared::provider::Usage::default(),
                    ..Completion::default()
                })));
            }
            Ok(Prepared::Call {
                prompt,
                constraints,
                read,
                rework,
                escalation,
            }) => {
                if let Reading::Verdict { judged, .. } = &read {
                    step.judged.clone_from(judged);
                }
                step.prompt = Some(prompt);
                step.constraints = constraints;
                step.reading = Some(read);
                step.rework = rework.map(Box::new);
                step.escalation = escalation.map(|e| e.map(Box::new));
            }
        }
        Ok(step)
    }
}

/// How long an approval waits when its step gives no `timeout`.
const APPROVAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// How a step is run, decided before its call.
// One per task, built and taken apart at once: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Prepared {
    /// Call a model with this prompt and these constraints, then read the answer as `read`.
    Call {
        prompt: String,
        constraints: Constraints,
        read: Reading,
        /// For a review that may send the work back: what goes back if it rejects.
        rework: Option<Rework>,
        /// For a step that escalates: itself in its next round, if it fails, or why it
        /// cannot run again (its rounds are used up).
        escalation: Option<Result<Rework, String>>,
    },
    /// No call: this is the step's output.
    Output(String),
    /// No call: run check `command` on `input`; a failure may send the work back.
    Check {
        command: String,
        input: String,
        rework: Option<Rework>,
        /// The task whose output it checks, whose model its verdict judges.
        judged: Option<String>,
    },
    /// No call: a person decides, by `deadline_ms` at the latest.
    Await { deadline_ms: i64 },
    /// The step was cancelled (its chain failed or was cancelled): do not run it.
    Cancelled(String),
    /// The step cannot run; retrying cannot help.
    Fatal(String),
    /// The task is not the step's to run: a dead letter of class `invalid` that leaves the
    /// chain alone.
    Invalid(String),
}

/// What a review's rejection sends back: the steps to run again, from the step to redo to
/// the review itself, in their next round.
pub struct Rework {
    pub review: String,
    pub rerun: String,
    pub reruns: Vec<Rerun>,
    /// With `on_reject.escalate`: the tier of the model that did the work sent back.
    pub escalate_from: Option<Option<Tier>>,
}

impl Rework {
    /// The reruns, with the findings after the prompt of the step to redo: the model's text,
    /// which is never read as a template (only the spec's prompt is one).
    pub fn with_findings(mut self, findings: &str) -> Vec<Rerun> {
        // A task may not carry NUL: a model's NUL would make the rerun a dead letter.
        let findings = llmq_shared::text::storable(findings);
        for r in &mut self.reruns {
            if r.step == self.rerun {
                if let Some(from) = self.escalate_from {
                    // At the top tier, or pinned, the work goes back as it is.
                    let _ = escalate(&mut r.task, from);
                }
                r.fold = format!(
                    "\n\n## Findings of review `{}` on the previous version\n\n{findings}\n\nAddress every finding.",
                    self.review
                );
                r.task.prompt.push_str(&r.fold);
            }
        }
        self.reruns
    }
}

/// What a step's answer means.
pub(super) enum Reading {
    /// The answer is the output.
    Plain,
    /// The answer names one of these candidates (1-based); the output is the chosen one.
    Pick(Vec<String>),
    /// The answer is a verdict on step `reviewed`, whose task was `judged`.
    Verdict {
        reviewed: String,
        judged: Option<String>,
    },
}

/// Reads what step `env.step` of chain `env.chain_id` needs, and decides how to run it;
/// `seen` gets the step's state and its children's as read (see `StepOutcome::seen`).
///
/// # Errors
/// Redis fails (the caller hands the task back: the worker's fault, not the task's).
/// A prompt that its handoffs would make longer than `max_bytes` fails the step before it is
/// built.
pub(super) async fn prepare(
    redis: &Client,
    keys: &QueueKeys,
    env: &Envelope,
    config: &Config,
    max_bytes: usize,
    seen: &mut Option<Box<Seen>>,
) -> llmq_shared::queue::Result<Prepared> {
    let (Some(chain_id), Some(name)) = (env.chain_id.as_deref(), env.step.as_deref()) else {
        return Ok(Prepared::Fatal("the task names a step but no chain".into()));
    };
    let Some(StepContext {
        step,
        states,
        seen: read,
    }) = redis.step_context(keys, chain_id, name).await?
    else {
        return Ok(Prepared::Fatal(format!(
            "chain `{chain_id}` has no step `{name}` in queue `{}` (expired, or submitted elsewhere)",
            keys.name()
        )));
    };
    *seen = read;
    // Only the task the chain enqueued for the step's current round may run it, and only
    // while the step is queued: a task naming a step is otherwise a forgery (or a stale
    // copy), and it must not finish the step, least of all one that waits for a person.
    let own = states
        .get(name)
        .is_some_and(|s| env.id.is_some_and(|id| s.task_id == id.to_string()));
    // An earlier round's task of a step sent into a new round (a sibling's rejection sent the
    // work it depends on back) is superseded: it ends quietly, and the new round runs.
    if let Some(s) = states.get(name)
        && !own
        && let Some(id) = env.id
        && (0..s.round).any(|r| chain::step_task_id(chain_id, name, r) == id)
    {
        return Ok(Prepared::Cancelled(format!(
            "superseded: step `{name}` of chain `{chain_id}` runs again as round {}, after the work it depends on was sent back",
            s.round
        )));
    }
    if let Some(s) = states.get(name)
        && (!own || !matches!(s.status.as_str(), "queued" | "cancelled"))
    {
        return Ok(Prepared::Invalid(format!(
            "step `{name}` of chain `{chain_id}` is {} and runs as task {} (round {}); this task is not the one the chain enqueued for it, so it cannot run the step (a failed step runs again with `llmq chain retry`)",
            s.status, s.task_id, s.round
        )));
    }
    match states.get(name).map(|s| s.status.as_str()) {
        Some("cancelled") | None => {
            let why = states
                .get(name)
                .and_then(|s| s.error.clone())
                .unwrap_or_else(|| "the chain was cancelled".into());
            return Ok(Prepared::Cancelled(why));
        }
        _ => {}
    }
    // Sending work back or escalating needs the whole chain; most steps do neither.
    let full = if step.on_reject.is_some() || step.escalate {
        redis.chain(keys, chain_id).await?
    } else {
        None
    };
    // Templates are expanded once, from the spec: only the step's own prompt is one. What a
    // rerun's task adds after it (a review's findings) is a model's text, appended as data.
    let Some(added) = env.prompt.strip_prefix(step.prompt.as_str()) else {
        return Ok(Prepared::Invalid(format!(
            "the task's prompt is not the prompt of step `{name}` of chain `{chain_id}`; only the chain's own tasks run its steps"
        )));
    };
    let template = step.prompt.as_str();
    let folded: Vec<String> = states
        .get(name)
        .map(|s| s.folded.clone())
        .unwrap_or_default();
    // Parents that succeeded, in `after` order, then the other ancestors the prompt names
    // (the states `step_context` read): with their outputs where needed.
    let wanted = step.inputs();
    let succeeded: Vec<(&str, &StepState)> = wanted
        .iter()
        .filter_map(|p| {
            let s = states.get(p)?;
            (s.status == "succeeded").then_some((p.as_str(), s))
        })
        .collect();
    let needs_outputs = !matches!(step.kind, Kind::Llm)
        || step.after.len() > 1
        || chain::references(template)
            .iter()
            .any(|(_, r)| matches!(r, Reference::Output(_) | Reference::Json(..)));
    let mut outputs: HashMap<&str, String> = HashMap::new();
    let mut jsons: HashMap<&str, serde_json::Value> = HashMap::new();
    if needs_outputs {
        let ids: Vec<String> = succeeded.iter().map(|(_, s)| s.task_id.clone()).collect();
        let records = redis.results(keys, &ids).await?;
        for ((p, _), r) in succeeded.iter().zip(records) {
            let Some(r) = r else { continue };
            if let Some(json) = r.json {
                jsons.insert(*p, json);
            }
            if let Some(output) = r.output {
                outputs.insert(*p, output);
            }
        }
    }
    // What each reference to a step reads: its summary, its output, a value of its JSON.
    let value = |r: &Reference| -> Option<String> {
        match r {
            Reference::Var(_) => None,
            Reference::Summary(p) => succeeded
                .iter()
                .find(|(n, _)| n == p)
                .and_then(|(_, s)| s.summary.clone()),
            Reference::Output(p) => outputs.get(p.as_str()).cloned(),
            Reference::Json(p, path) => chain::json_at(jsons.get(p.as_str())?, path),
        }
    };
    // Handoffs: counted before they are filled in, so outputs referenced many times cannot
    // make a prompt of any size.
    let size = chain::references(template).iter().fold(
        folded
            .iter()
            .fold(template.len().saturating_add(added.len()), |n, f| {
                n.saturating_add(f.len())
            }),
        |n, (range, r)| {
            let len = match r {
                Reference::Var(_) => return n,
                Reference::Summary(p) => states
                    .get(p)
                    .and_then(|s| s.summary.as_ref())
                    .map_or(0, String::len),
                Reference::Output(p) => outputs.get(p.as_str()).map_or(0, String::len),
                Reference::Json(..) => value(r).map_or(0, |v| v.len()),
            };
            n.saturating_sub(range.len()).saturating_add(len)
        },
    );
    // What a merge, a judge or a review appends after the prompt: its parents' outputs, with
    // their framing (a heading, a name or a number each, an instruction; counted a little high).
    let parents_out = || {
        step.after.iter().fold(160usize, |n, p| {
            let out = outputs.get(p.as_str()).map_or(0, String::len);
            n.saturating_add(out).saturating_add(p.len() + 16)
        })
    };
    let appended = match step.kind {
        Kind::Llm if step.after.len() > 1 && chain::references(template).is_empty() => {
            parents_out()
        }
        Kind::Judge => parents_out(),
        Kind::Review => step
            .reviews
            .as_deref()
            .and_then(|r| outputs.get(r))
            .map_or(0, |o| o.len().saturating_add(400)),
        _ => 0,
    };
    let size = size.saturating_add(appended);
    if size > max_bytes {
        return Ok(Prepared::Fatal(format!(
            "the step's prompt would be {size} bytes with its handoffs and its parents' outputs, over the {max_bytes}-byte limit; reference `.summary` instead of `.output`, or raise --max-payload-bytes"
        )));
    }
    // Handoffs: a reference that cannot be resolved fails the step; it never runs blind.
    let mut unresolved = None;
    let mut prompt = chain::fill(template, |r| {
        if matches!(r, Reference::Var(_)) {
            return None;
        }
        let got = value(r);
        if got.is_none() && unresolved.is_none() {
            unresolved = Some(r.clone());
        }
        got
    });
    if let Some(r) = unresolved {
        let why = match &r {
            Reference::Json(..) => {
                "the step did not succeed, its result expired, or its answer has no JSON there (give it a response_format)"
            }
            _ => "the step did not succeed, or its result expired",
        };
        return Ok(Prepared::Fatal(format!(
            "handoff unresolved: {r} has no value ({why}); the step does not run without its context"
        )));
    }
    prompt.push_str(added);
    // Findings of sibling reviews that rejected the same work at once, folded into this
    // round: data, like `added`.
    for fold in &folded {
        prompt.push_str(fold);
    }
    // Candidates (of a judge, a consensus, a merge) are the parents only.
    let candidates: Vec<(&str, String)> = succeeded
        .iter()
        .filter(|(p, _)| step.after.iter().any(|a| a == p))
        .filter_map(|(p, _)| Some((*p, outputs.get(p)?.clone())))
        .collect();
    let prepared = match step.kind {
        Kind::Llm if step.after.len() > 1 && chain::references(template).is_empty() => {
            // A merge: the parents' outputs follow the prompt.
            let mut p = prompt;
            p.push_str("\n\n## Inputs\n");
            for (name, out) in &candidates {
                p.push_str(&format!("\n### {name}\n{out}\n"));
            }
            call(p, Constraints::default(), Reading::Plain)
        }
        Kind::Llm => call(prompt, Constraints::default(), Reading::Plain),
        Kind::Approval => {
            let wait = env
                .timeout
                .map_or(APPROVAL_TIMEOUT, std::time::Duration::from_secs);
            Prepared::Await {
                deadline_ms: llmq_shared::queue::now_ms()
                    .saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
            }
        }
        Kind::Check => match candidates.into_iter().next() {
            Some((parent, input)) => Prepared::Check {
                command: step.command.clone().unwrap_or_default(),
                input,
                rework: full.as_ref().and_then(|f| rework(f, &step, config)),
                judged: states.get(parent).map(|s| s.task_id.clone()),
            },
            None => Prepared::Fatal(
                "handoff unresolved: the output of the step this check checks has no value".into(),
            ),
        },
        Kind::Consensus => consensus(&candidates),
        Kind::Judge => {
            let mut p = prompt;
            p.push_str("\n\n## Candidates\n");
            for (i, (_, out)) in candidates.iter().enumerate() {
                p.push_str(&format!("\n[{}]\n{out}\n", i + 1));
            }
            p.push_str(&format!(
                "\nAnswer with the number of the best candidate (1 to {}) first.",
                candidates.len()
            ));
            let constraints = distinct_from(
                &step.distinct,
                candidates.iter().filter_map(|(n, _)| states.get(*n)),
            );
            let texts = candidates.into_iter().map(|(_, o)| o).collect();
            call(p, constraints, Reading::Pick(texts))
        }
        Kind::Review => {
            let reviewed = step.reviews.clone().unwrap_or_default();
            let Some(work) = outputs.get(reviewed.as_str()) else {
                return Ok(Prepared::Fatal(format!(
                    "handoff unresolved: the output of `{reviewed}`, the step this one reviews, has no value"
                )));
            };
            let p = format!(
                "{prompt}\n\n## Work to review (step `{reviewed}`)\n\n{work}\n\nAnswer with JSON only: {{\"verdict\": \"approve\" or \"reject\", \"findings\": [\"...\"]}}."
            );
            let constraints = distinct_from(&step.distinct, states.get(&reviewed));
            let rework = full.as_ref().and_then(|f| rework(f, &step, config));
            let judged = states.get(&reviewed).map(|s| s.task_id.clone());
            Prepared::Call {
                prompt: p,
                constraints,
                read: Reading::Verdict { reviewed, judged },
                rework,
                escalation: full.as_ref().and_then(|f| escalation(f, &step)),
            }
        }
    };
    // A step that escalates runs again one tier up if it fails.
    Ok(match prepared {
        Prepared::Call {
            prompt,
            constraints,
            read,
            rework,
            escalation: None,
        } => Prepared::Call {
            prompt,
            constraints,
            read,
            rework,
            escalation: full.as_ref().and_then(|f| escalation(f, &step)),
        },
        other => other,
    })
}

fn call(prompt: String, constraints: Constraints, read: Reading) -> Prepared {
    Prepared::Call {
        prompt,
        constraints,
        read,
        rework: None,
        escalation: None,
    }
}

/// Raises `task`'s minimum tier one above `from` (the higher of the failed model's tier and
/// the minimum the failed round had, so every rung is a tier higher than the last: at most
/// two); or says why it cannot go up.
pub(super) fn escalate(task: &mut Envelope, from: Option<Tier>) -> Result<Tier, String> {
    if let Some(model) = &task.model {
        return Err(format!("its model is pinned ({model})"));
    }
    let from = from.max(task.min_tier).unwrap_or(Tier::Fast);
    let up = from
        .up()
        .ok_or_else(|| format!("it already ran on the highest tier, {}", from.as_str()))?;
    task.min_tier = Some(up);
    Ok(up)
}

/// Step `step` in its next round, for an escalation after it fails; or why it has no next
/// round.
fn escalation(state: &ChainState, step: &chain::Step) -> Option<Result<Rework, String>> {
    if !step.escalate {
        return None;
    }
    let again = std::collections::HashSet::from([step.name.clone()]);
    Some(state.reruns(&again).map(|reruns| Rework {
        review: step.name.clone(),
        rerun: step.name.clone(),
        reruns,
        escalate_from: None,
    }))
}

/// What review `step` sends back when it rejects, while it has rounds left.
fn rework(state: &ChainState, step: &chain::Step, config: &Config) -> Option<Rework> {
    let on_reject = step.on_reject.as_ref()?;
    let round = state.steps.get(&step.name).map_or(0, |s| s.round);
    if round >= on_reject.max_rounds {
        return None;
    }
    // The step to redo, the review, and every step between them.
    let mut upstream = std::collections::HashSet::new();
    let mut todo = vec![step.name.clone()];
    while let Some(n) = todo.pop() {
        if upstream.insert(n.clone())
            && let Some(s) = state.spec.step(&n)
        {
            todo.extend(s.after.iter().cloned());
        }
    }
    // Also every other step after the redone one that is queued now (a sibling review, say):
    // it would read work that is being redone, so it runs again after the new round instead.
    let again: std::collections::HashSet<String> = state
        .descendants(&on_reject.rerun)
        .into_iter()
        .filter(|n| {
            upstream.contains(n)
                || state
                    .steps
                    .get(n)
                    .is_some_and(|s| s.status == "queued" && *n != on_reject.rerun)
        })
        .collect();
    let reruns = state.reruns(&again).ok()?;
    let escalate_from = on_reject.escalate.then(|| {
        state
            .steps
            .get(&on_reject.rerun)
            .and_then(|s| s.model.as_deref())
            .and_then(|m| config.tier_of(m))
    });
    Some(Rework {
        review: step.name.clone(),
        rerun: on_reject.rerun.clone(),
        reruns,
        escalate_from,
    })
}

/// Excludes the model (or provider) that wrote each of `steps`.
fn distinct_from<'a>(
    distinct: &Option<Distinct>,
    steps: impl IntoIterator<Item = &'a StepState>,
) -> Constraints {
    let mut c = Constraints::default();
    for s in steps {
        match distinct {
            Some(Distinct::Model) => c.exclude_models.extend(s.model.clone()),
            Some(Distinct::Provider) => c.exclude_providers.extend(s.provider.clone()),
            None => {}
        }
    }
    c
}

/// The majority of the candidates' normalised outputs; a tie fails.
fn consensus(candidates: &[(&str, String)]) -> Prepared {
    let norm = |s: &str| {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    let mut counts: Vec<(String, usize, &str)> = Vec::new();
    for (_, out) in candidates {
        let key = norm(out);
        match counts.iter_mut().find(|(k, _, _)| *k == key) {
            Some(c) => c.1 += 1,
            None => counts.push((key, 1, out)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    match counts.as_slice() {
        [] => Prepared::Fatal("consensus has no output to count".into()),
        [(_, n, _), (_, m, _), ..] if n == m => Prepared::Fatal(format!(
            "no consensus: {} outputs, the most common ones tie with {n} each",
            candidates.len()
        )),
        [(_, _, out), ..] => Prepared::Output((*out).to_owned()),
    }
}

/// What the answer of a step means: its output, a failure, or a review's rejection.
pub(super) fn read(reading: &Reading, answer: Completion) -> Outcome {
    match reading {
        Reading::Plain => Outcome::Answered(answer),
        Reading::Pick(candidates) => {
            let n = answer
                .text
                .split(|c: char| !c.is_ascii_digit())
                .find(|s| !s.is_empty())
                .and_then(|s| s.parse::<usize>().ok())
                .filter(|n| (1..=candidates.len()).contains(n));
            match n {
                Some(n) => Outcome::Answered(Completion {
                    text: candidates[n - 1].clone(),
                    ..answer
                }),
                None => Outcome::Failed(failure(
                    ErrorClass::Retryable,
                    format!(
                        "the judge's answer names no candidate between 1 and {}: {}",
                        candidates.len(),
                        llmq_shared::provider::excerpt(&answer.text, 200)
                    ),
                )),
            }
        }
        Reading::Verdict { reviewed, .. } => {
            let Some(v) = verdict(&answer.text) else {
                return Outcome::Failed(failure(
                    ErrorClass::Retryable,
                    format!(
                        "the review's answer is not a verdict ({{\"verdict\": \"approve\"|\"reject\"}}): {}",
                        llmq_shared::provider::excerpt(&answer.text, 200)
                    ),
                ));
            };
            let findings = v
                .get("findings")
                .and_then(|f| f.as_array())
                .map(|f| {
                    f.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            match v.get("verdict").and_then(|x| x.as_str()) {
                Some("approve") => Outcome::Answered(Completion {
                    text: v.to_string(),
                    ..answer
                }),
                _ => Outcome::Rejected(Rejection(format!(
                    "the review rejected step `{reviewed}`: {findings}"
                ))),
            }
        }
    }
}

/// The first JSON object in `answer` with a `verdict` of approve or reject.
fn verdict(answer: &str) -> Option<serde_json::Value> {
    let start = answer.find('{')?;
    let end = answer.rfind('}')?;
    let v: serde_json::Value = serde_json::from_str(answer.get(start..=end)?).ok()?;
    matches!(
        v.get("verdict").and_then(|x| x.as_str()),
        Some("approve" | "reject")
    )
    .then_some(v)
}

fn failure(class: ErrorClass, message: String) -> AttemptError {
    AttemptError {
        class,
        message,
        tried: Vec::new(),
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str) -> Completion {
        Completion {
            text: text.into(),
            usage: llmq_shared::provider::Usage::default(),
            ..Completion::default()
        }
    }

    fn output(o: Outcome) -> String {
        match o {
            Outcome::Answered(c) => c.text,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_judge_picks_by_number_and_a_review_reads_its_verdict() {
        let pick = Reading::Pick(vec!["A".into(), "B".into()]);
        assert_eq!(output(read(&pick, answer("2. B is better"))), "B");
        assert_eq!(output(read(&pick, answer("Candidate [1]"))), "A");
        assert!(matches!(read(&pick, answer("3")), Outcome::Failed(_)));
        assert!(matches!(read(&pick, answer("neither")), Outcome::Failed(_)));
        let review = Reading::Verdict {
            reviewed: "impl".into(),
            judged: None,
        };
        let ok = output(read(
            &review,
            answer(r#"Sure: {"verdict": "approve", "findings": []}"#),
        ));
        assert!(ok.contains("approve"));
        let rejected = read(
            &review,
            answer(r#"{"verdict":"reject","findings":["no tests","typo"]}"#),
        );
        assert!(
            matches!(&rejected, Outcome::Rejected(r) if r.0 == "the review rejected step `impl`: no tests; typo"),
            "a rejection is a verdict, not a failed call: {rejected:?}"
        );
        assert!(matches!(
            read(&review, answer("looks fine")),
            Outcome::Failed(AttemptError {
                class: ErrorClass::Retryable,
                ..
            })
        ));
    }

    #[test]
    fn escalation_climbs_a_tier_at_a_time_and_a_pinned_model_stays() {
        let mut t = Envelope::new("x");
        assert_eq!(escalate(&mut t, Some(Tier::Fast)), Ok(Tier::Standard));
        assert_eq!(t.min_tier, Some(Tier::Standard));
        assert_eq!(
            escalate(&mut t, None),
            Ok(Tier::Advanced),
            "from the minimum it had"
        );
        assert_eq!(t.min_tier, Some(Tier::Advanced));
        assert_eq!(
            escalate(&mut t, Some(Tier::Standard)),
            Err("it already ran on the highest tier, advanced".into()),
            "no tier above advanced"
        );
        // Whatever tier failed, a rung is above the minimum the failed round had: a round
        // that ran below it (a hint) cannot make the next rung repeat this one.
        let mut again = Envelope::new("x");
        again.min_tier = Some(Tier::Standard);
        assert_eq!(escalate(&mut again, Some(Tier::Fast)), Ok(Tier::Advanced));
        let mut pinned = Envelope::new("x");
        pinned.model = Some("gpt-4o".into());
        assert_eq!(
            escalate(&mut pinned, Some(Tier::Fast)),
            Err("its model is pinned (gpt-4o)".into())
        );
        assert_eq!(pinned.min_tier, None);
    }

    #[test]
    fn consensus_takes_the_majority_and_fails_on_a_tie() {
        let c = [
            ("a", "Yes.".to_owned()),
            ("b", " yes. ".to_owned()),
            ("c", "No".to_owned()),
        ];
        assert!(matches!(consensus(&c), Prepared::Output(o) if o == "Yes."));
        let tie = [("a", "Yes".to_owned()), ("b", "No".to_owned())];
        assert!(matches!(consensus(&tie), Prepared::Fatal(m) if m.contains("tie")));
    }
}

//! Chain steps: what a step needs from its chain before its call (handoffs, candidates, the
//! model it must not be), and what its answer means after (a judge's pick, a review's
//! verdict). Each kind of step is a module of its own, told apart in one place
//! ([`kind::of`]): `llm`, `merge`, `judge`, `consensus`, `review`, `check`, `approval`.
//! Consensus, check and approval steps make no call.

use std::collections::HashMap;

use llmq_shared::chain::{self, Distinct, Reference};
use llmq_shared::chain::{ChainState, Rerun, Seen, StepState, StepStatus};
use llmq_shared::config::Config;
use llmq_shared::envelope::Envelope;
use llmq_shared::envelope::Tier;
use llmq_shared::ids::TaskId;
use llmq_shared::keys::QueueKeys;
use llmq_shared::outcome::ErrorClass;
use llmq_shared::queue::{Client, StepContext};
use llmq_shared::routing::Constraints;

use llmq_shared::provider::Completion;

use super::attempt::{AttemptError, Outcome};
use super::decide::Stop;
use super::{Executor, Task};

mod approval;
pub(super) mod check;
mod consensus;
mod judge;
mod kind;
mod llm;
mod merge;
mod review;

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
    pub judged: Option<TaskId>,
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
                    Some(c) => check::run(&command, c, &input).await,
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
                    step.judged = *judged;
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
        judged: Option<TaskId>,
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

impl Prepared {
    /// A call whose answer reads as `read`, with no rework or escalation.
    fn call(prompt: String, constraints: Constraints, read: Reading) -> Self {
        Self::Call {
            prompt,
            constraints,
            read,
            rework: None,
            escalation: None,
        }
    }
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
        judged: Option<TaskId>,
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
    if let Some(refused) = not_to_run(env, chain_id, name, &states) {
        return Ok(refused);
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
    let kind = kind::of(&step);
    // Parents that succeeded, in `after` order, then the other ancestors the prompt names
    // (the states `step_context` read): with their outputs where needed.
    let wanted = step.inputs();
    let succeeded: Vec<(&str, &StepState)> = wanted
        .iter()
        .filter_map(|p| {
            let s = states.get(p)?;
            (s.status == StepStatus::Succeeded).then_some((p.as_str(), s))
        })
        .collect();
    let needs_outputs = kind.reads_outputs()
        || step.after.len() > 1
        || chain::references(&step.prompt)
            .iter()
            .any(|(_, r)| matches!(r, Reference::Output(_) | Reference::Json(..)));
    let (outputs, jsons) = if needs_outputs {
        outputs(redis, keys, &succeeded).await?
    } else {
        Default::default()
    };
    // Candidates (of a judge, a consensus, a merge, a check) are the parents only.
    let candidates: Vec<(&str, String)> = succeeded
        .iter()
        .filter(|(p, _)| step.after.iter().any(|a| a == p))
        .filter_map(|(p, _)| Some((*p, outputs.get(p)?.clone())))
        .collect();
    let handoffs = Handoffs {
        states: &states,
        succeeded: &succeeded,
        outputs: &outputs,
        jsons: &jsons,
    };
    let cx = kind::Context {
        step: &step,
        env,
        config,
        states: &states,
        outputs: &outputs,
        candidates,
        full: full.as_ref(),
    };
    let folded = states.get(name).map_or(&[][..], |s| &s.folded[..]);
    let size = handoffs
        .size(&step.prompt, added, folded)
        .saturating_add(kind.appended(&cx));
    if size > max_bytes {
        return Ok(Prepared::Fatal(format!(
            "the step's prompt would be {size} bytes with its handoffs and its parents' outputs, over the {max_bytes}-byte limit; reference `.summary` instead of `.output`, or raise --max-payload-bytes"
        )));
    }
    let prompt = match handoffs.fill(&step.prompt) {
        Ok(prompt) => prompt,
        Err(why) => return Ok(Prepared::Fatal(why)),
    };
    let prompt = prompt + added + &folded.concat();
    // A step that escalates runs again one tier up if it fails.
    Ok(match kind.prepare(cx, prompt) {
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

/// Why task `env` must not run step `name`, if it must not: only the task the chain enqueued
/// for the step's current round may run it, and only while the step is queued. A task
/// naming a step is otherwise a forgery (or a stale copy), and it must not finish the step,
/// least of all one that waits for a person.
fn not_to_run(
    env: &Envelope,
    chain_id: &str,
    name: &str,
    states: &HashMap<String, StepState>,
) -> Option<Prepared> {
    let Some(s) = states.get(name) else {
        return Some(Prepared::Cancelled("the chain was cancelled".into()));
    };
    let own = env.id.is_some_and(|id| s.task_id == Some(id));
    // An earlier round's task of a step sent into a new round (a sibling's rejection sent the
    // work it depends on back) is superseded: it ends quietly, and the new round runs.
    if !own
        && let Some(id) = env.id
        && (0..s.round).any(|r| chain::step_task_id(chain_id, name, r) == id)
    {
        return Some(Prepared::Cancelled(format!(
            "superseded: step `{name}` of chain `{chain_id}` runs again as round {}, after the work it depends on was sent back",
            s.round
        )));
    }
    if !own || !matches!(s.status, StepStatus::Queued | StepStatus::Cancelled) {
        return Some(Prepared::Invalid(format!(
            "step `{name}` of chain `{chain_id}` is {} and runs as task {} (round {}); this task is not the one the chain enqueued for it, so it cannot run the step (a failed step runs again with `llmq chain retry`)",
            s.status,
            s.task_id.map_or_else(|| "none".into(), |t| t.to_string()),
            s.round
        )));
    }
    (s.status == StepStatus::Cancelled).then(|| {
        Prepared::Cancelled(
            s.error
                .clone()
                .unwrap_or_else(|| "the chain was cancelled".into()),
        )
    })
}

/// The outputs and JSON answers of the steps that `succeeded`, as their results hold them.
async fn outputs<'a>(
    redis: &Client,
    keys: &QueueKeys,
    succeeded: &[(&'a str, &StepState)],
) -> llmq_shared::queue::Result<(
    HashMap<&'a str, String>,
    HashMap<&'a str, serde_json::Value>,
)> {
    // Every step has a task from its chain's expansion; one without names no record.
    let succeeded: Vec<_> = succeeded
        .iter()
        .filter_map(|(p, s)| Some((*p, s.task_id?)))
        .collect();
    let ids: Vec<TaskId> = succeeded.iter().map(|(_, id)| *id).collect();
    let records = redis.results(keys, &ids).await?;
    let mut outputs = HashMap::new();
    let mut jsons = HashMap::new();
    for ((p, _), r) in succeeded.iter().zip(records) {
        let Some(r) = r else { continue };
        if let Some(json) = r.json {
            jsons.insert(*p, json);
        }
        if let Some(output) = r.output {
            outputs.insert(*p, output);
        }
    }
    Ok((outputs, jsons))
}

/// What a step's prompt references read: the states, outputs and JSON answers of the steps
/// it reads.
struct Handoffs<'a> {
    states: &'a HashMap<String, StepState>,
    succeeded: &'a [(&'a str, &'a StepState)],
    outputs: &'a HashMap<&'a str, String>,
    jsons: &'a HashMap<&'a str, serde_json::Value>,
}

impl Handoffs<'_> {
    /// What reference `r` reads: a step's summary, its output, a value of its JSON.
    fn value(&self, r: &Reference) -> Option<String> {
        match r {
            Reference::Var(_) => None,
            Reference::Summary(p) => self
                .succeeded
                .iter()
                .find(|(n, _)| n == p)
                .and_then(|(_, s)| s.summary.clone()),
            Reference::Output(p) => self.outputs.get(p.as_str()).cloned(),
            Reference::Json(p, path) => chain::json_at(self.jsons.get(p.as_str())?, path),
        }
    }

    /// The bytes of `template` with its handoffs, then `added` and `folded` after it:
    /// counted before they are filled in, so outputs referenced many times cannot make a
    /// prompt of any size.
    fn size(&self, template: &str, added: &str, folded: &[String]) -> usize {
        let start = folded
            .iter()
            .fold(template.len().saturating_add(added.len()), |n, f| {
                n.saturating_add(f.len())
            });
        chain::references(template)
            .iter()
            .fold(start, |n, (range, r)| {
                let len = match r {
                    Reference::Var(_) => return n,
                    Reference::Summary(p) => self
                        .states
                        .get(p)
                        .and_then(|s| s.summary.as_ref())
                        .map_or(0, String::len),
                    Reference::Output(p) => self.outputs.get(p.as_str()).map_or(0, String::len),
                    Reference::Json(..) => self.value(r).map_or(0, |v| v.len()),
                };
                n.saturating_sub(range.len()).saturating_add(len)
            })
    }

    /// `template` with its handoffs filled in; a reference that cannot be resolved fails the
    /// step, which never runs blind.
    fn fill(&self, template: &str) -> Result<String, String> {
        let mut unresolved = None;
        let prompt = chain::fill(template, |r| {
            if matches!(r, Reference::Var(_)) {
                return None;
            }
            let got = self.value(r);
            if got.is_none() && unresolved.is_none() {
                unresolved = Some(r.clone());
            }
            got
        });
        let Some(r) = unresolved else {
            return Ok(prompt);
        };
        let why = match &r {
            Reference::Json(..) => {
                "the step did not succeed, its result expired, or its answer has no JSON there (give it a response_format)"
            }
            _ => "the step did not succeed, or its result expired",
        };
        Err(format!(
            "handoff unresolved: {r} has no value ({why}); the step does not run without its context"
        ))
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
                    .is_some_and(|s| s.status == StepStatus::Queued && *n != on_reject.rerun)
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

/// What the answer of a step means: its output, a failure, or a review's rejection.
pub(super) fn read(reading: &Reading, answer: Completion) -> Outcome {
    match reading {
        Reading::Plain => Outcome::Answered(answer),
        Reading::Pick(candidates) => judge::read(candidates, answer),
        Reading::Verdict { reviewed, .. } => review::read(reviewed, answer),
    }
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
pub(super) mod tests {
    use super::*;

    pub fn answer(text: &str) -> Completion {
        Completion {
            text: text.into(),
            usage: llmq_shared::provider::Usage::default(),
            ..Completion::default()
        }
    }

    pub fn output(o: Outcome) -> String {
        match o {
            Outcome::Answered(c) => c.text,
            other => panic!("{other:?}"),
        }
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
}

//! The answer cache, as a task meets it: looked up before routing (a hit is the task's answer,
//! billed $0 and recorded as a `cached` call), the request's flight taken on a miss (so
//! identical tasks wait for this one's call instead of making their own), and the answer kept
//! after the call. The rules are `llmq_shared::answer_cache`; the Redis side is
//! `llmq_shared::queue::answers`.

use std::sync::Arc;

use chrono::Utc;
use llmq_shared::answer_cache::warm_prefix;
use llmq_shared::answer_cache::{self, CachedAnswer, Use};
use llmq_shared::envelope::Envelope;
use llmq_shared::ids::{EntryId, TaskId};
use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::{CallOutcome, CallRow};
use llmq_shared::outcome::ErrorClass;
use llmq_shared::provider::Completion;
use llmq_shared::queue::flight_key;
use llmq_shared::queue::{Answer, Keep, NOT_KEPT, answer_name, warm_name};
use llmq_shared::routing::Plan;
use uuid::Uuid;

use super::attempt::{AttemptError, Outcome, Tried};
use super::chain::StepPlan;
use super::decide::Stop;
use super::{Executor, NO_CONSTRAINTS, Task, Trail};

/// What a lookup came to.
pub(super) enum Looked {
    Hit(Box<CachedAnswer>),
    /// Call the model holding the request's flight: identical tasks wait for this call.
    Lead,
    /// Call the model on its own: no flight was asked for, or the request's answers are not
    /// kept (too large), or what is kept is not an answer this build reads.
    Call,
}

fn count(queue: &QueueKeys, result: &'static str) {
    metrics::counter!("llmq_answer_cache_total", "queue" => queue.name().to_owned(), "result" => result)
        .increment(1);
}

impl Executor {
    /// Looks request `hash` up for the delivery `entry_id` of `env`; with `flight`, takes
    /// the request's flight on a miss or parks behind it (the task stops parked: nothing to
    /// write). Redis failed, or the entry is no longer ours: the task is handed back.
    pub(super) async fn look_up(
        &self,
        queue: &QueueKeys,
        entry_id: EntryId,
        hash: &str,
        flight: bool,
        env: &Envelope,
    ) -> Result<Looked, Stop> {
        let name = answer_name(hash);
        match self.take(queue, entry_id, &name, flight, env, None).await {
            Ok(Answer::Hit(json)) if json == NOT_KEPT => {
                count(queue, "miss");
                Ok(Looked::Call)
            }
            Ok(Answer::Hit(json)) => match serde_json::from_str::<CachedAnswer>(&json) {
                Ok(answer) => {
                    count(queue, "hit");
                    Ok(Looked::Hit(Box::new(answer)))
                }
                // Not an answer this build reads: call the model on its own, and keep its
                // answer over this one.
                Err(e) => {
                    tracing::warn!(
                        queue = queue.name(),
                        "an answer in the cache is not one llmq keeps; calling the model: {e}"
                    );
                    Ok(Looked::Call)
                }
            },
            Ok(Answer::Miss) => {
                count(queue, "miss");
                Ok(if flight { Looked::Lead } else { Looked::Call })
            }
            Ok(Answer::Parked) => {
                count(queue, "waited");
                Err(Stop::Parked)
            }
            Ok(Answer::Busy | Answer::Lost) => Err(Stop::HandedBack),
            Err(e) => {
                tracing::warn!(
                    queue = queue.name(),
                    "cannot look the task up in the answer cache; handing it back: {e}"
                );
                Err(Stop::HandedBack)
            }
        }
    }
}

impl Executor {
    /// Looks `name` up, taking its flight on a miss when `flight` (or parking behind it).
    async fn take(
        &self,
        queue: &QueueKeys,
        entry_id: EntryId,
        name: &str,
        flight: bool,
        env: &Envelope,
        refresh_ms: Option<u64>,
    ) -> llmq_shared::queue::Result<Answer> {
        let take = |envelope: Option<String>| async move {
            self.redis
                .take_answer(
                    queue,
                    &self.worker_id,
                    entry_id,
                    name,
                    flight,
                    envelope.as_deref(),
                    refresh_ms,
                )
                .await
        };
        let taken = take(None).await;
        if let Ok(Answer::Busy) = taken {
            // The envelope goes to Redis only when the task is to be parked.
            return take(Some(env.to_json())).await;
        }
        taken
    }

    /// The stable prompt prefix of `env`'s call to the plan's first choice, when that
    /// provider caches it: its hash.
    pub(super) fn warm_prefix(&self, env: &Envelope, plan: &Plan<'_>) -> Option<String> {
        // Most tasks have no prefix: no request is built for them.
        if env.system.is_none() && env.tools.is_empty() && env.messages.is_empty() {
            return None;
        }
        let first = plan.candidates.first()?;
        if !first.provider.prompt_cache || env.prompt_cache == Some(false) {
            return None;
        }
        llmq_shared::provider::min_cached_tokens(first.provider.kind, &first.model.id)?;
        let req = llmq_shared::provider::Request::of(env, &first.model.id, first.provider);
        warm_prefix(&req, first.provider.kind)
    }

    /// Which model holds prefix `hash` warm; on a miss with `flight`, this task warms it
    /// (the others sharing it park until it has: the task stops parked).
    pub(super) async fn warm_up(
        &self,
        queue: &QueueKeys,
        entry_id: EntryId,
        hash: &str,
        flight: bool,
        env: &Envelope,
    ) -> Result<Warm, Stop> {
        // A warm cache's readers keep it warm, as each read keeps the provider's.
        let refresh = u64::try_from(WARM_FOR.as_millis()).ok();
        let name = warm_name(hash);
        match self
            .take(queue, entry_id, &name, flight, env, refresh)
            .await
        {
            Ok(Answer::Hit(model)) => Ok(Warm::On(model)),
            Ok(Answer::Miss) => Ok(Warm::Cold),
            Ok(Answer::Parked) => Err(Stop::Parked),
            Ok(Answer::Busy | Answer::Lost) => Err(Stop::HandedBack),
            Err(e) => {
                tracing::warn!(
                    queue = queue.name(),
                    "cannot look up whose prompt cache is warm; handing the task back: {e}"
                );
                Err(Stop::HandedBack)
            }
        }
    }
}

/// Whose prompt cache holds a task's prefix.
pub(super) enum Warm {
    /// `provider/model`'s: call it.
    On(String),
    /// Nobody's: this task's call warms it (holding the prefix's flight, when asked).
    Cold,
}

/// How long a model's prompt cache is taken as warm after the last call that read or wrote
/// it: a little under the five minutes Anthropic's cache (and OpenAI's, when idle) keeps a
/// prefix after its last use.
pub const WARM_FOR: std::time::Duration = std::time::Duration::from_secs(240);

/// Moves the candidate `provider/model` (a warm cache) to the front of `plan`, when it is in
/// it: routing does not scatter calls sharing a warm prefix for a cent.
pub(super) fn pin(plan: &mut Plan<'_>, warm: &str) {
    let at = plan
        .candidates
        .iter()
        .position(|c| warm.split_once('/') == Some((&*c.provider.name, &*c.model.id)));
    if let Some(i) = at {
        plan.candidates[..=i].rotate_right(1);
    }
}

/// What to keep once `hash`'s warming call answered on `provider/model`.
pub(super) fn warmed(hash: &str, (provider, model): &(String, String)) -> Box<Keep> {
    Box::new(Keep {
        name: warm_name(hash),
        ttl_ms: u64::try_from(WARM_FOR.as_millis()).unwrap_or(u64::MAX),
        answer: format!("{provider}/{model}"),
        counted: false,
    })
}

/// The attempt of a task answered by `answer`, and its call's ledger row: no tokens, $0, and
/// what the call it reuses cost at list prices (what the hit saved).
pub(super) fn hit(
    answer: &CachedAnswer,
    queue: &QueueKeys,
    (task_id, env): (TaskId, &Envelope),
    task_type: &'static str,
    worker: &Arc<str>,
) -> (Tried, CallRow) {
    let row = CallRow {
        task_id: task_id.uuid(),
        delivery: Uuid::new_v4(),
        run: i32::try_from(env.replays).unwrap_or(i32::MAX),
        attempt: i32::try_from(env.attempts + 1).unwrap_or(i32::MAX),
        call_no: 1,
        queue: queue.shared_name(),
        chain_id: env.chain_id.as_deref().map(Into::into),
        task_type: task_type.into(),
        provider: answer.provider.as_str().into(),
        model: answer.model.as_str().into(),
        outcome: CallOutcome::Cached,
        worker: Arc::clone(worker),
        called_at: Utc::now(),
        list_cost_usd: Some(answer.list_cost_usd),
        tenant: env.tenant.as_deref().map(Into::into),
        tags: env.tags_json(),
        // No tokens, $0.
        ..CallRow::default()
    };
    let tried = Tried {
        outcome: Outcome::Answered(Completion {
            text: answer.text.clone(),
            tool_calls: answer.tool_calls.clone(),
            json: answer.json.clone(),
            ..Completion::default()
        }),
        route: format!("answered from the answer cache (task {})", answer.task_id),
        errors: Vec::new(),
        last: Some((answer.provider.clone(), answer.model.clone())),
    };
    (tried, row)
}

/// The answer of `completion` to keep for `hash`; [`NOT_KEPT`] in its place when it is
/// larger than `max_bytes` (the payload limit).
pub(super) fn keep(
    (hash, ttl): (String, std::time::Duration),
    completion: &Completion,
    task_id: TaskId,
    (provider, model): &(String, String),
    calls: &[CallRow],
    max_bytes: usize,
) -> Option<Box<Keep>> {
    let answer = CachedAnswer {
        task_id,
        provider: provider.clone(),
        model: model.clone(),
        text: completion.text.clone(),
        json: completion.json.clone(),
        tool_calls: completion.tool_calls.clone(),
        list_cost_usd: calls
            .iter()
            .map(|c| c.list_cost_usd.unwrap_or(c.cost_usd))
            .fold(0.0, |a, b| a + b),
    };
    let mut answer = serde_json::to_string(&answer).ok()?;
    if answer.len() > max_bytes {
        // Kept as too large, so identical tasks call on their own instead of one at a time.
        NOT_KEPT.clone_into(&mut answer);
    }
    Some(Box::new(Keep {
        name: answer_name(&hash),
        ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        answer,
        counted: true,
    }))
}

impl Executor {
    /// The cache phase: an answer the cache holds for the task's request is its outcome
    /// (recorded as a `cached` call); on a miss, what to keep its answer as, and the
    /// request's flight when it takes one. A refused cache setting fails the task.
    pub(super) async fn cached(
        &self,
        task: &Task<'_>,
        call_env: &Envelope,
        step: Option<&StepPlan>,
        slot: &mut Option<String>,
        trail: &mut Trail,
    ) -> Result<Option<Tried>, Stop> {
        let ttl = match answer_cache::use_of(&self.config.answer_cache, task.queue.name(), call_env)
        {
            Use::Off => return Ok(None),
            Use::Refused { field, message } => {
                return Ok(Some(Tried::without_call(Outcome::Failed(AttemptError {
                    class: ErrorClass::Invalid,
                    message: format!("field `{field}` is wrong: {message}"),
                    tried: Vec::new(),
                    retry_after: None,
                }))));
            }
            // A chain step kept off some models or providers (a review distinct from the
            // work it reviews) is not answered with what any model said.
            Use::On { .. } if step.is_some_and(|s| s.constraints != NO_CONSTRAINTS) => {
                return Ok(None);
            }
            Use::On { ttl } => ttl,
        };
        let share = self.config.answer_cache.share_across_tenants;
        let Some(hash) = answer_cache::request_hash(call_env, share) else {
            return Ok(None);
        };
        // One call for concurrent identical requests, unless the task holds a concurrency
        // key's slot already or may wait for a provider batch.
        let flight = slot.is_none() && task.env.deadline.is_none();
        let look = self.look_up(task.queue, task.entry_id, &hash, flight, task.env);
        match Box::pin(look).await? {
            Looked::Hit(answer) => {
                let (tried, row) = hit(
                    &answer,
                    task.queue,
                    (task.task_id, task.env),
                    task.task_type,
                    &self.worker_id,
                );
                trail.calls.push(row);
                trail.more().cached_from = Some(answer.task_id);
                return Ok(Some(tried));
            }
            Looked::Lead => *slot = Some(flight_key(&answer_name(&hash))),
            Looked::Call => {}
        }
        trail.more().to_keep = Some((hash, ttl));
        Ok(None)
    }

    /// The warm-up phase: a prompt prefix a provider caches sends its calls to the model
    /// whose cache holds it warm; while nobody's does, one call warms it before the rest are
    /// sent (they park).
    pub(super) async fn warm(
        &self,
        task: &Task<'_>,
        call_env: &Envelope,
        plan: &mut Plan<'_>,
        slot: &mut Option<String>,
        trail: &mut Trail,
    ) -> Result<(), Stop> {
        let Some(hash) = self.warm_prefix(call_env, plan) else {
            return Ok(());
        };
        let flight = slot.is_none();
        let warm = self.warm_up(task.queue, task.entry_id, &hash, flight, task.env);
        match Box::pin(warm).await? {
            Warm::On(model) => pin(plan, &model),
            Warm::Cold if flight => {
                *slot = Some(flight_key(&warm_name(&hash)));
                trail.more().warming = Some(hash);
            }
            Warm::Cold => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row shares its queue's and worker's names and takes its type as a constant: none of
    /// the three is copied for a call or a task.
    #[test]
    fn a_row_shares_its_names_instead_of_copying_them() {
        let queue = QueueKeys::new("q");
        let worker: Arc<str> = "w-1".into();
        let answer = CachedAnswer {
            task_id: TaskId::random(),
            provider: "p".into(),
            model: "m".into(),
            text: "an answer".into(),
            json: None,
            tool_calls: Vec::new(),
            list_cost_usd: 0.01,
        };
        let env = Envelope::new("a prompt".to_owned());
        let (_, row) = hit(
            &answer,
            &queue,
            (TaskId::random(), &env),
            "research",
            &worker,
        );
        assert!(Arc::ptr_eq(&row.queue, &queue.shared_name()));
        assert!(Arc::ptr_eq(&row.worker, &worker));
        assert!(matches!(
            row.task_type,
            std::borrow::Cow::Borrowed("research")
        ));
    }

    #[test]
    fn an_answer_over_the_payload_limit_is_kept_as_not_kept() {
        let completion = Completion {
            text: "a long answer".repeat(10),
            ..Completion::default()
        };
        let last = ("p".to_owned(), "m".to_owned());
        let ttl = std::time::Duration::from_secs(60);
        let kept = |max| {
            keep(
                ("h".into(), ttl),
                &completion,
                TaskId::random(),
                &last,
                &[],
                max,
            )
            .unwrap()
        };
        let whole = kept(1 << 20);
        let answer: CachedAnswer = serde_json::from_str(&whole.answer).unwrap();
        assert_eq!(answer.text, completion.text);
        assert_eq!((whole.name.as_str(), whole.ttl_ms), ("answer:h", 60_000));
        let over = kept(50);
        assert_eq!(
            over.answer, NOT_KEPT,
            "identical tasks then call on their own"
        );
        assert!(over.counted);
    }
}

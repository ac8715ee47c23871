//! Tasks that can wait (`deadline`): sent to wait for a provider batch, and finished with
//! the batch's answer when they come back (the scheduler sends the batches, see
//! `llmq_shared::queue::batch`).
//!
//! A task goes to a batch when a scheduler sends this queue's batches, its deadline leaves
//! time for a batch and a normal call after it ([`MIN_LEAD`]), and its plan has a provider
//! with a batch API whose batch price is no more than what the plan's first choice costs
//! now. Otherwise, and whenever it comes back without an answer (the batch failed, expired,
//! or its deadline came near), it is called as any task.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use llmq_shared::envelope::Envelope;
use llmq_shared::ids::{EntryId, TaskId};
use llmq_shared::keys::QueueKeys;
use llmq_shared::outcome::ErrorClass;
use llmq_shared::provider::{self, Completion, Request};
use llmq_shared::queue::{BatchAnswer, BatchPark, BatchState};
use llmq_shared::routing::{Candidate, Plan};

use super::attempt::{AttemptError, Outcome, Tried, conform};
use super::decide::Stop;
use super::{Executor, Task, Trail};

/// How long a worker trusts, once it saw a scheduler's batcher key, that the scheduler
/// sends the queue's batches: a task parked after the key went is sent back by the park
/// (`finish.lua`) and called on its next delivery.
const BATCHER_TRUSTED: Duration = Duration::from_secs(1);

/// The queues whose batcher key this worker saw, and when. A task that can wait asks Redis
/// whether a scheduler sends its queue's batches (in the round trip that reads its batch
/// state) unless the key was seen within `BATCHER_TRUSTED`; with none, it is called in the
/// same delivery instead of parked and put back. Absence is not remembered: a scheduler that
/// starts is used from the next task on.
#[derive(Debug, Default)]
pub struct Batchers(Mutex<HashMap<String, Instant>>);

impl Batchers {
    /// Whether queue `queue`'s batcher was seen within `BATCHER_TRUSTED`.
    pub(super) fn trusted(&self, queue: &str) -> bool {
        let seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        seen.get(queue)
            .is_some_and(|at| at.elapsed() < BATCHER_TRUSTED)
    }

    pub(super) fn saw(&self, queue: &str) {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        seen.insert(queue.to_owned(), Instant::now());
    }
}

/// Where a task that can wait stands in the batch path, read from its batch hash (its latch).
pub(super) enum Latch {
    /// Back from a batch with the answer asked for this delivery.
    Answered(Box<BatchAnswer>),
    /// Never in a batch, or a copy of one waiting in a batch already (parked again, the park
    /// only acks it): it may go to one.
    Park,
    /// Call it now: back from a batch without an answer for this delivery, or no scheduler
    /// sends this queue's batches.
    Call,
    /// Taken out of its batch by a cancel, with why.
    Cancelled(String),
}

impl Executor {
    /// Task `task_id`'s [`Latch`]; whether a scheduler sends the queue's batches is asked in
    /// the same round trip unless it was seen lately ([`Batchers`]).
    ///
    /// # Errors
    /// Redis fails: the task may have an answer already, so it is handed back, not called.
    pub(super) async fn latch(
        &self,
        queue: &QueueKeys,
        task_id: TaskId,
        env: &Envelope,
    ) -> Result<Latch, Stop> {
        let ask = !self.batchers.trusted(queue.name());
        let read = self.redis.batch_state(queue, task_id, ask);
        let (state, batcher) = read.await.map_err(|e| {
            tracing::warn!(task = %task_id, "cannot read the task's batch state; handing it back: {e}");
            Stop::HandedBack
        })?;
        if batcher == Some(true) {
            self.batchers.saw(queue.name());
        }
        Ok(match state {
            BatchState::None if batcher == Some(false) => Latch::Call,
            BatchState::None | BatchState::Pending => Latch::Park,
            BatchState::Answered { answer, generation } if generation == self::generation(env) => {
                Latch::Answered(answer)
            }
            BatchState::Answered { .. } | BatchState::Call => Latch::Call,
            BatchState::Cancelled(why) => Latch::Cancelled(why),
        })
    }
}

/// The least time a task's deadline must leave to go to a batch: a gather (at most an hour)
/// and, should the batch not be over by then, a normal call (an hour before the deadline).
pub const MIN_LEAD: Duration = Duration::from_secs(2 * 3600);

/// When a task's deadline is (ms): `deadline` after it was enqueued (`enqueued_at`, else
/// its stream entry's time).
pub(super) fn deadline_ms(env: &Envelope, entry_id: EntryId) -> Option<i64> {
    let d = env.deadline()?;
    let since = env.enqueued_at.map_or_else(
        || i64::try_from(entry_id.ms()).ok(),
        |t| Some(t.timestamp_millis()),
    )?;
    Some(since + i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2))
}

/// The delivery's generation: an answer applies only to the delivery it was asked for, not
/// to a later attempt or a replay.
pub(super) fn generation(env: &Envelope) -> String {
    format!("{}:{}", env.replays, env.attempts)
}

/// The candidate whose batch API a task goes to: the first in the plan with one, when its
/// batch price is no more than the plan's first choice at list price.
fn batch_candidate<'p>(plan: &'p Plan<'p>, env: &Envelope) -> Option<&'p Candidate<'p>> {
    let first = plan.candidates.first()?;
    let candidates = if env.fallback == Some(false) {
        &plan.candidates[..1]
    } else {
        &plan.candidates[..]
    };
    candidates.iter().find(|c| {
        let p = &c.model.prices;
        let list = p.input + p.output;
        let ratio = if list > 0.0 {
            (p.batch_input + p.batch_output) / list
        } else {
            0.0
        };
        c.provider.batch.is_some() && c.estimated_usd * ratio <= first.estimated_usd
    })
}

/// Where a task that may go to a batch would go: its plan's batch candidate, and its
/// deadline (ms).
pub(super) struct Parkable<'p> {
    cand: &'p Candidate<'p>,
    deadline_ms: i64,
}

/// Whether `env`'s task (of stream entry `entry_id`) may go to a batch: its deadline leaves
/// [`MIN_LEAD`], it holds no concurrency key, and its plan has a batch candidate. Cheap: the
/// task's latch is read, and its request rendered ([`parking`]), only when it may.
pub(super) fn parkable<'p>(
    env: &Envelope,
    entry_id: EntryId,
    plan: &'p Plan<'p>,
) -> Option<Parkable<'p>> {
    let deadline_ms = deadline_ms(env, entry_id)?;
    let lead = i64::try_from(MIN_LEAD.as_millis()).unwrap_or(i64::MAX);
    if deadline_ms - llmq_shared::queue::now_ms() < lead || env.concurrency_key.is_some() {
        return None;
    }
    let cand = batch_candidate(plan, env)?;
    Some(Parkable { cand, deadline_ms })
}

/// What a [`parkable`] task is parked with to wait for a batch: the finisher parks it with
/// the delivery's other outcomes ([`Write::Park`](llmq_shared::queue::Write::Park)).
/// `None` (its request has no batch form): call the model now.
pub(super) fn parking(env: &Envelope, call_env: &Envelope, to: &Parkable<'_>) -> Option<BatchPark> {
    let cand = to.cand;
    // A batch's answers carry no cache writes (BatchAnswer): ask for no caching, so that
    // none is billed unseen.
    let req = Request {
        prompt_cache: false,
        ..Request::of(call_env, &cand.model.id, cand.provider)
    };
    let body = provider::batch::item_body(cand.provider, &req)?;
    Some(BatchPark {
        group: format!("{}/{}", cand.provider.name, cand.model.id),
        envelope: env.to_json(),
        body: body.to_string(),
        deadline_ms: to.deadline_ms,
        generation: generation(env),
    })
}

/// A batch's answer as the attempt's outcome: read as the task asked (its JSON checked), with
/// the route that says where it came from.
pub(super) fn answered(answer: &BatchAnswer, env: &Envelope) -> Tried {
    let completion = Completion {
        text: answer.text.clone(),
        usage: answer.usage(),
        tool_calls: answer.tool_calls.clone(),
        json: None,
        truncated: false,
    };
    let req = Request {
        model: &answer.model,
        response_format: env.response_format.as_deref(),
        ..Request::default()
    };
    let outcome = match conform(completion, &req, &answer.provider) {
        Ok(c) => Outcome::Answered(c),
        Err(e) => Outcome::Failed(AttemptError {
            class: ErrorClass::Retryable,
            message: format!("{e} (a batch answer; the next attempt calls the model)"),
            tried: vec![answer.provider.clone()],
            retry_after: None,
        }),
    };
    Tried {
        outcome,
        route: format!(
            "answered through {}/{}'s batch API at the batch price (batch {})",
            answer.provider, answer.model, answer.batch
        ),
        errors: Vec::new(),
        last: Some((answer.provider.clone(), answer.model.clone())),
    }
}

impl Executor {
    /// The park phase of a task that can wait: its request goes to a provider batch when
    /// its plan has a batch candidate and its latch says it may (read now unless `may_batch`
    /// already says); a batch's answer for this delivery is its outcome.
    pub(super) async fn park(
        &self,
        task: &Task<'_>,
        call_env: &Envelope,
        plan: &Plan<'_>,
        may_batch: Option<bool>,
        trail: &mut Trail,
    ) -> Result<Option<Tried>, Stop> {
        let Some(to) = parkable(task.env, task.entry_id, plan) else {
            return Ok(None);
        };
        let latch = match may_batch {
            Some(_) => Latch::Park,
            None => Box::pin(self.latch(task.queue, task.task_id, task.env)).await?,
        };
        match latch {
            // (A request with no batch form is called now.)
            Latch::Park => match parking(task.env, call_env, &to) {
                Some(park) => Err(Stop::Batched(Box::new(park))),
                None => Ok(None),
            },
            // Only an entry put in the stream by hand carries its answer unmarked.
            Latch::Answered(answer) => Ok(Some(trail.batch_answered(&answer, task))),
            Latch::Call => Ok(None),
            Latch::Cancelled(why) => Err(Stop::Cancelled(why)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_counts_from_enqueueing_or_the_entry() {
        let mut env = Envelope::new("x");
        env.deadline = Some("24h".into());
        assert_eq!(
            deadline_ms(&env, EntryId::new(1000, 0)),
            Some(1000 + 86_400_000)
        );
        env.enqueued_at = chrono::DateTime::from_timestamp_millis(5000);
        assert_eq!(
            deadline_ms(&env, EntryId::new(1000, 0)),
            Some(5000 + 86_400_000)
        );
        env.deadline = None;
        assert_eq!(deadline_ms(&env, EntryId::new(1000, 0)), None);
    }
}

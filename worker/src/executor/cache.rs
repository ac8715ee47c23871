//! The answer cache, as a task meets it: looked up before routing (a hit is the task's answer,
//! billed $0 and recorded as a `cached` call), the request's flight taken on a miss (so
//! identical tasks wait for this one's call instead of making their own), and the answer kept
//! after the call. The rules are `llmq_shared::answer_cache`; the Redis side is
//! `llmq_shared::queue::answers`.

use chrono::Utc;
use llmq_shared::answer_cache::CachedAnswer;
use llmq_shared::envelope::Envelope;
use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::CallRow;
use llmq_shared::provider::Completion;
use llmq_shared::queue::{Answer, Keep};
use uuid::Uuid;

use super::Executor;
use super::attempt::{Outcome, Tried};

/// What a lookup came to.
pub(super) enum Looked {
    Hit(Box<CachedAnswer>),
    /// Call the model (holding the request's flight, when one was asked for).
    Miss,
    /// Parked behind another task's call for the same request: nothing to write.
    Parked,
    /// Redis failed, or the entry is no longer ours: hand the delivery back.
    Release,
}

/// The `outcome` of a call's ledger row for an answer the cache gave.
pub const CACHED: &str = "cached";

impl Executor {
    /// Looks `hash` up for the delivery `entry_id` of `env`; with `flight`, takes the
    /// request's flight on a miss or parks behind it.
    pub(super) async fn look_up(
        &self,
        queue: &QueueKeys,
        entry_id: &str,
        hash: &str,
        flight: bool,
        env: &Envelope,
    ) -> Looked {
        let take = |envelope: Option<String>| async move {
            self.redis
                .take_answer(
                    queue,
                    &self.worker_id,
                    entry_id,
                    hash,
                    flight,
                    envelope.as_deref(),
                )
                .await
        };
        let mut taken = take(None).await;
        if let Ok(Answer::Busy) = taken {
            // The envelope goes to Redis only when the task is to be parked.
            taken = take(Some(env.to_json())).await;
        }
        match taken {
            Ok(Answer::Hit(json)) => match serde_json::from_str::<CachedAnswer>(&json) {
                Ok(answer) => {
                    metrics::counter!("llmq_answer_cache_total", "queue" => queue.name().to_owned(), "result" => "hit").increment(1);
                    Looked::Hit(Box::new(answer))
                }
                // Not an answer this worker wrote: call the model, without a flight, and
                // keep its answer over this one.
                Err(e) => {
                    tracing::warn!(
                        queue = queue.name(),
                        "an answer in the cache is not one llmq keeps; calling the model: {e}"
                    );
                    Looked::Miss
                }
            },
            Ok(Answer::Miss) => {
                metrics::counter!("llmq_answer_cache_total", "queue" => queue.name().to_owned(), "result" => "miss").increment(1);
                Looked::Miss
            }
            Ok(Answer::Parked) => {
                metrics::counter!("llmq_answer_cache_total", "queue" => queue.name().to_owned(), "result" => "waited").increment(1);
                Looked::Parked
            }
            Ok(Answer::Busy | Answer::Lost) => Looked::Release,
            Err(e) => {
                tracing::warn!(
                    queue = queue.name(),
                    "cannot look the task up in the answer cache; handing it back: {e}"
                );
                Looked::Release
            }
        }
    }
}

/// The attempt of a task answered by `answer`, and its call's ledger row: no tokens, $0, and
/// what the call it reuses cost at list prices (what the hit saved).
pub(super) fn hit(
    answer: &CachedAnswer,
    queue: &QueueKeys,
    env: &Envelope,
    task_type: &str,
    worker: &str,
) -> (Tried, CallRow) {
    let row = CallRow {
        task_id: env.id.unwrap_or_default(),
        delivery: Uuid::new_v4(),
        run: i32::try_from(env.replays).unwrap_or(i32::MAX),
        attempt: i32::try_from(env.attempts + 1).unwrap_or(i32::MAX),
        call_no: 1,
        queue: queue.name().to_owned(),
        chain_id: env.chain_id.clone(),
        task_type: task_type.to_owned(),
        provider: answer.provider.clone(),
        model: answer.model.clone(),
        input_tokens: 0,
        output_tokens: 0,
        cached_tokens: 0,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        cost_usd: 0.0,
        latency_ms: 0,
        outcome: CACHED.into(),
        error_class: None,
        error: None,
        worker: worker.to_owned(),
        called_at: Utc::now(),
        list_cost_usd: Some(answer.list_cost_usd),
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

/// The answer of `completion` to keep for `hash`, or `None` when it is larger than
/// `max_bytes` (the payload limit).
pub(super) fn keep(
    (hash, ttl): (String, std::time::Duration),
    completion: &Completion,
    task_id: &str,
    (provider, model): &(String, String),
    calls: &[CallRow],
    max_bytes: usize,
) -> Option<Box<Keep>> {
    let answer = CachedAnswer {
        task_id: task_id.to_owned(),
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
    let answer = serde_json::to_string(&answer).ok()?;
    (answer.len() <= max_bytes).then(|| {
        Box::new(Keep {
            hash,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            answer,
        })
    })
}

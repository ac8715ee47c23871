//! Runs one task: validate, route, call the provider, and decide what happens next.
//!
//! Nothing here touches Redis or Postgres: the result is a [`Finished`] that the finisher
//! writes (ledger first, then one Lua call for a whole batch).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use llmq_shared::envelope::{self, Envelope};
use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::{CallRow, TaskRow};
use llmq_shared::outcome::{ErrorClass, Status, TaskRecord};
use llmq_shared::provider::Request;
use llmq_shared::queue::{Delivery, Finish, FinishKind, now_ms};
use tokio_util::sync::CancellationToken;

use crate::router::Router;

/// Rate-limit waits a task may take without using up attempts; past this they count.
pub const MAX_SNOOZES: u32 = 20;

/// What the executor needs to know, shared by every task.
pub struct Executor {
    pub router: Router,
    pub worker_id: String,
    pub max_payload_bytes: usize,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Cancelled when the shutdown grace period is over: running calls stop and their tasks
    /// go back to the stream.
    pub hard_stop: CancellationToken,
}

/// The outcome of one delivery, ready for the finisher.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub queue: Arc<QueueKeys>,
    pub finish: Finish,
    pub calls: Vec<CallRow>,
    pub task: Option<TaskRow>,
}

impl Executor {
    /// Runs `delivery` to an outcome. Never fails: every problem becomes an outcome.
    pub async fn run(&self, queue: Arc<QueueKeys>, delivery: Delivery) -> Finished {
        let entry_id = delivery.entry_id;
        let Some(payload) = delivery.payload else {
            let task_id = envelope::derive_id(queue.name(), &entry_id).to_string();
            let error = format!(
                "the stream entry has no `task` field; enqueue with XADD {} * task '<json>'",
                queue.stream()
            );
            return invalid(queue, entry_id, task_id, String::new(), error);
        };
        let mut env = match Envelope::parse(&payload, self.max_payload_bytes) {
            Ok(env) => env,
            Err(e) => {
                let task_id = envelope::task_id_of(queue.name(), &entry_id, &payload).to_string();
                let raw = String::from_utf8_lossy(&payload).into_owned();
                return invalid(queue, entry_id, task_id, raw, e.to_string());
            }
        };
        let task_id = env.id_or_derive(queue.name(), &entry_id);
        env.id = Some(task_id);

        if let Some(run_at) = env.run_at {
            let due = run_at.timestamp_millis();
            if due > now_ms() + 5 {
                // Enqueued straight into the stream with a future run_at: wait in delayed.
                let finish = Finish {
                    entry_id,
                    task_id: task_id.to_string(),
                    kind: FinishKind::Retry { due_ms: due },
                    record: None,
                    envelope: env.to_json(),
                };
                return Finished {
                    queue,
                    finish,
                    calls: Vec::new(),
                    task: None,
                };
            }
        }

        let attempt = env.attempts + 1;
        let task_type = env.task_type().map(|t| t.to_string()).unwrap_or_default();
        let mut record = TaskRecord::pending(&task_id.to_string(), queue.name(), Status::Running);
        record.attempts = attempt;
        record.task_type = Some(task_type.clone());
        record.chain_id.clone_from(&env.chain_id);

        let route = match self.router.route(&env) {
            Ok(route) => route,
            Err(e) => {
                return self.fail(
                    queue,
                    entry_id,
                    env,
                    record,
                    Vec::new(),
                    ErrorClass::Fatal,
                    e.to_string(),
                    None,
                );
            }
        };
        record.provider = Some(route.provider.name().to_owned());
        record.model = Some(route.model.id.clone());
        tracing::debug!(task = %task_id, provider = route.provider.name(), model = %route.model.id, reason = route.reason, "routed");

        let request = Request {
            model: route.model.id.clone(),
            system: env.system.clone(),
            prompt: env.prompt.clone(),
            max_tokens: env.max_tokens,
            temperature: env.temperature,
            timeout: env.timeout(),
        };
        let started = Instant::now();
        let called_at = Utc::now();
        let result = tokio::select! {
            r = route.provider.complete(&request) => r,
            () = self.hard_stop.cancelled() => {
                let finish = Finish {
                    entry_id,
                    task_id: task_id.to_string(),
                    kind: FinishKind::Release,
                    record: None,
                    envelope: env.to_json(),
                };
                return Finished { queue, finish, calls: Vec::new(), task: None };
            }
        };
        let latency = started.elapsed();
        record.duration_ms = latency.as_millis() as u64;

        let mut call = CallRow {
            task_id,
            run: env.replays as i32,
            attempt: attempt as i32,
            call_no: env.snoozes as i32 + 1,
            queue: queue.name().to_owned(),
            chain_id: env.chain_id.clone(),
            task_type,
            provider: route.provider.name().to_owned(),
            model: route.model.id.clone(),
            input_tokens: 0,
            output_tokens: 0,
            cached_tokens: 0,
            reasoning_tokens: 0,
            cost_usd: 0.0,
            latency_ms: i32::try_from(latency.as_millis()).unwrap_or(i32::MAX),
            outcome: "ok".into(),
            error_class: None,
            error: None,
            worker: self.worker_id.clone(),
            called_at,
        };
        match result {
            Ok(completion) => {
                let usage = completion.usage;
                let cost = route.model.prices.cost(&usage);
                call.input_tokens = usage.input_tokens as i64;
                call.output_tokens = usage.output_tokens as i64;
                call.cached_tokens = usage.cached_tokens as i64;
                call.reasoning_tokens = usage.reasoning_tokens as i64;
                call.cost_usd = cost;
                record.status = Status::Succeeded;
                record.output = Some(completion.text);
                record.input_tokens = usage.input_tokens;
                record.output_tokens = usage.output_tokens;
                record.cached_tokens = usage.cached_tokens;
                record.reasoning_tokens = usage.reasoning_tokens;
                record.cost_usd = cost;
                record.finished_at = Some(Utc::now());
                let task = Some(task_row(&record));
                let finish = Finish {
                    entry_id,
                    task_id: task_id.to_string(),
                    kind: FinishKind::Done,
                    record: Some(record),
                    envelope: String::new(),
                };
                Finished {
                    queue,
                    finish,
                    calls: vec![call],
                    task,
                }
            }
            Err(e) => {
                call.outcome = "error".into();
                call.error_class = Some(e.class.to_string());
                call.error = Some(e.to_string());
                self.fail(
                    queue,
                    entry_id,
                    env,
                    record,
                    vec![call],
                    e.class,
                    e.to_string(),
                    e.retry_after,
                )
            }
        }
    }

    /// A failed attempt: wait out a rate limit, retry with backoff, or die.
    #[allow(clippy::too_many_arguments)]
    fn fail(
        &self,
        queue: Arc<QueueKeys>,
        entry_id: String,
        mut env: Envelope,
        mut record: TaskRecord,
        calls: Vec<CallRow>,
        class: ErrorClass,
        error: String,
        retry_after: Option<Duration>,
    ) -> Finished {
        let attempt = env.attempts + 1;
        let task_id = record.task_id.clone();
        record.error = Some(error.clone());
        record.error_class = Some(class);
        env.last_error = Some(error.clone());
        let due = |wait: Duration| now_ms() + wait.as_millis() as i64;
        let kind = if class == ErrorClass::RateLimited && env.snoozes < MAX_SNOOZES {
            // A rate limit is the provider saying "later", not the task failing.
            env.snoozes += 1;
            record.attempts = env.attempts;
            FinishKind::Retry {
                due_ms: due(retry_after.unwrap_or(self.retry_base).min(self.retry_max)),
            }
        } else if class.is_retryable() && attempt < env.max_attempts() {
            env.attempts = attempt;
            FinishKind::Retry {
                due_ms: due(backoff(
                    self.retry_base,
                    self.retry_max,
                    attempt,
                    retry_after,
                )),
            }
        } else {
            env.attempts = attempt;
            let error = if class.is_retryable() {
                format!("gave up after {attempt} attempts; last error: {error}")
            } else {
                error
            };
            record.error = Some(error.clone());
            FinishKind::Dead { error, class }
        };
        let final_ = matches!(kind, FinishKind::Dead { .. });
        record.status = if final_ {
            Status::Dead
        } else {
            Status::Delayed
        };
        record.finished_at = final_.then(Utc::now);
        let task = final_.then(|| task_row(&record));
        let finish = Finish {
            entry_id,
            task_id,
            kind,
            record: Some(record),
            envelope: env.to_json(),
        };
        Finished {
            queue,
            finish,
            calls,
            task,
        }
    }
}

/// `base * 2^(attempt-1)` with ±20 % jitter so that failed tasks do not come back in
/// lockstep, never shorter than the provider's Retry-After, and never longer than `max`.
#[must_use]
pub fn backoff(
    base: Duration,
    max: Duration,
    attempt: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let jittered = exp.mul_f64(0.8 + fastrand_f64() * 0.4);
    jittered.max(retry_after.unwrap_or(Duration::ZERO)).min(max)
}

fn fastrand_f64() -> f64 {
    // uuid v4 is random; its low 53 bits make a uniform f64 without another dependency.
    (uuid::Uuid::new_v4().as_u128() & ((1u128 << 53) - 1)) as f64 / (1u64 << 53) as f64
}

fn invalid(
    queue: Arc<QueueKeys>,
    entry_id: String,
    task_id: String,
    raw: String,
    error: String,
) -> Finished {
    let mut record = TaskRecord::pending(&task_id, queue.name(), Status::Dead);
    record.error = Some(error.clone());
    record.error_class = Some(ErrorClass::Invalid);
    record.finished_at = Some(Utc::now());
    let task = uuid::Uuid::parse_str(&task_id).ok().map(|id| TaskRow {
        task_id: id,
        ..task_row(&record)
    });
    let finish = Finish {
        entry_id,
        task_id,
        kind: FinishKind::Dead {
            error,
            class: ErrorClass::Invalid,
        },
        record: Some(record),
        envelope: raw,
    };
    Finished {
        queue,
        finish,
        calls: Vec::new(),
        task,
    }
}

fn task_row(r: &TaskRecord) -> TaskRow {
    TaskRow {
        task_id: uuid::Uuid::parse_str(&r.task_id).unwrap_or_default(),
        queue: r.queue.clone(),
        chain_id: r.chain_id.clone(),
        task_type: r.task_type.clone().unwrap_or_else(|| "unknown".into()),
        status: r.status.to_string(),
        attempts: r.attempts as i32,
        provider: r.provider.clone(),
        model: r.model.clone(),
        input_tokens: r.input_tokens as i64,
        output_tokens: r.output_tokens as i64,
        cost_usd: r.cost_usd,
        error: r.error.clone(),
        error_class: r.error_class.map(|c| c.to_string()),
        finished_at: r.finished_at.unwrap_or_else(Utc::now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_respects_retry_after() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        for attempt in 1..=4u32 {
            let want = 2f64.powi(attempt as i32 - 1);
            let got = backoff(base, max, attempt, None).as_secs_f64();
            assert!(
                got >= want * 0.8 && got <= want * 1.2,
                "attempt {attempt}: {got}"
            );
        }
        assert_eq!(backoff(base, max, 30, None), max);
        assert_eq!(backoff(base, max, 1, Some(Duration::from_secs(600))), max);
        assert!(backoff(base, max, 1, Some(Duration::from_secs(9))) >= Duration::from_secs(9));
    }
}

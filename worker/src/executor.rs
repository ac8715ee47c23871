//! Runs one task: validate, route, call the provider, and decide what happens next.
//!
//! Outcomes are not written here: the result is a [`Finished`] that the finisher writes
//! (ledger first, then one Lua call for a whole batch). Only quota and cooldown state is
//! read and written as calls are made.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use llmq_shared::envelope::{self, Envelope};
use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::{CallRow, TaskRow};
use llmq_shared::outcome::{ErrorClass, Status, TaskRecord};
use llmq_shared::provider::Request;
use llmq_shared::queue::{Delivery, Finish, FinishKind, now_ms};
use llmq_shared::quota::{Decision, Limiter};
use tokio_util::sync::CancellationToken;

use crate::router::{Candidate, Plan, Router};

/// Rate-limit waits a task may take without using up attempts; past this they count.
pub const MAX_SNOOZES: u32 = 20;

/// Retry-After waits within one provider before moving on to the next.
const MAX_RATE_WAITS: u32 = 3;

/// What trying a plan came to.
struct PlanOutcome {
    result: Tried,
    route: String,
    errors: Vec<String>,
    last: Option<Candidate>,
}

enum Tried {
    Answered(llmq_shared::provider::Completion),
    /// The hard stop came: hand the task back.
    Released,
    /// No call was made: every candidate is out of quota until `until`.
    Refused {
        until: chrono::DateTime<Utc>,
        reason: String,
    },
    Failed {
        class: ErrorClass,
        error: String,
        retry_after: Option<Duration>,
    },
}

/// What the executor needs to know, shared by every task.
pub struct Executor {
    pub router: Router,
    pub limiter: Limiter,
    pub worker_id: String,
    pub max_payload_bytes: usize,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// One attempt, every provider and wait included, ends after this.
    pub attempt_timeout: Duration,
    /// Cancelled when the shutdown grace period is over: running calls stop and their tasks
    /// go back to the stream.
    pub hard_stop: CancellationToken,
    /// Set when every capable provider is out of quota: the fetcher reads nothing until
    /// then (at most a few seconds at a time), so tasks wait in Redis, not in memory.
    pub quota_pause: Arc<QuotaPause>,
}

/// When the fetcher may read again, in ms since the epoch (0: now).
#[derive(Debug, Default)]
pub struct QuotaPause(std::sync::atomic::AtomicI64);

impl QuotaPause {
    /// The longest one pause lasts; then one read finds out whether a quota freed up.
    pub const MAX: Duration = Duration::from_secs(5);

    fn pause_until(&self, until: chrono::DateTime<Utc>) {
        let capped = until
            .timestamp_millis()
            .min(now_ms() + Self::MAX.as_millis() as i64);
        self.0
            .fetch_max(capped, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long to wait before the next read.
    #[must_use]
    pub fn remaining(&self) -> Duration {
        let until = self.0.load(std::sync::atomic::Ordering::Relaxed);
        Duration::from_millis(u64::try_from(until - now_ms()).unwrap_or(0))
    }
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

        let plan = match self.router.plan(&env) {
            Ok(plan) => plan,
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
        let mut calls = Vec::new();
        let started = Instant::now();
        let attempt_run = self.call_plan(&env, &plan, attempt, &queue, &task_type, &mut calls);
        let tried = match tokio::time::timeout(self.attempt_timeout, attempt_run).await {
            Ok(tried) => tried,
            Err(_) => PlanOutcome {
                result: Tried::Failed {
                    class: ErrorClass::Retryable,
                    error: format!(
                        "the attempt took longer than {:?} (--attempt-timeout) across its providers",
                        self.attempt_timeout
                    ),
                    retry_after: None,
                },
                route: plan.reason.clone(),
                errors: calls.iter().filter_map(|c| c.error.clone()).collect(),
                last: None,
            },
        };
        record.duration_ms = started.elapsed().as_millis() as u64;
        record.route = Some(tried.route);
        record.provider_errors = tried.errors;
        record.provider = tried.last.as_ref().map(|c| c.config.name.clone());
        record.model = tried.last.as_ref().map(|c| c.model.id.clone());
        let spent: f64 = calls.iter().map(|c| c.cost_usd).sum();
        match tried.result {
            Tried::Answered(completion) => {
                let usage = completion.usage;
                record.status = Status::Succeeded;
                record.output = Some(completion.text);
                record.input_tokens = usage.input_tokens;
                record.output_tokens = usage.output_tokens;
                record.cached_tokens = usage.cached_tokens;
                record.reasoning_tokens = usage.reasoning_tokens;
                record.cost_usd = spent;
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
                    calls,
                    task,
                }
            }
            Tried::Released => {
                let finish = Finish {
                    entry_id,
                    task_id: task_id.to_string(),
                    kind: FinishKind::Release,
                    record: None,
                    envelope: env.to_json(),
                };
                Finished {
                    queue,
                    finish,
                    calls,
                    task: None,
                }
            }
            Tried::Refused { until, reason } => {
                self.quota_pause.pause_until(until);
                // Every capable provider is out of quota: wait for the earliest reset
                // without using an attempt. It never spins: the due time is the reset.
                record.status = Status::Delayed;
                record.attempts = env.attempts;
                record.error = Some(reason.clone());
                record.error_class = Some(ErrorClass::QuotaExhausted);
                record.cost_usd = spent;
                env.last_error = Some(reason);
                let finish = Finish {
                    entry_id,
                    task_id: task_id.to_string(),
                    kind: FinishKind::Retry {
                        due_ms: until.timestamp_millis().max(now_ms() + 100),
                    },
                    record: Some(record),
                    envelope: env.to_json(),
                };
                Finished {
                    queue,
                    finish,
                    calls,
                    task: None,
                }
            }
            Tried::Failed {
                class,
                error,
                retry_after,
            } => {
                record.cost_usd = spent;
                self.fail(
                    queue,
                    entry_id,
                    env,
                    record,
                    calls,
                    class,
                    error,
                    retry_after,
                )
            }
        }
    }

    /// Tries the plan's candidates in order: each up to `tries_per_provider` times with
    /// backoff, waiting out short rate limits without using a try, skipping providers that
    /// are cooling down or out of quota, and moving on at once after a fatal error.
    async fn call_plan(
        &self,
        env: &Envelope,
        plan: &Plan,
        attempt: u32,
        queue: &QueueKeys,
        task_type: &str,
        calls: &mut Vec<CallRow>,
    ) -> PlanOutcome {
        let routing = &self.router.config().routing;
        let retry = &routing.retry;
        let mut route = plan.reason.clone();
        let mut errors = Vec::new();
        let mut tried_names: Vec<String> = Vec::new();
        let mut last: Option<Candidate> = None;
        let mut last_error: Option<llmq_shared::provider::Error> = None;
        let mut refused: Vec<(String, chrono::DateTime<Utc>)> = Vec::new();
        let mut called_any = false;
        let request = |model: &str| Request {
            model: model.to_owned(),
            system: env.system.clone(),
            prompt: env.prompt.clone(),
            max_tokens: env.max_tokens,
            temperature: env.temperature,
            timeout: env.timeout(),
        };
        for (i, cand) in plan.candidates.iter().enumerate() {
            let name = cand.config.name.as_str();
            if tried_names.iter().any(|n| n == name) {
                // A provider that failed is not asked again for another of its models.
                continue;
            }
            if i > 0 {
                // Say why we moved on, once, for the record.
                if let Some(prev) = refused.last().filter(|_| last_error.is_none()) {
                    route = format!("{route}; {} → {name}/{}", prev.0, cand.model.id);
                } else if let Some(prev) = &last {
                    route = format!(
                        "{route}; {} failed → {name}/{}",
                        prev.config.name, cand.model.id
                    );
                }
            }
            if self.limiter.cooling_down(name).await.unwrap_or(false) {
                errors.push(format!(
                    "{name}: skipped, cooling down after repeated failures"
                ));
                continue;
            }
            let mut tries = 0;
            let mut rate_waits = 0;
            loop {
                let reservation = if cand.config.quotas.is_empty() {
                    None
                } else {
                    match self
                        .limiter
                        .reserve(
                            name,
                            &cand.config.quotas,
                            cand.estimated_tokens,
                            cand.estimated_usd,
                            Utc::now(),
                        )
                        .await
                    {
                        Ok(Decision::Granted {
                            reservation,
                            crossed,
                        }) => {
                            for c in crossed {
                                tracing::warn!(provider = name, threshold = %c, "quota threshold crossed");
                            }
                            Some(reservation)
                        }
                        Ok(Decision::Refused(r)) => {
                            refused.push((r.describe(name), r.until));
                            break;
                        }
                        Err(e) => {
                            // Without Redis no quota can be checked; do not call blind.
                            errors.push(format!("{name}: quota check failed: {e}"));
                            break;
                        }
                    }
                };
                tries += 1;
                called_any = true;
                last = Some(cand.clone());
                let called_at = Utc::now();
                let started = Instant::now();
                let req = request(&cand.model.id);
                let result = tokio::select! {
                    r = cand.provider.complete(&req) => r,
                    () = self.hard_stop.cancelled() => {
                        return PlanOutcome { result: Tried::Released, route, errors, last };
                    }
                };
                let mut call = CallRow {
                    task_id: env.id.unwrap_or_default(),
                    run: env.replays as i32,
                    attempt: attempt as i32,
                    // Unique within the attempt; a rate-limit wait in delayed repeats the
                    // attempt, so its calls start at the next thousand.
                    call_no: (env.snoozes * 1000) as i32 + calls.len() as i32 + 1,
                    queue: queue.name().to_owned(),
                    chain_id: env.chain_id.clone(),
                    task_type: task_type.to_owned(),
                    provider: name.to_owned(),
                    model: cand.model.id.clone(),
                    input_tokens: 0,
                    output_tokens: 0,
                    cached_tokens: 0,
                    reasoning_tokens: 0,
                    cost_usd: 0.0,
                    latency_ms: i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX),
                    outcome: "ok".into(),
                    error_class: None,
                    error: None,
                    worker: self.worker_id.clone(),
                    called_at,
                };
                let usage = result.as_ref().map(|c| c.usage).unwrap_or_default();
                let cost = cand.model.prices.cost(&usage);
                if let Some(r) = &reservation
                    && let Err(e) = self
                        .limiter
                        .reconcile(r, usage.input_tokens + usage.output_tokens, cost)
                        .await
                {
                    tracing::warn!(provider = name, "reconciling the quota failed: {e}");
                }
                record_call(
                    name,
                    &cand.model.id,
                    &result,
                    started.elapsed(),
                    &usage,
                    cost,
                );
                call.input_tokens = usage.input_tokens as i64;
                call.output_tokens = usage.output_tokens as i64;
                call.cached_tokens = usage.cached_tokens as i64;
                call.reasoning_tokens = usage.reasoning_tokens as i64;
                call.cost_usd = cost;
                match result {
                    Ok(completion) => {
                        calls.push(call);
                        self.limiter.succeeded(name).await.ok();
                        return PlanOutcome {
                            result: Tried::Answered(completion),
                            route,
                            errors,
                            last,
                        };
                    }
                    Err(e) => {
                        call.outcome = "error".into();
                        call.error_class = Some(e.class.to_string());
                        call.error = Some(e.to_string());
                        calls.push(call);
                        errors.push(e.to_string());
                        if e.class == ErrorClass::Retryable
                            && self
                                .limiter
                                .failed(name, &routing.cooldown)
                                .await
                                .unwrap_or(false)
                        {
                            tracing::warn!(provider = name, "cooling down after repeated failures");
                        }
                        let wait = match e.class {
                            ErrorClass::RateLimited => e
                                .retry_after
                                .filter(|w| {
                                    *w <= retry.max_retry_after && rate_waits < MAX_RATE_WAITS
                                })
                                .inspect(|_| {
                                    rate_waits += 1;
                                    tries -= 1;
                                }),
                            ErrorClass::Retryable if tries < retry.tries_per_provider => {
                                let i =
                                    (tries as usize - 1).min(retry.backoff.len().saturating_sub(1));
                                retry
                                    .backoff
                                    .get(i)
                                    .map(|b| b.mul_f64(0.8 + fastrand_f64() * 0.4))
                            }
                            _ => None,
                        };
                        last_error = Some(e);
                        let Some(wait) = wait else { break };
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = self.hard_stop.cancelled() => {
                                return PlanOutcome { result: Tried::Released, route, errors, last };
                            }
                        }
                    }
                }
            }
            if !tried_names.iter().any(|n| n == name) {
                tried_names.push(name.to_owned());
            }
        }
        if !called_any && let Some(until) = refused.iter().map(|(_, t)| *t).min() {
            let reasons: Vec<String> = refused.into_iter().map(|(r, _)| r).collect();
            errors.extend(reasons.iter().cloned());
            return PlanOutcome {
                result: Tried::Refused {
                    until,
                    reason: format!(
                        "every capable provider is out of quota: {}",
                        reasons.join("; ")
                    ),
                },
                route,
                errors,
                last,
            };
        }
        let (class, message, retry_after) = match &last_error {
            Some(e) => (e.class, e.to_string(), e.retry_after),
            None => (
                ErrorClass::Retryable,
                errors
                    .last()
                    .cloned()
                    .unwrap_or_else(|| "no provider could be tried".into()),
                None,
            ),
        };
        let error = if tried_names.len() > 1 {
            format!(
                "all providers failed; last error: {message}; tried: {}",
                tried_names.join(", ")
            )
        } else {
            message
        };
        PlanOutcome {
            result: Tried::Failed {
                class,
                error,
                retry_after,
            },
            route,
            errors,
            last,
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
                {
                    let plural = if attempt == 1 { "" } else { "s" };
                    if error.starts_with("all providers failed") {
                        format!("gave up after {attempt} attempt{plural}; {error}")
                    } else {
                        format!("gave up after {attempt} attempt{plural}; last error: {error}")
                    }
                }
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

/// Prometheus figures of one provider call.
fn record_call(
    provider: &str,
    model: &str,
    result: &llmq_shared::provider::Result<llmq_shared::provider::Completion>,
    took: Duration,
    usage: &llmq_shared::provider::Usage,
    cost: f64,
) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(e) => e.class.as_str(),
    };
    let (p, m) = (provider.to_owned(), model.to_owned());
    metrics::counter!("llmq_provider_calls_total", "provider" => p.clone(), "model" => m.clone(), "outcome" => outcome).increment(1);
    metrics::histogram!("llmq_provider_call_seconds", "provider" => p.clone(), "model" => m)
        .record(took.as_secs_f64());
    metrics::counter!("llmq_tokens_total", "provider" => p.clone(), "kind" => "input")
        .increment(usage.input_tokens);
    metrics::counter!("llmq_tokens_total", "provider" => p.clone(), "kind" => "output")
        .increment(usage.output_tokens);
    metrics::counter!("llmq_tokens_total", "provider" => p.clone(), "kind" => "cached")
        .increment(usage.cached_tokens);
    metrics::gauge!("llmq_cost_usd_total", "provider" => p).increment(cost);
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

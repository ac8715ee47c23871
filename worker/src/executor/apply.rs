//! Carries out a task's [`Transition`] on its envelope and record: the [`Finished`] the
//! finisher writes. Nothing here chooses a fate; each transition carries what its write
//! needs.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use llmq_shared::chain::{StepEnd, StepOutcome, StepState};
use llmq_shared::envelope::{self, Envelope};
use llmq_shared::ids::{EntryId, TaskId};
use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::{CallOutcome, CallRow};
use llmq_shared::outcome::{ErrorClass, Status, TaskRecord};
use llmq_shared::provider::Completion;
use llmq_shared::queue::{Finish, FinishKind, Place, Write};

use super::ReadPause;
use super::decide::{Transition, Wait};
use crate::finished::{Finished, RowExtras};

/// What a transition is carried out on: the task as it came and what its run recorded.
pub(super) struct Ending {
    pub queue: Arc<QueueKeys>,
    pub entry_id: EntryId,
    /// Its id, as admission parsed it: what its ledger row is keyed by.
    pub task_id: TaskId,
    pub env: Envelope,
    pub record: TaskRecord,
    pub calls: Vec<CallRow>,
}

/// Carries out `transition` on the task, ready for the finisher.
pub(super) fn apply(task: Ending, transition: Transition, read_pause: &ReadPause) -> Finished {
    let Ending {
        queue,
        entry_id,
        task_id: id,
        mut env,
        record,
        calls,
    } = task;
    let task_id = record.task_id;
    // A step's next rounds, for the transitions that run it again.
    let mut reruns = None;
    let finish = match transition {
        Transition::Park => return parked(queue, entry_id, task_id),
        Transition::Duplicate(finished) => return *finished,
        Transition::Cancel { why } => {
            let ending = Ending {
                queue,
                entry_id,
                task_id: id,
                env,
                record,
                calls,
            };
            return cancelled(ending, why);
        }
        Transition::Refuse { error } => {
            // Not under the id it claims: that is the real step's, whose result a copy must
            // not overwrite.
            let own_id = envelope::derive_id(queue.name(), entry_id);
            return invalid(queue, entry_id, own_id, env.to_json(), error);
        }
        Transition::Await { deadline_ms } => {
            return awaiting(queue, entry_id, &env, record, deadline_ms);
        }
        Transition::Batch(park) => {
            tracing::debug!(task = %task_id, group = park.group, "parking the task for a provider batch");
            let write = Write::Park {
                entry_id,
                task_id,
                park,
            };
            return Finished::new(queue, write, Vec::new());
        }
        Transition::Release => Finish::release(entry_id, task_id, env.to_json()),
        Transition::Done(completion) => Finish::done(entry_id, task_id, done(record, completion)),
        Transition::Wait(wait) => waiting(&queue, entry_id, &mut env, record, wait, read_pause),
        Transition::Retry { due, error, class } => {
            env.attempts += 1;
            let record = delayed(record, &mut env, error, class);
            env.waiting_since = None;
            let due_ms = due.timestamp_millis();
            Finish::retry(entry_id, task_id, due_ms, Some(record), env.to_json())
        }
        Transition::Dead { error, class } => {
            let record = dead(record, &mut env, &error, class);
            Finish::dead(entry_id, task_id, error, class, record, env.to_json())
        }
        Transition::Escalate {
            error,
            class,
            tier,
            reruns: up,
        } => {
            // This round failed; the step runs again one tier up.
            let mut record = record;
            record.status = Status::Failed;
            record.error_class = Some(class);
            record.error = Some(format!(
                "{error}; escalating to a {}-tier model",
                tier.as_str()
            ));
            record.attempts = env.attempts + 1;
            record.finished_at = Some(Utc::now());
            reruns = Some(up);
            Finish::done(entry_id, task_id, record)
        }
        Transition::Rework {
            findings,
            reruns: back,
        } => {
            // The verdict is this task's result; the work runs again with it.
            let mut record = record;
            record.status = Status::Succeeded;
            record.output = Some(findings);
            record.finished_at = Some(Utc::now());
            reruns = Some(back);
            Finish::done(entry_id, task_id, record)
        }
    };
    written(queue, id, &env, finish, reruns, calls)
}

/// A task no provider can call now: it waits without using an attempt, in delayed, or back
/// at its tenant's head in the room when only a provider's pace holds it.
fn waiting(
    queue: &QueueKeys,
    entry_id: EntryId,
    env: &mut Envelope,
    record: TaskRecord,
    wait: Wait,
    read_pause: &ReadPause,
) -> Finish {
    let task_id = record.task_id;
    if wait.hold
        && let Some(class) = env.class()
    {
        // Its tenant is at its limits: back to its head in the room, and the tenant held
        // there until then; the other tenants' tasks are fed meanwhile, in their turn.
        let until = wait.due.timestamp_millis();
        return Finish::room(entry_id, task_id, class, Place::Hold(until), env.to_json());
    }
    if wait.paced
        && let Some(class) = env.class()
    {
        // Only a provider's pace holds it, and its slot is not near: back to its tenant's
        // head in the room, its turn given back (reading it cost the tenant none), where the
        // room's order decides who asks next. The room is not fed here again before then,
        // and fewer of its tasks are held.
        read_pause.pause_until(wait.due, true);
        read_pause.room_handed_back();
        return Finish::room(entry_id, task_id, class, Place::Turn, env.to_json());
    }
    // No provider can be called now: wait without using an attempt. It never spins: the due
    // time is when one may be called again.
    read_pause.pause_until(wait.due, env.class().is_some());
    if wait.class == ErrorClass::Unavailable {
        metrics::counter!("llmq_tasks_waiting_on_outage_total", "queue" => queue.name().to_owned())
            .increment(1);
    }
    let record = delayed(record, env, wait.reason, wait.class);
    env.snoozes += 1;
    env.waiting_since = Some(wait.since);
    let due_ms = wait.due.timestamp_millis();
    Finish::retry(entry_id, task_id, due_ms, Some(record), env.to_json())
}

/// The record of a task that answered.
fn done(mut record: TaskRecord, completion: Completion) -> TaskRecord {
    let usage = completion.usage;
    record.status = Status::Succeeded;
    record.output = Some(completion.text);
    record.json = completion.json;
    record.tool_calls = completion.tool_calls;
    record.truncated = completion.truncated;
    record.input_tokens = usage.input_tokens;
    record.output_tokens = usage.output_tokens;
    record.cached_tokens = usage.cached_tokens;
    record.reasoning_tokens = usage.reasoning_tokens;
    record.finished_at = Some(Utc::now());
    record
}

/// The record of a task that runs again later, and its envelope's last error.
fn delayed(
    mut record: TaskRecord,
    env: &mut Envelope,
    error: String,
    class: ErrorClass,
) -> TaskRecord {
    record.status = Status::Delayed;
    record.attempts = env.attempts;
    env.last_error = Some(error.as_str().into());
    record.error = Some(error);
    record.error_class = Some(class);
    record
}

/// The record of a task that ended dead; an attempt is used unless no provider could be
/// called.
fn dead(mut record: TaskRecord, env: &mut Envelope, error: &str, class: ErrorClass) -> TaskRecord {
    if class != ErrorClass::Unavailable {
        env.attempts += 1;
    }
    record.attempts = env.attempts;
    env.last_error = Some(error.into());
    record.status = Status::Dead;
    record.error = Some(error.to_owned());
    record.error_class = Some(class);
    record.finished_at = Some(Utc::now());
    record
}

/// `finish` as the finisher writes it: with its step's end or next rounds, for a chain's.
fn written(
    queue: Arc<QueueKeys>,
    task_id: TaskId,
    env: &Envelope,
    finish: Finish,
    reruns: Option<Vec<llmq_shared::chain::Rerun>>,
    calls: Vec<CallRow>,
) -> Finished {
    // A task that ended (its record is finished) has its row in the ledger's tasks.
    let ended = finish.record.as_ref().filter(|r| r.finished_at.is_some());
    if let Some(r) = ended {
        observe_end(&queue, env, finish.entry_id, r.duration_ms);
    }
    let row = ended.is_some().then(|| row_extras(task_id, env));
    let step = (env.chain_id.as_deref().zip(env.step.as_deref()))
        .map(|(chain, step)| (chain.to_owned(), step.to_owned()));
    let write = match (step, reruns) {
        (Some((chain_id, step)), Some(reruns)) => Write::Rerun {
            finish,
            chain_id,
            step,
            reruns,
        },
        (Some((chain_id, step)), None) => match step_outcome(&finish, chain_id, step) {
            Some(ended) => Write::Step(finish, Box::new(ended)),
            None => Write::Task(finish),
        },
        (None, _) => Write::Task(finish),
    };
    Finished {
        row,
        ..Finished::new(queue, write, calls)
    }
}

/// Records how long an ended task waited and took from its enqueue (the envelope's
/// `enqueued_at`, else its stream entry's time): `llmq_task_latency_seconds` and
/// `llmq_task_wait_seconds` (less its last attempt's `run_ms`).
fn observe_end(queue: &QueueKeys, env: &Envelope, entry_id: EntryId, run_ms: u64) {
    let enqueued_ms = env.enqueued_at.map_or_else(
        || i64::try_from(entry_id.ms()).unwrap_or(0),
        |t| t.timestamp_millis(),
    );
    let latency_ms = (Utc::now().timestamp_millis() - enqueued_ms).max(0) as f64;
    let wait_ms = (latency_ms - run_ms as f64).max(0.0);
    // Labels from a known set only: a type or priority the envelope got wrong is `unknown`.
    let task_type = env.task_type().map_or("unknown", |t| t.as_str());
    let priority = match env.priority {
        None => -1,
        Some(p) if (0..=i64::from(llmq_shared::envelope::MAX_PRIORITY)).contains(&p) => p as i8,
        Some(_) => -2,
    };
    TASK_TIMES.with(queue.name(), task_type, priority, |latency, wait| {
        latency.record(latency_ms / 1000.0);
        wait.record(wait_ms / 1000.0);
    });
}

/// The two task histograms of each queue, task type and priority (-1 none, -2 unknown),
/// registered once: building a metric's key and looking it up on every task would cost more
/// than recording it.
static TASK_TIMES: TaskTimes = TaskTimes(std::sync::LazyLock::new(Default::default));

type TimesOf = HashMap<(&'static str, i8), (metrics::Histogram, metrics::Histogram)>;

struct TaskTimes(std::sync::LazyLock<std::sync::RwLock<HashMap<String, TimesOf>>>);

impl TaskTimes {
    fn with(
        &self,
        queue: &str,
        task_type: &'static str,
        priority: i8,
        record: impl FnOnce(&metrics::Histogram, &metrics::Histogram),
    ) {
        let key = (task_type, priority);
        if let Ok(map) = self.0.read()
            && let Some((latency, wait)) = map.get(queue).and_then(|m| m.get(&key))
        {
            return record(latency, wait);
        }
        // Made for the process's recorder (installed now if nothing did yet), not a no-op one.
        let _ = llmq_shared::health::recorder();
        let priority = match priority {
            -1 => "none".to_owned(),
            -2 => "unknown".to_owned(),
            p => p.to_string(),
        };
        let labels = [
            ("queue", queue.to_owned()),
            ("task_type", task_type.to_owned()),
            ("priority", priority),
        ];
        let handles = (
            metrics::histogram!("llmq_task_latency_seconds", &labels),
            metrics::histogram!("llmq_task_wait_seconds", &labels),
        );
        record(&handles.0, &handles.1);
        if let Ok(mut map) = self.0.write() {
            map.entry(queue.to_owned())
                .or_default()
                .insert(key, handles);
        }
    }
}

fn row_extras(task_id: TaskId, env: &Envelope) -> RowExtras {
    RowExtras {
        task_id,
        risk: env.risk,
        batch_id: env.batch_id.as_deref().map(Into::into),
        enqueued_at: env.enqueued_at,
        tenant: env.tenant.as_deref().map(Into::into),
        tags: env.tags_json(),
    }
}

/// A task parked in Redis (for a slot of its concurrency key, an identical request's call,
/// a warm-up, the task holding its idempotency key): nothing to write.
fn parked(queue: Arc<QueueKeys>, entry_id: EntryId, task_id: TaskId) -> Finished {
    let finish = Finish::release(entry_id, task_id, String::new());
    Finished {
        parked: true,
        ..plain(queue, finish, Vec::new())
    }
}

/// A task's outcome that moves no chain.
pub(super) fn plain(queue: Arc<QueueKeys>, finish: Finish, calls: Vec<CallRow>) -> Finished {
    Finished::new(queue, Write::Task(finish), calls)
}

/// What a step's chain records when its task ended for good; `None` while it goes on.
fn step_outcome(finish: &Finish, chain_id: String, step: String) -> Option<StepOutcome> {
    let record = finish.record.as_ref()?;
    let outcome = match finish.kind {
        FinishKind::Done => StepEnd::Succeeded,
        FinishKind::Dead { .. } => StepEnd::Failed,
        FinishKind::Retry { .. } | FinishKind::Release | FinishKind::Room { .. } => return None,
    };
    Some(StepOutcome {
        chain_id,
        step,
        outcome,
        fields: StepState {
            task_id: Some(finish.task_id),
            provider: record.provider.clone(),
            model: record.model.clone(),
            cost_usd: record.cost_usd,
            summary: record.output.as_deref().map(llmq_shared::chain::summary),
            error: record.error.clone(),
            ..StepState::default()
        },
        seen: None,
    })
}

/// An approval step's task: acked with a record saying a person decides, the step left
/// awaiting approval.
fn awaiting(
    queue: Arc<QueueKeys>,
    entry_id: EntryId,
    env: &Envelope,
    mut record: TaskRecord,
    deadline_ms: i64,
) -> Finished {
    record.status = Status::Succeeded;
    record.output = Some("handed to a person: llmq chain approve|reject".into());
    record.finished_at = Some(Utc::now());
    let task_id = record.task_id;
    let write = Write::Await {
        finish: Finish::done(entry_id, task_id, record),
        chain_id: env.chain_id.as_deref().unwrap_or_default().to_owned(),
        step: env.step.as_deref().unwrap_or_default().to_owned(),
        deadline_ms,
    };
    Finished::new(queue, write, Vec::new())
}

/// A task that was cancelled (its chain, or a cancel mark that names it): acked with a
/// `cancelled` record and its calls; a chain step's ends its step as a failure would.
fn cancelled(task: Ending, why: String) -> Finished {
    let Ending {
        queue,
        entry_id,
        task_id: id,
        env,
        mut record,
        calls,
    } = task;
    // An attempt is used only by a call that went out.
    record.attempts =
        env.attempts + u32::from(calls.iter().any(|c| c.outcome != CallOutcome::Unsent));
    record.status = Status::Cancelled;
    record.error = Some(why.clone());
    record.finished_at = Some(Utc::now());
    metrics::counter!("llmq_tasks_cancelled_total", "queue" => queue.name().to_owned())
        .increment(1);
    let task_id = record.task_id;
    let finish = Finish::done(entry_id, task_id, record);
    let write = match (env.chain_id.as_deref(), env.step.as_deref()) {
        (Some(chain_id), Some(step)) => {
            let step = StepOutcome {
                chain_id: chain_id.to_owned(),
                step: step.to_owned(),
                outcome: StepEnd::Cancelled,
                fields: StepState {
                    task_id: Some(task_id),
                    error: Some(why),
                    ..StepState::default()
                },
                seen: None,
            };
            Write::Step(finish, Box::new(step))
        }
        _ => Write::Task(finish),
    };
    Finished {
        row: Some(row_extras(id, &env)),
        ..Finished::new(queue, write, calls)
    }
}

/// A task that cannot run as it came: a dead letter under `task_id`, keeping `raw`.
pub(super) fn invalid(
    queue: Arc<QueueKeys>,
    entry_id: EntryId,
    task_id: TaskId,
    raw: String,
    error: String,
) -> Finished {
    let mut record = TaskRecord::pending(task_id, queue.name(), Status::Dead);
    record.error = Some(error.clone());
    record.error_class = Some(ErrorClass::Invalid);
    record.finished_at = Some(Utc::now());
    let finish = Finish::dead(entry_id, task_id, error, ErrorClass::Invalid, record, raw);
    Finished {
        row: Some(RowExtras {
            task_id,
            risk: None,
            batch_id: None,
            enqueued_at: None,
            tenant: None,
            tags: None,
        }),
        ..plain(queue, finish, Vec::new())
    }
}

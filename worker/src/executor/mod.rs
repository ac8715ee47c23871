//! Runs one task: parse -> plan -> attempt -> decide.
//!
//! Layout:
//! - `attempt`: tries the plan's candidates and says what the attempt came to;
//! - `decide`: turns that into the task's transition, a pure function and the only place a
//!   task's fate is chosen (escalation and a rejection's send-back included);
//! - `chain`: what a chain step needs before its call and what its answer means after;
//! - `check`: a chain's check step, a command the provider file names;
//! - `batch`: tasks that can wait, sent to a provider batch and finished with its answer;
//! - `call_metrics`: the GenAI metrics of each call;
//! - this module: admission, the record, and the [`Finished`] value for the finisher.
//!
//! Outcomes are not written here: the finisher writes them (ledger first, then one Lua call
//! for a whole batch). Only quota and circuit state is read and written as calls are made.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use llmq_shared::answer_cache::{self, Use};
use llmq_shared::chain::{Chain, StepOutcome, StepState};
use llmq_shared::circuit::Circuits;
use llmq_shared::config::Config;
use llmq_shared::envelope::{self, Envelope, TaskType};
use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::{CallRow, UNSENT, Verdict};
use llmq_shared::outcome::{ErrorClass, LearnedRoute, Status, TaskRecord};
use llmq_shared::provider::Completion;
use llmq_shared::provider::clients::Clients;
use llmq_shared::queue::{
    Client, Delivery, Finish, FinishKind, Place, Slot, Write, answer_name, flight_key, now_ms,
    warm_name,
};
use llmq_shared::quota::Limiter;
use llmq_shared::retry::RetryPolicy;
use llmq_shared::routing::{self, Constraints, Stats};
use llmq_shared::telemetry;
use std::sync::RwLock;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

pub mod attempt;
mod batch;
mod cache;
mod call_metrics;
mod chain;
mod check;
pub mod decide;
mod keyed;

use attempt::{Attempt, AttemptError, Outcome, Tried};
pub use batch::Batchers;
use batch::{Latch, unread_latch};
pub use call_metrics::CallMetrics;
use decide::{Escalation, Policy, StepRounds, TaskState, Transition};

use crate::cancels::Named;
use crate::finished::{CallStarts, Finished, RowExtras};

/// What the executor needs to know, shared by every task.
pub struct Executor {
    pub redis: Client,
    pub config: Config,
    /// A client per provider of `config`.
    pub clients: Clients,
    pub limiter: Limiter,
    pub circuits: Circuits,
    pub worker_id: Arc<str>,
    pub max_payload_bytes: usize,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// One attempt, every provider and wait included, ends after this.
    pub attempt_timeout: Duration,
    /// Cancelled when the shutdown grace period is over: running calls stop and their tasks
    /// go back to the stream.
    pub hard_stop: CancellationToken,
    /// Set when a task found no provider it could call (quotas used up, an outage): the
    /// fetcher reads nothing until then (at most a few seconds at a time), so tasks wait in
    /// Redis, not in memory.
    pub read_pause: Arc<ReadPause>,
    /// Records each call before it is made; `None` without a ledger.
    pub call_starts: Option<CallStarts>,
    pub call_metrics: CallMetrics,
    /// What the fleet observed of each model, for learned routing strategies.
    pub stats: Arc<StatsView>,
    /// The claims this worker holds: no call starts on one that may have lapsed.
    pub claims: Arc<crate::claims::Claims>,
    /// The cancel marks of this worker's queues, and the tasks running here they may end.
    pub cancels: Arc<crate::cancels::Cancels>,
    /// Whether a scheduler sends each queue's batches, as last seen.
    pub batchers: batch::Batchers,
}

/// What `cheapest` routes by: nothing observed.
static NO_STATS: std::sync::LazyLock<Stats> = std::sync::LazyLock::new(Stats::default);

/// The constraints of a task that is no chain's step: none.
static NO_CONSTRAINTS: Constraints = Constraints {
    exclude_models: Vec::new(),
    exclude_providers: Vec::new(),
    min_tier: None,
};

/// The routing stats every task of this worker reads, refreshed from Redis (where the
/// scheduler's `routing_stats` duty writes them) while a learned strategy is configured.
#[derive(Debug, Default)]
pub struct StatsView(RwLock<Arc<Stats>>);

impl StatsView {
    /// The stats as last read.
    #[must_use]
    pub fn current(&self) -> Arc<Stats> {
        Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Replaces them.
    pub fn set(&self, stats: Stats) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(stats);
    }
}

/// When the fetcher may read again, in ms since the epoch (0: now): any task, and tasks
/// from the room. A task with a class that must wait (for a priority's share of a rate
/// limit, say) pauses only the room's feeding, so the stream's tasks, served first, are
/// still read at once.
///
/// It also keeps the room's tasks this worker holds without a slot few: a provider's pace
/// hands back what it cannot take soon, and a worker that went on reading the room would
/// read them again and again, and keep them from the other workers' turn. So the worker
/// holds at most `cap` of the room's tasks that wait for a slot (0: no cap), as TCP keeps
/// its window: halved when one is handed back, one more for each whose call starts.
#[derive(Debug, Default)]
pub struct ReadPause {
    all: AtomicI64,
    room: AtomicI64,
    /// The room's tasks read whose first call has not started (nor have they ended).
    unslotted: AtomicUsize,
    cap: AtomicUsize,
}

impl ReadPause {
    /// The longest one pause lasts; then one read finds out whether a provider freed up.
    pub const MAX: Duration = Duration::from_secs(5);

    /// How soon a worker whose room tasks all wait for slots looks at the room again.
    const HELD: Duration = Duration::from_millis(20);

    fn pause_until(&self, until: chrono::DateTime<Utc>, from_room: bool) {
        let capped = until
            .timestamp_millis()
            .min(now_ms() + Self::MAX.as_millis() as i64);
        let pause = if from_room { &self.room } else { &self.all };
        pause.fetch_max(capped, Ordering::Relaxed);
    }

    /// How long to wait before the next read.
    #[must_use]
    pub fn remaining(&self) -> Duration {
        Self::left(&self.all)
    }

    /// How long to wait before feeding from the room again (reading the stream may go on).
    #[must_use]
    pub fn room_remaining(&self) -> Duration {
        let held = if self.room_allowance() == 0 {
            Self::HELD
        } else {
            Duration::ZERO
        };
        Self::left(&self.room).max(self.remaining()).max(held)
    }

    /// How many more of the room's tasks this worker may read now.
    #[must_use]
    pub fn room_allowance(&self) -> usize {
        match self.cap.load(Ordering::Relaxed) {
            0 => usize::MAX,
            cap => cap.saturating_sub(self.unslotted.load(Ordering::Relaxed)),
        }
    }

    /// The fetcher read one of the room's tasks.
    pub fn room_read(&self) {
        self.unslotted.fetch_add(1, Ordering::Relaxed);
    }

    /// A task of the room was handed back for its provider's pace: hold half as many.
    fn room_handed_back(&self) {
        let half = (self.unslotted.load(Ordering::Relaxed) / 2).max(1);
        let _ = self
            .cap
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cap| {
                Some(if cap == 0 { half } else { cap.min(half) })
            });
    }

    fn left(until: &AtomicI64) -> Duration {
        let until = until.load(Ordering::Relaxed);
        Duration::from_millis(u64::try_from(until - now_ms()).unwrap_or(0))
    }
}

/// A task of the room this worker runs, until its first call starts or it ends: counted in
/// [`ReadPause`]'s `unslotted`, whatever way the task ends.
pub struct RoomTurn<'a> {
    pause: &'a ReadPause,
    slotless: std::sync::atomic::AtomicBool,
}

impl<'a> RoomTurn<'a> {
    /// Takes over the count the fetcher made for `delivery`, if it came from the room.
    #[must_use]
    pub fn of(pause: &'a ReadPause, delivery: &Delivery) -> Option<Self> {
        delivery.from_room.then(|| Self {
            pause,
            slotless: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// The task's call starts (its provider gave it a slot, or has no limits): one more of
    /// the room's tasks may be held.
    pub fn called(&self) {
        if self.slotless.swap(false, Ordering::Relaxed) {
            self.pause.unslotted.fetch_sub(1, Ordering::Relaxed);
            let _ = self
                .pause
                .cap
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cap| {
                    (cap > 0).then(|| cap.saturating_add(1))
                });
        }
    }
}

impl Drop for RoomTurn<'_> {
    fn drop(&mut self) {
        if *self.slotless.get_mut() {
            self.pause.unslotted.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What a chain step's preparation decided, for its attempt and after it.
#[derive(Default)]
struct StepPlan {
    /// The prompt its handoffs made, when it calls a model.
    prompt: Option<String>,
    constraints: Constraints,
    reading: Option<chain::Reading>,
    rework: Option<Box<chain::Rework>>,
    escalation: Option<Result<Box<chain::Rework>, String>>,
    /// Its outcome without a call (an output, a check, a fatal problem); boxed, as every
    /// task's call would otherwise carry its room.
    settled: Option<Box<Outcome>>,
    /// For a review or a check: the task whose output its verdict judges.
    judged: Option<String>,
    /// Its state and its children's as read before it ran (`StepOutcome::seen`).
    seen: Option<Box<llmq_shared::chain::Seen>>,
}

/// A task parsed from its delivery and ready to run: small, so a task in flight carries it
/// once (its envelope is boxed).
struct Admitted {
    queue: Arc<QueueKeys>,
    entry_id: String,
    env: Box<Envelope>,
    /// As the number, not its text: every task in flight holds it for the whole of its call.
    task_id: Uuid,
    /// The entry was put back by llmq (from the room, a batch, a hand-back), not enqueued.
    from_room: bool,
}

/// A chain step that ends before any attempt.
enum Ended {
    /// Redis is away: the worker's fault, not the task's. Hand it back.
    Release,
    Cancelled(String),
    /// Not the step's own task: a dead letter that leaves the chain alone.
    Invalid(String),
    /// Handed to a person until this deadline (ms).
    Await(i64),
}

impl Executor {
    /// Prepares a chain step: its handoffs, candidates and constraints, or its outcome when
    /// it makes no call. Boxed by its caller: its futures are large and done before the
    /// step's call starts.
    async fn prepare_step(
        &self,
        queue: &QueueKeys,
        task_id: Uuid,
        env: &Envelope,
    ) -> Result<StepPlan, Ended> {
        let mut step = StepPlan::default();
        match chain::prepare(
            &self.redis,
            queue,
            env,
            &self.config,
            self.max_payload_bytes,
            &mut step.seen,
        )
        .await
        {
            Err(e) => {
                tracing::warn!(task = %task_id, "cannot read the task's chain: {e}");
                return Err(Ended::Release);
            }
            Ok(chain::Prepared::Cancelled(why)) => return Err(Ended::Cancelled(why)),
            Ok(chain::Prepared::Invalid(why)) => return Err(Ended::Invalid(why)),
            Ok(chain::Prepared::Await { deadline_ms }) => return Err(Ended::Await(deadline_ms)),
            Ok(chain::Prepared::Fatal(why)) => {
                step.settled = Some(Box::new(Outcome::Failed(AttemptError {
                    class: ErrorClass::Fatal,
                    message: why,
                    tried: Vec::new(),
                    retry_after: None,
                })));
            }
            Ok(chain::Prepared::Check {
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
            Ok(chain::Prepared::Output(text)) => {
                step.settled = Some(Box::new(Outcome::Answered(Completion {
                    text,
                    usage: llmq_shared::provider::Usage::default(),
                    ..Completion::default()
                })));
            }
            Ok(chain::Prepared::Call {
                prompt,
                constraints,
                read,
                rework,
                escalation,
            }) => {
                if let chain::Reading::Verdict { judged, .. } = &read {
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

    /// Runs `delivery` to an outcome. Never fails: every problem becomes an outcome.
    pub async fn run(&self, queue: Arc<QueueKeys>, delivery: Box<Delivery>) -> Finished {
        let turn = RoomTurn::of(&self.read_pause, &delivery);
        let task = match self.admit(queue, *delivery) {
            Ok(task) => task,
            Err(finished) => {
                if let Write::Expand { chain, .. } = &finished.write
                    && chain.idempotency_key.is_some()
                {
                    self.resubmitted(&finished.queue, chain).await;
                }
                return *finished;
            }
        };
        let mut slot = None;
        let mut key = None;
        let mut finished = self
            .run_holding(task, &mut slot, &mut key, turn.as_ref())
            .await;
        finished.slot = slot;
        if let Write::Task(finish) = &mut finished.write {
            // A task holding an idempotency key ends it with its outcome's write.
            if let Some(held) = key {
                let holder = held.holder(&finish.task_id);
                finish.end_key(held.name, holder, held.window);
            }
            // A batch's task that ended (it has its ledger row then) counts as finished.
            if let Some(row) = &finished.row {
                finish.batch_id.clone_from(&row.batch_id);
            }
        }
        finished
    }

    /// Parses a delivery, or says how it ends without running: a chain to expand, a dead
    /// letter, a task that waits for its `run_at`. The raw payload is dropped here, so a
    /// task's prompt is not held twice during its call.
    fn admit(&self, queue: Arc<QueueKeys>, delivery: Delivery) -> Result<Admitted, Box<Finished>> {
        let Delivery {
            entry_id,
            payload,
            chain,
            from_room,
            ..
        } = delivery;
        if let (None, Some(spec)) = (&payload, &chain) {
            return Err(Box::new(self.submitted_chain(queue, entry_id, spec)));
        }
        let Some(payload) = payload else {
            let task_id = envelope::derive_id(queue.name(), &entry_id).to_string();
            let error = format!(
                "the stream entry has no `task` field; enqueue with XADD {} * task '<json>'",
                queue.stream()
            );
            return Err(Box::new(invalid(
                queue,
                entry_id,
                task_id,
                String::new(),
                error,
            )));
        };
        let mut env = match Envelope::parse(&payload, self.max_payload_bytes) {
            Ok(env) => env,
            Err(e) => {
                // An oversized payload is not parsed again, for its id or its step.
                let readable = !matches!(e, envelope::Error::TooLarge { .. });
                let task_id = if readable {
                    envelope::task_id_of(queue.name(), &entry_id, &payload)
                } else {
                    envelope::derive_id(queue.name(), &entry_id)
                }
                .to_string();
                let raw = envelope::dead_payload(&payload, self.max_payload_bytes);
                let step = readable
                    .then(|| envelope::chain_step_of(&payload))
                    .flatten();
                let mut finished = invalid(queue, entry_id, task_id.clone(), raw, e.to_string());
                // A chain step's task refused here still ends its step, so its chain ends;
                // the step script applies it only for the step's current, queued task.
                if let (Some((chain_id, step)), Write::Task(finish)) = (step, &finished.write) {
                    let failed = StepOutcome::failed(chain_id, step, task_id, e.to_string());
                    finished.write = Write::Step(finish.clone(), Box::new(failed));
                }
                return Err(Box::new(finished));
            }
        };
        let task_id = env.id_or_derive(queue.name(), &entry_id);
        env.id = Some(task_id);
        // When it was enqueued, kept wherever it goes next (the room, a wait): what a
        // tenant's cancel compares.
        let entry_ms = entry_ms(&entry_id);
        if env.enqueued_at.is_none() && !from_room {
            env.enqueued_at = chrono::DateTime::from_timestamp_millis(entry_ms);
        }
        let named = Named::of(task_id, &env, entry_ms, env.attempts > 0);
        if let Some(why) = self.cancels.why(&queue, named) {
            let task_type = env.task_type().map_or("", TaskType::as_str);
            let record = running(&queue, task_id, &env, task_type);
            return Err(Box::new(cancelled(
                queue,
                entry_id,
                &env,
                record,
                why,
                Vec::new(),
            )));
        }

        if let Some(run_at) = env.run_at {
            let due_ms = run_at.timestamp_millis();
            if due_ms > now_ms() + 5 {
                // Enqueued straight into the stream with a future run_at: wait in delayed.
                let finish =
                    Finish::retry(entry_id, task_id.to_string(), due_ms, None, env.to_json());
                return Err(Box::new(plain(queue, finish, Vec::new())));
            }
        }
        // A task with a priority or tenant waits its turn in the room first; one coming
        // back from a wait (a retry, a rate limit) keeps its place at its tenant's head.
        if !from_room && let Some(class) = env.class() {
            let place = if env.attempts > 0 || env.snoozes > 0 {
                Place::Front
            } else {
                Place::Behind
            };
            let finish = Finish::room(entry_id, task_id.to_string(), class, place, env.to_json());
            return Err(Box::new(plain(queue, finish, Vec::new())));
        }
        Ok(Admitted {
            queue,
            entry_id,
            env: Box::new(env),
            task_id,
            from_room,
        })
    }

    /// [`Executor::run`], setting `slot` once the task holds a slot of its concurrency key,
    /// and `key` once it holds its idempotency key.
    ///
    /// Everything held here is held for the whole of the task's call, by every task in
    /// flight: keep what lives across the call's await small, and build the rest after it.
    ///
    /// Not an async fn: one holds its arguments twice for the whole of the call (as the
    /// future's and as its body's), and the task's parts would be both `task` and the locals
    /// taken from it. The block captures the parts once.
    fn run_holding<'a>(
        &'a self,
        task: Admitted,
        slot: &'a mut Option<String>,
        key: &'a mut Option<Box<keyed::Held>>,
        turn: Option<&'a RoomTurn<'a>>,
    ) -> impl Future<Output = Finished> + 'a {
        let Admitted {
            queue,
            entry_id,
            mut env,
            task_id,
            from_room,
        } = task;
        async move {
            // What stops its call: a cancel that names it, or the hard stop.
            let watch = self
                .cancels
                .watch(&queue, task_id, &env, entry_ms(&entry_id));
            // An idempotency key: run only holding it; a copy of a task that succeeded is
            // answered with its answer, one of a task still running waits for it.
            if let Some(name) = llmq_shared::idempotency::name_of(&env) {
                match Box::pin(self.take_key(&queue, &entry_id, name, &env)).await {
                    keyed::Taken::Run(held) => {
                        // Its later entries (a retry, a wait, a hand-back) are this run.
                        let run = serde_json::Value::from(held.run.as_str());
                        env.extra
                            .insert(llmq_shared::idempotency::RUN_FIELD.to_owned(), run);
                        *key = Some(held);
                    }
                    keyed::Taken::Copy(finished) => return *finished,
                    keyed::Taken::Parked => return parked(queue, entry_id, task_id),
                    keyed::Taken::Release => return handed_back(queue, entry_id, task_id, &env),
                }
            }

            // A concurrency key: run only with a slot, else wait parked for one.
            if let (Some(key), Some(limit)) = (&env.concurrency_key, env.concurrency_limit) {
                // The envelope goes to Redis only when the task is to be parked.
                let mut taken = Box::pin(self.redis.take_slot(
                    &queue,
                    &self.worker_id,
                    &entry_id,
                    key,
                    limit,
                    None,
                ))
                .await;
                if let Ok(Slot::Full) = taken {
                    let json = env.to_json();
                    let park = self.redis.take_slot(
                        &queue,
                        &self.worker_id,
                        &entry_id,
                        key,
                        limit,
                        Some(&json),
                    );
                    taken = Box::pin(park).await;
                }
                match taken {
                    Ok(Slot::Held) => *slot = Some(key.to_string()),
                    Ok(Slot::Parked | Slot::Lost | Slot::Full) => {
                        return parked(queue, entry_id, task_id);
                    }
                    // Redis is away: the worker's fault, not the task's. Hand it back.
                    Err(e) => {
                        tracing::warn!(task = %task_id, "cannot take a slot of concurrency key `{key}`: {e}");
                        return handed_back(queue, entry_id, task_id, &env);
                    }
                }
            }

            // A constant: the type was checked when the task was parsed.
            let task_type = env.task_type().map_or("", TaskType::as_str);

            // A chain step: its handoffs, candidates and constraints.
            // Futures that run briefly are boxed here and below: an async fn's state is as large
            // as its largest await, and these would otherwise make every task in flight carry
            // their size for the whole of its provider call.
            // Boxed, and none for a task that is no chain's step: a call in flight carries 8
            // bytes of it, not its room.
            let mut step = if env.step.is_some() {
                let prepare = self.prepare_step(&queue, task_id, &env);
                match Box::pin(prepare).await {
                    Ok(step) => Some(Box::new(step)),
                    Err(Ended::Release) => {
                        return handed_back(queue, entry_id, task_id, &env);
                    }
                    Err(Ended::Cancelled(why)) => {
                        let record = running(&queue, task_id, &env, task_type);
                        return cancelled(queue, entry_id, &env, record, why, Vec::new());
                    }
                    Err(Ended::Invalid(why)) => {
                        // Not under the id it claims: that is the real step's, whose result a
                        // copy must not overwrite.
                        let own_id = envelope::derive_id(queue.name(), &entry_id).to_string();
                        return invalid(queue, entry_id, own_id, env.to_json(), why);
                    }
                    Err(Ended::Await(deadline_ms)) => {
                        let record = running(&queue, task_id, &env, task_type);
                        return awaiting(queue, entry_id, &env, record, deadline_ms);
                    }
                }
            } else {
                None
            };
            let settled = step.as_mut().and_then(|s| s.settled.take());

            // Plan.
            let span = tracing::trace_span!(
                target: telemetry::TARGET,
                "llmq.task",
                otel.name = %format_args!("task {task_type}"),
                llmq.task.id = %task_id,
                llmq.task.type = %task_type,
                llmq.queue = queue.name(),
                llmq.chain.id = env.chain_id.as_deref(),
                llmq.attempt = env.attempts + 1,
                llmq.cost_usd = tracing::field::Empty,
            );
            if let Some(parent) = env.traceparent.as_deref()
                && !span.is_disabled()
            {
                telemetry::join_trace(&span, parent);
            }
            // A chain step's call carries the prompt its handoffs made.
            let step_env = step.as_mut().and_then(|s| s.prompt.take()).map(|prompt| {
                Box::new(Envelope {
                    prompt,
                    ..(*env).clone()
                })
            });
            let call_env = step_env.as_deref().unwrap_or(&env);
            // A task that can wait: back from a batch with its answer, or yet to go to one. It
            // reads its latch only where it can have one: an entry a batch sent back (marked as
            // having had its turn, as a handed-back one is) reads it here, before its answer
            // is looked for elsewhere; any other reads it below, only when its plan has a
            // provider with a batch API. One with none costs no read.
            let can_wait = env.deadline.is_some() && settled.is_none() && slot.is_none();
            let mut batch_answer = None;
            // Whether it may go to a batch, once its latch is read.
            let mut may_batch = None;
            if can_wait && from_room {
                match Box::pin(self.latch(&queue, task_id, &env)).await {
                    Ok(Latch::Answered(answer)) => batch_answer = Some(answer),
                    Ok(latch) => may_batch = Some(matches!(latch, Latch::Park)),
                    Err(e) => return unread_latch(queue, entry_id, task_id, &env, &e),
                }
            }
            let mut calls = Vec::new();
            // What learned routing chose, for the record (boxed, as the two below).
            let mut learned = None;
            // The answer cache: the task whose answer this one reuses, or what to keep this
            // one's answer as (boxed: every task in flight carries these through its call).
            let mut cached_from = None;
            let mut to_keep = None;
            // The prompt prefix this task's call warms.
            let mut warming = None;
            let started = Instant::now();
            // The span goes into the attempt's call and comes back out of it: held once, not
            // twice, by every task in flight.
            let (tried, span) = 'tried: {
                if let Some(outcome) = settled {
                    break 'tried (Tried::without_call(*outcome), span);
                }
                if let Some(answer) = &batch_answer {
                    break 'tried (batch::answered(answer, &env), span);
                }
                match answer_cache::use_of(&self.config.answer_cache, queue.name(), call_env) {
                    Use::Off => {}
                    Use::Refused { field, message } => {
                        break 'tried (
                            Tried::without_call(Outcome::Failed(AttemptError {
                                class: ErrorClass::Invalid,
                                message: format!("field `{field}` is wrong: {message}"),
                                tried: Vec::new(),
                                retry_after: None,
                            })),
                            span,
                        );
                    }
                    // A chain step kept off some models or providers (a review distinct from
                    // the work it reviews) is not answered with what any model said.
                    Use::On { .. }
                        if step
                            .as_ref()
                            .is_some_and(|s| s.constraints != NO_CONSTRAINTS) => {}
                    Use::On { ttl } => 'cache: {
                        let share = self.config.answer_cache.share_across_tenants;
                        let Some(hash) = answer_cache::request_hash(call_env, share) else {
                            break 'cache;
                        };
                        // One call for concurrent identical requests, unless the task holds a
                        // concurrency key's slot already or may wait for a provider batch.
                        let flight = slot.is_none() && env.deadline.is_none();
                        let look = self.look_up(&queue, &entry_id, &hash, flight, &env);
                        match Box::pin(look).await {
                            cache::Looked::Hit(answer) => {
                                let (tried, row) =
                                    cache::hit(&answer, &queue, &env, task_type, &self.worker_id);
                                calls.push(row);
                                cached_from = Some(Box::new(answer.task_id));
                                break 'tried (tried, span);
                            }
                            cache::Looked::Lead => {
                                *slot = Some(flight_key(&answer_name(&hash)));
                                to_keep = Some(Box::new((hash, ttl)));
                            }
                            cache::Looked::Call => to_keep = Some(Box::new((hash, ttl))),
                            cache::Looked::Parked => {
                                return parked(queue, entry_id, task_id);
                            }
                            cache::Looked::Release => {
                                return handed_back(queue, entry_id, task_id, &env);
                            }
                        }
                    }
                }
                let stats = self.learned_stats();
                let stats = stats.as_deref().unwrap_or(&NO_STATS);
                let constraints = step.as_deref().map_or(&NO_CONSTRAINTS, |s| &s.constraints);
                let mut plan = match routing::plan(&self.config, call_env, constraints, stats) {
                    Ok(plan) => plan,
                    Err(e) => {
                        break 'tried (
                            Tried::without_call(Outcome::Failed(AttemptError {
                                class: ErrorClass::Fatal,
                                message: e.to_string(),
                                tried: Vec::new(),
                                retry_after: None,
                            })),
                            span,
                        );
                    }
                };
                learned = plan.learned.map(|l| {
                    Box::new(LearnedRoute {
                        strategy: l.strategy.as_str().to_owned(),
                        propensity: l.propensity,
                        explored: l.explored,
                        candidates: plan
                            .candidates
                            .iter()
                            .map(|c| format!("{}/{}", c.provider.name, c.model.id))
                            .collect(),
                    })
                });
                if can_wait
                    && may_batch != Some(false)
                    && let Some(to) = batch::parkable(&env, &entry_id, &plan)
                {
                    let latch = match may_batch {
                        Some(_) => Latch::Park,
                        None => match Box::pin(self.latch(&queue, task_id, &env)).await {
                            Ok(latch) => latch,
                            Err(e) => return unread_latch(queue, entry_id, task_id, &env, &e),
                        },
                    };
                    match latch {
                        Latch::Park => {
                            // (A request with no batch form is called now.)
                            if let Some(park) = batch::parking(&env, call_env, &to) {
                                tracing::debug!(task = %task_id, group = park.group, "parking the task for a provider batch");
                                let park = Box::new(park);
                                let write = Write::Park {
                                    entry_id,
                                    task_id: task_id.to_string(),
                                    park,
                                };
                                return Finished::new(queue, write, Vec::new());
                            }
                        }
                        // Only an entry put in the stream by hand carries its answer unmarked.
                        // The batch answered it, not this plan's route.
                        Latch::Answered(answer) => {
                            let tried = batch::answered(&answer, &env);
                            batch_answer = Some(answer);
                            learned = None;
                            break 'tried (tried, span);
                        }
                        Latch::Call => {}
                    }
                }
                // A prompt prefix a provider caches: its calls go to the model whose cache holds
                // it warm; while nobody's does, one call warms it before the rest are sent.
                if let Some(hash) = self.warm_prefix(call_env, &plan) {
                    let flight = slot.is_none();
                    match Box::pin(self.warm_up(&queue, &entry_id, &hash, flight, &env)).await {
                        cache::Warm::On(model) => cache::pin(&mut plan, &model),
                        cache::Warm::Cold => {
                            if flight {
                                *slot = Some(flight_key(&warm_name(&hash)));
                                warming = Some(Box::new(hash));
                            }
                        }
                        cache::Warm::Parked => {
                            return parked(queue, entry_id, task_id);
                        }
                        cache::Warm::Release => {
                            return handed_back(queue, entry_id, task_id, &env);
                        }
                    }
                }
                // Attempt.
                // Set while a call waits for its ledger row or its rate-limit window, not sent.
                let waiting = std::sync::atomic::AtomicBool::new(false);
                let mut attempt = Attempt {
                    exec: self,
                    delivery: Uuid::new_v4(),
                    env: call_env,
                    queue: &queue,
                    entry_id: &entry_id,
                    task_type,
                    number: env.attempts + 1,
                    calls: &mut calls,
                    waiting: &waiting,
                    turn,
                    stop: watch.token(),
                };
                let (ran, span) = {
                    let run = tokio::time::timeout(self.attempt_timeout, attempt.run(&plan));
                    let mut run = std::pin::pin!(run.instrument(span));
                    let ran = run.as_mut().await;
                    (ran, run.span().clone())
                };
                let tried = match ran {
                    Ok(tried) => tried,
                    Err(_)
                        if waiting.load(std::sync::atomic::Ordering::Relaxed)
                            && calls.iter().all(|c| c.outcome == UNSENT) =>
                    {
                        // The attempt's first call waited past its time for its ledger row or its
                        // rate-limit window: nothing was sent, and neither the task nor a provider
                        // is at fault. The task goes back to its queue with its attempts as they
                        // were.
                        tracing::warn!(
                            task_id = %task_id,
                            "a call waited past --attempt-timeout for its ledger row or its rate-limit window, unsent; handing the task back"
                        );
                        Tried::without_call(Outcome::Released)
                    }
                    Err(_) => self.timed_out(plan.reason.clone(), &calls),
                };
                (tried, span)
            };
            let StepPlan {
                constraints,
                reading,
                rework,
                escalation,
                judged,
                seen,
                ..
            } = step.map(|s| *s).unwrap_or_default();
            let mut record = running(&queue, task_id, &env, task_type);
            record.duration_ms = started.elapsed().as_millis() as u64;
            record.learned = learned.map(|l| *l);
            record.route = Some(tried.route).filter(|r| !r.is_empty());
            record.provider_errors = tried.errors;
            // What to keep once the outcome is written: the model's answer as it came (a chain
            // step reads it again on a hit), or which model's prompt cache the call warmed.
            let mut keep = match (to_keep, warming, &tried.outcome, &tried.last) {
                (Some(to_keep), _, Outcome::Answered(c), Some(last)) => {
                    let task_id = task_id.to_string();
                    cache::keep(*to_keep, c, &task_id, last, &calls, self.max_payload_bytes)
                }
                (None, Some(hash), Outcome::Answered(_), Some(last))
                    if self.caches_prompts(last) =>
                {
                    Some(cache::warmed(&hash, last))
                }
                _ => None,
            };
            record.cached_from = cached_from.map(|id| *id);
            record.cached = record.cached_from.is_some();
            if let Some((provider, model)) = tried.last {
                record.provider = Some(provider);
                record.model = Some(model);
            }
            // A fold from 0.0: an empty f64 sum is -0.0.
            record.cost_usd = calls.iter().map(|c| c.cost_usd).fold(0.0, |a, b| a + b);
            if let Some(answer) = &batch_answer {
                record.cost_usd += answer.cost_usd;
            }
            span.record("llmq.cost_usd", record.cost_usd);
            // A judge's pick, a review's verdict.
            let outcome = match (tried.outcome, &reading) {
                (Outcome::Answered(c), Some(read)) => chain::read(read, c),
                (outcome, _) => outcome,
            };
            // An answer its step could not read (a judge naming no candidate) is not kept: its
            // retry must not be given it again.
            if !matches!(outcome, Outcome::Answered(_)) && keep.as_ref().is_some_and(|k| k.counted)
            {
                keep = None;
            }
            // A review's or check's verdict on the work it judged, for learned routing.
            let verdict = judged
                .and_then(|id| Uuid::parse_str(&id).ok())
                .and_then(|task_id| match &outcome {
                    Outcome::Answered(_) => Some(Verdict {
                        task_id,
                        approved: true,
                    }),
                    Outcome::Rejected(_) => Some(Verdict {
                        task_id,
                        approved: false,
                    }),
                    _ => None,
                });

            // A cancel stopped it: it ends so, with what its calls cost.
            if matches!(outcome, Outcome::Released) && watch.cancelled() {
                let named = Named::of(task_id, &env, entry_ms(&entry_id), true);
                let why = (self.cancels.why(&queue, named)).unwrap_or_else(|| "cancelled".into());
                return cancelled(queue, entry_id, &env, record, why, calls);
            }

            // Decide.
            let policy = Policy {
                retry: RetryPolicy::new(self.retry_base, self.retry_max),
                max_wait: self.config.routing.max_wait,
            };
            let state = TaskState {
                attempts: env.attempts,
                max_attempts: env.max_attempts(),
                waiting_since: env.waiting_since,
            };
            // Each rung starts from the higher of the failed model's tier and the round's
            // minimum, so it is a tier higher than the last.
            let failed_tier = record
                .provider
                .as_deref()
                .and_then(|p| self.config.provider(p))
                .zip(record.model.as_deref())
                .and_then(|(p, id)| p.model(id))
                .map(|m| m.tier);
            let rounds = StepRounds {
                rework: rework.map(|r| *r),
                escalation: escalation
                    .map(|up| self.escalation(up, failed_tier.max(env.min_tier), &constraints)),
            };
            let transition = decide::decide(state, &outcome, rounds, &policy, Utc::now());
            let mut finished = apply(
                queue,
                entry_id,
                *env,
                record,
                calls,
                outcome,
                transition,
                &self.read_pause,
            );
            finished.verdict = verdict;
            finished.keep = keep;
            if let Write::Step(_, ended) = &mut finished.write {
                ended.seen = seen;
            }
            finished
        }
    }

    /// Whether `provider`'s `model` caches prompts llmq marks (so a call to it warmed one).
    fn caches_prompts(&self, (provider, model): &(String, String)) -> bool {
        self.config.provider(provider).is_some_and(|p| {
            p.prompt_cache && llmq_shared::provider::min_cached_tokens(p.kind, model).is_some()
        })
    }

    /// The stats a learned strategy routes by; `None` under `cheapest`, which never reads
    /// them (so its tasks do not touch the shared view at all).
    fn learned_stats(&self) -> Option<Arc<Stats>> {
        (self.config.routing.strategy != llmq_shared::config::Strategy::Cheapest)
            .then(|| self.stats.current())
    }

    /// The step's next round one tier above `from`, if it has one and that tier can be
    /// routed; or why not.
    fn escalation(
        &self,
        up: Result<Box<chain::Rework>, String>,
        from: Option<envelope::Tier>,
        constraints: &Constraints,
    ) -> Result<Escalation, String> {
        let mut reruns = up?.reruns;
        let next = reruns
            .first_mut()
            .ok_or_else(|| "the step has no next round".to_owned())?;
        let tier = chain::escalate(&mut next.task, from)?;
        let stats = self.learned_stats();
        routing::plan(
            &self.config,
            &next.task,
            constraints,
            stats.as_deref().unwrap_or(&NO_STATS),
        )
        .map_err(|e| format!("nothing at the {}-tier can take it: {e}", tier.as_str()))?;
        Ok(Escalation { tier, reruns })
    }

    /// A delivery that submits a chain: validated here, expanded by the finisher in one
    /// script; an invalid one is one dead letter whose reason names the step and the problem.
    fn submitted_chain(&self, queue: Arc<QueueKeys>, entry_id: String, spec: &[u8]) -> Finished {
        let parsed = Chain::parse(spec, self.max_payload_bytes, queue.name(), &entry_id).and_then(
            |mut chain| {
                chain.bound_rounds(self.config.chains.max_rounds)?;
                match chain.unknown_check(|c| self.config.checks.contains_key(c)) {
                    Some(e) => Err(e),
                    None => Ok(chain),
                }
            },
        );
        match parsed {
            Ok(chain) => {
                let write = Write::Expand {
                    entry_id,
                    chain: Box::new(chain),
                };
                Finished::new(queue, write, Vec::new())
            }
            Err(e) => {
                let task_id = envelope::derive_id(queue.name(), &entry_id).to_string();
                let raw = envelope::dead_payload(spec, self.max_payload_bytes);
                let error = format!("the chain is invalid: {e}");
                invalid(queue, entry_id, task_id, raw, error)
            }
        }
    }

    /// A chain submitted with an idempotency key that names a chain which ended failed: its
    /// failed and cancelled steps run again, as `llmq chain retry` runs them (its steps that
    /// succeeded keep their outputs). Its expansion then runs nothing: the chain exists.
    /// Every other state of an existing chain is left as it is: a second submission of it is
    /// one chain.
    async fn resubmitted(&self, queue: &QueueKeys, chain: &Chain) {
        let state = match self.redis.chain(queue, &chain.id).await {
            Ok(Some(state)) if state.state == "failed" => state,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(chain = %chain.id, "cannot read the chain this submission's idempotency_key names: {e}");
                return;
            }
        };
        let reruns = match state.retry(None) {
            Ok(reruns) if !reruns.is_empty() => reruns,
            _ => return,
        };
        match self.redis.retry_chain(queue, &chain.id, &reruns).await {
            Ok(Ok(_)) => {
                tracing::info!(chain = %chain.id, "a chain submitted again with its idempotency_key after it failed: its failed steps run again");
            }
            // Another submission retried it first: it runs.
            Ok(Err(_)) => {}
            Err(e) => {
                tracing::warn!(chain = %chain.id, "cannot run the failed chain again: {e}");
            }
        }
    }

    /// The attempt ran past `--attempt-timeout`.
    fn timed_out(&self, route: String, calls: &[CallRow]) -> Tried {
        Tried {
            outcome: Outcome::Failed(AttemptError {
                class: ErrorClass::Retryable,
                message: format!(
                    "the attempt took longer than {:?} (--attempt-timeout) across its providers",
                    self.attempt_timeout
                ),
                tried: Vec::new(),
                retry_after: None,
            }),
            route,
            errors: calls.iter().filter_map(|c| c.error.clone()).collect(),
            last: None,
        }
    }
}

/// Carries out `transition` on the envelope and the record, ready for the finisher.
#[allow(clippy::too_many_arguments)]
fn apply(
    queue: Arc<QueueKeys>,
    entry_id: String,
    mut env: Envelope,
    mut record: TaskRecord,
    calls: Vec<CallRow>,
    outcome: Outcome,
    transition: Transition,
    read_pause: &ReadPause,
) -> Finished {
    let task_id = record.task_id.clone();
    let step = (env.chain_id.as_deref().zip(env.step.as_deref()))
        .map(|(chain, step)| (chain.to_owned(), step.to_owned()));
    // A step's next rounds, for the transitions that run it again.
    let mut reruns = None;
    let finish = match (transition, outcome) {
        (Transition::Done, Outcome::Answered(completion)) => {
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
            Finish::done(entry_id, task_id, record)
        }
        (Transition::Wait { due, .. }, Outcome::Unavailable(u))
            if u.paced && env.class().is_some() =>
        {
            // Only a provider's pace holds it, and its slot is not near: back to its
            // tenant's head in the room, its turn given back (reading it cost the tenant
            // none), where the room's order decides who asks next. The room is not fed here
            // again before then, and fewer of its tasks are held.
            read_pause.pause_until(due, true);
            read_pause.room_handed_back();
            let class = env.class().unwrap_or_default();
            Finish::room(entry_id, task_id, class, Place::Turn, env.to_json())
        }
        (Transition::Wait { due, since }, outcome) => {
            // No provider can be called now: wait without using an attempt. It never
            // spins: the due time is when one may be called again.
            read_pause.pause_until(due, env.class().is_some());
            let (reason, class) = match &outcome {
                Outcome::Unavailable(u) => (u.reason(), u.class),
                _ => (String::new(), ErrorClass::Unavailable),
            };
            if class == ErrorClass::Unavailable {
                metrics::counter!("llmq_tasks_waiting_on_outage_total", "queue" => queue.name().to_owned()).increment(1);
            }
            record.status = Status::Delayed;
            record.attempts = env.attempts;
            record.error = Some(reason.clone());
            record.error_class = Some(class);
            env.last_error = Some(reason.into());
            env.snoozes += 1;
            env.waiting_since = Some(since);
            let due_ms = due.timestamp_millis();
            Finish::retry(entry_id, task_id, due_ms, Some(record), env.to_json())
        }
        (Transition::Retry { due }, outcome) => {
            let error = failure_text(&outcome);
            env.attempts += 1;
            env.waiting_since = None;
            env.last_error = Some(error.as_str().into());
            record.status = Status::Delayed;
            record.error = Some(error);
            record.error_class = failure_class(&outcome);
            let due_ms = due.timestamp_millis();
            Finish::retry(entry_id, task_id, due_ms, Some(record), env.to_json())
        }
        (Transition::Dead { error, class }, _) => {
            if class != ErrorClass::Unavailable {
                env.attempts += 1;
            }
            record.attempts = env.attempts;
            env.last_error = Some(error.as_str().into());
            record.status = Status::Dead;
            record.error = Some(error.clone());
            record.error_class = Some(class);
            record.finished_at = Some(Utc::now());
            Finish::dead(entry_id, task_id, error, class, record, env.to_json())
        }
        (
            Transition::Escalate {
                error,
                class,
                tier,
                reruns: up,
            },
            _,
        ) => {
            // This round failed; the step runs again one tier up.
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
        (
            Transition::Rework {
                findings,
                reruns: back,
            },
            _,
        ) => {
            // The verdict is this task's result; the work runs again with it.
            record.status = Status::Succeeded;
            record.output = Some(findings);
            record.finished_at = Some(Utc::now());
            reruns = Some(back);
            Finish::done(entry_id, task_id, record)
        }
        // Release, and Done without an answer (which decide never gives): hand it back.
        (Transition::Release | Transition::Done, _) => {
            Finish::release(entry_id, task_id, env.to_json())
        }
    };
    // A task that ended (its record is finished) has its row in the ledger's tasks.
    let row = finish
        .record
        .as_ref()
        .is_some_and(|r| r.finished_at.is_some())
        .then(|| RowExtras {
            risk: env.risk,
            batch_id: env.batch_id.as_deref().map(Into::into),
            enqueued_at: env.enqueued_at,
        });
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

/// A task parked in Redis (for a slot of its concurrency key, a provider batch, an
/// identical request's call, a warm-up): nothing to write.
fn parked(queue: Arc<QueueKeys>, entry_id: String, task_id: Uuid) -> Finished {
    let finish = Finish::release(entry_id, task_id.to_string(), String::new());
    Finished {
        parked: true,
        ..plain(queue, finish, Vec::new())
    }
}

/// A task handed back to its queue as it came, without using an attempt: Redis failed, or
/// the worker is at fault.
fn handed_back(queue: Arc<QueueKeys>, entry_id: String, task_id: Uuid, env: &Envelope) -> Finished {
    plain(
        queue,
        Finish::release(entry_id, task_id.to_string(), env.to_json()),
        Vec::new(),
    )
}

/// A task's outcome that moves no chain.
fn plain(queue: Arc<QueueKeys>, finish: Finish, calls: Vec<CallRow>) -> Finished {
    Finished::new(queue, Write::Task(finish), calls)
}

/// What a step's chain records when its task ended for good; `None` while it goes on.
fn step_outcome(finish: &Finish, chain_id: String, step: String) -> Option<StepOutcome> {
    let record = finish.record.as_ref()?;
    let outcome = match finish.kind {
        FinishKind::Done => "succeeded",
        FinishKind::Dead { .. } => "failed",
        FinishKind::Retry { .. } | FinishKind::Release | FinishKind::Room { .. } => return None,
    };
    Some(StepOutcome {
        chain_id,
        step,
        outcome,
        fields: StepState {
            task_id: finish.task_id.clone(),
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

/// The record of a task that is running this attempt.
fn running(queue: &QueueKeys, task_id: Uuid, env: &Envelope, task_type: &str) -> TaskRecord {
    let mut record = TaskRecord::pending(task_id.to_string(), queue.name(), Status::Running);
    record.attempts = env.attempts + 1;
    record.task_type = Some(task_type.to_owned());
    record.chain_id = env.chain_id.as_deref().map(Into::into);
    record
}

/// An approval step's task: acked with a record saying a person decides, the step left
/// awaiting approval.
fn awaiting(
    queue: Arc<QueueKeys>,
    entry_id: String,
    env: &Envelope,
    mut record: TaskRecord,
    deadline_ms: i64,
) -> Finished {
    record.status = Status::Succeeded;
    record.output = Some("handed to a person: llmq chain approve|reject".into());
    record.finished_at = Some(Utc::now());
    let task_id = record.task_id.clone();
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
fn cancelled(
    queue: Arc<QueueKeys>,
    entry_id: String,
    env: &Envelope,
    mut record: TaskRecord,
    why: String,
    calls: Vec<CallRow>,
) -> Finished {
    // An attempt is used only by a call that went out.
    record.attempts = env.attempts + u32::from(calls.iter().any(|c| c.outcome != UNSENT));
    record.status = Status::Cancelled;
    record.error = Some(why.clone());
    record.finished_at = Some(Utc::now());
    metrics::counter!("llmq_tasks_cancelled_total", "queue" => queue.name().to_owned())
        .increment(1);
    let task_id = record.task_id.clone();
    let finish = Finish::done(entry_id, task_id.clone(), record);
    let write = match (env.chain_id.as_deref(), env.step.as_deref()) {
        (Some(chain_id), Some(step)) => {
            let step = StepOutcome {
                chain_id: chain_id.to_owned(),
                step: step.to_owned(),
                outcome: "cancelled",
                fields: StepState {
                    task_id,
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
        row: Some(RowExtras {
            risk: env.risk,
            batch_id: env.batch_id.as_deref().map(Into::into),
            enqueued_at: env.enqueued_at,
        }),
        ..Finished::new(queue, write, calls)
    }
}

/// The time (ms) in a stream entry's id (`<ms>-<seq>`); 0 for any other text.
fn entry_ms(entry_id: &str) -> i64 {
    entry_id
        .split_once('-')
        .and_then(|(ms, _)| ms.parse().ok())
        .unwrap_or(0)
}

fn failure_text(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Failed(e) => e.to_string(),
        Outcome::Unavailable(u) => u.reason(),
        Outcome::Rejected(r) => r.0.clone(),
        Outcome::Answered(_) | Outcome::Released => String::new(),
    }
}

fn failure_class(outcome: &Outcome) -> Option<ErrorClass> {
    match outcome {
        Outcome::Failed(e) => Some(e.class),
        Outcome::Unavailable(u) => Some(u.class),
        Outcome::Rejected(_) => Some(ErrorClass::Fatal),
        Outcome::Answered(_) | Outcome::Released => None,
    }
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
    let finish = Finish::dead(entry_id, task_id, error, ErrorClass::Invalid, record, raw);
    Finished {
        row: Some(RowExtras::default()),
        ..self::plain(queue, finish, Vec::new())
    }
}

//! Runs one task as a pipeline of named phases: admit, key, slot, step, cache, plan, park,
//! warm-up, attempt, decide, apply ([`Executor::run`]). Each phase gives its next one's input
//! or a [`Stop`], the one early end; every fate, before the call or after it, is chosen by
//! `decide`.
//!
//! Layout:
//! - this module: admission and the pipeline, with the key, slot, plan and attempt phases;
//! - `keyed`: the idempotency key a task runs holding;
//! - `chain`: the step phase, what a chain step needs before its call and what its answer
//!   means after; each kind of step a module of its own (`chain::kind` tells them apart);
//! - `cache`: the answer cache and prompt warm-up phases;
//! - `batch`: the park phase, tasks that can wait sent to a provider batch and finished with
//!   its answer;
//! - `attempt`: tries the plan's candidates and says what the attempt came to;
//! - `decide`: turns that (or a stop) into the task's transition, a pure function and the only
//!   place a task's fate is chosen (escalation and a rejection's send-back included);
//! - `apply`: carries a transition out on the envelope and the record, the `Finished` value
//!   for the finisher;
//! - `call_metrics`: the GenAI metrics of each call.
//!
//! Outcomes are not written here: the finisher writes them (ledger first, then one Lua call
//! for a whole batch). Only quota and circuit state is read and written as calls are made.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use llmq_shared::chain::{Chain, StepOutcome};
use llmq_shared::circuit::Circuits;
use llmq_shared::config::Config;
use llmq_shared::envelope::{self, Envelope, TaskType};
use llmq_shared::ids::{EntryId, TaskId};
use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::{CallOutcome, CallRow, Verdict};
use llmq_shared::outcome::{ErrorClass, LearnedRoute, Status, TaskRecord};
use llmq_shared::provider::clients::Clients;
use llmq_shared::queue::{BatchAnswer, Client, Delivery, Finish, Keep, Place, Slot, Write, now_ms};
use llmq_shared::quota::Limiter;
use llmq_shared::retry::RetryPolicy;
use llmq_shared::routing::{self, Constraints, Stats};
use llmq_shared::telemetry;
use std::sync::RwLock;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

mod apply;
pub mod attempt;
mod batch;
mod cache;
mod call_metrics;
mod chain;
pub mod decide;
mod keyed;

use apply::{Ending, invalid, plain};
use attempt::{Attempt, AttemptError, Outcome, Tried};
pub use batch::Batchers;
use batch::Latch;
pub use call_metrics::CallMetrics;
use chain::StepPlan;
use decide::{Escalation, Policy, StepRounds, Stop, TaskState, Transition};

use crate::cancels::Named;
use crate::finished::{CallStarts, Finished};

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
    /// Provider calls under way now, for the worker's heartbeat.
    pub calls_in_flight: Arc<std::sync::atomic::AtomicU64>,
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

/// A task parsed from its delivery and ready to run: small, so a task in flight carries it
/// once (its envelope is boxed).
struct Admitted {
    queue: Arc<QueueKeys>,
    entry_id: EntryId,
    env: Box<Envelope>,
    /// As the number, not its text: every task in flight holds it for the whole of its call.
    task_id: TaskId,
    /// The entry was put back by llmq (from the room, a batch, a hand-back), not enqueued.
    from_room: bool,
}

/// A task in its pipeline, once it holds its key: what every phase reads.
struct Task<'a> {
    queue: &'a Arc<QueueKeys>,
    entry_id: EntryId,
    task_id: TaskId,
    env: &'a Envelope,
    task_type: &'static str,
    from_room: bool,
    /// For a task fed from the room: its turn, told when its first call starts.
    turn: Option<&'a RoomTurn<'a>>,
    /// Cancelled when its call must stop: a cancel that names it, or the hard stop.
    stop: &'a CancellationToken,
}

impl Task<'_> {
    /// The task's span, joined to the trace its producer started, if any.
    fn span(&self) -> tracing::Span {
        let (env, task_type) = (self.env, self.task_type);
        let span = tracing::trace_span!(
            target: telemetry::TARGET,
            "llmq.task",
            otel.name = %format_args!("task {task_type}"),
            llmq.task.id = %self.task_id,
            llmq.task.type = %task_type,
            llmq.queue = self.queue.name(),
            llmq.chain.id = env.chain_id.as_deref(),
            llmq.attempt = env.attempts + 1,
            llmq.cost_usd = tracing::field::Empty,
        );
        if let Some(parent) = env.traceparent.as_deref()
            && !span.is_disabled()
        {
            telemetry::join_trace(&span, parent);
        }
        span
    }
}

/// What a task's phases gathered on the way to its outcome, for its record: every task in
/// flight carries it through its call, so all but its calls are in one box, none for most
/// tasks.
#[derive(Default)]
struct Trail {
    /// Every call made, for the ledger.
    calls: Vec<CallRow>,
    more: Option<Box<More>>,
}

/// What some tasks' phases gather besides their calls.
#[derive(Default)]
struct More {
    /// What learned routing chose.
    learned: Option<LearnedRoute>,
    /// The task whose cached answer this one reuses.
    cached_from: Option<TaskId>,
    /// What to keep this task's answer as in the answer cache, and for how long.
    to_keep: Option<(String, Duration)>,
    /// The prompt prefix this task's call warms.
    warming: Option<String>,
    /// What the provider batch that answered it cost.
    batch_cost_usd: f64,
}

impl Trail {
    fn more(&mut self) -> &mut More {
        self.more.get_or_insert_with(Box::default)
    }

    /// The task answered by a provider batch.
    fn batch_answered(&mut self, answer: &BatchAnswer, task: &Task<'_>) -> Tried {
        let more = self.more();
        more.batch_cost_usd = answer.cost_usd;
        // The batch answered it, not a plan's route.
        more.learned = None;
        batch::answered(answer, task.env)
    }

    /// What to keep once the outcome is written: the model's answer as it came (a chain
    /// step reads it again on a hit), or which model's prompt cache the call warmed.
    fn keep(
        &mut self,
        exec: &Executor,
        task_id: TaskId,
        outcome: &Outcome,
        last: Option<&(String, String)>,
    ) -> Option<Box<Keep>> {
        let (Outcome::Answered(c), Some(last), Some(more)) = (outcome, last, &mut self.more) else {
            return None;
        };
        match (more.to_keep.take(), more.warming.take()) {
            (Some(to_keep), _) => cache::keep(
                to_keep,
                c,
                task_id,
                last,
                &self.calls,
                exec.max_payload_bytes,
            ),
            (None, Some(hash)) if exec.caches_prompts(last) => Some(cache::warmed(&hash, last)),
            _ => None,
        }
    }

    /// The task's record after its attempt: its route, model, cost and time.
    fn record(
        &mut self,
        mut record: TaskRecord,
        route: String,
        errors: Vec<String>,
        last: Option<(String, String)>,
        started: Instant,
    ) -> TaskRecord {
        let more = self.more.take().map(|m| *m).unwrap_or_default();
        record.duration_ms = started.elapsed().as_millis() as u64;
        record.learned = more.learned;
        record.route = Some(route).filter(|r| !r.is_empty());
        record.provider_errors = errors;
        record.cached_from = more.cached_from;
        record.cached = record.cached_from.is_some();
        if let Some((provider, model)) = last {
            record.provider = Some(provider);
            record.model = Some(model);
        }
        // A fold from 0.0: an empty f64 sum is -0.0.
        record.cost_usd = self
            .calls
            .iter()
            .map(|c| c.cost_usd)
            .fold(0.0, |a, b| a + b);
        record.cost_usd += more.batch_cost_usd;
        record
    }
}

/// What a task came to before its attempt: an outcome without one (a step's, a batch's or
/// the cache's answer, no route), or the plan its attempt tries.
// One per task, built and taken apart at once: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
enum Before<'p> {
    Settled(Tried),
    Call(routing::Plan<'p>),
}

/// What a task's attempt came to, with its span and its chain step's plan.
struct Ran {
    tried: Tried,
    span: tracing::Span,
    step: Option<Box<StepPlan>>,
}

/// What goes with the write of a task that ran.
struct After {
    verdict: Option<Verdict>,
    keep: Option<Box<Keep>>,
    seen: Option<Box<llmq_shared::chain::Seen>>,
}

/// A review's or check's verdict on the task whose work it judged, for learned routing.
fn verdict(judged: Option<TaskId>, outcome: &Outcome) -> Option<Verdict> {
    let task_id = judged?.uuid();
    let approved = match outcome {
        Outcome::Answered(_) => true,
        Outcome::Rejected(_) => false,
        _ => return None,
    };
    Some(Verdict { task_id, approved })
}

impl Executor {
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
                let holder = held.holder(finish.task_id);
                finish.end_key(held.name, holder, held.window);
            }
            // A batch's task that ended (it has its ledger row then) counts as finished.
            if let Some(row) = &finished.row {
                finish.batch_id.clone_from(&row.batch_id);
            }
        }
        finished
    }

    /// Parses a delivery, or says where it goes instead of running: a chain to expand, a
    /// dead letter (a payload that is not a task), a task that waits for its `run_at` or for
    /// its turn in the room. A cancel that names it is a fate: `decide` chooses it, as every
    /// other. The raw payload is dropped here, so a task's prompt is not held twice during
    /// its call.
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
            let task_id = envelope::derive_id(queue.name(), entry_id);
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
                    envelope::task_id_of(queue.name(), entry_id, &payload)
                } else {
                    envelope::derive_id(queue.name(), entry_id)
                };
                let raw = envelope::dead_payload(&payload, self.max_payload_bytes);
                let step = readable
                    .then(|| envelope::chain_step_of(&payload))
                    .flatten();
                let mut finished = invalid(queue, entry_id, task_id, raw, e.to_string());
                // A chain step's task refused here still ends its step, so its chain ends;
                // the step script applies it only for the step's current, queued task.
                if let (Some((chain_id, step)), Write::Task(finish)) = (step, &finished.write) {
                    let failed = StepOutcome::failed(chain_id, step, task_id, e.to_string());
                    finished.write = Write::Step(finish.clone(), Box::new(failed));
                }
                return Err(Box::new(finished));
            }
        };
        let task_id = env.id_or_derive(queue.name(), entry_id);
        env.id = Some(task_id);
        // When it was enqueued, kept wherever it goes next (the room, a wait): what a
        // tenant's cancel compares.
        let entry_ms = entry_ms(entry_id);
        if env.enqueued_at.is_none() && !from_room {
            env.enqueued_at = chrono::DateTime::from_timestamp_millis(entry_ms);
        }
        let named = Named::of(task_id, &env, entry_ms, env.attempts > 0);
        if let Some(why) = self.cancels.why(&queue, named) {
            let record = running(&queue, task_id, &env);
            let ending = Ending {
                queue,
                entry_id,
                task_id,
                env,
                record,
                calls: Vec::new(),
            };
            // A fate, chosen where every other is.
            let transition = decide::stopped(Stop::Cancelled(why));
            return Err(Box::new(apply::apply(ending, transition, &self.read_pause)));
        }

        if let Some(run_at) = env.run_at {
            let due_ms = run_at.timestamp_millis();
            if due_ms > now_ms() + 5 {
                // Enqueued straight into the stream with a future run_at: wait in delayed.
                let finish = Finish::retry(entry_id, task_id, due_ms, None, env.to_json());
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
            let finish = Finish::room(entry_id, task_id, class, place, env.to_json());
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
    /// and `key` once it holds its idempotency key. Its pipeline: key, then [`Self::phases`]
    /// (slot, step, cache, plan, park, warm-up, attempt), then decide and apply. A phase
    /// gives its next one's input or a [`Stop`], which `decide` turns into the task's
    /// transition as it does an attempt's outcome.
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
                .watch(&queue, task_id, &env, entry_ms(entry_id));
            let started = Instant::now();
            let keyed = self.key(&queue, (entry_id, task_id), &mut env, key).await;
            let mut trail = Trail::default();
            let task = Task {
                queue: &queue,
                entry_id,
                task_id,
                env: &env,
                // A constant: the type was checked when the task was parsed.
                task_type: env.task_type().map_or("", TaskType::as_str),
                from_room,
                turn,
                stop: watch.token(),
            };
            let ran = match keyed {
                Err(stop) => Err(stop),
                // Moved and dropped: not held across the call.
                ok => {
                    drop(ok);
                    self.phases(task, slot, &mut trail).await
                }
            };
            let record = running(&queue, task_id, &env);
            let (transition, record, after) = match ran {
                Err(stop) => (decide::stopped(stop), record, None),
                Ok(ran) => {
                    let cancelled = watch.cancelled().then(|| {
                        let named = Named::of(task_id, &env, entry_ms(entry_id), true);
                        (self.cancels.why(&queue, named)).unwrap_or_else(|| "cancelled".into())
                    });
                    self.decide(&env, record, ran, &mut trail, cancelled, started)
                }
            };
            let calls = std::mem::take(&mut trail.calls);
            let ending = Ending {
                queue,
                entry_id,
                task_id,
                env: *env,
                record,
                calls,
            };
            let mut finished = apply::apply(ending, transition, &self.read_pause);
            if let Some(after) = after {
                finished.verdict = after.verdict;
                finished.keep = after.keep;
                if let Write::Step(_, ended) = &mut finished.write {
                    ended.seen = after.seen;
                }
            }
            finished
        }
    }

    /// The key phase: a task with an idempotency key runs only holding it; a copy of a task
    /// that succeeded is answered with its answer, one of a task still running waits for it.
    /// The only phase that changes the envelope: its later entries (a retry, a wait, a
    /// hand-back) are this run.
    async fn key(
        &self,
        queue: &Arc<QueueKeys>,
        (entry_id, task_id): (EntryId, TaskId),
        env: &mut Envelope,
        key: &mut Option<Box<keyed::Held>>,
    ) -> Result<(), Stop> {
        let Some(name) = llmq_shared::idempotency::name_of(env) else {
            return Ok(());
        };
        let held = Box::pin(self.take_key(queue, (entry_id, task_id), name, env)).await?;
        let run = serde_json::Value::from(held.run.as_str());
        env.extra
            .insert(llmq_shared::idempotency::RUN_FIELD.to_owned(), run);
        *key = Some(held);
        Ok(())
    }

    /// The phases from the slot to the attempt: what the task's attempt came to, or where
    /// it stopped before one.
    ///
    /// Not an async fn, as `run_holding` is not: the block holds its arguments once, and
    /// owns the task.
    #[allow(clippy::manual_async_fn)]
    fn phases<'a>(
        &'a self,
        task: Task<'a>,
        slot: &'a mut Option<String>,
        trail: &'a mut Trail,
    ) -> impl Future<Output = Result<Ran, Stop>> + 'a {
        async move {
            let task = &task;
            self.slot(task, slot).await?;
            // A chain step: its handoffs, candidates and constraints. Futures that run briefly
            // are boxed here and below: an async fn's state is as large as its largest await,
            // and these would otherwise make every task in flight carry their size for the
            // whole of its provider call. Boxed, and none for a task that is no chain's step: a
            // call in flight carries 8 bytes of it, not its room.
            let mut step = match task.env.step {
                Some(_) => Some(Box::new(Box::pin(self.step(task)).await?)),
                None => None,
            };
            let settled = step.as_mut().and_then(|s| s.settled.take());
            let span = task.span();
            // A chain step's call carries the prompt its handoffs made.
            let step_env = step.as_mut().and_then(|s| s.prompt.take()).map(|prompt| {
                Box::new(Envelope {
                    prompt,
                    ..task.env.clone()
                })
            });
            let call_env = step_env.as_deref().unwrap_or(task.env);
            // The span goes into the attempt's call and comes back out of it: held once, not
            // twice, by every task in flight.
            if let Some(outcome) = settled {
                let tried = Tried::without_call(*outcome);
                return Ok(Ran { tried, span, step });
            }
            let before = self.before_call(task, call_env, step.as_deref(), slot, trail);
            // A temporary, not a local: only the plan lives on through the call.
            let plan = match Box::pin(before).await? {
                Before::Settled(tried) => return Ok(Ran { tried, span, step }),
                Before::Call(plan) => plan,
            };
            // Attempt: the plan's candidates tried within `--attempt-timeout`. Set while a
            // call waits for its ledger row or its rate-limit window, not sent.
            let waiting = AtomicBool::new(false);
            let (ran, span) = {
                let mut attempt = self.attempt(task, call_env, &mut trail.calls, &waiting);
                let run = tokio::time::timeout(self.attempt_timeout, attempt.run(&plan));
                let mut run = std::pin::pin!(run.instrument(span));
                let ran = run.as_mut().await;
                (ran, run.span().clone())
            };
            let tried = self.attempted(task, ran, &waiting, &plan, &trail.calls);
            Ok(Ran { tried, span, step })
        }
    }

    /// The slot phase: a task with a concurrency key runs only with a slot, else waits
    /// parked for one.
    async fn slot(&self, task: &Task<'_>, slot: &mut Option<String>) -> Result<(), Stop> {
        let (Some(key), Some(limit)) = (&task.env.concurrency_key, task.env.concurrency_limit)
        else {
            return Ok(());
        };
        let (queue, worker, entry_id) = (task.queue, &self.worker_id, task.entry_id);
        let take = self
            .redis
            .take_slot(queue, worker, entry_id, key, limit, None);
        let mut taken = Box::pin(take).await;
        if let Ok(Slot::Full) = taken {
            // The envelope goes to Redis only when the task is to be parked.
            let json = task.env.to_json();
            let park = self
                .redis
                .take_slot(queue, worker, entry_id, key, limit, Some(&json));
            taken = Box::pin(park).await;
        }
        match taken {
            Ok(Slot::Held) => {
                *slot = Some(key.to_string());
                Ok(())
            }
            Ok(Slot::Parked | Slot::Lost | Slot::Full) => Err(Stop::Parked),
            // Redis is away: the worker's fault, not the task's. Hand it back.
            Err(e) => {
                tracing::warn!(task = %task.task_id, "cannot take a slot of concurrency key `{key}`: {e}");
                Err(Stop::HandedBack)
            }
        }
    }

    /// The phases of a task that makes a call, up to its attempt: cache, plan, park,
    /// warm-up. Boxed by its caller: it is over before the call starts, so a call in flight
    /// carries none of its state.
    async fn before_call<'a>(
        &'a self,
        task: &Task<'_>,
        call_env: &Envelope,
        step: Option<&StepPlan>,
        slot: &mut Option<String>,
        trail: &mut Trail,
    ) -> Result<Before<'a>, Stop> {
        // A task that can wait: back from a batch with its answer, or yet to go to one. It
        // reads its latch only where it can have one: an entry a batch sent back (marked as
        // having had its turn, as a handed-back one is) reads it here, before its answer is
        // looked for elsewhere; any other reads it in the park phase, only when its plan has
        // a provider with a batch API. One with none costs no read.
        let can_wait = task.env.deadline.is_some() && slot.is_none();
        // Whether it may go to a batch, once its latch is read.
        let mut may_batch = None;
        if can_wait && task.from_room {
            match self.latch(task.queue, task.task_id, task.env).await? {
                Latch::Answered(answer) => {
                    return Ok(Before::Settled(trail.batch_answered(&answer, task)));
                }
                Latch::Cancelled(why) => return Err(Stop::Cancelled(why)),
                latch => may_batch = Some(matches!(latch, Latch::Park)),
            }
        }
        if let Some(tried) = self.cached(task, call_env, step, slot, trail).await? {
            return Ok(Before::Settled(tried));
        }
        let mut plan = match self.plan(call_env, step, trail) {
            Ok(plan) => plan,
            Err(e) => {
                let failed = Outcome::Failed(AttemptError {
                    class: ErrorClass::Fatal,
                    message: e.to_string(),
                    tried: Vec::new(),
                    retry_after: None,
                });
                return Ok(Before::Settled(Tried::without_call(failed)));
            }
        };
        if can_wait
            && may_batch != Some(false)
            && let Some(tried) = self.park(task, call_env, &plan, may_batch, trail).await?
        {
            return Ok(Before::Settled(tried));
        }
        self.warm(task, call_env, &mut plan, slot, trail).await?;
        Ok(Before::Call(plan))
    }

    /// The plan phase: the candidates routing picks for `call_env`, or why it has none.
    fn plan(
        &self,
        call_env: &Envelope,
        step: Option<&StepPlan>,
        trail: &mut Trail,
    ) -> Result<routing::Plan<'_>, routing::RouteError> {
        let stats = self.learned_stats();
        let stats = stats.as_deref().unwrap_or(&NO_STATS);
        let constraints = step.map_or(&NO_CONSTRAINTS, |s| &s.constraints);
        let plan = routing::plan(&self.config, call_env, constraints, stats)?;
        if let Some(l) = plan.learned {
            trail.more().learned = Some(LearnedRoute {
                strategy: l.strategy.as_str().to_owned(),
                propensity: l.propensity,
                explored: l.explored,
                candidates: plan
                    .candidates
                    .iter()
                    .map(|c| format!("{}/{}", c.provider.name, c.model.id))
                    .collect(),
            });
        }
        Ok(plan)
    }

    /// The attempt phase's [`Attempt`] of `task`, calling with `call_env` and keeping its
    /// calls in `calls`; `waiting` is set while a call waits, unsent.
    fn attempt<'a>(
        &'a self,
        task: &'a Task<'a>,
        call_env: &'a Envelope,
        calls: &'a mut Vec<CallRow>,
        waiting: &'a AtomicBool,
    ) -> Attempt<'a> {
        Attempt {
            exec: self,
            delivery: Uuid::new_v4(),
            env: call_env,
            queue: task.queue,
            task_id: task.task_id,
            entry_id: task.entry_id,
            task_type: task.task_type,
            number: task.env.attempts + 1,
            calls,
            waiting,
            turn: task.turn,
            stop: task.stop,
        }
    }

    /// What an attempt of `plan` came to, `ran` within `--attempt-timeout` or not.
    fn attempted(
        &self,
        task: &Task<'_>,
        ran: Result<Tried, tokio::time::error::Elapsed>,
        waiting: &AtomicBool,
        plan: &routing::Plan<'_>,
        calls: &[CallRow],
    ) -> Tried {
        match ran {
            Ok(tried) => tried,
            Err(_)
                if waiting.load(Ordering::Relaxed)
                    && calls.iter().all(|c| c.outcome == CallOutcome::Unsent) =>
            {
                // The attempt's first call waited past its time for its ledger row or its
                // rate-limit window: nothing was sent, and neither the task nor a provider is
                // at fault. The task goes back to its queue with its attempts as they were.
                tracing::warn!(
                    task_id = %task.task_id,
                    "a call waited past --attempt-timeout for its ledger row or its rate-limit window, unsent; handing the task back"
                );
                Tried::without_call(Outcome::Released)
            }
            Err(_) => self.timed_out(plan.reason.clone(), calls),
        }
    }

    /// The decide phase of a task that ran: its record, what its step makes of its outcome,
    /// and its transition, with what goes with the write.
    fn decide(
        &self,
        env: &Envelope,
        record: TaskRecord,
        ran: Ran,
        trail: &mut Trail,
        cancelled: Option<String>,
        started: Instant,
    ) -> (Transition, TaskRecord, Option<After>) {
        let Ran { tried, span, step } = ran;
        let StepPlan {
            constraints,
            reading,
            rework,
            escalation,
            judged,
            seen,
            ..
        } = step.map(|s| *s).unwrap_or_default();
        let Tried {
            outcome,
            route,
            errors,
            last,
        } = tried;
        let keep = trail.keep(self, record.task_id, &outcome, last.as_ref());
        let record = trail.record(record, route, errors, last, started);
        span.record("llmq.cost_usd", record.cost_usd);
        // A judge's pick, a review's verdict.
        let outcome = match (outcome, &reading) {
            (Outcome::Answered(c), Some(read)) => chain::read(read, c),
            (outcome, _) => outcome,
        };
        // An answer its step could not read (a judge naming no candidate) is not kept: its
        // retry must not be given it again.
        let keep = keep.filter(|k| matches!(outcome, Outcome::Answered(_)) || !k.counted);
        // A review's or check's verdict on the work it judged, for learned routing.
        let verdict = verdict(judged, &outcome);
        let policy = Policy {
            retry: RetryPolicy::new(self.retry_base, self.retry_max),
            max_wait: self.config.routing.max_wait,
        };
        let state = TaskState {
            attempts: env.attempts,
            max_attempts: env.max_attempts(),
            waiting_since: env.waiting_since,
            cancelled,
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
        let transition = decide::decide(state, outcome, rounds, &policy, Utc::now());
        // A cancel ends the task as it stands: nothing of its run goes with the write.
        let after = (!matches!(transition, Transition::Cancel { .. })).then_some(After {
            verdict,
            keep,
            seen,
        });
        (transition, record, after)
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
    fn submitted_chain(&self, queue: Arc<QueueKeys>, entry_id: EntryId, spec: &[u8]) -> Finished {
        let parsed = Chain::parse(spec, self.max_payload_bytes, queue.name(), entry_id).and_then(
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
                let task_id = envelope::derive_id(queue.name(), entry_id);
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
            Ok(Some(state)) if state.state == llmq_shared::chain::ChainStatus::Failed => state,
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

/// The record of a task that is running this attempt.
fn running(queue: &QueueKeys, task_id: TaskId, env: &Envelope) -> TaskRecord {
    // A constant: the type was checked when the task was parsed.
    let task_type = env.task_type().map_or("", TaskType::as_str);
    let mut record = TaskRecord::pending(task_id, queue.name(), Status::Running);
    record.attempts = env.attempts + 1;
    record.task_type = Some(task_type.to_owned());
    record.chain_id = env.chain_id.as_deref().map(Into::into);
    record
}

/// The time (ms) in a stream entry's id (`<ms>-<seq>`).
fn entry_ms(entry_id: EntryId) -> i64 {
    i64::try_from(entry_id.ms()).unwrap_or(i64::MAX)
}

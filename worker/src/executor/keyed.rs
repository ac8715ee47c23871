//! Idempotency keys, as a task meets them: before anything else, a task with a key takes it,
//! or is answered as a copy of the task that succeeded with it, or parks until the task
//! holding it ends. The rules are `llmq_shared::idempotency`; the Redis side is
//! `llmq_shared::queue::Keyed`.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use llmq_shared::envelope::Envelope;
use llmq_shared::idempotency;
use llmq_shared::ids::{EntryId, TaskId};
use llmq_shared::keys::QueueKeys;
use llmq_shared::outcome::{Status, TaskRecord};
use llmq_shared::queue::{Finish, Keyed, holder};

use super::Executor;
use super::decide::Stop;
use crate::finished::Finished;

/// A key a task's run holds: it runs as run `run` (the entry that first took the key),
/// holding key `name`, which it ends (remembered `window` once it succeeds).
pub(super) struct Held {
    pub name: String,
    pub run: String,
    pub window: Duration,
}

impl Held {
    /// The key's value while this run holds it.
    pub fn holder(&self, task_id: TaskId) -> String {
        holder(task_id, &self.run)
    }
}

impl Executor {
    /// Takes the key of `env` (which has one, named `name`) for delivery `entry_id`; or
    /// the task stops: a copy of a task that succeeded (answered with its answer), parked
    /// behind the task holding the key, or handed back (Redis failed, or the entry is no
    /// longer ours).
    pub(super) async fn take_key(
        &self,
        queue: &Arc<QueueKeys>,
        (entry_id, task_id): (EntryId, TaskId),
        name: String,
        env: &Envelope,
    ) -> Result<Box<Held>, Stop> {
        let replay = env.replays > 0;
        let run = idempotency::run_of(env, entry_id);
        let mine = holder(task_id, &run);
        let take = |envelope: Option<String>| {
            let (name, mine) = (&name, &mine);
            async move {
                self.redis
                    .take_key(
                        queue,
                        &self.worker_id,
                        entry_id,
                        name,
                        mine,
                        idempotency::HOLD,
                        replay,
                        envelope.as_deref(),
                    )
                    .await
            }
        };
        let mut taken = take(None).await;
        if let Ok(Keyed::Busy) = taken {
            // The envelope goes to Redis only when the task is to be parked.
            taken = take(Some(env.to_json())).await;
        }
        match taken {
            Ok(Keyed::Run) => {
                let window = idempotency::window(&self.config.idempotency, queue.name(), env);
                Ok(Box::new(Held { name, run, window }))
            }
            Ok(Keyed::Copy(record)) => match serde_json::from_str::<TaskRecord>(&record) {
                Ok(first) => {
                    metrics::counter!("llmq_duplicates_total", "queue" => queue.name().to_owned())
                        .increment(1);
                    // The same task sent again (its own id): its record is the first's, and
                    // stays as it is.
                    let finished = if first.task_id == task_id {
                        let ack = Finish::ack(entry_id, task_id);
                        super::apply::plain(Arc::clone(queue), ack, Vec::new())
                    } else {
                        copy(Arc::clone(queue), (entry_id, task_id), env, first)
                    };
                    Err(Stop::Duplicate(Box::new(finished)))
                }
                Err(e) => {
                    // Not a record this build reads: hand it back rather than run it twice.
                    tracing::warn!(
                        queue = queue.name(),
                        task = %task_id,
                        "the record of the task holding this task's idempotency key cannot be read; handing the task back: {e}"
                    );
                    Err(Stop::HandedBack)
                }
            },
            Ok(Keyed::Parked | Keyed::Lost) => Err(Stop::Parked),
            Ok(Keyed::Busy) => Err(Stop::HandedBack),
            Err(e) => {
                tracing::warn!(
                    queue = queue.name(),
                    task = %task_id,
                    "cannot take the task's idempotency key; handing it back: {e}"
                );
                Err(Stop::HandedBack)
            }
        }
    }
}

/// A copy's end: succeeded with `first`'s answer, marked `duplicate_of` it, $0, no call and
/// no attempt. Not in the ledger: nothing ran.
fn copy(
    queue: Arc<QueueKeys>,
    (entry_id, task_id): (EntryId, TaskId),
    env: &Envelope,
    first: TaskRecord,
) -> Finished {
    let mut record = TaskRecord::pending(task_id, queue.name(), Status::Succeeded);
    record.task_type = env.task_type().ok().map(|t| t.to_string());
    record.chain_id = env.chain_id.as_deref().map(Into::into);
    record.route = Some(format!(
        "answered with task {}'s answer: the same idempotency_key",
        first.task_id
    ));
    record.provider = first.provider;
    record.model = first.model;
    record.output = first.output;
    record.json = first.json;
    record.tool_calls = first.tool_calls;
    record.duplicate_of = Some(first.task_id);
    record.finished_at = Some(Utc::now());
    let mut finish = Finish::done(entry_id, task_id, record);
    // It has no ledger row, but it ended: it counts toward its batch's progress.
    finish.batch_id = env.batch_id.as_deref().map(Into::into);
    super::apply::plain(queue, finish, Vec::new())
}

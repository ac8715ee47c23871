//! Finishing tasks: a batch of outcomes in one script (plain tasks, chain steps and what
//! their chains do next, submitted chains), and promoting due delayed tasks.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, ScriptInvocation};

use super::{BatchPark, Client, Finish, FinishKind, Result, now_ms};
use crate::chain::{Chain, Rerun, StepOutcome};
use crate::ids::{EntryId, TaskId};
use crate::keys::{GROUP, QueueKeys};
use crate::outcome::TaskRecord;

static FINISH: LazyLock<Script> = LazyLock::new(|| {
    // The ops other than a plain task's success, and the helpers they use, are one function
    // that a call runs only when its batch has such an item: a Lua script makes every
    // function it defines on every call, and a batch of plain successes needs none.
    Script::new(concat!(
        "local function ops()\n",
        include_str!("lua/room.lua"),
        include_str!("lua/slots.lua"),
        include_str!("lua/settle.lua"),
        include_str!("lua/advance.lua"),
        include_str!("lua/rerun.lua"),
        include_str!("lua/batch_back.lua"),
        include_str!("finish_ops.lua"),
        "end\n",
        include_str!("finish.lua")
    ))
});
static PROMOTE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("promote.lua")));

impl Client {
    /// Moves up to `limit` due delayed tasks to the stream. Returns how many moved and when
    /// the next one is due (ms since the epoch).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn promote(&self, keys: &QueueKeys, limit: usize) -> Result<(u64, Option<i64>)> {
        let mut c = self.conn().await?;
        let (moved, next): (u64, i64) = PROMOTE
            .key(keys.delayed())
            .key(keys.stream())
            .arg(now_ms())
            .arg(limit)
            .invoke_async(&mut c)
            .await?;
        Ok((moved, (next >= 0).then_some(next)))
    }

    /// Writes a batch of outcomes of one queue in one script: plain tasks', chain steps'
    /// (with what their chains do next) and submitted chains alike. Returns, per item,
    /// whether it was applied (`false`: the entry was no longer this consumer's, so nothing
    /// of it was written). Each entry is checked against the consumer's pending list; see
    /// [`Client::write_as`] for a worker's first try.
    ///
    /// # Errors
    /// Redis fails; then nothing of the batch was applied.
    pub async fn write(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        result_ttl: Duration,
        items: &[Write],
    ) -> Result<Vec<bool>> {
        self.write_as(keys, consumer, None, result_ttl, items).await
    }

    /// [`Client::write`] by a worker whose process joined the queue's intact consumers as
    /// `run` ([`Client::join_intact`]): while no takeover has removed it, each entry it was
    /// given is still its own or already acked and deleted, so the script acks the batch's
    /// entries first and looks each up only when fewer were pending than there are, instead
    /// of listing what the consumer holds (`finish.lua`). The items' entries must be ones
    /// this consumer was given. `None`: as [`Client::write`].
    ///
    /// # Errors
    /// Redis fails; then nothing of the batch was applied.
    pub async fn write_as(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        run: Option<&str>,
        result_ttl: Duration,
        items: &[Write],
    ) -> Result<Vec<bool>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let entries = || items.iter().map(Write::entry_id);
        let lowest = entries()
            .min()
            .map_or_else(|| "-".into(), |id| id.to_string());
        let highest = entries()
            .max()
            .map_or_else(|| "+".into(), |id| id.to_string());
        let mut inv = FINISH.key(keys.stream());
        inv.key(keys.delayed()).key(keys.dead()).key(keys.intact());
        inv.arg(GROUP)
            .arg(consumer)
            .arg(result_ttl.as_secs().max(1))
            .arg(now_ms())
            .arg(lowest)
            .arg(highest)
            .arg(run.unwrap_or(""));
        for item in items {
            item.push(keys, &mut inv);
        }
        let mut c = self.conn().await?;
        let applied: Vec<i64> = inv.invoke_async(&mut c).await?;
        Ok(applied.into_iter().map(|a| a == 1).collect())
    }
}

/// One outcome for [`Client::write`]: what becomes of a delivery, and of its chain.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// A task's outcome.
    Task(Finish),
    /// A chain step's task ended: its chain records the step and moves along.
    Step(Finish, Box<StepOutcome>),
    /// An approval step's task: the step waits for a person until `deadline_ms`.
    Await {
        finish: Finish,
        chain_id: String,
        step: String,
        deadline_ms: i64,
    },
    /// Step `step` sends work back (a rejection) or escalates: `reruns` run again, each in
    /// its next round.
    Rerun {
        finish: Finish,
        chain_id: String,
        step: String,
        reruns: Vec<Rerun>,
    },
    /// Entry `entry_id` submitted this chain: expand it (once per chain id).
    Expand {
        entry_id: EntryId,
        chain: Box<Chain>,
    },
    /// The task waits for a provider batch: parked with what the batch needs, its entry
    /// acked. A task parked before (this entry is a copy) is only acked; with no scheduler
    /// sending the queue's batches, it goes back to the stream to be called as usual.
    Park {
        entry_id: EntryId,
        task_id: TaskId,
        park: Box<super::BatchPark>,
    },
}

impl Write {
    /// The stream entry this outcome acks.
    #[must_use]
    pub fn entry_id(&self) -> EntryId {
        match self {
            Self::Expand { entry_id, .. } | Self::Park { entry_id, .. } => *entry_id,
            Self::Task(f) | Self::Step(f, _) => f.entry_id,
            Self::Await { finish, .. } | Self::Rerun { finish, .. } => finish.entry_id,
        }
    }

    /// The task's own outcome; `None` for a submitted chain and a parked task.
    #[must_use]
    pub fn finish(&self) -> Option<&Finish> {
        match self {
            Self::Expand { .. } | Self::Park { .. } => None,
            Self::Task(f) | Self::Step(f, _) => Some(f),
            Self::Await { finish, .. } | Self::Rerun { finish, .. } => Some(finish),
        }
    }

    /// Adds this item to `inv` as `finish.lua` reads it: its op, how many keys and args it
    /// has, then its keys and args. Borrowed where they can be: a task's envelope is not
    /// copied on its way to Redis.
    fn push(&self, keys: &QueueKeys, inv: &mut ScriptInvocation<'_>) {
        match self {
            // The common item, in three args: no kind, envelope or counts to send.
            Self::Task(Finish {
                entry_id,
                task_id,
                kind: FinishKind::Done,
                record: Some(record),
                key_end: None,
                batch_id: None,
                ..
            }) => {
                inv.arg("done").arg(entry_id).arg(record.to_json());
                inv.key(keys.result(*task_id));
            }
            Self::Task(f) => push_task(keys, inv, f),
            Self::Step(f, s) => push_step(keys, inv, f, s),
            Self::Await {
                finish,
                chain_id,
                step,
                deadline_ms,
            } => {
                inv.arg("await").arg(3).arg(SETTLE + 4);
                inv.key(keys.result(finish.task_id))
                    .key(keys.chain_steps(chain_id))
                    .key(keys.approvals());
                settle(inv, finish);
                inv.arg(finish.task_id)
                    .arg(chain_id)
                    .arg(step)
                    .arg(deadline_ms);
            }
            Self::Rerun {
                finish,
                chain_id,
                step,
                reruns,
            } => {
                inv.arg("rerun")
                    .arg(4)
                    .arg(SETTLE + 2 + super::chain::RERUN_ARGS * reruns.len());
                chain_keys(keys, inv, finish, chain_id);
                settle(inv, finish);
                inv.arg(finish.task_id).arg(step);
                for r in reruns {
                    inv.arg(&super::chain::rerun_args(r)[..]);
                }
            }
            Self::Park {
                entry_id,
                task_id,
                park,
            } => push_park(keys, inv, *entry_id, *task_id, park),
            Self::Expand { entry_id, chain } => push_expand(keys, inv, *entry_id, chain),
        }
    }
}

// settle.lua's six: entry id, kind, record, envelope and the kind's two.
const SETTLE: usize = 6;

/// A finish's args as settle.lua reads them.
fn settle(inv: &mut ScriptInvocation<'_>, f: &Finish) {
    let (kind, a, b) = f.kind.args();
    let record = f
        .record
        .as_ref()
        .map(TaskRecord::to_json)
        .unwrap_or_default();
    inv.arg(f.entry_id)
        .arg(kind)
        .arg(record)
        .arg(&f.envelope)
        .arg(a)
        .arg(b);
}

/// The keys of a chain step's finish: its result, its chain, steps and tasks.
fn chain_keys(keys: &QueueKeys, inv: &mut ScriptInvocation<'_>, f: &Finish, chain_id: &str) {
    inv.key(keys.result(f.task_id))
        .key(keys.chain(chain_id))
        .key(keys.chain_steps(chain_id))
        .key(keys.chain_tasks(chain_id));
}

/// A task's finish that is not the common one: with its kind, an idempotency key it ends,
/// the batch it counts in.
fn push_task(keys: &QueueKeys, inv: &mut ScriptInvocation<'_>, f: &Finish) {
    let ends_key = f.key_end.as_deref();
    let args = SETTLE + if ends_key.is_some() { 3 } else { 0 } + usize::from(f.batch_id.is_some());
    inv.arg("task").arg(1).arg(args);
    inv.key(keys.result(f.task_id));
    settle(inv, f);
    if let Some(end) = ends_key {
        let window = end
            .window
            .map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX).max(1));
        inv.arg(&end.name)
            .arg(&end.holder)
            .arg(window.map(|w| w.to_string()).unwrap_or_default());
    }
    if let Some(batch) = &f.batch_id {
        inv.arg(super::enqueue::batch_finished_name(batch));
    }
}

/// A chain step's finish, with the states its worker read when they are still these
/// (`seen`): then the script swaps in the states built from them.
fn push_step(keys: &QueueKeys, inv: &mut ScriptInvocation<'_>, f: &Finish, s: &StepOutcome) {
    let fields = super::chain::step_field_map(&s.fields);
    // A map of strings and a number: it always serializes.
    let fields_json = serde_json::to_string(&fields).unwrap_or_default();
    let swap = s
        .seen
        .as_deref()
        .and_then(|seen| super::chain::step_swap(seen, s, fields).map(|swap| (seen, swap)));
    let moves = swap.as_ref().map_or(0, |(_, swap)| swap.moves.len());
    inv.arg("step").arg(4).arg(SETTLE + 7 + 3 * moves);
    chain_keys(keys, inv, f, &s.chain_id);
    settle(inv, f);
    inv.arg(&s.step)
        .arg(s.outcome.as_str())
        .arg(fields_json)
        .arg(keys.chain_wait_prefix(&s.chain_id));
    match swap {
        Some((seen, swap)) => {
            inv.arg(&*seen.own).arg(swap.state).arg(swap.children);
            for (was, (now, queued)) in seen.children.iter().zip(swap.moves) {
                inv.arg(&**was).arg(now).arg(if queued { "1" } else { "" });
            }
        }
        None => {
            inv.arg("").arg("").arg("");
        }
    }
}

/// A task parked for a provider batch.
fn push_park(
    keys: &QueueKeys,
    inv: &mut ScriptInvocation<'_>,
    entry_id: EntryId,
    task_id: TaskId,
    park: &BatchPark,
) {
    inv.arg("park").arg(4).arg(8);
    inv.key(keys.batch_task(task_id))
        .key(keys.batch_waiting(&park.group))
        .key(keys.batch_groups())
        .key(keys.batcher());
    let latch_ms = u64::try_from(super::LATCH_TTL.as_millis()).unwrap_or(u64::MAX);
    inv.arg(entry_id)
        .arg(task_id)
        .arg(&park.group)
        .arg(&park.envelope)
        .arg(&park.body)
        .arg(park.deadline_ms)
        .arg(&park.generation)
        .arg(latch_ms);
}

/// A submitted chain to expand: its spec and each step's task and first state.
fn push_expand(keys: &QueueKeys, inv: &mut ScriptInvocation<'_>, entry_id: EntryId, chain: &Chain) {
    let id = &chain.id;
    inv.arg("expand").arg(4).arg(4 + 5 * chain.steps.len());
    inv.key(keys.chain(id))
        .key(keys.chain_steps(id))
        .key(keys.chain_tasks(id))
        .key(keys.chains());
    let on_failure = match serde_json::to_value(chain.on_failure) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    };
    inv.arg(entry_id)
        .arg(id)
        .arg(chain.to_json())
        .arg(on_failure);
    for s in &chain.steps {
        inv.arg(&s.name)
            .arg(s.task.to_json())
            .arg(serde_json::to_string(s).unwrap_or_default())
            .arg(super::chain::first_state(s))
            .arg(if s.after.is_empty() { "1" } else { "0" });
    }
}

//! Finishing tasks: a batch of outcomes in one script (plain tasks, chain steps and what
//! their chains do next, submitted chains), and promoting due delayed tasks.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{Client, Finish, Result, now_ms};
use crate::chain::{Chain, Rerun, StepOutcome};
use crate::keys::{GROUP, QueueKeys};
use crate::outcome::TaskRecord;

static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/settle.lua"),
        include_str!("lua/advance.lua"),
        include_str!("lua/rerun.lua"),
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
    /// of it was written).
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
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let order = |id: &str| {
            let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
            (
                ms.parse::<u64>().unwrap_or(0),
                seq.parse::<u64>().unwrap_or(0),
            )
        };
        let entries = || items.iter().map(Write::entry_id);
        let lowest = entries().min_by_key(|id| order(id)).unwrap_or("-");
        let highest = entries().max_by_key(|id| order(id)).unwrap_or("+");
        let mut inv = FINISH.key(keys.stream());
        inv.key(keys.delayed()).key(keys.dead());
        inv.arg(GROUP)
            .arg(consumer)
            .arg(result_ttl.as_secs().max(1))
            .arg(now_ms())
            .arg(lowest)
            .arg(highest);
        for item in items {
            let (op, item_keys, args) = item.op(keys);
            inv.arg(op).arg(item_keys.len()).arg(args.len());
            for k in item_keys {
                inv.key(k);
            }
            inv.arg(args);
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
    Expand { entry_id: String, chain: Box<Chain> },
}

impl Write {
    /// The stream entry this outcome acks.
    #[must_use]
    pub fn entry_id(&self) -> &str {
        match self {
            Self::Expand { entry_id, .. } => entry_id,
            Self::Task(f) | Self::Step(f, _) => &f.entry_id,
            Self::Await { finish, .. } | Self::Rerun { finish, .. } => &finish.entry_id,
        }
    }

    /// The task's own outcome; `None` for a submitted chain.
    #[must_use]
    pub fn finish(&self) -> Option<&Finish> {
        match self {
            Self::Expand { .. } => None,
            Self::Task(f) | Self::Step(f, _) => Some(f),
            Self::Await { finish, .. } | Self::Rerun { finish, .. } => Some(finish),
        }
    }

    /// The op, keys and args `finish.lua` reads for this item.
    fn op(&self, keys: &QueueKeys) -> (&'static str, Vec<String>, Vec<String>) {
        let settle = |f: &Finish| -> Vec<String> {
            let (kind, a, b) = f.kind.args();
            vec![
                f.entry_id.clone(),
                kind.to_owned(),
                f.record
                    .as_ref()
                    .map(TaskRecord::to_json)
                    .unwrap_or_default(),
                f.envelope.clone(),
                a,
                b,
            ]
        };
        let chain_keys = |f: &Finish, chain_id: &str| {
            vec![
                keys.result(&f.task_id),
                keys.chain(chain_id),
                keys.chain_steps(chain_id),
                keys.chain_tasks(chain_id),
            ]
        };
        match self {
            Self::Task(f) => ("task", vec![keys.result(&f.task_id)], settle(f)),
            Self::Step(f, s) => {
                let mut args = settle(f);
                args.extend([
                    s.step.clone(),
                    s.outcome.to_owned(),
                    super::chain::step_fields(&s.fields),
                    keys.chain_wait_prefix(&s.chain_id),
                ]);
                ("step", chain_keys(f, &s.chain_id), args)
            }
            Self::Await {
                finish,
                chain_id,
                step,
                deadline_ms,
            } => {
                let mut args = settle(finish);
                args.extend([
                    finish.task_id.clone(),
                    chain_id.clone(),
                    step.clone(),
                    deadline_ms.to_string(),
                ]);
                let k = vec![
                    keys.result(&finish.task_id),
                    keys.chain_steps(chain_id),
                    keys.approvals(),
                ];
                ("await", k, args)
            }
            Self::Rerun {
                finish,
                chain_id,
                step,
                reruns,
            } => {
                let mut args = settle(finish);
                args.extend([finish.task_id.clone(), step.clone()]);
                args.extend(reruns.iter().flat_map(super::chain::rerun_args));
                ("rerun", chain_keys(finish, chain_id), args)
            }
            Self::Expand { entry_id, chain } => {
                let id = &chain.id;
                let k = vec![
                    keys.chain(id),
                    keys.chain_steps(id),
                    keys.chain_tasks(id),
                    keys.chains(),
                ];
                let on_failure = match serde_json::to_value(chain.on_failure) {
                    Ok(serde_json::Value::String(s)) => s,
                    _ => String::new(),
                };
                let mut args = vec![entry_id.clone(), id.clone(), chain.to_json(), on_failure];
                for s in &chain.steps {
                    args.extend([
                        s.name.clone(),
                        s.task.to_json(),
                        serde_json::to_string(s).unwrap_or_default(),
                        super::chain::first_state(s),
                        if s.after.is_empty() { "1" } else { "0" }.to_owned(),
                    ]);
                }
                ("expand", k, args)
            }
        }
    }
}

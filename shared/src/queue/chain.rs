//! Chains on the queue: expanding a submitted chain, finishing a step and moving its chain
//! along, and reading a chain's state. Every transition is one script.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, Value};
use serde::{Deserialize, Serialize};

use super::{Client, Finish, Result};
use crate::chain::{Chain, Step};
use crate::keys::{GROUP, QueueKeys};
use crate::outcome::TaskRecord;

static EXPAND: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("chain_expand.lua")));
static CANCEL: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("chain_cancel.lua")));
static RETRY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/rerun.lua"),
        include_str!("chain_retry.lua")
    ))
});
static REWORK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/settle.lua"),
        include_str!("lua/rerun.lua"),
        include_str!("chain_rework.lua")
    ))
});
static STEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/settle.lua"),
        include_str!("lua/advance.lua"),
        include_str!("chain_step.lua")
    ))
});
static AWAIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/settle.lua"),
        include_str!("chain_await.lua")
    ))
});
static TRIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/fence.lua"),
        include_str!("chain_trim.lua")
    ))
});
static DECIDE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/fence.lua"),
        include_str!("lua/advance.lua"),
        include_str!("chain_decide.lua")
    ))
});

/// What became of a chain step, as its chain records it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    /// `blocked`, `queued`, `succeeded`, `failed` or `cancelled` as the chain records it;
    /// `llmq chain show` refines `queued` into `running` or `retrying` from the task.
    pub status: String,
    #[serde(default)]
    pub task_id: String,
    #[serde(default)]
    pub round: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub cost_usd: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a step awaiting approval: when its `on_timeout` applies (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<i64>,
    /// Parents that succeeded and that did not, so far.
    #[serde(default)]
    pub ok: u32,
    #[serde(default)]
    pub failed: u32,
}

/// A chain as stored: its spec, state and steps.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainState {
    pub spec: Chain,
    /// `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub steps: HashMap<String, StepState>,
}

impl ChainState {
    /// `again` in their next round, each waiting for those of its parents that will not
    /// have succeeded (rerun too, or not succeeded), in the order of the spec.
    ///
    /// # Errors
    /// A step would wait for a parent that did not succeed and is not rerun: it would never
    /// run. The sentence names both.
    pub fn reruns(
        &self,
        again: &std::collections::HashSet<String>,
    ) -> std::result::Result<Vec<Rerun>, String> {
        let will_succeed = |p: &str| {
            !again.contains(p) && self.steps.get(p).is_some_and(|x| x.status == "succeeded")
        };
        let mut out = Vec::new();
        for s in self.spec.steps.iter().filter(|s| again.contains(&s.name)) {
            if let Some(p) = s
                .after
                .iter()
                .find(|p| !again.contains(*p) && !will_succeed(p))
            {
                return Err(format!(
                    "step `{}` runs after `{p}`, which did not succeed and would not run again",
                    s.name
                ));
            }
            let round = self.steps.get(&s.name).map_or(0, |x| x.round) + 1;
            // The bound no input escapes: escalations, rejections and retries together.
            if round > self.spec.max_rounds {
                return Err(format!(
                    "step `{}` has run again {} times, the most chains.max_rounds ({}) allows",
                    s.name,
                    round - 1,
                    self.spec.max_rounds
                ));
            }
            let mut task = s.task.clone();
            task.id = Some(crate::chain::step_task_id(&self.spec.id, &s.name, round));
            let (ok, waits_for): (Vec<String>, Vec<String>) =
                s.after.iter().cloned().partition(|p| will_succeed(p));
            out.push(Rerun {
                step: s.name.clone(),
                round,
                task,
                waits_for,
                ok: u32::try_from(ok.len()).unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// What `llmq chain retry` (and a replayed step's dead letter) runs again: the failed and
    /// cancelled steps, or `from` and every step after it, each in its next round.
    ///
    /// # Errors
    /// `from` is not a step, or a step would wait for one that will not run (the sentence
    /// says which), or a step's rounds are used up.
    pub fn retry(&self, from: Option<&str>) -> std::result::Result<Vec<Rerun>, String> {
        let again: std::collections::HashSet<String> = match from {
            Some(f) if self.spec.step(f).is_none() => {
                return Err(format!("chain {} has no step `{f}`", self.spec.id));
            }
            Some(f) => self.descendants(f),
            None => self
                .spec
                .steps
                .iter()
                .filter(|s| {
                    self.steps
                        .get(&s.name)
                        .is_some_and(|x| matches!(x.status.as_str(), "failed" | "cancelled"))
                })
                .map(|s| s.name.clone())
                .collect(),
        };
        self.reruns(&again).map_err(|e| {
            format!("{e}; retry without --from, or --from the step that did not succeed")
        })
    }

    /// `from` and every step after it.
    #[must_use]
    pub fn descendants(&self, from: &str) -> std::collections::HashSet<String> {
        let mut out = std::collections::HashSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(n) = todo.pop() {
            if out.insert(n.clone())
                && let Some(s) = self.spec.step(&n)
            {
                todo.extend(s.children.iter().cloned());
            }
        }
        out
    }
}

/// How a chain step's task ended, for its chain.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    pub chain_id: String,
    pub step: String,
    /// `succeeded`, `failed` or `cancelled`.
    pub outcome: &'static str,
    pub fields: StepState,
}

impl StepOutcome {
    /// Step `step` of chain `chain_id` failed with `error`, as task `task_id` (its current
    /// round's task, or the step script leaves the step alone).
    #[must_use]
    pub fn failed(chain_id: String, step: String, task_id: String, error: String) -> Self {
        Self {
            chain_id,
            step,
            outcome: "failed",
            fields: StepState {
                task_id,
                error: Some(error),
                ..StepState::default()
            },
        }
    }
}

/// How long an ended chain's keys live when no worker's `--result-ttl` applies (a cancel,
/// or an approval decided by a person): the worker's default result TTL.
pub const CHAIN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A step to run again, as [`Client::retry_chain`] enqueues it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rerun {
    pub step: String,
    pub round: u32,
    /// The step's task for this round (its id names the round).
    pub task: crate::envelope::Envelope,
    /// The parents it waits for (those that are not succeeded, or are rerun too).
    pub waits_for: Vec<String>,
    /// How many of its parents already succeeded.
    pub ok: u32,
}

/// Why a chain command could not act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    NoSuchChain,
    /// Cancel: the chain has ended. Retry: it is still running.
    WrongState,
    /// A fenced write by a scheduler that no longer holds the lease.
    NotHolder,
}

/// The compact graph the step script walks: children, whether a step is a join, and
/// `min_success`; the chain's `on_failure` under `.on_failure`.
fn graph(chain: &Chain) -> String {
    let mut g = serde_json::Map::new();
    for s in &chain.steps {
        g.insert(
            s.name.clone(),
            serde_json::json!({
                "children": s.children,
                "join": s.kind.is_join(),
                "min_success": s.min_success,
            }),
        );
    }
    g.insert(
        ".on_failure".into(),
        serde_json::to_value(chain.on_failure).unwrap_or_default(),
    );
    // An empty Lua table encodes as `{}`, so `children` of a sink must be an array: cjson
    // decodes `[]` as an empty table, which ipairs walks as nothing.
    serde_json::Value::Object(g).to_string()
}

impl Client {
    /// Expands `chain`, read from stream entry `entry_id` held by `consumer`: once per chain
    /// id, whatever the number of times it was submitted. Returns `Some(true)` when it was
    /// expanded now, `Some(false)` when before, `None` when the entry is no longer ours.
    ///
    /// # Errors
    /// Redis fails; then nothing of the chain was written.
    pub async fn expand_chain(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        entry_id: &str,
        chain: &Chain,
    ) -> Result<Option<bool>> {
        let mut inv = EXPAND.key(keys.stream());
        inv.key(keys.chain(&chain.id))
            .key(keys.chain_steps(&chain.id))
            .key(keys.chain_tasks(&chain.id))
            .key(keys.chains());
        for s in chain.steps.iter().filter(|s| !s.after.is_empty()) {
            inv.key(keys.chain_wait(&chain.id, &s.name));
        }
        inv.arg(GROUP)
            .arg(consumer)
            .arg(entry_id)
            .arg(&chain.id)
            .arg(chain.to_json())
            .arg(graph(chain))
            .arg(super::now_ms());
        for s in &chain.steps {
            inv.arg(&s.name)
                .arg(s.task.id.map(|i| i.to_string()).unwrap_or_default())
                .arg(s.task.to_json())
                .arg(s.after.join(","))
                .arg(serde_json::to_string(s).unwrap_or_default());
        }
        let mut c = self.conn().await?;
        let answer: i64 = inv.invoke_async(&mut c).await?;
        Ok((answer >= 0).then_some(answer == 1))
    }

    /// Finishes a batch of chain steps' tasks like [`Client::finish`] does tasks, and moves
    /// their chains along, in one script. Returns, per item, whether it was applied
    /// (`false`: the entry was no longer ours).
    ///
    /// # Errors
    /// Redis fails; then nothing of the batch was applied.
    pub async fn finish_steps(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        result_ttl: Duration,
        items: &[(&Finish, &StepOutcome)],
    ) -> Result<Vec<bool>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = STEP.key(keys.stream());
        inv.key(keys.delayed()).key(keys.dead());
        for (item, step) in items {
            let chain = &step.chain_id;
            inv.key(keys.result(&item.task_id))
                .key(keys.chain(chain))
                .key(keys.chain_steps(chain))
                .key(keys.chain_tasks(chain));
        }
        inv.arg(GROUP)
            .arg(consumer)
            .arg(result_ttl.as_secs().max(1))
            .arg(super::now_ms());
        for (item, step) in items {
            inv.arg(&item_args(item)[..])
                .arg(&step.step)
                .arg(step.outcome)
                .arg(step_fields(&step.fields))
                .arg(keys.chain_wait_prefix(&step.chain_id));
        }
        let mut c = self.conn().await?;
        let applied: Vec<i64> = inv.invoke_async(&mut c).await?;
        Ok(applied.into_iter().map(|a| a == 1).collect())
    }

    /// Cancels a running chain: every step not yet ended is cancelled. Returns how many.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn cancel_chain(
        &self,
        keys: &QueueKeys,
        chain_id: &str,
    ) -> Result<std::result::Result<u64, Refused>> {
        let mut c = self.conn().await?;
        let n: i64 = CANCEL
            .key(keys.chain(chain_id))
            .key(keys.chain_steps(chain_id))
            .key(keys.chain_tasks(chain_id))
            .key(keys.approvals())
            .arg(super::now_ms())
            .arg(CHAIN_TTL.as_secs())
            .arg(chain_id)
            .arg(keys.chain_wait_prefix(chain_id))
            .invoke_async(&mut c)
            .await?;
        Ok(refused(n))
    }

    /// Runs `steps` of an ended chain again, in one script. Returns how many.
    ///
    /// # Errors
    /// Redis fails; then nothing changed.
    pub async fn retry_chain(
        &self,
        keys: &QueueKeys,
        chain_id: &str,
        steps: &[Rerun],
    ) -> Result<std::result::Result<u64, Refused>> {
        let mut inv = RETRY.key(keys.stream());
        inv.key(keys.chain(chain_id))
            .key(keys.chain_steps(chain_id))
            .key(keys.chain_tasks(chain_id));
        for r in steps {
            inv.key(keys.chain_wait(chain_id, &r.step));
        }
        inv.arg(super::now_ms());
        for r in steps {
            inv.arg(&r.step)
                .arg(r.task.id.map(|i| i.to_string()).unwrap_or_default())
                .arg(r.task.to_json())
                .arg(r.round)
                .arg(r.waits_for.join(","))
                .arg(r.ok);
        }
        let mut c = self.conn().await?;
        let n: i64 = inv.invoke_async(&mut c).await?;
        Ok(refused(n))
    }

    /// Finishes a review's task whose rejection sends work back, and puts `reruns` (the
    /// step to redo, the steps after it up to the review, the review) into their next
    /// round, in one script. Returns false when the entry was no longer ours.
    ///
    /// # Errors
    /// Redis fails; then nothing was applied.
    pub async fn rework_step(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        result_ttl: Duration,
        item: &Finish,
        chain_id: &str,
        reruns: &[Rerun],
    ) -> Result<bool> {
        let mut inv = REWORK.key(keys.stream());
        inv.key(keys.delayed())
            .key(keys.dead())
            .key(keys.result(&item.task_id))
            .key(keys.chain(chain_id))
            .key(keys.chain_steps(chain_id))
            .key(keys.chain_tasks(chain_id));
        for r in reruns {
            inv.key(keys.chain_wait(chain_id, &r.step));
        }
        inv.arg(GROUP)
            .arg(consumer)
            .arg(&settle_args(item, result_ttl)[..]);
        for r in reruns {
            inv.arg(&r.step)
                .arg(r.task.id.map(|i| i.to_string()).unwrap_or_default())
                .arg(r.task.to_json())
                .arg(r.round)
                .arg(r.waits_for.join(","))
                .arg(r.ok);
        }
        let mut c = self.conn().await?;
        let applied: i64 = inv.invoke_async(&mut c).await?;
        Ok(applied == 1)
    }

    /// Settles an approval step's task and leaves the step awaiting a person's decision
    /// until `deadline_ms`. Returns false when the entry was no longer ours.
    ///
    /// # Errors
    /// Redis fails; then nothing was applied.
    #[allow(clippy::too_many_arguments)]
    pub async fn await_approval(
        &self,
        keys: &QueueKeys,
        consumer: &str,
        result_ttl: Duration,
        item: &Finish,
        chain_id: &str,
        step: &str,
        deadline_ms: i64,
    ) -> Result<bool> {
        let mut c = self.conn().await?;
        let applied: i64 = AWAIT
            .key(keys.stream())
            .key(keys.delayed())
            .key(keys.dead())
            .key(keys.result(&item.task_id))
            .key(keys.chain_steps(chain_id))
            .key(keys.approvals())
            .arg(GROUP)
            .arg(consumer)
            .arg(&settle_args(item, result_ttl)[..])
            .arg(chain_id)
            .arg(step)
            .arg(deadline_ms)
            .invoke_async(&mut c)
            .await?;
        Ok(applied == 1)
    }

    /// Decides an approval step once: approved (`note` becomes its summary), or rejected
    /// (`note` becomes its error), and moves the chain along in the same script.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn decide_approval(
        &self,
        keys: &QueueKeys,
        chain_id: &str,
        step: &str,
        approve: bool,
        note: &str,
        fence: Option<super::Fence<'_>>,
    ) -> Result<std::result::Result<(), Refused>> {
        let fields = if approve {
            serde_json::json!({"summary": note})
        } else {
            serde_json::json!({"error": note})
        };
        // A person's decision is not fenced: the keys are named, never read.
        let unfenced = crate::keys::SchedulerKeys::new(None);
        let (lease_keys, holder, token) = match &fence {
            Some(f) => (f.keys, f.holder, f.token),
            None => (&unfenced, "", 0),
        };
        let mut c = self.conn().await?;
        let n: i64 = DECIDE
            .key(lease_keys.lease())
            .key(lease_keys.fence())
            .key(keys.stream())
            .key(keys.chain(chain_id))
            .key(keys.chain_steps(chain_id))
            .key(keys.chain_tasks(chain_id))
            .key(keys.approvals())
            .arg(holder)
            .arg(token)
            .arg(chain_id)
            .arg(step)
            .arg(if approve { "succeeded" } else { "failed" })
            .arg(fields.to_string())
            .arg(super::now_ms())
            .arg(keys.chain_wait_prefix(chain_id))
            .arg(CHAIN_TTL.as_secs())
            .invoke_async(&mut c)
            .await?;
        Ok(refused(n).map(|_| ()))
    }

    /// Steps awaiting approval, soonest deadline first: (chain id, step, deadline ms).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn approvals(
        &self,
        keys: &QueueKeys,
        due_before: Option<i64>,
    ) -> Result<Vec<(String, String, i64)>> {
        let mut c = self.conn().await?;
        let max = due_before.map_or_else(|| "+inf".to_owned(), |t| t.to_string());
        let raw: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(keys.approvals())
            .arg("-inf")
            .arg(max)
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await?;
        Ok(raw
            .into_iter()
            .filter_map(|(m, at)| {
                let (chain, step) = m.split_once('\t')?;
                Some((chain.to_owned(), step.to_owned(), at as i64))
            })
            .collect())
    }

    /// A chain's spec, state and steps; `None` when there is no such chain.
    ///
    /// # Errors
    /// Redis fails, or what is stored is not a chain.
    pub async fn chain(&self, keys: &QueueKeys, chain_id: &str) -> Result<Option<ChainState>> {
        let mut c = self.conn().await?;
        let (head, steps): (HashMap<String, String>, HashMap<String, String>) = redis::pipe()
            .hgetall(keys.chain(chain_id))
            .hgetall(keys.chain_steps(chain_id))
            .query_async(&mut c)
            .await?;
        let Some(spec) = head.get("spec") else {
            return Ok(None);
        };
        let spec: Chain = serde_json::from_str(spec).map_err(|e| {
            super::Error::Protocol(format!(
                "the stored spec of chain {chain_id} is not one: {e}"
            ))
        })?;
        let at = |k: &str| {
            head.get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .and_then(chrono::DateTime::from_timestamp_millis)
        };
        let steps = steps
            .into_iter()
            .filter_map(|(name, json)| Some((name, serde_json::from_str(&json).ok()?)))
            .collect();
        Ok(Some(ChainState {
            state: head.get("state").cloned().unwrap_or_default(),
            created_at: at("created_at"),
            finished_at: at("finished_at"),
            spec,
            steps,
        }))
    }

    /// What a step needs before it runs: its definition and every step's state; `None`
    /// when there is no such chain or step. Reads the step's own definition, not the spec.
    ///
    /// # Errors
    /// Redis fails, or what is stored is not a chain.
    pub async fn step_context(
        &self,
        keys: &QueueKeys,
        chain_id: &str,
        step: &str,
    ) -> Result<Option<(Step, HashMap<String, StepState>)>> {
        let mut c = self.conn().await?;
        let (def, steps): (Option<String>, HashMap<String, String>) = redis::pipe()
            .hget(keys.chain(chain_id), format!("def:{step}"))
            .hgetall(keys.chain_steps(chain_id))
            .query_async(&mut c)
            .await?;
        let def = match def {
            Some(json) => serde_json::from_str::<Step>(&json).ok(),
            // A chain expanded before definitions were stored one by one.
            None => self
                .chain(keys, chain_id)
                .await?
                .and_then(|c| c.spec.step(step).cloned()),
        };
        let steps = steps
            .into_iter()
            .filter_map(|(name, json)| Some((name, serde_json::from_str(&json).ok()?)))
            .collect();
        Ok(def.map(|d| (d, steps)))
    }

    /// The states of some steps of a chain, in order (`None` where there is none).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn step_states(
        &self,
        keys: &QueueKeys,
        chain_id: &str,
        steps: &[&str],
    ) -> Result<Vec<Option<StepState>>> {
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        let raw: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(keys.chain_steps(chain_id))
            .arg(steps)
            .query_async(&mut c)
            .await?;
        Ok(raw
            .into_iter()
            .map(|j| j.and_then(|j| serde_json::from_str(&j).ok()))
            .collect())
    }

    /// The queue's chains, newest first, at most `limit`: (id, submitted at).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn chains(&self, keys: &QueueKeys, limit: usize) -> Result<Vec<(String, i64)>> {
        let mut c = self.conn().await?;
        let ids: Vec<(String, f64)> = redis::cmd("ZREVRANGE")
            .arg(keys.chains())
            .arg(0)
            .arg(limit.saturating_sub(1))
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await?;
        Ok(ids.into_iter().map(|(id, at)| (id, at as i64)).collect())
    }

    /// Drops from `keys`' chains index the chains whose keys have expired, reading `page`
    /// entries from rank `first` (oldest first), for the lease holder only. Returns (dropped,
    /// read), or `None` when `fence` no longer holds the lease.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn trim_chains(
        &self,
        fence: super::Fence<'_>,
        keys: &QueueKeys,
        first: u64,
        page: u64,
    ) -> Result<Option<(u64, u64)>> {
        let mut c = self.conn().await?;
        let answer: Value = TRIM
            .key(fence.keys.lease())
            .key(fence.keys.fence())
            .key(keys.chains())
            .arg(fence.holder)
            .arg(fence.token)
            .arg(keys.chain(""))
            .arg(first)
            .arg(page)
            .invoke_async(&mut c)
            .await?;
        let count = |v: Option<&Value>| match v {
            Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
            _ => 0,
        };
        Ok(match answer {
            Value::Array(v) => Some((count(v.first()), count(v.get(1)))),
            _ => None,
        })
    }
}

fn refused(n: i64) -> std::result::Result<u64, Refused> {
    match n {
        -1 => Err(Refused::NoSuchChain),
        -3 => Err(Refused::NotHolder),
        n if n < 0 => Err(Refused::WrongState),
        n => Ok(u64::try_from(n).unwrap_or(0)),
    }
}

/// ARGV 3 to 10 of the scripts that settle one task (see `lua/settle.lua`): result ttl, now,
/// entry id, kind, record, envelope and the kind's two arguments.
fn settle_args(item: &Finish, result_ttl: Duration) -> Vec<String> {
    let mut args = vec![
        result_ttl.as_secs().max(1).to_string(),
        super::now_ms().to_string(),
    ];
    args.extend(item_args(item));
    args
}

/// One item's settle arguments: entry id, kind, record, envelope and the kind's two.
fn item_args(item: &Finish) -> [String; 6] {
    let (kind, a, b) = item.kind.args();
    [
        item.entry_id.clone(),
        kind.to_owned(),
        item.record
            .as_ref()
            .map(TaskRecord::to_json)
            .unwrap_or_default(),
        item.envelope.clone(),
        a,
        b,
    ]
}

/// The fields a finished step records, as the step script merges them.
fn step_fields(s: &StepState) -> String {
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: Option<&String>| {
        if let Some(v) = v {
            m.insert(k.to_owned(), serde_json::Value::String(v.clone()));
        }
    };
    // The step is recorded only while this is still its task (its current round's).
    put("task_id", Some(&s.task_id).filter(|t| !t.is_empty()));
    put("provider", s.provider.as_ref());
    put("model", s.model.as_ref());
    put("summary", s.summary.as_ref());
    put("error", s.error.as_ref());
    m.insert("cost_usd".into(), serde_json::json!(s.cost_usd));
    serde_json::Value::Object(m).to_string()
}

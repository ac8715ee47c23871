//! Chains on the queue: expanding a submitted chain, finishing a step and moving its chain
//! along, and reading a chain's state. Every transition is one script.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, Value};

use super::{Client, Result};
use crate::chain::{Chain, ChainState, ChainStatus, Rerun, Seen, Step, StepOutcome, StepState};
use crate::keys::QueueKeys;

static CANCEL: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("chain_cancel.lua")));
static RETRY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/rerun.lua"),
        include_str!("chain_retry.lua")
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

/// How long an ended chain's keys live when no worker's `--result-ttl` applies (a cancel,
/// or an approval decided by a person): the worker's default result TTL.
pub const CHAIN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A page of chains: (id, submitted at ms, state), and where the next page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainsPage {
    pub chains: Vec<(String, i64, String)>,
    pub next: Option<(i64, String)>,
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

/// A step's state as its chain is expanded: its node of the graph (children, whether it is
/// a join, `min_success`) and the parents it waits for ride along, so finishing a step reads
/// only its own state and its children's (see `lua/advance.lua`).
pub(super) fn first_state(s: &Step) -> String {
    serde_json::json!({
        "status": if s.after.is_empty() { "queued" } else { "blocked" },
        "task_id": s.task.id.map(|i| i.to_string()).unwrap_or_default(),
        "round": 0,
        "ok": 0,
        "failed": 0,
        "children": s.children,
        "join": s.kind.is_join(),
        "min_success": s.min_success,
        "waits": s.after,
    })
    .to_string()
}

impl Client {
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
        inv.arg(super::now_ms());
        for r in steps {
            inv.arg(&rerun_args(r)[..]);
        }
        let mut c = self.conn().await?;
        let n: i64 = inv.invoke_async(&mut c).await?;
        Ok(refused(n))
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
        // A person's decision is not fenced: the queue's fence is named, never read.
        let (holder, token) = fence.map_or(("", 0), |f| (f.holder, f.token));
        let mut c = self.conn().await?;
        let n: i64 = DECIDE
            .key(keys.fence())
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

    /// The `limit` steps awaiting approval with the soonest deadlines, as (chain id, step,
    /// deadline ms), and how many await in all: one bounded read for a page.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn approvals_soonest(
        &self,
        keys: &QueueKeys,
        limit: usize,
    ) -> Result<(Vec<(String, String, i64)>, u64)> {
        let mut c = self.conn().await?;
        let (raw, total): (Vec<(String, f64)>, u64) = redis::pipe()
            .cmd("ZRANGE")
            .arg(keys.approvals())
            .arg(0)
            .arg(limit.saturating_sub(1))
            .arg("WITHSCORES")
            .zcard(keys.approvals())
            .query_async(&mut c)
            .await?;
        let soonest = raw
            .into_iter()
            .filter_map(|(m, at)| {
                let (chain, step) = m.split_once('\t')?;
                Some((chain.to_owned(), step.to_owned(), at as i64))
            })
            .collect();
        Ok((soonest, total))
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
            // Written by the chain scripts, one of the four; a chain without one runs.
            state: head
                .get("state")
                .and_then(|s| ChainStatus::parse(s))
                .unwrap_or_default(),
            created_at: at("created_at"),
            finished_at: at("finished_at"),
            spec,
            steps,
        }))
    }

    /// What a step needs before it runs: its definition, the states of the steps it reads
    /// (its own, its parents', those its prompt names and its children's), and its own
    /// state's and its children's texts as stored (for [`step_swap`]); `None` when there is
    /// no such chain or step. Reads the step's own definition, not the spec, and no other
    /// step's state: what a step reads does not grow with its chain.
    ///
    /// # Errors
    /// Redis fails, or what is stored is not a chain.
    pub async fn step_context(
        &self,
        keys: &QueueKeys,
        chain_id: &str,
        step: &str,
    ) -> Result<Option<StepContext>> {
        let mut c = self.conn().await?;
        let def: Option<String> = redis::cmd("HGET")
            .arg(keys.chain(chain_id))
            .arg(format!("def:{step}"))
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
        let Some(def) = def else {
            return Ok(None);
        };
        let inputs = def.inputs();
        let mut names: Vec<&str> = vec![step];
        for n in inputs.iter().chain(&def.children) {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
        let raw: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(keys.chain_steps(chain_id))
            .arg(&names)
            .query_async(&mut c)
            .await?;
        let mut steps: HashMap<String, String> = names
            .iter()
            .zip(raw)
            .filter_map(|(n, json)| Some(((*n).to_owned(), json?)))
            .collect();
        let states = steps
            .iter()
            .filter_map(|(name, json)| Some((name.clone(), serde_json::from_str(json).ok()?)))
            .collect();
        let seen = steps.remove(step).map(|own| {
            let children = node_children(&own)
                .unwrap_or_default()
                .into_iter()
                .map(|c| steps.remove(&c).unwrap_or_default().into_boxed_str())
                .collect();
            Box::new(Seen {
                own: own.into_boxed_str(),
                children,
            })
        });
        Ok(Some(StepContext {
            step: def,
            states,
            seen,
        }))
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

    /// A page of the queue's chains, newest first: up to `count` whose state is `state` (any
    /// when `None`), submitted before the cursor `(submitted at ms, chain id)` (from the
    /// newest when `None`). Reads at most `scan` index entries, so a rare state costs a bounded
    /// read per page. Returns the chains as (id, submitted at, state) and the cursor of the
    /// next page, `None` at the end.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn chains_page(
        &self,
        keys: &QueueKeys,
        after: Option<(i64, String)>,
        state: Option<&str>,
        count: usize,
        scan: usize,
    ) -> Result<ChainsPage> {
        let mut c = self.conn().await?;
        let mut out = Vec::new();
        let mut cursor = after;
        let mut read = 0usize;
        const STEP: usize = 200;
        while out.len() < count && read < scan {
            // Newest first, from the cursor's time on; entries of that same millisecond that
            // sort at or after the cursor's id (ZREVRANGE order) were on earlier pages.
            let max = cursor
                .as_ref()
                .map_or_else(|| "+inf".to_owned(), |(at, _)| at.to_string());
            let mut skip = 0usize;
            let ids: Vec<(String, f64)> = loop {
                let ids: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
                    .arg(keys.chains())
                    .arg(&max)
                    .arg("-inf")
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(skip)
                    .arg(STEP)
                    .query_async(&mut c)
                    .await?;
                let fresh: Vec<(String, f64)> = ids
                    .iter()
                    .filter(|(id, at)| {
                        cursor
                            .as_ref()
                            .is_none_or(|(ca, cid)| (*at as i64) < *ca || id < cid)
                    })
                    .cloned()
                    .collect();
                if !fresh.is_empty() || ids.len() < STEP {
                    break fresh;
                }
                // A whole step of one millisecond already shown: look further.
                skip += STEP;
                read += STEP;
                if read >= scan {
                    break Vec::new();
                }
            };
            if ids.is_empty() {
                return Ok(ChainsPage {
                    chains: out,
                    next: None,
                });
            }
            let mut pipe = redis::pipe();
            for (id, _) in &ids {
                pipe.hget(keys.chain(id), "state");
            }
            let states: Vec<Option<String>> = pipe.query_async(&mut c).await?;
            for ((id, at), st) in ids.into_iter().zip(states) {
                read += 1;
                let at = at as i64;
                cursor = Some((at, id.clone()));
                // An index entry whose chain expired is left for the scheduler's trim.
                let Some(st) = st else { continue };
                if state.is_none_or(|want| want == st) {
                    out.push((id, at, st));
                    if out.len() == count {
                        break;
                    }
                }
            }
        }
        Ok(ChainsPage {
            chains: out,
            next: cursor,
        })
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
            .key(keys.fence())
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

/// What a chain step reads before it runs ([`Client::step_context`]).
pub struct StepContext {
    /// Its definition.
    pub step: Step,
    /// The states of the steps it reads: its own, its parents', those its prompt names and
    /// its children's.
    pub states: HashMap<String, StepState>,
    /// Its own state's and its children's texts as stored, if it has a state.
    pub seen: Option<Box<Seen>>,
}

/// What the step script swaps in when a step ends and the states its worker read are still
/// the stored ones ([`step_swap`]).
pub(super) struct Swap {
    /// The step's state: the fields merged over it, the outcome as its status.
    pub state: String,
    /// Its children, joined by `,` (names have no comma).
    pub children: String,
    /// Each child's state once the step succeeded, and whether it is then enqueued, in the
    /// order of `children`; empty when the script moves the children itself.
    pub moves: Vec<(String, bool)>,
}

/// What the step script swaps in when step `s` ends with `fields` (its [`step_field_map`]),
/// built from `seen` (the states its worker read before running it), instead of decoding
/// the states and `s`'s fields and encoding them again. The step's state is merged as the
/// script merges it: every field of `s` over the state, then the outcome. A succeeded
/// step's children are moved as the script moves them ([`child_after`]), unless one would
/// be cancelled: the script then moves them all itself.
///
/// `None` when the step's state is not one this task may end (not queued, or another
/// task's) or names no children (a chain expanded by an earlier version): the script then
/// merges the fields itself, as it always could.
pub(super) fn step_swap(
    seen: &Seen,
    s: &StepOutcome,
    fields: serde_json::Map<String, serde_json::Value>,
) -> Option<Swap> {
    let Ok(serde_json::Value::Object(mut state)) = serde_json::from_str(&seen.own) else {
        return None;
    };
    let text = |k: &str| state.get(k).and_then(serde_json::Value::as_str);
    let task_id = s.fields.task_id.map(|t| t.to_string());
    if text("status") != Some("queued") || text("task_id") != task_id.as_deref() {
        return None;
    }
    let children = names(state.get("children")?)?;
    let moves =
        if s.outcome == crate::chain::StepEnd::Succeeded && children.len() == seen.children.len() {
            seen.children
                .iter()
                .map(|c| child_after(c, &s.step))
                .collect::<Option<Vec<_>>>()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
    let children = children.join(",");
    state.extend(fields);
    state.insert("status".into(), s.outcome.as_str().into());
    Some(Swap {
        state: serde_json::Value::Object(state).to_string(),
        children,
        moves,
    })
}

/// A step's children as its state `raw` names them; `None` when the state names none (a
/// chain expanded by an earlier version keeps them in its `graph`). Reads no other field.
fn node_children(raw: &str) -> Option<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Node {
        children: Option<serde_json::Value>,
    }
    let children = serde_json::from_str::<Node>(raw).ok()?.children?;
    Some(names(&children)?.into_iter().map(str::to_owned).collect())
}

/// The names in a state's list `v`: Lua's JSON encoder writes an empty list as `{}`.
fn names(v: &serde_json::Value) -> Option<Vec<&str>> {
    match v {
        serde_json::Value::Array(c) => c.iter().map(serde_json::Value::as_str).collect(),
        serde_json::Value::Object(c) if c.is_empty() => Some(Vec::new()),
        _ => None,
    }
}

/// Child state `raw` once its parent `parent` succeeded, and whether it is then enqueued,
/// as `lua/advance.lua` moves it: a child that ended, or does not wait for `parent`, stays
/// as it is; otherwise `parent` leaves what it waits for and counts as a parent that
/// succeeded, and a child that waited for it last is queued. `None` when it would be
/// cancelled instead (too few of its parents succeeded) or its state is not of this layout.
fn child_after(raw: &str, parent: &str) -> Option<(String, bool)> {
    let serde_json::Value::Object(mut c) = serde_json::from_str(raw).ok()? else {
        return None;
    };
    let unchanged = Some((raw.to_owned(), false));
    if matches!(
        c.get("status")?.as_str()?,
        "succeeded" | "failed" | "cancelled"
    ) {
        return unchanged;
    }
    let waits = match c.get_mut("waits")? {
        serde_json::Value::Array(w) => w,
        serde_json::Value::Object(w) if w.is_empty() => return unchanged,
        _ => return None,
    };
    let Some(at) = waits.iter().position(|p| p.as_str() == Some(parent)) else {
        return unchanged;
    };
    waits.remove(at);
    let ready = waits.is_empty();
    let ok = c.get("ok")?.as_u64()? + 1;
    c.insert("ok".into(), ok.into());
    if ready {
        if ok < c.get("min_success")?.as_u64()? {
            return None;
        }
        c.insert("status".into(), "queued".into());
    }
    Some((serde_json::Value::Object(c).to_string(), ready))
}

/// The fields a finished step records, as the step script merges them.
pub(super) fn step_field_map(s: &StepState) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: Option<&String>| {
        if let Some(v) = v {
            m.insert(k.to_owned(), serde_json::Value::String(v.clone()));
        }
    };
    // The step is recorded only while this is still its task (its current round's).
    put("task_id", s.task_id.map(|t| t.to_string()).as_ref());
    put("provider", s.provider.as_ref());
    put("model", s.model.as_ref());
    put("summary", s.summary.as_ref());
    put("error", s.error.as_ref());
    m.insert("cost_usd".into(), serde_json::json!(s.cost_usd));
    m
}

/// How many arguments a rerun takes.
pub(super) const RERUN_ARGS: usize = 7;

/// A rerun's seven arguments: name, task id, envelope, round, the parents it waits for
/// joined by ',', how many parents already succeeded (as `lua/rerun.lua` reads them), and
/// what to fold into the round when a sibling review already started it (`finish_ops.lua`).
pub(super) fn rerun_args(r: &Rerun) -> [String; RERUN_ARGS] {
    [
        r.step.clone(),
        r.task.id.map(|i| i.to_string()).unwrap_or_default(),
        r.task.to_json(),
        r.round.to_string(),
        r.waits_for.join(","),
        r.ok.to_string(),
        r.fold.clone(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::TaskId;

    fn ended(task_id: TaskId) -> StepOutcome {
        StepOutcome {
            chain_id: "c".into(),
            step: "s".into(),
            outcome: crate::chain::StepEnd::Succeeded,
            fields: StepState {
                task_id: Some(task_id),
                model: Some("m".into()),
                cost_usd: 0.5,
                ..StepState::default()
            },
            seen: None,
        }
    }

    /// The task of the states below, and another.
    const T: &str = "00000000-0000-4000-8000-000000000001";
    const ANOTHER: &str = "00000000-0000-4000-8000-000000000002";

    fn swap(own: &str, task_id: &str) -> Option<Swap> {
        let s = ended(task_id.parse().unwrap());
        let seen = Seen {
            own: own.into(),
            children: Box::new([]),
        };
        step_swap(&seen, &s, step_field_map(&s.fields))
    }

    #[test]
    fn a_swap_is_built_only_from_a_queued_state_of_the_same_task_that_names_its_children() {
        let queued = &format!(
            r#"{{"status":"queued","task_id":"{T}","round":1,"ok":1,"failed":0,
            "children":["a","b"],"join":false,"min_success":1,"waits":{{}},"folded":["x"]}}"#
        );
        let Swap {
            state, children, ..
        } = swap(queued, T).unwrap();
        assert_eq!(children, "a,b");
        let state: serde_json::Value = serde_json::from_str(&state).unwrap();
        // The fields over the state, the outcome as its status; the rest as it was.
        assert_eq!(state["status"], "succeeded");
        assert_eq!(state["model"], "m");
        assert_eq!(state["cost_usd"], 0.5);
        assert_eq!(state["round"], 1);
        assert_eq!(state["folded"], serde_json::json!(["x"]));
        assert_eq!(state["children"], serde_json::json!(["a", "b"]));
        // Lua writes an empty list as `{}`.
        let last = queued.replace(r#"["a","b"]"#, "{}");
        assert_eq!(swap(&last, T).unwrap().children, "");

        // The script decides these itself.
        assert!(swap(queued, ANOTHER).is_none());
        assert!(swap(&queued.replace("queued", "cancelled"), T).is_none());
        let earlier = queued.replace(r#""children":["a","b"],"#, "");
        assert!(swap(&earlier, T).is_none());
        assert!(swap("not json", T).is_none());
    }

    #[test]
    fn a_child_moves_as_the_script_moves_it_or_is_left_to_the_script() {
        let child = |status: &str, waits: &str, ok: u32, min_success: u32| {
            format!(
                r#"{{"status":"{status}","task_id":"c","round":0,"ok":{ok},"failed":0,"children":[],"join":true,"min_success":{min_success},"waits":{waits}}}"#
            )
        };
        let moved = |raw: &str| {
            let (state, queued) = child_after(raw, "s").unwrap();
            (
                serde_json::from_str::<serde_json::Value>(&state).unwrap(),
                queued,
            )
        };
        // Still waiting for another parent: one parent fewer, one more that succeeded.
        let (c, queued) = moved(&child("blocked", r#"["o","s"]"#, 0, 1));
        assert_eq!(
            (&c["status"], &c["waits"], &c["ok"], queued),
            (
                &"blocked".into(),
                &serde_json::json!(["o"]),
                &1.into(),
                false
            )
        );
        // Waited for it last, with enough parents that succeeded: queued.
        let (c, queued) = moved(&child("blocked", r#"["s"]"#, 1, 2));
        assert_eq!(
            (&c["status"], &c["waits"], &c["ok"], queued),
            (&"queued".into(), &serde_json::json!([]), &2.into(), true)
        );
        // Ended, or not waiting for it: as it was.
        for raw in [
            child("cancelled", r#"["s"]"#, 0, 1),
            child("blocked", r#"["o"]"#, 0, 1),
            child("blocked", "{}", 0, 1),
        ] {
            assert_eq!(child_after(&raw, "s"), Some((raw.clone(), false)));
        }
        // Cancelled for too few parents that succeeded, or an earlier layout: the script's.
        assert_eq!(child_after(&child("blocked", r#"["s"]"#, 0, 2), "s"), None);
        let earlier = child("blocked", r#"["s"]"#, 0, 1).replace(r#","waits":["s"]"#, "");
        assert_eq!(child_after(&earlier, "s"), None);
        assert_eq!(child_after("not json", "s"), None);
    }
}

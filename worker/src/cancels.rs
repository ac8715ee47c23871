//! The cancel marks of this worker's queues (`llmq_shared::queue::Target`), kept in memory,
//! and the tasks running here that a new mark ends.
//!
//! The marks are read again only when a queue's set changed (a probe every
//! [`CANCEL_NOTICE`] while tasks run, and before tasks are handed on when the last probe is
//! older; none while idle), so a task nobody cancelled costs no command: it is looked up here when
//! it is read, and its call is raced against its [`Watch`]'s token, which a mark that names it
//! cancels (as the hard stop does, whose child it is).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chrono::Utc;
use llmq_shared::envelope::Envelope;
use llmq_shared::ids::TaskId;
use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::{CANCEL_NOTICE, Client, MARK_LIFE};
use tokio_util::sync::CancellationToken;

/// How far back of the latest mark read a new read starts: a mark set by a client whose clock
/// is behind is still found.
const LOOKBACK_MS: i64 = 10 * 60 * 1000;

pub use llmq_shared::queue::{Named, why};

/// A task running here, that a new mark may end.
struct Running {
    queue: Arc<QueueKeys>,
    task_id: TaskId,
    batch: Option<Box<str>>,
    tenant: Option<Box<str>>,
    enqueued_ms: i64,
    token: CancellationToken,
}

/// One queue's marks, and what of the set was last read.
#[derive(Default)]
struct QueueMarks {
    marks: HashMap<String, i64>,
    /// The set's size and latest mark's time when last read.
    seen: Option<(u64, i64)>,
}

/// The marks of this worker's queues, and its running tasks.
pub struct Cancels {
    marks: RwLock<HashMap<Arc<QueueKeys>, QueueMarks>>,
    /// Whether any queue has a mark: a task of a worker with none looks nothing up.
    any: AtomicBool,
    running: Mutex<HashMap<u64, Running>>,
    next: AtomicU64,
    hard_stop: CancellationToken,
    /// When the marks were last probed.
    probed: Mutex<Option<std::time::Instant>>,
}

impl Cancels {
    #[must_use]
    pub fn new(hard_stop: CancellationToken) -> Self {
        Self {
            marks: RwLock::default(),
            any: AtomicBool::new(false),
            running: Mutex::default(),
            next: AtomicU64::new(0),
            hard_stop,
            probed: Mutex::default(),
        }
    }

    /// Why `task`, of `queue`, is cancelled; `None` when no mark names it.
    #[must_use]
    pub fn why(&self, queue: &QueueKeys, task: Named<'_>) -> Option<String> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let marks = self.marks.read().ok()?;
        why(&marks.get(queue)?.marks, task)
    }

    /// Watches task `task_id` of `queue` while it runs here: its token is cancelled by a mark
    /// that names it (at once, if one already does) and by the hard stop.
    #[must_use]
    pub fn watch(
        self: &Arc<Self>,
        queue: &Arc<QueueKeys>,
        task_id: TaskId,
        env: &Envelope,
        entry_ms: i64,
    ) -> Watch {
        let token = self.hard_stop.child_token();
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let named = Named::of(task_id, env, entry_ms, true);
        if let Ok(mut running) = self.running.lock() {
            running.insert(
                key,
                Running {
                    queue: Arc::clone(queue),
                    task_id,
                    batch: named.batch.map(Into::into),
                    tenant: named.tenant.map(Into::into),
                    enqueued_ms: named.enqueued_ms,
                    token: token.clone(),
                },
            );
        }
        // After it is in the list: a mark read meanwhile is either seen here or by the
        // refresh that goes through the list.
        if self.why(queue, named).is_some() {
            token.cancel();
        }
        Watch {
            cancels: Arc::clone(self),
            key,
            token,
        }
    }

    /// [`Cancels::refresh`] when the marks were last probed [`CANCEL_NOTICE`] ago or more:
    /// what the fetcher asks before it hands tasks on, so a worker that was idle (and probed
    /// nothing) meets its first tasks with fresh marks.
    pub async fn refresh_if_stale(&self, redis: &Client, queues: &[Arc<QueueKeys>]) {
        let stale = self
            .probed
            .lock()
            .map_or(true, |p| p.is_none_or(|t| t.elapsed() >= CANCEL_NOTICE));
        if stale {
            self.refresh(redis, queues).await;
        }
    }

    /// Whether a task runs here.
    fn running(&self) -> bool {
        self.running.lock().is_ok_and(|r| !r.is_empty())
    }

    /// Reads what changed of `queues`' marks, and cancels the running tasks a mark names.
    pub async fn refresh(&self, redis: &Client, queues: &[Arc<QueueKeys>]) {
        if let Ok(mut p) = self.probed.lock() {
            *p = Some(std::time::Instant::now());
        }
        let now = Utc::now().timestamp_millis();
        let mut changed = false;
        for q in queues {
            let seen = self
                .marks
                .read()
                .ok()
                .and_then(|m| m.get(q).and_then(|qm| qm.seen));
            let probe = match redis.cancel_probe(q).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(queue = q.name(), "cannot read the cancel marks: {e}");
                    continue;
                }
            };
            if seen == Some(probe) {
                continue;
            }
            // The first read, or marks dropped by a cancel's trim: read them all.
            let since = match seen {
                Some((n, top)) if probe.0 >= n => top - LOOKBACK_MS,
                _ => 0,
            };
            let read = match redis.cancel_marks(q, since).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(queue = q.name(), "cannot read the cancel marks: {e}");
                    continue;
                }
            };
            let Ok(mut all) = self.marks.write() else {
                return;
            };
            let qm = all.entry(Arc::clone(q)).or_default();
            if since == 0 {
                qm.marks.clear();
            }
            let oldest = now - MARK_LIFE.as_millis() as i64;
            qm.marks.retain(|_, ms| *ms >= oldest);
            for (mark, ms) in read {
                let at = qm.marks.entry(mark).or_insert(ms);
                *at = (*at).max(ms);
            }
            qm.seen = Some(probe);
            changed = true;
        }
        if !changed {
            return;
        }
        let Ok(all) = self.marks.read() else {
            return;
        };
        self.any
            .store(all.values().any(|q| !q.marks.is_empty()), Ordering::Relaxed);
        let Ok(running) = self.running.lock() else {
            return;
        };
        for r in running.values().filter(|r| !r.token.is_cancelled()) {
            let Some(qm) = all.get(&r.queue) else {
                continue;
            };
            let named = Named {
                task_id: r.task_id,
                batch: r.batch.as_deref(),
                tenant: r.tenant.as_deref(),
                enqueued_ms: r.enqueued_ms,
                started: true,
            };
            if let Some(why) = why(&qm.marks, named) {
                tracing::info!(task = %r.task_id, queue = r.queue.name(), "{why}: stopping its call");
                r.token.cancel();
            }
        }
    }
}

/// Keeps this worker's marks of `queues` fresh until `stop`: every [`CANCEL_NOTICE`] while a
/// task runs here (a mark must reach its call). An idle worker probes nothing: the fetcher
/// refreshes stale marks before it hands tasks on ([`Cancels::refresh_if_stale`]).
pub async fn refresh(
    redis: Client,
    queues: Vec<Arc<QueueKeys>>,
    cancels: Arc<Cancels>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(CANCEL_NOTICE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        if cancels.running() {
            cancels.refresh(&redis, &queues).await;
        }
    }
}

/// A running task's place in [`Cancels`]: its token, cancelled by a mark that names it or the
/// hard stop. Dropped when the task's run ends.
pub struct Watch {
    cancels: Arc<Cancels>,
    key: u64,
    token: CancellationToken,
}

impl Watch {
    /// What a call of the task races: cancelled when it must stop.
    #[must_use]
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Whether a cancel (not the hard stop) stopped the task.
    #[must_use]
    pub fn cancelled(&self) -> bool {
        self.token.is_cancelled() && !self.cancels.hard_stop.is_cancelled()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Ok(mut running) = self.cancels.running.lock() {
            running.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(started: bool, enqueued_ms: i64) -> Named<'static> {
        Named {
            task_id: TaskId::from_uuid(uuid::Uuid::from_u128(7)),
            batch: Some("b1"),
            tenant: Some("acme"),
            enqueued_ms,
            started,
        }
    }

    #[test]
    fn each_mark_names_what_it_says_and_nothing_else() {
        let id = uuid::Uuid::from_u128(7);
        let marks = |m: &[(&str, i64)]| -> HashMap<String, i64> {
            m.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
        };
        assert!(why(&marks(&[]), named(false, 5)).is_none());
        let task = marks(&[(&format!("task:{id}"), 1)]);
        assert!(why(&task, named(true, 5)).is_some());
        let queued = marks(&[(&format!("queued:{id}"), 1)]);
        assert!(why(&queued, named(false, 5)).is_some());
        assert!(why(&queued, named(true, 5)).is_none(), "it started");
        let other = marks(&[(&format!("task:{}", uuid::Uuid::from_u128(8)), 1)]);
        assert!(why(&other, named(false, 5)).is_none());
        assert!(why(&marks(&[("batch:b1", 1)]), named(true, 5)).is_some());
        assert!(why(&marks(&[("batch:b2", 1)]), named(true, 5)).is_none());
        // A tenant's mark ends what was enqueued until it, not later work.
        let tenant = marks(&[("tenant:acme", 100)]);
        assert!(why(&tenant, named(true, 100)).is_some());
        assert!(why(&tenant, named(false, 101)).is_none());
        assert!(why(&marks(&[("tenant:acm", 100)]), named(true, 5)).is_none());
    }
}

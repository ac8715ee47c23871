//! Background duties every worker does, so no task waits for the scheduler: moving due
//! delayed tasks to the stream, announcing itself, reading the routing stats.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::{Client, WorkerInfo, now_ms};
use tokio_util::sync::CancellationToken;

/// How many workers serve this worker's queues, as its last heartbeat counted them: duties
/// every worker can do are spread over the fleet instead of each doing them at full rate.
/// It also carries the word that this worker just put a task in `delayed`, so its promoter
/// wakes for it rather than polling for it.
#[derive(Debug)]
pub struct Fleet {
    live: AtomicU64,
    delayed: tokio::sync::Notify,
}

impl Default for Fleet {
    fn default() -> Self {
        Self {
            live: AtomicU64::new(1),
            delayed: tokio::sync::Notify::new(),
        }
    }
}

impl Fleet {
    fn set(&self, live: u64) {
        self.live.store(live.max(1), Ordering::Relaxed);
    }

    /// `every`, times the fleet, at most `cap` (never less than `every`): what one worker
    /// waits for so that the fleet as a whole does the duty every `every`. The cap bounds
    /// the wait whatever the count says (a count that includes workers that just died must
    /// not stall the duty).
    fn spread(&self, every: Duration, cap: Duration) -> Duration {
        let n = u32::try_from(self.live.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        every.saturating_mul(n).min(cap.max(every))
    }

    /// This worker just put a task in `delayed`: its promoter looks at the delayed tasks
    /// again (its next due time is then known).
    pub fn delayed(&self) {
        self.delayed.notify_one();
    }
}

/// The longest one worker waits between two looks at the delayed tasks when it knows of
/// none due: tasks this worker delays wake its promoter themselves, so this is only for
/// tasks delayed by another worker that died before promoting them (the scheduler's
/// `promote` duty, every tick, also moves them).
const PROMOTE_MAX: Duration = Duration::from_secs(30);
/// The longest one worker waits between two tries of the concurrency-slot sweep.
const SWEEP_MAX: Duration = Duration::from_secs(10);

/// Moves due delayed tasks to their streams; sleeps until the next one is due, or until
/// this worker delays a task, or at most `every` for the fleet as a whole (each worker waits
/// `every` times the live workers, up to [`PROMOTE_MAX`], so a fleet of any size looks
/// `every` apart, not every worker). About once a second, fleet-wide again (each worker at
/// most [`SWEEP_MAX`] apart), also sweeps the concurrency keys: frees slots left by tasks that
/// are gone and wakes parked tasks into them.
pub async fn promote(
    redis: Client,
    queues: Vec<Arc<QueueKeys>>,
    every: Duration,
    fleet: Arc<Fleet>,
    stop: CancellationToken,
) {
    use tokio::time::Instant;
    const LIMIT: usize = 1000;
    const SWEEP_EVERY: Duration = Duration::from_secs(1);
    let mut swept = Instant::now();
    let mut promoted = Instant::now();
    let mut promote_at = Instant::now();
    loop {
        if swept.elapsed() >= fleet.spread(SWEEP_EVERY, SWEEP_MAX) {
            swept = Instant::now();
            for q in &queues {
                if let Err(e) = redis.sweep_slots(q).await {
                    tracing::warn!(queue = q.name(), "sweeping concurrency slots failed: {e}");
                }
            }
        }
        if Instant::now() >= promote_at {
            promoted = Instant::now();
            let mut wait = fleet.spread(every, PROMOTE_MAX);
            for q in &queues {
                match redis.promote(q, LIMIT).await {
                    Ok((moved, next)) => {
                        if moved as usize == LIMIT {
                            wait = Duration::ZERO;
                        } else if let Some(next) = next {
                            let until =
                                Duration::from_millis(u64::try_from(next - now_ms()).unwrap_or(0));
                            wait = wait.min(until);
                        }
                    }
                    Err(e) => {
                        tracing::error!(queue = q.name(), "moving due delayed tasks failed: {e}")
                    }
                }
            }
            promote_at = Instant::now() + wait.max(Duration::from_millis(5));
        }
        let sweep_at = swept + fleet.spread(SWEEP_EVERY, SWEEP_MAX);
        tokio::select! {
            () = tokio::time::sleep_until(promote_at.min(sweep_at)) => {}
            // A task this worker delayed: look again, but not more often than `every`.
            () = fleet.delayed.notified() => promote_at = promote_at.min(promoted + every),
            () = stop.cancelled() => return,
        }
    }
}

/// Reads the routing stats the scheduler wrote into `view`. Returns whether there were any.
pub async fn load_routing_stats(
    redis: &Client,
    keys: &llmq_shared::keys::SchedulerKeys,
    view: &crate::executor::StatsView,
) -> bool {
    match llmq_shared::archive::routing_stats(redis, keys).await {
        Ok(Some(stats)) => {
            view.set(stats);
            true
        }
        Ok(None) => false,
        Err(e) => {
            tracing::warn!("cannot read the routing stats: {e}");
            true
        }
    }
}

/// Reads the routing stats again every `every`, for a learned strategy (the worker read them
/// once before it took a task). Until there are any (a new fleet, Redis restarted) every
/// model routes on its prior, which it says once.
pub async fn routing_stats(
    redis: Client,
    keys: llmq_shared::keys::SchedulerKeys,
    view: Arc<crate::executor::StatsView>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut warned = false;
    loop {
        if !load_routing_stats(&redis, &keys, &view).await && !warned {
            warned = true;
            tracing::warn!(
                key = keys.routing_stats(),
                "no routing stats yet: every model routes on routing.prior until the scheduler's routing_stats duty writes them (is the scheduler running, with the same LLMQ_SCHEDULER_NAMESPACE and a learned routing.strategy?)"
            );
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// What the heartbeat tells the fleet of this worker, and the drain it hands the fetcher.
pub struct Presence {
    /// What does not change: id, host, queues, version, concurrency, start.
    pub info: WorkerInfo,
    /// The stream entries the worker holds: its tasks.
    pub claims: Arc<crate::claims::Claims>,
    pub calls: Arc<AtomicU64>,
    /// Set while a drain is asked of this worker (`llmq worker drain`): it reads nothing.
    pub draining: Arc<AtomicBool>,
}

impl Presence {
    /// Says where the worker stands in the fleet's registry, and takes note of a drain asked
    /// or withdrawn.
    async fn announce(&mut self, redis: &Client) {
        self.info.busy = self.claims.count() as u64;
        self.info.calls = self.calls.load(Ordering::Relaxed);
        self.info.draining = self.draining.load(Ordering::Relaxed);
        match redis.announce(&self.info).await {
            Ok(drain) => {
                let asked = drain.is_some();
                if self.draining.swap(asked, Ordering::Relaxed) != asked {
                    match drain {
                        Some(d) => {
                            tracing::warn!(by = %d.by, "asked to drain: taking no new task, finishing those held")
                        }
                        None => tracing::info!("drain withdrawn: taking tasks again"),
                    }
                }
            }
            Err(e) => tracing::warn!("cannot announce the worker: {e}"),
        }
    }
}

/// Announces the worker every few seconds, for `llmq status` and `llmq workers`, counts the
/// fleet it belongs to, and takes note of a drain.
pub async fn heartbeat(
    redis: Client,
    worker: String,
    queues: Vec<Arc<QueueKeys>>,
    fleet: Arc<Fleet>,
    mut presence: Presence,
    stop: CancellationToken,
) {
    /// Beats between two that also record the queues and forget workers silent for an hour.
    const TIDY_EVERY: u32 = 12;
    let keys: Vec<QueueKeys> = queues.iter().map(|q| QueueKeys::clone(q)).collect();
    let mut beat = 0u32;
    loop {
        let tidy = beat.is_multiple_of(TIDY_EVERY);
        beat = beat.wrapping_add(1);
        match redis.heartbeat(&worker, &keys, tidy).await {
            Ok(live) => fleet.set(live),
            Err(e) => tracing::warn!("heartbeat failed: {e}"),
        }
        presence.announce(&redis).await;
        if tidy {
            // Tasks parked for a provider batch that no scheduler sends any more go back to
            // their streams before their deadline.
            for q in &keys {
                match redis
                    .rescue_batched(
                        q,
                        llmq_shared::queue::FALLBACK_MARGIN,
                        llmq_shared::queue::LATCH_TTL,
                    )
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(
                        queue = q.name(),
                        tasks = n,
                        "no scheduler sends this queue's provider batches: tasks near their deadline go to calls"
                    ),
                    Err(e) => tracing::warn!(
                        queue = q.name(),
                        "cannot look after parked batch tasks: {e}"
                    ),
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_shares_its_duties_and_none_waits_past_the_cap() {
        let fleet = Fleet::default();
        let ms = Duration::from_millis;
        let cap = Duration::from_secs(5);
        assert_eq!(fleet.spread(ms(250), cap), ms(250), "alone, at full rate");
        fleet.set(4);
        assert_eq!(fleet.spread(ms(250), cap), ms(1000));
        fleet.set(20);
        assert_eq!(fleet.spread(ms(250), cap), cap);
        fleet.set(0);
        assert_eq!(
            fleet.spread(ms(250), cap),
            ms(250),
            "a count of 0 is the worker itself"
        );
        fleet.set(3);
        assert_eq!(
            fleet.spread(Duration::from_secs(10), cap),
            Duration::from_secs(10)
        );
    }
}

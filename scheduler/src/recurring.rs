//! The `recurring` duty: enqueues each recurring task once per tick of its cron schedule.
//!
//! Schedules are cron expressions in UTC: five fields (minute hour day-of-month month
//! day-of-week), or six with seconds first. Each tick is enqueued by one Lua script that
//! checks the lease, sets the tick's marker (`llmq:scheduler:recurring:<name>:<tick ms>`,
//! `SET NX`), adds the envelope to the queue's stream and records the tick as the task's last
//! (field `recurring:<name>` of `llmq:scheduler:duties`). So a tick is enqueued once, even
//! when two holders overlap, and the last tick survives a takeover.
//!
//! Catch-up: a holder enqueues every tick after the recorded last one up to now, so a new
//! holder enqueues the ticks its predecessor missed while dying: none is skipped, none
//! doubled. It goes back at most [`CATCH_UP`] (24 h): ticks older than that (a scheduler
//! down for days) are skipped with a warning rather than enqueued in a burst. A task seen
//! for the first time starts counting from now: past ticks are not enqueued.

use std::time::Duration;

use chrono::DateTime;

use llmq_shared::archive::RECURRING_FIELD;
use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::Tick;

use crate::lease::Mark;
use crate::{Result, Scheduler};

/// How far back a holder enqueues missed ticks.
pub const CATCH_UP: Duration = Duration::from_secs(24 * 3600);
/// How long a tick's marker lives: longer than [`CATCH_UP`], so no tick a holder could still
/// catch up on can be enqueued twice.
pub const MARKER_TTL: Duration = Duration::from_secs(25 * 3600);
/// Ticks of one task enqueued per run at most; the rest follow at the next run.
pub const MAX_TICKS_PER_PASS: usize = 1000;

impl Scheduler {
    /// The `recurring` duty: enqueues every due tick of every recurring task, catching up
    /// on ticks missed since the last recorded one (at most [`CATCH_UP`] back). Returns what
    /// it enqueued.
    ///
    /// # Errors
    /// Redis fails; [`crate::Error::NotLeader`] when the lease is no longer ours (then the
    /// tick at hand is not enqueued).
    pub async fn enqueue_recurring(&mut self) -> Result<String> {
        let now = self.now();
        let floor = now - chrono::Duration::from_std(CATCH_UP).unwrap_or(chrono::Duration::zero());
        let mut enqueued = 0usize;
        for job in &self.recurring {
            let field = format!("{RECURRING_FIELD}{}", job.name);
            let mut c = self.redis.conn().await?;
            let last: Option<String> = redis::cmd("HGET")
                .arg(self.lease.keys().duties())
                .arg(&field)
                .query_async(&mut c)
                .await?;
            let Some(last) = last.and_then(|l| l.parse::<i64>().ok()) else {
                // Seen for the first time: count from now on, and record that.
                self.lease
                    .mark(
                        &self.redis,
                        &field,
                        &now.timestamp_millis().to_string(),
                        Mark::IfAbsent,
                    )
                    .await?;
                continue;
            };
            let mut from = DateTime::from_timestamp_millis(last).unwrap_or(floor);
            if from < floor {
                tracing::warn!(
                    name = job.name,
                    last = %from,
                    "ticks of a recurring task older than {} were missed and are skipped",
                    humantime::format_duration(CATCH_UP)
                );
                self.lease
                    .mark(
                        &self.redis,
                        &field,
                        &floor.timestamp_millis().to_string(),
                        Mark::Always,
                    )
                    .await?;
                from = floor;
            }
            for _ in 0..MAX_TICKS_PER_PASS {
                let Ok(tick) = job.schedule.find_next_occurrence(&from, false) else {
                    break;
                };
                if tick > now {
                    break;
                }
                let tick_ms = tick.timestamp_millis();
                let envelope = job.envelope(tick, now);
                let fresh = self
                    .lease
                    .enqueue_tick(
                        &self.redis,
                        &QueueKeys::new(&job.queue),
                        &Tick {
                            name: &job.name,
                            marker_ttl: MARKER_TTL,
                            envelope: &envelope,
                            tick_ms,
                        },
                    )
                    .await?;
                // The task's last tick, in the scheduler's own keys (another slot than the
                // queue's): a tick recorded late is enqueued once all the same (its marker).
                self.lease
                    .mark(&self.redis, &field, &tick_ms.to_string(), Mark::Always)
                    .await?;
                if fresh {
                    tracing::info!(name = job.name, queue = job.queue, %tick, "enqueued a recurring task");
                    enqueued += 1;
                }
                from = tick;
            }
        }
        Ok(match enqueued {
            0 => format!("nothing due of {} recurring task(s)", self.recurring.len()),
            n => format!("enqueued {n} tick(s)"),
        })
    }
}

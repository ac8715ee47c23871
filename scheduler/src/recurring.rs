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

use chrono::{DateTime, SecondsFormat, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde_json::{Map, Value};

use llmq_shared::archive::RECURRING_FIELD;
use llmq_shared::config::{self, Recurring};
use llmq_shared::envelope::{self, Envelope};
use llmq_shared::keys::{QueueKeys, scheduler as keys};
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

/// A recurring task with its parsed schedule.
pub(crate) struct Job {
    name: String,
    queue: QueueKeys,
    cron: Cron,
    task: Map<String, Value>,
}

/// Parses a cron expression: five fields, or six with seconds first; UTC.
///
/// # Errors
/// What is wrong with it, as a sentence.
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| e.to_string())
}

/// Validates every recurring task: its schedule and the envelope it would enqueue.
pub(crate) fn parse(file: &str, recurring: &[Recurring]) -> Result<Vec<Job>, config::Error> {
    let at = |i: usize, key: &str, problem: String, fix: &str| config::Error {
        file: file.to_owned(),
        key: format!("scheduler.recurring[{i}].{key}"),
        problem,
        fix: fix.to_owned(),
    };
    let mut jobs = Vec::with_capacity(recurring.len());
    for (i, r) in recurring.iter().enumerate() {
        let cron = parse_cron(&r.cron).map_err(|e| {
            at(
                i,
                "cron",
                format!("`{}` is not a cron expression ({e})", r.cron),
                "write five fields in UTC, e.g. \"0 2 * * *\" for 02:00 daily, or six with seconds first",
            )
        })?;
        if cron.find_next_occurrence(&Utc::now(), false).is_err() {
            return Err(at(
                i,
                "cron",
                format!("`{}` never comes round (e.g. the 30th of February)", r.cron),
                "pick a day and month that exist",
            ));
        }
        if r.queue.trim().is_empty() {
            return Err(at(
                i,
                "queue",
                "the queue name is empty".into(),
                "name a queue, or leave it out for `default`",
            ));
        }
        if r.task
            .get("metadata")
            .is_some_and(|m| !m.is_object() && !m.is_null())
        {
            return Err(at(
                i,
                "task.metadata",
                "metadata is not a map".into(),
                "write it as a map, e.g. metadata: {team: data}",
            ));
        }
        let job = Job {
            name: r.name.clone(),
            queue: QueueKeys::new(&r.queue),
            cron,
            task: r.task.clone(),
        };
        let sample = job.envelope(Utc::now(), Utc::now());
        if let Err(e) = Envelope::parse(sample.as_bytes(), usize::MAX) {
            return Err(at(
                i,
                "task",
                format!("the task is not a valid envelope: {e}"),
                "give it the fields of an envelope (docs/wire-format.md), e.g. {prompt: \"...\", type: research}",
            ));
        }
        jobs.push(job);
    }
    Ok(jobs)
}

impl Job {
    /// The envelope for `tick`: the configured task fields, a fresh id, `v`, `enqueued_at`,
    /// and `metadata.recurring` (the task's name) with `metadata.recurring_tick`.
    fn envelope(&self, tick: DateTime<Utc>, now: DateTime<Utc>) -> String {
        let mut task = self.task.clone();
        let mut metadata = match task.remove("metadata") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        metadata.insert("recurring".into(), Value::String(self.name.clone()));
        metadata.insert(
            "recurring_tick".into(),
            Value::String(tick.to_rfc3339_opts(SecondsFormat::Millis, true)),
        );
        task.insert("v".into(), Value::from(envelope::VERSION));
        task.insert("id".into(), Value::String(uuid::Uuid::new_v4().to_string()));
        task.insert("metadata".into(), Value::Object(metadata));
        task.insert(
            "enqueued_at".into(),
            Value::String(now.to_rfc3339_opts(SecondsFormat::Millis, true)),
        );
        Value::Object(task).to_string()
    }
}

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
                .arg(keys::DUTIES)
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
                let Ok(tick) = job.cron.find_next_occurrence(&from, false) else {
                    break;
                };
                if tick > now {
                    break;
                }
                let tick_ms = tick.timestamp_millis();
                let marker = keys::tick(&job.name, tick_ms);
                let envelope = job.envelope(tick, now);
                let fresh = self
                    .lease
                    .enqueue_tick(
                        &self.redis,
                        &job.queue,
                        &Tick {
                            marker: &marker,
                            marker_ttl: MARKER_TTL,
                            envelope: &envelope,
                            field: &field,
                            tick_ms,
                        },
                    )
                    .await?;
                if fresh {
                    tracing::info!(name = job.name, queue = job.queue.name(), %tick, "enqueued a recurring task");
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn recurring(cron: &str, task: Value) -> Recurring {
        Recurring {
            name: "nightly".into(),
            cron: cron.into(),
            queue: "default".into(),
            task: task.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn five_fields_are_minutes_in_utc_and_six_add_seconds() {
        let t = Utc.with_ymd_and_hms(2030, 5, 6, 1, 59, 30).unwrap();
        let daily = parse_cron("0 2 * * *").unwrap();
        assert_eq!(
            daily.find_next_occurrence(&t, false).unwrap(),
            Utc.with_ymd_and_hms(2030, 5, 6, 2, 0, 0).unwrap()
        );
        let every_second = parse_cron("* * * * * *").unwrap();
        assert_eq!(
            every_second.find_next_occurrence(&t, false).unwrap(),
            Utc.with_ymd_and_hms(2030, 5, 6, 1, 59, 31).unwrap()
        );
    }

    #[test]
    fn bad_schedules_and_tasks_name_the_key_and_the_fix() {
        let task = serde_json::json!({"prompt": "Summarise yesterday's errors"});
        for (r, key) in [
            (
                recurring("61 * * * *", task.clone()),
                "scheduler.recurring[0].cron",
            ),
            (
                recurring("0 2 * * * * 2030", task.clone()),
                "scheduler.recurring[0].cron",
            ),
            (
                recurring("every day", task.clone()),
                "scheduler.recurring[0].cron",
            ),
            (
                recurring("0 0 30 2 *", task.clone()),
                "scheduler.recurring[0].cron",
            ),
            (
                recurring(
                    "0 2 * * *",
                    serde_json::json!({"prompt": "x", "type": "poetry"}),
                ),
                "scheduler.recurring[0].task",
            ),
            (
                recurring(
                    "0 2 * * *",
                    serde_json::json!({"prompt": "x", "metadata": "team"}),
                ),
                "scheduler.recurring[0].task.metadata",
            ),
        ] {
            let Err(e) = parse("p.yaml", &[r]) else {
                panic!("accepted a bad task for {key}");
            };
            assert!(e.to_string().starts_with(&format!("p.yaml:{key}: ")), "{e}");
            assert!(!e.fix.is_empty());
        }
        assert!(parse("p.yaml", &[recurring("0 2 * * *", task)]).is_ok());
    }

    #[test]
    fn the_envelope_carries_the_task_its_name_and_tick() {
        let job = &parse(
            "p.yaml",
            &[recurring(
                "0 2 * * *",
                serde_json::json!({"prompt": "Report", "type": "research", "metadata": {"team": "data"}}),
            )],
        )
        .unwrap()[0];
        let tick = Utc.with_ymd_and_hms(2030, 5, 6, 2, 0, 0).unwrap();
        let json = job.envelope(tick, tick);
        let env = Envelope::parse(json.as_bytes(), usize::MAX).unwrap();
        assert_eq!(env.prompt, "Report");
        assert_eq!(env.task_type.as_deref(), Some("research"));
        assert!(env.id.is_some());
        assert_eq!(env.enqueued_at, Some(tick));
        let meta = env.metadata.unwrap();
        assert_eq!(meta["recurring"], "nightly");
        assert_eq!(meta["team"], "data");
        assert_eq!(meta["recurring_tick"], "2030-05-06T02:00:00.000Z");
        assert_ne!(job.envelope(tick, tick), json, "every run gets a fresh id");
    }
}

//! The scheduler's settings: its lease, dead-letter retention and recurring tasks; and
//! validating the file's `scheduler` section.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde_json::{Map, Value};

use super::raw::RawScheduler;
use super::{Errors, Result};
use crate::envelope::{self, Envelope};

/// How long dead letters are kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    /// Dead letters older than this are archived to Postgres and trimmed from Redis.
    pub keep_in_redis: Duration,
    /// Past this many, the oldest are archived and trimmed regardless of age.
    pub max_in_redis: u64,
    /// Archived dead letters older than this are deleted from Postgres.
    pub keep_archived: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep_in_redis: Duration::from_secs(7 * 24 * 3600),
            max_in_redis: 10_000,
            keep_archived: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// A task the scheduler enqueues on a cron schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Recurring {
    /// Unique; names the task in logs and in its exactly-once marker.
    pub name: String,
    /// The cron expression, as written.
    pub cron: String,
    /// The parsed schedule (UTC).
    pub schedule: Cron,
    pub queue: String,
    /// Envelope fields (prompt, type, model, ...) for each run; `v` and `id` are added.
    pub task: Map<String, Value>,
}

impl Recurring {
    /// The envelope for `tick`: the configured task fields, a fresh id, `v`, `enqueued_at`,
    /// and `metadata.recurring` (the task's name) with `metadata.recurring_tick`.
    #[must_use]
    pub fn envelope(&self, tick: DateTime<Utc>, now: DateTime<Utc>) -> String {
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

/// Parses a cron expression: five fields, or six with seconds first; UTC.
///
/// # Errors
/// What is wrong with it, as a sentence.
pub fn parse_cron(expr: &str) -> std::result::Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| e.to_string())
}

/// The scheduler's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// How long a scheduler's lease lasts without renewal; a standby takes over after it.
    pub lease: Duration,
    pub dead_letters: Retention,
    pub recurring: Vec<Recurring>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            dead_letters: Retention::default(),
            recurring: Vec::new(),
        }
    }
}

pub(super) fn scheduler(errs: &Errors<'_>, raw: RawScheduler) -> Result<SchedulerConfig> {
    let mut out = SchedulerConfig::default();
    if let Some(l) = raw.lease {
        out.lease = errs.duration("scheduler.lease".into(), &l)?;
        if out.lease < Duration::from_secs(1) {
            return Err(errs.at(
                "scheduler.lease",
                "a lease shorter than a second would flap",
                "use e.g. 15s",
            ));
        }
    }
    if let Some(r) = raw.dead_letters {
        if let Some(d) = r.keep_in_redis {
            out.dead_letters.keep_in_redis =
                errs.duration("scheduler.dead_letters.keep_in_redis".into(), &d)?;
        }
        if let Some(n) = r.max_in_redis {
            out.dead_letters.max_in_redis = n;
        }
        if let Some(d) = r.keep_archived {
            out.dead_letters.keep_archived =
                errs.duration("scheduler.dead_letters.keep_archived".into(), &d)?;
        }
    }
    for (i, r) in raw.recurring.into_iter().enumerate() {
        let at = |k: &str| format!("scheduler.recurring[{i}].{k}");
        if r.name.trim().is_empty() || out.recurring.iter().any(|x: &Recurring| x.name == r.name) {
            return Err(errs.at(
                at("name"),
                format!("`{}` is empty or used twice", r.name),
                "give every recurring task its own name",
            ));
        }
        let schedule = parse_cron(&r.cron).map_err(|e| {
            errs.at(
                at("cron"),
                format!("`{}` is not a cron expression ({e})", r.cron),
                "write five fields in UTC, e.g. \"0 2 * * *\" for 02:00 daily, or six with seconds first",
            )
        })?;
        if schedule.find_next_occurrence(&Utc::now(), false).is_err() {
            return Err(errs.at(
                at("cron"),
                format!("`{}` never comes round (e.g. the 30th of February)", r.cron),
                "pick a day and month that exist",
            ));
        }
        if let Err(why) = crate::keys::queue_name(&r.queue) {
            return Err(errs.at(
                at("queue"),
                why,
                "name a queue, or leave it out for `default`",
            ));
        }
        let prompt_ok = r
            .task
            .get("prompt")
            .and_then(|p| p.as_str())
            .is_some_and(|p| !p.trim().is_empty());
        if !prompt_ok {
            return Err(errs.at(
                at("task.prompt"),
                "the task has no prompt",
                "set task: {prompt: \"...\"}",
            ));
        }
        if r.task
            .get("metadata")
            .is_some_and(|m| !m.is_object() && !m.is_null())
        {
            return Err(errs.at(
                at("task.metadata"),
                "metadata is not a map",
                "write it as a map, e.g. metadata: {team: data}",
            ));
        }
        let recurring = Recurring {
            name: r.name,
            cron: r.cron,
            schedule,
            queue: r.queue,
            task: r.task,
        };
        let sample = recurring.envelope(Utc::now(), Utc::now());
        if let Err(e) = Envelope::parse(sample.as_bytes(), usize::MAX) {
            return Err(errs.at(
                at("task"),
                format!("the task is not a valid envelope: {e}"),
                "give it the fields of an envelope (docs/wire-format.md), e.g. {prompt: \"...\", type: research}",
            ));
        }
        out.recurring.push(recurring);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::config::Config;

    fn file(cron: &str, task: &str) -> String {
        format!(
            "providers:\n  - {{name: p, kind: ollama, models: [{{id: m, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}]}}\nscheduler:\n  recurring:\n    - name: nightly\n      cron: \"{cron}\"\n      task: {task}\n"
        )
    }

    fn parse(cron: &str, task: &str) -> crate::config::Result<Config> {
        Config::parse("p.yaml", &file(cron, task), &|_| None)
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
        let task = "{prompt: \"Summarise yesterday's errors\"}";
        for (cron, task, key) in [
            ("61 * * * *", task, "scheduler.recurring[0].cron"),
            ("0 2 * * * * 2030", task, "scheduler.recurring[0].cron"),
            ("every day", task, "scheduler.recurring[0].cron"),
            ("0 0 30 2 *", task, "scheduler.recurring[0].cron"),
            (
                "0 2 * * *",
                "{prompt: x, type: poetry}",
                "scheduler.recurring[0].task",
            ),
            (
                "0 2 * * *",
                "{prompt: x, metadata: team}",
                "scheduler.recurring[0].task.metadata",
            ),
            (
                "0 2 * * *",
                "{type: research}",
                "scheduler.recurring[0].task.prompt",
            ),
        ] {
            let Err(e) = parse(cron, task) else {
                panic!("accepted a bad task for {key}: {cron} {task}");
            };
            assert!(e.to_string().starts_with(&format!("p.yaml:{key}: ")), "{e}");
            assert!(!e.fix.is_empty());
        }
        let ok = parse("0 2 * * *", task).unwrap();
        assert_eq!(
            ok.scheduler.recurring[0].schedule,
            parse_cron("0 2 * * *").unwrap()
        );
    }

    #[test]
    fn the_envelope_carries_the_task_its_name_and_tick() {
        let config = parse(
            "0 2 * * *",
            "{prompt: Report, type: research, metadata: {team: data}}",
        )
        .unwrap();
        let job = &config.scheduler.recurring[0];
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

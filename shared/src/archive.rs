//! What the scheduler leaves for operators: dead letters archived to Postgres, the usage of
//! closed quota windows, and the scheduler's own status.
//!
//! `llmq-scheduler` writes all of it (only while it holds the lease); `llmq` reads it:
//! `llmq dlq list --archived` ([`list_archived`]), `llmq dlq replay` on archived ids
//! ([`replay_archived`]), `llmq quota --history` ([`quota_history`]) and the scheduler
//! section of `llmq status` ([`scheduler_status`]).
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use llmq_shared::{archive, queue::Client};
//!
//! let redis = Client::new("redis://127.0.0.1:6379")?;
//! for letter in archive::list_archived(&pool, "default", 20).await? {
//!     println!("{} {} {}", letter.id, letter.task_id, letter.error);
//! }
//! let replayed = archive::replay_archived(&redis, &pool, "default", &["<task id>".into()], None).await?;
//! let status = archive::scheduler_status(&redis, &Default::default()).await?;
//! println!("{} replayed; lease held by {:?}", replayed.len(), status.holder);
//! # Ok(()) }
//! ```

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::keys::{QueueKeys, SchedulerKeys, TASK_FIELD};
use crate::queue::{self, Client, DeadLetter, Replayed, replayed_task};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Redis(#[from] queue::Error),
    #[error("Postgres failed: {0}; is the database migrated (`llmq migrate`)?")]
    Postgres(#[from] sqlx::Error),
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Redis(queue::Error::Redis(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Fields of the [`SchedulerKeys::duties`] hash that start with this hold a recurring task's last
/// enqueued tick (ms since the epoch), e.g. `recurring:nightly-report`. Every other field is a
/// duty's last run ([`DutyRun`]).
pub const RECURRING_FIELD: &str = "recurring:";

/// One closed quota window of one provider (`llmq quota --history`).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct QuotaWindow {
    pub provider: String,
    /// `day` or `month`.
    pub window_kind: String,
    /// The window's first day (UTC); the 1st for a month.
    pub window_start: NaiveDate,
    /// Requests made that day; `None` on month rows (requests are counted per day).
    pub requests: Option<i64>,
    /// USD spent that month; `None` on day rows (spend is counted per month).
    pub usd: Option<f64>,
    pub closed_at: DateTime<Utc>,
}

/// The closed quota windows, newest first, of one provider or of all.
///
/// # Errors
/// Postgres fails (or is not migrated).
pub async fn quota_history(pool: &PgPool, provider: Option<&str>) -> Result<Vec<QuotaWindow>> {
    Ok(sqlx::query_as(
        "SELECT provider, window_kind, window_start, requests, usd::float8 AS usd, closed_at
         FROM quota_history
         WHERE $1::text IS NULL OR provider = $1
         ORDER BY window_start DESC, window_kind, provider",
    )
    .bind(provider)
    .fetch_all(pool)
    .await?)
}

/// A dead letter the scheduler moved from Redis to Postgres (`llmq dlq list --archived`).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct ArchivedLetter {
    /// The entry id it had in the queue's dead stream.
    pub id: String,
    pub task_id: String,
    pub queue: String,
    pub error: String,
    pub class: String,
    pub attempts: i64,
    pub failed_at: Option<DateTime<Utc>>,
    /// The envelope as it was when the task died (or the raw payload if it was not JSON).
    pub task: String,
    pub archived_at: DateTime<Utc>,
}

impl From<ArchivedLetter> for DeadLetter {
    fn from(a: ArchivedLetter) -> Self {
        DeadLetter {
            // Archived from a dead letter, whose id is a task id; else named as the queue's
            // reader names it.
            task_id: a.task_id.parse().unwrap_or_else(|_| {
                let entry = crate::ids::EntryId::parse(&a.id).unwrap_or_default();
                crate::envelope::task_id_of(&a.queue, entry, a.task.as_bytes())
            }),
            id: a.id,
            queue: a.queue,
            error: a.error,
            class: a.class,
            attempts: u64::try_from(a.attempts).unwrap_or(0),
            failed_at: a.failed_at,
            task: a.task,
        }
    }
}

const ARCHIVED_COLUMNS: &str =
    "dead_id AS id, task_id, queue, error, class, attempts, failed_at, task, archived_at";

/// The archived dead letters of `queue`, newest first, at most `limit`.
///
/// # Errors
/// Postgres fails (or is not migrated).
pub async fn list_archived(
    pool: &PgPool,
    queue: &str,
    limit: usize,
) -> Result<Vec<ArchivedLetter>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {ARCHIVED_COLUMNS} FROM dead_letters_archive WHERE queue = $1
         ORDER BY failed_at DESC NULLS LAST, dead_id DESC LIMIT $2"
    ))
    .bind(queue)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?)
}

/// The archived dead letters of `queue` whose dead-entry id or task id is one of `ids`, as
/// [`DeadLetter`]s (what `llmq dlq` shows and replays). They stay archived: see
/// [`replay_archived`], which removes each only once it is enqueued again.
///
/// # Errors
/// Postgres fails (or is not migrated).
pub async fn take_archived(pool: &PgPool, queue: &str, ids: &[String]) -> Result<Vec<DeadLetter>> {
    let rows: Vec<ArchivedLetter> = sqlx::query_as(&format!(
        "SELECT {ARCHIVED_COLUMNS} FROM dead_letters_archive
         WHERE queue = $1 AND (dead_id = ANY($2) OR task_id = ANY($2))
         ORDER BY dead_id"
    ))
    .bind(queue)
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(DeadLetter::from).collect())
}

/// Re-enqueues archived dead letters of `queue` (by dead-entry id or task id) with their
/// attempts reset and `replays` raised by one (and, if given, a new provider), as
/// [`Client::replay`] does for dead letters still in Redis; a chain step's letter resumes its
/// chain as [`Client::replay`] does (or is refused, and stays archived). Each archived row is
/// deleted only after its task is back in the stream, so a failure in between replays it at
/// most twice and never loses it. Returns what became of each letter, by dead-entry id.
///
/// The same step removes the task's stored `dead` record and, should the letter still be
/// in Redis too (the scheduler archived it but had not trimmed it yet), that copy.
///
/// # Errors
/// Redis or Postgres fails; letters replayed before the failure stay replayed.
pub async fn replay_archived(
    client: &Client,
    pool: &PgPool,
    queue: &str,
    ids: &[String],
    provider: Option<&str>,
) -> Result<Vec<(String, Replayed)>> {
    let keys = QueueKeys::new(queue);
    let letters = take_archived(pool, queue, ids).await?;
    let mut c = client.conn().await?;
    let mut out = Vec::with_capacity(letters.len());
    for dead in letters {
        let done = if crate::envelope::chain_step_of(dead.task.as_bytes()).is_some() {
            client.replay(&keys, &dead, provider).await?
        } else {
            // One MULTI: every key shares the queue's hash tag.
            redis::pipe()
                .atomic()
                .cmd("XADD")
                .arg(keys.stream())
                .arg("*")
                .arg(TASK_FIELD)
                .arg(replayed_task(&dead, provider))
                .ignore()
                .cmd("XDEL")
                .arg(keys.dead())
                .arg(&dead.id)
                .ignore()
                .del(keys.result(dead.task_id))
                .ignore()
                .query_async::<()>(&mut c)
                .await?;
            Replayed::Enqueued
        };
        if !matches!(done, Replayed::Refused(_)) {
            sqlx::query("DELETE FROM dead_letters_archive WHERE queue = $1 AND dead_id = $2")
                .bind(queue)
                .bind(&dead.id)
                .execute(pool)
                .await?;
        }
        out.push((dead.id, done));
    }
    Ok(out)
}

/// A duty's last run, as the scheduler stores it in the [`SchedulerKeys::duties`] hash (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DutyRun {
    /// When it ran, by the scheduler's clock.
    pub at: DateTime<Utc>,
    pub ok: bool,
    /// What it did, or its error.
    pub detail: String,
    /// The scheduler instance that ran it.
    pub holder: String,
    /// How often it runs, so readers can tell when it is overdue.
    pub every_ms: u64,
}

/// One duty in `llmq status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DutyStatus {
    pub name: String,
    pub last_run: Option<DateTime<Utc>>,
    pub ok: bool,
    pub detail: String,
    pub holder: String,
    /// The last run is older than three of its periods: no scheduler is doing this duty.
    pub overdue: bool,
}

impl DutyStatus {
    /// `overdue` (no scheduler does it), `ok` or `failed`, by its last run.
    #[must_use]
    pub fn state(&self) -> &'static str {
        match (self.ok, self.overdue) {
            (_, true) => "overdue",
            (true, false) => "ok",
            (false, false) => "failed",
        }
    }
}

/// One recurring task in `llmq status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecurringStatus {
    pub name: String,
    /// The last tick enqueued (or, before the first, when the scheduler started counting).
    pub last_tick: Option<DateTime<Utc>>,
}

/// The scheduler section of `llmq status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchedulerStatus {
    /// The instance holding the lease; `None` when no scheduler is active.
    pub holder: Option<String>,
    /// The fencing token of the latest takeover.
    pub fence: u64,
    /// How long the lease lasts unless renewed.
    pub lease_ttl_ms: Option<i64>,
    pub duties: Vec<DutyStatus>,
    pub recurring: Vec<RecurringStatus>,
}

/// The routing stats the scheduler last wrote; `None` before its first run (or after Redis
/// lost them, until its next).
///
/// # Errors
/// Redis fails, or what is stored is not a list of stats.
pub async fn routing_stats(
    client: &Client,
    keys: &SchedulerKeys,
) -> Result<Option<crate::routing::Stats>> {
    let mut c = client.conn().await?;
    let raw: Option<String> = redis::cmd("GET")
        .arg(keys.routing_stats())
        .query_async(&mut c)
        .await?;
    let Some(raw) = raw else { return Ok(None) };
    let rows: Vec<crate::routing::StatRow> = serde_json::from_str(&raw).map_err(|e| {
        queue::Error::Protocol(format!("the routing stats in Redis are not readable: {e}"))
    })?;
    Ok(Some(crate::routing::Stats::from_rows(rows)))
}

/// The scheduler's lease, fence and duties as of now.
///
/// # Errors
/// Redis fails.
pub async fn scheduler_status(client: &Client, keys: &SchedulerKeys) -> Result<SchedulerStatus> {
    scheduler_status_at(client, keys, Utc::now()).await
}

/// [`scheduler_status`] with `now` deciding what is overdue.
///
/// # Errors
/// Redis fails.
pub async fn scheduler_status_at(
    client: &Client,
    keys: &SchedulerKeys,
    now: DateTime<Utc>,
) -> Result<SchedulerStatus> {
    let mut c = client.conn().await?;
    let (holder, ttl, fence, fields): (Option<String>, i64, Option<u64>, HashMap<String, String>) =
        redis::pipe()
            .get(keys.lease())
            .pttl(keys.lease())
            .get(keys.fence())
            .hgetall(keys.duties())
            .query_async(&mut c)
            .await?;
    let mut duties = Vec::new();
    let mut recurring = Vec::new();
    for (field, value) in fields {
        if let Some(name) = field.strip_prefix(RECURRING_FIELD) {
            recurring.push(RecurringStatus {
                name: name.to_owned(),
                last_tick: value
                    .parse::<i64>()
                    .ok()
                    .and_then(DateTime::from_timestamp_millis),
            });
            continue;
        }
        duties.push(match serde_json::from_str::<DutyRun>(&value) {
            Ok(run) => {
                let late_after = i64::try_from(run.every_ms.saturating_mul(3))
                    .ok()
                    .and_then(chrono::Duration::try_milliseconds);
                DutyStatus {
                    overdue: late_after.is_some_and(|late| now - run.at > late),
                    name: field,
                    last_run: Some(run.at),
                    ok: run.ok,
                    detail: run.detail,
                    holder: run.holder,
                }
            }
            Err(e) => DutyStatus {
                name: field,
                last_run: None,
                ok: false,
                detail: format!("unreadable record ({e}): {value}"),
                holder: String::new(),
                overdue: true,
            },
        });
    }
    duties.sort_by(|a, b| a.name.cmp(&b.name));
    recurring.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(SchedulerStatus {
        lease_ttl_ms: holder.is_some().then_some(ttl).filter(|t| *t >= 0),
        holder,
        fence: fence.unwrap_or(0),
        duties,
        recurring,
    })
}

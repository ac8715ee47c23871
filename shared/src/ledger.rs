//! The Postgres ledger: every provider call with its tokens and cost, and every finished task.
//!
//! A call's row is written (outcome `started`) before the call is made and completed after it,
//! in batches (group commit), before the task it belongs to is acked. Rows are keyed by (task
//! id, delivery, call number, and `called_at`, fixed when the row is first written): the same
//! row written twice is one row, and a task delivered again after a worker died makes new rows
//! for its new calls, so the ledger holds every call a provider may bill, once.
//!
//! Both tables are partitioned by month (migration `20261127000001_partitions`): retention
//! drops whole months, and the rollups outlive them.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::envelope::Risk;
use crate::ids::TaskId;
use crate::outcome::TaskRecord;

/// The migrations in `migrations/`, embedded in every binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// The first migration that sums the whole ledger while it holds the ledger's writers
/// (`20261126000001_rollups`); a ledger before it has its history set aside for the
/// migrations ([`Ledger::migrate_telling`]).
const ROLLUPS: i64 = 20261126000001;

/// The longest a migration waits for a lock on the ledger's tables before it ends and is
/// made again: every writer that comes meanwhile queues behind it, and a worker's statement
/// should never wait a second (less than Postgres's `deadlock_timeout`, a second, so a
/// migration that meets a writer's triggers ends before a deadlock is even looked for).
const MIGRATION_LOCK_WAIT: &str = "300ms";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach Postgres ({0}); {fix}", fix = connect_fix(.0))]
    Connect(String),
    #[error("the database is not migrated ({0}); run `llmq migrate` first")]
    NotMigrated(String),
    /// An upgrade that cannot go on; the sentence says why and what to do.
    #[error("{0}")]
    Upgrade(String),
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("Postgres failed: {0}")]
    Query(#[from] sqlx::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to do about a connection that failed with `why`.
fn connect_fix(why: &str) -> &'static str {
    if why.contains("certificate") {
        "trust the CA that signed Postgres's certificate with sslrootcert=/path/to/ca.pem in DATABASE_URL, or check its host name"
    } else {
        "start it or set DATABASE_URL to where it runs"
    }
}

/// How a provider call went, as its ledger row's `outcome` says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CallOutcome {
    /// The call runs (its row is written before it is made), or its worker died during it.
    #[default]
    Started,
    /// The provider answered.
    Ok,
    /// The call failed; the row's `error_class` and `error` say how.
    Error,
    /// Its row was committed but its request was never sent: its attempt ended while it
    /// waited for its rate-limit window. It costs nothing and counts for no model.
    Unsent,
    /// The worker gave up waiting for it (the attempt's timeout, a shutdown).
    Abandoned,
    /// The answer cache answered: no call, no tokens, $0, and as list cost what the call it
    /// reuses cost.
    Cached,
}

impl CallOutcome {
    /// The outcome as the ledger, Lua and metrics name it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Unsent => "unsent",
            Self::Abandoned => "abandoned",
            Self::Cached => "cached",
        }
    }
}

/// One provider call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallRow {
    pub task_id: Uuid,
    /// This delivery of the task: a fresh id each time a worker takes it.
    pub delivery: Uuid,
    /// Replays from the dead letters before this call (0 for the first run).
    pub run: i32,
    pub attempt: i32,
    pub call_no: i32,
    pub queue: Arc<str>,
    pub chain_id: Option<String>,
    /// One of the task types' names ([`crate::envelope::TaskType::as_str`]): a constant,
    /// not allocated for any call or task.
    pub task_type: std::borrow::Cow<'static, str>,
    pub provider: Arc<str>,
    pub model: Arc<str>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: i64,
    /// Prompt tokens written to the provider's cache (a part of `input_tokens`).
    pub cache_write_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_usd: f64,
    pub latency_ms: i32,
    pub outcome: CallOutcome,
    pub error_class: Option<String>,
    pub error: Option<String>,
    pub worker: Arc<str>,
    /// When the call's row was first written (before any wait for a quota window); part of
    /// the key and the month partition, so it never changes.
    pub called_at: DateTime<Utc>,
    /// What the call would have cost at list prices: for a call made through a provider's
    /// batch API (billed at the batch price), and for one that read or wrote the provider's
    /// prompt cache (as if it had done neither). `None` when it is `cost_usd`.
    pub list_cost_usd: Option<f64>,
    /// Whose work its task was, and what for: the envelope's `tenant` and `tags` (a JSON
    /// object, [`Envelope::tags_json`](crate::envelope::Envelope::tags_json)).
    pub tenant: Option<String>,
    pub tags: Option<String>,
}

/// One finished task (succeeded or dead).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskRow {
    pub task_id: Uuid,
    pub queue: String,
    pub chain_id: Option<String>,
    pub task_type: String,
    pub status: String,
    pub attempts: i32,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: f64,
    pub error: Option<String>,
    pub error_class: Option<String>,
    pub finished_at: DateTime<Utc>,
    pub risk: Option<String>,
    pub duration_ms: i64,
    /// The learned strategy that chose its model, the probability it gave that model, and
    /// whether it explored; `None` under `cheapest` or a hint.
    pub strategy: Option<String>,
    pub propensity: Option<f64>,
    pub explored: Option<bool>,
    /// The route it chose from, `provider/model` in order (the first is its choice).
    pub candidates: Option<Vec<String>>,
    /// The batch it came in (the envelope's `batch_id`).
    pub batch_id: Option<String>,
    /// When it was enqueued (the envelope's `enqueued_at`, when its producer gave one): with
    /// `finished_at`, the span its rows were written in, which bounds the partitions a write
    /// looks in for them (migration `20261203000002_task_spans`).
    pub enqueued_at: Option<DateTime<Utc>>,
    /// Its envelope's `tenant` and `tags` (a JSON object), as its calls have them.
    pub tenant: Option<String>,
    pub tags: Option<String>,
}

impl TaskRow {
    /// The row of task `task_id` (its id as parsed when it was admitted), whose stored
    /// outcome is `record`. The batch and the enqueue time are not in the record: set them
    /// after.
    #[must_use]
    pub fn of(task_id: TaskId, record: &TaskRecord, risk: Option<Risk>) -> Self {
        Self {
            task_id: task_id.uuid(),
            queue: record.queue.clone(),
            chain_id: record.chain_id.clone(),
            task_type: record.task_type.as_deref().unwrap_or("unknown").to_owned(),
            status: record.status.to_string(),
            attempts: i32::try_from(record.attempts).unwrap_or(i32::MAX),
            provider: record.provider.clone(),
            model: record.model.clone(),
            input_tokens: i64::try_from(record.input_tokens).unwrap_or(i64::MAX),
            output_tokens: i64::try_from(record.output_tokens).unwrap_or(i64::MAX),
            cost_usd: record.cost_usd,
            error: record.error.clone(),
            error_class: record.error_class.map(|c| c.to_string()),
            finished_at: record.finished_at.unwrap_or_else(Utc::now),
            risk: risk.map(|k| k.as_str().to_owned()),
            duration_ms: i64::try_from(record.duration_ms).unwrap_or(i64::MAX),
            strategy: record.learned.as_ref().map(|l| l.strategy.clone()),
            propensity: record.learned.as_ref().map(|l| l.propensity),
            explored: record.learned.as_ref().map(|l| l.explored),
            candidates: record.learned.as_ref().map(|l| l.candidates.clone()),
            batch_id: None,
            enqueued_at: None,
            tenant: None,
            tags: None,
        }
    }

    /// `enqueued_at` as the ledger keeps it. A producer writes it, and may write any time: one
    /// more than ten years before the finish is no clock's and is not kept (Postgres cannot
    /// store the earliest dates a producer can write, and the task would lose its row).
    fn enqueued(&self) -> Option<DateTime<Utc>> {
        const LONGEST_LIFE: chrono::TimeDelta = chrono::TimeDelta::days(3650);
        self.enqueued_at
            .filter(|e| self.finished_at.signed_duration_since(*e) <= LONGEST_LIFE)
    }
}

/// The span the rows of a batch's tasks were written in, as `ledger_span_from` and
/// `ledger_span_until` take it (migration `20261203000002_task_spans`, which adds the margin):
/// the earliest of the tasks' enqueues and finishes, `None` when a task's enqueue is not
/// known (the span then has no start), and the latest finish.
fn span(tasks: &[TaskRow]) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let from = tasks
        .iter()
        .map(|t| t.enqueued().map(|e| e.min(t.finished_at)))
        .min()
        .flatten();
    let until = tasks.iter().map(|t| t.finished_at).max();
    (from, until)
}

/// A review's or check's verdict on the output of the task it judged: the task's model did
/// (`true`) or did not do the work well, for learned routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub task_id: Uuid,
    pub approved: bool,
}

/// One line of a cost report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct CostLine {
    pub key: String,
    pub calls: i64,
    pub tasks: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: i64,
    pub cost_usd: f64,
    /// What provider batches and the providers' prompt caches saved against list prices
    /// (negative when cache writes no read followed cost more).
    pub saved_usd: f64,
}

/// One task of a chain in a cost report.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChainTask {
    pub task_id: Uuid,
    pub task_type: String,
    /// `provider/model` of every call, in call order, without repeats.
    pub models: Vec<String>,
    pub calls: i64,
    pub cost_usd: f64,
    pub first_call: DateTime<Utc>,
}

/// The instants of a report's whole UTC days, `since` to `until` both included: from
/// `since`'s midnight to the midnight after `until`, as [`Ledger::costs`] takes them. `None`
/// when `since` is after `until` (the caller says so in its own words).
#[must_use]
pub fn days(
    since: chrono::NaiveDate,
    until: chrono::NaiveDate,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let midnight = |d: chrono::NaiveDate| d.and_time(chrono::NaiveTime::MIN).and_utc();
    (since <= until).then(|| (midnight(since), midnight(until) + chrono::Duration::days(1)))
}

/// What `llmq costs` groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy<'a> {
    Provider,
    Model,
    TaskType,
    Day,
    Chain,
    /// The envelope's `tenant`; the line of work with none has the key `""`.
    Tenant,
    /// The value of one of the envelope's `tags`; the line of work without it has the key
    /// `""`.
    Tag(&'a str),
}

impl<'a> GroupBy<'a> {
    /// The groupings `llmq web`'s costs page shows, in its order (by day first, for its
    /// chart): what it reads for a range, with [`Ledger::costliest_chains`].
    pub const PAGE: [GroupBy<'static>; 5] = [
        GroupBy::Day,
        GroupBy::Provider,
        GroupBy::Model,
        GroupBy::TaskType,
        GroupBy::Tenant,
    ];

    /// The key over `call_rollups`, `task_rollups` and `spend_rollups`; none by chain
    /// (`chain_costs`).
    fn rollup_key(self) -> Option<&'static str> {
        match self {
            GroupBy::Provider => Some("provider"),
            GroupBy::Model => Some("provider || '/' || model"),
            GroupBy::TaskType => Some("task_type"),
            GroupBy::Day => Some("to_char(day, 'YYYY-MM-DD')"),
            GroupBy::Chain => None,
            GroupBy::Tenant => Some("tenant"),
            GroupBy::Tag(_) => Some("value"),
        }
    }

    /// The key over raw rows, whose time column is `at` (a tag's name is `$4`).
    fn raw_key(self, at: &str) -> String {
        match self {
            GroupBy::Provider => "provider".into(),
            GroupBy::Model => "provider || '/' || model".into(),
            GroupBy::TaskType => "task_type".into(),
            GroupBy::Day => format!("to_char({at} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"),
            GroupBy::Chain => "coalesce(chain_id, '-')".into(),
            GroupBy::Tenant => "coalesce(tenant, '')".into(),
            GroupBy::Tag(_) => "coalesce(tags ->> $4, '')".into(),
        }
    }

    /// The tag whose groups a report reads from `spend_rollups` (`''`: the tenants' whole
    /// spend), as `$4`.
    fn tag(self) -> &'a str {
        match self {
            GroupBy::Tag(name) => name,
            _ => "",
        }
    }
}

/// Which tasks' costs a report covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every task: read from the rollups.
    All,
    /// One chain's, from its raw rows.
    Chain(&'a str),
    /// One batch's (the envelope's `batch_id`): its finished tasks, from their raw rows,
    /// and their calls, by task id.
    Batch(&'a str),
    /// One tenant's: read from `spend_rollups` (by chain, from the raw rows).
    Tenant(&'a str),
}

impl<'a> Scope<'a> {
    /// The SQL that picks the scope's raw rows of a table, by `$3`.
    fn rows(self) -> &'static str {
        match self {
            Scope::All => "true",
            Scope::Chain(_) => "chain_id = $3",
            Scope::Batch(_) => {
                "task_id = ANY(ARRAY(SELECT task_id FROM tasks WHERE batch_id = $3))"
            }
            Scope::Tenant(_) => "tenant = $3",
        }
    }

    fn tasks(self) -> &'static str {
        match self {
            Scope::Batch(_) => "batch_id = $3",
            other => other.rows(),
        }
    }

    /// What `$3` is.
    fn id(self) -> Option<&'a str> {
        match self {
            Scope::All => None,
            Scope::Chain(id) | Scope::Batch(id) | Scope::Tenant(id) => Some(id),
        }
    }
}

/// The whole UTC days `[since, until)` covers, as SQL over `$1` and `$2` (timestamps): from
/// `since`'s day to the day `until` ends in.
const DAYS: &str = "day >= ($1 AT TIME ZONE 'UTC')::date
    AND day < (($2 - interval '1 microsecond') AT TIME ZONE 'UTC')::date + 1";

/// A cost line's sums over a rollup of calls, named as [`CostLine`]'s.
const CALL_SUMS: &str = "sum(calls) AS calls, sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens, sum(cached_tokens) AS cached_tokens,
    sum(cost_usd) AS cost_usd, sum(batch_saved_usd) AS batch_saved_usd";

/// The calls' and the tasks' lines of a report from `spend_rollups`: `scope`'s (every
/// tenant's, or `$3`'s) spend grouped by `key`, of the tag `$4` (`''`: none). By tenant or
/// tag the line `''` is the work without one: the whole of the scope's spend (the other
/// rollups', or the tenant's) less the lines with one.
fn spend_sql(scope: Scope<'_>, by: GroupBy<'_>, key: &str) -> (String, String) {
    const CALLS: &str =
        "calls, input_tokens, output_tokens, cached_tokens, cost_usd, batch_saved_usd";
    // Every tenant's, by tenant or by a tag: `spend_days`, whose `value` is the tenant (no
    // tag) or the tag's value; one tenant's, `spend_rollups`.
    let (table, key, of) = match scope {
        Scope::All => ("spend_days", "value", format!("{DAYS} AND tag = $4")),
        _ => (
            "spend_rollups",
            key,
            format!("{DAYS} AND tag = $4 AND tenant = $3"),
        ),
    };
    let part = |columns: &str, whole: &str| {
        let negated = columns
            .split(", ")
            .map(|c| format!("-{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let rest = match (scope, by) {
            (Scope::All, _) => format!(
                "UNION ALL SELECT '', {columns} FROM {whole} WHERE {DAYS}
                 UNION ALL SELECT '', {negated} FROM {table} WHERE {of}"
            ),
            (_, GroupBy::Tag(_)) => format!(
                "UNION ALL SELECT '', {columns} FROM spend_rollups
                    WHERE {DAYS} AND tag = '' AND tenant = $3
                 UNION ALL SELECT '', {negated} FROM {table} WHERE {of}"
            ),
            _ => String::new(),
        };
        format!("SELECT {key} AS key, {columns} FROM {table} WHERE {of} {rest}")
    };
    (
        format!(
            "SELECT key, {CALL_SUMS} FROM ({}) s GROUP BY 1
             HAVING sum(calls) <> 0 OR sum(cost_usd) <> 0",
            part(CALLS, "call_rollups")
        ),
        format!(
            "SELECT key, sum(tasks) AS tasks FROM ({}) s GROUP BY 1",
            part("tasks", "task_rollups")
        ),
    )
}

/// The Postgres ledger.
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: PgPool,
}

/// An index of `tasks` or `provider_calls` that `llmq migrate` builds after the migrations
/// ([`Ledger::build_late_indexes`]): on a populated ledger a plain `CREATE INDEX` in a
/// migration would lock the tasks for the length of a scan.
struct LateIndex {
    /// `tasks` or `provider_calls`.
    table: &'static str,
    name: &'static str,
    /// A partition's index is named the partition's name and this.
    suffix: &'static str,
    /// What follows `ON <table>`.
    def: &'static str,
    /// For `llmq migrate`'s progress: "indexing <what> of <partition>".
    what: &'static str,
}

const LATE_INDEXES: &[LateIndex] = &[
    // A batch's tasks (`llmq costs --batch`, the page), migration 20261201000001.
    LateIndex {
        table: "tasks",
        name: "tasks_batch_id",
        suffix: "_batch_id",
        def: "(batch_id) WHERE batch_id IS NOT NULL",
        what: "the batch ids",
    },
    // The tasks that did not succeed, newest first, for the page's task search: a few in a
    // hundred rows, so a B-tree entry for those alone.
    LateIndex {
        table: "tasks",
        name: "tasks_unsucceeded",
        suffix: "_unsucceeded",
        def: "(finished_at DESC, task_id DESC) WHERE status <> 'succeeded'",
        what: "the tasks that did not succeed",
    },
    // Every task by when it finished, for the task search's windows: rows are appended in
    // about that order, so a block range's summary costs a write next to nothing (a B-tree
    // entry per row is what 20261203000001 took away).
    LateIndex {
        table: "tasks",
        name: "tasks_finished_brin",
        suffix: "_finished_brin",
        def: "USING brin (finished_at) WITH (autosummarize = on)",
        what: "the finish times",
    },
    // The same of every call by when it was made, for the page's charts of the last hour
    // and day.
    LateIndex {
        table: "provider_calls",
        name: "provider_calls_called_brin",
        suffix: "_called_brin",
        def: "USING brin (called_at) WITH (autosummarize = on)",
        what: "the call times",
    },
];

impl Ledger {
    /// Connects to `url`.
    ///
    /// # Errors
    /// Postgres cannot be reached.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        crate::tls::install_crypto_provider();
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| Error::Connect(e.to_string()))?;
        Ok(Self { pool })
    }

    #[must_use]
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies every pending migration.
    ///
    /// # Errors
    /// A migration fails.
    pub async fn migrate(&self) -> Result<()> {
        self.migrate_telling(&mut |_| {}).await
    }

    /// [`Ledger::migrate`], telling `say` what it does as it goes: each migration as it
    /// starts and how long it took, and the long steps' progress with an estimate of the
    /// time left (on a populated ledger they take minutes: building indexes, copying the task
    /// views). Every step resumes where an interrupted run stopped.
    ///
    /// # Errors
    /// A migration fails.
    pub async fn migrate_telling(&self, say: &mut (dyn FnMut(String) + Send)) -> Result<()> {
        self.set_history_aside(say).await?;
        self.prepare_partitions(say).await?;
        let applied = self.applied().await?;
        let pending: Vec<usize> = (0..MIGRATOR.migrations.len())
            .filter(|&i| !applied.contains(&MIGRATOR.migrations[i].version))
            .collect();
        let rows = self.rows_estimate(true).await?;
        let held = self.rows_estimate(false).await?;
        for (n, i) in pending.iter().enumerate() {
            let m = &MIGRATOR.migrations[*i];
            let holds = if m.sql.contains("LOCK TABLE provider_calls, tasks") && held > 0 {
                format!("; it reads ~{held} rows, and the ledger's writers wait until it ends")
            } else {
                String::new()
            };
            say(format!(
                "migration {} of {}: {} ({}){holds}",
                n + 1,
                pending.len(),
                m.version,
                m.description
            ));
            let started = std::time::Instant::now();
            // The migrations up to this one: sqlx applies the one that is missing.
            let upto = Migrator {
                migrations: std::borrow::Cow::Borrowed(&MIGRATOR.migrations[..=*i]),
                ignore_missing: true,
                ..Migrator::DEFAULT
            };
            self.run_migrator(&upto).await?;
            say(format!(
                "migration {} done in {:.1} s",
                m.version,
                started.elapsed().as_secs_f64()
            ));
        }
        self.run_migrator(&MIGRATOR).await?;
        // The copy first, over what was written since the history was set aside (a worker of
        // the release before wrote calls without their tasks' views); the history's calls
        // get theirs as they move.
        let copied = self.copy_task_views(say).await?;
        let copied = self.move_history(say).await? || copied;
        self.build_late_indexes(say).await?;
        if rows > 0 && (copied || !pending.is_empty()) {
            // Copying the task views moved the routing rollups a batch at a time, from
            // several sessions: each key's shards folded into one row, so routing stats
            // read as many rows as on a ledger filled since.
            let folded: i64 = sqlx::query_scalar("SELECT ledger_compact_routing(current_date)")
                .fetch_one(&self.pool)
                .await?;
            say(format!(
                "folded {folded} routing rollup rows into one per key and day"
            ));
            // The copy wrote a new version of every call; the page ranges it filled are
            // summarized in `written`'s BRIN indexes only when autovacuum gets to them
            // (requests past its queue are dropped), and until then every roll reads each
            // of them whole: 39 ranges, 115 ms a roll, at 1M calls. Summarized now.
            let ranges: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(brin_summarize_new_values(h.inhrelid::regclass)), 0)::int8
                 FROM pg_inherits h
                 WHERE h.inhparent IN ('provider_calls_written'::regclass,
                    'tasks_written'::regclass)",
            )
            .fetch_one(&self.pool)
            .await?;
            say(format!(
                "summarized {ranges} new page ranges of the ledger's BRIN indexes"
            ));
            // Columns the migrations added have no statistics until the next ANALYZE, and
            // plans of the first reports would be made without them. Writers go on.
            say(format!(
                "analyzing the ledger's ~{rows} rows, the tables open to writers"
            ));
            sqlx::query("ANALYZE provider_calls, tasks")
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Runs `migrator` on a connection of its own.
    async fn run_migrator(&self, migrator: &Migrator) -> Result<()> {
        // A migration that replaces tables meets the writers' triggers, which reach from
        // `tasks` into `provider_calls`, in the other order; and every writer that comes
        // while a migration waits for a table queues behind it. So a migration waits at most
        // `MIGRATION_LOCK_WAIT` for a lock, less than Postgres's `deadlock_timeout` (a
        // second), and ends rather than hold the writers longer: rolled back whole, it is
        // made again. A writer ended by a deadlock writes again, as every ledger write does.
        const GIVE_UP: std::time::Duration = std::time::Duration::from_secs(600);
        let started = std::time::Instant::now();
        loop {
            let mut conn = self.pool.acquire().await?;
            sqlx::query(&format!("SET lock_timeout = '{MIGRATION_LOCK_WAIT}'"))
                .execute(&mut *conn)
                .await?;
            let Err(e) = migrator.run(&mut *conn).await else {
                sqlx::query("RESET lock_timeout")
                    .execute(&mut *conn)
                    .await?;
                return Ok(());
            };
            // sqlx leaves its migration lock (a session's advisory lock) held when a
            // migration fails: the connection is closed, not handed back to the pool, where
            // the next migration on another of its connections would wait for it for ever.
            let _ = conn.close().await;
            let code = match &e {
                sqlx::migrate::MigrateError::ExecuteMigration(sqlx::Error::Database(d), _)
                | sqlx::migrate::MigrateError::Execute(sqlx::Error::Database(d)) => d.code(),
                _ => None,
            };
            // deadlock_detected, lock_not_available
            let locked = matches!(code.as_deref(), Some("40P01" | "55P03"));
            if locked && started.elapsed() < GIVE_UP {
                continue;
            }
            // The CHECKs the preparation added would refuse every row written after their
            // cutoff (a week or more ahead) if the tables stayed as they are.
            self.drop_partition_checks(None).await;
            return Err(if locked {
                Error::Upgrade(format!(
                    "a migration tried for {} minutes to lock the ledger's tables and another \
                     transaction held them each time ({e}); end that transaction (\
                     pg_stat_activity names it) and run `llmq migrate` again",
                    GIVE_UP.as_secs() / 60
                ))
            } else {
                e.into()
            });
        }
    }

    /// The versions of the migrations applied (none on a new database).
    async fn applied(&self) -> Result<Vec<i64>> {
        match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&self.pool)
            .await
        {
            Ok(v) => Ok(v),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// About how many rows the ledger holds, calls and tasks, from the statistics (no scan);
    /// `history`: with those set aside ([`Ledger::set_history_aside`]).
    async fn rows_estimate(&self, history: bool) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::int8 FROM pg_class c
             WHERE c.relkind = 'r' AND (c.relname IN ('provider_calls', 'tasks')
                OR c.relname LIKE 'provider\\_calls\\_%' OR c.relname LIKE 'tasks\\_%')
                AND c.relnamespace = current_schema()::regnamespace
                AND ($1 OR c.relname NOT LIKE '%\\_history')",
        )
        .bind(history)
        .fetch_one(&self.pool)
        .await?)
    }

    /// On a ledger of a release before rollups (none of the migrations from
    /// [`ROLLUPS`] applied) that holds rows, sets its two tables aside as
    /// `provider_calls_history` and `tasks_history` and puts empty tables of the same shapes
    /// (made by the migrations it has applied) in their place, in one transaction that waits
    /// at most a second for its locks (tried again until it has them). The migrations after
    /// it then read no history while they hold the ledger's writers: four of them lock both
    /// tables for a scan (10 s at a million calls, with every writer waiting). Workers keep
    /// writing the new tables meanwhile; [`Ledger::move_history`] brings the history back
    /// with the tables open. Nothing to do on any other ledger, or once the history is set
    /// aside.
    async fn set_history_aside(&self, say: &mut (dyn FnMut(String) + Send)) -> Result<()> {
        let applied = self.applied().await?;
        if applied.is_empty() || applied.iter().any(|&v| v >= ROLLUPS) {
            return Ok(());
        }
        let (aside, rows): (bool, bool) = sqlx::query_as(
            "SELECT to_regclass('tasks_history') IS NOT NULL,
                EXISTS (SELECT FROM provider_calls) OR EXISTS (SELECT FROM tasks)",
        )
        .fetch_one(&self.pool)
        .await?;
        if aside || !rows {
            return Ok(());
        }
        say(
            "setting the ledger's history aside (provider_calls_history, tasks_history) \
             for the migrations; the ledger's tables stay open to writers"
                .to_owned(),
        );
        let (schema, path): (String, String) =
            sqlx::query_as("SELECT current_schema()::text, current_setting('search_path')")
                .fetch_one(&self.pool)
                .await?;
        // A transaction that holds a table longer than this is an operator's to end.
        const TRIES: u32 = 450;
        for tried in 1..=TRIES {
            let mut tx = self.pool.begin().await?;
            let swapped = async {
                sqlx::raw_sql(&format!(
                    "SET LOCAL lock_timeout = '{MIGRATION_LOCK_WAIT}';
                     DROP SCHEMA IF EXISTS llmq_shapes CASCADE;
                     CREATE SCHEMA llmq_shapes;
                     SET LOCAL search_path = llmq_shapes;"
                ))
                .execute(&mut *tx)
                .await?;
                for m in MIGRATOR.iter().filter(|m| applied.contains(&m.version)) {
                    sqlx::raw_sql(&m.sql).execute(&mut *tx).await?;
                }
                sqlx::query("SELECT set_config('search_path', $1, true)")
                    .bind(&path)
                    .execute(&mut *tx)
                    .await?;
                sqlx::raw_sql(&format!(
                    "ALTER TABLE provider_calls RENAME TO provider_calls_history;
                     ALTER TABLE tasks RENAME TO tasks_history;
                     DO $$
                     DECLARE ix text;
                     BEGIN
                         FOR ix IN SELECT c.relname FROM pg_index i
                             JOIN pg_class c ON c.oid = i.indexrelid
                             WHERE i.indrelid IN ('provider_calls_history'::regclass,
                                 'tasks_history'::regclass)
                         LOOP
                             EXECUTE format('ALTER INDEX %I RENAME TO %I', ix, ix || '_history');
                         END LOOP;
                     END $$;
                     ALTER TABLE llmq_shapes.provider_calls SET SCHEMA \"{schema}\";
                     ALTER TABLE llmq_shapes.tasks SET SCHEMA \"{schema}\";
                     DROP SCHEMA llmq_shapes CASCADE;",
                    schema = schema.replace('"', "\"\"")
                ))
                .execute(&mut *tx)
                .await?;
                Ok::<_, sqlx::Error>(())
            }
            .await;
            match swapped {
                Ok(()) => {
                    tx.commit().await?;
                    return Ok(());
                }
                // lock_not_available: a long transaction holds a table; the writers that
                // queued behind the attempt go on, and it is made again.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                    drop(tx);
                    say(format!(
                        "waiting for the ledger's tables to set its history aside ({tried} of {TRIES})"
                    ));
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Upgrade(
            "another transaction held the ledger's tables for the 6 minutes llmq migrate \
             waited to set its history aside; end it (see pg_stat_activity) and run \
             `llmq migrate` again"
                .to_owned(),
        ))
    }

    /// Moves the rows [`Ledger::set_history_aside`] set aside back into the ledger, 10,000
    /// tasks' rows (and their calls) per transaction, with the tables open to writers: each
    /// call carries its task's view (status, verdict, risk), each row is summed by the next
    /// roll like a new one, a call already written again meanwhile (a `started` row
    /// completed) keeps its newer row, and a task finished again meanwhile keeps its newer
    /// finish. Each batch is deleted from the history as it is moved, so an interrupted run
    /// resumes where it stopped; the history tables are dropped at the end. Whether it moved
    /// any.
    async fn move_history(&self, say: &mut (dyn FnMut(String) + Send)) -> Result<bool> {
        const BATCH: i64 = 10_000;
        let aside: bool = sqlx::query_scalar("SELECT to_regclass('tasks_history') IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        if !aside {
            return Ok(false);
        }
        // The columns the history has (those of the release it came from); `written` is
        // left to its default, so that the roll sums the rows.
        let calls = self.columns_of("provider_calls_history").await?;
        let tasks = self.columns_of("tasks_history").await?;
        let (move_calls, move_tasks) = history_moves(&calls, &tasks);
        let started = std::time::Instant::now();
        let at = through;
        let mut after = Uuid::nil();
        let mut batches = 0_u64;
        loop {
            // The next 10,000 tasks' ids, or once none is left, the next 10,000 calls' (of
            // tasks that never finished).
            let mut last = None;
            for table in ["tasks_history", "provider_calls_history"] {
                last = sqlx::query_scalar::<_, Uuid>(&format!(
                    "SELECT task_id FROM (SELECT task_id FROM {table} WHERE task_id > $1
                        ORDER BY task_id LIMIT $2) s ORDER BY task_id DESC LIMIT 1"
                ))
                .bind(after)
                .bind(BATCH)
                .fetch_optional(&self.pool)
                .await?;
                if last.is_some() {
                    break;
                }
            }
            let Some(last) = last else { break };
            let mut tx = self.pool.begin().await?;
            for sql in [&move_calls, &move_tasks] {
                sqlx::query(sql)
                    .bind(after)
                    .bind(last)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            after = last;
            batches += 1;
            if batches.is_multiple_of(10) {
                // Summed as it goes, so that no roll has the whole history to sum at once.
                roll(&self.pool).await?;
                let done = at(last);
                let rate = done / started.elapsed().as_secs_f64().max(1e-3);
                say(format!(
                    "moving the history back: {:.0} % ({} tasks this run, about {:.0} s left); \
                     an interrupted run resumes here",
                    done * 100.0,
                    batches * BATCH as u64,
                    (1.0 - done) / rate.max(1e-9)
                ));
            }
        }
        sqlx::query("DROP TABLE provider_calls_history, tasks_history")
            .execute(&self.pool)
            .await?;
        roll(&self.pool).await?;
        say("moved the history back and summed it".to_owned());
        Ok(true)
    }

    /// The columns of `table`, quoted, in order, but `written`: a row moved is summed by
    /// the next roll, as a new one.
    async fn columns_of(&self, table: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT quote_ident(attname) FROM pg_attribute
             WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped
                AND attname <> 'written'
             ORDER BY attnum",
        )
        .bind(table)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Builds each of [`LATE_INDEXES`] without locking the ledger for a scan: the parent's
    /// index made on it alone, then each partition's CONCURRENTLY and attached (a partition
    /// made later gets its own as it is attached). An interrupted run builds what is missing,
    /// an index cut off mid-build again. Nothing to do once the parent's index is valid.
    async fn build_late_indexes(&self, say: &mut (dyn FnMut(String) + Send)) -> Result<()> {
        for index in LATE_INDEXES {
            self.build_late_index(index, say).await?;
        }
        Ok(())
    }

    async fn build_late_index(
        &self,
        index: &LateIndex,
        say: &mut (dyn FnMut(String) + Send),
    ) -> Result<()> {
        let LateIndex {
            table,
            name,
            suffix,
            def,
            what,
        } = *index;
        let valid: Option<bool> = sqlx::query_scalar(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE c.relname = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        if valid == Some(true) {
            return Ok(());
        }
        // One session builds it; another `llmq migrate` waits for it, then finds it valid.
        let lock = format!("llmq {name}");
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
            .bind(&lock)
            .execute(&mut *conn)
            .await?;
        let built = async {
            sqlx::query(&format!(
                "CREATE INDEX IF NOT EXISTS {name} ON ONLY {table} {def}"
            ))
            .execute(&mut *conn)
            .await?;
            // The partitions without theirs attached, and any index of theirs left invalid.
            let parts: Vec<(String, Option<bool>)> = sqlx::query_as(
                "SELECT p.relname::text,
                    (SELECT x.indisvalid FROM pg_class xc JOIN pg_index x ON x.indexrelid = xc.oid
                     WHERE xc.relname = p.relname || $2)
                 FROM pg_inherits h JOIN pg_class p ON p.oid = h.inhrelid
                 WHERE h.inhparent = $3::regclass
                   AND NOT EXISTS (SELECT FROM pg_inherits hi
                       JOIN pg_index x ON x.indexrelid = hi.inhrelid
                       WHERE hi.inhparent = $1::regclass AND x.indrelid = p.oid)
                 ORDER BY 1",
            )
            .bind(name)
            .bind(suffix)
            .bind(table)
            .fetch_all(&mut *conn)
            .await?;
            for (part, index_valid) in parts {
                let index = format!("{part}{suffix}");
                if index_valid == Some(false) {
                    sqlx::query(&format!("DROP INDEX CONCURRENTLY IF EXISTS \"{index}\""))
                        .execute(&mut *conn)
                        .await?;
                }
                say(format!("indexing {what} of {part}"));
                sqlx::query(&format!(
                    "CREATE INDEX CONCURRENTLY IF NOT EXISTS \"{index}\" ON \"{part}\" {def}"
                ))
                .execute(&mut *conn)
                .await?;
                sqlx::query(&format!("ALTER INDEX {name} ATTACH PARTITION \"{index}\""))
                    .execute(&mut *conn)
                    .await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        let _ = sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
            .bind(&lock)
            .execute(&mut *conn)
            .await;
        built
    }

    /// Drops the CHECKs [`Ledger::prepare_partitions`] added (an earlier run's too) to
    /// `table`, or to both tables, while still unpartitioned. Best effort: a CHECK left
    /// behind is dropped by the next run.
    async fn drop_partition_checks(&self, table: Option<&str>) {
        let checks: Vec<(String, String)> = sqlx::query_as(
            "SELECT c.relname::text, k.conname::text FROM pg_constraint k
             JOIN pg_class c ON c.oid = k.conrelid
             WHERE c.relkind = 'r' AND c.relname IN ('provider_calls', 'tasks')
               AND ($1::text IS NULL OR c.relname = $1)
               AND k.conname LIKE c.relname || '_before_%'",
        )
        .bind(table)
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        for (table, name) in checks {
            let name = name.replace('"', "\"\"");
            let dropped = sqlx::query(&format!("ALTER TABLE {table} DROP CONSTRAINT \"{name}\""))
                .execute(&self.pool)
                .await;
            if let Err(e) = dropped {
                tracing::warn!(
                    "cannot drop {name} from {table} after a failed migration ({e}); drop it before its date or rows after it are refused"
                );
            }
        }
    }

    /// Before migration `20261127000001_partitions` on a ledger that has rows, what would
    /// otherwise lock it for a scan: the keys that include the time, built CONCURRENTLY, and
    /// the CHECK that every row is before the first month boundary a week ahead and after
    /// the newest row (the old table's range as a partition), validated with the table open. Each statement is its
    /// own transaction; an interrupted run leaves what it finished, and an invalid index
    /// (a CONCURRENTLY build cut off) is built again. Nothing to do on a new or partitioned
    /// ledger.
    async fn prepare_partitions(&self, say: &mut (dyn FnMut(String) + Send)) -> Result<()> {
        for (table, column, key) in [
            (
                "provider_calls",
                "called_at",
                "(task_id, delivery, call_no, called_at)",
            ),
            ("tasks", "finished_at", "(task_id, finished_at)"),
        ] {
            let kind: Option<String> = sqlx::query_scalar(
                "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)",
            )
            .bind(table)
            .fetch_optional(&self.pool)
            .await?;
            // 'r': an ordinary table, the ledger as it was before partitions.
            if kind.as_deref() != Some("r") {
                continue;
            }
            let invalid: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = to_regclass($1)
                    AND NOT indisvalid)",
            )
            .bind(format!("{table}_key"))
            .fetch_one(&self.pool)
            .await?;
            if invalid {
                sqlx::query(&format!("DROP INDEX CONCURRENTLY {table}_key"))
                    .execute(&self.pool)
                    .await?;
            }
            say(format!(
                "building {table}_key {key}, the table open to writers"
            ));
            sqlx::query(&format!(
                "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {table}_key ON {table} {key}"
            ))
            .execute(&self.pool)
            .await?;
            // After every row (a clock ahead may have written some in a later month).
            let (day, at): (String, String) = sqlx::query_as(&format!(
                "SELECT to_char(m, 'YYYYMMDD'), to_char(m, 'YYYY-MM-DD') || ' 00:00:00+00'
                 FROM (SELECT date_trunc('month', greatest(now() + interval '7 days',
                    (SELECT max({column}) FROM {table})), 'UTC') + interval '1 month' AS m) c"
            ))
            .fetch_one(&self.pool)
            .await?;
            let check = format!("{table}_before_{day}");
            // A CHECK an earlier run left with another cutoff would refuse rows after it.
            self.drop_partition_checks(Some(table)).await;
            say(format!(
                "checking every row of {table} is before {at}, the table open to writers"
            ));
            sqlx::query(&format!(
                "ALTER TABLE {table} ADD CONSTRAINT {check}
                    CHECK ({column} < '{at}'::timestamptz) NOT VALID"
            ))
            .execute(&self.pool)
            .await?;
            sqlx::query(&format!("ALTER TABLE {table} VALIDATE CONSTRAINT {check}"))
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Copies each task's status, verdict and risk to its calls written before migration
    /// `20261126000002_routing_rollups` (which records where the copy stands), 10,000 tasks
    /// per transaction, resuming where an interrupted run stopped; the rollups move with
    /// every row changed. Nothing to do once it is done. Whether it copied any.
    async fn copy_task_views(&self, say: &mut (dyn FnMut(String) + Send)) -> Result<bool> {
        const BATCH: i64 = 10_000;
        let mut batches = 0_u64;
        let started = std::time::Instant::now();
        let at = through;
        let mut first = None;
        loop {
            let mut tx = self.pool.begin().await?;
            let after: Option<Uuid> = sqlx::query_scalar(
                "SELECT after FROM ledger_backfills WHERE name = 'task_views' FOR UPDATE",
            )
            .fetch_optional(&mut *tx)
            .await?;
            let Some(after) = after else {
                return Ok(batches > 0);
            };
            first.get_or_insert(at(after));
            let last: Option<Uuid> = sqlx::query_scalar(
                "SELECT task_id FROM (SELECT task_id FROM tasks WHERE task_id > $1
                    ORDER BY task_id LIMIT $2) s ORDER BY task_id DESC LIMIT 1",
            )
            .bind(after)
            .bind(BATCH)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(last) = last else {
                sqlx::query("DELETE FROM ledger_backfills WHERE name = 'task_views'")
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                return Ok(true);
            };
            sqlx::query(
                "UPDATE provider_calls c SET task_status = t.status, task_verdict = t.verdict,
                    task_risk = t.risk
                 FROM tasks t
                 WHERE t.task_id > $1 AND t.task_id <= $2 AND c.task_id = t.task_id
                   AND (c.task_status, c.task_verdict, c.task_risk)
                       IS DISTINCT FROM (t.status, t.verdict, t.risk)",
            )
            .bind(after)
            .bind(last)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE ledger_backfills SET after = $1 WHERE name = 'task_views'")
                .bind(last)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            batches += 1;
            if batches.is_multiple_of(10) {
                let (from, to) = (first.unwrap_or(0.0), at(last));
                let rate = (to - from) / started.elapsed().as_secs_f64().max(1e-3);
                let left = if rate > 0.0 {
                    format!(", about {:.0} s left", (1.0 - to) / rate)
                } else {
                    String::new()
                };
                say(format!(
                    "copying the task views to their calls: {:.0} % ({} tasks this run{left}); \
                     an interrupted run resumes here",
                    to * 100.0,
                    batches * BATCH as u64
                ));
            }
        }
    }

    /// Fails unless every embedded migration has been applied.
    ///
    /// # Errors
    /// [`Error::NotMigrated`] naming the first missing migration.
    pub async fn check_migrated(&self) -> Result<()> {
        let applied = self.applied().await?;
        match MIGRATOR.iter().find(|m| !applied.contains(&m.version)) {
            Some(m) => Err(Error::NotMigrated(format!(
                "migration {} ({}) has not been applied",
                m.version, m.description
            ))),
            None => Ok(()),
        }
    }

    /// Writes a batch of calls and finished tasks in one transaction. A call already recorded
    /// (same task, delivery and call number) is completed if it was `started`, else left as
    /// it is. Text is made storable first (NUL becomes U+FFFD).
    ///
    /// A batch Postgres refuses for its data (SQLSTATE class 21, 22, 23 or 54: a value out of
    /// range, say) is written again row by row, so one bad row never holds up the others or
    /// the tasks they belong to: a row refused alone is logged, counted in
    /// `llmq_ledger_rows_rejected_total` and left out.
    ///
    /// # Errors
    /// Postgres fails otherwise (unreachable, not migrated); then nothing of the batch was
    /// written, and writing it again is safe.
    pub async fn record(&self, calls: &[CallRow], tasks: &[TaskRow]) -> Result<()> {
        match self.write(calls, tasks).await {
            Err(Error::Query(e)) if refused_for_its_data(&e) && calls.len() + tasks.len() > 1 => {
                tracing::warn!("the ledger refused a batch ({e}); writing its rows one by one");
                for c in calls {
                    self.write_alone(std::slice::from_ref(c), &[], &c.task_id)
                        .await?;
                }
                for t in tasks {
                    self.write_alone(&[], std::slice::from_ref(t), &t.task_id)
                        .await?;
                }
                Ok(())
            }
            Err(Error::Query(e)) if refused_for_its_data(&e) => {
                let task = calls
                    .first()
                    .map(|c| c.task_id)
                    .or(tasks.first().map(|t| t.task_id));
                reject(task, &e);
                Ok(())
            }
            other => other,
        }
    }

    /// Writes one row; one that Postgres refuses for its data is logged and left out.
    async fn write_alone(&self, calls: &[CallRow], tasks: &[TaskRow], task: &Uuid) -> Result<()> {
        match self.write(calls, tasks).await {
            Err(Error::Query(e)) if refused_for_its_data(&e) => {
                reject(Some(*task), &e);
                Ok(())
            }
            other => other,
        }
    }

    /// Begins a transaction whose statements find rows by task id (`task_id = ANY($1)`) with
    /// sequential scans off. A partition no `ANALYZE` has seen yet (a new month's, for its
    /// first minute or so; every partition of a fresh database) has no statistics, and
    /// the planner then guesses that a batch's ids match a tenth of its rows and reads all of
    /// them: on the tasks partition of `bench=e2e_mock` that delete of earlier finishes was
    /// half of Postgres's time, growing with the partition. The index is right for a batch's
    /// ids whatever the statistics say. Nested loops are off too: bounded to the partitions of
    /// the tasks' lives (migration `20261203000002_task_spans`), the lookups look cheap enough
    /// to the planner to run once per task joined, each for all the batch's ids; a hash join
    /// runs them once.
    async fn begin_by_task_ids(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(self
            .pool
            .begin_with("BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL enable_nestloop = off")
            .await?)
    }

    async fn write(&self, calls: &[CallRow], tasks: &[TaskRow]) -> Result<()> {
        if calls.is_empty() && tasks.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_by_task_ids().await?;
        if !calls.is_empty() {
            insert_calls(&mut tx, calls, tasks).await?;
        }
        if !tasks.is_empty() {
            replace_tasks(&mut tx, tasks).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes the `started` rows of calls that were never made (their caller gave up
    /// waiting for the commit): a `started` row must stand for a call that was made.
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn forget_started(&self, calls: &[CallRow]) -> Result<()> {
        if calls.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_by_task_ids().await?;
        sqlx::query(
            "DELETE FROM provider_calls c
             USING UNNEST($1::uuid[], $2::uuid[], $3::int4[], $4::timestamptz[])
                AS g(task_id, delivery, call_no, called_at)
             WHERE c.task_id::text = g.task_id::text AND c.delivery = g.delivery
               AND c.call_no = g.call_no AND c.called_at = g.called_at AND c.task_id = ANY($1)
               AND c.called_at = ANY($4) AND c.outcome = 'started'",
        )
        .bind(calls.iter().map(|c| c.task_id).collect::<Vec<_>>())
        .bind(calls.iter().map(|c| c.delivery).collect::<Vec<_>>())
        .bind(calls.iter().map(|c| c.call_no).collect::<Vec<_>>())
        .bind(calls.iter().map(|c| c.called_at).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records reviews' and checks' verdicts on the tasks they judged.
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn verdicts(&self, verdicts: &[Verdict]) -> Result<()> {
        if verdicts.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_by_task_ids().await?;
        sqlx::query(
            "UPDATE tasks SET verdict = v.approved
             FROM UNNEST($1::uuid[], $2::bool[]) AS v(task_id, approved)
             WHERE tasks.task_id::text = v.task_id::text AND tasks.task_id = ANY($1)",
        )
        .bind(verdicts.iter().map(|v| v.task_id).collect::<Vec<_>>())
        .bind(verdicts.iter().map(|v| v.approved).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// What learned routing reads: per provider, model, task type and risk (and per type
    /// for every risk together), the calls of `queues` made since `since` that a model
    /// answered or failed on its own account (an outage, a rate limit or a quota is neither),
    /// and those it answered in a task that succeeded without a review or check rejecting
    /// its output. Counting calls, not tasks, holds a model's failures against it even when
    /// a fallback saved the task.
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn routing_stats(
        &self,
        queues: &[String],
        since: DateTime<Utc>,
    ) -> Result<crate::routing::Stats> {
        use futures_util::TryStreamExt;
        /// provider, model, task type, risk ('' unknown), tries, successes, the answered
        /// calls' latency histogram
        type Row = (String, String, String, String, i64, i64, Vec<i64>);
        /// tries, successes, latency histogram
        type Sums = (i64, i64, Vec<i64>);
        fn add(to: &mut Sums, tries: i64, successes: i64, latency: &[i64]) {
            to.0 += tries;
            to.1 += successes;
            if to.2.len() < latency.len() {
                to.2.resize(latency.len(), 0);
            }
            for (sum, n) in to.2.iter_mut().zip(latency) {
                *sum += n;
            }
        }
        roll(&self.pool).await?;
        // From the rollups (migrations/20261126000002_routing_rollups.sql, which defines
        // what counts and what succeeded): whole UTC days from `since`'s. The rows are
        // added up here as they stream in, per risk and over every risk: merging their
        // histograms in SQL took a plpgsql loop per row (182 ms for 6,888 rows, where this
        // reads them in a fraction of that).
        let mut rows = sqlx::query_as::<_, Row>(
            "SELECT provider, model, task_type, risk, tries, successes, latency
             FROM routing_rollups
             WHERE day >= ($1 AT TIME ZONE 'UTC')::date AND queue = ANY($2)",
        )
        .bind(since)
        .bind(queues)
        .fetch(&self.pool);
        let mut by_risk: HashMap<(String, String, String, Option<Risk>), Sums> = HashMap::new();
        while let Some((provider, model, task_type, risk, tries, successes, latency)) =
            rows.try_next().await?
        {
            // Calls whose task has no risk (or no row yet) count in the line for every risk
            // only.
            if let Ok(risk) = risk.parse::<Risk>() {
                let key = (
                    provider.clone(),
                    model.clone(),
                    task_type.clone(),
                    Some(risk),
                );
                add(by_risk.entry(key).or_default(), tries, successes, &latency);
            }
            let key = (provider, model, task_type, None);
            add(by_risk.entry(key).or_default(), tries, successes, &latency);
        }
        let mut stats = crate::routing::Stats::default();
        for (key, (tries, successes, latency)) in by_risk {
            if tries > 0 {
                let observed = crate::routing::Observed {
                    tasks: u64::try_from(tries).unwrap_or(0),
                    successes: u64::try_from(successes).unwrap_or(0),
                    latency_ms: median_latency_ms(&latency),
                };
                stats.by_model.insert(key, observed);
            }
        }
        Ok(stats)
    }

    /// Tasks that finished in `[since, until)` (whole UTC days; of one chain or batch:
    /// exactly).
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn tasks_in(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        scope: Scope<'_>,
    ) -> Result<i64> {
        let sql = match scope {
            Scope::All => {
                roll(&self.pool).await?;
                format!("SELECT coalesce(sum(tasks), 0)::int8 FROM task_rollups WHERE {DAYS}")
            }
            Scope::Tenant(_) => {
                roll(&self.pool).await?;
                format!(
                    "SELECT coalesce(sum(tasks), 0)::int8 FROM spend_rollups
                     WHERE tag = '' AND {DAYS} AND tenant = $3"
                )
            }
            _ => format!(
                "SELECT count(*) FROM tasks
                 WHERE {} AND finished_at >= $1 AND finished_at < $2",
                scope.tasks()
            ),
        };
        Ok(sqlx::query_scalar(&sql)
            .bind(since)
            .bind(until)
            .bind(scope.id())
            .fetch_one(&self.pool)
            .await?)
    }

    /// The tasks of chain `chain_id` with a call in `[since, until)`, in the order they ran.
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn chain_tasks(
        &self,
        chain_id: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<ChainTask>> {
        // task, type, models in call order, calls, cost, first call
        type Row = (Uuid, String, Vec<String>, i64, f64, DateTime<Utc>);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT task_id, min(task_type),
                    array_agg(provider || '/' || model ORDER BY called_at),
                    count(*), coalesce(sum(cost_usd), 0)::float8, min(called_at)
             FROM provider_calls
             WHERE chain_id = $1 AND called_at >= $2 AND called_at < $3
             GROUP BY task_id ORDER BY min(called_at), task_id",
        )
        .bind(chain_id)
        .bind(since)
        .bind(until)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(task_id, task_type, all, calls, cost_usd, first_call)| {
                let mut models: Vec<String> = Vec::new();
                for m in all {
                    if !models.contains(&m) {
                        models.push(m);
                    }
                }
                ChainTask {
                    task_id,
                    task_type,
                    models,
                    calls,
                    cost_usd,
                    first_call,
                }
            })
            .collect())
    }

    /// Costs of calls made in `[since, until)`, grouped, most expensive first; a line's
    /// `tasks` are the tasks of its key that finished in the range. Read from the rollups
    /// (whole UTC days); one chain's from its raw rows. By chain over the whole ledger, see
    /// [`Ledger::costliest_chains`].
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn costs(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        scope: Scope<'_>,
        by: GroupBy<'_>,
    ) -> Result<Vec<CostLine>> {
        let (calls, tasks) = match (scope, by.rollup_key()) {
            (Scope::All, None) => return self.costliest_chains(since, until, u32::MAX).await,
            (Scope::All, Some(key)) if !matches!(by, GroupBy::Tenant | GroupBy::Tag(_)) => {
                roll(&self.pool).await?;
                (
                    format!(
                        "SELECT {key} AS key, {CALL_SUMS} FROM call_rollups WHERE {DAYS}
                         GROUP BY 1 HAVING sum(calls) <> 0 OR sum(cost_usd) <> 0"
                    ),
                    format!(
                        "SELECT {key} AS key, sum(tasks) AS tasks FROM task_rollups
                         WHERE {DAYS} GROUP BY 1"
                    ),
                )
            }
            (Scope::All | Scope::Tenant(_), Some(key)) => {
                roll(&self.pool).await?;
                spend_sql(scope, by, key)
            }
            (_, _) => (
                format!(
                    "SELECT {key} AS key, count(*) FILTER (WHERE outcome NOT IN ('unsent', 'cached')) AS calls,
                        sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
                        sum(cached_tokens) AS cached_tokens, sum(cost_usd) AS cost_usd,
                        coalesce(sum(list_cost_usd - cost_usd), 0) AS batch_saved_usd
                     FROM provider_calls
                     WHERE {rows} AND called_at >= $1 AND called_at < $2 GROUP BY 1",
                    key = by.raw_key("called_at"),
                    rows = scope.rows()
                ),
                format!(
                    "SELECT {key} AS key, count(*) AS tasks FROM tasks
                     WHERE {rows} AND finished_at >= $1 AND finished_at < $2 GROUP BY 1",
                    key = by.raw_key("finished_at"),
                    rows = scope.tasks()
                ),
            ),
        };
        let sql = format!(
            "WITH c AS ({calls}), t AS ({tasks})
             SELECT c.key, c.calls::int8 AS calls, coalesce(t.tasks, 0)::int8 AS tasks,
                c.input_tokens::int8 AS input_tokens, c.output_tokens::int8 AS output_tokens,
                c.cached_tokens::int8 AS cached_tokens, c.cost_usd::float8 AS cost_usd,
                c.batch_saved_usd::float8 AS saved_usd
             FROM c LEFT JOIN t ON t.key = c.key
             ORDER BY cost_usd DESC, key"
        );
        Ok(sqlx::query_as::<_, CostLine>(&sql)
            .bind(since)
            .bind(until)
            .bind(scope.id())
            .bind(by.tag())
            .fetch_all(&self.pool)
            .await?)
    }

    /// The `limit` costliest chains begun in `[since, until)` (whole UTC days: the day of a
    /// chain's first call or finished task), each with its whole cost, most expensive first.
    /// Read from `chain_costs`: each day of the range is one walk of its index that stops
    /// after `limit` rows, so the time grows with the days and `limit`, not with the chains.
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn costliest_chains(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<CostLine>> {
        roll(&self.pool).await?;
        Ok(sqlx::query_as::<_, CostLine>(
            "SELECT c.chain_id AS key, c.calls, c.tasks, c.input_tokens, c.output_tokens,
                c.cached_tokens, c.cost_usd::float8 AS cost_usd,
                c.batch_saved_usd::float8 AS saved_usd
             FROM generate_series(
                    greatest(($1 AT TIME ZONE 'UTC')::date,
                        (SELECT min(first_day) FROM chain_costs)),
                    (($2 - interval '1 microsecond') AT TIME ZONE 'UTC')::date,
                    interval '1 day') d,
                LATERAL (SELECT * FROM chain_costs c WHERE c.first_day = d::date
                    AND (c.calls, c.tasks, c.cost_usd) <> (0, 0, 0)
                    ORDER BY c.cost_usd DESC LIMIT $3) c
             ORDER BY c.cost_usd DESC, key LIMIT $3",
        )
        .bind(since)
        .bind(until)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }
}

/// The two statements of a batch of [`Ledger::move_history`], for history tables of these
/// columns: its calls (each with its task's view), then its tasks; `$1` and `$2` bound the
/// batch's task ids.
fn history_moves(calls: &[String], tasks: &[String]) -> (String, String) {
    let has = |cols: &[String], c: &str| cols.iter().any(|x| x == c);
    // A release before `20261123000001_calls_by_delivery` had no delivery: that
    // migration's value for the rows it found.
    let (call_cols, call_values) = if has(calls, "delivery") {
        (
            calls.join(", "),
            calls
                .iter()
                .map(|c| format!("m.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
        )
    } else {
        (
            format!("{}, delivery", calls.join(", ")),
            format!(
                "{}, md5(m.task_id::text || '/' || m.run || '/' || m.attempt)::uuid",
                calls
                    .iter()
                    .map(|c| format!("m.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    };
    // A task finished again since the history was set aside (or whose call went aside
    // just before its finish was written) has its view in the ledger; else in the
    // history.
    let view = |c: &str| {
        let aside = if has(tasks, c) {
            format!("t.{c}")
        } else {
            "NULL".to_owned()
        };
        format!("CASE WHEN n.found THEN n.{c} ELSE {aside} END")
    };
    let move_calls = format!(
        "WITH m AS (DELETE FROM provider_calls_history c
        WHERE c.task_id > $1 AND c.task_id <= $2 RETURNING c.*)
         INSERT INTO provider_calls ({call_cols}, task_status, task_verdict, task_risk)
         SELECT {call_values}, {status}, {verdict}, {risk}
         FROM m LEFT JOIN tasks_history t ON t.task_id = m.task_id
        LEFT JOIN LATERAL (SELECT true AS found, x.status, x.verdict, x.risk
            FROM tasks x WHERE x.task_id = m.task_id LIMIT 1) n ON true
         ON CONFLICT DO NOTHING",
        status = view("status"),
        verdict = view("verdict"),
        risk = view("risk"),
    );
    let move_tasks = format!(
        "WITH m AS (DELETE FROM tasks_history h
        WHERE h.task_id > $1 AND h.task_id <= $2 RETURNING h.*)
         INSERT INTO tasks ({cols})
         SELECT {values} FROM m
         WHERE NOT EXISTS (SELECT FROM tasks t WHERE t.task_id = m.task_id)
         ON CONFLICT DO NOTHING",
        cols = tasks.join(", "),
        values = tasks
            .iter()
            .map(|c| format!("m.{c}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    (move_calls, move_tasks)
}

/// How far `id` is through the UUID space, 0 to 1: task ids are random, so how far a walk
/// in their order is through the tasks.
fn through(id: Uuid) -> f64 {
    f64::from(id.as_fields().0) / f64::from(u32::MAX)
}

/// The median of a latency histogram of the routing rollups (bucket `b` holds
/// `[1.1^b - 1, 1.1^(b+1) - 1)` ms): the middle of the bucket the median call falls in, so
/// within 5 % of the true median. `None` for an empty histogram.
fn median_latency_ms(buckets: &[i64]) -> Option<u64> {
    let total: i64 = buckets.iter().map(|n| (*n).max(0)).sum();
    if total == 0 {
        return None;
    }
    let mut seen = 0;
    for (b, n) in buckets.iter().enumerate() {
        seen += (*n).max(0);
        if 2 * seen >= total {
            let middle = 1.1_f64.powf(b as f64 + 0.5) - 1.0;
            return Some(middle.round().max(0.0) as u64);
        }
    }
    None
}

/// Sums what the ledger wrote since the last roll into the rollups (`ledger_roll()`,
/// migration `20261204000001_deferred_rollups`): the scheduler's `ledger_rollups` duty runs
/// it, and every report before it reads, so a report counts every row committed before it.
/// Any number of processes may roll at once; Postgres runs one roll at a time, and a roll
/// neither skips a row nor counts one twice. On a read-only server (a replica), or for a
/// role that may only read, nothing is rolled, and a report reads what the last roll summed.
///
/// # Errors
/// Postgres fails.
pub async fn roll(pool: &PgPool) -> Result<()> {
    // Reports asked for at once share a roll: one that started after a report asked has
    // summed every row committed before it, so the report need not roll again. The costs
    // page's six reads cost one roll, not six (issue 68: 6 × 6-18 ms of its 103-126 ms).
    let asked = std::time::Instant::now();
    let gate = roll_gate(pool);
    let mut last = gate.lock().await;
    if last.is_some_and(|started| started >= asked) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    roll_now(pool).await?;
    *last = Some(started);
    Ok(())
}

/// When the last roll this process made on `pool`'s database started, behind the lock that
/// makes its rolls one at a time (Postgres runs one at a time anyway).
fn roll_gate(pool: &PgPool) -> Arc<tokio::sync::Mutex<Option<std::time::Instant>>> {
    type Gates = HashMap<String, Arc<tokio::sync::Mutex<Option<std::time::Instant>>>>;
    static GATES: std::sync::LazyLock<std::sync::Mutex<Gates>> =
        std::sync::LazyLock::new(Default::default);
    let o = pool.connect_options();
    // The options too: a `search_path` there names another ledger in the same database.
    let database = format!(
        "{}:{}:{:?}/{}@{} {}",
        o.get_host(),
        o.get_port(),
        o.get_socket(),
        o.get_database().unwrap_or_default(),
        o.get_username(),
        o.get_options().unwrap_or_default()
    );
    let mut gates = GATES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Arc::clone(gates.entry(database).or_default())
}

/// One roll, made now.
async fn roll_now(pool: &PgPool) -> Result<()> {
    // A roll that copies a task's view to a call a writer holds can meet that writer waiting
    // for the roll's lock (a task's finish written again as the roll reaches it); Postgres
    // then aborts one of the two, and the roll is made again (the wait was Postgres's own
    // `deadlock_timeout`).
    let mut deadlocks = 0;
    loop {
        // Committed without waiting for its flush: a roll lost in a crash is lost whole,
        // its line with its sums, and the next roll sums the same rows again.
        let rolled = async {
            let mut tx = pool
                .begin_with("BEGIN; SET LOCAL synchronous_commit = off")
                .await?;
            sqlx::query("SELECT ledger_roll()")
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        };
        match rolled.await {
            Ok(()) => return Ok(()),
            Err(sqlx::Error::Database(e)) => match e.code().as_deref() {
                // read_only_sql_transaction, insufficient_privilege
                Some("25006" | "42501") => return Ok(()),
                Some("40P01") if deadlocks < 3 => deadlocks += 1,
                _ => return Err(sqlx::Error::Database(e).into()),
            },
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether Postgres refused a statement for the data it carried (cardinality violation: two
/// rows of one key in a batch; data exception; integrity violation; program limit), which
/// writing it again cannot change.
fn refused_for_its_data(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            ["21", "22", "23", "54"]
                .iter()
                .any(|class| c.starts_with(class))
        }),
        _ => false,
    }
}

fn reject(task: Option<Uuid>, e: &sqlx::Error) {
    metrics::counter!("llmq_ledger_rows_rejected_total").increment(1);
    tracing::error!(
        task = %task.map(|t| t.to_string()).unwrap_or_default(),
        "the ledger refused a row and left it out: {e}"
    );
}

/// Borrowed unless a NUL had to be replaced: no copy per row.
fn opt(s: &Option<String>) -> Option<std::borrow::Cow<'_, str>> {
    s.as_deref().map(crate::text::storable)
}

/// Writes `calls`' rows. A call of a task finished in this batch (`tasks`) carries its status
/// and risk (what routing reads of its task), so the task's row has nothing to copy to it. A
/// completion replaces its `started` row, which is never summed in the rollups, and is
/// written by this transaction (`written`), so a roll sums it once this commits and the
/// triggers have nothing to take away or add (migration 20261204000001).
async fn insert_calls(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    calls: &[CallRow],
    tasks: &[TaskRow],
) -> Result<()> {
    use crate::text::storable as text;
    let finished = |c: &CallRow| tasks.iter().find(|t| t.task_id == c.task_id);
    sqlx::query(
        "INSERT INTO provider_calls (task_id, run, attempt, call_no, queue, chain_id, task_type,
            provider, model, input_tokens, output_tokens, cached_tokens, reasoning_tokens,
            cost_usd, latency_ms, outcome, error_class, error, worker, called_at, delivery,
            list_cost_usd, task_status, task_risk, cache_write_tokens, tenant, tags)
         SELECT t.task_id, t.run, t.attempt, t.call_no, t.queue, t.chain_id, t.task_type,
            t.provider, t.model, t.input_tokens, t.output_tokens, t.cached_tokens,
            t.reasoning_tokens, t.cost_usd::numeric(20, 10), t.latency_ms, t.outcome,
            t.error_class, t.error, t.worker, t.called_at, t.delivery,
            t.list_cost_usd::numeric(20, 10), t.task_status, t.task_risk,
            t.cache_write_tokens, t.tenant, t.tags::jsonb
         FROM UNNEST($1::uuid[], $2::int4[], $3::int4[], $4::int4[], $5::text[],
            $6::text[], $7::text[], $8::text[], $9::text[], $10::int8[], $11::int8[],
            $12::int8[], $13::int8[], $14::float8[], $15::int4[], $16::text[],
            $17::text[], $18::text[], $19::text[], $20::timestamptz[], $21::uuid[],
            $22::float8[], $23::text[], $24::text[], $25::int8[], $26::text[], $27::text[])
         AS t(task_id, run, attempt, call_no, queue, chain_id, task_type, provider, model,
            input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_usd,
            latency_ms, outcome, error_class, error, worker, called_at, delivery,
            list_cost_usd, task_status, task_risk, cache_write_tokens, tenant, tags)
         ON CONFLICT (task_id, delivery, call_no, called_at) DO UPDATE SET
            input_tokens = EXCLUDED.input_tokens, output_tokens = EXCLUDED.output_tokens,
            cached_tokens = EXCLUDED.cached_tokens,
            cache_write_tokens = EXCLUDED.cache_write_tokens,
            list_cost_usd = EXCLUDED.list_cost_usd,
            reasoning_tokens = EXCLUDED.reasoning_tokens, cost_usd = EXCLUDED.cost_usd,
            latency_ms = EXCLUDED.latency_ms, outcome = EXCLUDED.outcome,
            error_class = EXCLUDED.error_class, error = EXCLUDED.error,
            task_status = coalesce(EXCLUDED.task_status, provider_calls.task_status),
            task_risk = coalesce(EXCLUDED.task_risk, provider_calls.task_risk),
            written = EXCLUDED.written
         WHERE provider_calls.outcome = 'started'", // CallOutcome::Started
    )
    .bind(calls.iter().map(|c| c.task_id).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.run).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.attempt).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.call_no).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| text(&c.queue)).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| opt(&c.chain_id)).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| text(&c.task_type)).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| text(&c.provider)).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| text(&c.model)).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.input_tokens).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.output_tokens).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.cached_tokens).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.reasoning_tokens).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.cost_usd).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.latency_ms).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.outcome.as_str()).collect::<Vec<_>>())
    .bind(
        calls
            .iter()
            .map(|c| opt(&c.error_class))
            .collect::<Vec<_>>(),
    )
    .bind(calls.iter().map(|c| opt(&c.error)).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| text(&c.worker)).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.called_at).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.delivery).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.list_cost_usd).collect::<Vec<_>>())
    .bind(
        calls
            .iter()
            .map(|c| finished(c).map(|t| text(&t.status)))
            .collect::<Vec<_>>(),
    )
    .bind(
        calls
            .iter()
            .map(|c| finished(c).and_then(|t| opt(&t.risk)))
            .collect::<Vec<_>>(),
    )
    .bind(
        calls
            .iter()
            .map(|c| c.cache_write_tokens)
            .collect::<Vec<_>>(),
    )
    .bind(calls.iter().map(|c| opt(&c.tenant)).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.tags.as_deref()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Writes `tasks`' rows. A task finished before (a replay, a delivery after a worker died
/// past its write) keeps one row: the earlier finish goes, the rollups with it.
async fn replace_tasks(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    tasks: &[TaskRow],
) -> Result<()> {
    use crate::text::storable as text;
    let (from, until) = span(tasks);
    sqlx::query(
        // Found as the task triggers find calls (migrations/20261127000001 and
        // 20261203000002): one index lookup per task (`= ANY($1)`, sequential scans
        // off) in each partition of the batch's tasks' lives, joined by a hash (the
        // ids as text), not a lookup per pair. The span's bounds are parameters, not
        // subqueries, so the other partitions are pruned before the scan starts
        // rather than opened for nothing: 0.60 -> 0.33 ms a batch of 64 tasks.
        "DELETE FROM tasks t USING UNNEST($1::uuid[], $2::timestamptz[]) AS n(task_id, at)
         WHERE t.task_id::text = n.task_id::text AND t.task_id = ANY($1)
           AND t.finished_at <> n.at
           AND t.finished_at >= ledger_span_from($3, $3)
           AND t.finished_at < ledger_span_until($4)",
    )
    .bind(tasks.iter().map(|t| t.task_id).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| t.finished_at).collect::<Vec<_>>())
    .bind(from)
    .bind(until)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO tasks (task_id, queue, chain_id, task_type, status, attempts,
            provider, model, input_tokens, output_tokens, cost_usd, error, error_class,
            finished_at, risk, duration_ms, strategy, propensity, explored, candidates,
            batch_id, enqueued_at, tenant, tags)
         SELECT t.task_id, t.queue, t.chain_id, t.task_type, t.status, t.attempts,
            t.provider, t.model, t.input_tokens, t.output_tokens,
            t.cost_usd::numeric(20, 10), t.error, t.error_class, t.finished_at,
            t.risk, t.duration_ms, t.strategy, t.propensity, t.explored,
            t.candidates::jsonb, t.batch_id, t.enqueued_at, t.tenant, t.tags::jsonb
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
            $6::int4[], $7::text[], $8::text[], $9::int8[], $10::int8[], $11::float8[],
            $12::text[], $13::text[], $14::timestamptz[], $15::text[], $16::int8[],
            $17::text[], $18::float8[], $19::bool[], $20::text[], $21::text[],
            $22::timestamptz[], $23::text[], $24::text[])
         AS t(task_id, queue, chain_id, task_type, status, attempts, provider, model,
            input_tokens, output_tokens, cost_usd, error, error_class, finished_at,
            risk, duration_ms, strategy, propensity, explored, candidates, batch_id,
            enqueued_at, tenant, tags)
         ON CONFLICT (task_id, finished_at) DO UPDATE SET status = EXCLUDED.status,
            attempts = EXCLUDED.attempts, provider = EXCLUDED.provider,
            model = EXCLUDED.model, input_tokens = EXCLUDED.input_tokens,
            output_tokens = EXCLUDED.output_tokens, cost_usd = EXCLUDED.cost_usd,
            error = EXCLUDED.error, error_class = EXCLUDED.error_class,
            risk = EXCLUDED.risk,
            duration_ms = EXCLUDED.duration_ms, strategy = EXCLUDED.strategy,
            propensity = EXCLUDED.propensity, explored = EXCLUDED.explored,
            candidates = EXCLUDED.candidates, batch_id = EXCLUDED.batch_id,
            enqueued_at = EXCLUDED.enqueued_at, tenant = EXCLUDED.tenant,
            tags = EXCLUDED.tags",
    )
    .bind(tasks.iter().map(|t| t.task_id).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| text(&t.queue)).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| opt(&t.chain_id)).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| text(&t.task_type)).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| text(&t.status)).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| t.attempts).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| opt(&t.provider)).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| opt(&t.model)).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| t.input_tokens).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| t.output_tokens).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| t.cost_usd).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| opt(&t.error)).collect::<Vec<_>>())
    .bind(
        tasks
            .iter()
            .map(|t| opt(&t.error_class))
            .collect::<Vec<_>>(),
    )
    .bind(tasks.iter().map(|t| t.finished_at).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| opt(&t.risk)).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| t.duration_ms).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| opt(&t.strategy)).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| t.propensity).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| t.explored).collect::<Vec<_>>())
    .bind(
        tasks
            .iter()
            .map(|t| {
                t.candidates
                    .as_ref()
                    .map(|c| serde_json::to_string(c).unwrap_or_default())
            })
            .collect::<Vec<_>>(),
    )
    .bind(tasks.iter().map(|t| opt(&t.batch_id)).collect::<Vec<_>>())
    .bind(tasks.iter().map(TaskRow::enqueued).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| opt(&t.tenant)).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| t.tags.as_deref()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{TaskRow, days, median_latency_ms, span};
    use chrono::{DateTime, TimeDelta, Utc};
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn a_range_of_days_runs_from_its_first_midnight_to_the_one_after_its_last() {
        let d = |s: &str| s.parse::<chrono::NaiveDate>().unwrap();
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(
            days(d("2026-11-01"), d("2026-11-28")),
            Some((at("2026-11-01T00:00:00Z"), at("2026-11-29T00:00:00Z")))
        );
        assert_eq!(
            days(d("2026-11-28"), d("2026-11-28")),
            Some((at("2026-11-28T00:00:00Z"), at("2026-11-29T00:00:00Z")))
        );
        assert_eq!(days(d("2026-11-29"), d("2026-11-28")), None);
    }

    /// For any batch, the span the delete of earlier finishes searches holds every task's own
    /// (`ledger_span_from(enqueued, finished)` to `ledger_span_until(finished)`, margins
    /// aside): it starts at or before each task's enqueue and finish, has no start when a
    /// task's enqueue is unknown or not kept, and ends at or after each finish.
    #[test]
    fn a_batchs_span_holds_each_of_its_tasks_spans() {
        let mut rng = SmallRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
        let now = Utc::now();
        let mut unbounded = 0;
        for _ in 0..2000 {
            let tasks: Vec<TaskRow> = (0..rng.random_range(1..=64))
                .map(|_| {
                    let finished =
                        now + TimeDelta::seconds(rng.random_range(-4_000_000..4_000_000));
                    // Mostly before its finish; some after (a producer's clock ahead), some
                    // unknown, some too far back to be kept.
                    let enqueued = match rng.random_range(0..20) {
                        0 => None,
                        1 => Some(finished - TimeDelta::days(4000)),
                        2 => Some(finished + TimeDelta::seconds(rng.random_range(0..7200))),
                        _ => Some(finished - TimeDelta::seconds(rng.random_range(0..900_000))),
                    };
                    TaskRow {
                        finished_at: finished,
                        enqueued_at: enqueued,
                        ..TaskRow::default()
                    }
                })
                .collect();
            let (from, until) = span(&tasks);
            for t in &tasks {
                let start: Option<DateTime<Utc>> = t.enqueued().map(|e| e.min(t.finished_at));
                match (start, from) {
                    (Some(start), Some(from)) => assert!(from <= start),
                    (None, from) => assert_eq!(from, None, "a task without a start"),
                    (Some(_), None) => {}
                }
                assert!(until.is_some_and(|u| u >= t.finished_at));
            }
            assert_eq!(
                from.is_none(),
                tasks.iter().any(|t| t.enqueued().is_none()),
                "no start exactly when a task has none"
            );
            // And no wider than that: a span reaching further back than its earliest task
            // opens partitions for nothing, which is what bounding it was for.
            let starts: Option<Vec<_>> = tasks
                .iter()
                .map(|t| t.enqueued().map(|e| e.min(t.finished_at)))
                .collect();
            if let Some(starts) = starts {
                assert_eq!(
                    from,
                    starts.into_iter().min(),
                    "starts at the earliest start"
                );
            }
            assert_eq!(
                until,
                tasks.iter().map(|t| t.finished_at).max(),
                "ends at the latest finish"
            );
            unbounded += usize::from(from.is_none());
        }
        assert!(
            unbounded > 0 && unbounded < 2000,
            "both kinds of batch seen"
        );
    }

    /// `ledger_latency_bucket` (migrations/20261126000002_routing_rollups.sql), for the test.
    fn bucket(ms: u64) -> usize {
        (((1.0 + ms as f64).ln() / 1.1_f64.ln()).floor() as usize).min(159)
    }

    /// For any set of latencies, the median read from their histogram is within 5 % of the
    /// true median (nearest-rank, lower middle), or within 1 ms below 20 ms.
    #[test]
    fn the_histograms_median_is_within_five_percent() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let n = 1 + (next() % 200) as usize;
            let scale = 1 + next() % 100_000;
            let mut ms: Vec<u64> = (0..n).map(|_| next() % scale).collect();
            let mut h = vec![0_i64; 160];
            for m in &ms {
                h[bucket(*m)] += 1;
            }
            ms.sort_unstable();
            let truth = ms[(n - 1) / 2];
            let got = median_latency_ms(&h).unwrap();
            let off = got.abs_diff(truth) as f64;
            assert!(
                off <= 1.0 || off <= truth as f64 * 0.05 + 0.5,
                "{got} against {truth} over {n} latencies up to {scale}"
            );
        }
        assert_eq!(median_latency_ms(&[0; 160]), None);
    }
}
